//! Streaming readers for batch files: CSV and JSON Lines, plain or gzip.
//!
//! A reader yields one [`Row`] at a time with the line it starts on (SPEC 2.4) and its byte
//! span in the decompressed file, so that the rejected rows can be copied out later exactly
//! as they were. Nothing holds more than one row in memory. A file-level fault (a broken
//! gzip stream, a file over its size limit, a bad CSV header) ends the rows with an error.

use crate::error::{ErrorCode, RowError};
use crate::field::Field;
use crate::update::{CustomFieldDefinitions, KeyPart, RawValue, TokenUpdate, UpdateBuilder};
use flate2::read::MultiGzDecoder;
use serde_json::Value;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The format of a batch file, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

impl Format {
    /// The name used in reports: `csv` or `jsonl`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::JsonLines => "jsonl",
        }
    }
}

/// How a batch file is stored: its format and whether it is gzip-compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKind {
    pub format: Format,
    pub is_gzip: bool,
}

impl FileKind {
    /// The kind of a batch file named `name` (`.csv`, `.jsonl` or `.ndjson`, optionally
    /// followed by `.gz`); `None` for any other name.
    pub fn from_name(name: &str) -> Option<FileKind> {
        let (stem, is_gzip) = match name.strip_suffix(".gz") {
            Some(stem) => (stem, true),
            None => (name, false),
        };
        let format = if stem.ends_with(".csv") {
            Format::Csv
        } else if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") {
            Format::JsonLines
        } else {
            return None;
        };
        Some(FileKind { format, is_gzip })
    }
}

/// Limits and CSV settings for reading a batch file.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    pub delimiter: u8,
    pub null_marker: String,
    pub max_row_bytes: u64,
    pub max_file_bytes: u64,
}

/// A byte range of the decompressed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

/// One row of a batch file, parsed and checked as far as possible without the database.
#[derive(Debug)]
pub struct Row {
    pub line: u64,
    pub span: Span,
    pub update: Result<TokenUpdate, Vec<RowError>>,
}

/// Opens a batch file for reading: decompressed if needed, and cut off with a
/// `FILE_TOO_LARGE` fault past `max_file_bytes`.
///
/// # Errors
/// When the file cannot be opened.
pub fn open(path: &Path, kind: FileKind, max_file_bytes: u64) -> io::Result<Box<dyn Read + Send>> {
    let file = File::open(path)?;
    let decoded: Box<dyn Read + Send> = if kind.is_gzip {
        Box::new(MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    };
    Ok(Box::new(SizeLimit {
        inner: decoded,
        remaining: max_file_bytes,
    }))
}

/// Cuts a stream off with an error once more than the limit has been read.
struct SizeLimit<R> {
    inner: R,
    remaining: u64,
}

/// The error a [`SizeLimit`] gives, recognised by [`file_fault`].
#[derive(Debug, thiserror::Error)]
#[error("the file is larger than apply.max_file_bytes once decompressed")]
struct OverSizeLimit;

impl<R: Read> Read for SizeLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Read one byte past the limit, to tell a file of exactly the limit from a larger one.
        let room = usize::try_from(self.remaining.saturating_add(1)).unwrap_or(usize::MAX);
        let len = buf.len().min(room);
        let read = self.inner.read(&mut buf[..len])?;
        if read as u64 > self.remaining {
            return Err(io::Error::other(OverSizeLimit));
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}

/// The file-level error for an I/O error met while reading a batch file.
pub fn file_fault(error: &io::Error) -> RowError {
    let is_too_large = error
        .get_ref()
        .is_some_and(|inner| inner.is::<OverSizeLimit>());
    if is_too_large {
        RowError::file(ErrorCode::FileTooLarge, OverSizeLimit.to_string())
    } else {
        RowError::file(
            ErrorCode::CorruptFile,
            format!("cannot read the file: {error}"),
        )
    }
}

/// The rows of one batch file.
pub enum Rows<'d> {
    Csv(CsvRows<'d>),
    JsonLines(JsonRows<'d>),
}

impl<'d> Rows<'d> {
    /// Starts reading rows of `format` from `input` (for CSV, reads the header).
    ///
    /// # Errors
    /// A file-level error: `INVALID_HEADER`, or a fault of the stream.
    pub fn new(
        input: Box<dyn Read + Send>,
        format: Format,
        options: &ReadOptions,
        definitions: &'d CustomFieldDefinitions,
    ) -> Result<Rows<'d>, RowError> {
        match format {
            Format::Csv => CsvRows::new(input, options, definitions).map(Rows::Csv),
            Format::JsonLines => Ok(Rows::JsonLines(JsonRows::new(input, options, definitions))),
        }
    }

    fn is_done(&mut self) -> &mut bool {
        match self {
            Rows::Csv(rows) => &mut rows.is_done,
            Rows::JsonLines(rows) => &mut rows.is_done,
        }
    }

    /// The span of the CSV header, which a rejects file repeats.
    pub fn header_span(&self) -> Option<Span> {
        match self {
            Rows::Csv(rows) => Some(rows.header_span),
            Rows::JsonLines(_) => None,
        }
    }
}

impl Iterator for Rows<'_> {
    type Item = Result<Row, RowError>;

    /// The next row; after the end or a file fault, `None` for good.
    fn next(&mut self) -> Option<Self::Item> {
        if *self.is_done() {
            return None;
        }
        let next = match self {
            Rows::Csv(rows) => rows.next_row(),
            Rows::JsonLines(rows) => rows.next_row(),
        };
        let next = next.transpose();
        *self.is_done() = !matches!(next, Some(Ok(_)));
        next
    }
}

