//! The agent's shell: connects to the controller (or waits for it, see
//! [`crate::listen`]), feeds the [`AgentCore`] with messages, runtime events
//! and GPU readings, wakes it when its next deadline comes
//! ([`AgentCore::next_deadline_ms`]; there is no fixed tick), and performs its outputs.
//!
//! Tasks: one reads frames from the controller, one writes them (writes are
//! not cancel-safe, so they happen in one place only), one dials; the main
//! loop owns the core and the runtime. Attempts outlive the connection and
//! the agent itself: on shutdown they keep running and the next agent
//! process adopts them.

use crate::core::{AgentConfig, AgentCore, Output};
use crate::docker::{DockerConfig, DockerRuntime};
pub use crate::listen::{ListenAddr, ListenError};
use crate::process::ProcessRuntime;
use crate::runtime::{EVENT_QUEUE_LEN, Runtime, StartRequest};
use crate::simulated::{SimulatedHost, SimulatedRuntime};
use cosmos_proto::Classify;
use cosmos_proto::handshake::{self, DEFAULT_HANDSHAKE_TIMEOUT_MS, HandshakeError, Hello, Refusal, Role, Token};
use cosmos_proto::retry::Backoff;
use cosmos_proto::{AgentMsg, BoxStream, Connection, ControllerFrame, ControllerMsg, GpuInfo, RecvError};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::pin;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bound on a TCP connect; the handshake has its own.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Pause before dialing the next of several controller addresses after one failed or refused (a standby).
const DIAL_NEXT_ADDR_MS: u64 = 100;
/// Messages waiting for the writer before runtime events are held back (log readers then wait).
const OUTBOX_LEN: usize = 64;
/// Messages handed to the writer task ahead of the socket.
const WRITER_QUEUE_LEN: usize = 16;
/// Messages read ahead from the controller.
const READER_QUEUE_LEN: usize = 64;
/// Encoded blob frames handed to the writer task; it sends them only when no message waits.
const BULK_QUEUE_LEN: usize = 4;
/// Messages the writer sends in a row while a blob frame waits, before it sends that one:
/// a job that logs without pause must not starve blob traffic. Also the most it puts in one write.
const CONTROL_BURST_MAX: u32 = 8;
/// How long shutdown waits for queued messages to reach the socket.
const CLOSE_TIMEOUT_MS: u64 = 2_000;
// The two Docker timers below are not the core's deadlines but I/O polling of
// the Docker daemon, which tells nobody when its state changes: a container
// left by a crash, or the daemon going away, is only found by asking.
/// How often the Docker runtime's reaper looks for containers no attempt claims (also after each reconcile).
const REAP_INTERVAL_MS: u64 = 60_000;
/// How often the Docker daemon is pinged, so that losing it (and getting it back) is logged.
const PING_INTERVAL_MS: u64 = 10_000;

/// Which runtime runs the attempts.
#[derive(Clone, Debug, Default)]
pub enum RuntimeKind {
    /// Plain local processes, each in its own process group (no images).
    #[default]
    Process,
    /// Docker containers through the Engine API. The daemon fills the
    /// configuration's `agent_name` and `gpus_simulated` from the
    /// [`AgentOptions`], and its `work_dir_root` too when that is empty.
    Docker(DockerConfig),
    /// No process runs: jobs are `cosmos-testjob` command lines played by timers on this
    /// host (see [`crate::simulated`]), for load tests of the controller with many agents
    /// in one process. The agent's startup log says so.
    Simulated(SimulatedHost),
}

/// The runtime the shell drives.
enum AgentRuntime {
    Process(ProcessRuntime),
    Docker(DockerRuntime),
    Simulated(SimulatedRuntime),
}

impl AgentRuntime {
    fn as_dyn(&mut self) -> &mut dyn Runtime {
        match self {
            AgentRuntime::Process(r) => r,
            AgentRuntime::Docker(r) => r,
            AgentRuntime::Simulated(r) => r,
        }
    }
}

/// How the agent and the controller find each other.
#[derive(Clone, Debug)]
pub enum ControllerLink {
    /// The agent dials the controller's agent port, `host:port`; several, comma-separated, for a
    /// leader and its standbys: it tries each in turn until one accepts (standbys refuse, naming the leader).
    Dial(String),
    /// The agent waits for the controller (which comes through SSH, or over a trusted network).
    Listen(ListenAddr),
}

impl std::fmt::Display for ControllerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControllerLink::Dial(addr) => f.write_str(addr),
            ControllerLink::Listen(addr) => write!(f, "(listening on {addr})"),
        }
    }
}

/// How to run an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Whether the agent dials the controller or waits for it, and where.
    pub link: ControllerLink,
    /// Shared token presented in the handshake.
    pub token: Token,
    /// This agent's name (its node id), usually the host name.
    pub name: String,
    /// Where attempts' directories (records, logs, outputs) live.
    pub work_dir: PathBuf,
    /// GPUs offered.
    pub gpus: Vec<GpuInfo>,
    /// The GPUs are simulated (no NVML): usage is reported as all free.
    pub gpus_simulated: bool,
    /// Largest frame sent or accepted.
    pub frame_bytes_max: u32,
    /// The core's tunables.
    pub config: AgentConfig,
    /// First wait before redialling the controller (when dialing).
    pub reconnect_min_ms: u64,
    /// Longest wait between dials.
    pub reconnect_max_ms: u64,
    /// Which runtime runs the attempts.
    pub runtime: RuntimeKind,
    /// Bound on the input cache (`<work_dir>/cache`); least recently used blobs no attempt needs go first.
    pub cache_max_bytes: u64,
    /// How the process runtime starts each job's supervisor (the `cosmos` binary, as `cosmos job-supervise`).
    pub job_supervisor: crate::supervise::Launcher,
    /// Real GPUs: where NVML is and which GPUs to offer. Used when `gpus_simulated` is false
    /// (then `gpus` is filled from discovery).
    pub nvml: NvmlOptions,
    /// Where the agent's spans are exported (OTLP); none: traces are off.
    pub trace: Option<cosmos_telemetry::TraceConfig>,
    /// Where the agent serves its own `/metrics` (loopback only); none: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How long delivered attempts' directories are kept, and the work disk's floor.
    pub retention: crate::retention::Policy,
}

