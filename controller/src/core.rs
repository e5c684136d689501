//! The controller's logic as a synchronous state machine with no I/O.
//!
//! Each entry point takes `now_ms` (the controller's own clock; never compared
//! with an agent's) and appends [`Output`]s. Within one call the core emits a
//! single [`Output::Persist`] first and every message after it, so a shell
//! that makes the persist durable before sending anything upholds "what a
//! user can observe is stored before it is acted on" without knowing why.

use crate::model::*;
use cosmos_proto::{
    AgentHello, AgentMsg, Assign, AttemptId, AttemptOutcome, AttemptPhase, ControllerMsg, Epoch, GpuInfo, JobId,
    JobSpec, SpecError, TraceContext,
};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    pub max_lost_attempts: u32,
    /// Jobs that may wait in the queue; submissions beyond are refused.
    pub max_queued_jobs: usize,
    /// Jobs in one batch submission.
    pub max_batch_jobs: usize,
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
            max_lost_attempts: 10,
            max_queued_jobs: 1_000_000,
            max_batch_jobs: 100_000,
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

impl SubmitError {
    /// Only a full queue clears by itself.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SubmitError::QueueFull { .. })
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
    zombies: BTreeMap<AttemptId, Vec<usize>>,
    /// Live attempts placed here.
    attempts: BTreeSet<AttemptId>,
    /// The free-GPU count under which it sits in the free index, if it does.
    indexed_free: Option<u32>,
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
    rec: JobRecord,
    live: Option<AttemptId>,
    progress: Option<(u32, u32)>,
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
    live: BTreeMap<AttemptId, AttemptRecord>,
    agents: Vec<Agent>,
    agent_by_name: HashMap<String, usize>,
    conn_agent: HashMap<ConnId, usize>,
    /// Submissions by idempotency key: the digest of what they asked for, and the jobs they made.
    submitted_keys: HashMap<String, (String, Vec<JobId>)>,
    /// Schedulable agents by free GPU count, for best-fit placement.
    free_index: BTreeSet<(u32, usize)>,
    /// The host held for a job that could not be placed, so small jobs cannot starve it.
    reservation: Option<(JobId, usize)>,
    /// Something changed that may let a queued job be placed.
    dirty: bool,
    ops: Vec<StoreOp>,
    sends: Vec<Output>,
}

impl Core {
    /// Rebuilds the core from a store snapshot (an empty one on first start).
    pub fn recover(config: CoreConfig, snapshot: Snapshot, now_ms: u64) -> Core {
        let mut core = Core {
            config,
            epoch: snapshot.epoch,
            next_job_id: snapshot.jobs.iter().map(|j| j.id.0 + 1).max().unwrap_or(1),
            next_attempt_id: snapshot.max_attempt_id.map_or(1, |a| a.0 + 1),
            jobs: BTreeMap::new(),
            ready: ReadyQueue::default(),
            backoff: BTreeSet::new(),
            live: BTreeMap::new(),
            agents: Vec::new(),
            agent_by_name: HashMap::new(),
            conn_agent: HashMap::new(),
            submitted_keys: HashMap::new(),
            free_index: BTreeSet::new(),
            reservation: None,
            dirty: true,
            ops: Vec::new(),
            sends: Vec::new(),
        };
        for rec in snapshot.agents {
            let idx = core.agent_index(&rec.name, now_ms);
            let agent = &mut core.agents[idx];
            agent.draining = rec.draining;
            agent.gpus_simulated = rec.gpus_simulated;
            agent.gpus = rec.gpus.into_iter().map(new_gpu).collect();
            // Not connected yet: the grace period for reconnecting starts now.
            agent.health = Health::Suspect;
        }
        for rec in snapshot.jobs {
            let final_ = rec.state.is_final();
            let mut rec = rec;
            if matches!(rec.state, JobState::Assigned | JobState::Running) {
                // Its attempt, if still live, is attached below and takes it off the queue.
                rec.state = JobState::Queued;
            }
            let job = Job { rec, live: None, progress: None };
            let id = job.rec.id;
            if let Some(k) = &job.rec.idempotency {
                let entry =
                    core.submitted_keys.entry(k.key.clone()).or_insert_with(|| (k.request_sha256.clone(), Vec::new()));
                entry.1.push(id);
            }
            core.jobs.insert(id, job);
            if !final_ {
                core.enqueue_or_wait(id);
            }
        }
        for att in snapshot.live_attempts {
            let idx = core.agent_index(&att.agent, now_ms);
            let Some(job) = core.jobs.get_mut(&att.job_id) else { continue };
            job.live = Some(att.id);
            job.rec.state = if att.state == AttemptState::Assigned { JobState::Assigned } else { JobState::Running };
            core.ready.remove(&job.rec.spec, att.job_id);
            core.backoff.remove(&(job.rec.not_before_ms, att.job_id));
            let agent = &mut core.agents[idx];
            agent.attempts.insert(att.id);
            for uuid in &att.gpu_uuids {
                if let Some(g) = agent.gpus.iter_mut().find(|g| &g.info.uuid == uuid) {
                    g.holder = Some(att.id);
                }
            }
            core.live.insert(att.id, att);
        }
        core
    }

    /// The epoch of this controller start.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Accepts a batch atomically: every job or none, with the bad one named.
    pub fn submit(
        &mut self,
        now_ms: u64,
        specs: Vec<JobSpec>,
        out: &mut Vec<Output>,
    ) -> Result<Vec<JobId>, SubmitError> {
        self.submit_keyed(now_ms, specs, None, out).map(|(ids, _)| ids)
    }

