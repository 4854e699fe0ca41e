//! The side conversation of a transparent cutover: queries pgshift runs on a frozen session's
//! own backend connection, which the client never sees, to read the session's state (settings,
//! prepared statements, channels listened to …) and to replay some of it on a new backend.
//!
//! Builders write the extended-protocol messages of one request into a buffer and return the
//! [`SideResponse`] that reads its answer:
//!
//! - [`side_query`]: Parse (a named statement, so the client's unnamed statement survives) +
//!   Bind (the unnamed portal, text parameters, text results) + Describe portal (the only way
//!   to get a RowDescription in the extended protocol: Execute sends none) + Execute (no row
//!   limit) + Close statement + Sync. An error skips everything up to Sync, the Close too: a
//!   failure says whether the statement was left behind ([`SideFailure::statement_open`]) and
//!   [`close_statement`] removes it. A name the client already uses fails at Parse (42P05)
//!   before anything is created, so the client's statement is never closed by mistake.
//! - [`parse_and_describe`], [`describe_statement`], [`parse_statement`], [`close_statement`]:
//!   re-create a client's named statement on a new backend and compare the Describe of both
//!   ([`SideResult::same_description`]).
//!
//! [`SideResponse::feed`] takes whole backend messages (tag and body, as framed by
//! [`super::framing`]; [`SideResponse::feed_buffer`] frames raw bytes read from the backend
//! itself) and checks each against what the request asks for. NoticeResponse,
//! NotificationResponse and ParameterStatus are not part of the conversation: they are
//! reported as [`Step::Forward`] for the caller to pass on as they are (or, on a new backend, to
//! swallow); PostgreSQL sends them after the last answer, just before ReadyForQuery. An ErrorResponse is kept and the conversation goes on to ReadyForQuery (the backend
//! skips to Sync); anything else out of place, or a malformed body, is a [`SideError`]: the
//! backend connection can no longer be trusted. Readers never panic on input.

use bytes::{BufMut, BytesMut};

use super::framing::BadLength;
use super::messages::{error_field, error_is_fatal, ready_status};

/// The prefix of the statement names side queries use ([`side_statement_name`]).
pub const SIDE_STATEMENT_PREFIX: &str = "pgshift_side_";

/// The most parameters a Parse or Bind can carry (PostgreSQL reads the count as an unsigned
/// 16-bit integer).
pub const MAX_PARAMETERS: usize = u16::MAX as usize;

/// The longest frontend message PostgreSQL accepts (its length word included), 1 GiB − 1.
pub const MAX_FRONTEND_MESSAGE: usize = (1 << 30) - 1;

/// The name of the `sequence`-th side statement of a session: `pgshift_side_<sequence>`.
pub fn side_statement_name(sequence: u64) -> String {
    format!("{SIDE_STATEMENT_PREFIX}{sequence}")
}

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

/// A request that cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A side query needs a named statement: the unnamed one is the client's.
    #[error("a side query needs a statement name (the unnamed statement belongs to the client)")]
    UnnamedStatement,
    /// A statement name or query text with a NUL byte (a C string on the wire).
    #[error("the {field} contains a NUL byte")]
    NulByte { field: &'static str },
    #[error("{count} parameters (at most {MAX_PARAMETERS})")]
    TooManyParameters { count: usize },
    #[error("a {tag:?} message of {length} bytes (at most {MAX_FRONTEND_MESSAGE})", tag = *.tag as char)]
    TooLong { tag: u8, length: usize },
}

/// Writes a side query for `statement` (a name of pgshift's, see [`side_statement_name`]):
/// Parse `sql` with `parameter_types` (type OIDs, 0 = let the server infer; may be fewer than
/// the parameters), Bind the unnamed portal with `parameters` in text format (`None` = NULL)
/// and every result column in text format, Describe the portal, Execute it without a row limit,
/// Close the statement, Sync. Nothing is written on an error.
pub fn side_query(
    out: &mut BytesMut,
    statement: &str,
    sql: &str,
    parameter_types: &[u32],
    parameters: &[Option<&str>],
) -> Result<SideResponse, BuildError> {
    if statement.is_empty() {
        return Err(BuildError::UnnamedStatement);
    }
    if parameters.len() > MAX_PARAMETERS {
        return Err(BuildError::TooManyParameters {
            count: parameters.len(),
        });
    }
    atomically(out, |out| {
        put_parse(out, statement, sql, parameter_types)?;
        put_message(out, b'B', |out| {
            put_cstr(out, "", "portal name")?;
            put_cstr(out, statement, "statement name")?;
            // No parameter format codes: all text.
            out.put_u16(0);
            out.put_u16(parameters.len() as u16);
            for parameter in parameters {
                match parameter {
                    None => out.put_i32(-1),
                    Some(value) => {
                        let length =
                            i32::try_from(value.len()).map_err(|_| BuildError::TooLong {
                                tag: b'B',
                                length: value.len(),
                            })?;
                        out.put_i32(length);
                        out.put_slice(value.as_bytes());
                    }
                }
            }
            // No result format codes: all text.
            out.put_u16(0);
            Ok(())
        })?;
        put_describe(out, b'P', "")?;
        put_message(out, b'E', |out| {
            put_cstr(out, "", "portal name")?;
            out.put_i32(0);
            Ok(())
        })?;
        put_close(out, statement)?;
        put_sync(out)
    })?;
    Ok(SideResponse::new(SideRequest::Query))
}

/// Writes Parse `sql` as `statement` with `parameter_types` + Describe the statement + Sync:
/// re-creates a client's statement on a new backend and reads its ParameterDescription and
/// RowDescription (or NoData). The statement stays.
pub fn parse_and_describe(
    out: &mut BytesMut,
    statement: &str,
    sql: &str,
    parameter_types: &[u32],
) -> Result<SideResponse, BuildError> {
    atomically(out, |out| {
        put_parse(out, statement, sql, parameter_types)?;
        put_describe(out, b'S', statement)?;
        put_sync(out)
    })?;
    Ok(SideResponse::new(SideRequest::ParseDescribe))
}

/// Writes Describe `statement` + Sync, for a statement the backend already has (the client's,
/// on the old backend).
pub fn describe_statement(out: &mut BytesMut, statement: &str) -> Result<SideResponse, BuildError> {
    atomically(out, |out| {
        put_describe(out, b'S', statement)?;
        put_sync(out)
    })?;
    Ok(SideResponse::new(SideRequest::Describe))
}

/// Writes Parse `sql` as `statement` with `parameter_types` + Sync: re-creates a client's
/// named statement on a new backend. The statement stays.
pub fn parse_statement(
    out: &mut BytesMut,
    statement: &str,
    sql: &str,
    parameter_types: &[u32],
) -> Result<SideResponse, BuildError> {
    atomically(out, |out| {
        put_parse(out, statement, sql, parameter_types)?;
        put_sync(out)
    })?;
    Ok(SideResponse::new(SideRequest::Parse))
}

