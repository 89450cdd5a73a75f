//! The log engine: topics, partitions and record batches on one fjall database.
//!
//! This module owns everything on disk and knows nothing of gRPC. Its API is synchronous for
//! reads (call them from `spawn_blocking`) and async for writes, which go through a single
//! writer thread (see [`writer`]) that group-commits them.
//!
//! # On disk
//!
//! One fjall `Database` with two keyspaces (the fjall author advises few keyspaces):
//! `records` holds one key per produced batch; `meta` holds topics, partition counters,
//! idempotent producers and group state. Every key and its encoding is in [`keys`]. Beside
//! it, `segments/` holds each partition's segment files: a batch of
//! `LogOptions::segment_min_batch_bytes` (64 KiB) or more is appended there once and the
//! `records` keyspace keeps a pointer to it ([`RecordStore::Segments`],
//! `docs/record-store.md`); smaller batches are kept whole in the keyspace.
//! The records keyspace is key-value separated: batches of 1 KiB or more go to
//! fjall blob files (LZ4) at flush and the tables keep pointers, so compaction rewrites
//! keys, not records. Without it every flushed table held keys of every partition,
//! overlapped the whole next level, and leveled compaction rewrote the records again and
//! again (sustained ingest of 4 GiB of 1000-byte values: 86k against 553k messages/s; 292k
//! with incompressible values; `docs/benchmarks.md`). Taken when the keyspace is created.
//!
//! # Parts
//!
//! - [`batch`]: the record batch format and its CRC32C.
//! - [`keys`]: the key schema.
//! - [`topic`]: topics and partitions in memory.
//! - [`recovery`]: start-up and schema migration.
//! - [`salvage`]: a data directory that fjall refuses to open because of a damaged file.
//! - `checkpoint`: each partition's committed end, kept outside the journal so that a lost
//!   journal tail never gives acknowledged offsets out again.
//! - [`idempotence`]: idempotent producers' sequences.
//! - `writer`: the single group-commit writer thread, its retention and admin commands.
//! - `read`: reads of records and of offsets by time.
//! - `repair`: finding lost ranges and accepting their loss (`weir topic repair`).
//! - `segment`: segment files of the write-once record store (`docs/record-store.md`),
//!   taken with [`RecordStore::Segments`].

pub mod batch;
pub(crate) mod checkpoint;
mod disk;
mod error;
pub mod idempotence;
pub mod keys;
pub use weir_proto::partitioner;
mod read;
pub mod recovery;
mod repair;
pub mod salvage;
mod segment;
pub mod topic;
mod writer;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use self::repair::LostRange;
pub use self::writer::{Flushed, PartBatch, ReplicaAppend, ReplicaPayload, ReplicaState, Written};
pub use self::{
    batch::{Record, StoredRecord},
    error::Error,
    recovery::RecoveryReport,
    topic::{Partition, Topic, TopicConfig},
};
use self::{idempotence::Idempotence, writer::Command};
use crate::validate::{NameKind, quote, validate_name};

/// Where the records of one partition of a produce request landed: the one shape of an
/// append's result, from the writer to the gRPC answer. Stored in idempotent producers'
/// state as `[partition, base_offset, record_count]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u32, u64, u32)", into = "(u32, u64, u32)")]
pub struct Ack {
    /// Partition index.
    pub partition: u32,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Number of records; they have offsets `base_offset..base_offset + record_count`.
    pub record_count: u32,
}

impl From<(u32, u64, u32)> for Ack {
    fn from((partition, base_offset, record_count): (u32, u64, u32)) -> Self {
        Self {
            partition,
            base_offset,
            record_count,
        }
    }
}

impl From<Ack> for (u32, u64, u32) {
    fn from(a: Ack) -> Self {
        (a.partition, a.base_offset, a.record_count)
    }
}

/// The pending result of a queued append. Holds the request's share of the queued-bytes
/// budget until it is answered.
#[derive(Debug)]
pub struct AppendTicket {
    rx: oneshot::Receiver<Result<Vec<Ack>, Error>>,
    _queued: tokio::sync::OwnedSemaphorePermit,
}

impl AppendTicket {
    /// Waits for the commit; returns one [`Ack`] per partition, in ascending partition
    /// order.
    pub async fn wait(self) -> Result<Vec<Ack>, Error> {
        self.rx.await.map_err(|_| Error::ShuttingDown)?
    }
}

