//! The controller's logic as a synchronous state machine with no I/O.
//!
//! Each entry point takes [`Now`]: the controller's monotonic clock, which every
//! deadline is measured on, and its wall clock, which only timestamps records
//! (never compared with an agent's clock, nor used for a deadline), and
//! appends [`Output`]s. Within one call the core emits a single
//! [`Output::Persist`] first and every message after it, so a shell that makes
//! the persist durable before sending anything (see `cosmos_controller::gate`) upholds
//! "what a user can observe is stored before it is acted on" without knowing why.
//!
//! The entry points, in the order a shell calls them:
//!
//! 1. [`Core::recover`] once, from the store's snapshot.
//! 2. Then, as inputs come: [`Core::submit_with`] (or [`Core::submit`]),
//!    [`Core::cancel`], [`Core::set_draining`] from the API;
//!    [`Core::on_connect`] (an agent's hello, with what the blob store holds
//!    of the outputs it reports), [`Core::on_message`], [`Core::on_disconnect`]
//!    from the agents' connections.
//! 3. [`Core::tick`] when [`Core::next_deadline_ms`] is reached.
//!
//! Each ends in one scheduling pass if anything changed. The parts:
//! `placement` (which job goes where), `attempts` (what an attempt's end
//! means for its job), `liveness` (suspect and lost hosts, backoffs,
//! deadlines), `reconcile` (what a reconnecting agent reports, fencing), and
//! `invariants` (checked by the tests and the simulator).

mod attempts;
mod invariants;
mod liveness;
mod placement;
mod prune;
mod reconcile;

use crate::records::*;
use cosmos_proto::spec::ArtifactRef;
use cosmos_proto::{
    AgentHello, AgentMsg, Assign, AttemptId, AttemptOutcome, AttemptPhase, ControllerMsg, Epoch, GpuInfo, JobId,
    JobSpec, Sha256, SpecError, TraceContext,
};
use placement::ReadyQueue;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The controller's two clocks at one instant.
///
/// Deadlines (liveness, retry backoff) run on `mono_ms`, so a wall-clock step
/// (NTP correcting a drifted clock, a resumed VM) neither marks every host lost
/// nor stalls timeouts. `wall_ms` is for what users read and what is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// A monotonic clock in milliseconds; its origin is arbitrary and differs between starts.
    pub mono_ms: u64,
    /// Milliseconds since the Unix epoch, as the host's clock says now.
    pub wall_ms: u64,
}

impl Now {
    /// Both clocks reading the same value: tests and benchmarks with one notion of time.
    pub const fn at(ms: u64) -> Now {
        Now { mono_ms: ms, wall_ms: ms }
    }
}

/// Which of the outputs an agent's message names the controller's blob store
/// holds whole (digest and size), as the shell found before handing the
/// message in. A success counts only once what it made is safe here; the
/// shell looks (file I/O, off the core's thread), the core decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldBlobs(BTreeSet<(Sha256, u64)>);

impl HeldBlobs {
    /// Holds nothing: for messages that name no outputs.
    pub fn none() -> HeldBlobs {
        HeldBlobs::default()
    }

    /// Records that the store holds this blob whole.
    pub fn insert(&mut self, sha256: Sha256, size_bytes: u64) {
        self.0.insert((sha256, size_bytes));
    }

    /// Whether the store holds this output whole.
    pub fn holds(&self, output: &ArtifactRef) -> bool {
        self.0.contains(&(output.sha256, output.size_bytes))
    }

    /// The outputs of the successes a message reports: what a shell looks up.
    pub fn wanted(msg: &AgentMsg) -> Vec<&ArtifactRef> {
        match msg {
            AgentMsg::AttemptFinished { outcome: AttemptOutcome::Succeeded { outputs }, .. } => {
                outputs.iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// The outputs of the successes a hello reports.
    pub fn wanted_in_hello(hello: &AgentHello) -> Vec<&ArtifactRef> {
        hello
            .attempts
            .iter()
            .filter_map(|r| match &r.phase {
                AttemptPhase::Finished(AttemptOutcome::Succeeded { outputs }) => Some(outputs),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Every output in `wanted` taken as held: for callers with no blob store to ask.
    pub fn all<'a>(wanted: impl IntoIterator<Item = &'a ArtifactRef>) -> HeldBlobs {
        HeldBlobs(wanted.into_iter().map(|o| (o.sha256, o.size_bytes)).collect())
    }
}

/// What may come with a batch besides its jobs.
#[derive(Clone, Debug, Default)]
pub struct SubmitOptions {
    /// The submission's idempotency key: a repeat answers the first one's jobs.
    pub key: Option<Idempotency>,
    /// Records stored in the same transaction as the jobs (the prompts a batch of runs creates).
    pub extra: Vec<StoreOp>,
    /// Per job of the batch (by position; missing: none), the jobs that must succeed first.
    pub after: Vec<Vec<JobId>>,
    /// Per job of the batch (by position; missing: none), inputs it takes from
    /// the outputs of jobs that must succeed first (waited for as those in `after`).
    pub inputs_from: Vec<Vec<InputFromDep>>,
}

/// A job that a job of a submission waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dep {
    /// One submitted before.
    Job(JobId),
    /// One of the same batch, by its position there; it must come earlier in the batch.
    InBatch(usize),
}

/// An input a submitted job takes from a dependency's outputs once that one succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputFromDep {
    /// The job whose output it is.
    pub dep: Dep,
    /// The output's path among that job's outputs.
    pub output: String,
    /// Where it goes in this job's work directory.
    pub path: String,
}

/// Identifies one connection to an agent; assigned by the shell, never reused.
pub type ConnId = u64;

/// Tunables, with units in their names.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// How often agents send heartbeats.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a host gets no new work.
    pub suspect_after_ms: u64,
    /// Silence after which a host's attempts are given up and re-queued.
    pub lost_after_ms: u64,
    /// First retry delay; doubles with each failed attempt.
    pub retry_backoff_base_ms: u64,
    /// Longest retry delay.
    pub retry_backoff_max_ms: u64,
    /// Grace between a cancel's stop signal and the kill.
    pub cancel_grace_ms: u64,
    /// Attempts a job may lose with their host (or have refused) before it fails.
    pub lost_attempts_max: u32,
    /// Jobs that may wait in the queue; submissions beyond are refused.
    pub queued_jobs_max: usize,
    /// Jobs in one batch submission.
    pub batch_jobs_max: usize,
    /// A deliberately broken behaviour, to prove the simulator catches it.
    #[cfg(feature = "sabotage")]
    pub sabotage: Sabotage,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            heartbeat_interval_ms: 1_000,
            suspect_after_ms: 3_000,
            lost_after_ms: 15_000,
            retry_backoff_base_ms: 1_000,
            retry_backoff_max_ms: 60_000,
            cancel_grace_ms: 10_000,
            lost_attempts_max: 10,
            queued_jobs_max: 1_000_000,
            batch_jobs_max: 100_000,
            #[cfg(feature = "sabotage")]
            sabotage: Sabotage::None,
        }
    }
}

