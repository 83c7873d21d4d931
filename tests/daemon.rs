//! The daemon (issue 3; SPEC 3, 6 and 7), driven through the real binary: the schedule,
//! metrics and health, a graceful stop during a large batch, kill -9 at random moments,
//! several instances on the same folders and database, a database outage staged with a TCP
//! proxy written here, and `--run-now` with its metrics text file.
//!
//! Every process a test starts is a [`Tokensync`], killed and reaped when it is dropped, so
//! none outlives its test, even a failed one.

mod common;

use common::TestEnv;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A scan every second (the seconds field comes first).
const EVERY_SECOND: (&str, &str) = ("TOKENSYNC_SCHEDULE_CRON", "* * * * * *");
/// `apply.on_row_error = "skip-row"`.
const SKIP_ROW: (&str, &str) = ("TOKENSYNC_APPLY_ON_ROW_ERROR", "skip-row");
/// The folder inside `incoming` where batches keep their work files.
const WORK_DIR: &str = ".tokensync";
/// The large batch: one `udf_string_1` change on each of the tokens `T1` … `T50000`.
const LARGE: &str = "large.csv";
const LARGE_ROWS: i64 = 50_000;

/// Serialises the tests that apply the large batch. It takes tokensync about ten seconds
/// on its own (over a minute with row-by-row apply); several at once on a small machine
/// would make every deadline meaningless.
static LARGE_BATCHES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

