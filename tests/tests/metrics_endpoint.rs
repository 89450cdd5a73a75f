//! The broker's HTTP endpoint: Prometheus text with live figures, health and readiness.

use weir_client::{Record, TopicConfig};
use weir_tests::{Broker, http_get};

fn value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_stored_messages_and_resident_memory() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("m", &TopicConfig::new(2)).await?;
    client
        .produce(
            "m",
            None,
            (0..10).map(|i| Record::value(format!("v{i}"))).collect(),
        )
        .await?;
    let metrics = http_get(&broker.http_addr, "/metrics")?;
    assert!(
        metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"),
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "weir_stored_messages"),
        Some(10.0),
        "{metrics}"
    );
    assert_eq!(value(&metrics, "weir_topics"), Some(1.0));
    let rss = value(&metrics, "weir_resident_memory_bytes").unwrap_or(0.0);
    assert!(rss > 1_000_000.0, "resident memory reported: {rss}");
    assert!(http_get(&broker.http_addr, "/healthz")?.contains(" 200 "));
    assert!(http_get(&broker.http_addr, "/readyz")?.contains(" 200 "));
    Ok(())
}
