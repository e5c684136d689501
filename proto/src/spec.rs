//! The generic job spec every job compiles into, and its validation.
//!
//! A spec is what the controller schedules and what an agent runs. It names
//! no host paths: mounts refer to volumes the agent's own configuration maps
//! to directories, and artifact paths are relative to the attempt's work
//! directory, so a spec cannot reach outside the roots an operator allowed.

use crate::ids::Sha256;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest job name accepted.
pub const NAME_BYTES_MAX: usize = 256;
/// Most argv entries in a command.
pub const COMMAND_ARGS_MAX: usize = 4096;
/// Most bytes in all of argv together.
pub const COMMAND_BYTES_MAX: usize = 256 * 1024;
/// Most environment variables.
pub const ENV_VARS_MAX: usize = 1024;
/// Most bytes in one environment value.
pub const ENV_VALUE_BYTES_MAX: usize = 64 * 1024;
/// Most mounts, inputs, outputs or labels (each).
pub const LIST_ITEMS_MAX: usize = 1024;
/// Longest relative path in a mount target or artifact.
pub const PATH_BYTES_MAX: usize = 1024;
/// Most GPUs one job may ask for (one host).
pub const GPUS_MAX: u32 = 64;
/// Most attempts a job may be given.
pub const ATTEMPTS_MAX: u32 = 100;
/// Longest timeout: one week.
pub const TIMEOUT_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// Default timeout when a submission names none: one day.
pub const DEFAULT_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Default attempts when a submission names none.
pub const ATTEMPTS_MAX_DEFAULT: u32 = 3;
/// Where a container sees its attempt's work directory (inputs, outputs, logs).
pub const CONTAINER_WORK_DIR: &str = "/work";
/// The file in an attempt's work directory that holds the job's standard
/// output, whatever the runtime, complete once the job has exited: a job
/// whose result is what it prints lists it among its outputs to have it delivered.
pub const STDOUT_LOG: &str = "stdout.log";
/// The same for its standard error.
pub const STDERR_LOG: &str = "stderr.log";

/// Everything needed to run one job anywhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Human name, shown in listings; need not be unique.
    pub name: String,
    /// Container image to run the command in; `None` runs the command directly
    /// (the process runtime).
    pub image: Option<String>,
    /// Program and arguments, passed as argv, never through a shell.
    pub command: Vec<String>,
    /// Extra environment; the agent adds `CUDA_VISIBLE_DEVICES` itself.
    pub env: BTreeMap<String, String>,
    /// Volumes from the agent's configuration to mount into the container.
    pub mounts: Vec<Mount>,
    /// Content-addressed files placed in the work directory before start.
    pub inputs: Vec<InputArtifact>,
    /// Files collected from the work directory after a successful exit.
    pub outputs: Vec<OutputArtifact>,
    /// GPUs needed, all on one host.
    pub gpus: u32,
    /// Free VRAM each of those GPUs must have before the job is placed.
    pub min_free_vram_bytes: u64,
    /// Wall time one attempt may run before it is stopped and counted failed.
    pub timeout_ms: u64,
    /// Attempts in all, the first included (retry budget + 1).
    pub max_attempts: u32,
    /// Higher runs first; ties go by submission order.
    pub priority: i32,
    /// Shared-memory size for the container (`/dev/shm`); `None` keeps the runtime's default.
    pub shm_bytes: Option<u64>,
    /// Share the host's IPC namespace (what `--ipc=host` does), as NCCL often wants.
    pub ipc_host: bool,
    /// Directory the container's command runs in (absolute, images only); `None`:
    /// the attempt's work directory, [`CONTAINER_WORK_DIR`].
    pub workdir: Option<String>,
    /// Free-form labels, carried to the container and shown in listings.
    pub labels: BTreeMap<String, String>,
    /// Exit codes that mean the command itself is wrong (a usage error, say),
    /// so another attempt would fail the same way: not retried. They add to
    /// the codes every job counts so (64–78, 126, 127).
    #[serde(default)]
    pub terminal_exit_codes: Vec<i32>,
}