/// Faults that tests switch on to see the broker fail visibly (set with the hidden
/// `--failpoint` flag of `weir-broker`). Never set in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// The writer thread panics when it takes its first append.
    WriterPanic,
    /// Each group commit waits 50 ms before it writes (a slow disk).
    SlowCommit,
}

/// Key-value pairs of the metadata keyspace.
pub type MetaEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Where the log writer stores new record batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordStore {
    /// Whole, in fjall: its journal first, then blob files at flush (two writes).
    Fjall,
    /// In segment files of each partition, written once with `O_DIRECT`; fjall keeps a
    /// pointer per batch (`docs/record-store.md`). Batches below
    /// `LogOptions::segment_min_batch_bytes` stay in fjall.
    #[default]
    Segments,
}

/// Settings of the log engine.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Where new record batches go. Batches stored either way are read either way.
    pub record_store: RecordStore,
    /// Size after which a partition's segment is closed and the next batch starts a new
    /// one (bytes; segment store only).
    pub segment_bytes: u64,
    /// Segment store only: batches smaller than this (bytes, sealed) are stored whole in
    /// fjall, as by [`RecordStore::Fjall`], so that a round of small batches costs one
    /// fsync (the journal's) rather than one per partition it touches (fsyncs of
    /// different files do not overlap on every device; `docs/record-store.md`). As
    /// key-value separation keeps small values in the tree (WiscKey, fjall's
    /// separation threshold). 0 sends every batch to the segments.
    pub segment_min_batch_bytes: u64,
    /// The newest batches written to segments kept in memory for reads (bytes; segment
    /// store only): consumers within this much of the end read without the disk.
    pub tail_cache_bytes: u64,
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
    /// Most bytes of encoded batches queued for the writer or being committed, over all
    /// producers; a produce waits for room beyond it (bounds memory when storage falls
    /// behind). At least 1 MiB.
    pub max_queued_bytes: u64,
    /// Largest memtable of the records keyspace before fjall flushes it to a table (bytes;
    /// fjall's default is 64 MiB). Applies when the keyspace is created.
    pub memtable_bytes: u64,
    /// Bytes counted as already in the first records memtable when the log opens (below
    /// `memtable_bytes`), so that the first memtable, and every one after it, is sealed
    /// that much sooner. The brokers of a cluster store the same bytes at the same pace;
    /// with different offsets they flush their memtables at different moments instead of
    /// all at once. 0 for a standalone broker.
    pub memtable_offset_bytes: u64,
    /// Most bytes of records held in memtables (active and sealed, waiting for the flush);
    /// past it the writer waits for flushes before it commits more, so producers are slowed
    /// instead of the broker's memory growing (RocksDB's `WriteBufferManager` stall does
    /// the same). 0 means no limit beyond fjall's own (4 sealed memtables).
    pub max_write_buffer_bytes: u64,
    /// Most files the storage engine keeps open (fjall's descriptor cache, at least 10);
    /// `None` for fjall's default (900).
    pub max_cached_files: Option<usize>,
    /// Produce requests are refused with [`Error::DiskFull`] while the data directory's
    /// file system has less than this many bytes available; 0 never refuses.
    pub min_free_disk_bytes: u64,
    /// A fault to inject, for tests; `None` in production.
    pub failpoint: Option<Failpoint>,
}