    /// Like [`Core::submit`], under an idempotency key: a submission whose key
    /// was seen before with the same request digest changes nothing and
    /// answers the jobs it made then (`true` says it was a repeat); the same
    /// key with another digest is refused.
    pub fn submit_keyed(
        &mut self,
        now_ms: u64,
        specs: Vec<JobSpec>,
        key: Option<Idempotency>,
        out: &mut Vec<Output>,
    ) -> Result<(Vec<JobId>, bool), SubmitError> {
        if let Some(k) = &key {
            if let Some((digest, ids)) = self.submitted_keys.get(&k.key) {
                if *digest != k.request_sha256 {
                    return Err(SubmitError::KeyReused { key: k.key.clone() });
                }
                return Ok((ids.clone(), true));
            }
        }
        if specs.is_empty() || specs.len() > self.config.max_batch_jobs {
            return Err(SubmitError::BatchSize { got: specs.len(), max: self.config.max_batch_jobs });
        }
        let queued = self.ready.len() + self.backoff.len();
        if queued + specs.len() > self.config.max_queued_jobs {
            return Err(SubmitError::QueueFull { queued, max: self.config.max_queued_jobs });
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
        let mut ids = Vec::with_capacity(specs.len());
        for spec in specs {
            let id = JobId(self.next_job_id);
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
                submitted_ms: now_ms,
                finished_ms: None,
                idempotency: key.clone(),
            };
            self.ops.push(StoreOp::PutJob(Box::new(rec.clone())));
            self.ready.insert(&rec.spec, id);
            self.jobs.insert(id, Job { rec, live: None, progress: None });
            ids.push(id);
        }
        if let Some(k) = key {
            self.submitted_keys.insert(k.key, (k.request_sha256, ids.clone()));
        }
        self.event(now_ms, None, None, None, "submitted", format!("{} jobs accepted", ids.len()));
        self.dirty = true;
        self.finish(now_ms, out);
        Ok((ids, false))
    }

    /// Cancels a job: at once if it waits, through its agent if it runs.
    pub fn cancel(&mut self, now_ms: u64, id: JobId, out: &mut Vec<Output>) -> Result<(), CommandError> {
        let job = self.jobs.get_mut(&id).ok_or(CommandError::UnknownJob(id))?;
        if job.rec.state.is_final() {
            return Err(CommandError::AlreadyFinal { id, state: job.rec.state.as_str() });
        }
        job.rec.cancel_requested = true;
        match job.live {
            None => {
                self.ready.remove(&job.rec.spec, id);
                self.backoff.remove(&(job.rec.not_before_ms, id));
                self.conclude(now_ms, id, JobState::Cancelled, None, Some("cancelled by user".into()));
                // It may have been the job a host was held for.
                self.dirty = true;
            }
            Some(att_id) => {
                self.put_job(id);
                self.stop_attempt(now_ms, att_id);
            }
        }
        self.finish(now_ms, out);
        Ok(())
    }

    /// Drains (no new work) or undrains an agent.
    pub fn set_draining(
        &mut self,
        now_ms: u64,
        name: &str,
        draining: bool,
        out: &mut Vec<Output>,
    ) -> Result<(), CommandError> {
        let idx = *self.agent_by_name.get(name).ok_or_else(|| CommandError::UnknownAgent(name.to_string()))?;
        self.agents[idx].draining = draining;
        self.reindex(idx);
        self.ops.push(StoreOp::PutAgent(self.agents[idx].record()));
        let kind = if draining { "drained" } else { "undrained" };
        self.event(now_ms, None, None, Some(name.to_string()), kind, format!("agent {name} {kind} by operator"));
        if let Some(conn) = self.agents[idx].conn {
            self.sends.push(Output::Send { conn, msg: ControllerMsg::Drain { draining } });
        }
        self.dirty = true;
        self.finish(now_ms, out);
        Ok(())
    }

    /// An operator fixed a quarantined GPU by hand: the agent returns it to scheduling.
    pub fn release_gpu(
        &mut self,
        now_ms: u64,
        name: &str,
        uuid: &str,
        out: &mut Vec<Output>,
    ) -> Result<(), CommandError> {
        let idx = *self.agent_by_name.get(name).ok_or_else(|| CommandError::UnknownAgent(name.to_string()))?;
        if !self.agents[idx].gpus.iter().any(|g| g.info.uuid == uuid) {
            return Err(CommandError::UnknownGpu { agent: name.to_string(), uuid: uuid.to_string() });
        }
        let conn = self.agents[idx].conn.ok_or_else(|| CommandError::NotConnected(name.to_string()))?;
        // The agent decides and answers with GpuRecovered, which puts the GPU back here.
        self.sends.push(Output::Send { conn, msg: ControllerMsg::ReleaseGpu { gpu_uuid: uuid.to_string() } });
        self.event(
            now_ms,
            None,
            None,
            Some(name.to_string()),
            "gpu_released",
            format!("GPU {uuid} of agent {name} released by operator"),
        );
        self.finish(now_ms, out);
        Ok(())
    }

