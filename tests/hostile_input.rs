//! Hostile input (docs/RELIABILITY.md): property tests of the four parsers that read bytes a
//! client chose (the startup packet parser, the header framer, the `options` parser, the SASL
//! gs2-header reader), then the limits that protect memory and the cancel key space, tested
//! against a real pgshift and real Postgres, and a check that nothing secret reaches the log.
//!
//! The property tests run in `cargo test` (proptest's default 256 cases each, a few seconds in
//! all); `fuzz/` has cargo-fuzz targets for the same parsers, for long runs.

mod support;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use pgshift::protocol::MAX_STARTUP_PACKET_SIZE;
use pgshift::protocol::framing::{Framer, TagSet};
use pgshift::protocol::options::{TENANT_SETTING, settings, split_options, tenant};
use pgshift::protocol::sasl::{
    ChannelBinding, SaslError, gs2_channel_binding, parse_sasl_initial_response,
};
use pgshift::protocol::startup::{
    CANCEL_REQUEST_CODE, FirstPacket, first_packet_length, parse_first_packet,
};
use proptest::prelude::*;
use support::pgshift::{TestProxy, sqlstate};
use support::wire::{
    cancel_packet, error_field, expect_message, message, raw_error, read_until_closed,
    split_messages,
};
use support::{BULK_USER, shared_pair};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// Upper bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Property tests: the startup packet parser
// ---------------------------------------------------------------------------------------------

/// A parameter name or value as a client may send it: any bytes but NUL (names non-empty).
fn cstring(min: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(1u8..=255, min..24)
        .prop_map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', ""))
        .prop_filter("non-empty after lossy decoding", move |s| s.len() >= min)
}

fn encode_startup(version: u32, parameters: &[(String, String)]) -> Vec<u8> {
    let parameters: Vec<(&str, &str)> = parameters
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    support::wire::startup_packet((version >> 16) as u16, version as u16, &parameters)
}

