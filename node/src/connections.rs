//! The HTTP/1.1 connections: the accept loop, one hyper connection per socket, and
//! the drain on shutdown (no new connections; each open one answers the request it
//! is on, then closes; idle ones close at once).
//!
//! axum's `serve` did this before, at a price an order paid twice over (callgrind,
//! README): every wake-up of a connection polled a shutdown channel (a mutex and a
//! waker clone), and while a request was being answered hyper reserved room in the
//! socket's read buffer to watch for the client going away. That buffer still held
//! the request's bytes, so every request got a freshly allocated 8 KiB one. Here a
//! connection reads nothing while it answers (`half_close`: a client that leaves
//! mid-request still has its order answered and journaled, as it would have had a
//! moment later), and learns of a shutdown from an atomic flag, its waker handed over
//! once.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::api::dispatch::{Api, ConnectionApi};
use crate::metrics;

/// How long to wait before accepting again after an error that is not about one
/// connection (out of file descriptors): retrying at once would spin.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// Serves `listener` until `stop` turns true, then drains: returns once every
/// connection has closed. The caller bounds how long that may take.
pub async fn serve(listener: TcpListener, api: Api, mut stop: watch::Receiver<bool>) {
    let drain = Arc::new(Drain::default());
    let mut http = http1::Builder::new();
    http.half_close(true)
        // hyper times a request head only with a timer, which would cost every
        // request a timer entry; without one its default timeout is dropped anyway,
        // and this says so.
        .header_read_timeout(None);
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_about_one_connection(&error) => continue,
            Err(error) => {
                ::metrics::counter!(metrics::HTTP_ACCEPT_ERRORS).increment(1);
                tracing::error!(%error, retry_secs = ACCEPT_RETRY.as_secs(), "accepting connections");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_RETRY) => continue,
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
        };
        next_id += 1;
        let connection = http.serve_connection(TokioIo::new(stream), api.for_connection(peer));
        tokio::spawn(Served {
            connection,
            place: Open::new(&drain, next_id),
            asked_to_finish: false,
        });
    }
    drop(listener);
    let open = drain.open.receiver_count();
    tracing::info!(
        open,
        "stopped accepting; waiting for open connections to finish"
    );
    drain.start();
    drain.open.closed().await;
}

/// `accept` failed for the connection being accepted only (it was reset or aborted
/// before it was taken): the next one may be fine.
fn is_about_one_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// What the accept loop shares with the connections it spawned.
struct Drain {
    /// Set once, when the node stops accepting.
    draining: AtomicBool,
    /// Each connection's waker, handed over at its first poll, so that setting
    /// `draining` wakes the idle ones to see it.
    wakers: Mutex<HashMap<u64, Waker>>,
    /// One receiver per open connection; `closed()` resolves when all are gone.
    open: watch::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: AtomicBool::new(false),
            wakers: Mutex::new(HashMap::new()),
            open: watch::Sender::new(()),
        }
    }
}

impl Drain {
    fn start(&self) {
        // The flag is set before the wakers are taken, and a connection hands over
        // its waker before it reads the flag: either it sees the flag, or it is
        // among the woken.
        self.draining.store(true, Ordering::SeqCst);
        for waker in lock(&self.wakers).values() {
            waker.wake_by_ref();
        }
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves a map of wakers, still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connection's place among the open ones: counted from accept to drop.
struct Open {
    drain: Arc<Drain>,
    id: u64,
    waker_handed_over: bool,
    _counted: watch::Receiver<()>,
}

impl Open {
    fn new(drain: &Arc<Drain>, id: u64) -> Self {
        ::metrics::gauge!(metrics::HTTP_CONNECTIONS_OPEN).increment(1.0);
        Open {
            drain: Arc::clone(drain),
            id,
            waker_handed_over: false,
            _counted: drain.open.subscribe(),
        }
    }

    /// Whether the node is draining; the first call hands over the task's waker.
    /// A spawned task keeps one waker for its life, so once is enough.
    fn is_draining(&mut self, cx: &Context<'_>) -> bool {
        if !self.waker_handed_over {
            lock(&self.drain.wakers).insert(self.id, cx.waker().clone());
            self.waker_handed_over = true;
        }
        self.drain.is_draining()
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.waker_handed_over {
            lock(&self.drain.wakers).remove(&self.id);
        }
        ::metrics::gauge!(metrics::HTTP_CONNECTIONS_OPEN).decrement(1.0);
    }
}

pin_project_lite::pin_project! {
    /// One connection served to its end, asked to finish when the node drains.
    struct Served {
        #[pin]
        connection: http1::Connection<TokioIo<TcpStream>, ConnectionApi>,
        place: Open,
        asked_to_finish: bool,
    }
}

impl Future for Served {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if !*this.asked_to_finish && this.place.is_draining(cx) {
            // Keep-alive off: the request in flight is answered, then the
            // connection closes; an idle one closes now.
            this.connection.as_mut().graceful_shutdown();
            *this.asked_to_finish = true;
        }
        match this.connection.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(error)) => {
                // A client that resets, or sends what is not HTTP/1.1 (hyper has
                // answered 400 where it could): nothing for an operator to do.
                tracing::debug!(%error, "connection ended with an error");
                Poll::Ready(())
            }
        }
    }
}
