//! Configuration: defaults, then the TOML file, then the environment, checked as a whole
//! before any work starts.
//!
//! Every key of the file can also come from the environment as `TOKENSYNC_<SECTION>_<KEY>`
//! (`TOKENSYNC_APPLY_ON_ROW_ERROR`), and `DATABASE_URL` sets `database.url`. The order of
//! precedence, lowest first: defaults, the file, `DATABASE_URL`, `TOKENSYNC_*`. Relative
//! paths are taken from the working directory. A bad value is a [`ConfigError`] that names
//! its key.

use crate::row::ReadOptions;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The sections a `TOKENSYNC_<SECTION>_<KEY>` variable may name.
const SECTIONS: [&str; 6] = ["database", "paths", "schedule", "apply", "csv", "metrics"];

/// A configuration value that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration: {0}")]
    Load(Box<figment::Error>),
}

/// A figment error named by its key (without figment's profile prefix) and its source.
fn load_error(error: figment::Error) -> ConfigError {
    let key = error.path.join(".");
    if key.is_empty() {
        return ConfigError::Load(Box::new(error));
    }
    let source = match &error.metadata {
        Some(metadata) => format!(" (from {})", metadata.name),
        None => String::new(),
    };
    invalid(&key, format!("{}{source}", error.kind))
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// What to do with a batch in which some rows fail (`apply.on_row_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRowError {
    /// Nothing of the file is applied.
    RejectBatch,
    /// The rows that pass are applied; failed rows leave no trace.
    SkipRow,
}

/// How the rows of a batch reach the table (`apply.method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMethod {
    /// In chunks, with a few statements each (the default).
    SetBased,
    /// One row after another: the reference implementation.
    RowByRow,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub paths: PathsConfig,
    pub schedule: ScheduleConfig,
    pub apply: ApplyConfig,
    pub csv: CsvConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// A PostgreSQL URL or key-value connection string.
    pub url: String,
    /// The schema that holds tokensync's tables; a plain SQL identifier.
    pub schema: String,
    /// Connections kept open by the daemon.
    pub pool_size: usize,
}

