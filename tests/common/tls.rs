//! TLS for integration tests: certificate authorities and certificates made with rcgen in
//! the test, a rustls client (tokio-rustls), and a raw MQTT client over any byte stream so
//! that one behaviour suite runs over every transport.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mqttbytes::v4::{self, Connect, Packet, Publish, Subscribe, SubscribeReasonCode};
use mqttbytes::QoS;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use lorabroker::transport::Duplex;

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl Pem {
    /// The DER of the certificate (to compare with a peer certificate).
    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert.as_bytes()).expect("PEM certificate")
    }

    /// Writes `{name}.pem` and `{name}-key.pem` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, &self.cert).unwrap();
        std::fs::write(&key, &self.key).unwrap();
        (cert, key)
    }
}

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/{name}`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A server certificate for localhost and 127.0.0.1 (a new key each time).
    pub fn server(&self) -> Pem {
        let mut p =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "localhost");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(p)
    }

    /// A client certificate named `cn`.
    pub fn client(&self, cn: &str) -> Pem {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(p)
    }

    fn sign(&self, p: CertificateParams) -> Pem {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Opens TLS to `addr` as `localhost`, trusting `roots` (PEM), with an optional client
/// certificate; `Err` when the handshake fails (for instance the server's certificate is
/// not signed by a trusted CA).
pub async fn tls_connect(
    addr: SocketAddr,
    roots: &[String],
    client: Option<&Pem>,
) -> io::Result<TlsStream<TcpStream>> {
    tls_connect_alpn(addr, roots, client, b"mqtt").await
}

/// [`tls_connect`] offering the ALPN protocol `alpn` (`http/1.1` for WebSocket over TLS,
/// as browsers offer it).
pub async fn tls_connect_alpn(
    addr: SocketAddr,
    roots: &[String],
    client: Option<&Pem>,
    alpn: &[u8],
) -> io::Result<TlsStream<TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            store.add(c.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(pem) => builder
            .with_client_auth_cert(
                vec![pem.der()],
                PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The certificate the server presented on `stream`.
pub fn peer_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .clone()
}

/// How long a raw client waits for something that should happen.
const WAIT: Duration = Duration::from_secs(5);

/// A minimal MQTT 3.1.1 client over any byte stream (TCP, TLS, …), packet by packet.
pub struct RawMqtt {
    stream: Box<dyn Duplex>,
    buf: BytesMut,
}

impl RawMqtt {
    /// Wraps a connected stream.
    pub fn new(stream: impl Duplex) -> Self {
        Self {
            stream: Box::new(stream),
            buf: BytesMut::new(),
        }
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Sends a CONNECT and returns the CONNACK code (255: closed without one).
    pub async fn connect(&mut self, username: &str, password: &str, keep_alive: u16) -> u8 {
        let mut c = Connect::new(format!("raw-{}", rand_id()));
        c.set_login(username, password);
        c.keep_alive = keep_alive;
        let mut out = BytesMut::new();
        c.write(&mut out).unwrap();
        self.send(&out).await;
        self.connack().await
    }

    /// Reads the CONNACK code (255: closed without one).
    pub async fn connack(&mut self) -> u8 {
        match self.next().await {
            Some(Packet::ConnAck(ack)) => ack.code as u8,
            None => 255,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Subscribes to `filter` (packet ID 1); whether the SUBACK granted it.
    pub async fn subscribe(&mut self, filter: &str) -> bool {
        let mut out = BytesMut::new();
        let mut s = Subscribe::new(filter, QoS::AtMostOnce);
        s.pkid = 1;
        s.write(&mut out).unwrap();
        self.send(&out).await;
        loop {
            match self.next().await {
                Some(Packet::SubAck(ack)) => {
                    return matches!(ack.return_codes[0], SubscribeReasonCode::Success(_))
                }
                Some(Packet::Publish(_)) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Publishes at QoS 0.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) {
        let mut out = BytesMut::new();
        Publish::new(topic, QoS::AtMostOnce, payload.to_vec())
            .write(&mut out)
            .unwrap();
        self.send(&out).await;
    }

    /// The next PUBLISH on a topic ending in `suffix` within 5 s, skipping others.
    pub async fn next_on(&mut self, suffix: &str) -> Publish {
        loop {
            match self.next().await {
                Some(Packet::Publish(p)) if p.topic.ends_with(suffix) => return p,
                Some(Packet::Publish(_)) => continue,
                other => panic!("expected a PUBLISH on …{suffix}, got {other:?}"),
            }
        }
    }

    /// The next packet within 5 s; `None` when the server closed the connection.
    pub async fn next(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, self.read_packet())
            .await
            .expect("a packet or the close within 5 s")
    }

    /// Whether the server closes the connection within `within` (reading and dropping
    /// whatever it sends first).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            while self.read_packet().await.is_some() {}
        })
        .await
        .is_ok()
    }

    async fn read_packet(&mut self) -> Option<Packet> {
        loop {
            match v4::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the server: {e:?}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) ^ u64::from(std::process::id()) << 32
}
