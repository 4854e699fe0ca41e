//! `[routing] max_session_age`: old sessions are closed with 57P01 at an idle point, so that
//! application pools reconnect and follow the weight — never inside a transaction.

mod support;

use std::time::{Duration, Instant};

use support::pgshift::{TestProxy, sqlstate};
use support::shared_pair;

/// Connects through the proxy and keeps the connection's ending error.
async fn connect(
    proxy: &TestProxy,
) -> (
    tokio_postgres::Client,
    tokio::sync::oneshot::Receiver<Option<tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(&proxy.app_dsn(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (ended, outcome) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = ended.send(connection.await.err());
    });
    (client, outcome)
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

    let idle_error = tokio::time::timeout(Duration::from_secs(5), idle_outcome)
        .await
        .expect("the idle session is closed")
        .expect("outcome")
        .expect("an error");
    assert_eq!(
        sqlstate(&idle_error).as_deref(),
        Some("57P01"),
        "{idle_error}"
    );
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
    let busy_error = tokio::time::timeout(Duration::from_secs(3), busy_outcome)
        .await
        .expect("closed once idle")
        .expect("outcome")
        .expect("an error");
    assert_eq!(sqlstate(&busy_error).as_deref(), Some("57P01"));

    // A young session is left alone.
    let (young, _) = connect(&proxy).await;
    young
        .batch_execute("SELECT 1")
        .await
        .expect("a new session works");
    proxy.stop().await;
}
