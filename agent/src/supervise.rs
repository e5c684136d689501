//! The job supervisor of the process runtime, and the attempt record it appends to.
//!
//! The agent does not start jobs directly: one supervisor per agent work
//! directory (`cosmos job-supervise --serve`, this module, run by the `cosmos`
//! binary) starts each job as its own child, the leader of a new process
//! group, when the agent asks over a Unix socket. The supervisor holds no GPU
//! and none of the agent's descriptors; it relays the job's output into its
//! log files, waits for it, and appends how it ended (exit code or signal,
//! peak memory, CPU time) to the attempt's record, `attempt.jsonl`, then tells
//! the agent.
//!
//! Why a supervisor: a process is only its parent's to wait for. After an
//! agent restart the job is no longer the agent's child and its exit status
//! would be lost with it; the supervisor stays the jobs' parent across any
//! number of agent restarts, so a restarted agent (or one that was down when
//! a job ended) reads the real outcome from the record. Why one for all jobs
//! rather than one per job: a process started per job cost each job more CPU
//! than the job `true` itself, and halved the agent's dispatch rate.
//!
//! Why one record file, appended to, and logs created on first output: every
//! file an attempt creates is an inode the file system allocates, and on ext4
//! that allocation grows slower with every inode recently freed (it skips
//! them), so a host that runs and cleans up thousands of short jobs slowed
//! down run after run with the six files and directories each attempt had.
//! Now a job that writes nothing costs its directory and its record only. The
//! job's output goes through pipes the supervisor holds (a pipe held by the
//! agent would break at an agent restart; the supervisor outlives those), and
//! the supervisor creates a log file when the first byte arrives.
//!
//! Lifetime: the agent starts the supervisor on a listening socket it bound
//! itself (passed as standard input), at `WORK_DIR/`[`SOCKET_FILE`]. A
//! restarted agent connects to the running one, which greets it with the
//! attempts it still runs. The supervisor exits once no agent has been
//! connected and no job has run for [`IDLE_EXIT_MS`]. Its own process group
//! is its own, so the agent's signals (a terminal's `^C`, systemd's stop with
//! `KillMode=process`) do not reach it; a stop of an attempt signals the
//! job's group only.
//!
//! Once a job has ended, and before its record is written, the supervisor
//! kills what is left of the job's process group: whatever the job left
//! behind dies with it, as in a container.

use cosmos_proto::{AttemptId, Retry};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The hidden subcommand of the `cosmos` binary that runs [`main`].
pub const SUBCOMMAND: &str = "job-supervise";
/// The supervisor's socket in the agent's work directory. The protocol's
/// version is in the name: an upgraded agent starts a supervisor of its own
/// beside an older one, which finishes its jobs and exits.
pub const SOCKET_FILE: &str = "supervisor-v2.sock";
/// Version of the messages between agent and supervisor (2: output relayed
/// through pipes, the end appended to `attempt.jsonl`; 1 wrote `exit.json`).
pub const PROTOCOL_VERSION: u32 = 2;
/// Exit code of the supervisor when its own command line is wrong (sysexits' `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// How long a supervisor with no agent connected and no job running waits before it exits.
pub const IDLE_EXIT_MS: u64 = 5_000;
/// Largest message either side accepts (a job's command line and environment).
pub const FRAME_BYTES_MAX: usize = 4 << 20;
/// Most bytes the supervisor queues for an agent that does not read; past it, the connection is dropped.
const OUTBOX_BYTES_MAX: usize = 16 << 20;
/// Most bytes relayed from one job's pipe in one turn of the loop, so a chatty job cannot starve the others.
const RELAY_BYTES_MAX: usize = 256 << 10;
/// Most bytes taken from an ended job's pipe before its end is recorded: what the job
/// wrote is at most a pipe's worth, and a process it moved out of its group that goes
/// on writing must not hold the record back.
const DRAIN_BYTES_MAX: usize = 16 << 20;

/// How a job ended, as its supervisor (or, without one, the agent) recorded it
/// (an [`Entry::Exited`] line; agents before protocol 2: `exit.json`).
///
/// Records written by older agents hold only `code` and `signal`; the rest default to unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, when the job exited.
    pub code: Option<i32>,
    /// Signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Peak resident memory of the job's process (and the descendants it waited for), in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rss_kib: Option<u64>,
    /// User CPU time of the same processes, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_cpu_ms: Option<u64>,
    /// System CPU time of the same processes, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sys_cpu_ms: Option<u64>,
    /// When the job ended, in milliseconds since the Unix epoch (host-local use only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<u64>,
}

