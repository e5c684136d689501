//! A deterministic simulator of a whole cluster: one controller (or several
//! over one store), many agents, the network between them, containers and
//! GPUs, all in one thread.
//!
//! It drives the real controller and agent cores and the real SQLite store
//! (in memory) with a seeded RNG and a virtual clock. Faults are modelled on
//! how TCP and SSH really fail: a connection delivers in order or not at all;
//! it can break with either side learning late or never (half-open); a
//! partition holds traffic in one or both directions until it heals or the
//! connection is given up. Processes crash and restart; the controller can die
//! between persisting a decision and sending it. After every step the
//! invariants of DESIGN.md §5 are checked; once faults stop, every job must end.
//!
//! Artifacts move through the real blob state machines of both sides (the
//! agent's [`Flow`], the controller's [`Intake`]) over the same simulated
//! connections, with fake stores under them that hold lengths, not bytes: no
//! byte may be accepted twice or past a hole, no blob may be committed unless
//! its accepted bytes are exactly the blob's, and once faults stop every
//! transfer of a reachable host finishes.
//!
//! With several controllers ([`Scenario::controllers`]) they share the store
//! as on PostgreSQL: a lease row (epoch, holder, expiry on the store's clock)
//! taken by `ACQUIRE` when free, expired or the taker's own, which bumps the
//! epoch the core then runs at; every group commit first passes the `FENCE`
//! (the row still names this process at its epoch; it renews on the way), and
//! a write that fails it rolls back and the process exits, to come back as a
//! standby. Leaders renew and standbys retry every third of a lease; agents are
//! given every address and dial them in turn, refused by standbys, and move on
//! to the next when a link is lost. A leader may be stopped (SIGSTOP) for up to
//! three leases, also mid-commit or between persisting and sending: its timers,
//! its store's answers and what reaches its sockets wait until it runs again.
//! Or it alone loses the store for a while, its calls refused (the writer
//! retries, the renewer gives up after a lease) or hanging until it heals. On top of the invariants above: at most
//! one process commits per epoch, and only the epoch the lease hands out now;
//! a takeover loads every acknowledged job as last committed; an agent acts on
//! no order older than an epoch it was already handed.

use cosmos_agent::blobs::machine::{Commit, Event as BlobEvent, Flow, Resolution, Transmit};
use cosmos_agent::core::{
    AgentConfig, AgentCore, ExitStatus, Output as AgentOut, Recovered, RuntimeEvent, StageFailure,
};
use cosmos_controller::blobs::machine::{Appended, ChunkAction, Intake, OfferAction, Serve};
use cosmos_controller::core::{ConnId, Core, Dep, HeldBlobs, InputFromDep, Now, Output as CtlOut, SubmitOptions};
use cosmos_controller::gate::Gate;
use cosmos_controller::records::{AttemptState, JobState, StoreOp};
use cosmos_controller::store::Store;
use cosmos_proto::spec::{ArtifactRef, InputArtifact, OutputArtifact};
use cosmos_proto::{AgentMsg, AttemptId, ControllerBlob, ControllerMsg, GpuInfo, GpuUsage, JobId, JobSpec, Sha256};
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
const MIB: u64 = 1 << 20;
/// Distinct input blobs the workload's jobs share.
const INPUT_BLOBS: usize = 4;
/// How long one blob chunk occupies a connection (about 250 MB/s).
const CHUNK_WIRE_MS: u64 = 4;
/// The agent's pause before dialing the next controller address after one refused or failed.
const DIAL_NEXT_ADDR_MS: u64 = 100;
/// How long an agent waits for a controller's handshake before giving the address up.
const HANDSHAKE_TIMEOUT_MS: u64 = cosmos_proto::handshake::DEFAULT_HANDSHAKE_TIMEOUT_MS;
/// The store writer's pause before trying a batch again after a retryable error.
const STORE_RETRY_PAUSE_MS: u64 = cosmos_controller::daemon::STORE_RETRY_PAUSE_MS;

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
    /// Events the controller stored, by kind (`agent_lost`, `retrying`, …).
    pub event_kinds: BTreeMap<String, u32>,
    /// Attempts the controller created, over every job.
    pub attempts: usize,
    /// What the lease did, by kind: `takeover`, `fenced write`, `deposed at renewal`, `stale order refused`.
    pub failover: BTreeMap<&'static str, u32>,
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
    /// Controller `c`'s core wakes up: (controller, process).
    ControllerTick(usize, u64),
    /// Controller `c`'s host starts a process again (systemd).
    ControllerRestart(usize),
    AgentTick(usize),
    AgentDial(usize),
    AgentRestart(usize),
    Deliver(ConnId, Dir, u64),
    /// A side learns its connection broke.
    Notice(ConnId, Dir),
    ContainerStarted(usize, AttemptId, u64),
    ContainerExit(usize, AttemptId, u64),
    LeakCleared(usize, String, u64),
    HealPartition(usize),
    Fault,
    /// The store writer made a persist durable: (controller, process, ticket).
    StoreDurable(usize, u64, u64),
    /// The leader's renewer thread, every third of a lease: (controller, process).
    LeaseRenew(usize, u64),
    /// A standby's take loop, every third of a lease: (controller, process).
    LeaseTry(usize, u64),
    /// A paused (SIGSTOPped) process is continued: (controller, process).
    ControllerWake(usize, u64),
    /// A leader paused between persisting and sending, woken, releases what waited on
    /// `ticket`: (controller, process, ticket).
    GateRelease(usize, u64, u64),
    /// Controller `c` reaches the store again: (controller, process).
    StoreHeal(usize, u64),
}

/// What the controller does once the persist it follows is durable.
#[derive(Debug)]
enum CtlAction {
    Send(ConnId, cosmos_proto::ControllerMsg),
    Close(ConnId),
}

#[derive(Debug)]
enum Payload {
    ToController(AgentMsg),
    ToAgent(ControllerMsg),
    BlobToController(BlobUp),
    BlobToAgent(BlobDown),
}

/// An agent's blob frame, lengths instead of bytes.
#[derive(Debug)]
enum BlobUp {
    Request { sha256: Sha256, offset: u64, len_bytes: u32 },
    Offer { sha256: Sha256, size_bytes: u64 },
    Chunk { sha256: Sha256, offset: u64, len_bytes: u64, intact: bool },
}

/// The controller's blob frame: a download chunk's length, or any other answer as it is.
#[derive(Debug)]
enum BlobDown {
    Chunk { sha256: Sha256, offset: u64, len_bytes: u64, intact: bool },
    Control(ControllerBlob),
}

/// A fake blob store (the controller's, or a host's cache): lengths, and whether the bytes are right.
#[derive(Debug, Default)]
struct SimCas {
    /// Complete blobs and their sizes.
    blobs: BTreeMap<Sha256, u64>,
    /// Partial files: how many bytes, and whether each is the blob's own byte at its place.
    partials: BTreeMap<Sha256, (u64, bool)>,
}

impl SimCas {
    fn partial_len(&self, sha256: &Sha256) -> u64 {
        self.partials.get(sha256).map_or(0, |p| p.0)
    }
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
    /// Which controller process accepted it.
    controller: usize,
    open: bool,
    /// The controller's core has been told about it (hello delivered).
    registered: bool,
    to_controller: Channel,
    to_agent: Channel,
    /// The controller's side of this connection's uploads.
    intake: Intake,
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
    /// Which of the controller addresses it dials next: kept while it works, moved on when refused.
    dial_next: usize,
    /// The highest controller epoch this agent process was handed (Welcome, Reconcile, Assign).
    epoch_seen: u64,
    containers: BTreeMap<AttemptId, Container>,
    gpus: Vec<FakeGpu>,
    /// Traffic held in each direction while a partition lasts.
    cut_to_controller: bool,
    cut_to_agent: bool,
    /// Attempts the controller gave up on (persisted lost), with the epoch that did.
    fenced: BTreeMap<AttemptId, u64>,
    /// Fenced attempts whose reconcile has reached this agent.
    reconciled_fenced: BTreeSet<AttemptId>,
    /// The agent process's blob machine; it dies with the process.
    blobs: Flow,
    /// The host's cache: it survives the agent process.
    cache: SimCas,
    /// Downloads with a writer, in this process.
    writers: BTreeSet<Sha256>,
    /// Outputs of the attempts being delivered, in this process.
    delivering: BTreeMap<AttemptId, Vec<ArtifactRef>>,
}

