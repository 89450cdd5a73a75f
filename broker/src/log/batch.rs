//! Record batches: the unit the log stores under one key, and its codec.
//!
//! This module owns the byte layout of a batch and its CRC32C. It knows nothing of fjall,
//! topics or gRPC. The layout (version 1, integers little-endian) is:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 1 | magic, `1` |
//! | 1 | 4 | CRC32C (Castagnoli) of every byte from offset 5 to the end |
//! | 5 | 2 | attributes, reserved, `0` |
//! | 7 | 4 | leader epoch: the Raft term of the entry on replicated partitions, `0` otherwise |
//! | 11 | 8 | base offset: offset of the first record |
//! | 19 | 4 | record count, at least 1 |
//! | 23 | 8 | first timestamp, ms since the epoch |
//! | 31 | 8 | max timestamp, ms since the epoch |
//! | 39 | … | records |
//!
//! Each record is: zigzag varint timestamp delta from the first timestamp; varint
//! `key length + 1` (`0` means no key) and the key; varint value length and the value; varint
//! header count and, per header, varint key length, key (UTF-8), varint value length, value.
//! The design follows Kafka's record batch v2 (KIP-98): one CRC over the whole batch, deltas
//! per record, a leader epoch in the header.

use bytes::{Buf, Bytes};
use prost::encoding::{decode_varint, encode_varint};

/// Batch format version written by this broker.
pub const MAGIC: u8 = 1;
/// Size of the fixed batch header in bytes.
pub const HEADER_LEN: usize = 39;

const CRC_RANGE_START: usize = 5;
const BASE_OFFSET_AT: usize = 11;
const LEADER_EPOCH_AT: usize = 7;

/// One message as the log stores it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Optional key; routes the record to a partition and is returned to consumers.
    pub key: Option<Bytes>,
    /// Payload bytes.
    pub value: Bytes,
    /// Headers in order: (UTF-8 key, value bytes). Keys may repeat.
    pub headers: Vec<(String, Bytes)>,
    /// Creation time in ms since the epoch; the broker fills in its clock when it is `0`.
    pub timestamp_ms: i64,
}

impl Record {
    /// Bytes this record counts against a size limit: key + value + header keys and values.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// A record read back from the log, with its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Offset of the record in its partition.
    pub offset: u64,
    /// The record.
    pub record: Record,
}

/// Why a stored batch could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The batch is shorter than its header.
    #[error("batch is {0} bytes, shorter than the {HEADER_LEN}-byte header")]
    Truncated(usize),
    /// The magic byte names a format this broker does not know.
    #[error("unknown batch format {0} (this broker writes and reads {MAGIC})")]
    UnknownMagic(u8),
    /// The stored CRC32C differs from the one computed over the bytes.
    #[error("CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes as read.
        computed: u32,
    },
    /// The records do not parse although the CRC matched (a writer bug, not disk damage).
    #[error("malformed records: {0}")]
    Malformed(&'static str),
    /// The segment holds no frame of this batch where its index points (a torn or lost
    /// write, another length there, or a failed CRC32C).
    #[error("the segment holds no whole frame of this batch where its index points")]
    FrameMismatch,
}

/// Fixed-size header fields of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Leader epoch: the Raft term of the entry on replicated partitions, 0 otherwise.
    pub leader_epoch: u32,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Number of records, at least 1.
    pub record_count: u32,
    /// Timestamp of the first record, ms since the epoch.
    pub first_timestamp_ms: i64,
    /// Largest record timestamp, ms since the epoch.
    pub max_timestamp_ms: i64,
}

impl BatchHeader {
    /// Offset one past the last record of the batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// Encodes `records` (at least one) into a batch with base offset 0 and a CRC.
///
/// Records with `timestamp_ms == 0` get `now_ms`. The base offset is set later by the single
/// writer with [`seal`], which also recomputes the CRC.
pub fn encode(records: &[Record], now_ms: i64) -> Vec<u8> {
    let ts = |r: &Record| {
        if r.timestamp_ms == 0 {
            now_ms
        } else {
            r.timestamp_ms
        }
    };
    let first_ts = records.first().map_or(now_ms, ts);
    let max_ts = records.iter().map(ts).max().unwrap_or(now_ms);
    let body: usize = records.iter().map(|r| r.size() + 16).sum();
    let mut buf = Vec::with_capacity(HEADER_LEN + body);
    buf.push(MAGIC);
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&0u64.to_le_bytes());
    buf.extend_from_slice(&(records.len() as u32).to_le_bytes());
    buf.extend_from_slice(&first_ts.to_le_bytes());
    buf.extend_from_slice(&max_ts.to_le_bytes());
    for r in records {
        encode_varint(zigzag(ts(r).wrapping_sub(first_ts)), &mut buf);
        match &r.key {
            Some(k) => {
                encode_varint(k.len() as u64 + 1, &mut buf);
                buf.extend_from_slice(k);
            }
            None => encode_varint(0, &mut buf),
        }
        encode_varint(r.value.len() as u64, &mut buf);
        buf.extend_from_slice(&r.value);
        encode_varint(r.headers.len() as u64, &mut buf);
        for (k, v) in &r.headers {
            encode_varint(k.len() as u64, &mut buf);
            buf.extend_from_slice(k.as_bytes());
            encode_varint(v.len() as u64, &mut buf);
            buf.extend_from_slice(v);
        }
    }
    let crc = crc32c::crc32c(buf.get(CRC_RANGE_START..).unwrap_or_default());
    if let Some(slot) = buf.get_mut(1..5) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    buf
}

