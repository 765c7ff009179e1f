//! The JSON bodies of the API: a SKU definition, an order, a payment callback, a card
//! import. The first byte picks which route reads the rest.
#![no_main]

use keydrop_node::decoders;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    match route % 4 {
        0 => {
            if let Ok(def) = decoders::sku_definition(body) {
                assert!(def.validate().is_ok());
            }
        }
        1 => {
            if let Ok(user) = decoders::order_body(body) {
                assert!(!user.as_str().is_empty() && user.as_str().len() <= 128);
            }
        }
        2 => {
            let _ = decoders::payment_body(body);
        }
        _ => {
            let _ = decoders::json_cards(body);
        }
    }
});
