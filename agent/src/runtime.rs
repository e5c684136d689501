//! The container-runtime boundary: what the agent's shell asks of a runtime.
//!
//! Implementations: the process runtime (children in their own process
//! groups), the Docker runtime (containers through the Engine API) and the
//! simulated runtime (timers). All are held to the same contract, by one
//! suite run against each (`agent/tests/contract.rs`).

use crate::core::{Recovered, RuntimeEvent};
use cosmos_proto::{AttemptId, Epoch, JobId, JobSpec};
use std::path::PathBuf;
use tokio::sync::mpsc;

/// Bound on runtime events waiting for the agent loop; log readers wait when it is full.
pub const EVENT_QUEUE_LEN: usize = 4096;

/// What to start.
#[derive(Clone, Debug)]
pub struct StartRequest {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Its job.
    pub job_id: JobId,
    /// The controller epoch that ordered it.
    pub epoch: Epoch,
    /// What to run.
    pub spec: JobSpec,
    /// Exactly these GPUs (their indices go into `CUDA_VISIBLE_DEVICES`).
    pub gpu_uuids: Vec<String>,
    /// The same GPUs as driver indices, in the same order.
    pub gpu_indices: Vec<u32>,
    /// The attempt's own work directory (created by the runtime).
    pub work_dir: PathBuf,
}

/// A container runtime. Calls return at once; what happens later arrives as
/// [`RuntimeEvent`]s on the channel given at construction.
pub trait Runtime: Send {
    /// Short name reported to the controller (`process`, `docker`).
    fn name(&self) -> &'static str;
    /// Starts an attempt; reports `Started` or `StartFailed`, then logs, progress, `Exited`.
    fn start(&mut self, req: StartRequest);
    /// Stops an attempt: graceful signal, kill after `grace_ms`; reports `Exited`.
    fn stop(&mut self, attempt_id: AttemptId, grace_ms: u64);
    /// At agent start-up: what a previous agent process left running or exited.
    fn recover(&mut self) -> Vec<Recovered>;
    /// The controller has durably recorded how this attempt ended, so a
    /// restarted agent need not report it again. Runtimes that keep no
    /// records across restarts have nothing to do.
    fn acknowledged(&mut self, _attempt_id: AttemptId) {}
}

/// The sending side of the event channel, as runtimes hold it.
pub type EventSender = mpsc::Sender<RuntimeEvent>;

/// Where a runtime rooted at `root` keeps one attempt's directory (its records,
/// logs and, as the job's working directory, its files): `root/attempts/<id>`.
/// The same layout for every runtime.
pub fn attempt_dir(root: &std::path::Path, attempt_id: AttemptId) -> PathBuf {
    root.join("attempts").join(attempt_id.to_string())
}

/// Wall-clock milliseconds since the Unix epoch (host-local records only).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Writes JSON so that a crash leaves either the old file or the new one (see `process::write_json`).
pub(crate) fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Locks, ignoring poisoning: the data behind these locks stays consistent between statements.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The watcher tasks a runtime started. Dropping the runtime aborts them, while
/// what they watch (processes, containers) keeps running for the next agent to adopt.
#[derive(Default)]
pub(crate) struct Watchers(Vec<tokio::task::AbortHandle>);

impl Watchers {
    /// Runs `fut` in the background until it ends or the runtime is dropped.
    pub(crate) fn spawn(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        self.0.retain(|t| !t.is_finished());
        self.0.push(tokio::spawn(fut).abort_handle());
    }

    /// Sends `event` without waiting for room in the channel.
    pub(crate) fn send_later(&mut self, events: &EventSender, event: RuntimeEvent) {
        let events = events.clone();
        self.spawn(async move {
            let _ = events.send(event).await;
        });
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
