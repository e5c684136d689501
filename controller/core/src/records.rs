//! The controller's records: what the store persists and the core rebuilds from.

use cosmos_proto::spec::ArtifactRef;
use cosmos_proto::{AttemptId, Epoch, GpuInfo, JobId, JobSpec};
use serde::{Deserialize, Serialize};

/// Where a job stands, as users see it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for GPUs.
    Queued,
    /// An attempt was sent to an agent, not yet started.
    Assigned,
    /// An attempt is running.
    Running,
    /// An attempt failed; waiting out the backoff before the next.
    Retrying,
    /// An attempt succeeded. Final.
    Succeeded,
    /// Out of attempts, or a terminal failure. Final.
    Failed,
    /// Cancelled by a user. Final.
    Cancelled,
}

impl JobState {
    /// Final states never change again.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// The stable lower-case name used in the store, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses [`JobState::as_str`]'s names.
    pub fn parse(s: &str) -> Option<JobState> {
        ALL_JOB_STATES.into_iter().find(|st| st.as_str() == s)
    }
}

/// Every job state, in lifecycle order.
pub const ALL_JOB_STATES: [JobState; 7] = [
    JobState::Queued,
    JobState::Assigned,
    JobState::Running,
    JobState::Retrying,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

/// A job and everything a user can see about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Unique, increasing with submission order.
    pub id: JobId,
    /// What to run.
    pub spec: JobSpec,
    /// Where it stands.
    pub state: JobState,
    /// Attempts that counted against the budget (host losses and refusals do not).
    pub attempts_used: u32,
    /// Attempts lost with their host; bounded separately.
    pub attempts_lost: u32,
    /// A user asked to cancel it.
    pub cancel_requested: bool,
    /// Earliest time (controller clock) the next attempt may start.
    pub not_before_ms: u64,
    /// Exit code of the deciding attempt, when it exited.
    pub exit_code: Option<i32>,
    /// Why it failed or was cancelled, in words.
    pub error: Option<String>,
    /// What the succeeding attempt produced.
    pub outputs: Vec<ArtifactRef>,
    /// Agent of the latest attempt.
    pub agent: Option<String>,
    /// When it was accepted (controller clock).
    pub submitted_ms: u64,
    /// When it reached a final state.
    pub finished_ms: Option<u64>,
    /// The key its submission carried, so a retried submission gets the same jobs back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    /// When its first attempt started running (controller clock), for accounting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// GPU time its attempts used, over all of them: each attempt's running time times its GPUs.
    #[serde(default)]
    pub gpu_ms: u64,
    /// Times an operator re-queued it after it ended (`cosmos jobs retry`).
    #[serde(default)]
    pub retries: u32,
    /// Jobs that must succeed before it may start (Slurm's `afterok`); if one
    /// fails or is cancelled, so is this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    /// Inputs it takes from the outputs of jobs in `after`, not yet known:
    /// each moves into `spec.inputs` when its job succeeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs_from: Vec<InputFrom>,
}

/// An input a job takes from the outputs of a job it waits for, once that one has succeeded
/// (an upscale submitted before the transfer it upscales has ended).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFrom {
    /// The job whose output it is.
    pub job: JobId,
    /// The output's path among that job's outputs.
    pub output: String,
    /// Where it goes in this job's work directory.
    pub path: String,
}

/// A submission's idempotency key and a digest of what it asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    /// The client's key (`Idempotency-Key`), unique per submission it means.
    pub key: String,
    /// sha256 of the request body, hex: the same key with another body is refused.
    pub request_sha256: String,
}

/// Where an attempt stands.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    /// Sent to the agent.
    Assigned,
    /// The agent started it.
    Running,
    /// A stop was sent; waiting for the agent to confirm.
    Stopping,
    /// Exited successfully.
    Succeeded,
    /// Ran and failed.
    Failed,
    /// Stopped on request.
    Cancelled,
    /// Its host was lost, or the agent no longer knew it.
    Lost,
    /// The agent refused it; it never ran.
    Rejected,
}

impl AttemptState {
    /// Live attempts hold their GPUs.
    pub fn is_live(self) -> bool {
        matches!(self, AttemptState::Assigned | AttemptState::Running | AttemptState::Stopping)
    }

