//! The process runtime: each attempt is a plain process (under a supervisor)
//! in its own process group, with no container around it.
//!
//! Layout on disk, under the agent's work directory:
//!
//! ```text
//! attempts/<attempt id>/attempt.jsonl  its record, one JSON line per event: what was started
//!                                      (the agent, before `Started` is reported), how it ended
//!                                      (its supervisor, see below), that the controller has
//!                                      recorded the outcome (the agent)
//! attempts/<attempt id>/stdout.log     the child's standard output, once it writes any
//! attempts/<attempt id>/stderr.log     its standard error, likewise
//! ```
//!
//! A job that writes nothing costs its directory and its record: every file
//! is an inode to allocate, which on ext4 grows slower with the inodes
//! recently freed (see [`crate::supervise`]). Directories that agents before
//! this layout left (`attempt.json`, `exit.json`, `acknowledged`, as the
//! Docker runtime still writes) are recovered and retained as before.
//!
//! The child's output goes into pipes its supervisor holds, which relays it
//! into the log files, not into pipes held by the agent: a pipe would break
//! when the agent restarts, and the child's next write would kill it with
//! `SIGPIPE`. The agent tails the files, so an attempt survives an agent
//! restart, and the restarted agent finds it again from its record (see
//! [`ProcessRuntime::recover`]).
//!
//! The agent does not start the job itself but asks its supervisor (`cosmos
//! job-supervise --serve`, one per work directory, see [`crate::supervise`]),
//! which starts the job as its child, leading the attempt's process group.
//! The supervisor waits for the job and appends its end to the record; so the job's
//! outcome is known even when it ended while no agent was running, or under an
//! agent that adopted it after a restart. An attempt whose supervisor was
//! killed has no record: its group is killed and it is reported lost.
//!
//! Like a container's processes when its first process exits, whatever is
//! left in an attempt's process group when its job exits is killed.

use crate::core::{ExitStatus, Recovered, RuntimeEvent};
use crate::runtime::{EventSender, Runtime, StartRequest};
use crate::supervise::{self, Entry, ExitRecord, Launcher, StartJob};
use crate::supervisor_link::{Link, Supervisor};
use cosmos_proto::spec::ArtifactRef;
use cosmos_proto::{AttemptId, Epoch, JobId, LOG_CHUNK_BYTES_MAX, LogStream, Sha256};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// An attempt's record, in its directory: its start, end and acknowledgement, one line each.
pub const RECORD_LOG: &str = "attempt.jsonl";
/// The record of a started attempt, in its directory (the Docker runtime's layout, and older agents').
pub const RECORD_FILE: &str = "attempt.json";
/// How an attempt ended, in its directory (the same layout).
pub const EXIT_FILE: &str = "exit.json";
/// Marks an attempt whose outcome the controller has recorded (the same layout).
pub const ACK_FILE: &str = "acknowledged";
/// The child's standard output (a job may list it as an output: see [`cosmos_proto::spec::STDOUT_LOG`]).
pub const STDOUT_FILE: &str = cosmos_proto::spec::STDOUT_LOG;
/// The child's standard error.
pub const STDERR_FILE: &str = cosmos_proto::spec::STDERR_LOG;

/// How often a log file is checked for new output while its writer is quiet.
const LOG_POLL_MS: u64 = 50;
/// How long a live supervisor is given to write the record of a job whose group is gone.
const RECORD_WAIT_MS: u64 = 2_000;
/// How often an adopted attempt's process group is checked.
const ADOPTED_POLL_MS: u64 = 500;
/// Longest output line kept for progress parsing; longer ones keep their tail.
const PROGRESS_LINE_BYTES_MAX: usize = 4096;
/// Variables of the agent's own environment that a job inherits; the rest
/// (tokens among them) stay with the agent.
const INHERITED_ENV: &[&str] =
    &["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "LD_LIBRARY_PATH"];
/// Why an image cannot run here, and what to do.
const NO_IMAGES: &str = "this agent runs the process runtime, which cannot run container images; \
                         start the agent with the Docker runtime or remove `image`";

/// What `attempt.json` holds: enough for a restarted agent to find and judge
/// what it left behind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Its job.
    pub job_id: JobId,
    /// The controller epoch that ordered it.
    pub epoch: Epoch,
    /// Its GPUs.
    pub gpu_uuids: Vec<String>,
    /// The process id of the job (records of older agents: of its own supervisor).
    pub pid: u32,
    /// Its process group (equal to `pid`: the job leads it).
    pub pgid: i32,
    /// Wall-clock start, in milliseconds since the Unix epoch (host-local use only).
    pub started_unix_ms: u64,
    /// The attempt's time limit.
    pub timeout_ms: u64,
    /// The job's working directory.
    pub work_dir: PathBuf,
    /// Outputs the spec expects, relative to `work_dir`.
    pub outputs: Vec<String>,
    /// The kernel's boot id at start: a group id from another boot is not ours.
    pub boot_id: Option<String>,
    /// The leader's start time in clock ticks since boot: tells our leader from a reused pid.
    pub start_ticks: Option<u64>,
}

