//! TLS on both hops: the rustls configs pgshift builds from its config file, the live copies
//! sessions read, and the stream type that is either plain TCP or TLS.
//!
//! - Client side (`[listen] tls_cert`, `tls_key`, `tls_client_ca`): a [`ServerConfig`] with
//!   TLS 1.2 and 1.3 and ring's suites (all AEAD with forward secrecy), ALPN `postgresql`
//!   (which Postgres 17's direct TLS requires), and client certificates required when
//!   `tls_client_ca` is set.
//! - Backend side (`[blue]` / `[green]` `tls`, `ca_file`, `tls_cert`, `tls_key`): a
//!   [`ClientConfig`] per color, as libpq's `sslmode`: `verify-full` checks the chain and the
//!   host name; `prefer` / `require` check the chain when `ca_file` is given (libpq does the
//!   same when a root certificate exists) and only encrypt otherwise.
//!
//! Every file is read and checked up front — missing or unreadable, not PEM, a key that does not
//! match its certificate, a certificate outside its validity dates — and each problem names the
//! config key, the file and the reason ([`TlsFileError`]), so `pgshift check` and `pgshift run`
//! refuse a broken setup before a client meets it. [`TlsState`] keeps the live configs behind
//! `ArcSwap`s: [`TlsState::reload`] re-reads every file and swaps all of them or none, and
//! sessions already running keep the config they shook hands with.
//!
//! rustls runs on ring only (never aws-lc): every builder gets the ring provider explicitly.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::auth::endpoint::{EndPoint, tls_server_end_point};
use crate::color::Color;
use crate::config::{BackendConfig, BackendTlsMode, Config, ListenConfig, TlsMode};

/// The ALPN protocol name of the Postgres protocol (required with direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The first byte of a TLS handshake record: a client starting with it speaks TLS directly
/// (Postgres 17's `sslnegotiation=direct`) instead of sending an SSLRequest first.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Both TLS versions pgshift speaks.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A TLS file that cannot be used: which setting, which file, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} = {}: {reason}", file.display())]
pub struct TlsFileError {
    /// The config key that names the file, e.g. `listen.tls_key`, `green.ca_file`.
    pub key: String,
    pub file: PathBuf,
    pub reason: String,
}

