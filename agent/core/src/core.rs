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
    /// The tunables it was built with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

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

    /// What the agent reports of each attempt it holds, as a heartbeat or a hello carries it.
    pub fn reports(&self) -> Vec<AttemptReport> {
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
pub const STDERR_TAIL_BYTES: usize = 4096;
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
