//! Batches as wholes (SPEC 1.4, 2.1, 3 and 4): rows in file order, reject-batch and skip-row,
//! `apply.max_failed_rows`, exactly-once duplicates, pick-up order and filters, archive names
//! and secrets kept out of logs and reports.

mod common;

use common::{TestEnv, is_stamped};
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime};

/// `apply.on_row_error = "skip-row"`.
const SKIP_ROW: (&str, &str) = ("TOKENSYNC_APPLY_ON_ROW_ERROR", "skip-row");

/// A CSV file of `rows` under a header naming the token by authentication code, then
/// `columns`.
fn csv(columns: &str, rows: &[&str]) -> String {
    let mut text = format!("access_token_identifier.authentication_code,{columns}\n");
    for row in rows {
        text.push_str(row);
        text.push('\n');
    }
    text
}

/// The number of tokens that have this authentication code.
async fn count_code(env: &TestEnv, code: &str) -> i64 {
    let row = env
        .client
        .query_one(
            "SELECT count(*) FROM access_tokens WHERE authentication_code = $1",
            &[&code],
        )
        .await
        .unwrap();
    row.get(0)
}

/// Asserts the ledger's rows, in order, as file names and statuses.
async fn assert_ledger(env: &TestEnv, expected: &[(&str, &str)]) {
    let rows: Vec<(String, String)> = env
        .batches()
        .await
        .into_iter()
        .map(|b| (b.0, b.1))
        .collect();
    let rows: Vec<(&str, &str)> = rows.iter().map(|(f, s)| (f.as_str(), s.as_str())).collect();
    assert_eq!(rows, expected);
}

/// The `.report.json` files of a folder, parsed, in name order.
fn reports_in(env: &TestEnv, dir: &Path) -> Vec<Value> {
    env.names_in(dir)
        .into_iter()
        .filter(|name| name.ends_with(".report.json"))
        .map(|name| serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap())
        .collect()
}

/// The lines and codes of the errors of `name`.
fn lines_and_codes(env: &TestEnv, name: &str) -> Vec<(Option<u64>, String)> {
    env.errors(name)
        .into_iter()
        .map(|(line, _, code)| (line, code))
        .collect()
}

/// Everything a run printed, stdout and stderr together.
fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        common::text(&output.stdout),
        common::text(&output.stderr)
    )
}

/// Each authentication code of a chain identifies the token by the code the row before just
/// gave it; a code freed by one row may be taken by a later row.
#[tokio::test]
async fn a_chain_of_authentication_code_changes_follows_file_order() {
    let env = TestEnv::new().await;
    let first = env.insert_token("CHAIN-A").await;
    let second = env.insert_token("OTHER-1").await;
    let text = csv(
        "authentication_code,udf_string_1",
        &[
            "CHAIN-A,CHAIN-B,",
            "CHAIN-B,CHAIN-C,step-two",
            "CHAIN-C,,step-three",
            "OTHER-1,CHAIN-A,",
        ],
    );
    env.drop_file("chain.csv", text);

    assert_eq!(env.run_now_with(&[]), 0);

    let report = env.report("chain.csv");
    assert_eq!(report["status"], "applied");
    assert_eq!(report["rows_applied"], 4);
    assert_eq!(env.column("CHAIN-C", "id").await, Some(first.to_string()));
    assert_eq!(
        env.column("CHAIN-C", "udf_string_1").await.as_deref(),
        Some("step-three")
    );
    assert_eq!(env.column("CHAIN-A", "id").await, Some(second.to_string()));
    assert_eq!(count_code(&env, "CHAIN-B").await, 0);
    assert_eq!(count_code(&env, "OTHER-1").await, 0);
}

/// Two rows on one token: the second sees the first, and a third that sets what is already
/// there counts as unchanged.
#[tokio::test]
async fn a_later_row_on_the_same_token_sees_the_earlier_one() {
    let env = TestEnv::new().await;
    env.insert_token("SAME").await;
    let text = csv(
        "udf_string_1,udf_string_2,udf_float_1",
        &["SAME,one,,1", "SAME,two,b,", "SAME,two,,1"],
    );
    env.drop_file("same.csv", text);

    assert_eq!(env.run_now_with(&[]), 0);

    assert_eq!(
        env.column("SAME", "udf_string_1").await.as_deref(),
        Some("two")
    );
    assert_eq!(
        env.column("SAME", "udf_string_2").await.as_deref(),
        Some("b")
    );
    assert_eq!(
        env.column("SAME", "udf_float_1").await.as_deref(),
        Some("1")
    );
    let report = env.report("same.csv");
    assert_eq!(report["status"], "applied");
    assert_eq!(report["rows_applied"], 2);
    assert_eq!(report["rows_unchanged"], 1);
    assert_eq!(report["rows_total"], 3);
}