    /// An agent completed its handshake and sent its hello on a new connection.
    pub fn on_connect(&mut self, now_ms: u64, conn: ConnId, name: &str, hello: AgentHello, out: &mut Vec<Output>) {
        let idx = self.agent_index(name, now_ms);
        if let Some(old) = self.agents[idx].conn.replace(conn) {
            self.conn_agent.remove(&old);
            self.sends.push(Output::Close { conn: old });
        }
        self.conn_agent.insert(conn, idx);
        let was_lost = self.agents[idx].health == Health::Lost;
        {
            let agent = &mut self.agents[idx];
            agent.last_heard_ms = now_ms;
            agent.health = Health::Up;
            agent.gpus_simulated = hello.gpus_simulated;
            let old: HashMap<String, Gpu> = agent.gpus.drain(..).map(|g| (g.info.uuid.clone(), g)).collect();
            agent.gpus = hello
                .gpus
                .iter()
                .map(|info| match old.get(&info.uuid) {
                    Some(g) => Gpu { info: info.clone(), ..g.clone() },
                    None => new_gpu(info.clone()),
                })
                .collect();
            for g in &mut agent.gpus {
                g.holder = None;
            }
            agent.zombies.clear();
        }
        self.sends.push(Output::Send {
            conn,
            msg: ControllerMsg::Welcome { epoch: self.epoch, heartbeat_interval_ms: self.config.heartbeat_interval_ms },
        });
        self.ops.push(StoreOp::PutAgent(self.agents[idx].record()));
        let verb = if was_lost { "returned" } else { "connected" };
        self.event(now_ms, None, None, Some(name.to_string()), "agent_connected", format!("agent {name} {verb}"));

        // Reconcile: what the agent reports is the truth about what runs there.
        let reported: BTreeMap<AttemptId, &cosmos_proto::AttemptReport> =
            hello.attempts.iter().map(|r| (r.attempt_id, r)).collect();
        let mine: Vec<AttemptId> = self.agents[idx].attempts.iter().copied().collect();
        let mut finished_acks = Vec::new();
        for att_id in mine {
            match reported.get(&att_id).map(|r| &r.phase) {
                Some(AttemptPhase::Finished(outcome)) => {
                    finished_acks.push(att_id);
                    self.attempt_ended(now_ms, att_id, outcome.clone());
                }
                Some(AttemptPhase::Running { .. }) => self.mark_started(now_ms, att_id),
                Some(AttemptPhase::Starting | AttemptPhase::Stopping) => {}
                None => self.attempt_ended(
                    now_ms,
                    att_id,
                    AttemptOutcome::Lost {
                        reason: format!(
                            "agent {name} no longer knows the attempt (restarted, or the order never arrived)"
                        ),
                    },
                ),
            }
        }
        let keep: Vec<AttemptId> = self.agents[idx].attempts.iter().copied().collect();
        for &att_id in &keep {
            let att = &self.live[&att_id];
            let gpu_uuids = att.gpu_uuids.clone();
            let stopping = att.state == AttemptState::Stopping;
            for uuid in gpu_uuids {
                if let Some(g) = self.agents[idx].gpus.iter_mut().find(|g| g.info.uuid == uuid) {
                    g.holder = Some(att_id);
                }
            }
            if stopping {
                self.sends.push(Output::Send {
                    conn,
                    msg: ControllerMsg::Cancel { attempt_id: att_id, grace_ms: self.config.cancel_grace_ms },
                });
            }
        }
        #[cfg(feature = "sabotage")]
        let fencing = self.config.sabotage != Sabotage::NoFencing;
        #[cfg(not(feature = "sabotage"))]
        let fencing = true;
        let mut keep = keep;
        for report in &hello.attempts {
            if keep.contains(&report.attempt_id) {
                continue;
            }
            if let AttemptPhase::Finished(_) = report.phase {
                finished_acks.push(report.attempt_id);
            } else if fencing {
                self.track_zombie(idx, report.attempt_id, &report.gpu_uuids);
            } else {
                keep.push(report.attempt_id);
            }
        }
        self.sends.push(Output::Send { conn, msg: ControllerMsg::Reconcile { epoch: self.epoch, keep } });
        if !finished_acks.is_empty() {
            self.sends.push(Output::Send { conn, msg: ControllerMsg::AckFinished { attempt_ids: finished_acks } });
        }
        if self.agents[idx].draining {
            self.sends.push(Output::Send { conn, msg: ControllerMsg::Drain { draining: true } });
        }
        self.reindex(idx);
        self.dirty = true;
        self.finish(now_ms, out);
    }

