//! What a frozen session carries that its new backend must get too, read from its own backend
//! with side queries the client never sees, and replayed on the new backend.
//!
//! Replayed, in this order: the settings made with `SET` (and the custom ones named in
//! `[cutover] carry_gucs`), `SET ROLE`, the protocol-level prepared statements (re-parsed under
//! their names with their parameter types; a Describe of each must say the same on both
//! backends), the LISTEN channels, `client_encoding`, and the unnamed statement (the relay's
//! copy of its Parse); a `SET SESSION AUTHORIZATION` goes first of all. A session is **unmovable** — closed with 57P01 at the
//! commit — when it holds what cannot be carried: temp tables, advisory locks, WITH HOLD
//! cursors, SQL-level `PREPARE`d statements. Never carried (no catalog shows them; documented in
//! docs/CUTOVER.md): currval/lastval, setseed, LOAD, PL session globals, dblink/fdw
//! connections; `pg_backend_pid()` changes.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::probe::table::quote_identifier;
use crate::protocol::messages;
use crate::protocol::side_query::{self, SideOutcome, SideRequest, SideResponse, SideResult};
use crate::proxy::cutover::Unmovable;
use crate::tls::BackendStream;

/// The name of the side statement (closed after each use; `pgshift_side_` + 1).
const SIDE_STATEMENT: &str = "pgshift_side_1";

/// The most a side query may take on a frozen session's backend.
const SIDE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings that `pg_settings` lists with source `session` but that are not the session's to
/// carry (they belong to the transaction, or are replayed apart).
const NOT_CARRIED: &[&str] = &[
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
    "session_authorization",
    "role",
];

/// The state query: one row.
const STATE_QUERY: &str = "SELECT \
    pg_catalog.current_setting('session_authorization'), \
    pg_catalog.current_setting('role'), \
    (SELECT pg_catalog.count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql)::pg_catalog.text, \
    (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class WHERE relpersistence OPERATOR(pg_catalog.=) 't' \
        AND relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema())::pg_catalog.text, \
    (SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks WHERE locktype OPERATOR(pg_catalog.=) 'advisory' \
        AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid())::pg_catalog.text, \
    (SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)::pg_catalog.text";

/// The settings query: (name, value) of every `SET` in force, then the carried custom ones.
const SETTINGS_QUERY: &str = "SELECT name, setting FROM pg_catalog.pg_settings \
    WHERE source OPERATOR(pg_catalog.=) 'session' \
    AND NOT name OPERATOR(pg_catalog.=) ANY($1::pg_catalog.text[]) \
    UNION SELECT name, pg_catalog.current_setting(name, true) \
    FROM pg_catalog.unnest($2::pg_catalog.text[]) AS name \
    WHERE pg_catalog.current_setting(name, true) IS NOT NULL ORDER BY 1";

/// The protocol-level prepared statements: name, text, parameter type OIDs.
const STATEMENTS_QUERY: &str = "SELECT name, statement, \
    parameter_types::pg_catalog.oid[]::pg_catalog.text \
    FROM pg_catalog.pg_prepared_statements \
    WHERE NOT from_sql AND name OPERATOR(pg_catalog.<>) $1 ORDER BY name";

/// Sets one setting for the session.
const SET_CONFIG: &str = "SELECT pg_catalog.set_config($1, $2, false)";

/// The channels the session listens to.
const CHANNELS_QUERY: &str = "SELECT pg_catalog.pg_listening_channels()";

/// A protocol-level prepared statement and what a Describe of it said on the old backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedStatement {
    pub name: String,
    pub sql: String,
    pub parameter_types: Vec<u32>,
    pub description: SideResult,
}