/// Under skip-row, a row that fails half-way (its new code checked, then its card refused)
/// leaves no trace: later rows see the token as it was before that row.
#[tokio::test]
async fn skip_row_a_failed_row_leaves_no_trace() {
    let env = TestEnv::new().await;
    env.insert_token("KEEP-1").await;
    env.insert_token("KEEP-2").await;
    let text = csv(
        "authentication_code,udf_string_1,udf_string_2,card_masked_number",
        &[
            "KEEP-1,,first,,",
            "KEEP-1,GHOST-1,ghost,ghost,****1111",
            "GHOST-1,,,via-ghost,",
            "KEEP-1,,,later,",
            "KEEP-2,GHOST-1,,,",
        ],
    );
    env.drop_file("skip.csv", text);

    assert_eq!(env.run_now_with(&[SKIP_ROW]), 1);

    assert_eq!(
        lines_and_codes(&env, "skip.csv"),
        [
            (Some(3), "CARD_NOT_APPLICABLE".to_owned()),
            (Some(4), "ACCESS_TOKEN_NOT_FOUND".to_owned()),
        ]
    );
    assert_eq!(
        env.column("KEEP-1", "udf_string_1").await.as_deref(),
        Some("first")
    );
    assert_eq!(
        env.column("KEEP-1", "udf_string_2").await.as_deref(),
        Some("later")
    );
    assert_eq!(env.column("KEEP-1", "card_masked_number").await, None);
    // The code the failed row would have taken was never taken: a later row can have it.
    assert_eq!(count_code(&env, "KEEP-2").await, 0);
    assert_eq!(env.column("GHOST-1", "udf_string_1").await, None);
    let report = env.report("skip.csv");
    assert_eq!(report["status"], "partially_applied");
    assert_eq!(report["rows_applied"], 3);
    assert_eq!(report["rows_failed"], 2);
}

/// reject-batch (the default): one failing row and nothing of the file is applied, every
/// failing row is still reported, the file goes to `failed/`, no results are kept.
#[tokio::test]
async fn reject_batch_leaves_the_table_byte_for_byte_unchanged() {
    let env = TestEnv::new().await;
    env.exec(
        "INSERT INTO access_tokens (authentication_code, udf_string_1, udf_float_1) VALUES \
         ('RB-1', 'a', 1), ('RB-2', 'b', 2), ('RB-3', 'c', 3);",
    )
    .await;
    let before = env.tokens_snapshot().await;
    let text = csv(
        "authentication_code,udf_string_1,udf_date_1,fields_set",
        &[
            "RB-1,,changed,,id",
            "RB-404,,x,,",
            "RB-2,RB-2-NEW,,2026-05-06,\"id,udf_string_1\"",
            "RB-3,,,2026-13-45,",
            "RB-2-NEW,,again,,",
        ],
    );
    env.drop_file("reject.csv", text);

    assert_eq!(env.run_now_with(&[]), 1);

    assert_eq!(env.tokens_snapshot().await, before);
    assert_eq!(
        lines_and_codes(&env, "reject.csv"),
        [
            (Some(3), "ACCESS_TOKEN_NOT_FOUND".to_owned()),
            (Some(5), "INVALID_VALUE".to_owned()),
        ]
    );
    let report = env.report("reject.csv");
    assert_eq!(report["status"], "rejected");
    assert_eq!(report["rows_total"], 5);
    assert_eq!(report["rows_failed"], 2);
    assert_eq!(report["rows_applied"], 0);
    assert_eq!(report["rows_unchanged"], 0);
    assert!(
        env.processed("reject.csv", "")
            .unwrap()
            .starts_with(env.failed())
    );
    assert!(env.names_in(&env.incoming()).is_empty());
    assert!(env.processed("reject.csv", ".results.jsonl").is_none());
    assert!(env.names_in(&env.archive()).is_empty());
    let batches = env.batches().await;
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].1, "rejected");
    assert_eq!(batches[0].3, 0);
}

/// skip-row with `apply.max_failed_rows = 1`: two failing rows reject the batch as a whole.
#[tokio::test]
async fn skip_row_over_max_failed_rows_rejects_the_batch() {
    let env = TestEnv::new().await;
    env.insert_token("MF-1").await;
    let before = env.tokens_snapshot().await;
    let text = csv(
        "udf_string_1,fields_set",
        &["MF-1,applied?,id", "MF-404,x,", "MF-405,y,"],
    );
    env.drop_file("max.csv", text);

    let exit = env.run_now_with(&[SKIP_ROW, ("TOKENSYNC_APPLY_MAX_FAILED_ROWS", "1")]);

    assert_eq!(exit, 1);
    assert_eq!(env.tokens_snapshot().await, before);
    let report = env.report("max.csv");
    assert_eq!(report["status"], "rejected");
    assert_eq!(report["rows_failed"], 2);
    assert_eq!(report["rows_applied"], 0);
    assert_eq!(env.errors("max.csv").len(), 2);
    assert!(
        env.processed("max.csv", "")
            .unwrap()
            .starts_with(env.failed())
    );
    assert!(env.processed("max.csv", ".results.jsonl").is_none());
}

