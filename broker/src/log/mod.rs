//! The log engine: topics, partitions and record batches on one fjall database.
//!
//! This module owns everything on disk and knows nothing of gRPC. Its API is synchronous for
//! reads (call them from `spawn_blocking`) and async for writes, which go through a single
//! writer thread (see [`writer`]) that group-commits them.
//!
//! # On disk
//!
//! One fjall `Database` with two keyspaces (the fjall author advises few keyspaces):
//!
//! - `records`: key `topic id (u32 BE) ‖ partition (u32 BE) ‖ base offset (u64 BE)`, value a
//!   record batch ([`batch`]) with its CRC32C. One key per produced batch. Key-value
//!   separated: batches of 1 KiB or more go to fjall blob files (LZ4) at flush and the
//!   tables keep pointers, so compaction rewrites keys, not records. Without it every flushed
//!   table held keys of every partition, overlapped the whole next level, and leveled
//!   compaction rewrote the records again and again (sustained ingest of 4 GiB of 1000-byte
//!   values: 86k against 553k messages/s; 292k with incompressible values;
//!   `docs/benchmarks.md`). Taken when the keyspace is created.
//! - `meta`: `t/<name>` → topic settings (JSON); `p/<topic id ‖ partition>` → partition
//!   counters (next offset, earliest offset, bytes), written in the same atomic fjall batch as
//!   the records they count; `n/topic-id` → the next topic id.
//!
//! # Recovery
//!
//! Opening reads the `meta` keyspace and, per partition, only the last batch: its CRC is
//! checked and its end compared with the stored next offset. No log is scanned, so start-up
//! time does not grow with the data stored.

pub mod batch;
pub mod partitioner;
pub mod topic;
mod writer;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot, watch};

pub use self::{
    batch::{Record, StoredRecord},
    topic::{Partition, Topic, TopicConfig},
    writer::Appended,
};
use self::{
    topic::{PartitionMeta, TopicMeta},
    writer::Command,
};

/// The pending result of a queued append: per batch, (partition, base offset, records).
/// Holds the request's share of the queued-bytes budget until it is answered.
#[derive(Debug)]
pub struct AppendTicket {
    rx: oneshot::Receiver<Result<Vec<Appended>, Error>>,
    _queued: tokio::sync::OwnedSemaphorePermit,
}

