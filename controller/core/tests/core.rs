//! Behaviour of the scheduling core, driven only through its public API.
//!
//! A small fake cluster ([`Cluster`]) connects agents, feeds the core their
//! messages and records what it answers. After every call it checks that the
//! core is consistent and that everything a user can see changed was persisted
//! before anything was sent. Run with `cargo test -p cosmos-controller --test core`.

use cosmos_controller_core::core::{
    CommandError, ConnId, Core, CoreConfig, Dep, Health, HeldBlobs, InputFromDep, Now, Output, SubmitError,
    SubmitOptions,
};
use cosmos_controller_core::records::{
    AgentRecord, AttemptRecord, AttemptState, JobRecord, JobState, Snapshot, StoreOp,
};
use cosmos_proto::Classify;
use cosmos_proto::spec::ArtifactRef;
use cosmos_proto::{
    AgentHello, AgentMsg, Assign, AttemptId, AttemptOutcome, AttemptPhase, AttemptReport, ControllerMsg, Epoch,
    GpuInfo, GpuUsage, Heartbeat, JobId, JobSpec, Sha256,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

const GIB: u64 = 1 << 30;

// ---- the fake cluster ----

/// A host the test connects: its name and GPUs.
#[derive(Clone)]
struct Host {
    gpus: Vec<GpuInfo>,
}

struct Cluster {
    core: Core,
    /// The monotonic clock the core is fed.
    now: u64,
    /// How far the wall clock is from the monotonic one (stepped by tests).
    wall_offset_ms: i64,
    /// Outputs the controller's blob store does not hold, by digest (others it holds).
    blobs_missing: BTreeSet<Sha256>,
    next_conn: ConnId,
    hosts: BTreeMap<String, Host>,
    /// The connection each agent uses now.
    conn_of: HashMap<String, ConnId>,
    agent_of: HashMap<ConnId, String>,
    /// Every op persisted, in order, across every core this cluster has run.
    persisted: Vec<StoreOp>,
    /// Every message sent, in order: (agent, message).
    sent: Vec<(String, ControllerMsg)>,
    /// Connections the core closed.
    closed: Vec<ConnId>,
    /// Every attempt id ever assigned, across restarts too.
    attempt_ids: HashSet<AttemptId>,
    /// The next heartbeat sequence number.
    seq: u64,
}

/// Timeouts long enough that no test not about liveness sees a host go suspect.
fn quiet_config() -> CoreConfig {
    CoreConfig { suspect_after_ms: 3_600_000, lost_after_ms: 7_200_000, ..CoreConfig::default() }
}

fn gpu_uuid(host: &str, index: u32) -> String {
    format!("GPU-{host}-{index}")
}

fn spec(name: &str) -> JobSpec {
    JobSpec::command(name, ["python3", "train.py"])
}

fn spec_gpus(name: &str, gpus: u32) -> JobSpec {
    JobSpec { gpus, ..spec(name) }
}

fn succeeded() -> AttemptOutcome {
    AttemptOutcome::Succeeded { outputs: Vec::new() }
}

fn failed(retryable: bool) -> AttemptOutcome {
    AttemptOutcome::Failed {
        exit_code: Some(1),
        reason: "CUDA out of memory".into(),
        retry: cosmos_proto::Retry::when(retryable),
    }
}

fn running_report(att: &Assign) -> AttemptReport {
    AttemptReport {
        attempt_id: att.attempt_id,
        phase: AttemptPhase::Running { step: 1, total: 10 },
        gpu_uuids: att.gpu_uuids.clone(),
    }
}

impl Cluster {
    fn new(config: CoreConfig) -> Cluster {
        let core = Core::recover(config, Snapshot { epoch: Epoch(1), ..Default::default() }, Now::at(0));
        core.check_invariants().expect("a fresh core is consistent");
        Cluster {
            core,
            now: 0,
            wall_offset_ms: 0,
            blobs_missing: BTreeSet::new(),
            next_conn: 1,
            hosts: BTreeMap::new(),
            conn_of: HashMap::new(),
            agent_of: HashMap::new(),
            persisted: Vec::new(),
            sent: Vec::new(),
            closed: Vec::new(),
            attempt_ids: HashSet::new(),
            seq: 0,
        }
    }

    fn quiet() -> Cluster {
        Cluster::new(quiet_config())
    }

    /// Runs one core call and checks what it did: invariants, persist-before-send,
    /// every visible change persisted, attempt ids never reused.
    fn call<R>(&mut self, f: impl FnOnce(&mut Core, Now, &mut Vec<Output>) -> R) -> (R, Vec<Output>) {
        let jobs_before: BTreeMap<JobId, JobRecord> = self.core.jobs().map(|j| (j.id, j.clone())).collect();
        let live_before: BTreeMap<AttemptId, AttemptRecord> =
            self.core.live_attempts().map(|a| (a.id, a.clone())).collect();
        let drain_before: BTreeMap<String, bool> =
            self.core.agents().into_iter().map(|a| (a.name, a.draining)).collect();
        let mut out = Vec::new();
        let now = self.clock();
        let r = f(&mut self.core, now, &mut out);
        if let Err(e) = self.core.check_invariants() {
            panic!("invariant broken at {} ms: {e}\noutputs: {out:#?}", self.now);
        }

        // One Persist at most, and before every Send and Close.
        let persists: Vec<usize> =
            out.iter().enumerate().filter(|(_, o)| matches!(o, Output::Persist(_))).map(|(i, _)| i).collect();
        assert!(persists.len() <= 1, "more than one Persist in one call: {out:#?}");
        if let Some(&p) = persists.first() {
            assert_eq!(p, 0, "a Persist comes after something was sent: {out:#?}");
        }
        let ops: Vec<StoreOp> = match out.first() {
            Some(Output::Persist(ops)) => ops.clone(),
            _ => Vec::new(),
        };
        let last_job_put = |id: JobId| {
            ops.iter().rev().find_map(|op| match op {
                StoreOp::PutJob(j) if j.id == id => Some((**j).clone()),
                _ => None,
            })
        };
        let last_attempt_put = |id: AttemptId| {
            ops.iter().rev().find_map(|op| match op {
                StoreOp::PutAttempt(a) if a.id == id => Some(a.clone()),
                _ => None,
            })
        };

        // Every job whose record changed was persisted as it is now.
        for job in self.core.jobs() {
            if jobs_before.get(&job.id) != Some(job) {
                assert_eq!(last_job_put(job.id).as_ref(), Some(job), "job {} changed but was not persisted", job.id);
            }
        }
        // Every live attempt that appeared, changed or ended was persisted.
        let live_after: BTreeMap<AttemptId, AttemptRecord> =
            self.core.live_attempts().map(|a| (a.id, a.clone())).collect();
        for (id, att) in &live_after {
            if live_before.get(id) != Some(att) {
                assert_eq!(last_attempt_put(*id).as_ref(), Some(att), "attempt {id} changed but was not persisted");
            }
        }
        for id in live_before.keys().filter(|id| !live_after.contains_key(id)) {
            let put = last_attempt_put(*id).unwrap_or_else(|| panic!("attempt {id} ended but was not persisted"));
            assert!(!put.state.is_live(), "attempt {id} ended but was persisted as {:?}", put.state);
        }
        // An operator drain is persisted.
        for agent in self.core.agents() {
            if drain_before.get(&agent.name).is_some_and(|&d| d != agent.draining) {
                assert!(
                    ops.iter().any(
                        |op| matches!(op, StoreOp::PutAgent(a) if a.name == agent.name && a.draining == agent.draining)
                    ),
                    "agent {} drain change not persisted",
                    agent.name
                );
            }
        }

        for o in &out {
            match o {
                Output::Persist(ops) => self.persisted.extend(ops.iter().cloned()),
                Output::Send { conn, msg } => {
                    let agent =
                        self.agent_of.get(conn).cloned().unwrap_or_else(|| panic!("send on unknown conn {conn}"));
                    if let ControllerMsg::Assign(a) = msg {
                        assert!(self.attempt_ids.insert(a.attempt_id), "attempt id {} reused", a.attempt_id);
                        assert_eq!(a.epoch, self.core.epoch(), "Assign carries the current epoch");
                        assert_eq!(
                            last_attempt_put(a.attempt_id).map(|p| p.state),
                            Some(AttemptState::Assigned),
                            "{} sent before it was persisted",
                            a.attempt_id
                        );
                        assert_eq!(a.gpu_uuids.len() as u32, a.spec.gpus, "Assign names as many GPUs as asked");
                        let distinct: HashSet<&String> = a.gpu_uuids.iter().collect();
                        assert_eq!(distinct.len(), a.gpu_uuids.len(), "Assign names a GPU twice: {:?}", a.gpu_uuids);
                        assert!(
                            a.gpu_uuids.iter().all(|u| self.hosts[&agent].gpus.iter().any(|g| &g.uuid == u)),
                            "Assign to {agent} names GPUs it does not have: {:?}",
                            a.gpu_uuids
                        );
                    }
                    self.sent.push((agent, msg.clone()));
                }
                Output::Close { conn } => self.closed.push(*conn),
            }
        }
        (r, out)
    }

    fn hello(&self, name: &str, attempts: Vec<AttemptReport>) -> AgentHello {
        AgentHello {
            gpus: self.hosts[name].gpus.clone(),
            gpus_simulated: true,
            runtime: "simulated".into(),
            attempts,
            incarnation: 1,
        }
    }

    /// Connects (or reconnects) a host with `gpus` GPUs of `vram_gib` GiB each.
    fn connect(&mut self, name: &str, gpus: u32, vram_gib: u64) -> Vec<Output> {
        self.add_host(name, gpus, vram_gib);
        self.reconnect(name, Vec::new())
    }

    fn add_host(&mut self, name: &str, gpus: u32, vram_gib: u64) {
        let gpus = (0..gpus)
            .map(|i| GpuInfo {
                index: i,
                uuid: gpu_uuid(name, i),
                name: "NVIDIA H100 80GB HBM3".into(),
                total_vram_bytes: vram_gib * GIB,
            })
            .collect();
        self.hosts.insert(name.to_string(), Host { gpus });
    }

    /// A new connection from a known host, reporting `attempts`.
    fn reconnect(&mut self, name: &str, attempts: Vec<AttemptReport>) -> Vec<Output> {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conn_of.insert(name.to_string(), conn);
        self.agent_of.insert(conn, name.to_string());
        let hello = self.hello(name, attempts);
        let name_owned = name.to_string();
        let held = self.held(HeldBlobs::wanted_in_hello(&hello));
        self.call(|core, now, out| core.on_connect(now, conn, &name_owned, hello, &held, out)).1
    }

    fn send(&mut self, name: &str, msg: AgentMsg) -> Vec<Output> {
        let conn = self.conn_of[name];
        let held = self.held(HeldBlobs::wanted(&msg));
        self.call(|core, now, out| core.on_message(now, conn, msg, &held, out)).1
    }

    fn disconnect(&mut self, name: &str) -> Vec<Output> {
        let conn = self.conn_of[name];
        self.call(|core, now, out| core.on_disconnect(now, conn, out)).1
    }

    fn submit(&mut self, specs: Vec<JobSpec>) -> Result<Vec<JobId>, SubmitError> {
        self.call(|core, now, out| core.submit(now, specs, out)).0
    }

    fn submit_ok(&mut self, specs: Vec<JobSpec>) -> (Vec<JobId>, Vec<Output>) {
        let (r, out) = self.call(|core, now, out| core.submit(now, specs, out));
        (r.expect("submission accepted"), out)
    }

    fn cancel(&mut self, id: JobId) -> (Result<(), CommandError>, Vec<Output>) {
        self.call(|core, now, out| core.cancel(now, id, out))
    }

    fn drain(&mut self, name: &str, draining: bool) -> Vec<Output> {
        let name = name.to_string();
        let (r, out) = self.call(|core, now, out| core.set_draining(now, &name, draining, out));
        r.expect("known agent");
        out
    }

    /// What the blob store holds of `wanted`: all of it, but the digests a test made go missing.
    fn held(&self, wanted: Vec<&ArtifactRef>) -> HeldBlobs {
        HeldBlobs::all(wanted.into_iter().filter(|o| !self.blobs_missing.contains(&o.sha256)))
    }

    /// What the core reads on both clocks now.
    fn clock(&self) -> Now {
        Now { mono_ms: self.now, wall_ms: (self.now as i64 + self.wall_offset_ms) as u64 }
    }

    fn tick_at(&mut self, now: u64) -> Vec<Output> {
        assert!(now >= self.now, "time does not go back");
        self.now = now;
        self.call(|core, now, out| core.tick(now, out)).1
    }

    fn started(&mut self, name: &str, attempt_id: AttemptId) -> Vec<Output> {
        self.send(name, AgentMsg::AttemptStarted { attempt_id, handle: format!("pid-{}", attempt_id.0) })
    }

    fn finished(&mut self, name: &str, attempt_id: AttemptId, outcome: AttemptOutcome) -> Vec<Output> {
        self.send(name, AgentMsg::AttemptFinished { attempt_id, outcome })
    }

    /// A heartbeat reporting each GPU's free VRAM (`free_gib[i]` for GPU i) and `attempts`.
    fn heartbeat(&mut self, name: &str, free_gib: &[u64], attempts: Vec<AttemptReport>) -> Vec<Output> {
        self.heartbeat_health(name, free_gib, &[], attempts)
    }

    /// A heartbeat as [`Cluster::heartbeat`] with the GPUs of `unhealthy` (indexes) reported unhealthy.
    fn heartbeat_health(
        &mut self,
        name: &str,
        free_gib: &[u64],
        unhealthy: &[usize],
        attempts: Vec<AttemptReport>,
    ) -> Vec<Output> {
        self.seq += 1;
        let gpus = self.hosts[name]
            .gpus
            .iter()
            .zip(free_gib)
            .enumerate()
            .map(|(i, (g, &free))| GpuUsage {
                uuid: g.uuid.clone(),
                used_vram_bytes: g.total_vram_bytes - free * GIB,
                free_vram_bytes: free * GIB,
                foreign_vram_bytes: 0,
                utilization_pct: None,
                temperature_c: None,
                healthy: !unhealthy.contains(&i),
                quarantine: None,
            })
            .collect();
        let seq = self.seq;
        self.send(name, AgentMsg::Heartbeat(Heartbeat { seq, gpus, attempts, unhealthy: None }))
    }

    /// A heartbeat with every GPU fully free and no attempts listed.
    fn beat(&mut self, name: &str) -> Vec<Output> {
        let free: Vec<u64> = self.hosts[name].gpus.iter().map(|g| g.total_vram_bytes / GIB).collect();
        self.heartbeat(name, &free, Vec::new())
    }

    fn sent_since(&self, from: usize) -> &[(String, ControllerMsg)] {
        &self.sent[from..]
    }

    fn state(&self, id: JobId) -> JobState {
        self.core.job(id).expect("job exists").0.state
    }

    fn record(&self, id: JobId) -> JobRecord {
        self.core.job(id).expect("job exists").0.clone()
    }

    /// The live attempt of a job.
    fn live(&self, id: JobId) -> Option<AttemptRecord> {
        self.core.job(id).expect("job exists").2.cloned()
    }

    /// Builds what a store would hold after every op persisted so far.
    fn snapshot(&self, epoch: Epoch) -> Snapshot {
        let mut jobs: BTreeMap<JobId, JobRecord> = BTreeMap::new();
        let mut attempts: BTreeMap<AttemptId, AttemptRecord> = BTreeMap::new();
        let mut agents: BTreeMap<String, AgentRecord> = BTreeMap::new();
        let (mut max_job_id, mut max_attempt_id) = (None, None);
        for op in &self.persisted {
            match op {
                StoreOp::PutJob(j) => {
                    jobs.insert(j.id, (**j).clone());
                }
                StoreOp::PutAttempt(a) => {
                    attempts.insert(a.id, a.clone());
                }
                StoreOp::PutAgent(a) => {
                    agents.insert(a.name.clone(), a.clone());
                }
                StoreOp::PruneJobs { jobs: pruned, job_id_max, attempt_id_max } => {
                    jobs.retain(|id, _| !pruned.contains(id));
                    attempts.retain(|_, a| !pruned.contains(&a.job_id));
                    max_job_id = max_job_id.max(Some(*job_id_max));
                    max_attempt_id = max_attempt_id.max(Some(*attempt_id_max));
                }
                StoreOp::Event(_) | StoreOp::PutPrompt(_) | StoreOp::DeletePrompt(_) => {}
            }
        }
        Snapshot {
            epoch,
            max_attempt_id: attempts.keys().next_back().copied().max(max_attempt_id),
            max_job_id,
            jobs: jobs.into_values().map(Box::new).collect(),
            live_attempts: attempts.into_values().filter(|a| a.state.is_live()).collect(),
            agents: agents.into_values().collect(),
        }
    }

    /// Simulates a controller restart: a new core from the persisted state, every connection gone.
    fn restart(&mut self, config: CoreConfig, epoch: Epoch) {
        let snapshot = self.snapshot(epoch);
        self.core = Core::recover(config, snapshot, self.clock());
        self.core.check_invariants().expect("a recovered core is consistent");
        self.conn_of.clear();
    }
}

/// The Assign messages among `out`, with the agent each went to.
fn assigns(cluster: &Cluster, out: &[Output]) -> Vec<(String, Assign)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { conn, msg: ControllerMsg::Assign(a) } => {
                Some((cluster.agent_of[conn].clone(), (**a).clone()))
            }
            _ => None,
        })
        .collect()
}

