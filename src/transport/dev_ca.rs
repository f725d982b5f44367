//! A throw-away certificate authority and a server certificate for `localhost`,
//! `127.0.0.1` and `::1` (`lorabroker dev --tls`, tests): never for production.
//!
//! [`DevCa::create`] writes them into a private directory of the system's temporary
//! directory, `lorabroker-dev-tls-<pid>-<random>`, removed when the [`DevCa`] is dropped
//! (`dev` ending on Ctrl-C, SIGTERM or an error). A `dev` killed outright (SIGKILL) cannot
//! clean up: the next one removes the directories of processes that no longer run.

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

/// Directories of `dev --tls` start with this, then the PID of the process that made them.
const DIR_PREFIX: &str = "lorabroker-dev-tls-";

/// The development certificates in their own directory, removed with it on drop.
pub struct DevCa {
    /// Removes the directory and the files in it when dropped.
    _dir: tempfile::TempDir,
    /// The files in it.
    pub certificates: DevCertificates,
}

impl DevCa {
    /// Removes the certificate directories of `dev` processes that are gone, then makes a
    /// new directory (readable by this user only) with fresh certificates in it.
    pub fn create() -> Result<Self, DevCaError> {
        let temp = std::env::temp_dir();
        remove_stale(&temp);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in(&temp)
            .map_err(|error| DevCaError::Write {
                path: temp.clone(),
                error,
            })?;
        // The server key is in there: this user only (a new directory is 0777 & !umask).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(
                |error| DevCaError::Write {
                    path: dir.path().to_owned(),
                    error,
                },
            )?;
        }
        let certificates = write(dir.path())?;
        Ok(Self {
            _dir: dir,
            certificates,
        })
    }
}

/// Removes the `dev --tls` directories in `temp` whose process no longer runs (on
/// systems with `/proc`; elsewhere nothing is removed). Best effort: a directory that
/// cannot be removed (another user's) stays.
fn remove_stale(temp: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        // A symlink is not ours to follow; only directories are removed.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && pid != std::process::id() && !proc.join(pid.to_string()).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::debug!(dir = %entry.path().display(), "removed the certificates of a dev that is gone")
                }
                Err(e) => {
                    tracing::debug!(dir = %entry.path().display(), error = %e, "cannot remove stale dev certificates")
                }
            }
        }
    }
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