/// How far into its first records memtable a broker starts
/// ([`LogOptions::memtable_offset_bytes`], bytes): `memtable_bytes` times the fractional
/// part of `node_id` × 0.618… (the golden ratio's inverse; Fibonacci hashing, Knuth, TAOCP
/// vol. 3 §6.4, in 64-bit fixed point), which keeps any number of consecutive node ids apart (phases 0, 0.62, 0.24, 0.85, 0.47, …: three brokers at
/// least a fifth of a memtable from each other). The brokers of a cluster store the same
/// records at the same pace; apart, their memtable flushes (a burst of writes to the disk
/// and of CPU) no longer come at one moment, and a partition's other two replicas still
/// commit at full speed while one flushes (docs/benchmarks.md, "Memtable flushes spread
/// over the brokers").
pub fn memtable_offset(memtable_bytes: u64, node_id: u64) -> u64 {
    // 2^64 / φ: the product's low 64 bits are the fraction, in units of 2^-64.
    const INVERSE_GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let phase = node_id.wrapping_mul(INVERSE_GOLDEN);
    ((u128::from(memtable_bytes) * u128::from(phase)) >> 64) as u64
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            record_store: RecordStore::Segments,
            segment_bytes: 128 * 1024 * 1024,
            segment_min_batch_bytes: 64 * 1024,
            tail_cache_bytes: 32 * 1024 * 1024,
            cache_bytes: 16 * 1024 * 1024,
            max_commit_commands: 4096,
            max_commit_bytes: 64 * 1024 * 1024,
            storage_workers: None,
            max_journal_bytes: 512 * 1024 * 1024,
            memtable_bytes: 64 * 1024 * 1024,
            memtable_offset_bytes: 0,
            max_queued_bytes: 32 * 1024 * 1024,
            max_write_buffer_bytes: 128 * 1024 * 1024,
            max_cached_files: None,
            min_free_disk_bytes: 256 * 1024 * 1024,
            failpoint: None,
        }
    }
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
    /// Reads refused with DATA_LOSS: offsets below the next offset with no stored batch, a
    /// batch failing its CRC, or storage that cannot be read back.
    pub data_loss_reads: std::sync::atomic::AtomicU64,
    /// Records whose loss was accepted with `weir topic repair` (offsets in accepted lost
    /// ranges).
    pub accepted_lost_records: std::sync::atomic::AtomicU64,
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
    pub producers: parking_lot::Mutex<idempotence::Producers>,
    /// Free space of the data directory's file system.
    pub disk: disk::DiskSpace,
    /// Segment files of the segment store (read whatever `LogOptions::record_store` is).
    pub segments: segment::Segments,
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
    /// Proposes appends to replicated partitions (set by `crate::replica`).
    replicator: std::sync::OnceLock<Arc<dyn Replicator>>,
    /// The data directory.
    dir: std::path::PathBuf,
}

/// The result of one proposed append to a replicated partition: its [`Ack`] once
/// committed.
pub type Proposed = std::pin::Pin<Box<dyn Future<Output = Result<Ack, Error>> + Send>>;

