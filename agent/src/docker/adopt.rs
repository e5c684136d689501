//! What a restarted agent finds: its containers on the engine (found by their
//! labels) and its attempts' directories. Running containers are adopted and
//! watched to their end; ended ones are reported and removed; attempts whose
//! containers are gone are reported from their `exit.json`. The reaper
//! removes containers no live attempt claims.

use super::labels::{self, Labelled};
use super::lifecycle::watch_container;
use super::logs::{LOG_DRAIN_TIMEOUT, LogFollower};
use super::{DockerError, DockerRecord, DockerRuntime, ExitRecord, Live, Phase, Shared, UNKNOWN_EXIT, exit_status};
use crate::core::{ExitStatus, Recovered};
use crate::process::{ACK_FILE, EXIT_FILE, RECORD_FILE, recovered_outputs};
use crate::runtime::{lock, unix_ms, write_json};
use bollard::query_parameters::ListContainersOptions;
use cosmos_proto::{AttemptId, Epoch, JobId};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// A container of this agent found on the engine.
#[derive(Debug)]
pub(super) struct Found {
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
    /// This agent's containers (by their agent label), running or not.
    async fn list_ours(&self) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
        let docker = self.client().await?;
        let options = ListContainersOptions {
            all: true,
            filters: Some(labels::filter(&self.config.agent_name)),
            ..Default::default()
        };
        docker.list_containers(Some(options)).await.map_err(|e| self.error("list containers", e))
    }

    /// Lists this agent's containers; ended ones get their logs saved, their
    /// exit recorded, and are removed.
    pub(super) async fn scan(&self) -> Result<Vec<Found>, DockerError> {
        let docker = self.client().await?;
        let listed = self.list_ours().await?;
        let mut found = Vec::new();
        for c in listed {
            let labels = c.labels.unwrap_or_default();
            let name = c.names.and_then(|n| n.first().map(|n| n.trim_start_matches('/').to_string()));
            let Some(container) = name.or(c.id) else { continue };
            let Some(attempt_id) = labels::attempt_of(&labels) else {
                tracing::warn!(container, "removing a container with this agent's label but no attempt");
                let _ = self.remove(&container).await;
                continue;
            };
            let labelled = Labelled::read(&labels);
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
                job_id: labelled.job_id,
                epoch: labelled.epoch,
                gpu_uuids: labelled.gpu_uuids,
                timeout_ms: labelled.timeout_ms,
                created_unix_ms: labelled.created_unix_ms,
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
                    live: None,
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
    pub(super) fn clone_config(&self) -> Shared {
        let client = tokio::sync::OnceCell::new();
        if let Some(c) = self.client.get() {
            let _ = client.set(c.clone());
        }
        Shared { config: self.config.clone(), client, live: Mutex::new(lock(&self.live).clone()) }
    }

    /// Removes this agent's containers that neither `claimed` nor this runtime's watchers hold.
    pub(super) async fn reap(&self, claimed: HashSet<AttemptId>) -> Result<Vec<String>, DockerError> {
        let listed = self.list_ours().await?;
        let mut removed = Vec::new();
        for c in listed {
            let labels = c.labels.unwrap_or_default();
            let attempt = labels::attempt_of(&labels);
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

impl DockerRuntime {
    /// Finds this agent's containers: running ones are adopted (watched to
    /// their end, then reported and removed); ended ones are reported with
    /// their exit status and removed. Attempts whose containers are gone are
    /// reported from their `exit.json` (unknown status without one) until
    /// acknowledged.
    pub(super) fn recover_all(&mut self) -> Vec<Recovered> {
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
        self.spawn_task(watch_container(self.shared.clone(), self.events.clone(), record, None));
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
