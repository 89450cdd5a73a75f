//! Consumer groups with real broker processes and real gRPC clients: publish/subscribe,
//! point-to-point work sharing, ordered partitions with rebalances, poison messages and
//! dead letters, flow control, and refusal of bad requests.

// Each test walks through one scenario step by step.
#![allow(clippy::too_many_lines)]

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, UNIX_EPOCH},
};

use tonic::Code;
use weir_client::{
    Client, Delivery, FetchOptions, GroupConfig, GroupConsumer, GroupInfo, GroupType, Record,
    Retention, StartFrom, TopicConfig, pb,
};
use weir_tests::{Broker, lines, loghub};

fn config(topic: &str, t: GroupType) -> GroupConfig {
    GroupConfig::new(topic, t)
}

fn text(d: &Delivery) -> String {
    d.record.text().into_owned()
}

/// Receives and acks `n` deliveries (or fails after `timeout` without one).
async fn drain(
    c: &mut GroupConsumer,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Delivery>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = tokio::time::timeout(timeout, c.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!("no delivery within {timeout:?} after {} of {n}", out.len())
            })?
            .ok_or_else(|| anyhow::anyhow!("stream ended after {} of {n}", out.len()))??;
        c.ack(&d).await?;
        out.push(d);
    }
    Ok(out)
}

async fn produce_lines(
    client: &Client,
    topic: &str,
    input: &[u8],
    keyed: bool,
) -> anyhow::Result<Vec<String>> {
    let all: Vec<String> = lines(input)
        .into_iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    for (i, chunk) in all.chunks(100).enumerate() {
        let records = chunk
            .iter()
            .enumerate()
            .map(|(j, l)| {
                if keyed {
                    Record::keyed(format!("k{}", (i * 100 + j) % 20), l.clone())
                } else {
                    Record::value(l.clone())
                }
            })
            .collect();
        client.produce(topic, None, records).await?;
    }
    Ok(all)
}

