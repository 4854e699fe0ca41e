//! The controller's routing state and how each command changes it, as pure functions: no
//! I/O, no clock reads beyond the `now` passed in, so every transition is unit-tested.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::command::{Command, PinKey};
use super::store::{PersistedState, RolloutState, STATE_VERSION};
use crate::color::Color;
use crate::config::{Config, format_percent};
use crate::routing::{Pin, RoutingTable};

/// Everything the controller owns that shapes routing.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingState {
    pub green_weight_bp: u16,
    pub rollout: RolloutState,
    pub step: Option<usize>,
    /// When the current step began (dwell clock).
    pub step_started: Option<Instant>,
    /// Why the rollout is paused, stalled or rolled back.
    pub reason: Option<String>,
    /// Pins added over the admin socket (config pins live in the config).
    pub admin_pins: Vec<Pin>,
    /// Indexed by [`Color::index`].
    pub draining: [bool; 2],
}

impl RoutingState {
    /// The state a config alone describes: its weight, manual, no admin pins, no drains.
    pub fn from_config(config: &Config) -> RoutingState {
        RoutingState {
            green_weight_bp: config.routing.green_weight_bp,
            rollout: RolloutState::Manual,
            step: None,
            step_started: None,
            reason: None,
            admin_pins: Vec::new(),
            draining: [false, false],
        }
    }

    /// The state a state file holds; the step's wall-clock start becomes an `Instant` by way of
    /// `now` and `wall_now` (the same moment on both clocks).
    pub fn from_persisted(
        saved: &PersistedState,
        now: Instant,
        wall_now: SystemTime,
    ) -> RoutingState {
        let mut draining = [false, false];
        for color in &saved.draining {
            draining[color.index()] = true;
        }
        let step_started = saved.step_started_unix_ms.map(|started_ms| {
            let started = UNIX_EPOCH + Duration::from_millis(started_ms);
            let elapsed = wall_now.duration_since(started).unwrap_or(Duration::ZERO);
            now.checked_sub(elapsed).unwrap_or(now)
        });
        RoutingState {
            green_weight_bp: saved.green_weight_bp,
            rollout: saved.state,
            step: saved.step,
            step_started,
            reason: saved.reason.clone(),
            admin_pins: saved.admin_pins.clone(),
            draining,
        }
    }

    /// What goes to the state store; `now` and `wall_now` are the same moment on both clocks.
    pub fn persisted(&self, now: Instant, wall_now: SystemTime) -> PersistedState {
        let step_started_unix_ms = self.step_started.map(|started| {
            let started = wall_now - now.saturating_duration_since(started);
            started
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as u64
        });
        PersistedState {
            version: STATE_VERSION,
            green_weight_bp: self.green_weight_bp,
            state: self.rollout,
            step: self.step,
            step_started_unix_ms,
            reason: self.reason.clone(),
            admin_pins: self.admin_pins.clone(),
            draining: Color::ALL
                .into_iter()
                .filter(|color| self.draining[color.index()])
                .collect(),
            updated_at: crate::controller::rfc3339(wall_now),
        }
    }

    /// The routing table in force: admin pins first, then the config's; the config's sticky
    /// mode and replication policy.
    pub fn routing_table(&self, config: &Config) -> RoutingTable {
        let mut table = RoutingTable::from_config(&config.routing);
        table.green_weight_bp = self.green_weight_bp;
        table.draining = self.draining;
        let config_pins = std::mem::take(&mut table.pins);
        table.pins = self.admin_pins.iter().cloned().chain(config_pins).collect();
        table
    }
}

/// A change a command makes, before it is persisted and published.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub next: RoutingState,
    /// One line for logs and `status.decisions`, e.g. "green weight 25% → 40%".
    pub description: String,
    /// A color that starts draining and whose sessions get `drain_grace` before being closed
    /// (promote, rollback); a plain `drain` closes at once.
    pub drain_after_grace: Option<Color>,
}

