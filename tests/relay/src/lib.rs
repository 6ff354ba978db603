//! A TCP relay for tests: between a client and a service on loopback, it carries bytes both ways
//! until told to cut, and then stops carrying them without closing anything, which is what a peer
//! whose node vanished, or a partition, leaves behind. Loopback cannot lose packets; a black hole
//! with a small receive buffer is what the service's kernel can tell from one.
//!
//! client -> [`Relay`] (one connection to the service per client connection, numbered as
//! accepted) -> service; [`Relay::cut`] or [`Relay::cut_replies`] -> the connections open now
//! go silent, one or both ways; those made later are relayed, unless
//! [`Relay::refuse_new_connections`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A TCP relay in front of a service. [`Relay::cut`] turns every connection open now into a
/// black hole: bytes go nowhere, and neither side's socket closes (a half-open connection, as a
/// NAT or conntrack entry that expired, or a peer's node that vanished, leave behind).
/// Connections made later are relayed. The relay's socket to the service has a small receive
/// buffer, so that what the service sends into a black hole soon goes unacknowledged (a zero
/// window), as it would to a peer that is gone.
pub struct Relay {
    addr: SocketAddr,
    /// Connections numbered below these carry nothing more to the service, and from it.
    cut_to_service: Arc<AtomicU64>,
    cut_to_client: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut_to_service = Arc::new(AtomicU64::new(0));
        let cut_to_client = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (to_service, to_client, count) =
            (cut_to_service.clone(), cut_to_client.clone(), next.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let id = count.fetch_add(1, Ordering::SeqCst);
                let Ok(outbound) = connect_small(target).await else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::spawn(pipe(in_read, out_write, id, to_service.clone()));
                tokio::spawn(pipe(out_read, in_write, id, to_client.clone()));
            }
        });
        Ok(Relay {
            addr,
            cut_to_service,
            cut_to_client,
            next,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted since the last cut (those the cut spared).
    pub fn accepted_since_cut(&self) -> u64 {
        let cut = self.cut_to_client.load(Ordering::SeqCst);
        self.next.load(Ordering::SeqCst).saturating_sub(cut)
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every connection open now stops carrying bytes, and stays open.
    pub fn cut(&self) {
        self.cut_replies();
        self.cut_to_service
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Every connection, open now or made later, stops carrying the service's bytes: a service
    /// that takes what it is sent and never answers.
    pub fn cut_all_replies(&self) {
        self.cut_to_client.store(u64::MAX, Ordering::SeqCst);
    }

    /// New connections are refused from now on, as none completes past a partition; those
    /// open now stay as they are.
    pub fn refuse_new_connections(&self) {
        self.task.abort();
    }

    /// Every connection open now stops carrying the service's bytes (a partition one way), and
    /// stays open.
    pub fn cut_replies(&self) {
        self.cut_to_client
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// A connection to `target` with a small receive buffer.
async fn connect_small(target: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.connect(target).await
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    cut_below: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await;
        if id < cut_below.load(Ordering::SeqCst) {
            // A black hole: keep both sockets open, carry nothing (not even an end), read no
            // more.
            let _open = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        let Ok(read @ 1..) = read else {
            return;
        };
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
