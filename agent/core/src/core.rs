//! The agent's logic as a synchronous state machine with no I/O.
//!
//! The shell feeds in controller messages, runtime events (container started,
//! exited), GPU samples from the monitor and clock ticks; the core answers with
//! messages to send and containers to start or stop. `now_ms` is the agent's
//! own monotonic clock and is never compared with the controller's.
//!
//! Entry points: [`AgentCore::new`] (adopting what the runtime recovered), then
//! [`AgentCore::connected`] / [`AgentCore::disconnected`] around each link,
//! the `on_*` methods for each input, and [`AgentCore::tick`] once
//! [`AgentCore::next_deadline_ms`] is reached (asked again after every input):
//! the shell has no fixed tick.

use crate::exit::{ExitContext, error_tail, outcome_of, torchrun_failure};
use cosmos_proto::spec::{ArtifactRef, InputArtifact};
use cosmos_proto::{
    AgentHello, AgentMsg, Assign, AttemptId, AttemptOutcome, AttemptPhase, AttemptReport, ControllerMsg, Epoch,
    GpuFault, GpuInfo, GpuQuarantine, GpuUsage, Heartbeat, JobId, JobSpec, LogChunk, LogStream,
};
use std::collections::{BTreeMap, BTreeSet};

/// Tunables, with units in their names.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Heartbeat period until the controller's welcome says otherwise.
    pub heartbeat_interval_ms: u64,
    /// No heartbeat acknowledged for this long: the link is dead, reconnect.
    pub ack_timeout_ms: u64,
    /// After an attempt ends, its GPUs must be back to baseline within this bound.
    pub vram_release_bound_ms: u64,
    /// Memory above baseline that still counts as released (driver noise).
    pub vram_tolerance_bytes: u64,
    /// Grace for attempts stopped by reconciliation or timeout.
    pub stop_grace_ms: u64,
    /// Extra wait after a grace period before a stop is forced again.
    pub kill_slack_ms: u64,
    /// Longest wait for a finished attempt's outputs to reach the controller before it counts as failed.
    pub upload_timeout_ms: u64,
    /// After killing an attempt's processes that outlived it, how long its GPU gets to drain before quarantine.
    pub stray_kill_recheck_ms: u64,
    /// A deliberately broken variant, for the simulator's teeth tests.
    #[cfg(feature = "sabotage")]
    pub sabotage: Sabotage,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            heartbeat_interval_ms: 1_000,
            ack_timeout_ms: 5_000,
            vram_release_bound_ms: 30_000,
            vram_tolerance_bytes: 256 << 20,
            stop_grace_ms: 10_000,
            kill_slack_ms: 5_000,
            upload_timeout_ms: 30 * 60 * 1_000,
            stray_kill_recheck_ms: 5_000,
            #[cfg(feature = "sabotage")]
            sabotage: Sabotage::None,
        }
    }
}

/// What the memory-release check may judge on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Judge {
    /// A fresh reading of every GPU.
    Reading,
    /// Only time passed.
    Due,
}

/// A deliberately broken agent core, for the simulator's teeth tests.
#[cfg(feature = "sabotage")]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Sabotage {
    /// The sound core.
    #[default]
    None,
    /// [`AgentCore::next_deadline_ms`] leaves out the forced kill of a stop
    /// whose grace ran out: a shell sleeping until it would never force it.
    ForgetKillDeadline,
}

/// How a container or process ended, as the runtime saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, when it exited rather than being killed.
    pub code: Option<i32>,
    /// Signal that killed it, when one did.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it.
    pub oom_killed: bool,
}

/// What the runtime tells the core.
#[derive(Clone, Debug, PartialEq)]
pub enum RuntimeEvent {
    /// The container runs.
    Started {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Container id or process group.
        handle: String,
    },
    /// The container could not be started.
    StartFailed {
        /// Which attempt.
        attempt_id: AttemptId,
        /// What went wrong and what to do.
        reason: String,
        /// Whether another try may work (daemon hiccup) or not (image missing).
        retry: cosmos_proto::Retry,
    },
    /// Progress parsed from the output.
    Progress {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Steps done.
        step: u32,
        /// Steps in all.
        total: u32,
    },
    /// Output bytes.
    Log {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Which stream.
        stream: LogStream,
        /// Offset in that stream.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The container ended and was removed.
    Exited {
        /// Which attempt.
        attempt_id: AttemptId,
        /// How.
        status: ExitStatus,
        /// Files it produced, with digests.
        outputs: Vec<ArtifactRef>,
    },
}

/// A container found at start-up carrying this agent's labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Recovered {
    /// Its attempt.
    pub attempt_id: AttemptId,
    /// Its job.
    pub job_id: JobId,
    /// Its GPUs.
    pub gpu_uuids: Vec<String>,
    /// `None` while it runs; how it ended otherwise.
    pub exited: Option<ExitStatus>,
    /// Time left before its timeout, from the labels and start time the runtime keeps.
    pub remaining_ms: Option<u64>,
    /// For a clean exit: the expected outputs found in its work directory, with digests.
    pub outputs: Vec<ArtifactRef>,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send to the controller (dropped by the shell when not connected).
    Send(AgentMsg),
    /// Start a container for an attempt.
    Start {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Its job.
        job_id: JobId,
        /// The controller epoch that ordered it (for the container's labels).
        epoch: Epoch,
        /// What to run.
        spec: Box<JobSpec>,
        /// Exactly these GPUs.
        gpu_uuids: Vec<String>,
    },
    /// Stop a container: graceful signal, kill after `grace_ms`, then remove.
    Stop {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Between the two signals.
        grace_ms: u64,
    },
    /// The link looks dead: drop the connection and dial again.
    Reconnect,
    /// Fetch these inputs into the host cache and place them in the attempt's work directory; answer with [`AgentCore::on_staged`].
    Stage {
        /// Which attempt.
        attempt_id: AttemptId,
        /// What to fetch, and where to put it.
        inputs: Vec<InputArtifact>,
    },
    /// Stop staging this attempt (cancelled, timed out, fenced); no answer is expected and a late one is ignored.
    AbortStage {
        /// Which attempt.
        attempt_id: AttemptId,
    },
    /// Deliver these outputs to the controller; answer with [`AgentCore::on_uploaded`].
    Upload {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Files in its work directory, with the digests the runtime computed.
        outputs: Vec<ArtifactRef>,
    },
    /// Stop delivering this attempt's outputs; no answer is expected and a late one is ignored.
    AbortUpload {
        /// Which attempt.
        attempt_id: AttemptId,
    },
    /// The controller durably recorded how this attempt ended: the runtime may
    /// drop its record of it, and its inputs leave its directory (so the
    /// cache may evict them). Nothing answers.
    Forget {
        /// Which attempt.
        attempt_id: AttemptId,
    },
    /// After a reconciliation: look for containers that no live attempt
    /// claims (left by a crash, or fenced) and remove them.
    Reap,
    /// Kill these processes of an ended attempt that still hold GPU memory
    /// (host pids, from the monitor); the GPU is checked again afterwards.
    KillStrays {
        /// The attempt they belong to.
        attempt_id: AttemptId,
        /// Host pids.
        pids: Vec<u32>,
    },
}

/// Xids NVIDIA documents as caused by the application (bad memory access,
/// graphics engine exceptions, reset channel, preemptive cleanup, video
/// decoder/ECC-in-app errors): reported, but the GPU stays in service.
pub const APPLICATION_XIDS: &[u64] = &[13, 31, 43, 45, 68, 109];

/// One GPU as the monitor read it, its processes attributed to attempts.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuReading {
    /// The usage reported in heartbeats; `foreign_vram_bytes` is the memory of unattributed processes.
    pub usage: GpuUsage,
    /// Processes with a context on it.
    pub processes: Vec<GpuProcess>,
    /// Set when the GPU could not be read because it is gone (NVML's `GpuIsLost`).
    pub lost: Option<String>,
}

/// A process on a GPU, as the monitor attributed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuProcess {
    /// Host pid.
    pub pid: u32,
    /// Memory it holds; `None` when the driver cannot say.
    pub used_bytes: Option<u64>,
    /// The attempt it belongs to; `None` for a foreign process.
    pub attempt_id: Option<AttemptId>,
}

impl GpuReading {
    /// A reading of usage alone: no processes listed, not lost (simulated GPUs).
    pub fn of_usage(usage: GpuUsage) -> GpuReading {
        GpuReading { usage, processes: Vec::new(), lost: None }
    }
}

/// Why staging failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageFailure {
    /// What went wrong and what to do.
    pub reason: String,
    /// Whether another attempt may succeed (controller unreachable) or not (digest mismatch at the source).
    pub retry: cosmos_proto::Retry,
}

/// Why the agent stopped an attempt, which decides what its exit means.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The user cancelled its job.
    Cancel,
    /// It ran past its job's `timeout_ms`.
    Timeout,
    /// The controller no longer counts it as live.
    Fenced,
}

/// An attempt's files in flight, around the container's life.
#[derive(Clone, Debug)]
enum BlobWork {
    /// Inputs are being fetched; the container starts once they are in place.
    Staging { epoch: Epoch, spec: Box<JobSpec> },
    /// The container exited cleanly; success is reported once the outputs are safe at the controller.
    Uploading { outputs: Vec<ArtifactRef>, deadline_ms: u64 },
}

#[derive(Clone, Debug)]
struct Attempt {
    /// Carried for the reports of adopted attempts and for logs.
    #[allow(dead_code)]
    job_id: JobId,
    gpu_uuids: Vec<String>,
    required_outputs: Vec<String>,
    /// The job's own terminal exit codes (`JobSpec::terminal_exit_codes`).
    terminal_exit_codes: Vec<i32>,
    /// The last bytes it wrote on stderr, so a failure can quote the command's own message.
    stderr_tail: Vec<u8>,
    started: bool,
    progress: (u32, u32),
    deadline_ms: Option<u64>,
    timeout_ms: u64,
    stop: Option<(StopReason, u64)>,
    blob_work: Option<BlobWork>,
    /// Memory in use on each GPU before the attempt, to check its release.
    baselines: Vec<(String, u64)>,
}

