//! What a container is made of: the runtime's configuration on this host,
//! and the create body of an attempt's container (image, argv, environment,
//! GPUs, mounts, labels, isolation) built from it and the job's spec, with
//! no engine call.

use super::{Shared, StartError, WORK_MOUNT};
use crate::runtime::StartRequest;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, Mount as DockerMount, MountType};
use cosmos_proto::AttemptId;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The engine's usual socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Longest wait for the engine's answer to a short request (create, inspect, remove).
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 60_000;

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

impl Shared {
    /// The container's create body for an attempt.
    pub(super) fn container_config(&self, req: &StartRequest) -> Result<(String, ContainerCreateBody), StartError> {
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

        let labels = super::labels::for_attempt(config, req);

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::DockerRuntime;
    use crate::docker::labels::{LABEL_ATTEMPT, LABEL_GPUS};
    use cosmos_proto::JobSpec;
    use cosmos_proto::{AttemptId, Epoch, JobId};

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
