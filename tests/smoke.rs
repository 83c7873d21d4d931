//! The shortest path through tokensync: one CSV file, applied and archived with its report.

mod common;

use common::TestEnv;

#[tokio::test]
async fn a_csv_file_is_applied_and_archived() {
    let env = TestEnv::new().await;
    env.insert_token("AC1").await;
    env.drop_file(
        "t.csv",
        "access_token_identifier.authentication_code,udf_string_1\nAC1,gold\n",
    );

    assert_eq!(env.run_now_with(&[]), 0);

    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("gold")
    );
    let report = env.report("t.csv");
    assert_eq!(report["status"], "applied");
    assert_eq!(report["rows_applied"], 1);
    assert!(env.processed("t.csv", "").is_some());
    assert!(env.names_in(&env.incoming()).is_empty());
    assert_eq!(env.batches().await.len(), 1);
}
