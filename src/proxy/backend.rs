//! Reaching a color: TCP connect, socket options, TLS when the color's `tls` asks for it, the
//! client's startup bytes forwarded, and the backend's first message awaited — all within the
//! color's `connect_timeout`.
//!
//! TLS is negotiated as libpq does: an SSLRequest, then the server's one-byte answer (`S`: a
//! rustls handshake follows; `N`: plaintext, accepted only under `prefer`). Under `prefer` a
//! failed handshake is retried in plaintext on a new connection, as libpq does; under `require`
//! and `verify-full` it is an 08006 error naming the color and the TLS reason.
//!
//! This is the seam where "the backend of this session" is made; the relay only sees an
//! established [`BackendConnection`]. Logging in on the client's behalf (auth termination)
//! slots in here.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::color::Color;
use crate::config::{BackendConfig, BackendTlsMode, ListenConfig};
use crate::protocol::framing::MAX_INSPECTED_MESSAGE;
use crate::protocol::messages::{ClientError, error_sqlstate};
use crate::protocol::startup::SSL_REQUEST_CODE;
use crate::tls::{self, BackendStream, MaybeTls};

/// An SSLRequest packet: length 8, then the SSLRequest code.
const SSL_REQUEST: [u8; 8] = {
    let code = SSL_REQUEST_CODE.to_be_bytes();
    [0, 0, 0, 8, code[0], code[1], code[2], code[3]]
};

/// A backend connection that has answered the startup with something other than an error.
#[derive(Debug)]
pub struct BackendConnection {
    /// Plain TCP, or TLS when the color's `tls` got it.
    pub stream: BackendStream,
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
    /// TLS to the backend could not be set up (refused, or the handshake failed).
    #[error("TLS to the {color} database at {address} failed: {reason}")]
    Tls {
        color: Color,
        address: String,
        reason: String,
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
            ConnectError::Tls { color, .. } => ClientError::fatal("08006", self.to_string())
                .with_hint(format!(
                    "check [{color}] tls, ca_file and the database's certificate and ssl settings"
                ))
                .encode(),
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

/// How an attempt to reach a backend failed, before it is named by color and address.
enum Failure {
    Io(io::Error),
    Tls(String),
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Failure {
        Failure::Io(error)
    }
}

/// Connects to `color` (with TLS when `tls` is given: the color's config from
/// [`crate::tls::TlsState::backend`]), sends the client's startup packet and waits for the
/// first message.
pub async fn connect(
    color: Color,
    backend: &BackendConfig,
    listen: &ListenConfig,
    startup_packet: &[u8],
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<BackendConnection, ConnectError> {
    let address = backend.address();
    let timeout = backend.connect_timeout;
    let attempt = async {
        let (mut stream, addr) = open_stream(&address, backend, listen, tls).await?;
        stream.write_all(startup_packet).await?;
        let first_bytes = read_first_message(&mut stream).await?;
        Ok::<_, Failure>((stream, addr, first_bytes))
    };
    let (stream, addr, first_bytes) = match tokio::time::timeout(timeout, attempt).await {
        Err(_) => {
            return Err(ConnectError::Timeout {
                color,
                address,
                timeout,
            });
        }
        Ok(Err(Failure::Io(source))) => {
            return Err(ConnectError::Unreachable {
                color,
                address,
                source,
            });
        }
        Ok(Err(Failure::Tls(reason))) => {
            return Err(ConnectError::Tls {
                color,
                address,
                reason,
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

async fn tcp_connect(address: &str, listen: &ListenConfig) -> io::Result<(TcpStream, SocketAddr)> {
    let stream = TcpStream::connect(address).await?;
    configure_socket(&stream, listen);
    let addr = stream.peer_addr()?;
    Ok((stream, addr))
}

/// TCP, then TLS as the color's `tls` says.
async fn open_stream(
    address: &str,
    backend: &BackendConfig,
    listen: &ListenConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(BackendStream, SocketAddr), Failure> {
    let (stream, addr) = tcp_connect(address, listen).await?;
    let Some(tls) = tls else {
        return Ok((MaybeTls::Plain(stream), addr));
    };
    let prefer = backend.tls == BackendTlsMode::Prefer;
    match start_tls(stream, &backend.host, tls).await? {
        Negotiated::Tls(stream) => Ok((MaybeTls::Tls(stream), addr)),
        Negotiated::Refused(stream) if prefer => {
            tracing::debug!(
                backend = address,
                "the database refused TLS; going on in plaintext (tls = \"prefer\")"
            );
            Ok((MaybeTls::Plain(stream), addr))
        }
        Negotiated::Refused(_) => Err(Failure::Tls(format!(
            "the database does not accept TLS (it answered the SSLRequest with N; tls = \"{}\" needs it)",
            backend.tls
        ))),
        Negotiated::Failed(reason) if prefer => {
            tracing::debug!(backend = address, %reason, "TLS handshake failed; retrying in plaintext (tls = \"prefer\")");
            let (stream, addr) = tcp_connect(address, listen).await?;
            Ok((MaybeTls::Plain(stream), addr))
        }
        Negotiated::Failed(reason) => Err(Failure::Tls(reason)),
    }
}

/// What the SSLRequest and handshake gave.
enum Negotiated {
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// The server answered `N`: the same connection goes on in plaintext.
    Refused(TcpStream),
    Failed(String),
}

/// Sends an SSLRequest and, on `S`, runs the handshake.
async fn start_tls(
    mut stream: TcpStream,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Negotiated, Failure> {
    stream.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    if stream.read(&mut answer).await? == 0 {
        return Err(Failure::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection after the SSLRequest",
        )));
    }
    match answer[0] {
        b'S' => {}
        b'N' => return Ok(Negotiated::Refused(stream)),
        b'E' => {
            return Ok(Negotiated::Failed(
                "the database answered the SSLRequest with an error (a server without SSLRequest support?)"
                    .to_string(),
            ));
        }
        other => {
            return Ok(Negotiated::Failed(format!(
                "the database answered the SSLRequest with {:?} instead of S or N",
                other as char
            )));
        }
    }
    let name = match tls::server_name(host) {
        Ok(name) => name,
        Err(reason) => return Ok(Negotiated::Failed(reason)),
    };
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
    {
        Ok(stream) => Ok(Negotiated::Tls(Box::new(stream))),
        Err(error) => Ok(Negotiated::Failed(format!("TLS handshake: {error}"))),
    }
}

/// Reads until one whole message is buffered (more may follow it in the buffer).
async fn read_first_message<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<BytesMut> {
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
