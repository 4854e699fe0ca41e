//! Test certificates: a throwaway PKI generated with rcgen into a directory (none is ever
//! committed), rustls client configs that trust it, and `ssl = on` for a test cluster with
//! its database certificate.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use super::{Cluster, SUPERUSER, TEST_USER, pg_bin_dir, pg_os_user};

/// A test PKI in a directory: two CAs and certificates signed by them.
///
/// | file | what |
/// |---|---|
/// | `ca.crt` | the CA everything below is signed by, unless said otherwise |
/// | `server.crt` / `.key` | pgshift's certificate: `localhost` and `127.0.0.1` |
/// | `db.crt` / `.key` | the databases' certificate: `localhost` only |
/// | `client.crt` / `.key` | a client certificate, CN `pgshift_test` |
/// | `other-ca.crt` | an unrelated CA |
/// | `other-server.crt` / `.key` | `localhost` and `127.0.0.1`, signed by the other CA |
/// | `expired.crt` / `.key` | `localhost`, expired in 2020 |
pub struct Pki {
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

fn new_leaf(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    expired: bool,
) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if expired {
        params.not_before = date_time_ymd(2019, 1, 1);
        params.not_after = date_time_ymd(2020, 1, 1);
    }
    let cert = params.signed_by(&key, issuer).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

/// Writes `text` to `path` with permissions `mode`.
pub fn write_file(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

impl Pki {
    /// A PKI in a fresh temp dir, removed with it.
    pub fn new() -> Pki {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut pki = Pki::create(temp.path().to_path_buf());
        pki._temp = Some(temp);
        pki
    }

    /// A PKI in `dir` (created if needed), left there.
    pub fn create(dir: PathBuf) -> Pki {
        fs::create_dir_all(&dir).expect("pki dir");
        let (ca_pem, ca) = new_ca("pgshift test CA");
        let (other_ca_pem, other_ca) = new_ca("some other CA");
        write_file(&dir.join("ca.crt"), &ca_pem, 0o644);
        write_file(&dir.join("other-ca.crt"), &other_ca_pem, 0o644);
        let leaves = [
            (
                "server",
                &ca,
                "pgshift",
                &["localhost", "127.0.0.1"][..],
                false,
            ),
            ("db", &ca, "db", &["localhost"][..], false),
            ("client", &ca, TEST_USER, &[][..], false),
            (
                "other-server",
                &other_ca,
                "pgshift",
                &["localhost", "127.0.0.1"][..],
                false,
            ),
            ("expired", &ca, "pgshift", &["localhost"][..], true),
        ];
        for (name, issuer, common_name, names, expired) in leaves {
            let (cert, key) = new_leaf(issuer, common_name, names, expired);
            write_file(&dir.join(format!("{name}.crt")), &cert, 0o644);
            write_file(&dir.join(format!("{name}.key")), &key, 0o600);
        }
        Pki { dir, _temp: None }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn text(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).expect("read pki file")
    }

    /// `[listen]` keys for client TLS with `server.crt` and `tls_mode`.
    pub fn listen(&self, mode: &str) -> String {
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\ntls_mode = \"{mode}\"\n",
            self.path("server.crt"),
            self.path("server.key")
        )
    }

    /// The certificates of the CA file `name` as trust anchors.
    pub fn roots(&self, name: &str) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.path(name)).expect("CA file") {
            roots.add(cert.expect("CA certificate")).expect("add CA");
        }
        roots
    }

    /// A rustls client config trusting `ca.crt`, offering `alpn`.
    pub fn client_config(&self, alpn: Option<&[u8]>) -> ClientConfig {
        client_config(self.roots("ca.crt"), alpn)
    }

    /// tokio-postgres's TLS connector trusting `ca.crt`.
    pub fn tokio_postgres_tls(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        tokio_postgres_rustls::MakeRustlsConnect::new(self.client_config(None))
    }
}

/// A rustls client config (ring) trusting `roots`, offering `alpn`.
pub fn client_config(roots: RootCertStore, alpn: Option<&[u8]>) -> ClientConfig {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.map(|alpn| vec![alpn.to_vec()]).unwrap_or_default();
    config
}

/// Turns `ssl = on` on for `cluster` with the PKI's `db` certificate (`localhost` only) and
/// waits until it takes TLS connections.
pub fn enable_ssl(cluster: &Cluster, pki: &Pki) {
    for (from, to) in [("db.crt", "server.crt"), ("db.key", "server.key")] {
        let path = cluster.data_dir().join(to);
        write_file(&path, &pki.text(from), 0o600);
        if let Some(user) = pg_os_user() {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                .expect("chown to the postgres user");
        }
    }
    cluster.psql("ALTER SYSTEM SET ssl = on");
    cluster.psql("SELECT pg_reload_conf()");
    wait_for_ssl(cluster.port());
}

/// Waits until the cluster on `port` accepts TLS connections (after a config reload).
fn wait_for_ssl(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let output = Command::new(pg_bin_dir().join("psql"))
            .env_remove("PGSSLMODE")
            .args([
                "-X",
                "-A",
                "-t",
                "-d",
                &format!(
                    "host=127.0.0.1 port={port} user={SUPERUSER} dbname=postgres sslmode=require"
                ),
                "-c",
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .output()
            .expect("psql runs");
        if output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "t" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ssl did not come on at port {port}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
