//! An Ordered consumer: a member of a Kafka-style group. Each partition belongs to one
//! member at a time and arrives in offset order; the group remembers what was acked, so the
//! next run continues where this one stopped. Stops after 2 s without a message.
//!
//! ```sh
//! cargo run -p weir-client --example ordered_consumer -- orders inventory   # TOPIC GROUP
//! ```
//! The broker is `$WEIR_BROKER` (default `127.0.0.1:7070`).

use std::time::Duration;

use weir_client::{Client, GroupConfig, GroupType};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "orders".into());
    let group = args.next().unwrap_or_else(|| "inventory".into());
    let broker = std::env::var("WEIR_BROKER").unwrap_or_else(|_| "127.0.0.1:7070".into());

    let client = Client::connect(&broker).await?;
    // Created on first use; later members join it.
    let config = GroupConfig::new(topic, GroupType::Ordered);
    let mut consumer = client.subscribe(&group, Some(&config), 100).await?;
    while let Ok(Some(delivery)) =
        tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        let delivery = delivery?;
        let key = delivery.record.key.as_deref().map(String::from_utf8_lossy);
        println!(
            "partition {} offset {} key {} value {}",
            delivery.partition,
            delivery.offset,
            key.unwrap_or_default(),
            delivery.record.text()
        );
        // Ack after the work is done: a crash before this line redelivers the message.
        consumer.ack(&delivery).await?;
    }
    // Leave after the broker applied every ack.
    consumer.close(Duration::from_secs(5)).await?;
    Ok(())
}
