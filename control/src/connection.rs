//! gRPC connections that know when they close, so ingest can tell a gateway whose connection
//! closed (Envoy exited) from one whose stream merely ended (the filter reset it after a
//! timeout, a report was refused) or that went quiet with its connection open (a partition).
//!
//! accepted connection -> [`Tracked`] (the IO, and a [`ConnectionInfo`] every request on it
//! carries as an extension) -> requests register what the connection carried with
//! [`ConnectionInfo::carried`] -> the connection closes (its IO is dropped) -> what it carried is
//! dropped with it, which is how ingest learns of the close.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What requests on one connection left with it, dropped when the connection closes.
pub type Carried = Box<dyn std::any::Any + Send>;

/// The request extension naming the connection a request came on.
#[derive(Clone, Default)]
pub struct ConnectionInfo {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    carried: Option<Carried>,
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
    /// it is dropped when the connection closes. None once it has closed.
    pub fn carried<T: Send + 'static, R>(
        &self,
        new: impl FnOnce() -> T,
        with: impl FnOnce(&mut T) -> R,
    ) -> Option<R> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return None;
        }
        let carried = state.carried.get_or_insert_with(|| Box::new(new()));
        carried.downcast_mut::<T>().map(with)
    }

    fn close(&self) {
        let carried = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.closed = true;
            state.carried.take()
        };
        // Dropped outside the lock: what it does on drop takes other locks.
        drop(carried);
    }
}

/// An accepted connection's IO, unchanged, that drops what its requests registered when it
/// closes.
#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    info: ConnectionInfo,
}

impl<IO> Tracked<IO> {
    pub fn new(io: IO) -> Self {
        Tracked {
            io,
            info: ConnectionInfo::default(),
        }
    }
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        self.info.close();
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
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct SaysWhenDropped(Arc<AtomicBool>);

    impl Drop for SaysWhenDropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn what_requests_registered_is_dropped_when_the_connection_closes_not_before() {
        let (io, _peer) = tokio::io::duplex(64);
        let tracked = Tracked::new(io);
        let dropped = Arc::new(AtomicBool::new(false));
        let request = tracked.connect_info();
        let made = request.carried(|| SaysWhenDropped(dropped.clone()), |_| 1);
        assert_eq!(made, Some(1));
        // A request ending (its copy of the info dropped) is not the connection closing.
        drop(request);
        assert!(!dropped.load(Ordering::SeqCst));
        drop(tracked);
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn a_request_that_outlives_its_connection_registers_nothing() {
        let (io, _peer) = tokio::io::duplex(64);
        let tracked = Tracked::new(io);
        let request = tracked.connect_info();
        drop(tracked);
        let made = request.carried(|| panic!("nothing is made for a closed connection"), |()| 1);
        assert_eq!(made, None);
    }
}