#[derive(Clone, Debug)]
struct PendingRelease {
    baseline_bytes: u64,
    deadline_ms: u64,
    attempt_id: AttemptId,
    /// Its processes that outlived it were killed; the next deadline quarantines.
    killed: bool,
}

/// Why a GPU is out of scheduling.
#[derive(Clone, Debug)]
struct Fault {
    /// For a leak: the attempt and the memory level that counts as recovered; `None`: only an operator returns it.
    leak: Option<(AttemptId, u64)>,
    reason: String,
    held_bytes: u64,
    pids: Vec<u32>,
    since_ms: u64,
}

/// One GPU host's agent.
pub struct AgentCore {
    config: AgentConfig,
    gpus: Vec<GpuInfo>,
    gpus_simulated: bool,
    runtime_name: String,
    incarnation: u64,
    usage: BTreeMap<String, GpuUsage>,
    known_epoch: Epoch,
    draining: bool,
    attempts: BTreeMap<AttemptId, Attempt>,
    finished: BTreeMap<AttemptId, (AttemptOutcome, Vec<String>)>,
    pending_release: BTreeMap<String, PendingRelease>,
    /// Faulty GPUs and why.
    faulty: BTreeMap<String, Fault>,
    /// Processes on each GPU at the last reading.
    gpu_processes: BTreeMap<String, Vec<GpuProcess>>,
    connected: bool,
    /// Why the runtime cannot start work now, as the shell last found.
    unhealthy: Option<String>,
    heartbeat_seq: u64,
    last_heartbeat_ms: u64,
    last_ack_ms: u64,
    /// Outputs of attempts that exited cleanly while no agent ran, to deliver once connected.
    recovered_uploads: Vec<(AttemptId, Vec<ArtifactRef>)>,
}

impl AgentCore {
    /// An agent with these GPUs, adopting the containers found at start-up.
    /// `now_ms` is this process's clock at start-up; adopted attempts' timeouts count from it.
    pub fn new(
        now_ms: u64,
        config: AgentConfig,
        gpus: Vec<GpuInfo>,
        gpus_simulated: bool,
        runtime_name: &str,
        incarnation: u64,
        recovered: Vec<Recovered>,
    ) -> AgentCore {
        let mut core = AgentCore {
            config,
            gpus,
            gpus_simulated,
            runtime_name: runtime_name.to_string(),
            incarnation,
            usage: BTreeMap::new(),
            known_epoch: Epoch(0),
            draining: false,
            attempts: BTreeMap::new(),
            finished: BTreeMap::new(),
            pending_release: BTreeMap::new(),
            faulty: BTreeMap::new(),
            gpu_processes: BTreeMap::new(),
            connected: false,
            unhealthy: None,
            heartbeat_seq: 0,
            last_heartbeat_ms: 0,
            last_ack_ms: 0,
            recovered_uploads: Vec::new(),
        };
        for r in recovered {
            match r.exited {
                None => {
                    core.attempts.insert(
                        r.attempt_id,
                        Attempt {
                            job_id: r.job_id,
                            gpu_uuids: r.gpu_uuids,
                            required_outputs: Vec::new(),
                            terminal_exit_codes: Vec::new(),
                            stderr_tail: Vec::new(),
                            started: true,
                            progress: (0, 0),
                            // Relative to this process's clock: the runtime measured it on the same host.
                            deadline_ms: r.remaining_ms.map(|left| now_ms.saturating_add(left)),
                            timeout_ms: r.remaining_ms.unwrap_or(0),
                            stop: None,
                            blob_work: None,
                            baselines: Vec::new(),
                        },
                    );
                }
                // Its spec is gone with the previous agent: only the rules every job shares apply.
                Some(status) => match outcome_of(&status, None, r.outputs, &ExitContext::default()) {
                    // Its outputs are still in its directory: deliver them as if it had
                    // just exited, rather than report a success with nothing to download.
                    AttemptOutcome::Succeeded { outputs } if !outputs.is_empty() => {
                        let deadline_ms = now_ms.saturating_add(core.config.upload_timeout_ms);
                        core.attempts.insert(
                            r.attempt_id,
                            Attempt {
                                job_id: r.job_id,
                                gpu_uuids: r.gpu_uuids,
                                required_outputs: Vec::new(),
                                terminal_exit_codes: Vec::new(),
                                stderr_tail: Vec::new(),
                                started: true,
                                progress: (0, 0),
                                deadline_ms: None,
                                timeout_ms: 0,
                                stop: None,
                                blob_work: Some(BlobWork::Uploading { outputs: outputs.clone(), deadline_ms }),
                                baselines: Vec::new(),
                            },
                        );
                        core.recovered_uploads.push((r.attempt_id, outputs));
                    }
                    outcome => {
                        core.finished.insert(r.attempt_id, (outcome, r.gpu_uuids));
                    }
                },
            }
        }
        core
    }

    /// A connection to the controller is up (handshake done): say hello.
    pub fn connected(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        self.connected = true;
        self.last_ack_ms = now_ms;
        self.last_heartbeat_ms = now_ms;
        out.push(Output::Send(AgentMsg::Hello(AgentHello {
            gpus: self.gpus.clone(),
            gpus_simulated: self.gpus_simulated,
            runtime: self.runtime_name.clone(),
            attempts: self.reports(),
            incarnation: self.incarnation,
        })));
        // Delivery needs the link; the blob engine keeps retrying across later reconnects itself.
        for (attempt_id, outputs) in std::mem::take(&mut self.recovered_uploads) {
            if self.attempts.get(&attempt_id).is_some_and(|a| matches!(a.blob_work, Some(BlobWork::Uploading { .. }))) {
                out.push(Output::Upload { attempt_id, outputs });
            }
        }
    }

    /// The connection is gone; attempts keep running while we reconnect.
    pub fn disconnected(&mut self) {
        self.connected = false;
    }

    /// The shell's finding on the runtime: `Some(reason)` while it cannot start
    /// work (sent with every heartbeat, so the controller stops placing work here).
    pub fn set_unhealthy(&mut self, reason: Option<String>) {
        self.unhealthy = reason;
    }

    /// Whether a connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A message from the controller.
    pub fn on_message(&mut self, now_ms: u64, msg: ControllerMsg, out: &mut Vec<Output>) {
        match msg {
            ControllerMsg::Welcome { epoch, heartbeat_interval_ms } => {
                self.known_epoch = self.known_epoch.max(epoch);
                self.config.heartbeat_interval_ms = heartbeat_interval_ms.max(1);
            }
            ControllerMsg::Assign(assign) => self.assign(now_ms, *assign, out),
            ControllerMsg::Cancel { attempt_id, grace_ms } => {
                if self.attempts.contains_key(&attempt_id) {
                    self.stop(now_ms, attempt_id, StopReason::Cancel, grace_ms, out);
                } else if let Some((outcome, _)) = self.finished.get(&attempt_id) {
                    out.push(Output::Send(AgentMsg::AttemptFinished { attempt_id, outcome: outcome.clone() }));
                } else {
                    let outcome = AttemptOutcome::Lost { reason: "the agent does not know this attempt".into() };
                    out.push(Output::Send(AgentMsg::AttemptFinished { attempt_id, outcome }));
                }
            }
            ControllerMsg::Drain { draining } => self.draining = draining,
            ControllerMsg::Reconcile { epoch, keep } => {
                if epoch < self.known_epoch {
                    return; // From a controller that has since restarted.
                }
                self.known_epoch = epoch;
                let keep: BTreeSet<AttemptId> = keep.into_iter().collect();
                let fenced: Vec<AttemptId> = self.attempts.keys().filter(|a| !keep.contains(a)).copied().collect();
                for attempt_id in fenced {
                    self.stop(now_ms, attempt_id, StopReason::Fenced, self.config.stop_grace_ms, out);
                }
                out.push(Output::Reap);
            }
            ControllerMsg::AckFinished { attempt_ids } => {
                for id in attempt_ids {
                    self.finished.remove(&id);
                    out.push(Output::Forget { attempt_id: id });
                }
            }
            ControllerMsg::HeartbeatAck { .. } => self.last_ack_ms = now_ms,
            ControllerMsg::ReleaseGpu { gpu_uuid } => {
                // The operator's word: whatever held it was dealt with by hand.
                self.pending_release.remove(&gpu_uuid);
                if self.faulty.remove(&gpu_uuid).is_some() {
                    out.push(Output::Send(AgentMsg::GpuRecovered { gpu_uuid }));
                }
            }
        }
    }

    fn assign(&mut self, now_ms: u64, a: Assign, out: &mut Vec<Output>) {
        if self.attempts.contains_key(&a.attempt_id) || self.finished.contains_key(&a.attempt_id) {
            return; // A resend: the first copy is being handled.
        }
        if let Some(reason) = self.refusal(&a) {
            let outcome = AttemptOutcome::Rejected { reason };
            out.push(Output::Send(AgentMsg::AttemptFinished { attempt_id: a.attempt_id, outcome }));
            return;
        }
        self.known_epoch = a.epoch;
        let baselines = a
            .gpu_uuids
            .iter()
            .map(|u| {
                // Memory still draining from the previous attempt belongs to its baseline.
                let base = match self.pending_release.remove(u) {
                    Some(p) => p.baseline_bytes,
                    None => self.usage.get(u).map_or(0, own_vram_bytes),
                };
                (u.clone(), base)
            })
            .collect();
        let mut att = Attempt {
            job_id: a.job_id,
            gpu_uuids: a.gpu_uuids.clone(),
            required_outputs: a.spec.outputs.iter().filter(|o| o.required).map(|o| o.path.clone()).collect(),
            terminal_exit_codes: a.spec.terminal_exit_codes.clone(),
            stderr_tail: Vec::new(),
            started: false,
            progress: (0, 0),
            // From acceptance, so slow staging cannot stretch an attempt past its bound.
            deadline_ms: Some(now_ms.saturating_add(a.spec.timeout_ms)),
            timeout_ms: a.spec.timeout_ms,
            stop: None,
            blob_work: None,
            baselines,
        };
        if !a.spec.inputs.is_empty() {
            let inputs = a.spec.inputs.clone();
            att.blob_work = Some(BlobWork::Staging { epoch: a.epoch, spec: Box::new(a.spec) });
            self.attempts.insert(a.attempt_id, att);
            out.push(Output::Stage { attempt_id: a.attempt_id, inputs });
            return;
        }
        self.attempts.insert(a.attempt_id, att);
        out.push(Output::Start {
            attempt_id: a.attempt_id,
            job_id: a.job_id,
            epoch: a.epoch,
            spec: Box::new(a.spec),
            gpu_uuids: a.gpu_uuids,
        });
    }

