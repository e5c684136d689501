//! The core in an actix actor: every input goes through it, one at a time,
//! and its outputs are performed in the order the core gave them. Sends,
//! closes and replies that follow a persist wait until the store writer
//! reports that persist durable (see [`crate::gate`]), so nobody observes a
//! decision the store could still lose.

use crate::core::{AgentView, CommandError, ConnId, Core, HeldBlobs, Now, Output, SubmitError};
use crate::events::EventLog;
use crate::gate::Gate;
use crate::metrics::{Metrics, OutcomeLabel, ReasonLabel, StateLabel};
use crate::records::{AttemptState, JobRecord, JobState, StoreOp};
use crate::shared::Clock;
use crate::trace::JobTracer;
use actix::prelude::*;
use cosmos_proto::{AgentMsg, AttemptId, ControllerMsg, JobId, JobSpec};
use cosmos_sync::{CommitQueue, Ticket};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Where an agent connection comes from, in words (`10.0.0.5:41234`,
/// `ssh://ops@gpu-3:22`): the actor never needs to know the transport.
pub(crate) type Peer = Arc<str>;

enum Action {
    Send(ConnId, ControllerMsg),
    Close(ConnId),
    Reply(Box<dyn FnOnce() + Send>),
    /// A job's new state (or progress), for waiting clients: published once it is durable.
    Publish(Arc<JobSummary>),
}

/// Owns the core; every input goes through it, one at a time.
pub struct CoreActor {
    core: Core,
    clock: Clock,
    queue: Arc<CommitQueue<StoreOp>>,
    /// Actions waiting for their persist to be durable, in order.
    gate: Gate<Ticket, Action>,
    conns: HashMap<ConnId, mpsc::Sender<ControllerMsg>>,
    /// Where each agent connection comes from and its process's incarnation,
    /// to refuse another process under its name, naming where it is.
    peers: HashMap<ConnId, (Peer, u64)>,
    /// Names whose handshake passed but whose connection is not yet registered, by name.
    claims: HashMap<String, Claim>,
    /// Cosmos runs by run id (the `cosmos.run` label), so a run is found without listing every job.
    runs: HashMap<String, JobId>,
    /// The wake-up armed for the core's next deadline, and when it is due (monotonic ms).
    timer: Option<(u64, SpawnHandle)>,
    /// Where durable changes of jobs go for clients that wait on them.
    events: Arc<EventLog<JobSummary>>,
    /// Derives each job's trace from what is persisted; `None` while traces are not exported.
    tracer: Option<JobTracer>,
    metrics: Arc<Metrics>,
    /// Each agent's GPUs as its last heartbeat reported them, for `/metrics`.
    gpu_usage: HashMap<String, Vec<cosmos_proto::GpuUsage>>,
}

impl CoreActor {
    /// An actor for `core`, persisting through `queue` (whose writer reports durability as `Durable`),
    /// publishing jobs' durable changes to `events`, counting into `metrics` and, with a tracer,
    /// exporting each job's trace.
    pub fn new(
        core: Core,
        clock: Clock,
        queue: Arc<CommitQueue<StoreOp>>,
        events: Arc<EventLog<JobSummary>>,
        metrics: Arc<Metrics>,
        tracer: Option<JobTracer>,
    ) -> CoreActor {
        let runs = core
            .jobs()
            .filter_map(|j| j.spec.labels.get(crate::cosmos::labels::RUN).map(|r| (r.clone(), j.id)))
            .collect();
        CoreActor {
            core,
            clock,
            queue,
            gate: Gate::new(),
            conns: HashMap::new(),
            peers: HashMap::new(),
            claims: HashMap::new(),
            runs,
            timer: None,
            events,
            tracer,
            metrics,
            gpu_usage: HashMap::new(),
        }
    }

    /// Runs one input through the core, timing it when it ran a scheduling pass.
    fn timed<R>(&mut self, f: impl FnOnce(&mut Core, Now) -> R) -> R {
        let passes = self.core.passes();
        let start = std::time::Instant::now();
        let r = f(&mut self.core, self.clock.now());
        if self.core.passes() != passes {
            self.metrics.scheduling_pass.observe(start.elapsed().as_secs_f64());
        }
        r
    }

    /// Counts and traces what is about to be persisted.
    fn observe(&mut self, ops: &[StoreOp]) {
        let now = self.clock.now();
        // Attempts that ended in this batch, by job: what a job queued again in it ran again for.
        let mut ended: Vec<(JobId, AttemptState)> = Vec::new();
        for op in ops {
            match op {
                StoreOp::PutAttempt(att) if !att.state.is_live() => {
                    self.metrics.attempts.get_or_create(&OutcomeLabel { outcome: att.state.as_str() }).inc();
                    ended.push((att.job_id, att.state));
                }
                StoreOp::PutAttempt(att) if att.state == AttemptState::Running => {
                    if let Some((rec, _, _)) = self.core.job(att.job_id) {
                        // Only the job's first start: later attempts do not move its submit-to-start.
                        if let (Some(start), true) = (att.started_ms, rec.started_ms == att.started_ms) {
                            let ms = start.saturating_sub(rec.submitted_ms);
                            self.metrics.submit_to_start.observe(ms as f64 / 1_000.0);
                        }
                    }
                }
                StoreOp::PutJob(rec) if matches!(rec.state, JobState::Retrying | JobState::Queued) => {
                    if let Some(&(_, st)) = ended.iter().find(|(j, _)| *j == rec.id) {
                        let reason = match st {
                            AttemptState::Lost => "lost",
                            AttemptState::Rejected => "rejected",
                            AttemptState::Cancelled => "cancelled",
                            _ => "failed",
                        };
                        self.metrics.retries.get_or_create(&ReasonLabel { reason }).inc();
                    }
                }
                StoreOp::Event(e) if e.job_id.is_some() && e.attempt_id.is_none() => match e.kind.as_str() {
                    "retried" => {
                        self.metrics.retries.get_or_create(&ReasonLabel { reason: "operator" }).inc();
                    }
                    kind => {
                        if let Some(state) = JobState::parse(kind).filter(|s| s.is_final()) {
                            self.metrics.jobs_finished.get_or_create(&StateLabel { state: state.as_str() }).inc();
                        }
                    }
                },
                _ => {}
            }
        }
        if let Some(t) = &mut self.tracer {
            t.persisted(ops, &self.core, now);
        }
    }

    /// What `/metrics` shows of the core now.
    fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        let agents = self
            .core
            .agents()
            .into_iter()
            .map(|a| {
                let usage = self.gpu_usage.get(&a.name);
                let gpus = a
                    .gpus
                    .iter()
                    .map(|(info, _, healthy, _)| {
                        let u = usage.and_then(|us| us.iter().find(|u| u.uuid == info.uuid)).cloned();
                        let quarantined = !healthy || a.gpu_quarantine.contains_key(&info.uuid);
                        (info.clone(), u, quarantined)
                    })
                    .collect();
                crate::metrics::AgentGpus { name: a.name, health: a.health.as_str(), draining: a.draining, gpus }
            })
            .collect();
        // The core's per-state counts, kept as jobs change state: no walk of the jobs, no query.
        let jobs = self.core.job_counts().map(|(s, n)| (s, n as u64)).collect();
        crate::metrics::Snapshot { jobs, queue_depth: self.core.queue_depth() as u64, agents }
    }

    fn summary(&self, id: JobId) -> Option<JobSummary> {
        self.core.job(id).map(|(rec, progress, att)| JobSummary {
            record: rec.clone(),
            progress,
            gpus: att.map(|a| a.gpu_uuids.clone()).unwrap_or_default(),
            waiting: self.core.wait_reason(id),
        })
    }
}

