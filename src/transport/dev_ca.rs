//! A throw-away certificate authority and a server certificate for `localhost`,
//! `127.0.0.1` and `::1` (`lorabroker dev --tls`, tests): never for production.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Why the development certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    /// rcgen refused the parameters or could not sign.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
}

/// The PEM files written by [`write`].
#[derive(Clone, Debug)]
pub struct DevCertificates {
    /// The CA certificate clients trust (`mosquitto_sub --cafile`).
    pub ca_file: PathBuf,
    /// The server certificate chain (`mqtt.tls.cert_file`).
    pub cert_file: PathBuf,
    /// The server's private key (`mqtt.tls.key_file`).
    pub key_file: PathBuf,
}

/// Generates a CA and a server certificate for the loopback names and writes `ca.pem`,
/// `server.pem` and `server-key.pem` into `dir` (created if missing).
pub fn write(dir: &Path) -> Result<DevCertificates, DevCaError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "lorabroker dev CA (throw-away)");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let mut server = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, &ca)?;
    let put = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, pem))
            .map(|()| path.clone())
            .map_err(|error| DevCaError::Write { path, error })
    };
    Ok(DevCertificates {
        ca_file: put("ca.pem", ca.pem())?,
        cert_file: put("server.pem", cert.pem())?,
        key_file: put("server-key.pem", key.serialize_pem())?,
    })
}
