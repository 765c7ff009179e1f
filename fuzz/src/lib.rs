//! What the fuzz targets share.

use keydrop_engine::codec::FORMAT_VERSION;

/// `payload` behind a valid record header (format version and CRC-32, as
/// `engine/src/codec.rs` writes them): mutated payloads then reach the decoders
/// behind the checksum, which random bytes almost never pass.
pub fn with_valid_checksum(payload: &[u8]) -> Vec<u8> {
    let mut record = vec![FORMAT_VERSION];
    record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// The record a fuzz input stands for: its first byte says whether the rest is taken
/// as it is (even) or put behind a valid header (odd), so that half the inputs reach
/// the payload decoder.
pub fn record_from(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    Some(if mode % 2 == 0 {
        rest.to_vec()
    } else {
        with_valid_checksum(rest)
    })
}

/// The journal value a fuzz input stands for: its first byte picks the rest taken as
/// it is, put behind a valid record header, or cut at every `0xff` into records each
/// behind a valid header and framed as a run (`codec::encode_run`), so that the run
/// framing and the records inside a run are both reached.
pub fn journal_value_from(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    Some(match mode % 3 {
        0 => rest.to_vec(),
        1 => with_valid_checksum(rest),
        _ => {
            let records: Vec<Vec<u8>> = rest
                .split(|&b| b == 0xff)
                .map(with_valid_checksum)
                .collect();
            keydrop_engine::codec::encode_run(records.iter().map(Vec::as_slice))
        }
    })
}
