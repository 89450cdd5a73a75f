//! Shows how requests share commits: sends rounds of `N` concurrent produce requests of 1000
//! records (100 B) to a fresh log and prints commits per round and time per commit.
//!
//! `cargo run --release -p weir-broker --example group_commit -- [N] [ROUNDS] [DIR]`

use std::{sync::Arc, sync::atomic::Ordering, time::Instant};

use bytes::Bytes;
use weir_broker::{
    log::{Log, LogOptions, Record, TopicConfig},
    produce,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(16), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(200), |s| s.parse())?;
    let dir = args
        .next()
        .unwrap_or_else(|| "/tmp/weir-group-commit".into());
    let _ = std::fs::remove_dir_all(&dir);
    let log = Arc::new(Log::open(
        std::path::Path::new(&dir),
        &LogOptions::default(),
    )?);
    log.create_topic("t", TopicConfig::new(4, 0)?).await?;
    let records: Vec<Record> = (0u32..1000)
        .map(|i| Record {
            value: Bytes::from(vec![u8::try_from(i % 251).unwrap_or(0); 100]),
            ..Record::default()
        })
        .collect();
    let stats = log.writer_stats();
    let (c0, ns0) = (
        stats.commits.load(Ordering::Relaxed),
        stats.commit_nanos.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    for _ in 0..rounds {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let log = Arc::clone(&log);
                let r = records.clone();
                tokio::spawn(
                    async move { produce::produce(&log, "t", Some(i as u32 % 4), r).await },
                )
            })
            .collect();
        for t in tasks {
            t.await??;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let commits = stats.commits.load(Ordering::Relaxed) - c0;
    let commit_ms = (stats.commit_nanos.load(Ordering::Relaxed) - ns0) as f64 / 1e6;
    println!(
        "{n} concurrent × {rounds} rounds: {:.0} records/s, {:.2} commits per round, {:.3} ms per commit, {:.0} % of the time in commits",
        (n * rounds * 1000) as f64 / secs,
        commits as f64 / rounds as f64,
        commit_ms / commits as f64,
        commit_ms / 10.0 / secs
    );
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
