//! The two SASL messages pgshift reads during login to spot SCRAM channel binding: the
//! backend's AuthenticationSASL request and the client's SASLInitialResponse (its GS2 header).
//!
//! Channel binding (RFC 5802 §6, `tls-server-end-point`) ties a SCRAM login to the TLS
//! certificate of the connection the client sees. With pgshift relaying the exchange, the
//! client's TLS connection ends at pgshift and the backend's starts there, so a binding can
//! never verify when both hops are TLS. The relay reads the client's first SASL message to say
//! so clearly instead of letting the backend fail with "channel binding check failed".
//!
//! When only the backend hop is TLS the backend offers `SCRAM-SHA-256-PLUS` to a client that
//! reached pgshift in plaintext, which libpq refuses outright ("server offered
//! SCRAM-SHA-256-PLUS authentication over a non-SSL connection"): [`without_mechanism`] gives
//! the AuthenticationSASL body without it, as a plaintext server would have sent it.
//!
//! Pure parsing over message bodies already framed (length checked, exactly one message); no
//! length inside a body is trusted before it is checked against what is there.

/// The Authentication request code of AuthenticationSASL (`R`, int32 10, mechanism list).
pub const AUTH_SASL: i32 = 10;
/// The SCRAM mechanism with channel binding, offered by a server over TLS.
pub const SCRAM_SHA_256_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

/// The request code of an Authentication (`R`) message body; `None` when it is too short.
pub fn authentication_code(body: &[u8]) -> Option<i32> {
    let code: [u8; 4] = body.get(..4)?.try_into().ok()?;
    Some(i32::from_be_bytes(code))
}

/// An AuthenticationSASL body (int32 10, then mechanism names, each NUL-terminated, then an
/// empty name) without `mechanism`; `None` when the body is not a well-formed
/// AuthenticationSASL, does not offer `mechanism`, or would offer nothing else.
pub fn without_mechanism(body: &[u8], mechanism: &[u8]) -> Option<Vec<u8>> {
    if authentication_code(body)? != AUTH_SASL {
        return None;
    }
    let mut kept = body[..4].to_vec();
    let mut rest = &body[4..];
    let mut found = false;
    loop {
        let end = rest.iter().position(|&b| b == 0)?;
        let name = &rest[..end];
        rest = &rest[end + 1..];
        if name.is_empty() {
            break;
        }
        if name == mechanism {
            found = true;
        } else {
            kept.extend_from_slice(name);
            kept.push(0);
        }
    }
    if !rest.is_empty() || !found || kept.len() == 4 {
        return None;
    }
    kept.push(0);
    Some(kept)
}

/// The GS2 channel-binding flag of a SCRAM client-first-message (RFC 5802 §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// `n`: the client does not support channel binding.
    NotSupported,
    /// `y`: the client supports it but believes the server does not; a server that does offer
    /// it must refuse the login (downgrade protection).
    SupportedNotUsed,
    /// `p=NAME`: the client binds to its connection with channel-binding type NAME.
    Required(String),
}

impl ChannelBinding {
    /// True for `p` and `y`: a TLS backend will refuse such a login relayed through pgshift's
    /// own TLS connection.
    pub fn fails_across_a_relay(&self) -> bool {
        !matches!(self, ChannelBinding::NotSupported)
    }
}

/// A SASLInitialResponse: the chosen mechanism and, for SCRAM, the GS2 flag of its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslInitialResponse {
    pub mechanism: String,
    /// `None` when the message carries no initial data (length -1) or the data has no GS2
    /// header pgshift can read (a non-SCRAM mechanism).
    pub channel_binding: Option<ChannelBinding>,
}

/// Why a SASLInitialResponse body cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("the mechanism name has no terminator")]
    UnterminatedMechanism,
    #[error("the message ends before its data length")]
    MissingLength,
    #[error("the data length {declared} does not match the {available} bytes that follow")]
    LengthMismatch { declared: i32, available: usize },
}

/// Parses a SASLInitialResponse body (`p` after AuthenticationSASL): mechanism cstring,
/// int32 data length (-1 for none), data.
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<SaslInitialResponse, SaslError> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(SaslError::UnterminatedMechanism)?;
    let mechanism = String::from_utf8_lossy(&body[..end]).into_owned();
    let rest = &body[end + 1..];
    let length: [u8; 4] = rest
        .get(..4)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(SaslError::MissingLength)?;
    let declared = i32::from_be_bytes(length);
    let data = &rest[4..];
    let channel_binding = match declared {
        -1 if data.is_empty() => None,
        _ if usize::try_from(declared).ok() == Some(data.len()) => gs2_channel_binding(data),
        _ => {
            return Err(SaslError::LengthMismatch {
                declared,
                available: data.len(),
            });
        }
    };
    Ok(SaslInitialResponse {
        mechanism,
        channel_binding,
    })
}

