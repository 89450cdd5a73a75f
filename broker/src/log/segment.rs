//! Segment files of the write-once record store (`docs/record-store.md`): a partition's
//! record batches appended as frames, written around the page cache with `O_DIRECT`.
//!
//! A segment is named by the first offset it holds (`<base offset, 20 digits>.log`) and is
//! a sequence of frames, `length (u32 little-endian) ‖ batch`, the batch in the format of
//! [`super::batch`] (its CRC32C covers it). The bytes after the last frame, up to the end
//! of its 4 KiB block, are zeros: a frame length of 0 ends a scan.
//!
//! `O_DIRECT` writes whole 4 KiB blocks from 4 KiB-aligned memory at 4 KiB-aligned file
//! positions. [`SegmentWriter`] keeps the segment's unfinished last block at the start of
//! its buffer and writes it again, with the frames appended after it, on the next
//! [`SegmentWriter::write`]; those earlier bytes are rewritten with the same content.
//! Without `O_DIRECT` (asked for, or refused by the file system with `EINVAL`, as some
//! network and FUSE file systems do) the same blocks go through the page cache.
//!

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::batch;

/// The unit of `O_DIRECT` writes: file positions, lengths and buffer addresses are
/// multiples of it (the page size; covers 512-byte and 4 KiB logical blocks).
pub(crate) const BLOCK: usize = 4096;
/// The directory of segments inside the data directory.
pub(crate) const DIR_NAME: &str = "segments";
/// Largest write buffer a segment writer keeps between writes (bytes); a larger one, left
/// by a large round, is given back.
const MAX_KEPT_BUFFER: usize = 4 * 1024 * 1024;
/// Bytes of a frame's length field.
pub(crate) const FRAME_HEADER: usize = 4;
/// The name of a partition's spare segment file, in the partition's directory: a segment
/// that retention deleted, kept to be written over as the partition's next segment
/// ([`SegmentWriter::create`]). PostgreSQL recycles WAL segments (`wal_recycle`) and
/// RocksDB its log files (`recycle_log_file_num`) for the same reason: an `fdatasync`
/// after writing over blocks the file already has commits no file-system metadata, where
/// one after appending to a growing file also commits the file system's journal (the new
/// size and blocks). On ext4 in this project's benchmark VM, rounds of 4 × 2 MiB
/// `O_DIRECT` writes, each round synced, ran at 323–342 MB/s over written blocks against
/// 233–262 MB/s appending (`docs/benchmarks.md`).
pub(crate) const SPARE_NAME: &str = "spare.segment";

/// The file name of the segment whose first offset is `base_offset`.
pub(crate) fn file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.log")
}