/// Why an exit record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file exists but cannot be read.
    #[error("cannot read the exit record {path}: {source}")]
    Io {
        /// The record.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file holds no complete record (cut short, or not a record at all).
    #[error("the exit record {path} is not a complete record: {source}")]
    Torn {
        /// The record.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
}

/// Reads an `exit.json` of an agent before protocol 2: `Ok(None)` when there is none (yet).
pub fn read_record(path: &Path) -> Result<Option<ExitRecord>, ReadError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ReadError::Io { path: path.to_path_buf(), source }),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| ReadError::Torn { path: path.to_path_buf(), source })
}

/// One line of an attempt's record file (`attempt.jsonl`). The agent appends
/// `Started` and `Acknowledged`, the supervisor `Exited`; they may come in
/// either order (a short job can end before the agent has written its start).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry<S> {
    /// What was started (the runtime's own record of it).
    Started(S),
    /// How it ended.
    Exited(ExitRecord),
    /// The controller has durably recorded the outcome.
    Acknowledged {
        /// When the agent heard so, in milliseconds since the Unix epoch (host-local: retention's clock).
        unix_ms: u64,
    },
}

/// What an attempt's record file says, its lines folded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordLog<S> {
    /// The start, if it was written.
    pub started: Option<S>,
    /// The first end written (a later one, from a confused writer, does not change the outcome).
    pub exited: Option<ExitRecord>,
    /// When the outcome was acknowledged.
    pub acknowledged_unix_ms: Option<u64>,
    /// Lines that did not parse (a write cut short by a crash); they are skipped.
    pub torn_lines: usize,
}

/// Appends one line to a record file, which must exist.
///
/// One `write` of a whole line on a file opened for appending: two writers
/// (the agent and the supervisor) never interleave within a line. The line
/// starts with a newline too, which ends a line a crash may have cut short,
/// so that only the torn line is lost, not the next one with it.
///
/// No fsync, as for every record here: the record is for a restarted *agent
/// process*, and the page cache outlives a process. After a host crash the
/// job's outputs, which nobody synced either, may be torn, so a rebooted
/// host's agent reports an attempt of an earlier boot lost whatever its record
/// says (the process runtime checks the boot id). Two fsyncs per job held each
/// job's GPUs for two journal commits on ext4.
pub fn append_entry<S: Serialize>(path: &Path, entry: &Entry<S>) -> io::Result<()> {
    let mut line = vec![b'\n'];
    serde_json::to_writer(&mut line, entry).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(&line)
}

/// Reads a record file: `Ok(None)` when there is none.
pub fn read_log<S: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<RecordLog<S>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut log = RecordLog { started: None, exited: None, acknowledged_unix_ms: None, torn_lines: 0 };
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Entry<S>>(line) {
            Ok(Entry::Started(s)) => log.started = log.started.or(Some(s)),
            Ok(Entry::Exited(e)) => log.exited = log.exited.or(Some(e)),
            Ok(Entry::Acknowledged { unix_ms }) => {
                log.acknowledged_unix_ms = log.acknowledged_unix_ms.or(Some(unix_ms))
            }
            Err(_) => log.torn_lines += 1,
        }
    }
    Ok(Some(log))
}

/// How the agent starts a supervisor: a program, and the arguments that come before the supervisor's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launcher {
    /// The program.
    pub program: PathBuf,
    /// Arguments before `--serve` (`job-supervise` for the `cosmos` binary).
    pub leading_args: Vec<OsString>,
}

impl Launcher {
    /// The `cosmos` binary at `path`, run as `cosmos job-supervise`.
    pub fn cosmos(path: PathBuf) -> Launcher {
        Launcher { program: path, leading_args: vec![SUBCOMMAND.into()] }
    }

    /// A program that is a supervisor by itself (`cosmos-job-supervise`, which the agent's own tests use).
    pub fn standalone(path: PathBuf) -> Launcher {
        Launcher { program: path, leading_args: Vec::new() }
    }
}

