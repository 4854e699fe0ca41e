//! Every protocol feature through pgshift against real Postgres: extended queries with many
//! types, COPY both ways, LISTEN/NOTIFY, huge values, pgbench, every auth method, walsenders.

mod support;

use std::path::Path;
use std::process::Command;

use futures_util::SinkExt;
use support::pgshift::{TestProxy, password_of, server_port};
use support::shared_pair;

/// pgbench with `args`, as `bulk` on database `other_db` at `127.0.0.1:port`.
fn pgbench(bin: &Path, port: u16, args: &[&str]) -> Command {
    let mut command = Command::new(bin);
    command.args(args).args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "bulk",
        "other_db",
    ]);
    command
}

/// Runs `command` off the async runtime and returns its stdout; panics unless it exits 0.
async fn run_ok(mut command: Command, what: &str) -> String {
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_method_passes_through() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    for user in ["pgshift_test", "bulk", "md5_user", "plain_user"] {
        for _ in 0..4 {
            let client = proxy
                .connect(&proxy.dsn(user, password_of(user), "app"))
                .await
                .unwrap_or_else(|error| panic!("{user} logs in through pgshift: {error}"));
            let row = client
                .query_one("SELECT current_user::text", &[])
                .await
                .expect("query");
            assert_eq!(row.get::<_, String>(0), user);
        }
    }
    let wrong = proxy
        .connect(&proxy.dsn("pgshift_test", Some("wrong"), "app"))
        .await;
    let error = wrong.expect_err("a wrong password is refused");
    assert_eq!(support::pgshift::sqlstate(&error).as_deref(), Some("28P01"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_many_types() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let client = proxy.connect(&proxy.app_dsn()).await.expect("connect");
    let statement = client
        .prepare("SELECT $1::int2, $2::int4, $3::int8, $4::float8, $5::text, $6::bytea, $7::bool, $8::int4[], $9::text::jsonb::text")
        .await
        .expect("prepare");
    for i in 0..200i32 {
        let bytes = vec![i as u8; (i as usize) * 3];
        let text = format!("row {i} ✓");
        let array = vec![i, -i, 7];
        let row = client
            .query_one(
                &statement,
                &[
                    &(i as i16),
                    &i,
                    &(i64::from(i) << 33),
                    &(f64::from(i) / 3.0),
                    &text,
                    &bytes,
                    &(i % 2 == 0),
                    &array,
                    &"{\"k\": 1}",
                ],
            )
            .await
            .expect("query");
        assert_eq!(row.get::<_, i16>(0), i as i16);
        assert_eq!(row.get::<_, i64>(2), i64::from(i) << 33);
        assert_eq!(row.get::<_, String>(4), text);
        assert_eq!(row.get::<_, Vec<u8>>(5), bytes);
        assert_eq!(row.get::<_, Vec<i32>>(7), array);
    }
    // Pipelined: many queries in flight at once on one connection.
    let futures: Vec<_> = (0..100i64)
        .map(|i| {
            let client = &client;
            async move { client.query_one("SELECT $1::int8 * 2", &[&i]).await }
        })
        .collect();
    for (i, result) in futures_util::future::join_all(futures)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(result.expect("pipelined").get::<_, i64>(0), i as i64 * 2);
    }
    // An error inside an extended batch, then the session keeps working.
    let error = client
        .query_one("SELECT 1/0", &[])
        .await
        .expect_err("division by zero");
    assert_eq!(support::pgshift::sqlstate(&error).as_deref(), Some("22012"));
    assert_eq!(
        client
            .query_one("SELECT 41 + 1", &[])
            .await
            .expect("after error")
            .get::<_, i32>(0),
        42
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_a_hundred_thousand_rows() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 100", None).await;
    let client = proxy.connect(&proxy.app_dsn()).await.expect("connect");
    client
        .batch_execute("CREATE TEMP TABLE copied (id int8, label text)")
        .await
        .expect("create");
    let mut expected_sum = 0i64;
    let mut payload = String::new();
    for i in 0..100_000i64 {
        expected_sum += i;
        payload.push_str(&format!("{i}\tlabel-{i}\n"));
    }
    let sink = client
        .copy_in("COPY copied FROM STDIN")
        .await
        .expect("copy in");
    let mut sink = std::pin::pin!(sink);
    for chunk in payload.as_bytes().chunks(64 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .expect("send chunk");
    }
    let rows = sink.finish().await.expect("finish copy");
    assert_eq!(rows, 100_000);
    let row = client
        .query_one("SELECT sum(id)::int8, count(*) FROM copied", &[])
        .await
        .expect("sum");
    assert_eq!(row.get::<_, i64>(0), expected_sum);
    let stream = client
        .copy_out("COPY copied TO STDOUT")
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(stream)
        .await
        .expect("copy out rows");
    let text: Vec<u8> = chunks.concat();
    assert_eq!(text, payload.as_bytes());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_across_two_proxied_sessions() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 100", None).await;
    let (listener, mut connection) =
        tokio_postgres::connect(&proxy.app_dsn(), tokio_postgres::NoTls)
            .await
            .expect("connect listener");
    let (notifications_tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(note) = message {
                let _ = notifications_tx.send(note);
            }
        }
    });
    listener
        .batch_execute("LISTEN pgshift_channel")
        .await
        .expect("listen");
    let listener_pid: i32 = listener
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let notifier = proxy
        .connect(&proxy.app_dsn())
        .await
        .expect("connect notifier");
    let notifier_pid: i32 = notifier
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    notifier
        .batch_execute("NOTIFY pgshift_channel, 'hello'")
        .await
        .expect("notify");
    let note = tokio::time::timeout(std::time::Duration::from_secs(5), notifications.recv())
        .await
        .expect("notification arrives")
        .expect("notification");
    assert_eq!(note.channel(), "pgshift_channel");
    assert_eq!(note.payload(), "hello");
    // The PID in the notification is the notifier's backend PID, as the client saw it.
    assert_eq!(note.process_id(), notifier_pid);
    assert_ne!(listener_pid, notifier_pid);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mebibyte_bytea_round_trip() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let client = proxy.connect(&proxy.app_dsn()).await.expect("connect");
    let size = 64 * 1024 * 1024;
    let value: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let row = client
        .query_one(
            "SELECT $1::bytea, md5($1::bytea), length($1::bytea)",
            &[&value],
        )
        .await
        .expect("round trip");
    let echoed: Vec<u8> = row.get(0);
    assert!(echoed == value, "the 64 MiB value came back changed");
    assert_eq!(row.get::<_, i32>(2), size);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_runs_without_failures() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50\nsticky = \"database\"", None).await;
    // pgbench's tables live in other_db on both colors.
    for cluster in pair.both() {
        let init = pgbench(
            &cluster.bin("pgbench"),
            cluster.port(),
            &["-i", "-q", "-s", "1"],
        );
        run_ok(init, "pgbench -i").await;
    }
    let run = pgbench(
        &pair.blue.bin("pgbench"),
        proxy.port,
        &["-n", "-M", "prepared", "-c", "4", "-j", "2", "-T", "3"],
    );
    let stdout = run_ok(run, "pgbench").await;
    assert!(
        stdout.contains("number of failed transactions: 0 (0.000%)"),
        "{stdout}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsender_sessions_land_on_blue() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 100", None).await;
    let port = proxy.port;
    let mut psql = Command::new(pair.blue.bin("psql"));
    psql.args([
        &format!("host=127.0.0.1 port={port} user=pgshift_test password=pgshift_test_pw dbname=app replication=database"),
        "-Atc",
        "IDENTIFY_SYSTEM",
        "-c",
        "SELECT inet_server_port()",
    ]);
    let stdout = run_ok(psql, "psql").await;
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].ends_with("|app"),
        "IDENTIFY_SYSTEM answered: {stdout}"
    );
    assert_eq!(
        lines.last().copied(),
        Some(pair.blue.port().to_string().as_str())
    );
    // An ordinary session at weight 100 goes green.
    let client = proxy.connect(&proxy.app_dsn()).await.expect("connect");
    assert_eq!(server_port(&client).await, pair.green.port());
    proxy.stop().await;
}
