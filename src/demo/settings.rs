//! The demo's clock and the pgshift config it writes.
//!
//! `--duration` is the time the whole demo should take. Once the clusters are up, what is
//! left is shared out ([`Timing::for_budget`]): a short warm-up, the broken rollout (a window
//! and a few evaluations until the rollback), one window for the stats to forget it, five
//! steps of `step_dwell` for the healthy climb, and blue's drain after the promotion. The
//! [`pgshift_config`] is an ordinary config file, loaded with `Config::load` like any other.

use std::time::Duration;

/// The rollout's steps, in percent of new sessions sent to green.
pub const STEPS: [u16; 5] = [10, 25, 50, 75, 100];
/// The shortest budget the rollouts are sized for; a shorter `--duration` runs longer.
pub const MIN_BUDGET: Duration = Duration::from_secs(15);
/// Set aside from `--duration` for stopping everything at the end.
pub const CLEANUP_ALLOWANCE: Duration = Duration::from_secs(3);
/// The rollback trigger's threshold: green's error rate over the window.
pub const ERROR_RATE_ROLLBACK: f64 = 0.05;
/// The pause trigger's threshold: green's p95 latency over the window, in ms.
pub const LATENCY_P95_PAUSE_MS: u32 = 1000;
/// Green requests a window needs before any verdict.
pub const MIN_REQUESTS: u32 = 20;

/// The rollout's pace for one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub window: Duration,
    pub evaluate_every: Duration,
    pub step_dwell: Duration,
    pub drain_grace: Duration,
}

fn millis(seconds: f64) -> Duration {
    Duration::from_millis((seconds * 1000.0).round() as u64)
}

impl Timing {
    /// The pace that fits both rollouts into `budget` (at least [`MIN_BUDGET`]).
    pub fn for_budget(budget: Duration) -> Timing {
        let budget = budget.max(MIN_BUDGET).as_secs_f64();
        let window = (budget / 10.0).clamp(2.0, 6.0);
        let evaluate_every = (window / 4.0).clamp(0.25, 1.0);
        let drain_grace = (window / 2.0).clamp(0.5, 2.0);
        // Warm-up, the broken rollout, the wait for the window to forget it, blue's drain and
        // a second of slack; the rest is the climb, one dwell per step (each step advances at
        // the first evaluation after its dwell).
        let fixed = window * 0.5 + (window + 3.0 * evaluate_every) + window + drain_grace + 1.0;
        let step_dwell = ((budget - fixed) / STEPS.len() as f64 - evaluate_every / 2.0).max(1.0);
        Timing {
            window: millis(window),
            evaluate_every: millis(evaluate_every),
            step_dwell: millis(step_dwell),
            drain_grace: millis(drain_grace),
        }
    }

    /// The warm-up before the first rollout: blue's figures fill half a window.
    pub fn warm_up(&self) -> Duration {
        self.window / 2
    }

    /// The longest the broken rollout may take to be rolled back before the demo gives up.
    pub fn rollback_limit(&self) -> Duration {
        self.window * 4 + self.evaluate_every * 10 + Duration::from_secs(15)
    }

    /// The longest the healthy climb may take before the demo gives up.
    pub fn promotion_limit(&self) -> Duration {
        (self.step_dwell + self.evaluate_every) * STEPS.len() as u32 * 2
            + self.window * 4
            + Duration::from_secs(30)
    }
}

/// Where everything listens, for [`pgshift_config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub proxy: u16,
    pub metrics: u16,
    pub blue: u16,
    pub green: u16,
}

/// A humantime duration in milliseconds ("2500ms").
fn duration(value: Duration) -> String {
    format!("{}ms", value.as_millis())
}

