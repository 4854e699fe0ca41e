//! The transparent cutover itself, as the controller runs it for `promote`: freeze, catch-up,
//! then (after the controller switched the routing) commit — each frozen session moves to the
//! new color or, when it cannot, closes with 57P01 — or abort, which resumes every session on
//! the old color with nothing lost.
//!
//! 1. **Freeze.** New logins are held at the gate; the logins already past it are awaited;
//!    every session on the old color freezes at its next idle point (see
//!    [`crate::proxy::freeze`]), reads its own state and logs in to the new color. Bounded by
//!    `freeze_timeout`: past it, `on_timeout = "abort"` resumes everything, `"terminate"` ends
//!    the sessions still in a transaction with 57P01 and goes on.
//! 2. **Catch-up.** One marker per (database, publication) written on the old color is awaited
//!    on the new one ([`super::catch_up`]); bounded by `catchup_timeout`, else abort. With
//!    `sync_sequences`, the new color's sequences are then set ([`super::sequences`]).
//! 3. **Commit** (after the controller published 100 % to the new color): the frozen sessions
//!    move; once every one has moved or closed, held logins are released.
//!
//! Dropping a [`FrozenCutover`] without committing aborts it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::catalog::{self, Connections};
use super::setup::Direction;
use crate::color::Color;
use crate::config::CutoverTimeoutAction;
use crate::proxy::Shared;
use crate::proxy::cutover::{CutoverPhase, CutoverRun, FreezeReport, Unmovable};
use crate::proxy::registry::{CloseOrder, CloseReason};

/// How often the freeze looks again at sessions that have not reported.
const FREEZE_POLL: Duration = Duration::from_millis(5);

/// How often a wait looks for a `cutover abort`.
const ABORT_POLL: Duration = Duration::from_millis(10);

/// The longest wait for frozen sessions to act on the commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a cutover stopped, and at which step; every session was resumed on the old color.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutoverFailure {
    pub step: &'static str,
    pub reason: String,
}

impl std::fmt::Display for CutoverFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cutover aborted at {}: {}; every session resumed on the old color, nothing lost",
            self.step, self.reason
        )
    }
}

/// What a finished cutover did, for the promote reply, the log and the metrics.
#[derive(Debug, Clone, Default)]
pub struct CutoverOutcome {
    pub freeze: Duration,
    pub catchup: Duration,
    /// From the start of the freeze to the release of the held logins.
    pub stall: Duration,
    pub moved: usize,
    /// Sessions closed with 57P01 because they could not move, with why.
    pub unmovable: Vec<String>,
    /// Sessions ended at `freeze_timeout` (`on_timeout = "terminate"`).
    pub terminated: usize,
    /// What happened to the forward subscriptions, one line each.
    pub subscriptions: Vec<String>,
    /// `sync_sequences`: the sequences set on the new color (and those missing there).
    pub sequences: Vec<String>,
    /// `reverse_slot` (promote): the slot created on green, and the subscription to create on
    /// blue with it.
    pub reverse: Option<ReverseSlot>,
}

/// The reverse replication slot a promote created, and how to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReverseSlot {
    pub slot: String,
    pub database: String,
    pub lsn: String,
    /// The statement to run on blue once the promote is done.
    pub subscription_sql: String,
}

/// Sessions frozen and the new color caught up: waiting for the controller's routing switch.
pub struct FrozenCutover<'a> {
    shared: &'a Shared,
    to: Color,
    connections: Connections,
    started: Instant,
    reports: HashMap<u64, Result<(), Unmovable>>,
    outcome: CutoverOutcome,
    committed: bool,
}

impl Drop for FrozenCutover<'_> {
    fn drop(&mut self) {
        if !self.committed {
            resume(self.shared);
        }
    }
}

/// Resolves once `check` finds an abort request (it is polled).
async fn abort_asked(check: impl Fn() -> Option<CutoverFailure>) -> CutoverFailure {
    loop {
        if let Some(failure) = check() {
            return failure;
        }
        tokio::time::sleep(ABORT_POLL).await;
    }
}

/// Everyone resumes on the old color; held logins go on.
fn resume(shared: &Shared) {
    shared.cutover.set(CutoverPhase::Abort);
    shared.cutover.set(CutoverPhase::Idle);
    metrics::gauge!("pgshift_cutover_held_requests").set(0.0);
}

