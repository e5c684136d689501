//! The controller process: the core in an actix actor, a store-writer thread
//! behind a group-commit queue, the agents' TCP listener and the HTTP API.
//!
//! The shells only feed inputs to the core and perform its outputs. Sends,
//! closes and API replies that follow a persist wait until the writer thread
//! reports that persist durable, in order, so nobody observes a decision the
//! store could still lose.

use crate::api;
use crate::core::{AgentView, CommandError, ConnId, Core, CoreConfig, Output, SubmitError};
use crate::model::{JobRecord, StoreOp};
use crate::store::Store;
use actix::prelude::*;
use cosmos_proto::handshake::{self, DEFAULT_HANDSHAKE_TIMEOUT_MS, Role, Token};
use cosmos_proto::{AgentFrame, AgentMsg, AttemptId, Connection, ControllerMsg, JobId, JobSpec, LogStream};
use cosmos_sync::{CommitQueue, Ticket};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Messages waiting for one agent connection's writer before it is deemed stuck.
pub const CONN_QUEUE_LEN: usize = 4096;
/// Store operations waiting for the writer before the core waits (backpressure).
pub const MAX_PENDING_STORE_OPS: usize = 1_000_000;
/// How often the core's clock-driven work runs.
pub const TICK_MS: u64 = 100;
/// Agent connections that may be in their handshake at once; more are closed
/// at once, so peers that connect and say nothing cannot exhaust memory or descriptors.
pub const HANDSHAKES_PENDING_MAX: usize = 64;
/// Bound on an agent's handshake and first message together.
pub const AGENT_HELLO_TIMEOUT_MS: u64 = 5_000;
/// Bound on stopping the HTTP API at shutdown: a worker stuck in a handler
/// must not keep the process from exiting.
pub const API_STOP_GRACE_MS: u64 = 5_000;
/// After a store failure, how long requests in flight get to receive their 503 before the process exits.
pub const FAIL_STOP_GRACE_MS: u64 = 1_000;
/// Default bound on each stored log stream of an attempt.
pub const ATTEMPT_LOG_BYTES_MAX_DEFAULT: u64 = 64 << 20;

/// How to run a controller.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Holds the store, the tokens and the logs.
    pub data_dir: PathBuf,
    /// Where the HTTP API listens.
    pub api_listen: SocketAddr,
    /// Where agents connect.
    pub agent_listen: SocketAddr,
    /// Largest frame accepted from an agent.
    pub max_frame_bytes: u32,
    /// The core's tunables.
    pub core: CoreConfig,
    /// How Cosmos Transfer runs compile into jobs (image, mounts, defaults).
    pub transfer: crate::transfer::TransferConfig,
    /// Bound on each stored log stream (stdout, stderr) of one attempt; the rest is cut, and the cut marked.
    pub attempt_log_bytes_max: u64,
}

/// The controller could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The data directory or a file in it could not be used.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Another controller holds the data directory.
    #[error(transparent)]
    Locked(#[from] cosmos_sync::dir_lock::DirLockError),
    /// A token file is unusable.
    #[error(transparent)]
    Token(#[from] cosmos_proto::TokenFileError),
    /// The store could not be written: the controller stopped rather than act on decisions it cannot keep.
    #[error("the store {path} cannot be written ({reason}); the controller stopped so that nothing it answers is lost")]
    StoreFailed {
        /// The store's file.
        path: PathBuf,
        /// The store's error.
        reason: String,
    },
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source} (is another controller running? pick another port)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Paths of the files in a data directory.
pub struct DataDir {
    /// The directory.
    pub root: PathBuf,
}

impl DataDir {
    /// The SQLite store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store.sqlite")
    }
    /// Token clients present to the API.
    pub fn api_token(&self) -> PathBuf {
        self.root.join("api.token")
    }
    /// Token agents present in their handshake.
    pub fn agent_token(&self) -> PathBuf {
        self.root.join("agent.token")
    }
    /// Attempt logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// The content-addressed store of input videos and run outputs.
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }
    /// The log file of one attempt's stream.
    pub fn log_file(&self, attempt: AttemptId, stream: LogStream) -> PathBuf {
        let ext = if stream == LogStream::Stdout { "stdout" } else { "stderr" };
        self.logs().join(format!("{attempt}.{ext}"))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::DataDir { path: path.to_path_buf(), source }
}

