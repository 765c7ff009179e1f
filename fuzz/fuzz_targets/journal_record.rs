//! Journal records from disk: decoding and then replaying them must never panic,
//! whatever the bytes; bad records are errors. Half the inputs are given a valid
//! header and checksum, so the payload decoder and replay see mutated payloads, not
//! only checksum failures.
#![no_main]

use keydrop_engine::codec;
use keydrop_engine::sku::Sku;
use keydrop_engine::SkuId;
use keydrop_fuzz::record_from;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(record) = record_from(data) else {
        return;
    };
    let Ok(events) = codec::decode_events(&record) else {
        return;
    };
    let id = SkuId::parse("fuzz").expect("valid id");
    let mut sku: Option<Sku> = None;
    for event in &events {
        match &mut sku {
            None => match Sku::from_first_event(id.clone(), event) {
                Some(first) => sku = Some(first),
                None => return,
            },
            Some(sku) => {
                if sku.apply_checked(event).is_err() {
                    return;
                }
            }
        }
    }
    if let Some(sku) = sku {
        sku.check_invariants()
            .expect("checked events keep every invariant");
    }
});
