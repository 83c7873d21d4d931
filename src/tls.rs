//! TLS to PostgreSQL, following libpq's `sslmode` of `database.url`.
//!
//! tokio-postgres knows `disable`, `prefer` and `require`, and, like libpq, encrypts under
//! `prefer` and `require` without checking the server's certificate. `verify-full` (and
//! `verify-ca`, taken as the stricter `verify-full`) is read here: the connection then
//! requires TLS and checks the certificate chain and host name against `sslrootcert` when
//! given, else the system's trusted roots. Only rustls with the `ring` provider is used.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A connection string that tokio-postgres can parse, and the TLS connector it needs.
pub struct Connection {
    pub url: String,
    pub tls: MakeRustlsConnect,
}

/// A failure to set up TLS from `database.url`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read sslrootcert {path}: {message}")]
    RootCert { path: String, message: String },
    #[error("no trusted root certificate found for sslmode={0}")]
    NoRoots(String),
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads `sslmode` and `sslrootcert` out of `url` and builds the matching connector.
///
/// # Errors
/// When a root certificate cannot be read, or none is trusted under `verify-full`.
pub fn connection(url: &str) -> Result<Connection, TlsError> {
    let (url, root_cert) = take_param(url, "sslrootcert");
    let (url, mode) = take_param(&url, "sslmode");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;

    let (url, config) = match mode.as_deref() {
        Some(mode @ ("verify-full" | "verify-ca")) => {
            let roots = trusted_roots(root_cert.as_deref(), mode)?;
            let config = builder.with_root_certificates(roots).with_no_client_auth();
            (with_param(&url, "sslmode", "require"), config)
        }
        other => {
            let verifier = Arc::new(EncryptOnly { provider });
            let config = builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            let url = match other {
                Some(mode) => with_param(&url, "sslmode", mode),
                None => url,
            };
            (url, config)
        }
    };
    Ok(Connection {
        url,
        tls: MakeRustlsConnect::new(config),
    })
}

fn trusted_roots(root_cert: Option<&str>, mode: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let error = |e: &dyn std::fmt::Display| TlsError::RootCert {
                path: path.to_owned(),
                message: e.to_string(),
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| error(&e))? {
                roots
                    .add(cert.map_err(|e| error(&e))?)
                    .map_err(|e| error(&e))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots(mode.to_owned()));
    }
    Ok(roots)
}

/// Removes the parameter `name` from a URL (`?a=b&name=v`) or key-value (`name=v`)
/// connection string, and gives its value.
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let prefix = format!("{name}=");
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), None);
        };
        let (kept, value) = without(query.split('&'), &prefix);
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (url, value)
    } else {
        let (kept, value) = without(url.split_whitespace(), &prefix);
        (kept.join(" "), value)
    }
}

/// The `key=value` pairs but the one starting with `prefix`, and that one's value.
fn without<'a>(
    pairs: impl Iterator<Item = &'a str>,
    prefix: &str,
) -> (Vec<&'a str>, Option<String>) {
    let mut value = None;
    let mut kept = Vec::new();
    for pair in pairs {
        match pair.strip_prefix(prefix) {
            Some(found) => value = Some(found.to_owned()),
            None => kept.push(pair),
        }
    }
    (kept, value)
}

/// Adds `name=value` to a URL or key-value connection string.
fn with_param(url: &str, name: &str, value: &str) -> String {
    if !url.contains("://") {
        return format!("{url} {name}={value}");
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{name}={value}")
}

/// Encrypts without checking who the server is, as libpq does under `prefer` and
/// `require`. The handshake signatures are still checked.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_taken_from_both_forms() {
        let (url, mode) = take_param("postgres://h/db?sslmode=verify-full&user=u", "sslmode");
        assert_eq!(
            (url.as_str(), mode.as_deref()),
            ("postgres://h/db?user=u", Some("verify-full"))
        );
        let (url, mode) = take_param("postgres://h/db?sslmode=require", "sslmode");
        assert_eq!(
            (url.as_str(), mode.as_deref()),
            ("postgres://h/db", Some("require"))
        );
        let (url, mode) = take_param("host=h sslmode=verify-ca dbname=d", "sslmode");
        assert_eq!(
            (url.as_str(), mode.as_deref()),
            ("host=h dbname=d", Some("verify-ca"))
        );
        assert_eq!(
            with_param("postgres://h/db", "sslmode", "require"),
            "postgres://h/db?sslmode=require"
        );
    }

    #[test]
    fn verify_full_without_roots_is_an_error() {
        let result = connection("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem");
        assert!(matches!(result, Err(TlsError::RootCert { .. })));
    }
}
