//! The side conversation of a transparent cutover (`protocol::side_query`) against real
//! PostgreSQL: a raw session sets things up through simple Queries (SET, PREPARE, a
//! protocol-level Parse, LISTEN), then side queries on that same connection read its state
//! back, Describes compare on two backends, a failing side query leaves the connection usable,
//! and what arrives meanwhile (notifications, ParameterStatus) is reported for forwarding.

mod support;

use std::time::Duration;

use bytes::BytesMut;
use pgshift::protocol::side_query::{
    SIDE_STATEMENT_PREFIX, SideError, SideFailure, SideOutcome, SideResponse, SideResult,
    close_statement, describe_statement, parse_and_describe, parse_statement, side_query,
    side_statement_name,
};
use support::wire::{error_field, expect_message, message, split_messages};
use support::{BULK_USER, Cluster, shared_pair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(10);

/// The OIDs of `text` and `int4`.
const TEXT: u32 = 25;
const INT4: u32 = 23;

/// A raw, logged-in session of the trusted bulk user on database `app` (up to its first
/// ReadyForQuery).
async fn raw_session(cluster: &Cluster) -> TcpStream {
    support::wire::logged_in_session(cluster.port(), BULK_USER, PROMPT).await
}

/// Sends `bytes` and reads until ReadyForQuery; returns every message before it and its status.
async fn exchange(stream: &mut TcpStream, bytes: &[u8]) -> (Vec<(u8, Vec<u8>)>, u8) {
    stream.write_all(bytes).await.expect("send");
    let mut before = Vec::new();
    loop {
        let (tag, body) = expect_message(stream, PROMPT).await;
        if tag == b'Z' {
            return (before, body[0]);
        }
        before.push((tag, body));
    }
}

/// A simple Query that must succeed (status `I`).
async fn simple_query(stream: &mut TcpStream, sql: &str) -> Vec<(u8, Vec<u8>)> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    let (answer, status) = exchange(stream, &message(b'Q', &body)).await;
    for (tag, body) in &answer {
        assert_ne!(*tag, b'E', "{sql}: {:?}", error_field(body, b'M'));
    }
    assert_eq!(status, b'I', "{sql}");
    answer
}

/// The most a test believes a backend message to be.
const MAX_MESSAGE: usize = 1 << 20;

/// Sends `request`, feeds the bytes the backend answers with to `reader` until it ends, and
/// returns the outcome or the protocol error, and the messages to forward to the client (tag,
/// body), in order. Nothing may follow the final ReadyForQuery.
async fn try_converse(
    stream: &mut TcpStream,
    request: &[u8],
    mut reader: SideResponse,
) -> (Result<SideOutcome, SideError>, Vec<(u8, Vec<u8>)>) {
    stream.write_all(request).await.expect("send side request");
    let mut buffer = BytesMut::new();
    let mut for_client = BytesMut::new();
    let outcome = loop {
        match reader.feed_buffer(&mut buffer, &mut for_client, MAX_MESSAGE) {
            Ok(Some(outcome)) => break Ok(outcome),
            Ok(None) => {}
            Err(error) => break Err(error),
        }
        let read = tokio::time::timeout(PROMPT, stream.read_buf(&mut buffer))
            .await
            .expect("the backend answers in time")
            .expect("read from the backend");
        assert_ne!(read, 0, "the backend closed the connection");
    };
    if outcome.is_ok() {
        assert!(buffer.is_empty(), "bytes after ReadyForQuery: {buffer:?}");
    }
    (outcome, split_messages(&for_client))
}

/// Like [`try_converse`]; panics on a protocol error.
async fn converse(
    stream: &mut TcpStream,
    request: &[u8],
    reader: SideResponse,
) -> (SideOutcome, Vec<(u8, Vec<u8>)>) {
    let (outcome, forwarded) = try_converse(stream, request, reader).await;
    let outcome =
        outcome.unwrap_or_else(|error| panic!("protocol error in the side conversation: {error}"));
    (outcome, forwarded)
}

/// Runs a side query as statement `statement`; returns its outcome and forwarded messages.
async fn side(
    stream: &mut TcpStream,
    statement: &str,
    sql: &str,
    types: &[u32],
    parameters: &[Option<&str>],
) -> (SideOutcome, Vec<(u8, Vec<u8>)>) {
    let mut out = BytesMut::new();
    let reader = side_query(&mut out, statement, sql, types, parameters).expect("builds");
    converse(stream, &out, reader).await
}