/// A column of a CSV header.
#[derive(Debug, Clone, PartialEq)]
enum Column {
    Key(KeyPart),
    Field(Field),
    CustomField(String),
    FieldsSet,
}

impl Column {
    fn parse(name: &str) -> Option<Column> {
        if let Some(part) = name.strip_prefix("access_token_identifier.") {
            return KeyPart::parse(part).map(Column::Key);
        }
        if let Some(custom) = name.strip_prefix("custom_field_set.") {
            return (!custom.is_empty()).then(|| Column::CustomField(custom.to_owned()));
        }
        if name == "fields_set" {
            return Some(Column::FieldsSet);
        }
        Field::parse(name).map(Column::Field)
    }
}

/// The bytes a CSV reader has taken from the file but that no row has claimed yet.
///
/// The csv crate reports where it *started* reading a record, which includes the line
/// ends it skipped before it (blank lines, the `\n` of a CRLF). The window lets a row see
/// those bytes, so that its line and span are where its first cell starts.
#[derive(Default)]
struct Window {
    /// The file offset of `bytes[0]`.
    base: u64,
    bytes: Vec<u8>,
}

/// Copies what the CSV reader reads into the shared [`Window`], and stops the reader with
/// [`RecordTooLarge`] once the bytes no row has claimed pass `limit`. The csv crate holds a
/// whole record in memory before it gives it out; this bounds that record, which could
/// otherwise run to the end of the file behind a quote left open.
struct Tap {
    inner: Box<dyn Read + Send>,
    window: Arc<Mutex<Window>>,
    limit: u64,
}

/// The error a [`Tap`] gives: the record being read is far larger than `max_row_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("the row is larger than apply.max_row_bytes")]
struct RecordTooLarge;

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        let mut window = lock(&self.window);
        window.bytes.extend_from_slice(&buf[..read]);
        if window.bytes.len() as u64 > self.limit {
            return Err(io::Error::other(RecordTooLarge));
        }
        Ok(read)
    }
}

/// Bytes a [`Tap`] lets the unclaimed part of its window hold beyond `max_row_bytes`: the
/// csv crate reads ahead in blocks of 8 KiB, and a record a little over the limit is
/// refused as a row, the file read on.
const TAP_SLACK: u64 = 64 * 1024;

fn is_record_too_large(error: &csv::Error) -> bool {
    match error.kind() {
        csv::ErrorKind::Io(error) => error
            .get_ref()
            .is_some_and(|inner| inner.is::<RecordTooLarge>()),
        _ => false,
    }
}

