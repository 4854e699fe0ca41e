//! Faults (docs/RELIABILITY.md): what pgshift does when a backend is killed, hung, cut off
//! or lied to, when its state store cannot write, and when its admin socket is flooded —
//! against real Postgres clusters. Tests that damage a cluster use a private pair; network
//! faults go through the fault-injecting relay of `support::faults`.
//!
//! After each fault the same questions: do the affected clients hear of it promptly (an error
//! or a closed socket, never a hang)? Do the others keep working? Do new sessions work once the
//! fault is gone? Do the cancel table and the session gauges return to zero?

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgshift::color::Color;
use pgshift::config::Config;
use pgshift::controller::store::{FileStore, PersistedState, StateStore, StoreError};
use pgshift::proxy::Shared;
use pgshift::server::{Server, ServerOptions};
use support::faults::{Fault, FaultRelay};
use support::pgshift::{
    Outcome, TestProxy, TestServer, config_text, connect_with_outcome, expect_ended_with,
    left_behind, nothing_left_behind, simple_backend_pid, sqlstate, write_config,
};
use support::wire::message;
use support::{BULK_USER, ClusterPair, SUPERUSER, free_port, shared_pair};
use tokio::time::Instant;

/// Upper bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(5);
/// The harness's `connect_timeout` for both colors.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Blue by weight; database `other_db` pinned to green.
const ROUTING: &str =
    "green_weight = 0\n[[routing.pin]]\ndatabase = \"other_db\"\ncolor = \"green\"\n";

/// The admin flood test measures latency, so it runs alone: it takes this for writing, every
/// other test of this file for reading.
static TURNS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn private_pair() -> ClusterPair {
    tokio::task::spawn_blocking(ClusterPair::start_private)
        .await
        .expect("private pair starts")
}

fn green_dsn(proxy_port: u16) -> String {
    format!("host=127.0.0.1 port={proxy_port} user={BULK_USER} dbname=other_db")
}

fn blue_dsn(proxy_port: u16) -> String {
    format!("host=127.0.0.1 port={proxy_port} user={BULK_USER} dbname=app")
}

/// One query on a new session through `dsn`, within [`PROMPT`]; returns the server's port.
async fn serve_once(dsn: &str) -> Result<u16, String> {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let row = client.query_one("SELECT inet_server_port()", &[]).await?;
        Ok::<_, tokio_postgres::Error>(row.get::<_, i32>(0) as u16)
    };
    match tokio::time::timeout(PROMPT, attempt).await {
        Ok(Ok(port)) => Ok(port),
        Ok(Err(error)) => Err(format!("{error} (sqlstate {:?})", sqlstate(&error))),
        Err(_) => Err(format!("no answer within {PROMPT:?}")),
    }
}

/// Retries [`serve_once`] until it works or `limit` passes.
async fn serves_within(dsn: &str, limit: Duration) -> u16 {
    let deadline = Instant::now() + limit;
    loop {
        match serve_once(dsn).await {
            Ok(port) => return port,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("no session through {dsn} within {limit:?}: {error}"),
        }
    }
}

/// A session that keeps working through everything: a query on it must succeed now.
async fn still_works(client: &tokio_postgres::Client, what: &str) {
    let result = tokio::time::timeout(PROMPT, client.simple_query("SELECT 1")).await;
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => panic!("{what}: an unaffected session failed: {error}"),
        Err(_) => panic!("{what}: an unaffected session hung"),
    }
}

/// Waits for `outcome` to end (an error or a close) within [`PROMPT`].
async fn ends_promptly(outcome: Outcome, what: &str) -> Option<tokio_postgres::Error> {
    tokio::time::timeout(PROMPT, outcome)
        .await
        .unwrap_or_else(|_| panic!("{what}: the connection did not end within {PROMPT:?}"))
        .expect("outcome")
}

/// Polls until nothing is left behind: no cancel key, no open session, no client slot.
async fn assert_all_released(shared: &Shared, what: &str) {
    let released = || nothing_left_behind(shared);
    let deadline = Instant::now() + PROMPT;
    while !released() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(released(), "{what}: left behind: {}", left_behind(shared));
}