/// Writes Close `statement` + Sync (closing a statement that does not exist is no error).
pub fn close_statement(out: &mut BytesMut, statement: &str) -> Result<SideResponse, BuildError> {
    atomically(out, |out| {
        put_close(out, statement)?;
        put_sync(out)
    })?;
    Ok(SideResponse::new(SideRequest::Close))
}

/// Runs `write`, taking back whatever it wrote if it fails.
fn atomically(
    out: &mut BytesMut,
    write: impl FnOnce(&mut BytesMut) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    let start = out.len();
    let result = write(out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Writes one message: `tag`, its length word, then what `body` writes.
fn put_message(
    out: &mut BytesMut,
    tag: u8,
    body: impl FnOnce(&mut BytesMut) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    let start = out.len();
    out.put_u8(tag);
    out.put_u32(0);
    body(out)?;
    let length = out.len() - start - 1;
    if length > MAX_FRONTEND_MESSAGE {
        return Err(BuildError::TooLong { tag, length });
    }
    out[start + 1..start + 5].copy_from_slice(&(length as u32).to_be_bytes());
    Ok(())
}

fn put_cstr(out: &mut BytesMut, text: &str, field: &'static str) -> Result<(), BuildError> {
    if text.as_bytes().contains(&0) {
        return Err(BuildError::NulByte { field });
    }
    out.put_slice(text.as_bytes());
    out.put_u8(0);
    Ok(())
}

fn put_parse(
    out: &mut BytesMut,
    statement: &str,
    sql: &str,
    parameter_types: &[u32],
) -> Result<(), BuildError> {
    if parameter_types.len() > MAX_PARAMETERS {
        return Err(BuildError::TooManyParameters {
            count: parameter_types.len(),
        });
    }
    put_message(out, b'P', |out| {
        put_cstr(out, statement, "statement name")?;
        put_cstr(out, sql, "query")?;
        out.put_u16(parameter_types.len() as u16);
        for &oid in parameter_types {
            out.put_u32(oid);
        }
        Ok(())
    })
}

/// Describe of a statement (`b'S'`) or portal (`b'P'`).
fn put_describe(out: &mut BytesMut, kind: u8, name: &str) -> Result<(), BuildError> {
    put_message(out, b'D', |out| {
        out.put_u8(kind);
        put_cstr(out, name, "statement name")
    })
}

fn put_close(out: &mut BytesMut, statement: &str) -> Result<(), BuildError> {
    put_message(out, b'C', |out| {
        out.put_u8(b'S');
        put_cstr(out, statement, "statement name")
    })
}

fn put_sync(out: &mut BytesMut) -> Result<(), BuildError> {
    put_message(out, b'S', |_| Ok(()))
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// Which request a [`SideResponse`] reads the answer to (each builder returns the right one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SideRequest {
    /// [`side_query`]: ParseComplete, BindComplete, RowDescription or NoData, DataRows,
    /// CommandComplete (or EmptyQueryResponse), CloseComplete, ReadyForQuery.
    Query,
    /// [`parse_and_describe`]: ParseComplete, ParameterDescription, RowDescription or NoData,
    /// ReadyForQuery.
    ParseDescribe,
    /// [`describe_statement`]: ParameterDescription, RowDescription or NoData, ReadyForQuery.
    Describe,
    /// [`parse_statement`]: ParseComplete, ReadyForQuery.
    Parse,
    /// [`close_statement`]: CloseComplete, ReadyForQuery.
    Close,
}

/// What the backend owes at one point of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    ParseComplete,
    BindComplete,
    ParameterDescription,
    /// RowDescription or NoData.
    Description,
    /// DataRows, then CommandComplete or EmptyQueryResponse.
    Rows,
    CloseComplete,
    Ready,
}

impl Expect {
    fn describe(self) -> &'static str {
        match self {
            Expect::ParseComplete => "ParseComplete",
            Expect::BindComplete => "BindComplete",
            Expect::ParameterDescription => "ParameterDescription",
            Expect::Description => "RowDescription or NoData",
            Expect::Rows => "DataRow or CommandComplete",
            Expect::CloseComplete => "CloseComplete",
            Expect::Ready => "ReadyForQuery",
        }
    }
}

impl SideRequest {
    fn plan(self) -> &'static [Expect] {
        use Expect::*;
        match self {
            SideRequest::Query => &[
                ParseComplete,
                BindComplete,
                Description,
                Rows,
                CloseComplete,
                Ready,
            ],
            SideRequest::ParseDescribe => {
                &[ParseComplete, ParameterDescription, Description, Ready]
            }
            SideRequest::Describe => &[ParameterDescription, Description, Ready],
            SideRequest::Parse => &[ParseComplete, Ready],
            SideRequest::Close => &[CloseComplete, Ready],
        }
    }
}

/// One field of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The table's OID when the column is one of a table's, else 0 (differs between clusters).
    pub table_oid: u32,
    /// The column's attribute number in that table, else 0.
    pub column: i16,
    pub type_oid: u32,
    /// `pg_type.typlen`: negative for variable-width types.
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary (always 0 in a statement's Describe: formats come with Bind).
    pub format: i16,
}

/// A successful conversation's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SideResult {
    /// The RowDescription's columns; `None` after NoData or for a request without Describe.
    pub columns: Option<Vec<Column>>,
    /// Every DataRow, in text format; `None` for NULL.
    pub rows: Vec<Vec<Option<String>>>,
    /// The CommandComplete tag (`SELECT 3`); `None` for an empty query or a request without
    /// Execute.
    pub command_tag: Option<String>,
    /// The ParameterDescription's type OIDs, for the Describe requests.
    pub parameter_types: Option<Vec<u32>>,
    /// The transaction status of the final ReadyForQuery (`I`, `T` or `E`).
    pub status: u8,
}

impl SideResult {
    /// The column names of the RowDescription (none after NoData).
    pub fn column_names(&self) -> Vec<&str> {
        self.columns
            .iter()
            .flatten()
            .map(|column| column.name.as_str())
            .collect()
    }

    /// True when two Describes of a statement say the same to a client: the same parameter
    /// types and, column by column, the same name, type, size, modifier and format (or both
    /// NoData). Table OIDs and attribute numbers are not compared: they differ between
    /// clusters for the same table, and clients use them only for metadata.
    pub fn same_description(&self, other: &SideResult) -> bool {
        let shape = |column: &Column| {
            (
                column.name.clone(),
                column.type_oid,
                column.type_size,
                column.type_modifier,
                column.format,
            )
        };
        let shapes = |result: &SideResult| {
            result
                .columns
                .as_ref()
                .map(|columns| columns.iter().map(shape).collect::<Vec<_>>())
        };
        self.parameter_types == other.parameter_types && shapes(self) == shapes(other)
    }
}