impl Actor for CoreActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.arm(ctx);
    }
}

impl CoreActor {
    /// Arms a wake-up for the core's next deadline, unless one as early is armed:
    /// the actor sleeps until the core has work or an input comes, with no fixed tick.
    fn arm(&mut self, ctx: &mut Context<Self>) {
        let Some(due_ms) = self.core.next_deadline_ms() else { return };
        if let Some((armed_ms, handle)) = self.timer {
            if armed_ms <= due_ms {
                return;
            }
            ctx.cancel_future(handle);
        }
        let delay_ms = due_ms.saturating_sub(self.clock.now().mono_ms);
        let handle = ctx.run_later(Duration::from_millis(delay_ms), |actor, ctx| {
            actor.timer = None;
            let mut out = Vec::new();
            actor.timed(|core, now| core.tick(now, &mut out));
            actor.perform(out, None);
            actor.arm(ctx);
        });
        self.timer = Some((due_ms, handle));
    }
}

impl CoreActor {
    /// A succeeded prompt enhancement whose delivered stdout holds no
    /// `Upsampled prompt:` line has no result: it fails, terminally, saying so.
    /// (The core fails a success whose outputs are not in the blob store itself.)
    fn guard_run_outcome(
        &self,
        attempt_id: AttemptId,
        outcome: &mut cosmos_proto::AttemptOutcome,
        facts: &OutputFacts,
    ) {
        use crate::cosmos::{ENHANCE_RESULT, RunKind, UPSAMPLED_PREFIX, labels};
        let cosmos_proto::AttemptOutcome::Succeeded { outputs } = &*outcome else { return };
        let Some(job) = self.core.attempt(attempt_id).and_then(|a| self.core.job(a.job_id)).map(|(j, _, _)| j) else {
            return;
        };
        if job.spec.labels.get(labels::KIND).map(String::as_str) != Some(RunKind::Enhance.as_str()) {
            return;
        }
        let problem = match outputs.iter().find(|o| o.path == ENHANCE_RESULT) {
            None => format!("delivered no {ENHANCE_RESULT}"),
            Some(o) => match facts.upsampled.get(&o.sha256) {
                // Not in the blob store: the core turns the success into a retryable failure.
                None => return,
                Some(Ok(true)) => return,
                Some(Ok(false)) => {
                    format!("printed no `{}` line with text on its standard output", UPSAMPLED_PREFIX.trim_end())
                }
                Some(Err(e)) => format!("delivered a standard output the controller cannot read ({e})"),
            },
        };
        *outcome = cosmos_proto::AttemptOutcome::Failed {
            exit_code: Some(0),
            reason: format!(
                "the prompt upsampler exited 0 but {problem}, so there is no enhanced prompt; \
                 its logs say why (`cosmos jobs logs {}`)",
                job.id
            ),
            retry: cosmos_proto::Retry::Terminal,
        };
    }