/// Starts `SELECT pg_sleep(30)` on a new blue session and waits until blue runs it; returns
/// the task (its result, and when it ended), the backend pid and the session's outcome.
async fn sleeping_session(
    proxy_port: u16,
    blue_admin: &tokio_postgres::Client,
) -> (
    tokio::task::JoinHandle<(Result<(), tokio_postgres::Error>, Instant)>,
    i32,
    Outcome,
) {
    let (client, outcome) = connect_with_outcome(&blue_dsn(proxy_port)).await;
    let pid = simple_backend_pid(&client).await;
    let task = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(30)").await;
        (result.map(|_| ()), Instant::now())
    });
    let deadline = Instant::now() + PROMPT;
    loop {
        let row = blue_admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active' \
                 AND query LIKE '%pg_sleep%'",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity");
        if row.get::<_, i64>(0) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep did not start on {pid}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (task, pid, outcome)
}

/// The sleeping query must fail within [`PROMPT`] of `since`.
async fn fails_promptly(
    task: tokio::task::JoinHandle<(Result<(), tokio_postgres::Error>, Instant)>,
    since: Instant,
    what: &str,
) -> tokio_postgres::Error {
    let (result, ended) = tokio::time::timeout(PROMPT, task)
        .await
        .unwrap_or_else(|_| panic!("{what}: the query did not fail within {PROMPT:?}"))
        .expect("task");
    assert!(ended - since < PROMPT, "{what}: {:?}", ended - since);
    result.expect_err(what)
}

// ---------------------------------------------------------------------------------------------
// 1. A backend SIGKILLed mid-query, then the postmaster killed and restarted
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_backend_and_restarted_postmaster() {
    let _turn = TURNS.read().await;
    let pair = private_pair().await;
    let (blue, green) = (pair.blue.port(), pair.green.port());
    let proxy = TestProxy::start(&pair, "", ROUTING, None).await;
    let shared = proxy.proxy().shared().clone();
    let green_client = proxy.connect(&green_dsn(proxy.port)).await.expect("green");

    // A backend SIGKILLed under a running query: the postmaster resets every blue backend.
    let admin = pair
        .blue
        .connect(SUPERUSER, None, "postgres")
        .await
        .expect("blue admin");
    let (idle, idle_outcome) = connect_with_outcome(&blue_dsn(proxy.port)).await;
    still_works(&idle, "idle blue session").await;
    let (sleeper, pid, _sleeper_outcome) = sleeping_session(proxy.port, &admin).await;
    let killed_at = Instant::now();
    // SAFETY: kill(2) on a backend of our own private cluster.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let error = fails_promptly(sleeper, killed_at, "query on the killed backend").await;
    assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
    // The idle blue session is ended by the crash reset (the backend's own FATAL, 57P02).
    let ended = ends_promptly(idle_outcome, "idle session during the crash reset").await;
    if let Some(error) = &ended {
        let code = sqlstate(error);
        assert!(
            matches!(code.as_deref(), Some("57P02" | "08006") | None),
            "{error}"
        );
    }
    drop(idle);
    drop(admin);
    still_works(&green_client, "after a blue backend was SIGKILLed").await;
    assert_eq!(
        serves_within(&blue_dsn(proxy.port), Duration::from_secs(15)).await,
        blue
    );

    // The postmaster itself SIGKILLed: its backends notice and end, blue refuses connections
    // until it is restarted; green is untouched.
    let admin = pair
        .blue
        .connect(SUPERUSER, None, "postgres")
        .await
        .expect("blue admin after recovery");
    let (idle, idle_outcome) = connect_with_outcome(&blue_dsn(proxy.port)).await;
    still_works(&idle, "idle blue session").await;
    let (sleeper, _pid, _outcome) = sleeping_session(proxy.port, &admin).await;
    drop(admin);
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| {
        pair.blue.kill_postmaster(libc::SIGKILL);
        assert!(pair.blue.wait_stopped(), "postmaster reaped");
    });
    let error = fails_promptly(sleeper, killed_at, "query when the postmaster died").await;
    assert!(
        matches!(sqlstate(&error).as_deref(), Some("08006" | "57P01") | None),
        "{error}"
    );
    ends_promptly(idle_outcome, "idle session when the postmaster died").await;
    drop(idle);

    let started = Instant::now();
    let error = serve_once(&blue_dsn(proxy.port))
        .await
        .expect_err("blue is down");
    assert!(error.contains("08006"), "{error}");
    assert!(
        started.elapsed() < PROMPT,
        "a refused connect fails at once"
    );
    still_works(&green_client, "while blue is down").await;
    assert_eq!(serve_once(&green_dsn(proxy.port)).await, Ok(green));

    tokio::task::block_in_place(|| pair.blue.start());
    assert_eq!(
        serves_within(&blue_dsn(proxy.port), Duration::from_secs(15)).await,
        blue
    );
    still_works(&green_client, "after blue came back").await;
    drop(green_client);
    assert_all_released(&shared, "after the kills").await;
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. A hung backend: SIGSTOP on the postmaster and its children
// ---------------------------------------------------------------------------------------------