/// Applies a state-changing command at `now`. `Status`, `Reload`, `promote --check` and
/// `rollout next` (which needs a fresh evaluation) are not plain transitions; they are refused
/// here.
pub fn apply(
    state: &RoutingState,
    command: &Command,
    config: &Config,
    now: Instant,
) -> Result<Transition, String> {
    let mut next = state.clone();
    let mut drain_after_grace = None;
    let description = match command {
        Command::Weight { basis_points } => {
            let was = state.rollout;
            next.green_weight_bp = *basis_points;
            stop_rollout(&mut next, RolloutState::Manual, None);
            let mut text = format!(
                "green weight {} → {}",
                format_percent(state.green_weight_bp),
                format_percent(*basis_points)
            );
            if was != RolloutState::Manual {
                text.push_str(&format!(" (state {} → manual)", was.as_str()));
            }
            text
        }
        Command::Promote {
            check_only: false, ..
        } => return promote(state, config),
        Command::Rollback { reason } => {
            // Rolling back sends every session to blue: a blue drained by the promote before
            // (or by hand) takes sessions again.
            let undrained = state.draining[Color::Blue.index()];
            next.draining[Color::Blue.index()] = false;
            next.green_weight_bp = 0;
            stop_rollout(&mut next, RolloutState::RolledBack, reason.clone());
            if config.rollout.drain_on_switch && !state.draining[Color::Green.index()] {
                next.draining[Color::Green.index()] = true;
                drain_after_grace = Some(Color::Green);
            }
            let because = reason
                .as_deref()
                .map(|reason| format!(": {reason}"))
                .unwrap_or_default();
            let undrain_note = if undrained { "; blue undrained" } else { "" };
            format!(
                "rolled back: green weight {} → 0%{because}{undrain_note}",
                format_percent(state.green_weight_bp)
            )
        }
        Command::Pin { key, value, color } => {
            let pin = single_key_pin(*key, value, *color);
            let existing = next
                .admin_pins
                .iter()
                .position(|admin| same_keys(admin, &pin));
            match existing {
                Some(index) => {
                    let old = std::mem::replace(&mut next.admin_pins[index], pin);
                    format!("pin {}={value}: {} → {color}", key.as_str(), old.color)
                }
                None => {
                    next.admin_pins.push(pin);
                    format!("pin {}={value} → {color}", key.as_str())
                }
            }
        }
        Command::Unpin { key, value } => {
            let probe = single_key_pin(*key, value, Color::Blue);
            match next
                .admin_pins
                .iter()
                .position(|admin| same_keys(admin, &probe))
            {
                Some(index) => {
                    let removed = next.admin_pins.remove(index);
                    format!("unpin {}={value} (was → {})", key.as_str(), removed.color)
                }
                None if config
                    .routing
                    .pins
                    .iter()
                    .any(|pin| same_keys(&Pin::from(pin), &probe)) =>
                {
                    return Err(format!(
                        "the pin {}={value} comes from the config file; remove it there and `reload`",
                        key.as_str()
                    ));
                }
                None => return Err(format!("there is no admin pin {}={value}", key.as_str())),
            }
        }
        Command::Drain(color) => {
            if state.draining[color.other().index()] {
                return Err(format!(
                    "{} is draining already; draining both colors would leave no database to route to (`undrain {}` first)",
                    color.other(),
                    color.other()
                ));
            }
            next.draining[color.index()] = true;
            if state.draining[color.index()] {
                format!("drain {color}: already draining")
            } else {
                format!(
                    "drain {color}: no new sessions; open sessions close at their next idle point"
                )
            }
        }
        Command::Undrain(color) => {
            next.draining[color.index()] = false;
            if state.draining[color.index()] {
                format!("undrain {color}: new sessions may go to {color} again")
            } else {
                format!("undrain {color}: it was not draining")
            }
        }
        Command::RolloutStart => return start_rollout(state, config, now),
        Command::RolloutPause => match state.rollout {
            RolloutState::Running | RolloutState::Stalled => {
                return Ok(set_rollout_state(
                    state,
                    RolloutState::Paused,
                    Some("paused by an operator".into()),
                ));
            }
            other => {
                return Err(format!(
                    "no rollout is running to pause (state {})",
                    other.as_str()
                ));
            }
        },
        Command::RolloutResume => match state.rollout {
            RolloutState::Paused | RolloutState::Stalled => {
                return Ok(set_rollout_state(state, RolloutState::Running, None));
            }
            other => {
                return Err(format!(
                    "no paused or stalled rollout to resume (state {})",
                    other.as_str()
                ));
            }
        },
        Command::CutoverAbort => {
            return Err("no cutover is in progress (a transparent promote or rollback runs one; `cutover abort` stops it while it runs)".into());
        }
        Command::Status
        | Command::Reload
        | Command::Promote {
            check_only: true, ..
        }
        | Command::RolloutNext
        | Command::RolloutEvaluate => {
            return Err(format!("`{}` changes no routing state", command.verb()));
        }
    };
    Ok(Transition {
        next,
        description,
        drain_after_grace,
    })
}

