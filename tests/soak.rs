//! The soak test (docs/RELIABILITY.md): a reconnecting load generator of pgshift's own writes
//! uniquely keyed rows through pgshift for `PGSHIFT_SOAK_SECS` seconds (default 60) while the
//! weight flips between 0 and 100 % every 2 s, green is restarted twice (a fast shutdown, then
//! an immediate one) and `reload` runs every 10 s. Blue and green are independent (a private
//! pair, no replication), so afterwards:
//!
//! - every acknowledged write is in blue ∪ green, and in only one of them;
//! - no row exists that was neither acknowledged nor in doubt (in doubt: the statement or its
//!   COMMIT got an error or lost its connection, so it may or may not have committed);
//! - the session gauges, the cancel table, the client slots and the open file descriptors
//!   return to their baseline; RSS does not grow over the second half; nothing panicked.
//!
//! Ignored by default; `.ci/run` runs 30 s of it:
//! `PGSHIFT_SOAK_SECS=30 cargo test --test soak -- --ignored --nocapture`.
//!
//! The load: 64 workers, each opening a session, running a few hundred transactions on it
//! (alternately an autocommit INSERT and `BEGIN; INSERT; COMMIT` in one Query), then opening a
//! new one, so that weight changes move traffic; after any error a worker reconnects. pgbench
//! would not do: it aborts a client whose backend restarts.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgshift::color::Color;
use support::pgshift::TestServer;
use support::{BULK_USER, ClusterPair};
use tokio::time::Instant;

const WORKERS: u64 = 64;
const FLIP_EVERY: Duration = Duration::from_secs(2);
const RELOAD_EVERY: Duration = Duration::from_secs(10);
/// A statement that takes longer than this is a hang, and fails the test.
const HANG: Duration = Duration::from_secs(30);

/// Keys are `worker << 32 | sequence`.
fn key(worker: u64, sequence: u64) -> i64 {
    ((worker << 32) | sequence) as i64
}

/// Per worker, which sequence numbers were acknowledged and which are in doubt: bitsets, so
/// the load generator's own memory stays flat and does not blur pgshift's RSS curve.
struct Ledger {
    acknowledged: Vec<u64>,
    in_doubt: Vec<u64>,
}

/// Sequence numbers a ledger holds without growing (a worker writes ~100,000 in 10 minutes).
const LEDGER_PREALLOCATED: usize = 1 << 20;

impl Ledger {
    /// Both bitsets allocated and touched up front: the RSS curve then shows pgshift (and the
    /// clients), not the ledgers filling up.
    fn new() -> Ledger {
        let touched = || {
            let mut bits = vec![0u64; LEDGER_PREALLOCATED / 64];
            for word in bits.iter_mut() {
                *word = std::hint::black_box(0);
            }
            bits
        };
        Ledger {
            acknowledged: touched(),
            in_doubt: touched(),
        }
    }
}

fn set_bit(bits: &mut Vec<u64>, index: u64) {
    let word = (index / 64) as usize;
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    bits[word] |= 1 << (index % 64);
}

fn has_bit(bits: &[u64], index: u64) -> bool {
    bits.get((index / 64) as usize)
        .is_some_and(|word| word & (1 << (index % 64)) != 0)
}

fn count_bits(bits: &[u64]) -> u64 {
    bits.iter().map(|word| u64::from(word.count_ones())).sum()
}

/// What the load saw, shared by the workers.
#[derive(Default)]
struct Tally {
    sessions: AtomicU64,
    connect_errors: AtomicU64,
    write_errors: AtomicU64,
    hangs: AtomicU64,
    errors_by_sqlstate: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, error: &tokio_postgres::Error) {
        let code = error
            .code()
            .map(|code| code.code().to_string())
            .unwrap_or_else(|| "(closed)".to_string());
        *self
            .errors_by_sqlstate
            .lock()
            .unwrap()
            .entry(code)
            .or_default() += 1;
    }
}