/// How long a stopping agent waits for its last spans to reach the collector.
pub const TRACE_FLUSH_MS: u64 = 2_000;

/// How the agent reads real GPUs.
#[derive(Clone, Debug)]
pub struct NvmlOptions {
    /// The NVML library to load (`--nvml-lib`).
    pub lib_path: String,
    /// Which GPUs to offer (`--gpus`).
    pub selection: crate::gpu::GpuSelection,
    /// Time between two samples of every GPU.
    pub sample_interval_ms: u64,
}

impl Default for NvmlOptions {
    fn default() -> Self {
        NvmlOptions {
            lib_path: crate::gpu::nvml::DEFAULT_NVML_LIB.into(),
            selection: crate::gpu::GpuSelection::All,
            sample_interval_ms: crate::gpu::monitor::DEFAULT_SAMPLE_INTERVAL_MS,
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `--metrics-listen` cannot be served.
    #[error(transparent)]
    Metrics(crate::telemetry::MetricsListenError),
    /// The span exporter could not start.
    #[error("traces: {0}")]
    Traces(cosmos_telemetry::export::ExportError),
    /// The controller refused this agent for good (token, version, name).
    #[error("the controller at {addr} refused this agent: {refusal}")]
    Refused {
        /// The controller's address.
        addr: String,
        /// Its reason.
        refusal: Refusal,
    },
    /// Whatever listens at the address does not speak this agent's protocol.
    #[error("cannot talk to the controller at {addr}: {source}")]
    Protocol {
        /// The controller's address.
        addr: String,
        /// What went wrong.
        #[source]
        source: HandshakeError,
    },
    /// The agent cannot listen for the controller.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The controller address is not `host:port`.
    #[error("controller address `{addr}` is not HOST:PORT (e.g. controller.example:7070)")]
    BadAddress {
        /// What was given.
        addr: String,
    },
    /// Another agent holds the work directory.
    #[error(transparent)]
    Locked(#[from] cosmos_sync::dir_lock::DirLockError),
    /// The GPUs cannot be discovered or read.
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    /// The GPU monitor stopped: VRAM can no longer be measured, so leaks would go unseen.
    #[error("the GPU monitor stopped ({0}); restart the agent")]
    MonitorStopped(String),
    /// The work directory cannot be used.
    #[error("cannot use the agent's work directory {path}: {source}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` resolves (then returns `Ok`, leaving
/// attempts running) or the controller refuses it for good.
pub async fn run(opts: AgentOptions, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    // Polled once now, so a signal handler it installs is in place from the start.
    let mut shutdown = Box::pin(shutdown);
    if futures::FutureExt::now_or_never(&mut shutdown).is_some() {
        return Ok(());
    }
    if let ControllerLink::Dial(addr) = &opts.link {
        let valid_addr = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !valid_addr {
            return Err(AgentError::BadAddress { addr: addr.clone() });
        }
    }
    // Absolute, so attempts' records stay valid whatever directory the next agent starts in.
    let work_dir = std::fs::create_dir_all(&opts.work_dir)
        .and_then(|()| opts.work_dir.canonicalize())
        .map_err(|source| AgentError::WorkDir { path: opts.work_dir.clone(), source })?;
    // Held until the process ends: two agents on one directory would reap each other's attempts.
    let _lock = cosmos_sync::dir_lock::DirLock::acquire(&work_dir, "agent")?;
    // Bound before anything starts, so a socket in use is a plain error at once.
    let listener = match &opts.link {
        ControllerLink::Listen(addr) => Some(crate::listen::Listener::bind(addr).await?),
        ControllerLink::Dial(_) => None,
    };
    let mut gpus = opts.gpus.clone();
    let mut monitor = None;
    let mut sampler = None;
    if opts.gpus_simulated {
        qualify_simulated_uuids(&opts.name, &mut gpus);
    } else {
        let source = crate::gpu::nvml::NvmlSource::open(&opts.nvml.lib_path, &opts.nvml.selection)?;
        let d = crate::gpu::GpuSource::discovery(&source);
        gpus = d.gpus.iter().map(|g| g.info.clone()).collect();
        for g in &d.gpus {
            tracing::info!(index = g.info.index, uuid = g.info.uuid, name = g.info.name, total_vram_bytes = g.info.total_vram_bytes, mig = ?g.mig, "GPU found");
        }
        tracing::info!(
            driver = d.driver_version,
            nvml = d.nvml_version,
            library = opts.nvml.lib_path,
            gpus = gpus.len(),
            "GPUs read through NVML"
        );
        let (rx, sampling) = crate::gpu::monitor::spawn(Box::new(source), opts.nvml.sample_interval_ms)
            .map_err(|e| AgentError::MonitorStopped(format!("cannot start its thread: {e}")))?;
        monitor = Some(rx);
        sampler = Some(sampling);
    }
    let clock = std::time::Instant::now();
    let incarnation = incarnation();
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let (mut runtime, attempts_root) = match &opts.runtime {
        RuntimeKind::Process => {
            let runtime = ProcessRuntime::new(work_dir.clone(), event_tx, opts.job_supervisor.clone());
            (AgentRuntime::Process(runtime), work_dir)
        }
        RuntimeKind::Docker(config) => {
            let mut config = config.clone();
            config.agent_name = opts.name.clone();
            config.gpus_simulated = opts.gpus_simulated;
            if config.work_dir_root.as_os_str().is_empty() {
                config.work_dir_root = work_dir;
            } else {
                let root = config.work_dir_root.clone();
                config.work_dir_root = std::fs::create_dir_all(&root)
                    .and_then(|()| root.canonicalize())
                    .map_err(|source| AgentError::WorkDir { path: root, source })?;
            }
            if config.gpus_simulated {
                tracing::warn!(
                    agent = opts.name,
                    "GPUs are simulated: containers get their GPU assignment in CUDA_VISIBLE_DEVICES only, with no device request"
                );
            }
            let root = config.work_dir_root.clone();
            let docker = DockerRuntime::new(config, event_tx);
            if let Err(e) = docker.ping().await {
                tracing::error!(error = %e, "the Docker daemon does not answer: attempts fail to start (retryably) until it does");
            }
            (AgentRuntime::Docker(docker), root)
        }
        RuntimeKind::Simulated(host) => {
            tracing::warn!(
                agent = opts.name,
                "the runtime is SIMULATED: no process runs; jobs are cosmos-testjob command lines played by timers"
            );
            let runtime = SimulatedRuntime::new(host.clone(), work_dir.clone(), event_tx);
            (AgentRuntime::Simulated(runtime), work_dir)
        }
    };
    let cache_dir = attempts_root.join("cache");
    let cache = cosmos_cas::Store::open(&cache_dir)
        .map_err(|e| AgentError::WorkDir { path: cache_dir.clone(), source: std::io::Error::other(e.to_string()) })?;
    let cache = std::sync::Arc::new(cache);
    let (blobs, blobs_done) = crate::blobs::spawn(cache.clone(), opts.cache_max_bytes);
    let metrics = std::sync::Arc::new(crate::telemetry::AgentMetrics::new());
    if let Some(addr) = opts.metrics_listen {
        let listener = crate::telemetry::bind_metrics(addr).await.map_err(AgentError::Metrics)?;
        tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving /metrics");
        tokio::spawn(crate::telemetry::serve_metrics(listener, metrics.clone()));
    }
    if opts.gpus_simulated {
        let idle: Vec<cosmos_proto::GpuUsage> = gpus.iter().map(cosmos_proto::GpuUsage::idle).collect();
        metrics.gpus(&gpus, &idle);
    }
    let mut tracer = match &opts.trace {
        Some(config) => {
            let e = cosmos_telemetry::Exporter::start(config, "cosmos-agent", metrics.spans.clone())
                .map_err(AgentError::Traces)?;
            tracing::info!(
                endpoint = e.endpoint(),
                protocol = config.protocol.name(),
                service = config.service_name,
                "exporting spans over OTLP"
            );
            Some(crate::telemetry::AgentTracer::new(
                std::sync::Arc::new(e),
                runtime.as_dyn().name(),
                attempts_root.clone(),
            ))
        }
        None => None,
    };
    let recovered = runtime.as_dyn().recover();
    if let Some(t) = &mut tracer {
        t.recovered(recovered.iter().map(|r| r.attempt_id));
    }
    let adopted = recovered.iter().filter(|r| r.exited.is_none()).count();
    tracing::info!(
        agent = opts.name,
        controller = %opts.link,
        runtime = runtime.as_dyn().name(),
        gpus = gpus.len(),
        adopted,
        ended_while_away = recovered.len() - adopted,
        "agent starting"
    );
    let core = AgentCore::new(
        clock.elapsed().as_millis() as u64,
        opts.config.clone(),
        gpus.clone(),
        opts.gpus_simulated,
        runtime.as_dyn().name(),
        incarnation,
        recovered,
    );
    let backoff = Backoff::new(opts.reconnect_min_ms, opts.reconnect_max_ms, incarnation);
    let shell = Shell {
        incarnation,
        opts,
        gpus,
        clock,
        core,
        runtime,
        attempts_root,
        link: None,
        outbox: VecDeque::new(),
        backoff,
        reaping: None,
        docker_healthy: None,
        blobs,
        owners: crate::gpu::attribution::Owners::default(),
        cache,
        metrics,
        tracer,
        delivering: std::collections::HashMap::new(),
        sweeping: None,
    };
    shell.run(event_rx, blobs_done, monitor, sampler, listener, shutdown).await
}

/// Parses `--simulated-gpus COUNTxSIZE`, e.g. `8x80GiB` or `2x24GB`.
///
/// Units: `GiB`, `MiB`, `TiB` (powers of 1024) and `GB`, `MB`, `TB` (powers
/// of 1000), in any case. The GPUs get uuids `GPU-sim-<index>`; the agent
/// adds its name to them (`GPU-sim-<name>-<index>`) when it starts.
pub fn parse_simulated_gpus(s: &str) -> Result<Vec<GpuInfo>, String> {
    let form = "expected COUNTxSIZE, such as 8x80GiB (units GiB, MiB, TiB, GB, MB, TB)";
    let s = s.trim();
    let Some((count, size)) = s.split_once(['x', 'X']) else {
        return Err(format!("`{s}`: {form}"));
    };
    let count: u32 =
        count.trim().parse().ok().filter(|c| (1..=cosmos_proto::spec::GPUS_MAX).contains(c)).ok_or_else(|| {
            format!("GPU count `{count}` must be a whole number from 1 to {}", cosmos_proto::spec::GPUS_MAX)
        })?;
    let size = size.trim();
    let split = size.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(size.len());
    let (number, unit) = (&size[..split], size[split..].trim());
    let (unit, factor): (&str, f64) = match unit.to_ascii_lowercase().as_str() {
        "gib" => ("GiB", (1u64 << 30) as f64),
        "mib" => ("MiB", (1u64 << 20) as f64),
        "tib" => ("TiB", (1u64 << 40) as f64),
        "gb" => ("GB", 1e9),
        "mb" => ("MB", 1e6),
        "tb" => ("TB", 1e12),
        "" => return Err(format!("size `{size}` has no unit: {form}")),
        other => return Err(format!("unknown unit `{other}` in `{size}`: {form}")),
    };
    let value: f64 =
        number.parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| format!("size `{size}`: {form}"))?;
    let bytes = (value * factor).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("size `{size}` must be more than 0 bytes and less than 16 EiB"));
    }
    Ok((0..count)
        .map(|index| GpuInfo {
            index,
            uuid: format!("GPU-sim-{index}"),
            name: format!("Simulated GPU ({number} {unit})"),
            total_vram_bytes: bytes as u64,
        })
        .collect())
}

/// `GPU-sim-<index>` becomes `GPU-sim-<name>-<index>`, so simulated GPUs are
/// told apart across hosts in logs and listings.
fn qualify_simulated_uuids(name: &str, gpus: &mut [GpuInfo]) {
    for g in gpus {
        if let Some(rest) = g.uuid.strip_prefix("GPU-sim-") {
            if !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()) {
                g.uuid = format!("GPU-sim-{name}-{rest}");
            }
        }
    }
}

