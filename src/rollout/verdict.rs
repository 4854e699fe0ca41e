//! One evaluation of the rollout's triggers: green's figures over the window (and blue's, for
//! the comparisons) turned into a reading per trigger and an overall verdict.
//!
//! Pure: the controller passes the window's figures in and acts on what comes out.
//! Sample sizes are respected: below `min_requests` green requests there is no verdict (no
//! advance, no pause, no rollback); comparisons with blue need `min_requests` on blue too and
//! pass a one-sided test at `confidence`; `connect_error_rate` needs `min_connects` attempts
//! instead (a green that refuses every login has no requests at all).

use std::time::Duration;

use super::statistics::{difference_exceeds, proportion_exceeds};
use crate::config::{RolloutConfig, TriggerAction, TriggerConfig, TriggerMetric};
use crate::controller::window::WindowFigures;
use crate::stats::LatencyHistogram;

/// In-failed-transaction errors follow an earlier error; counting them would count it twice.
const IN_FAILED_TRANSACTION: [u8; 5] = *b"25P02";

/// Which errors count against a color: all but 25P02 and `[rollout] ignore_sqlstates`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFilter {
    codes: Vec<[u8; 5]>,
    classes: Vec<[u8; 2]>,
}

impl ErrorFilter {
    pub fn from_config(rollout: &RolloutConfig) -> ErrorFilter {
        let mut filter = ErrorFilter::default();
        for entry in &rollout.ignore_sqlstates {
            let bytes = entry.as_bytes();
            if let Ok(code) = <[u8; 5]>::try_from(bytes) {
                filter.codes.push(code);
            } else if let Ok(class) = <[u8; 2]>::try_from(bytes) {
                filter.classes.push(class);
            }
        }
        filter
    }

    pub fn counts(&self, sqlstate: &[u8; 5]) -> bool {
        *sqlstate != IN_FAILED_TRANSACTION
            && !self.codes.contains(sqlstate)
            && !self.classes.iter().any(|class| sqlstate[..2] == class[..])
    }

    /// The errors in `figures` that count.
    pub fn counted_errors(&self, figures: &WindowFigures) -> u64 {
        figures
            .errors_by_sqlstate
            .iter()
            .filter(|(code, _)| self.counts(code))
            .map(|(_, count)| count)
            .sum()
    }
}

/// What one trigger concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// Past its threshold (for comparisons: significantly so).
    Fail(f64),
    Pass(f64),
    /// Too little data; the reason says which.
    NoVerdict(String),
}

/// One trigger's outcome in an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerOutcome {
    pub metric: TriggerMetric,
    pub above: f64,
    pub action: TriggerAction,
    pub reading: Reading,
}

impl TriggerOutcome {
    /// "error_rate 0.1234 above 0.05" — for reasons and logs.
    pub fn describe(&self) -> String {
        match &self.reading {
            Reading::Fail(value) => {
                format!("{} {} above {}", self.metric, round(*value), self.above)
            }
            Reading::Pass(value) => {
                format!("{} {} within {}", self.metric, round(*value), self.above)
            }
            Reading::NoVerdict(reason) => format!("{}: no verdict ({reason})", self.metric),
        }
    }
}

fn round(value: f64) -> f64 {
    (value * 10_000.0).round() / 10_000.0
}

/// The overall verdict of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Enough green traffic and no trigger failed.
    Pass,
    /// At least one trigger failed.
    Fail,
    /// Not enough data to say; the reason says what is missing.
    NoVerdict(String),
}

/// Everything one evaluation read and concluded.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub green_requests: u64,
    pub green_errors: u64,
    pub blue_requests: u64,
    pub blue_errors: u64,
    pub green_connect_attempts: u64,
    pub green_connect_errors: u64,
    /// How much time the window's data cover.
    pub covered: Duration,
    pub triggers: Vec<TriggerOutcome>,
    pub verdict: Verdict,
}

