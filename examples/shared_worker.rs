//! A Shared worker: one of many members of a work queue. Any member gets any message; a
//! message that fails is nacked and comes back after a delay; after three deliveries the
//! broker moves it to the dead-letter topic `<topic>-<group>-DLQ`, with headers saying
//! where it came from and why it failed. Stops after 3 s without a message.
//!
//! ```sh
//! cargo run -p weir-client --example shared_worker -- orders mailer   # TOPIC GROUP
//! ```
//! The broker is `$WEIR_BROKER` (default `127.0.0.1:7070`).

use std::time::Duration;

use weir_client::{Client, Delivery, GroupConfig, GroupType};

/// The work: here, a message whose value contains "bad" fails.
fn handle(delivery: &Delivery) -> Result<(), String> {
    if delivery.record.text().contains("bad") {
        return Err(format!("cannot handle {:?}", delivery.record.text()));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "orders".into());
    let group = args.next().unwrap_or_else(|| "mailer".into());
    let broker = std::env::var("WEIR_BROKER").unwrap_or_else(|_| "127.0.0.1:7070".into());

    let client = Client::connect(&broker).await?;
    let config = GroupConfig::new(topic, GroupType::Shared)
        .with_ack_wait(Duration::from_secs(30))
        .with_max_deliveries(3);
    let mut worker = client.subscribe(&group, Some(&config), 10).await?;
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(3), worker.next()).await
    {
        let delivery = delivery?;
        match handle(&delivery) {
            Ok(()) => {
                println!("done {}", delivery.record.text());
                worker.ack(&delivery).await?;
            }
            Err(why) => {
                println!(
                    "failed {} (delivery {}): {why}",
                    delivery.record.text(),
                    delivery.delivery_count
                );
                worker
                    .nack(&delivery, Duration::from_millis(100), &why)
                    .await?;
            }
        }
    }
    worker.close(Duration::from_secs(5)).await?;
    Ok(())
}
