//! A deterministic simulator of a whole cluster: one controller, many agents,
//! the network between them, containers and GPUs, all in one thread.
//!
//! It drives the real controller and agent cores and the real SQLite store
//! (in memory) with a seeded RNG and a virtual clock. Faults are modelled on
//! how TCP and SSH really fail: a connection delivers in order or not at all;
//! it can break with either side learning late or never (half-open); a
//! partition holds traffic in one or both directions until it heals or the
//! connection is given up. Processes crash and restart; the controller can die
//! between persisting a decision and sending it. After every step the
//! invariants of DESIGN.md §5 are checked; once faults stop, every job must end.

use cosmos_agent::core::{
    AgentConfig, AgentCore, ExitStatus, Output as AgentOut, Recovered, RuntimeEvent, StageFailure,
};
use cosmos_controller::core::{ConnId, Core, Output as CtlOut};
use cosmos_controller::model::{AttemptState, JobState, StoreOp};
use cosmos_controller::store::Store;
use cosmos_proto::spec::{ArtifactRef, InputArtifact, OutputArtifact};
use cosmos_proto::{AgentMsg, AttemptId, ControllerMsg, GpuInfo, GpuUsage, JobId, JobSpec, Sha256};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

pub mod scenario;
pub mod seeds;
pub use scenario::{Faults, Scenario};

const GIB: u64 = 1 << 30;
const TICK_MS: u64 = 250;

/// How a simulated job's container behaves.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Behaviour {
    /// Runs for the given time, exits 0.
    Succeed(u64),
    /// Fails with a retryable exit code with this probability (per mille), else succeeds.
    Flaky(u64, u32),
    /// Exits 127: the command is wrong.
    Terminal,
    /// Never exits by itself.
    Hang,
    /// Ignores the graceful stop; only the kill ends it.
    SlowExit(u64),
    /// Succeeds but leaves VRAM held for a while after it exits.
    Leak(u64),
}

impl Behaviour {
    fn encode(self) -> Vec<String> {
        let s = match self {
            Behaviour::Succeed(ms) => format!("succeed:{ms}"),
            Behaviour::Flaky(ms, p) => format!("flaky:{ms}:{p}"),
            Behaviour::Terminal => "terminal".into(),
            Behaviour::Hang => "hang".into(),
            Behaviour::SlowExit(ms) => format!("slow-exit:{ms}"),
            Behaviour::Leak(ms) => format!("leak:{ms}"),
        };
        vec!["sim-job".into(), s]
    }

    fn decode(command: &[String]) -> Behaviour {
        let parts: Vec<&str> = command.get(1).map(|s| s.split(':').collect()).unwrap_or_default();
        let num = |i: usize| parts.get(i).and_then(|p| p.parse().ok()).unwrap_or(1000);
        match parts.first().copied() {
            Some("flaky") => Behaviour::Flaky(num(1), num(2) as u32),
            Some("terminal") => Behaviour::Terminal,
            Some("hang") => Behaviour::Hang,
            Some("slow-exit") => Behaviour::SlowExit(num(1)),
            Some("leak") => Behaviour::Leak(num(1)),
            _ => Behaviour::Succeed(num(1)),
        }
    }
}

/// An invariant or liveness property that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Virtual time it was found.
    pub at_ms: u64,
    /// What broke.
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at {} ms: {}", self.at_ms, self.what)
    }
}

