//! The HTTP contract under client mistakes: whatever a client sends, well-formed
//! HTTP/1.1 on any route or bytes that are not HTTP at all, the node answers below
//! 500, every 4xx in the contract's error shape, and stays healthy with its stock
//! whole.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{cards, on_sale, sign, unix_now, Node};
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

/// Requests in a sweep, and the time it may take whatever happens.
const SWEEP_REQUESTS: usize = 1_500;
const SWEEP_TIME_MAX: Duration = Duration::from_secs(60);
/// Every request is answered at once or not at all: nothing here sends a slow body.
const ANSWER_TIME_MAX: Duration = Duration::from_secs(10);
/// Failures described in full; the rest are counted.
const FAILURES_SHOWN_MAX: usize = 20;

const SKU: &str = "sweep";
const PRICE_CENTS: u64 = 100;
const CARDS: usize = 300;

/// SplitMix64, reproducible from its seed with no dependency, and how odd the
/// request being built is: each choice goes wrong one time in `oddness`. Mostly odd
/// requests are refused at the first check; mostly sound ones reach the later checks
/// and the engine.
struct Rng {
    state: u64,
    oddness: u64,
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Whether this choice goes wrong.
    fn odd(&mut self) -> bool {
        self.one_in(self.oddness)
    }
}

/// What the sweep knows and reuses: ids that exist, and the node's secrets.
struct Known {
    admin_token: String,
    payment_secret: String,
    orders: Vec<String>,
}

const ID_BYTES: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";
const HEX: &[u8] = b"0123456789abcdef";

fn random_text(rng: &mut Rng, alphabet: &[u8], len: usize) -> String {
    (0..len).map(|_| *rng.pick(alphabet) as char).collect()
}

/// Pieces of odd path segments: near misses, and what percent-decoding makes of
/// them. Escapes are always `%` and two hex digits: a request line hyper cannot parse
/// is answered by hyper, not by the node. Non-ASCII is escaped by the URL parser.
const SEGMENT_PIECES: &[&str] = &[
    "a",
    "Z",
    "9",
    "-",
    "_",
    ".",
    "..",
    "~",
    "%20",
    "%2F",
    "%2f",
    "%2D",
    "%25",
    "%00",
    "%0A",
    "%FF",
    "%C3%A9",
    "%E2%80%AE",
    "%F0%9F%A6%80",
    "%ED%A0%80",
    "%2e%2e",
    "é",
    "🦀",
    "Ω",
    "\u{202E}",
    "\u{FEFF}",
    "!",
    "$",
    "&",
    "'",
    "(",
    ")",
    "*",
    "+",
    ",",
    ";",
    "=",
    ":",
    "@",
];

#[derive(Clone, Copy, PartialEq)]
enum Segment {
    Sku,
    Order,
}

fn segment(rng: &mut Rng, known: &Known, kind: Segment) -> String {
    if !rng.odd() {
        return match kind {
            Segment::Sku if rng.one_in(8) => format!("other-{}", rng.below(4)),
            Segment::Sku => SKU.to_owned(),
            Segment::Order if !known.orders.is_empty() && !rng.one_in(8) => {
                rng.pick(&known.orders).clone()
            }
            Segment::Order => random_text(rng, HEX, 32),
        };
    }
    match rng.below(7) {
        0 => {
            let len = rng.below(70) + 1;
            random_text(rng, ID_BYTES, len)
        }
        1 => {
            let len = *rng.pick(&[31, 32, 33]);
            random_text(rng, HEX, len)
        }
        2 => random_text(rng, b"0123456789ABCDEF", 32),
        3 => String::new(),
        4 => "x".repeat(*rng.pick(&[64, 65, 129, 2_000])),
        _ => {
            let pieces = rng.below(8) + 1;
            (0..pieces).map(|_| *rng.pick(SEGMENT_PIECES)).collect()
        }
    }
}

/// A JSON string literal, valid or not: escapes, lone surrogates, raw control bytes,
/// lengths at and past the id limits.
fn odd_string(rng: &mut Rng) -> String {
    const PIECES: &[&str] = &[
        "",
        "x",
        "buyer",
        "é",
        "🦀",
        "\u{202E}",
        "\\u0000",
        "\\u001f",
        "\\ud800",
        "\\udc00",
        "\\ud83e\\udd80",
        "\\n",
        "\\t",
        "\\\"",
        "\\\\",
        "\\/",
        "\\x41",
        "\\u00e9",
        "\u{1}",
        "\t",
        " ",
        ",",
        "%00",
    ];
    let mut text = String::from("\"");
    match rng.below(6) {
        0 => text.push_str(&"u".repeat(*rng.pick(&[127, 128, 129, 1_024, 1_025]))),
        1 => text.push_str(&"é".repeat(*rng.pick(&[64, 65, 512, 513]))),
        _ => {
            for _ in 0..rng.below(6) {
                let piece = *rng.pick::<&str>(PIECES);
                text.push_str(piece);
            }
        }
    }
    text.push('"');
    text
}

