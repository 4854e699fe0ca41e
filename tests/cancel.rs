//! Cancel requests through pgshift: tokio-postgres's CancelToken and psql's SIGINT cancel
//! reach the right backend in both colors and no other; the client sees the backend's PID; a
//! protocol 3.2 session's 32-byte key is replaced and mapped back (scripted backend).

mod support;

use std::time::{Duration, Instant};

use pgshift::color::Color;
use support::pgshift::{TestProxy, sqlstate};
use support::shared_pair;
use support::wire::{cancel_packet, message, read_message, read_until, send_query, startup_packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_token_stops_only_its_own_query_in_both_colors() {
    let pair = shared_pair();
    for weight in ["0", "100"] {
        let proxy = TestProxy::start(pair, "", &format!("green_weight = {weight}"), None).await;
        let victim = proxy.connect(&proxy.app_dsn()).await.expect("connect");
        let bystander = proxy.connect(&proxy.app_dsn()).await.expect("connect");
        let token = victim.cancel_token();
        let bystander_query = tokio::spawn(async move {
            bystander
                .query_one("SELECT pg_sleep(2), 1", &[])
                .await
                .map(|_| ())
        });
        let victim_query = tokio::spawn(async move {
            victim
                .query_one("SELECT pg_sleep(30)", &[])
                .await
                .map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cancelled_at = Instant::now();
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel sent");
        let error = victim_query
            .await
            .expect("join")
            .expect_err("the query was cancelled");
        assert_eq!(sqlstate(&error).as_deref(), Some("57014"));
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(1),
            "cancel took {:?}",
            cancelled_at.elapsed()
        );
        bystander_query
            .await
            .expect("join")
            .expect("the other session's query was not cancelled");
        let stats = &proxy.proxy().shared().stats;
        // A query the client cancelled is not counted against the backend's color.
        let color = if weight == "0" {
            Color::Blue
        } else {
            Color::Green
        };
        let snapshot = stats.color(color).snapshot();
        assert_eq!(
            snapshot.errors_by_sqlstate.get(b"57014"),
            None,
            "{snapshot:?}"
        );
        assert_eq!(snapshot.request_errors, 0);
        // The cancel is counted once its connection to the backend closes, which may come
        // just after the 57014 reached the client.
        let deadline = Instant::now() + Duration::from_secs(3);
        while stats
            .cancel_forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
            != 1
        {
            assert!(
                Instant::now() < deadline,
                "the cancel was not counted as forwarded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sigint_cancels_through_pgshift() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let mut psql = std::process::Command::new(pair.blue.bin("psql"))
        .args([&proxy.app_dsn(), "-c", "SELECT pg_sleep(30)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql starts");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let signalled_at = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &psql.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let output = tokio::task::spawn_blocking(move || {
        let mut stderr = String::new();
        use std::io::Read;
        psql.stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        let status = psql.wait().expect("psql exits");
        (status, stderr)
    })
    .await
    .expect("join");
    assert!(
        signalled_at.elapsed() < Duration::from_secs(1),
        "psql took {:?}",
        signalled_at.elapsed()
    );
    assert!(!output.0.success());
    assert!(
        output.1.contains("canceling statement due to user request"),
        "psql said: {}",
        output.1
    );
    proxy.stop().await;
}

/// Logs in with the trusted bulk user over a raw socket; returns the stream and the key.
async fn raw_login(port: u16, minor: u16) -> (TcpStream, Vec<(u8, Vec<u8>)>, i32, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream
        .write_all(&startup_packet(
            3,
            minor,
            &[("user", "bulk"), ("database", "app")],
        ))
        .await
        .expect("startup");
    let (ready, before) = read_until(&mut stream, b'Z', Duration::from_secs(5)).await;
    assert!(ready.is_some(), "no ReadyForQuery; got {before:?}");
    let key = before
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .expect("BackendKeyData")
        .1
        .clone();
    let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    (stream, before, pid, key[4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_sees_the_backend_pid_and_a_proxy_secret() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let (mut stream, _, pid, secret) = raw_login(proxy.port, 0).await;
    send_query(&mut stream, "SELECT pg_backend_pid()").await;
    let (row, _) = read_until(&mut stream, b'D', Duration::from_secs(5)).await;
    let row = row.expect("DataRow");
    let text = String::from_utf8_lossy(&row[6..]).to_string();
    assert_eq!(text.parse::<i32>().expect("pid"), pid);
    assert_eq!(secret.len(), 4);
    let shared = proxy.proxy().shared().clone();
    let table = &shared.cancels;
    let target = table
        .lookup(pid, &bytes::Bytes::from(secret.clone()))
        .expect("registered");
    assert_ne!(
        target.backend_secret.as_ref(),
        &secret[..],
        "the backend's secret never reaches the client"
    );
    drop(stream);
    proxy.stop().await;
    assert!(table.is_empty(), "cancel keys vanish with their sessions");
}

/// A 3.2 StartupMessage to real Postgres 15: its NegotiateProtocolVersion is relayed and
/// the session works at 3.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_request_is_negotiated_down_by_the_backend() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let (mut stream, before, _, _) = raw_login(proxy.port, 2).await;
    assert_eq!(
        before.first().map(|(tag, _)| *tag),
        Some(b'v'),
        "NegotiateProtocolVersion relayed first"
    );
    send_query(&mut stream, "SELECT 1").await;
    let (ready, _) = read_until(&mut stream, b'Z', Duration::from_secs(5)).await;
    assert!(ready.is_some());
    proxy.stop().await;
}

/// A scripted backend that answers a 3.2 StartupMessage with a 32-byte key: the client gets a
/// different 32-byte key, and its cancel reaches the backend with the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_cancel_keys_are_replaced_and_mapped_back() {
    let fake = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake backend");
    let fake_port = fake.local_addr().expect("addr").port();
    let real_secret: Vec<u8> = (0..32).map(|i| 200 - i as u8).collect();
    let secret_for_backend = real_secret.clone();
    let backend = tokio::spawn(async move {
        // The session.
        let (mut session, _) = fake.accept().await.expect("session");
        let mut length = [0u8; 4];
        session
            .read_exact(&mut length)
            .await
            .expect("startup length");
        let mut startup = vec![0u8; u32::from_be_bytes(length) as usize - 4];
        session.read_exact(&mut startup).await.expect("startup");
        assert_eq!(
            &startup[..4],
            &[0, 3, 0, 2],
            "the client's 3.2 request is forwarded as is"
        );
        let mut key = 4242i32.to_be_bytes().to_vec();
        key.extend(&secret_for_backend);
        let mut reply = message(b'R', &0u32.to_be_bytes());
        reply.extend(message(b'K', &key));
        reply.extend(message(b'Z', b"I"));
        session.write_all(&reply).await.expect("reply");
        // The cancel.
        let (mut cancel, _) = fake.accept().await.expect("cancel connection");
        let mut packet = vec![0u8; 44];
        cancel.read_exact(&mut packet).await.expect("cancel packet");
        drop(session);
        packet
    });
    let pair = shared_pair();
    let port = support::free_port();
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\n[blue]\nhost = \"127.0.0.1\"\nport = {fake_port}\n[green]\nhost = \"127.0.0.1\"\nport = {}\n",
        pair.green.port()
    );
    let proxy = TestProxy::start_from_text(port, &text, None).await;
    let mut client = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    client
        .write_all(&startup_packet(3, 2, &[("user", "anyone")]))
        .await
        .expect("startup");
    let (_, before) = read_until(&mut client, b'Z', Duration::from_secs(5)).await;
    let key = before
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .expect("BackendKeyData")
        .1
        .clone();
    assert_eq!(key.len(), 36);
    assert_eq!(&key[..4], &4242i32.to_be_bytes());
    assert_ne!(&key[4..], &real_secret[..]);
    let mut cancel = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect for cancel");
    cancel
        .write_all(&cancel_packet(4242, &key[4..]))
        .await
        .expect("cancel");
    let forwarded = tokio::time::timeout(Duration::from_secs(5), backend)
        .await
        .expect("cancel arrives")
        .expect("fake backend");
    assert_eq!(forwarded, cancel_packet(4242, &real_secret));
    // The cancel connection is closed without an answer.
    assert_eq!(
        read_message(&mut cancel, Duration::from_secs(2)).await,
        None
    );
    drop(client);
    proxy.stop().await;
}
