//! Snapshots and export bundles (the latter arrive from other nodes): decoding and
//! rebuilding a SKU must never panic, and a rebuilt SKU must hold every invariant.
//! Half the inputs are given a valid header and checksum, so the payload decoder and
//! `from_snapshot` see mutated payloads, not only checksum failures.
#![no_main]

use keydrop_engine::codec;
use keydrop_engine::sku::Sku;
use keydrop_fuzz::record_from;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(record) = record_from(data) else {
        return;
    };
    let Ok((_, snapshot)) = codec::decode_snapshot(&record) else {
        return;
    };
    if let Ok(sku) = Sku::from_snapshot(snapshot) {
        sku.check_invariants()
            .expect("from_snapshot only accepts consistent state");
    }
});