    /// [`Self::guard_run_outcome`] for the finished attempts of a hello.
    fn guard_run_reports(&self, reports: &mut [cosmos_proto::AttemptReport], facts: &OutputFacts) {
        for r in reports {
            if let cosmos_proto::AttemptPhase::Finished(outcome) = &mut r.phase {
                self.guard_run_outcome(r.attempt_id, outcome, facts);
            }
        }
    }

    /// Performs the core's outputs; `reply` runs once everything before it is durable.
    fn perform(&mut self, out: Vec<Output>, reply: Option<Box<dyn FnOnce() + Send>>) {
        let mut actions = Vec::new();
        let mut changed: Vec<JobId> = Vec::new();
        for o in out {
            match o {
                Output::Persist(ops) => {
                    changed.extend(ops.iter().filter_map(|op| match op {
                        StoreOp::PutJob(rec) => Some(rec.id),
                        _ => None,
                    }));
                    self.observe(&ops);
                    match self.queue.push(ops) {
                        Ok(t) => self.gate.persisted(t),
                        Err(_) => tracing::error!("store writer has stopped; decisions are not persisted"),
                    }
                }
                Output::Send { conn, mut msg } => {
                    if let (ControllerMsg::Assign(a), Some(t)) = (&mut msg, &self.tracer) {
                        a.trace = t.context(a.job_id, a.attempt_id);
                    }
                    actions.push(Action::Send(conn, msg))
                }
                Output::Close { conn } => actions.push(Action::Close(conn)),
            }
        }
        changed.extend(self.core.drain_progressed());
        // As they stand now, which is what the persists above make durable.
        actions.extend(changed.into_iter().filter_map(|id| self.summary(id)).map(|s| Action::Publish(Arc::new(s))));
        actions.extend(reply.map(Action::Reply));
        // Actions wait for the latest persist, and for every action gated before them,
        // so messages on one connection keep their order.
        let durable = self.queue.durable();
        for action in actions {
            if let Some(action) = self.gate.admit(action, Some(durable)) {
                self.act(action);
            }
        }
    }