/// What a movable session replays on its new backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    /// `SET SESSION AUTHORIZATION` in force (`None`: the login user).
    pub session_authorization: Option<String>,
    /// The Parse message of the unnamed statement, parsed again last (after the client's
    /// encoding is set: its text is in that encoding).
    pub unnamed_parse: Option<Vec<u8>>,
    pub settings: Vec<(String, String)>,
    /// `SET ROLE` in force (`None`: `none`).
    pub role: Option<String>,
    pub statements: Vec<PreparedStatement>,
    pub channels: Vec<String>,
}

/// What the state query's row says must be replayed first: the session authorization (when
/// not the login user's) and the `SET ROLE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub session_authorization: Option<String>,
    pub role: Option<String>,
}

/// Judges the state query's row for a session that logged in as `user`.
pub fn judge_state(row: &[Option<String>], user: &str) -> Result<Identity, Unmovable> {
    let text = |index: usize| row.get(index).cloned().flatten().unwrap_or_default();
    let count = |index: usize| text(index).parse::<i64>().unwrap_or(0);
    let mut held = Vec::new();
    for (index, what) in [
        (2, "SQL-level PREPAREd statement(s)"),
        (3, "temporary table(s)"),
        (4, "advisory lock(s)"),
        (5, "WITH HOLD cursor(s)"),
    ] {
        let found = count(index);
        if found > 0 {
            held.push(format!("{found} {what}"));
        }
    }
    if !held.is_empty() {
        return Err(Unmovable(format!(
            "it holds {}, which a new backend would not have",
            held.join(", ")
        )));
    }
    let authorization = text(0);
    let role = text(1);
    Ok(Identity {
        session_authorization: (authorization != user).then_some(authorization),
        role: (role != "none" && !role.is_empty()).then_some(role),
    })
}

/// Reads the frozen session's state from its backend; the bytes to forward to its client
/// (notices, notifications, parameter changes that arrived meanwhile) are appended to
/// `for_client`.
pub async fn read(
    backend: &mut BackendStream,
    carry_gucs: &[String],
    user: &str,
    for_client: &mut BytesMut,
) -> Result<SessionState, Unmovable> {
    let state = run(backend, STATE_QUERY, &[], for_client).await?;
    let Identity {
        session_authorization,
        role,
    } = judge_state(state.rows.first().map_or(&[][..], Vec::as_slice), user)?;
    let not_carried = pg_array(NOT_CARRIED.iter().copied());
    let carried = pg_array(carry_gucs.iter().map(String::as_str));
    let settings = run(
        backend,
        SETTINGS_QUERY,
        &[Some(&not_carried), Some(&carried)],
        for_client,
    )
    .await?;
    let settings = settings
        .rows
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Some(name), Some(value)] => Some((name.clone(), value.clone())),
            _ => None,
        })
        .collect();
    let mut statements = Vec::new();
    let listed = run(
        backend,
        STATEMENTS_QUERY,
        &[Some(SIDE_STATEMENT)],
        for_client,
    )
    .await?;
    for row in listed.rows {
        let [Some(name), Some(sql), Some(types)] = row.as_slice() else {
            continue;
        };
        let parameter_types = parse_oid_array(types).ok_or_else(|| {
            Unmovable(format!(
                "the parameter types of statement {name:?}: {types}"
            ))
        })?;
        let description = request(
            backend,
            |out| side_query::describe_statement(out, name),
            for_client,
        )
        .await
        .map_err(|Unmovable(reason)| {
            Unmovable(format!("describing statement {name:?}: {reason}"))
        })?;
        statements.push(PreparedStatement {
            name: name.clone(),
            sql: sql.clone(),
            parameter_types,
            description,
        });
    }
    let channels = run(backend, CHANNELS_QUERY, &[], for_client)
        .await?
        .rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect();
    Ok(SessionState {
        session_authorization,
        unnamed_parse: None,
        settings,
        role,
        statements,
        channels,
    })
}

/// `{23,25}` → `[23, 25]`.
fn parse_oid_array(text: &str) -> Option<Vec<u32>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(',')
        .map(|oid| oid.trim().parse().ok())
        .collect()
}

