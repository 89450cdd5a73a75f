//! Consumer groups across a cluster of three brokers (`docs/cluster.md`, "Groups across the
//! cluster"): a group lives on its coordinator, its members join through any broker, an
//! Ordered group's partitions have one owner cluster-wide, a Shared group's members draw
//! from every partition, and a work-queue topic's records are deleted at each partition's
//! leader once the group coordinated elsewhere acked them.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use weir_client::{
    Client, Delivery, GroupConfig, GroupType, PullMember, Record, Retention, TopicConfig,
};
use weir_tests::Broker;

/// Lines of a Loghub sample, as records keyed by the file's name.
fn lines(file: &str) -> Vec<String> {
    String::from_utf8_lossy(&weir_tests::loghub(file))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Pulls and acks through `member` until `want` deliveries arrived or 60 s passed.
async fn drain(member: &PullMember, want: usize) -> anyhow::Result<Vec<Delivery>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want && Instant::now() < deadline {
        let batch = member.pull(500, Duration::from_millis(500)).await?;
        if !batch.is_empty() {
            member.ack(&batch).await?;
            got.extend(batch);
        }
    }
    Ok(got)
}

/// Pulls and acks through `member` until three pulls in a row (500 ms each) find nothing.
async fn drain_until_idle(member: &PullMember) -> anyhow::Result<Vec<Delivery>> {
    drain_until(member, 500, 3).await
}

/// Pulls (at most `max` at a time) and acks through `member` until `idle` pulls in a row
/// (500 ms each) find nothing.
async fn drain_until(
    member: &PullMember,
    max: u32,
    idle_pulls: u32,
) -> anyhow::Result<Vec<Delivery>> {
    let mut got = Vec::new();
    let mut idle = 0;
    while idle < idle_pulls {
        let batch = member.pull(max, Duration::from_millis(500)).await?;
        if batch.is_empty() {
            idle += 1;
            continue;
        }
        idle = 0;
        member.ack(&batch).await?;
        got.extend(batch);
    }
    Ok(got)
}

/// The broker ids that lead the partitions of `topic`, by partition.
async fn leaders(client: &Client, topic: &str) -> anyhow::Result<Vec<u64>> {
    let mut parts: Vec<(u32, u64)> = client
        .metadata()
        .await?
        .partitions
        .iter()
        .filter(|p| p.topic == topic)
        .map(|p| (p.partition, p.leader))
        .collect();
    parts.sort_unstable();
    Ok(parts.into_iter().map(|(_, l)| l).collect())
}

/// A Shared group with one member on each broker, pulling at the same time, gets each of
/// the `total` records of `logs` exactly once.
async fn shared_members_on_every_broker_get_each_line_once(
    brokers: &[Broker],
    total: usize,
) -> anyhow::Result<()> {
    let admin = brokers[0].client_through().await?;
    let config = GroupConfig::new("logs", GroupType::Shared);
    let mut members = Vec::new();
    for b in brokers {
        members.push(
            b.client_through()
                .await?
                .join("everyone", Some(&config))
                .await?,
        );
    }
    let described = admin.describe_group("everyone").await?;
    assert_eq!(
        described.members.len(),
        3,
        "members cluster-wide: {described:?}"
    );
    // Small pulls, so every member gets some of the work.
    let pulls = members.iter().map(|m| drain_until(m, 100, 6));
    let results = futures::future::try_join_all(pulls).await?;
    let mut seen = BTreeSet::new();
    let mut lines_seen = 0;
    for (i, got) in results.iter().enumerate() {
        assert!(!got.is_empty(), "member on broker {i} got deliveries");
        for d in got {
            assert!(
                seen.insert((d.partition, d.offset)),
                "partition {} offset {} delivered twice",
                d.partition,
                d.offset
            );
            lines_seen += 1;
        }
    }
    assert_eq!(lines_seen, total, "every line exactly once");
    let described = brokers[1]
        .client()
        .await?
        .describe_group("everyone")
        .await?;
    assert_eq!((described.lag, described.pending), (0, 0), "{described:?}");
    Ok(())
}