/// skip-row with `apply.max_failed_rows = 1`: exactly one failing row is still allowed.
#[tokio::test]
async fn skip_row_at_max_failed_rows_is_partially_applied() {
    let env = TestEnv::new().await;
    env.insert_token("MF-1").await;
    let text = csv("udf_string_1", &["MF-1,applied", "MF-404,x"]);
    env.drop_file("max.csv", text);

    let exit = env.run_now_with(&[SKIP_ROW, ("TOKENSYNC_APPLY_MAX_FAILED_ROWS", "1")]);

    assert_eq!(exit, 1);
    assert_eq!(
        env.column("MF-1", "udf_string_1").await.as_deref(),
        Some("applied")
    );
    assert_eq!(env.report("max.csv")["status"], "partially_applied");
}

/// A partially applied batch exits 1, is archived, and its counts add up:
/// `rows_total = rows_applied + rows_unchanged + rows_failed`, in the report and the ledger.
#[tokio::test]
async fn partially_applied_exits_1_and_its_counts_add_up() {
    let env = TestEnv::new().await;
    env.exec(
        "INSERT INTO access_tokens (authentication_code, udf_string_1) VALUES \
         ('PA-1', NULL), ('PA-2', 'same'), ('PA-3', NULL);",
    )
    .await;
    let text = csv(
        "udf_string_1,udf_float_1",
        &[
            "PA-1,new,",
            "PA-2,same,",
            "PA-404,x,",
            "PA-3,,nan",
            "PA-3,,4.5",
        ],
    );
    env.drop_file("partial.csv", text);

    assert_eq!(env.run_now_with(&[SKIP_ROW]), 1);

    let report = env.report("partial.csv");
    assert_eq!(report["status"], "partially_applied");
    assert_eq!(report["rows_total"], 5);
    assert_eq!(report["rows_applied"], 2);
    assert_eq!(report["rows_unchanged"], 1);
    assert_eq!(report["rows_failed"], 2);
    let sum = ["rows_applied", "rows_unchanged", "rows_failed"]
        .iter()
        .map(|key| report[key].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(report["rows_total"].as_u64(), Some(sum));
    assert!(
        env.processed("partial.csv", "")
            .unwrap()
            .starts_with(env.archive())
    );
    assert_eq!(
        env.batches().await,
        [(
            "partial.csv".to_owned(),
            "partially_applied".to_owned(),
            5,
            2,
            2
        )]
    );
    assert_eq!(
        env.column("PA-1", "udf_string_1").await.as_deref(),
        Some("new")
    );
    assert_eq!(
        env.column("PA-3", "udf_float_1").await.as_deref(),
        Some("4.5")
    );
}

/// The same bytes dropped twice (even under another name) are applied once: the later drops
/// are `duplicate`, archived, and exit 0.
#[tokio::test]
async fn the_same_file_twice_is_a_duplicate_applied_once() {
    let env = TestEnv::new().await;
    env.insert_token("DUP-1").await;
    let text = csv(
        "authentication_code,udf_string_1",
        &["DUP-1,DUP-2,from-file"],
    );
    env.drop_file("dup.csv", &text);
    assert_eq!(env.run_now_with(&[]), 0);
    assert_eq!(
        env.column("DUP-2", "udf_string_1").await.as_deref(),
        Some("from-file")
    );
    // Applying the file again would fail (DUP-1 is gone); a duplicate applies nothing.
    env.exec("UPDATE access_tokens SET udf_string_1 = 'by-hand'")
        .await;
    let before = env.tokens_snapshot().await;

    env.drop_file("dup.csv", &text);
    assert_eq!(env.run_now_with(&[]), 0);
    env.drop_file("renamed.csv", &text);
    assert_eq!(env.run_now_with(&[]), 0);

    assert_eq!(env.tokens_snapshot().await, before);
    assert_ledger(
        &env,
        &[
            ("dup.csv", "applied"),
            ("dup.csv", "duplicate"),
            ("renamed.csv", "duplicate"),
        ],
    )
    .await;
    let reports = reports_in(&env, &env.archive());
    assert_eq!(reports.len(), 3, "every drop is archived with its report");
    let duplicates: Vec<&Value> = reports
        .iter()
        .filter(|r| r["status"] == "duplicate")
        .collect();
    assert_eq!(duplicates.len(), 2);
    assert!(
        duplicates
            .iter()
            .all(|r| r["sha256"] == reports[0]["sha256"])
    );
    assert!(duplicates.iter().all(|r| r["rows_applied"] == 0));
    assert_eq!(env.report("renamed.csv")["status"], "duplicate");
    assert!(env.names_in(&env.failed()).is_empty());
    assert!(env.names_in(&env.incoming()).is_empty());
}

/// A rejected file can be fixed in the database and dropped again: the same bytes are then
/// applied, since only applied batches count for duplicates.
#[tokio::test]
async fn a_rejected_file_dropped_again_is_not_a_duplicate() {
    let env = TestEnv::new().await;
    let text = csv("udf_string_1", &["LATE-1,second-try"]);
    env.drop_file("retry.csv", &text);
    assert_eq!(env.run_now_with(&[]), 1);
    env.insert_token("LATE-1").await;

    env.drop_file("retry.csv", &text);
    assert_eq!(env.run_now_with(&[]), 0);

    assert_eq!(
        env.column("LATE-1", "udf_string_1").await.as_deref(),
        Some("second-try")
    );
    let statuses: Vec<String> = env.batches().await.into_iter().map(|b| b.1).collect();
    assert_eq!(statuses, ["rejected", "applied"]);
}

/// Files are taken in lexical order of their names, whatever order they were written in.
#[tokio::test]
async fn files_are_processed_in_lexical_name_order() {
    let env = TestEnv::new().await;
    let id = env.insert_token("ORDER-0").await;
    // "10-…" sorts before "2-…", which sorts before "3-…".
    env.drop_file(
        "3-third.jsonl",
        "{\"access_token_identifier\": {\"authentication_code\": \"ORDER-2\"}, \
         \"udf_string_1\": \"third\"}\n",
    );
    env.drop_file(
        "2-second.csv",
        csv("authentication_code", &["ORDER-1,ORDER-2"]),
    );
    env.drop_file(
        "10-first.csv",
        csv("authentication_code", &["ORDER-0,ORDER-1"]),
    );

    assert_eq!(env.run_now_with(&[]), 0);

    assert_eq!(env.column("ORDER-2", "id").await, Some(id.to_string()));
    assert_eq!(
        env.column("ORDER-2", "udf_string_1").await.as_deref(),
        Some("third")
    );
    let names: Vec<String> = env.batches().await.into_iter().map(|b| b.0).collect();
    assert_eq!(names, ["10-first.csv", "2-second.csv", "3-third.jsonl"]);
}

/// Hidden files, `.tmp` and `.part` names, other extensions, folders and symbolic links in
/// incoming are left alone: nothing is applied, moved or recorded.
#[tokio::test]
async fn hidden_temporary_and_linked_files_are_ignored() {
    let env = TestEnv::new().await;
    env.insert_token("IGN-1").await;
    let before = env.tokens_snapshot().await;
    let text = csv("udf_string_1", &["IGN-1,should-not-apply"]);
    let incoming = env.incoming();
    for name in [
        ".hidden.csv",
        "x.csv.tmp",
        "y.jsonl.part",
        "z.txt",
        "w.csv.bak",
    ] {
        std::fs::write(incoming.join(name), &text).unwrap();
    }
    std::fs::create_dir(incoming.join("folder.csv")).unwrap();
    let target = env.path().join("outside.csv");
    std::fs::write(&target, &text).unwrap();
    std::os::unix::fs::symlink(&target, incoming.join("link.csv")).unwrap();
    let listed = env.names_in(&incoming);

    assert_eq!(env.run_now_with(&[]), 0, "nothing to do");

    assert_eq!(env.tokens_snapshot().await, before);
    assert_eq!(env.names_in(&incoming), listed);
    assert!(env.names_in(&env.archive()).is_empty());
    assert!(env.names_in(&env.failed()).is_empty());
    assert!(env.batches().await.is_empty());
    assert!(target.exists());
}

/// A batch file whose name is not UTF-8 cannot be recorded or reported by name: it is left
/// in incoming, untouched, with a warning that says why, and the run has nothing to do.
#[tokio::test]
async fn a_file_name_that_is_not_utf8_is_left_alone_with_a_warning() {
    use std::os::unix::ffi::OsStrExt;
    let env = TestEnv::new().await;
    env.insert_token("UTF-1").await;
    let before = env.tokens_snapshot().await;
    let name = std::ffi::OsStr::from_bytes(b"tokens-\xff.csv");
    let path = env.incoming().join(name);
    std::fs::write(&path, csv("udf_string_1", &["UTF-1,never"])).unwrap();

    let output = env.run_with(&["--run-now"], &[]);

    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stderr = common::text(&output.stderr);
    assert!(stderr.contains("File name is not UTF-8"), "{stderr}");
    assert!(path.is_file(), "the file stays where it is");
    assert_eq!(env.tokens_snapshot().await, before);
    assert!(env.batches().await.is_empty());
}

/// A processed file is named `<YYYYmmddTHHMMSSZ>-<name>` (the UTC time it was taken), with
/// its reports beside it under the same name plus a suffix.
#[tokio::test]
async fn archive_names_are_stamped_and_reports_sit_beside() {
    let env = TestEnv::new().await;
    env.insert_token("ARC-1").await;
    let text = csv("udf_string_1,fields_set", &["ARC-1,x,id", "ARC-404,y,"]);
    env.drop_file("arc.csv", text);
    let before = chrono::Utc::now().naive_utc();

    assert_eq!(env.run_now_with(&[SKIP_ROW]), 1);

    let after = chrono::Utc::now().naive_utc();
    let names = env.names_in(&env.archive());
    assert_eq!(names.len(), 5, "{names:?}");
    let file = &names[0];
    assert!(is_stamped(file) && file.ends_with("-arc.csv"), "{file}");
    let suffixes = [
        ".errors.jsonl",
        ".rejects.csv",
        ".report.json",
        ".results.jsonl",
    ];
    let expected: Vec<String> = std::iter::once(file.clone())
        .chain(suffixes.iter().map(|s| format!("{file}{s}")))
        .collect();
    assert_eq!(names, expected);
    let stamp = chrono::NaiveDateTime::parse_from_str(&file[..16], "%Y%m%dT%H%M%SZ").unwrap();
    let second = |t: chrono::NaiveDateTime| t.and_utc().timestamp();
    assert!(second(before) <= second(stamp) && second(stamp) <= second(after));
    let report = env.report("arc.csv");
    assert_eq!(report["file"], "arc.csv");
    let started = report["started_at"].as_str().unwrap();
    let started = chrono::DateTime::parse_from_rfc3339(started).unwrap();
    assert_eq!(started.timestamp(), second(stamp));
    assert!(
        env.names_in(&env.incoming()).is_empty(),
        "no work files left"
    );
}

/// Pass codes, authentication codes and card numbers used in a batch appear nowhere but in
/// `.rejects.*` and `.results.jsonl`: not on stdout or stderr, not in `.report.json` or
/// `.errors.jsonl`, not in `validate`'s output.
#[tokio::test]
async fn secrets_never_appear_in_logs_or_reports() {
    let env = TestEnv::new().await;
    env.exec(
        "INSERT INTO access_token_classifications (name, credit_card) VALUES ('card', true);
         INSERT INTO access_tokens (authentication_code, classification_id) \
         SELECT 'AUTHSECRET-OLD-Q7X1', id FROM access_token_classifications;
         INSERT INTO access_tokens (authentication_code) VALUES ('AUTHSECRET-OTHER-Z2');",
    )
    .await;
    let secrets = [
        "AUTHSECRET-OLD-Q7X1",
        "AUTHSECRET-NEW-K4P9",
        "AUTHSECRET-OTHER-Z2",
        "AUTHSECRET-UNKNOWN-M3",
        "PASSSECRET-GOOD-8H2",
        "PASSSECRET-WRONG-5T6",
        "MASKSECRET-****-4242",
        "5105 1051 0510 5100",
        "5105105105105100",
    ];
    let id = |code: &str| format!("{{\"authentication_code\": \"{code}\"}}");
    let rows = [
        format!(
            "{{\"access_token_identifier\": {}, \"authentication_code\": \"AUTHSECRET-NEW-K4P9\", \
             \"identifier\": \"IDENT-1\", \"pass_code\": \"PASSSECRET-GOOD-8H2\", \
             \"card_masked_number\": \"MASKSECRET-****-4242\", \
             \"fields_set\": \"authentication_code,card_masked_number\"}}",
            id("AUTHSECRET-OLD-Q7X1")
        ),
        "{\"access_token_identifier\": {\"identifier\": \"IDENT-1\", \
         \"pass_code\": \"PASSSECRET-WRONG-5T6\"}, \"udf_string_1\": \"x\"}"
            .to_owned(),
        format!(
            "{{\"access_token_identifier\": {}, \"udf_string_1\": \"x\"}}",
            id("AUTHSECRET-UNKNOWN-M3")
        ),
        format!(
            "{{\"access_token_identifier\": {}, \"card_masked_number\": \"5105 1051 0510 5100\"}}",
            id("AUTHSECRET-NEW-K4P9")
        ),
        format!(
            "{{\"access_token_identifier\": {}, \"authentication_code\": \"AUTHSECRET-NEW-K4P9\"}}",
            id("AUTHSECRET-OTHER-Z2")
        ),
        format!(
            "{{\"access_token_identifier\": {}, \"card_masked_number\": \"5105105105105100\"}}",
            id("AUTHSECRET-OTHER-Z2")
        ),
    ];
    let text = rows.join("\n") + "\n";
    let copy = env.path().join("secrets.jsonl");
    std::fs::write(&copy, &text).unwrap();
    env.drop_file("secrets.jsonl", &text);

    let validated = env.run_with(&["validate", copy.to_str().unwrap()], &[SKIP_ROW]);
    let run = env.run_with(&["--run-now"], &[SKIP_ROW, ("RUST_LOG", "info")]);

    assert_eq!(validated.status.code(), Some(1));
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(
        lines_and_codes(&env, "secrets.jsonl"),
        [
            (Some(2), "ACCESS_TOKEN_NOT_FOUND".to_owned()),
            (Some(3), "ACCESS_TOKEN_NOT_FOUND".to_owned()),
            (Some(4), "UNMASKED_CARD_NUMBER".to_owned()),
            (Some(5), "DUPLICATE_VALUE".to_owned()),
            (Some(6), "UNMASKED_CARD_NUMBER".to_owned()),
        ]
    );
    let hash = env
        .column("AUTHSECRET-NEW-K4P9", "pass_code_hash")
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let mut places = vec![
        ("validate output", printed(&validated)),
        ("run output", printed(&run)),
    ];
    for suffix in [".report.json", ".errors.jsonl"] {
        let path = env.processed("secrets.jsonl", suffix).unwrap();
        places.push((suffix, std::fs::read_to_string(path).unwrap()));
    }
    let rows: Vec<String> = env
        .client
        .query("SELECT row_to_json(b)::text FROM batches b", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    places.push(("batches", format!("{rows:?}")));
    for (place, content) in &places {
        for secret in secrets {
            assert!(!content.contains(secret), "{secret} in {place}: {content}");
        }
    }
    // The rejects and results may hold them; the results are for the operator only.
    let results = env.processed("secrets.jsonl", ".results.jsonl").unwrap();
    let results_text = std::fs::read_to_string(&results).unwrap();
    assert!(results_text.contains("AUTHSECRET-NEW-K4P9"));
    assert!(!results_text.contains("PASSSECRET"));
    assert!(env.processed("secrets.jsonl", ".rejects.jsonl").is_some());
}

/// Even with `RUST_LOG=debug`, the logs hold no authentication code, pass code or card number
/// (SPEC 8: they "never appear in logs").
#[tokio::test]
async fn debug_logs_hold_no_secrets() {
    let env = TestEnv::new().await;
    env.exec(
        "INSERT INTO access_token_classifications (name, credit_card) VALUES ('card', true);
         INSERT INTO access_tokens (authentication_code, classification_id) \
         SELECT 'AUTHSECRET-DBG-OLD', id FROM access_token_classifications;",
    )
    .await;
    let text = "access_token_identifier.authentication_code,authentication_code,identifier,\
                pass_code,card_masked_number\n\
                AUTHSECRET-DBG-OLD,AUTHSECRET-DBG-NEW,IDENT-DBG,PASSSECRET-DBG,MASKSECRET-DBG-**\n";
    env.drop_file("debug.csv", text);

    let run = env.run_with(&["--run-now"], &[("RUST_LOG", "debug")]);

    assert_eq!(run.status.code(), Some(0));
    assert_eq!(
        env.column("AUTHSECRET-DBG-NEW", "card_masked_number")
            .await
            .as_deref(),
        Some("MASKSECRET-DBG-**")
    );
    let logs = printed(&run);
    for secret in [
        "AUTHSECRET-DBG-OLD",
        "AUTHSECRET-DBG-NEW",
        "PASSSECRET-DBG",
        "MASKSECRET-DBG",
    ] {
        let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} in the debug logs: {leaks:#?}");
    }
}

/// `schedule.min_file_age`: a file modified more recently is left for a later run; an older
/// one is taken.
#[tokio::test]
async fn files_younger_than_min_file_age_wait() {
    let env = TestEnv::new().await;
    env.insert_token("AGE-1").await;
    env.insert_token("AGE-2").await;
    env.drop_file("old.csv", csv("udf_string_1", &["AGE-1,old"]));
    env.drop_file("new.csv", csv("udf_string_1", &["AGE-2,new"]));
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let old = std::fs::File::options()
        .write(true)
        .open(env.incoming().join("old.csv"))
        .unwrap();
    old.set_modified(an_hour_ago).unwrap();

    assert_eq!(
        env.run_now_with(&[("TOKENSYNC_SCHEDULE_MIN_FILE_AGE", "10m")]),
        0
    );

    assert_eq!(
        env.column("AGE-1", "udf_string_1").await.as_deref(),
        Some("old")
    );
    assert_eq!(env.column("AGE-2", "udf_string_1").await, None);
    assert_eq!(env.names_in(&env.incoming()), ["new.csv"]);
    assert_eq!(env.batches().await.len(), 1);
}

/// Two instances started at once on the same folders and database: every file is applied
/// exactly once, both end cleanly, and every file is archived once with its report.
#[tokio::test]
async fn two_instances_at_once_apply_each_file_exactly_once() {
    let env = TestEnv::new().await;
    let count = 30;
    for i in 0..count {
        env.insert_token(&format!("TWO-{i}")).await;
        let text = csv("udf_float_1", &[&format!("TWO-{i},{i}")]);
        env.drop_file(&format!("f{i:02}.csv"), text);
    }

    let runs: Vec<_> = (0..2)
        .map(|_| {
            let dir = env.path().to_owned();
            let config = env.config_path();
            std::thread::spawn(move || {
                let args = ["--config", config.to_str().unwrap(), "--run-now"];
                common::run_binary(&dir, &args, &[])
            })
        })
        .collect();
    let outputs: Vec<Output> = runs.into_iter().map(|r| r.join().unwrap()).collect();

    for i in 0..count {
        let value = env.column(&format!("TWO-{i}"), "udf_float_1").await;
        assert_eq!(value, Some(i.to_string()));
    }
    let batches = env.batches().await;
    let applied = batches.iter().filter(|b| b.1 == "applied").count();
    assert_eq!(applied, count, "{batches:?}");
    let archived = env.names_in(&env.archive());
    assert_eq!(archived.len(), 2 * count, "{archived:?}");
    assert!(env.names_in(&env.incoming()).is_empty());
    assert!(env.names_in(&env.failed()).is_empty());
    assert_eq!(batches.len(), count, "no batch recorded twice: {batches:?}");
    for output in &outputs {
        let warnings: Vec<String> = printed(output)
            .lines()
            .filter(|l| !l.contains(" INFO "))
            .map(str::to_owned)
            .collect();
        assert_eq!(output.status.code(), Some(0), "{warnings:#?}");
    }
}

/// Puts the state back as a process killed while publishing `name` would leave it: the file
/// in incoming again, and its reports back in the work folder unless `reports_moved`.
fn unpublish(env: &TestEnv, name: &str, reports_moved: bool) {
    let archived = env.processed(name, "").expect("the file was moved");
    let dest = archived.parent().unwrap().to_owned();
    let archive_name = archived.file_name().unwrap().to_str().unwrap().to_owned();
    std::fs::rename(&archived, env.incoming().join(name)).unwrap();
    if reports_moved {
        return;
    }
    let work_dir = env.incoming().join(".tokensync").join(name);
    std::fs::create_dir_all(&work_dir).unwrap();
    let prefix = format!("{archive_name}.");
    for entry in std::fs::read_dir(&dest).unwrap() {
        let path = entry.unwrap().path();
        let file_name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if let Some(suffix) = file_name.strip_prefix(&prefix) {
            std::fs::rename(&path, work_dir.join(suffix)).unwrap();
        }
    }
}

/// A batch recorded in the ledger whose file was not moved yet (the process died while
/// publishing it) is finished by the next run, whatever its status and whether its reports
/// had been moved: the file and its reports end at the name the ledger holds, with no
/// second ledger row and the same exit code.
#[tokio::test]
async fn a_batch_recorded_before_a_stop_is_moved_without_a_second_record() {
    let env = TestEnv::new().await;
    env.insert_token("FIN-1").await;
    let applied = csv("udf_string_1", &["FIN-1,done"]);
    let rejected = csv("udf_string_1", &["FIN-404,never"]);
    let cases = [
        ("applied.csv", applied.clone(), 0, "applied"),
        ("rejected.csv", rejected, 1, "rejected"),
        ("duplicate.csv", applied, 0, "duplicate"),
    ];
    for (name, text, exit, status) in cases {
        env.drop_file(name, &text);
        assert_eq!(env.run_now_with(&[]), exit, "{name}");
        let archived = env.processed(name, "").unwrap();
        let ledger = env.batches().await;
        assert_eq!(ledger.last().unwrap().1, status, "{name}");

        for reports_moved in [false, true] {
            unpublish(&env, name, reports_moved);
            assert_eq!(
                env.run_now_with(&[]),
                exit,
                "{name}, reports moved: {reports_moved}"
            );
            assert_eq!(env.batches().await, ledger, "{name}: no second record");
            assert!(archived.is_file(), "{name}: moved to {archived:?}");
            let report = archived.with_file_name(format!(
                "{}.report.json",
                archived.file_name().unwrap().to_str().unwrap()
            ));
            assert!(report.is_file(), "{name}: its report beside it");
            assert!(
                env.names_in(&env.incoming()).is_empty(),
                "{name}: incoming is left empty"
            );
            assert!(!env.incoming().join(".tokensync").exists());
        }
    }
    assert_eq!(
        env.column("FIN-1", "udf_string_1").await.as_deref(),
        Some("done")
    );
}

/// A file whose archived copy and reports were cleared away, dropped again, is judged by
/// its content as usual: a duplicate of an applied batch, or a new try of a rejected one.
#[tokio::test]
async fn a_file_dropped_again_after_its_archive_was_cleared_is_judged_anew() {
    let env = TestEnv::new().await;
    env.insert_token("CLR-1").await;
    let applied = csv("udf_string_1", &["CLR-1,done"]);
    let rejected = csv("udf_string_1", &["CLR-404,never"]);
    for (name, text) in [("applied.csv", &applied), ("rejected.csv", &rejected)] {
        env.drop_file(name, text);
        env.run_now_with(&[]);
    }
    for dir in [env.archive(), env.failed()] {
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
    }
    env.drop_file("applied.csv", &applied);
    env.drop_file("rejected.csv", &rejected);

    assert_eq!(
        env.run_now_with(&[]),
        1,
        "the rejected file is rejected again"
    );

    assert_ledger(
        &env,
        &[
            ("applied.csv", "applied"),
            ("rejected.csv", "rejected"),
            ("applied.csv", "duplicate"),
            ("rejected.csv", "rejected"),
        ],
    )
    .await;
    assert!(env.names_in(&env.incoming()).is_empty());
}

/// Tokens that another transaction changes while the batch waits for them are seen as that
/// transaction left them, by both methods, as if the rows were applied one by one: one
/// token's authentication code moved, so the row naming the old code finds no token; the
/// other token already holds the value its row sets, so that row changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_changed_meanwhile_by_another_transaction_is_seen_as_changed() {
    for method in ["set-based", "row-by-row"] {
        let env = TestEnv::new().await;
        env.insert_token("CON-1").await;
        env.insert_token("CON-2").await;
        let text = csv("udf_string_1", &["CON-1,first", "CON-2,second"]);
        env.drop_file("concurrent.csv", text);

        let (other, connection) = tokio_postgres::connect(&env.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        other
            .batch_execute(
                "BEGIN; UPDATE access_tokens SET authentication_code = 'CON-1-MOVED' \
                 WHERE authentication_code = 'CON-1'; \
                 UPDATE access_tokens SET udf_string_1 = 'second' \
                 WHERE authentication_code = 'CON-2'",
            )
            .await
            .unwrap();

        let (dir, config) = (env.path().to_owned(), env.config_path());
        let run = tokio::task::spawn_blocking(move || {
            let args = ["--config", config.to_str().unwrap(), "--run-now"];
            let envs = [SKIP_ROW, ("TOKENSYNC_APPLY_METHOD", method)];
            common::run_binary(&dir, &args, &envs)
        });
        // Let go of the token only once the batch waits for it. (Asked outside the other
        // transaction, which would see the activity as it was when it began.)
        let waiting = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";
        let mut waited = Duration::ZERO;
        while env
            .client
            .query_one(waiting, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
        {
            if run.is_finished() {
                let output = run.await.unwrap();
                panic!("{method}: the batch ended without waiting: {output:?}");
            }
            assert!(
                waited < Duration::from_secs(60),
                "{method}: the batch never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += Duration::from_millis(20);
        }
        other.batch_execute("COMMIT").await.unwrap();
        let output = run.await.unwrap();

        assert_eq!(output.status.code(), Some(1), "{method}: {output:?}");
        assert_eq!(
            lines_and_codes(&env, "concurrent.csv"),
            [(Some(2), "ACCESS_TOKEN_NOT_FOUND".to_owned())],
            "{method}"
        );
        let report = env.report("concurrent.csv");
        assert_eq!(report["rows_applied"], 0, "{method}: {report}");
        assert_eq!(report["rows_unchanged"], 1, "{method}: {report}");
        assert_eq!(report["rows_failed"], 1, "{method}: {report}");
        assert_eq!(env.column("CON-1-MOVED", "udf_string_1").await, None);
        assert_eq!(
            env.column("CON-2", "udf_string_1").await.as_deref(),
            Some("second"),
            "{method}"
        );
    }
}