    /// Runs an operator command; the receiver fires once its effects are durable.
    fn command(
        &mut self,
        f: impl FnOnce(&mut Core, Now, &mut Vec<Output>) -> Result<(), CommandError>,
    ) -> Result<oneshot::Receiver<()>, CommandError> {
        let mut out = Vec::new();
        self.timed(|core, now| f(core, now, &mut out))?;
        let (tx, rx) = oneshot::channel();
        self.perform(
            out,
            Some(Box::new(move || {
                let _ = tx.send(());
            })),
        );
        Ok(rx)
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Send(conn, msg) => {
                if let Some(tx) = self.conns.get(&conn) {
                    if tx.try_send(msg).is_err() {
                        // A full queue means the agent stopped reading: drop it, it will reconnect.
                        tracing::warn!(conn, "agent connection is not keeping up; closing it");
                        self.conns.remove(&conn);
                    }
                }
            }
            Action::Close(conn) => {
                self.forget(conn);
            }
            Action::Reply(f) => f(),
            Action::Publish(job) => self.events.push(job),
        }
    }
}

/// The store failed: what waits on a persist will never be sent or answered, so it is dropped
/// (API handlers waiting on it answer 503), and no decision is acted on any more.
pub(crate) struct StoreFailed;
impl Message for StoreFailed {
    type Result = ();
}
impl Handler<StoreFailed> for CoreActor {
    type Result = ();
    fn handle(&mut self, _: StoreFailed, ctx: &mut Context<Self>) {
        self.gate.clear();
        self.conns.clear();
        ctx.stop();
    }
}

/// Finished jobs that ended before a time (controller wall clock, ms) and that no unfinished job names.
pub struct Prunable(pub u64);
impl Message for Prunable {
    type Result = Vec<JobId>;
}
impl Handler<Prunable> for CoreActor {
    type Result = MessageResult<Prunable>;
    fn handle(&mut self, Prunable(before_ms): Prunable, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.core.prunable(before_ms))
    }
}

/// Remove those of `jobs` still prunable before `before_ms`; answers them once durable.
pub struct Prune {
    /// The candidates.
    pub jobs: Vec<JobId>,
    /// The cutoff they must have finished before.
    pub before_ms: u64,
}
impl Message for Prune {
    type Result = oneshot::Receiver<Vec<JobId>>;
}
impl Handler<Prune> for CoreActor {
    type Result = MessageResult<Prune>;
    fn handle(&mut self, Prune { jobs, before_ms }: Prune, ctx: &mut Context<Self>) -> Self::Result {
        let mut out = Vec::new();
        let pruned = self.core.prune(self.clock.now(), &jobs, before_ms, &mut out);
        self.runs.retain(|_, j| !pruned.contains(j));
        let (tx, rx) = oneshot::channel();
        self.perform(out, Some(Box::new(move || drop(tx.send(pruned)))));
        self.arm(ctx);
        MessageResult(rx)
    }
}

/// The controller stops: what is durable already is sent, every agent
/// connection is closed and the actor stops deciding. Answers how many
/// connections it closed.
pub struct Stop;
impl Message for Stop {
    type Result = usize;
}
impl Handler<Stop> for CoreActor {
    type Result = usize;
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) -> usize {
        for action in self.gate.durable(self.queue.durable()) {
            self.act(action);
        }
        let closed = self.conns.len();
        // Dropping a connection's sender ends its writer, which sends what it holds and closes.
        self.conns.clear();
        self.peers.clear();
        ctx.stop();
        closed
    }
}

pub(crate) struct Durable(pub(crate) Ticket);
impl Message for Durable {
    type Result = ();
}
impl Handler<Durable> for CoreActor {
    type Result = ();
    fn handle(&mut self, Durable(t): Durable, _: &mut Context<Self>) {
        for action in self.gate.durable(t) {
            self.act(action);
        }
    }
}

