//! Request pieces parsed once, at the edge, into the engine's types, with every
//! failure answered by an [`ApiError`] (axum's own rejections are plain text).

use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName};
use hyper::body::Frame;
use keydrop_engine::{OrderId, SkuId};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// A request body read frame by frame, refusing to go past `limit_bytes`. Routed
/// requests have axum's boxed [`Body`]; an order dispatched ahead of the router reads
/// hyper's own body, unboxed.
///
/// With a `time_limit`, a body that does not come in time is answered 408
/// `request_timeout`: read whole ([`read_body`]), all of it within the limit; read
/// as it streams or gathered by parts (a card import), each part within it. An order holds an order slot
/// once its body is in and a connection inside a request is never closed as idle,
/// so a client trickling a body must not keep its connection (and buffers) for good.
pub struct LimitedBody<B = Body> {
    body: B,
    limit_bytes: usize,
    read_bytes: usize,
    time_limit: Option<Duration>,
    /// Reset after each part when streaming; kept across parts when read whole.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    single_deadline: bool,
    /// The declared `Content-Length`, within the limit: room made for it at once
    /// when a body comes in parts, instead of doubling up to it.
    declared_bytes: Option<usize>,
}

impl<B> LimitedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// Refuses at once when the declared `Content-Length` is over the limit. Read as
    /// it streams, each part within `time_limit`.
    pub fn new(
        headers: &HeaderMap,
        body: B,
        limit_bytes: usize,
        time_limit: Option<Duration>,
    ) -> Result<Self, ApiError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit_bytes as u64) {
            return Err(ApiError::PayloadTooLarge { limit_bytes });
        }
        Ok(LimitedBody {
            body,
            limit_bytes,
            read_bytes: 0,
            time_limit,
            deadline: None,
            single_deadline: false,
            declared_bytes: declared.map(|len| len as usize),
        })
    }

    /// The next chunk of data, `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ApiError> {
        loop {
            let frame = next_frame_by(&mut self.body, &mut self.deadline, self.time_limit).await?;
            if !self.single_deadline {
                self.deadline = None;
            }
            let Some(frame) = frame else { return Ok(None) };
            let frame =
                frame.map_err(|e| ApiError::invalid(format!("reading the request body: {e}")))?;
            // Trailers carry no data; skip them.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.read_bytes += data.len();
            if self.read_bytes > self.limit_bytes {
                return Err(ApiError::PayloadTooLarge {
                    limit_bytes: self.limit_bytes,
                });
            }
            return Ok(Some(data));
        }
    }

    /// The whole body, up to the limit, all of it within the time limit.
    pub async fn collect(mut self) -> Result<Bytes, ApiError> {
        self.single_deadline = true;
        self.gather().await
    }

    /// The whole body, up to the limit, each part within the time limit: a JSON card
    /// import is checked whole before any card is taken, but up to 64 MiB comes in
    /// at the pace of the operator's link, as a CSV import streams.
    pub async fn collect_timed_per_part(self) -> Result<Bytes, ApiError> {
        self.gather().await
    }

    async fn gather(mut self) -> Result<Bytes, ApiError> {
        let Some(first) = self.next_chunk().await? else {
            return Ok(Bytes::new());
        };
        // Small bodies arrive in one frame: keep it without copying.
        let Some(second) = self.next_chunk().await? else {
            return Ok(first);
        };
        let mut all =
            Vec::with_capacity((first.len() + second.len()).max(self.declared_bytes.unwrap_or(0)));
        all.extend_from_slice(&first);
        all.extend_from_slice(&second);
        while let Some(chunk) = self.next_chunk().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(all))
    }
}

/// The body's next frame, or, with a `limit`, 408 once `deadline` (set to `limit`
/// from now the first time the body makes the reader wait) has passed. A body
/// already buffered (nearly every order: it comes in the packet of its head) is taken
/// without making a timer: the timer is boxed and made only when needed, so the
/// common case carries a pointer, not a `Sleep`.
async fn next_frame_by<B: HttpBody + Unpin>(
    body: &mut B,
    deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Option<Duration>,
) -> Result<Option<Result<Frame<B::Data>, B::Error>>, ApiError> {
    poll_fn(|cx| {
        if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
            return Poll::Ready(Ok(frame));
        }
        let Some(limit) = limit else {
            return Poll::Pending;
        };
        deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)))
            .as_mut()
            .poll(cx)
            .map(|()| Err(ApiError::RequestTimeout { limit }))
    })
    .await
}

