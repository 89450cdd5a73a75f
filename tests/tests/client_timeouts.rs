//! A broker that stops answering without closing its connections (a paused process, a
//! network that drops packets) costs the client a request timeout, not a call that never
//! returns: calls fail with `Error::Timeout` once the request timeout (plus a long-poll's
//! wait) has passed, a producer's retries across them store its records once, and a
//! connection whose keepalive PINGs go unanswered is closed, so a client given a bootstrap
//! list moves to another broker.

use std::time::{Duration, Instant};

use weir_client::{Client, Error, FetchOptions, Record, RetryPolicy, TopicConfig};
use weir_tests::{Broker, toxiproxy::Toxiproxy};

/// Longest any step here may take before the test calls the call hung.
const HUNG: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, step: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(HUNG, step)
        .await
        .map_err(|_| anyhow::anyhow!("{what} did not return within {HUNG:?}"))
}

/// Connections through proxy `name` stay open and pass nothing from then on (toxiproxy's
/// `timeout` toxic with no timeout), as when a network drops a broker's packets.
fn silence(proxy: &Toxiproxy, name: &str) -> anyhow::Result<()> {
    proxy.add_toxic(
        name,
        "blackhole",
        "timeout",
        &serde_json::json!({ "timeout": 0 }),
    )
}