/// An ErrorResponse (or NoticeResponse) taken apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{severity} {sqlstate}: {message}")]
pub struct ServerError {
    /// The non-localized severity (`V`) when present, else the localized one (`S`).
    pub severity: String,
    /// Five ASCII letters or digits.
    pub sqlstate: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    /// Reads an ErrorResponse body; `None` unless it is well formed with a severity, a
    /// five-character SQLSTATE and a message. Texts not in UTF-8 are decoded lossily.
    pub fn parse(body: &[u8]) -> Option<ServerError> {
        let text = |code| error_field(body, code).map(|v| String::from_utf8_lossy(v).into_owned());
        let sqlstate = error_field(body, b'C')?;
        if sqlstate.len() != 5 || !sqlstate.iter().all(u8::is_ascii_alphanumeric) {
            return None;
        }
        Some(ServerError {
            severity: text(b'V').or_else(|| text(b'S'))?,
            sqlstate: String::from_utf8_lossy(sqlstate).into_owned(),
            message: text(b'M')?,
            detail: text(b'D'),
            hint: text(b'H'),
        })
    }
}

/// A conversation that ended with an ErrorResponse (then ReadyForQuery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideFailure {
    /// Boxed: it is the large rare case of every outcome.
    pub error: Box<ServerError>,
    /// The transaction status of the final ReadyForQuery.
    pub status: u8,
    /// The request's Parse succeeded and no Close followed: for a [`side_query`], its statement
    /// is still on the backend (the error skipped the Close); send [`close_statement`].
    pub statement_open: bool,
}

/// The end of a conversation: the answer, or the server's error.
pub type SideOutcome = Result<SideResult, SideFailure>;

/// What to do with a message fed to [`SideResponse::feed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read and kept; feed the next message.
    Consumed,
    /// Not part of the conversation (NoticeResponse, NotificationResponse, ParameterStatus):
    /// pass its bytes on as they are.
    Forward,
    /// ReadyForQuery ended the conversation: nothing more is fed.
    Finished(SideOutcome),
}

/// A backend that broke the protocol during a side conversation (or ended the session): its
/// connection can no longer be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SideError {
    #[error("unexpected message {tag:?} from the backend: expected {expected}", tag = *.tag as char)]
    Unexpected { tag: u8, expected: &'static str },
    #[error("malformed {message} from the backend")]
    Malformed { message: &'static str },
    #[error("a second RowDescription from the backend")]
    SecondRowDescription,
    #[error("a DataRow with {got} columns where the RowDescription has {expected}")]
    ColumnCount { expected: usize, got: usize },
    #[error("column {column} of row {row} is not valid UTF-8")]
    NotUtf8Value { row: usize, column: usize },
    #[error("the name of column {column} is not valid UTF-8")]
    NotUtf8Name { column: usize },
    /// A FATAL or PANIC ErrorResponse: the backend closes the connection.
    #[error("the backend ended the session: {0}")]
    Fatal(ServerError),
    #[error("message {tag:?} after the side conversation's ReadyForQuery", tag = *.tag as char)]
    AfterEnd { tag: u8 },
    /// A message length below 4 or above the limit ([`SideResponse::feed_buffer`]).
    #[error(transparent)]
    BadLength(BadLength),
}

/// Backend messages that are not part of a side conversation and go on to the client.
pub const FORWARDED: [u8; 3] = [b'N', b'A', b'S'];

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Running,
    Finished,
    Broken(SideError),
}

/// Reads the answer to one side request, message by message (see [`SideResponse::feed`]).
#[derive(Debug, Clone)]
pub struct SideResponse {
    request: SideRequest,
    /// Index of what is expected next in the request's plan.
    position: usize,
    state: State,
    parsed: bool,
    closed: bool,
    error: Option<ServerError>,
    result: SideResult,
}

impl SideResponse {
    /// A reader for `request`'s answer (the builders return one; this is for callers that
    /// write the messages themselves).
    pub fn new(request: SideRequest) -> SideResponse {
        SideResponse {
            request,
            position: 0,
            state: State::Running,
            parsed: false,
            closed: false,
            error: None,
            result: SideResult::default(),
        }
    }

    pub fn request(&self) -> SideRequest {
        self.request
    }

    /// True once ReadyForQuery ended the conversation.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Takes one whole backend message (`tag` and `body`, the length word off). After an error
    /// every later call returns that error again; after [`Step::Finished`], an error.
    pub fn feed(&mut self, tag: u8, body: &[u8]) -> Result<Step, SideError> {
        match &self.state {
            State::Running => {}
            State::Finished => return Err(SideError::AfterEnd { tag }),
            State::Broken(error) => return Err(error.clone()),
        }
        let step = self.step(tag, body);
        if let Err(error) = &step {
            self.state = State::Broken(error.clone());
        }
        step
    }

    /// Takes the whole messages at the front of `buffer` (bytes read from the backend), feeds
    /// each, appends those to forward to `for_client` (whole, as they came) and returns the
    /// outcome once ReadyForQuery ends the conversation; `Ok(None)` while more bytes are
    /// needed. A partial message stays in `buffer`, and so does whatever follows the final
    /// ReadyForQuery (it belongs to the session's usual stream). A message length below 4 or
    /// above `max_message_size` is an error.
    pub fn feed_buffer(
        &mut self,
        buffer: &mut BytesMut,
        for_client: &mut BytesMut,
        max_message_size: usize,
    ) -> Result<Option<SideOutcome>, SideError> {
        loop {
            match &self.state {
                State::Running => {}
                State::Finished => {
                    return Err(SideError::AfterEnd {
                        tag: buffer.first().copied().unwrap_or(0),
                    });
                }
                State::Broken(error) => return Err(error.clone()),
            }
            let Some(header) = buffer.get(..5) else {
                return Ok(None);
            };
            let tag = header[0];
            let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
            if length < 4 || length as usize > max_message_size {
                let error = SideError::BadLength(BadLength {
                    tag,
                    length,
                    limit: max_message_size,
                });
                self.state = State::Broken(error.clone());
                return Err(error);
            }
            let wire_len = 1 + length as usize;
            if buffer.len() < wire_len {
                return Ok(None);
            }
            let message = buffer.split_to(wire_len);
            match self.feed(tag, &message[5..])? {
                Step::Consumed => {}
                Step::Forward => for_client.extend_from_slice(&message),
                Step::Finished(outcome) => return Ok(Some(outcome)),
            }
        }
    }

    fn expect(&self) -> Expect {
        // The plan ends with Ready and nothing advances past it.
        self.request.plan()[self.position]
    }

    fn advance(&mut self) -> Step {
        self.position += 1;
        Step::Consumed
    }

