//! Measures what a record store that is its own journal would save against the log engine
//! as it is, under the same sustained, fsync'd load and without gRPC in the way.
//!
//! `cargo run --release -p weir-broker --example record_store -- PATH DIR [SIZE] [SECONDS]`
//!
//! The load: 32 produce requests in flight (4 producers × 8, as `weir bench produce`), each
//! of 1,000 records of `SIZE` bytes (default 1,000) cut one after another from a 16 MiB
//! pool of random bytes (incompressible), spread over 4 partitions, for `SECONDS` (default
//! 30). `PATH` is what stores them, in a fresh directory `DIR`:
//!
//! - `log`: the log engine (`Log`, default options): the segment store, each batch (of 64
//!   KiB or more) appended once to its partition's segment, fsynced before the round's
//!   pointers are committed to fjall (`docs/record-store.md`).
//! - `fjall`: the log engine with `RecordStore::Fjall`: the writer commits each round into
//!   fjall's journal with one `fdatasync`; the flush worker writes the records again into
//!   blob files (key-value separation).
//! - `segment`: the write-once prototype. The writer appends the round's sealed batches to
//!   a segment file (rolled at 1 GiB) and `fdatasync`s it while, on a second thread, the
//!   round's index entries (record key → segment, position, length: 20 bytes) and partition
//!   counters are committed to fjall with `SyncData`; requests are answered when both are
//!   durable. Recovery, retention and reads are not built: this is the write path only.
//! - `file`: the round appended to a file and `fdatasync`ed, nothing else: what the disk
//!   allows this access pattern.
//!
//! Prints one JSON object: `path`, `size`, `seconds`, `messages`, `mbps` (payload MB/s,
//! 10^6 bytes), `disk_per_payload` (bytes the process wrote to the block device per payload
//! byte, `write_bytes` of `/proc/self/io`, over the run), `commits` (rounds), `rss_peak_mib`
//! (`VmHWM`).

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use weir_broker::{
    log::{Log, LogOptions, Record, RecordStore, TopicConfig, batch},
    produce,
};

