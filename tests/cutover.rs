//! Transparent cutover, the parts that land first: `pgshift cutover-setup` (print, apply,
//! idempotent), `pgshift check`'s readiness lines, and the guardrails `promote --check` and
//! `promote` apply — each refusal produced for real on a real pair with logical replication
//! blue → green, then cleared.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::pgshift::{TestServer, config_text};
use support::{APP_DB, ClusterPair, SUPERUSER, TEST_PASSWORD, TEST_USER, free_port};

/// Logical replication of `public.orders` blue → green in database `app`, waited until ready.
fn replicate_orders(pair: &ClusterPair) {
    let table = "CREATE TABLE public.orders (id uuid PRIMARY KEY, note text NOT NULL)";
    pair.blue.psql_db(
        APP_DB,
        &format!(
            "{table}; GRANT ALL ON public.orders TO {TEST_USER}; CREATE PUBLICATION shop_pub FOR TABLE public.orders"
        ),
    );
    pair.green.psql_db(APP_DB, table);
    pair.green.psql_db(
        APP_DB,
        &format!(
            "CREATE SUBSCRIPTION shop_sub CONNECTION 'host=127.0.0.1 port={} user={SUPERUSER} dbname={APP_DB}' PUBLICATION shop_pub",
            pair.blue.port()
        ),
    );
    wait_for_ready_subscription(pair);
}

