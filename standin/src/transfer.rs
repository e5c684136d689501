//! `transfer.py`: transfer, upscale and batch mode.
//!
//! Held to cosmos-transfer1's `cosmos_transfer1/diffusion/inference/transfer.py`
//! (`parse_arguments`, `demo`) and `inference_utils.py` (`load_controlnet_specs`,
//! `validate_controlnet_specs`): the flags and defaults of its argparse parser,
//! the split of the spec into controls and arguments, the precedence of a
//! top-level spec key over a default but not over the same `--flag`, and the
//! per-control validation, messages included.

use crate::argparse::{self, Kind, Opt, Parsed};
use crate::output::{self, ControlHeader, DerivedHeader, Header};
use crate::torchrun::{Launch, visible_gpus};
use crate::{DEFAULT_STEP_MS, Env, Failure, Io, STEP_MS_MAX, STRENGTHS};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest `--controlnet_specs` file.
pub(crate) const SPEC_BYTES_MAX: u64 = 1024 * 1024;
/// Largest `--batch_input_path` file.
pub(crate) const BATCH_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Most videos in one batch file.
pub(crate) const BATCH_LINES_MAX: usize = 10_000;

const PROG: &str = "transfer.py";

/// `transfer.py`'s parser: every option it declares, so anything else is refused as it would be.
const OPTS: &[Opt] = &[
    Opt { name: "prompt", kind: Kind::Str },
    Opt { name: "negative_prompt", kind: Kind::Str },
    Opt { name: "input_video_path", kind: Kind::Str },
    Opt { name: "num_input_frames", kind: Kind::Choice(&["1"]) },
    Opt { name: "sigma_max", kind: Kind::Float },
    Opt { name: "blur_strength", kind: Kind::Choice(&STRENGTHS) },
    Opt { name: "canny_threshold", kind: Kind::Choice(&STRENGTHS) },
    Opt { name: "controlnet_specs", kind: Kind::Str },
    Opt { name: "is_av_sample", kind: Kind::Flag },
    Opt { name: "checkpoint_dir", kind: Kind::Str },
    Opt { name: "tokenizer_dir", kind: Kind::Str },
    Opt { name: "video_save_name", kind: Kind::Str },
    Opt { name: "video_save_folder", kind: Kind::Str },
    Opt { name: "batch_input_path", kind: Kind::Str },
    Opt { name: "batch_size", kind: Kind::Int },
    Opt { name: "num_steps", kind: Kind::Int },
    Opt { name: "guidance", kind: Kind::Float },
    Opt { name: "fps", kind: Kind::Int },
    Opt { name: "seed", kind: Kind::Int },
    Opt { name: "num_gpus", kind: Kind::Int },
    Opt { name: "offload_diffusion_transformer", kind: Kind::Flag },
    Opt { name: "offload_text_encoder_model", kind: Kind::Flag },
    Opt { name: "offload_guardrail_models", kind: Kind::Flag },
    Opt { name: "upsample_prompt", kind: Kind::Flag },
    Opt { name: "offload_prompt_upsampler", kind: Kind::Flag },
    Opt { name: "use_distilled", kind: Kind::Flag },
    Opt { name: "save_input_noise", kind: Kind::Flag },
    Opt { name: "benchmark", kind: Kind::Flag },
];

/// `valid_hint_keys` of `inference_utils.py`: the top-level spec keys that are controls.
pub(crate) const VALID_HINT_KEYS: [&str; 8] = ["vis", "seg", "edge", "depth", "keypoint", "upscale", "hdmap", "lidar"];
/// How Python prints that set in the loader's error.
const VALID_HINT_KEYS_REPR: &str = "{'vis', 'seg', 'edge', 'depth', 'keypoint', 'upscale', 'hdmap', 'lidar'}";
/// Controls the model computes from the input video when no `input_control` is given (and saves).
const DERIVED_CONTROLS: [&str; 2] = ["depth", "seg"];

/// `--prompt`'s default in `transfer.py`.
pub(crate) const DEFAULT_PROMPT: &str = "The video captures a stunning, photorealistic scene with remarkable attention to detail, giving it a lifelike appearance that is almost indistinguishable from reality. It appears to be from a high-budget 4K movie, showcasing ultra-high-definition quality with impeccable resolution.";
/// `--negative_prompt`'s default in `transfer.py`.
pub(crate) const DEFAULT_NEGATIVE_PROMPT: &str = "The video captures a game playing, with bad crappy graphics and cartoonish frames. It represents a recording of old outdated games. The lighting looks very fake. The textures are very raw and basic. The geometries are very primitive. The images are very pixelated and of poor CG quality. There are many subtitles in the footage. Overall, the video is unrealistic at all.";
const DEFAULT_NUM_STEPS: i64 = 35;
const DEFAULT_GUIDANCE: f64 = 5.0;
const DEFAULT_SIGMA_MAX: f64 = 70.0;
const DEFAULT_SEED: i64 = 1;
const DEFAULT_FPS: i64 = 24;
const DEFAULT_STRENGTH: &str = "medium";
const SEED_MAX: i64 = (1 << 32) - 1;

/// A controlnet spec file, split as `load_controlnet_specs` splits it.
#[derive(Clone, Debug, Default)]
struct Spec {
    /// Top-level keys whose values are not objects: script arguments.
    params: Map<String, Value>,
    /// Values under the control names, whatever their type.
    controls: BTreeMap<String, Value>,
}

/// The script parameters after defaults, spec and flags.
#[derive(Clone, Debug, PartialEq)]
struct Params {
    prompt: String,
    negative_prompt: String,
    /// Empty means none, as in the real script.
    input_video_path: String,
    num_steps: i64,
    guidance: f64,
    sigma_max: f64,
    seed: i64,
    fps: i64,
    blur_strength: String,
    canny_threshold: String,
}