proptest! {
    /// Every length word below 8 or above 10,000 is refused with 08P01, every other accepted.
    #[test]
    fn startup_length_words(length in any::<u32>()) {
        let result = first_packet_length(length.to_be_bytes());
        if (8..=MAX_STARTUP_PACKET_SIZE as u32).contains(&length) {
            prop_assert_eq!(result, Ok(length as usize));
        } else {
            prop_assert_eq!(result.unwrap_err().sqlstate(), "08P01");
        }
    }

    /// Around the limits too (the uniform draw above rarely lands near them).
    #[test]
    fn startup_length_words_near_the_limits(offset in 0u32..16) {
        for length in [offset.min(7), MAX_STARTUP_PACKET_SIZE as u32 + 1 + offset] {
            prop_assert!(first_packet_length(length.to_be_bytes()).is_err());
        }
        let inside = [8 + offset, MAX_STARTUP_PACKET_SIZE as u32 - offset];
        for length in inside {
            prop_assert_eq!(first_packet_length(length.to_be_bytes()), Ok(length as usize));
        }
    }

    /// Any bytes at all: a value or an error, never a panic; a refusal has a contract SQLSTATE.
    #[test]
    fn startup_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Err(error) = parse_first_packet(Bytes::from(bytes)) {
            prop_assert!(["08P01", "0A000"].contains(&error.sqlstate()));
        }
    }

    /// Bytes behind a valid-looking header (right length word, protocol 3.x): no panic, and
    /// what parses keeps its exact bytes.
    #[test]
    fn startup_parser_with_a_plausible_header(
        minor in any::<u16>(),
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut packet = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        packet.extend((3u32 << 16 | u32::from(minor)).to_be_bytes());
        packet.extend(&body);
        let packet = Bytes::from(packet);
        if let Ok(FirstPacket::Startup(startup)) = parse_first_packet(packet.clone()) {
            prop_assert_eq!(&startup.raw, &packet);
            prop_assert_eq!((startup.major, startup.minor), (3, minor));
            let _ = startup.facts(Some(IpAddr::from([127, 0, 0, 1])));
        }
    }

    /// A StartupMessage built from parameters parses back to the same parameters, in order.
    #[test]
    fn startup_round_trip(
        minor in 0u16..4,
        parameters in proptest::collection::vec((cstring(1), cstring(0)), 0..8),
    ) {
        let packet = Bytes::from(encode_startup(3 << 16 | u32::from(minor), &parameters));
        match parse_first_packet(packet.clone()) {
            Ok(FirstPacket::Startup(startup)) => {
                prop_assert_eq!(&startup.parameters, &parameters);
                prop_assert_eq!(&startup.raw, &packet);
                let user = parameters.iter().rev().find(|(k, _)| k == "user").map(|(_, v)| v);
                let facts = startup.facts(None);
                match user {
                    Some(user) if !user.is_empty() => {
                        prop_assert_eq!(&facts.expect("facts").user, user)
                    }
                    _ => prop_assert!(facts.is_err()),
                }
            }
            other => prop_assert!(false, "not a startup: {:?}", other),
        }
    }

    /// A length word that disagrees with the packet is always refused.
    #[test]
    fn startup_lying_length(
        parameters in proptest::collection::vec((cstring(1), cstring(0)), 1..4),
        delta in prop_oneof![-8i64..0, 1i64..8],
    ) {
        let mut packet = encode_startup(3 << 16, &parameters);
        let lie = (packet.len() as i64 + delta).max(0) as u32;
        packet[..4].copy_from_slice(&lie.to_be_bytes());
        prop_assert!(parse_first_packet(Bytes::from(packet)).is_err());
    }

    /// A CancelRequest round-trips with a 4..=256-byte key; other key lengths are refused.
    #[test]
    fn cancel_requests(pid in any::<i32>(), length in 0usize..300, fill in any::<u8>()) {
        let secret = vec![fill; length];
        let mut packet = ((12 + length) as u32).to_be_bytes().to_vec();
        packet.extend(CANCEL_REQUEST_CODE.to_be_bytes());
        packet.extend(pid.to_be_bytes());
        packet.extend(&secret);
        let parsed = parse_first_packet(Bytes::from(packet));
        if (4..=256).contains(&length) {
            prop_assert_eq!(parsed, Ok(FirstPacket::Cancel { pid, secret: Bytes::from(secret) }));
        } else {
            prop_assert_eq!(parsed.unwrap_err().sqlstate(), "08P01");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: the header framer
// ---------------------------------------------------------------------------------------------

/// Message types the relay inspects on one side or the other.
const INSPECTED: &[u8] = b"EZKRpSAN";
const FRAME_LIMIT: usize = 2048;

fn frame_message(tag: u8, body: &[u8]) -> Vec<u8> {
    message(tag, body)
}

/// Runs a framer over `stream` delivered in `chunks`-sized reads, forwarding what it releases
/// after each read; returns the frames met (tag, wire length, inspected body) or the error.
#[allow(clippy::type_complexity)]
fn run_framer(
    stream: &[u8],
    chunk: usize,
    limit: usize,
) -> Result<Vec<(u8, usize, Option<Vec<u8>>)>, (u8, u32)> {
    let mut framer = Framer::new(TagSet::of(INSPECTED), limit);
    let mut buffer: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    let mut forwarded = 0;
    for piece in stream.chunks(chunk.max(1)) {
        buffer.extend_from_slice(piece);
        loop {
            match framer.next_frame(&buffer) {
                Ok(Some(frame)) => {
                    assert!(framer.released() <= buffer.len());
                    let body = frame.body.clone().map(|range| buffer[range].to_vec());
                    frames.push((frame.tag, frame.wire_len, body));
                }
                Ok(None) => break,
                Err(error) => return Err((error.tag, error.length)),
            }
        }
        let released = framer.released();
        assert!(released <= buffer.len());
        buffer.drain(..released);
        framer.consumed(released);
        forwarded += released;
    }
    assert!(forwarded <= stream.len());
    Ok(frames)
}

fn any_message() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (
        prop_oneof![Just(b'D'), Just(b'E'), Just(b'Z'), Just(b'Q'), any::<u8>()],
        proptest::collection::vec(any::<u8>(), 0..300),
    )
}

proptest! {
    /// A header whose length word is below 4 or above the limit is refused, whatever the tag
    /// and whatever was read before it; any other is accepted.
    #[test]
    fn framer_checks_every_length(
        tag in any::<u8>(),
        length in prop_oneof![0u32..8, any::<u32>(), (FRAME_LIMIT as u32 - 4)..(FRAME_LIMIT as u32 + 4)],
        before in proptest::collection::vec(any_message(), 0..3),
    ) {
        let mut stream: Vec<u8> = before.iter().flat_map(|(t, b)| frame_message(*t, b)).collect();
        stream.push(tag);
        stream.extend(length.to_be_bytes());
        let result = run_framer(&stream, stream.len(), FRAME_LIMIT);
        if (4..=FRAME_LIMIT as u32).contains(&length) {
            prop_assert!(result.is_ok(), "{:?}", result);
        } else {
            prop_assert_eq!(result.unwrap_err(), (tag, length));
        }
    }

    /// Well-formed messages read in any chunk size come out in order, with their lengths and
    /// (for inspected types) their exact bodies.
    #[test]
    fn framer_round_trip(
        messages in proptest::collection::vec(any_message(), 0..12),
        chunk in 1usize..64,
    ) {
        let stream: Vec<u8> = messages.iter().flat_map(|(t, b)| frame_message(*t, b)).collect();
        let frames = run_framer(&stream, chunk, FRAME_LIMIT).expect("valid stream");
        prop_assert_eq!(frames.len(), messages.len());
        for ((tag, body), (got_tag, wire_len, got_body)) in messages.iter().zip(&frames) {
            prop_assert_eq!(tag, got_tag);
            prop_assert_eq!(*wire_len, body.len() + 5);
            if let Some(got_body) = got_body {
                prop_assert!(INSPECTED.contains(tag));
                prop_assert_eq!(got_body, body);
            }
        }
    }

    /// Arbitrary bytes in arbitrary chunks: an error or frames, never a panic.
    #[test]
    fn framer_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..80,
        limit in 4usize..4096,
    ) {
        let _ = run_framer(&bytes, chunk, limit);
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: the options parser
// ---------------------------------------------------------------------------------------------

/// Escapes an argument the way libpq documents for `options`.
fn escape_argument(argument: &str) -> String {
    let mut escaped = String::new();
    for ch in argument.chars() {
        if ch == '\\' || ch.is_ascii_whitespace() {
            escaped.push('\\');
        }
        escaped.push(ch);
    }
    escaped
}

proptest! {
    /// Any text: no panic, and every found setting's name has its dashes made underscores.
    #[test]
    fn options_never_panic(text in ".{0,120}") {
        let _ = split_options(&text);
        for (name, _) in settings(&text) {
            prop_assert!(!name.contains('-'));
        }
        let _ = tenant(&text);
    }

    /// Escaped arguments joined by whitespace split back into the same arguments.
    #[test]
    fn options_round_trip(
        arguments in proptest::collection::vec(".{1,12}", 0..6),
        separator in prop_oneof![Just(" "), Just("  "), Just("\t"), Just(" \n ")],
    ) {
        let text = arguments
            .iter()
            .map(|argument| escape_argument(argument))
            .collect::<Vec<_>>()
            .join(separator);
        prop_assert_eq!(split_options(&text), arguments);
    }

    /// The tenant is found in every spelling, the last setting winning.
    #[test]
    fn options_tenant(
        value in "[^\\\\]{0,16}",
        spelling in 0usize..3,
        noise in proptest::collection::vec("[a-z_]{1,8}=[a-z0-9]{0,6}", 0..3),
    ) {
        let escaped = escape_argument(&value);
        let setting = match spelling {
            0 => format!("-c {TENANT_SETTING}={escaped}"),
            1 => format!("-c{TENANT_SETTING}={escaped}"),
            _ => format!("--{TENANT_SETTING}={escaped}"),
        };
        let mut text = noise.iter().map(|n| format!("-c {n}")).collect::<Vec<_>>();
        text.push(format!("-c {TENANT_SETTING}=earlier"));
        text.push(setting);
        prop_assert_eq!(tenant(&text.join(" ")), Some(value));
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: the SASL gs2-header reader
// ---------------------------------------------------------------------------------------------

fn sasl_initial_response(mechanism: &str, data: Option<&[u8]>) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    match data {
        Some(data) => {
            body.extend((data.len() as i32).to_be_bytes());
            body.extend(data);
        }
        None => body.extend((-1i32).to_be_bytes()),
    }
    body
}

proptest! {
    /// Any bytes: a value or an error, never a panic.
    #[test]
    fn sasl_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_sasl_initial_response(&bytes);
        let _ = gs2_channel_binding(&bytes);
    }

    /// A SASLInitialResponse built from a mechanism and data parses back to both.
    #[test]
    fn sasl_round_trip(
        mechanism in "[A-Z0-9-]{1,24}",
        data in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..120)),
    ) {
        let body = sasl_initial_response(&mechanism, data.as_deref());
        let parsed = parse_sasl_initial_response(&body).expect("well formed");
        prop_assert_eq!(parsed.mechanism, mechanism);
        prop_assert_eq!(parsed.channel_binding, data.as_deref().and_then(gs2_channel_binding));
    }

    /// Each GS2 flag is read back, whatever follows it.
    #[test]
    fn sasl_gs2_flags(
        flag in 0usize..3,
        name in "[a-z0-9-]{1,24}",
        rest in proptest::collection::vec(any::<u8>(), 0..60),
    ) {
        let (header, expected) = match flag {
            0 => ("n".to_string(), ChannelBinding::NotSupported),
            1 => ("y".to_string(), ChannelBinding::SupportedNotUsed),
            _ => (format!("p={name}"), ChannelBinding::Required(name.clone())),
        };
        let mut data = header.into_bytes();
        data.push(b',');
        data.extend(&rest);
        prop_assert_eq!(gs2_channel_binding(&data), Some(expected));
    }

    /// A data length that does not match what follows is refused, never trusted.
    #[test]
    fn sasl_lying_lengths(
        data in proptest::collection::vec(any::<u8>(), 0..60),
        declared in any::<i32>(),
    ) {
        prop_assume!(declared != data.len() as i32 && !(declared == -1 && data.is_empty()));
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend(declared.to_be_bytes());
        body.extend(&data);
        prop_assert_eq!(
            parse_sasl_initial_response(&body),
            Err(SaslError::LengthMismatch { declared, available: data.len() })
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Limits that protect memory, against a real pgshift
// ---------------------------------------------------------------------------------------------

/// A raw, logged-in session of the trusted bulk user (up to its first ReadyForQuery).
async fn raw_session(port: u16) -> tokio::net::TcpStream {
    support::wire::logged_in_session(port, BULK_USER, PROMPT).await
}

/// Reads to the close and expects exactly one FATAL ErrorResponse with `sqlstate`.
async fn expect_fatal_then_close(stream: &mut tokio::net::TcpStream, sqlstate: &str, what: &str) {
    let bytes = read_until_closed(stream, PROMPT)
        .await
        .unwrap_or_else(|got| panic!("{what}: still open after {PROMPT:?} ({got:?})"));
    let messages = split_messages(&bytes);
    assert_eq!(messages.len(), 1, "{what}: {messages:?}");
    let error = raw_error(messages[0].0, &messages[0].1);
    assert_eq!(error.severity, "FATAL", "{what}: {error:?}");
    assert_eq!(error.sqlstate, sqlstate, "{what}: {error:?}");
}

async fn assert_serves(proxy: &TestProxy, what: &str) {
    let client = tokio::time::timeout(PROMPT, proxy.connect(&proxy.bulk_dsn()))
        .await
        .unwrap_or_else(|_| panic!("after {what}: connect timed out"))
        .unwrap_or_else(|error| panic!("after {what}: {error}"));
    let row = client.query_one("SELECT 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 1);
}

/// `[listen] max_message_size` is enforced on client messages before anything is allocated
/// for them: a length word above it (or below 4) gets FATAL 08P01 and the close; a message
/// exactly at the limit is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_messages_above_max_message_size_get_08p01() {
    let pair = shared_pair();
    let limit = 1024usize;
    let proxy = TestProxy::start(
        pair,
        &format!("max_message_size = {limit}"),
        "green_weight = 50",
        None,
    )
    .await;

    // Exactly at the limit: a Query whose length word is 1024.
    let mut stream = raw_session(proxy.port).await;
    let mut sql = b"SELECT 1 -- ".to_vec();
    sql.resize(limit - 4 - 1, b'x');
    sql.push(0);
    let at_limit = message(b'Q', &sql);
    assert_eq!(at_limit.len(), 1 + limit);
    stream.write_all(&at_limit).await.expect("send");
    let mut tags = Vec::new();
    loop {
        let (tag, body) = expect_message(&mut stream, PROMPT).await;
        assert_ne!(tag, b'E', "at the limit: {:?}", error_field(&body, b'M'));
        tags.push(tag);
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags, b"TDCZ", "a message at the limit is relayed");
    drop(stream);

    // One byte above, only the header sent (the body is never waited for), and far above.
    for (length, what) in [
        (limit as u32 + 1, "one byte above max_message_size"),
        (u32::MAX, "a 4 GiB length word"),
        (i32::MAX as u32, "a 2 GiB length word"),
        (3, "a length word of 3"),
        (0, "a length word of 0"),
    ] {
        let mut stream = raw_session(proxy.port).await;
        let mut header = vec![b'Q'];
        header.extend(length.to_be_bytes());
        stream.write_all(&header).await.expect("send header");
        expect_fatal_then_close(&mut stream, "08P01", what).await;
        assert_serves(&proxy, what).await;
    }
    // An extended-protocol message too (Parse), after a valid one on the same session.
    let mut stream = raw_session(proxy.port).await;
    let mut bytes = message(b'S', &[]);
    bytes.push(b'P');
    bytes.extend((limit as u32 * 4).to_be_bytes());
    stream.write_all(&bytes).await.expect("send");
    let received = read_until_closed(&mut stream, PROMPT)
        .await
        .expect("closed in time");
    let messages = split_messages(&received);
    let last = messages.last().expect("an error");
    let error = raw_error(last.0, &last.1);
    assert_eq!(error.sqlstate, "08P01", "{error:?}");
    assert!(error.message.contains("length"), "{error:?}");

    let shared = proxy.proxy().shared().clone();
    let deadline = Instant::now() + PROMPT;
    while shared.sessions.count(None) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shared.sessions.count(None), 0, "refused sessions are gone");
    proxy.stop().await;
}

/// `[listen] max_clients_per_addr`: a client address holding that many sessions gets 53300
/// for the next one; cancels are never refused; a freed place is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_per_addr_refuses_with_53300() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "max_clients_per_addr = 2", "green_weight = 0", None).await;
    let first = proxy.connect(&proxy.bulk_dsn()).await.expect("first");
    let second = proxy.connect(&proxy.bulk_dsn()).await.expect("second");
    let error = proxy
        .connect(&proxy.bulk_dsn())
        .await
        .expect_err("a third session from 127.0.0.1 is refused");
    assert_eq!(sqlstate(&error).as_deref(), Some("53300"), "{error}");
    let message = error.as_db_error().map(|db| db.message().to_string());
    assert!(
        message.as_deref().is_some_and(|m| m.contains("127.0.0.1")),
        "{message:?}"
    );

    // A cancel from the same address still goes through while the address is full.
    let token = first.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = first.simple_query("SELECT pg_sleep(30)").await;
        (first, result)
    });
    let (first, result) = cancel_until_done(&token, sleeper).await;
    let error = result.expect_err("cancelled");
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"), "{error}");

    // A session closes: its address may open one again.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match proxy.connect(&proxy.bulk_dsn()).await {
            Ok(_third) => break,
            Err(error) if Instant::now() < deadline => {
                assert_eq!(sqlstate(&error).as_deref(), Some("53300"), "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the freed place was not given back: {error}"),
        }
    }
    drop(first);
    proxy.stop().await;
}