/// What a durable submission answers: its jobs, and whether it repeated an earlier one (same idempotency key).
pub type Submitted = (Vec<JobId>, bool);

/// Submit a batch together with records that must be stored in the same
/// transaction (the prompts a batch of runs creates), under an optional
/// idempotency key; answers once durable. A repeat stores nothing.
pub struct SubmitWith {
    /// The jobs.
    pub specs: Vec<JobSpec>,
    /// Records stored in the same transaction.
    pub extra: Vec<StoreOp>,
    /// The submission's idempotency key.
    pub key: Option<crate::records::Idempotency>,
    /// Per job, the jobs that must succeed first.
    pub after: Vec<Vec<JobId>>,
    /// Per job, inputs it takes from the outputs of jobs that must succeed first.
    pub inputs_from: Vec<Vec<crate::core::InputFromDep>>,
}
impl Message for SubmitWith {
    type Result = Result<oneshot::Receiver<Submitted>, SubmitError>;
}
impl Handler<SubmitWith> for CoreActor {
    type Result = Result<oneshot::Receiver<Submitted>, SubmitError>;
    fn handle(&mut self, msg: SubmitWith, ctx: &mut Context<Self>) -> Self::Result {
        let SubmitWith { specs, extra, key, after, inputs_from } = msg;
        let mut out = Vec::new();
        let opts = crate::core::SubmitOptions { key, extra, after, inputs_from };
        let received_ms = self.clock.now().wall_ms;
        let (ids, repeat) = self.timed(|core, now| core.submit_with(now, specs, opts, &mut out))?;
        if !repeat {
            self.metrics.jobs_submitted.inc_by(ids.len() as u64);
        }
        for &id in &ids {
            if let Some(run) = self.core.job(id).and_then(|(rec, _, _)| rec.spec.labels.get(crate::cosmos::labels::RUN))
            {
                self.runs.insert(run.clone(), id);
            }
        }
        let (tx, rx) = oneshot::channel();
        let spans = self.tracer.as_ref().map(|t| t.submitted(&ids, repeat, received_ms));
        self.perform(
            out,
            Some(Box::new(move || {
                drop(tx.send((ids, repeat)));
                if let Some(spans) = spans {
                    spans(crate::shared::wall_ms());
                }
            })),
        );
        self.arm(ctx);
        Ok(rx)
    }
}

/// Store records the core does not keep (Cosmos prompts) through the one
/// writer, ordered after every decision before them; answers once durable.
pub struct Persist(pub Vec<StoreOp>);
impl Message for Persist {
    type Result = oneshot::Receiver<()>;
}
impl Handler<Persist> for CoreActor {
    type Result = MessageResult<Persist>;
    fn handle(&mut self, Persist(ops): Persist, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.perform(
            vec![Output::Persist(ops)],
            Some(Box::new(move || {
                let _ = tx.send(());
            })),
        );
        MessageResult(rx)
    }
}

/// Cancel a job; answers once the decision is durable.
pub struct Cancel(pub JobId);
impl Message for Cancel {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
}
impl Handler<Cancel> for CoreActor {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
    fn handle(&mut self, Cancel(id): Cancel, ctx: &mut Context<Self>) -> Self::Result {
        let answer = self.command(|core, now, out| core.cancel(now, id, out));
        self.arm(ctx);
        answer
    }
}

/// Re-queue a failed or cancelled job; answers once the decision is durable.
pub struct Retry(pub JobId);
impl Message for Retry {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
}
impl Handler<Retry> for CoreActor {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
    fn handle(&mut self, Retry(id): Retry, ctx: &mut Context<Self>) -> Self::Result {
        let answer = self.command(|core, now, out| core.retry(now, id, out));
        self.arm(ctx);
        answer
    }
}

/// Drain or undrain an agent.
pub struct SetDraining(pub String, pub bool);
impl Message for SetDraining {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
}
impl Handler<SetDraining> for CoreActor {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
    fn handle(&mut self, SetDraining(name, on): SetDraining, ctx: &mut Context<Self>) -> Self::Result {
        let answer = self.command(|core, now, out| core.set_draining(now, &name, on, out));
        self.arm(ctx);
        answer
    }
}

