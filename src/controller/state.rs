//! The controller's routing state and how each command changes it, as pure functions: no
//! I/O, no clock reads beyond the `now` passed in, so every transition is unit-tested.

use std::time::Instant;

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

    /// The state a state file holds; `now` anchors the dwell clock it carried.
    pub fn from_persisted(saved: &PersistedState, now: Instant) -> RoutingState {
        let mut draining = [false, false];
        for color in &saved.draining {
            draining[color.index()] = true;
        }
        RoutingState {
            green_weight_bp: saved.green_weight_bp,
            rollout: saved.state,
            step: saved.step,
            step_started: saved.step_elapsed_ms.map(|elapsed| {
                now.checked_sub(std::time::Duration::from_millis(elapsed))
                    .unwrap_or(now)
            }),
            reason: saved.reason.clone(),
            admin_pins: saved.admin_pins.clone(),
            draining,
        }
    }

    /// What goes to the state store.
    pub fn persisted(&self, now: Instant, updated_at: String) -> PersistedState {
        PersistedState {
            version: STATE_VERSION,
            green_weight_bp: self.green_weight_bp,
            state: self.rollout,
            step: self.step,
            step_elapsed_ms: self
                .step_started
                .map(|started| now.saturating_duration_since(started).as_millis() as u64),
            reason: self.reason.clone(),
            admin_pins: self.admin_pins.clone(),
            draining: Color::ALL
                .into_iter()
                .filter(|color| self.draining[color.index()])
                .collect(),
            updated_at,
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

/// Why a rollout command is refused until the monitor exists.
pub const ROLLOUT_NOT_AVAILABLE: &str = "rollout commands are not available yet in this build (the automatic rollout arrives with the monitor); use `weight N`, `promote` or `rollback`";

/// Applies a state-changing command. `Status`, `Reload` and `promote --check` are not
/// transitions; they are refused here.
pub fn apply(
    state: &RoutingState,
    command: &Command,
    config: &Config,
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
        Command::Promote { check_only: false } => {
            if state.draining[Color::Green.index()] {
                return Err("green is draining; `undrain green` before promoting it".into());
            }
            next.green_weight_bp = 10_000;
            stop_rollout(&mut next, RolloutState::Promoted, None);
            if config.rollout.drain_on_switch && !state.draining[Color::Blue.index()] {
                next.draining[Color::Blue.index()] = true;
                drain_after_grace = Some(Color::Blue);
            }
            format!(
                "promoted: green weight {} → 100%",
                format_percent(state.green_weight_bp)
            )
        }
        Command::Rollback { reason } => {
            if state.draining[Color::Blue.index()] {
                return Err("blue is draining; `undrain blue` before rolling back to it".into());
            }
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
            format!(
                "rolled back: green weight {} → 0%{because}",
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
        Command::RolloutStart
        | Command::RolloutNext
        | Command::RolloutPause
        | Command::RolloutResume => {
            return Err(ROLLOUT_NOT_AVAILABLE.into());
        }
        Command::CutoverAbort => {
            return Err("no cutover is in progress ([cutover] mode \"drain\" closes sessions at idle points instead)".into());
        }
        Command::Status | Command::Reload | Command::Promote { check_only: true } => {
            return Err(format!("`{}` changes no routing state", command.verb()));
        }
    };
    Ok(Transition {
        next,
        description,
        drain_after_grace,
    })
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
        let change =
            apply(&state, &Command::Weight { basis_points: 4000 }, &config).expect("weight");
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
        let promoted =
            apply(&state, &Command::Promote { check_only: false }, &config).expect("promote");
        assert_eq!(promoted.next.green_weight_bp, 10_000);
        assert_eq!(promoted.next.draining, [true, false]);
        assert_eq!(promoted.drain_after_grace, Some(Color::Blue));
        // Rolling back to a draining blue is refused until blue is undrained.
        assert!(apply(&promoted.next, &Command::Rollback { reason: None }, &config).is_err());
        let undrained =
            apply(&promoted.next, &Command::Undrain(Color::Blue), &config).expect("undrain");
        let rolled = apply(
            &undrained.next,
            &Command::Rollback {
                reason: Some("slow".into()),
            },
            &config,
        )
        .expect("rollback");
        assert_eq!(rolled.next.green_weight_bp, 0);
        assert_eq!(rolled.next.rollout, RolloutState::RolledBack);
        assert_eq!(rolled.next.reason.as_deref(), Some("slow"));
        assert_eq!(rolled.next.draining, [false, true]);

        let no_drain = self::config("[rollout]\ndrain_on_switch = false");
        let promoted =
            apply(&state, &Command::Promote { check_only: false }, &no_drain).expect("promote");
        assert_eq!(promoted.next.draining, [false, false]);
    }

    #[test]
    fn draining_both_colors_is_refused() {
        let config = config("");
        let state = RoutingState::from_config(&config);
        let drained = apply(&state, &Command::Drain(Color::Blue), &config).expect("drain");
        assert_eq!(drained.drain_after_grace, None);
        let error = apply(&drained.next, &Command::Drain(Color::Green), &config).expect_err("both");
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
        let first = apply(&state, &pin(Color::Green), &config).expect("pin");
        let second = apply(&first.next, &pin(Color::Blue), &config).expect("re-pin");
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
        let error = apply(&second.next, &unpin(PinKey::Database, "tenant_42"), &config)
            .expect_err("config pin");
        assert!(error.contains("config file"), "{error}");
        assert!(apply(&second.next, &unpin(PinKey::User, "nobody"), &config).is_err());
        let removed = apply(&second.next, &unpin(PinKey::Tenant, "acme"), &config).expect("unpin");
        assert!(removed.next.admin_pins.is_empty());
    }

    #[test]
    fn persisted_round_trip_keeps_the_dwell_clock() {
        let config = config("");
        let now = Instant::now();
        let mut state = RoutingState::from_config(&config);
        state.step = Some(2);
        state.step_started = now.checked_sub(std::time::Duration::from_secs(90));
        state.draining = [false, true];
        let saved = state.persisted(now, "2026-11-29T00:00:00Z".into());
        assert_eq!(saved.step_elapsed_ms, Some(90_000));
        assert_eq!(saved.draining, vec![Color::Green]);
        let later = now + std::time::Duration::from_secs(5);
        let restored = RoutingState::from_persisted(&saved, later);
        assert_eq!(restored.draining, [false, true]);
        let elapsed = later.duration_since(restored.step_started.expect("dwell clock"));
        assert_eq!(elapsed.as_secs(), 90);
    }

    #[test]
    fn rollout_commands_wait_for_the_monitor() {
        let config = config("");
        let state = RoutingState::from_config(&config);
        let error = apply(&state, &Command::RolloutStart, &config).expect_err("not yet");
        assert!(error.contains("not available yet"), "{error}");
    }
}
