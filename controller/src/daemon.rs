//! The controller process, wired together: the store and its writer thread
//! behind a group-commit queue, the core actor, the agents' port and the HTTP
//! API. Nothing imports this module; it imports everything.

use crate::actor::{CoreActor, Durable, StoreFailed};
use crate::agent_link::accept_agents;
use crate::core::{Core, CoreConfig};
use crate::http;
use crate::records::StoreOp;
use crate::shared::{Clock, DataDir, Shared};
use crate::store::{Lease, LeaseInfo, Store, StoreError, StoreLocation};
use actix::prelude::*;
use cosmos_proto::handshake::Token;
use cosmos_sync::{CommitQueue, Ticket};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Store operations waiting for the writer before the core waits (backpressure).
pub const STORE_OPS_PENDING_MAX: usize = 1_000_000;
/// Bound on stopping the HTTP API at shutdown: a worker stuck in a handler
/// must not keep the process from exiting.
pub const API_STOP_GRACE_MS: u64 = 5_000;
/// Bound on the store writer's last transactions at shutdown.
pub const STORE_FLUSH_GRACE_MS: u64 = 5_000;
/// At shutdown, time the agents' links get to send what was queued for them before the process exits.
pub const AGENT_CLOSE_GRACE_MS: u64 = 200;
/// After a store failure, how long requests in flight get to receive their 503 before the process exits.
pub const FAIL_STOP_GRACE_MS: u64 = 1_000;
/// Default bound on each stored log stream of an attempt.
pub const ATTEMPT_LOG_BYTES_MAX_DEFAULT: u64 = 64 << 20;

/// After a retryable store error (a lost PostgreSQL connection, a restarting
/// server), how long the writer keeps retrying a batch before the controller stops.
pub const STORE_RETRY_MS_MAX: u64 = 30_000;
/// Pause between two tries of a batch that failed retryably.
pub const STORE_RETRY_PAUSE_MS: u64 = 250;
/// Bound on standby connections (agents, API clients) being told who leads at once.
pub const STANDBY_CONNECTIONS_MAX: usize = 64;
/// Bound on the request head a standby reads before answering 503.
const STANDBY_HEAD_BYTES_MAX: usize = 16 * 1024;
/// Bound on a standby's wait for a request head.
const STANDBY_HEAD_TIMEOUT_MS: u64 = 5_000;

/// A store shared by several controllers on PostgreSQL: one leads, the others wait.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// The `postgres://` URL.
    pub url: String,
    /// How long the lease lasts after each renewal; renewals come every third of it.
    pub lease_ms: u64,
    /// This controller's name in the lease row (default: host name and API port), unique among them.
    pub holder: Option<String>,
    /// The API URL standbys send clients to while this one leads (default: `http://` and the bound API address).
    pub advertise_api: Option<String>,
    /// The agent address standbys send agents to while this one leads (default: the bound agent address).
    pub advertise_agents: Option<String>,
}

/// How to run a controller.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Holds the store (unless on PostgreSQL), the tokens and the logs.
    pub data_dir: PathBuf,
    /// The store on PostgreSQL, with leader election; none: SQLite in the data directory.
    pub postgres: Option<PostgresOptions>,
    /// Where the HTTP API listens.
    pub api_listen: SocketAddr,
    /// Where agents connect.
    pub agent_listen: SocketAddr,
    /// Largest frame accepted from an agent.
    pub frame_bytes_max: u32,
    /// The core's tunables.
    pub core: CoreConfig,
    /// How Cosmos Transfer runs compile into jobs (image, mounts, defaults).
    pub cosmos: crate::cosmos::CosmosConfig,
    /// Bound on each stored log stream (stdout, stderr) of one attempt; the rest is cut, and the cut marked.
    pub attempt_log_bytes_max: u64,
    /// How the controller reaches registered hosts itself (SSH); none: agents must dial in.
    pub dialer: Option<Arc<dyn crate::hosts::HostDialer>>,
    /// Where each job's trace is exported (OTLP); none: traces are off.
    pub trace: Option<cosmos_telemetry::TraceConfig>,
    /// Finished jobs older than this many days are pruned with their logs; 0 keeps them forever.
    pub retain_days: f64,
}

