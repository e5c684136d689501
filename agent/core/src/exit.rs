//! The exit-code policy, in one place: what an attempt's exit status (and what
//! it wrote on stderr) means for its job. Success only with every required
//! output; a cancel or a fence is a cancel; a timeout, the OOM killer or a
//! signal is worth retrying; sysexits' usage and configuration codes, the
//! shell's "cannot execute"/"not found" and a job's own `terminal_exit_codes`
//! are not (and for torchrun, the worker it blames decides, not its own 1).

use crate::core::ExitStatus;
use crate::core::StopReason;
use cosmos_proto::AttemptOutcome;
use cosmos_proto::spec::ArtifactRef;

/// Exit codes every job counts as "the command is wrong or missing" (sysexits, and the shell's 126/127).
pub fn is_terminal_exit(code: i32) -> bool {
    (64..=78).contains(&code) || code == 126 || code == 127
}

/// Longest line of an attempt's stderr quoted in a failure message.
pub const QUOTED_LINE_BYTES_MAX: usize = 1024;
/// Most lines of an attempt's stderr quoted in a failure message: a Python
/// traceback's last frames and its exception.
pub const QUOTED_LINES_MAX: usize = 5;
/// Most bytes of those lines together.
pub const QUOTED_BYTES_MAX: usize = 2048;

/// What judging an attempt's exit needs to know of it.
#[derive(Debug, Default)]
pub struct ExitContext<'a> {
    /// Outputs a clean exit must have written.
    pub required: &'a [String],
    /// The job's own terminal exit codes.
    pub terminal_exit_codes: &'a [i32],
    /// The command's last lines on stderr, oldest first, quoted in a failure (see [`error_tail`]).
    pub error_tail: Vec<String>,
    /// The exit code of the worker torchrun blamed, when the command was torchrun and a worker failed.
    pub torchrun_root_cause: Option<i32>,
}

/// The line torchrun prints before the worker it blames for a failure.
const TORCHRUN_ROOT_CAUSE: &str = "Root Cause (first observed failure):";
/// The exception torchrun raises (and exits 1 with) when a worker fails.
const TORCHRUN_CHILD_FAILED: &str = "ChildFailedError";

/// What torchrun's failure report in `stderr` says: the blamed worker's exit
/// code and the lines the worker itself last wrote before torchrun's report
/// (as [`error_tail`] gives them).
///
/// torchrun exits 1 whenever a worker fails, whatever the worker's code, and
/// reports it as `  exitcode  : 2 (pid: 123)` under [`TORCHRUN_ROOT_CAUSE`]
/// (torch/distributed/elastic/multiprocessing/errors): that code is the one
/// that says whether the failure is worth retrying.
pub fn torchrun_failure(stderr: &str) -> Option<(i32, Vec<String>)> {
    let report = stderr.rfind(TORCHRUN_ROOT_CAUSE)?;
    let code = stderr[report..]
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("exitcode"))
        .and_then(|rest| rest.trim_start().strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())?;
    // The worker's own words come before torchrun's traceback and its log lines.
    let before = stderr[..report].rfind(TORCHRUN_CHILD_FAILED).map_or(report, |at| at);
    let before = stderr[..before].rfind("Traceback (most recent call last):").unwrap_or(before);
    Some((code, error_tail(&stderr[..before], |l| l.contains("torch/distributed/"))))
}

/// The last lines of `stderr` as a terminal shows them, oldest first: a
/// line's `\r` redraws (a progress bar's) leave its last text only; blank
/// lines and those `skip` rejects are left out. At most [`QUOTED_LINES_MAX`]
/// lines and [`QUOTED_BYTES_MAX`] bytes, each line cut to [`QUOTED_LINE_BYTES_MAX`];
/// the last line is always kept.
pub fn error_tail(stderr: &str, skip: impl Fn(&str) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut bytes = 0;
    for line in stderr.split('\n').rev() {
        let shown = line.rsplit('\r').map(str::trim_end).find(|l| !l.trim().is_empty()).unwrap_or("");
        if shown.trim().is_empty() || skip(shown) {
            continue;
        }
        let line = quoted(shown);
        bytes += line.len();
        if !lines.is_empty() && (bytes > QUOTED_BYTES_MAX || lines.len() == QUOTED_LINES_MAX) {
            break;
        }
        lines.push(line);
    }
    lines.reverse();
    lines
}

