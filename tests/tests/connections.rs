//! Connection hygiene: idle TCP connections cannot starve the broker of file descriptors.
//! With an open-files limit of 256 and 500 idle connections on the gRPC port and 100 on the
//! HTTP port, the broker keeps serving a client already connected, flushes tables (which
//! need descriptors), and takes new clients again once the silent ones are closed.

use std::{net::TcpStream, time::Duration};

use weir_client::{Client, FetchOptions, Record, TopicConfig};
use weir_tests::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_under_a_low_open_files_limit_do_not_stop_the_broker() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_with_open_files(dir.path(), &["--memtable-size", "1MiB"], 256)?;
    let client = broker.client().await?;
    client.create_topic("busy", &TopicConfig::new(2)).await?;

    let mut idle = Vec::new();
    for _ in 0..500 {
        if let Ok(s) = TcpStream::connect(&broker.addr) {
            idle.push(s);
        }
    }
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(&broker.http_addr) {
            idle.push(s);
        }
    }
    assert!(
        idle.len() >= 500,
        "the test opened {} connections",
        idle.len()
    );

    // 24 MB through 1 MiB memtables: tables are flushed while the idle connections stay.
    let mut acked = 0u64;
    for batch in 0..240 {
        let records = (0..100)
            .map(|i| Record::value(format!("{batch}:{i}:{}", "v".repeat(1000))))
            .collect();
        let acks = client
            .produce("busy", Some(batch % 2), records)
            .await
            .map_err(|e| anyhow::anyhow!("batch {batch}: {e}; logs:\n{}", broker.log_text()))?;
        acked += u64::from(acks[0].record_count);
    }
    let fetched = client.fetch("busy", 0, 0, FetchOptions::default()).await?;
    assert_eq!(
        fetched.records[0].record.text().split(':').next(),
        Some("0")
    );
    assert_eq!(client.describe_topic("busy").await?.messages, acked);

    // Silent connections are closed after 10 s: a new client gets in.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let newcomer = Client::connect(&broker.addr).await?;
    assert_eq!(newcomer.describe_topic("busy").await?.messages, acked);
    drop(idle);
    assert!(
        !broker.log_text().contains("Too many open files"),
        "{}",
        broker.log_text()
    );
    // Still running: a clean stop exits 0.
    assert_eq!(broker.terminate()?, Some(0));
    Ok(())
}
