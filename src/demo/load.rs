//! The demo's application: several simulated app instances (`web-1`, `worker-1`, ...) that
//! talk to pgshift with tokio-postgres as a real service would — reads of a tenant's latest
//! orders and inserts of new orders, each session naming its tenant
//! (`-c pgshift.tenant=acme`) and its instance (`application_name`).
//!
//! Each instance keeps one session at a time and replaces it every second or so (as a pool
//! with a short maximum lifetime does), so new sessions keep following the weight. A session
//! asks `current_setting('cluster_name')` once, so every operation is counted against the
//! color that served it. Before each operation the session checks that pgshift has not closed
//! it (a drain closes sessions at an idle point with 57P01; a pool would notice the same way)
//! and reconnects if so. Every failure the application sees is counted by SQLSTATE and color.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::{Client, NoTls};

use super::clusters::TENANTS;
use crate::color::Color;

/// The simulated application instances.
pub const INSTANCES: [&str; 8] = [
    "web-1", "web-2", "web-3", "web-4", "web-5", "worker-1", "worker-2", "worker-3",
];
/// Operations per second per instance.
const OPS_PER_SECOND: f64 = 20.0;
/// Share of operations that insert an order; the rest read.
const WRITE_RATIO: f64 = 0.3;
/// A session is replaced after a random lifetime in this range.
const SESSION_LIFE: (Duration, Duration) =
    (Duration::from_millis(600), Duration::from_millis(1200));
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub const READ_SQL: &str = "SELECT o.id::text, o.amount_cents FROM orders o JOIN tenants t ON t.id = o.tenant_id WHERE t.name = $1 ORDER BY o.created_at DESC LIMIT 5";
pub const WRITE_SQL: &str = "INSERT INTO orders (tenant_id, amount_cents, placed_by) SELECT id, $2, $3 FROM tenants WHERE name = $1";

/// Where the application connects: pgshift, as the application role.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

/// What the application saw, per color (index [`Color::index`]).
#[derive(Debug, Default)]
pub struct LoadCounters {
    pub reads: [AtomicU64; 2],
    pub writes: [AtomicU64; 2],
    pub sessions: [AtomicU64; 2],
    /// Sessions pgshift closed at an idle point (57P01: a drain), found closed before use.
    pub closed_by_pgshift: AtomicU64,
    /// Failures by (where, what): where is a color or "connect", what a SQLSTATE with its
    /// meaning, or a short description.
    errors: Mutex<BTreeMap<(String, String), u64>>,
}

impl LoadCounters {
    fn error(&self, place: &str, what: String) {
        let mut errors = self
            .errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *errors.entry((place.to_string(), what)).or_insert(0) += 1;
    }

    /// Every failure seen so far, by (where, what).
    pub fn errors(&self) -> BTreeMap<(String, String), u64> {
        self.errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn error_count(&self) -> u64 {
        self.errors().values().sum()
    }

    /// Successful operations on every color.
    pub fn operations(&self) -> u64 {
        Color::ALL
            .iter()
            .map(|color| {
                self.reads[color.index()].load(Ordering::Relaxed)
                    + self.writes[color.index()].load(Ordering::Relaxed)
            })
            .sum()
    }
}

/// The running application.
pub struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub counters: Arc<LoadCounters>,
}

impl Load {
    /// Starts every instance against `target`.
    pub fn start(target: Target) -> Load {
        let (stop, stopped) = watch::channel(false);
        let counters = Arc::new(LoadCounters::default());
        let tasks = INSTANCES
            .iter()
            .enumerate()
            .map(|(index, name)| {
                tokio::spawn(instance(
                    name,
                    index,
                    target.clone(),
                    counters.clone(),
                    stopped.clone(),
                ))
            })
            .collect();
        Load {
            stop,
            tasks,
            counters,
        }
    }

