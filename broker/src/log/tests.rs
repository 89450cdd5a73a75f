//! Tests of the log as a whole: appends through the writer, budgets, storage layout.

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
        record_store: RecordStore::Fjall,
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
        record_store: RecordStore::Fjall,
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

/// Node ids 0, 1, 2, … start their records memtables at phases 0, 0.62, 0.24, 0.85, 0.47
/// of a memtable: three brokers at least a fifth of a memtable apart, five a tenth.
#[test]
fn consecutive_node_ids_start_their_memtables_apart() {
    const MIB: u64 = 1024 * 1024;
    let offsets: Vec<u64> = (0..5).map(|id| memtable_offset(64 * MIB, id)).collect();
    let phases: Vec<f64> = offsets
        .iter()
        .map(|&o| o as f64 / (64 * MIB) as f64)
        .collect();
    for (want, got) in [0.0, 0.618, 0.236, 0.854, 0.472].iter().zip(&phases) {
        assert!((want - got).abs() < 0.001, "phases {phases:?}");
    }
    let apart = |n: usize| {
        let mut least = f64::MAX;
        for a in 0..n {
            for b in 0..a {
                let d = (phases[a] - phases[b]).abs();
                least = least.min(d.min(1.0 - d));
            }
        }
        least
    };
    assert!(apart(3) > 0.2 && apart(5) > 0.1, "phases {phases:?}");
    assert!(offsets.iter().all(|&o| o < 64 * MIB));
    assert!(memtable_offset(64 * MIB, u64::MAX) < 64 * MIB);
}

/// A log opened with a memtable offset seals its first records memtable that many bytes
/// early: 400 KiB of records fill a 1 MiB memtable started at 768 KiB (a table is
/// flushed), and not one started at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memtable_offset_seals_the_first_memtable_early() {
    const KIB: u64 = 1024;
    let tables_after_400_kib = |offset: u64| async move {
        let options = LogOptions {
            record_store: RecordStore::Fjall,
            memtable_bytes: 1024 * KIB,
            memtable_offset_bytes: offset,
            ..LogOptions::default()
        };
        let (dir, log) = log_with_topic(&options, "m", 1).await;
        for _ in 0..4 {
            let records = vec![filled(3, 1000); 100];
            crate::produce::produce(&log, "m", Some(0), records)
                .await
                .expect("produced");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while log.shared.records.table_count() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let tables = log.shared.records.table_count();
        drop((dir, log));
        tables
    };
    assert!(
        tables_after_400_kib(768 * KIB).await > 0,
        "no table flushed with the first memtable started at 768 KiB"
    );
    assert_eq!(
        tables_after_400_kib(0).await,
        0,
        "a table flushed from a 1 MiB memtable holding 400 KiB"
    );
}

