//! The secured part of a NATS connection: the servers' addresses, the credentials read
//! from the files `[nats]` names, and TLS, turned into async-nats [`ConnectOptions`].
//!
//! Every file is read and checked here, before the first connection attempt, so that a
//! missing, unreadable or malformed file stops the start with a message naming its key
//! and path (never its content). Certificates and keys are checked here and then handed
//! to async-nats by path: it reads them again on every connection attempt, so a rotated
//! certificate is used from the next reconnection on.

use std::path::PathBuf;
use std::sync::Arc;

use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::rustls::{ClientConfig, RootCertStore};
use async_nats::{ConnectOptions, ServerAddr};

use crate::config::{redact_url, NatsAuth, NatsConfig};

/// Largest secret or certificate file read (a creds file is about 1 KB).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// What [`prepare`] made of the configuration.
pub(super) struct Prepared {
    /// The servers, in the configured order.
    pub servers: Vec<ServerAddr>,
    /// Options with the credentials and TLS settings applied.
    pub options: ConnectOptions,
    /// What to tell an operator when the server refuses the credentials.
    pub auth_hint: String,
    /// What to tell an operator when the TLS handshake fails.
    pub tls_hint: String,
    /// Whether this node asks for TLS (a `tls://` or `wss://` URL or TLS settings): then
    /// a connection error may be a failed handshake, which async-nats reports as an IO
    /// error.
    pub tls: bool,
}

/// Applies the URLs, credentials and TLS settings of `config` to `options`; every problem
/// found is returned at once, one line each, starting with its key.
pub(super) fn prepare(
    config: &NatsConfig,
    options: ConnectOptions,
) -> Result<Prepared, Vec<String>> {
    let mut problems = Vec::new();
    let mut servers = Vec::new();
    for url in config.urls() {
        match url.parse::<ServerAddr>() {
            Ok(addr) => servers.push(addr),
            // async-nats' message names the URL's part that is wrong, not the URL.
            Err(e) => problems.push(format!("nats.url: {:?}: {e}", redact_url(url))),
        }
    }
    if servers.is_empty() && problems.is_empty() {
        problems.push("nats.url: no NATS server URL given".into());
    }
    let mut options = options;
    let auth_hint = match config.auth() {
        NatsAuth::None => "this node sent no credentials: set nats.user and \
             nats.password_file, nats.token_file, nats.nkey_seed_file or nats.creds_file"
            .to_owned(),
        // async-nats 0.51 parses them but does not send them: they are sent from here.
        NatsAuth::InUrl => {
            match url_credentials(&servers) {
                Ok(Some((user, Some(password)))) => {
                    options = options.user_and_password(user, password)
                }
                Ok(Some((token, None))) => options = options.token(token),
                Ok(None) => {}
                Err(problem) => problems.push(problem),
            }
            "the server refused the credentials in nats.url".to_owned()
        }
        NatsAuth::UserPassword {
            user,
            password_file,
        } => {
            if let Some(password) = read_secret("nats.password_file", password_file, &mut problems)
            {
                options = options.user_and_password(user.to_owned(), password);
            }
            format!(
                "the server refused user {user:?} with the password in nats.password_file \
                 ({password_file})"
            )
        }
        NatsAuth::Token(path) => {
            if let Some(token) = read_secret("nats.token_file", path, &mut problems) {
                options = options.token(token);
            }
            format!("the server refused the token in nats.token_file ({path})")
        }
        NatsAuth::NKey(path) => {
            if let Some(seed) = read_seed(path, &mut problems) {
                options = options.nkey(seed);
            }
            format!("the server refused the NKey of nats.nkey_seed_file ({path})")
        }
        NatsAuth::Creds(path) => {
            if let Some(creds) = read_text("nats.creds_file", path, &mut problems) {
                // The error names what is missing (JWT or seed), never the content.
                match options.credentials(&creds) {
                    Ok(o) => options = o,
                    Err(e) => {
                        problems.push(format!(
                            "nats.creds_file: {path} is not a NATS credentials file ({e})"
                        ));
                        // `credentials` took the options; the start fails anyway.
                        options = ConnectOptions::new();
                    }
                }
            }
            format!("the server refused the credentials in nats.creds_file ({path})")
        }
    };
    if !config.tls_ca_file.is_empty() && read_ca(&config.tls_ca_file, &mut problems).is_some() {
        options = options.add_root_certificates(PathBuf::from(&config.tls_ca_file));
    }
    if !config.tls_cert_file.is_empty()
        && !config.tls_key_file.is_empty()
        && check_client_certificate(&config.tls_cert_file, &config.tls_key_file, &mut problems)
    {
        options = options.add_client_certificate(
            PathBuf::from(&config.tls_cert_file),
            PathBuf::from(&config.tls_key_file),
        );
    }
    if config.requires_tls() {
        options = options.require_tls(true);
    }
    let trusted = if config.tls_ca_file.is_empty() {
        "the system's root certificates (set nats.tls_ca_file for a private CA)".to_owned()
    } else {
        format!("nats.tls_ca_file ({})", config.tls_ca_file)
    };
    let tls_hint = format!(
        "the TLS handshake failed: the server must speak TLS with a certificate for the URL's \
         host name that chains to {trusted}{}",
        if config.tls_cert_file.is_empty() {
            ", and must not require a client certificate (nats.tls_cert_file)".to_owned()
        } else {
            format!(
                ", and must accept the client certificate in nats.tls_cert_file ({})",
                config.tls_cert_file
            )
        }
    );
    let tls = config.requires_tls()
        || config
            .urls()
            .iter()
            .any(|u| u.starts_with("tls://") || u.starts_with("wss://"));
    if problems.is_empty() {
        Ok(Prepared {
            servers,
            options,
            auth_hint,
            tls_hint,
            tls,
        })
    } else {
        Err(problems)
    }
}