/// What the core is told of a recorded end.
fn status_of(record: &ExitRecord) -> ExitStatus {
    ExitStatus { code: record.code, signal: record.signal, oom_killed: false }
}

/// Reads an attempt's record file; an unreadable one counts as none, and torn lines are skipped (both logged).
fn read_log(dir: &Path) -> Option<supervise::RecordLog<AttemptRecord>> {
    let path = dir.join(RECORD_LOG);
    match supervise::read_log::<AttemptRecord>(&path) {
        Ok(Some(log)) => {
            if log.torn_lines > 0 {
                tracing::warn!(path = %path.display(), lines = log.torn_lines, "skipping torn lines of an attempt record");
            }
            Some(log)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable attempt record");
            None
        }
    }
}

/// How an attempt ended, from its record (or an older agent's `exit.json`);
/// a torn or unreadable one counts as none (and is logged).
fn read_exit(dir: &Path, attempt_id: AttemptId) -> Option<ExitRecord> {
    if dir.join(RECORD_LOG).exists() {
        return read_log(dir)?.exited;
    }
    supervise::read_record(&dir.join(EXIT_FILE)).unwrap_or_else(|e| {
        tracing::warn!(attempt = %attempt_id, error = %e, "ignoring an unusable exit record");
        None
    })
}

/// Records how an attempt ended, in the layout its directory has.
fn record_exit(dir: &Path, exit: &ExitRecord) -> io::Result<()> {
    if dir.join(RECORD_LOG).exists() {
        supervise::append_entry(&dir.join(RECORD_LOG), &Entry::<()>::Exited(exit.clone()))
    } else {
        write_json(&dir.join(EXIT_FILE), exit)
    }
}