/// Reads the whole body (up to `limit_bytes`, all of it within `time_limit`).
pub async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit_bytes: usize,
    time_limit: Option<Duration>,
) -> Result<Bytes, ApiError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    LimitedBody::new(headers, body, limit_bytes, time_limit)?
        .collect()
        .await
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

/// An optional header as UTF-8 text; present but not text is a client mistake.
pub fn header_text<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'h str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::invalid(format!("header {name} must be visible ASCII"))),
    }
}

async fn path_param<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<String, ApiError> {
    Path::<String>::from_request_parts(parts, state)
        .await
        .map(|Path(value)| value)
        .map_err(|rejection| ApiError::invalid(rejection.body_text()))
}

/// The `{sku}` path segment; an invalid id is a 400.
pub struct SkuPath(pub SkuId);

impl<S: Send + Sync> FromRequestParts<S> for SkuPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        SkuPath::parse(path_param(parts, state).await?)
    }
}

impl SkuPath {
    /// A SKU id from its path segment, decoded.
    pub fn parse(segment: impl AsRef<str>) -> Result<Self, ApiError> {
        SkuId::parse(segment)
            .map(SkuPath)
            .map_err(ApiError::invalid)
    }
}

/// The `{order_id}` path segment. A malformed id is answered like an unknown one
/// (404), so probing tells nothing about the id format beyond what is public.
pub struct OrderPath(pub OrderId);

impl<S: Send + Sync> FromRequestParts<S> for OrderPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = path_param(parts, state)
            .await
            .map_err(|_| ApiError::OrderNotFound)?;
        raw.parse()
            .map(OrderPath)
            .map_err(|_| ApiError::OrderNotFound)
    }
}

/// Proof that the request carried the admin bearer token.
pub struct Admin;