impl Evaluation {
    /// One line for the log: figures, each trigger, the verdict.
    pub fn summary(&self) -> String {
        let triggers: Vec<String> = self.triggers.iter().map(TriggerOutcome::describe).collect();
        let verdict = match &self.verdict {
            Verdict::Pass => "pass".to_string(),
            Verdict::Fail => "fail".to_string(),
            Verdict::NoVerdict(reason) => format!("no verdict: {reason}"),
        };
        format!(
            "green {} requests / {} errors, blue {} / {}, green connects {} / {} failed, over {:.1}s; {}; verdict {verdict}",
            self.green_requests,
            self.green_errors,
            self.blue_requests,
            self.blue_errors,
            self.green_connect_attempts,
            self.green_connect_errors,
            self.covered.as_secs_f64(),
            if triggers.is_empty() {
                "no triggers".to_string()
            } else {
                triggers.join("; ")
            },
        )
    }
}

/// Evaluates every trigger of `rollout` over the window's figures.
pub fn evaluate(
    green: &WindowFigures,
    blue: &WindowFigures,
    covered: Duration,
    rollout: &RolloutConfig,
) -> Evaluation {
    let filter = ErrorFilter::from_config(rollout);
    let green_errors = filter.counted_errors(green);
    let blue_errors = filter.counted_errors(blue);
    let inputs = Inputs {
        green,
        blue,
        green_errors,
        blue_errors,
        rollout,
    };
    let triggers: Vec<TriggerOutcome> = rollout
        .triggers
        .iter()
        .map(|trigger| TriggerOutcome {
            metric: trigger.metric,
            above: trigger.above,
            action: trigger.action,
            reading: inputs.read(trigger),
        })
        .collect();
    let verdict = if triggers
        .iter()
        .any(|outcome| matches!(outcome.reading, Reading::Fail(_)))
    {
        Verdict::Fail
    } else if green.requests >= rollout.min_requests {
        Verdict::Pass
    } else {
        Verdict::NoVerdict(format!(
            "insufficient data: green served {} of the {} requests a verdict needs in the window",
            green.requests, rollout.min_requests
        ))
    };
    Evaluation {
        green_requests: green.requests,
        green_errors,
        blue_requests: blue.requests,
        blue_errors,
        green_connect_attempts: green.connect_attempts,
        green_connect_errors: green.connect_errors,
        covered,
        triggers,
        verdict,
    }
}

struct Inputs<'a> {
    green: &'a WindowFigures,
    blue: &'a WindowFigures,
    green_errors: u64,
    blue_errors: u64,
    rollout: &'a RolloutConfig,
}