impl AppendTicket {
    /// Waits for the commit; returns where each batch landed.
    pub async fn wait(self) -> Result<Vec<Appended>, Error> {
        self.rx.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// Errors of the log engine. Each says what failed and, for bad input, what would be right.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database directory could not be opened or recovered.
    #[error("opening the database at {path}: {source}")]
    OpenDatabase {
        /// Data directory.
        path: PathBuf,
        /// fjall's error.
        source: fjall::Error,
    },
    /// Stored metadata did not parse.
    #[error("recovering metadata key {key:?}: {detail}")]
    RecoverMetadata {
        /// The metadata key.
        key: String,
        /// What was wrong.
        detail: String,
    },
    /// A read from fjall failed.
    #[error("reading {topic}/{partition}: {source}")]
    Read {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// fjall's error.
        source: fjall::Error,
    },
    /// A commit (write + fsync) failed. fjall is poisoned after this; the broker must exit
    /// and recover rather than retry.
    #[error("committing to the log: {0}")]
    Commit(#[source] fjall::Error),
    /// The named topic does not exist.
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    /// The topic exists with other settings.
    #[error(
        "topic {name:?} already exists with partitions={} max_message_bytes={}; create it with identical settings or update it",
        existing.partitions, existing.max_message_bytes
    )]
    TopicExists {
        /// Topic name.
        name: String,
        /// Its current settings.
        existing: Box<TopicConfig>,
    },
    /// The partition index is not below the topic's partition count.
    #[error("topic {topic:?} has partitions 0..{partitions}, there is no partition {partition}")]
    PartitionNotFound {
        /// Topic name.
        topic: String,
        /// Requested partition.
        partition: u32,
        /// The topic's partition count.
        partitions: u32,
    },
    /// A partition that exists but is served by another broker (the topic spreads over
    /// several brokers; Kafka answers `NOT_LEADER_OR_FOLLOWER`).
    #[error(
        "partition {partition} of topic {topic:?} is not served by this broker, which serves partitions {served:?}; send it to the broker that the Topic's status.placement names"
    )]
    NotServed {
        /// Topic name.
        topic: String,
        /// Partition asked for.
        partition: u32,
        /// Partitions this broker serves.
        served: Vec<u32>,
    },
    /// A fetch asked for an offset outside the stored range.
    #[error(
        "offset {offset} is out of range for {topic}/{partition}: valid offsets are {earliest}..={next} ({next} waits for the next record)"
    )]
    OffsetOutOfRange {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// Requested offset.
        offset: u64,
        /// Earliest stored offset.
        earliest: u64,
        /// Next offset to be written.
        next: u64,
    },
    /// A stored batch failed its checksum or did not parse.
    #[error("corrupt batch in {topic}/{partition} at offset {offset}: {source}")]
    Corrupt {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// Base offset of the bad batch.
        offset: u64,
        /// What the decoder found.
        source: batch::DecodeError,
    },
    /// A request was malformed; the message says how.
    #[error("{0}")]
    InvalidArgument(String),
    /// Something named by a request does not exist (a group, a member); the message says
    /// what.
    #[error("{0}")]
    NotFound(String),
    /// Something exists already with other settings; the message says what.
    #[error("{0}")]
    AlreadyExists(String),
    /// A `Reject` topic is at `max_messages` or `max_bytes`; the message names the limit.
    #[error("{0}")]
    LimitReached(String),
    /// The request does not fit the current state (e.g. joining a group with another type,
    /// acking a delivery that is not pending); the message says why.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The log is shutting down or its writer has stopped.
    #[error("the log is shutting down")]
    ShuttingDown,
}

/// Key-value pairs of the metadata keyspace.
pub type MetaEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Settings of the log engine.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Block cache size in bytes.
    pub cache_bytes: u64,
    /// Most commands the writer takes into one group commit.
    pub max_commit_commands: usize,
    /// Most batch bytes the writer takes into one group commit.
    pub max_commit_bytes: usize,
    /// fjall background threads (flush and compaction); `None` for fjall's default.
    pub storage_workers: Option<usize>,
    /// Journal size after which fjall flushes memtables and deletes old journals (bytes, at
    /// least 64 MiB).
    pub max_journal_bytes: u64,
    /// How often records of `Buffered` topics are fsynced.
    pub buffered_flush_interval: Duration,
    /// Most bytes of encoded batches queued for the writer or being committed, over all
    /// producers; a produce waits for room beyond it (bounds memory when storage falls
    /// behind). At least 1 MiB.
    pub max_queued_bytes: u64,
    /// Largest memtable of the records keyspace before fjall flushes it to a table (bytes;
    /// fjall's default is 64 MiB). Applies when the keyspace is created.
    pub memtable_bytes: u64,
    /// Most bytes of records held in memtables (active and sealed, waiting for the flush);
    /// past it the writer waits for flushes before it commits more, so producers are slowed
    /// instead of the broker's memory growing (RocksDB's `WriteBufferManager` stall does
    /// the same). 0 means no limit beyond fjall's own (4 sealed memtables).
    pub max_write_buffer_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 64 * 1024 * 1024,
            max_commit_commands: 4096,
            max_commit_bytes: 64 * 1024 * 1024,
            storage_workers: None,
            max_journal_bytes: 512 * 1024 * 1024,
            buffered_flush_interval: Duration::from_secs(1),
            memtable_bytes: 64 * 1024 * 1024,
            max_queued_bytes: 32 * 1024 * 1024,
            max_write_buffer_bytes: 128 * 1024 * 1024,
        }
    }
}

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
    /// Time to open fjall and recover, in ms.
    pub elapsed_ms: u64,
}

