//! Journal values from disk: splitting one into records, decoding them and replaying
//! them must never panic, whatever the bytes; bad values are errors. Inputs are
//! taken raw, as one record behind a valid header and checksum, or as a run of such
//! records, so the run framing, the payload decoder and replay all see mutated input,
//! not only checksum failures.
#![no_main]

use keydrop_engine::codec;
use keydrop_engine::sku::Sku;
use keydrop_engine::SkuId;
use keydrop_fuzz::journal_value_from;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(value) = journal_value_from(data) else {
        return;
    };
    let Ok(records) = codec::split_journal_value(&value) else {
        return;
    };
    let mut events = Vec::new();
    for record in records {
        let Ok(decoded) = codec::decode_events(record) else {
            return;
        };
        events.extend(decoded);
    }
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