/// A job the agent asks the supervisor to start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartJob {
    /// The attempt it is.
    pub attempt_id: AttemptId,
    /// The program, resolved by the agent (a path, so no `PATH` search happens here).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Its whole environment (nothing of the supervisor's own is added).
    pub env: Vec<(OsString, OsString)>,
    /// Its working directory.
    pub cwd: OsString,
    /// Where its standard output goes: created (or appended to) when the job first writes to it.
    pub stdout: OsString,
    /// Where its standard error goes, likewise.
    pub stderr: OsString,
    /// Its record file (the agent created it), to which the supervisor appends its end.
    pub record_file: OsString,
}

/// Agent to supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToSupervisor {
    /// Start a job; answered by [`FromSupervisor::Started`] or [`FromSupervisor::StartFailed`].
    Start(StartJob),
}

/// Supervisor to agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromSupervisor {
    /// First on every connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the supervisor.
        protocol: u32,
        /// The supervisor's process id.
        pid: u32,
        /// Attempts it runs now; each gets an [`FromSupervisor::Exited`] on this connection when it ends.
        running: Vec<AttemptId>,
    },
    /// The job runs, leading its own process group.
    Started {
        /// The attempt.
        attempt_id: AttemptId,
        /// The job's process id (and group id).
        pid: u32,
        /// Its start time in clock ticks since boot, to tell it from a later process with the same id.
        start_ticks: Option<u64>,
    },
    /// The job could not be started.
    StartFailed {
        /// The attempt.
        attempt_id: AttemptId,
        /// Why, for people.
        reason: String,
        /// Whether another try may succeed.
        retry: Retry,
    },
    /// The job ended and its record is written (or could not be: then it says why on the job's stderr).
    Exited {
        /// The attempt.
        attempt_id: AttemptId,
    },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection, or it failed.
    #[error("the connection closed: {0}")]
    Closed(#[source] io::Error),
    /// A frame announced more than [`FRAME_BYTES_MAX`].
    #[error("a frame of {0} bytes is over the limit of {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    /// A frame did not decode.
    #[error("a frame does not decode: {0}")]
    Decode(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// One frame: its length (4 bytes, little-endian), then the message in bincode.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(message, config()).expect("these messages always encode");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Takes one whole frame off the front of `buf`, if it holds one.
pub fn decode<T: serde::de::DeserializeOwned>(buf: &mut Vec<u8>) -> Result<Option<T>, FrameError> {
    let Some(len) = buf.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize) else {
        return Ok(None);
    };
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let decoded = bincode::serde::decode_from_slice(&buf[4..4 + len], config());
    buf.drain(..4 + len);
    decoded.map(|(m, _)| Some(m)).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Reads exactly one frame from a blocking stream.
pub fn read_frame<T: serde::de::DeserializeOwned>(stream: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(FrameError::Closed)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; 4 + len];
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    stream.read_exact(&mut buf[4..]).map_err(FrameError::Closed)?;
    decode(&mut buf)?.ok_or_else(|| FrameError::Decode("a short frame".into()))
}

/// A job the supervisor runs.
struct Job {
    attempt_id: AttemptId,
    record_file: PathBuf,
    /// Its standard output and standard error.
    relays: [Relay; 2],
}

/// One output stream of a job: the pipe the supervisor reads and the log file
/// it appends to, created when the first byte arrives.
struct Relay {
    /// The read end; `None` once the job (and whatever shares its descriptors) closed it.
    pipe: Option<std::fs::File>,
    path: PathBuf,
    file: Option<std::fs::File>,
    /// Set once a write to the log failed, so the failure is told once.
    failed: bool,
}

impl Relay {
    /// Moves what the pipe holds into the log file: at most [`RELAY_BYTES_MAX`],
    /// or [`DRAIN_BYTES_MAX`] when `ended` (everything the job wrote must be in
    /// the file before its end is recorded).
    fn pump(&mut self, ended: bool) {
        let mut buf = [0u8; 64 << 10];
        let mut moved = 0;
        let limit = if ended { DRAIN_BYTES_MAX } else { RELAY_BYTES_MAX };
        while moved < limit {
            let Some(pipe) = self.pipe.as_mut() else { return };
            match pipe.read(&mut buf) {
                Ok(0) => {
                    self.pipe = None;
                    return;
                }
                Ok(n) => {
                    moved += n;
                    self.write(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.pipe = None;
                    return;
                }
            }
        }
    }

    fn write(&mut self, data: &[u8]) {
        if self.file.is_none() && !self.failed {
            match std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) => self.fail(&e),
            }
        }
        if let Some(file) = self.file.as_mut() {
            if let Err(e) = file.write_all(data) {
                self.fail(&e);
            }
        }
    }

    /// Output that cannot be kept (a full disk) is dropped, never left in the
    /// pipe: a job blocked on a full pipe would hang instead of failing.
    fn fail(&mut self, e: &io::Error) {
        if !self.failed {
            eprintln!(
                "cosmos {SUBCOMMAND}: cannot write the job log {}, dropping its output: {e}",
                self.path.display()
            );
        }
        self.failed = true;
        self.file = None;
    }
}