/// Replays `state` on a new backend: one `set_config` per setting, then the role. The
/// ParameterStatus messages it causes are appended to `reported`.
pub async fn replay(
    backend: &mut BackendStream,
    state: &SessionState,
    reported: &mut BytesMut,
) -> Result<(), Unmovable> {
    // client_encoding changes how the backend reads the text sent after it: it goes last.
    let (encoding, settings): (Vec<_>, Vec<_>) = state
        .settings
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .partition(|(name, _)| *name == "client_encoding");
    for (name, value) in state
        .session_authorization
        .as_deref()
        .map(|user| ("session_authorization", user))
        .into_iter()
        .chain(settings)
        .chain(state.role.as_deref().map(|role| ("role", role)))
    {
        run(backend, SET_CONFIG, &[Some(name), Some(value)], reported)
            .await
            .map_err(|Unmovable(reason)| Unmovable(format!("replaying {name}: {reason}")))?;
    }
    for statement in &state.statements {
        let described = request(
            backend,
            |out| {
                side_query::parse_and_describe(
                    out,
                    &statement.name,
                    &statement.sql,
                    &statement.parameter_types,
                )
            },
            reported,
        )
        .await
        .map_err(|Unmovable(reason)| {
            Unmovable(format!(
                "re-preparing statement {:?}: {reason}",
                statement.name
            ))
        })?;
        if !described.same_description(&statement.description) {
            return Err(Unmovable(format!(
                "prepared statement {:?} describes differently on the new database (parameter or column types differ)",
                statement.name
            )));
        }
    }
    for channel in &state.channels {
        run(
            backend,
            &format!("LISTEN {}", quote_identifier(channel)),
            &[],
            reported,
        )
        .await
        .map_err(|Unmovable(reason)| Unmovable(format!("LISTEN {channel:?}: {reason}")))?;
    }
    for (name, value) in encoding {
        run(backend, SET_CONFIG, &[Some(name), Some(value)], reported)
            .await
            .map_err(|Unmovable(reason)| Unmovable(format!("replaying {name}: {reason}")))?;
    }
    if let Some(parse) = &state.unnamed_parse {
        request(
            backend,
            |out| {
                out.extend_from_slice(parse);
                out.extend_from_slice(&SYNC);
                Ok(SideResponse::new(SideRequest::Parse))
            },
            reported,
        )
        .await
        .map_err(|Unmovable(reason)| {
            Unmovable(format!("parsing its unnamed statement again: {reason}"))
        })?;
    }
    Ok(())
}

/// A Sync message.
const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

