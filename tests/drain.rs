//! Drains, promote and rollback closing the losing color's sessions — at idle points, at
//! `drain_rate` per second, after `drain_grace`, and by `drain_timeout` at the latest — plus
//! config reloads and `--reset-state`.

mod support;

use std::time::{Duration, Instant};

use support::pgshift::{TestServer, connect_with_outcome, expect_ended_with, server_port};
use support::shared_pair;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_rate_spreads_the_closes() {
    let pair = shared_pair();
    let server =
        TestServer::start(pair, "[rollout]\ndrain_rate = 2", "green_weight = 0", None).await;
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        let (client, outcome) = connect_with_outcome(&server.app_dsn()).await;
        outcomes.push((client, outcome));
    }
    let drained_at = Instant::now();
    assert_eq!(server.admin("drain blue").await["ok"], true);
    let mut closed_after = Vec::new();
    for (_client, outcome) in outcomes {
        expect_ended_with(
            outcome,
            Duration::from_secs(6),
            "57P01",
            "a drained idle session",
        )
        .await;
        closed_after.push(drained_at.elapsed());
    }
    let last = closed_after.iter().max().expect("closes");
    // 2 per second, the first at once: the sixth goes after about 2.5 s.
    assert!(
        *last >= Duration::from_millis(2000),
        "six sessions closed within {last:?} at drain_rate 2"
    );
    let status = server.admin("status").await;
    assert_eq!(status["blue"]["draining_sessions"], 0, "{status}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_ends_a_transaction_that_never_finishes() {
    let pair = shared_pair();
    let server = TestServer::start(
        pair,
        "[rollout]\ndrain_timeout = \"1s\"",
        "green_weight = 0",
        None,
    )
    .await;
    let (stuck, outcome) = connect_with_outcome(&server.app_dsn()).await;
    stuck.batch_execute("BEGIN").await.expect("begin");
    let drained_at = Instant::now();
    assert_eq!(server.admin("drain blue").await["ok"], true);
    let error = expect_ended_with(outcome, Duration::from_secs(4), "57P01", "drain_timeout").await;
    assert!(
        drained_at.elapsed() >= Duration::from_millis(900),
        "cut before drain_timeout"
    );
    let message = error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("rolled back"),
        "the error says the transaction is gone: {message}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_drains_blue_after_the_grace_and_rollback_drains_green() {
    let pair = shared_pair();
    let server = TestServer::start(
        pair,
        "[rollout]\ndrain_grace = \"700ms\"",
        "green_weight = 0",
        None,
    )
    .await;
    let (blue_session, blue_outcome) = connect_with_outcome(&server.bulk_dsn()).await;
    assert_eq!(server_port(&blue_session).await, pair.blue.port());
    let promoted_at = Instant::now();
    let reply = server.admin("promote").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "promoted");
    let (fresh, _) = connect_with_outcome(&server.app_dsn()).await;
    assert_eq!(
        server_port(&fresh).await,
        pair.green.port(),
        "new sessions go green at once"
    );
    let status = server.admin("status").await;
    assert_eq!(status["green_weight"], 100.0);
    assert_eq!(status["draining"]["blue"], true);
    // The session on blue is closed at its idle point, but only after the grace.
    expect_ended_with(
        blue_outcome,
        Duration::from_secs(3),
        "57P01",
        "blue drained after promote",
    )
    .await;
    assert!(
        promoted_at.elapsed() >= Duration::from_millis(650),
        "closed during drain_grace"
    );

    // Rollback is the way back: it undrains the blue the promote drained.
    let reply = server.admin("rollback green is too slow").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        reply["change"].to_string().contains("blue undrained"),
        "{reply}"
    );
    let status = server.admin("status").await;
    assert_eq!(status["state"], "rolled_back");
    assert_eq!(status["reason"], "green is too slow");
    assert_eq!(status["draining"]["green"], true);
    let decisions = status["decisions"].as_array().expect("decisions");
    assert_eq!(decisions[0]["action"], "rollback");
    assert!(
        decisions[0]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("green is too slow"))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_pins_and_keeps_the_weight() {
    let pair = shared_pair();
    let mut server = TestServer::start(pair, "", "green_weight = 0", None).await;
    assert_eq!(server.admin("weight 100").await["ok"], true);
    let original = std::fs::read_to_string(&server.config_path).expect("config");
    // A config pin sends tenant_42 back to blue; the weight stays what the admin set.
    std::fs::write(
        &server.config_path,
        format!("{original}\n[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"blue\"\n"),
    )
    .expect("edit config");
    let reply = server.admin("reload").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        reply["applied"]
            .as_array()
            .expect("applied")
            .contains(&"routing".into()),
        "{reply}"
    );
    let (pinned, _) = connect_with_outcome(&server.dsn("bulk", None, "tenant_42")).await;
    assert_eq!(server_port(&pinned).await, pair.blue.port());
    let (other, _) = connect_with_outcome(&server.bulk_dsn()).await;
    assert_eq!(server_port(&other).await, pair.green.port());
    assert_eq!(server.admin("status").await["green_weight"], 100.0);

    // A broken config changes nothing.
    std::fs::write(&server.config_path, format!("{original}\nbogus_key = 1\n"))
        .expect("break config");
    let reply = server.admin("reload").await;
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|error| error.contains("bogus_key")),
        "{reply}"
    );
    let (still_pinned, _) = connect_with_outcome(&server.dsn("bulk", None, "tenant_42")).await;
    assert_eq!(server_port(&still_pinned).await, pair.blue.port());

    // A new listen address needs a restart, and says so.
    let moved = original.replace(&format!("127.0.0.1:{}", server.port), "127.0.0.1:1");
    std::fs::write(&server.config_path, moved).expect("move listen");
    let reply = server.admin("reload").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        reply["needs_restart"]
            .as_array()
            .expect("needs_restart")
            .contains(&"listen.addr".into())
    );
    std::fs::write(&server.config_path, &original).expect("restore config");

    // --reset-state discards the saved weight.
    server.restart_with(None, true).await.expect("restart");
    assert_eq!(server.admin("status").await["green_weight"], 0.0);
    server.stop().await;
}