/// A pipe for a job's output: the supervisor's end (non-blocking) and the job's.
fn output_pipe() -> io::Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors on success; close-on-exec keeps them from other jobs.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned here.
    let (read, write) = unsafe { (std::fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The job's end blocks: a job writing faster than the supervisor relays waits, as on a file.
    // SAFETY: fcntl on a descriptor owned here.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, 0) };
    Ok((read, write))
}

/// The connected agent.
struct Conn {
    stream: UnixStream,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
}

/// The supervisor's state: its listener, the agent (if one is connected), its jobs by pid.
struct Server {
    listener: UnixListener,
    /// The socket's path and the file there when this supervisor started (its own, bound by the agent).
    socket: Option<(PathBuf, (u64, u64))>,
    sigchld: OwnedFd,
    conn: Option<Conn>,
    jobs: HashMap<libc::pid_t, Job>,
    idle_since: Option<Instant>,
}

extern "C" fn ignore(_: libc::c_int) {}

/// The supervisor process: `cosmos job-supervise --serve [--socket PATH]`, its
/// listening socket as standard input (the agent binds it). `--socket` names
/// the path, which it removes when it exits if the path is still its own.
/// Returns its exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let mut args = args.into_iter();
    let (mut serve, mut socket) = (false, None);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--serve") => serve = true,
            Some("--socket") => match args.next() {
                Some(path) => socket = Some(PathBuf::from(path)),
                None => return usage("--socket needs a path"),
            },
            _ => return usage(&format!("unexpected argument {arg:?}")),
        }
    }
    if !serve {
        return usage("--serve is required");
    }
    // The agent's terminal or service manager may signal the process group it
    // was started in before this one made its own: outlive those signals.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs a handler that does nothing; SA_RESTART keeps interrupted calls going.
        // A handler, unlike an ignored disposition, is reset by exec: jobs get the default.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    close_inherited_fds();
    // SAFETY: fd 0 is the listening socket the agent passed; nothing else owns it.
    let listener = unsafe { UnixListener::from_raw_fd(0) };
    if let Err(e) = listener.local_addr().and_then(|_| listener.set_nonblocking(true)) {
        eprintln!("cosmos {SUBCOMMAND}: standard input is not a listening Unix socket: {e}");
        return EXIT_USAGE;
    }
    let sigchld = match sigchld_fd() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("cosmos {SUBCOMMAND}: cannot watch for the end of jobs (signalfd): {e}");
            return 1;
        }
    };
    let socket = socket.and_then(|path| file_id(&path).map(|id| (path, id)));
    let mut server =
        Server { listener, socket, sigchld, conn: None, jobs: HashMap::new(), idle_since: Some(Instant::now()) };
    let code = server.run();
    server.remove_socket();
    code
}

fn usage(problem: &str) -> i32 {
    eprintln!(
        "cosmos {SUBCOMMAND}: {problem} (usage: --serve [--socket PATH], the listening socket as standard input; the agent starts it)"
    );
    EXIT_USAGE
}

/// Blocks `SIGCHLD` and returns a descriptor that becomes readable when one is pending.
fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: plain signal-mask calls on a local set; the supervisor has one thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

