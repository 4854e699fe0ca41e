//! The controller: the one writer of pgshift's routing state.
//!
//! Admin commands, SIGHUP and (later) the rollout monitor send it [`Command`]s through a
//! [`ControllerHandle`]; it applies each in turn, publishes the new routing table, persists
//! the state through its [`store`], records the decision, and answers. Sessions only ever read
//! the table it publishes.

pub mod command;

pub use command::{Actor, Command, PinKey, Reply};

use tokio::sync::{mpsc, oneshot};

/// One command waiting for the controller, with the channel its answer goes back on.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub actor: Actor,
    pub reply: oneshot::Sender<Reply>,
}

/// A cheap, cloneable way to send commands to the controller and await the answer.
#[derive(Clone)]
pub struct ControllerHandle {
    requests: mpsc::Sender<Request>,
    /// The proxy's state, to answer while the controller runs a transparent cutover.
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for ControllerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControllerHandle { .. }")
    }
}

impl ControllerHandle {
    /// A handle over a request channel (the controller, or a stand-in in tests).
    pub fn from_channel(requests: mpsc::Sender<Request>) -> ControllerHandle {
        ControllerHandle {
            requests,
            shared: None,
        }
    }

    /// Sends `command` and waits for the controller's answer. While the controller runs a
    /// transparent cutover, `cutover abort` is answered here at once (the cutover stops at its
    /// next check), `status` and `promote --check` wait for it, and any other command is
    /// refused.
    pub async fn execute(&self, command: Command, actor: Actor) -> Reply {
        if let Some(shared) = &self.shared
            && let Some(running) = shared.cutover.running_now()
        {
            match &command {
                Command::CutoverAbort => {
                    let running = shared
                        .cutover
                        .request_abort(&actor.to_string())
                        .unwrap_or(running);
                    tracing::warn!(%actor, step = running.step, "cutover abort requested");
                    let mut reply = Map::new();
                    reply.insert(
                        "aborting".into(),
                        json!(format!(
                            "the cutover to {} stops at its next check (step {} now) and every session resumes where it was; the promote or rollback reply says so",
                            running.to, running.step
                        )),
                    );
                    return Ok(reply);
                }
                Command::Status
                | Command::Promote {
                    check_only: true, ..
                } => {}
                other => {
                    return Err(format!(
                        "a transparent cutover to {} is in progress (step {}, for {:.1}s): `{}` is refused until it ends; `cutover abort` stops it",
                        running.to,
                        running.step,
                        running.started.elapsed().as_secs_f64(),
                        other.verb()
                    ));
                }
            }
        }
        let (reply, answer) = oneshot::channel();
        let request = Request {
            command,
            actor,
            reply,
        };
        if self.requests.send(request).await.is_err() {
            return Err("pgshift is shutting down: the controller no longer takes commands".into());
        }
        answer
            .await
            .unwrap_or_else(|_| Err("the controller stopped before answering".into()))
    }
}

pub mod state;
pub mod status;
pub mod store;
pub mod window;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value, json};

use crate::color::Color;
use crate::config::{Config, CutoverMode};
use crate::cutover::guardrails::GuardReport;
use crate::proxy::Shared;
use crate::proxy::cutover::CutoverRun;
use crate::proxy::registry::{CloseOrder, CloseReason};
use crate::rollout::lag::{self, LagReading};
use crate::rollout::plan::{self, PlanAction, PlanMemory};
use crate::rollout::verdict::{self, Evaluation, Verdict};
use state::{RoutingState, Transition};
use status::Decision;
use store::{RolloutState, StateStore, StoreError};
use window::StatsWindow;

/// Decisions kept in memory for `status`.
const DECISIONS_KEPT: usize = 200;
/// How often drains advance (rate limit, deadlines).
const TICK: Duration = Duration::from_millis(100);

/// Where the controller's first state came from, for the start-up log and `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSource {
    /// The state store held a state; it wins over the config's `green_weight`.
    Store(String),
    /// Nothing saved (or `--reset-state`): the config's values.
    Config,
}