/// When the controller acknowledged the attempt whose directory this is
/// (milliseconds since the Unix epoch), in either layout; `None` if it has not.
pub fn acknowledged_unix_ms(dir: &Path) -> Option<u64> {
    match supervise::read_log::<serde::de::IgnoredAny>(&dir.join(RECORD_LOG)) {
        Ok(Some(log)) => log.acknowledged_unix_ms,
        Ok(None) => {
            let modified = std::fs::metadata(dir.join(ACK_FILE)).and_then(|m| m.modified()).ok()?;
            Some(modified.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
        }
        Err(_) => None,
    }
}

/// An attempt this runtime is watching.
#[derive(Clone, Copy, Debug)]
struct Live {
    /// 0 while the supervisor starts it.
    pgid: i32,
    /// A stop asked for while it was starting (its grace), applied once it runs.
    stop_pending_ms: Option<u64>,
    /// Its supervisor (or, when adopted, its whole group) is gone; `Exited` is on its way.
    exited: bool,
    /// This agent killed the group: an attempt without a record then ended by `SIGKILL`, not lost.
    killed: bool,
}

impl Live {
    fn new(pgid: i32) -> Live {
        Live { pgid, stop_pending_ms: None, exited: false, killed: false }
    }
}

type LiveMap = Arc<Mutex<HashMap<AttemptId, Live>>>;

/// Runs attempts as local processes, each in its own process group.
pub struct ProcessRuntime {
    root_dir: PathBuf,
    events: EventSender,
    supervisor: Arc<Supervisor>,
    live: LiveMap,
    tasks: crate::runtime::Watchers,
}

impl ProcessRuntime {
    /// A runtime keeping its attempts under `root_dir/attempts/`, reporting on
    /// `events`, starting jobs through the supervisor of `root_dir`
    /// (started with `supervisor` when none runs).
    pub fn new(root_dir: PathBuf, events: EventSender, supervisor: Launcher) -> ProcessRuntime {
        ProcessRuntime {
            supervisor: Arc::new(Supervisor::new(&root_dir, supervisor)),
            root_dir,
            events,
            live: Arc::new(Mutex::new(HashMap::new())),
            tasks: crate::runtime::Watchers::default(),
        }
    }

    /// The directory of one attempt: its record, logs and (as the job's working directory) its files.
    pub fn attempt_dir(&self, attempt_id: AttemptId) -> PathBuf {
        self.root_dir.join("attempts").join(attempt_id.to_string())
    }

    /// Attempts currently watched (running, or exited with `Exited` not yet sent).
    pub fn live_attempts(&self) -> Vec<AttemptId> {
        let mut ids: Vec<AttemptId> = lock(&self.live).keys().copied().collect();
        ids.sort();
        ids
    }

    /// The process id of the job supervisor this runtime is connected to, if it is.
    pub fn supervisor_pid(&self) -> Option<u32> {
        self.supervisor.pid()
    }

    fn spawn_task(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(fut);
    }

    fn send_later(&mut self, event: RuntimeEvent) {
        self.tasks.send_later(&self.events, event);
    }

    fn try_start(&mut self, req: &StartRequest) -> Result<(), (String, cosmos_proto::Retry)> {
        if req.spec.image.is_some() {
            return Err((NO_IMAGES.to_string(), cosmos_proto::Retry::Terminal));
        }
        let Some(program) = req.spec.command.first().filter(|p| !p.is_empty()) else {
            return Err(("the job's `command` is empty: give a program to run".into(), cosmos_proto::Retry::Terminal));
        };
        let dir = self.attempt_dir(req.attempt_id);
        for d in [&dir, &req.work_dir] {
            std::fs::create_dir_all(d).map_err(|e| {
                (format!("cannot create the attempt directory {}: {e}", d.display()), cosmos_proto::Retry::Retryable)
            })?;
        }
        let already = || {
            (
                format!("attempt {} was already started on this host (see {})", req.attempt_id, dir.display()),
                cosmos_proto::Retry::Terminal,
            )
        };
        if dir.join(RECORD_FILE).exists() {
            return Err(already());
        }
        // Created first and exclusively: a second start of the same attempt finds it.
        match std::fs::OpenOptions::new().write(true).create_new(true).open(dir.join(RECORD_LOG)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(already()),
            Err(e) => {
                let reason = format!("cannot create {}: {e}", dir.join(RECORD_LOG).display());
                return Err((reason, cosmos_proto::Retry::Retryable));
            }
        }
        // The logs appear on the job's first output; one it delivers as an output must exist even if empty.
        for name in [STDOUT_FILE, STDERR_FILE] {
            if req.spec.outputs.iter().any(|o| o.path == name) {
                std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name)).map_err(|e| {
                    (format!("cannot create {}: {e}", dir.join(name).display()), cosmos_proto::Retry::Retryable)
                })?;
            }
        }

        // Resolved here, on the PATH the job will see: given a bare name with a
        // PATH in the child's environment, std falls back from posix_spawn to
        // fork, which copies the agent's page tables for every job.
        let path_var = req.spec.env.get("PATH").cloned().or_else(|| std::env::var("PATH").ok()).unwrap_or_default();
        let resolved = resolve_program(program, &path_var).ok_or_else(|| {
            (
                format!(
                    "cannot start `{program}`: program not found; install it on the agent host or give its full path"
                ),
                cosmos_proto::Retry::Terminal,
            )
        })?;
        check_executable(&resolved, &req.work_dir, program)?;
        let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> =
            INHERITED_ENV.iter().filter_map(|k| std::env::var_os(k).map(|v| ((*k).into(), v))).collect();
        // CUDA's own numbering then agrees with the driver's (NVML's, nvidia-smi's).
        env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
        env.extend(req.spec.env.iter().map(|(k, v)| (k.into(), v.into())));
        let gpus = req.gpu_indices.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        env.push(("CUDA_VISIBLE_DEVICES".into(), gpus.into()));
        env.push(("COSMOS_ATTEMPT_ID".into(), req.attempt_id.to_string().into()));
        env.push(("COSMOS_JOB_ID".into(), req.job_id.to_string().into()));
        // Later values win, as `Command::env` would have it.
        let mut seen = std::collections::HashSet::new();
        env.reverse();
        env.retain(|(k, _)| seen.insert(k.clone()));
        env.reverse();
        let job = StartJob {
            attempt_id: req.attempt_id,
            program: resolved.into_os_string(),
            args: req.spec.command[1..].iter().map(Into::into).collect(),
            env,
            cwd: req.work_dir.clone().into_os_string(),
            stdout: dir.join(STDOUT_FILE).into_os_string(),
            stderr: dir.join(STDERR_FILE).into_os_string(),
            record_file: dir.join(RECORD_LOG).into_os_string(),
        };
        lock(&self.live).insert(req.attempt_id, Live::new(0));
        let starting = Starting {
            req: req.clone(),
            dir,
            job,
            supervisor: self.supervisor.clone(),
            events: self.events.clone(),
            live: self.live.clone(),
        };
        self.spawn_task(starting.run());
        Ok(())
    }

    fn recover_one(&mut self, dir: &Path, link: Option<&Arc<Link>>) -> Option<Recovered> {
        let record = if dir.join(RECORD_LOG).exists() {
            let log = read_log(dir)?;
            if log.acknowledged_unix_ms.is_some() {
                return None;
            }
            // No start written: the agent stopped before it could report one, and the controller judges it.
            log.started?
        } else {
            let record_path = dir.join(RECORD_FILE);
            let text = std::fs::read(&record_path).ok()?;
            match serde_json::from_slice::<AttemptRecord>(&text) {
                Ok(r) if !dir.join(ACK_FILE).exists() => r,
                Ok(_) => return None,
                Err(e) => {
                    tracing::warn!(path = %record_path.display(), error = %e, "ignoring an unreadable attempt record");
                    return None;
                }
            }
        };
        if lock(&self.live).contains_key(&record.attempt_id) {
            return None;
        }
        let recovered = |exited: Option<ExitStatus>, remaining_ms| Recovered {
            attempt_id: record.attempt_id,
            job_id: record.job_id,
            gpu_uuids: record.gpu_uuids.clone(),
            outputs: recovered_outputs(exited.as_ref(), &record.work_dir, &record.outputs),
            exited,
            remaining_ms,
        };
        if !same_boot(&record) {
            // The host crashed or rebooted: whatever the record says, the
            // job's outputs were never synced and may be torn. Run it again.
            tracing::warn!(attempt = %record.attempt_id, "an attempt of an earlier boot of this host; reporting it lost");
            let exit = ExitRecord::default();
            if let Err(e) = record_exit(dir, &exit) {
                tracing::warn!(attempt = %record.attempt_id, error = %e, "cannot record the exit of an attempt");
            }
            return Some(recovered(Some(status_of(&exit)), None));
        }
        if let Some(exit) = read_exit(dir, record.attempt_id) {
            // It ended while no agent watched it; its supervisor recorded how.
            log_end(record.attempt_id, &exit);
            return Some(recovered(Some(status_of(&exit)), None));
        }
        if !is_ours(&record) {
            // It ended unrecorded (its supervisor was killed, or the host rebooted): how is not known.
            tracing::warn!(attempt = %record.attempt_id, "an attempt ended with no exit record; reporting it lost");
            let exit = ExitRecord::default();
            if let Err(e) = record_exit(dir, &exit) {
                tracing::warn!(attempt = %record.attempt_id, error = %e, "cannot record the exit of an attempt");
            }
            return Some(recovered(Some(status_of(&exit)), None));
        }
        let elapsed_ms = unix_ms().saturating_sub(record.started_unix_ms);
        let remaining_ms = record.timeout_ms.saturating_sub(elapsed_ms);
        tracing::info!(attempt = %record.attempt_id, pgid = record.pgid, remaining_ms, "adopting a running attempt");
        lock(&self.live).insert(record.attempt_id, Live::new(record.pgid));
        let result = recovered(None, Some(remaining_ms));
        let leader = match link {
            // Its supervisor runs it, and says when it ends.
            Some(link) if link.was_running(record.attempt_id) => {
                let exited = link.exited(record.attempt_id);
                Leader::Linked(link.clone(), exited)
            }
            // Started by a supervisor that is gone (or an older agent's own): only its group is seen.
            _ => Leader::Adopted,
        };
        let watch = Watch { record, dir: dir.to_path_buf(), events: self.events.clone(), live: self.live.clone() };
        self.spawn_task(watch.run(leader));
        Some(result)
    }

    /// The controller has durably recorded how this attempt ended: a restarted
    /// agent need not report it again. Its directory (logs, outputs) stays.
    pub fn acknowledge(&mut self, attempt_id: AttemptId) {
        let dir = self.attempt_dir(attempt_id);
        if dir.join(RECORD_LOG).exists() {
            let entry = Entry::<()>::Acknowledged { unix_ms: unix_ms() };
            if let Err(e) = supervise::append_entry(&dir.join(RECORD_LOG), &entry) {
                tracing::warn!(attempt = %attempt_id, error = %e, "cannot mark an attempt acknowledged");
            }
        } else if dir.join(RECORD_FILE).exists() {
            if let Err(e) = std::fs::write(dir.join(ACK_FILE), b"") {
                tracing::warn!(attempt = %attempt_id, error = %e, "cannot mark an attempt acknowledged");
            }
        }
    }
}

impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start(&mut self, req: StartRequest) {
        if let Err((reason, retry)) = self.try_start(&req) {
            tracing::warn!(attempt = %req.attempt_id, %reason, "attempt did not start");
            self.send_later(RuntimeEvent::StartFailed { attempt_id: req.attempt_id, reason, retry });
        }
    }

    fn stop(&mut self, attempt_id: AttemptId, grace_ms: u64) {
        let live = lock(&self.live).get(&attempt_id).copied();
        match live {
            None => {
                // Nothing runs under this id: it is as good as killed.
                let status = ExitStatus { code: None, signal: Some(libc::SIGKILL), oom_killed: false };
                self.send_later(RuntimeEvent::Exited { attempt_id, status, outputs: Vec::new() });
            }
            Some(Live { exited: true, .. }) => {} // Its `Exited` is on its way.
            Some(Live { pgid: 0, .. }) => {
                // Still starting: stopped as soon as it runs.
                if let Some(l) = lock(&self.live).get_mut(&attempt_id) {
                    l.stop_pending_ms = Some(l.stop_pending_ms.map_or(grace_ms, |g| g.min(grace_ms)));
                }
            }
            Some(Live { pgid, .. }) => {
                if let Some(timer) = stop_group(&self.live, attempt_id, pgid, grace_ms) {
                    self.spawn_task(timer);
                }
            }
        }
    }

    /// Finds what a previous agent process left: attempts whose process group
    /// still runs are adopted (watched until the group is gone, then reported
    /// with the status their supervisor recorded); attempts that ended are
    /// reported with the status in their `exit.json`, or as unknown (lost)
    /// when none was written.
    fn recover(&mut self) -> Vec<Recovered> {
        let Ok(entries) = std::fs::read_dir(self.root_dir.join("attempts")) else { return Vec::new() };
        let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
        dirs.sort();
        // Connected first: an attempt its supervisor reports running is watched through it.
        let link = match self.supervisor.link_now() {
            Ok(link) => Some(link),
            Err(e) => {
                tracing::error!(error = %e, "cannot reach the job supervisor; adopted attempts are watched by their process groups");
                None
            }
        };
        dirs.iter().filter_map(|d| self.recover_one(d, link.as_ref())).collect()
    }

    fn acknowledged(&mut self, attempt_id: AttemptId) {
        self.acknowledge(attempt_id);
    }
}

