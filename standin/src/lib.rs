//! A stand-in for the Cosmos Transfer model container: a `torchrun` that
//! honours the command-line contract of `/work/shared/cosmos/TRANSFER_CONTRACT.md`
//! exactly, so `cosmos up`, the tests and the simulated-GPU path can run jobs
//! without the model's large GPUs.
//!
//! # What it runs
//!
//! [`run`] behaves as `torchrun [--nproc_per_node=N] [--nnodes=1] [--node_rank=0]
//! [--master_addr A] [--master_port P] [--standalone] SCRIPT ARGS…` on one node
//! and dispatches on the script path's suffix:
//!
//! - [`TRANSFER_SCRIPT`]: video → video transfer, 4K upscale and batch mode,
//!   held to cosmos-transfer1's `transfer.py` and `inference_utils.py`: its
//!   flags (`--blur_strength`/`--canny_threshold` with their choices among
//!   them) and defaults; the spec split as `load_controlnet_specs` splits it
//!   (objects only under [`VALID_HINT_KEYS`], else `ValueError: Invalid
//!   hint_key`; other top-level keys are arguments); a top-level key wins over
//!   the default unless the same `--flag` token is on the command line; the
//!   checks of `validate_controlnet_specs`; keys a control object carries
//!   beyond `control_weight`, `input_control` and `ckpt_path` ignored, as the
//!   script ignores them. Validation failures are Python-style tracebacks on
//!   stderr with exit 1; command-line errors are argparse-style with exit 2.
//!   `--num_gpus`, `--nproc_per_node` and the entries of `CUDA_VISIBLE_DEVICES`
//!   must agree.
//! - [`UPSAMPLER_SCRIPT`]: prompt enhancement as `upsampler_pipeline.py` does
//!   it: `--prompt TEXT --input_video PATH [--checkpoint_dir DIR]
//!   [--offload_prompt_upsampler]`, the result printed on stdout as
//!   `Upsampled prompt: <text>`; needs `VLLM_WORKER_MULTIPROC_METHOD=spawn` as vLLM does.
//! - anything else, or either script outside the checkout root
//!   ([`ENV_CHECKOUT`], `/workspace` by default; a relative path is taken
//!   from the checkout root, where the image's commands run), does not exist
//!   in the image: Python's `can't open file`, exit 2.
//!
//! Each diffusion step prints a tqdm line on stderr (`" 34%|███▍      | 12/35
//! [00:01<00:02, 10.00it/s]"` ending in `\r`, the last one in `\n`).
//!
//! # Environment
//!
//! - [`ENV_STEP_MS`]: milliseconds per diffusion step (default [`DEFAULT_STEP_MS`]).
//! - [`ENV_FAIL`]: when set, the run fails with exit 1 and this text after its first step.
//!
//! # Output files
//!
//! Every `.mp4` it writes has this layout (see [`parse_output`]):
//!
//! 1. the line [`OUTPUT_MAGIC`] (`COSMOS-STANDIN-OUTPUT v1\n`);
//! 2. a compact JSON object on one line, then `\n`. For a transfer or upscale
//!    output its keys are, in this order: `mode` (`"transfer"` | `"upscale"`),
//!    `prompt`, `negative_prompt`, `num_steps`, `guidance`, `sigma_max`, `seed`,
//!    `fps`, `num_gpus`, `blur_strength`, `canny_threshold` (the effective
//!    values: a key misplaced inside a control shows here as `medium`),
//!    `input_video_sha256` (hex SHA-256 of the input video's bytes, null when
//!    `input_video_path` is empty) and `controls`: control name →
//!    `{control_weight (a number, or "mask:<sha256>" for a .pt mask),
//!    input_control_sha256 (hex or null)}`, names in byte order. A control the model
//!    derives itself (depth or seg without `input_control`) is written as
//!    `<ctrl>_input_control.mp4` next to the output, with header
//!    `{"mode":"derived_control","control":<ctrl>,"input_video_sha256":…}`;
//! 3. [`OUTPUT_PAYLOAD_BYTES`] bytes of payload: SHA-256 in counter mode,
//!    block `i` = `sha256(h ‖ i as u64 little-endian)` where `h` is the SHA-256
//!    of the JSON line (without its `\n`).
//!
//! So the bytes are a function of the effective parameters and the input
//! bytes only: a test can tell which inputs reached which run.

mod argparse;
mod output;
mod progress;
mod torchrun;
mod transfer;
mod upsampler;

pub use output::{OUTPUT_MAGIC, OUTPUT_PAYLOAD_BYTES, parse_output};
pub use upsampler::upsample_prompt;

use std::ffi::OsString;
use std::io::Write;

