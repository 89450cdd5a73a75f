//! Reads: records of a partition from an offset, and the offset of a point in time. Both
//! are synchronous (fjall reads may block on disk): call them from `spawn_blocking`.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{
    Error, Log, Partition, Shared, StoredRecord, batch, keys,
    segment::{FrameRead, Pointer},
};

impl Shared {
    /// The batch a `records` value of `partition` at offset `base` holds or points at. A
    /// frame read from a segment has its CRC32C verified; a batch held whole is returned as
    /// stored (decoding verifies it). Errors: [`Error::Missing`] when its segment file is
    /// gone, [`Error::Corrupt`] when the segment does not hold the frame where the pointer
    /// says, [`Error::SegmentRead`] when the file cannot be read. Blocking.
    pub(crate) fn resolve(
        &self,
        partition: &Partition,
        base: u64,
        value: fjall::Slice,
    ) -> Result<Bytes, Error> {
        let Some(pointer) = Pointer::decode(&value) else {
            return Ok(value.into());
        };
        match self.segments.read(partition.prefix, &pointer) {
            Ok(FrameRead::Batch(bytes)) => Ok(bytes),
            Ok(FrameRead::Gone) => Err(Error::Missing {
                topic: partition.topic.clone(),
                partition: partition.index,
                from: base,
                to: pointer.header().map_or(base + 1, |h| h.next_offset()),
            }),
            Ok(FrameRead::Damaged) => Err(Error::Corrupt {
                topic: partition.topic.clone(),
                partition: partition.index,
                offset: base,
                source: batch::DecodeError::FrameMismatch,
            }),
            Err(source) => Err(Error::SegmentRead {
                topic: partition.topic.clone(),
                partition: partition.index,
                source,
            }),
        }
    }
}

impl Log {
    /// Reads records of `partition` from `offset`: whole batches, verified, until
    /// `max_bytes` (record sizes) or `max_records` is reached; at least one record when one is
    /// available. Returns an empty list at `next_offset`. Blocking.
    ///
    /// Damage ends the read: the intact records before it are returned; when the damage
    /// is where the read starts, the call fails with the error that names it: a batch that
    /// fails its CRC ([`Error::Corrupt`]), offsets with no stored batch ([`Error::Missing`],
    /// e.g. a lost table or blob file), or a batch the storage engine cannot read back
    /// ([`Error::Damaged`], a failed block checksum). An offset is never answered with
    /// another offset's record.
    pub fn read(
        &self,
        partition: &Partition,
        offset: u64,
        max_bytes: usize,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        let next = partition.next_offset();
        let earliest = partition.earliest_offset();
        if offset < earliest || offset > next {
            return Err(Error::OffsetOutOfRange {
                topic: partition.topic.clone(),
                partition: partition.index,
                offset,
                earliest,
                next,
            });
        }
        if offset == next {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        // Ends the read at damage: what was read so far, or the damage itself.
        let stop = |out: Vec<StoredRecord>, err: Error| {
            let (what, at) = match &err {
                Error::Corrupt { offset, .. } => ("corrupt batch refused", *offset),
                Error::Missing { from, .. } => ("missing records refused", *from),
                Error::Damaged { offset, .. } => ("unreadable records refused", *offset),
                _ => ("read failed", offset),
            };
            tracing::error!(topic = %partition.topic, partition = partition.index, offset = at, error = %err, "{what}");
            if err.is_data_loss() {
                super::relaxed_add(&self.shared.stats.data_loss_reads, 1);
            }
            if out.is_empty() { Err(err) } else { Ok(out) }
        };
        let damage = |at: u64, source: fjall::Error| {
            Error::from_read(&partition.topic, partition.index, at, source)
        };
        // The batch holding `offset` is the last one whose base offset is ≤ offset.
        let first_key = match self
            .shared
            .records
            .range(partition.key(0)..=partition.key(offset))
            .next_back()
        {
            Some(guard) => match guard.key() {
                Ok(k) => k,
                Err(e) => return stop(out, damage(offset, e)),
            },
            None => partition.key(offset).to_vec().into(),
        };
        let mut bytes = 0usize;
        // The first offset not yet seen in a batch: a batch starting after it means the
        // offsets between are missing.
        let mut expected = offset;
        for guard in self
            .shared
            .records
            .range(first_key.as_ref()..partition.key(next).as_slice())
        {
            let (key, value) = match guard.into_inner() {
                Ok(kv) => kv,
                Err(e) => return stop(out, damage(expected, e)),
            };
            let base = keys::record_key_offset(&key).unwrap_or(u64::MAX);
            if base > expected {
                expected = past_accepted(partition, expected, base);
                if base > expected {
                    return stop(out, Self::missing(partition, expected, base));
                }
            }
            let value = match self.shared.resolve(partition, base, value) {
                Ok(batch) => batch,
                Err(err) => return stop(out, err),
            };
            let (header, records) = match batch::decode(&value) {
                Ok(decoded) => decoded,
                Err(source) => {
                    let err = Error::Corrupt {
                        topic: partition.topic.clone(),
                        partition: partition.index,
                        offset: base,
                        source,
                    };
                    return stop(out, err);
                }
            };
            expected = expected.max(header.next_offset());
            for r in records {
                if r.offset < offset {
                    continue;
                }
                bytes += r.record.size();
                out.push(r);
                if out.len() >= max_records || bytes >= max_bytes {
                    return Ok(out);
                }
            }
        }
        if expected < next {
            expected = past_accepted(partition, expected, next);
            if expected < next {
                return stop(out, Self::missing(partition, expected, next));
            }
        }
        Ok(out)
    }

    /// [`Error::Missing`] for offsets `from..to` of `partition`.
    fn missing(partition: &Partition, from: u64, to: u64) -> Error {
        Error::Missing {
            topic: partition.topic.clone(),
            partition: partition.index,
            from,
            to,
        }
    }

    /// Offset of the first record of `partition` with a timestamp at or after `ts_ms`, or
    /// the next offset when there is none. Reads batch headers from the earliest batch on
    /// and decodes only the batch that holds the answer. Blocking.
    pub fn offset_for_timestamp(&self, partition: &Partition, ts_ms: i64) -> Result<u64, Error> {
        let next = partition.next_offset();
        let read_err = |source| Error::Read {
            topic: partition.topic.clone(),
            partition: partition.index,
            source,
        };
        for guard in self
            .shared
            .records
            .range(partition.key(partition.head_base.load(Ordering::Relaxed))..partition.key(next))
        {
            let (key, value) = guard.into_inner().map_err(read_err)?;
            let base = keys::record_key_offset(&key).unwrap_or(u64::MAX);
            let corrupt = |source| Error::Corrupt {
                topic: partition.topic.clone(),
                partition: partition.index,
                offset: base,
                source,
            };
            let (header, _) = super::segment::stored_header(&value).map_err(corrupt)?;
            if header.max_timestamp_ms < ts_ms {
                continue;
            }
            let value = self.shared.resolve(partition, base, value)?;
            let (_, records) = batch::decode(&value).map_err(corrupt)?;
            if let Some(r) = records.iter().find(|r| r.record.timestamp_ms >= ts_ms) {
                return Ok(r.offset);
            }
        }
        Ok(next)
    }
}

/// The first offset at or after `from` (and at most `until`) that is not in an accepted lost
/// range of `partition`: reads step over losses accepted with `weir topic repair`.
fn past_accepted(partition: &Partition, mut from: u64, until: u64) -> u64 {
    while from < until {
        match partition.accepted_loss_end(from) {
            Some(end) => from = end,
            None => break,
        }
    }
    from.min(until)
}
