//! MQTT over TLS and the TLS layer of WebSocket over TLS (rustls on ring, TLS 1.2 and 1.3).
//!
//! The certificate chain, its key and the optional client CA come from `[mqtt.tls]`. One
//! [`CertificateWatch`] reads them again every `mqtt.tls.reload_interval`: when the bytes
//! of any file changed (cert-manager and Kubernetes replace a Secret's files by swapping a
//! symlink, so the content is compared, not a modification time), a new certificate is
//! built and swapped in for the handshakes that follow; established connections keep
//! theirs. Every listener using those files (TLS with ALPN `mqtt`, WSS with `http/1.1`)
//! takes a [`TlsAcceptor`] from the same watch, so a rotation is read, counted and logged
//! once. A bad file at start is a [`TlsConfigError`] naming the key and the file; a bad
//! file at reload keeps the certificate in use, logs a warning naming the file and counts
//! `lorabroker_tls_reloads_total{result="failed"}`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::server::{Acceptor, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::Duplex;
use crate::config::MqttTlsConfig;
use crate::metrics::{Metrics, ResultLabels};

/// Why a TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The client sent no valid ClientHello, or the handshake broke off.
    #[error("{0}")]
    Handshake(#[from] std::io::Error),
}

/// A certificate setting that cannot be used: the key, its file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {file}: {problem}")]
pub struct TlsConfigError {
    /// The setting, e.g. `mqtt.tls.cert_file`.
    pub key: &'static str,
    /// The file it names.
    pub file: String,
    /// What is wrong with it.
    pub problem: String,
}

/// The files a certificate is built from, with their keys in `[mqtt.tls]`.
#[derive(Clone, Debug)]
struct Files {
    cert: String,
    key: String,
    client_ca: String,
}

/// The bytes last read from the files (loaded or refused), to see a change.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Vec<u8>,
}

/// What the watch shares with its acceptors and its reload task.
struct Shared {
    files: Files,
    /// The loaded certificate, as a configuration without ALPN.
    current: RwLock<Arc<ServerConfig>>,
    seen: Mutex<Contents>,
    /// The last read error, so that a missing file is warned about once.
    unreadable: Mutex<Option<String>>,
    reloads: Family<ResultLabels, Counter>,
    expiry: Gauge,
}

/// One certificate source (`[mqtt.tls]`'s files), loaded once and reloaded when the files
/// change, for every listener that presents it.
#[derive(Clone)]
pub struct CertificateWatch {
    shared: Arc<Shared>,
}

impl CertificateWatch {
    /// Loads `[mqtt.tls]`'s files, and (within a Tokio runtime) starts reading them again
    /// every `reload_interval` for as long as the watch or one of its acceptors lives.
    pub fn new(config: &MqttTlsConfig, metrics: &Metrics) -> Result<Self, TlsConfigError> {
        let files = Files {
            cert: config.cert_file.clone(),
            key: config.key_file.clone(),
            client_ca: config.client_ca_file.clone(),
        };
        let contents = read_files(&files)?;
        let (loaded, expires) = build(&files, &contents)?;
        metrics.tls_certificate_expiry.set(expires);
        let shared = Arc::new(Shared {
            files,
            current: RwLock::new(Arc::new(loaded)),
            seen: Mutex::new(contents),
            unreadable: Mutex::new(None),
            reloads: metrics.tls_reloads.clone(),
            expiry: metrics.tls_certificate_expiry.clone(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watch(Arc::downgrade(&shared), config.reload_interval));
        }
        Ok(Self { shared })
    }

    /// Reads the files now and swaps in a new certificate if they changed; what the watch
    /// does every `reload_interval`.
    pub fn reload(&self) {
        self.shared.reload();
    }

    /// An acceptor presenting this certificate that selects one of `protocols` by ALPN
    /// when a client offers it (none is required).
    pub fn acceptor(&self, protocols: &[&[u8]]) -> TlsAcceptor {
        let protocols: Vec<Vec<u8>> = protocols.iter().map(|p| p.to_vec()).collect();
        let current = self.shared.current.read().clone();
        let configs = Arc::new(Configs::derive(current, &protocols));
        TlsAcceptor {
            shared: self.shared.clone(),
            protocols,
            configs: RwLock::new(configs),
        }
    }
}

/// One acceptor's configurations for one loaded certificate: without ALPN, and one per
/// protocol it selects.
struct Configs {
    plain: Arc<ServerConfig>,
    alpn: Vec<(Vec<u8>, Arc<ServerConfig>)>,
}

impl Configs {
    fn derive(plain: Arc<ServerConfig>, protocols: &[Vec<u8>]) -> Self {
        let alpn = protocols
            .iter()
            .map(|p| {
                let mut c = (*plain).clone();
                c.alpn_protocols = vec![p.clone()];
                (p.clone(), Arc::new(c))
            })
            .collect();
        Self { plain, alpn }
    }
}

/// Accepts TLS connections with the certificate of a [`CertificateWatch`], offering its
/// own ALPN protocols.
pub struct TlsAcceptor {
    shared: Arc<Shared>,
    protocols: Vec<Vec<u8>>,
    /// Derived from the watch's certificate; derived again on the first handshake after
    /// the watch swapped it.
    configs: RwLock<Arc<Configs>>,
}

impl TlsAcceptor {
    /// The configurations for the certificate the watch holds now.
    fn configs(&self) -> Arc<Configs> {
        let current = self.shared.current.read().clone();
        let configs = self.configs.read().clone();
        if Arc::ptr_eq(&configs.plain, &current) {
            return configs;
        }
        let fresh = Arc::new(Configs::derive(current, &self.protocols));
        *self.configs.write() = fresh.clone();
        fresh
    }

