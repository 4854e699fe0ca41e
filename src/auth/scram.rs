//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both ways: the server side
//! pgshift runs with its clients ([`ServerExchange`]) and the client side it runs with a
//! backend using a recovered ClientKey instead of a password ([`ClientExchange`]).
//!
//! The server side follows PostgreSQL's `auth-scram.c`: the user name is the StartupMessage's
//! (the `n=` attribute is read and ignored), an authorization identity (`a=`) is refused, the
//! GS2 flag must agree with the mechanism (`p` if and only if `SCRAM-SHA-256-PLUS`; `y` is
//! refused when PLUS was offered), the only channel-binding type is `tls-server-end-point`,
//! and `c=` must be exactly base64(GS2 header ‖ binding data).
//!
//! pgshift never holds a password and never runs PBKDF2: a verifier
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`) is enough to check a client's
//! proof, and checking it recovers the ClientKey (ClientProof XOR HMAC(StoredKey,
//! AuthMessage), confirmed by H(ClientKey) = StoredKey), which is all a SCRAM login to a
//! backend with the same verifier needs.
//!
//! Pure functions over byte slices, no I/O; the callers supply the random nonces. Secrets are
//! compared in constant time ([`ct_eq`]) and never printed (`Debug` of a verifier is redacted).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// `SCRAM-SHA-256`.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// `SCRAM-SHA-256-PLUS`: SCRAM with channel binding.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The one channel-binding type PostgreSQL (and pgshift) implements (RFC 5929 §4).
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";
/// Random bytes in a nonce, as PostgreSQL (18, base64-encoded to 24 characters).
pub const NONCE_RAW_LEN: usize = 18;
/// The most iterations pgshift accepts in a verifier or a backend's challenge; a verifier
/// above it is treated as unusable (PostgreSQL's own limit is `INT_MAX`, but pgshift runs no
/// PBKDF2 and a hostile backend could only slow itself).
pub const MAX_ITERATIONS: u32 = i32::MAX as u32;

/// A SHA-256 sized key (ClientKey, StoredKey, ServerKey, proofs and signatures).
pub type Key = [u8; 32];

type HmacSha256 = Hmac<Sha256>;

// ---------------------------------------------------------------------------------------------
// Primitives
// ---------------------------------------------------------------------------------------------

/// HMAC-SHA-256 of the concatenation of `parts` under `key`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// SHA-256.
pub fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

/// Equality of two byte strings in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

fn xor(a: &Key, b: &Key) -> Key {
    let mut out = [0u8; 32];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = a[index] ^ b[index];
    }
    out
}

/// Standard base64 with padding, as SCRAM attributes use it.
pub fn b64(data: &[u8]) -> String {
    BASE64.encode(data)
}

fn unb64(text: &[u8]) -> Option<Vec<u8>> {
    BASE64.decode(text).ok()
}

/// A fresh nonce from `random` bytes: base64 of them (printable, no comma).
pub fn nonce_from(random: &[u8; NONCE_RAW_LEN]) -> String {
    b64(random)
}

// ---------------------------------------------------------------------------------------------
// Verifiers
// ---------------------------------------------------------------------------------------------

/// A SCRAM-SHA-256 verifier as `pg_authid.rolpassword` stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys: StoredKey and ServerKey are password equivalents for SCRAM.
        write!(
            f,
            "ScramVerifier {{ iterations: {}, salt: {} bytes, keys: <redacted> }}",
            self.iterations,
            self.salt.len()
        )
    }
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`; `None` when the text
    /// is anything else (an md5 hash, a plaintext password, a damaged verifier).
    pub fn parse(text: &str) -> Option<ScramVerifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (parameters, keys) = rest.split_once('$')?;
        let (iterations, salt) = parameters.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        if !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let iterations: u32 = iterations.parse().ok()?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return None;
        }
        let salt = unb64(salt.as_bytes())?;
        if salt.is_empty() {
            return None;
        }
        let stored_key: Key = unb64(stored_key.as_bytes())?.try_into().ok()?;
        let server_key: Key = unb64(server_key.as_bytes())?.try_into().ok()?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// The verifier's text form, as `rolpassword` holds it. A secret: never log it.
    pub fn to_text(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            b64(&self.salt),
            b64(&self.stored_key),
            b64(&self.server_key)
        )
    }

    /// The verifier of a SaltedPassword (Hi(password, salt, i)), as the server stores it.
    pub fn from_salted_password(salted: &Key, salt: &[u8], iterations: u32) -> ScramVerifier {
        let client_key = Zeroizing::new(hmac(salted, &[b"Client Key"]));
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key[..]),
            server_key: hmac(salted, &[b"Server Key"]),
        }
    }

    /// What differs between two verifiers of one role, by name, without their values.
    pub fn differences(&self, other: &ScramVerifier) -> Vec<&'static str> {
        let mut differences = Vec::new();
        if self.salt != other.salt {
            differences.push("salt");
        }
        if self.iterations != other.iterations {
            differences.push("iterations");
        }
        if self.stored_key != other.stored_key {
            differences.push("StoredKey");
        }
        if self.server_key != other.server_key {
            differences.push("ServerKey");
        }
        differences
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a SCRAM exchange failed, with the SQLSTATE PostgreSQL sends for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The proof did not verify (or the role has no usable verifier): 28P01, the only
    /// failure that says nothing about why.
    #[error("password authentication failed")]
    Failed,
    /// A malformed or inconsistent message: 08P01 with PostgreSQL's wording.
    #[error("{0}")]
    Protocol(&'static str),
    /// An authorization identity (`a=`): 0A000, as PostgreSQL.
    #[error("client uses authorization identity, but it is not supported")]
    AuthorizationIdentity,
}