    fn step(&mut self, tag: u8, body: &[u8]) -> Result<Step, SideError> {
        if FORWARDED.contains(&tag) {
            return Ok(Step::Forward);
        }
        if tag == b'E' {
            let error = ServerError::parse(body).ok_or(SideError::Malformed {
                message: "ErrorResponse",
            })?;
            if error_is_fatal(body) {
                return Err(SideError::Fatal(error));
            }
            if self.error.is_some() {
                return Err(SideError::Unexpected {
                    tag,
                    expected: "ReadyForQuery after an ErrorResponse",
                });
            }
            self.error = Some(error);
            return Ok(Step::Consumed);
        }
        if tag == b'Z' {
            if self.error.is_none() && self.expect() != Expect::Ready {
                return Err(SideError::Unexpected {
                    tag,
                    expected: self.expect().describe(),
                });
            }
            let status = ready_status(body).ok_or(SideError::Malformed {
                message: "ReadyForQuery",
            })?;
            self.state = State::Finished;
            return Ok(Step::Finished(self.outcome(status)));
        }
        if self.error.is_some() {
            return Err(SideError::Unexpected {
                tag,
                expected: "ReadyForQuery after an ErrorResponse",
            });
        }
        match (self.expect(), tag) {
            (Expect::ParseComplete, b'1') => {
                empty(body, "ParseComplete")?;
                self.parsed = true;
                Ok(self.advance())
            }
            (Expect::BindComplete, b'2') => {
                empty(body, "BindComplete")?;
                Ok(self.advance())
            }
            (Expect::CloseComplete, b'3') => {
                empty(body, "CloseComplete")?;
                self.closed = true;
                Ok(self.advance())
            }
            (Expect::ParameterDescription, b't') => {
                self.result.parameter_types = Some(parameter_description(body)?);
                Ok(self.advance())
            }
            (Expect::Description, b'T') => {
                self.result.columns = Some(row_description(body)?);
                Ok(self.advance())
            }
            (Expect::Description, b'n') => {
                empty(body, "NoData")?;
                Ok(self.advance())
            }
            (_, b'T') if self.result.columns.is_some() => Err(SideError::SecondRowDescription),
            (Expect::Rows, b'D') => {
                let Some(columns) = &self.result.columns else {
                    return Err(SideError::Unexpected {
                        tag,
                        expected: "CommandComplete (the statement returns no rows)",
                    });
                };
                let row = data_row(body, columns.len(), self.result.rows.len())?;
                self.result.rows.push(row);
                Ok(Step::Consumed)
            }
            (Expect::Rows, b'C') => {
                self.result.command_tag = Some(command_tag(body)?);
                Ok(self.advance())
            }
            (Expect::Rows, b'I') => {
                empty(body, "EmptyQueryResponse")?;
                Ok(self.advance())
            }
            (expect, _) => Err(SideError::Unexpected {
                tag,
                expected: expect.describe(),
            }),
        }
    }

