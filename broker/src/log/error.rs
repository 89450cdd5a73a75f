//! Errors of the log engine: storage failures (fjall, I/O, checksums) and the log's own
//! refusals (an unknown topic, a full `Reject` topic, an offset out of range). No gRPC or
//! Kubernetes words: the gRPC edge maps each variant to a status code once.

use std::path::PathBuf;

use super::{TopicConfig, batch, idempotence::SequenceError};
use crate::validate::InvalidConfig;

/// Errors of the log engine. Each says what failed and, for bad input, what would be right.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database directory could not be opened or recovered.
    #[error("opening the database at {}: {}", path.display(), describe_fjall(cause))]
    OpenDatabase {
        /// Data directory.
        path: PathBuf,
        /// fjall's error (described in the message, so not repeated as a source).
        cause: fjall::Error,
    },
    /// Another process holds the data directory's lock.
    #[error(
        "another broker is using the data directory {}; stop it, or give this broker its own --data-dir",
        path.display()
    )]
    DataDirectoryLocked {
        /// Data directory.
        path: PathBuf,
    },
    /// A thread of the log (writer, flusher) could not be started.
    #[error("starting the {thread} thread: {source}")]
    StartThread {
        /// Thread name.
        thread: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The log end checkpoint ([`super::checkpoint`]) could not be read or written at
    /// start-up.
    #[error("{action} the log end checkpoint {}: {source}", path.display())]
    Checkpoint {
        /// "reading" or "writing".
        action: &'static str,
        /// The checkpoint file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The storage engine refused to open the data directory and salvaging it failed.
    #[error(
        "the storage engine refused to open the data directory ({cause}), and salvaging it failed: {source}"
    )]
    Salvage {
        /// Why the storage engine refused.
        cause: String,
        /// What failed in salvage.
        source: super::salvage::SalvageError,
    },
    /// Stored metadata did not parse.
    #[error("recovering metadata key {key:?}: {detail}")]
    RecoverMetadata {
        /// The metadata key.
        key: String,
        /// What was wrong.
        detail: String,
    },
    /// A read of a partition's records from fjall failed.
    #[error("reading {topic}/{partition}: {source}")]
    Read {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// fjall's error.
        source: fjall::Error,
    },
    /// A read of a partition's segment file failed (the segment store,
    /// `docs/record-store.md`).
    #[error("reading a segment of {topic}/{partition}: {source}")]
    SegmentRead {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Opening, writing or syncing a segment file failed. A failure to write or sync one
    /// stops the writer as a failed commit does; the broker restarts and recovers.
    #[error("{action} segment {}: {source}", path.display())]
    Segment {
        /// What was done: "opening", "writing", "syncing".
        action: &'static str,
        /// The segment file or partition directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A read of the metadata keyspace failed.
    #[error("reading metadata (prefix {prefix:?}): {source}")]
    ReadMetadata {
        /// Key prefix being read.
        prefix: String,
        /// fjall's error.
        source: fjall::Error,
    },
    /// The database's disk usage could not be read.
    #[error("reading the database's disk usage: {0}")]
    DiskSpace(#[source] fjall::Error),
    /// The segment files' sizes could not be read.
    #[error("reading the segment files' sizes: {0}")]
    SegmentDiskSpace(#[source] std::io::Error),
    /// A value could not be serialized for storage. Nothing was written.
    #[error("encoding {what} for storage: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// serde_json's error.
        source: serde_json::Error,
    },
    /// A commit (write + fsync) failed. fjall is poisoned after this; the broker must exit
    /// and recover rather than retry.
    #[error("committing to the log: {0}")]
    Commit(#[source] fjall::Error),
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
    /// Offsets below the partition's next offset that have no stored batch: records that
    /// were stored and are gone (a lost table or blob file, a torn journal). Never served
    /// as anything else; offsets are never reused.
    #[error(
        "offsets {from}..{to} of {topic}/{partition} are missing from storage (a lost or damaged file); read from offset {to} to skip them"
    )]
    Missing {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// First missing offset.
        from: u64,
        /// First offset after the missing range.
        to: u64,
    },
    /// The storage engine could not read a batch back: a block failed its checksum or a
    /// file is gone.
    #[error(
        "records of {topic}/{partition} from offset {offset} cannot be read back (damaged storage: {}); read from a later offset to skip them",
        describe_fjall(source)
    )]
    Damaged {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// First offset that could not be read.
        offset: u64,
        /// fjall's error.
        source: fjall::Error,
    },
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
    /// An update asked for fewer partitions than the topic has.
    #[error(
        "topic {topic:?} has {current} partitions; partitions can only grow, not shrink to {requested}"
    )]
    PartitionsShrink {
        /// Topic name.
        topic: String,
        /// Partitions now.
        current: u32,
        /// Partitions asked for.
        requested: u32,
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
        "partition {partition} of topic {topic:?} is not served by this broker, which serves partitions {served:?}; send it to the broker that serves it"
    )]
    NotServed {
        /// Topic name.
        topic: String,
        /// Partition asked for.
        partition: u32,
        /// Partitions this broker serves.
        served: Vec<u32>,
    },
    /// A produce to a replicated partition reached a replica that is not its leader (an
    /// election is under way, or the leader moved): nothing was stored; retry at the leader
    /// (Kafka's `NOT_LEADER_OR_FOLLOWER`).
    #[error(
        "this broker is not the leader of partition {partition} of topic {topic:?} ({leader}); nothing was stored, retry at the leader"
    )]
    NotLeader {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// Who leads, as far as this replica knows.
        leader: String,
    },
    /// A produce to a replicated partition was appended by a leader that lost its
    /// leadership before the records committed: they may or may not be stored (a later
    /// leader may have them). Retry with the same producer id and sequence so that a
    /// stored copy is not stored twice.
    #[error(
        "the leader of partition {partition} of topic {topic:?} changed before the records committed; the outcome is unknown: retry idempotently (same producer id and sequence)"
    )]
    OutcomeUnknown {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// A retry of an idempotent request to a replicated partition that is being stored
    /// (proposed, not yet committed): nothing was stored again; retry to get its offsets.
    #[error(
        "sequence {sequence} of producer {producer_id} on {topic}/{partition} is being stored; retry to get its offsets"
    )]
    InFlight {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// Producer id.
        producer_id: u64,
        /// Sequence.
        sequence: u64,
    },
    /// A replica group's storage or consensus failed.
    #[error("replica of partition {partition} of topic {topic:?}: {message}")]
    Replica {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// What failed.
        message: String,
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
    /// A `Reject` topic is at `max_messages` or `max_bytes`; nothing of the request was
    /// stored.
    #[error(
        "topic {topic:?} is full: it holds {held} {unit} and its limit {limit} is {max}; this request of {adding} {unit} was refused whole. Retry after consumers ack (work-queue topics) or messages expire"
    )]
    TopicFull {
        /// Topic name.
        topic: String,
        /// The limit's name: `max_messages` or `max_bytes`.
        limit: &'static str,
        /// `messages` or `bytes`.
        unit: &'static str,
        /// What the topic holds now.
        held: u64,
        /// The limit.
        max: u64,
        /// What the request would add.
        adding: u64,
    },
    /// The file system holding the data directory has less space available than
    /// `--min-free-disk`; nothing of the request was stored.
    #[error(
        "the disk holding the data directory is full: {free} bytes available, below --min-free-disk {min_free}; nothing of this request was stored. Free disk space (delete topics, lower retention, let work queues drain) and retry"
    )]
    DiskFull {
        /// Available bytes.
        free: u64,
        /// The configured minimum.
        min_free: u64,
    },
    /// A produce request with no records.
    #[error("a produce request needs at least one record; this one has none")]
    EmptyProduce,
    /// A record above the topic's `max_message_bytes`.
    #[error(
        "record {index} is {size} bytes (key + value + headers); topic {topic:?} accepts at most {max} bytes per record (max_message_bytes)"
    )]
    RecordTooLarge {
        /// Position of the record in the request.
        index: usize,
        /// Its size in bytes.
        size: usize,
        /// Topic name.
        topic: String,
        /// The topic's `max_message_bytes`.
        max: u32,
    },
    /// An idempotent request whose records would land on several partitions: sequences
    /// count per partition (Kafka's KIP-98), so such a request has no one sequence.
    #[error(
        "an idempotent produce request to topic {topic:?} must land on one partition, this one would land on partitions {partitions:?}: set `partition`, or send one request per partition (keyed records go to murmur2(key) mod partitions), each with that partition's sequence"
    )]
    IdempotentSpansPartitions {
        /// Topic name.
        topic: String,
        /// The partitions its records would go to.
        partitions: Vec<u32>,
    },
    /// An idempotent request without `partition` whose records have no key: the broker
    /// would choose the partition, so the producer could not have numbered it.
    #[error(
        "an idempotent produce request to topic {topic:?} has unkeyed records and no `partition`: sequences count per partition, so an idempotent producer chooses the partition (set `partition`) or keys every record"
    )]
    IdempotentWithoutPartition {
        /// Topic name.
        topic: String,
    },
    /// An idempotent producer's sequence does not follow its last one.
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    /// A setting or name broke a rule.
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// The log is shutting down or its writer has stopped.
    #[error("the log is shutting down")]
    ShuttingDown,
}

