//! The command line and the configuration (SPEC 6): exit codes of `--run-now`, bad
//! configuration refused before any work, missing folders, an unreachable database,
//! `validate` as a dry run, `migrate`, and where settings come from.

mod common;

use common::TestEnv;
use std::process::Output;

/// A one-row CSV file that sets `udf_string_1` of the token `code`.
fn set_string(code: &str, value: &str) -> String {
    format!("access_token_identifier.authentication_code,udf_string_1\n{code},{value}\n")
}

/// The server part of the test database's URL (no database name).
fn server_url(env: &TestEnv) -> String {
    let suffix = format!("/{}", env.db_name);
    env.url.strip_suffix(&suffix).unwrap().to_owned()
}

/// A PostgreSQL URL on a loopback port nothing listens on.
fn unreachable_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("postgres://postgres@127.0.0.1:{port}/tokensync")
}

/// Rewrites the test's configuration file: its folders, `[database] url` when `url` is
/// given, then `extra` TOML.
fn write_config(env: &TestEnv, url: Option<&str>, extra: &str) {
    let database = match url {
        Some(url) => format!("[database]\nurl = {url:?}\n\n"),
        None => String::new(),
    };
    let text = format!(
        "{database}[paths]\nincoming = {:?}\narchive = {:?}\nfailed = {:?}\n\n\
         [schedule]\nmin_file_age = \"0s\"\n\n{extra}",
        env.incoming(),
        env.archive(),
        env.failed(),
    );
    std::fs::write(env.config_path(), text).unwrap();
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("an exit code")
}

fn stderr(output: &Output) -> String {
    common::text(&output.stderr)
}

fn stdout(output: &Output) -> String {
    common::text(&output.stdout)
}

/// Asserts that nothing was done: the token table is as `before`, `incoming` holds `waiting`
/// only, no report or moved file exists, and the ledger is empty.
async fn assert_untouched(env: &TestEnv, before: &str, waiting: &[&str]) {
    assert_eq!(env.tokens_snapshot().await, before);
    assert_eq!(env.names_in(&env.incoming()), waiting);
    assert!(env.names_in(&env.archive()).is_empty());
    assert!(env.names_in(&env.failed()).is_empty());
    assert!(env.batches().await.is_empty());
}

/// A bad configuration value: exit 2, a message naming the key, and nothing read or moved
/// (the folders tokensync would create are not even created).
async fn assert_config_refused(env: &TestEnv, envs: &[(&str, &str)], key: &str, var: &str) {
    env.insert_token("CFG-1").await;
    let before = env.tokens_snapshot().await;
    env.drop_file("waiting.csv", set_string("CFG-1", "applied"));

    let output = env.run_with(&["--run-now"], envs);

    assert_eq!(code(&output), 2, "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains(key) || message.contains(var),
        "the message names neither {key} nor {var}: {message}"
    );
    assert_untouched(env, &before, &["waiting.csv"]).await;
    assert!(!env.archive().exists() && !env.failed().exists());
}

/// Nothing in incoming: exit 0, and the missing `archive/` and `failed/` are created.
#[tokio::test]
async fn nothing_to_do_exits_0_and_creates_archive_and_failed() {
    let env = TestEnv::new().await;
    assert!(!env.archive().exists() && !env.failed().exists());

    assert_eq!(env.run_now_with(&[]), 0);

    assert!(env.archive().is_dir() && env.failed().is_dir());
    assert!(env.batches().await.is_empty());
}

/// Every batch applied: exit 0.
#[tokio::test]
async fn all_batches_applied_exits_0() {
    let env = TestEnv::new().await;
    env.insert_token("OK-1").await;
    env.insert_token("OK-2").await;
    env.drop_file("a.csv", set_string("OK-1", "one"));
    env.drop_file("b.csv", set_string("OK-2", "two"));

    assert_eq!(env.run_now_with(&[]), 0);

    assert_eq!(
        env.column("OK-1", "udf_string_1").await.as_deref(),
        Some("one")
    );
    assert_eq!(
        env.column("OK-2", "udf_string_1").await.as_deref(),
        Some("two")
    );
    assert_eq!(env.report("a.csv")["status"], "applied");
    assert_eq!(env.report("b.csv")["status"], "applied");
    assert_eq!(env.batches().await.len(), 2);
}