    /// Runs the server side of a TLS handshake on `tcp`.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Box<dyn Duplex>, TlsError> {
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
        let configs = self.configs();
        let config = match start.client_hello().alpn() {
            Some(mut offered) => offered
                .find_map(|p| configs.alpn.iter().find(|(q, _)| q == p))
                .map(|(_, c)| c.clone())
                .unwrap_or_else(|| configs.plain.clone()),
            None => configs.plain.clone(),
        };
        let stream = start.into_stream(config).await?;
        Ok(Box::new(stream))
    }
}

impl Shared {
    fn reload(&self) {
        let contents = match read_files(&self.files) {
            Ok(c) => c,
            Err(e) => {
                // Unreadable (gone, no permission): warned once until it reads again.
                let mut last = self.unreadable.lock();
                if last.as_deref() != Some(e.problem.as_str()) {
                    *last = Some(e.problem.clone());
                    drop(last);
                    self.refused(&e);
                }
                return;
            }
        };
        *self.unreadable.lock() = None;
        let mut seen = self.seen.lock();
        if *seen == contents {
            return;
        }
        let built = build(&self.files, &contents);
        // Refused bytes are remembered too: one warning per change of the files.
        *seen = contents;
        drop(seen);
        match built {
            Ok((loaded, expires)) => {
                *self.current.write() = Arc::new(loaded);
                self.expiry.set(expires);
                self.reloads
                    .get_or_create(&ResultLabels { result: "loaded" })
                    .inc();
                tracing::info!(cert_file = %self.files.cert, "TLS certificate reloaded");
            }
            Err(e) => self.refused(&e),
        }
    }

    /// Counts and logs a reload that keeps the certificate in use.
    fn refused(&self, e: &TlsConfigError) {
        self.reloads
            .get_or_create(&ResultLabels { result: "failed" })
            .inc();
        tracing::warn!(key = e.key, file = %e.file, problem = %e.problem, "TLS certificate not reloaded: keeping the one in use");
    }
}

/// Reloads every `interval` until the watch and its acceptors are gone.
async fn watch(shared: Weak<Shared>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // File reads are small but blocking; keep them off the connection workers.
        let _ = tokio::task::spawn_blocking(move || shared.reload()).await;
    }
}

fn read_files(files: &Files) -> Result<Contents, TlsConfigError> {
    let read = |key: &'static str, file: &str| {
        if file.is_empty() {
            return Ok(Vec::new());
        }
        std::fs::read(file).map_err(|e| TlsConfigError {
            key,
            file: file.to_owned(),
            problem: format!("cannot read it: {e}"),
        })
    };
    Ok(Contents {
        cert: read("mqtt.tls.cert_file", &files.cert)?,
        key: read("mqtt.tls.key_file", &files.key)?,
        client_ca: read("mqtt.tls.client_ca_file", &files.client_ca)?,
    })
}

/// Builds the server configuration (without ALPN) from the files' bytes, and tells when
/// the leaf certificate expires (Unix seconds).
fn build(files: &Files, contents: &Contents) -> Result<(ServerConfig, i64), TlsConfigError> {
    let bad = |key: &'static str, file: &str, problem: String| TlsConfigError {
        key,
        file: file.to_owned(),
        problem,
    };
    let cert_bad = |p: String| bad("mqtt.tls.cert_file", &files.cert, p);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_bad(format!("not a PEM certificate chain: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_bad("no CERTIFICATE in it".into()));
    };
    let expires = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => cert.validity().not_after.timestamp(),
        Err(e) => return Err(cert_bad(format!("first certificate cannot be parsed: {e}"))),
    };
    let key = PrivateKeyDer::from_pem_slice(&contents.key).map_err(|e| {
        bad(
            "mqtt.tls.key_file",
            &files.key,
            format!("no PEM private key in it: {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| cert_bad(e.to_string()))?;
    let builder = if files.client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let ca_bad = |p: String| bad("mqtt.tls.client_ca_file", &files.client_ca, p);
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&contents.client_ca) {
            let ca = ca.map_err(|e| ca_bad(format!("not a PEM certificate: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| ca_bad(format!("not a CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ca_bad("no CERTIFICATE in it".into()));
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| ca_bad(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let plain = builder.with_single_cert(chain, key).map_err(|e| {
        bad(
            "mqtt.tls.key_file",
            &files.key,
            format!("does not go with {}: {e}", files.cert),
        )
    })?;
    Ok((plain, expires))
}