impl ScramError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ScramError::Failed => "28P01",
            ScramError::Protocol(_) => "08P01",
            ScramError::AuthorizationIdentity => "0A000",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Message parsing
// ---------------------------------------------------------------------------------------------

/// The GS2 channel-binding flag of a client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gs2Flag {
    /// `n`: the client does not support channel binding.
    NotSupported,
    /// `y`: the client supports it but thinks the server does not.
    SupportedNotUsed,
    /// `p=NAME`: the client binds to the connection with type NAME.
    Bound(String),
}

/// A parsed client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst<'a> {
    pub flag: Gs2Flag,
    /// The GS2 header as sent, up to and including its second comma.
    pub gs2_header: &'a [u8],
    /// client-first-message-bare: what follows the GS2 header.
    pub bare: &'a [u8],
    pub nonce: &'a [u8],
}

/// SCRAM's `printable`: 0x21..=0x7e except `,`.
fn is_printable(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Splits `attr=value` off the front of `input` (up to the next comma, which is consumed).
fn attribute<'a>(input: &mut &'a [u8], name: u8) -> Option<&'a [u8]> {
    let data = *input;
    if data.len() < 2 || data[0] != name || data[1] != b'=' {
        return None;
    }
    let end = data.iter().position(|&b| b == b',').unwrap_or(data.len());
    let value = &data[2..end];
    *input = if end < data.len() {
        &data[end + 1..]
    } else {
        &data[end..]
    };
    Some(value)
}

/// Skips one `x=value` extension attribute (any letter).
fn any_attribute<'a>(input: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
    let name = *input.first()?;
    if !name.is_ascii_alphabetic() {
        return None;
    }
    attribute(input, name).map(|value| (name, value))
}