/// The one Assign among `out`.
fn one_assign(cluster: &Cluster, out: &[Output]) -> (String, Assign) {
    let mut all = assigns(cluster, out);
    assert_eq!(all.len(), 1, "expected exactly one Assign in {out:#?}");
    all.pop().unwrap()
}

fn sends_to(cluster: &Cluster, out: &[Output], name: &str) -> Vec<ControllerMsg> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { conn, msg } if cluster.agent_of[conn] == name => Some(msg.clone()),
            _ => None,
        })
        .collect()
}

/// Whether some AckFinished among `msgs` acknowledges `id`.
fn acked(msgs: &[ControllerMsg], id: AttemptId) -> bool {
    msgs.iter().any(|m| matches!(m, ControllerMsg::AckFinished { attempt_ids } if attempt_ids.contains(&id)))
}

// ---- ordering ----

#[test]
fn jobs_run_in_priority_order_then_submission_order() {
    let mut c = Cluster::quiet();
    let prios = [0, 5, 0, 10, 5, -1];
    let specs: Vec<JobSpec> =
        prios.iter().enumerate().map(|(i, &p)| JobSpec { priority: p, ..spec(&format!("j{i}")) }).collect();
    let (ids, out) = c.submit_ok(specs);
    assert!(assigns(&c, &out).is_empty(), "no host yet, nothing placed");
    assert!(ids.iter().all(|&id| c.state(id) == JobState::Queued));
    assert_eq!(c.core.queue_depth(), 6);

    let out = c.connect("a", 1, 80);
    let mut order = Vec::new();
    let (_, mut a) = one_assign(&c, &out);
    loop {
        order.push(a.job_id);
        let out = c.finished("a", a.attempt_id, succeeded());
        match assigns(&c, &out).pop() {
            Some((_, next)) => a = next,
            None => break,
        }
    }
    // 10, then the 5s by submission, then the 0s by submission, then -1.
    assert_eq!(order, vec![ids[3], ids[1], ids[4], ids[0], ids[2], ids[5]]);
    assert!(ids.iter().all(|&id| c.state(id) == JobState::Succeeded));
    assert_eq!(c.core.queue_depth(), 0);
}

#[test]
fn a_job_runs_through_assigned_running_succeeded() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let (ids, out) = c.submit_ok(vec![spec("j")]);
    let (host, a) = one_assign(&c, &out);
    assert_eq!(host, "a");
    assert_eq!(a.job_id, ids[0]);
    assert_eq!(c.state(ids[0]), JobState::Assigned);
    assert_eq!(c.record(ids[0]).agent.as_deref(), Some("a"));
    c.started("a", a.attempt_id);
    assert_eq!(c.state(ids[0]), JobState::Running);
    assert_eq!(c.live(ids[0]).unwrap().state, AttemptState::Running);
    let out = c.finished("a", a.attempt_id, succeeded());
    assert!(sends_to(&c, &out, "a").contains(&ControllerMsg::AckFinished { attempt_ids: vec![a.attempt_id] }));
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(rec.exit_code, Some(0));
    assert!(c.live(ids[0]).is_none());
    assert_eq!(c.core.live_attempts().count(), 0);
}

#[test]
fn a_success_without_its_required_outputs_is_run_again() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let mut job = spec("video");
    job.outputs = vec![cosmos_proto::OutputArtifact { path: "outputs/output.mp4".into(), required: true }];
    let (ids, out) = c.submit_ok(vec![job]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    c.finished("a", a.attempt_id, succeeded());
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Retrying, "nothing to download is not a success");
    assert!(rec.error.as_deref().unwrap_or("").contains("outputs/output.mp4"), "{:?}", rec.error);
    let later = c.now + 120_000;
    let out = c.tick_at(later);
    let (_, again) = one_assign(&c, &out);
    c.started("a", again.attempt_id);
    let output = cosmos_proto::ArtifactRef {
        path: "outputs/output.mp4".into(),
        sha256: cosmos_proto::Sha256([7; 32]),
        size_bytes: 10,
    };
    c.finished("a", again.attempt_id, AttemptOutcome::Succeeded { outputs: vec![output.clone()] });
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(rec.outputs, vec![output]);
}

#[test]
fn a_success_whose_outputs_are_not_in_the_blob_store_is_run_again() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("video")]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    let output = ArtifactRef { path: "out.mp4".into(), sha256: Sha256([9; 32]), size_bytes: 10 };
    // The agent says it delivered, but the controller's store does not hold it whole.
    c.blobs_missing.insert(output.sha256);
    c.finished("a", a.attempt_id, AttemptOutcome::Succeeded { outputs: vec![output.clone()] });
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Retrying, "outputs that are not here are not a success");
    let error = rec.error.unwrap_or_default();
    assert!(error.contains("not in the controller's blob store") && error.contains("out.mp4"), "{error}");

    c.blobs_missing.clear();
    let out = c.tick_at(c.now + 120_000);
    let (_, again) = one_assign(&c, &out);
    c.started("a", again.attempt_id);
    c.finished("a", again.attempt_id, AttemptOutcome::Succeeded { outputs: vec![output.clone()] });
    assert_eq!(c.record(ids[0]).outputs, vec![output]);
}

#[test]
fn records_submitted_with_a_batch_share_its_persist_and_a_repeat_stores_nothing() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let key = || Some(cosmos_controller_core::records::Idempotency { key: "k1".into(), request_sha256: "d1".into() });
    let extra = vec![StoreOp::DeletePrompt("ps_000000000001".into())];
    let ((ids, repeat), out) = c.call(|core, now, out| {
        core.submit_with(now, vec![spec("run")], SubmitOptions { key: key(), extra, ..Default::default() }, out)
            .unwrap()
    });
    assert!(!repeat);
    let persists: Vec<&Vec<StoreOp>> =
        out.iter().filter_map(|o| if let Output::Persist(ops) = o { Some(ops) } else { None }).collect();
    assert_eq!(persists.len(), 1, "{out:?}");
    assert!(persists[0].iter().any(|op| matches!(op, StoreOp::PutJob(j) if j.id == ids[0])));
    assert!(persists[0].contains(&StoreOp::DeletePrompt("ps_000000000001".into())), "{:?}", persists[0]);

    // The same key and request: the same jobs, and nothing stored again.
    let again = vec![StoreOp::DeletePrompt("ps_000000000002".into())];
    let ((same, repeat), out) = c.call(|core, now, out| {
        core.submit_with(now, vec![spec("run")], SubmitOptions { key: key(), extra: again, ..Default::default() }, out)
            .unwrap()
    });
    assert_eq!((same, repeat), (ids, true));
    assert!(!out.iter().any(|o| matches!(o, Output::Persist(_))), "{out:?}");

    // The same key for another request is refused.
    let other = Some(cosmos_controller_core::records::Idempotency { key: "k1".into(), request_sha256: "d2".into() });
    let (r, _) = c.call(|core, now, out| {
        core.submit_with(now, vec![spec("run")], SubmitOptions { key: other, ..Default::default() }, out)
    });
    assert_eq!(r, Err(SubmitError::KeyReused { key: "k1".into() }));
}

#[test]
fn a_failed_job_retried_by_an_operator_runs_again_under_its_id() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 1, ..spec("flaky") }]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    c.finished("a", a.attempt_id, failed(true));
    assert_eq!(c.state(ids[0]), JobState::Failed);

    let (r, out) = c.call(|core, now, out| core.retry(now, ids[0], out));
    r.unwrap();
    let (_, again) = one_assign(&c, &out);
    assert_eq!(again.job_id, ids[0]);
    assert!(again.attempt_id > a.attempt_id, "a new attempt");
    let rec = c.record(ids[0]);
    assert_eq!((rec.state, rec.attempts_used, rec.retries, rec.error), (JobState::Assigned, 0, 1, None));
    c.started("a", again.attempt_id);
    c.finished("a", again.attempt_id, succeeded());
    assert_eq!(c.state(ids[0]), JobState::Succeeded);
    // Only an ended, unsuccessful job can be retried.
    let (r, _) = c.call(|core, now, out| core.retry(now, ids[0], out));
    assert_eq!(r, Err(CommandError::NotRetriable { id: ids[0], state: "succeeded" }));
    let (r, _) = c.call(|core, now, out| core.retry(now, JobId(99), out));
    assert_eq!(r, Err(CommandError::UnknownJob(JobId(99))));
}

#[test]
fn a_queued_job_says_why_it_waits() {
    let mut c = Cluster::quiet();
    let (ids, _) = c.submit_ok(vec![spec_gpus("wide", 4)]);
    assert_eq!(c.core.wait_reason(ids[0]).as_deref(), Some("no agent is connected"));
    c.connect("h1", 2, 80);
    c.connect("h2", 4, 80);
    // The wide job was placed on h2 as soon as it connected; "three" then waits
    // for a set of three, and another wide job for a set of four.
    let (three, _) = c.submit_ok(vec![spec_gpus("three", 3)]);
    assert_eq!(
        c.core.wait_reason(three[0]).as_deref(),
        Some("needs 3 free GPUs on one host; the largest such set is 2 on h1")
    );
    let (more, _) = c.submit_ok(vec![spec_gpus("wide2", 4)]);
    assert_eq!(
        c.core.wait_reason(more[0]).as_deref(),
        Some("needs 4 free GPUs on one host; the largest such set is 2 on h1")
    );
    c.drain("h1", true);
    c.drain("h2", true);
    let why = c.core.wait_reason(more[0]).unwrap();
    assert!(why.contains("draining"), "{why}");
    // A running job does not wait.
    let running = c.core.live_attempts().next().map(|a| a.job_id).unwrap();
    assert_eq!(c.core.wait_reason(running), None);
}

#[test]
fn a_jobs_gpu_time_and_first_start_are_accounted() {
    let mut c = Cluster::quiet();
    c.wall_offset_ms = 1_700_000_000_000;
    c.connect("a", 2, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 2, ..spec_gpus("two", 2) }]);
    let (_, a) = one_assign(&c, &out);
    c.now = 1_000;
    c.started("a", a.attempt_id);
    c.now = 4_000;
    c.finished("a", a.attempt_id, failed(true));
    let rec = c.record(ids[0]);
    assert_eq!(rec.started_ms, Some(1_700_000_001_000));
    assert_eq!(rec.gpu_ms, 2 * 3_000, "two GPUs for three seconds");
    let out = c.tick_at(200_000);
    let (_, b) = one_assign(&c, &out);
    c.started("a", b.attempt_id);
    c.now = 201_000;
    c.finished("a", b.attempt_id, succeeded());
    let rec = c.record(ids[0]);
    assert_eq!(rec.started_ms, Some(1_700_000_001_000), "the first start is kept");
    assert_eq!(rec.gpu_ms, 2 * 3_000 + 2 * 1_000);
}

#[test]
fn a_job_after_another_starts_once_it_succeeds_and_is_cancelled_if_it_fails() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let (first, out) = c.submit_ok(vec![JobSpec { max_attempts: 1, ..spec("first") }, spec("other")]);
    let placed = assigns(&c, &out);
    let a = placed.iter().find(|(_, a)| a.job_id == first[0]).unwrap().1.clone();
    let after = |deps: Vec<JobId>| SubmitOptions { after: vec![deps], ..Default::default() };
    let ((then, _), out) =
        c.call(|core, now, out| core.submit_with(now, vec![spec("then")], after(vec![first[0]]), out).unwrap());
    assert!(assigns(&c, &out).is_empty(), "it waits for {}", first[0]);
    assert_eq!(c.core.wait_reason(then[0]), Some(format!("waiting for {} to succeed", first[0])));
    // A chain: this one waits for `then`.
    let ((last, _), _) =
        c.call(|core, now, out| core.submit_with(now, vec![spec("last")], after(vec![then[0]]), out).unwrap());

    c.started("a", a.attempt_id);
    let out = c.finished("a", a.attempt_id, succeeded());
    let (_, t) = assigns(&c, &out).into_iter().find(|(_, x)| x.job_id == then[0]).expect("released");
    c.started("a", t.attempt_id);
    c.finished("a", t.attempt_id, failed(false));
    assert_eq!(c.state(then[0]), JobState::Failed);
    let rec = c.record(last[0]);
    assert_eq!(rec.state, JobState::Cancelled, "its dependency failed");
    assert!(rec.error.unwrap().contains(&then[0].to_string()));

    // A dependency that already failed is refused at submission, naming the fix.
    let (r, _) = c.call(|core, now, out| core.submit_with(now, vec![spec("late")], after(vec![then[0]]), out));
    assert_eq!(r, Err(SubmitError::DependencyEnded { index: 0, dep: then[0], state: "failed" }));
    let (r, _) = c.call(|core, now, out| core.submit_with(now, vec![spec("ghost")], after(vec![JobId(999)]), out));
    assert_eq!(r, Err(SubmitError::UnknownDependency { index: 0, dep: JobId(999) }));
}