/// A JSON number, or what a client may take for one.
fn odd_number(rng: &mut Rng) -> String {
    const NUMBERS: &[&str] = &[
        "0",
        "-0",
        "1",
        "-1",
        "99",
        "1.0",
        "1.5",
        "1e2",
        "1E400",
        "-1e400",
        "1e-400",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "123456789012345678901234567890",
        "00",
        "+1",
        ".5",
        "0x10",
        "NaN",
        "Infinity",
    ];
    rng.pick(NUMBERS).to_string()
}

/// Any JSON value, nested up to `depth`, now and then not JSON at all.
fn odd_value(rng: &mut Rng, depth: usize) -> String {
    match rng.below(if depth == 0 { 5 } else { 8 }) {
        0 => rng
            .pick(&["null", "true", "false", "nul", "True"])
            .to_string(),
        1 | 2 => odd_number(rng),
        3 | 4 => odd_string(rng),
        5 => {
            let items: Vec<String> = (0..rng.below(4))
                .map(|_| odd_value(rng, depth - 1))
                .collect();
            format!("[{}]", items.join(","))
        }
        6 => {
            let fields: Vec<String> = (0..rng.below(4))
                .map(|_| format!("{}:{}", odd_string(rng), odd_value(rng, depth - 1)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        _ => {
            // Around serde_json's recursion limit.
            let depth = *rng.pick(&[100, 127, 128, 129, 1_000]);
            format!("{}{}", "[".repeat(depth), "]".repeat(depth))
        }
    }
}

type FieldValue = fn(&mut Rng) -> String;

/// An object with a route's fields; when odd, a field is missing, of the wrong kind
/// or given twice, or joined by one the route does not know.
fn object(rng: &mut Rng, fields: &[(&str, FieldValue)]) -> String {
    let mut parts = Vec::new();
    for (name, value) in fields {
        if !rng.odd() {
            parts.push(format!("\"{name}\":{}", value(rng)));
            continue;
        }
        match rng.below(3) {
            0 => {}
            1 => parts.push(format!("\"{name}\":{}", odd_value(rng, 2))),
            _ => {
                parts.push(format!("\"{name}\":{}", value(rng)));
                parts.push(format!("\"{name}\":{}", value(rng)));
            }
        }
    }
    if rng.odd() {
        parts.push(format!("{}:{}", odd_string(rng), odd_value(rng, 1)));
    }
    if rng.one_in(4) {
        parts.reverse();
    }
    format!("{{{}}}", parts.join(","))
}

/// A field's value: `sound` most of the time, `odd` when this choice goes wrong.
fn either(rng: &mut Rng, sound: impl FnOnce(&mut Rng) -> String, odd: FieldValue) -> String {
    if rng.odd() {
        odd(rng)
    } else {
        sound(rng)
    }
}

fn user_id(rng: &mut Rng) -> String {
    either(
        rng,
        |rng| format!("\"buyer-{}\"", rng.below(200)),
        odd_string,
    )
}

fn payment_ref(rng: &mut Rng) -> String {
    either(
        rng,
        |rng| format!("\"pay-{}\"", rng.below(1_000)),
        odd_string,
    )
}

fn amount(rng: &mut Rng) -> String {
    either(
        rng,
        |rng| rng.pick(&["100", "100", "100", "99"]).to_string(),
        odd_number,
    )
}

fn odd_time(rng: &mut Rng) -> String {
    rng.pick(&[
        "\"2999-01-01T00:00:00Z\"",
        "\"2000-01-01T00:00:00Z\"",
        "\"1969-12-31T23:59:59Z\"",
        "\"9999-12-31T23:59:59.999Z\"",
        "\"+10000-01-01T00:00:00Z\"",
        "\"2020-02-30T00:00:00Z\"",
        "\"2020-01-01T00:00:00+24:00\"",
        "\"yesterday\"",
        "\"\"",
        "0",
    ])
    .to_string()
}

fn odd_count(rng: &mut Rng) -> String {
    rng.pick(&["0", "86401", "4294967296", "-1", "1.5", "\"3\"", "null"])
        .to_string()
}

fn sku_body(rng: &mut Rng) -> String {
    object(
        rng,
        &[
            ("name", |rng| {
                either(rng, |_| "\"Gift card\"".into(), odd_string)
            }),
            ("price_cents", amount),
            ("per_user_limit", |rng| {
                either(rng, |_| "3".into(), odd_count)
            }),
            ("per_device_limit", |rng| {
                either(rng, |rng| rng.pick(&["null", "5"]).to_string(), odd_count)
            }),
            ("reservation_ttl_secs", |rng| {
                either(rng, |_| "600".into(), odd_count)
            }),
            ("starts_at", |rng| {
                either(
                    rng,
                    |rng| rng.pick(&["null", "\"2020-01-01T00:00:00Z\""]).to_string(),
                    odd_time,
                )
            }),
            ("ends_at", |rng| {
                either(
                    rng,
                    |rng| {
                        rng.pick(&["null", "\"2999-01-01T00:00:00+01:00\""])
                            .to_string()
                    },
                    odd_time,
                )
            }),
            ("low_stock_threshold", |rng| {
                either(rng, |rng| rng.pick(&["0", "10"]).to_string(), odd_count)
            }),
        ],
    )
}

fn cards_body(rng: &mut Rng) -> String {
    object(
        rng,
        &[("cards", |rng| {
            let cards: Vec<String> = (0..rng.below(4))
                .map(|_| {
                    object(
                        rng,
                        &[
                            ("serial", |rng| {
                                either(
                                    rng,
                                    |rng| format!("\"swept-{}\"", rng.below(10_000)),
                                    odd_string,
                                )
                            }),
                            ("secret", |rng| {
                                either(rng, |rng| format!("\"s-{}\"", rng.next()), odd_string)
                            }),
                        ],
                    )
                })
                .collect();
            format!("[{}]", cards.join(","))
        })],
    )
}

fn csv_body(rng: &mut Rng) -> Vec<u8> {
    const ODD_LINES: &[&str] = &[
        "serial,secret",
        "",
        ",",
        "only-a-serial",
        ",secret-without-serial",
        "serial-without-secret,",
        "a,b,c,d",
        "\r",
        "é,🦀",
        "\u{1},x",
    ];
    let mut body = Vec::new();
    for _ in 0..rng.below(6) {
        if !rng.odd() {
            let line = format!("csv-{},secret-{}", rng.below(10_000), rng.next());
            body.extend_from_slice(line.as_bytes());
        } else {
            match rng.below(3) {
                0 => body.extend_from_slice(rng.pick(ODD_LINES).as_bytes()),
                1 => body.extend_from_slice(&vec![b'l'; *rng.pick(&[129, 1_025, 4_097])]),
                _ => body.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
            }
        }
        body.push(b'\n');
    }
    body
}

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Sku,
    CardsJson,
    CardsCsv,
    Order,
    Payment,
    Other,
}

/// A body for `route`: the shape it takes or, when odd, something else or nothing,
/// perhaps cut short. Now and then padded with blanks to the order and payment
/// limit (16 KiB) or just past it.
fn body(rng: &mut Rng, route: Route) -> Vec<u8> {
    let mut body = if rng.odd() && rng.one_in(3) {
        match rng.below(3) {
            0 => Vec::new(),
            1 => odd_value(rng, 3).into_bytes(),
            _ => (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
        }
    } else {
        match route {
            Route::Sku => sku_body(rng).into_bytes(),
            Route::CardsJson => cards_body(rng).into_bytes(),
            Route::CardsCsv => csv_body(rng),
            Route::Order => object(rng, &[("user_id", user_id)]).into_bytes(),
            Route::Payment => object(
                rng,
                &[("payment_ref", payment_ref), ("amount_cents", amount)],
            )
            .into_bytes(),
            Route::Other if rng.one_in(2) => Vec::new(),
            Route::Other => odd_value(rng, 2).into_bytes(),
        }
    };
    if rng.odd() && rng.one_in(3) && !body.is_empty() {
        let cut = rng.below(body.len());
        body.truncate(cut);
    }
    if rng.one_in(30) && body.first() == Some(&b'{') {
        let len = 16 * 1024 - 1 + rng.below(4);
        if body.len() < len {
            let padding = len - body.len();
            body.splice(1..1, std::iter::repeat_n(b' ', padding));
        }
    }
    body
}

/// A header value of printable ASCII, blanks and bytes past ASCII (obs-text, which
/// HTTP/1.1 carries but the node must not take for text).
fn header_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| match rng.below(10) {
            0 => 0x80 + (rng.next() % 0x80) as u8,
            1 => b' ',
            _ => 0x21 + (rng.next() % 0x5E) as u8,
        })
        .collect()
}

fn signature(rng: &mut Rng, known: &Known, body: &[u8]) -> Vec<u8> {
    let secret = known.payment_secret.as_bytes();
    let now = unix_now();
    if !rng.odd() {
        return sign(secret, now, body).into_bytes();
    }
    match rng.below(7) {
        0 => {
            let skew = *rng.pick(&[-301, -1, 299, 300, 301, 100_000]);
            sign(secret, now + skew, body).into_bytes()
        }
        1 => sign(b"not-the-payment-secret", now, body).into_bytes(),
        2 => {
            let other_tag = random_text(rng, HEX, 64);
            format!("{},v1={other_tag}", sign(secret, now, body)).into_bytes()
        }
        3 => {
            let t = rng.pick(&[
                "",
                "-1",
                "0",
                "abc",
                "1e9",
                "9223372036854775807",
                "-9223372036854775808",
                "99999999999999999999",
            ]);
            format!("t={t},v1={}", random_text(rng, HEX, 64)).into_bytes()
        }
        4 => rng
            .pick(&[
                "",
                "t=",
                "v1=",
                ",",
                "t=1,t=2,v1=00",
                "v1=zz,t=1",
                "t==1",
                "=",
                "t=1,v1=",
            ])
            .as_bytes()
            .to_vec(),
        5 => format!("t={now},v1={}", "a".repeat(*rng.pick(&[63, 65, 2_000]))).into_bytes(),
        _ => {
            let len = rng.below(200);
            header_bytes(rng, len)
        }
    }
}

fn odd_authorization(rng: &mut Rng, known: &Known) -> Vec<u8> {
    let token = &known.admin_token;
    match rng.below(6) {
        0 => format!("bearer \t{token} "),
        1 => format!("Bearer {token}x"),
        2 => "Bearer wrong-token-wrong-token".to_owned(),
        3 => rng
            .pick(&["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "", "Token abc"])
            .to_string(),
        _ => {
            let len = rng.below(100);
            return header_bytes(rng, len);
        }
    }
    .into_bytes()
}

const ODD_CONTENT_TYPES: &[&str] = &[
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "text/csv; charset=utf-8",
    "Text/CSV ;",
    "text/plain",
    "application/xml",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "",
    ";",
    "application/",
];

/// One request, shown in full when its answer breaks the contract.
struct Sent {
    method: Method,
    url: Url,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
}

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} {}", self.method, self.url)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {}", String::from_utf8_lossy(value.as_bytes()))?;
        }
        let shown = &self.body[..self.body.len().min(300)];
        write!(
            f,
            "body ({} bytes): {:?}",
            self.body.len(),
            String::from_utf8_lossy(shown)
        )
    }
}

