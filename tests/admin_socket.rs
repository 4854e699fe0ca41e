//! The admin socket on its own, and `pgshift ctl` against it: the server is started with a
//! stand-in controller (a task answering each request), so no proxy or Postgres is involved.
//! Covers the socket file (mode, group, stale and live sockets, other files, removal), the
//! line protocol (several commands per connection, bad and oversized lines), the connection
//! limit, `allowed_uids`, and `ctl`'s output, socket discovery and exit codes.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgshift::admin::server::AdminServer;
use pgshift::color::Color;
use pgshift::config::AdminConfig;
use pgshift::controller::{Actor, Command, ControllerHandle, Request};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// How long a test waits for any one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The error the stand-in controller gives for `drain blue`.
const DRAIN_BLUE_REFUSAL: &str = "stand-in: blue may not be drained";

/// A controller stand-in: records what reached it and answers `{"echo": verb}`, a status
/// object for `status`, and an error for `drain blue`.
struct StandIn {
    handle: ControllerHandle,
    seen: Arc<Mutex<Vec<(Command, Actor)>>>,
}

impl StandIn {
    fn start() -> StandIn {
        let (sender, mut requests) = tokio::sync::mpsc::channel::<Request>(16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(request) = requests.recv().await {
                let reply = match &request.command {
                    Command::Drain(Color::Blue) => Err(DRAIN_BLUE_REFUSAL.to_string()),
                    Command::Status => Ok(object(status_reply())),
                    other => Ok(object(json!({ "echo": other.verb() }))),
                };
                record
                    .lock()
                    .expect("stand-in record")
                    .push((request.command, request.actor));
                let _ = request.reply.send(reply);
            }
        });
        StandIn {
            handle: ControllerHandle::from_channel(sender),
            seen,
        }
    }

    fn commands(&self) -> Vec<Command> {
        self.seen
            .lock()
            .expect("stand-in record")
            .iter()
            .map(|(command, _)| command.clone())
            .collect()
    }

    fn actors(&self) -> Vec<Actor> {
        self.seen
            .lock()
            .expect("stand-in record")
            .iter()
            .map(|(_, actor)| actor.clone())
            .collect()
    }
}

fn status_reply() -> Value {
    json!({
        "green_weight": 25.0, "state": "running", "step": 2, "next_step_at": null,
        "draining": {"blue": false, "green": false},
        "blue": {"sessions": 3, "requests": 1200, "errors": 4, "error_rate": 0.0033,
                 "latency_p50_ms": 1.2, "latency_p95_ms": 3.4, "latency_p99_ms": 8.0,
                 "connect_errors": 0, "draining_sessions": 0},
        "green": {"sessions": 1, "requests": 100, "errors": 0, "error_rate": 0.0,
                  "latency_p50_ms": null, "latency_p95_ms": null, "latency_p99_ms": null,
                  "connect_errors": 0, "draining_sessions": 0},
        "pins": [{"database": "tenant_42", "color": "green", "source": "config"}],
        "decisions": [{"time": "2026-11-29T09:59:00Z", "action": "weight",
                       "reason": "by hand", "actor": "admin socket (uid 0)"}],
        "window_seconds": 120
    })
}

fn object(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// A temp dir holding the socket (kept alive by the caller) and a config for it.
fn admin_config(dir: &tempfile::TempDir) -> AdminConfig {
    AdminConfig {
        socket: dir.path().join("pgshift.sock"),
        ..AdminConfig::default()
    }
}

async fn start(config: &AdminConfig, stand_in: &StandIn) -> AdminServer {
    match AdminServer::start(config, stand_in.handle.clone()).await {
        Ok(server) => server,
        Err(error) => panic!("the admin server should start: {error:#}"),
    }
}

async fn start_error(config: &AdminConfig, stand_in: &StandIn) -> String {
    match AdminServer::start(config, stand_in.handle.clone()).await {
        Ok(server) => panic!("start should fail at {}", server.path().display()),
        Err(error) => format!("{error:#}"),
    }
}

/// The uid and gid this process creates files with (the peer credentials the server sees).
fn own_ids(dir: &Path) -> (u32, u32) {
    let probe = dir.join("id-probe");
    std::fs::write(&probe, b"").expect("write a probe file");
    let metadata = std::fs::metadata(&probe).expect("probe metadata");
    std::fs::remove_file(&probe).expect("remove the probe file");
    (metadata.uid(), metadata.gid())
}

/// One admin connection.
struct Peer {
    lines: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Peer {
    async fn connect(path: &Path) -> Peer {
        let stream = UnixStream::connect(path)
            .await
            .unwrap_or_else(|error| panic!("connect to {}: {error}", path.display()));
        let (reader, writer) = stream.into_split();
        Peer {
            lines: BufReader::new(reader),
            writer,
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("send");
    }

    /// The next reply line, or `None` once the server closed the connection.
    async fn next_reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        let read = tokio::time::timeout(REPLY_TIMEOUT, self.lines.read_line(&mut line))
            .await
            .expect("a reply in time");
        match read {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with('\n'), "a whole line: {line:?}");
                Some(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|error| panic!("reply {line:?} is not JSON: {error}")),
                )
            }
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(error) => panic!("read a reply: {error}"),
        }
    }

    async fn reply(&mut self) -> Value {
        self.next_reply().await.expect("a reply before the close")
    }

    async fn ask(&mut self, line: &str) -> Value {
        self.send_raw(format!("{line}\n").as_bytes()).await;
        self.reply().await
    }
}