/// Steps 1 and 2: freeze every session of `to.other()`, then wait for the new color to catch up.
pub async fn freeze_and_catch_up<'a>(
    shared: &'a Shared,
    to: Color,
    run: &CutoverRun<'_>,
) -> Result<FrozenCutover<'a>, CutoverFailure> {
    let config = shared.config.load_full();
    let cutover = &config.cutover;
    let from = to.other();
    let direction = Direction {
        publisher: from,
        subscriber: to,
    };
    let fail = |step: &'static str| move |reason: String| CutoverFailure { step, reason };
    let aborted = |step: &'static str| {
        run.abort_requested().map(|by| CutoverFailure {
            step,
            reason: format!("stopped by `cutover abort` ({by})"),
        })
    };
    run.step("prepare");
    let connections = Connections::of_proxy(shared).map_err(fail("prepare"))?;
    let databases = catalog::read_replication(&connections, direction)
        .await
        .map_err(fail("prepare"))?;
    let mut links = catalog::MarkerLinks::open(&connections, direction, &databases)
        .await
        .map_err(fail("prepare"))?;

    // Every session logs in to the new color ahead, so the freeze does not pay for the forks
    // and logins; those not done within connect_timeout log in during the freeze instead.
    let (prepared_sender, mut prepared) = mpsc::unbounded_channel();
    shared.cutover.set(CutoverPhase::Preparing {
        to,
        prepared: prepared_sender,
    });
    let mut waiting: HashSet<u64> = shared.sessions.ids(from).into_iter().collect();
    let prepare_deadline = tokio::time::Instant::now() + config.backend(to).connect_timeout;
    while !waiting.is_empty() && tokio::time::Instant::now() < prepare_deadline {
        if let Some(failure) = aborted("prepare") {
            resume(shared);
            return Err(failure);
        }
        tokio::select! {
            done = prepared.recv() => {
                if let Some(id) = done {
                    waiting.remove(&id);
                }
            }
            _ = tokio::time::sleep(FREEZE_POLL) => {
                waiting.retain(|id| shared.sessions.contains(*id));
            }
        }
    }
    if let Some(failure) = aborted("prepare") {
        resume(shared);
        return Err(failure);
    }
    run.step("freeze");
    let started = Instant::now();
    let (sender, mut receiver) = mpsc::unbounded_channel();
    shared.cutover.set(CutoverPhase::Holding {
        to,
        reports: sender,
    });
    let mut frozen = FrozenCutover {
        shared,
        to,
        connections,
        started,
        reports: HashMap::new(),
        outcome: CutoverOutcome::default(),
        committed: false,
    };
    let deadline = tokio::time::Instant::now() + cutover.freeze_timeout;
    if let Err(in_flight) = shared.cutover.wait_for_logins(cutover.freeze_timeout).await {
        return Err(CutoverFailure {
            step: "freeze",
            reason: format!(
                "{in_flight} login(s) still running after freeze_timeout ({:?})",
                cutover.freeze_timeout
            ),
        });
    }
    let mut expected: HashSet<u64> = shared.sessions.ids(from).into_iter().collect();
    loop {
        if let Some(failure) = aborted("freeze") {
            return Err(failure);
        }
        while let Ok(report) = receiver.try_recv() {
            frozen.record(report);
        }
        expected.retain(|id| shared.sessions.contains(*id));
        let waiting: Vec<u64> = expected
            .iter()
            .filter(|id| !frozen.reports.contains_key(id))
            .copied()
            .collect();
        if waiting.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            match cutover.on_timeout {
                CutoverTimeoutAction::Abort => {
                    return Err(CutoverFailure {
                        step: "freeze",
                        reason: format!(
                            "{} session(s) did not reach an idle point within freeze_timeout ({:?}): a transaction stayed open",
                            waiting.len(),
                            cutover.freeze_timeout
                        ),
                    });
                }
                CutoverTimeoutAction::Terminate => {
                    for id in &waiting {
                        shared
                            .sessions
                            .order_one(*id, CloseOrder::Now(CloseReason::FreezeTimeout));
                    }
                    frozen.outcome.terminated = waiting.len();
                    expected.retain(|id| !waiting.contains(id));
                    continue;
                }
            }
        }
        tokio::select! {
            report = receiver.recv() => {
                if let Some(report) = report {
                    frozen.record(report);
                }
            }
            _ = tokio::time::sleep(FREEZE_POLL) => {}
        }
    }
    frozen.outcome.freeze = started.elapsed();

    run.step("catch-up");
    let caught_up = tokio::select! {
        caught_up = super::catch_up(&mut links, cutover.catchup_timeout) => {
            caught_up.map_err(fail("catch-up"))?
        }
        failure = abort_asked(|| aborted("catch-up")) => return Err(failure),
    };
    frozen.outcome.catchup = caught_up;
    if let Some(failure) = aborted("catch-up") {
        return Err(failure);
    }
    if cutover.sync_sequences {
        run.step("sequences");
        frozen.outcome.sequences = super::sequences::sync(
            &frozen.connections,
            direction,
            &databases,
            cutover.sequence_margin,
        )
        .await
        .map_err(fail("sequences"))?;
    }
    if let (Some(slot), Color::Green) = (cutover.reverse_slot.as_deref(), to) {
        run.step("reverse slot");
        // Creating a logical slot waits for green's transactions in progress to end.
        let created = tokio::time::timeout(
            cutover.catchup_timeout,
            create_reverse_slot(&frozen.connections, &config, &databases, slot),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "green's transactions in progress did not end within catchup_timeout ({:?})",
                cutover.catchup_timeout
            ))
        })
        .map_err(fail("reverse slot"))?;
        frozen.outcome.reverse = Some(created);
    }
    Ok(frozen)
}

