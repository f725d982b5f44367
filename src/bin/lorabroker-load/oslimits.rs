//! The operating-system limits that decide how many connections one load generator holds,
//! and how to live with them:
//!
//! - **descriptors**: every connection is a file descriptor. [`prepare_descriptors`] raises
//!   the soft RLIMIT_NOFILE to the hard limit at start and refuses up front, naming the
//!   numbers, a run whose connections cannot fit under the hard limit;
//! - **local ports**: towards one listener, one source address has only the ephemeral port
//!   range (`net.ipv4.ip_local_port_range`, about 28k ports). `--source-addrs` binds the
//!   outgoing sockets round-robin to several source addresses (loopback has all of
//!   127.0.0.0/8) with `IP_BIND_ADDRESS_NO_PORT`, so that the kernel picks the port at
//!   connect time per (source, destination) and every source address has its own range;
//!   `auto` does so past one range's worth of connections to a loopback listener.
//!
//! The connect errors these limits cause (EMFILE, ENFILE, EADDRNOTAVAIL) become
//! [`DialError`]s that say which limit was hit and what raises it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// Descriptors a load generator needs besides its connections: stdio, the runtime's epoll
/// and wake-up descriptors, NATS, Redis, an MQTT upstream, and some room.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// Of the ephemeral port range, the share `auto` plans to use per source address (the rest
/// stays for other sockets and for ports still in TIME_WAIT from an earlier run).
const PORT_SHARE: f64 = 0.9;

/// Where source addresses start when they are given by count, and for `auto`: 127.0.0.1
/// stays for unbound sockets.
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// At most this many source addresses (a range or count beyond it is a typo).
const MAX_SOURCES: u32 = 65_536;

/// What limits refuse before a run starts.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The hard descriptor limit is below what the connections need.
    #[error(
        "{connections} connections need {needed} file descriptors, but the hard limit \
         (RLIMIT_NOFILE) is {hard}: raise it with `ulimit -Hn` (as root) or LimitNOFILE= in \
         the service unit, or ask for fewer connections"
    )]
    TooFewDescriptors {
        /// Connections asked for.
        connections: usize,
        /// Descriptors they need, [`RESERVED_DESCRIPTORS`] included.
        needed: u64,
        /// The hard limit.
        hard: u64,
    },
    /// getrlimit or setrlimit failed.
    #[error("RLIMIT_NOFILE: {0}")]
    Rlimit(#[source] io::Error),
}

/// A connect that failed, with the limit behind it when there is one.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// This process has no descriptor left (EMFILE).
    #[error(
        "TCP connect to {addr}: out of file descriptors (EMFILE, this process's limit is \
         {limit}): raise it with `ulimit -n` / `ulimit -Hn` or LimitNOFILE="
    )]
    OutOfDescriptors {
        /// The listener.
        addr: SocketAddr,
        /// The soft RLIMIT_NOFILE at the time.
        limit: String,
    },
    /// The system-wide file table is full (ENFILE).
    #[error("TCP connect to {addr}: the system's file table is full (ENFILE): raise fs.file-max")]
    SystemOutOfFiles {
        /// The listener.
        addr: SocketAddr,
    },
    /// No local port is free for this source address towards this listener (EADDRNOTAVAIL).
    #[error(
        "TCP connect to {addr} from {source_addr}: no free local port (EADDRNOTAVAIL): the \
         ephemeral port range (net.ipv4.ip_local_port_range) towards this listener is used up; \
         spread the connections over more source addresses with --source-addrs (e.g. \
         127.0.0.2-127.0.0.9) or over more listeners"
    )]
    NoLocalPort {
        /// The listener.
        addr: SocketAddr,
        /// The source address (`any` when not bound).
        source_addr: String,
    },
    /// Any other failure.
    #[error("TCP connect to {addr}{from}: {error}")]
    Other {
        /// The listener.
        addr: SocketAddr,
        /// ` from {source address}` when bound, else empty.
        from: String,
        /// The error (shown in the message, hence not a `#[source]`: once is enough).
        error: io::Error,
    },
}

