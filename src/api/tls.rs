//! HTTPS on the TCP listener: the certificate and key from `[api] tls_cert`
//! and `tls_key` (PEM), and the TLS handshake of each connection.
//!
//! The key file gets the token file's checks: a regular file, owned by root
//! or the daemon's user, with no access for group or others. The key must
//! match the certificate (the first one in `tls_cert`; the rest of the file
//! is the chain sent along).
//!
//! The handshake is part of what a client must finish within the
//! header-read timeout. A client that speaks plain HTTP to the port gets a
//! plain `400` saying to use `https://` instead of a TLS alert it cannot
//! read.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One of `tls_cert` and `tls_key` is set without the other.
    #[error("[api] {set} is set but {missing} is not: TLS needs both (or neither)")]
    Half {
        /// The setting given.
        set: &'static str,
        /// The setting missing.
        missing: &'static str,
    },
    /// The certificate file cannot be read.
    #[error("TLS certificate file {path}")]
    CertFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The certificate file holds no usable PEM certificate.
    #[error("TLS certificate file {path}: {reason}")]
    BadCert {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file cannot be read.
    #[error("TLS key file {path}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The key file holds no usable PEM private key.
    #[error("TLS key file {path}: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Others than its owner may read or write the key file.
    #[error(
        "TLS key file {path} has mode {mode:04o}: group and others must have no access \
         (chmod 600 {path})"
    )]
    KeyMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file belongs to someone else than root or the daemon's user.
    #[error("TLS key file {path} is owned by uid {uid}: it must belong to root or uid {own}")]
    KeyOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The daemon's user.
        own: u32,
    },
    /// The key is not the certificate's.
    #[error("TLS key file {key} does not match the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refuses the pair for another reason (unsupported key type…).
    #[error("TLS certificate {cert} with key {key}: {reason}")]
    Unusable {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// The TLS acceptor for `cert` and `key` as configured (`None`: plain
/// HTTP). Either alone is an error.
pub fn acceptor(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<TlsAcceptor>, TlsError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(TlsError::Half {
            set: "tls_cert",
            missing: "tls_key",
        }),
        (None, Some(_)) => Err(TlsError::Half {
            set: "tls_key",
            missing: "tls_cert",
        }),
        (Some(cert), Some(key)) => {
            let config = server_config(cert, key)?;
            Ok(Some(TlsAcceptor::from(Arc::new(config))))
        }
    }
}

