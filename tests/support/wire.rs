//! A raw protocol client for tests that must see or send exact bytes: startup packets,
//! cancel requests, reading whole backend messages with a timeout (from TCP or any other
//! stream, TLS too), and taking apart what a server said (ErrorResponse fields, a closed
//! stream's bytes).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The CancelRequest code in place of a protocol version.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// An SSLRequest.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];
/// A GSSENCRequest.
pub const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 48];
/// A Terminate message.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
/// The longest message [`expect_message`] and [`read_plausible_message`] believe.
const PLAUSIBLE_LENGTH: usize = 1 << 20;

/// A StartupMessage for protocol `major.minor` with `parameters`.
pub fn startup_packet(major: u16, minor: u16, parameters: &[(&str, &str)]) -> Vec<u8> {
    let mut body = ((u32::from(major) << 16) | u32::from(minor))
        .to_be_bytes()
        .to_vec();
    for (name, value) in parameters {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

/// A CancelRequest for `pid` with `secret`.
pub fn cancel_packet(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut packet = ((12 + secret.len()) as u32).to_be_bytes().to_vec();
    packet.extend(CANCEL_REQUEST_CODE.to_be_bytes());
    packet.extend(pid.to_be_bytes());
    packet.extend(secret);
    packet
}

/// A typed message: tag, then length, then body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = vec![tag];
    bytes.extend(((body.len() + 4) as u32).to_be_bytes());
    bytes.extend(body);
    bytes
}

/// Connects to `127.0.0.1:port` within `wait`, with TCP_NODELAY.
pub async fn connect(port: u16, wait: Duration) -> TcpStream {
    let stream = tokio::time::timeout(wait, TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// Reads one typed message whose length word is at most `max_length`.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_length: usize,
) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=max_length).contains(&length) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "implausible message length {length} (tag {:?})",
                header[0] as char
            ),
        ));
    }
    let mut body = vec![0u8; length - 4];
    stream.read_exact(&mut body).await?;
    Ok((header[0], body))
}

/// Reads one typed message (tag, body); `None` on EOF or after `wait`.
pub async fn read_message(stream: &mut TcpStream, wait: Duration) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(wait, read_frame(stream, usize::MAX))
        .await
        .ok()?
        .ok()
}

/// Reads one typed message (tag, body) from any stream (TLS too); `None` on EOF, on an
/// error, on a length over 1 MiB, or after `wait`.
pub async fn read_plausible_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    wait: Duration,
) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(wait, read_frame(stream, PLAUSIBLE_LENGTH))
        .await
        .ok()?
        .ok()
}

/// A raw session of `user` in database `app` on `port` (a cluster or pgshift), logged in
/// without a password (a trusted user) and read up to its first ReadyForQuery.
pub async fn logged_in_session(port: u16, user: &str, wait: Duration) -> TcpStream {
    let mut stream = connect(port, wait).await;
    stream
        .write_all(&startup_packet(
            3,
            0,
            &[("user", user), ("database", "app")],
        ))
        .await
        .expect("send startup");
    loop {
        let (tag, body) = expect_message(&mut stream, wait).await;
        assert_ne!(tag, b'E', "login failed: {:?}", error_field(&body, b'M'));
        if tag == b'Z' {
            return stream;
        }
    }
}

/// Reads one typed message (tag, body); panics on EOF, after `wait`, or on a length over
/// 1 MiB.
pub async fn expect_message(stream: &mut TcpStream, wait: Duration) -> (u8, Vec<u8>) {
    tokio::time::timeout(wait, read_frame(stream, PLAUSIBLE_LENGTH))
        .await
        .expect("a message in time")
        .expect("a whole message")
}

/// Reads messages until one with `tag` arrives; returns it and what came before.
pub async fn read_until(
    stream: &mut TcpStream,
    tag: u8,
    wait: Duration,
) -> (Option<Vec<u8>>, Vec<(u8, Vec<u8>)>) {
    let mut before = Vec::new();
    while let Some((got, body)) = read_message(stream, wait).await {
        if got == tag {
            return (Some(body), before);
        }
        before.push((got, body));
    }
    (None, before)
}

/// Reads until the peer closes (EOF or a reset) and returns everything read; `Err` with what
/// was read if the connection is still open after `limit`.
pub async fn read_until_closed(
    stream: &mut TcpStream,
    limit: Duration,
) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(received),
            Ok(Ok(count)) => received.extend_from_slice(&chunk[..count]),
            Err(_) => return Err(received),
        }
    }
}

/// Reads exactly one byte (the answer to SSLRequest / GSSENCRequest) within `wait`.
pub async fn read_byte(stream: &mut TcpStream, wait: Duration) -> u8 {
    let mut byte = [0u8; 1];
    tokio::time::timeout(wait, stream.read_exact(&mut byte))
        .await
        .expect("a one-byte answer in time")
        .expect("a one-byte answer");
    byte[0]
}

/// Splits a byte stream into (tag, body) messages; panics on a trailing partial message.
pub fn split_messages(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 5, "partial message header: {bytes:?}");
        let length = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert!(
            length >= 4 && bytes.len() > length,
            "partial message (tag {:?}, length {length}, {} bytes left)",
            bytes[0] as char,
            bytes.len()
        );
        messages.push((bytes[0], bytes[5..1 + length].to_vec()));
        bytes = &bytes[1 + length..];
    }
    messages
}

/// One field (`b'C'` SQLSTATE, `b'M'` message, `b'S'` severity …) of an ErrorResponse body.
pub fn error_field(body: &[u8], field: u8) -> Option<String> {
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if code == field {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

/// The SQLSTATE in an ErrorResponse body.
pub fn error_code(body: &[u8]) -> Option<String> {
    error_field(body, b'C')
}

/// What an ErrorResponse said: SQLSTATE, message, severity.
#[derive(Debug)]
pub struct RawError {
    pub sqlstate: String,
    pub message: String,
    pub severity: String,
}

/// Takes apart the ErrorResponse (`tag` `E`) with `body`; panics on any other message or a
/// missing SQLSTATE, message or severity.
pub fn raw_error(tag: u8, body: &[u8]) -> RawError {
    assert_eq!(
        tag as char,
        'E',
        "expected an ErrorResponse, got {:?}: {:?}",
        tag as char,
        String::from_utf8_lossy(body)
    );
    RawError {
        sqlstate: error_field(body, b'C').expect("SQLSTATE field"),
        message: error_field(body, b'M').expect("message field"),
        severity: error_field(body, b'S').expect("severity field"),
    }
}

/// Sends a simple Query.
pub async fn send_query(stream: &mut TcpStream, sql: &str) {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    stream
        .write_all(&message(b'Q', &body))
        .await
        .expect("send query");
}
