//! The one-shot commands: `--run-now` and `validate`, and the exit codes they end with.

use crate::batch::{self, BatchFile, Mode};
use crate::config::Config;
use crate::db::{self, DbError};
use crate::error::RowError;
use crate::report::{Report, Status};
use crate::shutdown::Shutdown;
use crate::telemetry;
use anyhow::{Context as _, bail};
use deadpool_postgres::Pool;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    let client = pool
        .get()
        .await
        .map_err(DbError::from)
        .context("the database is unreachable")?;
    client
        .simple_query("SELECT 1")
        .await
        .context("the database does not answer")?;
    Ok(pool)
}

/// `--run-now`: processes every ready file of `paths.incoming` once, in name order.
///
/// `--run-now` is an operator's explicit request, so it takes files whatever their age
/// unless `schedule.min_file_age` was set in the file or the environment.
pub async fn run_now(config: &Config) -> Outcome {
    match run_now_inner(config).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::error!("{error:#}");
            Outcome::Trouble
        }
    }
}

async fn run_now_inner(config: &Config) -> anyhow::Result<Outcome> {
    let shutdown = Shutdown::new();
    shutdown.on_signals(config.schedule.shutdown_timeout);
    prepare_folders(config)?;
    let pool = open_pool(config).await?;
    telemetry::database_up(true);
    let min_file_age = if config.schedule.is_min_file_age_set {
        config.schedule.min_file_age
    } else {
        Default::default()
    };
    let files = batch::ready_files(&config.paths.incoming, min_file_age)
        .with_context(|| format!("cannot list {}", config.paths.incoming.display()))?;
    telemetry::scan_finished(files.len());

    let mut outcome = Outcome::Clean;
    for file in &files {
        if shutdown.is_requested() {
            break;
        }
        match batch::process(config, &pool, file, Mode::Apply, &shutdown).await {
            Ok(Some(report)) => outcome = outcome.max(Outcome::of(&report)),
            Ok(None) => {}
            Err(error) => {
                telemetry::batch_interrupted(&file.name, &error);
                outcome = Outcome::Trouble;
                if is_connection_lost(&error) {
                    telemetry::database_up(false);
                    break;
                }
            }
        }
    }
    Ok(outcome)
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
