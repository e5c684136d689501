//! The job supervisor of the process runtime, and the exit record it writes.
//!
//! The agent does not start a job directly: it starts `cosmos job-supervise`
//! (this module, run by the `cosmos` binary) as the leader of a new process
//! group, and the supervisor starts the job as its own child, in that group.
//! The supervisor holds no GPU and none of the agent's descriptors; it only
//! waits for the job and then writes how it ended (exit code or signal, peak
//! memory, CPU time) into the attempt's `exit.json`, atomically.
//!
//! Why: a process is only its parent's to wait for. After an agent restart the
//! job is no longer the agent's child and its exit status would be lost with
//! it; the supervisor stays the job's parent across any number of agent
//! restarts, so a restarted agent (or one that was down when the job ended)
//! reads the real outcome from the record.
//!
//! Signals: the agent stops an attempt by signalling the whole group. The
//! supervisor catches `SIGTERM`, `SIGINT` and `SIGHUP` with a handler that
//! does nothing (a handler, unlike an ignored disposition, is reset by `exec`,
//! so the job still sees the default), so a graceful stop reaches the job and
//! the supervisor stays to record how the job took it. `SIGKILL` ends both.
//! Once the job has ended and its record is written, the supervisor kills
//! what is left of the group, itself included: whatever the job left behind
//! dies with it, as in a container.

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The hidden subcommand of the `cosmos` binary that runs [`main`].
pub const SUBCOMMAND: &str = "job-supervise";
/// Where a supervisor leaves the temporary copy of its record before renaming it into place.
pub const TMP_SUFFIX: &str = ".tmp";
/// Exit code of the supervisor when its own command line is wrong (sysexits' `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// Exit code recorded when the job's program could not be executed (a shell's convention).
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// Exit code recorded when the job's program does not exist (a shell's convention).
pub const EXIT_NOT_FOUND: i32 = 127;
/// Signals the supervisor outlives, so that it can record how the job took them.
const OUTLIVED_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// How a job ended, as its supervisor (or, without one, the agent) recorded it in `exit.json`.
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

/// Reads an exit record: `Ok(None)` when there is none (yet).
pub fn read_record(path: &Path) -> Result<Option<ExitRecord>, ReadError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ReadError::Io { path: path.to_path_buf(), source }),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| ReadError::Torn { path: path.to_path_buf(), source })
}

/// Writes an exit record so that a reader finds either no record or a
/// complete one: to a temporary file, then renamed over the record.
///
/// No fsync, as for the agent's own records: the record is for a restarted
/// *agent process*, and the page cache outlives a process. After a host crash
/// the job's outputs, which nobody synced either, may be torn, so a rebooted
/// host's agent reports an attempt of an earlier boot lost whatever its record
/// says (the process runtime checks the boot id). Two fsyncs per job held each
/// job's GPUs for two journal commits on ext4.
pub fn write_record(path: &Path, record: &ExitRecord) -> io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp_name);
    let text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    file.write_all(&text)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// How the agent starts a supervisor: a program, and the arguments that come before the supervisor's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launcher {
    /// The program.
    pub program: PathBuf,
    /// Arguments before [`SuperviseCommand::to_args`] (`job-supervise` for the `cosmos` binary).
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

/// What a supervisor runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuperviseCommand {
    /// Where the exit record goes.
    pub status_file: PathBuf,
    /// `CUDA_VISIBLE_DEVICES` for the job alone, so that the supervisor's own environment names no GPU.
    pub gpus: Option<String>,
    /// The job's program (resolved by the agent) and its arguments.
    pub command: Vec<OsString>,
}

/// Why a supervisor's command line is wrong.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// `--status-file` is missing.
    #[error("--status-file PATH is required")]
    NoStatusFile,
    /// A flag is given without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// Something other than a known flag before `--`.
    #[error("unexpected argument {0:?} (usage: --status-file PATH [--gpus LIST] -- PROGRAM [ARGS...])")]
    Unexpected(OsString),
    /// No program after `--`.
    #[error("no program to run after `--`")]
    NoCommand,
}

