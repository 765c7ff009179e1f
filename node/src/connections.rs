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
//!
//! **Idle connections close.** A connection that has started no request for
//! `connection_idle_timeout_secs` while not inside one is closed: a keep-alive
//! connection left open, or a client trickling a request head a byte at a time, must
//! not hold a socket and its buffers for good. hyper times a head only with a timer
//! armed for every request; here each request costs two uncontended counter bumps on
//! its own connection, and one task sweeps every connection a few times per timeout.

mod head_errors;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::api::dispatch::{Api, ConnectionApi};
use crate::metrics;
use head_errors::JsonHeadErrors;

/// How long to wait before accepting again after an error that is not about one
/// connection (out of file descriptors): retrying at once would spin.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// Serves `listener` until `stop` turns true, then drains: returns once every
/// connection has closed. The caller bounds how long that may take. With
/// `idle_timeout`, connections idle that long are closed (see the module doc).
pub async fn serve(
    listener: TcpListener,
    api: Api,
    idle_timeout: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    let drain = Arc::new(Drain::default());
    if let Some(idle_timeout) = idle_timeout {
        tokio::spawn(sweep_idle(Arc::clone(&drain), idle_timeout, stop.clone()));
    }
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
        let activity = Arc::new(Activity::default());
        let service = Tracked {
            api: api.for_connection(peer),
            activity: Arc::clone(&activity),
        };
        let connection = http.serve_connection(JsonHeadErrors::new(TokioIo::new(stream)), service);
        tokio::spawn(Served {
            connection,
            place: Open::new(&drain, next_id, activity),
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
    /// Each connection's waker and activity, handed over at its first poll, so that
    /// setting `draining` (or asking an idle one to close) wakes it to see it.
    wakers: Mutex<HashMap<u64, Handed>>,
    /// One receiver per open connection; `closed()` resolves when all are gone.
    open: watch::Sender<()>,
}

/// A connection as the drain and the idle sweep see it.
struct Handed {
    waker: Waker,
    activity: Arc<Activity>,
    /// `activity.started` at the last sweep, and since when it has not moved while
    /// the connection was between requests (only the sweep touches these).
    started_seen: u64,
    idle_since: Option<Instant>,
}

/// What one connection has done, counted by its service and read by the sweep.
#[derive(Debug, Default)]
struct Activity {
    /// Requests whose head was read and handed to the API.
    started: AtomicU64,
    /// Of those, the ones whose answer is made.
    finished: AtomicU64,
    /// Set by the sweep: the connection is to close, after the answer it may still
    /// be writing.
    close_asked: AtomicBool,
    /// Set by the sweep a second idle period after asking: close now, whatever hyper
    /// is doing (a head it waits to complete, an answer nobody reads).
    close_now: AtomicBool,
}

impl Activity {
    fn in_request(&self) -> bool {
        self.started.load(Ordering::Relaxed) != self.finished.load(Ordering::Relaxed)
    }
}

/// The API service of one connection, counting its requests into `activity`.
struct Tracked {
    api: ConnectionApi,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Answered<<ConnectionApi as hyper::service::Service<Request<Incoming>>>::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.started.fetch_add(1, Ordering::Relaxed);
        Answered {
            answer: self.api.call(request),
            _finished: FinishedOnDrop(Arc::clone(&self.activity)),
        }
    }
}

/// A request's answer, counted finished when done with (answered or dropped).
struct Answered<F> {
    answer: F,
    _finished: FinishedOnDrop,
}

struct FinishedOnDrop(Arc<Activity>);

impl Drop for FinishedOnDrop {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

impl<F: Future + Unpin> Future for Answered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.answer).poll(cx)
    }
}

