//! Reads: records of a partition from an offset, and the offset of a point in time. Both
//! are synchronous (fjall reads may block on disk): call them from `spawn_blocking`.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{Error, Log, Partition, StoredRecord, batch, keys};

impl Log {
    /// Reads records of `partition` from `offset`: whole batches, verified, until
    /// `max_bytes` (record sizes) or `max_records` is reached; at least one record when one is
    /// available. Returns an empty list at `next_offset`. Blocking.
    ///
    /// A batch that fails its CRC ends the read: records before it are returned; when it is
    /// the first batch, the call fails with [`Error::Corrupt`].
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
        let read_err = |source| Error::Read {
            topic: partition.topic.clone(),
            partition: partition.index,
            source,
        };
        // The batch holding `offset` is the last one whose base offset is ≤ offset.
        let first_key = match self
            .shared
            .records
            .range(partition.key(0)..=partition.key(offset))
            .next_back()
        {
            Some(guard) => guard.key().map_err(read_err)?,
            None => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for guard in self
            .shared
            .records
            .range(first_key.as_ref()..partition.key(next).as_slice())
        {
            let (key, value) = guard.into_inner().map_err(read_err)?;
            let base = keys::record_key_offset(&key).unwrap_or(u64::MAX);
            let value: Bytes = value.into();
            let records = match batch::decode(&value) {
                Ok((_, records)) => records,
                Err(source) => {
                    let err = Error::Corrupt {
                        topic: partition.topic.clone(),
                        partition: partition.index,
                        offset: base,
                        source,
                    };
                    tracing::error!(topic = %partition.topic, partition = partition.index, offset = base, error = %err, "corrupt batch refused");
                    if out.is_empty() {
                        return Err(err);
                    }
                    return Ok(out);
                }
            };
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
        Ok(out)
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
            let value: Bytes = value.into();
            let corrupt = |source| Error::Corrupt {
                topic: partition.topic.clone(),
                partition: partition.index,
                offset: keys::record_key_offset(&key).unwrap_or(u64::MAX),
                source,
            };
            let header = batch::verify(&value).map_err(corrupt)?;
            if header.max_timestamp_ms < ts_ms {
                continue;
            }
            let (_, records) = batch::decode(&value).map_err(corrupt)?;
            if let Some(r) = records.iter().find(|r| r.record.timestamp_ms >= ts_ms) {
                return Ok(r.offset);
            }
        }
        Ok(next)
    }
}