impl SuperviseCommand {
    /// The arguments that make a supervisor run `self` (what [`SuperviseCommand::parse`] reads).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--status-file".into(), self.status_file.clone().into()];
        if let Some(gpus) = &self.gpus {
            args.extend(["--gpus".into(), gpus.into()]);
        }
        args.push("--".into());
        args.extend(self.command.iter().cloned());
        args
    }

    /// Reads `--status-file PATH [--gpus LIST] -- PROGRAM [ARGS...]`.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<SuperviseCommand, UsageError> {
        let mut args = args.into_iter();
        let (mut status_file, mut gpus) = (None, None);
        loop {
            let Some(arg) = args.next() else { return Err(UsageError::NoCommand) };
            match arg.to_str() {
                Some("--") => break,
                Some(flag @ ("--status-file" | "--gpus")) => {
                    let value = args.next().ok_or_else(|| UsageError::MissingValue(flag.to_string()))?;
                    if flag == "--gpus" {
                        gpus = Some(value.to_string_lossy().into_owned());
                    } else {
                        status_file = Some(PathBuf::from(value));
                    }
                }
                _ => return Err(UsageError::Unexpected(arg)),
            }
        }
        let status_file = status_file.ok_or(UsageError::NoStatusFile)?;
        let command: Vec<OsString> = args.collect();
        if command.first().is_none_or(|p| p.is_empty()) {
            return Err(UsageError::NoCommand);
        }
        Ok(SuperviseCommand { status_file, gpus, command })
    }
}

/// Why a supervisor could not record its job's end.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// `wait4` failed (it should not: the job is our only child).
    #[error("cannot wait for the job: {0}")]
    Wait(#[source] io::Error),
    /// The record could not be written.
    #[error("cannot write the exit record {path}: {source}")]
    Record {
        /// The record.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Starts the job, waits for it, writes its record; returns the record.
///
/// A job that cannot be started is recorded as a shell would report it
/// ([`EXIT_NOT_FOUND`], [`EXIT_CANNOT_EXECUTE`]), with the reason on stderr
/// (the job's `stderr.log`).
pub fn supervise(cmd: &SuperviseCommand) -> Result<ExitRecord, SuperviseError> {
    let mut job = std::process::Command::new(&cmd.command[0]);
    job.args(&cmd.command[1..]);
    if let Some(gpus) = &cmd.gpus {
        job.env("CUDA_VISIBLE_DEVICES", gpus);
    }
    let record = match job.spawn() {
        Ok(child) => wait(child.id() as libc::pid_t)?,
        Err(e) => {
            let program = cmd.command[0].to_string_lossy();
            eprintln!("cosmos {SUBCOMMAND}: cannot start `{program}`: {e}");
            let code = if e.kind() == io::ErrorKind::NotFound { EXIT_NOT_FOUND } else { EXIT_CANNOT_EXECUTE };
            ExitRecord { code: Some(code), ended_unix_ms: Some(crate::runtime::unix_ms()), ..ExitRecord::default() }
        }
    };
    write_record(&cmd.status_file, &record)
        .map_err(|source| SuperviseError::Record { path: cmd.status_file.clone(), source })?;
    Ok(record)
}

/// Reaps `pid` with its resource usage.
fn wait(pid: libc::pid_t) -> Result<ExitRecord, SuperviseError> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data, filled in by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child, with valid out-pointers.
        if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(SuperviseError::Wait(e));
        }
    }
    let ms = |t: libc::timeval| (t.tv_sec as u64) * 1000 + (t.tv_usec as u64) / 1000;
    Ok(ExitRecord {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        // Linux reports ru_maxrss in KiB.
        max_rss_kib: Some(usage.ru_maxrss as u64),
        user_cpu_ms: Some(ms(usage.ru_utime)),
        sys_cpu_ms: Some(ms(usage.ru_stime)),
        ended_unix_ms: Some(crate::runtime::unix_ms()),
    })
}

extern "C" fn outlive(_: libc::c_int) {}

/// The supervisor process: `cosmos job-supervise --status-file PATH [--gpus LIST] -- PROGRAM [ARGS...]`.
/// Returns its exit code, for when it does not end itself (see the module).
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    // First: a stop that comes before the handlers are in place would end the
    // supervisor unrecorded (the agent then reports the attempt as stopped anyway).
    for sig in OUTLIVED_SIGNALS {
        // SAFETY: installs a handler that does nothing; SA_RESTART keeps interrupted calls going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = outlive as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    close_inherited_fds();
    let cmd = match SuperviseCommand::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cosmos {SUBCOMMAND}: {e}");
            return EXIT_USAGE;
        }
    };
    let code = match supervise(&cmd) {
        Ok(record) => record.code.unwrap_or_else(|| 128 + record.signal.unwrap_or(0)),
        Err(e) => {
            // No record: the agent reports the attempt lost, and this says why.
            eprintln!("cosmos {SUBCOMMAND}: {e}");
            1
        }
    };
    // SAFETY: getpgrp and getpid cannot fail.
    let leads_group = unsafe { libc::getpgrp() == libc::getpid() };
    if leads_group {
        // Only a group of our own (as the agent starts us): run by hand from a
        // shell, the group would be the shell's.
        // SAFETY: signals our own process group.
        unsafe { libc::killpg(0, libc::SIGKILL) };
    }
    code
}