impl TlsFileError {
    fn new(key: &str, file: &Path, reason: impl Into<String>) -> TlsFileError {
        TlsFileError {
            key: key.to_string(),
            file: file.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Every TLS problem of a config, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsErrors(pub Vec<TlsFileError>);

impl std::fmt::Display for TlsErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TlsErrors {}

// ---------------------------------------------------------------------------------------------
// The live configs
// ---------------------------------------------------------------------------------------------

/// The rustls configs built from one config file: the client-facing one (when client TLS is on)
/// and one per color (when that color's `tls` is not `disable`).
#[derive(Debug, Clone, Default)]
pub struct TlsConfigs {
    pub listen: Option<Arc<ListenTls>>,
    pub backends: [Option<Arc<ClientConfig>>; 2],
    /// What was loaded, for `pgshift check` (one line per certificate file).
    pub loaded: Vec<String>,
    /// Remarks for `pgshift check` and the start-up log (e.g. a certificate that defines no
    /// channel binding).
    pub warnings: Vec<String>,
}

/// The client-facing TLS config and what SCRAM channel binding needs of its certificate.
#[derive(Debug)]
pub struct ListenTls {
    pub config: Arc<ServerConfig>,
    /// `tls-server-end-point` data of pgshift's leaf certificate (auth termination offers
    /// `SCRAM-SHA-256-PLUS` only when it is defined).
    pub end_point: EndPoint,
}

impl TlsConfigs {
    /// Reads and checks every TLS file `config` names; the error lists every problem.
    pub fn build(config: &Config) -> Result<TlsConfigs, TlsErrors> {
        let mut problems = Vec::new();
        let mut loaded = Vec::new();
        let mut warnings = Vec::new();
        let listen = listen_config(&config.listen, &mut loaded).unwrap_or_else(|mut errors| {
            problems.append(&mut errors);
            None
        });
        let mut backends = [None, None];
        for color in Color::ALL {
            match backend_config(color, config.backend(color), &mut loaded) {
                Ok(built) => backends[color.index()] = built,
                Err(mut errors) => problems.append(&mut errors),
            }
        }
        if let Some(listen) = &listen
            && config.auth.mode == crate::config::AuthMode::Scram
            && let EndPoint::Undefined(algorithm) = &listen.end_point
        {
            warnings.push(format!(
                "listen.tls_cert: the certificate is signed with {algorithm}, which defines no tls-server-end-point hash: SCRAM-SHA-256-PLUS (channel binding) is not offered, so clients with channel_binding=require cannot log in ([auth] mode = \"scram\")"
            ));
        }
        if problems.is_empty() {
            Ok(TlsConfigs {
                listen,
                backends,
                loaded,
                warnings,
            })
        } else {
            Err(TlsErrors(problems))
        }
    }
}

/// The TLS configs sessions use now; swapped whole on reload without touching open sessions.
#[derive(Debug, Default)]
pub struct TlsState {
    listen: ArcSwapOption<ListenTls>,
    backends: [ArcSwapOption<ClientConfig>; 2],
}

impl TlsState {
    /// Builds the configs `config` describes (the start of `pgshift run`).
    pub fn load(config: &Config) -> Result<TlsState, TlsErrors> {
        let state = TlsState::default();
        let configs = TlsConfigs::build(config)?;
        for warning in &configs.warnings {
            tracing::warn!("{warning}");
        }
        state.install(configs);
        Ok(state)
    }

    /// Re-reads every certificate and key `config` names and swaps them in, all or none:
    /// on any problem nothing changes and the error lists every problem. Sessions already
    /// running keep the config they started with; new handshakes use the new one.
    pub fn reload(&self, config: &Config) -> Result<(), String> {
        let configs = TlsConfigs::build(config).map_err(|errors| errors.to_string())?;
        self.install(configs);
        Ok(())
    }

    fn install(&self, configs: TlsConfigs) {
        self.listen.store(configs.listen);
        let [blue, green] = configs.backends;
        self.backends[Color::Blue.index()].store(blue);
        self.backends[Color::Green.index()].store(green);
    }

    /// The client-facing config, when client TLS is on (`tls_mode` not `disable`).
    pub fn listen(&self) -> Option<Arc<ServerConfig>> {
        self.listen
            .load()
            .as_ref()
            .map(|listen| listen.config.clone())
    }

    /// The client-facing config with its certificate's channel-binding data.
    pub fn listen_tls(&self) -> Option<Arc<ListenTls>> {
        self.listen.load_full()
    }

    /// The config for reaching `color`, when its `tls` is not `disable`.
    pub fn backend(&self, color: Color) -> Option<Arc<ClientConfig>> {
        self.backends[color.index()].load_full()
    }
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn listen_config(
    listen: &ListenConfig,
    loaded: &mut Vec<String>,
) -> Result<Option<Arc<ListenTls>>, Vec<TlsFileError>> {
    let (Some(cert_file), Some(key_file)) = (&listen.tls_cert, &listen.tls_key) else {
        return Ok(None);
    };
    if listen.tls_mode == TlsMode::Disable {
        return Ok(None);
    }
    let mut problems = Vec::new();
    let identity = certified_key(
        ("listen.tls_cert", cert_file),
        ("listen.tls_key", key_file),
        loaded,
    )
    .map_err(|mut errors| problems.append(&mut errors))
    .ok();
    let client_roots = optional_roots(
        "listen.tls_client_ca",
        listen.tls_client_ca.as_deref(),
        loaded,
        &mut problems,
    );
    let (Some((chain, key)), Some(client_roots)) = (identity, client_roots) else {
        return Err(problems);
    };
    let provider = ring();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|error| {
            vec![TlsFileError::new(
                "listen.tls_cert",
                cert_file,
                error.to_string(),
            )]
        })?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| {
                    let ca_file = listen.tls_client_ca.as_deref().unwrap_or(cert_file);
                    vec![TlsFileError::new(
                        "listen.tls_client_ca",
                        ca_file,
                        format!("cannot verify client certificates with it: {error}"),
                    )]
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let end_point = tls_server_end_point(&chain[0])
        .map_err(|reason| vec![TlsFileError::new("listen.tls_cert", cert_file, reason)])?;
    let mut server = builder.with_single_cert(chain, key).map_err(|error| {
        vec![TlsFileError::new(
            "listen.tls_key",
            key_file,
            error.to_string(),
        )]
    })?;
    server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(Arc::new(ListenTls {
        config: Arc::new(server),
        end_point,
    })))
}

/// A backend-side config that encrypts without checking the server's certificate (as libpq's
/// `sslmode=require` without a root certificate), for the auth connection of a color whose
/// own `tls` is `disable` when `auth_dsn` asks for TLS.
pub fn encrypt_only_client_config() -> Result<Arc<ClientConfig>, String> {
    let provider = ring();
    let verifier = Arc::new(NameUnchecked::encrypt_only(
        provider.signature_verification_algorithms,
    ));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|error| error.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

fn backend_config(
    color: Color,
    backend: &BackendConfig,
    loaded: &mut Vec<String>,
) -> Result<Option<Arc<ClientConfig>>, Vec<TlsFileError>> {
    if backend.tls == BackendTlsMode::Disable {
        return Ok(None);
    }
    let key_of = |name: &str| format!("{color}.{name}");
    let mut problems = Vec::new();
    let roots = optional_roots(
        &key_of("ca_file"),
        backend.ca_file.as_deref(),
        loaded,
        &mut problems,
    );
    let identity = match (&backend.tls_cert, &backend.tls_key) {
        (Some(cert_file), Some(key_file)) => certified_key(
            (&key_of("tls_cert"), cert_file),
            (&key_of("tls_key"), key_file),
            loaded,
        )
        .map(Some)
        .map_err(|mut errors| problems.append(&mut errors))
        .ok(),
        _ => Some(None),
    };
    let (Some(roots), Some(identity)) = (roots, identity) else {
        return Err(problems);
    };
    let provider = ring();
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        Some(roots) => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|error| {
                        let ca_file = backend.ca_file.as_deref().unwrap_or(Path::new(""));
                        vec![TlsFileError::new(
                            &key_of("ca_file"),
                            ca_file,
                            format!("cannot verify server certificates with it: {error}"),
                        )]
                    })?;
            if backend.tls == BackendTlsMode::VerifyFull {
                webpki
            } else {
                Arc::new(NameUnchecked::chain_only(
                    webpki,
                    provider.signature_verification_algorithms,
                ))
            }
        }
        None => Arc::new(NameUnchecked::encrypt_only(
            provider.signature_verification_algorithms,
        )),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|error| {
            vec![TlsFileError::new(
                &key_of("tls"),
                Path::new(""),
                error.to_string(),
            )]
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut client = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|error| {
            let key_file = backend.tls_key.as_deref().unwrap_or(Path::new(""));
            vec![TlsFileError::new(
                &key_of("tls_key"),
                key_file,
                error.to_string(),
            )]
        })?,
        None => builder.with_no_client_auth(),
    };
    client.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(Arc::new(client)))
}