/// Acceptance 1 (groups): a 6-partition topic created through broker 0, two Loghub files
/// produced through broker 1 only (one key per file), read back complete and in order per
/// key by an Ordered group through broker 2 only; a Shared group with one member on each
/// broker gets every line exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_read_every_partition_through_any_broker() -> anyhow::Result<()> {
    let brokers = Broker::start_cluster(3, &[])?;
    let admin = brokers[0].client_through().await?;
    admin.create_topic("logs", &TopicConfig::new(6)).await?;
    let leader_of = leaders(&admin, "logs").await?;
    assert_eq!(
        leader_of.iter().collect::<BTreeSet<_>>().len(),
        3,
        "partitions spread over the brokers: {leader_of:?}"
    );

    let files = ["Apache_2k.log", "Zookeeper_2k.log"];
    let producer = brokers[1].client_through().await?;
    let mut total = 0;
    for file in files {
        let all = lines(file);
        total += all.len();
        for chunk in all.chunks(250) {
            producer
                .produce(
                    "logs",
                    None,
                    chunk
                        .iter()
                        .map(|l| Record::keyed(file, l.clone()))
                        .collect(),
                )
                .await?;
        }
    }

    // A new group's first description counts the records of every partition, also those
    // its coordinator reads from other brokers (it reported 0 for them before).
    let counted = admin
        .create_group("counted", &GroupConfig::new("logs", GroupType::Shared))
        .await?;
    assert_eq!(counted.lag, total as u64, "{counted:?}");
    admin.delete_group("counted").await?;

    // Ordered, through broker 2 only.
    let reader = brokers[2].client_through().await?;
    let ordered = reader
        .join(
            "by-key",
            Some(&GroupConfig::new("logs", GroupType::Ordered)),
        )
        .await?;
    let got = drain(&ordered, total).await?;
    if got.len() != total {
        for b in &brokers {
            eprintln!("{}", b.log_text());
        }
    }
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in &got {
        let key = String::from_utf8_lossy(d.record.key.as_deref().unwrap_or_default()).into_owned();
        by_key
            .entry(key)
            .or_default()
            .push(d.record.text().into_owned());
    }
    for file in files {
        assert_eq!(
            by_key.get(file).map(Vec::len),
            Some(lines(file).len()),
            "every line of {file}"
        );
        assert!(
            by_key.get(file) == Some(&lines(file)),
            "the lines of {file} in order"
        );
    }
    assert_eq!(got.len(), total, "nothing twice");
    let described = reader.describe_group("by-key").await?;
    assert_eq!(described.lag, 0, "{described:?}");
    assert_eq!(described.members.len(), 1, "{described:?}");

    shared_members_on_every_broker_get_each_line_once(&brokers, total).await?;
    // Group calls through brokers that do not coordinate were forwarded; the metadata
    // group's figures are there on every broker.
    let mut forwarded = 0.0;
    let mut leading = 0.0;
    for b in &brokers {
        forwarded += b.metric("weir_forwarded_requests_total")?;
        leading += b.metric("weir_metadata_leader")?;
        assert!(b.metric("weir_metadata_commits_total")? > 0.0);
        assert!(b.metric("weir_metadata_leader_changes_total")? >= 1.0);
        assert!(b.metric("weir_metadata_term")? >= 1.0);
    }
    assert!(forwarded > 0.0, "group calls were forwarded");
    assert!((leading - 1.0).abs() < f64::EPSILON, "one controller");
    let listed = brokers[2].client_through().await?.list_groups(None).await?;
    let names: Vec<&str> = listed.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        ["by-key", "everyone"],
        "every group, through any broker"
    );
    Ok(())
}