/// A live connection, as the main loop holds it (the receiving side is kept apart, see [`Link::open`]).
struct Link {
    /// Messages to the writer task; closed: the connection is gone.
    tx: mpsc::Sender<AgentMsg>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// A listening agent's one controller slot, freed when the link goes.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Messages from the reader task; an `Err` or the end: the connection is gone.
type Incoming = mpsc::Receiver<Result<ControllerMsg, RecvError>>;

impl Link {
    /// Blob frames from the controller go straight to the blob engine's
    /// `wire`, never through the main loop; the returned sender is the writer's bulk queue.
    fn open(
        conn: Connection<BoxStream>,
        wire: mpsc::Sender<cosmos_proto::ControllerBlob>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> (Link, Incoming, mpsc::Sender<Vec<u8>>) {
        let (mut reader, mut writer) = conn.split();
        let (in_tx, rx) = mpsc::channel(READER_QUEUE_LEN);
        let reader = tokio::spawn(async move {
            loop {
                let (msg, last) = match reader.read_frame().await {
                    Ok(Some(payload)) => match ControllerFrame::decode(&payload) {
                        Ok(ControllerFrame::Msg(msg)) => (Ok(msg), false),
                        Ok(ControllerFrame::Blob(blob)) => {
                            // Never wait here: messages behind this frame (a cancel) must not queue behind blob work.
                            if wire.try_send(blob).is_err() {
                                tracing::warn!(
                                    "the controller sent more blob frames than were asked for; reconnecting"
                                );
                                return;
                            }
                            continue;
                        }
                        Err(e) => (Err(RecvError::Codec(e)), true),
                    },
                    Ok(None) => return,
                    Err(e) => (Err(RecvError::Frame(e)), true),
                };
                if in_tx.send(msg).await.is_err() || last {
                    return;
                }
            }
        });
        let (tx, mut out_rx) = mpsc::channel::<AgentMsg>(WRITER_QUEUE_LEN);
        let (bulk_tx, mut bulk_rx) = mpsc::channel::<Vec<u8>>(BULK_QUEUE_LEN);
        let writer = tokio::spawn(async move {
            // Messages first: a heartbeat or a finish waits for one blob chunk at most. Yet after
            // CONTROL_BURST_MAX messages in a row, a waiting blob frame goes next.
            let mut burst = 0;
            loop {
                let bulk_turn = if burst >= CONTROL_BURST_MAX {
                    burst = 0;
                    bulk_rx.try_recv().ok()
                } else {
                    None
                };
                let sent = match bulk_turn {
                    Some(payload) => writer.write_frame(&payload).await.map_err(|e| e.to_string()),
                    None => tokio::select! {
                        biased;
                        msg = out_rx.recv() => match msg {
                            Some(msg) => {
                                // What else is ready goes in the same write (a start and a finish, log chunks).
                                let mut queued = writer.queue(&msg);
                                burst += 1;
                                while queued.is_ok() && burst < CONTROL_BURST_MAX {
                                    let Ok(more) = out_rx.try_recv() else { break };
                                    queued = writer.queue(&more);
                                    burst += 1;
                                }
                                match queued {
                                    Ok(()) => writer.flush_queued().await.map_err(|e| e.to_string()),
                                    Err(e) => Err(e.to_string()),
                                }
                            }
                            None => break,
                        },
                        Some(payload) = bulk_rx.recv() => {
                            burst = 0;
                            writer.write_frame(&payload).await.map_err(|e| e.to_string())
                        }
                    },
                };
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "sending to the controller failed");
                    return;
                }
            }
            let _ = writer.shutdown().await;
        });
        (Link { tx, reader, writer, _slot: slot }, rx, bulk_tx)
    }

