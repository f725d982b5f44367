//! A raw Server-Sent Events client for `GET /api/v1/applications/{app}/events`: one
//! HTTP/1.1 request on its own TCP connection, the chunked body decoded by hand, events
//! parsed as `event:`/`data:` lines, so tests see exactly what the node sends.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a test waits for an event.
pub const EVENT_WAIT: Duration = Duration::from_secs(10);

/// An open event stream (or a refused one: see [`Sse::status`]).
pub struct Sse {
    reader: BufReader<TcpStream>,
    /// The response status.
    pub status: u16,
    /// Decoded body bytes not parsed yet.
    pending: String,
    /// The body of a refused request (not chunked-decoded when not a stream).
    pub head: String,
}

impl Sse {
    /// Opens `path` with the bearer `token`; for a 200, waits for the `: connected` comment
    /// (from then on every event of the application reaches the stream).
    pub async fn open(addr: SocketAddr, path: &str, token: &str) -> Sse {
        let stream = TcpStream::connect(addr).await.expect("HTTP port accepts");
        let mut reader = BufReader::new(stream);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
        );
        reader
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(EVENT_WAIT, reader.read_line(&mut line))
                .await
                .expect("response head in time")
                .unwrap();
            if n == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut sse = Sse {
            reader,
            status,
            pending: String::new(),
            head,
        };
        if status == 200 {
            assert!(
                sse.head
                    .to_ascii_lowercase()
                    .contains("content-type: text/event-stream"),
                "{}",
                sse.head
            );
            let first = sse.next_block().await;
            assert_eq!(first, ": connected", "the stream starts with a comment");
        }
        sse
    }

    /// The body of a refused request, read to its end (a JSON error).
    pub async fn error_body(mut self) -> Value {
        let len: usize = self
            .head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("a refusal has a length");
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).await.unwrap();
        serde_json::from_slice(&body).expect("a JSON error")
    }

    /// Reads one chunk of the chunked body into `pending`.
    async fn read_chunk(&mut self) {
        let mut size = String::new();
        self.reader.read_line(&mut size).await.unwrap();
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        assert!(size > 0, "the stream ended");
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).await.unwrap();
        chunk.truncate(size);
        self.pending
            .push_str(std::str::from_utf8(&chunk).expect("UTF-8 events"));
    }

    /// Waits until the server ends the stream (its last, empty chunk, or the socket's
    /// end), skipping what comes before.
    pub async fn expect_end(&mut self) {
        tokio::time::timeout(EVENT_WAIT, async {
            loop {
                let mut size = String::new();
                if self.reader.read_line(&mut size).await.unwrap_or(0) == 0 {
                    return;
                }
                let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
                if size == 0 {
                    return;
                }
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).await.unwrap();
            }
        })
        .await
        .expect("the stream ends in time")
    }

    /// The next SSE block (the text up to a blank line), within [`EVENT_WAIT`].
    async fn next_block(&mut self) -> String {
        tokio::time::timeout(EVENT_WAIT, async {
            loop {
                if let Some(at) = self.pending.find("\n\n") {
                    let block = self.pending[..at].to_owned();
                    self.pending.drain(..at + 2);
                    return block;
                }
                self.read_chunk().await;
            }
        })
        .await
        .expect("an SSE block in time")
    }

    /// The next event (comments skipped): its name and its JSON.
    pub async fn next_event(&mut self) -> (String, Value) {
        loop {
            let block = self.next_block().await;
            if block.starts_with(':') {
                continue;
            }
            let mut lines = block.lines();
            let name = lines
                .next()
                .and_then(|l| l.strip_prefix("event: "))
                .expect("event line");
            let data = lines
                .next()
                .and_then(|l| l.strip_prefix("data: "))
                .expect("data line");
            assert!(lines.next().is_none(), "one data line: {block}");
            let json: Value = serde_json::from_str(data).expect("JSON data");
            assert_eq!(json["name"], name, "{block}");
            return (name.to_owned(), json);
        }
    }

    /// The next event named `name` for which `matches` holds (others skipped).
    pub async fn event(&mut self, name: &str, matches: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(EVENT_WAIT, async {
            loop {
                let (n, json) = self.next_event().await;
                if n == name && matches(&json) {
                    return json;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {name} event in time"))
    }
}
