//! An attempt's container from creation to removal: create it, check that
//! its program is there, start it, watch it to its exit (with its logs),
//! record how it ended, remove it and report `Exited`; and stop it when asked.

use super::logs::{LOG_DRAIN_TIMEOUT, LiveOutput, LogFollower};
use super::{
    DockerError, DockerRecord, ExitRecord, KILLED, Phase, RETRY_DELAY, Shared, StartError, UNKNOWN_EXIT, WORK_MOUNT,
    exit_status,
};
use crate::core::{ExitStatus, RuntimeEvent};
use crate::process::{EXIT_FILE, RECORD_FILE, collect_outputs};
use crate::runtime::{EventSender, StartRequest, lock, write_json};
use bollard::Docker;
use bollard::query_parameters::{
    AttachContainerOptions, ContainerArchiveInfoOptions, CreateContainerOptions, KillContainerOptions,
    RemoveContainerOptions, StopContainerOptions,
};
use futures::StreamExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The search path when neither the job nor its image sets `PATH` (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How to build the test image, for the "image not present" reason.
const BUILD_HINT: &str = "build it on this host (scripts/build-images builds cosmos-testjob:dev) \
                          or load it with `docker load -i IMAGE.tar`; this agent does not pull images";

impl Shared {
    /// Creates (does not start) the attempt's container; returns its id.
    pub(super) async fn create(&self, req: &StartRequest) -> Result<String, StartError> {
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
    pub(super) async fn check_program(
        &self,
        docker: &Docker,
        container: &str,
        req: &StartRequest,
    ) -> Result<(), StartError> {
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
    pub(super) fn start_error(&self, req: &StartRequest, e: DockerError) -> StartError {
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

    pub(super) async fn remove(&self, container: &str) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match docker.remove_container(container, Some(options)).await.map_err(|e| self.error("remove a container", e)) {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Graceful stop, then kill: `docker stop` with the grace rounded up to whole seconds.
    pub(super) async fn stop(&self, container: &str, grace_ms: u64) {
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
    pub(super) async fn wait_exit(&self, container: &str) -> ExitStatus {
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

/// Creates, starts and watches one attempt's container.
pub(super) async fn run_attempt(shared: Arc<Shared>, events: EventSender, req: StartRequest, record: DockerRecord) {
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
    // Attached before the start, so the stream holds all the container writes (see `LogFollower`);
    // without it the logs are followed as for an adopted container.
    let attach = AttachContainerOptions { stream: true, stdout: true, stderr: true, ..Default::default() };
    let live = match shared.long_client().await {
        Ok(docker) => match docker.attach_container(&record.container, Some(attach)).await {
            Ok(attached) => Some(attached.output),
            Err(e) => {
                tracing::warn!(attempt = %id, error = %e, "cannot attach to a container; following its logs instead");
                None
            }
        },
        Err(_) => None,
    };
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
    watch_container(shared, events, record, live).await;
}

/// Watches one started container to its end: logs (from `live`, when it was
/// attached before its start), exit, record, removal, `Exited`.
pub(super) async fn watch_container(
    shared: Arc<Shared>,
    events: EventSender,
    record: DockerRecord,
    live: Option<LiveOutput>,
) {
    let id = record.attempt_id;
    let dir = shared.attempt_dir(id);
    let follower = LogFollower {
        attempt_id: id,
        container: record.container.clone(),
        dir: dir.clone(),
        events: Some(events.clone()),
        live,
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
