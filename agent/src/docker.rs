//! The Docker runtime: each attempt is a container, driven through the Docker
//! Engine API (bollard), never by shelling out to `docker`.
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

use crate::core::{ExitStatus, Recovered, RuntimeEvent};
use crate::process::{
    ACK_FILE, EXIT_FILE, ProgressParser, RECORD_FILE, STDERR_FILE, STDOUT_FILE, collect_outputs, recovered_outputs,
};
use crate::runtime::{EventSender, Runtime, StartRequest, lock, unix_ms, write_json};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, Mount as DockerMount, MountType};
use bollard::query_parameters::{
    ContainerArchiveInfoOptions, CreateContainerOptions, KillContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StopContainerOptions,
};
use cosmos_proto::{AttemptId, Epoch, JobId, LOG_CHUNK_BYTES_MAX, LogStream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Label: the agent that started the container (its name).
pub const LABEL_AGENT: &str = "cosmos.agent";
/// Label: the attempt, as `att-<n>`.
pub const LABEL_ATTEMPT: &str = "cosmos.attempt";
/// Label: the job, as `job-<n>`.
pub const LABEL_JOB: &str = "cosmos.job";
/// Label: the controller epoch that ordered the attempt, as a number.
pub const LABEL_EPOCH: &str = "cosmos.epoch";
/// Label: the attempt's GPU uuids, comma-separated.
pub const LABEL_GPUS: &str = "cosmos.gpus";
/// Label: the attempt's time limit in milliseconds.
pub const LABEL_TIMEOUT_MS: &str = "cosmos.timeout_ms";
/// Label: when the agent created the container, in milliseconds since the Unix epoch.
pub const LABEL_CREATED_MS: &str = "cosmos.created_unix_ms";
/// Where the attempt's directory appears inside the container; also its working directory.
pub const WORK_MOUNT: &str = cosmos_proto::spec::CONTAINER_WORK_DIR;
/// The engine's usual socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Longest wait for the engine's answer to a short request (create, inspect, remove).
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 60_000;
/// Requests that last as long as a container does (wait, follow logs): no client-side limit to speak of.
const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// After a container exited, how long its log stream may take to end before it is cut.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before asking the engine again after a transport error while watching a container.
const RETRY_DELAY: Duration = Duration::from_millis(1_000);
/// The search path when neither the job nor its image sets `PATH` (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How to build the test image, for the "image not present" reason.
const BUILD_HINT: &str = "build it on this host (scripts/build-images builds cosmos-testjob:dev) \
                          or load it with `docker load -i IMAGE.tar`; this agent does not pull images";

/// How the Docker runtime runs containers on this host.
#[derive(Clone, Debug)]
pub struct DockerConfig {
    /// This agent's name: the `cosmos.agent` label, part of every container's name.
    pub agent_name: String,
    /// The GPUs are simulated: no device requests, the assignment goes in the environment only.
    pub gpus_simulated: bool,
    /// The engine's Unix socket.
    pub socket: PathBuf,
    /// Volumes a job's `mounts` may name, each a directory on the host (as the engine sees it).
    pub volumes: BTreeMap<String, PathBuf>,
    /// Network for job containers; `None` is the engine's default bridge. `host` only if set here.
    pub network: Option<String>,
    /// Where attempts' directories live, as the agent sees them.
    pub work_dir_root: PathBuf,
    /// The same directory as the engine sees it, when the agent runs in a container
    /// itself and bind-mounts it from the host; `None`: the same path.
    pub host_work_dir_root: Option<PathBuf>,
    /// `uid[:gid]` to run jobs as; `None` keeps the image's user.
    pub user: Option<String>,
    /// Longest wait for the engine's answer to a short request.
    pub request_timeout_ms: u64,
}

impl DockerConfig {
    /// A configuration with the defaults: the socket from `DOCKER_HOST` when it
    /// is `unix://…`, else [`DEFAULT_SOCKET`]; real GPUs; no volumes; the
    /// default bridge network; the image's user.
    pub fn new(agent_name: impl Into<String>, work_dir_root: impl Into<PathBuf>) -> DockerConfig {
        let socket = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        DockerConfig {
            agent_name: agent_name.into(),
            gpus_simulated: false,
            socket,
            volumes: BTreeMap::new(),
            network: None,
            work_dir_root: work_dir_root.into(),
            host_work_dir_root: None,
            user: None,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
        }
    }
}

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

/// The unique container name of an attempt on an agent: `cosmos-<agent>-att-<n>`.
/// Characters Docker does not allow in names become `-`, and then a digest of
/// the agent's real name keeps two such agents apart.
pub fn container_name(agent_name: &str, attempt_id: AttemptId) -> String {
    let clean: String = agent_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
        .collect();
    if clean == agent_name && !clean.is_empty() {
        format!("cosmos-{clean}-{attempt_id}")
    } else {
        use sha2::Digest;
        let digest = hex::encode(&sha2::Sha256::digest(agent_name.as_bytes())[..4]);
        format!("cosmos-{clean}-{digest}-{attempt_id}")
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

    fn label_filter(&self) -> HashMap<String, Vec<String>> {
        HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.config.agent_name)])])
    }

    /// The container's create body for an attempt.
    fn container_config(&self, req: &StartRequest) -> Result<(String, ContainerCreateBody), StartError> {
        let config = &self.config;
        let Some(image) = req.spec.image.clone().filter(|i| !i.is_empty()) else {
            return Err(StartError::terminal(
                "the job has no `image`, and this agent runs jobs as Docker containers; give the image to run \
                 (or run the job on an agent with the process runtime)",
            ));
        };
        let Some(program) = req.spec.command.first().filter(|p| !p.is_empty()) else {
            return Err(StartError::terminal("the job's `command` is empty: give the program to run in the image"));
        };
        let name = container_name(&config.agent_name, req.attempt_id);

        let mut env: BTreeMap<String, String> = req.spec.env.clone();
        // CUDA's own numbering then agrees with the driver's (NVML's, nvidia-smi's).
        env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
        env.insert("COSMOS_ATTEMPT_ID".into(), req.attempt_id.to_string());
        env.insert("COSMOS_JOB_ID".into(), req.job_id.to_string());
        env.insert("COSMOS_GPU_UUIDS".into(), req.gpu_uuids.join(","));
        let mut device_requests = None;
        if config.gpus_simulated || req.gpu_uuids.is_empty() {
            // No NVIDIA runtime behind simulated GPUs: the environment is all the job gets.
            let indices: Vec<String> = req.gpu_indices.iter().map(u32::to_string).collect();
            env.insert("CUDA_VISIBLE_DEVICES".into(), indices.join(","));
            env.insert("NVIDIA_VISIBLE_DEVICES".into(), "void".into());
        } else {
            // The container sees exactly these GPUs, numbered from 0 in PCI order.
            let inside: Vec<String> = (0..req.gpu_uuids.len()).map(|i| i.to_string()).collect();
            env.insert("CUDA_VISIBLE_DEVICES".into(), inside.join(","));
            env.insert("NVIDIA_VISIBLE_DEVICES".into(), req.gpu_uuids.join(","));
            device_requests = Some(vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: None,
                device_ids: Some(req.gpu_uuids.clone()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                options: None,
            }]);
        }

        let mut mounts = vec![DockerMount {
            target: Some(WORK_MOUNT.into()),
            source: Some(self.host_path(&req.work_dir).display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(false),
            ..Default::default()
        }];
        for m in &req.spec.mounts {
            let Some(source) = config.volumes.get(&m.volume) else {
                let known: Vec<&str> = config.volumes.keys().map(String::as_str).collect();
                return Err(StartError::terminal(format!(
                    "the job mounts volume `{}`, which agent {} does not have (it has: {}); \
                     add it to the agent's volumes or remove the mount",
                    m.volume,
                    config.agent_name,
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                )));
            };
            if m.target == WORK_MOUNT || !m.target.starts_with('/') {
                return Err(StartError::terminal(format!(
                    "volume `{}` cannot be mounted at `{}`: give an absolute path other than {WORK_MOUNT}",
                    m.volume, m.target
                )));
            }
            mounts.push(DockerMount {
                target: Some(m.target.clone()),
                source: Some(source.display().to_string()),
                typ: Some(MountType::BIND),
                read_only: Some(m.read_only),
                ..Default::default()
            });
        }

        // The job's own labels first: ours (`cosmos.*`) are the ones recovery trusts.
        let mut labels: HashMap<String, String> = req
            .spec
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with("cosmos."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend([
            (LABEL_AGENT.to_string(), config.agent_name.clone()),
            (LABEL_ATTEMPT.to_string(), req.attempt_id.to_string()),
            (LABEL_JOB.to_string(), req.job_id.to_string()),
            (LABEL_EPOCH.to_string(), req.epoch.0.to_string()),
            (LABEL_GPUS.to_string(), req.gpu_uuids.join(",")),
            (LABEL_TIMEOUT_MS.to_string(), req.spec.timeout_ms.to_string()),
            (LABEL_CREATED_MS.to_string(), unix_ms().to_string()),
        ]);

        let host_config = HostConfig {
            mounts: Some(mounts),
            device_requests,
            // A job's process must not be PID 1, where SIGTERM's default action is void.
            init: Some(true),
            privileged: Some(false),
            security_opt: Some(vec!["no-new-privileges".into()]),
            shm_size: req.spec.shm_bytes.map(|b| b.min(i64::MAX as u64) as i64),
            ipc_mode: req.spec.ipc_host.then(|| "host".to_string()),
            network_mode: config.network.clone(),
            auto_remove: Some(false),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image),
            // The command is argv: its program replaces any entrypoint of the image.
            entrypoint: Some(vec![program.clone()]),
            cmd: Some(req.spec.command[1..].to_vec()),
            env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            working_dir: Some(req.spec.workdir.clone().unwrap_or_else(|| WORK_MOUNT.into())),
            user: config.user.clone(),
            tty: Some(false),
            open_stdin: Some(false),
            attach_stdin: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        };
        Ok((name, body))
    }

    /// Creates (does not start) the attempt's container; returns its id.
    async fn create(&self, req: &StartRequest) -> Result<String, StartError> {
        let (name, body) = self.container_config(req)?;
        let image = body.image.clone().unwrap_or_default();
        // The engine refuses to bind-mount a directory that does not exist.
        std::fs::create_dir_all(&req.work_dir).map_err(|e| {
            StartError::retryable(format!("cannot create the attempt directory {}: {e}", req.work_dir.display()))
        })?;
        let docker = self.client().await.map_err(|e| StartError::retryable(e.to_string()))?;
        let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
        match docker.create_container(Some(options), body).await.map_err(|e| self.error("create a container", e)) {
            Ok(created) => Ok(created.id),
            Err(e @ DockerError::Unreachable { .. }) => Err(StartError::retryable(e.to_string())),
            Err(DockerError::Api { status: 404, message, .. }) => Err(StartError::terminal(format!(
                "image `{image}` is not present on this host ({message}); {BUILD_HINT}"
            ))),
            Err(DockerError::Api { status: 409, .. }) => Err(StartError::terminal(format!(
                "attempt {} was already started on this host (container {name} exists)",
                req.attempt_id
            ))),
            Err(DockerError::Api { status, message, .. }) if status < 500 => {
                Err(StartError::terminal(format!("Docker cannot create the job's container: {message}")))
            }
            Err(e) => Err(StartError::retryable(e.to_string())),
        }
    }

    /// Whether the job's program is in its (created, not started) container.
    /// Behind the init, a missing program would only show as exit code 127
    /// after a start; this says so before, naming it. When it cannot tell
    /// (a path in a mounted volume, an engine error), it lets the start decide.
    async fn check_program(&self, docker: &Docker, container: &str, req: &StartRequest) -> Result<(), StartError> {
        let Some(program) = req.spec.command.first() else { return Ok(()) };
        let image = req.spec.image.clone().unwrap_or_default();
        let mut searched = None;
        let candidates: Vec<String> = if program.contains('/') {
            let cwd = req.spec.workdir.as_deref().unwrap_or(WORK_MOUNT);
            vec![if program.starts_with('/') { program.clone() } else { format!("{cwd}/{program}") }]
        } else {
            let path = match req.spec.env.get("PATH") {
                Some(p) => p.clone(),
                None => docker
                    .inspect_image(&image)
                    .await
                    .ok()
                    .and_then(|i| i.config?.env?.into_iter().find_map(|e| e.strip_prefix("PATH=").map(String::from)))
                    .unwrap_or_else(|| DEFAULT_PATH.to_string()),
            };
            let dirs = path
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(|d| format!("{}/{program}", d.trim_end_matches('/')));
            let dirs = dirs.collect();
            searched = Some(path);
            dirs
        };
        for path in &candidates {
            if let Some(rel) = path.strip_prefix(WORK_MOUNT).and_then(|r| r.strip_prefix('/')) {
                // The attempt's own directory: the agent sees it.
                if req.work_dir.join(rel).exists() {
                    return Ok(());
                }
                continue;
            }
            if req.spec.mounts.iter().any(|m| Path::new(path).starts_with(&m.target)) {
                return Ok(());
            }
            let options = ContainerArchiveInfoOptions { path: path.clone() };
            match docker
                .get_container_archive_info(container, Some(options))
                .await
                .map_err(|e| self.error("look into a container", e))
            {
                Ok(_) => return Ok(()),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::debug!(container, error = %e, "cannot check the job's program; starting anyway");
                    return Ok(());
                }
            }
        }
        let searched = searched.map(|p| format!(" (searched PATH {p})")).unwrap_or_default();
        Err(StartError::terminal(format!(
            "cannot start `{program}` in image `{image}`: program not found in the image{searched}; \
             give its full path inside the image"
        )))
    }

    /// What a failed container start means to the user.
    fn start_error(&self, req: &StartRequest, e: DockerError) -> StartError {
        let program = req.spec.command.first().cloned().unwrap_or_default();
        let image = req.spec.image.clone().unwrap_or_default();
        match e {
            DockerError::Unreachable { .. } => StartError::retryable(e.to_string()),
            DockerError::Api { status, message, .. } => {
                if message.contains("could not select device driver") || message.contains("nvidia-container") {
                    StartError::retryable(format!(
                        "this host's Docker cannot give containers GPUs ({message}); install the NVIDIA Container \
                         Toolkit on it, or run its agent with simulated GPUs"
                    ))
                } else if message.contains("executable file not found") || message.contains("no such file or directory")
                {
                    StartError::terminal(format!(
                        "cannot start `{program}` in image `{image}`: program not found in the image; \
                         give its full path inside the image"
                    ))
                } else if message.contains("permission denied") {
                    StartError::terminal(format!(
                        "cannot start `{program}` in image `{image}`: permission denied; make it executable in the image"
                    ))
                } else if status < 500 {
                    StartError::terminal(format!("Docker cannot start the job's container: {message}"))
                } else {
                    StartError::retryable(format!("Docker cannot start the job's container: {message}"))
                }
            }
        }
    }

    async fn remove(&self, container: &str) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match docker.remove_container(container, Some(options)).await.map_err(|e| self.error("remove a container", e)) {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Graceful stop, then kill: `docker stop` with the grace rounded up to whole seconds.
    async fn stop(&self, container: &str, grace_ms: u64) {
        let docker = match self.client().await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(container, error = %e, "cannot stop a container");
                return;
            }
        };
        if grace_ms > 0 {
            let t = grace_ms.div_ceil(1000).min(i32::MAX as u64) as i32;
            let patient = docker.clone().with_timeout(Duration::from_secs(t as u64 + 60));
            let options = StopContainerOptions { t: Some(t), signal: None };
            match patient.stop_container(container, Some(options)).await.map_err(|e| self.error("stop a container", e))
            {
                Ok(()) | Err(DockerError::Api { status: 304 | 404, .. }) => return,
                Err(e) => tracing::warn!(container, error = %e, "graceful stop failed; killing"),
            }
        }
        let options = KillContainerOptions { signal: "SIGKILL".into() };
        match docker.kill_container(container, Some(options)).await.map_err(|e| self.error("kill a container", e)) {
            // 409: not running any more.
            Ok(()) | Err(DockerError::Api { status: 404 | 409, .. }) => {}
            Err(e) => tracing::warn!(container, error = %e, "cannot kill a container"),
        }
    }

    /// Waits until the container is not running; how it ended (unknown if it vanished).
    /// While the engine does not answer it asks again every second (saying so once a minute).
    async fn wait_exit(&self, container: &str) -> ExitStatus {
        let mut retries = 0u32;
        let mut retry = async |what: &str, e: &DockerError| {
            if retries % 60 == 0 {
                tracing::warn!(container, error = %e, retries, "{what}; retrying every second");
            }
            retries += 1;
            tokio::time::sleep(RETRY_DELAY).await;
        };
        loop {
            let docker = match self.long_client().await {
                Ok(d) => d,
                Err(e) => {
                    retry("cannot watch a container", &e).await;
                    continue;
                }
            };
            let waited = docker.wait_container(container, None).next().await;
            if let Some(Err(e)) = waited {
                let e = self.error("wait for a container", e);
                if e.is_unreachable() {
                    retry("lost the Docker daemon while waiting for a container", &e).await;
                    continue;
                }
            }
            match docker.inspect_container(container, None).await.map_err(|e| self.error("inspect a container", e)) {
                Ok(info) => {
                    let state = info.state.unwrap_or_default();
                    if state.running == Some(true) {
                        // The wait ended early (a daemon restart, say): wait again.
                        tokio::time::sleep(RETRY_DELAY).await;
                        continue;
                    }
                    return exit_status(state.exit_code.unwrap_or(-1), state.oom_killed == Some(true));
                }
                Err(e) if e.is_not_found() => {
                    tracing::warn!(
                        container,
                        "the container vanished (removed outside the agent); its exit is unknown"
                    );
                    return UNKNOWN_EXIT;
                }
                Err(e) => retry("cannot inspect a container", &e).await,
            }
        }
    }
}