/// Sends an ack request as given (duplicates, backwards ranges, other members' ids),
/// through the wire API, for tests of the broker's checks.
async fn raw_ack(client: &Client, request: pb::AckRequest) -> Result<(), weir_client::Error> {
    client
        .raw()
        .consumer
        .ack(request)
        .await
        .map(|_| ())
        .map_err(weir_client::Error::Status)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_gets_every_message_once_whatever_the_join_order() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("signups", &TopicConfig::new(4)).await?;
    // mailer joins before anything is produced, sms after everything is.
    let mut mailer = client
        .subscribe("mailer", Some(&config("signups", GroupType::Shared)), 100)
        .await?;
    let all = produce_lines(&client, "signups", &loghub("Linux_2k.log"), false).await?;
    let mut sms = client
        .subscribe("sms", Some(&config("signups", GroupType::Ordered)), 100)
        .await?;
    let wait = Duration::from_secs(10);
    let got_mailer: Vec<String> = drain(&mut mailer, all.len(), wait)
        .await?
        .iter()
        .map(text)
        .collect();
    let got_sms: Vec<String> = drain(&mut sms, all.len(), wait)
        .await?
        .iter()
        .map(text)
        .collect();
    let expected = sorted(all);
    assert_eq!(
        sorted(got_mailer),
        expected,
        "mailer got a different multiset"
    );
    assert_eq!(sorted(got_sms), expected, "sms got a different multiset");
    // Nothing more arrives: exactly once.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), mailer.next())
            .await
            .is_err()
    );
    mailer.close(wait).await?;
    sms.close(wait).await?;
    for g in ["mailer", "sms"] {
        let d = client.describe_group(g).await?;
        assert_eq!(d.lag, 0, "{g} lag");
        assert_eq!(d.pending, 0, "{g} pending");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_members_split_the_work_and_a_dead_members_messages_are_redelivered()
-> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("jobs", &TopicConfig::new(4)).await?;
    let total = 3000;
    for chunk in 0..30 {
        let records = (0..100)
            .map(|i| Record::value(format!("job-{}", chunk * 100 + i)))
            .collect();
        client.produce("jobs", None, records).await?;
    }
    let mut create = config("jobs", GroupType::Shared);
    create.ack_wait = Some(Duration::from_secs(1));
    let mut doomed = client.subscribe("workers", Some(&create), 20).await?;
    // The doomed member takes 20 messages and dies without acking them.
    let mut held = Vec::new();
    while held.len() < 20 {
        let d = tokio::time::timeout(Duration::from_secs(5), doomed.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        held.push((d.partition, d.offset));
    }
    drop(doomed);

    let mut tasks = Vec::new();
    for _ in 0..2 {
        let client = client.clone();
        let create = create.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client.subscribe("workers", Some(&create), 50).await?;
            let mut got = Vec::new();
            while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(3), c.next()).await {
                let d = d?;
                c.ack(&d).await?;
                got.push(d);
            }
            c.close(Duration::from_secs(5)).await?;
            Ok::<_, anyhow::Error>(got)
        }));
    }
    let mut acked_by: HashMap<(u32, u64), usize> = HashMap::new();
    let mut redelivered = Vec::new();
    for (member, t) in tasks.into_iter().enumerate() {
        let got = t.await??;
        assert!(!got.is_empty(), "member {member} got no work");
        for d in got {
            if d.delivery_count > 1 {
                redelivered.push((d.partition, d.offset));
            }
            let prev = acked_by.insert((d.partition, d.offset), member);
            assert!(prev.is_none(), "{}/{} acked twice", d.partition, d.offset);
        }
    }
    assert_eq!(acked_by.len(), total, "every message acked exactly once");
    held.sort_unstable();
    redelivered.sort_unstable();
    assert_eq!(
        held, redelivered,
        "the dead member's messages came back with a higher delivery count"
    );
    let d = client.describe_group("workers").await?;
    assert_eq!((d.lag, d.pending), (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_members_own_partitions_keep_key_order_across_rebalance_and_restart()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_in(dir.path())?;
    let client = broker.client().await?;
    client.create_topic("events", &TopicConfig::new(4)).await?;
    let all = produce_lines(&client, "events", &loghub("Zookeeper_2k.log"), true).await?;
    let group = config("events", GroupType::Ordered);
    let mut a = client.subscribe("audit", Some(&group), 50).await?;
    let mut b = client.subscribe("audit", Some(&group), 50).await?;
    // Both own two partitions once the rebalance settles.
    let mut owned = BTreeMap::new();
    for _ in 0..50 {
        let d = client.describe_group("audit").await?;
        owned = d
            .members
            .iter()
            .map(|m| (m.id.clone(), m.partitions.clone()))
            .collect();
        if owned.len() == 2 && owned.values().all(|p| p.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(owned.values().all(|p| p.len() == 2), "assignment {owned:?}");

    // a and b consume some; a leaves; b takes over everything.
    let wait = Duration::from_secs(10);
    let mut seen: Vec<Delivery> = drain(&mut a, 300, wait).await?;
    seen.extend(drain(&mut b, 300, wait).await?);
    for d in &seen {
        assert!(
            owned[a.member_id()].contains(&d.partition)
                || owned[b.member_id()].contains(&d.partition),
            "delivery from an unowned partition"
        );
    }
    a.close(wait).await?;
    seen.extend(drain(&mut b, all.len() - 600, wait).await?);
    assert_eq!(
        b.partitions().len(),
        4,
        "b owns every partition after a left"
    );

    // Per key (one partition each), messages came in production order, none missing.
    let mut per_key: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for d in &seen {
        per_key.entry(d.partition).or_default().push(d.offset);
    }
    for (p, offsets) in &per_key {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "partition {p} out of order"
        );
    }
    assert_eq!(sorted(seen.iter().map(text).collect()), sorted(all.clone()));

    // Committed offsets survive SIGKILL (acks are written every 100 ms).
    b.close(wait).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = client.describe_group("audit").await?;
    drop(client);
    broker.kill();
    broker.restart()?;
    let client = broker.client().await?;
    let after = client.describe_group("audit").await?;
    let committed =
        |d: &GroupInfo| -> Vec<u64> { d.partitions.iter().map(|p| p.committed_offset).collect() };
    assert_eq!(committed(&after), committed(&before));
    assert_eq!(after.lag, 0);
    // New messages after the restart reach a new member; old ones never vanish or repeat
    // here because all were committed.
    client
        .produce("events", None, vec![Record::keyed("k1", "after restart")])
        .await?;
    let mut c = client.subscribe("audit", Some(&group), 10).await?;
    let next = drain(&mut c, 1, wait).await?;
    assert_eq!(text(&next[0]), "after restart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered_with_its_origin_while_the_rest_flows() -> anyhow::Result<()>
{
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client
        .create_topic("payments", &TopicConfig::new(1))
        .await?;
    let mut records = vec![Record::value("poison")];
    records.extend((0..99).map(|i| Record::value(format!("ok-{i}"))));
    client.produce("payments", None, records).await?;
    let mut create = config("payments", GroupType::Shared);
    create.max_deliveries = Some(3);
    let mut c = client.subscribe("billing", Some(&create), 10).await?;
    let mut ok = 0;
    let mut poison_deliveries = 0;
    while ok < 99 || poison_deliveries < 3 {
        let d = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        if text(&d) == "poison" {
            poison_deliveries += 1;
            assert_eq!(d.delivery_count, poison_deliveries, "delivery count");
            c.nack(&d, Duration::ZERO, "card declined").await?;
        } else {
            ok += 1;
            c.ack(&d).await?;
        }
    }
    // No fourth delivery; it goes to the dead-letter topic.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), c.next())
            .await
            .is_err()
    );
    let dlq = client
        .fetch(
            "payments-billing-DLQ",
            0,
            0,
            FetchOptions {
                max_wait: Duration::from_secs(5),
                ..FetchOptions::default()
            },
        )
        .await?;
    assert_eq!(dlq.records.len(), 1);
    let rec = dlq.records[0].record.clone();
    assert_eq!(rec.value, "poison");
    let header = |k: &str| {
        rec.headers
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("weir-dlq-topic").as_deref(), Some("payments"));
    assert_eq!(header("weir-dlq-partition").as_deref(), Some("0"));
    assert_eq!(header("weir-dlq-offset").as_deref(), Some("0"));
    assert_eq!(header("weir-dlq-delivery-count").as_deref(), Some("3"));
    assert_eq!(header("weir-dlq-error").as_deref(), Some("card declined"));
    let d = client.describe_group("billing").await?;
    assert_eq!(d.dead_lettered, 1);
    assert_eq!((d.lag, d.pending), (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_member_never_holds_more_unacked_than_its_credits() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("backlog", &TopicConfig::new(2)).await?;
    for _ in 0..20 {
        client
            .produce(
                "backlog",
                None,
                (0..1000).map(|i| Record::value(format!("m{i}"))).collect(),
            )
            .await?;
    }
    let mut c = client
        .subscribe("slow", Some(&config("backlog", GroupType::Shared)), 10)
        .await?;
    for round in 0..30 {
        // Take what the broker sends; it must stop at 10.
        let mut batch = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
            batch.push(d?);
        }
        assert_eq!(
            batch.len(),
            10,
            "round {round}: the broker sent {} with 10 credits",
            batch.len()
        );
        let d = client.describe_group("slow").await?;
        assert_eq!(d.pending, 10);
        for d in &batch {
            c.ack(d).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queue_topic_deletes_messages_once_every_group_acked() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client
        .create_topic(
            "tasks",
            &TopicConfig::new(2).with_retention(Retention::WorkQueue),
        )
        .await?;
    for _ in 0..10 {
        client
            .produce(
                "tasks",
                None,
                (0..100).map(|i| Record::value(format!("t{i}"))).collect(),
            )
            .await?;
    }
    // No group yet: messages wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.describe_topic("tasks").await?.messages, 1000);

    let mut a = client
        .subscribe("a", Some(&config("tasks", GroupType::Shared)), 100)
        .await?;
    let mut b = client
        .subscribe("b", Some(&config("tasks", GroupType::Ordered)), 100)
        .await?;
    drain(&mut a, 1000, Duration::from_secs(10)).await?;
    // One group acked everything, the other nothing: all kept.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.describe_topic("tasks").await?.messages, 1000);
    drain(&mut b, 1000, Duration::from_secs(10)).await?;
    let mut messages = u64::MAX;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        messages = client.describe_topic("tasks").await?.messages;
        if messages == 0 {
            break;
        }
    }
    assert_eq!(messages, 0, "acked messages must be deleted");
    let t = client.describe_topic("tasks").await?;
    assert_eq!(t.bytes, 0);
    for p in &t.partitions {
        assert_eq!(p.earliest_offset, p.next_offset);
    }
    // Fetching below the new head is out of range and says so.
    let err = client
        .fetch("tasks", 0, 0, FetchOptions::default())
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Some(Code::OutOfRange));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_requests_get_clear_statuses_and_change_nothing() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("q", &TopicConfig::new(1)).await?;
    client
        .produce(
            "q",
            None,
            (0..5).map(|i| Record::value(format!("{i}"))).collect(),
        )
        .await?;
    let joined = client
        .join("pullers", Some(&config("q", GroupType::Shared)))
        .await?;
    let member = joined.member_id().to_owned();
    let got = joined.pull(2, Duration::from_secs(1)).await?;
    assert_eq!(got.len(), 2);
    let before = client.describe_group("pullers").await?;
    // Everything but how long members have been idle.
    let settled = |mut d: GroupInfo| {
        for m in &mut d.members {
            m.idle = Duration::ZERO;
        }
        d
    };

    let ack = |acks: Vec<(u32, u64)>| pb::AckRequest {
        group: "pullers".into(),
        member_id: member.clone(),
        acks: acks
            .into_iter()
            .map(|(partition, offset)| pb::DeliveryRef { partition, offset })
            .collect(),
        ..pb::AckRequest::default()
    };
    // Unknown delivery, mixed with a valid one: refused whole.
    let err = raw_ack(&client, ack(vec![(0, 0), (0, 4)]))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(
        err.to_string().contains("offset 4 has no pending delivery"),
        "{err}"
    );
    assert_eq!(
        settled(client.describe_group("pullers").await?),
        settled(before),
        "state changed"
    );
    // Already acked.
    raw_ack(&client, ack(vec![(0, 0)])).await?;
    let err = raw_ack(&client, ack(vec![(0, 0)]))
        .await
        .expect_err("acked twice");
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    // One offset twice in one request, as two refs or as a ref and a range: refused whole
    // (the first of the two was once applied before the second failed).
    let before = client.describe_group("pullers").await?;
    let mut in_range = ack(vec![(0, 1)]);
    in_range.ack_ranges = vec![pb::DeliveryRange {
        partition: 0,
        first_offset: 1,
        last_offset: 1,
    }];
    for twice in [ack(vec![(0, 1), (0, 1)]), in_range] {
        let err = raw_ack(&client, twice).await.expect_err("twice");
        assert_eq!(err.code(), Some(Code::InvalidArgument));
        assert!(
            err.to_string()
                .contains("partition 0 offset 1 is acked twice in one request"),
            "{err}"
        );
    }
    let mut backwards = ack(Vec::new());
    backwards.ack_ranges = vec![pb::DeliveryRange {
        partition: 0,
        first_offset: 1,
        last_offset: 0,
    }];
    let err = raw_ack(&client, backwards).await.expect_err("backwards");
    assert!(
        err.to_string()
            .contains("the first offset must not be after the last"),
        "{err}"
    );
    assert_eq!(
        settled(client.describe_group("pullers").await?),
        settled(before),
        "state changed"
    );
    // Unknown member and unknown group.
    let mut bad = ack(vec![(0, 1)]);
    bad.member_id = "nobody".into();
    assert_eq!(
        raw_ack(&client, bad).await.expect_err("member").code(),
        Some(Code::NotFound)
    );
    assert_eq!(
        client
            .describe_group("nope")
            .await
            .expect_err("group")
            .code(),
        Some(Code::NotFound)
    );
    let pull_elsewhere = client
        .raw()
        .consumer
        .pull(pb::PullRequest {
            group: "nope".into(),
            member_id: member.clone(),
            max_messages: 1,
            max_wait_ms: 0,
        })
        .await
        .expect_err("group");
    assert_eq!(pull_elsewhere.code(), Code::NotFound);
    // Joining with another type than the group has.
    let err = client
        .join("pullers", Some(&config("q", GroupType::Ordered)))
        .await
        .expect_err("type");
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("as Shared"), "{err}");
    // Zero credits on a push stream: an error on the stream, the stream goes on.
    let mut c = client
        .subscribe("pushers", Some(&config("q", GroupType::Shared)), 1)
        .await?;
    c.grant(0).await?;
    let mut saw_error = false;
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(2), c.next()).await {
            Ok(Some(Err(e))) => {
                assert_eq!(e.code(), Some(Code::InvalidArgument));
                assert!(e.to_string().contains("credits must be at least 1"));
                saw_error = true;
            }
            Ok(Some(Ok(d))) => c.ack(&d).await?,
            _ => break,
        }
    }
    assert!(saw_error, "credits 0 was not refused");
    // The pull group is as it was apart from the one valid ack.
    let after = client.describe_group("pullers").await?;
    assert_eq!(after.partitions[0].committed_offset, 1);
    assert_eq!(after.pending, 1);
    // One range acks the rest once every offset in it is delivered to this member.
    let mut rest = ack(Vec::new());
    rest.ack_ranges = vec![pb::DeliveryRange {
        partition: 0,
        first_offset: 1,
        last_offset: 4,
    }];
    let err = raw_ack(&client, rest.clone())
        .await
        .expect_err("2..=4 not delivered");
    assert!(
        err.to_string().contains("offset 2 has no pending delivery"),
        "{err}"
    );
    assert_eq!(joined.pull(3, Duration::from_secs(1)).await?.len(), 3);
    raw_ack(&client, rest).await?;
    let after = client.describe_group("pullers").await?;
    assert_eq!(
        (
            after.partitions[0].committed_offset,
            after.pending,
            after.lag
        ),
        (5, 0, 0)
    );
    // Bad settings.
    let mut bad = config("q", GroupType::Shared);
    bad.ack_wait = Some(Duration::from_millis(5));
    let err = client.create_group("g2", &bad).await.expect_err("ack wait");
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    let err = client
        .create_group("g3", &config("missing-topic", GroupType::Shared))
        .await
        .expect_err("topic");
    assert_eq!(err.code(), Some(Code::NotFound));
    assert_eq!(client.list_groups(None).await?.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_start_at_latest_or_a_timestamp_and_can_be_reset() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("clock", &TopicConfig::new(1)).await?;
    let records = (0..10)
        .map(|i| Record {
            value: format!("t{i}").into(),
            timestamp: Some(UNIX_EPOCH + Duration::from_millis(1_000_000 + i * 1000)),
            ..Record::default()
        })
        .collect();
    client.produce("clock", None, records).await?;
    let mut late = config("clock", GroupType::Shared);
    late.start = StartFrom::Latest;
    let m = client.join("late", Some(&late)).await?;
    assert!(
        m.pull(10, Duration::from_millis(200)).await?.is_empty(),
        "latest skips the past"
    );
    client
        .produce("clock", None, vec![Record::value("now")])
        .await?;
    let got = m.pull(10, Duration::from_secs(2)).await?;
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), vec!["now"]);

    let to = |ms: u64| StartFrom::Time(UNIX_EPOCH + Duration::from_millis(ms));
    // Between two records: the first at or after the time.
    let reset = client.reset_group("late", to(1_004_500)).await?;
    assert_eq!(reset.partitions[0].committed_offset, 5);
    let got = m.pull(100, Duration::from_secs(1)).await?;
    let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
    assert_eq!(offsets, vec![5, 6, 7, 8, 9, 10]);
    client.reset_group("late", StartFrom::Earliest).await?;
    assert_eq!(m.pull(100, Duration::from_secs(1)).await?.len(), 11);
    // A time after every record: the next offset.
    let reset = client
        .reset_group("late", to(i64::MAX.unsigned_abs()))
        .await?;
    assert_eq!(reset.partitions[0].committed_offset, 11);
    Ok(())
}