fn request(rng: &mut Rng, known: &Known, base: &str) -> Option<Sent> {
    rng.oddness = *rng.pick(&[1, 2, 4, 8, 16, u64::MAX]);
    let sku = segment(rng, known, Segment::Sku);
    let order = segment(rng, known, Segment::Order);
    let (route, methods, admin, path): (Route, &[Method], bool, String) = match rng.below(16) {
        0 => (
            Route::Other,
            &[Method::GET],
            false,
            format!("/v1/skus/{sku}"),
        ),
        1 => (Route::Sku, &[Method::PUT], true, format!("/v1/skus/{sku}")),
        2 => {
            let route = *rng.pick(&[Route::CardsJson, Route::CardsCsv]);
            (
                route,
                &[Method::POST],
                true,
                format!("/v1/skus/{sku}/cards"),
            )
        }
        3..=6 => (
            Route::Order,
            &[Method::POST],
            false,
            format!("/v1/skus/{sku}/orders"),
        ),
        7 => (
            Route::Other,
            &[Method::GET, Method::DELETE],
            false,
            format!("/v1/orders/{order}"),
        ),
        8 | 9 => (
            Route::Payment,
            &[Method::POST],
            false,
            format!("/v1/orders/{order}/payment"),
        ),
        10 => (
            Route::Other,
            &[Method::GET],
            true,
            format!("/v1/admin/skus/{sku}"),
        ),
        11 => {
            let query = if rng.odd() {
                rng.pick(&[
                    "?sku=",
                    "?sku=a&sku=b",
                    "?sku=%FF",
                    "?other=1",
                    "?sku=a%20b",
                ])
                .to_string()
            } else {
                rng.pick(&["", "?sku=sweep"]).to_string()
            };
            (
                Route::Other,
                &[Method::GET],
                true,
                format!("/v1/admin/refunds{query}"),
            )
        }
        12 => {
            let path = rng.pick(&["/healthz", "/readyz", "/metrics"]).to_string();
            (Route::Other, &[Method::GET], false, path)
        }
        _ => {
            let paths = [
                "/".to_owned(),
                "/v1".to_owned(),
                "/v1/skus".to_owned(),
                "/v1/skus/".to_owned(),
                "/v1/orders".to_owned(),
                format!("/v1/skus/{sku}/orders/"),
                format!("//v1/skus/{sku}/orders"),
                format!("/v1/skus/{sku}/{order}"),
                format!("/v2/skus/{sku}"),
                format!("/v1/orders/{order}/payment/{sku}"),
                format!("/v1/admin/{sku}"),
                format!("/healthz/{order}"),
                format!("/{sku}"),
            ];
            let path = rng.pick(&paths).clone();
            let methods: &[Method] = &[Method::GET, Method::POST];
            (Route::Other, methods, false, path)
        }
    };
    let method = if rng.odd() && rng.one_in(2) {
        rng.pick(&[
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
            Method::from_bytes(b"PURGE").expect("a method token"),
        ])
        .clone()
    } else {
        rng.pick(methods).clone()
    };
    // The URL parser escapes what a request line cannot carry; what it cannot make a
    // URL of is left out rather than sent.
    let url = Url::parse(&format!("{base}{path}")).ok()?;
    let body = body(rng, route);

    let mut headers: Vec<(HeaderName, Vec<u8>)> = Vec::new();
    let authorization = if admin && !rng.odd() {
        Some(format!("Bearer {}", known.admin_token).into_bytes())
    } else if rng.odd() {
        Some(odd_authorization(rng, known))
    } else {
        None
    };
    if let Some(value) = authorization {
        headers.push((reqwest::header::AUTHORIZATION, value));
    }
    let content_type = if rng.odd() {
        rng.one_in(3).then(|| *rng.pick::<&str>(ODD_CONTENT_TYPES))
    } else {
        match route {
            Route::CardsCsv => Some("text/csv"),
            Route::CardsJson => Some("application/json"),
            _ => rng.one_in(2).then_some("application/json"),
        }
    };
    if let Some(value) = content_type {
        headers.push((reqwest::header::CONTENT_TYPE, value.as_bytes().to_vec()));
    }
    if route == Route::Payment || (rng.odd() && rng.one_in(3)) {
        let value = signature(rng, known, &body);
        headers.push((HeaderName::from_static("x-keydrop-signature"), value));
    }
    for name in ["idempotency-key", "x-device-id"] {
        if (route == Route::Order && rng.one_in(3)) || (rng.odd() && rng.one_in(4)) {
            let value = if rng.odd() {
                let len = *rng.pick(&[0, 129, 1_000]);
                if rng.one_in(2) {
                    random_text(rng, ID_BYTES, len).into_bytes()
                } else {
                    header_bytes(rng, len.max(1))
                }
            } else if rng.one_in(2) {
                // Reused now and then: replays, and the same key for another request.
                format!("{name}-{}", rng.below(20)).into_bytes()
            } else {
                let len = *rng.pick(&[1, 16, 128]);
                random_text(rng, ID_BYTES, len).into_bytes()
            };
            headers.push((HeaderName::from_static(name), value));
        }
    }
    if rng.odd() && rng.one_in(5) {
        let value = rng
            .pick(&["198.51.100.1", "junk", "::1, 10.0.0.1", "", "256.0.0.1"])
            .as_bytes()
            .to_vec();
        headers.push((HeaderName::from_static("x-forwarded-for"), value));
    }
    if rng.odd() && rng.one_in(5) {
        let len = rng.below(300);
        headers.push((
            HeaderName::from_static("x-anything"),
            header_bytes(rng, len),
        ));
    }
    // A value HTTP cannot carry (none of the above) is left out rather than sent.
    let headers = headers
        .into_iter()
        .filter_map(|(name, value)| Some((name, HeaderValue::from_bytes(&value).ok()?)))
        .collect();
    Some(Sent {
        method,
        url,
        headers,
        body,
    })
}

