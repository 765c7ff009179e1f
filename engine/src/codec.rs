//! The one place that knows the bytes on disk. Every record is
//! `format version (1) | CRC-32 of the payload (4, LE) | postcard payload`, so a
//! record written by another version is recognised, and torn or flipped bytes are
//! reported instead of decoded into nonsense. Decoding never panics: every decoder
//! here takes untrusted bytes (disk corruption, an imported export bundle).
//!
//! A journal value is one record, or a run of one SKU's records with consecutive
//! sequence numbers stored under the first one's key:
//! `RUN_TAG | record count (u32 LE) | (record length (u32 LE) | record)*`, each record
//! with its own header and checksum. A group commit holds many records of the same
//! SKU; as a run they cost RocksDB one key (one memtable insert) instead of one each.
//! A record starts with its format version, never with `RUN_TAG`, so the first byte
//! tells the two apart.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::SkuId;
use crate::sku::{Event, SkuSnapshot, SkuSnapshotRef};

/// Bumped whenever the encoding of any record changes.
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 5;
/// Leads a journal value that is a run of records. Not a format version: those count
/// up from 1 and will not reach it.
const RUN_TAG: u8 = 0xF0;
const _: () = assert!(FORMAT_VERSION != RUN_TAG);
/// The width of a run's record count and of each record's length.
const RUN_LENGTH_LEN: usize = 4;
/// Separates the SKU id from the sequence number in journal keys; SKU ids cannot
/// contain it, so each SKU's records are one contiguous, ordered key range.
const KEY_SEPARATOR: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    #[error("record is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("record has format version {found}, this build reads {FORMAT_VERSION}")]
    Version { found: u8 },
    #[error("record checksum mismatch")]
    Checksum,
    #[error("record payload does not decode: {0}")]
    Payload(String),
    #[error("malformed journal key")]
    Key,
}

fn open_record(bytes: &[u8]) -> Result<&[u8], CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Truncated(bytes.len()));
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(CodecError::Version { found: bytes[0] });
    }
    let checksum = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[HEADER_LEN..];
    if crc32fast::hash(payload) != checksum {
        return Err(CodecError::Checksum);
    }
    Ok(payload)
}

/// Room for a typical journal record (one command's events), so encoding one
/// allocates once.
const TYPICAL_RECORD_BYTES: usize = 128;

/// The payload is serialised straight after a header whose checksum is filled in
/// last: one buffer per record, not a growing payload copied behind a header. Every
/// order pays for this on the actor's thread.
fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut record = Vec::with_capacity(TYPICAL_RECORD_BYTES);
    record.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0, 0]);
    let mut record =
        postcard::to_extend(value, record).expect("in-memory serialisation cannot fail");
    let checksum = crc32fast::hash(&record[HEADER_LEN..]);
    record[1..HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
    record
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let payload = open_record(bytes)?;
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|e| CodecError::Payload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Payload(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(value)
}

/// The events one command produced; journaled as one record.
pub fn encode_events(events: &[crate::sku::Event]) -> Vec<u8> {
    encode(events)
}

pub fn decode_events(bytes: &[u8]) -> Result<Vec<Event>, CodecError> {
    decode(bytes)
}

/// Records of one SKU with consecutive sequence numbers, as one journal value (see
/// the module doc). Each is a whole record, as [`encode_events`] made it.
pub fn encode_run<'r>(records: impl IntoIterator<Item = &'r [u8]> + Clone) -> Vec<u8> {
    let (count, bytes) = records
        .clone()
        .into_iter()
        .fold((0usize, 0usize), |(count, bytes), record| {
            (count + 1, bytes + RUN_LENGTH_LEN + record.len())
        });
    let mut run = Vec::with_capacity(1 + RUN_LENGTH_LEN + bytes);
    run.push(RUN_TAG);
    run.extend_from_slice(&length_field(count));
    for record in records {
        run.extend_from_slice(&length_field(record.len()));
        run.extend_from_slice(record);
    }
    run
}

fn length_field(len: usize) -> [u8; RUN_LENGTH_LEN] {
    u32::try_from(len)
        .expect("the journal writer closes a run at 16 MiB, and a batch holds 4,096 records")
        .to_le_bytes()
}

