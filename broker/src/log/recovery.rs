//! Start-up: the metadata schema's migration, then topics, partition counters and
//! idempotent producers from the `meta` keyspace.
//!
//! Recovery reads the stored counters and, per partition, only the last batch: its CRC is
//! checked and its end compared with the stored next offset. No log is scanned, so start-up
//! time does not grow with the data stored.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
};

use fjall::{Database, Keyspace, PersistMode};
use parking_lot::RwLock;

use super::{
    Error, Partition, Topic, checkpoint,
    idempotence::{ProducerState, Producers},
    keys,
    topic::{PartitionMeta, TopicMeta},
};

/// What start-up found, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Topics recovered.
    pub topics: usize,
    /// Partitions recovered.
    pub partitions: usize,
    /// Batches read during recovery: one tail batch per non-empty partition at most.
    pub batches_read: usize,
    /// Partitions whose tail batch failed its check (logged with topic, partition, offset).
    pub corrupt_tails: usize,
    /// Partitions whose stored counters were behind their stored batches (the journal's
    /// tail was lost after the records were flushed): the next offset was taken from the
    /// batches, so no offset is given out twice.
    pub counters_behind: usize,
    /// Partitions whose log end checkpoint was beyond everything stored: acknowledged
    /// records were lost with the journal's tail. The next offset was taken from the
    /// checkpoint, so those offsets are not given out again and reads of them answer that
    /// they are missing.
    pub acked_lost: usize,
    /// Damaged storage files moved to `quarantine/` before the database would open
    /// ([`super::salvage`]).
    pub quarantined: usize,
    /// Time to open fjall and recover, in ms.
    pub elapsed_ms: u64,
}

fn read_meta_err(prefix: &[u8]) -> impl Fn(fjall::Error) -> Error + '_ {
    move |source| Error::ReadMetadata {
        prefix: String::from_utf8_lossy(prefix).into_owned(),
        source,
    }
}

/// Brings the `meta` keyspace to [`keys::SCHEMA_VERSION`] and returns the next topic id.
///
/// Schema 1 (no `v/schema` key) stored `n/topic-id` little-endian: it is rewritten
/// big-endian. Schema 2 kept idempotent producers' sequences per topic: those entries are
/// dropped (sequences now count per partition, [`keys::producer_key`]). Either change is
/// written together with the version, in one atomic, fsynced batch, so a crash leaves
/// either schema.
pub(crate) fn migrate(db: &Database, meta: &Keyspace) -> Result<u32, Error> {
    let read = read_meta_err(keys::SCHEMA_KEY);
    let version = match meta.get(keys::SCHEMA_KEY).map_err(&read)? {
        Some(v) => {
            u32::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::RecoverMetadata {
                key: "v/schema".into(),
                detail: format!("expected 4 bytes, found {}", v.len()),
            })?)
        }
        None => 1,
    };
    if version > keys::SCHEMA_VERSION {
        return Err(Error::RecoverMetadata {
            key: "v/schema".into(),
            detail: format!(
                "the data directory has schema {version}, written by a newer broker; this broker reads up to {}",
                keys::SCHEMA_VERSION
            ),
        });
    }
    let stored_id = meta
        .get(keys::TOPIC_ID_KEY)
        .map_err(read_meta_err(keys::TOPIC_ID_KEY))?;
    let next_topic_id = match &stored_id {
        Some(v) => {
            let bytes: [u8; 4] = v.as_ref().try_into().map_err(|_| Error::RecoverMetadata {
                key: "n/topic-id".into(),
                detail: format!("expected 4 bytes, found {}", v.len()),
            })?;
            if version == 1 {
                u32::from_le_bytes(bytes)
            } else {
                u32::from_be_bytes(bytes)
            }
        }
        None => 1,
    };
    if version < keys::SCHEMA_VERSION {
        let mut wb = db.batch().durability(Some(PersistMode::SyncData));
        if stored_id.is_some() {
            wb.insert(meta, keys::TOPIC_ID_KEY, next_topic_id.to_be_bytes());
        }
        let mut per_topic_producers = 0u64;
        for guard in meta.prefix(keys::PRODUCER_PREFIX) {
            let key = guard.key().map_err(read_meta_err(keys::PRODUCER_PREFIX))?;
            if keys::parse_producer_key(&key).is_none() {
                wb.remove(meta, key);
                per_topic_producers += 1;
            }
        }
        wb.insert(meta, keys::SCHEMA_KEY, keys::SCHEMA_VERSION.to_be_bytes());
        wb.commit().map_err(Error::Commit)?;
        tracing::info!(
            from = version,
            to = keys::SCHEMA_VERSION,
            dropped_per_topic_producer_states = per_topic_producers,
            "metadata schema migrated"
        );
    }
    Ok(next_topic_id)
}