#[test]
fn a_job_takes_an_input_from_the_output_of_the_job_it_waits_for() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let video = ArtifactRef { path: "outputs/output.mp4".into(), sha256: Sha256([7; 32]), size_bytes: 42 };
    let from = |dep| vec![InputFromDep { dep, output: video.path.clone(), path: "inputs/input.mp4".into() }];
    let once = |name| JobSpec { max_attempts: 1, ..spec(name) };
    // A transfer and its upscale in one batch: the upscale names the transfer by its place in the batch.
    let opts = SubmitOptions { inputs_from: vec![Vec::new(), from(Dep::InBatch(0))], ..Default::default() };
    let ((ids, _), out) =
        c.call(|core, now, out| core.submit_with(now, vec![once("transfer"), spec("upscale")], opts, out).unwrap());
    let (_, t) = one_assign(&c, &out);
    assert_eq!(t.job_id, ids[0], "only the transfer may run");
    assert_eq!(c.core.wait_reason(ids[1]), Some(format!("waiting for {} to succeed", ids[0])));
    assert_eq!(c.record(ids[1]).after, vec![ids[0]], "an input's job is waited for");
    c.started("a", t.attempt_id);
    let out = c.finished("a", t.attempt_id, AttemptOutcome::Succeeded { outputs: vec![video.clone()] });
    let (_, u) = one_assign(&c, &out);
    assert_eq!(u.job_id, ids[1]);
    let input = u.spec.inputs.iter().find(|i| i.path == "inputs/input.mp4").expect("the video is an input");
    assert_eq!((input.sha256, input.size_bytes), (video.sha256, video.size_bytes));
    assert!(c.record(ids[1]).inputs_from.is_empty(), "taken, and stored so (the cluster checks the persist)");

    // A batch's job may only wait for one before it.
    let opts = SubmitOptions { inputs_from: vec![from(Dep::InBatch(1)), Vec::new()], ..Default::default() };
    let (r, _) = c.call(|core, now, out| core.submit_with(now, vec![spec("x"), spec("y")], opts, out));
    assert_eq!(r.unwrap_err(), SubmitError::BadBatchDependency { index: 0, dep: 1 });
    // The place an input from a dependency goes is checked like any input's.
    let outside = vec![InputFromDep { dep: Dep::InBatch(0), output: video.path.clone(), path: "../input.mp4".into() }];
    let opts = SubmitOptions { inputs_from: vec![Vec::new(), outside], ..Default::default() };
    let (r, _) = c.call(|core, now, out| core.submit_with(now, vec![spec("x"), spec("y")], opts, out));
    assert!(matches!(r, Err(SubmitError::InvalidSpec { index: 1, .. })), "{r:?}");

    // Submitted on its own after a running job: one that succeeds without the output fails it, naming it.
    let (t2, out) = c.submit_ok(vec![once("transfer 2")]);
    let (_, a2) = one_assign(&c, &out);
    let opts = SubmitOptions { inputs_from: vec![from(Dep::Job(t2[0]))], ..Default::default() };
    let ((u2, _), _) = c.call(|core, now, out| core.submit_with(now, vec![spec("upscale 2")], opts, out).unwrap());
    c.started("a", a2.attempt_id);
    c.finished("a", a2.attempt_id, succeeded());
    let rec = c.record(u2[0]);
    assert_eq!(rec.state, JobState::Failed);
    assert!(rec.error.as_deref().unwrap().contains("outputs/output.mp4"), "{:?}", rec.error);

    // One whose job fails is cancelled with it, and retrying it alone is refused, naming the fix.
    let (t3, out) = c.submit_ok(vec![once("transfer 3")]);
    let (_, a3) = one_assign(&c, &out);
    let opts = SubmitOptions { inputs_from: vec![from(Dep::Job(t3[0]))], ..Default::default() };
    let ((u3, _), _) = c.call(|core, now, out| core.submit_with(now, vec![spec("upscale 3")], opts, out).unwrap());
    c.started("a", a3.attempt_id);
    c.finished("a", a3.attempt_id, failed(false));
    assert_eq!(c.state(u3[0]), JobState::Cancelled);
    let (r, _) = c.call(|core, now, out| core.retry(now, u3[0], out));
    assert_eq!(r, Err(CommandError::DependencyEnded { id: u3[0], dep: t3[0], state: "failed" }));
    // Retried together (the dependency first), both run: the upscale waits for the new attempt.
    let (r, out) = c.call(|core, now, out| core.retry(now, t3[0], out));
    r.unwrap();
    let (_, again) = one_assign(&c, &out);
    let (r, out) = c.call(|core, now, out| core.retry(now, u3[0], out));
    r.unwrap();
    assert!(assigns(&c, &out).is_empty(), "the upscale waits for the retried transfer");
    c.started("a", again.attempt_id);
    let out = c.finished("a", again.attempt_id, AttemptOutcome::Succeeded { outputs: vec![video.clone()] });
    assert_eq!(one_assign(&c, &out).1.job_id, u3[0]);
}

#[test]
fn a_waiting_dependency_survives_a_controller_restart() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (first, out) = c.submit_ok(vec![spec("first")]);
    let (_, a) = one_assign(&c, &out);
    let opts = SubmitOptions { after: vec![vec![first[0]]], ..Default::default() };
    let ((then, _), _) = c.call(|core, now, out| core.submit_with(now, vec![spec("then")], opts, out).unwrap());
    c.restart(quiet_config(), Epoch(2));
    assert_eq!(c.core.wait_reason(then[0]), Some(format!("waiting for {} to succeed", first[0])));
    let running = AttemptReport {
        attempt_id: a.attempt_id,
        gpu_uuids: a.gpu_uuids.clone(),
        phase: AttemptPhase::Finished(succeeded()),
    };
    let out = c.reconnect("a", vec![running]);
    assert_eq!(one_assign(&c, &out).1.job_id, then[0], "released once its dependency's success is reported");
}

// ---- placement ----

#[test]
fn a_one_gpu_job_goes_to_the_fullest_host_that_fits_keeping_a_whole_host_free() {
    let mut c = Cluster::quiet();
    c.connect("big", 8, 80);
    c.connect("small", 4, 80);
    // Four single-GPU jobs fill the small host, one GPU each, even though the big one has more room.
    let (_, out) = c.submit_ok((0..4).map(|i| spec(&format!("s{i}"))).collect());
    let placed = assigns(&c, &out);
    assert_eq!(placed.len(), 4);
    assert!(placed.iter().all(|(h, _)| h == "small"), "{placed:?}");
    let gpus: HashSet<String> = placed.iter().flat_map(|(_, a)| a.gpu_uuids.clone()).collect();
    assert_eq!(gpus.len(), 4, "each on its own GPU");
    // The big host is still whole for an 8-GPU job.
    let (ids, out) = c.submit_ok(vec![spec_gpus("wide", 8)]);
    let (host, a) = one_assign(&c, &out);
    assert_eq!((host.as_str(), a.job_id), ("big", ids[0]));
    assert_eq!(a.gpu_uuids.len(), 8);
}

#[test]
fn best_fit_prefers_the_host_with_fewest_free_gpus_among_partly_used_hosts() {
    let mut c = Cluster::quiet();
    c.connect("a", 4, 80);
    c.connect("b", 4, 80);
    // Three GPUs busy on b leaves it with one free: the best fit for the next single-GPU job.
    let (_, out) = c.submit_ok(vec![spec_gpus("three", 3)]);
    let (host3, _) = one_assign(&c, &out);
    let other = if host3 == "a" { "b" } else { "a" };
    let (_, out) = c.submit_ok(vec![spec_gpus("two", 2)]);
    assert_eq!(one_assign(&c, &out).0, other, "a 2-GPU job does not fit on the host with one free");
    let (_, out) = c.submit_ok(vec![spec("one")]);
    assert_eq!(one_assign(&c, &out).0, host3, "the host with one free GPU is the tightest fit");
}

#[test]
fn on_a_host_the_gpus_with_most_free_vram_are_chosen() {
    let mut c = Cluster::quiet();
    c.connect("a", 4, 80);
    c.heartbeat("a", &[10, 70, 40, 80], Vec::new());
    let (_, out) = c.submit_ok(vec![spec_gpus("pair", 2)]);
    let (_, a) = one_assign(&c, &out);
    assert_eq!(a.gpu_uuids, vec![gpu_uuid("a", 3), gpu_uuid("a", 1)]);
    let (_, out) = c.submit_ok(vec![spec("one")]);
    assert_eq!(one_assign(&c, &out).1.gpu_uuids, vec![gpu_uuid("a", 2)]);
}

#[test]
fn a_gpu_with_too_little_free_vram_is_skipped() {
    let mut c = Cluster::quiet();
    c.connect("big", 8, 80);
    c.connect("small", 1, 80);
    // Something outside the orchestrator holds most of small's only GPU.
    c.heartbeat("small", &[10], Vec::new());
    let needs_40 = JobSpec { min_free_vram_bytes: 40 * GIB, ..spec("needs-40") };
    let (_, out) = c.submit_ok(vec![needs_40]);
    assert_eq!(one_assign(&c, &out).0, "big", "small is the best fit by count, but its GPU has 10 GiB free");
    // A job with no VRAM floor still takes the tightest fit.
    let (_, out) = c.submit_ok(vec![spec("any")]);
    assert_eq!(one_assign(&c, &out).0, "small");
}

#[test]
fn a_job_waits_until_a_heartbeat_shows_enough_free_vram() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    c.heartbeat("a", &[20, 30], Vec::new());
    let (ids, out) = c.submit_ok(vec![JobSpec { min_free_vram_bytes: 40 * GIB, ..spec("needs-40") }]);
    assert!(assigns(&c, &out).is_empty());
    assert_eq!(c.state(ids[0]), JobState::Queued);
    let out = c.heartbeat("a", &[20, 50], Vec::new());
    let (_, a) = one_assign(&c, &out);
    assert_eq!(a.gpu_uuids, vec![gpu_uuid("a", 1)]);
}

// ---- anti-starvation ----

/// Two full 8-GPU hosts, an 8-GPU job queued, and a stream of single-GPU jobs
/// behind it: each step submits two more small jobs and ends the oldest
/// running attempt on each host in turn. Returns the step the wide job was placed
/// at, and the hosts the small jobs went to meanwhile.
fn stream_behind_a_wide_job(c: &mut Cluster, steps: usize) -> (Option<usize>, Vec<String>, JobId) {
    c.connect("x", 8, 80);
    c.connect("y", 8, 80);
    let (_, out) = c.submit_ok((0..16).map(|i| spec(&format!("fill{i}"))).collect());
    let mut running: BTreeMap<String, Vec<AttemptId>> = BTreeMap::new();
    for (h, a) in assigns(c, &out) {
        running.entry(h).or_default().push(a.attempt_id);
    }
    assert_eq!(running["x"].len(), 8);
    assert_eq!(running["y"].len(), 8);
    let (wide, out) = c.submit_ok(vec![spec_gpus("wide", 8)]);
    assert!(assigns(c, &out).is_empty());
    let mut small_hosts = Vec::new();
    let mut placed_at = None;
    for step in 0..steps {
        c.submit_ok(vec![spec(&format!("s{step}a")), spec(&format!("s{step}b"))]);
        let host = if step % 2 == 0 { "x" } else { "y" };
        let Some(att) = running.get_mut(host).filter(|v| !v.is_empty()).map(|v| v.remove(0)) else { continue };
        let out = c.finished(host, att, succeeded());
        for (h, a) in assigns(c, &out) {
            if a.job_id == wide[0] {
                assert_eq!(a.gpu_uuids.len(), 8);
                placed_at.get_or_insert(step);
            } else {
                small_hosts.push(h.clone());
                running.entry(h).or_default().push(a.attempt_id);
            }
        }
        if placed_at.is_some() {
            break;
        }
    }
    (placed_at, small_hosts, wide[0])
}

#[test]
fn a_wide_job_is_not_starved_by_a_stream_of_small_ones() {
    let mut c = Cluster::quiet();
    let (placed_at, small_hosts, wide) = stream_behind_a_wide_job(&mut c, 100);
    assert!(placed_at.is_some(), "the 8-GPU job never ran; it is {:?}", c.state(wide));
    assert_eq!(c.live(wide).unwrap().agent, "x", "it ran on the first host to start emptying");
    // Meanwhile small jobs were backfilled on the other host, and none on the reserved one.
    assert!(!small_hosts.is_empty(), "no small job ran while the wide one waited");
    assert!(small_hosts.iter().all(|h| h == "y"), "small jobs took GPUs of the reserved host: {small_hosts:?}");
}

#[test]
fn small_jobs_do_not_take_the_gpus_freed_on_a_reserved_host() {
    let mut c = Cluster::quiet();
    c.connect("x", 8, 80);
    let (_, out) = c.submit_ok(vec![spec("first")]);
    let (_, first) = one_assign(&c, &out);
    let (wide, _) = c.submit_ok(vec![spec_gpus("wide", 8)]);
    // Seven GPUs are free, but the wide job is next in line for this host.
    let (small, out) = c.submit_ok(vec![spec("small")]);
    assert!(assigns(&c, &out).is_empty(), "a small job jumped ahead of the waiting wide job");
    let out = c.finished("x", first.attempt_id, succeeded());
    let (_, a) = one_assign(&c, &out);
    assert_eq!(a.job_id, wide[0]);
    assert_eq!(c.state(small[0]), JobState::Queued);
}

/// Regression (found by this test, fixed in ba61353): the reserved host was left idle for ever when a
/// job that is not the reservation holder comes ahead of it in the queue.
///
/// Scenario: one 8-GPU host. Job 1 (1 GPU) runs; job 2 (8 GPUs) waits and
/// reserves the host. The agent then refuses (Rejected) job 1's attempt, which
/// re-queues job 1 — ahead of job 2, since it has the lower id. The pass tries
/// job 1 first: it may not use the reserved host, finds nothing, and as its
/// shape is (1 GPU, 0 VRAM) the pass `break`s before job 2, the holder, is
/// tried. All 8 GPUs stay free, both jobs stay queued, and no later pass
/// (tick, reschedule) changes that until some other host appears. The same
/// happens with a higher-priority job submitted after the reservation.
#[test]
fn a_reserved_host_is_not_left_idle_when_a_requeued_job_comes_ahead_of_the_holder() {
    let mut c = Cluster::quiet();
    c.connect("x", 8, 80);
    let (small, out) = c.submit_ok(vec![spec("small")]);
    let (_, a) = one_assign(&c, &out);
    let (wide, out) = c.submit_ok(vec![spec_gpus("wide", 8)]);
    assert!(assigns(&c, &out).is_empty());
    c.finished("x", a.attempt_id, AttemptOutcome::Rejected { reason: "image pull failed".into() });
    c.now += 1_000;
    c.tick_at(c.now);
    c.call(|core, now, out| core.reschedule(now, out));
    let free: usize = c.core.agents()[0].gpus.iter().filter(|g| g.3.is_none()).count();
    assert!(
        c.live(small[0]).is_some() || c.live(wide[0]).is_some(),
        "host x has {free} of 8 GPUs free, yet job {} is {:?} and job {} is {:?}",
        small[0],
        c.state(small[0]),
        wide[0],
        c.state(wide[0]),
    );
}

/// Regression (fixed in ba61353): same cause as above, reached through priority.
///
/// Scenario: one 8-GPU host running a 1-GPU job; an 8-GPU job waits and
/// reserves the host; then a 1-GPU job with a higher priority is submitted.
/// When the running job ends, the host is entirely free, but the pass tries
/// the high-priority job first (not the holder: excluded from the host), breaks
/// on its (1, 0) shape, and never tries the holder.
#[test]
fn a_reserved_host_is_not_left_idle_when_a_higher_priority_job_arrives() {
    let mut c = Cluster::quiet();
    c.connect("x", 8, 80);
    let (_, out) = c.submit_ok(vec![spec("first")]);
    let (_, first) = one_assign(&c, &out);
    let (wide, _) = c.submit_ok(vec![spec_gpus("wide", 8)]);
    let (urgent, _) = c.submit_ok(vec![JobSpec { priority: 10, ..spec("urgent") }]);
    c.finished("x", first.attempt_id, succeeded());
    c.call(|core, now, out| core.reschedule(now, out));
    assert!(
        c.live(urgent[0]).is_some() || c.live(wide[0]).is_some(),
        "host x is entirely free, yet the urgent job is {:?} and the wide job is {:?}",
        c.state(urgent[0]),
        c.state(wide[0]),
    );
}