fn assert_refused(reply: &Value, expected: &str) {
    assert_eq!(reply["ok"], json!(false), "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(expected),
        "error {error:?} should contain {expected:?}"
    );
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("socket metadata")
        .permissions()
        .mode()
        & 0o777
}

// ---------------------------------------------------------------------------------------------
// The socket file
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_socket_is_0600_by_default_and_follows_socket_mode() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    assert_eq!(server.path(), config.socket);
    let metadata = std::fs::symlink_metadata(&config.socket).expect("socket metadata");
    assert!(metadata.file_type().is_socket());
    assert_eq!(mode_of(&config.socket), 0o600);
    server.shutdown().await;

    let group_config = AdminConfig {
        socket_mode: 0o660,
        ..admin_config(&dir)
    };
    let server = start(&group_config, &stand_in).await;
    assert_eq!(mode_of(&group_config.socket), 0o660);
    server.shutdown().await;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read the dir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary directory or socket left: {leftovers:?}"
    );
}

/// The name of group `gid`, from `/etc/group` or `getent`.
fn group_name(gid: u32) -> Option<String> {
    let from_file = std::fs::read_to_string("/etc/group").ok().and_then(|text| {
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 3 && fields[2] == gid.to_string()).then(|| fields[0].to_string())
        })
    });
    from_file.or_else(|| {
        let output = std::process::Command::new("getent")
            .args(["group", &gid.to_string()])
            .output()
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?;
        text.split(':')
            .next()
            .map(str::to_string)
            .filter(|name| !name.is_empty())
    })
}

#[tokio::test]
async fn socket_group_owns_the_socket() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, gid) = own_ids(dir.path());
    let Some(name) = group_name(gid) else {
        eprintln!("skipped: no name for this process's group {gid}");
        return;
    };
    let config = AdminConfig {
        socket_mode: 0o660,
        socket_group: Some(name),
        ..admin_config(&dir)
    };
    let server = start(&config, &stand_in).await;
    let metadata = std::fs::symlink_metadata(&config.socket).expect("socket metadata");
    assert_eq!(metadata.gid(), gid);
    assert_eq!(mode_of(&config.socket), 0o660);
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_socket_group_is_an_error() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = AdminConfig {
        socket_group: Some("no-such-group-pgshift".into()),
        ..admin_config(&dir)
    };
    let error = start_error(&config, &stand_in).await;
    assert!(
        error.contains("no group named \"no-such-group-pgshift\""),
        "{error}"
    );
    assert!(!config.socket.exists());
}

#[tokio::test]
async fn a_stale_socket_is_replaced() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    drop(std::os::unix::net::UnixListener::bind(&config.socket).expect("bind a stale socket"));
    assert!(config.socket.exists(), "the stale socket file remains");
    let server = start(&config, &stand_in).await;
    let mut peer = Peer::connect(&config.socket).await;
    assert_eq!(peer.ask("status").await["ok"], json!(true));
    server.shutdown().await;
}

#[tokio::test]
async fn a_live_socket_is_not_taken_over() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let first = start(&config, &stand_in).await;
    let error = start_error(&config, &stand_in).await;
    assert!(
        error.contains(&format!(
            "another pgshift is already listening on {}",
            config.socket.display()
        )),
        "{error}"
    );
    let mut peer = Peer::connect(&config.socket).await;
    assert_eq!(peer.ask("status").await["ok"], json!(true));
    first.shutdown().await;
}

