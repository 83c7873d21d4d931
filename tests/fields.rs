//! Every field of the update method in its three states (absent, null, a value) and every
//! rule of SPEC 1.1–1.3, in CSV and in JSON Lines, run by the real binary against
//! PostgreSQL; plus what `.results.jsonl` and `rows_unchanged` say about the rows (SPEC 4).
//!
//! Each test writes its rows once as [`Row`]s and runs them once per [`Format`], each time
//! in a fresh [`TestEnv`], with `apply.on_row_error = "skip-row"` so that good and bad rows
//! share one file.

mod common;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use common::TestEnv;
use serde_json::{Map, Value, json};
use uuid::Uuid;

const SKIP_ROW: &[(&str, &str)] = &[("TOKENSYNC_APPLY_ON_ROW_ERROR", "skip-row")];
const NULL: Value = Value::Null;
const KEY_CODE: &str = "access_token_identifier.authentication_code";
const KEY_IDENTIFIER: &str = "access_token_identifier.identifier";
const KEY_PASS_CODE: &str = "access_token_identifier.pass_code";
const CUSTOM_DEFINITIONS: &str = "INSERT INTO custom_field_definitions (name, data_type) \
    VALUES ('tier', 'string'), ('visits', 'integer'), ('score', 'float'), \
    ('vip', 'boolean'), ('since', 'date')";

/// The two formats of a batch file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Csv,
    Jsonl,
}

const FORMATS: [Format; 2] = [Format::Csv, Format::Jsonl];

impl Format {
    fn file(self, stem: &str) -> String {
        match self {
            Format::Csv => format!("{stem}.csv"),
            Format::Jsonl => format!("{stem}.jsonl"),
        }
    }

    /// The file's line of the row at `index` (rows here never span lines).
    fn line(self, index: usize) -> u64 {
        match self {
            Format::Csv => index as u64 + 2,
            Format::Jsonl => index as u64 + 1,
        }
    }

    fn render(self, rows: &[Row]) -> String {
        match self {
            Format::Csv => render_csv(rows),
            Format::Jsonl => rows.iter().map(|row| row.to_json() + "\n").collect(),
        }
    }
}

/// One row of a batch, written once for both formats: `(key, value)` pairs with the CSV's
/// dotted keys. `NULL` is null (`\N` in CSV); a key missing from a row is not specified
/// (an empty cell in CSV). The plain key `custom_field_set` (a raw list) is for JSON only.
#[derive(Debug, Clone, Default)]
struct Row(Vec<(String, Value)>);

impl Row {
    fn with(mut self, key: &str, value: impl Into<Value>) -> Row {
        self.0.push((key.to_owned(), value.into()));
        self
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn to_json(&self) -> String {
        let mut object = Map::new();
        for (key, value) in &self.0 {
            if let Some(part) = key.strip_prefix("access_token_identifier.") {
                let entry = object
                    .entry("access_token_identifier")
                    .or_insert_with(|| json!({}));
                entry[part] = value.clone();
            } else if let Some(name) = key.strip_prefix("custom_field_set.") {
                let entry = object
                    .entry("custom_field_set")
                    .or_insert_with(|| json!([]));
                let item = Map::from_iter([(name.to_owned(), value.clone())]);
                entry.as_array_mut().unwrap().push(Value::Object(item));
            } else {
                object.insert(key.clone(), value.clone());
            }
        }
        Value::Object(object).to_string()
    }
}

/// A row naming its token by authentication code.
fn by_code(code: &str) -> Row {
    Row::default().with(KEY_CODE, code)
}

/// A row naming its token by identifier and pass code.
fn by_identifier(identifier: &str, pass_code: &str) -> Row {
    Row::default()
        .with(KEY_IDENTIFIER, identifier)
        .with(KEY_PASS_CODE, pass_code)
}

fn render_csv(rows: &[Row]) -> String {
    let mut columns: Vec<&str> = Vec::new();
    for (key, _) in rows.iter().flat_map(|row| &row.0) {
        if !columns.contains(&key.as_str()) {
            columns.push(key);
        }
    }
    let mut out = columns.join(",") + "\n";
    for row in rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|column| row.get(column).map_or_else(String::new, csv_cell))
            .collect();
        out += &cells.join(",");
        out.push('\n');
    }
    out
}

fn csv_cell(value: &Value) -> String {
    match value {
        Value::Null => "\\N".to_owned(),
        Value::String(text) if text.contains([',', '"', '\n', '\r']) => {
            format!("\"{}\"", text.replace('"', "\"\""))
        }
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A row and the error it must give as (field, code), or `None` when it must pass.
type Case = (Row, Option<(&'static str, &'static str)>);

/// Drops `rows` as the file `stem` in `format`, runs `--run-now` with skip-row, and gives
/// the file's name and the exit code.
fn run(env: &TestEnv, format: Format, stem: &str, rows: &[Row]) -> (String, i32) {
    let name = format.file(stem);
    env.drop_file(&name, format.render(rows));
    (name, env.run_now_with(SKIP_ROW))
}

/// Runs the cases as one file and checks that exactly the failing rows fail, each with its
/// one error, and the exit code that goes with it. Gives the file's name.
fn run_cases(env: &TestEnv, format: Format, stem: &str, cases: &[Case]) -> String {
    let rows: Vec<Row> = cases.iter().map(|(row, _)| row.clone()).collect();
    let (name, exit) = run(env, format, stem, &rows);
    let expected: Vec<_> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, (_, error))| {
            let line = Some(format.line(i));
            error.map(|(field, code)| (line, Some(field.to_owned()), code.to_owned()))
        })
        .collect();
    assert_eq!(env.errors(&name), expected, "errors of {name}");
    let report = env.report(&name);
    assert_eq!(report["rows_total"], cases.len(), "{name}: {report}");
    assert_eq!(report["rows_failed"], expected.len(), "{name}: {report}");
    assert_eq!(
        exit,
        i32::from(!expected.is_empty()),
        "exit code for {name}"
    );
    name
}

/// Checks the status and the row counts of a report, and that they add up (SPEC 4.1).
fn assert_counts(
    env: &TestEnv,
    name: &str,
    status: &str,
    applied: u64,
    unchanged: u64,
    failed: u64,
) {
    let report = env.report(name);
    assert_eq!(report["status"], status, "{name}: {report}");
    assert_eq!(report["rows_applied"], applied, "{name}: {report}");
    assert_eq!(report["rows_unchanged"], unchanged, "{name}: {report}");
    assert_eq!(report["rows_failed"], failed, "{name}: {report}");
    assert_eq!(
        report["rows_total"],
        applied + unchanged + failed,
        "{name}: {report}"
    );
}

/// Inserts a token with this authentication code, then sets `assignments` (SQL, may be
/// empty) on it. Gives its id.
async fn insert(env: &TestEnv, code: &str, assignments: &str) -> Uuid {
    let id = env.insert_token(code).await;
    if !assignments.is_empty() {
        env.exec(&format!(
            "UPDATE access_tokens SET {assignments} WHERE id = '{id}'"
        ))
        .await;
    }
    id
}

/// A classification with these flags; gives its id.
async fn classification(env: &TestEnv, name: &str, auto_generate: bool, card: bool) -> Uuid {
    let sql = "INSERT INTO access_token_classifications \
               (name, auto_generate_authentication_code, credit_card) \
               VALUES ($1, $2, $3) RETURNING id";
    let row = env
        .client
        .query_one(sql, &[&name, &auto_generate, &card])
        .await;
    row.unwrap().get(0)
}