#[test]
fn a_pass_skips_only_what_cannot_fit_and_never_the_holder_of_a_reservation() {
    // a: 2 GPUs, b: 1 GPU, one job on each. Two 2-GPU jobs wait; a 1-GPU one behind them makes
    // the first reserve a (the only host that can hold it).
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    c.connect("b", 1, 80);
    let (_, out) = c.submit_ok(vec![spec("on-a"), spec("on-b")]);
    let placed = assigns(&c, &out);
    let on = |host: &str| placed.iter().find(|(h, _)| h == host).map(|(_, a)| a.clone()).unwrap();
    let (on_a, on_b) = (on("a"), on("b"));
    let (wide, _) = c.submit_ok(vec![spec_gpus("wide", 2)]);
    let (_wide2, _) = c.submit_ok(vec![spec_gpus("wide2", 2)]);
    let (small, _) = c.submit_ok(vec![spec("small")]);
    assert_eq!(c.core.wait_reason(wide[0]).as_deref(), Some("holding a until 2 of its GPUs are free"));
    // b frees its GPU: the second wide job cannot fit there, but that says nothing of a smaller one.
    let out = c.finished("b", on_b.attempt_id, succeeded());
    let (h, s) = one_assign(&c, &out);
    assert_eq!((h.as_str(), s.job_id), ("b", small[0]));
    // An urgent 1-GPU job comes ahead of the holder and cannot run (b is full, a is held). When a
    // frees up, the pass must still try the holder, though a smaller shape just failed before it.
    let (urgent, out) = c.submit_ok(vec![JobSpec { priority: 10, ..spec("urgent") }]);
    assert!(assigns(&c, &out).is_empty());
    let out = c.finished("a", on_a.attempt_id, succeeded());
    let (h, w) = one_assign(&c, &out);
    assert_eq!((h.as_str(), w.job_id), ("a", wide[0]));
    assert!(c.live(urgent[0]).is_none());
}

/// The consistency check holds the liveness index and each host's own record of its deadline
/// to that deadline apart: the index wrong alone, the host's record right, is an inconsistency.
#[cfg(feature = "sabotage")]
#[test]
#[should_panic(expected = "indexed with liveness deadline")]
fn a_liveness_deadline_left_out_of_the_index_is_an_inconsistency_though_its_host_records_it() {
    let sabotage = cosmos_controller_core::core::Sabotage::UnindexedLivenessDeadline;
    let mut c = Cluster::new(CoreConfig { sabotage, ..quiet_config() });
    c.connect("x", 1, 80);
}

/// Regression (fixed in ba61353): a reservation was never moved off a
/// host that stops being schedulable, so the wide job starves again.
///
/// Scenario: two full 8-GPU hosts x and y, an 8-GPU job waiting, which reserves
/// x once a GPU frees there. Then x is drained for maintenance. The reservation
/// still names x, so small jobs are free to take every GPU freed on y, and the
/// wide job (which cannot go to a drained host) waits as long as small jobs keep coming.
#[test]
fn a_wide_job_is_not_starved_when_its_reserved_host_is_drained() {
    let mut c = Cluster::quiet();
    c.connect("x", 8, 80);
    c.connect("y", 8, 80);
    let (_, out) = c.submit_ok((0..16).map(|i| spec(&format!("fill{i}"))).collect());
    let mut on_y: Vec<AttemptId> = Vec::new();
    let mut on_x: Vec<AttemptId> = Vec::new();
    for (h, a) in assigns(&c, &out) {
        if h == "x" { on_x.push(a.attempt_id) } else { on_y.push(a.attempt_id) }
    }
    let (wide, _) = c.submit_ok(vec![spec_gpus("wide", 8)]);
    // A small job behind it, so that a reservation is worth making; a GPU frees on x: the wide job reserves x.
    let (behind, _) = c.submit_ok(vec![spec("behind")]);
    c.finished("x", on_x.remove(0), succeeded());
    assert_eq!(c.core.wait_reason(wide[0]).as_deref(), Some("holding x until 8 of its GPUs are free"));
    assert_eq!(c.state(behind[0]), JobState::Queued, "the small job took the GPU freed on the reserved host");
    // x could still hold the job once empty, but will never be given it: the reservation is
    // dropped, and taken on y by the first pass with a GPU to give (none runs while none is free).
    c.drain("x", true);
    let reason = c.core.wait_reason(wide[0]);
    assert_eq!(reason.as_deref(), Some("needs 8 free GPUs on one host; the largest such set is 0 on y"));
    for step in 0..40 {
        c.submit_ok(vec![spec(&format!("s{step}"))]);
        if on_y.is_empty() {
            break;
        }
        let out = c.finished("y", on_y.remove(0), succeeded());
        for (h, a) in assigns(&c, &out) {
            assert_eq!(h, "y");
            if a.job_id == wide[0] {
                return;
            }
            on_y.push(a.attempt_id);
        }
    }
    panic!("after 40 small jobs ended on y the wide job is still {:?}", c.state(wide[0]));
}

// ---- submission ----

#[test]
fn an_invalid_spec_rejects_the_whole_batch_naming_its_index() {
    let mut c = Cluster::quiet();
    c.connect("a", 8, 80);
    let bad = JobSpec { command: Vec::new(), ..spec("bad") };
    let (r, out) = c.call(|core, now, out| core.submit(now, vec![spec("ok0"), spec("ok1"), bad], out));
    match r {
        Err(e @ SubmitError::InvalidSpec { index: 2, .. }) => {
            let SubmitError::InvalidSpec { error, .. } = &e else { unreachable!() };
            assert_eq!(error.field, "command");
            assert!(e.to_string().contains("line 3"), "{e}");
            assert!(!e.is_retryable());
        }
        other => panic!("expected InvalidSpec at index 2, got {other:?}"),
    }
    assert!(out.is_empty(), "a refused batch persists and sends nothing: {out:?}");
    assert_eq!(c.core.jobs().count(), 0);
    assert_eq!(c.core.queue_depth(), 0);
}

#[test]
fn a_job_wider_than_the_largest_host_is_refused_at_submit() {
    let mut c = Cluster::quiet();
    c.connect("a", 8, 80);
    c.connect("b", 4, 80);
    let r = c.submit(vec![spec("ok"), spec_gpus("too-wide", 16)]);
    assert_eq!(r, Err(SubmitError::Unplaceable { index: 1, gpus: 16, largest: 8 }));
    assert_eq!(c.core.jobs().count(), 0);
    // Exactly the largest host's width is fine.
    assert!(c.submit(vec![spec_gpus("widest", 8)]).is_ok());
}

#[test]
fn with_no_host_known_any_width_waits() {
    let mut c = Cluster::quiet();
    let ids = c.submit(vec![spec_gpus("wide", 16)]).expect("no host yet: accepted");
    assert_eq!(c.state(ids[0]), JobState::Queued);
}

#[test]
fn batch_size_and_queue_limits_refuse_the_whole_batch() {
    let mut c = Cluster::new(CoreConfig { batch_jobs_max: 2, queued_jobs_max: 3, ..quiet_config() });
    assert_eq!(c.submit(Vec::new()), Err(SubmitError::BatchSize { got: 0, max: 2 }));
    assert_eq!(c.submit(vec![spec("a"), spec("b"), spec("c")]), Err(SubmitError::BatchSize { got: 3, max: 2 }));
    c.submit_ok(vec![spec("a"), spec("b")]);
    let r = c.submit(vec![spec("c"), spec("d")]);
    assert_eq!(r, Err(SubmitError::QueueFull { queued: 2, max: 3 }));
    assert!(r.unwrap_err().is_retryable());
    assert_eq!(c.core.jobs().count(), 2, "nothing of the refused batch was accepted");
    c.submit_ok(vec![spec("c")]);
    assert_eq!(c.core.queue_depth(), 3);
    assert_eq!(
        c.submit(vec![spec("x")]),
        Err(SubmitError::QueueFull { queued: 3, max: 3 }),
        "a full queue takes no more"
    );
    // Placed jobs no longer count against the queue.
    c.connect("a", 2, 80);
    assert_eq!(c.core.queue_depth(), 1);
    c.submit_ok(vec![spec("d"), spec("e")]);
}

// ---- retries ----

#[test]
fn a_retryable_failure_waits_out_an_exponential_backoff() {
    let mut c =
        Cluster::new(CoreConfig { retry_backoff_base_ms: 1_000, retry_backoff_max_ms: 60_000, ..quiet_config() });
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 4, ..spec("flaky") }]);
    let (_, mut a) = one_assign(&c, &out);
    for (n, delay) in [1_000u64, 2_000, 4_000].into_iter().enumerate() {
        c.started("a", a.attempt_id);
        let out = c.finished("a", a.attempt_id, failed(true));
        assert!(assigns(&c, &out).is_empty(), "re-placed before the backoff");
        let rec = c.record(ids[0]);
        assert_eq!(rec.state, JobState::Retrying);
        assert_eq!(rec.attempts_used, n as u32 + 1);
        assert_eq!(rec.not_before_ms, c.now + delay);
        assert!(rec.error.as_deref().unwrap().contains(&format!("retrying in {delay} ms")), "{:?}", rec.error);
        let failed_at = c.now;
        let out = c.tick_at(failed_at + delay - 1);
        assert!(assigns(&c, &out).is_empty(), "attempt {} re-placed 1 ms early", n + 2);
        assert_eq!(c.state(ids[0]), JobState::Retrying);
        assert_eq!(c.core.wait_reason(ids[0]).as_deref(), Some("waiting out its retry backoff"));
        let out = c.tick_at(failed_at + delay);
        let (_, next) = one_assign(&c, &out);
        assert_eq!(next.job_id, ids[0]);
        assert!(next.attempt_id > a.attempt_id);
        assert_eq!(c.state(ids[0]), JobState::Assigned);
        a = next;
    }
    // The fourth failure exhausts max_attempts = 4.
    c.finished("a", a.attempt_id, failed(true));
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Failed);
    assert_eq!(rec.exit_code, Some(1));
    let error = rec.error.unwrap();
    assert!(error.contains("after 4 of 4 attempts"), "{error}");
    assert!(error.contains("CUDA out of memory"), "{error}");
    assert_eq!(c.core.queue_depth(), 0);
}

#[test]
fn the_backoff_is_capped() {
    let mut c =
        Cluster::new(CoreConfig { retry_backoff_base_ms: 1_000, retry_backoff_max_ms: 3_000, ..quiet_config() });
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 5, ..spec("flaky") }]);
    let (_, mut a) = one_assign(&c, &out);
    for delay in [1_000u64, 2_000, 3_000, 3_000] {
        c.finished("a", a.attempt_id, failed(true));
        assert_eq!(c.record(ids[0]).not_before_ms, c.now + delay);
        let at = c.now + delay;
        let out = c.tick_at(at);
        a = one_assign(&c, &out).1;
    }
}

// ---- clock steps ----

/// A cluster with production-like liveness, one host running one job.
fn running_one_job() -> (Cluster, JobId, AttemptId) {
    let mut c = Cluster::new(CoreConfig { suspect_after_ms: 3_000, lost_after_ms: 15_000, ..CoreConfig::default() });
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("long")]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    (c, ids[0], a.attempt_id)
}

#[test]
fn a_wall_clock_step_forward_marks_no_agent_lost_and_requeues_nothing() {
    let (mut c, job, attempt) = running_one_job();
    // NTP corrects a clock that was 10 minutes slow while the host keeps beating.
    c.wall_offset_ms += 10 * 60_000;
    for t in (1_000..=30_000).step_by(1_000) {
        c.tick_at(t);
        c.beat("a");
    }
    let agent = c.core.agents().into_iter().find(|v| v.name == "a").unwrap();
    assert_eq!(agent.health, Health::Up);
    assert_eq!(c.state(job), JobState::Running);
    assert_eq!(c.live(job).map(|a| a.id), Some(attempt));
    let rec = c.record(job);
    assert_eq!((rec.attempts_used, rec.attempts_lost), (0, 0));
}

#[test]
fn a_wall_clock_step_backward_still_lets_a_silent_host_be_lost() {
    let (mut c, job, _) = running_one_job();
    c.wall_offset_ms -= 10 * 60_000;
    c.tick_at(15_000);
    let agent = c.core.agents().into_iter().find(|v| v.name == "a").unwrap();
    assert_eq!(agent.health, Health::Lost, "a backward step must not stall the liveness timeout");
    assert_eq!(c.record(job).attempts_lost, 1);
}

#[test]
fn records_are_stamped_with_the_wall_clock() {
    let mut c = Cluster::quiet();
    c.wall_offset_ms = 1_700_000_000_000;
    c.connect("a", 1, 80);
    let (ids, _) = c.submit_ok(vec![spec("stamped")]);
    assert_eq!(c.record(ids[0]).submitted_ms, 1_700_000_000_000);
    assert_eq!(c.live(ids[0]).unwrap().assigned_ms, 1_700_000_000_000);
}

#[test]
fn a_backoff_that_outlives_a_restart_is_recomputed_within_its_cap() {
    let config = CoreConfig { retry_backoff_base_ms: 1_000, retry_backoff_max_ms: 60_000, ..quiet_config() };
    let mut c = Cluster::new(config.clone());
    c.wall_offset_ms = 1_700_000_000_000;
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 3, ..spec("flaky") }]);
    let (_, a) = one_assign(&c, &out);
    c.finished("a", a.attempt_id, failed(true));
    assert_eq!(c.state(ids[0]), JobState::Retrying);

    // The controller restarts on a host whose clock went back a day: the
    // stored deadline says a day and a second remain, but no backoff is
    // longer than its cap.
    c.wall_offset_ms -= 86_400_000;
    c.now += 10;
    c.restart(config.clone(), Epoch(2));
    c.connect("a", 1, 80);
    let out = c.tick_at(c.now + 60_000 - 1);
    assert!(assigns(&c, &out).is_empty(), "re-placed before the capped backoff");
    let out = c.tick_at(c.now + 1);
    assert_eq!(one_assign(&c, &out).1.job_id, ids[0]);
}

#[test]
fn a_backoff_whose_deadline_passed_while_down_retries_at_once() {
    let config = CoreConfig { retry_backoff_base_ms: 5_000, ..quiet_config() };
    let mut c = Cluster::new(config.clone());
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 3, ..spec("flaky") }]);
    let (_, a) = one_assign(&c, &out);
    c.finished("a", a.attempt_id, failed(true));
    // Down for a minute; the new process's monotonic clock starts elsewhere.
    c.wall_offset_ms += 60_000;
    c.restart(config, Epoch(2));
    c.connect("a", 1, 80);
    let out = c.tick_at(c.now);
    assert_eq!(one_assign(&c, &out).1.job_id, ids[0]);
}

#[test]
fn a_terminal_failure_fails_the_job_at_once() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 5, ..spec("bad-args") }]);
    let (_, a) = one_assign(&c, &out);
    let out = c.finished("a", a.attempt_id, failed(false));
    assert!(assigns(&c, &out).is_empty());
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Failed);
    assert_eq!(rec.attempts_used, 1);
    assert!(rec.error.as_deref().unwrap().contains("not retryable"), "{:?}", rec.error);
    assert!(rec.finished_ms.is_some());
    let out = c.tick_at(3_600_000);
    assert!(assigns(&c, &out).is_empty());
}