const IN_FLIGHT: usize = 32;
const RECORDS: usize = 1000;
const POOL_BYTES: usize = 16 * 1024 * 1024;
/// The log engine's `max_commit_bytes` default: a round takes at most this much.
const ROUND_BYTES: usize = 64 * 1024 * 1024;
const SEGMENT_BYTES: u64 = 1 << 30;
const BLOCK: usize = 4096;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: record_store log|fjall|file|segment|direct|partitioned DIR [SIZE] [SECONDS] [PARTITIONS]";
    let path = args.next().ok_or(usage)?;
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let size: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let seconds: u64 = args.next().map_or(Ok(30), |s| s.parse())?;
    let partitions: u32 = args.next().map_or(Ok(4), |s| s.parse())?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let written_before = proc_field("/proc/self/io", "write_bytes:")?;
    let started = Instant::now();
    let (messages, commits, times) = runtime.block_on(async {
        match path.as_str() {
            "log" => run_log(&dir, size, seconds, partitions, RecordStore::Segments).await,
            "fjall" => run_log(&dir, size, seconds, partitions, RecordStore::Fjall).await,
            "file" | "segment" | "direct" | "partitioned" => {
                run_prototype(&dir, size, seconds, partitions, &path).await
            }
            other => Err(format!("unknown path {other:?}; {usage}").into()),
        }
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let written = proc_field("/proc/self/io", "write_bytes:")? - written_before;
    let payload = messages as f64 * size as f64;
    println!(
        "{}",
        serde_json::json!({
            "path": path,
            "size": size,
            "seconds": (elapsed * 10.0).round() / 10.0,
            "messages": messages,
            "mbps": (payload / elapsed / 1e5).round() / 10.0,
            "disk_per_payload": (written as f64 / payload * 100.0).round() / 100.0,
            "commits": commits,
            "rss_peak_mib": proc_field("/proc/self/status", "VmHWM:")? / 1024,
            "writer_seconds": times.map(|t| serde_json::json!({
                "wait": round2(t.wait), "copy": round2(t.copy),
                "write": round2(t.write), "sync": round2(t.sync),
            })),
        })
    );
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The first number after `field` in the file at `path` (`/proc` files).
fn proc_field(path: &str, field: &str) -> Result<u64, Error> {
    let text = std::fs::read_to_string(path)?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| format!("{path} has no {field}"))?;
    let number = line[field.len()..]
        .split_whitespace()
        .next()
        .ok_or_else(|| format!("{path}: {field} has no value"))?;
    Ok(number.parse()?)
}

/// 16 MiB of xorshift bytes: incompressible for LZ4.
fn pool() -> Bytes {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut out = Vec::with_capacity(POOL_BYTES);
    while out.len() < POOL_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    Bytes::from(out)
}

/// The records of one request: `RECORDS` values of `size` bytes cut one after another
/// from `pool`, starting at request number `n`'s place in it.
fn request(pool: &Bytes, size: usize, n: u64) -> Vec<Record> {
    let per_pool = (pool.len() / size) as u64;
    (0..RECORDS as u64)
        .map(|i| {
            let at = ((n * RECORDS as u64 + i) % per_pool) as usize * size;
            Record {
                value: pool.slice(at..at + size),
                ..Record::default()
            }
        })
        .collect()
}

/// Runs `IN_FLIGHT` tasks, each sending requests through `send` until `seconds` passed;
/// returns the records acknowledged.
async fn load<F, Fut>(size: usize, seconds: u64, partitions: u32, send: F) -> Result<u64, Error>
where
    F: Fn(u32, Vec<Record>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    let pool = pool();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let requests = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (pool, requests, send) = (pool.clone(), Arc::clone(&requests), send.clone());
            tokio::spawn(async move {
                let mut acked = 0u64;
                while Instant::now() < deadline {
                    let n = requests.fetch_add(1, Ordering::Relaxed);
                    let partition = u32::try_from(n % u64::from(partitions))?;
                    send(partition, request(&pool, size, n)).await?;
                    acked += RECORDS as u64;
                }
                Ok::<u64, Error>(acked)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

async fn run_log(
    dir: &Path,
    size: usize,
    seconds: u64,
    partitions: u32,
    record_store: RecordStore,
) -> Result<(u64, u64, Option<Times>), Error> {
    let options = LogOptions {
        record_store,
        ..LogOptions::default()
    };
    let log = Arc::new(Log::open(dir, &options)?);
    log.create_topic("t", TopicConfig::new(partitions, 0)?)
        .await?;
    let commits = log.writer_stats().commits.load(Ordering::Relaxed);
    let sender = Arc::clone(&log);
    let messages = load(size, seconds, partitions, move |partition, records| {
        let log = Arc::clone(&sender);
        async move {
            produce::produce(&log, "t", Some(partition), records).await?;
            Ok(())
        }
    })
    .await?;
    Ok((
        messages,
        log.writer_stats().commits.load(Ordering::Relaxed) - commits,
        None,
    ))
}

/// A request for the prototype's writer: partition, encoded batch, records, reply.
type Append = (u32, Vec<u8>, u32, tokio::sync::oneshot::Sender<()>);

async fn run_prototype(
    dir: &Path,
    size: usize,
    seconds: u64,
    partitions: u32,
    path: &str,
) -> Result<(u64, u64, Option<Times>), Error> {
    let mode = Mode {
        index: path != "file",
        direct: path == "direct" || path == "partitioned",
        partitioned: path == "partitioned",
    };
    let (tx, rx) = mpsc::sync_channel::<Append>(IN_FLIGHT);
    let dir = dir.to_path_buf();
    let writer = std::thread::spawn(move || prototype_writer(&dir, &rx, partitions, mode));
    let messages = load(size, seconds, partitions, move |partition, records| {
        let tx = tx.clone();
        async move {
            // Encoded by the caller's task, as `produce::submit` does for the log engine.
            let batch = batch::encode(&records, 0);
            let (reply, answered) = tokio::sync::oneshot::channel();
            let count = u32::try_from(records.len())?;
            tokio::task::block_in_place(|| tx.send((partition, batch, count, reply)))?;
            answered.await?;
            Ok(())
        }
    })
    .await?;
    let (commits, times) = writer.join().map_err(|_| "the writer panicked")??;
    Ok((messages, commits, Some(times)))
}

/// Where the prototype writer's time went, in seconds.
#[derive(Debug, Default, Clone, Copy)]
struct Times {
    /// Waiting for the first request of a round.
    wait: f64,
    /// Sealing the round's batches and copying them into the write buffer.
    copy: f64,
    /// `write` of the round to the segment.
    write: f64,
    /// `fdatasync` of the segment (and, in parallel, the index commit).
    sync: f64,
}

/// The requests of the next round: the first to come, then what is queued, up to
/// `ROUND_BYTES`; `None` once every sender is gone.
fn next_round(rx: &mpsc::Receiver<Append>) -> Option<Vec<Append>> {
    let mut queue = vec![rx.recv().ok()?];
    let mut bytes = queue[0].1.len();
    while bytes < ROUND_BYTES {
        let Ok(request) = rx.try_recv() else { break };
        bytes += request.1.len();
        queue.push(request);
    }
    Some(queue)
}

/// `fdatasync` of every segment the round wrote, all at once, and (with `index`) the
/// commit of the round's fjall batch alongside.
fn make_durable(
    segments: &[Segment],
    writes: &[(usize, std::ops::Range<usize>)],
    wb: fjall::OwnedWriteBatch,
    index: bool,
) -> Result<(), Error> {
    let wb = wb.durability(Some(fjall::PersistMode::SyncData));
    std::thread::scope(|s| {
        let committed = index.then(|| s.spawn(|| wb.commit()));
        let synced: Vec<_> = writes
            .iter()
            .map(|(f, _)| {
                let file = &segments[*f].file;
                s.spawn(move || file.sync_data())
            })
            .collect();
        for sync in synced {
            sync.join().map_err(|_| "an fdatasync panicked")??;
        }
        if let Some(committed) = committed {
            committed
                .join()
                .map_err(|_| "the index commit panicked")??;
        }
        Ok(())
    })
}

fn lap(total: &mut f64, since: &mut Instant) {
    let now = Instant::now();
    *total += now.duration_since(*since).as_secs_f64();
    *since = now;
}

/// What a prototype run writes: the index too (`segment`, `direct`, `partitioned`),
/// with `O_DIRECT` (`direct`, `partitioned`), one segment per partition (`partitioned`).
#[derive(Debug, Clone, Copy)]
struct Mode {
    index: bool,
    direct: bool,
    partitioned: bool,
}

/// A segment being appended: its file, its number and the next write's position.
struct Segment {
    file: File,
    id: u64,
    position: u64,
}

impl Segment {
    fn open(dir: &Path, name: &str, id: u64, direct: bool) -> Result<Self, Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = std::fs::OpenOptions::new();
        options.create(true).write(true).truncate(true);
        if direct {
            options.custom_flags(i32::try_from(rustix::fs::OFlags::DIRECT.bits())?);
        }
        let file = options.open(dir.join(format!("{name}-{id:020}.log")))?;
        Ok(Self {
            file,
            id,
            position: 0,
        })
    }
}

/// The prototype's writer thread: rounds of what is queued (up to `ROUND_BYTES`), each
/// sealed at its partition's next offset, copied once into a 4 KiB-aligned buffer,
/// appended to the segment (or each partition's) and made durable; returns the rounds and
/// where the time went.
fn prototype_writer(
    dir: &Path,
    rx: &mpsc::Receiver<Append>,
    partitions: u32,
    mode: Mode,
) -> Result<(u64, Times), Error> {
    let db = fjall::Database::builder(dir.join("index"))
        .journal_compression(fjall::CompressionType::None)
        .open()?;
    let records = db.keyspace("records", fjall::KeyspaceCreateOptions::default)?;
    let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default)?;
    let mut next = vec![0u64; partitions as usize];
    let files = if mode.partitioned { partitions } else { 1 };
    let mut segments = (0..files)
        .map(|f| Segment::open(dir, &f.to_string(), 0, mode.direct))
        .collect::<Result<Vec<_>, _>>()?;
    // O_DIRECT writes whole 4 KiB blocks from 4 KiB-aligned memory; a round is at most
    // `ROUND_BYTES` plus its last batch, and a block of padding per segment.
    let capacity = 2 * ROUND_BYTES + files as usize * BLOCK;
    let mut memory = vec![0u8; capacity + BLOCK];
    let at = memory.as_ptr().align_offset(BLOCK);
    let buffer = &mut memory[at..at + capacity];
    let (mut commits, mut times) = (0, Times::default());
    let mut since = Instant::now();
    while let Some(mut queue) = next_round(rx) {
        lap(&mut times.wait, &mut since);
        let file_of = |partition: u32| {
            if mode.partitioned {
                partition as usize
            } else {
                0
            }
        };
        queue.sort_by_key(|(partition, ..)| file_of(*partition));
        // (segment, range of `buffer`) of each segment the round writes, in order.
        let mut writes: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        let mut len = 0usize;
        let mut wb = db.batch();
        for (partition, batch, count, _) in &mut queue {
            let (p, f) = (*partition as usize, file_of(*partition));
            if writes.last().is_none_or(|(last, _)| *last != f) {
                len = len.div_ceil(BLOCK) * BLOCK;
                writes.push((f, len..len));
            }
            let start = writes.last().map_or(len, |(_, r)| r.start);
            batch::seal(batch, next[p]);
            let mut key = [0u8; 16];
            key[4..8].copy_from_slice(&partition.to_be_bytes());
            key[8..].copy_from_slice(&next[p].to_be_bytes());
            let mut pointer = [0u8; 20];
            pointer[..8].copy_from_slice(&segments[f].id.to_le_bytes());
            let position = segments[f].position + (len - start) as u64;
            pointer[8..16].copy_from_slice(&position.to_le_bytes());
            pointer[16..].copy_from_slice(&u32::try_from(batch.len())?.to_le_bytes());
            wb.insert(&records, key, pointer);
            buffer[len..len + batch.len()].copy_from_slice(batch);
            len += batch.len();
            if let Some((_, range)) = writes.last_mut() {
                range.end = len;
            }
            next[p] += u64::from(*count);
        }
        for (p, end) in next.iter().enumerate() {
            wb.insert(&meta, (p as u32).to_be_bytes(), end.to_le_bytes());
        }
        if mode.direct {
            // Each segment's next write starts on a block boundary; the padding is zeros.
            for (_, range) in &mut writes {
                let padded = range.start + range.len().div_ceil(BLOCK) * BLOCK;
                buffer[range.end..padded].fill(0);
                range.end = padded;
            }
        }
        lap(&mut times.copy, &mut since);
        for (f, range) in &writes {
            segments[*f].file.write_all(&buffer[range.clone()])?;
        }
        lap(&mut times.write, &mut since);
        make_durable(&segments, &writes, wb, mode.index)?;
        lap(&mut times.sync, &mut since);
        for (f, range) in writes {
            let segment = &mut segments[f];
            segment.position += range.len() as u64;
            if segment.position >= SEGMENT_BYTES {
                *segment = Segment::open(dir, &f.to_string(), segment.id + 1, mode.direct)?;
            }
        }
        commits += 1;
        for (_, _, _, reply) in queue {
            let _ = reply.send(());
        }
    }
    Ok((commits, times))
}
