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
use crate::bulk::{BulkApplier, Chunk};
use crate::claim::{self, Claim, Judgement, RecordedBatch};
use crate::config::{ApplyMethod, Config, OnRowError};
use crate::db::DbError;
use crate::error::{ErrorCode, RowError};
use crate::feed::{self, Feed, Parcel};
use crate::incoming::{BatchFile, sha256_of};
use crate::report::{self, Report, ReportFiles, Status};
use crate::row::{Row, Span};
use crate::shutdown::Shutdown;
use crate::sightings::Sightings;
use crate::telemetry;
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use deadpool_postgres::Client;
use deadpool_postgres::Pool;
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio_postgres::GenericClient;
use tokio_postgres::Transaction;
use uuid::Uuid;

/// The folder inside `paths.incoming` where batches keep their work files.
pub const WORK_DIR: &str = ".tokensync";

/// Whether a batch runs for real, or as the dry run of `validate` that hands every error to
/// its callback and writes nothing.
pub enum Mode<'a> {
    /// Apply, with a progress bar on a terminal when asked.
    Apply {
        show_progress: bool,
    },
    Validate(&'a mut (dyn FnMut(&RowError) + Send)),
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
    /// How far into the (decompressed) file the rows counted so far reach.
    bytes_read: u64,
}

/// The way rows reach the table: one by one, or in chunks (see [`crate::bulk`]).
enum Engine {
    RowByRow(Applier),
    SetBased {
        applier: BulkApplier,
        chunk_rows: usize,
    },
}

impl Engine {
    async fn new(
        config: &Config,
        tx: &Transaction<'_>,
        is_dry_run: bool,
        sightings: Option<Sightings>,
    ) -> Result<Engine, DbError> {
        Ok(match config.apply.method {
            ApplyMethod::RowByRow => Engine::RowByRow(Applier::new(tx, is_dry_run).await?),
            ApplyMethod::SetBased => Engine::SetBased {
                applier: BulkApplier::new(tx, is_dry_run, sightings).await?,
                chunk_rows: config.apply.chunk_rows,
            },
        })
    }

    /// How many rows a chunk holds.
    fn chunk_rows(&self) -> usize {
        match self {
            Engine::RowByRow(_) => 1,
            Engine::SetBased { chunk_rows, .. } => *chunk_rows,
        }
    }

    /// Whether the reader thread prepares each chunk for the set-based path.
    fn is_set_based(&self) -> bool {
        matches!(self, Engine::SetBased { .. })
    }

    /// The outcome of each row of the chunk, in order; rows that failed to parse keep their
    /// errors.
    async fn apply(
        &self,
        tx: &mut Transaction<'_>,
        chunk: &Chunk,
    ) -> Result<Vec<RowOutcome>, DbError> {
        let applied = match self {
            Engine::RowByRow(applier) => {
                let updates = chunk.updates();
                let mut outcomes = Vec::with_capacity(updates.len());
                for update in updates {
                    outcomes.push(applier.apply(tx, update).await?);
                }
                outcomes
            }
            Engine::SetBased { applier, .. } => applier.apply_chunk(tx, chunk).await?,
        };
        let mut applied = applied.into_iter();
        let outcomes = chunk
            .rows
            .iter()
            .map(|row| match &row.update {
                Ok(_) => applied.next().expect("one outcome per valid row"),
                Err(errors) => RowOutcome::Failed(errors.clone()),
            })
            .collect();
        Ok(outcomes)
    }
}

impl Tally {
    fn count_errors(&mut self, errors: &[RowError]) {
        for error in errors {
            *self.errors_by_code.entry(error.code).or_default() += 1;
        }
    }

    /// Counts one row's outcome and writes its errors or result.
    fn record(&mut self, sink: &mut Sink<'_>, row: Row, outcome: RowOutcome) -> anyhow::Result<()> {
        self.rows_total += 1;
        self.bytes_read = row.span.end;
        let result = match outcome {
            RowOutcome::Applied(result) => {
                self.rows_applied += 1;
                result
            }
            RowOutcome::Unchanged(result) => {
                self.rows_unchanged += 1;
                result
            }
            RowOutcome::Failed(errors) => {
                self.rows_failed += 1;
                self.failed_spans.push(row.span);
                self.count_errors(&errors);
                for error in &errors {
                    sink.error(error)
                        .context("cannot write the errors report")?;
                }
                None
            }
        };
        if let Some(result) = result {
            sink.result(row.line, result)
                .context("cannot write the results report")?;
        }
        Ok(())
    }