/// Processes stopped with SIGSTOP, continued with SIGCONT on drop (so a failing test never
/// leaves a stopped cluster behind).
struct Stopped {
    pids: Vec<i32>,
}

impl Stopped {
    /// Stops the postmaster first (so it forks nothing new), then every child of it.
    fn postmaster_and_children(postmaster: u32) -> Stopped {
        let postmaster = postmaster as i32;
        let mut stopped = Stopped { pids: Vec::new() };
        // SAFETY: kill(2) on our own cluster's processes.
        assert_eq!(unsafe { libc::kill(postmaster, libc::SIGSTOP) }, 0);
        stopped.pids.push(postmaster);
        for child in children_of(postmaster) {
            // SAFETY: as above; a child that exited meanwhile is harmless.
            if unsafe { libc::kill(child, libc::SIGSTOP) } == 0 {
                stopped.pids.push(child);
            }
        }
        stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // Children first, then the postmaster.
        for &pid in self.pids.iter().rev() {
            // SAFETY: kill(2) on processes we stopped.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// The children of `parent`, from /proc/<pid>/task/*/children, else by scanning /proc.
fn children_of(parent: i32) -> Vec<i32> {
    let mut children: Vec<i32> = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                children.extend(
                    list.split_whitespace()
                        .filter_map(|pid| pid.parse::<i32>().ok()),
                );
            }
        }
    }
    if !children.is_empty() {
        return children;
    }
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let ppid: i32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_backend_times_out_new_sessions_and_spares_old_ones() {
    let _turn = TURNS.read().await;
    let pair = private_pair().await;
    let blue = pair.blue.port();
    let proxy = TestProxy::start(&pair, "", ROUTING, None).await;
    let shared = proxy.proxy().shared().clone();
    let (existing, existing_outcome) = connect_with_outcome(&blue_dsn(proxy.port)).await;
    still_works(&existing, "blue session before the stop").await;
    let green_client = proxy.connect(&green_dsn(proxy.port)).await.expect("green");

    let postmaster = pair.blue.postmaster_pid().expect("blue runs");
    let stopped = Stopped::postmaster_and_children(postmaster);
    assert!(
        stopped.pids.len() >= 3,
        "postmaster and its children: {:?}",
        stopped.pids
    );

    // The existing session's next query waits (pgshift does not cut it) ...
    let pending = tokio::spawn(async move {
        let result = existing.simple_query("SELECT 2").await.map(|_| ());
        (existing, result)
    });

    // ... while a new session: TCP connects (the kernel completes the handshake), no answer,
    // 08006 after connect_timeout, naming blue.
    let started = Instant::now();
    let error = proxy
        .connect(&blue_dsn(proxy.port))
        .await
        .expect_err("a hung blue cannot log anyone in");
    let elapsed = started.elapsed();
    assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
    assert!(
        elapsed >= CONNECT_TIMEOUT - Duration::from_millis(200) && elapsed < PROMPT,
        "failed after {elapsed:?}, connect_timeout is {CONNECT_TIMEOUT:?}"
    );
    let message = error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("blue") && message.contains(&format!("127.0.0.1:{blue}")),
        "{message}"
    );
    still_works(&green_client, "while blue is stopped").await;

    // Past connect_timeout and login_timeout, the stopped session is still open and waiting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !pending.is_finished(),
        "the query on the stopped backend did not end"
    );
    assert_eq!(shared.stats.color(Color::Blue).sessions_open(), 1);

    drop(stopped); // SIGCONT
    let (existing, result) = tokio::time::timeout(PROMPT, pending)
        .await
        .expect("the pending query completes once blue runs again")
        .expect("task");
    result.expect("the pending query succeeds: the session was never cut");
    still_works(&existing, "the old session after SIGCONT").await;
    assert_eq!(
        serves_within(&blue_dsn(proxy.port), Duration::from_secs(5)).await,
        blue
    );
    drop(existing);
    assert!(
        ends_promptly(existing_outcome, "closing the old session")
            .await
            .is_none()
    );
    drop(green_client);
    assert_all_released(&shared, "after SIGSTOP/SIGCONT").await;
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Network faults between pgshift and a backend
// ---------------------------------------------------------------------------------------------