/// The records a journal value holds, in sequence order: the value itself when it
/// is one record, each record of a run otherwise. Only the framing is checked here
/// (a run cut anywhere is an error); each record's header and checksum are checked
/// when it is decoded.
pub fn split_journal_value(value: &[u8]) -> Result<Vec<&[u8]>, CodecError> {
    let Some((&RUN_TAG, rest)) = value.split_first() else {
        return Ok(vec![value]);
    };
    let truncated = || CodecError::Truncated(value.len());
    let (count, mut rest) = rest
        .split_first_chunk::<RUN_LENGTH_LEN>()
        .ok_or_else(truncated)?;
    let count = u32::from_le_bytes(*count) as usize;
    if count == 0 {
        return Err(CodecError::Payload("a run of no records".into()));
    }
    // Every record takes at least its length field: a count the bytes cannot hold
    // is refused before anything is allocated for it.
    if count > rest.len() / RUN_LENGTH_LEN {
        return Err(truncated());
    }
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, after) = rest
            .split_first_chunk::<RUN_LENGTH_LEN>()
            .ok_or_else(truncated)?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > after.len() {
            return Err(truncated());
        }
        let (record, after) = after.split_at(len);
        records.push(record);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(CodecError::Payload(format!(
            "{} bytes after a run's last record",
            rest.len()
        )));
    }
    Ok(records)
}

#[derive(Serialize)]
struct SnapshotRecordRef<'a> {
    seq: u64,
    sku: SkuSnapshotRef<'a>,
}

#[derive(Deserialize)]
struct SnapshotRecord {
    seq: u64,
    sku: SkuSnapshot,
}

/// A SKU's whole state as of journal sequence `seq`. The same record is the export
/// bundle that moves a SKU between nodes.
pub fn encode_snapshot(seq: u64, sku: SkuSnapshotRef<'_>) -> Vec<u8> {
    encode(&SnapshotRecordRef { seq, sku })
}

pub fn decode_snapshot(bytes: &[u8]) -> Result<(u64, SkuSnapshot), CodecError> {
    let record: SnapshotRecord = decode(bytes)?;
    Ok((record.seq, record.sku))
}

pub fn journal_key(sku: &SkuId, seq: u64) -> Vec<u8> {
    let mut key = journal_prefix(sku);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The key prefix shared by every journal record of one SKU.
pub fn journal_prefix(sku: &SkuId) -> Vec<u8> {
    let mut key = Vec::with_capacity(sku.as_str().len() + 9);
    key.extend_from_slice(sku.as_str().as_bytes());
    key.push(KEY_SEPARATOR);
    key
}

pub fn parse_journal_key(key: &[u8]) -> Result<(SkuId, u64), CodecError> {
    if key.len() < 10 || key[key.len() - 9] != KEY_SEPARATOR {
        return Err(CodecError::Key);
    }
    let (sku, rest) = key.split_at(key.len() - 9);
    let sku = std::str::from_utf8(sku).map_err(|_| CodecError::Key)?;
    let sku = SkuId::parse(sku).map_err(|_| CodecError::Key)?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&rest[1..]);
    Ok((sku, u64::from_be_bytes(seq)))
}

pub fn snapshot_key(sku: &SkuId) -> Vec<u8> {
    sku.as_str().as_bytes().to_vec()
}