/// Follows a container's output from its start until its end: appends what
/// the log files lack, and (with `events`) reports it as `Log` and `Progress`.
///
/// Every pass reads the container's output from its start and skips what an
/// earlier pass delivered: after a transport error, and once more after the
/// container's exit is known, without following. The engine may end a
/// followed stream at the container's stop before its log driver has flushed
/// the last unterminated line (Docker 20.10 does); the last pass reads that.
struct LogFollower {
    attempt_id: AttemptId,
    container: String,
    dir: PathBuf,
    events: Option<EventSender>,
}

impl LogFollower {
    /// `exited` turns true once the container's end is known.
    async fn run(self, shared: Arc<Shared>, mut exited: watch::Receiver<bool>) {
        let id = self.attempt_id;
        let mut files: Vec<(Option<std::fs::File>, u64)> = [STDOUT_FILE, STDERR_FILE]
            .iter()
            .map(|name| {
                let path = self.dir.join(name);
                let have = std::fs::metadata(&path).map_or(0, |m| m.len());
                let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
                if let Err(e) = &file {
                    tracing::warn!(attempt = %id, path = %path.display(), error = %e, "cannot write an attempt's log");
                }
                (file.ok(), have)
            })
            .collect();
        let mut offsets = [0u64; 2];
        let mut parsers = [ProgressParser::default(), ProgressParser::default()];
        let mut last_progress: Option<(u32, u32)> = None;
        let mut retries = 0u32;
        'pass: loop {
            let last_pass = *exited.borrow_and_update();
            let docker = match shared.long_client().await {
                Ok(d) => d,
                Err(e) => {
                    if retries % 60 == 0 {
                        tracing::warn!(attempt = %id, error = %e, "cannot follow an attempt's logs; retrying every second");
                    }
                    retries += 1;
                    tokio::time::sleep(RETRY_DELAY).await;
                    continue;
                }
            };
            let options = LogsOptions { follow: !last_pass, stdout: true, stderr: true, ..Default::default() };
            let mut stream = docker.logs(&self.container, Some(options));
            let mut seen = [0u64; 2];
            while let Some(item) = stream.next().await {
                let (index, stream_kind, message) = match item {
                    Ok(LogOutput::StdOut { message }) => (0, LogStream::Stdout, message),
                    Ok(LogOutput::StdErr { message }) => (1, LogStream::Stderr, message),
                    Ok(_) => continue,
                    Err(e) => {
                        let e = shared.error("read a container's logs", e);
                        if e.is_unreachable() {
                            if retries % 60 == 0 {
                                tracing::warn!(attempt = %id, error = %e, "lost a container's log stream; reconnecting");
                            }
                            retries += 1;
                            tokio::time::sleep(RETRY_DELAY).await;
                            continue 'pass;
                        }
                        if !e.is_not_found() {
                            tracing::warn!(attempt = %id, error = %e, "cannot read a container's logs");
                        }
                        return;
                    }
                };
                // Skip what an earlier connection already delivered.
                let start = seen[index];
                seen[index] += message.len() as u64;
                let skip = offsets[index].saturating_sub(start).min(message.len() as u64) as usize;
                let data = &message[skip..];
                if data.is_empty() {
                    continue;
                }
                let offset = offsets[index];
                offsets[index] += data.len() as u64;
                let (file, have) = &mut files[index];
                // The file may hold the start already (a previous agent wrote it): append the rest.
                if let Some(f) = file {
                    let from = have.saturating_sub(offset).min(data.len() as u64) as usize;
                    if from < data.len() {
                        if let Err(e) = f.write_all(&data[from..]) {
                            tracing::warn!(attempt = %id, error = %e, "cannot write an attempt's log");
                            *file = None;
                        }
                    }
                }
                *have = (*have).max(offsets[index]);
                let Some(events) = &self.events else { continue };
                let mut chunk_offset = offset;
                for chunk in data.chunks(LOG_CHUNK_BYTES_MAX) {
                    let event = RuntimeEvent::Log {
                        attempt_id: id,
                        stream: stream_kind,
                        offset: chunk_offset,
                        data: chunk.to_vec(),
                    };
                    if events.send(event).await.is_err() {
                        return;
                    }
                    chunk_offset += chunk.len() as u64;
                }
                // Each frame is one write of the job's: a tqdm redraw after `\r` is complete in it.
                let parser = &mut parsers[index];
                let step = parser.feed(data);
                if let Some(p) = parser.pending().or(step) {
                    if last_progress != Some(p) {
                        last_progress = Some(p);
                        let event = RuntimeEvent::Progress { attempt_id: id, step: p.0, total: p.1 };
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if last_pass {
                return;
            }
            // The followed stream ended with the container: wait for its exit, then read what is left.
            let _ = exited.wait_for(|e| *e).await;
        }
    }
}

/// Watches one started container to its end: logs, exit, record, removal, `Exited`.
async fn watch_container(shared: Arc<Shared>, events: EventSender, record: DockerRecord) {
    let id = record.attempt_id;
    let dir = shared.attempt_dir(id);
    let follower = LogFollower {
        attempt_id: id,
        container: record.container.clone(),
        dir: dir.clone(),
        events: Some(events.clone()),
    };
    // Its own task, so it reads while the exit is awaited; it ends with this watch, however that ends.
    let (exited_tx, exited) = watch::channel(false);
    let mut logs = AbortOnDrop(tokio::spawn(follower.run(shared.clone(), exited)));
    let status = shared.wait_exit(&record.container).await;
    let _ = exited_tx.send(true);
    if let Some(l) = lock(&shared.live).get_mut(&id) {
        l.phase = Phase::Exited;
    }
    // The stream ends once the engine has delivered everything the container wrote.
    if tokio::time::timeout(LOG_DRAIN_TIMEOUT, &mut logs.0).await.is_err() {
        tracing::warn!(attempt = %id, "a container's log stream did not end after its exit; cutting it");
    }
    drop(logs);
    finish(&shared, &events, &record, status).await;
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records how an attempt ended, removes its container, reports `Exited`.
async fn finish(shared: &Shared, events: &EventSender, record: &DockerRecord, status: ExitStatus) {
    let id = record.attempt_id;
    let dir = shared.attempt_dir(id);
    if let Err(e) = write_json(&dir.join(EXIT_FILE), &ExitRecord::of(&status)) {
        tracing::warn!(attempt = %id, error = %e, "cannot record an attempt's exit");
    }
    if let Err(e) = shared.remove(&record.container).await {
        // The reaper removes it once the daemon answers again.
        tracing::warn!(attempt = %id, container = record.container, error = %e, "cannot remove an exited container");
    }
    let (work_dir, wanted) = (record.work_dir.clone(), record.outputs.clone());
    let outputs = tokio::task::spawn_blocking(move || collect_outputs(&work_dir, &wanted)).await.unwrap_or_default();
    tracing::info!(attempt = %id, container = record.container, ?status, "container exited and was removed");
    let _ = events.send(RuntimeEvent::Exited { attempt_id: id, status, outputs }).await;
    lock(&shared.live).remove(&id);
}

/// A container of this agent found on the engine.
#[derive(Debug)]
struct Found {
    container: String,
    attempt_id: AttemptId,
    job_id: JobId,
    epoch: Epoch,
    gpu_uuids: Vec<String>,
    timeout_ms: u64,
    created_unix_ms: u64,
    image: String,
    /// `None` while it runs.
    exited: Option<ExitStatus>,
}

impl Found {
    /// A record from the labels, for a container whose `attempt.json` is missing.
    fn record(&self, work_dir: PathBuf) -> DockerRecord {
        DockerRecord {
            attempt_id: self.attempt_id,
            job_id: self.job_id,
            epoch: self.epoch,
            gpu_uuids: self.gpu_uuids.clone(),
            container: self.container.clone(),
            image: self.image.clone(),
            started_unix_ms: self.created_unix_ms,
            timeout_ms: self.timeout_ms,
            work_dir,
            outputs: Vec::new(),
        }
    }
}

impl Shared {
    /// Lists this agent's containers; ended ones get their logs saved, their
    /// exit recorded, and are removed.
    async fn scan(&self) -> Result<Vec<Found>, DockerError> {
        let docker = self.client().await?;
        let options = ListContainersOptions { all: true, filters: Some(self.label_filter()), ..Default::default() };
        let listed = docker.list_containers(Some(options)).await.map_err(|e| self.error("list containers", e))?;
        let mut found = Vec::new();
        for c in listed {
            let labels = c.labels.unwrap_or_default();
            let name = c.names.and_then(|n| n.first().map(|n| n.trim_start_matches('/').to_string()));
            let Some(container) = name.or(c.id) else { continue };
            let Some(attempt_id) = labels.get(LABEL_ATTEMPT).and_then(|a| a.parse::<AttemptId>().ok()) else {
                tracing::warn!(container, "removing a container with this agent's label but no attempt");
                let _ = self.remove(&container).await;
                continue;
            };
            let number = |k: &str| labels.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let info = match docker.inspect_container(&container, None).await {
                Ok(i) => i,
                Err(e) => {
                    let e = self.error("inspect a container", e);
                    if e.is_not_found() {
                        continue;
                    }
                    return Err(e);
                }
            };
            let state = info.state.unwrap_or_default();
            let running = state.running == Some(true) || state.restarting == Some(true) || state.paused == Some(true);
            let never_started = state.started_at.as_deref().is_none_or(|s| s.starts_with("0001-"));
            let exited = if running {
                None
            } else if never_started {
                // Created, never started: the previous agent died in between. Nothing ran.
                Some(UNKNOWN_EXIT)
            } else {
                Some(exit_status(state.exit_code.unwrap_or(-1), state.oom_killed == Some(true)))
            };
            found.push(Found {
                container,
                attempt_id,
                job_id: labels.get(LABEL_JOB).and_then(|j| j.parse().ok()).unwrap_or_default(),
                epoch: Epoch(number(LABEL_EPOCH)),
                gpu_uuids: labels
                    .get(LABEL_GPUS)
                    .map(|g| g.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
                    .unwrap_or_default(),
                timeout_ms: number(LABEL_TIMEOUT_MS),
                created_unix_ms: number(LABEL_CREATED_MS),
                image: c.image.unwrap_or_default(),
                exited,
            });
        }
        for f in &found {
            let Some(status) = &f.exited else { continue };
            if lock(&self.live).contains_key(&f.attempt_id) {
                continue; // Ours, this process's: its watcher finishes it.
            }
            let dir = self.attempt_dir(f.attempt_id);
            if !dir.join(RECORD_FILE).exists() {
                // Its directory is gone (or was never written): a record lets later restarts report it too.
                let record = f.record(dir.clone());
                if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| write_json(&dir.join(RECORD_FILE), &record))
                {
                    tracing::warn!(attempt = %f.attempt_id, error = %e, "cannot record a container found at start-up");
                }
            }
            if dir.is_dir() {
                // Keep the output that no agent saw, then the exit.
                let follower = LogFollower {
                    attempt_id: f.attempt_id,
                    container: f.container.clone(),
                    dir: dir.clone(),
                    events: None,
                };
                let ended = watch::channel(true).1;
                let _ =
                    tokio::time::timeout(LOG_DRAIN_TIMEOUT, follower.run(Arc::new(self.clone_config()), ended)).await;
                if let Err(e) = write_json(&dir.join(EXIT_FILE), &ExitRecord::of(status)) {
                    tracing::warn!(attempt = %f.attempt_id, error = %e, "cannot record an attempt's exit");
                }
            }
            tracing::info!(attempt = %f.attempt_id, container = f.container, ?status, "removing a container that ended while the agent was away");
            self.remove(&f.container).await?;
        }
        Ok(found)
    }

    /// A copy with the configuration, the connected client and a snapshot of the watched attempts (for helper runtimes).
    fn clone_config(&self) -> Shared {
        let client = tokio::sync::OnceCell::new();
        if let Some(c) = self.client.get() {
            let _ = client.set(c.clone());
        }
        Shared { config: self.config.clone(), client, live: Mutex::new(lock(&self.live).clone()) }
    }

    /// Removes this agent's containers that neither `claimed` nor this runtime's watchers hold.
    async fn reap(&self, claimed: HashSet<AttemptId>) -> Result<Vec<String>, DockerError> {
        let docker = self.client().await?;
        let options = ListContainersOptions { all: true, filters: Some(self.label_filter()), ..Default::default() };
        let listed = docker.list_containers(Some(options)).await.map_err(|e| self.error("list containers", e))?;
        let mut removed = Vec::new();
        for c in listed {
            let labels = c.labels.unwrap_or_default();
            let attempt = labels.get(LABEL_ATTEMPT).and_then(|a| a.parse::<AttemptId>().ok());
            if let Some(a) = attempt {
                if claimed.contains(&a) || lock(&self.live).contains_key(&a) {
                    continue;
                }
            }
            let name = c.names.and_then(|n| n.first().map(|n| n.trim_start_matches('/').to_string()));
            let Some(container) = name.or(c.id) else { continue };
            tracing::warn!(container, attempt = ?attempt, "removing a container that no attempt claims");
            self.remove(&container).await?;
            removed.push(container);
        }
        Ok(removed)
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

    fn adopt(&mut self, f: &Found) -> Recovered {
        let dir = self.attempt_dir(f.attempt_id);
        let on_disk: Option<DockerRecord> =
            std::fs::read(dir.join(RECORD_FILE)).ok().and_then(|t| serde_json::from_slice(&t).ok());
        let record = on_disk.unwrap_or_else(|| f.record(dir.clone()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(attempt = %f.attempt_id, error = %e, "cannot create an adopted attempt's directory");
        }
        let elapsed_ms = unix_ms().saturating_sub(f.created_unix_ms);
        let remaining_ms = f.timeout_ms.saturating_sub(elapsed_ms);
        tracing::info!(attempt = %f.attempt_id, container = f.container, remaining_ms, "adopting a running container");
        let live = Live { container: f.container.clone(), phase: Phase::Running, pending_stop: None };
        lock(&self.shared.live).insert(f.attempt_id, live);
        self.spawn_task(watch_container(self.shared.clone(), self.events.clone(), record));
        Recovered {
            attempt_id: f.attempt_id,
            job_id: f.job_id,
            gpu_uuids: f.gpu_uuids.clone(),
            exited: None,
            remaining_ms: Some(remaining_ms),
            outputs: Vec::new(),
        }
    }

    /// Attempts whose directories say they ended (or vanished) with no controller acknowledgement yet.
    fn recover_dirs(&self, seen: &HashSet<AttemptId>, engine_answered: bool) -> Vec<Recovered> {
        let Ok(entries) = std::fs::read_dir(self.shared.config.work_dir_root.join("attempts")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for dir in entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()) {
            let Ok(text) = std::fs::read(dir.join(RECORD_FILE)) else { continue };
            let Ok(record) = serde_json::from_slice::<DockerRecord>(&text) else { continue };
            if dir.join(ACK_FILE).exists()
                || seen.contains(&record.attempt_id)
                || lock(&self.shared.live).contains_key(&record.attempt_id)
            {
                continue;
            }
            let exit =
                std::fs::read(dir.join(EXIT_FILE)).ok().and_then(|t| serde_json::from_slice::<ExitRecord>(&t).ok());
            let status = match exit {
                Some(exit) => exit.status(),
                // No container and no exit record: it ended (and was removed) while no agent watched.
                None if engine_answered => {
                    let _ = write_json(&dir.join(EXIT_FILE), &ExitRecord::of(&UNKNOWN_EXIT));
                    UNKNOWN_EXIT
                }
                None => continue, // The engine did not answer: it may still run; the reaper decides later.
            };
            out.push(Recovered {
                attempt_id: record.attempt_id,
                job_id: record.job_id,
                outputs: recovered_outputs(Some(&status), &record.work_dir, &record.outputs),
                gpu_uuids: record.gpu_uuids,
                exited: Some(status),
                remaining_ms: None,
            });
        }
        out
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
        // The engine's calls run on a helper thread with its own small runtime,
        // so this works from any runtime flavour without blocking its workers' tasks.
        let helper = self.shared.clone_config();
        let scanned = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
                match rt {
                    Ok(rt) => rt.block_on(helper.scan()),
                    Err(e) => Err(DockerError::Unreachable {
                        socket: helper.socket(),
                        detail: format!("cannot start a helper runtime: {e}"),
                    }),
                }
            })
            .join()
            .unwrap_or_else(|_| Err(DockerError::Unreachable { socket: helper.socket(), detail: "panicked".into() }))
        });
        if let Some(client) = helper.client.get() {
            let _ = self.shared.client.set(client.clone());
        }
        let (found, engine_answered) = match scanned {
            Ok(found) => (found, true),
            Err(e) => {
                tracing::error!(error = %e, "cannot list this agent's containers; adopting none (the reaper removes them later)");
                (Vec::new(), false)
            }
        };
        let mut recovered = Vec::new();
        let mut seen = HashSet::new();
        for f in &found {
            seen.insert(f.attempt_id);
            if lock(&self.shared.live).contains_key(&f.attempt_id) {
                continue;
            }
            match &f.exited {
                None => recovered.push(self.adopt(f)),
                Some(status) => {
                    // The container kept its labels; the attempt's directory keeps what it was to produce.
                    let dir = self.shared.attempt_dir(f.attempt_id);
                    let on_disk: Option<DockerRecord> =
                        std::fs::read(dir.join(RECORD_FILE)).ok().and_then(|t| serde_json::from_slice(&t).ok());
                    let outputs =
                        on_disk.map(|r| recovered_outputs(Some(status), &r.work_dir, &r.outputs)).unwrap_or_default();
                    recovered.push(Recovered {
                        attempt_id: f.attempt_id,
                        job_id: f.job_id,
                        gpu_uuids: f.gpu_uuids.clone(),
                        exited: Some(status.clone()),
                        remaining_ms: None,
                        outputs,
                    })
                }
            }
        }
        recovered.extend(self.recover_dirs(&seen, engine_answered));
        recovered.retain(|r| !self.shared.attempt_dir(r.attempt_id).join(ACK_FILE).exists());
        recovered.sort_by_key(|r| r.attempt_id);
        recovered
    }

    fn acknowledged(&mut self, attempt_id: AttemptId) {
        self.acknowledge(attempt_id);
    }
}

/// Creates, starts and watches one attempt's container.
async fn run_attempt(shared: Arc<Shared>, events: EventSender, req: StartRequest, record: DockerRecord) {
    let id = req.attempt_id;
    let fail = |e: StartError| {
        let shared = shared.clone();
        let events = events.clone();
        async move {
            tracing::warn!(attempt = %id, reason = %e.reason, retryable = e.retry.is_retryable(), "attempt did not start");
            lock(&shared.live).remove(&id);
            let _ = events.send(RuntimeEvent::StartFailed { attempt_id: id, reason: e.reason, retry: e.retry }).await;
        }
    };
    if let Err(e) = shared.create(&req).await {
        // A record with neither container nor exit would read "vanished" after a restart.
        let _ = std::fs::remove_file(shared.attempt_dir(id).join(RECORD_FILE));
        return fail(e).await;
    }
    let checked = match shared.client().await {
        Ok(docker) => shared.check_program(&docker, &record.container, &req).await,
        Err(e) => Err(StartError::retryable(e.to_string())),
    };
    if let Err(e) = checked {
        if let Err(e) = shared.remove(&record.container).await {
            tracing::warn!(attempt = %id, error = %e, "cannot remove a container that will not start");
        }
        let _ = std::fs::remove_file(shared.attempt_dir(id).join(RECORD_FILE));
        return fail(e).await;
    }
    let cancelled = lock(&shared.live).get(&id).and_then(|l| l.pending_stop).is_some();
    if cancelled {
        // Stopped before it ran: it never will.
        tracing::info!(attempt = %id, "attempt stopped before its container started");
        lock(&shared.live).entry(id).and_modify(|l| l.phase = Phase::Exited);
        return finish(&shared, &events, &record, KILLED).await;
    }
    let started = match shared.client().await {
        Ok(docker) => {
            docker.start_container(&record.container, None).await.map_err(|e| shared.error("start a container", e))
        }
        Err(e) => Err(e),
    };
    if let Err(e) = started {
        let reason = shared.start_error(&req, e);
        if let Err(e) = shared.remove(&record.container).await {
            tracing::warn!(attempt = %id, error = %e, "cannot remove a container that did not start");
        }
        // Its outcome is the start failure reported now: nothing for a restarted agent to find.
        let _ = std::fs::remove_file(shared.attempt_dir(id).join(RECORD_FILE));
        return fail(reason).await;
    }
    let pending = {
        let mut live = lock(&shared.live);
        live.get_mut(&id).and_then(|l| {
            l.phase = Phase::Running;
            l.pending_stop.take()
        })
    };
    let gpus_simulated = shared.config.gpus_simulated;
    tracing::info!(
        attempt = %id,
        container = record.container,
        gpus = ?req.gpu_uuids,
        gpus_simulated,
        "container started{}",
        if gpus_simulated { " (simulated GPUs: assignment in its environment only)" } else { "" }
    );
    let started = RuntimeEvent::Started { attempt_id: id, handle: record.container.clone() };
    if events.send(started).await.is_err() {
        return;
    }
    if let Some(grace_ms) = pending {
        let (shared, container) = (shared.clone(), record.container.clone());
        tokio::spawn(async move { shared.stop(&container, grace_ms).await });
    }
    watch_container(shared, events, record).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosmos_proto::JobSpec;

    fn runtime(gpus_simulated: bool) -> DockerRuntime {
        let mut config = DockerConfig::new("host-a", "/var/lib/cosmos");
        config.gpus_simulated = gpus_simulated;
        DockerRuntime::new(config, tokio::sync::mpsc::channel(1).0)
    }

    fn request(image: Option<&str>, command: &[&str]) -> StartRequest {
        let mut spec = JobSpec::command("t", command.iter().copied());
        spec.image = image.map(String::from);
        StartRequest {
            attempt_id: AttemptId(42),
            job_id: JobId(7),
            epoch: Epoch(3),
            spec,
            gpu_uuids: vec!["GPU-b".into(), "GPU-a".into()],
            gpu_indices: vec![1, 0],
            work_dir: "/var/lib/cosmos/attempts/att-42".into(),
        }
    }

    #[test]
    fn exit_codes_above_128_are_signals() {
        assert_eq!(exit_status(0, false), ExitStatus { code: Some(0), signal: None, oom_killed: false });
        assert_eq!(exit_status(3, false), ExitStatus { code: Some(3), signal: None, oom_killed: false });
        assert_eq!(exit_status(128, false), ExitStatus { code: Some(128), signal: None, oom_killed: false });
        assert_eq!(exit_status(137, true), ExitStatus { code: None, signal: Some(9), oom_killed: true });
        assert_eq!(exit_status(143, false), ExitStatus { code: None, signal: Some(15), oom_killed: false });
        assert_eq!(exit_status(255, false), ExitStatus { code: Some(255), signal: None, oom_killed: false });
    }

    #[test]
    fn container_names_are_unique_per_agent_and_attempt() {
        assert_eq!(container_name("host-a", AttemptId(17)), "cosmos-host-a-att-17");
        let odd = container_name("gpu host/1", AttemptId(17));
        assert!(odd.starts_with("cosmos-gpu-host-1-") && odd.ends_with("-att-17"), "{odd}");
        assert_ne!(odd, container_name("gpu-host-1", AttemptId(17)), "cleaned names do not collide");
        assert_ne!(odd, container_name("gpu host 1", AttemptId(17)));
        assert_ne!(container_name("a", AttemptId(1)), container_name("a", AttemptId(11)));
    }

    #[test]
    fn simulated_gpus_travel_in_the_environment_only() {
        let (name, body) = runtime(true).container_config(&request(Some("img:1"), &["python", "run.py"])).unwrap();
        assert_eq!(name, "cosmos-host-a-att-42");
        let env = body.env.unwrap();
        assert!(env.contains(&"CUDA_VISIBLE_DEVICES=1,0".to_string()), "{env:?}");
        assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=void".to_string()), "{env:?}");
        let host = body.host_config.unwrap();
        assert_eq!(host.device_requests, None);
        assert_eq!(body.entrypoint, Some(vec!["python".to_string()]));
        assert_eq!(body.cmd, Some(vec!["run.py".to_string()]));
        let labels = body.labels.unwrap();
        assert_eq!(labels[LABEL_ATTEMPT], "att-42");
        assert_eq!(labels[LABEL_GPUS], "GPU-b,GPU-a");
    }

    #[test]
    fn real_gpus_are_requested_by_uuid_never_all() {
        let (_, body) = runtime(false).container_config(&request(Some("img:1"), &["python"])).unwrap();
        let requests = body.host_config.unwrap().device_requests.unwrap();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].device_ids, Some(vec!["GPU-b".to_string(), "GPU-a".to_string()]));
        assert_eq!(requests[0].count, None);
        assert_eq!(requests[0].capabilities, Some(vec![vec!["gpu".to_string()]]));
        let env = body.env.unwrap();
        assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=GPU-b,GPU-a".to_string()), "{env:?}");
        assert!(env.contains(&"CUDA_VISIBLE_DEVICES=0,1".to_string()), "{env:?}");