/// A query whose result is a few MB of DataRows.
const BIG_RESULT: &str = "SELECT repeat('x', 200) FROM generate_series(1, 20000)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_between_pgshift_and_a_backend() {
    let _turn = TURNS.read().await;
    let pair = shared_pair();
    let relay = FaultRelay::start(pair.blue.addr()).await;
    let port = free_port();
    let text = config_text(pair, port, "", ROUTING).replacen(
        &format!("port = {}", pair.blue.port()),
        &format!("port = {}", relay.port),
        1,
    );
    let proxy = TestProxy::start_from_text(port, &text, None).await;
    let shared = proxy.proxy().shared().clone();
    let blue = blue_dsn(port);
    let green_client = proxy.connect(&green_dsn(port)).await.expect("green");
    // Through the relay, untouched.
    let client = proxy.connect(&blue).await.expect("blue through the relay");
    assert_eq!(
        client.simple_query(BIG_RESULT).await.expect("big").len(),
        20_002
    );
    drop(client);

    // A reset in the middle of a DataRow stream: the client's query fails at once.
    let (client, outcome) = connect_with_outcome(&blue).await;
    relay.set(Fault::ResetAfter(100_000));
    let started = Instant::now();
    let result = tokio::time::timeout(PROMPT, client.simple_query(BIG_RESULT))
        .await
        .expect("a reset mid-result is reported promptly");
    assert!(result.is_err(), "the cut result is an error");
    ends_promptly(outcome, "reset mid-DataRow").await;
    assert!(started.elapsed() < PROMPT);
    relay.set(Fault::Pass);
    still_works(&green_client, "after a reset").await;

    // The backend's socket half-closed while the session is idle: 08006 at once.
    let (client, outcome) = connect_with_outcome(&blue).await;
    still_works(&client, "before the half-close").await;
    relay.set(Fault::HalfCloseAfter(0));
    expect_ended_with(outcome, PROMPT, "08006", "half-closed while idle").await;
    assert!(client.is_closed());
    relay.set(Fault::Pass);

    // Half-closed in the middle of a result: the query fails, nothing hangs.
    let (client, outcome) = connect_with_outcome(&blue).await;
    relay.set(Fault::HalfCloseAfter(50_000));
    let result = tokio::time::timeout(PROMPT, client.simple_query(BIG_RESULT))
        .await
        .expect("a half-close mid-result is reported promptly");
    assert!(result.is_err(), "the cut result is an error");
    ends_promptly(outcome, "half-closed mid-result").await;
    relay.set(Fault::Pass);

    // A backend that sends a lying message length: pgshift ends the session with 08006.
    let (client, outcome) = connect_with_outcome(&blue).await;
    still_works(&client, "before the lie").await;
    let mut lie = message(b'N', b"SNOTICE\0VNOTICE\0C00000\0Mbefore the lie\0\0");
    lie.extend([b'D', 0xff, 0xff, 0xff, 0xff]);
    relay.set(Fault::Inject(lie));
    expect_ended_with(outcome, PROMPT, "08006", "a lying length from the backend").await;
    relay.set(Fault::Pass);

    // A backend that accepts and never answers: 08006 after connect_timeout.
    let survivor = proxy
        .connect(&blue)
        .await
        .expect("a session before the black hole");
    relay.set(Fault::BlackHole);
    let accepted = relay.accepted();
    let started = Instant::now();
    let error = proxy
        .connect(&blue)
        .await
        .expect_err("an unanswering backend");
    let elapsed = started.elapsed();
    assert_eq!(sqlstate(&error).as_deref(), Some("08006"), "{error}");
    assert!(
        elapsed >= CONNECT_TIMEOUT - Duration::from_millis(200) && elapsed < PROMPT,
        "failed after {elapsed:?}"
    );
    assert!(relay.accepted() > accepted, "the TCP connection was made");
    // Sessions relayed before are untouched by it.
    still_works(&survivor, "an old session during the black hole").await;
    still_works(&green_client, "green during the black hole").await;
    relay.set(Fault::Pass);
    assert_eq!(
        serves_within(&blue, PROMPT).await,
        pair.blue.port(),
        "served again"
    );

    drop((survivor, green_client, client));
    assert_all_released(&shared, "after the network faults").await;
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. The state store cannot write
// ---------------------------------------------------------------------------------------------