    fn refusal(&self, a: &Assign) -> Option<String> {
        if a.epoch < self.known_epoch {
            return Some(format!("stale order from controller epoch {}, current is {}", a.epoch.0, self.known_epoch.0));
        }
        if self.draining {
            return Some("agent is draining".into());
        }
        for uuid in &a.gpu_uuids {
            if !self.gpus.iter().any(|g| &g.uuid == uuid) {
                return Some(format!("GPU {uuid} is not on this host"));
            }
            if self.faulty.contains_key(uuid) {
                return Some(format!("GPU {uuid} is faulty"));
            }
            if let Some((id, _)) = self.attempts.iter().find(|(_, att)| att.gpu_uuids.contains(uuid)) {
                return Some(format!("GPU {uuid} is in use by {id}"));
            }
        }
        if a.gpu_uuids.len() != a.spec.gpus as usize {
            return Some(format!("job asks for {} GPUs but {} were given", a.spec.gpus, a.gpu_uuids.len()));
        }
        None
    }

    fn stop(&mut self, now_ms: u64, attempt_id: AttemptId, reason: StopReason, grace_ms: u64, out: &mut Vec<Output>) {
        let Some(att) = self.attempts.get_mut(&attempt_id) else { return };
        if att.stop.is_some() {
            return; // Already stopping; the first stop's grace holds.
        }
        // Nothing runs while files are in flight: abort the blob work and finish now, no runtime stop.
        match &att.blob_work {
            Some(BlobWork::Staging { .. }) => {
                out.push(Output::AbortStage { attempt_id });
                let outcome = match reason {
                    StopReason::Cancel | StopReason::Fenced => AttemptOutcome::Cancelled,
                    StopReason::Timeout => AttemptOutcome::Failed {
                        exit_code: None,
                        reason: format!(
                            "timed out while staging inputs after {} ms; raise `timeout_s` if they need longer",
                            att.timeout_ms
                        ),
                        retry: cosmos_proto::Retry::Retryable,
                    },
                };
                self.ended(now_ms, attempt_id, outcome, out);
                return;
            }
            Some(BlobWork::Uploading { .. }) => {
                out.push(Output::AbortUpload { attempt_id });
                self.ended(now_ms, attempt_id, AttemptOutcome::Cancelled, out);
                return;
            }
            None => {}
        }
        att.stop = Some((reason, now_ms.saturating_add(grace_ms).saturating_add(self.config.kill_slack_ms)));
        out.push(Output::Stop { attempt_id, grace_ms });
    }

    /// Staging ended: start the attempt, or finish it failed.
    pub fn on_staged(
        &mut self,
        now_ms: u64,
        attempt_id: AttemptId,
        result: Result<(), StageFailure>,
        out: &mut Vec<Output>,
    ) {
        let Some(att) = self.attempts.get_mut(&attempt_id) else { return };
        if !matches!(att.blob_work, Some(BlobWork::Staging { .. })) {
            return; // A late or duplicate answer.
        }
        match result {
            Ok(()) => {
                let Some(BlobWork::Staging { epoch, spec }) = att.blob_work.take() else { return };
                out.push(Output::Start {
                    attempt_id,
                    job_id: att.job_id,
                    epoch,
                    spec,
                    gpu_uuids: att.gpu_uuids.clone(),
                });
            }
            Err(StageFailure { reason, retry }) => {
                let reason = format!("staging inputs failed: {reason}");
                self.ended(now_ms, attempt_id, AttemptOutcome::Failed { exit_code: None, reason, retry }, out);
            }
        }
    }

    /// Delivery of the outputs ended: report the success, or a retryable failure.
    pub fn on_uploaded(
        &mut self,
        now_ms: u64,
        attempt_id: AttemptId,
        result: Result<(), String>,
        out: &mut Vec<Output>,
    ) {
        let Some(att) = self.attempts.get_mut(&attempt_id) else { return };
        if !matches!(att.blob_work, Some(BlobWork::Uploading { .. })) {
            return; // A late or duplicate answer.
        }
        let Some(BlobWork::Uploading { outputs, .. }) = att.blob_work.take() else { return };
        let outcome = match result {
            Ok(()) => AttemptOutcome::Succeeded { outputs },
            Err(e) => undelivered(&e),
        };
        self.ended(now_ms, attempt_id, outcome, out);
    }

    /// An event from the container runtime.
    pub fn on_runtime(&mut self, now_ms: u64, event: RuntimeEvent, out: &mut Vec<Output>) {
        match event {
            RuntimeEvent::Started { attempt_id, handle } => {
                if let Some(att) = self.attempts.get_mut(&attempt_id) {
                    att.started = true;
                    out.push(Output::Send(AgentMsg::AttemptStarted { attempt_id, handle }));
                }
            }
            RuntimeEvent::StartFailed { attempt_id, reason, retry } => {
                if self.attempts.get(&attempt_id).is_some_and(|a| a.blob_work.is_some()) {
                    return; // Nothing was started for it, or it already ended: not this attempt's news.
                }
                let outcome = AttemptOutcome::Failed { exit_code: None, reason, retry };
                self.ended(now_ms, attempt_id, outcome, out);
            }
            RuntimeEvent::Progress { attempt_id, step, total } => {
                if let Some(att) = self.attempts.get_mut(&attempt_id) {
                    att.progress = (step, total);
                    out.push(Output::Send(AgentMsg::Progress { attempt_id, step, total }));
                }
            }
            RuntimeEvent::Log { attempt_id, stream, offset, data } => {
                if let Some(att) = self.attempts.get_mut(&attempt_id) {
                    if stream == LogStream::Stderr {
                        att.keep_stderr(&data);
                    }
                    out.push(Output::Send(AgentMsg::LogChunk(LogChunk { attempt_id, stream, offset, data })));
                }
            }
            RuntimeEvent::Exited { attempt_id, status, outputs } => {
                let Some(att) = self.attempts.get_mut(&attempt_id) else { return };
                if att.blob_work.is_some() {
                    return; // Not running: a duplicate exit, or news for a container it never had.
                }
                let stop = att.stop.map(|(reason, _)| (reason, att.timeout_ms));
                match outcome_of(&status, stop, outputs, &att.exit_context()) {
                    AttemptOutcome::Succeeded { outputs } if !outputs.is_empty() => {
                        // The process is gone, so its memory must drain now, but the GPUs stay
                        // claimed by the attempt until the controller hears how it ended.
                        for (uuid, baseline_bytes) in std::mem::take(&mut att.baselines) {
                            let deadline_ms = now_ms.saturating_add(self.config.vram_release_bound_ms);
                            self.pending_release.insert(
                                uuid,
                                PendingRelease { baseline_bytes, deadline_ms, attempt_id, killed: false },
                            );
                        }
                        att.progress.0 = att.progress.1;
                        let deadline_ms = now_ms.saturating_add(self.config.upload_timeout_ms);
                        att.blob_work = Some(BlobWork::Uploading { outputs: outputs.clone(), deadline_ms });
                        out.push(Output::Upload { attempt_id, outputs });
                    }
                    outcome => self.ended(now_ms, attempt_id, outcome, out),
                }
            }
        }
    }

    fn ended(&mut self, now_ms: u64, attempt_id: AttemptId, outcome: AttemptOutcome, out: &mut Vec<Output>) {
        let Some(att) = self.attempts.remove(&attempt_id) else { return };
        for (uuid, baseline_bytes) in att.baselines {
            let deadline_ms = now_ms.saturating_add(self.config.vram_release_bound_ms);
            self.pending_release
                .insert(uuid, PendingRelease { baseline_bytes, deadline_ms, attempt_id, killed: false });
        }
        self.finished.insert(attempt_id, (outcome.clone(), att.gpu_uuids));
        out.push(Output::Send(AgentMsg::AttemptFinished { attempt_id, outcome }));
    }

    /// A fresh reading of every GPU's usage alone (simulated GPUs: no processes listed).
    pub fn on_gpu_sample(&mut self, now_ms: u64, samples: Vec<GpuUsage>, out: &mut Vec<Output>) {
        self.on_gpu_readings(now_ms, samples.into_iter().map(GpuReading::of_usage).collect(), out);
    }

    /// A fresh reading of every GPU from the monitor, processes attributed: leaks are judged on it.
    pub fn on_gpu_readings(&mut self, now_ms: u64, readings: Vec<GpuReading>, out: &mut Vec<Output>) {
        for r in readings {
            let uuid = r.usage.uuid.clone();
            if let Some(detail) = r.lost {
                // Keep the last good usage; a lost GPU says nothing about its memory.
                if self.faulty.get(&uuid).is_none_or(|f| f.leak.is_some()) {
                    self.on_gpu_error(
                        now_ms,
                        &uuid,
                        format!("the GPU is lost ({detail}); it needs a reset or a reboot"),
                        out,
                    );
                }
                continue;
            }
            self.gpu_processes.insert(uuid.clone(), r.processes);
            self.usage.insert(uuid, r.usage);
        }
        self.check_vram(now_ms, Judge::Reading, out);
    }

