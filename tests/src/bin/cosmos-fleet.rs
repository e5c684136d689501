//! A fleet of agents in one process, for load tests of a real controller
//! (`scripts/bench-fleet`): N real agent daemons (`cosmos_agent::daemon::run`,
//! the same shell, core and wire protocol as `cosmos agent`) share one tokio
//! runtime, each with its own work directory, simulated GPUs and the simulated
//! runtime, and each dials the controller over its own TCP connection. Jobs
//! must be `cosmos-testjob` command lines: the simulated runtime plays them by
//! timers, so no process runs per job and the load lands on the controller.
//!
//! Usage: `cosmos-fleet --controller HOST:PORT --token-file PATH --work-dir DIR
//! --agents N [--gpus 8x80GiB] [--name-prefix fleet]`. Runs until SIGINT or SIGTERM.

/// The allocator the `cosmos` binary runs its agents with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// As the `cosmos` binary tunes it (see its `tune_allocator`): mimalloc v3's
/// `mi_option_arena_eager_commit` (4) and `mi_option_purge_delay` (15) at 0.
extern "C" fn tune_allocator() {
    // SAFETY: sets plain option values.
    unsafe {
        libmimalloc_sys::mi_option_set(4, 0);
        libmimalloc_sys::mi_option_set(15, 0);
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

use cosmos_agent::daemon::{self, AgentOptions, ControllerLink, RuntimeKind};
use cosmos_agent::simulated::SimulatedHost;
use std::path::PathBuf;
use std::time::Duration;

/// Agents started before the next group waits, so a thousand do not dial in the same instant.
const START_GROUP: usize = 50;
/// Pause between two groups of agents starting.
const START_GROUP_PAUSE_MS: u64 = 20;
/// How long delivered attempts' directories are kept: a load test makes hundreds of thousands.
const RETAIN_S: u64 = 60;
/// How long shutdown waits for the agents to close their connections.
const STOP_WAIT_MS: u64 = 5_000;

struct Args {
    controller: String,
    token_file: PathBuf,
    work_dir: PathBuf,
    agents: usize,
    gpus: String,
    name_prefix: String,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "cosmos-fleet: {problem}\nusage: cosmos-fleet --controller HOST:PORT --token-file PATH --work-dir DIR --agents N [--gpus 8x80GiB] [--name-prefix fleet]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = std::env::args().skip(1);
    let (mut controller, mut token_file, mut work_dir, mut agents) = (None, None, None, None);
    let (mut gpus, mut name_prefix) = ("8x80GiB".to_string(), "fleet".to_string());
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else { usage(&format!("{flag} needs a value")) };
        match flag.as_str() {
            "--controller" => controller = Some(value),
            "--token-file" => token_file = Some(PathBuf::from(value)),
            "--work-dir" => work_dir = Some(PathBuf::from(value)),
            "--agents" => agents = Some(value.parse().unwrap_or_else(|_| usage("--agents takes a count"))),
            "--gpus" => gpus = value,
            "--name-prefix" => name_prefix = value,
            other => usage(&format!("unknown flag {other}")),
        }
    }
    Args {
        controller: controller.unwrap_or_else(|| usage("--controller is required")),
        token_file: token_file.unwrap_or_else(|| usage("--token-file is required")),
        work_dir: work_dir.unwrap_or_else(|| usage("--work-dir is required")),
        agents: agents.unwrap_or_else(|| usage("--agents is required")),
        gpus,
        name_prefix,
    }
}

fn main() {
    let args = parse_args();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let token = std::fs::read_to_string(&args.token_file)
        .unwrap_or_else(|e| usage(&format!("cannot read {}: {e}", args.token_file.display())));
    let gpus = daemon::parse_simulated_gpus(&args.gpus).unwrap_or_else(|e| usage(&format!("--gpus: {e}")));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut agents = Vec::with_capacity(args.agents);
        for i in 0..args.agents {
            let name = format!("{}-{i:04}", args.name_prefix);
            let opts = AgentOptions {
                link: ControllerLink::Dial(args.controller.clone()),
                token: cosmos_proto::handshake::Token(token.trim().to_string()),
                work_dir: args.work_dir.join(&name),
                name,
                gpus: gpus.clone(),
                gpus_simulated: true,
                frame_bytes_max: cosmos_proto::frame::FRAME_BYTES_MAX_DEFAULT,
                config: cosmos_agent::core::AgentConfig::default(),
                reconnect_min_ms: 100,
                reconnect_max_ms: 5_000,
                runtime: RuntimeKind::Simulated(SimulatedHost::new()),
                cache_max_bytes: cosmos_agent::blobs::CACHE_BYTES_MAX_DEFAULT,
                // Never started: the simulated runtime runs no process.
                job_supervisor: cosmos_agent::supervise::Launcher::standalone(PathBuf::from("cosmos-job-supervise")),
                nvml: Default::default(),
                trace: None,
                metrics_listen: None,
                retention: cosmos_agent::retention::Policy { retain_s: RETAIN_S, ..Default::default() },
            };
            let mut stop = stop_rx.clone();
            agents.push(tokio::spawn(daemon::run(opts, async move {
                let _ = stop.wait_for(|s| *s).await;
            })));
            if (i + 1) % START_GROUP == 0 {
                tokio::time::sleep(Duration::from_millis(START_GROUP_PAUSE_MS)).await;
            }
        }
        eprintln!("cosmos-fleet: {} agents started, dialing {}", args.agents, args.controller);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
        let stopped = tokio::time::timeout(Duration::from_millis(STOP_WAIT_MS), futures_all(agents)).await;
        let failed = stopped.map_or(0, |results| results.into_iter().filter(|r| !matches!(r, Ok(Ok(())))).count());
        eprintln!("cosmos-fleet: stopped ({failed} agents ended with an error)");
    });
}

/// Waits for every agent task, in order.
async fn futures_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}
