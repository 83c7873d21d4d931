//! Every metric name and every event of tokensync, in one place.
//!
//! Domain code says what happened (a batch finished, a scan found files); this module logs
//! it once and updates the metrics. Logs never hold a pass code, an authentication code or a
//! card number: row details go to the reports, not here.

use crate::report::{Report, Status};
use indicatif::{ProgressBar, ProgressStyle};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Batches processed, by `status`.
pub const BATCHES_TOTAL: &str = "tokensync_batches_total";
/// Rows processed, by `outcome` (`applied`, `unchanged`, `failed`).
pub const ROWS_TOTAL: &str = "tokensync_rows_total";
/// Row and file errors, by `code`.
pub const ROW_ERRORS_TOTAL: &str = "tokensync_row_errors_total";
/// Time from taking a file to its report, in seconds.
pub const BATCH_DURATION_SECONDS: &str = "tokensync_batch_duration_seconds";
/// Ready files waiting in `paths.incoming` at the last scan.
pub const INCOMING_FILES: &str = "tokensync_incoming_files";
/// When a batch last ended applied, partially applied or duplicate (Unix seconds).
pub const LAST_SUCCESS_TIMESTAMP_SECONDS: &str = "tokensync_last_success_timestamp_seconds";
/// 1 when the database answers, else 0.
pub const DATABASE_UP: &str = "tokensync_database_up";
/// Rows per batch.
pub const BATCH_ROWS: &str = "tokensync_batch_rows";
/// Size of each batch file as stored, in bytes.
pub const BATCH_FILE_BYTES: &str = "tokensync_batch_file_bytes";
/// Scans of `paths.incoming`.
pub const SCANS_TOTAL: &str = "tokensync_scans_total";
/// Failures that stopped a batch or a scan before its end, by `kind`.
pub const FAILURES_TOTAL: &str = "tokensync_failures_total";

/// Gives every metric its help text (promtool wants one on each).
pub fn describe_metrics() {
    describe_counter!(BATCHES_TOTAL, "Batches processed, by final status.");
    describe_counter!(ROWS_TOTAL, "Rows processed, by outcome.");
    describe_counter!(
        ROW_ERRORS_TOTAL,
        "Row and file errors reported, by error code."
    );
    describe_histogram!(
        BATCH_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to process one batch file."
    );
    describe_gauge!(
        INCOMING_FILES,
        "Ready batch files waiting in the incoming folder."
    );
    describe_gauge!(
        LAST_SUCCESS_TIMESTAMP_SECONDS,
        metrics::Unit::Seconds,
        "Unix time of the last batch applied, partially applied or recognised as duplicate."
    );
    describe_gauge!(DATABASE_UP, "Whether the database answers (1) or not (0).");
    describe_histogram!(BATCH_ROWS, "Rows in each batch file.");
    describe_histogram!(
        BATCH_FILE_BYTES,
        metrics::Unit::Bytes,
        "Size of each batch file."
    );
    describe_counter!(SCANS_TOTAL, "Scans of the incoming folder.");
    describe_counter!(
        FAILURES_TOTAL,
        "Batches or scans cut short by a failure, by kind."
    );
}