    /// Drops the connection at once.
    fn abort(self) {
        self.reader.abort();
        self.writer.abort();
    }

    /// Lets the writer send what it holds and close the connection.
    async fn close(self) {
        self.reader.abort();
        drop(self.tx);
        let mut writer = self.writer;
        if tokio::time::timeout(Duration::from_millis(CLOSE_TIMEOUT_MS), &mut writer).await.is_err() {
            writer.abort();
        }
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("connecting timed out after {CONNECT_TIMEOUT_MS} ms")]
    ConnectTimeout,
    #[error("handshake failed: {0}")]
    Handshake(HandshakeError),
}

async fn dial(addr: String, hello: Hello, frame_bytes_max: u32) -> Result<Connection<BoxStream>, DialError> {
    let stream = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), TcpStream::connect(&addr))
        .await
        .map_err(|_| DialError::ConnectTimeout)?
        .map_err(DialError::Connect)?;
    let _ = stream.set_nodelay(true);
    let mut conn = Connection::new(Box::new(stream) as BoxStream, frame_bytes_max);
    handshake::connect(&mut conn, &hello, DEFAULT_HANDSHAKE_TIMEOUT_MS).await.map_err(DialError::Handshake)?;
    Ok(conn)
}

/// The main loop's state.
struct Shell {
    /// This process's incarnation, sent in every handshake.
    incarnation: u64,
    opts: AgentOptions,
    gpus: Vec<GpuInfo>,
    clock: std::time::Instant,
    core: AgentCore,
    runtime: AgentRuntime,
    /// Where attempts' directories live (`attempts/<id>` under it).
    attempts_root: PathBuf,
    link: Option<Link>,
    /// Messages for the controller, in order, waiting for room in the writer's queue.
    outbox: VecDeque<AgentMsg>,
    backoff: Backoff,
    /// The Docker reaper's run in progress, if any.
    reaping: Option<JoinHandle<()>>,
    /// Whether the Docker daemon answered the last ping (`None`: none answered yet).
    docker_healthy: Option<bool>,
    /// The blob engine (inputs in, outputs out).
    blobs: crate::blobs::Handle,
    /// Attempts' runtime handles, to tell their GPU processes from foreign ones.
    owners: crate::gpu::attribution::Owners,
    /// The host's input cache, asked (read-only) whether an attempt's inputs are there already.
    cache: std::sync::Arc<cosmos_cas::Store>,
    metrics: std::sync::Arc<crate::telemetry::AgentMetrics>,
    /// The agent's spans; `None` while traces are not exported.
    tracer: Option<crate::telemetry::AgentTracer>,
    /// Output bytes of each delivery in progress, counted once delivered.
    delivering: std::collections::HashMap<cosmos_proto::AttemptId, u64>,
    /// The retention sweep in progress, if any.
    sweeping: Option<JoinHandle<()>>,
}

