//! Whether the database answers, and the daemon's HTTP listener: `/metrics` (Prometheus
//! text format), `/healthz` (the process is alive) and `/readyz` (the database answers).

use crate::db::DbError;
use crate::shutdown::Shutdown;
use crate::telemetry;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a database check may take before the database counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the database a trivial question, and records the answer in
/// `tokensync_database_up`.
///
/// # Errors
/// When the database does not answer within a few seconds.
pub async fn check_database(pool: &Pool) -> anyhow::Result<()> {
    let answer = tokio::time::timeout(CHECK_TIMEOUT, async {
        let client = pool.get().await.map_err(DbError::from)?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(DbError::query("the database does not answer"))?;
        Ok::<_, DbError>(())
    })
    .await;
    let result = match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(anyhow::Error::from(error)),
        Err(_) => Err(anyhow::anyhow!(
            "the database did not answer within {CHECK_TIMEOUT:?}"
        )),
    };
    let is_back = match &result {
        Ok(()) => telemetry::database_up(true, None),
        Err(error) => telemetry::database_up(false, Some(&format!("{error:#}"))),
    };
    if is_back {
        DATABASE_BACK.notify_waiters();
    }
    result
}

/// Wakes whoever waits in [`database_back`] when the database answers again.
static DATABASE_BACK: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Waits until a check finds the database answering again after an outage.
pub async fn database_back() {
    DATABASE_BACK.notified().await;
}

/// Checks the database every `every` until a stop is requested, so that
/// `tokensync_database_up` stays true between scans too.
pub async fn watch_database(pool: Pool, every: Duration, shutdown: Shutdown) {
    loop {
        let _ = check_database(&pool).await;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.requested() => return,
        }
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: PrometheusHandle,
    pool: Pool,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until a stop is requested.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    pool: Pool,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let upkeep = metrics.clone();
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
                () = upkeep_stop.requested() => return,
            }
        }
    });

    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(Endpoints { metrics, pool });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.requested().await })
        .await
}

async fn render_metrics(State(endpoints): State<Endpoints>) -> String {
    endpoints.metrics.render()
}

async fn readiness(State(endpoints): State<Endpoints>) -> (StatusCode, &'static str) {
    match check_database(&endpoints.pool).await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is unreachable\n",
        ),
    }
}