fn lock(window: &Mutex<Window>) -> MutexGuard<'_, Window> {
    window.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Rows of a CSV file (SPEC 2.3).
pub struct CsvRows<'d> {
    reader: csv::Reader<Tap>,
    window: Arc<Mutex<Window>>,
    columns: Vec<Column>,
    header_span: Span,
    null_marker: String,
    max_row_bytes: u64,
    definitions: &'d CustomFieldDefinitions,
    record: csv::ByteRecord,
    is_done: bool,
}

impl<'d> CsvRows<'d> {
    fn new(
        input: Box<dyn Read + Send>,
        options: &ReadOptions,
        definitions: &'d CustomFieldDefinitions,
    ) -> Result<CsvRows<'d>, RowError> {
        let window = Arc::new(Mutex::new(Window::default()));
        let tap = Tap {
            inner: input,
            window: Arc::clone(&window),
            limit: options.max_row_bytes.saturating_add(TAP_SLACK),
        };
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(options.delimiter)
            .from_reader(tap);
        let mut header = csv::ByteRecord::new();
        let has_header = reader.read_byte_record(&mut header).map_err(|error| {
            if is_record_too_large(&error) {
                let message = "the header is larger than apply.max_row_bytes";
                RowError::file(ErrorCode::InvalidHeader, message)
            } else {
                csv_fault(&error)
            }
        })?;
        if !has_header {
            return Err(RowError::file(
                ErrorCode::InvalidHeader,
                "the file has no header",
            ));
        }
        let end = reader.position().byte();
        let (_, header_start) = skip_line_ends(&mut lock(&window), 0, end);
        let header_span = Span {
            start: header_start,
            end,
        };
        let columns = parse_header(&header)?;
        Ok(CsvRows {
            reader,
            window,
            columns,
            header_span,
            null_marker: options.null_marker.clone(),
            max_row_bytes: options.max_row_bytes,
            definitions,
            record: csv::ByteRecord::new(),
            is_done: false,
        })
    }

    fn next_row(&mut self) -> Result<Option<Row>, RowError> {
        let start = self.reader.position().clone();
        let is_record = self
            .reader
            .read_byte_record(&mut self.record)
            .map_err(|error| match is_record_too_large(&error) {
                true => self.record_too_large(&start),
                false => csv_fault(&error),
            })?;
        if !is_record {
            return Ok(None);
        }
        let position = self
            .record
            .position()
            .expect("a record read from a reader has one");
        let end = self.reader.position().byte();
        let (skipped_lines, start) = skip_line_ends(&mut lock(&self.window), position.byte(), end);
        let line = position.line() + skipped_lines;
        let span = Span { start, end };
        let update = self.parse_record(line, span);
        Ok(Some(Row { line, span, update }))
    }

    /// The fault for a record the [`Tap`] stopped, which began at `start`: a row error of
    /// its line, which ends the file, since where such a record ends cannot be known
    /// without reading it all.
    fn record_too_large(&self, start: &csv::Position) -> RowError {
        // Nothing is read after this, so the window may be spent to count the blank lines
        // before the record, as for any row.
        let mut window = lock(&self.window);
        let end = window.base + window.bytes.len() as u64;
        let (skipped, _) = skip_line_ends(&mut window, start.byte(), end);
        let line = start.line() + skipped;
        let message = "the row is larger than apply.max_row_bytes, and the rest of the file \
                       cannot be read (is a quote left open?)";
        RowError::row(line, ErrorCode::RowTooLarge, message)
    }

    fn parse_record(&self, line: u64, span: Span) -> Result<TokenUpdate, Vec<RowError>> {
        if span.end - span.start > self.max_row_bytes {
            let message = "the row is larger than apply.max_row_bytes";
            return Err(vec![RowError::row(line, ErrorCode::RowTooLarge, message)]);
        }
        if self.record.len() != self.columns.len() {
            let message = format!(
                "expected {} cells as in the header, found {}",
                self.columns.len(),
                self.record.len()
            );
            return Err(vec![RowError::row(line, ErrorCode::MalformedRow, message)]);
        }

        let mut cells = Vec::with_capacity(self.columns.len());
        let mut errors = Vec::new();
        for (column, bytes) in self.columns.iter().zip(self.record.iter()) {
            match std::str::from_utf8(bytes) {
                Ok(cell) => cells.push((column, cell)),
                Err(_) => errors.push(RowError::field(
                    line,
                    &column_name(column),
                    ErrorCode::InvalidEncoding,
                    "the cell is not valid UTF-8",
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let mut builder = UpdateBuilder::new(line, self.definitions);
        for (column, cell) in cells {
            if cell.is_empty() {
                continue;
            }
            let value = if cell == self.null_marker {
                RawValue::Null
            } else {
                RawValue::Text(cell)
            };
            match column {
                Column::Key(part) => builder.set_key(*part, value),
                Column::Field(field) => builder.set_field(*field, value),
                Column::CustomField(name) => builder.set_custom_field(name, value),
                Column::FieldsSet => builder.set_fields_set(value),
            }
        }
        builder.finish()
    }
}

/// Finds where the record read from `start` to `end` really begins, past the line ends the
/// reader skipped, and forgets the window's bytes before `end`. Gives the number of lines
/// skipped and the record's first byte.
fn skip_line_ends(window: &mut Window, start: u64, end: u64) -> (u64, u64) {
    let from = usize::try_from(start.saturating_sub(window.base)).unwrap_or(usize::MAX);
    let to = usize::try_from(end - window.base)
        .unwrap_or(usize::MAX)
        .min(window.bytes.len());
    let mut lines = 0;
    let mut first = start;
    for &byte in window.bytes.get(from..to).unwrap_or_default() {
        match byte {
            b'\n' => lines += 1,
            b'\r' => {}
            _ => break,
        }
        first += 1;
    }
    window.bytes.drain(..to);
    window.base = end;
    (lines, first)
}

fn parse_header(header: &csv::ByteRecord) -> Result<Vec<Column>, RowError> {
    let mut columns: Vec<Column> = Vec::with_capacity(header.len());
    for bytes in header {
        let Ok(name) = std::str::from_utf8(bytes) else {
            return Err(RowError::file(
                ErrorCode::InvalidHeader,
                "the header is not valid UTF-8",
            ));
        };
        let Some(column) = Column::parse(name) else {
            let message = format!("unknown column {name:?}");
            return Err(RowError::file(ErrorCode::InvalidHeader, message));
        };
        if columns.contains(&column) {
            let message = format!("column {name:?} appears more than once");
            return Err(RowError::file(ErrorCode::InvalidHeader, message));
        }
        columns.push(column);
    }
    Ok(columns)
}

fn column_name(column: &Column) -> String {
    match column {
        Column::Key(part) => part.qualified_name().to_owned(),
        Column::Field(field) => field.name().to_owned(),
        Column::CustomField(name) => format!("custom_field_set.{name}"),
        Column::FieldsSet => "fields_set".to_owned(),
    }
}

fn csv_fault(error: &csv::Error) -> RowError {
    match error.kind() {
        csv::ErrorKind::Io(io_error) => file_fault(io_error),
        _ => RowError::file(
            ErrorCode::CorruptFile,
            format!("cannot read the file: {error}"),
        ),
    }
}

/// Rows of a JSON Lines file (SPEC 2.2).
pub struct JsonRows<'d> {
    input: BufReader<Box<dyn Read + Send>>,
    max_row_bytes: u64,
    definitions: &'d CustomFieldDefinitions,
    line: u64,
    offset: u64,
    buffer: Vec<u8>,
    is_done: bool,
}

impl<'d> JsonRows<'d> {
    fn new(
        input: Box<dyn Read + Send>,
        options: &ReadOptions,
        definitions: &'d CustomFieldDefinitions,
    ) -> JsonRows<'d> {
        JsonRows {
            input: BufReader::with_capacity(64 * 1024, input),
            max_row_bytes: options.max_row_bytes,
            definitions,
            line: 0,
            offset: 0,
            buffer: Vec::new(),
            is_done: false,
        }
    }

    fn next_row(&mut self) -> Result<Option<Row>, RowError> {
        loop {
            let start = self.offset;
            let Some(is_too_large) = self.read_line().map_err(|e| file_fault(&e))? else {
                return Ok(None);
            };
            self.line += 1;
            let line = self.line;
            let span = Span {
                start,
                end: self.offset,
            };
            if is_too_large {
                let message = "the row is larger than apply.max_row_bytes";
                let error = RowError::row(line, ErrorCode::RowTooLarge, message);
                return Ok(Some(Row {
                    line,
                    span,
                    update: Err(vec![error]),
                }));
            }

            let mut content = self.buffer.as_slice();
            if line == 1 {
                content = content.strip_prefix(b"\xef\xbb\xbf").unwrap_or(content);
            }
            if content.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let update = parse_json_row(line, content, self.definitions);
            return Ok(Some(Row { line, span, update }));
        }
    }

    /// Reads one line into the buffer without its line end. Gives `None` at the end of the
    /// file, else whether the line was longer than the row limit (then it is not kept).
    fn read_line(&mut self) -> io::Result<Option<bool>> {
        self.buffer.clear();
        let mut length = 0u64;
        let mut is_too_large = false;
        loop {
            let available = self.input.fill_buf()?;
            if available.is_empty() {
                return Ok((length > 0).then_some(is_too_large));
            }
            let (chunk, has_end) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            let consumed = chunk.len();
            length += consumed as u64;
            is_too_large |= length > self.max_row_bytes.saturating_add(2);
            if !is_too_large {
                self.buffer.extend_from_slice(chunk);
            }
            self.input.consume(consumed);
            self.offset += consumed as u64;
            if has_end {
                break;
            }
        }
        let trimmed = self.buffer.strip_suffix(b"\n").unwrap_or(&self.buffer);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        self.buffer.truncate(trimmed.len());
        is_too_large |= self.buffer.len() as u64 > self.max_row_bytes;
        Ok(Some(is_too_large))
    }
}

fn parse_json_row(
    line: u64,
    content: &[u8],
    definitions: &CustomFieldDefinitions,
) -> Result<TokenUpdate, Vec<RowError>> {
    let Ok(text) = std::str::from_utf8(content) else {
        let message = "the row is not valid UTF-8";
        return Err(vec![RowError::row(
            line,
            ErrorCode::InvalidEncoding,
            message,
        )]);
    };
    let object = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => {
            let message = "the row is not a JSON object";
            return Err(vec![RowError::row(line, ErrorCode::MalformedRow, message)]);
        }
        Err(error) => {
            // serde_json's own message is left out: it may quote part of the row.
            let message = format!("the row is not valid JSON (column {})", error.column());
            return Err(vec![RowError::row(line, ErrorCode::MalformedRow, message)]);
        }
    };

    let mut builder = UpdateBuilder::new(line, definitions);
    for (key, value) in &object {
        match key.as_str() {
            "access_token_identifier" => read_identifier(&mut builder, value),
            "custom_field_set" => read_custom_fields(&mut builder, value),
            "fields_set" => builder.set_fields_set(raw(value)),
            name => match Field::parse(name) {
                Some(field) => builder.set_field(field, raw(value)),
                None => builder.error(Some(name), ErrorCode::UnknownField, "unknown field"),
            },
        }
    }
    builder.finish()
}

