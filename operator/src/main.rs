//! `weir-operator`: the Kubernetes operator of Weir.

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => print!("{}", weir_operator::crds_yaml()?),
    }
    Ok(())
}