/// Reads a token file, creating it (readable by its owner only) with a random token if absent.
///
/// An existing file that is empty, too short or readable by others is refused.
pub fn ensure_token(path: &Path) -> Result<Token, DaemonError> {
    if path.exists() {
        return Ok(Token::read_file(path)?);
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(io_err(path))?;
    let token = Token(hex_string(&bytes));
    token.write_file(path)?;
    Ok(token)
}

/// Raises the soft limit on open descriptors to the hard one: every agent,
/// API client, log and blob transfer holds one, and systemd's soft default (1024) is low.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Creates `dir` (and its parents) if needed and makes it private to its owner:
/// the store holds job environments, the logs whatever jobs print.
pub fn create_private_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mode = std::fs::metadata(dir).map_err(io_err(dir))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700 | 0o700)) {
            // Not ours to change (a shared directory): its files are still created private.
            tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), error = %e, "cannot make the directory private; chmod 700 it");
        }
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 if absent, and takes group and other bits off it if present.
fn create_private_file(path: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    let mode = f.metadata().map_err(io_err(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o700)).map_err(io_err(path))?;
    }
    Ok(())
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the Unix epoch: the controller's clock, persisted in
/// records, so it must keep counting across restarts (unlike an Instant).
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs a controller until `shutdown` resolves. Must run inside an actix system.
pub async fn run(opts: ControllerOptions, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    raise_open_files_limit();
    let dir = DataDir { root: opts.data_dir.clone() };
    create_private_dir(&dir.root)?;
    // Held until the process ends: a second controller on this directory would fork its history.
    let _lock = cosmos_sync::dir_lock::DirLock::acquire(&dir.root, "controller")?;
    create_private_dir(&dir.logs())?;
    let api_token = ensure_token(&dir.api_token())?;
    let agent_token = ensure_token(&dir.agent_token())?;
    // SQLite gives its -wal and -shm files the database file's mode.
    create_private_file(&dir.store())?;
    let mut store = Store::open(&dir.store())?;
    let snapshot = store.load()?;
    let reader = Store::open(&dir.store())?;
    let core = Core::recover(opts.core.clone(), snapshot, wall_ms());
    tracing::info!(epoch = core.epoch().0, data_dir = %dir.root.display(), "controller starting");
    let blobs = Arc::new(
        cosmos_cas::Store::open(dir.blobs())
            .map_err(|e| DaemonError::DataDir { path: dir.blobs(), source: std::io::Error::other(e.to_string()) })?,
    );

    let queue = Arc::new(CommitQueue::new(MAX_PENDING_STORE_OPS));
    let (durable_tx, durable_rx) = mpsc::unbounded_channel();
    let (failed_tx, failed_rx) = oneshot::channel();
    let writer = spawn_writer(store, queue.clone(), durable_tx, failed_tx);
    let addr = CoreActor {
        core,
        queue: queue.clone(),
        gated: VecDeque::new(),
        conns: HashMap::new(),
        peers: HashMap::new(),
        claims: HashMap::new(),
        last_ticket: None,
        blobs: blobs.clone(),
    }
    .start();
    actix::spawn(forward_durable(durable_rx, addr.clone()));

    let agent_listener = tokio::net::TcpListener::bind(opts.agent_listen)
        .await
        .map_err(|source| DaemonError::Bind { addr: opts.agent_listen, source })?;
    let agent_addr =
        agent_listener.local_addr().map_err(|source| DaemonError::Bind { addr: opts.agent_listen, source })?;
    let shared = Arc::new(Shared {
        dir,
        api_token,
        reader: std::sync::Mutex::new(reader),
        blobs,
        transfer: opts.transfer.clone(),
        uploading: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        blob_gc: tokio::sync::RwLock::new(()),
        bodies: Arc::new(tokio::sync::Semaphore::new(api::BODY_KIB_IN_FLIGHT_MAX)),
        attempt_log_bytes_max: opts.attempt_log_bytes_max,
        store_failure: std::sync::OnceLock::new(),
    });
    actix::spawn(accept_agents(agent_listener, addr.clone(), agent_token, opts.max_frame_bytes, shared.clone()));

    let (server, api_addr) = api::server(opts.api_listen, addr.clone(), shared.clone())
        .map_err(|source| DaemonError::Bind { addr: opts.api_listen, source })?;
    println!("cosmos controller: API on http://{api_addr}, agents on {agent_addr}");
    println!("  API token:   {}", shared.dir.api_token().display());
    println!("  agent token: {}", shared.dir.agent_token().display());
    let handle = server.handle();
    actix::spawn(server);
    let failure = tokio::select! {
        () = shutdown => None,
        Ok(reason) = failed_rx => Some(reason),
    };
    if let Some(reason) = &failure {
        // Fail-stop: every request from now on, and every one waiting on a
        // persist that will never be durable, is answered 503 with the reason;
        // then the process exits non-zero so its supervisor restarts it on
        // what was durable.
        let _ = shared.store_failure.set(reason.clone());
        addr.do_send(StoreFailed);
        eprintln!(
            "cosmos controller: the store {} cannot be written: {reason}; stopping",
            shared.dir.store().display()
        );
        tokio::time::sleep(Duration::from_millis(FAIL_STOP_GRACE_MS)).await;
    }
    if tokio::time::timeout(Duration::from_millis(API_STOP_GRACE_MS), handle.stop(true)).await.is_err() {
        tracing::warn!(grace_ms = API_STOP_GRACE_MS, "the HTTP API did not stop in time; stopping without it");
    }
    queue.close();
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    match failure {
        Some(reason) => Err(DaemonError::StoreFailed { path: shared.dir.store(), reason }),
        None => {
            tracing::info!("controller stopped");
            Ok(())
        }
    }
}