/// The channel-binding flag that opens a SCRAM client-first-message
/// (`gs2-cbind-flag "," [authzid] "," ...`); `None` when the data does not start with one.
pub fn gs2_channel_binding(data: &[u8]) -> Option<ChannelBinding> {
    let comma = data.iter().position(|&b| b == b',')?;
    match &data[..comma] {
        b"n" => Some(ChannelBinding::NotSupported),
        b"y" => Some(ChannelBinding::SupportedNotUsed),
        [b'p', b'=', name @ ..] if !name.is_empty() => Some(ChannelBinding::Required(
            String::from_utf8_lossy(name).into_owned(),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn initial_response(mechanism: &str, data: Option<&[u8]>) -> Vec<u8> {
        let mut body = mechanism.as_bytes().to_vec();
        body.push(0);
        match data {
            Some(data) => {
                body.extend((data.len() as i32).to_be_bytes());
                body.extend(data);
            }
            None => body.extend((-1i32).to_be_bytes()),
        }
        body
    }

    #[test]
    fn reads_each_gs2_flag() {
        let cases: [(&[u8], ChannelBinding); 3] = [
            (b"n,,n=,r=abc", ChannelBinding::NotSupported),
            (b"y,,n=,r=abc", ChannelBinding::SupportedNotUsed),
            (
                b"p=tls-server-end-point,,n=,r=abc",
                ChannelBinding::Required("tls-server-end-point".into()),
            ),
        ];
        for (data, flag) in cases {
            let parsed =
                parse_sasl_initial_response(&initial_response("SCRAM-SHA-256", Some(data)))
                    .expect("valid");
            assert_eq!(parsed.mechanism, "SCRAM-SHA-256");
            assert_eq!(parsed.channel_binding.as_ref(), Some(&flag));
            assert_eq!(
                flag.fails_across_a_relay(),
                flag != ChannelBinding::NotSupported
            );
        }
    }

    #[test]
    fn no_data_and_foreign_data_have_no_flag() {
        let parsed = parse_sasl_initial_response(&initial_response("OTHER", None)).expect("ok");
        assert_eq!(parsed.channel_binding, None);
        let parsed =
            parse_sasl_initial_response(&initial_response("OTHER", Some(b"xyz"))).expect("ok");
        assert_eq!(parsed.channel_binding, None);
        assert_eq!(gs2_channel_binding(b"p=,,"), None);
        assert_eq!(gs2_channel_binding(b"q,,"), None);
        assert_eq!(gs2_channel_binding(b""), None);
    }

    #[test]
    fn lengths_are_never_trusted() {
        assert_eq!(
            parse_sasl_initial_response(b"SCRAM-SHA-256"),
            Err(SaslError::UnterminatedMechanism)
        );
        assert_eq!(
            parse_sasl_initial_response(b"SCRAM-SHA-256\0\0\0"),
            Err(SaslError::MissingLength)
        );
        let mut lying = initial_response("SCRAM-SHA-256", Some(b"n,,n=,r=abc"));
        lying.pop();
        assert!(matches!(
            parse_sasl_initial_response(&lying),
            Err(SaslError::LengthMismatch { .. })
        ));
        let mut huge = b"SCRAM-SHA-256\0".to_vec();
        huge.extend(i32::MAX.to_be_bytes());
        huge.extend(b"n,,");
        assert!(parse_sasl_initial_response(&huge).is_err());
        let mut negative = b"SCRAM-SHA-256\0".to_vec();
        negative.extend((-2i32).to_be_bytes());
        assert!(parse_sasl_initial_response(&negative).is_err());
        let mut minus_one_with_data = initial_response("SCRAM-SHA-256", None);
        minus_one_with_data.push(b'n');
        assert!(parse_sasl_initial_response(&minus_one_with_data).is_err());
    }

    #[test]
    fn plus_is_taken_out_of_the_mechanism_list() {
        let offered = b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(
            without_mechanism(offered, SCRAM_SHA_256_PLUS).as_deref(),
            Some(&b"\0\0\0\x0aSCRAM-SHA-256\0\0"[..])
        );
        // Not offered, nothing else offered, or not well formed: left alone.
        assert_eq!(
            without_mechanism(b"\0\0\0\x0aSCRAM-SHA-256\0\0", SCRAM_SHA_256_PLUS),
            None
        );
        assert_eq!(
            without_mechanism(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0\0", SCRAM_SHA_256_PLUS),
            None
        );
        assert_eq!(
            without_mechanism(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0", SCRAM_SHA_256_PLUS),
            None
        );
        assert_eq!(
            without_mechanism(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0\0x", SCRAM_SHA_256_PLUS),
            None
        );
        assert_eq!(
            without_mechanism(b"\0\0\0\x03SCRAM-SHA-256-PLUS\0\0", SCRAM_SHA_256_PLUS),
            None
        );
        assert_eq!(without_mechanism(b"\0\0", SCRAM_SHA_256_PLUS), None);
    }

    #[test]
    fn authentication_codes() {
        assert_eq!(
            authentication_code(&[0, 0, 0, 10, b'S', 0, 0]),
            Some(AUTH_SASL)
        );
        assert_eq!(authentication_code(&[0, 0, 0, 3]), Some(3));
        assert_eq!(authentication_code(&[0, 0]), None);
    }
}
