//! hyper's own answers to request heads it cannot parse, sent in the API's error shape.
//!
//! A request line or header hyper cannot parse, a request target past its limit, or
//! more headers or a longer head than it takes never reaches the API: hyper answers
//! it itself (400, 414 or 431) with no body, and closes the connection. hyper has no
//! hook to change that answer, and every other client mistake gets the contract's
//! JSON error, so [`JsonHeadErrors`] sits between hyper and the socket, recognises
//! that answer in what hyper writes, and sends the same status with a JSON body
//! (`invalid_request`, `uri_too_long`, `headers_too_large`) in its place.
//!
//! The answer has one fixed shape: the status line, `connection: close` (left out
//! after an HTTP/1.0 request, where closing is the default), `content-length: 0` and
//! the date, and it is the last thing hyper writes on the connection. Nothing the API
//! sends ends that way (its errors carry a body, and header values never hold a line
//! break), and a bodiless 400, 414 or 431 would deserve the JSON body anyway. What is
//! checked on every write is the end of the last buffer: a response ending in a body
//! is passed through after one comparison.
//!
//! Should the answer follow the end of an earlier response in the same write (hyper
//! flushes a response before it reads the next head, but not always: after draining
//! a request body the handler left unread it may read on first), those bytes go out
//! first, as they are; the answer is replaced only once it is all that is left, and
//! hyper is told it was written once the replacement is. Where hyper would put its
//! answer ahead of a body still queued, it is not at the end of the write: it goes
//! out as hyper wrote it.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use hyper::rt::{Read, ReadBufCursor, Write};

use crate::api::error::ApiError;
use crate::api::request_metrics::MALFORMED_HEAD;
use crate::metrics::HTTP_REQUESTS;

/// After the status line: `connection: close`, which hyper leaves out when the
/// connection's last request was HTTP/1.0.
const CONNECTION_CLOSE: &[u8] = b"\r\nconnection: close";
/// Then the length and the date.
const LENGTH_AND_DATE: &[u8] = b"\r\ncontent-length: 0\r\ndate: ";
/// An IMF-fixdate, as hyper writes it: `Fri, 27 Nov 2026 13:25:03 GMT`.
const DATE_LEN: usize = 29;
const HEAD_END: &[u8] = b"\r\n\r\n";

/// The version hyper answers with: the connection's last request's.
const VERSIONS: [&[u8]; 2] = [b"HTTP/1.1", b"HTTP/1.0"];
/// The statuses hyper gives a head it cannot parse.
const STATUSES: [(&[u8], StatusCode); 3] = [
    (b" 400 Bad Request", StatusCode::BAD_REQUEST),
    (b" 414 URI Too Long", StatusCode::URI_TOO_LONG),
    (
        b" 431 Request Header Fields Too Large",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    ),
];

/// hyper's bodiless error answer, found at the end of a write.
#[derive(Debug, PartialEq)]
struct HyperAnswer {
    /// Where it starts in the buffer.
    start: usize,
    version: &'static [u8],
    status: StatusCode,
    date: std::ops::Range<usize>,
}

/// hyper's bodiless error answer, if `bytes` ends with one.
fn hyper_error_answer(bytes: &[u8]) -> Option<HyperAnswer> {
    if !bytes.ends_with(HEAD_END) {
        return None;
    }
    let date_start = bytes.len().checked_sub(HEAD_END.len() + DATE_LEN)?;
    let mut status_line_end = date_start.checked_sub(LENGTH_AND_DATE.len())?;
    if &bytes[status_line_end..date_start] != LENGTH_AND_DATE {
        return None;
    }
    if bytes[..status_line_end].ends_with(CONNECTION_CLOSE) {
        status_line_end -= CONNECTION_CLOSE.len();
    }
    let (reason, status) = STATUSES
        .iter()
        .find(|(reason, _)| bytes[..status_line_end].ends_with(reason))?;
    let version_end = status_line_end - reason.len();
    let version = VERSIONS
        .iter()
        .find(|version| bytes[..version_end].ends_with(version))?;
    Some(HyperAnswer {
        start: version_end - version.len(),
        version,
        status: *status,
        date: date_start..date_start + DATE_LEN,
    })
}