impl JobSpec {
    /// A spec that runs `command` with defaults for everything else.
    pub fn command<I, S>(name: &str, command: I) -> JobSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        JobSpec {
            name: name.to_string(),
            image: None,
            command: command.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            mounts: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            gpus: 1,
            min_free_vram_bytes: 0,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_attempts: ATTEMPTS_MAX_DEFAULT,
            priority: 0,
            shm_bytes: None,
            ipc_host: false,
            workdir: None,
            labels: BTreeMap::new(),
            terminal_exit_codes: Vec::new(),
        }
    }

    /// Checks every limit and confinement rule; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_len("name", &self.name, NAME_BYTES_MAX)?;
        // A name is printed in tables: a newline or an escape sequence in it could fake rows or drive the terminal.
        if self.name.chars().any(char::is_control) {
            return Err(SpecError::new(
                "name",
                "contains a control character (newline, tab, escape, NUL…): use printable characters only",
            ));
        }
        if let Some(image) = &self.image {
            if image.is_empty() || image.len() > NAME_BYTES_MAX || image.contains(char::is_whitespace) {
                return Err(SpecError::new("image", "must be a non-empty image reference without spaces"));
            }
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(SpecError::new("command", "must name a program: give at least one non-empty argv entry"));
        }
        if self.command.len() > COMMAND_ARGS_MAX {
            return Err(SpecError::new(
                "command",
                format!("has {} entries; at most {COMMAND_ARGS_MAX} are allowed", self.command.len()),
            ));
        }
        let argv_bytes: usize = self.command.iter().map(String::len).sum();
        if argv_bytes > COMMAND_BYTES_MAX {
            return Err(SpecError::new(
                "command",
                format!(
                    "is {argv_bytes} bytes; at most {COMMAND_BYTES_MAX} are allowed (pass large data as an input artifact)"
                ),
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::new("command", "contains a NUL byte"));
        }
        if self.env.len() > ENV_VARS_MAX {
            return Err(SpecError::new("env", format!("has {} variables; at most {ENV_VARS_MAX}", self.env.len())));
        }
        for (key, value) in &self.env {
            let valid_key = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_key {
                return Err(SpecError::new(
                    "env",
                    format!(
                        "key `{key}` is not a valid variable name (letters, digits, `_`, not starting with a digit)"
                    ),
                ));
            }
            if key == "CUDA_VISIBLE_DEVICES" || key == "NVIDIA_VISIBLE_DEVICES" {
                return Err(SpecError::new(
                    "env",
                    format!("`{key}` is set by the agent from the GPUs it assigns; remove it and use `gpus`"),
                ));
            }
            if value.len() > ENV_VALUE_BYTES_MAX || value.contains('\0') {
                return Err(SpecError::new(
                    "env",
                    format!("value of `{key}` is over {ENV_VALUE_BYTES_MAX} bytes or contains NUL"),
                ));
            }
        }
        check_count("mounts", self.mounts.len())?;
        for mount in &self.mounts {
            if mount.volume.is_empty()
                || !mount.volume.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(SpecError::new(
                    "mounts",
                    format!(
                        "volume `{}` must be the name of a volume in the agent's configuration ([A-Za-z0-9_-])",
                        mount.volume
                    ),
                ));
            }
            if !mount.target.starts_with('/')
                || mount.target.split('/').any(|p| p == "..")
                || mount.target.len() > PATH_BYTES_MAX
            {
                return Err(SpecError::new(
                    "mounts",
                    format!("target `{}` must be an absolute container path without `..`", mount.target),
                ));
            }
        }
        if let Some(dir) = &self.workdir {
            if self.image.is_none() {
                return Err(SpecError::new("workdir", "applies to container images only: set `image` or remove it"));
            }
            if !dir.starts_with('/') || dir.split('/').any(|p| p == "..") || dir.len() > PATH_BYTES_MAX {
                return Err(SpecError::new(
                    "workdir",
                    format!("`{dir}` must be an absolute container path without `..`"),
                ));
            }
        }
        check_count("inputs", self.inputs.len())?;
        for input in &self.inputs {
            check_relative_path("inputs", &input.path)?;
        }
        check_count("outputs", self.outputs.len())?;
        for output in &self.outputs {
            check_relative_path("outputs", &output.path)?;
        }
        check_count("terminal_exit_codes", self.terminal_exit_codes.len())?;
        if let Some(code) = self.terminal_exit_codes.iter().find(|c| !(1..=255).contains(*c)) {
            return Err(SpecError::new(
                "terminal_exit_codes",
                format!("has {code}; exit codes of a failure are 1 to 255"),
            ));
        }
        if self.gpus > GPUS_MAX {
            return Err(SpecError::new(
                "gpus",
                format!("is {}; one job runs on one host, at most {GPUS_MAX} GPUs", self.gpus),
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > TIMEOUT_MS_MAX {
            return Err(SpecError::new("timeout", format!("must be between 1 ms and {} s", TIMEOUT_MS_MAX / 1000)));
        }
        if self.max_attempts == 0 || self.max_attempts > ATTEMPTS_MAX {
            return Err(SpecError::new("max_attempts", format!("must be between 1 and {ATTEMPTS_MAX}")));
        }
        check_count("labels", self.labels.len())?;
        for (key, value) in &self.labels {
            check_len("labels", key, NAME_BYTES_MAX)?;
            check_len("labels", value, PATH_BYTES_MAX)?;
        }
        Ok(())
    }
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), SpecError> {
    if value.len() > max {
        return Err(SpecError::new(field, format!("is {} bytes; at most {max} are allowed", value.len())));
    }
    Ok(())
}

fn check_count(field: &'static str, count: usize) -> Result<(), SpecError> {
    if count > LIST_ITEMS_MAX {
        return Err(SpecError::new(field, format!("has {count} entries; at most {LIST_ITEMS_MAX} are allowed")));
    }
    Ok(())
}

/// Artifact paths live inside the attempt's work directory: relative, no `..`.
fn check_relative_path(field: &'static str, path: &str) -> Result<(), SpecError> {
    let confined = !path.is_empty()
        && !path.starts_with('/')
        && path.len() <= PATH_BYTES_MAX
        && !path.contains('\0')
        && path.split('/').all(|p| !p.is_empty() && p != ".." && p != ".");
    if !confined {
        return Err(SpecError::new(
            field,
            format!("path `{path}` must be relative to the work directory, without `..`, `.` or empty parts"),
        ));
    }
    Ok(())
}

/// A spec field broke a rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec: `{field}` {problem}")]
pub struct SpecError {
    /// The offending field, as named in submissions.
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub problem: String,
}

impl SpecError {
    fn new(field: &'static str, problem: impl Into<String>) -> SpecError {
        SpecError { field, problem: problem.into() }
    }
}

/// A volume from the agent's configuration, mounted into the job's container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Name of the volume in the agent's configuration (e.g. `checkpoints`).
    pub volume: String,
    /// Absolute path inside the container.
    pub target: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// A content-addressed input placed in the work directory before the job starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputArtifact {
    /// Digest of the content; the agent verifies it before use.
    pub sha256: Sha256,
    /// Size, so the agent can reserve space and report progress.
    pub size_bytes: u64,
    /// Where to put it, relative to the work directory.
    pub path: String,
}

/// A file the job is expected to produce, relative to the work directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputArtifact {
    /// Relative path of the file.
    pub path: String,
    /// A missing required output turns a zero exit into a failure.
    pub required: bool,
}

/// A produced output, reported when an attempt succeeds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Relative path in the work directory.
    pub path: String,
    /// Digest of the content.
    pub sha256: Sha256,
    /// Size of the content.
    pub size_bytes: u64,
}
