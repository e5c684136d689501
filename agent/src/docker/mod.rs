//! The Docker runtime: each attempt is a container, driven through the Docker
//! Engine API (bollard), never by shelling out to `docker`.
//!
//! Entry points: [`DockerRuntime::new`], then the [`Runtime`] trait the daemon
//! drives (`recover` once at start-up, then `start`, `stop`, `acknowledged`),
//! and [`DockerRuntime::ping`] and [`DockerRuntime::reap`] now and then.
//! The modules follow the container's seams:
//!
//! - `config`: [`DockerConfig`] and the create body of an attempt's container;
//! - `labels`: the labels every container carries, written and read back;
//! - `lifecycle`: create, start, watch to the exit, record, remove; stop;
//! - `logs`: following a container's output into its log files and events;
//! - `adopt`: what a restarted agent finds, adopts and reports; the reaper.
//!
//! A container carries labels naming its agent, attempt, job, controller
//! epoch, GPUs and time limit, and a name derived from the agent's name and
//! the full attempt id ([`container_name`]), so agents sharing an engine never
//! touch each other's containers and a restarted agent finds its own.
//!
//! Layout on disk, under [`DockerConfig::work_dir_root`], as the process
//! runtime's:
//!
//! ```text
//! attempts/<attempt id>/attempt.json   what was started (written before the container is created)
//! attempts/<attempt id>/stdout.log     the container's standard output, as streamed from the engine
//! attempts/<attempt id>/stderr.log     its standard error
//! attempts/<attempt id>/exit.json      how it ended (written before the container is removed)
//! attempts/<attempt id>/acknowledged   the controller has recorded the outcome
//! ```
//!
//! The attempt's directory is bind-mounted at [`WORK_MOUNT`] and is the
//! container's working directory; outputs are collected from it after exit.
//!
//! GPUs: on a real GPU host the container gets a device request for exactly
//! the attempt's GPUs, by uuid, and `NVIDIA_VISIBLE_DEVICES` naming the same
//! uuids (an image's `NVIDIA_VISIBLE_DEVICES=all` must not widen it). With
//! simulated GPUs there is no NVIDIA runtime: the assignment travels in the
//! environment only (`CUDA_VISIBLE_DEVICES` = the host indices, as the
//! process runtime sets it, and `COSMOS_GPU_UUIDS`), and
//! `NVIDIA_VISIBLE_DEVICES=void` keeps any NVIDIA runtime from exposing a
//! real GPU to a job that was given simulated ones.
//!
//! Containers run under the engine's init (`--init`), so a job's process is
//! not PID 1 and `SIGTERM` reaches it with its usual meaning; exit codes above
//! 128 (the init's way of saying "killed by signal N") are reported as that
//! signal.

mod adopt;
mod config;
mod labels;
mod lifecycle;
mod logs;

pub use config::{DEFAULT_SOCKET, DockerConfig, container_name};
pub use labels::{LABEL_AGENT, LABEL_ATTEMPT, LABEL_CREATED_MS, LABEL_EPOCH, LABEL_GPUS, LABEL_JOB, LABEL_TIMEOUT_MS};

use crate::core::{ExitStatus, Recovered, RuntimeEvent};
use crate::process::{ACK_FILE, RECORD_FILE};
use crate::runtime::{EventSender, Runtime, StartRequest, lock, unix_ms, write_json};
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::ContainerCreateBody;
use cosmos_proto::{AttemptId, Epoch, JobId};
use lifecycle::run_attempt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the attempt's directory appears inside the container; also its working directory.
pub const WORK_MOUNT: &str = cosmos_proto::spec::CONTAINER_WORK_DIR;
/// Requests that last as long as a container does (wait, follow logs): no client-side limit to speak of.
const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Pause before asking the engine again after a transport error while watching a container.
const RETRY_DELAY: Duration = Duration::from_millis(1_000);

/// What went wrong talking to the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerError {
    /// No answer: the daemon is down, the socket is missing, or the agent may not use it.
    #[error(
        "the Docker daemon at {socket} is unreachable ({detail}); check that dockerd is running and that the agent's user may use its socket"
    )]
    Unreachable {
        /// The socket tried.
        socket: String,
        /// What the client saw.
        detail: String,
    },
    /// The engine answered with an error.
    #[error("the Docker daemon refused to {what}: {message} (HTTP {status})")]
    Api {
        /// What was asked.
        what: String,
        /// HTTP status.
        status: u16,
        /// The engine's message.
        message: String,
    },
}