impl Server {
    fn run(&mut self) -> i32 {
        loop {
            let timeout_ms = match self.idle_since {
                Some(since) if self.conn.is_none() && self.jobs.is_empty() => {
                    let left = Duration::from_millis(IDLE_EXIT_MS).saturating_sub(since.elapsed());
                    if left.is_zero() {
                        return 0;
                    }
                    left.as_millis().min(i32::MAX as u128) as i32
                }
                _ => -1,
            };
            let mut fds = vec![
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.sigchld.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            let conn_at = self.conn.as_ref().map(|conn| {
                let mut events = libc::POLLIN;
                if !conn.outbox.is_empty() {
                    events |= libc::POLLOUT;
                }
                fds.push(libc::pollfd { fd: conn.stream.as_raw_fd(), events, revents: 0 });
                fds.len() - 1
            });
            let mut relays = Vec::new();
            for (&pid, job) in &self.jobs {
                for (stream, relay) in job.relays.iter().enumerate() {
                    if let Some(pipe) = &relay.pipe {
                        fds.push(libc::pollfd { fd: pipe.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                        relays.push((pid, stream));
                    }
                }
            }
            let relays_at = fds.len() - relays.len();
            // SAFETY: a valid array of pollfds, for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("cosmos {SUBCOMMAND}: poll failed: {e}");
                return 1;
            }
            for (i, &(pid, stream)) in relays.iter().enumerate() {
                if fds[relays_at + i].revents != 0 {
                    if let Some(job) = self.jobs.get_mut(&pid) {
                        job.relays[stream].pump(false);
                    }
                }
            }
            if fds[1].revents != 0 {
                self.drain_sigchld();
                self.reap();
            }
            if fds[0].revents != 0 {
                self.accept();
            }
            if conn_at.is_some_and(|at| fds[at].revents != 0) {
                self.serve_conn();
            }
            self.flush();
            if self.conn.is_none() && self.jobs.is_empty() && self.idle_since.is_none() {
                self.idle_since = Some(Instant::now());
            }
        }
    }

    fn drain_sigchld(&mut self) {
        let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>() * 16];
        // SAFETY: reads into a local buffer from our own nonblocking signalfd.
        while unsafe { libc::read(self.sigchld.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    /// Reaps every ended child: kills what it left in its group, records its end, tells the agent.
    fn reap(&mut self) {
        loop {
            // SAFETY: siginfo_t is plain data, filled in by the kernel.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // Look without reaping: while the zombie exists its pid, and so its group id, cannot be reused.
            // SAFETY: waitid with a valid out-pointer.
            let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
            // SAFETY: si_pid is set by a successful waitid (0 when no child has ended).
            let pid = if r == 0 { unsafe { info.si_pid() } } else { 0 };
            if pid <= 0 {
                return;
            }
            if self.jobs.contains_key(&pid) {
                // SAFETY: signals the group the job led (held by its zombie).
                unsafe { libc::killpg(pid, libc::SIGKILL) };
            }
            let mut status: libc::c_int = 0;
            // SAFETY: rusage is plain data, filled in by the kernel.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own ended child, with valid out-pointers.
            if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
                continue;
            }
            let Some(mut job) = self.jobs.remove(&pid) else { continue };
            // Everything the job wrote goes into its logs before its end is recorded:
            // an agent that sees the end reads whole logs.
            for relay in &mut job.relays {
                relay.pump(true);
            }
            let ms = |t: libc::timeval| (t.tv_sec as u64) * 1000 + (t.tv_usec as u64) / 1000;
            let record = ExitRecord {
                code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
                signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
                // Linux reports ru_maxrss in KiB.
                max_rss_kib: Some(usage.ru_maxrss as u64),
                user_cpu_ms: Some(ms(usage.ru_utime)),
                sys_cpu_ms: Some(ms(usage.ru_stime)),
                ended_unix_ms: Some(crate::runtime::unix_ms()),
            };
            if let Err(e) = append_entry(&job.record_file, &Entry::<()>::Exited(record)) {
                // No record: the agent reports the attempt lost, and the job's stderr says why.
                let why =
                    format!("cosmos {SUBCOMMAND}: cannot write the exit record {}: {e}\n", job.record_file.display());
                eprint!("{why}");
                job.relays[1].write(why.as_bytes());
            }
            self.send(&FromSupervisor::Exited { attempt_id: job.attempt_id });
        }
    }

    /// A new agent connection replaces the old one (an agent that restarted, or its replacement).
    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let mut running: Vec<AttemptId> = self.jobs.values().map(|j| j.attempt_id).collect();
            running.sort();
            self.conn = Some(Conn { stream, inbox: Vec::new(), outbox: Vec::new() });
            self.idle_since = None;
            // SAFETY: getpid cannot fail.
            let pid = unsafe { libc::getpid() } as u32;
            self.send(&FromSupervisor::Hello { protocol: PROTOCOL_VERSION, pid, running });
        }
    }

    fn serve_conn(&mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        let mut buf = [0u8; 64 << 10];
        let mut closed = false;
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => conn.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut requests = Vec::new();
        loop {
            match decode::<ToSupervisor>(&mut conn.inbox) {
                Ok(Some(m)) => requests.push(m),
                Ok(None) => break,
                Err(e) => {
                    eprintln!("cosmos {SUBCOMMAND}: dropping the agent's connection: {e}");
                    closed = true;
                    break;
                }
            }
        }
        for ToSupervisor::Start(job) in requests {
            let reply = self.start(job);
            self.send(&reply);
        }
        if closed {
            self.conn = None;
        }
    }

    fn start(&mut self, job: StartJob) -> FromSupervisor {
        let attempt_id = job.attempt_id;
        let failed = |reason: String, retry| FromSupervisor::StartFailed { attempt_id, reason, retry };
        let ((out_read, out_write), (err_read, err_write)) = match (output_pipe(), output_pipe()) {
            (Ok(o), Ok(e)) => (o, e),
            (Err(e), _) | (_, Err(e)) => {
                return failed(format!("cannot make a pipe for the job's output: {e}"), Retry::Retryable);
            }
        };
        let mut cmd = std::process::Command::new(&job.program);
        cmd.args(&job.args)
            .env_clear()
            .envs(job.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&job.cwd)
            .stdin(std::process::Stdio::null())
            .stdout(out_write)
            .stderr(err_write)
            .process_group(0);
        let spawned = cmd.spawn();
        // The job's ends of the pipes are the job's only: at its end (and its group's) the pipes close.
        drop(cmd);
        match spawned {
            Ok(child) => {
                let pid = child.id() as libc::pid_t;
                // Reaped by `reap`, not through `child`.
                drop(child);
                let relay =
                    |pipe, path: &OsString| Relay { pipe: Some(pipe), path: path.into(), file: None, failed: false };
                let relays = [relay(out_read, &job.stdout), relay(err_read, &job.stderr)];
                self.jobs.insert(pid, Job { attempt_id, record_file: PathBuf::from(&job.record_file), relays });
                FromSupervisor::Started { attempt_id, pid: pid as u32, start_ticks: start_ticks(pid as u32) }
            }
            Err(e) => {
                let program = Path::new(&job.program).display().to_string();
                let retry = match e.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => Retry::Terminal,
                    _ => Retry::Retryable,
                };
                failed(format!("cannot start `{program}`: {e}"), retry)
            }
        }
    }

