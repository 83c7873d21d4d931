//! What a batch leaves behind (SPEC 4): `.report.json`, `.errors.jsonl`, `.results.jsonl`
//! and `.rejects.*`, written first into a work folder of the batch and then moved beside
//! the archived or failed file, reports before the file itself.

use crate::error::{ErrorCode, RowError};
use crate::row::{self, FileKind, Span};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Applied,
    PartiallyApplied,
    Rejected,
    Duplicate,
}

impl Status {
    /// The status as written in reports, the ledger and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::PartiallyApplied => "partially_applied",
            Status::Rejected => "rejected",
            Status::Duplicate => "duplicate",
        }
    }

    /// The status written as `text` (see [`Status::as_str`]).
    pub fn parse(text: &str) -> Option<Status> {
        [
            Status::Applied,
            Status::PartiallyApplied,
            Status::Rejected,
            Status::Duplicate,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }

    /// Whether the batch's file goes to `paths.archive` (else to `paths.failed`).
    pub fn is_archived(self) -> bool {
        !matches!(self, Status::Rejected)
    }
}

/// `.report.json`: the summary of one batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub batch_id: Uuid,
    pub file: String,
    pub sha256: String,
    pub format: String,
    pub status: Status,
    pub rows_total: u64,
    pub rows_applied: u64,
    pub rows_unchanged: u64,
    pub rows_failed: u64,
    pub errors_by_code: BTreeMap<ErrorCode, u64>,
    #[serde(serialize_with = "millis")]
    pub started_at: DateTime<Utc>,
    #[serde(serialize_with = "millis")]
    pub finished_at: DateTime<Utc>,
}

fn millis<S: serde::Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// The report files of one batch while it runs, in its work folder.
pub struct ReportFiles {
    dir: PathBuf,
    errors: Option<BufWriter<File>>,
    results: Option<BufWriter<File>>,
    rejects_suffix: &'static str,
}

/// The suffix of the summary report.
pub const REPORT: &str = "report.json";
const ERRORS: &str = "errors.jsonl";
const RESULTS: &str = "results.jsonl";

impl ReportFiles {
    /// Starts the report files of a batch in the work folder `dir` (created if needed).
    ///
    /// # Errors
    /// When the folder cannot be created.
    pub fn create(dir: PathBuf, kind: FileKind) -> io::Result<ReportFiles> {
        create_work_dir(&dir)?;
        let rejects_suffix = match kind.format {
            row::Format::Csv => "rejects.csv",
            row::Format::JsonLines => "rejects.jsonl",
        };
        Ok(ReportFiles {
            dir,
            errors: None,
            results: None,
            rejects_suffix,
        })
    }

    /// The report files a stopped process left in `dir`, to be published.
    pub fn existing(dir: PathBuf, kind: FileKind) -> ReportFiles {
        let mut files = ReportFiles {
            dir,
            errors: None,
            results: None,
            rejects_suffix: "",
        };
        files.rejects_suffix = rejects_suffix(kind);
        files
    }

    /// Appends an error to `.errors.jsonl`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_error(&mut self, error: &RowError) -> io::Result<()> {
        let writer = open_lazily(&mut self.errors, &self.dir.join(ERRORS), 0o644)?;
        serde_json::to_writer(&mut *writer, error)?;
        writer.write_all(b"\n")
    }

    /// Appends a row's result to `.results.jsonl`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_result(&mut self, line: u64, access_token: Value) -> io::Result<()> {
        // Results hold authentication codes and card numbers: readable by the owner only.
        let writer = open_lazily(&mut self.results, &self.dir.join(RESULTS), 0o600)?;
        let entry = serde_json::json!({ "line": line, "access_token": access_token });
        serde_json::to_writer(&mut *writer, &entry)?;
        writer.write_all(b"\n")
    }

    /// Drops the results: a rejected batch applied nothing.
    ///
    /// # Errors
    /// When the file cannot be removed.
    pub fn discard_results(&mut self) -> io::Result<()> {
        if self.results.take().is_some() {
            fs::remove_file(self.dir.join(RESULTS))?;
        }
        Ok(())
    }

    /// Writes `.rejects.*`: the failed rows copied from the file exactly as they were (for
    /// CSV, after the header), each ending with a line end.
    ///
    /// # Errors
    /// When the file cannot be read again or the rejects cannot be written.
    pub fn write_rejects(
        &self,
        source: &Path,
        kind: FileKind,
        max_file_bytes: u64,
        header: Option<Span>,
        spans: &[Span],
    ) -> io::Result<()> {
        if spans.is_empty() {
            return Ok(());
        }
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.dir.join(self.rejects_suffix))?;
        let mut out = BufWriter::new(out);
        let input = BufReader::with_capacity(64 * 1024, row::open(source, kind, max_file_bytes)?);
        let mut copier = SpanCopier { input, position: 0 };
        for span in header.iter().chain(spans) {
            copier.copy(*span, &mut out)?;
        }
        out.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()
    }

    /// Writes `.report.json` and flushes every report file to disk.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn finish(&mut self, report: &Report) -> io::Result<()> {
        for writer in [self.errors.take(), self.results.take()]
            .into_iter()
            .flatten()
        {
            writer
                .into_inner()
                .map_err(io::IntoInnerError::into_error)?
                .sync_all()?;
        }
        let mut file = File::create(self.dir.join(REPORT))?;
        serde_json::to_writer_pretty(&mut file, report)?;
        file.write_all(b"\n")?;
        file.sync_all()
    }

    /// Moves the report files, then `source`, into `dest` under `final_name` (plus each
    /// report's suffix), and removes the work folder.
    ///
    /// # Errors
    /// When a file cannot be moved.
    pub fn publish(self, source: &Path, dest: &Path, final_name: &str) -> io::Result<PathBuf> {
        for suffix in [ERRORS, RESULTS, self.rejects_suffix, REPORT] {
            let from = self.dir.join(suffix);
            if from.exists() {
                move_file(&from, &dest.join(format!("{final_name}.{suffix}")))?;
            }
        }
        let target = dest.join(final_name);
        move_file(source, &target)?;
        if let Err(error) = fs::remove_dir(&self.dir)
            && error.kind() != io::ErrorKind::NotFound
        {
            return Err(error);
        }
        if let Some(parent) = self.dir.parent() {
            // The shared work folder goes too once no batch uses it; another may still.
            let _ = fs::remove_dir(parent);
        }
        Ok(target)
    }
}