#[derive(Debug, Clone)]
pub struct PathsConfig {
    pub incoming: PathBuf,
    pub archive: PathBuf,
    pub failed: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// A cron expression with the seconds field first, evaluated in UTC.
    pub cron: String,
    /// How long a file must be left unmodified before it is taken.
    pub min_file_age: Duration,
    /// Whether `min_file_age` was set in the file or the environment (`--run-now` honours it
    /// only then).
    pub is_min_file_age_set: bool,
    /// How long a stopping daemon lets the batch in flight finish.
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ApplyConfig {
    pub on_row_error: OnRowError,
    pub method: ApplyMethod,
    /// Rows the set-based method applies together; memory grows with it.
    pub chunk_rows: usize,
    /// Under `skip-row`, a batch with more failed rows than this is rejected as a whole.
    pub max_failed_rows: Option<u64>,
    /// The largest file accepted, once decompressed.
    pub max_file_bytes: u64,
    /// The largest row accepted; a larger one fails with `ROW_TOO_LARGE`.
    pub max_row_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct CsvConfig {
    pub delimiter: u8,
    pub null_marker: String,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    /// Where `--run-now` writes its metrics for node_exporter's textfile collector.
    pub textfile: Option<PathBuf>,
}

impl Config {
    /// Loads the configuration from `file` (if any) and the environment, and checks it.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, or a key with a bad value.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut given = Figment::new();
        if let Some(file) = file {
            if !file.is_file() {
                return Err(invalid(
                    "--config",
                    format!("no such file: {}", file.display()),
                ));
            }
            given = given.merge(Toml::file_exact(file));
        }
        let given = given
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(tokensync_env());
        let is_min_file_age_set = given.find_value("schedule.min_file_age").is_ok();
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(given)
            .extract()
            .map_err(load_error)?;
        let mut config = Config::try_from(raw)?;
        config.schedule.is_min_file_age_set = is_min_file_age_set;
        Ok(config)
    }

    /// Every setting on one line, for the log, with the database password masked.
    pub fn summary(&self) -> String {
        let textfile = self
            .metrics
            .textfile
            .as_ref()
            .map(|p| p.display().to_string());
        format!(
            "database.url={} database.schema={} database.pool_size={} paths.incoming={} \
             paths.archive={} paths.failed={} schedule.cron={:?} schedule.min_file_age={} \
             schedule.shutdown_timeout={} apply.on_row_error={} apply.method={:?} apply.chunk_rows={} \
             apply.max_failed_rows={} \
             apply.max_file_bytes={} apply.max_row_bytes={} csv.delimiter={:?} \
             csv.null_marker={:?} metrics.listen={} metrics.textfile={}",
            redact_url(&self.database.url),
            self.database.schema,
            self.database.pool_size,
            self.paths.incoming.display(),
            self.paths.archive.display(),
            self.paths.failed.display(),
            self.schedule.cron,
            humantime::format_duration(self.schedule.min_file_age),
            humantime::format_duration(self.schedule.shutdown_timeout),
            self.apply.on_row_error,
            self.apply.method,
            self.apply.chunk_rows,
            self.apply
                .max_failed_rows
                .map_or("none".to_owned(), |n| n.to_string()),
            self.apply.max_file_bytes,
            self.apply.max_row_bytes,
            char::from(self.csv.delimiter),
            self.csv.null_marker,
            self.metrics.listen,
            textfile.as_deref().unwrap_or("none"),
        )
    }

    /// The reading settings of [`crate::row`].
    pub fn read_options(&self) -> ReadOptions {
        ReadOptions {
            delimiter: self.csv.delimiter,
            null_marker: self.csv.null_marker.clone(),
            max_row_bytes: self.apply.max_row_bytes,
            max_file_bytes: self.apply.max_file_bytes,
        }
    }
}

/// `TOKENSYNC_APPLY_ON_ROW_ERROR` becomes `apply.on_row_error`. Variables that name no
/// section are left alone.
fn tokensync_env() -> Env {
    Env::prefixed("TOKENSYNC_")
        .filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            SECTIONS
                .iter()
                .any(|section| key.starts_with(&format!("{section}_")))
        })
        .map(|key| {
            let key = key.as_str().to_ascii_lowercase();
            key.replacen('_', ".", 1).into()
        })
}