/// Acceptance 2: an Ordered group with 3 members on 3 brokers: each partition has exactly
/// one owner cluster-wide; a member leaves, its partitions move; nothing lost or delivered
/// to two owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_group_has_one_owner_per_partition_cluster_wide() -> anyhow::Result<()> {
    let brokers = Broker::start_cluster(3, &[])?;
    let admin = brokers[0].client_through().await?;
    admin.create_topic("orders", &TopicConfig::new(6)).await?;
    for p in 0..6u32 {
        admin
            .produce(
                "orders",
                Some(p),
                (0..50).map(|i| Record::value(format!("{p}/{i}"))).collect(),
            )
            .await?;
    }
    let config = GroupConfig::new("orders", GroupType::Ordered);
    let mut members = Vec::new();
    for b in &brokers {
        members.push(
            b.client_through()
                .await?
                .join("owners", Some(&config))
                .await?,
        );
    }
    for m in &mut members {
        m.heartbeat().await?;
    }
    let assigned: Vec<Vec<u32>> = members.iter().map(|m| m.partitions().to_vec()).collect();
    let mut all: Vec<u32> = assigned.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..6).collect::<Vec<_>>(),
        "one owner each: {assigned:?}"
    );
    assert!(
        assigned.iter().all(|a| a.len() == 2),
        "spread evenly over members of different brokers: {assigned:?}"
    );

    // Each member takes some of its partitions' records: only from partitions it owns.
    let mut owner_of: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    for (i, m) in members.iter().enumerate() {
        let batch = m.pull(30, Duration::from_secs(2)).await?;
        assert!(!batch.is_empty(), "member {i} got deliveries");
        for d in &batch {
            assert!(
                assigned[i].contains(&d.partition),
                "member {i} got partition {} it does not own",
                d.partition
            );
            assert!(owner_of.insert((d.partition, d.offset), i).is_none());
        }
        m.ack(&batch).await?;
    }

    // The member on broker 2 leaves: its partitions move to the others.
    let leaving = members
        .pop()
        .ok_or_else(|| anyhow::anyhow!("three members"))?;
    leaving.leave().await?;
    for m in &mut members {
        m.heartbeat().await?;
    }
    let moved: Vec<u32> = members
        .iter()
        .flat_map(|m| m.partitions().to_vec())
        .collect();
    let mut moved_sorted = moved.clone();
    moved_sorted.sort_unstable();
    assert_eq!(moved_sorted, (0..6).collect::<Vec<_>>(), "{moved:?}");
    for (i, m) in members.iter().enumerate() {
        let partitions = m.partitions().to_vec();
        let got = drain_until_idle(m).await?;
        for d in got {
            assert!(
                partitions.contains(&d.partition),
                "member {i} got partition {} it does not own",
                d.partition
            );
            assert!(
                owner_of.insert((d.partition, d.offset), i).is_none(),
                "partition {} offset {} delivered to two owners",
                d.partition,
                d.offset
            );
        }
    }
    assert_eq!(owner_of.len(), 300, "every record delivered once");
    let described = admin.describe_group("owners").await?;
    assert_eq!(described.lag, 0, "{described:?}");
    Ok(())
}

/// A work-queue topic whose partitions three brokers lead: records acked by a group
/// coordinated on one broker are deleted on every leader; nothing unacked is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_queue_is_emptied_on_every_leader() -> anyhow::Result<()> {
    let brokers = Broker::start_cluster(3, &[])?;
    let admin = brokers[0].client_through().await?;
    admin
        .create_topic(
            "jobs",
            &TopicConfig::new(3).with_retention(Retention::WorkQueue),
        )
        .await?;
    for p in 0..3u32 {
        admin
            .produce(
                "jobs",
                Some(p),
                (0..20).map(|i| Record::value(format!("{p}/{i}"))).collect(),
            )
            .await?;
    }
    let member = brokers[1]
        .client()
        .await?
        .join(
            "workers",
            Some(&GroupConfig::new("jobs", GroupType::Shared)),
        )
        .await?;
    let got = drain(&member, 60).await?;
    assert_eq!(got.len(), 60);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = admin.describe_topic("jobs").await?;
        if t.messages == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acked records still stored after 20 s: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Unacked records stay.
    admin
        .produce("jobs", Some(2), vec![Record::value("later")])
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(admin.describe_topic("jobs").await?.messages, 1);
    Ok(())
}