    /// A message arrived on a connection.
    pub fn on_message(&mut self, now_ms: u64, conn: ConnId, msg: AgentMsg, out: &mut Vec<Output>) {
        let Some(&idx) = self.conn_agent.get(&conn) else { return };
        self.heard(now_ms, idx);
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
                    self.event(now_ms, None, None, Some(name), kind, detail);
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
                // Zombies the agent no longer runs free their GPUs.
                let gone: Vec<AttemptId> = agent.zombies.keys().filter(|z| !reported.contains(z)).copied().collect();
                for z in gone {
                    self.release_zombie(idx, z);
                }
                // Attempts running there that we do not know as live: stop them.
                for r in &hb.attempts {
                    let ours = self.agents[idx].attempts.contains(&r.attempt_id);
                    if !ours
                        && !matches!(r.phase, AttemptPhase::Finished(_))
                        && !self.agents[idx].zombies.contains_key(&r.attempt_id)
                    {
                        self.track_zombie(idx, r.attempt_id, &r.gpu_uuids);
                    }
                }
                self.reindex(idx);
            }
            AgentMsg::AttemptStarted { attempt_id, .. } => {
                if self.agents[idx].attempts.contains(&attempt_id) {
                    self.mark_started(now_ms, attempt_id);
                }
            }
            AgentMsg::Progress { attempt_id, step, total } => {
                if let Some(att) = self.live.get(&attempt_id) {
                    if let Some(job) = self.jobs.get_mut(&att.job_id) {
                        job.progress = Some((step, total));
                    }
                }
            }
            AgentMsg::LogChunk(_) => {} // Logs go to the shell's log files; they decide nothing.
            AgentMsg::AttemptFinished { attempt_id, outcome } => {
                if self.agents[idx].attempts.contains(&attempt_id) {
                    self.attempt_ended(now_ms, attempt_id, outcome);
                } else {
                    if self.agents[idx].zombies.contains_key(&attempt_id) {
                        self.release_zombie(idx, attempt_id);
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
                    now_ms,
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
                self.event(
                    now_ms,
                    None,
                    None,
                    Some(name),
                    "gpu_recovered",
                    format!("GPU {gpu_uuid} back in scheduling"),
                );
            }
        }
        self.finish(now_ms, out);
    }

    /// A connection closed (or the shell gave up on it).
    pub fn on_disconnect(&mut self, now_ms: u64, conn: ConnId, out: &mut Vec<Output>) {
        if let Some(idx) = self.conn_agent.remove(&conn) {
            let agent = &mut self.agents[idx];
            agent.conn = None;
            if agent.health == Health::Up {
                // Unreachable is not failed: attempts stay until the grace period ends.
                agent.health = Health::Suspect;
            }
            let name = agent.name.clone();
            self.reindex(idx);
            self.event(
                now_ms,
                None,
                None,
                Some(name.clone()),
                "agent_disconnected",
                format!("agent {name} disconnected"),
            );
        }
        self.finish(now_ms, out);
    }

