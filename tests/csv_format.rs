//! The file formats of SPEC 2.2–2.4 and the file-level errors of SPEC 3: CSV quoting, byte
//! order marks, line ends, blank lines, null markers, header faults, row faults, gzip, size
//! limits, line numbers and the `.rejects.*` copies of failed rows.

mod common;

use common::TestEnv;
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The header most tests use: the token's code and three plain fields.
const HEADER: &str = "access_token_identifier.authentication_code,udf_string_1,udf_float_1";

/// `apply.on_row_error = "skip-row"`, so that good rows are applied beside failed ones.
const SKIP_ROW: &[(&str, &str)] = &[("TOKENSYNC_APPLY_ON_ROW_ERROR", "skip-row")];

/// `bytes` compressed with gzip.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A JSON Lines row naming the token `code`, with more `fields` (JSON object members).
fn json_row(code: &str, fields: &str) -> String {
    format!(r#"{{"access_token_identifier": {{"authentication_code": "{code}"}}, {fields}}}"#)
}

/// The permission bits of a file.
fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The lines and codes of the errors of `name`, without the fields.
fn lines_and_codes(env: &TestEnv, name: &str) -> Vec<(Option<u64>, String)> {
    env.errors(name)
        .into_iter()
        .map(|(line, _, code)| (line, code))
        .collect()
}

/// Asserts that `name` was rejected as a whole with the one file-level error `code`: exit 1,
/// moved to `failed/` beside its report, `line` and `field` null, nothing applied.
async fn assert_file_rejected(env: &TestEnv, name: &str, exit: i32, code: &str, before: &str) {
    assert_eq!(exit, 1, "a rejected file exits 1");
    let report = env.report(name);
    assert_eq!(report["status"], "rejected");
    assert_eq!(report["rows_applied"], 0);
    assert_eq!(report["rows_unchanged"], 0);
    assert_eq!(report["errors_by_code"][code], 1, "{report}");
    let errors = env.report_lines(name, ".errors.jsonl");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0]["line"].is_null(), "{errors:?}");
    assert!(errors[0]["field"].is_null(), "{errors:?}");
    assert_eq!(errors[0]["code"], code);
    let moved = env.processed(name, "").expect("the file is kept");
    assert!(moved.starts_with(env.failed()), "{moved:?}");
    assert!(
        env.processed(name, ".report.json")
            .unwrap()
            .starts_with(env.failed())
    );
    assert!(env.names_in(&env.incoming()).is_empty());
    assert_eq!(
        env.tokens_snapshot().await,
        before,
        "a rejected file changes nothing"
    );
    let batches = env.batches().await;
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].1, "rejected");
    assert_eq!(batches[0].3, 0, "no row counted as applied");
}

/// A UTF-8 byte-order mark before the header and CRLF line ends are read like plain LF text.
#[tokio::test]
async fn bom_and_crlf_line_ends_are_accepted() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    env.insert_token("AC2").await;
    let text = format!("\u{feff}{HEADER}\r\nAC1,gold,1.5\r\nAC2,silver,\r\n");
    env.drop_file("bom.csv", text);

    assert_eq!(env.run_now_with(&[]), 0);

    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("gold")
    );
    assert_eq!(
        env.column("AC1", "udf_float_1").await.as_deref(),
        Some("1.5")
    );
    // The CR of the line end is not part of the last cell's value.
    assert_eq!(
        env.column("AC2", "udf_string_1").await.as_deref(),
        Some("silver")
    );
    assert_eq!(env.column("AC2", "udf_float_1").await, None);
    let report = env.report("bom.csv");
    assert_eq!(report["status"], "applied");
    assert_eq!(report["format"], "csv");
    assert_eq!(report["rows_total"], 2);
    assert_eq!(report["rows_applied"], 2);
    assert!(env.errors("bom.csv").is_empty());
}