/// Return an agent's quarantined GPU to scheduling: agent name, GPU uuid.
pub struct ReleaseGpu(pub String, pub String);
impl Message for ReleaseGpu {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
}
impl Handler<ReleaseGpu> for CoreActor {
    type Result = Result<oneshot::Receiver<()>, CommandError>;
    fn handle(&mut self, ReleaseGpu(name, uuid): ReleaseGpu, ctx: &mut Context<Self>) -> Self::Result {
        let answer = self.command(|core, now, out| core.release_gpu(now, &name, &uuid, out));
        self.arm(ctx);
        answer
    }
}

/// A job as listings show it.
#[derive(Clone, Debug)]
pub struct JobSummary {
    /// The record.
    pub record: JobRecord,
    /// Progress of the live attempt.
    pub progress: Option<(u32, u32)>,
    /// GPUs of the live attempt.
    pub gpus: Vec<String>,
    /// Why it waits, while it does.
    pub waiting: Option<String>,
}

/// One job. There is no message for every job: with a million queued, a copy
/// of them all would double the controller's memory (listings page, [`PageJobs`]).
pub struct GetJob(pub JobId);
impl Message for GetJob {
    type Result = Option<JobSummary>;
}
impl Handler<GetJob> for CoreActor {
    type Result = MessageResult<GetJob>;
    fn handle(&mut self, GetJob(id): GetJob, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.summary(id))
    }
}

/// A page of jobs in id order, after a cursor, that pass a filter.
pub struct PageJobs {
    /// Only jobs after this one.
    pub after: Option<JobId>,
    /// At most this many.
    pub limit: usize,
    /// Which jobs count.
    pub filter: Box<dyn Fn(&JobRecord) -> bool + Send>,
}
/// What [`PageJobs`] answers.
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<JobSummary>,
    /// Where the next page starts, when there may be more.
    pub next_after: Option<JobId>,
    /// The event stream's position as of this page: its jobs' later changes come after it.
    pub events: crate::events::Cursor,
}
/// Jobs looked at by one [`PageJobs`] at most, matching or not: a sparse filter over a
/// million jobs answers in pieces (with a cursor) rather than holding the actor.
pub const PAGE_SCAN_MAX: usize = 50_000;
impl Message for PageJobs {
    type Result = JobPage;
}
impl Handler<PageJobs> for CoreActor {
    type Result = MessageResult<PageJobs>;
    fn handle(&mut self, PageJobs { after, limit, filter }: PageJobs, _: &mut Context<Self>) -> Self::Result {
        let (mut jobs, mut last, mut more) = (Vec::new(), None, false);
        for (scanned, rec) in self.core.jobs_after(after).enumerate() {
            if jobs.len() >= limit.max(1) || scanned == PAGE_SCAN_MAX {
                more = true;
                break;
            }
            if filter(rec) {
                jobs.extend(self.summary(rec.id));
            }
            last = Some(rec.id);
        }
        let next_after = if more { last.or(after) } else { None };
        MessageResult(JobPage { jobs, next_after, events: self.events.head() })
    }
}

/// One Cosmos run, by its run id, found through the actor's index.
pub struct FindRun(pub String);
impl Message for FindRun {
    type Result = Option<JobSummary>;
}
impl Handler<FindRun> for CoreActor {
    type Result = MessageResult<FindRun>;
    fn handle(&mut self, FindRun(run): FindRun, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.runs.get(&run).and_then(|&id| self.summary(id)))
    }
}

/// The runs of one prompt, found through the run index: no other job is looked at.
pub struct PromptRuns(pub String);
impl Message for PromptRuns {
    type Result = Vec<JobSummary>;
}
impl Handler<PromptRuns> for CoreActor {
    type Result = MessageResult<PromptRuns>;
    fn handle(&mut self, PromptRuns(prompt): PromptRuns, _: &mut Context<Self>) -> Self::Result {
        let prompt_of = |id: JobId| {
            self.core.job(id).and_then(|(rec, _, _)| rec.spec.labels.get(crate::cosmos::labels::PROMPT).cloned())
        };
        let mut ids: Vec<JobId> =
            self.runs.values().copied().filter(|&id| prompt_of(id).as_deref() == Some(prompt.as_str())).collect();
        ids.sort();
        MessageResult(ids.into_iter().filter_map(|id| self.summary(id)).collect())
    }
}

