//! Shared harness of the integration tests: each test gets a database of its own (created
//! by the real `tokensync migrate`) and a folder of its own, runs the real binary, and
//! drops its database at the end.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

/// The server the tests use: `TOKENSYNC_TEST_PG` (host, port and user, no database),
/// by default the local PostgreSQL.
fn server_url() -> String {
    std::env::var("TOKENSYNC_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A test's own database, folders and configuration file.
pub struct TestEnv {
    pub dir: TempDir,
    pub db_name: String,
    pub url: String,
    pub client: Client,
}

impl TestEnv {
    /// A new database, migrated by `tokensync migrate`, and empty folders
    /// (`incoming` exists; `archive` and `failed` are left for tokensync to create).
    pub async fn new() -> TestEnv {
        let dir = tempfile::tempdir().expect("a temp dir");
        let db_name = format!("tokensync_test_{}", uuid::Uuid::new_v4().simple());
        let url = format!("{}/{db_name}", server_url());
        std::fs::create_dir_all(dir.path().join("incoming")).unwrap();
        let config = format!(
            "[database]\nurl = {url:?}\n\n[paths]\nincoming = {:?}\narchive = {:?}\nfailed = {:?}\n\n\
             [schedule]\nmin_file_age = \"0s\"\n",
            dir.path().join("incoming"),
            dir.path().join("archive"),
            dir.path().join("failed"),
        );
        std::fs::write(dir.path().join("tokensync.toml"), config).unwrap();

        let output = run_binary(dir.path(), &["migrate"], &[]);
        assert!(
            output.status.success(),
            "migrate failed: {}",
            text(&output.stderr)
        );
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
        tokio::spawn(connection);
        TestEnv {
            dir,
            db_name,
            url,
            client,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("tokensync.toml")
    }

    pub fn incoming(&self) -> PathBuf {
        self.path().join("incoming")
    }

    pub fn archive(&self) -> PathBuf {
        self.path().join("archive")
    }

    pub fn failed(&self) -> PathBuf {
        self.path().join("failed")
    }

    /// Runs `tokensync --config <this test's file> ARGS` with extra environment variables.
    pub fn run_with(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let config = self.config_path();
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        run_binary(self.path(), &all, envs)
    }

    /// Runs `tokensync --config <this test's file> ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[])
    }

    /// Runs `--run-now` with extra environment variables and gives the exit code.
    pub fn run_now_with(&self, envs: &[(&str, &str)]) -> i32 {
        let output = self.run_with(&["--run-now"], envs);
        output.status.code().expect("an exit code")
    }

    /// Puts a batch file into `incoming` the way writers should: under a `.part` name, then
    /// renamed.
    pub fn drop_file(&self, name: &str, contents: impl AsRef<[u8]>) {
        let part = self.incoming().join(format!("{name}.part"));
        std::fs::write(&part, contents).unwrap();
        std::fs::rename(part, self.incoming().join(name)).unwrap();
    }

    /// The names in a folder, sorted; empty when it does not exist.
    pub fn names_in(&self, dir: &Path) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The path of the processed file `name` (in archive or failed) plus `suffix` ("" for
    /// the file itself, ".report.json", ".errors.jsonl" …), if there is exactly one.
    pub fn processed(&self, name: &str, suffix: &str) -> Option<PathBuf> {
        let wanted = format!("-{name}{suffix}");
        let mut found = Vec::new();
        for dir in [self.archive(), self.failed()] {
            for entry in self.names_in(&dir) {
                if entry.ends_with(&wanted) && is_stamped(&entry) {
                    found.push(dir.join(entry));
                }
            }
        }
        assert!(found.len() <= 1, "more than one {wanted}: {found:?}");
        found.pop()
    }

    /// The `.report.json` of the processed file `name`.
    pub fn report(&self, name: &str) -> Value {
        let path = self.processed(name, ".report.json").unwrap_or_else(|| {
            panic!(
                "no report for {name}: archive {:?}, failed {:?}",
                self.names_in(&self.archive()),
                self.names_in(&self.failed())
            )
        });
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// The lines of a JSON Lines report of `name` (`.errors.jsonl`, `.results.jsonl`);
    /// empty when the file does not exist.
    pub fn report_lines(&self, name: &str, suffix: &str) -> Vec<Value> {
        let Some(path) = self.processed(name, suffix) else {
            return Vec::new();
        };
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// The errors of `name` as (line, field, code) triples.
    pub fn errors(&self, name: &str) -> Vec<(Option<u64>, Option<String>, String)> {
        self.report_lines(name, ".errors.jsonl")
            .into_iter()
            .map(|e| {
                (
                    e["line"].as_u64(),
                    e["field"].as_str().map(str::to_owned),
                    e["code"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Runs SQL statements.
    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Inserts a token with this authentication code and gives its id.
    pub async fn insert_token(&self, code: &str) -> uuid::Uuid {
        let row = self
            .client
            .query_one(
                "INSERT INTO access_tokens (authentication_code) VALUES ($1) RETURNING id",
                &[&code],
            )
            .await
            .unwrap();
        row.get(0)
    }

    /// The whole `access_tokens` table as JSON, ordered by id: for comparing states.
    pub async fn tokens_snapshot(&self) -> String {
        let row = self
            .client
            .query_one(
                "SELECT coalesce(json_agg(t ORDER BY t.id)::text, '[]') FROM access_tokens t",
                &[],
            )
            .await
            .unwrap();
        row.get(0)
    }

    /// One column of the token with this authentication code, as text (None for null).
    pub async fn column(&self, code: &str, column: &str) -> Option<String> {
        let sql =
            format!("SELECT {column}::text FROM access_tokens WHERE authentication_code = $1");
        let row = self
            .client
            .query_one(&sql, &[&code])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        row.get(0)
    }

    /// The rows of `batches` as (file_name, status, rows_total, rows_applied, rows_failed).
    pub async fn batches(&self) -> Vec<(String, String, i64, i64, i64)> {
        let rows = self
            .client
            .query(
                "SELECT file_name, status, rows_total, rows_applied, rows_failed FROM batches \
                 ORDER BY started_at, file_name",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let db_name = self.db_name.clone();
        // Drop cannot await: drop the database from a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let url = format!("{}/postgres", server_url());
                if let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await {
                    tokio::spawn(connection);
                    let sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
                    let _ = client.batch_execute(&sql).await;
                }
            });
        })
        .join();
    }
}

/// Whether a processed name starts with the `YYYYmmddTHHMMSSZ-` stamp.
pub fn is_stamped(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() > 17
        && bytes[..8].iter().all(u8::is_ascii_digit)
        && bytes[8] == b'T'
        && bytes[9..15].iter().all(u8::is_ascii_digit)
        && bytes[15] == b'Z'
        && bytes[16] == b'-'
}

/// Runs the real binary in `dir`, with `RUST_LOG` cleared so logs are the defaults.
pub fn run_binary(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tokensync"));
    command
        .current_dir(dir)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("DATABASE_URL");
    for (key, _) in std::env::vars() {
        if key.starts_with("TOKENSYNC_") {
            command.env_remove(key);
        }
    }
    command.envs(envs.iter().copied());
    command.output().expect("the tokensync binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