    fn send(&mut self, message: &FromSupervisor) {
        let Some(conn) = self.conn.as_mut() else { return };
        if conn.outbox.len() > OUTBOX_BYTES_MAX {
            eprintln!("cosmos {SUBCOMMAND}: the agent reads nothing; dropping its connection (jobs go on)");
            self.conn = None;
            return;
        }
        conn.outbox.extend_from_slice(&encode(message));
    }

    fn flush(&mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        while !conn.outbox.is_empty() {
            match conn.stream.write(&conn.outbox) {
                Ok(n) => {
                    conn.outbox.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.conn = None;
                    return;
                }
            }
        }
    }

    /// Removes the socket file if it is still this supervisor's (a newer one may have replaced it).
    fn remove_socket(&self) {
        let Some((path, own)) = &self.socket else { return };
        if file_id(path) == Some(*own) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Device and inode of the file at `path` (a socket's own descriptor has another, in sockfs).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in ticks since boot.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its closing one.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Closes every descriptor but the standard three: whatever the agent's
/// process held without close-on-exec (a socket, a lock) must not live on in
/// a supervisor that outlives it, nor reach the jobs.
fn close_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<RawFd> = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|&fd| fd > 2).collect();
    for fd in fds {
        // SAFETY: nothing in this process uses these descriptors (the listing's own is already closed: EBADF).
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(code: i32) -> ExitRecord {
        ExitRecord {
            code: Some(code),
            signal: None,
            max_rss_kib: Some(2048),
            user_cpu_ms: Some(12),
            sys_cpu_ms: Some(4),
            ended_unix_ms: Some(1_700_000_000_000),
        }
    }

    #[test]
    fn a_record_file_folds_its_lines_in_any_order_and_the_first_end_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attempt.jsonl");
        assert_eq!(read_log::<String>(&path).unwrap(), None);
        assert!(append_entry(&path, &Entry::<String>::Exited(ended(0))).is_err(), "appending needs the file");
        std::fs::File::create(&path).unwrap();
        // A short job's end can come before the agent wrote its start.
        append_entry(&path, &Entry::<String>::Exited(ended(3))).unwrap();
        append_entry(&path, &Entry::Started("the start".to_string())).unwrap();
        append_entry(&path, &Entry::<String>::Exited(ended(9))).unwrap();
        append_entry(&path, &Entry::<String>::Acknowledged { unix_ms: 42 }).unwrap();
        let log = read_log::<String>(&path).unwrap().unwrap();
        assert_eq!(
            log,
            RecordLog {
                started: Some("the start".into()),
                exited: Some(ended(3)),
                acknowledged_unix_ms: Some(42),
                torn_lines: 0
            }
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["attempt.jsonl"], "appending makes no other file");
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_skipped_and_takes_no_later_line_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attempt.jsonl");
        std::fs::File::create(&path).unwrap();
        append_entry(&path, &Entry::Started(7u32)).unwrap();
        // A writer killed mid-line leaves no newline at the end.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"\n{\"exited\":{\"co").unwrap();
        append_entry(&path, &Entry::<u32>::Exited(ended(0))).unwrap();
        let log = read_log::<u32>(&path).unwrap().unwrap();
        assert_eq!((log.started, log.exited, log.torn_lines), (Some(7), Some(ended(0)), 1));
    }

    #[test]
    fn a_missing_record_is_none_and_a_torn_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        assert_eq!(read_record(&path).unwrap(), None);
        for torn in ["", "{\"code\": 0, \"sig", "not json"] {
            std::fs::write(&path, torn).unwrap();
            assert!(matches!(read_record(&path), Err(ReadError::Torn { .. })), "{torn:?} read as a record");
        }
    }

