//! Accepting a loss: `weir topic repair` finds the ranges of a partition that can no longer
//! be read (offsets with no stored batch, batches failing their CRC, storage that cannot be
//! read back), deletes the damaged batches and records the ranges as accepted (`l/` keys,
//! [`super::keys::loss_key`]). Reads then step over them instead of answering DATA_LOSS, so
//! consumers move on; the offsets are never given out again. Each accepted range is logged
//! and its records counted (`accepted_lost_records`).
//!
//! Until then every read that reaches a lost range answers DATA_LOSS naming it: a loss is
//! never skipped silently. Kafka has no such step (a consumer that meets a corrupt record
//! must seek past it); this makes the decision explicit, once, for every consumer.

use std::{collections::BTreeMap, sync::Arc};

use super::{Error, Log, Partition, Shared, batch, keys, relaxed_add, writer::Command};

/// Offsets of a partition whose records cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRange {
    /// Partition index.
    pub partition: u32,
    /// First lost offset.
    pub from: u64,
    /// First offset after the range.
    pub to: u64,
    /// Why: `missing` (no stored batch) or `damaged` (a batch that fails its check or
    /// cannot be read back).
    pub reason: &'static str,
}

/// What a scan of one partition found: lost ranges and the keys of damaged batches.
struct Found {
    ranges: Vec<LostRange>,
    damaged_keys: Vec<Vec<u8>>,
}

/// Scans `p` from its first stored batch to its next offset (blocking: reads every batch).
fn scan(shared: &Shared, p: &Partition) -> Result<Found, Error> {
    let records = &shared.records;
    let next = p.next_offset();
    let earliest = p.earliest_offset();
    let head = p
        .head_base
        .load(std::sync::atomic::Ordering::Relaxed)
        .min(earliest);
    let mut found = Found {
        ranges: Vec::new(),
        damaged_keys: Vec::new(),
    };
    let gap = |from: u64, to: u64, reason, ranges: &mut Vec<LostRange>| {
        // Already accepted parts and offsets below the head (retention) are not reported.
        let mut from = from.max(earliest);
        while from < to {
            if let Some(end) = p.accepted_loss_end(from) {
                from = end;
                continue;
            }
            let until = p
                .accepted_losses
                .read()
                .range(from..to)
                .next()
                .map_or(to, |(&start, _)| start);
            ranges.push(LostRange {
                partition: p.index,
                from,
                to: until,
                reason,
            });
            from = until;
        }
    };
    let mut expected = earliest;
    // A damaged batch's end is the next batch's start.
    let mut damaged_from: Option<u64> = None;
    for guard in records.range(p.key(head)..p.key(next)) {
        let key = guard
            .key()
            .map_err(|source| Error::from_read(&p.topic, p.index, expected, source))?;
        let Some(base) = keys::record_key_offset(&key) else {
            continue;
        };
        if let Some(from) = damaged_from.take() {
            gap(from, base, "damaged", &mut found.ranges);
            expected = expected.max(base);
        }
        if base > expected {
            gap(expected, base, "missing", &mut found.ranges);
            expected = base;
        }
        let intact = match records.get(&key) {
            Ok(Some(value)) => shared
                .resolve(p, base, value)
                .ok()
                .and_then(|b| batch::verify(&b).ok())
                .map(|h| h.next_offset()),
            Ok(None) => continue,
            Err(e) if super::error::is_damage(&e) => None,
            Err(source) => return Err(Error::from_read(&p.topic, p.index, base, source)),
        };
        if let Some(end) = intact {
            expected = expected.max(end);
        } else {
            damaged_from = Some(base);
            found.damaged_keys.push(key.to_vec());
        }
    }
    if let Some(from) = damaged_from {
        gap(from, next, "damaged", &mut found.ranges);
        expected = next;
    }
    if expected < next {
        gap(expected, next, "missing", &mut found.ranges);
    }
    Ok(found)
}

impl Log {
    /// Finds the lost ranges of `partitions` of `topic` (all when empty), deletes the
    /// damaged batches and accepts the loss: reads step over those ranges from then on.
    /// Returns the ranges accepted now (empty when nothing was lost, or everything lost was
    /// accepted before). Reads every batch of the partitions.
    ///
    /// # Errors
    ///
    /// [`Error::TopicNotFound`], [`Error::PartitionNotFound`], a read failure that is not
    /// damage to records (the partition cannot be scanned), or a failed commit.
    pub async fn repair(&self, topic: &str, partitions: &[u32]) -> Result<Vec<LostRange>, Error> {
        let t = self.topic(topic)?;
        let targets: Vec<Arc<Partition>> = if partitions.is_empty() {
            t.partitions()
        } else {
            partitions
                .iter()
                .map(|&i| t.partition(i))
                .collect::<Result<_, _>>()?
        };
        let mut accepted = Vec::new();
        for p in targets {
            let shared = Arc::clone(&self.shared);
            let scanned = Arc::clone(&p);
            let found = tokio::task::spawn_blocking(move || scan(&shared, &scanned))
                .await
                .map_err(|_| Error::ShuttingDown)??;
            if found.ranges.is_empty() && found.damaged_keys.is_empty() {
                continue;
            }
            let ranges: Vec<(u64, u64)> = found.ranges.iter().map(|r| (r.from, r.to)).collect();
            self.call(|reply| Command::AcceptLoss {
                partition: Arc::clone(&p),
                ranges,
                damaged_keys: found.damaged_keys,
                reply,
            })
            .await?;
            for r in &found.ranges {
                tracing::error!(topic = %p.topic, partition = r.partition, from = r.from, to = r.to, reason = r.reason, "loss accepted: reads step over these offsets from now on");
                relaxed_add(&self.shared.stats.accepted_lost_records, r.to - r.from);
            }
            accepted.extend(found.ranges);
        }
        Ok(accepted)
    }
}

/// Loads the accepted lost ranges (`l/`) into the partitions of `topics` (by key prefix).
pub(crate) fn recover_losses(
    meta: &fjall::Keyspace,
    partitions: &BTreeMap<[u8; 8], Arc<Partition>>,
) -> Result<usize, Error> {
    let mut n = 0;
    for guard in meta.prefix(keys::LOSS_PREFIX) {
        let (key, value) = guard.into_inner().map_err(|source| Error::ReadMetadata {
            prefix: "l/".into(),
            source,
        })?;
        let bad = |detail: &str| Error::RecoverMetadata {
            key: format!("{key:?}"),
            detail: detail.to_owned(),
        };
        let (prefix, from) = keys::parse_loss_key(&key).ok_or_else(|| bad("malformed key"))?;
        let to = u64::from_be_bytes(
            value
                .as_ref()
                .try_into()
                .map_err(|_| bad("expected 8 bytes"))?,
        );
        if let Some(p) = partitions.get(&prefix) {
            p.accepted_losses.write().insert(from, to);
            n += 1;
        }
    }
    Ok(n)
}
