//! The writer's side of the segment store (`docs/record-store.md`): appending each sealed
//! batch as a frame of its partition's segment, writing and syncing the round's segments
//! before the pointers are committed, and deleting segment files that truncation or
//! retention emptied (retention keeps one per partition as a spare, written over as the
//! partition's next segment).

use std::collections::hash_map::Entry;

use super::{Pointer, RecordStore, Round, SegmentWriter, Writer, segment};
use crate::log::{Error, Partition};

/// Segments are written with `O_DIRECT` (around the page cache; `SegmentWriter` falls
/// back to the page cache where the file system refuses it).
const WRITE_DIRECT: bool = true;

/// The smallest segment size a topic's limits shrink segments to (bytes).
const MIN_SEGMENT: u64 = 1024 * 1024;

impl Writer {
    /// What the `records` keyspace keeps for `batch`, sealed at `base`: the batch itself,
    /// or with the segment store and a batch of `LogOptions::segment_min_batch_bytes` or
    /// more a pointer to the frame it is appended as (written at the round's commit). A
    /// batch whose segment cannot be opened is kept whole, with an error logged; reads
    /// take either.
    pub(super) fn stored_value(
        &self,
        round: &mut Round,
        partition: &Partition,
        base: u64,
        batch: Vec<u8>,
    ) -> Vec<u8> {
        if self.options.record_store != RecordStore::Segments
            || (batch.len() as u64) < self.options.segment_min_batch_bytes
        {
            return batch;
        }
        let mut writers = self.segment_writers.borrow_mut();
        let writer = match self.segment_writer(&mut writers, partition, base, &mut round.retired) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(topic = %partition.topic, partition = partition.index, error = %e, "cannot append to the partition's segment; the batch is stored in the database instead");
                return batch;
            }
        };
        let Some(pointer) = writer
            .append(&batch)
            .ok()
            .and_then(|position| Pointer::new(writer.base_offset(), position, &batch))
        else {
            return batch;
        };
        if !round.segments.contains(&partition.prefix) {
            round.segments.push(partition.prefix);
        }
        // Readers find it through the pointer, which commits after this.
        self.shared.segments.remember(
            partition.prefix,
            pointer.segment,
            pointer.position,
            batch.into(),
        );
        pointer.encode().to_vec()
    }

    /// The segment `partition` appends to, opened on first use: after the frame of its
    /// last stored batch if that is in a segment (what follows it there was never
    /// committed and is cut off), else a new segment named `base`. A segment past
    /// `LogOptions::segment_bytes` is closed and a new one named `base` started; the closed
    /// one goes to `retired`, to be written and synced with the round (it may hold frames
    /// the round appended before).
    fn segment_writer<'a>(
        &self,
        writers: &'a mut std::collections::HashMap<[u8; 8], SegmentWriter>,
        partition: &Partition,
        base: u64,
        retired: &mut Vec<SegmentWriter>,
    ) -> Result<&'a mut SegmentWriter, Error> {
        let full = writers
            .get(&partition.prefix)
            .is_some_and(|w| w.len() >= MIN_SEGMENT && w.len() >= self.segment_limit(partition));
        if full && let Some(closed) = writers.remove(&partition.prefix) {
            retired.push(closed);
        }
        match writers.entry(partition.prefix) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => Ok(v.insert(self.open_segment(partition, base, !full)?)),
        }
    }

    /// The size at which `partition`'s segment is closed: `LogOptions::segment_bytes`, or
    /// a quarter of the partition's share of its topic's `max_bytes` when that is smaller
    /// (at least [`MIN_SEGMENT`]), so that retention, which deletes whole segments, keeps
    /// the data directory near the limit (Kafka leaves this to `segment.bytes`).
    fn segment_limit(&self, partition: &Partition) -> u64 {
        let config = self
            .shared
            .topics
            .read()
            .get(&partition.topic)
            .map(|t| t.config());
        let most = self.options.segment_bytes.max(MIN_SEGMENT);
        config.filter(|c| c.max_bytes > 0).map_or(most, |c| {
            (c.max_bytes.div_ceil(u64::from(c.partitions.max(1))) / 4).clamp(MIN_SEGMENT, most)
        })
    }

    fn open_segment(
        &self,
        partition: &Partition,
        base: u64,
        resume: bool,
    ) -> Result<SegmentWriter, Error> {
        let segments = &self.shared.segments;
        let dir = segments.partition_dir(partition.prefix);
        let failed = |action, path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| Error::Segment {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir).map_err(failed("creating", &dir))?;
        let last = resume
            .then(|| self.shared.records.prefix(partition.prefix).next_back())
            .flatten()
            .and_then(|guard| guard.into_inner().ok())
            .and_then(|(_, value)| Pointer::decode(&value));
        if let Some(pointer) = last {
            match SegmentWriter::open(&dir, pointer.segment, pointer.end(), WRITE_DIRECT) {
                Ok(writer) => return Ok(writer),
                Err(error) => {
                    tracing::error!(topic = %partition.topic, partition = partition.index, segment = pointer.segment, %error, "cannot continue the partition's last segment; starting a new one");
                }
            }
        }
        let path = dir.join(segment::file_name(base));
        SegmentWriter::create(&dir, base, WRITE_DIRECT).map_err(failed("creating", &path))
    }

    /// Writes the segments of `prefixes` (each partition's frames of the round) and the
    /// segments the round closed (`retired`) and, with `fsync`, syncs them, all at once. A
    /// closed segment is synced whatever `fsync` says: no later `Sync` reaches it. Errors
    /// stop the writer as a failed commit does.
    pub(super) fn write_segments(
        &self,
        prefixes: &[[u8; 8]],
        mut retired: Vec<SegmentWriter>,
        fsync: bool,
    ) -> Result<(), Error> {
        if prefixes.is_empty() && retired.is_empty() {
            return Ok(());
        }
        let mut writers = self.segment_writers.borrow_mut();
        let mut touched: Vec<&mut SegmentWriter> = writers
            .iter_mut()
            .filter(|(prefix, _)| prefixes.contains(prefix))
            .map(|(_, w)| w)
            .collect();
        let failed = |action, w: &SegmentWriter| {
            let path = w.path().to_path_buf();
            move |source| Error::Segment {
                action,
                path,
                source,
            }
        };
        for w in touched
            .iter_mut()
            .map(|w| &mut **w)
            .chain(retired.iter_mut())
        {
            w.write().map_err(failed("writing", w))?;
        }
        if !fsync {
            touched.clear();
        }
        touched.extend(retired.iter_mut());
        if let [only] = touched.as_slice() {
            return only.sync().map_err(failed("syncing", only));
        }
        std::thread::scope(|s| {
            let syncs: Vec<_> = touched
                .iter()
                .map(|w| {
                    let w: &SegmentWriter = w;
                    (w, s.spawn(move || w.sync()))
                })
                .collect();
            for (w, sync) in syncs {
                let result = sync.join().unwrap_or_else(|_| {
                    Err(std::io::Error::other("the thread syncing it panicked"))
                });
                result.map_err(failed("syncing", w))?;
            }
            Ok(())
        })
    }

    /// Syncs every open segment: what rounds of `Buffered` topics wrote without a sync.
    pub(super) fn sync_all_segments(&self) -> Result<(), Error> {
        for w in self.segment_writers.borrow().values() {
            w.sync().map_err(|source| Error::Segment {
                action: "syncing",
                path: w.path().to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    /// After a truncation of `partition` from offset `from` on: its segment writer is
    /// closed and every segment named `from` or later deleted (they hold only frames
    /// from `from` on); the next append continues after the last remaining pointer.
    pub(super) fn truncate_segments(&self, partition: &Partition, from: u64) {
        self.segment_writers.borrow_mut().remove(&partition.prefix);
        let segments = &self.shared.segments;
        let dir = segments.partition_dir(partition.prefix);
        match segment::list(&dir) {
            Ok(bases) => {
                for base in bases.into_iter().filter(|b| *b >= from) {
                    remove_segment(&dir.join(segment::file_name(base)));
                }
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot list segments to delete");
            }
        }
        segments.forget(partition.prefix);
    }

    /// After retention cut `partition`'s head at the batch starting at `head`: deletes
    /// every segment whose successor starts at or below `head` (all its frames are
    /// below the head). The newest segment is never deleted. The first one deleted becomes
    /// the partition's spare ([`segment::SPARE_NAME`]) unless it has one: its next segment
    /// is written over it.
    pub(super) fn delete_segments_below(&self, partition: &Partition, head: u64) {
        let segments = &self.shared.segments;
        let dir = segments.partition_dir(partition.prefix);
        let bases = match segment::list(&dir) {
            Ok(bases) => bases,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot list segments to delete");
                return;
            }
        };
        let mut deleted = false;
        let spare = dir.join(segment::SPARE_NAME);
        for pair in bases.windows(2) {
            if pair[1] <= head {
                let path = dir.join(segment::file_name(pair[0]));
                if !spare.exists()
                    && let Err(error) = std::fs::rename(&path, &spare)
                {
                    tracing::warn!(path = %path.display(), %error, "cannot keep a deleted segment as the partition's spare");
                }
                remove_segment(&path);
                deleted = true;
            }
        }
        if deleted {
            segments.forget_files(partition.prefix);
        }
    }

    /// After a topic's deletion: the partition's segments and their directory.
    pub(super) fn remove_partition_segments(&self, partition: &Partition) {
        self.segment_writers.borrow_mut().remove(&partition.prefix);
        let segments = &self.shared.segments;
        let dir = segments.partition_dir(partition.prefix);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot delete a deleted topic's segments");
            }
        }
        segments.forget(partition.prefix);
    }
}

/// Deletes one segment file; a failure is logged (the file only takes space).
fn remove_segment(path: &std::path::Path) {
    if let Err(error) = std::fs::remove_file(path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "cannot delete a segment");
    }
}
