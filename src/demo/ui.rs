//! The demo's terminal output: section headers, notes, decisions, and the live view of the
//! rollout — the step plan as a progress bar, green's weight, and per color the requests per
//! second, error rate and p95 latency over the controller's window.
//!
//! Every figure comes from the controller's `status` reply ([`Frame::from_status`]), the same
//! one `pgshift ctl status` prints. On a terminal (`std::io::IsTerminal`) the view is a block
//! redrawn in place; otherwise (a pipe, a CI log) it is one line per second. Messages printed
//! while the view is up go above it. Rendering is pure ([`render_block`], [`render_line`]).

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

/// Width of the weight bar, in cells.
const BAR_WIDTH: usize = 30;
/// How often the one-line view prints when the output is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// One color's figures over the window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ColorFigures {
    pub requests_per_second: f64,
    pub error_rate: Option<f64>,
    pub p95_ms: Option<f64>,
    pub sessions: i64,
}

/// What one redraw shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    pub elapsed: Duration,
    pub state: String,
    pub green_weight: f64,
    /// Index into `steps` while a rollout runs.
    pub step: Option<usize>,
    pub steps: Vec<u16>,
    pub next_step_in: Option<Duration>,
    pub blue: ColorFigures,
    pub green: ColorFigures,
    /// The application's successful operations and failures so far.
    pub app_operations: u64,
    pub app_errors: u64,
}

fn color_figures(value: &Value, window_seconds: f64) -> ColorFigures {
    let requests = value["requests"].as_f64().unwrap_or(0.0);
    ColorFigures {
        requests_per_second: if window_seconds > 0.0 {
            requests / window_seconds
        } else {
            0.0
        },
        error_rate: value["error_rate"].as_f64(),
        p95_ms: value["latency_p95_ms"].as_f64(),
        sessions: value["sessions"].as_i64().unwrap_or(0),
    }
}

impl Frame {
    /// The frame for a `status` reply.
    pub fn from_status(status: &Map<String, Value>, steps: &[u16], now: SystemTime) -> Frame {
        let window_seconds = status
            .get("window_seconds")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let next_step_in = status
            .get("next_step_at")
            .and_then(Value::as_str)
            .and_then(|at| humantime::parse_rfc3339(at).ok())
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO));
        Frame {
            elapsed: Duration::ZERO,
            state: status
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
            green_weight: status
                .get("green_weight")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            step: status
                .get("step")
                .and_then(Value::as_u64)
                .map(|step| step as usize),
            steps: steps.to_vec(),
            next_step_in,
            blue: status
                .get("blue")
                .map(|blue| color_figures(blue, window_seconds))
                .unwrap_or_default(),
            green: status
                .get("green")
                .map(|green| color_figures(green, window_seconds))
                .unwrap_or_default(),
            app_operations: 0,
            app_errors: 0,
        }
    }
}

/// The step plan: `■` for the steps green has reached, `□` for the others, the current step
/// in brackets.
pub fn step_plan(frame: &Frame) -> String {
    let parts: Vec<String> = frame
        .steps
        .iter()
        .enumerate()
        .map(|(index, weight)| {
            let reached = frame.green_weight >= f64::from(*weight) - 1e-9;
            let mark = if reached { '■' } else { '□' };
            if frame.step == Some(index) {
                format!("[{mark} {weight}]")
            } else {
                format!(" {mark} {weight} ")
            }
        })
        .collect();
    format!("{} %", parts.join(""))
}

/// Green's weight as a bar of [`BAR_WIDTH`] cells.
pub fn weight_bar(green_weight: f64) -> String {
    let filled = ((green_weight / 100.0) * BAR_WIDTH as f64)
        .round()
        .clamp(0.0, BAR_WIDTH as f64) as usize;
    format!("{}{}", "█".repeat(filled), "░".repeat(BAR_WIDTH - filled))
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(
        || "   -  ".to_string(),
        |rate| format!("{:5.2}%", rate * 100.0),
    )
}

fn milliseconds(value: Option<f64>) -> String {
    value.map_or_else(|| "    -   ".to_string(), |ms| format!("{ms:6.1}ms"))
}

fn step_text(frame: &Frame) -> String {
    let mut text = match frame.step {
        Some(step) => format!("step {}/{}", step + 1, frame.steps.len()),
        None => "no step".to_string(),
    };
    if frame.state == "running"
        && let Some(next) = frame.next_step_in
    {
        text.push_str(&format!(", next in {:.0}s", next.as_secs_f64().ceil()));
    }
    text
}

fn elapsed(frame: &Frame) -> String {
    let seconds = frame.elapsed.as_secs();
    format!("{}:{:02}", seconds / 60, seconds % 60)
}

/// The block redrawn in place on a terminal.
pub fn render_block(frame: &Frame) -> Vec<String> {
    let color = |name: &str, figures: &ColorFigures| {
        format!(
            "  {name:<6} {:7.1} req/s   errors {}   p95 {}   sessions {:3}",
            figures.requests_per_second,
            percent(figures.error_rate),
            milliseconds(figures.p95_ms),
            figures.sessions
        )
    };
    vec![
        format!(
            "  plan  {}  {}, {}",
            step_plan(frame),
            frame.state,
            step_text(frame)
        ),
        format!(
            "  green {} {:6.2}% of new sessions",
            weight_bar(frame.green_weight),
            frame.green_weight
        ),
        color("blue", &frame.blue),
        color("green", &frame.green),
        format!(
            "  app    {} operations ok, {} errors seen   [{}]",
            frame.app_operations,
            frame.app_errors,
            elapsed(frame)
        ),
    ]
}

