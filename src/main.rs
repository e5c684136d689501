//! `cosmos`: the one binary for the controller, the agents and the client CLI.

mod client;
mod jobs;
mod up;

use clap::{Parser, Subcommand};
use client::ClientArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Runs NVIDIA Cosmos Transfer jobs (and any containerised GPU job) across GPU hosts.
#[derive(Parser, Debug)]
#[command(name = "cosmos", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the release and the wire-protocol version it speaks.
    Version,
    /// Run the controller daemon.
    Controller {
        /// Holds the store, the tokens and the logs; a restart with the same directory resumes everything.
        #[arg(long)]
        data_dir: PathBuf,
        /// Where the HTTP API listens (loopback unless told otherwise).
        #[arg(long, default_value = "127.0.0.1:7700")]
        api_listen: SocketAddr,
        /// Where agents connect.
        #[arg(long, default_value = "127.0.0.1:7701")]
        agent_listen: SocketAddr,
        /// Silence after which a host's attempts are re-queued elsewhere.
        #[arg(long, default_value_t = 15_000)]
        lost_after_ms: u64,
    },
    /// Run a GPU host's agent daemon.
    Agent {
        /// The controller's agent address, HOST:PORT.
        #[arg(long)]
        controller: String,
        /// File holding the controller's agent token.
        #[arg(long)]
        token_file: PathBuf,
        /// Where attempts run and keep their logs.
        #[arg(long)]
        work_dir: PathBuf,
        /// Pretend to have GPUs, e.g. `8x80GiB`: for hosts without NVIDIA GPUs (visible in `cosmos status`).
        #[arg(long)]
        simulated_gpus: Option<String>,
        /// This host's name in the cluster (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// How jobs run: `process` (a process group each, no images) or `docker` (a container each).
        #[arg(long, default_value = "process", value_parser = ["process", "docker"])]
        runtime: String,
        /// Docker runtime: a volume jobs' `mounts` may name, as NAME=HOST_DIR (repeatable).
        #[arg(long = "volume", value_name = "NAME=HOST_DIR")]
        volumes: Vec<String>,
        /// Docker runtime: the network job containers join (default: the engine's bridge).
        #[arg(long)]
        docker_network: Option<String>,
    },
    /// Start a local controller and agents; with `-- COMMAND`, run that client command against them and exit.
    Up {
        /// Keep the cluster's data here (default: a new temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Local agents to start.
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// Simulated GPUs of each agent.
        #[arg(long, default_value = "8x80GiB")]
        gpus: String,
        /// A client command to run against the fresh cluster, after `--`.
        #[arg(last = true)]
        client_command: Vec<String>,
    },
    /// Submit, list, follow and cancel jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// List, drain and undrain agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Queue depth, jobs per state, per-host GPU use.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    /// Submit a JSONL batch, one job per line; one bad line rejects the batch.
    Submit {
        /// The batch file.
        file: PathBuf,
        /// Follow the batch to its end with progress bars; exit 1 if any job did not succeed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List jobs.
    List {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one job with its attempts.
    Show {
        /// Job id (`job-N`).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a job's output.
    Logs {
        /// Job id.
        id: String,
        /// Keep printing until the job ends.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Wait for jobs to end; exit 1 if any did not succeed.
    Wait {
        /// Job ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum AgentsCommand {
    /// List agents with their GPUs and live VRAM.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Give an agent no new work.
    Drain {
        /// Agent name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Let an agent take work again.
    Undrain {
        /// Agent name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn main() -> std::process::ExitCode {
    init_tracing();
    match run(Cli::parse()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("COSMOS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// Runs one command; `Ok(false)` means it ran but what it waited for did not all succeed.
pub fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Version => {
            println!("cosmos {} (protocol v{})", env!("CARGO_PKG_VERSION"), cosmos_proto::PROTOCOL_VERSION);
            Ok(true)
        }
        Command::Controller { data_dir, api_listen, agent_listen, lost_after_ms } => {
            let core = cosmos_controller::core::CoreConfig { lost_after_ms, ..Default::default() };
            let opts = cosmos_controller::daemon::ControllerOptions {
                data_dir,
                api_listen,
                agent_listen,
                max_frame_bytes: cosmos_proto::frame::DEFAULT_MAX_FRAME_BYTES,
                core,
                transfer: cosmos_controller::transfer::TransferConfig::default(),
            };
            actix::System::new().block_on(cosmos_controller::daemon::run(opts, shutdown_signal()))?;
            Ok(true)
        }
        Command::Agent { controller, token_file, work_dir, simulated_gpus, name, runtime, volumes, docker_network } => {
            let runtime = up::runtime_kind(&runtime, &work_dir, &volumes, docker_network)?;
            up::run_agent(controller, token_file, work_dir, simulated_gpus, name, runtime)?;
            Ok(true)
        }
        Command::Up { data_dir, agents, gpus, client_command } => up::up(data_dir, agents, &gpus, client_command),
        Command::Jobs(cmd) => match cmd {
            JobsCommand::Submit { file, wait, client } => jobs::submit(&client, &file, wait),
            JobsCommand::List { state, client } => jobs::list(&client, state.as_deref()).map(|()| true),
            JobsCommand::Show { id, client } => jobs::show(&client, &id).map(|()| true),
            JobsCommand::Cancel { id, client } => jobs::cancel(&client, &id).map(|()| true),
            JobsCommand::Logs { id, follow, client } => jobs::logs(&client, &id, follow).map(|()| true),
            JobsCommand::Wait { ids, client } => jobs::wait(&client, &client::Client::new(&client)?, &ids),
        },
        Command::Agents(cmd) => match cmd {
            AgentsCommand::List { client } => jobs::agents(&client).map(|()| true),
            AgentsCommand::Drain { name, client } => jobs::drain(&client, &name, true).map(|()| true),
            AgentsCommand::Undrain { name, client } => jobs::drain(&client, &name, false).map(|()| true),
        },
        Command::Status { client } => jobs::status(&client).map(|()| true),
    }
}

/// Resolves on Ctrl-C or SIGTERM (what systemd sends to stop a service).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler succeeds");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