/// A whole pgshift in front of the shared pair (blue by weight) whose controller uses the
/// store `store_for` makes from the path of the state file (in the server's temp dir).
async fn server_with_store(store_for: impl FnOnce(&Path) -> Box<dyn StateStore>) -> TestServer {
    let port = free_port();
    let (dir, config_path) =
        write_config(&config_text(shared_pair(), port, "", "green_weight = 0"));
    let store = store_for(&dir.path().join("pgshift-state.json"));
    let config = Config::load(&config_path).expect("config");
    let server = Server::start(
        config,
        config_path.clone(),
        ServerOptions {
            store: Some(store),
            ..ServerOptions::default()
        },
    )
    .await
    .expect("pgshift starts with the injected store");
    TestServer {
        server: Some(server),
        port,
        dir,
        config_path,
    }
}

/// A [`FileStore`] whose writes fail while `failing` is set (as a full or read-only disk
/// would; a read-only directory does not stop root). Counts the writes it was asked for.
struct FlakyStore {
    file: FileStore,
    failing: Arc<AtomicBool>,
    attempts: Arc<AtomicUsize>,
    last_saved: Arc<Mutex<Option<PersistedState>>>,
}

impl StateStore for FlakyStore {
    fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        self.file.load()
    }

    fn save(&mut self, state: &PersistedState) -> Result<(), StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Write {
                path: self.file.path().to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device (injected)",
                ),
            });
        }
        self.file.save(state)?;
        *self.last_saved.lock().unwrap() = Some(state.clone());
        Ok(())
    }

    fn reset(&mut self) -> Result<(), StoreError> {
        self.file.reset()
    }

    fn describe(&self) -> String {
        format!("flaky {}", self.file.describe())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_store_that_cannot_write_refuses_every_change() {
    let _turn = TURNS.read().await;
    let failing = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let server = server_with_store(|state_path| {
        Box::new(FlakyStore {
            file: FileStore::new(state_path),
            failing: failing.clone(),
            attempts: attempts.clone(),
            last_saved: Arc::default(),
        })
    })
    .await;
    let state_path = server.state_path();

    let reply = server.admin("weight 25").await;
    assert_eq!(reply["ok"], true, "{reply}");
    let on_disk = || {
        FileStore::new(&state_path)
            .load()
            .expect("state file readable")
            .expect("state saved")
    };
    assert_eq!(on_disk().green_weight_bp, 2500);
    let status_before = server.admin("status").await;

    failing.store(true, Ordering::SeqCst);
    for command in [
        "weight 50",
        "pin tenant=acme green",
        "drain green",
        "rollout start",
        "promote",
        "rollback the disk is full",
    ] {
        let tried = attempts.load(Ordering::SeqCst);
        let reply = server.admin(command).await;
        assert_eq!(reply["ok"], false, "{command}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("cannot write the state file")
                && error.contains(&state_path.display().to_string())
                && error.contains("No space left on device")
                && error.contains("nothing was changed"),
            "{command}: the error says what failed and that nothing changed: {error}"
        );
        assert!(
            attempts.load(Ordering::SeqCst) > tried,
            "{command}: the store was asked"
        );
        // Memory, disk and the routing table still agree on the old state.
        let status = server.admin("status").await;
        for key in ["green_weight", "state", "step", "pins"] {
            assert_eq!(
                status[key], status_before[key],
                "{command}: {key}: {status}"
            );
        }
        assert_eq!(on_disk().green_weight_bp, 2500, "{command}");
        assert!(on_disk().admin_pins.is_empty(), "{command}");
        assert!(on_disk().draining.is_empty(), "{command}");
        let table = server.server().proxy().shared().router.table();
        assert_eq!(table.green_weight_bp, 2500, "{command}");
        assert_eq!(table.draining, [false, false], "{command}");
        assert!(table.pins.is_empty(), "{command}");
    }

    // The disk is back: the next change goes through and lands on disk.
    failing.store(false, Ordering::SeqCst);
    let reply = server.admin("weight 50").await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(on_disk().green_weight_bp, 5000);
    assert_eq!(server.admin("status").await["green_weight"], 50.0);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Admin socket flood
// ---------------------------------------------------------------------------------------------

/// The latencies of `SELECT 1` round trips on one proxied session for `period`, sorted.
async fn query_latencies(client: &tokio_postgres::Client, period: Duration) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let until = std::time::Instant::now() + period;
    while std::time::Instant::now() < until {
        let started = std::time::Instant::now();
        client.simple_query("SELECT 1").await.expect("SELECT 1");
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

/// What the flood's peers saw.
#[derive(Debug, Default)]
struct FloodTally {
    /// Connections made (first ones and reconnects after a refusal).
    connections: usize,
    /// Connections refused with "too many admin connections".
    refused: usize,
    /// Peers that were served (their garbage answered with an error) and are still connected.
    served_now: usize,
    /// The most peers served at the same time.
    served_at_once: usize,
    /// Garbage lines answered.
    answered: usize,
}

/// One flood peer: its connection (while it has one) and whether it was let in.
struct FloodPeer {
    stream: Option<std::os::unix::net::UnixStream>,
    served: bool,
    pending: Vec<u8>,
}

/// `peers` clients of the admin socket, each sending a garbage line every `tick` and
/// reconnecting after a refusal, until `stop` is set. Blocking connects and non-blocking reads
/// on a thread of its own, so the flood does not run on the test's runtime.
fn flood(socket: &std::path::Path, peers: usize, tick: Duration, stop: &AtomicBool) -> FloodTally {
    use std::io::{ErrorKind, Read, Write};
    let mut tally = FloodTally::default();
    let mut clients: Vec<FloodPeer> = (0..peers)
        .map(|_| FloodPeer {
            stream: None,
            served: false,
            pending: Vec::new(),
        })
        .collect();
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let started = std::time::Instant::now();
        for (index, peer) in clients.iter_mut().enumerate() {
            if peer.stream.is_none() {
                let Ok(stream) = std::os::unix::net::UnixStream::connect(socket) else {
                    continue;
                };
                stream.set_nonblocking(true).expect("non-blocking");
                tally.connections += 1;
                peer.stream = Some(stream);
            }
            let stream = peer.stream.as_mut().expect("connected");
            let garbage = format!("\u{1b}[2J garbage {index}/{round} \u{7f};; DROP TABLE x; --\n");
            let _ = stream.write_all(garbage.as_bytes());
        }
        // Let the server answer, then read whatever it said.
        std::thread::sleep(tick / 2);
        for peer in &mut clients {
            let Some(stream) = peer.stream.as_mut() else {
                continue;
            };
            let mut chunk = [0u8; 4096];
            let closed = loop {
                match stream.read(&mut chunk) {
                    Ok(0) => break true,
                    Ok(count) => peer.pending.extend_from_slice(&chunk[..count]),
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            let text = String::from_utf8_lossy(&peer.pending).into_owned();
            let lines = text.matches('\n').count();
            if text.contains("too many admin connections") {
                assert!(!peer.served, "a served peer is never refused later: {text}");
                tally.refused += 1;
                peer.stream = None;
                peer.pending.clear();
                continue;
            }
            if lines > 0 {
                assert!(text.contains("\"ok\":false"), "garbage is refused: {text}");
                peer.served = true;
                tally.answered += lines;
                peer.pending.clear();
            }
            if closed {
                peer.stream = None;
                peer.served = false;
            }
        }
        let served_now = clients.iter().filter(|peer| peer.served).count();
        tally.served_at_once = tally.served_at_once.max(served_now);
        tally.served_now = served_now;
        round += 1;
        std::thread::sleep(tick.saturating_sub(started.elapsed()));
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_socket_flood_is_bounded_and_spares_the_proxy_path() {
    let _turn = TURNS.write().await;
    let _ = rlimit::increase_nofile_limit(8192);
    let pair = shared_pair();
    const MAX_ADMIN: usize = 8;
    const FLOOD: usize = 1_000;
    const PERIOD: Duration = Duration::from_millis(1500);
    const TICK: Duration = Duration::from_millis(250);
    let server = TestServer::start(
        pair,
        &format!("[admin]\nmax_connections = {MAX_ADMIN}\n"),
        "green_weight = 0",
        None,
    )
    .await;
    let client = tokio_postgres::connect(&server.bulk_dsn(), tokio_postgres::NoTls)
        .await
        .map(|(client, connection)| {
            tokio::spawn(connection);
            client
        })
        .expect("session");
    query_latencies(&client, Duration::from_millis(200)).await; // warm-up

    // A timing on a shared 2-core machine: up to three tries, each a baseline right before a
    // flood, and the first that holds wins. The bounds on the admin socket hold in every try.
    let mut tries = Vec::new();
    for _ in 0..3 {
        let baseline = query_latencies(&client, PERIOD).await;
        let socket = server.socket_path();
        let stop = Arc::new(AtomicBool::new(false));
        let flooder = {
            let stop = stop.clone();
            std::thread::spawn(move || flood(&socket, FLOOD, TICK, &stop))
        };
        // Measure while the flood runs (its first round of connections included).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let during = query_latencies(&client, PERIOD).await;
        stop.store(true, Ordering::Relaxed);
        let tally = tokio::task::spawn_blocking(move || flooder.join().expect("flood thread"))
            .await
            .expect("join");

        let (base_p99, flood_p99) = (p99(&baseline), p99(&during));
        eprintln!(
            "admin flood: {FLOOD} peers, a garbage line each every {TICK:?}: {tally:?}; \
             SELECT 1 p99 {base_p99:?} before, {flood_p99:?} during (p50 {:?} / {:?}, {} / {} \
             queries)",
            baseline[baseline.len() / 2],
            during[during.len() / 2],
            baseline.len(),
            during.len()
        );
        assert!(
            tally.served_at_once <= MAX_ADMIN,
            "at most max_connections peers are served at once: {tally:?}"
        );
        assert!(
            tally.served_now > 0 && tally.connections >= FLOOD,
            "the flood reached the socket: {tally:?}"
        );
        assert!(
            tally.refused >= tally.connections - MAX_ADMIN * tries.len().max(1) - MAX_ADMIN,
            "everyone else was refused: {tally:?}"
        );
        // 2x the baseline, with a floor of 1 ms: a single scheduler hiccup on a shared
        // machine is longer than a loopback SELECT 1.
        let held = flood_p99 <= (base_p99 * 2).max(Duration::from_millis(1));
        tries.push((base_p99, flood_p99));
        if held {
            break;
        }
    }
    let (base_p99, flood_p99) = *tries.last().expect("a try");
    assert!(
        flood_p99 <= (base_p99 * 2).max(Duration::from_millis(1)),
        "proxy p99 during the flood above 2x the baseline in every try (before, during): \
         {tries:?}"
    );

    // Afterwards the admin socket serves again, once the flood's connections are closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = server.admin("status").await;
        if reply["ok"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. A slow state store (an fsync that takes seconds on a busy disk)
// ---------------------------------------------------------------------------------------------

/// A store whose every save takes `delay` (as an fsync on a saturated disk can).
struct SlowStore {
    delay: Duration,
}

impl StateStore for SlowStore {
    fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        Ok(None)
    }

    fn save(&mut self, _state: &PersistedState) -> Result<(), StoreError> {
        std::thread::sleep(self.delay);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "slow".into()
    }
}

/// While the controller waits on its store, sessions are served on as before: the proxy's
/// longest `SELECT 1` during slow saves stays well below one save's duration.
///
/// The controller saves inside `tokio::task::block_in_place`, so a slow disk holds neither a
/// runtime worker nor the sessions queued on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_state_store_does_not_stall_sessions() {
    let _turn = TURNS.read().await;
    const SAVE: Duration = Duration::from_millis(1000);
    const SESSIONS: usize = 8;
    let server = server_with_store(|_| Box::new(SlowStore { delay: SAVE })).await;
    let dsn = blue_dsn(server.port);
    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .expect("session");
        tokio::spawn(connection);
        clients.push(client);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut longest = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    let started = std::time::Instant::now();
                    client.simple_query("SELECT 1").await.expect("SELECT 1");
                    longest = longest.max(started.elapsed());
                }
                longest
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for weight in [10, 20, 30, 40, 50, 60] {
        let reply = server.admin(&format!("weight {weight}")).await;
        assert_eq!(reply["ok"], true, "{reply}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut longest = Duration::ZERO;
    for handle in loops {
        longest = longest.max(handle.await.expect("loop"));
    }
    eprintln!(
        "slow store: longest SELECT 1 of {SESSIONS} sessions during six {SAVE:?} saves: {longest:?}"
    );
    assert!(
        longest < SAVE / 2,
        "a session waited {longest:?} while the controller waited on its store ({SAVE:?} a save)"
    );
    server.stop().await;
}
