//! A raw protocol client for tests that must see or send exact bytes: startup packets,
//! cancel requests, and reading whole backend messages with a timeout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    packet.extend(80_877_102u32.to_be_bytes());
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

/// Reads one typed message (tag, body); `None` on EOF or after `wait`.
pub async fn read_message(stream: &mut TcpStream, wait: Duration) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(wait, async {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await.ok()?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; length.checked_sub(4)?];
        stream.read_exact(&mut body).await.ok()?;
        Some((header[0], body))
    })
    .await
    .ok()
    .flatten()
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

/// The SQLSTATE in an ErrorResponse body.
pub fn error_code(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if code == b'C' {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
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