/// Stops an attempt's group: `SIGTERM`, then `SIGKILL` after `grace_ms` (the
/// returned timer, to run in the background) while it still runs.
fn stop_group(
    live: &LiveMap,
    attempt_id: AttemptId,
    pgid: i32,
    grace_ms: u64,
) -> Option<impl Future<Output = ()> + use<>> {
    if grace_ms == 0 {
        kill_group(live, attempt_id, pgid);
        return None;
    }
    // The job gets it; the supervisor, in a group of its own, records how it took it.
    signal_group(pgid, libc::SIGTERM);
    let live = live.clone();
    Some(async move {
        tokio::time::sleep(Duration::from_millis(grace_ms)).await;
        let still_running = lock(&live).get(&attempt_id).is_some_and(|l| !l.exited && l.pgid == pgid);
        if still_running && group_exists(pgid) {
            tracing::info!(attempt = %attempt_id, pgid, grace_ms, "attempt outlived its grace; killing");
            kill_group(&live, attempt_id, pgid);
        }
    })
}

/// An attempt on its way to running: the supervisor starts it, then it is recorded and watched.
struct Starting {
    req: StartRequest,
    dir: PathBuf,
    job: StartJob,
    supervisor: Arc<Supervisor>,
    events: EventSender,
    live: LiveMap,
}

impl Starting {
    async fn run(self) {
        let id = self.req.attempt_id;
        let started = match self.supervisor.link().await {
            Ok(link) => link.start(self.job.clone()).await.map(|s| (link, s)),
            Err(reason) => Err((reason, cosmos_proto::Retry::Retryable)),
        };
        let (link, (pid, start_ticks, exited)) = match started {
            Ok(s) => s,
            Err((reason, retry)) => return self.fail(reason, retry).await,
        };
        let pgid = pid as i32;
        let record = AttemptRecord {
            attempt_id: id,
            job_id: self.req.job_id,
            epoch: self.req.epoch,
            gpu_uuids: self.req.gpu_uuids.clone(),
            pid,
            pgid,
            started_unix_ms: unix_ms(),
            timeout_ms: self.req.spec.timeout_ms,
            work_dir: self.req.work_dir.clone(),
            outputs: self.req.spec.outputs.iter().map(|o| o.path.clone()).collect(),
            boot_id: boot_id(),
            start_ticks,
        };
        if let Err(e) = supervise::append_entry(&self.dir.join(RECORD_LOG), &Entry::Started(&record)) {
            // Untracked, it could not be found again after a restart: do not let it run.
            signal_group(pgid, libc::SIGKILL);
            let reason = format!("cannot write {}: {e}", self.dir.join(RECORD_LOG).display());
            return self.fail(reason, cosmos_proto::Retry::Retryable).await;
        }
        let stop = lock(&self.live).get_mut(&id).and_then(|l| {
            l.pgid = pgid;
            l.stop_pending_ms.take()
        });
        if let Some(timer) = stop.and_then(|grace_ms| stop_group(&self.live, id, pgid, grace_ms)) {
            tokio::spawn(timer);
        }
        let watch = Watch { record, dir: self.dir, events: self.events.clone(), live: self.live };
        let handle = format!("pgid:{pgid}");
        if self.events.send(RuntimeEvent::Started { attempt_id: id, handle }).await.is_ok() {
            watch.run(Leader::Linked(link, exited)).await;
        }
    }

    async fn fail(self, reason: String, retry: cosmos_proto::Retry) {
        let id = self.req.attempt_id;
        tracing::warn!(attempt = %id, %reason, "attempt did not start");
        lock(&self.live).remove(&id);
        let _ = self.events.send(RuntimeEvent::StartFailed { attempt_id: id, reason, retry }).await;
    }
}

/// How the end of an attempt is observed.
enum Leader {
    /// Its supervisor says when it has ended (and recorded how); the receiver fails if the supervisor goes.
    Linked(Arc<Link>, tokio::sync::oneshot::Receiver<()>),
    /// Left by a supervisor that is gone, or an older agent's: only the group's disappearance is seen.
    Adopted,
}

/// Watches one attempt: tails its logs, waits for its end, reports it.
struct Watch {
    record: AttemptRecord,
    dir: PathBuf,
    events: EventSender,
    live: LiveMap,
}