fn wait_for_ready_subscription(pair: &ClusterPair) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let unready = pair.green.psql_db(
            APP_DB,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        );
        if unready == "0" {
            return;
        }
        assert!(Instant::now() < deadline, "{unready} table(s) never ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `[auth]` scram through the superuser, `[cutover]` transparent with `dsn_user`.
fn cutover_sections(dsn: &str, extra: &str) -> String {
    format!(
        "[auth]\nmode = \"scram\"\nauth_dsn = \"user={SUPERUSER} dbname=postgres\"\nfailure_backoff = \"0s\"\n\n\
         [cutover]\nmode = \"transparent\"\ndsn = \"{dsn}\"\n{extra}\n"
    )
}

fn superuser_dsn() -> String {
    format!("user={SUPERUSER} dbname={APP_DB}")
}

fn write_config(dir: &Path, pair: &ClusterPair, sections: &str) -> std::path::PathBuf {
    let path = dir.join("pgshift.toml");
    let text = config_text(
        pair,
        free_port(),
        "",
        &format!("green_weight = 0\n{sections}"),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn pgshift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(args)
        .output()
        .expect("run pgshift")
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn cutover_setup_prints_applies_and_reports_ready() {
    let pair = ClusterPair::start_private();
    replicate_orders(&pair);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &pair, &cutover_sections(&superuser_dsn(), ""));
    let config = config.to_str().expect("utf-8 path");

    // --print: the SQL in order, nothing changed, exit 1 (not ready).
    let printed = pgshift(&["cutover-setup", "--config", config, "--print"]);
    assert_eq!(printed.status.code(), Some(1), "{}", describe(&printed));
    let script = stdout(&printed);
    let order: Vec<usize> = [
        "-- on green, database app",
        "-- on blue, database app",
        "ALTER PUBLICATION \"shop_pub\" ADD TABLE pgshift.marker;",
        "ALTER SUBSCRIPTION \"shop_sub\" REFRESH PUBLICATION;",
    ]
    .iter()
    .map(|needle| {
        script
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} missing\n{}", describe(&printed)))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{script}");
    assert!(
        script.contains("CREATE TABLE IF NOT EXISTS pgshift.marker"),
        "{script}"
    );
    assert_eq!(
        pair.green
            .psql_db(APP_DB, "SELECT to_regclass('pgshift.marker') IS NULL"),
        "t",
        "--print changed nothing"
    );

    // check: valid config, readiness as warnings with the same SQL.
    let checked = pgshift(&["check", "--config", config]);
    assert_eq!(checked.status.code(), Some(0), "{}", describe(&checked));
    let text = stdout(&checked);
    assert!(
        text.contains("warning: [cutover] replication is not ready")
            && text.contains("ALTER PUBLICATION \"shop_pub\" ADD TABLE pgshift.marker;"),
        "{}",
        describe(&checked)
    );

    // Apply: ready, and the marker replicates.
    let applied = pgshift(&["cutover-setup", "--config", config]);
    assert_eq!(applied.status.code(), Some(0), "{}", describe(&applied));
    assert!(
        stdout(&applied).contains("ready:"),
        "{}",
        describe(&applied)
    );
    assert_eq!(
        pair.green.psql_db(
            APP_DB,
            "SELECT srsubstate FROM pg_subscription_rel WHERE srrelid = 'pgshift.marker'::regclass"
        ),
        "r"
    );
    pair.blue.psql_db(
        APP_DB,
        "INSERT INTO pgshift.marker (publication, token) VALUES ('shop_pub', 'hello')",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while pair
        .green
        .psql_db(APP_DB, "SELECT count(*) FROM pgshift.marker")
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "the marker row never reached green"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Catch-up: a marker written on blue is seen on green; with the subscription disabled it
    // is not, and the error names the publication.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let loaded =
        std::sync::Arc::new(pgshift::config::Config::load(Path::new(config)).expect("config"));
    let connections =
        pgshift::cutover::catalog::Connections::new(loaded, [None, None]).expect("connections");
    let forward = pgshift::cutover::setup::Direction::FORWARD;
    runtime.block_on(async {
        let databases = pgshift::cutover::catalog::read_replication(&connections, forward)
            .await
            .expect("replication facts");
        let took =
            pgshift::cutover::catch_up(&connections, forward, &databases, Duration::from_secs(20))
                .await
                .expect("caught up");
        eprintln!("catch-up took {took:?}");
        pair.green
            .psql_db(APP_DB, "ALTER SUBSCRIPTION shop_sub DISABLE");
        let error = pgshift::cutover::catch_up(
            &connections,
            forward,
            &databases,
            Duration::from_millis(500),
        )
        .await
        .expect_err("no catch-up without replication");
        assert!(
            error.contains("within 500ms for publication(s) shop_pub (database app)"),
            "{error}"
        );
        pair.green
            .psql_db(APP_DB, "ALTER SUBSCRIPTION shop_sub ENABLE");
    });

    // Idempotent, and check now says ready.
    let again = pgshift(&["cutover-setup", "--config", config, "--print"]);
    assert_eq!(again.status.code(), Some(0), "{}", describe(&again));
    assert!(
        stdout(&again).contains("nothing to create"),
        "{}",
        describe(&again)
    );
    let checked = pgshift(&["check", "--config", config]);
    assert!(
        stdout(&checked).contains(
            "[cutover] replication blue → green ready for a transparent cutover in database(s) app"
        ),
        "{}",
        describe(&checked)
    );

    // A role without the privileges is told which grants are missing.
    let weak = write_config(
        dir.path(),
        &pair,
        &cutover_sections(
            &format!("user={TEST_USER} password={TEST_PASSWORD} dbname={APP_DB}"),
            "",
        ),
    );
    let checked = pgshift(&["check", "--config", weak.to_str().expect("utf-8")]);
    let text = stdout(&checked);
    for expected in [
        "GRANT pg_read_all_stats TO pgshift_test;",
        "does not own subscription shop_sub",
        "lacks SELECT, INSERT, UPDATE on pgshift.marker",
    ] {
        assert!(
            text.contains(expected),
            "{expected}\n{}",
            describe(&checked)
        );
    }
}

/// The disabled subscription: nothing to apply, and cutover-setup says what to run.
#[test]
fn cutover_setup_names_what_it_cannot_fix() {
    let pair = ClusterPair::start_private();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &pair, &cutover_sections(&superuser_dsn(), ""));
    let config = config.to_str().expect("utf-8 path");
    let none = pgshift(&["cutover-setup", "--config", config]);
    assert_eq!(none.status.code(), Some(1), "{}", describe(&none));
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("green has no subscription"),
        "{}",
        describe(&none)
    );

    replicate_orders(&pair);
    pair.green
        .psql_db(APP_DB, "ALTER SUBSCRIPTION shop_sub DISABLE");
    let disabled = pgshift(&["cutover-setup", "--config", config, "--wait", "1s"]);
    assert_eq!(disabled.status.code(), Some(1), "{}", describe(&disabled));
    assert!(
        String::from_utf8_lossy(&disabled.stderr)
            .contains("ALTER SUBSCRIPTION \"shop_sub\" ENABLE;"),
        "{}",
        describe(&disabled)
    );

    // An unreachable color: exit 2 naming it.
    pair.green.stop();
    let down = pgshift(&["cutover-setup", "--config", config, "--print"]);
    assert_eq!(down.status.code(), Some(2), "{}", describe(&down));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("cannot reach green"),
        "{}",
        describe(&down)
    );
}

