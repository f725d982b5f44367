//! The PROXY protocol (v1 and v2) header a load balancer sends before the client's bytes
//! (<https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt>), parsed by the `ppp`
//! crate.
//!
//! The header is read without consuming a byte of what follows it (the MQTT CONNECT or the
//! TLS ClientHello stays in the socket for the next layer): v2 announces its length in its
//! fixed 16 bytes, and v1 ends at its first `\n`, found by peeking before reading. How
//! long the header may take is `mqtt.handshake_timeout` (the caller's).

use std::io;
use std::net::SocketAddr;

use ppp::v2::{self, AddressFamily, Command, Protocol};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest PROXY v1 header, `\r\n` included (the specification's bound).
pub const MAX_V1_HEADER: usize = 107;

/// Longest PROXY v2 header accepted, the 16 fixed bytes and every TLV included. The
/// addresses take at most 36 bytes (TCP over IPv6); the rest is room for the TLVs load
/// balancers add (AWS NLB's VPC endpoint ID, Azure's link ID, haproxy's unique ID, a CRC).
/// A longer header is refused instead of read.
pub const MAX_V2_HEADER: usize = 512;

/// The signature a v1 header starts with.
const V1_SIGNATURE: &[u8] = b"PROXY";
/// The first bytes of the v2 signature: as many as the v1 one, to tell them apart.
const V2_SIGNATURE_START: &[u8] = b"\r\n\r\n\0";
/// The fixed part of a v2 header: signature, version and command, family and protocol,
/// length.
const V2_FIXED: usize = 16;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The first bytes are not a PROXY v1 or v2 signature (no header, or garbage).
    #[error("no PROXY protocol header: the connection starts with {0}")]
    Missing(String),
    /// The connection ended inside the header.
    #[error("the connection closed after {0} bytes of the PROXY header")]
    Truncated(usize),
    /// A v1 header without its `\r\n` within [`MAX_V1_HEADER`] bytes.
    #[error("PROXY v1 header longer than {MAX_V1_HEADER} bytes")]
    V1TooLong,
    /// A v1 header `ppp` cannot parse.
    #[error("invalid PROXY v1 header: {0}")]
    V1Invalid(String),
    /// A v2 header announcing more than [`MAX_V2_HEADER`] bytes.
    #[error("PROXY v2 header of {0} bytes, more than the {MAX_V2_HEADER} accepted")]
    V2TooLong(usize),
    /// A v2 header `ppp` cannot parse.
    #[error("invalid PROXY v2 header: {0}")]
    V2Invalid(String),
    /// A valid header for something other than a TCP connection (UDP, a unix socket).
    #[error("PROXY header for {0}, not a TCP connection")]
    NotTcp(&'static str),
    /// Reading the socket failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// Reads the PROXY header at the start of `tcp`: the client's address, or `None` for a
/// `LOCAL` (v2) or `UNKNOWN` (v1) header (a load balancer's health check), in which case
/// the socket's own address is the client's. Reads exactly the header's bytes.
pub async fn read_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    // Both versions are longer than this: reading it never takes a byte of what follows.
    let mut start = [0u8; 5];
    read_exact(tcp, &mut start, 0).await?;
    if start == V1_SIGNATURE {
        read_v1(tcp, start).await
    } else if start == V2_SIGNATURE_START {
        read_v2(tcp, start).await
    } else {
        Err(ProxyError::Missing(escape(&start)))
    }
}

/// The rest of a v1 header, whose first bytes (`PROXY`) were read.
async fn read_v1(tcp: &mut TcpStream, start: [u8; 5]) -> Result<Option<SocketAddr>, ProxyError> {
    let mut header = [0u8; MAX_V1_HEADER];
    header[..start.len()].copy_from_slice(&start);
    let mut len = start.len();
    // Peek at what arrived; everything up to the first `\n` is header. Without a `\n`,
    // all of it is header: read it, so that the next peek waits for new bytes.
    loop {
        if len == MAX_V1_HEADER {
            return Err(ProxyError::V1TooLong);
        }
        let peeked = tcp.peek(&mut header[len..]).await?;
        if peeked == 0 {
            return Err(ProxyError::Truncated(len));
        }
        let end = header[len..len + peeked].iter().position(|&b| b == b'\n');
        let take = end.map_or(peeked, |i| i + 1);
        read_exact(tcp, &mut header[len..len + take], len).await?;
        len += take;
        if end.is_some() {
            break;
        }
    }
    let parsed = ppp::v1::Header::try_from(&header[..len])
        .map_err(|e| ProxyError::V1Invalid(format!("{e} in {}", escape(&header[..len]))))?;
    Ok(match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

/// The rest of a v2 header, whose first five bytes were read.
async fn read_v2(tcp: &mut TcpStream, start: [u8; 5]) -> Result<Option<SocketAddr>, ProxyError> {
    let mut fixed = [0u8; V2_FIXED];
    fixed[..start.len()].copy_from_slice(&start);
    read_exact(tcp, &mut fixed[start.len()..], start.len()).await?;
    if &fixed[..v2::PROTOCOL_PREFIX.len()] != v2::PROTOCOL_PREFIX {
        return Err(ProxyError::Missing(escape(
            &fixed[..v2::PROTOCOL_PREFIX.len()],
        )));
    }
    let total = V2_FIXED + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if total > MAX_V2_HEADER {
        return Err(ProxyError::V2TooLong(total));
    }
    let mut header = [0u8; MAX_V2_HEADER];
    header[..V2_FIXED].copy_from_slice(&fixed);
    read_exact(tcp, &mut header[V2_FIXED..total], V2_FIXED).await?;
    let parsed =
        v2::Header::try_from(&header[..total]).map_err(|e| ProxyError::V2Invalid(e.to_string()))?;
    if parsed.command == Command::Local {
        return Ok(None);
    }
    match (parsed.addresses, parsed.protocol) {
        // "The receiver must accept this connection as valid and must use the real
        // connection endpoints" (the specification, on AF_UNSPEC).
        (v2::Addresses::Unspecified, _) => Ok(None),
        (v2::Addresses::IPv4(a), Protocol::Stream) => {
            Ok(Some(SocketAddr::from((a.source_address, a.source_port))))
        }
        (v2::Addresses::IPv6(a), Protocol::Stream) => {
            Ok(Some(SocketAddr::from((a.source_address, a.source_port))))
        }
        (v2::Addresses::Unix(_), _) => Err(ProxyError::NotTcp("a unix socket")),
        (_, Protocol::Datagram) => Err(ProxyError::NotTcp("UDP")),
        (a, _) => Err(ProxyError::NotTcp(match a.address_family() {
            AddressFamily::IPv6 => "an unspecified protocol over IPv6",
            _ => "an unspecified protocol over IPv4",
        })),
    }
}

/// Fills `buf` from `tcp`; `before` bytes of the header were read already (for the
/// message when the connection ends).
async fn read_exact(tcp: &mut TcpStream, buf: &mut [u8], before: usize) -> Result<(), ProxyError> {
    let mut filled = 0;
    while filled < buf.len() {
        match tcp.read(&mut buf[filled..]).await? {
            0 => return Err(ProxyError::Truncated(before + filled)),
            n => filled += n,
        }
    }
    Ok(())
}

/// Bytes as a short printable string for the log (`\x00` for what is not ASCII text).
fn escape(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(32)];
    let mut s = format!("\"{}\"", shown.escape_ascii());
    if bytes.len() > shown.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Sends `chunks` (one write each) then `rest`, and returns what `read_header` said
    /// and the bytes left in the socket.
    async fn read(chunks: &[&[u8]]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            for chunk in chunks {
                c.write_all(&chunk).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            c.shutdown().await.unwrap();
            c
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let result = read_header(&mut tcp).await;
        let mut rest = Vec::new();
        if result.is_ok() {
            tcp.read_to_end(&mut rest).await.unwrap();
        }
        drop(client.await.unwrap());
        (result, rest)
    }

    fn v2(command: Command, addresses: v2::Addresses, protocol: Protocol) -> Vec<u8> {
        v2::Builder::with_addresses(v2::Version::Two | command, protocol, addresses)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn v1_tcp4_and_tcp6_give_the_source_and_leave_the_rest() {
        let (r, rest) = read(&[b"PROXY TCP4 10.0.0.1 10.0.0.9 4711 1883\r\n\x10\x0c"]).await;
        assert_eq!(r.unwrap(), Some("10.0.0.1:4711".parse().unwrap()));
        assert_eq!(rest, b"\x10\x0c");
        let (r, rest) = read(&[b"PROXY TCP6 2001:db8::1 2001:db8::2 5000 8883\r\n", b"x"]).await;
        assert_eq!(r.unwrap(), Some("[2001:db8::1]:5000".parse().unwrap()));
        assert_eq!(rest, b"x");
    }

    #[tokio::test]
    async fn v1_split_over_writes_and_unknown() {
        let (r, rest) = read(&[b"PRO", b"XY TCP4 10.0.0.2 10.0.", b"0.9 1 2\r", b"\nmqtt"]).await;
        assert_eq!(r.unwrap(), Some("10.0.0.2:1".parse().unwrap()));
        assert_eq!(rest, b"mqtt");
        let (r, rest) = read(&[b"PROXY UNKNOWN\r\n\x10"]).await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"\x10");
    }

    #[tokio::test]
    async fn v1_refusals() {
        let (r, _) = read(&[&[b'P'; 200]]).await;
        assert!(matches!(r, Err(ProxyError::Missing(_))), "{r:?}");
        let long = format!("PROXY TCP4 {}", "1".repeat(120));
        let (r, _) = read(&[long.as_bytes()]).await;
        assert!(matches!(r, Err(ProxyError::V1TooLong)), "{r:?}");
        let (r, _) = read(&[b"PROXY TCP4 10.0.0.1"]).await;
        assert!(matches!(r, Err(ProxyError::Truncated(19))), "{r:?}");
        let (r, _) = read(&[b"PROXY TCP4 banana 10.0.0.9 1 2\r\n"]).await;
        assert!(matches!(r, Err(ProxyError::V1Invalid(_))), "{r:?}");
    }

    #[tokio::test]
    async fn v2_addresses_local_and_split() {
        let src: SocketAddr = "10.0.0.1:4711".parse().unwrap();
        let dst: SocketAddr = "10.0.0.9:1883".parse().unwrap();
        let mut h = v2(Command::Proxy, (src, dst).into(), Protocol::Stream);
        h.extend_from_slice(b"\x10");
        let (r, rest) = read(&[&h[..3], &h[3..14], &h[14..20], &h[20..]]).await;
        assert_eq!(r.unwrap(), Some(src));
        assert_eq!(rest, b"\x10");

        let src6: SocketAddr = "[2001:db8::7]:9".parse().unwrap();
        let dst6: SocketAddr = "[2001:db8::8]:8883".parse().unwrap();
        let h = v2(Command::Proxy, (src6, dst6).into(), Protocol::Stream);
        assert_eq!(read(&[&h]).await.0.unwrap(), Some(src6));

        let h = v2(
            Command::Local,
            v2::Addresses::Unspecified,
            Protocol::Unspecified,
        );
        let (r, rest) = read(&[&h, b"after"]).await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn v2_with_tlvs_within_the_bound() {
        let src: SocketAddr = "10.0.0.3:1".parse().unwrap();
        let dst: SocketAddr = "10.0.0.9:1883".parse().unwrap();
        let h = v2::Builder::with_addresses(
            v2::Version::Two | Command::Proxy,
            Protocol::Stream,
            (src, dst),
        )
        .write_tlv(v2::Type::NoOp, &[0u8; 400][..])
        .unwrap()
        .build()
        .unwrap();
        assert!(h.len() <= MAX_V2_HEADER);
        assert_eq!(read(&[&h]).await.0.unwrap(), Some(src));
    }

    #[tokio::test]
    async fn v2_refusals() {
        let src: SocketAddr = "10.0.0.1:4711".parse().unwrap();
        let dst: SocketAddr = "10.0.0.9:1883".parse().unwrap();
        let h = v2::Builder::with_addresses(
            v2::Version::Two | Command::Proxy,
            Protocol::Stream,
            (src, dst),
        )
        .write_tlv(v2::Type::NoOp, &[0u8; 600][..])
        .unwrap()
        .build()
        .unwrap();
        let (r, _) = read(&[&h]).await;
        assert!(
            matches!(r, Err(ProxyError::V2TooLong(n)) if n == h.len()),
            "{r:?}"
        );

        let h = v2(Command::Proxy, (src, dst).into(), Protocol::Datagram);
        let (r, _) = read(&[&h]).await;
        assert!(matches!(r, Err(ProxyError::NotTcp("UDP"))), "{r:?}");

        let unix = v2::Addresses::Unix(v2::Unix {
            source: [0; 108],
            destination: [0; 108],
        });
        let h = v2(Command::Proxy, unix, Protocol::Stream);
        let (r, _) = read(&[&h]).await;
        assert!(matches!(r, Err(ProxyError::NotTcp(_))), "{r:?}");

        let h = v2(Command::Proxy, (src, dst).into(), Protocol::Stream);
        let (r, _) = read(&[&h[..20]]).await;
        assert!(matches!(r, Err(ProxyError::Truncated(20))), "{r:?}");

        let mut bad = h.clone();
        bad[12] = 0x31; // version 3
        let (r, _) = read(&[&bad]).await;
        assert!(matches!(r, Err(ProxyError::V2Invalid(_))), "{r:?}");

        let mut bad = h;
        bad[7] = b'X'; // signature
        let (r, _) = read(&[&bad]).await;
        assert!(matches!(r, Err(ProxyError::Missing(_))), "{r:?}");

        let (r, _) = read(&[b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c"]).await;
        assert!(matches!(r, Err(ProxyError::Missing(_))), "{r:?}");
    }
}