/// A control weight as `validate_controlnet_specs` accepts it.
#[derive(Clone, Debug, PartialEq)]
enum Weight {
    /// A non-negative number.
    Scalar(f64),
    /// A path to a `.pt` spatiotemporal mask.
    Mask(String),
}

/// One control, checked.
#[derive(Clone, Debug, PartialEq)]
struct Control {
    weight: Weight,
    input_control: Option<String>,
}

/// One video to produce.
#[derive(Clone, Debug)]
struct Job {
    params: Params,
    controls: BTreeMap<String, Control>,
    out_dir: PathBuf,
}

/// A job with its inputs hashed: what gets written.
struct Prepared {
    output: PathBuf,
    header: Header,
    derived: Vec<(PathBuf, DerivedHeader)>,
}

/// Runs `transfer.py` with the launch's arguments.
pub(crate) fn main(launch: &Launch, env: &Env, io: &mut Io<'_>) -> Result<(), Failure> {
    let flags = argparse::parse(PROG, OPTS, &launch.script_args)?;
    // `required=True` in the real parser, batch mode included.
    let Some(spec_path) = flags.str("controlnet_specs") else {
        return Err(argparse::usage_error(PROG, OPTS, "the following arguments are required: --controlnet_specs"));
    };
    let spec = load_spec(spec_path)?;
    let params = resolve_params(&spec, &flags, &launch.script_args)?;
    let num_gpus = flags.int("num_gpus").unwrap_or(1);
    check_gpus(num_gpus, launch.nproc_per_node, env)?;
    let step_ms = step_ms(env)?;
    let controls = validate_controls(&spec.controls, &params)?;
    check_strengths(&params, &controls)?;
    let upscale = controls.contains_key("upscale");
    let folder = PathBuf::from(flags.str("video_save_folder").unwrap_or("outputs/"));
    let save_name = flags.str("video_save_name").unwrap_or("output");
    if save_name.is_empty() || save_name.contains('/') {
        return Err(Failure::value(format!("video_save_name must be a file name without '/', got '{save_name}'")));
    }
    let mut batch_size = flags.int("batch_size").unwrap_or(1);
    if batch_size < 1 {
        return Err(Failure::value(format!("batch_size must be at least 1, got {batch_size}")));
    }
    if upscale {
        // As `demo` does: "Setting batch_size=1 as upscale does not support batch generation".
        batch_size = 1;
    }
    let jobs = match flags.str("batch_input_path") {
        None => vec![Job { params, controls, out_dir: folder }],
        Some(path) => batch_jobs(path, &params, &controls, &folder)?,
    };
    let mut prepared = Vec::with_capacity(jobs.len());
    for job in &jobs {
        prepared.push(prepare(job, num_gpus, save_name, flags.flag("upsample_prompt"))?);
    }

    let checkpoints = flags.str("checkpoint_dir").unwrap_or("checkpoints");
    let names: Vec<&str> = jobs[0].controls.keys().map(String::as_str).collect();
    let _ = writeln!(io.out, "Loading checkpoints from {checkpoints} (Cosmos stand-in: no weights are read)");
    let p = &jobs[0].params;
    let _ = writeln!(
        io.out,
        "Running {} on {} video(s) with controls [{}] on {num_gpus} GPU(s), blur_strength={}, canny_threshold={}",
        if upscale { "upscale" } else { "transfer" },
        prepared.len(),
        names.join(", "),
        p.blur_strength,
        p.canny_threshold,
    );
    for chunk in prepared.chunks(batch_size as usize) {
        diffuse(io, env, "", chunk[0].header.num_steps as u64, step_ms)?;
        for p in chunk {
            for (path, header) in &p.derived {
                output::write_file(path, &output::file_bytes(header))?;
                let _ = writeln!(io.out, "Saved {} control to {}", header.control, path.display());
            }
            output::write_file(&p.output, &output::file_bytes(&p.header))?;
            let _ = writeln!(io.out, "Saved video to {}", p.output.display());
        }
    }
    let _ = io.out.flush();
    Ok(())
}

/// `--num_gpus`, torchrun's processes and the visible devices must be the same number.
fn check_gpus(num_gpus: i64, nproc_per_node: i64, env: &Env) -> Result<(), Failure> {
    let visible = visible_gpus(env);
    if visible.is_empty() {
        return Err(Failure::Python {
            kind: "RuntimeError",
            msg: format!(
                "CUDA_VISIBLE_DEVICES is not set or empty: no GPU is visible (--num_gpus={num_gpus}); \
                 list exactly the job's GPUs in CUDA_VISIBLE_DEVICES"
            ),
        });
    }
    if num_gpus != nproc_per_node || num_gpus != visible.len() as i64 {
        return Err(Failure::value(format!(
            "GPU count mismatch: --num_gpus={num_gpus}, torchrun --nproc_per_node={nproc_per_node}, \
             CUDA_VISIBLE_DEVICES={} lists {} device(s); all three must be equal",
            visible.join(","),
            visible.len()
        )));
    }
    Ok(())
}

/// The per-step delay from the environment.
pub(crate) fn step_ms(env: &Env) -> Result<u64, Failure> {
    match env.step_ms.as_deref().map(str::trim) {
        None | Some("") => Ok(DEFAULT_STEP_MS),
        Some(v) => v.parse::<u64>().ok().filter(|ms| *ms <= STEP_MS_MAX).ok_or_else(|| {
            Failure::value(format!(
                "{} must be whole milliseconds from 0 to {STEP_MS_MAX}, got '{v}'",
                crate::ENV_STEP_MS
            ))
        }),
    }
}