/// The JSON answer sent instead of hyper's, with its version, status and date.
fn replacement(found: &HyperAnswer, bytes: &[u8]) -> Vec<u8> {
    let error = match found.status {
        StatusCode::URI_TOO_LONG => ApiError::UriTooLong,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadersTooLarge,
        _ => ApiError::MalformedHead,
    };
    debug_assert_eq!(error.status(), found.status);
    let body = error.body_json();
    let mut answer = Vec::with_capacity(160 + body.len());
    answer.extend_from_slice(found.version);
    answer.push(b' ');
    answer.extend_from_slice(found.status.as_str().as_bytes());
    answer.push(b' ');
    answer.extend_from_slice(found.status.canonical_reason().unwrap_or("").as_bytes());
    // Said for HTTP/1.0 too: hyper closes the connection either way.
    answer.extend_from_slice(b"\r\ncontent-type: application/json\r\nconnection: close\r\n");
    answer.extend_from_slice(format!("content-length: {}\r\ndate: ", body.len()).as_bytes());
    answer.extend_from_slice(&bytes[found.date.clone()]);
    answer.extend_from_slice(HEAD_END);
    answer.extend_from_slice(&body);
    answer
}

/// The replacement being written.
struct Replacing {
    answer: Vec<u8>,
    written: usize,
    /// The length of hyper's answer, reported written once `answer` is.
    hyper_len: usize,
}

pin_project_lite::pin_project! {
    /// A connection's I/O as hyper sees it, with hyper's bodiless answers to
    /// unparsable heads given a JSON body (see the module doc). Reads pass through.
    pub struct JsonHeadErrors<T> {
        #[pin]
        io: T,
        replacing: Option<Replacing>,
    }
}

impl<T> JsonHeadErrors<T> {
    pub fn new(io: T) -> Self {
        JsonHeadErrors {
            io,
            replacing: None,
        }
    }
}