/// Sends the cancel of `token` until `task` (a query it should stop) ends: a cancel that
/// arrives before the query starts cancels nothing, so one try is not enough on a busy machine.
async fn cancel_until_done<T>(
    token: &tokio_postgres::CancelToken,
    mut task: tokio::task::JoinHandle<T>,
) -> T {
    for _ in 0..20 {
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel");
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(500), &mut task).await {
            return done.expect("task");
        }
    }
    panic!("the query was not cancelled within 10 s");
}

/// 10,000 CancelRequests with wrong keys, aimed at a real session's pid (the half of the key a
/// client sees in NotificationResponse): nothing is cancelled, each is dropped silently, and
/// the cost of each is one hash lookup (the total time is printed, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_cancel_keys_cancels_nothing() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "", "green_weight = 0", None).await;
    let shared = proxy.proxy().shared().clone();
    let client = proxy.connect(&proxy.bulk_dsn()).await.expect("session");
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(60)").await;
        result.map(|_| ())
    });
    let unknown_before = shared.stats.cancel_unknown.load(Ordering::Relaxed);
    let forwarded_before = shared.stats.cancel_forwarded.load(Ordering::Relaxed);

    const KEYS: usize = 10_000;
    const PARALLEL: usize = 16;
    const SLOW: Duration = Duration::from_secs(15);
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for lane in 0..PARALLEL {
        let port = proxy.port;
        senders.spawn(async move {
            for index in (lane..KEYS).step_by(PARALLEL) {
                let mut secret = [0u8; 4];
                rand::fill(&mut secret[..]);
                // A few keys of other lengths and pids too.
                let (pid, secret) = match index % 10 {
                    0 => (pid.wrapping_add(1), secret.to_vec()),
                    1 => (pid, vec![secret[0]; 32]),
                    _ => (pid, secret.to_vec()),
                };
                // Generous limits: this runs on a shared machine, 16 connections at a time.
                let mut stream = support::wire::connect(port, SLOW).await;
                stream
                    .write_all(&cancel_packet(pid, &secret))
                    .await
                    .expect("send cancel");
                let said = read_until_closed(&mut stream, SLOW)
                    .await
                    .expect("closed after a cancel");
                assert!(said.is_empty(), "nothing is said to a cancel: {said:?}");
            }
        });
    }
    while let Some(result) = senders.join_next().await {
        result.expect("sender");
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{KEYS} wrong cancel keys in {elapsed:?} ({:.1} µs each over {PARALLEL} connections)",
        elapsed.as_secs_f64() * 1e6 / KEYS as f64
    );

    if sleeper.is_finished() {
        panic!(
            "a wrong key ended the query: {:?}",
            sleeper.await.expect("task")
        );
    }
    let unknown = shared.stats.cancel_unknown.load(Ordering::Relaxed) - unknown_before;
    let forwarded = shared.stats.cancel_forwarded.load(Ordering::Relaxed) - forwarded_before;
    assert_eq!(forwarded, 0, "no wrong key was forwarded");
    assert_eq!(unknown, KEYS as u64, "every wrong key was counted unknown");
    // The right key still works after the flood.
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("the real cancel is accepted");
    let result = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("the real cancel takes effect")
        .expect("task");
    let error = result.expect_err("cancelled by the real key");
    assert_eq!(sqlstate(&error).as_deref(), Some("57014"), "{error}");
    proxy.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Nothing secret is logged
