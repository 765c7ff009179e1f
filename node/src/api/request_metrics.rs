//! The request metrics middleware: counts and times every request by route template
//! (never the raw path: ids in label values would make one time series per order).
//!
//! Each route gets its own layer, which knows its template, so nothing is looked up
//! per request: the histogram and each status's counter are resolved from the
//! registry once, on first use, and kept. A `counter!` call with labels builds,
//! hashes and looks up its key every time, which the order path should not pay.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::Response;
use metrics::{Counter, Histogram};
use tower::{Layer, Service};

use crate::metrics::{HTTP_DURATION, HTTP_REQUESTS};

/// The label of requests that matched no route.
pub const UNMATCHED: &str = "unmatched";
/// The label of request heads hyper could not parse (`connections::head_errors`):
/// no route was ever known.
pub const MALFORMED_HEAD: &str = "malformed_head";

/// Status codes with a kept counter; any other (none is answered today) goes
/// through the registry each time.
const STATUS_KEPT: std::ops::RangeInclusive<u16> = 100..=599;

/// The series of one route.
struct RouteSeries {
    route: &'static str,
    duration: OnceLock<Histogram>,
    requests_by_status: Box<[OnceLock<Counter>]>,
}

impl RouteSeries {
    fn new(route: &'static str) -> Self {
        RouteSeries {
            route,
            duration: OnceLock::new(),
            requests_by_status: STATUS_KEPT.map(|_| OnceLock::new()).collect(),
        }
    }

    fn record(&self, status: StatusCode, elapsed_secs: f64) {
        let route = self.route;
        self.duration
            .get_or_init(|| metrics::histogram!(HTTP_DURATION, "route" => route))
            .record(elapsed_secs);
        let code = status.as_u16();
        let new_counter =
            || metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => code.to_string());
        match self
            .requests_by_status
            .get(usize::from(code.wrapping_sub(*STATUS_KEPT.start())))
        {
            Some(kept) => kept.get_or_init(new_counter).increment(1),
            None => new_counter().increment(1),
        }
    }
}

/// Records the requests of the route it wraps.
#[derive(Clone)]
pub struct RequestMetricsLayer {
    series: Arc<RouteSeries>,
}

impl RequestMetricsLayer {
    pub fn new(route: &'static str) -> Self {
        RequestMetricsLayer {
            series: Arc::new(RouteSeries::new(route)),
        }
    }

    /// Records the response `answer` resolves to, timed from now: for a route
    /// dispatched without a service to wrap (`dispatch`).
    pub fn time<F>(&self, answer: F) -> Recorded<F> {
        Recorded {
            started: Instant::now(),
            series: Arc::clone(&self.series),
            inner: answer,
        }
    }
}

impl<S> Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> RequestMetrics<S> {
        RequestMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    layer: RequestMetricsLayer,
}

impl<S, Request> Service<Request> for RequestMetrics<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Recorded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.layer.time(self.inner.call(request))
    }
}

pin_project_lite::pin_project! {
    /// The wrapped route's response future, recording when the response head is ready.
    pub struct Recorded<F> {
        #[pin]
        inner: F,
        started: Instant,
        series: Arc<RouteSeries>,
    }
}

impl<F, E> Future for Recorded<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let outcome = ready!(this.inner.poll(cx));
        if let Ok(response) = &outcome {
            this.series
                .record(response.status(), this.started.elapsed().as_secs_f64());
        }
        Poll::Ready(outcome)
    }
}
