//! The automatic rollout against real blue and green clusters under a steady, reconnecting
//! load: a healthy green climbs every step to promotion; a broken, slow or login-refusing
//! green is rolled back or paused with a reason; low traffic stalls; a blue that errs as much
//! as green does not count against green; a restart resumes at the same step.
//!
//! Evaluations are driven with `rollout evaluate` (the "evaluate now" hook) on short real
//! durations instead of long sleeps.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::pgshift::{TestServer, server_port};
use support::shared_pair;

/// Rollout settings for tests: short dwell and window, small sample sizes.
fn rollout_config(dwell: &str, triggers: &str) -> String {
    format!(
        "[rollout]\nsteps = [10, 50, 100]\nstep_dwell = \"{dwell}\"\nevaluate_every = \"1h\"\nwindow = \"1s\"\nmin_requests = 30\nmin_connects = 5\nmax_no_verdict = 3\ndrain_grace = \"100ms\"\n{triggers}"
    )
}

fn trigger(metric: &str, above: f64, action: &str) -> String {
    format!(
        "[[rollout.trigger]]\nmetric = \"{metric}\"\nabove = {above}\naction = \"{action}\"\nfor = 2\n"
    )
}

/// Clients that each open a session, run a few queries and reconnect, so that new sessions
/// keep following the weight.
struct Load {
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(dsn: String, sql: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (dsn, sql, stop, queries) =
                    (dsn.clone(), sql.to_string(), stop.clone(), queries.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((client, connection)) =
                            tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await
                        else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let driver = tokio::spawn(connection);
                        for _ in 0..5 {
                            let _ = client.simple_query(&sql).await;
                            queries.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(client);
                        let _ = driver.await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            queries,
            tasks,
        }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.queries.load(Ordering::Relaxed)
    }
}

/// Evaluates every 150 ms until `done` says the status is what the test waits for.
async fn evaluate_until(
    server: &TestServer,
    within: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let reply = server.admin("rollout evaluate").await;
        assert_eq!(reply["ok"], true, "{reply}");
        let status = server.admin("status").await;
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; last status: {status}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The share of `samples` new sessions that land on green.
async fn green_share(server: &TestServer, green_port: u16, samples: u32) -> f64 {
    let mut green = 0;
    for _ in 0..samples {
        let (client, _) = support::pgshift::connect_with_outcome(&server.bulk_dsn()).await;
        if server_port(&client).await == green_port {
            green += 1;
        }
    }
    f64::from(green) / f64::from(samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_green_climbs_every_step_to_promotion() {
    let pair = shared_pair();
    let triggers =
        trigger("error_rate", 0.05, "rollback") + &trigger("latency_p95_ms", 500.0, "pause");
    let server = TestServer::start(
        pair,
        &rollout_config("1s", &triggers),
        "green_weight = 0",
        Some(3),
    )
    .await;
    let load = Load::start(server.bulk_dsn(), "SELECT 1", 3);
    let started = server.admin("rollout start").await;
    assert_eq!(started["ok"], true, "{started}");
    assert_eq!(started["green_weight"], 10.0);
    for step_weight in [10.0, 50.0] {
        let status = server.admin("status").await;
        assert_eq!(status["green_weight"], step_weight, "{status}");
        // Hold the step while measuring the share of new sessions it sends to green.
        assert_eq!(server.admin("rollout pause").await["ok"], true);
        let samples = 300;
        let share = green_share(&server, pair.green.port(), samples).await;
        let p = step_weight / 100.0;
        let sd = (p * (1.0 - p) / f64::from(samples)).sqrt();
        assert!(
            (share - p).abs() <= 6.11 * sd,
            "share {share} at step {step_weight}"
        );
        assert_eq!(server.admin("rollout resume").await["ok"], true);
        evaluate_until(
            &server,
            Duration::from_secs(15),
            "the next step",
            |status| status["green_weight"].as_f64() != Some(step_weight),
        )
        .await;
    }
    let status = evaluate_until(&server, Duration::from_secs(15), "promotion", |status| {
        status["state"] == "promoted"
    })
    .await;
    assert_eq!(status["green_weight"], 100.0);
    let actions: Vec<&str> = status["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter_map(|decision| decision["action"].as_str())
        .collect();
    assert!(actions.contains(&"advance"), "{actions:?}");
    assert!(load.stop().await > 100);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_green_is_rolled_back_before_the_next_step() {
    let pair = shared_pair();
    let table = format!("rollout_only_blue_{}", std::process::id());
    pair.blue.psql_db(
        "app",
        &format!("CREATE TABLE {table} (id int); GRANT SELECT ON {table} TO PUBLIC"),
    );
    let triggers = trigger("error_rate", 0.05, "rollback");
    let server = TestServer::start(
        pair,
        &rollout_config("30s", &triggers),
        "green_weight = 0",
        Some(4),
    )
    .await;
    let load = Load::start(
        server.bulk_dsn(),
        &format!("SELECT count(*) FROM {table}"),
        3,
    );
    assert_eq!(server.admin("rollout start").await["ok"], true);
    let status = evaluate_until(&server, Duration::from_secs(15), "the rollback", |status| {
        status["state"] == "rolled_back"
    })
    .await;
    assert_eq!(status["green_weight"], 0.0);
    let reason = status["reason"].as_str().expect("reason");
    assert!(
        reason.contains("error_rate") && reason.contains("above 0.05"),
        "{reason}"
    );
    assert_eq!(
        status["draining"]["green"], true,
        "green is drained after a rollback"
    );
    let steps: Vec<&serde_json::Value> = status["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter(|decision| decision["action"] == "advance")
        .collect();
    assert!(steps.is_empty(), "advanced before rolling back: {steps:?}");
    load.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_green_is_paused_and_statement_timeouts_count_as_errors() {
    let pair = shared_pair();
    let function = format!("rollout_slow_{}", std::process::id());
    pair.blue.psql_db(
        "app",
        &format!("CREATE FUNCTION {function}() RETURNS int LANGUAGE sql AS 'SELECT 1'"),
    );
    pair.green.psql_db(
        "app",
        &format!("CREATE FUNCTION {function}() RETURNS int LANGUAGE sql AS 'SELECT 1 FROM pg_sleep(0.06)'"),
    );
    let triggers = trigger("latency_p95_ms", 40.0, "pause");
    let server = TestServer::start(
        pair,
        &rollout_config("30s", &triggers),
        "green_weight = 0",
        Some(5),
    )
    .await;
    let load = Load::start(server.bulk_dsn(), &format!("SELECT {function}()"), 4);
    assert_eq!(server.admin("rollout start").await["ok"], true);
    let status = evaluate_until(&server, Duration::from_secs(20), "the pause", |status| {
        status["state"] == "paused"
    })
    .await;
    assert!(
        status["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("latency_p95_ms")),
        "{status}"
    );
    load.stop().await;
    server.stop().await;

    // The same green with a statement_timeout below its latency: 57014 counts as an error.
    let triggers = trigger("error_rate", 0.05, "rollback");
    let server = TestServer::start(
        pair,
        &rollout_config("30s", &triggers),
        "green_weight = 0",
        Some(6),
    )
    .await;
    let dsn = format!("{} options='-c statement_timeout=30'", server.bulk_dsn());
    let load = Load::start(dsn, &format!("SELECT {function}()"), 4);
    assert_eq!(server.admin("rollout start").await["ok"], true);
    let status = evaluate_until(&server, Duration::from_secs(20), "the rollback", |status| {
        status["state"] == "rolled_back"
    })
    .await;
    assert!(
        status["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("error_rate")),
        "{status}"
    );
    load.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_refusing_logins_is_rolled_back_on_connect_errors() {
    let pair = shared_pair();
    let user = format!("rollout_login_{}", std::process::id());
    pair.blue
        .psql(&format!("CREATE ROLE {user} LOGIN PASSWORD 'pw'"));
    let triggers = trigger("connect_error_rate", 0.2, "rollback");
    let server = TestServer::start(
        pair,
        &rollout_config("30s", &triggers),
        "green_weight = 0",
        Some(7),
    )
    .await;
    let load = Load::start(server.dsn(&user, Some("pw"), "app"), "SELECT 1", 3);
    assert_eq!(server.admin("rollout start").await["ok"], true);
    let status = evaluate_until(&server, Duration::from_secs(15), "the rollback", |status| {
        status["state"] == "rolled_back"
    })
    .await;
    assert!(
        status["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("connect_error_rate")),
        "{status}"
    );
    assert!(
        status["green"]["connect_errors"]
            .as_u64()
            .is_some_and(|errors| errors > 0),
        "{status}"
    );
    load.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_traffic_gives_no_verdict_then_stalls() {
    let pair = shared_pair();
    let triggers = trigger("error_rate", 0.05, "rollback");
    let server = TestServer::start(
        pair,
        &rollout_config("100ms", &triggers),
        "green_weight = 0",
        None,
    )
    .await;
    assert_eq!(server.admin("rollout start").await["ok"], true);
    let first = server.admin("rollout evaluate").await;
    assert_eq!(first["verdict"], "none", "{first}");
    assert!(
        first["evaluation"]
            .as_str()
            .is_some_and(|text| text.contains("insufficient data")),
        "{first}"
    );
    assert_eq!(
        server.admin("rollout next").await["ok"],
        false,
        "no verdict, no advance"
    );
    let status = evaluate_until(&server, Duration::from_secs(5), "the stall", |status| {
        status["state"] == "stalled"
    })
    .await;
    assert_eq!(
        status["green_weight"], 10.0,
        "no advance and no rollback without a verdict"
    );
    assert!(
        status["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("max_session_age")),
        "{status}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_that_errs_as_much_as_green_does_not_count_against_it() {
    let pair = shared_pair();
    let triggers = trigger("error_rate_vs_blue", 0.02, "rollback");
    let server = TestServer::start(
        pair,
        &rollout_config("1s", &triggers),
        "green_weight = 0",
        Some(8),
    )
    .await;
    // One query in five fails, on both colors alike.
    let sql = "SELECT 1 / (floor(random() * 5))::int";
    let load = Load::start(server.bulk_dsn(), sql, 4);
    assert_eq!(server.admin("rollout start").await["ok"], true);
    let status = evaluate_until(&server, Duration::from_secs(25), "promotion", |status| {
        status["state"] == "promoted" || status["state"] == "rolled_back"
    })
    .await;
    assert_eq!(status["state"], "promoted", "{status}");
    load.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_at_the_same_step_with_the_dwell_clock_running() {
    let pair = shared_pair();
    let triggers = trigger("error_rate", 0.05, "rollback");
    let mut server = TestServer::start(
        pair,
        &rollout_config("1h", &triggers),
        "green_weight = 20",
        None,
    )
    .await;
    assert_eq!(server.admin("rollout start").await["ok"], true);
    let before = server.admin("status").await;
    assert_eq!(
        (before["step"].clone(), before["green_weight"].clone()),
        (1.into(), 50.0.into())
    );
    server.restart(None).await.expect("restart");
    let after = server.admin("status").await;
    assert_eq!(after["state"], "running");
    assert_eq!(after["step"], 1);
    assert_eq!(after["green_weight"], 50.0);
    let at = |status: &serde_json::Value| {
        humantime::parse_rfc3339(status["next_step_at"].as_str().expect("next_step_at"))
            .expect("RFC 3339")
    };
    let drift = at(&after)
        .duration_since(at(&before))
        .unwrap_or_else(|error| error.duration());
    assert!(
        drift <= Duration::from_secs(1),
        "the dwell clock restarted or jumped by {drift:?}"
    );
    server.stop().await;
}
