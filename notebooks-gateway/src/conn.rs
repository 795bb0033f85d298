//! Accepting connections: [`next_connection`] (a slot, then the next connection, or shutdown) for the
//! HTTP and Postgres listeners' accept loops; and the connections the gRPC listener accepts, guarded: at most [`MAX_CONNECTIONS`] at once (more wait in the
//! kernel's backlog), and a client that has not sent the HTTP/2 preface (or, with TLS, finished its
//! handshake) within the first-bytes timeout is cut before the server sees it (a silent or trickling
//! client cannot hold a connection). Once a connection is up, HTTP/2 keep-alive pings close it when the
//! client stops answering.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Connections held at once per listener.
pub const MAX_CONNECTIONS: usize = 1024;

/// A client's stream, plain or TLS (with the HTTP/2 preface read through it, handed on first).
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Vec<u8>),
}

/// An accepted TCP stream that sent its first bytes in time, holding its connection slot.
pub struct Guarded {
    io: Io,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(_, preface) if !preface.is_empty() => {
                let n = preface.len().min(buf.remaining());
                buf.put_slice(&preface[..n]);
                preface.drain(..n);
                Poll::Ready(Ok(()))
            }
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match &self.io {
            Io::Plain(s) => s.connect_info(),
            Io::Tls(s, _) => s.get_ref().0.connect_info(),
        }
    }
}

/// Waits until the client has sent at least the 24 bytes of the HTTP/2 connection preface (every gRPC
/// client sends it at once); false if it closes first.
async fn preface(io: &TcpStream) -> bool {
    let mut buf = [0u8; 24];
    loop {
        match io.peek(&mut buf).await {
            Ok(n) if n >= buf.len() => return true,
            Ok(0) | Err(_) => return false,
            // Part of it: wait for more (peek does not consume, so wait a moment before looking again).
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The guarded connections of `listener`: each is handed on only once it has sent the HTTP/2 preface
/// (with `tls`: finished the TLS handshake), within `first_bytes` of being accepted; the accept loop
/// runs as its own task and never waits on a client.
pub fn incoming(
    listener: TcpListener,
    first_bytes: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> impl futures::Stream<Item = io::Result<Guarded>> + Send {
    let (tx, rx) = mpsc::channel::<Guarded>(64);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let io = match listener.accept().await {
                Ok((io, _)) => io,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _ = io.set_nodelay(true);
                let ready = match tls {
                    // The handshake and then the preface, read through it, within the deadline.
                    Some(tls) => tokio::time::timeout(first_bytes, async {
                        let mut s = tls.accept(io).await.ok()?;
                        let mut preface = vec![0u8; 24];
                        tokio::io::AsyncReadExt::read_exact(&mut s, &mut preface)
                            .await
                            .ok()?;
                        Some(Io::Tls(Box::new(s), preface))
                    })
                    .await
                    .ok()
                    .flatten(),
                    None => tokio::time::timeout(first_bytes, preface(&io))
                        .await
                        .is_ok_and(|ok| ok)
                        .then_some(Io::Plain(io)),
                };
                if let Some(io) = ready {
                    let _ = tx.send(Guarded { io, _slot: slot }).await;
                }
                // Otherwise silent, slow, closed or failed: dropped, and the slot freed with it.
            });
        }
    });
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|g| (Ok(g), rx)) },
    )
}

/// Waits for a free connection slot, then for the next connection on `listener`; `None` once `shutdown`
/// resolves. An accept error (out of descriptors and the like) waits a little rather than spin.
pub async fn next_connection<F: std::future::Future<Output = ()>>(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    mut shutdown: Pin<&mut F>,
) -> Option<(TcpStream, std::net::SocketAddr, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        () = shutdown.as_mut() => return None,
        p = Arc::clone(slots).acquire_owned() => p.ok()?,
    };
    loop {
        tokio::select! {
            () = shutdown.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok((io, addr)) => return Some((io, addr, permit)),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