#[tokio::test]
async fn a_regular_file_is_never_replaced() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    std::fs::write(&config.socket, b"precious").expect("write a file");
    let error = start_error(&config, &stand_in).await;
    assert!(
        error.contains(&config.socket.display().to_string()),
        "{error}"
    );
    assert!(error.contains("is not a socket"), "{error}");
    assert_eq!(
        std::fs::read(&config.socket).expect("the file is still there"),
        b"precious"
    );
}

#[tokio::test]
async fn a_missing_directory_is_an_error_naming_the_path() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = AdminConfig {
        socket: dir.path().join("missing").join("pgshift.sock"),
        ..AdminConfig::default()
    };
    let error = start_error(&config, &stand_in).await;
    assert!(
        error.contains(&config.socket.display().to_string()),
        "{error}"
    );
}

#[tokio::test]
async fn shutdown_removes_the_socket_and_closes_idle_connections() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let mut idle = Peer::connect(&config.socket).await;
    assert_eq!(idle.ask("status").await["ok"], json!(true));
    tokio::time::timeout(Duration::from_secs(3), server.shutdown())
        .await
        .expect("shutdown does not wait for idle connections");
    assert!(!config.socket.exists(), "the socket file is removed");
    assert!(idle.next_reply().await.is_none(), "the idle peer is closed");
    assert!(UnixStream::connect(&config.socket).await.is_err());
}

#[tokio::test]
async fn dropping_the_server_removes_the_socket_too() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    drop(start(&config, &stand_in).await);
    assert!(!config.socket.exists());
}