// ---------------------------------------------------------------------------------------------

/// `pgshift run` at `RUST_LOG=debug`, with passthrough auth and with auth termination
/// (`[auth] mode = "scram"`): sessions that log in with a password (SCRAM, md5 and cleartext
/// relayed; SCRAM run by pgshift itself) and run queries with recognisable text, a wrong
/// password, a cancel. Neither a password, nor a SCRAM message, nor the query text may appear
/// in what pgshift writes to stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_scram_message_or_query_text_reaches_the_log() {
    use support::{MD5_PASSWORD, MD5_USER, PLAIN_PASSWORD, PLAIN_USER, TEST_PASSWORD, TEST_USER};
    let passthrough: &[(&str, &str)] = &[
        (TEST_USER, TEST_PASSWORD),
        (MD5_USER, MD5_PASSWORD),
        (PLAIN_USER, PLAIN_PASSWORD),
    ];
    let scram = format!(
        "\n[auth]\nmode = \"scram\"\nauth_dsn = \"user={} dbname=postgres\"\nfailure_backoff = \"0s\"\n",
        support::SUPERUSER
    );
    let (log, logins) = logged_sessions("", passthrough).await;
    assert_nothing_secret(&log, "passthrough auth", logins);
    let (log, logins) = logged_sessions(&scram, &[(TEST_USER, TEST_PASSWORD)]).await;
    assert_nothing_secret(&log, "auth termination", logins);
}