/// Batches kept in the database (the fjall store) go to blob files at flush (key-value
/// separation), and read back from there byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_batches_live_in_blob_files_and_read_back() {
    const MIB: u64 = 1024 * 1024;
    let options = LogOptions {
        record_store: RecordStore::Fjall,
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

/// Replica state written through the writer lands in the order it was queued (a later
/// round's state is never overwritten by an earlier one), is committed although the round
/// wrote no partition, and its removes go before its puts; `done` is told once committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_states_are_written_in_queue_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path(), &LogOptions::default()).expect("opens");
    let raft = log.keyspace("raft").expect("keyspace");
    raft.insert(b"gone", b"x").expect("insert");
    for round in 0..100u32 {
        let state = ReplicaState {
            raft: raft.clone(),
            removes: vec![b"gone".to_vec()],
            puts: vec![(b"applied".to_vec(), round.to_be_bytes().to_vec())],
            done: None,
        };
        log.replica_state(state).await.expect("queued");
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let last = ReplicaState {
        raft: raft.clone(),
        removes: Vec::new(),
        puts: vec![(b"last".to_vec(), b"1".to_vec())],
        done: Some(Box::new(move |result| {
            let _ = tx.send(result);
        })),
    };
    log.replica_state(last).await.expect("queued");
    rx.await.expect("told").expect("committed");
    let applied = raft.get(b"applied").expect("read").expect("written");
    assert_eq!(&applied[..], &99u32.to_be_bytes()[..]);
    assert!(raft.get(b"gone").expect("read").is_none());
    assert!(raft.get(b"last").expect("read").is_some());
}

/// A replica append is told `written` once its round's batch is in the journal, with its
/// entry readable, and only then `done` (after the round's fsync): a replica's state
/// machine applies on the first, Raft counts the entry flushed on the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_append_is_written_before_it_is_flushed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Log::open(dir.path(), &LogOptions::default()).expect("opens");
    let mut config = TopicConfig::new(1, 0).expect("config");
    config.replication_factor = 3;
    log.create_topic("t", config).await.expect("topic");
    let partition = log.topic("t").expect("topic").partition(0).expect("p0");
    let raft = log.keyspace("raft").expect("keyspace");
    let group = keys::group_key_of(1, 0);
    let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let written = {
        let (told, raft) = (Arc::clone(&told), raft.clone());
        Box::new(move || {
            let readable = raft
                .get(keys::replica_entry_key(group, 0))
                .is_ok_and(|v| v.is_some());
            told.lock()
                .push(if readable { "written" } else { "unreadable" });
        })
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done = {
        let told = Arc::clone(&told);
        Box::new(move |result| {
            told.lock().push("flushed");
            let _ = tx.send(result);
        })
    };
    log.replica_append(ReplicaAppend {
        partition,
        raft,
        group,
        fsync: true,
        entries: vec![(0, 1, ReplicaPayload::Blank)],
        written,
        done,
    })
    .await
    .expect("queued");
    rx.await.expect("told").expect("stored");
    assert_eq!(*told.lock(), ["written", "flushed"]);
}

/// Options of the segment store, with segments of `segment_bytes`, every batch in
/// segments.
fn segment_store(segment_bytes: u64) -> LogOptions {
    LogOptions {
        record_store: RecordStore::Segments,
        segment_bytes,
        segment_min_batch_bytes: 0,
        ..LogOptions::default()
    }
}

/// Produces `n` requests of 10 records of `size` bytes (byte `i` for request `i`) to
/// partition 0 of `topic`.
async fn produce_requests(log: &Log, topic: &str, n: u8, size: usize) {
    for i in 0..n {
        let records = (0..10).map(|_| filled(i, size)).collect();
        crate::produce::produce(log, topic, Some(0), records)
            .await
            .expect("produced");
    }
}

/// Every record of partition 0 from `from`, read in one pass; the value's first byte
/// of each.
fn read_firsts(log: &Log, topic: &str, from: u64) -> Result<Vec<(u64, u8)>, Error> {
    let p = log.topic(topic).expect("topic").partition(0).expect("p0");
    let records = log.read(&p, from, usize::MAX, usize::MAX)?;
    Ok(records
        .iter()
        .map(|r| (r.offset, r.record.value.first().copied().unwrap_or(0)))
        .collect())
}

/// The segment directory of partition 0 of `topic`.
fn segment_dir(log: &Log, topic: &str) -> std::path::PathBuf {
    let p = log.topic(topic).expect("topic").partition(0).expect("p0");
    log.shared.segments.partition_dir(p.prefix)
}

/// The segment files of partition 0 of `topic`, by base offset.
fn segment_files(log: &Log, topic: &str) -> Vec<u64> {
    segment::list(&segment_dir(log, topic)).expect("lists")
}

/// The segment store keeps records in segment files and pointers in the database: reads
/// before and after a restart return every record, a restart continues the last segment,
/// and the records keyspace holds no record bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_store_serves_its_records_across_a_restart() {
    let options = segment_store(64 * 1024 * 1024);
    let (dir, log) = log_with_topic(&options, "t", 1).await;
    produce_requests(&log, "t", 5, 3000).await;
    let expected: Vec<(u64, u8)> = (0..50).map(|o| (o, (o / 10) as u8)).collect();
    assert_eq!(read_firsts(&log, "t", 0).expect("reads"), expected);
    let p = log.topic("t").expect("topic").partition(0).expect("p0");
    for guard in log.shared.records.prefix(p.prefix) {
        let (_, value) = guard.into_inner().expect("reads");
        assert!(
            segment::Pointer::decode(&value).is_some(),
            "a batch of {} bytes was stored in the database",
            value.len()
        );
    }
    let segment_len = std::fs::metadata(segment_dir(&log, "t").join(segment::file_name(0)))
        .expect("segment 0")
        .len();
    assert!(segment_len >= 150_000, "{segment_len}");
    let database = log.shared.db.disk_space().expect("database size");
    assert_eq!(
        log.disk_space().expect("disk space"),
        database + segment_len,
        "disk space counts the segments"
    );
    log.close().await.expect("closes");
    drop(log);
    let log = Log::open(dir.path(), &options).expect("reopens");
    assert_eq!(read_firsts(&log, "t", 0).expect("reads"), expected);
    produce_requests(&log, "t", 2, 3000).await;
    let after = read_firsts(&log, "t", 45).expect("reads");
    assert_eq!(after.len(), 25);
    assert_eq!(
        segment_files(&log, "t"),
        vec![0],
        "the restart continued segment 0"
    );
}