/// A side query that must succeed with nothing to forward.
async fn side_ok(
    stream: &mut TcpStream,
    statement: &str,
    sql: &str,
    types: &[u32],
    parameters: &[Option<&str>],
) -> SideResult {
    let (outcome, forwarded) = side(stream, statement, sql, types, parameters).await;
    assert!(forwarded.is_empty(), "{sql}: forwarded {forwarded:?}");
    let result = outcome.unwrap_or_else(|failure| panic!("{sql}: {}", failure.error));
    assert_eq!(result.status, b'I', "{sql}");
    result
}

fn text(value: &str) -> Option<String> {
    Some(value.to_string())
}

/// The names in `pg_prepared_statements` with `from_sql`, read by a side query as
/// `statement`, sorted by name.
async fn prepared_statements(stream: &mut TcpStream, statement: &str) -> Vec<Vec<Option<String>>> {
    side_ok(
        stream,
        statement,
        "SELECT name, statement, pg_catalog.array_to_string(parameter_types, ','), \
         from_sql::pg_catalog.text FROM pg_catalog.pg_prepared_statements ORDER BY name",
        &[],
        &[],
    )
    .await
    .rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_queries_read_a_sessions_state() {
    let pair = shared_pair();
    let mut session = raw_session(&pair.blue).await;
    simple_query(
        &mut session,
        "SET search_path = a, b; SET work_mem = '7MB'; \
         PREPARE sql_level(pg_catalog.int4) AS SELECT $1 + 1; LISTEN side_channel",
    )
    .await;
    // A protocol-level named statement, and an unnamed one the side queries must not touch.
    let mut setup = message(b'P', b"client_level\0SELECT $1::pg_catalog.text\0\0\0");
    setup.extend(message(b'P', b"\0SELECT 42\0\0\0"));
    setup.extend(message(b'S', b""));
    let (answer, status) = exchange(&mut session, &setup).await;
    assert_eq!((answer.len(), status), (2, b'I'), "{answer:?}");

    // current_setting, with a text parameter and with a NULL one.
    let result = side_ok(
        &mut session,
        &side_statement_name(1),
        "SELECT pg_catalog.current_setting($1)",
        &[TEXT],
        &[Some("search_path")],
    )
    .await;
    assert_eq!(result.column_names(), ["current_setting"]);
    assert_eq!(result.rows, vec![vec![text("a, b")]]);
    assert_eq!(result.command_tag.as_deref(), Some("SELECT 1"));
    let result = side_ok(
        &mut session,
        &side_statement_name(2),
        "SELECT $1::pg_catalog.text IS NULL AS is_null, $1::pg_catalog.text AS value",
        &[],
        &[None],
    )
    .await;
    assert_eq!(result.rows, vec![vec![text("t"), None]]);

    // The settings this session changed.
    let result = side_ok(
        &mut session,
        &side_statement_name(3),
        "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' \
         ORDER BY name",
        &[],
        &[],
    )
    .await;
    assert_eq!(result.column_names(), ["name", "setting"]);
    assert!(
        result
            .rows
            .contains(&vec![text("search_path"), text("a, b")]),
        "{:?}",
        result.rows
    );
    assert!(
        result.rows.contains(&vec![text("work_mem"), text("7168")]),
        "{:?}",
        result.rows
    );

    // Prepared statements: the protocol-level one, the SQL one, and the side query itself
    // (it is prepared while it runs).
    let side_name = side_statement_name(4);
    let rows = prepared_statements(&mut session, &side_name).await;
    let names: Vec<_> = rows.iter().map(|row| row[0].clone()).collect();
    assert_eq!(
        names,
        [text("client_level"), text(&side_name), text("sql_level")],
        "{rows:?}"
    );
    assert_eq!(
        rows[0],
        [
            text("client_level"),
            text("SELECT $1::pg_catalog.text"),
            text("text"),
            text("false")
        ]
    );
    assert_eq!(rows[1][3], text("false"));
    assert_eq!(rows[2][2], text("integer"));
    assert_eq!(rows[2][3], text("true"));

    // Channels listened to.
    let result = side_ok(
        &mut session,
        &side_statement_name(5),
        "SELECT pg_catalog.pg_listening_channels()",
        &[],
        &[],
    )
    .await;
    assert_eq!(result.rows, vec![vec![text("side_channel")]]);

    // Every side statement was closed: only the client's remain.
    let rows = prepared_statements(&mut session, &side_statement_name(6)).await;
    let leftovers: Vec<_> = rows
        .iter()
        .filter_map(|row| row[0].clone())
        .filter(|name| name.starts_with(SIDE_STATEMENT_PREFIX))
        .collect();
    assert_eq!(leftovers, [side_statement_name(6)], "{rows:?}");

    // The client's unnamed statement is still there and still its own.
    let mut execute = message(b'B', b"\0\0\0\0\0\0\0\0");
    execute.extend(message(b'E', b"\0\0\0\0\0"));
    execute.extend(message(b'S', b""));
    let (answer, status) = exchange(&mut session, &execute).await;
    assert_eq!(status, b'I');
    let tags: Vec<u8> = answer.iter().map(|(tag, _)| *tag).collect();
    assert_eq!(tags, b"2DC", "{answer:?}");
    assert_eq!(answer[1].1, b"\0\x01\0\0\0\x0242");
    // And the session still works through a simple Query.
    simple_query(&mut session, "SELECT 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describes_compare_across_backends() {
    let pair = shared_pair();
    let sql = "SELECT $1::pg_catalog.int4 + 1 AS next, $2::pg_catalog.text AS label";
    // The client's statement on blue, parameter types left to the server.
    let mut blue = raw_session(&pair.blue).await;
    let mut parse = message(b'P', format!("client_stmt\0{sql}\0\0\0").as_bytes());
    parse.extend(message(b'S', b""));
    let (answer, status) = exchange(&mut blue, &parse).await;
    assert_eq!((answer.len(), status), (1, b'I'), "{answer:?}");
    let mut out = BytesMut::new();
    let reader = describe_statement(&mut out, "client_stmt").expect("builds");
    let (outcome, forwarded) = converse(&mut blue, &out, reader).await;
    assert!(forwarded.is_empty());
    let on_blue = outcome.expect("describe on blue");
    assert_eq!(on_blue.parameter_types, Some(vec![INT4, TEXT]));
    assert_eq!(on_blue.column_names(), ["next", "label"]);
    let columns = on_blue.columns.clone().expect("a RowDescription");
    assert_eq!(
        (columns[0].type_oid, columns[0].type_size, columns[0].format),
        (INT4, 4, 0)
    );
    assert_eq!((columns[1].type_oid, columns[1].type_size), (TEXT, -1));
    assert_eq!((columns[0].table_oid, columns[0].column), (0, 0));

    // Re-created on green under its name with the types blue reported: the same Describe.
    let mut green = raw_session(&pair.green).await;
    let types = on_blue.parameter_types.clone().expect("types");
    let mut out = BytesMut::new();
    let reader = parse_and_describe(&mut out, "client_stmt", sql, &types).expect("builds");
    let (outcome, _) = converse(&mut green, &out, reader).await;
    let on_green = outcome.expect("parse and describe on green");
    assert!(
        on_blue.same_description(&on_green),
        "{on_blue:?} {on_green:?}"
    );
    assert_eq!(on_blue, on_green);
    // It stays there, usable by the client under its name.
    let mut execute = message(
        b'B',
        b"\0client_stmt\0\0\0\0\x02\0\0\0\x0241\0\0\0\x01x\0\0",
    );
    execute.extend(message(b'E', b"\0\0\0\0\0"));
    execute.extend(message(b'S', b""));
    let (answer, status) = exchange(&mut green, &execute).await;
    assert_eq!(status, b'I');
    assert_eq!(answer[1].1, b"\0\x02\0\0\0\x0242\0\0\0\x01x", "{answer:?}");

    // Parse only, then Describe: the same again; with other types, a different Describe.
    let mut out = BytesMut::new();
    let reader = parse_statement(&mut out, "other_types", sql, &[TEXT, TEXT]).expect("builds");
    let (outcome, _) = converse(&mut green, &out, reader).await;
    assert_eq!(outcome.expect("parse").status, b'I');
    let mut out = BytesMut::new();
    let reader = describe_statement(&mut out, "other_types").expect("builds");
    let (outcome, _) = converse(&mut green, &out, reader).await;
    let other = outcome.expect("describe");
    assert_eq!(other.parameter_types, Some(vec![TEXT, TEXT]));
    assert!(!on_blue.same_description(&other));

    // A statement without a result: NoData on both.
    let mut out = BytesMut::new();
    let reader =
        parse_and_describe(&mut out, "no_rows", "SET work_mem = '8MB'", &[]).expect("builds");
    let (outcome, _) = converse(&mut blue, &out, reader).await;
    let no_rows = outcome.expect("no rows");
    assert_eq!(
        (no_rows.parameter_types.as_deref(), no_rows.columns.as_ref()),
        (Some(&[][..]), None)
    );
    // Re-creating a name that exists fails (42P05) and leaves the connection usable.
    let mut out = BytesMut::new();
    let reader = parse_statement(&mut out, "client_stmt", sql, &[]).expect("builds");
    let (outcome, _) = converse(&mut blue, &out, reader).await;
    let failure = outcome.expect_err("a duplicate name");
    assert_eq!(
        (failure.error.sqlstate.as_str(), failure.status),
        ("42P05", b'I')
    );
    assert!(!failure.statement_open);
    simple_query(&mut blue, "SELECT 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_side_queries_leave_the_session_usable() {
    let pair = shared_pair();
    let mut session = raw_session(&pair.blue).await;

    // An error at Parse: nothing was created.
    let (outcome, forwarded) = side(
        &mut session,
        &side_statement_name(1),
        "SELECT * FROM pg_catalog.no_such_table",
        &[],
        &[],
    )
    .await;
    assert!(forwarded.is_empty());
    let SideFailure {
        error,
        status,
        statement_open,
    } = outcome.expect_err("a missing table");
    assert_eq!(error.sqlstate, "42P01");
    assert_eq!(error.severity, "ERROR");
    assert!(error.message.contains("no_such_table"), "{error}");
    assert_eq!(status, b'I');
    assert!(!statement_open);

    // An error at Execute: the Close was skipped and the statement stays until closed.
    let name = side_statement_name(2);
    let (outcome, _) = side(
        &mut session,
        &name,
        "SELECT 1 / $1::pg_catalog.int4",
        &[],
        &[Some("0")],
    )
    .await;
    let failure = outcome.expect_err("a division by zero");
    assert_eq!(
        (failure.error.sqlstate.as_str(), failure.status),
        ("22012", b'I')
    );
    assert!(failure.statement_open);
    let rows = prepared_statements(&mut session, &side_statement_name(3)).await;
    assert!(rows.iter().any(|row| row[0] == text(&name)), "{rows:?}");
    let mut out = BytesMut::new();
    let reader = close_statement(&mut out, &name).expect("builds");
    let (outcome, _) = converse(&mut session, &out, reader).await;
    assert_eq!(outcome.expect("closed").status, b'I');
    let rows = prepared_statements(&mut session, &side_statement_name(4)).await;
    assert!(!rows.iter().any(|row| row[0] == text(&name)), "{rows:?}");
    // Closing a statement that is not there is no error.
    let mut out = BytesMut::new();
    let reader = close_statement(&mut out, &name).expect("builds");
    let (outcome, _) = converse(&mut session, &out, reader).await;
    assert_eq!(outcome.expect("closed").status, b'I');

    // The session works: a side query and a simple Query.
    let result = side_ok(&mut session, &side_statement_name(5), "SELECT 7", &[], &[]).await;
    assert_eq!(result.rows, vec![vec![text("7")]]);
    simple_query(&mut session, "SELECT 1").await;

    // Inside a transaction block, the status says so ('E' after an error, as Postgres has it).
    let (_, status) = exchange(&mut session, &message(b'Q', b"BEGIN\0")).await;
    assert_eq!(status, b'T');
    let (outcome, _) = side(
        &mut session,
        &side_statement_name(6),
        "SELECT * FROM no_such_table",
        &[],
        &[],
    )
    .await;
    assert_eq!(outcome.expect_err("a missing table").status, b'E');
    let (_, status) = exchange(&mut session, &message(b'Q', b"ROLLBACK\0")).await;
    assert_eq!(status, b'I');

    // A side statement name the client already uses: Parse fails (42P05) before anything is
    // created, so nothing is closed and the client's statement is left as it was.
    let taken = side_statement_name(9);
    let mut parse = message(
        b'P',
        format!("{taken}\0SELECT 'the client''s'\0\0\0").as_bytes(),
    );
    parse.extend(message(b'S', b""));
    let (_, status) = exchange(&mut session, &parse).await;
    assert_eq!(status, b'I');
    let (outcome, _) = side(&mut session, &taken, "SELECT 1", &[], &[]).await;
    let failure = outcome.expect_err("a name in use");
    assert_eq!(failure.error.sqlstate, "42P05");
    assert!(!failure.statement_open);
    let rows = prepared_statements(&mut session, &side_statement_name(10)).await;
    assert!(
        rows.contains(&vec![
            text(&taken),
            text("SELECT 'the client''s'"),
            text(""),
            text("false")
        ]),
        "{rows:?}"
    );

    // An empty query: NoData, EmptyQueryResponse, no command tag.
    let result = side_ok(&mut session, &side_statement_name(11), "", &[], &[]).await;
    assert_eq!((result.columns, result.command_tag), (None, None));
    // Two statements cannot be one prepared statement (42601 at Parse).
    let (outcome, _) = side(
        &mut session,
        &side_statement_name(12),
        "SELECT 1; SELECT 2",
        &[],
        &[],
    )
    .await;
    assert_eq!(outcome.expect_err("two statements").error.sqlstate, "42601");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_not_in_utf8_are_an_error() {
    let pair = shared_pair();
    let mut session = raw_session(&pair.blue).await;
    // Values come back in the session's client_encoding.
    let answer = simple_query(
        &mut session,
        "SET client_encoding = 'LATIN1'; SET pgshift_test.latin = 'caf\u{e9}'",
    )
    .await;
    assert!(
        answer.contains(&(b'S', b"client_encoding\0LATIN1\0".to_vec())),
        "{answer:?}"
    );
    let mut out = BytesMut::new();
    let reader = side_query(
        &mut out,
        &side_statement_name(1),
        "SELECT pg_catalog.current_setting('pgshift_test.latin')",
        &[],
        &[],
    )
    .expect("builds");
    let (outcome, _) = try_converse(&mut session, &out, reader).await;
    assert_eq!(
        outcome.expect_err("not UTF-8"),
        SideError::NotUtf8Value { row: 0, column: 0 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_parameter_status_are_forwarded() {
    let pair = shared_pair();
    let mut session = raw_session(&pair.blue).await;
    simple_query(&mut session, "LISTEN side_forward").await;
    let notifier = pair
        .blue
        .connect(BULK_USER, None, "app")
        .await
        .expect("connect the notifier");

    // A NOTIFY committed while the side query runs arrives before its ReadyForQuery.
    let notify = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        notifier
            .batch_execute("NOTIFY side_forward, 'meanwhile'")
            .await
            .expect("notify");
    });
    let (outcome, forwarded) = side(
        &mut session,
        &side_statement_name(1),
        "SELECT pg_catalog.pg_sleep(2)::pg_catalog.text",
        &[],
        &[],
    )
    .await;
    notify.await.expect("the notifier");
    let result = outcome.expect("the side query");
    assert_eq!(result.rows, vec![vec![text("")]]);
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    let (tag, body) = &forwarded[0];
    assert_eq!(*tag, b'A');
    assert_eq!(&body[4..], b"side_forward\0meanwhile\0");

    // A reported setting changed by a side query: ParameterStatus, forwarded.
    let (outcome, forwarded) = side(
        &mut session,
        &side_statement_name(2),
        "SELECT pg_catalog.set_config($1, $2, false)",
        &[TEXT, TEXT],
        &[Some("application_name"), Some("side talk")],
    )
    .await;
    assert_eq!(
        outcome.expect("set_config").rows,
        vec![vec![text("side talk")]]
    );
    assert_eq!(
        forwarded,
        [(b'S', b"application_name\0side talk\0".to_vec())]
    );

    // A notice (RAISE NOTICE in a DO block has no result: NoData, then CommandComplete DO).
    let (outcome, forwarded) = side(
        &mut session,
        &side_statement_name(3),
        "DO $$BEGIN RAISE NOTICE 'side notice'; END$$",
        &[],
        &[],
    )
    .await;
    let result = outcome.expect("DO");
    assert_eq!(
        (result.columns, result.command_tag.as_deref()),
        (None, Some("DO"))
    );
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    assert_eq!(forwarded[0].0, b'N');
    assert_eq!(
        error_field(&forwarded[0].1, b'M').as_deref(),
        Some("side notice")
    );
}
