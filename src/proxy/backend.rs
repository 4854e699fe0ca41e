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
//! established [`BackendConnection`]. Two ways to make one:
//! - [`connect`] (passthrough auth): the client's startup bytes are forwarded and the
//!   backend's first message is handed back; the client then logs in through the relay.
//! - [`login`] (`[auth] mode = "scram"`): pgshift logs in itself, as the client's user, with
//!   the ClientKey recovered from the client's SCRAM proof (or the stored md5 hash with
//!   `allow_md5`). The backend's `s=` and `i=` must be those of the verifier pgshift checked
//!   the client against (otherwise nothing is proven: [`ConnectError::AuthMismatch`]); its
//!   server signature is checked; over TLS pgshift binds the login to the backend's
//!   certificate (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`) when offered. Everything the
//!   backend sends after AuthenticationOk up to its first ReadyForQuery (ParameterStatus,
//!   BackendKeyData, ReadyForQuery) is handed back for the relay to forward, so the cancel-key
//!   replacement and the login accounting work as in passthrough.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::endpoint::tls_server_end_point;
use crate::auth::scram::{
    self, ClientBinding, ClientExchange, ClientScramError, Key, ScramVerifier,
};
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
    /// auth termination: the backend stores another verifier for the role (its salt or
    /// iteration count differs, or it asks for md5): no proof was sent.
    #[error("the {color} database at {address} stores another secret for this role: {what}")]
    AuthMismatch {
        color: Color,
        address: String,
        what: String,
    },
    /// auth termination: pgshift could not log in (an authentication method it cannot answer,
    /// a bad server signature, a malformed message).
    #[error("pgshift could not log in to the {color} database at {address}: {reason}")]
    Login {
        color: Color,
        address: String,
        reason: String,
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
            ConnectError::AuthMismatch { color, .. } => ClientError::fatal("08006", self.to_string())
                .with_hint(format!(
                    "the {color} database must store the same SCRAM verifier as the one pgshift reads for this role: copy it with ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...'"
                ))
                .encode(),
            ConnectError::Login { .. } => ClientError::fatal("08006", self.to_string())
                .with_hint("pgshift logs in with scram-sha-256 (or md5 with [auth] allow_md5): its lines in pg_hba.conf must use scram-sha-256 (or md5 for passwords stored as SCRAM)")
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
    /// The backend's ErrorResponse: its SQLSTATE and the message as sent.
    Refused([u8; 5], BytesMut),
    /// auth termination: the backend stores another secret for the role.
    Mismatch(String),
    /// auth termination: pgshift could not log in.
    Login(String),
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Failure {
        Failure::Io(error)
    }
}

impl Failure {
    /// The error naming `color` and `address`.
    fn named(self, color: Color, address: String) -> ConnectError {
        match self {
            Failure::Io(source) => ConnectError::Unreachable {
                color,
                address,
                source,
            },
            Failure::Tls(reason) => ConnectError::Tls {
                color,
                address,
                reason,
            },
            Failure::Refused(sqlstate, response) => ConnectError::Refused {
                color,
                address,
                sqlstate,
                response,
            },
            Failure::Mismatch(what) => ConnectError::AuthMismatch {
                color,
                address,
                what,
            },
            Failure::Login(reason) => ConnectError::Login {
                color,
                address,
                reason,
            },
        }
    }
}

/// Runs one attempt to reach `color` (both [`connect`] and [`login`]) within its
/// `connect_timeout`; a failure or the timeout is named by color and address.
async fn within_connect_timeout<T>(
    color: Color,
    address: &str,
    timeout: Duration,
    attempt: impl Future<Output = Result<T, Failure>>,
) -> Result<T, ConnectError> {
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(failure)) => Err(failure.named(color, address.to_string())),
        Err(_) => Err(ConnectError::Timeout {
            color,
            address: address.to_string(),
            timeout,
        }),
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
    let (stream, addr, first_bytes) =
        within_connect_timeout(color, &address, timeout, attempt).await?;
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

/// What pgshift logs in to a backend with (auth termination).
#[derive(Clone, Copy)]
pub enum LoginSecret<'a> {
    /// The client's ClientKey and the verifier it was checked against (this color's).
    Scram {
        client_key: &'a Key,
        verifier: &'a ScramVerifier,
    },
    /// The stored md5 hash (`allow_md5`).
    Md5 { hash: &'a str },
}

