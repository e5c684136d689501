//! The flag language of `cosmos-testjob`, the stand-in job program of the
//! runtime contract tests, and the exact text it prints.
//!
//! The binary (`src/main.rs`) runs it for real (as a process, or in the
//! `cosmos-testjob:dev` image); the agent's simulated runtime interprets the
//! same flags with timers. Both print through the functions below, so their
//! output is byte for byte the same.
//!
//! What a run does, in this order, whatever the order of the flags:
//!
//! 1. with `--ignore-term`, starts ignoring `SIGTERM` (saying so on stderr when one arrives);
//! 2. prints [`STARTED`] on stderr;
//! 3. prints each `--print-env VAR` on stdout ([`env_line`]);
//! 4. `--steps N`: N times, waits `--step-ms` then prints [`step_line`] on stdout;
//! 5. `--stdout-bytes N`: prints N bytes of `a` on stdout, no newline;
//! 6. `--sleep-ms MS`: waits;
//! 7. writes each `--write PATH[=CONTENT]`, relative to the working directory;
//! 8. prints [`exiting_line`] on stderr and exits with `--exit-code` (default 0).
//!
//! Without `--ignore-term`, `SIGTERM` ends it at once (killed by the signal).
//! A bad command line prints [`usage_error`] on stderr and exits [`EXIT_USAGE`].

use std::fmt;

/// Exit code for a bad command line (sysexits' `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// Exit code when an output file cannot be written (sysexits' `EX_CANTCREAT`).
pub const EXIT_CANTCREAT: i32 = 73;
/// Printed on stderr once signals are set up: a test may signal the job after seeing it.
pub const STARTED: &str = "testjob: started\n";
/// Printed on stderr for each `SIGTERM` received under `--ignore-term`.
pub const IGNORING_TERM: &str = "testjob: ignoring SIGTERM\n";
/// Content of a `--write PATH` without `=CONTENT`.
pub const DEFAULT_CONTENT: &str = "written by cosmos-testjob\n";
/// The usage text.
pub const USAGE: &str = "\
usage: cosmos-testjob [OPTIONS]
  --steps N              print `step i/N` on stdout N times (tqdm-style progress)
  --step-ms MS           wait MS milliseconds before each step (default 100)
  --stdout-bytes N       then print N bytes of `a` on stdout
  --sleep-ms MS          then wait MS milliseconds
  --write PATH[=CONTENT] then write a file, relative to the working directory (repeatable)
  --print-env VAR        print `VAR=value` on stdout first (repeatable)
  --exit-code C          exit with code C (0-255, default 0)
  --ignore-term          ignore SIGTERM (only a kill ends the job early)
";

/// A parsed command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// Progress steps.
    pub steps: u32,
    /// Wait before each step.
    pub step_ms: u64,
    /// Bytes of filler on stdout after the steps.
    pub stdout_bytes: u64,
    /// Wait after the steps.
    pub sleep_ms: u64,
    /// Files to write: path relative to the working directory, content.
    pub writes: Vec<(String, String)>,
    /// Variables to print.
    pub print_env: Vec<String>,
    /// Exit code.
    pub exit_code: i32,
    /// Ignore `SIGTERM`.
    pub ignore_term: bool,
}

/// What is wrong with a command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Largest `--steps`, `--step-ms`, `--sleep-ms`, `--stdout-bytes`: keeps a typo from running for days.
const NUMBER_MAX: u64 = 1 << 32;

