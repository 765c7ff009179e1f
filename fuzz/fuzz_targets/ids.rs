//! Identifiers parsed from URLs, headers and RocksDB keys.
#![no_main]

use keydrop_engine::{codec, OrderId, SkuId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = codec::parse_journal_key(data);
    let _ = codec::parse_snapshot_key(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = text.parse::<OrderId>() {
            assert_eq!(id.to_string(), text);
        }
        if let Ok(sku) = SkuId::parse(text) {
            assert!(sku.slot() < keydrop_engine::ids::ROUTING_SLOTS);
        }
    }
});
