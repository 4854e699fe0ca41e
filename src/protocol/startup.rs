//! The first packet a client sends, before any typed message: SSLRequest, GSSENCRequest,
//! CancelRequest or a StartupMessage, and the routing facts read from a StartupMessage.
//!
//! Parsing only: the caller reads the 4-byte length, checks it with [`first_packet_length`],
//! reads that many bytes, and hands the whole packet to [`parse_first_packet`]. The original
//! bytes of a StartupMessage are kept so they can be forwarded untouched (re-encoding a parsed
//! startup would reorder its parameters).

use bytes::Bytes;
use std::net::IpAddr;

use super::MAX_STARTUP_PACKET_SIZE;
use super::options;

/// CancelRequest code: 1234 in the major half, 5678 in the minor half.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// SSLRequest code (1234.5679).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// GSSENCRequest code (1234.5680).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Shortest and longest cancel secrets a protocol 3.2 server may issue.
pub const MIN_CANCEL_KEY_LEN: usize = 4;
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// What a client's first packet asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Bytes },
    Startup(StartupMessage),
}

/// A protocol 3.x StartupMessage: its version, its parameters in order, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub parameters: Vec<(String, String)>,
    /// The whole packet as the client sent it, length prefix included.
    pub raw: Bytes,
}

/// Why a first packet was refused; each maps to the SQLSTATE the contract gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0} bytes (must be 8 to 10000)")]
    BadLength(u32),
    #[error("invalid startup packet: {0}")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: pgshift supports protocol 3.0 to 3.x")]
    UnsupportedVersion { major: u32, minor: u32 },
}

impl StartupError {
    /// The SQLSTATE sent to the client for this failure.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::BadLength(_) | StartupError::Malformed(_) => "08P01",
            StartupError::UnsupportedVersion { .. } => "0A000",
        }
    }
}

/// Checks the length word that opens a first packet; returns the whole packet's length.
pub fn first_packet_length(header: [u8; 4]) -> Result<usize, StartupError> {
    let length = u32::from_be_bytes(header);
    if (8..=MAX_STARTUP_PACKET_SIZE as u32).contains(&length) {
        Ok(length as usize)
    } else {
        Err(StartupError::BadLength(length))
    }
}

/// Parses a complete first packet (length prefix included, length already checked).
pub fn parse_first_packet(packet: Bytes) -> Result<FirstPacket, StartupError> {
    if packet.len() < 8 {
        return Err(StartupError::Malformed("shorter than its length word says"));
    }
    let declared = u32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]) as usize;
    if declared != packet.len() {
        return Err(StartupError::Malformed(
            "length word does not match the packet",
        ));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if packet.len() != 8 => Err(
            StartupError::Malformed("SSLRequest/GSSENCRequest must be 8 bytes"),
        ),
        SSL_REQUEST_CODE => Ok(FirstPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(FirstPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => parse_cancel(&packet),
        _ => {
            let (major, minor) = (code >> 16, code & 0xffff);
            if major != 3 {
                return Err(StartupError::UnsupportedVersion { major, minor });
            }
            let parameters = parse_parameters(&packet[8..])?;
            Ok(FirstPacket::Startup(StartupMessage {
                major: major as u16,
                minor: minor as u16,
                parameters,
                raw: packet,
            }))
        }
    }
}

fn parse_cancel(packet: &[u8]) -> Result<FirstPacket, StartupError> {
    let secret_len = packet.len().saturating_sub(12);
    if packet.len() < 12 || !(MIN_CANCEL_KEY_LEN..=MAX_CANCEL_KEY_LEN).contains(&secret_len) {
        return Err(StartupError::Malformed(
            "CancelRequest key must be 4 to 256 bytes",
        ));
    }
    let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
    Ok(FirstPacket::Cancel {
        pid,
        secret: Bytes::copy_from_slice(&packet[12..]),
    })
}

/// Parses `name\0value\0 … \0`: the parameter list of a StartupMessage.
fn parse_parameters(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut parameters = Vec::new();
    loop {
        let (name, rest) = take_cstring(body)?;
        if name.is_empty() {
            if !rest.is_empty() {
                return Err(StartupError::Malformed(
                    "bytes after the parameter list's terminator",
                ));
            }
            return Ok(parameters);
        }
        let (value, rest) = take_cstring(rest)?;
        parameters.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
        body = rest;
    }
}

fn take_cstring(bytes: &[u8]) -> Result<(&[u8], &[u8]), StartupError> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed(
            "expected a terminator as the last byte",
        ))?;
    Ok((&bytes[..end], &bytes[end + 1..]))
}

/// A walsender request: `replication=true` (physical) or `replication=database` (logical).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalSender {
    Physical,
    Logical,
}

/// What routing needs to know about a session, read from its StartupMessage and socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupFacts {
    pub user: String,
    /// The database, defaulting to the user name as in Postgres.
    pub database: String,
    pub application_name: Option<String>,
    /// From `options`: `-c pgshift.tenant=V` or `--pgshift.tenant=V`.
    pub tenant: Option<String>,
    pub client_addr: Option<IpAddr>,
    pub walsender: Option<WalSender>,
}

/// Why a StartupMessage cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FactsError {
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("invalid value for parameter \"replication\": \"{0}\"")]
    BadReplication(String),
}

impl FactsError {
    /// The SQLSTATE Postgres uses for the same complaint.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            FactsError::NoUser => "28000",
            FactsError::BadReplication(_) => "22023",
        }
    }
}

