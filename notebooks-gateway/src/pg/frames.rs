//! The Postgres listener's guard on what a client sends, below the protocol library: it follows the
//! message framing (the untyped startup message, then `type byte + length` messages) as bytes pass, and
//! cuts the connection when a message announces more than the size limit (before any of it is
//! buffered) or when a message that has started does not finish within the read timeout (a slow-loris
//! client). Between messages a connection may stay idle: a psql prompt waits for its user.
//!
//! It also hands on at most one message's bytes per read, so the protocol library only ever decodes a
//! buffer that ends where the message ends (its body decoders read from the whole buffer, so a crafted
//! body could otherwise reach into the next message), and until the connection is signed in it lets
//! through only the startup message, password messages and Terminate.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Where the reader is in the framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Reading a header: `have` of its bytes so far.
    Header { have: usize },
    /// Reading a body: `left` bytes to go.
    Body { left: usize },
}

/// A stream whose incoming messages are checked against a size and a time limit.
pub struct Framed<S> {
    io: S,
    /// The first message (the startup message or a cancel request) has no type byte.
    untyped: bool,
    header: [u8; 5],
    at: Position,
    max_message: usize,
    read_timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Set once the connection is signed in: every message type may pass.
    signed_in: Arc<AtomicBool>,
    scratch: Vec<u8>,
}

/// The message types a client may send before it is signed in (after its startup message): password
/// (and SASL) messages, and Terminate.
const BEFORE_SIGN_IN: [u8; 2] = [b'p', b'X'];