/// Frames written after the last committed pointer (a crash between the segment write and
/// the commit) are cut off when the partition's segment is opened again, and the offsets
/// they would have had are given to the next records once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_past_the_last_pointer_are_cut_and_their_offsets_reused_once() {
    let options = segment_store(64 * 1024 * 1024);
    let (dir, log) = log_with_topic(&options, "t", 1).await;
    produce_requests(&log, "t", 2, 100).await;
    log.close().await.expect("closes");
    // An uncommitted round's frame after the last indexed one.
    let seg_dir = {
        let p = log.topic("t").expect("topic").partition(0).expect("p0");
        log.shared.segments.partition_dir(p.prefix)
    };
    drop(log);
    let path = seg_dir.join(segment::file_name(0));
    let (frames, len, _) = segment::scan(&path, 0).expect("scans");
    assert_eq!(frames.len(), 2);
    let mut w = segment::SegmentWriter::open(&seg_dir, 0, len, true).expect("opens the segment");
    let mut stray = batch::encode(&[filled(99, 100)], 1);
    batch::seal(&mut stray, 20);
    w.append(&stray).expect("appends");
    w.write().expect("writes");
    w.sync().expect("syncs");
    drop(w);
    let log = Log::open(dir.path(), &options).expect("reopens");
    produce_requests(&log, "t", 1, 100).await;
    let got = read_firsts(&log, "t", 0).expect("reads");
    assert_eq!(got.len(), 30);
    assert_eq!(
        got[20],
        (20, 0),
        "offset 20 holds the new record, not the stray frame"
    );
    let (frames, _, how) = segment::scan(&path, 0).expect("scans");
    assert_eq!(how, segment::ScanEnd::Clean);
    assert_eq!(frames.len(), 3, "the stray frame was cut off");
}

/// Batches of one round that fill a segment and go on in the next are all written: the
/// full segment's buffered frames reach its file before a new segment is started (they
/// were dropped with its writer, leaving committed pointers to frames never written,
/// read from memory until the broker restarted and lost after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_fills_a_segment_writes_every_frame_before_the_next_segment() {
    let options = segment_store(1024 * 1024);
    let (dir, log) = log_with_topic(&options, "t", 1).await;
    // 24 requests of 10 × 30 KB at once: rounds of several batches, each 300 KB, so that
    // a 1 MiB segment fills in the middle of a round.
    let requests = (0..24u8).map(|i| {
        let log = Arc::clone(&log);
        async move {
            let records = (0..10).map(|_| filled(i, 30_000)).collect();
            crate::produce::produce(&log, "t", Some(0), records)
                .await
                .expect("produced")
        }
    });
    let acks = futures::future::join_all(requests).await;
    let mut expected: Vec<(u64, u8)> = acks
        .iter()
        .enumerate()
        .flat_map(|(i, a)| (0..10).map(move |k| (a[0].base_offset + k, i as u8)))
        .collect();
    expected.sort_unstable();
    assert!(
        segment_files(&log, "t").len() >= 3,
        "segments rolled: {:?}",
        segment_files(&log, "t")
    );
    log.close().await.expect("closes");
    drop(log);
    let log = Log::open(dir.path(), &options).expect("reopens");
    let mut read = Vec::new();
    while read.len() < expected.len() {
        let from = read.len() as u64;
        let more = read_firsts(&log, "t", from)
            .unwrap_or_else(|e| panic!("reading from offset {from}: {e}"));
        assert!(!more.is_empty(), "nothing read from offset {from}");
        read.extend(more);
    }
    assert_eq!(read, expected);
}

/// Retention deletes whole segments below the head, never the newest; a deleted
/// topic's segments go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_topic_deletion_delete_segment_files() {
    // Segments rolled at 1 MiB: each request (one batch of 10 × 120 KiB) starts one.
    let options = segment_store(1024 * 1024);
    let (_dir, log) = log_with_topic(&options, "t", 1).await;
    produce_requests(&log, "t", 4, 120 * 1024).await;
    assert_eq!(segment_files(&log, "t"), vec![0, 10, 20, 30]);
    let p = log.topic("t").expect("topic").partition(0).expect("p0");
    log.truncate(Arc::clone(&p), 25).await.expect("truncates");
    assert_eq!(
        segment_files(&log, "t"),
        vec![20, 30],
        "the batch holding 25 stays"
    );
    assert_eq!(read_firsts(&log, "t", 25).expect("reads")[0], (25, 2));
    log.truncate(Arc::clone(&p), 40).await.expect("truncates");
    assert_eq!(
        segment_files(&log, "t"),
        vec![30],
        "the newest segment stays"
    );
    let seg_dir = segment_dir(&log, "t");
    log.delete_topic("t").await.expect("deletes");
    assert!(!seg_dir.exists(), "the deleted topic's segments are gone");
}