    /// The stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Assigned => "assigned",
            AttemptState::Running => "running",
            AttemptState::Stopping => "stopping",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Failed => "failed",
            AttemptState::Cancelled => "cancelled",
            AttemptState::Lost => "lost",
            AttemptState::Rejected => "rejected",
        }
    }

    /// Parses [`AttemptState::as_str`]'s names.
    pub fn parse(s: &str) -> Option<AttemptState> {
        ALL_ATTEMPT_STATES.into_iter().find(|st| st.as_str() == s)
    }
}

/// Every attempt state, in lifecycle order.
pub const ALL_ATTEMPT_STATES: [AttemptState; 8] = [
    AttemptState::Assigned,
    AttemptState::Running,
    AttemptState::Stopping,
    AttemptState::Succeeded,
    AttemptState::Failed,
    AttemptState::Cancelled,
    AttemptState::Lost,
    AttemptState::Rejected,
];

/// One try of a job on one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Unique, never reused.
    pub id: AttemptId,
    /// The job it tries.
    pub job_id: JobId,
    /// The agent it was given to.
    pub agent: String,
    /// The GPUs it was given.
    pub gpu_uuids: Vec<String>,
    /// The controller epoch that made the decision.
    pub epoch: Epoch,
    /// Where it stands.
    pub state: AttemptState,
    /// When it was assigned (controller clock).
    pub assigned_ms: u64,
    /// When the agent reported it started (controller clock, on receipt).
    pub started_ms: Option<u64>,
    /// When it ended (controller clock, on receipt).
    pub ended_ms: Option<u64>,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Why it ended the way it did.
    pub reason: Option<String>,
}

/// What the controller remembers of an agent across restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's node id.
    pub name: String,
    /// An operator drained it: no new work.
    pub draining: bool,
    /// GPUs it last reported.
    pub gpus: Vec<GpuInfo>,
    /// Whether those GPUs are simulated.
    pub gpus_simulated: bool,
}

/// An entry in the append-only event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When (controller clock).
    pub at_ms: u64,
    /// The job concerned, if any.
    pub job_id: Option<JobId>,
    /// The attempt concerned, if any.
    pub attempt_id: Option<AttemptId>,
    /// The agent concerned, if any.
    pub agent: Option<String>,
    /// Short machine-readable kind (`submitted`, `assigned`, `agent_lost`, …).
    pub kind: String,
    /// Words for a person.
    pub detail: String,
}

/// One change to persist. The core emits these before acting on them.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreOp {
    /// Insert or replace a job.
    PutJob(Box<JobRecord>),
    /// Insert or replace an attempt.
    PutAttempt(AttemptRecord),
    /// Insert or replace an agent.
    PutAgent(AgentRecord),
    /// Append an event.
    Event(EventRecord),
    /// Insert or replace a Cosmos prompt; those a batch creates go in the same
    /// transaction as the batch's jobs, so both or neither are stored.
    PutPrompt(Box<crate::prompt::Prompt>),
    /// Remove a Cosmos prompt (its runs keep their own copies of what they used).
    DeletePrompt(String),
    /// Remove finished jobs with their attempts and events (retention), keeping
    /// the highest ids given so far so that none is given again.
    PruneJobs {
        /// The jobs.
        jobs: Vec<JobId>,
        /// The highest job id given so far.
        job_id_max: JobId,
        /// The highest attempt id given so far.
        attempt_id_max: AttemptId,
    },
}

/// Everything the core needs to rebuild itself after a restart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The epoch of this start (already incremented and persisted).
    pub epoch: Epoch,
    /// All jobs, by id; boxed, so the core takes each as it is instead of copying a million records.
    pub jobs: Vec<Box<JobRecord>>,
    /// All attempts that are still live (finished ones are history).
    pub live_attempts: Vec<AttemptRecord>,
    /// Highest attempt id ever allocated, so ids are never reused.
    pub max_attempt_id: Option<AttemptId>,
    /// Highest job id ever allocated, when jobs above those in `jobs` were pruned.
    pub max_job_id: Option<JobId>,
    /// All agents ever seen.
    pub agents: Vec<AgentRecord>,
}
