//! The container-runtime boundary: what the agent's shell asks of a runtime.
//!
//! Implementations: the process runtime (children in their own process
//! groups), the Docker runtime (to come) and the simulator's fake. All are
//! held to the same contract.

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
