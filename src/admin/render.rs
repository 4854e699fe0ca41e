//! Human-readable text for admin replies, as `pgshift ctl` prints them without `--json`.
//!
//! Pure functions from the reply's JSON to text. They render what is present and tolerate
//! what is missing (a field the proxy did not send shows as `-`), so an older or newer proxy
//! still gets readable output.

use serde_json::{Map, Value};

use super::command::format_command;
use crate::controller::{Command, PinKey};

/// How many of the latest decisions `status` shows.
const STATUS_DECISIONS_SHOWN: usize = 5;

/// Shown for a missing or null value.
const MISSING: &str = "-";

/// The text for a successful reply (`ok: true`) to `command`, ending with a newline.
pub fn render_success(command: &Command, reply: &Map<String, Value>) -> String {
    match command {
        Command::Status => render_status(reply),
        other => format!("{}\n", summarize(other, reply)),
    }
}

/// One line: `ok: ` and the reply's fields. A `change` (or `message`) field is the controller's
/// own description of what happened (e.g. `green weight 0% → 40%`) and is all that is shown;
/// otherwise each field is shown, `green_weight` and `state` first.
pub fn summarize(command: &Command, reply: &Map<String, Value>) -> String {
    let description = ["change", "message"]
        .iter()
        .find_map(|name| reply.get(*name).and_then(Value::as_str));
    if let Some(description) = description {
        return format!("ok: {description}");
    }
    let mut parts = Vec::new();
    let mut shown: Vec<&str> = vec!["ok"];
    if let Some(weight) = reply.get("green_weight") {
        let now = format_weight(weight);
        match reply.get("previous_green_weight") {
            Some(before) => parts.push(format!("green weight {} → {now}", format_weight(before))),
            None => parts.push(format!("green weight {now}")),
        }
        shown.extend(["green_weight", "previous_green_weight"]);
    }
    if let Some(state) = reply.get("state") {
        let now = plain(state);
        match reply.get("previous_state") {
            Some(before) => parts.push(format!("state {} → {now}", plain(before))),
            None => parts.push(format!("state {now}")),
        }
        shown.extend(["state", "previous_state"]);
    }
    for (name, value) in reply {
        if !shown.contains(&name.as_str()) {
            parts.push(format!("{}: {}", name.replace('_', " "), listed(value)));
        }
    }
    if parts.is_empty() {
        format!("ok: {}", format_command(command))
    } else {
        format!("ok: {}", parts.join(", "))
    }
}

