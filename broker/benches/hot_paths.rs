//! Criterion benchmarks of the broker's hot paths, so a regression shows up in numbers:
//! batch encode and decode with CRC32C, the append path through the single writer with group
//! commit (fsync), and reads of stored batches.
//!
//! Run: `cargo bench -p weir-broker --bench hot_paths` (figures in target/criterion).
//! Records are 100-byte incompressible values, 1000 per batch, as `weir bench produce` sends.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use weir_broker::{
    log::{Log, LogOptions, Record, TopicConfig, batch},
    produce,
};

const RECORDS: usize = 1000;
const VALUE: usize = 100;

fn records() -> Vec<Record> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..RECORDS)
        .map(|_| {
            let mut v = Vec::with_capacity(VALUE);
            while v.len() < VALUE {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                v.extend_from_slice(&state.to_le_bytes());
            }
            v.truncate(VALUE);
            Record {
                value: Bytes::from(v),
                ..Record::default()
            }
        })
        .collect()
}

fn codec(c: &mut Criterion) {
    let recs = records();
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.bench_function("encode_seal_1000x100B", |b| {
        b.iter(|| {
            let mut out = batch::encode(&recs, 1_700_000_000_000);
            batch::seal(&mut out, 42);
            out
        });
    });
    let mut sealed = batch::encode(&recs, 1_700_000_000_000);
    batch::seal(&mut sealed, 42);
    let sealed = Bytes::from(sealed);
    g.bench_function("verify_decode_1000x100B", |b| {
        b.iter(|| batch::decode(&sealed).map(|(_, r)| r.len()));
    });
    g.finish();
}

fn open() -> (tempfile::TempDir, Arc<Log>, tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Arc::new(Log::open(dir.path(), &LogOptions::default()).expect("opens"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(log.create_topic("bench", TopicConfig::new(4, 0).expect("config")))
        .expect("topic");
    (dir, log, rt)
}

fn append(c: &mut Criterion) {
    let (_dir, log, rt) = open();
    let recs = records();
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.measurement_time(Duration::from_secs(10));
    // One request at a time: encode, queue, group commit with one fsync, ack.
    g.bench_function("one_request_fsync_1000x100B", |b| {
        b.iter_batched(
            || recs.clone(),
            |r| rt.block_on(produce::produce(&log, "bench", Some(0), r)),
            BatchSize::SmallInput,
        );
    });
    // Sixteen requests at once: they share commits (group commit).
    g.throughput(Throughput::Elements(16 * RECORDS as u64));
    g.bench_function("16_concurrent_requests_fsync_1000x100B", |b| {
        b.iter_batched(
            || (0..16).map(|_| recs.clone()).collect::<Vec<_>>(),
            |batches| {
                rt.block_on(async {
                    let pending: Vec<_> = batches
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| {
                            let log = Arc::clone(&log);
                            tokio::spawn(async move {
                                produce::produce(&log, "bench", Some(i as u32 % 4), r).await
                            })
                        })
                        .collect();
                    for p in pending {
                        let _ = p.await;
                    }
                });
            },
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn fetch(c: &mut Criterion) {
    let (_dir, log, rt) = open();
    for _ in 0..100 {
        rt.block_on(produce::produce(&log, "bench", Some(0), records()))
            .expect("produce");
    }
    let topic = log.topic("bench").expect("topic");
    let part = topic.partition(0).expect("partition");
    let mut g = c.benchmark_group("fetch");
    g.throughput(Throughput::Elements(RECORDS as u64));
    let mut offset = 0u64;
    g.bench_function("read_1000_of_100000x100B", |b| {
        b.iter(|| {
            let r = log
                .read(&part, offset, usize::MAX, RECORDS)
                .map(|r| r.len());
            offset = (offset + RECORDS as u64) % 99_000;
            r
        });
    });
    g.finish();
}

criterion_group!(benches, codec, append, fetch);
criterion_main!(benches);
