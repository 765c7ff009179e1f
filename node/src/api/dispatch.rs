//! The service the server runs: the router, with the one route a drop's crowd hits
//! (`POST /v1/skus/{sku}/orders`) dispatched ahead of it.
//!
//! The router matches the path, copies each path parameter into a percent-decoded
//! `Arc<str>` kept in the request's extensions, and boxes a future per layer it passes
//! through: about 4,700 user-space instructions of the 37,500 an order cost (callgrind,
//! README), for a path whose shape is fixed. An order whose path is already in canonical
//! form (a SKU id of `[A-Za-z0-9_-]`, which percent-decoding cannot change) is handed
//! to the same handler directly, under the same request metrics; anything else,
//! percent-escapes and wrong methods included, goes through the router and gets the
//! answer it always got.
//!
//! The service is made once per accepted connection (`connections.rs`) and keeps the
//! peer's address, which an order reads from there; only requests for the router get
//! it as the `ConnectInfo` extension its extractors read (inserting it allocates the
//! request's extension map, about 850 instructions).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request};
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use keydrop_engine::SkuId;
use tower::Service as _;

use super::orders;
use super::request_metrics::RequestMetricsLayer;
use super::AppState;

/// The route template of order placement, as the router and the metrics name it.
pub const ORDERS_ROUTE: &str = "/v1/skus/{sku}/orders";

/// The router, and order placement in front of it; serves each accepted connection
/// as a [`ConnectionApi`].
#[derive(Clone)]
pub struct Api {
    router: Router,
    state: AppState,
    orders_metrics: RequestMetricsLayer,
}

impl Api {
    pub fn new(state: AppState) -> Self {
        Api {
            router: super::router(state.clone()),
            state,
            orders_metrics: RequestMetricsLayer::new(ORDERS_ROUTE),
        }
    }

    /// The service for one accepted connection from `peer`.
    pub fn for_connection(&self, peer: SocketAddr) -> ConnectionApi {
        ConnectionApi {
            api: self.clone(),
            peer,
        }
    }
}

/// The API as one connection sees it.
#[derive(Clone)]
pub struct ConnectionApi {
    api: Api,
    peer: SocketAddr,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnectionApi {
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<Incoming>) -> Answer {
        if request.method() == Method::POST && order_route_sku(request.uri().path()).is_some() {
            // hyper's body as it is: boxing it into axum's `Body` is an allocation the
            // handler has no use for.
            let (state, peer) = (self.api.state.clone(), self.peer);
            let answer = async move { Ok(orders::create_order_direct(state, peer, request).await) };
            return Box::pin(self.api.orders_metrics.time(answer));
        }
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(self.peer));
        // The router is always ready; a clone of it is a reference count.
        Box::pin(self.api.router.clone().call(request))
    }
}

/// The `{sku}` of `/v1/skus/{sku}/orders` when the path is exactly that, with a
/// segment of the characters a SKU id may hold: the router would extract the same text
/// (it has nothing to percent-decode), and the handler checks it like any SKU id.
pub fn order_route_sku(path: &str) -> Option<&str> {
    let segment = path.strip_prefix("/v1/skus/")?.strip_suffix("/orders")?;
    let canonical = !segment.is_empty() && segment.bytes().all(SkuId::allows_byte);
    canonical.then_some(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_order_paths_skip_the_router() {
        for (path, sku) in [
            ("/v1/skus/wrk-0/orders", "wrk-0"),
            ("/v1/skus/steam_card_50/orders", "steam_card_50"),
            ("/v1/skus/A/orders", "A"),
        ] {
            assert_eq!(order_route_sku(path), Some(sku), "{path}");
        }
        for path in [
            "/v1/skus//orders",
            "/v1/skus/wrk%2D0/orders",
            "/v1/skus/a/b/orders",
            "/v1/skus/a.b/orders",
            "/v1/skus/wrk-0/orders/",
            "/v1/skus/wrk-0/cards",
            "/v1/skus/wrk-0",
            "//v1/skus/wrk-0/orders",
            "/v1/orders/abc",
            "/v1/skus/ünï/orders",
        ] {
            assert_eq!(order_route_sku(path), None, "{path}");
        }
    }
}