/// One rejected batch among applied ones: exit 1, and the others are still applied.
#[tokio::test]
async fn one_rejected_batch_exits_1_and_the_others_are_applied() {
    let env = TestEnv::new().await;
    env.insert_token("MIX-1").await;
    env.insert_token("MIX-3").await;
    env.drop_file("1.csv", set_string("MIX-1", "one"));
    env.drop_file("2.csv", set_string("MIX-404", "two"));
    env.drop_file("3.csv", set_string("MIX-3", "three"));

    assert_eq!(env.run_now_with(&[]), 1);

    assert_eq!(
        env.column("MIX-1", "udf_string_1").await.as_deref(),
        Some("one")
    );
    assert_eq!(
        env.column("MIX-3", "udf_string_1").await.as_deref(),
        Some("three")
    );
    assert_eq!(env.report("2.csv")["status"], "rejected");
    assert!(
        env.processed("2.csv", "")
            .unwrap()
            .starts_with(env.failed())
    );
    let statuses: Vec<String> = env.batches().await.into_iter().map(|b| b.1).collect();
    assert_eq!(statuses, ["applied", "rejected", "applied"]);
}

/// `TOKENSYNC_APPLY_ON_ROW_ERROR=maybe`: exit 2 naming `apply.on_row_error`.
#[tokio::test]
async fn bad_on_row_error_is_refused() {
    let env = TestEnv::new().await;
    let envs = [("TOKENSYNC_APPLY_ON_ROW_ERROR", "maybe")];
    let (key, var) = ("apply.on_row_error", "TOKENSYNC_APPLY_ON_ROW_ERROR");
    assert_config_refused(&env, &envs, key, var).await;
}

/// `TOKENSYNC_APPLY_MAX_FAILED_ROWS=abc`: exit 2 naming `apply.max_failed_rows`.
#[tokio::test]
async fn bad_max_failed_rows_is_refused() {
    let env = TestEnv::new().await;
    let envs = [("TOKENSYNC_APPLY_MAX_FAILED_ROWS", "abc")];
    let (key, var) = ("apply.max_failed_rows", "TOKENSYNC_APPLY_MAX_FAILED_ROWS");
    assert_config_refused(&env, &envs, key, var).await;
}

/// A five-field cron expression (no seconds field): exit 2 naming `schedule.cron`, even for
/// `--run-now`, which does not use the schedule.
#[tokio::test]
async fn five_field_cron_is_refused() {
    let env = TestEnv::new().await;
    let envs = [("TOKENSYNC_SCHEDULE_CRON", "* * * * *")];
    let (key, var) = ("schedule.cron", "TOKENSYNC_SCHEDULE_CRON");
    assert_config_refused(&env, &envs, key, var).await;
}

/// A key the TOML file should not have: exit 2 naming it.
#[tokio::test]
async fn unknown_key_in_the_toml_file_is_refused() {
    let env = TestEnv::new().await;
    write_config(&env, Some(&env.url), "[apply]\ncolour = \"red\"\n");
    assert_config_refused(&env, &[], "apply.colour", "apply.colour").await;
}

/// A value of the wrong type in the TOML file: exit 2 naming the key.
#[tokio::test]
async fn bad_value_in_the_toml_file_is_refused() {
    let env = TestEnv::new().await;
    write_config(&env, Some(&env.url), "[csv]\ndelimiter = \";;\"\n");
    assert_config_refused(&env, &[], "csv.delimiter", "delimiter").await;
}

/// A bad configuration also stops `validate` and `migrate` with exit 2.
#[tokio::test]
async fn bad_configuration_stops_every_command() {
    let env = TestEnv::new().await;
    let file = env.path().join("check.csv");
    std::fs::write(&file, set_string("X", "y")).unwrap();
    let envs = [("TOKENSYNC_APPLY_ON_ROW_ERROR", "maybe")];

    let validate = env.run_with(&["validate", file.to_str().unwrap()], &envs);
    let migrate = env.run_with(&["migrate"], &envs);

    for output in [&validate, &migrate] {
        assert_eq!(code(output), 2);
        assert!(
            stderr(output).contains("apply.on_row_error"),
            "{}",
            stderr(output)
        );
    }
    assert!(env.batches().await.is_empty());
}

/// A missing `paths.incoming`: exit 2 with a message naming it, nothing recorded.
#[tokio::test]
async fn missing_incoming_exits_2() {
    let env = TestEnv::new().await;
    std::fs::remove_dir(env.incoming()).unwrap();

    let output = env.run_with(&["--run-now"], &[]);

    assert_eq!(code(&output), 2);
    let message = stderr(&output);
    assert!(message.contains("incoming"), "{message}");
    assert!(env.batches().await.is_empty());
    assert!(env.names_in(&env.archive()).is_empty());
}

/// An unreachable database: exit 2 with a clear message, the files stay in incoming and
/// nothing is moved or written.
#[tokio::test]
async fn unreachable_database_exits_2_and_files_stay() {
    let env = TestEnv::new().await;
    env.insert_token("NET-1").await;
    let before = env.tokens_snapshot().await;
    env.drop_file("waiting.csv", set_string("NET-1", "applied"));
    let url = unreachable_url();

    let output = env.run_with(&["--run-now"], &[("TOKENSYNC_DATABASE_URL", &url)]);

    assert_eq!(code(&output), 2);
    let message = stderr(&output).to_lowercase();
    assert!(message.contains("database"), "{message}");
    assert_untouched(&env, &before, &["waiting.csv"]).await;
}