/// A group reading at the end of a partition another broker leads gets each new record
/// with one fetch at the leader: the coordinator's long-polling fetch brings the records,
/// and the group's read of them is answered from it (`cluster/remote.rs`), not by a
/// second fetch (two per record before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_at_the_end_of_a_partition_led_elsewhere_reads_each_record_with_one_fetch()
-> anyhow::Result<()> {
    let brokers = Broker::start_cluster(3, &[])?;
    let admin = brokers[0].client_through().await?;
    admin.create_topic("tail", &TopicConfig::new(3)).await?;
    // Right after the creation: a broker asked for a partition's start offset answers once
    // it has applied the topic too (no NOT_FOUND; the test below makes it deterministic).
    let member = admin
        .join(
            "readers",
            Some(&GroupConfig::new("tail", GroupType::Shared)),
        )
        .await?;
    let coordinator = admin
        .metadata()
        .await?
        .groups
        .iter()
        .find(|g| g.group == "readers")
        .map(|g| g.coordinator)
        .ok_or_else(|| anyhow::anyhow!("the group has no coordinator"))?;
    let leader_of = leaders(&admin, "tail").await?;
    let (partition, leader) = leader_of
        .iter()
        .enumerate()
        .find(|(_, l)| **l != coordinator)
        .map(|(p, l)| (u32::try_from(p).unwrap_or(0), *l))
        .ok_or_else(|| anyhow::anyhow!("every partition is led by the coordinator"))?;
    let leader = &brokers[usize::try_from(leader)?];
    let producer = brokers[0].client().await?;
    // One record, read and acked, until the group reads at the end.
    let produce_one = async |i: usize| -> anyhow::Result<()> {
        producer
            .produce(
                "tail",
                Some(partition),
                vec![Record::value(format!("record {i}"))],
            )
            .await?;
        let got = drain(&member, 1).await?;
        assert_eq!(got.len(), 1, "record {i} delivered");
        assert_eq!(got[0].record.text(), format!("record {i}"));
        Ok(())
    };
    for i in 0..5 {
        produce_one(i).await?;
    }
    let before = leader.metric("weir_fetch_requests_total")?;
    let records = 30;
    for i in 5..5 + records {
        produce_one(i).await?;
    }
    let fetches = leader.metric("weir_fetch_requests_total")? - before;
    assert!(
        fetches <= f64::from(records as u32) + 3.0,
        "{fetches} fetches at the leader of partition {partition} for {records} records \
         produced one at a time, each read before the next (one each expected)"
    );
    assert!(
        fetches >= f64::from(records as u32) - 1.0,
        "{fetches} fetches: the leader served the reads"
    );
    Ok(())
}