/// The configuration as written: every value as loose as the file and the environment
/// allow, checked by `TryFrom` into [`Config`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    database: RawDatabase,
    paths: RawPaths,
    schedule: RawSchedule,
    apply: RawApply,
    csv: RawCsv,
    metrics: RawMetrics,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawDatabase {
    url: Loose,
    schema: Loose,
    pool_size: Loose,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawPaths {
    incoming: Loose,
    archive: Loose,
    failed: Loose,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawSchedule {
    cron: Loose,
    min_file_age: Loose,
    shutdown_timeout: Loose,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawApply {
    on_row_error: Loose,
    method: Loose,
    chunk_rows: Loose,
    max_failed_rows: Option<Loose>,
    max_file_bytes: Loose,
    max_row_bytes: Loose,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawCsv {
    delimiter: Loose,
    null_marker: Loose,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawMetrics {
    listen: Loose,
    textfile: Option<Loose>,
}

/// A scalar as written: the environment turns `5` into a number and `true` into a flag
/// whatever the key, so every value is read as text and typed by its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Loose {
    Text(String),
    Integer(i64),
    Float(f64),
    Flag(bool),
}

impl Loose {
    fn text(value: &str) -> Loose {
        Loose::Text(value.to_owned())
    }

    fn into_text(self) -> String {
        match self {
            Loose::Text(text) => text,
            Loose::Integer(number) => number.to_string(),
            Loose::Float(number) => number.to_string(),
            Loose::Flag(flag) => flag.to_string(),
        }
    }
}

impl Default for Loose {
    fn default() -> Self {
        Loose::text("")
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            database: RawDatabase {
                url: Loose::text("postgres://localhost/tokensync"),
                schema: Loose::text("public"),
                pool_size: Loose::Integer(4),
            },
            paths: RawPaths {
                incoming: Loose::text("./var/incoming"),
                archive: Loose::text("./var/archive"),
                failed: Loose::text("./var/failed"),
            },
            schedule: RawSchedule {
                cron: Loose::text("0 */5 * * * *"),
                min_file_age: Loose::text("10s"),
                shutdown_timeout: Loose::text("30s"),
            },
            apply: RawApply {
                on_row_error: Loose::text("reject-batch"),
                method: Loose::text("set-based"),
                chunk_rows: Loose::Integer(10_000),
                max_failed_rows: None,
                max_file_bytes: Loose::text("4GiB"),
                max_row_bytes: Loose::text("1MiB"),
            },
            csv: RawCsv {
                delimiter: Loose::text(","),
                null_marker: Loose::text("\\N"),
            },
            metrics: RawMetrics {
                listen: Loose::text("127.0.0.1:9464"),
                textfile: None,
            },
        }
    }
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawConfig::default().database
    }
}

impl Default for RawPaths {
    fn default() -> Self {
        RawConfig::default().paths
    }
}

impl Default for RawSchedule {
    fn default() -> Self {
        RawConfig::default().schedule
    }
}

impl Default for RawApply {
    fn default() -> Self {
        RawConfig::default().apply
    }
}

impl Default for RawCsv {
    fn default() -> Self {
        RawConfig::default().csv
    }
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawConfig::default().metrics
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        let database = DatabaseConfig {
            url: non_empty("database.url", raw.database.url)?,
            schema: schema_name("database.schema", raw.database.schema)?,
            pool_size: usize::try_from(count("database.pool_size", raw.database.pool_size)?)
                .ok()
                .filter(|size| *size >= 1)
                .ok_or_else(|| invalid("database.pool_size", "expected at least 1"))?,
        };
        let paths = PathsConfig {
            incoming: PathBuf::from(non_empty("paths.incoming", raw.paths.incoming)?),
            archive: PathBuf::from(non_empty("paths.archive", raw.paths.archive)?),
            failed: PathBuf::from(non_empty("paths.failed", raw.paths.failed)?),
        };
        let schedule = ScheduleConfig {
            cron: cron("schedule.cron", raw.schedule.cron)?,
            min_file_age: duration("schedule.min_file_age", raw.schedule.min_file_age)?,
            is_min_file_age_set: false,
            shutdown_timeout: duration("schedule.shutdown_timeout", raw.schedule.shutdown_timeout)?,
        };
        let apply = ApplyConfig {
            on_row_error: on_row_error("apply.on_row_error", raw.apply.on_row_error)?,
            method: apply_method("apply.method", raw.apply.method)?,
            chunk_rows: usize::try_from(count("apply.chunk_rows", raw.apply.chunk_rows)?)
                .ok()
                .filter(|rows| *rows >= 1)
                .ok_or_else(|| invalid("apply.chunk_rows", "expected at least 1"))?,
            max_failed_rows: match raw.apply.max_failed_rows {
                Some(value) => Some(count("apply.max_failed_rows", value)?),
                None => None,
            },
            max_file_bytes: bytes("apply.max_file_bytes", raw.apply.max_file_bytes)?,
            max_row_bytes: bytes("apply.max_row_bytes", raw.apply.max_row_bytes)?,
        };
        let csv = CsvConfig {
            delimiter: delimiter("csv.delimiter", raw.csv.delimiter)?,
            null_marker: non_empty("csv.null_marker", raw.csv.null_marker)?,
        };
        let metrics = MetricsConfig {
            listen: parse(
                "metrics.listen",
                raw.metrics.listen,
                "an address such as 127.0.0.1:9464",
            )?,
            textfile: match raw.metrics.textfile {
                Some(value) => Some(PathBuf::from(non_empty("metrics.textfile", value)?)),
                None => None,
            },
        };
        Ok(Config {
            database,
            paths,
            schedule,
            apply,
            csv,
            metrics,
        })
    }
}

/// A connection string with its password replaced by `***`, in URL form
/// (`postgres://user:secret@host/db`, `?password=secret`) or key-value form
/// (`password=secret`).
pub fn redact_url(url: &str) -> String {
    let mut redacted = url.to_owned();
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            let start = scheme_end + 3 + colon + 1;
            redacted.replace_range(start..scheme_end + 3 + at, "***");
        }
    }
    let mut out = String::with_capacity(redacted.len());
    let mut rest = redacted.as_str();
    while let Some(found) = rest.find("password=") {
        let value_start = found + "password=".len();
        out.push_str(&rest[..value_start]);
        out.push_str("***");
        let value_end = rest[value_start..]
            .find(['&', ' '])
            .map_or(rest.len(), |end| value_start + end);
        rest = &rest[value_end..];
    }
    out.push_str(rest);
    out
}