/// Parses a client-first-message (`gs2-header client-first-message-bare`).
pub fn parse_client_first(data: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    const MALFORMED: ScramError = ScramError::Protocol("malformed SCRAM message");
    if data.contains(&0) {
        return Err(MALFORMED);
    }
    let mut input = data;
    let flag = match input.first() {
        Some(b'n') => {
            input = &input[1..];
            Gs2Flag::NotSupported
        }
        Some(b'y') => {
            input = &input[1..];
            Gs2Flag::SupportedNotUsed
        }
        Some(b'p') => {
            let name = attribute(&mut input, b'p').ok_or(MALFORMED)?;
            if name.is_empty() {
                return Err(MALFORMED);
            }
            // `attribute` consumed the comma after the name; put the cursor back on it.
            input = &data[2 + name.len()..];
            Gs2Flag::Bound(String::from_utf8_lossy(name).into_owned())
        }
        _ => return Err(MALFORMED),
    };
    if input.first() != Some(&b',') {
        return Err(MALFORMED);
    }
    input = &input[1..];
    if input.first() == Some(&b'a') {
        return Err(ScramError::AuthorizationIdentity);
    }
    if input.first() != Some(&b',') {
        return Err(MALFORMED);
    }
    input = &input[1..];
    let gs2_header = &data[..data.len() - input.len()];
    let bare = input;
    if input.first() == Some(&b'm') {
        return Err(ScramError::Protocol(
            "client requires an unsupported SCRAM extension",
        ));
    }
    // The user name is read and ignored: PostgreSQL uses the StartupMessage's.
    attribute(&mut input, b'n').ok_or(MALFORMED)?;
    let nonce = attribute(&mut input, b'r').ok_or(MALFORMED)?;
    if nonce.is_empty() || !is_printable(nonce) {
        return Err(ScramError::Protocol(
            "non-printable characters in SCRAM nonce",
        ));
    }
    while !input.is_empty() {
        any_attribute(&mut input).ok_or(MALFORMED)?;
    }
    Ok(ClientFirst {
        flag,
        gs2_header,
        bare,
        nonce,
    })
}

/// A parsed client-final-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFinal<'a> {
    /// `c=`, base64-decoded: GS2 header ‖ channel-binding data.
    pub channel_binding: Vec<u8>,
    pub nonce: &'a [u8],
    /// client-final-message-without-proof.
    pub without_proof: &'a [u8],
    pub proof: Key,
}