impl DockerError {
    fn is_not_found(&self) -> bool {
        matches!(self, DockerError::Api { status: 404, .. })
    }

    fn is_unreachable(&self) -> bool {
        matches!(self, DockerError::Unreachable { .. })
    }
}

/// Why an attempt did not start, and whether another try may work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct StartError {
    /// What went wrong and what to do.
    pub reason: String,
    /// Another try may work (the daemon hiccupped) or not (the image is missing).
    pub retry: cosmos_proto::Retry,
}

impl StartError {
    fn terminal(reason: impl Into<String>) -> StartError {
        StartError { reason: reason.into(), retry: cosmos_proto::Retry::Terminal }
    }

    fn retryable(reason: impl Into<String>) -> StartError {
        StartError { reason: reason.into(), retry: cosmos_proto::Retry::Retryable }
    }
}

/// What `attempt.json` holds for a container attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerRecord {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Its job.
    pub job_id: JobId,
    /// The controller epoch that ordered it.
    pub epoch: Epoch,
    /// Its GPUs.
    pub gpu_uuids: Vec<String>,
    /// Its container's name.
    pub container: String,
    /// The image.
    pub image: String,
    /// Wall-clock creation, in milliseconds since the Unix epoch (host-local use only).
    pub started_unix_ms: u64,
    /// The attempt's time limit.
    pub timeout_ms: u64,
    /// The job's working directory, as the agent sees it.
    pub work_dir: PathBuf,
    /// Outputs the spec expects, relative to `work_dir`.
    pub outputs: Vec<String>,
}

/// What `exit.json` holds (the process runtime's fields, and the OOM kill).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ExitRecord {
    code: Option<i32>,
    signal: Option<i32>,
    #[serde(default)]
    oom_killed: bool,
}

impl ExitRecord {
    fn of(s: &ExitStatus) -> ExitRecord {
        ExitRecord { code: s.code, signal: s.signal, oom_killed: s.oom_killed }
    }

    fn status(&self) -> ExitStatus {
        ExitStatus { code: self.code, signal: self.signal, oom_killed: self.oom_killed }
    }
}

const UNKNOWN_EXIT: ExitStatus = ExitStatus { code: None, signal: None, oom_killed: false };
const KILLED: ExitStatus = ExitStatus { code: None, signal: Some(libc::SIGKILL), oom_killed: false };

/// How an exit code seen by the engine maps to a status: under an init, a job
/// killed by signal N makes the container exit with 128 + N.
pub fn exit_status(exit_code: i64, oom_killed: bool) -> ExitStatus {
    if (129..=128 + 64).contains(&exit_code) {
        ExitStatus { code: None, signal: Some((exit_code - 128) as i32), oom_killed }
    } else {
        ExitStatus { code: Some(exit_code.clamp(i32::MIN as i64, i32::MAX as i64) as i32), signal: None, oom_killed }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Being created and started; a stop waits in `pending_stop`.
    Creating,
    /// Running (or adopted); a stop goes to the engine at once.
    Running,
    /// Its end was seen; `Exited` is on its way.
    Exited,
}

#[derive(Clone, Debug)]
struct Live {
    container: String,
    phase: Phase,
    pending_stop: Option<u64>,
}

/// What runtimes, their tasks and their handles share.
struct Shared {
    config: DockerConfig,
    client: tokio::sync::OnceCell<Docker>,
    live: Mutex<HashMap<AttemptId, Live>>,
}

impl Shared {
    fn socket(&self) -> String {
        self.config.socket.display().to_string()
    }

    /// The client, connected and with its API version agreed with the engine
    /// (once; until that works, every call tries again).
    async fn client(&self) -> Result<Docker, DockerError> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let timeout_s = self.config.request_timeout_ms.div_ceil(1000).max(1);
                let socket = self.socket();
                let docker = Docker::connect_with_unix(&socket, timeout_s, bollard::API_DEFAULT_VERSION)
                    .map_err(|e| self.error("connect", e))?;
                // The engine may speak an older API than the client (Docker 20.10: 1.41); newer
                // engines refuse versions older than their minimum, so a fixed one would not do.
                docker.negotiate_version().await.map_err(|e| self.error("agree on an API version", e))
            })
            .await?;
        Ok(client.clone())
    }

    async fn long_client(&self) -> Result<Docker, DockerError> {
        Ok(self.client().await?.with_timeout(LONG_REQUEST_TIMEOUT))
    }

    fn error(&self, what: &str, e: BollardError) -> DockerError {
        match e {
            BollardError::DockerResponseServerError { status_code, message } => {
                DockerError::Api { what: what.to_string(), status: status_code, message }
            }
            BollardError::DockerContainerWaitError { error, code } => {
                DockerError::Api { what: what.to_string(), status: 0, message: format!("{error} (exit code {code})") }
            }
            other => DockerError::Unreachable { socket: self.socket(), detail: other.to_string() },
        }
    }

    fn attempt_dir(&self, attempt_id: AttemptId) -> PathBuf {
        crate::runtime::attempt_dir(&self.config.work_dir_root, attempt_id)
    }

    /// `path` (under the work dir root) as the engine sees it.
    fn host_path(&self, path: &Path) -> PathBuf {
        match (&self.config.host_work_dir_root, path.strip_prefix(&self.config.work_dir_root)) {
            (Some(host_root), Ok(rel)) => host_root.join(rel),
            _ => path.to_path_buf(),
        }
    }
}

