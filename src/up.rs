//! `cosmos agent` and `cosmos up`: running an agent, and a whole local cluster.

use crate::client::{Client, ClientArgs};
use anyhow::{Context, bail};
use cosmos_controller::http::AgentInfo;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `up` waits for its controller and agents to come up.
const STARTUP_TIMEOUT_MS: u64 = 30_000;
/// Variables of the stand-in that `up` hands to every run it creates, when set around it.
const STANDIN_ENV: [&str; 2] = [cosmos_standin::ENV_STEP_MS, cosmos_standin::ENV_FAIL];
/// How long a stopping child gets before it is killed.
const STOP_GRACE_MS: u64 = 10_000;

/// Where an agent's GPUs come from.
pub enum GpuChoice {
    /// `--simulated-gpus COUNTxSIZE`.
    Simulated(String),
    /// Real GPUs through NVML.
    Nvml(cosmos_agent::daemon::NvmlOptions),
}

/// What the agent exports besides its logs.
pub struct AgentTelemetry {
    /// Trace export settings; `None` reads them from the `OTEL_*` variables.
    pub trace: Option<cosmos_telemetry::TraceConfig>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What `cosmos config check` verifies of an agent beyond its flags: the
/// token file (present, long enough, readable by its owner only) and the
/// simulated GPUs' spelling. NVML is not loaded: that is the agent's start.
pub fn check_agent(token_file: &Path, gpu_choice: &GpuChoice) -> anyhow::Result<()> {
    read_token(token_file)?;
    if let GpuChoice::Simulated(spec) = gpu_choice {
        cosmos_agent::daemon::parse_simulated_gpus(spec)
            .map_err(|e| anyhow::anyhow!("--simulated-gpus {spec}: {e}"))?;
    }
    Ok(())
}

/// Reads the agent token, refused if empty, short or readable by others: it lets anyone run jobs as this host.
fn read_token(token_file: &Path) -> anyhow::Result<cosmos_proto::Token> {
    cosmos_proto::Token::read_file(token_file).map_err(|e| match e {
        cosmos_proto::TokenFileError::Io { .. } => {
            anyhow::anyhow!("{e}; copy agent.token from the controller's data directory (mode 0600)")
        }
        e => e.into(),
    })
}

/// Runs an agent until SIGTERM or Ctrl-C.
#[allow(clippy::too_many_arguments)]
pub fn run_agent(
    link: cosmos_agent::daemon::ControllerLink,
    token_file: PathBuf,
    work_dir: PathBuf,
    gpu_choice: GpuChoice,
    config: cosmos_agent::core::AgentConfig,
    name: Option<String>,
    runtime: cosmos_agent::daemon::RuntimeKind,
    cache_max_gib: u64,
    telemetry: AgentTelemetry,
    retention: cosmos_agent::retention::Policy,
) -> anyhow::Result<()> {
    let token = read_token(&token_file)?;
    let name = name.unwrap_or_else(hostname);
    let trace = match telemetry.trace {
        Some(t) => Some(t),
        None => crate::trace_config("cosmos-agent", &[("host.name", hostname()), ("cosmos.agent.name", name.clone())])?,
    };
    let (gpus, gpus_simulated, nvml) = match gpu_choice {
        GpuChoice::Simulated(spec) => {
            let gpus = cosmos_agent::daemon::parse_simulated_gpus(&spec)
                .map_err(|e| anyhow::anyhow!("--simulated-gpus {spec}: {e}"))?;
            tracing::warn!(
                agent = name,
                gpus = gpus.len(),
                "GPUs are SIMULATED (--simulated-gpus): jobs see CUDA_VISIBLE_DEVICES but no real device"
            );
            (gpus, true, cosmos_agent::daemon::NvmlOptions::default())
        }
        // Discovered by the daemon, which fails naming the library when there is none.
        GpuChoice::Nvml(nvml) => (Vec::new(), false, nvml),
    };
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("cannot create the work directory {}", work_dir.display()))?;
    // Resolved now, while it names this very binary: after an upgrade replaces
    // the file, `current_exe` would say "(deleted)", and the path (now the new
    // binary, which supervises the same way) is what later jobs need.
    let own_binary = std::env::current_exe()
        .context("cannot find the agent's own binary, which supervises each job (`cosmos job-supervise`)")?;
    let opts = cosmos_agent::daemon::AgentOptions {
        link,
        token,
        name,
        work_dir,
        gpus,
        gpus_simulated,
        frame_bytes_max: cosmos_proto::frame::FRAME_BYTES_MAX_DEFAULT,
        config,
        reconnect_min_ms: 100,
        reconnect_max_ms: 5_000,
        runtime,
        cache_max_bytes: cache_max_gib.saturating_mul(1 << 30),
        job_supervisor: cosmos_agent::supervise::Launcher::cosmos(own_binary),
        nvml,
        trace,
        metrics_listen: telemetry.metrics_listen,
        retention,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(cosmos_agent::daemon::run(opts, crate::shutdown_signal()))?;
    Ok(())
}

/// The runtime the agent's flags ask for.
pub fn runtime_kind(
    name: &str,
    work_dir: &Path,
    volumes: &[String],
    network: Option<String>,
) -> anyhow::Result<cosmos_agent::daemon::RuntimeKind> {
    if name == "process" {
        if !volumes.is_empty() || network.is_some() {
            bail!("--volume and --docker-network apply to the Docker runtime only: add --runtime docker");
        }
        return Ok(cosmos_agent::daemon::RuntimeKind::Process);
    }
    // The daemon fills in the agent's name and whether its GPUs are simulated.
    let mut config = cosmos_agent::docker::DockerConfig::new(String::new(), work_dir);
    for v in volumes {
        let (name, dir) = v.split_once('=').with_context(|| format!("--volume {v}: expected NAME=HOST_DIR"))?;
        config.volumes.insert(name.to_string(), PathBuf::from(dir));
    }
    config.network = network;
    Ok(cosmos_agent::daemon::RuntimeKind::Docker(config))
}

/// This host's name, as the kernel has it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "agent".into())
}