/// Sets the base offset of an encoded batch and updates its CRC for the changed header
/// bytes, without a pass over the batch (O(log) of its size): the CRC [`encode`] computed
/// still covers the records, so a batch damaged after it was encoded stays detectable.
///
/// `batch` must come from [`encode`] (at least [`HEADER_LEN`] bytes); shorter input is left
/// untouched.
pub fn seal(batch: &mut [u8], base_offset: u64) {
    seal_with_epoch(batch, base_offset, 0);
}

/// [`seal`] with the leader epoch set too: the Raft term of the entry that holds the batch on
/// a replicated partition (Kafka keeps the leader epoch in each batch header, KIP-101), so
/// every replica stores the same bytes at the same offset. Terms above `u32::MAX` are stored
/// as `u32::MAX`.
pub fn seal_with_epoch(batch: &mut [u8], base_offset: u64, leader_epoch: u64) {
    if batch.len() < HEADER_LEN {
        return;
    }
    let epoch = u32::try_from(leader_epoch).unwrap_or(u32::MAX);
    let mut sealed = [0u8; SEALED_LEN];
    sealed[..4].copy_from_slice(&epoch.to_le_bytes());
    sealed[4..].copy_from_slice(&base_offset.to_le_bytes());
    let Some(stored) = batch.get(1..5).and_then(|b| b.try_into().ok()) else {
        return;
    };
    let stored = u32::from_le_bytes(stored);
    let Some(fields) = batch.get_mut(LEADER_EPOCH_AT..LEADER_EPOCH_AT + SEALED_LEN) else {
        return;
    };
    let mut changed = [0u8; SEALED_LEN];
    for ((c, old), new) in changed.iter_mut().zip(fields.iter()).zip(sealed) {
        *c = old ^ new;
    }
    fields.copy_from_slice(&sealed);
    let crc = stored ^ crc_of_difference(&changed, batch.len() - LEADER_EPOCH_AT - SEALED_LEN);
    if let Some(slot) = batch.get_mut(1..5) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
}

/// Bytes [`seal_with_epoch`] sets: the leader epoch (u32) and the base offset (u64), one
/// after the other.
const SEALED_LEN: usize = 12;
const _: () = assert!(BASE_OFFSET_AT == LEADER_EPOCH_AT + 4);

/// How the CRC-32C of a byte string changes when the bytes `changed` (old XOR new) are
/// flipped `after` bytes before its end: CRCs are linear over GF(2), so
/// `crc(new) = crc(old) ^ raw(old ^ new)`, where `raw` is the CRC register without its
/// initial value and final XOR (`crc(d) ^ crc(0…0)`); the zeros before `changed` leave
/// `raw` at zero, and the `after` zero bytes that follow multiply it by `x^(8·after)`
/// modulo the polynomial ([`shift`]). Costs a few hundred word operations instead of a
/// pass over the batch, and keeps the CRC computed when the batch was encoded, so a byte
/// changed in memory between [`encode`] and the disk is caught by [`verify`] rather than
/// covered by a new CRC.
fn crc_of_difference(changed: &[u8; SEALED_LEN], after: usize) -> u32 {
    let raw = crc32c::crc32c(changed) ^ crc32c::crc32c(&[0u8; SEALED_LEN]);
    shift(raw, after)
}

/// CRC-32C's polynomial, bit-reflected (as `crc32c` computes it).
const POLY: u32 = 0x82F6_3B78;

