//! Reaching a color: TCP connect, socket options, the client's startup bytes forwarded, and
//! the backend's first message awaited — all within the color's `connect_timeout`.
//!
//! This is the seam where "the backend of this session" is made; the relay only sees an
//! established [`BackendConnection`]. TLS to the backend and logging in on the client's behalf
//! (auth termination) slot in here.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::color::Color;
use crate::config::{BackendConfig, ListenConfig};
use crate::protocol::framing::MAX_INSPECTED_MESSAGE;
use crate::protocol::messages::{ClientError, error_sqlstate};

/// A backend connection that has answered the startup with something other than an error.
#[derive(Debug)]
pub struct BackendConnection {
    pub stream: TcpStream,
    pub color: Color,
    pub addr: SocketAddr,
    /// What the backend sent so far (at least one whole message): relay it to the client.
    pub first_bytes: BytesMut,
}

/// Why a color could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to the {color} database at {address}: {source}")]
    Unreachable {
        color: Color,
        address: String,
        source: io::Error,
    },
    #[error("the {color} database at {address} did not answer within {timeout:?}")]
    Timeout {
        color: Color,
        address: String,
        timeout: Duration,
    },
    /// The backend refused the session before any byte reached the client.
    #[error("the {color} database at {address} refused the session ({sqlstate})", sqlstate = String::from_utf8_lossy(.sqlstate))]
    Refused {
        color: Color,
        address: String,
        sqlstate: [u8; 5],
        /// The backend's own ErrorResponse, to relay as it is.
        response: BytesMut,
    },
}

impl ConnectError {
    /// What the client is told: the backend's own error, or 08006 naming the color and address.
    pub fn client_response(&self) -> BytesMut {
        match self {
            ConnectError::Refused { response, .. } => response.clone(),
            other => ClientError::fatal("08006", other.to_string())
                .with_hint("pgshift could not reach this database; check that it is running and reachable from pgshift")
                .encode(),
        }
    }
}

/// Applies keepalives, `tcp_user_timeout` and TCP_NODELAY to a client or backend socket.
pub fn configure_socket(stream: &TcpStream, listen: &ListenConfig) {
    let socket = socket2::SockRef::from(stream);
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(listen.tcp_keepalives_idle)
        .with_interval(listen.tcp_keepalives_interval)
        .with_retries(listen.tcp_keepalives_count);
    if let Err(error) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "could not set TCP keepalives");
    }
    if !listen.tcp_user_timeout.is_zero()
        && let Err(error) = socket.set_tcp_user_timeout(Some(listen.tcp_user_timeout))
    {
        tracing::debug!(%error, "could not set TCP_USER_TIMEOUT");
    }
}

/// Connects to `color`, sends the client's startup packet and waits for the first message.
pub async fn connect(
    color: Color,
    backend: &BackendConfig,
    listen: &ListenConfig,
    startup_packet: &[u8],
) -> Result<BackendConnection, ConnectError> {
    let address = backend.address();
    let timeout = backend.connect_timeout;
    let attempt = async {
        let stream = TcpStream::connect(address.as_str()).await?;
        configure_socket(&stream, listen);
        let addr = stream.peer_addr()?;
        let mut stream = stream;
        stream.write_all(startup_packet).await?;
        let first_bytes = read_first_message(&mut stream).await?;
        Ok::<_, io::Error>((stream, addr, first_bytes))
    };
    let (stream, addr, first_bytes) = match tokio::time::timeout(timeout, attempt).await {
        Err(_) => {
            return Err(ConnectError::Timeout {
                color,
                address,
                timeout,
            });
        }
        Ok(Err(source)) => {
            return Err(ConnectError::Unreachable {
                color,
                address,
                source,
            });
        }
        Ok(Ok(connected)) => connected,
    };
    if first_bytes[0] == b'E' {
        let sqlstate = error_sqlstate(&first_bytes[5..]).unwrap_or(*b"08006");
        return Err(ConnectError::Refused {
            color,
            address,
            sqlstate,
            response: first_bytes,
        });
    }
    Ok(BackendConnection {
        stream,
        color,
        addr,
        first_bytes,
    })
}

/// Reads until one whole message is buffered (more may follow it in the buffer).
async fn read_first_message(stream: &mut TcpStream) -> io::Result<BytesMut> {
    let mut buffer = BytesMut::with_capacity(1024);
    loop {
        if buffer.len() >= 5 {
            let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
            if !(4..=MAX_INSPECTED_MESSAGE).contains(&length) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the backend's first message has an invalid length ({length})"),
                ));
            }
            if buffer.len() > length {
                return Ok(buffer);
            }
        }
        if stream.read_buf(&mut buffer).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection before answering",
            ));
        }
    }
}