/// Groups joined right after their replicated topic was created: the coordinator
/// partition has no leader until its first election, so the broker refuses the join
/// (`UNAVAILABLE`, nothing created), and the client tries again until it has one, as
/// Kafka's consumers retry `COORDINATOR_NOT_AVAILABLE` (callers used to loop themselves).
/// Both members then receive a record produced after they joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_joined_right_after_a_replicated_topic_was_created_wait_for_its_leaders()
-> anyhow::Result<()> {
    let brokers = Broker::start_cluster(3, &[])?;
    let client = brokers[0].client().await?;
    client
        .create_topic("fresh", &TopicConfig::new(2).with_replication_factor(3))
        .await?;
    let started = Instant::now();
    let shared = GroupConfig::new("fresh", GroupType::Shared);
    let mut pushed = client.subscribe("fresh-push", Some(&shared), 16).await?;
    let pulled = client.join("fresh-pull", Some(&shared)).await?;
    println!(
        "both groups joined {:?} after the topic was created",
        started.elapsed()
    );
    client
        .produce("fresh", Some(0), vec![Record::value("after the joins")])
        .await?;
    let d = tokio::time::timeout(Duration::from_secs(30), pushed.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the push member's stream ended"))??;
    assert_eq!(d.record.text(), "after the joins");
    pushed.ack(&d).await?;
    let got = drain(&pulled, 1).await?;
    assert_eq!(got.len(), 1, "the pull member got the record");
    assert_eq!(got[0].record.text(), "after the joins");
    Ok(())
}

/// A group created right after its topic, while a broker leading some of the topic's
/// partitions has not applied the topic's creation yet (paused while it was created): the
/// coordinator asks that broker for its partitions' start offsets, and the broker answers
/// once it has applied the metadata as far as the coordinator had (the call carries the
/// coordinator's metadata index). It used to answer `NOT_FOUND` (seen in CI as `group
/// "readers": topic "tail" does not exist` for a group joined right after its topic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_created_while_a_partition_leader_is_behind_on_metadata_starts_there()
-> anyhow::Result<()> {
    let brokers = Broker::start_cluster(3, &[])?;
    let admin = brokers[0].client_through().await?;
    let m = admin.metadata().await?;
    let leader = m
        .metadata_leader
        .ok_or_else(|| anyhow::anyhow!("no metadata leader"))?;
    let behind = usize::try_from((leader + 1) % 3)?;
    let through = brokers[usize::try_from(leader)?].client_through().await?;
    brokers[behind].signal("STOP")?;
    let created = through.create_topic("behind", &TopicConfig::new(3)).await;
    brokers[behind].signal("CONT")?;
    created?;
    let led_by = leaders(&through, "behind").await?;
    assert!(
        led_by.contains(&(behind as u64)),
        "no partition led by broker {behind}: {led_by:?}"
    );
    // A group coordinated by another broker (the partition its name hashes to is led
    // elsewhere), which then asks the broker behind for its partitions' offsets.
    let group = (0..100)
        .map(|i| format!("starters-{i}"))
        .find(|g| {
            let p = weir_broker::log::partitioner::partition_for_key(g.as_bytes(), 3);
            led_by.get(p as usize) != Some(&(behind as u64))
        })
        .ok_or_else(|| anyhow::anyhow!("no group name coordinated away from {behind}"))?;
    let member = through
        .join(&group, Some(&GroupConfig::new("behind", GroupType::Shared)))
        .await?;
    through
        .produce("behind", Some(0), vec![Record::value("first")])
        .await?;
    let got = drain(&member, 1).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].record.text(), "first");
    Ok(())
}

/// A call naming only a group (describe), sent to a broker that was paused while the group
/// was created through another: the broker catches up with the metadata leader before it
/// routes the call, so it finds the group; a group that was never created is answered
/// NOT_FOUND once the broker has seen everything the leader had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_created_while_a_broker_was_paused_is_found_through_it() -> anyhow::Result<()> {
    let brokers = Broker::start_cluster(3, &[])?;
    let admin = brokers[0].client_through().await?;
    admin.create_topic("paused", &TopicConfig::new(1)).await?;
    let leader = admin
        .metadata()
        .await?
        .metadata_leader
        .ok_or_else(|| anyhow::anyhow!("no metadata leader"))?;
    let through = brokers[usize::try_from(leader)?].client_through().await?;
    // Paused: a broker that neither leads the metadata nor the topic's partition (which
    // coordinates the group and is asked for its start offset), so the group is created
    // without it and it only has to learn of it.
    let partition_leader = leaders(&through, "paused").await?[0];
    let behind = (0..3u64)
        .find(|&b| b != leader && b != partition_leader)
        .ok_or_else(|| anyhow::anyhow!("no third broker"))?;
    let behind = usize::try_from(behind)?;
    let group = "late";
    brokers[behind].signal("STOP")?;
    let created = through
        .create_group(group, &GroupConfig::new("paused", GroupType::Shared))
        .await;
    brokers[behind].signal("CONT")?;
    created?;
    let there = brokers[behind].client_through().await?;
    let described = there.describe_group(group).await?;
    assert_eq!(described.config.topic, "paused");
    let missing = there
        .describe_group("never-made")
        .await
        .expect_err("a group that was never created");
    assert_eq!(missing.code(), Some(tonic::Code::NotFound), "{missing}");
    Ok(())
}