/// Creates the reverse slot on green in the replicated database, once blue is quiet and before
/// green takes blue's sessions: every write green takes from now on reaches blue through it.
async fn create_reverse_slot(
    connections: &Connections,
    config: &crate::config::Config,
    databases: &[super::setup::DatabaseFacts],
    slot: &str,
) -> Result<ReverseSlot, String> {
    let [facts] = databases else {
        return Err(format!(
            "reverse_slot needs exactly one replicated database, found {}",
            databases.len()
        ));
    };
    let database = facts.database.clone();
    let green = connections.connect(Color::Green, Some(&database)).await?;
    let publications = catalog::read_reverse(&green, Color::Green, slot)
        .await?
        .publications;
    drop(green);
    let lsn = catalog::create_slot(connections, Color::Green, slot, &database).await?;
    let backend = config.backend(Color::Green);
    let subscription_sql = format!(
        "CREATE SUBSCRIPTION pgshift_reverse CONNECTION 'host={} port={} dbname={database} user=<a replication role>' PUBLICATION {} WITH (create_slot = false, slot_name = '{slot}', copy_data = false);",
        backend.host,
        backend.port,
        publications
            .iter()
            .map(|name| crate::probe::table::quote_identifier(name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    tracing::info!(slot, %lsn, "cutover: reverse replication slot created on green; on blue run: {subscription_sql}");
    Ok(ReverseSlot {
        slot: slot.to_string(),
        database,
        lsn,
        subscription_sql,
    })
}

impl FrozenCutover<'_> {
    fn record(&mut self, report: FreezeReport) {
        self.reports.insert(report.session_id, report.movable);
        metrics::gauge!("pgshift_cutover_held_requests").set(self.reports.len() as f64);
    }

    /// Step 3, once the routing sends new sessions to the new color: frozen sessions move (or
    /// close), then held logins are released.
    pub async fn commit(mut self) -> CutoverOutcome {
        let shared = self.shared;
        let from = self.to.other();
        shared.cutover.set(CutoverPhase::Commit { to: self.to });
        let deadline = tokio::time::Instant::now() + COMMIT_TIMEOUT;
        let reported: Vec<u64> = self.reports.keys().copied().collect();
        loop {
            let on_old: HashSet<u64> = shared.sessions.ids(from).into_iter().collect();
            if !reported.iter().any(|id| on_old.contains(id))
                || tokio::time::Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(FREEZE_POLL).await;
        }
        self.committed = true;
        shared.cutover.set(CutoverPhase::Idle);
        metrics::gauge!("pgshift_cutover_held_requests").set(0.0);
        self.outcome.stall = self.started.elapsed();
        for movable in self.reports.values() {
            match movable {
                Ok(()) => self.outcome.moved += 1,
                Err(unmovable) => self.outcome.unmovable.push(unmovable.0.clone()),
            }
        }
        self.outcome.subscriptions =
            disable_forward_subscriptions(&self.connections, self.to).await;
        record_metrics(&self.outcome);
        std::mem::take(&mut self.outcome)
    }
}

/// The forward subscriptions (on the new color) stop: nothing writes to the old color now.
async fn disable_forward_subscriptions(connections: &Connections, to: Color) -> Vec<String> {
    let direction = Direction {
        publisher: to.other(),
        subscriber: to,
    };
    let databases = match catalog::read_replication(connections, direction).await {
        Ok(databases) => databases,
        Err(error) => return vec![format!("not disabled: {error}")],
    };
    let mut lines = Vec::new();
    for facts in &databases {
        for subscription in facts.subscriptions.iter().filter(|s| s.enabled) {
            let line = match catalog::disable_subscription(
                connections,
                to,
                &facts.database,
                &subscription.name,
            )
            .await
            {
                Ok(()) => format!(
                    "{} (database {}) disabled",
                    subscription.name, facts.database
                ),
                Err(error) => format!(
                    "{} (database {}) not disabled: {error}",
                    subscription.name, facts.database
                ),
            };
            tracing::info!("cutover: subscription {line}");
            lines.push(line);
        }
    }
    lines
}

fn record_metrics(outcome: &CutoverOutcome) {
    metrics::gauge!("pgshift_cutover_freeze_seconds").set(outcome.freeze.as_secs_f64());
    metrics::gauge!("pgshift_cutover_catchup_seconds").set(outcome.catchup.as_secs_f64());
    metrics::counter!("pgshift_cutover_sessions_moved_total").increment(outcome.moved as u64);
    metrics::counter!("pgshift_cutover_sessions_unmovable_total")
        .increment((outcome.unmovable.len() + outcome.terminated) as u64);
}