/// Broken versions of the core, each of which one simulator invariant must catch.
#[cfg(feature = "sabotage")]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// The core as it should be.
    None,
    /// Placement ignores which GPUs are taken.
    DoubleBookGpus,
    /// A lost host's attempts are dropped instead of re-queued.
    ForgetLostAttempts,
    /// A reconnecting host keeps every attempt it reports (no fencing).
    NoFencing,
    /// A success is mistaken for a reason to run the job again.
    SucceedTwice,
    /// Liveness is measured on the wall clock, which clock steps move.
    WallClockDeadlines,
    /// A change of state is persisted but left out of the per-state counts `status` reads.
    MiscountStates,
    /// A job cancelled because a job it waited for failed is not persisted.
    UnpersistedCascade,
    /// A job whose dependency failed keeps waiting for it instead of ending with it.
    NoCascade,
    /// A job that ends while it waits for others stays among the blocked.
    KeepBlockedWhenFinal,
    /// The placement index keeps the free-GPU count a host had when first indexed.
    StaleFreeIndex,
    /// Placement takes a job off the ready queue without its shape count.
    StaleShapeCounts,
    /// A host's liveness deadline is armed once and never moved.
    StaleLivenessIndex,
    /// A host records its liveness deadline, which never goes into the index: the
    /// host is never found suspect or lost, and the two disagree from the first arming.
    UnindexedLivenessDeadline,
}

/// A host as the scheduler sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Heard from recently.
    Up,
    /// Silent or disconnected: no new work, attempts kept.
    Suspect,
    /// Silent past the grace period: its attempts were re-queued.
    Lost,
}

impl Health {
    /// The stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Suspect => "suspect",
            Health::Lost => "lost",
        }
    }
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Make these durable before performing any output that follows.
    Persist(Vec<StoreOp>),
    /// Send a message on a connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: ControllerMsg,
    },
    /// Close a connection (superseded by a newer one from the same agent).
    Close {
        /// The connection.
        conn: ConnId,
    },
}

/// A submission was refused; nothing of it was accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// One spec is invalid.
    #[error("job {index} (line {}): {error}", index + 1)]
    InvalidSpec {
        /// Zero-based position in the batch.
        index: usize,
        /// What is wrong.
        error: SpecError,
    },
    /// A job needs more GPUs than any known host has.
    #[error("job {index} (line {}) needs {gpus} GPUs on one host, but the largest host has {largest}; lower `gpus` or add a larger host", index + 1)]
    Unplaceable {
        /// Zero-based position in the batch.
        index: usize,
        /// GPUs asked for.
        gpus: u32,
        /// GPUs of the largest known host.
        largest: u32,
    },
    /// No host has enough GPUs with that much memory.
    #[error("job {index} (line {}) needs {gpus} GPUs with {mib} MiB free each, but no host has GPUs that large; lower `min_vram_mib`", index + 1)]
    TooMuchVram {
        /// Zero-based position in the batch.
        index: usize,
        /// GPUs asked for.
        gpus: u32,
        /// VRAM asked for per GPU.
        mib: u64,
    },
    /// A dependency names no job.
    #[error("job {index} (line {}) waits for {dep}, which does not exist", index + 1)]
    UnknownDependency {
        /// Zero-based position in the batch.
        index: usize,
        /// The missing job.
        dep: JobId,
    },
    /// A dependency within the batch is not an earlier job of it (which could make a cycle).
    #[error("job {index} (line {}) waits for job {dep} of its batch, which does not come before it", index + 1)]
    BadBatchDependency {
        /// Zero-based position in the batch.
        index: usize,
        /// The position it names.
        dep: usize,
    },
    /// A dependency already ended without success, so the job could never start.
    #[error("job {index} (line {}) waits for {dep} to succeed, but it {state}; retry that one first (`cosmos jobs retry {dep}`)", index + 1)]
    DependencyEnded {
        /// Zero-based position in the batch.
        index: usize,
        /// The dependency.
        dep: JobId,
        /// How it ended.
        state: &'static str,
    },
    /// The batch is empty or too large.
    #[error("a batch holds 1 to {max} jobs; this one has {got}")]
    BatchSize {
        /// Jobs in the batch.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// The queue is full; retry later.
    #[error("the queue holds {queued} jobs, the limit is {max}; retry when some have finished")]
    QueueFull {
        /// Jobs waiting.
        queued: usize,
        /// The limit.
        max: usize,
    },
    /// The idempotency key was used before for a different submission.
    #[error("idempotency key `{key}` was already used for a different submission; send a new key for a new submission")]
    KeyReused {
        /// The key.
        key: String,
    },
}

impl cosmos_proto::Classify for SubmitError {
    /// Only a full queue clears by itself.
    fn retry(&self) -> cosmos_proto::Retry {
        cosmos_proto::Retry::when(matches!(self, SubmitError::QueueFull { .. }))
    }
}

