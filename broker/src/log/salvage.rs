//! Salvage: when fjall refuses to open the data directory because a file of the records
//! keyspace is damaged or gone, that file is moved aside and the keyspace opened without
//! it, so that one bad file costs the records it held, not the whole broker.
//!
//! fjall opens all or nothing: at open it reads every table's metadata and checks that every
//! blob file the current version lists exists, and one failure fails the whole database
//! (`docs/storage-integrity.md`, measured). RocksDB's `RepairDB` and LevelDB's `RepairDB`
//! answer the same problem by rebuilding the manifest from the files that are intact; this
//! does the same for the one tree where Weir can afford it:
//!
//! - Only key-value-separated trees are salvaged (the records keyspace: keys and blob
//!   pointers in tables, record batches in blob files). The `meta` keyspace holds topics,
//!   counters and group state of every partition; losing a file of it is not contained, and
//!   the broker keeps refusing to start with the storage engine's error.
//! - A table is damaged when it is missing or its bytes no longer match the whole-file
//!   XXH3-128 checksum the version stores for it. A blob file is damaged when it is missing
//!   or its trailer cannot be read. Tables that point into a damaged blob file are dropped
//!   with it (a pointer to a missing blob file is a panic in the storage engine).
//! - Damaged and dropped files are moved to `quarantine/<keyspace id>/` in the data
//!   directory, never deleted; a new version without them is written (`v<id+1>`, fsynced)
//!   and `current` is switched to it atomically. The records whose keys were in dropped
//!   tables are then missing: the broker's recovery and reads report them as DATA_LOSS with
//!   their offsets ([`super::Error::Missing`]), and their offsets are never given out again.
//!
//! The version file layout (an `sfa` archive with the sections `tables`, `blob_files`, …)
//! is lsm-tree 3's; the test `a_damaged_table_file_is_salvaged` (and the corruption tests)
//! fail if an upgrade changes it.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use byteorder::{LittleEndian, ReadBytesExt, WriteBytesExt};

/// What salvage moved aside.
#[derive(Debug, Default, Clone)]
pub struct SalvageReport {
    /// Files moved to quarantine: (keyspace directory, file, why).
    pub quarantined: Vec<(PathBuf, String)>,
}

impl SalvageReport {
    /// Whether nothing was found damaged (salvage cannot help).
    pub fn is_empty(&self) -> bool {
        self.quarantined.is_empty()
    }
}

/// Errors of salvage: I/O on the data directory, or a version file it cannot read.
#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    /// Reading or writing a file failed.
    #[error("salvaging {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A version file (the storage engine's list of files) cannot be read.
    #[error("salvaging {}: the storage engine's version file cannot be read: {detail}", path.display())]
    Version {
        /// The version file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SalvageError + '_ {
    move |source| SalvageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One table as the version lists it.
#[derive(Debug, Clone)]
struct TableEntry {
    id: u64,
    checksum: u128,
    global_seqno: u64,
}

/// The parts of a version file that salvage changes; the other sections are copied.
#[derive(Debug)]
struct Version {
    id: u64,
    /// Levels → runs → tables.
    levels: Vec<Vec<Vec<TableEntry>>>,
    /// (blob file id, checksum).
    blob_files: Vec<(u64, u128)>,
    /// Every section, in file order, as (name, bytes).
    sections: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Looks at every key-value-separated tree under `dir/keyspaces` and moves damaged files
/// aside (see the module documentation). Called only after fjall refused to open `dir`.
///
/// # Errors
///
/// I/O errors on the data directory, or a version file that cannot be read.
pub fn salvage(dir: &Path) -> Result<SalvageReport, SalvageError> {
    let mut report = SalvageReport::default();
    let keyspaces = dir.join("keyspaces");
    let entries = match std::fs::read_dir(&keyspaces) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(io(&keyspaces)(e)),
    };
    let mut trees: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("blobs").is_dir())
        .collect();
    trees.sort();
    for tree in trees {
        salvage_tree(dir, &tree, &mut report)?;
    }
    Ok(report)
}

fn salvage_tree(dir: &Path, tree: &Path, report: &mut SalvageReport) -> Result<(), SalvageError> {
    let version = read_version(tree)?;
    let mut damaged_blobs = Vec::new();
    for &(id, _) in &version.blob_files {
        let path = tree.join("blobs").join(id.to_string());
        if let Some(why) = blob_damage(&path) {
            damaged_blobs.push((id, why));
        }
    }
    let mut dropped_tables = Vec::new();
    for table in version.levels.iter().flatten().flatten() {
        let path = tree.join("tables").join(table.id.to_string());
        if let Some(why) = table_damage(&path, table.checksum, &damaged_blobs) {
            dropped_tables.push((table.id, why));
        }
    }
    if damaged_blobs.is_empty() && dropped_tables.is_empty() {
        return Ok(());
    }
    let keyspace = tree
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let quarantine = dir.join("quarantine").join(&keyspace);
    for (kind, list) in [("tables", &dropped_tables), ("blobs", &damaged_blobs)] {
        let to = quarantine.join(kind);
        std::fs::create_dir_all(&to).map_err(io(&to))?;
        for (id, why) in list {
            let from = tree.join(kind).join(id.to_string());
            if from.exists() {
                let target = to.join(id.to_string());
                std::fs::rename(&from, &target).map_err(io(&from))?;
            }
            tracing::error!(keyspace = %keyspace, file = %from.display(), reason = %why, quarantine = %to.display(), "storage file moved to quarantine; the records it held are reported as missing");
            report
                .quarantined
                .push((from, format!("{kind} file {id}: {why}")));
        }
    }
    let tables: Vec<u64> = dropped_tables.iter().map(|(id, _)| *id).collect();
    let blobs: Vec<u64> = damaged_blobs.iter().map(|(id, _)| *id).collect();
    write_version(tree, &version, &tables, &blobs)
}