fn non_empty(key: &str, value: Loose) -> Result<String, ConfigError> {
    let text = value.into_text();
    if text.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    Ok(text)
}

fn parse<T: FromStr>(key: &str, value: Loose, expected: &str) -> Result<T, ConfigError> {
    let text = value.into_text();
    text.parse()
        .map_err(|_| invalid(key, format!("expected {expected}, found {text:?}")))
}

fn count(key: &str, value: Loose) -> Result<u64, ConfigError> {
    parse(key, value, "a whole number of 0 or more")
}

fn schema_name(key: &str, value: Loose) -> Result<String, ConfigError> {
    let name = value.into_text();
    let mut chars = name.chars();
    let is_identifier = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63;
    if !is_identifier {
        let message = "expected a plain SQL identifier (letters, digits and _, at most 63)";
        return Err(invalid(key, message));
    }
    Ok(name)
}

fn duration(key: &str, value: Loose) -> Result<Duration, ConfigError> {
    let text = value.into_text();
    humantime::parse_duration(&text)
        .map_err(|e| invalid(key, format!("expected a duration such as 10s or 5m ({e})")))
}

fn bytes(key: &str, value: Loose) -> Result<u64, ConfigError> {
    let size = match value {
        Loose::Integer(number) => u64::try_from(number).ok(),
        other => other
            .into_text()
            .parse::<bytesize::ByteSize>()
            .ok()
            .map(|size| size.as_u64()),
    };
    match size {
        Some(size) if size > 0 => Ok(size),
        _ => Err(invalid(
            key,
            "expected a size such as 4GiB, 512MiB or a number of bytes",
        )),
    }
}

fn on_row_error(key: &str, value: Loose) -> Result<OnRowError, ConfigError> {
    match value.into_text().as_str() {
        "reject-batch" => Ok(OnRowError::RejectBatch),
        "skip-row" => Ok(OnRowError::SkipRow),
        other => Err(invalid(
            key,
            format!("expected reject-batch or skip-row, found {other:?}"),
        )),
    }
}

fn apply_method(key: &str, value: Loose) -> Result<ApplyMethod, ConfigError> {
    match value.into_text().as_str() {
        "set-based" => Ok(ApplyMethod::SetBased),
        "row-by-row" => Ok(ApplyMethod::RowByRow),
        other => Err(invalid(
            key,
            format!("expected set-based or row-by-row, found {other:?}"),
        )),
    }
}

fn delimiter(key: &str, value: Loose) -> Result<u8, ConfigError> {
    let text = value.into_text();
    let delimiter = match text.as_str() {
        "\\t" | "tab" => b'\t',
        _ if text.len() == 1 && text.is_ascii() => text.as_bytes()[0],
        _ => {
            return Err(invalid(
                key,
                "expected one ASCII character, or \\t for a tab",
            ));
        }
    };
    if matches!(delimiter, b'"' | b'\n' | b'\r') {
        return Err(invalid(
            key,
            "a quote or a line end cannot be the delimiter",
        ));
    }
    Ok(delimiter)
}

fn cron(key: &str, value: Loose) -> Result<String, ConfigError> {
    let expression = value.into_text();
    let fields = expression.split_whitespace().count();
    if !(6..=7).contains(&fields) {
        let message = "expected 6 or 7 fields, the seconds first (e.g. \"0 */5 * * * *\")";
        return Err(invalid(key, message));
    }
    // The same parser settings as tokio-cron-scheduler's, so what passes here runs there.
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build();
    parser
        .parse(&expression)
        .map_err(|e| invalid(key, format!("not a valid cron expression: {e}")))?;
    Ok(expression)
}

impl fmt::Display for OnRowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnRowError::RejectBatch => "reject-batch",
            OnRowError::SkipRow => "skip-row",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=secret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
    }
}