/// What the API handlers share.
pub struct Shared {
    /// The data directory.
    pub dir: DataDir,
    /// The API's bearer token.
    pub api_token: Token,
    /// A read-only connection for history queries (WAL lets it read beside the writer).
    pub reader: std::sync::Mutex<Store>,
    /// Input videos and run outputs, by sha256 (shared with the agent connections).
    pub blobs: Arc<cosmos_cas::Store>,
    /// How Cosmos Transfer runs compile into jobs.
    pub transfer: crate::transfer::TransferConfig,
    /// Blobs being uploaded through the API now: one upload of a blob at a time.
    pub uploading: std::sync::Mutex<std::collections::BTreeSet<cosmos_proto::Sha256>>,
    /// Held shared while runs are created from stored blobs and exclusively while
    /// outputs are deleted, so a run never names a blob removed under it.
    pub blob_gc: tokio::sync::RwLock<()>,
    /// KiB of request bodies being read now, bounding their memory (see [`api::BODY_KIB_IN_FLIGHT_MAX`]).
    pub bodies: Arc<tokio::sync::Semaphore>,
    /// Bound on each stored log stream of one attempt.
    pub attempt_log_bytes_max: u64,
    /// Why the store can no longer be written, once it cannot: the API then answers 503 with it.
    pub store_failure: std::sync::OnceLock<String>,
}

fn spawn_writer(
    mut store: Store,
    queue: Arc<CommitQueue<StoreOp>>,
    durable: mpsc::UnboundedSender<Ticket>,
    failed: oneshot::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            // Everything pending goes into one transaction: one fsync for many transitions.
            while let Some(batch) = queue.take_batch() {
                match store.apply(&batch.items) {
                    Ok(()) => {
                        queue.mark_durable(batch.upto);
                        let _ = durable.send(batch.upto);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store write failed; the controller stops");
                        queue.fail(e.to_string());
                        let _ = failed.send(e.to_string());
                        return;
                    }
                }
            }
        })
        .expect("spawning a thread succeeds")
}

async fn forward_durable(mut rx: mpsc::UnboundedReceiver<Ticket>, addr: Addr<CoreActor>) {
    while let Some(t) = rx.recv().await {
        addr.do_send(Durable(t));
    }
}

// ---- the core actor ----

enum Action {
    Send(ConnId, ControllerMsg),
    Close(ConnId),
    Reply(Box<dyn FnOnce() + Send>),
}

/// Owns the core; every input goes through it, one at a time.
pub struct CoreActor {
    core: Core,
    queue: Arc<CommitQueue<StoreOp>>,
    /// Actions waiting for their persist to be durable, in order.
    gated: VecDeque<(Ticket, Action)>,
    conns: HashMap<ConnId, mpsc::Sender<ControllerMsg>>,
    /// Where each agent connection comes from and its process's incarnation,
    /// to refuse another process under its name, naming where it is.
    peers: HashMap<ConnId, (SocketAddr, u64)>,
    /// Names whose handshake passed but whose connection is not yet registered, by name.
    claims: HashMap<String, Claim>,
    last_ticket: Option<Ticket>,
    /// Where delivered outputs are, for the checks a run's kind needs on them.
    blobs: Arc<cosmos_cas::Store>,
}

impl Actor for CoreActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_millis(TICK_MS), |actor, _| {
            let mut out = Vec::new();
            actor.core.tick(wall_ms(), &mut out);
            actor.perform(out, None);
        });
    }
}

impl CoreActor {
    /// A succeeded prompt enhancement whose delivered stdout holds no
    /// `Upsampled prompt:` line has no result: it fails, terminally, saying so.
    /// (Runs after [`crate::blobs::guard_outcome`], so the output is in the store.)
    fn guard_run_outcome(&self, attempt_id: AttemptId, outcome: &mut cosmos_proto::AttemptOutcome) {
        use crate::transfer::{ENHANCE_RESULT, RunKind, UPSAMPLED_PREFIX, labels};
        let cosmos_proto::AttemptOutcome::Succeeded { outputs } = &*outcome else { return };
        let Some(job) = self.core.attempt(attempt_id).and_then(|a| self.core.job(a.job_id)).map(|(j, _, _)| j) else {
            return;
        };
        if job.spec.labels.get(labels::KIND).map(String::as_str) != Some(RunKind::Enhance.as_str()) {
            return;
        }
        let problem = match outputs.iter().find(|o| o.path == ENHANCE_RESULT) {
            None => format!("delivered no {ENHANCE_RESULT}"),
            Some(o) => match crate::api_transfer::read_enhance_stdout(&self.blobs, &o.sha256) {
                Ok(stdout) if crate::transfer::upsampled_prompt(&stdout).is_some() => return,
                Ok(_) => format!("printed no `{}` line with text on its standard output", UPSAMPLED_PREFIX.trim_end()),
                Err(e) => format!("delivered a standard output the controller cannot read ({e})"),
            },
        };
        *outcome = cosmos_proto::AttemptOutcome::Failed {
            exit_code: Some(0),
            reason: format!(
                "the prompt upsampler exited 0 but {problem}, so there is no enhanced prompt; \
                 its logs say why (`cosmos jobs logs {}`)",
                job.id
            ),
            retryable: false,
        };
    }