impl<S> Framed<S> {
    /// Guards `io`, whose next byte starts the startup message. A message longer than `max_message`
    /// bytes, one that takes longer than `read_timeout` to arrive once started, or (until `signed_in`
    /// is set) one other than a password or Terminate ends the stream with an error.
    pub fn new(
        io: S,
        max_message: usize,
        read_timeout: Duration,
        signed_in: Arc<AtomicBool>,
    ) -> Framed<S> {
        Framed {
            io,
            untyped: true,
            header: [0; 5],
            at: Position::Header { have: 0 },
            max_message,
            read_timeout,
            deadline: None,
            signed_in,
            scratch: vec![0; 16 * 1024],
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    fn header_len(&self) -> usize {
        if self.untyped { 4 } else { 5 }
    }

    /// Follows `bytes` through the framing: whether a message finished among them, or an error when a
    /// message announces an impossible or oversized length.
    fn follow(&mut self, mut bytes: &[u8]) -> io::Result<bool> {
        let mut finished = false;
        while !bytes.is_empty() {
            match self.at {
                Position::Header { have } => {
                    let need = self.header_len();
                    let take = (need - have).min(bytes.len());
                    self.header[have..have + take].copy_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    let have = have + take;
                    if have < need {
                        self.at = Position::Header { have };
                        continue;
                    }
                    if !self.untyped
                        && !self.signed_in.load(Ordering::Acquire)
                        && !BEFORE_SIGN_IN.contains(&self.header[0])
                    {
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            "only a password may be sent before signing in",
                        ));
                    }
                    let len_at = need - 4;
                    let len = u32::from_be_bytes([
                        self.header[len_at],
                        self.header[len_at + 1],
                        self.header[len_at + 2],
                        self.header[len_at + 3],
                    ]) as usize;
                    if len < 4 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a message with an impossible length",
                        ));
                    }
                    if len > self.max_message {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "a message of {len} bytes, more than the {} allowed",
                                self.max_message
                            ),
                        ));
                    }
                    self.untyped = false;
                    self.at = Position::Body { left: len - 4 };
                }
                Position::Body { left } => {
                    let take = left.min(bytes.len());
                    bytes = &bytes[take..];
                    self.at = Position::Body { left: left - take };
                }
            }
            if self.at == (Position::Body { left: 0 }) {
                self.at = Position::Header { have: 0 };
                finished = true;
            }
        }
        Ok(finished)
    }

    /// Whether a message has started and not finished.
    fn mid_message(&self) -> bool {
        self.at != Position::Header { have: 0 }
    }

    /// How many bytes are left of the header or body being read (at least one).
    fn until_boundary(&self) -> usize {
        match self.at {
            Position::Header { have } => self.header_len() - have,
            Position::Body { left } => left,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Framed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Never past the end of the current header or body.
        let want = this
            .until_boundary()
            .min(buf.remaining())
            .min(this.scratch.len());
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        let was_mid = this.mid_message();
        // The scratch buffer is taken out while read into, so following its bytes needs no copy.
        let mut scratch = std::mem::take(&mut this.scratch);
        let mut part = ReadBuf::new(&mut scratch[..want]);
        let polled = Pin::new(&mut this.io).poll_read(cx, &mut part);
        let got = part.filled().len();
        let followed = match &polled {
            Poll::Ready(Ok(())) => Some(this.follow(&scratch[..got]).inspect(|_| {
                buf.put_slice(&scratch[..got]);
            })),
            _ => None,
        };
        this.scratch = scratch;
        match polled {
            Poll::Ready(Ok(())) => {
                let finished = followed.unwrap_or(Ok(false))?;
                // Each message gets the read timeout from its first byte.
                if !this.mid_message() {
                    this.deadline = None;
                } else if finished || !was_mid {
                    this.deadline = Some(Box::pin(tokio::time::sleep(this.read_timeout)));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.mid_message() {
                    let deadline = this
                        .deadline
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.read_timeout)));
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "a message took longer than the read timeout to arrive",
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Framed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn signed() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(true))
    }

    fn startup() -> Vec<u8> {
        let body = b"\0\x03\0\0user\0ada\0\0";
        let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    fn typed(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[tokio::test]
    async fn whole_messages_in_any_split_pass_through() {
        let mut all = startup();
        all.extend(typed(b'Q', b"SELECT 1\0"));
        all.extend(typed(b'X', b""));
        for split in [1, 2, 3, 5, 7, all.len()] {
            let (mut client, server) = tokio::io::duplex(4096);
            let mut framed = Framed::new(server, 1024, Duration::from_secs(5), signed());
            for chunk in all.chunks(split) {
                client.write_all(chunk).await.expect("write");
            }
            drop(client);
            let mut got = Vec::new();
            framed.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, all, "split {split}");
        }
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_from_its_header() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut framed = Framed::new(server, 1024, Duration::from_secs(5), signed());
        client.write_all(&startup()).await.expect("write");
        // Announces 1 GiB; only the header is sent.
        client.write_all(b"Q\x40\0\0\0").await.expect("write");
        let mut got = Vec::new();
        let e = framed.read_to_end(&mut got).await.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("more than the 1024"), "{e}");
    }

    #[tokio::test]
    async fn reads_stop_at_each_message_boundary() {
        let mut all = startup();
        all.extend(typed(b'Q', b"SELECT 1\0"));
        all.extend(typed(b'Q', b"SELECT 2\0"));
        let (mut client, server) = tokio::io::duplex(4096);
        let mut framed = Framed::new(server, 1024, Duration::from_secs(5), signed());
        client.write_all(&all).await.expect("write");
        let mut chunk = [0u8; 4096];
        let mut ends = Vec::new();
        let mut total = 0;
        while total < all.len() {
            let n = framed.read(&mut chunk).await.expect("read");
            total += n;
            ends.push(total);
        }
        // Each message's end is the end of some read.
        let first = startup().len();
        let second = first + typed(b'Q', b"SELECT 1\0").len();
        assert!(
            ends.contains(&first) && ends.contains(&second) && ends.contains(&all.len()),
            "{ends:?}"
        );
    }

    #[tokio::test]
    async fn before_sign_in_only_a_password_passes() {
        let (mut client, server) = tokio::io::duplex(4096);
        let flag = Arc::new(AtomicBool::new(false));
        let mut framed = Framed::new(server, 1024, Duration::from_secs(5), flag.clone());
        let mut all = startup();
        all.extend(typed(b'p', b"secret\0"));
        client.write_all(&all).await.expect("write");
        let mut got = vec![0u8; all.len()];
        framed
            .read_exact(&mut got)
            .await
            .expect("startup and password pass");
        client
            .write_all(&typed(b'Q', b"SELECT 1\0"))
            .await
            .expect("write");
        let e = framed
            .read(&mut got)
            .await
            .expect_err("a query before sign-in");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        // Once signed in, a query passes.
        let (mut client, server) = tokio::io::duplex(4096);
        let mut framed = Framed::new(server, 1024, Duration::from_secs(5), flag.clone());
        client.write_all(&startup()).await.expect("write");
        let mut got = vec![0u8; startup().len()];
        framed.read_exact(&mut got).await.expect("startup");
        flag.store(true, Ordering::Release);
        let q = typed(b'Q', b"SELECT 1\0");
        client.write_all(&q).await.expect("write");
        let mut got = vec![0u8; q.len()];
        framed.read_exact(&mut got).await.expect("query");
    }

    #[tokio::test]
    async fn an_impossible_length_is_refused() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut framed = Framed::new(server, 1024, Duration::from_secs(5), signed());
        client.write_all(&[0, 0, 0, 2]).await.expect("write");
        let mut got = [0u8; 16];
        let e = framed.read(&mut got).await.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_message_that_stalls_midway_is_cut_but_an_idle_connection_is_not() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut framed = Framed::new(server, 1024, Duration::from_millis(200), signed());
        client.write_all(&startup()).await.expect("write");
        let mut got = vec![0u8; startup().len()];
        framed.read_exact(&mut got).await.expect("startup");
        // Idle between messages for far longer than the timeout: still open.
        let mut one = [0u8; 1];
        let idle = tokio::time::timeout(Duration::from_millis(800), framed.read(&mut one)).await;
        assert!(idle.is_err(), "an idle connection is kept");
        // Half a message, then nothing.
        client.write_all(b"Q\0\0\0\x20SEL").await.expect("write");
        let mut part = [0u8; 8];
        framed.read_exact(&mut part).await.expect("part");
        let e = framed.read(&mut one).await.expect_err("cut");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