/// The `status` reply as a short report: the rollout, a per-color table, pins and decisions.
pub fn render_status(status: &Map<String, Value>) -> String {
    let mut out = String::new();
    let field = |name: &str| status.get(name).filter(|value| !value.is_null());
    let state = match (field("state"), field("reason")) {
        (Some(state), Some(reason)) => format!("{} ({})", plain(state), plain(reason)),
        (state, _) => state.map_or(MISSING.into(), plain),
    };
    let summary = [
        (
            "green weight",
            field("green_weight").map_or(MISSING.into(), format_weight),
        ),
        ("state", state),
        ("step", field("step").map_or(MISSING.into(), plain)),
        (
            "next step at",
            field("next_step_at").map_or(MISSING.into(), plain),
        ),
    ];
    for (label, value) in summary {
        out.push_str(&format!("{label:<14}{value}\n"));
    }

    let draining = |color: &str| {
        status
            .get("draining")
            .and_then(|draining| draining.get(color))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let window = field("window_seconds")
        .and_then(Value::as_f64)
        .map_or(String::new(), |seconds| {
            format!(" (last {})", format_number(seconds, 0) + "s")
        });
    let mut table = vec![vec![
        format!("color{window}"),
        "sessions".into(),
        "requests".into(),
        "error rate".into(),
        "p95 ms".into(),
        "connect errors".into(),
    ]];
    for color in ["blue", "green"] {
        let stats = status.get(color).and_then(Value::as_object);
        let stat = |name: &str| {
            stats
                .and_then(|stats| stats.get(name))
                .filter(|v| !v.is_null())
        };
        let name = if draining(color) {
            format!("{color} (draining)")
        } else {
            color.to_string()
        };
        table.push(vec![
            name,
            stat("sessions").map_or(MISSING.into(), plain),
            stat("requests").map_or(MISSING.into(), plain),
            stat("error_rate")
                .and_then(Value::as_f64)
                .map_or(MISSING.into(), |rate| {
                    format!("{}%", format_number(rate * 100.0, 2))
                }),
            stat("latency_p95_ms")
                .and_then(Value::as_f64)
                .map_or(MISSING.into(), |ms| format_number(ms, 1)),
            stat("connect_errors").map_or(MISSING.into(), plain),
        ]);
    }
    out.push('\n');
    out.push_str(&format_table(&table));

    out.push('\n');
    match status.get("pins").and_then(Value::as_array) {
        Some(pins) if !pins.is_empty() => {
            out.push_str("pins\n");
            for pin in pins {
                out.push_str(&format!("  {}\n", describe_pin(pin)));
            }
        }
        Some(_) => out.push_str("pins: none\n"),
        None => out.push_str(&format!("pins: {MISSING}\n")),
    }

    if let Some(cutover) = status.get("cutover").and_then(Value::as_object) {
        out.push_str(&format!("last cutover: {}\n", describe_cutover(cutover)));
    }

    match status.get("decisions").and_then(Value::as_array) {
        Some(decisions) if !decisions.is_empty() => {
            out.push_str("recent decisions (newest first)\n");
            for decision in decisions.iter().take(STATUS_DECISIONS_SHOWN) {
                out.push_str(&format!("  {}\n", describe_decision(decision)));
            }
        }
        Some(_) => out.push_str("recent decisions: none\n"),
        None => out.push_str(&format!("recent decisions: {MISSING}\n")),
    }
    out
}

/// `to green, completed at …: guardrails 12.1 ms, freeze 45.6 ms, …; 9 moved, 1 unmovable`.
fn describe_cutover(cutover: &Map<String, Value>) -> String {
    let text = |name: &str| cutover.get(name).map_or(MISSING.into(), plain);
    let steps: Vec<String> = cutover
        .get("steps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|step| {
            format!(
                "{} {} ms",
                step.get("step").map_or(MISSING.into(), plain),
                step.get("ms")
                    .and_then(Value::as_f64)
                    .map_or(MISSING.into(), |ms| format_number(ms, 1))
            )
        })
        .collect();
    let head = format!("to {}, {} at {}", text("to"), text("outcome"), text("at"));
    match cutover.get("details").and_then(Value::as_object) {
        Some(details) => {
            let count = |name: &str| {
                details
                    .get(name)
                    .map_or(MISSING.into(), |value| match value {
                        Value::Array(items) => items.len().to_string(),
                        other => plain(other),
                    })
            };
            format!(
                "{head}: {}; {} moved, {} unmovable, {} terminated",
                steps.join(", "),
                count("sessions_moved"),
                count("sessions_unmovable"),
                count("sessions_terminated")
            )
        }
        None => format!(
            "{head} (step {}): {}; {}",
            text("step"),
            text("reason"),
            steps.join(", ")
        ),
    }
}

/// `database=tenant_42 → green (config)`.
fn describe_pin(pin: &Value) -> String {
    let Some(pin) = pin.as_object() else {
        return plain(pin);
    };
    let keys: Vec<String> = PinKey::ALL
        .iter()
        .filter_map(|key| {
            pin.get(key.as_str())
                .map(|value| format!("{}={}", key.as_str(), plain(value)))
        })
        .collect();
    let keys = if keys.is_empty() {
        MISSING.to_string()
    } else {
        keys.join(" ")
    };
    let color = pin.get("color").map_or(MISSING.into(), plain);
    match pin.get("source") {
        Some(source) => format!("{keys} → {color} ({})", plain(source)),
        None => format!("{keys} → {color}"),
    }
}