impl Error {
    /// Whether this is damage to stored records (answered DATA_LOSS): a missing range, a
    /// batch failing its CRC, or storage that cannot be read back.
    pub fn is_data_loss(&self) -> bool {
        matches!(
            self,
            Self::Missing { .. } | Self::Corrupt { .. } | Self::Damaged { .. }
        )
    }

    /// Maps an error of opening fjall, turning a held lock into [`Error::DataDirectoryLocked`].
    pub(crate) fn open(path: &std::path::Path, source: fjall::Error) -> Self {
        if matches!(source, fjall::Error::Locked) {
            return Self::DataDirectoryLocked {
                path: path.to_path_buf(),
            };
        }
        Self::OpenDatabase {
            path: path.to_path_buf(),
            cause: source,
        }
    }
}

impl Error {
    /// Maps an error of reading `topic`/`partition` at `offset`: damage to stored data
    /// (a failed checksum, an undecodable block, a lost file) is [`Error::Damaged`], other
    /// failures (I/O) [`Error::Read`].
    pub(crate) fn from_read(
        topic: &str,
        partition: u32,
        offset: u64,
        source: fjall::Error,
    ) -> Self {
        if is_damage(&source) {
            Self::Damaged {
                topic: topic.to_owned(),
                partition,
                offset,
                source,
            }
        } else {
            Self::Read {
                topic: topic.to_owned(),
                partition,
                source,
            }
        }
    }
}