impl Inputs<'_> {
    fn read(&self, trigger: &TriggerConfig) -> Reading {
        let min_requests = self.rollout.min_requests;
        let confidence = self.rollout.confidence;
        let green_enough = self.green.requests >= min_requests;
        let blue_enough = self.blue.requests >= min_requests;
        let few_green = || {
            Reading::NoVerdict(format!(
                "green served {} of {min_requests} requests",
                self.green.requests
            ))
        };
        let few_blue = || {
            Reading::NoVerdict(format!(
                "blue served {} of {min_requests} requests",
                self.blue.requests
            ))
        };
        let absolute = |value: f64| {
            if value > trigger.above {
                Reading::Fail(value)
            } else {
                Reading::Pass(value)
            }
        };
        let milliseconds =
            |latency: Option<Duration>| latency.map(|latency| latency.as_secs_f64() * 1000.0);
        match trigger.metric {
            TriggerMetric::ErrorRate if green_enough => {
                absolute(self.green_errors as f64 / self.green.requests as f64)
            }
            TriggerMetric::ErrorRateVsBlue if !green_enough => few_green(),
            TriggerMetric::ErrorRateVsBlue if !blue_enough => few_blue(),
            TriggerMetric::ErrorRateVsBlue => {
                let difference = self.green_errors as f64 / self.green.requests as f64
                    - self.blue_errors as f64 / self.blue.requests as f64;
                let significant = difference_exceeds(
                    self.green_errors,
                    self.green.requests,
                    self.blue_errors,
                    self.blue.requests,
                    trigger.above,
                    confidence,
                );
                if significant {
                    Reading::Fail(difference)
                } else {
                    Reading::Pass(difference)
                }
            }
            TriggerMetric::LatencyP50Ms
            | TriggerMetric::LatencyP95Ms
            | TriggerMetric::LatencyP99Ms
                if green_enough =>
            {
                let latency = match trigger.metric {
                    TriggerMetric::LatencyP50Ms => self.green.latency_p50,
                    TriggerMetric::LatencyP95Ms => self.green.latency_p95,
                    _ => self.green.latency_p99,
                };
                match milliseconds(latency) {
                    Some(value) => absolute(value),
                    None => Reading::NoVerdict("no latency samples (COPY only?)".into()),
                }
            }
            TriggerMetric::LatencyP95Ratio if !green_enough => few_green(),
            TriggerMetric::LatencyP95Ratio if !blue_enough => few_blue(),
            TriggerMetric::LatencyP95Ratio => match (self.green.latency_p95, self.blue.latency_p95)
            {
                (Some(green), Some(blue)) if !blue.is_zero() => {
                    let ratio = green.as_secs_f64() / blue.as_secs_f64();
                    // Green's p95 is above `above` × blue's p95 exactly when more than 5 % of
                    // green's requests are slower than that; test that proportion.
                    let limit = blue.mul_f64(trigger.above);
                    let samples: u64 = self.green.latency_counts.iter().sum();
                    let slower: u64 = self
                        .green
                        .latency_counts
                        .iter()
                        .enumerate()
                        .filter(|(index, _)| LatencyHistogram::bucket_value(*index) > limit)
                        .map(|(_, count)| count)
                        .sum();
                    if ratio > trigger.above
                        && proportion_exceeds(slower, samples, 0.05, confidence)
                    {
                        Reading::Fail(ratio)
                    } else {
                        Reading::Pass(ratio)
                    }
                }
                _ => Reading::NoVerdict("no latency samples on one of the colors".into()),
            },
            TriggerMetric::ConnectErrorRate
                if self.green.connect_attempts >= self.rollout.min_connects =>
            {
                absolute(self.green.connect_errors as f64 / self.green.connect_attempts as f64)
            }
            TriggerMetric::ConnectErrorRate => Reading::NoVerdict(format!(
                "green had {} of {} connect attempts",
                self.green.connect_attempts, self.rollout.min_connects
            )),
            _ => few_green(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn rollout(triggers: &str) -> RolloutConfig {
        let text = format!(
            "[blue]\nhost = \"127.0.0.1\"\nport = 5432\n[green]\nhost = \"127.0.0.1\"\nport = 5433\n[rollout]\nmin_requests = 100\nmin_connects = 10\nignore_sqlstates = [\"23\", \"40001\"]\n{triggers}"
        );
        crate::config::Config::from_toml_str(&text, std::path::Path::new("/tmp/x.toml"))
            .expect("config")
            .rollout
    }

    fn figures(requests: u64, errors: &[(&[u8; 5], u64)], latency_ms: u64) -> WindowFigures {
        let mut counts = vec![0u64; LatencyHistogram::bucket_index(Duration::from_secs(60)) + 1];
        counts[LatencyHistogram::bucket_index(Duration::from_millis(latency_ms))] = requests;
        let p = Some(LatencyHistogram::bucket_value(
            LatencyHistogram::bucket_index(Duration::from_millis(latency_ms)),
        ));
        WindowFigures {
            requests,
            errors: errors.iter().map(|(_, count)| count).sum(),
            latency_p50: p,
            latency_p95: p,
            latency_p99: p,
            latency_counts: counts,
            errors_by_sqlstate: errors
                .iter()
                .map(|(code, count)| (**code, *count))
                .collect::<HashMap<_, _>>(),
            ..WindowFigures::default()
        }
    }

    const ERROR_RATE: &str =
        "[[rollout.trigger]]\nmetric = \"error_rate\"\nabove = 0.05\naction = \"rollback\"\n";

    #[test]
    fn no_verdict_below_min_requests() {
        let config = rollout(ERROR_RATE);
        let evaluation = evaluate(
            &figures(50, &[(b"42P01", 50)], 1),
            &figures(1000, &[], 1),
            Duration::from_secs(2),
            &config,
        );
        assert!(
            matches!(evaluation.verdict, Verdict::NoVerdict(_)),
            "{evaluation:?}"
        );
    }

    #[test]
    fn ignored_and_in_failed_transaction_errors_do_not_count() {
        let config = rollout(ERROR_RATE);
        let green = figures(
            200,
            &[
                (b"23505", 50),
                (b"40001", 50),
                (b"25P02", 50),
                (b"42P01", 5),
            ],
            1,
        );
        let evaluation = evaluate(&green, &figures(0, &[], 1), Duration::from_secs(2), &config);
        assert_eq!(evaluation.green_errors, 5);
        assert_eq!(evaluation.verdict, Verdict::Pass);
        let broken = figures(200, &[(b"42P01", 20)], 1);
        let evaluation = evaluate(
            &broken,
            &figures(0, &[], 1),
            Duration::from_secs(2),
            &config,
        );
        assert_eq!(evaluation.verdict, Verdict::Fail);
        assert!(
            evaluation.triggers[0]
                .describe()
                .contains("error_rate 0.1 above 0.05"),
            "{}",
            evaluation.triggers[0].describe()
        );
    }

    #[test]
    fn blue_comparisons_need_blue_traffic_and_significance() {
        let config = rollout(
            "[[rollout.trigger]]\nmetric = \"error_rate_vs_blue\"\nabove = 0.01\naction = \"rollback\"\n",
        );
        let green = figures(1000, &[(b"42P01", 30)], 1);
        let quiet_blue = figures(10, &[], 1);
        let evaluation = evaluate(&green, &quiet_blue, Duration::from_secs(2), &config);
        assert!(matches!(
            evaluation.triggers[0].reading,
            Reading::NoVerdict(_)
        ));
        assert_eq!(
            evaluation.verdict,
            Verdict::Pass,
            "a quiet blue does not block the plan"
        );
        let erring_blue = figures(10_000, &[(b"42P01", 250)], 1);
        let evaluation = evaluate(&green, &erring_blue, Duration::from_secs(2), &config);
        assert!(
            matches!(evaluation.triggers[0].reading, Reading::Pass(_)),
            "{evaluation:?}"
        );
        let healthy_blue = figures(10_000, &[(b"42P01", 10)], 1);
        let much_worse = figures(1000, &[(b"42P01", 100)], 1);
        let evaluation = evaluate(&much_worse, &healthy_blue, Duration::from_secs(2), &config);
        assert_eq!(evaluation.verdict, Verdict::Fail);
    }

    #[test]
    fn latency_triggers() {
        let config = rollout(
            "[[rollout.trigger]]\nmetric = \"latency_p95_ms\"\nabove = 40\naction = \"pause\"\n[[rollout.trigger]]\nmetric = \"latency_p95_ratio\"\nabove = 3\naction = \"pause\"\n",
        );
        let slow_green = figures(500, &[], 55);
        let fast_blue = figures(5000, &[], 2);
        let evaluation = evaluate(&slow_green, &fast_blue, Duration::from_secs(2), &config);
        assert!(
            matches!(evaluation.triggers[0].reading, Reading::Fail(v) if (v - 55.0).abs() < 1.0),
            "{evaluation:?}"
        );
        assert!(
            matches!(evaluation.triggers[1].reading, Reading::Fail(v) if v > 20.0),
            "{evaluation:?}"
        );
        let evaluation = evaluate(
            &figures(500, &[], 3),
            &fast_blue,
            Duration::from_secs(2),
            &config,
        );
        assert_eq!(evaluation.verdict, Verdict::Pass);
    }

    #[test]
    fn connect_errors_need_min_connects_not_requests() {
        let config = rollout(
            "[[rollout.trigger]]\nmetric = \"connect_error_rate\"\nabove = 0.2\naction = \"rollback\"\n",
        );
        let mut refusing = figures(0, &[], 1);
        refusing.connect_attempts = 12;
        refusing.connect_errors = 12;
        let evaluation = evaluate(
            &refusing,
            &figures(0, &[], 1),
            Duration::from_secs(2),
            &config,
        );
        assert_eq!(evaluation.verdict, Verdict::Fail);
        refusing.connect_attempts = 5;
        refusing.connect_errors = 5;
        let evaluation = evaluate(
            &refusing,
            &figures(0, &[], 1),
            Duration::from_secs(2),
            &config,
        );
        assert!(matches!(evaluation.verdict, Verdict::NoVerdict(_)));
    }
}
