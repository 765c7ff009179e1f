//! Every decoder of untrusted bytes, fed arbitrary input: errors, never panics. The
//! cargo-fuzz targets in `fuzz/` explore further; these run in every test pass.
//! Records with a valid checksum around mutated payloads reach replay too, so the
//! semantic checks of `Sku::apply_checked` are exercised, not just the CRC.

use keydrop_engine::codec;
use keydrop_engine::sku::{Command, NewCard, ReserveRequest, Sku};
use keydrop_engine::vault::SealedSecret;
use keydrop_engine::{CardSecret, CardSerial, KeyRing, OrderId, SkuDef, SkuId, Timestamp, UserId};
use proptest::prelude::*;

fn with_valid_checksum(payload: &[u8]) -> Vec<u8> {
    let mut record = vec![codec::FORMAT_VERSION];
    record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// A SKU with cards and orders, and the journal records that built it.
fn live_sku() -> (Sku, Vec<Vec<u8>>) {
    let id = SkuId::parse("fuzz").unwrap();
    let def = SkuDef {
        name: "Fuzz".into(),
        price_cents: 100,
        per_user_limit: 3,
        per_device_limit: None,
        reservation_ttl_ms: 60_000,
        starts_at: None,
        ends_at: None,
        low_stock_threshold: 0,
    };
    let (mut sku, first) = Sku::create(id.clone(), def, Timestamp(1)).unwrap();
    let mut records = vec![codec::encode_events(&[first])];
    let ring = KeyRing::new(vec![zeroize::Zeroizing::new([1; 32])]).unwrap();
    let cards = (0..4)
        .map(|i| {
            let serial = CardSerial::parse(format!("S{i}")).unwrap();
            let sealed = ring.seal(&id, &serial, &CardSecret::new("x").unwrap());
            NewCard { serial, sealed }
        })
        .collect();
    let mut commands = vec![Command::ImportCards(cards)];
    for user in ["a", "b"] {
        commands.push(Command::Reserve(ReserveRequest {
            order_id: OrderId::generate(&id),
            user: UserId::parse(user).unwrap(),
            device: None,
            idempotency: None,
        }));
    }
    for command in commands {
        let decision = sku.handle(command, Timestamp(2));
        records.push(codec::encode_events(&decision.events));
    }
    (sku, records)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = codec::decode_events(&bytes);
        let _ = codec::decode_snapshot(&bytes);
        let _ = codec::split_journal_value(&bytes);
        // The same bytes behind the tag that marks a run of records.
        let _ = codec::split_journal_value(&[&[0xf0][..], &bytes].concat());
        let _ = codec::parse_journal_key(&bytes);
        let _ = codec::parse_snapshot_key(&bytes);
        let _ = SealedSecret::from_bytes(bytes.clone());
        let _ = String::from_utf8_lossy(&bytes).parse::<OrderId>();
        // With a valid checksum the bytes reach postcard itself.
        let record = with_valid_checksum(&bytes);
        let _ = codec::decode_events(&record);
        let _ = codec::decode_snapshot(&record);
    }

    #[test]
    fn mutated_records_with_valid_checksums_never_panic_replay(
        record_index in 0usize..4,
        mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let (live, records) = live_sku();
        let original = &records[record_index.min(records.len() - 1)];
        let mut payload = original[5..].to_vec();
        for (at, value) in mutations {
            let i = at.index(payload.len());
            payload[i] = value;
        }
        let record = with_valid_checksum(&payload);
        if let Ok(events) = codec::decode_events(&record) {
            // Apply on top of the full state: a replayed duplicate or a nonsense event
            // must be refused with an error, and the state must stay consistent.
            let mut sku = live.clone();
            for event in &events {
                if sku.apply_checked(event).is_err() {
                    break;
                }
            }
            prop_assert!(sku.check_invariants().is_ok());
        }
    }

    #[test]
    fn mutated_snapshots_are_refused_or_consistent(
        mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let (live, _) = live_sku();
        let snapshot = codec::encode_snapshot(9, live.snapshot_ref());
        let mut payload = snapshot[5..].to_vec();
        for (at, value) in mutations {
            let i = at.index(payload.len());
            payload[i] = value;
        }
        if let Ok((_, decoded)) = codec::decode_snapshot(&with_valid_checksum(&payload)) {
            if let Ok(sku) = Sku::from_snapshot(decoded) {
                prop_assert!(sku.check_invariants().is_ok());
            }
        }
    }
}
