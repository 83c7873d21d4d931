//! TLS to PostgreSQL: `sslmode` of `database.url` is honoured (SPEC 8).

mod common;

use common::{TestEnv, text};

/// Whether the test server offers TLS at all (Debian's default cluster does).
async fn server_has_ssl(env: &TestEnv) -> bool {
    let row = env.client.query_one("SHOW ssl", &[]).await.unwrap();
    row.get::<_, String>(0) == "on"
}

/// A fresh self-signed CA certificate (by `openssl`), which signed nothing the server has.
fn unrelated_root(env: &TestEnv) -> std::path::PathBuf {
    let cert = env.path().join("other-root.pem");
    let key = env.path().join("other-root.key");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=tokensync-test-ca", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(status.status.success(), "{}", text(&status.stderr));
    cert
}

/// A test environment with token AC1 and a batch that sets its `udf_string_1` to "tls";
/// `None` (the test is skipped, and says so) when the server offers no TLS.
async fn env_with_one_batch() -> Option<TestEnv> {
    let env = TestEnv::new().await;
    if !server_has_ssl(&env).await {
        eprintln!("skipped: the test server has ssl = off");
        return None;
    }
    env.insert_token("AC1").await;
    let batch = "access_token_identifier.authentication_code,udf_string_1\nAC1,tls\n";
    env.drop_file("t.csv", batch);
    Some(env)
}

/// `sslmode=require` connects over TLS, so a batch is applied.
#[tokio::test]
async fn sslmode_require_applies_a_batch() {
    let Some(env) = env_with_one_batch().await else {
        return;
    };
    let url = format!(
        "{}?sslmode=require&application_name=tokensync-tls-test",
        env.url
    );

    let output = env.run_with(&["--run-now"], &[("TOKENSYNC_DATABASE_URL", &url)]);

    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(
        env.column("AC1", "udf_string_1").await.as_deref(),
        Some("tls")
    );
}

/// `sslmode=verify-full` checks the server's certificate: with a root that did not sign it,
/// tokensync cannot connect, says so, exits 2 and leaves the file in incoming.
#[tokio::test]
async fn sslmode_verify_full_refuses_an_untrusted_server() {
    let Some(env) = env_with_one_batch().await else {
        return;
    };
    let root = unrelated_root(&env);
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        env.url,
        root.display()
    );

    let output = env.run_with(&["--run-now"], &[("TOKENSYNC_DATABASE_URL", &url)]);

    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("unreachable"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(env.names_in(&env.incoming()), ["t.csv"]);
    assert_eq!(env.column("AC1", "udf_string_1").await, None);
}