/// Quoted cells keep commas, doubled quotes and newlines; a row's line is the line on which it
/// starts, so the rows after a multi-line cell still get the right line numbers.
#[tokio::test]
async fn quoted_cells_keep_commas_quotes_and_newlines() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    env.insert_token("AC2").await;
    let text = format!(
        "{HEADER}\n\
         AC1,\"a,\"\"b\"\"\nc\",1.5\n\
         NOPE1,\"x\ny\",\n\
         AC2,\"plain, quoted\",\n\
         NOPE2,z,\n"
    );
    env.drop_file("quoted.csv", text);

    assert_eq!(env.run_now_with(SKIP_ROW), 1);

    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("a,\"b\"\nc")
    );
    assert_eq!(
        env.column("AC1", "udf_float_1").await.as_deref(),
        Some("1.5")
    );
    assert_eq!(
        env.column("AC2", "udf_string_1").await.as_deref(),
        Some("plain, quoted")
    );
    // Header on line 1, AC1 on lines 2-3, NOPE1 on lines 4-5, AC2 on 6, NOPE2 on 7.
    assert_eq!(
        lines_and_codes(&env, "quoted.csv"),
        [
            (Some(4), "ACCESS_TOKEN_NOT_FOUND".to_owned()),
            (Some(7), "ACCESS_TOKEN_NOT_FOUND".to_owned()),
        ]
    );
    let report = env.report("quoted.csv");
    assert_eq!(report["status"], "partially_applied");
    assert_eq!(report["rows_total"], 4);
    assert_eq!(report["rows_applied"], 2);
    assert_eq!(report["rows_failed"], 2);
}

/// Blank lines between rows are skipped, and the line numbers still count them.
#[tokio::test]
async fn blank_lines_are_skipped_and_counted() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    env.insert_token("AC2").await;
    let text = format!("{HEADER}\n\nAC1,gold,\n\n\nNOPE,x,\nAC2,silver,\n\n");
    env.drop_file("blank.csv", text);

    assert_eq!(env.run_now_with(SKIP_ROW), 1);

    assert_eq!(
        lines_and_codes(&env, "blank.csv"),
        [(Some(6), "ACCESS_TOKEN_NOT_FOUND".to_owned())]
    );
    let report = env.report("blank.csv");
    assert_eq!(report["rows_total"], 3, "blank lines are no rows");
    assert_eq!(report["rows_applied"], 2);
    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("gold")
    );
    assert_eq!(
        env.column("AC2", "udf_string_1").await.as_deref(),
        Some("silver")
    );
}

/// Blank lines with CRLF line ends are skipped too, and counted in line numbers.
#[tokio::test]
async fn blank_crlf_lines_are_skipped_and_counted() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let text = format!("{HEADER}\r\n\r\nAC1,gold,\r\n\r\n\r\nNOPE,x,\r\n\r\n");
    env.drop_file("blank.csv", text);

    assert_eq!(env.run_now_with(SKIP_ROW), 1);

    assert_eq!(
        lines_and_codes(&env, "blank.csv"),
        [(Some(6), "ACCESS_TOKEN_NOT_FOUND".to_owned())]
    );
    assert_eq!(env.report("blank.csv")["rows_total"], 2);
    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("gold")
    );
}

/// `\N` sets a field to null (and removes a custom field); an empty cell leaves it alone.
#[tokio::test]
async fn null_marker_is_null_and_empty_cell_is_not_specified() {
    let env = TestEnv::new().await;
    env.exec(
        "INSERT INTO custom_field_definitions (name, data_type) VALUES ('tier', 'string'), \
         ('region', 'string');
         INSERT INTO access_tokens (authentication_code, udf_string_1, udf_string_2, \
         udf_float_1, udf_date_1, custom_fields) VALUES ('AC1', 'keep', 'drop', 2.5, \
         '2026-01-02', '{\"tier\": \"gold\", \"region\": \"EU\"}');",
    )
    .await;
    let text = "access_token_identifier.authentication_code,udf_string_1,udf_string_2,\
                udf_float_1,udf_date_1,custom_field_set.tier,custom_field_set.region\n\
                AC1,,\\N,\\N,,\\N,\n";
    env.drop_file("nulls.csv", text);

    assert_eq!(env.run_now_with(&[]), 0);

    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("keep")
    );
    assert_eq!(env.column("AC1", "udf_string_2").await, None);
    assert_eq!(env.column("AC1", "udf_float_1").await, None);
    assert_eq!(
        env.column("AC1", "udf_date_1").await.as_deref(),
        Some("2026-01-02")
    );
    let custom: serde_json::Value =
        serde_json::from_str(&env.column("AC1", "custom_fields").await.unwrap()).unwrap();
    assert_eq!(custom, serde_json::json!({"region": "EU"}));
    assert_eq!(env.report("nulls.csv")["rows_applied"], 1);
}

