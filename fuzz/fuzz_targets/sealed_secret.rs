//! Sealed secrets read back from disk or bundles: opening arbitrary bytes must fail
//! cleanly, never panic, and never yield a secret without the key.
#![no_main]

use keydrop_engine::vault::SealedSecret;
use keydrop_engine::{CardSerial, KeyRing, SkuId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sealed) = SealedSecret::from_bytes(data.to_vec()) else {
        return;
    };
    let ring = KeyRing::new(vec![zeroize::Zeroizing::new([9u8; 32])]).expect("one key");
    let sku = SkuId::parse("fuzz").expect("valid id");
    let serial = CardSerial::parse("S").expect("valid serial");
    assert!(
        ring.open(&sku, &serial, &sealed).is_err(),
        "forged ciphertext opened"
    );
});
