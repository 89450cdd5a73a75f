//! `weir-operator`: the Kubernetes operator of Weir.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::ResourceRequirements;
use weir_operator::{
    builders::{BrokerConfigFile, BrokerSettings},
    context::Settings,
    metrics::{self, Metrics},
    run::{self, RunOptions},
};

/// Kubernetes operator of the Weir message broker.
#[derive(Debug, Parser)]
#[command(name = "weir-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML) to apply with `kubectl apply -f -`.
    Crds,
    /// Reconcile Topic and ConsumerGroup resources (uses the in-cluster service account, or
    /// KUBECONFIG outside a cluster).
    Run(Box<RunArgs>),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Namespace to watch; all namespaces when unset.
    #[arg(long, env = "WEIR_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Container image of the brokers.
    #[arg(long, env = "WEIR_BROKER_IMAGE", default_value = concat!("ghcr.io/weir-dev/weir:", env!("CARGO_PKG_VERSION")))]
    broker_image: String,
    /// Fewest brokers in a namespace that has Topics.
    #[arg(long, env = "WEIR_MIN_BROKERS", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=100))]
    min_brokers: i32,
    /// Most brokers a namespace is sized to (a Topic with more partitions shares brokers).
    #[arg(long, env = "WEIR_MAX_BROKERS", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=100))]
    max_brokers: i32,
    /// Size of each broker's volume (a Kubernetes quantity).
    #[arg(long, env = "WEIR_STORAGE_SIZE", default_value = "10Gi")]
    storage_size: String,
    /// Storage class of the brokers' volumes; the cluster default when unset.
    #[arg(long, env = "WEIR_STORAGE_CLASS")]
    storage_class: Option<String>,
    /// Container resources of each broker, as JSON (a Kubernetes `ResourceRequirements`), e.g.
    /// `{"requests":{"cpu":"500m","memory":"512Mi"},"limits":{"memory":"1Gi"}}`.
    #[arg(long, env = "WEIR_BROKER_RESOURCES", value_parser = parse_resources)]
    broker_resources: Option<ResourceRequirements>,
    /// YAML file of broker settings (image, minBrokers, maxBrokers, storage, resources,
    /// podSecurityContext, securityContext, tolerations, affinity, nodeSelector); a field
    /// set there replaces the flag. The Helm chart mounts it from a ConfigMap.
    #[arg(long, env = "WEIR_BROKER_CONFIG")]
    broker_config: Option<std::path::PathBuf>,
    /// How often Ready resources are polled for live figures (messages, lag), e.g. `10s`.
    #[arg(long, env = "WEIR_STATUS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    status_interval: Duration,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(
        long,
        env = "WEIR_OPERATOR_HTTP_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    http_listen: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "WEIR_LEASE_NAME", default_value = "weir-operator")]
    lease_name: String,
    /// Seconds a leader that stops renewing keeps the Lease.
    #[arg(long, env = "WEIR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// This replica's identity (the Pod name in a cluster; the host name otherwise).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Log format.
    #[arg(long, env = "WEIR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn parse_resources(s: &str) -> Result<ResourceRequirements, String> {
    serde_json::from_str(s).map_err(|e| {
        format!(
            "not a ResourceRequirements in JSON ({e}); expected e.g. {{\"requests\":{{\"cpu\":\"500m\",\"memory\":\"512Mi\"}}}}"
        )
    })
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a container's log is read as text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let http = tokio::spawn(metrics::serve(args.http_listen, Arc::clone(&metrics)));
    let mut settings = Settings {
        brokers: BrokerSettings {
            image: args.broker_image,
            replicas: 0,
            storage_size: args.storage_size,
            storage_class: args.storage_class,
            resources: args.broker_resources,
            ..BrokerSettings::default()
        },
        min_brokers: args.min_brokers,
        max_brokers: args.max_brokers.max(args.min_brokers),
        status_interval: args.status_interval,
    };
    if let Some(path) = &args.broker_config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the broker config {}", path.display()))?;
        let file: BrokerConfigFile = serde_yaml::from_str(&text)
            .with_context(|| format!("the broker config {} is not valid", path.display()))?;
        file.apply(
            &mut settings.brokers,
            &mut settings.min_brokers,
            &mut settings.max_brokers,
        );
        anyhow::ensure!(
            (1..=100).contains(&settings.min_brokers)
                && settings.min_brokers <= settings.max_brokers,
            "the broker config {}: minBrokers must be 1..=100 and at most maxBrokers, got {} and {}",
            path.display(),
            settings.min_brokers,
            settings.max_brokers
        );
    }
    let instance = args
        .instance
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("weir-operator-{}", std::process::id()));
    let options = RunOptions {
        namespace: args.namespace,
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        instance,
        lease_seconds: args.lease_seconds,
    };
    let result = run::run(client, settings, metrics, options).await;
    http.abort();
    result
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => print!("{}", weir_operator::crds_yaml()?),
        Command::Run(args) => run(*args).await?,
    }
    Ok(())
}
