//! A producer: creates the topic if needed and sends keyed orders. Records with the same
//! key land on the same partition, in order. The `Producer` retries with the same sequence,
//! so a retried order is stored once.
//!
//! ```sh
//! cargo run -p weir-client --example producer -- orders 10   # TOPIC COUNT
//! ```
//! The broker is `$WEIR_BROKER` (default `127.0.0.1:7070`).

use weir_client::{Client, Record, RetryPolicy, TopicConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "orders".into());
    let count: u32 = args.next().map_or(Ok(10), |n| n.parse())?;
    let broker = std::env::var("WEIR_BROKER").unwrap_or_else(|_| "127.0.0.1:7070".into());

    let client = Client::connect(&broker).await?;
    // Idempotent: succeeds unchanged when the topic exists with these settings.
    client.create_topic(&topic, &TopicConfig::new(4)).await?;

    let mut producer = client.producer(RetryPolicy::default());
    for i in 0..count {
        let customer = format!("customer-{}", i % 3);
        let order =
            Record::keyed(customer.clone(), format!("order-{i}")).header("source", "example");
        let acks = producer.send(&topic, None, vec![order]).await?;
        println!(
            "order-{i} of {customer} -> partition {} offset {}",
            acks[0].partition, acks[0].base_offset
        );
    }
    Ok(())
}