/// Memory aligned to [`BLOCK`] without `unsafe`: a `Vec` one block longer than needed,
/// used from its first aligned byte.
struct AlignedBuf {
    memory: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn with_capacity(bytes: usize) -> Self {
        let memory = vec![0u8; bytes.div_ceil(BLOCK) * BLOCK + BLOCK];
        let start = memory.as_ptr().align_offset(BLOCK);
        Self {
            memory,
            start,
            len: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.memory.len() - self.start
    }

    /// Makes room for `more` bytes after `len`, moving to a larger buffer if needed.
    fn reserve(&mut self, more: usize) {
        if self.len + more <= self.capacity() {
            return;
        }
        let mut bigger = Self::with_capacity((self.len + more).max(2 * self.capacity()));
        bigger.memory[bigger.start..bigger.start + self.len]
            .copy_from_slice(&self.memory[self.start..self.start + self.len]);
        bigger.len = self.len;
        *self = bigger;
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        let at = self.start + self.len;
        self.memory[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// The bytes from the start through `len` rounded up to whole blocks, zero-padded.
    fn blocks(&mut self) -> &[u8] {
        let padded = self.len.div_ceil(BLOCK) * BLOCK;
        self.reserve(padded - self.len);
        self.memory[self.start + self.len..self.start + padded].fill(0);
        &self.memory[self.start..self.start + padded]
    }

    /// The bytes held.
    fn bytes(&self) -> &[u8] {
        &self.memory[self.start..self.start + self.len]
    }

    /// Drops the first `bytes` (whole blocks), keeping what follows at the start.
    fn consume(&mut self, bytes: usize) {
        let from = self.start + bytes;
        self.memory
            .copy_within(from..self.start + self.len, self.start);
        self.len -= bytes;
    }
}

/// Appends frames to one segment file. Single-threaded: owned by the log writer.
pub(crate) struct SegmentWriter {
    file: File,
    path: PathBuf,
    base_offset: u64,
    /// Bytes of frames in the file and in the buffer: the position of the next frame.
    len: u64,
    /// File position of the buffer's first byte (a block boundary).
    written_to: u64,
    /// The unfinished last block written before, then the frames not written yet.
    buffer: AlignedBuf,
    direct: bool,
}

impl std::fmt::Debug for SegmentWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentWriter")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

impl SegmentWriter {
    /// Creates the segment of `base_offset` in `dir`, written with `O_DIRECT` when `direct`
    /// and the file system allows it: the partition's spare file ([`SPARE_NAME`]) renamed,
    /// if it has one, its frames to be written over from the start, else a new file. A
    /// file of that name is replaced or emptied first: a segment is created for the
    /// partition's next offset, so no index entry can name a frame in it (it was created
    /// before a crash that came before its first commit, or its frames were truncated).
    /// The directory is synced before this returns, so that the segment's name is durable
    /// before any frame in it is acknowledged (an `fdatasync` of the file does not promise
    /// its directory entry).
    ///
    /// A recycled file holds the frames of an older segment of the same partition past
    /// what this writer wrote; nothing reads them: reads go by the index's pointers and
    /// check the batch header they find ([`Segments::read`]), and [`Self::open`] cuts a
    /// segment after its last indexed frame.
    pub(crate) fn create(dir: &Path, base_offset: u64, direct: bool) -> io::Result<Self> {
        let path = dir.join(file_name(base_offset));
        let recycled = match std::fs::rename(dir.join(SPARE_NAME), &path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        let (file, direct) = open_for_append(&path, !recycled, direct)?;
        File::open(dir)?.sync_all()?;
        Ok(Self {
            file,
            path,
            base_offset,
            len: 0,
            written_to: 0,
            buffer: AlignedBuf::with_capacity(BLOCK),
            direct,
        })
    }

    /// Opens the segment of `base_offset` in `dir` to append after its first `valid_len`
    /// bytes (the end of its last frame the index knows): what follows is cut off, and the
    /// unfinished last block is read back to be written again with the next frames.
    pub(crate) fn open(
        dir: &Path,
        base_offset: u64,
        valid_len: u64,
        direct: bool,
    ) -> io::Result<Self> {
        let path = dir.join(file_name(base_offset));
        let (file, direct) = open_for_append(&path, false, direct)?;
        let on_disk = file.metadata()?.len();
        if on_disk < valid_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "segment {} holds {on_disk} bytes, fewer than the {valid_len} its index names",
                    path.display()
                ),
            ));
        }
        file.set_len(valid_len)?;
        let written_to = valid_len / BLOCK as u64 * BLOCK as u64;
        let tail = (valid_len - written_to) as usize;
        let mut buffer = AlignedBuf::with_capacity(BLOCK);
        if tail > 0 {
            // Read through the page cache: `O_DIRECT` reads need whole aligned blocks.
            let mut bytes = vec![0u8; tail];
            File::open(&path)?.read_exact_at(&mut bytes, written_to)?;
            buffer.extend(&bytes);
        }
        Ok(Self {
            file,
            path,
            base_offset,
            len: valid_len,
            written_to,
            buffer,
            direct,
        })
    }

