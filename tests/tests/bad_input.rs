//! Bad input gets a clear status and changes nothing.

use std::time::Duration;
use tonic::Code;
use weir_client::{Client, FetchOptions, Record, TopicConfig, TopicInfo};
use weir_tests::Broker;

/// Everything a client can observe about the broker's topics.
async fn snapshot(client: &Client) -> anyhow::Result<Vec<TopicInfo>> {
    Ok(client.list_topics().await?)
}

fn expect_code<T: std::fmt::Debug>(
    result: Result<T, weir_client::Error>,
    code: Code,
    needle: &str,
) {
    let err = result.expect_err("request must be refused");
    assert_eq!(err.code(), Some(code), "wrong code for: {err}");
    let text = err.to_string();
    assert!(
        text.contains(needle),
        "message {text:?} should mention {needle:?}"
    );
}

#[tokio::test]
#[allow(clippy::too_many_lines)]
async fn every_bad_request_is_refused_with_a_clear_status_and_no_state_change() -> anyhow::Result<()>
{
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client
        .create_topic("orders", &TopicConfig::new(2).with_max_message_bytes(1024))
        .await?;
    client
        .produce("orders", Some(0), vec![Record::value("first")])
        .await?;
    let before = snapshot(&client).await?;

    // Unknown topic: produce, fetch, describe, delete, update.
    expect_code(
        client.produce("nope", None, vec![Record::value("x")]).await,
        Code::NotFound,
        "\"nope\" does not exist",
    );
    expect_code(
        client.fetch("nope", 0, 0, FetchOptions::default()).await,
        Code::NotFound,
        "\"nope\" does not exist",
    );
    expect_code(
        client.describe_topic("nope").await,
        Code::NotFound,
        "does not exist",
    );
    expect_code(
        client.delete_topic("nope").await,
        Code::NotFound,
        "does not exist",
    );
    expect_code(
        client.update_topic("nope", &TopicConfig::new(3)).await,
        Code::NotFound,
        "does not exist",
    );

    // Invalid topic names.
    for name in ["", "has space", "..", "x/y", &"n".repeat(250)] {
        expect_code(
            client.create_topic(name, &TopicConfig::new(1)).await,
            Code::InvalidArgument,
            "invalid topic name",
        );
    }

    // Zero or absurd partition counts.
    expect_code(
        client.create_topic("zero", &TopicConfig::new(0)).await,
        Code::InvalidArgument,
        "between 1 and 1024",
    );
    expect_code(
        client
            .create_topic("huge", &TopicConfig::new(1_000_000))
            .await,
        Code::InvalidArgument,
        "between 1 and 1024",
    );
    expect_code(
        client
            .create_topic(
                "big-records",
                &TopicConfig::new(1).with_max_message_bytes(1 << 30),
            )
            .await,
        Code::InvalidArgument,
        "at most",
    );

    // Unknown partition.
    expect_code(
        client
            .produce("orders", Some(7), vec![Record::value("x")])
            .await,
        Code::NotFound,
        "partitions 0..2",
    );
    expect_code(
        client.fetch("orders", 2, 0, FetchOptions::default()).await,
        Code::NotFound,
        "no partition 2",
    );

    // Oversize record: the whole batch is refused, including the small records.
    expect_code(
        client
            .produce(
                "orders",
                Some(0),
                vec![Record::value("small"), Record::value(vec![b'x'; 2000])],
            )
            .await,
        Code::InvalidArgument,
        "at most 1024 bytes",
    );

    // Empty batch.
    expect_code(
        client.produce("orders", None, vec![]).await,
        Code::InvalidArgument,
        "at least one record",
    );

    // Offsets out of range name the valid range.
    expect_code(
        client.fetch("orders", 0, 5, FetchOptions::default()).await,
        Code::OutOfRange,
        "valid offsets are 0..=1",
    );

    // Long-poll wait above the cap.
    expect_code(
        client
            .fetch(
                "orders",
                0,
                0,
                FetchOptions {
                    max_wait: Duration::from_secs(120),
                    ..FetchOptions::default()
                },
            )
            .await,
        Code::InvalidArgument,
        "max_wait_ms",
    );

    // A topic created twice: idempotent with identical settings, refused otherwise.
    let again = client
        .create_topic("orders", &TopicConfig::new(2).with_max_message_bytes(1024))
        .await?;
    assert_eq!(again.name, "orders");
    expect_code(
        client
            .create_topic("orders", &TopicConfig::new(3).with_max_message_bytes(1024))
            .await,
        Code::AlreadyExists,
        "already exists with partitions=2",
    );

    // Partitions never shrink.
    expect_code(
        client
            .update_topic("orders", &TopicConfig::new(1).with_max_message_bytes(1024))
            .await,
        Code::InvalidArgument,
        "only grow",
    );

    let after = snapshot(&client).await?;
    assert_eq!(before, after, "a refused request changed state");
    Ok(())
}

#[tokio::test]
async fn cli_reports_errors_on_one_line_with_exit_code_1_and_usage_errors_with_2()
-> anyhow::Result<()> {
    let broker = Broker::start()?;
    let out = broker.weir(&["topic", "describe", "missing"], b"")?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr)?;
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.starts_with("weir: NOT_FOUND: topic \"missing\" does not exist"),
        "{err}"
    );

    let out = broker.weir(&["topic", "frobnicate"], b"")?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}
