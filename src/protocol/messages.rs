//! The few messages pgshift builds (ErrorResponse, CancelRequest, Terminate) or reads
//! (ErrorResponse's SQLSTATE and other fields, ReadyForQuery's status, BackendKeyData).
//!
//! Readers take a message body already framed by [`super::framing`] (length checked, exactly
//! one message) and never panic: pgwire's decoders trust their input, so bodies are checked
//! here before one is handed to them, and the hot-path readers (SQLSTATE, status) are plain
//! byte scans.

use bytes::{Bytes, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{BackendKeyData, SecretKey};
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};

use super::startup::{MAX_CANCEL_KEY_LEN, MIN_CANCEL_KEY_LEN};

/// A Terminate message ('X'), sent to a backend whose client went away.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// ErrorResponse severities pgshift sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error pgshift reports to a client: SQLSTATE, message and optional detail and hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub severity: Severity,
    pub sqlstate: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ClientError {
    /// A FATAL error: the connection closes after it.
    pub fn fatal(sqlstate: &'static str, message: impl Into<String>) -> ClientError {
        ClientError {
            severity: Severity::Fatal,
            sqlstate,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// An ERROR: the request fails, the session goes on.
    pub fn error(sqlstate: &'static str, message: impl Into<String>) -> ClientError {
        ClientError {
            severity: Severity::Error,
            ..ClientError::fatal(sqlstate, message)
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> ClientError {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> ClientError {
        self.hint = Some(hint.into());
        self
    }

    /// The ErrorResponse message on the wire.
    pub fn encode(&self) -> BytesMut {
        let severity = self.severity.as_str().to_string();
        let mut fields = vec![
            (b'S', severity.clone()),
            (b'V', severity),
            (b'C', self.sqlstate.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(detail) = &self.detail {
            fields.push((b'D', detail.clone()));
        }
        if let Some(hint) = &self.hint {
            fields.push((b'H', hint.clone()));
        }
        let mut buffer = BytesMut::new();
        // Encoding an ErrorResponse fails only above i32::MAX bytes; ours are short texts.
        if ErrorResponse::new(fields).encode(&mut buffer).is_err() {
            buffer.clear();
        }
        buffer
    }
}

/// The SQLSTATE ('C' field) of an ErrorResponse body; `None` when it has none or is malformed.
pub fn error_sqlstate(body: &[u8]) -> Option<[u8; 5]> {
    let mut rest = body;
    while let Some((&code, after_code)) = rest.split_first() {
        if code == 0 {
            return None;
        }
        let end = after_code.iter().position(|&b| b == 0)?;
        if code == b'C' {
            return after_code[..end].try_into().ok();
        }
        rest = &after_code[end + 1..];
    }
    None
}

/// One field of an ErrorResponse or NoticeResponse body (`b'M'` message, `b'D'` detail,
/// `b'S'` severity …), its first occurrence; `None` when the body has no such field or is not
/// well formed (every field a code byte and a NUL-terminated value, one final NUL, nothing
/// after it).
pub fn error_field(body: &[u8], code: u8) -> Option<&[u8]> {
    let mut found = None;
    let mut rest = body;
    loop {
        let (&field, after_code) = rest.split_first()?;
        if field == 0 {
            return if after_code.is_empty() { found } else { None };
        }
        let end = after_code.iter().position(|&b| b == 0)?;
        if field == code && found.is_none() {
            found = Some(&after_code[..end]);
        }
        rest = &after_code[end + 1..];
    }
}

/// True when an ErrorResponse body says FATAL or PANIC: the backend closes after it.
pub fn error_is_fatal(body: &[u8]) -> bool {
    let mut rest = body;
    let mut severity: Option<&[u8]> = None;
    while let Some((&code, after_code)) = rest.split_first() {
        let Some(end) = after_code.iter().position(|&b| b == 0) else {
            break;
        };
        match code {
            0 => break,
            b'V' => severity = Some(&after_code[..end]),
            b'S' if severity.is_none() => severity = Some(&after_code[..end]),
            _ => {}
        }
        rest = &after_code[end + 1..];
    }
    matches!(severity, Some(b"FATAL" | b"PANIC"))
}

/// The transaction status byte of a ReadyForQuery body (`I`, `T` or `E`).
pub fn ready_status(body: &[u8]) -> Option<u8> {
    match body {
        [status @ (b'I' | b'T' | b'E')] => Some(*status),
        _ => None,
    }
}

/// The backend PID and secret of a BackendKeyData body (protocol 3.2 key lengths allowed).
pub fn backend_key(body: &[u8]) -> Option<(i32, Bytes)> {
    let secret_len = body.len().checked_sub(4)?;
    if !(MIN_CANCEL_KEY_LEN..=MAX_CANCEL_KEY_LEN).contains(&secret_len) {
        return None;
    }
    let mut message = BytesMut::with_capacity(body.len() + 5);
    message.extend_from_slice(b"K");
    message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    message.extend_from_slice(body);
    // A 3.2 context reads the whole key whatever its length; a 3.0 one would read 4 bytes.
    let context = DecodeContext::new(ProtocolVersion::PROTOCOL3_2);
    match BackendKeyData::decode(&mut message, &context) {
        Ok(Some(key)) => Some((key.pid, key.secret_key.to_bytes())),
        _ => None,
    }
}

/// The name and value of a ParameterStatus body (two NUL-terminated UTF-8 strings).
pub fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let name_end = body.iter().position(|&byte| byte == 0)?;
    let rest = &body[name_end + 1..];
    let value_end = rest.iter().position(|&byte| byte == 0)?;
    if value_end + 1 != rest.len() {
        return None;
    }
    let name = std::str::from_utf8(&body[..name_end]).ok()?;
    let value = std::str::from_utf8(&rest[..value_end]).ok()?;
    Some((name, value))
}

/// A ParameterStatus message for `name` = `value`.
pub fn parameter_status_message(name: &str, value: &str) -> BytesMut {
    let length = 4 + name.len() + 1 + value.len() + 1;
    let mut message = BytesMut::with_capacity(1 + length);
    message.extend_from_slice(b"S");
    message.extend_from_slice(&(length as u32).to_be_bytes());
    message.extend_from_slice(name.as_bytes());
    message.extend_from_slice(&[0]);
    message.extend_from_slice(value.as_bytes());
    message.extend_from_slice(&[0]);
    message
}

/// Splits bytes holding whole backend messages into (tag, body); `None` when they do not end
/// at a message boundary or a length is impossible.
pub fn split_messages(mut bytes: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut messages = Vec::new();
    while !bytes.is_empty() {
        let header = bytes.get(..5)?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let end = 1usize.checked_add(length).filter(|_| length >= 4)?;
        let message = bytes.get(..end)?;
        messages.push((header[0], &message[5..]));
        bytes = &bytes[end..];
    }
    Some(messages)
}

/// A ReadyForQuery message with transaction status `status`.
pub fn ready_for_query(status: u8) -> [u8; 6] {
    [b'Z', 0, 0, 0, 5, status]
}

/// Where the first whole request in client bytes ends: after a simple Query (`Q`) or after
/// the Sync (`S`) that closes an extended-protocol batch. `None` while none is whole.
pub fn first_request_end(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 5) {
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let end = at.checked_add(1)?.checked_add(length.max(4))?;
        if end > bytes.len() {
            return None;
        }
        if matches!(header[0], b'Q' | b'S') {
            return Some(end);
        }
        at = end;
    }
    None
}

/// The whole message (tag, length, body) for `body`.
pub fn whole_message(tag: u8, body: &[u8]) -> BytesMut {
    let mut message = BytesMut::with_capacity(5 + body.len());
    message.extend_from_slice(&[tag]);
    message.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    message.extend_from_slice(body);
    message
}

/// A CancelRequest packet for `pid` with `secret` (4 to 256 bytes).
pub fn cancel_request(pid: i32, secret: &Bytes) -> BytesMut {
    let mut buffer = BytesMut::with_capacity(12 + secret.len());
    let request = CancelRequest::new(pid, SecretKey::Bytes(secret.clone()));
    if request.encode(&mut buffer).is_err() {
        buffer.clear();
    }
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_request_ends_at_a_query_or_a_sync() {
        let mut batch = whole_message(b'P', b"\0SELECT 1\0\0\0").to_vec();
        batch.extend_from_slice(&whole_message(b'B', b"\0\0\0\0\0\0\0\0"));
        assert_eq!(first_request_end(&batch), None, "no Sync yet");
        batch.extend_from_slice(&whole_message(b'S', b""));
        let end = batch.len();
        batch.extend_from_slice(&whole_message(b'Q', b"SELECT 2\0"));
        assert_eq!(first_request_end(&batch), Some(end));
        let query = whole_message(b'Q', b"SELECT 1\0");
        assert_eq!(first_request_end(&query), Some(query.len()));
        assert_eq!(first_request_end(&query[..query.len() - 1]), None);
        assert_eq!(ready_for_query(b'I'), [b'Z', 0, 0, 0, 5, b'I']);
        let error = ClientError::error("57014", "cancelled").encode();
        assert!(error.windows(5).any(|w| w == b"ERROR"));
    }

    #[test]
    fn whole_messages_split_and_partial_ones_do_not() {
        let mut bytes = whole_message(b'S', b"a\0b\0").to_vec();
        bytes.extend_from_slice(&whole_message(b'Z', b"I"));
        assert_eq!(
            split_messages(&bytes),
            Some(vec![(b'S', &b"a\0b\0"[..]), (b'Z', &b"I"[..])])
        );
        assert_eq!(split_messages(&bytes[..bytes.len() - 1]), None);
        assert_eq!(split_messages(&[b'Z', 0, 0, 0, 3]), None);
        assert_eq!(split_messages(&[]), Some(vec![]));
    }

    #[test]
    fn parameter_status_round_trips_and_refuses_malformed_bodies() {
        let message = parameter_status_message("TimeZone", "UTC");
        assert_eq!(parameter_status(&message[5..]), Some(("TimeZone", "UTC")));
        assert_eq!(&message[1..5], &(message.len() as u32 - 1).to_be_bytes());
        for bad in [&b""[..], b"name", b"name\0value", b"a\0b\0c", b"\xff\0v\0"] {
            assert_eq!(parameter_status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn error_response_round_trip() {
        let encoded = ClientError::fatal("08006", "could not reach green")
            .with_hint("check the server")
            .encode();
        assert_eq!(encoded[0], b'E');
        let length = u32::from_be_bytes([encoded[1], encoded[2], encoded[3], encoded[4]]);
        assert_eq!(length as usize + 1, encoded.len());
        assert_eq!(error_sqlstate(&encoded[5..]), Some(*b"08006"));
    }

    #[test]
    fn sqlstate_reader_survives_garbage() {
        assert_eq!(error_sqlstate(b"SERROR\0C42P01\0Mno\0\0"), Some(*b"42P01"));
        assert_eq!(error_sqlstate(b"SERROR\0"), None);
        assert_eq!(error_sqlstate(b"SERROR"), None);
        assert_eq!(error_sqlstate(b"C4\0\0"), None);
        assert_eq!(error_sqlstate(b""), None);
        assert_eq!(error_sqlstate(b"\0C42P01\0"), None);
    }

    #[test]
    fn key_data_of_every_length() {
        let mut body = 77i32.to_be_bytes().to_vec();
        body.extend([5u8; 32]);
        let (pid, secret) = backend_key(&body).expect("32-byte key");
        assert_eq!((pid, secret.len()), (77, 32));
        assert_eq!(backend_key(&77i32.to_be_bytes()), None);
        assert_eq!(backend_key(&[0; 300]), None);
        let request = cancel_request(77, &secret);
        assert_eq!(request.len(), 44);
        assert_eq!(&request[..4], &44u32.to_be_bytes());
    }

    #[test]
    fn error_fields_of_well_formed_bodies_only() {
        let body = b"SERROR\0C42P01\0Mrelation \"nope\" does not exist\0Mlater\0\0";
        assert_eq!(error_field(body, b'C'), Some(&b"42P01"[..]));
        assert_eq!(
            error_field(body, b'M'),
            Some(&b"relation \"nope\" does not exist"[..])
        );
        assert_eq!(error_field(body, b'D'), None);
        assert_eq!(error_field(b"Mempty is fine\0D\0\0", b'D'), Some(&b""[..]));
        // No final NUL, no NUL after a value, bytes after the final NUL, nothing at all.
        assert_eq!(error_field(b"C42P01\0", b'C'), None);
        assert_eq!(error_field(b"C42P01", b'C'), None);
        assert_eq!(error_field(b"C42P01\0\0x", b'C'), None);
        assert_eq!(error_field(b"", b'C'), None);
        assert_eq!(error_field(b"\0", b'C'), None);
    }

    #[test]
    fn fatal_severity() {
        assert!(error_is_fatal(b"SFATAL\0VFATAL\0C57P01\0\0"));
        assert!(error_is_fatal(b"SFATAL\0C57P01\0\0"));
        assert!(!error_is_fatal(b"SERROR\0VERROR\0C42P01\0\0"));
        assert!(!error_is_fatal(b"SFATAL"));
    }

    #[test]
    fn ready_status_values() {
        assert_eq!(ready_status(b"T"), Some(b'T'));
        assert_eq!(ready_status(b"X"), None);
        assert_eq!(ready_status(b"II"), None);
    }
}
