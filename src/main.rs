//! `cosmos`: the one binary for the controller, the agents and the client CLI.

use clap::{Parser, Subcommand};

/// Runs NVIDIA Cosmos Transfer jobs (and any containerised GPU job) across GPU hosts.
#[derive(Parser, Debug)]
#[command(name = "cosmos", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the release and the wire-protocol version it speaks.
    Version,
    /// Run the controller daemon (not built yet).
    Controller,
    /// Run a GPU host's agent daemon (not built yet).
    Agent,
    /// Start a local controller and agents (not built yet).
    Up,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Version => {
            println!("cosmos {} (protocol v{})", env!("CARGO_PKG_VERSION"), cosmos_proto::PROTOCOL_VERSION);
            Ok(())
        }
        Command::Controller => not_built("controller"),
        Command::Agent => not_built("agent"),
        Command::Up => not_built("up"),
    }
}

fn not_built(command: &str) -> anyhow::Result<()> {
    anyhow::bail!(
        "`cosmos {command}` is not built yet; README.md, section 'What works', lists what this release can do"
    )
}