/// What a finished run tells.
#[derive(Debug, Clone)]
pub struct Report {
    /// Hash of every event processed, in order: equal seeds give equal hashes.
    pub trace_hash: u64,
    /// Virtual time simulated.
    pub simulated_ms: u64,
    /// Events processed.
    pub events: u64,
    /// Jobs by final state.
    pub final_states: BTreeMap<&'static str, usize>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u32>,
    /// Transfers the agents asked for or aborted, by kind.
    pub transfers: BTreeMap<&'static str, u32>,
    /// The first violation, if any.
    pub violation: Option<Violation>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Dir {
    ToController,
    ToAgent,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Event {
    ControllerTick,
    ControllerRestart,
    AgentTick(usize),
    AgentDial(usize),
    AgentRestart(usize),
    Deliver(ConnId, Dir, u64),
    /// A side learns its connection broke.
    Notice(ConnId, Dir),
    ContainerStarted(usize, AttemptId, u64),
    ContainerExit(usize, AttemptId, u64),
    LeakCleared(usize, String, u64),
    /// The transfer engine answers: the inputs are staged, or the outputs delivered (or not).
    TransferDone(usize, AttemptId, u64),
    HealPartition(usize),
    Fault,
}

#[derive(Debug)]
enum Payload {
    ToController(AgentMsg),
    ToAgent(ControllerMsg),
}

#[derive(Debug)]
struct Channel {
    queue: VecDeque<(u64, Payload)>,
    next_seq: u64,
    last_delivery_ms: u64,
}

impl Channel {
    fn new() -> Channel {
        Channel { queue: VecDeque::new(), next_seq: 0, last_delivery_ms: 0 }
    }
}

#[derive(Debug)]
struct Conn {
    agent: usize,
    open: bool,
    /// The controller's core has been told about it (hello delivered).
    registered: bool,
    to_controller: Channel,
    to_agent: Channel,
}

#[derive(Debug)]
struct Container {
    job_id: JobId,
    gpus: Vec<String>,
    behaviour: Behaviour,
    /// Bumped when a stop changes its exit, so stale exit events are ignored.
    generation: u64,
    running: bool,
    stopping: bool,
    exited: Option<ExitStatus>,
    vram_bytes: u64,
    /// Virtual time its timeout runs out, as a label on a real container would say.
    deadline_ms: u64,
    /// Files it writes when it succeeds.
    outputs: Vec<String>,
}

/// What the simulated transfer engine will answer for an attempt, once its delay is over.
#[derive(Debug)]
enum Transfer {
    Stage { token: u64, result: Result<(), StageFailure> },
    Upload { token: u64, outputs: Vec<ArtifactRef>, result: Result<(), String> },
}

#[derive(Debug)]
struct FakeGpu {
    info: GpuInfo,
    foreign_bytes: u64,
    allocations: BTreeMap<AttemptId, u64>,
    leaked: BTreeMap<u64, u64>,
}

impl FakeGpu {
    fn used(&self) -> u64 {
        self.foreign_bytes + self.allocations.values().sum::<u64>() + self.leaked.values().sum::<u64>()
    }
}

struct AgentNode {
    name: String,
    /// This host's clock: far off the controller's and running at its own rate,
    /// so any decision that compared timestamps across hosts would go wrong.
    clock_offset_ms: u64,
    clock_rate_ppm: i64,
    core: Option<AgentCore>,
    incarnation: u64,
    conn: Option<ConnId>,
    dialing: bool,
    containers: BTreeMap<AttemptId, Container>,
    gpus: Vec<FakeGpu>,
    /// Traffic held in each direction while a partition lasts.
    cut_to_controller: bool,
    cut_to_agent: bool,
    /// Attempts the controller gave up on (persisted lost) and when.
    fenced: BTreeSet<AttemptId>,
    /// Fenced attempts whose reconcile has reached this agent.
    reconciled_fenced: BTreeSet<AttemptId>,
    /// Transfers the agent asked for and not yet answered; they die with the agent process.
    transfers: BTreeMap<AttemptId, Transfer>,
}

/// One simulated cluster, run from one seed.
pub struct Sim {
    scenario: Scenario,
    rng: SmallRng,
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    store: Store,
    controller: Option<Core>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    agents: Vec<AgentNode>,
    submitted: Vec<JobId>,
    /// The initial submission's outputs are being performed (no store fault there).
    submission_pending: bool,
    final_jobs: HashMap<JobId, JobState>,
    succeeded_attempt: HashMap<JobId, AttemptId>,
    trace: DefaultHasher,
    events: u64,
    faults: BTreeMap<&'static str, u32>,
    transfers: BTreeMap<&'static str, u32>,
    violation: Option<Violation>,
    leak_seq: u64,
    /// `COSMOS_SIM_TRACE_JOB=N` prints what happens to job N, for debugging a failing seed.
    trace_job: Option<JobId>,
    trace_attempts: BTreeSet<AttemptId>,
    /// Attempts whose outputs the simulated controller received, with what it received.
    delivered: HashMap<AttemptId, Vec<ArtifactRef>>,
    /// Answers to transfers, so a stale one (aborted, or from before a restart) is told apart.
    transfer_seq: u64,
}

impl Sim {
    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace_job.is_some() {
            println!("[{:>7} ms] {}", self.now_ms, what());
        }
    }

    fn traced(&self, text: &str) -> bool {
        self.trace_job.is_some() && self.trace_attempts.iter().any(|a| text.contains(&format!("AttemptId({})", a.0)))
    }

    /// A cluster for `scenario`, driven by `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let agents = (0..scenario.agents)
            .map(|i| {
                let gpus = (0..scenario.gpus_per_agent)
                    .map(|g| FakeGpu {
                        info: GpuInfo {
                            index: g,
                            uuid: format!("GPU-{i:02}-{g:02}"),
                            name: "Simulated H100".into(),
                            total_vram_bytes: 80 * GIB,
                        },
                        foreign_bytes: if scenario.faults.gpus && rng.random_bool(0.2) {
                            rng.random_range(1..8) * GIB
                        } else {
                            0
                        },
                        allocations: BTreeMap::new(),
                        leaked: BTreeMap::new(),
                    })
                    .collect();
                AgentNode {
                    name: format!("host-{i:02}"),
                    clock_offset_ms: rng.random_range(0..1_000_000_000),
                    clock_rate_ppm: rng.random_range(-20_000..20_000),
                    core: None,
                    incarnation: 0,
                    conn: None,
                    dialing: false,
                    containers: BTreeMap::new(),
                    gpus,
                    cut_to_controller: false,
                    cut_to_agent: false,
                    fenced: BTreeSet::new(),
                    reconciled_fenced: BTreeSet::new(),
                    transfers: BTreeMap::new(),
                }
            })
            .collect();
        let store = Store::open_in_memory().expect("in-memory store opens");
        let mut sim = Sim {
            scenario,
            rng,
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            store,
            controller: None,
            conns: BTreeMap::new(),
            next_conn: 1,
            agents,
            submitted: Vec::new(),
            submission_pending: false,
            final_jobs: HashMap::new(),
            succeeded_attempt: HashMap::new(),
            trace: DefaultHasher::new(),
            events: 0,
            faults: BTreeMap::new(),
            transfers: BTreeMap::new(),
            violation: None,
            leak_seq: 0,
            trace_job: std::env::var("COSMOS_SIM_TRACE_JOB").ok().and_then(|v| v.parse().ok()).map(JobId),
            trace_attempts: BTreeSet::new(),
            delivered: HashMap::new(),
            transfer_seq: 0,
        };
        sim.start_controller();
        for i in 0..sim.agents.len() {
            sim.start_agent(i);
        }
        sim.submit_jobs();
        if sim.scenario.faults.any() {
            let first = sim.rng.random_range(500..3_000);
            sim.at(first, Event::Fault);
        }
        sim
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> Report {
        let deadline = self.scenario.fault_window_ms + self.scenario.liveness_bound_ms;
        let mut all_final_at = None;
        while let Some(Reverse((at, _, event))) = self.queue.pop() {
            if self.violation.is_some() {
                break;
            }
            self.now_ms = at;
            self.events += 1;
            (at, &event).hash(&mut self.trace);
            self.step(event);
            self.check_invariants();
            if at >= self.scenario.fault_window_ms {
                let done = self.submitted.iter().all(|id| self.final_jobs.contains_key(id));
                match (done, all_final_at) {
                    (true, None) => all_final_at = Some(at),
                    (true, Some(t)) if at >= t + self.scenario.settle_ms => {
                        self.check_quiescent();
                        break;
                    }
                    _ => {}
                }
            }
            if at > deadline && all_final_at.is_none() {
                let pending: Vec<String> = self
                    .submitted
                    .iter()
                    .filter(|id| !self.final_jobs.contains_key(id))
                    .take(5)
                    .map(|id| {
                        let state =
                            self.controller.as_ref().and_then(|c| c.job(*id)).map(|(j, _, _)| format!("{:?}", j.state));
                        format!("{id} ({})", state.unwrap_or_else(|| "controller down".into()))
                    })
                    .collect();
                if std::env::var_os("COSMOS_SIM_DUMP").is_some() {
                    self.dump();
                }
                self.fail(format!(
                    "liveness: jobs not final {} ms after faults stopped: {}",
                    self.scenario.liveness_bound_ms,
                    pending.join(", ")
                ));
            }
        }
        let mut final_states = BTreeMap::new();
        for state in self.final_jobs.values() {
            *final_states.entry(state.as_str()).or_insert(0) += 1;
        }
        Report {
            trace_hash: self.trace.finish(),
            simulated_ms: self.now_ms,
            events: self.events,
            final_states,
            faults: self.faults,
            transfers: self.transfers,
            violation: self.violation,
        }
    }

    fn at(&mut self, delay_ms: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((self.now_ms + delay_ms, self.seq, event)));
    }