/// The line printed once per second when the output is not a terminal.
pub fn render_line(frame: &Frame) -> String {
    let color = |figures: &ColorFigures| {
        format!(
            "{:.0} req/s err {} p95 {}",
            figures.requests_per_second,
            percent(figures.error_rate).trim(),
            milliseconds(figures.p95_ms).trim()
        )
    };
    format!(
        "  [{}] {} {} green {:.2}% | blue {} | green {} | app {} ok {} errors",
        elapsed(frame),
        frame.state,
        step_text(frame),
        frame.green_weight,
        color(&frame.blue),
        color(&frame.green),
        frame.app_operations,
        frame.app_errors
    )
}

/// The demo's stdout.
pub struct LiveView {
    tty: bool,
    /// Lines of the live block on screen (terminal only).
    drawn: usize,
    last_line: Option<Instant>,
}

impl Default for LiveView {
    fn default() -> Self {
        LiveView::new()
    }
}

impl LiveView {
    pub fn new() -> LiveView {
        LiveView {
            tty: std::io::stdout().is_terminal(),
            drawn: 0,
            last_line: None,
        }
    }

    /// Takes the live block off the screen (terminal only).
    fn clear(&mut self, out: &mut impl std::io::Write) {
        if self.drawn > 0 {
            let _ = write!(out, "\x1b[{}F\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    /// Prints `text` (one or more lines) above the live view.
    pub fn message(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        self.clear(&mut out);
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }

    /// A section header.
    pub fn section(&mut self, number: &str, title: &str) {
        let rule = if self.tty { "\x1b[1m" } else { "" };
        let reset = if self.tty { "\x1b[0m" } else { "" };
        self.message(&format!("\n{rule}{number}  {title}{reset}"));
    }

    /// Shows `frame`: redrawn in place on a terminal, else one line per second.
    pub fn update(&mut self, frame: &Frame) {
        let mut out = std::io::stdout().lock();
        if self.tty {
            self.clear(&mut out);
            let lines = render_block(frame);
            for line in &lines {
                let _ = writeln!(out, "{line}");
            }
            self.drawn = lines.len();
        } else if self
            .last_line
            .is_none_or(|last| last.elapsed() >= LINE_EVERY)
        {
            self.last_line = Some(Instant::now());
            let _ = writeln!(out, "{}", render_line(frame));
        }
        let _ = out.flush();
    }

    /// Leaves the last frame on screen: the next message goes below it.
    pub fn settle(&mut self) {
        self.drawn = 0;
        self.last_line = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Map<String, Value> {
        let value = json!({
            "state": "running",
            "green_weight": 25.0,
            "step": 1,
            "window_seconds": 4.0,
            "next_step_at": "2030-01-01T00:00:10Z",
            "blue": {"requests": 400, "error_rate": 0.0, "latency_p95_ms": 2.5, "sessions": 6},
            "green": {"requests": 100, "error_rate": 0.25, "latency_p95_ms": null, "sessions": 2},
        });
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn a_status_reply_becomes_a_frame() {
        let now = humantime::parse_rfc3339("2030-01-01T00:00:07Z").expect("time");
        let frame = Frame::from_status(&status(), &[10, 25, 50, 75, 100], now);
        assert_eq!(frame.state, "running");
        assert_eq!(frame.step, Some(1));
        assert_eq!(frame.next_step_in, Some(Duration::from_secs(3)));
        assert_eq!(frame.blue.requests_per_second, 100.0);
        assert_eq!(frame.green.requests_per_second, 25.0);
        assert_eq!(frame.green.error_rate, Some(0.25));
        assert_eq!(frame.green.p95_ms, None);
        assert_eq!(frame.green.sessions, 2);
    }

    #[test]
    fn the_plan_marks_reached_steps_and_the_current_one() {
        let frame = Frame::from_status(&status(), &[10, 25, 50], SystemTime::UNIX_EPOCH);
        assert_eq!(step_plan(&frame), " ■ 10 [■ 25] □ 50  %");
        assert_eq!(weight_bar(0.0), "░".repeat(BAR_WIDTH));
        assert_eq!(weight_bar(100.0), "█".repeat(BAR_WIDTH));
        assert_eq!(
            weight_bar(50.0).chars().filter(|c| *c == '█').count(),
            BAR_WIDTH / 2
        );
    }

    #[test]
    fn the_block_fits_80_columns() {
        let mut frame =
            Frame::from_status(&status(), &[10, 25, 50, 75, 100], SystemTime::UNIX_EPOCH);
        frame.step = Some(4);
        frame.next_step_in = Some(Duration::from_secs(300));
        frame.elapsed = Duration::from_secs(5999);
        frame.app_operations = 99_999_999;
        frame.app_errors = 9_999_999;
        frame.blue.requests_per_second = 99_999.9;
        frame.blue.p95_ms = Some(99_999.9);
        frame.blue.sessions = 9999;
        for line in render_block(&frame) {
            assert!(
                line.chars().count() <= 80,
                "{} columns: {line}",
                line.chars().count()
            );
        }
    }

    #[test]
    fn the_line_and_the_block_carry_every_figure() {
        let mut frame = Frame::from_status(&status(), &[10, 25, 50], SystemTime::UNIX_EPOCH);
        frame.elapsed = Duration::from_secs(75);
        frame.app_operations = 1234;
        let line = render_line(&frame);
        for part in [
            "[1:15]",
            "running",
            "step 2/3",
            "green 25.00%",
            "blue 100 req/s err 0.00%",
            "p95 2.5ms",
            "err 25.00%",
            "1234 ok",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
        let block = render_block(&frame).join("\n");
        for part in [
            "running",
            "25.00% of new sessions",
            "100.0 req/s",
            "25.00%",
            "1234 operations",
        ] {
            assert!(block.contains(part), "{part} in {block}");
        }
    }
}
