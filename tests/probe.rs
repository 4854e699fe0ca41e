//! `pgshift probe` end to end: the real binary against real clusters, directly and through
//! pgshift — quiet runs, runs whose backends are terminated under them, verification against
//! a database lacking the rows, `--setup` with logical replication (on a private pair), and
//! usage errors.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::pgshift::TestProxy;
use support::{APP_DB, ClusterPair, PLAIN_PASSWORD, PLAIN_USER, TEST_PASSWORD, TEST_USER};

/// What one probe run printed and wrote.
struct ProbeRun {
    status: i32,
    stdout: String,
    stderr: String,
    json: Option<Value>,
}

impl ProbeRun {
    fn from_output(output: Output, json_path: &Path) -> ProbeRun {
        let json = std::fs::read_to_string(json_path)
            .ok()
            .filter(|text| !text.trim().is_empty())
            .map(|text| serde_json::from_str(&text).expect("--json writes JSON"));
        ProbeRun {
            status: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            json,
        }
    }

    fn json(&self) -> &Value {
        self.json
            .as_ref()
            .unwrap_or_else(|| panic!("no JSON report\n{}", self.describe()))
    }

    fn count(&self, pointer: &str) -> u64 {
        self.json()
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{pointer} is not a count\n{}", self.describe()))
    }

