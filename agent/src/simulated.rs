//! The simulated runtime: attempts without processes or containers, played by
//! timers. It reads a job's command as `cosmos-testjob` would (the flags of
//! [`cosmos_testjob::Args`]) and behaves as that program does under the real
//! runtimes: the same output, progress, exit codes, reaction to `SIGTERM`,
//! output files (written into the attempt's work directory, so they are
//! hashed the same way) and environment. The runtime contract suite
//! (`agent/tests/contract.rs`) holds it to the real runtimes' behaviour.
//!
//! A [`SimulatedHost`] plays the container engine: its jobs run on tokio
//! tasks that outlive any one [`SimulatedRuntime`], so dropping a runtime and
//! creating another on the same host is an agent restart, and
//! [`Runtime::recover`] adopts what still runs. Time is tokio's, so tests may
//! pause and advance it.

use crate::core::{ExitStatus, Recovered, RuntimeEvent};
use crate::process::{ProgressParser, STDERR_FILE, STDOUT_FILE, collect_outputs, recovered_outputs};
use crate::runtime::{EventSender, Runtime, StartRequest, lock};
use cosmos_proto::{AttemptId, JobId, LOG_CHUNK_BYTES_MAX, LogStream};
use cosmos_testjob::Args;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Program names the simulated runtime can run (the last component of `command[0]`).
pub const PROGRAMS: &[&str] = &["cosmos-testjob", "testjob"];

const KILLED: ExitStatus = ExitStatus { code: None, signal: Some(libc::SIGKILL), oom_killed: false };

/// One simulated container on the host.
struct Job {
    job_id: JobId,
    gpu_uuids: Vec<String>,
    timeout_ms: u64,
    created: Instant,
    work_dir: PathBuf,
    outputs: Vec<String>,
    /// Everything written to stdout and stderr.
    output: [Vec<u8>; 2],
    exit: Option<ExitStatus>,
    /// Signals for the job's task.
    signals: mpsc::UnboundedSender<i32>,
    /// Bumped at every write and at the exit.
    changed: watch::Sender<()>,
    tasks: Vec<AbortHandle>,
}

/// An attempt that ended and was removed, kept until acknowledged (what `exit.json` is to the real runtimes).
#[derive(Clone, Debug)]
struct Ended {
    job_id: JobId,
    gpu_uuids: Vec<String>,
    status: ExitStatus,
    /// Where it ran and what it was to produce, to find its outputs after a restart.
    work_dir: PathBuf,
    outputs: Vec<String>,
}

#[derive(Default)]
struct HostState {
    jobs: BTreeMap<AttemptId, Job>,
    ended: BTreeMap<AttemptId, Ended>,
}

impl Drop for HostState {
    fn drop(&mut self) {
        for job in self.jobs.values() {
            for t in &job.tasks {
                t.abort();
            }
        }
    }
}

/// The simulated container engine of one host: jobs keep running while
/// runtimes come and go. Clones share the host; the last one dropped ends its jobs.
#[derive(Clone, Default)]
pub struct SimulatedHost {
    state: Arc<Mutex<HostState>>,
}

impl std::fmt::Debug for SimulatedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("SimulatedHost").field("jobs", &state.jobs.len()).field("ended", &state.ended.len()).finish()
    }
}

impl SimulatedHost {
    /// An empty host.
    pub fn new() -> SimulatedHost {
        SimulatedHost::default()
    }

    /// Attempts with a job on the host (running, or exited and not yet removed).
    pub fn jobs(&self) -> Vec<AttemptId> {
        lock(&self.state).jobs.keys().copied().collect()
    }

    /// Attempts whose job is running.
    pub fn running(&self) -> Vec<AttemptId> {
        lock(&self.state).jobs.iter().filter(|(_, j)| j.exit.is_none()).map(|(id, _)| *id).collect()
    }