// ---------------------------------------------------------------------------------------------
// The line protocol
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn several_commands_on_one_connection_get_one_reply_each() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (uid, _) = own_ids(dir.path());
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let mut peer = Peer::connect(&config.socket).await;

    let status = peer.ask("status").await;
    assert_eq!(status["ok"], json!(true));
    assert_eq!(status["green_weight"], json!(25.0));
    assert_eq!(
        peer.ask("  weight   40 \r").await,
        json!({"ok": true, "echo": "weight"})
    );
    // Two lines in one write, the last without its newline until later.
    peer.send_raw(b"rollout start\nreload").await;
    assert_eq!(
        peer.reply().await,
        json!({"ok": true, "echo": "rollout start"})
    );
    peer.send_raw(b"\n").await;
    assert_eq!(peer.reply().await, json!({"ok": true, "echo": "reload"}));
    assert_refused(&peer.ask("drain blue").await, DRAIN_BLUE_REFUSAL);

    assert_eq!(
        stand_in.commands(),
        vec![
            Command::Status,
            Command::Weight { basis_points: 4000 },
            Command::RolloutStart,
            Command::Reload,
            Command::Drain(Color::Blue),
        ]
    );
    assert!(
        stand_in
            .actors()
            .iter()
            .all(|actor| *actor == Actor::AdminSocket { uid: Some(uid) }),
        "{:?}",
        stand_in.actors()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_last_command_without_newline_is_answered_after_the_peer_half_closes() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let mut peer = Peer::connect(&config.socket).await;
    peer.send_raw(b"status").await;
    peer.writer.shutdown().await.expect("half-close");
    assert_eq!(peer.reply().await["ok"], json!(true));
    assert!(peer.next_reply().await.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn bad_commands_are_refused_before_the_controller() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let mut peer = Peer::connect(&config.socket).await;

    assert_refused(
        &peer.ask("frobnicate").await,
        "unknown command \"frobnicate\"; commands: status, weight",
    );
    assert_refused(&peer.ask("weight -1").await, "cannot be negative");
    assert_refused(&peer.ask("weight 101").await, "above 100");
    assert_refused(&peer.ask("weight abc").await, "not a percent");
    assert_refused(&peer.ask("weight 12.345").await, "more than two decimals");
    assert_refused(
        &peer.ask("pin database=app purple").await,
        "unknown color \"purple\" (blue or green)",
    );
    assert_refused(&peer.ask("").await, "empty command");
    assert_refused(&peer.ask("status\u{1b}").await, "control character");
    peer.send_raw(b"\xff\xfe\n").await;
    assert_refused(&peer.reply().await, "not valid UTF-8");

    // A 5000-byte line, sent in pieces, then a valid command on the same connection.
    let long_line = format!("rollback {}", "x".repeat(5000));
    for piece in long_line.as_bytes().chunks(700) {
        peer.send_raw(piece).await;
    }
    peer.send_raw(b"\nstatus\n").await;
    assert_refused(&peer.reply().await, "command longer than 4096 bytes");
    assert_eq!(peer.reply().await["ok"], json!(true));

    assert_eq!(stand_in.commands(), vec![Command::Status]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_without_newlines_is_not_buffered() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let mut peer = Peer::connect(&config.socket).await;
    let megabyte = vec![b'a'; 1 << 20];
    for _ in 0..8 {
        peer.send_raw(&megabyte).await;
    }
    peer.send_raw(b"\nstatus\n").await;
    assert_refused(&peer.reply().await, "command longer than 4096 bytes");
    assert_eq!(peer.reply().await["ok"], json!(true));
    assert_eq!(stand_in.commands(), vec![Command::Status]);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Who may connect
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn max_connections_refuses_the_next_peer() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = AdminConfig {
        max_connections: 2,
        ..admin_config(&dir)
    };
    let server = start(&config, &stand_in).await;
    let mut first = Peer::connect(&config.socket).await;
    let mut second = Peer::connect(&config.socket).await;
    assert_eq!(first.ask("status").await["ok"], json!(true));
    assert_eq!(second.ask("status").await["ok"], json!(true));

    let mut third = Peer::connect(&config.socket).await;
    assert_refused(&third.reply().await, "too many admin connections (max 2)");
    assert!(third.next_reply().await.is_none(), "then closed");

    // A closed connection frees its slot.
    drop(first);
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    loop {
        let mut next = Peer::connect(&config.socket).await;
        next.send_raw(b"status\n").await;
        let reply = next.reply().await;
        if reply["ok"] == json!(true) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(second.ask("status").await["ok"], json!(true));
    server.shutdown().await;
}

#[tokio::test]
async fn allowed_uids_refuses_other_peers() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (uid, _) = own_ids(dir.path());
    let other_uid = uid.wrapping_add(4242);
    let config = AdminConfig {
        allowed_uids: Some(vec![other_uid]),
        ..admin_config(&dir)
    };
    let server = start(&config, &stand_in).await;
    let mut peer = Peer::connect(&config.socket).await;
    assert_refused(
        &peer.reply().await,
        &format!("uid {uid} is not allowed on this socket"),
    );
    assert!(peer.next_reply().await.is_none(), "then closed");
    server.shutdown().await;

    let config = AdminConfig {
        allowed_uids: Some(vec![other_uid, uid]),
        ..admin_config(&dir)
    };
    let server = start(&config, &stand_in).await;
    let mut peer = Peer::connect(&config.socket).await;
    assert_eq!(peer.ask("status").await["ok"], json!(true));
    server.shutdown().await;
    assert_eq!(stand_in.commands(), vec![Command::Status]);
}

// ---------------------------------------------------------------------------------------------
// pgshift ctl
// ---------------------------------------------------------------------------------------------

/// Runs the real binary's `ctl` with `args` (without `$PGSHIFT_SOCKET` unless given in `env`),
/// in `dir`, off the runtime's threads so the server keeps answering.
async fn ctl_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pgshift"));
    command
        .arg("ctl")
        .args(args)
        .current_dir(dir)
        .env_remove("PGSHIFT_SOCKET");
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::task::spawn_blocking(move || command.output().expect("pgshift runs"))
        .await
        .expect("the ctl task")
}

async fn ctl(dir: &Path, args: &[&str]) -> Output {
    ctl_in(dir, args, &[]).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(output),
        stderr(output)
    );
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_prints_status_as_a_table_and_summaries_for_the_rest() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let socket = path_arg(&config.socket);

    let output = ctl(dir.path(), &["--socket", &socket, "status"]).await;
    assert_exit(&output, 0);
    let text = stdout(&output);
    assert!(text.contains("green weight  25%"), "{text}");
    assert!(text.contains("state         running"), "{text}");
    assert!(text.contains("0.33%"), "{text}");
    assert!(
        text.contains("database=tenant_42 → green (config)"),
        "{text}"
    );
    assert!(
        text.contains("weight  admin socket (uid 0): by hand"),
        "{text}"
    );

    let output = ctl(dir.path(), &["--socket", &socket, "weight", "40"]).await;
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "ok: echo: weight\n");

    let output = ctl(dir.path(), &["--socket", &socket, "promote", "--check"]).await;
    assert_exit(&output, 0);

    assert_eq!(
        stand_in.commands(),
        vec![
            Command::Status,
            Command::Weight { basis_points: 4000 },
            Command::Promote {
                check_only: true,
                force: false
            },
        ]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_json_prints_the_raw_reply() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let output = ctl(
        dir.path(),
        &["--json", "--socket", &path_arg(&config.socket), "status"],
    )
    .await;
    assert_exit(&output, 0);
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    let reply: Value = serde_json::from_str(&text).expect("JSON on stdout");
    assert_eq!(reply["ok"], json!(true));
    assert_eq!(reply["green_weight"], json!(25.0));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exits_1_when_the_proxy_refuses() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let output = ctl(
        dir.path(),
        &["--socket", &path_arg(&config.socket), "drain", "blue"],
    )
    .await;
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains(DRAIN_BLUE_REFUSAL),
        "{}",
        stderr(&output)
    );
    assert_eq!(stand_in.commands(), vec![Command::Drain(Color::Blue)]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exits_3_when_the_socket_cannot_be_reached() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nobody-here.sock");
    let output = ctl(dir.path(), &["--socket", &path_arg(&missing), "status"]).await;
    assert_exit(&output, 3);
    let error = stderr(&output);
    assert!(error.contains(&path_arg(&missing)), "{error}");
    assert!(error.contains("No such file or directory"), "{error}");
    assert!(error.contains("is pgshift running"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_usage_errors_exit_64_without_connecting() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let socket = path_arg(&config.socket);

    let output = ctl(dir.path(), &["--socket", &socket, "frobnicate"]).await;
    assert_exit(&output, 64);
    assert!(
        stderr(&output).contains("unknown command \"frobnicate\""),
        "{}",
        stderr(&output)
    );
    let output = ctl(dir.path(), &["--socket", &socket, "weight", "101"]).await;
    assert_exit(&output, 64);
    let output = ctl(dir.path(), &["--socket", &socket, "status", "--json"]).await;
    assert_exit(&output, 64);
    assert!(
        stderr(&output).contains("before the command"),
        "{}",
        stderr(&output)
    );
    let output = ctl(dir.path(), &["--socket", &socket]).await;
    assert_exit(&output, 64);
    let output = ctl(dir.path(), &[]).await;
    assert_exit(&output, 64);

    assert_eq!(
        stand_in.commands(),
        vec![],
        "nothing reached the controller"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_finds_the_socket_from_the_environment_and_by_default() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = admin_config(&dir);
    let server = start(&config, &stand_in).await;
    let elsewhere = tempfile::tempdir().expect("another dir");

    let output = ctl_in(
        elsewhere.path(),
        &["reload"],
        &[("PGSHIFT_SOCKET", &path_arg(&config.socket))],
    )
    .await;
    assert_exit(&output, 0);

    // ./pgshift.sock in the current directory.
    let output = ctl(dir.path(), &["rollout", "next"]).await;
    assert_exit(&output, 0);
    let output = ctl(elsewhere.path(), &["rollout", "next"]).await;
    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains("./pgshift.sock"),
        "{}",
        stderr(&output)
    );

    assert_eq!(
        stand_in.commands(),
        vec![Command::Reload, Command::RolloutNext]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_finds_the_socket_from_the_config_file() {
    let stand_in = StandIn::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("pgshift.toml");
    std::fs::write(
        &config_path,
        "[admin]\nsocket = \"run/admin.sock\"\n\
         [blue]\nhost = \"127.0.0.1\"\nport = 5432\n\
         [green]\nhost = \"127.0.0.1\"\nport = 5433\n",
    )
    .expect("write the config");
    std::fs::create_dir(dir.path().join("run")).expect("run dir");
    let loaded = pgshift::config::Config::load(&config_path).expect("a valid config");
    assert_eq!(loaded.admin.socket, dir.path().join("run/admin.sock"));
    let server = start(&loaded.admin, &stand_in).await;

    let elsewhere = tempfile::tempdir().expect("another dir");
    let output = ctl_in(
        elsewhere.path(),
        &["--config", &path_arg(&config_path), "undrain", "green"],
        &[("PGSHIFT_SOCKET", "/nonexistent/ignored.sock")],
    )
    .await;
    assert_exit(&output, 0);
    assert_eq!(stand_in.commands(), vec![Command::Undrain(Color::Green)]);

    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[admin]\nsocket_mode = 600\n").expect("write");
    let output = ctl(dir.path(), &["--config", &path_arg(&broken), "status"]).await;
    assert_exit(&output, 64);
    assert!(
        stderr(&output).contains("admin.socket_mode"),
        "{}",
        stderr(&output)
    );

    let output = ctl(
        dir.path(),
        &[
            "--config",
            &path_arg(&config_path),
            "--socket",
            "/x.sock",
            "status",
        ],
    )
    .await;
    assert_exit(&output, 64);
    server.shutdown().await;
}
