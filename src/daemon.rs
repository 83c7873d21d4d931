//! The daemon: scans `paths.incoming` on the cron schedule until SIGTERM or SIGINT, serves
//! metrics and health, and rides out database outages.
//!
//! The scheduler only *asks* for a scan, through a channel of one slot: a single worker
//! runs the scans, so they never overlap, and ticks that come while a scan runs fold into
//! one scan after it. A scan cut short because the database went away is retried with
//! capped exponential back-off (1 s doubling to 60 s) instead of on the ticks, or as soon as
//! the database check (every 5 s) finds the database back.

use crate::config::Config;
use crate::db;
use crate::health;
use crate::run::{self, Outcome};
use crate::shutdown::Shutdown;
use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};

/// How often the database is checked between scans.
const DATABASE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The first and the longest wait before a scan that the database cut short is retried.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(60);

/// Runs the daemon until a stop is requested; the outcome is `Clean` after a graceful stop.
pub async fn run(config: &Config, metrics: PrometheusHandle) -> Outcome {
    match run_inner(config, metrics).await {
        Ok(()) => Outcome::Clean,
        Err(error) => {
            tracing::error!("{error:#}");
            Outcome::Trouble
        }
    }
}

async fn run_inner(config: &Config, metrics: PrometheusHandle) -> anyhow::Result<()> {
    run::prepare_folders(config)?;
    let pool = db::pool(&config.database)?;
    let shutdown = Shutdown::new();
    shutdown.on_signals(config.schedule.shutdown_timeout);

    let listen = config.metrics.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on metrics.listen {listen}"))?;
    let listen = listener.local_addr().unwrap_or(listen);
    let server = tokio::spawn(health::serve(
        listener,
        metrics,
        pool.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(health::watch_database(
        pool.clone(),
        DATABASE_CHECK_INTERVAL,
        shutdown.clone(),
    ));

    let (ticks, mut requests) = mpsc::channel::<()>(1);
    let mut scheduler = schedule(&config.schedule.cron, ticks.clone()).await?;
    tracing::info!(cron = %config.schedule.cron, %listen, "Daemon started.");

    // A first scan at start-up: files left by a stop are taken at once.
    let _ = ticks.try_send(());
    let mut retry_in: Option<Duration> = None;
    loop {
        let retry = async {
            match retry_in {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        // While the database is down, ticks wait for the back-off or for the database's
        // return, so retries do not come every tick.
        let is_waiting = retry_in.is_some();
        tokio::select! {
            () = shutdown.requested() => break,
            _ = requests.recv(), if !is_waiting => {}
            () = retry => {}
            () = health::database_back(), if is_waiting => {}
        }
        while requests.try_recv().is_ok() {}
        let scan = run::scan(
            config,
            &pool,
            &shutdown,
            config.schedule.min_file_age,
            false,
        )
        .await;
        retry_in = if scan.is_database_down {
            let next = retry_in.map_or(FIRST_RETRY, |wait| (wait * 2).min(LONGEST_RETRY));
            tracing::debug!(
                retry_in_ms = next.as_millis() as u64,
                "Scan will be retried."
            );
            Some(next)
        } else {
            None
        };
    }

    if let Err(error) = scheduler.shutdown().await {
        tracing::debug!(%error, "Scheduler did not stop cleanly.");
    }
    let _ = server.await;
    tracing::info!("Daemon stopped.");
    Ok(())
}

/// Starts the cron schedule; each tick asks for a scan unless one is already asked for.
async fn schedule(cron: &str, ticks: mpsc::Sender<()>) -> anyhow::Result<JobScheduler> {
    let scheduler = JobScheduler::new()
        .await
        .context("cannot start the scheduler")?;
    let job = Job::new_async(cron, move |_, _| {
        let ticks = ticks.clone();
        Box::pin(async move {
            let _ = ticks.try_send(());
        })
    })
    .with_context(|| format!("schedule.cron {cron:?} cannot be scheduled"))?;
    scheduler
        .add(job)
        .await
        .context("cannot add the scan to the scheduler")?;
    scheduler
        .start()
        .await
        .context("cannot start the scheduler")?;
    Ok(scheduler)
}