/// `validate` against an unreachable database: exit 2.
#[tokio::test]
async fn validate_with_unreachable_database_exits_2() {
    let env = TestEnv::new().await;
    let file = env.path().join("check.csv");
    std::fs::write(&file, set_string("X", "y")).unwrap();
    let url = unreachable_url();

    let output = env.run_with(
        &["validate", file.to_str().unwrap()],
        &[("TOKENSYNC_DATABASE_URL", &url)],
    );

    assert_eq!(code(&output), 2);
    assert!(stderr(&output).to_lowercase().contains("database"));
}

/// `validate` on a good file: exit 0, and it changes nothing, moves nothing, writes no report
/// and records no batch.
#[tokio::test]
async fn validate_a_good_file_exits_0_and_writes_nothing() {
    let env = TestEnv::new().await;
    env.insert_token("VAL-1").await;
    let before = env.tokens_snapshot().await;
    let text = "access_token_identifier.authentication_code,authentication_code,identifier,\
                pass_code,udf_string_1\nVAL-1,VAL-2,IDENT-V,pass-v,checked\n";
    env.drop_file("good.csv", text);
    let file = env.incoming().join("good.csv");

    let output = env.run_with(&["validate", file.to_str().unwrap()], &[]);

    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stdout(&output).contains("good.csv"), "{}", stdout(&output));
    assert_untouched(&env, &before, &["good.csv"]).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    assert!(!env.archive().exists() && !env.failed().exists());
}

/// `validate` on a bad file and a good one: exit 1, every error printed on stdout with its
/// line and code, and nothing changed, moved, reported or recorded.
#[tokio::test]
async fn validate_a_bad_file_exits_1_and_prints_its_errors() {
    let env = TestEnv::new().await;
    env.insert_token("VAL-1").await;
    let before = env.tokens_snapshot().await;
    let bad = "access_token_identifier.authentication_code,udf_string_1,udf_date_1\n\
               VAL-1,x,\nVAL-404,y,\nVAL-1,,2026-02-30\n";
    env.drop_file("bad.csv", bad);
    env.drop_file("good.csv", set_string("VAL-1", "fine"));
    let bad_path = env.incoming().join("bad.csv");
    let good_path = env.incoming().join("good.csv");

    let output = env.run_with(
        &[
            "validate",
            bad_path.to_str().unwrap(),
            good_path.to_str().unwrap(),
        ],
        &[],
    );

    assert_eq!(code(&output), 1, "{}", stderr(&output));
    let printed = stdout(&output);
    let has_line = |line: &str, code: &str| {
        printed
            .lines()
            .any(|l| l.contains(line) && l.contains(code) && l.contains("bad.csv"))
    };
    assert!(has_line("line 3", "ACCESS_TOKEN_NOT_FOUND"), "{printed}");
    assert!(has_line("line 4", "INVALID_VALUE"), "{printed}");
    assert!(!printed.contains("line 2"), "{printed}");
    assert_untouched(&env, &before, &["bad.csv", "good.csv"]).await;
}

/// `validate` on a file that does not exist: exit 2.
#[tokio::test]
async fn validate_a_missing_file_exits_2() {
    let env = TestEnv::new().await;
    let missing = env.path().join("missing.csv");

    let output = env.run_with(&["validate", missing.to_str().unwrap()], &[]);

    assert_eq!(code(&output), 2);
    assert!(
        stderr(&output).contains("missing.csv"),
        "{}",
        stderr(&output)
    );
    assert!(env.batches().await.is_empty());
}

/// `migrate` run again on a migrated database changes nothing and keeps the data.
#[tokio::test]
async fn migrate_twice_is_harmless() {
    let env = TestEnv::new().await;
    env.insert_token("MIG-1").await;
    env.exec("UPDATE access_token_definition SET allow_no_identifier_and_pass_code = true")
        .await;
    let before = env.tokens_snapshot().await;

    let first = env.run(&["migrate"]);
    let second = env.run(&["migrate"]);

    assert_eq!(code(&first), 0, "{}", stderr(&first));
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    assert_eq!(env.tokens_snapshot().await, before);
    let row = env
        .client
        .query_one(
            "SELECT count(*), bool_and(allow_no_identifier_and_pass_code) \
             FROM access_token_definition",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "the definition still has one row");
    assert!(row.get::<_, bool>(1), "the definition keeps its settings");
}