    /// Sends a signal to a job, as `kill` would; false when it does not run.
    pub fn signal(&self, attempt_id: AttemptId, signal: i32) -> bool {
        let state = lock(&self.state);
        match state.jobs.get(&attempt_id) {
            Some(job) if job.exit.is_none() => job.signals.send(signal).is_ok(),
            _ => false,
        }
    }

    /// `SIGTERM` now, `SIGKILL` after `grace_ms` if it still runs (as `docker stop` does).
    fn stop(&self, attempt_id: AttemptId, grace_ms: u64) {
        if grace_ms == 0 {
            self.signal(attempt_id, libc::SIGKILL);
            return;
        }
        if !self.signal(attempt_id, libc::SIGTERM) {
            return;
        }
        let weak = Arc::downgrade(&self.state);
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(grace_ms)).await;
            if let Some(state) = weak.upgrade() {
                SimulatedHost { state }.signal(attempt_id, libc::SIGKILL);
            }
        });
        if let Some(job) = lock(&self.state).jobs.get_mut(&attempt_id) {
            job.tasks.push(task.abort_handle());
        }
    }

    /// Removes a job; its outcome is kept until acknowledged.
    fn remove(&self, attempt_id: AttemptId) {
        let mut state = lock(&self.state);
        if let Some(job) = state.jobs.remove(&attempt_id) {
            for t in &job.tasks {
                t.abort();
            }
            let status = job.exit.unwrap_or(KILLED);
            let ended = Ended {
                job_id: job.job_id,
                gpu_uuids: job.gpu_uuids,
                status,
                work_dir: job.work_dir,
                outputs: job.outputs,
            };
            state.ended.insert(attempt_id, ended);
        }
    }
}

/// What a simulated job writes and how it ends, shared by its task and the host.
struct JobIo {
    host: Weak<Mutex<HostState>>,
    attempt_id: AttemptId,
}

impl JobIo {
    fn write(&self, stream: usize, text: &str) {
        let Some(state) = self.host.upgrade() else { return };
        let mut state = lock(&state);
        if let Some(job) = state.jobs.get_mut(&self.attempt_id) {
            job.output[stream].extend_from_slice(text.as_bytes());
            job.changed.send_replace(());
        }
    }

    fn exit(&self, status: ExitStatus) {
        let Some(state) = self.host.upgrade() else { return };
        let mut state = lock(&state);
        if let Some(job) = state.jobs.get_mut(&self.attempt_id) {
            job.exit = Some(status);
            job.changed.send_replace(());
        }
    }
}

const STDOUT: usize = 0;
const STDERR: usize = 1;

/// Plays `cosmos-testjob` with these arguments (see the `cosmos_testjob` crate for the script).
async fn play(
    io: JobIo,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    work_dir: PathBuf,
    mut signals: mpsc::UnboundedReceiver<i32>,
) {
    let args = match Args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            io.write(STDERR, &cosmos_testjob::usage_error(&e));
            return io.exit(ExitStatus { code: Some(cosmos_testjob::EXIT_USAGE), signal: None, oom_killed: false });
        }
    };
    let by_signal = |signal| ExitStatus { code: None, signal: Some(signal), oom_killed: false };
    // Waits `ms`, reacting to signals as the program does; `Err(signal)` when one ends it.
    let mut pause = async |ms: u64| -> Result<(), i32> {
        let until = Instant::now() + Duration::from_millis(ms);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return Ok(()),
                signal = signals.recv() => match signal {
                    Some(libc::SIGTERM) if args.ignore_term => io.write(STDERR, cosmos_testjob::IGNORING_TERM),
                    Some(signal) => return Err(signal),
                    None => return Err(libc::SIGKILL),
                },
            }
        }
    };
    io.write(STDERR, cosmos_testjob::STARTED);
    for var in &args.print_env {
        io.write(STDOUT, &cosmos_testjob::env_line(var, env.get(var).map(String::as_str)));
    }
    for step in 1..=args.steps {
        if let Err(signal) = pause(args.step_ms).await {
            return io.exit(by_signal(signal));
        }
        io.write(STDOUT, &cosmos_testjob::step_line(step, args.steps));
    }
    if args.stdout_bytes > 0 {
        io.write(STDOUT, &"a".repeat(args.stdout_bytes as usize));
    }
    if let Err(signal) = pause(args.sleep_ms).await {
        return io.exit(by_signal(signal));
    }
    for (path, content) in &args.writes {
        let path_buf = work_dir.join(path);
        let written =
            path_buf.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::write(&path_buf, content));
        if let Err(e) = written {
            io.write(STDERR, &cosmos_testjob::write_failed_line(path, &e.to_string()));
            return io.exit(ExitStatus { code: Some(cosmos_testjob::EXIT_CANTCREAT), signal: None, oom_killed: false });
        }
    }
    io.write(STDERR, &cosmos_testjob::exiting_line(args.exit_code));
    io.exit(ExitStatus { code: Some(args.exit_code), signal: None, oom_killed: false });
}

