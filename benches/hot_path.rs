//! Criterion benches for the per-message hot path: header scanning of realistic backend
//! output, request accounting, the routing decision, the cancel-table lookup and the per-color
//! stats a finished request updates. Throughput is reported in bytes/s (framing) or messages /
//! requests per second; criterion's time per iteration divided by the element count is the
//! cost per message. Numbers are for comparison between commits on one machine; they are
//! never asserted. `docs/BENCHMARKS.md` says how to run them and what the whole-system
//! comparison (`benches/compare.sh`) measures.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pgshift::color::Color;
use pgshift::config::{ReplicationPolicy, StickyMode};
use pgshift::protocol::framing::{Framer, TagSet};
use pgshift::protocol::startup::StartupFacts;
use pgshift::proxy::cancel::{CancelTable, CancelTarget};
use pgshift::proxy::requests::RequestTracker;
use pgshift::routing::{Pin, Router, RoutingTable};
use pgshift::stats::Stats;

/// The backend types the relay inspects (its `BACKEND_INSPECTED`).
const BACKEND_INSPECTED: &[u8] = b"EZKGHW";
/// The relay reads at most this much at once while a direction's buffer has not grown.
const READ_SIZE: usize = 4 * 1024;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend(((body.len() + 4) as u32).to_be_bytes());
    bytes.extend(body);
    bytes
}

/// A DataRow with one column per value.
fn data_row(columns: &[&[u8]]) -> Vec<u8> {
    let mut body = (columns.len() as u16).to_be_bytes().to_vec();
    for column in columns {
        body.extend((column.len() as i32).to_be_bytes());
        body.extend(*column);
    }
    message(b'D', &body)
}

/// A RowDescription of one int4 column named `name`.
fn row_description(name: &str) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(name.as_bytes());
    body.push(0);
    body.extend(0u32.to_be_bytes()); // table oid
    body.extend(0u16.to_be_bytes()); // column number
    body.extend(23u32.to_be_bytes()); // int4
    body.extend(4i16.to_be_bytes());
    body.extend((-1i32).to_be_bytes());
    body.extend(0u16.to_be_bytes()); // text format
    message(b'T', &body)
}

/// What pgbench's select-only transaction gets back, in each query mode: `-M prepared` gets
/// BindComplete, DataRow, CommandComplete, ReadyForQuery; `-M simple` gets RowDescription,
/// DataRow, CommandComplete, ReadyForQuery.
fn select_only_reply(prepared: bool) -> (Vec<u8>, usize) {
    let mut reply = if prepared {
        message(b'2', b"")
    } else {
        row_description("abalance")
    };
    reply.extend(data_row(&[b"-4711"]));
    reply.extend(message(b'C', b"SELECT 1\0"));
    reply.extend(message(b'Z', b"I"));
    (reply, 4)
}

/// A realistic backend mix, 64 KiB long: replies of a pgbench-like select-only workload
/// (prepared and simple) interleaved with result sets of 10 to 200 narrow DataRows (three
/// columns, 20 to 60 bytes each), CommandComplete and ReadyForQuery, and now and then an
/// ErrorResponse. Returns the stream and its message count.
fn backend_mix() -> (Vec<u8>, usize) {
    let mut stream = Vec::with_capacity(64 * 1024 + 4096);
    let mut messages = 0;
    let mut round = 0usize;
    while stream.len() < 64 * 1024 {
        round += 1;
        let (reply, count) = select_only_reply(round.is_multiple_of(2));
        stream.extend(reply);
        messages += count;
        if round.is_multiple_of(3) {
            stream.extend(row_description("id"));
            messages += 1;
            let rows = 10 + (round * 37) % 190;
            for row in 0..rows {
                let id = format!("{}", 100_000 + row);
                let name = "x".repeat(8 + row % 40);
                stream.extend(data_row(&[id.as_bytes(), name.as_bytes(), b"t"]));
                messages += 1;
            }
            stream.extend(message(b'C', format!("SELECT {rows}\0").as_bytes()));
            stream.extend(message(b'Z', b"I"));
            messages += 2;
        }
        if round.is_multiple_of(50) {
            stream.extend(message(
                b'E',
                b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0\0",
            ));
            stream.extend(message(b'Z', b"I"));
            messages += 2;
        }
    }
    (stream, messages)
}

