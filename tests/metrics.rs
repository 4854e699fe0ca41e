//! `/metrics` and `/healthz` in front of a running proxy on the real blue and green clusters:
//! the exposition is well-formed Prometheus text, lists every metric of CONTRACT.md's
//! "Metrics" section, follows the traffic, and the HTTP side refuses what it should.
//!
//! The metrics recorder is process-wide: only one test in this binary scrapes `/metrics`
//! (another scrape would set the shared gauges from its own proxy's stats).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgshift::telemetry::MetricsServer;
use support::pgshift::{TestProxy, server_port, sqlstate};
use support::shared_pair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every metric named in CONTRACT.md, section "Metrics".
const CONTRACT_METRICS: [&str; 14] = [
    "pgshift_green_weight_ratio",
    "pgshift_rollout_state",
    "pgshift_client_sessions",
    "pgshift_client_sessions_opened_total",
    "pgshift_backend_connect_errors_total",
    "pgshift_requests_total",
    "pgshift_request_errors_total",
    "pgshift_request_duration_seconds",
    "pgshift_bytes_total",
    "pgshift_rollout_decisions_total",
    "pgshift_cancel_requests_total",
    "pgshift_clients_rejected_total",
    "pgshift_draining_sessions",
    "pgshift_replication_lag",
];

// ---------------------------------------------------------------------------------------------
// HTTP over a raw socket
// ---------------------------------------------------------------------------------------------

struct HttpResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// Sends `request` as is and reads until the server closes (it always does).
async fn http_raw(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect to metrics");
    stream.write_all(request).await.expect("send request");
    read_response(&mut stream, Duration::from_secs(15)).await
}

async fn read_response(stream: &mut TcpStream, wait: Duration) -> HttpResponse {
    let mut bytes = Vec::new();
    tokio::time::timeout(wait, stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the connection after its response")
        .expect("read response");
    let text = String::from_utf8(bytes).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts
        .next()
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let headers: HashMap<String, String> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("header line");
            (name.to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    assert_eq!(
        headers.get("connection").map(String::as_str),
        Some("close"),
        "{head}"
    );
    let length: usize = headers
        .get("content-length")
        .and_then(|length| length.parse().ok())
        .expect("content-length");
    // A HEAD response says the length and sends no body.
    if !body.is_empty() {
        assert_eq!(body.len(), length, "{head}");
    }
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n").as_bytes(),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// A small Prometheus text-format parser
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    helps: HashSet<String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the one sample `name{labels}` (labels given exactly).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|sample| sample.name == name && sample.labels == wanted)
            .map(|sample| sample.value)
    }

    /// Whether any sample of family `family` exists.
    fn has_family(&self, family: &str) -> bool {
        self.samples
            .iter()
            .any(|sample| family_of(&sample.name, &self.types) == Some(family))
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

/// The family a sample name belongs to, given the TYPE lines seen.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
        {
            return Some(base);
        }
    }
    None
}

/// Parses `{a="x",b="y"}` (at the start of `text`); returns the labels and the rest.
fn parse_labels(text: &str, line: &str) -> (BTreeMap<String, String>, String) {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    assert_eq!(chars.next(), Some('{'), "{line}");
    loop {
        if chars.peek() == Some(&'}') {
            chars.next();
            break;
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            name.push(c);
            chars.next();
        }
        assert!(is_label_name(&name), "label name {name:?} in {line}");
        assert_eq!(chars.next(), Some('='), "{line}");
        assert_eq!(chars.next(), Some('"'), "{line}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    other => panic!("bad escape {other:?} in {line}"),
                },
                Some('"') => break,
                Some('\n') | None => panic!("unterminated label value in {line}"),
                Some(c) => value.push(c),
            }
        }
        assert!(
            labels.insert(name.clone(), value).is_none(),
            "label {name} twice in {line}"
        );
        match chars.next() {
            Some(',') => {}
            Some('}') => break,
            other => panic!("expected , or }} after a label, got {other:?} in {line}"),
        }
    }
    (labels, chars.collect())
}