/// `migrate` creates the database named in `database.url` when it does not exist, and the
/// result is ready for `--run-now`.
#[tokio::test]
async fn migrate_creates_a_missing_database() {
    let env = TestEnv::new().await;
    let name = format!("tokensync_new_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}/{name}", server_url(&env));
    let envs = [("TOKENSYNC_DATABASE_URL", url.as_str())];

    let migrate = env.run_with(&["migrate"], &envs);
    env.drop_file("empty.csv", "access_token_identifier.authentication_code\n");
    let run = env.run_with(&["--run-now"], &envs);

    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the new database exists");
    tokio::spawn(connection);
    let definitions: i64 = client
        .query_one("SELECT count(*) FROM access_token_definition", &[])
        .await
        .unwrap()
        .get(0);
    let batches: i64 = client
        .query_one("SELECT count(*) FROM batches", &[])
        .await
        .unwrap()
        .get(0);
    drop(client);
    env.exec(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .await;
    assert_eq!(code(&migrate), 0, "{}", stderr(&migrate));
    assert_eq!(code(&run), 0, "{}", stderr(&run));
    assert_eq!(definitions, 1);
    assert_eq!(batches, 1, "the batch went to the new database");
    assert!(env.batches().await.is_empty(), "not to the file's database");
}

/// `DATABASE_URL` sets `database.url` (over the file); `TOKENSYNC_DATABASE_URL` wins over
/// `DATABASE_URL`.
#[tokio::test]
async fn database_url_sets_the_url_and_tokensync_database_url_wins() {
    let env = TestEnv::new().await;
    env.insert_token("URL-1").await;
    let unreachable = unreachable_url();
    let good = env.url.clone();

    // The file names no database: DATABASE_URL alone is enough.
    write_config(&env, None, "");
    env.drop_file("1.csv", set_string("URL-1", "by-database-url"));
    assert_eq!(env.run_now_with(&[("DATABASE_URL", &good)]), 0);
    assert_eq!(
        env.column("URL-1", "udf_string_1").await.as_deref(),
        Some("by-database-url")
    );

    // TOKENSYNC_DATABASE_URL wins, whichever of the two is reachable.
    env.drop_file("2.csv", set_string("URL-1", "second"));
    let envs = [
        ("DATABASE_URL", good.as_str()),
        ("TOKENSYNC_DATABASE_URL", unreachable.as_str()),
    ];
    assert_eq!(env.run_now_with(&envs), 2);
    assert_eq!(env.names_in(&env.incoming()), ["2.csv"]);
    let envs = [
        ("DATABASE_URL", unreachable.as_str()),
        ("TOKENSYNC_DATABASE_URL", good.as_str()),
    ];
    assert_eq!(env.run_now_with(&envs), 0);
    assert_eq!(
        env.column("URL-1", "udf_string_1").await.as_deref(),
        Some("second")
    );

    // DATABASE_URL also wins over the file.
    write_config(&env, Some(&good), "");
    env.drop_file("3.csv", set_string("URL-1", "third"));
    assert_eq!(env.run_now_with(&[("DATABASE_URL", &unreachable)]), 2);
    assert_eq!(env.names_in(&env.incoming()), ["3.csv"]);
    assert_eq!(
        env.column("URL-1", "udf_string_1").await.as_deref(),
        Some("second")
    );
    assert_eq!(env.batches().await.len(), 2);
}

/// A setting of the TOML file is used, and the environment overrides it.
#[tokio::test]
async fn the_environment_overrides_the_toml_file() {
    let env = TestEnv::new().await;
    env.insert_token("ENV-1").await;
    write_config(
        &env,
        Some(&env.url),
        "[apply]\non_row_error = \"skip-row\"\n",
    );
    let two_rows = |value: &str| {
        format!(
            "access_token_identifier.authentication_code,udf_string_1\n\
             ENV-1,{value}\nENV-404,x\n"
        )
    };

    // The file's skip-row applies the good row.
    env.drop_file("1.csv", two_rows("from-file-setting"));
    assert_eq!(env.run_now_with(&[]), 1);
    assert_eq!(env.report("1.csv")["status"], "partially_applied");
    assert_eq!(
        env.column("ENV-1", "udf_string_1").await.as_deref(),
        Some("from-file-setting")
    );

    // The environment's reject-batch rejects the whole file.
    env.drop_file("2.csv", two_rows("overridden"));
    assert_eq!(
        env.run_now_with(&[("TOKENSYNC_APPLY_ON_ROW_ERROR", "reject-batch")]),
        1
    );
    assert_eq!(env.report("2.csv")["status"], "rejected");
    assert_eq!(
        env.column("ENV-1", "udf_string_1").await.as_deref(),
        Some("from-file-setting")
    );
}