/// Evaluates `$check`, an expression giving an `Option` (it may `.await`), every 25 ms until
/// it is `Some`, for at most `$within`; gives that `Some`, or `None` once time is up.
macro_rules! wait_until {
    ($within:expr, $check:expr) => {{
        let deadline = Instant::now() + $within;
        loop {
            if let Some(value) = $check {
                break Some(value);
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }};
}

/// `GET path` on `addr` over a plain TCP stream: the status code and the body, or `None`
/// when nothing answers within 10 s.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}

/// The value of one series, named with its labels exactly as exposed, in a page of the
/// Prometheus text format.
fn series(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A tokensync process started by a test, with its standard error collected as it comes.
/// Dropping it kills it (SIGKILL) and reaps it.
struct Tokensync {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// Where the daemon serves its metrics (`host:port`), if it is a daemon.
    listen: String,
}

impl Tokensync {
    /// Starts `tokensync --config <env's file> ARGS` in the test's folder with these
    /// environment variables, and none of the caller's `TOKENSYNC_*`, `DATABASE_URL` or
    /// `RUST_LOG`.
    fn start(env: &TestEnv, args: &[&str], envs: &[(&str, &str)]) -> Tokensync {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokensync"));
        command
            .current_dir(env.path())
            .arg("--config")
            .arg(env.config_path())
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("TOKENSYNC_") {
                command.env_remove(key);
            }
        }
        command.envs(envs.iter().copied());
        let mut child = command.spawn().expect("the tokensync binary starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("a piped stderr");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let listen = envs
            .iter()
            .find(|(key, _)| *key == "TOKENSYNC_METRICS_LISTEN")
            .map(|(_, value)| (*value).to_owned())
            .unwrap_or_default();
        Tokensync {
            child,
            stderr,
            listen,
        }
    }

    /// Starts the daemon with a scan every second, its listener on a free port, and `envs`;
    /// waits until it logs `Daemon started.` and `/healthz` answers 200.
    async fn daemon(env: &TestEnv, envs: &[(&str, &str)]) -> Tokensync {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut all = vec![EVERY_SECOND, ("TOKENSYNC_METRICS_LISTEN", listen.as_str())];
        all.extend_from_slice(envs);
        let daemon = Tokensync::start(env, &[], &all);
        let started = wait_until!(
            Duration::from_secs(20),
            async {
                let stderr = daemon.stderr();
                let line = stderr.lines().find(|l| l.contains("Daemon started."))?;
                assert!(line.contains(&format!("listen={listen}")), "{line}");
                let (status, _) = http_get(&daemon.listen, "/healthz").await?;
                (status == 200).then_some(())
            }
            .await
        );
        if started.is_none() {
            daemon.fail("did not start and answer /healthz within 20 s");
        }
        daemon
    }

    /// Everything the process wrote to standard error so far.
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Panics with `what` and the process's standard error.
    fn fail(&self, what: &str) -> ! {
        panic!("tokensync {what}; its stderr:\n{}", self.stderr());
    }

    /// Sends SIGTERM with `kill`.
    fn terminate(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid}");
    }

    /// Kills the process with SIGKILL and reaps it.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit code, once the process has exited; `None` if it still runs.
    fn exit_code(&mut self) -> Option<Option<i32>> {
        let status = self
            .child
            .try_wait()
            .expect("the child can be waited for")?;
        Some(status.code())
    }

    /// Waits for the process to exit, for at most `within`, and gives its exit code.
    /// Panics (with its stderr) when it does not exit in time or dies of a signal.
    async fn exit_within(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            match self.exit_code() {
                Some(Some(code)) => return code,
                Some(None) => self.fail("died of a signal"),
                None if Instant::now() >= deadline => {
                    self.fail(&format!("did not exit within {within:?}"))
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// `GET path` on the daemon's listener.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.listen, path).await
    }

    /// The daemon's `/metrics` page; panics when it does not answer 200.
    async fn metrics(&self) -> String {
        match self.get("/metrics").await {
            Some((200, page)) => page,
            other => self.fail(&format!("answered /metrics with {other:?}")),
        }
    }

    /// Waits until `/metrics` shows `name` with `value`, for at most `within`.
    async fn wait_for_series(&self, name: &str, value: f64, within: Duration) {
        let seen = wait_until!(
            within,
            async {
                let (_, page) = self.get("/metrics").await?;
                (series(&page, name) == Some(value)).then_some(())
            }
            .await
        );
        if seen.is_none() {
            let page = self.get("/metrics").await;
            self.fail(&format!(
                "never showed `{name} {value}`; last page: {page:?}"
            ));
        }
    }

    /// How many lines of standard error hold `text`.
    fn count_logged(&self, text: &str) -> usize {
        self.stderr().lines().filter(|l| l.contains(text)).count()
    }
}

impl Drop for Tokensync {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP proxy between tokensync and PostgreSQL that a test can cut: cutting closes every
/// live connection, and while cut each new connection is closed as soon as it is accepted.
struct Proxy {
    addr: SocketAddr,
    is_cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let is_cut = watch::Sender::new(false);
        let cut_seen = is_cut.subscribe();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut cut = cut_seen.clone();
                if *cut.borrow_and_update() {
                    continue; // `client` is dropped: the connection ends at once.
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|is_cut| *is_cut) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            is_cut,
            accept,
        }
    }

    /// Closes every live connection and refuses new ones until [`Proxy::restore`].
    fn cut(&self) {
        self.is_cut.send_replace(true);
    }

    /// Lets new connections through again.
    fn restore(&self) {
        self.is_cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Where the server's `host:port` lies in a `postgres://user@host:port/db` URL.
fn server_span(url: &str) -> std::ops::Range<usize> {
    let authority_start = url.find("://").expect("a URL") + 3;
    let authority_end = url[authority_start..]
        .find('/')
        .map_or(url.len(), |i| authority_start + i);
    let host_start = url[authority_start..authority_end]
        .rfind('@')
        .map_or(authority_start, |i| authority_start + i + 1);
    host_start..authority_end
}

/// The server's `host:port` in a PostgreSQL URL (port 5432 when it names none).
fn server_of(url: &str) -> String {
    let server = &url[server_span(url)];
    if server.contains(':') {
        server.to_owned()
    } else {
        format!("{server}:5432")
    }
}

/// The same PostgreSQL URL, pointed at `via` instead of its server.
fn reroute(url: &str, via: SocketAddr) -> String {
    let span = server_span(url);
    format!("{}{via}{}", &url[..span.start], &url[span.end..])
}

/// Inserts the tokens `T1` … `T50000` in one statement and drops the large batch, which
/// gives each `udf_string_1 = v<n>`.
async fn drop_large_batch(env: &TestEnv) {
    env.exec(&format!(
        "INSERT INTO access_tokens (authentication_code) \
         SELECT 'T' || g FROM generate_series(1, {LARGE_ROWS}) g"
    ))
    .await;
    let mut text = String::from("access_token_identifier.authentication_code,udf_string_1\n");
    for n in 1..=LARGE_ROWS {
        writeln!(text, "T{n},v{n}").unwrap();
    }
    env.drop_file(LARGE, text);
}

/// How many tokens hold the value the large batch gives them.
async fn large_rows_changed(env: &TestEnv) -> i64 {
    let sql = "SELECT count(*) FROM access_tokens \
               WHERE udf_string_1 = 'v' || substr(authentication_code, 2)";
    env.client.query_one(sql, &[]).await.unwrap().get(0)
}

/// Whether a tokensync session of this test's database is in a transaction that has
/// written rows: a batch in flight.
async fn batch_in_flight(env: &TestEnv) -> bool {
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
               AND application_name = 'tokensync' AND backend_xid IS NOT NULL";
    let row = env.client.query_one(sql, &[&env.db_name]).await.unwrap();
    row.get::<_, i64>(0) > 0
}

/// Waits until no tokensync session of this test's database is left. After kill -9 the
/// server ends a session only when it next talks to its client, so a statement in progress
/// runs on (holding the file's claim) for a while.
async fn wait_for_sessions_to_end(env: &TestEnv) {
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
               AND application_name = 'tokensync'";
    let ended = wait_until!(
        Duration::from_secs(60),
        async {
            let row = env.client.query_one(sql, &[&env.db_name]).await.unwrap();
            (row.get::<_, i64>(0) == 0).then_some(())
        }
        .await
    );
    assert!(
        ended.is_some(),
        "sessions of a killed tokensync still run after 60 s"
    );
}

/// The work folder of the large batch.
fn large_work_dir(env: &TestEnv) -> PathBuf {
    env.incoming().join(WORK_DIR).join(LARGE)
}

/// Checks that the large batch is applied entirely, recorded once and archived with its
/// report, or not applied at all with its file back in incoming and no ledger row; then
/// that no work folder is left in incoming. Gives whether it was applied.
async fn assert_large_batch_all_or_nothing(env: &TestEnv) -> bool {
    let changed = large_rows_changed(env).await;
    let ledger = env.batches().await;
    let files_in_incoming: Vec<String> = env
        .names_in(&env.incoming())
        .into_iter()
        .filter(|name| name != WORK_DIR)
        .collect();
    let applied = changed == LARGE_ROWS;
    if applied {
        let row = (
            LARGE.to_owned(),
            "applied".to_owned(),
            LARGE_ROWS,
            LARGE_ROWS,
            0,
        );
        assert_eq!(ledger, [row]);
        assert_eq!(env.report(LARGE)["status"], "applied");
        let archived = env.processed(LARGE, "").expect("the file is archived");
        assert!(archived.starts_with(env.archive()), "{archived:?}");
        assert_eq!(files_in_incoming, Vec::<String>::new(), "left in incoming");
    } else {
        assert_eq!(changed, 0, "the batch is partly applied");
        assert!(
            ledger.is_empty(),
            "a ledger row without its rows: {ledger:?}"
        );
        assert_eq!(
            files_in_incoming,
            [LARGE],
            "the file is not back in incoming"
        );
        assert_eq!(env.names_in(&env.archive()), Vec::<String>::new());
        assert_eq!(env.names_in(&env.failed()), Vec::<String>::new());
    }
    assert!(
        !large_work_dir(env).exists(),
        "the batch's work folder is left"
    );
    let work_dir = env.incoming().join(WORK_DIR);
    assert!(
        !work_dir.exists(),
        "incoming/{WORK_DIR} is left behind (holding {:?}); the batch was applied: {applied}",
        env.names_in(&work_dir)
    );
    applied
}

/// A small xorshift generator: random enough for kill delays. Its seed comes from the clock
/// and is printed; `TOKENSYNC_TEST_SEED=<seed>` replays a run.
struct XorShift(u64);

impl XorShift {
    fn from_time() -> XorShift {
        let seed = std::env::var("TOKENSYNC_TEST_SEED").map_or_else(
            |_| {
                let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                nanos.as_nanos() as u64 | 1
            },
            |seed| seed.parse().expect("TOKENSYNC_TEST_SEED is a number"),
        );
        eprintln!("xorshift seed: {seed}");
        XorShift(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A duration in `[low, high)` milliseconds.
    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_picks_up_a_file_and_metrics_show_it() {
    let env = TestEnv::new().await;
    env.exec(
        "INSERT INTO access_tokens (authentication_code, udf_string_1) VALUES \
         ('M1', NULL), ('M2', NULL), ('M3', 'same');",
    )
    .await;
    let mut daemon = Tokensync::daemon(&env, &[SKIP_ROW]).await;
    assert_eq!(daemon.get("/readyz").await.map(|r| r.0), Some(200));

    let text = "access_token_identifier.authentication_code,udf_string_1\n\
                M1,one\nNOPE-1,x\nM2,two\nM3,same\nNOPE-2,y\n";
    env.drop_file("mixed.csv", text);
    let archived = wait_until!(
        Duration::from_secs(30),
        async { env.processed("mixed.csv", "") }.await
    );
    let Some(archived) = archived else {
        daemon.fail("did not archive mixed.csv within 30 s")
    };
    assert!(archived.starts_with(env.archive()), "{archived:?}");
    assert_eq!(env.report("mixed.csv")["status"], "partially_applied");
    assert_eq!(
        env.batches().await,
        [(
            "mixed.csv".to_owned(),
            "partially_applied".to_owned(),
            5,
            2,
            2
        )]
    );
    assert_eq!(
        env.column("M1", "udf_string_1").await.as_deref(),
        Some("one")
    );
    assert_eq!(
        env.column("M2", "udf_string_1").await.as_deref(),
        Some("two")
    );

    // The scan after the batch sees an empty folder.
    daemon
        .wait_for_series("tokensync_incoming_files", 0.0, Duration::from_secs(10))
        .await;
    let page = daemon.metrics().await;
    let expected = [
        (
            r#"tokensync_batches_total{status="partially_applied"}"#,
            1.0,
        ),
        (r#"tokensync_batches_total{status="applied"}"#, 0.0),
        (r#"tokensync_batches_total{status="rejected"}"#, 0.0),
        (r#"tokensync_rows_total{outcome="applied"}"#, 2.0),
        (r#"tokensync_rows_total{outcome="unchanged"}"#, 1.0),
        (r#"tokensync_rows_total{outcome="failed"}"#, 2.0),
        (
            r#"tokensync_row_errors_total{code="ACCESS_TOKEN_NOT_FOUND"}"#,
            2.0,
        ),
        ("tokensync_incoming_files", 0.0),
        ("tokensync_database_up", 1.0),
        ("tokensync_batch_duration_seconds_count", 1.0),
    ];
    for (name, value) in expected {
        assert_eq!(series(&page, name), Some(value), "{name} in:\n{page}");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last_success = series(&page, "tokensync_last_success_timestamp_seconds")
        .unwrap_or_else(|| panic!("no last success in:\n{page}"));
    assert!(
        (now - last_success).abs() < 60.0,
        "{last_success} is not about {now}"
    );

    assert_eq!(daemon.get("/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(daemon.get("/readyz").await.map(|r| r.0), Some(200));

    daemon.terminate();
    assert_eq!(daemon.exit_within(Duration::from_secs(10)).await, 0);
    assert_eq!(daemon.count_logged("Daemon stopped."), 1);
}

/// Starts the daemon on the large batch with this `schedule.shutdown_timeout`, sends
/// SIGTERM once the batch is in flight, and checks the exit: code 0 within the timeout plus
/// a margin, the batch entirely applied or not at all. Gives whether it was applied.
async fn sigterm_during_the_large_batch(timeout: Duration, method: &str) -> bool {
    let _alone = LARGE_BATCHES.lock().await;
    let env = TestEnv::new().await;
    drop_large_batch(&env).await;
    let timeout_text = format!("{}s", timeout.as_secs());
    // Small chunks make the batch a hundred steps, each a point where it may stop.
    let envs = [
        ("TOKENSYNC_SCHEDULE_SHUTDOWN_TIMEOUT", timeout_text.as_str()),
        ("TOKENSYNC_APPLY_CHUNK_ROWS", "500"),
        ("TOKENSYNC_APPLY_METHOD", method),
    ];
    let mut daemon = Tokensync::daemon(&env, &envs).await;

    let in_flight = wait_until!(
        Duration::from_secs(30),
        async { (large_work_dir(&env).is_dir() && batch_in_flight(&env).await).then_some(()) }
            .await
    );
    if in_flight.is_none() {
        daemon.fail("never had the large batch in flight");
    }
    let sent = Instant::now();
    daemon.terminate();
    let code = daemon.exit_within(timeout + Duration::from_secs(10)).await;
    let took = sent.elapsed();
    assert_eq!(code, 0, "stderr:\n{}", daemon.stderr());
    assert_eq!(daemon.count_logged("Stopping: no new file is taken."), 1);
    eprintln!("shutdown_timeout {timeout:?}: exited {took:?} after SIGTERM");
    let applied = assert_large_batch_all_or_nothing(&env).await;
    eprintln!("shutdown_timeout {timeout:?}: the batch was applied: {applied}");
    applied
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_batch_rolls_back_past_a_short_timeout() {
    // Row by row, the batch takes far longer than 2 s (set-based, it may not): it must stop
    // at a row and roll back.
    let applied = sigterm_during_the_large_batch(Duration::from_secs(2), "row-by-row").await;
    assert!(!applied, "the batch committed within 2 s of SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_batch_may_commit_within_a_generous_timeout() {
    sigterm_during_the_large_batch(Duration::from_secs(60), "set-based").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_then_a_normal_run() {
    let _alone = LARGE_BATCHES.lock().await;
    let env = TestEnv::new().await;
    drop_large_batch(&env).await;
    let mut random = XorShift::from_time();

    // Kills after random delays, from tens of milliseconds to several seconds (the batch
    // takes about ten), and one (`None`) as the batch's report lands in its work folder,
    // right before the commit: while the batch is surely still to be applied.
    let kills = [
        Some((10, 100)),
        Some((100, 1_000)),
        Some((1_000, 4_000)),
        None,
        Some((4_000, 12_000)),
    ];
    for (round, kill) in kills.into_iter().enumerate() {
        let mut run = Tokensync::start(&env, &["--run-now"], &[]);
        let what = if let Some((low, high)) = kill {
            let delay = random.millis(low, high);
            tokio::time::sleep(delay).await;
            format!("after {delay:?}")
        } else {
            // Watched closely: commit, file move and exit follow within milliseconds.
            let report = large_work_dir(&env).join("report.json");
            let deadline = Instant::now() + Duration::from_secs(240);
            while !report.exists() && run.exit_code().is_none() {
                if Instant::now() >= deadline {
                    run.fail("never wrote the report of the large batch");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let delay = random.millis(0, 4);
            tokio::time::sleep(delay).await;
            format!("{delay:?} after the report appeared")
        };
        let finished = run.exit_code();
        run.kill9();
        wait_for_sessions_to_end(&env).await;
        let changed = large_rows_changed(&env).await;
        let ledger = env.batches().await;
        eprintln!(
            "round {round}: kill -9 {what}; finished before: {finished:?}; \
             rows changed: {changed}; ledger: {ledger:?}"
        );
        assert!(
            changed == 0 || changed == LARGE_ROWS,
            "{changed} rows changed"
        );
        let committed = usize::from(changed == LARGE_ROWS);
        assert_eq!(ledger.len(), committed, "{ledger:?}");
    }

    let output = env.run(&["--run-now"]);
    let stderr = common::text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");

    assert_eq!(large_rows_changed(&env).await, LARGE_ROWS);
    assert_eq!(
        env.batches().await,
        [(
            LARGE.to_owned(),
            "applied".to_owned(),
            LARGE_ROWS,
            LARGE_ROWS,
            0
        )]
    );
    let report = env.report(LARGE);
    assert_eq!(report["status"], "applied");
    assert_eq!(report["rows_applied"], LARGE_ROWS);
    let archived = env.names_in(&env.archive());
    assert_eq!(archived.len(), 2, "{archived:?}");
    assert!(env.processed(LARGE, "").is_some(), "{archived:?}");
    assert!(
        env.processed(LARGE, ".report.json").is_some(),
        "{archived:?}"
    );
    assert_eq!(env.names_in(&env.incoming()), Vec::<String>::new());
    assert_eq!(env.names_in(&env.failed()), Vec::<String>::new());
}

/// One batch file of the several-instances test.
struct SmallBatch {
    name: String,
    text: String,
    /// The `(authentication code, udf_string_1)` each row sets.
    changes: Vec<(String, String)>,
}

/// Twelve batch files: file `n` touches tokens `F<n>-<r>` only, with one to three rows;
/// every fourth file is JSON Lines.
fn a_dozen_files() -> Vec<SmallBatch> {
    (1..=12)
        .map(|n| {
            let changes: Vec<(String, String)> = (1..=n % 3 + 1)
                .map(|r| (format!("F{n}-{r}"), format!("f{n}r{r}")))
                .collect();
            let is_json = n % 4 == 0;
            let (name, mut text) = if is_json {
                (format!("batch-{n:02}.jsonl"), String::new())
            } else {
                let header = "access_token_identifier.authentication_code,udf_string_1\n";
                (format!("batch-{n:02}.csv"), header.to_owned())
            };
            for (code, value) in &changes {
                if is_json {
                    let id = serde_json::json!({ "authentication_code": code });
                    let row = serde_json::json!({ "access_token_identifier": id,
                                                  "udf_string_1": value });
                    writeln!(text, "{row}").unwrap();
                } else {
                    writeln!(text, "{code},{value}").unwrap();
                }
            }
            SmallBatch {
                name,
                text,
                changes,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_share_folders_and_database() {
    let env = TestEnv::new().await;
    let files = a_dozen_files();
    let mut expected = BTreeMap::new();
    for file in &files {
        for (code, value) in &file.changes {
            env.insert_token(code).await;
            expected.insert(code.clone(), Some(value.clone()));
        }
    }

    // Half the files wait before the three start (their first scans race), half come after.
    for file in &files[..6] {
        env.drop_file(&file.name, &file.text);
    }
    let (a, b, c) = tokio::join!(
        Tokensync::daemon(&env, &[]),
        Tokensync::daemon(&env, &[]),
        Tokensync::daemon(&env, &[]),
    );
    let mut daemons = [a, b, c];
    for file in &files[6..] {
        env.drop_file(&file.name, &file.text);
    }

    let emptied = wait_until!(
        Duration::from_secs(60),
        async { env.names_in(&env.incoming()).is_empty().then_some(()) }.await
    );
    if emptied.is_none() {
        let left = env.names_in(&env.incoming());
        let logs: Vec<String> = daemons.iter().map(Tokensync::stderr).collect();
        panic!(
            "incoming still holds {left:?} after 60 s; stderr:\n{}",
            logs.join("\n---\n")
        );
    }

    let ledger = env.batches().await;
    assert_eq!(ledger.len(), 12, "{ledger:?}");
    let mut names: Vec<&str> = ledger.iter().map(|b| b.0.as_str()).collect();
    names.sort_unstable();
    let mut wanted: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    wanted.sort_unstable();
    assert_eq!(names, wanted);
    assert!(
        ledger.iter().all(|b| b.1 == "applied" && b.4 == 0),
        "{ledger:?}"
    );

    let rows = env
        .client
        .query(
            "SELECT authentication_code, udf_string_1 FROM access_tokens",
            &[],
        )
        .await
        .unwrap();
    let actual: BTreeMap<String, Option<String>> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(actual, expected);

    assert_eq!(
        env.names_in(&env.archive()).len(),
        24,
        "{:?}",
        env.names_in(&env.archive())
    );
    for SmallBatch { name, changes, .. } in &files {
        assert!(env.processed(name, "").unwrap().starts_with(env.archive()));
        let report = env.report(name);
        assert_eq!(report["status"], "applied", "{name}");
        assert_eq!(report["rows_applied"], changes.len(), "{name}");
    }
    assert_eq!(env.names_in(&env.failed()), Vec::<String>::new());

    let finished: usize = daemons
        .iter()
        .map(|d| d.count_logged("Batch finished."))
        .sum();
    assert_eq!(
        finished, 12,
        "each file is processed by exactly one instance"
    );
    let mut applied = 0.0;
    for daemon in &daemons {
        let page = daemon.metrics().await;
        applied += series(&page, r#"tokensync_batches_total{status="applied"}"#).unwrap();
        let duplicates = series(&page, r#"tokensync_batches_total{status="duplicate"}"#);
        assert_eq!(duplicates, Some(0.0), "{page}");
    }
    assert_eq!(applied, 12.0);

    for daemon in &daemons {
        daemon.terminate();
    }
    for daemon in &mut daemons {
        assert_eq!(daemon.exit_within(Duration::from_secs(15)).await, 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn database_outage_through_a_proxy() {
    let _alone = LARGE_BATCHES.lock().await;
    let env = TestEnv::new().await;
    let proxy = Proxy::start(server_of(&env.url)).await;
    let proxied_url = reroute(&env.url, proxy.addr);
    // Small chunks keep the batch in flight long enough for the cut to land inside it.
    let envs = [
        ("TOKENSYNC_DATABASE_URL", proxied_url.as_str()),
        ("TOKENSYNC_APPLY_CHUNK_ROWS", "500"),
    ];
    let mut daemon = Tokensync::daemon(&env, &envs).await;
    daemon
        .wait_for_series("tokensync_database_up", 1.0, Duration::from_secs(10))
        .await;

    drop_large_batch(&env).await;
    let in_flight = wait_until!(
        Duration::from_secs(30),
        async { batch_in_flight(&env).await.then_some(()) }.await
    );
    if in_flight.is_none() {
        daemon.fail("never had the large batch in flight");
    }
    proxy.cut();

    daemon
        .wait_for_series("tokensync_database_up", 0.0, Duration::from_secs(15))
        .await;
    let not_ready = wait_until!(
        Duration::from_secs(15),
        async { (daemon.get("/readyz").await?.0 == 503).then_some(()) }.await
    );
    assert!(not_ready.is_some(), "/readyz kept answering 200 while cut");
    assert_eq!(daemon.get("/healthz").await.map(|r| r.0), Some(200));
    // The server notices the cut connection and ends its transaction.
    let rolled_back = wait_until!(
        Duration::from_secs(15),
        async { (!batch_in_flight(&env).await).then_some(()) }.await
    );
    assert!(
        rolled_back.is_some(),
        "the batch's transaction outlived the cut"
    );
    // A few more seconds of outage: retries must not change anything.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(env.names_in(&env.incoming()).contains(&LARGE.to_owned()));
    assert_eq!(env.processed(LARGE, ""), None);
    assert_eq!(large_rows_changed(&env).await, 0);
    assert!(env.batches().await.is_empty());
    assert_eq!(
        daemon.exit_code(),
        None,
        "the daemon stopped during the outage"
    );
    let page = daemon.metrics().await;
    assert_eq!(series(&page, "tokensync_database_up"), Some(0.0), "{page}");

    proxy.restore();
    let archived = wait_until!(
        Duration::from_secs(240),
        async { env.processed(LARGE, "") }.await
    );
    if archived.is_none() {
        daemon.fail("did not apply the large batch within 240 s of the restore");
    }
    assert!(assert_large_batch_all_or_nothing(&env).await);
    daemon
        .wait_for_series("tokensync_database_up", 1.0, Duration::from_secs(15))
        .await;
    assert_eq!(daemon.get("/readyz").await.map(|r| r.0), Some(200));
    // The change of state is logged once each way (issue 3: "not every retry").
    assert_eq!(daemon.count_logged("The database is unreachable"), 1);
    assert_eq!(daemon.count_logged("The database answers again."), 1);

    daemon.terminate();
    assert_eq!(daemon.exit_within(Duration::from_secs(15)).await, 0);
    // The cut interrupts one batch; the retries while the database is down are not news.
    let interruptions = daemon.count_logged("Batch interrupted");
    assert!(
        interruptions <= 1,
        "{interruptions} `Batch interrupted` lines: logged on every retry; stderr:\n{}",
        daemon.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_now_opens_no_listener_and_writes_the_textfile() {
    let env = TestEnv::new().await;
    for code in ["R1", "R2", "R3", "R4"] {
        env.insert_token(code).await;
    }
    let header = "access_token_identifier.authentication_code,udf_string_1\n";
    // Held for the whole test: a `--run-now` that tried to listen there would fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let textfiles = env.path().join("textfiles");
    std::fs::create_dir(&textfiles).unwrap();
    let textfile = |name: &str| textfiles.join(name).to_str().unwrap().to_owned();

    env.drop_file("a.csv", format!("{header}R1,a1\nR2,a2\n"));
    let one = textfile("one.prom");
    let envs = [
        ("TOKENSYNC_METRICS_TEXTFILE", one.as_str()),
        ("TOKENSYNC_METRICS_LISTEN", listen.as_str()),
    ];
    let output = env.run_with(&["--run-now"], &envs);
    let stderr = common::text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(!stderr.contains("Daemon started."), "{stderr}");
    let page = std::fs::read_to_string(&one).expect("the metrics text file");
    assert_eq!(
        series(&page, r#"tokensync_batches_total{status="applied"}"#),
        Some(1.0)
    );
    assert_eq!(
        series(&page, r#"tokensync_rows_total{outcome="applied"}"#),
        Some(2.0)
    );
    assert_eq!(
        series(&page, "tokensync_batch_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        env.names_in(&textfiles),
        ["one.prom"],
        "a temporary file is left"
    );

    // Two at once on the same metrics.listen: both work, and each file is applied once.
    env.drop_file("b.csv", format!("{header}R3,b3\n"));
    env.drop_file("c.csv", format!("{header}R4,c4\n"));
    let (two, three) = (textfile("two.prom"), textfile("three.prom"));
    let mut runs = [&two, &three].map(|path| {
        let envs = [
            ("TOKENSYNC_METRICS_TEXTFILE", path.as_str()),
            ("TOKENSYNC_METRICS_LISTEN", listen.as_str()),
        ];
        Tokensync::start(&env, &["--run-now"], &envs)
    });
    for run in &mut runs {
        assert_eq!(
            run.exit_within(Duration::from_secs(30)).await,
            0,
            "{}",
            run.stderr()
        );
    }
    let mut applied = 0.0;
    for path in [&two, &three] {
        let page = std::fs::read_to_string(path).expect("the metrics text file");
        applied += series(&page, r#"tokensync_batches_total{status="applied"}"#).unwrap();
    }
    assert_eq!(
        applied, 2.0,
        "b.csv and c.csv were applied once between them"
    );
    let mut ledger: Vec<String> = env.batches().await.into_iter().map(|b| b.0).collect();
    ledger.sort();
    assert_eq!(ledger, ["a.csv", "b.csv", "c.csv"]);
    assert_eq!(
        env.column("R3", "udf_string_1").await.as_deref(),
        Some("b3")
    );
    assert_eq!(
        env.column("R4", "udf_string_1").await.as_deref(),
        Some("c4")
    );
    assert_eq!(env.names_in(&env.incoming()), Vec::<String>::new());
    drop(taken);
}