/// The transfer entry point, relative to the checkout root inside the container.
pub const TRANSFER_SCRIPT: &str = "cosmos_transfer1/diffusion/inference/transfer.py";
/// The prompt upsampler entry point, relative to the checkout root.
pub const UPSAMPLER_SCRIPT: &str = "cosmos_transfer1/auxiliary/upsampler/inference/upsampler_pipeline.py";
/// The control signals this project's runs weight.
pub const CONTROLS: [&str; 4] = ["vis", "edge", "depth", "seg"];
/// Every control name the real loader accepts (`valid_hint_keys`).
pub const VALID_HINT_KEYS: [&str; 8] = transfer::VALID_HINT_KEYS;
/// The choices of `--blur_strength` and `--canny_threshold`.
pub const STRENGTHS: [&str; 5] = ["very_low", "low", "medium", "high", "very_high"];
/// Environment variable: milliseconds each diffusion step takes.
pub const ENV_STEP_MS: &str = "COSMOS_STANDIN_STEP_MS";
/// Environment variable: when set, fail after the first step with this message.
pub const ENV_FAIL: &str = "COSMOS_STANDIN_FAIL";
/// Environment variable: the checkout root the stand-in's "image" holds its scripts under.
pub const ENV_CHECKOUT: &str = "COSMOS_STANDIN_CHECKOUT";
/// The checkout root without [`ENV_CHECKOUT`], as in the model's image.
pub const DEFAULT_CHECKOUT: &str = "/workspace";
/// Step time without [`ENV_STEP_MS`].
pub const DEFAULT_STEP_MS: u64 = 20;
/// Largest [`ENV_STEP_MS`]: keeps a typo from stalling a test for hours.
pub const STEP_MS_MAX: u64 = 60_000;

/// How a script run ended, other than success.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Command-line error: this text on stderr, exit 2.
    Usage(String),
    /// `-h`: this text on stdout, exit 0.
    Help(String),
    /// An uncaught Python exception: a traceback on stderr, exit 1.
    Python {
        /// The exception class, e.g. `ValueError`.
        kind: &'static str,
        /// Its message.
        msg: String,
    },
}

impl Failure {
    /// A `ValueError`.
    pub(crate) fn value(msg: impl Into<String>) -> Failure {
        Failure::Python { kind: "ValueError", msg: msg.into() }
    }

    /// A `FileNotFoundError` for `path`.
    pub(crate) fn not_found(path: &str) -> Failure {
        Failure::Python { kind: "FileNotFoundError", msg: format!("[Errno 2] No such file or directory: '{path}'") }
    }

    /// An `OSError` about `path`.
    pub(crate) fn os(path: &str, e: &std::io::Error) -> Failure {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Failure::not_found(path);
        }
        Failure::Python { kind: "OSError", msg: format!("{e}: '{path}'") }
    }
}

/// The environment a run reads, captured once so the logic can be tested without touching the process's.
#[derive(Clone, Debug, Default)]
pub(crate) struct Env {
    /// `CUDA_VISIBLE_DEVICES`.
    pub cuda_visible_devices: Option<String>,
    /// [`ENV_STEP_MS`].
    pub step_ms: Option<String>,
    /// [`ENV_FAIL`].
    pub fail: Option<String>,
    /// `VLLM_WORKER_MULTIPROC_METHOD`.
    pub vllm_method: Option<String>,
    /// [`ENV_CHECKOUT`].
    pub checkout: Option<String>,
}

impl Env {
    fn from_process() -> Env {
        let var = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        Env {
            cuda_visible_devices: var("CUDA_VISIBLE_DEVICES"),
            step_ms: var(ENV_STEP_MS),
            fail: var(ENV_FAIL),
            vllm_method: var("VLLM_WORKER_MULTIPROC_METHOD"),
            checkout: var(ENV_CHECKOUT),
        }
    }
}

/// Where a run writes its logs.
pub(crate) struct Io<'a> {
    /// Plain log lines.
    pub out: &'a mut dyn Write,
    /// Progress bars and errors.
    pub err: &'a mut dyn Write,
}

/// Runs as `torchrun` with `args` (including argv\[0\]); returns the exit code.
pub fn run(args: Vec<OsString>) -> i32 {
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    let (mut out, mut err) = (stdout.lock(), stderr.lock());
    let code = run_with(args, &Env::from_process(), &mut Io { out: &mut out, err: &mut err });
    let _ = out.flush();
    let _ = err.flush();
    code
}

/// [`run`] with its environment and streams given.
pub(crate) fn run_with(args: Vec<OsString>, env: &Env, io: &mut Io<'_>) -> i32 {
    let args: Vec<String> = args.into_iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    torchrun::main(&args, env, io)
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// Runs `torchrun args…` in-process; returns (exit code, stdout, stderr).
    pub(crate) fn run_args(args: &[&str], env: &Env) -> (i32, String, String) {
        let (code, out, err) = run_raw(args, env);
        // Answer as the worker saw it: torchrun's exit 1 and failure report
        // (checked in `torchrun::tests`) taken off.
        match err.split_once("E0000 ") {
            Some((worker_err, report)) if code == 1 => {
                let worker_code = report
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("exitcode  : "))
                    .and_then(|r| r.split_whitespace().next()?.parse().ok())
                    .expect("torchrun's report names the worker's exit code");
                (worker_code, out, worker_err.to_string())
            }
            _ => (code, out, err),
        }
    }

    /// Runs the stand-in as `torchrun ARGS`: torchrun's exit code, stdout and stderr.
    pub(crate) fn run_raw(args: &[&str], env: &Env) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let argv = std::iter::once("torchrun").chain(args.iter().copied()).map(OsString::from).collect();
        let code = run_with(argv, env, &mut Io { out: &mut out, err: &mut err });
        (code, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned())
    }

    /// An environment with one GPU and no step delay.
    pub(crate) fn one_gpu() -> Env {
        Env { cuda_visible_devices: Some("0".into()), step_ms: Some("0".into()), ..Env::default() }
    }
}