/// `a · b` modulo [`POLY`], both reflected (bit 31 is `x^0`): zlib's `multmodp` (Mark
/// Adler, zlib 1.2.12 `crc32.c`).
const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// `x^(2^k)` modulo [`POLY`] for k in 0..67, enough for any `usize` count of bytes. zlib's
/// `x2n_table` has 32 entries and wraps around (`k & 31`), which it relies on for CRC-32's
/// polynomial; modulo CRC-32C's, `x^(2^32)` is not `x`, and shifts past 2^29 bytes came
/// out wrong that way.
const X2N: [u32; 67] = {
    let mut table = [0u32; 67];
    let mut p: u32 = 1 << 30; // x^1
    table[0] = p;
    let mut k = 1;
    while k < 67 {
        p = multmodp(p, p);
        table[k] = p;
        k += 1;
    }
    table
};

/// The CRC register `crc` after `bytes` zero bytes: `crc · x^(8·bytes)` modulo [`POLY`]
/// (zlib's `crc32_combine_op(crc, 0, crc32_combine_gen(bytes))`), in O(log `bytes`)
/// multiplications. The `crc32c` crate's `crc32c_combine` computes the same with zlib's
/// older matrix method, about as slow as a pass over a 1 MB batch.
fn shift(crc: u32, bytes: usize) -> u32 {
    let mut op: u32 = 1 << 31; // x^0
    let mut n = bytes;
    let mut k = 3; // a byte is 2^3 bits
    while n != 0 {
        if n & 1 != 0 {
            op = multmodp(X2N[k], op);
        }
        n >>= 1;
        k += 1;
    }
    multmodp(op, crc)
}

/// Checks the magic byte and CRC of a stored batch and returns its header.
pub fn verify(batch: &[u8]) -> Result<BatchHeader, DecodeError> {
    let header = parse_header(batch)?;
    let stored = u32::from_le_bytes([batch[1], batch[2], batch[3], batch[4]]);
    let computed = crc32c::crc32c(batch.get(CRC_RANGE_START..).unwrap_or_default());
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    Ok(header)
}

/// The header of a batch from its first [`HEADER_LEN`] bytes (more are ignored): checks
/// the magic byte only, not the CRC, which covers the whole batch ([`verify`] does). For
/// a header kept apart from its batch (the segment store's index).
pub fn parse_header(batch: &[u8]) -> Result<BatchHeader, DecodeError> {
    let mut h = batch
        .get(..HEADER_LEN)
        .ok_or(DecodeError::Truncated(batch.len()))?;
    let magic = h.get_u8();
    if magic != MAGIC {
        return Err(DecodeError::UnknownMagic(magic));
    }
    let _crc = h.get_u32_le();
    let _attributes = h.get_u16_le();
    Ok(BatchHeader {
        leader_epoch: h.get_u32_le(),
        base_offset: h.get_u64_le(),
        record_count: h.get_u32_le(),
        first_timestamp_ms: h.get_i64_le(),
        max_timestamp_ms: h.get_i64_le(),
    })
}

/// Verifies and decodes a stored batch, returning its header and records.
///
/// Values are zero-copy slices of `batch`.
pub fn decode(batch: &Bytes) -> Result<(BatchHeader, Vec<StoredRecord>), DecodeError> {
    let header = verify(batch)?;
    let mut buf = batch.slice(HEADER_LEN..);
    let mut out = Vec::with_capacity(header.record_count as usize);
    for i in 0..header.record_count {
        let delta = decode_varint(&mut buf).map_err(|_| DecodeError::Malformed("timestamp"))?;
        let key_len = decode_varint(&mut buf).map_err(|_| DecodeError::Malformed("key length"))?;
        let key = if key_len == 0 {
            None
        } else {
            Some(take(&mut buf, key_len - 1, "key")?)
        };
        let value_len =
            decode_varint(&mut buf).map_err(|_| DecodeError::Malformed("value length"))?;
        let value = take(&mut buf, value_len, "value")?;
        let header_count =
            decode_varint(&mut buf).map_err(|_| DecodeError::Malformed("header count"))?;
        let mut headers = Vec::new();
        for _ in 0..header_count {
            let kl = decode_varint(&mut buf).map_err(|_| DecodeError::Malformed("header key"))?;
            let k = take(&mut buf, kl, "header key")?;
            let k = String::from_utf8(k.to_vec())
                .map_err(|_| DecodeError::Malformed("header key is not UTF-8"))?;
            let vl = decode_varint(&mut buf).map_err(|_| DecodeError::Malformed("header value"))?;
            headers.push((k, take(&mut buf, vl, "header value")?));
        }
        out.push(StoredRecord {
            offset: header.base_offset + u64::from(i),
            record: Record {
                key,
                value,
                headers,
                timestamp_ms: header.first_timestamp_ms.wrapping_add(unzigzag(delta)),
            },
        });
    }
    if buf.has_remaining() {
        return Err(DecodeError::Malformed(
            "trailing bytes after the last record",
        ));
    }
    Ok((header, out))
}