/// The route a path is for, roughly, to show which answers each route gave.
fn route_template(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["", "v1", "skus", _] => "/v1/skus/{sku}".into(),
        ["", "v1", "skus", _, "cards" | "orders"] => {
            format!("/v1/skus/{{sku}}/{}", segments[4])
        }
        ["", "v1", "orders", _] => "/v1/orders/{id}".into(),
        ["", "v1", "orders", _, "payment"] => "/v1/orders/{id}/payment".into(),
        ["", "v1", "admin", "skus", _] => "/v1/admin/skus/{sku}".into(),
        ["", "v1", "admin", "refunds"] | ["", "healthz" | "readyz" | "metrics"] => path.into(),
        _ => "elsewhere".into(),
    }
}

/// `CONTRACT_SEED` when given (to replay a run), else a fresh one; printed either way.
fn contract_seed() -> u64 {
    let seed = std::env::var("CONTRACT_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        });
    eprintln!("CONTRACT_SEED={seed}");
    seed
}

/// What is wrong with an answer, if anything: a 5xx, or a 4xx whose body is not
/// `{"error": <code>, "message": <text>}`.
fn contract_breach(status: StatusCode, body: &[u8]) -> Option<String> {
    let shown = || String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned();
    if status.is_server_error() {
        return Some(format!("{status}: {}", shown()));
    }
    if status.is_client_error() {
        let shape = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|value| {
                let object = value.as_object()?;
                let well_formed = object.len() == 2
                    && object.get("error")?.is_string()
                    && object.get("message")?.is_string();
                well_formed.then_some(())
            });
        if shape.is_none() {
            return Some(format!("{status} not in the error shape: {:?}", shown()));
        }
    }
    None
}

