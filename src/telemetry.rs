//! Prometheus metrics and the health check: `GET /metrics` and `GET /healthz` on
//! `[metrics] addr`, served by a tiny HTTP/1.1 listener of pgshift's own.
//!
//! A scrape is made of two sources:
//!
//! - the `metrics` crate's global recorder ([`prometheus_handle`] installs it once per
//!   process, without the exporter's own HTTP listener, which would answer every path with the
//!   metrics). It holds what the controller and the sessions set through the `metrics` macros:
//!   weight, rollout state, decisions, draining sessions, cancels, rejected clients.
//! - [`crate::stats`]: the cumulative per-color atomics the sessions keep anyway. They are read
//!   only when `/metrics` is scraped ([`scrape`]), so exporting them adds nothing to the
//!   per-request path. Counters go into the recorder with `Counter::absolute`, so the stats
//!   are the one source of truth for them; the request-latency histogram is converted from
//!   pgshift's fine-grained histogram into the contract's Prometheus buckets and appended as
//!   text, because the exporter cannot take pre-bucketed data.
//!
//! The recorder is process-wide: when several proxies run in one process (tests), a scrape
//! sets the shared gauges from the scraped proxy's stats, and counters show the largest value
//! any of them reached (`absolute` never lowers a counter). `pgshift run` has one proxy.
//!
//! The HTTP side answers one request per connection (`Connection: close`), reads at most
//! [`MAX_REQUEST_HEAD`] bytes of request head within [`READ_TIMEOUT`], and never panics on
//! input: the request head is parsed by the pure [`parse_request_head`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::color::Color;
use crate::controller::store::RolloutState;
use crate::proxy::Shared;
use crate::stats::{ColorSnapshot, LatencyHistogram, Stats};

/// Largest request head (request line and headers) accepted; larger gets 400.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// The whole request head must arrive within this (slow clients get 408 and are closed).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Writing a response (and the lingering close after it) must finish within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at accept (a scraper needs one or two).
const MAX_CONNECTIONS: usize = 64;
/// Unread request bytes drained after a response so the close is a FIN, not a RST that could
/// destroy the response in flight.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// The upper bounds of `pgshift_request_duration_seconds`' buckets (`+Inf` comes after): the
/// `le` label as written, and the bound in nanoseconds, so that assigning a latency to a bucket
/// is an exact integer comparison.
pub const DURATION_BUCKETS: [(&str, u128); 16] = [
    ("0.0005", 500_000),
    ("0.001", 1_000_000),
    ("0.0025", 2_500_000),
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
    ("10", 10_000_000_000),
    ("30", 30_000_000_000),
    ("60", 60_000_000_000),
];

const DURATION_METRIC: &str = "pgshift_request_duration_seconds";
const DURATION_HELP: &str = "Request latency: ReadyForQuery time minus the later of the request's first byte and the previous ReadyForQuery (COPY requests and requests ended by a lost connection give no sample)";

