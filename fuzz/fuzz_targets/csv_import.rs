//! A `text/csv` card import, as the node parses it while it streams in: split
//! anywhere, the body gives the same cards or the same refusal. The first byte picks
//! where the chunks are cut.
#![no_main]

use keydrop_node::decoders::csv_cards;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&stride, body)) = data.split_first() else {
        return;
    };
    let stride = usize::from(stride).max(1);
    let show =
        |parsed: Result<Vec<(keydrop_engine::CardSerial, keydrop_engine::CardSecret)>, String>| {
            parsed.map(|cards| {
                cards
                    .iter()
                    .map(|(serial, secret)| (serial.to_string(), secret.expose().to_string()))
                    .collect::<Vec<_>>()
            })
        };
    let whole = show(csv_cards([body]));
    assert_eq!(whole, show(csv_cards(body.chunks(stride))));
    if let Ok(cards) = whole {
        for (serial, secret) in cards {
            assert!(!serial.is_empty() && !serial.contains(','));
            assert!(!secret.is_empty());
        }
    }
});
