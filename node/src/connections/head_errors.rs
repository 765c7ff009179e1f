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
//! The answer has one fixed shape: the status line, then `connection: close`,
//! `content-length: 0` and the date, and it is the last thing hyper writes on the
//! connection. Nothing the API sends ends that way (its errors carry a body, and
//! header values never hold a line break), and a bodiless 400, 414 or 431 that closes
//! the connection would deserve the JSON body anyway. What is checked on every write
//! is the last byte of the last buffer: a response ending in a body is passed through
//! after that one comparison.
//!
//! The answer may follow the end of an earlier response in the same write (a
//! pipelined request before the malformed one). Those bytes go out first, as they
//! are; the answer is replaced only once it is all that is left, and hyper is told it
//! was written once the replacement is.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use hyper::rt::{Read, ReadBufCursor, Write};

use crate::api::error::ApiError;
use crate::api::request_metrics::MALFORMED_HEAD;
use crate::metrics::HTTP_REQUESTS;

/// Between the status line and the date in hyper's answer.
const HEADERS_BEFORE_DATE: &[u8] = b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ";
/// An IMF-fixdate, as hyper writes it: `Fri, 27 Nov 2026 13:25:03 GMT`.
const DATE_LEN: usize = 29;
const HEAD_END: &[u8] = b"\r\n\r\n";

/// The answers hyper gives a head it cannot parse, by status line.
const HYPER_ANSWERS: [(&[u8], StatusCode); 3] = [
    (b"HTTP/1.1 400 Bad Request", StatusCode::BAD_REQUEST),
    (b"HTTP/1.1 414 URI Too Long", StatusCode::URI_TOO_LONG),
    (
        b"HTTP/1.1 431 Request Header Fields Too Large",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    ),
];

/// Where hyper's bodiless error answer stands in `bytes`, if `bytes` ends with one:
/// its start, and its status.
fn hyper_error_answer(bytes: &[u8]) -> Option<(usize, StatusCode)> {
    if !bytes.ends_with(HEAD_END) {
        return None;
    }
    let date_start = bytes.len().checked_sub(HEAD_END.len() + DATE_LEN)?;
    let status_line_end = date_start.checked_sub(HEADERS_BEFORE_DATE.len())?;
    if &bytes[status_line_end..date_start] != HEADERS_BEFORE_DATE {
        return None;
    }
    let before = &bytes[..status_line_end];
    HYPER_ANSWERS
        .iter()
        .find(|(status_line, _)| before.ends_with(status_line))
        .map(|(status_line, status)| (status_line_end - status_line.len(), *status))
}