    /// Time passed: liveness of hosts, retry backoffs, then scheduling.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        for idx in 0..self.agents.len() {
            let silence = now_ms.saturating_sub(self.agents[idx].last_heard_ms);
            match self.agents[idx].health {
                Health::Lost => {}
                _ if silence >= self.config.lost_after_ms => self.agent_lost(now_ms, idx, silence),
                Health::Up if silence >= self.config.suspect_after_ms => {
                    self.agents[idx].health = Health::Suspect;
                    self.reindex(idx);
                    let name = self.agents[idx].name.clone();
                    self.event(
                        now_ms,
                        None,
                        None,
                        Some(name.clone()),
                        "agent_suspect",
                        format!("agent {name} silent for {silence} ms"),
                    );
                }
                _ => {}
            }
        }
        while let Some(&(at, id)) = self.backoff.first() {
            if at > now_ms {
                break;
            }
            self.backoff.remove(&(at, id));
            self.ready.insert(&self.jobs[&id].rec.spec, id);
            self.dirty = true;
        }
        self.finish(now_ms, out);
    }

    /// Runs a scheduling pass even if nothing changed (benchmarks, operator nudges).
    pub fn reschedule(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        self.dirty = true;
        self.finish(now_ms, out);
    }

    fn finish(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if self.dirty {
            self.dirty = false;
            self.schedule(now_ms);
        }
        if !self.ops.is_empty() {
            out.push(Output::Persist(std::mem::take(&mut self.ops)));
        }
        out.append(&mut self.sends);
    }

    // ---- scheduling ----

    fn schedule(&mut self, now_ms: u64) {
        // A job that finds no room reserves the host closest to fitting it, and
        // other jobs may not use that host: as its attempts end it drains towards
        // the waiting job while the rest of the cluster keeps backfilling. The
        // reservation is dropped when its job runs or ends, or its host can no
        // longer serve it (drained, lost, GPUs gone), so nobody waits on a host for nothing.
        if let Some((holder, host)) = self.reservation {
            let waiting = self.jobs.get(&holder).is_some_and(|j| j.live.is_none() && !j.rec.state.is_final());
            let spec = &self.jobs[&holder].rec.spec;
            if !waiting
                || !self.agents[host].schedulable()
                || !self.could_hold(host, spec.gpus, spec.min_free_vram_bytes)
            {
                self.reservation = None;
            }
        }
        // Shapes (GPUs, VRAM) that found no host this pass: any job at least as
        // demanding is skipped without searching, which keeps a pass cheap when
        // the queue is long and the cluster full.
        let mut failed: Vec<(u32, u64)> = Vec::new();
        let mut holder_tried = false;
        let mut cursor = self.ready.first();
        while let Some(key) = cursor {
            cursor = self.ready.after(key);
            if self.free_index.last().is_none_or(|&(free, _)| free == 0) {
                break;
            }
            let job_id = key.1;
            let spec = &self.jobs[&job_id].rec.spec;
            let shape = (spec.gpus, spec.min_free_vram_bytes);
            let is_holder = self.reservation.is_some_and(|(h, _)| h == job_id);
            if !is_holder && failed.iter().any(|&(g, v)| shape.0 >= g && shape.1 >= v) {
                continue;
            }
            let exclude = self.reservation.filter(|_| !is_holder).map(|(_, host)| host);
            match self.find_host(shape.0, shape.1, exclude) {
                Some((idx, gpus)) => {
                    self.ready.remove(&self.jobs[&job_id].rec.spec, job_id);
                    if is_holder {
                        self.reservation = None;
                    }
                    self.assign(now_ms, job_id, idx, gpus);
                }
                None => {
                    if is_holder {
                        holder_tried = true;
                    } else {
                        failed.push(shape);
                    }
                    // Every shape still queued is at least as demanding as one that
                    // just failed: nothing further can be placed (a long queue of
                    // VRAM-blocked jobs would otherwise be walked in full).
                    let hopeless =
                        self.ready.shapes.keys().all(|&(g, v)| failed.iter().any(|&(fg, fv)| g >= fg && v >= fv));
                    if hopeless && (self.reservation.is_none() || holder_tried) {
                        break;
                    }
                    if self.reservation.is_none() {
                        // Tried without exclusions: this job is the one to wait for.
                        self.reservation = self.reserve_for(shape.0, shape.1).map(|host| (job_id, host));
                        holder_tried = true;
                    }
                    // Nothing smaller exists; stop, unless the holder is still to come.
                    if (shape.0 == 0 || shape == (1, 0)) && holder_tried {
                        break;
                    }
                }
            }
        }
    }

    /// Whether a host could run a job of this shape once its GPUs are free.
    fn could_hold(&self, idx: usize, gpus: u32, min_vram: u64) -> bool {
        let capable = self.agents[idx].gpus.iter().filter(|g| g.healthy && g.info.total_vram_bytes >= min_vram).count();
        capable as u32 >= gpus
    }

    /// Best fit: the schedulable host with the fewest free GPUs that still has
    /// `gpus` healthy free ones with `min_vram` each; on it, the GPUs with most free VRAM.
    fn find_host(&self, gpus: u32, min_vram: u64, exclude: Option<usize>) -> Option<(usize, Vec<usize>)> {
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::DoubleBookGpus {
            let idx = self.agents.iter().position(|a| a.schedulable() && a.gpus.len() as u32 >= gpus)?;
            return Some((idx, (0..gpus as usize).collect()));
        }
        for &(free, idx) in self.free_index.range((gpus, 0)..) {
            debug_assert!(free >= gpus);
            if Some(idx) == exclude {
                continue;
            }
            let mut candidates: Vec<usize> = self.agents[idx]
                .gpus
                .iter()
                .enumerate()
                .filter(|(_, g)| g.holder.is_none() && g.healthy && g.free_vram_bytes >= min_vram)
                .map(|(i, _)| i)
                .collect();
            if candidates.len() as u32 >= gpus {
                let gpu_list = &self.agents[idx].gpus;
                candidates.sort_by_key(|&i| (Reverse(gpu_list[i].free_vram_bytes), i));
                candidates.truncate(gpus as usize);
                return Some((idx, candidates));
            }
        }
        None
    }

    /// The host a blocked job should wait for: among schedulable hosts that
    /// could hold it once empty, the one with most free GPUs. None if no host
    /// ever could (its VRAM need is beyond every GPU): reserving would idle a host for nothing.
    fn reserve_for(&self, gpus: u32, min_vram: u64) -> Option<usize> {
        self.free_index.iter().rev().map(|&(_, idx)| idx).find(|&idx| self.could_hold(idx, gpus, min_vram))
    }

    fn assign(&mut self, now_ms: u64, job_id: JobId, idx: usize, gpus: Vec<usize>) {
        let att_id = AttemptId(self.next_attempt_id);
        self.next_attempt_id += 1;
        let agent = &mut self.agents[idx];
        let gpu_uuids: Vec<String> = gpus.iter().map(|&i| agent.gpus[i].info.uuid.clone()).collect();
        for &i in &gpus {
            agent.gpus[i].holder = Some(att_id);
        }
        agent.attempts.insert(att_id);
        let conn = agent.conn.expect("schedulable agents are connected");
        let agent_name = agent.name.clone();
        self.reindex(idx);
        let att = AttemptRecord {
            id: att_id,
            job_id,
            agent: agent_name.clone(),
            gpu_uuids: gpu_uuids.clone(),
            epoch: self.epoch,
            state: AttemptState::Assigned,
            assigned_ms: now_ms,
            started_ms: None,
            ended_ms: None,
            exit_code: None,
            reason: None,
        };
        self.ops.push(StoreOp::PutAttempt(att.clone()));
        self.live.insert(att_id, att);
        let job = self.jobs.get_mut(&job_id).expect("queued jobs exist");
        job.live = Some(att_id);
        job.progress = None;
        job.rec.state = JobState::Assigned;
        job.rec.agent = Some(agent_name.clone());
        let spec = job.rec.spec.clone();
        self.put_job(job_id);
        self.event(
            now_ms,
            Some(job_id),
            Some(att_id),
            Some(agent_name),
            "assigned",
            format!("GPUs {}", gpu_uuids.join(",")),
        );
        self.sends.push(Output::Send {
            conn,
            msg: ControllerMsg::Assign(Box::new(Assign {
                epoch: self.epoch,
                attempt_id: att_id,
                job_id,
                spec,
                gpu_uuids,
                trace: TraceContext::default(),
            })),
        });
    }

    // ---- attempts and jobs ----

    fn mark_started(&mut self, now_ms: u64, att_id: AttemptId) {
        let Some(att) = self.live.get_mut(&att_id) else { return };
        if att.state != AttemptState::Assigned {
            return;
        }
        att.state = AttemptState::Running;
        att.started_ms = Some(now_ms);
        let att = att.clone();
        self.ops.push(StoreOp::PutAttempt(att.clone()));
        let job = self.jobs.get_mut(&att.job_id).expect("attempts belong to jobs");
        if job.rec.state == JobState::Assigned {
            job.rec.state = JobState::Running;
            self.put_job(att.job_id);
        }
    }

    fn stop_attempt(&mut self, now_ms: u64, att_id: AttemptId) {
        let Some(att) = self.live.get_mut(&att_id) else { return };
        att.state = AttemptState::Stopping;
        let att = att.clone();
        self.ops.push(StoreOp::PutAttempt(att.clone()));
        self.event(now_ms, Some(att.job_id), Some(att_id), Some(att.agent.clone()), "stopping", "cancel sent".into());
        if let Some(conn) = self.agent_by_name.get(&att.agent).and_then(|&i| self.agents[i].conn) {
            self.sends.push(Output::Send {
                conn,
                msg: ControllerMsg::Cancel { attempt_id: att_id, grace_ms: self.config.cancel_grace_ms },
            });
        }
    }

    /// A live attempt ended: free its GPUs and decide what becomes of its job.
    fn attempt_ended(&mut self, now_ms: u64, att_id: AttemptId, outcome: AttemptOutcome) {
        let Some(mut att) = self.live.remove(&att_id) else { return };
        // A success that does not carry every required output (e.g. reported by an
        // agent restarted after the job ended, which no longer knows what it made)
        // would leave the user nothing to download: run it again instead.
        let outcome = match (outcome, self.jobs.get(&att.job_id)) {
            (AttemptOutcome::Succeeded { outputs }, Some(job)) => {
                let missing: Vec<&str> = job
                    .rec
                    .spec
                    .outputs
                    .iter()
                    .filter(|o| o.required && !outputs.iter().any(|r| r.path == o.path))
                    .map(|o| o.path.as_str())
                    .collect();
                if missing.is_empty() {
                    AttemptOutcome::Succeeded { outputs }
                } else {
                    AttemptOutcome::Failed {
                        exit_code: Some(0),
                        reason: format!(
                            "exited 0 but its required outputs did not reach the controller: {}",
                            missing.join(", ")
                        ),
                        retryable: true,
                    }
                }
            }
            (outcome, _) => outcome,
        };
        if let Some(&idx) = self.agent_by_name.get(&att.agent) {
            let agent = &mut self.agents[idx];
            agent.attempts.remove(&att_id);
            for g in agent.gpus.iter_mut().filter(|g| g.holder == Some(att_id)) {
                g.holder = None;
            }
            self.reindex(idx);
        }
        self.dirty = true;
        att.ended_ms = Some(now_ms);
        let job_id = att.job_id;
        let job = self.jobs.get_mut(&job_id).expect("attempts belong to jobs");
        job.live = None;
        let (attempt_state, reason) = match &outcome {
            AttemptOutcome::Succeeded { .. } => (AttemptState::Succeeded, None),
            AttemptOutcome::Failed { exit_code, reason, .. } => {
                att.exit_code = *exit_code;
                (AttemptState::Failed, Some(reason.clone()))
            }
            AttemptOutcome::Cancelled => (AttemptState::Cancelled, None),
            AttemptOutcome::Lost { reason } => (AttemptState::Lost, Some(reason.clone())),
            AttemptOutcome::Rejected { reason } => (AttemptState::Rejected, Some(reason.clone())),
        };
        att.state = attempt_state;
        att.reason = reason.clone();
        self.ops.push(StoreOp::PutAttempt(att.clone()));
        self.event(
            now_ms,
            Some(job_id),
            Some(att_id),
            Some(att.agent.clone()),
            attempt_state.as_str(),
            reason.clone().unwrap_or_default(),
        );

        let job = self.jobs.get_mut(&job_id).expect("attempts belong to jobs");
        if job.rec.state.is_final() {
            return;
        }
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::SucceedTwice
            && matches!(outcome, AttemptOutcome::Succeeded { .. })
            && job.rec.exit_code != Some(0)
        {
            // The broken version: a success is mistaken for a reason to run again.
            job.rec.exit_code = Some(0);
            job.rec.state = JobState::Queued;
            self.put_job(job_id);
            self.enqueue_or_wait(job_id);
            return;
        }
        match outcome {
            AttemptOutcome::Succeeded { outputs } => {
                job.rec.outputs = outputs;
                job.rec.exit_code = Some(0);
                self.conclude(now_ms, job_id, JobState::Succeeded, Some(0), None);
            }
            _ if job.rec.cancel_requested => {
                self.conclude(now_ms, job_id, JobState::Cancelled, att.exit_code, Some("cancelled by user".into()));
            }
            AttemptOutcome::Failed { exit_code, reason, retryable } => {
                job.rec.attempts_used += 1;
                let used = job.rec.attempts_used;
                if retryable && used < job.rec.spec.max_attempts {
                    let shift = (used - 1).min(20);
                    let delay = self
                        .config
                        .retry_backoff_base_ms
                        .saturating_mul(1 << shift)
                        .min(self.config.retry_backoff_max_ms);
                    job.rec.state = JobState::Retrying;
                    job.rec.not_before_ms = now_ms + delay;
                    job.rec.exit_code = exit_code;
                    job.rec.error = Some(format!("attempt {used} failed: {reason}; retrying in {delay} ms"));
                    self.put_job(job_id);
                    self.enqueue_or_wait(job_id);
                } else {
                    let why = if retryable {
                        format!("{reason} (after {used} of {} attempts)", job.rec.spec.max_attempts)
                    } else {
                        format!("{reason} (not retryable)")
                    };
                    self.conclude(now_ms, job_id, JobState::Failed, exit_code, Some(why));
                }
            }
            AttemptOutcome::Cancelled | AttemptOutcome::Lost { .. } | AttemptOutcome::Rejected { .. } => {
                job.rec.attempts_lost += 1;
                if job.rec.attempts_lost > self.config.max_lost_attempts {
                    let why = format!(
                        "lost or refused {} times; last: {}",
                        job.rec.attempts_lost,
                        reason.unwrap_or_default()
                    );
                    self.conclude(now_ms, job_id, JobState::Failed, None, Some(why));
                } else {
                    job.rec.state = JobState::Queued;
                    self.put_job(job_id);
                    self.enqueue_or_wait(job_id);
                }
            }
        }
    }

    fn conclude(&mut self, now_ms: u64, job_id: JobId, state: JobState, exit_code: Option<i32>, error: Option<String>) {
        let job = self.jobs.get_mut(&job_id).expect("concluded jobs exist");
        job.rec.state = state;
        job.rec.exit_code = exit_code.or(job.rec.exit_code);
        job.rec.error = error.clone();
        job.rec.finished_ms = Some(now_ms);
        self.put_job(job_id);
        self.event(now_ms, Some(job_id), None, None, state.as_str(), error.unwrap_or_default());
    }

    fn enqueue_or_wait(&mut self, job_id: JobId) {
        let rec = &self.jobs[&job_id].rec;
        if rec.not_before_ms > 0 && rec.state == JobState::Retrying {
            self.backoff.insert((rec.not_before_ms, job_id));
        } else {
            self.ready.insert(&rec.spec, job_id);
        }
        self.dirty = true;
    }

    fn agent_lost(&mut self, now_ms: u64, idx: usize, silence_ms: u64) {
        let name = self.agents[idx].name.clone();
        self.agents[idx].health = Health::Lost;
        self.reindex(idx);
        // Whatever it says from now on must come through a new connection and
        // its reconciliation, so the attempts given up here get fenced off.
        if let Some(conn) = self.agents[idx].conn.take() {
            self.conn_agent.remove(&conn);
            self.sends.push(Output::Close { conn });
        }
        self.event(
            now_ms,
            None,
            None,
            Some(name.clone()),
            "agent_lost",
            format!("agent {name} silent for {silence_ms} ms; its attempts are re-queued"),
        );
        let attempts: Vec<AttemptId> = self.agents[idx].attempts.iter().copied().collect();
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::ForgetLostAttempts {
            self.agents[idx].attempts.clear();
            for a in attempts {
                self.live.remove(&a);
            }
            return;
        }
        for att_id in attempts {
            let reason = format!("agent {name} was lost (silent for {silence_ms} ms)");
            self.attempt_ended(now_ms, att_id, AttemptOutcome::Lost { reason });
        }
        // Whatever it still runs will be fenced off when it reconnects.
        self.agents[idx].zombies.clear();
        for g in &mut self.agents[idx].gpus {
            g.holder = None;
        }
    }

    fn track_zombie(&mut self, idx: usize, att_id: AttemptId, gpu_uuids: &[String]) {
        let agent = &mut self.agents[idx];
        let gpus: Vec<usize> =
            gpu_uuids.iter().filter_map(|u| agent.gpus.iter().position(|g| &g.info.uuid == u)).collect();
        for &i in &gpus {
            if agent.gpus[i].holder.is_none() {
                agent.gpus[i].holder = Some(att_id);
            }
        }
        agent.zombies.insert(att_id, gpus);
        if let Some(conn) = agent.conn {
            self.sends.push(Output::Send {
                conn,
                msg: ControllerMsg::Cancel { attempt_id: att_id, grace_ms: self.config.cancel_grace_ms },
            });
        }
    }

    fn release_zombie(&mut self, idx: usize, att_id: AttemptId) {
        if let Some(gpus) = self.agents[idx].zombies.remove(&att_id) {
            for i in gpus {
                if self.agents[idx].gpus[i].holder == Some(att_id) {
                    self.agents[idx].gpus[i].holder = None;
                }
            }
            self.dirty = true;
        }
    }

    fn heard(&mut self, now_ms: u64, idx: usize) {
        let agent = &mut self.agents[idx];
        agent.last_heard_ms = now_ms;
        if agent.health == Health::Suspect && agent.conn.is_some() {
            self.agents[idx].health = Health::Up;
            self.reindex(idx);
            self.dirty = true;
        }
    }

    // ---- bookkeeping ----

    fn agent_index(&mut self, name: &str, now_ms: u64) -> usize {
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
            last_heard_ms: now_ms,
            health: Health::Suspect,
            zombies: BTreeMap::new(),
            attempts: BTreeSet::new(),
            indexed_free: None,
            unhealthy: None,
        });
        self.agent_by_name.insert(name.to_string(), idx);
        idx
    }

    /// Puts a host under its current free-GPU count in the placement index,
    /// or takes it out if it is not schedulable. Call after any change to it.
    fn reindex(&mut self, idx: usize) {
        let agent = &mut self.agents[idx];
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
        self.ops.push(StoreOp::PutJob(Box::new(self.jobs[&id].rec.clone())));
    }

    fn event(
        &mut self,
        at_ms: u64,
        job_id: Option<JobId>,
        attempt_id: Option<AttemptId>,
        agent: Option<String>,
        kind: &str,
        detail: String,
    ) {
        self.ops.push(StoreOp::Event(EventRecord { at_ms, job_id, attempt_id, agent, kind: kind.to_string(), detail }));
    }

    // ---- read-only views ----

    /// A job's record, progress (step, total) and live attempt.
    pub fn job(&self, id: JobId) -> Option<(&JobRecord, Option<(u32, u32)>, Option<&AttemptRecord>)> {
        self.jobs.get(&id).map(|j| (&j.rec, j.progress, j.live.and_then(|a| self.live.get(&a))))
    }

    /// A live attempt.
    pub fn attempt(&self, id: AttemptId) -> Option<&AttemptRecord> {
        self.live.get(&id)
    }

    /// Every job, in id order.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values().map(|j| &j.rec)
    }

    /// Every live attempt.
    pub fn live_attempts(&self) -> impl Iterator<Item = &AttemptRecord> {
        self.live.values()
    }

    /// Jobs waiting for GPUs or a retry.
    pub fn queue_depth(&self) -> usize {
        self.ready.len() + self.backoff.len()
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

    /// Checks the core's internal consistency; the simulator calls it after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut holders: HashMap<(&str, &str), AttemptId> = HashMap::new();
        for att in self.live.values() {
            for uuid in &att.gpu_uuids {
                if let Some(other) = holders.insert((att.agent.as_str(), uuid.as_str()), att.id) {
                    return Err(format!("GPU {uuid} on {} given to live attempts {other} and {}", att.agent, att.id));
                }
            }
            let job = self.jobs.get(&att.job_id).ok_or_else(|| format!("live attempt {} has no job", att.id))?;
            if job.live != Some(att.id) {
                return Err(format!("job {} does not point at its live attempt {}", att.job_id, att.id));
            }
        }
        for job in self.jobs.values() {
            let id = job.rec.id;
            if let Some(att) = job.live {
                if !self.live.contains_key(&att) {
                    return Err(format!("job {id} is lost: it waits on attempt {att}, which nothing tracks any more"));
                }
            }
            let queued = self.ready.contains(&job.rec.spec, id) || self.backoff.contains(&(job.rec.not_before_ms, id));
            match (job.rec.state.is_final(), job.live, queued) {
                (true, None, false) | (false, Some(_), false) | (false, None, true) => {}
                other => {
                    return Err(format!("job {id} in state {:?} has (final, live, queued) = {other:?}", job.rec.state));
                }
            }
        }
        let mut shapes: BTreeMap<(u32, u64), usize> = BTreeMap::new();
        for &(_, id) in &self.ready.order {
            let spec = &self.jobs[&id].rec.spec;
            *shapes.entry((spec.gpus, spec.min_free_vram_bytes)).or_insert(0) += 1;
        }
        if shapes != self.ready.shapes {
            return Err(format!("ready queue shape counts {:?} do not match its jobs {shapes:?}", self.ready.shapes));
        }
        for (idx, agent) in self.agents.iter().enumerate() {
            let indexed: Vec<u32> = self.free_index.iter().filter(|&&(_, i)| i == idx).map(|&(f, _)| f).collect();
            let expected: Vec<u32> = if agent.schedulable() { vec![agent.free_gpus()] } else { vec![] };
            if indexed != expected {
                return Err(format!("agent {} indexed with free GPUs {indexed:?}, expected {expected:?}", agent.name));
            }
        }
        Ok(())
    }
}