/// The rollout actions known today: `Command::verb` of every command the controller records,
/// then the rollout monitor's own. Any other appears when first taken.
const KNOWN_ACTIONS: [&str; 18] = [
    "weight",
    "rollout start",
    "rollout next",
    "rollout pause",
    "rollout resume",
    "promote",
    "cutover abort",
    "rollback",
    "pin",
    "unpin",
    "drain",
    "undrain",
    "reload",
    "warn",
    "pause",
    "advance",
    "stall",
    "resume",
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed (and every contract metric described and
/// registered) on the first call; later calls return the same handle.
///
/// Call it before anything records a metric: values recorded before the install are lost.
pub fn prometheus_handle() -> PrometheusHandle {
    HANDLE.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let bounds: Vec<f64> = DURATION_BUCKETS
        .iter()
        .map(|(_, nanos)| *nanos as f64 / 1e9)
        .collect();
    // Any `histogram!` recorded later renders as a real histogram (not a summary) with the
    // contract's buckets. The bounds are never empty, so this does not fail.
    let builder = PrometheusBuilder::new()
        .set_buckets(&bounds)
        .unwrap_or_else(|_| PrometheusBuilder::new());
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(error) = metrics::set_global_recorder(recorder) {
        tracing::warn!(
            %error,
            "another metrics recorder is installed in this process: /metrics will miss what is recorded through it"
        );
    }
    describe_and_register();
    handle
}

/// Describes every contract metric and registers each with its known label values, so that
/// `/metrics` lists them all from the start (at zero). Registering does not change a value
/// already set.
fn describe_and_register() {
    describe_gauge!(
        "pgshift_green_weight_ratio",
        "Share of new sessions routed to green by the weight, 0..1"
    );
    gauge!("pgshift_green_weight_ratio").increment(0.0);

    describe_gauge!(
        "pgshift_rollout_state",
        "1 for the rollout's current state, 0 for the others"
    );
    for state in RolloutState::ALL {
        gauge!("pgshift_rollout_state", "state" => state.as_str()).increment(0.0);
    }

    describe_gauge!(
        "pgshift_cutover_freeze_seconds",
        Unit::Seconds,
        "The last transparent cutover's freeze: from holding new logins to every old-color session frozen"
    );
    describe_gauge!(
        "pgshift_cutover_catchup_seconds",
        Unit::Seconds,
        "The last transparent cutover's catch-up: the marker written on the old color until seen on the new"
    );
    describe_counter!(
        "pgshift_cutover_sessions_moved_total",
        Unit::Count,
        "Sessions a transparent cutover moved to the new color"
    );
    describe_counter!(
        "pgshift_cutover_sessions_unmovable_total",
        Unit::Count,
        "Sessions a transparent cutover closed with 57P01 (state it cannot carry, or a transaction past freeze_timeout)"
    );
    describe_gauge!(
        "pgshift_cutover_held_requests",
        Unit::Count,
        "Sessions frozen by the transparent cutover under way, their next request held (0 outside one)"
    );
    describe_counter!(
        "pgshift_cutovers_total",
        Unit::Count,
        "Transparent cutovers by outcome: completed, aborted (freeze, catch-up, cutover abort), refused (guardrails)"
    );
    gauge!("pgshift_cutover_held_requests").increment(0.0);
    for outcome in ["completed", "aborted", "refused"] {
        counter!("pgshift_cutovers_total", "outcome" => outcome).increment(0);
    }
    gauge!("pgshift_cutover_freeze_seconds").increment(0.0);
    gauge!("pgshift_cutover_catchup_seconds").increment(0.0);
    counter!("pgshift_cutover_sessions_moved_total").increment(0);
    counter!("pgshift_cutover_sessions_unmovable_total").increment(0);

    describe_gauge!(
        "pgshift_client_sessions",
        Unit::Count,
        "Client sessions open now, by the color serving them"
    );
    describe_counter!(
        "pgshift_client_sessions_opened_total",
        Unit::Count,
        "Client sessions opened (routed and connected), by color"
    );
    describe_counter!(
        "pgshift_backend_connect_errors_total",
        Unit::Count,
        "Failed backend connects: TCP/TLS failure, no Authentication message within connect_timeout, or an ErrorResponse before the first ReadyForQuery"
    );
    describe_counter!(
        "pgshift_requests_total",
        Unit::Count,
        "Requests completed (a Simple Query, an extended-protocol batch ending in Sync, or a FunctionCall)"
    );
    describe_counter!(
        "pgshift_request_errors_total",
        Unit::Count,
        "Requests answered with an ErrorResponse (or ended by a lost connection: 08006), by SQLSTATE class"
    );
    describe_counter!(
        "pgshift_bytes_total",
        Unit::Bytes,
        "Bytes relayed between clients and backends (the startup packet aside), by color and direction"
    );
    describe_counter!(
        "pgshift_fallbacks_total",
        Unit::Count,
        "Sessions sent to blue because their green connect failed (fallback_on_connect_error)"
    );
    for color in Color::ALL {
        let color = color.as_str();
        gauge!("pgshift_client_sessions", "color" => color).increment(0.0);
        counter!("pgshift_client_sessions_opened_total", "color" => color).increment(0);
        counter!("pgshift_backend_connect_errors_total", "color" => color).increment(0);
        counter!("pgshift_requests_total", "color" => color).increment(0);
        // Class 08 (connection exception) is the one pgshift records itself (08006 for a
        // request whose connection was lost); other classes appear with their first error.
        counter!("pgshift_request_errors_total", "color" => color, "sqlstate_class" => "08")
            .increment(0);
        for direction in ["to_backend", "to_client"] {
            counter!("pgshift_bytes_total", "color" => color, "direction" => direction)
                .increment(0);
        }
    }
    counter!("pgshift_fallbacks_total").increment(0);

    describe_counter!(
        "pgshift_rollout_decisions_total",
        Unit::Count,
        "Rollout decisions taken (operator commands, reloads and the rollout monitor's), by action"
    );
    for action in KNOWN_ACTIONS {
        counter!("pgshift_rollout_decisions_total", "action" => action).increment(0);
    }

    describe_counter!(
        "pgshift_cancel_requests_total",
        Unit::Count,
        "CancelRequests received: forwarded to a backend, unknown key (dropped), or failed to forward"
    );
    for result in ["forwarded", "unknown", "failed"] {
        counter!("pgshift_cancel_requests_total", "result" => result).increment(0);
    }

    describe_counter!(
        "pgshift_clients_rejected_total",
        Unit::Count,
        "Clients refused after their StartupMessage: max_clients (53300), shutdown (57P03), routing (no color may take them), tls_required and channel_binding (28000), auth_failed (28P01), auth_mismatch (28000)"
    );
    for reason in [
        "max_clients",
        "shutdown",
        "routing",
        "tls_required",
        "channel_binding",
        "auth_failed",
        "auth_mismatch",
    ] {
        counter!("pgshift_clients_rejected_total", "reason" => reason).increment(0);
    }

    describe_gauge!(
        "pgshift_draining_sessions",
        Unit::Count,
        "Sessions still open on a draining color (0 when the color is not draining)"
    );
    for color in Color::ALL {
        gauge!("pgshift_draining_sessions", "color" => color.as_str()).increment(0.0);
    }

    describe_gauge!(
        "pgshift_replication_lag",
        "Replication lag from [rollout] lag_query (its unit: bytes or seconds); NaN while not measured"
    );
    gauge!("pgshift_replication_lag").set(f64::NAN);
}

/// The `/metrics` body for `shared`: the stats exported into the recorder, the recorder's
/// rendering, and the request-duration histograms.
pub fn scrape(handle: &PrometheusHandle, shared: &Shared) -> String {
    let snapshots = Color::ALL.map(|color| (color, shared.stats.color(color).snapshot()));
    export_stats(&snapshots, &shared.stats);
    handle.run_upkeep();
    let mut text = handle.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    render_duration_histograms(&mut text, &snapshots);
    text
}

/// Copies the cumulative stats into the recorder (scrape time only).
fn export_stats(snapshots: &[(Color, ColorSnapshot); 2], stats: &Stats) {
    let mut fallbacks = 0u64;
    for (color, snapshot) in snapshots {
        let color = color.as_str();
        gauge!("pgshift_client_sessions", "color" => color).set(snapshot.sessions_open as f64);
        counter!("pgshift_client_sessions_opened_total", "color" => color)
            .absolute(snapshot.sessions_opened);
        counter!("pgshift_backend_connect_errors_total", "color" => color)
            .absolute(snapshot.connect_errors);
        counter!("pgshift_requests_total", "color" => color).absolute(snapshot.requests);
        counter!("pgshift_bytes_total", "color" => color, "direction" => "to_backend")
            .absolute(snapshot.bytes_to_backend);
        counter!("pgshift_bytes_total", "color" => color, "direction" => "to_client")
            .absolute(snapshot.bytes_to_client);
        for (class, count) in errors_by_class(&snapshot.errors_by_sqlstate) {
            counter!("pgshift_request_errors_total", "color" => color, "sqlstate_class" => class)
                .absolute(count);
        }
        fallbacks = fallbacks.saturating_add(snapshot.fallbacks);
    }
    counter!("pgshift_fallbacks_total").absolute(fallbacks);
    for (result, count) in [
        ("forwarded", &stats.cancel_forwarded),
        ("unknown", &stats.cancel_unknown),
        ("failed", &stats.cancel_failed),
    ] {
        counter!("pgshift_cancel_requests_total", "result" => result)
            .absolute(count.load(Ordering::Relaxed));
    }
}

/// A SQLSTATE's class: its first two characters. Codes are digits and upper-case letters;
/// anything else a backend might send is reported as class `invalid`, so a label value is
/// always plain.
pub fn sqlstate_class(sqlstate: &[u8; 5]) -> String {
    let class = [sqlstate[0], sqlstate[1]];
    if class.iter().all(u8::is_ascii_alphanumeric) {
        class
            .iter()
            .map(|byte| char::from(byte.to_ascii_uppercase()))
            .collect()
    } else {
        "invalid".to_string()
    }
}

/// Error counts by SQLSTATE summed per class.
pub fn errors_by_class(errors: &HashMap<[u8; 5], u64>) -> BTreeMap<String, u64> {
    let mut classes = BTreeMap::new();
    for (sqlstate, count) in errors {
        let total: &mut u64 = classes.entry(sqlstate_class(sqlstate)).or_default();
        *total = total.saturating_add(*count);
    }
    classes
}

/// A request-duration histogram in the contract's buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationHistogram {
    /// Cumulative counts: one per [`DURATION_BUCKETS`] bound, then `+Inf`.
    pub cumulative: [u64; DURATION_BUCKETS.len() + 1],
    /// Sum of the samples, in seconds.
    pub sum_seconds: f64,
    /// Number of samples (equals the `+Inf` bucket).
    pub count: u64,
}

/// Converts pgshift's fine-grained latency counts ([`ColorSnapshot::latency_counts`]) into the
/// contract's Prometheus buckets.
///
/// Each fine bucket goes whole into the first Prometheus bucket whose bound is at or above the
/// fine bucket's midpoint ([`LatencyHistogram::bucket_value`]). Fine buckets are at most 1.6 %
/// wide, so only a latency within 0.8 % of a bound can land one bucket off; `_sum` adds up
/// the midpoints (count × midpoint), so it is within 1 % of the true sum.
pub fn duration_histogram(latency_counts: &[u64]) -> DurationHistogram {
    let mut per_bucket = [0u64; DURATION_BUCKETS.len() + 1];
    let mut sum_nanos: u128 = 0;
    for (index, &count) in latency_counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let midpoint = LatencyHistogram::bucket_value(index).as_nanos();
        let slot = DURATION_BUCKETS
            .iter()
            .position(|&(_, bound)| midpoint <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        per_bucket[slot] = per_bucket[slot].saturating_add(count);
        sum_nanos = sum_nanos.saturating_add(u128::from(count) * midpoint);
    }
    let mut cumulative = per_bucket;
    let mut running = 0u64;
    for slot in cumulative.iter_mut() {
        running = running.saturating_add(*slot);
        *slot = running;
    }
    DurationHistogram {
        cumulative,
        sum_seconds: sum_nanos as f64 / 1e9,
        count: running,
    }
}

/// Appends `pgshift_request_duration_seconds` (HELP, TYPE, then `_bucket`, `_sum`, `_count`
/// per color) in the Prometheus text format.
fn render_duration_histograms(out: &mut String, snapshots: &[(Color, ColorSnapshot); 2]) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP {DURATION_METRIC} {DURATION_HELP}");
    let _ = writeln!(out, "# TYPE {DURATION_METRIC} histogram");
    for (color, snapshot) in snapshots {
        let histogram = duration_histogram(&snapshot.latency_counts);
        let bounds = DURATION_BUCKETS
            .iter()
            .map(|&(label, _)| label)
            .chain(["+Inf"]);
        for (le, count) in bounds.zip(histogram.cumulative) {
            let _ = writeln!(
                out,
                "{DURATION_METRIC}_bucket{{color=\"{color}\",le=\"{le}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "{DURATION_METRIC}_sum{{color=\"{color}\"}} {}",
            histogram.sum_seconds
        );
        let _ = writeln!(
            out,
            "{DURATION_METRIC}_count{{color=\"{color}\"}} {}",
            histogram.count
        );
    }
    out.push('\n');
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// The request methods pgshift tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Any other well-formed method: 405.
    Other,
}

/// What pgshift needs of a request: its method and path (the query string removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: Method,
    pub path: &'a str,
}

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// Not HTTP (400), with what was wrong.
    Malformed(&'static str),
    /// HTTP, but not 1.0 or 1.1 (505).
    UnsupportedVersion,
}

/// Where the request head in `buffer` ends (just after its blank line), if it is complete.
/// Lines end with CRLF or, leniently, a bare LF.
pub fn head_end(buffer: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (at, &byte) in buffer.iter().enumerate() {
        if byte == b'\n' {
            let line = &buffer[line_start..at];
            if (line.is_empty() || line == b"\r") && line_start > 0 {
                return Some(at + 1);
            }
            line_start = at + 1;
        }
    }
    None
}

/// Parses a complete request head (request line, header lines, blank line). Header values are
/// not needed and not kept, but each header line must be `name: value`.
pub fn parse_request_head(head: &[u8]) -> Result<Request<'_>, BadRequest> {
    let mut lines = head
        .split(|&byte| byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request = parse_request_line(lines.next().unwrap_or_default())?;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            return Err(BadRequest::Malformed("a header line without a colon"));
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().copied().all(is_token_byte) {
            // Also refuses obsolete line folding (a line starting with whitespace).
            return Err(BadRequest::Malformed("an invalid header name"));
        }
        if line[colon + 1..]
            .iter()
            .any(|&byte| byte == b'\r' || byte == 0)
        {
            return Err(BadRequest::Malformed(
                "a control character in a header value",
            ));
        }
    }
    Ok(request)
}

/// Parses `METHOD SP request-target SP HTTP-version` (without its line end).
pub fn parse_request_line(line: &[u8]) -> Result<Request<'_>, BadRequest> {
    let text = std::str::from_utf8(line)
        .map_err(|_| BadRequest::Malformed("the request line is not ASCII"))?;
    if !text
        .bytes()
        .all(|byte| byte.is_ascii_graphic() || byte == b' ')
    {
        return Err(BadRequest::Malformed(
            "the request line holds a control character",
        ));
    }
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::Malformed(
            "the request line is not METHOD TARGET VERSION",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(BadRequest::Malformed("an invalid method"));
    }
    if !target.starts_with('/') {
        return Err(BadRequest::Malformed(
            "the request target is not an absolute path",
        ));
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        _ if is_http_version(version) => return Err(BadRequest::UnsupportedVersion),
        _ => return Err(BadRequest::Malformed("an invalid HTTP version")),
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok(Request { method, path })
}

/// `HTTP/d.d`.
fn is_http_version(version: &str) -> bool {
    match version.strip_prefix("HTTP/").map(str::as_bytes) {
        Some([major, b'.', minor]) => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A response, written whole with `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Answer to HEAD: the headers (with the body's length) and no body.
    pub head_only: bool,
}

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: TEXT_PLAIN,
            body: format!("{body}\n"),
            head_only: false,
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "Unknown",
        };
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut bytes = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The answer to a well-formed request.
fn respond(request: Request<'_>, shared: &Shared, handle: &PrometheusHandle) -> Response {
    let mut response = match request.path {
        "/metrics" | "/healthz" if request.method == Method::Other => {
            Response::text(405, "method not allowed: use GET")
        }
        "/metrics" => Response {
            status: 200,
            content_type: PROMETHEUS_TEXT,
            body: scrape(handle, shared),
            head_only: false,
        },
        "/healthz" if shared.shutting_down.load(Ordering::Acquire) => {
            Response::text(503, "shutting down")
        }
        "/healthz" => Response::text(200, "ok"),
        _ => Response::text(404, "not found: try /metrics or /healthz"),
    };
    response.head_only = request.method == Method::Head;
    response
}

/// The metrics and health listener.
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Listens on `addr` (`[metrics] addr`; `"127.0.0.1:0"` picks a free port) and serves
    /// `/metrics` and `/healthz` for `shared`. Installs the recorder if nothing did yet.
    pub async fn start(addr: &str, shared: Arc<Shared>) -> anyhow::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics ([metrics] addr)"))?;
        let local_addr = listener
            .local_addr()
            .with_context(|| format!("cannot listen on {addr} for metrics ([metrics] addr)"))?;
        let handle = prometheus_handle();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared, handle, stop_rx));
        tracing::info!(addr = %local_addr, "metrics listening (GET /metrics, GET /healthz)");
        Ok(MetricsServer {
            local_addr,
            stop,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops listening and ends the connections being served.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    handle: PrometheusHandle,
    mut stop: watch::Receiver<bool>,
) {
    // Dropped on return: the connections still being served are aborted.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if connections.len() >= MAX_CONNECTIONS => drop(stream),
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, shared.clone(), handle.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

enum ReadError {
    /// The client left (or half-closed) before a whole head arrived.
    Closed,
    /// Part of a head, then the client half-closed.
    Truncated,
    TooLarge,
}

/// Reads until the end of the request head; returns the head's bytes.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, ReadError> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let read = match stream.read(&mut chunk).await {
            Ok(0) if buffer.is_empty() => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Truncated),
            Ok(read) => read,
            Err(_) => return Err(ReadError::Closed),
        };
        let searched_from = buffer.len().saturating_sub(3);
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = head_end(&buffer[searched_from..]) {
            buffer.truncate(searched_from + end);
            return Ok(buffer);
        }
        if buffer.len() >= MAX_REQUEST_HEAD {
            return Err(ReadError::TooLarge);
        }
    }
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>, handle: PrometheusHandle) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => Response::text(408, "request timeout: the request head took too long"),
        Ok(Err(ReadError::Closed)) => return,
        Ok(Err(ReadError::Truncated)) => Response::text(400, "bad request: incomplete request"),
        Ok(Err(ReadError::TooLarge)) => Response::text(
            400,
            &format!("bad request: request head larger than {MAX_REQUEST_HEAD} bytes"),
        ),
        Ok(Ok(head)) => match parse_request_head(&head) {
            Ok(request) => respond(request, &shared, &handle),
            Err(BadRequest::Malformed(why)) => Response::text(400, &format!("bad request: {why}")),
            Err(BadRequest::UnsupportedVersion) => {
                Response::text(505, "HTTP version not supported: use HTTP/1.1")
            }
        },
    };
    let bytes = response.encode();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    // Drain what the client still sends (a body, the rest of an oversized head) for a moment,
    // so that closing does not reset the connection before the client read the response.
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &str) -> Result<Request<'_>, BadRequest> {
        parse_request_head(head.as_bytes())
    }

    #[test]
    fn parses_request_lines() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1"),
            Ok(Request {
                method: Method::Get,
                path: "/metrics"
            })
        );
        assert_eq!(
            parse_request_line(b"HEAD /healthz?verbose=1 HTTP/1.0"),
            Ok(Request {
                method: Method::Head,
                path: "/healthz"
            })
        );
        assert_eq!(
            parse_request_line(b"POST /metrics HTTP/1.1").map(|r| r.method),
            Ok(Method::Other)
        );
        assert_eq!(
            parse_request_line(b"get /metrics HTTP/1.1").map(|r| r.method),
            Ok(Method::Other),
            "methods are case-sensitive"
        );
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/2.0"),
            Err(BadRequest::UnsupportedVersion)
        );
        for bad in [
            &b""[..],
            b"GET",
            b"GET /metrics",
            b"GET  /metrics HTTP/1.1",
            b"GET /metrics HTTP/1.1 ",
            b"GET /metrics HTTP/1.1 extra",
            b"GET metrics HTTP/1.1",
            b"GET http://host/metrics HTTP/1.1",
            b"GET * HTTP/1.1",
            b"GET /metrics HTTP/11",
            b"GET /metrics http/1.1",
            b"G(T /metrics HTTP/1.1",
            b"GET /met\trics HTTP/1.1",
            b"GET /met\0rics HTTP/1.1",
            b"GET /\xc3\xa9 HTTP/1.1",
            b"GET /\xff HTTP/1.1",
        ] {
            assert!(
                matches!(parse_request_line(bad), Err(BadRequest::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn parses_request_heads() {
        assert_eq!(
            request("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"),
            Ok(Request {
                method: Method::Get,
                path: "/metrics"
            })
        );
        assert!(request("GET /metrics HTTP/1.1\n\n").is_ok(), "bare LF");
        for bad in [
            "GET /metrics HTTP/1.1\r\nHost x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n: x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            "\r\n\r\n",
        ] {
            assert!(
                matches!(request(bad), Err(BadRequest::Malformed(_))),
                "{bad:?}"
            );
        }
        // Whatever follows the blank line (a body) is not looked at.
        assert!(request("GET /metrics HTTP/1.1\r\n\r\nnot a header").is_ok());
    }

    #[test]
    fn finds_the_end_of_a_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r"), None);
        assert_eq!(head_end(b""), None);
        // An empty first line is a (malformed) head of its own.
        assert_eq!(head_end(b"\r\n\r\n"), Some(4));
    }

    #[test]
    fn responses_close_and_say_their_length() {
        let response = Response::text(405, "no");
        let text = String::from_utf8(response.encode()).expect("ASCII");
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nno\n"), "{text}");
        let head = Response {
            head_only: true,
            ..Response::text(200, "ok")
        };
        let text = String::from_utf8(head.encode()).expect("ASCII");
        assert!(
            text.contains("Content-Length: 3\r\n") && text.ends_with("\r\n\r\n"),
            "{text}"
        );
    }

    #[test]
    fn groups_errors_by_class() {
        let errors = HashMap::from([
            (*b"22012", 3),
            (*b"22P02", 2),
            (*b"42P01", 1),
            (*b"08006", 4),
            (*b"\xff2000", 1),
            (*b" 2000", 2),
            (*b"xx000", 5),
        ]);
        let classes = errors_by_class(&errors);
        let expected: BTreeMap<String, u64> =
            [("08", 4), ("22", 5), ("42", 1), ("XX", 5), ("invalid", 3)]
                .into_iter()
                .map(|(class, count)| (class.to_string(), count))
                .collect();
        assert_eq!(classes, expected);
        assert_eq!(errors_by_class(&HashMap::new()), BTreeMap::new());
    }

    fn counts_of(latencies_ns: &[(u64, u64)]) -> Vec<u64> {
        let mut counts = vec![0u64; LatencyHistogram::bucket_index(Duration::from_secs(3600)) + 1];
        for &(nanos, count) in latencies_ns {
            counts[LatencyHistogram::bucket_index(Duration::from_nanos(nanos))] += count;
        }
        counts
    }

    #[test]
    fn converts_fine_buckets_to_prometheus_buckets() {
        // 3 × 100 µs, 2 × 3 ms, 1 × 700 ms, 4 × 45 s, 1 × 2 min (past the last bound).
        let counts = counts_of(&[
            (100_000, 3),
            (3_000_000, 2),
            (700_000_000, 1),
            (45_000_000_000, 4),
            (120_000_000_000, 1),
        ]);
        let histogram = duration_histogram(&counts);
        //           0.0005 .001 .0025 .005 .01 .025 .05 .1 .25 .5  1  2.5  5 10 30 60 +Inf
        let expected = [3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 10, 11];
        assert_eq!(histogram.cumulative, expected);
        assert_eq!(histogram.count, 11);
        // 2 min lands in the last fine bucket (~68 s): the sum is within 1 % for the rest.
        let last = LatencyHistogram::bucket_value(counts.len() - 1).as_secs_f64();
        let exact = 3.0 * 0.0001 + 2.0 * 0.003 + 0.7 + 4.0 * 45.0 + last;
        assert!(
            (histogram.sum_seconds - exact).abs() / exact < 0.01,
            "{} vs {exact}",
            histogram.sum_seconds
        );
        let empty = duration_histogram(&[]);
        assert_eq!(empty.cumulative, [0; DURATION_BUCKETS.len() + 1]);
        assert_eq!((empty.count, empty.sum_seconds), (0, 0.0));
    }

    #[test]
    fn bucket_bounds_go_by_the_fine_buckets_midpoint() {
        // Exactly on a bound: the fine bucket's midpoint decides, and every sample counts once.
        for (_, bound) in DURATION_BUCKETS {
            let index = LatencyHistogram::bucket_index(Duration::from_nanos(bound as u64));
            let midpoint = LatencyHistogram::bucket_value(index).as_nanos();
            let mut counts = vec![0u64; index + 1];
            counts[index] = 1;
            let histogram = duration_histogram(&counts);
            let slot = histogram
                .cumulative
                .iter()
                .position(|&count| count == 1)
                .expect("counted");
            let chosen = DURATION_BUCKETS.get(slot).map_or(u128::MAX, |&(_, b)| b);
            assert!(
                midpoint <= chosen,
                "{bound}: midpoint {midpoint} > {chosen}"
            );
            if slot > 0 {
                assert!(midpoint > DURATION_BUCKETS[slot - 1].1, "{bound}");
            }
            assert_eq!(histogram.count, 1);
        }
        // The bounds are increasing, and the builder's f64 bounds match their labels.
        for pair in DURATION_BUCKETS.windows(2) {
            assert!(pair[0].1 < pair[1].1);
        }
        for (label, nanos) in DURATION_BUCKETS {
            let parsed: f64 = label.parse().expect("number");
            assert!((parsed - nanos as f64 / 1e9).abs() < 1e-12, "{label}");
        }
    }

    #[test]
    fn sqlstate_class_is_always_a_plain_label() {
        assert_eq!(sqlstate_class(b"57P01"), "57");
        assert_eq!(sqlstate_class(b"P0001"), "P0");
        assert_eq!(sqlstate_class(b"\"\n000"), "invalid");
    }
}
