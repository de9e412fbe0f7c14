//! Accepted HTTP connections, under axum's server: the connection cap (one more is answered
//! `503` and closed) and the header timeout. axum's server sets no timer on hyper, so the
//! timeout lives in the connection's IO: a connection that is not answering a request must send
//! the next request head within `http.header_timeout_ms`, which also bounds an idle keep-alive.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::connect_info::Connected;
use axum::http::StatusCode;
use axum::serve::{IncomingStream, Listener};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::errors::ApiError;

/// The listener axum serves: hands out connections while under the cap.
pub(super) struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max_connections: usize,
    header_timeout: Duration,
}

impl Acceptor {
    pub(super) fn new(
        listener: TcpListener,
        max_connections: usize,
        header_timeout: Duration,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(max_connections.max(1)));
        Self { listener, permits, max_connections, header_timeout }
    }
}

impl Listener for Acceptor {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                tokio::spawn(refuse_overloaded(stream, self.max_connections));
                continue;
            };
            return (Conn::new(stream, permit, self.header_timeout), peer);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Answers a connection past the cap with `503` and closes it, without reading the request.
async fn refuse_overloaded(mut stream: TcpStream, max_connections: usize) {
    let error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!("connection limit of {max_connections} reached; retry later"),
    );
    let body = error.json();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Whether a connection is answering a request, shared by its IO and its requests.
#[derive(Debug, Default)]
pub(super) struct Activity {
    /// Requests being answered (their answer not yet fully sent).
    busy: AtomicUsize,
    /// Times a request ended, so the IO restarts the header deadline from the last one.
    ended: AtomicU64,
    /// The IO's waker while busy: once idle, the header deadline must be armed even if no byte
    /// arrives to wake the connection.
    waker: Mutex<Option<Waker>>,
}

impl Activity {
    /// Marks a request as being answered until the returned guard drops.
    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }
}

/// A request being answered; see [`Activity::begin`].
#[derive(Debug)]
pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        // `ended` moves first: the IO that sees `busy == 0` must also see the new count.
        self.0.ended.fetch_add(1, Ordering::SeqCst);
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(waker) = self.0.waker.lock().ok().and_then(|mut w| w.take())
        {
            waker.wake();
        }
    }
}

/// A connection's [`Activity`], handed to its requests as connect info.
#[derive(Debug, Clone)]
pub(super) struct ConnActivity(pub(super) Arc<Activity>);

impl Connected<IncomingStream<'_, Acceptor>> for ConnActivity {
    fn connect_info(stream: IncomingStream<'_, Acceptor>) -> Self {
        Self(stream.io().activity.clone())
    }
}

/// An accepted connection: holds its place under the cap and enforces the header timeout.
pub(super) struct Conn {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    activity: Arc<Activity>,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The `Activity::ended` count the deadline was armed for.
    armed_for: u64,
}

impl Conn {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, timeout: Duration) -> Self {
        let timeout = timeout.max(Duration::from_millis(1));
        Self {
            stream,
            _permit: permit,
            activity: Arc::default(),
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            armed_for: 0,
        }
    }

    /// Called when a read would block: `Ready` with an error once an idle connection is past
    /// its deadline.
    fn poll_header_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let activity = &self.activity;
        if activity.busy.load(Ordering::SeqCst) > 0 {
            if let Ok(mut waker) = activity.waker.lock() {
                *waker = Some(cx.waker().clone());
            }
            // Checked again: the request may have ended before the waker was stored.
            if activity.busy.load(Ordering::SeqCst) > 0 {
                return Poll::Pending;
            }
        }
        let ended = activity.ended.load(Ordering::SeqCst);
        if ended != self.armed_for {
            self.armed_for = ended;
            self.deadline.as_mut().reset(Instant::now() + self.timeout);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no request head within http.header_timeout_ms = {}",
                    self.timeout.as_millis()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => this.poll_header_deadline(cx),
            ready => ready,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A response body that keeps its request [`Busy`] until it is fully sent or dropped, so a
/// long stream is never cut by the header timeout.
pub(super) struct Tracked {
    body: Body,
    _busy: Busy,
}

impl Tracked {
    pub(super) fn new(body: Body, busy: Busy) -> Self {
        Self { body, _busy: busy }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