    /// The segment file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The first offset of this segment (its name).
    pub(crate) fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// Bytes of frames appended, written or not: the position the next frame gets.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Whether writes bypass the page cache (`O_DIRECT` was accepted).
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// Buffers one frame holding `batch`; returns its position in the segment. Nothing
    /// reaches the file before [`Self::write`]. Fails, buffering nothing, for a batch of
    /// 4 GiB or more (a frame's length is a u32).
    pub(crate) fn append(&mut self, batch: &[u8]) -> io::Result<u64> {
        let len = u32::try_from(batch.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a batch of {} bytes does not fit a frame (at most 4 GiB - 1)",
                    batch.len()
                ),
            )
        })?;
        let position = self.len;
        self.buffer.extend(&len.to_le_bytes());
        self.buffer.extend(batch);
        self.len += (FRAME_HEADER + batch.len()) as u64;
        Ok(position)
    }

    /// Writes the buffered frames (and the unfinished block before them) as whole blocks;
    /// the new unfinished block stays buffered for the next write. Not durable until
    /// [`Self::sync`].
    pub(crate) fn write(&mut self) -> io::Result<()> {
        let pending = self.len - self.written_to;
        if pending == 0 {
            return Ok(());
        }
        let written_to = self.written_to;
        self.file.write_all_at(self.buffer.blocks(), written_to)?;
        let whole = (pending / BLOCK as u64) * BLOCK as u64;
        self.buffer.consume(whole as usize);
        self.written_to += whole;
        if self.buffer.capacity() > MAX_KEPT_BUFFER {
            // A large round's buffer is not held for the partition's next, smaller ones.
            let mut small = AlignedBuf::with_capacity(BLOCK);
            small.extend(self.buffer.bytes());
            self.buffer = small;
        }
        Ok(())
    }

    /// `fdatasync`: what [`Self::write`] wrote is on the device.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Opens `path` for writing, with `O_DIRECT` if `direct` unless the file system refuses it
