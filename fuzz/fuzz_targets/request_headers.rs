//! Header values a client controls: `Authorization`, `X-Forwarded-For` (one line per
//! `\n`, read behind a trusted proxy and behind none), an order's `X-Device-Id` and
//! `Idempotency-Key`, and an RFC 3339 time as in a SKU's sale window.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use keydrop_node::decoders;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(token) = decoders::bearer_token(data) {
        assert!(!token.is_empty());
        assert_eq!(token, token.trim_ascii());
    }
    let (device, key) = data.split_at(data.len() / 2);
    let _ = decoders::order_headers(Some(device), Some(key));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decoders::rfc3339(text);
    }
    let proxy = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let peer = SocketAddr::new(proxy, 40_000);
    let lines = || data.split(|&b| b == b'\n');
    assert_eq!(decoders::client_ip(&[], peer, lines()), proxy);
    let _ = decoders::client_ip(&[proxy], peer, lines());
});