    /// [`Self::guard_run_outcome`] for the finished attempts of a hello or heartbeat.
    fn guard_run_reports(&self, reports: &mut [cosmos_proto::AttemptReport]) {
        for r in reports {
            if let cosmos_proto::AttemptPhase::Finished(outcome) = &mut r.phase {
                self.guard_run_outcome(r.attempt_id, outcome);
            }
        }
    }

    /// Performs the core's outputs; `reply` runs once everything before it is durable.
    fn perform(&mut self, out: Vec<Output>, reply: Option<Box<dyn FnOnce() + Send>>) {
        let mut actions = Vec::new();
        for o in out {
            match o {
                Output::Persist(ops) => match self.queue.push(ops) {
                    Ok(t) => self.last_ticket = Some(t),
                    Err(_) => tracing::error!("store writer has stopped; decisions are not persisted"),
                },
                Output::Send { conn, msg } => actions.push(Action::Send(conn, msg)),
                Output::Close { conn } => actions.push(Action::Close(conn)),
            }
        }
        actions.extend(reply.map(Action::Reply));
        // Actions wait for the latest persist, and for every action gated before them,
        // so messages on one connection keep their order.
        let durable = self.queue.durable();
        for action in actions {
            match self.last_ticket {
                Some(t) if t > durable || !self.gated.is_empty() => self.gated.push_back((t, action)),
                _ => self.act(action),
            }
        }
    }

    /// Runs an operator command; the receiver fires once its effects are durable.
    fn command(
        &mut self,
        f: impl FnOnce(&mut Core, &mut Vec<Output>) -> Result<(), CommandError>,
    ) -> Result<oneshot::Receiver<()>, CommandError> {
        let mut out = Vec::new();
        f(&mut self.core, &mut out)?;
        let (tx, rx) = oneshot::channel();
        self.perform(
            out,
            Some(Box::new(move || {
                let _ = tx.send(());
            })),
        );
        Ok(rx)
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Send(conn, msg) => {
                if let Some(tx) = self.conns.get(&conn) {
                    if tx.try_send(msg).is_err() {
                        // A full queue means the agent stopped reading: drop it, it will reconnect.
                        tracing::warn!(conn, "agent connection is not keeping up; closing it");
                        self.conns.remove(&conn);
                    }
                }
            }
            Action::Close(conn) => {
                self.forget(conn);
            }
            Action::Reply(f) => f(),
        }
    }
}

/// The store failed: what waits on a persist will never be sent or answered, so it is dropped
/// (API handlers waiting on it answer 503), and no decision is acted on any more.
struct StoreFailed;
impl Message for StoreFailed {
    type Result = ();
}
impl Handler<StoreFailed> for CoreActor {
    type Result = ();
    fn handle(&mut self, _: StoreFailed, ctx: &mut Context<Self>) {
        self.gated.clear();
        self.conns.clear();
        ctx.stop();
    }
}

struct Durable(Ticket);
impl Message for Durable {
    type Result = ();
}
impl Handler<Durable> for CoreActor {
    type Result = ();
    fn handle(&mut self, Durable(t): Durable, _: &mut Context<Self>) {
        while self.gated.front().is_some_and(|(gate, _)| *gate <= t) {
            let (_, action) = self.gated.pop_front().unwrap();
            self.act(action);
        }
    }
}

/// What a durable submission answers: its jobs, and whether it repeated an earlier one (same idempotency key).
pub type Submitted = (Vec<JobId>, bool);

/// Submit a batch together with records that must be stored in the same
/// transaction (the prompts a batch of runs creates), under an optional
/// idempotency key; answers once durable. A repeat stores nothing.
pub struct SubmitWith {
    /// The jobs.
    pub specs: Vec<JobSpec>,
    /// Records stored in the same transaction.
    pub extra: Vec<StoreOp>,
    /// The submission's idempotency key.
    pub key: Option<crate::model::Idempotency>,
}
impl Message for SubmitWith {
    type Result = Result<oneshot::Receiver<Submitted>, SubmitError>;
}
impl Handler<SubmitWith> for CoreActor {
    type Result = Result<oneshot::Receiver<Submitted>, SubmitError>;
    fn handle(&mut self, SubmitWith { specs, extra, key }: SubmitWith, _: &mut Context<Self>) -> Self::Result {
        let mut out = Vec::new();
        let (ids, repeat) = self.core.submit_keyed(wall_ms(), specs, key, &mut out)?;
        let extra = if repeat { Vec::new() } else { extra };
        // The core persists a submission in one batch, before anything is sent: join it.
        match out.iter_mut().find_map(|o| match o {
            Output::Persist(ops) => Some(ops),
            _ => None,
        }) {
            Some(ops) => ops.extend(extra),
            None if extra.is_empty() => {}
            None => out.insert(0, Output::Persist(extra)),
        }
        let (tx, rx) = oneshot::channel();
        self.perform(out, Some(Box::new(move || drop(tx.send((ids, repeat))))));
        Ok(rx)
    }
}