/// Children of `up`, stopped (agents first) when it ends, however it ends.
struct Cluster {
    controller: Option<Child>,
    agents: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let agents = std::mem::take(&mut self.agents);
        stop_all(agents);
        stop_all(self.controller.take().into_iter().collect());
    }
}

fn stop_all(mut children: Vec<Child>) {
    for c in &children {
        // SAFETY: kill(2) on a child pid we own; no memory is involved.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
    for c in &mut children {
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Starts a controller and `agents` agents; runs `client_command` against them, or waits for Ctrl-C.
pub fn up(data_dir: Option<PathBuf>, agents: usize, gpus: &str, client_command: Vec<String>) -> anyhow::Result<bool> {
    let temporary = data_dir.is_none();
    let dir = match data_dir {
        Some(d) => d,
        None => {
            let d = std::env::temp_dir().join(format!("cosmos-up-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            d
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the cosmos binary itself")?;
    let mut cluster = Cluster { controller: None, agents: Vec::new() };

    // The agents give jobs only the environment their spec names, so the
    // stand-in's knobs set around `cosmos up` travel as the runs' environment.
    let run_env: Vec<String> = STANDIN_ENV
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| format!("--run-env={name}={v}")))
        .collect();
    let mut controller = Command::new(&exe)
        .args(["controller", "--data-dir"])
        .arg(dir.join("controller"))
        .args(["--api-listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .args(&run_env)
        .stdout(Stdio::piped())
        .stderr(log_file(&dir, "controller.log")?)
        .spawn()
        .context("cannot start the controller")?;
    let stdout = controller.stdout.take().expect("piped");
    cluster.controller = Some(controller);
    let (api, agent_addr) = read_addresses(stdout)
        .with_context(|| format!("the controller did not start; see {}", dir.join("controller.log").display()))?;

    let token_file = dir.join("controller").join("agent.token");
    // Runs compile to `torchrun …`: under this name the cosmos binary is the
    // stand-in for the Cosmos Transfer container (see README, "The stand-in").
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    let torchrun = bin.join("torchrun");
    let _ = std::fs::remove_file(&torchrun);
    std::os::unix::fs::symlink(&exe, &torchrun)
        .with_context(|| format!("cannot link {} to {}", torchrun.display(), exe.display()))?;
    let path = match std::env::var_os("PATH") {
        Some(p) => std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(&p)))?,
        None => bin.clone().into_os_string(),
    };
    for i in 0..agents {
        let name = format!("local-{i}");
        let child = Command::new(&exe)
            .args(["agent", "--controller", &agent_addr, "--token-file"])
            .arg(&token_file)
            .arg("--work-dir")
            .arg(dir.join(&name))
            .args(["--simulated-gpus", gpus, "--name", &name])
            .env("PATH", &path)
            .stdout(log_file(&dir, &format!("{name}.log"))?)
            .stderr(log_file(&dir, &format!("{name}.log"))?)
            .spawn()
            .with_context(|| format!("cannot start agent {name}"))?;
        cluster.agents.push(child);
    }
    let args = ClientArgs {
        controller: Some(api.clone()),
        token: None,
        data_dir: Some(dir.join("controller")),
        json: false,
        reconnect_wait_s: crate::client::RECONNECT_WAIT_S_DEFAULT,
    };
    let client = Client::new(&args)?;
    wait_for_agents(&client, agents)?;

    eprintln!(
        "local cluster up: controller {api}, {agents} agents with simulated GPUs {gpus}; \
         Cosmos runs use the stand-in model ({})",
        torchrun.display()
    );
    eprintln!("  data, logs and job outputs: {}", dir.display());
    if client_command.is_empty() {
        eprintln!("  point the CLI at it:");
        eprintln!("    export COSMOS_CONTROLLER={api} COSMOS_DATA_DIR={}", dir.join("controller").display());
        eprintln!("    cosmos status");
        eprintln!("    cosmos demo          # the example batch of Cosmos Transfer runs and an upscale");
        eprintln!("  Ctrl-C stops it.");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(crate::shutdown_signal());
        eprintln!("stopping the local cluster; its data stays in {}", dir.display());
        if temporary {
            eprintln!("  remove it with `rm -rf {}`", dir.display());
        }
        return Ok(true);
    }
    // The client command sees this cluster through the same variables a user would set.
    // SAFETY: set before any other thread of this process reads the environment.
    unsafe {
        std::env::set_var("COSMOS_CONTROLLER", &api);
        std::env::set_var("COSMOS_DATA_DIR", dir.join("controller"));
    }
    let cli = <crate::Cli as clap::Parser>::try_parse_from(std::iter::once("cosmos".to_string()).chain(client_command))
        .map_err(|e| anyhow::anyhow!("the command after `--` is not a cosmos client command:\n{e}"))?;
    let ok = crate::run(cli);
    eprintln!(
        "the local cluster stops now; its data stays in {}: job logs in controller/logs/ (read one job's with `cosmos up --data-dir {} -- jobs logs JOB`), each attempt's files in local-N/attempts/att-N/",
        dir.display(),
        dir.display()
    );
    if temporary {
        eprintln!(
            "  it is a temporary directory: remove it with `rm -rf {}` (or pass --data-dir to keep one)",
            dir.display()
        );
    }
    ok
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .with_context(|| format!("cannot open {}", dir.join(name).display()))
}

/// Reads the controller's start-up lines for its API URL and agent address.
fn read_addresses(stdout: std::process::ChildStdout) -> anyhow::Result<(String, String)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("cosmos controller: API on ")
                && let Some((api, agents)) = rest.split_once(", agents on ")
            {
                let _ = tx.send((api.to_string(), agents.to_string()));
            }
        }
    });
    rx.recv_timeout(Duration::from_millis(STARTUP_TIMEOUT_MS)).context("timed out waiting for the controller's address")
}

fn wait_for_agents(client: &Client, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(STARTUP_TIMEOUT_MS);
    loop {
        let connected =
            client.get::<Vec<AgentInfo>>("/v1/agents").map(|a| a.iter().filter(|a| a.connected).count()).unwrap_or(0);
        if connected >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {connected} of {n} agents connected within {} s; see their logs", STARTUP_TIMEOUT_MS / 1000);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