impl Watch {
    async fn run(self, leader: Leader) {
        let id = self.record.attempt_id;
        let pgid = self.record.pgid;
        let (done_tx, done_rx) = watch::channel(false);
        let progress = Arc::new(Mutex::new(None));
        let wait = async {
            // The supervisor that went away, if one did before the job's end.
            let supervisor = match leader {
                Leader::Linked(link, exited) => {
                    if exited.await.is_ok() {
                        None
                    } else {
                        // The connection closed: the supervisor died (its jobs' outcomes are
                        // lost), or another agent process took it over (it still records them).
                        // A dying process closes its sockets before it is gone: keep looking.
                        let supervisor = link.pid();
                        let mut gone = false;
                        while group_exists(pgid) {
                            if !process_alive(supervisor) {
                                gone = true;
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(LOG_POLL_MS)).await;
                        }
                        // A live one reaps the job before it writes the record.
                        let deadline = tokio::time::Instant::now() + Duration::from_millis(RECORD_WAIT_MS);
                        while !gone && read_exit(&self.dir, id).is_none() && tokio::time::Instant::now() < deadline {
                            gone = !process_alive(supervisor);
                            tokio::time::sleep(Duration::from_millis(LOG_POLL_MS)).await;
                        }
                        gone.then_some(supervisor)
                    }
                }
                Leader::Adopted => {
                    while group_exists(pgid) {
                        tokio::time::sleep(Duration::from_millis(ADOPTED_POLL_MS)).await;
                    }
                    None
                }
            };
            let killed = lock(&self.live).get_mut(&id).is_some_and(|l| {
                l.exited = true;
                l.killed
            });
            // What the job left behind dies with it, as in a container (the
            // supervisor does this itself; not when it was killed).
            if group_exists(pgid) {
                signal_group(pgid, libc::SIGKILL);
            }
            let _ = done_tx.send(true);
            (supervisor, killed)
        };
        let out = tail(id, self.dir.join(STDOUT_FILE), LogStream::Stdout, &self.events, &progress, done_rx.clone());
        let err = tail(id, self.dir.join(STDERR_FILE), LogStream::Stderr, &self.events, &progress, done_rx);
        let ((supervisor, killed), (), ()) = tokio::join!(wait, out, err);

        let status = match read_exit(&self.dir, id) {
            Some(exit) => {
                log_end(id, &exit);
                status_of(&exit)
            }
            None => {
                let exit = if killed {
                    // This agent killed the group (a stop past its grace): the job died of it too.
                    ExitRecord { signal: Some(libc::SIGKILL), ..ExitRecord::default() }
                } else {
                    tracing::warn!(
                        attempt = %id,
                        gone_supervisor_pid = ?supervisor,
                        "the attempt's supervisor did not record how the job ended \
                         (it was killed, or could not write the record: see the end of stderr.log); reporting it lost"
                    );
                    ExitRecord::default()
                };
                // So that a restarted agent does not look for the attempt again.
                if let Err(e) = record_exit(&self.dir, &exit) {
                    tracing::warn!(attempt = %id, error = %e, "cannot record an attempt's exit");
                }
                status_of(&exit)
            }
        };
        let (work_dir, wanted) = (self.record.work_dir.clone(), self.record.outputs.clone());
        let outputs = if wanted.is_empty() {
            Vec::new()
        } else {
            tokio::task::spawn_blocking(move || collect_outputs(&work_dir, &wanted)).await.unwrap_or_default()
        };
        let _ = self.events.send(RuntimeEvent::Exited { attempt_id: id, status, outputs }).await;
        lock(&self.live).remove(&id);
    }
}

/// Follows one log file from its start, sending what is written as `Log`
/// events, until `done` is set and everything written before it was read.
async fn tail(
    attempt_id: AttemptId,
    path: PathBuf,
    stream: LogStream,
    events: &EventSender,
    last_progress: &Mutex<Option<(u32, u32)>>,
    mut done: watch::Receiver<bool>,
) {
    // The supervisor creates the file on the job's first output, if it writes any.
    let mut file = loop {
        let finishing = *done.borrow_and_update();
        match tokio::fs::File::open(&path).await {
            Ok(f) => break f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && finishing => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(LOG_POLL_MS)) => {}
                _ = done.changed() => {}
            },
            Err(e) => {
                tracing::warn!(attempt = %attempt_id, path = %path.display(), error = %e, "cannot read an attempt's log");
                return;
            }
        }
    };
    let mut buf = vec![0u8; LOG_CHUNK_BYTES_MAX];
    let mut offset = 0u64;
    let mut parser = ProgressParser::default();
    loop {
        // Read after seeing `done`: then everything the process wrote is in the file.
        let finishing = *done.borrow_and_update();
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(attempt = %attempt_id, path = %path.display(), error = %e, "cannot read an attempt's log");
                return;
            }
        };
        if n > 0 {
            let data = buf[..n].to_vec();
            let mut step = parser.feed(&data);
            if n < buf.len() {
                // Caught up with the writer: a pending tqdm-style `\r` update is complete.
                step = parser.pending().or(step);
            }
            let event = RuntimeEvent::Log { attempt_id, stream, offset, data };
            if events.send(event).await.is_err() {
                return;
            }
            offset += n as u64;
            if let Some((step, total)) = step {
                let changed = lock(last_progress).replace((step, total)) != Some((step, total));
                if changed && events.send(RuntimeEvent::Progress { attempt_id, step, total }).await.is_err() {
                    return;
                }
            }
            continue;
        }
        if finishing {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(LOG_POLL_MS)) => {}
            _ = done.changed() => {}
        }
    }
}