/// A column name that is not a key of the update method rejects the whole file with
/// `INVALID_HEADER` (line null), even under skip-row, and the file goes to `failed/`.
#[tokio::test]
async fn unknown_column_rejects_the_whole_file() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let before = env.tokens_snapshot().await;
    let text = "access_token_identifier.authentication_code,udf_string_1,colour\nAC1,gold,red\n";
    env.drop_file("unknown.csv", text);

    let exit = env.run_now_with(SKIP_ROW);

    assert_file_rejected(&env, "unknown.csv", exit, "INVALID_HEADER", &before).await;
}

/// A column named twice rejects the whole file with `INVALID_HEADER`.
#[tokio::test]
async fn repeated_column_rejects_the_whole_file() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let before = env.tokens_snapshot().await;
    let text = "access_token_identifier.authentication_code,udf_string_1,udf_string_1\nAC1,a,b\n";
    env.drop_file("repeated.csv", text);

    let exit = env.run_now_with(SKIP_ROW);

    assert_file_rejected(&env, "repeated.csv", exit, "INVALID_HEADER", &before).await;
}

/// A header that is not UTF-8 rejects the whole file with `INVALID_HEADER`.
#[tokio::test]
async fn non_utf8_header_rejects_the_whole_file() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let before = env.tokens_snapshot().await;
    let mut bytes = b"access_token_identifier.authentication_code,udf_string_\xff\n".to_vec();
    bytes.extend_from_slice(b"AC1,x\n");
    env.drop_file("header.csv", bytes);

    let exit = env.run_now_with(SKIP_ROW);

    assert_file_rejected(&env, "header.csv", exit, "INVALID_HEADER", &before).await;
}

/// A row with too few or too many cells is `MALFORMED_ROW` for that row only.
#[tokio::test]
async fn wrong_cell_count_is_malformed_for_that_row_only() {
    let env = TestEnv::new().await;
    for code in ["AC1", "AC2", "AC3", "AC4"] {
        env.insert_token(code).await;
    }
    let text = format!("{HEADER}\nAC1,gold,\nAC2,short\nAC3,bronze,\nAC4,x,1,extra\n");
    env.drop_file("short.csv", text);

    assert_eq!(env.run_now_with(SKIP_ROW), 1);

    assert_eq!(
        lines_and_codes(&env, "short.csv"),
        [
            (Some(3), "MALFORMED_ROW".to_owned()),
            (Some(5), "MALFORMED_ROW".to_owned()),
        ]
    );
    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("gold")
    );
    assert_eq!(env.column("AC2", "udf_string_1").await, None);
    assert_eq!(
        env.column("AC3", "udf_string_1").await.as_deref(),
        Some("bronze")
    );
    assert_eq!(env.column("AC4", "udf_string_1").await, None);
    let report = env.report("short.csv");
    assert_eq!(report["status"], "partially_applied");
    assert_eq!(report["rows_failed"], 2);
    assert_eq!(report["errors_by_code"]["MALFORMED_ROW"], 2);
}

/// A cell that is not UTF-8 fails its row with `INVALID_ENCODING`; the other rows are read and
/// applied.
#[tokio::test]
async fn non_utf8_cell_fails_only_its_row() {
    let env = TestEnv::new().await;
    for code in ["AC1", "AC2", "AC3"] {
        env.insert_token(code).await;
    }
    let mut bytes = format!("{HEADER}\nAC1,gold,\nAC2,").into_bytes();
    bytes.extend_from_slice(b"caf\xe9,\nAC3,bronze,2\n");
    env.drop_file("latin1.csv", bytes);

    assert_eq!(env.run_now_with(SKIP_ROW), 1);

    assert_eq!(
        lines_and_codes(&env, "latin1.csv"),
        [(Some(3), "INVALID_ENCODING".to_owned())]
    );
    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("gold")
    );
    assert_eq!(env.column("AC2", "udf_string_1").await, None);
    assert_eq!(
        env.column("AC3", "udf_string_1").await.as_deref(),
        Some("bronze")
    );
    assert_eq!(env.column("AC3", "udf_float_1").await.as_deref(), Some("2"));
    assert_eq!(env.report("latin1.csv")["rows_applied"], 2);
}