/// The server name a backend's certificate is checked against (`verify-full`).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a host name or IP address TLS can verify"))
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

fn read_file(key: &str, file: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(file).map_err(|error| {
        let why = match error.kind() {
            io::ErrorKind::NotFound => "no such file".to_string(),
            io::ErrorKind::PermissionDenied => "permission denied".to_string(),
            _ => error.to_string(),
        };
        TlsFileError::new(key, file, format!("cannot read it: {why}"))
    })
}

/// Every certificate of a PEM file, in order; an error when there is none.
fn load_certs(key: &str, file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read_file(key, file)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsFileError::new(key, file, format!("not valid PEM: {error}")))?;
    if certs.is_empty() {
        return Err(TlsFileError::new(
            key,
            file,
            "holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
fn load_key(key: &str, file: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let pem = read_file(key, file)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| {
        let why = match error {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no private key (expected PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")".to_string()
            }
            other => format!("not a valid PEM private key: {other}"),
        };
        TlsFileError::new(key, file, why)
    })
}

/// A certificate chain and its key, checked: readable, dated, and matching each other.
fn certified_key(
    (cert_key, cert_file): (&str, &Path),
    (key_key, key_file): (&str, &Path),
    loaded: &mut Vec<String>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Vec<TlsFileError>> {
    let chain = load_certs(cert_key, cert_file).and_then(|chain| {
        let summary = check_dates(cert_key, cert_file, &chain)?;
        loaded.push(format!("{cert_key} = {}: {summary}", cert_file.display()));
        Ok(chain)
    });
    let key = load_key(key_key, key_file);
    let (chain, key) = match (chain, key) {
        (Ok(chain), Ok(key)) => (chain, key),
        (chain, key) => {
            return Err([chain.err(), key.err()].into_iter().flatten().collect());
        }
    };
    let provider = ring();
    match CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider) {
        Ok(_) => Ok((chain, key)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(vec![TlsFileError::new(
            key_key,
            key_file,
            format!(
                "the private key does not match the certificate in {}",
                cert_file.display()
            ),
        )]),
        Err(error) => Err(vec![TlsFileError::new(
            key_key,
            key_file,
            format!("cannot use this private key: {error}"),
        )]),
    }
}

/// Refuses a chain with a certificate that has expired or is not valid yet; on success, a
/// one-line summary of the first (end-entity) certificate.
fn check_dates(
    key: &str,
    file: &Path,
    chain: &[CertificateDer<'static>],
) -> Result<String, TlsFileError> {
    let now = x509_parser::time::ASN1Time::now();
    let mut summary = String::new();
    for (index, der) in chain.iter().enumerate() {
        let which = if index == 0 {
            "the certificate".to_string()
        } else {
            format!("certificate {} of the chain", index + 1)
        };
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|error| {
            TlsFileError::new(key, file, format!("{which} cannot be parsed: {error}"))
        })?;
        let validity = cert.validity();
        if validity.not_after.timestamp() < now.timestamp() {
            return Err(TlsFileError::new(
                key,
                file,
                format!("{which} expired on {}", validity.not_after),
            ));
        }
        if validity.not_before.timestamp() > now.timestamp() {
            return Err(TlsFileError::new(
                key,
                file,
                format!("{which} is not valid before {}", validity.not_before),
            ));
        }
        if index == 0 {
            summary = format!(
                "{} certificate(s), subject \"{}\", valid until {}",
                chain.len(),
                cert.subject(),
                validity.not_after
            );
        }
    }
    Ok(summary)
}

/// A CA file as trust anchors; every certificate in it must be usable as one.
fn load_roots(
    key: &str,
    file: &Path,
    loaded: &mut Vec<String>,
) -> Result<RootCertStore, TlsFileError> {
    let certs = load_certs(key, file)?;
    let mut roots = RootCertStore::empty();
    for (index, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|error| {
            TlsFileError::new(
                key,
                file,
                format!(
                    "certificate {} is not a usable CA certificate: {error}",
                    index + 1
                ),
            )
        })?;
    }
    loaded.push(format!(
        "{key} = {}: {} CA certificate(s)",
        file.display(),
        roots.len()
    ));
    Ok(roots)
}

/// The trust anchors of an optional CA file: `Some(None)` when there is none, `None` when it
/// cannot be used (the reason is added to `problems`).
fn optional_roots(
    key: &str,
    file: Option<&Path>,
    loaded: &mut Vec<String>,
    problems: &mut Vec<TlsFileError>,
) -> Option<Option<RootCertStore>> {
    match file {
        Some(file) => load_roots(key, file, loaded)
            .map(Some)
            .map_err(|error| problems.push(error))
            .ok(),
        None => Some(None),
    }
}

// ---------------------------------------------------------------------------------------------
// Backend certificate verifiers other than verify-full's
// ---------------------------------------------------------------------------------------------

/// `prefer` / `require`: the server's name is never checked. With a `ca_file` its chain must
/// lead to the CA (libpq's `verify-ca`, which libpq applies to `require` when a root file
/// exists); without one nothing is checked but the handshake signatures, against the
/// presented key (encryption only, as libpq's `require` without a root certificate).
#[derive(Debug)]
struct NameUnchecked {
    /// The chain check of the `ca_file`, when there is one.
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// What the handshake signatures are checked with (the provider's, as webpki's own).
    algorithms: WebPkiSupportedAlgorithms,
}

impl NameUnchecked {
    fn chain_only(chain: Arc<WebPkiServerVerifier>, algorithms: WebPkiSupportedAlgorithms) -> Self {
        NameUnchecked {
            chain: Some(chain),
            algorithms,
        }
    }

    fn encrypt_only(algorithms: WebPkiSupportedAlgorithms) -> Self {
        NameUnchecked {
            chain: None,
            algorithms,
        }
    }
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain first and the name last: a name error means the chain passed.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

/// A connection that is plain TCP or TLS over TCP. The relay polls it through one `match` per
/// call (no dynamic dispatch); the TLS state is boxed to keep the plain case small.
#[derive(Debug)]
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A client connection as accepted (TLS when it asked for it).
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
/// A backend connection as opened (TLS when its color's `tls` got it).
pub type BackendStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_flush(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(stream) => stream.is_write_vectored(),
            MaybeTls::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named_with_their_key() {
        let mut loaded = Vec::new();
        let errors = certified_key(
            ("listen.tls_cert", Path::new("/nonexistent/server.crt")),
            ("listen.tls_key", Path::new("/nonexistent/server.key")),
            &mut loaded,
        )
        .expect_err("missing files");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            vec![
                "listen.tls_cert = /nonexistent/server.crt: cannot read it: no such file",
                "listen.tls_key = /nonexistent/server.key: cannot read it: no such file",
            ]
        );
    }

    #[test]
    fn files_without_pem_blocks_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("empty.pem");
        std::fs::write(&file, "not pem at all\n").expect("write");
        let error = load_certs("green.ca_file", &file).expect_err("no certificate");
        assert!(error.reason.contains("holds no certificate"), "{error}");
        let error = load_key("green.tls_key", &file).expect_err("no key");
        assert!(error.reason.contains("holds no private key"), "{error}");
    }

    #[test]
    fn host_names_for_verification() {
        assert!(server_name("db.example.com").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("::1").is_ok());
        assert!(server_name("not a host").is_err());
    }
}