#[test]
fn a_job_with_one_attempt_fails_on_its_first_failure() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 1, ..spec("once") }]);
    let (_, a) = one_assign(&c, &out);
    c.finished("a", a.attempt_id, failed(true));
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Failed);
    assert!(rec.error.unwrap().contains("after 1 of 1 attempts"));
}

#[test]
fn a_retrying_job_does_not_hold_back_the_queue() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("flaky"), spec("next")]);
    let (_, a) = one_assign(&c, &out);
    assert_eq!(a.job_id, ids[0]);
    let out = c.finished("a", a.attempt_id, failed(true));
    let (_, b) = one_assign(&c, &out);
    assert_eq!(b.job_id, ids[1], "the next job takes the GPU during the backoff");
}

// ---- restart ----

#[test]
fn after_a_restart_attempts_are_reconciled_and_ids_never_reused() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    c.connect("b", 2, 80);
    let (ids, out) = c.submit_ok((0..4).map(|i| spec(&format!("j{i}"))).collect());
    let placed = assigns(&c, &out);
    assert_eq!(placed.len(), 4);
    // One job finished before the crash, to make the history non-trivial.
    let done = placed[0].clone();
    c.finished(&done.0, done.1.attempt_id, succeeded());
    let queued = c.submit_ok(vec![spec("late")]).1;
    let late = one_assign(&c, &queued);
    let mut running: Vec<(String, Assign)> = placed[1..].to_vec();
    running.push(late);
    for (h, a) in &running {
        c.started(h, a.attempt_id);
    }
    let max_before = c.attempt_ids.iter().max().copied().unwrap();

    let holders = |c: &Cluster| -> BTreeMap<(String, String), Option<AttemptId>> {
        c.core
            .agents()
            .iter()
            .flat_map(|a| a.gpus.iter().map(move |(info, _, _, holder)| ((a.name.clone(), info.uuid.clone()), *holder)))
            .collect()
    };
    let held_before = holders(&c);
    assert!(held_before.values().any(Option::is_some));

    c.restart(quiet_config(), Epoch(2));
    assert_eq!(c.core.epoch(), Epoch(2));
    assert_eq!(c.state(done.1.job_id), JobState::Succeeded);
    for (_, a) in &running {
        assert_eq!(c.state(a.job_id), JobState::Running, "a running job stays running until its host says otherwise");
    }
    // `cosmos agents` shows the GPUs held by the same attempts as before the restart.
    assert_eq!(holders(&c), held_before);
    assert!(c.core.agents().iter().all(|a| a.health == Health::Suspect && !a.connected));

    // a comes back still running its attempts: it keeps them.
    let on_a: Vec<&Assign> = running.iter().filter(|(h, _)| h == "a").map(|(_, a)| a).collect();
    let on_b: Vec<&Assign> = running.iter().filter(|(h, _)| h == "b").map(|(_, a)| a).collect();
    assert!(!on_a.is_empty() && !on_b.is_empty());
    let reports = on_a.iter().map(|a| running_report(a)).collect();
    let out = c.reconnect("a", reports);
    let msgs = sends_to(&c, &out, "a");
    assert!(matches!(msgs[0], ControllerMsg::Welcome { epoch: Epoch(2), .. }), "{msgs:?}");
    let keep = msgs.iter().find_map(|m| match m {
        ControllerMsg::Reconcile { epoch, keep } => Some((*epoch, keep.clone())),
        _ => None,
    });
    let mut expected: Vec<AttemptId> = on_a.iter().map(|a| a.attempt_id).collect();
    expected.sort();
    assert_eq!(keep, Some((Epoch(2), expected)));
    assert!(!msgs.iter().any(|m| matches!(m, ControllerMsg::Cancel { .. })));
    for a in &on_a {
        assert_eq!(c.live(a.job_id).unwrap().id, a.attempt_id);
        assert_eq!(c.state(a.job_id), JobState::Running);
    }

    // b comes back with nothing: its attempts are lost and the jobs re-placed with fresh ids.
    let out = c.reconnect("b", Vec::new());
    let msgs = sends_to(&c, &out, "b");
    assert!(msgs.contains(&ControllerMsg::Reconcile { epoch: Epoch(2), keep: Vec::new() }), "{msgs:?}");
    let replaced = assigns(&c, &out);
    assert_eq!(replaced.len(), on_b.len());
    for (h, a) in &replaced {
        assert_eq!(h, "b");
        assert!(a.attempt_id > max_before, "{} reuses an id from before the restart", a.attempt_id);
        assert_eq!(a.epoch, Epoch(2));
        assert!(on_b.iter().any(|old| old.job_id == a.job_id));
        assert_eq!(c.record(a.job_id).attempts_lost, 1);
    }
    // And a job submitted now gets a fresh id too.
    let (_, out) = c.submit_ok(vec![spec("after")]);
    assert!(assigns(&c, &out).is_empty(), "every GPU is taken");
    let (h, a) = running.iter().find(|(h, _)| h == "a").unwrap().clone();
    let out = c.finished(&h, a.attempt_id, succeeded());
    let (_, next) = one_assign(&c, &out);
    assert!(next.attempt_id > max_before);
    assert!(ids.iter().all(|&id| c.core.job(id).is_some()));
}

#[test]
fn a_second_restart_with_nothing_new_still_does_not_reuse_ids() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (_, out) = c.submit_ok(vec![spec("j")]);
    let (_, a) = one_assign(&c, &out);
    c.finished("a", a.attempt_id, succeeded());
    // Every attempt is history: the snapshot has no live one, only the max id.
    c.restart(quiet_config(), Epoch(2));
    c.restart(quiet_config(), Epoch(3));
    c.reconnect("a", Vec::new());
    let (_, out) = c.submit_ok(vec![spec("k")]);
    let (_, b) = one_assign(&c, &out);
    assert!(b.attempt_id > a.attempt_id);
    assert_eq!(b.epoch, Epoch(3));
}

#[test]
fn a_host_that_never_returns_after_a_restart_is_lost_and_its_jobs_move() {
    let mut c = Cluster::new(CoreConfig::default());
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("j")]);
    let (_, a) = one_assign(&c, &out);
    c.restart(CoreConfig::default(), Epoch(2));
    c.connect("b", 1, 80);
    assert!(c.live(ids[0]).is_some(), "a is only suspect: its attempt is kept for now");
    c.beat("b");
    c.now = 15_000;
    c.beat("b");
    let out = c.tick_at(15_000);
    let (h, moved) = one_assign(&c, &out);
    assert_eq!((h.as_str(), moved.job_id), ("b", ids[0]));
    assert!(moved.attempt_id > a.attempt_id);
    assert_eq!(c.core.agents().iter().find(|v| v.name == "a").unwrap().health, Health::Lost);
}

// ---- liveness ----

#[test]
fn a_silent_host_becomes_suspect_and_gets_no_new_work() {
    let mut c = Cluster::new(CoreConfig::default());
    c.connect("a", 2, 80);
    c.connect("b", 4, 80);
    let (_, out) = c.submit_ok(vec![spec("first")]);
    assert_eq!(one_assign(&c, &out).0, "a");
    c.now = 2_000;
    c.beat("b");
    c.tick_at(3_000);
    let view = |c: &Cluster, n: &str| c.core.agents().into_iter().find(|v| v.name == n).unwrap();
    assert_eq!(view(&c, "a").health, Health::Suspect);
    assert_eq!(view(&c, "b").health, Health::Up);
    let (_, out) = c.submit_ok(vec![spec("second")]);
    assert_eq!(one_assign(&c, &out).0, "b", "a suspect host gets no new work");
    // Heard from again: a is up and the tightest fit again.
    c.beat("a");
    assert_eq!(view(&c, "a").health, Health::Up);
    let (_, out) = c.submit_ok(vec![spec("third")]);
    assert_eq!(one_assign(&c, &out).0, "a");
}

#[test]
fn a_lost_host_is_closed_its_attempts_requeued_and_fenced_when_it_returns() {
    let mut c = Cluster::new(CoreConfig::default());
    c.connect("a", 1, 80);
    c.connect("b", 2, 80);
    let (ids, out) = c.submit_ok(vec![spec("j")]);
    let (host, old) = one_assign(&c, &out);
    assert_eq!(host, "a");
    c.started("a", old.attempt_id);
    let conn_a = c.conn_of["a"];
    // b keeps talking; a goes silent.
    for t in (1_000..15_000).step_by(1_000) {
        c.now = t;
        c.beat("b");
        let out = c.tick_at(t);
        assert!(assigns(&c, &out).is_empty(), "re-placed at {t} ms, before a was lost");
        assert!(!c.closed.contains(&conn_a));
    }
    assert_eq!(c.live(ids[0]).unwrap().id, old.attempt_id, "a suspect host keeps its attempts");
    c.now = 15_000;
    c.beat("b");
    let out = c.tick_at(15_000);
    assert!(out.contains(&Output::Close { conn: conn_a }), "the lost host's connection is closed");
    let (h, new) = one_assign(&c, &out);
    assert_eq!((h.as_str(), new.job_id), ("b", ids[0]));
    assert!(new.attempt_id > old.attempt_id);
    let rec = c.record(ids[0]);
    assert_eq!((rec.state, rec.attempts_lost, rec.attempts_used), (JobState::Assigned, 1, 0));
    assert_eq!(c.core.agents().iter().find(|v| v.name == "a").unwrap().health, Health::Lost);

    // Nothing a says on the old connection counts any more.
    let out = c.call(|core, now, out| {
        core.on_message(
            now,
            conn_a,
            AgentMsg::AttemptFinished { attempt_id: old.attempt_id, outcome: succeeded() },
            &HeldBlobs::none(),
            out,
        )
    });
    assert!(out.1.is_empty());
    assert_eq!(c.state(ids[0]), JobState::Assigned);

    // a returns, still running the old attempt: it is fenced off.
    let out = c.reconnect("a", vec![running_report(&old)]);
    let msgs = sends_to(&c, &out, "a");
    assert!(msgs.contains(&ControllerMsg::Reconcile { epoch: Epoch(1), keep: Vec::new() }), "{msgs:?}");
    assert!(
        msgs.iter().any(|m| matches!(m, ControllerMsg::Cancel { attempt_id, .. } if *attempt_id == old.attempt_id)),
        "{msgs:?}"
    );
    assert!(assigns(&c, &out).is_empty());
    assert_eq!(c.live(ids[0]).unwrap().id, new.attempt_id, "the job keeps its new attempt");

    // b is full after one more job; the next one would fit only on a, whose GPU the old attempt still holds.
    let (_, out) = c.submit_ok(vec![spec("fills-b")]);
    assert_eq!(one_assign(&c, &out).0, "b");
    let (waiting, out) = c.submit_ok(vec![spec("waits")]);
    assert!(assigns(&c, &out).is_empty(), "a's GPU was given away while the fenced attempt ran");
    let out = c.heartbeat("a", &[80], vec![running_report(&old)]);
    assert!(assigns(&c, &out).is_empty(), "still running there");
    // The stop was sent once, on reconnecting; a heartbeat does not send it again (a repeat
    // would restart the agent's grace before the kill, every second).
    assert!(!sends_to(&c, &out, "a").iter().any(|m| matches!(m, ControllerMsg::Cancel { .. })), "{out:?}");
    // Once a heartbeat no longer lists it, the GPU is free again.
    let out = c.heartbeat("a", &[80], Vec::new());
    let (h, a) = one_assign(&c, &out);
    assert_eq!((h.as_str(), a.job_id), ("a", waiting[0]));
    assert_eq!(a.gpu_uuids, old.gpu_uuids);
}

#[test]
fn a_fenced_attempt_reported_finished_frees_its_gpu_without_changing_the_job() {
    let mut c = Cluster::new(CoreConfig::default());
    c.connect("a", 1, 80);
    c.connect("b", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("j")]);
    let (host, old) = one_assign(&c, &out);
    let other = if host == "a" { "b" } else { "a" };
    c.now = 15_000;
    c.beat(other);
    let out = c.tick_at(15_000);
    let (_, new) = one_assign(&c, &out);
    c.reconnect(&host, vec![running_report(&old)]);
    let (waiting, out) = c.submit_ok(vec![spec("waits")]);
    assert!(assigns(&c, &out).is_empty());
    // The fenced attempt ends (it was cancelled); its report is acknowledged but decides nothing.
    let out = c.finished(&host, old.attempt_id, succeeded());
    assert!(sends_to(&c, &out, &host).contains(&ControllerMsg::AckFinished { attempt_ids: vec![old.attempt_id] }));
    assert_eq!(c.live(ids[0]).unwrap().id, new.attempt_id);
    assert_eq!(c.state(ids[0]), JobState::Assigned);
    let (h, a) = one_assign(&c, &out);
    assert_eq!((h.as_str(), a.job_id), (host.as_str(), waiting[0]));
}

#[test]
fn a_disconnected_host_that_reconnects_in_time_keeps_its_attempts() {
    let mut c = Cluster::new(CoreConfig::default());
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("j")]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    c.disconnect("a");
    assert_eq!(c.core.agents()[0].health, Health::Suspect);
    c.tick_at(10_000);
    let out = c.reconnect("a", vec![running_report(&a)]);
    assert!(sends_to(&c, &out, "a").contains(&ControllerMsg::Reconcile { epoch: Epoch(1), keep: vec![a.attempt_id] }));
    assert_eq!(c.live(ids[0]).unwrap().id, a.attempt_id);
    assert_eq!(c.core.agents()[0].health, Health::Up);
    c.tick_at(20_000);
    assert_ne!(c.core.agents()[0].health, Health::Lost, "lost_after counts from the reconnect");
}

#[test]
fn a_new_connection_from_the_same_agent_closes_the_old_one() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let old = c.conn_of["a"];
    let out = c.reconnect("a", Vec::new());
    assert!(out.contains(&Output::Close { conn: old }));
}

// ---- cancel ----

#[test]
fn cancelling_a_queued_job_ends_it_at_once() {
    let mut c = Cluster::quiet();
    let (ids, _) = c.submit_ok(vec![spec("a"), spec("b")]);
    let (r, out) = c.cancel(ids[0]);
    r.unwrap();
    assert!(!out.iter().any(|o| matches!(o, Output::Send { .. })));
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Cancelled);
    assert!(rec.cancel_requested);
    assert_eq!(c.core.queue_depth(), 1);
    // It is never placed.
    let out = c.connect("h", 1, 80);
    assert_eq!(one_assign(&c, &out).1.job_id, ids[1]);
    assert_eq!(c.cancel(ids[0]).0, Err(CommandError::AlreadyFinal { id: ids[0], state: "cancelled" }));
    assert_eq!(c.cancel(JobId(999)).0, Err(CommandError::UnknownJob(JobId(999))));
}

#[test]
fn cancelling_a_retrying_job_ends_it_at_once() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("flaky")]);
    let (_, a) = one_assign(&c, &out);
    c.finished("a", a.attempt_id, failed(true));
    assert_eq!(c.state(ids[0]), JobState::Retrying);
    c.cancel(ids[0]).0.unwrap();
    assert_eq!(c.state(ids[0]), JobState::Cancelled);
    let out = c.tick_at(3_600_000);
    assert!(assigns(&c, &out).is_empty());
}

