//! gRPC connections that know when and how they close, so ingest can tell a gateway whose
//! connection closed (Envoy exited) from one whose stream merely ended (the filter gave it up after
//! a timeout, a report was refused) or that went quiet with its connection open (a partition).
//!
//! accepted connection -> [`Tracked`] (the IO, and a [`ConnectionInfo`] every request on it
//! carries as an extension) -> requests register what the connection carried with
//! [`ConnectionInfo::carried`] -> the connection closes (its IO is dropped) -> what it carried is
//! told how ([`Carried::closed`]), which is how ingest learns of the close.
//!
//! How: a connection ends (the peer's FIN, reset or GOAWAY, or this side closing it for a
//! protocol error), or is lost: the kernel gave up on a peer that stopped acknowledging
//! (keepalive probes, or what was sent, unanswered: a node lost, a partition). Only an end says
//! the peer is gone; a peer behind a partition may live on and report again once it heals.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What requests on one connection left with it, told when the connection closes.
pub trait Carried: std::any::Any + Send {
    fn closed(self: Box<Self>, how: Closed);
}

/// Closed connections, on `/metrics`: lost ones are peers gone without a word, or partitions.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCounters {
    pub closed: Family<ClosedLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    how: &'static str,
}

/// How a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Without a sign of loss: its peer ended it (a FIN, a reset, a GOAWAY), or this side did.
    Ended,
    /// The kernel gave up on its peer (keepalive probes or sent data unacknowledged, or a zero
    /// window: a peer that reads nothing; or an ICMP error), which says nothing of whether the
    /// peer lives.
    Lost,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::Ended => "ended",
            Closed::Lost => "lost",
        }
    }
}

/// The request extension naming the connection a request came on.
#[derive(Clone, Default)]
pub struct ConnectionInfo {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    carried: Option<Box<dyn Carried>>,
    /// A request still running when its connection closed registers nothing more.
    closed: bool,
}

impl std::fmt::Debug for ConnectionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionInfo").finish_non_exhaustive()
    }
}

impl ConnectionInfo {
    /// Runs `with` on what this connection carries, made by `new` the first time. Whatever it is,
    /// it is told how the connection closed ([`Carried::closed`]). None once it has closed.
    pub fn carried<T: Carried, R>(
        &self,
        new: impl FnOnce() -> T,
        with: impl FnOnce(&mut T) -> R,
    ) -> Option<R> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return None;
        }
        let carried: &mut dyn Carried = &mut **state.carried.get_or_insert_with(|| Box::new(new()));
        let carried: &mut dyn std::any::Any = carried;
        carried.downcast_mut::<T>().map(with)
    }

    fn close(&self, how: Closed) {
        let carried = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.closed = true;
            state.carried.take()
        };
        // Told outside the lock: what it does takes other locks.
        if let Some(carried) = carried {
            carried.closed(how);
        }
    }
}

/// An accepted connection's IO, unchanged, that tells what its requests registered how it
/// closed.
#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    info: ConnectionInfo,
    /// A read or write failed otherwise than with a sign that the connection ended.
    lost: bool,
    counters: ConnectionCounters,
}

impl<IO> Tracked<IO> {
    pub fn new(io: IO, counters: ConnectionCounters) -> Self {
        Tracked {
            io,
            info: ConnectionInfo::default(),
            lost: false,
            counters,
        }
    }

    /// Notes whether `result` says the peer was lost; passes it on. Only the clear signs of an
    /// end count as one: when the kernel gives up on a peer it reports a timeout, or the last
    /// ICMP error it saw (host or network unreachable or down, prohibited, refused...), and
    /// taking any of those as the peer leaving would stop holding for a gateway cut off.
    fn note<T>(&mut self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(error)) = &result {
            self.lost |= !matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::InvalidData
            );
        }
        result
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        let how = if self.lost {
            Closed::Lost
        } else {
            Closed::Ended
        };
        self.counters
            .closed
            .get_or_create(&ClosedLabels { how: how.label() })
            .inc();
        self.info.close(how);
    }
}