/// `2026-11-29T09:59:00Z  weight  admin socket (uid 0): the reason`.
fn describe_decision(decision: &Value) -> String {
    let Some(decision) = decision.as_object() else {
        return plain(decision);
    };
    let part = |name: &str| decision.get(name).filter(|v| !v.is_null()).map(plain);
    let mut line = [part("time"), part("action"), part("actor")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("  ");
    if let Some(reason) = part("reason").filter(|reason| !reason.is_empty()) {
        if line.is_empty() {
            line = reason;
        } else {
            line.push_str(": ");
            line.push_str(&reason);
        }
    }
    line
}

/// Columns padded to their widest cell; the first left-aligned, the others right-aligned.
fn format_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, &width))| {
                if column == 0 {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A weight in percent (`25.0` → `25%`, `12.34` → `12.34%`).
fn format_weight(value: &Value) -> String {
    match value.as_f64() {
        Some(percent) => format!("{}%", format_number(percent, 2)),
        None => plain(value),
    }
}

/// At most `decimals` decimals, without trailing zeros.
fn format_number(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// Like [`plain`], but a list of strings or numbers as `a, b` (`none` when empty).
fn listed(value: &Value) -> String {
    match value {
        Value::Array(items) if items.is_empty() => "none".to_string(),
        Value::Array(items)
            if items
                .iter()
                .all(|item| item.is_string() || item.is_number()) =>
        {
            items.iter().map(plain).collect::<Vec<_>>().join(", ")
        }
        other => plain(other),
    }
}

/// Strings without quotes, null as `-`, everything else as compact JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => MISSING.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::Color;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn full_status() -> Map<String, Value> {
        object(json!({
            "green_weight": 25.0, "state": "running", "step": 2,
            "next_step_at": "2026-11-29T10:00:00Z",
            "draining": {"blue": false, "green": true},
            "blue": {"sessions": 3, "requests": 1200, "errors": 4, "error_rate": 0.0033,
                     "latency_p50_ms": 1.2, "latency_p95_ms": 3.4, "latency_p99_ms": 8.0,
                     "connect_errors": 0, "draining_sessions": 0},
            "green": {"sessions": 1, "requests": 10, "errors": 0, "error_rate": 0.0,
                      "latency_p50_ms": null, "latency_p95_ms": null, "latency_p99_ms": null,
                      "connect_errors": 2, "draining_sessions": 1},
            "pins": [{"database": "tenant_42", "color": "green", "source": "config"},
                     {"user": "batch", "application_name": "etl", "color": "blue"}],
            "decisions": [
                {"time": "t6", "action": "weight", "reason": "by hand", "actor": "admin socket (uid 0)"},
                {"time": "t5", "action": "a5", "reason": ""}, {"time": "t4", "action": "a4"},
                {"time": "t3", "action": "a3"}, {"time": "t2", "action": "a2"},
                {"time": "t1", "action": "a1"}
            ],
            "window_seconds": 120
        }))
    }

    #[test]
    fn status_shows_the_rollout_the_colors_pins_and_five_decisions() {
        let text = render_status(&full_status());
        assert!(text.contains("green weight  25%\n"), "{text}");
        assert!(text.contains("state         running\n"), "{text}");
        assert!(text.contains("step          2\n"), "{text}");
        assert!(
            text.contains("next step at  2026-11-29T10:00:00Z\n"),
            "{text}"
        );
        assert!(text.contains("color (last 120s)"), "{text}");
        let blue = text
            .lines()
            .find(|line| line.starts_with("blue"))
            .expect("a blue row");
        let blue_cells: Vec<&str> = blue.split_whitespace().collect();
        assert_eq!(
            blue_cells,
            ["blue", "3", "1200", "0.33%", "3.4", "0"],
            "{text}"
        );
        let green = text
            .lines()
            .find(|line| line.starts_with("green (draining)"))
            .expect("a green row");
        let green_cells: Vec<&str> = green.split_whitespace().collect();
        assert_eq!(
            green_cells,
            ["green", "(draining)", "1", "10", "0%", "-", "2"],
            "{text}"
        );
        assert!(
            text.contains("  database=tenant_42 → green (config)\n"),
            "{text}"
        );
        assert!(
            text.contains("  user=batch application_name=etl → blue\n"),
            "{text}"
        );
        assert!(
            text.contains("  t6  weight  admin socket (uid 0): by hand\n"),
            "{text}"
        );
        assert!(
            text.contains("  t5  a5\n") && text.contains("  t2  a2\n"),
            "{text}"
        );
        assert!(!text.contains("t1"), "only five decisions: {text}");
    }

    #[test]
    fn status_tolerates_missing_fields() {
        let text = render_status(&object(json!({"green_weight": 0, "step": null})));
        let paused = render_status(&object(
            json!({"state": "paused", "reason": "error_rate 0.07"}),
        ));
        assert!(
            paused.contains("state         paused (error_rate 0.07)\n"),
            "{paused}"
        );
        assert!(text.contains("green weight  0%\n"), "{text}");
        assert!(text.contains("state         -\n"), "{text}");
        assert!(text.contains("step          -\n"), "{text}");
        assert!(text.contains("pins: -"), "{text}");
        let blue: Vec<&str> = text
            .lines()
            .find(|line| line.starts_with("blue"))
            .expect("a blue row")
            .split_whitespace()
            .collect();
        assert_eq!(blue, ["blue", "-", "-", "-", "-", "-"]);
        let empty = render_status(&object(json!({"pins": [], "decisions": []})));
        assert!(empty.contains("pins: none") && empty.contains("recent decisions: none"));
    }

    #[test]
    fn the_last_cutover_is_one_line_with_its_steps() {
        let done = render_status(&object(json!({"cutover": {
            "to": "green", "outcome": "completed", "at": "2026-11-29T04:00:00Z",
            "steps": [{"step": "guardrails", "ms": 120.5}, {"step": "freeze", "ms": 45.6}],
            "details": {"sessions_moved": 9, "sessions_unmovable": ["temp table"], "sessions_terminated": 0}
        }})));
        assert!(
            done.contains("last cutover: to green, completed at 2026-11-29T04:00:00Z: guardrails 120.5 ms, freeze 45.6 ms; 9 moved, 1 unmovable, 0 terminated\n"),
            "{done}"
        );
        let aborted = render_status(&object(json!({"cutover": {
            "to": "green", "outcome": "aborted", "at": "t", "step": "freeze",
            "reason": "1 session(s) did not reach an idle point",
            "steps": [{"step": "freeze", "ms": 2000.0}]
        }})));
        assert!(
            aborted.contains("last cutover: to green, aborted at t (step freeze): 1 session(s) did not reach an idle point; freeze 2000 ms\n"),
            "{aborted}"
        );
        let never = render_status(&object(json!({"cutover": null})));
        assert!(!never.contains("last cutover"), "{never}");
    }

    #[test]
    fn other_replies_are_one_line() {
        let weight = Command::Weight { basis_points: 4000 };
        let reply =
            object(json!({"previous_green_weight": 0.0, "green_weight": 40.0, "state": "manual"}));
        assert_eq!(
            summarize(&weight, &reply),
            "ok: green weight 0% → 40%, state manual"
        );
        let reply =
            object(json!({"green_weight": 12.34, "previous_state": "running", "state": "paused"}));
        assert_eq!(
            summarize(&Command::RolloutPause, &reply),
            "ok: green weight 12.34%, state running → paused"
        );
        let reply = object(json!({
            "change": "green weight 0% → 40% (state running → manual)",
            "green_weight": 40.0, "state": "manual"
        }));
        assert_eq!(
            summarize(&weight, &reply),
            "ok: green weight 0% → 40% (state running → manual)"
        );
        let reply = object(
            json!({"check": "passed", "checks": ["green is not draining", "lag 0"], "skipped": []}),
        );
        assert_eq!(
            summarize(
                &Command::Promote {
                    check_only: true,
                    force: false
                },
                &reply
            ),
            "ok: check: passed, checks: green is not draining, lag 0, skipped: none"
        );
        let reply = object(json!({"nested": {"a": 1}}));
        assert_eq!(summarize(&Command::Reload, &reply), "ok: nested: {\"a\":1}");
        assert_eq!(
            summarize(&Command::Drain(Color::Green), &Map::new()),
            "ok: drain green"
        );
        assert_eq!(
            render_success(&Command::RolloutStart, &Map::new()),
            "ok: rollout start\n"
        );
    }

    #[test]
    fn numbers_lose_trailing_zeros() {
        assert_eq!(format_number(25.0, 2), "25");
        assert_eq!(format_number(12.5, 2), "12.5");
        assert_eq!(format_number(0.33, 2), "0.33");
        assert_eq!(format_number(0.0, 2), "0");
        assert_eq!(format_number(120.0, 0), "120");
    }
}