/// Runs attempts as simulated jobs on a [`SimulatedHost`].
pub struct SimulatedRuntime {
    host: SimulatedHost,
    root_dir: PathBuf,
    events: EventSender,
    /// Attempts this runtime watches.
    watched: Arc<Mutex<HashSet<AttemptId>>>,
    tasks: crate::runtime::Watchers,
}

impl SimulatedRuntime {
    /// A runtime on `host`, keeping attempts' directories under `root_dir/attempts/`, reporting on `events`.
    pub fn new(host: SimulatedHost, root_dir: PathBuf, events: EventSender) -> SimulatedRuntime {
        SimulatedRuntime { host, root_dir, events, watched: Arc::default(), tasks: crate::runtime::Watchers::default() }
    }

    /// The host it runs on.
    pub fn host(&self) -> &SimulatedHost {
        &self.host
    }

    /// The directory of one attempt: its logs and (as the job's working directory) its files.
    pub fn attempt_dir(&self, attempt_id: AttemptId) -> PathBuf {
        crate::runtime::attempt_dir(&self.root_dir, attempt_id)
    }

    fn spawn_task(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(fut);
    }

    fn send_later(&mut self, event: RuntimeEvent) {
        self.tasks.send_later(&self.events, event);
    }

    fn try_start(&mut self, req: &StartRequest) -> Result<(), (String, cosmos_proto::Retry)> {
        let Some(program) = req.spec.command.first().filter(|p| !p.is_empty()) else {
            return Err(("the job's `command` is empty: give a program to run".into(), cosmos_proto::Retry::Terminal));
        };
        let base = program.rsplit('/').next().unwrap_or(program);
        if !PROGRAMS.contains(&base) {
            return Err((
                format!(
                    "cannot start `{program}`: program not found (the simulated runtime runs only {})",
                    PROGRAMS.join(" or ")
                ),
                cosmos_proto::Retry::Terminal,
            ));
        }
        let dir = self.attempt_dir(req.attempt_id);
        for d in [&dir, &req.work_dir] {
            std::fs::create_dir_all(d).map_err(|e| {
                (format!("cannot create the attempt directory {}: {e}", d.display()), cosmos_proto::Retry::Retryable)
            })?;
        }
        let mut state = lock(&self.host.state);
        if state.jobs.contains_key(&req.attempt_id) || state.ended.contains_key(&req.attempt_id) {
            return Err((
                format!("attempt {} was already started on this host", req.attempt_id),
                cosmos_proto::Retry::Terminal,
            ));
        }
        let mut env = req.spec.env.clone();
        env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
        env.insert(
            "CUDA_VISIBLE_DEVICES".into(),
            req.gpu_indices.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
        );
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), "void".into());
        env.insert("COSMOS_GPU_UUIDS".into(), req.gpu_uuids.join(","));
        env.insert("COSMOS_ATTEMPT_ID".into(), req.attempt_id.to_string());
        env.insert("COSMOS_JOB_ID".into(), req.job_id.to_string());
        let (signals, signals_rx) = mpsc::unbounded_channel();
        let io = JobIo { host: Arc::downgrade(&self.host.state), attempt_id: req.attempt_id };
        let task = tokio::spawn(play(io, req.spec.command[1..].to_vec(), env, req.work_dir.clone(), signals_rx));
        state.jobs.insert(
            req.attempt_id,
            Job {
                job_id: req.job_id,
                gpu_uuids: req.gpu_uuids.clone(),
                timeout_ms: req.spec.timeout_ms,
                created: Instant::now(),
                work_dir: req.work_dir.clone(),
                outputs: req.spec.outputs.iter().map(|o| o.path.clone()).collect(),
                output: [Vec::new(), Vec::new()],
                exit: None,
                signals,
                changed: watch::Sender::new(()),
                tasks: vec![task.abort_handle()],
            },
        );
        drop(state);
        lock(&self.watched).insert(req.attempt_id);
        let watch = Watch {
            host: self.host.clone(),
            dir,
            attempt_id: req.attempt_id,
            events: self.events.clone(),
            watched: self.watched.clone(),
        };
        let handle = format!("sim:{}", req.attempt_id);
        self.spawn_task(async move {
            if watch.events.send(RuntimeEvent::Started { attempt_id: watch.attempt_id, handle }).await.is_ok() {
                watch.run().await;
            }
        });
        Ok(())
    }
}

