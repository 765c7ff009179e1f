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