/// One controller host: the process on it, leading, standing by, paused or down, and its clocks.
struct ControllerNode {
    /// Its holder name in the lease row: the same across restarts, so a restarted leader
    /// takes its own unexpired lease back at once, as `ACQUIRE` lets it.
    name: String,
    /// A process runs (leading or standing by); false between its exit and systemd's restart.
    up: bool,
    /// Which process it is, counted over all controllers: answers meant for a dead one are told apart.
    process: u64,
    /// The leader's core; none on a standby or a host that is down.
    core: Option<Core>,
    /// The epoch the lease handed this process when it took it.
    epoch: u64,
    /// Stopped (SIGSTOP): nothing of the process runs, and what reaches it (its timers, the
    /// store's answers, messages in its sockets) waits here, in order, until it is continued.
    paused: bool,
    held: VecDeque<Event>,
    /// Cut off from the store (PostgreSQL unreachable from this host alone): whether the
    /// connections are black-holed (every call hangs until the cut heals) rather than
    /// refused (calls fail at once, and are retried).
    store_cut: Option<bool>,
    /// What hangs on a black-holed store connection: the writer's commit and the renewal.
    store_held: VecDeque<Event>,
    /// When the renewer last renewed the lease, as its own clock says.
    renewed_ms: u64,
    /// The sends and closes waiting for their persist, as the daemon's actor holds them.
    gate: Gate<u64, CtlAction>,
    /// Persists queued for the store writer, not yet durable, by ticket.
    store_queue: VecDeque<(u64, Vec<StoreOp>)>,
    /// The last ticket handed out, and the last one durable.
    store_ticket: u64,
    store_durable: u64,
    /// Where the process's monotonic clock starts: arbitrary, new each start.
    mono_base_ms: u64,
    /// How far the host's wall clock is from true time (stepped by faults).
    wall_offset_ms: i64,
    /// When the core last took in a message from each agent (true time).
    last_heard_ms: HashMap<String, u64>,
}

impl ControllerNode {
    fn new(name: String) -> ControllerNode {
        ControllerNode {
            name,
            up: false,
            process: 0,
            core: None,
            epoch: 0,
            paused: false,
            held: VecDeque::new(),
            store_cut: None,
            store_held: VecDeque::new(),
            renewed_ms: 0,
            gate: Gate::new(),
            store_queue: VecDeque::new(),
            store_ticket: 0,
            store_durable: 0,
            mono_base_ms: 0,
            wall_offset_ms: 1_700_000_000_000,
            last_heard_ms: HashMap::new(),
        }
    }
}

/// The lease row (`cosmos_lease`), on the store's clock, which is true time here.
#[derive(Debug, Default)]
struct LeaseRow {
    /// The last epoch handed out (0: none yet).
    epoch: u64,
    /// The controller it names; none before the first take (`holder = ''`).
    holder: Option<usize>,
    /// When it runs out unless renewed.
    expires_ms: u64,
}

