//! The process runtime's connection to its job supervisor (see [`crate::supervise`]).
//!
//! One [`Supervisor`] per runtime: it connects to the supervisor already
//! serving the work directory, or starts one, and hands out the current
//! [`Link`]. A link that closes (the supervisor was killed) is replaced by a
//! new supervisor on the next start; the attempts of the closed one are lost.

use crate::runtime::lock;
use crate::supervise::{self, FromSupervisor, Launcher, StartJob, ToSupervisor};
use cosmos_proto::{AttemptId, Retry};
use std::collections::{HashMap, HashSet};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

/// How long a supervisor has to greet a connecting agent before it is taken for dead and replaced.
pub const HELLO_TIMEOUT_MS: u64 = 3_000;
/// Tries at connecting to (or starting) a supervisor before a start fails.
const CONNECT_TRIES_MAX: u32 = 3;
/// Variables of the agent's environment the supervisor itself keeps (each job gets its own, whole).
const SUPERVISOR_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];

/// What a start came to.
type StartReply = Result<(u32, Option<u64>), (String, Retry)>;

/// Replies and ends the reader waits to hand out.
#[derive(Default)]
struct Pending {
    starts: HashMap<AttemptId, oneshot::Sender<StartReply>>,
    exits: HashMap<AttemptId, oneshot::Sender<()>>,
    /// Ended before anyone waited (an attempt adopted from the greeting that ended at once).
    ended: HashSet<AttemptId>,
    closed: bool,
}

/// One connection to a supervisor.
pub struct Link {
    writer: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    pending: Arc<Mutex<Pending>>,
    reader: tokio::task::AbortHandle,
    pid: u32,
    running: HashSet<AttemptId>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Link {
    /// The supervisor's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the supervisor ran `attempt_id` when this link was made (a restarted agent's adoptee).
    pub fn was_running(&self, attempt_id: AttemptId) -> bool {
        self.running.contains(&attempt_id)
    }

    /// Whether the supervisor is gone (its attempts can no longer be recorded).
    pub fn is_closed(&self) -> bool {
        lock(&self.pending).closed
    }

    /// Resolves when the supervisor reports `attempt_id` ended; fails when the link closes first.
    pub fn exited(&self, attempt_id: AttemptId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut p = lock(&self.pending);
        if p.ended.remove(&attempt_id) {
            let _ = tx.send(());
        } else if !p.closed {
            p.exits.insert(attempt_id, tx);
        }
        rx
    }

    /// Starts a job: its pid and start ticks, and a receiver for its end.
    pub async fn start(&self, job: StartJob) -> Result<(u32, Option<u64>, oneshot::Receiver<()>), (String, Retry)> {
        let attempt_id = job.attempt_id;
        // Registered first: a job like `true` ends before its start is answered.
        let exited = self.exited(attempt_id);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).starts.insert(attempt_id, tx);
        let gone =
            || (format!("the job supervisor (pid {}) went away while starting the job", self.pid), Retry::Retryable);
        let frame = supervise::encode(&ToSupervisor::Start(job));
        if self.writer.lock().await.write_all(&frame).await.is_err() {
            lock(&self.pending).starts.remove(&attempt_id);
            return Err(gone());
        }
        match rx.await {
            Ok(Ok((pid, ticks))) => Ok((pid, ticks, exited)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(gone()),
        }
    }
}

/// Connects to the work directory's supervisor, starting one when none serves it.
pub struct Supervisor {
    socket: PathBuf,
    launcher: Launcher,
    current: tokio::sync::Mutex<Option<Arc<Link>>>,
}

impl Supervisor {
    /// The supervisor of the work directory `root`, started with `launcher` when needed.
    pub fn new(root: &Path, launcher: Launcher) -> Supervisor {
        Supervisor { socket: root.join(supervise::SOCKET_FILE), launcher, current: tokio::sync::Mutex::new(None) }
    }

    /// The open link, connecting (or starting a supervisor) when there is none.
    pub async fn link(&self) -> Result<Arc<Link>, String> {
        let mut current = self.current.lock().await;
        if let Some(link) = current.as_ref().filter(|l| !l.is_closed()) {
            return Ok(link.clone());
        }
        let (socket, launcher) = (self.socket.clone(), self.launcher.clone());
        let connected = tokio::task::spawn_blocking(move || connect(&socket, &launcher))
            .await
            .map_err(|e| format!("cannot connect to the job supervisor: {e}"))??;
        let link = Arc::new(open(connected)?);
        *current = Some(link.clone());
        Ok(link)
    }

    /// As [`Supervisor::link`], blocking: for start-up, before any start is asked for.
    pub fn link_now(&self) -> Result<Arc<Link>, String> {
        let mut current = self.current.try_lock().map_err(|_| "the job supervisor is being connected".to_string())?;
        if let Some(link) = current.as_ref().filter(|l| !l.is_closed()) {
            return Ok(link.clone());
        }
        let link = Arc::new(open(connect(&self.socket, &self.launcher)?)?);
        *current = Some(link.clone());
        Ok(link)
    }