/// Loads every topic (`t/`) with its partitions' counters (`p/`), checked against the last
/// stored batch and the log end checkpoint (`ends`).
pub(crate) fn recover_topics(
    records: &Keyspace,
    meta: &Keyspace,
    ends: &checkpoint::Ends,
    report: &mut RecoveryReport,
) -> Result<BTreeMap<String, Arc<Topic>>, Error> {
    let mut topics = BTreeMap::new();
    for guard in meta.prefix(keys::TOPIC_PREFIX) {
        let (key, value) = guard
            .into_inner()
            .map_err(read_meta_err(keys::TOPIC_PREFIX))?;
        let key_text = String::from_utf8_lossy(&key).into_owned();
        let stored: TopicMeta =
            serde_json::from_slice(&value).map_err(|e| Error::RecoverMetadata {
                key: key_text.clone(),
                detail: e.to_string(),
            })?;
        let mut partitions = Vec::with_capacity(stored.config.partitions as usize);
        let appended = Arc::new(super::topic::Appends::default());
        for index in 0..stored.config.partitions {
            let prefix = keys::partition_prefix(stored.id, index);
            let state = match meta
                .get(keys::partition_meta_key(prefix))
                .map_err(|source| Error::Read {
                    topic: stored.name.clone(),
                    partition: index,
                    source,
                })? {
                Some(v) => PartitionMeta::decode(&v).ok_or_else(|| Error::RecoverMetadata {
                    key: format!("p/{}/{index}", stored.name),
                    detail: format!("expected 24 bytes, found {}", v.len()),
                })?,
                None => PartitionMeta::default(),
            };
            let probe =
                Partition::new(&stored.name, stored.id, index, state, Arc::clone(&appended));
            let state = catch_up(records, &probe, state, report)?;
            let end = ends.get(&probe.prefix).copied();
            let state = past_checkpoint(&probe, state, end.map(|e| e.next), report);
            let partition =
                Partition::new(&stored.name, stored.id, index, state, Arc::clone(&appended));
            *partition.last_log.lock() = end.and_then(|e| e.last_log);
            // The first stored batch may start before the (logical) earliest offset. Only
            // for a non-empty partition: the batch holding `earliest` is then found at once,
            // without stepping over tombstones.
            if state.next_offset != state.earliest_offset
                && let Some(Ok(first)) = records
                    .range(partition.key(0)..=partition.key(state.earliest_offset))
                    .next_back()
                    .map(fjall::Guard::key)
                && let Some(base) = keys::record_key_offset(&first)
            {
                partition.head_base.store(base, Ordering::Relaxed);
            }
            partitions.push(Arc::new(partition));
            report.partitions += 1;
        }
        report.topics += 1;
        topics.insert(
            stored.name.clone(),
            Arc::new(Topic {
                id: stored.id,
                name: stored.name,
                created_at_ms: stored.created_at_ms,
                config: RwLock::new(stored.config),
                partitions: RwLock::new(partitions),
                next_unkeyed: 0.into(),
                appended,
            }),
        );
    }
    Ok(topics)
}

/// Loads idempotent producers' state (`q/`).
pub(crate) fn recover_producers(meta: &Keyspace) -> Result<Producers, Error> {
    let mut out = Producers::new();
    for guard in meta.prefix(keys::PRODUCER_PREFIX) {
        let (key, value) = guard
            .into_inner()
            .map_err(read_meta_err(keys::PRODUCER_PREFIX))?;
        let bad = |detail: String| Error::RecoverMetadata {
            key: String::from_utf8_lossy(&key).into_owned(),
            detail,
        };
        let (topic, partition, producer) =
            keys::parse_producer_key(&key).ok_or_else(|| bad("malformed producer key".into()))?;
        let state = ProducerState::decode(&value)
            .map_err(|e| bad(format!("unreadable producer state: {e}")))?;
        out.insert((topic, partition, producer), state);
    }
    Ok(out)
}

