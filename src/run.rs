//! The one-shot commands: `--run-now` and `validate`, and the exit codes they end with.

use crate::batch::{self, Mode};
use crate::config::Config;
use crate::db::{self, DbError};
use crate::error::RowError;
use crate::health;
use crate::incoming::{self, BatchFile};
use crate::report::{Report, Status};
use crate::shutdown::Shutdown;
use crate::telemetry;
use anyhow::{Context as _, bail};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// How a command ended (SPEC 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Every batch applied or recognised as a duplicate, or nothing to do.
    Clean = 0,
    /// At least one batch rejected or with failed rows.
    RowsFailed = 1,
    /// tokensync could not do its work.
    Trouble = 2,
}

impl Outcome {
    /// The outcome a batch's report amounts to.
    pub fn of(report: &Report) -> Outcome {
        match report.status {
            Status::Applied | Status::Duplicate => Outcome::Clean,
            Status::PartiallyApplied | Status::Rejected => Outcome::RowsFailed,
        }
    }
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> ExitCode {
        ExitCode::from(outcome as u8)
    }
}

/// Checks the folders: `incoming` must exist; `archive` and `failed` are created.
///
/// # Errors
/// When `incoming` is missing or the others cannot be created.
pub fn prepare_folders(config: &Config) -> anyhow::Result<()> {
    let incoming = &config.paths.incoming;
    if !incoming.is_dir() {
        bail!(
            "paths.incoming {} does not exist or is not a folder",
            incoming.display()
        );
    }
    for (key, path) in [
        ("paths.archive", &config.paths.archive),
        ("paths.failed", &config.paths.failed),
    ] {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create {key} {}", path.display()))?;
    }
    Ok(())
}

/// Opens the pool and checks that the database answers.
///
/// # Errors
/// When the database cannot be reached.
pub async fn open_pool(config: &Config) -> anyhow::Result<Pool> {
    let pool = db::pool(&config.database)?;
    health::check_database(&pool)
        .await
        .context("the database is unreachable")?;
    Ok(pool)
}

/// What one scan of `paths.incoming` came to.
#[derive(Debug, Clone, Copy)]
pub struct Scan {
    pub outcome: Outcome,
    /// The database went away during the scan: the files left wait for a retry.
    pub is_database_down: bool,
}

/// Processes every ready file of `paths.incoming` once, in name order, until a stop is
/// requested. Files held by another instance are left to it.
pub async fn scan(
    config: &Config,
    pool: &Pool,
    shutdown: &Shutdown,
    min_file_age: Duration,
    show_progress: bool,
) -> Scan {
    let mut scan = Scan {
        outcome: Outcome::Clean,
        is_database_down: false,
    };
    let files = match incoming::ready_files(&config.paths.incoming, min_file_age) {
        Ok(files) => files,
        Err(error) => {
            let folder = config.paths.incoming.display();
            tracing::error!(%error, "Cannot list paths.incoming {folder}.");
            scan.outcome = Outcome::Trouble;
            return scan;
        }
    };
    telemetry::scan_finished(files.len());

    for file in &files {
        if shutdown.is_requested() {
            break;
        }
        let mode = Mode::Apply { show_progress };
        match batch::process(config, pool, file, mode, shutdown).await {
            Ok(Some(report)) => scan.outcome = scan.outcome.max(Outcome::of(&report)),
            Ok(None) => telemetry::file_claimed_elsewhere(&file.name),
            Err(error) => {
                let is_database_down = is_connection_lost(&error);
                telemetry::batch_interrupted(&file.name, &error, is_database_down);
                scan.outcome = Outcome::Trouble;
                if is_database_down {
                    telemetry::database_up(false, Some(&format!("{error:#}")));
                    scan.is_database_down = true;
                    break;
                }
            }
        }
    }
    scan
}

/// `--run-now`: one scan, then the metrics to `metrics.textfile` when it is set.
///
/// `--run-now` is an operator's explicit request, so it takes files whatever their age
/// unless `schedule.min_file_age` was set in the file or the environment.
pub async fn run_now(config: &Config, metrics: Option<PrometheusHandle>) -> Outcome {
    let outcome = match run_now_inner(config).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::error!("{error:#}");
            Outcome::Trouble
        }
    };
    if let (Some(metrics), Some(path)) = (metrics, &config.metrics.textfile)
        && let Err(error) = telemetry::write_textfile(&metrics, path)
    {
        tracing::error!(%error, path = %path.display(), "Cannot write metrics.textfile.");
        return Outcome::Trouble;
    }
    outcome
}

async fn run_now_inner(config: &Config) -> anyhow::Result<Outcome> {
    prepare_folders(config)?;
    let pool = open_pool(config).await?;
    let shutdown = Shutdown::new();
    shutdown.on_signals(config.schedule.shutdown_timeout);
    let schedule = &config.schedule;
    let min_file_age = if schedule.is_min_file_age_set {
        schedule.min_file_age
    } else {
        Duration::ZERO
    };
    Ok(scan(config, &pool, &shutdown, min_file_age, true)
        .await
        .outcome)
}

fn is_connection_lost(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<DbError>()
            .is_some_and(DbError::is_connection_lost)
    })
}

/// `validate FILE…`: a full dry run of each file against the database, printing every
/// error and a summary line per file to standard output. Nothing is written or moved.
pub async fn validate(config: &Config, paths: &[PathBuf]) -> Outcome {
    let pool = match open_pool(config).await {
        Ok(pool) => pool,
        Err(error) => {
            tracing::error!("{error:#}");
            return Outcome::Trouble;
        }
    };
    let mut outcome = Outcome::Clean;
    for path in paths {
        let file_outcome = match validate_one(config, &pool, path).await {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::error!(file = %path.display(), "{error:#}");
                Outcome::Trouble
            }
        };
        outcome = outcome.max(file_outcome);
    }
    outcome
}

async fn validate_one(config: &Config, pool: &Pool, path: &Path) -> anyhow::Result<Outcome> {
    let Some(file) = BatchFile::from_path(path) else {
        bail!(
            "{} is not a batch file name (.csv, .jsonl or .ndjson, optionally .gz)",
            path.display()
        );
    };
    if !path.is_file() {
        bail!("{} is not a readable file", path.display());
    }
    let name = file.name.clone();
    let mut print_error = move |error: &RowError| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{name}: {error}");
    };
    let mode = Mode::Validate(&mut print_error);
    let report = batch::process(config, pool, &file, mode, &Shutdown::new())
        .await?
        .expect("a dry run always reports");
    println!("{}", summary(&report));
    Ok(Outcome::of(&report))
}

/// One line that says what applying a file would do.
fn summary(report: &Report) -> String {
    let verdict = match report.status {
        Status::Applied => "would be applied",
        Status::PartiallyApplied => "would be partially applied",
        Status::Rejected => "would be rejected",
        Status::Duplicate => "is a duplicate of a batch already applied",
    };
    format!(
        "{}: {verdict}: {} rows, {} to change, {} unchanged, {} failed",
        report.file,
        report.rows_total,
        report.rows_applied,
        report.rows_unchanged,
        report.rows_failed
    )
}