/// Reads the state to start from: the store's when it holds one, else the config's.
pub fn initial_state(
    config: &Config,
    store: &mut dyn StateStore,
    reset: bool,
) -> Result<(RoutingState, StateSource), StoreError> {
    if reset {
        store.reset()?;
        return Ok((RoutingState::from_config(config), StateSource::Config));
    }
    match store.load()? {
        Some(saved) => Ok((
            RoutingState::from_persisted(&saved, Instant::now(), SystemTime::now()),
            StateSource::Store(store.describe()),
        )),
        None => Ok((RoutingState::from_config(config), StateSource::Config)),
    }
}

/// Closing a draining color's sessions: from `begins` (after any grace) at most `rate` per
/// second, all of them by `deadline`.
#[derive(Debug, Clone)]
struct DrainJob {
    begins: Instant,
    deadline: Instant,
    ordered: u64,
}

/// The controller task's state.
pub struct Controller {
    shared: Arc<Shared>,
    store: Box<dyn StateStore>,
    state: RoutingState,
    decisions: VecDeque<Decision>,
    decisions_taken: u64,
    window: StatsWindow,
    last_sample: Option<Instant>,
    drains: [Option<DrainJob>; 2],
    config_path: PathBuf,
    plan_memory: PlanMemory,
    last_evaluation: Option<(SystemTime, Evaluation)>,
    /// The last transparent cutover: its outcome and each step's duration (`status.cutover`).
    last_cutover: Option<Value>,
    evaluated_at: Option<Instant>,
    lag: tokio::sync::watch::Receiver<LagReading>,
}

