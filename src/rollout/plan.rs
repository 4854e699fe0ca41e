//! The step plan's decisions after an evaluation: which triggers act (after `for` consecutive
//! failing evaluations), whether the rollout advances, pauses, rolls back, stalls or resumes.
//!
//! Pure: given the routing state, the evaluation, the plan's memory and `now`, it returns the
//! actions; the controller applies them. A rollback always wins over a pause in the same tick.

use std::time::{Duration, Instant};

use super::verdict::{Evaluation, Reading, TriggerOutcome, Verdict};
use crate::config::{RolloutConfig, TriggerAction};
use crate::controller::state::RoutingState;
use crate::controller::store::RolloutState;

/// What the plan remembers between evaluations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanMemory {
    /// Consecutive failing evaluations, per trigger (config order).
    pub streaks: Vec<u32>,
    /// Consecutive evaluations without a verdict while the rollout runs.
    pub without_verdict: u32,
    /// The pause was a trigger's (auto_resume may lift it) rather than an operator's.
    pub paused_by_trigger: bool,
    /// Since when every pause trigger has been clear, while paused by a trigger.
    pub clear_since: Option<Instant>,
}

/// One thing the controller should do.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanAction {
    /// A `warn` trigger acted: log and count.
    Warn(String),
    Pause(String),
    Rollback(String),
    /// Go to the next step (or promote after the last one).
    Advance,
    Stall(String),
    /// Back to running (a stalled rollout saw data again, or auto_resume).
    Resume(String),
}

/// Is the current step's dwell over?
pub fn dwell_elapsed(state: &RoutingState, rollout: &RolloutConfig, now: Instant) -> bool {
    state
        .step_started
        .is_none_or(|started| now.saturating_duration_since(started) >= rollout.step_dwell)
}

/// When the current step may advance at the earliest.
pub fn next_step_at(state: &RoutingState, rollout: &RolloutConfig) -> Option<Instant> {
    match state.rollout {
        RolloutState::Running | RolloutState::Stalled => state
            .step_started
            .map(|started| started + rollout.step_dwell),
        _ => None,
    }
}