/// 64 KiB of one wide result: 50-byte DataRows, then CommandComplete and ReadyForQuery.
fn result_stream() -> (Vec<u8>, usize) {
    let mut stream = message(b'T', &[0; 40]);
    let mut messages = 1;
    while stream.len() < 64 * 1024 - 64 {
        stream.extend(message(b'D', &[7; 45]));
        messages += 1;
    }
    stream.extend(message(b'C', b"SELECT 1000\0"));
    stream.extend(message(b'Z', b"I"));
    (stream, messages + 2)
}

/// Frames `stream` as the relay does: read by read (`chunk` bytes at a time), every released
/// byte forwarded (consumed) before the next read.
fn scan_in_reads(stream: &[u8], chunk: usize, inspected: TagSet) -> usize {
    let mut framer = Framer::new(inspected, 1 << 30);
    let mut start = 0;
    let mut end = 0;
    let mut seen = 0;
    while start < stream.len() {
        end = (end + chunk).min(stream.len());
        while let Ok(Some(frame)) = framer.next_frame(&stream[start..end]) {
            seen += frame.wire_len;
        }
        let released = framer.released();
        framer.consumed(released);
        start += released;
        if released == 0 && end == stream.len() {
            break;
        }
    }
    seen
}

fn header_scan(c: &mut Criterion) {
    let inspected = TagSet::of(BACKEND_INSPECTED);
    let mut group = c.benchmark_group("framing");
    let inputs = [
        ("backend mix 64 KiB", backend_mix()),
        ("64 KiB of DataRows", result_stream()),
    ];
    for (name, (stream, messages)) in &inputs {
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("scan whole, bytes", name),
            stream,
            |b, s| {
                b.iter(|| {
                    let mut framer = Framer::new(inspected, 1 << 30);
                    let mut seen = 0usize;
                    while let Ok(Some(frame)) = framer.next_frame(black_box(s)) {
                        seen += frame.wire_len;
                    }
                    seen
                })
            },
        );
        group.throughput(Throughput::Elements(*messages as u64));
        group.bench_with_input(
            BenchmarkId::new("scan in 4 KiB reads, messages", name),
            stream,
            |b, s| b.iter(|| scan_in_reads(black_box(s), READ_SIZE, inspected)),
        );
    }
    // One pgbench reply, the unit of work of a select-only transaction.
    for prepared in [true, false] {
        let (reply, messages) = select_only_reply(prepared);
        let name = if prepared { "prepared" } else { "simple" };
        group.throughput(Throughput::Elements(messages as u64));
        group.bench_with_input(
            BenchmarkId::new("select-only reply, messages", name),
            &reply,
            |b, reply| b.iter(|| scan_in_reads(black_box(reply), READ_SIZE, inspected)),
        );
    }
    group.finish();
}

fn request_accounting(c: &mut Criterion) {
    let mut group = c.benchmark_group("requests");
    group.throughput(Throughput::Elements(1));
    group.bench_function("extended batch (B E S) and its ReadyForQuery", |b| {
        let now = Instant::now();
        let mut tracker = RequestTracker::new();
        tracker.on_backend_message(b'Z', Some(b"I"), now);
        b.iter(|| {
            for tag in [b'B', b'E', b'S'] {
                tracker.on_client_message(black_box(tag), now);
            }
            tracker.on_backend_message(b'2', None, now);
            tracker.on_backend_message(b'D', None, now);
            tracker.on_backend_message(b'C', None, now);
            tracker.on_backend_message(b'Z', Some(b"I"), now)
        })
    });
    group.bench_function("simple query and its ReadyForQuery", |b| {
        let now = Instant::now();
        let mut tracker = RequestTracker::new();
        tracker.on_backend_message(b'Z', Some(b"I"), now);
        b.iter(|| {
            tracker.on_client_message(black_box(b'Q'), now);
            tracker.on_backend_message(b'T', None, now);
            tracker.on_backend_message(b'D', None, now);
            tracker.on_backend_message(b'C', None, now);
            tracker.on_backend_message(b'Z', Some(b"I"), now)
        })
    });
    group.bench_function("simple query answered by an ErrorResponse", |b| {
        let now = Instant::now();
        let mut tracker = RequestTracker::new();
        tracker.on_backend_message(b'Z', Some(b"I"), now);
        let error = b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0\0";
        b.iter(|| {
            tracker.on_client_message(black_box(b'Q'), now);
            tracker.on_backend_message(b'E', Some(error), now);
            tracker.on_backend_message(b'Z', Some(b"I"), now)
        })
    });
    group.bench_function("Instant::now (taken once per read)", |b| {
        b.iter(Instant::now)
    });
    group.finish();

    // What a finished request costs the per-color stats (shared by every session).
    let stats = Stats::default();
    let blue = stats.color(Color::Blue);
    let mut group = c.benchmark_group("stats");
    group.throughput(Throughput::Elements(1));
    group.bench_function("record a request (latency, no error)", |b| {
        let mut micros = 0u64;
        b.iter(|| {
            micros = (micros + 37) % 5_000;
            blue.record_request(Some(Duration::from_micros(200 + micros)), None)
        })
    });
    group.bench_function("record a request (error)", |b| {
        b.iter(|| blue.record_request(Some(Duration::from_micros(300)), Some(*b"42P01")))
    });
    group.bench_function("bytes relayed", |b| {
        b.iter(|| blue.add_bytes_to_client(black_box(64)))
    });
    group.finish();
}