        // No GPUs assigned: none visible, whatever the host has.
        let mut req = request(Some("img:1"), &["python"]);
        req.gpu_uuids.clear();
        req.gpu_indices.clear();
        let (_, body) = runtime(false).container_config(&req).unwrap();
        assert_eq!(body.host_config.unwrap().device_requests, None);
        assert!(body.env.unwrap().contains(&"NVIDIA_VISIBLE_DEVICES=void".to_string()));
    }

    #[test]
    fn specs_the_runtime_cannot_run_fail_for_good() {
        let rt = runtime(true);
        let e = rt.container_config(&request(None, &["python"])).unwrap_err();
        assert!(!e.retry.is_retryable() && e.reason.contains("no `image`"), "{e}");
        let e = rt.container_config(&request(Some("img"), &[])).unwrap_err();
        assert!(!e.retry.is_retryable() && e.reason.contains("`command` is empty"), "{e}");
        let mut req = request(Some("img"), &["python"]);
        req.spec.mounts.push(cosmos_proto::spec::Mount {
            volume: "data".into(),
            target: "/data".into(),
            read_only: true,
        });
        let e = rt.container_config(&req).unwrap_err();
        assert!(!e.retry.is_retryable() && e.reason.contains("`data`") && e.reason.contains("none"), "{e}");
    }
}