/// Runs attempts as Docker containers.
pub struct DockerRuntime {
    shared: Arc<Shared>,
    events: EventSender,
    tasks: crate::runtime::Watchers,
}

impl DockerRuntime {
    /// A runtime for this configuration, reporting on `events`. Connects lazily:
    /// an unreachable daemon shows in [`ping`](Self::ping) and in retryable start failures.
    pub fn new(config: DockerConfig, events: EventSender) -> DockerRuntime {
        let shared = Shared { config, client: tokio::sync::OnceCell::new(), live: Mutex::new(HashMap::new()) };
        DockerRuntime { shared: Arc::new(shared), events, tasks: crate::runtime::Watchers::default() }
    }

    /// The configuration.
    pub fn config(&self) -> &DockerConfig {
        &self.shared.config
    }

    /// The directory of one attempt: its record, logs and (mounted at [`WORK_MOUNT`]) its files.
    pub fn attempt_dir(&self, attempt_id: AttemptId) -> PathBuf {
        self.shared.attempt_dir(attempt_id)
    }

    /// The name of an attempt's container.
    pub fn container_name(&self, attempt_id: AttemptId) -> String {
        container_name(&self.shared.config.agent_name, attempt_id)
    }

    /// Attempts currently watched (starting, running, or exited with `Exited` not yet sent).
    pub fn live_attempts(&self) -> Vec<AttemptId> {
        let mut ids: Vec<AttemptId> = lock(&self.shared.live).keys().copied().collect();
        ids.sort();
        ids
    }

    /// Whether the engine answers. The daemon calls it to tell whether this host can run jobs.
    pub fn ping(&self) -> impl Future<Output = Result<(), DockerError>> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            let docker = shared.client().await?;
            docker.ping().await.map(|_| ()).map_err(|e| shared.error("answer a ping", e))
        }
    }

    /// Removes this agent's containers that no attempt in `live` claims (and
    /// that this runtime is not watching); returns their names. For after a
    /// reconcile and now and then.
    pub fn reap(&self, live: &[AttemptId]) -> impl Future<Output = Result<Vec<String>, DockerError>> + Send + 'static {
        let shared = self.shared.clone();
        let claimed: HashSet<AttemptId> = live.iter().copied().collect();
        async move { shared.reap(claimed).await }
    }

    /// The create body of an attempt's container (name, image, command,
    /// environment, labels, mounts, GPUs), without talking to the engine.
    pub fn container_config(&self, req: &StartRequest) -> Result<(String, ContainerCreateBody), StartError> {
        self.shared.container_config(req)
    }

    /// Creates an attempt's container without starting it or watching it;
    /// returns its id. [`Runtime::start`] does this and more; this is for
    /// inspecting what would run (the device request on a host without GPUs).
    pub fn create_only(&self, req: &StartRequest) -> impl Future<Output = Result<String, StartError>> + Send + 'static {
        let shared = self.shared.clone();
        let req = req.clone();
        async move { shared.create(&req).await }
    }

    /// The controller has durably recorded how this attempt ended.
    pub fn acknowledge(&mut self, attempt_id: AttemptId) {
        let dir = self.attempt_dir(attempt_id);
        if dir.join(RECORD_FILE).exists() {
            if let Err(e) = std::fs::write(dir.join(ACK_FILE), b"") {
                tracing::warn!(attempt = %attempt_id, error = %e, "cannot mark an attempt acknowledged");
            }
        }
    }

    fn spawn_task(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(fut);
    }

    fn send_later(&mut self, event: RuntimeEvent) {
        self.tasks.send_later(&self.events, event);
    }

    /// Checks, records and registers an attempt; the engine's part runs in [`run_attempt`].
    fn prepare(&mut self, req: &StartRequest) -> Result<DockerRecord, StartError> {
        let (container, body) = self.shared.container_config(req)?;
        let dir = self.attempt_dir(req.attempt_id);
        for d in [&dir, &req.work_dir] {
            std::fs::create_dir_all(d).map_err(|e| {
                StartError::retryable(format!("cannot create the attempt directory {}: {e}", d.display()))
            })?;
        }
        if dir.join(RECORD_FILE).exists() || lock(&self.shared.live).contains_key(&req.attempt_id) {
            return Err(StartError::terminal(format!(
                "attempt {} was already started on this host (see {})",
                req.attempt_id,
                dir.display()
            )));
        }
        let record = DockerRecord {
            attempt_id: req.attempt_id,
            job_id: req.job_id,
            epoch: req.epoch,
            gpu_uuids: req.gpu_uuids.clone(),
            container: container.clone(),
            image: body.image.unwrap_or_default(),
            started_unix_ms: unix_ms(),
            timeout_ms: req.spec.timeout_ms,
            work_dir: req.work_dir.clone(),
            outputs: req.spec.outputs.iter().map(|o| o.path.clone()).collect(),
        };
        write_json(&dir.join(RECORD_FILE), &record)
            .map_err(|e| StartError::retryable(format!("cannot write {}: {e}", dir.join(RECORD_FILE).display())))?;
        lock(&self.shared.live).insert(req.attempt_id, Live { container, phase: Phase::Creating, pending_stop: None });
        Ok(record)
    }
}

impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn start(&mut self, req: StartRequest) {
        match self.prepare(&req) {
            Ok(record) => {
                let (shared, events) = (self.shared.clone(), self.events.clone());
                self.spawn_task(run_attempt(shared, events, req, record));
            }
            Err(e) => {
                tracing::warn!(attempt = %req.attempt_id, reason = %e.reason, retryable = e.retry.is_retryable(), "attempt did not start");
                self.send_later(RuntimeEvent::StartFailed {
                    attempt_id: req.attempt_id,
                    reason: e.reason,
                    retry: e.retry,
                });
            }
        }
    }

    fn stop(&mut self, attempt_id: AttemptId, grace_ms: u64) {
        let mut live = lock(&self.shared.live);
        match live.get_mut(&attempt_id) {
            None => {
                drop(live);
                // Nothing watched under this id; whatever container has its name goes, and it counts as killed.
                let (shared, events) = (self.shared.clone(), self.events.clone());
                let container = self.container_name(attempt_id);
                self.spawn_task(async move {
                    if let Err(e) = shared.remove(&container).await {
                        tracing::warn!(attempt = %attempt_id, container, error = %e, "cannot remove a container");
                    }
                    let _ = events.send(RuntimeEvent::Exited { attempt_id, status: KILLED, outputs: Vec::new() }).await;
                });
            }
            Some(l) => match l.phase {
                Phase::Exited => {} // Its `Exited` is on its way.
                Phase::Creating => l.pending_stop = Some(l.pending_stop.map_or(grace_ms, |g| g.min(grace_ms))),
                Phase::Running => {
                    let container = l.container.clone();
                    drop(live);
                    let shared = self.shared.clone();
                    tracing::info!(attempt = %attempt_id, container, grace_ms, "stopping a container");
                    self.spawn_task(async move { shared.stop(&container, grace_ms).await });
                }
            },
        }
    }

    /// Finds this agent's containers: running ones are adopted (watched to
    /// their end, then reported and removed); ended ones are reported with
    /// their exit status and removed. Attempts whose containers are gone are
    /// reported from their `exit.json` (unknown status without one) until
    /// acknowledged.
    fn recover(&mut self) -> Vec<Recovered> {
        self.recover_all()
    }

    fn acknowledged(&mut self, attempt_id: AttemptId) {
        self.acknowledge(attempt_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_above_128_are_signals() {
        assert_eq!(exit_status(0, false), ExitStatus { code: Some(0), signal: None, oom_killed: false });
        assert_eq!(exit_status(3, false), ExitStatus { code: Some(3), signal: None, oom_killed: false });
        assert_eq!(exit_status(128, false), ExitStatus { code: Some(128), signal: None, oom_killed: false });
        assert_eq!(exit_status(137, true), ExitStatus { code: None, signal: Some(9), oom_killed: true });
        assert_eq!(exit_status(143, false), ExitStatus { code: None, signal: Some(15), oom_killed: false });
        assert_eq!(exit_status(255, false), ExitStatus { code: Some(255), signal: None, oom_killed: false });
    }
}