/// Every blob (input or output) a job holds, but the runs of one prompt:
/// gathered inside the actor, so deleting a prompt's outputs or collecting
/// blobs copies no job out.
pub struct BlobsInUse {
    /// The prompt whose runs do not count, if any.
    pub except_prompt: Option<String>,
}
impl Message for BlobsInUse {
    type Result = std::collections::BTreeSet<cosmos_proto::Sha256>;
}
impl Handler<BlobsInUse> for CoreActor {
    type Result = MessageResult<BlobsInUse>;
    fn handle(&mut self, BlobsInUse { except_prompt }: BlobsInUse, _: &mut Context<Self>) -> Self::Result {
        let mut used = std::collections::BTreeSet::new();
        for rec in self.core.jobs() {
            if except_prompt.is_some() && rec.spec.labels.get(crate::cosmos::labels::PROMPT) == except_prompt.as_ref() {
                continue;
            }
            used.extend(rec.outputs.iter().map(|o| o.sha256).chain(rec.spec.inputs.iter().map(|i| i.sha256)));
        }
        MessageResult(used)
    }
}

/// Cluster status.
pub struct Status;
/// What [`Status`] answers.
#[derive(Clone, Debug)]
pub struct StatusView {
    /// The controller's epoch.
    pub epoch: u64,
    /// Jobs waiting.
    pub queue_depth: usize,
    /// Jobs in each state.
    pub jobs: Vec<(crate::records::JobState, usize)>,
    /// Attempts assigned, running or stopping (one per running job).
    pub live_attempts: usize,
    /// Agents.
    pub agents: Vec<AgentView>,
}
impl Message for Status {
    type Result = StatusView;
}
impl Handler<Status> for CoreActor {
    type Result = MessageResult<Status>;
    fn handle(&mut self, _: Status, _: &mut Context<Self>) -> Self::Result {
        MessageResult(StatusView {
            epoch: self.core.epoch().0,
            queue_depth: self.core.queue_depth(),
            jobs: self.core.job_counts().collect(),
            live_attempts: self.core.live_attempts().count(),
            agents: self.core.agents(),
        })
    }
}

/// What `/metrics` reads of the core (jobs by state come from the store).
pub struct MetricsSnapshot;
impl Message for MetricsSnapshot {
    type Result = crate::metrics::Snapshot;
}
impl Handler<MetricsSnapshot> for CoreActor {
    type Result = MessageResult<MetricsSnapshot>;
    fn handle(&mut self, _: MetricsSnapshot, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.metrics_snapshot())
    }
}

/// A connection's hold on an agent name, from its handshake until it is registered or gone.
#[derive(Clone, Debug)]
pub(crate) struct Claim {
    pub(crate) conn: ConnId,
    pub(crate) peer: Peer,
    pub(crate) incarnation: u64,
}

impl CoreActor {
    /// Drops what is kept of a connection.
    fn forget(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.peers.remove(&conn);
        self.claims.retain(|_, c| c.conn != conn);
    }
}

/// Claims an agent name for a connection in its handshake; refused with the
/// holder's address while another process holds it: connected and heard from,
/// or in its own handshake. The same process reconnecting (same incarnation)
/// replaces its old connection.
pub(crate) struct ClaimName {
    pub(crate) name: String,
    pub(crate) claim: Claim,
}
impl Message for ClaimName {
    type Result = Result<(), Peer>;
}
impl Handler<ClaimName> for CoreActor {
    type Result = Result<(), Peer>;
    fn handle(&mut self, ClaimName { name, claim }: ClaimName, _: &mut Context<Self>) -> Self::Result {
        if let Some((peer, incarnation)) = self.core.live_conn_of(&name).and_then(|c| self.peers.get(&c)) {
            if *incarnation != claim.incarnation {
                return Err(peer.clone());
            }
        }
        if let Some(other) = self.claims.get(&name) {
            if other.conn != claim.conn && other.incarnation != claim.incarnation {
                return Err(other.peer.clone());
            }
        }
        self.claims.insert(name, claim);
        Ok(())
    }
}