impl<IO> Connected for Tracked<IO> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        self.note(read)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        self.note(flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = Pin::new(&mut self.io).poll_shutdown(cx);
        self.note(shut)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// Records how its connection closed.
    struct SaysHowClosed(Arc<Mutex<Option<Closed>>>);

    impl Carried for SaysHowClosed {
        fn closed(self: Box<Self>, how: Closed) {
            *self.0.lock().unwrap() = Some(how);
        }
    }

    struct NeverMade;

    impl Carried for NeverMade {
        fn closed(self: Box<Self>, _: Closed) {}
    }

    fn register<IO>(tracked: &Tracked<IO>) -> Arc<Mutex<Option<Closed>>> {
        let told = Arc::new(Mutex::new(None));
        let made = tracked
            .connect_info()
            .carried(|| SaysHowClosed(told.clone()), |_| 1);
        assert_eq!(made, Some(1));
        told
    }

    #[test]
    fn what_requests_registered_is_told_when_the_connection_closes_not_before() {
        let (io, _peer) = tokio::io::duplex(64);
        let tracked = Tracked::new(io, ConnectionCounters::default());
        let told = register(&tracked);
        // A request ending (its copy of the info dropped) is not the connection closing.
        drop(tracked.connect_info());
        assert_eq!(*told.lock().unwrap(), None);
        drop(tracked);
        assert_eq!(*told.lock().unwrap(), Some(Closed::Ended));
    }

    /// IO whose reads and writes fail with `kind`.
    struct Failing(io::ErrorKind);

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(self.0.into()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }
    }

    /// How a connection whose `read` or write failed with `kind` closes, and what is counted.
    async fn closed_after(kind: io::ErrorKind, read: bool) -> (Closed, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let counters = ConnectionCounters::default();
        let mut tracked = Tracked::new(Failing(kind), counters.clone());
        let told = register(&tracked);
        if read {
            assert!(tracked.read(&mut [0u8; 8]).await.is_err());
        } else {
            assert!(tracked.write(b"ack").await.is_err());
        }
        drop(tracked);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("closed", "", counters.closed);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let how = told.lock().unwrap().unwrap();
        (how, text)
    }

    #[tokio::test]
    async fn a_connection_the_kernel_gave_up_on_is_lost_one_reset_or_broken_ended() {
        for read in [true, false] {
            for kind in [
                io::ErrorKind::TimedOut,
                io::ErrorKind::HostUnreachable,
                io::ErrorKind::NetworkUnreachable,
                io::ErrorKind::NetworkDown,
                // EACCES: ICMPv6 "administratively prohibited", as network policies answer.
                io::ErrorKind::PermissionDenied,
                io::ErrorKind::ConnectionRefused,
                // EHOSTDOWN, ENONET: no ErrorKind of their own.
                io::ErrorKind::Other,
            ] {
                let (how, text) = closed_after(kind, read).await;
                assert_eq!(how, Closed::Lost, "{kind:?}, read: {read}");
                assert!(text.contains("closed_total{how=\"lost\"} 1"), "{text}");
            }
            for kind in [
                io::ErrorKind::ConnectionReset,
                io::ErrorKind::ConnectionAborted,
                io::ErrorKind::BrokenPipe,
                io::ErrorKind::UnexpectedEof,
                io::ErrorKind::InvalidData,
            ] {
                let (how, text) = closed_after(kind, read).await;
                assert_eq!(how, Closed::Ended, "{kind:?}, read: {read}");
                assert!(text.contains("closed_total{how=\"ended\"} 1"), "{text}");
            }
        }
    }

    #[tokio::test]
    async fn a_connection_its_peer_closed_ended() {
        use tokio::io::AsyncReadExt;
        let (io, peer) = tokio::io::duplex(64);
        let mut tracked = Tracked::new(io, ConnectionCounters::default());
        let told = register(&tracked);
        drop(peer);
        assert_eq!(tracked.read(&mut [0u8; 8]).await.unwrap(), 0);
        drop(tracked);
        assert_eq!(*told.lock().unwrap(), Some(Closed::Ended));
    }

    #[test]
    fn a_request_that_outlives_its_connection_registers_nothing() {
        let (io, _peer) = tokio::io::duplex(64);
        let tracked = Tracked::new(io, ConnectionCounters::default());
        let request = tracked.connect_info();
        drop(tracked);
        let made = request.carried(
            || -> NeverMade { panic!("nothing is made for a closed connection") },
            |_| 1,
        );
        assert_eq!(made, None);
    }
}
