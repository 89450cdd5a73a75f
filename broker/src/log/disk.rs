//! Free disk space: produce requests are refused while the file system holding the data
//! directory has less than `--min-free-disk` available, before the storage engine runs out
//! of space (a failed write poisons fjall and takes the broker down). Reads, acks and
//! deletions go on, and produce resumes by itself once space is freed.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use super::Error;

/// How long a measurement of free space is reused (a `statvfs` call per append would be
/// wasted work; 50 ms of appends fit in the reserve).
const RECHECK: Duration = Duration::from_millis(50);

/// Free space of the data directory's file system, measured at most every [`RECHECK`].
#[derive(Debug)]
pub(crate) struct DiskSpace {
    dir: PathBuf,
    /// Refuse appends below this many available bytes; 0 never refuses.
    min_free: u64,
    /// Available bytes at the last measurement (`u64::MAX` before the first).
    free: AtomicU64,
    checked: parking_lot::Mutex<Option<Instant>>,
}

impl DiskSpace {
    pub fn new(dir: &Path, min_free: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            min_free,
            free: AtomicU64::new(u64::MAX),
            checked: parking_lot::Mutex::new(None),
        }
    }

    /// Available bytes at the last measurement.
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// Whether the last measurement was below the minimum.
    pub fn is_full(&self) -> bool {
        self.min_free != 0 && self.free() < self.min_free
    }

    /// Measures again when the last measurement is older than [`RECHECK`], then returns
    /// [`Error::DiskFull`] when below the minimum. A failed measurement is logged and
    /// lets the append through (the storage engine's own error stays the last line).
    pub fn check(&self) -> Result<(), Error> {
        if self.min_free == 0 {
            return Ok(());
        }
        let mut checked = self.checked.lock();
        if checked.is_none_or(|at| at.elapsed() >= RECHECK) {
            *checked = Some(Instant::now());
            match rustix::fs::statvfs(&self.dir) {
                Ok(s) => self
                    .free
                    .store(s.f_bavail.saturating_mul(s.f_frsize), Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "measuring free disk space failed");
                    return Ok(());
                }
            }
        }
        drop(checked);
        if self.is_full() {
            return Err(Error::DiskFull {
                free: self.free(),
                min_free: self.min_free,
            });
        }
        Ok(())
    }
}