/// Parses a client-final-message (`c=...,r=...[,ext...],p=...`).
pub fn parse_client_final(data: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    const MALFORMED: ScramError = ScramError::Protocol("malformed SCRAM message");
    if data.contains(&0) {
        return Err(MALFORMED);
    }
    let mut input = data;
    let binding = attribute(&mut input, b'c').ok_or(MALFORMED)?;
    let channel_binding = unb64(binding).ok_or(MALFORMED)?;
    let nonce = attribute(&mut input, b'r').ok_or(MALFORMED)?;
    loop {
        let before = input;
        let (name, value) = any_attribute(&mut input).ok_or(MALFORMED)?;
        if name == b'p' {
            if !input.is_empty() {
                return Err(MALFORMED);
            }
            let proof: Key = unb64(value)
                .and_then(|proof| proof.try_into().ok())
                .ok_or(MALFORMED)?;
            // Everything before ",p=".
            let without_proof = &data[..data.len() - before.len() - 1];
            return Ok(ClientFinal {
                channel_binding,
                nonce,
                without_proof,
                proof,
            });
        }
        if input.is_empty() {
            return Err(MALFORMED);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server side
// ---------------------------------------------------------------------------------------------

/// What a successful exchange gives: the client's ClientKey and the server-final-message.
pub struct ServerSuccess {
    pub client_key: Zeroizing<Key>,
    /// `v=...`, to send in AuthenticationSASLFinal.
    pub server_final: Vec<u8>,
}

impl std::fmt::Debug for ServerSuccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerSuccess { client_key: <redacted>, .. }")
    }
}

/// The server side of one SCRAM exchange, from the client's SASLInitialResponse to its proof.
pub struct ServerExchange {
    verifier: ScramVerifier,
    /// A mock exchange: it runs like a real one and fails at the proof, whatever it is.
    doomed: bool,
    /// tls-server-end-point data of pgshift's certificate when PLUS is offered.
    end_point: Option<Vec<u8>>,
    /// Set by the client-first-message.
    expected_binding: Vec<u8>,
    nonce: Vec<u8>,
    client_first_bare: Vec<u8>,
    server_first: Vec<u8>,
}

impl ServerExchange {
    /// An exchange checking proofs against `verifier`; `doomed` for a mock exchange (no such
    /// role, no SCRAM verifier, expired password), whose `verifier` only gives salt and
    /// iterations. `end_point`: the channel-binding data when the client connection is TLS and
    /// the certificate defines it; `SCRAM-SHA-256-PLUS` is offered then.
    pub fn new(verifier: ScramVerifier, doomed: bool, end_point: Option<Vec<u8>>) -> Self {
        ServerExchange {
            verifier,
            doomed,
            end_point,
            expected_binding: Vec::new(),
            nonce: Vec::new(),
            client_first_bare: Vec::new(),
            server_first: Vec::new(),
        }
    }

    /// The mechanisms to offer in AuthenticationSASL, PLUS first as PostgreSQL does.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.end_point.is_some() {
            &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        } else {
            &[SCRAM_SHA_256]
        }
    }

    /// Reads the SASLInitialResponse's mechanism and client-first-message; returns the
    /// server-first-message. `server_nonce` is the server's part of the nonce (printable, e.g.
    /// [`nonce_from`] of fresh random bytes).
    pub fn client_first(
        &mut self,
        mechanism: &str,
        data: &[u8],
        server_nonce: &str,
    ) -> Result<Vec<u8>, ScramError> {
        let plus = match mechanism {
            SCRAM_SHA_256_PLUS if self.end_point.is_some() => true,
            SCRAM_SHA_256 => false,
            _ => {
                return Err(ScramError::Protocol(
                    "client selected an invalid SASL authentication mechanism",
                ));
            }
        };
        let first = parse_client_first(data)?;
        match (&first.flag, plus) {
            (Gs2Flag::Bound(name), true) if name == TLS_SERVER_END_POINT => {}
            (Gs2Flag::Bound(_), true) => {
                return Err(ScramError::Protocol(
                    "unsupported SCRAM channel-binding type",
                ));
            }
            (Gs2Flag::Bound(_), false) => {
                return Err(ScramError::Protocol(
                    "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data.",
                ));
            }
            (_, true) => {
                return Err(ScramError::Protocol(
                    "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data.",
                ));
            }
            (Gs2Flag::SupportedNotUsed, false) if self.end_point.is_some() => {
                return Err(ScramError::Protocol(
                    "SCRAM channel binding negotiation error: the client supports SCRAM channel binding but thinks the server does not; however, this server does support channel binding",
                ));
            }
            (Gs2Flag::SupportedNotUsed | Gs2Flag::NotSupported, false) => {}
        }
        self.expected_binding = first.gs2_header.to_vec();
        if plus && let Some(end_point) = &self.end_point {
            self.expected_binding.extend_from_slice(end_point);
        }
        self.nonce = [first.nonce, server_nonce.as_bytes()].concat();
        self.client_first_bare = first.bare.to_vec();
        self.server_first = format!(
            "r={},s={},i={}",
            String::from_utf8_lossy(&self.nonce),
            b64(&self.verifier.salt),
            self.verifier.iterations
        )
        .into_bytes();
        Ok(self.server_first.clone())
    }

    /// Checks the client-final-message. On success the ClientKey is recovered and the
    /// server-final-message built; a wrong proof (or a mock exchange) is [`ScramError::Failed`].
    pub fn client_final(&self, data: &[u8]) -> Result<ServerSuccess, ScramError> {
        if self.server_first.is_empty() {
            return Err(ScramError::Protocol("unexpected SCRAM message"));
        }
        let last = parse_client_final(data)?;
        if !ct_eq(&last.channel_binding, &self.expected_binding) {
            return Err(ScramError::Protocol("SCRAM channel binding check failed"));
        }
        if last.nonce != self.nonce.as_slice() {
            return Err(ScramError::Protocol(
                "SCRAM nonce mismatch: the client's nonce does not match the server's",
            ));
        }
        let auth_message = [
            &self.client_first_bare[..],
            b",",
            &self.server_first,
            b",",
            last.without_proof,
        ]
        .concat();
        let signature = hmac(&self.verifier.stored_key, &[&auth_message]);
        let client_key = Zeroizing::new(xor(&last.proof, &signature));
        let proven = ct_eq(&sha256(&client_key[..]), &self.verifier.stored_key);
        if !proven || self.doomed {
            return Err(ScramError::Failed);
        }
        let server_signature = hmac(&self.verifier.server_key, &[&auth_message]);
        Ok(ServerSuccess {
            client_key,
            server_final: format!("v={}", b64(&server_signature)).into_bytes(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The client side (pgshift logging in to a backend)
// ---------------------------------------------------------------------------------------------

/// How pgshift binds its SCRAM login to a backend's TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBinding {
    /// `n`: plaintext, or a certificate without a defined end-point hash.
    None,
    /// `y`: TLS, but the backend did not offer PLUS.
    Unused,
    /// `p=tls-server-end-point` with the backend certificate's hash.
    EndPoint(Vec<u8>),
}

/// Why a login to a backend with a ClientKey failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientScramError {
    /// The backend's salt or iteration count is not those of the verifier pgshift checked the
    /// client against: it stores another verifier for the role (no proof was sent).
    #[error("its SCRAM {0} differs from the verifier pgshift checked the client against")]
    Mismatch(&'static str),
    #[error("malformed SCRAM message from the database: {0}")]
    Malformed(&'static str),
    /// The backend's server signature did not verify: it does not know the verifier.
    #[error("the database's SCRAM server signature did not verify")]
    BadServerSignature,
    #[error("the database reported a SCRAM error: {0}")]
    ServerError(String),
}

/// The client side of one SCRAM exchange with a backend, proving with a ClientKey.
pub struct ClientExchange {
    binding: ClientBinding,
    nonce: String,
    auth_message: Vec<u8>,
}

impl ClientExchange {
    /// An exchange with `nonce` (printable, e.g. [`nonce_from`]).
    pub fn new(binding: ClientBinding, nonce: String) -> ClientExchange {
        ClientExchange {
            binding,
            nonce,
            auth_message: Vec::new(),
        }
    }

    pub fn mechanism(&self) -> &'static str {
        match self.binding {
            ClientBinding::EndPoint(_) => SCRAM_SHA_256_PLUS,
            _ => SCRAM_SHA_256,
        }
    }

    fn gs2_header(&self) -> String {
        match self.binding {
            ClientBinding::None => "n,,".into(),
            ClientBinding::Unused => "y,,".into(),
            ClientBinding::EndPoint(_) => format!("p={TLS_SERVER_END_POINT},,"),
        }
    }

    fn client_first_bare(&self) -> String {
        // An empty user name, as libpq: the server uses the StartupMessage's.
        format!("n=,r={}", self.nonce)
    }

    /// The client-first-message for the SASLInitialResponse.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header(), self.client_first_bare()).into_bytes()
    }

    /// Reads the server-first-message and returns the client-final-message proving with
    /// `client_key` against `verifier` (the color's, which must have the backend's salt and
    /// iteration count: otherwise nothing is proven and [`ClientScramError::Mismatch`] says so).
    pub fn server_first(
        &mut self,
        data: &[u8],
        verifier: &ScramVerifier,
        client_key: &Key,
    ) -> Result<Vec<u8>, ClientScramError> {
        const MALFORMED: ClientScramError =
            ClientScramError::Malformed("invalid server-first-message");
        if data.first() == Some(&b'm') {
            return Err(ClientScramError::Malformed(
                "the server requires an unsupported SCRAM extension",
            ));
        }
        let mut input = data;
        let nonce = attribute(&mut input, b'r').ok_or(MALFORMED)?;
        if nonce.len() <= self.nonce.len()
            || !nonce.starts_with(self.nonce.as_bytes())
            || !is_printable(nonce)
        {
            return Err(ClientScramError::Malformed(
                "the server's nonce does not extend pgshift's",
            ));
        }
        let salt = attribute(&mut input, b's')
            .and_then(unb64)
            .ok_or(MALFORMED)?;
        let iterations: u32 = attribute(&mut input, b'i')
            .and_then(|value| std::str::from_utf8(value).ok())
            .filter(|value| value.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|value| value.parse().ok())
            .ok_or(MALFORMED)?;
        while !input.is_empty() {
            any_attribute(&mut input).ok_or(MALFORMED)?;
        }
        if salt != verifier.salt {
            return Err(ClientScramError::Mismatch("salt"));
        }
        if iterations != verifier.iterations {
            return Err(ClientScramError::Mismatch("iteration count"));
        }
        let mut binding_input = self.gs2_header().into_bytes();
        if let ClientBinding::EndPoint(hash) = &self.binding {
            binding_input.extend_from_slice(hash);
        }
        let without_proof = format!(
            "c={},r={}",
            b64(&binding_input),
            String::from_utf8_lossy(nonce)
        );
        self.auth_message = [
            self.client_first_bare().as_bytes(),
            b",",
            data,
            b",",
            without_proof.as_bytes(),
        ]
        .concat();
        let signature = hmac(&verifier.stored_key, &[&self.auth_message]);
        let proof = xor(client_key, &signature);
        Ok(format!("{without_proof},p={}", b64(&proof)).into_bytes())
    }

    /// Checks the server-final-message's `v=` against HMAC(ServerKey, AuthMessage).
    pub fn server_final(
        &self,
        data: &[u8],
        verifier: &ScramVerifier,
    ) -> Result<(), ClientScramError> {
        if self.auth_message.is_empty() {
            return Err(ClientScramError::Malformed(
                "unexpected server-final-message",
            ));
        }
        let mut input = data;
        if let Some(error) = attribute(&mut input, b'e') {
            return Err(ClientScramError::ServerError(
                String::from_utf8_lossy(error).into_owned(),
            ));
        }
        let signature = attribute(&mut input, b'v')
            .and_then(unb64)
            .ok_or(ClientScramError::Malformed("invalid server-final-message"))?;
        let expected = hmac(&verifier.server_key, &[&self.auth_message]);
        if ct_eq(&signature, &expected) {
            Ok(())
        } else {
            Err(ClientScramError::BadServerSignature)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// PBKDF2-HMAC-SHA-256 with one output block (SCRAM's Hi()), for tests: pgshift itself never
/// derives a SaltedPassword.
#[cfg(test)]
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    let mut block = hmac(password, &[salt, &[0, 0, 0, 1]]);
    let mut result = block;
    for _ in 1..iterations {
        block = hmac(password, &[&block]);
        for (out, byte) in result.iter_mut().zip(block) {
            *out ^= byte;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 §3: user "user", password "pencil".
    const CLIENT_FIRST: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &[u8] =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> ScramVerifier {
        let salt = unb64(b"W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let salted = salted_password(b"pencil", &salt, 4096);
        ScramVerifier::from_salted_password(&salted, &salt, 4096)
    }

    fn rfc_client_key() -> Key {
        let salt = unb64(b"W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        hmac(&salted_password(b"pencil", &salt, 4096), &[b"Client Key"])
    }

    #[test]
    fn the_server_side_passes_rfc_7677s_test_vector() {
        let mut exchange = ServerExchange::new(rfc_verifier(), false, None);
        assert_eq!(exchange.mechanisms(), [SCRAM_SHA_256]);
        let server_first = exchange
            .client_first(SCRAM_SHA_256, CLIENT_FIRST, SERVER_NONCE)
            .expect("client-first");
        assert_eq!(server_first, SERVER_FIRST);
        let success = exchange.client_final(CLIENT_FINAL).expect("proof verifies");
        assert_eq!(success.server_final, SERVER_FINAL);
        assert_eq!(*success.client_key, rfc_client_key());
    }

    #[test]
    fn a_verifier_round_trips_through_its_text() {
        let verifier = rfc_verifier();
        let text = verifier.to_text();
        assert!(text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
        assert_eq!(ScramVerifier::parse(&text), Some(verifier.clone()));
        assert!(!format!("{verifier:?}").contains(&b64(&verifier.stored_key)));
        for broken in [
            "md5a3556571e93b0d20722ba62be61e8c2d",
            "pencil",
            "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$a:b",
            "SCRAM-SHA-256$x:W22ZaJ0SNY7soEsUEjb6gQ==$a:b",
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:$",
            "",
        ] {
            assert_eq!(ScramVerifier::parse(broken), None, "{broken}");
        }
    }

    #[test]
    fn the_client_side_recomputes_the_rfc_proof_from_the_client_key_alone() {
        let verifier = rfc_verifier();
        let mut client = ClientExchange::new(ClientBinding::None, "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(client.client_first(), b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        let last = client
            .server_first(SERVER_FIRST, &verifier, &rfc_client_key())
            .expect("client-final");
        // The proof differs from the RFC's only because pgshift sends an empty n=.
        assert!(last.starts_with(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYD"));
        // Against a server with the same verifier, it logs in.
        let mut server = ServerExchange::new(verifier.clone(), false, None);
        server
            .client_first(SCRAM_SHA_256, &client.client_first(), SERVER_NONCE)
            .expect("client-first");
        let success = server.client_final(&last).expect("proof verifies");
        client
            .server_final(&success.server_final, &verifier)
            .expect("server signature verifies");
        assert!(matches!(
            client.server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=", &verifier),
            Err(ClientScramError::BadServerSignature)
        ));
    }

    #[test]
    fn another_salt_or_iteration_count_is_a_mismatch_before_any_proof() {
        let verifier = rfc_verifier();
        let mut client = ClientExchange::new(ClientBinding::None, "rOprNGfwEbeRWgbNEkqO".into());
        let other_salt = b"r=rOprNGfwEbeRWgbNEkqO%hv,s=QSXCR+Q6sek8bf92,i=4096";
        assert_eq!(
            client.server_first(other_salt, &verifier, &rfc_client_key()),
            Err(ClientScramError::Mismatch("salt"))
        );
        let other_count = b"r=rOprNGfwEbeRWgbNEkqO%hv,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=8192";
        assert_eq!(
            client.server_first(other_count, &verifier, &rfc_client_key()),
            Err(ClientScramError::Mismatch("iteration count"))
        );
        let foreign_nonce = b"r=somebody-else,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        assert!(matches!(
            client.server_first(foreign_nonce, &verifier, &rfc_client_key()),
            Err(ClientScramError::Malformed(_))
        ));
    }

    #[test]
    fn a_wrong_proof_and_a_mock_exchange_fail_alike() {
        let mut exchange = ServerExchange::new(rfc_verifier(), false, None);
        exchange
            .client_first(SCRAM_SHA_256, CLIENT_FIRST, SERVER_NONCE)
            .expect("client-first");
        let mut wrong = CLIENT_FINAL.to_vec();
        let at = wrong.len() - 5;
        wrong[at] = b'A';
        assert_eq!(
            exchange.client_final(&wrong).map(|_| ()),
            Err(ScramError::Failed)
        );
        let mut mock = ServerExchange::new(rfc_verifier(), true, None);
        mock.client_first(SCRAM_SHA_256, CLIENT_FIRST, SERVER_NONCE)
            .expect("client-first");
        assert_eq!(
            mock.client_final(CLIENT_FINAL).map(|_| ()),
            Err(ScramError::Failed)
        );
        assert_eq!(ScramError::Failed.sqlstate(), "28P01");
    }

    #[test]
    fn gs2_rules_follow_postgres() {
        let verifier = rfc_verifier();
        let end_point = vec![7u8; 32];
        let cases: [(&str, &[u8], bool, Option<&str>); 9] = [
            // mechanism, client-first, TLS (PLUS offered), expected SQLSTATE of a refusal
            (SCRAM_SHA_256, b"n,,n=,r=abc", false, None),
            (SCRAM_SHA_256, b"y,,n=,r=abc", false, None),
            (SCRAM_SHA_256, b"y,,n=,r=abc", true, Some("08P01")),
            (SCRAM_SHA_256, b"n,,n=,r=abc", true, None),
            (
                SCRAM_SHA_256_PLUS,
                b"p=tls-server-end-point,,n=,r=abc",
                true,
                None,
            ),
            (
                SCRAM_SHA_256_PLUS,
                b"p=tls-unique,,n=,r=abc",
                true,
                Some("08P01"),
            ),
            (SCRAM_SHA_256_PLUS, b"n,,n=,r=abc", true, Some("08P01")),
            (
                SCRAM_SHA_256,
                b"p=tls-server-end-point,,n=,r=abc",
                true,
                Some("08P01"),
            ),
            (SCRAM_SHA_256, b"n,a=admin,n=,r=abc", false, Some("0A000")),
        ];
        for (mechanism, first, tls, refused) in cases {
            let mut exchange =
                ServerExchange::new(verifier.clone(), false, tls.then(|| end_point.clone()));
            let result = exchange.client_first(mechanism, first, "xyz");
            assert_eq!(
                result.err().map(|error| error.sqlstate()),
                refused,
                "{mechanism} {}",
                String::from_utf8_lossy(first)
            );
        }
        let mut plaintext = ServerExchange::new(verifier.clone(), false, None);
        assert!(
            plaintext
                .client_first(SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,,n=,r=abc", "x")
                .is_err()
        );
        assert!(plaintext.client_first("MD5", b"n,,n=,r=abc", "x").is_err());
    }

    #[test]
    fn channel_binding_data_must_match_exactly() {
        let verifier = rfc_verifier();
        let end_point = sha256(b"certificate");
        let nonce = "clientnonce".to_string();
        let run = |binding: ClientBinding| {
            let mut client = ClientExchange::new(binding, nonce.clone());
            let mut server = ServerExchange::new(verifier.clone(), false, Some(end_point.to_vec()));
            let first = server.client_first(client.mechanism(), &client.client_first(), "srv")?;
            let last = client
                .server_first(&first, &verifier, &rfc_client_key())
                .map_err(|_| ScramError::Protocol("client"))?;
            server.client_final(&last).map(|_| ())
        };
        assert_eq!(run(ClientBinding::EndPoint(end_point.to_vec())), Ok(()));
        assert_eq!(
            run(ClientBinding::EndPoint(
                sha256(b"another certificate").to_vec()
            )),
            Err(ScramError::Protocol("SCRAM channel binding check failed"))
        );
    }

    #[test]
    fn malformed_messages_are_refused_without_panicking() {
        for first in [
            &b""[..],
            b"n",
            b"n,",
            b"n,,",
            b"n,,r=abc",
            b"n,,n=,r=",
            b"n,,n=,r=a b",
            b"x,,n=,r=abc",
            b"p,,n=,r=abc",
            b"p=,,n=,r=abc",
            b"n,,m=ext,n=,r=abc",
            b"n,,n=,r=abc,1",
            b"n,,n=\0,r=abc",
        ] {
            assert!(
                parse_client_first(first).is_err(),
                "{}",
                String::from_utf8_lossy(first)
            );
        }
        for last in [
            &b""[..],
            b"c=biws",
            b"c=biws,r=abc",
            b"c=biws,r=abc,p=",
            b"c=biws,r=abc,p=AAAA",
            b"c=!!!!,r=abc,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            b"c=biws,r=abc,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=,x=1",
        ] {
            assert!(
                parse_client_final(last).is_err(),
                "{}",
                String::from_utf8_lossy(last)
            );
        }
        let parsed = parse_client_final(
            b"c=biws,r=abc,x=ext,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        )
        .expect("extensions before the proof are allowed");
        assert_eq!(parsed.without_proof, b"c=biws,r=abc,x=ext");
        // The final message before the first is an error, not a panic.
        let exchange = ServerExchange::new(rfc_verifier(), false, None);
        assert!(exchange.client_final(CLIENT_FINAL).is_err());
    }

    #[test]
    fn an_independent_client_logs_in() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let salt = b"0123456789abcdef";
        let verifier = ScramVerifier::from_salted_password(
            &salted_password(b"s3cret", salt, 4096),
            salt,
            4096,
        );
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let mut server = ServerExchange::new(verifier, false, None);
        let first = server
            .client_first(SCRAM_SHA_256, client.message(), "server-part")
            .expect("client-first");
        client.update(&first).expect("server-first accepted");
        let success = server.client_final(client.message()).expect("proof");
        client
            .finish(&success.server_final)
            .expect("server signature accepted");
        let expected_key = hmac(&salted_password(b"s3cret", salt, 4096), &[b"Client Key"]);
        assert_eq!(*success.client_key, expected_key);
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }
}