/// `csv.delimiter` set to `;` from the environment: commas are then plain characters.
#[tokio::test]
async fn semicolon_delimiter_from_the_environment() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let text = "access_token_identifier.authentication_code;udf_string_1;udf_float_1\n\
                AC1;a,b;2.25\n";
    env.drop_file("semi.csv", text);

    assert_eq!(env.run_now_with(&[("TOKENSYNC_CSV_DELIMITER", ";")]), 0);

    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("a,b")
    );
    assert_eq!(
        env.column("AC1", "udf_float_1").await.as_deref(),
        Some("2.25")
    );
    assert_eq!(env.report("semi.csv")["status"], "applied");
}

/// Gzip-compressed CSV and JSON Lines files are decompressed and applied; line numbers count
/// the decompressed lines.
#[tokio::test]
async fn gzip_csv_and_json_lines_are_applied() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    env.insert_token("AC2").await;
    let csv = format!("{HEADER}\nAC1,from-csv,\nNOPE,x,\n");
    env.drop_file("a.csv.gz", gzip(csv.as_bytes()));
    let jsonl = "{\"access_token_identifier\": {\"authentication_code\": \"AC2\"}, \
                 \"udf_string_1\": \"from-jsonl\", \"udf_float_1\": 3.5}\n";
    env.drop_file("b.jsonl.gz", gzip(jsonl.as_bytes()));

    assert_eq!(env.run_now_with(SKIP_ROW), 1, "a.csv.gz has a failed row");

    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("from-csv")
    );
    assert_eq!(
        env.column("AC2", "udf_string_1").await.as_deref(),
        Some("from-jsonl")
    );
    assert_eq!(
        env.column("AC2", "udf_float_1").await.as_deref(),
        Some("3.5")
    );
    let csv_report = env.report("a.csv.gz");
    assert_eq!(csv_report["status"], "partially_applied");
    assert_eq!(csv_report["format"], "csv");
    assert_eq!(
        lines_and_codes(&env, "a.csv.gz"),
        [(Some(3), "ACCESS_TOKEN_NOT_FOUND".to_owned())]
    );
    let jsonl_report = env.report("b.jsonl.gz");
    assert_eq!(jsonl_report["status"], "applied");
    assert_eq!(jsonl_report["format"], "jsonl");
    assert!(
        env.processed("b.jsonl.gz", "")
            .unwrap()
            .starts_with(env.archive())
    );
}

/// A gzip stream cut short is `CORRUPT_FILE`: the rows read before the break are not applied.
#[tokio::test]
async fn broken_gzip_is_a_corrupt_file() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let before = env.tokens_snapshot().await;
    let mut text = format!("{HEADER}\n");
    for i in 0..200 {
        text.push_str(&format!("AC1,value-{i},{i}\n"));
    }
    let compressed = gzip(text.as_bytes());
    let broken = &compressed[..compressed.len() * 2 / 3];
    env.drop_file("broken.csv.gz", broken);

    let exit = env.run_now_with(SKIP_ROW);

    assert_file_rejected(&env, "broken.csv.gz", exit, "CORRUPT_FILE", &before).await;
}

/// A file that is not gzip at all under a `.gz` name is `CORRUPT_FILE`.
#[tokio::test]
async fn not_gzip_under_a_gz_name_is_a_corrupt_file() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let before = env.tokens_snapshot().await;
    env.drop_file("plain.jsonl.gz", "{\"udf_string_1\": \"x\"}\n");

    let exit = env.run_now_with(&[]);

    assert_file_rejected(&env, "plain.jsonl.gz", exit, "CORRUPT_FILE", &before).await;
}