/// `promote`: green takes 100 %; blue drains after `drain_grace` when `drain_on_switch` — not
/// in transparent cutover mode, whose promote moves blue's sessions instead.
pub fn promote(state: &RoutingState, config: &Config) -> Result<Transition, String> {
    if state.draining[Color::Green.index()] {
        return Err("green is draining; `undrain green` before promoting it".into());
    }
    let mut next = state.clone();
    next.green_weight_bp = 10_000;
    stop_rollout(&mut next, RolloutState::Promoted, None);
    let mut drain_after_grace = None;
    let moves_sessions = config.cutover.mode == crate::config::CutoverMode::Transparent;
    if config.rollout.drain_on_switch && !moves_sessions && !state.draining[Color::Blue.index()] {
        next.draining[Color::Blue.index()] = true;
        drain_after_grace = Some(Color::Blue);
    }
    Ok(Transition {
        next,
        description: format!(
            "promoted: green weight {} → 100%",
            format_percent(state.green_weight_bp)
        ),
        drain_after_grace,
    })
}

/// `rollout start`: the first step above the current weight, running, dwell clock at `now`.
pub fn start_rollout(
    state: &RoutingState,
    config: &Config,
    now: Instant,
) -> Result<Transition, String> {
    if state.rollout == RolloutState::Running {
        return Err(format!(
            "a rollout is running already (step {} of {})",
            state.step.map_or(0, |step| step + 1),
            config.rollout.steps.len()
        ));
    }
    if state.draining[Color::Green.index()] {
        return Err("green is draining; `undrain green` before starting a rollout".into());
    }
    let steps = &config.rollout.steps;
    let Some(step) = steps
        .iter()
        .position(|&weight| weight > state.green_weight_bp)
    else {
        return Err(format!(
            "green is at {}, at or above the last step ({}); use `promote`",
            format_percent(state.green_weight_bp),
            steps
                .last()
                .map_or_else(|| "none".to_string(), |last| format_percent(*last))
        ));
    };
    let mut next = state.clone();
    next.green_weight_bp = steps[step];
    next.rollout = RolloutState::Running;
    next.step = Some(step);
    next.step_started = Some(now);
    next.reason = None;
    Ok(Transition {
        description: format!(
            "rollout started: step {} of {}, green weight {} → {}",
            step + 1,
            steps.len(),
            format_percent(state.green_weight_bp),
            format_percent(steps[step])
        ),
        next,
        drain_after_grace: None,
    })
}

/// The next step of a running rollout, or promotion after the last one.
pub fn advance(state: &RoutingState, config: &Config, now: Instant) -> Result<Transition, String> {
    let steps = &config.rollout.steps;
    let next_step = state.step.map_or(0, |step| step + 1);
    if next_step >= steps.len() {
        let mut promoted = promote(state, config)?;
        promoted.description = format!(
            "rollout complete after its last step; {}",
            promoted.description
        );
        return Ok(promoted);
    }
    let mut next = state.clone();
    next.green_weight_bp = steps[next_step];
    next.step = Some(next_step);
    next.step_started = Some(now);
    next.reason = None;
    if next.rollout == RolloutState::Stalled {
        next.rollout = RolloutState::Running;
    }
    Ok(Transition {
        description: format!(
            "advanced to step {} of {}: green weight {} → {}",
            next_step + 1,
            steps.len(),
            format_percent(state.green_weight_bp),
            format_percent(steps[next_step])
        ),
        next,
        drain_after_grace: None,
    })
}

/// Moves the rollout to `rollout` (pause, stall, resume) with `reason`, keeping the step and
/// its dwell clock.
pub fn set_rollout_state(
    state: &RoutingState,
    rollout: RolloutState,
    reason: Option<String>,
) -> Transition {
    let mut next = state.clone();
    next.rollout = rollout;
    next.reason = reason.clone();
    let because = reason
        .map(|reason| format!(": {reason}"))
        .unwrap_or_default();
    Transition {
        description: format!(
            "rollout {} → {}{because}",
            state.rollout.as_str(),
            rollout.as_str()
        ),
        next,
        drain_after_grace: None,
    }
}

/// Ends any running rollout in `state` (a manual change or a switch wins over the plan).
fn stop_rollout(state: &mut RoutingState, rollout: RolloutState, reason: Option<String>) {
    state.rollout = rollout;
    state.step = None;
    state.step_started = None;
    state.reason = reason;
}