/// Counters of the writer, read by metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Group commits done.
    pub commits: std::sync::atomic::AtomicU64,
    /// Append commands committed.
    pub appends: std::sync::atomic::AtomicU64,
    /// Records committed.
    pub records: std::sync::atomic::AtomicU64,
    /// Batch bytes committed.
    pub bytes: std::sync::atomic::AtomicU64,
    /// Time spent in commits (write + fsync), in ns.
    pub commit_nanos: std::sync::atomic::AtomicU64,
    /// Time the writer waited for flushes because memtables held `max_write_buffer_bytes`,
    /// in ns.
    pub stall_nanos: std::sync::atomic::AtomicU64,
}

pub(crate) struct Shared {
    pub db: Database,
    pub records: Keyspace,
    pub meta: Keyspace,
    pub topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    pub next_topic_id: std::sync::atomic::AtomicU32,
    pub stats: WriterStats,
    /// Set to the reason when a commit failed and fjall is poisoned.
    pub failed: watch::Sender<Option<String>>,
    /// Idempotent producers' state per (topic id, producer id); changed by the writer.
    pub producers: parking_lot::Mutex<std::collections::HashMap<(u32, u64), writer::ProducerState>>,
}

/// The log engine. Cheap to share behind an `Arc`.
pub struct Log {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    /// Bytes of encoded batches queued for the writer or being committed, over all
    /// producers (`LogOptions::max_queued_bytes` permits).
    queued: Arc<tokio::sync::Semaphore>,
    max_queued: u32,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    report: RecoveryReport,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

const TOPIC_ID_KEY: &[u8] = b"n/topic-id";

impl Log {
    /// Opens (or creates) the log in `dir` and recovers every topic. Blocking.
    pub fn open(dir: &Path, options: &LogOptions) -> Result<Self, Error> {
        let started = Instant::now();
        let open_err = |source| Error::OpenDatabase {
            path: dir.to_path_buf(),
            source,
        };
        let mut builder = Database::builder(dir)
            .cache_size(options.cache_bytes)
            // Record values are often already compressed or random; LZ4 on the journal
            // write path costs the single writer CPU for little. Tables still compress.
            .journal_compression(fjall::CompressionType::None)
            .max_journaling_size(options.max_journal_bytes.max(64 * 1024 * 1024));
        if let Some(n) = options.storage_workers {
            builder = builder.worker_threads(n.max(1));
        }
        let db = builder.open().map_err(open_err)?;
        let memtable = options.memtable_bytes.max(1024 * 1024);
        let records = db
            .keyspace("records", || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(memtable)
                    .with_kv_separation(Some(fjall::KvSeparationOptions::default()))
            })
            .map_err(open_err)?;
        let meta = db
            .keyspace("meta", KeyspaceCreateOptions::default)
            .map_err(open_err)?;
        let mut report = RecoveryReport::default();
        let topics = recover_topics(&records, &meta, &mut report)?;
        let producers = recover_producers(&meta)?;
        let next_topic_id = match meta.get(TOPIC_ID_KEY).map_err(open_err)? {
            Some(v) => {
                u32::from_le_bytes(v.as_ref().try_into().map_err(|_| Error::RecoverMetadata {
                    key: "n/topic-id".into(),
                    detail: format!("expected 4 bytes, found {}", v.len()),
                })?)
            }
            None => 1,
        };
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            topics = report.topics,
            partitions = report.partitions,
            batches_read = report.batches_read,
            corrupt_tails = report.corrupt_tails,
            elapsed_ms = report.elapsed_ms,
            "log recovered"
        );
        let shared = Arc::new(Shared {
            db,
            records,
            meta,
            topics: RwLock::new(topics),
            next_topic_id: next_topic_id.into(),
            stats: WriterStats::default(),
            failed: watch::Sender::new(None),
            producers: parking_lot::Mutex::new(producers),
        });
        let (commands, rx) = mpsc::channel(options.max_commit_commands);
        let writer = writer::spawn(Arc::clone(&shared), rx, options.clone())
            .map_err(|e| open_err(fjall::Error::Io(e)))?;
        spawn_flusher(commands.clone(), options.buffered_flush_interval)
            .map_err(|e| open_err(fjall::Error::Io(e)))?;
        Ok(Self {
            shared,
            commands,
            queued: Arc::new(tokio::sync::Semaphore::new(
                (options
                    .max_queued_bytes
                    .clamp(1 << 20, u64::from(u32::MAX >> 3)) as u32) as usize,
            )),
            max_queued: options
                .max_queued_bytes
                .clamp(1 << 20, u64::from(u32::MAX >> 3)) as u32,
            writer: parking_lot::Mutex::new(Some(writer)),
            report,
        })
    }

    /// What recovery found when this log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Counters of the group-commit writer.
    pub fn writer_stats(&self) -> &WriterStats {
        &self.shared.stats
    }

    /// Yields the reason once a commit has failed; the process should then exit and recover.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.shared.failed.subscribe()
    }

    /// Bytes the database uses on disk (journals and tables).
    pub fn disk_space(&self) -> u64 {
        self.shared.db.disk_space().unwrap_or(0)
    }

    /// Bytes of records held in memtables (active and sealed, not yet flushed to tables).
    pub fn write_buffer_bytes(&self) -> u64 {
        self.shared.db.write_buffer_size()
    }

    /// The topic named `name`, or [`Error::TopicNotFound`].
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, Error> {
        self.shared
            .topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::TopicNotFound(name.to_owned()))
    }

    /// All topics, sorted by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.shared.topics.read().values().cloned().collect()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Creates a topic; returns it and whether it was new. An existing topic with identical
    /// settings is returned unchanged; with other settings the call fails with
    /// [`Error::TopicExists`].
    pub async fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<(Arc<Topic>, bool), Error> {
        topic::validate_name(name)?;
        let name = name.to_owned();
        self.call(|reply| Command::CreateTopic {
            name,
            config,
            reply,
        })
        .await
    }

    /// Replaces a topic's settings. Partitions only grow; fewer fails with
    /// [`Error::InvalidArgument`] and changes nothing.
    pub async fn update_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>, Error> {
        let name = name.to_owned();
        self.call(|reply| Command::UpdateTopic {
            name,
            config,
            reply,
        })
        .await
    }

    /// Deletes a topic and every record of it.
    pub async fn delete_topic(&self, name: &str) -> Result<(), Error> {
        let name = name.to_owned();
        self.call(|reply| Command::DeleteTopic { name, reply })
            .await
    }

    /// Queues one produce request — an encoded batch ([`batch::encode`]) per partition, all
    /// of `topic` — atomically, and returns `(partition, base offset, records)` per batch once
    /// durable as the topic's `durability` says. With `producer` (id, sequence) a retry of a
    /// request already appended is answered with its original acks and stored once.
    ///
    /// Errors: [`Error::LimitReached`] when a `Reject` topic is full (nothing stored),
    /// [`Error::FailedPrecondition`] for a sequence out of order.
    ///
    /// Returns at once with a ticket for the result. Appends are committed in the order they
    /// are queued, so a caller that queues requests one after another gets increasing offsets
    /// in that order (pipelining).
    pub async fn submit_append(
        &self,
        topic: Arc<Topic>,
        batches: Vec<(Arc<Partition>, Vec<u8>, u32)>,
        producer: Option<(u64, u64)>,
    ) -> Result<AppendTicket, Error> {
        // Backpressure: a request waits while the writer has `max_queued_bytes` to commit,
        // so memory stays bounded when storage falls behind (one request larger than the
        // budget takes all of it).
        let bytes: usize = batches.iter().map(|(_, b, _)| b.len()).sum();
        let permits = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_queued);
        let queued = Arc::clone(&self.queued)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Append {
                topic,
                batches: batches
                    .into_iter()
                    .map(|(partition, batch, records)| writer::PartBatch {
                        partition,
                        batch,
                        records,
                    })
                    .collect(),
                producer: producer.map(|(producer_id, sequence)| writer::Idempotence {
                    producer_id,
                    sequence,
                }),
                reply,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        Ok(AppendTicket {
            rx,
            _queued: queued,
        })
    }

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
            let base = key_offset(&key);
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

    /// Writes `puts` and `deletes` to the metadata keyspace in one atomic batch, through the
    /// writer (so it is ordered with appends). With `durable`, waits for fsync; without, the
    /// next fsync of any commit makes it durable.
    pub async fn write_meta(
        &self,
        puts: MetaEntries,
        deletes: Vec<Vec<u8>>,
        durable: bool,
    ) -> Result<(), Error> {
        self.call(|reply| Command::WriteMeta {
            puts,
            deletes,
            durable,
            reply,
        })
        .await
    }

    /// Every metadata entry whose key starts with `prefix`. Blocking.
    pub fn scan_meta(&self, prefix: &[u8]) -> Result<MetaEntries, Error> {
        let mut out = Vec::new();
        for guard in self.shared.meta.prefix(prefix) {
            let (k, v) = guard.into_inner().map_err(|source| Error::Read {
                topic: "(metadata)".into(),
                partition: 0,
                source,
            })?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Deletes the whole batches of `partition` below `before` and returns the new earliest
    /// offset (a batch straddling `before` stays).
    pub async fn truncate(&self, partition: Arc<Partition>, before: u64) -> Result<u64, Error> {
        self.call(|reply| Command::Truncate {
            partition,
            before,
            reply,
        })
        .await
    }

    /// `maxAge`: deletes the head batches of `partition` whose newest record is older than
    /// `cutoff_ms` (ms since the epoch); returns the new earliest offset.
    pub async fn expire(&self, partition: Arc<Partition>, cutoff_ms: i64) -> Result<u64, Error> {
        self.call(|reply| Command::Expire {
            partition,
            cutoff_ms,
            reply,
        })
        .await
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
                offset: key_offset(&key),
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

    /// Stops the writer after it has committed everything queued, and persists. Blocking
    /// until done; later writes fail with [`Error::ShuttingDown`].
    pub async fn close(&self) -> Result<(), Error> {
        let result = self.call(|reply| Command::Shutdown { reply }).await;
        let handle = self.writer.lock().take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result
    }
}

/// Asks the writer every `interval` to fsync what earlier commits only handed to the OS
/// (records of `Buffered` topics, group state). The fsync itself runs on the writer thread,
/// so it never contends with a group commit for the journal. Stops when the writer does.
fn spawn_flusher(commands: mpsc::Sender<Command>, interval: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("weir-log-flusher".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                if commands.blocking_send(Command::Sync).is_err() {
                    return;
                }
            }
        })
        .map(|_| ())
}