/// Whether a fjall error means stored data is damaged or gone (rather than the disk or the
/// process failing now).
pub fn is_damage(e: &fjall::Error) -> bool {
    use fjall::LsmError as Lsm;
    match e {
        fjall::Error::Decompress(_)
        | fjall::Error::InvalidTag(_)
        | fjall::Error::InvalidTrailer
        | fjall::Error::Unrecoverable => true,
        fjall::Error::Io(io) => io.kind() == std::io::ErrorKind::NotFound,
        fjall::Error::Storage(inner) => match inner {
            Lsm::Io(io) => io.kind() == std::io::ErrorKind::NotFound,
            Lsm::ChecksumMismatch { .. }
            | Lsm::Decompress(_)
            | Lsm::InvalidTag(_)
            | Lsm::InvalidTrailer
            | Lsm::InvalidHeader(_)
            | Lsm::Unrecoverable => true,
            _ => false,
        },
        _ => false,
    }
}

/// fjall's error in words: its `Display` is its `Debug` form (`FjallError: Io(Os { … })`).
pub fn describe_fjall(e: &fjall::Error) -> String {
    match e {
        fjall::Error::Io(io) => io.to_string(),
        fjall::Error::Locked => "the directory is locked by another process".into(),
        fjall::Error::Poisoned => {
            "an earlier write failed, so the storage engine accepts no more (restart to recover)"
                .into()
        }
        fjall::Error::Storage(inner) => format!("storage: {inner}"),
        other => format!("{other:?}"),
    }
}