    fn outcome(&mut self, status: u8) -> SideOutcome {
        match self.error.take() {
            Some(error) => Err(SideFailure {
                error: Box::new(error),
                status,
                statement_open: self.parsed && !self.closed,
            }),
            None => {
                let mut result = std::mem::take(&mut self.result);
                result.status = status;
                Ok(result)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Body readers
// ---------------------------------------------------------------------------------------------

/// A bounds-checked cursor over a message body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if count > self.0.len() {
            return None;
        }
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Some(taken)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A NUL-terminated string, without its NUL.
    fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let text = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Some(text)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn empty(body: &[u8], message: &'static str) -> Result<(), SideError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(SideError::Malformed { message })
    }
}

/// A ParameterDescription body: a count, then one type OID per parameter.
fn parameter_description(body: &[u8]) -> Result<Vec<u32>, SideError> {
    let malformed = SideError::Malformed {
        message: "ParameterDescription",
    };
    let mut body = Body(body);
    let count = body.u16().ok_or(malformed.clone())?;
    let mut types = Vec::new();
    for _ in 0..count {
        types.push(body.u32().ok_or(malformed.clone())?);
    }
    if !body.is_empty() {
        return Err(malformed);
    }
    Ok(types)
}

/// A RowDescription body: a count, then per field its name and six numbers.
fn row_description(body: &[u8]) -> Result<Vec<Column>, SideError> {
    let malformed = || SideError::Malformed {
        message: "RowDescription",
    };
    let mut body = Body(body);
    let count = body.u16().ok_or_else(malformed)?;
    let mut columns = Vec::new();
    for index in 0..usize::from(count) {
        let name = body.cstr().ok_or_else(malformed)?;
        let name = std::str::from_utf8(name)
            .map_err(|_| SideError::NotUtf8Name { column: index })?
            .to_string();
        let mut number = || -> Option<Column> {
            Some(Column {
                name: String::new(),
                table_oid: body.u32()?,
                column: body.i16()?,
                type_oid: body.u32()?,
                type_size: body.i16()?,
                type_modifier: body.i32()?,
                format: body.i16()?,
            })
        };
        let column = number().ok_or_else(malformed)?;
        columns.push(Column { name, ..column });
    }
    if !body.is_empty() {
        return Err(malformed());
    }
    Ok(columns)
}

/// A DataRow body with `expected` columns, row number `row`: text values, `None` for NULL.
fn data_row(body: &[u8], expected: usize, row: usize) -> Result<Vec<Option<String>>, SideError> {
    let malformed = || SideError::Malformed { message: "DataRow" };
    let mut body = Body(body);
    let count = usize::from(body.u16().ok_or_else(malformed)?);
    if count != expected {
        return Err(SideError::ColumnCount {
            expected,
            got: count,
        });
    }
    let mut values = Vec::with_capacity(count);
    for column in 0..count {
        let length = body.i32().ok_or_else(malformed)?;
        if length == -1 {
            values.push(None);
            continue;
        }
        let length = usize::try_from(length).map_err(|_| malformed())?;
        let bytes = body.take(length).ok_or_else(malformed)?;
        let text =
            std::str::from_utf8(bytes).map_err(|_| SideError::NotUtf8Value { row, column })?;
        values.push(Some(text.to_string()));
    }
    if !body.is_empty() {
        return Err(malformed());
    }
    Ok(values)
}

/// A CommandComplete body: one NUL-terminated ASCII tag.
fn command_tag(body: &[u8]) -> Result<String, SideError> {
    let malformed = SideError::Malformed {
        message: "CommandComplete",
    };
    let mut reader = Body(body);
    let tag = reader.cstr().ok_or(malformed.clone())?;
    if !reader.is_empty() || !tag.is_ascii() {
        return Err(malformed);
    }
    Ok(String::from_utf8_lossy(tag).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (tag, body) of every message in `bytes`, which must hold whole messages.
    fn messages(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut rest = bytes;
        let mut out = Vec::new();
        while !rest.is_empty() {
            let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            out.push((rest[0], rest[5..1 + length].to_vec()));
            rest = &rest[1 + length..];
        }
        out
    }

    fn row_description_body(names: &[&str]) -> Vec<u8> {
        let mut body = (names.len() as u16).to_be_bytes().to_vec();
        for (index, name) in names.iter().enumerate() {
            body.extend(name.as_bytes());
            body.push(0);
            body.extend(16_384u32.to_be_bytes()); // table OID
            body.extend((index as i16 + 1).to_be_bytes()); // attribute number
            body.extend(25u32.to_be_bytes()); // text
            body.extend((-1i16).to_be_bytes());
            body.extend((-1i32).to_be_bytes());
            body.extend(0i16.to_be_bytes());
        }
        body
    }

    fn data_row_body(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut body = (values.len() as u16).to_be_bytes().to_vec();
        for value in values {
            match value {
                None => body.extend((-1i32).to_be_bytes()),
                Some(bytes) => {
                    body.extend((bytes.len() as i32).to_be_bytes());
                    body.extend(*bytes);
                }
            }
        }
        body
    }

    fn parameter_description_body(oids: &[u32]) -> Vec<u8> {
        let mut body = (oids.len() as u16).to_be_bytes().to_vec();
        for oid in oids {
            body.extend(oid.to_be_bytes());
        }
        body
    }

    const ERROR_42P01: &[u8] =
        b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0P15\0Rparser\0\0";

    /// Feeds `answer` to `reader`; returns the steps (the last one decides).
    fn feed_all(reader: &mut SideResponse, answer: &[(u8, Vec<u8>)]) -> Vec<Step> {
        answer
            .iter()
            .map(|(tag, body)| reader.feed(*tag, body).expect("a valid answer"))
            .collect()
    }

    fn finished(steps: &[Step]) -> SideOutcome {
        match steps.last() {
            Some(Step::Finished(outcome)) => outcome.clone(),
            other => panic!("not finished: {other:?}"),
        }
    }

    /// A successful side query's answer with two columns and two rows.
    fn query_answer() -> Vec<(u8, Vec<u8>)> {
        vec![
            (b'1', vec![]),
            (b'2', vec![]),
            (b'T', row_description_body(&["name", "setting"])),
            (b'D', data_row_body(&[Some(b"search_path"), Some(b"a, b")])),
            (b'D', data_row_body(&[Some(b"work_mem"), None])),
            (b'C', b"SELECT 2\0".to_vec()),
            (b'3', vec![]),
            (b'Z', b"I".to_vec()),
        ]
    }

    #[test]
    fn side_query_bytes() {
        let mut out = BytesMut::from(&b"xx"[..]);
        side_query(
            &mut out,
            "pgshift_side_1",
            "SELECT $1, $2",
            &[25, 0],
            &[Some("v"), None],
        )
        .expect("builds");
        assert_eq!(&out[..2], b"xx", "appended after what was there");
        let sent = messages(&out[2..]);
        let tags: Vec<u8> = sent.iter().map(|(tag, _)| *tag).collect();
        assert_eq!(tags, b"PBDECS");
        let mut parse = b"pgshift_side_1\0SELECT $1, $2\0\0\x02".to_vec();
        parse.extend([0, 0, 0, 25, 0, 0, 0, 0]);
        assert_eq!(sent[0].1, parse);
        let mut bind = b"\0pgshift_side_1\0\0\0\0\x02".to_vec();
        bind.extend([0, 0, 0, 1, b'v', 0xff, 0xff, 0xff, 0xff, 0, 0]);
        assert_eq!(sent[1].1, bind);
        assert_eq!(sent[2].1, b"P\0");
        assert_eq!(sent[3].1, b"\0\0\0\0\0");
        assert_eq!(sent[4].1, b"Spgshift_side_1\0");
        assert!(sent[5].1.is_empty());
    }

    #[test]
    fn describe_parse_and_close_bytes() {
        let mut out = BytesMut::new();
        let reader = parse_and_describe(&mut out, "s1", "SELECT $1", &[23]).expect("builds");
        assert_eq!(reader.request(), SideRequest::ParseDescribe);
        let sent = messages(&out);
        assert_eq!(sent.iter().map(|m| m.0).collect::<Vec<_>>(), b"PDS");
        assert_eq!(sent[0].1, b"s1\0SELECT $1\0\0\x01\0\0\0\x17");
        assert_eq!(sent[1].1, b"Ss1\0");

        let mut out = BytesMut::new();
        describe_statement(&mut out, "s1").expect("builds");
        assert_eq!(
            messages(&out),
            vec![(b'D', b"Ss1\0".to_vec()), (b'S', vec![])]
        );

        let mut out = BytesMut::new();
        parse_statement(&mut out, "s1", "SELECT 1", &[]).expect("builds");
        assert_eq!(
            messages(&out),
            vec![(b'P', b"s1\0SELECT 1\0\0\0".to_vec()), (b'S', vec![])]
        );

        let mut out = BytesMut::new();
        close_statement(&mut out, "s1").expect("builds");
        assert_eq!(
            messages(&out),
            vec![(b'C', b"Ss1\0".to_vec()), (b'S', vec![])]
        );
        assert_eq!(side_statement_name(7), "pgshift_side_7");
    }

    #[test]
    fn refused_requests_write_nothing() {
        let mut out = BytesMut::from(&b"keep"[..]);
        assert_eq!(
            side_query(&mut out, "", "SELECT 1", &[], &[]).unwrap_err(),
            BuildError::UnnamedStatement
        );
        assert_eq!(
            side_query(&mut out, "s", "SELECT 1\0", &[], &[]).unwrap_err(),
            BuildError::NulByte { field: "query" }
        );
        assert_eq!(
            parse_statement(&mut out, "a\0b", "SELECT 1", &[]).unwrap_err(),
            BuildError::NulByte {
                field: "statement name"
            }
        );
        let many = vec![None; MAX_PARAMETERS + 1];
        assert_eq!(
            side_query(&mut out, "s", "SELECT 1", &[], &many).unwrap_err(),
            BuildError::TooManyParameters {
                count: MAX_PARAMETERS + 1
            }
        );
        let types = vec![0; MAX_PARAMETERS + 1];
        assert!(matches!(
            parse_and_describe(&mut out, "s", "SELECT 1", &types),
            Err(BuildError::TooManyParameters { .. })
        ));
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn reads_a_query_answer() {
        let mut reader = SideResponse::new(SideRequest::Query);
        let steps = feed_all(&mut reader, &query_answer());
        assert!(
            steps[..steps.len() - 1]
                .iter()
                .all(|s| *s == Step::Consumed)
        );
        let result = finished(&steps).expect("success");
        assert_eq!(result.column_names(), ["name", "setting"]);
        assert_eq!(
            result.rows,
            vec![
                vec![Some("search_path".to_string()), Some("a, b".to_string())],
                vec![Some("work_mem".to_string()), None],
            ]
        );
        assert_eq!(result.command_tag.as_deref(), Some("SELECT 2"));
        assert_eq!(result.status, b'I');
        assert_eq!(result.parameter_types, None);
        assert!(reader.is_finished());
        assert_eq!(
            reader.feed(b'Z', b"I"),
            Err(SideError::AfterEnd { tag: b'Z' })
        );
    }

    #[test]
    fn reads_no_data_and_empty_queries() {
        let mut reader = SideResponse::new(SideRequest::Query);
        let steps = feed_all(
            &mut reader,
            &[
                (b'1', vec![]),
                (b'2', vec![]),
                (b'n', vec![]),
                (b'C', b"SET\0".to_vec()),
                (b'3', vec![]),
                (b'Z', b"T".to_vec()),
            ],
        );
        let result = finished(&steps).expect("success");
        assert_eq!(result.columns, None);
        assert!(result.column_names().is_empty());
        assert_eq!(result.command_tag.as_deref(), Some("SET"));
        assert_eq!(result.status, b'T');

        let mut reader = SideResponse::new(SideRequest::Query);
        let steps = feed_all(
            &mut reader,
            &[
                (b'1', vec![]),
                (b'2', vec![]),
                (b'n', vec![]),
                (b'I', vec![]),
                (b'3', vec![]),
                (b'Z', b"I".to_vec()),
            ],
        );
        assert_eq!(finished(&steps).expect("success").command_tag, None);
    }

    #[test]
    fn forwards_notices_notifications_and_parameter_status() {
        let mut answer = query_answer();
        let notification = (b'A', b"\0\0\0\x07chan\0payload\0".to_vec());
        let notice = (b'N', b"SNOTICE\0VNOTICE\0C00000\0Mhello\0\0".to_vec());
        let status = (b'S', b"application_name\0side\0".to_vec());
        answer.insert(0, notification);
        answer.insert(3, notice);
        answer.insert(answer.len() - 1, status);
        let mut reader = SideResponse::new(SideRequest::Query);
        let steps = feed_all(&mut reader, &answer);
        let forwarded: Vec<usize> = steps
            .iter()
            .enumerate()
            .filter(|(_, step)| **step == Step::Forward)
            .map(|(index, _)| index)
            .collect();
        assert_eq!(forwarded, [0, 3, answer.len() - 2]);
        assert_eq!(finished(&steps).expect("success").rows.len(), 2);
    }

    #[test]
    fn an_error_runs_on_to_ready_for_query() {
        // Parse failed: nothing was created.
        let mut reader = SideResponse::new(SideRequest::Query);
        let steps = feed_all(
            &mut reader,
            &[
                (b'E', ERROR_42P01.to_vec()),
                (b'N', b"SNOTICE\0C00000\0Mx\0\0".to_vec()),
                (b'Z', b"I".to_vec()),
            ],
        );
        assert_eq!(steps[1], Step::Forward);
        let failure = finished(&steps).expect_err("the server's error");
        assert_eq!(failure.error.sqlstate, "42P01");
        assert_eq!(failure.error.severity, "ERROR");
        assert_eq!(failure.error.message, "relation \"nope\" does not exist");
        assert_eq!(failure.error.detail, None);
        assert_eq!(failure.status, b'I');
        assert!(!failure.statement_open);
        assert_eq!(
            failure.error.to_string(),
            "ERROR 42P01: relation \"nope\" does not exist"
        );

        // Execute failed after some rows: the Close was skipped, the statement stays.
        let mut reader = SideResponse::new(SideRequest::Query);
        let steps = feed_all(
            &mut reader,
            &[
                (b'1', vec![]),
                (b'2', vec![]),
                (b'T', row_description_body(&["q"])),
                (b'D', data_row_body(&[Some(b"1")])),
                (
                    b'E',
                    b"SERROR\0C22012\0Mdivision by zero\0Dsome detail\0Hsome hint\0\0".to_vec(),
                ),
                (b'Z', b"E".to_vec()),
            ],
        );
        let failure = finished(&steps).expect_err("the server's error");
        assert_eq!(failure.error.sqlstate, "22012");
        assert_eq!(failure.error.detail.as_deref(), Some("some detail"));
        assert_eq!(failure.error.hint.as_deref(), Some("some hint"));
        assert_eq!(failure.status, b'E');
        assert!(failure.statement_open);
    }

    #[test]
    fn reads_describes_and_compares_them() {
        let answer = |oids: &[u32], names: &[&str], table_oid: u32| {
            let mut description = row_description_body(names);
            if table_oid != 16_384 && !names.is_empty() {
                // Another cluster: the same table under another OID.
                let at = 2 + names[0].len() + 1;
                description[at..at + 4].copy_from_slice(&table_oid.to_be_bytes());
            }
            vec![
                (b'1', vec![]),
                (b't', parameter_description_body(oids)),
                (b'T', description),
                (b'Z', b"I".to_vec()),
            ]
        };
        let mut reader = SideResponse::new(SideRequest::ParseDescribe);
        let blue =
            finished(&feed_all(&mut reader, &answer(&[23, 25], &["a"], 16_384))).expect("success");
        assert_eq!(blue.parameter_types, Some(vec![23, 25]));
        let column = &blue.columns.as_ref().expect("columns")[0];
        assert_eq!(
            (column.name.as_str(), column.table_oid, column.column),
            ("a", 16_384, 1)
        );
        assert_eq!((column.type_oid, column.type_size), (25, -1));
        assert_eq!((column.type_modifier, column.format), (-1, 0));
        assert_eq!(blue.command_tag, None);

        let mut reader = SideResponse::new(SideRequest::ParseDescribe);
        let green =
            finished(&feed_all(&mut reader, &answer(&[23, 25], &["a"], 99))).expect("success");
        assert!(blue.same_description(&green), "table OIDs are not compared");
        let mut reader = SideResponse::new(SideRequest::ParseDescribe);
        let other =
            finished(&feed_all(&mut reader, &answer(&[23, 23], &["a"], 16_384))).expect("success");
        assert!(!blue.same_description(&other));
        let mut reader = SideResponse::new(SideRequest::ParseDescribe);
        let renamed =
            finished(&feed_all(&mut reader, &answer(&[23, 25], &["b"], 16_384))).expect("success");
        assert!(!blue.same_description(&renamed));

        // The statement already there: no ParseComplete; NoData.
        let mut reader = SideResponse::new(SideRequest::Describe);
        let steps = feed_all(
            &mut reader,
            &[
                (b't', parameter_description_body(&[])),
                (b'n', vec![]),
                (b'Z', b"I".to_vec()),
            ],
        );
        let no_data = finished(&steps).expect("success");
        assert_eq!(no_data.parameter_types, Some(vec![]));
        assert_eq!(no_data.columns, None);
        assert!(!no_data.same_description(&blue));
        assert!(no_data.same_description(&no_data.clone()));
    }

    #[test]
    fn reads_parse_and_close_answers() {
        let mut reader = SideResponse::new(SideRequest::Parse);
        let steps = feed_all(&mut reader, &[(b'1', vec![]), (b'Z', b"I".to_vec())]);
        assert_eq!(finished(&steps).expect("success").status, b'I');

        let mut reader = SideResponse::new(SideRequest::Parse);
        let steps = feed_all(
            &mut reader,
            &[
                (b'E', b"SERROR\0C42P05\0Mexists\0\0".to_vec()),
                (b'Z', b"I".to_vec()),
            ],
        );
        assert!(!finished(&steps).expect_err("error").statement_open);

        let mut reader = SideResponse::new(SideRequest::Close);
        let steps = feed_all(&mut reader, &[(b'3', vec![]), (b'Z', b"I".to_vec())]);
        assert_eq!(
            finished(&steps).expect("success"),
            SideResult {
                status: b'I',
                ..SideResult::default()
            }
        );
    }

    /// Feeds `answer` and returns the first error.
    fn first_error(request: SideRequest, answer: &[(u8, &[u8])]) -> SideError {
        let mut reader = SideResponse::new(request);
        for (tag, body) in answer {
            if let Err(error) = reader.feed(*tag, body) {
                // Sticky: the next message gets the same error.
                assert_eq!(reader.feed(b'Z', b"I"), Err(error.clone()));
                return error;
            }
        }
        panic!("no error for {answer:?}");
    }

    #[test]
    fn protocol_violations_are_errors() {
        use SideRequest::*;
        let description = row_description_body(&["a", "b"]);
        let one_value = data_row_body(&[Some(b"x")]);
        let not_utf8 = data_row_body(&[Some(b"x"), Some(b"\xff\xfe")]);
        let truncated = &description[..description.len() - 1];
        let unexpected = |tag: u8, expected| SideError::Unexpected { tag, expected };
        let malformed = |message| SideError::Malformed { message };
        // What the backend said before the message under test.
        let start: &[(u8, &[u8])] = &[];
        let bound: &[(u8, &[u8])] = &[(b'1', b""), (b'2', b"")];
        let no_data: &[(u8, &[u8])] = &[(b'1', b""), (b'2', b""), (b'n', b"")];
        let described: &[(u8, &[u8])] = &[(b'1', b""), (b'2', b""), (b'T', &description)];
        let executed: &[(u8, &[u8])] = &[(b'1', b""), (b'2', b""), (b'n', b""), (b'C', b"SET\0")];
        let failed: &[(u8, &[u8])] = &[(b'E', ERROR_42P01)];
        let after_error = "ReadyForQuery after an ErrorResponse";
        // (request, what came before, the message's tag and body, the error)
        type Case<'a> = (SideRequest, &'a [(u8, &'a [u8])], u8, &'a [u8], SideError);
        let cases: Vec<Case> = vec![
            // Out of order, unknown, or never expected.
            (Query, start, b'2', b"", unexpected(b'2', "ParseComplete")),
            (Query, start, b'Z', b"I", unexpected(b'Z', "ParseComplete")),
            (
                Query,
                start,
                b'K',
                b"12345678",
                unexpected(b'K', "ParseComplete"),
            ),
            (
                Query,
                bound,
                b'G',
                b"",
                unexpected(b'G', "RowDescription or NoData"),
            ),
            (
                Query,
                no_data,
                b's',
                b"",
                unexpected(b's', "DataRow or CommandComplete"),
            ),
            (
                Query,
                no_data,
                b'D',
                b"\0\0",
                unexpected(b'D', "CommandComplete (the statement returns no rows)"),
            ),
            (
                Query,
                executed,
                b'Z',
                b"I",
                unexpected(b'Z', "CloseComplete"),
            ),
            (
                Parse,
                &[(b'1', b"")],
                b'1',
                b"",
                unexpected(b'1', "ReadyForQuery"),
            ),
            (Close, start, b'1', b"", unexpected(b'1', "CloseComplete")),
            (
                Describe,
                start,
                b'1',
                b"",
                unexpected(b'1', "ParameterDescription"),
            ),
            (Query, failed, b'1', b"", unexpected(b'1', after_error)),
            (
                Query,
                failed,
                b'E',
                ERROR_42P01,
                unexpected(b'E', after_error),
            ),
            // A second RowDescription, wrong column counts, bytes that are not UTF-8.
            (
                Query,
                described,
                b'T',
                &description,
                SideError::SecondRowDescription,
            ),
            (
                Query,
                described,
                b'D',
                &one_value,
                SideError::ColumnCount {
                    expected: 2,
                    got: 1,
                },
            ),
            (
                Query,
                described,
                b'D',
                &not_utf8,
                SideError::NotUtf8Value { row: 0, column: 1 },
            ),
            (
                Query,
                bound,
                b'T',
                b"\0\x01\xff\0",
                SideError::NotUtf8Name { column: 0 },
            ),
            // Truncated or malformed bodies.
            (Query, start, b'1', b"x", malformed("ParseComplete")),
            (Query, &bound[..1], b'2', b"x", malformed("BindComplete")),
            (Query, bound, b'n', b"x", malformed("NoData")),
            (Query, bound, b'T', b"\0", malformed("RowDescription")),
            (Query, bound, b'T', truncated, malformed("RowDescription")),
            (
                Query,
                bound,
                b'T',
                b"\0\x01a\0",
                malformed("RowDescription"),
            ),
            (Query, bound, b'T', b"\0\0\0", malformed("RowDescription")),
            (Query, described, b'D', b"\0", malformed("DataRow")),
            (
                Query,
                described,
                b'D',
                b"\0\x02\0\0\0\x05ab",
                malformed("DataRow"),
            ),
            (
                Query,
                described,
                b'D',
                b"\0\x02\xff\xff\xff\xfe",
                malformed("DataRow"),
            ),
            (
                Query,
                described,
                b'D',
                b"\0\x02\xff\xff\xff\xff\xff\xff\xff\xff\0",
                malformed("DataRow"),
            ),
            (Query, no_data, b'C', b"SET", malformed("CommandComplete")),
            (
                Query,
                no_data,
                b'C',
                b"SET\0x",
                malformed("CommandComplete"),
            ),
            (
                Query,
                no_data,
                b'C',
                b"\xc3\xa9\0",
                malformed("CommandComplete"),
            ),
            (Query, no_data, b'I', b"x", malformed("EmptyQueryResponse")),
            (Query, executed, b'3', b"x", malformed("CloseComplete")),
            (
                Describe,
                start,
                b't',
                b"\0",
                malformed("ParameterDescription"),
            ),
            (
                Describe,
                start,
                b't',
                b"\0\x01\0\0\0",
                malformed("ParameterDescription"),
            ),
            (
                Describe,
                start,
                b't',
                b"\0\0\0",
                malformed("ParameterDescription"),
            ),
            (
                Close,
                &[(b'3', b"")],
                b'Z',
                b"X",
                malformed("ReadyForQuery"),
            ),
            (Close, &[(b'3', b"")], b'Z', b"", malformed("ReadyForQuery")),
            (
                Close,
                start,
                b'E',
                b"SERROR\0Mno code\0\0",
                malformed("ErrorResponse"),
            ),
            (
                Close,
                start,
                b'E',
                b"SERROR\0C42\0Mshort\0\0",
                malformed("ErrorResponse"),
            ),
            (
                Close,
                start,
                b'E',
                b"SERROR\0C42P01\0\0",
                malformed("ErrorResponse"),
            ),
            (
                Close,
                start,
                b'E',
                b"C42P01\0Mno severity\0\0",
                malformed("ErrorResponse"),
            ),
            (
                Close,
                start,
                b'E',
                b"SERROR\0C42P01\0Mcut\0",
                malformed("ErrorResponse"),
            ),
        ];
        for (request, before, tag, body, expected) in cases {
            let mut reader = SideResponse::new(request);
            for (before_tag, before_body) in before {
                assert_eq!(
                    reader.feed(*before_tag, before_body),
                    Ok(Step::Consumed),
                    "{request:?} {before:?}"
                );
            }
            let error = reader.feed(tag, body).expect_err("an error");
            assert_eq!(error, expected, "{request:?} {before:?} {tag:?} {body:?}");
            // Sticky: the next message gets the same error.
            assert_eq!(reader.feed(b'Z', b"I"), Err(error));
        }
    }

    /// `messages` on the wire, one after the other.
    fn wire(messages: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (tag, body) in messages {
            bytes.push(*tag);
            bytes.extend(((body.len() + 4) as u32).to_be_bytes());
            bytes.extend(body);
        }
        bytes
    }

    #[test]
    fn feeds_raw_bytes_in_any_split() {
        let mut answer = query_answer();
        answer.insert(2, (b'A', b"\0\0\0\x07chan\0payload\0".to_vec()));
        let forwarded = wire(&answer[2..3]);
        let mut bytes = wire(&answer);
        // What follows the ReadyForQuery is the session's own.
        let after = wire(&[(b'A', b"\0\0\0\x07chan\0later\0".to_vec())]);
        bytes.extend(&after);
        for split in 0..bytes.len() {
            let mut reader = SideResponse::new(SideRequest::Query);
            let mut buffer = BytesMut::from(&bytes[..split]);
            let mut for_client = BytesMut::new();
            let mut outcome = reader
                .feed_buffer(&mut buffer, &mut for_client, 1 << 20)
                .expect("valid");
            buffer.extend_from_slice(&bytes[split..]);
            if outcome.is_none() {
                outcome = reader
                    .feed_buffer(&mut buffer, &mut for_client, 1 << 20)
                    .expect("valid");
            }
            let result = outcome.expect("finished").expect("success");
            assert_eq!(result.rows.len(), 2);
            assert_eq!(&for_client[..], &forwarded[..], "split at {split}");
            assert_eq!(&buffer[..], &after[..], "split at {split}");
            assert!(matches!(
                reader.feed_buffer(&mut buffer, &mut for_client, 1 << 20),
                Err(SideError::AfterEnd { .. })
            ));
        }
    }

    #[test]
    fn feed_buffer_checks_lengths() {
        for (header, limit) in [([b'1', 0, 0, 0, 3], 1 << 20), ([b'D', 0, 1, 0, 0], 1000)] {
            let mut reader = SideResponse::new(SideRequest::Query);
            let mut buffer = BytesMut::from(&header[..]);
            let error = reader
                .feed_buffer(&mut buffer, &mut BytesMut::new(), limit)
                .expect_err("a bad length");
            assert!(matches!(error, SideError::BadLength(_)), "{error}");
            assert_eq!(reader.feed(b'1', b""), Err(error));
        }
        // A protocol error inside: the same error, sticky.
        let mut reader = SideResponse::new(SideRequest::Query);
        let mut buffer = BytesMut::from(&wire(&[(b'2', vec![])])[..]);
        let error = reader
            .feed_buffer(&mut buffer, &mut BytesMut::new(), 1 << 20)
            .expect_err("out of order");
        assert_eq!(
            reader.feed_buffer(&mut buffer, &mut BytesMut::new(), 1 << 20),
            Err(error)
        );
    }

    #[test]
    fn a_fatal_error_ends_the_conversation() {
        let error = first_error(
            SideRequest::Query,
            &[(
                b'E',
                b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
            )],
        );
        let SideError::Fatal(fatal) = error else {
            panic!("not fatal: {error:?}");
        };
        assert_eq!(fatal.sqlstate, "57P01");
        assert_eq!(fatal.severity, "FATAL");
    }

    /// Message types a backend sends, and a few it never does.
    fn any_tag() -> impl Strategy<Value = u8> {
        prop_oneof![
            proptest::sample::select(b"123ACDEIKNSTZnst".to_vec()),
            any::<u8>(),
        ]
    }

    fn any_request() -> impl Strategy<Value = SideRequest> {
        proptest::sample::select(vec![
            SideRequest::Query,
            SideRequest::ParseDescribe,
            SideRequest::Describe,
            SideRequest::Parse,
            SideRequest::Close,
        ])
    }

    proptest! {
        /// Arbitrary bytes fed as message bodies never panic, whatever the order of tags.
        #[test]
        fn arbitrary_messages_never_panic(
            request in any_request(),
            messages in proptest::collection::vec(
                (any_tag(), proptest::collection::vec(any::<u8>(), 0..64)),
                0..12,
            ),
        ) {
            let mut reader = SideResponse::new(request);
            for (tag, body) in &messages {
                let _ = reader.feed(*tag, body);
            }
        }

        /// Arbitrary raw bytes never panic the byte-level feeder either.
        #[test]
        fn arbitrary_bytes_never_panic(
            request in any_request(),
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut reader = SideResponse::new(request);
            let mut buffer = BytesMut::from(&bytes[..]);
            let _ = reader.feed_buffer(&mut buffer, &mut BytesMut::new(), 1 << 16);
        }

        /// Arbitrary bodies at the point where each message is expected never panic either
        /// (a random sequence rarely gets past ParseComplete).
        #[test]
        fn arbitrary_bodies_in_place_never_panic(
            tag in proptest::sample::select(b"TDCtIZE3n".to_vec()),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let description = row_description_body(&["a", "b"]);
            for prefix in [
                &[(b'1', &b""[..]), (b'2', b"")][..],
                &[(b'1', b""), (b'2', b""), (b'T', &description[..])],
                &[(b'1', b""), (b'2', b""), (b'n', b""), (b'C', b"SET\0")],
            ] {
                let mut reader = SideResponse::new(SideRequest::Query);
                for (prefix_tag, prefix_body) in prefix {
                    prop_assert!(reader.feed(*prefix_tag, prefix_body).is_ok());
                }
                let _ = reader.feed(tag, &body);
            }
            let mut reader = SideResponse::new(SideRequest::Describe);
            let _ = reader.feed(tag, &body);
            let _ = ServerError::parse(&body);
        }
    }
}
