//! `https://` endpoints: whom the client trusts (the system's roots plus an
//! optional CA file) and the TLS handshake over a TCP connection.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::endpoint::TcpTarget;
use super::ClientError;

/// The system's trusted roots (`/etc/ssl/certs` and the like, or
/// `SSL_CERT_FILE`/`SSL_CERT_DIR`), read once per process. Certificates
/// that cannot be read are skipped: a CA file, or the handshake's error,
/// says what is missing.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::debug!(%error, "skipping a system CA certificate");
        }
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(found.certs);
        roots
    })
}

/// A TLS client configuration trusting the system's roots and, when given,
/// every certificate in the PEM `ca_file`.
pub(super) fn client_config(
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = system_roots().clone();
    if let Some(path) = ca_file {
        let bad = |reason: String| ClientError::CaFile {
            path: path.to_path_buf(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not PEM ({e})")))?;
        if certs.is_empty() {
            return Err(bad(
                "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| bad(format!("a certificate cannot be used as a CA ({e})")))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::CaFile {
        path: ca_file.unwrap_or(Path::new("-")).to_path_buf(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // The API speaks HTTP/1.1 only (upgrades included).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Runs the TLS handshake with `target` over `stream`, checking the
/// certificate against `target.host` (a name or an IP address).
pub(super) async fn connect(
    config: Arc<rustls::ClientConfig>,
    target: &TcpTarget,
    endpoint: &str,
    stream: TcpStream,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let failed = |reason: String, hint: &'static str| ClientError::Tls {
        endpoint: endpoint.to_string(),
        reason,
        hint,
    };
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| failed(format!("{:?} is not a server name ({e})", target.host), ""))?;
    TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| {
            let certificate = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
            let hint = if certificate {
                " (the daemon's certificate is not trusted for this name: pass the CA that \
                 signed it with --ca-file or VMLET_CA_FILE, and check that the certificate \
                 names the host in the URL)"
            } else {
                ""
            };
            failed(e.to_string(), hint)
        })
}