/// Finds tqdm-style progress (`12/35`) in output: the last `n/m` of each line,
/// where a line ends at `\n` or `\r` (tqdm redraws its bar after a `\r`).
#[derive(Debug, Default)]
pub struct ProgressParser {
    line: Vec<u8>,
}

impl ProgressParser {
    /// Feeds output; returns the progress of the last completed line that had one.
    pub fn feed(&mut self, data: &[u8]) -> Option<(u32, u32)> {
        let mut found = None;
        for &b in data {
            if b == b'\n' || b == b'\r' {
                if let Some(p) = last_fraction(&self.line, true) {
                    found = Some(p);
                }
                self.line.clear();
            } else {
                if self.line.len() >= PROGRESS_LINE_BYTES_MAX {
                    self.line.drain(..PROGRESS_LINE_BYTES_MAX / 2);
                }
                self.line.push(b);
            }
        }
        found
    }

    /// Progress in the line not yet ended, when its last `n/m` is followed by
    /// more text (so the numbers themselves are complete).
    pub fn pending(&self) -> Option<(u32, u32)> {
        last_fraction(&self.line, false)
    }
}

/// The last `n/m` in `line`, if it is a sensible progress (m > 0, n <= m).
fn last_fraction(line: &[u8], may_end_line: bool) -> Option<(u32, u32)> {
    let digits = |range: &[u8]| -> Option<u32> {
        if range.is_empty() || range.len() > 10 {
            return None;
        }
        std::str::from_utf8(range).ok()?.parse().ok()
    };
    let mut i = line.len();
    while i > 0 {
        i -= 1;
        if line[i] != b'/' {
            continue;
        }
        let end = line[i + 1..].iter().position(|b| !b.is_ascii_digit()).map_or(line.len(), |p| i + 1 + p);
        let start = line[..i].iter().rposition(|b| !b.is_ascii_digit()).map_or(0, |p| p + 1);
        if end == i + 1 || start == i {
            continue; // Not digits on both sides.
        }
        if end == line.len() && !may_end_line {
            return None; // The denominator may still be arriving.
        }
        let (n, m) = (digits(&line[start..i])?, digits(&line[i + 1..end])?);
        return (m > 0 && n <= m).then_some((n, m));
    }
    None
}

/// What an attempt found ended at start-up produced: its expected outputs after a clean exit, else nothing.
pub(crate) fn recovered_outputs(exited: Option<&ExitStatus>, work_dir: &Path, wanted: &[String]) -> Vec<ArtifactRef> {
    match exited {
        Some(status) if status.code == Some(0) => collect_outputs(work_dir, wanted),
        _ => Vec::new(),
    }
}

/// The expected outputs that exist as regular files inside `work_dir`, with digests.
pub(crate) fn collect_outputs(work_dir: &Path, wanted: &[String]) -> Vec<ArtifactRef> {
    if wanted.is_empty() {
        return Vec::new(); // Most jobs: not even the work directory's real path is needed.
    }
    let Ok(root) = work_dir.canonicalize() else { return Vec::new() };
    let mut found = Vec::new();
    for rel in wanted {
        let path = work_dir.join(rel);
        let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
        // A symlinked directory on the way could lead outside the work directory.
        let inside = path.canonicalize().is_ok_and(|p| p.starts_with(&root));
        if !(is_file && inside) {
            continue;
        }
        match hash_file(&path) {
            Ok((sha256, size_bytes)) => found.push(ArtifactRef { path: rel.clone(), sha256, size_bytes }),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read an output"),
        }
    }
    found
}

/// SHA-256 and size of a file's content.
pub fn hash_file(path: &Path) -> io::Result<(Sha256, u64)> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((Sha256(hasher.finalize().into()), size))
}

/// Whether the record was written on this boot of the host (true when either boot id is unknown).
fn same_boot(record: &AttemptRecord) -> bool {
    match (&record.boot_id, boot_id()) {
        (Some(then), Some(now)) => *then == now,
        _ => true,
    }
}

/// Whether the record's process group is still the one this record started:
/// it exists, on the same boot, and its leader (if alive) is the same process.
fn is_ours(record: &AttemptRecord) -> bool {
    if !group_exists(record.pgid) {
        return false;
    }
    if !same_boot(record) {
        return false;
    }
    // While any member of the group lives, its id cannot go to a new process;
    // a live process with that id is then our leader, unless the group died and the id was reused.
    match (record.start_ticks, supervise::start_ticks(record.pid)) {
        (Some(then), Some(now)) => then == now,
        _ => true,
    }
}

