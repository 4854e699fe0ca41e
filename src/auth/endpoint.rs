//! `tls-server-end-point` channel-binding data (RFC 5929 §4.1): the hash of a TLS server's
//! leaf certificate (DER), with the hash function of the certificate's signature algorithm —
//! SHA-256 in place of MD5 and SHA-1. Certificates signed with Ed25519 or Ed448 (no separate
//! hash) define none: a server with one cannot offer `SCRAM-SHA-256-PLUS`.
//!
//! Used both ways: for pgshift's own certificate (offered to TLS clients) and for a backend's
//! certificate (pgshift binding its own login to that TLS connection). PostgreSQL and libpq
//! compute the same value from OpenSSL's `X509_get_signature_info`.

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// The channel-binding data a certificate defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndPoint {
    Hash(Vec<u8>),
    /// The signature algorithm defines no hash (Ed25519, Ed448, or one pgshift does not know):
    /// no channel binding with this certificate.
    Undefined(String),
}

impl EndPoint {
    pub fn hash(&self) -> Option<&[u8]> {
        match self {
            EndPoint::Hash(hash) => Some(hash),
            EndPoint::Undefined(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HashFunction {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashFunction {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashFunction::Sha224 => Sha224::digest(data).to_vec(),
            HashFunction::Sha256 => Sha256::digest(data).to_vec(),
            HashFunction::Sha384 => Sha384::digest(data).to_vec(),
            HashFunction::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

/// The hash function RFC 5929 assigns to a hash algorithm OID (MD5 and SHA-1 → SHA-256).
fn for_hash_oid(oid: &str) -> Option<HashFunction> {
    match oid {
        "1.2.840.113549.2.5" | "1.3.14.3.2.26" | "2.16.840.1.101.3.4.2.1" => {
            Some(HashFunction::Sha256)
        }
        "2.16.840.1.101.3.4.2.4" => Some(HashFunction::Sha224),
        "2.16.840.1.101.3.4.2.2" => Some(HashFunction::Sha384),
        "2.16.840.1.101.3.4.2.3" => Some(HashFunction::Sha512),
        _ => None,
    }
}

/// The hash function for a signature algorithm OID, when it names one.
fn for_signature_oid(oid: &str) -> Option<HashFunction> {
    match oid {
        // RSA PKCS#1 v1.5: md5, sha1, sha256, sha384, sha512, sha224
        "1.2.840.113549.1.1.4" | "1.2.840.113549.1.1.5" | "1.2.840.113549.1.1.11" => {
            Some(HashFunction::Sha256)
        }
        "1.2.840.113549.1.1.12" => Some(HashFunction::Sha384),
        "1.2.840.113549.1.1.13" => Some(HashFunction::Sha512),
        "1.2.840.113549.1.1.14" => Some(HashFunction::Sha224),
        // ECDSA with sha1, sha224, sha256, sha384, sha512
        "1.2.840.10045.4.1" | "1.2.840.10045.4.3.2" => Some(HashFunction::Sha256),
        "1.2.840.10045.4.3.1" => Some(HashFunction::Sha224),
        "1.2.840.10045.4.3.3" => Some(HashFunction::Sha384),
        "1.2.840.10045.4.3.4" => Some(HashFunction::Sha512),
        // DSA with sha1, sha224, sha256
        "1.2.840.10040.4.3" | "2.16.840.1.101.3.4.3.2" => Some(HashFunction::Sha256),
        "2.16.840.1.101.3.4.3.1" => Some(HashFunction::Sha224),
        _ => None,
    }
}

fn algorithm_name(oid: &str) -> String {
    match oid {
        "1.3.101.112" => "Ed25519".into(),
        "1.3.101.113" => "Ed448".into(),
        other => format!("signature algorithm {other}"),
    }
}

/// The `tls-server-end-point` data of a DER certificate; `Err` when it cannot be parsed.
pub fn tls_server_end_point(der: &[u8]) -> Result<EndPoint, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| format!("the certificate cannot be parsed: {error}"))?;
    let algorithm = &cert.signature_algorithm;
    let oid = algorithm.algorithm.to_id_string();
    let function = if oid == "1.2.840.113549.1.1.10" {
        // RSASSA-PSS: the hash is in the parameters (SHA-1 when absent, RFC 4055).
        match x509_parser::signature_algorithm::SignatureAlgorithm::try_from(algorithm) {
            Ok(x509_parser::signature_algorithm::SignatureAlgorithm::RSASSA_PSS(params)) => {
                for_hash_oid(&params.hash_algorithm_oid().to_id_string())
            }
            _ => None,
        }
    } else {
        for_signature_oid(&oid)
    };
    Ok(match function {
        Some(function) => EndPoint::Hash(function.digest(der)),
        None => EndPoint::Undefined(algorithm_name(&oid)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(algorithm: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(algorithm).expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .self_signed(&key)
            .expect("certificate")
            .der()
            .to_vec()
    }

    #[test]
    fn ecdsa_sha256_hashes_with_sha256() {
        let der = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        let end_point = tls_server_end_point(&der).expect("parses");
        assert_eq!(end_point, EndPoint::Hash(Sha256::digest(&der).to_vec()));
        assert_eq!(end_point.hash().map(<[u8]>::len), Some(32));
    }

    #[test]
    fn ecdsa_sha384_hashes_with_sha384() {
        let der = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            tls_server_end_point(&der).expect("parses"),
            EndPoint::Hash(Sha384::digest(&der).to_vec())
        );
    }

    #[test]
    fn ed25519_defines_no_end_point() {
        let der = self_signed(&rcgen::PKCS_ED25519);
        assert_eq!(
            tls_server_end_point(&der).expect("parses"),
            EndPoint::Undefined("Ed25519".into())
        );
    }

    #[test]
    fn md5_and_sha1_are_replaced_by_sha256() {
        for oid in [
            "1.2.840.113549.1.1.4",
            "1.2.840.113549.1.1.5",
            "1.2.840.10045.4.1",
        ] {
            assert_eq!(for_signature_oid(oid), Some(HashFunction::Sha256), "{oid}");
        }
        assert_eq!(for_hash_oid("1.3.14.3.2.26"), Some(HashFunction::Sha256));
        assert_eq!(
            for_signature_oid("1.2.840.113549.1.1.13"),
            Some(HashFunction::Sha512)
        );
        assert_eq!(for_signature_oid("1.3.101.113"), None);
        assert_eq!(algorithm_name("1.3.101.113"), "Ed448");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(tls_server_end_point(b"not a certificate").is_err());
    }
}