#[test]
fn cli_group_consumer_reads_a_loghub_file_and_commits_it() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let input = loghub("Apache_2k.log");
    assert!(
        broker
            .weir(&["topic", "create", "web", "--partitions", "3"], b"")?
            .status
            .success()
    );
    assert!(
        broker
            .weir(&["produce", "web", "--key", "apache"], &input)?
            .status
            .success()
    );
    let n = lines(&input).len().to_string();
    let out = broker.weir(
        &[
            "consume",
            "web",
            "--group",
            "shippers",
            "--max-messages",
            &n,
            "--idle-timeout",
            "10s",
        ],
        b"",
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = input.clone();
    want.push(b'\n');
    assert!(
        out.stdout == want,
        "group consumer output differs from the input"
    );
    let out = broker.weir(&["--output", "json", "group", "describe", "shippers"], b"")?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("\"lag\":0") && text.contains("\"pending\":0"),
        "{text}"
    );
    // Nothing left for the group.
    let out = broker.weir(
        &[
            "consume",
            "web",
            "--group",
            "shippers",
            "--idle-timeout",
            "1s",
        ],
        b"",
    )?;
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_pull_deliveries_come_back_after_ack_wait() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("mail", &TopicConfig::new(2)).await?;
    client
        .produce(
            "mail",
            None,
            (0..6).map(|i| Record::value(format!("mail-{i}"))).collect(),
        )
        .await?;
    let mut create = config("mail", GroupType::Shared);
    create.ack_wait = Some(Duration::from_millis(800));
    create.session_timeout = Some(Duration::from_secs(60));
    // A pull member that takes everything and then goes silent (a hung process).
    let silent = client.join("mailers", Some(&create)).await?;
    let taken = silent.pull(10, Duration::from_secs(1)).await?;
    assert_eq!(taken.len(), 6);
    let other = client.join("mailers", Some(&create)).await?;
    assert!(
        other.pull(10, Duration::from_millis(300)).await?.is_empty(),
        "still held"
    );
    let mut again = Vec::new();
    while again.len() < 6 {
        let got = other.pull(10, Duration::from_secs(3)).await?;
        assert!(!got.is_empty(), "ack wait passed without redelivery");
        again.extend(got);
    }
    assert!(again.iter().all(|d| d.delivery_count == 2));
    // The silent member's late ack is refused: the delivery is no longer its.
    assert_eq!(
        silent.ack(&taken[..1]).await.expect_err("late").code(),
        Some(Code::FailedPrecondition)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_misses_its_session_timeout_loses_its_partitions() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("feed", &TopicConfig::new(4)).await?;
    let mut create = config("feed", GroupType::Ordered);
    create.session_timeout = Some(Duration::from_secs(1));
    let quiet = client.join("readers", Some(&create)).await?;
    assert_eq!(quiet.partitions().len(), 4);
    let mut busy = client.subscribe("readers", Some(&create), 10).await?;
    // busy keeps its stream open; quiet stops calling and is removed after ~1 s.
    let mut owned = Vec::new();
    for _ in 0..40 {
        let d = client.describe_group("readers").await?;
        owned = d.members.iter().map(|m| m.partitions.len()).collect();
        if owned == vec![4] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        owned,
        vec![4],
        "busy owns every partition after quiet timed out"
    );
    assert_eq!(
        quiet
            .pull(1, Duration::ZERO)
            .await
            .expect_err("gone")
            .code(),
        Some(Code::NotFound)
    );
    client
        .produce("feed", None, vec![Record::value("hello")])
        .await?;
    let got = drain(&mut busy, 1, Duration::from_secs(5)).await?;
    assert_eq!(text(&got[0]), "hello");
    // Settings that may change do; topic and type may not.
    let mut changed = config("feed", GroupType::Ordered);
    changed.session_timeout = Some(Duration::from_secs(2));
    let updated = client.update_group("readers", &changed).await?;
    assert_eq!(updated.config.session_timeout, Some(Duration::from_secs(2)));
    let err = client
        .update_group("readers", &config("feed", GroupType::Shared))
        .await
        .expect_err("type is immutable");
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    Ok(())
}

