//! The `status` reply: routing state, per-color figures over the window, pins, decisions.

use serde_json::{Map, Value, json};

use super::state::RoutingState;
use super::window::{StatsWindow, WindowFigures};
use crate::color::Color;
use crate::config::Config;
use crate::proxy::registry::SessionRegistry;

/// One action the controller took, for logs, `status.decisions` and the decision log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    /// Sequence number: decisions are numbered from 1 in the order they were taken.
    pub id: u64,
    /// RFC 3339.
    pub time: String,
    pub action: String,
    pub reason: String,
    pub actor: String,
}

/// Decisions `status` shows, newest first.
pub const STATUS_DECISIONS: usize = 100;

fn milliseconds(latency: Option<std::time::Duration>) -> Value {
    latency.map_or(Value::Null, |latency| json!(latency.as_secs_f64() * 1000.0))
}

fn color_figures(figures: &WindowFigures, draining_sessions: usize) -> Value {
    json!({
        "sessions": figures.sessions,
        "requests": figures.requests,
        "errors": figures.errors,
        "error_rate": figures.error_rate(),
        "latency_p50_ms": milliseconds(figures.latency_p50),
        "latency_p95_ms": milliseconds(figures.latency_p95),
        "latency_p99_ms": milliseconds(figures.latency_p99),
        "connect_errors": figures.connect_errors,
        "connect_attempts": figures.connect_attempts,
        "draining_sessions": draining_sessions,
    })
}

/// Builds the `status` reply's fields.
pub fn status(
    state: &RoutingState,
    config: &Config,
    window: &StatsWindow,
    sessions: &SessionRegistry,
    decisions: &std::collections::VecDeque<Decision>,
    store: &str,
) -> Map<String, Value> {
    let mut reply = Map::new();
    reply.insert(
        "green_weight".into(),
        json!(f64::from(state.green_weight_bp) / 100.0),
    );
    reply.insert("state".into(), json!(state.rollout.as_str()));
    reply.insert("step".into(), json!(state.step));
    reply.insert("reason".into(), json!(state.reason));
    reply.insert(
        "draining".into(),
        json!({"blue": state.draining[Color::Blue.index()], "green": state.draining[Color::Green.index()]}),
    );
    for color in Color::ALL {
        let (figures, _) = window.figures(color);
        let draining_sessions = if state.draining[color.index()] {
            sessions.count(Some(color))
        } else {
            0
        };
        reply.insert(
            color.as_str().into(),
            color_figures(&figures, draining_sessions),
        );
    }
    let mut pins: Vec<Value> = Vec::new();
    for pin in &state.admin_pins {
        pins.push(pin_json(pin, "admin"));
    }
    for pin in &config.routing.pins {
        pins.push(pin_json(&crate::routing::Pin::from(pin), "config"));
    }
    reply.insert("pins".into(), Value::Array(pins));
    let recent: Vec<Value> = decisions
        .iter()
        .rev()
        .take(STATUS_DECISIONS)
        .map(|decision| serde_json::to_value(decision).unwrap_or(Value::Null))
        .collect();
    reply.insert("decisions".into(), Value::Array(recent));
    reply.insert(
        "window_seconds".into(),
        json!(window.window().as_secs_f64()),
    );
    reply.insert("state_store".into(), json!(store));
    reply
}

fn pin_json(pin: &crate::routing::Pin, source: &str) -> Value {
    let mut value = serde_json::to_value(pin).unwrap_or_else(|_| json!({}));
    if let Value::Object(fields) = &mut value {
        fields.insert("source".into(), json!(source));
    }
    value
}