/// Proposes record batches to the Raft groups of replicated partitions
/// ([`Partition::is_replicated`]); implemented by `crate::replica`.
pub trait Replicator: Send + Sync {
    /// Proposes `batch` (`records` records, [`batch::encode`]) to `partition`'s group, from
    /// the idempotent `producer` if given. The proposal is queued when this returns
    /// (proposals of one caller keep their order); the returned future resolves once it
    /// committed. Errors: [`Error::NotLeader`] when this broker does not lead the partition,
    /// [`Error::Sequence`] for a sequence out of order, [`Error::InFlight`] for a retry of a
    /// request not committed yet (nothing stored by any of them); a retry of a committed
    /// request resolves to its original ack.
    fn propose(
        &self,
        partition: &Arc<Partition>,
        batch: Vec<u8>,
        records: u32,
        producer: Option<Idempotence>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Proposed, Error>> + Send + '_>>;

    /// Whether this broker leads `partition`'s group at the moment.
    fn leads(&self, partition: &Partition) -> bool;

    /// Proposes retention's cut of `partition` to its group: once committed every replica
    /// deletes the records below `earliest` (a batch boundary). Errors:
    /// [`Error::NotLeader`] when this broker does not lead it.
    fn trim(
        &self,
        partition: &Arc<Partition>,
        earliest: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Error>> + Send + '_>>;
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (or creates) the log in `dir` and recovers every topic. Blocking.
    pub fn open(dir: &Path, options: &LogOptions) -> Result<Self, Error> {
        let started = Instant::now();
        let open_err = |source| Error::open(dir, source);
        let (db, salvaged) = open_database(dir, options)?;
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
        let next_topic_id = recovery::migrate(&db, &meta)?;
        let mut report = RecoveryReport {
            quarantined: salvaged.quarantined.len(),
            ..RecoveryReport::default()
        };
        let ends = checkpoint::read(dir).map_err(|source| Error::Checkpoint {
            action: "reading",
            path: dir.join(checkpoint::FILE_NAME),
            source,
        })?;
        let topics = recovery::recover_topics(&records, &meta, &ends, &mut report)?;
        // The recovered ends, durably, before anything new is acknowledged.
        let checkpoint = checkpoint::EndCheckpoint::create(
            dir,
            topics.values().flat_map(|t| {
                t.partitions()
                    .into_iter()
                    .map(|p| (p.prefix, p.checkpoint_end()))
            }),
        )
        .map_err(|source| Error::Checkpoint {
            action: "writing",
            path: dir.join(checkpoint::FILE_NAME),
            source,
        })?;
        let producers = recovery::recover_producers(&meta)?;
        let by_prefix = topics
            .values()
            .flat_map(|t| t.partitions().into_iter().map(|p| (p.prefix, p)))
            .collect();
        repair::recover_losses(&meta, &by_prefix)?;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            topics = report.topics,
            partitions = report.partitions,
            batches_read = report.batches_read,
            corrupt_tails = report.corrupt_tails,
            counters_behind = report.counters_behind,
            acked_lost = report.acked_lost,
            quarantined = report.quarantined,
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
            disk: disk::DiskSpace::new(dir, options.min_free_disk_bytes),
            segments: segment::Segments::new(dir.join(segment::DIR_NAME), options.tail_cache_bytes),
        });
        let (commands, rx) = mpsc::channel(options.max_commit_commands);
        let writer = writer::spawn(Arc::clone(&shared), rx, options.clone(), checkpoint).map_err(
            |source| Error::StartThread {
                thread: "log writer",
                source,
            },
        )?;
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
            dir: dir.to_path_buf(),
            report,
            replicator: std::sync::OnceLock::new(),
        })
    }

    /// A keyspace of the log's database for another part of the broker (the cluster's Raft
    /// log and state machine), created when missing. Sharing the database shares the journal
    /// and its fsyncs.
    ///
    /// # Errors
    ///
    /// fjall cannot create or open it.
    pub fn keyspace(&self, name: &str) -> Result<Keyspace, Error> {
        self.shared
            .db
            .keyspace(name, KeyspaceCreateOptions::default)
            .map_err(Error::Commit)
    }

    /// The data directory the log was opened in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log's fjall database (for [`Log::keyspace`]'s users to batch and persist).
    pub fn database(&self) -> Database {
        self.shared.db.clone()
    }

    /// What recovery found when this log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Counters of the group-commit writer.
    pub fn writer_stats(&self) -> &WriterStats {
        &self.shared.stats
    }

    /// Yields the reason once a commit has failed or a worker died; the process should then
    /// exit and recover.
    pub fn failed(&self) -> watch::Receiver<Option<String>> {
        self.shared.failed.subscribe()
    }

    /// Available bytes on the data directory's file system at the last measurement, and
    /// whether produce requests are being refused because of it.
    pub fn disk_free(&self) -> (u64, bool) {
        (self.shared.disk.free(), self.shared.disk.is_full())
    }

    /// Whether a commit has failed or a worker died (see [`Log::failed`]).
    pub fn is_failed(&self) -> bool {
        self.shared.failed.borrow().is_some()
    }

    /// Reports that a worker the log depends on died (`reason` says which and why): the
    /// broker turns unready and exits, as after a failed commit.
    pub fn report_failure(&self, reason: String) {
        self.shared.failed.send_if_modified(|failed| {
            if failed.is_some() {
                return false;
            }
            *failed = Some(reason);
            true
        });
    }

    /// Fsyncs what earlier commits only handed to the OS (records of `Buffered` topics,
    /// group state), if anything. Runs on the writer thread, so it never contends with a
    /// group commit for the journal.
    pub async fn sync(&self) -> Result<(), Error> {
        self.call(|reply| Command::Sync { reply }).await
    }

    /// Bytes the log uses on disk: the database's journals, tables and blob files, and
    /// the segment files. Errors: [`Error::DiskSpace`], [`Error::SegmentDiskSpace`].
    pub fn disk_space(&self) -> Result<u64, Error> {
        let database = self.shared.db.disk_space().map_err(Error::DiskSpace)?;
        let segments = self
            .shared
            .segments
            .disk_space()
            .map_err(Error::SegmentDiskSpace)?;
        Ok(database + segments)
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
            .ok_or_else(|| Error::TopicNotFound(quote(name)))
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
        validate_name(NameKind::Topic, name)?;
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
    /// of `topic` — atomically, and returns one [`Ack`] per batch once durable as the
    /// topic's `durability` says. With `producer` a retry of a request already appended is
    /// answered with its original acks and stored once.
    ///
    /// Errors: [`Error::TopicFull`] when a `Reject` topic is full (nothing stored),
    /// [`Error::Sequence`] for a sequence out of order.
    ///
    /// Returns at once with a ticket for the result. Appends are committed in the order they
    /// are queued, so a caller that queues requests one after another gets increasing offsets
    /// in that order (pipelining).
    pub async fn submit_append(
        &self,
        topic: Arc<Topic>,
        batches: Vec<PartBatch>,
        producer: Option<Idempotence>,
    ) -> Result<AppendTicket, Error> {
        // Backpressure: a request waits while the writer has `max_queued_bytes` to commit,
        // so memory stays bounded when storage falls behind (one request larger than the
        // budget takes all of it).
        let bytes: usize = batches.iter().map(|b| b.batch.len()).sum();
        let permits = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_queued);
        let queued = Arc::clone(&self.queued)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        if batches.iter().any(|b| b.partition.is_replicated()) {
            return self
                .submit_replicated(&topic, batches, producer, queued)
                .await;
        }
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Append {
                topic,
                batches,
                producer,
                reply,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        Ok(AppendTicket {
            rx,
            _queued: queued,
        })
    }

    /// Sets who proposes appends to replicated partitions (once).
    pub fn set_replicator(&self, replicator: Arc<dyn Replicator>) {
        let _ = self.replicator.set(replicator);
    }

    /// Whether this broker leads `partition`: always for a partition that is not
    /// replicated, else when its group's leader is here.
    pub fn leads(&self, partition: &Partition) -> bool {
        !partition.is_replicated() || self.replicator.get().is_some_and(|r| r.leads(partition))
    }

    /// Appends to replicated partitions: each batch proposed to its partition's group, in
    /// order, answered once all committed. Not atomic across partitions (as in Kafka, each
    /// partition's log is its own).
    async fn submit_replicated(
        &self,
        topic: &Topic,
        batches: Vec<PartBatch>,
        producer: Option<Idempotence>,
        queued: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<AppendTicket, Error> {
        if producer.is_some() && batches.len() > 1 {
            return Err(Error::IdempotentSpansPartitions {
                topic: topic.name.clone(),
                partitions: batches.iter().map(|b| b.partition.index).collect(),
            });
        }
        let Some(replicator) = self.replicator.get() else {
            return Err(Error::ShuttingDown);
        };
        let mut proposed = Vec::with_capacity(batches.len());
        for b in batches {
            if !b.partition.is_replicated() {
                return Err(Error::Replica {
                    topic: topic.name.clone(),
                    partition: b.partition.index,
                    message: "the partition's replica group is not open yet; retry".into(),
                });
            }
            proposed.push(
                replicator
                    .propose(&b.partition, b.batch, b.records, producer)
                    .await?,
            );
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut acks = Vec::with_capacity(proposed.len());
            for p in proposed {
                match p.await {
                    Ok(ack) => acks.push(ack),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(acks));
        });
        Ok(AppendTicket {
            rx,
            _queued: queued,
        })
    }

    /// Queues a replica group's log entries for the writer ([`ReplicaAppend`]); they are
    /// readable once the writer committed them, and `done` says when they are on disk.
    pub async fn replica_append(&self, append: ReplicaAppend) -> Result<(), Error> {
        self.commands
            .send(Command::ReplicaAppend(append))
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Queues a replica group's state machine state for the writer's next round
    /// ([`ReplicaState`]); returns once it is queued (waits while the writer's queue is
    /// full). [`Error::ShuttingDown`] when the writer has stopped.
    pub async fn replica_state(&self, state: ReplicaState) -> Result<(), Error> {
        self.commands
            .send(Command::ReplicaState(state))
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Deletes a replica group's log entries from `from_index` on and `partition`'s records
    /// after the entry before it; the partition's log then ends where that entry ends
    /// (`start_offset` when no entry before `from_index` is stored).
    pub async fn replica_truncate(
        &self,
        partition: Arc<Partition>,
        raft: Keyspace,
        group: keys::GroupKey,
        from_index: u64,
        start_offset: u64,
    ) -> Result<(), Error> {
        self.call(|reply| Command::ReplicaTruncate {
            partition,
            raft,
            group,
            from_index,
            start_offset,
            reply,
        })
        .await
    }

    /// The stored batch of `partition` at `base_offset`, as stored (sealed), from fjall or
    /// its segment; `None` when no batch starts there. Blocking.
    pub fn read_batch(
        &self,
        partition: &Partition,
        base_offset: u64,
    ) -> Result<Option<Bytes>, Error> {
        let value = self
            .shared
            .records
            .get(partition.key(base_offset))
            .map_err(|source| Error::Read {
                topic: partition.topic.clone(),
                partition: partition.index,
                source,
            })?;
        value
            .map(|v| self.shared.resolve(partition, base_offset, v))
            .transpose()
    }

    /// The base offsets of `partition`'s stored batches from offset `from` on, in order.
    /// Reads keys only, never the batches' bytes. Blocking.
    ///
    /// # Errors
    ///
    /// [`Error::Read`] when the storage cannot be read.
    pub fn batch_offsets(&self, partition: &Partition, from: u64) -> Result<Vec<u64>, Error> {
        let mut out = Vec::new();
        for guard in self
            .shared
            .records
            .range(partition.key(from)..=partition.key(u64::MAX))
        {
            let key = guard.key().map_err(|source| Error::Read {
                topic: partition.topic.clone(),
                partition: partition.index,
                source,
            })?;
            out.extend(keys::record_key_offset(&key));
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
            let (k, v) = guard.into_inner().map_err(|source| Error::ReadMetadata {
                prefix: String::from_utf8_lossy(prefix).into_owned(),
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

    /// Where retention cuts replicated `partition` (led here) now, at a batch boundary:
    /// past the head batches whose newest record is older than `maxAge`, and past as many
    /// head batches as keep it within its share of the topic's `max_messages` and
    /// `max_bytes` (the limit divided evenly among the partitions, rounded up: each
    /// partition's leader decides alone, as Kafka's per-partition `retention.bytes`).
    /// `None` when nothing is to be deleted. The leader proposes the cut to the partition's
    /// group, and every replica deletes below it (`docs/replication.md`). Blocking.
    ///
    /// # Errors
    ///
    /// [`Error::Read`] when the storage cannot be read.
    pub fn retention_cut(&self, partition: &Partition, now_ms: i64) -> Result<Option<u64>, Error> {
        let topic = self.topic(&partition.topic)?;
        let config = topic.config();
        let parts = u64::from(config.partitions.max(1));
        let earliest = partition.earliest_offset();
        let next = partition.next_offset();
        let cutoff = (config.max_age_ms != 0)
            .then(|| now_ms.saturating_sub(i64::try_from(config.max_age_ms).unwrap_or(i64::MAX)));
        let max_messages = (config.max_messages != 0).then(|| config.max_messages.div_ceil(parts));
        let max_bytes = (config.max_bytes != 0).then(|| config.max_bytes.div_ceil(parts));
        if cutoff.is_none() && max_messages.is_none() && max_bytes.is_none() {
            return Ok(None);
        }
        let mut messages = next.saturating_sub(earliest);
        let mut bytes = partition.bytes();
        let mut cut = earliest;
        let head = partition.head_base.load(Ordering::Relaxed);
        for guard in self
            .shared
            .records
            .range(partition.key(head)..partition.key(next))
        {
            let (_, value) = guard.into_inner().map_err(|source| Error::Read {
                topic: partition.topic.clone(),
                partition: partition.index,
                source,
            })?;
            let Ok((h, len)) = segment::stored_header(&value) else {
                break;
            };
            let expired = cutoff.is_some_and(|c| h.max_timestamp_ms < c);
            let over =
                max_messages.is_some_and(|m| messages > m) || max_bytes.is_some_and(|m| bytes > m);
            if !expired && !over {
                break;
            }
            let end = h.next_offset();
            messages = messages.saturating_sub(end.saturating_sub(cut));
            bytes = bytes.saturating_sub(len);
            cut = end;
        }
        Ok((cut > earliest).then_some(cut))
    }

    /// Retention of replicated `partition`: when this broker leads it and
    /// [`Log::retention_cut`] finds records to delete, proposes the cut to its group (every
    /// replica deletes them once it commits). Nothing on a follower.
    ///
    /// # Errors
    ///
    /// Storage errors, or the group's refusal (the leadership moved).
    pub async fn trim_replicated(
        self: &Arc<Self>,
        partition: &Arc<Partition>,
    ) -> Result<(), Error> {
        if !partition.is_replicated() || !self.leads(partition) {
            return Ok(());
        }
        let (log, p) = (Arc::clone(self), Arc::clone(partition));
        let cut = tokio::task::spawn_blocking(move || log.retention_cut(&p, now_ms()))
            .await
            .map_err(|e| Error::Replica {
                topic: partition.topic.clone(),
                partition: partition.index,
                message: format!("retention task failed: {e}"),
            })??;
        match cut {
            Some(earliest) => self.trim_replicated_to(partition, earliest).await,
            None => Ok(()),
        }
    }

    /// Proposes deleting the records of replicated `partition` below `earliest` (whole
    /// batches: a batch straddling it stays) to its group, when this broker leads it (a
    /// work queue's records every group acked). Nothing on a follower.
    ///
    /// # Errors
    ///
    /// The group's refusal (the leadership moved).
    pub async fn trim_replicated_to(
        &self,
        partition: &Arc<Partition>,
        earliest: u64,
    ) -> Result<(), Error> {
        match self.replicator.get() {
            Some(r) if partition.is_replicated() && r.leads(partition) => {
                r.trim(partition, earliest).await
            }
            _ => Ok(()),
        }
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

    /// Stops the writer after it has committed everything queued, and persists. Blocking
    /// until done; later writes fail with [`Error::ShuttingDown`].
    pub async fn close(&self) -> Result<(), Error> {
        let result = self.call(|reply| Command::Shutdown { reply }).await;
        let handle = self.writer.lock().take();
        if let Some(handle) = handle {
            match tokio::task::spawn_blocking(move || handle.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!("the log writer thread had panicked"),
                Err(e) => tracing::error!(error = %e, "joining the log writer thread failed"),
            }
        }
        result
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

/// Seals `keyspace`'s memtable after a rare write (fjall's `rotate_memtable`: the memtable
/// is flushed to a table in the background; the journal file goes on), so that the write
/// does not stay in the journal alone, where a journal cut short after a crash would take
/// it. Failure is logged with `what` (the keyspace's contents): the write was fsynced
/// either way.
pub(crate) fn seal_to_table(keyspace: &fjall::Keyspace, what: &str) {
    if let Err(error) = keyspace.rotate_memtable() {
        tracing::warn!(%error, "cannot move {what} out of the journal into a table");
    }
}

/// Opens fjall in `dir`; when it refuses because of damaged files, salvages the data
/// directory ([`salvage`]) and opens again. Returns what salvage moved aside.
fn open_database(
    dir: &Path,
    options: &LogOptions,
) -> Result<(Database, salvage::SalvageReport), Error> {
    let open_err = |source| Error::open(dir, source);
    let builder = || {
        let mut builder = Database::builder(dir)
            .cache_size(options.cache_bytes)
            // Record values are often already compressed or random; LZ4 on the journal
            // write path costs the single writer CPU for little. Tables still compress.
            .journal_compression(fjall::CompressionType::None)
            .max_journaling_size(options.max_journal_bytes.max(64 * 1024 * 1024));
        if let Some(n) = options.storage_workers {
            builder = builder.worker_threads(n.max(1));
        }
        if let Some(n) = options.max_cached_files {
            builder = builder.max_cached_files(Some(n.max(10)));
        }
        builder
    };
    match builder().open() {
        Ok(db) => Ok((db, salvage::SalvageReport::default())),
        Err(fjall::Error::Locked) => Err(open_err(fjall::Error::Locked)),
        Err(first) => {
            // A damaged or lost file of the records keyspace: move it aside and open
            // without it; the records it held are then reported as missing.
            tracing::error!(error = %error::describe_fjall(&first), "the storage engine refused to open the data directory; looking for damaged files");
            let salvaged = salvage::salvage(dir).map_err(|source| Error::Salvage {
                cause: error::describe_fjall(&first),
                source,
            })?;
            if salvaged.is_empty() {
                return Err(open_err(first));
            }
            Ok((builder().open().map_err(open_err)?, salvaged))
        }
    }
}

#[cfg(test)]
mod tests;