/// A backend pgshift logged in to.
#[derive(Debug)]
pub struct LoggedIn {
    /// `first_bytes`: what the backend sent after AuthenticationOk, through its first
    /// ReadyForQuery.
    pub connection: BackendConnection,
    /// Messages the client must see before AuthenticationOk (NegotiateProtocolVersion,
    /// notices).
    pub before_auth: BytesMut,
}

/// Logs in to `color` as the client's user (the user of `startup_packet`, which is sent as
/// the client sent it) with `secret`, all within the color's `connect_timeout`.
pub async fn login(
    color: Color,
    backend: &BackendConfig,
    listen: &ListenConfig,
    startup_packet: &[u8],
    secret: LoginSecret<'_>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<LoggedIn, ConnectError> {
    let address = backend.address();
    let timeout = backend.connect_timeout;
    let attempt = async {
        let (mut stream, addr) = open_stream(&address, backend, listen, tls).await?;
        stream.write_all(startup_packet).await?;
        let (before_auth, after_auth) = authenticate(&mut stream, secret).await?;
        Ok::<_, Failure>((stream, addr, before_auth, after_auth))
    };
    let (stream, addr, before_auth, first_bytes) =
        within_connect_timeout(color, &address, timeout, attempt).await?;
    Ok(LoggedIn {
        connection: BackendConnection {
            stream,
            color,
            addr,
            first_bytes,
        },
        before_auth,
    })
}

