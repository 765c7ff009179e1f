//! The payment callback's `X-Keydrop-Signature` header, checked over a body: the
//! first byte says how much of the rest is the header.
#![no_main]

use keydrop_node::decoders::payment_signature;
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"payment-secret-for-fuzzing";
const NOW: i64 = 1_900_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&header_len, rest)) = data.split_first() else {
        return;
    };
    let (header, body) = rest.split_at(usize::from(header_len).min(rest.len()));
    if let Ok(t) = payment_signature(SECRET, header, body, NOW) {
        // Only a forged HMAC gets here; if it does, it is at least within the window.
        assert!((t - NOW).abs() <= 300, "accepted a signature from {t}");
    }
});