/// The diffusion loop: one tqdm update per step on stderr.
pub(crate) fn diffuse(io: &mut Io<'_>, env: &Env, desc: &str, steps: u64, step_ms: u64) -> Result<(), Failure> {
    let start = Instant::now();
    let _ = write!(io.err, "{}\r", crate::progress::tqdm_line(desc, 0, steps, Duration::ZERO));
    let _ = io.err.flush();
    for n in 1..=steps {
        std::thread::sleep(Duration::from_millis(step_ms));
        let end = if n == steps { "\n" } else { "\r" };
        let _ = write!(io.err, "{}{end}", crate::progress::tqdm_line(desc, n, steps, start.elapsed()));
        let _ = io.err.flush();
        if let Some(msg) = env.fail.as_deref() {
            if n < steps {
                let _ = writeln!(io.err);
            }
            return Err(Failure::Python { kind: "RuntimeError", msg: msg.to_string() });
        }
    }
    Ok(())
}

/// Reads and splits a controlnet spec as `load_controlnet_specs` does: a key
/// among [`VALID_HINT_KEYS`] is a control whatever its value; any other key
/// whose value is an object is an error; every other key is a script argument.
fn load_spec(path: &str) -> Result<Spec, Failure> {
    let bytes = output::read_limited(path, SPEC_BYTES_MAX, "controlnet spec")?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| Failure::Python {
        kind: "json.decoder.JSONDecodeError",
        msg: format!("{e} (in controlnet spec '{path}')"),
    })?;
    let Value::Object(top) = value else {
        // The loader calls `.items()` on whatever `json.load` returned.
        return Err(Failure::Python {
            kind: "AttributeError",
            msg: format!("'{}' object has no attribute 'items'", py_type(&value)),
        });
    };
    let mut spec = Spec::default();
    for (key, v) in top {
        if VALID_HINT_KEYS.contains(&key.as_str()) {
            spec.controls.insert(key, v);
        } else if v.is_object() {
            return Err(Failure::value(format!("Invalid hint_key: {key}. Must be one of {VALID_HINT_KEYS_REPR}")));
        } else {
            spec.params.insert(key, v);
        }
    }
    Ok(spec)
}

/// Python's name for the type of a JSON value once `json.load` has read it.
fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn spec_str(spec: &Spec, key: &str) -> Result<Option<String>, Failure> {
    match spec.params.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(type_error(key, "a string", other)),
    }
}

fn spec_int(spec: &Spec, key: &str) -> Result<Option<i64>, Failure> {
    match spec.params.get(key) {
        None => Ok(None),
        // Too big for i64 is still an integer: let the range check name it.
        Some(Value::Number(n)) if n.is_u64() => Ok(Some(n.as_i64().unwrap_or(i64::MAX))),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(other) => Err(type_error(key, "an integer", other)),
    }
}

fn spec_float(spec: &Spec, key: &str) -> Result<Option<f64>, Failure> {
    match spec.params.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(type_error(key, "a number", other)),
    }
}

fn type_error(key: &str, want: &str, got: &Value) -> Failure {
    Failure::Python { kind: "TypeError", msg: format!("{key} must be {want}, got {got}") }
}

/// `parse_arguments`: a top-level spec key replaces the parser's value unless
/// the very token `--<key>` is in the script's argv (`if f"--{key}" not in
/// sys.argv`), so `--seed=5` or an abbreviation does not count as given.
fn resolve_params(spec: &Spec, flags: &Parsed, argv: &[String]) -> Result<Params, Failure> {
    let on_command_line = |key: &str| argv.iter().any(|a| *a == format!("--{key}"));
    let from_spec = |key: &str| spec.params.contains_key(key) && !on_command_line(key);
    let string = |key: &str, default: &str| -> Result<String, Failure> {
        if from_spec(key) {
            return Ok(spec_str(spec, key)?.unwrap_or_default());
        }
        Ok(flags.str(key).unwrap_or(default).to_string())
    };
    let int = |key: &str, default: i64| -> Result<i64, Failure> {
        if from_spec(key) {
            return Ok(spec_int(spec, key)?.unwrap_or(default));
        }
        Ok(flags.int(key).unwrap_or(default))
    };
    let float = |key: &str, default: f64| -> Result<f64, Failure> {
        if from_spec(key) {
            return Ok(spec_float(spec, key)?.unwrap_or(default));
        }
        Ok(flags.float(key).unwrap_or(default))
    };
    Ok(Params {
        prompt: string("prompt", DEFAULT_PROMPT)?,
        negative_prompt: string("negative_prompt", DEFAULT_NEGATIVE_PROMPT)?,
        input_video_path: string("input_video_path", "")?,
        num_steps: int("num_steps", DEFAULT_NUM_STEPS)?,
        guidance: float("guidance", DEFAULT_GUIDANCE)?,
        sigma_max: float("sigma_max", DEFAULT_SIGMA_MAX)?,
        seed: int("seed", DEFAULT_SEED)?,
        fps: int("fps", DEFAULT_FPS)?,
        blur_strength: string("blur_strength", DEFAULT_STRENGTH)?,
        canny_threshold: string("canny_threshold", DEFAULT_STRENGTH)?,
    })
}

/// A spec key bypasses argparse's `choices`, so a bad level fails where the
/// model uses it: the blur preset is a dict lookup (`KeyError`), the canny
/// preset an if-chain (`ValueError: Preset … not recognized.`).
fn check_strengths(p: &Params, controls: &BTreeMap<String, Control>) -> Result<(), Failure> {
    if !STRENGTHS.contains(&p.blur_strength.as_str()) {
        return Err(Failure::Python { kind: "KeyError", msg: format!("'{}'", p.blur_strength) });
    }
    if controls.contains_key("edge") && !STRENGTHS.contains(&p.canny_threshold.as_str()) {
        return Err(Failure::value(format!("Preset {} not recognized.", p.canny_threshold)));
    }
    Ok(())
}

