//! Each partition's committed log end offset, kept in a file of its own beside fjall's
//! journal: `log-end-offsets` in the data directory.
//!
//! Why: the journal holds the newest records *and* the partition counters that name their
//! offsets. When its tail is lost after a crash (a truncated or torn journal file; issue
//! "storage integrity"), nothing left in the database knows that those offsets were ever
//! acknowledged, and the next produce would be acknowledged at the same offsets again.
//! Kafka keeps its `recovery-point-offset-checkpoint` beside the logs for a like reason.
//!
//! The writer thread records the new end of every partition a commit touched after the
//! commit succeeded and *before* the acks go out ([`EndCheckpoint::record`]): one `pwrite`
//! into the page cache, no fsync. It therefore survives a process crash (SIGKILL, a panic,
//! the OOM killer) but not necessarily a power loss; a journal whose fsynced part is damaged
//! *and* a lost page cache together can still roll offsets back by the last rounds before
//! the power loss (documented in the README's fault table).
//!
//! Recovery takes `max(stored counters, end of the last stored batch, checkpoint)` as a
//! partition's next offset ([`super::recovery`]); offsets between the last stored batch and
//! the checkpoint were acknowledged and are gone, so reads of them answer DATA_LOSS
//! ([`super::Error::Missing`]), never another record.
//!
//! A replicated partition's slot also holds its replica group's last Raft log id (term and
//! index of the last entry stored), for the same reason: a replica whose journal lost
//! entries knows how far its log had reached, so it can keep Raft's voting rule (vote only
//! for a candidate whose log is at least as up to date as its own was) while it takes the
//! lost entries again (`crate::replica`, Repair).
//!
//! # Format
//!
//! An 8-byte magic `WEIRLEO2`, then 40-byte slots: the partition's key prefix (topic id and
//! partition index, 8 bytes big-endian, as in [`super::keys`]), the next offset, the last
//! log id's term and its index plus one (0: no log id; 8 bytes big-endian each), a CRC32C of
//! those 32 bytes (4 bytes big-endian) and 4 zero bytes. A slot whose CRC does not match (a
//! torn write) is skipped with a warning. Files of the first format (`WEIRLEO1`: 24-byte
//! slots of prefix, next offset, CRC of those 16 bytes and 4 zero bytes, no log id) are read
//! too. A new file is written at every
//! start-up (temporary file, fsync, rename, fsync of the directory) with the recovered ends,
//! so the slots of deleted topics do not accumulate; partitions created later get slots
//! appended at the end.

use std::{
    collections::HashMap,
    fs::File,
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

/// File name inside the data directory.
pub(crate) const FILE_NAME: &str = "log-end-offsets";
const MAGIC: &[u8; 8] = b"WEIRLEO2";
const SLOT: usize = 40;
/// The first format: no log ids.
const MAGIC_V1: &[u8; 8] = b"WEIRLEO1";
const SLOT_V1: usize = 24;

/// A partition's key prefix: topic id ‖ partition index, big-endian (`keys::partition_prefix`).
pub(crate) type PartitionKey = [u8; 8];

/// A Raft log id as `(term, index)`; ordered as Raft compares logs (term first).
pub(crate) type LastLog = (u64, u64);

/// A partition's end as the checkpoint keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct End {
    /// The partition's next offset.
    pub next: u64,
    /// A replicated partition's last stored Raft log id, if known.
    pub last_log: Option<LastLog>,
}

/// Stored ends by partition, as read at start-up.
pub(crate) type Ends = HashMap<PartitionKey, End>;

/// The open checkpoint file, owned by the writer thread.
pub(crate) struct EndCheckpoint {
    file: File,
    path: PathBuf,
    /// Slot index of each partition.
    slots: HashMap<PartitionKey, usize>,
    /// The file's bytes (magic and slots), so that a run of touched slots is one write.
    image: Vec<u8>,
    /// A write failed and was logged; logged again only after one succeeded.
    failing: bool,
}

/// Reads the checkpoint in `dir`. A missing file yields no ends (a new data directory, or
/// one written before the checkpoint existed). Slots failing their CRC are skipped and
/// logged; a file without the magic is ignored with a warning (its ends are unknown, so
/// recovery falls back to the stored counters and batches).
///
/// # Errors
///
/// The file exists but cannot be read.
pub(crate) fn read(dir: &Path) -> std::io::Result<Ends> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ends::new()),
        Err(e) => return Err(e),
    };
    Ok(parse(&bytes, &path))
}

