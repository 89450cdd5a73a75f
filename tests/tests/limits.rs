//! Topic limits and delivery guarantees: bounded queues that refuse past their bound,
//! drop-oldest, max age, max bytes against the real data directory, exactly-once appends
//! from an idempotent producer across SIGKILLs, and refusal of bad settings.

// Each test walks through one scenario step by step.
#![allow(clippy::too_many_lines)]

use std::{collections::BTreeMap, time::Duration};

use tonic::Code;
use weir_client::{
    Client, Durability, FetchOptions, GroupConfig, GroupType, Overflow, Record, Retention,
    StoredRecord, TopicConfig, pb,
};
use weir_tests::{Broker, create_topic_raw, dir_size, produce_as};

fn topic(partitions: u32) -> pb::TopicConfig {
    pb::TopicConfig {
        partitions,
        ..pb::TopicConfig::default()
    }
}

fn value(r: &StoredRecord) -> String {
    r.record.text().into_owned()
}

/// Every record of a partition from its earliest offset.
async fn read_all(client: &Client, t: &str, partition: u32) -> anyhow::Result<Vec<StoredRecord>> {
    let d = client.describe_topic(t).await?;
    let mut offset = d.partitions[partition as usize].earliest_offset;
    let mut out = Vec::new();
    loop {
        let resp = client
            .fetch(
                t,
                partition,
                offset,
                FetchOptions {
                    max_bytes: Some(4 << 20),
                    ..FetchOptions::default()
                },
            )
            .await?;
        let Some(last) = resp.records.last() else {
            return Ok(out);
        };
        offset = last.offset + 1;
        out.extend(resp.records);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_queue_refuses_past_its_bound_and_recovers_once_drained() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client
        .create_topic(
            "orders",
            &TopicConfig::new(4)
                .with_max_messages(1000)
                .with_overflow(Overflow::Reject)
                .with_retention(Retention::WorkQueue),
        )
        .await?;
    // 5,000 orders: 20 concurrent shoppers, 25 requests of 10 orders each.
    let mut shoppers = Vec::new();
    for s in 0..20 {
        let client = client.clone();
        shoppers.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (Vec::new(), 0);
            for r in 0..25 {
                let id = format!("s{s}r{r}");
                let records = (0..10)
                    .map(|i| Record::value(format!("{id}-{i}")))
                    .collect();
                match client.produce("orders", None, records).await {
                    Ok(_) => ok.push(id),
                    Err(e) => {
                        assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                        let text = e.to_string();
                        assert!(
                            text.contains("max_messages is 1000") && text.contains("Retry"),
                            "{text}"
                        );
                        refused += 1;
                    }
                }
            }
            (ok, refused)
        }));
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for s in shoppers {
        let (ok, r) = s.await?;
        accepted.extend(ok);
        refused += r;
    }
    assert_eq!(accepted.len() + refused, 500);
    assert_eq!(accepted.len(), 100, "exactly 1000 orders fit");
    let stored = client.describe_topic("orders").await?;
    assert_eq!(stored.messages, 1000);
    // No partial batch: every stored request is there whole, every refused one not at all.
    let mut per_request: BTreeMap<String, usize> = BTreeMap::new();
    for p in 0..4 {
        for r in read_all(&client, "orders", p).await? {
            let v = value(&r);
            let id = v.split('-').next().unwrap_or_default().to_owned();
            *per_request.entry(id).or_default() += 1;
        }
    }
    assert_eq!(per_request.len(), 100);
    assert!(per_request.values().all(|n| *n == 10));
    for id in &accepted {
        assert_eq!(per_request.get(id), Some(&10), "{id}");
    }

    // Workers drain and ack; room comes back; producing works again at once.
    let mut worker = client
        .subscribe(
            "fulfilment",
            Some(&GroupConfig::new("orders", GroupType::Shared)),
            200,
        )
        .await?;
    for _ in 0..1000 {
        let d = tokio::time::timeout(Duration::from_secs(5), worker.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        worker.ack(&d).await?;
    }
    let mut left = u64::MAX;
    for _ in 0..50 {
        left = client.describe_topic("orders").await?.messages;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0);
    let acks = client
        .produce(
            "orders",
            None,
            (0..10)
                .map(|i| Record::value(format!("late-{i}")))
                .collect(),
        )
        .await?;
    assert_eq!(acks.iter().map(|a| a.record_count).sum::<u32>(), 10);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_exactly_the_newest_messages() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client
        .create_topic("ticker", &TopicConfig::new(1).with_max_messages(1000))
        .await?;
    // Batches of 128 do not line up with the limit: the head moves inside a batch.
    let mut n = 0u64;
    while n < 5000 {
        let k = (5000 - n).min(128);
        client
            .produce(
                "ticker",
                None,
                (n..n + k).map(|i| Record::value(format!("{i}"))).collect(),
            )
            .await?;
        n += k;
    }
    let t = client.describe_topic("ticker").await?;
    assert_eq!(t.partitions[0].earliest_offset, 4000);
    assert_eq!(t.messages, 1000);
    let all = read_all(&client, "ticker", 0).await?;
    let values: Vec<String> = all.iter().map(value).collect();
    let want: Vec<String> = (4000..5000).map(|i| i.to_string()).collect();
    assert_eq!(values, want);
    let err = client
        .fetch("ticker", 0, 3999, FetchOptions::default())
        .await
        .expect_err("dropped");
    assert_eq!(err.code(), Some(Code::OutOfRange));
    assert!(
        err.to_string().contains("valid offsets are 4000..=5000"),
        "{err}"
    );
    // A group that had fallen behind resumes at the head.
    let member = client
        .join(
            "late",
            Some(&GroupConfig::new("ticker", GroupType::Ordered)),
        )
        .await?;
    client
        .produce(
            "ticker",
            None,
            (0..500).map(|i| Record::value(format!("new{i}"))).collect(),
        )
        .await?;
    let first = member.pull(1, Duration::from_secs(1)).await?;
    assert_eq!(first[0].offset, 4500, "resumes at the new head");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_deletes_old_messages_within_a_second_of_expiry() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client
        .create_topic(
            "fresh",
            &TopicConfig::new(2).with_max_age(Duration::from_secs(2)),
        )
        .await?;
    let produced = std::time::Instant::now();
    for _ in 0..5 {
        client
            .produce(
                "fresh",
                None,
                (0..20).map(|i| Record::value(format!("{i}"))).collect(),
            )
            .await?;
    }
    assert_eq!(client.describe_topic("fresh").await?.messages, 100);
    let mut gone_after = None;
    while produced.elapsed() < Duration::from_secs(8) {
        let t = client.describe_topic("fresh").await?;
        if t.messages == 0 {
            gone_after = Some(produced.elapsed());
            for p in &t.partitions {
                assert_eq!(p.earliest_offset, p.next_offset);
                assert!(p.next_offset > 0);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone_after = gone_after.ok_or_else(|| anyhow::anyhow!("messages did not expire"))?;
    println!("expired after {gone_after:?} (max age 2 s, checked every 1 s)");
    assert!(
        gone_after >= Duration::from_millis(1900),
        "expired early: {gone_after:?}"
    );
    // New messages are kept.
    client
        .produce("fresh", Some(0), vec![Record::value("new")])
        .await?;
    assert_eq!(client.describe_topic("fresh").await?.messages, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_bounds_the_data_directory_while_ten_times_the_limit_is_produced()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The smallest journal fjall allows, so deleted data leaves the disk soon.
    let broker = Broker::start_with(dir.path(), &["--max-journal-size", "64MiB"])?;
    let client = broker.client().await?;
    let limit: u64 = 16 << 20;
    client
        .create_topic("capped", &TopicConfig::new(2).with_max_bytes(limit))
        .await?;
    // Incompressible 4 KiB values, 160 MiB in all.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut max_dir = 0;
    let mut max_stored = 0;
    for _ in 0..160 {
        let records = (0..256)
            .map(|_| {
                let v: Vec<u8> = (0..512)
                    .flat_map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed.to_le_bytes()
                    })
                    .collect();
                Record::value(v)
            })
            .collect();
        client.produce("capped", None, records).await?;
        max_stored = max_stored.max(client.describe_topic("capped").await?.bytes);
        max_dir = max_dir.max(dir_size(dir.path()));
    }
    let stored = client.describe_topic("capped").await?.bytes;
    println!(
        "max_bytes {} MiB: stored at most {} MiB, data directory at most {} MiB, {} MiB at the end",
        limit >> 20,
        max_stored >> 20,
        max_dir >> 20,
        dir_size(dir.path()) >> 20
    );
    assert!(
        max_stored <= limit,
        "stored bytes above the limit: {max_stored}"
    );
    assert!(
        stored > limit / 2,
        "the limit keeps close to max_bytes, not far below"
    );
    // Bound: the limit, plus the journals (fjall keeps up to --max-journal-size of sealed
    // journals plus the active one, each rotated at 64 MB), plus one memtable (64 MiB) of
    // deleted batches flushed to a table and not compacted away yet, plus the files' own
    // blocks (indexes, filters, trailers, the engine's manifest): 4 MiB (a CI run measured
    // 208.5 MiB against the 208 MiB of the rest).
    let bound = limit + 2 * (64 << 20) + (64 << 20) + (4 << 20);
    assert!(
        max_dir <= bound,
        "data directory {max_dir} above the bound {bound}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_appends_exactly_once_across_lost_acks_and_sigkills()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_in(dir.path())?;
    broker.pin_port();
    let url = broker.url();
    broker
        .client()
        .await?
        .create_topic("ledger", &TopicConfig::new(3))
        .await?;
    let producer_id = weir_client::new_producer_id();
    let min_requests: u64 = 600;
    let kills_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::clone(&kills_done);
    let producer = tokio::spawn(async move {
        let mut client: Option<Client> = None;
        let mut acks_by_seq = BTreeMap::new();
        let mut rng = 0x9e37_79b9_u64;
        let mut duplicates = 0;
        let mut seq = 0u64;
        while seq < min_requests || !done.load(std::sync::atomic::Ordering::Relaxed) {
            let partition = (seq % 3) as u32;
            let records: Vec<Record> = (0..5)
                .map(|i| Record::value(format!("{seq}:{i}")))
                .collect();
            // Every request is sent until it is acknowledged; one in three acks is "lost"
            // and the request sent again with the same sequence.
            let mut first_ack = None;
            loop {
                if client.is_none() {
                    client = Client::connect(&url).await.ok();
                }
                let Some(c) = client.clone() else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                match produce_as(
                    &c,
                    "ledger",
                    Some(partition),
                    records.clone(),
                    producer_id,
                    // Sequences count per partition: this partition's request number.
                    seq / 3,
                )
                .await
                {
                    Ok(acks) => {
                        if let Some(prev) = &first_ack {
                            assert_eq!(prev, &acks, "a retry must get the original offsets");
                            duplicates += 1;
                            break;
                        }
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        if rng.is_multiple_of(3) {
                            first_ack = Some(acks);
                            continue;
                        }
                        first_ack = Some(acks);
                        break;
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e.code(),
                                Code::Unavailable | Code::Unknown | Code::Cancelled
                            ),
                            "unexpected error {e}"
                        );
                        client = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            acks_by_seq.insert(seq, first_ack);
            seq += 1;
        }
        (acks_by_seq, duplicates)
    });
    let mut kills = 0;
    while kills < 20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        broker.kill();
        kills += 1;
        broker.restart()?;
    }
    kills_done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acks, duplicates) = producer.await?;
    let requests = acks.len() as u64;
    println!("{kills} SIGKILLs, {requests} requests, {duplicates} duplicate sends answered");
    assert!(duplicates > 0);
    let client = broker.client().await?;
    let mut seen = BTreeMap::new();
    for p in 0..3u32 {
        let mut last_seq = None;
        for r in read_all(&client, "ledger", p).await? {
            let v = value(&r);
            *seen.entry(v.clone()).or_insert(0) += 1;
            let seq: u64 = v.split(':').next().unwrap_or_default().parse()?;
            assert_eq!(seq % 3, u64::from(p));
            assert!(
                last_seq.is_none_or(|l| l <= seq),
                "partition {p} out of order"
            );
            last_seq = Some(seq);
        }
    }
    assert_eq!(seen.len() as u64, requests * 5, "every message is stored");
    assert!(seen.values().all(|n| *n == 1), "a message is stored twice");
    // The acks named where each request really is.
    for (seq, a) in acks {
        let a = a.ok_or_else(|| anyhow::anyhow!("no ack for {seq}"))?;
        let got = client
            .fetch(
                "ledger",
                a[0].partition,
                a[0].base_offset,
                FetchOptions::default(),
            )
            .await?;
        assert_eq!(value(&got.records[0]), format!("{seq}:0"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limits_and_out_of_order_sequences_are_refused_and_store_nothing() -> anyhow::Result<()>
{
    let broker = Broker::start()?;
    let client = broker.client().await?;
    // Through the wire API: some of these values (unknown enum numbers) cannot be built
    // with the typed one.
    let refused = |c: pb::TopicConfig, needle: &'static str| {
        let client = client.clone();
        async move {
            let err = create_topic_raw(&client, "bad", c).await.expect_err(needle);
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
            assert!(
                err.message().contains(needle),
                "{err} should mention {needle}"
            );
        }
    };
    refused(
        pb::TopicConfig {
            max_message_bytes: 64 << 20,
            ..topic(1)
        },
        "at most 16777216",
    )
    .await;
    refused(
        pb::TopicConfig {
            max_bytes: 100,
            ..topic(1)
        },
        "max_bytes is 100",
    )
    .await;
    refused(
        pb::TopicConfig {
            max_age_ms: 5,
            ..topic(1)
        },
        "at least 1000",
    )
    .await;
    refused(
        pb::TopicConfig {
            max_age_ms: u64::MAX,
            ..topic(1)
        },
        "at most",
    )
    .await;
    refused(
        pb::TopicConfig {
            overflow: 7,
            ..topic(1)
        },
        "overflow 7 is unknown",
    )
    .await;
    refused(
        pb::TopicConfig {
            durability: 9,
            ..topic(1)
        },
        "durability 9 is unknown",
    )
    .await;
    refused(
        pb::TopicConfig {
            max_messages: 10,
            retention: pb::RetentionPolicy::WorkQueue as i32,
            ..topic(1)
        },
        "needs overflow Reject",
    )
    .await;
    assert!(
        client.list_topics().await?.is_empty(),
        "a refused topic was created"
    );

    client.create_topic("seq", &TopicConfig::new(1)).await?;
    let id = weir_client::new_producer_id();
    // A new producer starts at 0.
    let err = produce_as(&client, "seq", Some(0), vec![Record::value("x")], id, 5)
        .await
        .expect_err("must start at 0");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("first sequence must be 0"), "{err}");
    produce_as(&client, "seq", Some(0), vec![Record::value("a")], id, 0).await?;
    // A gap.
    let err = produce_as(&client, "seq", Some(0), vec![Record::value("c")], id, 2)
        .await
        .expect_err("gap");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("expected 1, got 2"), "{err}");
    // A retry of 0 gets the original offset and stores nothing.
    let again = produce_as(&client, "seq", Some(0), vec![Record::value("a")], id, 0).await?;
    assert_eq!(again[0].base_offset, 0);
    let t = client.describe_topic("seq").await?;
    assert_eq!(t.messages, 1);
    // The next sequence goes on; after a restart the producer's state is still there.
    produce_as(&client, "seq", Some(0), vec![Record::value("b")], id, 1).await?;

    // Sequences count per partition (KIP-98): each partition of a producer starts at 0, and
    // an idempotent request must land on one partition, else it is refused whole.
    client.create_topic("seq2", &TopicConfig::new(2)).await?;
    let key_of = |p: u32| {
        (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| weir_proto::partitioner::partition_for_key(k.as_bytes(), 2) == p)
            .unwrap_or_default()
    };
    let (k0, k1) = (key_of(0), key_of(1));
    for p in 0..2 {
        produce_as(
            &client,
            "seq2",
            Some(p),
            vec![Record::value("first")],
            id,
            0,
        )
        .await?;
    }
    let both = vec![
        Record::keyed(k0.clone(), "a"),
        Record::keyed(k1.clone(), "b"),
    ];
    let err = produce_as(&client, "seq2", None, both, id, 1)
        .await
        .expect_err("spans partitions");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("must land on one partition"),
        "{err}"
    );
    let err = produce_as(&client, "seq2", None, vec![Record::value("u")], id, 1)
        .await
        .expect_err("unkeyed without partition");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("no `partition`"), "{err}");
    // Keys of one partition need no `partition`: sequence 1 of partition 1.
    let acks = produce_as(&client, "seq2", None, vec![Record::keyed(k1, "c")], id, 1).await?;
    assert_eq!((acks[0].partition, acks[0].base_offset), (1, 1));
    assert_eq!(
        client.describe_topic("seq2").await?.messages,
        3,
        "the refused requests stored nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_state_survives_restart_and_limits_can_change_later() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_in(dir.path())?;
    let client = broker.client().await?;
    client.create_topic("later", &TopicConfig::new(1)).await?;
    let id = weir_client::new_producer_id();
    let first = produce_as(&client, "later", Some(0), vec![Record::value("one")], id, 0).await?;
    drop(client);
    broker.kill();
    broker.restart()?;
    let client = broker.client().await?;
    let retry = produce_as(&client, "later", Some(0), vec![Record::value("one")], id, 0).await?;
    assert_eq!(retry, first, "a retry after restart gets the original ack");
    assert_eq!(client.describe_topic("later").await?.messages, 1);
    // Limits set later apply at once.
    for i in 0..20 {
        client
            .produce("later", None, vec![Record::value(format!("{i}"))])
            .await?;
    }
    let mut c = client.describe_topic("later").await?.config;
    c.max_messages = Some(5);
    client.update_topic("later", &c).await?;
    client
        .produce("later", None, vec![Record::value("last")])
        .await?;
    let t = client.describe_topic("later").await?;
    assert_eq!(t.messages, 5);
    assert_eq!(t.partitions[0].earliest_offset, 17);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_topic_acknowledged_messages_survive_a_process_crash() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_in(dir.path())?;
    let client = broker.client().await?;
    client
        .create_topic(
            "metrics",
            &TopicConfig::new(2).with_durability(Durability::Buffered),
        )
        .await?;
    let mut acked = 0u64;
    for i in 0..50 {
        let acks = client
            .produce(
                "metrics",
                None,
                (0..20).map(|j| Record::value(format!("{i}-{j}"))).collect(),
            )
            .await?;
        acked += acks.iter().map(|a| u64::from(a.record_count)).sum::<u64>();
    }
    // SIGKILL right after the last ack, before any periodic fsync could matter: the OS
    // still has the writes, so a process crash loses nothing acknowledged.
    drop(client);
    broker.kill();
    broker.restart()?;
    let client = broker.client().await?;
    assert_eq!(client.describe_topic("metrics").await?.messages, acked);
    Ok(())
}
