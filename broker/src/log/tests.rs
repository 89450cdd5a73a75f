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
