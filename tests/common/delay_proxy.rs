//! A TCP proxy that delays the bytes it forwards, for tests of what happens while a backend
//! is slow but healthy (issue 8 point 10: a revocation that races a key read).
//!
//! Each direction of each connection has its own delay, changeable while connections are
//! open: every chunk read is written out `delay` after it was read, in order, so replies
//! are late but pipelining is kept (two requests sent 1 ms apart get their replies 1 ms
//! apart, each `delay` late). Delaying only the replies makes a command execute at once
//! on the server and its answer arrive late, which is how a GET can return a record that a
//! DEL from another connection already removed.
//!
//! Everything the proxy started (the listener and every connection's tasks) stops when it
//! is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The delays of one proxy, in microseconds.
#[derive(Default)]
struct Delays {
    to_server: AtomicU64,
    to_client: AtomicU64,
}

/// A delaying proxy in front of one TCP server.
pub struct DelayProxy {
    /// Where clients connect instead of the server.
    pub addr: SocketAddr,
    delays: Arc<Delays>,
    stop: CancellationToken,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards every connection to `target`, with no
    /// delay until [`DelayProxy::set_delays`] says otherwise.
    pub async fn start(target: SocketAddr) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let delays = Arc::new(Delays::default());
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, target, delays.clone(), stop.clone()));
        DelayProxy { addr, delays, stop }
    }

    /// The same proxy for a `redis://host:port` URL, and its URL.
    pub async fn for_redis(redis_url: &str) -> (DelayProxy, String) {
        let target: SocketAddr = redis_url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .parse()
            .unwrap_or_else(|e| panic!("{redis_url} is not redis://<ip>:<port>: {e}"));
        let proxy = DelayProxy::start(target).await;
        let url = format!("redis://{}", proxy.addr);
        (proxy, url)
    }

    /// Delays what clients send by `to_server` and what the server answers by
    /// `to_client`, from the next chunk read on (open connections included).
    pub fn set_delays(&self, to_server: Duration, to_client: Duration) {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.delays
            .to_server
            .store(micros(to_server), Ordering::Relaxed);
        self.delays
            .to_client
            .store(micros(to_client), Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    delays: Arc<Delays>,
    stop: CancellationToken,
) {
    loop {
        let client = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        let Ok(server) = TcpStream::connect(target).await else {
            continue;
        };
        let _ = (client.set_nodelay(true), server.set_nodelay(true));
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let up = delays.clone();
        tokio::spawn(forward(
            client_read,
            server_write,
            move || up.to_server.load(Ordering::Relaxed),
            stop.clone(),
        ));
        let down = delays.clone();
        tokio::spawn(forward(
            server_read,
            client_write,
            move || down.to_client.load(Ordering::Relaxed),
            stop.clone(),
        ));
    }
}

/// Copies `from` to `to`, each chunk `delay()` microseconds after it was read. A reader
/// stamps chunks and a writer waits for each stamp, so one slow chunk does not add its
/// delay to the next.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: impl Fn() -> u64 + Send + 'static,
    stop: CancellationToken,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let at = Instant::now() + Duration::from_micros(delay());
                    if tx.send((at, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    // The writer finishes what the reader stamped before the reader ended (a close is
    // delayed like the bytes before it); cancelling drops both at once.
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = async { tokio::join!(reader, writer) } => {}
    }
}