/// Creates a batch's work folder. The shared folder above it is removed by whichever batch
/// leaves it empty, possibly by another instance between our creating it and the batch's
/// own folder inside: then it is simply made again.
fn create_work_dir(dir: &Path) -> io::Result<()> {
    let mut attempts = 0;
    loop {
        match fs::create_dir_all(dir) {
            Err(error) if error.kind() == io::ErrorKind::NotFound && attempts < 10 => {
                attempts += 1;
            }
            result => return result,
        }
    }
}

fn rejects_suffix(kind: FileKind) -> &'static str {
    match kind.format {
        row::Format::Csv => "rejects.csv",
        row::Format::JsonLines => "rejects.jsonl",
    }
}

fn open_lazily<'w>(
    slot: &'w mut Option<BufWriter<File>>,
    path: &Path,
    mode: u32,
) -> io::Result<&'w mut BufWriter<File>> {
    if slot.is_none() {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        *slot = Some(BufWriter::new(file));
    }
    Ok(slot.as_mut().expect("just opened"))
}

/// Copies byte spans of a stream in order.
struct SpanCopier<R> {
    input: BufReader<R>,
    position: u64,
}

impl<R: Read> SpanCopier<R> {
    fn copy(&mut self, span: Span, out: &mut impl Write) -> io::Result<()> {
        let skip = span.start.saturating_sub(self.position);
        self.position += io::copy(&mut (&mut self.input).take(skip), &mut io::sink())?;
        let mut last = None;
        let mut remaining = span.end - span.start;
        while remaining > 0 {
            let chunk = self.input.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            let len = chunk
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            out.write_all(&chunk[..len])?;
            last = chunk[..len].last().copied();
            self.input.consume(len);
            self.position += len as u64;
            remaining -= len as u64;
        }
        if last == Some(b'\n') {
            return Ok(());
        }
        // A CSV record may stop at the CR of a CRLF; take its LF along, or end the line.
        if last == Some(b'\r') && self.input.fill_buf()?.first() == Some(&b'\n') {
            self.input.consume(1);
            self.position += 1;
        }
        out.write_all(b"\n")
    }
}

/// Renames `from` to `to`, copying across file systems when a rename cannot.
///
/// # Errors
/// When neither works, or `to` already exists.
pub fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    if to.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            to.display().to_string(),
        ));
    }
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(error) if error.raw_os_error() == Some(18) => {
            // EXDEV: another file system.
            fs::copy(from, to)?;
            File::open(to)?.sync_all()?;
            fs::remove_file(from)
        }
        Err(error) => Err(error),
    }
}

/// The name a processed file gets: `<UTC start as YYYYmmddTHHMMSSZ>-<original name>`. When
/// that name is taken in `dest` (the same file name twice in one second), a counter goes
/// between the time and the name.
pub fn final_name(dest: &Path, started_at: DateTime<Utc>, name: &str) -> String {
    let stamp = started_at.format("%Y%m%dT%H%M%SZ");
    let mut candidate = format!("{stamp}-{name}");
    let mut counter = 1;
    while dest.join(&candidate).exists() || dest.join(format!("{candidate}.{REPORT}")).exists() {
        counter += 1;
        candidate = format!("{stamp}-{counter}-{name}");
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_copied_with_their_line_ends() {
        let text = b"h1,h2\r\na,b\r\nc,d\r\ne,f";
        let mut copier = SpanCopier {
            input: BufReader::new(&text[..]),
            position: 0,
        };
        let mut out = Vec::new();
        copier.copy(Span { start: 0, end: 6 }, &mut out).unwrap();
        copier.copy(Span { start: 12, end: 16 }, &mut out).unwrap();
        copier.copy(Span { start: 17, end: 20 }, &mut out).unwrap();
        assert_eq!(out, b"h1,h2\r\nc,d\r\ne,f\n");
    }

    #[test]
    fn report_serialises_as_the_spec_shows() {
        let time = DateTime::parse_from_rfc3339("2026-12-03T02:00:00.123456Z")
            .unwrap()
            .to_utc();
        let report = Report {
            batch_id: Uuid::nil(),
            file: "t.csv".into(),
            sha256: "ab".into(),
            format: "csv".into(),
            status: Status::PartiallyApplied,
            rows_total: 3,
            rows_applied: 2,
            rows_unchanged: 0,
            rows_failed: 1,
            errors_by_code: BTreeMap::from([(ErrorCode::AccessTokenNotFound, 1)]),
            started_at: time,
            finished_at: time,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["status"], "partially_applied");
        assert_eq!(json["errors_by_code"]["ACCESS_TOKEN_NOT_FOUND"], 1);
        assert_eq!(json["started_at"], "2026-12-03T02:00:00.123Z");
    }
}
