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
    pair.green.psql_db(
        APP_DB,
        &format!("{table}; GRANT ALL ON public.orders TO {TEST_USER}"),
    );
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
        let mut links =
            pgshift::cutover::catalog::MarkerLinks::open(&connections, forward, &databases)
                .await
                .expect("marker links");
        let took = pgshift::cutover::catch_up(&mut links, Duration::from_secs(20))
            .await
            .expect("caught up");
        eprintln!("catch-up took {took:?}");
        pair.green
            .psql_db(APP_DB, "ALTER SUBSCRIPTION shop_sub DISABLE");
        let error = pgshift::cutover::catch_up(&mut links, Duration::from_millis(500))
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
    let session = connect(&server.app_dsn()).await;
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
    let foreign = connect(&pair.blue.dsn(TEST_USER, Some(TEST_PASSWORD), APP_DB)).await;
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

/// A replicated pair set up for a transparent cutover and a pgshift in front of it.
async fn transparent_server(cutover_extra: &str) -> (ClusterPair, TestServer) {
    let pair = tokio::task::spawn_blocking(|| {
        let pair = ClusterPair::start_private();
        replicate_orders(&pair);
        pair
    })
    .await
    .expect("pair");
    let server = TestServer::start(
        &pair,
        &cutover_sections(&superuser_dsn(), cutover_extra),
        "green_weight = 0",
        None,
    )
    .await;
    let config = server.config_path.to_str().expect("utf-8").to_string();
    let applied =
        tokio::task::spawn_blocking(move || pgshift(&["cutover-setup", "--config", &config]))
            .await
            .expect("cutover-setup");
    assert_eq!(applied.status.code(), Some(0), "{}", describe(&applied));
    (pair, server)
}

/// A client for `dsn`, its connection driven in the background.
async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| panic!("connect to {dsn}: {error}"));
    tokio::spawn(connection);
    client
}

/// A session through pgshift.
async fn session(server: &TestServer) -> tokio_postgres::Client {
    connect(&server.app_dsn()).await
}

async fn server_port(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    let row = client.query_one("SELECT inet_server_port()", &[]).await?;
    Ok(row.get(0))
}

/// Asserts that `client`'s session is served by `cluster` now.
async fn assert_served_by(client: &tokio_postgres::Client, cluster: &support::Cluster) {
    assert_eq!(
        server_port(client).await.expect("server port"),
        i32::from(cluster.port()),
        "served by {}",
        cluster.color_name()
    );
}

/// Waits for the writers; none may have seen an error. Their acknowledged ids.
async fn collect_writes(
    writers: Vec<tokio::task::JoinHandle<(Vec<String>, Vec<String>)>>,
) -> Vec<String> {
    let mut acknowledged = Vec::new();
    for writer in writers {
        let (ids, errors) = writer.await.expect("writer");
        assert!(errors.is_empty(), "a writer saw errors: {errors:?}");
        acknowledged.extend(ids);
    }
    acknowledged
}

/// Asserts that every id in `acknowledged` is in `cluster`'s orders.
fn assert_all_present(cluster: &support::Cluster, acknowledged: &[String]) {
    let ids: Vec<String> = acknowledged.iter().map(|id| format!("'{id}'")).collect();
    let found = cluster.psql_db(
        APP_DB,
        &format!(
            "SELECT count(*) FROM orders WHERE id IN ({})",
            ids.join(",")
        ),
    );
    assert_eq!(
        found,
        acknowledged.len().to_string(),
        "acknowledged writes missing on {}",
        cluster.color_name()
    );
}