/// A plain file over `apply.max_file_bytes` is rejected with `FILE_TOO_LARGE`.
#[tokio::test]
async fn plain_file_over_max_file_bytes_is_too_large() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let before = env.tokens_snapshot().await;
    let text = format!("{HEADER}\nAC1,{},\n", "x".repeat(200));
    env.drop_file("big.csv", text);

    let exit = env.run_now_with(&[("TOKENSYNC_APPLY_MAX_FILE_BYTES", "150")]);

    assert_file_rejected(&env, "big.csv", exit, "FILE_TOO_LARGE", &before).await;
}

/// The size limit applies once decompressed: a small gzip that inflates past it is rejected.
#[tokio::test]
async fn gzip_over_max_file_bytes_once_decompressed_is_too_large() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let before = env.tokens_snapshot().await;
    let mut text = format!("{HEADER}\n");
    for _ in 0..100 {
        text.push_str("AC1,same-value-again,\n");
    }
    let compressed = gzip(text.as_bytes());
    assert!(
        compressed.len() < 500 && text.len() > 2000,
        "{}",
        compressed.len()
    );
    env.drop_file("bomb.csv.gz", compressed);

    let exit = env.run_now_with(&[("TOKENSYNC_APPLY_MAX_FILE_BYTES", "1000")]);

    assert_file_rejected(&env, "bomb.csv.gz", exit, "FILE_TOO_LARGE", &before).await;
}

/// A file of exactly `apply.max_file_bytes` is still accepted.
#[tokio::test]
async fn file_of_exactly_max_file_bytes_is_accepted() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let text = format!("{HEADER}\nAC1,fits,\n");
    let size = text.len().to_string();
    env.drop_file("exact.csv", text);

    assert_eq!(
        env.run_now_with(&[("TOKENSYNC_APPLY_MAX_FILE_BYTES", &size)]),
        0
    );

    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("fits")
    );
    assert_eq!(env.report("exact.csv")["status"], "applied");
}

/// JSON Lines: blank (and whitespace-only) lines are skipped, and every row keeps the number
/// of the line it is on.
#[tokio::test]
async fn json_lines_skip_blank_lines_and_keep_line_numbers() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    env.insert_token("AC2").await;
    let text = format!(
        "\n{}\n\n   \r\n{}\n{}\n\n{}\n",
        json_row("AC1", r#""udf_string_1": "a""#),
        json_row("NOPE", r#""udf_string_1": "b""#),
        json_row("AC2", r#""colour": "red""#),
        json_row("AC2", r#""udf_string_1": "c""#),
    );
    env.drop_file("rows.jsonl", text);

    assert_eq!(env.run_now_with(SKIP_ROW), 1);

    assert_eq!(
        lines_and_codes(&env, "rows.jsonl"),
        [
            (Some(5), "ACCESS_TOKEN_NOT_FOUND".to_owned()),
            (Some(6), "UNKNOWN_FIELD".to_owned()),
        ]
    );
    assert_eq!(env.errors("rows.jsonl")[1].1.as_deref(), Some("colour"));
    let report = env.report("rows.jsonl");
    assert_eq!(report["rows_total"], 4);
    assert_eq!(report["rows_applied"], 2);
    assert_eq!(report["rows_failed"], 2);
    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("a")
    );
    assert_eq!(
        env.column("AC2", "udf_string_1").await.as_deref(),
        Some("c")
    );
}

/// `.rejects.csv` holds the header and the failed rows byte for byte as in the file (CRLF and
/// multi-line quoted cells included), and only the owner may read it.
#[tokio::test]
async fn csv_rejects_copy_header_and_failed_rows_byte_for_byte() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    env.insert_token("AC2").await;
    let header = format!("\u{feff}{HEADER}\r\n");
    let bad1 = "NOPE1,\"multi\r\nline, \"\"quoted\"\"\",\r\n";
    let bad2 = "AC2,x,not-a-number\r\n";
    let text = format!("{header}AC1,ok,\r\n{bad1}AC2,fine,\r\n{bad2}");
    env.drop_file("rej.csv", &text);

    assert_eq!(env.run_now_with(SKIP_ROW), 1);

    let errors = lines_and_codes(&env, "rej.csv");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0], (Some(3), "ACCESS_TOKEN_NOT_FOUND".to_owned()));
    assert_eq!(errors[1].0, Some(6));
    let rejects = env
        .processed("rej.csv", ".rejects.csv")
        .expect("a rejects file");
    assert!(rejects.starts_with(env.archive()));
    let copied = std::fs::read(&rejects).unwrap();
    let expected = format!("{header}{bad1}{bad2}");
    assert_eq!(String::from_utf8_lossy(&copied), expected);
    assert_eq!(mode_of(&rejects), 0o600);
    assert_eq!(
        env.column("AC2", "udf_string_1").await.as_deref(),
        Some("fine")
    );
}

