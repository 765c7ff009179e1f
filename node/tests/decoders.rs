//! Every parser of what clients send, fed arbitrary and near-valid input: a result or
//! an error, never a panic, and the properties each route relies on. The cargo-fuzz
//! targets in `fuzz/` explore further; these run in every test pass.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use chrono::{DateTime, SecondsFormat};
use keydrop_engine::{CardSecret, CardSerial, SkuDef, Timestamp};
use keydrop_node::decoders;
use proptest::prelude::*;
use serde_json::{json, Value};

const SECRET: &[u8] = b"payment-secret-for-decoder-tests";
const NOW: i64 = 1_900_000_000;

/// A JSON value of any shape, biased to the kinds request fields hold.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})"
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid value for a field, or now and then any JSON value, or none at all.
fn field(valid: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        18 => valid.prop_map(Some),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

/// The object those fields make, now and then with a field no route knows, and now
/// and then cut short: mostly bodies a route accepts, and near misses.
fn body(fields: Vec<(&'static str, BoxedStrategy<Option<Value>>)>) -> BoxedStrategy<Vec<u8>> {
    let (names, values): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
    (
        values,
        proptest::option::weighted(0.1, ("[a-z]{1,8}", json_value())),
        proptest::option::weighted(0.1, any::<prop::sample::Index>()),
    )
        .prop_map(move |(values, stranger, cut)| {
            let mut object = serde_json::Map::new();
            for (name, value) in names.iter().zip(values) {
                if let Some(value) = value {
                    object.insert(name.to_string(), value);
                }
            }
            if let Some((name, value)) = stranger {
                object.insert(name, value);
            }
            let mut bytes = serde_json::to_vec(&Value::Object(object)).unwrap();
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
        .boxed()
}

/// Mostly small, and now and then any `u64`, the largest included.
fn count() -> impl Strategy<Value = Value> {
    prop_oneof![8 => 0u64..20, 1 => any::<u64>(), 1 => Just(u64::MAX)].prop_map(Value::from)
}

fn rfc3339_text() -> impl Strategy<Value = Value> {
    "20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,9})?(Z|[+-](0[0-9]|1[0-4]):[0-5][0-9])"
        .prop_map(Value::from)
}

fn sku_body() -> BoxedStrategy<Vec<u8>> {
    body(vec![
        ("name", field("[ -~]{1,140}".prop_map(Value::from))),
        ("price_cents", field(count())),
        ("per_user_limit", field(count())),
        (
            "per_device_limit",
            field(prop_oneof![Just(Value::Null), count()]),
        ),
        (
            "reservation_ttl_secs",
            field(prop_oneof![8 => (1u64..10_000).prop_map(Value::from), 1 => count()]),
        ),
        ("starts_at", field(rfc3339_text())),
        ("ends_at", field(rfc3339_text())),
        ("low_stock_threshold", field(count())),
    ])
}

fn order_body() -> BoxedStrategy<Vec<u8>> {
    body(vec![(
        "user_id",
        field(prop_oneof!["[ -~]{1,130}", ".{0,40}"].prop_map(Value::from)),
    )])
}

fn payment_body() -> BoxedStrategy<Vec<u8>> {
    body(vec![
        ("payment_ref", field("[ -~]{0,140}".prop_map(Value::from))),
        ("amount_cents", field(count())),
    ])
}

fn cards_body() -> BoxedStrategy<Vec<u8>> {
    let card = (".{0,140}", ".{0,40}")
        .prop_map(|(serial, secret)| json!({ "serial": serial, "secret": secret }));
    body(vec![(
        "cards",
        field(prop::collection::vec(card, 0..8).prop_map(Value::from)),
    )])
}

/// A serial as an operator writes one: no comma, no blank at either end (a CSV line's
/// fields are trimmed).
fn serial() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:/-]{1,40}"
}

/// A secret: printable, commas and inner blanks included, none at either end.
fn secret() -> impl Strategy<Value = String> {
    "[!-~]([ -~]{0,60}[!-~])?"
}

/// Parsed cards as plain text, to compare.
fn plain(
    parsed: Result<Vec<(CardSerial, CardSecret)>, String>,
) -> Result<Vec<(String, String)>, String> {
    parsed.map(|cards| {
        cards
            .iter()
            .map(|(serial, secret)| (serial.to_string(), secret.expose().to_string()))
            .collect()
    })
}

fn rfc3339_millis(at_ms: u64) -> String {
    DateTime::from_timestamp_millis(at_ms as i64)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A definition the API accepts, and its body.
fn valid_sku() -> impl Strategy<Value = (SkuDef, Vec<u8>)> {
    (
        "[A-Za-z0-9][ -~]{0,60}",
        any::<u64>(),
        1u32..1_000,
        proptest::option::of(1u32..100),
        1u64..=86_400,
        proptest::option::of((0u64..4_000_000_000_000, 1u64..1_000_000_000)),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(name, price, per_user, per_device, ttl_secs, window, low_stock)| {
                let mut body = json!({
                    "name": name,
                    "price_cents": price,
                    "per_user_limit": per_user,
                    "reservation_ttl_secs": ttl_secs,
                });
                if let Some(limit) = per_device {
                    body["per_device_limit"] = json!(limit);
                }
                if let Some((starts, length)) = window {
                    body["starts_at"] = json!(rfc3339_millis(starts));
                    body["ends_at"] = json!(rfc3339_millis(starts + length));
                }
                if let Some(threshold) = low_stock {
                    body["low_stock_threshold"] = json!(threshold);
                }
                let def = SkuDef {
                    name,
                    price_cents: price,
                    per_user_limit: per_user,
                    per_device_limit: per_device,
                    reservation_ttl_ms: ttl_secs * 1000,
                    starts_at: window.map(|(starts, _)| Timestamp::from_millis(starts)),
                    ends_at: window.map(|(starts, length)| Timestamp::from_millis(starts + length)),
                    low_stock_threshold: low_stock.unwrap_or(0),
                };
                (def, serde_json::to_vec(&body).unwrap())
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn request_bodies_parse_or_are_refused(
        sku in sku_body(),
        order in order_body(),
        payment in payment_body(),
        cards in cards_body(),
        raw in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        for body in [&sku, &raw] {
            if let Ok(def) = decoders::sku_definition(body) {
                prop_assert!(def.reservation_ttl_ms % 1000 == 0);
            }
        }
        for body in [&order, &raw] {
            if let Ok(user) = decoders::order_body(body) {
                prop_assert!(!user.as_str().is_empty() && user.as_str().len() <= 128);
            }
        }
        for body in [&payment, &raw] {
            let _ = decoders::payment_body(body);
        }
        for body in [&cards, &raw] {
            let _ = decoders::json_cards(body);
        }
    }

    /// What the API documents is read as written, whatever it holds.
    #[test]
    fn valid_bodies_parse_to_what_they_say(
        (def, sku) in valid_sku(),
        user in "\\PC{1,32}",
        payment_ref in "\\PC{1,32}",
        amount in any::<u64>(),
        cards in prop::collection::vec((serial(), secret()), 0..8),
    ) {
        prop_assert_eq!(decoders::sku_definition(&sku), Ok(def));
        let order = serde_json::to_vec(&json!({ "user_id": user })).unwrap();
        prop_assert_eq!(decoders::order_body(&order).map(|u| u.to_string()), Ok(user));
        let payment = serde_json::to_vec(&json!({
            "payment_ref": payment_ref,
            "amount_cents": amount,
        }))
        .unwrap();
        prop_assert_eq!(
            decoders::payment_body(&payment).map(|(r, a)| (r.to_string(), a)),
            Ok((payment_ref, amount))
        );
        let import = json!({
            "cards": cards
                .iter()
                .map(|(serial, secret)| json!({ "serial": serial, "secret": secret }))
                .collect::<Vec<_>>(),
        });
        let parsed = plain(decoders::json_cards(&serde_json::to_vec(&import).unwrap()));
        prop_assert_eq!(parsed, Ok(cards));
    }

    /// A file of `serial,secret` lines (a header, blank lines and blanks around fields
    /// allowed, fields quoted or not as a CSV writer would) gives exactly its cards,
    /// however it is split.
    #[test]
    fn valid_csv_bodies_give_their_cards(
        cards in prop::collection::vec((serial(), secret(), any::<(bool, bool)>()), 0..20),
        header in any::<bool>(),
        padding in prop::collection::vec(prop::sample::select(vec!["", " ", "\t", "  "]), 2),
        line_ending in prop::sample::select(vec!["\n", "\r\n"]),
        blank_after in any::<prop::sample::Index>(),
        stride in 1usize..64,
    ) {
        // Quoted when asked, and always when it starts with a quote: unquoted, that
        // would open a quoted field.
        let written = |field: &str, quoted: bool| {
            if quoted || field.starts_with('"') {
                format!("\"{}\"", field.replace('"', "\"\""))
            } else {
                field.to_owned()
            }
        };
        let mut lines: Vec<String> = cards
            .iter()
            .map(|(serial, secret, (quote_serial, quote_secret))| {
                format!(
                    "{}{},{}{}{}",
                    padding[0],
                    written(serial, *quote_serial),
                    padding[1],
                    written(secret, *quote_secret),
                    padding[0]
                )
            })
            .collect();
        let cards: Vec<(String, String)> = cards
            .into_iter()
            .map(|(serial, secret, _)| (serial, secret))
            .collect();
        lines.insert(blank_after.index(lines.len() + 1), String::new());
        if header {
            lines.insert(0, "\u{feff}serial,secret".to_string());
        }
        let body = lines.join(line_ending).into_bytes();
        let parsed = plain(decoders::csv_cards(body.chunks(stride)));
        prop_assert_eq!(parsed, Ok(cards));
    }

    /// Split anywhere, a CSV body gives the same cards, or the same refusal.
    #[test]
    fn csv_bodies_parse_the_same_however_they_arrive(
        lines in prop::collection::vec(
            prop_oneof![
                "[A-Za-z0-9-]{1,12},[ -~]{1,30}",
                "[ -~]{0,40}",
                Just("\u{feff}serial,secret".to_string()),
                Just(String::new()),
                // Past the 4,096-byte line limit, which is checked as chunks arrive
                // and again per line: both must give the same refusal.
                (4_000usize..4_200).prop_map(|len| format!("S,{}", "x".repeat(len))),
            ],
            0..12,
        ),
        line_ending in prop::sample::select(vec!["\n", "\r\n"]),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        noise in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut body = lines.join(line_ending).into_bytes();
        body.extend_from_slice(&noise);
        let mut at: Vec<usize> = cuts.iter().map(|cut| cut.index(body.len() + 1)).collect();
        at.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for end in at {
            chunks.push(&body[start..end]);
            start = end;
        }
        chunks.push(&body[start..]);
        let whole = plain(decoders::csv_cards([&body[..]]));
        prop_assert_eq!(&whole, &plain(decoders::csv_cards(chunks)));
        if let Ok(cards) = &whole {
            for (serial, secret) in cards {
                prop_assert!(!serial.is_empty() && !serial.contains(','));
                prop_assert!(!secret.is_empty());
            }
        }
    }

    /// Only the exact signature of the body within the time window passes.
    #[test]
    fn payment_signatures_pass_only_when_they_sign_the_body(
        body in prop::collection::vec(any::<u8>(), 0..128),
        skew in -400i64..400,
        flip in any::<prop::sample::Index>(),
        header in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let t = NOW + skew;
        let good = common::sign(SECRET, t, &body);
        let verdict = decoders::payment_signature(SECRET, good.as_bytes(), &body, NOW);
        if skew.abs() <= 300 {
            prop_assert_eq!(verdict, Ok(t));
        } else {
            prop_assert!(verdict.is_err());
        }
        let mut tampered = body.clone();
        if tampered.is_empty() {
            tampered.push(0);
        } else {
            let i = flip.index(tampered.len());
            tampered[i] ^= 1;
        }
        prop_assert!(decoders::payment_signature(SECRET, good.as_bytes(), &tampered, NOW).is_err());
        prop_assert!(decoders::payment_signature(SECRET, &header, &body, NOW).is_err());
    }

    #[test]
    fn header_fields_parse_or_are_refused(
        value in prop::collection::vec(any::<u8>(), 0..96),
        time in "[ -~]{0,40}",
        hops in prop::collection::vec(
            prop_oneof![
                "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(:[0-9]{1,5})?",
                "\\[?[0-9a-f:]{2,39}\\]?(:[0-9]{1,5})?",
                "[ -~]{0,20}",
            ],
            0..6,
        ),
        lines in 1usize..3,
        at_ms in 0u64..4_000_000_000_000,
        device in "[!-~]([ -~]{0,60}[!-~])?",
        key in proptest::option::of("[!-~]([ -~]{0,60}[!-~])?"),
    ) {
        if let Some(token) = decoders::bearer_token(&value) {
            prop_assert!(!token.is_empty());
            prop_assert_eq!(token, token.trim_ascii());
        }
        let _ = decoders::rfc3339(&time);
        prop_assert_eq!(decoders::rfc3339(&rfc3339_millis(at_ms)), Ok(Timestamp::from_millis(at_ms)));
        let _ = decoders::order_headers(Some(&value), Some(&value));
        let (parsed_device, parsed_key) =
            decoders::order_headers(Some(device.as_bytes()), key.as_deref().map(str::as_bytes))
                .unwrap();
        prop_assert_eq!(parsed_device.map(|d| d.to_string()), Some(device));
        prop_assert_eq!(parsed_key.map(|k| k.to_string()), key);
        let joined = hops.join(",");
        let header_lines: Vec<&[u8]> = std::iter::repeat_n(joined.as_bytes(), lines).collect();
        let proxy = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let peer = SocketAddr::new(proxy, 40_000);
        // A peer that is not a trusted proxy is the client, whatever the header says.
        prop_assert_eq!(decoders::client_ip(&[], peer, header_lines.clone()), proxy);
        let _ = decoders::client_ip(&[proxy], peer, header_lines);
    }
}

#[test]
fn a_trusted_proxy_forwards_the_client_it_names() {
    let proxy = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let peer = SocketAddr::new(proxy, 40_000);
    let client: IpAddr = "203.0.113.9".parse().unwrap();
    assert_eq!(
        decoders::client_ip(&[proxy], peer, [&b"198.51.100.1, 203.0.113.9:5555"[..]]),
        client
    );
}