/// A connection ended before it was registered: its claim goes.
pub(crate) struct Unclaim(pub(crate) ConnId);
impl Message for Unclaim {
    type Result = ();
}
impl Handler<Unclaim> for CoreActor {
    type Result = ();
    fn handle(&mut self, Unclaim(conn): Unclaim, _: &mut Context<Self>) {
        self.claims.retain(|_, c| c.conn != conn);
    }
}

pub(crate) struct AgentConnected {
    pub(crate) conn: ConnId,
    pub(crate) peer: Peer,
    pub(crate) incarnation: u64,
    pub(crate) name: String,
    pub(crate) hello: cosmos_proto::AgentHello,
    pub(crate) facts: OutputFacts,
    pub(crate) tx: mpsc::Sender<ControllerMsg>,
}
impl Message for AgentConnected {
    type Result = ();
}
impl Handler<AgentConnected> for CoreActor {
    type Result = ();
    fn handle(&mut self, mut m: AgentConnected, ctx: &mut Context<Self>) {
        self.conns.insert(m.conn, m.tx);
        self.peers.insert(m.conn, (m.peer, m.incarnation));
        self.claims.retain(|_, c| c.conn != m.conn);
        self.guard_run_reports(&mut m.hello.attempts, &m.facts);
        let mut out = Vec::new();
        let (conn, held) = (m.conn, &m.facts.held);
        let (name, hello) = (m.name, m.hello);
        self.timed(|core, now| core.on_connect(now, conn, &name, hello, held, &mut out));
        self.perform(out, None);
        self.arm(ctx);
    }
}

pub(crate) struct AgentMessage(pub(crate) ConnId, pub(crate) AgentMsg, pub(crate) OutputFacts);
impl Message for AgentMessage {
    type Result = ();
}
impl Handler<AgentMessage> for CoreActor {
    type Result = ();
    fn handle(&mut self, AgentMessage(conn, mut msg, facts): AgentMessage, ctx: &mut Context<Self>) {
        match &mut msg {
            AgentMsg::AttemptFinished { attempt_id, outcome } => self.guard_run_outcome(*attempt_id, outcome, &facts),
            AgentMsg::Progress { attempt_id, step, total } => {
                let now = self.clock.now();
                if let Some(t) = &mut self.tracer {
                    t.progress(*attempt_id, *step, *total, now);
                }
            }
            AgentMsg::Heartbeat(hb) => {
                if let Some(name) = self.core.agent_of_conn(conn) {
                    // Every agent, every second: reuse the last reading's allocations.
                    match self.gpu_usage.get_mut(name) {
                        Some(usage) => usage.clone_from(&hb.gpus),
                        None => {
                            self.gpu_usage.insert(name.to_string(), hb.gpus.clone());
                        }
                    }
                }
            }
            _ => {}
        }
        let mut out = Vec::new();
        self.timed(|core, now| core.on_message(now, conn, msg, &facts.held, &mut out));
        self.perform(out, None);
        self.arm(ctx);
    }
}

pub(crate) struct AgentGone(pub(crate) ConnId);
impl Message for AgentGone {
    type Result = ();
}
impl Handler<AgentGone> for CoreActor {
    type Result = ();
    fn handle(&mut self, AgentGone(conn): AgentGone, ctx: &mut Context<Self>) {
        self.forget(conn);
        let mut out = Vec::new();
        self.timed(|core, now| core.on_disconnect(now, conn, &mut out));
        self.perform(out, None);
        self.arm(ctx);
    }
}

// ---- agent connections ----

/// What the shell found on disk about the outputs a message names, for the
/// core (which of them are held) and for the Cosmos check of an enhancement's
/// result (whether its standard output holds an upsampled prompt).
#[derive(Debug, Default)]
pub(crate) struct OutputFacts {
    pub(crate) held: HeldBlobs,
    /// For each held output named like an enhancement's result: whether it holds an upsampled prompt.
    pub(crate) upsampled: HashMap<cosmos_proto::Sha256, Result<bool, String>>,
}