/// `line`, cut to [`QUOTED_LINE_BYTES_MAX`] at a character boundary.
pub fn quoted(line: &str) -> String {
    let mut cut = line.len().min(QUOTED_LINE_BYTES_MAX);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    line[..cut].to_string()
}

/// What an attempt's exit means: its outcome, retryable or terminal.
pub fn outcome_of(
    status: &ExitStatus,
    stop: Option<(StopReason, u64)>,
    outputs: Vec<ArtifactRef>,
    att: &ExitContext<'_>,
) -> AttemptOutcome {
    let required = att.required;
    match stop {
        Some((StopReason::Cancel | StopReason::Fenced, _)) => return AttemptOutcome::Cancelled,
        Some((StopReason::Timeout, timeout_ms)) => {
            return AttemptOutcome::Failed {
                exit_code: status.code,
                reason: format!(
                    "timed out after {timeout_ms} ms and was stopped; raise `timeout_s` if it needs longer"
                ),
                retry: cosmos_proto::Retry::Retryable,
            };
        }
        None => {}
    }
    if status.oom_killed {
        return AttemptOutcome::Failed {
            exit_code: status.code,
            reason: "killed by the out-of-memory killer; ask for fewer parallel steps or a host with more memory"
                .into(),
            retry: cosmos_proto::Retry::Retryable,
        };
    }
    match (status.code, status.signal) {
        (Some(0), _) => {
            let missing: Vec<&String> = required.iter().filter(|p| !outputs.iter().any(|o| &o.path == *p)).collect();
            if missing.is_empty() {
                AttemptOutcome::Succeeded { outputs }
            } else {
                AttemptOutcome::Failed {
                    exit_code: Some(0),
                    reason: format!("exited 0 but did not write required output {missing:?}"),
                    retry: cosmos_proto::Retry::Terminal,
                }
            }
        }
        (Some(code), _) => {
            let worker = att.torchrun_root_cause;
            let terminal = is_terminal_exit(code)
                || att.terminal_exit_codes.contains(&code)
                || worker.is_some_and(|w| att.terminal_exit_codes.contains(&w));
            let how = match worker {
                Some(w) => format!("exited with code {code} (torchrun: the worker it blames exited with code {w})"),
                None => format!("exited with code {code}"),
            };
            let mut reason = if terminal {
                format!("{how}: the command is wrong or missing, so it is not retried; fix it and resubmit")
            } else {
                format!("{how}; see its logs")
            };
            // The first line says what happened and ends with the command's last word on it
            // (tables show that line); the lines under it quote the end of its stderr.
            if let Some(last) = att.error_tail.last() {
                reason.push_str(&format!("; its last error output: {}", last.trim()));
            }
            if att.error_tail.len() > 1 {
                reason.push_str(&format!("\nthe last {} lines of its stderr:", att.error_tail.len()));
                for line in &att.error_tail {
                    reason.push_str("\n  ");
                    reason.push_str(line);
                }
            }
            AttemptOutcome::Failed { exit_code: Some(code), reason, retry: cosmos_proto::Retry::when(!terminal) }
        }
        (None, Some(sig)) => AttemptOutcome::Failed {
            exit_code: None,
            reason: format!("killed by signal {sig}"),
            retry: cosmos_proto::Retry::Retryable,
        },
        (None, None) => AttemptOutcome::Lost {
            reason: "no exit status was recorded: its container vanished, or its job supervisor (process runtime) \
                     was killed; see the end of its stderr"
                .into(),
        },
    }
}