/// One worker of the load generator; returns its ledger when `stop` is set.
async fn worker(id: u64, dsn: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) -> Ledger {
    let mut ledger = Ledger::new();
    let mut sequence = 0u64;
    let mut rng_state = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next_random = move || {
        // xorshift64: a few hundred transactions per session, varied per worker.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    while !stop.load(Ordering::Relaxed) {
        let connected =
            tokio::time::timeout(HANG, tokio_postgres::connect(&dsn, tokio_postgres::NoTls)).await;
        let client = match connected {
            Ok(Ok((client, connection))) => {
                tokio::spawn(connection);
                client
            }
            Ok(Err(error)) => {
                tally.connect_errors.fetch_add(1, Ordering::Relaxed);
                tally.error(&error);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(_) => {
                tally.hangs.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        tally.sessions.fetch_add(1, Ordering::Relaxed);
        let transactions = 100 + next_random() % 300;
        for _ in 0..transactions {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            sequence += 1;
            let row = key(id, sequence);
            let sql = if sequence.is_multiple_of(2) {
                format!("INSERT INTO soak (id, worker) VALUES ({row}, {id})")
            } else {
                format!("BEGIN; INSERT INTO soak (id, worker) VALUES ({row}, {id}); COMMIT")
            };
            match tokio::time::timeout(HANG, client.simple_query(&sql)).await {
                Ok(Ok(_)) => set_bit(&mut ledger.acknowledged, sequence),
                Ok(Err(error)) => {
                    set_bit(&mut ledger.in_doubt, sequence);
                    tally.write_errors.fetch_add(1, Ordering::Relaxed);
                    tally.error(&error);
                    break;
                }
                Err(_) => {
                    set_bit(&mut ledger.in_doubt, sequence);
                    tally.hangs.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        drop(client);
    }
    ledger
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// VmRSS of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// All keys in `soak` on one cluster.
fn keys_on(cluster: &support::Cluster) -> Vec<i64> {
    let text = cluster.psql_db("app", "SELECT id FROM soak");
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| line.parse().expect("an id"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak test: PGSHIFT_SOAK_SECS=N cargo test --test soak -- --ignored --nocapture"]
async fn soak_with_weight_flips_green_restarts_and_reloads() {
    let seconds: u64 = std::env::var("PGSHIFT_SOAK_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60);
    let duration = Duration::from_secs(seconds.max(10));

    let panics = Arc::new(AtomicUsize::new(0));
    {
        let panics = panics.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            panics.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    }

    let pair = Arc::new(
        tokio::task::spawn_blocking(ClusterPair::start_private)
            .await
            .expect("private pair"),
    );
    for cluster in pair.both() {
        // The test clusters run with synchronous_commit = off, which loses the last commits
        // of a crash (the immediate restart below) by design: an acknowledged write must
        // survive it, so the soak's database commits synchronously.
        cluster.psql_db(
            "app",
            "CREATE TABLE soak (id bigint PRIMARY KEY, worker int NOT NULL, \
             at timestamptz NOT NULL DEFAULT now()); GRANT ALL ON soak TO PUBLIC; \
             ALTER DATABASE app SET synchronous_commit = on;",
        );
    }
    let server = TestServer::start(&pair, "", "green_weight = 0", None).await;
    let shared = server.server().proxy().shared().clone();
    let dsn = format!(
        "host=127.0.0.1 port={} user={BULK_USER} dbname=app connect_timeout=10",
        server.port
    );

    // Baselines, once pgshift is up and before any client.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fds_before = open_fds();
    let rss_before = rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| tokio::spawn(worker(id, dsn.clone(), stop.clone(), tally.clone())))
        .collect();

    // The operator's side: weight flips, reloads, two green restarts; RSS sampled each second.
    let started = Instant::now();
    let mut rss_curve: Vec<(u64, u64)> = Vec::new();
    let mut next_flip = started + FLIP_EVERY;
    let mut next_reload = started + RELOAD_EVERY;
    let mut next_sample = started;
    let restarts = [duration / 3, duration * 2 / 3];
    let mut restarted = 0;
    let mut green_weight = 0;
    let mut flips = 0;
    let mut reloads = 0;
    let mut login_timeout = 3;
    let mut restarting: Option<tokio::task::JoinHandle<()>> = None;
    let mut admin_latency = Vec::new();
    while started.elapsed() < duration {
        let now = Instant::now();
        if now >= next_sample {
            rss_curve.push((started.elapsed().as_secs(), rss_kib()));
            if rss_curve.len() % 10 == 1 {
                eprintln!(
                    "soak t={:>4}s rss={} KiB fds={} sessions blue={} green={} opened={}",
                    started.elapsed().as_secs(),
                    rss_kib(),
                    open_fds(),
                    shared.stats.color(Color::Blue).sessions_open(),
                    shared.stats.color(Color::Green).sessions_open(),
                    tally.sessions.load(Ordering::Relaxed),
                );
            }
            next_sample += Duration::from_secs(1);
        }
        if now >= next_flip {
            green_weight = 100 - green_weight;
            let asked = Instant::now();
            let reply = server.admin(&format!("weight {green_weight}")).await;
            admin_latency.push((asked.elapsed(), "weight", started.elapsed().as_secs()));
            assert_eq!(reply["ok"], true, "weight flip: {reply}");
            flips += 1;
            next_flip += FLIP_EVERY;
        }
        if now >= next_reload {
            // A real change each time, so the reload swaps a new config in.
            login_timeout = if login_timeout == 3 { 4 } else { 3 };
            let text = std::fs::read_to_string(&server.config_path).expect("config");
            let text = text.replacen(
                &format!("login_timeout = \"{}s\"", 7 - login_timeout),
                &format!("login_timeout = \"{login_timeout}s\""),
                1,
            );
            std::fs::write(&server.config_path, text).expect("config");
            let asked = Instant::now();
            let reply = server.admin("reload").await;
            admin_latency.push((asked.elapsed(), "reload", started.elapsed().as_secs()));
            assert_eq!(reply["ok"], true, "reload: {reply}");
            reloads += 1;
            next_reload += RELOAD_EVERY;
        }
        if restarted < restarts.len()
            && started.elapsed() >= restarts[restarted]
            && restarting.as_ref().is_none_or(|task| task.is_finished())
        {
            // Off the operator's loop: flips and reloads go on while green restarts.
            let pair = pair.clone();
            let immediate = restarted == 1;
            let at = started.elapsed().as_secs();
            restarting = Some(tokio::task::spawn_blocking(move || {
                let began = std::time::Instant::now();
                if immediate {
                    pair.green.stop_immediate();
                } else {
                    pair.green.stop();
                }
                std::thread::sleep(Duration::from_millis(500));
                pair.green.start();
                eprintln!(
                    "soak t={at:>4}s green restarted ({}) in {:?}",
                    if immediate { "immediate" } else { "fast" },
                    began.elapsed()
                );
            }));
            restarted += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(task) = restarting {
        task.await.expect("green restart");
    }
    stop.store(true, Ordering::Relaxed);
    let mut ledgers = Vec::new();
    for handle in workers {
        ledgers.push(
            tokio::time::timeout(HANG * 2, handle)
                .await
                .expect("workers stop")
                .expect("worker"),
        );
    }
    let ran_for = started.elapsed();

    // Every acknowledged write is somewhere, once; every row was acknowledged or in doubt.
    let pair_for_keys = pair.clone();
    let (blue_keys, green_keys) = tokio::task::spawn_blocking(move || {
        (keys_on(&pair_for_keys.blue), keys_on(&pair_for_keys.green))
    })
    .await
    .expect("read keys");
    let mut present: Vec<Vec<u64>> = (0..WORKERS).map(|_| Vec::new()).collect();
    let mut on_both = 0u64;
    let mut unexplained = Vec::new();
    let mut in_doubt_committed = 0u64;
    for &row in blue_keys.iter().chain(&green_keys) {
        let worker = (row as u64) >> 32;
        let sequence = (row as u64) & 0xffff_ffff;
        assert!(worker < WORKERS, "a row of no worker: {row}");
        if has_bit(&present[worker as usize], sequence) {
            on_both += 1;
        }
        set_bit(&mut present[worker as usize], sequence);
        let ledger = &ledgers[worker as usize];
        if has_bit(&ledger.in_doubt, sequence) {
            in_doubt_committed += 1;
        } else if !has_bit(&ledger.acknowledged, sequence) {
            unexplained.push(row);
        }
    }
    let mut missing = Vec::new();
    let (mut acknowledged, mut in_doubt) = (0u64, 0u64);
    for (worker, ledger) in ledgers.iter().enumerate() {
        acknowledged += count_bits(&ledger.acknowledged);
        in_doubt += count_bits(&ledger.in_doubt);
        for (word_index, word) in ledger.acknowledged.iter().enumerate() {
            for bit in 0..64 {
                let sequence = word_index as u64 * 64 + bit;
                if word & (1 << bit) != 0 && !has_bit(&present[worker], sequence) {
                    missing.push(key(worker as u64, sequence));
                }
            }
        }
    }

    // Nothing left behind.
    let released = || support::pgshift::nothing_left_behind(&shared);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(released() && open_fds() <= fds_before) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fds_after = open_fds();
    let rss_after = rss_kib();

    // RSS over the second half: the last tenth of the samples against those around the middle.
    let average = |samples: &[(u64, u64)]| {
        samples.iter().map(|(_, rss)| rss).sum::<u64>() / samples.len().max(1) as u64
    };
    let n = rss_curve.len();
    let middle = average(&rss_curve[n * 45 / 100..(n * 55 / 100).max(n * 45 / 100 + 1)]);
    let end = average(&rss_curve[n * 9 / 10..]);
    let curve: Vec<String> = rss_curve
        .iter()
        .step_by((n / 20).max(1))
        .map(|(t, rss)| format!("{t}s:{}", rss / 1024))
        .collect();
    let stats = |color: Color| shared.stats.color(color).snapshot();
    admin_latency.sort();
    let admin_p50 = admin_latency[admin_latency.len() / 2].0;
    let admin_slowest: Vec<String> = admin_latency
        .iter()
        .rev()
        .take(3)
        .map(|(took, command, at)| format!("{command} at {at}s took {took:?}"))
        .collect();
    eprintln!(
        "soak summary: ran {ran_for:?} (PGSHIFT_SOAK_SECS={seconds}), {WORKERS} workers, \
         {flips} weight flips, {reloads} reloads, {restarted} green restarts\n\
         \x20 writes: {acknowledged} acknowledged, {in_doubt} in doubt ({in_doubt_committed} of \
         them committed), rows blue {} + green {}\n\
         \x20 sessions opened by the load {}, connect errors {}, write errors {}, hangs {}, \
         errors by SQLSTATE {:?}\n\
         \x20 pgshift: blue requests {} errors {}; green requests {} errors {}\n\
         \x20 admin weight/reload replies: p50 {admin_p50:?}, slowest {admin_slowest:?}\n\
         \x20 fds {fds_before} -> {fds_after}; RSS {} MiB before, middle {} MiB, end {} MiB, \
         after the check (which holds every key) {} MiB\n\
         \x20 RSS curve (s:MiB): {}",
        blue_keys.len(),
        green_keys.len(),
        tally.sessions.load(Ordering::Relaxed),
        tally.connect_errors.load(Ordering::Relaxed),
        tally.write_errors.load(Ordering::Relaxed),
        tally.hangs.load(Ordering::Relaxed),
        tally.errors_by_sqlstate.lock().unwrap(),
        stats(Color::Blue).requests,
        stats(Color::Blue).request_errors,
        stats(Color::Green).requests,
        stats(Color::Green).request_errors,
        rss_before / 1024,
        middle / 1024,
        end / 1024,
        rss_after / 1024,
        curve.join(" ")
    );

    assert!(
        missing.is_empty(),
        "{} acknowledged writes are in neither database, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        unexplained.is_empty(),
        "{} rows were neither acknowledged nor in doubt, e.g. {:?}",
        unexplained.len(),
        &unexplained[..unexplained.len().min(10)]
    );
    assert_eq!(on_both, 0, "no row is in both databases");
    assert_eq!(tally.hangs.load(Ordering::Relaxed), 0, "no statement hung");
    assert!(
        acknowledged > 1000,
        "the load did run: {acknowledged} writes"
    );
    assert!(
        released(),
        "left behind: {}",
        support::pgshift::left_behind(&shared)
    );
    assert!(
        fds_after <= fds_before,
        "open file descriptors: {fds_before} before, {fds_after} after"
    );
    // Flat: within 10 % (and 8 MiB) of the middle of the run.
    assert!(
        end <= middle + (middle / 10).max(8 * 1024),
        "RSS grew over the second half: {} MiB at the middle, {} MiB at the end",
        middle / 1024,
        end / 1024
    );
    assert_eq!(panics.load(Ordering::SeqCst), 0, "something panicked");
    server.stop().await;
}