    /// The driver reported a hardware error on a GPU.
    pub fn on_gpu_error(&mut self, now_ms: u64, uuid: &str, detail: String, out: &mut Vec<Output>) {
        // Hardware faults do not clear by themselves: an operator fixes the GPU and releases it.
        self.pending_release.remove(uuid);
        let fault = Fault { leak: None, reason: detail.clone(), held_bytes: 0, pids: Vec::new(), since_ms: now_ms };
        self.faulty.insert(uuid.to_string(), fault);
        out.push(Output::Send(AgentMsg::GpuFault { gpu_uuid: uuid.to_string(), fault: GpuFault::Hardware { detail } }));
    }

    /// A critical Xid from the driver's event stream. Application-caused ones
    /// ([`APPLICATION_XIDS`]) leave the GPU in service; the others quarantine it.
    /// Returns whether it did.
    pub fn on_gpu_xid(&mut self, now_ms: u64, uuid: &str, xid: u64, out: &mut Vec<Output>) -> bool {
        if APPLICATION_XIDS.contains(&xid) || !self.gpus.iter().any(|g| g.uuid == uuid) {
            return false;
        }
        let detail = format!(
            "Xid {xid} reported by the driver (see NVIDIA's Xid catalogue); check `dmesg`, fix or reset the GPU, then `cosmos agents undrain HOST --gpu {uuid}`"
        );
        self.on_gpu_error(now_ms, uuid, detail, out);
        true
    }

    fn attempt_pids(&self, uuid: &str, attempt_id: AttemptId) -> Vec<u32> {
        self.gpu_processes
            .get(uuid)
            .map(|ps| ps.iter().filter(|p| p.attempt_id == Some(attempt_id)).map(|p| p.pid).collect())
            .unwrap_or_default()
    }

    /// Judges the GPUs whose memory must drain. `Judge::Reading`: a fresh reading came, so every
    /// pending GPU is looked at and quarantined ones may recover. `Judge::Due`: only time passed,
    /// so only GPUs whose bound has passed are judged (on the last reading), and nothing happens
    /// before [`AgentCore::next_deadline_ms`].
    fn check_vram(&mut self, now_ms: u64, judge: Judge, out: &mut Vec<Output>) {
        let tolerance = self.config.vram_tolerance_bytes;
        let mut released = Vec::new();
        let mut quarantined = Vec::new();
        let uuids: Vec<String> = self
            .pending_release
            .iter()
            .filter(|(_, p)| judge == Judge::Reading || now_ms >= p.deadline_ms)
            .map(|(uuid, _)| uuid.clone())
            .collect();
        for uuid in uuids {
            let used = self.usage.get(&uuid).map_or(0, own_vram_bytes);
            let p = self.pending_release[&uuid].clone();
            let ours = self.attempt_pids(&uuid, p.attempt_id);
            if ours.is_empty() && used <= p.baseline_bytes.saturating_add(tolerance) {
                released.push(uuid);
            } else if now_ms >= p.deadline_ms {
                if !ours.is_empty() && !p.killed {
                    // Processes of the attempt outlived it: kill them and look again before judging.
                    let entry = self.pending_release.get_mut(&uuid).expect("listed above");
                    entry.killed = true;
                    entry.deadline_ms = now_ms.saturating_add(self.config.stray_kill_recheck_ms);
                    out.push(Output::KillStrays { attempt_id: p.attempt_id, pids: ours });
                } else {
                    quarantined.push((uuid, p, used, ours));
                }
            }
        }
        for uuid in released {
            self.pending_release.remove(&uuid);
        }
        for (uuid, p, used, ours) in quarantined {
            self.pending_release.remove(&uuid);
            let held = used.saturating_sub(p.baseline_bytes);
            let reason = if ours.is_empty() {
                format!(
                    "{} held above its baseline after {} ended, with no process of it listed (a zombie, or a process in another PID namespace): find it with `fuser -v /dev/nvidia*`, end it or reset the GPU; it returns by itself once the memory is free",
                    human_bytes(held),
                    p.attempt_id
                )
            } else {
                let pids: Vec<String> = ours.iter().map(u32::to_string).collect();
                format!(
                    "{} held above its baseline after {} ended, by its processes {} that outlived it and survived a kill: end them by hand or reset the GPU; it returns by itself once they are gone and the memory is free",
                    human_bytes(held),
                    p.attempt_id,
                    pids.join(", ")
                )
            };
            self.faulty.insert(
                uuid.clone(),
                Fault {
                    leak: Some((p.attempt_id, p.baseline_bytes)),
                    reason,
                    held_bytes: held,
                    pids: ours,
                    since_ms: now_ms,
                },
            );
            let fault = GpuFault::VramNotReleased {
                attempt_id: p.attempt_id,
                baseline_bytes: p.baseline_bytes,
                held_bytes: used,
            };
            out.push(Output::Send(AgentMsg::GpuFault { gpu_uuid: uuid, fault }));
        }
        if judge == Judge::Due {
            // Usage and processes change only with a reading, which judged recovery already.
            return;
        }
        let recovered: Vec<String> = self
            .faulty
            .iter()
            .filter(|(uuid, f)| {
                f.leak.is_some_and(|(attempt_id, base)| {
                    self.attempt_pids(uuid, attempt_id).is_empty()
                        && self.usage.get(*uuid).is_some_and(|g| own_vram_bytes(g) <= base.saturating_add(tolerance))
                })
            })
            .map(|(uuid, _)| uuid.clone())
            .collect();
        for uuid in recovered {
            self.faulty.remove(&uuid);
            out.push(Output::Send(AgentMsg::GpuRecovered { gpu_uuid: uuid }));
        }
    }

    /// Time passed: heartbeats, the link's liveness, timeouts, forced kills, VRAM bounds.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if self.connected {
            if now_ms.saturating_sub(self.last_ack_ms) >= self.config.ack_timeout_ms {
                self.connected = false;
                out.push(Output::Reconnect);
            } else if now_ms.saturating_sub(self.last_heartbeat_ms) >= self.config.heartbeat_interval_ms {
                self.last_heartbeat_ms = now_ms;
                self.heartbeat_seq += 1;
                out.push(Output::Send(AgentMsg::Heartbeat(Heartbeat {
                    seq: self.heartbeat_seq,
                    gpus: self.gpu_usage(now_ms),
                    attempts: self.reports(),
                    unhealthy: self.unhealthy.clone(),
                })));
            }
        }
        let mut timed_out = Vec::new();
        let mut force = Vec::new();
        let mut undelivered_ids = Vec::new();
        for (&id, att) in &self.attempts {
            if let Some(BlobWork::Uploading { deadline_ms, .. }) = att.blob_work {
                // The job's own timeout no longer applies: it finished; only the delivery is bounded.
                if now_ms >= deadline_ms {
                    undelivered_ids.push(id);
                }
                continue;
            }
            match att.stop {
                None if att.deadline_ms.is_some_and(|d| now_ms >= d) => timed_out.push(id),
                Some((_, kill_at)) if now_ms >= kill_at => force.push(id),
                _ => {}
            }
        }
        for id in undelivered_ids {
            out.push(Output::AbortUpload { attempt_id: id });
            let e = format!("no confirmation within {} ms", self.config.upload_timeout_ms);
            self.ended(now_ms, id, undelivered(&e), out);
        }
        for id in timed_out {
            self.stop(now_ms, id, StopReason::Timeout, self.config.stop_grace_ms, out);
        }
        for id in force {
            // The runtime did not confirm the stop: ask again, with no grace.
            if let Some(att) = self.attempts.get_mut(&id) {
                let reason = att.stop.map_or(StopReason::Cancel, |(r, _)| r);
                att.stop = Some((reason, now_ms.saturating_add(self.config.kill_slack_ms)));
                out.push(Output::Stop { attempt_id: id, grace_ms: 0 });
            }
        }
        self.check_vram(now_ms, Judge::Due, out);
    }

    /// When [`AgentCore::tick`] next has work, on this agent's clock: a heartbeat
    /// due or the link's acknowledgement bound, an attempt's timeout, a forced
    /// kill after a stop's grace, an output delivery's bound, a GPU's
    /// memory-release bound (or the re-check after killing its strays). A
    /// shell sleeps until then or until its next input, then asks again;
    /// ticking earlier changes nothing. `None`: nothing is pending.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let link = self.connected.then(|| {
            let ack = self.last_ack_ms.saturating_add(self.config.ack_timeout_ms);
            let heartbeat = self.last_heartbeat_ms.saturating_add(self.config.heartbeat_interval_ms);
            ack.min(heartbeat)
        });
        let attempts = self.attempts.values().filter_map(|att| match (&att.blob_work, att.stop) {
            // Only the delivery is bounded once the job has finished.
            (Some(BlobWork::Uploading { deadline_ms, .. }), _) => Some(*deadline_ms),
            (_, None) => att.deadline_ms,
            (_, Some((_, kill_at))) => {
                #[cfg(feature = "sabotage")]
                if self.config.sabotage == Sabotage::ForgetKillDeadline {
                    return None;
                }
                Some(kill_at)
            }
        });
        let releases = self.pending_release.values().map(|p| p.deadline_ms);
        link.into_iter().chain(attempts).chain(releases).min()
    }

    fn gpu_usage(&self, now_ms: u64) -> Vec<GpuUsage> {
        self.gpus
            .iter()
            .map(|g| {
                let mut u = self.usage.get(&g.uuid).cloned().unwrap_or_else(|| GpuUsage::idle(g));
                u.healthy = !self.faulty.contains_key(&g.uuid);
                u.quarantine = self.faulty.get(&g.uuid).map(|f| GpuQuarantine {
                    reason: f.reason.clone(),
                    held_bytes: f.held_bytes,
                    pids: f.pids.clone(),
                    for_ms: now_ms.saturating_sub(f.since_ms),
                });
                u
            })
            .collect()
    }

    fn reports(&self) -> Vec<AttemptReport> {
        let live = self.attempts.iter().map(|(&attempt_id, att)| AttemptReport {
            attempt_id,
            phase: match (att.stop, att.started) {
                _ if matches!(att.blob_work, Some(BlobWork::Staging { .. })) => AttemptPhase::Starting,
                // Still live so the controller keeps it, and shown as done running.
                _ if matches!(att.blob_work, Some(BlobWork::Uploading { .. })) => {
                    AttemptPhase::Running { step: att.progress.1, total: att.progress.1 }
                }
                (Some(_), _) => AttemptPhase::Stopping,
                (None, true) => AttemptPhase::Running { step: att.progress.0, total: att.progress.1 },
                (None, false) => AttemptPhase::Starting,
            },
            gpu_uuids: att.gpu_uuids.clone(),
        });
        let done = self.finished.iter().map(|(&attempt_id, (outcome, gpus))| AttemptReport {
            attempt_id,
            phase: AttemptPhase::Finished(outcome.clone()),
            gpu_uuids: gpus.clone(),
        });
        live.chain(done).collect()
    }

    /// Attempts holding GPUs (staging, starting, running, stopping or uploading), with their GPUs.
    pub fn live_attempts(&self) -> impl Iterator<Item = (AttemptId, &[String])> {
        self.attempts.iter().map(|(&id, a)| (id, a.gpu_uuids.as_slice()))
    }

    /// Whether an attempt is being stopped.
    pub fn is_stopping(&self, id: AttemptId) -> bool {
        self.attempts.get(&id).is_some_and(|a| a.stop.is_some())
    }

    /// GPUs currently out of scheduling.
    pub fn faulty_gpus(&self) -> impl Iterator<Item = &str> {
        self.faulty.keys().map(String::as_str)
    }

    /// The highest controller epoch seen.
    pub fn known_epoch(&self) -> Epoch {
        self.known_epoch
    }
}