    fn fail(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation { at_ms: self.now_ms, what });
        }
    }

    /// Agent `i`'s reading of the clock now.
    fn agent_clock(&self, i: usize) -> u64 {
        let node = &self.agents[i];
        let drift = (self.now_ms as i128 * node.clock_rate_ppm as i128 / 1_000_000) as i64;
        (node.clock_offset_ms as i64 + self.now_ms as i64 + drift) as u64
    }

    fn faults_on(&self) -> bool {
        self.now_ms < self.scenario.fault_window_ms
    }

    // ---- set-up ----

    fn submit_jobs(&mut self) {
        let mut specs = Vec::new();
        for i in 0..self.scenario.jobs {
            let f = &self.scenario.faults;
            let roll = self.rng.random_range(0..100);
            let run_ms = self.rng.random_range(200..5_000);
            let behaviour = match roll {
                0..=4 if f.containers => Behaviour::Terminal,
                5..=14 if f.containers => Behaviour::Flaky(run_ms, 500),
                15..=17 if f.containers => Behaviour::Hang,
                18..=22 if f.containers => Behaviour::SlowExit(run_ms),
                23..=27 if f.gpus => Behaviour::Leak(run_ms),
                _ => Behaviour::Succeed(run_ms),
            };
            let mut spec = JobSpec::command(&format!("sim-{i}"), behaviour.encode());
            spec.gpus = match self.rng.random_range(0..10) {
                0 => self.scenario.gpus_per_agent,
                1..=2 => 2.min(self.scenario.gpus_per_agent),
                _ => 1,
            };
            spec.min_free_vram_bytes = if self.rng.random_bool(0.3) { 40 * GIB } else { 0 };
            spec.priority = self.rng.random_range(0..3);
            spec.max_attempts = 4;
            spec.timeout_ms = if behaviour == Behaviour::Hang { 20_000 } else { 60_000 };
            if self.rng.random_bool(0.3) {
                spec.inputs = (0..self.rng.random_range(1..=3))
                    .map(|n| InputArtifact {
                        sha256: Sha256([n as u8 + 1; 32]),
                        size_bytes: self.rng.random_range(1..1 << 30),
                        path: format!("data/shard-{n}"),
                    })
                    .collect();
            }
            if self.rng.random_bool(0.3) {
                spec.outputs = vec![
                    OutputArtifact { path: "out/model.bin".into(), required: true },
                    OutputArtifact { path: "out/metrics.json".into(), required: self.rng.random_bool(0.5) },
                ];
            }
            specs.push(spec);
        }
        let mut out = Vec::new();
        let Some(core) = self.controller.as_mut() else { return };
        match core.submit(self.now_ms, specs, &mut out) {
            Ok(ids) => self.submitted = ids,
            Err(e) => self.fail(format!("submission refused: {e}")),
        }
        // The submission is acknowledged once durable: a store failure here would be a 503 the
        // client retries, which this workload does not model, so the first persist always lands.
        self.submission_pending = true;
        self.controller_outputs(out);
        self.submission_pending = false;
    }

    fn start_controller(&mut self) {
        let snapshot = self.store.load().expect("store loads");
        self.controller = Some(Core::recover(self.scenario.core_config(), snapshot, self.now_ms));
        self.at(TICK_MS, Event::ControllerTick);
    }

    fn start_agent(&mut self, i: usize) {
        let now = self.now_ms;
        let agent_now = self.agent_clock(i);
        let node = &mut self.agents[i];
        node.incarnation += 1;
        // The old process's transfers died with it.
        node.transfers.clear();
        let recovered = node
            .containers
            .iter()
            .map(|(&attempt_id, c)| Recovered {
                attempt_id,
                job_id: c.job_id,
                gpu_uuids: c.gpus.clone(),
                outputs: match &c.exited {
                    Some(status) if status.code == Some(0) => sim_outputs(attempt_id, &c.outputs),
                    _ => Vec::new(),
                },
                exited: c.exited.clone(),
                remaining_ms: Some(c.deadline_ms.saturating_sub(now)),
            })
            .collect();
        let config = AgentConfig {
            stop_grace_ms: 5_000,
            vram_release_bound_ms: 10_000,
            upload_timeout_ms: 30_000,
            ..AgentConfig::default()
        };
        node.core = Some(AgentCore::new(
            agent_now,
            config,
            node.gpus.iter().map(|g| g.info.clone()).collect(),
            true,
            "simulated",
            node.incarnation,
            recovered,
        ));
        // Containers that exited while the agent was away have been reported; the
        // runtime removes them once the agent has read them.
        node.containers.retain(|_, c| c.exited.is_none());
        let (tick, dial) = (self.rng.random_range(0..TICK_MS), self.rng.random_range(10..200));
        self.at(tick, Event::AgentTick(i));
        self.at(dial, Event::AgentDial(i));
        self.agents[i].dialing = true;
    }

    // ---- the event loop ----

    fn step(&mut self, event: Event) {
        match event {
            Event::ControllerTick => {
                if let Some(core) = self.controller.as_mut() {
                    let mut out = Vec::new();
                    core.tick(self.now_ms, &mut out);
                    self.controller_outputs(out);
                    self.at(TICK_MS, Event::ControllerTick);
                }
            }
            Event::ControllerRestart => self.start_controller(),
            Event::AgentTick(i) => {
                if self.agents[i].core.is_none() {
                    return;
                }
                let samples = self.gpu_samples(i);
                let mut out = Vec::new();
                let now = self.agent_clock(i);
                let core = self.agents[i].core.as_mut().unwrap();
                core.on_gpu_sample(now, samples, &mut out);
                core.tick(now, &mut out);
                self.agent_outputs(i, out);
                self.at(TICK_MS, Event::AgentTick(i));
            }
            Event::AgentDial(i) => self.dial(i),
            Event::AgentRestart(i) => self.start_agent(i),
            Event::Deliver(conn, dir, seq) => self.deliver(conn, dir, seq),
            Event::Notice(conn, dir) => self.notice(conn, dir),
            Event::ContainerStarted(i, att, generation) => self.container_started(i, att, generation),
            Event::ContainerExit(i, att, generation) => self.container_exit(i, att, generation),
            Event::LeakCleared(i, uuid, id) => {
                if let Some(g) = self.agents[i].gpus.iter_mut().find(|g| g.info.uuid == uuid) {
                    g.leaked.remove(&id);
                }
            }
            Event::TransferDone(i, att, token) => self.transfer_done(i, att, token),
            Event::HealPartition(i) => self.heal(i),
            Event::Fault => {
                if self.faults_on() {
                    self.inject_fault();
                    let gap = self.rng.random_range(200..self.scenario.fault_gap_ms.max(201));
                    self.at(gap, Event::Fault);
                } else {
                    self.end_faults();
                }
            }
        }
    }

    fn gpu_samples(&mut self, i: usize) -> Vec<GpuUsage> {
        self.agents[i]
            .gpus
            .iter()
            .map(|g| {
                let used = g.used();
                GpuUsage {
                    uuid: g.info.uuid.clone(),
                    used_vram_bytes: used,
                    free_vram_bytes: g.info.total_vram_bytes.saturating_sub(used),
                    foreign_vram_bytes: g.foreign_bytes,
                    utilization_pct: None,
                    temperature_c: None,
                    healthy: true,
                    quarantine: None,
                }
            })
            .collect()
    }

    // ---- controller side ----

    fn controller_outputs(&mut self, out: Vec<CtlOut>) {
        let crash_midway = self.faults_on() && self.scenario.faults.controller_crash && self.rng.random_bool(0.0005);
        let store_fails = self.faults_on()
            && !self.submission_pending
            && self.scenario.faults.store_failure
            && self.rng.random_bool(0.0005);
        for o in out {
            match o {
                CtlOut::Persist(_) if store_fails => {
                    // The transaction rolls back, and the daemon stops before acting on it.
                    *self.faults.entry("store write failure").or_insert(0) += 1;
                    self.crash_controller("a store write failed");
                    return;
                }
                CtlOut::Persist(ops) => {
                    self.observe_persist(&ops);
                    self.store.apply(&ops).expect("store applies");
                    if crash_midway {
                        // Between persisting a decision and sending it.
                        self.crash_controller("after persisting, before sending");
                        return;
                    }
                }
                CtlOut::Send { conn, msg } => self.send(conn, Payload::ToAgent(msg)),
                CtlOut::Close { conn } => self.break_conn(conn, 1.0),
            }
        }
    }

    /// `COSMOS_SIM_DUMP=1`: prints who holds which GPU, as the controller and the
    /// agents see it, when liveness fails (that is how a GPU stuck faulty shows).
    fn dump(&self) {
        if let Some(c) = &self.controller {
            for a in c.agents() {
                eprintln!("controller: {} {:?} connected={} draining={}", a.name, a.health, a.connected, a.draining);
                for (info, free, healthy, holder) in &a.gpus {
                    eprintln!("  {} free={free} healthy={healthy} holder={holder:?}", info.uuid);
                }
            }
        }
        for (i, node) in self.agents.iter().enumerate() {
            match &node.core {
                Some(core) => {
                    let live: Vec<_> = core.live_attempts().map(|(id, gpus)| (id, gpus.to_vec())).collect();
                    let faulty: Vec<_> = core.faulty_gpus().collect();
                    eprintln!("agent {i}: live {live:?}, faulty {faulty:?}");
                }
                None => eprintln!("agent {i}: down"),
            }
        }
    }

    /// Watches what the controller persists for the properties users rely on.
    fn observe_persist(&mut self, ops: &[StoreOp]) {
        for op in ops {
            let about_job = if self.trace_job.is_none() {
                None
            } else {
                match op {
                    StoreOp::PutJob(j) => Some(j.id),
                    StoreOp::PutAttempt(a) => Some(a.job_id),
                    StoreOp::Event(e) => e.job_id,
                    _ => None,
                }
            };
            if about_job.is_some() && about_job == self.trace_job {
                if let StoreOp::PutAttempt(a) = op {
                    self.trace_attempts.insert(a.id);
                }
                self.trace(|| {
                    let text = format!("{op:?}");
                    format!("persist {}", &text[..text.len().min(300)])
                });
            }
            match op {
                StoreOp::PutJob(job) => {
                    if job.state == JobState::Succeeded && !job.spec.outputs.is_empty() {
                        self.check_delivered(job, ops);
                    }
                    if let Some(prev) = self.final_jobs.get(&job.id) {
                        self.fail(format!(
                            "job {} was final ({prev:?}) and was written again as {:?}",
                            job.id, job.state
                        ));
                    } else if job.state.is_final() {
                        self.final_jobs.insert(job.id, job.state);
                    }
                }
                StoreOp::PutAttempt(att) => {
                    if att.state == AttemptState::Succeeded {
                        if let Some(prev) = self.succeeded_attempt.insert(att.job_id, att.id) {
                            if prev != att.id {
                                self.fail(format!(
                                    "job {} succeeded twice: attempts {prev} and {}",
                                    att.job_id, att.id
                                ));
                            }
                        }
                    }
                    if att.state == AttemptState::Lost {
                        if let Some(i) = self.agents.iter().position(|a| a.name == att.agent) {
                            self.agents[i].fenced.insert(att.id);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// A job is succeeded only once its outputs are safe at the controller.
    fn check_delivered(&mut self, job: &cosmos_controller::model::JobRecord, ops: &[StoreOp]) {
        // The succeeding attempt is written in the same batch, before or after the job.
        let in_batch = ops.iter().find_map(|op| match op {
            StoreOp::PutAttempt(a) if a.job_id == job.id && a.state == AttemptState::Succeeded => Some(a.id),
            _ => None,
        });
        let Some(att) = in_batch.or_else(|| self.succeeded_attempt.get(&job.id).copied()) else {
            return self.fail(format!("outputs: job {} succeeded with no succeeded attempt", job.id));
        };
        match self.delivered.get(&att) {
            None => self.fail(format!("outputs: job {} succeeded by {att} before its outputs were delivered", job.id)),
            Some(d) if *d != job.outputs => {
                self.fail(format!("outputs: job {} records {:?} but {att} delivered {d:?}", job.id, job.outputs))
            }
            Some(_) => {}
        }
    }

    fn crash_controller(&mut self, when: &str) {
        *self.faults.entry("controller crash").or_insert(0) += 1;
        let _ = when;
        self.controller = None;
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for c in conns {
            // The process died: the kernel resets its sockets, and agents learn at once or late.
            self.break_conn(c, 0.9);
        }
        let down = self.rng.random_range(100..5_000);
        self.at(down, Event::ControllerRestart);
    }

    // ---- agent side ----

    fn agent_outputs(&mut self, i: usize, out: Vec<AgentOut>) {
        for o in out {
            match o {
                AgentOut::Send(msg) => {
                    if let Some(conn) = self.agents[i].conn {
                        self.send(conn, Payload::ToController(msg));
                    }
                }
                AgentOut::Start { attempt_id, job_id, spec, gpu_uuids, .. } => {
                    self.start_container(i, attempt_id, job_id, &spec, gpu_uuids)
                }
                AgentOut::Stop { attempt_id, grace_ms } => self.stop_container(i, attempt_id, grace_ms),
                AgentOut::Reconnect => {
                    if let Some(conn) = self.agents[i].conn.take() {
                        self.break_conn_one_sided(conn);
                    }
                    self.schedule_dial(i);
                }
                AgentOut::Stage { attempt_id, inputs } => self.stage(i, attempt_id, &inputs),
                AgentOut::Upload { attempt_id, outputs } => self.upload(i, attempt_id, outputs),
                AgentOut::AbortStage { attempt_id } | AgentOut::AbortUpload { attempt_id } => {
                    let kind =
                        if matches!(o, AgentOut::AbortStage { .. }) { "stage aborted" } else { "upload aborted" };
                    *self.transfers.entry(kind).or_insert(0) += 1;
                    self.agents[i].transfers.remove(&attempt_id);
                }
                // Simulated GPUs list no processes, so no process of an attempt can outlive it here.
                AgentOut::KillStrays { attempt_id, pids } => {
                    panic!("the simulated GPUs list no processes, yet the core asked to kill {pids:?} of {attempt_id}")
                }
            }
        }
    }

    fn stage(&mut self, i: usize, att: AttemptId, inputs: &[InputArtifact]) {
        self.transfer_seq += 1;
        let token = self.transfer_seq;
        *self.transfers.entry("stage").or_insert(0) += 1;
        let roll = self.rng.random_range(0..1000);
        let result = match roll {
            0..=59 if self.scenario.faults.transfers => {
                Err(StageFailure { reason: "simulated: the controller stopped answering".into(), retryable: true })
            }
            60..=64 if self.scenario.faults.transfers => Err(StageFailure {
                reason: format!("simulated: {} does not match its digest at the source", inputs[0].path),
                retryable: false,
            }),
            _ => Ok(()),
        };
        if result.is_err() {
            *self.faults.entry("staging failure").or_insert(0) += 1;
        }
        // Big inputs take longer; a cache hit is quick.
        let bytes: u64 = inputs.iter().map(|a| a.size_bytes).sum();
        let mut delay = self.rng.random_range(5..200) + bytes / (1 << 20);
        if self.scenario.faults.transfers && self.rng.random_bool(0.03) {
            // A fetch that hangs: some outlast the attempt's timeout.
            *self.faults.entry("transfer stall").or_insert(0) += 1;
            delay += self.rng.random_range(30_000..90_000);
        }
        self.agents[i].transfers.insert(att, Transfer::Stage { token, result });
        self.at(delay, Event::TransferDone(i, att, token));
    }

    fn upload(&mut self, i: usize, att: AttemptId, outputs: Vec<ArtifactRef>) {
        self.transfer_seq += 1;
        let token = self.transfer_seq;
        *self.transfers.entry("upload").or_insert(0) += 1;
        let result = if self.scenario.faults.transfers && self.rng.random_bool(0.06) {
            *self.faults.entry("delivery failure").or_insert(0) += 1;
            Err("simulated: the controller's store is full".into())
        } else {
            Ok(())
        };
        let mut delay = self.rng.random_range(5..3_000);
        if self.scenario.faults.transfers && self.rng.random_bool(0.03) {
            // A delivery that hangs: some outlast the agent's bound on it.
            *self.faults.entry("transfer stall").or_insert(0) += 1;
            delay += self.rng.random_range(10_000..40_000);
        }
        self.agents[i].transfers.insert(att, Transfer::Upload { token, outputs, result });
        self.at(delay, Event::TransferDone(i, att, token));
    }

    fn transfer_done(&mut self, i: usize, att: AttemptId, token: u64) {
        let node = &mut self.agents[i];
        let current = match node.transfers.get(&att) {
            Some(Transfer::Stage { token: t, .. } | Transfer::Upload { token: t, .. }) => *t == token,
            None => false,
        };
        if !current || node.core.is_none() {
            return; // Aborted, or asked for by a process that has since died.
        }
        if node.cut_to_controller || node.cut_to_agent || self.controller.is_none() {
            // Files travel to and from the controller: the engine keeps retrying until it is reachable.
            let retry = self.rng.random_range(200..2_000);
            self.at(retry, Event::TransferDone(i, att, token));
            return;
        }
        let transfer = node.transfers.remove(&att).expect("checked above");
        let now = self.agent_clock(i);
        let mut out = Vec::new();
        let core = self.agents[i].core.as_mut().expect("checked above");
        match transfer {
            Transfer::Stage { result, .. } => core.on_staged(now, att, result, &mut out),
            Transfer::Upload { outputs, result, .. } => {
                if result.is_ok() {
                    // The bytes are at the controller before the agent hears so.
                    self.delivered.insert(att, outputs);
                }
                core.on_uploaded(now, att, result, &mut out);
            }
        }
        self.agent_outputs(i, out);
    }

    fn schedule_dial(&mut self, i: usize) {
        if !self.agents[i].dialing {
            self.agents[i].dialing = true;
            let backoff = self.rng.random_range(100..2_000);
            self.at(backoff, Event::AgentDial(i));
        }
    }

    fn dial(&mut self, i: usize) {
        self.agents[i].dialing = false;
        if self.agents[i].core.is_none() || self.agents[i].conn.is_some() {
            return;
        }
        let reachable = self.controller.is_some() && !self.agents[i].cut_to_controller && !self.agents[i].cut_to_agent;
        if !reachable {
            self.schedule_dial(i);
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn { agent: i, open: true, registered: false, to_controller: Channel::new(), to_agent: Channel::new() },
        );
        self.agents[i].conn = Some(id);
        let mut out = Vec::new();
        let now = self.agent_clock(i);
        self.agents[i].core.as_mut().unwrap().connected(now, &mut out);
        self.agent_outputs(i, out);
    }

    fn start_container(&mut self, i: usize, att: AttemptId, job_id: JobId, spec: &JobSpec, gpus: Vec<String>) {
        let behaviour = Behaviour::decode(&spec.command);
        let vram = (spec.min_free_vram_bytes + 4 * GIB).min(70 * GIB);
        let node = &mut self.agents[i];
        if node.containers.contains_key(&att) {
            return;
        }
        let deadline_ms = self.now_ms + spec.timeout_ms;
        node.containers.insert(
            att,
            Container {
                job_id,
                gpus,
                behaviour,
                generation: 0,
                running: false,
                stopping: false,
                exited: None,
                vram_bytes: vram,
                deadline_ms,
                outputs: spec.outputs.iter().map(|o| o.path.clone()).collect(),
            },
        );
        let delay = self.rng.random_range(20..500);
        self.at(delay, Event::ContainerStarted(i, att, 0));
    }

    fn container_started(&mut self, i: usize, att: AttemptId, generation: u64) {
        let Some(c) = self.agents[i].containers.get_mut(&att) else { return };
        if c.generation != generation || c.running || c.exited.is_some() {
            return;
        }
        if self.scenario.faults.containers && self.rng.random_bool(0.02) {
            let event = RuntimeEvent::StartFailed {
                attempt_id: att,
                reason: "simulated daemon hiccup".into(),
                retryable: true,
            };
            self.agents[i].containers.remove(&att);
            self.runtime_event(i, event);
            return;
        }
        c.running = true;
        let (gpus, vram, behaviour) = (c.gpus.clone(), c.vram_bytes, c.behaviour);
        for uuid in &gpus {
            let gpu = self.agents[i].gpus.iter_mut().find(|g| &g.info.uuid == uuid).expect("assigned GPUs exist");
            gpu.allocations.insert(att, vram);
        }
        let run_ms = match behaviour {
            Behaviour::Succeed(ms) | Behaviour::Flaky(ms, _) | Behaviour::SlowExit(ms) | Behaviour::Leak(ms) => {
                Some(ms)
            }
            Behaviour::Terminal => Some(50),
            Behaviour::Hang => None,
        };
        if let Some(ms) = run_ms {
            self.at(ms, Event::ContainerExit(i, att, generation));
        }
        self.runtime_event(i, RuntimeEvent::Started { attempt_id: att, handle: format!("sim-{att}") });
        let total = 10;
        self.runtime_event(i, RuntimeEvent::Progress { attempt_id: att, step: 1, total });
    }

    fn stop_container(&mut self, i: usize, att: AttemptId, grace_ms: u64) {
        let Some(c) = self.agents[i].containers.get_mut(&att) else {
            // Nothing to stop: the runtime says so by reporting it gone.
            let status = ExitStatus { code: None, signal: Some(9), oom_killed: false };
            self.runtime_event(i, RuntimeEvent::Exited { attempt_id: att, status, outputs: vec![] });
            return;
        };
        if c.exited.is_some() {
            return;
        }
        c.stopping = true;
        c.generation += 1;
        let generation = c.generation;
        let delay = match c.behaviour {
            Behaviour::SlowExit(_) | Behaviour::Hang if grace_ms > 0 => grace_ms,
            _ => self.rng.random_range(10..300).min(grace_ms.max(10)),
        };
        self.at(delay, Event::ContainerExit(i, att, generation));
    }

    fn container_exit(&mut self, i: usize, att: AttemptId, generation: u64) {
        let Some(c) = self.agents[i].containers.get_mut(&att) else { return };
        if c.generation != generation || c.exited.is_some() {
            return;
        }
        let status = if c.stopping {
            ExitStatus {
                code: None,
                signal: Some(if matches!(c.behaviour, Behaviour::SlowExit(_) | Behaviour::Hang) { 9 } else { 15 }),
                oom_killed: false,
            }
        } else {
            let code = match c.behaviour {
                Behaviour::Terminal => 127,
                Behaviour::Flaky(_, p) if self.rng.random_range(0..1000) < p => 1,
                _ => 0,
            };
            ExitStatus { code: Some(code), signal: None, oom_killed: false }
        };
        let was_running = std::mem::replace(&mut c.running, false);
        let leak = matches!(c.behaviour, Behaviour::Leak(_)) && status.code == Some(0);
        let gpus = c.gpus.clone();
        for uuid in &gpus {
            let gpu = self.agents[i].gpus.iter_mut().find(|g| &g.info.uuid == uuid).expect("assigned GPUs exist");
            if gpu.allocations.remove(&att).is_none() && was_running {
                let what = format!("VRAM accounting: {att} freed memory it never allocated on {uuid}");
                self.fail(what);
                return;
            }
            if leak {
                self.leak_seq += 1;
                gpu.leaked.insert(self.leak_seq, 6 * GIB);
                let clears = self.rng.random_range(2_000..30_000);
                self.at(clears, Event::LeakCleared(i, uuid.clone(), self.leak_seq));
            }
        }
        if self.agents[i].core.is_none() {
            // The agent is down: the container waits, exited, for it to come back.
            self.agents[i].containers.get_mut(&att).unwrap().exited = Some(status);
            return;
        }
        let c = self.agents[i].containers.remove(&att).expect("looked up above");
        let outputs = if status.code == Some(0) { sim_outputs(att, &c.outputs) } else { Vec::new() };
        self.runtime_event(i, RuntimeEvent::Exited { attempt_id: att, status, outputs });
    }

    fn runtime_event(&mut self, i: usize, event: RuntimeEvent) {
        let mut out = Vec::new();
        let now = self.agent_clock(i);
        if let Some(core) = self.agents[i].core.as_mut() {
            core.on_runtime(now, event, &mut out);
        }
        self.agent_outputs(i, out);
    }

    // ---- the network ----

    fn latency(&mut self) -> u64 {
        // Mostly fast, sometimes slow: a long tail as on real links.
        if self.rng.random_bool(0.05) { self.rng.random_range(50..800) } else { self.rng.random_range(1..20) }
    }

    fn send(&mut self, conn_id: ConnId, payload: Payload) {
        let latency = self.latency();
        let now = self.now_ms;
        let Some(conn) = self.conns.get_mut(&conn_id) else { return };
        if !conn.open {
            return;
        }
        let agent = &self.agents[conn.agent];
        let (dir, cut, ch) = match payload {
            Payload::ToController(_) => (Dir::ToController, agent.cut_to_controller, &mut conn.to_controller),
            Payload::ToAgent(_) => (Dir::ToAgent, agent.cut_to_agent, &mut conn.to_agent),
        };
        let seq = ch.next_seq;
        ch.next_seq += 1;
        ch.queue.push_back((seq, payload));
        if !cut {
            // In order within a connection: never before the previous message.
            let at = (now + latency).max(ch.last_delivery_ms);
            ch.last_delivery_ms = at;
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq, Event::Deliver(conn_id, dir, seq))));
        }
    }

    fn deliver(&mut self, conn_id: ConnId, dir: Dir, seq: u64) {
        let Some(conn) = self.conns.get_mut(&conn_id) else { return };
        if !conn.open {
            return;
        }
        let ch = match dir {
            Dir::ToController => &mut conn.to_controller,
            Dir::ToAgent => &mut conn.to_agent,
        };
        match ch.queue.front() {
            Some((s, _)) if *s == seq => {}
            _ => return, // Already delivered (a partition's re-scheduling) or dropped.
        }
        let (_, payload) = ch.queue.pop_front().unwrap();
        let agent = conn.agent;
        let registered = conn.registered;
        if self.trace_job.is_some() {
            let text = format!("{payload:?}");
            if self.traced(&text) {
                self.trace(|| format!("deliver conn {conn_id} (agent {agent}) {}", &text[..text.len().min(400)]));
            }
        }
        match payload {
            Payload::ToController(msg) => {
                let Some(core) = self.controller.as_mut() else { return };
                let mut out = Vec::new();
                if let AgentMsg::Hello(hello) = msg {
                    self.conns.get_mut(&conn_id).unwrap().registered = true;
                    let name = self.agents[agent].name.clone();
                    core.on_connect(self.now_ms, conn_id, &name, hello, &mut out);
                } else if registered {
                    core.on_message(self.now_ms, conn_id, msg, &mut out);
                }
                self.controller_outputs(out);
            }
            Payload::ToAgent(msg) => {
                if self.agents[agent].conn != Some(conn_id) {
                    return; // The agent abandoned this connection.
                }
                let reconcile = matches!(msg, ControllerMsg::Reconcile { .. });
                let mut out = Vec::new();
                let now = self.agent_clock(agent);
                let Some(core) = self.agents[agent].core.as_mut() else { return };
                core.on_message(now, msg, &mut out);
                self.agent_outputs(agent, out);
                if reconcile {
                    let node = &mut self.agents[agent];
                    let fenced: Vec<AttemptId> = node.fenced.iter().copied().collect();
                    node.reconciled_fenced.extend(fenced);
                }
            }
        }
    }

    /// Breaks a connection; each side learns of it with probability `p_notice`
    /// (after a delay), else never: a half-open connection.
    fn break_conn(&mut self, conn_id: ConnId, p_notice: f64) {
        let Some(conn) = self.conns.get_mut(&conn_id) else { return };
        if !conn.open {
            return;
        }
        conn.open = false;
        for dir in [Dir::ToController, Dir::ToAgent] {
            if self.rng.random_bool(p_notice) {
                let delay = self.rng.random_range(1..3_000);
                self.at(delay, Event::Notice(conn_id, dir));
            }
        }
    }

    /// One side gave up the connection: it closes it, and the other side learns late or never.
    fn break_conn_one_sided(&mut self, conn_id: ConnId) {
        let Some(conn) = self.conns.get_mut(&conn_id) else { return };
        if !conn.open {
            return;
        }
        conn.open = false;
        if self.rng.random_bool(0.7) {
            let delay = self.rng.random_range(1..3_000);
            self.at(delay, Event::Notice(conn_id, Dir::ToController));
        }
    }

    fn notice(&mut self, conn_id: ConnId, dir: Dir) {
        let Some(conn) = self.conns.get(&conn_id) else { return };
        let agent = conn.agent;
        let registered = conn.registered;
        match dir {
            Dir::ToController => {
                if registered {
                    if let Some(core) = self.controller.as_mut() {
                        let mut out = Vec::new();
                        core.on_disconnect(self.now_ms, conn_id, &mut out);
                        self.controller_outputs(out);
                    }
                }
            }
            Dir::ToAgent => {
                if self.agents[agent].conn == Some(conn_id) {
                    self.agents[agent].conn = None;
                    if let Some(core) = self.agents[agent].core.as_mut() {
                        core.disconnected();
                        self.schedule_dial(agent);
                    }
                }
            }
        }
    }

    fn heal(&mut self, i: usize) {
        self.agents[i].cut_to_controller = false;
        self.agents[i].cut_to_agent = false;
        // Traffic held during the partition flows again, in order.
        let ids: Vec<ConnId> = self.conns.iter().filter(|(_, c)| c.agent == i && c.open).map(|(&id, _)| id).collect();
        for id in ids {
            for dir in [Dir::ToController, Dir::ToAgent] {
                let seqs: Vec<u64> = {
                    let conn = &self.conns[&id];
                    let ch = if dir == Dir::ToController { &conn.to_controller } else { &conn.to_agent };
                    ch.queue.iter().map(|(s, _)| *s).collect()
                };
                for s in seqs {
                    let latency = self.latency();
                    let conn = self.conns.get_mut(&id).unwrap();
                    let ch = if dir == Dir::ToController { &mut conn.to_controller } else { &mut conn.to_agent };
                    let at = (self.now_ms + latency).max(ch.last_delivery_ms);
                    ch.last_delivery_ms = at;
                    self.seq += 1;
                    self.queue.push(Reverse((at, self.seq, Event::Deliver(id, dir, s))));
                }
            }
        }
    }

    // ---- faults ----

    fn inject_fault(&mut self) {
        let f = self.scenario.faults.clone();
        let i = self.rng.random_range(0..self.agents.len());
        let mut kinds: Vec<&'static str> = Vec::new();
        if f.network {
            kinds.extend(["break connection", "partition", "one-way partition"]);
        }
        if f.agent_crash {
            kinds.push("agent crash");
        }
        if f.controller_crash {
            kinds.push("controller crash");
        }
        if f.gpus {
            kinds.push("foreign VRAM");
        }
        if kinds.is_empty() {
            return;
        }
        let kind = kinds[self.rng.random_range(0..kinds.len())];
        *self.faults.entry(kind).or_insert(0) += 1;
        match kind {
            "break connection" => {
                if let Some(conn) = self.agents[i].conn {
                    let p = self.rng.random_range(0.0..1.0);
                    self.break_conn(conn, p);
                }
            }
            "partition" | "one-way partition" => {
                let node = &mut self.agents[i];
                if kind == "partition" {
                    node.cut_to_controller = true;
                    node.cut_to_agent = true;
                } else if self.rng.random_bool(0.5) {
                    node.cut_to_controller = true;
                } else {
                    node.cut_to_agent = true;
                }
                // Some heal before the host is declared lost, some after.
                let lasts = self.rng.random_range(500..40_000);
                self.at(lasts, Event::HealPartition(i));
            }
            "agent crash" => {
                if self.agents[i].core.is_none() {
                    return;
                }
                self.agents[i].core = None;
                if let Some(conn) = self.agents[i].conn.take() {
                    self.break_conn(conn, 0.8);
                }
                if self.rng.random_bool(0.5) {
                    // The host went down with it: its containers die and free their memory.
                    let node = &mut self.agents[i];
                    node.containers.clear();
                    for g in &mut node.gpus {
                        g.allocations.clear();
                    }
                }
                let down = self.rng.random_range(100..30_000);
                self.at(down, Event::AgentRestart(i));
            }
            "controller crash" => {
                if self.controller.is_some() {
                    self.crash_controller("at an arbitrary point");
                }
            }
            "foreign VRAM" => {
                let g = self.rng.random_range(0..self.agents[i].gpus.len());
                let gpu = &mut self.agents[i].gpus[g];
                gpu.foreign_bytes = if gpu.foreign_bytes > 0 { 0 } else { self.rng.random_range(1..10) * GIB };
            }
            _ => unreachable!(),
        }
    }

    fn end_faults(&mut self) {
        for i in 0..self.agents.len() {
            if self.agents[i].cut_to_agent || self.agents[i].cut_to_controller {
                self.heal(i);
            }
        }
    }

    // ---- checks ----

    fn check_invariants(&mut self) {
        if let Some(core) = &self.controller {
            if let Err(e) = core.check_invariants() {
                return self.fail(format!("controller core: {e}"));
            }
            for id in &self.submitted {
                if core.job(*id).is_none() {
                    return self.fail(format!("job {id} was lost: the controller no longer knows it"));
                }
            }
        }
        for node in &self.agents {
            let mut holder: HashMap<&str, AttemptId> = HashMap::new();
            for (att, c) in &node.containers {
                if !c.running {
                    continue;
                }
                for uuid in &c.gpus {
                    if let Some(other) = holder.insert(uuid, *att) {
                        let what = format!("GPU {uuid} on {} runs two attempts at once: {other} and {att}", node.name);
                        return self.fail(what);
                    }
                }
            }
            for g in &node.gpus {
                if g.used() > g.info.total_vram_bytes {
                    let what = format!(
                        "VRAM accounting: GPU {} uses {} of {} bytes (free would be negative)",
                        g.info.uuid,
                        g.used(),
                        g.info.total_vram_bytes
                    );
                    return self.fail(what);
                }
            }
            if let Some(core) = &node.core {
                for &att in &node.reconciled_fenced {
                    let running = node.containers.get(&att).is_some_and(|c| c.running);
                    if running && !core.is_stopping(att) && !node.containers[&att].stopping {
                        let what = format!(
                            "fencing: {att} was given up by the controller, yet keeps running on {} after reconciling",
                            node.name
                        );
                        return self.fail(what);
                    }
                }
            }
        }
    }

    /// After every job ended and things settled: nothing left running.
    fn check_quiescent(&mut self) {
        for node in &self.agents {
            if let Some((att, _)) = node.containers.iter().find(|(_, c)| c.running) {
                let what = format!("container of {att} still runs on {} after every job ended", node.name);
                return self.fail(what);
            }
        }
    }
}

/// Runs one seed and returns its report.
pub fn run_seed(scenario: &Scenario, seed: u64) -> Report {
    Sim::new(scenario.clone(), seed).run()
}

/// What a fake container that exited 0 produced: its expected outputs, with a
/// digest that differs per attempt, so a mix-up between attempts would show.
fn sim_outputs(att: AttemptId, paths: &[String]) -> Vec<ArtifactRef> {
    let digest = Sha256(std::array::from_fn(|n| (att.0 >> (8 * (n % 8))) as u8));
    paths.iter().map(|path| ArtifactRef { path: path.clone(), sha256: digest, size_bytes: 1 << 20 }).collect()
}