/// How long a stopping controller waits for the spans still queued to reach the collector.
pub const TRACE_FLUSH_MS: u64 = 5_000;

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
    /// The registry of hosts reached over SSH is unusable.
    #[error("the registered hosts: {0}")]
    Hosts(#[from] crate::hosts::HostsError),
    /// The store could not be written: the controller stopped rather than act on decisions it cannot keep.
    #[error(
        "the store {store} cannot be written ({reason}); the controller stopped so that nothing it answers is lost"
    )]
    StoreFailed {
        /// The store's file or URL (without password).
        store: String,
        /// The store's error.
        reason: String,
    },
    /// The span exporter could not start.
    #[error("traces: {0}")]
    Traces(#[from] cosmos_telemetry::export::ExportError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {}", bind_problem(cause, flag))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The flag that chose it (`--api-listen`, `--agent-listen`).
        flag: &'static str,
        /// The cause (in the message, not a `source`: printed once).
        cause: std::io::Error,
    },
}

/// What went wrong binding a listener, and the fix.
fn bind_problem(e: &std::io::Error, flag: &str) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "address in use: another controller (or another program) holds the port; stop it, or pick another port with {flag}"
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            format!("address not available: no interface of this host has that address; fix {flag}")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("permission denied: ports below 1024 need privileges; pick a port above 1024 with {flag}")
        }
        _ => format!("{e}; fix {flag}"),
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