/// The stand-in's own guard on the ranges the project's contract sets (the
/// real script has none): a run outside them is a bug of the orchestrator.
fn check_ranges(p: &Params) -> Result<(), Failure> {
    let ints = [("num_steps", p.num_steps, 1, 100), ("fps", p.fps, 1, 60), ("seed", p.seed, 1, SEED_MAX)];
    for (name, v, lo, hi) in ints {
        if !(lo..=hi).contains(&v) {
            return Err(Failure::value(format!("{name} must be between {lo} and {hi}, got {v}")));
        }
    }
    for (name, v, lo, hi) in [("guidance", p.guidance, 1.0, 20.0), ("sigma_max", p.sigma_max, 0.0, 80.0)] {
        if !(lo..=hi).contains(&v) {
            return Err(Failure::value(format!("{name} must be between {lo} and {hi}, got {v}")));
        }
    }
    Ok(())
}

/// `validate_controlnet_specs`, control by control. Inside a control only
/// `control_weight`, `input_control` and `ckpt_path` are read; any other key
/// is ignored without a word, as the real script ignores it.
fn validate_controls(spec: &BTreeMap<String, Value>, p: &Params) -> Result<BTreeMap<String, Control>, Failure> {
    let mut controls = BTreeMap::new();
    for (name, config) in spec {
        if p.input_video_path.is_empty() && p.sigma_max < 80.0 {
            return Err(Failure::value("Must have 'input_video' specified if sigma_max < 80"));
        }
        let Value::Object(fields) = config else {
            // `"input_control" not in config` on a number or a string.
            return Err(Failure::Python {
                kind: "TypeError",
                msg: format!("argument of type '{}' is not iterable", py_type(config)),
            });
        };
        if p.input_video_path.is_empty() && !fields.contains_key("input_control") {
            return Err(Failure::value(format!(
                "{name} controlnet must have 'input_control' video specified if no 'input_video' specified."
            )));
        }
        let weight = match fields.get("control_weight") {
            None => Weight::Scalar(0.5),
            Some(v) => weight(name, v)?,
        };
        let input_control = input_control(name, fields.get("input_control"))?;
        controls.insert(name.clone(), Control { weight, input_control });
    }
    if controls.is_empty() {
        return Err(Failure::value(format!(
            "no control in the controlnet spec: give at least one of {}",
            VALID_HINT_KEYS.join(", ")
        )));
    }
    if controls.contains_key("upscale") && controls.len() > 1 {
        return Err(Failure::value("upscale cannot be combined with other controls in one spec"));
    }
    Ok(controls)
}

/// A `control_weight`: a `.pt` path, or whatever Python's `float()` takes, non-negative.
fn weight(name: &str, v: &Value) -> Result<Weight, Failure> {
    let invalid = || {
        Failure::value(format!("Control weight for {name} must be a valid non-negative float or a path to a .pt file."))
    };
    let scalar = match v {
        Value::String(s) if s.ends_with(".pt") => return Ok(Weight::Mask(s.clone())),
        Value::String(s) => python_float(s).ok_or_else(invalid)?,
        Value::Number(n) => n.as_f64().ok_or_else(invalid)?,
        Value::Bool(b) => f64::from(u8::from(*b)),
        other => {
            return Err(Failure::Python {
                kind: "TypeError",
                msg: format!("float() argument must be a string or a real number, not '{}'", py_type(other)),
            });
        }
    };
    // The real check raises "must be non-negative" inside its `try`, whose
    // `except ValueError` turns it into the general message.
    if scalar < 0.0 {
        return Err(invalid());
    }
    Ok(Weight::Scalar(scalar))
}

/// Python's `float(text)`: surrounding blanks, `_` between digits, `inf`/`nan` in any case.
fn python_float(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return None;
    }
    // Rust's parser takes the same `inf`, `infinity` and `nan` spellings, in any case.
    t.replace('_', "").parse::<f64>().ok()
}

fn input_control(name: &str, v: Option<&Value>) -> Result<Option<String>, Failure> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(type_error(&format!("{name}.input_control"), "a path or null", other)),
    }
}

/// One job per JSONL line: the base spec with the line's video, prompt and control overrides.
fn batch_jobs(
    path: &str,
    base: &Params,
    controls: &BTreeMap<String, Control>,
    folder: &Path,
) -> Result<Vec<Job>, Failure> {
    let bytes = output::read_limited(path, BATCH_FILE_BYTES_MAX, "batch input")?;
    let text = String::from_utf8_lossy(&bytes);
    let mut jobs = Vec::new();
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if jobs.len() == BATCH_LINES_MAX {
            return Err(Failure::value(format!("batch input '{path}' has more than {BATCH_LINES_MAX} videos")));
        }
        let at = || format!("line {} of batch input '{path}'", line_no + 1);
        let value: Value = serde_json::from_str(line)
            .map_err(|e| Failure::Python { kind: "json.decoder.JSONDecodeError", msg: format!("{e} ({})", at()) })?;
        let Value::Object(entry) = value else {
            return Err(Failure::value(format!("{} must be a JSON object", at())));
        };
        let mut params = base.clone();
        match entry.get("visual_input") {
            Some(Value::String(v)) => params.input_video_path = v.clone(),
            _ => return Err(Failure::value(format!("{} needs \"visual_input\" (a video path)", at()))),
        }
        match entry.get("prompt") {
            None | Some(Value::Null) => {}
            Some(Value::String(p)) => params.prompt = p.clone(),
            Some(other) => return Err(type_error(&format!("prompt on {}", at()), "a string", other)),
        }
        let mut job_controls = controls.clone();
        match entry.get("control_overrides") {
            None | Some(Value::Null) => {}
            Some(Value::Object(overrides)) => {
                for (name, fields) in overrides {
                    // `demo`: "Ignoring unknown control key in override".
                    let Some(control) = job_controls.get_mut(name) else { continue };
                    let Value::Object(fields) = fields else {
                        return Err(Failure::value(format!("override of '{name}' on {} must be an object", at())));
                    };
                    if let Some(w) = fields.get("control_weight") {
                        control.weight = weight(name, w)?;
                    }
                    if fields.contains_key("input_control") {
                        control.input_control = input_control(name, fields.get("input_control"))?;
                    }
                }
            }
            Some(other) => return Err(type_error(&format!("control_overrides on {}", at()), "an object", other)),
        }
        let out_dir = folder.join(format!("video_{}", jobs.len()));
        jobs.push(Job { params, controls: job_controls, out_dir });
    }
    if jobs.is_empty() {
        return Err(Failure::value(format!("batch input '{path}' has no videos")));
    }
    Ok(jobs)
}