/// The JSON answer sent instead of hyper's, with hyper's date.
fn replacement(status: StatusCode, date: &[u8]) -> Vec<u8> {
    let error = match status {
        StatusCode::URI_TOO_LONG => ApiError::UriTooLong,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadersTooLarge,
        _ => ApiError::MalformedHead,
    };
    debug_assert_eq!(error.status(), status);
    let body = error.body_json();
    let mut answer = Vec::with_capacity(160 + body.len());
    answer.extend_from_slice(b"HTTP/1.1 ");
    answer.extend_from_slice(status.as_str().as_bytes());
    answer.push(b' ');
    answer.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    answer.extend_from_slice(b"\r\ncontent-type: application/json\r\nconnection: close\r\n");
    answer.extend_from_slice(format!("content-length: {}\r\ndate: ", body.len()).as_bytes());
    answer.extend_from_slice(date);
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
            // hyper writes its answer into its head buffer as one piece, and writes
            // nothing after it: it can only be at the end of the last buffer.
            let Some((last, tail)) = bufs
                .iter()
                .enumerate()
                .rev()
                .find(|(_, buf)| !buf.is_empty())
            else {
                return this.io.poll_write_vectored(cx, bufs);
            };
            let Some((start, status)) = hyper_error_answer(tail) else {
                return this.io.poll_write_vectored(cx, bufs);
            };
            if last > 0 || start > 0 {
                // Earlier responses' bytes first, as they are: hyper hands back the
                // rest, and the answer comes round again once it is all that is left.
                let mut before: Vec<IoSlice<'_>> = bufs[..last].to_vec();
                before.push(IoSlice::new(&tail[..start]));
                return this.io.poll_write_vectored(cx, &before);
            }
            let date_start = tail.len() - HEAD_END.len() - DATE_LEN;
            let answer = replacement(status, &tail[date_start..date_start + DATE_LEN]);
            ::metrics::counter!(HTTP_REQUESTS, "route" => MALFORMED_HEAD, "status" => status.as_str().to_owned())
                .increment(1);
            tracing::debug!(
                status = status.as_u16(),
                "request head hyper could not parse; answered with a JSON error and closed"
            );
            *this.replacing = Some(Replacing {
                answer,
                written: 0,
                hyper_len: tail.len(),
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
        *this.replacing = None;
        Poll::Ready(Ok(hyper_len))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    const DATE: &[u8] = b"Fri, 27 Nov 2026 13:25:03 GMT";

    fn hyper_answer(status_line: &str) -> Vec<u8> {
        let mut bytes = status_line.as_bytes().to_vec();
        bytes.extend_from_slice(b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ");
        bytes.extend_from_slice(DATE);
        bytes.extend_from_slice(b"\r\n\r\n");
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
    /// is taken off the front, and the rest offered again.
    fn write_all(bufs: &[&[u8]], per_write: usize) -> Vec<u8> {
        let written = Arc::new(Mutex::new(Vec::new()));
        let mut io = JsonHeadErrors::new(Trickle {
            written: Arc::clone(&written),
            per_write,
            calls: 0,
        });
        let mut remaining: Vec<Vec<u8>> = bufs.iter().map(|b| b.to_vec()).collect();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..100_000 {
            remaining.retain(|b| !b.is_empty());
            if remaining.is_empty() {
                return std::mem::take(&mut *written.lock().unwrap());
            }
            let slices: Vec<IoSlice<'_>> = remaining.iter().map(|b| IoSlice::new(b)).collect();
            match Pin::new(&mut io).poll_write_vectored(&mut cx, &slices) {
                Poll::Pending => continue,
                Poll::Ready(result) => {
                    let mut n = result.expect("the test socket does not fail");
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

    #[test]
    fn each_of_hypers_answers_is_recognised() {
        for (status_line, status) in HYPER_ANSWERS {
            let answer = hyper_answer(std::str::from_utf8(status_line).unwrap());
            assert_eq!(hyper_error_answer(&answer), Some((0, status)));
            let mut after_another = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
            let start = after_another.len();
            after_another.extend_from_slice(&answer);
            assert_eq!(hyper_error_answer(&after_another), Some((start, status)));
        }
    }

    #[test]
    fn the_apis_own_answers_are_not_taken_for_hypers() {
        let bodiless_ok = hyper_answer("HTTP/1.1 200 OK");
        let own_error = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 2\r\ndate: Fri, 27 Nov 2026 13:25:03 GMT\r\n\r\n{}";
        let head_of_a_head_request =
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 60\r\ndate: Fri, 27 Nov 2026 13:25:03 GMT\r\n\r\n";
        for bytes in [
            &bodiless_ok[..],
            own_error,
            head_of_a_head_request,
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
    fn hypers_answer_leaves_as_json_with_its_status_and_date() {
        for (status_line, status) in HYPER_ANSWERS {
            let answer = hyper_answer(std::str::from_utf8(status_line).unwrap());
            for per_write in [1, 7, 4096] {
                let sent = write_all(&[&answer], per_write);
                let (head, body) = split_answer(&sent);
                assert!(
                    head.starts_with(&format!("HTTP/1.1 {} ", status.as_str())),
                    "{head}"
                );
                assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
                assert!(
                    head.contains("\r\ncontent-type: application/json\r\n"),
                    "{head}"
                );
                assert!(head.ends_with(&format!("date: {}", std::str::from_utf8(DATE).unwrap())));
                let expected = match status {
                    StatusCode::URI_TOO_LONG => "uri_too_long",
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
                    _ => "invalid_request",
                };
                assert_eq!(body["error"], expected);
                assert!(!body["message"].as_str().unwrap().is_empty());
            }
        }
    }

    #[test]
    fn earlier_responses_go_out_unchanged_before_the_replacement() {
        let earlier_head =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n";
        let earlier_body = b"{\"status\":\"ok\"}";
        let mut heads = earlier_head.to_vec();
        heads.extend_from_slice(earlier_body);
        heads.extend_from_slice(&hyper_answer("HTTP/1.1 400 Bad Request"));
        for per_write in [1, 5, 4096] {
            // In one buffer, and with the earlier response's body queued apart.
            for bufs in [
                vec![&heads[..]],
                vec![
                    &earlier_head[..],
                    &earlier_body[..],
                    &heads[earlier_head.len() + earlier_body.len()..],
                ],
            ] {
                let sent = write_all(&bufs, per_write);
                let earlier_len = earlier_head.len() + earlier_body.len();
                assert_eq!(&sent[..earlier_len], &heads[..earlier_len]);
                let (head, body) = split_answer(&sent[earlier_len..]);
                assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
                assert_eq!(body["error"], "invalid_request");
            }
        }
    }

    proptest::proptest! {
        /// Any bytes: no panic, and a match is always hyper's whole answer at the end.
        #[test]
        fn a_match_is_a_whole_answer_at_the_end(
            before in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            status in 0..4usize,
            cut in 0..120usize,
        ) {
            let mut bytes = before.clone();
            if let Some((status_line, _)) = HYPER_ANSWERS.get(status) {
                bytes.extend_from_slice(&hyper_answer(std::str::from_utf8(status_line).unwrap()));
            }
            let whole = bytes.len();
            bytes.truncate(whole.saturating_sub(cut));
            match hyper_error_answer(&bytes) {
                Some((start, found)) => {
                    proptest::prop_assert!(bytes[start..].starts_with(b"HTTP/1.1 "));
                    proptest::prop_assert!(bytes.ends_with(HEAD_END));
                    if cut == 0 && status < HYPER_ANSWERS.len() {
                        proptest::prop_assert_eq!(found, HYPER_ANSWERS[status].1);
                    }
                }
                None => proptest::prop_assert!(cut > 0 || status == HYPER_ANSWERS.len()),
            }
        }
    }

    #[test]
    fn other_writes_pass_through_untouched() {
        let response = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(write_all(&[&response[..]], 3), response);
        let bodiless = hyper_answer("HTTP/1.1 200 OK");
        assert_eq!(write_all(&[&bodiless[..]], 4096), bodiless);
    }
}
