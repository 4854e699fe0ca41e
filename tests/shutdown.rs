//! Graceful shutdown of the real `pgshift run` binary on SIGTERM: an open transaction may
//! finish and commit, an idle session is closed at once with 57P01, new clients get 57P03,
//! and the process exits 0.

mod support;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::pgshift::{
    config_text, connect_with_outcome as connect, expect_ended_with, sqlstate, write_config,
};
use support::{free_port, shared_pair};

/// Starts `pgshift run` and waits until it accepts connections.
fn start_binary(config: &std::path::Path, port: u16) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(["run", "--config"])
        .arg(config)
        .stderr(Stdio::null())
        .spawn()
        .expect("pgshift run starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pgshift did not start listening");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pgshift exited at start with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits (off the runtime) for `child` to exit.
async fn exit_status(mut child: Child) -> ExitStatus {
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait")
}

/// The SCRAM test user's DSN for database `app` through pgshift on `port`.
fn app_dsn(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=pgshift_test password=pgshift_test_pw dbname=app")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_transactions_finish_and_closes_idle_sessions() {
    let pair = shared_pair();
    let port = free_port();
    let (_dir, path) = write_config(&config_text(pair, port, "", "green_weight = 0"));
    let child = start_binary(&path, port);
    let dsn = app_dsn(port);
    let table = format!("shutdown_{}", std::process::id());
    let direct = pair.blue.connect_app().await;
    direct
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .expect("create");

    let (busy, busy_outcome) = connect(&dsn).await;
    let (_idle, idle_outcome) = connect(&dsn).await;
    busy.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
        .await
        .expect("begin");

    signal(&child, "TERM");
    expect_ended_with(
        idle_outcome,
        Duration::from_secs(3),
        "57P01",
        "the idle session is closed at once",
    )
    .await;

    // New clients are refused while the transaction finishes.
    let Err(refused) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await else {
        panic!("a new client was accepted during shutdown");
    };
    assert_eq!(sqlstate(&refused).as_deref(), Some("57P03"), "{refused}");

    busy.batch_execute(&format!("INSERT INTO {table} VALUES (2)"))
        .await
        .expect("still in the transaction");
    busy.batch_execute("COMMIT").await.expect("commit");
    expect_ended_with(
        busy_outcome,
        Duration::from_secs(3),
        "57P01",
        "closed after its transaction",
    )
    .await;

    let status = exit_status(child).await;
    assert!(status.success(), "pgshift exited with {status}");
    let count: i64 = direct
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 2, "the transaction committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_ends_stuck_transactions_and_a_second_signal_exits_at_once() {
    let pair = shared_pair();
    let port = free_port();
    let extra = "shutdown_timeout = \"1s\"";
    let (_dir, path) = write_config(&config_text(pair, port, extra, "green_weight = 100"));
    let child = start_binary(&path, port);
    let dsn = app_dsn(port);
    let (stuck, stuck_outcome) = connect(&dsn).await;
    stuck.batch_execute("BEGIN").await.expect("begin");
    let signalled = Instant::now();
    signal(&child, "TERM");
    let deadline = Duration::from_secs(5);
    expect_ended_with(stuck_outcome, deadline, "57P01", "ended at the deadline").await;
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "ended before shutdown_timeout"
    );
    let status = exit_status(child).await;
    assert!(status.success());

    // A second signal does not wait for anyone.
    let child = start_binary(&path, port);
    let (busy, _outcome) = connect(&dsn).await;
    busy.batch_execute("BEGIN").await.expect("begin");
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, "INT");
    let started = Instant::now();
    let status = exit_status(child).await;
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "second signal waited"
    );
    assert!(!status.success());
}