/// The pgshift config of one demo run; its relative paths (admin socket, state file, decision
/// log) land next to it, in the run's temp dir.
pub fn pgshift_config(ports: Ports, timing: &Timing) -> String {
    let steps: Vec<String> = STEPS.iter().map(u16::to_string).collect();
    format!(
        r#"# Written by `pgshift demo` for one run; removed with its temp dir.

[listen]
addr = "127.0.0.1:{proxy}"
login_timeout = "5s"
shutdown_timeout = "5s"

[admin]
socket = "pgshift.sock"
socket_mode = "0600"

[metrics]
addr = "127.0.0.1:{metrics}"

[blue]
host = "127.0.0.1"
port = {blue}
connect_timeout = "3s"

[green]
host = "127.0.0.1"
port = {green}
connect_timeout = "3s"

[routing]
green_weight = 0
sticky = "none"

[rollout]
steps = [{steps}]
step_dwell = "{dwell}"
evaluate_every = "{evaluate_every}"
window = "{window}"
min_requests = {min_requests}
min_connects = 5
max_no_verdict = 20
auto_resume = true
drain_on_switch = true
drain_grace = "{drain_grace}"
drain_timeout = "10s"
state_file = "pgshift-state.json"
decision_log = "pgshift-decisions.jsonl"

[[rollout.trigger]]
metric = "error_rate"
above = {error_rate}
action = "rollback"
for = 2

[[rollout.trigger]]
metric = "latency_p95_ms"
above = {latency}
action = "pause"
for = 3
"#,
        proxy = ports.proxy,
        metrics = ports.metrics,
        blue = ports.blue,
        green = ports.green,
        steps = steps.join(", "),
        dwell = duration(timing.step_dwell),
        evaluate_every = duration(timing.evaluate_every),
        window = duration(timing.window),
        min_requests = MIN_REQUESTS,
        drain_grace = duration(timing.drain_grace),
        error_rate = ERROR_RATE_ROLLBACK,
        latency = LATENCY_P95_PAUSE_MS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TriggerAction, TriggerMetric};

    #[test]
    fn the_ci_duration_gives_a_brisk_pace() {
        let timing = Timing::for_budget(Duration::from_secs(27));
        assert!(timing.window >= Duration::from_secs(2), "{timing:?}");
        assert!(timing.step_dwell >= Duration::from_secs(1), "{timing:?}");
        let climb = timing.step_dwell * STEPS.len() as u32;
        let total = timing.warm_up() + timing.window * 2 + climb + timing.drain_grace;
        assert!(
            total <= Duration::from_secs(27),
            "{timing:?} takes {total:?}"
        );
    }

    #[test]
    fn longer_budgets_give_longer_steps_and_short_ones_a_floor() {
        let short = Timing::for_budget(Duration::from_secs(1));
        assert_eq!(short, Timing::for_budget(MIN_BUDGET));
        let long = Timing::for_budget(Duration::from_secs(70));
        assert!(long.step_dwell > short.step_dwell);
        assert_eq!(long.window, Duration::from_secs(6));
    }

    #[test]
    fn the_config_loads_as_written() {
        let timing = Timing::for_budget(Duration::from_secs(30));
        let ports = Ports {
            proxy: 7001,
            metrics: 7002,
            blue: 7003,
            green: 7004,
        };
        let text = pgshift_config(ports, &timing);
        let config = Config::from_toml_str(&text, std::path::Path::new("/tmp/demo/pgshift.toml"))
            .unwrap_or_else(|errors| panic!("{errors}"));
        assert_eq!(config.listen.addr, "127.0.0.1:7001");
        assert_eq!(config.green.port, 7004);
        assert_eq!(config.rollout.steps, vec![1000, 2500, 5000, 7500, 10_000]);
        assert_eq!(config.rollout.window, timing.window);
        assert_eq!(config.rollout.step_dwell, timing.step_dwell);
        assert_eq!(
            config.admin.socket,
            std::path::PathBuf::from("/tmp/demo/pgshift.sock")
        );
        let triggers: Vec<(TriggerMetric, TriggerAction)> = config
            .rollout
            .triggers
            .iter()
            .map(|trigger| (trigger.metric, trigger.action))
            .collect();
        assert_eq!(
            triggers,
            vec![
                (TriggerMetric::ErrorRate, TriggerAction::Rollback),
                (TriggerMetric::LatencyP95Ms, TriggerAction::Pause)
            ]
        );
    }
}
