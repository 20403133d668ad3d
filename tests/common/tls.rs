//! Test certificates: a CA made for the test and a server certificate it
//! signed for `localhost` and `127.0.0.1`, written as PEM files (the key
//! private, mode 0600) in a scratch directory.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::Scratch;

/// The files of a test PKI; removed on drop.
pub struct TestPki {
    /// The CA's certificate (what `--ca-file` takes).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key (mode 0600).
    pub key: PathBuf,
    scratch: Scratch,
}

impl TestPki {
    /// A fresh CA and server certificate.
    pub fn new() -> TestPki {
        let scratch = Scratch::new();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "vmlet test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "vmlet test server");
        let server = params.signed_by(&server_key, &*ca).unwrap();

        let dir = scratch.path();
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            scratch,
        };
        std::fs::write(&pki.ca, ca.as_ref().pem()).unwrap();
        std::fs::write(&pki.cert, server.pem()).unwrap();
        std::fs::write(&pki.key, server_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        pki
    }

    /// A path in the PKI's directory, for more files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }
}