/// Closes every descriptor but the standard three: whatever the agent's
/// process held without close-on-exec (a socket, a lock) must not live on in
/// a supervisor that outlives it, nor reach the job.
fn close_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<libc::c_int> =
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|&fd| fd > 2).collect();
    for fd in fds {
        // SAFETY: nothing in this process uses these descriptors (the listing's own is already closed: EBADF).
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(dir: &Path, script: &str) -> SuperviseCommand {
        SuperviseCommand {
            status_file: dir.join("exit.json"),
            gpus: Some("3,1".into()),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        }
    }

    #[test]
    fn a_written_record_reads_back_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        let record = ExitRecord {
            code: Some(3),
            signal: None,
            max_rss_kib: Some(2048),
            user_cpu_ms: Some(12),
            sys_cpu_ms: Some(4),
            ended_unix_ms: Some(1_700_000_000_000),
        };
        write_record(&path, &record).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(record.clone()));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["exit.json"]);

        let replaced = ExitRecord { code: None, signal: Some(libc::SIGTERM), ..record };
        write_record(&path, &replaced).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(replaced));
    }

    #[test]
    fn a_write_that_fails_leaves_the_previous_record_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        let old = ExitRecord { code: Some(0), ..ExitRecord::default() };
        write_record(&path, &old).unwrap();
        // The temporary file cannot be created: the write fails before touching the record.
        std::fs::create_dir(dir.path().join(format!("exit.json{TMP_SUFFIX}"))).unwrap();
        assert!(write_record(&path, &ExitRecord { code: Some(9), ..ExitRecord::default() }).is_err());
        assert_eq!(read_record(&path).unwrap(), Some(old));
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
    fn the_command_line_round_trips_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = cmd(dir.path(), "exit 0");
        assert_eq!(SuperviseCommand::parse(c.to_args()).unwrap(), c);
        let parse = |args: &[&str]| SuperviseCommand::parse(args.iter().map(OsString::from));
        assert_eq!(parse(&["--", "true"]), Err(UsageError::NoStatusFile));
        assert_eq!(parse(&["--status-file", "x", "--"]), Err(UsageError::NoCommand));
        assert_eq!(parse(&["--status-file", "x", "true"]), Err(UsageError::Unexpected("true".into())));
        assert_eq!(parse(&["--status-file"]), Err(UsageError::MissingValue("--status-file".into())));
    }

    #[test]
    fn the_record_holds_the_exit_code_and_usage_and_the_job_gets_its_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let gpus = dir.path().join("gpus.txt");
        let c = cmd(dir.path(), &format!("echo \"$CUDA_VISIBLE_DEVICES\" > {}; exit 3", gpus.display()));
        let record = supervise(&c).unwrap();
        assert_eq!((record.code, record.signal), (Some(3), None));
        assert!(record.max_rss_kib.is_some_and(|k| k > 0), "{record:?}");
        assert!(record.user_cpu_ms.is_some() && record.sys_cpu_ms.is_some() && record.ended_unix_ms.is_some());
        assert_eq!(read_record(&c.status_file).unwrap(), Some(record));
        assert_eq!(std::fs::read_to_string(&gpus).unwrap(), "3,1\n");
    }

    #[test]
    fn a_job_ended_by_a_signal_is_recorded_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let record = supervise(&cmd(dir.path(), "kill -TERM $$")).unwrap();
        assert_eq!((record.code, record.signal), (None, Some(libc::SIGTERM)));
    }

    #[test]
    fn a_program_that_does_not_exist_is_recorded_as_a_shell_would() {
        let dir = tempfile::tempdir().unwrap();
        let c = SuperviseCommand { command: vec!["/nonexistent/cosmos-no-such-program".into()], ..cmd(dir.path(), "") };
        assert_eq!(supervise(&c).unwrap().code, Some(EXIT_NOT_FOUND));
        assert_eq!(read_record(&c.status_file).unwrap().unwrap().code, Some(EXIT_NOT_FOUND));
    }
}