impl Runtime for SimulatedRuntime {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn start(&mut self, req: StartRequest) {
        if let Err((reason, retry)) = self.try_start(&req) {
            tracing::warn!(attempt = %req.attempt_id, %reason, "attempt did not start");
            self.send_later(RuntimeEvent::StartFailed { attempt_id: req.attempt_id, reason, retry });
        }
    }

    fn stop(&mut self, attempt_id: AttemptId, grace_ms: u64) {
        let exists = lock(&self.host.state).jobs.contains_key(&attempt_id);
        if exists && lock(&self.watched).contains(&attempt_id) {
            self.host.stop(attempt_id, grace_ms);
        } else {
            // Not watched here: it goes at once, and counts as killed.
            self.host.signal(attempt_id, libc::SIGKILL);
            self.host.remove(attempt_id);
            self.send_later(RuntimeEvent::Exited { attempt_id, status: KILLED, outputs: Vec::new() });
        }
    }

    /// Running jobs not watched by this runtime are adopted; jobs that ended
    /// while no runtime watched are reported and removed; outcomes not yet
    /// acknowledged are reported again.
    fn recover(&mut self) -> Vec<Recovered> {
        let mut recovered = Vec::new();
        let mut ended_now = Vec::new();
        let mut adopt = Vec::new();
        {
            let state = lock(&self.host.state);
            let watched = lock(&self.watched);
            for (&id, job) in &state.jobs {
                if watched.contains(&id) {
                    continue;
                }
                match &job.exit {
                    None => {
                        let elapsed = Instant::now().saturating_duration_since(job.created).as_millis() as u64;
                        let remaining_ms = job.timeout_ms.saturating_sub(elapsed);
                        recovered.push(Recovered {
                            attempt_id: id,
                            job_id: job.job_id,
                            gpu_uuids: job.gpu_uuids.clone(),
                            exited: None,
                            remaining_ms: Some(remaining_ms),
                            outputs: Vec::new(),
                        });
                        adopt.push(id);
                    }
                    Some(_) => ended_now.push(id),
                }
            }
        }
        for id in ended_now {
            self.host.remove(id);
        }
        for (&id, ended) in &lock(&self.host.state).ended {
            if !lock(&self.watched).contains(&id) {
                recovered.push(Recovered {
                    attempt_id: id,
                    job_id: ended.job_id,
                    gpu_uuids: ended.gpu_uuids.clone(),
                    exited: Some(ended.status.clone()),
                    remaining_ms: None,
                    outputs: recovered_outputs(Some(&ended.status), &ended.work_dir, &ended.outputs),
                });
            }
        }
        for id in adopt {
            tracing::info!(attempt = %id, "adopting a running simulated job");
            lock(&self.watched).insert(id);
            let watch = Watch {
                host: self.host.clone(),
                dir: self.attempt_dir(id),
                attempt_id: id,
                events: self.events.clone(),
                watched: self.watched.clone(),
            };
            self.spawn_task(watch.run());
        }
        recovered.sort_by_key(|r| r.attempt_id);
        recovered
    }

