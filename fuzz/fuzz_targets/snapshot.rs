//! Snapshots and export bundles (the latter arrive from other nodes): decoding and
//! rebuilding a SKU must never panic, and a rebuilt SKU must hold every invariant.
#![no_main]

use keydrop_engine::codec;
use keydrop_engine::sku::Sku;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((_, snapshot)) = codec::decode_snapshot(data) else {
        return;
    };
    if let Ok(sku) = Sku::from_snapshot(snapshot) {
        sku.check_invariants()
            .expect("from_snapshot only accepts consistent state");
    }
});
