//! One batch: a file of `paths.incoming`, from being found to being archived with its
//! reports.
//!
//! A batch is applied in one transaction. Its SHA-256 is computed first; under a
//! transaction-scoped advisory lock on that hash, the `batches` ledger tells whether the same
//! content was already applied (then the batch is a `duplicate`). The rows stream from a
//! reader thread to the [`Applier`], the reports are written and flushed in a work folder
//! (`paths.incoming/.tokensync/<batch id>/`), the ledger row is inserted and the transaction
//! commits; only then do the reports and the file move to `paths.archive` or
//! `paths.failed`, the reports first.

use crate::apply::{self, Applier, RowOutcome};
use crate::config::{Config, OnRowError};
use crate::db::DbError;
use crate::error::{ErrorCode, RowError};
use crate::report::{self, Report, ReportFiles, Status};
use crate::row::{self, FileKind, Row, Rows, Span};
use crate::telemetry;
use anyhow::Context as _;
use chrono::Utc;
use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_postgres::Transaction;
use uuid::Uuid;

/// The folder inside `paths.incoming` where batches keep their work files.
pub const WORK_DIR: &str = ".tokensync";

/// A batch file found in `paths.incoming`.
#[derive(Debug, Clone)]
pub struct BatchFile {
    pub path: PathBuf,
    pub name: String,
    pub kind: FileKind,
}

impl BatchFile {
    /// The batch file at `path`, if its name is one of a batch file (SPEC 2.1).
    pub fn from_path(path: &Path) -> Option<BatchFile> {
        let name = path.file_name()?.to_str()?.to_owned();
        let kind = FileKind::from_name(&name)?;
        Some(BatchFile {
            path: path.to_owned(),
            name,
            kind,
        })
    }
}

/// The files of `incoming` ready to be taken, in lexical order of their names: batch file
/// names, not hidden, regular files (links are skipped), unmodified for `min_file_age`.
///
/// # Errors
/// When the folder cannot be listed.
pub fn ready_files(incoming: &Path, min_file_age: Duration) -> io::Result<Vec<BatchFile>> {
    let now = SystemTime::now();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(incoming)? {
        let entry = entry?;
        let path = entry.path();
        let Some(file) = BatchFile::from_path(&path) else {
            continue;
        };
        if file.name.starts_with('.') {
            continue;
        }
        // `DirEntry::metadata` does not follow links, so a link is never a regular file.
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if !metadata.file_type().is_file() {
            continue;
        }
        let age = metadata
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok());
        if age.unwrap_or_default() < min_file_age && !min_file_age.is_zero() {
            continue;
        }
        files.push(file);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Whether a batch runs for real, or as the dry run of `validate` that hands every error to
/// its callback and writes nothing.
pub enum Mode<'a> {
    Apply,
    Validate(&'a mut (dyn FnMut(&RowError) + Send)),
}

impl Mode<'_> {
    fn is_dry_run(&self) -> bool {
        matches!(self, Mode::Validate(_))
    }
}

/// The hex SHA-256 of a file as stored (compressed if it is).
///
/// # Errors
/// When the file cannot be read.
pub async fn sha256_of(path: &Path) -> io::Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .expect("the hashing thread does not panic")
}

/// The advisory lock key of a batch's content: the first 8 bytes of its SHA-256.
fn lock_key(sha256: &str) -> i64 {
    let bytes = hex::decode(&sha256[..16]).expect("a SHA-256 in hex");
    i64::from_be_bytes(bytes.try_into().expect("8 bytes"))
}

/// The counts of a batch while its rows are applied.
#[derive(Debug, Default)]
struct Tally {
    rows_total: u64,
    rows_applied: u64,
    rows_unchanged: u64,
    rows_failed: u64,
    errors_by_code: BTreeMap<ErrorCode, u64>,
    failed_spans: Vec<Span>,
    file_fault: Option<RowError>,
}

impl Tally {
    fn count_errors(&mut self, errors: &[RowError]) {
        for error in errors {
            *self.errors_by_code.entry(error.code).or_default() += 1;
        }
    }

    /// The batch's status once every row is known (SPEC 3).
    fn status(&self, on_row_error: OnRowError, max_failed_rows: Option<u64>) -> Status {
        if self.file_fault.is_some() {
            return Status::Rejected;
        }
        if self.rows_failed == 0 {
            return Status::Applied;
        }
        let is_over_limit = max_failed_rows.is_some_and(|max| self.rows_failed > max);
        let has_passed_rows = self.rows_applied + self.rows_unchanged > 0;
        match on_row_error {
            OnRowError::SkipRow if !is_over_limit && has_passed_rows => Status::PartiallyApplied,
            _ => Status::Rejected,
        }
    }
}