/// Every third of `idle_timeout`, asks the connections that have started no request
/// for `idle_timeout` while not inside one to close, and tells those still open a
/// second `idle_timeout` later to close at once. Stops with the server (the drain
/// then closes every idle connection anyway).
async fn sweep_idle(drain: Arc<Drain>, idle_timeout: Duration, mut stop: watch::Receiver<bool>) {
    let mut sweeps = tokio::time::interval((idle_timeout / 3).max(Duration::from_millis(100)));
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = sweeps.tick() => {}
        }
        let now = Instant::now();
        let mut closed = 0u64;
        for handed in lock(&drain.wakers).values_mut() {
            let started = handed.activity.started.load(Ordering::Relaxed);
            if started != handed.started_seen || handed.activity.in_request() {
                handed.started_seen = started;
                handed.idle_since = None;
                continue;
            }
            let idle_for = now.duration_since(*handed.idle_since.get_or_insert(now));
            let activity = &handed.activity;
            if idle_for >= idle_timeout && !activity.close_asked.swap(true, Ordering::Relaxed) {
                handed.waker.wake_by_ref();
                closed += 1;
            } else if idle_for >= 2 * idle_timeout
                && !activity.close_now.swap(true, Ordering::Relaxed)
            {
                handed.waker.wake_by_ref();
            }
        }
        if closed > 0 {
            ::metrics::counter!(metrics::HTTP_CONNECTIONS_CLOSED_IDLE).increment(closed);
            tracing::debug!(
                closed,
                idle_secs = idle_timeout.as_secs_f64(),
                "idle connections closed"
            );
        }
    }
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
        for handed in lock(&self.wakers).values() {
            handed.waker.wake_by_ref();
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
    activity: Arc<Activity>,
    waker_handed_over: bool,
    _counted: watch::Receiver<()>,
}

impl Open {
    fn new(drain: &Arc<Drain>, id: u64, activity: Arc<Activity>) -> Self {
        ::metrics::gauge!(metrics::HTTP_CONNECTIONS_OPEN).increment(1.0);
        Open {
            drain: Arc::clone(drain),
            id,
            activity,
            waker_handed_over: false,
            _counted: drain.open.subscribe(),
        }
    }

    /// Whether the connection is to finish, and how. The first call hands over the
    /// task's waker; a spawned task keeps one waker for its life, so once is enough.
    fn finish(&mut self, cx: &Context<'_>) -> Finish {
        if !self.waker_handed_over {
            let handed = Handed {
                waker: cx.waker().clone(),
                activity: Arc::clone(&self.activity),
                started_seen: 0,
                idle_since: None,
            };
            lock(&self.drain.wakers).insert(self.id, handed);
            self.waker_handed_over = true;
        }
        let activity = &self.activity;
        if activity.close_now.load(Ordering::Relaxed) {
            return Finish::Now;
        }
        if activity.close_asked.load(Ordering::Relaxed) {
            // A connection that never had a request has no answer to finish, only
            // perhaps a head trickling in, which hyper would wait for: it goes now.
            // One that had requests may still be writing the last answer, and hyper
            // closes it once that is out (or at once, when idle).
            if activity.started.load(Ordering::Relaxed) == 0 {
                return Finish::Now;
            }
            return Finish::AfterAnswer;
        }
        if self.drain.is_draining() {
            Finish::AfterAnswer
        } else {
            Finish::No
        }
    }
}

enum Finish {
    No,
    /// Keep-alive off: the request in flight is answered, then the connection
    /// closes; an idle one closes at once.
    AfterAnswer,
    /// Closed without a word: no request ever started on it, or asked twice.
    Now,
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
        connection: http1::Connection<JsonHeadErrors<TokioIo<TcpStream>>, Tracked>,
        place: Open,
        asked_to_finish: bool,
    }
}

impl Future for Served {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        match this.place.finish(cx) {
            Finish::No => {}
            Finish::AfterAnswer => {
                if !*this.asked_to_finish {
                    this.connection.as_mut().graceful_shutdown();
                    *this.asked_to_finish = true;
                }
            }
            Finish::Now => return Poll::Ready(()),
        }
        match this.connection.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(error)) => {
                // A client that resets, or sends what is not HTTP/1.1 (answered
                // 400, 414 or 431 where it could be, see `head_errors`): nothing
                // for an operator to do.
                tracing::debug!(%error, "connection ended with an error");
                Poll::Ready(())
            }
        }
    }
}
