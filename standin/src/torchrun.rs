//! `torchrun`'s own flags, then dispatch to the script by path.

use crate::{DEFAULT_CHECKOUT, Env, Failure, Io, TRANSFER_SCRIPT, UPSAMPLER_SCRIPT};

/// Exit code of an argparse error and of `python missing.py`.
pub(crate) const EXIT_USAGE: i32 = 2;
/// Exit code of an uncaught Python exception.
pub(crate) const EXIT_EXCEPTION: i32 = 1;

const USAGE: &str = "usage: torchrun [-h] [--nnodes NNODES] [--nproc_per_node NPROC_PER_NODE] [--node_rank NODE_RANK] \
[--master_addr MASTER_ADDR] [--master_port MASTER_PORT] [--standalone] training_script ...";

/// What [`parse`] answers for `-h`: the usage goes to stdout with exit 0, as argparse does.
const HELP: &str = "-h";

/// torchrun's launch settings that the stand-in reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    /// Processes on this node: the number of GPUs the script may use.
    pub nproc_per_node: i64,
    /// The script path as given.
    pub script: String,
    /// The script's arguments.
    pub script_args: Vec<String>,
}

/// Runs `torchrun` with `args` (after argv\[0\]).
///
/// As the real torchrun does (torch/distributed/run.py, whose `main` is
/// wrapped in `@record`): its own usage errors exit 2, but a worker that
/// fails, whatever its code, makes torchrun raise `ChildFailedError`, print
/// the failure report naming the worker's exit code, and exit 1.
pub(crate) fn main(args: &[String], env: &Env, io: &mut Io<'_>) -> i32 {
    let launch = match parse(args, env) {
        Ok(l) => l,
        Err(msg) if msg == HELP => {
            let _ = writeln!(io.out, "{USAGE}");
            return 0;
        }
        Err(msg) => {
            let _ = write!(io.err, "{USAGE}\ntorchrun: error: {msg}\n");
            return EXIT_USAGE;
        }
    };
    match worker(&launch, env, io) {
        0 => 0,
        code => {
            child_failed(&launch.script, code, io);
            EXIT_EXCEPTION
        }
    }
}

/// What torchrun writes on stderr when its worker (rank 0) exits with `code`.
fn child_failed(script: &str, code: i32, io: &mut Io<'_>) {
    let pid = std::process::id();
    let _ = write!(
        io.err,
        "E0000 00:00:00.000000 {pid} torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: {code}) local_rank: 0 (pid: {pid}) of binary: /usr/bin/python
Traceback (most recent call last):
  File \"/usr/local/bin/torchrun\", line 8, in <module>
    sys.exit(main())
  File \"/usr/local/lib/python3.10/dist-packages/torch/distributed/launcher/api.py\", line 263, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
{script} FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 1970-01-01_00:00:00
  host      : cosmos-standin
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: {pid})
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"
    );
}

/// Runs the script as torchrun's worker would: its exit code.
fn worker(launch: &Launch, env: &Env, io: &mut Io<'_>) -> i32 {
    let root = env.checkout.as_deref().unwrap_or(DEFAULT_CHECKOUT).trim_end_matches('/');
    let is = |script: &str| launch.script == script || launch.script == format!("{root}/{script}");
    let result = if is(TRANSFER_SCRIPT) {
        crate::transfer::main(launch, env, io)
    } else if is(UPSAMPLER_SCRIPT) {
        crate::upsampler::main(launch, env, io)
    } else {
        let _ = writeln!(io.err, "python: can't open file '{}': [Errno 2] No such file or directory", launch.script);
        return EXIT_USAGE;
    };
    match result {
        Ok(()) => 0,
        Err(Failure::Help(text)) => {
            let _ = io.out.write_all(text.as_bytes());
            0
        }
        Err(Failure::Usage(text)) => {
            let _ = io.err.write_all(text.as_bytes());
            EXIT_USAGE
        }
        Err(Failure::Python { kind, msg }) => {
            let _ = write!(
                io.err,
                "Traceback (most recent call last):\n  File \"{}\", line 1, in <module>\n    main()\n{kind}: {msg}\n",
                launch.script
            );
            EXIT_EXCEPTION
        }
    }
}