/// Retention keeps the first segment it deletes as the partition's spare, and the next
/// segment is written over it: every record reads back before and after a restart, and a
/// read through a pointer taken before the cut, into the file now written over, gets
/// missing offsets, never the records written there since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_recycles_a_deleted_segment_as_the_next_one() {
    use std::os::unix::fs::MetadataExt;
    let options = LogOptions {
        tail_cache_bytes: 0,
        ..segment_store(1024 * 1024)
    };
    let (dir, log) = log_with_topic(&options, "t", 1).await;
    // Each request (one batch of 10 × 120 KiB) starts a segment.
    produce_requests(&log, "t", 4, 120 * 1024).await;
    let p = log.topic("t").expect("topic").partition(0).expect("p0");
    let stale = {
        let guard = log.shared.records.prefix(p.prefix).next().expect("a batch");
        let (_, value) = guard.into_inner().expect("reads");
        segment::Pointer::decode(&value).expect("a pointer")
    };
    assert_eq!((stale.segment, stale.position), (0, 0));
    let seg_dir = segment_dir(&log, "t");
    let inode = |name: &str| std::fs::metadata(seg_dir.join(name)).map(|m| m.ino());
    let first = inode(&segment::file_name(0)).expect("segment 0");
    log.truncate(Arc::clone(&p), 25).await.expect("truncates");
    assert_eq!(segment_files(&log, "t"), vec![20, 30]);
    assert_eq!(
        inode(segment::SPARE_NAME).expect("a spare"),
        first,
        "segment 0 is the spare"
    );
    let segment_bytes: u64 = [20, 30, 0]
        .iter()
        .map(|b| {
            let name = if *b == 0 {
                segment::SPARE_NAME.to_owned()
            } else {
                segment::file_name(*b)
            };
            std::fs::metadata(seg_dir.join(name)).expect("exists").len()
        })
        .sum();
    assert_eq!(
        log.disk_space().expect("disk space"),
        log.shared.db.disk_space().expect("database size") + segment_bytes,
        "disk space counts the spare"
    );
    // Same sizes as before: offset 40's frame lands where offset 0's was.
    for i in 4..6u8 {
        let records = (0..10).map(|_| filled(i, 120 * 1024)).collect();
        crate::produce::produce(&log, "t", Some(0), records)
            .await
            .expect("produced");
    }
    assert_eq!(segment_files(&log, "t"), vec![20, 30, 40, 50]);
    assert_eq!(
        inode(&segment::file_name(40)).expect("segment 40"),
        first,
        "segment 40 was written over the spare"
    );
    assert!(inode(segment::SPARE_NAME).is_err(), "the spare was used");
    assert!(
        matches!(
            log.shared.segments.read(p.prefix, &stale),
            Ok(segment::FrameRead::Gone)
        ),
        "a pointer into the recycled file reads as gone"
    );
    let expected: Vec<(u64, u8)> = (25..60).map(|o| (o, (o / 10) as u8)).collect();
    assert_eq!(read_firsts(&log, "t", 25).expect("reads"), expected);
    log.close().await.expect("closes");
    drop(log);
    let log = Log::open(dir.path(), &options).expect("reopens");
    assert_eq!(read_firsts(&log, "t", 25).expect("reads"), expected);
    produce_requests(&log, "t", 1, 100).await;
    assert_eq!(read_firsts(&log, "t", 59).expect("reads").len(), 11);
}