/// Runs a controller until `shutdown` resolves. Must run inside an actix system.
pub async fn run(opts: ControllerOptions, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    // Polled once now, so a signal handler it installs is in place before
    // anyone is told the controller started: a SIGTERM then stops it cleanly.
    let mut shutdown = std::pin::pin!(shutdown);
    if futures::FutureExt::now_or_never(&mut shutdown).is_some() {
        return Ok(());
    }
    raise_open_files_limit();
    let mut shutdown = std::pin::pin!(shutdown);
    let dir = DataDir { root: opts.data_dir.clone() };
    create_private_dir(&dir.root)?;
    // Held until the process ends: a second controller on this directory would fork its history.
    let _lock = cosmos_sync::dir_lock::DirLock::acquire(&dir.root, "controller")?;
    // Both ports are bound before anything starts: a port in use is then a
    // plain error, not a half-started controller torn down with its actor.
    let agent_listener = tokio::net::TcpListener::bind(opts.agent_listen).await.map_err(|cause| DaemonError::Bind {
        addr: opts.agent_listen,
        flag: "--agent-listen",
        cause,
    })?;
    let agent_addr = agent_listener.local_addr().map_err(|cause| DaemonError::Bind {
        addr: opts.agent_listen,
        flag: "--agent-listen",
        cause,
    })?;
    let api_listener = http::bind(opts.api_listen).map_err(|cause| DaemonError::Bind {
        addr: opts.api_listen,
        flag: "--api-listen",
        cause,
    })?;
    create_private_dir(&dir.logs())?;
    let api_token = ensure_token(&dir.api_token())?;
    let agent_token = ensure_token(&dir.agent_token())?;
    let api_addr = api_listener.local_addr().map_err(|cause| DaemonError::Bind {
        addr: opts.api_listen,
        flag: "--api-listen",
        cause,
    })?;
    let location = match &opts.postgres {
        None => StoreLocation::Sqlite(dir.store()),
        Some(pg) => StoreLocation::Postgres(pg.url.clone()),
    };
    // When the load of the store began (on PostgreSQL, the wait for the lease is in it too).
    let mut load_started = std::time::Instant::now();
    let (store, store_id, snapshot, reader, renewer) = match &opts.postgres {
        None => {
            // SQLite gives its -wal and -shm files the database file's mode.
            create_private_file(&dir.store())?;
            let mut store = Store::open(&dir.store())?;
            let store_id = store.instance_id()?;
            load_started = std::time::Instant::now();
            let snapshot = store.load()?;
            let reader = Store::open_reader(&dir.store())?;
            (store, store_id, snapshot, reader, None)
        }
        Some(pg) => {
            let lease = Lease {
                holder: pg.holder.clone().unwrap_or_else(|| format!("{}:{}", hostname(), api_addr.port())),
                api: pg.advertise_api.clone().unwrap_or_else(|| format!("http://{api_addr}")),
                agents: pg.advertise_agents.clone().unwrap_or_else(|| agent_addr.to_string()),
                lease_ms: pg.lease_ms.max(1),
            };
            let waiting = lead_or_wait(
                pg,
                lease.clone(),
                &api_listener,
                opts.api_listen,
                &agent_listener,
                &agent_token,
                opts.frame_bytes_max,
            );
            // A standby stops when told to, as a leader does.
            let (store, store_id, snapshot) = tokio::select! {
                led = waiting => led?,
                () = &mut shutdown => {
                    tracing::info!("standby stopped");
                    return Ok(());
                }
            };
            let (url, epoch) = (pg.url.clone(), snapshot.epoch);
            let (reader, renewer) = tokio::task::spawn_blocking(move || {
                let reader = Store::open_postgres_reader(&url)?;
                // Its own connection, so a long group commit never delays a renewal.
                let mut renewer = Store::open_postgres(&url, lease.clone())?;
                renewer.hold_epoch(epoch);
                Ok::<_, StoreError>((reader, renewer))
            })
            .await
            .map_err(|e| StoreError::Url(format!("opening the store's connections failed: {e}")))??;
            (store, store_id, snapshot, reader, Some((renewer, pg.lease_ms.max(3))))
        }
    };
    let (jobs, load_ms) = (snapshot.jobs.len(), load_started.elapsed().as_millis() as u64);
    let clock = Clock::new();
    let recover_started = std::time::Instant::now();
    let core = Core::recover(opts.core.clone(), snapshot, clock.now());
    tracing::info!(
        epoch = core.epoch().0,
        data_dir = %dir.root.display(),
        jobs,
        load_ms,
        recover_ms = recover_started.elapsed().as_millis() as u64,
        "controller starting"
    );
    let blobs = Arc::new(
        cosmos_cas::Store::open(dir.blobs())
            .map_err(|e| DaemonError::DataDir { path: dir.blobs(), source: std::io::Error::other(e.to_string()) })?,
    );

    let logs_started = std::time::Instant::now();
    let (logs, loaded) =
        crate::logstore::LogStore::open(&dir.logs(), opts.attempt_log_bytes_max, crate::logstore::SEGMENT_BYTES_MAX)
            .map_err(|source| DaemonError::DataDir { path: dir.logs(), source })?;
    tracing::info!(
        segments = loaded.segments,
        logs = loaded.logs,
        torn_records = loaded.torn_records,
        load_ms = logs_started.elapsed().as_millis() as u64,
        "attempt logs read"
    );
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let exporter = match &opts.trace {
        Some(config) => {
            let e = Arc::new(cosmos_telemetry::Exporter::start(config, "cosmos-controller", metrics.spans.clone())?);
            tracing::info!(
                endpoint = e.endpoint(),
                protocol = config.protocol.name(),
                service = config.service_name,
                "exporting each job's trace over OTLP"
            );
            Some(e)
        }
        None => None,
    };
    let tracer = exporter.clone().map(|e| crate::trace::JobTracer::new(e, store_id, &core, clock.now()));

    let queue = Arc::new(CommitQueue::new(STORE_OPS_PENDING_MAX));
    let (durable_tx, durable_rx) = mpsc::unbounded_channel();
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel();
    // Dropped at shutdown, which ends the renewer.
    let (renewer_stop, renewer_stopped) = std::sync::mpsc::channel::<()>();
    let renewer = renewer.map(|(store, lease_ms)| spawn_renewer(store, lease_ms, failed_tx.clone(), renewer_stopped));
    let writer = spawn_writer(store, queue.clone(), durable_tx, failed_tx, metrics.clone());
    let events = Arc::new(crate::events::EventLog::new(core.epoch().0));
    let addr = CoreActor::new(core, clock, queue.clone(), events.clone(), metrics.clone(), tracer).start();
    actix::spawn(forward_durable(durable_rx, addr.clone()));

    let shared = Arc::new(Shared {
        dir,
        api_token,
        reader: std::sync::Mutex::new(reader),
        blobs,
        cosmos: opts.cosmos.clone(),
        uploading: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        blob_gc: tokio::sync::RwLock::new(()),
        bodies: Arc::new(tokio::sync::Semaphore::new(http::BODY_KIB_IN_FLIGHT_MAX)),
        logs,
        store_failure: std::sync::OnceLock::new(),
        metrics,
        metrics_open: opts.api_listen.ip().is_loopback(),
    });
    let accepting = actix::spawn(accept_agents(
        agent_listener,
        addr.clone(),
        agent_token.clone(),
        opts.frame_bytes_max,
        shared.clone(),
    ));
    let hosts = Arc::new(crate::hosts::Hosts::start(
        &shared.dir.root,
        opts.dialer.clone(),
        addr.clone(),
        agent_token,
        opts.frame_bytes_max,
        shared.clone(),
    )?);

    let (server, api_addr) = http::server(api_listener, addr.clone(), shared.clone(), hosts.clone(), events)
        .map_err(|cause| DaemonError::Bind { addr: opts.api_listen, flag: "--api-listen", cause })?;
    println!("cosmos controller: API on http://{api_addr}, agents on {agent_addr}");
    println!("  API token:   {}", shared.dir.api_token().display());
    println!("  agent token: {}", shared.dir.agent_token().display());
    let handle = server.handle();
    actix::spawn(server);
    // Ready only now: the store is loaded and both ports are bound and served.
    match addr.send(crate::actor::Status).await {
        Ok(view) => crate::service::ready(&crate::service::status_line(&view)),
        Err(_) => crate::service::ready("serving"),
    }
    actix::spawn(crate::service::keepalive(addr.clone(), queue.clone()));
    if opts.retain_days > 0.0 {
        let retain_ms = (opts.retain_days * 86_400_000.0) as u64;
        actix::spawn(crate::retention::keep(addr.clone(), shared.clone(), retain_ms, opts.retain_days));
    }
    let failure = tokio::select! {
        () = &mut shutdown => None,
        Some(reason) = failed_rx.recv() => Some(reason),
    };
    if let Some(reason) = &failure {
        // Fail-stop: every request from now on, and every one waiting on a
        // persist that will never be durable, is answered 503 with the reason;
        // then the process exits non-zero so its supervisor restarts it on
        // what was durable.
        let _ = shared.store_failure.set(reason.clone());
        addr.do_send(StoreFailed);
        eprintln!("cosmos controller: the store {} cannot be written: {reason}; stopping", location.describe());
        tokio::time::sleep(Duration::from_millis(FAIL_STOP_GRACE_MS)).await;
    }
    if failure.is_none() {
        tracing::info!(
            "controller stopping: no new connections or work; requests in flight finish, then the store is flushed and the agents' links closed"
        );
        crate::service::stopping("stopping: finishing requests in flight, flushing the store");
    }
    // No new work: neither agents' connections nor hosts' links, nor API requests.
    accepting.abort();
    hosts.stop_all();
    if tokio::time::timeout(Duration::from_millis(API_STOP_GRACE_MS), handle.stop(true)).await.is_err() {
        tracing::warn!(grace_ms = API_STOP_GRACE_MS, "the HTTP API did not stop in time; stopping without it");
    }
    // The core decides nothing more; what it already sent for persisting is
    // released to the agents once durable, then their links are closed, so
    // each agent sees the controller go at once and redials.
    let closed: usize = addr.send(crate::actor::Stop).await.unwrap_or_default();
    queue.close();
    drop(renewer_stop);
    let flushed = tokio::time::timeout(
        Duration::from_millis(STORE_FLUSH_GRACE_MS),
        tokio::task::spawn_blocking(move || {
            let _ = writer.join();
            if let Some(r) = renewer {
                let _ = r.join();
            }
        }),
    )
    .await
    .is_ok();
    if let Some(e) = exporter {
        // Dropping the exporter would lose what is still queued.
        let flushed = tokio::task::spawn_blocking(move || e.shutdown(Duration::from_millis(TRACE_FLUSH_MS))).await;
        if !flushed.unwrap_or(false) {
            tracing::warn!(
                wait_ms = TRACE_FLUSH_MS,
                "the last spans did not reach the collector in time; they are lost"
            );
        }
    }
    // The links' writers send what was queued for them, then close.
    tokio::time::sleep(Duration::from_millis(AGENT_CLOSE_GRACE_MS)).await;
    match failure {
        Some(reason) => Err(DaemonError::StoreFailed { store: location.describe(), reason }),
        None if !flushed => Err(DaemonError::StoreFailed {
            store: location.describe(),
            reason: format!("its writer did not finish within {STORE_FLUSH_GRACE_MS} ms of the stop"),
        }),
        None => {
            tracing::info!(agents_closed = closed, "controller stopped; the store is flushed");
            Ok(())
        }
    }
}

