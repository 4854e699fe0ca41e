//! Criterion benches for the per-message hot path: header scanning of realistic backend
//! output, request accounting, and the routing decision. Numbers are for comparison between
//! commits on one machine; they are never asserted.

use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgshift::config::{ReplicationPolicy, StickyMode};
use pgshift::protocol::framing::{Framer, TagSet};
use pgshift::protocol::startup::StartupFacts;
use pgshift::proxy::requests::RequestTracker;
use pgshift::routing::{Router, RoutingTable};

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend(((body.len() + 4) as u32).to_be_bytes());
    bytes.extend(body);
    bytes
}

/// 64 KiB of a typical result: many 50-byte DataRows, then CommandComplete and ReadyForQuery.
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

fn header_scan(c: &mut Criterion) {
    let (stream, messages) = result_stream();
    let mut group = c.benchmark_group("framing");
    group.throughput(Throughput::Elements(messages as u64));
    group.bench_function("scan 64 KiB of DataRows", |b| {
        b.iter(|| {
            let mut framer = Framer::new(TagSet::of(b"EZKGHW"), 1 << 30);
            let mut seen = 0usize;
            while let Ok(Some(frame)) = framer.next_frame(&stream) {
                seen += frame.wire_len;
            }
            seen
        })
    });
    group.finish();
}

fn request_accounting(c: &mut Criterion) {
    c.bench_function("requests: one extended batch and its ReadyForQuery", |b| {
        let now = Instant::now();
        let mut tracker = RequestTracker::new();
        tracker.on_backend_message(b'Z', Some(b"I"), now);
        b.iter(|| {
            for tag in [b'B', b'E', b'S'] {
                tracker.on_client_message(tag, now);
            }
            tracker.on_backend_message(b'Z', Some(b"I"), now)
        })
    });
}

fn routing_decision(c: &mut Criterion) {
    let table = RoutingTable {
        green_weight_bp: 2500,
        sticky: StickyMode::Tenant,
        pins: Vec::new(),
        draining: [false, false],
        replication: ReplicationPolicy::Blue,
    };
    let router = Router::new(table, Some(1));
    let facts = StartupFacts {
        user: "app".into(),
        database: "app".into(),
        application_name: None,
        tenant: Some("tenant-123456".into()),
        client_addr: None,
        walsender: None,
    };
    c.bench_function("routing: sticky tenant decision", |b| {
        b.iter(|| router.route(&facts))
    });
}

criterion_group!(benches, header_scan, request_accounting, routing_decision);
criterion_main!(benches);