fn facts(tenant: &str) -> StartupFacts {
    StartupFacts {
        user: "app".into(),
        database: "app".into(),
        application_name: Some("web-1".into()),
        tenant: Some(tenant.into()),
        client_addr: Some("10.1.2.3".parse().expect("address")),
        walsender: None,
    }
}

fn routing_decision(c: &mut Criterion) {
    let table = |sticky, pins| RoutingTable {
        green_weight_bp: 2500,
        sticky,
        pins,
        draining: [false, false],
        replication: ReplicationPolicy::Blue,
    };
    let pins = (0..8)
        .map(|index| Pin {
            database: Some(format!("tenant_{index}")),
            user: None,
            application_name: None,
            tenant: None,
            color: Color::Green,
        })
        .collect::<Vec<_>>();
    let facts = facts("tenant-123456");
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    for (name, router) in [
        (
            "sticky tenant",
            Router::new(table(StickyMode::Tenant, Vec::new()), Some(1)),
        ),
        (
            "sticky client_addr",
            Router::new(table(StickyMode::ClientAddr, Vec::new()), Some(1)),
        ),
        (
            "weighted draw",
            Router::new(table(StickyMode::None, Vec::new()), Some(1)),
        ),
        (
            "sticky tenant, 8 pins missed",
            Router::new(table(StickyMode::Tenant, pins.clone()), Some(1)),
        ),
    ] {
        group.bench_function(name, |b| b.iter(|| router.route(black_box(&facts))));
    }
    group.finish();
}

fn cancel_lookup(c: &mut Criterion) {
    let table = CancelTable::default();
    let backend_addr: SocketAddr = "127.0.0.1:5432".parse().expect("address");
    let target = |pid: i32| CancelTarget {
        color: Color::Blue,
        backend_addr,
        backend_pid: pid,
        backend_secret: Bytes::from(vec![1, 2, 3, 4]),
        session_id: pid as u64,
        cancels_forwarded: Arc::default(),
        held: Arc::default(),
    };
    // 1,000 open sessions.
    let keys: Vec<(i32, Bytes)> = (0..1_000)
        .map(|pid| (10_000 + pid, table.register(target(10_000 + pid))))
        .collect();
    let unknown = Bytes::from_static(&[9, 9, 9, 9]);
    let mut group = c.benchmark_group("cancel table (1,000 sessions)");
    group.throughput(Throughput::Elements(1));
    group.bench_function("lookup of a known key", |b| {
        let mut index = 0;
        b.iter(|| {
            index = (index + 1) % keys.len();
            let (pid, secret) = &keys[index];
            table.lookup(*pid, secret)
        })
    });
    group.bench_function("lookup of an unknown key", |b| {
        b.iter(|| table.lookup(black_box(10_500), &unknown))
    });
    group.bench_function("register and remove (a session's BackendKeyData)", |b| {
        b.iter(|| {
            let secret = table.register(target(77));
            table.remove(77, &secret);
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    header_scan,
    request_accounting,
    routing_decision,
    cancel_lookup
);
criterion_main!(benches);