fn refusal(reply: &serde_json::Value) -> String {
    assert_eq!(reply["ok"], false, "expected a refusal: {reply}");
    reply["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guardrails_refuse_with_their_reasons_until_clear() {
    let pair = tokio::task::spawn_blocking(|| {
        let pair = ClusterPair::start_private();
        // Prepared transactions need a slot; the setting needs a restart.
        pair.blue
            .psql("ALTER SYSTEM SET max_prepared_transactions = 4");
        pair.blue.stop();
        pair.blue.start();
        replicate_orders(&pair);
        pair
    })
    .await
    .expect("pair");
    let server = TestServer::start(
        &pair,
        &cutover_sections(&superuser_dsn(), "max_txn_age = \"1s\""),
        "green_weight = 0",
        None,
    )
    .await;

    // Setup missing: refused with the SQL, nothing changed.
    let error = refusal(&server.admin("promote --check").await);
    assert!(
        error.contains("replication blue → green is not ready")
            && error.contains("ALTER PUBLICATION \"shop_pub\" ADD TABLE pgshift.marker;"),
        "{error}"
    );
    let config = server.config_path.to_str().expect("utf-8").to_string();
    let applied =
        tokio::task::spawn_blocking(move || pgshift(&["cutover-setup", "--config", &config]))
            .await
            .expect("cutover-setup");
    assert_eq!(applied.status.code(), Some(0), "{}", describe(&applied));

    // A session of this pgshift on blue is not foreign.
    let (session, connection) = tokio_postgres::connect(&server.app_dsn(), tokio_postgres::NoTls)
        .await
        .expect("session through pgshift");
    tokio::spawn(connection);
    session.simple_query("SELECT 1").await.expect("query");
    let reply = server.admin("promote --check").await;
    assert_eq!(reply["check"], "passed", "{reply}");
    let checks = reply["checks"].to_string();
    for expected in [
        "green is reachable and not in recovery",
        "free connection slot(s) for 1 session(s)",
        "every client backend on blue is this pgshift's",
        "no prepared transaction on blue",
    ] {
        assert!(checks.contains(expected), "{expected}: {reply}");
    }

    // A client of blue that is not this pgshift's: refused; --force lets it through.
    let (foreign, connection) = tokio_postgres::connect(
        &pair.blue.dsn(TEST_USER, Some(TEST_PASSWORD), APP_DB),
        tokio_postgres::NoTls,
    )
    .await
    .expect("direct connection to blue");
    tokio::spawn(connection);
    foreign
        .simple_query("SET application_name = 'nightly_job'")
        .await
        .expect("set");
    let error = refusal(&server.admin("promote --check").await);
    assert!(
        error.contains("1 client backend(s) on blue are not this pgshift's")
            && error.contains("nightly_job")
            && error.contains("promote --force"),
        "{error}"
    );
    let forced = server.admin("promote --check --force").await;
    assert_eq!(forced["check"], "passed", "{forced}");
    assert!(
        forced["overridden"][0].to_string().contains("nightly_job"),
        "{forced}"
    );

    // The same client leaves a prepared transaction behind, then goes.
    foreign
        .batch_execute(
            "BEGIN; INSERT INTO orders VALUES (gen_random_uuid(), 'two-phase'); PREPARE TRANSACTION 'pending_tx'",
        )
        .await
        .expect("prepare");
    drop(foreign);
    let error = refusal(&server.admin("promote").await);
    assert!(
        error.contains("promote refused by the cutover guardrails (nothing changed)")
            && error.contains("\"pending_tx\""),
        "{error}"
    );
    assert_eq!(server.admin("status").await["green_weight"], 0.0);
    pair.blue.psql_db(APP_DB, "ROLLBACK PREPARED 'pending_tx'");

    // A transaction of this pgshift's own session held past max_txn_age.
    session
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let error = refusal(&server.admin("promote --check").await);
    assert!(
        error.contains("transaction(s) on blue older than max_txn_age (1s)"),
        "{error}"
    );
    session.batch_execute("COMMIT").await.expect("commit");

    // Settings that differ, and a disabled subscription.
    pair.blue
        .psql("ALTER ROLE pgshift_test SET work_mem = '8MB'");
    pair.green
        .psql_db(APP_DB, "ALTER SUBSCRIPTION shop_sub DISABLE");
    let error = refusal(&server.admin("promote --check").await);
    assert!(
        error.contains("only on blue: [ALTER ROLE \"pgshift_test\" SET work_mem = '8MB']")
            && error.contains("ALTER SUBSCRIPTION \"shop_sub\" ENABLE;"),
        "{error}"
    );
    pair.green
        .psql("ALTER ROLE pgshift_test SET work_mem = '8MB'");
    pair.green
        .psql_db(APP_DB, "ALTER SUBSCRIPTION shop_sub ENABLE");

    // Clear: promote goes through and says which guardrails passed.
    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        reply["guardrails"]
            .to_string()
            .contains("no prepared transaction on blue"),
        "{reply}"
    );
    assert_eq!(server.admin("status").await["green_weight"], 100.0);
    drop(session);
    server.stop().await;
}