#[test]
fn cancelling_a_running_job_stops_its_attempt_then_cancels_it() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("long"), spec("next")]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    let (r, out) = c.cancel(ids[0]);
    r.unwrap();
    assert_eq!(
        sends_to(&c, &out, "a"),
        vec![ControllerMsg::Cancel { attempt_id: a.attempt_id, grace_ms: CoreConfig::default().cancel_grace_ms }]
    );
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Running, "not cancelled until the agent confirms");
    assert!(rec.cancel_requested);
    assert_eq!(c.live(ids[0]).unwrap().state, AttemptState::Stopping);
    assert!(assigns(&c, &out).is_empty(), "the GPU is still held");
    let out = c.finished("a", a.attempt_id, AttemptOutcome::Cancelled);
    assert_eq!(c.state(ids[0]), JobState::Cancelled);
    // Its GPU goes to the next job, and the cancelled job is not retried.
    assert_eq!(one_assign(&c, &out).1.job_id, ids[1]);
}

#[test]
fn a_job_killed_while_cancelling_is_cancelled_not_retried() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("long")]);
    let (_, a) = one_assign(&c, &out);
    c.cancel(ids[0]).0.unwrap();
    c.finished(
        "a",
        a.attempt_id,
        AttemptOutcome::Failed { exit_code: Some(137), reason: "killed".into(), retry: cosmos_proto::Retry::Retryable },
    );
    assert_eq!(c.state(ids[0]), JobState::Cancelled);
    assert_eq!(c.core.queue_depth(), 0);
}

#[test]
fn a_stopping_attempt_is_cancelled_again_after_a_reconnect() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("long")]);
    let (_, a) = one_assign(&c, &out);
    c.cancel(ids[0]).0.unwrap();
    c.disconnect("a");
    let out = c.reconnect("a", vec![running_report(&a)]);
    let msgs = sends_to(&c, &out, "a");
    assert!(msgs.contains(&ControllerMsg::Reconcile { epoch: Epoch(1), keep: vec![a.attempt_id] }), "{msgs:?}");
    assert!(msgs.iter().any(|m| matches!(m, ControllerMsg::Cancel { attempt_id, .. } if *attempt_id == a.attempt_id)));
}

// ---- drain ----

#[test]
fn a_drained_host_gets_no_new_work_until_undrained() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    c.connect("b", 4, 80);
    let mark = c.sent.len();
    c.drain("a", true);
    assert!(c.sent_since(mark).contains(&("a".to_string(), ControllerMsg::Drain { draining: true })));
    assert!(c.core.agents().iter().find(|v| v.name == "a").unwrap().draining);
    // a is the tightest fit, but drained.
    let (_, out) = c.submit_ok(vec![spec("j0")]);
    assert_eq!(one_assign(&c, &out).0, "b");
    let (_, out) = c.submit_ok((1..4).map(|i| spec(&format!("j{i}"))).collect());
    assert!(assigns(&c, &out).iter().all(|(h, _)| h == "b"));
    let (waiting, out) = c.submit_ok(vec![spec("waits")]);
    assert!(assigns(&c, &out).is_empty());
    // A reconnect reminds it that it is drained.
    let out = c.reconnect("a", Vec::new());
    assert!(sends_to(&c, &out, "a").contains(&ControllerMsg::Drain { draining: true }));
    assert!(assigns(&c, &out).is_empty());

    let mark = c.sent.len();
    c.drain("a", false);
    let sent = c.sent_since(mark).to_vec();
    assert!(sent.contains(&("a".to_string(), ControllerMsg::Drain { draining: false })));
    let placed: Vec<&Assign> = sent
        .iter()
        .filter_map(|(h, m)| match m {
            ControllerMsg::Assign(a) if h == "a" => Some(&**a),
            _ => None,
        })
        .collect();
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].job_id, waiting[0]);
}

#[test]
fn draining_a_host_lets_its_running_jobs_finish() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("j")]);
    let (_, a) = one_assign(&c, &out);
    c.drain("a", true);
    assert_eq!(c.live(ids[0]).unwrap().id, a.attempt_id);
    let mark = c.sent.len();
    c.finished("a", a.attempt_id, succeeded());
    assert_eq!(c.state(ids[0]), JobState::Succeeded);
    assert!(!c.sent_since(mark).iter().any(|(_, m)| matches!(m, ControllerMsg::Cancel { .. })));
}

#[test]
fn draining_an_unknown_agent_is_an_error() {
    let mut c = Cluster::quiet();
    let (r, out) = c.call(|core, now, out| core.set_draining(now, "ghost", true, out));
    assert_eq!(r, Err(CommandError::UnknownAgent("ghost".into())));
    assert!(out.is_empty());
}

// ---- duplicates ----

#[test]
fn a_duplicate_attempt_finished_is_acknowledged_and_changes_nothing() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("j"), spec("k")]);
    let (_, a) = one_assign(&c, &out);
    let out = c.finished("a", a.attempt_id, succeeded());
    let (_, b) = one_assign(&c, &out);
    let rec = c.record(ids[0]);
    // Resent (its ack was lost), even with a different outcome: nothing changes.
    let out = c.finished("a", a.attempt_id, failed(true));
    assert_eq!(sends_to(&c, &out, "a"), vec![ControllerMsg::AckFinished { attempt_ids: vec![a.attempt_id] }]);
    assert!(
        !out.iter().any(|o| matches!(o, Output::Persist(ops) if ops.iter().any(|op| !matches!(op, StoreOp::Event(_)))))
    );
    assert_eq!(c.record(ids[0]), rec);
    assert_eq!(c.live(ids[1]).unwrap().id, b.attempt_id, "the next job keeps the GPU");
}

#[test]
fn a_finished_attempt_resent_in_a_hello_is_acknowledged_and_changes_nothing() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("j")]);
    let (_, a) = one_assign(&c, &out);
    c.finished("a", a.attempt_id, succeeded());
    let rec = c.record(ids[0]);
    let report = AttemptReport {
        attempt_id: a.attempt_id,
        phase: AttemptPhase::Finished(failed(true)),
        gpu_uuids: a.gpu_uuids.clone(),
    };
    let out = c.reconnect("a", vec![report]);
    let msgs = sends_to(&c, &out, "a");
    assert!(acked(&msgs, a.attempt_id), "{msgs:?}");
    assert!(msgs.contains(&ControllerMsg::Reconcile { epoch: Epoch(1), keep: Vec::new() }));
    assert!(!msgs.iter().any(|m| matches!(m, ControllerMsg::Cancel { .. })));
    assert_eq!(c.record(ids[0]), rec);
}

#[test]
fn an_attempt_that_finished_while_disconnected_is_decided_by_the_hello() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("j")]);
    let (_, a) = one_assign(&c, &out);
    c.disconnect("a");
    let report = AttemptReport {
        attempt_id: a.attempt_id,
        phase: AttemptPhase::Finished(succeeded()),
        gpu_uuids: a.gpu_uuids.clone(),
    };
    let out = c.reconnect("a", vec![report]);
    let msgs = sends_to(&c, &out, "a");
    assert!(acked(&msgs, a.attempt_id), "{msgs:?}");
    assert_eq!(c.state(ids[0]), JobState::Succeeded);
    // The resend that follows on the new connection is a duplicate.
    let out = c.finished("a", a.attempt_id, succeeded());
    assert_eq!(sends_to(&c, &out, "a"), vec![ControllerMsg::AckFinished { attempt_ids: vec![a.attempt_id] }]);
    assert_eq!(c.state(ids[0]), JobState::Succeeded);
}

// ---- persistence order ----

#[test]
fn every_assign_is_persisted_before_it_is_sent() {
    // The helper checks this on every call; this test names the property and
    // exercises a call that persists and sends a lot at once.
    let mut c = Cluster::quiet();
    let (ids, _) = c.submit_ok((0..20).map(|i| spec(&format!("j{i}"))).collect());
    let out = c.connect("a", 8, 80);
    let Output::Persist(ops) = &out[0] else { panic!("first output is not a Persist: {out:?}") };
    let placed = assigns(&c, &out);
    assert_eq!(placed.len(), 8);
    for (_, a) in &placed {
        assert!(ops.iter().any(|op| matches!(op, StoreOp::PutAttempt(r) if r.id == a.attempt_id)));
        assert!(
            ops.iter().any(|op| matches!(op, StoreOp::PutJob(j) if j.id == a.job_id && j.state == JobState::Assigned))
        );
    }
    assert!(out[1..].iter().all(|o| !matches!(o, Output::Persist(_))));
    assert_eq!(c.core.queue_depth(), ids.len() - 8);
}

// ---- more reservation cases ----

/// Regression (fixed in ba61353): cancelling a queued job did not set `dirty`, so
/// a reservation it held is only dropped at the next scheduling pass, and
/// nothing triggers one.
///
/// Scenario: one 8-GPU host running a 1-GPU job; an 8-GPU job waits and
/// reserves the host; a 1-GPU job queues behind it (rightly held back). The
/// 8-GPU job is cancelled: seven GPUs are free and nobody waits for them, yet
/// the small job stays queued — heartbeats and ticks do not help — until the
/// running job ends.
#[test]
fn cancelling_the_job_a_host_is_reserved_for_frees_the_host_for_others() {
    let mut c = Cluster::quiet();
    c.connect("x", 8, 80);
    let (_, out) = c.submit_ok(vec![spec("long")]);
    one_assign(&c, &out);
    let (wide, _) = c.submit_ok(vec![spec_gpus("wide", 8)]);
    let (small, out) = c.submit_ok(vec![spec("small")]);
    assert!(assigns(&c, &out).is_empty(), "held back for the wide job");
    c.cancel(wide[0]).0.unwrap();
    c.beat("x");
    c.tick_at(1_000);
    assert!(
        c.live(small[0]).is_some(),
        "7 GPUs free and nobody waits for them, yet the small job is {:?}",
        c.state(small[0])
    );
}

/// A job whose VRAM floor no GPU can meet must neither run nor hold a host
/// for itself (found as a bug: it reserved the host and starved everyone; fixed
/// in ba61353). With hosts known it is refused at submit, naming its line.
#[test]
fn a_job_no_gpu_can_ever_hold_is_refused_at_submit() {
    let mut c = Cluster::quiet();
    c.connect("x", 2, 80);
    let impossible = JobSpec { min_free_vram_bytes: 100 * GIB, ..spec("needs-100") };
    let r = c.submit(vec![spec("any"), impossible]);
    assert_eq!(r, Err(SubmitError::TooMuchVram { index: 1, gpus: 1, mib: 100 * 1024 }));
    assert!(r.unwrap_err().to_string().contains("line 2"));
    assert_eq!(c.core.jobs().count(), 0);
}

/// Accepted before any host was known, such a job waits without keeping a host from others.
#[test]
fn a_job_no_gpu_can_ever_hold_does_not_block_a_host() {
    let mut c = Cluster::quiet();
    let impossible = JobSpec { min_free_vram_bytes: 100 * GIB, ..spec("needs-100") };
    let (ids, _) = c.submit_ok(vec![impossible, spec("any")]);
    c.connect("x", 2, 80);
    c.call(|core, now, out| core.reschedule(now, out));
    assert!(
        c.live(ids[1]).is_some(),
        "both GPUs are free and the job fits, but it is {:?} behind one that can never run",
        c.state(ids[1])
    );
    assert_eq!(c.state(ids[0]), JobState::Queued);
    let (_, out) = c.submit_ok(vec![spec("more")]);
    assert_eq!(one_assign(&c, &out).0, "x");
}

// ---- GPU health ----

#[test]
fn a_faulty_gpu_gets_no_work_until_recovered() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let fault = cosmos_proto::GpuFault::Hardware { detail: "XID 79".into() };
    c.send("a", AgentMsg::GpuFault { gpu_uuid: gpu_uuid("a", 0), fault });
    let (_, out) = c.submit_ok(vec![spec("one")]);
    assert_eq!(one_assign(&c, &out).1.gpu_uuids, vec![gpu_uuid("a", 1)]);
    let (waiting, out) = c.submit_ok(vec![spec("two")]);
    assert!(assigns(&c, &out).is_empty());
    let out = c.send("a", AgentMsg::GpuRecovered { gpu_uuid: gpu_uuid("a", 0) });
    let (_, a) = one_assign(&c, &out);
    assert_eq!((a.job_id, a.gpu_uuids.clone()), (waiting[0], vec![gpu_uuid("a", 0)]));
}

#[test]
fn a_retrying_job_keeps_its_backoff_across_a_restart() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("flaky")]);
    let (_, a) = one_assign(&c, &out);
    c.now = 500;
    c.finished("a", a.attempt_id, failed(true));
    let not_before = c.record(ids[0]).not_before_ms;
    assert_eq!(not_before, 1_500);
    c.restart(quiet_config(), Epoch(2));
    assert_eq!(c.state(ids[0]), JobState::Retrying);
    c.reconnect("a", Vec::new());
    let out = c.tick_at(not_before - 1);
    assert!(assigns(&c, &out).is_empty());
    let out = c.tick_at(not_before);
    let (_, b) = one_assign(&c, &out);
    assert_eq!(b.job_id, ids[0]);
    assert!(b.attempt_id > a.attempt_id);
}

// ---- agent health ----

#[test]
fn an_agent_whose_runtime_is_down_gets_no_work_until_it_recovers() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let hb = |unhealthy: Option<&str>| {
        AgentMsg::Heartbeat(Heartbeat {
            seq: 1,
            gpus: Vec::new(),
            attempts: Vec::new(),
            unhealthy: unhealthy.map(String::from),
        })
    };
    c.send("a", hb(Some("the Docker daemon does not answer")));
    assert_eq!(c.core.agents()[0].unhealthy.as_deref(), Some("the Docker daemon does not answer"));
    let (waiting, out) = c.submit_ok(vec![spec("one")]);
    assert!(assigns(&c, &out).is_empty(), "work was placed on an agent that cannot start it");
    let out = c.send("a", hb(None));
    let (_, a) = one_assign(&c, &out);
    assert_eq!(a.job_id, waiting[0]);
    assert_eq!(c.core.agents()[0].unhealthy, None);
}

#[test]
fn finished_jobs_are_pruned_unless_an_unfinished_job_names_them_and_their_ids_are_never_given_again() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let (ids, out) = c.submit_ok(vec![spec("one"), spec("two")]);
    let mut max_attempt = AttemptId(0);
    for (_, a) in assigns(&c, &out) {
        c.started("a", a.attempt_id);
        c.finished("a", a.attempt_id, succeeded());
        max_attempt = max_attempt.max(a.attempt_id);
    }
    // `then` waits for `two`, which has succeeded: it runs, and while it runs `two` must stay.
    let opts = SubmitOptions { after: vec![vec![ids[1]]], ..Default::default() };
    let ((then, _), out) = c.call(|core, now, out| core.submit_with(now, vec![spec("then")], opts, out).unwrap());
    let (_, t) = one_assign(&c, &out);
    let later = c.clock().wall_ms + 1;
    assert_eq!(c.core.prunable(later), vec![ids[0]]);
    // Nothing finished before a time already past.
    assert!(c.core.prunable(0).is_empty());
    let (pruned, out) = c.call(|core, now, out| core.prune(now, &[ids[0], ids[1], then[0]], later, out));
    assert_eq!(pruned, vec![ids[0]]);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Persist(ops) if ops.iter().any(|op| matches!(op, StoreOp::PruneJobs { .. }))))
    );
    assert!(c.core.job(ids[0]).is_none() && c.core.job(ids[1]).is_some());

    c.started("a", t.attempt_id);
    c.finished("a", t.attempt_id, succeeded());
    let later = c.clock().wall_ms + 1;
    let (pruned, _) = c.call(|core, now, out| core.prune(now, &[ids[1], then[0]], later, out));
    assert_eq!(pruned, vec![ids[1], then[0]]);
    assert_eq!(c.core.jobs().count(), 0);
    // `status` answers from the per-state counts: pruned jobs leave them.
    assert!(c.core.job_counts().all(|(_, n)| n == 0), "{:?}", c.core.job_counts().collect::<Vec<_>>());

    // After a restart on what was persisted, ids go on from the highest ever given.
    c.restart(quiet_config(), Epoch(2));
    c.connect("a", 2, 80);
    let (fresh, out) = c.submit_ok(vec![spec("fresh")]);
    assert!(fresh[0] > then[0], "job id {} given again", fresh[0]);
    let (_, a) = one_assign(&c, &out);
    assert!(a.attempt_id > t.attempt_id.max(max_attempt), "attempt id {} given again", a.attempt_id);
}