/// Offset part of a record key (its last 8 bytes, big-endian); 0 for a malformed key.
fn key_offset(key: &[u8]) -> u64 {
    key.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

fn recover_topics(
    records: &Keyspace,
    meta: &Keyspace,
    report: &mut RecoveryReport,
) -> Result<BTreeMap<String, Arc<Topic>>, Error> {
    let mut topics = BTreeMap::new();
    for guard in meta.prefix(b"t/") {
        let (key, value) = guard.into_inner().map_err(|source| Error::OpenDatabase {
            path: PathBuf::new(),
            source,
        })?;
        let key_text = String::from_utf8_lossy(&key).into_owned();
        let stored: TopicMeta =
            serde_json::from_slice(&value).map_err(|e| Error::RecoverMetadata {
                key: key_text.clone(),
                detail: e.to_string(),
            })?;
        let mut partitions = Vec::with_capacity(stored.config.partitions as usize);
        let appended = Arc::new(watch::Sender::new(0));
        for index in 0..stored.config.partitions {
            let probe = Partition::new(
                &stored.name,
                stored.id,
                index,
                PartitionMeta::default(),
                Arc::clone(&appended),
            );
            let state = match meta.get(probe.meta_key()).map_err(|source| Error::Read {
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
            check_tail(records, &probe, state, report);
            let partition =
                Partition::new(&stored.name, stored.id, index, state, Arc::clone(&appended));
            // The first stored batch may start before the (logical) earliest offset. Only
            // for a non-empty partition: the batch holding `earliest` is then found at once,
            // without stepping over tombstones.
            if state.next_offset != state.earliest_offset
                && let Some(Ok(first)) = records
                    .range(probe.key(0)..=probe.key(state.earliest_offset))
                    .next_back()
                    .map(fjall::Guard::key)
            {
                partition
                    .head_base
                    .store(key_offset(&first), Ordering::Relaxed);
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

/// Loads idempotent producers' state (`q/<topic id><producer id>`).
fn recover_producers(
    meta: &Keyspace,
) -> Result<std::collections::HashMap<(u32, u64), writer::ProducerState>, Error> {
    let mut out = std::collections::HashMap::new();
    for guard in meta.prefix(b"q/") {
        let (key, value) = guard.into_inner().map_err(|source| Error::Read {
            topic: "(producers)".into(),
            partition: 0,
            source,
        })?;
        let ids = key
            .get(2..6)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            .zip(
                key.get(6..14)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes),
            );
        let state = serde_json::from_slice(&value).ok();
        match (ids, state) {
            (Some(ids), Some(state)) => {
                out.insert(ids, state);
            }
            _ => {
                return Err(Error::RecoverMetadata {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: "unreadable producer state".into(),
                });
            }
        }
    }
    Ok(out)
}

/// Verifies the last batch of a partition at start-up: its CRC, and that it ends at the
/// stored next offset. Problems are logged with topic, partition and offset; the stored
/// counters stay authoritative so offsets never repeat.
fn check_tail(
    records: &Keyspace,
    p: &Partition,
    state: PartitionMeta,
    report: &mut RecoveryReport,
) {
    if state.next_offset == state.earliest_offset {
        return;
    }
    let Some(guard) = records.prefix(p.prefix).next_back() else {
        tracing::error!(topic = %p.topic, partition = p.index, next_offset = state.next_offset, "partition counters say records exist but none are stored");
        report.corrupt_tails += 1;
        return;
    };
    report.batches_read += 1;
    match guard.into_inner() {
        Ok((key, value)) => {
            let base = key_offset(&key);
            match batch::verify(&value) {
                Ok(h) if h.base_offset == base && h.next_offset() == state.next_offset => {}
                Ok(h) => {
                    report.corrupt_tails += 1;
                    tracing::error!(topic = %p.topic, partition = p.index, offset = base, batch_end = h.next_offset(), next_offset = state.next_offset, "tail batch does not end at the stored next offset");
                }
                Err(e) => {
                    report.corrupt_tails += 1;
                    tracing::error!(topic = %p.topic, partition = p.index, offset = base, error = %e, "tail batch failed its check at start-up");
                }
            }
        }
        Err(e) => {
            report.corrupt_tails += 1;
            tracing::error!(topic = %p.topic, partition = p.index, error = %e, "tail batch unreadable at start-up");
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Longest a long-polling fetch may wait.
pub const MAX_FETCH_WAIT: Duration = Duration::from_secs(60);

/// Number of records between `earliest` and `next` of a partition.
pub fn partition_messages(p: &Partition) -> u64 {
    p.next_offset().saturating_sub(p.earliest_offset())
}

pub(crate) fn relaxed_add(counter: &std::sync::atomic::AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log on a new temporary directory with one topic of `partitions` partitions; the
    /// directory lives as long as the returned guard.
    async fn log_with_topic(
        options: &LogOptions,
        topic: &str,
        partitions: u32,
    ) -> (tempfile::TempDir, Arc<Log>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = Arc::new(Log::open(dir.path(), options).expect("opens"));
        log.create_topic(topic, TopicConfig::new(partitions, 0).expect("config"))
            .await
            .expect("topic");
        (dir, log)
    }

    /// A record whose value is `size` copies of `byte`.
    fn filled(byte: u8, size: usize) -> Record {
        Record {
            value: bytes::Bytes::from(vec![byte; size]),
            ..Record::default()
        }
    }

    /// Requests larger than the queued-bytes budget, several at once, all complete: each
    /// takes at most the whole budget and waits its turn, none waits forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_beyond_the_queued_bytes_budget_wait_their_turn() {
        let options = LogOptions {
            max_queued_bytes: 1024 * 1024,
            ..LogOptions::default()
        };
        let (_dir, log) = log_with_topic(&options, "big", 1).await;
        let record = filled(7, 900 * 1024);
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let log = Arc::clone(&log);
            let records = vec![record.clone(), record.clone()];
            tasks.push(tokio::spawn(async move {
                crate::produce::produce(&log, "big", Some(0), records).await
            }));
        }
        for t in tasks {
            let acks = t.await.expect("task").expect("produced");
            assert_eq!(acks[0].record_count, 2);
        }
        let part = log.topic("big").expect("topic").partition(0).expect("p0");
        assert_eq!(part.next_offset(), 12);
        assert_eq!(
            log.queued.available_permits(),
            1024 * 1024,
            "every permit returned"
        );
    }

    /// Sustained appends keep memtables within `max_write_buffer_bytes` (plus the round
    /// being committed): the writer seals full memtables itself and waits for flushes,
    /// and every append still completes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sustained_appends_keep_memtables_within_the_write_buffer_budget() {
        const MIB: u64 = 1024 * 1024;
        let options = LogOptions {
            memtable_bytes: MIB,
            max_write_buffer_bytes: 3 * MIB,
            storage_workers: Some(1),
            ..LogOptions::default()
        };
        let (_dir, log) = log_with_topic(&options, "fill", 2).await;
        let record = filled(3, 1000);
        let batch = 100u64;
        let mut most = 0;
        for i in 0..400u32 {
            let records = vec![record.clone(); batch as usize];
            crate::produce::produce(&log, "fill", Some(i % 2), records)
                .await
                .expect("produced");
            most = most.max(log.write_buffer_bytes());
        }
        let topic = log.topic("fill").expect("topic");
        let stored: u64 = topic.partitions().iter().map(|p| p.next_offset()).sum();
        assert_eq!(stored, 400 * batch);
        assert!(
            most <= 3 * MIB + 2 * batch * 1100,
            "memtables held {most} bytes, budget {}",
            3 * MIB
        );
    }

    /// A budget smaller than one memtable does not hang the writer: with nothing sealed,
    /// the writer seals the active memtable so that a flush can bring the budget back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_buffer_budget_below_the_memtable_size_does_not_hang_producers() {
        const MIB: u64 = 1024 * 1024;
        let options = LogOptions {
            memtable_bytes: 8 * MIB,
            max_write_buffer_bytes: MIB,
            ..LogOptions::default()
        };
        let (_dir, log) = log_with_topic(&options, "t", 1).await;
        let record = filled(5, 1000);
        let started = std::time::Instant::now();
        for _ in 0..40 {
            let produced = tokio::time::timeout(
                Duration::from_secs(5),
                crate::produce::produce(&log, "t", Some(0), vec![record.clone(); 100]),
            )
            .await;
            produced.expect("no hang").expect("produced");
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "took {:?}: the writer waited out its longest stall",
            started.elapsed()
        );
        assert!(log.write_buffer_bytes() < 2 * MIB);
    }

    /// Batches go to blob files at flush (key-value separation), and read back from there
    /// byte for byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushed_batches_live_in_blob_files_and_read_back() {
        const MIB: u64 = 1024 * 1024;
        let options = LogOptions {
            memtable_bytes: MIB,
            ..LogOptions::default()
        };
        let (_dir, log) = log_with_topic(&options, "b", 1).await;
        let records: Vec<Record> = (0..3000u32)
            .map(|i| Record {
                value: bytes::Bytes::from(format!("{i:0>1000}")),
                ..Record::default()
            })
            .collect();
        for chunk in records.chunks(100) {
            crate::produce::produce(&log, "b", Some(0), chunk.to_vec())
                .await
                .expect("produced");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while log.shared.records.blob_file_count() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no blob file after 3 MB written with 1 MiB memtables"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let part = log.topic("b").expect("topic").partition(0).expect("p0");
        let read = log.read(&part, 0, usize::MAX, 3000).expect("read");
        assert_eq!(read.len(), 3000);
        for (i, r) in read.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            assert_eq!(r.record.value, records[i].value);
        }
    }
}