impl Args {
    /// Parses the arguments after the program name.
    pub fn parse<I, S>(args: I) -> Result<Args, UsageError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Args { step_ms: 100, ..Args::default() };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let arg = arg.as_ref();
            // `--flag=value` and `--flag value` both work.
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg, None),
            };
            let mut value = |what: &str| -> Result<String, UsageError> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => it
                        .next()
                        .map(|v| v.as_ref().to_string())
                        .ok_or_else(|| UsageError(format!("{flag} needs a value ({what})"))),
                }
            };
            match flag {
                "--steps" => out.steps = number(flag, &value("a count")?)? as u32,
                "--step-ms" => out.step_ms = number(flag, &value("milliseconds")?)?,
                "--stdout-bytes" => out.stdout_bytes = number(flag, &value("a byte count")?)?,
                "--sleep-ms" => out.sleep_ms = number(flag, &value("milliseconds")?)?,
                "--exit-code" => {
                    let v = value("0-255")?;
                    out.exit_code = v
                        .parse::<u8>()
                        .map_err(|_| UsageError(format!("--exit-code `{v}` must be a whole number from 0 to 255")))?
                        .into();
                }
                "--write" => {
                    let v = value("PATH[=CONTENT]")?;
                    let (path, content) = match v.split_once('=') {
                        Some((p, c)) => (p.to_string(), format!("{c}\n")),
                        None => (v.clone(), DEFAULT_CONTENT.to_string()),
                    };
                    if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
                        return Err(UsageError(format!(
                            "--write `{path}` must be a relative path inside the working directory"
                        )));
                    }
                    out.writes.push((path, content));
                }
                "--print-env" => {
                    let v = value("a variable name")?;
                    if v.is_empty() || v.contains('=') {
                        return Err(UsageError(format!("--print-env `{v}` is not a variable name")));
                    }
                    out.print_env.push(v);
                }
                "--ignore-term" if inline.is_none() => out.ignore_term = true,
                "--help" | "-h" => return Err(UsageError("help requested".into())),
                other => return Err(UsageError(format!("unknown option `{other}`"))),
            }
        }
        Ok(out)
    }
}

fn number(flag: &str, v: &str) -> Result<u64, UsageError> {
    v.parse::<u64>()
        .ok()
        .filter(|n| *n <= NUMBER_MAX)
        .ok_or_else(|| UsageError(format!("{flag} `{v}` must be a whole number from 0 to {NUMBER_MAX}")))
}

/// What a bad command line prints on stderr.
pub fn usage_error(e: &UsageError) -> String {
    format!("cosmos-testjob: {e}\n{USAGE}")
}

/// One progress line.
pub fn step_line(step: u32, total: u32) -> String {
    format!("step {step}/{total}\n")
}

/// One `--print-env` line: `VAR=value`, or `VAR is unset`.
pub fn env_line(var: &str, value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{var}={v}\n"),
        None => format!("{var} is unset\n"),
    }
}

/// The last line, on stderr.
pub fn exiting_line(code: i32) -> String {
    format!("testjob: exiting with code {code}\n")
}

/// What a failed `--write` prints on stderr before exiting [`EXIT_CANTCREAT`].
pub fn write_failed_line(path: &str, error: &str) -> String {
    format!("testjob: cannot write {path}: {error}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_in_both_forms() {
        let a = Args::parse([
            "--steps",
            "3",
            "--step-ms=20",
            "--exit-code",
            "7",
            "--write",
            "out/a.txt=hi",
            "--write=b.txt",
            "--print-env",
            "CUDA_VISIBLE_DEVICES",
            "--ignore-term",
            "--sleep-ms",
            "5",
            "--stdout-bytes",
            "10",
        ])
        .unwrap();
        assert_eq!(
            a,
            Args {
                steps: 3,
                step_ms: 20,
                stdout_bytes: 10,
                sleep_ms: 5,
                writes: vec![("out/a.txt".into(), "hi\n".into()), ("b.txt".into(), DEFAULT_CONTENT.into())],
                print_env: vec!["CUDA_VISIBLE_DEVICES".into()],
                exit_code: 7,
                ignore_term: true,
            }
        );
        assert_eq!(Args::parse::<_, &str>([]).unwrap().step_ms, 100);
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        for (args, says) in [
            (&["--bogus"][..], "unknown option `--bogus`"),
            (&["--steps"], "--steps needs a value"),
            (&["--steps", "x"], "--steps `x`"),
            (&["--exit-code", "300"], "from 0 to 255"),
            (&["--write", "/etc/passwd"], "relative path"),
            (&["--write", "../x"], "relative path"),
            (&["--print-env", "A=B"], "not a variable name"),
            (&["--ignore-term=yes"], "unknown option"),
        ] {
            let e = Args::parse(args).expect_err(says);
            assert!(e.0.contains(says), "{args:?}: {e}");
            assert!(usage_error(&e).contains("usage: cosmos-testjob"));
        }
    }
}