/// Why a blob file cannot be opened, if it cannot: missing, or its trailer (table of
/// contents and metadata) unreadable. Damage inside its data is left to reads, which answer
/// DATA_LOSS for the batches it hits.
fn blob_damage(path: &Path) -> Option<String> {
    if !path.exists() {
        return Some("missing".into());
    }
    let reader = match sfa::Reader::new(path) {
        Ok(r) => r,
        Err(e) => return Some(format!("unreadable trailer: {e:?}")),
    };
    match reader.toc().section(b"meta") {
        Some(meta) => match read_section(path, meta) {
            Ok(_) => None,
            Err(e) => Some(format!("unreadable metadata: {e}")),
        },
        None => Some("no metadata section".into()),
    }
}

/// Why a table must be dropped, if it must: missing, its whole-file checksum differs from
/// the version's, or it points into a damaged blob file.
fn table_damage(path: &Path, checksum: u128, damaged_blobs: &[(u64, String)]) -> Option<String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some("missing".into()),
        Err(e) => return Some(format!("unreadable: {e}")),
    };
    if xxhash_rust::xxh3::xxh3_128(&bytes) != checksum {
        return Some("checksum mismatch".into());
    }
    if damaged_blobs.is_empty() {
        return None;
    }
    let linked = linked_blob_files(path).ok()?;
    linked
        .iter()
        .find(|id| damaged_blobs.iter().any(|(d, _)| d == *id))
        .map(|id| format!("points into damaged blob file {id}"))
}

/// The blob files a table points into (its `linked_blob_files` section: a u32 count, then
/// per file its id, item count, bytes and bytes on disk, each u64, little-endian).
fn linked_blob_files(path: &Path) -> std::io::Result<Vec<u64>> {
    let reader = sfa::Reader::new(path).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let Some(section) = reader.toc().section(b"linked_blob_files") else {
        return Ok(Vec::new());
    };
    let bytes = read_section(path, section)?;
    let mut r = bytes.as_slice();
    let n = r.read_u32::<LittleEndian>()?;
    let mut out = Vec::with_capacity(n.min(1 << 16) as usize);
    for _ in 0..n {
        out.push(r.read_u64::<LittleEndian>()?);
        for _ in 0..3 {
            r.read_u64::<LittleEndian>()?;
        }
    }
    Ok(out)
}

fn read_section(path: &Path, entry: &sfa::TocEntry) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(usize::try_from(entry.len()).unwrap_or(0));
    entry.reader(path)?.read_to_end(&mut out)?;
    Ok(out)
}

fn read_version(tree: &Path) -> Result<Version, SalvageError> {
    let current = tree.join("current");
    let mut f = std::fs::File::open(&current).map_err(io(&current))?;
    let id = f.read_u64::<LittleEndian>().map_err(io(&current))?;
    let path = tree.join(format!("v{id}"));
    let bad = |detail: String| SalvageError::Version {
        path: path.clone(),
        detail,
    };
    let reader = sfa::Reader::new(&path).map_err(|e| bad(format!("{e:?}")))?;
    let mut sections = Vec::new();
    for entry in reader.toc().iter() {
        let bytes = read_section(&path, entry).map_err(io(&path))?;
        sections.push((entry.name().to_vec(), bytes));
    }
    let section = |name: &[u8]| {
        sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
            .ok_or_else(|| bad(format!("no {} section", String::from_utf8_lossy(name))))
    };
    let levels = parse_tables(section(b"tables")?).map_err(|e| bad(format!("tables: {e}")))?;
    let blob_files =
        parse_blob_files(section(b"blob_files")?).map_err(|e| bad(format!("blob_files: {e}")))?;
    Ok(Version {
        id,
        levels,
        blob_files,
        sections,
    })
}

fn parse_tables(mut r: &[u8]) -> std::io::Result<Vec<Vec<Vec<TableEntry>>>> {
    let level_count = r.read_u8()?;
    let mut levels = Vec::with_capacity(level_count.into());
    for _ in 0..level_count {
        let runs = r.read_u8()?;
        let mut level = Vec::with_capacity(runs.into());
        for _ in 0..runs {
            let n = r.read_u32::<LittleEndian>()?;
            let mut run = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                let id = r.read_u64::<LittleEndian>()?;
                let checksum = read_checksum(&mut r)?;
                let global_seqno = r.read_u64::<LittleEndian>()?;
                run.push(TableEntry {
                    id,
                    checksum,
                    global_seqno,
                });
            }
            level.push(run);
        }
        levels.push(level);
    }
    Ok(levels)
}