/// The user and password (or, with a user alone, the token: `nats://token@host`) in the
/// URLs, percent-decoded; the same in every URL that has any.
fn url_credentials(servers: &[ServerAddr]) -> Result<Option<(String, Option<String>)>, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut found: Option<(String, Option<String>)> = None;
    for server in servers {
        let Some(user) = server.username() else {
            continue;
        };
        let these = (decode(user), server.password().map(decode));
        match &found {
            Some(first) if *first != these => {
                return Err(
                    "nats.url: the URLs carry different credentials; give them once, \
                     the same in every URL (or use nats.user and nats.password_file)"
                        .into(),
                )
            }
            _ => found = Some(these),
        }
    }
    Ok(found)
}

/// The bytes of `path`, or a problem naming `key`.
fn read_bytes(key: &str, path: &str, problems: &mut Vec<String>) -> Option<Vec<u8>> {
    let read = std::fs::metadata(path).and_then(|m| {
        if m.is_dir() {
            Err(std::io::Error::other("it is a directory"))
        } else if m.len() > MAX_FILE_BYTES {
            Err(std::io::Error::other(format!(
                "it is larger than {MAX_FILE_BYTES} bytes"
            )))
        } else {
            std::fs::read(path)
        }
    });
    match read {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            problems.push(format!("{key}: cannot read {path}: {e}"));
            None
        }
    }
}

/// The UTF-8 text of `path`, or a problem naming `key`.
fn read_text(key: &str, path: &str, problems: &mut Vec<String>) -> Option<String> {
    let bytes = read_bytes(key, path, problems)?;
    match String::from_utf8(bytes) {
        Ok(text) => Some(text),
        Err(_) => {
            problems.push(format!("{key}: {path} is not UTF-8 text"));
            None
        }
    }
}

/// A password or token: the file's text without its line ending (`echo secret > file`
/// and Kubernetes Secrets made from such files end in one). Must not be empty.
fn read_secret(key: &str, path: &str, problems: &mut Vec<String>) -> Option<String> {
    let text = read_text(key, path, problems)?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        problems.push(format!("{key}: {path} is empty"));
        return None;
    }
    Some(secret.to_owned())
}

/// A user NKey seed (`SU…`, 58 characters), checked by decoding it.
fn read_seed(path: &str, problems: &mut Vec<String>) -> Option<String> {
    const KEY: &str = "nats.nkey_seed_file";
    let text = read_text(KEY, path, problems)?;
    let seed = text.trim();
    match nkeys::KeyPair::from_seed(seed) {
        Ok(pair) if pair.public_key().starts_with('U') => Some(seed.to_owned()),
        Ok(_) => {
            problems.push(format!(
                "{KEY}: {path} holds the seed of an operator, account or server NKey; \
                 clients authenticate with a user seed (SU…)"
            ));
            None
        }
        Err(_) => {
            problems.push(format!(
                "{KEY}: {path} does not hold an NKey seed (one line starting with SU, as \
                 `nk -gen user` writes)"
            ));
            None
        }
    }
}

/// The CA certificates of `path` (at least one, each usable as a trust anchor).
fn read_ca(path: &str, problems: &mut Vec<String>) -> Option<RootCertStore> {
    const KEY: &str = "nats.tls_ca_file";
    let certs = read_certs(KEY, path, problems)?;
    let mut store = RootCertStore::empty();
    for cert in certs {
        if let Err(e) = store.add(cert) {
            problems.push(format!(
                "{KEY}: {path} holds a certificate that is not a CA: {e}"
            ));
            return None;
        }
    }
    Some(store)
}

/// The PEM certificates of `path`; at least one.
fn read_certs(
    key: &str,
    path: &str,
    problems: &mut Vec<String>,
) -> Option<Vec<CertificateDer<'static>>> {
    let bytes = read_bytes(key, path, problems)?;
    match CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            problems.push(format!(
                "{key}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
            ));
            None
        }
        Err(e) => {
            problems.push(format!("{key}: {path} is not a PEM certificate file: {e}"));
            None
        }
    }
}

/// Whether the client certificate and key read, parse and belong together.
fn check_client_certificate(cert: &str, key: &str, problems: &mut Vec<String>) -> bool {
    let certs = read_certs("nats.tls_cert_file", cert, problems);
    let private = read_bytes("nats.tls_key_file", key, problems).and_then(|bytes| {
        match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(k) => Some(k),
            Err(_) => {
                problems.push(format!(
                    "nats.tls_key_file: {key} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"
                ));
                None
            }
        }
    });
    let (Some(certs), Some(private)) = (certs, private) else {
        return false;
    };
    // The same provider async-nats builds its TLS configuration with.
    let provider = Arc::new(async_nats::rustls::crypto::ring::default_provider());
    let built = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(RootCertStore::empty())
                .with_client_auth_cert(certs, private)
        });
    match built {
        Ok(Ok(_)) => true,
        Ok(Err(e)) | Err(e) => {
            problems.push(format!(
                "nats.tls_key_file: {key} does not go with the certificate in \
                 nats.tls_cert_file ({cert}): {e}"
            ));
            false
        }
    }
}