    fn acknowledged(&mut self, attempt_id: AttemptId) {
        lock(&self.host.state).ended.remove(&attempt_id);
    }
}

/// Follows one job's output to its end, then reports `Exited` and removes it.
struct Watch {
    host: SimulatedHost,
    dir: PathBuf,
    attempt_id: AttemptId,
    events: EventSender,
    watched: Arc<Mutex<HashSet<AttemptId>>>,
}

impl Watch {
    async fn run(self) {
        let id = self.attempt_id;
        let Some(mut changed) = lock(&self.host.state).jobs.get(&id).map(|j| j.changed.subscribe()) else { return };
        let mut files: Vec<(Option<std::fs::File>, u64)> = [STDOUT_FILE, STDERR_FILE]
            .iter()
            .map(|name| {
                let path = self.dir.join(name);
                let have = std::fs::metadata(&path).map_or(0, |m| m.len());
                (std::fs::OpenOptions::new().create(true).append(true).open(&path).ok(), have)
            })
            .collect();
        let mut offsets = [0usize; 2];
        let mut parsers = [ProgressParser::default(), ProgressParser::default()];
        let mut last_progress = None;
        let (status, work_dir, outputs) = loop {
            changed.borrow_and_update();
            let (fresh, exit, work_dir, outputs) = {
                let state = lock(&self.host.state);
                let Some(job) = state.jobs.get(&id) else { return };
                let fresh: [Vec<u8>; 2] = [0, 1].map(|i| job.output[i][offsets[i]..].to_vec());
                (fresh, job.exit.clone(), job.work_dir.clone(), job.outputs.clone())
            };
            for (i, data) in fresh.iter().enumerate() {
                if data.is_empty() {
                    continue;
                }
                let stream = if i == STDOUT { LogStream::Stdout } else { LogStream::Stderr };
                let offset = offsets[i] as u64;
                let (file, have) = &mut files[i];
                let from = have.saturating_sub(offset).min(data.len() as u64) as usize;
                if let (Some(f), true) = (file.as_mut(), from < data.len()) {
                    let _ = f.write_all(&data[from..]);
                }
                *have = (*have).max(offset + data.len() as u64);
                let mut chunk_offset = offset;
                for chunk in data.chunks(LOG_CHUNK_BYTES_MAX) {
                    let event =
                        RuntimeEvent::Log { attempt_id: id, stream, offset: chunk_offset, data: chunk.to_vec() };
                    if self.events.send(event).await.is_err() {
                        return;
                    }
                    chunk_offset += chunk.len() as u64;
                }
                offsets[i] += data.len();
                let step = parsers[i].feed(data);
                if let Some(p) = parsers[i].pending().or(step) {
                    if last_progress != Some(p) {
                        last_progress = Some(p);
                        let event = RuntimeEvent::Progress { attempt_id: id, step: p.0, total: p.1 };
                        if self.events.send(event).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if let Some(status) = exit {
                if fresh.iter().all(Vec::is_empty) {
                    break (status, work_dir, outputs);
                }
                continue; // Drain what came with the exit first.
            }
            if changed.changed().await.is_err() {
                return; // Removed behind our back.
            }
        };
        self.host.remove(id);
        let outputs =
            tokio::task::spawn_blocking(move || collect_outputs(&work_dir, &outputs)).await.unwrap_or_default();
        let _ = self.events.send(RuntimeEvent::Exited { attempt_id: id, status, outputs }).await;
        lock(&self.watched).remove(&id);
    }
}