/// A checksum as the version file stores it: its type (0, XXH3) then 128 bits.
fn read_checksum(r: &mut &[u8]) -> std::io::Result<u128> {
    let kind = r.read_u8()?;
    if kind != 0 {
        return Err(std::io::Error::other(format!(
            "checksum type {kind}, expected 0 (XXH3)"
        )));
    }
    r.read_u128::<LittleEndian>()
}

fn parse_blob_files(mut r: &[u8]) -> std::io::Result<Vec<(u64, u128)>> {
    let n = r.read_u32::<LittleEndian>()?;
    let mut out = Vec::with_capacity(n.min(1 << 16) as usize);
    for _ in 0..n {
        let id = r.read_u64::<LittleEndian>()?;
        out.push((id, read_checksum(&mut r)?));
    }
    Ok(out)
}

fn encode_tables(levels: &[Vec<Vec<TableEntry>>], drop: &[u64]) -> std::io::Result<Vec<u8>> {
    let mut w = Vec::new();
    w.write_u8(u8::try_from(levels.len()).map_err(std::io::Error::other)?)?;
    for level in levels {
        let runs: Vec<Vec<&TableEntry>> = level
            .iter()
            .map(|run| run.iter().filter(|t| !drop.contains(&t.id)).collect())
            .filter(|run: &Vec<&TableEntry>| !run.is_empty())
            .collect();
        w.write_u8(u8::try_from(runs.len()).map_err(std::io::Error::other)?)?;
        for run in runs {
            w.write_u32::<LittleEndian>(u32::try_from(run.len()).map_err(std::io::Error::other)?)?;
            for t in run {
                w.write_u64::<LittleEndian>(t.id)?;
                w.write_u8(0)?;
                w.write_u128::<LittleEndian>(t.checksum)?;
                w.write_u64::<LittleEndian>(t.global_seqno)?;
            }
        }
    }
    Ok(w)
}

fn encode_blob_files(blob_files: &[(u64, u128)], drop: &[u64]) -> std::io::Result<Vec<u8>> {
    let kept: Vec<_> = blob_files
        .iter()
        .filter(|(id, _)| !drop.contains(id))
        .collect();
    let mut w = Vec::new();
    w.write_u32::<LittleEndian>(u32::try_from(kept.len()).map_err(std::io::Error::other)?)?;
    for (id, checksum) in kept {
        w.write_u64::<LittleEndian>(*id)?;
        w.write_u8(0)?;
        w.write_u128::<LittleEndian>(*checksum)?;
    }
    Ok(w)
}

/// Writes `v<id+1>` without the dropped files (fsynced with its directory), then points
/// `current` at it (id, XXH3-128 of the file, checksum type 0), atomically.
fn write_version(
    tree: &Path,
    version: &Version,
    drop_tables: &[u64],
    drop_blobs: &[u64],
) -> Result<(), SalvageError> {
    let id = version.id + 1;
    let path = tree.join(format!("v{id}"));
    let tables = encode_tables(&version.levels, drop_tables).map_err(io(&path))?;
    let blobs = encode_blob_files(&version.blob_files, drop_blobs).map_err(io(&path))?;
    let mut archive = std::io::Cursor::new(Vec::new());
    {
        let mut w = sfa::Writer::from_writer(&mut archive);
        for (name, bytes) in &version.sections {
            let bytes = match name.as_slice() {
                b"tables" => &tables,
                b"blob_files" => &blobs,
                _ => bytes,
            };
            w.start(name.clone()).map_err(io(&path))?;
            w.write_all(bytes).map_err(io(&path))?;
        }
        w.finish().map_err(|e| SalvageError::Version {
            path: path.clone(),
            detail: format!("{e:?}"),
        })?;
    }
    let bytes = archive.into_inner();
    let checksum = xxhash_rust::xxh3::xxh3_128(&bytes);
    write_synced(&path, &bytes)?;
    let mut current = Vec::with_capacity(25);
    current.write_u64::<LittleEndian>(id).map_err(io(&path))?;
    current
        .write_u128::<LittleEndian>(checksum)
        .map_err(io(&path))?;
    current.write_u8(0).map_err(io(&path))?;
    let tmp = tree.join("current.salvage");
    write_synced(&tmp, &current)?;
    let target = tree.join("current");
    std::fs::rename(&tmp, &target).map_err(io(&target))?;
    std::fs::File::open(tree)
        .and_then(|d| d.sync_all())
        .map_err(io(tree))?;
    tracing::warn!(tree = %tree.display(), version = id, tables_dropped = drop_tables.len(), blob_files_dropped = drop_blobs.len(), "storage version rewritten without the quarantined files");
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SalvageError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}