fn assert_timeout(what: &str, answer: Result<impl std::fmt::Debug, Error>, url: &str, ms: u64) {
    match answer {
        Err(Error::Timeout { url: u, after_ms }) => {
            assert!(
                url.ends_with(&u) || u.ends_with(url),
                "{what}: {u} is not {url}"
            );
            assert_eq!(after_ms, ms, "{what}");
        }
        other => panic!("{what}: expected a timeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_a_paused_broker_time_out_and_a_retried_produce_is_stored_once()
-> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker
        .client()
        .await?
        .with_request_timeout(Duration::from_secs(1));
    client.create_topic("paused", &TopicConfig::new(1)).await?;
    client
        .produce("paused", Some(0), vec![Record::value("before")])
        .await?;
    let mut producer = client.producer(RetryPolicy {
        attempts: 2,
        backoff: Duration::ZERO,
    });

    broker.signal("STOP")?;
    let listed = within("list_topics", client.list_topics()).await?;
    assert_timeout("list_topics", listed, &broker.addr, 1000);
    // A long-poll's wait comes on top of the request timeout.
    let started = Instant::now();
    let options = FetchOptions {
        max_wait: Duration::from_secs(2),
        ..FetchOptions::default()
    };
    let fetched = within("fetch", client.fetch("paused", 0, 1, options)).await?;
    assert_timeout("fetch", fetched, &broker.addr, 3000);
    assert!(started.elapsed() >= Duration::from_secs(3));
    // Both attempts go out and time out; the records are in the paused broker's socket.
    let records = vec![Record::value("during")];
    let sent = within("produce", producer.send("paused", Some(0), records.clone())).await?;
    assert_timeout("produce", sent, &broker.addr, 1000);
    broker.signal("CONT")?;

    // Sent again with the same sequence: stored once, whatever the timed-out attempts did.
    let acks = within("produce", producer.send("paused", Some(0), records)).await??;
    assert_eq!(acks[0].base_offset, 1);
    let fetched = client
        .fetch("paused", 0, 0, FetchOptions::default())
        .await?;
    let values: Vec<String> = fetched
        .records
        .iter()
        .map(|r| r.record.text().into_owned())
        .collect();
    assert_eq!(values, ["before", "during"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaves_a_broker_whose_connection_went_silent_for_the_next_of_its_list()
-> anyhow::Result<()> {
    let proxy = Toxiproxy::start()?;
    let brokers = Broker::start_cluster_behind(&proxy, 3, &[])?;
    let list = brokers
        .iter()
        .map(Broker::advertised_url)
        .collect::<Vec<_>>()
        .join(",");
    let client = Client::connect(&list)
        .await?
        .without_routing()
        .with_request_timeout(Duration::from_secs(2));
    client.create_topic("silent", &TopicConfig::new(1)).await?;

    // Broker 0's connections stay open and pass nothing (its packets dropped), for good.
    silence(&proxy, "broker-0")?;
    let started = Instant::now();
    let mut timeouts = 0;
    let mut last_error = None;
    loop {
        match within("list_topics", client.list_topics()).await? {
            Ok(topics) => {
                assert!(topics.iter().any(|t| t.name == "silent"));
                break;
            }
            Err(Error::Timeout { .. }) => timeouts += 1,
            // The connection closed by its keepalive fails the calls on it.
            Err(e) if e.is_retriable() => last_error = Some(e),
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(45),
            "no other broker answered within 45 s of broker 0 going silent ({timeouts} timeouts, last other error: {last_error:?})"
        );
    }
    eprintln!(
        "left broker 0 after {:?} and {timeouts} timeouts",
        started.elapsed()
    );
    assert!(
        timeouts >= 1,
        "the first call went to broker 0 and timed out"
    );
    Ok(())
}

/// A listing asks the leaders of other partitions for their figures; one whose connection
/// went silent costs the listing a bounded wait, not the caller's request timeout (broker 1
/// waited for broker 0's answer for as long as the call lived, so after a client left a
/// silent broker 0 its listings at broker 1 timed out too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_answers_without_the_figures_of_a_leader_gone_silent() -> anyhow::Result<()> {
    let proxy = Toxiproxy::start()?;
    let brokers = Broker::start_cluster_behind(&proxy, 3, &[])?;
    let client = Client::connect(&brokers[1].advertised_url())
        .await?
        .without_routing()
        .with_request_timeout(Duration::from_secs(5));
    client.create_topic("figures", &TopicConfig::new(3)).await?;
    let metadata = client.metadata().await?;
    anyhow::ensure!(
        metadata
            .partitions
            .iter()
            .any(|p| p.topic == "figures" && p.leader == 0),
        "no partition of the topic is led by broker 0: {:?}",
        metadata.partitions
    );

    silence(&proxy, "broker-0")?;
    let started = Instant::now();
    let topics = within("list_topics", client.list_topics()).await??;
    let listed = topics
        .iter()
        .find(|t| t.name == "figures")
        .ok_or_else(|| anyhow::anyhow!("the topic is not listed: {topics:?}"))?;
    assert_eq!(listed.partitions.len(), 3);
    let described = within("describe_topic", client.describe_topic("figures")).await??;
    assert_eq!(described.partitions.len(), 3);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "two calls took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Calls a client gave up on while the broker was paused do not cost its connection: each
/// cancelled call resets its stream, and on waking the broker reads them all at once. h2's
/// guard against the rapid-reset attack closed a connection after 20 such resets (with every
/// other call on it, as Raft peers' connections were closed after a pause); the broker allows
/// as many as a connection may have streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cancelled_while_the_broker_was_paused_do_not_close_the_connection()
-> anyhow::Result<()> {
    use weir_client::pb::{
        FetchRequest, ListTopicsRequest, admin_client::AdminClient, consumer_client::ConsumerClient,
    };
    let broker = Broker::start()?;
    broker
        .client()
        .await?
        .create_topic("quiet", &TopicConfig::new(1))
        .await?;
    let channel = tonic::transport::Endpoint::from_shared(broker.url())?
        .connect()
        .await?;
    // A long poll in flight on the connection the whole time.
    let mut consumer = ConsumerClient::new(channel.clone());
    let poll = tokio::spawn(async move {
        consumer
            .fetch(FetchRequest {
                topic: "quiet".into(),
                partition: 0,
                offset: 0,
                max_wait_ms: 6000,
                ..FetchRequest::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    broker.signal("STOP")?;
    let cancelled: Vec<_> = (0..200)
        .map(|_| {
            let mut admin = AdminClient::new(channel.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(
                    Duration::from_millis(100),
                    admin.list_topics(ListTopicsRequest {}),
                )
                .await
                {
                    Err(_elapsed) => None,
                    Ok(answer) => Some(format!("{answer:?}")),
                }
            })
        })
        .collect();
    for c in cancelled {
        if let Some(answer) = c.await? {
            panic!("a call to the paused broker was answered: {answer}");
        }
    }
    broker.signal("CONT")?;

    let answer = within("the long poll", poll).await??;
    let fetched = answer.map_err(|s| anyhow::anyhow!("the long poll failed: {s}"))?;
    assert!(fetched.into_inner().records.is_empty());
    Ok(())
}