    /// Puts the tally into the report, with the status it amounts to.
    fn fill(self, report: &mut Report, config: &Config) {
        report.status = self.status(config.apply.on_row_error, config.apply.max_failed_rows);
        report.rows_total = self.rows_total;
        report.rows_failed = self.rows_failed;
        report.errors_by_code = self.errors_by_code;
        if report.status != Status::Rejected {
            report.rows_applied = self.rows_applied;
            report.rows_unchanged = self.rows_unchanged;
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
    Files(&'a mut ReportFiles),
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

/// A batch stopped at a row boundary because the stop deadline passed; it was rolled back.
#[derive(Debug, thiserror::Error)]
#[error("stopped before the batch could finish; it was rolled back")]
pub struct Interrupted;

/// Processes one batch file. With [`Mode::Apply`] the file is claimed (see
/// [`crate::claim`]) and ends in `paths.archive` or `paths.failed` beside its reports; it
/// gives `None` when another instance holds the file or has just finished it. With
/// [`Mode::Validate`] nothing is written anywhere.
///
/// # Errors
/// When the batch could not be carried to its end (the database went away, a file could not
/// be read or moved, the stop deadline passed). Unless it was committed, the transaction is
/// rolled back and the file stays where it was.
pub async fn process(
    config: &Config,
    pool: &Pool,
    file: &BatchFile,
    mode: Mode<'_>,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<Report>> {
    let mut client = pool.get().await.map_err(DbError::from)?;
    if let Mode::Validate(on_error) = mode {
        return validate(config, &mut client, file, on_error)
            .await
            .map(Some);
    }
    let Mode::Apply { show_progress } = mode else {
        unreachable!("a dry run returned")
    };
    let Some(claim) = Claim::try_take(&client, &file.name).await? else {
        tracing::debug!(file = %file.name, "File claimed by another instance.");
        return Ok(None);
    };
    let result = if file.path.is_file() {
        apply_claimed(config, &mut client, file, shutdown, show_progress)
            .await
            .map(Some)
    } else {
        Ok(None)
    };
    claim.release(&client).await;
    result
}

/// A new report for `file`, with no rows yet.
fn new_report(file: &BatchFile, sha256: String, started_at: DateTime<Utc>) -> Report {
    Report {
        batch_id: Uuid::new_v4(),
        file: file.name.clone(),
        sha256,
        format: file.kind.format.as_str().to_owned(),
        status: Status::Duplicate,
        rows_total: 0,
        rows_applied: 0,
        rows_unchanged: 0,
        rows_failed: 0,
        errors_by_code: BTreeMap::new(),
        started_at,
        finished_at: started_at,
    }
}

/// The dry run of `validate`: every row checked and applied in a transaction that is
/// rolled back.
async fn validate(
    config: &Config,
    client: &mut Client,
    file: &BatchFile,
    on_error: &mut (dyn FnMut(&RowError) + Send),
) -> anyhow::Result<Report> {
    let started_at = Utc::now();
    let sha256 = sha256_of(&file.path)
        .await
        .with_context(|| format!("cannot read {}", file.path.display()))?;
    let mut report = new_report(file, sha256, started_at);
    let mut tx = client
        .transaction()
        .await
        .map_err(DbError::query("cannot begin a dry run"))?;
    // A dry run finishes nothing: a recorded batch's file waits for the next real scan.
    let never = |_: &RecordedBatch| false;
    if claim::judge(&*tx, &report.sha256, &file.name, never).await? == Judgement::New {
        let mut sink = Sink::Errors(on_error);
        let (tally, _) = apply_rows(
            config,
            &mut tx,
            file,
            true,
            &mut sink,
            &Shutdown::new(),
            None,
        )
        .await?;
        tally.fill(&mut report, config);
    }
    report.finished_at = Utc::now();
    tx.rollback()
        .await
        .map_err(DbError::query("cannot end the dry run"))?;
    Ok(report)
}

/// Applies a claimed file: judges it by the ledger, applies its rows, writes its reports,
/// commits and moves everything in the order [`crate::claim`] explains.
async fn apply_claimed(
    config: &Config,
    client: &mut Client,
    file: &BatchFile,
    shutdown: &Shutdown,
    show_progress: bool,
) -> anyhow::Result<Report> {
    let clock = Instant::now();
    let started_at = Utc::now();
    let read_error = || format!("cannot read {}", file.path.display());
    let file_bytes = std::fs::metadata(&file.path)
        .with_context(read_error)?
        .len();
    let sha256 = sha256_of(&file.path).await.with_context(read_error)?;
    let work_dir = config.paths.incoming.join(WORK_DIR).join(&file.name);
    let mut report = new_report(file, sha256, started_at);

    let mut tx = client
        .transaction()
        .await
        .map_err(DbError::query("cannot begin a batch"))?;
    claim::lock_content(&*tx, &report.sha256).await?;
    let unmoved = |batch: &RecordedBatch| is_unmoved(config, &work_dir, batch);
    let judgement = claim::judge(&*tx, &report.sha256, &file.name, unmoved).await?;
    if let Judgement::Unfinished(batch) = judgement {
        tx.rollback()
            .await
            .map_err(DbError::query("cannot end a batch"))?;
        return finish_unfinished(config, file, &work_dir, &batch, file_bytes, clock).await;
    }

    // What is left in the work folder comes from an attempt that never committed.
    remove_work_dir(&work_dir);
    let mut files = ReportFiles::create(work_dir.clone(), file.kind)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    let mut header_span = None;
    let mut failed_spans = Vec::new();
    if judgement == Judgement::New {
        let mut sink = Sink::Files(&mut files);
        let known_size = (!file.kind.is_gzip).then_some(file_bytes);
        let progress = show_progress.then(|| telemetry::progress_bar(&file.name, known_size));
        let progress = progress.flatten();
        let applied = apply_rows(
            config,
            &mut tx,
            file,
            false,
            &mut sink,
            shutdown,
            progress.as_ref(),
        )
        .await;
        if let Some(bar) = progress {
            bar.finish_and_clear();
        }
        let (mut tally, span) = applied.inspect_err(|_| remove_work_dir(&work_dir))?;
        header_span = span;
        failed_spans = std::mem::take(&mut tally.failed_spans);
        tally.fill(&mut report, config);
    }
    report.finished_at = Utc::now();

    let dest = destination(config, report.status);
    let archive_name = report::final_name(dest, started_at, &file.name);
    let written = write_reports(
        config,
        file,
        &mut files,
        &report,
        header_span,
        &failed_spans,
    );
    written.inspect_err(|_| remove_work_dir(&work_dir))?;

    if matches!(report.status, Status::Applied | Status::PartiallyApplied) {
        let committed = async {
            record(&*tx, &report, &archive_name).await?;
            tx.commit()
                .await
                .map_err(DbError::query("cannot commit the batch"))
        };
        committed
            .await
            .inspect_err(|_| remove_work_dir(&work_dir))?;
    } else {
        tx.rollback()
            .await
            .map_err(DbError::query("cannot roll back the batch"))?;
        record(&***client, &report, &archive_name).await?;
    }

    files
        .publish(&file.path, dest, &archive_name)
        .with_context(|| format!("cannot move {} to {}", file.name, dest.display()))?;
    telemetry::batch_finished(&report, file_bytes, clock.elapsed());
    Ok(report)
}

/// Writes the rejected rows and `.report.json`, and flushes every report file.
fn write_reports(
    config: &Config,
    file: &BatchFile,
    files: &mut ReportFiles,
    report: &Report,
    header_span: Option<Span>,
    failed_spans: &[Span],
) -> anyhow::Result<()> {
    if report.status == Status::Rejected {
        files
            .discard_results()
            .context("cannot remove the results of a rejected batch")?;
    }
    let max_file_bytes = config.apply.max_file_bytes;
    files
        .write_rejects(
            &file.path,
            file.kind,
            max_file_bytes,
            header_span,
            failed_spans,
        )
        .with_context(|| format!("cannot write the rejected rows of {}", file.name))?;
    files
        .finish(report)
        .with_context(|| format!("cannot write the report of {}", file.name))
}

/// Where the file of a batch with this status goes.
fn destination(config: &Config, status: Status) -> &Path {
    match status.is_archived() {
        true => &config.paths.archive,
        false => &config.paths.failed,
    }
}

/// Whether the file of a recorded batch is still to be moved: it is not at its archive
/// name, and its report is in the work folder (written before the record) or already
/// beside that name (moved first).
fn is_unmoved(config: &Config, work_dir: &Path, batch: &RecordedBatch) -> bool {
    let dest = destination(config, batch.status);
    let published = dest.join(format!("{}.{}", batch.archive_name, report::REPORT));
    !dest.join(&batch.archive_name).exists()
        && (work_dir.join(report::REPORT).exists() || published.exists())
}

/// Finishes a batch recorded before the process stopped: moves its reports (still in the
/// work folder) and its file to where its status sends them.
async fn finish_unfinished(
    config: &Config,
    file: &BatchFile,
    work_dir: &Path,
    batch: &RecordedBatch,
    file_bytes: u64,
    clock: Instant,
) -> anyhow::Result<Report> {
    let dest = destination(config, batch.status);
    let in_work_dir = work_dir.join(report::REPORT);
    let published = dest.join(format!("{}.{}", batch.archive_name, report::REPORT));
    let report_path = if in_work_dir.exists() {
        in_work_dir
    } else {
        published
    };
    let report: Report = std::fs::read(&report_path)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| Ok(serde_json::from_slice(&bytes)?))
        .with_context(|| format!("cannot read {}", report_path.display()))?;

    let files = ReportFiles::existing(work_dir.to_owned(), file.kind);
    files
        .publish(&file.path, dest, &batch.archive_name)
        .with_context(|| format!("cannot move {} to {}", file.name, dest.display()))?;
    tracing::info!(
        file = %file.name,
        batch_id = %batch.id,
        status = batch.status.as_str(),
        "Batch recorded before a stop; its file is now moved."
    );
    telemetry::batch_finished(&report, file_bytes, clock.elapsed());
    Ok(report)
}

/// Removes a work folder and everything in it, and the shared work folder above it once
/// empty; a folder that is not there is fine.
fn remove_work_dir(dir: &Path) {
    if let Err(error) = std::fs::remove_dir_all(dir)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), %error, "Cannot remove a work folder.");
    }
    if let Some(parent) = dir.parent() {
        // Another batch may still use it: then it is not empty and stays.
        let _ = std::fs::remove_dir(parent);
    }
}