/// The end of the last stored batch of a partition, checked: its CRC, and that its key
/// matches its header. `None` when there is no batch or it fails its check (logged and
/// counted).
fn tail_end(records: &Keyspace, p: &Partition, report: &mut RecoveryReport) -> Option<u64> {
    let guard = records.prefix(p.prefix).next_back()?;
    report.batches_read += 1;
    match guard.into_inner() {
        Ok((key, value)) => {
            let base = keys::record_key_offset(&key).unwrap_or(u64::MAX);
            match super::segment::stored_header(&value).map(|(h, _)| h) {
                Ok(h) if h.base_offset == base => Some(h.next_offset()),
                Ok(h) => {
                    report.corrupt_tails += 1;
                    tracing::error!(topic = %p.topic, partition = p.index, offset = base, header_offset = h.base_offset, "tail batch is stored under another offset than its header says");
                    None
                }
                Err(e) => {
                    report.corrupt_tails += 1;
                    tracing::error!(topic = %p.topic, partition = p.index, offset = base, error = %e, "tail batch failed its check at start-up");
                    None
                }
            }
        }
        Err(e) => {
            report.corrupt_tails += 1;
            tracing::error!(topic = %p.topic, partition = p.index, error = %e, "tail batch unreadable at start-up");
            None
        }
    }
}

/// Checks a partition's stored counters against its last stored batch and returns the
/// counters to start from. Offsets are never given out twice:
///
/// - batches beyond the counters (the journal's tail, which held the counters, was lost
///   after the records had been flushed to tables): the next offset and the bytes are taken
///   from the batches, logged and counted;
/// - counters beyond the last batch (records lost): the counters stay; reads of the range
///   between answer that it is missing ([`Error::Missing`]).
fn catch_up(
    records: &Keyspace,
    p: &Partition,
    mut state: PartitionMeta,
    report: &mut RecoveryReport,
) -> Result<PartitionMeta, Error> {
    let Some(end) = tail_end(records, p, report) else {
        if state.next_offset != state.earliest_offset
            && records.prefix(p.prefix).next_back().is_none()
        {
            report.corrupt_tails += 1;
            tracing::error!(topic = %p.topic, partition = p.index, next_offset = state.next_offset, "partition counters say records exist but none are stored");
        }
        return Ok(state);
    };
    if end > state.next_offset {
        // Every batch from the stored next offset on is beyond the counters.
        let mut added = 0u64;
        for guard in records.range(p.key(state.next_offset)..p.key(end)) {
            let (_, value) = guard.into_inner().map_err(|source| Error::Read {
                topic: p.topic.clone(),
                partition: p.index,
                source,
            })?;
            added += super::segment::stored_len(&value);
        }
        tracing::warn!(topic = %p.topic, partition = p.index, stored_next_offset = state.next_offset, batches_end = end, "stored counters were behind the stored batches (a lost journal tail); the next offset is taken from the batches");
        report.counters_behind += 1;
        state.next_offset = end;
        state.bytes += added;
    } else if end < state.next_offset {
        tracing::error!(topic = %p.topic, partition = p.index, from = end, to = state.next_offset, "the last stored batch ends before the stored next offset: these offsets are missing and are reported as such to readers");
        report.corrupt_tails += 1;
    }
    Ok(state)
}