/// A cancel or drain could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No such job.
    #[error("no job {0}; `cosmos jobs list` shows the ids")]
    UnknownJob(JobId),
    /// The job already ended.
    #[error("job {id} already {state}; nothing to cancel")]
    AlreadyFinal {
        /// The job.
        id: JobId,
        /// Its final state.
        state: &'static str,
    },
    /// The queue is at its bound; retry once it drains.
    #[error("the queue holds {queued} jobs, its bound is {max}; retry once it drains")]
    QueueFull {
        /// Jobs queued now.
        queued: usize,
        /// The bound (`queued_jobs_max`).
        max: usize,
    },
    /// A job it waits for ended without success: retried alone it could never start.
    #[error("job {id} waits for {dep}, which {state}; retry that one first (`cosmos jobs retry {dep}`)")]
    DependencyEnded {
        /// The job.
        id: JobId,
        /// The dependency.
        dep: JobId,
        /// How it ended.
        state: &'static str,
    },
    /// Only a failed or cancelled job can be retried.
    #[error("job {id} is {state}; only a failed or cancelled job can be retried")]
    NotRetriable {
        /// The job.
        id: JobId,
        /// Its state.
        state: &'static str,
    },
    /// No such agent.
    #[error("no agent named `{0}`; `cosmos agents list` shows the names")]
    UnknownAgent(String),
    /// The agent has no GPU of that uuid.
    #[error("agent {agent} has no GPU {uuid}; `cosmos agents list` shows its GPUs")]
    UnknownGpu {
        /// The agent.
        agent: String,
        /// The uuid asked for.
        uuid: String,
    },
    /// The order needs the agent connected (its GPU state lives there).
    #[error("agent {0} is not connected; it can release a GPU only while connected")]
    NotConnected(String),
}

#[derive(Clone, Debug)]
struct Gpu {
    info: GpuInfo,
    free_vram_bytes: u64,
    healthy: bool,
    /// The live attempt holding it, or one the agent runs that we fenced off.
    holder: Option<AttemptId>,
    /// Why the agent keeps it out of scheduling, from its last heartbeat.
    quarantine: Option<cosmos_proto::GpuQuarantine>,
}

#[derive(Clone, Debug)]
struct Agent {
    name: String,
    conn: Option<ConnId>,
    draining: bool,
    gpus_simulated: bool,
    gpus: Vec<Gpu>,
    last_heard_ms: u64,
    health: Health,
    /// Attempts the agent runs that we do not consider live: their GPUs stay
    /// taken until the agent reports them gone.
    fenced: BTreeMap<AttemptId, Vec<usize>>,
    /// Live attempts placed here.
    attempts: BTreeSet<AttemptId>,
    /// The free-GPU count under which it sits in the free index, if it does.
    indexed_free: Option<u32>,
    /// The deadline under which it sits in the liveness index, if it does (it does unless lost).
    indexed_deadline: Option<u64>,
    /// Why it says it cannot start work (its container runtime is down, say).
    unhealthy: Option<String>,
}

impl Agent {
    fn free_gpus(&self) -> u32 {
        self.gpus.iter().filter(|g| g.holder.is_none() && g.healthy).count() as u32
    }

    fn schedulable(&self) -> bool {
        self.health == Health::Up && self.conn.is_some() && !self.draining && self.unhealthy.is_none()
    }

    fn record(&self) -> AgentRecord {
        AgentRecord {
            name: self.name.clone(),
            draining: self.draining,
            gpus: self.gpus.iter().map(|g| g.info.clone()).collect(),
            gpus_simulated: self.gpus_simulated,
        }
    }
}

#[derive(Clone, Debug)]
struct Job {
    /// Boxed: a map of a million jobs moves and half-fills small nodes, not 544-byte records.
    rec: Box<JobRecord>,
    /// When a retry backoff ends, on the monotonic clock (`rec.not_before_ms` is its wall-clock twin).
    not_before_mono_ms: u64,
    live: Option<AttemptId>,
    progress: Option<(u32, u32)>,
    /// The state [`Core::job_counts`] counts it in: the one last persisted.
    counted: JobState,
}

/// Read-only view of one agent, for listings.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentView {
    /// Node id.
    pub name: String,
    /// Liveness.
    pub health: Health,
    /// Operator drain.
    pub draining: bool,
    /// Connected now.
    pub connected: bool,
    /// Simulated GPUs.
    pub gpus_simulated: bool,
    /// Per GPU: info, free VRAM, healthy, holding attempt.
    pub gpus: Vec<(GpuInfo, u64, bool, Option<AttemptId>)>,
    /// Why it takes no new work, when it says it cannot.
    pub unhealthy: Option<String>,
    /// Quarantined GPUs (by uuid) and why, as the agent last reported.
    pub gpu_quarantine: BTreeMap<String, cosmos_proto::GpuQuarantine>,
}

/// The scheduler and bookkeeper of the whole cluster.
pub struct Core {
    config: CoreConfig,
    epoch: Epoch,
    next_job_id: u64,
    next_attempt_id: u64,
    jobs: BTreeMap<JobId, Job>,
    /// Jobs waiting for GPUs, by priority then submission order.
    ready: ReadyQueue,
    /// Jobs waiting out a retry backoff.
    backoff: BTreeSet<(u64, JobId)>,
    /// Jobs waiting for dependencies, with those not yet succeeded.
    blocked: BTreeMap<JobId, BTreeSet<JobId>>,
    /// For each job, the blocked jobs that wait for it.
    dependents: HashMap<JobId, Vec<JobId>>,
    live: BTreeMap<AttemptId, AttemptRecord>,
    agents: Vec<Agent>,
    agent_by_name: HashMap<String, usize>,
    conn_agent: HashMap<ConnId, usize>,
    /// Submissions by idempotency key: the digest of what they asked for, and the jobs they made.
    submitted_keys: HashMap<String, (String, Vec<JobId>)>,
    /// Schedulable agents by free GPU count, for best-fit placement.
    free_index: BTreeSet<(u32, usize)>,
    /// Agents not lost, by when they next turn suspect or lost (on the deadline clock): the next
    /// deadline and the hosts due are found without walking every host at every input.
    liveness: BTreeSet<(u64, usize)>,
    /// The host held for a job that could not be placed, so small jobs cannot starve it.
    reservation: Option<(JobId, usize)>,
    /// Something changed that may let a queued job be placed.
    dirty: bool,
    /// Scheduling passes run since the start, so a shell can time the inputs that ran one.
    passes: u64,
    ops: Vec<StoreOp>,
    sends: Vec<Output>,
    /// Jobs per state, indexed by `JobState as usize`: `status` answers without walking a million jobs.
    job_counts: [usize; ALL_JOB_STATES.len()],
    /// Jobs whose progress changed since [`Core::drain_progressed`] was last called.
    progressed: Vec<JobId>,
}