fn spawn_writer(
    mut store: Store,
    queue: Arc<CommitQueue<StoreOp>>,
    durable: mpsc::UnboundedSender<Ticket>,
    failed: mpsc::UnboundedSender<String>,
    metrics: Arc<crate::metrics::Metrics>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            // Everything pending goes into one transaction: one fsync for many transitions.
            while let Some(batch) = queue.take_batch() {
                let start = std::time::Instant::now();
                let mut result = store.apply(&batch.items);
                // A lost PostgreSQL connection or a restarting server: the
                // batch is tried again (the fence first, so a takeover in the
                // meantime is seen); SQLite's errors stop the controller as before.
                while let Err(e) = &result
                    && matches!(e, StoreError::Postgres(_))
                    && cosmos_proto::Classify::is_retryable(e)
                    && start.elapsed() < Duration::from_millis(STORE_RETRY_MS_MAX)
                {
                    tracing::warn!(error = %e, "store write failed; retrying");
                    std::thread::sleep(Duration::from_millis(STORE_RETRY_PAUSE_MS));
                    result = store.apply(&batch.items);
                }
                metrics.store_commit.observe(start.elapsed().as_secs_f64());
                metrics.store_commit_ops.observe(batch.items.len() as f64);
                match result {
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

/// This host's name, for the default lease holder.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "controller".to_string(),
    }
}

/// Takes the lease, or waits as a standby until it can: every third of a
/// lease it tries again, and meanwhile tells agents and API clients who leads.
/// Returns the store holding the lease, its identity and what it loaded.
async fn lead_or_wait(
    pg: &PostgresOptions,
    lease: Lease,
    api: &std::net::TcpListener,
    api_listen: SocketAddr,
    agents: &tokio::net::TcpListener,
    agent_token: &Token,
    frame_bytes_max: u32,
) -> Result<(Store, String, crate::records::Snapshot), DaemonError> {
    let retry = Duration::from_millis((pg.lease_ms / 3).max(1));
    let leader: Arc<std::sync::Mutex<Option<LeaseInfo>>> = Arc::new(std::sync::Mutex::new(None));
    let api = api.try_clone().and_then(|l| {
        l.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(l)
    });
    let api = api.map_err(|cause| DaemonError::Bind { addr: api_listen, flag: "--api-listen", cause })?;
    let standby = async {
        tokio::join!(
            standby_api(&api, leader.clone()),
            standby_agents(agents, leader.clone(), agent_token.clone(), frame_bytes_max)
        );
    };
    let take = async {
        let (url, ours) = (pg.url.clone(), lease.clone());
        let mut store = tokio::task::spawn_blocking(move || Store::open_postgres(&url, ours))
            .await
            .map_err(|e| StoreError::Url(format!("opening the store failed: {e}")))??;
        let mut said = None::<String>;
        loop {
            let (s, result) = tokio::task::spawn_blocking(move || {
                let result = store.load().and_then(|snap| Ok((store.instance_id()?, snap)));
                (store, result)
            })
            .await
            .map_err(|e| StoreError::Url(format!("taking the lease failed: {e}")))?;
            store = s;
            match result {
                Ok((id, snapshot)) => {
                    tracing::info!(epoch = snapshot.epoch.0, holder = lease.holder, "took the lease: leading");
                    return Ok::<_, DaemonError>((store, id, snapshot));
                }
                Err(StoreError::NotLeader(info)) => {
                    let line = format!("{} at {}", info.holder, info.api);
                    if said.as_deref() != Some(line.as_str()) {
                        tracing::info!(
                            leader = info.holder,
                            api = info.api,
                            epoch = info.epoch.0,
                            retry_ms = retry.as_millis() as u64,
                            "another controller leads; waiting as a standby"
                        );
                        said = Some(line);
                    }
                    *leader.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
                }
                Err(e) if cosmos_proto::Classify::is_retryable(&e) => {
                    tracing::warn!(error = %e, retry_ms = retry.as_millis() as u64, "cannot reach the store; retrying");
                }
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(retry).await;
        }
    };
    tokio::select! {
        taken = take => taken,
        () = standby => unreachable!("the standby's listeners serve until the lease is taken"),
    }
}

/// What a standby says: who leads, where.
fn standby_message(leader: &std::sync::Mutex<Option<LeaseInfo>>) -> (String, Option<LeaseInfo>) {
    match leader.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        Some(l) => (
            format!(
                "this controller is a standby, not the leader; the leader is {} (API {}, agents {}, epoch {})",
                l.holder, l.api, l.agents, l.epoch.0
            ),
            Some(l),
        ),
        None => ("this controller is a standby and has not yet read who leads; retry shortly".to_string(), None),
    }
}

/// Answers every API request 503 naming the leader (`leader` in the body, `X-Cosmos-Leader`), so clients follow it.
async fn standby_api(listener: &tokio::net::TcpListener, leader: Arc<std::sync::Mutex<Option<LeaseInfo>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let permits = Arc::new(tokio::sync::Semaphore::new(STANDBY_CONNECTIONS_MAX));
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        let leader = leader.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Read the head (bounded), so the client is not reset mid-send.
            let mut head = Vec::new();
            let mut buf = [0u8; 2048];
            let read = async {
                while head.len() < STANDBY_HEAD_BYTES_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(STANDBY_HEAD_TIMEOUT_MS), read).await;
            let (message, info) = standby_message(&leader);
            let api = info.as_ref().map(|l| l.api.clone());
            let body = serde_json::json!({ "error": message, "retryable": true, "leader": api }).to_string();
            let mut resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: {}\r\n",
                body.len()
            );
            if let Some(api) = &api {
                resp.push_str(&format!("X-Cosmos-Leader: {api}\r\n"));
            }
            resp.push_str("\r\n");
            resp.push_str(&body);
            let _ = socket.write_all(resp.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Refuses every agent's handshake (once its token checks out), naming the leader's agent address.
async fn standby_agents(
    listener: &tokio::net::TcpListener,
    leader: Arc<std::sync::Mutex<Option<LeaseInfo>>>,
    token: Token,
    frame_bytes_max: u32,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(STANDBY_CONNECTIONS_MAX));
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        let (leader, token) = (leader.clone(), token.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = cosmos_proto::Connection::new(socket, frame_bytes_max);
            let check = |_| async move {
                let (message, info) = standby_message(&leader);
                Err(cosmos_proto::Refusal::Other(match info {
                    Some(l) => format!("{message}; try {}", l.agents),
                    None => message,
                }))
            };
            let _ = cosmos_proto::handshake::accept_checked(
                &mut conn,
                "controller-standby",
                cosmos_proto::Role::Agent,
                &token,
                cosmos_proto::handshake::DEFAULT_HANDSHAKE_TIMEOUT_MS,
                check,
            )
            .await;
        });
    }
}