fn raw(value: &Value) -> RawValue<'_> {
    match value {
        Value::Null => RawValue::Null,
        value => RawValue::Json(value),
    }
}

fn read_identifier(builder: &mut UpdateBuilder<'_>, value: &Value) {
    let object = match value {
        Value::Object(object) => object,
        Value::Null => return,
        _ => {
            let message = "expected an object";
            builder.error(
                Some("access_token_identifier"),
                ErrorCode::InvalidType,
                message,
            );
            return;
        }
    };
    for (key, value) in object {
        match KeyPart::parse(key) {
            Some(part) => builder.set_key(part, raw(value)),
            None => {
                let field = format!("access_token_identifier.{key}");
                builder.error(Some(&field), ErrorCode::UnknownField, "unknown field");
            }
        }
    }
}

fn read_custom_fields(builder: &mut UpdateBuilder<'_>, value: &Value) {
    let items = match value {
        Value::Array(items) => items,
        Value::Null => {
            builder.clear_custom_fields();
            return;
        }
        _ => {
            let message = "expected a list of one-key objects";
            builder.error(Some("custom_field_set"), ErrorCode::InvalidType, message);
            return;
        }
    };
    builder.custom_fields_given();
    for item in items {
        match item {
            Value::Object(object) if object.len() == 1 => {
                for (name, value) in object {
                    builder.set_custom_field(name, raw(value));
                }
            }
            _ => {
                let message = "each custom field is an object with exactly one key";
                builder.error(Some("custom_field_set"), ErrorCode::InvalidValue, message);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::{DataType, Patch};

    fn options() -> ReadOptions {
        ReadOptions {
            delimiter: b',',
            null_marker: "\\N".into(),
            max_row_bytes: 1024,
            max_file_bytes: 1 << 20,
        }
    }

    fn read(text: &str, format: Format) -> Result<Vec<Row>, RowError> {
        let mut definitions = CustomFieldDefinitions::new();
        definitions.insert("tier".into(), DataType::String);
        let input: Box<dyn Read + Send> = Box::new(io::Cursor::new(text.as_bytes().to_vec()));
        let rows = Rows::new(input, format, &options(), &definitions)?;
        rows.collect()
    }

    #[test]
    fn csv_record_far_past_max_row_bytes_ends_the_file_at_its_line() {
        let mut text = String::from("access_token_identifier.authentication_code,udf_string_1\n");
        text.push_str("AC1,gold\n\r\n\nAC2,\"open\n");
        text.push_str(&"AC3,x\n".repeat(20_000));
        let mut definitions = CustomFieldDefinitions::new();
        definitions.insert("tier".into(), DataType::String);
        let input: Box<dyn Read + Send> = Box::new(io::Cursor::new(text.into_bytes()));
        let mut rows = Rows::new(input, Format::Csv, &options(), &definitions).unwrap();
        assert_eq!(rows.next().unwrap().unwrap().line, 2);
        let fault = rows.next().unwrap().unwrap_err();
        assert_eq!(fault.line, Some(5), "{fault:?}");
        assert_eq!(fault.code, ErrorCode::RowTooLarge);
        assert!(rows.next().is_none());
    }

    #[test]
    fn csv_header_far_past_max_row_bytes_is_an_invalid_header() {
        let header = "x".repeat(100_000);
        let error = read(&header, Format::Csv).unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidHeader);
    }

    #[test]
    fn kinds_from_names() {
        let csv_gz = FileKind {
            format: Format::Csv,
            is_gzip: true,
        };
        assert_eq!(FileKind::from_name("a.csv.gz"), Some(csv_gz));
        assert_eq!(
            FileKind::from_name("a.ndjson").map(|k| k.format),
            Some(Format::JsonLines)
        );
        assert_eq!(FileKind::from_name("a.csv.tmp"), None);
        assert_eq!(FileKind::from_name("a.txt.gz"), None);
    }

    #[test]
    fn csv_lines_spans_and_states() {
        let text = "\u{feff}access_token_identifier.authentication_code,udf_string_1,udf_float_1\r\n\
                    AC1,\"a,\"\"b\"\"\nc\",\\N\r\nAC2,,1.5\r\n";
        let rows = read(text, Format::Csv).unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 4]);
        let first = rows[0].update.as_ref().unwrap();
        assert_eq!(first.udf_strings[0], Patch::Value("a,\"b\"\nc".into()));
        assert_eq!(first.udf_floats[0], Patch::Null);
        let second = rows[1].update.as_ref().unwrap();
        assert_eq!(second.udf_strings[0], Patch::Absent);
        assert_eq!(second.udf_floats[0], Patch::Value(1.5));
        let bytes = text.as_bytes();
        let span = rows[1].span;
        // The reader stops at the `\r`; the rejects copier takes the `\n` with it.
        assert_eq!(
            &bytes[span.start as usize..span.end as usize],
            b"AC2,,1.5\r"
        );
    }

    #[test]
    fn csv_header_faults() {
        let unknown = read(
            "access_token_identifier.authentication_code,colour\n",
            Format::Csv,
        );
        assert_eq!(unknown.unwrap_err().code, ErrorCode::InvalidHeader);
        let repeated = read("udf_string_1,udf_string_1\n", Format::Csv);
        assert_eq!(repeated.unwrap_err().code, ErrorCode::InvalidHeader);
        assert_eq!(
            read("", Format::Csv).unwrap_err().code,
            ErrorCode::InvalidHeader
        );
    }

    #[test]
    fn csv_short_row_is_malformed() {
        let rows = read(
            "access_token_identifier.authentication_code,udf_string_1\nAC1\n",
            Format::Csv,
        )
        .unwrap();
        let errors = rows[0].update.as_ref().unwrap_err();
        assert_eq!(errors[0].code, ErrorCode::MalformedRow);
        assert_eq!(errors[0].line, Some(2));
    }

    #[test]
    fn json_lines_skip_blanks_and_name_unknown_keys() {
        let text = "\n{\"access_token_identifier\":{\"authentication_code\":\"A\"},\"colour\":1}\n\
                    \r\n[1]\n{\"access_token_identifier\":{\"authentication_code\":\"A\"}}";
        let rows = read(text, Format::JsonLines).unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 4, 5]);
        let errors = rows[0].update.as_ref().unwrap_err();
        assert_eq!(errors[0].code, ErrorCode::UnknownField);
        assert_eq!(errors[0].field.as_deref(), Some("colour"));
        assert_eq!(
            rows[1].update.as_ref().unwrap_err()[0].code,
            ErrorCode::MalformedRow
        );
        assert!(rows[2].update.is_ok());
        assert_eq!(rows[2].span.end as usize, text.len());
    }

    #[test]
    fn json_numbers_out_of_range_name_their_field() {
        let text =
            "{\"access_token_identifier\":{\"authentication_code\":\"A\"},\"udf_float_1\":1e999}";
        let rows = read(text, Format::JsonLines).unwrap();
        let errors = rows[0].update.as_ref().unwrap_err();
        assert_eq!(errors[0].code, ErrorCode::InvalidValue);
        assert_eq!(errors[0].field.as_deref(), Some("udf_float_1"));
    }

    #[test]
    fn json_row_too_large_and_bad_encoding() {
        let long = format!("{{\"udf_string_1\":\"{}\"}}\n\u{ff}\n", "x".repeat(2000));
        let mut bytes = long.into_bytes();
        let at = bytes.len() - 3;
        bytes[at] = 0xff;
        bytes.truncate(at + 1);
        bytes.push(b'\n');
        let text = unsafe { String::from_utf8_unchecked(bytes) };
        let rows = read(&text, Format::JsonLines).unwrap();
        assert_eq!(
            rows[0].update.as_ref().unwrap_err()[0].code,
            ErrorCode::RowTooLarge
        );
        assert_eq!(
            rows[1].update.as_ref().unwrap_err()[0].code,
            ErrorCode::InvalidEncoding
        );
    }

    #[test]
    fn size_limit_is_a_file_fault() {
        let mut limited = SizeLimit {
            inner: io::Cursor::new(vec![0u8; 11]),
            remaining: 10,
        };
        let error = io::copy(&mut limited, &mut io::sink()).unwrap_err();
        assert_eq!(file_fault(&error).code, ErrorCode::FileTooLarge);
        let mut exact = SizeLimit {
            inner: io::Cursor::new(vec![0u8; 10]),
            remaining: 10,
        };
        assert_eq!(io::copy(&mut exact, &mut io::sink()).unwrap(), 10);
    }
}
