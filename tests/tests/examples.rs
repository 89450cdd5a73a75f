//! The example programs of `examples/`, run as a newcomer would run them, against a
//! real broker: the producer's orders reach the Ordered consumer in key order, and the
//! Shared worker's poison message ends in the dead-letter topic with its origin.

use std::process::{Command, Output};

use weir_client::{FetchOptions, Record};
use weir_tests::{Broker, example};

fn run(broker: &Broker, name: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(example(name))
        .args(args)
        .env("WEIR_BROKER", &broker.addr)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{name} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_programs_produce_consume_and_dead_letter() -> anyhow::Result<()> {
    let broker = Broker::start()?;

    let produced = stdout_lines(&run(&broker, "producer", &["orders", "12"])?);
    assert_eq!(produced.len(), 12, "{produced:?}");
    assert!(
        produced[0].starts_with("order-0 of customer-0 -> partition "),
        "{produced:?}"
    );

    let consumed = stdout_lines(&run(&broker, "ordered_consumer", &["orders", "inventory"])?);
    assert_eq!(consumed.len(), 12, "{consumed:?}");
    // Per customer (key), orders arrive in the order they were produced.
    for customer in ["customer-0", "customer-1", "customer-2"] {
        let orders: Vec<u32> = consumed
            .iter()
            .filter(|l| l.contains(&format!("key {customer} ")))
            .filter_map(|l| l.rsplit("order-").next()?.parse().ok())
            .collect();
        assert_eq!(orders.len(), 4, "{customer}: {consumed:?}");
        assert!(orders.is_sorted(), "{customer}: {orders:?}");
    }
    let client = broker.client().await?;
    assert_eq!(client.describe_group("inventory").await?.lag, 0);
    // A second run continues where the first stopped: nothing left.
    let again = stdout_lines(&run(&broker, "ordered_consumer", &["orders", "inventory"])?);
    assert!(again.is_empty(), "{again:?}");

    client
        .produce("orders", Some(0), vec![Record::value("bad order")])
        .await?;
    let worked = stdout_lines(&run(&broker, "shared_worker", &["orders", "mailer"])?);
    assert_eq!(
        worked.iter().filter(|l| l.starts_with("done ")).count(),
        12,
        "{worked:?}"
    );
    assert_eq!(
        worked
            .iter()
            .filter(|l| l.starts_with("failed bad order"))
            .count(),
        3,
        "three deliveries, then the dead-letter topic: {worked:?}"
    );
    let dlq = client
        .fetch("orders-mailer-DLQ", 0, 0, FetchOptions::default())
        .await?;
    assert_eq!(dlq.records.len(), 1);
    let dead = &dlq.records[0].record;
    assert_eq!(dead.text(), "bad order");
    assert_eq!(
        dead.header_value("weir-dlq-error")
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        Some("cannot handle \"bad order\"".to_owned())
    );
    assert_eq!(client.describe_group("mailer").await?.lag, 0);
    Ok(())
}