impl StartupMessage {
    /// The value of a parameter (the last one, if the client repeated it).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Reads the routing facts; `client_addr` comes from the socket.
    pub fn facts(&self, client_addr: Option<IpAddr>) -> Result<StartupFacts, FactsError> {
        let user = match self.parameter("user") {
            Some(user) if !user.is_empty() => user.to_string(),
            _ => return Err(FactsError::NoUser),
        };
        let database = match self.parameter("database") {
            Some(database) if !database.is_empty() => database.to_string(),
            _ => user.clone(),
        };
        let walsender = match self.parameter("replication") {
            None => None,
            Some(value) => parse_replication(value)?,
        };
        Ok(StartupFacts {
            database,
            application_name: self.parameter("application_name").map(str::to_string),
            tenant: self.parameter("options").and_then(options::tenant),
            client_addr,
            walsender,
            user,
        })
    }
}

/// The server's reading of `replication`: a boolean, or `database` for logical walsenders.
fn parse_replication(value: &str) -> Result<Option<WalSender>, FactsError> {
    match value.to_ascii_lowercase().as_str() {
        "database" => Ok(Some(WalSender::Logical)),
        "true" | "on" | "yes" | "1" => Ok(Some(WalSender::Physical)),
        "false" | "off" | "no" | "0" => Ok(None),
        _ => Err(FactsError::BadReplication(value.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_packet(version: u32, parameters: &[(&str, &str)]) -> Bytes {
        let mut body = version.to_be_bytes().to_vec();
        for (name, value) in parameters {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend(body);
        Bytes::from(packet)
    }

    #[test]
    fn length_limits() {
        assert_eq!(first_packet_length(8u32.to_be_bytes()), Ok(8));
        assert_eq!(first_packet_length(10_000u32.to_be_bytes()), Ok(10_000));
        assert!(first_packet_length(7u32.to_be_bytes()).is_err());
        assert!(first_packet_length(10_001u32.to_be_bytes()).is_err());
        assert!(first_packet_length(u32::MAX.to_be_bytes()).is_err());
    }

    #[test]
    fn special_requests() {
        let ssl = Bytes::from([0, 0, 0, 8, 4, 210, 22, 47].to_vec());
        assert_eq!(parse_first_packet(ssl), Ok(FirstPacket::SslRequest));
        let gss = Bytes::from([0, 0, 0, 8, 4, 210, 22, 48].to_vec());
        assert_eq!(parse_first_packet(gss), Ok(FirstPacket::GssEncRequest));
        let mut cancel = vec![0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 1, 0];
        cancel.extend([9, 8, 7, 6]);
        assert_eq!(
            parse_first_packet(Bytes::from(cancel)),
            Ok(FirstPacket::Cancel {
                pid: 256,
                secret: Bytes::from_static(&[9, 8, 7, 6])
            })
        );
        let mut long_cancel = vec![0, 0, 0, 44, 4, 210, 22, 46, 0, 0, 0, 7];
        long_cancel.extend([1u8; 32]);
        assert!(matches!(
            parse_first_packet(Bytes::from(long_cancel)),
            Ok(FirstPacket::Cancel { pid: 7, ref secret }) if secret.len() == 32
        ));
        let short_cancel = Bytes::from([0, 0, 0, 12, 4, 210, 22, 46, 0, 0, 0, 7].to_vec());
        assert!(parse_first_packet(short_cancel).is_err());
    }

    #[test]
    fn startup_parameters_and_facts() {
        let packet = startup_packet(
            3 << 16 | 2,
            &[
                ("user", "alice"),
                ("options", "-c pgshift.tenant=t1"),
                ("application_name", "app"),
            ],
        );
        let Ok(FirstPacket::Startup(startup)) = parse_first_packet(packet.clone()) else {
            panic!("not a startup");
        };
        assert_eq!((startup.major, startup.minor), (3, 2));
        assert_eq!(startup.raw, packet);
        let facts = startup.facts(None).expect("facts");
        assert_eq!(facts.user, "alice");
        assert_eq!(facts.database, "alice");
        assert_eq!(facts.tenant.as_deref(), Some("t1"));
        assert_eq!(facts.application_name.as_deref(), Some("app"));
        assert_eq!(facts.walsender, None);
    }

    #[test]
    fn refusals() {
        let v2 = startup_packet(2 << 16, &[("user", "a")]);
        assert_eq!(
            parse_first_packet(v2).unwrap_err().sqlstate(),
            "0A000",
            "protocol 2 is refused as unsupported"
        );
        let unknown_special = Bytes::from([0, 0, 0, 8, 4, 210, 22, 49].to_vec());
        assert_eq!(
            parse_first_packet(unknown_special).unwrap_err().sqlstate(),
            "0A000"
        );
        let mut unterminated = startup_packet(3 << 16, &[("user", "a")]).to_vec();
        unterminated.pop();
        let len = unterminated.len() as u32;
        unterminated[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            parse_first_packet(Bytes::from(unterminated))
                .unwrap_err()
                .sqlstate(),
            "08P01"
        );
        let lying = Bytes::from([0, 0, 0, 9, 0, 3, 0, 0].to_vec());
        assert!(parse_first_packet(lying).is_err());
        let Ok(FirstPacket::Startup(no_user)) =
            parse_first_packet(startup_packet(3 << 16, &[("database", "x")]))
        else {
            panic!("not a startup");
        };
        assert_eq!(no_user.facts(None), Err(FactsError::NoUser));
    }

    #[test]
    fn replication_values() {
        for (value, expected) in [
            ("database", Some(WalSender::Logical)),
            ("true", Some(WalSender::Physical)),
            ("on", Some(WalSender::Physical)),
            ("0", None),
        ] {
            assert_eq!(parse_replication(value), Ok(expected));
        }
        assert!(parse_replication("maybe").is_err());
    }
}