/// Where a batch's errors and results go: report files, or (for `validate`) a callback.
pub enum Sink<'a> {
    Files(ReportFiles),
    Errors(&'a mut (dyn FnMut(&RowError) + Send)),
}

impl Sink<'_> {
    fn error(&mut self, error: &RowError) -> io::Result<()> {
        match self {
            Sink::Files(files) => files.write_error(error),
            Sink::Errors(callback) => {
                callback(error);
                Ok(())
            }
        }
    }

    fn result(&mut self, line: u64, result: serde_json::Value) -> io::Result<()> {
        match self {
            Sink::Files(files) => files.write_result(line, result),
            Sink::Errors(_) => Ok(()),
        }
    }
}

/// Processes one batch file. With [`Mode::Apply`] the file ends in `paths.archive` or
/// `paths.failed` beside its reports; with [`Mode::Validate`] nothing is written anywhere.
///
/// # Errors
/// When the batch could not be carried to its end (the database went away, a file could not
/// be read or moved). The transaction is then rolled back and the file stays where it was.
pub async fn process(
    config: &Config,
    pool: &Pool,
    file: &BatchFile,
    mode: Mode<'_>,
) -> anyhow::Result<Report> {
    let clock = Instant::now();
    let started_at = Utc::now();
    let batch_id = Uuid::new_v4();
    let file_bytes = std::fs::metadata(&file.path)
        .with_context(|| format!("cannot read {}", file.path.display()))?
        .len();
    let sha256 = sha256_of(&file.path)
        .await
        .with_context(|| format!("cannot read {}", file.path.display()))?;

    let work_dir = config
        .paths
        .incoming
        .join(WORK_DIR)
        .join(batch_id.to_string());
    let is_dry_run = mode.is_dry_run();
    let mut sink = match mode {
        Mode::Apply => Sink::Files(
            ReportFiles::create(work_dir.clone(), file.kind)
                .with_context(|| format!("cannot create {}", work_dir.display()))?,
        ),
        Mode::Validate(callback) => Sink::Errors(callback),
    };

    let mut client = pool.get().await.map_err(DbError::from)?;
    let mut tx = client
        .transaction()
        .await
        .map_err(DbError::query("cannot begin a batch"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&sha256)])
        .await
        .map_err(DbError::query("cannot lock the batch"))?;

    let mut report = Report {
        batch_id,
        file: file.name.clone(),
        sha256,
        format: file.kind.format.as_str(),
        status: Status::Duplicate,
        rows_total: 0,
        rows_applied: 0,
        rows_unchanged: 0,
        rows_failed: 0,
        errors_by_code: BTreeMap::new(),
        started_at,
        finished_at: started_at,
    };

    let is_duplicate = is_applied(&tx, &report.sha256).await?;
    let mut header_span = None;
    let mut tally = Tally::default();
    if !is_duplicate {
        (tally, header_span) = apply_rows(config, &mut tx, file, is_dry_run, &mut sink).await?;
        report.status = tally.status(config.apply.on_row_error, config.apply.max_failed_rows);
        report.rows_total = tally.rows_total;
        report.rows_failed = tally.rows_failed;
        report.errors_by_code = std::mem::take(&mut tally.errors_by_code);
        if report.status != Status::Rejected {
            report.rows_applied = tally.rows_applied;
            report.rows_unchanged = tally.rows_unchanged;
        }
    }
    report.finished_at = Utc::now();

    let Sink::Files(mut files) = sink else {
        tx.rollback()
            .await
            .map_err(DbError::query("cannot end the dry run"))?;
        return Ok(report);
    };

    if report.status == Status::Rejected {
        files
            .discard_results()
            .context("cannot remove the results of a rejected batch")?;
    }
    files
        .write_rejects(
            &file.path,
            file.kind,
            config.apply.max_file_bytes,
            header_span,
            &tally.failed_spans,
        )
        .with_context(|| format!("cannot write the rejected rows of {}", file.name))?;
    files
        .finish(&report)
        .with_context(|| format!("cannot write the report of {}", file.name))?;

    if matches!(report.status, Status::Applied | Status::PartiallyApplied) {
        record(&*tx, &report).await?;
        tx.commit()
            .await
            .map_err(DbError::query("cannot commit the batch"))?;
    } else {
        tx.rollback()
            .await
            .map_err(DbError::query("cannot roll back the batch"))?;
        record(&**client, &report).await?;
    }

    let dest = if report.status.is_archived() {
        &config.paths.archive
    } else {
        &config.paths.failed
    };
    let final_name = report::final_name(dest, started_at, &file.name);
    files
        .publish(&file.path, dest, &final_name)
        .with_context(|| format!("cannot move {} to {}", file.name, dest.display()))?;
    telemetry::batch_finished(&report, file_bytes, clock.elapsed());
    Ok(report)
}