/// About 1,500 malformed or odd requests over every route, wrong methods and unknown
/// paths included, from a seeded generator (`CONTRACT_SEED=<n>` replays a run): none
/// is answered 5xx, every 4xx carries `error` and `message` and nothing else, and
/// afterwards the node is healthy and its SKU holds every card it was given
/// (available + reserved + sold = imported).
#[tokio::test]
async fn no_client_mistake_is_answered_with_a_5xx() {
    let seed = contract_seed();
    let node = Node::start(&[("KEYDROP_RATE_PER_USER", "0"), ("KEYDROP_RATE_PER_IP", "0")]).await;
    node.sku_with_cards(SKU, on_sale(PRICE_CENTS, 3, 600), &cards("sweep", CARDS))
        .await;
    let mut known = Known {
        admin_token: node.admin_token(),
        payment_secret: node.payment_secret(),
        orders: Vec::new(),
    };
    let mut rng = Rng {
        state: seed,
        oddness: 1,
    };
    let started = Instant::now();
    let mut sent = 0;
    let mut breaches: Vec<String> = Vec::new();
    let mut breaches_total = 0;
    let mut resent = 0;
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("HTTP client");
    let mut answers: BTreeMap<(String, u16), usize> = BTreeMap::new();
    while sent < SWEEP_REQUESTS && started.elapsed() < SWEEP_TIME_MAX {
        let Some(request) = request(&mut rng, &known, &node.url) else {
            continue;
        };
        sent += 1;
        let build = |client: &reqwest::Client| {
            let mut builder = client
                .request(request.method.clone(), request.url.clone())
                .timeout(ANSWER_TIME_MAX)
                .body(request.body.clone());
            for (name, value) in &request.headers {
                builder = builder.header(name, value);
            }
            builder
        };
        // A connection the node closed after refusing a body it did not read can be
        // taken from the pool by the next request: that one goes again, once, on a
        // connection of its own, and only a second failure counts.
        let answer = match build(&node.http).send().await {
            Err(error) if !error.is_timeout() => {
                resent += 1;
                build(&fresh).send().await
            }
            answer => answer,
        };
        let breach = match answer {
            Ok(response) => {
                let status = response.status();
                let route = route_template(request.url.path());
                match response.bytes().await {
                    Ok(bytes) => {
                        if status == StatusCode::CREATED && route.ends_with("/orders") {
                            let order = serde_json::from_slice::<Value>(&bytes).ok();
                            if let Some(id) = order.as_ref().and_then(|o| o["order_id"].as_str()) {
                                known.orders.push(id.to_owned());
                            }
                        }
                        *answers.entry((route, status.as_u16())).or_default() += 1;
                        contract_breach(status, &bytes)
                    }
                    Err(error) => Some(format!("{status}, then the body failed: {error}")),
                }
            }
            Err(error) => Some(format!("no answer: {error:?}")),
        };
        if let Some(breach) = breach {
            breaches_total += 1;
            if breaches.len() < FAILURES_SHOWN_MAX {
                breaches.push(format!("request {sent}: {breach}\n{request}"));
            }
        }
    }
    let mut summary = format!(
        "CONTRACT_SEED={seed}: {sent} requests in {:?} ({resent} sent again after a transport error), {} orders reserved; answers:",
        started.elapsed(),
        known.orders.len()
    );
    for ((route, status), count) in &answers {
        let _ = write!(summary, "\n  {route} {status}: {count}");
    }
    eprintln!("{summary}");
    let mut report = String::new();
    for breach in &breaches {
        let _ = writeln!(report, "---\n{breach}");
    }
    assert!(
        breaches.is_empty(),
        "CONTRACT_SEED={seed}: {breaches_total} of {sent} answers broke the contract:\n{report}"
    );
    assert!(
        sent >= 100,
        "CONTRACT_SEED={seed}: only {sent} requests in {SWEEP_TIME_MAX:?}"
    );

    assert_eq!(
        node.get("/healthz").await.0,
        StatusCode::OK,
        "CONTRACT_SEED={seed}"
    );
    let (status, view) = node
        .send(node.admin(Method::GET, &format!("/v1/admin/skus/{SKU}")))
        .await;
    assert_eq!(status, StatusCode::OK, "CONTRACT_SEED={seed}: {view}");
    let count = |field: &str| {
        view[field]
            .as_u64()
            .unwrap_or_else(|| panic!("CONTRACT_SEED={seed}: {view}"))
    };
    assert!(
        count("imported") >= CARDS as u64,
        "CONTRACT_SEED={seed}: {view}"
    );
    assert_eq!(
        count("available") + count("reserved") + count("sold"),
        count("imported"),
        "CONTRACT_SEED={seed}: {view}"
    );
}