/// Jobs waiting for GPUs, by priority then submission order, with a count of
/// each (GPUs, VRAM) shape among them so a pass knows when nothing can fit.
#[derive(Default)]
struct ReadyQueue {
    order: BTreeSet<(Reverse<i32>, JobId)>,
    shapes: BTreeMap<(u32, u64), usize>,
}

impl ReadyQueue {
    fn insert(&mut self, spec: &JobSpec, id: JobId) {
        if self.order.insert((Reverse(spec.priority), id)) {
            *self.shapes.entry((spec.gpus, spec.min_free_vram_bytes)).or_insert(0) += 1;
        }
    }

    fn remove(&mut self, spec: &JobSpec, id: JobId) {
        if self.order.remove(&(Reverse(spec.priority), id)) {
            let shape = (spec.gpus, spec.min_free_vram_bytes);
            if let Some(n) = self.shapes.get_mut(&shape) {
                *n -= 1;
                if *n == 0 {
                    self.shapes.remove(&shape);
                }
            }
        }
    }

    fn contains(&self, spec: &JobSpec, id: JobId) -> bool {
        self.order.contains(&(Reverse(spec.priority), id))
    }

    fn first(&self) -> Option<(Reverse<i32>, JobId)> {
        self.order.first().copied()
    }

    fn after(&self, key: (Reverse<i32>, JobId)) -> Option<(Reverse<i32>, JobId)> {
        self.order.range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded)).next().copied()
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

fn new_gpu(info: GpuInfo) -> Gpu {
    let free = info.total_vram_bytes;
    Gpu { info, free_vram_bytes: free, healthy: true, holder: None, quarantine: None }
}