/// A clean exit whose outputs never reached the controller: worth another attempt.
fn undelivered(e: &str) -> AttemptOutcome {
    AttemptOutcome::Failed {
        exit_code: Some(0),
        reason: format!("the job succeeded but its outputs could not be delivered to the controller: {e}"),
        retry: cosmos_proto::Retry::Retryable,
    }
}

/// Memory on a GPU not held by processes the orchestrator did not start: what
/// an attempt must give back. A foreign process that starts meanwhile is not
/// the attempt's leak, so it does not mark the GPU faulty (its memory still
/// counts against free VRAM at placement).
fn own_vram_bytes(g: &GpuUsage) -> u64 {
    g.used_vram_bytes.saturating_sub(g.foreign_vram_bytes)
}

/// Bytes in GiB or MiB, for messages.
fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 { format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64) } else { format!("{} MiB", b >> 20) }
}

/// Bytes of an attempt's stderr kept for its failure message.
const STDERR_TAIL_BYTES: usize = 4096;
impl Attempt {
    fn exit_context(&self) -> ExitContext<'_> {
        let text = String::from_utf8_lossy(&self.stderr_tail);
        let (torchrun_root_cause, error_tail) = match torchrun_failure(&text) {
            Some((code, lines)) => (Some(code), lines),
            None => (None, error_tail(&text, |_| false)),
        };
        ExitContext {
            required: &self.required_outputs,
            terminal_exit_codes: &self.terminal_exit_codes,
            error_tail,
            torchrun_root_cause,
        }
    }

    fn keep_stderr(&mut self, data: &[u8]) {
        self.stderr_tail.extend_from_slice(data);
        let excess = self.stderr_tail.len().saturating_sub(STDERR_TAIL_BYTES);
        self.stderr_tail.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{QUOTED_BYTES_MAX, QUOTED_LINE_BYTES_MAX, QUOTED_LINES_MAX};
    use cosmos_proto::spec::OutputArtifact;
    use cosmos_proto::{Sha256, TraceContext};

    const GPU: &str = "GPU-0";
    const ATT: AttemptId = AttemptId(7);

    fn core() -> AgentCore {
        let gpu = GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 };
        let config = AgentConfig { upload_timeout_ms: 60_000, ..AgentConfig::default() };
        let mut core = AgentCore::new(0, config, vec![gpu], true, "sim", 1, Vec::new());
        core.connected(0, &mut Vec::new());
        core
    }

    fn spec(inputs: usize) -> JobSpec {
        let mut spec = JobSpec::command("t", ["true"]);
        spec.gpus = 1;
        spec.timeout_ms = 10_000;
        spec.inputs = (0..inputs)
            .map(|i| InputArtifact { sha256: Sha256([i as u8; 32]), size_bytes: 3, path: format!("in/{i}") })
            .collect();
        spec.outputs = vec![OutputArtifact { path: "out/model".into(), required: true }];
        spec
    }

    fn assign(core: &mut AgentCore, now_ms: u64, spec: JobSpec) -> Vec<Output> {
        let mut out = Vec::new();
        let msg = ControllerMsg::Assign(Box::new(Assign {
            epoch: Epoch(1),
            attempt_id: ATT,
            job_id: JobId(1),
            spec,
            gpu_uuids: vec![GPU.into()],
            trace: TraceContext::default(),
        }));
        core.on_message(now_ms, msg, &mut out);
        out
    }

    fn artifact() -> ArtifactRef {
        ArtifactRef { path: "out/model".into(), sha256: Sha256([9; 32]), size_bytes: 5 }
    }

    fn clean_exit(core: &mut AgentCore, now_ms: u64, outputs: Vec<ArtifactRef>) -> Vec<Output> {
        let mut out = Vec::new();
        let status = ExitStatus { code: Some(0), signal: None, oom_killed: false };
        core.on_runtime(now_ms, RuntimeEvent::Exited { attempt_id: ATT, status, outputs }, &mut out);
        out
    }

    fn finished(out: &[Output]) -> Option<AttemptOutcome> {
        out.iter().find_map(|o| match o {
            Output::Send(AgentMsg::AttemptFinished { attempt_id, outcome }) if *attempt_id == ATT => {
                Some(outcome.clone())
            }
            _ => None,
        })
    }

    fn phase(core: &AgentCore) -> Option<AttemptPhase> {
        core.reports().into_iter().find(|r| r.attempt_id == ATT).map(|r| r.phase)
    }

    #[test]
    fn outputs_of_an_attempt_that_ended_while_no_agent_ran_are_delivered_before_success() {
        let gpu = GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 };
        let recovered = Recovered {
            attempt_id: ATT,
            job_id: JobId(1),
            gpu_uuids: vec![GPU.into()],
            exited: Some(ExitStatus { code: Some(0), signal: None, oom_killed: false }),
            remaining_ms: None,
            outputs: vec![artifact()],
        };
        let mut core = AgentCore::new(0, AgentConfig::default(), vec![gpu], true, "sim", 1, vec![recovered]);
        let mut out = Vec::new();
        core.connected(0, &mut out);
        let hello = out.iter().position(|o| matches!(o, Output::Send(AgentMsg::Hello(_))));
        let upload = out.iter().position(|o| matches!(o, Output::Upload { attempt_id: ATT, .. }));
        assert!(hello.is_some() && upload > hello, "hello first, then the delivery: {out:?}");
        assert!(matches!(phase(&core), Some(AttemptPhase::Running { .. })), "not finished until delivered");
        assert_eq!(finished(&out), None);
        // A later reconnect does not start a second delivery: the engine retries the first.
        core.disconnected();
        let mut again = Vec::new();
        core.connected(10, &mut again);
        assert!(!again.iter().any(|o| matches!(o, Output::Upload { .. })), "{again:?}");
        let mut out = Vec::new();
        core.on_uploaded(20, ATT, Ok(()), &mut out);
        assert_eq!(finished(&out), Some(AttemptOutcome::Succeeded { outputs: vec![artifact()] }));
    }

    /// A running attempt whose container exited cleanly with an output, now uploading.
    fn uploading(core: &mut AgentCore) -> Vec<Output> {
        assign(core, 0, spec(0));
        let mut out = Vec::new();
        core.on_runtime(1, RuntimeEvent::Started { attempt_id: ATT, handle: "h".into() }, &mut out);
        core.on_runtime(2, RuntimeEvent::Progress { attempt_id: ATT, step: 3, total: 10 }, &mut out);
        clean_exit(core, 100, vec![artifact()])
    }

    #[test]
    fn without_inputs_it_starts_at_once() {
        let mut core = core();
        let out = assign(&mut core, 0, spec(0));
        assert!(matches!(out.as_slice(), [Output::Start { attempt_id: ATT, .. }]), "{out:?}");
    }

    #[test]
    fn with_inputs_it_stages_first_and_starts_once_staged() {
        let mut core = core();
        let out = assign(&mut core, 0, spec(2));
        assert!(matches!(out.as_slice(), [Output::Stage { attempt_id: ATT, inputs }] if inputs.len() == 2), "{out:?}");
        assert_eq!(phase(&core), Some(AttemptPhase::Starting));
        assert!(core.live_attempts().any(|(id, gpus)| id == ATT && gpus == [GPU.to_string()]));
        let mut out = Vec::new();
        core.on_staged(5, ATT, Ok(()), &mut out);
        assert!(matches!(out.as_slice(), [Output::Start { attempt_id: ATT, gpu_uuids, .. }] if gpus_ok(gpu_uuids)));
        // A duplicate answer changes nothing.
        let mut out = Vec::new();
        core.on_staged(6, ATT, Ok(()), &mut out);
        assert!(out.is_empty());
    }

    fn gpus_ok(gpus: &[String]) -> bool {
        gpus == [GPU.to_string()]
    }

    #[test]
    fn the_gpus_stay_claimed_while_staging() {
        let mut core = core();
        assign(&mut core, 0, spec(1));
        let mut out = Vec::new();
        let msg = ControllerMsg::Assign(Box::new(Assign {
            epoch: Epoch(1),
            attempt_id: AttemptId(8),
            job_id: JobId(2),
            spec: spec(0),
            gpu_uuids: vec![GPU.into()],
            trace: TraceContext::default(),
        }));
        core.on_message(1, msg, &mut out);
        assert!(matches!(
            out.as_slice(),
            [Output::Send(AgentMsg::AttemptFinished { outcome: AttemptOutcome::Rejected { .. }, .. })]
        ));
    }

    #[test]
    fn failed_staging_finishes_the_attempt_with_its_retryability() {
        for retryable in [true, false] {
            let mut core = core();
            assign(&mut core, 0, spec(1));
            let mut out = Vec::new();
            core.on_staged(
                5,
                ATT,
                Err(StageFailure { reason: "digest mismatch".into(), retry: cosmos_proto::Retry::when(retryable) }),
                &mut out,
            );
            let Some(AttemptOutcome::Failed { exit_code: None, reason, retry: r }) = finished(&out) else {
                panic!("{out:?}")
            };
            assert!(reason.starts_with("staging inputs failed: digest mismatch"), "{reason}");
            assert_eq!(r.is_retryable(), retryable);
            assert!(!out.iter().any(|o| matches!(o, Output::Start { .. })));
            assert_eq!(core.live_attempts().count(), 0);
            assert!(matches!(phase(&core), Some(AttemptPhase::Finished(_))), "kept until acknowledged");
        }
    }

    #[test]
    fn cancel_while_staging_aborts_it_and_finishes_cancelled_without_a_stop() {
        let mut core = core();
        assign(&mut core, 0, spec(1));
        let mut out = Vec::new();
        core.on_message(3, ControllerMsg::Cancel { attempt_id: ATT, grace_ms: 1_000 }, &mut out);
        assert!(out.contains(&Output::AbortStage { attempt_id: ATT }));
        assert!(!out.iter().any(|o| matches!(o, Output::Stop { .. })));
        assert_eq!(finished(&out), Some(AttemptOutcome::Cancelled));
        // The blob engine's late answer is ignored.
        let mut out = Vec::new();
        core.on_staged(4, ATT, Ok(()), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn staging_counts_toward_the_timeout() {
        let mut core = core();
        assign(&mut core, 0, spec(1));
        let mut out = Vec::new();
        core.tick(9_999, &mut out);
        assert!(finished(&out).is_none());
        let mut out = Vec::new();
        core.tick(10_000, &mut out);
        assert!(out.contains(&Output::AbortStage { attempt_id: ATT }));
        let Some(AttemptOutcome::Failed { reason, retry: cosmos_proto::Retry::Retryable, .. }) = finished(&out) else {
            panic!("{out:?}")
        };
        assert!(reason.contains("timed out while staging inputs"), "{reason}");
    }

    #[test]
    fn fencing_while_staging_aborts_it() {
        let mut core = core();
        assign(&mut core, 0, spec(1));
        let mut out = Vec::new();
        core.on_message(3, ControllerMsg::Reconcile { epoch: Epoch(1), keep: Vec::new() }, &mut out);
        assert!(out.contains(&Output::AbortStage { attempt_id: ATT }));
        assert_eq!(finished(&out), Some(AttemptOutcome::Cancelled));
        assert_eq!(core.live_attempts().count(), 0);
    }

    #[test]
    fn a_clean_exit_with_outputs_waits_for_their_delivery() {
        let mut core = core();
        let out = uploading(&mut core);
        assert_eq!(out, vec![Output::Upload { attempt_id: ATT, outputs: vec![artifact()] }]);
        assert_eq!(phase(&core), Some(AttemptPhase::Running { step: 10, total: 10 }));
        assert!(core.live_attempts().any(|(id, _)| id == ATT), "GPUs held until the controller hears the outcome");
        // Duplicate exit news changes nothing.
        assert!(clean_exit(&mut core, 101, vec![artifact()]).is_empty());
        let mut out = Vec::new();
        core.on_uploaded(200, ATT, Ok(()), &mut out);
        assert_eq!(finished(&out), Some(AttemptOutcome::Succeeded { outputs: vec![artifact()] }));
        assert_eq!(core.live_attempts().count(), 0);
        let mut out = Vec::new();
        core.on_uploaded(201, ATT, Ok(()), &mut out);
        assert!(out.is_empty(), "a late answer is ignored");
    }

    fn exit_with(core: &mut AgentCore, code: i32, stderr: &[u8]) -> Option<AttemptOutcome> {
        let mut out = Vec::new();
        let log = RuntimeEvent::Log { attempt_id: ATT, stream: LogStream::Stderr, offset: 0, data: stderr.to_vec() };
        core.on_runtime(1, log, &mut out);
        let status = ExitStatus { code: Some(code), signal: None, oom_killed: false };
        core.on_runtime(2, RuntimeEvent::Exited { attempt_id: ATT, status, outputs: Vec::new() }, &mut out);
        finished(&out)
    }

    #[test]
    fn a_jobs_own_terminal_exit_code_is_not_retried_and_its_message_is_quoted() {
        let stderr = b" 10%|#   | 1/10\rpython: can't open file 'x.py': [Errno 2] No such file or directory\n\n";
        let mut terminal = core();
        let mut s = spec(0);
        s.terminal_exit_codes = vec![2];
        assign(&mut terminal, 0, s);
        let Some(AttemptOutcome::Failed { exit_code: Some(2), reason, retry: cosmos_proto::Retry::Terminal }) =
            exit_with(&mut terminal, 2, stderr)
        else {
            panic!("exit 2 is terminal for this job");
        };
        assert!(reason.contains("not retried"), "{reason}");
        assert!(
            reason.ends_with(
                "its last error output: python: can't open file 'x.py': [Errno 2] No such file or directory"
            )
        );
        // Without the job saying so, 2 is an ordinary failure, retried.
        let mut plain = core();
        assign(&mut plain, 0, spec(0));
        let outcome = exit_with(&mut plain, 2, b"ValueError: boom\n");
        let Some(AttemptOutcome::Failed { retry: cosmos_proto::Retry::Retryable, reason, .. }) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(reason.ends_with("; its last error output: ValueError: boom"), "{reason}");
    }

    /// What torchrun (torch 2.x) writes when its worker exits 2: its log line,
    /// its own traceback ending in ChildFailedError, and the failure report.
    const TORCHRUN_WORKER_EXIT_2: &str = "python: can't open file '/workspace/x.py': [Errno 2] No such file or directory
E1201 10:00:00.123000 41 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: 2) local_rank: 0 (pid: 42) of binary: /usr/bin/python
Traceback (most recent call last):
  File \"/usr/local/bin/torchrun\", line 8, in <module>
    sys.exit(main())
  File \"/usr/local/lib/python3.10/dist-packages/torch/distributed/launcher/api.py\", line 263, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
/workspace/x.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_10:00:00
  host      : gpu-1
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 42)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
";

    #[test]
    fn torchruns_exit_1_is_judged_by_the_exit_code_of_the_worker_it_blames() {
        let mut terminal = core();
        let mut s = spec(0);
        s.terminal_exit_codes = vec![2];
        assign(&mut terminal, 0, s);
        let outcome = exit_with(&mut terminal, 1, TORCHRUN_WORKER_EXIT_2.as_bytes());
        let Some(AttemptOutcome::Failed { exit_code: Some(1), reason, retry: cosmos_proto::Retry::Terminal }) = outcome
        else {
            panic!("a worker's exit 2 under torchrun is terminal for this job: {outcome:?}");
        };
        assert!(reason.contains("the worker it blames exited with code 2"), "{reason}");
        assert!(
            reason.ends_with(
                "its last error output: python: can't open file '/workspace/x.py': [Errno 2] No such file or directory"
            ),
            "{reason}"
        );
        // A worker that failed otherwise (exit 1: an exception) is retried.
        let mut retried = core();
        let mut s = spec(0);
        s.terminal_exit_codes = vec![2];
        assign(&mut retried, 0, s);
        let other = TORCHRUN_WORKER_EXIT_2.replace("exitcode  : 2", "exitcode  : 1");
        let outcome = exit_with(&mut retried, 1, other.as_bytes());
        let Some(AttemptOutcome::Failed { retry: cosmos_proto::Retry::Retryable, .. }) = outcome else {
            panic!("{outcome:?}")
        };
    }

    #[test]
    fn the_stderr_tail_is_bounded() {
        let mut noisy = core();
        assign(&mut noisy, 0, spec(0));
        let mut noise = vec![b'x'; 3 * STDERR_TAIL_BYTES];
        noise.extend_from_slice(b"\nlast words\n");
        let outcome = exit_with(&mut noisy, 1, &noise);
        let Some(AttemptOutcome::Failed { reason, .. }) = outcome else { panic!("{outcome:?}") };
        let first = reason.lines().next().unwrap();
        assert!(first.ends_with("; its last error output: last words"), "{reason}");
        assert!(reason.len() < QUOTED_BYTES_MAX + 400, "{}", reason.len());
        let mut long = core();
        assign(&mut long, 0, spec(0));
        let outcome = exit_with(&mut long, 1, &vec![b'y'; 3 * STDERR_TAIL_BYTES]);
        let Some(AttemptOutcome::Failed { reason, .. }) = outcome else { panic!("{outcome:?}") };
        assert!(reason.len() < QUOTED_LINE_BYTES_MAX + 200, "{}", reason.len());
    }

    #[test]
    fn a_failure_quotes_the_last_lines_of_stderr_as_a_terminal_shows_them() {
        let mut failing = core();
        assign(&mut failing, 0, spec(0));
        let stderr = "loading\n  0%|          | 0/35\r  3%|▎         | 1/35\r\n\
                      Traceback (most recent call last):\n  File \"transfer.py\", line 9, in <module>\n    main()\n\
                      \n  File \"model.py\", line 3, in main\n    x.cuda()\nRuntimeError: CUDA out of memory\n\n";
        let outcome = exit_with(&mut failing, 1, stderr.as_bytes());
        let Some(AttemptOutcome::Failed { reason, .. }) = outcome else { panic!("{outcome:?}") };
        let lines: Vec<&str> = reason.lines().collect();
        assert!(
            lines[0].ends_with("see its logs; its last error output: RuntimeError: CUDA out of memory"),
            "{reason}"
        );
        assert_eq!(lines[1], format!("the last {QUOTED_LINES_MAX} lines of its stderr:"), "{reason}");
        assert_eq!(
            &lines[2..],
            [
                "    File \"transfer.py\", line 9, in <module>",
                "      main()",
                "    File \"model.py\", line 3, in main",
                "      x.cuda()",
                "  RuntimeError: CUDA out of memory",
            ],
            "the last lines, oldest first, blank ones out: {reason}"
        );
        // A progress bar's redraws leave one line, its last.
        assert_eq!(error_tail("a\n 0%| 0/3\r 33%| 1/3\r\nb\n", |_| false), ["a", " 33%| 1/3", "b"]);
        // Long lines stop the quote at its byte bound; the last line is always there.
        let long = format!("{}\n{}\nend\n", "p".repeat(1500), "q".repeat(1500));
        let tail = error_tail(&long, |_| false);
        assert_eq!(tail.len(), 2, "{tail:?}");
        assert_eq!(tail[1], "end");
        assert!(tail.iter().map(String::len).sum::<usize>() <= QUOTED_BYTES_MAX);
    }

    #[test]
    fn a_clean_exit_without_outputs_succeeds_at_once() {
        let mut core = core();
        let mut s = spec(0);
        s.outputs.clear();
        assign(&mut core, 0, s);
        let out = clean_exit(&mut core, 5, Vec::new());
        assert_eq!(finished(&out), Some(AttemptOutcome::Succeeded { outputs: Vec::new() }));
    }

    #[test]
    fn a_missing_required_output_fails_without_uploading() {
        let mut core = core();
        assign(&mut core, 0, spec(0));
        let other = ArtifactRef { path: "out/other".into(), ..artifact() };
        let out = clean_exit(&mut core, 5, vec![other]);
        assert!(!out.iter().any(|o| matches!(o, Output::Upload { .. })));
        assert!(matches!(finished(&out), Some(AttemptOutcome::Failed { retry: cosmos_proto::Retry::Terminal, .. })));
    }

    #[test]
    fn an_undelivered_output_fails_the_attempt_retryably() {
        let mut core = core();
        uploading(&mut core);
        let mut out = Vec::new();
        core.on_uploaded(200, ATT, Err("controller refused: disk full".into()), &mut out);
        let Some(AttemptOutcome::Failed { exit_code: Some(0), reason, retry: cosmos_proto::Retry::Retryable }) =
            finished(&out)
        else {
            panic!("{out:?}")
        };
        assert!(reason.contains("could not be delivered to the controller: controller refused"), "{reason}");
    }

    #[test]
    fn cancel_while_uploading_aborts_it_and_finishes_cancelled() {
        let mut core = core();
        uploading(&mut core);
        let mut out = Vec::new();
        core.on_message(150, ControllerMsg::Cancel { attempt_id: ATT, grace_ms: 1_000 }, &mut out);
        assert!(out.contains(&Output::AbortUpload { attempt_id: ATT }));
        assert!(!out.iter().any(|o| matches!(o, Output::Stop { .. })));
        assert_eq!(finished(&out), Some(AttemptOutcome::Cancelled));
    }

    #[test]
    fn fencing_while_uploading_aborts_it() {
        let mut core = core();
        uploading(&mut core);
        let mut out = Vec::new();
        core.on_message(150, ControllerMsg::Reconcile { epoch: Epoch(1), keep: Vec::new() }, &mut out);
        assert!(out.contains(&Output::AbortUpload { attempt_id: ATT }));
        assert_eq!(finished(&out), Some(AttemptOutcome::Cancelled));
    }

    #[test]
    fn the_job_timeout_does_not_apply_while_uploading_but_the_upload_bound_does() {
        let mut core = core();
        uploading(&mut core);
        let mut out = Vec::new();
        core.tick(20_000, &mut out);
        assert!(finished(&out).is_none(), "past the job's 10 s timeout: {out:?}");
        assert!(!out.iter().any(|o| matches!(o, Output::Stop { .. } | Output::AbortUpload { .. })));
        let mut out = Vec::new();
        core.tick(100 + 60_000, &mut out);
        assert!(out.contains(&Output::AbortUpload { attempt_id: ATT }));
        assert!(matches!(
            finished(&out),
            Some(AttemptOutcome::Failed { exit_code: Some(0), retry: cosmos_proto::Retry::Retryable, .. })
        ));
    }

    #[test]
    fn blob_work_survives_a_reconnect_and_nothing_is_reissued() {
        let mut core = core();
        assign(&mut core, 0, spec(1));
        core.disconnected();
        let mut out = Vec::new();
        core.connected(50, &mut out);
        let [Output::Send(AgentMsg::Hello(hello))] = out.as_slice() else { panic!("{out:?}") };
        assert_eq!(hello.attempts.len(), 1);
        assert_eq!(hello.attempts[0].phase, AttemptPhase::Starting);
        let mut out = Vec::new();
        core.on_staged(60, ATT, Ok(()), &mut out);
        assert!(matches!(out.as_slice(), [Output::Start { .. }]));

        let mut core = self::core();
        uploading(&mut core);
        core.disconnected();
        let mut out = Vec::new();
        core.connected(150, &mut out);
        let [Output::Send(AgentMsg::Hello(hello))] = out.as_slice() else { panic!("{out:?}") };
        assert_eq!(hello.attempts[0].phase, AttemptPhase::Running { step: 10, total: 10 });
    }

    #[test]
    fn a_foreign_process_arriving_during_an_attempt_is_not_its_leak() {
        let mut core = core();
        let sample = |used: u64, foreign: u64| {
            let info = GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 };
            vec![GpuUsage { used_vram_bytes: used, foreign_vram_bytes: foreign, ..GpuUsage::idle(&info) }]
        };
        core.on_gpu_sample(0, sample(1 << 30, 1 << 30), &mut Vec::new());
        uploading(&mut core);
        // Another user's process took 5 GiB meanwhile; ours is all gone.
        let bound = core.config.vram_release_bound_ms;
        let mut out = Vec::new();
        core.on_gpu_sample(100 + bound, sample(6 << 30, 6 << 30), &mut out);
        assert!(!out.iter().any(|o| matches!(o, Output::Send(AgentMsg::GpuFault { .. }))), "{out:?}");
        assert_eq!(core.faulty_gpus().count(), 0);
    }

    #[test]
    fn memory_must_drain_from_the_exit_not_from_the_delivery() {
        let mut core = core();
        let sample = |used| {
            vec![GpuUsage {
                used_vram_bytes: used,
                ..GpuUsage::idle(&GpuInfo {
                    index: 0,
                    uuid: GPU.into(),
                    name: "fake".into(),
                    total_vram_bytes: 80 << 30,
                })
            }]
        };
        core.on_gpu_sample(0, sample(0), &mut Vec::new());
        uploading(&mut core);
        let bound = core.config.vram_release_bound_ms;
        let mut out = Vec::new();
        core.on_gpu_sample(100 + bound, sample(10 << 30), &mut out);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Send(AgentMsg::GpuFault { fault: GpuFault::VramNotReleased { .. }, .. }))),
            "{out:?}"
        );
    }

    fn reading(used: u64, processes: Vec<GpuProcess>) -> Vec<GpuReading> {
        let info = GpuInfo { index: 0, uuid: GPU.into(), name: "fake".into(), total_vram_bytes: 80 << 30 };
        let foreign = processes.iter().filter(|p| p.attempt_id.is_none()).filter_map(|p| p.used_bytes).sum();
        let usage = GpuUsage { used_vram_bytes: used, foreign_vram_bytes: foreign, ..GpuUsage::idle(&info) };
        vec![GpuReading { usage, processes, lost: None }]
    }

    fn ours(pid: u32, bytes: u64) -> GpuProcess {
        GpuProcess { pid, used_bytes: Some(bytes), attempt_id: Some(ATT) }
    }

    fn heartbeat_gpu(core: &mut AgentCore, now_ms: u64) -> GpuUsage {
        let mut out = Vec::new();
        // The link is alive: the heartbeat is due rather than a reconnect.
        core.on_message(now_ms, ControllerMsg::HeartbeatAck { seq: 0 }, &mut out);
        core.tick(now_ms, &mut out);
        out.into_iter()
            .find_map(|o| match o {
                Output::Send(AgentMsg::Heartbeat(hb)) => Some(hb.gpus[0].clone()),
                _ => None,
            })
            .expect("a heartbeat is due")
    }

    fn faults(out: &[Output]) -> Vec<GpuFault> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(AgentMsg::GpuFault { fault, .. }) => Some(fault.clone()),
                _ => None,
            })
            .collect()
    }

    fn recovered(out: &[Output]) -> bool {
        out.iter().any(|o| matches!(o, Output::Send(AgentMsg::GpuRecovered { .. })))
    }

    #[test]
    fn an_attempts_surviving_process_is_killed_before_its_gpu_is_quarantined_and_it_returns_once_gone() {
        let mut core = core();
        core.on_gpu_readings(0, reading(0, Vec::new()), &mut Vec::new());
        uploading(&mut core);
        let bound = core.config.vram_release_bound_ms;
        let recheck = core.config.stray_kill_recheck_ms;
        let mut out = Vec::new();
        core.on_gpu_readings(100 + bound, reading(10 << 30, vec![ours(99, 10 << 30)]), &mut out);
        assert_eq!(out, vec![Output::KillStrays { attempt_id: ATT, pids: vec![99] }]);
        // It survived the kill.
        let mut out = Vec::new();
        core.on_gpu_readings(100 + bound + recheck - 1, reading(10 << 30, vec![ours(99, 10 << 30)]), &mut out);
        assert!(out.is_empty(), "{out:?}");
        let mut out = Vec::new();
        core.on_gpu_readings(100 + bound + recheck, reading(10 << 30, vec![ours(99, 10 << 30)]), &mut out);
        assert!(matches!(faults(&out).as_slice(), [GpuFault::VramNotReleased { attempt_id: ATT, .. }]), "{out:?}");
        let gpu = heartbeat_gpu(&mut core, 100 + bound + recheck + 2_000);
        assert!(!gpu.healthy);
        let q = gpu.quarantine.expect("quarantined");
        assert_eq!((q.held_bytes, q.pids.clone(), q.for_ms), (10 << 30, vec![99], 2_000));
        assert!(
            q.reason.contains("10.0 GiB") && q.reason.contains("99") && q.reason.contains("survived a kill"),
            "{}",
            q.reason
        );
        // Memory freed but its process still listed: not clean yet.
        let mut out = Vec::new();
        core.on_gpu_readings(200_000, reading(0, vec![ours(99, 0)]), &mut out);
        assert!(!recovered(&out));
        let mut out = Vec::new();
        core.on_gpu_readings(200_100, reading(0, Vec::new()), &mut out);
        assert!(recovered(&out), "{out:?}");
        let gpu = heartbeat_gpu(&mut core, 210_000);
        assert!(gpu.healthy && gpu.quarantine.is_none(), "{gpu:?}");
    }

    #[test]
    fn memory_held_with_no_process_listed_quarantines_without_a_kill_and_returns_when_freed() {
        let mut core = core();
        core.on_gpu_readings(0, reading(1 << 30, Vec::new()), &mut Vec::new());
        uploading(&mut core);
        let bound = core.config.vram_release_bound_ms;
        let mut out = Vec::new();
        core.on_gpu_readings(100 + bound, reading(5 << 30, Vec::new()), &mut out);
        assert!(!out.iter().any(|o| matches!(o, Output::KillStrays { .. })), "{out:?}");
        let [GpuFault::VramNotReleased { baseline_bytes, held_bytes, .. }] = faults(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!((baseline_bytes, held_bytes), (1 << 30, 5 << 30));
        let q = heartbeat_gpu(&mut core, 100 + bound + 1_000).quarantine.expect("quarantined");
        assert!(q.reason.contains("4.0 GiB") && q.reason.contains("no process of it listed"), "{}", q.reason);
        assert!(q.pids.is_empty());
        let mut out = Vec::new();
        core.on_gpu_readings(100 + bound + 3_000, reading(1 << 30, Vec::new()), &mut out);
        assert!(recovered(&out), "{out:?}");
    }

    #[test]
    fn a_foreign_process_holding_memory_after_an_attempt_is_not_its_leak() {
        let mut core = core();
        core.on_gpu_readings(0, reading(0, Vec::new()), &mut Vec::new());
        uploading(&mut core);
        let bound = core.config.vram_release_bound_ms;
        let foreign = GpuProcess { pid: 5, used_bytes: Some(20 << 30), attempt_id: None };
        let mut out = Vec::new();
        core.on_gpu_readings(100 + bound, reading(20 << 30, vec![foreign]), &mut out);
        assert!(faults(&out).is_empty() && !out.iter().any(|o| matches!(o, Output::KillStrays { .. })), "{out:?}");
        assert!(heartbeat_gpu(&mut core, 100 + bound + 1_000).healthy);
    }

    #[test]
    fn critical_xids_quarantine_until_an_operator_releases_the_gpu_and_application_ones_do_not() {
        let mut core = core();
        for xid in APPLICATION_XIDS {
            let mut out = Vec::new();
            assert!(!core.on_gpu_xid(10, GPU, *xid, &mut out));
            assert!(out.is_empty(), "Xid {xid}: {out:?}");
        }
        let mut out = Vec::new();
        assert!(core.on_gpu_xid(10, GPU, 79, &mut out));
        assert!(
            matches!(finished(&assign(&mut core, 11, spec(0))), Some(AttemptOutcome::Rejected { reason }) if reason.contains("faulty")),
            "no work on a quarantined GPU"
        );
        assert!(
            matches!(faults(&out).as_slice(), [GpuFault::Hardware { detail }] if detail.contains("Xid 79")),
            "{out:?}"
        );
        // Clean memory does not bring back a GPU with a hardware fault.
        let mut out = Vec::new();
        core.on_gpu_readings(20, reading(0, Vec::new()), &mut out);
        assert!(!recovered(&out));
        let q = heartbeat_gpu(&mut core, 2_000).quarantine.expect("quarantined");
        assert!(q.reason.contains("undrain"), "{}", q.reason);
        let mut out = Vec::new();
        core.on_message(3_000, ControllerMsg::ReleaseGpu { gpu_uuid: GPU.into() }, &mut out);
        assert!(recovered(&out), "{out:?}");
        assert!(heartbeat_gpu(&mut core, 5_000).healthy);
    }

    #[test]
    fn a_lost_gpu_is_quarantined_once() {
        let mut core = core();
        let lost = |core: &mut AgentCore, now| {
            let mut r = reading(0, Vec::new());
            r[0].lost = Some("NVML: GPU is lost".into());
            let mut out = Vec::new();
            core.on_gpu_readings(now, r, &mut out);
            out
        };
        let out = lost(&mut core, 10);
        assert!(
            matches!(faults(&out).as_slice(), [GpuFault::Hardware { detail }] if detail.contains("lost")),
            "{out:?}"
        );
        assert!(lost(&mut core, 20).is_empty(), "reported once");
        assert!(!heartbeat_gpu(&mut core, 2_000).healthy);
    }

    /// Ticks 1 ms before the core's next deadline (nothing may happen, and the
    /// deadline stays), then at it (something must); returns when, and what.
    fn tick_through_deadline(core: &mut AgentCore) -> (u64, Vec<Output>) {
        let due = core.next_deadline_ms().expect("a deadline is pending");
        let mut out = Vec::new();
        core.tick(due - 1, &mut out);
        assert!(out.is_empty(), "a tick 1 ms before {due} did work: {out:?}");
        assert_eq!(core.next_deadline_ms(), Some(due), "a tick 1 ms early moved the deadline");
        core.tick(due, &mut out);
        assert!(!out.is_empty(), "nothing was due at {due}");
        (due, out)
    }

    #[test]
    fn the_link_wakes_the_core_for_heartbeats_until_acks_stop_then_never() {
        let mut core = core();
        let (heartbeat, ack) = (core.config.heartbeat_interval_ms, core.config.ack_timeout_ms);
        let mut at = Vec::new();
        loop {
            let (due, out) = tick_through_deadline(&mut core);
            at.push(due);
            if out.contains(&Output::Reconnect) {
                break;
            }
            assert!(matches!(out.as_slice(), [Output::Send(AgentMsg::Heartbeat(_))]), "{out:?}");
        }
        let beats: Vec<u64> = (1..ack / heartbeat).map(|n| n * heartbeat).collect();
        assert_eq!(at, [beats, vec![ack]].concat());
        assert_eq!(core.next_deadline_ms(), None, "no link, no attempt: nothing to wake for");
    }

    #[test]
    fn an_attempts_timeout_its_forced_kill_and_its_gpus_release_bound_each_wake_the_core() {
        let mut core = core();
        core.disconnected();
        assign(&mut core, 0, spec(0));
        core.on_runtime(1, RuntimeEvent::Started { attempt_id: ATT, handle: "h".into() }, &mut Vec::new());
        let (due, out) = tick_through_deadline(&mut core);
        assert_eq!((due, out), (10_000, vec![Output::Stop { attempt_id: ATT, grace_ms: core.config.stop_grace_ms }]));
        let (due, out) = tick_through_deadline(&mut core);
        assert_eq!(due, 10_000 + core.config.stop_grace_ms + core.config.kill_slack_ms);
        assert_eq!(out, vec![Output::Stop { attempt_id: ATT, grace_ms: 0 }]);
        // Killed at last; a process of it still holds memory.
        core.on_gpu_readings(due, reading(10 << 30, vec![ours(99, 10 << 30)]), &mut Vec::new());
        let status = ExitStatus { code: None, signal: Some(9), oom_killed: false };
        let exited = RuntimeEvent::Exited { attempt_id: ATT, status, outputs: Vec::new() };
        core.on_runtime(due + 1, exited, &mut Vec::new());
        let (bound, out) = tick_through_deadline(&mut core);
        assert_eq!(bound, due + 1 + core.config.vram_release_bound_ms);
        assert_eq!(out, vec![Output::KillStrays { attempt_id: ATT, pids: vec![99] }]);
        let (recheck, out) = tick_through_deadline(&mut core);
        assert_eq!(recheck, bound + core.config.stray_kill_recheck_ms);
        assert!(matches!(faults(&out).as_slice(), [GpuFault::VramNotReleased { .. }]), "{out:?}");
        assert_eq!(core.next_deadline_ms(), None, "a quarantine waits for a reading or the operator, not for time");
    }

    #[test]
    fn an_undelivered_outputs_bound_wakes_the_core() {
        let mut core = core();
        core.disconnected();
        uploading(&mut core);
        // Its GPU's memory drained at once.
        core.on_gpu_readings(101, reading(0, Vec::new()), &mut Vec::new());
        let (due, out) = tick_through_deadline(&mut core);
        assert_eq!(due, 100 + core.config.upload_timeout_ms);
        assert!(out.contains(&Output::AbortUpload { attempt_id: ATT }), "{out:?}");
    }

    #[test]
    fn an_acknowledged_end_is_forgotten_and_a_reconcile_reaps() {
        let mut core = core();
        let mut out = Vec::new();
        core.on_message(1, ControllerMsg::AckFinished { attempt_ids: vec![ATT] }, &mut out);
        assert!(out.contains(&Output::Forget { attempt_id: ATT }), "{out:?}");
        out.clear();
        core.on_message(2, ControllerMsg::Reconcile { epoch: Epoch(1), keep: Vec::new() }, &mut out);
        assert!(out.contains(&Output::Reap), "{out:?}");
    }
}