    #[test]
    fn a_record_of_an_older_agent_reads_with_its_usage_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        std::fs::write(&path, "{\n  \"code\": null,\n  \"signal\": 15\n}").unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(ExitRecord { signal: Some(15), ..ExitRecord::default() }));
    }

    #[test]
    fn frames_round_trip_one_at_a_time_and_wait_for_their_whole_length() {
        let start = ToSupervisor::Start(StartJob {
            attempt_id: AttemptId(7),
            program: "/bin/true".into(),
            args: vec!["a b".into(), <OsString as std::os::unix::ffi::OsStringExt>::from_vec(vec![0xff, 0x00])],
            env: vec![("CUDA_VISIBLE_DEVICES".into(), "3,1".into())],
            cwd: "/w".into(),
            stdout: "/w/stdout.log".into(),
            stderr: "/w/stderr.log".into(),
            record_file: "/w/attempt.jsonl".into(),
        });
        let ToSupervisor::Start(first) = &start;
        let exited = ToSupervisor::Start(StartJob { attempt_id: AttemptId(8), ..first.clone() });
        let mut stream = encode(&start);
        stream.extend(encode(&exited));
        // Byte by byte: nothing decodes before a frame is whole.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in stream {
            buf.push(b);
            while let Some(m) = decode::<ToSupervisor>(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, [start, exited]);
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_frame_is_refused_before_it_is_read() {
        let mut buf = ((FRAME_BYTES_MAX + 1) as u32).to_le_bytes().to_vec();
        assert!(matches!(decode::<ToSupervisor>(&mut buf), Err(FrameError::TooLarge(n)) if n == FRAME_BYTES_MAX + 1));
        let mut short = 2u32.to_le_bytes().to_vec();
        short.extend_from_slice(&[0xff, 0xff]);
        assert!(matches!(decode::<FromSupervisor>(&mut short), Err(FrameError::Decode(_))));
    }
}
