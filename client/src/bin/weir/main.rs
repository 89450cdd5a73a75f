//! `weir`: the command-line client of the Weir broker.
//!
//! Exit codes: 0 ok, 1 error (one line on stderr), 2 usage error.

mod bench;
mod cluster;
mod consume;
mod group;
mod produce;
mod topic;

use clap::{Parser, Subcommand, ValueEnum};
use weir_client::Client;

/// Command-line client of the Weir message broker.
#[derive(Debug, Parser)]
#[command(name = "weir", version)]
struct Cli {
    /// Broker gRPC address, `HOST:PORT` or a URL; or several, comma-separated
    /// (`a:7070,b:7070`): the first that answers is used, and the next that answers when it
    /// goes down (every broker of a cluster serves every call).
    #[arg(
        long,
        global = true,
        env = "WEIR_BROKER",
        default_value = "http://127.0.0.1:7070"
    )]
    broker: String,

    /// Send every call to the `--broker` address, which forwards calls for partitions and
    /// groups served elsewhere (by default calls go straight to the partition's leader or the
    /// group's coordinator, from the cluster's metadata, when its address is reachable).
    #[arg(long, global = true, env = "WEIR_NO_ROUTE")]
    no_route: bool,

    /// Output for humans (`human`) or one JSON document per line for scripts (`json`).
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Text for people.
    Human,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe or delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Produce one message per input line (stdin by default).
    Produce(produce::ProduceArgs),
    /// Consume messages, one per output line.
    Consume(consume::ConsumeArgs),
    /// List, describe, reset or delete consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Show the cluster: brokers, the metadata leader, each partition's leader and replicas.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Load tests; print a table of their figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = Client::connect(&cli.broker).await?;
    if cli.no_route {
        client = client.without_routing();
    }
    match cli.command {
        Command::Topic(cmd) => topic::run(&client, cmd, cli.output).await,
        Command::Produce(args) => produce::run(&client, args, cli.output).await,
        Command::Consume(args) => consume::run(&client, args, cli.output).await,
        Command::Group(cmd) => group::run(&client, cmd, cli.output).await,
        Command::Cluster(cmd) => cluster::run(&client, cmd, cli.output).await,
        Command::Bench(cmd) => {
            let url = client.url().to_owned();
            bench::run(&client, &url, cmd, cli.output).await
        }
    }
}