const MARKER: &str = "query_text_marker_7d1f";

/// Runs `pgshift run` (config: the shared pair, then `extra` after `[routing]`) at debug with
/// sessions of `users`, a wrong password and a cancel; returns its stderr and the logins made.
async fn logged_sessions(extra: &str, users: &[(&str, &str)]) -> (String, usize) {
    use std::process::{Command, Stdio};
    use support::{TEST_PASSWORD, TEST_USER};

    let pair = shared_pair();
    let port = support::free_port();
    let (dir, path) = support::pgshift::write_config(&support::pgshift::config_text(
        pair,
        port,
        "",
        &format!("green_weight = 50\n{extra}"),
    ));
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgshift"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("pgshift run");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "pgshift did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut logins = 0;
    for &(user, password) in users {
        for _ in 0..2 {
            let dsn = format!(
                "host=127.0.0.1 port={port} user={user} password={password} dbname=app \
                 application_name=secrets_test"
            );
            let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|error| panic!("{user} logs in: {error}"));
            tokio::spawn(connection);
            logins += 1;
            let rows = client
                .simple_query(&format!("SELECT '{MARKER}' AS {MARKER}_column"))
                .await
                .expect("query");
            assert!(!rows.is_empty());
            let error = client
                .simple_query(&format!("SELECT {MARKER}_no_such_function()"))
                .await
                .expect_err("an error whose message quotes the query");
            assert_eq!(sqlstate(&error).as_deref(), Some("42883"), "{error}");
            client
                .execute(&format!("SELECT $1::text AS {MARKER}_param"), &[&MARKER])
                .await
                .expect("extended protocol");
        }
    }
    // A wrong password, and a cancel.
    let dsn = format!(
        "host=127.0.0.1 port={port} user={TEST_USER} password=wrong_pw_{MARKER} dbname=app"
    );
    let error = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password is refused");
    assert_eq!(sqlstate(&error).as_deref(), Some("28P01"), "{error}");
    let dsn =
        format!("host=127.0.0.1 port={port} user={TEST_USER} password={TEST_PASSWORD} dbname=app");
    let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .expect("login");
    tokio::spawn(connection);
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        client
            .simple_query(&format!("SELECT pg_sleep(10) AS {MARKER}_sleep"))
            .await
    });
    let cancelled = cancel_until_done(&token, sleeper).await;
    assert!(cancelled.is_err());

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exited.success(), "pgshift exits 0: {exited}");
    let log = std::fs::read_to_string(&log_path).expect("read the log");
    (log, logins + 1)
}