/// One simulated cluster, run from one seed.
pub struct Sim {
    scenario: Scenario,
    rng: SmallRng,
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    /// The one store every controller writes, and its lease row.
    store: Store,
    lease: LeaseRow,
    controllers: Vec<ControllerNode>,
    /// Processes started, over every controller.
    processes: u64,
    /// Each epoch that committed, with the controller and process that did.
    epoch_committers: BTreeMap<u64, (usize, u64)>,
    /// Each job's state as last durably committed: what a takeover must load.
    durable_jobs: HashMap<JobId, JobState>,
    /// What the lease did: takeovers, writes fenced, leaders deposed, stale orders agents refused.
    failover: BTreeMap<&'static str, u32>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    agents: Vec<AgentNode>,
    submitted: Vec<JobId>,
    /// Jobs of the batch (by position) that take `out/model.bin` of an earlier one, with that one's position.
    takes: Vec<(usize, usize)>,
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
    /// The workload's input blobs, with their sizes.
    input_blobs: Vec<(Sha256, u64)>,
    /// Stored event kinds, counted (`agent_lost`, `retrying`, …).
    event_kinds: BTreeMap<String, u32>,
    /// Attempts the controller created.
    attempt_ids: BTreeSet<AttemptId>,
    /// The controllers' blob stores (one if shared): they survive the controller processes.
    blob_stores: Vec<SimCas>,
    /// The persist of the initial submission, (process, ticket): a client would retry it, which this workload does not model.
    submission_ticket: Option<(u64, u64)>,
    /// Whether it is durable: before, no pause or exit may hold it back, as no store failure may.
    submission_acked: bool,
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
                    dial_next: 0,
                    epoch_seen: 0,
                    containers: BTreeMap::new(),
                    gpus,
                    cut_to_controller: false,
                    cut_to_agent: false,
                    fenced: BTreeMap::new(),
                    reconciled_fenced: BTreeSet::new(),
                    blobs: Flow::new(),
                    cache: SimCas::default(),
                    writers: BTreeSet::new(),
                    delivering: BTreeMap::new(),
                }
            })
            .collect();
        let input_blobs: Vec<(Sha256, u64)> =
            (0..INPUT_BLOBS).map(|n| (Sha256([n as u8 + 1; 32]), rng.random_range(MIB..48 * MIB))).collect();
        let controllers = scenario.controllers.max(1);
        let blob_stores = (0..if scenario.shared_blob_store { 1 } else { controllers })
            .map(|_| {
                let mut cas = SimCas::default();
                cas.blobs.extend(input_blobs.iter().copied());
                cas
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
            lease: LeaseRow::default(),
            controllers: (0..controllers).map(|c| ControllerNode::new(format!("c{c}"))).collect(),
            processes: 0,
            epoch_committers: BTreeMap::new(),
            durable_jobs: HashMap::new(),
            failover: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            agents,
            submitted: Vec::new(),
            takes: Vec::new(),
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
            input_blobs,
            event_kinds: BTreeMap::new(),
            attempt_ids: BTreeSet::new(),
            blob_stores,
            submission_ticket: None,
            submission_acked: false,
        };
        // The first takes the lease; the others find it held and stand by.
        for c in 0..controllers {
            sim.start_controller(c);
        }
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
                        self.check_store_kept_acknowledged();
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
                            self.leader_core().and_then(|c| c.job(*id)).map(|(j, _, _)| format!("{:?}", j.state));
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
            event_kinds: self.event_kinds,
            attempts: self.attempt_ids.len(),
            failover: self.failover,
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

    /// Whether a pause or an exit may catch a commit now: not before the submission is durable.
    fn failover_faults_on(&self) -> bool {
        self.scenario.faults.failover && self.faults_on() && self.submission_acked
    }

    // ---- set-up ----

    fn submit_jobs(&mut self) {
        let mut specs: Vec<JobSpec> = Vec::new();
        let mut inputs_from = Vec::new();
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
                let first = self.rng.random_range(0..INPUT_BLOBS);
                spec.inputs = (first..INPUT_BLOBS.min(first + self.rng.random_range(1..=3)))
                    .map(|n| InputArtifact {
                        sha256: self.input_blobs[n].0,
                        size_bytes: self.input_blobs[n].1,
                        path: format!("data/shard-{n}"),
                    })
                    .collect();
            }
            if self.rng.random_bool(0.3) {
                spec.outputs = vec![
                    OutputArtifact { path: SIM_MODEL.into(), required: true },
                    OutputArtifact { path: "out/metrics.json".into(), required: self.rng.random_bool(0.5) },
                ];
            }
            // Some take an earlier job's output as an input (an upscale after its transfer):
            // they wait for it, and for its success, and run on what it made.
            let mut from = Vec::new();
            if i > 0 && self.rng.random_bool(0.15) {
                let j = self.rng.random_range(0..i);
                if specs[j].outputs.iter().any(|o: &OutputArtifact| o.path == SIM_MODEL && o.required) {
                    from.push(InputFromDep {
                        dep: Dep::InBatch(j),
                        output: SIM_MODEL.into(),
                        path: SIM_MODEL_INPUT.into(),
                    });
                    self.takes.push((i, j));
                }
            }
            inputs_from.push(from);
            specs.push(spec);
        }
        let mut out = Vec::new();
        // The first controller took the lease at the start: the client's submission reaches it.
        let now = self.controller_clock(0);
        let Some(core) = self.controllers[0].core.as_mut() else { return };
        let opts = SubmitOptions { inputs_from, ..Default::default() };
        match core.submit_with(now, specs, opts, &mut out).map(|(ids, _)| ids) {
            Ok(ids) => self.submitted = ids,
            Err(e) => self.fail(format!("submission refused: {e}")),
        }
        // The submission is acknowledged once durable: a store failure here would be a 503 the
        // client retries, which this workload does not model, so the first persist always lands.
        self.submission_pending = true;
        self.controller_outputs(0, out);
        self.submission_pending = false;
    }

    /// What controller `c`'s process reads on its two clocks now.
    fn controller_clock(&self, c: usize) -> Now {
        let node = &self.controllers[c];
        Now { mono_ms: node.mono_base_ms + self.now_ms, wall_ms: (self.now_ms as i64 + node.wall_offset_ms) as u64 }
    }

    /// Whether the controllers share a lease (on PostgreSQL); one alone never loses it.
    fn several(&self) -> bool {
        self.controllers.len() > 1
    }

    /// How often a leader renews and a standby retries: every third of a lease.
    fn lease_period_ms(&self) -> u64 {
        (self.scenario.lease_ms / 3).max(1)
    }

    /// The controller the lease names, if its process leads.
    fn leader(&self) -> Option<usize> {
        self.lease.holder.filter(|&c| self.controllers[c].core.is_some())
    }

    fn leader_core(&self) -> Option<&Core> {
        self.leader().and_then(|c| self.controllers[c].core.as_ref())
    }

    /// The blob store controller `c` writes.
    fn cas_of(&self, c: usize) -> usize {
        if self.blob_stores.len() == 1 { 0 } else { c }
    }

    /// A controller process starts on host `c`: it tries the lease at once, as `lead_or_wait` does.
    fn start_controller(&mut self, c: usize) {
        self.processes += 1;
        let node = &mut self.controllers[c];
        node.up = true;
        node.process = self.processes;
        node.paused = false;
        node.held.clear();
        node.store_cut = None;
        node.store_held.clear();
        node.gate = Gate::new();
        node.store_queue.clear();
        self.try_lease(c);
    }

    /// `ACQUIRE`: takes the lease if it is free, expired, or this holder's own, bumping the
    /// epoch; leads on it, or stands by and tries again a third of a lease later.
    fn try_lease(&mut self, c: usize) {
        let lease = &mut self.lease;
        if lease.holder.is_none_or(|h| h == c) || lease.expires_ms < self.now_ms {
            if lease.holder.is_some_and(|h| h != c) {
                *self.failover.entry("takeover").or_insert(0) += 1;
            }
            lease.epoch += 1;
            lease.holder = Some(c);
            lease.expires_ms = self.now_ms + self.scenario.lease_ms;
            let epoch = lease.epoch;
            self.lead(c, epoch);
        } else {
            let process = self.controllers[c].process;
            self.at(self.lease_period_ms(), Event::LeaseTry(c, process));
        }
    }

    /// Controller `c` took the lease at `epoch`: it loads the state (the restart path) and serves.
    fn lead(&mut self, c: usize, epoch: u64) {
        let snapshot = self.store.load().expect("store loads");
        if snapshot.epoch.0 != epoch {
            let what = format!(
                "epochs: the lease handed {} epoch {epoch}, but the store loaded epoch {}",
                self.controllers[c].name, snapshot.epoch.0
            );
            self.fail(what);
        }
        self.check_takeover_loaded_acknowledged(c, &snapshot);
        // A new process: its monotonic clock has nothing to do with the last one's.
        let mono_base_ms = self.rng.random_range(0..1_000_000_000);
        let node = &mut self.controllers[c];
        node.epoch = epoch;
        node.mono_base_ms = mono_base_ms;
        node.renewed_ms = self.now_ms;
        let now = self.controller_clock(c);
        let node = &mut self.controllers[c];
        node.core = Some(Core::recover(self.scenario.core_config(), snapshot, now));
        // A new core has heard from no one yet; its grace period starts now.
        for agent in &self.agents {
            node.last_heard_ms.insert(agent.name.clone(), self.now_ms);
        }
        let process = node.process;
        self.at(TICK_MS, Event::ControllerTick(c, process));
        if self.several() {
            self.at(self.lease_period_ms(), Event::LeaseRenew(c, process));
        }
    }

    /// Whether the lease row still names controller `c` at its epoch: the fence.
    fn holds_lease(&self, c: usize) -> bool {
        self.lease.holder == Some(c) && self.lease.epoch == self.controllers[c].epoch
    }

    fn start_agent(&mut self, i: usize) {
        let now = self.now_ms;
        let agent_now = self.agent_clock(i);
        let node = &mut self.agents[i];
        node.incarnation += 1;
        // A new process starts at the first address, and has seen no epoch yet.
        node.dial_next = 0;
        node.epoch_seen = 0;
        // The old process's transfers died with it; what its writers put on disk stays.
        node.blobs = new_flow(&self.scenario);
        node.writers.clear();
        node.delivering.clear();
        // The new process has not reconciled yet: a stop its predecessor asked for may have been
        // lost by the runtime, and its first reconcile fences the attempt again.
        node.reconciled_fenced.clear();
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
            #[cfg(feature = "sabotage")]
            sabotage: self.scenario.agent_sabotage,
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

    /// The controller process an event is for, if any: while it is paused, the event waits.
    fn controller_of(&self, event: &Event) -> Option<usize> {
        match event {
            Event::ControllerTick(c, _)
            | Event::StoreDurable(c, _, _)
            | Event::LeaseRenew(c, _)
            | Event::LeaseTry(c, _)
            | Event::GateRelease(c, _, _) => Some(*c),
            Event::Deliver(conn, Dir::ToController, _) | Event::Notice(conn, Dir::ToController) => {
                self.conns.get(conn).map(|k| k.controller)
            }
            _ => None,
        }
    }

    fn step(&mut self, event: Event) {
        if let Some(c) = self.controller_of(&event) {
            if self.controllers[c].paused {
                self.controllers[c].held.push_back(event);
                return;
            }
        }
        if let Event::StoreDurable(c, ..) | Event::LeaseRenew(c, _) = event {
            if self.controllers[c].store_cut == Some(true) {
                self.controllers[c].store_held.push_back(event);
                return;
            }
        }
        match event {
            Event::ControllerTick(c, process) => {
                if self.controllers[c].process != process {
                    return;
                }
                let now = self.controller_clock(c);
                if let Some(core) = self.controllers[c].core.as_mut() {
                    let mut out = Vec::new();
                    let due = core.next_deadline_ms();
                    core.tick(now, &mut out);
                    // The daemon sleeps until next_deadline_ms: a tick before it must have nothing to do.
                    if due.is_none_or(|d| now.mono_ms < d) && !out.is_empty() {
                        let text = format!("{out:?}");
                        let what = format!(
                            "a tick {} ms before next_deadline_ms did work: {}",
                            due.map_or(0, |d| d - now.mono_ms),
                            &text[..text.len().min(300)]
                        );
                        self.fail(what);
                    }
                    self.controller_outputs(c, out);
                    self.at(TICK_MS, Event::ControllerTick(c, process));
                }
            }
            Event::ControllerRestart(c) => self.start_controller(c),
            Event::StoreDurable(c, process, ticket) => self.store_durable(c, process, ticket),
            Event::LeaseRenew(c, process) => {
                let node = &self.controllers[c];
                if node.process != process || node.core.is_none() {
                    return;
                }
                // The renewer's `FENCE`: it also says whether another controller took the lease.
                if node.store_cut.is_some() {
                    // Refused: retried, until no renewal has succeeded for a whole lease.
                    if self.now_ms - node.renewed_ms < self.scenario.lease_ms {
                        self.at(self.lease_period_ms(), Event::LeaseRenew(c, process));
                    } else {
                        *self.failover.entry("stopped: no renewal for a lease").or_insert(0) += 1;
                        self.stop_controller(c);
                    }
                } else if self.holds_lease(c) {
                    self.lease.expires_ms = self.now_ms + self.scenario.lease_ms;
                    self.controllers[c].renewed_ms = self.now_ms;
                    self.at(self.lease_period_ms(), Event::LeaseRenew(c, process));
                } else {
                    *self.failover.entry("deposed at renewal").or_insert(0) += 1;
                    self.stop_controller(c);
                }
            }
            Event::LeaseTry(c, process) => {
                let node = &self.controllers[c];
                if node.process == process && node.up && node.core.is_none() {
                    self.try_lease(c);
                }
            }
            Event::ControllerWake(c, process) => {
                let node = &mut self.controllers[c];
                if node.process == process && node.paused {
                    node.paused = false;
                    // What waited runs now, in the order it came; the renewer is a thread of its
                    // own, which the scheduler may run a little after the writer and the actor.
                    let held: Vec<Event> = node.held.drain(..).collect();
                    for e in held {
                        let delay = if matches!(e, Event::LeaseRenew(..)) { self.rng.random_range(0..50) } else { 0 };
                        self.at(delay, e);
                    }
                }
            }
            Event::StoreHeal(c, process) => {
                let node = &mut self.controllers[c];
                if node.process == process && node.store_cut.is_some() {
                    node.store_cut = None;
                    // Whatever hung on the connections gets its answer now, in order.
                    let held: Vec<Event> = node.store_held.drain(..).collect();
                    for e in held {
                        self.at(0, e);
                    }
                }
            }
            Event::GateRelease(c, process, ticket) => {
                let node = &mut self.controllers[c];
                if node.process != process || node.core.is_none() {
                    return;
                }
                for action in node.gate.durable(ticket) {
                    self.controller_act(c, action);
                }
            }
            Event::AgentTick(i) => {
                if self.agents[i].core.is_none() {
                    return;
                }
                // One event stands for two inputs of the daemon: the GPU monitor's reading,
                // then a wake-up, which may come early (the daemon wakes only at the deadline).
                let samples = self.gpu_samples(i);
                let mut out = Vec::new();
                let now = self.agent_clock(i);
                let core = self.agents[i].core.as_mut().unwrap();
                core.on_gpu_sample(now, samples, &mut out);
                let due = core.next_deadline_ms();
                let mut ticked = Vec::new();
                core.tick(now, &mut ticked);
                let after = core.next_deadline_ms();
                // The daemon sleeps until next_deadline_ms: a tick before it must have nothing to
                // do and move no deadline; and a tick must leave the next one ahead, or the daemon
                // would wake again at once, in a loop.
                if due.is_none_or(|d| now < d) && (!ticked.is_empty() || after != due) {
                    let text = format!("{ticked:?}");
                    let what = format!(
                        "agent {i}: a tick {} ms before next_deadline_ms did work (deadline {due:?} -> {after:?}): {}",
                        due.map_or(0, |d| d - now),
                        &text[..text.len().min(300)]
                    );
                    self.fail(what);
                } else if after.is_some_and(|d| d <= now) {
                    self.fail(format!("agent {i}: after a tick at {now}, next_deadline_ms is already due ({after:?})"));
                }
                out.extend(ticked);
                let flow = &mut self.agents[i].blobs;
                if flow.poll_timeout().is_some_and(|t| t <= now) {
                    flow.handle_timeout(now);
                }
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

    /// Performs controller `c`'s core outputs as the daemon's actor does: a persist goes
    /// to the (simulated) store writer and becomes durable a little later;
    /// sends and closes pass the same [`Gate`] the daemon uses.
    fn controller_outputs(&mut self, c: usize, out: Vec<CtlOut>) {
        for o in out {
            let action = match o {
                CtlOut::Persist(ops) => {
                    // Checked when the core decides, not when the persist becomes durable:
                    // the agent may well speak in between.
                    self.check_lost_decisions(c, &ops);
                    let node = &mut self.controllers[c];
                    node.store_ticket += 1;
                    let (ticket, process) = (node.store_ticket, node.process);
                    if self.submission_pending {
                        self.submission_ticket = Some((process, ticket));
                    }
                    node.store_queue.push_back((ticket, ops));
                    node.gate.persisted(ticket);
                    // The writer's fsync, group-committing what queued meanwhile.
                    let fsync_ms = self.rng.random_range(0..4);
                    self.at(fsync_ms, Event::StoreDurable(c, process, ticket));
                    continue;
                }
                CtlOut::Send { conn, msg } => CtlAction::Send(conn, msg),
                CtlOut::Close { conn } => CtlAction::Close(conn),
            };
            let node = &mut self.controllers[c];
            if let Some(action) = node.gate.admit(action, Some(node.store_durable)) {
                self.controller_act(c, action);
            }
        }
    }

    /// Lost means silent for the whole grace period, in true time: a core that
    /// measured on a stepped wall clock would say so early.
    fn check_lost_decisions(&mut self, c: usize, ops: &[StoreOp]) {
        for op in ops {
            let StoreOp::Event(e) = op else { continue };
            if e.kind != "agent_lost" {
                continue;
            }
            let agent = e.agent.clone().unwrap_or_default();
            let silent_ms = self.now_ms - self.controllers[c].last_heard_ms.get(&agent).copied().unwrap_or(0);
            if silent_ms < self.scenario.core.lost_after_ms {
                self.fail(format!(
                    "agent {agent} declared lost after {silent_ms} ms of silence, under lost_after_ms = {}",
                    self.scenario.core.lost_after_ms
                ));
            }
        }
    }

    fn controller_act(&mut self, c: usize, action: CtlAction) {
        match action {
            CtlAction::Send(conn, msg) => {
                // A link is its process's own: one the core names that another process accepted is a bug here.
                debug_assert!(self.conns.get(&conn).is_none_or(|k| k.controller == c));
                self.send(conn, Payload::ToAgent(msg))
            }
            CtlAction::Close(conn) => self.break_conn(conn, 1.0),
        }
    }

    /// Whether the store under test skips the fence in its group commits (the teeth test).
    fn fence_skipped(&self) -> bool {
        #[cfg(feature = "sabotage")]
        if self.scenario.skip_fence {
            return true;
        }
        false
    }

    /// The store writer reports `ticket` durable: what queued up to it is
    /// applied, each transaction behind the lease's fence, then what waited on
    /// it is released, unless the write fails, is fenced, or the process dies
    /// or stops between the two.
    fn store_durable(&mut self, c: usize, process: u64, ticket: u64) {
        let node = &self.controllers[c];
        if node.process != process || node.core.is_none() {
            return;
        }
        if self.failover_faults_on() && self.rng.random_bool(0.002) {
            // Stopped with this group commit sent and unanswered: the server sees it when the
            // process runs again (or killed the session meanwhile, and the writer retries it).
            *self.faults.entry("leader pause mid-commit").or_insert(0) += 1;
            self.pause_controller(c, Some(Event::StoreDurable(c, process, ticket)));
            return;
        }
        if self.controllers[c].store_cut.is_some() {
            // Refused: the writer tries the batch again a little later (the fence first).
            self.at(STORE_RETRY_PAUSE_MS, Event::StoreDurable(c, process, ticket));
            return;
        }
        while self.controllers[c].store_queue.front().is_some_and(|(t, _)| *t <= ticket) {
            let (t, ops) = self.controllers[c].store_queue.pop_front().unwrap();
            let exempt = self.submission_ticket == Some((process, t));
            if !self.holds_lease(c) && !self.fence_skipped() {
                // `FENCE` matched no row: the transaction rolls back (StoreError::Deposed), the
                // daemon stops, and systemd starts it again as a standby.
                *self.failover.entry("fenced write").or_insert(0) += 1;
                self.stop_controller(c);
                return;
            }
            if !exempt && self.faults_on() && self.scenario.faults.store_failure && self.rng.random_bool(0.0005) {
                // The transaction rolls back, and the daemon stops before acting on it; its
                // writer sends nothing more.
                *self.faults.entry("store write failure").or_insert(0) += 1;
                self.controllers[c].store_queue.clear();
                self.crash_controller(c, "a store write failed");
                return;
            }
            self.commit(c, t, &ops);
        }
        if self.faults_on() && self.scenario.faults.controller_crash && self.rng.random_bool(0.0005) {
            // Between persisting a decision and sending it.
            self.crash_controller(c, "after persisting, before sending");
            return;
        }
        if self.failover_faults_on() && self.rng.random_bool(0.001) {
            // Stopped between persisting and sending: what waited goes out when it runs again,
            // at its old epoch, whoever leads by then.
            *self.faults.entry("leader pause before sending").or_insert(0) += 1;
            self.pause_controller(c, Some(Event::GateRelease(c, process, ticket)));
            return;
        }
        let node = &mut self.controllers[c];
        for action in node.gate.durable(ticket) {
            self.controller_act(c, action);
        }
    }

    /// One group-commit transaction of controller `c` commits (its fence already passed, or was skipped).
    fn commit(&mut self, c: usize, ticket: u64, ops: &[StoreOp]) {
        let (epoch, process) = (self.controllers[c].epoch, self.controllers[c].process);
        if self.holds_lease(c) {
            // The fence renews on the way.
            self.lease.expires_ms = self.now_ms + self.scenario.lease_ms;
        }
        // At most one controller commits per epoch, and only the epoch the lease hands out now:
        // a deposed leader's write would land on state its successor has already moved on from.
        let name = self.controllers[c].name.clone();
        match self.epoch_committers.get(&epoch) {
            Some(&(other, p)) if (other, p) != (c, process) => {
                let what = format!(
                    "epochs: two controller processes committed at epoch {epoch}: {} (process {p}) and {name} (process {process})",
                    self.controllers[other].name
                );
                self.fail(what);
            }
            Some(_) => {}
            None => drop(self.epoch_committers.insert(epoch, (c, process))),
        }
        if epoch != self.lease.epoch {
            let holder = self.lease.holder.map_or("nobody".to_string(), |h| self.controllers[h].name.clone());
            let what = format!(
                "epochs: {name} committed at epoch {epoch} after epoch {} was taken (by {holder}): a deposed leader wrote",
                self.lease.epoch
            );
            self.fail(what);
        }
        self.observe_persist(epoch, ops);
        self.store.apply(ops).expect("store applies");
        for op in ops {
            if let StoreOp::PutJob(job) = op {
                self.durable_jobs.insert(job.id, job.state);
            }
        }
        self.controllers[c].store_durable = ticket;
        if self.submission_ticket == Some((process, ticket)) {
            self.submission_acked = true;
        }
    }

    /// `COSMOS_SIM_DUMP=1`: prints who holds which GPU, as the controller and the
    /// agents see it, when liveness fails (that is how a GPU stuck faulty shows).
    fn dump(&self) {
        if let Some(c) = self.leader_core() {
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

    /// Watches what the controller persists, at `epoch`, for the properties users rely on.
    fn observe_persist(&mut self, epoch: u64, ops: &[StoreOp]) {
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
                StoreOp::Event(e) => *self.event_kinds.entry(e.kind.clone()).or_insert(0) += 1,
                StoreOp::PutAttempt(a) => {
                    self.attempt_ids.insert(a.id);
                }
                _ => {}
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
                            self.agents[i].fenced.entry(att.id).or_insert(epoch);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// A job is succeeded only once its outputs are safe at the controller.
    fn check_delivered(&mut self, job: &cosmos_controller::records::JobRecord, ops: &[StoreOp]) {
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

    fn crash_controller(&mut self, c: usize, when: &str) {
        *self.faults.entry("controller crash").or_insert(0) += 1;
        let _ = when;
        self.end_controller(c, 100..5_000);
    }

    /// The process lost the lease (a fenced write, a renewal that found another holder): it
    /// exits non-zero, and systemd starts it again, as a standby.
    fn stop_controller(&mut self, c: usize) {
        self.end_controller(c, 100..5_000);
    }

    /// Controller `c`'s process ends: what was not durable is lost with it, and what waited on
    /// it is never sent; its host starts another one `down_ms` later.
    fn end_controller(&mut self, c: usize, down_ms: std::ops::Range<u64>) {
        let cut = self.controllers[c].store_cut.is_some();
        if self.failover_faults_on()
            && !cut
            && self.controllers[c].store_queue.front().is_some()
            && self.rng.random_bool(0.5)
        {
            // The group commit the writer had sent reached the server: durable, though no one hears so.
            *self.faults.entry("commit in flight at exit").or_insert(0) += 1;
            let (t, ops) = self.controllers[c].store_queue.pop_front().expect("looked at above");
            if self.holds_lease(c) || self.fence_skipped() {
                self.commit(c, t, &ops);
            }
        }
        let node = &mut self.controllers[c];
        node.core = None;
        node.up = false;
        node.paused = false;
        node.held.clear();
        node.store_cut = None;
        node.store_held.clear();
        node.store_queue.clear();
        node.gate = Gate::new();
        let conns: Vec<ConnId> = self.conns.iter().filter(|(_, k)| k.controller == c).map(|(&id, _)| id).collect();
        for conn in conns {
            // The process died: the kernel resets its sockets, and agents learn at once or late.
            self.break_conn(conn, 0.9);
        }
        let down = self.rng.random_range(down_ms);
        self.at(down, Event::ControllerRestart(c));
    }

    /// SIGSTOP: controller `c`'s process stops for a third of a lease up to three leases;
    /// `waiting` is the first thing it does once continued. Its sockets stay open.
    fn pause_controller(&mut self, c: usize, waiting: Option<Event>) {
        let lease_ms = self.scenario.lease_ms;
        let ms = self.rng.random_range(lease_ms / 3..lease_ms * 3);
        let node = &mut self.controllers[c];
        node.paused = true;
        node.held.extend(waiting);
        let process = node.process;
        self.at(ms, Event::ControllerWake(c, process));
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
                        self.agents[i].blobs.link_down();
                        self.lost_link(i);
                    }
                    self.schedule_dial(i);
                }
                AgentOut::Stage { attempt_id, inputs } => {
                    *self.transfers.entry("stage").or_insert(0) += 1;
                    let needs: Vec<(Sha256, u64)> = inputs.iter().map(|i| (i.sha256, i.size_bytes)).collect();
                    self.agents[i].blobs.stage(attempt_id, &needs);
                }
                AgentOut::Upload { attempt_id, outputs } => {
                    *self.transfers.entry("upload").or_insert(0) += 1;
                    let now = self.agent_clock(i);
                    let node = &mut self.agents[i];
                    let blobs: Vec<(Sha256, u64)> = outputs.iter().map(|o| (o.sha256, o.size_bytes)).collect();
                    node.delivering.insert(attempt_id, outputs);
                    node.blobs.upload(now, attempt_id, &blobs);
                }
                AgentOut::AbortStage { attempt_id } => {
                    *self.transfers.entry("stage aborted").or_insert(0) += 1;
                    self.agents[i].blobs.abort_stage(attempt_id);
                }
                AgentOut::AbortUpload { attempt_id } => {
                    *self.transfers.entry("upload aborted").or_insert(0) += 1;
                    self.agents[i].delivering.remove(&attempt_id);
                    self.agents[i].blobs.abort_upload(attempt_id);
                }
                AgentOut::Forget { attempt_id } => {
                    // The runtime drops what it kept of an ended attempt the controller has recorded.
                    let node = &mut self.agents[i];
                    if node.containers.get(&attempt_id).is_some_and(|c| c.exited.is_some()) {
                        node.containers.remove(&attempt_id);
                    }
                }
                // The simulated runtime leaves no unclaimed containers behind to reap.
                AgentOut::Reap => *self.transfers.entry("reap").or_insert(0) += 1,
                // Simulated GPUs list no processes, so no process of an attempt can outlive it here.
                AgentOut::KillStrays { attempt_id, pids } => {
                    panic!("the simulated GPUs list no processes, yet the core asked to kill {pids:?} of {attempt_id}")
                }
            }
        }
        self.drive_blobs(i);
    }

    /// Does what agent `i`'s blob machine asks, as the agent's blob engine would, until it asks nothing more.
    fn drive_blobs(&mut self, i: usize) {
        if self.agents[i].core.is_none() {
            return;
        }
        loop {
            let now = self.agent_clock(i);
            let mut transmits = Vec::new();
            if let Some(conn) = self.agents[i].conn {
                while let Some(t) = self.agents[i].blobs.poll_transmit(now) {
                    transmits.push((conn, t));
                }
            }
            let events: Vec<BlobEvent> = std::iter::from_fn(|| self.agents[i].blobs.poll_event()).collect();
            if transmits.is_empty() && events.is_empty() {
                return;
            }
            for (conn, t) in transmits {
                let blob = match t {
                    Transmit::Request { sha256, offset, len_bytes } => BlobUp::Request { sha256, offset, len_bytes },
                    Transmit::Offer { sha256, size_bytes } => BlobUp::Offer { sha256, size_bytes },
                    Transmit::Chunk { sha256, offset, len_bytes } => {
                        let intact = !self.corrupts();
                        BlobUp::Chunk { sha256, offset, len_bytes: u64::from(len_bytes), intact }
                    }
                };
                self.send(conn, Payload::BlobToController(blob));
            }
            for event in events {
                self.blob_event(i, event);
            }
        }
    }

    /// Whether the network damages this chunk (its checksum then fails).
    fn corrupts(&mut self) -> bool {
        if self.faults_on() && self.scenario.faults.transfers && self.rng.random_bool(0.004) {
            *self.faults.entry("chunk corruption").or_insert(0) += 1;
            return true;
        }
        false
    }

    /// The file work and answers agent `i`'s blob machine asks for, on a fake cache.
    fn blob_event(&mut self, i: usize, event: BlobEvent) {
        let now = self.agent_clock(i);
        let name = self.agents[i].name.clone();
        let mut out = Vec::new();
        match event {
            BlobEvent::Resolve { sha256, size_bytes } => {
                let node = &mut self.agents[i];
                let resolution = if node.cache.blobs.get(&sha256) == Some(&size_bytes) {
                    Resolution::Ready
                } else {
                    if node.cache.partial_len(&sha256) > size_bytes {
                        node.cache.partials.remove(&sha256);
                    }
                    Resolution::Fetch { have_bytes: node.cache.partial_len(&sha256) }
                };
                node.blobs.resolved(now, sha256, resolution);
            }
            BlobEvent::WriterStart { sha256, start_bytes, .. } => {
                let node = &mut self.agents[i];
                if start_bytes == 0 {
                    node.cache.partials.remove(&sha256);
                }
                let have = node.cache.partial_len(&sha256);
                if start_bytes != have {
                    let what = format!(
                        "blob bytes: a download of {sha256} on {name} starts at byte {start_bytes}, but its partial file holds {have}"
                    );
                    return self.fail(what);
                }
                node.writers.insert(sha256);
            }
            BlobEvent::WriterClose { sha256 } => {
                let node = &mut self.agents[i];
                node.writers.remove(&sha256);
                // An input is a seeded blob, or an output an earlier job delivered (checked when committed).
                let size = self
                    .input_blobs
                    .iter()
                    .find(|b| b.0 == sha256)
                    .map(|b| b.1)
                    .or_else(|| self.blob_stores.iter().find_map(|cas| cas.blobs.get(&sha256).copied()))
                    .unwrap_or(0);
                let (len, good) = node.cache.partials.get(&sha256).copied().unwrap_or((0, true));
                if len != size || !good {
                    // The fake network never damages bytes past their checksum: only the machine can have
                    // accepted wrong ones, and the real cache's digest check would be all that stops them.
                    let what = format!(
                        "blob digest: {sha256} was committed on {name} with bytes that are not the blob's ({len} of {size} bytes, in place: {good})"
                    );
                    return self.fail(what);
                }
                let disk_fails = self.faults_on() && self.scenario.faults.transfers && self.rng.random_bool(0.03);
                let node = &mut self.agents[i];
                let commit = if disk_fails {
                    *self.faults.entry("cache write failure").or_insert(0) += 1;
                    node.cache.partials.remove(&sha256);
                    Commit::Failed(StageFailure {
                        reason: "simulated: the host cache's disk failed".into(),
                        retry: cosmos_proto::Retry::Retryable,
                    })
                } else {
                    node.cache.partials.remove(&sha256);
                    node.cache.blobs.insert(sha256, size);
                    Commit::Stored
                };
                node.blobs.on_commit(now, sha256, commit);
            }
            BlobEvent::WriterDrop { sha256 } => drop(self.agents[i].writers.remove(&sha256)),
            BlobEvent::InputsReady { attempt_id } => {
                if let Some(core) = self.agents[i].core.as_mut() {
                    core.on_staged(now, attempt_id, Ok(()), &mut out);
                }
            }
            BlobEvent::StageFailed { attempt_id, failure } => {
                *self.faults.entry("staging failure").or_insert(0) += 1;
                if let Some(core) = self.agents[i].core.as_mut() {
                    core.on_staged(now, attempt_id, Err(failure), &mut out);
                }
            }
            BlobEvent::Delivered { attempt_id } => {
                let outputs = self.agents[i].delivering.remove(&attempt_id).unwrap_or_default();
                // The controller that said so is the one at the other end of the link.
                let cas = self.agents[i].conn.and_then(|k| self.conns.get(&k)).map_or(0, |k| self.cas_of(k.controller));
                let store = &self.blob_stores[cas];
                if let Some(o) = outputs.iter().find(|o| store.blobs.get(&o.sha256) != Some(&o.size_bytes)) {
                    let what = format!(
                        "outputs: {attempt_id} was told {} is delivered, but the controller does not hold it",
                        o.path
                    );
                    return self.fail(what);
                }
                // The bytes are at the controller before the agent hears so.
                self.delivered.insert(attempt_id, outputs);
                if let Some(core) = self.agents[i].core.as_mut() {
                    core.on_uploaded(now, attempt_id, Ok(()), &mut out);
                }
            }
            BlobEvent::DeliveryFailed { attempt_id, reason } => {
                *self.faults.entry("delivery failure").or_insert(0) += 1;
                self.agents[i].delivering.remove(&attempt_id);
                if let Some(core) = self.agents[i].core.as_mut() {
                    core.on_uploaded(now, attempt_id, Err(reason), &mut out);
                }
            }
        }
        if !out.is_empty() {
            self.agent_outputs(i, out);
        }
    }

    /// A controller blob frame reaches agent `i`.
    fn agent_blob(&mut self, i: usize, blob: BlobDown) {
        let now = self.agent_clock(i);
        let name = self.agents[i].name.clone();
        let node = &mut self.agents[i];
        match blob {
            BlobDown::Chunk { sha256, offset, len_bytes, intact } => {
                if node.blobs.on_chunk(now, sha256, offset, len_bytes, intact) {
                    // The writer appends what it is handed at the end of the partial file.
                    let (len, good) = node.cache.partials.entry(sha256).or_insert((0, true));
                    let at = *len;
                    *good &= at == offset && intact;
                    *len += len_bytes;
                    let written = *len;
                    if offset < at {
                        return self.fail(format!("blob bytes: {sha256} on {name}: bytes {offset}..{} accepted twice (the partial file holds {at})", offset + len_bytes));
                    }
                    if offset > at {
                        return self.fail(format!("blob bytes: {sha256} on {name}: a chunk at byte {offset} accepted past a hole (the partial file holds {at})"));
                    }
                    if !intact {
                        return self.fail(format!(
                            "blob bytes: {sha256} on {name}: a chunk that failed its checksum was accepted"
                        ));
                    }
                    node.blobs.on_written(sha256, written);
                }
            }
            BlobDown::Control(ControllerBlob::Missing { sha256, reason }) => node.blobs.on_missing(sha256, reason),
            BlobDown::Control(ControllerBlob::Resume { sha256, have_bytes }) => {
                node.blobs.on_resume(now, sha256, have_bytes)
            }
            BlobDown::Control(ControllerBlob::Ack { sha256, have_bytes }) => node.blobs.on_ack(now, sha256, have_bytes),
            BlobDown::Control(ControllerBlob::Stored { sha256 }) => node.blobs.on_stored(sha256),
            BlobDown::Control(ControllerBlob::Refused { sha256, reason, retry }) => {
                node.blobs.on_refused(sha256, reason, retry)
            }
            BlobDown::Control(ControllerBlob::Chunk(_)) => unreachable!("download chunks travel as BlobDown::Chunk"),
        }
        self.drive_blobs(i);
    }

    /// An agent's blob frame reaches the controller: its blob task answers from the fake store.
    fn controller_blob(&mut self, conn_id: ConnId, blob: BlobUp) {
        let Some(c) = self.conns.get(&conn_id).map(|k| k.controller) else { return };
        if self.controllers[c].core.is_none() {
            return;
        }
        let cas = self.cas_of(c);
        let reply = match blob {
            BlobUp::Request { sha256, offset, len_bytes } => {
                match cosmos_controller::blobs::machine::serve(
                    sha256,
                    offset,
                    len_bytes,
                    self.blob_stores[cas].blobs.get(&sha256).copied(),
                ) {
                    Serve::Reply(blob) => Some(BlobDown::Control(blob)),
                    Serve::Read { .. }
                        if self.faults_on() && self.scenario.faults.transfers && self.rng.random_bool(0.003) =>
                    {
                        // A read that failed (too many open files, an I/O error) answers nothing.
                        *self.faults.entry("blob read failure").or_insert(0) += 1;
                        None
                    }
                    Serve::Read { offset, len_bytes } => {
                        let intact = !self.corrupts();
                        Some(BlobDown::Chunk { sha256, offset, len_bytes: u64::from(len_bytes), intact })
                    }
                }
            }
            BlobUp::Offer { sha256, size_bytes } => {
                let stored = self.blob_stores[cas].blobs.get(&sha256).copied();
                let partial = self.blob_stores[cas].partial_len(&sha256);
                let Some(conn) = self.conns.get_mut(&conn_id) else { return };
                match conn.intake.on_offer(sha256, size_bytes, stored, partial) {
                    OfferAction::Reply(blob) => Some(BlobDown::Control(blob)),
                    OfferAction::DiscardThenReply(blob) => {
                        self.blob_stores[cas].partials.remove(&sha256);
                        Some(BlobDown::Control(blob))
                    }
                    OfferAction::StoreEmpty => {
                        self.blob_stores[cas].blobs.insert(sha256, 0);
                        Some(BlobDown::Control(conn.intake.on_committed(sha256, Ok(()))))
                    }
                    OfferAction::Commit => self.controller_commit(conn_id, sha256, size_bytes),
                    OfferAction::Wait => None,
                }
            }
            BlobUp::Chunk { sha256, offset, len_bytes, intact } => {
                let Some(conn) = self.conns.get_mut(&conn_id) else { return };
                match conn.intake.on_chunk(sha256, offset, len_bytes, intact) {
                    ChunkAction::Reply(blob) => Some(BlobDown::Control(blob)),
                    ChunkAction::Ignore => None,
                    ChunkAction::Append => {
                        let (len, good) = self.blob_stores[cas].partials.entry(sha256).or_insert((0, true));
                        if offset != *len {
                            let what = format!(
                                "blob bytes: the controller was told to append {sha256} bytes at {offset}, but its partial file holds {len} (accepted twice, or past a hole)"
                            );
                            return self.fail(what);
                        }
                        *good &= intact;
                        *len += len_bytes;
                        let have = *len;
                        let conn = self.conns.get_mut(&conn_id).expect("looked up above");
                        match conn.intake.on_appended(sha256, offset + len_bytes, have) {
                            Appended::Reply(blob) => Some(BlobDown::Control(blob)),
                            Appended::Ignore => None,
                            Appended::Commit => {
                                let size = conn.intake.size_bytes(&sha256).unwrap_or(have);
                                self.controller_commit(conn_id, sha256, size)
                            }
                        }
                    }
                }
            }
        };
        if let Some(reply) = reply {
            self.send(conn_id, Payload::BlobToAgent(reply));
        }
    }

    /// Verifies and installs a complete upload in the controller's fake store.
    fn controller_commit(&mut self, conn_id: ConnId, sha256: Sha256, size_bytes: u64) -> Option<BlobDown> {
        let cas = self.cas_of(self.conns.get(&conn_id)?.controller);
        let (len, good) = self.blob_stores[cas].partials.get(&sha256).copied().unwrap_or((0, true));
        if len != size_bytes || !good {
            let what = format!(
                "blob digest: the controller committed upload {sha256} with bytes that are not the blob's ({len} of {size_bytes} bytes, in place: {good})"
            );
            self.fail(what);
            return None;
        }
        let store_full = self.faults_on() && self.scenario.faults.transfers && self.rng.random_bool(0.05);
        let result = if store_full {
            *self.faults.entry("blob store full").or_insert(0) += 1;
            Err(("simulated: the controller's blob store is full".to_string(), cosmos_proto::Retry::Terminal))
        } else {
            self.blob_stores[cas].partials.remove(&sha256);
            self.blob_stores[cas].blobs.insert(sha256, size_bytes);
            Ok(())
        };
        let conn = self.conns.get_mut(&conn_id)?;
        if result.is_err() && conn.intake.commit_on_offer(&sha256) {
            self.blob_stores[cas].partials.remove(&sha256);
        }
        Some(BlobDown::Control(conn.intake.on_committed(sha256, result)))
    }

    /// Agent `i` lost its link: given several addresses, it dials the next, as the leader may
    /// be gone for good and a standby taking over at another.
    fn lost_link(&mut self, i: usize) {
        if self.several() {
            self.agents[i].dial_next += 1;
        }
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
        let n = self.controllers.len();
        let c = self.agents[i].dial_next % n;
        let cut = self.agents[i].cut_to_controller || self.agents[i].cut_to_agent;
        let target = &self.controllers[c];
        if cut || target.core.is_none() || target.paused {
            // A stopped process's kernel still accepts the connection, but no handshake comes
            // back; a standby refuses it (`not the leader; try …`) after a round trip; a host
            // whose process is down resets it.
            let wait_ms = if target.paused && !cut {
                HANDSHAKE_TIMEOUT_MS
            } else if n > 1 && target.up {
                *self.failover.entry("dial refused by a standby").or_insert(0) += 1;
                self.latency()
            } else {
                0
            };
            if n == 1 && wait_ms == 0 {
                self.schedule_dial(i);
                return;
            }
            // On to the next address at once; the backoff only after every address failed.
            let node = &mut self.agents[i];
            node.dial_next += 1;
            node.dialing = true;
            let delay = if node.dial_next % n != 0 { DIAL_NEXT_ADDR_MS } else { self.rng.random_range(100..2_000) };
            self.at(wait_ms + delay, Event::AgentDial(i));
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                agent: i,
                controller: c,
                open: true,
                registered: false,
                to_controller: Channel::new(),
                to_agent: Channel::new(),
                intake: Intake::new(),
            },
        );
        self.agents[i].conn = Some(id);
        let mut out = Vec::new();
        let now = self.agent_clock(i);
        self.agents[i].core.as_mut().unwrap().connected(now, &mut out);
        self.agents[i].blobs.link_up(now);
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
                retry: cosmos_proto::Retry::Retryable,
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
        let faults_on = self.now_ms < self.scenario.fault_window_ms;
        if grace_ms > 0 && faults_on && self.scenario.faults.containers && self.rng.random_bool(0.1) {
            // The runtime lost the stop (a Docker daemon that did not answer): the container runs
            // on until the agent core, past the grace and its slack, asks again with no grace.
            *self.faults.entry("stop lost").or_insert(0) += 1;
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
        let wire_ms = match &payload {
            Payload::BlobToController(BlobUp::Chunk { .. }) | Payload::BlobToAgent(BlobDown::Chunk { .. }) => {
                CHUNK_WIRE_MS
            }
            _ => 0,
        };
        let (dir, cut, ch) = match payload {
            Payload::ToController(_) | Payload::BlobToController(_) => {
                (Dir::ToController, agent.cut_to_controller, &mut conn.to_controller)
            }
            Payload::ToAgent(_) | Payload::BlobToAgent(_) => (Dir::ToAgent, agent.cut_to_agent, &mut conn.to_agent),
        };
        let seq = ch.next_seq;
        ch.next_seq += 1;
        ch.queue.push_back((seq, payload));
        if !cut {
            // In order within a connection: never before the previous message.
            let at = (now + latency).max(ch.last_delivery_ms + wire_ms);
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
                let c = self.conns[&conn_id].controller;
                let now = self.controller_clock(c);
                let cas = &self.blob_stores[if self.blob_stores.len() == 1 { 0 } else { c }];
                let node = &mut self.controllers[c];
                let Some(core) = node.core.as_mut() else { return };
                let mut out = Vec::new();
                let name = self.agents[agent].name.clone();
                if let AgentMsg::Hello(hello) = msg {
                    self.conns.get_mut(&conn_id).unwrap().registered = true;
                    let held = held_of(cas, HeldBlobs::wanted_in_hello(&hello));
                    node.last_heard_ms.insert(name.clone(), self.now_ms);
                    core.on_connect(now, conn_id, &name, hello, &held, &mut out);
                } else if registered {
                    let held = held_of(cas, HeldBlobs::wanted(&msg));
                    if core.agent_of_conn(conn_id).is_some() {
                        node.last_heard_ms.insert(name, self.now_ms);
                    }
                    core.on_message(now, conn_id, msg, &held, &mut out);
                }
                self.controller_outputs(c, out);
            }
            Payload::BlobToController(blob) => self.controller_blob(conn_id, blob),
            Payload::BlobToAgent(blob) => {
                if self.agents[agent].conn == Some(conn_id) && self.agents[agent].core.is_some() {
                    self.agent_blob(agent, blob);
                }
            }
            Payload::ToAgent(msg) => {
                if self.agents[agent].conn != Some(conn_id) {
                    return; // The agent abandoned this connection.
                }
                let reconcile = matches!(msg, ControllerMsg::Reconcile { .. });
                let (epoch, assigned) = match &msg {
                    ControllerMsg::Welcome { epoch, .. } | ControllerMsg::Reconcile { epoch, .. } => {
                        (Some(epoch.0), None)
                    }
                    ControllerMsg::Assign(a) => (Some(a.epoch.0), Some(a.attempt_id)),
                    _ => (None, None),
                };
                let seen = self.agents[agent].epoch_seen;
                let stale = (reconcile || assigned.is_some()) && epoch.is_some_and(|e| e < seen);
                let mut out = Vec::new();
                let now = self.agent_clock(agent);
                let Some(core) = self.agents[agent].core.as_mut() else { return };
                core.on_message(now, msg, &mut out);
                if stale {
                    // An order from an older epoch than one this agent process was already handed
                    // (a deposed leader's): agents fence on the epoch, so it must change nothing.
                    let acted = out.iter().any(|o| match o {
                        AgentOut::Start { attempt_id, .. } | AgentOut::Stage { attempt_id, .. } => {
                            Some(*attempt_id) == assigned
                        }
                        AgentOut::Stop { .. } => reconcile,
                        _ => false,
                    });
                    if acted {
                        let what = format!(
                            "agent fencing: {} acted on a {} from epoch {} after it was handed epoch {seen}",
                            self.agents[agent].name,
                            if reconcile { "reconcile" } else { "assign" },
                            epoch.unwrap_or(0)
                        );
                        self.fail(what);
                    }
                    *self.failover.entry("stale order refused").or_insert(0) += 1;
                } else if let Some(e) = epoch {
                    self.agents[agent].epoch_seen = seen.max(e);
                }
                self.agent_outputs(agent, out);
                if reconcile && !stale {
                    // What its sender knew: a reconcile of an older epoch, released late by a
                    // leader that was stopped, knows nothing of what its successor gave up.
                    let node = &mut self.agents[agent];
                    let upto = epoch.unwrap_or(0);
                    let fenced: Vec<AttemptId> =
                        node.fenced.iter().filter(|&(_, &e)| e <= upto).map(|(&a, _)| a).collect();
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
                    let c = conn.controller;
                    let now = self.controller_clock(c);
                    if let Some(core) = self.controllers[c].core.as_mut() {
                        let mut out = Vec::new();
                        core.on_disconnect(now, conn_id, &mut out);
                        self.controller_outputs(c, out);
                    }
                }
            }
            Dir::ToAgent => {
                if self.agents[agent].conn == Some(conn_id) {
                    self.agents[agent].conn = None;
                    if let Some(core) = self.agents[agent].core.as_mut() {
                        core.disconnected();
                        self.agents[agent].blobs.link_down();
                        self.lost_link(agent);
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
        if f.clock_steps {
            kinds.push("controller clock step");
        }
        if f.failover {
            kinds.extend(["leader pause", "leader host down", "standby crash", "leader cut off from the store"]);
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
                // The leader, paused or not (kill -9 ends a stopped process too).
                if let Some(c) = self.controllers.iter().position(|n| n.core.is_some()) {
                    let c = self.leader().unwrap_or(c);
                    self.crash_controller(c, "at an arbitrary point");
                }
            }
            "controller clock step" => {
                // NTP stepping a drifted clock, a VM resumed: minutes either way,
                // which no deadline of the core may notice.
                let c = if self.several() { self.rng.random_range(0..self.controllers.len()) } else { 0 };
                let minutes = self.rng.random_range(1..=30i64);
                let sign = if self.rng.random_bool(0.5) { 1 } else { -1 };
                self.controllers[c].wall_offset_ms += sign * minutes * 60_000;
            }
            "leader pause" => {
                // SIGSTOP, a long GC pause, a frozen VM: some shorter than the lease, most longer.
                if let Some(c) = self.leader().filter(|&c| !self.controllers[c].paused) {
                    self.pause_controller(c, None);
                }
            }
            "leader host down" => {
                // Down for one to three leases: long enough that a standby takes over.
                if let Some(c) = self.leader() {
                    let lease_ms = self.scenario.lease_ms;
                    self.end_controller(c, lease_ms..3 * lease_ms);
                }
            }
            "leader cut off from the store" => {
                // PostgreSQL unreachable from the leader's host alone, for up to three leases:
                // its agents' links and the standby's connection work on.
                if let Some(c) = self.leader().filter(|&c| self.controllers[c].store_cut.is_none()) {
                    let black_hole = self.rng.random_bool(0.5);
                    let lease_ms = self.scenario.lease_ms;
                    let lasts = self.rng.random_range(lease_ms / 3..lease_ms * 3);
                    let node = &mut self.controllers[c];
                    node.store_cut = Some(black_hole);
                    let process = node.process;
                    self.at(lasts, Event::StoreHeal(c, process));
                }
            }
            "standby crash" => {
                if let Some(c) = self.controllers.iter().position(|n| n.up && n.core.is_none()) {
                    self.crash_controller(c, "standing by");
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
        for node in &self.controllers {
            let Some(core) = &node.core else { continue };
            if let Err(e) = core.check_invariants() {
                return self.fail(format!("controller core ({}): {e}", node.name));
            }
            for id in &self.submitted {
                if core.job(*id).is_none() {
                    return self.fail(format!("job {id} was lost: controller {} no longer knows it", node.name));
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

    /// Nothing acknowledged is lost across a takeover: what controller `c` loads holds every
    /// submitted job, each in the state last durably committed (no final job going back).
    fn check_takeover_loaded_acknowledged(&mut self, c: usize, snapshot: &cosmos_controller::records::Snapshot) {
        let loaded: HashMap<JobId, JobState> = snapshot.jobs.iter().map(|j| (j.id, j.state)).collect();
        let name = &self.controllers[c].name;
        let epoch = snapshot.epoch.0;
        let what = if let Some(id) = self.submitted.iter().find(|id| !loaded.contains_key(id)) {
            Some(format!(
                "acknowledged: {name} took over at epoch {epoch} and loaded no job {id}, though its submission was acknowledged"
            ))
        } else {
            self.durable_jobs.iter().find(|&(id, s)| loaded.get(id) != Some(s)).map(|(id, s)| {
                format!(
                    "acknowledged: job {id} was committed as {s:?}, but {name} took over at epoch {epoch} and loaded {:?}",
                    loaded.get(id)
                )
            })
        };
        if let Some(what) = what {
            self.fail(what);
        }
    }

    /// At the end, the store still holds every submitted job, each as last committed.
    fn check_store_kept_acknowledged(&mut self) {
        for &id in &self.submitted {
            let stored = self.store.job(id).expect("store reads").map(|j| j.state);
            if stored.is_none() || stored != self.durable_jobs.get(&id).copied() {
                let what = format!(
                    "acknowledged: at the end the store holds job {id} as {stored:?}, but it was last committed as {:?}",
                    self.durable_jobs.get(&id)
                );
                return self.fail(what);
            }
        }
    }

    /// After every job ended and things settled: nothing left running, no transfer left unfinished,
    /// and each job that took another's output ran on it, or, if that one did not succeed, did not run.
    fn check_quiescent(&mut self) {
        if let Some(core) = self.leader_core() {
            for &(i, j) in &self.takes {
                let (Some((rec, _, _)), Some((dep, _, _))) = (core.job(self.submitted[i]), core.job(self.submitted[j]))
                else {
                    continue;
                };
                let input =
                    rec.spec.inputs.iter().find(|x| x.path == SIM_MODEL_INPUT).map(|x| (x.sha256, x.size_bytes));
                let made = dep.outputs.iter().find(|o| o.path == SIM_MODEL).map(|o| (o.sha256, o.size_bytes));
                let what = match (dep.state, rec.state) {
                    (JobState::Succeeded, _) if input.is_none() || input != made => Some(format!(
                        "{} takes {SIM_MODEL} of {}, which succeeded making {made:?}, but its input is {input:?}",
                        rec.id, dep.id
                    )),
                    (JobState::Failed | JobState::Cancelled, s) if s != JobState::Cancelled || input.is_some() => {
                        Some(format!(
                            "{} waited for {}, which {:?}, yet is {s:?} with input {input:?}",
                            rec.id, dep.id, dep.state
                        ))
                    }
                    _ => None,
                };
                if let Some(what) = what {
                    return self.fail(format!("dependencies: {what}"));
                }
            }
        }
        for node in &self.agents {
            if node.core.is_some() && node.conn.is_some() && !node.blobs.is_idle() {
                let busy: Vec<AttemptId> = node.blobs.busy_attempts().collect();
                let what = format!("blob transfers of {} never finished though it is reachable: {busy:?}", node.name);
                return self.fail(what);
            }
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

/// The output a job makes that a later one may take as its input.
const SIM_MODEL: &str = "out/model.bin";
/// Where such a job takes it.
const SIM_MODEL_INPUT: &str = "data/model.bin";

/// What the simulated blob store holds of `wanted`.
fn held_of(store: &SimCas, wanted: Vec<&ArtifactRef>) -> HeldBlobs {
    let mut held = HeldBlobs::none();
    for o in wanted {
        if store.blobs.get(&o.sha256) == Some(&o.size_bytes) {
            held.insert(o.sha256, o.size_bytes);
        }
    }
    held
}

/// What a fake container that exited 0 produced: its expected outputs, with a
/// digest that differs per attempt, so a mix-up between attempts would show.
fn sim_outputs(att: AttemptId, paths: &[String]) -> Vec<ArtifactRef> {
    let digest = Sha256(std::array::from_fn(|n| (att.0 >> (8 * (n % 8))) as u8));
    // Some fit one chunk, some take several, some end mid-chunk.
    let size_bytes = (att.0 % 4) * MIB + (att.0 * 7919) % MIB + 1;
    paths.iter().map(|path| ArtifactRef { path: path.clone(), sha256: digest, size_bytes }).collect()
}

/// The agent's blob machine, as the scenario has it built.
fn new_flow(scenario: &Scenario) -> Flow {
    #[cfg(feature = "sabotage")]
    if scenario.blob_sabotage != cosmos_agent::blobs::machine::Sabotage::None {
        return Flow::sabotaged(scenario.blob_sabotage);
    }
    let _ = scenario;
    Flow::new()
}