/// Writes the batch's row of the `batches` ledger.
async fn record(
    client: &impl GenericClient,
    report: &Report,
    archive_name: &str,
) -> Result<(), DbError> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let sql = "INSERT INTO batches (id, file_name, sha256, format, status, rows_total, \
               rows_applied, rows_unchanged, rows_failed, started_at, finished_at, archive_name) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";
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
                &archive_name,
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
    shutdown: &Shutdown,
    progress: Option<&ProgressBar>,
) -> anyhow::Result<(Tally, Option<Span>)> {
    let definitions = Arc::new(apply::load_custom_fields(&*tx).await?);
    let sightings = match (is_dry_run, config.apply.method) {
        (true, ApplyMethod::SetBased) => {
            feed::sightings(file, config.read_options(), Arc::clone(&definitions)).await
        }
        _ => None,
    };
    let engine = Engine::new(config, tx, is_dry_run, sightings).await?;

    let is_set_based = engine.is_set_based();
    let prepare = move |rows: Vec<Row>| match is_set_based {
        true => Chunk::prepared(rows, is_dry_run),
        false => Chunk::new(rows),
    };
    let options = config.read_options();
    let mut feed = Feed::start(file, options, definitions, engine.chunk_rows(), prepare);

    let mut tally = Tally::default();
    while let Some(parcel) = feed.next().await {
        let chunk = match parcel {
            Parcel::Chunk(chunk) => chunk,
            Parcel::Fault(fault) => {
                sink.error(&fault)
                    .context("cannot write the errors report")?;
                tally.count_errors(std::slice::from_ref(&fault));
                tally.file_fault = Some(fault);
                break;
            }
        };
        if shutdown.is_past_deadline() {
            return Err(Interrupted.into());
        }
        let outcomes = engine.apply(tx, &chunk).await?;
        for (row, outcome) in chunk.rows.into_iter().zip(outcomes) {
            tally.record(sink, row, outcome)?;
        }
        if let Some(bar) = progress {
            bar.set_position(tally.bytes_read);
        }
    }
    Ok((tally, feed.finish().await))
}