/// `.rejects.jsonl` holds the failed lines byte for byte, mode 0600; a file without failed
/// rows has no rejects file.
#[tokio::test]
async fn jsonl_rejects_copy_failed_lines_byte_for_byte() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    let good = "{\"access_token_identifier\": {\"authentication_code\": \"AC1\"}, \
                \"udf_string_1\": \"ok\"}\n";
    let bad1 = "{\"access_token_identifier\": {\"authentication_code\": \"NOPE\"},  \
                \"udf_string_1\": \"é\"}\n";
    let bad2 = "{\"access_token_identifier\": {\"authentication_code\": \"AC1\"}, \
                \"udf_float_1\": \"1.5\"}\r\n";
    env.drop_file("rej.jsonl", format!("{good}{bad1}\n{bad2}"));
    env.insert_token("AC9").await;
    let clean = "{\"access_token_identifier\": {\"authentication_code\": \"AC9\"}, \
                 \"udf_string_1\": \"clean\"}\n";
    env.drop_file("clean.ndjson", clean);

    assert_eq!(env.run_now_with(SKIP_ROW), 1);

    let errors = lines_and_codes(&env, "rej.jsonl");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0], (Some(2), "ACCESS_TOKEN_NOT_FOUND".to_owned()));
    assert_eq!(errors[1].0, Some(4));
    let rejects = env
        .processed("rej.jsonl", ".rejects.jsonl")
        .expect("a rejects file");
    let copied = std::fs::read(&rejects).unwrap();
    assert_eq!(String::from_utf8_lossy(&copied), format!("{bad1}{bad2}"));
    assert_eq!(mode_of(&rejects), 0o600);
    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("ok")
    );
    assert_eq!(
        env.column("AC9", "udf_string_1").await.as_deref(),
        Some("clean")
    );
    assert_eq!(env.report("clean.ndjson")["status"], "applied");
    assert!(env.processed("clean.ndjson", ".rejects.jsonl").is_none());
    assert!(env.processed("clean.ndjson", ".errors.jsonl").is_none());
}

/// A quote left open makes the rest of the file one record. Once that record is far past
/// `apply.max_row_bytes`, reading stops (the rest is never held in memory) with
/// `ROW_TOO_LARGE` on the line where the record began, and the file is rejected even under
/// `skip-row`: what follows that line cannot be read.
#[tokio::test]
async fn a_quote_left_open_stops_reading_past_max_row_bytes() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    env.insert_token("AC2").await;
    let before = env.tokens_snapshot().await;
    let mut text = format!("{HEADER}\nAC1,gold,1.5\n\nAC2,\"open,\n");
    for n in 0..20_000 {
        text.push_str(&format!("AC{n},filler,1\n"));
    }
    env.drop_file("open.csv", text);

    let exit = env.run_now_with(&[
        ("TOKENSYNC_APPLY_MAX_ROW_BYTES", "1024"),
        ("TOKENSYNC_APPLY_ON_ROW_ERROR", "skip-row"),
    ]);

    assert_eq!(exit, 1, "a rejected file exits 1");
    let report = env.report("open.csv");
    assert_eq!(report["status"], "rejected", "{report}");
    assert_eq!(report["errors_by_code"]["ROW_TOO_LARGE"], 1, "{report}");
    let errors = env.report_lines("open.csv", ".errors.jsonl");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["line"], 4, "{errors:?}");
    assert_eq!(errors[0]["code"], "ROW_TOO_LARGE");
    let moved = env.processed("open.csv", "").expect("the file is kept");
    assert!(moved.starts_with(env.failed()), "{moved:?}");
    assert_eq!(env.tokens_snapshot().await, before, "nothing is applied");
}
