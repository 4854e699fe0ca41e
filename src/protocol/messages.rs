//! The few messages pgshift builds (ErrorResponse, CancelRequest, Terminate) or reads
//! (ErrorResponse's SQLSTATE, ReadyForQuery's status, BackendKeyData).
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