/// Decides after one evaluation. `lag_blocks` is why the lag guardrail holds the plan, if it
/// does. `full_window` says whether the window's data cover a whole window (after a restart
/// they do not, and nothing advances until they do).
pub fn decide(
    state: &RoutingState,
    memory: &mut PlanMemory,
    evaluation: &Evaluation,
    rollout: &RolloutConfig,
    now: Instant,
    full_window: bool,
    lag_blocks: Option<&str>,
) -> Vec<PlanAction> {
    memory.streaks.resize(evaluation.triggers.len(), 0);
    let mut acting: Vec<(&TriggerOutcome, u32)> = Vec::new();
    for (index, outcome) in evaluation.triggers.iter().enumerate() {
        let streak = &mut memory.streaks[index];
        if matches!(outcome.reading, Reading::Fail(_)) {
            *streak += 1;
        } else {
            *streak = 0;
        }
        let needed = rollout
            .triggers
            .get(index)
            .map_or(2, |trigger| trigger.consecutive);
        if *streak >= needed {
            acting.push((outcome, *streak));
        }
    }
    let mut actions = Vec::new();
    for (outcome, streak) in &acting {
        if outcome.action == TriggerAction::Warn {
            actions.push(PlanAction::Warn(format!(
                "{} ({} evaluations in a row)",
                outcome.describe(),
                streak
            )));
        }
    }
    let in_rollout = matches!(
        state.rollout,
        RolloutState::Running | RolloutState::Paused | RolloutState::Stalled
    );
    if !in_rollout {
        return actions;
    }
    let reason_of = |wanted: TriggerAction| {
        acting
            .iter()
            .filter(|(outcome, _)| outcome.action == wanted)
            .map(|(outcome, _)| outcome.describe())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let rollback = reason_of(TriggerAction::Rollback);
    if !rollback.is_empty() {
        actions.push(PlanAction::Rollback(rollback));
        return actions;
    }
    let pause = reason_of(TriggerAction::Pause);
    match state.rollout {
        RolloutState::Paused => {
            let pause_triggers_clear = evaluation
                .triggers
                .iter()
                .filter(|outcome| outcome.action == TriggerAction::Pause)
                .all(|outcome| matches!(outcome.reading, Reading::Pass(_)));
            if rollout.auto_resume && memory.paused_by_trigger && pause_triggers_clear {
                let since = *memory.clear_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= rollout.window {
                    actions.push(PlanAction::Resume(format!(
                        "auto_resume: the pause triggers stayed clear for {}",
                        humantime::format_duration(Duration::from_secs(rollout.window.as_secs()))
                    )));
                }
            } else {
                memory.clear_since = None;
            }
        }
        _ if !pause.is_empty() => actions.push(PlanAction::Pause(pause)),
        _ => match &evaluation.verdict {
            Verdict::NoVerdict(reason) => {
                memory.without_verdict += 1;
                if state.rollout == RolloutState::Running
                    && memory.without_verdict >= rollout.max_no_verdict
                {
                    actions.push(PlanAction::Stall(format!(
                        "{} evaluations without a verdict ({reason}); application pools may be keeping old sessions: set [routing] max_session_age so they reconnect and follow the weight",
                        memory.without_verdict
                    )));
                }
            }
            Verdict::Fail => memory.without_verdict = 0,
            Verdict::Pass => {
                memory.without_verdict = 0;
                if state.rollout == RolloutState::Stalled {
                    actions.push(PlanAction::Resume("verdicts are back".into()));
                }
                if let Some(reason) = lag_blocks {
                    tracing::info!("rollout holds: {reason}");
                } else if full_window && dwell_elapsed(state, rollout, now) {
                    actions.push(PlanAction::Advance);
                }
            }
        },
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TriggerMetric;

    fn rollout(extra: &str) -> RolloutConfig {
        let text = format!(
            "[blue]\nhost = \"127.0.0.1\"\nport = 5432\n[green]\nhost = \"127.0.0.1\"\nport = 5433\n[rollout]\nstep_dwell = \"10s\"\nwindow = \"4s\"\nmax_no_verdict = 3\n{extra}\n[[rollout.trigger]]\nmetric = \"error_rate\"\nabove = 0.05\naction = \"pause\"\n[[rollout.trigger]]\nmetric = \"error_rate\"\nabove = 0.10\naction = \"rollback\"\n"
        );
        crate::config::Config::from_toml_str(&text, std::path::Path::new("/tmp/x.toml"))
            .expect("config")
            .rollout
    }

    fn evaluation(rate: Option<f64>) -> Evaluation {
        let reading = |above: f64| match rate {
            None => Reading::NoVerdict("few requests".into()),
            Some(rate) if rate > above => Reading::Fail(rate),
            Some(rate) => Reading::Pass(rate),
        };
        let outcome = |above, action| TriggerOutcome {
            metric: TriggerMetric::ErrorRate,
            above,
            action,
            reading: reading(above),
        };
        let triggers = vec![
            outcome(0.05, TriggerAction::Pause),
            outcome(0.10, TriggerAction::Rollback),
        ];
        let verdict = match rate {
            None => Verdict::NoVerdict("few requests".into()),
            Some(rate) if rate > 0.05 => Verdict::Fail,
            Some(_) => Verdict::Pass,
        };
        Evaluation {
            green_requests: 0,
            green_errors: 0,
            blue_requests: 0,
            blue_errors: 0,
            green_connect_attempts: 0,
            green_connect_errors: 0,
            covered: Duration::from_secs(4),
            triggers,
            verdict,
        }
    }

    /// One test's plan: its config, the routing state and the memory `decide` keeps, from a
    /// start time that the decisions are made after.
    struct Plan {
        config: RolloutConfig,
        start: Instant,
        state: RoutingState,
        memory: PlanMemory,
    }

    impl Plan {
        /// A running rollout at step 0 (5 % green) whose step started now; `extra` is more
        /// `[rollout]` keys.
        fn running(extra: &str) -> Plan {
            let start = Instant::now();
            Plan {
                config: rollout(extra),
                start,
                state: RoutingState {
                    green_weight_bp: 500,
                    rollout: RolloutState::Running,
                    step: Some(0),
                    step_started: Some(start),
                    reason: None,
                    admin_pins: Vec::new(),
                    draining: [false, false],
                },
                memory: PlanMemory::default(),
            }
        }

        /// Decides on an evaluation with error rate `rate` (`None`: no verdict) at the start,
        /// with a full window and no lag.
        fn decide(&mut self, rate: Option<f64>) -> Vec<PlanAction> {
            self.decide_at(rate, Duration::ZERO, true, None)
        }

        /// Decides `after` the start, with or without a `full_window`, and `lag_blocks`.
        fn decide_at(
            &mut self,
            rate: Option<f64>,
            after: Duration,
            full_window: bool,
            lag_blocks: Option<&str>,
        ) -> Vec<PlanAction> {
            decide(
                &self.state,
                &mut self.memory,
                &evaluation(rate),
                &self.config,
                self.start + after,
                full_window,
                lag_blocks,
            )
        }
    }

    #[test]
    fn one_bad_evaluation_does_not_act_two_do() {
        let mut plan = Plan::running("");
        assert!(plan.decide(Some(0.2)).is_empty());
        let actions = plan.decide(Some(0.2));
        assert!(
            matches!(actions.as_slice(), [PlanAction::Rollback(reason)] if reason.contains("error_rate 0.2 above 0.1")),
            "{actions:?}"
        );
        // A good evaluation in between resets the streak.
        plan.memory = PlanMemory::default();
        plan.decide(Some(0.07));
        plan.decide(Some(0.01));
        assert!(plan.decide(Some(0.07)).is_empty());
        let actions = plan.decide(Some(0.07));
        assert!(
            matches!(actions.as_slice(), [PlanAction::Pause(_)]),
            "{actions:?}"
        );
    }

    #[test]
    fn rollback_wins_over_pause() {
        let mut plan = Plan::running("");
        plan.decide(Some(0.5));
        let actions = plan.decide(Some(0.5));
        assert!(
            matches!(actions.as_slice(), [PlanAction::Rollback(_)]),
            "{actions:?}"
        );
    }

    #[test]
    fn advances_only_after_dwell_full_window_and_lag() {
        let mut plan = Plan::running("");
        let pass = Some(0.0);
        assert!(
            plan.decide_at(pass, Duration::from_secs(5), true, None)
                .is_empty()
        );
        let later = Duration::from_secs(11);
        assert!(
            plan.decide_at(pass, later, false, None).is_empty(),
            "partial window"
        );
        assert!(
            plan.decide_at(pass, later, true, Some("lag 5 MB above max_lag"))
                .is_empty()
        );
        assert_eq!(
            plan.decide_at(pass, later, true, None),
            vec![PlanAction::Advance]
        );
    }

    #[test]
    fn no_verdicts_stall_and_data_resumes() {
        let mut plan = Plan::running("");
        assert!(plan.decide(None).is_empty());
        assert!(plan.decide(None).is_empty());
        let actions = plan.decide(None);
        assert!(
            matches!(actions.as_slice(), [PlanAction::Stall(reason)] if reason.contains("max_session_age")),
            "{actions:?}"
        );
        plan.state.rollout = RolloutState::Stalled;
        let actions = plan.decide_at(Some(0.0), Duration::ZERO, false, None);
        assert!(
            matches!(actions.as_slice(), [PlanAction::Resume(_)]),
            "{actions:?}"
        );
    }

    #[test]
    fn auto_resume_after_a_clear_window() {
        let mut plan = Plan::running("auto_resume = true");
        plan.state.rollout = RolloutState::Paused;
        plan.memory.paused_by_trigger = true;
        let clear = Some(0.01);
        assert!(plan.decide(clear).is_empty());
        let actions = plan.decide_at(clear, Duration::from_secs(4), true, None);
        assert!(
            matches!(actions.as_slice(), [PlanAction::Resume(_)]),
            "{actions:?}"
        );
        // An operator's pause is never lifted automatically.
        plan.memory = PlanMemory::default();
        plan.decide(clear);
        assert!(
            plan.decide_at(clear, Duration::from_secs(9), true, None)
                .is_empty()
        );
    }

    #[test]
    fn manual_state_only_warns() {
        let mut plan = Plan::running("");
        plan.state.rollout = RolloutState::Manual;
        plan.decide(Some(0.5));
        assert!(plan.decide(Some(0.5)).is_empty());
    }
}