/// (`EINVAL`; then without, and a warning); returns the file and whether it is direct.
fn open_for_append(path: &Path, create: bool, direct: bool) -> io::Result<(File, bool)> {
    if !direct {
        return Ok((options(create, false).open(path)?, false));
    }
    match options(create, true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            tracing::warn!(path = %path.display(), "the file system refuses O_DIRECT; segments are written through the page cache");
            Ok((options(create, false).open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

fn options(create: bool, direct: bool) -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.write(true);
    if create {
        o.create(true).truncate(true);
    }
    if direct {
        o.custom_flags(rustix::fs::OFlags::DIRECT.bits().cast_signed());
    }
    o
}

#[cfg(test)] // used by start-up's segment check next (docs/record-store.md, step 3)
/// One frame found by [`scan`]: its position in the segment and its batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Position of the frame's length field.
    pub position: u64,
    /// The batch bytes.
    pub batch: Vec<u8>,
}

#[cfg(test)] // used by start-up's segment check next (docs/record-store.md, step 3)
/// Where a [`scan`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanEnd {
    /// A zero length or the end of the file: every frame before it is whole.
    Clean,
    /// A frame whose length runs past the file or whose batch fails its checks (CRC32C,
    /// magic); the frames before it are whole.
    Damaged,
}

#[cfg(test)] // used by start-up's segment check next (docs/record-store.md, step 3)
/// Reads the frames of the segment at `path` from `from` (a frame's position) until the
/// first zero length, the end of the file or damage; returns them, the position after
/// the last whole frame, and why it stopped. Reads through the page cache.
pub(crate) fn scan(path: &Path, from: u64) -> io::Result<(Vec<Frame>, u64, ScanEnd)> {
    let bytes = std::fs::read(path)?;
    let mut frames = Vec::new();
    let mut at = usize::try_from(from).map_err(io::Error::other)?;
    loop {
        let Some(header) = bytes.get(at..at + FRAME_HEADER) else {
            return Ok((frames, at as u64, ScanEnd::Clean));
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len == 0 {
            return Ok((frames, at as u64, ScanEnd::Clean));
        }
        let start = at + FRAME_HEADER;
        let Some(batch) = bytes.get(start..start + len) else {
            return Ok((frames, at as u64, ScanEnd::Damaged));
        };
        if batch::verify(batch).is_err() {
            return Ok((frames, at as u64, ScanEnd::Damaged));
        }
        frames.push(Frame {
            position: at as u64,
            batch: batch.to_vec(),
        });
        at = start + len;
    }
}

/// Reads the frame at `position` of `file` whose batch is `len` bytes and verifies it;
/// `Ok(None)` when the bytes there are not that frame (another length, a failed CRC32C,
/// past the end of the file). Reads the whole 4 KiB blocks that hold the frame into
/// aligned memory, as an `O_DIRECT` file needs (reads go through the page cache today:
/// with `O_DIRECT` catch-up reads were no faster, 1.23–1.50M against 1.41–1.54M msg/s,
/// and several groups reading one backlog share cached pages); the batch returned shares
/// that memory.
pub(crate) fn read_frame(file: &File, position: u64, len: u32) -> io::Result<Option<bytes::Bytes>> {
    let block = BLOCK as u64;
    let start = position / block * block;
    let end = (position + FRAME_HEADER as u64 + u64::from(len)).div_ceil(block) * block;
    let want = usize::try_from(end - start).map_err(io::Error::other)?;
    let mut buffer = AlignedBuf::with_capacity(want);
    let at = buffer.start;
    let mut got = 0;
    while got < want {
        let n = file.read_at(&mut buffer.memory[at + got..at + want], start + got as u64)?;
        got += n;
        // The end of the file: a direct read cannot go on from an unaligned position.
        if n == 0 || n % BLOCK != 0 {
            break;
        }
    }
    let frame = (position - start) as usize;
    let batch_at = frame + FRAME_HEADER;
    if got < batch_at + len as usize {
        return Ok(None);
    }
    let header = &buffer.memory[at + frame..at + batch_at];
    if u32::from_le_bytes([header[0], header[1], header[2], header[3]]) != len {
        return Ok(None);
    }
    let batch =
        bytes::Bytes::from(buffer.memory).slice(at + batch_at..at + batch_at + len as usize);
    Ok(batch::verify(&batch).is_ok().then_some(batch))
}

/// Tag byte that starts a [`Pointer`] value; a batch starts with its magic (`1`).
pub(crate) const POINTER_TAG: u8 = 0xFF;
/// Bytes of an encoded [`Pointer`].
pub(crate) const POINTER_LEN: usize = 1 + 8 + 8 + 4 + batch::HEADER_LEN;

/// A `records` keyspace value of the segment store: where a batch's frame is, and a copy
/// of the batch's header, so that retention, recovery and time lookups read headers
/// without reading segments. Encoded as `tag (0xFF) ‖ segment base offset (u64 BE) ‖
/// position (u64 BE) ‖ batch length (u32 BE) ‖ batch header (39 bytes)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pointer {
    /// Base offset (name) of the segment holding the frame.
    pub segment: u64,
    /// Position of the frame's length field in the segment.
    pub position: u64,
    /// Bytes of the batch (the frame is [`FRAME_HEADER`] more).
    pub len: u32,
    /// The batch's first [`batch::HEADER_LEN`] bytes.
    pub header: [u8; batch::HEADER_LEN],
}

impl Pointer {
    /// The pointer to `batch`'s frame at `position` of segment `segment`; `None` for a
    /// batch shorter than its header or of 4 GiB or more.
    pub(crate) fn new(segment: u64, position: u64, batch: &[u8]) -> Option<Self> {
        Some(Self {
            segment,
            position,
            len: u32::try_from(batch.len()).ok()?,
            header: batch.get(..batch::HEADER_LEN)?.try_into().ok()?,
        })
    }

    pub(crate) fn encode(&self) -> [u8; POINTER_LEN] {
        let mut out = [0u8; POINTER_LEN];
        out[0] = POINTER_TAG;
        out[1..9].copy_from_slice(&self.segment.to_be_bytes());
        out[9..17].copy_from_slice(&self.position.to_be_bytes());
        out[17..21].copy_from_slice(&self.len.to_be_bytes());
        out[21..].copy_from_slice(&self.header);
        out
    }

    /// The pointer in `value`; `None` when `value` is not one (a batch stored whole).
    pub(crate) fn decode(value: &[u8]) -> Option<Self> {
        if value.len() != POINTER_LEN || value[0] != POINTER_TAG {
            return None;
        }
        Some(Self {
            segment: u64::from_be_bytes(value[1..9].try_into().ok()?),
            position: u64::from_be_bytes(value[9..17].try_into().ok()?),
            len: u32::from_be_bytes(value[17..21].try_into().ok()?),
            header: value[21..].try_into().ok()?,
        })
    }

    /// The position after the frame: where the segment's next frame goes.
    pub(crate) fn end(&self) -> u64 {
        self.position + FRAME_HEADER as u64 + u64::from(self.len)
    }

    /// The batch's header, from the copy (magic checked, not the CRC32C, which needs the
    /// frame).
    pub(crate) fn header(&self) -> Result<batch::BatchHeader, batch::DecodeError> {
        batch::parse_header(&self.header)
    }
}

/// A `records` value's batch header and the batch's size in bytes: from a pointer's copy
/// of the header, or from a batch held whole (its CRC32C verified).
pub(crate) fn stored_header(value: &[u8]) -> Result<(batch::BatchHeader, u64), batch::DecodeError> {
    match Pointer::decode(value) {
        Some(p) => Ok((p.header()?, u64::from(p.len))),
        None => Ok((batch::verify(value)?, value.len() as u64)),
    }
}

/// The size in bytes of the batch a `records` value holds or points at.
pub(crate) fn stored_len(value: &[u8]) -> u64 {
    Pointer::decode(value).map_or(value.len() as u64, |p| u64::from(p.len))
}

/// The base offsets of the segment files in `dir`, ascending; files of other names are
/// left out. An absent directory has none.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(base);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The newest batches written to segments, kept in memory so that consumers at the tail
/// read them without the disk (writes bypass the page cache): Redpanda's batch cache, first
/// in, first out within a byte budget. Keyed by where the frame is (partition, segment,
/// position); a partition's entries are dropped when its segments are truncated, because a
/// position may then be written again with another batch.
#[derive(Debug, Default)]
pub(crate) struct TailCache {
    budget: u64,
    bytes: u64,
    batches: HashMap<([u8; 8], u64, u64), bytes::Bytes>,
    order: std::collections::VecDeque<([u8; 8], u64, u64)>,
}

impl TailCache {
    /// A cache of at most `budget` bytes of batches; 0 keeps nothing.
    pub(crate) fn new(budget: u64) -> Self {
        Self {
            budget,
            ..Self::default()
        }
    }

    /// Keeps `batch`, the frame at `position` of segment `segment` of partition `prefix`,
    /// dropping the oldest batches beyond the budget.
    pub(crate) fn insert(
        &mut self,
        prefix: [u8; 8],
        segment: u64,
        position: u64,
        batch: bytes::Bytes,
    ) {
        let len = batch.len() as u64;
        if len > self.budget {
            return;
        }
        let key = (prefix, segment, position);
        if let Some(old) = self.batches.insert(key, batch) {
            self.bytes -= old.len() as u64;
        } else {
            self.order.push_back(key);
        }
        self.bytes += len;
        while self.bytes > self.budget {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.batches.remove(&oldest) {
                self.bytes -= gone.len() as u64;
            }
        }
    }

    /// The batch at `pointer` of partition `prefix`, if kept.
    pub(crate) fn get(&self, prefix: [u8; 8], pointer: &Pointer) -> Option<bytes::Bytes> {
        self.batches
            .get(&(prefix, pointer.segment, pointer.position))
            .cloned()
    }

    /// Drops every batch of partition `prefix`.
    pub(crate) fn forget(&mut self, prefix: [u8; 8]) {
        self.batches.retain(|(p, _, _), _| *p != prefix);
        self.order.retain(|(p, _, _)| *p != prefix);
        self.bytes = self.batches.values().map(|b| b.len() as u64).sum();
    }

    /// Bytes of batches kept.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Whether `path` names the file `file` is open on (same device and inode).
fn still_named(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// What reading a frame found.
#[derive(Debug)]
pub(crate) enum FrameRead {
    /// The batch: read from the segment with its CRC32C verified, or kept from its write.
    Batch(bytes::Bytes),
    /// The segment file does not exist, or no longer under the segment's name (deleted or
    /// recycled since the pointer was read).
    Gone,
    /// The bytes at the pointer are not the frame it names (another length, a failed
    /// CRC32C, past the end of the file).
    Damaged,
}

/// Segment files open for reads, by (partition key prefix, segment base offset).
type OpenSegments = HashMap<([u8; 8], u64), Arc<File>>;

/// Cap on segment files kept open for reads; past it the cache starts over.
const MAX_OPEN_SEGMENTS: usize = 512;

/// The segment files of every partition: `<root>/<topic id>-<partition>/<base offset>.log`.
/// Shared by the writer (which creates and appends) and readers (which keep files open).
#[derive(Debug)]
pub(crate) struct Segments {
    root: PathBuf,
    /// Files open for reads, by (partition prefix, segment base offset).
    open: parking_lot::Mutex<OpenSegments>,
    /// The newest batches written.
    tail: parking_lot::Mutex<TailCache>,
}

impl Segments {
    /// Segments under `root`, the newest `tail_cache_bytes` of batches written kept in
    /// memory for reads.
    pub(crate) fn new(root: PathBuf, tail_cache_bytes: u64) -> Self {
        Self {
            root,
            open: parking_lot::Mutex::new(HashMap::new()),
            tail: parking_lot::Mutex::new(TailCache::new(tail_cache_bytes)),
        }
    }

    /// Keeps a batch just appended at `position` of segment `segment` of partition
    /// `prefix` for reads.
    pub(crate) fn remember(
        &self,
        prefix: [u8; 8],
        segment: u64,
        position: u64,
        batch: bytes::Bytes,
    ) {
        self.tail.lock().insert(prefix, segment, position, batch);
    }

    /// Bytes of batches kept for reads.
    #[cfg(test)]
    pub(crate) fn tail_bytes(&self) -> u64 {
        self.tail.lock().bytes()
    }

    /// Bytes of every segment file under the root (their lengths), spares
    /// ([`SPARE_NAME`]) included. Files deleted while they are counted count as 0.
    pub(crate) fn disk_space(&self) -> io::Result<u64> {
        let partitions = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut bytes = 0;
        for partition in partitions {
            let dir = partition?.path();
            let files = list(&dir)?.into_iter().map(file_name);
            for name in files.chain([SPARE_NAME.to_owned()]) {
                match std::fs::metadata(dir.join(name)) {
                    Ok(m) => bytes += m.len(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(bytes)
    }

    /// The directory of the partition whose key prefix is `prefix` (topic id ‖ partition,
    /// big-endian).
    pub(crate) fn partition_dir(&self, prefix: [u8; 8]) -> PathBuf {
        let topic = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let partition = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        self.root.join(format!("{topic}-{partition}"))
    }

    /// The batch `pointer` names in the partition `prefix`: from the tail cache, else read
    /// from its segment and verified, its header the pointer's copy. Bytes that are not
    /// that batch read as [`FrameRead::Gone`] when the file no longer has the segment's
    /// name (retention deleted it, or recycled it as a newer segment, after the pointer
    /// was read), else as [`FrameRead::Damaged`]. Blocking.
    pub(crate) fn read(&self, prefix: [u8; 8], pointer: &Pointer) -> io::Result<FrameRead> {
        if let Some(batch) = self.tail.lock().get(prefix, pointer) {
            return Ok(FrameRead::Batch(batch));
        }
        let key = (prefix, pointer.segment);
        let path = || self.partition_dir(prefix).join(file_name(pointer.segment));
        let cached = self.open.lock().get(&key).cloned();
        let file = if let Some(file) = cached {
            file
        } else {
            let file = match File::open(path()) {
                Ok(f) => Arc::new(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(FrameRead::Gone),
                Err(e) => return Err(e),
            };
            let mut open = self.open.lock();
            if open.len() >= MAX_OPEN_SEGMENTS {
                open.clear();
            }
            open.insert(key, Arc::clone(&file));
            file
        };
        match read_frame(&file, pointer.position, pointer.len)? {
            Some(batch) if batch.get(..batch::HEADER_LEN) == Some(&pointer.header[..]) => {
                Ok(FrameRead::Batch(batch))
            }
            _ if still_named(&file, &path())? => Ok(FrameRead::Damaged),
            _ => {
                self.open.lock().remove(&key);
                Ok(FrameRead::Gone)
            }
        }
    }

    /// Forgets open files of the partition `prefix` (some of its segments were deleted).
    pub(crate) fn forget_files(&self, prefix: [u8; 8]) {
        self.open.lock().retain(|(p, _), _| *p != prefix);
    }

    /// Forgets open files and kept batches of the partition `prefix` (its segments were
    /// truncated or deleted: a position may be written again).
    pub(crate) fn forget(&self, prefix: [u8; 8]) {
        self.forget_files(prefix);
        self.tail.lock().forget(prefix);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::log::batch::Record;

    /// A sealed batch of `count` records of `size` bytes at `base`.
    fn sealed(base: u64, count: usize, size: usize) -> Vec<u8> {
        let records: Vec<Record> = (0..count)
            .map(|i| Record {
                value: Bytes::from(vec![(base as usize + i) as u8; size]),
                ..Record::default()
            })
            .collect();
        let mut b = batch::encode(&records, 1);
        batch::seal(&mut b, base);
        b
    }

    #[test]
    fn frames_written_in_rounds_scan_back_whole_and_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SegmentWriter::create(dir.path(), 0, true).expect("create");
        assert!(
            w.is_direct(),
            "the temporary directory's file system refused O_DIRECT"
        );
        let mut expected = Vec::new();
        let mut base = 0;
        // Rounds of odd sizes, so most rounds end inside a block and the next one
        // rewrites it.
        for round in 0..7 {
            for i in 0..=round {
                let b = sealed(base, 3, 100 + 997 * i);
                base += 3;
                let position = w.append(&b).expect("append");
                expected.push(Frame { position, batch: b });
            }
            w.write().expect("write");
            w.sync().expect("sync");
        }
        let path = dir.path().join(file_name(0));
        let on_disk = std::fs::metadata(&path).expect("metadata").len();
        assert_eq!(on_disk % BLOCK as u64, 0, "whole blocks on disk");
        assert!(on_disk >= w.len());
        let (frames, end, how) = scan(&path, 0).expect("scan");
        assert_eq!(how, ScanEnd::Clean);
        assert_eq!(end, w.len());
        assert_eq!(frames, expected);
        let file = File::open(&path).expect("open");
        for f in &expected {
            let read = read_frame(&file, f.position, f.batch.len() as u32).expect("read");
            assert_eq!(read.as_deref(), Some(f.batch.as_slice()));
        }
    }

    /// A reader that opened a segment before retention recycled it (the open file now
    /// written over as a newer segment) reads the old pointer as gone, never as the newer
    /// batch of the same length at the same position; the newer batch reads back.
    #[test]
    fn a_pointer_into_a_recycled_segment_reads_as_gone() {
        let root = tempfile::tempdir().expect("tempdir");
        let segments = Segments::new(root.path().to_path_buf(), 0);
        let prefix = [0, 0, 0, 1, 0, 0, 0, 0];
        let dir = segments.partition_dir(prefix);
        std::fs::create_dir_all(&dir).expect("creates");
        let mut w = SegmentWriter::create(&dir, 0, true).expect("create");
        let old = sealed(0, 3, 2000);
        let position = w.append(&old).expect("append");
        w.write().expect("write");
        w.sync().expect("sync");
        let stale = Pointer::new(0, position, &old).expect("pointer");
        // Keeps the file open in the readers' cache.
        assert!(matches!(segments.read(prefix, &stale), Ok(FrameRead::Batch(b)) if b == old));
        drop(w);
        std::fs::rename(dir.join(file_name(0)), dir.join(SPARE_NAME)).expect("spare");
        let mut w = SegmentWriter::create(&dir, 100, true).expect("create");
        assert!(!dir.join(SPARE_NAME).exists(), "the spare was used");
        let new = sealed(100, 3, 2000);
        assert_eq!(new.len(), old.len());
        assert_eq!(w.append(&new).expect("append"), position);
        w.write().expect("write");
        w.sync().expect("sync");
        match segments.read(prefix, &stale).expect("reads") {
            FrameRead::Gone => {}
            FrameRead::Batch(b) => panic!("the old pointer read a batch of {} bytes", b.len()),
            FrameRead::Damaged => panic!("the old pointer read as damaged"),
        }
        let fresh = Pointer::new(100, position, &new).expect("pointer");
        assert!(matches!(segments.read(prefix, &fresh), Ok(FrameRead::Batch(b)) if b == new));
    }

    #[test]
    fn reopened_at_the_indexed_end_cuts_what_follows_and_continues_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SegmentWriter::create(dir.path(), 10, true).expect("create");
        let first = sealed(10, 2, 1500);
        w.append(&first).expect("append");
        w.write().expect("write");
        let kept = w.len();
        // A round written but never indexed (the commit did not happen before a crash).
        w.append(&sealed(12, 2, 1500)).expect("append");
        w.write().expect("write");
        w.sync().expect("sync");
        drop(w);
        let mut w = SegmentWriter::open(dir.path(), 10, kept, true).expect("open");
        assert_eq!(w.len(), kept);
        let next = sealed(12, 1, 5000);
        let position = w.append(&next).expect("append");
        assert_eq!(position, kept);
        w.write().expect("write");
        w.sync().expect("sync");
        let (frames, end, how) = scan(&dir.path().join(file_name(10)), 0).expect("scan");
        assert_eq!(how, ScanEnd::Clean);
        assert_eq!(end, w.len());
        let batches: Vec<_> = frames.into_iter().map(|f| f.batch).collect();
        assert_eq!(batches, vec![first, next]);
    }

    #[test]
    fn a_torn_frame_ends_the_scan_as_damage_after_the_whole_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SegmentWriter::create(dir.path(), 0, true).expect("create");
        let whole = sealed(0, 4, 700);
        w.append(&whole).expect("append");
        let torn_at = w.append(&sealed(4, 4, 700)).expect("append");
        w.write().expect("write");
        w.sync().expect("sync");
        let path = dir.path().join(file_name(0));
        // A flipped byte inside the second batch: its CRC32C fails.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let at = torn_at + FRAME_HEADER as u64 + 100;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).expect("read");
        file.write_all_at(&[byte[0] ^ 0xFF], at).expect("flip");
        let (frames, end, how) = scan(&path, 0).expect("scan");
        assert_eq!(how, ScanEnd::Damaged);
        assert_eq!(end, torn_at);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].batch, whole);
        assert_eq!(
            read_frame(&file, torn_at, 0).expect("read"),
            None,
            "a frame length that does not match is not that frame"
        );
        // A segment cut short inside a frame: the frame runs past the end.
        file.set_len(torn_at + 50).expect("truncate");
        let (frames, end, how) = scan(&path, 0).expect("scan");
        assert_eq!((frames.len(), end, how), (1, torn_at, ScanEnd::Damaged));
    }

    #[test]
    fn an_index_naming_more_than_the_segment_holds_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SegmentWriter::create(dir.path(), 0, true).expect("create");
        w.append(&sealed(0, 1, 10)).expect("append");
        w.write().expect("write");
        drop(w);
        let err = SegmentWriter::open(dir.path(), 0, 1 << 20, true).expect_err("beyond the file");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("fewer than the 1048576"), "{err}");
    }

    #[test]
    fn the_tail_cache_keeps_the_newest_batches_within_its_budget() {
        let pointer = |segment, position| Pointer {
            segment,
            position,
            len: 0,
            header: [0; batch::HEADER_LEN],
        };
        let (a, b) = ([0, 0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 1]);
        let mut cache = TailCache::new(250);
        cache.insert(a, 0, 0, bytes::Bytes::from(vec![1; 100]));
        cache.insert(b, 0, 0, bytes::Bytes::from(vec![2; 100]));
        cache.insert(a, 0, 104, bytes::Bytes::from(vec![3; 100]));
        assert_eq!(cache.bytes(), 200, "the oldest went past the budget");
        assert_eq!(cache.get(a, &pointer(0, 0)), None);
        assert_eq!(cache.get(b, &pointer(0, 0)).map(|x| x[0]), Some(2));
        assert_eq!(cache.get(a, &pointer(0, 104)).map(|x| x[0]), Some(3));
        assert_eq!(cache.get(a, &pointer(1, 104)), None, "another segment");
        cache.insert(a, 0, 300, bytes::Bytes::from(vec![4; 300]));
        assert_eq!(
            cache.bytes(),
            200,
            "a batch over the whole budget is not kept"
        );
        cache.forget(a);
        assert_eq!(cache.get(a, &pointer(0, 104)), None);
        assert_eq!(cache.bytes(), 100, "the other partition's batch stays");
    }

    #[test]
    fn without_o_direct_the_same_frames_go_through_the_page_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = SegmentWriter::create(dir.path(), 0, false).expect("create");
        assert!(!w.is_direct());
        let b = sealed(0, 5, 333);
        w.append(&b).expect("append");
        w.write().expect("write");
        w.append(&sealed(5, 1, 4000)).expect("append");
        w.write().expect("write");
        w.sync().expect("sync");
        let (frames, end, how) = scan(&dir.path().join(file_name(0)), 0).expect("scan");
        assert_eq!((how, end, frames.len()), (ScanEnd::Clean, w.len(), 2));
        assert_eq!(frames[0].batch, b);
    }
}