impl DialError {
    /// Names the limit behind `err`, a failed connect to `addr` from `source`.
    pub fn new(err: io::Error, addr: SocketAddr, source: Option<IpAddr>) -> Self {
        match err.raw_os_error() {
            Some(libc::EMFILE) => DialError::OutOfDescriptors {
                addr,
                limit: nofile()
                    .map(|(soft, _)| show_limit(soft))
                    .unwrap_or_else(|_| "unknown".into()),
            },
            Some(libc::ENFILE) => DialError::SystemOutOfFiles { addr },
            Some(libc::EADDRNOTAVAIL) => DialError::NoLocalPort {
                addr,
                source_addr: source.map_or_else(|| "any".into(), |s| s.to_string()),
            },
            _ => DialError::Other {
                addr,
                from: source.map_or_else(String::new, |s| format!(" from {s}")),
                error: err,
            },
        }
    }
}

/// The soft and hard RLIMIT_NOFILE.
fn nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// A limit as shown: `unlimited` for RLIM_INFINITY.
fn show_limit(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// Descriptors `connections` connections need, [`RESERVED_DESCRIPTORS`] included.
pub fn descriptors_needed(connections: usize) -> u64 {
    connections as u64 + RESERVED_DESCRIPTORS
}

/// Whether `connections` fit under the hard descriptor limit `hard`.
pub fn check_fits(connections: usize, hard: u64) -> Result<(), LimitError> {
    let needed = descriptors_needed(connections);
    if needed > hard {
        return Err(LimitError::TooFewDescriptors {
            connections,
            needed,
            hard,
        });
    }
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (or to `fs.nr_open` when the hard limit
/// is unlimited) and checks that `connections` fit; returns the new soft limit.
pub fn prepare_descriptors(connections: usize) -> Result<u64, LimitError> {
    let (soft, hard) = nofile().map_err(LimitError::Rlimit)?;
    let mut target = hard;
    if hard == libc::RLIM_INFINITY {
        // The kernel refuses a soft limit above fs.nr_open.
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    let soft = if soft < target {
        let lim = libc::rlimit {
            rlim_cur: target,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(LimitError::Rlimit(io::Error::last_os_error()));
        }
        target
    } else {
        soft
    };
    check_fits(connections, soft)?;
    Ok(soft)
}

/// `--source-addrs`: how outgoing sockets choose their source address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceAddrs {
    /// The kernel chooses (one source address per route).
    Unbound,
    /// Bound round-robin to enough loopback addresses from 127.0.0.2 on when the
    /// connections exceed one port range towards a loopback listener; unbound otherwise.
    Auto,
    /// Bound round-robin to these.
    List(Vec<IpAddr>),
}

impl std::str::FromStr for SourceAddrs {
    type Err = String;

    /// `auto`, `none`, a list `127.0.0.2,127.0.0.3`, a range `127.0.0.2-127.0.0.9` (IPv4)
    /// or a count `4` (127.0.0.2 to 127.0.0.5).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "auto" => return Ok(SourceAddrs::Auto),
            "none" | "" => return Ok(SourceAddrs::Unbound),
            _ => {}
        }
        if let Ok(count) = s.parse::<u32>() {
            if count == 0 || count > MAX_SOURCES {
                return Err(format!("{s}: a count from 1 to {MAX_SOURCES}"));
            }
            return Ok(SourceAddrs::List(ipv4_run(FIRST_SOURCE, count)));
        }
        if let Some((a, b)) = s.split_once('-') {
            let parse = |v: &str| {
                v.trim()
                    .parse::<Ipv4Addr>()
                    .map_err(|_| format!("{v:?}: not an IPv4 address (ranges are IPv4)"))
            };
            let (a, b) = (parse(a)?, parse(b)?);
            let (lo, hi) = (u32::from(a), u32::from(b));
            if hi < lo || hi - lo >= MAX_SOURCES {
                return Err(format!(
                    "{s}: a range from low to high of at most {MAX_SOURCES} addresses"
                ));
            }
            return Ok(SourceAddrs::List(ipv4_run(a, hi - lo + 1)));
        }
        let list = s
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<IpAddr>()
                    .map_err(|_| format!("{v:?}: not an IP address"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SourceAddrs::List(list))
    }
}

/// `count` consecutive IPv4 addresses from `first`.
fn ipv4_run(first: Ipv4Addr, count: u32) -> Vec<IpAddr> {
    let first = u32::from(first);
    (0..count)
        .map(|i| IpAddr::V4(Ipv4Addr::from(first.wrapping_add(i))))
        .collect()
}

/// The ports of `net.ipv4.ip_local_port_range` (`"32768\t60999"`), or `None` if unreadable.
pub fn parse_port_range(text: &str) -> Option<u32> {
    let mut it = text.split_whitespace().map(|v| v.parse::<u32>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    (hi >= lo).then(|| hi - lo + 1)
}

/// The ephemeral ports of this machine (Linux's default range when unreadable).
pub fn ephemeral_ports() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| parse_port_range(&t))
        .unwrap_or(60999 - 32768 + 1)
}

/// The source addresses for `connections` connections to `targets`, with `ports` ephemeral
/// ports per source address: `auto` binds (to ⌈connections ÷ 90 % of ports⌉ addresses
/// from 127.0.0.2) only when the connections exceed one address's share of ports and
/// every target is an IPv4 loopback listener. A list must match the targets' family.
pub fn resolve(
    spec: &SourceAddrs,
    connections: usize,
    targets: &[SocketAddr],
    ports: u32,
) -> Result<Vec<IpAddr>, String> {
    match spec {
        SourceAddrs::Unbound => Ok(Vec::new()),
        SourceAddrs::Auto => {
            let per_source = ((f64::from(ports) * PORT_SHARE) as usize).max(1);
            let loopback = targets
                .iter()
                .all(|t| matches!(t.ip(), IpAddr::V4(v4) if v4.is_loopback()));
            if connections <= per_source || !loopback {
                return Ok(Vec::new());
            }
            let count = connections.div_ceil(per_source).min(MAX_SOURCES as usize);
            Ok(ipv4_run(FIRST_SOURCE, count as u32))
        }
        SourceAddrs::List(list) => {
            if let Some(t) = targets
                .iter()
                .find(|t| list.iter().any(|s| s.is_ipv4() != t.is_ipv4()))
            {
                return Err(format!(
                    "--source-addrs: the listener {t} and the source addresses {list:?} are not all of one IP family"
                ));
            }
            Ok(list.clone())
        }
    }
}

/// Connects to `dst` from `source` (port chosen by the kernel at connect time, with
/// `IP_BIND_ADDRESS_NO_PORT`, so that ports are per source and destination).
pub async fn connect_from(source: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    bind_address_no_port(&socket)?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(dst).await
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux 4.2+): a bind to port 0 picks no port yet.
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the descriptor is the socket's own and open; the option value is a c_int
    // on this stack, its size passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Elsewhere a bind picks its port at once (one port range for all sources together).
#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_socket: &TcpSocket) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn source_addresses_parse_as_lists_ranges_and_counts() {
        assert_eq!("auto".parse(), Ok(SourceAddrs::Auto));
        assert_eq!("none".parse(), Ok(SourceAddrs::Unbound));
        assert_eq!(
            "127.0.0.2, 127.0.0.3".parse(),
            Ok(SourceAddrs::List(vec![v4("127.0.0.2"), v4("127.0.0.3")]))
        );
        assert_eq!(
            "127.0.0.254-127.0.1.1".parse(),
            Ok(SourceAddrs::List(
                ["127.0.0.254", "127.0.0.255", "127.0.1.0", "127.0.1.1"]
                    .map(v4)
                    .to_vec()
            ))
        );
        assert_eq!(
            "3".parse(),
            Ok(SourceAddrs::List(
                ["127.0.0.2", "127.0.0.3", "127.0.0.4"].map(v4).to_vec()
            ))
        );
        assert_eq!(
            "::1".parse(),
            Ok(SourceAddrs::List(vec!["::1".parse().unwrap()]))
        );
        for bad in [
            "0",
            "127.0.0.9-127.0.0.2",
            "127.0.0.1-::1",
            "10.0.0.1,x",
            "1.0.0.0-2.0.0.0",
        ] {
            assert!(bad.parse::<SourceAddrs>().is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_binds_only_past_one_port_range_to_loopback() {
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:1883".parse().unwrap();
        let ports = 28_232; // Linux's default range: 25,408 per source address
        assert!(resolve(&SourceAddrs::Auto, 25_000, &[lo], ports)
            .unwrap()
            .is_empty());
        let got = resolve(&SourceAddrs::Auto, 100_000, &[lo], ports).unwrap();
        assert_eq!(
            got,
            ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
                .map(v4)
                .to_vec()
        );
        // Source addresses on another host's route are not this tool's to invent.
        assert!(resolve(&SourceAddrs::Auto, 100_000, &[lo, remote], ports)
            .unwrap()
            .is_empty());
        let list = SourceAddrs::List(vec![v4("127.0.0.2")]);
        assert_eq!(resolve(&list, 10, &[lo], ports).unwrap().len(), 1);
        let v6: SocketAddr = "[::1]:1883".parse().unwrap();
        assert!(resolve(&list, 10, &[v6], ports).is_err());
        assert!(resolve(&SourceAddrs::Unbound, 1_000_000, &[lo], ports)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28_232));
        assert_eq!(parse_port_range("1024 1024"), Some(1));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x"), None);
        assert!(ephemeral_ports() > 0);
    }

    #[test]
    fn descriptor_limits_name_the_numbers_and_the_fix() {
        assert!(check_fits(19_000, 20_000).is_ok());
        let e = check_fits(100_000, 20_000).unwrap_err().to_string();
        assert!(e.contains("100000 connections need 100128"), "{e}");
        assert!(e.contains("hard limit (RLIMIT_NOFILE) is 20000"), "{e}");
        assert!(e.contains("ulimit -Hn") && e.contains("LimitNOFILE"), "{e}");
        // This process can hold a few connections, and the soft limit is the hard one after.
        let soft = prepare_descriptors(10).unwrap();
        assert_eq!(nofile().unwrap().0, soft);
    }

    #[test]
    fn connect_errors_say_which_limit_was_hit() {
        let addr: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let src = Some(v4("127.0.0.3"));
        let e = DialError::new(io::Error::from_raw_os_error(libc::EMFILE), addr, None);
        assert!(matches!(e, DialError::OutOfDescriptors { .. }), "{e}");
        assert!(e.to_string().contains("ulimit -n"), "{e}");
        let e = DialError::new(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL), addr, src);
        let text = e.to_string();
        assert!(
            text.contains("from 127.0.0.3") && text.contains("--source-addrs"),
            "{text}"
        );
        let e = DialError::new(io::Error::from_raw_os_error(libc::ENFILE), addr, None);
        assert!(e.to_string().contains("fs.file-max"), "{e}");
        let e = DialError::new(io::Error::from_raw_os_error(libc::ECONNREFUSED), addr, src);
        assert!(matches!(e, DialError::Other { .. }));
        assert!(
            e.to_string()
                .starts_with("TCP connect to 127.0.0.1:1883 from 127.0.0.3: "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn connections_come_from_the_bound_source_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        for src in ["127.0.0.2", "127.0.0.3"] {
            let conn = connect_from(v4(src), dst).await.unwrap();
            assert_eq!(conn.local_addr().unwrap().ip(), v4(src));
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(peer.ip(), v4(src));
        }
    }
}