    /// The current link's supervisor, if connected.
    pub fn pid(&self) -> Option<u32> {
        self.current.try_lock().ok()?.as_ref().filter(|l| !l.is_closed()).map(|l| l.pid)
    }
}

/// A connected, greeted socket.
struct Connected {
    stream: std::os::unix::net::UnixStream,
    pid: u32,
    running: Vec<AttemptId>,
}

/// Connects to the supervisor at `socket`, or starts one there, and reads its greeting.
fn connect(socket: &Path, launcher: &Launcher) -> Result<Connected, String> {
    let mut last = String::new();
    for _ in 0..CONNECT_TRIES_MAX {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(HELLO_TIMEOUT_MS)));
                match supervise::read_frame::<FromSupervisor>(&mut stream) {
                    Ok(FromSupervisor::Hello { protocol, pid, running }) if protocol == supervise::PROTOCOL_VERSION => {
                        let _ = stream.set_read_timeout(None);
                        return Ok(Connected { stream, pid, running });
                    }
                    Ok(other) => last = format!("the job supervisor at {} greeted with {other:?}", socket.display()),
                    // Exiting as we came, or hung: a new one takes the path over.
                    Err(e) => last = format!("the job supervisor at {} did not greet: {e}", socket.display()),
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {}
            Err(e) => return Err(format!("cannot connect to the job supervisor at {}: {e}", socket.display())),
        }
        if let Err(e) = spawn(socket, launcher) {
            last = e;
        }
    }
    Err(last)
}

/// Starts a supervisor on a socket bound here, so that it can be connected to at once.
fn spawn(socket: &Path, launcher: &Launcher) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    // Stale (nobody listens), or a supervisor that does not answer: its jobs go on without the path.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(|e| format!("cannot make the job supervisor's socket {}: {e}", socket.display()))?;
    // Whoever can connect can run programs as the agent's user.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict the job supervisor's socket {}: {e}", socket.display()))?;
    let mut cmd = tokio::process::Command::new(&launcher.program);
    cmd.args(&launcher.leading_args)
        .arg("--serve")
        .arg("--socket")
        .arg(socket)
        .env_clear()
        .envs(SUPERVISOR_ENV.iter().filter_map(|k| std::env::var_os(k).map(|v| (*k, v))))
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| {
        format!("cannot start the job supervisor {} (the agent's own binary): {e}", launcher.program.display())
    })?;
    // Reaped when it exits; it outlives this agent otherwise.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(())
}

/// Makes a link of a greeted socket: a task reads the supervisor's replies and ends.
fn open(c: Connected) -> Result<Link, String> {
    c.stream.set_nonblocking(true).map_err(|e| format!("cannot use the job supervisor's socket: {e}"))?;
    let stream = tokio::net::UnixStream::from_std(c.stream)
        .map_err(|e| format!("cannot use the job supervisor's socket: {e}"))?;
    let (read, write) = stream.into_split();
    let pending = Arc::new(Mutex::new(Pending::default()));
    let reader = tokio::spawn(read_replies(read, pending.clone())).abort_handle();
    Ok(Link {
        writer: tokio::sync::Mutex::new(write),
        pending,
        reader,
        pid: c.pid,
        running: c.running.into_iter().collect(),
    })
}

async fn read_replies(mut read: tokio::net::unix::OwnedReadHalf, pending: Arc<Mutex<Pending>>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    'reading: loop {
        match read.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        loop {
            let message = match supervise::decode::<FromSupervisor>(&mut buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "the job supervisor sent what this agent cannot read; dropping it");
                    break 'reading;
                }
            };
            let mut p = lock(&pending);
            match message {
                FromSupervisor::Started { attempt_id, pid, start_ticks } => {
                    if let Some(tx) = p.starts.remove(&attempt_id) {
                        let _ = tx.send(Ok((pid, start_ticks)));
                    }
                }
                FromSupervisor::StartFailed { attempt_id, reason, retry } => {
                    if let Some(tx) = p.starts.remove(&attempt_id) {
                        let _ = tx.send(Err((reason, retry)));
                    }
                }
                FromSupervisor::Exited { attempt_id } => match p.exits.remove(&attempt_id) {
                    Some(tx) => {
                        let _ = tx.send(());
                    }
                    None => {
                        p.ended.insert(attempt_id);
                    }
                },
                FromSupervisor::Hello { .. } => {}
            }
        }
    }
    let mut p = lock(&pending);
    p.closed = true;
    // Dropped senders: every waiter learns the supervisor is gone.
    p.starts.clear();
    p.exits.clear();
}