/// Decodes one slot of a format; `None` for a torn slot.
type DecodeSlot = fn(&[u8]) -> Option<(PartitionKey, End)>;

fn parse(bytes: &[u8], path: &Path) -> Ends {
    let mut ends = Ends::new();
    let header = bytes.get(..MAGIC.len());
    let (slot_len, decode): (usize, DecodeSlot) = if header == Some(MAGIC.as_slice()) {
        (SLOT, decode_slot)
    } else if header == Some(MAGIC_V1.as_slice()) {
        (SLOT_V1, decode_slot_v1)
    } else {
        tracing::warn!(path = %path.display(), "the log end checkpoint has no valid header and is ignored");
        return ends;
    };
    let mut torn = 0usize;
    for slot in bytes[MAGIC.len()..].chunks(slot_len) {
        let Some((key, end)) = decode(slot) else {
            torn += 1;
            continue;
        };
        let e = ends.entry(key).or_default();
        e.next = e.next.max(end.next);
        e.last_log = e.last_log.max(end.last_log);
    }
    if torn > 0 {
        tracing::warn!(path = %path.display(), slots = torn, "log end checkpoint slots failed their checksum (a torn write) and were skipped");
    }
    ends
}

fn encode_slot(key: PartitionKey, end: End) -> [u8; SLOT] {
    let (term, index_plus_one) = end.last_log.map_or((0, 0), |(t, i)| (t, i + 1));
    let mut slot = [0u8; SLOT];
    slot[..8].copy_from_slice(&key);
    slot[8..16].copy_from_slice(&end.next.to_be_bytes());
    slot[16..24].copy_from_slice(&term.to_be_bytes());
    slot[24..32].copy_from_slice(&index_plus_one.to_be_bytes());
    let crc = crc32c::crc32c(&slot[..32]);
    slot[32..36].copy_from_slice(&crc.to_be_bytes());
    slot
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn decode_slot(slot: &[u8]) -> Option<(PartitionKey, End)> {
    if slot.len() != SLOT {
        return None;
    }
    let crc = u32::from_be_bytes(slot[32..36].try_into().ok()?);
    if crc32c::crc32c(&slot[..32]) != crc {
        return None;
    }
    let key: PartitionKey = slot[..8].try_into().ok()?;
    let next = be_u64(&slot[8..16])?;
    let term = be_u64(&slot[16..24])?;
    let last_log = be_u64(&slot[24..32])?
        .checked_sub(1)
        .map(|index| (term, index));
    Some((key, End { next, last_log }))
}

fn decode_slot_v1(slot: &[u8]) -> Option<(PartitionKey, End)> {
    if slot.len() != SLOT_V1 {
        return None;
    }
    let crc = u32::from_be_bytes(slot[16..20].try_into().ok()?);
    if crc32c::crc32c(&slot[..16]) != crc {
        return None;
    }
    let key: PartitionKey = slot[..8].try_into().ok()?;
    let next = be_u64(&slot[8..16])?;
    Some((
        key,
        End {
            next,
            last_log: None,
        },
    ))
}

/// Replaces the file at `path` with `bytes` durably: written to `tmp` (in the same
/// directory), fsynced, renamed over `path`, then the directory fsynced. A crash leaves the
/// old file or the new one, never a mix.
///
/// # Errors
///
/// Any I/O error writing, syncing or renaming.
pub(crate) fn replace_durably(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    {
        let mut f = File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl EndCheckpoint {
    /// Writes a new checkpoint holding `ends` into `dir`, durably (temporary file, fsync,
    /// rename, fsync of the directory), and opens it for [`EndCheckpoint::record`].
    ///
    /// # Errors
    ///
    /// Any I/O error writing, syncing or renaming the file.
    pub(crate) fn create(
        dir: &Path,
        ends: impl IntoIterator<Item = (PartitionKey, End)>,
    ) -> std::io::Result<Self> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let mut image = MAGIC.to_vec();
        let mut slots = HashMap::new();
        for (key, end) in ends {
            if slots.insert(key, slots.len()).is_none() {
                image.extend_from_slice(&encode_slot(key, end));
            }
        }
        replace_durably(&path, &tmp, &image)?;
        let file = std::fs::OpenOptions::new().write(true).open(&path)?;
        Ok(Self {
            file,
            path,
            slots,
            image,
            failing: false,
        })
    }

    /// Records new ends, in one write covering the touched slots (no fsync: see the module
    /// documentation). A failed write is logged (once until a write succeeds again) and not
    /// returned: the checkpoint guards against a damaged journal, and a broker that cannot
    /// write it keeps serving as before it existed.
    pub(crate) fn record(&mut self, ends: impl IntoIterator<Item = (PartitionKey, End)>) {
        let mut low = usize::MAX;
        let mut high = 0usize;
        for (key, end) in ends {
            let next_slot = self.slots.len();
            let index = *self.slots.entry(key).or_insert(next_slot);
            let at = MAGIC.len() + index * SLOT;
            if at == self.image.len() {
                self.image.extend_from_slice(&[0u8; SLOT]);
            }
            self.image[at..at + SLOT].copy_from_slice(&encode_slot(key, end));
            low = low.min(at);
            high = high.max(at + SLOT);
        }
        if low >= high {
            return;
        }
        match self.file.write_all_at(&self.image[low..high], low as u64) {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !self.failing {
                    tracing::error!(path = %self.path.display(), error = %e, "writing the log end checkpoint failed; a later damaged journal could give acknowledged offsets again");
                }
                self.failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(topic: u32, partition: u32) -> PartitionKey {
        super::super::keys::partition_prefix(topic, partition)
    }

    /// An end without a log id (a partition that is not replicated).
    fn at(next: u64) -> End {
        End {
            next,
            last_log: None,
        }
    }

    #[test]
    fn recorded_ends_are_read_back() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(
            read(dir.path()).expect("read").is_empty(),
            "no file, no ends"
        );
        let mut c = EndCheckpoint::create(dir.path(), [(key(1, 0), at(10)), (key(1, 1), at(20))])
            .expect("create");
        let replica = End {
            next: 25,
            last_log: Some((3, 41)),
        };
        c.record([(key(1, 1), replica), (key(2, 0), at(7))]);
        c.record([(key(1, 0), at(11))]);
        let ends = read(dir.path()).expect("read");
        assert_eq!(ends.len(), 3);
        assert_eq!(ends[&key(1, 0)], at(11));
        assert_eq!(ends[&key(1, 1)], replica);
        assert_eq!(ends[&key(2, 0)], at(7));
        // Index 0 is a log id too.
        let first = End {
            next: 0,
            last_log: Some((1, 0)),
        };
        c.record([(key(2, 0), first)]);
        assert_eq!(read(dir.path()).expect("read")[&key(2, 0)], first);
        // A new file keeps only what it is given.
        drop(c);
        EndCheckpoint::create(dir.path(), [(key(2, 0), at(7))]).expect("create");
        assert_eq!(read(dir.path()).expect("read").len(), 1);
    }

    #[test]
    fn a_torn_slot_is_skipped_and_the_others_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let mut c = EndCheckpoint::create(dir.path(), [(key(1, 0), at(10)), (key(1, 1), at(20))])
            .expect("create");
        c.record([(key(1, 0), at(12))]);
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[MAGIC.len() + SLOT + 9] ^= 0x40; // the second slot's offset
        bytes.truncate(bytes.len() - 3); // and a torn last slot
        std::fs::write(&path, bytes).expect("write");
        let ends = read(dir.path()).expect("read");
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[&key(1, 0)], at(12));
    }

    #[test]
    fn a_file_of_the_first_format_is_read() {
        let dir = tempfile::tempdir().expect("dir");
        let mut bytes = MAGIC_V1.to_vec();
        for (k, next) in [(key(1, 0), 10u64), (key(4, 2), 99)] {
            let mut slot = [0u8; SLOT_V1];
            slot[..8].copy_from_slice(&k);
            slot[8..16].copy_from_slice(&next.to_be_bytes());
            let crc = crc32c::crc32c(&slot[..16]);
            slot[16..20].copy_from_slice(&crc.to_be_bytes());
            bytes.extend_from_slice(&slot);
        }
        std::fs::write(dir.path().join(FILE_NAME), bytes).expect("write");
        let ends = read(dir.path()).expect("read");
        assert_eq!(ends.len(), 2);
        assert_eq!(ends[&key(1, 0)], at(10));
        assert_eq!(ends[&key(4, 2)], at(99));
    }

    #[test]
    fn a_file_without_the_header_is_ignored() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join(FILE_NAME),
            b"garbage that is not a checkpoint",
        )
        .expect("write");
        assert!(read(dir.path()).expect("read").is_empty());
    }
}