/// Validates a job and hashes its inputs.
fn prepare(job: &Job, num_gpus: i64, save_name: &str, upsample: bool) -> Result<Prepared, Failure> {
    let upscale = job.controls.contains_key("upscale");
    let p = &job.params;
    check_ranges(p)?;
    let input_video_sha256 = match p.input_video_path.as_str() {
        "" => None,
        video => Some(output::sha256_file(video)?),
    };
    let mut controls = BTreeMap::new();
    let mut derived = Vec::new();
    for (name, c) in &job.controls {
        let input_control_sha256 = match &c.input_control {
            Some(path) => Some(output::sha256_file(path)?),
            None => None,
        };
        if let (None, Some(video_sha)) = (&input_control_sha256, &input_video_sha256) {
            if DERIVED_CONTROLS.contains(&name.as_str()) {
                let header = DerivedHeader {
                    mode: "derived_control",
                    control: name.clone(),
                    input_video_sha256: video_sha.clone(),
                };
                derived.push((job.out_dir.join(format!("{name}_input_control.mp4")), header));
            }
        }
        let control_weight = match &c.weight {
            Weight::Scalar(w) => serde_json::Number::from_f64(*w).map_or(Value::Null, Value::Number),
            Weight::Mask(path) => Value::String(format!("mask:{}", output::sha256_file(path)?)),
        };
        controls.insert(name.clone(), ControlHeader { control_weight, input_control_sha256 });
    }
    let prompt = if upsample {
        crate::upsampler::upsample_prompt(&p.prompt, input_video_sha256.as_deref().unwrap_or(""))
    } else {
        p.prompt.clone()
    };
    let header = Header {
        mode: if upscale { "upscale" } else { "transfer" },
        prompt,
        negative_prompt: p.negative_prompt.clone(),
        num_steps: p.num_steps,
        guidance: p.guidance,
        sigma_max: p.sigma_max,
        seed: p.seed,
        fps: p.fps,
        num_gpus,
        blur_strength: p.blur_strength.clone(),
        canny_threshold: p.canny_threshold.clone(),
        input_video_sha256,
        controls,
    };
    Ok(Prepared { output: job.out_dir.join(format!("{save_name}.mp4")), header, derived })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_output;
    use crate::testutil::{one_gpu, run_args};
    use std::fs;

    const SCRIPT: &str = "/workspace/cosmos_transfer1/diffusion/inference/transfer.py";

    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Dir {
            Dir(tempfile::tempdir().unwrap())
        }
        fn path(&self, name: &str) -> String {
            self.0.path().join(name).display().to_string()
        }
        fn write(&self, name: &str, bytes: &[u8]) -> String {
            let p = self.path(name);
            fs::write(&p, bytes).unwrap();
            p
        }
        fn spec(&self, spec: Value) -> String {
            self.write("spec.json", spec.to_string().as_bytes())
        }
        fn run(&self, extra: &[&str]) -> (i32, String, String) {
            let out = self.path("out");
            let mut args = vec![SCRIPT, "--video_save_folder", &out, "--controlnet_specs"];
            let spec = self.path("spec.json");
            args.push(&spec);
            args.extend_from_slice(extra);
            run_args(&args, &one_gpu())
        }
        fn output(&self, rel: &str) -> Value {
            parse_output(&fs::read(self.path(rel)).unwrap()).unwrap()
        }
    }

    fn basic(d: &Dir) -> Value {
        let video = d.write("color.mp4", b"video bytes");
        serde_json::json!({"prompt": "a road", "input_video_path": video, "vis": {"control_weight": 0.5}})
    }

    fn sha(bytes: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    #[test]
    fn precedence_is_defaults_then_spec_then_flags() {
        let d = Dir::new();
        let mut spec = basic(&d);
        spec["num_steps"] = 7.into();
        spec["guidance"] = 3.into();
        spec["seed"] = 9.into();
        d.spec(spec);
        let (code, _, err) = d.run(&["--seed", "11", "--fps=30"]);
        assert_eq!(code, 0, "{err}");
        let h = d.output("out/output.mp4");
        assert_eq!((h["num_steps"].as_i64(), h["guidance"].as_f64()), (Some(7), Some(3.0)), "from the spec");
        assert_eq!((h["seed"].as_i64(), h["fps"].as_i64()), (Some(11), Some(30)), "flags win");
        assert_eq!(
            (h["sigma_max"].as_f64(), h["negative_prompt"].as_str()),
            (Some(70.0), Some(DEFAULT_NEGATIVE_PROMPT)),
            "defaults"
        );
        assert_eq!(h["input_video_sha256"], sha(b"video bytes"));
        assert_eq!((h["blur_strength"].as_str(), h["canny_threshold"].as_str()), (Some("medium"), Some("medium")));
    }

    #[test]
    fn blur_and_canny_are_arguments_flag_then_top_level_key_then_default() {
        let d = Dir::new();
        let mut spec = basic(&d);
        spec["edge"] = serde_json::json!({"control_weight": 0.5});
        spec["blur_strength"] = "very_low".into();
        d.spec(spec.clone());
        let (code, out, err) = d.run(&["--canny_threshold", "low"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("blur_strength=very_low, canny_threshold=low"), "{out}");
        let h = d.output("out/output.mp4");
        assert_eq!((h["blur_strength"].as_str(), h["canny_threshold"].as_str()), (Some("very_low"), Some("low")));
        // The flag beats the key, but only as the exact token `--blur_strength`, as `parse_arguments` checks it.
        assert_eq!(d.run(&["--blur_strength", "high"]).0, 0);
        assert_eq!(d.output("out/output.mp4")["blur_strength"], "high");
        assert_eq!(d.run(&["--blur_strength=high"]).0, 0);
        assert_eq!(d.output("out/output.mp4")["blur_strength"], "very_low", "`--blur_strength=…` is not in sys.argv");
        // argparse checks a flag's choices; a spec key skips them and fails where the model uses it.
        let (code, _, err) = d.run(&["--canny_threshold", "max"]);
        assert_eq!(code, 2);
        assert!(err.contains("argument --canny_threshold: invalid choice: 'max' (choose from 'very_low', "), "{err}");
        spec["blur_strength"] = "max".into();
        d.spec(spec.clone());
        assert!(d.run(&[]).2.ends_with("KeyError: 'max'\n"));
        spec["blur_strength"] = "low".into();
        spec["canny_threshold"] = "max".into();
        d.spec(spec);
        assert!(d.run(&[]).2.ends_with("ValueError: Preset max not recognized.\n"));
    }

    #[test]
    fn keys_misplaced_in_a_control_are_ignored() {
        let d = Dir::new();
        let mut spec = basic(&d);
        spec["vis"] = serde_json::json!({"control_weight": 0.5, "blur_strength": "high"});
        spec["edge"] = serde_json::json!({"control_weight": 0.5, "canny_threshold": "low", "anything": [1]});
        d.spec(spec);
        let (code, _, err) = d.run(&[]);
        assert_eq!(code, 0, "{err}");
        let h = d.output("out/output.mp4");
        assert_eq!((h["blur_strength"].as_str(), h["canny_threshold"].as_str()), (Some("medium"), Some("medium")));
        assert_eq!(h["controls"]["vis"], serde_json::json!({"control_weight": 0.5, "input_control_sha256": null}));
    }

    #[test]
    fn top_level_keys_split_as_the_loader_splits_them() {
        let d = Dir::new();
        let mut spec = basic(&d);
        spec["not_an_argument"] = 3.into();
        spec["lidar"] = serde_json::json!({"control_weight": 0.1});
        d.spec(spec.clone());
        let (code, _, err) = d.run(&[]);
        assert_eq!(code, 0, "unknown scalar keys are arguments nobody reads; every valid hint key loads: {err}");
        assert_eq!(d.output("out/output.mp4")["controls"]["lidar"]["control_weight"], 0.1);
        spec["blur"] = serde_json::json!({"control_weight": 0.5});
        d.spec(spec);
        let (code, _, err) = d.run(&[]);
        assert_eq!(code, 1);
        assert!(
            err.ends_with(
                "ValueError: Invalid hint_key: blur. Must be one of \
                 {'vis', 'seg', 'edge', 'depth', 'keypoint', 'upscale', 'hdmap', 'lidar'}\n"
            ),
            "{err}"
        );
    }

    #[test]
    fn validation_follows_validate_controlnet_specs() {
        let d = Dir::new();
        let depth = d.write("depth.mp4", b"D");
        let video = d.write("color.mp4", b"V");
        let run = |spec: Value| {
            d.spec(spec);
            d.run(&[])
        };
        // No input video: sigma_max must be at least 80 and every control needs its own input_control.
        let (code, _, err) = run(serde_json::json!({"depth": {"control_weight": 0.5, "input_control": depth}}));
        assert_eq!(code, 1);
        assert!(err.ends_with("ValueError: Must have 'input_video' specified if sigma_max < 80\n"), "{err}");
        let (code, _, err) =
            run(serde_json::json!({"sigma_max": 80, "depth": {"input_control": depth}, "vis": {"control_weight": 1}}));
        assert_eq!(code, 1);
        assert!(
            err.ends_with(
                "ValueError: vis controlnet must have 'input_control' video specified if no 'input_video' specified.\n"
            ),
            "{err}"
        );
        let (code, _, err) = run(serde_json::json!({"sigma_max": 80, "depth": {"input_control": depth}}));
        assert_eq!(code, 0, "{err}");
        let h = d.output("out/output.mp4");
        assert!(h["input_video_sha256"].is_null());
        assert_eq!(h["controls"]["depth"]["control_weight"], 0.5, "an absent weight is 0.5");
        assert_eq!(h["prompt"], DEFAULT_PROMPT, "--prompt has a default");
        // control_weight: a non-negative float (Python's float() of it), or a path to a .pt mask.
        let mask = d.write("w.pt", b"mask");
        for (w, ok) in [
            (serde_json::json!(1.5), true),
            (serde_json::json!("0.25"), true),
            (serde_json::json!(mask), true),
            (serde_json::json!(-0.1), false),
            (serde_json::json!("-1"), false),
            (serde_json::json!("heavy"), false),
        ] {
            let (code, _, err) = run(serde_json::json!({"input_video_path": video, "vis": {"control_weight": w}}));
            if ok {
                assert_eq!(code, 0, "{w}: {err}");
            } else {
                assert_eq!(code, 1, "{w}");
                let want =
                    "ValueError: Control weight for vis must be a valid non-negative float or a path to a .pt file.\n";
                assert!(err.ends_with(want), "{w}: {err}");
            }
        }
        assert_eq!(d.output("out/output.mp4")["controls"]["vis"]["control_weight"], format!("mask:{}", sha(b"mask")));
        let (code, _, err) = run(serde_json::json!({"input_video_path": video, "vis": 0.5}));
        assert_eq!(code, 1);
        assert!(err.ends_with("TypeError: argument of type 'float' is not iterable\n"), "{err}");
    }

    #[test]
    fn same_inputs_same_bytes_other_inputs_other_bytes() {
        let d = Dir::new();
        d.spec(basic(&d));
        assert_eq!(d.run(&[]).0, 0);
        let first = fs::read(d.path("out/output.mp4")).unwrap();
        assert_eq!(d.run(&[]).0, 0);
        assert_eq!(first, fs::read(d.path("out/output.mp4")).unwrap());
        d.write("color.mp4", b"other video bytes");
        assert_eq!(d.run(&[]).0, 0);
        assert_ne!(first, fs::read(d.path("out/output.mp4")).unwrap());
    }

    #[test]
    fn ranges_name_the_parameter() {
        let d = Dir::new();
        d.spec(basic(&d));
        for (flag, value) in [
            ("--num_steps", "0"),
            ("--num_steps", "101"),
            ("--guidance", "0.5"),
            ("--guidance", "20.5"),
            ("--sigma_max", "-1"),
            ("--sigma_max", "81"),
            ("--fps", "0"),
            ("--fps", "61"),
            ("--seed", "0"),
            ("--seed", "4294967296"),
            ("--guidance", "nan"),
        ] {
            let (code, _, err) = d.run(&[flag, value]);
            assert_eq!(code, 1, "{flag} {value}");
            assert!(err.contains(&format!("ValueError: {} must be between", &flag[2..])), "{flag} {value}: {err}");
        }
        assert_eq!(d.run(&["--seed", "4294967295", "--num_steps", "1"]).0, 0);
    }

    #[test]
    fn spec_problems_fail_like_python() {
        let d = Dir::new();
        let cases: Vec<(Value, &str)> = vec![
            (serde_json::json!({"prompt": "p", "input_video_path": d.path("color.mp4")}), "no control"),
            (
                serde_json::json!({"prompt": "p", "input_video_path": d.path("nope.mp4"), "vis": {"control_weight": 0.5}}),
                "FileNotFoundError: [Errno 2] No such file or directory",
            ),
            (
                serde_json::json!({"prompt": "p", "input_video_path": d.path("color.mp4"), "depth": {"control_weight": 0.5, "input_control": d.path("d.mp4")}}),
                "FileNotFoundError",
            ),
            (
                serde_json::json!({"prompt": 3, "input_video_path": d.path("color.mp4"), "vis": {"control_weight": 0.5}}),
                "TypeError: prompt must be a string",
            ),
            (
                serde_json::json!({"prompt": "p", "num_steps": 3.5, "input_video_path": d.path("color.mp4"), "vis": {"control_weight": 0.5}}),
                "TypeError: num_steps must be an integer",
            ),
            (serde_json::json!([1]), "AttributeError: 'list' object has no attribute 'items'"),
        ];
        d.write("color.mp4", b"v");
        for (spec, want) in cases {
            d.spec(spec.clone());
            let (code, _, err) = d.run(&[]);
            assert_eq!(code, 1, "{spec}");
            assert!(err.starts_with("Traceback (most recent call last):"), "{err}");
            assert!(err.contains(want), "{spec}: want {want:?} in {err}");
        }
        d.write("spec.json", b"{not json");
        let (code, _, err) = d.run(&[]);
        assert_eq!(code, 1);
        assert!(err.contains("json.decoder.JSONDecodeError"), "{err}");
        assert!(!std::path::Path::new(&d.path("out/output.mp4")).exists());
    }

    #[test]
    fn command_line_problems_are_usage_errors() {
        let d = Dir::new();
        d.spec(basic(&d));
        let (code, _, err) = d.run(&["--steps", "3"]);
        assert_eq!(code, 2);
        assert!(err.starts_with("usage: transfer.py [-h]"), "{err}");
        assert!(err.contains("transfer.py: error: unrecognized arguments: --steps 3"), "{err}");
        let (code, _, err) = run_args(&[SCRIPT, "--seed", "1", "--batch_input_path", "b.jsonl"], &one_gpu());
        assert_eq!(code, 2);
        assert!(err.contains("required: --controlnet_specs"), "required in batch mode too: {err}");
        let (code, _, err) = d.run(&["--seed", "x"]);
        assert_eq!(code, 2);
        assert!(err.contains("argument --seed: invalid int value: 'x'"), "{err}");
    }

    #[test]
    fn gpu_counts_must_agree() {
        let d = Dir::new();
        d.spec(basic(&d));
        let spec = d.path("spec.json");
        let base = [SCRIPT, "--controlnet_specs", &spec, "--video_save_folder", &d.path("out")];
        let two = Env { cuda_visible_devices: Some("2,3".into()), step_ms: Some("0".into()), ..Env::default() };
        let ok = [&["--nproc_per_node=2"][..], &base, &["--num_gpus", "2"]].concat();
        assert_eq!(run_args(&ok, &two).0, 0);
        let (code, _, err) = run_args(&[&["--nproc_per_node=2"][..], &base, &["--num_gpus", "1"]].concat(), &two);
        assert_eq!(code, 1);
        assert!(err.contains("--num_gpus=1, torchrun --nproc_per_node=2, CUDA_VISIBLE_DEVICES=2,3 lists 2 device(s)"));
        let (code, _, err) = run_args(&[&base[..], &["--num_gpus", "1"]].concat(), &two);
        assert_eq!(code, 1);
        assert!(err.contains("--nproc_per_node=1"), "{err}");
        let (code, _, err) = run_args(&base, &Env::default());
        assert_eq!(code, 1);
        assert!(err.contains("CUDA_VISIBLE_DEVICES is not set"), "{err}");
    }

    #[test]
    fn derived_controls_are_written_next_to_the_output() {
        let d = Dir::new();
        let seg = d.write("seg.mp4", b"seg");
        let mut spec = basic(&d);
        spec["depth"] = serde_json::json!({"control_weight": 0.25});
        spec["seg"] = serde_json::json!({"control_weight": 0.25, "input_control": seg});
        spec["edge"] = serde_json::json!({"control_weight": 0, "canny_threshold": "very_high"});
        d.spec(spec);
        let (code, out, err) = d.run(&["--video_save_name", "clip"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("Saved video to ") && out.contains("clip.mp4"), "{out}");
        let h = d.output("out/clip.mp4");
        assert_eq!(h["controls"]["seg"]["input_control_sha256"], sha(b"seg"));
        assert!(h["controls"]["depth"]["input_control_sha256"].is_null());
        assert_eq!(h["controls"]["edge"]["control_weight"], 0.0);
        assert_eq!(d.output("out/depth_input_control.mp4")["mode"], "derived_control");
        assert!(!std::path::Path::new(&d.path("out/seg_input_control.mp4")).exists());
    }

    #[test]
    fn upscale_mode() {
        let d = Dir::new();
        let prev = d.write("prev.mp4", b"previous output");
        d.spec(serde_json::json!({"input_video_path": prev, "upscale": {"control_weight": 0.5}}));
        let (code, _, err) = d.run(&["--num_steps", "10"]);
        assert_eq!(code, 0, "{err}");
        let h = d.output("out/output.mp4");
        assert_eq!(h["mode"], "upscale");
        assert_eq!(h["num_steps"], 10);
        assert_eq!(h["controls"]["upscale"]["control_weight"], 0.5);
        d.spec(serde_json::json!({"input_video_path": prev, "upscale": {"control_weight": -2}}));
        assert_eq!(d.run(&[]).0, 1);
        d.spec(serde_json::json!({"input_video_path": prev, "upscale": {"control_weight": 0.5}, "vis": {"control_weight": 0.5}}));
        assert!(d.run(&[]).2.contains("upscale cannot be combined"));
    }

    #[test]
    fn batch_mode_applies_overrides_in_line_order() {
        let d = Dir::new();
        let (a, b) = (d.write("a.mp4", b"A"), d.write("b.mp4", b"B"));
        let depth = d.write("depth.mp4", b"D");
        // The base spec needs an input video too: `validate_controlnet_specs` checks the script's own.
        d.spec(serde_json::json!({"prompt": "base", "input_video_path": a, "vis": {"control_weight": 0.5}, "depth": {"control_weight": 0.5}}));
        let lines = [
            serde_json::json!({"visual_input": a, "prompt": "first", "control_overrides": {"depth": {"control_weight": 0.1, "input_control": depth}, "seg": {"control_weight": 1}}}),
            serde_json::json!({"visual_input": b}),
        ];
        let jsonl = format!("{}\n\n{}\n", lines[0], lines[1]);
        let batch = d.write("batch.jsonl", jsonl.as_bytes());
        let (code, _, err) = d.run(&["--batch_input_path", &batch, "--batch_size", "2", "--num_steps", "3"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(err.matches("3/3").count(), 1, "one progress bar per batch of 2: {err}");
        let first = d.output("out/video_0/output.mp4");
        assert_eq!(
            (first["prompt"].as_str(), first["input_video_sha256"].as_str()),
            (Some("first"), Some(&*sha(b"A")))
        );
        assert_eq!(first["controls"]["depth"]["control_weight"], 0.1);
        assert_eq!(first["controls"]["depth"]["input_control_sha256"], sha(b"D"));
        assert!(first["controls"].get("seg").is_none(), "overrides of absent controls are ignored");
        let second = d.output("out/video_1/output.mp4");
        assert_eq!(
            (second["prompt"].as_str(), second["input_video_sha256"].as_str()),
            (Some("base"), Some(&*sha(b"B")))
        );
        assert_eq!(d.output("out/video_1/depth_input_control.mp4")["input_video_sha256"], sha(b"B"));
    }

    #[test]
    fn failure_injection_stops_after_the_first_step() {
        let d = Dir::new();
        d.spec(basic(&d));
        let out = d.path("out");
        let spec = d.path("spec.json");
        let env = Env { fail: Some("CUDA out of memory".into()), ..one_gpu() };
        let (code, _, err) = run_args(&[SCRIPT, "--controlnet_specs", &spec, "--video_save_folder", &out], &env);
        assert_eq!(code, 1);
        assert!(err.contains("| 1/35 [") && !err.contains("2/35"), "{err}");
        assert!(err.ends_with("RuntimeError: CUDA out of memory\n"), "{err}");
        assert!(!std::path::Path::new(&d.path("out/output.mp4")).exists());
    }

    #[test]
    fn step_delay_comes_from_the_environment() {
        assert_eq!(step_ms(&Env::default()).ok(), Some(DEFAULT_STEP_MS));
        assert_eq!(step_ms(&Env { step_ms: Some("5".into()), ..Env::default() }).ok(), Some(5));
        assert!(step_ms(&Env { step_ms: Some("fast".into()), ..Env::default() }).is_err());
    }
}
