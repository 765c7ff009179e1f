//! The JSON bodies of the API: a SKU definition, an order, a payment callback, a card
//! import. The first byte picks which route reads the rest; each parses or refuses,
//! never panics. (What valid bodies parse to is checked in
//! `node/tests/decoders.rs`.)
#![no_main]

use keydrop_node::decoders;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    match route % 4 {
        0 => {
            let _ = decoders::sku_definition(body);
        }
        1 => {
            let _ = decoders::order_body(body);
        }
        2 => {
            let _ = decoders::payment_body(body);
        }
        _ => {
            let _ = decoders::json_cards(body);
        }
    }
});