    fn describe(&self) -> String {
        format!(
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn probe_command(args: &[&str], json_path: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgshift"));
    command
        .arg("probe")
        .args(args)
        .arg("--json")
        .arg(json_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `pgshift probe ARGS --json TEMP` to the end.
fn probe(args: &[&str]) -> ProbeRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("report.json");
    let output = probe_command(args, &json_path)
        .output()
        .expect("pgshift probe runs");
    ProbeRun::from_output(output, &json_path)
}

/// Runs `pgshift probe` without `--json` (for runs that stop before measuring).
fn probe_plain(args: &[&str]) -> ProbeRun {
    let output = Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .arg("probe")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("pgshift probe runs");
    ProbeRun::from_output(output, Path::new("/nonexistent/probe.json"))
}

fn app_dsn(cluster: &support::Cluster) -> String {
    cluster.dsn(TEST_USER, Some(TEST_PASSWORD), APP_DB)
}

/// The shared pair, with the probe's default table created on both clusters (once).
fn shared_pair_with_table() -> &'static ClusterPair {
    static READY: OnceLock<()> = OnceLock::new();
    let pair = support::shared_pair();
    READY.get_or_init(|| {
        let setup = format!("{},{}", app_dsn(&pair.blue), app_dsn(&pair.green));
        let run = probe_plain(&["--setup", &setup]);
        assert_eq!(
            run.status,
            0,
            "setup on the shared pair\n{}",
            run.describe()
        );
        assert!(
            run.stdout.contains("blue has no publication"),
            "{}",
            run.describe()
        );
    });
    pair
}

/// Asserts a run finished cleanly: exit 0, no error, nothing missing, no violation.
fn assert_quiet(run: &ProbeRun, verify_count: usize) {
    assert_eq!(run.status, 0, "{}", run.describe());
    assert_eq!(run.count("/errors/total"), 0, "{}", run.describe());
    assert_eq!(run.count("/sessions_dropped"), 0, "{}", run.describe());
    assert_eq!(run.count("/read_your_writes_violations"), 0);
    assert_eq!(run.count("/stale_reads_after_reconnect"), 0);
    assert!(
        run.count("/operations/writes_acknowledged") > 0,
        "{}",
        run.describe()
    );
    assert!(run.count("/operations/reads") > 0, "{}", run.describe());
    let verify = run.json()["verify"].as_array().expect("verify results");
    assert_eq!(verify.len(), verify_count, "{}", run.describe());
    for result in verify {
        assert_eq!(result["missing"], 0, "{}", run.describe());
        assert!(result["checked"].as_u64().unwrap_or(0) > 0, "{result}");
    }
    assert!(
        run.stdout.contains("acknowledged writes missing: 0"),
        "{}",
        run.describe()
    );
    assert!(run.stdout.contains("verdict: passed"), "{}", run.describe());
}

#[test]
fn a_quiet_run_against_a_cluster_reports_no_error_and_nothing_missing() {
    let pair = shared_pair_with_table();
    let blue = app_dsn(&pair.blue);
    let run = probe(&[
        "--dsn",
        &blue,
        "--clients",
        "3",
        "--duration",
        "2s",
        "--rate",
        "25",
        "--verify",
        &blue,
        "--verify-timeout",
        "2s",
        "--max-errors",
        "0",
        "--max-dropped",
        "0",
    ]);
    assert_quiet(&run, 1);
    assert_eq!(run.json()["protocol"], "extended");
    assert!(
        run.stderr.contains("ops/s"),
        "one live line per second when stderr is not a terminal\n{}",
        run.describe()
    );
    assert!(run.json()["latency_ms"]["p50"].as_f64().is_some());
    assert_eq!(run.json()["stalls"].as_array().map(Vec::len), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_run_through_pgshift_reports_no_error_and_nothing_missing() {
    let pair = shared_pair_with_table();
    let proxy = TestProxy::start(pair, "", "green_weight = 0", None).await;
    let through_pgshift = proxy.app_dsn();
    let blue = app_dsn(&pair.blue);
    let run = tokio::task::spawn_blocking(move || {
        probe(&[
            "--dsn",
            &through_pgshift,
            "--clients",
            "3",
            "--duration",
            "2s",
            "--rate",
            "25",
            "--protocol",
            "simple",
            "--verify",
            &blue,
            "--verify-timeout",
            "2s",
        ])
    })
    .await
    .expect("probe thread");
    assert_quiet(&run, 1);
    assert_eq!(run.json()["protocol"], "simple");
    proxy.stop().await;
}

/// Runs a probe whose sessions use `application_name`, terminating their backends on `pair`'s
/// blue twice while it runs (once its sessions are connected, then 0.7 s later).
fn probe_with_terminations(pair: &ClusterPair, application_name: &str, args: &[&str]) -> ProbeRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("report.json");
    let child = probe_command(args, &json_path)
        .spawn()
        .expect("pgshift probe starts");
    let sessions = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application_name}'"
    );
    let connected_by = Instant::now() + Duration::from_secs(10);
    while pair.blue.psql(&sessions).trim() == "0" && Instant::now() < connected_by {
        std::thread::sleep(Duration::from_millis(50));
    }
    let terminate = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{application_name}'"
    );
    let mut terminated = 0;
    for pause in [Duration::from_millis(300), Duration::from_millis(700)] {
        std::thread::sleep(pause);
        terminated += pair
            .blue
            .psql(&terminate)
            .trim()
            .parse::<u32>()
            .unwrap_or(0);
    }
    let output = child.wait_with_output().expect("pgshift probe ends");
    let run = ProbeRun::from_output(output, &json_path);
    assert!(
        terminated > 0,
        "no backend was terminated\n{}",
        run.describe()
    );
    run
}

/// The errors and reconnects of a run whose backends were terminated, and nothing missing.
fn assert_survived_terminations(run: &ProbeRun, clients: u64) {
    assert!(run.count("/errors/total") > 0, "{}", run.describe());
    assert!(run.count("/sessions_dropped") > 0, "{}", run.describe());
    assert!(
        run.count("/connections_opened") > clients,
        "sessions reconnected\n{}",
        run.describe()
    );
    assert!(run.count("/operations/writes_acknowledged") > 0);
    assert_eq!(
        run.count("/read_your_writes_violations"),
        0,
        "{}",
        run.describe()
    );
    assert_eq!(run.json()["verify"][0]["missing"], 0, "{}", run.describe());
    assert!(
        run.stdout.contains("acknowledged writes missing: 0"),
        "{}",
        run.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_behind_pgshift_are_errors_and_reconnects_but_nothing_goes_missing() {
    let pair = shared_pair_with_table();
    let proxy = TestProxy::start(pair, "", "green_weight = 0", None).await;
    let through_pgshift = format!("{} application_name=probe-killed-proxied", proxy.app_dsn());
    let blue = app_dsn(&pair.blue);
    let run = tokio::task::spawn_blocking(move || {
        probe_with_terminations(
            pair,
            "probe-killed-proxied",
            &[
                "--dsn",
                &through_pgshift,
                "--clients",
                "3",
                "--duration",
                "3s",
                "--rate",
                "30",
                "--protocol",
                "prepared",
                "--verify",
                &blue,
                "--verify-timeout",
                "2s",
            ],
        )
    })
    .await
    .expect("probe thread");
    assert_eq!(run.status, 0, "no limit was set\n{}", run.describe());
    assert_survived_terminations(&run, 3);
    proxy.stop().await;
}

#[test]
fn max_errors_zero_fails_a_run_whose_backends_were_terminated() {
    let pair = shared_pair_with_table();
    let direct = format!(
        "{} application_name=probe-killed-direct",
        app_dsn(&pair.blue)
    );
    let blue = app_dsn(&pair.blue);
    let run = probe_with_terminations(
        pair,
        "probe-killed-direct",
        &[
            "--dsn",
            &direct,
            "--clients",
            "3",
            "--duration",
            "3s",
            "--rate",
            "30",
            "--max-errors",
            "0",
            "--verify",
            &blue,
            "--verify-timeout",
            "2s",
        ],
    );
    assert_eq!(run.status, 1, "{}", run.describe());
    assert_survived_terminations(&run, 3);
    assert!(
        run.json()["errors"]["by_sqlstate"]["57P01"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "pg_terminate_backend's 57P01 is reported by SQLSTATE\n{}",
        run.describe()
    );
    let failures = run.json()["verdict"]["failures"].to_string();
    assert!(failures.contains("--max-errors 0"), "{failures}");
    assert!(
        run.stdout.contains("verdict: FAILED (exit 1)"),
        "{}",
        run.describe()
    );
}

#[test]
fn verifying_against_a_database_without_the_rows_reports_them_missing() {
    let pair = shared_pair_with_table();
    let blue = app_dsn(&pair.blue);
    let verify = format!("{},{}", blue, app_dsn(&pair.green));
    let run = probe(&[
        "--dsn",
        &blue,
        "--clients",
        "2",
        "--duration",
        "2s",
        "--rate",
        "20",
        "--write-ratio",
        "1",
        "--verify",
        &verify,
        "--verify-timeout",
        "1s",
    ]);
    assert_eq!(run.status, 1, "{}", run.describe());
    let acknowledged = run.count("/operations/writes_acknowledged");
    assert!(acknowledged > 0, "{}", run.describe());
    assert_eq!(run.json()["verify"][0]["missing"], 0, "{}", run.describe());
    assert_eq!(
        run.json()["verify"][1]["missing"].as_u64(),
        Some(acknowledged),
        "green has no replication in the shared pair\n{}",
        run.describe()
    );
    assert!(
        run.stdout
            .contains(&format!("acknowledged writes missing: {acknowledged}")),
        "{}",
        run.describe()
    );
    assert_eq!(
        run.count("/operations/reads"),
        0,
        "--write-ratio 1 only writes"
    );
}

#[tokio::test]
async fn a_commit_outside_a_transaction_is_noticed_before_its_reply() {
    use pgshift::probe::connection::{Target, open};
    let pair = support::shared_pair();
    let target = Target::parse(&app_dsn(&pair.blue), "--dsn").expect("a valid DSN");
    let connection = open(&target).await.expect("connects");
    let (client, watch) = (&connection.client, &connection.watch);
    client.simple_query("COMMIT").await.expect("COMMIT answers");
    assert_eq!(watch.no_transaction_warnings(), 1, "simple protocol");
    client
        .execute_typed("COMMIT", &[])
        .await
        .expect("COMMIT answers");
    assert_eq!(watch.no_transaction_warnings(), 2, "extended protocol");
    client.simple_query("BEGIN").await.expect("BEGIN");
    client.simple_query("COMMIT").await.expect("COMMIT");
    assert_eq!(
        watch.no_transaction_warnings(),
        2,
        "a COMMIT inside a transaction warns of nothing"
    );
}

#[test]
fn usage_errors_and_unusable_databases_exit_2_with_a_clear_message() {
    let no_dsn = probe_plain(&["--clients", "2"]);
    assert_eq!(no_dsn.status, 2, "{}", no_dsn.describe());
    assert!(no_dsn.stderr.contains("--dsn"), "{}", no_dsn.describe());

    let bad_ratio = probe_plain(&["--dsn", "host=127.0.0.1 user=x", "--write-ratio", "1.5"]);
    assert_eq!(bad_ratio.status, 2, "{}", bad_ratio.describe());
    assert!(
        bad_ratio.stderr.contains("--write-ratio"),
        "{}",
        bad_ratio.describe()
    );

    let closed_port = support::free_port();
    let unreachable = probe_plain(&[
        "--dsn",
        &format!("host=127.0.0.1 port={closed_port} user=x password=secret-pw dbname=app"),
        "--duration",
        "1s",
    ]);
    assert_eq!(unreachable.status, 2, "{}", unreachable.describe());
    assert!(
        unreachable.stderr.contains(&format!(
            "cannot connect to --dsn (x@127.0.0.1:{closed_port}/app)"
        )),
        "{}",
        unreachable.describe()
    );
    assert!(!unreachable.stderr.contains("secret-pw"));

    let pair = support::shared_pair();
    let no_table = probe_plain(&[
        "--dsn",
        &app_dsn(&pair.blue),
        "--table",
        "public.no_such_probe_table",
        "--duration",
        "1s",
    ]);
    assert_eq!(no_table.status, 2, "{}", no_table.describe());
    assert!(
        no_table
            .stderr
            .contains("public.no_such_probe_table does not exist on --dsn"),
        "{}",
        no_table.describe()
    );
    assert!(
        no_table.stderr.contains("--setup"),
        "{}",
        no_table.describe()
    );
}

#[test]
fn setup_keeps_logical_replication_working_and_says_what_to_run_until_it_does() {
    let pair = ClusterPair::start_private();
    let blue = app_dsn(&pair.blue);
    let green = app_dsn(&pair.green);
    let setup = format!("{blue},{green}");
    pair.blue
        .psql_db(APP_DB, "CREATE PUBLICATION probe_pub FOR ALL TABLES");

    // Blue publishes everything, green does not subscribe yet.
    let run = probe_plain(&["--setup", &setup, "--verify-timeout", "1s"]);
    assert_eq!(run.status, 2, "{}", run.describe());
    assert!(
        run.stderr.contains("green has no subscription")
            && run.stderr.contains("CREATE SUBSCRIPTION"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("ready on green"),
        "green first\n{}",
        run.describe()
    );

    // The subscription copies the table that now exists on both; a table created after it
    // needs a refresh, and setup says so.
    pair.green.psql_db(
        APP_DB,
        &format!(
            "CREATE SUBSCRIPTION probe_sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname={APP_DB}' PUBLICATION probe_pub",
            pair.blue.port()
        ),
    );
    let second = [
        "--setup",
        &setup,
        "--table",
        "public.probe_second",
        "--verify-timeout",
        "1s",
    ];
    let run = probe_plain(&second);
    assert_eq!(run.status, 2, "{}", run.describe());
    assert!(
        run.stderr
            .contains("ALTER SUBSCRIPTION \"probe_sub\" REFRESH PUBLICATION;"),
        "{}",
        run.describe()
    );
    pair.green
        .psql_db(APP_DB, "ALTER SUBSCRIPTION probe_sub REFRESH PUBLICATION");

    // Setup waits for the initial copy (state r), then a run verified on green passes.
    let waited = Instant::now();
    let run = probe_plain(&[
        "--setup",
        &setup,
        "--table",
        "public.probe_second",
        "--verify-timeout",
        "20s",
    ]);
    assert_eq!(run.status, 0, "{}", run.describe());
    assert!(run.stdout.contains("state r"), "{}", run.describe());
    assert!(waited.elapsed() < Duration::from_secs(20));
    let run = probe(&[
        "--dsn",
        &blue,
        "--table",
        "public.probe_second",
        "--clients",
        "2",
        "--duration",
        "2s",
        "--rate",
        "20",
        "--verify",
        &green,
        "--verify-timeout",
        "10s",
    ]);
    assert_quiet(&run, 1);

    // A user without CREATE on the schema is told which grant is missing.
    pair.green
        .psql_db(APP_DB, "REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    let plain_setup = format!(
        "{},{}",
        pair.blue.dsn(PLAIN_USER, Some(PLAIN_PASSWORD), APP_DB),
        pair.green.dsn(PLAIN_USER, Some(PLAIN_PASSWORD), APP_DB)
    );
    let run = probe_plain(&["--setup", &plain_setup, "--table", "public.probe_denied"]);
    assert_eq!(run.status, 2, "{}", run.describe());
    assert!(
        run.stderr
            .contains("GRANT CREATE ON SCHEMA \"public\" TO \"plain_user\";"),
        "{}",
        run.describe()
    );
}
