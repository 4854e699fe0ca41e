//! `[routing] max_session_age`: old sessions are closed with 57P01 at an idle point, so that
//! application pools reconnect and follow the weight — never inside a transaction.

mod support;

use std::time::{Duration, Instant};

use support::pgshift::{Outcome, TestProxy, connect_with_outcome, expect_ended_with};
use support::shared_pair;

/// Connects through the proxy and keeps the connection's ending error.
async fn connect(proxy: &TestProxy) -> (tokio_postgres::Client, Outcome) {
    connect_with_outcome(&proxy.app_dsn()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_sessions_close_at_idle_points_only() {
    let pair = shared_pair();
    let proxy = TestProxy::start(
        pair,
        "",
        "green_weight = 50\nmax_session_age = \"2s\"",
        None,
    )
    .await;
    let opened = Instant::now();
    let (_idle, idle_outcome) = connect(&proxy).await;
    let (busy, mut busy_outcome) = connect(&proxy).await;
    busy.batch_execute("BEGIN; SELECT 1").await.expect("begin");

    let idle_error = expect_ended_with(
        idle_outcome,
        Duration::from_secs(5),
        "57P01",
        "the idle session is closed",
    )
    .await;
    assert!(
        opened.elapsed() >= Duration::from_secs(2),
        "closed before max_session_age"
    );
    let message = idle_error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("max_session_age"), "{message}");

    // Inside its transaction the old session keeps working as long as it likes.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        busy_outcome.try_recv().is_err(),
        "closed inside a transaction"
    );
    busy.batch_execute("SELECT pg_sleep(0.2)")
        .await
        .expect("still serving the transaction");
    busy.batch_execute("COMMIT").await.expect("commit");
    expect_ended_with(
        busy_outcome,
        Duration::from_secs(3),
        "57P01",
        "closed once idle",
    )
    .await;

    // A young session is left alone.
    let (young, _) = connect(&proxy).await;
    young
        .batch_execute("SELECT 1")
        .await
        .expect("a new session works");
    proxy.stop().await;
}