fn single_key_pin(key: PinKey, value: &str, color: Color) -> Pin {
    let mut pin = Pin {
        database: None,
        user: None,
        application_name: None,
        tenant: None,
        color,
    };
    let slot = match key {
        PinKey::Database => &mut pin.database,
        PinKey::User => &mut pin.user,
        PinKey::ApplicationName => &mut pin.application_name,
        PinKey::Tenant => &mut pin.tenant,
    };
    *slot = Some(value.to_string());
    pin
}

/// True when two pins match the same sessions (their colors may differ).
fn same_keys(a: &Pin, b: &Pin) -> bool {
    a.database == b.database
        && a.user == b.user
        && a.application_name == b.application_name
        && a.tenant == b.tenant
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[blue]\nhost = \"127.0.0.1\"\nport = 5432\n[green]\nhost = \"127.0.0.1\"\nport = 5433\n{extra}"
        );
        Config::from_toml_str(&text, Path::new("/tmp/pgshift.toml")).expect("valid config")
    }

    #[test]
    fn weight_stops_a_rollout() {
        let config = config("");
        let mut state = RoutingState::from_config(&config);
        state.rollout = RolloutState::Running;
        state.step = Some(2);
        let change = apply(
            &state,
            &Command::Weight { basis_points: 4000 },
            &config,
            Instant::now(),
        )
        .expect("weight");
        assert_eq!(change.next.green_weight_bp, 4000);
        assert_eq!(change.next.rollout, RolloutState::Manual);
        assert_eq!(change.next.step, None);
        assert!(
            change.description.contains("0% → 40%"),
            "{}",
            change.description
        );
    }

    #[test]
    fn promote_and_rollback_drain_the_loser_after_grace() {
        let config = config("");
        let state = RoutingState::from_config(&config);
        let promoted = apply(
            &state,
            &Command::Promote {
                check_only: false,
                force: false,
            },
            &config,
            Instant::now(),
        )
        .expect("promote");
        assert_eq!(promoted.next.green_weight_bp, 10_000);
        assert_eq!(promoted.next.draining, [true, false]);
        assert_eq!(promoted.drain_after_grace, Some(Color::Blue));
        // Rolling back to a blue the promote drained undrains it: rollback is the way back.
        let back = apply(
            &promoted.next,
            &Command::Rollback { reason: None },
            &config,
            Instant::now(),
        )
        .expect("rollback undrains blue");
        assert_eq!(back.next.draining, [false, true]);
        assert!(
            back.description.ends_with("; blue undrained"),
            "{}",
            back.description
        );
        let undrained = apply(
            &promoted.next,
            &Command::Undrain(Color::Blue),
            &config,
            Instant::now(),
        )
        .expect("undrain");
        let rolled = apply(
            &undrained.next,
            &Command::Rollback {
                reason: Some("slow".into()),
            },
            &config,
            Instant::now(),
        )
        .expect("rollback");
        assert_eq!(rolled.next.green_weight_bp, 0);
        assert_eq!(rolled.next.rollout, RolloutState::RolledBack);
        assert_eq!(rolled.next.reason.as_deref(), Some("slow"));
        assert_eq!(rolled.next.draining, [false, true]);

        let no_drain = self::config("[rollout]\ndrain_on_switch = false");
        let promoted = apply(
            &state,
            &Command::Promote {
                check_only: false,
                force: false,
            },
            &no_drain,
            Instant::now(),
        )
        .expect("promote");
        assert_eq!(promoted.next.draining, [false, false]);

        // A transparent cutover moves blue's sessions: nothing to drain, and rollback stays
        // possible at once.
        let transparent = self::config(
            "[auth]\nmode = \"scram\"\nuserlist = \"users.txt\"\n\
             [cutover]\nmode = \"transparent\"\ndsn = \"user=pgshift_cutover\"",
        );
        let promoted = apply(
            &state,
            &Command::Promote {
                check_only: false,
                force: false,
            },
            &transparent,
            Instant::now(),
        )
        .expect("promote");
        assert_eq!(promoted.next.draining, [false, false]);
        assert_eq!(promoted.drain_after_grace, None);
        assert!(
            apply(
                &promoted.next,
                &Command::Rollback { reason: None },
                &transparent,
                Instant::now()
            )
            .is_ok()
        );
    }

    #[test]
    fn draining_both_colors_is_refused() {
        let config = config("");
        let state = RoutingState::from_config(&config);
        let drained = apply(
            &state,
            &Command::Drain(Color::Blue),
            &config,
            Instant::now(),
        )
        .expect("drain");
        assert_eq!(drained.drain_after_grace, None);
        let error = apply(
            &drained.next,
            &Command::Drain(Color::Green),
            &config,
            Instant::now(),
        )
        .expect_err("both");
        assert!(error.contains("both"), "{error}");
    }

    #[test]
    fn pins_replace_and_unpin_knows_config_pins() {
        let config = config("[[routing.pin]]\ndatabase = \"tenant_42\"\ncolor = \"green\"");
        let state = RoutingState::from_config(&config);
        let pin = |color| Command::Pin {
            key: PinKey::Tenant,
            value: "acme".into(),
            color,
        };
        let first = apply(&state, &pin(Color::Green), &config, Instant::now()).expect("pin");
        let second =
            apply(&first.next, &pin(Color::Blue), &config, Instant::now()).expect("re-pin");
        assert_eq!(second.next.admin_pins.len(), 1);
        assert_eq!(second.next.admin_pins[0].color, Color::Blue);
        let table = second.next.routing_table(&config);
        assert_eq!(
            table.pins.len(),
            2,
            "admin pins and config pins are both in force"
        );
        assert_eq!(table.pins[0].tenant.as_deref(), Some("acme"));
        let unpin = |key, value: &str| Command::Unpin {
            key,
            value: value.into(),
        };
        let error = apply(
            &second.next,
            &unpin(PinKey::Database, "tenant_42"),
            &config,
            Instant::now(),
        )
        .expect_err("config pin");
        assert!(error.contains("config file"), "{error}");
        assert!(
            apply(
                &second.next,
                &unpin(PinKey::User, "nobody"),
                &config,
                Instant::now()
            )
            .is_err()
        );
        let removed = apply(
            &second.next,
            &unpin(PinKey::Tenant, "acme"),
            &config,
            Instant::now(),
        )
        .expect("unpin");
        assert!(removed.next.admin_pins.is_empty());
    }

    #[test]
    fn persisted_round_trip_keeps_the_dwell_clock() {
        let config = config("");
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut state = RoutingState::from_config(&config);
        state.step = Some(2);
        state.step_started = now.checked_sub(Duration::from_secs(90));
        state.draining = [false, true];
        let saved = state.persisted(now, wall);
        assert_eq!(saved.draining, vec![Color::Green]);
        // Restored 5 s later (pgshift was down meanwhile): the step has run 95 s.
        let later = now + Duration::from_secs(5);
        let restored = RoutingState::from_persisted(&saved, later, wall + Duration::from_secs(5));
        assert_eq!(restored.draining, [false, true]);
        let elapsed = later.duration_since(restored.step_started.expect("dwell clock"));
        assert!((elapsed.as_secs_f64() - 95.0).abs() < 0.01, "{elapsed:?}");
    }

    #[test]
    fn rollout_start_pause_resume_advance() {
        let config = config("[rollout]\nsteps = [5, 10, 50]");
        let now = Instant::now();
        let mut state = RoutingState::from_config(&config);
        state.green_weight_bp = 700;
        let started = apply(&state, &Command::RolloutStart, &config, now).expect("start");
        assert_eq!(
            (started.next.green_weight_bp, started.next.step),
            (1000, Some(1))
        );
        assert_eq!(started.next.rollout, RolloutState::Running);
        assert!(apply(&started.next, &Command::RolloutStart, &config, now).is_err());
        let paused = apply(&started.next, &Command::RolloutPause, &config, now).expect("pause");
        assert_eq!(paused.next.rollout, RolloutState::Paused);
        let resumed = apply(&paused.next, &Command::RolloutResume, &config, now).expect("resume");
        assert_eq!(
            resumed.next.step_started, started.next.step_started,
            "the dwell clock goes on"
        );
        let advanced = advance(&resumed.next, &config, now).expect("advance");
        assert_eq!(
            (advanced.next.green_weight_bp, advanced.next.step),
            (5000, Some(2))
        );
        let done = advance(&advanced.next, &config, now).expect("promote");
        assert_eq!(done.next.rollout, RolloutState::Promoted);
        assert_eq!(done.next.green_weight_bp, 10_000);
        state.green_weight_bp = 5000;
        assert!(
            apply(&state, &Command::RolloutStart, &config, now).is_err(),
            "nothing above 50 %"
        );
    }
}
