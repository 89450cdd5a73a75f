//! Connection hygiene on both ports: a bound on open connections, a deadline for a new
//! connection to say something, and file descriptors kept for storage.
//!
//! Idle or half-open TCP connections hold a file descriptor each. Unbounded, 300 of them
//! under an open-files limit of 256 made a table flush fail with `EMFILE` and the broker
//! exit. So:
//!
//! - at start-up the soft open-files limit is raised to the hard one
//!   ([`raise_open_files_limit`]) and shared out: a quarter for the storage engine's file
//!   cache, half for gRPC connections, a small part for HTTP ([`FdBudget`]);
//! - each port accepts at most its share of connections; one past it is closed at once (the
//!   client sees a reset and retries) and counted;
//! - a connection that sends nothing within [`HANDSHAKE_TIMEOUT`] is closed, so silent
//!   connections cannot hold the slots; HTTP/2 keepalive pings (set on the gRPC server)
//!   close connections whose peer vanished.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};

/// How long a new connection may stay silent before it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// File descriptors shared out from the open-files limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft open-files limit after raising it.
    pub open_files: u64,
    /// Files the storage engine may keep open (fjall's descriptor cache, at least 10).
    pub storage_files: usize,
    /// Connections the gRPC port accepts at once.
    pub grpc_connections: usize,
    /// Connections the HTTP port (metrics, health) accepts at once.
    pub http_connections: usize,
}

impl FdBudget {
    /// Shares out `open_files`: a quarter for storage (at most 900, fjall's default), half
    /// for gRPC connections (at most `max_grpc`), a sixteenth for HTTP (4 to 64).
    pub fn new(open_files: u64, max_grpc: usize) -> Self {
        let share = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            open_files,
            storage_files: share(open_files / 4).clamp(10, 900),
            grpc_connections: share(open_files / 2).clamp(1, max_grpc.max(1)),
            http_connections: share(open_files / 16).clamp(4, 64),
        }
    }
}

/// Raises the soft open-files limit to the hard one where allowed; returns the soft limit
/// now in force (1024 when it cannot be read).
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(1024);
    match limit.maximum {
        Some(hard) if hard > soft => {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(soft, hard, error = %e, "raising the open-files limit failed");
                    soft
                }
            }
        }
        None => u64::MAX,
        _ => soft,
    }
}

/// Connections refused because a port was at its bound, or closed for saying nothing.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Closed at once: the port had its most connections open.
    pub refused: AtomicU64,
    /// Closed after [`HANDSHAKE_TIMEOUT`] without a byte.
    pub silent: AtomicU64,
}

/// An accepted connection holding one of its port's slots until it is dropped.
#[derive(Debug)]
pub struct Limited {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Limited {
    /// The underlying socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// Accepts connections of `listener` for `port` (a name for logs): at most `max` open at
/// once, each handed on only once it has sent a byte (within [`HANDSHAKE_TIMEOUT`]).
/// Accepting stops when the receiver is dropped.
pub fn accept_limited(
    listener: TcpListener,
    port: &'static str,
    max: usize,
    stats: Arc<ConnectionStats>,
) -> mpsc::Receiver<(Limited, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(port, error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                if stats
                    .refused
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(1000)
                {
                    tracing::warn!(port, max, %peer, "connection refused: the port has its most connections open");
                }
                continue;
            };
            // Nagle would hold the tail of a response for the peer's delayed ACK.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(port, error = %e, "setting TCP_NODELAY failed");
            }
            let tx = tx.clone();
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                // A byte is there (peek waits for one, unlike `readable`, which may wake
                // spuriously), or the peer closed, or it stayed silent: only the first goes on.
                let mut first = [0u8; 1];
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {
                        let conn = Limited {
                            stream,
                            _slot: slot,
                        };
                        let _ = tx.send((conn, peer)).await;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        stats.silent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    rx
}

/// The HTTP port's accepted connections, as axum's listener.
pub struct HttpListener {
    /// Connections accepted by [`accept_limited`].
    pub incoming: mpsc::Receiver<(Limited, SocketAddr)>,
    /// The bound address.
    pub addr: SocketAddr,
}

impl axum::serve::Listener for HttpListener {
    type Io = Limited;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => conn,
            // The accept task is gone only when the server is: wait for the shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_descriptors_for_storage() {
        let small = FdBudget::new(256, 4096);
        assert_eq!(
            (
                small.storage_files,
                small.grpc_connections,
                small.http_connections
            ),
            (64, 128, 16)
        );
        assert!(small.storage_files + small.grpc_connections + small.http_connections < 256);
        let big = FdBudget::new(1 << 20, 4096);
        assert_eq!((big.storage_files, big.grpc_connections), (900, 4096));
    }
}