/// Renews the lease every third of it on its own connection; stops the
/// controller (through `failed`) once another controller took the lease, or
/// when no renewal has succeeded for a whole lease (another may have taken it by now).
fn spawn_renewer(
    mut store: Store,
    lease_ms: u64,
    failed: mpsc::UnboundedSender<String>,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("lease-renewer".into())
        .spawn(move || {
            let period = Duration::from_millis((lease_ms / 3).max(1));
            let mut renewed = std::time::Instant::now();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(period) {
                match store.renew() {
                    Ok(()) => renewed = std::time::Instant::now(),
                    Err(e)
                        if cosmos_proto::Classify::is_retryable(&e)
                            && renewed.elapsed() < Duration::from_millis(lease_ms) =>
                    {
                        tracing::warn!(error = %e, "could not renew the lease; retrying");
                    }
                    Err(e) => {
                        let reason = match e {
                            StoreError::Deposed { .. } => e.to_string(),
                            other => format!(
                                "the lease could not be renewed for {} ms ({other}); another controller may lead now",
                                renewed.elapsed().as_millis()
                            ),
                        };
                        tracing::error!(%reason, "lost the lease; the controller stops");
                        let _ = failed.send(reason);
                        return;
                    }
                }
            }
        })
        .expect("spawning a thread succeeds")
}