/// Cancel a job; answers once the decision is durable.
pub struct Cancel(pub JobId);
impl Message for Cancel {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
}
impl Handler<Cancel> for CoreActor {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
    fn handle(&mut self, Cancel(id): Cancel, _: &mut Context<Self>) -> Self::Result {
        self.command(|core, out| core.cancel(wall_ms(), id, out))
    }
}

/// Drain or undrain an agent.
pub struct SetDraining(pub String, pub bool);
impl Message for SetDraining {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
}
impl Handler<SetDraining> for CoreActor {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
    fn handle(&mut self, SetDraining(name, on): SetDraining, _: &mut Context<Self>) -> Self::Result {
        self.command(|core, out| core.set_draining(wall_ms(), &name, on, out))
    }
}

/// Return an agent's quarantined GPU to scheduling: agent name, GPU uuid.
pub struct ReleaseGpu(pub String, pub String);
impl Message for ReleaseGpu {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
}
impl Handler<ReleaseGpu> for CoreActor {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
    fn handle(&mut self, ReleaseGpu(name, uuid): ReleaseGpu, _: &mut Context<Self>) -> Self::Result {
        self.command(|core, out| core.release_gpu(wall_ms(), &name, &uuid, out))
    }
}

/// A job as listings show it.
#[derive(Clone, Debug)]
pub struct JobSummary {
    /// The record.
    pub record: JobRecord,
    /// Progress of the live attempt.
    pub progress: Option<(u32, u32)>,
    /// GPUs of the live attempt.
    pub gpus: Vec<String>,
}

/// List jobs (all, or one).
pub struct ListJobs(pub Option<JobId>);
impl Message for ListJobs {
    type Result = Vec<JobSummary>;
}
impl Handler<ListJobs> for CoreActor {
    type Result = MessageResult<ListJobs>;
    fn handle(&mut self, ListJobs(one): ListJobs, _: &mut Context<Self>) -> Self::Result {
        let summary = |core: &Core, id: JobId| {
            core.job(id).map(|(rec, progress, att)| JobSummary {
                record: rec.clone(),
                progress,
                gpus: att.map(|a| a.gpu_uuids.clone()).unwrap_or_default(),
            })
        };
        MessageResult(match one {
            Some(id) => summary(&self.core, id).into_iter().collect(),
            None => self
                .core
                .jobs()
                .map(|r| r.id)
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|id| summary(&self.core, id))
                .collect(),
        })
    }
}

/// Cluster status.
pub struct Status;
/// What [`Status`] answers.
#[derive(Clone, Debug)]
pub struct StatusView {
    /// The controller's epoch.
    pub epoch: u64,
    /// Jobs waiting.
    pub queue_depth: usize,
    /// Agents.
    pub agents: Vec<AgentView>,
}
impl Message for Status {
    type Result = StatusView;
}
impl Handler<Status> for CoreActor {
    type Result = MessageResult<Status>;
    fn handle(&mut self, _: Status, _: &mut Context<Self>) -> Self::Result {
        MessageResult(StatusView {
            epoch: self.core.epoch().0,
            queue_depth: self.core.queue_depth(),
            agents: self.core.agents(),
        })
    }
}

/// A connection's hold on an agent name, from its handshake until it is registered or gone.
#[derive(Clone, Copy, Debug)]
struct Claim {
    conn: ConnId,
    peer: SocketAddr,
    incarnation: u64,
}

impl CoreActor {
    /// Drops what is kept of a connection.
    fn forget(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.peers.remove(&conn);
        self.claims.retain(|_, c| c.conn != conn);
    }
}

/// Claims an agent name for a connection in its handshake; refused with the
/// holder's address while another process holds it: connected and heard from,
/// or in its own handshake. The same process reconnecting (same incarnation)
/// replaces its old connection.
struct ClaimName {
    name: String,
    claim: Claim,
}
impl Message for ClaimName {
    type Result = Result<(), SocketAddr>;
}
impl Handler<ClaimName> for CoreActor {
    type Result = Result<(), SocketAddr>;
    fn handle(&mut self, ClaimName { name, claim }: ClaimName, _: &mut Context<Self>) -> Self::Result {
        if let Some(&(peer, incarnation)) = self.core.live_conn_of(&name).and_then(|c| self.peers.get(&c)) {
            if incarnation != claim.incarnation {
                return Err(peer);
            }
        }
        if let Some(other) = self.claims.get(&name) {
            if other.conn != claim.conn && other.incarnation != claim.incarnation {
                return Err(other.peer);
            }
        }
        self.claims.insert(name, claim);
        Ok(())
    }
}