/// Authentication request codes (`R` messages).
mod auth_code {
    pub const OK: i32 = 0;
    pub const KERBEROS_V5: i32 = 2;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const GSS: i32 = 7;
    pub const GSS_CONTINUE: i32 = 8;
    pub const SSPI: i32 = 9;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// Appends a message with `tag` and `body` to `out`.
fn put_message(out: &mut Vec<u8>, tag: u8, body: &[&[u8]]) {
    let length: usize = body.iter().map(|part| part.len()).sum::<usize>() + 4;
    out.push(tag);
    out.extend_from_slice(&(length as u32).to_be_bytes());
    for part in body {
        out.extend_from_slice(part);
    }
}

/// The mechanisms of an AuthenticationSASL body (after its code).
fn mechanisms(list: &[u8]) -> Vec<&[u8]> {
    list.split(|&b| b == 0)
        .take_while(|name| !name.is_empty())
        .collect()
}

/// Runs the authentication exchange on `stream` and reads on to the first ReadyForQuery.
/// Returns what came before AuthenticationOk for the client, and everything after it.
async fn authenticate(
    stream: &mut BackendStream,
    secret: LoginSecret<'_>,
) -> Result<(BytesMut, BytesMut), Failure> {
    let mut buffer = BytesMut::with_capacity(1024);
    let mut before_auth = BytesMut::new();
    let mut exchange: Option<ClientExchange> = None;
    loop {
        let message = read_message(stream, &mut buffer).await?;
        let tag = message[0];
        let body = &message[5..];
        match tag {
            b'E' => {
                let sqlstate = error_sqlstate(body).unwrap_or(*b"08006");
                return Err(Failure::Refused(sqlstate, message));
            }
            b'v' | b'N' => {
                before_auth.extend_from_slice(&message);
                continue;
            }
            b'R' => {}
            other => {
                return Err(Failure::Login(format!(
                    "unexpected message type {:?} during authentication",
                    other as char
                )));
            }
        }
        let code = body
            .get(..4)
            .map(|code| i32::from_be_bytes([code[0], code[1], code[2], code[3]]))
            .ok_or_else(|| Failure::Login("a truncated authentication request".into()))?;
        let data = &body[4..];
        let mut reply = Vec::new();
        match (code, secret) {
            (auth_code::OK, _) => break,
            (auth_code::SASL, LoginSecret::Scram { .. }) => {
                let offered = mechanisms(data);
                let plus = offered.contains(&scram::SCRAM_SHA_256_PLUS.as_bytes());
                if !plus && !offered.contains(&scram::SCRAM_SHA_256.as_bytes()) {
                    return Err(Failure::Login(
                        "the database offers no SASL mechanism pgshift knows (SCRAM-SHA-256)"
                            .into(),
                    ));
                }
                let binding = match stream {
                    MaybeTls::Tls(tls) if plus => {
                        let end_point = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|leaf| tls_server_end_point(leaf).ok())
                            .and_then(|end_point| end_point.hash().map(<[u8]>::to_vec));
                        match end_point {
                            Some(hash) => ClientBinding::EndPoint(hash),
                            None => ClientBinding::None,
                        }
                    }
                    MaybeTls::Tls(_) => ClientBinding::Unused,
                    MaybeTls::Plain(_) => ClientBinding::None,
                };
                let mut random = [0u8; scram::NONCE_RAW_LEN];
                rand::fill(&mut random[..]);
                let client = ClientExchange::new(binding, scram::nonce_from(&random));
                let first = client.client_first();
                put_message(
                    &mut reply,
                    b'p',
                    &[
                        client.mechanism().as_bytes(),
                        b"\0",
                        &(first.len() as u32).to_be_bytes(),
                        &first,
                    ],
                );
                exchange = Some(client);
            }
            (
                auth_code::SASL_CONTINUE,
                LoginSecret::Scram {
                    client_key,
                    verifier,
                },
            ) => {
                let client = exchange.as_mut().ok_or_else(|| {
                    Failure::Login("a SASL continuation before the SASL request".into())
                })?;
                let last = client
                    .server_first(data, verifier, client_key)
                    .map_err(|error| match error {
                        ClientScramError::Mismatch(what) => Failure::Mismatch(format!(
                            "its SCRAM {what} differs from the verifier pgshift checked the client against"
                        )),
                        other => Failure::Login(other.to_string()),
                    })?;
                put_message(&mut reply, b'p', &[&last]);
            }
            (auth_code::SASL_FINAL, LoginSecret::Scram { verifier, .. }) => {
                let client = exchange.as_ref().ok_or_else(|| {
                    Failure::Login("a SASL final message before the SASL request".into())
                })?;
                client
                    .server_final(data, verifier)
                    .map_err(|error| Failure::Login(error.to_string()))?;
                continue;
            }
            (auth_code::MD5, LoginSecret::Md5 { hash }) => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| Failure::Login("a malformed md5 authentication request".into()))?;
                let response = crate::auth::md5::salted_response(hash, &salt);
                put_message(&mut reply, b'p', &[response.as_bytes(), b"\0"]);
            }
            (auth_code::MD5, LoginSecret::Scram { .. }) => {
                return Err(Failure::Mismatch(
                    "it asks for md5: it stores an md5 password for the role, not the SCRAM verifier".into(),
                ));
            }
            (auth_code::SASL, LoginSecret::Md5 { .. }) => {
                return Err(Failure::Mismatch(
                    "it asks for SCRAM: it stores a SCRAM verifier for the role, not the md5 hash"
                        .into(),
                ));
            }
            (auth_code::CLEARTEXT, _) => {
                return Err(Failure::Login(
                    "its pg_hba.conf asks for a cleartext password (method \"password\"), which pgshift does not have".into(),
                ));
            }
            (
                auth_code::KERBEROS_V5 | auth_code::GSS | auth_code::GSS_CONTINUE | auth_code::SSPI,
                _,
            ) => {
                return Err(Failure::Login(
                    "its pg_hba.conf asks for GSSAPI / SSPI, which cannot work behind pgshift"
                        .into(),
                ));
            }
            (code, _) => {
                return Err(Failure::Login(format!(
                    "it asks for authentication method {code}, which pgshift cannot answer"
                )));
            }
        }
        stream.write_all(&reply).await?;
    }
    // Logged in: read on to the first ReadyForQuery (a missing database, 3D000, and too many
    // connections, 53300, are reported here).
    let mut after_auth = BytesMut::new();
    loop {
        let message = read_message(stream, &mut buffer).await?;
        match message[0] {
            b'E' => {
                let sqlstate = error_sqlstate(&message[5..]).unwrap_or(*b"08006");
                return Err(Failure::Refused(sqlstate, message));
            }
            b'Z' => {
                after_auth.extend_from_slice(&message);
                after_auth.extend_from_slice(&buffer);
                return Ok((before_auth, after_auth));
            }
            _ => after_auth.extend_from_slice(&message),
        }
    }
}

/// Reads one whole message (at most [`MAX_INSPECTED_MESSAGE`]) off the front of `buffer`,
/// reading more as needed.
async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut BytesMut,
) -> io::Result<BytesMut> {
    loop {
        if buffer.len() >= 5 {
            let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
            if !(4..=MAX_INSPECTED_MESSAGE).contains(&length) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the backend sent a message of type {:?} with an invalid length ({length})",
                        buffer[0] as char
                    ),
                ));
            }
            if buffer.len() > length {
                return Ok(buffer.split_to(length + 1));
            }
        }
        if stream.read_buf(buffer).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection during login",
            ));
        }
    }
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