/// Parses the text format strictly enough for pgshift's output; panics naming the bad line.
fn parse_exposition(text: &str) -> Exposition {
    let mut exposition = Exposition::default();
    let mut series = HashSet::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match words.first().copied() {
                Some("HELP") => {
                    assert!(words.len() >= 2 && is_metric_name(words[1]), "{line}");
                    assert!(
                        exposition.helps.insert(words[1].to_string()),
                        "HELP twice: {line}"
                    );
                }
                Some("TYPE") => {
                    assert_eq!(words.len(), 3, "{line}");
                    assert!(is_metric_name(words[1]), "{line}");
                    assert!(
                        matches!(
                            words[2],
                            "counter" | "gauge" | "histogram" | "summary" | "untyped"
                        ),
                        "{line}"
                    );
                    assert!(
                        exposition
                            .types
                            .insert(words[1].to_string(), words[2].to_string())
                            .is_none(),
                        "TYPE twice: {line}"
                    );
                }
                _ => {} // a plain comment
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        assert!(is_metric_name(name), "metric name {name:?} in {line}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..], line)
        } else {
            (BTreeMap::new(), line[name_end..].to_string())
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        assert!(
            rest.starts_with(' ') && (fields.len() == 1 || fields.len() == 2),
            "expected ` value [timestamp]` in {line}"
        );
        let value = parse_value(fields[0]).unwrap_or_else(|| panic!("bad value in {line}"));
        assert!(
            family_of(name, &exposition.types).is_some(),
            "sample without a TYPE line: {line}"
        );
        assert!(
            series.insert(format!("{name}{labels:?}")),
            "series twice: {line}"
        );
        exposition.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    exposition
}

/// Histogram rules: per series, buckets cumulative and non-decreasing by `le`, a `+Inf` bucket
/// equal to `_count`, and a `_sum`. Counters are finite and not negative.
fn check_families(exposition: &Exposition) {
    for (family, kind) in &exposition.types {
        match kind.as_str() {
            "histogram" => {
                let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
                for sample in exposition
                    .samples
                    .iter()
                    .filter(|s| s.name == format!("{family}_bucket"))
                {
                    let mut labels = sample.labels.clone();
                    let le = labels.remove("le").expect("bucket without le");
                    let le = parse_value(&le).expect("le is a number");
                    series
                        .entry(format!("{labels:?}"))
                        .or_default()
                        .push((le, sample.value));
                }
                assert!(!series.is_empty(), "histogram {family} without buckets");
                let plain = exposition.samples.iter().find(|s| s.name == *family);
                assert!(
                    plain.is_none(),
                    "histogram {family} has a plain sample: {plain:?}"
                );
                for (labels, mut buckets) in series {
                    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                    for pair in buckets.windows(2) {
                        assert!(pair[0].0 < pair[1].0, "{family}{labels}: le twice");
                        assert!(
                            pair[0].1 <= pair[1].1,
                            "{family}{labels}: buckets not cumulative: {buckets:?}"
                        );
                    }
                    let (last_le, last_count) = *buckets.last().expect("buckets");
                    assert_eq!(last_le, f64::INFINITY, "{family}{labels}: no +Inf bucket");
                    let find = |suffix: &str| {
                        exposition
                            .samples
                            .iter()
                            .find(|s| {
                                let mut with_le = s.labels.clone();
                                with_le.remove("le");
                                s.name == format!("{family}_{suffix}")
                                    && format!("{with_le:?}") == labels
                            })
                            .map(|s| s.value)
                    };
                    assert_eq!(
                        find("count"),
                        Some(last_count),
                        "{family}{labels}: +Inf != _count"
                    );
                    let sum = find("sum").unwrap_or_else(|| panic!("{family}{labels}: no _sum"));
                    assert!(
                        sum >= 0.0 && sum.is_finite(),
                        "{family}{labels}: _sum {sum}"
                    );
                }
            }
            "counter" => {
                for sample in exposition.samples.iter().filter(|s| s.name == *family) {
                    assert!(
                        sample.value.is_finite() && sample.value >= 0.0,
                        "counter {sample:?}"
                    );
                }
            }
            _ => {}
        }
    }
}

async fn scrape(addr: SocketAddr) -> Exposition {
    let response = get(addr, "/metrics").await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let exposition = parse_exposition(&response.body);
    check_families(&exposition);
    exposition
}

#[test]
fn the_test_parser_refuses_bad_expositions() {
    for bad in [
        "no_type 1\n",
        "# TYPE a counter\na{x=\"1\"} one\n",
        "# TYPE a counter\na{x=1} 1\n",
        "# TYPE a counter\na{x=\"1\" 1\n",
        "# TYPE a counter\n# TYPE a gauge\n",
        "# TYPE a counter\na 1\na 2\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
    ] {
        let outcome = std::panic::catch_unwind(|| check_families(&parse_exposition(bad)));
        assert!(outcome.is_err(), "accepted: {bad:?}");
    }
    let good = "# HELP a x y\n# TYPE a counter\na{x=\"q\\\"\"} 1\n\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1.5\nh_count 2\n# TYPE g gauge\ng NaN\n";
    let exposition = parse_exposition(good);
    check_families(&exposition);
    assert_eq!(exposition.value("a", &[("x", "q\"")]), Some(1.0));
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_traffic_and_healthz_follows_shutdown() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 50", None).await;
    let shared = proxy.proxy().shared().clone();
    let metrics = MetricsServer::start("127.0.0.1:0", shared.clone())
        .await
        .expect("metrics server starts");
    let addr = metrics.local_addr();
    assert_ne!(addr.port(), 0);

    let before = scrape(addr).await;
    for metric in CONTRACT_METRICS {
        assert!(
            before.has_family(metric),
            "{metric} is missing from a fresh /metrics"
        );
        assert!(before.helps.contains(metric), "{metric} has no HELP");
    }
    assert!(
        before.value("pgshift_replication_lag", &[]).is_some(),
        "replication lag listed"
    );
    assert_eq!(
        before
            .types
            .get("pgshift_request_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );

    // Traffic: a few sessions (the weight spreads them), ordinary queries and one error each.
    let mut requests_on = HashMap::from([("blue", 0u64), ("green", 0u64)]);
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = proxy
            .connect(&proxy.app_dsn())
            .await
            .expect("connect through pgshift");
        let color = if server_port(&client).await == pair.blue.port() {
            "blue"
        } else {
            "green"
        };
        for _ in 0..3 {
            client.simple_query("SELECT 1").await.expect("SELECT 1");
        }
        let error = client
            .simple_query("SELECT 1/0")
            .await
            .expect_err("division by zero");
        assert_eq!(sqlstate(&error).as_deref(), Some("22012"));
        // The client has the error before pgshift saw the ReadyForQuery that completes the
        // request; one more round trip makes sure it has.
        client.simple_query("SELECT 1").await.expect("SELECT 1");
        // At least (the last SELECT 1 aside): inet_server_port, 3 × SELECT 1, SELECT 1/0.
        *requests_on.get_mut(color).expect("color") += 5;
        clients.push((color, client));
    }

    let after = scrape(addr).await;
    for (color, requests) in &requests_on {
        let labels = [("color", *color)];
        let grew = |name: &str| {
            after.value(name, &labels).unwrap_or(0.0) - before.value(name, &labels).unwrap_or(0.0)
        };
        if *requests == 0 {
            continue;
        }
        let sessions = clients.iter().filter(|(c, _)| c == color).count() as f64;
        assert!(
            grew("pgshift_requests_total") >= *requests as f64,
            "{color}: requests_total grew by {} for {requests} requests",
            grew("pgshift_requests_total")
        );
        assert!(
            grew("pgshift_request_duration_seconds_count") >= *requests as f64,
            "{color}: latency samples"
        );
        assert_eq!(
            grew("pgshift_client_sessions_opened_total"),
            sessions,
            "{color}"
        );
        assert_eq!(
            after.value("pgshift_client_sessions", &labels),
            Some(sessions),
            "{color}: sessions open now"
        );
        let errors = after
            .value(
                "pgshift_request_errors_total",
                &[("color", color), ("sqlstate_class", "22")],
            )
            .unwrap_or(0.0);
        assert!(
            errors >= sessions,
            "{color}: class 22 errors {errors} for {sessions} sessions"
        );
        for direction in ["to_backend", "to_client"] {
            let labels = [("color", *color), ("direction", direction)];
            let grew = after.value("pgshift_bytes_total", &labels).unwrap_or(0.0)
                - before.value("pgshift_bytes_total", &labels).unwrap_or(0.0);
            assert!(grew > 0.0, "{color} bytes {direction}");
        }
        let bucket_1s = after
            .value(
                "pgshift_request_duration_seconds_bucket",
                &[("color", color), ("le", "1")],
            )
            .expect("le=1 bucket");
        assert!(
            bucket_1s >= *requests as f64,
            "{color}: fast requests <= 1 s"
        );
    }
    assert!(
        after
            .value("pgshift_backend_connect_errors_total", &[("color", "blue")])
            .is_some()
    );

    // HEAD: the headers (with the length) and no body.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"HEAD /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("send");
    let head = read_response(&mut stream, Duration::from_secs(15)).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert!(
        head.headers["content-length"]
            .parse::<usize>()
            .expect("length")
            > 0
    );

    // /healthz: ok while accepting, 503 once shutting down.
    let health = get(addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let health = get(addr, "/healthz?probe=1").await;
    assert_eq!(health.status, 200);
    shared.shutting_down.store(true, Ordering::Release);
    let health = get(addr, "/healthz").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (503, "shutting down\n")
    );

    drop(clients);
    proxy.stop().await;
    metrics.shutdown().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

/// Everything but a successful scrape (this test must not scrape: see the module's doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_side_refuses_what_it_should() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 0", None).await;
    let metrics = MetricsServer::start("127.0.0.1:0", proxy.proxy().shared().clone())
        .await
        .expect("metrics server starts");
    let addr = metrics.local_addr();

    let taken = MetricsServer::start(&addr.to_string(), proxy.proxy().shared().clone()).await;
    let error = format!("{:#}", taken.err().expect("the address is taken"));
    assert!(
        error.contains(&addr.to_string()) && error.contains("[metrics] addr"),
        "{error}"
    );

    assert_eq!(get(addr, "/").await.status, 404);
    assert_eq!(get(addr, "/metrics/extra").await.status, 404);
    let post = http_raw(
        addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert_eq!(post.status, 405);
    assert_eq!(
        post.headers.get("allow").map(String::as_str),
        Some("GET, HEAD")
    );
    assert_eq!(
        http_raw(addr, b"DELETE /healthz HTTP/1.1\r\n\r\n")
            .await
            .status,
        405
    );
    assert_eq!(
        http_raw(addr, b"GET /healthz HTTP/2.0\r\n\r\n")
            .await
            .status,
        505
    );
    for malformed in [
        &b"garbage\r\n\r\n"[..],
        b"GET /healthz\r\n\r\n",
        b"GET healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
        b"GET /\0 HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x", // half-closed below: incomplete
    ] {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(malformed).await.expect("send");
        stream.shutdown().await.expect("half-close");
        let response = read_response(&mut stream, Duration::from_secs(15)).await;
        assert_eq!(
            response.status,
            400,
            "{:?}",
            String::from_utf8_lossy(malformed)
        );
    }

    // More than 8 KiB of headers: 400 and closed, without waiting for the rest.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut oversized = b"GET /healthz HTTP/1.1\r\n".to_vec();
    for index in 0..200 {
        oversized.extend_from_slice(format!("X-Filler-{index}: {}\r\n", "a".repeat(60)).as_bytes());
    }
    stream.write_all(&oversized).await.expect("send");
    let response = read_response(&mut stream, Duration::from_secs(15)).await;
    assert_eq!(response.status, 400);
    assert!(response.body.contains("8192"), "{}", response.body);

    // A client that never finishes its head is answered 408 and closed after 5 s.
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost:")
        .await
        .expect("send");
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let response = read_response(&mut slow, Duration::from_secs(15)).await;
    assert_eq!(response.status, 408);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(
        read_response(&mut silent, Duration::from_secs(15))
            .await
            .status,
        408
    );

    // Still serving after all that.
    assert_eq!(get(addr, "/healthz").await.status, 200);

    proxy.stop().await;
    metrics.shutdown().await;
}