pub fn parse_snapshot_key(key: &[u8]) -> Result<SkuId, CodecError> {
    let sku = std::str::from_utf8(key).map_err(|_| CodecError::Key)?;
    SkuId::parse(sku).map_err(|_| CodecError::Key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::ids::OrderId;

    fn sample() -> Vec<Event> {
        let sku = SkuId::parse("s").unwrap();
        vec![
            Event::Cancelled {
                order_id: OrderId::generate(&sku),
                at: Timestamp(5),
            },
            Event::Expired {
                order_ids: vec![OrderId::generate(&sku)],
                at: Timestamp(9),
            },
        ]
    }

    #[test]
    fn events_round_trip() {
        let events = sample();
        assert_eq!(decode_events(&encode_events(&events)).unwrap(), events);
    }

    /// The layout in the module comment, byte for byte, for a record that fits the
    /// first buffer and for one that outgrows it.
    #[test]
    fn records_are_version_then_checksum_then_postcard_payload() {
        let small = sample();
        let large = vec![7u32; 4 * TYPICAL_RECORD_BYTES];
        for (record, payload) in [
            (encode(&small), postcard::to_allocvec(&small).unwrap()),
            (encode(&large), postcard::to_allocvec(&large).unwrap()),
        ] {
            assert_eq!(record[0], FORMAT_VERSION);
            assert_eq!(
                record[1..HEADER_LEN],
                crc32fast::hash(&payload).to_le_bytes()
            );
            assert_eq!(record[HEADER_LEN..], payload[..]);
        }
    }

    /// One record's bytes, written down: a change to postcard, serde or an event's
    /// fields that would make this build unable to read what an earlier one wrote
    /// shows here, and needs a new FORMAT_VERSION.
    #[test]
    fn a_known_record_keeps_its_bytes() {
        let events = vec![Event::Cancelled {
            order_id: "00112233445566778899aabbccddeeff".parse().unwrap(),
            at: Timestamp(1_800_000_000_123),
        }];
        let record = encode_events(&events);
        // Version 1 | CRC-32 | one event | variant 5 | the id's 16 bytes | varint time.
        assert_eq!(
            hex::encode(&record),
            "01_35d8b1e2_01_05_00112233445566778899aabbccddeeff_fba0f1c2b134".replace('_', "")
        );
        assert_eq!(decode_events(&record).unwrap(), events);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let bytes = encode_events(&sample());
        for len in 0..bytes.len() {
            assert!(decode_events(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                assert!(decode_events(&flipped).is_err(), "flip byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn a_sealed_secret_too_short_for_its_header_is_refused() {
        use crate::vault::SealedSecret;
        for len in [0, 1, 5, 16] {
            let short = encode(&vec![1u8; len]);
            assert!(decode::<SealedSecret>(&short).is_err(), "{len} bytes");
        }
        let mut wrong_version = vec![0u8; 64];
        wrong_version[0] = 0xee;
        assert!(decode::<SealedSecret>(&encode(&wrong_version)).is_err());
    }

    #[test]
    fn a_run_splits_into_its_records_and_a_single_record_into_itself() {
        let records: Vec<Vec<u8>> = (0..3u32)
            .map(|n| encode_events(&vec![sample()[0].clone(); n as usize]))
            .collect();
        let run = encode_run(records.iter().map(Vec::as_slice));
        assert_eq!(run[0], RUN_TAG);
        let split = split_journal_value(&run).unwrap();
        assert_eq!(split, records.iter().map(Vec::as_slice).collect::<Vec<_>>());
        for record in split {
            decode_events(record).unwrap();
        }
        assert_eq!(
            split_journal_value(&records[1]).unwrap(),
            vec![&records[1][..]]
        );
    }

    #[test]
    fn a_cut_padded_or_empty_run_is_an_error() {
        let record = encode_events(&sample());
        let run = encode_run([record.as_slice(), record.as_slice()]);
        // (Cut to nothing, it is an empty value: one record, refused when decoded.)
        for len in 1..run.len() {
            assert!(split_journal_value(&run[..len]).is_err(), "cut to {len}");
        }
        let mut padded = run.clone();
        padded.push(0);
        assert!(split_journal_value(&padded).is_err());
        assert!(split_journal_value(&encode_run(std::iter::empty::<&[u8]>())).is_err());
        // A count no bytes could hold.
        assert!(split_journal_value(&[RUN_TAG, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn journal_keys_round_trip_and_group_by_sku() {
        let a = SkuId::parse("a").unwrap();
        let ab = SkuId::parse("ab").unwrap();
        assert_eq!(
            parse_journal_key(&journal_key(&a, 7)).unwrap(),
            (a.clone(), 7)
        );
        // Every key of "a" sorts before every key of "ab".
        assert!(journal_key(&a, u64::MAX) < journal_key(&ab, 0));
        assert!(journal_key(&a, 1) < journal_key(&a, 256));
        assert!(parse_journal_key(b"short").is_err());
        assert!(parse_journal_key(b"a b\0\0\0\0\0\0\0\0\x01").is_err());
    }
}