/// Whether a batch with this content was already applied, fully or partly.
async fn is_applied(tx: &Transaction<'_>, sha256: &str) -> Result<bool, DbError> {
    let sql = "SELECT 1 FROM batches WHERE sha256 = $1 \
               AND status IN ('applied', 'partially_applied') LIMIT 1";
    let row = tx
        .query_opt(sql, &[&sha256])
        .await
        .map_err(DbError::query("cannot read the ledger"))?;
    Ok(row.is_some())
}

/// Writes the batch's row of the `batches` ledger.
async fn record(
    client: &impl tokio_postgres::GenericClient,
    report: &Report,
) -> Result<(), DbError> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let sql = "INSERT INTO batches (id, file_name, sha256, format, status, rows_total, \
               rows_applied, rows_unchanged, rows_failed, started_at, finished_at) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
    client
        .execute(
            sql,
            &[
                &report.batch_id,
                &report.file,
                &report.sha256,
                &report.format,
                &report.status.as_str(),
                &count(report.rows_total),
                &count(report.rows_applied),
                &count(report.rows_unchanged),
                &count(report.rows_failed),
                &report.started_at,
                &report.finished_at,
            ],
        )
        .await
        .map_err(DbError::query("cannot record the batch in the ledger"))?;
    Ok(())
}

/// Streams the rows of `file` from a reader thread and applies them one after another.
/// Gives the tally and, for CSV, the header's span.
async fn apply_rows(
    config: &Config,
    tx: &mut Transaction<'_>,
    file: &BatchFile,
    is_dry_run: bool,
    sink: &mut Sink<'_>,
) -> anyhow::Result<(Tally, Option<Span>)> {
    let definitions = Arc::new(apply::load_custom_fields(&*tx).await?);
    let applier = Applier::new(tx, is_dry_run).await?;

    let (sender, mut receiver) = mpsc::channel::<Result<Row, RowError>>(256);
    let path = file.path.clone();
    let kind = file.kind;
    let options = config.read_options();
    let reader = tokio::task::spawn_blocking(move || {
        let input = match row::open(&path, kind, options.max_file_bytes) {
            Ok(input) => input,
            Err(error) => {
                let _ = sender.blocking_send(Err(row::file_fault(&error)));
                return None;
            }
        };
        let rows = match Rows::new(input, kind.format, &options, &definitions) {
            Ok(rows) => rows,
            Err(error) => {
                let _ = sender.blocking_send(Err(error));
                return None;
            }
        };
        let header_span = rows.header_span();
        for row in rows {
            if sender.blocking_send(row).is_err() {
                break;
            }
        }
        header_span
    });

    let mut tally = Tally::default();
    while let Some(item) = receiver.recv().await {
        let row = match item {
            Ok(row) => row,
            Err(fault) => {
                sink.error(&fault)
                    .context("cannot write the errors report")?;
                tally.count_errors(std::slice::from_ref(&fault));
                tally.file_fault = Some(fault);
                break;
            }
        };
        tally.rows_total += 1;
        let outcome = match &row.update {
            Ok(update) => applier.apply(tx, update).await?,
            Err(errors) => RowOutcome::Failed(errors.clone()),
        };
        match outcome {
            RowOutcome::Applied(result) => {
                tally.rows_applied += 1;
                if let Some(result) = result {
                    sink.result(row.line, result)
                        .context("cannot write the results report")?;
                }
            }
            RowOutcome::Unchanged(result) => {
                tally.rows_unchanged += 1;
                if let Some(result) = result {
                    sink.result(row.line, result)
                        .context("cannot write the results report")?;
                }
            }
            RowOutcome::Failed(errors) => {
                tally.rows_failed += 1;
                tally.failed_spans.push(row.span);
                tally.count_errors(&errors);
                for error in &errors {
                    sink.error(error)
                        .context("cannot write the errors report")?;
                }
            }
        }
    }
    drop(receiver);
    let header_span = reader.await.expect("the reader thread does not panic");
    Ok((tally, header_span))
}
