//! `cosmos`: the one binary for the controller, the agents and the client CLI.

mod client;
mod config;
mod cosmos;
mod follow;
mod install;
mod jobs;
mod prune;
mod ssh;
mod sweep;
mod up;

/// glibc's allocator was a fifth of the controller's CPU at a thousand agents
/// (`malloc_consolidate`, `unlink_chunk`): the actors allocate and free small
/// messages across threads, which mimalloc's per-thread free lists serve.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` and `mi_option_purge_delay` in mimalloc v3's `mimalloc.h`.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Commits arena memory as it is used and gives freed pages back at once: with mimalloc's
/// defaults on Linux (eager commit, purge after 1 s) an idle controller with a thousand
/// agents held 250 MiB resident, and 760 MiB after 100,000 jobs; with these, 90 and 300.
/// Set from the executable's constructors, before the first allocation reserves an arena
/// (set in `main` it was too late: 240 MiB idle).
extern "C" fn tune_allocator() {
    // SAFETY: sets plain option values; mimalloc allows it at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

use clap::{Parser, Subcommand};
use client::ClientArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Runs NVIDIA Cosmos Transfer jobs (and any containerised GPU job) across GPU hosts.
#[derive(Parser, Debug)]
#[command(name = "cosmos", version, about)]
pub struct Cli {
    /// How log lines are written on stderr: `text` for people, `json` (one object per line) for journald and log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "COSMOS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The shape of log lines.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// One human-readable line per event, coloured on a terminal.
    Text,
    /// One JSON object per event: `timestamp`, `level`, `target`, the event's fields (`message` among them) and the current `span`.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the release and the wire-protocol version it speaks.
    Version,
    /// Run the controller daemon.
    Controller {
        /// A TOML file of this command's flags (`data_dir = "/var/lib/cosmos"`: a flag's name with `_`
        /// for `-`); flags and their COSMOS_* variables override it. `cosmos config check FILE` validates it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
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
        /// Bound on each stored log stream (stdout, stderr) of one attempt, in bytes; past it the log is cut, and the cut marked.
        #[arg(long, default_value_t = cosmos_controller::daemon::ATTEMPT_LOG_BYTES_MAX_DEFAULT)]
        attempt_log_bytes_max: u64,
        /// Finished jobs are pruned with their logs this many days after they ended (fractions allowed; 0 keeps
        /// them forever); blobs nothing references any more go with them.
        #[arg(long, default_value_t = cosmos_controller::retention::RETAIN_DAYS_DEFAULT)]
        retain_days: f64,
        /// The store: a `postgres://USER@HOST/DB` URL, shared by a leader and its standbys (default: SQLite in
        /// --data-dir). From the environment it stays out of `ps`, with any password in it.
        #[arg(long, value_name = "URL", env = "COSMOS_STORE", hide_env_values = true)]
        store: Option<String>,
        /// PostgreSQL store: how long the leader's lease lasts after each renewal (every third of it); a standby
        /// takes over this long after the leader stops.
        #[arg(long, default_value_t = cosmos_controller::store::postgres::LEASE_MS_DEFAULT)]
        lease_ms: u64,
        /// PostgreSQL store: this controller's name in the lease row, unique among those sharing it (default: HOST:API_PORT).
        #[arg(long)]
        controller_id: Option<String>,
        /// PostgreSQL store: the API URL standbys send clients to while this controller leads (default: http://API_LISTEN).
        #[arg(long, value_name = "URL")]
        advertise_api: Option<String>,
        /// PostgreSQL store: the HOST:PORT standbys send agents to while this controller leads (default: --agent-listen).
        #[arg(long, value_name = "HOST:PORT")]
        advertise_agents: Option<String>,
        /// Host keys of the hosts reached over SSH are checked against this file (default ~/.ssh/known_hosts).
        #[arg(long, value_name = "FILE")]
        known_hosts: Option<PathBuf>,
        /// The ssh_config read for HostName, User, Port, IdentityFile, ProxyJump (default ~/.ssh/config).
        #[arg(long, value_name = "FILE")]
        ssh_config: Option<PathBuf>,
        /// Silence on an SSH link before a keepalive is sent, in milliseconds.
        #[arg(long, default_value_t = cosmos_ssh::KEEPALIVE_INTERVAL_MS_DEFAULT)]
        ssh_keepalive_interval_ms: u64,
        /// SSH keepalives unanswered before the link counts as dead and is redialed.
        #[arg(long, default_value_t = cosmos_ssh::KEEPALIVE_MAX_DEFAULT)]
        ssh_keepalive_max: usize,
        #[command(flatten)]
        cosmos: CosmosArgs,
    },
    /// Run a GPU host's agent daemon; `agent install` / `agent uninstall` set one up on a host over SSH.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Agent {
        /// Install or uninstall an agent on a host over SSH instead of running one here.
        #[command(subcommand)]
        manage: Option<Box<AgentManage>>,
        /// A TOML file of this command's flags (`work_dir = "/var/lib/cosmos-agent"`: a flag's name with `_`
        /// for `-`); flags and their COSMOS_* variables override it. `cosmos config check FILE` validates it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The controller's agent address, HOST:PORT: the agent dials it (loopback, trusted networks).
        #[arg(long, required_unless_present = "listen", conflicts_with = "listen")]
        controller: Option<String>,
        /// Wait for the controller instead: `unix:/run/cosmos/agent.sock` (mode 0660; the controller
        /// reaches it through SSH) or `127.0.0.1:PORT`. One controller connection at a time.
        #[arg(long, value_name = "unix:PATH|IP:PORT")]
        listen: Option<String>,
        /// The group given the `--listen unix:` socket (name or number), so the SSH user can connect to it.
        #[arg(long, value_name = "GROUP", requires = "listen")]
        listen_group: Option<String>,
        /// File holding the controller's agent token.
        #[arg(long, required = true)]
        token_file: Option<PathBuf>,
        /// Where attempts run and keep their logs.
        #[arg(long, required = true)]
        work_dir: Option<PathBuf>,
        /// Pretend to have GPUs, e.g. `8x80GiB`: for hosts without NVIDIA GPUs (visible in `cosmos status`).
        #[arg(long, conflicts_with_all = ["nvml_lib", "gpus"])]
        simulated_gpus: Option<String>,
        /// The NVML library to load at run time (default: the driver's libnvidia-ml.so.1).
        #[arg(long, value_name = "PATH")]
        nvml_lib: Option<String>,
        /// Offer only these GPUs, by index or UUID as CUDA_VISIBLE_DEVICES names them (e.g. `0,1`); default all.
        #[arg(long, value_name = "LIST")]
        gpus: Option<String>,
        /// Time between two readings of every GPU (memory, processes, utilisation), in milliseconds.
        #[arg(long, default_value_t = cosmos_agent::gpu::monitor::DEFAULT_SAMPLE_INTERVAL_MS)]
        gpu_sample_interval_ms: u64,
        /// After a job ends, how long its GPUs get to return to their baseline memory before quarantine, in milliseconds.
        #[arg(long, default_value_t = cosmos_agent::core::AgentConfig::default().vram_release_bound_ms)]
        vram_release_bound_ms: u64,
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
        /// Bound on the cache of job inputs (`WORK_DIR/cache`), in GiB; least recently used inputs go first.
        #[arg(long, default_value_t = 256)]
        cache_max_gib: u64,
        /// Serve this agent's own Prometheus metrics at `http://ADDR/metrics` (loopback only, e.g. 127.0.0.1:9102).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
        /// How long a finished attempt's directory (`WORK_DIR/attempts/att-N`) is kept once the controller
        /// has its outcome and outputs, in seconds (default a week).
        #[arg(long, default_value_t = cosmos_agent::retention::ATTEMPT_RETAIN_S_DEFAULT)]
        attempt_retain_s: u64,
        /// Free space the work disk keeps, in GiB: below it delivered attempts' directories go early, oldest first
        /// (never a running attempt's).
        #[arg(long, default_value_t = cosmos_agent::retention::WORK_DISK_FREE_MIN_GIB_DEFAULT)]
        work_disk_free_min_gib: u64,
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
    /// Check a daemon's config file without starting anything.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the shell completion script for bash, zsh or fish (the .deb installs all three), e.g.
    /// `cosmos completions bash > ~/.local/share/bash-completion/completions/cosmos`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (cosmos.1, cosmos-controller.1, …) into DIR, from this CLI's definition.
    #[command(hide = true)]
    Man {
        /// Where the pages go.
        dir: PathBuf,
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
    /// Create a prompt: `cosmos create prompt TEXT VIDEO_DIR`.
    #[command(subcommand)]
    Create(CreateCommand),
    /// Run Cosmos Transfer on prompts: one run per prompt, submitted together.
    Inference {
        /// Prompt ids (`ps_…`).
        #[arg(required = true)]
        prompt_ids: Vec<String>,
        #[command(flatten)]
        params: cosmos::ParamArgs,
        /// Also upscale each run's video to 4K, submitted with it: the upscale runs once the
        /// run has succeeded and is cancelled if it does not.
        #[arg(long)]
        then_upscale: bool,
        /// With --then-upscale: weight of the upscale control, 0–1 [default 0.5].
        #[arg(long, requires = "then_upscale", allow_negative_numbers = true)]
        upscale_weight: Option<f64>,
        /// Follow the runs to their end with progress bars; exit 1 if any did not succeed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Submit a JSONL file of runs, one per line; one bad line rejects the file.
    Batch {
        /// The batch file: lines of {"prompt": TEXT, "video_dir": DIR, …} or {"prompt_id": "ps_…", …}.
        file: PathBuf,
        /// Follow the runs to their end with progress bars; exit 1 if any did not succeed.
        #[arg(long)]
        wait: bool,
        /// Wait, then download every run's outputs into DIR/RUN_ID/.
        #[arg(long, value_name = "DIR")]
        download: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Upscale a transfer run's video to 4K: a succeeded one, or with --after one still queued or running.
    Upscale {
        /// The succeeded transfer run (`rs_…`).
        #[arg(required_unless_present = "after", conflicts_with = "after")]
        run_id: Option<String>,
        /// A transfer run that has not ended yet: the upscale waits for it to succeed, takes its
        /// video then, and is cancelled if it does not succeed.
        #[arg(long, value_name = "RUN")]
        after: Option<String>,
        /// Weight of the upscale control, 0–1 [default 0.5].
        #[arg(long)]
        weight: Option<f64>,
        /// A prompt to guide the upscale.
        #[arg(long)]
        prompt: Option<String>,
        /// GPUs for the run [default 1].
        #[arg(long)]
        gpus: Option<u32>,
        /// Follow the run to its end.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Enhance a prompt's text with the upsampler: creates `<name>_enhanced`, linked to it.
    PromptEnhance {
        /// The prompt (`ps_…`).
        prompt_id: String,
        /// Replace the prompt's text in place (asks first).
        #[arg(long)]
        overwrite: bool,
        /// Do not ask before overwriting.
        #[arg(long, short)]
        yes: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List, show, search and cancel runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// List, show and delete prompts.
    #[command(subcommand)]
    Prompts(PromptsCommand),
    /// Download a succeeded run's outputs into DIR/RUN_ID/.
    Download {
        /// The run (`rs_…`).
        run_id: String,
        /// Where to put them.
        #[arg(long, default_value = "outputs")]
        to: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The shipped example: a small batch of transfer runs, an upscale of the first, all downloaded.
    Demo {
        /// Where the example inputs and the downloaded videos go.
        #[arg(long, default_value = "outputs")]
        to: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// How Cosmos Transfer runs compile into jobs (controller flags).
#[derive(clap::Args, Debug)]
struct CosmosArgs {
    /// Image holding the cosmos-transfer1 checkout; without it runs call `torchrun` from the
    /// agents' PATH as plain processes (the stand-in under `cosmos up`).
    #[arg(long, value_name = "IMAGE")]
    cosmos_image: Option<String>,
    /// The checkout root inside the image.
    #[arg(long, default_value = "/workspace")]
    cosmos_checkout_dir: String,
    /// Agent volume (`--volume NAME=DIR` on the agents) mounted read-only as `<checkout>/checkpoints`; empty: none.
    #[arg(long, default_value = "checkpoints")]
    cosmos_checkpoint_volume: String,
    /// Agent volume mounted as the Hugging Face cache; empty: none.
    #[arg(long, default_value = "hf_cache")]
    cosmos_hf_cache_volume: String,
    /// Shared memory for a run's container, in GiB.
    #[arg(long, default_value_t = 8)]
    cosmos_shm_gib: u64,
    /// Negative prompt for prompts created without one (default: the predecessor's).
    #[arg(long)]
    default_negative_prompt: Option<String>,
    /// Time limit of one attempt of a run, in seconds.
    #[arg(long, default_value_t = 4 * 3600)]
    run_timeout_s: u64,
    /// Attempts per run, the first included.
    #[arg(long, default_value_t = 3)]
    run_max_attempts: u32,
    /// Environment of every run, NAME=VALUE (repeatable); e.g. the stand-in's COSMOS_STANDIN_STEP_MS.
    #[arg(long = "run-env", value_name = "NAME=VALUE", value_parser = parse_env_pair)]
    run_env: Vec<(String, String)>,
}

/// A `NAME=VALUE` flag value.
fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{text}` is not NAME=VALUE")),
    }
}

impl CosmosArgs {
    fn config(self) -> cosmos_controller::cosmos::CosmosConfig {
        let d = cosmos_controller::cosmos::CosmosConfig::default();
        let volume = |v: String| (!v.is_empty()).then_some(v);
        cosmos_controller::cosmos::CosmosConfig {
            image: self.cosmos_image,
            checkout_dir: self.cosmos_checkout_dir,
            checkpoint_volume: volume(self.cosmos_checkpoint_volume),
            hf_cache_volume: volume(self.cosmos_hf_cache_volume),
            shm_bytes: self.cosmos_shm_gib << 30,
            default_negative_prompt: self.default_negative_prompt.unwrap_or(d.default_negative_prompt),
            timeout_ms: self.run_timeout_s.saturating_mul(1000),
            max_attempts: self.run_max_attempts,
            run_env: self.run_env.into_iter().collect(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate FILE as `cosmos controller --config FILE` or `cosmos agent --config FILE` would read it:
    /// every key, every value, and the daemon's own start-up checks (token files included); starts nothing.
    Check {
        /// The TOML file (`controller.toml`, `agent.toml`).
        file: PathBuf,
        /// Whose file it is, when its name does not say (`controller` or `agent`).
        #[arg(long, value_parser = config::ROLES)]
        role: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CreateCommand {
    /// A prompt from its text and a directory with color.mp4 (and optional depth.mp4, segmentation.mp4).
    Prompt {
        /// What the generated video should show.
        text: String,
        /// Directory holding color.mp4 and optionally depth.mp4 and segmentation.mp4.
        video_dir: PathBuf,
        /// Short name (a-z, 0-9, _); derived from the text when absent.
        #[arg(long)]
        name: Option<String>,
        /// Negative prompt; the controller's default when absent.
        #[arg(long)]
        negative: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum RunsCommand {
    /// List runs.
    List {
        /// Only runs of this prompt.
        #[arg(long)]
        prompt: Option<String>,
        /// Only runs in this state (queued, running, succeeded, failed, …).
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        page: jobs::PageArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one run: parameters, state, outputs.
    Show {
        /// The run (`rs_…`).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Runs whose id, kind, prompt id, name or text contain all these words.
    Search {
        /// Words to look for (case-insensitive).
        #[arg(required = true)]
        words: Vec<String>,
        #[command(flatten)]
        page: jobs::PageArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a run.
    Cancel {
        /// The run (`rs_…`).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Re-queue a failed or cancelled run: the same run id, a fresh attempt budget.
    Retry {
        /// The run (`rs_…`).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a run's output (the logs of its job), as `jobs logs` does.
    Logs {
        /// The run (`rs_…`).
        id: String,
        /// Keep printing until the run ends.
        #[arg(short, long)]
        follow: bool,
        /// Only about the last BYTES of each log (from a line start).
        #[arg(long, value_name = "BYTES")]
        tail_bytes: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Wait for runs to end; exit 1 if any did not succeed.
    Wait {
        /// The runs (`rs_…`).
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum PromptsCommand {
    /// List prompts.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one prompt.
    Show {
        /// The prompt (`ps_…`).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a prompt (refused while its runs are active); its runs' outputs stay unless asked.
    Delete {
        /// The prompt (`ps_…`).
        id: String,
        /// Also delete the output files of its runs.
        #[arg(long)]
        delete_outputs: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    /// Remove finished jobs that ended before a time, with their attempts' logs, and the blobs nothing
    /// references any more (the controller also does this by itself past --retain-days).
    Prune {
        /// `2026-01-31` (UTC), `2026-01-31T12:00:00Z`, a duration back from now (`30d`, `6h`) or ms since the epoch.
        #[arg(long, value_name = "DATE")]
        before: String,
        #[command(flatten)]
        client: ClientArgs,
    },
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
        /// Only jobs submitted since: a duration back from now (`90m`, `6h`, `2d`) or ms since the Unix epoch.
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        page: jobs::PageArgs,
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
    /// Re-queue a failed or cancelled job under its own id, with a fresh attempt budget.
    Retry {
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
        /// Only about the last BYTES of each log (from a line start).
        #[arg(long, value_name = "BYTES")]
        tail_bytes: Option<u64>,
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
enum AgentManage {
    /// Make a host an agent over SSH, idempotently: upload the static binary, write the token, config
    /// and systemd unit, (re)start it when something changed, check it answers, register it.
    Install {
        #[command(flatten)]
        args: install::InstallArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Unregister a host, stop and disable its agent and remove what `agent install` wrote.
    Uninstall {
        #[command(flatten)]
        args: install::UninstallArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand, Debug)]
enum AgentsCommand {
    /// Register a host the controller reaches itself over SSH (its agent runs with `--listen`); stored, so it survives restarts.
    Add {
        /// `ssh://USER@HOST[:PORT]`; ~/.ssh/config may supply HostName, User, Port, IdentityFile and ProxyJump.
        url: String,
        /// Private key to offer (absolute path; ed25519, ECDSA or RSA); the controller's ssh-agent is tried too.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// File holding the passphrase of an encrypted --identity (absolute path).
        #[arg(long, value_name = "FILE")]
        identity_passphrase_file: Option<PathBuf>,
        /// Go through this bastion: `ssh://USER@BASTION[:PORT]`.
        #[arg(long, value_name = "URL")]
        jump: Option<String>,
        /// The agent's Unix socket on the host (default /run/cosmos/agent.sock).
        #[arg(long, value_name = "PATH", conflicts_with = "port")]
        socket: Option<String>,
        /// The agent's loopback port on the host, instead of a socket (`cosmos agent --listen 127.0.0.1:PORT`).
        #[arg(long)]
        port: Option<u16>,
        /// Learn the host's key on first contact instead of refusing a host not in known_hosts; a changed key is still refused.
        #[arg(long)]
        accept_new_host_key: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Forget a registered host and close the controller's link to it.
    Remove {
        /// The host, as in `cosmos agents hosts`.
        host: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The hosts the controller reaches over SSH, and how each link stands.
    Hosts {
        #[command(flatten)]
        client: ClientArgs,
    },
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
    /// Let an agent take work again; with `--gpu`, return one quarantined GPU of it to scheduling.
    Undrain {
        /// Agent name.
        name: String,
        /// A quarantined GPU (its uuid) fixed by hand: the agent schedules it again.
        #[arg(long, value_name = "UUID")]
        gpu: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn main() -> std::process::ExitCode {
    // Called as `torchrun` (a link `cosmos up` puts on its agents' PATH), this
    // binary is the stand-in for the Cosmos Transfer container, so the local
    // cluster needs nothing else built.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name().is_some_and(|n| n == "torchrun") {
        let code = cosmos_standin::run(std::env::args_os().collect());
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // `cosmos job-supervise --serve …`: the process runtime's job supervisor,
    // started by the agent (hidden: not for people to type). It needs no
    // logging setup and no CLI parsing beyond its own.
    if std::env::args_os().nth(1).is_some_and(|a| a == cosmos_agent::supervise::SUBCOMMAND) {
        let code = cosmos_agent::supervise::main(std::env::args_os().skip(2));
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = match config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(config::ConfigError::Clap(e)) => e.exit(),
        Err(config::ConfigError::File(e)) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(cli.log_format);
    match run(cli) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("COSMOS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let _ = builder.with_ansi(std::io::stderr().is_terminal()).try_init();
        }
        LogFormat::Json => {
            use tracing_subscriber::layer::SubscriberExt as _;
            use tracing_subscriber::util::SubscriberInitExt as _;
            // Flattened, so a shipper finds `message` and the event's fields at the top level;
            // `trace_id` and `span_id` there too inside a traced operation.
            let format = tracing_subscriber::fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false);
            let _ = builder
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(cosmos_telemetry::logs::WithTraceIds(format))
                .finish()
                .with(cosmos_telemetry::logs::TraceIdsLayer)
                .try_init();
        }
    }
}

/// Runs one command; `Ok(false)` means it ran but what it waited for did not all succeed.
pub fn run(cli: Cli) -> anyhow::Result<bool> {
    run_checked(cli, false)
}

/// Runs one command; with `check_only`, a daemon runs its start-up checks and
/// returns before it opens, binds or starts anything (`cosmos config check`).
pub fn run_checked(cli: Cli, check_only: bool) -> anyhow::Result<bool> {
    match cli.command {
        Command::Version => {
            println!("cosmos {} (protocol v{})", env!("CARGO_PKG_VERSION"), cosmos_proto::PROTOCOL_VERSION);
            Ok(true)
        }
        Command::Controller {
            config: _,
            data_dir,
            api_listen,
            agent_listen,
            lost_after_ms,
            attempt_log_bytes_max,
            retain_days,
            known_hosts,
            ssh_config,
            ssh_keepalive_interval_ms,
            ssh_keepalive_max,
            cosmos,
            store,
            lease_ms,
            controller_id,
            advertise_api,
            advertise_agents,
        } => {
            let postgres = match store.as_deref().map(cosmos_controller::store::StoreLocation::parse) {
                None => None,
                Some(cosmos_controller::store::StoreLocation::Postgres(url)) => {
                    if lease_ms < 300 {
                        anyhow::bail!("--lease-ms {lease_ms}: give at least 300 (it is renewed every third of it)");
                    }
                    Some(cosmos_controller::daemon::PostgresOptions {
                        url,
                        lease_ms,
                        holder: controller_id,
                        advertise_api,
                        advertise_agents,
                    })
                }
                Some(cosmos_controller::store::StoreLocation::Sqlite(path)) => anyhow::bail!(
                    "--store {}: give a postgres:// URL; the SQLite store is always the data directory's (--data-dir)",
                    path.display()
                ),
            };
            let known_hosts = known_hosts.or_else(cosmos_ssh::known_hosts::default_path).ok_or_else(|| {
                anyhow::anyhow!("HOME is not set, so there is no ~/.ssh/known_hosts: give --known-hosts FILE")
            })?;
            let dialer = ssh::SshDialer {
                known_hosts,
                ssh_config,
                keepalive_interval_ms: ssh_keepalive_interval_ms,
                keepalive_max: ssh_keepalive_max,
            };
            let core = cosmos_controller::core::CoreConfig { lost_after_ms, ..Default::default() };
            let opts = cosmos_controller::daemon::ControllerOptions {
                data_dir,
                postgres,
                api_listen,
                agent_listen,
                frame_bytes_max: cosmos_proto::frame::FRAME_BYTES_MAX_DEFAULT,
                core,
                cosmos: cosmos.config(),
                attempt_log_bytes_max,
                dialer: Some(std::sync::Arc::new(dialer)),
                trace: trace_config("cosmos-controller", &[("host.name", up::hostname())])?,
                retain_days,
            };
            if !(retain_days >= 0.0 && retain_days.is_finite()) {
                anyhow::bail!(
                    "--retain-days {retain_days}: give a number of days, 0 or more (0 keeps finished jobs forever)"
                );
            }
            warn_if_exposed(api_listen, agent_listen);
            opts.cosmos
                .validate()
                .map_err(|e| anyhow::anyhow!("the Cosmos run settings (--cosmos-*, --run-*): {e}"))?;
            if check_only {
                return Ok(true);
            }
            actix::System::new().block_on(cosmos_controller::daemon::run(opts, shutdown_signal()))?;
            Ok(true)
        }
        Command::Agent { manage: Some(manage), .. } => match *manage {
            AgentManage::Install { args, client } => install::install(args, &client),
            AgentManage::Uninstall { args, client } => install::uninstall(args, &client),
        },
        Command::Agent {
            manage: None,
            config: _,
            controller,
            listen,
            listen_group,
            token_file,
            work_dir,
            simulated_gpus,
            nvml_lib,
            gpus,
            gpu_sample_interval_ms,
            vram_release_bound_ms,
            name,
            runtime,
            volumes,
            docker_network,
            cache_max_gib,
            metrics_listen,
            attempt_retain_s,
            work_disk_free_min_gib,
        } => {
            // clap requires both unless a subcommand is given.
            let (Some(token_file), Some(work_dir)) = (token_file, work_dir) else {
                anyhow::bail!("give --token-file FILE and --work-dir DIR");
            };
            let runtime = up::runtime_kind(&runtime, &work_dir, &volumes, docker_network)?;
            let gpu_source = match simulated_gpus {
                Some(spec) => up::GpuChoice::Simulated(spec),
                None => up::GpuChoice::Nvml(cosmos_agent::daemon::NvmlOptions {
                    lib_path: nvml_lib.unwrap_or_else(|| cosmos_agent::gpu::nvml::DEFAULT_NVML_LIB.into()),
                    selection: cosmos_agent::gpu::GpuSelection::parse(gpus.as_deref().unwrap_or("all"))?,
                    sample_interval_ms: gpu_sample_interval_ms,
                }),
            };
            let config = cosmos_agent::core::AgentConfig { vram_release_bound_ms, ..Default::default() };
            let link = match (controller, listen) {
                (_, Some(listen)) => cosmos_agent::daemon::ControllerLink::Listen(
                    cosmos_agent::daemon::ListenAddr::parse(&listen, listen_group).map_err(anyhow::Error::msg)?,
                ),
                (Some(addr), None) => cosmos_agent::daemon::ControllerLink::Dial(addr),
                (None, None) => anyhow::bail!("give --controller HOST:PORT (dial it) or --listen ADDR (wait for it)"),
            };
            if check_only {
                up::check_agent(&token_file, &gpu_source)?;
                return Ok(true);
            }
            let retention = cosmos_agent::retention::Policy {
                retain_s: attempt_retain_s,
                disk_free_min_bytes: work_disk_free_min_gib.saturating_mul(1 << 30),
            };
            let telemetry = up::AgentTelemetry { trace: None, metrics_listen };
            up::run_agent(
                link,
                token_file,
                work_dir,
                gpu_source,
                config,
                name,
                runtime,
                cache_max_gib,
                telemetry,
                retention,
            )?;
            Ok(true)
        }
        Command::Config(ConfigCommand::Check { file, role }) => config::check(&file, role.as_deref()),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "cosmos", &mut std::io::stdout());
            Ok(true)
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .map_err(|e| anyhow::anyhow!("cannot write the manual pages into {}: {e}", dir.display()))?;
            Ok(true)
        }
        Command::Up { data_dir, agents, gpus, client_command } => up::up(data_dir, agents, &gpus, client_command),
        Command::Jobs(cmd) => match cmd {
            JobsCommand::Prune { before, client } => prune::prune(&client, &before).map(|()| true),
            JobsCommand::Submit { file, wait, client } => jobs::submit(&client, &file, wait),
            JobsCommand::List { state, since, page, client } => {
                jobs::list(&client, state.as_deref(), since.as_deref(), &page).map(|()| true)
            }
            JobsCommand::Show { id, client } => jobs::show(&client, &id).map(|()| true),
            JobsCommand::Cancel { id, client } => jobs::cancel(&client, &id).map(|()| true),
            JobsCommand::Retry { id, client } => jobs::retry(&client, &id).map(|()| true),
            JobsCommand::Logs { id, follow, tail_bytes, client } => {
                jobs::logs(&client, &id, follow, tail_bytes).map(|()| true)
            }
            JobsCommand::Wait { ids, client } => jobs::wait(&client, &client::Client::new(&client)?, &ids),
        },
        Command::Agents(cmd) => match cmd {
            AgentsCommand::List { client } => jobs::agents(&client).map(|()| true),
            AgentsCommand::Add {
                url,
                identity,
                identity_passphrase_file,
                jump,
                socket,
                port,
                accept_new_host_key,
                client,
            } => {
                let entry = cosmos_controller::hosts::HostEntry {
                    url,
                    identity,
                    passphrase_file: identity_passphrase_file,
                    jump,
                    socket,
                    port,
                    accept_new_host_key,
                };
                ssh::add(&client, entry).map(|()| true)
            }
            AgentsCommand::Remove { host, client } => ssh::remove(&client, &host).map(|()| true),
            AgentsCommand::Hosts { client } => ssh::list(&client).map(|()| true),
            AgentsCommand::Drain { name, client } => jobs::drain(&client, &name, true).map(|()| true),
            AgentsCommand::Undrain { name, gpu: None, client } => jobs::drain(&client, &name, false).map(|()| true),
            AgentsCommand::Undrain { name, gpu: Some(uuid), client } => {
                jobs::release_gpu(&client, &name, &uuid).map(|()| true)
            }
        },
        Command::Status { client } => jobs::status(&client).map(|()| true),
        Command::Create(CreateCommand::Prompt { text, video_dir, name, negative, client }) => {
            cosmos::create_prompt(&client, &text, &video_dir, name, negative).map(|()| true)
        }
        Command::Inference { prompt_ids, params, then_upscale, upscale_weight, wait, client } => {
            let up = then_upscale.then(|| cosmos_controller::cosmos::UpscaleParams {
                weight: upscale_weight.unwrap_or(cosmos_controller::cosmos::UpscaleParams::default().weight),
                ..Default::default()
            });
            cosmos::inference(&client, &prompt_ids, &params, up, wait)
        }
        Command::Batch { file, wait, download, client } => {
            let (ok, runs) = cosmos::batch(&client, &file, wait || download.is_some(), download.is_none())?;
            match download {
                Some(dir) => {
                    let (downloaded, views, files) = cosmos::download_all(&client, &runs, &dir);
                    cosmos::print_files(&client, &views, &files)?;
                    Ok(ok && downloaded)
                }
                None => Ok(ok),
            }
        }
        Command::Upscale { run_id, after, weight, prompt, gpus, wait, client } => {
            let (run, after) = match (run_id, after) {
                (Some(run), _) => (run, false),
                (None, Some(run)) => (run, true),
                (None, None) => unreachable!("clap requires one of them"),
            };
            cosmos::upscale(&client, &run, after, weight, prompt, gpus, wait, true).map(|(ok, _)| ok)
        }
        Command::PromptEnhance { prompt_id, overwrite, yes, client } => {
            cosmos::prompt_enhance(&client, &prompt_id, overwrite, yes)
        }
        Command::Runs(cmd) => match cmd {
            RunsCommand::List { prompt, state, page, client } => {
                cosmos::list_runs(&client, prompt.as_deref(), state.as_deref(), &[], &page).map(|()| true)
            }
            RunsCommand::Show { id, client } => cosmos::show_run(&client, &id).map(|()| true),
            RunsCommand::Search { words, page, client } => {
                cosmos::list_runs(&client, None, None, &words, &page).map(|()| true)
            }
            RunsCommand::Cancel { id, client } => cosmos::cancel_run(&client, &id).map(|()| true),
            RunsCommand::Retry { id, client } => cosmos::retry_run(&client, &id).map(|()| true),
            RunsCommand::Logs { id, follow, tail_bytes, client } => {
                cosmos::run_logs(&client, &id, follow, tail_bytes).map(|()| true)
            }
            RunsCommand::Wait { ids, client } => cosmos::wait_runs_cmd(&client, &ids),
        },
        Command::Prompts(cmd) => match cmd {
            PromptsCommand::List { client } => cosmos::list_prompts(&client).map(|()| true),
            PromptsCommand::Show { id, client } => cosmos::show_prompt(&client, &id).map(|()| true),
            PromptsCommand::Delete { id, delete_outputs, client } => {
                cosmos::delete_prompt(&client, &id, delete_outputs).map(|()| true)
            }
        },
        Command::Download { run_id, to, client } => cosmos::download_cmd(&client, &run_id, &to).map(|()| true),
        Command::Demo { to, client } => cosmos::demo(&client, &to),
    }
}

/// Trace export settings from the `OTEL_*` variables: none when they configure no endpoint;
/// a setting this build cannot honour stops the daemon, saying which and what to do.
fn trace_config(service: &str, own: &[(&str, String)]) -> anyhow::Result<Option<cosmos_telemetry::TraceConfig>> {
    cosmos_telemetry::TraceConfig::from_env(service, own).map_err(|e| anyhow::anyhow!("traces: {e}"))
}

/// Says so when a listener is reachable from other hosts: whoever holds its
/// token can run commands on every GPU host, and the traffic is not encrypted.
fn warn_if_exposed(api_listen: SocketAddr, agent_listen: SocketAddr) {
    for (flag, addr, token) in
        [("--api-listen", api_listen, "api.token"), ("--agent-listen", agent_listen, "agent.token")]
    {
        if !addr.ip().is_loopback() {
            eprintln!(
                "warning: {flag} {addr} is reachable from other hosts: the token ({token}) is then the only protection, \
                 and the traffic is unencrypted TCP; listen on 127.0.0.1 unless this network is trusted"
            );
        }
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