/// Moves the next offset to the log end checkpoint when the checkpoint is beyond it: the
/// records up to the checkpoint were acknowledged and are lost (the journal's tail was
/// damaged after a crash). Those offsets then read as missing ([`Error::Missing`]) and are
/// never acknowledged again. Logged and counted.
fn past_checkpoint(
    p: &Partition,
    mut state: PartitionMeta,
    checkpoint: Option<u64>,
    report: &mut RecoveryReport,
) -> PartitionMeta {
    if let Some(end) = checkpoint
        && end > state.next_offset
    {
        tracing::error!(topic = %p.topic, partition = p.index, from = state.next_offset, to = end, "acknowledged records were lost with the journal's tail: these offsets are missing, are reported as such to readers and are not given out again");
        report.acked_lost += 1;
        state.next_offset = end;
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Log, LogOptions, TopicConfig};

    /// A data directory as an earlier version left it: topic `old` (id 1, one partition) in
    /// `meta`, plus what `more` writes there, persisted.
    fn write_old_directory(path: &std::path::Path, more: impl FnOnce(&Keyspace)) {
        let db = Database::builder(path).open().expect("db");
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .expect("meta");
        let _records = db
            .keyspace("records", fjall::KeyspaceCreateOptions::default)
            .expect("records");
        let topic = TopicMeta {
            id: 1,
            name: "old".into(),
            config: TopicConfig::new(1, 0).expect("config"),
            created_at_ms: 1,
        };
        meta.insert(
            keys::topic_key("old"),
            serde_json::to_vec(&topic).expect("json"),
        )
        .expect("topic");
        more(&meta);
        db.persist(PersistMode::SyncAll).expect("persist");
    }

    /// A data directory written by schema 1 (`n/topic-id` little-endian, no `v/schema`)
    /// opens with its topics, the next topic gets the next id, and the value is stored
    /// big-endian from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_schema_1_data_directory_is_migrated() {
        let dir = tempfile::tempdir().expect("temp dir");
        // What the previous version wrote for one topic `old` with id 1.
        write_old_directory(dir.path(), |meta| {
            meta.insert(keys::TOPIC_ID_KEY, 2u32.to_le_bytes())
                .expect("topic id");
        });
        let log = Log::open(dir.path(), &LogOptions::default()).expect("opens");
        assert!(log.topic("old").is_ok());
        let (created, _) = log
            .create_topic("new", TopicConfig::new(1, 0).expect("config"))
            .await
            .expect("created");
        assert_eq!(created.id, 2, "ids continue after the migrated counter");
        let stored = log
            .scan_meta(keys::TOPIC_ID_KEY)
            .expect("scan")
            .pop()
            .expect("n/topic-id");
        assert_eq!(stored.1, 3u32.to_be_bytes());
        let version = log.scan_meta(keys::SCHEMA_KEY).expect("scan");
        assert_eq!(version[0].1, keys::SCHEMA_VERSION.to_be_bytes());
        log.close().await.expect("closes");
        drop(log);
        let again = Log::open(dir.path(), &LogOptions::default()).expect("reopens");
        let (third, _) = again
            .create_topic("third", TopicConfig::new(1, 0).expect("config"))
            .await
            .expect("created");
        assert_eq!(third.id, 3, "a migrated directory is not migrated twice");
    }

    /// A schema-2 data directory (idempotent producers' state per topic, 14-byte `q/`
    /// keys) opens: the per-topic entries are dropped with the version change (they would
    /// not parse as per-partition keys and stopped the open), per-partition entries stay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_schema_2_data_directory_drops_per_topic_producer_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        let per_partition = keys::producer_key(keys::partition_prefix(1, 0), 42);
        write_old_directory(dir.path(), |meta| {
            meta.insert(keys::TOPIC_ID_KEY, 2u32.to_be_bytes())
                .expect("topic id");
            meta.insert(keys::SCHEMA_KEY, 2u32.to_be_bytes())
                .expect("schema");
            let mut per_topic = keys::PRODUCER_PREFIX.to_vec();
            per_topic.extend_from_slice(&1u32.to_be_bytes());
            per_topic.extend_from_slice(&42u64.to_be_bytes());
            meta.insert(per_topic, br#"{"last":3,"recent":[]}"#.as_slice())
                .expect("per-topic producer");
            meta.insert(per_partition, br#"{"last":5,"recent":[]}"#.as_slice())
                .expect("per-partition producer");
        });
        let log = Log::open(dir.path(), &LogOptions::default()).expect("opens");
        let producers = log.scan_meta(keys::PRODUCER_PREFIX).expect("scan");
        assert_eq!(producers.len(), 1, "only the per-partition entry is left");
        assert_eq!(producers[0].0, per_partition.to_vec());
        assert_eq!(
            log.shared
                .producers
                .lock()
                .get(&(1, 0, 42))
                .and_then(|s| s.last),
            Some(5)
        );
        let version = log.scan_meta(keys::SCHEMA_KEY).expect("scan");
        assert_eq!(version[0].1, keys::SCHEMA_VERSION.to_be_bytes());
    }
}