#[test]
fn a_prune_of_nothing_prunable_stores_nothing_and_a_key_whose_jobs_are_pruned_submits_anew() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let key = || Some(cosmos_controller_core::records::Idempotency { key: "k1".into(), request_sha256: "d1".into() });
    let submit = |c: &mut Cluster| {
        c.call(|core, now, out| {
            core.submit_with(
                now,
                vec![spec("one"), spec("two")],
                SubmitOptions { key: key(), ..Default::default() },
                out,
            )
            .unwrap()
        })
    };
    let ((ids, repeat), out) = submit(&mut c);
    assert!(!repeat);
    let running = assigns(&c, &out);
    // Jobs still running are not prunable: naming them prunes nothing and stores nothing.
    let later = c.clock().wall_ms + 1;
    let (pruned, out) = c.call(|core, now, out| core.prune(now, &ids, later, out));
    assert!(pruned.is_empty());
    assert!(!out.iter().any(|o| matches!(o, Output::Persist(_))), "{out:?}");

    let (_, first) = &running[0];
    c.started("a", first.attempt_id);
    c.finished("a", first.attempt_id, succeeded());
    // One of the key's jobs pruned: the key still answers, with the job it gave that is left.
    let later = c.clock().wall_ms + 1;
    let (pruned, _) = c.call(|core, now, out| core.prune(now, &[first.job_id], later, out));
    assert_eq!(pruned, vec![first.job_id]);
    let ((same, repeat), _) = submit(&mut c);
    assert!(repeat, "a key with a job left was taken for a new submission");
    assert_eq!(same, vec![running[1].1.job_id]);

    // All of its jobs pruned: the key names nothing, and the same request is a new submission.
    let (_, second) = &running[1];
    c.started("a", second.attempt_id);
    c.finished("a", second.attempt_id, succeeded());
    let later = c.clock().wall_ms + 1;
    let (pruned, _) = c.call(|core, now, out| core.prune(now, &[second.job_id], later, out));
    assert_eq!(pruned, vec![second.job_id]);
    let ((fresh, repeat), out) = submit(&mut c);
    assert!(!repeat, "a key whose jobs were all pruned answered with them");
    assert_eq!(fresh.len(), 2);
    assert!(fresh.iter().all(|id| !ids.contains(id)), "pruned ids {ids:?} given again: {fresh:?}");
    assert_eq!(assigns(&c, &out).len(), 2);
}

#[test]
fn a_job_of_a_batch_names_an_earlier_one_by_its_place_and_may_not_name_itself() {
    let mut c = Cluster::quiet();
    let video = ArtifactRef { path: "outputs/output.mp4".into(), sha256: Sha256([7; 32]), size_bytes: 42 };
    let from = |dep| vec![InputFromDep { dep, output: video.path.clone(), path: "inputs/input.mp4".into() }];
    let opts = SubmitOptions { inputs_from: vec![Vec::new(), Vec::new(), from(Dep::InBatch(1))], ..Default::default() };
    let ((ids, _), _) =
        c.call(|core, now, out| core.submit_with(now, vec![spec("a"), spec("b"), spec("c")], opts, out).unwrap());
    assert_eq!(c.record(ids[2]).after, vec![ids[1]]);
    assert_eq!(c.record(ids[2]).inputs_from.iter().map(|i| i.job).collect::<Vec<_>>(), vec![ids[1]]);

    let opts = SubmitOptions { inputs_from: vec![Vec::new(), from(Dep::InBatch(1))], ..Default::default() };
    let (r, _) = c.call(|core, now, out| core.submit_with(now, vec![spec("x"), spec("y")], opts, out));
    assert_eq!(r.unwrap_err(), SubmitError::BadBatchDependency { index: 1, dep: 1 });
}

#[test]
fn a_retry_counts_every_waiting_job_against_the_queue_limit() {
    let mut c = Cluster::new(CoreConfig { queued_jobs_max: 3, ..quiet_config() });
    c.connect("a", 1, 80);
    // One failed for good, to retry; one waiting out a retry backoff; one running, one
    // waiting for it, one queued behind it: three jobs wait, each in another place.
    let (gone, out) = c.submit_ok(vec![JobSpec { max_attempts: 1, ..spec("gone") }]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    c.finished("a", a.attempt_id, failed(true));
    let (_, out) = c.submit_ok(vec![JobSpec { max_attempts: 2, ..spec("flaky") }]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    c.finished("a", a.attempt_id, failed(true));
    let (long, out) = c.submit_ok(vec![spec("long")]);
    one_assign(&c, &out);
    let opts = SubmitOptions { after: vec![vec![long[0]]], ..Default::default() };
    c.call(|core, now, out| core.submit_with(now, vec![spec("then")], opts, out).unwrap());
    let (queued, _) = c.submit_ok(vec![spec("queued")]);
    assert!(c.core.wait_reason(queued[0]).unwrap().starts_with("needs 1 free GPUs"));

    let (r, _) = c.call(|core, now, out| core.retry(now, gone[0], out));
    assert_eq!(r, Err(CommandError::QueueFull { queued: 3, max: 3 }));
}

#[test]
fn a_queued_job_says_which_host_is_held_for_whom_what_vram_it_needs_and_when_no_agent_is_left() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let (small, out) = c.submit_ok(vec![spec("small")]);
    one_assign(&c, &out);
    // The wide job cannot start while small runs; alone in the queue, it holds nothing.
    let (wide, out) = c.submit_ok(vec![spec_gpus("wide", 2)]);
    assert!(assigns(&c, &out).is_empty());
    assert_eq!(
        c.core.wait_reason(wide[0]).as_deref(),
        Some("needs 2 free GPUs on one host; the largest such set is 1 on a")
    );
    // Another small job would take a's free GPU: a is held for the wide one instead.
    let (other, out) = c.submit_ok(vec![spec("other")]);
    assert!(assigns(&c, &out).is_empty(), "a job took the GPU held for the wide one");
    assert_eq!(c.core.wait_reason(wide[0]).as_deref(), Some("holding a until 2 of its GPUs are free"));
    assert_eq!(c.core.wait_reason(other[0]), Some(format!("a is held for job {}, which needs its GPUs", wide[0])));
    // One that would not fit in the held host's free GPUs anyway waits for room, not for the hold.
    let (pair, _) = c.submit_ok(vec![JobSpec { priority: -1, ..spec_gpus("pair", 2) }]);
    assert_eq!(
        c.core.wait_reason(pair[0]).as_deref(),
        Some("needs 2 free GPUs on one host; the largest such set is 1 on a")
    );
    assert!(c.core.job(small[0]).is_some());

    // A VRAM need is named in MiB per GPU: b's GPU has 80 GiB, of which others hold all but 10.
    let mut c = Cluster::quiet();
    c.connect("b", 1, 80);
    c.heartbeat("b", &[10], Vec::new());
    let (big, _) = c.submit_ok(vec![JobSpec { min_free_vram_bytes: 40 * GIB, ..spec("big") }]);
    assert_eq!(
        c.core.wait_reason(big[0]).as_deref(),
        Some("needs 1 free GPUs with 40960 MiB free each on one host; the largest such set is 0 on b")
    );
    // Its only agent disconnected (suspect, not yet lost): no agent is connected.
    c.disconnect("b");
    assert_eq!(c.core.agents()[0].health, Health::Suspect);
    assert_eq!(c.core.wait_reason(big[0]).as_deref(), Some("no agent is connected"));
}

#[test]
fn agent_health_is_named_as_the_api_and_the_cli_show_it() {
    assert_eq!(
        [Health::Up, Health::Suspect, Health::Lost].map(Health::as_str),
        ["up", "suspect", "lost"],
        "these names are part of GET /v1/agents and `cosmos agents`"
    );
}

#[test]
fn a_jobs_life_is_recorded_as_events_in_the_persists_that_make_it() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("one")]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    c.finished("a", a.attempt_id, succeeded());
    c.disconnect("a");
    let events: Vec<(&str, Option<JobId>, Option<AttemptId>, Option<&str>)> = c
        .persisted
        .iter()
        .filter_map(|op| match op {
            StoreOp::Event(e) => Some((e.kind.as_str(), e.job_id, e.attempt_id, e.agent.as_deref())),
            _ => None,
        })
        .collect();
    assert_eq!(
        events,
        vec![
            ("agent_connected", None, None, Some("a")),
            ("submitted", None, None, None),
            ("assigned", Some(ids[0]), Some(a.attempt_id), Some("a")),
            ("succeeded", Some(ids[0]), Some(a.attempt_id), Some("a")),
            ("succeeded", Some(ids[0]), None, None),
            ("agent_disconnected", None, None, Some("a")),
        ]
    );
}

#[test]
fn progress_is_reported_once_per_change_and_read_from_the_job() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![spec("one")]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    assert!(c.core.drain_progressed().is_empty());
    let progress = |step| AgentMsg::Progress { attempt_id: a.attempt_id, step, total: 10 };
    c.send("a", progress(3));
    assert_eq!(c.core.job(ids[0]).unwrap().1, Some((3, 10)));
    assert_eq!(c.core.drain_progressed(), vec![ids[0]]);
    assert!(c.core.drain_progressed().is_empty(), "drained");
    // The same step again is no news for waiting clients; the next one is.
    c.send("a", progress(3));
    assert!(c.core.drain_progressed().is_empty());
    c.send("a", progress(4));
    assert_eq!(c.core.drain_progressed(), vec![ids[0]]);
    assert_eq!(c.core.job(ids[0]).unwrap().1, Some((4, 10)));
}

#[test]
fn jobs_are_listed_in_pages_after_a_cursor() {
    let mut c = Cluster::quiet();
    let (ids, _) = c.submit_ok((0..5).map(|i| spec(&format!("j{i}"))).collect());
    let page = |after| c.core.jobs_after(after).map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(page(None), ids);
    assert_eq!(page(Some(ids[1])), ids[2..].to_vec());
    assert!(page(Some(ids[4])).is_empty());
}

#[test]
fn an_agents_connection_is_offered_only_while_it_is_heard_from() {
    let mut c = Cluster::new(CoreConfig::default());
    assert_eq!(c.core.live_conn_of("a"), None, "an unknown agent");
    c.connect("a", 1, 80);
    c.connect("b", 1, 80);
    assert_eq!(c.core.live_conn_of("a"), Some(c.conn_of["a"]));
    assert_eq!(c.core.live_conn_of("b"), Some(c.conn_of["b"]));
    // a goes silent past suspect_after_ms: its connection may be a dead host's half-open one.
    c.now = 5_000;
    c.beat("b");
    c.tick_at(5_000);
    assert_eq!(c.core.agents().iter().find(|v| v.name == "a").unwrap().health, Health::Suspect);
    assert_eq!(c.core.live_conn_of("a"), None);
    assert_eq!(c.core.live_conn_of("b"), Some(c.conn_of["b"]));
    c.disconnect("b");
    assert_eq!(c.core.live_conn_of("b"), None);
}

#[test]
fn a_retry_whose_backoff_is_over_waits_for_room_not_for_its_backoff() {
    let mut c =
        Cluster::new(CoreConfig { retry_backoff_base_ms: 1_000, retry_backoff_max_ms: 1_000, ..quiet_config() });
    c.connect("a", 1, 80);
    let (flaky, out) = c.submit_ok(vec![JobSpec { max_attempts: 2, ..spec("flaky") }]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    let failed_at = c.now;
    c.finished("a", a.attempt_id, failed(true));
    // While it waits out the backoff, another job takes the only GPU.
    let (_, out) = c.submit_ok(vec![spec("other")]);
    one_assign(&c, &out);
    assert_eq!(c.core.wait_reason(flaky[0]).as_deref(), Some("waiting out its retry backoff"));
    let out = c.tick_at(failed_at + 1_000);
    assert!(assigns(&c, &out).is_empty());
    assert_eq!(c.state(flaky[0]), JobState::Retrying);
    assert_eq!(
        c.core.wait_reason(flaky[0]).as_deref(),
        Some("needs 1 free GPUs on one host; the largest such set is 0 on a")
    );
}

#[test]
fn a_job_that_needs_no_gpu_runs_while_every_gpu_is_busy() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    c.connect("b", 1, 80);
    let (_, out) = c.submit_ok(vec![spec("one"), spec("two")]);
    assert_eq!(assigns(&c, &out).len(), 2);
    // Every GPU is taken: a CPU-only job (a preprocessing step) still has hosts to run on.
    let (cpu, out) = c.submit_ok(vec![spec_gpus("cpu", 0)]);
    let (_, a) = one_assign(&c, &out);
    assert_eq!(a.job_id, cpu[0]);
    assert!(a.gpu_uuids.is_empty());
    // Behind a GPU job that has to wait (and holds a host for itself), one still runs.
    let (wide, _) = c.submit_ok(vec![spec("three")]);
    let (cpu2, out) = c.submit_ok(vec![spec_gpus("cpu2", 0)]);
    let (_, a) = one_assign(&c, &out);
    assert_eq!(a.job_id, cpu2[0]);
    assert!(c.core.wait_reason(wide[0]).is_some());
}

#[test]
fn a_retried_job_whose_next_attempt_is_refused_is_placed_again_at_once() {
    // Alone, and after a job it waited for (which takes the other way into the queue).
    for with_dependency in [false, true] {
        let mut c =
            Cluster::new(CoreConfig { retry_backoff_base_ms: 1_000, retry_backoff_max_ms: 1_000, ..quiet_config() });
        c.connect("a", 1, 80);
        let mut opts = SubmitOptions::default();
        if with_dependency {
            let (before, out) = c.submit_ok(vec![spec("before")]);
            let (_, b) = one_assign(&c, &out);
            c.started("a", b.attempt_id);
            c.finished("a", b.attempt_id, succeeded());
            opts.after = vec![before];
        }
        let flaky = JobSpec { max_attempts: 3, ..spec("flaky") };
        let ((ids, _), out) = c.call(|core, now, out| core.submit_with(now, vec![flaky], opts, out).unwrap());
        let (_, first) = one_assign(&c, &out);
        c.started("a", first.attempt_id);
        let failed_at = c.now;
        c.finished("a", first.attempt_id, failed(true));
        let out = c.tick_at(failed_at + 1_000);
        let (_, second) = one_assign(&c, &out);
        // The host refuses the second attempt before starting it: that is no failure of the job,
        // and its backoff is long over, so it is placed again in the same step.
        let out = c.finished("a", second.attempt_id, AttemptOutcome::Rejected { reason: "image missing".into() });
        let (_, third) = one_assign(&c, &out);
        assert_eq!(third.job_id, ids[0], "with_dependency = {with_dependency}");
        assert_eq!(c.record(ids[0]).attempts_lost, 1);
    }
}