impl Controller {
    /// Starts the controller task over `shared`, from `state`; returns its handle.
    pub fn spawn(
        shared: Arc<Shared>,
        store: Box<dyn StateStore>,
        state: RoutingState,
        config_path: PathBuf,
    ) -> (ControllerHandle, tokio::task::JoinHandle<()>) {
        let config = shared.config.load_full();
        let now = Instant::now();
        let mut drains = [None, None];
        for color in Color::ALL {
            if state.draining[color.index()] {
                drains[color.index()] = Some(DrainJob {
                    begins: now,
                    deadline: now + config.rollout.drain_timeout,
                    ordered: 0,
                });
            }
        }
        let shared_for_lag = shared.clone();
        let shared_for_handle = shared.clone();
        let controller = Controller {
            shared,
            store,
            state,
            decisions: VecDeque::new(),
            decisions_taken: 0,
            window: StatsWindow::new(config.rollout.window),
            last_sample: None,
            drains,
            config_path,
            plan_memory: PlanMemory::default(),
            last_evaluation: None,
            last_cutover: None,
            evaluated_at: None,
            lag: lag::spawn(shared_for_lag),
        };
        controller.publish();
        let (sender, receiver) = mpsc::channel(64);
        let task = tokio::spawn(controller.run(receiver));
        let handle = ControllerHandle {
            requests: sender,
            shared: Some(shared_for_handle),
        };
        (handle, task)
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return };
                    let reply = self.gate_and_handle(request.command, &request.actor).await;
                    let _ = request.reply.send(reply);
                }
                _ = ticks.tick() => self.tick(Instant::now()),
            }
        }
    }

    /// The async gates, then the command. The verifier gate re-fetches every login role on
    /// both colors, and a transparent cutover's guardrails read both colors' catalogs; they
    /// run here, before the command, so the controller stays the one writer.
    async fn gate_and_handle(&mut self, command: Command, actor: &Actor) -> Reply {
        let transparent = self.shared.config.load().cutover.mode == CutoverMode::Transparent;
        match command {
            Command::RolloutStart => {
                crate::auth::verifiers_gate(&self.shared, "rollout start").await?;
                self.handle(command, actor)
            }
            Command::Promote { check_only, force } => {
                let verb = if check_only {
                    "promote --check"
                } else {
                    "promote"
                };
                crate::auth::verifiers_gate(&self.shared, verb).await?;
                // A real transparent promote is a running cutover from its guardrails on: the
                // admin socket answers `cutover abort` and refuses other changes meanwhile.
                let shared = self.shared.clone();
                let run = if transparent && !check_only {
                    Some(
                        shared
                            .cutover
                            .begin(Color::Green)
                            .ok_or("a cutover is running already")?,
                    )
                } else {
                    None
                };
                let guardrails = if transparent {
                    Some(
                        crate::cutover::cutover_guardrails(&self.shared, Color::Green, force).await,
                    )
                } else {
                    None
                };
                if check_only {
                    return self.promote_check(guardrails.as_ref());
                }
                if let Some(report) = &guardrails
                    && report.refused()
                {
                    let reason = report.refusals.join("\n  ");
                    if let Some(run) = &run {
                        self.record_cutover(Color::Green, run, Err(("refused", &reason)));
                    }
                    return Err(format!(
                        "promote refused by the cutover guardrails (nothing changed):\n  {reason}"
                    ));
                }
                let (Some(report), Some(run)) = (guardrails, run) else {
                    return self.handle(command, actor);
                };
                self.transparent_switch(command, actor, Color::Green, report, &run)
                    .await
            }
            Command::Rollback { .. }
                if transparent && self.state.rollout == RolloutState::Promoted =>
            {
                self.transparent_rollback(command, actor).await
            }
            command => self.handle(command, actor),
        }
    }

    /// Rollback after a transparent promotion: green's sessions move back to blue when
    /// replication green → blue is set up (blue has a subscription); without one, the rollback
    /// drains green as in drain mode, and the reply says that green's writes since the
    /// promotion are not on blue.
    async fn transparent_rollback(&mut self, command: Command, actor: &Actor) -> Reply {
        let reverse_exists = async {
            let connections = crate::cutover::catalog::Connections::of_proxy(&self.shared)?;
            crate::cutover::catalog::has_subscriptions(&connections, Color::Blue).await
        };
        if !reverse_exists
            .await
            .map_err(|error| format!("rollback refused: {error}"))?
        {
            let mut reply = self.handle(command, actor)?;
            reply.insert(
                "warning".into(),
                json!("blue has no subscription from green: green's sessions are drained, not moved, and writes made on green since the promotion are not on blue"),
            );
            return Ok(reply);
        }
        let shared = self.shared.clone();
        let run = shared
            .cutover
            .begin(Color::Blue)
            .ok_or("a cutover is running already")?;
        let report = crate::cutover::cutover_guardrails(&self.shared, Color::Blue, false).await;
        if report.refused() {
            let reason = report.refusals.join("\n  ");
            self.record_cutover(Color::Blue, &run, Err(("refused", &reason)));
            return Err(format!(
                "rollback refused by the cutover guardrails (nothing changed):\n  {reason}"
            ));
        }
        self.transparent_switch(command, actor, Color::Blue, report, &run)
            .await
    }

    /// Freezes and catches up, switches the routing with `command` (promote or rollback),
    /// then moves the frozen sessions to `to`.
    async fn transparent_switch(
        &mut self,
        command: Command,
        actor: &Actor,
        to: Color,
        report: GuardReport,
        run: &CutoverRun<'_>,
    ) -> Reply {
        let verb = command.verb();
        let shared = self.shared.clone();
        let frozen = match crate::cutover::procedure::freeze_and_catch_up(&shared, to, run).await {
            Ok(frozen) => frozen,
            Err(failure) => {
                tracing::warn!("{verb}: {failure}");
                self.record_cutover(to, run, Err(("aborted", &failure.to_string())));
                return Err(format!("{verb} refused: {failure}"));
            }
        };
        // On a refused commit `frozen` is dropped: every session resumes where it was.
        let mut reply = match self.handle(command, actor) {
            Ok(reply) => reply,
            Err(error) => {
                self.record_cutover(to, run, Err(("aborted", &error)));
                return Err(error);
            }
        };
        run.step("move");
        let outcome = frozen.commit().await;
        tracing::info!(
            moved = outcome.moved,
            unmovable = outcome.unmovable.len(),
            terminated = outcome.terminated,
            freeze_ms = outcome.freeze.as_millis() as u64,
            catchup_ms = outcome.catchup.as_millis() as u64,
            stall_ms = outcome.stall.as_millis() as u64,
            "{verb}: transparent cutover to {to} done"
        );
        reply.insert("guardrails".into(), json!(report.passed));
        if !report.overridden.is_empty() {
            reply.insert("overridden".into(), json!(report.overridden));
        }
        let details = json!({
                "to": to.as_str(),
                "freeze_ms": millis(outcome.freeze),
                "catchup_ms": millis(outcome.catchup),
                "stall_ms": millis(outcome.stall),
                "sessions_moved": outcome.moved,
                "sessions_unmovable": outcome.unmovable,
                "sessions_terminated": outcome.terminated,
                "subscriptions": outcome.subscriptions,
                "sequences": outcome.sequences,
                "reverse_slot": outcome.reverse.as_ref().map(|reverse| json!({
                    "slot": reverse.slot,
                    "database": reverse.database,
                    "lsn": reverse.lsn,
                    "on_blue": reverse.subscription_sql,
                })),
        });
        self.record_cutover(to, run, Ok(&details));
        reply.insert("cutover".into(), details);
        Ok(reply)
    }

    /// Keeps the cutover's outcome and step timings for `status.cutover`; `Err((outcome,
    /// reason))` for one refused or aborted.
    fn record_cutover(
        &mut self,
        to: Color,
        run: &CutoverRun<'_>,
        result: Result<&Value, (&str, &str)>,
    ) {
        let steps: Vec<Value> = run
            .timings()
            .into_iter()
            .map(|(step, took)| json!({"step": step, "ms": millis(took)}))
            .collect();
        let mut record = json!({
            "to": to.as_str(),
            "at": rfc3339(SystemTime::now()),
            "steps": steps,
        });
        match result {
            Ok(details) => {
                record["outcome"] = json!("completed");
                record["details"] = details.clone();
            }
            Err((outcome, reason)) => {
                record["outcome"] = json!(outcome);
                record["step"] = json!(run.current_step());
                record["reason"] = json!(reason);
            }
        }
        self.last_cutover = Some(record);
        let outcome = match result {
            Ok(_) => "completed",
            Err((outcome, _)) => outcome,
        };
        metrics::counter!("pgshift_cutovers_total", "outcome" => outcome.to_string()).increment(1);
    }

    fn handle(&mut self, command: Command, actor: &Actor) -> Reply {
        match command {
            Command::Status => {
                self.sample(Instant::now());
                Ok(self.status())
            }
            Command::Reload => self.reload(actor),
            Command::RolloutNext => self.rollout_next(actor),
            Command::RolloutEvaluate => {
                let (evaluation, actions) = self.evaluate_and_act(Instant::now());
                let mut reply = Map::new();
                reply.insert("evaluation".into(), json!(evaluation.summary()));
                reply.insert("verdict".into(), json!(verdict_name(&evaluation.verdict)));
                reply.insert("actions".into(), json!(actions));
                reply.insert("state".into(), json!(self.state.rollout.as_str()));
                reply.insert(
                    "green_weight".into(),
                    json!(f64::from(self.state.green_weight_bp) / 100.0),
                );
                Ok(reply)
            }
            command => {
                let now = Instant::now();
                if let Command::Promote { .. } = command
                    && let Some(reason) = self.lag_blocks(now)
                {
                    return Err(format!("promote refused: {reason}"));
                }
                let config = self.shared.config.load_full();
                let transition = state::apply(&self.state, &command, &config, now)?;
                let reply = self.commit(command.verb(), transition, actor)?;
                // An operator's change starts the plan's memory afresh.
                self.plan_memory = PlanMemory::default();
                Ok(reply)
            }
        }
    }

    /// Why the lag guardrail holds the rollout and promote now, if it does.
    fn lag_blocks(&self, now: Instant) -> Option<String> {
        let config = self.shared.config.load_full();
        let stale_after = lag::poll_interval(&config) * 3 + Duration::from_secs(5);
        self.lag
            .borrow()
            .blocks(config.rollout.max_lag, now, stale_after)
    }

    /// Reads the windows and evaluates every trigger.
    fn evaluate(&mut self, now: Instant) -> (Evaluation, bool) {
        self.sample(now);
        let config = self.shared.config.load_full();
        let (green, covered) = self.window.figures(Color::Green);
        let (blue, _) = self.window.figures(Color::Blue);
        let evaluation = verdict::evaluate(&green, &blue, covered, &config.rollout);
        (evaluation, covered >= config.rollout.window)
    }

    /// One evaluation and whatever the plan decides after it; returns the evaluation and the
    /// actions taken (as text).
    fn evaluate_and_act(&mut self, now: Instant) -> (Evaluation, Vec<String>) {
        self.evaluated_at = Some(now);
        let (evaluation, full_window) = self.evaluate(now);
        let config = self.shared.config.load_full();
        let lag_blocks = self.lag_blocks(now);
        let actions = plan::decide(
            &self.state,
            &mut self.plan_memory,
            &evaluation,
            &config.rollout,
            now,
            full_window,
            lag_blocks.as_deref(),
        );
        let in_rollout = matches!(
            self.state.rollout,
            RolloutState::Running | RolloutState::Paused | RolloutState::Stalled
        );
        if in_rollout {
            tracing::info!(
                state = self.state.rollout.as_str(),
                "evaluation: {}",
                evaluation.summary()
            );
        } else {
            tracing::debug!(
                state = self.state.rollout.as_str(),
                "evaluation: {}",
                evaluation.summary()
            );
        }
        let mut taken = Vec::new();
        for action in actions {
            if let Some(text) = self.apply_plan_action(action, &config, now) {
                taken.push(text);
            }
        }
        self.last_evaluation = Some((SystemTime::now(), evaluation.clone()));
        (evaluation, taken)
    }

    /// Applies one of the plan's actions as the monitor; returns what was done.
    fn apply_plan_action(
        &mut self,
        action: PlanAction,
        config: &Config,
        now: Instant,
    ) -> Option<String> {
        let monitor = Actor::Monitor;
        let (name, transition) = match action {
            PlanAction::Warn(reason) => {
                self.record("warn", reason.clone(), &monitor);
                return Some(format!("warn: {reason}"));
            }
            PlanAction::Pause(reason) => {
                self.plan_memory.paused_by_trigger = true;
                self.plan_memory.clear_since = None;
                (
                    "pause",
                    Ok(state::set_rollout_state(
                        &self.state,
                        RolloutState::Paused,
                        Some(reason),
                    )),
                )
            }
            PlanAction::Rollback(reason) => (
                "rollback",
                state::apply(
                    &self.state,
                    &Command::Rollback {
                        reason: Some(reason),
                    },
                    config,
                    now,
                ),
            ),
            PlanAction::Advance => ("advance", state::advance(&self.state, config, now)),
            PlanAction::Stall(reason) => (
                "stall",
                Ok(state::set_rollout_state(
                    &self.state,
                    RolloutState::Stalled,
                    Some(reason),
                )),
            ),
            PlanAction::Resume(reason) => {
                let mut transition =
                    state::set_rollout_state(&self.state, RolloutState::Running, None);
                transition.description = format!("{}: {reason}", transition.description);
                ("resume", Ok(transition))
            }
        };
        let outcome = transition.and_then(|transition| self.commit(name, transition, &monitor));
        match outcome {
            Ok(reply) => {
                if matches!(name, "advance" | "rollback" | "resume") {
                    let paused_by_trigger = false;
                    self.plan_memory = PlanMemory {
                        paused_by_trigger,
                        ..PlanMemory::default()
                    };
                }
                reply
                    .get("change")
                    .and_then(Value::as_str)
                    .map(|change| format!("{name}: {change}"))
            }
            Err(error) => {
                tracing::error!(action = name, "the monitor could not {name}: {error}");
                Some(format!("{name} failed: {error}"))
            }
        }
    }

    /// `rollout next`: advance one step now, ignoring the dwell but not the verdict.
    fn rollout_next(&mut self, actor: &Actor) -> Reply {
        if !matches!(
            self.state.rollout,
            RolloutState::Running | RolloutState::Paused | RolloutState::Stalled
        ) {
            return Err(format!(
                "no rollout to advance (state {}); `rollout start` first",
                self.state.rollout.as_str()
            ));
        }
        let now = Instant::now();
        if let Some(reason) = self.lag_blocks(now) {
            return Err(format!("rollout next refused: {reason}"));
        }
        let (evaluation, _) = self.evaluate(now);
        match &evaluation.verdict {
            Verdict::Pass => {}
            Verdict::Fail => {
                return Err(format!(
                    "rollout next refused: green fails its triggers ({})",
                    evaluation.summary()
                ));
            }
            Verdict::NoVerdict(reason) => {
                return Err(format!("rollout next refused: no verdict yet ({reason})"));
            }
        }
        let config = self.shared.config.load_full();
        let transition = state::advance(&self.state, &config, now)?;
        let reply = self.commit("rollout next", transition, actor)?;
        self.plan_memory = PlanMemory::default();
        Ok(reply)
    }

    /// Persists, then publishes, then records a transition. When the store refuses, nothing
    /// changes (memory and disk never disagree).
    fn commit(&mut self, action: &str, transition: Transition, actor: &Actor) -> Reply {
        let Transition {
            next,
            description,
            drain_after_grace,
        } = transition;
        let now = Instant::now();
        if next != self.state {
            let saved = next.persisted(now, SystemTime::now());
            let store = &mut self.store;
            // A save writes and fsyncs: keep it off the runtime's cooperative path so sessions
            // on this worker are not held up by a slow disk.
            let result =
                match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
                    Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                        tokio::task::block_in_place(|| store.save(&saved))
                    }
                    _ => store.save(&saved),
                };
            result.map_err(|error| format!("{error}; nothing was changed"))?;
        }
        let before = std::mem::replace(&mut self.state, next);
        let config = self.shared.config.load_full();
        for color in Color::ALL {
            match (
                before.draining[color.index()],
                self.state.draining[color.index()],
            ) {
                (false, true) => {
                    let grace = if drain_after_grace == Some(color) {
                        config.rollout.drain_grace
                    } else {
                        Duration::ZERO
                    };
                    self.drains[color.index()] = Some(DrainJob {
                        begins: now + grace,
                        deadline: now + grace + config.rollout.drain_timeout,
                        ordered: 0,
                    });
                }
                (true, false) => {
                    self.drains[color.index()] = None;
                    self.shared
                        .sessions
                        .rescind(color, CloseReason::Drain(color));
                }
                _ => {}
            }
        }
        self.publish();
        let decision = self.record(action, description.clone(), actor);
        let mut reply = Map::new();
        reply.insert("change".into(), json!(description));
        reply.insert("decision".into(), json!(decision));
        reply.insert(
            "green_weight".into(),
            json!(f64::from(self.state.green_weight_bp) / 100.0),
        );
        reply.insert("state".into(), json!(self.state.rollout.as_str()));
        Ok(reply)
    }

    /// `promote --check`: every guardrail promote applies, nothing changed.
    fn promote_check(&self, guardrails: Option<&GuardReport>) -> Reply {
        let mut checks = Vec::new();
        if self.shared.config.load().auth.mode == crate::config::AuthMode::Scram {
            checks.push("green's login secrets match blue's".to_string());
        }
        let mut failures = Vec::new();
        if self.state.draining[Color::Green.index()] {
            failures.push("green is draining".to_string());
        } else {
            checks.push("green is not draining".to_string());
        }
        match self.lag_blocks(Instant::now()) {
            Some(reason) => failures.push(reason),
            None if self.shared.config.load().rollout.max_lag.is_some() => {
                checks.push("replication lag is below max_lag".to_string());
            }
            None => {}
        }
        let mut overridden = Vec::new();
        if let Some(report) = guardrails {
            checks.extend(report.passed.iter().cloned());
            failures.extend(report.refusals.iter().cloned());
            overridden.extend(report.overridden.iter().cloned());
        }
        if !failures.is_empty() {
            return Err(format!(
                "promote would be refused:\n  {}",
                failures.join("\n  ")
            ));
        }
        let mut reply = Map::new();
        reply.insert("check".into(), json!("passed"));
        reply.insert("checks".into(), json!(checks));
        if !overridden.is_empty() {
            reply.insert("overridden".into(), json!(overridden));
        }
        Ok(reply)
    }

    fn reload(&mut self, actor: &Actor) -> Reply {
        let new = Config::load(&self.config_path).map_err(|errors| {
            format!("the config was not reloaded and nothing changed:\n{errors}")
        })?;
        crate::auth::check(&new).map_err(|errors| {
            format!("the config was not reloaded and nothing changed:\n{errors}")
        })?;
        self.shared.tls.reload(&new).map_err(|errors| {
            format!("the config was not reloaded and nothing changed:\n{errors}")
        })?;
        if let Err(error) = self.shared.auth.reload(&new) {
            tracing::warn!("[auth] not reloaded: {error}");
        }
        let old = self.shared.config.load_full();
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let mut needs_restart = Vec::new();
        if old.listen.addr != new.listen.addr {
            needs_restart.push("listen.addr");
        }
        if differs(&old.admin, &new.admin) {
            needs_restart.push("admin");
        }
        if differs(&old.metrics, &new.metrics) {
            needs_restart.push("metrics");
        }
        if old.rollout.state_file != new.rollout.state_file {
            needs_restart.push("rollout.state_file");
        }
        let mut applied = Vec::new();
        let uses_tls = new.listen.tls_cert.is_some()
            || [&new.blue, &new.green]
                .iter()
                .any(|backend| backend.tls != crate::config::BackendTlsMode::Disable);
        if uses_tls {
            // Certificate files are re-read on every reload, changed or not.
            applied.push("tls certificates re-read");
        }
        for (name, changed) in [
            ("listen", differs(&old.listen, &new.listen)),
            ("blue", differs(&old.blue, &new.blue)),
            ("green", differs(&old.green, &new.green)),
            ("routing", differs(&old.routing, &new.routing)),
            ("rollout", differs(&old.rollout, &new.rollout)),
            ("auth", differs(&old.auth, &new.auth)),
            ("cutover", differs(&old.cutover, &new.cutover)),
        ] {
            if changed {
                applied.push(name);
            }
        }
        self.window.set_window(new.rollout.window);
        self.shared.config.store(Arc::new(new));
        self.publish();
        let description = format!(
            "config reloaded from {}: changed {}{}",
            self.config_path.display(),
            if applied.is_empty() {
                "nothing".to_string()
            } else {
                applied.join(", ")
            },
            if needs_restart.is_empty() {
                String::new()
            } else {
                format!(
                    "; needs a restart to take effect: {}",
                    needs_restart.join(", ")
                )
            }
        );
        let decision = self.record("reload", description.clone(), actor);
        let mut reply = Map::new();
        reply.insert("change".into(), json!(description));
        reply.insert("decision".into(), json!(decision));
        reply.insert("applied".into(), json!(applied));
        reply.insert("needs_restart".into(), json!(needs_restart));
        Ok(reply)
    }

    /// Publishes the routing table and the gauges that mirror the state.
    fn publish(&self) {
        let config = self.shared.config.load_full();
        self.shared
            .router
            .publish(self.state.routing_table(&config));
        metrics::gauge!("pgshift_green_weight_ratio")
            .set(f64::from(self.state.green_weight_bp) / 10_000.0);
        for rollout in RolloutState::ALL {
            let value = if rollout == self.state.rollout {
                1.0
            } else {
                0.0
            };
            metrics::gauge!("pgshift_rollout_state", "state" => rollout.as_str()).set(value);
        }
    }

    fn record(&mut self, action: &str, reason: String, actor: &Actor) -> u64 {
        tracing::info!(action, actor = %actor, "{reason}");
        metrics::counter!("pgshift_rollout_decisions_total", "action" => action.to_string())
            .increment(1);
        self.decisions_taken += 1;
        let decision = Decision {
            id: self.decisions_taken,
            time: rfc3339(SystemTime::now()),
            action: action.to_string(),
            reason,
            actor: actor.to_string(),
        };
        if let Some(path) = &self.shared.config.load().rollout.decision_log {
            append_decision(path, &decision);
        }
        self.decisions.push_back(decision);
        while self.decisions.len() > DECISIONS_KEPT {
            self.decisions.pop_front();
        }
        self.decisions_taken
    }

    fn status(&self) -> Map<String, Value> {
        let config = self.shared.config.load_full();
        let mut reply = status::status(
            &self.state,
            &config,
            &self.window,
            &self.shared.sessions,
            &self.decisions,
            &self.store.describe(),
        );
        let now = Instant::now();
        let next_step_at = plan::next_step_at(&self.state, &config.rollout)
            .map(|at| rfc3339(SystemTime::now() + at.saturating_duration_since(now)));
        reply.insert("next_step_at".into(), json!(next_step_at));
        reply.insert("replication_lag".into(), json!(self.lag.borrow().value()));
        reply.insert(
            "auth_mismatch".into(),
            json!(crate::auth::auth_mismatches(&self.shared)),
        );
        reply.insert("lag_blocks".into(), json!(self.lag_blocks(now)));
        reply.insert("cutover".into(), json!(self.last_cutover));
        if let Some((at, evaluation)) = &self.last_evaluation {
            reply.insert(
                "last_evaluation".into(),
                json!({
                    "time": rfc3339(*at),
                    "verdict": verdict_name(&evaluation.verdict),
                    "summary": evaluation.summary(),
                }),
            );
        }
        reply
    }

    fn sample(&mut self, now: Instant) {
        self.window.sample(&self.shared.stats, now);
        self.last_sample = Some(now);
    }

    fn tick(&mut self, now: Instant) {
        let evaluate_every = self.shared.config.load().rollout.evaluate_every;
        if self
            .evaluated_at
            .is_none_or(|last| now.duration_since(last) >= evaluate_every)
        {
            self.evaluate_and_act(now);
        }
        if self
            .last_sample
            .is_none_or(|last| now.duration_since(last) >= self.window.sampling_interval())
        {
            self.sample(now);
        }
        let rate = u64::from(self.shared.config.load().rollout.drain_rate);
        for color in Color::ALL {
            let sessions = &self.shared.sessions;
            let Some(job) = &mut self.drains[color.index()] else {
                metrics::gauge!("pgshift_draining_sessions", "color" => color.as_str()).set(0.0);
                continue;
            };
            if now >= job.deadline {
                sessions.order(Some(color), CloseOrder::Now(CloseReason::Drain(color)));
            } else if now >= job.begins {
                let order = CloseOrder::AtIdle(CloseReason::Drain(color));
                if rate == 0 {
                    sessions.order(Some(color), order);
                } else {
                    let allowed =
                        (now.duration_since(job.begins).as_secs_f64() * rate as f64) as u64 + 1;
                    let budget = allowed.saturating_sub(job.ordered) as usize;
                    job.ordered += sessions.order_some(color, budget, order) as u64;
                }
            }
            metrics::gauge!("pgshift_draining_sessions", "color" => color.as_str())
                .set(sessions.count(Some(color)) as f64);
        }
    }
}

/// The name of a verdict in replies.
fn verdict_name(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::NoVerdict(_) => "none",
    }
}

/// Appends one decision as a JSON line to the decision log; a failure is logged, not fatal.
fn append_decision(path: &std::path::Path, decision: &Decision) {
    use std::io::Write;
    let line = match serde_json::to_string(decision) {
        Ok(line) => line + "\n",
        Err(error) => {
            tracing::warn!(%error, "cannot encode a decision for the decision log");
            return;
        }
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "cannot append to the decision log ([rollout] decision_log)");
    }
}

/// RFC 3339 with seconds, UTC.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A duration in milliseconds with a tenth's precision, for replies.
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}