/// A connection ended before it was registered: its claim goes.
struct Unclaim(ConnId);
impl Message for Unclaim {
    type Result = ();
}
impl Handler<Unclaim> for CoreActor {
    type Result = ();
    fn handle(&mut self, Unclaim(conn): Unclaim, _: &mut Context<Self>) {
        self.claims.retain(|_, c| c.conn != conn);
    }
}

struct AgentConnected {
    conn: ConnId,
    peer: SocketAddr,
    incarnation: u64,
    name: String,
    hello: cosmos_proto::AgentHello,
    tx: mpsc::Sender<ControllerMsg>,
}
impl Message for AgentConnected {
    type Result = ();
}
impl Handler<AgentConnected> for CoreActor {
    type Result = ();
    fn handle(&mut self, mut m: AgentConnected, _: &mut Context<Self>) {
        self.conns.insert(m.conn, m.tx);
        self.peers.insert(m.conn, (m.peer, m.incarnation));
        self.claims.retain(|_, c| c.conn != m.conn);
        self.guard_run_reports(&mut m.hello.attempts);
        let mut out = Vec::new();
        self.core.on_connect(wall_ms(), m.conn, &m.name, m.hello, &mut out);
        self.perform(out, None);
    }
}

struct AgentMessage(ConnId, AgentMsg);
impl Message for AgentMessage {
    type Result = ();
}
impl Handler<AgentMessage> for CoreActor {
    type Result = ();
    fn handle(&mut self, AgentMessage(conn, mut msg): AgentMessage, _: &mut Context<Self>) {
        match &mut msg {
            AgentMsg::AttemptFinished { attempt_id, outcome } => self.guard_run_outcome(*attempt_id, outcome),
            AgentMsg::Heartbeat(hb) => self.guard_run_reports(&mut hb.attempts),
            _ => {}
        }
        let mut out = Vec::new();
        self.core.on_message(wall_ms(), conn, msg, &mut out);
        self.perform(out, None);
    }
}

struct AgentGone(ConnId);
impl Message for AgentGone {
    type Result = ();
}
impl Handler<AgentGone> for CoreActor {
    type Result = ();
    fn handle(&mut self, AgentGone(conn): AgentGone, _: &mut Context<Self>) {
        self.forget(conn);
        let mut out = Vec::new();
        self.core.on_disconnect(wall_ms(), conn, &mut out);
        self.perform(out, None);
    }
}

// ---- agent connections ----

async fn accept_agents(
    listener: tokio::net::TcpListener,
    core: Addr<CoreActor>,
    token: Token,
    max_frame_bytes: u32,
    shared: Arc<Shared>,
) {
    let mut next_conn: ConnId = 1;
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_PENDING_MAX));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an agent connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(
                %peer,
                pending_max = HANDSHAKES_PENDING_MAX,
                "too many agent connections in their handshake; closing this one"
            );
            continue;
        };
        let _ = socket.set_nodelay(true);
        let conn = next_conn;
        next_conn += 1;
        actix::spawn(serve_agent(
            conn,
            socket,
            peer,
            permit,
            core.clone(),
            token.clone(),
            max_frame_bytes,
            shared.clone(),
        ));
    }
}