impl Core {
    /// Rebuilds the core from a store snapshot (an empty one on first start).
    pub fn recover(config: CoreConfig, snapshot: Snapshot, now: Now) -> Core {
        let config_backoff_max_ms = config.retry_backoff_max_ms;
        let mut core = Core {
            config,
            epoch: snapshot.epoch,
            next_job_id: snapshot
                .jobs
                .iter()
                .map(|j| j.id.0 + 1)
                .chain(snapshot.max_job_id.map(|j| j.0 + 1))
                .max()
                .unwrap_or(1),
            next_attempt_id: snapshot.max_attempt_id.map_or(1, |a| a.0 + 1),
            jobs: BTreeMap::new(),
            ready: ReadyQueue::default(),
            backoff: BTreeSet::new(),
            blocked: BTreeMap::new(),
            dependents: HashMap::new(),
            live: BTreeMap::new(),
            agents: Vec::new(),
            agent_by_name: HashMap::new(),
            conn_agent: HashMap::new(),
            submitted_keys: HashMap::new(),
            free_index: BTreeSet::new(),
            liveness: BTreeSet::new(),
            reservation: None,
            dirty: true,
            passes: 0,
            ops: Vec::new(),
            sends: Vec::new(),
            job_counts: [0; ALL_JOB_STATES.len()],
            progressed: Vec::new(),
        };
        for rec in snapshot.agents {
            let idx = core.agent_index(&rec.name, now);
            let agent = &mut core.agents[idx];
            agent.draining = rec.draining;
            agent.gpus_simulated = rec.gpus_simulated;
            agent.gpus = rec.gpus.into_iter().map(new_gpu).collect();
            // Not connected yet: the grace period for reconnecting starts now.
            agent.health = Health::Suspect;
            core.rearm(idx);
        }
        let mut jobs = Vec::with_capacity(snapshot.jobs.len());
        for rec in snapshot.jobs {
            let mut rec = rec;
            if matches!(rec.state, JobState::Assigned | JobState::Running) {
                // Its attempt, if still live, is attached below and takes it off the queue.
                rec.state = JobState::Queued;
            }
            // A backoff survives a restart as a wall-clock deadline. The clock may have
            // been stepped while the controller was down, so what remains of it is
            // capped at the longest backoff rather than trusted.
            let backoff_left_ms = rec.not_before_ms.saturating_sub(now.wall_ms).min(config_backoff_max_ms);
            let counted = rec.state;
            let job =
                Job { rec, not_before_mono_ms: now.mono_ms + backoff_left_ms, live: None, progress: None, counted };
            let id = job.rec.id;
            if let Some(k) = &job.rec.idempotency {
                let entry =
                    core.submitted_keys.entry(k.key.clone()).or_insert_with(|| (k.request_sha256.clone(), Vec::new()));
                entry.1.push(id);
            }
            jobs.push((id, job));
        }
        // Built from sorted records at once: full nodes, and no search per insert.
        core.jobs = jobs.into_iter().collect();
        let waiting: Vec<JobId> = core.jobs.values().filter(|j| !j.rec.state.is_final()).map(|j| j.rec.id).collect();
        for id in waiting {
            core.enqueue_or_wait(now, id);
        }
        for att in snapshot.live_attempts {
            let idx = core.agent_index(&att.agent, now);
            let Some(job) = core.jobs.get_mut(&att.job_id) else { continue };
            job.live = Some(att.id);
            job.rec.state = if att.state == AttemptState::Assigned { JobState::Assigned } else { JobState::Running };
            core.ready.remove(&job.rec.spec, att.job_id);
            core.backoff.remove(&(job.not_before_mono_ms, att.job_id));
            let agent = &mut core.agents[idx];
            agent.attempts.insert(att.id);
            for uuid in &att.gpu_uuids {
                if let Some(g) = agent.gpus.iter_mut().find(|g| &g.info.uuid == uuid) {
                    g.holder = Some(att.id);
                }
            }
            core.live.insert(att.id, att);
        }
        for job in core.jobs.values_mut() {
            job.counted = job.rec.state;
            core.job_counts[job.rec.state as usize] += 1;
        }
        core
    }

    /// The agent a connection speaks for, while it is that agent's current one.
    pub fn agent_of_conn(&self, conn: ConnId) -> Option<&str> {
        self.conn_agent.get(&conn).map(|&idx| self.agents[idx].name.as_str())
    }

    /// The epoch of this controller start.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Accepts a batch atomically: every job or none, with the bad one named.
    pub fn submit(&mut self, now: Now, specs: Vec<JobSpec>, out: &mut Vec<Output>) -> Result<Vec<JobId>, SubmitError> {
        self.submit_with(now, specs, SubmitOptions::default(), out).map(|(ids, _)| ids)
    }