/// Whether process `pid` runs (a zombie does not).
fn process_alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Whether any live (not zombie) process is in group `pgid`.
///
/// Zombies count as gone: a process killed while reparented to an init that
/// is slow to reap (or never reaps, in some containers) no longer runs.
pub fn group_exists(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks; `pgid > 1` keeps it off our own group and off every process.
    if pgid <= 1 || unsafe { libc::kill(-pgid, 0) } != 0 {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else { return true };
    let mut any_member = false;
    for entry in procs.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some((state, pgrp)) = proc_state(pid) {
            if pgrp == pgid {
                any_member = true;
                if state != 'Z' {
                    return true;
                }
            }
        }
    }
    // Members but all zombies: gone. No member seen at all: /proc hides them (hidepid), trust kill.
    !any_member
}

/// State letter and process group of a process, from `/proc/<pid>/stat`.
fn proc_state(pid: u32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Kills an attempt's group, noting that this agent did (see [`Live::killed`]).
fn kill_group(live: &LiveMap, attempt_id: AttemptId, pgid: i32) {
    if let Some(l) = lock(live).get_mut(&attempt_id) {
        l.killed = true;
    }
    signal_group(pgid, libc::SIGKILL);
}

/// Logs how an attempt's job ended and what it used, as its supervisor recorded.
fn log_end(attempt_id: AttemptId, exit: &ExitRecord) {
    tracing::info!(
        attempt = %attempt_id,
        code = ?exit.code,
        signal = ?exit.signal,
        max_rss_kib = ?exit.max_rss_kib,
        user_cpu_ms = ?exit.user_cpu_ms,
        sys_cpu_ms = ?exit.sys_cpu_ms,
        "attempt ended"
    );
}

/// Rules out the start failures of the job's program that the supervisor
/// could only record as an exit code: a missing or non-executable program
/// fails to start, for good, as it did when the agent started jobs itself.
fn check_executable(resolved: &Path, work_dir: &Path, program: &str) -> Result<(), (String, cosmos_proto::Retry)> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(work_dir.join(resolved)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err((
            format!("cannot start `{program}`: program not found; install it on the agent host or give its full path"),
            cosmos_proto::Retry::Terminal,
        )),
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) | Err(_) => Err((
            format!("cannot start `{program}`: permission denied; make it executable by the agent's user"),
            cosmos_proto::Retry::Terminal,
        )),
    }
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid <= 1 {
        return; // 0 is our own group, 1 (as -1) every process we may signal.
    }
    // SAFETY: plain syscall on a validated group id.
    if unsafe { libc::killpg(pgid, signal) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, error = %e, "cannot signal an attempt's process group");
        }
    }
}

/// The kernel's boot id, read once: it cannot change under a running process.
fn boot_id() -> Option<String> {
    static BOOT_ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string()))
        .clone()
}

/// Finds `program` the way `execvp` would: as given when it holds a `/`, else
/// the first executable file of that name in `path_var`'s directories.
fn resolve_program(program: &str, path_var: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path_var.split(':').map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(program)).find(|candidate| {
        std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Writes JSON so that a crash of the agent leaves either the old file or the new one.
///
/// No fsync: these records let a restarted *agent process* find its attempts,
/// and the page cache outlives a process. A host crash kills the attempts too,
/// and the boot id in the record tells a rebooted host's agent so. Two fsyncs
/// per attempt were the agent's largest cost on ext4.
fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<(u32, u32)> {
        ProgressParser::default().feed(s.as_bytes())
    }

    #[test]
    fn progress_is_the_last_fraction_of_a_line() {
        assert_eq!(parse(" 34%|███▍      | 12/35 [00:01<00:02, 3.50it/s]\n"), Some((12, 35)));
        assert_eq!(parse("Step 3/10\n"), Some((3, 10)));
        assert_eq!(parse("1/3\n2/3\n3/3\n"), Some((3, 3)));
        assert_eq!(parse("\r 1/5 a\r 2/5 a\r"), Some((2, 5)));
        assert_eq!(parse("loading 2/4 then 7/9\n"), Some((7, 9)));
        assert_eq!(parse("no progress here\n"), None);
        assert_eq!(parse("5/0\n"), None);
        assert_eq!(parse("6/5\n"), None);
        assert_eq!(parse("a/5 5/b /\n"), None);
        assert_eq!(parse("99999999999/99999999999\n"), None);
    }

    #[test]
    fn an_unended_line_counts_only_when_its_numbers_are_complete() {
        let mut p = ProgressParser::default();
        assert_eq!(p.feed(b"\r 3/1"), None);
        assert_eq!(p.pending(), None);
        assert_eq!(p.feed(b"0 [00:01]"), None);
        assert_eq!(p.pending(), Some((3, 10)));
        assert_eq!(p.feed(b"\r 4/10 [00:02]\n"), Some((4, 10)));
        assert_eq!(p.pending(), None);
    }
}