/// The handshake and the agent's first message, or why not.
async fn agent_hello(
    c: &mut Connection<tokio::net::TcpStream>,
    conn: ConnId,
    peer: SocketAddr,
    core: &Addr<CoreActor>,
    token: &Token,
) -> Result<(cosmos_proto::Hello, cosmos_proto::AgentHello), String> {
    let check = |hello: cosmos_proto::Hello| async move {
        let claim = Claim { conn, peer, incarnation: hello.incarnation };
        match core.send(ClaimName { name: hello.node_id.clone(), claim }).await {
            Ok(Err(holder)) => {
                Err(cosmos_proto::Refusal::NameInUse { name: hello.node_id, holder: holder.to_string() })
            }
            _ => Ok(()),
        }
    };
    let hello = handshake::accept_checked(c, "controller", Role::Agent, token, DEFAULT_HANDSHAKE_TIMEOUT_MS, check)
        .await
        .map_err(|e| format!("refused an agent connection: {e}"))?;
    match c.reader.read_frame().await {
        Ok(Some(payload)) => match AgentFrame::decode(&payload) {
            Ok(AgentFrame::Msg(AgentMsg::Hello(h))) => Ok((hello, h)),
            other => Err(format!("agent {} did not open with a hello: {other:?}", hello.node_id)),
        },
        other => Err(format!("agent {} did not open with a hello: {other:?}", hello.node_id)),
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_agent(
    conn: ConnId,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
    core: Addr<CoreActor>,
    token: Token,
    max_frame_bytes: u32,
    shared: Arc<Shared>,
) {
    let mut c = Connection::new(socket, max_frame_bytes);
    let opened = tokio::time::timeout(
        Duration::from_millis(AGENT_HELLO_TIMEOUT_MS),
        agent_hello(&mut c, conn, peer, &core, &token),
    )
    .await
    .unwrap_or_else(|_| Err(format!("agent said nothing acceptable within {AGENT_HELLO_TIMEOUT_MS} ms")));
    drop(handshake_permit);
    let (hello, mut agent_hello) = match opened {
        Ok(x) => x,
        Err(e) => {
            core.do_send(Unclaim(conn));
            tracing::warn!(%peer, "{e}");
            return;
        }
    };
    let (reader, writer) = c.split();
    crate::blobs::guard_reports(&shared.blobs, &mut agent_hello.attempts);
    tracing::info!(%peer, agent = hello.node_id, gpus = agent_hello.gpus.len(), "agent connected");
    let (tx, rx) = mpsc::channel::<ControllerMsg>(CONN_QUEUE_LEN);
    core.do_send(AgentConnected {
        conn,
        peer,
        incarnation: hello.incarnation,
        name: hello.node_id.clone(),
        hello: agent_hello,
        tx,
    });
    let incoming = futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match recv_frame(&mut reader).await {
            Ok(Some(frame)) => Some((Ok(frame), Some(reader))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    let (blob_tx, blob_rx) = mpsc::channel(crate::blobs::BLOB_INBOX_LEN);
    let (bulk_tx, bulk_rx) = mpsc::channel(crate::blobs::BULK_QUEUE_LEN);
    actix::spawn(crate::blobs::serve(shared.blobs.clone(), blob_rx, bulk_tx, hello.node_id.clone()));
    AgentConnection::create(move |ctx| {
        ctx.add_stream(incoming);
        let me = ctx.address();
        actix::spawn(async move {
            let result = write_frames(writer, rx, bulk_rx).await;
            me.do_send(WriterDone(result));
        });
        AgentConnection { conn, name: hello.node_id, core, shared, logs: LogFiles::default(), blobs: blob_tx }
    });
}

/// The next frame from an agent, told apart into message or blob traffic.
async fn recv_frame(
    reader: &mut cosmos_proto::FrameReader<tokio::io::ReadHalf<tokio::net::TcpStream>>,
) -> Result<Option<AgentFrame>, String> {
    match reader.read_frame().await {
        Ok(Some(payload)) => AgentFrame::decode(&payload).map(Some).map_err(|e| e.to_string()),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Control messages [`write_frames`] sends in a row while a blob frame waits,
/// before it sends that one: a flood of messages must not starve transfers.
const CONTROL_BURST_MAX: u32 = 8;

/// Writes what the core sends until it drops the channel (superseded, lost or
/// stuck agent) or the socket fails. Writes are not cancel-safe, so this one
/// task does them all. Control messages go first: a blob chunk is sent only
/// when none waits, so a cancel or heartbeat ack waits for one chunk at most;
/// yet after [`CONTROL_BURST_MAX`] messages in a row a waiting chunk goes next.
async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: cosmos_proto::FrameWriter<W>,
    mut rx: mpsc::Receiver<ControllerMsg>,
    mut bulk: mpsc::Receiver<Vec<u8>>,
) -> Result<(), String> {
    let mut bulk_open = true;
    let mut burst = 0;
    loop {
        if burst >= CONTROL_BURST_MAX {
            burst = 0;
            if let Ok(payload) = bulk.try_recv() {
                writer.write_frame(&payload).await.map_err(|e| e.to_string())?;
                continue;
            }
        }
        tokio::select! {
            biased;
            msg = rx.recv() => match msg {
                Some(msg) => {
                    burst += 1;
                    writer.send(&msg).await.map_err(|e| e.to_string())?
                }
                None => break,
            },
            payload = bulk.recv(), if bulk_open => match payload {
                Some(payload) => {
                    burst = 0;
                    writer.write_frame(&payload).await.map_err(|e| e.to_string())?
                }
                None => bulk_open = false,
            },
        }
    }
    let _ = writer.shutdown().await;
    Ok(())
}

/// One agent connection, as an actor: it feeds what the agent says to the core
/// (logs straight to their files) and lives as long as both directions do.
struct AgentConnection {
    conn: ConnId,
    name: String,
    core: Addr<CoreActor>,
    shared: Arc<Shared>,
    logs: LogFiles,
    /// The connection's blob task (see [`crate::blobs`]).
    blobs: mpsc::Sender<cosmos_proto::AgentBlob>,
}

impl Actor for AgentConnection {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.core.do_send(AgentGone(self.conn));
    }
}

impl StreamHandler<Result<AgentFrame, String>> for AgentConnection {
    fn handle(&mut self, item: Result<AgentFrame, String>, ctx: &mut Self::Context) {
        match item {
            Ok(AgentFrame::Blob(blob)) => {
                if self.blobs.try_send(blob).is_err() {
                    tracing::warn!(
                        agent = self.name,
                        "agent has more blob frames unanswered than the protocol allows; closing its connection"
                    );
                    ctx.stop();
                }
            }
            Ok(AgentFrame::Msg(AgentMsg::LogChunk(chunk))) => {
                self.logs.append(&self.shared.dir, &chunk, self.shared.attempt_log_bytes_max)
            }
            Ok(AgentFrame::Msg(mut msg)) => {
                // A success counts only once its outputs are here: the agent uploads before it reports.
                match &mut msg {
                    AgentMsg::AttemptFinished { outcome, .. } => {
                        crate::blobs::guard_outcome(&self.shared.blobs, outcome)
                    }
                    AgentMsg::Heartbeat(hb) => crate::blobs::guard_reports(&self.shared.blobs, &mut hb.attempts),
                    _ => {}
                }
                self.core.do_send(AgentMessage(self.conn, msg))
            }
            Err(e) => {
                tracing::warn!(agent = self.name, error = %e, "agent connection failed");
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

struct WriterDone(Result<(), String>);
impl Message for WriterDone {
    type Result = ();
}
impl Handler<WriterDone> for AgentConnection {
    type Result = ();
    fn handle(&mut self, WriterDone(result): WriterDone, ctx: &mut Self::Context) {
        if let Err(e) = result {
            tracing::warn!(agent = self.name, error = %e, "writing to the agent failed");
        }
        ctx.stop();
    }
}

/// Log files one connection keeps open; more are closed first (a connection with many attempts).
const LOG_FILES_OPEN_MAX: usize = 256;

/// Open log files of one connection's attempts, appended at the chunk's offset
/// so a chunk resent after a reconnect is written once.
#[derive(Default)]
struct LogFiles {
    open: HashMap<(AttemptId, bool), std::fs::File>,
}

/// What is written at the cut of a log that reached its bound.
pub fn log_cut_marker(bytes_max: u64) -> String {
    format!(
        "\n[cosmos: this log was cut at {bytes_max} bytes; the rest was dropped (controller --attempt-log-bytes-max)]\n"
    )
}

impl LogFiles {
    /// Writes a chunk at its offset; bytes past `bytes_max` are dropped, and the cut marked once after it.
    fn append(&mut self, dir: &DataDir, chunk: &cosmos_proto::LogChunk, bytes_max: u64) {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        if chunk.offset > bytes_max {
            return;
        }
        let key = (chunk.attempt_id, chunk.stream == LogStream::Stdout);
        if !self.open.contains_key(&key) {
            match std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .mode(0o600)
                .open(dir.log_file(chunk.attempt_id, chunk.stream))
            {
                Ok(f) => {
                    if self.open.len() >= LOG_FILES_OPEN_MAX {
                        self.open.clear();
                    }
                    self.open.insert(key, f);
                }
                Err(e) => return tracing::warn!(error = %e, "cannot write attempt log"),
            }
        }
        let room = usize::try_from(bytes_max - chunk.offset).unwrap_or(usize::MAX);
        let data = &chunk.data[..chunk.data.len().min(room)];
        let file = &self.open[&key];
        let mut written = file.write_all_at(data, chunk.offset);
        if data.len() < chunk.data.len() {
            written = written.and_then(|()| file.write_all_at(log_cut_marker(bytes_max).as_bytes(), bytes_max));
        }
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write attempt log");
        }
    }
}

#[cfg(test)]
mod write_frames_tests {
    use super::*;
    use cosmos_proto::{ControllerFrame, FrameReader, FrameWriter};

    #[tokio::test]
    async fn a_flood_of_messages_lets_a_waiting_blob_frame_through() {
        const MAX_FRAME: u32 = 1 << 20;
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (rx_tx, rx) = mpsc::channel(64);
        let (bulk_tx, bulk) = mpsc::channel(1);
        for seq in 0..32 {
            rx_tx.try_send(ControllerMsg::HeartbeatAck { seq }).unwrap();
        }
        let blob = cosmos_proto::ControllerBlob::Ack { sha256: cosmos_proto::Sha256([1; 32]), have_bytes: 1 };
        bulk_tx.try_send(cosmos_proto::encode_blob(&blob).unwrap()).unwrap();
        drop((rx_tx, bulk_tx));
        write_frames(FrameWriter::new(ours, MAX_FRAME), rx, bulk).await.unwrap();
        let mut reader = FrameReader::new(theirs, MAX_FRAME);
        let mut frames = Vec::new();
        while let Some(payload) = reader.read_frame().await.unwrap() {
            frames.push(ControllerFrame::decode(&payload).unwrap());
        }
        let at = frames.iter().position(|f| matches!(f, ControllerFrame::Blob(_))).expect("the blob frame was sent");
        assert_eq!(at, CONTROL_BURST_MAX as usize, "{frames:?}");
        assert_eq!(frames.len(), 33);
    }
}