/// A push member with no credits left still hears at once that it lost a partition: the
/// assignment does not wait for its next grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_member_without_credits_is_told_its_new_assignment() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("orders", &TopicConfig::new(2)).await?;
    for p in 0..2 {
        client
            .produce("orders", Some(p), vec![Record::value(format!("p{p}"))])
            .await?;
    }
    let group = config("orders", GroupType::Ordered);
    let mut a = client.subscribe("pickers", Some(&group), 1).await?;
    assert_eq!(a.partitions(), [0, 1]);
    // One delivery uses a's only credit; it keeps it unacked.
    let held = tokio::time::timeout(Duration::from_secs(5), a.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
    let generation = a.generation();
    let _b = client.subscribe("pickers", Some(&group), 1).await?;
    // a reads its stream (no delivery can come: no credits) and sees the new assignment.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while a.generation() == generation && std::time::Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(200), a.next()).await;
    }
    assert!(a.generation() > generation, "no assignment reached a");
    assert_eq!(a.partitions().len(), 1, "{:?}", a.partitions());
    a.ack(&held).await?;
    Ok(())
}

/// Values that mean nothing or overflow are refused with the allowed range, and change
/// nothing: a nack delay past a day, `max_deliveries` on an Ordered group, a reset that does
/// not say where to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meaningless_or_absurd_group_values_are_refused() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("q", &TopicConfig::new(1)).await?;
    client.produce("q", None, vec![Record::value("x")]).await?;
    let member = client
        .join("pullers", Some(&config("q", GroupType::Shared)))
        .await?;
    let got = member.pull(1, Duration::from_secs(1)).await?;
    let err = member
        .nack(&got[0], Duration::from_secs(50 * 86_400), "later")
        .await
        .expect_err("50 days");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(
        err.to_string().contains("at most 86400000 (1 day)"),
        "{err}"
    );
    assert_eq!(
        client.describe_group("pullers").await?.pending,
        1,
        "still pending"
    );

    let mut ordered = config("q", GroupType::Ordered);
    ordered.max_deliveries = Some(3);
    let err = client
        .create_group("ordered", &ordered)
        .await
        .expect_err("max_deliveries on Ordered");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("Shared groups only"), "{err}");

    let err = client
        .raw()
        .admin
        .reset_group(pb::ResetGroupRequest {
            name: "pullers".into(),
            to: None,
        })
        .await
        .expect_err("no target");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("has no target"), "{err}");
    assert_eq!(
        client.describe_group("pullers").await?.pending,
        1,
        "not reset"
    );
    Ok(())
}

/// The README's promise for a process crash: acks are stored within ~100 ms, so acks older
/// than that survive a SIGKILL and are not redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_older_than_a_tick_survive_sigkill() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_in(dir.path())?;
    let client = broker.client().await?;
    client.create_topic("jobs", &TopicConfig::new(2)).await?;
    client
        .produce(
            "jobs",
            None,
            (0..200)
                .map(|i| Record::keyed(format!("k{i}"), "x"))
                .collect(),
        )
        .await?;
    let member = client
        .join("workers", Some(&config("jobs", GroupType::Shared)))
        .await?;
    let mut acked = 0;
    while acked < 150 {
        let got = member.pull(150 - acked, Duration::from_secs(1)).await?;
        member.ack(&got).await?;
        acked += got.len() as u32;
    }
    // Two ticks, then the process dies without a chance to persist anything more.
    tokio::time::sleep(Duration::from_millis(250)).await;
    broker.kill();
    broker.restart()?;
    let client = broker.client().await?;
    let group = client.describe_group("workers").await?;
    assert_eq!(
        group.lag, 50,
        "every ack older than a tick survived SIGKILL"
    );
    Ok(())
}