/// One column of the token with this id, as text (`None` for null).
async fn column_of(env: &TestEnv, id: Uuid, column: &str) -> Option<String> {
    let sql = format!("SELECT {column}::text FROM access_tokens WHERE id = $1");
    env.client.query_one(&sql, &[&id]).await.unwrap().get(0)
}

/// `custom_fields` of the token with this authentication code.
async fn custom_fields(env: &TestEnv, code: &str) -> Value {
    let sql = "SELECT custom_fields FROM access_tokens WHERE authentication_code = $1";
    env.client.query_one(sql, &[&code]).await.unwrap().get(0)
}

/// The text of every report of `name` (not the batch file itself), for leak checks.
fn report_texts(env: &TestEnv, name: &str) -> String {
    [".report.json", ".errors.jsonl", ".results.jsonl"]
        .iter()
        .filter_map(|suffix| env.processed(name, suffix))
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect()
}

/// An Argon2id PHC hash of `pass_code`, as tokensync stores them.
fn hash(pass_code: &str) -> String {
    Argon2::default()
        .hash_password(pass_code.as_bytes())
        .unwrap()
        .to_string()
}

fn verifies(hash: &str, pass_code: &str) -> bool {
    Argon2::default()
        .verify_password(pass_code.as_bytes(), hash)
        .is_ok()
}