    /// Like [`Core::submit`], under an idempotency key and with records that
    /// must be stored in the same transaction as the jobs (`extra`: the
    /// prompts a batch of runs creates). A submission whose key was seen
    /// before with the same request digest changes and stores nothing and
    /// answers the jobs it made then (`true` says it was a repeat); the same
    /// key with another digest is refused.
    pub fn submit_with(
        &mut self,
        now: Now,
        specs: Vec<JobSpec>,
        opts: SubmitOptions,
        out: &mut Vec<Output>,
    ) -> Result<(Vec<JobId>, bool), SubmitError> {
        let SubmitOptions { key, extra, after, inputs_from } = opts;
        if let Some(k) = &key {
            if let Some((digest, ids)) = self.submitted_keys.get(&k.key) {
                if *digest != k.request_sha256 {
                    return Err(SubmitError::KeyReused { key: k.key.clone() });
                }
                return Ok((ids.clone(), true));
            }
        }
        if specs.is_empty() || specs.len() > self.config.batch_jobs_max {
            return Err(SubmitError::BatchSize { got: specs.len(), max: self.config.batch_jobs_max });
        }
        let queued = self.ready.len() + self.backoff.len() + self.blocked.len();
        if queued + specs.len() > self.config.queued_jobs_max {
            return Err(SubmitError::QueueFull { queued, max: self.config.queued_jobs_max });
        }
        let largest = self.agents.iter().filter(|a| a.health != Health::Lost).map(|a| a.gpus.len() as u32).max();
        for (index, spec) in specs.iter().enumerate() {
            spec.validate().map_err(|error| SubmitError::InvalidSpec { index, error })?;
            // With no host known yet, jobs wait for one rather than fail.
            if let Some(largest) = largest {
                if spec.gpus > largest {
                    return Err(SubmitError::Unplaceable { index, gpus: spec.gpus, largest });
                }
                let fits = (0..self.agents.len()).any(|i| {
                    self.agents[i].health != Health::Lost && self.could_hold(i, spec.gpus, spec.min_free_vram_bytes)
                });
                if !fits {
                    return Err(SubmitError::TooMuchVram {
                        index,
                        gpus: spec.gpus,
                        mib: spec.min_free_vram_bytes >> 20,
                    });
                }
            }
        }
        // The ids this batch's jobs get, so one may name an earlier one of the batch.
        let first_id = self.next_job_id;
        let mut deps_of: Vec<Vec<JobId>> = Vec::with_capacity(specs.len());
        let mut takes: Vec<Vec<InputFrom>> = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let mut deps = after.get(index).cloned().unwrap_or_default();
            let mut from = Vec::new();
            // Jobs of this batch are not known yet: only those submitted before are checked.
            let mut in_batch = Vec::new();
            for f in inputs_from.get(index).into_iter().flatten() {
                let job = match f.dep {
                    Dep::Job(dep) => {
                        if !deps.contains(&dep) {
                            deps.push(dep);
                        }
                        dep
                    }
                    Dep::InBatch(i) if i < index => {
                        let dep = JobId(first_id + i as u64);
                        in_batch.push(dep);
                        dep
                    }
                    Dep::InBatch(i) => return Err(SubmitError::BadBatchDependency { index, dep: i }),
                };
                from.push(InputFrom { job, output: f.output.clone(), path: f.path.clone() });
            }
            for &dep in &deps {
                match self.jobs.get(&dep).map(|j| j.rec.state) {
                    None => return Err(SubmitError::UnknownDependency { index, dep }),
                    Some(state @ (JobState::Failed | JobState::Cancelled)) => {
                        return Err(SubmitError::DependencyEnded { index, dep, state: state.as_str() });
                    }
                    Some(_) => {}
                }
            }
            if !from.is_empty() {
                // The inputs it will have must make a valid spec too (paths, no two at one place).
                let mut probe = spec.clone();
                probe.inputs.extend(from.iter().map(|f| cosmos_proto::spec::InputArtifact {
                    sha256: Sha256([0; 32]),
                    size_bytes: 0,
                    path: f.path.clone(),
                }));
                probe.validate().map_err(|error| SubmitError::InvalidSpec { index, error })?;
            }
            for dep in in_batch {
                if !deps.contains(&dep) {
                    deps.push(dep);
                }
            }
            deps_of.push(deps);
            takes.push(from);
        }
        let mut ids = Vec::with_capacity(specs.len());
        for (index, (spec, (after, inputs_from))) in specs.into_iter().zip(deps_of.into_iter().zip(takes)).enumerate() {
            let id = JobId(self.next_job_id);
            debug_assert_eq!(id.0, first_id + index as u64);
            self.next_job_id += 1;
            let rec = JobRecord {
                id,
                spec,
                state: JobState::Queued,
                attempts_used: 0,
                attempts_lost: 0,
                cancel_requested: false,
                not_before_ms: 0,
                exit_code: None,
                error: None,
                outputs: Vec::new(),
                agent: None,
                submitted_ms: now.wall_ms,
                finished_ms: None,
                idempotency: key.clone(),
                started_ms: None,
                gpu_ms: 0,
                retries: 0,
                after,
                inputs_from,
            };
            self.ops.push(StoreOp::PutJob(Box::new(rec.clone())));
            self.job_counts[rec.state as usize] += 1;
            let counted = rec.state;
            self.jobs
                .insert(id, Job { rec: Box::new(rec), not_before_mono_ms: 0, live: None, progress: None, counted });
            self.enqueue_or_wait(now, id);
            ids.push(id);
        }
        // In the one persist of this call: both the jobs and what came with them, or neither.
        self.ops.extend(extra);
        if let Some(k) = key {
            self.submitted_keys.insert(k.key, (k.request_sha256, ids.clone()));
        }
        self.event(now, None, None, None, "submitted", format!("{} jobs accepted", ids.len()));
        self.dirty = true;
        self.finish(now, out);
        Ok((ids, false))
    }

    /// Cancels a job: at once if it waits, through its agent if it runs.
    pub fn cancel(&mut self, now: Now, id: JobId, out: &mut Vec<Output>) -> Result<(), CommandError> {
        let job = self.jobs.get_mut(&id).ok_or(CommandError::UnknownJob(id))?;
        if job.rec.state.is_final() {
            return Err(CommandError::AlreadyFinal { id, state: job.rec.state.as_str() });
        }
        job.rec.cancel_requested = true;
        match job.live {
            None => {
                self.ready.remove(&job.rec.spec, id);
                self.backoff.remove(&(job.not_before_mono_ms, id));
                self.conclude(now, id, JobState::Cancelled, None, Some("cancelled by user".into()));
                // It may have been the job a host was held for.
                self.dirty = true;
            }
            Some(att_id) => {
                self.put_job(id);
                self.stop_attempt(now, att_id);
            }
        }
        self.finish(now, out);
        Ok(())
    }

    /// An operator fixed a quarantined GPU by hand: the agent returns it to scheduling.
    pub fn release_gpu(&mut self, now: Now, name: &str, uuid: &str, out: &mut Vec<Output>) -> Result<(), CommandError> {
        let idx = *self.agent_by_name.get(name).ok_or_else(|| CommandError::UnknownAgent(name.to_string()))?;
        if !self.agents[idx].gpus.iter().any(|g| g.info.uuid == uuid) {
            return Err(CommandError::UnknownGpu { agent: name.to_string(), uuid: uuid.to_string() });
        }
        let conn = self.agents[idx].conn.ok_or_else(|| CommandError::NotConnected(name.to_string()))?;
        // The agent decides and answers with GpuRecovered, which puts the GPU back here.
        self.sends.push(Output::Send { conn, msg: ControllerMsg::ReleaseGpu { gpu_uuid: uuid.to_string() } });
        let detail = format!("GPU {uuid} of agent {name} released by operator");
        self.event(now, None, None, Some(name.to_string()), "gpu_released", detail);
        self.finish(now, out);
        Ok(())
    }

    /// Re-queues a failed or cancelled job under its own id, as `scontrol
    /// requeue` does: a fresh attempt budget, its earlier attempts kept in
    /// its history, its error and outputs cleared.
    pub fn retry(&mut self, now: Now, id: JobId, out: &mut Vec<Output>) -> Result<(), CommandError> {
        let job = self.jobs.get(&id).ok_or(CommandError::UnknownJob(id))?;
        if !matches!(job.rec.state, JobState::Failed | JobState::Cancelled) {
            return Err(CommandError::NotRetriable { id, state: job.rec.state.as_str() });
        }
        for dep in &job.rec.after {
            if let Some(state @ (JobState::Failed | JobState::Cancelled)) = self.jobs.get(dep).map(|d| d.rec.state) {
                return Err(CommandError::DependencyEnded { id, dep: *dep, state: state.as_str() });
            }
        }
        let job = self.jobs.get_mut(&id).expect("looked up above");
        let queued = self.ready.len() + self.backoff.len() + self.blocked.len();
        if queued >= self.config.queued_jobs_max {
            return Err(CommandError::QueueFull { queued, max: self.config.queued_jobs_max });
        }
        let was = job.rec.state.as_str();
        let rec = &mut job.rec;
        rec.state = JobState::Queued;
        rec.attempts_used = 0;
        rec.attempts_lost = 0;
        rec.cancel_requested = false;
        rec.not_before_ms = 0;
        rec.exit_code = None;
        rec.error = None;
        rec.outputs.clear();
        rec.finished_ms = None;
        rec.retries += 1;
        self.put_job(id);
        self.enqueue_or_wait(now, id);
        self.event(now, Some(id), None, None, "retried", format!("re-queued by an operator after it {was}"));
        self.finish(now, out);
        Ok(())
    }

    /// Why a job that is not running waits, in words (as squeue's REASON):
    /// `None` for a job that runs or has ended.
    pub fn wait_reason(&self, id: JobId) -> Option<String> {
        let job = self.jobs.get(&id)?;
        if job.live.is_some() || job.rec.state.is_final() {
            return None;
        }
        if let Some(pending) = self.blocked.get(&id) {
            let names: Vec<String> = pending.iter().map(JobId::to_string).collect();
            return Some(format!("waiting for {} to succeed", names.join(", ")));
        }
        if job.rec.state == JobState::Retrying && self.backoff.contains(&(job.not_before_mono_ms, id)) {
            return Some("waiting out its retry backoff".into());
        }
        let spec = &job.rec.spec;
        if let Some((holder, host)) = self.reservation {
            if holder != id && self.agents[host].free_gpus() >= spec.gpus {
                let name = &self.agents[host].name;
                return Some(format!("{name} is held for job {holder}, which needs its GPUs"));
            }
            if holder == id {
                let name = &self.agents[host].name;
                return Some(format!("holding {name} until {} of its GPUs are free", spec.gpus));
            }
        }
        if self.agents.iter().all(|a| a.conn.is_none() || a.health == Health::Lost) {
            return Some("no agent is connected".into());
        }
        let usable: Vec<&Agent> = self.agents.iter().filter(|a| a.schedulable()).collect();
        if usable.is_empty() {
            return Some("every connected host is draining, suspect or unhealthy".into());
        }
        let vram = |g: &Gpu| g.holder.is_none() && g.healthy && g.free_vram_bytes >= spec.min_free_vram_bytes;
        let (best, host) = usable
            .iter()
            .map(|a| (a.gpus.iter().filter(|g| vram(g)).count(), a.name.as_str()))
            .max_by_key(|&(n, name)| (n, std::cmp::Reverse(name)))
            .expect("usable is not empty");
        let need = if spec.min_free_vram_bytes > 0 {
            format!("{} free GPUs with {} MiB free each on one host", spec.gpus, spec.min_free_vram_bytes >> 20)
        } else {
            format!("{} free GPUs on one host", spec.gpus)
        };
        if (best as u32) < spec.gpus {
            return Some(format!("needs {need}; the largest such set is {best} on {host}"));
        }
        Some("queued behind jobs of higher priority or submitted earlier".into())
    }

    /// Drains (no new work) or undrains an agent.
    pub fn set_draining(
        &mut self,
        now: Now,
        name: &str,
        draining: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), CommandError> {
        let idx = *self.agent_by_name.get(name).ok_or_else(|| CommandError::UnknownAgent(name.to_string()))?;
        self.agents[idx].draining = draining;
        self.reindex(idx);
        self.ops.push(StoreOp::PutAgent(self.agents[idx].record()));
        let kind = if draining { "drained" } else { "undrained" };
        self.event(now, None, None, Some(name.to_string()), kind, format!("agent {name} {kind} by operator"));
        if let Some(conn) = self.agents[idx].conn {
            self.sends.push(Output::Send { conn, msg: ControllerMsg::Drain { draining } });
        }
        self.dirty = true;
        self.finish(now, out);
        Ok(())
    }

    /// A message arrived on a connection.
    pub fn on_message(&mut self, now: Now, conn: ConnId, msg: AgentMsg, held: &HeldBlobs, out: &mut Vec<Output>) {
        let Some(&idx) = self.conn_agent.get(&conn) else { return };
        self.heard(now, idx);
        match msg {
            AgentMsg::Hello(_) => {} // Only valid as a connection's first message, which the shell routes to on_connect.
            AgentMsg::Heartbeat(hb) => {
                self.sends.push(Output::Send { conn, msg: ControllerMsg::HeartbeatAck { seq: hb.seq } });
                if self.agents[idx].unhealthy != hb.unhealthy {
                    let name = self.agents[idx].name.clone();
                    let (kind, detail) = match &hb.unhealthy {
                        Some(why) => ("agent_unhealthy", format!("agent {name} takes no new work: {why}")),
                        None => ("agent_healthy", format!("agent {name} can take work again")),
                    };
                    self.event(now, None, None, Some(name), kind, detail);
                    self.agents[idx].unhealthy = hb.unhealthy.clone();
                    self.dirty = true;
                }
                let agent = &mut self.agents[idx];
                for usage in &hb.gpus {
                    if let Some(g) = agent.gpus.iter_mut().find(|g| g.info.uuid == usage.uuid) {
                        if usage.free_vram_bytes > g.free_vram_bytes || (usage.healthy && !g.healthy) {
                            self.dirty = true;
                        }
                        g.free_vram_bytes = usage.free_vram_bytes;
                        g.healthy = usage.healthy;
                        g.quarantine = usage.quarantine.clone();
                    }
                }
                let reported: BTreeSet<AttemptId> = hb
                    .attempts
                    .iter()
                    .filter(|r| !matches!(r.phase, AttemptPhase::Finished(_)))
                    .map(|r| r.attempt_id)
                    .collect();
                // Fenced attempts the agent no longer runs free their GPUs.
                let gone: Vec<AttemptId> = agent.fenced.keys().filter(|f| !reported.contains(f)).copied().collect();
                for f in gone {
                    self.release_fenced(idx, f);
                }
                // Attempts running there that we do not know as live: stop them.
                for r in &hb.attempts {
                    let ours = self.agents[idx].attempts.contains(&r.attempt_id);
                    if !ours
                        && !matches!(r.phase, AttemptPhase::Finished(_))
                        && !self.agents[idx].fenced.contains_key(&r.attempt_id)
                    {
                        self.track_fenced(idx, r.attempt_id, &r.gpu_uuids);
                    }
                }
                self.reindex(idx);
            }
            AgentMsg::AttemptStarted { attempt_id, .. } => {
                if self.agents[idx].attempts.contains(&attempt_id) {
                    self.mark_started(now, attempt_id);
                }
            }
            AgentMsg::Progress { attempt_id, step, total } => {
                if let Some(att) = self.live.get(&attempt_id) {
                    if let Some(job) = self.jobs.get_mut(&att.job_id) {
                        if job.progress != Some((step, total)) {
                            job.progress = Some((step, total));
                            self.progressed.push(att.job_id);
                        }
                    }
                }
            }
            AgentMsg::LogChunk(_) => {} // Logs go to the shell's log files; they decide nothing.
            AgentMsg::AttemptFinished { attempt_id, outcome } => {
                if self.agents[idx].attempts.contains(&attempt_id) {
                    self.attempt_ended(now, attempt_id, outcome, held);
                } else {
                    if self.agents[idx].fenced.contains_key(&attempt_id) {
                        self.release_fenced(idx, attempt_id);
                        self.reindex(idx);
                    }
                }
                self.sends
                    .push(Output::Send { conn, msg: ControllerMsg::AckFinished { attempt_ids: vec![attempt_id] } });
            }
            AgentMsg::GpuFault { gpu_uuid, fault } => {
                let name = self.agents[idx].name.clone();
                if let Some(g) = self.agents[idx].gpus.iter_mut().find(|g| g.info.uuid == gpu_uuid) {
                    g.healthy = false;
                }
                self.reindex(idx);
                self.event(
                    now,
                    None,
                    None,
                    Some(name),
                    "gpu_fault",
                    format!("GPU {gpu_uuid} taken out of scheduling: {fault:?}"),
                );
            }
            AgentMsg::GpuRecovered { gpu_uuid } => {
                let name = self.agents[idx].name.clone();
                if let Some(g) = self.agents[idx].gpus.iter_mut().find(|g| g.info.uuid == gpu_uuid) {
                    g.healthy = true;
                }
                self.reindex(idx);
                self.dirty = true;
                self.event(now, None, None, Some(name), "gpu_recovered", format!("GPU {gpu_uuid} back in scheduling"));
            }
        }
        self.finish(now, out);
    }

    /// A connection closed (or the shell gave up on it).
    pub fn on_disconnect(&mut self, now: Now, conn: ConnId, out: &mut Vec<Output>) {
        if let Some(idx) = self.conn_agent.remove(&conn) {
            let agent = &mut self.agents[idx];
            agent.conn = None;
            if agent.health == Health::Up {
                // Unreachable is not failed: attempts stay until the grace period ends.
                agent.health = Health::Suspect;
            }
            let name = agent.name.clone();
            self.reindex(idx);
            self.rearm(idx);
            self.event(now, None, None, Some(name.clone()), "agent_disconnected", format!("agent {name} disconnected"));
        }
        self.finish(now, out);
    }

    /// Runs a scheduling pass even if nothing changed (benchmarks, operator nudges).
    pub fn reschedule(&mut self, now: Now, out: &mut Vec<Output>) {
        self.dirty = true;
        self.finish(now, out);
    }

    fn finish(&mut self, now: Now, out: &mut Vec<Output>) {
        if self.dirty {
            self.dirty = false;
            self.passes += 1;
            self.schedule(now);
        }
        if !self.ops.is_empty() {
            out.push(Output::Persist(std::mem::take(&mut self.ops)));
        }
        out.append(&mut self.sends);
    }

    // ---- scheduling ----

    fn agent_index(&mut self, name: &str, now: Now) -> usize {
        if let Some(&idx) = self.agent_by_name.get(name) {
            return idx;
        }
        let idx = self.agents.len();
        self.agents.push(Agent {
            name: name.to_string(),
            conn: None,
            draining: false,
            gpus_simulated: false,
            gpus: Vec::new(),
            last_heard_ms: self.deadline_clock_ms(now),
            health: Health::Suspect,
            fenced: BTreeMap::new(),
            attempts: BTreeSet::new(),
            indexed_free: None,
            indexed_deadline: None,
            unhealthy: None,
        });
        self.agent_by_name.insert(name.to_string(), idx);
        self.rearm(idx);
        idx
    }

    /// Puts a host under its current free-GPU count in the placement index,
    /// or takes it out if it is not schedulable. Call after any change to it.
    fn reindex(&mut self, idx: usize) {
        let agent = &mut self.agents[idx];
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::StaleFreeIndex && agent.indexed_free.is_some() {
            return;
        }
        if let Some(free) = agent.indexed_free.take() {
            self.free_index.remove(&(free, idx));
        }
        if agent.schedulable() {
            let free = agent.free_gpus();
            agent.indexed_free = Some(free);
            self.free_index.insert((free, idx));
        }
    }

    fn put_job(&mut self, id: JobId) {
        let job = self.jobs.get_mut(&id).expect("a job that is persisted exists");
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::UnpersistedCascade
            && job.rec.state == JobState::Cancelled
            && job.rec.error.as_deref().is_some_and(|e| e.starts_with("not run:"))
        {
            return;
        }
        if job.counted != job.rec.state {
            #[cfg(feature = "sabotage")]
            let counts = self.config.sabotage != Sabotage::MiscountStates;
            #[cfg(not(feature = "sabotage"))]
            let counts = true;
            if counts {
                self.job_counts[job.counted as usize] -= 1;
                self.job_counts[job.rec.state as usize] += 1;
            }
            job.counted = job.rec.state;
        }
        self.ops.push(StoreOp::PutJob(job.rec.clone()));
    }

    /// The jobs whose live attempt reported new progress since the last call
    /// (progress is not stored: waiting clients are told of it as it comes).
    pub fn drain_progressed(&mut self) -> Vec<JobId> {
        std::mem::take(&mut self.progressed)
    }

    /// How many jobs are in each state (as last persisted), without walking the jobs.
    pub fn job_counts(&self) -> impl Iterator<Item = (JobState, usize)> + '_ {
        ALL_JOB_STATES.into_iter().map(|s| (s, self.job_counts[s as usize]))
    }

    /// Jobs after `after` (all when `None`), in id order.
    pub fn jobs_after(&self, after: Option<JobId>) -> impl Iterator<Item = &JobRecord> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.jobs.range((from, Bound::Unbounded)).map(|(_, j)| &*j.rec)
    }

    fn event(
        &mut self,
        now: Now,
        job_id: Option<JobId>,
        attempt_id: Option<AttemptId>,
        agent: Option<String>,
        kind: &str,
        detail: String,
    ) {
        self.ops.push(StoreOp::Event(EventRecord {
            at_ms: now.wall_ms,
            job_id,
            attempt_id,
            agent,
            kind: kind.to_string(),
            detail,
        }));
    }

    // ---- read-only views ----

    /// A job's record, progress (step, total) and live attempt.
    pub fn job(&self, id: JobId) -> Option<(&JobRecord, Option<(u32, u32)>, Option<&AttemptRecord>)> {
        self.jobs.get(&id).map(|j| (&*j.rec, j.progress, j.live.and_then(|a| self.live.get(&a))))
    }

    /// A live attempt.
    pub fn attempt(&self, id: AttemptId) -> Option<&AttemptRecord> {
        self.live.get(&id)
    }

    /// Every job, in id order.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values().map(|j| &*j.rec)
    }

    /// Every live attempt.
    pub fn live_attempts(&self) -> impl Iterator<Item = &AttemptRecord> {
        self.live.values()
    }

    /// Scheduling passes run since the core was rebuilt.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// Jobs waiting for GPUs or a retry.
    pub fn queue_depth(&self) -> usize {
        self.ready.len() + self.backoff.len() + self.blocked.len()
    }

    /// The connection of the agent with this name, while it is connected and heard from recently
    /// (a silent one may be a dead host's half-open connection, which a new one replaces).
    pub fn live_conn_of(&self, name: &str) -> Option<ConnId> {
        let agent = &self.agents[*self.agent_by_name.get(name)?];
        agent.conn.filter(|_| agent.health == Health::Up)
    }

    /// Every agent.
    pub fn agents(&self) -> Vec<AgentView> {
        self.agents
            .iter()
            .map(|a| AgentView {
                name: a.name.clone(),
                health: a.health,
                draining: a.draining,
                connected: a.conn.is_some(),
                gpus_simulated: a.gpus_simulated,
                gpus: a.gpus.iter().map(|g| (g.info.clone(), g.free_vram_bytes, g.healthy, g.holder)).collect(),
                unhealthy: a.unhealthy.clone(),
                gpu_quarantine: a
                    .gpus
                    .iter()
                    .filter_map(|g| g.quarantine.clone().map(|q| (g.info.uuid.clone(), q)))
                    .collect(),
            })
            .collect()
    }
}

fn new_gpu(info: GpuInfo) -> Gpu {
    let free = info.total_vram_bytes;
    Gpu { info, free_vram_bytes: free, healthy: true, holder: None, quarantine: None }
}