/// One answer read off a raw connection.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Every answer in `bytes`, as a client reads them (bodies by `content-length`), and
/// whatever is left after the last whole one.
fn split_answers(mut bytes: &[u8]) -> (Vec<RawAnswer>, Vec<u8>) {
    let mut answers = Vec::new();
    loop {
        let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (answers, bytes.to_vec());
        };
        let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let body_start = head_end + 4;
        if bytes.len() < body_start + length {
            return (answers, bytes.to_vec());
        }
        answers.push(RawAnswer {
            status,
            head,
            body: bytes[body_start..body_start + length].to_vec(),
        });
        bytes = &bytes[body_start + length..];
    }
}

/// Sends `request` on a connection of its own, says it will send nothing more, and
/// reads until the node closes the connection: every answer, and what was left over.
async fn raw_answers(addr: &str, request: Vec<u8>) -> (Vec<RawAnswer>, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting");
    let (mut read, mut write) = stream.into_split();
    // Written alongside the read: a node that refuses a head too large stops reading
    // it, and the answer comes back while the rest is still being sent.
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if write.write_all(&request).await.is_ok() {
            let _ = write.shutdown().await;
        }
        // Kept open until the reader is done: dropping the half would not close
        // anything more, but keeps the two halves' lives plain.
        write
    });
    let mut received = Vec::new();
    let read_all = async {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 16 * 1024];
        // A reset after the answers (the node closed with bytes of ours unread) ends
        // the read like a close does: what came before it is what the node said.
        while let Ok(n @ 1..) = read.read(&mut chunk).await {
            received.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(ANSWER_TIME_MAX, read_all)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the node neither answered nor closed within {ANSWER_TIME_MAX:?} after: {:?}",
                String::from_utf8_lossy(&received)
            )
        });
    writer.abort();
    split_answers(&received)
}