/// Writers through pgshift: BEGIN, INSERT, COMMIT as separate requests, until told to stop.
/// Returns (acknowledged ids, errors).
fn start_writers(
    server: &TestServer,
    count: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(Vec<String>, Vec<String>)>> {
    (0..count)
        .map(|writer| {
            let dsn = server.app_dsn();
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = connect(&dsn).await;
                let mut acknowledged = Vec::new();
                let mut errors = Vec::new();
                let mut sequence = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sequence += 1;
                    let id = format!("00000000-0000-4000-8000-{writer:04}{sequence:08}");
                    let attempt = async {
                        client.batch_execute("BEGIN").await?;
                        client
                            .execute(
                                "INSERT INTO orders VALUES ($1::text::uuid, 'written')",
                                &[&id],
                            )
                            .await?;
                        client.batch_execute("COMMIT").await
                    };
                    match attempt.await {
                        Ok(()) => acknowledged.push(id),
                        Err(error) => {
                            errors.push(error.to_string());
                            if client.is_closed() {
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (acknowledged, errors)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_moves_sessions_to_green_without_an_error_or_a_lost_write() {
    let (pair, server) = transparent_server("").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = start_writers(&server, 8, stop.clone());

    let settled = session(&server).await;
    settled
        .batch_execute("SET work_mem = '7MB'; SET application_name = 'carried'")
        .await
        .expect("set");
    assert_served_by(&settled, &pair.blue).await;
    let temporary = session(&server).await;
    temporary
        .batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .expect("temp table");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    let cutover = &reply["cutover"];
    assert!(
        cutover["sessions_moved"].as_u64().unwrap_or(0) >= 9,
        "{reply}"
    );
    assert!(
        cutover["sessions_unmovable"]
            .to_string()
            .contains("temporary table"),
        "{reply}"
    );
    eprintln!("promote reply: {reply}");
    let status = server.admin("status").await;
    assert_eq!(status["cutover"]["outcome"], "completed", "{status}");
    let steps = status["cutover"]["steps"].to_string();
    for step in ["guardrails", "prepare", "freeze", "catch-up", "move"] {
        assert!(steps.contains(&format!("\"{step}\"")), "{step}: {status}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let acknowledged = collect_writes(writers).await;
    assert!(acknowledged.len() > 50, "{} writes", acknowledged.len());

    // The settled session is on green with its settings; the temp-table one was closed.
    assert_served_by(&settled, &pair.green).await;
    let row = settled
        .query_one(
            "SELECT current_setting('work_mem'), current_setting('application_name')",
            &[],
        )
        .await
        .expect("settings");
    assert_eq!(row.get::<_, String>(0), "7MB");
    assert_eq!(row.get::<_, String>(1), "carried");
    let error = temporary
        .simple_query("SELECT 1")
        .await
        .expect_err("the temp-table session was closed");
    assert!(
        error.to_string().contains("could not follow") || temporary.is_closed(),
        "{error}"
    );

    assert_all_present(&pair.green, &acknowledged);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_freeze_timeout_aborts_the_cutover_and_nothing_is_lost() {
    let (pair, server) = transparent_server("freeze_timeout = \"500ms\"").await;
    let idle = session(&server).await;
    let busy = session(&server).await;
    busy.batch_execute("BEGIN; INSERT INTO orders VALUES (gen_random_uuid(), 'in flight')")
        .await
        .expect("open transaction");

    let error = refusal(&server.admin("promote").await);
    assert!(
        error.contains("cutover aborted at freeze")
            && error.contains("1 session(s) did not reach an idle point within freeze_timeout"),
        "{error}"
    );
    let status = server.admin("status").await;
    assert_eq!(status["green_weight"], 0.0, "{status}");
    let cutover = &status["cutover"];
    assert_eq!(cutover["outcome"], "aborted", "{status}");
    assert_eq!(cutover["step"], "freeze", "{status}");
    assert!(
        cutover["reason"]
            .to_string()
            .contains("did not reach an idle point within freeze_timeout"),
        "{status}"
    );
    // Everyone resumed on blue: the open transaction commits, the idle session works.
    busy.batch_execute("COMMIT")
        .await
        .expect("commit after the abort");
    assert_served_by(&idle, &pair.blue).await;
    assert_served_by(&busy, &pair.blue).await;
    assert_eq!(
        pair.blue.psql_db(
            APP_DB,
            "SELECT count(*) FROM orders WHERE note = 'in flight'"
        ),
        "1"
    );
    // New sessions were not held for good.
    let late = session(&server).await;
    assert_served_by(&late, &pair.blue).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_timeout_terminate_only_the_straggler_is_ended() {
    let (pair, server) =
        transparent_server("freeze_timeout = \"500ms\"\non_timeout = \"terminate\"").await;
    let idle = session(&server).await;
    let busy = session(&server).await;
    busy.batch_execute("BEGIN; INSERT INTO orders VALUES (gen_random_uuid(), 'rolled back')")
        .await
        .expect("open transaction");

    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["cutover"]["sessions_terminated"], 1, "{reply}");
    let error = busy.batch_execute("COMMIT").await.expect_err("terminated");
    assert!(
        error
            .to_string()
            .contains("transaction exceeded freeze_timeout")
            || busy.is_closed(),
        "{error}"
    );
    assert_served_by(&idle, &pair.green).await;
    assert_eq!(
        pair.blue.psql_db(
            APP_DB,
            "SELECT count(*) FROM orders WHERE note = 'rolled back'"
        ),
        "0"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscription_times_out_the_catch_up_and_the_cutover_aborts() {
    let (pair, server) = transparent_server("catchup_timeout = \"1s\"").await;
    let idle = session(&server).await;
    // The apply worker cannot write the marker while green's table is locked.
    let locker = connect(&format!(
        "host=127.0.0.1 port={} user={SUPERUSER} dbname={APP_DB}",
        pair.green.port()
    ))
    .await;
    locker
        .batch_execute("BEGIN; LOCK TABLE pgshift.marker IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");

    let error = refusal(&server.admin("promote").await);
    assert!(
        error.contains("cutover aborted at catch-up")
            && error.contains("green did not show the catch-up marker within 1s"),
        "{error}"
    );
    assert_eq!(server.admin("status").await["green_weight"], 0.0);
    assert_served_by(&idle, &pair.blue).await;
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_moves_with_the_session_and_what_cannot_is_closed() {
    use futures_util::StreamExt;
    let (pair, server) = transparent_server("carry_gucs = [\"app.tenant_id\"]").await;
    for cluster in pair.both() {
        cluster.psql(&format!(
            "CREATE ROLE reporter; GRANT reporter TO {TEST_USER}"
        ));
    }
    let (client, mut connection) =
        tokio_postgres::connect(&server.app_dsn(), tokio_postgres::NoTls)
            .await
            .expect("session");
    let (notes, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(note)) => {
                    let _ = notes.send((note.process_id(), note.payload().to_string()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    client
        .batch_execute(
            "SET search_path = shop, public; SET app.tenant_id = 'acme'; SET ROLE reporter; LISTEN jobs",
        )
        .await
        .expect("session state");
    let plus_one = client
        .prepare("SELECT $1::int4 + 1")
        .await
        .expect("protocol-level prepare");
    let login_pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let sql_prepared = session(&server).await;
    sql_prepared
        .batch_execute("PREPARE q AS SELECT 1")
        .await
        .expect("SQL PREPARE");

    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        reply["cutover"]["sessions_unmovable"]
            .to_string()
            .contains("1 SQL-level PREPAREd statement(s)"),
        "{reply}"
    );

    assert_served_by(&client, &pair.green).await;
    let row = client
        .query_one(
            "SELECT current_setting('search_path'), current_setting('app.tenant_id'), current_user::text",
            &[],
        )
        .await
        .expect("state on green");
    assert_eq!(row.get::<_, String>(0), "shop, public");
    assert_eq!(row.get::<_, String>(1), "acme");
    assert_eq!(row.get::<_, String>(2), "reporter");
    let answer: i32 = client
        .query_one(&plus_one, &[&41i32])
        .await
        .expect("the prepared statement on green")
        .get(0);
    assert_eq!(answer, 42);

    // Its own NOTIFY comes back with the PID it logged in with; another green session's too.
    client
        .batch_execute("NOTIFY jobs, 'from itself'")
        .await
        .expect("notify");
    let (pid, payload) = tokio::time::timeout(Duration::from_secs(5), notifications.recv())
        .await
        .expect("a notification")
        .expect("open");
    assert_eq!((pid, payload.as_str()), (login_pid, "from itself"));
    pair.green.psql_db(APP_DB, "NOTIFY jobs, 'from green'");
    let (_, payload) = tokio::time::timeout(Duration::from_secs(5), notifications.recv())
        .await
        .expect("a notification from green")
        .expect("open");
    assert_eq!(payload, "from green");

    assert!(
        sql_prepared.simple_query("SELECT 1").await.is_err(),
        "the SQL PREPARE session was closed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_straddling_the_cutover_fails_no_transaction() {
    let (pair, server) = transparent_server("").await;
    let script_dir = tempfile::tempdir().expect("temp dir");
    // Named statements (-M prepared) and the unnamed statement parsed again each time
    // (-M extended) both move.
    let benches: Vec<_> = ["prepared", "extended"]
        .into_iter()
        .map(|mode| {
            let script = script_dir.path().join(format!("{mode}.sql"));
            std::fs::write(
                &script,
                format!(
                    "INSERT INTO orders VALUES (gen_random_uuid(), 'pgbench {mode}');\nSELECT count(*) FROM orders WHERE note = 'none';\n"
                ),
            )
            .expect("script");
            let pgbench = pair.blue.bin("pgbench");
            let port = server.port;
            tokio::task::spawn_blocking(move || {
                let output = Command::new(pgbench)
                    .args(["-n", "-M", mode, "-c", "3", "-j", "1", "-T", "4", "-f"])
                    .arg(&script)
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", TEST_USER, APP_DB])
                    .env("PGPASSWORD", TEST_PASSWORD)
                    .output()
                    .expect("run pgbench");
                (mode, output)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        reply["cutover"]["sessions_moved"].as_u64().unwrap_or(0) >= 6,
        "{reply}"
    );
    for bench in benches {
        let (mode, output) = bench.await.expect("pgbench");
        let text = describe(&output);
        assert_eq!(output.status.code(), Some(0), "-M {mode}: {text}");
        assert!(
            text.contains("number of failed transactions: 0"),
            "-M {mode}: {text}"
        );
        let on_green: i64 = pair
            .green
            .psql_db(
                APP_DB,
                &format!("SELECT count(*) FROM orders WHERE note = 'pgbench {mode}'"),
            )
            .parse()
            .expect("count");
        let processed: i64 = text
            .lines()
            .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
            .and_then(|rest| rest.split('/').next())
            .and_then(|n| n.trim().parse().ok())
            .expect("processed count");
        assert_eq!(
            on_green, processed,
            "every -M {mode} insert is on green\n{text}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_by_the_freeze_can_be_cancelled_and_never_runs() {
    let (pair, server) = transparent_server("freeze_timeout = \"5s\"").await;
    let held = std::sync::Arc::new(session(&server).await);
    let busy = session(&server).await;
    busy.batch_execute("BEGIN; SELECT 1")
        .await
        .expect("a transaction that holds the freeze open");
    let promote = {
        let socket = server.socket_path();
        tokio::spawn(async move { support::pgshift::admin_command(&socket, "promote").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let insert = {
        let held = held.clone();
        tokio::spawn(async move {
            held.simple_query("INSERT INTO orders VALUES (gen_random_uuid(), 'cancelled')")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!insert.is_finished(), "the request is held while frozen");
    held.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel through pgshift");
    let error = tokio::time::timeout(Duration::from_secs(5), insert)
        .await
        .expect("answered while still frozen")
        .expect("task")
        .expect_err("cancelled");
    assert_eq!(
        error.code().map(|code| code.code()),
        Some("57014"),
        "{error}"
    );
    busy.batch_execute("COMMIT").await.expect("commit");
    let reply = promote.await.expect("promote");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_served_by(&held, &pair.green).await;
    for cluster in pair.both() {
        assert_eq!(
            cluster.psql_db(
                APP_DB,
                "SELECT count(*) FROM orders WHERE note = 'cancelled'"
            ),
            "0",
            "the cancelled insert never ran on {}",
            cluster.color_name()
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sequences_sets_greens_sequences_past_blues() {
    let (pair, server) = transparent_server("sync_sequences = true\nsequence_margin = 1000").await;
    let sequences = "CREATE SEQUENCE invoice_no; CREATE SEQUENCE countdown INCREMENT -1";
    pair.blue.psql_db(
        APP_DB,
        &format!(
            "{sequences}; CREATE SEQUENCE blue_only; \
             SELECT nextval('invoice_no') FROM generate_series(1, 5); \
             SELECT nextval('countdown') FROM generate_series(1, 3)"
        ),
    );
    pair.green.psql_db(APP_DB, sequences);

    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    let lines = reply["cutover"]["sequences"].to_string();
    for expected in [
        "\\\"invoice_no\\\" (database app) set to 1005",
        "\\\"countdown\\\" (database app) set to -1003",
        "\\\"blue_only\\\" (database app) is missing on green",
    ] {
        assert!(lines.contains(expected), "{expected}: {reply}");
    }
    assert_eq!(
        pair.green.psql_db(
            APP_DB,
            "SELECT nextval('invoice_no') || ' ' || nextval('countdown')"
        ),
        "1006 -1004"
    );
    server.stop().await;
}

/// Promote with a reverse slot, set up replication green → blue from the reply, then roll
/// back: both directions move every session with no error and no lost write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_promotion_rides_the_reverse_slot_back_to_blue() {
    let (pair, server) = transparent_server("reverse_slot = \"pgshift_reverse\"").await;
    // The reverse publication exists before the slot (a slot decodes with the catalog as it was).
    pair.green.psql_db(
        APP_DB,
        "CREATE PUBLICATION back_pub FOR TABLE public.orders",
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = start_writers(&server, 6, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let promoted = server.admin("promote").await;
    assert_eq!(promoted["ok"], true, "{promoted}");
    let on_blue = promoted["cutover"]["reverse_slot"]["on_blue"]
        .as_str()
        .unwrap_or_else(|| panic!("the reply gives the subscription to create: {promoted}"))
        .replace("<a replication role>", SUPERUSER);
    assert!(
        on_blue.contains("slot_name = 'pgshift_reverse'") && on_blue.contains("copy_data = false"),
        "{on_blue}"
    );
    pair.blue.psql_db(APP_DB, &on_blue);
    let config = server.config_path.to_str().expect("utf-8").to_string();
    let reverse = tokio::task::spawn_blocking(move || {
        pgshift(&["cutover-setup", "--config", &config, "--reverse"])
    })
    .await
    .expect("cutover-setup --reverse");
    assert_eq!(reverse.status.code(), Some(0), "{}", describe(&reverse));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let rolled = server.admin("rollback back to blue").await;
    assert_eq!(rolled["ok"], true, "{rolled}");
    assert_eq!(rolled["cutover"]["to"], "blue", "{rolled}");
    assert!(
        rolled["cutover"]["sessions_moved"].as_u64().unwrap_or(0) >= 6,
        "{rolled}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = collect_writes(writers).await;
    assert_all_present(&pair.blue, &acknowledged);
    eprintln!(
        "promote: {}\nrollback: {}",
        promoted["cutover"], rolled["cutover"]
    );
    server.stop().await;
}

/// `pgshift probe` as the load: 32 sessions writing through pgshift while it promotes; every
/// acknowledged write is looked up on green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_under_32_probe_sessions_loses_nothing() {
    let (pair, server) = transparent_server("").await;
    let blue = pair.blue.dsn(TEST_USER, Some(TEST_PASSWORD), APP_DB);
    let green = pair.green.dsn(TEST_USER, Some(TEST_PASSWORD), APP_DB);
    let setup_pair = format!("{blue},{green}");
    // The probe's table: created on green, then blue; then carried by the publication.
    let setup = setup_pair.clone();
    tokio::task::spawn_blocking(move || {
        pgshift(&["probe", "--setup", &setup, "--verify-timeout", "1s"])
    })
    .await
    .expect("probe --setup");
    pair.blue.psql_db(
        APP_DB,
        "ALTER PUBLICATION shop_pub ADD TABLE public.pgshift_probe",
    );
    pair.green
        .psql_db(APP_DB, "ALTER SUBSCRIPTION shop_sub REFRESH PUBLICATION");
    let setup = setup_pair.clone();
    let ready = tokio::task::spawn_blocking(move || {
        pgshift(&["probe", "--setup", &setup, "--verify-timeout", "30s"])
    })
    .await
    .expect("probe --setup");
    assert_eq!(ready.status.code(), Some(0), "{}", describe(&ready));

    let report_dir = tempfile::tempdir().expect("temp dir");
    let report_path = report_dir.path().join("probe.json");
    let through_pgshift = server.app_dsn();
    let report = report_path.clone();
    let load = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_pgshift"))
            .args([
                "probe",
                "--dsn",
                &through_pgshift,
                "--clients",
                "32",
                "--duration",
                "6s",
                "--rate",
                "20",
                "--verify",
                &green,
                "--verify-timeout",
                "20s",
                "--json",
            ])
            .arg(&report)
            .output()
            .expect("run the probe")
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    let output = load.await.expect("probe");
    let text = describe(&output);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&report_path).unwrap_or_else(|_| panic!("no report\n{text}")),
    )
    .expect("probe JSON");
    assert_eq!(json["errors"]["total"], 0, "{text}");
    assert_eq!(json["sessions_dropped"], 0, "{text}");
    assert_eq!(json["verify"][0]["missing"], 0, "{text}");
    assert!(
        json["verify"][0]["checked"].as_u64().unwrap_or(0) > 100,
        "{text}"
    );
    let stall = json["longest_stall"]["longest_ms"]
        .as_f64()
        .unwrap_or(f64::MAX);
    eprintln!(
        "32 probe sessions: longest stall {stall} ms; cutover {}",
        reply["cutover"]
    );
    assert!(stall <= 1000.0, "longest stall {stall} ms\n{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_abort_stops_a_running_cutover_and_other_commands_wait_their_turn() {
    let (pair, server) = transparent_server("freeze_timeout = \"20s\"").await;
    let busy = session(&server).await;
    busy.batch_execute("BEGIN; INSERT INTO orders VALUES (gen_random_uuid(), 'kept')")
        .await
        .expect("a transaction that holds the freeze open");
    let started = std::time::Instant::now();
    let promote = {
        let socket = server.socket_path();
        tokio::spawn(async move { support::pgshift::admin_command(&socket, "promote").await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A login during the freeze is held at the gate.
    let late = {
        let dsn = server.app_dsn();
        tokio::spawn(async move { connect(&dsn).await })
    };
    let refused = refusal(&server.admin("weight 50").await);
    assert!(
        refused.contains("a transparent cutover to green is in progress (step freeze"),
        "{refused}"
    );
    let aborting = server.admin("cutover abort").await;
    assert_eq!(aborting["ok"], true, "{aborting}");
    let error = refusal(&promote.await.expect("promote"));
    assert!(
        error.contains("cutover aborted at freeze: stopped by `cutover abort`"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "aborted well before freeze_timeout"
    );
    let late = tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .expect("the held login goes on")
        .expect("task");
    assert_served_by(&late, &pair.blue).await;
    busy.batch_execute("COMMIT").await.expect("commit on blue");
    assert_eq!(server.admin("status").await["green_weight"], 0.0);
    assert!(
        refusal(&server.admin("cutover abort").await).starts_with("no cutover is in progress"),
        "once over, there is nothing to abort"
    );
    server.stop().await;
}

/// A walsender through pgshift (logical decoding of blue) is outside the freeze: the cutover
/// does not wait for it, and it streams on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walsender_is_left_out_of_the_freeze() {
    let (pair, server) = transparent_server("freeze_timeout = \"2s\"").await;
    pair.blue.psql_db(
        APP_DB,
        "SELECT pg_create_logical_replication_slot('watcher', 'test_decoding')",
    );
    let mut recvlogical = std::process::Command::new(pair.blue.bin("pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port.to_string(),
            "-U",
            TEST_USER,
        ])
        .args(["-d", APP_DB, "--slot", "watcher", "--start", "-f", "-"])
        .env("PGPASSWORD", TEST_PASSWORD)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pg_recvlogical");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pair
        .blue
        .psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg_recvlogical'")
        != "1"
    {
        assert!(Instant::now() < deadline, "pg_recvlogical never streamed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle = session(&server).await;

    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["cutover"]["sessions_moved"], 1, "{reply}");
    assert_served_by(&idle, &pair.green).await;
    assert!(
        recvlogical.try_wait().expect("poll").is_none(),
        "the walsender streams on"
    );
    let _ = recvlogical.kill();
    let _ = recvlogical.wait();
    server.stop().await;
}

/// SET SESSION AUTHORIZATION (a superuser's) is replayed first on the new backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_authorization_moves_with_the_session() {
    let (pair, server) = transparent_server("").await;
    pair.blue
        .psql("CREATE ROLE cutover_admin SUPERUSER LOGIN PASSWORD 'admin-pw'");
    let verifier = pair
        .blue
        .psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'cutover_admin'");
    pair.green.psql(&format!(
        "CREATE ROLE cutover_admin SUPERUSER LOGIN PASSWORD '{verifier}'"
    ));
    let admin = connect(&format!(
        "host=127.0.0.1 port={} user=cutover_admin password=admin-pw dbname={APP_DB}",
        server.port
    ))
    .await;
    admin
        .batch_execute(&format!("SET SESSION AUTHORIZATION {TEST_USER}"))
        .await
        .expect("set session authorization");

    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["cutover"]["sessions_moved"], 1, "{reply}");
    assert_served_by(&admin, &pair.green).await;
    let row = admin
        .query_one("SELECT session_user::text, current_user::text", &[])
        .await
        .expect("who");
    assert_eq!(row.get::<_, String>(0), TEST_USER);
    assert_eq!(row.get::<_, String>(1), TEST_USER);
    server.stop().await;
}