/// A text array literal of `items` (`{"a","b"}`), for a `text[]` parameter.
fn pg_array<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items
        .map(|item| format!("\"{}\"", item.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

/// Runs one side query on `backend` and reads its answer through ReadyForQuery; a failed one
/// leaves no statement behind.
async fn run(
    backend: &mut BackendStream,
    sql: &str,
    parameters: &[Option<&str>],
    for_client: &mut BytesMut,
) -> Result<SideResult, Unmovable> {
    request(
        backend,
        |out| side_query::side_query(out, SIDE_STATEMENT, sql, &[], parameters),
        for_client,
    )
    .await
}

/// Writes the request `build` makes and reads its answer; an error answer (after which a side
/// statement that stayed open is closed) or a backend that is not idle after it is unmovable.
async fn request(
    backend: &mut BackendStream,
    build: impl FnOnce(&mut BytesMut) -> Result<SideResponse, side_query::BuildError>,
    for_client: &mut BytesMut,
) -> Result<SideResult, Unmovable> {
    let mut message = BytesMut::new();
    let response = build(&mut message)
        .map_err(|error| Unmovable(format!("a side request cannot be built: {error}")))?;
    let outcome = converse(backend, &message, response, for_client).await?;
    let failure = match outcome {
        Ok(result) if result.status == b'I' => return Ok(result),
        Ok(result) => {
            return Err(Unmovable(format!(
                "its backend is not idle after a side request (status {})",
                result.status as char
            )));
        }
        Err(failure) => failure,
    };
    if failure.statement_open {
        let mut close = BytesMut::new();
        if let Ok(response) = side_query::close_statement(&mut close, SIDE_STATEMENT) {
            let _ = converse(backend, &close, response, for_client).await;
        }
    }
    Err(Unmovable(format!(
        "{} ({})",
        failure.error.message, failure.error.sqlstate
    )))
}

/// Sends `request` and feeds the backend's messages to `response` until ReadyForQuery. What
/// the backend sent after it (asynchronous messages) is read up to a message boundary and goes
/// to `for_client` too, so the session's stream resumes whole.
async fn converse(
    backend: &mut BackendStream,
    request: &[u8],
    mut response: SideResponse,
    for_client: &mut BytesMut,
) -> Result<SideOutcome, Unmovable> {
    let conversation = async {
        backend
            .write_all(request)
            .await
            .map_err(|e| e.to_string())?;
        backend.flush().await.map_err(|e| e.to_string())?;
        let mut buffer = BytesMut::with_capacity(4096);
        let outcome = loop {
            if let Some(outcome) = response
                .feed_buffer(&mut buffer, for_client, side_query::MAX_FRONTEND_MESSAGE)
                .map_err(|e| e.to_string())?
            {
                break outcome;
            }
            read_more(backend, &mut buffer).await?;
        };
        while messages::split_messages(&buffer).is_none() {
            read_more(backend, &mut buffer).await?;
        }
        for_client.extend_from_slice(&buffer);
        Ok::<_, String>(outcome)
    };
    tokio::time::timeout(SIDE_TIMEOUT, conversation)
        .await
        .map_err(|_| {
            Unmovable(format!(
                "its backend did not answer a side query within {SIDE_TIMEOUT:?}"
            ))
        })?
        .map_err(|error| Unmovable(format!("its backend, during a side query: {error}")))
}

async fn read_more(backend: &mut BackendStream, buffer: &mut BytesMut) -> Result<(), String> {
    match backend.read_buf(buffer).await {
        Ok(0) => Err("it closed the connection".to_string()),
        Ok(_) => Ok(()),
        Err(error) => Err(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some(v.to_string())).collect()
    }

    #[test]
    fn a_plain_session_moves_with_its_role() {
        assert_eq!(
            judge_state(&row(&["app", "none", "0", "0", "0", "0"]), "app"),
            Ok(Identity::default())
        );
        assert_eq!(
            judge_state(&row(&["auditor", "reporting", "0", "0", "0", "0"]), "app"),
            Ok(Identity {
                session_authorization: Some("auditor".into()),
                role: Some("reporting".into()),
            })
        );
    }

    #[test]
    fn state_a_new_backend_lacks_makes_a_session_unmovable() {
        let Err(Unmovable(reason)) =
            judge_state(&row(&["postgres", "none", "2", "1", "3", "1"]), "app")
        else {
            panic!("unmovable");
        };
        assert_eq!(
            reason,
            "it holds 2 SQL-level PREPAREd statement(s), 1 temporary table(s), 3 advisory lock(s), 1 WITH HOLD cursor(s), which a new backend would not have"
        );
    }

    #[test]
    fn the_side_statement_is_named_like_every_side_statement() {
        assert_eq!(SIDE_STATEMENT, side_query::side_statement_name(1));
    }

    #[test]
    fn oid_arrays_are_read() {
        assert_eq!(parse_oid_array("{}"), Some(vec![]));
        assert_eq!(parse_oid_array("{23,25}"), Some(vec![23, 25]));
        assert_eq!(parse_oid_array("{23,x}"), None);
        assert_eq!(parse_oid_array("23"), None);
    }

    #[test]
    fn arrays_are_quoted() {
        assert_eq!(
            pg_array(["a", "b\"c", "d\\e"].into_iter()),
            r#"{"a","b\"c","d\\e"}"#
        );
    }
}