/// What is not HTTP/1.1 at all never reaches the API: hyper refuses it. Those answers
/// are in the contract's error shape too, with the code that says why, and close the
/// connection; an answer pipelined ahead of a malformed request goes out unchanged.
/// Then a seeded sweep of order requests with bytes changed, inserted or removed
/// (`CONTRACT_SEED=<n>` replays it): whatever the node answers, each answer is below
/// 500 and every 4xx is in the error shape.
#[tokio::test]
async fn heads_that_are_not_http_are_answered_in_the_error_shape() {
    let seed = contract_seed();
    let node = Node::start(&[
        ("KEYDROP_RATE_PER_USER", "0"),
        ("KEYDROP_RATE_PER_IP", "0"),
        // A mutated Content-Length can promise more body than is sent.
        ("KEYDROP_BODY_READ_TIMEOUT_MS", "300"),
    ])
    .await;
    node.sku_with_cards(SKU, on_sale(PRICE_CENTS, 3, 600), &cards("heads", CARDS))
        .await;
    let addr = node.url.strip_prefix("http://").expect("an http:// URL");

    let many_headers: String = (0..120).map(|i| format!("X-Header-{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "not HTTP",
            b"GARBAGE\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "a header line with no colon",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "a control byte in a header value",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Odd: a\x01b\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "an unknown HTTP version",
            b"GET /healthz HTTP/3.0\r\nHost: x\r\n\r\n".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "over 100 headers",
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "a request target over 65,534 bytes",
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            414,
            "uri_too_long",
        ),
        (
            // Several times hyper's 408 KiB read buffer, so that it is full whatever
            // one read brings in.
            "a head past the read buffer",
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(2 << 20)
            )
            .into_bytes(),
            431,
            "headers_too_large",
        ),
    ];
    for (what, request, status, code) in &cases {
        let (answers, rest) = raw_answers(addr, request.clone()).await;
        let [RawAnswer {
            status: got,
            head,
            body,
        }] = answers.as_slice()
        else {
            panic!("{what}: expected one answer, got {answers:?}, then {rest:?}");
        };
        assert_eq!(got, status, "{what}: {head}");
        assert_eq!(
            contract_breach(StatusCode::from_u16(*got).unwrap(), body),
            None,
            "{what}"
        );
        let body: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["error"], *code, "{what}: {body}");
        assert!(
            head.to_ascii_lowercase().contains("\r\nconnection: close"),
            "{what}: {head}"
        );
        assert!(rest.is_empty(), "{what}: {rest:?}");
    }

    // Behind a sound request on the same connection, HTTP/1.1 and HTTP/1.0 (after
    // which hyper's answer carries no `connection: close`).
    let behind_sound: [&[u8]; 2] = [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nX-Odd: \x7f\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGARBAGE\r\n\r\n",
    ];
    for sent in behind_sound {
        let (answers, _) = raw_answers(addr, sent.to_vec()).await;
        let statuses: Vec<u16> = answers.iter().map(|answer| answer.status).collect();
        assert_eq!(statuses, [200, 400], "{answers:?}");
        assert_eq!(answers[0].body, br#"{"status":"ok"}"#);
        assert_eq!(
            contract_breach(StatusCode::BAD_REQUEST, &answers[1].body),
            None,
            "{answers:?}"
        );
    }

    let mut replaced = 0.0;
    for status in [400, 414, 431] {
        let series =
            format!(r#"keydrop_http_requests_total{{route="malformed_head",status="{status}"}}"#);
        replaced += node.metric(&series).await;
    }
    assert_eq!(replaced, (cases.len() + behind_sound.len()) as f64);

    // Mutations of a sound order: most break the head, some only the body or a value.
    let body = br#"{"user_id":"mutant"}"#;
    let sound = format!(
        "POST /v1/skus/{SKU}/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nIdempotency-Key: k-1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut sound = sound.into_bytes();
    sound.extend_from_slice(body);
    const ODD_BYTES: &[u8] = b"\0\x01\x7f\x80\xff \t:\r\n/%?#\"{}";
    let mut rng = Rng {
        state: seed,
        oddness: 1,
    };
    let started = Instant::now();
    let mut sent = 0;
    let mut answered: BTreeMap<u16, usize> = BTreeMap::new();
    let mut closed_unanswered = 0;
    let mut breaches = Vec::new();
    while sent < 300 && started.elapsed() < SWEEP_TIME_MAX {
        let mut request = sound.clone();
        for _ in 0..=rng.next() % 3 {
            let at = (rng.next() as usize) % request.len();
            let byte = ODD_BYTES[(rng.next() as usize) % ODD_BYTES.len()];
            match rng.next() % 3 {
                0 => request[at] = byte,
                1 => request.insert(at, byte),
                _ => {
                    request.remove(at);
                }
            }
        }
        sent += 1;
        let (answers, _) = raw_answers(addr, request.clone()).await;
        if answers.is_empty() {
            // A head the change cut short: nothing to answer, the connection closed.
            closed_unanswered += 1;
        }
        for answer in &answers {
            *answered.entry(answer.status).or_default() += 1;
            let breach = StatusCode::from_u16(answer.status)
                .map_err(|_| format!("no status in {:?}", answer.head))
                .and_then(|status| contract_breach(status, &answer.body).map_or(Ok(()), Err));
            if let Err(breach) = breach {
                breaches.push(format!(
                    "{breach}\n  sent: {:?}",
                    String::from_utf8_lossy(&request)
                ));
            }
        }
    }
    eprintln!(
        "CONTRACT_SEED={seed}: {sent} mutated orders, answers by status: {answered:?}, closed unanswered: {closed_unanswered}"
    );
    assert!(
        breaches.is_empty(),
        "CONTRACT_SEED={seed}: {} answers broke the contract:\n{}",
        breaches.len(),
        breaches[..breaches.len().min(FAILURES_SHOWN_MAX)].join("\n---\n")
    );
    assert!(sent >= 50, "CONTRACT_SEED={seed}: only {sent} requests");
    assert_eq!(node.get("/healthz").await.0, StatusCode::OK);
    let (available, reserved, sold) = node.stock(SKU).await;
    assert_eq!(available + reserved + sold, CARDS as u64);
}