impl<T: Read> Read for JsonHeadErrors<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: Write> Write for JsonHeadErrors<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut this = self.project();
        if this.replacing.is_none() {
            // hyper writes its answer into its head buffer as one piece, once its
            // queue of earlier bodies is empty, and writes nothing after it: it can
            // only be at the end of the last buffer.
            let Some((last, last_buf)) = bufs
                .iter()
                .enumerate()
                .rev()
                .find(|(_, buf)| !buf.is_empty())
            else {
                return this.io.poll_write_vectored(cx, bufs);
            };
            let Some(found) = hyper_error_answer(last_buf) else {
                return this.io.poll_write_vectored(cx, bufs);
            };
            if found.start > 0 || bufs[..last].iter().any(|buf| !buf.is_empty()) {
                // Earlier responses' bytes first, as they are: hyper hands back the
                // rest, and the answer comes round again once it is all that is left.
                let mut before: Vec<IoSlice<'_>> = bufs[..last].to_vec();
                before.push(IoSlice::new(&last_buf[..found.start]));
                return this.io.poll_write_vectored(cx, &before);
            }
            let answer = replacement(&found, last_buf);
            // Counted here, with no duration: there is no request whose time to take.
            ::metrics::counter!(HTTP_REQUESTS, "route" => MALFORMED_HEAD, "status" => found.status.as_str().to_owned())
                .increment(1);
            tracing::debug!(
                status = found.status.as_u16(),
                "request head hyper could not parse; answering with a JSON error, then closing"
            );
            *this.replacing = Some(Replacing {
                answer,
                written: 0,
                hyper_len: last_buf.len(),
            });
        }
        let replacing = this
            .replacing
            .as_mut()
            .expect("a replacement is being written");
        while replacing.written < replacing.answer.len() {
            let n = ready!(this
                .io
                .as_mut()
                .poll_write(cx, &replacing.answer[replacing.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            replacing.written += n;
        }
        let hyper_len = replacing.hyper_len;
        // hyper offers its unadvanced buffer again after a Pending, never another.
        debug_assert_eq!(
            bufs.iter().map(|buf| buf.len()).sum::<usize>(),
            hyper_len,
            "hyper offered other bytes while its answer was being replaced"
        );
        *this.replacing = None;
        Poll::Ready(Ok(hyper_len))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes the socket only once its own buffer is written, and its
        // answer is reported written only once the replacement is.
        debug_assert!(self.replacing.is_none(), "flushed mid-replacement");
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        debug_assert!(self.replacing.is_none(), "shut down mid-replacement");
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DATE: &[u8] = b"Fri, 27 Nov 2026 13:25:03 GMT";

    /// hyper's answer, as it writes it after a request of `version`.
    fn hyper_answer(version: &[u8], reason: &[u8]) -> Vec<u8> {
        let mut bytes = version.to_vec();
        bytes.extend_from_slice(reason);
        if version == b"HTTP/1.1" {
            bytes.extend_from_slice(CONNECTION_CLOSE);
        }
        bytes.extend_from_slice(LENGTH_AND_DATE);
        bytes.extend_from_slice(DATE);
        bytes.extend_from_slice(HEAD_END);
        bytes
    }

    /// A socket that takes at most `per_write` bytes a call and is not ready every
    /// other call, keeping what it was given.
    struct Trickle {
        written: Arc<Mutex<Vec<u8>>>,
        per_write: usize,
        calls: usize,
    }

    impl Read for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: ReadBufCursor<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Write for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.per_write);
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes `bufs` through the adapter as hyper does: what a call reports written
    /// is taken off the front, and the rest offered again, empty buffers included.
    fn write_all(bufs: &[&[u8]], per_write: usize) -> Vec<u8> {
        let written = Arc::new(Mutex::new(Vec::new()));
        let mut io = JsonHeadErrors::new(Trickle {
            written: Arc::clone(&written),
            per_write,
            calls: 0,
        });
        let mut remaining: Vec<Vec<u8>> = bufs.iter().map(|b| b.to_vec()).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..100_000 {
            if remaining.iter().all(|b| b.is_empty()) {
                return std::mem::take(&mut *written.lock().unwrap());
            }
            let slices: Vec<IoSlice<'_>> = remaining.iter().map(|b| IoSlice::new(b)).collect();
            match Pin::new(&mut io).poll_write_vectored(&mut cx, &slices) {
                Poll::Pending => continue,
                Poll::Ready(result) => {
                    let mut n = result.expect("the test socket does not fail");
                    assert!(n > 0, "a write of nothing would end the connection");
                    for buf in &mut remaining {
                        let taken = n.min(buf.len());
                        buf.drain(..taken);
                        n -= taken;
                    }
                    assert_eq!(n, 0, "reported more written than was offered");
                }
            }
        }
        panic!("the writes did not finish");
    }

    /// The head and JSON body of one answer, its length checked.
    fn split_answer(bytes: &[u8]) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length, "content-length matches the body");
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    fn code_of(status: StatusCode) -> &'static str {
        match status {
            StatusCode::URI_TOO_LONG => "uri_too_long",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
            _ => "invalid_request",
        }
    }

    #[test]
    fn each_of_hypers_answers_is_recognised_after_either_version() {
        for version in VERSIONS {
            for (reason, status) in STATUSES {
                let answer = hyper_answer(version, reason);
                let found = hyper_error_answer(&answer).expect("recognised");
                assert_eq!(
                    (found.start, found.version, found.status),
                    (0, version, status)
                );
                assert_eq!(&answer[found.date], DATE);
                let mut after_another = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
                let start = after_another.len();
                after_another.extend_from_slice(&answer);
                let found = hyper_error_answer(&after_another).expect("recognised");
                assert_eq!((found.start, found.status), (start, status));
            }
        }
    }

    #[test]
    fn the_apis_own_answers_are_not_taken_for_hypers() {
        let bodiless_ok = hyper_answer(b"HTTP/1.1", b" 200 OK");
        let own_error = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 2\r\ndate: Fri, 27 Nov 2026 13:25:03 GMT\r\n\r\n{}";
        let head_of_a_head_request =
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 60\r\ndate: Fri, 27 Nov 2026 13:25:03 GMT\r\n\r\n";
        let unknown_version = hyper_answer(b"HTTP/2.0", b" 400 Bad Request");
        for bytes in [
            &bodiless_ok[..],
            own_error,
            head_of_a_head_request,
            &unknown_version,
            b"",
            b"\r\n\r\n",
        ] {
            assert_eq!(
                hyper_error_answer(bytes),
                None,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn hypers_answer_leaves_as_json_with_its_version_status_and_date() {
        for version in VERSIONS {
            for (reason, status) in STATUSES {
                let answer = hyper_answer(version, reason);
                for per_write in [1, 7, 4096] {
                    let sent = write_all(&[&answer], per_write);
                    let (head, body) = split_answer(&sent);
                    let status_line = format!(
                        "{} {} {}\r\n",
                        std::str::from_utf8(version).unwrap(),
                        status.as_str(),
                        status.canonical_reason().unwrap()
                    );
                    assert!(head.starts_with(&status_line), "{head}");
                    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
                    assert!(
                        head.contains("\r\ncontent-type: application/json\r\n"),
                        "{head}"
                    );
                    assert!(
                        head.ends_with(&format!("date: {}", std::str::from_utf8(DATE).unwrap()))
                    );
                    assert_eq!(body["error"], code_of(status));
                    assert!(!body["message"].as_str().unwrap().is_empty());
                }
            }
        }
    }

    #[test]
    fn earlier_bytes_go_out_unchanged_before_the_replacement() {
        let earlier = b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}";
        let answer = hyper_answer(b"HTTP/1.1", b" 400 Bad Request");
        let mut both = earlier.to_vec();
        both.extend_from_slice(&answer);
        for per_write in [1, 5, 4096] {
            // In one buffer (hyper's flattened writes), and behind empty buffers.
            for (bufs, earlier_len) in [
                (vec![&both[..]], earlier.len()),
                (vec![&[][..], &[][..], &answer[..]], 0),
            ] {
                let sent = write_all(&bufs, per_write);
                assert_eq!(&sent[..earlier_len], &both[..earlier_len]);
                let (head, body) = split_answer(&sent[earlier_len..]);
                assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
                assert_eq!(body["error"], "invalid_request");
            }
        }
    }

    #[test]
    fn other_writes_pass_through_untouched() {
        let response = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(write_all(&[&response[..]], 3), response);
        let bodiless = hyper_answer(b"HTTP/1.1", b" 200 OK");
        assert_eq!(write_all(&[&bodiless[..]], 4096), bodiless);
    }

    /// hyper itself, over an in-memory pipe: a malformed head and one with too many
    /// headers, each pipelined behind a sound request, and one after an HTTP/1.0
    /// keep-alive request (where hyper's answer has no `connection: close`). The pipe
    /// takes one buffer a write, so hyper flattens its writes unless told to queue
    /// them (`writev`), as it does over TCP: both are run.
    #[tokio::test]
    async fn hypers_own_answers_are_replaced_on_a_real_connection() {
        let cases: [(&[u8], &str, &str, &str); 3] = [
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX-Odd: \x7f\r\n\r\n",
                "HTTP/1.1 200 OK\r\n",
                "HTTP/1.1 400 Bad Request\r\n",
                "invalid_request",
            ),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGARBAGE\r\n\r\n",
                "HTTP/1.0 200 OK\r\n",
                "HTTP/1.0 400 Bad Request\r\n",
                "invalid_request",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX-1: a\r\nX-2: a\r\nX-3: a\r\n\r\n",
                "HTTP/1.1 200 OK\r\n",
                "HTTP/1.1 431 Request Header Fields Too Large\r\n",
                "headers_too_large",
            ),
        ];
        for ((sent, first, second, code), queued) in cases
            .into_iter()
            .flat_map(|case| [(case, false), (case, true)])
        {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.max_headers(3).writev(queued);
            let service = hyper::service::service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(axum::http::Response::new(
                    axum::body::Body::from(r#"{"status":"ok"}"#),
                ))
            });
            let connection = http.serve_connection(
                JsonHeadErrors::new(hyper_util::rt::TokioIo::new(server)),
                service,
            );
            let served = tokio::spawn(connection);
            client.write_all(sent).await.unwrap();
            let mut received = Vec::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                client.read_to_end(&mut received),
            )
            .await
            .expect("the connection closes")
            .unwrap();
            let _ = served.await;
            let text = String::from_utf8_lossy(&received).into_owned();
            assert!(text.starts_with(first), "{text}");
            let second_at = text.find(second).unwrap_or_else(|| panic!("{text}"));
            assert!(text[..second_at].ends_with(r#"{"status":"ok"}"#), "{text}");
            let (head, body) = split_answer(&received[second_at..]);
            assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
            assert_eq!(body["error"], code, "{text}");
        }
    }

    proptest::proptest! {
        /// Any bytes, then perhaps hyper's answer, cut short or not: no panic; a
        /// whole answer is found exactly where it starts, and a cut one never.
        #[test]
        fn only_a_whole_answer_at_the_end_is_found(
            before in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            version in 0..VERSIONS.len(),
            status in 0..=STATUSES.len(),
            cut in 0..120usize,
        ) {
            let mut bytes = before.clone();
            if let Some((reason, _)) = STATUSES.get(status) {
                bytes.extend_from_slice(&hyper_answer(VERSIONS[version], reason));
            }
            let whole = bytes.len();
            bytes.truncate(whole.saturating_sub(cut));
            let found = hyper_error_answer(&bytes);
            if cut == 0 && status < STATUSES.len() {
                let found = found.expect("a whole answer is found");
                proptest::prop_assert_eq!(found.start, before.len());
                proptest::prop_assert_eq!(found.status, STATUSES[status].1);
            } else if let Some(found) = found {
                // Only by chance, from the random bytes: still a whole answer.
                proptest::prop_assert!(bytes[found.start..].starts_with(b"HTTP/1."));
                proptest::prop_assert!(bytes.ends_with(HEAD_END));
            }
        }
    }
}