impl Shell {
    /// Milliseconds since the agent started: the core's clock, never the wall clock.
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Docker: removes containers of this agent that no live attempt claims, in the background.
    fn reap(&mut self) {
        let AgentRuntime::Docker(docker) = &self.runtime else { return };
        if self.reaping.as_ref().is_some_and(|r| !r.is_finished()) {
            return;
        }
        let live: Vec<_> = self.core.live_attempts().map(|(id, _)| id).collect();
        let reap = docker.reap(&live);
        self.reaping = Some(tokio::spawn(async move {
            match reap.await {
                Ok(removed) if !removed.is_empty() => {
                    tracing::warn!(?removed, "removed containers that no attempt claims")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "the reaper cannot list this agent's containers"),
            }
        }));
    }

    /// Removes delivered attempts' directories past retention (or early, on a
    /// low disk), in the background; one sweep at a time.
    fn sweep(&mut self) {
        if self.sweeping.as_ref().is_some_and(|s| !s.is_finished()) {
            return;
        }
        let live = self.core.live_attempts().map(|(id, _)| id).collect();
        let (root, policy) = (self.attempts_root.clone(), self.opts.retention.clone());
        self.sweeping = Some(tokio::task::spawn_blocking(move || {
            crate::retention::sweep(&root, &live, &policy);
        }));
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<crate::core::RuntimeEvent>,
        mut blobs_done: mpsc::UnboundedReceiver<crate::blobs::Done>,
        mut monitor: Option<mpsc::Receiver<crate::gpu::monitor::Report>>,
        sampler: Option<crate::gpu::monitor::Sampling>,
        listener: Option<crate::listen::Listener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let mut shutdown = pin!(shutdown);
        // Simulated GPUs are never sampled: the core counts a GPU it has no reading of as idle,
        // which is all a simulated one ever is.
        let hello = Hello {
            role: Role::Agent,
            node_id: self.opts.name.clone(),
            token: self.opts.token.clone(),
            incarnation: self.incarnation,
        };
        let mut dialing: Option<JoinHandle<Result<Connection<BoxStream>, DialError>>> = None;
        let dial_addrs: Vec<String> = match &self.opts.link {
            ControllerLink::Dial(addrs) => {
                addrs.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect()
            }
            ControllerLink::Listen(_) => Vec::new(),
        };
        // Which address dials next: kept while it works, moved on when it fails or refuses.
        let mut dial_next = 0usize;
        let dial_addr = match &self.opts.link {
            ControllerLink::Dial(_) => dial_addrs.first().cloned(),
            ControllerLink::Listen(_) => None,
        };
        let link_name = self.opts.link.to_string();
        // A listening agent: connections whose handshake passed come from the accept task.
        let (accepted_tx, mut accepted) = mpsc::channel::<crate::listen::Accepted>(1);
        let accept_task = listener.map(|l| {
            crate::listen::spawn(l, hello.clone(), self.opts.token.clone(), self.opts.frame_bytes_max, accepted_tx)
        });
        let mut next_dial = Instant::now();
        // The last dial failure, so a controller that stays down is logged once, not at every retry.
        let mut last_failure: Option<String> = None;
        let mut failures = 0u32;
        let mut incoming: Option<Incoming> = None;
        let docker = matches!(self.runtime, AgentRuntime::Docker(_));
        let mut reap_timer = tokio::time::interval(Duration::from_millis(REAP_INTERVAL_MS));
        let mut ping_timer = tokio::time::interval(Duration::from_millis(PING_INTERVAL_MS));
        let (ping_tx, mut ping_rx) = mpsc::channel::<Result<(), String>>(1);
        // Ticks in this very loop, so a wedged loop stops the pings and systemd restarts the agent.
        let mut watchdog_timer = tokio::time::interval(crate::service::ping_interval());
        let mut sweep_timer = tokio::time::interval(Duration::from_millis(crate::retention::SWEEP_INTERVAL_MS));
        let mut last_status = None;
        // How long one GPU sample may take before the agent stops.
        let stall_ms = crate::gpu::monitor::stall_bound_ms(self.opts.nvml.sample_interval_ms);
        crate::service::ready(&self.service_status());
        loop {
            let mut out = Vec::new();
            let mut lost: Option<String> = None;
            // The futures below borrow only locals, so their handlers may use `self` freely.
            let writer_tx = if self.outbox.is_empty() { None } else { self.link.as_ref().map(|l| l.tx.clone()) };
            let events_open = self.outbox.len() < OUTBOX_LEN;
            // Asked again after every input: any of them may move the core's next deadline.
            let wake = self.core.next_deadline_ms().map(|ms| Instant::from_std(self.clock + Duration::from_millis(ms)));
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                // Second, so a busy loop (a job logging without pause) cannot starve the pings.
                _ = watchdog_timer.tick() => {
                    if let Some(taken_ms) = sampler.as_ref().and_then(|s| s.in_sample_ms()).filter(|&ms| ms > stall_ms) {
                        return Err(AgentError::MonitorStopped(format!(
                            "no GPU sample for {taken_ms} ms (bound {stall_ms} ms): NVML calls are not returning, \
                             as with a wedged driver; check `nvidia-smi` and the kernel log"
                        )));
                    }
                    crate::service::alive(&self.service_status(), &mut last_status)
                }
                () = async { tokio::time::sleep_until(wake.expect("guarded")).await }, if wake.is_some() => {
                    let now = self.now_ms();
                    self.core.tick(now, &mut out);
                }
                joined = async { dialing.as_mut().expect("guarded").await }, if dialing.is_some() => {
                    dialing = None;
                    let result = joined.unwrap_or_else(|e| {
                        Err(DialError::Connect(std::io::Error::other(format!("dial task failed: {e}"))))
                    });
                    match result {
                        Ok(conn) => {
                            tracing::info!(controller = link_name, failed_dials = failures, "connected to the controller");
                            failures = 0;
                            last_failure = None;
                            self.backoff.reset();
                            incoming = Some(self.link_up(conn, None, &mut out));
                        }
                        Err(DialError::Handshake(HandshakeError::Refused(refusal)))
                            if !matches!(refusal, Refusal::Other(_)) =>
                        {
                            return Err(AgentError::Refused { addr: link_name.clone(), refusal });
                        }
                        Err(DialError::Handshake(e)) if !e.is_retryable() && !matches!(e, HandshakeError::Refused(_)) => {
                            return Err(AgentError::Protocol { addr: link_name.clone(), source: e });
                        }
                        Err(e) => {
                            failures += 1;
                            dial_next += 1;
                            // Through the list at once; the backoff only after every address failed.
                            let delay = if dial_next % dial_addrs.len().max(1) == 0 {
                                self.backoff.next_delay()
                            } else {
                                Duration::from_millis(DIAL_NEXT_ADDR_MS)
                            };
                            let message = e.to_string();
                            if last_failure.as_deref() != Some(message.as_str()) {
                                tracing::warn!(
                                    controller = link_name,
                                    error = %message,
                                    retry_max_ms = self.backoff.max_ms(),
                                    "cannot reach the controller; retrying with backoff (repeats of this error are not logged)"
                                );
                                last_failure = Some(message);
                            } else {
                                tracing::debug!(controller = link_name, error = %message, "dial failed again");
                            }
                            next_dial = Instant::now() + delay;
                        }
                    }
                }
                () = tokio::time::sleep_until(next_dial), if dial_addr.is_some() && dialing.is_none() && incoming.is_none() => {
                    let addr = dial_addrs.get(dial_next % dial_addrs.len().max(1)).cloned().or_else(|| dial_addr.clone()).expect("guarded");
                    dialing = Some(tokio::spawn(dial(addr, hello.clone(), self.opts.frame_bytes_max)));
                }
                Some(acc) = accepted.recv(), if accept_task.is_some() => {
                    // The accept task hands over one connection at a time (the slot), so no link is live here.
                    tracing::info!(controller = acc.peer, "the controller connected");
                    incoming = Some(self.link_up(acc.conn, Some(acc.slot), &mut out));
                }
                msg = async { incoming.as_mut().expect("guarded").recv().await }, if incoming.is_some() => {
                    match msg {
                        Some(Ok(msg)) => {
                            if let (ControllerMsg::Assign(a), Some(t)) = (&msg, &mut self.tracer) {
                                t.assigned(a);
                            }
                            let now = self.now_ms();
                            self.core.on_message(now, msg, &mut out);
                        }
                        Some(Err(e)) => lost = Some(format!("reading from the controller failed: {e}")),
                        None => lost = Some("the controller closed the connection".into()),
                    }
                }
                permit = async { writer_tx.expect("guarded").reserve_owned().await }, if writer_tx.is_some() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(msg) = self.outbox.pop_front() {
                                permit.send(msg);
                            }
                        }
                        Err(_) => lost = Some("sending to the controller failed".into()),
                    }
                }
                Some(done) = blobs_done.recv() => {
                    let now = self.now_ms();
                    match done {
                        crate::blobs::Done::Staged { attempt_id, result } => {
                            if let Some(t) = &mut self.tracer {
                                t.staged(attempt_id, result.as_ref().err().map(|e| e.reason.as_str()));
                            }
                            self.core.on_staged(now, attempt_id, result, &mut out)
                        }
                        crate::blobs::Done::Uploaded { attempt_id, result } => {
                            let bytes = self.delivering.remove(&attempt_id).unwrap_or(0);
                            if result.is_ok() {
                                self.metrics.output_bytes.inc_by(bytes);
                            }
                            if let Some(t) = &mut self.tracer {
                                t.delivered(attempt_id, result.as_ref().err().map(String::as_str));
                            }
                            self.core.on_uploaded(now, attempt_id, result, &mut out)
                        }
                    }
                }
                Some(event) = events.recv(), if events_open => {
                    if let crate::core::RuntimeEvent::Started { attempt_id, handle } = &event {
                        self.owners.insert(*attempt_id, handle);
                    }
                    self.observe_runtime(&event);
                    let now = self.now_ms();
                    self.core.on_runtime(now, event, &mut out);
                }
                report = async { monitor.as_mut().expect("guarded").recv().await }, if monitor.is_some() => {
                    let now = self.now_ms();
                    match report {
                        Some(crate::gpu::monitor::Report::Samples(samples)) => {
                            let owners = &self.owners;
                            let readings: Vec<_> = samples
                                .iter()
                                .map(|s| crate::gpu::attribution::reading(s, |pid| owners.owner_of(pid)))
                                .collect();
                            let usage: Vec<_> = readings.iter().map(|r| r.usage.clone()).collect();
                            self.metrics.gpus(&self.gpus, &usage);
                            self.core.on_gpu_readings(now, readings, &mut out);
                        }
                        Some(crate::gpu::monitor::Report::Event(crate::gpu::HealthEvent::Xid { uuid, xid })) => {
                            if self.core.on_gpu_xid(now, &uuid, xid, &mut out) {
                                tracing::error!(gpu = uuid, xid, "critical Xid: GPU quarantined");
                            } else {
                                tracing::warn!(gpu = uuid, xid, "Xid caused by an application; the GPU stays in service");
                            }
                        }
                        Some(crate::gpu::monitor::Report::Event(crate::gpu::HealthEvent::DoubleBitEcc { uuid })) => {
                            tracing::error!(gpu = uuid, "double-bit ECC error: GPU quarantined");
                            let detail = format!("double-bit (uncorrectable) ECC error reported by the driver; the GPU needs a reset (`nvidia-smi -r`), then `cosmos agents undrain HOST --gpu {uuid}`");
                            self.core.on_gpu_error(now, &uuid, detail, &mut out);
                        }
                        None => return Err(AgentError::MonitorStopped("its thread ended".into())),
                    }
                }
                _ = sweep_timer.tick() => self.sweep(),
                _ = reap_timer.tick(), if docker => self.reap(),
                _ = ping_timer.tick(), if docker => {
                    if let AgentRuntime::Docker(rt) = &self.runtime {
                        let (ping, tx) = (rt.ping(), ping_tx.clone());
                        tokio::spawn(async move {
                            let _ = tx.try_send(ping.await.map_err(|e| e.to_string()));
                        });
                    }
                }
                Some(result) = ping_rx.recv() => {
                    let healthy = result.is_ok();
                    self.core.set_unhealthy(result.as_ref().err().map(|e| format!("the Docker daemon does not answer: {e}")));
                    if self.docker_healthy != Some(healthy) {
                        match result {
                            Ok(()) => tracing::info!("the Docker daemon answers"),
                            // Heartbeats say so from now on: the controller places no work here meanwhile.
                            Err(e) => tracing::error!(error = %e, "this agent cannot run containers until the Docker daemon answers"),
                        }
                        self.docker_healthy = Some(healthy);
                    }
                }
            }
            if let Some(reason) = self.perform(out) {
                lost = Some(reason);
            }
            self.metrics.attempts_live.set(self.core.live_attempts().count() as i64);
            if let Some(reason) = lost {
                incoming = None;
                if let Some(link) = self.link.take() {
                    if dial_addr.is_some() {
                        // The leader may be gone for good: a standby takes over at another address.
                        if dial_addrs.len() > 1 {
                            dial_next += 1;
                        }
                        tracing::warn!(controller = link_name, %reason, "lost the controller; reconnecting");
                    } else {
                        tracing::warn!(controller = link_name, %reason, "lost the controller; waiting for it to connect again");
                    }
                    link.abort();
                    let _ = self.blobs.commands.send(crate::blobs::Command::LinkDown);
                    self.core.disconnected();
                    self.outbox.clear();
                    next_dial = Instant::now() + self.backoff.next_delay();
                }
            }
        }
        tracing::info!("agent shutting down; running attempts keep running and are adopted at the next start");
        crate::service::stopping();
        if let Some(task) = dialing {
            task.abort();
        }
        if let Some(task) = accept_task {
            task.abort();
        }
        if let Some(task) = self.reaping.take() {
            task.abort();
        }
        if let Some(link) = self.link.take() {
            self.core.disconnected();
            link.close().await;
        }
        if let Some(t) = self.tracer.take() {
            // Dropping the exporter would lose what is still queued.
            let e = t.exporter().clone();
            let flushed = tokio::task::spawn_blocking(move || e.shutdown(Duration::from_millis(TRACE_FLUSH_MS))).await;
            if !flushed.unwrap_or(false) {
                tracing::warn!(
                    wait_ms = TRACE_FLUSH_MS,
                    "the last spans did not reach the collector in time; they are lost"
                );
            }
        }
        Ok(())
    }

    /// Counts and traces what the runtime reports.
    fn observe_runtime(&mut self, event: &crate::core::RuntimeEvent) {
        use crate::core::RuntimeEvent;
        match event {
            RuntimeEvent::Started { attempt_id, handle } => {
                if let Some(t) = &mut self.tracer {
                    t.started(*attempt_id, Ok(handle.as_str()));
                }
            }
            RuntimeEvent::StartFailed { attempt_id, reason, .. } => {
                if let Some(t) = &mut self.tracer {
                    t.started(*attempt_id, Err(reason.as_str()));
                }
            }
            RuntimeEvent::Exited { attempt_id, status, .. } => {
                let how = match status {
                    s if s.oom_killed => "oom_killed",
                    s if s.signal.is_some() => "signalled",
                    s if s.code == Some(0) => "exited_0",
                    _ => "exited_nonzero",
                };
                self.metrics.exits.get_or_create(&crate::telemetry::ExitLabel { how }).inc();
                if let Some(t) = &mut self.tracer {
                    t.exited(*attempt_id, status.code, status.signal, status.oom_killed);
                }
            }
            _ => {}
        }
    }

    /// What `systemctl status` shows of this agent.
    fn service_status(&self) -> crate::service::Status {
        crate::service::Status {
            connected: self.core.is_connected(),
            controller: self.opts.link.to_string(),
            attempts: self.core.live_attempts().count(),
            gpus: self.gpus.len(),
            quarantined: self.core.faulty_gpus().count(),
        }
    }

    /// Starts serving a connection whose handshake passed; returns what the controller says on it.
    fn link_up(
        &mut self,
        conn: Connection<BoxStream>,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
        out: &mut Vec<Output>,
    ) -> Incoming {
        let (link, rx, bulk) = Link::open(conn, self.blobs.wire.clone(), slot);
        let _ = self.blobs.commands.send(crate::blobs::Command::LinkUp { bulk });
        self.link = Some(link);
        self.outbox.clear();
        let now = self.now_ms();
        self.core.connected(now, out);
        rx
    }

    /// Carries out the core's outputs; returns why the link must be dropped, if it must.
    fn perform(&mut self, out: Vec<Output>) -> Option<String> {
        let mut lost = None;
        for o in out {
            match o {
                Output::Send(msg) => {
                    // Not connected: the core re-reports what matters in its next hello.
                    if self.link.is_some() {
                        self.outbox.push_back(msg);
                    }
                }
                Output::Start { attempt_id, job_id, epoch, spec, gpu_uuids } => {
                    let _log = self.tracer.as_ref().map(|t| t.log_span(attempt_id).entered());
                    if let Some(t) = &mut self.tracer {
                        t.starting(attempt_id);
                    }
                    let gpu_indices = gpu_uuids
                        .iter()
                        .filter_map(|u| self.gpus.iter().find(|g| &g.uuid == u).map(|g| g.index))
                        .collect();
                    let work_dir = crate::runtime::attempt_dir(&self.attempts_root, attempt_id);
                    tracing::info!(attempt = %attempt_id, job = %job_id, gpus = ?gpu_uuids, "starting attempt");
                    self.runtime.as_dyn().start(StartRequest {
                        attempt_id,
                        job_id,
                        epoch,
                        spec: *spec,
                        gpu_uuids,
                        gpu_indices,
                        work_dir,
                    });
                }
                Output::Stop { attempt_id, grace_ms } => {
                    let _log = self.tracer.as_ref().map(|t| t.log_span(attempt_id).entered());
                    if let Some(t) = &mut self.tracer {
                        t.stopping(attempt_id, grace_ms);
                    }
                    tracing::info!(attempt = %attempt_id, grace_ms, "stopping attempt");
                    self.runtime.as_dyn().stop(attempt_id, grace_ms);
                }
                Output::Reconnect => {
                    lost = Some(format!("no heartbeat acknowledged for {} ms", self.opts.config.ack_timeout_ms));
                }
                Output::Stage { attempt_id, inputs } => {
                    let _log = self.tracer.as_ref().map(|t| t.log_span(attempt_id).entered());
                    let (mut hits, mut hit_bytes) = (0u64, 0u64);
                    for i in &inputs {
                        let held = self.cache.size(&i.sha256) == Some(i.size_bytes);
                        let cache = if held { "hit" } else { "miss" };
                        let label = crate::telemetry::CacheLabel { cache };
                        self.metrics.inputs.get_or_create(&label).inc();
                        self.metrics.input_bytes.get_or_create(&label).inc_by(i.size_bytes);
                        if held {
                            hits += 1;
                            hit_bytes += i.size_bytes;
                        }
                    }
                    if let Some(t) = &mut self.tracer {
                        t.staging(attempt_id, inputs.clone(), hits, hit_bytes);
                    }
                    let work_dir = crate::runtime::attempt_dir(&self.attempts_root, attempt_id);
                    tracing::info!(attempt = %attempt_id, inputs = inputs.len(), "staging inputs");
                    let _ = self.blobs.commands.send(crate::blobs::Command::Stage { attempt_id, work_dir, inputs });
                }
                Output::AbortStage { attempt_id } => {
                    let _ = self.blobs.commands.send(crate::blobs::Command::AbortStage { attempt_id });
                }
                Output::Upload { attempt_id, outputs } => {
                    let _log = self.tracer.as_ref().map(|t| t.log_span(attempt_id).entered());
                    if let Some(t) = &mut self.tracer {
                        t.delivering(attempt_id, &outputs);
                    }
                    self.delivering.insert(attempt_id, outputs.iter().map(|o| o.size_bytes).sum());
                    let work_dir = crate::runtime::attempt_dir(&self.attempts_root, attempt_id);
                    tracing::info!(attempt = %attempt_id, outputs = outputs.len(), "delivering outputs");
                    let _ = self.blobs.commands.send(crate::blobs::Command::Upload { attempt_id, work_dir, outputs });
                }
                Output::AbortUpload { attempt_id } => {
                    let _ = self.blobs.commands.send(crate::blobs::Command::AbortUpload { attempt_id });
                }
                Output::Forget { attempt_id } => {
                    if let Some(t) = &mut self.tracer {
                        t.forget(attempt_id);
                    }
                    self.runtime.as_dyn().acknowledged(attempt_id);
                    let _ = self.blobs.commands.send(crate::blobs::Command::Release { attempt_id });
                }
                Output::Reap => self.reap(),
                Output::KillStrays { attempt_id, pids } => {
                    for pid in pids {
                        // Checked again just before: a pid seen a sample ago may have been reused.
                        if self.owners.owner_of(pid) != Some(attempt_id) {
                            continue;
                        }
                        tracing::warn!(attempt = %attempt_id, pid, "killing a process of an ended attempt that still holds GPU memory");
                        // SAFETY: kill(2) with a pid just checked to belong to this agent's attempt.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            }
        }
        lost
    }
}

/// Differs at every agent start, so the controller tells a restart from a reconnect.
fn incarnation() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_gpus_parse_with_their_units() {
        let gpus = parse_simulated_gpus("8x80GiB").unwrap();
        assert_eq!(gpus.len(), 8);
        assert_eq!(gpus[7].index, 7);
        assert_eq!(gpus[7].uuid, "GPU-sim-7");
        assert_eq!(gpus[0].name, "Simulated GPU (80 GiB)");
        assert_eq!(gpus[0].total_vram_bytes, 80 << 30);
        assert_eq!(parse_simulated_gpus("2x24GB").unwrap()[1].total_vram_bytes, 24_000_000_000);
        assert_eq!(parse_simulated_gpus(" 1 x 512mib ").unwrap()[0].total_vram_bytes, 512 << 20);
        assert_eq!(parse_simulated_gpus("1x0.5GiB").unwrap()[0].total_vram_bytes, 512 << 20);
    }

    #[test]
    fn bad_simulated_gpus_say_what_is_wrong() {
        for (input, says) in [
            ("8", "COUNTxSIZE"),
            ("0x80GiB", "count"),
            ("65x80GiB", "count"),
            ("ax80GiB", "count"),
            ("8x80", "no unit"),
            ("8x80PB", "unknown unit"),
            ("8xGiB", "8x80GiB"),
            ("8x0GiB", "more than 0"),
        ] {
            let err = parse_simulated_gpus(input).expect_err(input);
            assert!(err.contains(says), "{input}: {err}");
        }
    }

    #[test]
    fn simulated_uuids_carry_the_agent_name() {
        let mut gpus = parse_simulated_gpus("2x1GiB").unwrap();
        gpus.push(GpuInfo { index: 2, uuid: "GPU-1234".into(), name: "real".into(), total_vram_bytes: 1 });
        qualify_simulated_uuids("host-a", &mut gpus);
        let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(uuids, ["GPU-sim-host-a-0", "GPU-sim-host-a-1", "GPU-1234"]);
    }
}