/// The server configuration for a certificate chain and key in PEM files:
/// HTTP/1.1 only (the API speaks nothing else), ring as the crypto
/// provider, rustls's safe default protocol versions (TLS 1.2 and 1.3).
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let chain = read_certs(cert)?;
    let private_key = read_key(key)?;
    let unusable = |e: rustls::Error| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::Mismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }
        }
        other => TlsError::Unusable {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: other.to_string(),
        },
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(unusable)?
    .with_no_client_auth()
    .with_single_cert(chain, private_key)
    .map_err(unusable)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::BadCert {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|source| TlsError::CertFile {
        path: path.to_path_buf(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM ({e})")))?;
    if chain.is_empty() {
        return Err(bad(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        ));
    }
    Ok(chain)
}

/// Reads the key, refusing a file that is not private to root or the
/// daemon's user. The checks are made on the opened file, so what is
/// checked is what is read.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key_error = |source| TlsError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(key_error)?;
    let meta = file.metadata().map_err(key_error)?;
    if !meta.is_file() {
        return Err(TlsError::BadKey {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let own = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != own {
        return Err(TlsError::KeyOwner {
            path: path.to_path_buf(),
            uid: meta.uid(),
            own,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut pem = Vec::new();
    io::Read::read_to_end(&mut file, &mut pem).map_err(key_error)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::BadKey {
        path: path.to_path_buf(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".to_string()
            }
            other => format!("not PEM ({other})"),
        },
    })
}

/// The first byte of a TLS handshake record: anything else is not TLS.
const TLS_HANDSHAKE: u8 = 0x16;

/// How much of a plain-HTTP request head is read before it is answered.
const PLAIN_HEAD_LIMIT: usize = 16 * 1024;

/// The answer to plain HTTP on a TLS port.
const PLAIN_HTTP_REFUSED: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 116\r\n\r\n\
{\"error\":{\"code\":\"bad_request\",\"message\":\"this port speaks HTTPS only: use https:// \
instead of http:// in the URL\"}}";

/// Runs the TLS handshake of an accepted connection, which must finish
/// within `timeout`. `None` when it fails (logged), times out, or the
/// client speaks plain HTTP (answered with [`PLAIN_HTTP_REFUSED`]).
pub async fn handshake(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    timeout: Duration,
) -> Option<TlsStream<TcpStream>> {
    let started = tokio::time::Instant::now();
    let mut first = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
        Ok(Ok(1)) => {
            refuse_plain_http(stream, started + timeout).await;
            return None;
        }
        Ok(_) => return None,
        Err(_) => {
            tracing::debug!("closing an API connection: no TLS handshake in time");
            return None;
        }
    }
    match tokio::time::timeout_at(started + timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake of an API connection failed");
            None
        }
        Err(_) => {
            tracing::debug!("closing an API connection: TLS handshake not finished in time");
            None
        }
    }
}

/// Reads the plain request's head (so closing does not reset the
/// connection under the answer), answers 400, and closes.
async fn refuse_plain_http(mut stream: TcpStream, deadline: tokio::time::Instant) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    let read_head = async {
        while head.len() < PLAIN_HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, read_head).await;
    tracing::debug!("refused plain HTTP on the TLS listener");
    let answer = async {
        stream.write_all(PLAIN_HTTP_REFUSED).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout_at(deadline, answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_is_well_formed() {
        let text = std::str::from_utf8(PLAIN_HTTP_REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["error"]["code"], "bad_request");
        assert!(value["error"]["message"]
            .as_str()
            .unwrap()
            .contains("https://"));
    }

    /// A self-signed certificate and its key, written to `dir` (the key
    /// with `mode`); returns their paths.
    fn pair(dir: &Path, name: &str, mode: u32) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        (cert, key)
    }

    #[test]
    fn a_matching_private_pair_loads_and_every_flaw_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), "a", 0o600);
        let config = server_config(&cert, &key).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);

        let (other_cert, _) = pair(dir.path(), "b", 0o600);
        let err = server_config(&other_cert, &key).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");

        let (_, open_key) = pair(dir.path(), "c", 0o644);
        let err = server_config(&cert, &open_key).unwrap_err().to_string();
        assert!(err.contains("c.key") && err.contains("0644"), "{err}");

        let missing = dir.path().join("missing.key");
        let err = server_config(&cert, &missing).unwrap_err();
        assert!(matches!(err, TlsError::KeyFile { .. }), "{err}");
        assert!(err.to_string().contains("missing.key"), "{err}");

        // A certificate where the key should be: no key in it.
        let not_key = dir.path().join("not-a.key");
        std::fs::copy(&cert, &not_key).unwrap();
        std::fs::set_permissions(
            &not_key,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let err = server_config(&cert, &not_key).unwrap_err().to_string();
        assert!(
            err.contains("not-a.key") && err.contains("no PEM private key"),
            "{err}"
        );

        let err = server_config(&key, &key).unwrap_err().to_string();
        assert!(
            err.contains("a.key") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = server_config(&dir.path().join("nope.crt"), &key)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TLS certificate file") && err.contains("nope.crt"),
            "{err}"
        );
    }

    #[test]
    fn both_files_or_neither() {
        assert!(acceptor(None, None).unwrap().is_none());
        let err = acceptor(Some(Path::new("/x/cert.pem")), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("tls_key is not"), "{err}");
        let err = acceptor(None, Some(Path::new("/x/key.pem"))).err().unwrap();
        assert!(err.to_string().contains("tls_cert is not"), "{err}");
    }
}