#[test]
fn the_next_deadline_is_the_earliest_host_turning_suspect_or_lost_or_backoff_ending() {
    let config = CoreConfig {
        suspect_after_ms: 3_000,
        lost_after_ms: 15_000,
        retry_backoff_base_ms: 1_000,
        retry_backoff_max_ms: 1_000,
        ..CoreConfig::default()
    };
    let mut c = Cluster::new(config);
    // Recovered and not yet scheduled: due at once; after a first input, nothing is pending.
    assert_eq!(c.core.next_deadline_ms(), Some(0));
    c.tick_at(0);
    assert_eq!(c.core.next_deadline_ms(), None, "no host, no backoff: the shell may sleep until its next input");
    c.now = 500;
    c.connect("a", 1, 80);
    assert_eq!(c.core.next_deadline_ms(), Some(3_500), "a turns suspect 3 s after it was last heard");
    let (_, out) = c.submit_ok(vec![JobSpec { max_attempts: 2, ..spec("flaky") }]);
    let (_, a) = one_assign(&c, &out);
    c.now = 1_000;
    c.beat("a");
    c.started("a", a.attempt_id);
    c.finished("a", a.attempt_id, failed(true));
    assert_eq!(c.core.next_deadline_ms(), Some(2_000), "the retry's backoff ends first");
    c.tick_at(2_000);
    c.disconnect("a");
    assert_eq!(c.core.next_deadline_ms(), Some(16_000), "suspect a is lost 15 s after it was last heard");
}

#[test]
fn a_host_that_returns_is_told_apart_from_a_new_one_and_its_gpus_are_as_it_reports_them_now() {
    let mut c = Cluster::new(CoreConfig::default());
    c.connect("a", 1, 80);
    c.connect("b", 1, 80);
    // a goes silent until it is lost; b keeps talking.
    for t in (1_000..=15_000).step_by(1_000) {
        c.now = t;
        c.beat("b");
        c.tick_at(t);
    }
    assert_eq!(c.core.agents().iter().find(|v| v.name == "a").unwrap().health, Health::Lost);
    // It comes back after its GPU was reconfigured (a smaller MIG slice under the same UUID).
    c.disconnect("a");
    c.connect("a", 1, 40);
    let details: Vec<&str> = c
        .persisted
        .iter()
        .filter_map(|op| match op {
            StoreOp::Event(e) if e.kind == "agent_connected" && e.agent.as_deref() == Some("a") => {
                Some(e.detail.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(details, ["agent a connected", "agent a returned"]);
    let view = c.core.agents().into_iter().find(|v| v.name == "a").unwrap();
    assert_eq!(view.gpus[0].0.total_vram_bytes, 40 * GIB, "the GPU as the agent reports it now");
}

#[test]
fn the_outputs_a_shell_looks_up_are_those_of_the_successes_reported() {
    let video = ArtifactRef { path: "outputs/output.mp4".into(), sha256: Sha256([1; 32]), size_bytes: 42 };
    let log = ArtifactRef { path: "outputs/log.txt".into(), sha256: Sha256([2; 32]), size_bytes: 7 };
    let other = ArtifactRef { path: "outputs/other.mp4".into(), sha256: Sha256([3; 32]), size_bytes: 5 };
    let success = |outputs: Vec<ArtifactRef>| AttemptOutcome::Succeeded { outputs };
    let finished = |id: u64, outcome| AgentMsg::AttemptFinished { attempt_id: AttemptId(id), outcome };

    let msg = finished(1, success(vec![video.clone(), log.clone()]));
    assert_eq!(HeldBlobs::wanted(&msg), vec![&video, &log]);
    assert!(HeldBlobs::wanted(&finished(2, failed(true))).is_empty(), "a failure made nothing to keep");

    let report = |id: u64, phase| AttemptReport { attempt_id: AttemptId(id), phase, gpu_uuids: Vec::new() };
    let hello = AgentHello {
        gpus: Vec::new(),
        gpus_simulated: true,
        runtime: "simulated".into(),
        attempts: vec![
            report(1, AttemptPhase::Running { step: 1, total: 2 }),
            report(2, AttemptPhase::Finished(success(vec![video.clone()]))),
            report(3, AttemptPhase::Finished(failed(false))),
            report(4, AttemptPhase::Finished(success(vec![log.clone(), other.clone()]))),
        ],
        incarnation: 1,
    };
    assert_eq!(HeldBlobs::wanted_in_hello(&hello), vec![&video, &log, &other]);

    // Held means this digest at this size: a blob of the same digest cut short is not.
    let mut held = HeldBlobs::none();
    assert!(!held.holds(&video));
    held.insert(video.sha256, video.size_bytes);
    assert!(held.holds(&video));
    assert!(!held.holds(&ArtifactRef { size_bytes: 41, ..video.clone() }));
    assert!(!held.holds(&log));
    assert_eq!(HeldBlobs::all([&video]), held);
}

#[test]
fn the_views_show_counts_queue_attempts_agents_and_connections() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let (ids, out) = c.submit_ok(vec![spec("j0"), spec("j1"), spec("j2")]);
    let placed = assigns(&c, &out);
    assert_eq!(placed.len(), 2, "two GPUs, two jobs placed");
    let (_, first) = &placed[0];
    c.started("a", first.attempt_id);

    let counts: HashMap<JobState, usize> = c.core.job_counts().filter(|&(_, n)| n > 0).collect();
    assert_eq!(counts, HashMap::from([(JobState::Running, 1), (JobState::Assigned, 1), (JobState::Queued, 1)]));
    assert_eq!(c.core.queue_depth(), 1);

    let att = c.core.attempt(first.attempt_id).expect("the running attempt is live");
    assert_eq!((att.job_id, att.agent.as_str(), &att.gpu_uuids), (first.job_id, "a", &first.gpu_uuids));
    let (rec, _, live) = c.core.job(first.job_id).expect("the job exists");
    assert_eq!((rec.state, live.map(|a| a.id)), (JobState::Running, Some(first.attempt_id)));
    let waiting = *ids.iter().find(|&&id| c.state(id) == JobState::Queued).expect("one job waits");
    assert!(c.core.job(waiting).expect("the job exists").2.is_none(), "a queued job has no attempt");
    assert!(c.core.job(JobId(999)).is_none() && c.core.attempt(AttemptId(999)).is_none());

    let agents = c.core.agents();
    assert_eq!(agents.len(), 1);
    let a = &agents[0];
    assert_eq!((a.name.as_str(), a.connected, a.draining, a.health), ("a", true, false, Health::Up));
    let holders: BTreeSet<AttemptId> = a.gpus.iter().filter_map(|g| g.3).collect();
    assert_eq!(holders, placed.iter().map(|(_, p)| p.attempt_id).collect());

    let old = c.conn_of["a"];
    assert_eq!(c.core.agent_of_conn(old), Some("a"));
    c.reconnect("a", vec![running_report(first)]);
    assert_eq!(c.core.agent_of_conn(c.conn_of["a"]), Some("a"));
    assert_eq!(c.core.agent_of_conn(old), None, "a replaced connection speaks for no one");
}

#[test]
fn an_operator_release_reaches_the_agent_only_for_a_gpu_it_has() {
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let release = |c: &mut Cluster, agent: &str, uuid: &str| {
        let (agent, uuid) = (agent.to_string(), uuid.to_string());
        c.call(|core, now, out| core.release_gpu(now, &agent, &uuid, out))
    };
    let (r, out) = release(&mut c, "a", "GPU-a-9");
    assert_eq!(r, Err(CommandError::UnknownGpu { agent: "a".into(), uuid: "GPU-a-9".into() }));
    assert!(sends_to(&c, &out, "a").is_empty(), "nothing sent for a GPU the host does not have");
    let (r, _) = release(&mut c, "nobody", "GPU-a-0");
    assert_eq!(r, Err(CommandError::UnknownAgent("nobody".into())));

    let (r, out) = release(&mut c, "a", &gpu_uuid("a", 1));
    assert_eq!(r, Ok(()));
    let sent = sends_to(&c, &out, "a");
    assert!(
        matches!(sent.as_slice(), [ControllerMsg::ReleaseGpu { gpu_uuid: released }] if *released == gpu_uuid("a", 1)),
        "{sent:?}"
    );
    c.disconnect("a");
    let (r, _) = release(&mut c, "a", &gpu_uuid("a", 1));
    assert_eq!(r, Err(CommandError::NotConnected("a".into())));
}

#[test]
fn a_heartbeat_that_frees_nothing_runs_no_scheduling_pass() {
    // At a thousand agents a pass per heartbeat would be most of the controller's work.
    let mut c = Cluster::quiet();
    c.connect("a", 2, 80);
    let (_, out) = c.submit_ok(vec![spec("runs")]);
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    let (_, out) = c.submit_ok(vec![JobSpec { min_free_vram_bytes: 60 * GIB, ..spec_gpus("big", 2) }]);
    assert!(assigns(&c, &out).is_empty(), "one GPU is taken");

    let passes = c.core.passes();
    c.heartbeat("a", &[80, 80], vec![running_report(&a)]);
    c.heartbeat("a", &[30, 50], vec![running_report(&a)]);
    assert_eq!(c.core.passes(), passes, "unchanged or less free VRAM: nothing new can fit");

    c.heartbeat("a", &[30, 70], vec![running_report(&a)]);
    assert_eq!(c.core.passes(), passes + 1, "more free VRAM on a GPU: one pass");

    // A GPU the agent reports unhealthy and then healthy again is new room too.
    c.heartbeat_health("a", &[30, 70], &[1], vec![running_report(&a)]);
    assert_eq!(c.core.passes(), passes + 1, "a GPU going bad frees nothing");
    c.heartbeat_health("a", &[30, 70], &[], vec![running_report(&a)]);
    assert_eq!(c.core.passes(), passes + 2, "a GPU healthy again: one pass");
}

#[test]
fn an_attempt_a_heartbeat_shows_that_the_controller_does_not_know_is_stopped_and_keeps_its_gpu() {
    let mut c = Cluster::quiet();
    c.connect("a", 1, 80);
    let stray = AttemptReport {
        attempt_id: AttemptId(77),
        phase: AttemptPhase::Running { step: 1, total: 2 },
        gpu_uuids: vec![gpu_uuid("a", 0)],
    };
    let out = c.heartbeat("a", &[80], vec![stray.clone()]);
    let sent = sends_to(&c, &out, "a");
    assert!(
        sent.iter().any(|m| matches!(m, ControllerMsg::Cancel { attempt_id, .. } if *attempt_id == AttemptId(77))),
        "the stray attempt is stopped: {sent:?}"
    );
    let (ids, out) = c.submit_ok(vec![spec("waits")]);
    assert!(assigns(&c, &out).is_empty(), "its GPU is not given away while it runs");
    let out = c.heartbeat("a", &[80], vec![stray]);
    assert!(assigns(&c, &out).is_empty(), "still running: still held");
    let out = c.heartbeat("a", &[80], Vec::new());
    assert_eq!(one_assign(&c, &out).1.job_id, ids[0], "gone: the GPU is free again");

    // The controller's own attempt in a heartbeat is not stopped.
    let (_, a) = one_assign(&c, &out);
    c.started("a", a.attempt_id);
    let out = c.heartbeat("a", &[80], vec![running_report(&a)]);
    assert!(
        !sends_to(&c, &out, "a").iter().any(|m| matches!(m, ControllerMsg::Cancel { .. })),
        "its own attempt keeps running"
    );
    assert_eq!(c.state(ids[0]), JobState::Running);
}

#[test]
fn a_job_lost_more_often_than_allowed_fails_and_not_one_loss_sooner() {
    let mut c = Cluster::new(CoreConfig { lost_attempts_max: 2, ..quiet_config() });
    c.connect("a", 1, 80);
    let (ids, out) = c.submit_ok(vec![JobSpec { max_attempts: 1, ..spec("unlucky") }]);
    let (_, mut a) = one_assign(&c, &out);
    for lost in 1..=2 {
        let out = c.finished("a", a.attempt_id, AttemptOutcome::Rejected { reason: "runtime down".into() });
        // Losses are not failures of the job: its one attempt is not used up.
        a = one_assign(&c, &out).1;
        assert_eq!(a.job_id, ids[0], "placed again after loss {lost}");
        assert_eq!(c.record(ids[0]).attempts_lost, lost);
    }
    c.finished("a", a.attempt_id, AttemptOutcome::Rejected { reason: "runtime down".into() });
    let rec = c.record(ids[0]);
    assert_eq!(rec.state, JobState::Failed, "the third loss is one more than allowed");
    let error = rec.error.unwrap();
    assert!(error.contains("lost or refused 3 times") && error.contains("runtime down"), "{error}");
}

#[test]
fn a_job_that_waited_for_another_waits_out_its_own_retry_backoff() {
    let mut c = Cluster::new(CoreConfig { retry_backoff_base_ms: 1_000, ..quiet_config() });
    c.connect("a", 1, 80);
    let (first, out) = c.submit_ok(vec![spec("first")]);
    let (_, a) = one_assign(&c, &out);
    let opts = SubmitOptions { after: vec![vec![first[0]]], ..Default::default() };
    let ((then, _), _) = c.call(|core, now, out| {
        core.submit_with(now, vec![JobSpec { max_attempts: 2, ..spec("then") }], opts, out).unwrap()
    });
    let out = c.finished("a", a.attempt_id, succeeded());
    let (_, t) = one_assign(&c, &out);
    assert_eq!(t.job_id, then[0]);
    let failed_at = c.now;
    let out = c.finished("a", t.attempt_id, failed(true));
    assert!(assigns(&c, &out).is_empty(), "re-placed before its backoff");
    assert_eq!(c.state(then[0]), JobState::Retrying);
    let out = c.tick_at(failed_at + 999);
    assert!(assigns(&c, &out).is_empty(), "re-placed 1 ms early");
    let out = c.tick_at(failed_at + 1_000);
    assert_eq!(one_assign(&c, &out).1.job_id, then[0]);
}

#[test]
fn jobs_waiting_for_a_dependency_or_a_backoff_count_against_the_queue_limit() {
    let mut c = Cluster::new(CoreConfig { queued_jobs_max: 3, retry_backoff_base_ms: 60_000, ..quiet_config() });
    c.connect("a", 1, 80);
    let (flaky, out) = c.submit_ok(vec![JobSpec { max_attempts: 2, ..spec("flaky") }]);
    let (_, a) = one_assign(&c, &out);
    c.finished("a", a.attempt_id, failed(true));
    assert_eq!(c.state(flaky[0]), JobState::Retrying, "in its backoff");
    let (_, out) = c.submit_ok(vec![spec("busy")]);
    one_assign(&c, &out);
    let (ready, _) = c.submit_ok(vec![spec("ready")]);
    let opts = SubmitOptions { after: vec![vec![ready[0]]], ..Default::default() };
    c.call(|core, now, out| core.submit_with(now, vec![spec("blocked")], opts, out).unwrap());
    assert_eq!(c.core.queue_depth(), 3, "one in its backoff, one ready, one waiting for it");
    assert_eq!(c.submit(vec![spec("more")]), Err(SubmitError::QueueFull { queued: 3, max: 3 }));
}