fn assert_nothing_secret(log: &str, what: &str, logins: usize) {
    use support::{MD5_PASSWORD, PLAIN_PASSWORD, TEST_PASSWORD};
    let started = log.matches("session started").count();
    assert!(
        started >= logins && log.contains("DEBUG"),
        "{what}: the log is at debug level and covers the {logins} sessions ({started}):\n{log}"
    );
    for secret in [
        TEST_PASSWORD,
        MD5_PASSWORD,
        PLAIN_PASSWORD,
        MARKER,
        "n,,n=",
        ",p=",
        "SCRAM-SHA-256\0",
    ] {
        assert!(
            !log.contains(secret),
            "{what}: {secret:?} appears in pgshift's log:\n{}",
            log.lines()
                .filter(|line| line.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// `[listen] max_message_size` bounds what a *client* may send (CONTRACT.md, config/pgshift.toml);
/// results from the database are not the client's to bound, and Postgres itself sends rows up
/// to 1 GiB per field: the backend → client framer only refuses lengths above i32::MAX.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_message_size_does_not_bound_what_the_database_sends() {
    let pair = shared_pair();
    let proxy = TestProxy::start(pair, "max_message_size = 1024", "green_weight = 50", None).await;
    let client = proxy.connect(&proxy.bulk_dsn()).await.expect("session");
    let rows = client
        .simple_query("SELECT repeat('x', 4000)")
        .await
        .expect("a 4 kB row through a 1 kB client limit");
    let values: Vec<usize> = rows
        .iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::len),
            _ => None,
        })
        .collect();
    assert_eq!(values, vec![4000], "the whole 4 kB row arrives");
    proxy.stop().await;
}