    /// Stops every instance (each ends its session cleanly) and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// SQLSTATE (and its name, when the demo knows it) of an error, or a short description.
pub fn describe_error(error: &tokio_postgres::Error) -> String {
    if let Some(code) = error.code() {
        let code = code.code();
        let meaning = match code {
            "42501" => " insufficient_privilege",
            "57P01" => " admin_shutdown (session closed by pgshift at an idle point)",
            "57P03" => " cannot_connect_now",
            "08006" => " connection_failure",
            "53300" => " too_many_connections",
            "28P01" => " invalid_password",
            _ => "",
        };
        return format!("{code}{meaning}");
    }
    if error.is_closed() {
        return "connection closed".into();
    }
    let text = error.to_string();
    text.split(':').next().unwrap_or("error").trim().to_string()
}

fn color_of(cluster_name: &str) -> Option<Color> {
    if cluster_name.ends_with("-green") {
        Some(Color::Green)
    } else if cluster_name.ends_with("-blue") {
        Some(Color::Blue)
    } else {
        None
    }
}

/// A uniformly drawn duration in `range`.
fn draw(range: (Duration, Duration)) -> Duration {
    range.0 + (range.1.saturating_sub(range.0)).mul_f64(rand::random::<f64>())
}

/// One simulated application instance: a session at a time, replaced every second or so.
async fn instance(
    name: &'static str,
    index: usize,
    target: Target,
    counters: Arc<LoadCounters>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut sessions = 0usize;
    // Instances start spread over one tick, not all at once.
    tokio::time::sleep(Duration::from_secs_f64(
        index as f64 / OPS_PER_SECOND / INSTANCES.len() as f64,
    ))
    .await;
    while !*stopped.borrow() {
        let tenant = TENANTS[(index + sessions) % TENANTS.len()];
        sessions += 1;
        match session(name, tenant, &target, &counters, &mut stopped).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(()) => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One session: connect, learn the color, run operations until its lifetime ends. `Err` when
/// it could not even start.
async fn session(
    name: &str,
    tenant: &str,
    target: &Target,
    counters: &LoadCounters,
    stopped: &mut watch::Receiver<bool>,
) -> Result<(), ()> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&target.host)
        .port(target.port)
        .user(&target.user)
        .password(&target.password)
        .dbname(&target.database)
        .application_name(name)
        .options(format!("-c pgshift.tenant={tenant}"))
        .connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) =
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => {
                if !*stopped.borrow() {
                    counters.error("connect", describe_error(&error));
                }
                return Err(());
            }
            Err(_) => {
                counters.error("connect", "timed out".into());
                return Err(());
            }
        };
    let (ended, ending) = oneshot::channel();
    let driver = tokio::spawn(async move {
        let _ = ended.send(connection.await.err());
    });
    let outcome = run_session(name, tenant, &client, counters, stopped).await;
    drop(client);
    let ended_with = tokio::time::timeout(Duration::from_millis(200), ending)
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    if ended_with
        .as_ref()
        .and_then(tokio_postgres::Error::code)
        .map(|code| code.code())
        == Some("57P01")
    {
        counters.closed_by_pgshift.fetch_add(1, Ordering::Relaxed);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
    outcome
}

async fn run_session(
    name: &str,
    tenant: &str,
    client: &Client,
    counters: &LoadCounters,
    stopped: &mut watch::Receiver<bool>,
) -> Result<(), ()> {
    let cluster: String = match client
        .query_one("SELECT current_setting('cluster_name')", &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(error) => {
            counters.error("session start", describe_error(&error));
            return Err(());
        }
    };
    let Some(color) = color_of(&cluster) else {
        counters.error("session start", format!("unknown cluster {cluster:?}"));
        return Err(());
    };
    let place = color.as_str();
    counters.sessions[color.index()].fetch_add(1, Ordering::Relaxed);
    let statements = async {
        Ok::<_, tokio_postgres::Error>((
            client.prepare(READ_SQL).await?,
            client.prepare(WRITE_SQL).await?,
        ))
    };
    let (read, write) = match statements.await {
        Ok(statements) => statements,
        Err(error) => {
            counters.error(place, describe_error(&error));
            return Err(());
        }
    };
    let ends = Instant::now() + draw(SESSION_LIFE);
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / OPS_PER_SECOND));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.changed() => return Ok(()),
        }
        if *stopped.borrow() || Instant::now() >= ends || client.is_closed() {
            return Ok(());
        }
        let result = if rand::random::<f64>() < WRITE_RATIO {
            let amount = 100 + (rand::random::<f64>() * 99_900.0) as i32;
            client
                .execute(&write, &[&tenant, &amount, &name])
                .await
                .map(|_| &counters.writes)
        } else {
            client
                .query(&read, &[&tenant])
                .await
                .map(|_| &counters.reads)
        };
        match result {
            Ok(counter) => {
                counter[color.index()].fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                counters.error(place, describe_error(&error));
                if client.is_closed() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_color_comes_from_the_cluster_name() {
        assert_eq!(color_of("pgshift-demo-x1-green"), Some(Color::Green));
        assert_eq!(color_of("pgshift-demo-x1-blue"), Some(Color::Blue));
        assert_eq!(color_of("main"), None);
    }

    #[test]
    fn draws_stay_in_range() {
        for _ in 0..100 {
            let life = draw(SESSION_LIFE);
            assert!(life >= SESSION_LIFE.0 && life <= SESSION_LIFE.1, "{life:?}");
        }
    }
}