fn take(buf: &mut Bytes, len: u64, what: &'static str) -> Result<Bytes, DecodeError> {
    let len = usize::try_from(len).map_err(|_| DecodeError::Malformed(what))?;
    if len > buf.remaining() {
        return Err(DecodeError::Malformed(what));
    }
    Ok(buf.split_to(len))
}

#[allow(clippy::cast_sign_loss)]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[allow(clippy::cast_possible_wrap)]
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: Option<&str>, value: &str, ts: i64) -> Record {
        Record {
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Bytes::copy_from_slice(value.as_bytes()),
            headers: vec![("h".into(), Bytes::from_static(b"\x00\xff"))],
            timestamp_ms: ts,
        }
    }

    #[test]
    fn round_trip_keeps_every_field_and_assigns_offsets_from_the_base() {
        let records = vec![
            rec(Some("k"), "first\r", 1_700_000_000_000),
            rec(None, "", 0),
            rec(Some(""), "third", 1_699_999_999_000),
        ];
        let mut batch = encode(&records, 1_700_000_000_500);
        seal(&mut batch, 42);
        let (header, out) = decode(&Bytes::from(batch)).expect("decodes");
        assert_eq!(header.base_offset, 42);
        assert_eq!(header.record_count, 3);
        assert_eq!(header.next_offset(), 45);
        assert_eq!(header.max_timestamp_ms, 1_700_000_000_500);
        let offsets: Vec<u64> = out.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![42, 43, 44]);
        assert_eq!(out[0].record, records[0]);
        assert_eq!(out[1].record.timestamp_ms, 1_700_000_000_500);
        assert_eq!(out[1].record.key, None);
        assert_eq!(out[2].record, records[2]);
    }

    #[test]
    fn every_single_flipped_bit_is_detected() {
        let mut batch = encode(&[rec(Some("key"), "value", 5)], 5);
        seal(&mut batch, 7);
        for byte in 0..batch.len() {
            for bit in 0..8 {
                let mut bad = batch.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode(&Bytes::from(bad)).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn sealing_updates_the_crc_as_a_full_recomputation_would() {
        let values = [
            "",
            "v",
            "a longer value with more bytes than a cache line .....",
        ];
        for (count, base) in [(1, 0u64), (2, 1), (3, u64::MAX - 3), (40, 1 << 40)] {
            let records: Vec<Record> = values
                .iter()
                .cycle()
                .take(count)
                .zip(1_000..)
                .map(|(value, ts)| rec(None, value, ts))
                .collect();
            let mut batch = encode(&records, 1_000);
            // Sealed twice, as a replica re-seals an entry the leader sealed: each time the
            // CRC is the one of the bytes as they are.
            for (base, epoch) in [(base, 0), (base ^ 0xff, u64::from(u32::MAX) + 9)] {
                seal_with_epoch(&mut batch, base, epoch);
                let full = crc32c::crc32c(&batch[CRC_RANGE_START..]);
                assert_eq!(
                    batch[1..5],
                    full.to_le_bytes(),
                    "{count} records, base {base}"
                );
                let header = verify(&batch).expect("a sealed batch verifies");
                assert_eq!(header.base_offset, base);
            }
        }
    }

    #[test]
    fn shifting_by_zero_bytes_matches_the_crc_of_a_concatenation() {
        for crc in [0, 1, 0x8000_0000, 0xdead_beef, u32::MAX] {
            for bytes in [0, 1, 7, 8, 4096, 1 << 20, (1 << 30) + 3, u32::MAX as usize] {
                assert_eq!(
                    shift(crc, bytes),
                    crc32c::crc32c_combine(crc, 0, bytes),
                    "crc {crc:#x} after {bytes} zero bytes"
                );
            }
        }
    }

    #[test]
    fn a_record_damaged_before_sealing_stays_detected() {
        let mut batch = encode(&[rec(Some("key"), "value", 5)], 5);
        let last = batch.len() - 1;
        batch[last] ^= 0x10;
        seal(&mut batch, 7);
        assert!(matches!(verify(&batch), Err(DecodeError::Checksum { .. })));
    }

    #[test]
    fn truncated_batch_is_an_error_not_a_panic() {
        let batch = encode(&[rec(None, "v", 1)], 1);
        for len in 0..batch.len() {
            assert!(decode(&Bytes::copy_from_slice(&batch[..len])).is_err());
        }
    }

    #[test]
    fn zigzag_round_trips_extremes() {
        for v in [0, 1, -1, i64::MAX, i64::MIN, 12345, -98765] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