/// The histogram buckets of [`BATCH_DURATION_SECONDS`].
pub const DURATION_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// Levels when `RUST_LOG` is not set. deadpool's pool logs a warning for every broken
/// connection; during an outage that is once per retry, so only its errors show.
const DEFAULT_LOG_FILTER: &str = "warn,tokensync=info,deadpool.postgres=error";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sends log events to standard error, as text or JSON. `RUST_LOG` overrides the default
/// level (INFO for tokensync, WARN for the libraries it uses), but tokio-postgres never
/// logs below WARN.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER))
        // Below INFO, tokio-postgres logs statement parameters (authentication codes and
        // card numbers), and at INFO every server NOTICE: no RUST_LOG brings them out.
        .add_directive("tokio_postgres=warn".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A batch has ended, whatever its status.
pub fn batch_finished(report: &Report, file_bytes: u64, duration: Duration) {
    tracing::info!(
        file = %report.file,
        batch_id = %report.batch_id,
        status = report.status.as_str(),
        rows = report.rows_total,
        applied = report.rows_applied,
        unchanged = report.rows_unchanged,
        failed = report.rows_failed,
        duration_ms = duration.as_millis() as u64,
        "Batch finished."
    );
    counter!(BATCHES_TOTAL, "status" => report.status.as_str()).increment(1);
    counter!(ROWS_TOTAL, "outcome" => "applied").increment(report.rows_applied);
    counter!(ROWS_TOTAL, "outcome" => "unchanged").increment(report.rows_unchanged);
    counter!(ROWS_TOTAL, "outcome" => "failed").increment(report.rows_failed);
    for (code, count) in &report.errors_by_code {
        counter!(ROW_ERRORS_TOTAL, "code" => code.as_str()).increment(*count);
    }
    histogram!(BATCH_DURATION_SECONDS).record(duration.as_secs_f64());
    histogram!(BATCH_ROWS).record(report.rows_total as f64);
    histogram!(BATCH_FILE_BYTES).record(file_bytes as f64);
    if report.status != Status::Rejected {
        let now = chrono::Utc::now();
        gauge!(LAST_SUCCESS_TIMESTAMP_SECONDS).set(now.timestamp_millis() as f64 / 1000.0);
    }
}

/// A batch was cut short (the database went away, a report could not be written); its file
/// stays in `paths.incoming` for the next scan.
pub fn batch_interrupted(file: &str, error: &anyhow::Error, is_database_down: bool) {
    let error = format!("{error:#}");
    if is_database_down {
        // The outage itself is logged once, by `database_up`; a retry says nothing new.
        tracing::debug!(
            file,
            error,
            "Batch interrupted by the database; the file waits."
        );
    } else {
        tracing::warn!(
            file,
            error,
            "Batch interrupted; the file stays for a retry."
        );
    }
    counter!(FAILURES_TOTAL, "kind" => "batch").increment(1);
}

/// A file is being applied by another instance (or by a session of a process that just
/// died, until PostgreSQL notices); this scan leaves it alone.
pub fn file_claimed_elsewhere(file: &str) {
    tracing::info!(file, "File held by another instance; left to it.");
}

/// A file whose name would make it a batch file, but is not UTF-8: it cannot be recorded
/// or reported by name, so it is left where it is, at every scan, until it is renamed.
pub fn file_name_not_utf8(file: &str) {
    tracing::warn!(
        file,
        "File name is not UTF-8; the file is left alone until renamed."
    );
}

/// A scan of `paths.incoming` found `ready` files.
pub fn scan_finished(ready: usize) {
    tracing::debug!(ready, "Scan finished.");
    counter!(SCANS_TOTAL).increment(1);
    gauge!(INCOMING_FILES).set(ready as f64);
}

/// Whether the database answers. Logged when it changes, not on every check. Gives true
/// when the database answers again after being down.
pub fn database_up(is_up: bool, error: Option<&dyn std::fmt::Display>) -> bool {
    static LAST: std::sync::Mutex<Option<bool>> = std::sync::Mutex::new(None);
    gauge!(DATABASE_UP).set(if is_up { 1.0 } else { 0.0 });
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *last == Some(is_up) {
        return false;
    }
    let was_seen = last.is_some();
    *last = Some(is_up);
    drop(last);
    match (is_up, error) {
        (true, _) if was_seen => tracing::info!("The database answers again."),
        (true, _) => {}
        (false, Some(error)) => {
            tracing::error!(error = %error, "The database is unreachable; files wait in incoming.");
        }
        (false, None) => tracing::error!("The database is unreachable; files wait in incoming."),
    }
    is_up && was_seen
}

/// Installs the process-wide Prometheus recorder, with buckets for the histograms, and
/// registers every labelled series at zero so dashboards see them before the first batch.
///
/// # Panics
/// If a recorder is already installed.
pub fn install_recorder() -> PrometheusHandle {
    let row_buckets = [0.0, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];
    let byte_buckets = [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(BATCH_DURATION_SECONDS.into()),
            &DURATION_BUCKETS,
        )
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), &row_buckets))
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(BATCH_FILE_BYTES.into()), &byte_buckets)
        })
        .expect("the buckets are not empty")
        .install_recorder()
        .expect("the recorder is installed once");
    describe_metrics();
    for status in ["applied", "partially_applied", "rejected", "duplicate"] {
        counter!(BATCHES_TOTAL, "status" => status).absolute(0);
    }
    for outcome in ["applied", "unchanged", "failed"] {
        counter!(ROWS_TOTAL, "outcome" => outcome).absolute(0);
    }
    counter!(SCANS_TOTAL).absolute(0);
    gauge!(INCOMING_FILES).set(0.0);
    handle
}

/// Writes the metrics to `path` for node_exporter's textfile collector: to a temporary file
/// beside it first, then renamed, so the collector never reads half a file.
///
/// # Errors
/// When the file cannot be written.
pub fn write_textfile(handle: &PrometheusHandle, path: &Path) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(handle.render().as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

/// A progress bar for one file of `--run-now` on a terminal: bytes read and rows per second.
/// `None` when standard error is not a terminal.
pub fn progress_bar(file: &str, bytes: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match bytes {
        Some(bytes) => ProgressBar::new(bytes),
        None => ProgressBar::no_length(),
    };
    let template = "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {per_sec}";
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(file.to_owned());
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::collections::BTreeMap;

    /// promtool refuses metrics without help text; every series tokensync writes has one.
    #[test]
    fn every_metric_has_help_text() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_metrics();
            let time = chrono::Utc::now();
            let report = Report {
                batch_id: uuid::Uuid::nil(),
                file: "t.csv".into(),
                sha256: String::new(),
                format: "csv".into(),
                status: Status::Applied,
                rows_total: 1,
                rows_applied: 1,
                rows_unchanged: 0,
                rows_failed: 0,
                errors_by_code: BTreeMap::from([(ErrorCode::InvalidValue, 1)]),
                started_at: time,
                finished_at: time,
            };
            batch_finished(&report, 10, Duration::from_millis(5));
            scan_finished(2);
            database_up(true, None);
            counter!(FAILURES_TOTAL, "kind" => "batch").increment(1);
        });
        let text = handle.render();
        let names: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| line.split(['{', ' ']).next().unwrap())
            .collect();
        assert!(names.len() >= 11, "{text}");
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# HELP {base} ")),
                "no help for {name} in\n{text}"
            );
        }
    }
}