/// Whether `code` looks generated: 16 characters from `A-Z0-9`.
fn is_generated(code: &str) -> bool {
    code.len() == 16
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// A user-defined column, the SQL of its old value, that value as text, and a new value.
struct Udf {
    column: String,
    old_sql: &'static str,
    old: &'static str,
    new: Value,
}

fn udfs() -> Vec<Udf> {
    let udf = |column: String, old_sql, old, new| Udf {
        column,
        old_sql,
        old,
        new,
    };
    let new_text = json!("new, \"quoted\" ✓");
    let strings = (1..=8).map(|n| udf(format!("udf_string_{n}"), "'old'", "old", new_text.clone()));
    let floats = (1..=4).map(|n| udf(format!("udf_float_{n}"), "1.5", "1.5", json!(-2.25)));
    let dates = (1..=4).map(|n| {
        udf(
            format!("udf_date_{n}"),
            "'2020-01-31'",
            "2020-01-31",
            json!("2026-12-03"),
        )
    });
    strings.chain(floats).chain(dates).collect()
}

/// Every user-defined column of the token with this authentication code, as text.
async fn udf_values(env: &TestEnv, udfs: &[Udf], code: &str) -> Vec<Option<String>> {
    let columns: Vec<String> = udfs.iter().map(|u| format!("{}::text", u.column)).collect();
    let sql = format!(
        "SELECT {} FROM access_tokens WHERE authentication_code = $1",
        columns.join(", ")
    );
    let row = env.client.query_one(&sql, &[&code]).await.unwrap();
    (0..udfs.len()).map(|i| row.get(i)).collect()
}

/// `udf_string_1..8`, `udf_float_1..4`, `udf_date_1..4`: absent leaves the old value, null
/// clears it, a value sets it, and no other column of the token moves.
#[tokio::test]
async fn udf_fields_have_three_states() {
    let udfs = udfs();
    let all_old: Vec<String> = udfs
        .iter()
        .map(|u| format!("{} = {}", u.column, u.old_sql))
        .collect();
    let all_old = all_old.join(", ");
    for format in FORMATS {
        let env = TestEnv::new().await;
        let mut rows = Vec::new();
        for udf in &udfs {
            for state in ["absent", "null", "value"] {
                let code = format!("{}-{state}", udf.column);
                insert(&env, &code, &all_old).await;
                rows.push(match state {
                    "absent" => by_code(&code),
                    "null" => by_code(&code).with(&udf.column, NULL),
                    _ => by_code(&code).with(&udf.column, udf.new.clone()),
                });
            }
        }

        let (name, exit) = run(&env, format, "udf", &rows);

        assert_eq!(exit, 0, "{format:?}");
        assert_counts(&env, &name, "applied", 32, 16, 0);
        for udf in &udfs {
            for state in ["absent", "null", "value"] {
                let code = format!("{}-{state}", udf.column);
                let values = udf_values(&env, &udfs, &code).await;
                for (other, value) in udfs.iter().zip(values) {
                    let expected = match state {
                        _ if other.column != udf.column => Some(other.old.to_owned()),
                        "absent" => Some(udf.old.to_owned()),
                        "null" => None,
                        _ => Some(udf.new.as_str().map_or(udf.new.to_string(), str::to_owned)),
                    };
                    assert_eq!(value, expected, "{format:?}: {code}, {}", other.column);
                }
            }
        }
    }
}

/// `authentication_code`: absent keeps it; a value replaces it (and a later row names the
/// token by it); a value another token has is DUPLICATE_VALUE; null is NOT_NULLABLE unless
/// codes are generated, by the token's classification or by `access_token_definition`, and
/// then the token gets a new 16-character `A-Z0-9` code.
#[tokio::test]
async fn authentication_code_three_states_and_generated_codes() {
    let field = "authentication_code";
    for format in FORMATS {
        let env = TestEnv::new().await;
        let auto = classification(&env, "auto", true, false).await;
        let manual = classification(&env, "manual", false, false).await;
        insert(&env, "KEEP", "").await;
        let renamed = insert(&env, "RENAME", "").await;
        let plain = insert(&env, "PLAIN", "").await;
        let manual = insert(&env, "MANUAL", &format!("classification_id = '{manual}'")).await;
        let auto = insert(&env, "AUTO", &format!("classification_id = '{auto}'")).await;
        insert(&env, "SAME", "").await;
        insert(&env, "TAKEN", "").await;
        let reuse = insert(&env, "REUSE", "").await;

        let cases: [Case; 10] = [
            (by_code("KEEP").with("udf_string_1", "touched"), None),
            (by_code("RENAME").with(field, "RENAMED"), None),
            (
                by_code("RENAMED").with("udf_string_1", "found by new code"),
                None,
            ),
            (
                by_code("PLAIN").with(field, NULL),
                Some((field, "NOT_NULLABLE")),
            ),
            (
                by_code("MANUAL").with(field, NULL),
                Some((field, "NOT_NULLABLE")),
            ),
            (by_code("AUTO").with(field, NULL), None),
            (by_code("SAME").with(field, "SAME"), None),
            (
                by_code("TAKEN").with(field, "KEEP"),
                Some((field, "DUPLICATE_VALUE")),
            ),
            // Earlier rows count: RENAMED is now taken, and RENAME free again.
            (
                by_code("TAKEN").with(field, "RENAMED"),
                Some((field, "DUPLICATE_VALUE")),
            ),
            (by_code("REUSE").with(field, "RENAME"), None),
        ];
        let name = run_cases(&env, format, "codes", &cases);

        assert_counts(&env, &name, "partially_applied", 5, 1, 4);
        let reuse_code = column_of(&env, reuse, field).await;
        assert_eq!(reuse_code.as_deref(), Some("RENAME"), "{format:?}");
        let keep = env.column("KEEP", "udf_string_1").await;
        assert_eq!(keep.as_deref(), Some("touched"), "{format:?}");
        let renamed_code = column_of(&env, renamed, field).await;
        assert_eq!(renamed_code.as_deref(), Some("RENAMED"), "{format:?}");
        let renamed_udf = column_of(&env, renamed, "udf_string_1").await;
        assert_eq!(
            renamed_udf.as_deref(),
            Some("found by new code"),
            "{format:?}"
        );
        assert_eq!(
            column_of(&env, plain, field).await.as_deref(),
            Some("PLAIN")
        );
        assert_eq!(
            column_of(&env, manual, field).await.as_deref(),
            Some("MANUAL")
        );
        let generated = column_of(&env, auto, field).await.unwrap();
        assert!(is_generated(&generated), "{format:?}: {generated:?}");
        assert_eq!(env.column("TAKEN", "udf_string_1").await, None);

        // Generated by the definition, whatever the classification says.
        env.exec("UPDATE access_token_definition SET auto_generate_authentication_code = true")
            .await;
        let cases: [Case; 2] = [
            (by_code("PLAIN").with(field, NULL), None),
            (by_code("MANUAL").with(field, NULL), None),
        ];
        let name = run_cases(&env, format, "generated", &cases);
        assert_counts(&env, &name, "applied", 2, 0, 0);
        let plain_code = column_of(&env, plain, field).await.unwrap();
        let manual_code = column_of(&env, manual, field).await.unwrap();
        assert!(is_generated(&plain_code), "{format:?}: {plain_code:?}");
        assert!(is_generated(&manual_code), "{format:?}: {manual_code:?}");
        assert_ne!(plain_code, manual_code);
    }
}

/// `identifier`: absent keeps it; a value sets it when the token is left with a pass code
/// (stored, or given in the row), else PASS_CODE_REQUIRED; another token's identifier is
/// DUPLICATE_VALUE; null is NOT_NULLABLE unless `allow_no_identifier_and_pass_code`.
#[tokio::test]
async fn identifier_three_states() {
    let stored = hash("Stored-Secret-1");
    let field = "identifier";
    for format in FORMATS {
        let env = TestEnv::new().await;
        let with_pass =
            |identifier: &str| format!("identifier = '{identifier}', pass_code_hash = '{stored}'");
        for (code, identifier) in [("KEEP", "keep-id"), ("SET", "set-id"), ("NULL", "null-id")] {
            insert(&env, code, &with_pass(identifier)).await;
        }
        insert(&env, "TAKEN", &with_pass("taken-id")).await;
        insert(&env, "SAME", &with_pass("same-id")).await;
        insert(&env, "STORED", &format!("pass_code_hash = '{stored}'")).await;
        insert(&env, "NOPASS", "").await;
        insert(&env, "GIVEN", "").await;

        let cases: [Case; 9] = [
            (by_code("KEEP").with("udf_string_1", "touched"), None),
            (by_code("SET").with(field, "new-id"), None),
            (
                by_code("NULL").with(field, NULL),
                Some((field, "NOT_NULLABLE")),
            ),
            (
                by_code("TAKEN").with(field, "keep-id"),
                Some((field, "DUPLICATE_VALUE")),
            ),
            (
                by_code("TAKEN").with(field, "new-id"),
                Some((field, "DUPLICATE_VALUE")),
            ),
            (by_code("SAME").with(field, "same-id"), None),
            (by_code("STORED").with(field, "stored-id"), None),
            (
                by_code("NOPASS").with(field, "nopass-id"),
                Some(("pass_code", "PASS_CODE_REQUIRED")),
            ),
            (
                by_code("GIVEN")
                    .with(field, "given-id")
                    .with("pass_code", "Given-Secret-2"),
                None,
            ),
        ];
        let name = run_cases(&env, format, "identifiers", &cases);

        assert_counts(&env, &name, "partially_applied", 4, 1, 4);
        let expected = [
            ("KEEP", Some("keep-id")),
            ("SET", Some("new-id")),
            ("NULL", Some("null-id")),
            ("TAKEN", Some("taken-id")),
            ("SAME", Some("same-id")),
            ("STORED", Some("stored-id")),
            ("NOPASS", None),
            ("GIVEN", Some("given-id")),
        ];
        for (code, identifier) in expected {
            let actual = env.column(code, field).await;
            assert_eq!(actual.as_deref(), identifier, "{format:?}: {code}");
        }
        let given = env.column("GIVEN", "pass_code_hash").await.unwrap();
        assert!(verifies(&given, "Given-Secret-2"), "{format:?}");

        env.exec("UPDATE access_token_definition SET allow_no_identifier_and_pass_code = true")
            .await;
        let cases: [Case; 3] = [
            (by_code("NULL").with(field, NULL), None),
            (
                by_code("KEEP").with(field, NULL).with("pass_code", NULL),
                None,
            ),
            (
                by_code("NOPASS")
                    .with(field, "nopass-id")
                    .with("pass_code", NULL),
                Some(("pass_code", "PASS_CODE_REQUIRED")),
            ),
        ];
        run_cases(&env, format, "cleared", &cases);
        assert_eq!(env.column("NULL", field).await, None, "{format:?}");
        let kept_hash = env.column("NULL", "pass_code_hash").await;
        assert_eq!(kept_hash.as_deref(), Some(stored.as_str()), "{format:?}");
        assert_eq!(env.column("KEEP", field).await, None, "{format:?}");
        assert_eq!(
            env.column("KEEP", "pass_code_hash").await,
            None,
            "{format:?}"
        );
        assert_eq!(env.column("NOPASS", field).await, None, "{format:?}");
    }
}

/// `pass_code`: a value is stored only as an Argon2id PHC hash of it (never in clear, in
/// the database or the reports), absent keeps the hash, null is NOT_NULLABLE unless
/// `allow_no_identifier_and_pass_code`, and then PASS_CODE_REQUIRED while the token keeps
/// an identifier.
#[tokio::test]
async fn pass_code_three_states() {
    let old = hash("Old-Secret-1");
    let new = "New Secret ✓ 2";
    let field = "pass_code";
    for format in FORMATS {
        let env = TestEnv::new().await;
        for code in ["KEEP", "NULL"] {
            insert(&env, code, &format!("pass_code_hash = '{old}'")).await;
        }
        for (code, identifier) in [("SET", "set-id"), ("HASID", "has-id"), ("BOTH", "both-id")] {
            let assignments = format!("identifier = '{identifier}', pass_code_hash = '{old}'");
            insert(&env, code, &assignments).await;
        }

        let cases: [Case; 3] = [
            (by_code("KEEP").with("udf_string_1", "touched"), None),
            (by_code("SET").with(field, new), None),
            (
                by_code("NULL").with(field, NULL),
                Some((field, "NOT_NULLABLE")),
            ),
        ];
        let name = run_cases(&env, format, "pass-codes", &cases);

        assert_counts(&env, &name, "partially_applied", 2, 0, 1);
        let keep = env.column("KEEP", "pass_code_hash").await;
        assert_eq!(keep.as_deref(), Some(old.as_str()), "{format:?}");
        let null = env.column("NULL", "pass_code_hash").await;
        assert_eq!(null.as_deref(), Some(old.as_str()), "{format:?}");
        let set = env.column("SET", "pass_code_hash").await.unwrap();
        assert!(set.starts_with("$argon2id$"), "{format:?}: {set}");
        assert!(verifies(&set, new), "{format:?}");
        assert!(!verifies(&set, "Old-Secret-1"), "{format:?}");
        assert!(
            !env.tokens_snapshot().await.contains("New Secret"),
            "{format:?}"
        );
        assert!(
            !report_texts(&env, &name).contains("New Secret"),
            "{format:?}"
        );

        env.exec("UPDATE access_token_definition SET allow_no_identifier_and_pass_code = true")
            .await;
        let cases: [Case; 4] = [
            (by_code("NULL").with(field, NULL), None),
            (
                by_code("HASID").with(field, NULL),
                Some((field, "PASS_CODE_REQUIRED")),
            ),
            (
                by_code("BOTH").with(field, NULL).with("identifier", NULL),
                None,
            ),
            (
                by_identifier("set-id", new).with("udf_string_1", "signed in"),
                None,
            ),
        ];
        run_cases(&env, format, "cleared", &cases);
        assert_eq!(
            env.column("NULL", "pass_code_hash").await,
            None,
            "{format:?}"
        );
        let has_id = env.column("HASID", "pass_code_hash").await;
        assert_eq!(has_id.as_deref(), Some(old.as_str()), "{format:?}");
        assert_eq!(
            env.column("BOTH", "pass_code_hash").await,
            None,
            "{format:?}"
        );
        assert_eq!(env.column("BOTH", "identifier").await, None, "{format:?}");
        let signed_in = env.column("SET", "udf_string_1").await;
        assert_eq!(signed_in.as_deref(), Some("signed in"), "{format:?}");
    }
}

/// `card_masked_number`: three states on a credit-card token; CARD_NOT_APPLICABLE on any
/// other token (with or without a classification); UNMASKED_CARD_NUMBER for 12 to 19
/// digits once spaces and dashes are gone, and the number is echoed in no report.
#[tokio::test]
async fn card_masked_number_three_states_and_rules() {
    let field = "card_masked_number";
    let unmasked = "UNMASKED_CARD_NUMBER";
    for format in FORMATS {
        let env = TestEnv::new().await;
        let card = classification(&env, "card", false, true).await;
        let plain = classification(&env, "plain", false, false).await;
        let on_card = format!("classification_id = '{card}', card_masked_number = '**** 0000'");
        for code in ["ABSENT", "NULL", "VALUE", "SPACES", "DASHES", "DIGITS"] {
            insert(&env, code, &on_card).await;
        }
        insert(&env, "PLAIN", &format!("classification_id = '{plain}'")).await;
        insert(&env, "NOCLASS", "").await;

        let cases: [Case; 8] = [
            (by_code("ABSENT").with("udf_string_1", "touched"), None),
            (by_code("NULL").with(field, NULL), None),
            (by_code("VALUE").with(field, "4111 11** **** 1111"), None),
            (
                by_code("SPACES").with(field, "4111 1111 1111 1111"),
                Some((field, unmasked)),
            ),
            (
                by_code("DASHES").with(field, "4111-1111-1111-1111"),
                Some((field, unmasked)),
            ),
            (
                by_code("DIGITS").with(field, "411111111111"),
                Some((field, unmasked)),
            ),
            (
                by_code("PLAIN").with(field, "**** 1111"),
                Some((field, "CARD_NOT_APPLICABLE")),
            ),
            (
                by_code("NOCLASS").with(field, NULL),
                Some((field, "CARD_NOT_APPLICABLE")),
            ),
        ];
        let name = run_cases(&env, format, "cards", &cases);

        assert_counts(&env, &name, "partially_applied", 3, 0, 5);
        let expected = [
            ("ABSENT", Some("**** 0000")),
            ("NULL", None),
            ("VALUE", Some("4111 11** **** 1111")),
            ("SPACES", Some("**** 0000")),
            ("DASHES", Some("**** 0000")),
            ("DIGITS", Some("**** 0000")),
            ("PLAIN", None),
        ];
        for (code, card) in expected {
            let actual = env.column(code, field).await;
            assert_eq!(actual.as_deref(), card, "{format:?}: {code}");
        }
        let reports = report_texts(&env, &name);
        for number in ["1111 1111", "1111-1111", "411111111111"] {
            assert!(
                !reports.contains(number),
                "{format:?}: {number} in {reports}"
            );
        }
    }
}

/// `custom_field_set` with each data type: absent keeps the field, null (and, in JSON, "")
/// removes it, a value sets it, stored in `custom_fields` with its JSON type.
#[tokio::test]
async fn custom_fields_of_every_data_type_have_three_states() {
    let old = json!({
        "tier": "silver", "visits": 1, "score": 0.5, "vip": false, "since": "2020-01-31"
    });
    let new = [
        ("tier", json!("gold, \"plus\"")),
        ("visits", json!(12)),
        ("score", json!(2.5)),
        ("vip", json!(true)),
        ("since", json!("2026-12-03")),
    ];
    for format in FORMATS {
        let env = TestEnv::new().await;
        env.exec(CUSTOM_DEFINITIONS).await;
        // An empty cell of CSV is "not specified": only JSON can give "".
        let states: &[&str] = match format {
            Format::Csv => &["absent", "null", "value"],
            Format::Jsonl => &["absent", "null", "empty", "value"],
        };
        let mut rows = Vec::new();
        for (field, value) in &new {
            for state in states {
                let code = format!("{field}-{state}");
                insert(&env, &code, &format!("custom_fields = '{old}'")).await;
                let key = format!("custom_field_set.{field}");
                rows.push(match *state {
                    "absent" => by_code(&code),
                    "null" => by_code(&code).with(&key, NULL),
                    "empty" => by_code(&code).with(&key, ""),
                    _ => by_code(&code).with(&key, value.clone()),
                });
            }
        }

        let (name, exit) = run(&env, format, "custom", &rows);

        assert_eq!(exit, 0, "{format:?}");
        let changed = (new.len() * (states.len() - 1)) as u64;
        assert_counts(&env, &name, "applied", changed, new.len() as u64, 0);
        for (field, value) in &new {
            for state in states {
                let code = format!("{field}-{state}");
                let mut expected = old.clone();
                match *state {
                    "absent" => {}
                    "null" | "empty" => {
                        expected.as_object_mut().unwrap().remove(*field);
                    }
                    _ => expected[*field] = value.clone(),
                }
                let actual = custom_fields(&env, &code).await;
                assert_eq!(actual, expected, "{format:?}: {code}");
            }
        }
    }
}

/// A custom field's value must fit its data type: INVALID_VALUE for text that does not
/// parse, and in JSON INVALID_TYPE for a value of the wrong JSON type.
#[tokio::test]
async fn custom_field_values_must_fit_their_data_type() {
    let invalid = Some("INVALID_VALUE");
    let wrong_type = Some("INVALID_TYPE");
    for format in FORMATS {
        let checks: Vec<(&str, Value, Option<&str>)> = match format {
            Format::Csv => vec![
                ("visits", json!("1.5"), invalid),
                ("visits", json!("ten"), invalid),
                ("visits", json!("-7"), None),
                ("score", json!("NaN"), invalid),
                ("score", json!("inf"), invalid),
                ("score", json!("-0.25"), None),
                ("vip", json!("yes"), invalid),
                ("vip", json!("false"), None),
                ("since", json!("2026-2-3"), invalid),
                ("since", json!("2026-02-30"), invalid),
                ("since", json!("2024-02-29"), None),
            ],
            Format::Jsonl => vec![
                ("tier", json!(7), wrong_type),
                ("visits", json!("12"), wrong_type),
                ("visits", json!(1.5), invalid),
                ("visits", json!(-7), None),
                ("score", json!("2.5"), wrong_type),
                ("score", json!(-0.25), None),
                ("vip", json!("true"), wrong_type),
                ("vip", json!(false), None),
                ("since", json!(20261203), wrong_type),
                ("since", json!("2026-02-30"), invalid),
                ("since", json!("2024-02-29"), None),
            ],
        };
        let env = TestEnv::new().await;
        env.exec(CUSTOM_DEFINITIONS).await;
        let mut rows = Vec::new();
        let mut expected_errors = Vec::new();
        for (i, (field, value, code)) in checks.iter().enumerate() {
            let token = format!("T{i}");
            insert(&env, &token, "").await;
            rows.push(by_code(&token).with(&format!("custom_field_set.{field}"), value.clone()));
            if let Some(code) = code {
                let field = Some(format!("custom_field_set.{field}"));
                expected_errors.push((Some(format.line(i)), field, (*code).to_owned()));
            }
        }

        let (name, exit) = run(&env, format, "custom-types", &rows);

        assert_eq!(exit, 1, "{format:?}");
        assert_eq!(env.errors(&name), expected_errors, "{format:?}");
        for (i, (field, value, code)) in checks.iter().enumerate() {
            let actual = custom_fields(&env, &format!("T{i}")).await;
            let expected = match code {
                Some(_) => json!({}),
                // A CSV cell's text becomes the typed value.
                None => match (format, value) {
                    (Format::Csv, Value::String(text)) if *field != "since" => {
                        json!({ *field: serde_json::from_str::<Value>(text).unwrap() })
                    }
                    _ => json!({ *field: value }),
                },
            };
            assert_eq!(actual, expected, "{format:?}: row {i}");
        }
    }
}

/// An unknown custom field name is UNKNOWN_CUSTOM_FIELD (and the row's other custom fields
/// are not applied); a row that gives no custom field (in JSON an empty list) changes
/// nothing.
#[tokio::test]
async fn unknown_custom_fields_and_empty_lists() {
    for format in FORMATS {
        let env = TestEnv::new().await;
        env.exec(CUSTOM_DEFINITIONS).await;
        for code in ["UNKNOWN", "EMPTY"] {
            insert(&env, code, r#"custom_fields = '{"tier": "silver"}'"#).await;
        }
        let empty = match format {
            Format::Csv => by_code("EMPTY"),
            Format::Jsonl => by_code("EMPTY").with("custom_field_set", json!([])),
        };
        let unknown = by_code("UNKNOWN")
            .with("custom_field_set.tier", "gold")
            .with("custom_field_set.nope", "x");
        let cases: [Case; 2] = [
            (
                unknown,
                Some(("custom_field_set.nope", "UNKNOWN_CUSTOM_FIELD")),
            ),
            (empty, None),
        ];
        let name = run_cases(&env, format, "custom-names", &cases);

        assert_counts(&env, &name, "partially_applied", 0, 1, 1);
        for code in ["UNKNOWN", "EMPTY"] {
            let actual = custom_fields(&env, code).await;
            assert_eq!(actual, json!({"tier": "silver"}), "{format:?}: {code}");
        }
    }
}

/// A custom field named twice: in JSON the row fails with DUPLICATE_CUSTOM_FIELD; in CSV
/// the repeated column rejects the whole file with INVALID_HEADER.
#[tokio::test]
async fn a_custom_field_named_twice() {
    let env = TestEnv::new().await;
    env.exec(CUSTOM_DEFINITIONS).await;
    insert(&env, "T1", "").await;
    insert(&env, "T2", "").await;
    let twice = by_code("T1").with("custom_field_set", json!([{"tier": "a"}, {"tier": "b"}]));
    let rows = [twice, by_code("T2").with("custom_field_set.tier", "c")];
    let (name, exit) = run(&env, Format::Jsonl, "twice", &rows);
    assert_eq!(exit, 1);
    let field = Some("custom_field_set.tier".to_owned());
    assert_eq!(
        env.errors(&name),
        [(Some(1), field, "DUPLICATE_CUSTOM_FIELD".to_owned())]
    );
    assert_counts(&env, &name, "partially_applied", 1, 0, 1);
    assert_eq!(custom_fields(&env, "T1").await, json!({}));
    assert_eq!(custom_fields(&env, "T2").await, json!({"tier": "c"}));

    let header = format!("{KEY_CODE},custom_field_set.tier,custom_field_set.tier\n");
    env.drop_file("twice.csv", header + "T1,a,b\nT2,d,\n");
    assert_eq!(env.run_now_with(SKIP_ROW), 1);
    assert_eq!(env.report("twice.csv")["status"], "rejected");
    let errors = env.errors("twice.csv");
    assert_eq!(errors, [(None, None, "INVALID_HEADER".to_owned())]);
    assert_eq!(custom_fields(&env, "T1").await, json!({}));
    assert_eq!(custom_fields(&env, "T2").await, json!({"tier": "c"}));
}

/// JSON `"custom_field_set": null` removes every custom field of the token (a documented
/// choice of `update::CustomFieldsPatch::Clear`).
#[tokio::test]
async fn a_null_custom_field_set_clears_every_custom_field() {
    let env = TestEnv::new().await;
    env.exec(CUSTOM_DEFINITIONS).await;
    insert(
        &env,
        "T1",
        r#"custom_fields = '{"tier": "gold", "visits": 3}'"#,
    )
    .await;
    let cases: [Case; 1] = [(by_code("T1").with("custom_field_set", NULL), None)];
    let name = run_cases(&env, Format::Jsonl, "clear", &cases);
    assert_counts(&env, &name, "applied", 1, 0, 0);
    assert_eq!(custom_fields(&env, "T1").await, json!({}));
}

/// `access_token_identifier`: none, or both keys, is IDENTIFIER_REQUIRED; `identifier`
/// without `pass_code` is PASS_CODE_REQUIRED; `authentication_code` with `pass_code` is
/// PASS_CODE_NOT_APPLICABLE. Failing rows change nothing.
#[tokio::test]
async fn the_token_is_named_by_exactly_one_key() {
    let key = "access_token_identifier";
    for format in FORMATS {
        let env = TestEnv::new().await;
        let stored = hash("Stored-Secret-1");
        insert(
            &env,
            "T1",
            &format!("identifier = 'id-1', pass_code_hash = '{stored}'"),
        )
        .await;
        let set = |row: Row| row.with("udf_string_1", "changed");
        let cases: [Case; 6] = [
            (set(Row::default()), Some((key, "IDENTIFIER_REQUIRED"))),
            (
                set(by_code("T1").with(KEY_IDENTIFIER, "id-1")),
                Some((key, "IDENTIFIER_REQUIRED")),
            ),
            (
                set(by_code("T1")
                    .with(KEY_IDENTIFIER, "id-1")
                    .with(KEY_PASS_CODE, "x")),
                Some((key, "IDENTIFIER_REQUIRED")),
            ),
            (
                set(by_code("T1").with(KEY_PASS_CODE, "Stored-Secret-1")),
                Some((KEY_PASS_CODE, "PASS_CODE_NOT_APPLICABLE")),
            ),
            (
                set(Row::default().with(KEY_IDENTIFIER, "id-1")),
                Some((KEY_PASS_CODE, "PASS_CODE_REQUIRED")),
            ),
            (
                set(Row::default().with(KEY_PASS_CODE, "Stored-Secret-1")),
                Some((key, "IDENTIFIER_REQUIRED")),
            ),
        ];
        let name = run_cases(&env, format, "keys", &cases);

        assert_counts(&env, &name, "rejected", 0, 0, 6);
        assert_eq!(env.column("T1", "udf_string_1").await, None, "{format:?}");
    }
}

/// Identification by `identifier` + `pass_code`: the right pass code finds the token (also
/// one set by an earlier row of the file); a wrong pass code, an unknown identifier and a
/// token without a pass code all give ACCESS_TOKEN_NOT_FOUND with the same message, which
/// quotes no secret.
#[tokio::test]
async fn identification_by_identifier_and_pass_code() {
    let alice = hash("Alice-Secret-1");
    let not_found = Some(("access_token_identifier", "ACCESS_TOKEN_NOT_FOUND"));
    for format in FORMATS {
        let env = TestEnv::new().await;
        insert(
            &env,
            "ALICE",
            &format!("identifier = 'alice', pass_code_hash = '{alice}'"),
        )
        .await;
        insert(&env, "BOB", "").await;
        insert(&env, "NOPASS", "identifier = 'nopass'").await;
        let mark = |row: Row, text: &str| row.with("udf_string_1", text);

        let cases: [Case; 7] = [
            (
                mark(by_identifier("alice", "Alice-Secret-1"), "alice in"),
                None,
            ),
            (
                mark(by_identifier("alice", "Wrong-Secret-9"), "wrong"),
                not_found,
            ),
            (
                mark(by_identifier("nobody", "Alice-Secret-1"), "nobody"),
                not_found,
            ),
            (
                by_code("BOB")
                    .with("identifier", "bob")
                    .with("pass_code", "Bob-Secret-2"),
                None,
            ),
            (mark(by_identifier("bob", "Bob-Secret-2"), "bob in"), None),
            (
                mark(by_identifier("nopass", "Alice-Secret-1"), "nopass"),
                not_found,
            ),
            (mark(by_code("GHOST-CODE"), "ghost"), not_found),
        ];
        let name = run_cases(&env, format, "login", &cases);

        assert_counts(&env, &name, "partially_applied", 3, 0, 4);
        let alice_udf = env.column("ALICE", "udf_string_1").await;
        assert_eq!(alice_udf.as_deref(), Some("alice in"), "{format:?}");
        let bob_udf = env.column("BOB", "udf_string_1").await;
        assert_eq!(bob_udf.as_deref(), Some("bob in"), "{format:?}");
        let bob_hash = env.column("BOB", "pass_code_hash").await.unwrap();
        assert!(bob_hash.starts_with("$argon2id$"), "{format:?}: {bob_hash}");
        assert!(verifies(&bob_hash, "Bob-Secret-2"), "{format:?}");
        assert_eq!(
            env.column("NOPASS", "udf_string_1").await,
            None,
            "{format:?}"
        );

        let errors = env.report_lines(&name, ".errors.jsonl");
        let messages: Vec<&Value> = errors.iter().map(|e| &e["message"]).collect();
        assert_eq!(messages.len(), 4, "{format:?}");
        assert!(messages[0].is_string(), "{format:?}: {messages:?}");
        // A wrong pass code reads exactly like an unknown identifier.
        assert_eq!(messages[0], messages[1], "{format:?}");
        assert_eq!(messages[0], messages[2], "{format:?}");
        let reports = report_texts(&env, &name);
        for secret in ["Secret-1", "Secret-2", "Secret-9", "GHOST-CODE"] {
            assert!(
                !reports.contains(secret),
                "{format:?}: {secret} in {reports}"
            );
        }
    }
}

/// Lengths: strings count Unicode characters (255 allowed, 256 refused), a pass code
/// counts bytes (1–128), values are stored as given (no trimming), and, in JSON, an empty
/// string is refused for `authentication_code`, `identifier` and `pass_code` but allowed
/// for a `udf_string`.
#[tokio::test]
async fn lengths_count_characters_and_pass_codes_count_bytes() {
    let invalid = "INVALID_VALUE";
    let long_chars = "é".repeat(255);
    let too_long = "a".repeat(256);
    for format in FORMATS {
        let env = TestEnv::new().await;
        let card = classification(&env, "card", false, true).await;
        let stored = hash("Stored-Secret-1");
        for i in 0..20 {
            let assignments = format!("classification_id = '{card}', pass_code_hash = '{stored}'");
            insert(&env, &format!("T{i}"), &assignments).await;
        }
        let mut cases: Vec<Case> = vec![
            (
                by_code("T0").with("udf_string_1", long_chars.as_str()),
                None,
            ),
            (
                by_code("T1").with("udf_string_1", too_long.as_str()),
                Some(("udf_string_1", invalid)),
            ),
            (
                by_code("T2").with("authentication_code", long_chars.as_str()),
                None,
            ),
            (
                by_code("T3").with("authentication_code", too_long.as_str()),
                Some(("authentication_code", invalid)),
            ),
            (by_code("T4").with("identifier", "ü".repeat(255)), None),
            (
                by_code("T5").with("identifier", too_long.as_str()),
                Some(("identifier", invalid)),
            ),
            (
                by_code("T6").with("card_masked_number", "*".repeat(255)),
                None,
            ),
            (
                by_code("T7").with("card_masked_number", "*".repeat(256)),
                Some(("card_masked_number", invalid)),
            ),
            (by_code("T8").with("pass_code", "p".repeat(128)), None),
            (
                by_code("T9").with("pass_code", "p".repeat(129)),
                Some(("pass_code", invalid)),
            ),
            (by_code("T10").with("pass_code", "é".repeat(64)), None),
            (
                by_code("T11").with("pass_code", "é".repeat(65)),
                Some(("pass_code", invalid)),
            ),
            (by_code("T12").with("udf_string_2", "  padded  "), None),
        ];
        if format == Format::Jsonl {
            cases.extend([
                (
                    by_code("T13").with("authentication_code", ""),
                    Some(("authentication_code", invalid)),
                ),
                (
                    by_code("T14").with("identifier", ""),
                    Some(("identifier", invalid)),
                ),
                (
                    by_code("T15").with("pass_code", ""),
                    Some(("pass_code", invalid)),
                ),
                (by_code("T16").with("udf_string_3", ""), None),
            ]);
        }
        let name = run_cases(&env, format, "lengths", &cases);

        let failed = cases.iter().filter(|(_, error)| error.is_some()).count() as u64;
        let applied = cases.len() as u64 - failed;
        assert_counts(&env, &name, "partially_applied", applied, 0, failed);
        let udf = env.column(&long_chars, "udf_string_1").await;
        assert_eq!(udf, None, "{format:?}: T2 now has the 255-character code");
        assert_eq!(
            env.column("T0", "udf_string_1").await,
            Some(long_chars.clone())
        );
        assert_eq!(env.column("T1", "udf_string_1").await, None, "{format:?}");
        assert_eq!(env.column("T4", "identifier").await, Some("ü".repeat(255)));
        assert_eq!(
            env.column("T6", "card_masked_number").await,
            Some("*".repeat(255))
        );
        let long_pass = env.column("T8", "pass_code_hash").await.unwrap();
        assert!(verifies(&long_pass, &"p".repeat(128)), "{format:?}");
        let wide_pass = env.column("T10", "pass_code_hash").await.unwrap();
        assert!(verifies(&wide_pass, &"é".repeat(64)), "{format:?}");
        let refused = env.column("T11", "pass_code_hash").await;
        assert_eq!(refused.as_deref(), Some(stored.as_str()), "{format:?}");
        let padded = env.column("T12", "udf_string_2").await;
        assert_eq!(padded.as_deref(), Some("  padded  "), "{format:?}");
        if format == Format::Jsonl {
            assert_eq!(env.column("T16", "udf_string_3").await.as_deref(), Some(""));
            assert_eq!(env.column("T14", "identifier").await, None);
        }
    }
}

/// `udf_float_N` takes a finite number: NaN, infinities and non-numbers are INVALID_VALUE
/// in CSV; in JSON anything but a number is INVALID_TYPE.
#[tokio::test]
async fn udf_floats_must_be_finite_numbers() {
    let field = "udf_float_1";
    for format in FORMATS {
        let checks: Vec<(Value, Result<&str, &str>)> = match format {
            Format::Csv => vec![
                (json!("NaN"), Err("INVALID_VALUE")),
                (json!("inf"), Err("INVALID_VALUE")),
                (json!("-infinity"), Err("INVALID_VALUE")),
                (json!("1,5"), Err("INVALID_VALUE")),
                (json!("abc"), Err("INVALID_VALUE")),
                (json!("1e3"), Ok("1000")),
                (json!("-0.125"), Ok("-0.125")),
            ],
            Format::Jsonl => vec![
                (json!("1.5"), Err("INVALID_TYPE")),
                (json!("NaN"), Err("INVALID_TYPE")),
                (json!(true), Err("INVALID_TYPE")),
                (json!([1.5]), Err("INVALID_TYPE")),
                (json!(1e3), Ok("1000")),
                (json!(3), Ok("3")),
                (json!(-0.125), Ok("-0.125")),
            ],
        };
        let env = TestEnv::new().await;
        let mut cases: Vec<Case> = Vec::new();
        for (i, (value, outcome)) in checks.iter().enumerate() {
            let code = format!("T{i}");
            insert(&env, &code, "udf_float_1 = 42").await;
            cases.push((
                by_code(&code).with(field, value.clone()),
                outcome.err().map(|c| (field, c)),
            ));
        }
        run_cases(&env, format, "floats", &cases);
        for (i, (_, outcome)) in checks.iter().enumerate() {
            let expected = outcome.unwrap_or("42");
            let actual = env.column(&format!("T{i}"), field).await;
            assert_eq!(actual.as_deref(), Some(expected), "{format:?}: row {i}");
        }
    }
}

/// `udf_date_N` takes exactly `YYYY-MM-DD` (a real date); anything else is INVALID_VALUE,
/// and in JSON a value that is not a string is INVALID_TYPE.
#[tokio::test]
async fn udf_dates_are_exactly_yyyy_mm_dd() {
    let field = "udf_date_1";
    let invalid = Some((field, "INVALID_VALUE"));
    for format in FORMATS {
        let mut checks: Vec<(Value, Option<(&str, &str)>)> = vec![
            (json!("2026-2-3"), invalid),
            (json!("2026-02-30"), invalid),
            (json!("20261203"), invalid),
            (json!("03/12/2026"), invalid),
            (json!("2026-12-03T00:00:00"), invalid),
            (json!(" 2026-12-03"), invalid),
            (json!("2024-02-29"), None),
        ];
        if format == Format::Jsonl {
            checks.push((json!(20261203), Some((field, "INVALID_TYPE"))));
        }
        let env = TestEnv::new().await;
        let mut cases: Vec<Case> = Vec::new();
        for (i, (value, error)) in checks.iter().enumerate() {
            let code = format!("T{i}");
            insert(&env, &code, "udf_date_1 = '2000-01-01'").await;
            cases.push((by_code(&code).with(field, value.clone()), *error));
        }
        run_cases(&env, format, "dates", &cases);
        for (i, (value, error)) in checks.iter().enumerate() {
            let expected = match error {
                Some(_) => "2000-01-01",
                None => value.as_str().unwrap(),
            };
            let actual = env.column(&format!("T{i}"), field).await;
            assert_eq!(actual.as_deref(), Some(expected), "{format:?}: row {i}");
        }
    }
}

/// JSON types are strict (INVALID_TYPE), a key not in SPEC 1 is UNKNOWN_FIELD (at the top
/// and inside `access_token_identifier`), and a row names every field at fault. In CSV, an
/// unknown column rejects the whole file (INVALID_HEADER).
#[tokio::test]
async fn json_types_are_strict_and_unknown_keys_are_refused() {
    let env = TestEnv::new().await;
    for i in 0..10 {
        insert(&env, &format!("T{i}"), "").await;
    }
    let wrong = "INVALID_TYPE";
    let rows = [
        by_code("T0").with("udf_float_1", "1.5"),
        by_code("T1").with("udf_string_1", 7),
        by_code("T2").with("udf_date_1", true),
        by_code("T3").with("authentication_code", 123),
        by_code("T4").with("identifier", json!(["a"])),
        by_code("T5").with("colour", "red"),
        by_code("T6").with("access_token_identifier.colour", 1),
        by_code("T7").with("token", "a-session-token"),
        by_code("T8")
            .with("udf_float_2", "x")
            .with("udf_string_2", 1),
        by_code("T9")
            .with("udf_string_1", "good")
            .with("udf_float_1", 1),
    ];
    let (name, exit) = run(&env, Format::Jsonl, "types", &rows);

    assert_eq!(exit, 1);
    let error = |line: u64, field: &str, code: &str| (Some(line), Some(field.into()), code.into());
    let expected = vec![
        error(1, "udf_float_1", wrong),
        error(2, "udf_string_1", wrong),
        error(3, "udf_date_1", wrong),
        error(4, "authentication_code", wrong),
        error(5, "identifier", wrong),
        error(6, "colour", "UNKNOWN_FIELD"),
        error(7, "access_token_identifier.colour", "UNKNOWN_FIELD"),
        error(8, "token", "UNKNOWN_FIELD"),
        error(9, "udf_float_2", wrong),
        error(9, "udf_string_2", wrong),
    ];
    assert_eq!(env.errors(&name), expected);
    assert_counts(&env, &name, "partially_applied", 1, 0, 9);
    assert_eq!(env.report(&name)["errors_by_code"][wrong], 7);
    assert_eq!(env.column("T9", "udf_float_1").await.as_deref(), Some("1"));
    for i in 0..9 {
        let code = format!("T{i}");
        assert_eq!(env.column(&code, "udf_string_1").await, None, "{code}");
        assert_eq!(
            env.column(&code, "(updated_at = created_at)")
                .await
                .as_deref(),
            Some("true")
        );
    }

    let before = env.tokens_snapshot().await;
    env.drop_file("colour.csv", format!("{KEY_CODE},colour\nT0,red\n"));
    assert_eq!(env.run_now_with(SKIP_ROW), 1);
    assert_eq!(env.report("colour.csv")["status"], "rejected");
    let errors = env.errors("colour.csv");
    assert_eq!(errors, [(None, None, "INVALID_HEADER".to_owned())]);
    assert_eq!(env.tokens_snapshot().await, before);
}

/// `fields_set` (a comma-separated string, or in JSON a list) makes `.results.jsonl` hold,
/// for that row, exactly those fields as after the update: dates as `YYYY-MM-DD`, custom
/// fields as a `custom_field_set` list of one-key objects. A row without it (or, by the
/// source's choice, with null) has no result; an unknown name or `pass_code` is
/// UNKNOWN_FIELD_IN_FIELDS_SET.
#[tokio::test]
async fn fields_set_selects_what_the_result_holds() {
    let unknown = Some(("fields_set", "UNKNOWN_FIELD_IN_FIELDS_SET"));
    for format in FORMATS {
        let env = TestEnv::new().await;
        env.exec(CUSTOM_DEFINITIONS).await;
        let first = insert(
            &env,
            "R1",
            r#"custom_fields = '{"tier": "gold", "visits": 3}'"#,
        )
        .await;
        for code in ["R2", "R3", "R4", "R5", "R6"] {
            insert(&env, code, "").await;
        }
        let list = match format {
            Format::Csv => json!("udf_float_1,identifier"),
            Format::Jsonl => json!(["udf_float_1", "identifier"]),
        };
        let first_fields = "id,authentication_code,udf_string_1,udf_date_1,custom_field_set";
        let cases: [Case; 6] = [
            (
                by_code("R1")
                    .with("udf_string_1", "new")
                    .with("udf_date_1", "2026-12-03")
                    .with("custom_field_set.since", "2026-01-02")
                    .with("fields_set", first_fields),
                None,
            ),
            (by_code("R2").with("udf_string_1", "no result"), None),
            (
                by_code("R3")
                    .with("udf_float_1", 2.5)
                    .with("fields_set", list),
                None,
            ),
            (
                by_code("R4")
                    .with("udf_string_1", "x")
                    .with("fields_set", "udf_string_1,pass_code"),
                unknown,
            ),
            (
                by_code("R5")
                    .with("udf_string_1", "x")
                    .with("fields_set", "colour"),
                unknown,
            ),
            (
                by_code("R6")
                    .with("udf_string_1", "null")
                    .with("fields_set", NULL),
                None,
            ),
        ];
        let name = run_cases(&env, format, "fields", &cases);

        assert_counts(&env, &name, "partially_applied", 4, 0, 2);
        assert_eq!(env.column("R4", "udf_string_1").await, None, "{format:?}");
        assert_eq!(env.column("R5", "udf_string_1").await, None, "{format:?}");
        let results = env.report_lines(&name, ".results.jsonl");
        let lines: Vec<&Value> = results.iter().map(|r| &r["line"]).collect();
        assert_eq!(
            lines,
            [format.line(0), format.line(2)],
            "{format:?}: {results:?}"
        );

        let token = results[0]["access_token"].as_object().unwrap();
        let mut keys: Vec<&str> = token.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut wanted: Vec<&str> = first_fields.split(',').collect();
        wanted.sort_unstable();
        assert_eq!(keys, wanted, "{format:?}");
        assert_eq!(token["id"], first.to_string(), "{format:?}");
        assert_eq!(token["authentication_code"], "R1", "{format:?}");
        assert_eq!(token["udf_string_1"], "new", "{format:?}");
        assert_eq!(token["udf_date_1"], "2026-12-03", "{format:?}");
        let mut custom: Vec<String> = token["custom_field_set"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                assert_eq!(
                    item.as_object().map(Map::len),
                    Some(1),
                    "{format:?}: {item}"
                );
                item.to_string()
            })
            .collect();
        custom.sort();
        let expected = [
            r#"{"since":"2026-01-02"}"#,
            r#"{"tier":"gold"}"#,
            r#"{"visits":3}"#,
        ];
        assert_eq!(custom, expected, "{format:?}");
        let third = &results[1]["access_token"];
        assert_eq!(
            *third,
            json!({"udf_float_1": 2.5, "identifier": null}),
            "{format:?}"
        );
    }
}

/// `rows_unchanged` counts rows that found their token but changed no value (setting a
/// value it already has, naming no field, clearing what is already null); such rows do
/// not touch `updated_at`. A batch without `fields_set` leaves no `.results.jsonl`.
#[tokio::test]
async fn rows_unchanged_counts_rows_that_change_nothing() {
    for format in FORMATS {
        let env = TestEnv::new().await;
        env.exec(CUSTOM_DEFINITIONS).await;
        let old_time = "updated_at = '2020-01-01T00:00:00Z'";
        let same = r#"udf_string_1 = 'same', custom_fields = '{"tier": "gold"}'"#;
        let same = format!("{same}, {old_time}");
        insert(&env, "SAME", &same).await;
        insert(&env, "OTHER", old_time).await;

        let cases: [Case; 6] = [
            (by_code("SAME").with("udf_string_1", "same"), None),
            (by_code("SAME"), None),
            (by_code("SAME").with("custom_field_set.tier", "gold"), None),
            (by_code("SAME").with("udf_float_1", NULL), None),
            (by_code("OTHER").with("udf_string_1", "changed"), None),
            (
                by_code("MISSING").with("udf_string_1", "x"),
                Some(("access_token_identifier", "ACCESS_TOKEN_NOT_FOUND")),
            ),
        ];
        let name = run_cases(&env, format, "unchanged", &cases);

        assert_counts(&env, &name, "partially_applied", 1, 4, 1);
        let report = env.report(&name);
        assert_eq!(
            report["errors_by_code"],
            json!({"ACCESS_TOKEN_NOT_FOUND": 1})
        );
        let batches = env.batches().await;
        assert_eq!(batches.len(), 1, "{format:?}");
        let (_, status, total, applied, failed) = &batches[0];
        assert_eq!(
            (status.as_str(), *total, *applied, *failed),
            ("partially_applied", 6, 1, 1)
        );
        let stale = "(updated_at < '2021-01-01')";
        assert_eq!(
            env.column("SAME", stale).await.as_deref(),
            Some("true"),
            "{format:?}"
        );
        assert_eq!(
            env.column("OTHER", stale).await.as_deref(),
            Some("false"),
            "{format:?}"
        );
        assert!(
            env.processed(&name, ".results.jsonl").is_none(),
            "{format:?}"
        );
    }
}

/// PostgreSQL's text cannot hold the NUL character: a value with one is refused as
/// `INVALID_VALUE` on its own row (it would otherwise fail the whole batch at the database,
/// and the file would stay in incoming for ever). A pass code, only ever hashed, may hold
/// one.
#[tokio::test]
async fn nul_characters_are_refused_where_postgresql_stores_text() {
    let invalid = "INVALID_VALUE";
    for format in FORMATS {
        let env = TestEnv::new().await;
        env.exec(CUSTOM_DEFINITIONS).await;
        for i in 0..6 {
            insert(&env, &format!("N{i}"), "").await;
        }
        let cases: Vec<Case> = vec![
            (
                by_code("N0").with("udf_string_1", "a\u{0}b"),
                Some(("udf_string_1", invalid)),
            ),
            (
                by_code("N1").with("identifier", "id\u{0}"),
                Some(("identifier", invalid)),
            ),
            (
                by_code("N2").with("custom_field_set.tier", "g\u{0}ld"),
                Some(("custom_field_set.tier", invalid)),
            ),
            (
                by_code("N3\u{0}").with("udf_string_1", "x"),
                Some((KEY_CODE, invalid)),
            ),
            (by_code("N4").with("pass_code", "p\u{0}ss"), None),
            (by_code("N5").with("udf_string_1", "fine"), None),
        ];
        let name = run_cases(&env, format, "nul", &cases);

        assert_counts(&env, &name, "partially_applied", 2, 0, 4);
        assert_eq!(env.column("N0", "udf_string_1").await, None);
        assert_eq!(
            env.column("N5", "udf_string_1").await.as_deref(),
            Some("fine")
        );
        let hash = env.column("N4", "pass_code_hash").await.unwrap();
        assert!(verifies(&hash, "p\u{0}ss"), "{format:?}");
    }
}