/// Digest of a token, so that comparing two takes the same time whatever their
/// lengths and contents.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The token of an `Authorization: Bearer <token>` value. The scheme's name is
/// case-insensitive (RFC 9110, 11.1), and blanks around the token are not part of it.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let scheme_end = value.iter().position(|&b| b == b' ' || b == b'\t')?;
    let (scheme, rest) = value.split_at(scheme_end);
    let token = rest.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"Bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer_token(v.as_bytes()))
            .ok_or(ApiError::Unauthorized)?;
        let presented = token_digest(presented);
        if bool::from(presented.ct_eq(&state.admin_token_digest)) {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// The client's IP as admission accounts it (see [`crate::admission`]).
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| *addr)
            .ok_or_else(|| {
                ApiError::Internal("the server was started without peer addresses".into())
            })?;
        Ok(ClientIp(state.admission.client_ip(peer, &parts.headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(chunks: &[&'static [u8]]) -> Body {
        let mut all = Vec::new();
        for chunk in chunks {
            all.extend_from_slice(chunk);
        }
        Body::from(all)
    }

    #[tokio::test]
    async fn limits_are_enforced_declared_or_not() {
        let mut headers = HeaderMap::new();
        let read = read_body(&headers, body_of(&[b"0123456789"]), 10, None)
            .await
            .unwrap();
        assert_eq!(&read[..], b"0123456789");
        let over = read_body(&headers, body_of(&[b"0123456789x"]), 10, None).await;
        assert!(matches!(
            over,
            Err(ApiError::PayloadTooLarge { limit_bytes: 10 })
        ));
        // A declared length over the limit is refused before reading anything.
        headers.insert(header::CONTENT_LENGTH, "1000000".parse().unwrap());
        let declared = LimitedBody::new(&headers, Body::empty(), 10, None);
        assert!(matches!(declared, Err(ApiError::PayloadTooLarge { .. })));
        assert!(read_body(&HeaderMap::new(), Body::empty(), 10, None)
            .await
            .unwrap()
            .is_empty());
    }

    /// A body that sends its frames `every` apart (paused time), the first at once
    /// when `every` is zero; then ends, or with `stall`, never sends again.
    struct Scripted {
        every: Duration,
        frames: usize,
        stall: bool,
        next: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl Scripted {
        fn trickling(frames: usize) -> Self {
            Scripted {
                every: Duration::from_secs(1),
                frames,
                stall: false,
                next: None,
            }
        }

        fn stalling_after(frames: usize) -> Self {
            Scripted {
                every: Duration::ZERO,
                frames,
                stall: true,
                next: None,
            }
        }
    }

    impl HttpBody for Scripted {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.frames == 0 {
                return if self.stall {
                    Poll::Pending
                } else {
                    Poll::Ready(None)
                };
            }
            if !self.every.is_zero() {
                let every = self.every;
                let tick = self
                    .next
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
                std::task::ready!(tick.as_mut().poll(cx));
                self.next = None;
            }
            self.frames -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_come_in_time_is_refused() {
        let limit = Duration::from_millis(1_500);
        let started = tokio::time::Instant::now();
        let silent = read_body(
            &HeaderMap::new(),
            Scripted::stalling_after(0),
            100,
            Some(limit),
        )
        .await;
        assert!(matches!(
            silent,
            Err(ApiError::RequestTimeout { limit: l }) if l == limit
        ));
        assert_eq!(started.elapsed(), limit);
        // Read whole, the limit is on all of it: a byte every second does not reset it.
        let started = tokio::time::Instant::now();
        let trickled =
            read_body(&HeaderMap::new(), Scripted::trickling(10), 100, Some(limit)).await;
        assert!(matches!(trickled, Err(ApiError::RequestTimeout { .. })));
        assert_eq!(started.elapsed(), limit);
        // Streamed (an import), the limit is on each part: the same body comes in.
        let mut streamed =
            LimitedBody::new(&HeaderMap::new(), Scripted::trickling(10), 100, Some(limit)).unwrap();
        let mut parts = 0;
        while streamed.next_chunk().await.unwrap().is_some() {
            parts += 1;
        }
        assert_eq!(parts, 10);
        // Gathered whole but timed by part (a JSON import): the same body comes in.
        let gathered =
            LimitedBody::new(&HeaderMap::new(), Scripted::trickling(10), 100, Some(limit))
                .unwrap()
                .collect_timed_per_part()
                .await
                .unwrap();
        assert_eq!(&gathered[..], b"xxxxxxxxxx");
        let stalled_gathered = LimitedBody::new(
            &HeaderMap::new(),
            Scripted::stalling_after(3),
            100,
            Some(limit),
        )
        .unwrap()
        .collect_timed_per_part()
        .await;
        assert!(matches!(
            stalled_gathered,
            Err(ApiError::RequestTimeout { .. })
        ));
        // A part that does not come in time ends the stream with 408 all the same.
        let mut stalled = LimitedBody::new(
            &HeaderMap::new(),
            Scripted::stalling_after(1),
            100,
            Some(limit),
        )
        .unwrap();
        assert!(stalled.next_chunk().await.unwrap().is_some());
        assert!(matches!(
            stalled.next_chunk().await,
            Err(ApiError::RequestTimeout { .. })
        ));
        // A body already in is read without any wait.
        let started = tokio::time::Instant::now();
        let whole = read_body(&HeaderMap::new(), body_of(&[b"{}"]), 100, Some(limit))
            .await
            .unwrap();
        assert_eq!(&whole[..], b"{}");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        for value in [
            &b"Bearer tok-1"[..],
            b"bearer tok-1",
            b"BEARER  tok-1 ",
            b"Bearer\ttok-1",
        ] {
            assert_eq!(
                bearer_token(value),
                Some(&b"tok-1"[..]),
                "{}",
                String::from_utf8_lossy(value)
            );
        }
        for value in [
            &b"Basic tok-1"[..],
            b"Bearer",
            b"Bearer   ",
            b"Bearertok-1",
            b"",
        ] {
            assert_eq!(
                bearer_token(value),
                None,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn tokens_compare_by_digest() {
        assert_eq!(token_digest(b"a"), token_digest(b"a"));
        assert_ne!(token_digest(b"a"), token_digest(b"b"));
    }
}