/// A segment file that is gone reads as missing offsets (DATA_LOSS), never as other
/// records; a damaged frame as a corrupt batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_damaged_segment_reads_as_data_loss() {
    let options = segment_store(1024 * 1024);
    let (dir, log) = log_with_topic(&options, "t", 1).await;
    produce_requests(&log, "t", 3, 120 * 1024).await;
    log.close().await.expect("closes");
    let seg_dir = segment_dir(&log, "t");
    drop(log);
    std::fs::remove_file(seg_dir.join(segment::file_name(10))).expect("removes");
    let path = seg_dir.join(segment::file_name(20));
    let mut bytes = std::fs::read(&path).expect("reads");
    bytes[4096] ^= 0xFF;
    std::fs::write(&path, bytes).expect("writes");
    let log = Log::open(dir.path(), &options).expect("reopens");
    assert_eq!(
        read_firsts(&log, "t", 0)
            .expect("reads the intact segment")
            .len(),
        10
    );
    match read_firsts(&log, "t", 10) {
        Err(Error::Missing { from, to, .. }) => assert_eq!((from, to), (10, 20)),
        other => panic!("expected missing offsets 10..20, got {other:?}"),
    }
    match read_firsts(&log, "t", 20) {
        Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, 20),
        other => panic!("expected a corrupt batch at 20, got {other:?}"),
    }
}

/// Reads of the newest batches come from memory: with the segment file gone they are
/// still served from the tail cache, and without a cache they read as missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_batches_are_read_from_the_tail_cache() {
    for (cache, served) in [(32 * 1024 * 1024, true), (0, false)] {
        let options = LogOptions {
            tail_cache_bytes: cache,
            ..segment_store(64 * 1024 * 1024)
        };
        let (_dir, log) = log_with_topic(&options, "t", 1).await;
        produce_requests(&log, "t", 2, 1000).await;
        std::fs::remove_file(segment_dir(&log, "t").join(segment::file_name(0)))
            .expect("removes the segment");
        let read = read_firsts(&log, "t", 0);
        if served {
            assert_eq!(read.expect("served from memory").len(), 20);
            assert!(log.shared.segments.tail_bytes() > 20_000);
        } else {
            assert!(matches!(read, Err(Error::Missing { .. })), "{read:?}");
        }
    }
}

/// With `segment_min_batch_bytes`, small batches are stored whole in the database and
/// large ones in segments, in one partition: every record reads back in order across a
/// restart, and a large batch after small ones starts a new segment, replacing a stray
/// file of that name that a crash left with an uncommitted frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_batches_stay_in_the_database_and_large_ones_go_to_segments() {
    let options = LogOptions {
        segment_min_batch_bytes: 16 * 1024,
        ..segment_store(64 * 1024 * 1024)
    };
    let (dir, log) = log_with_topic(&options, "t", 1).await;
    // Requests 0, 1 and 4: 10 × 100 B (small); 2 and 3: 10 × 3,000 B (large).
    for (i, size) in [(0u8, 100), (1, 100), (2, 3000), (3, 3000), (4, 100)] {
        let records = (0..10).map(|_| filled(i, size)).collect();
        crate::produce::produce(&log, "t", Some(0), records)
            .await
            .expect("produced");
    }
    let p = log.topic("t").expect("topic").partition(0).expect("p0");
    let in_segments: Vec<bool> = log
        .shared
        .records
        .prefix(p.prefix)
        .map(|g| segment::Pointer::decode(&g.into_inner().expect("reads").1).is_some())
        .collect();
    assert_eq!(in_segments, [false, false, true, true, false]);
    let expected: Vec<(u64, u8)> = (0..50).map(|o| (o, (o / 10) as u8)).collect();
    assert_eq!(read_firsts(&log, "t", 0).expect("reads"), expected);
    log.close().await.expect("closes");
    let seg_dir = segment_dir(&log, "t");
    drop(log);
    // What a crash after a segment write and before its commit leaves: a segment named
    // after the next offset, holding a frame no pointer names.
    let mut stray = segment::SegmentWriter::create(&seg_dir, 50, true).expect("creates");
    let mut batch = batch::encode(&[filled(99, 3000)], 1);
    batch::seal(&mut batch, 50);
    stray.append(&batch).expect("appends");
    stray.write().expect("writes");
    stray.sync().expect("syncs");
    drop(stray);
    let log = Log::open(dir.path(), &options).expect("reopens");
    assert_eq!(read_firsts(&log, "t", 0).expect("reads"), expected);
    produce_requests(&log, "t", 1, 3000).await;
    let got = read_firsts(&log, "t", 0).expect("reads");
    assert_eq!(got.len(), 60);
    assert_eq!(got[50], (50, 0), "offset 50 holds the new record");
    assert_eq!(segment_files(&log, "t"), vec![20, 50]);
    let (frames, _, how) = segment::scan(&seg_dir.join(segment::file_name(50)), 0).expect("scans");
    assert_eq!((frames.len(), how), (1, segment::ScanEnd::Clean));
}