/// Parses torchrun's flags up to the script; the rest belongs to the script.
pub(crate) fn parse(args: &[String], env: &Env) -> Result<Launch, String> {
    let mut nproc: Option<String> = None;
    let mut i = 0;
    while i < args.len() && args[i].starts_with('-') {
        let arg = &args[i];
        i += 1;
        if arg == "-h" || arg == "--help" {
            return Err(HELP.into());
        }
        let (raw_name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        // torchrun spells every option both with `_` and with `-`.
        let name = raw_name.trim_start_matches('-').replace('-', "_");
        if name == "standalone" {
            if inline.is_some() {
                return Err(format!(
                    "argument --standalone: ignored explicit argument '{}'",
                    inline.unwrap_or_default()
                ));
            }
            continue;
        }
        if !["nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port"].contains(&name.as_str()) {
            return Err(format!("unrecognized arguments: {arg}"));
        }
        let value = match inline {
            Some(v) => v,
            None if i < args.len() => {
                i += 1;
                args[i - 1].clone()
            }
            None => return Err(format!("argument --{name}: expected one argument")),
        };
        match name.as_str() {
            "nproc_per_node" => nproc = Some(value),
            "nnodes" if value != "1" && value != "1:1" => {
                return Err(format!(
                    "argument --nnodes: '{value}': the Cosmos stand-in runs on a single node only; use --nnodes=1"
                ));
            }
            "node_rank" if value != "0" => {
                return Err(format!(
                    "argument --node_rank: '{value}': the Cosmos stand-in runs on a single node only; use --node_rank=0"
                ));
            }
            "master_port" if !value.parse::<u16>().is_ok_and(|p| p > 0) => {
                return Err(format!("argument --master_port: invalid port: '{value}'"));
            }
            _ => {}
        }
    }
    let Some(script) = args.get(i) else {
        return Err("the following arguments are required: training_script, training_script_args".into());
    };
    let nproc_per_node = match nproc.as_deref() {
        None => 1,
        // torchrun's `gpu`/`auto` mean "one process per visible GPU".
        Some("gpu" | "auto") => visible_gpus(env).len().max(1) as i64,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(format!("argument --nproc_per_node: invalid value: '{v}' (want a positive integer)")),
        },
    };
    Ok(Launch { nproc_per_node, script: script.clone(), script_args: args[i + 1..].to_vec() })
}

/// The device entries of `CUDA_VISIBLE_DEVICES`.
pub(crate) fn visible_gpus(env: &Env) -> Vec<String> {
    env.cuda_visible_devices
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{one_gpu, run_args};

    fn p(args: &[&str]) -> Result<Launch, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &one_gpu())
    }

    #[test]
    fn flags_in_both_forms_then_the_script_and_its_args() {
        let l = p(&[
            "--nproc_per_node=2",
            "--nnodes",
            "1",
            "--node-rank=0",
            "--master_port",
            "12341",
            "--standalone",
            "x.py",
            "--nnodes=5",
        ])
        .unwrap();
        assert_eq!(l.nproc_per_node, 2);
        assert_eq!(l.script, "x.py");
        assert_eq!(l.script_args, ["--nnodes=5"]);
        assert_eq!(p(&["x.py"]).unwrap().nproc_per_node, 1);
        assert_eq!(p(&["--nproc_per_node", "gpu", "x.py"]).unwrap().nproc_per_node, 1);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        assert!(p(&["--nnodes=2", "x.py"]).unwrap_err().contains("single node"));
        assert!(p(&["--node_rank=1", "x.py"]).unwrap_err().contains("single node"));
        assert_eq!(p(&["--bogus", "x.py"]).unwrap_err(), "unrecognized arguments: --bogus");
        assert!(p(&["--nproc_per_node=0", "x.py"]).unwrap_err().contains("--nproc_per_node"));
        assert!(p(&["--nproc_per_node"]).unwrap_err().contains("expected one argument"));
        assert!(p(&[]).unwrap_err().contains("training_script"));
        let (code, _, err) = run_args(&["--bogus", "x.py"], &one_gpu());
        assert_eq!(code, 2);
        assert!(
            err.starts_with("usage: torchrun ") && err.contains("torchrun: error: unrecognized arguments: --bogus")
        );
    }

    #[test]
    fn help_is_the_usage_on_stdout() {
        let (code, out, err) = run_args(&["-h"], &one_gpu());
        assert_eq!((code, err.as_str()), (0, ""));
        assert!(out.starts_with("usage: torchrun "));
    }

    #[test]
    fn unknown_scripts_cannot_be_opened() {
        let (code, _, err) = run_args(&["/workspace/train.py"], &one_gpu());
        assert_eq!(code, 2);
        assert_eq!(err, "python: can't open file '/workspace/train.py': [Errno 2] No such file or directory\n");
    }

    #[test]
    fn a_failed_worker_makes_torchrun_exit_1_with_a_report_naming_its_code() {
        let (code, _, err) = crate::testutil::run_raw(&["/workspace/train.py"], &one_gpu());
        assert_eq!(code, EXIT_EXCEPTION, "torchrun raises ChildFailedError whatever the worker's code");
        assert!(err.starts_with("python: can't open file '/workspace/train.py'"), "{err}");
        assert!(err.contains("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"), "{err}");
        let report = &err[err.find("Root Cause (first observed failure):").expect("the report")..];
        assert!(report.contains("\n  exitcode  : 2 (pid: "), "{report}");
        // torchrun's own usage errors are argparse's: exit 2, no report.
        let (code, _, err) = crate::testutil::run_raw(&["--bogus", "x.py"], &one_gpu());
        assert_eq!(code, EXIT_USAGE);
        assert!(!err.contains("ChildFailedError"));
    }

    #[test]
    fn visible_gpus_skip_blanks() {
        let env = Env { cuda_visible_devices: Some(" 0, 3,,".into()), ..Env::default() };
        assert_eq!(visible_gpus(&env), ["0", "3"]);
    }
}
