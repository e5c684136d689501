//! Cosmos Transfer runs: prompts, run parameters, and how a run compiles into a job.

use serde::{Deserialize, Serialize};

/// How runs compile into jobs: where the model lives and how its container is set up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CosmosConfig {
    /// Container image with the cosmos-transfer1 checkout; `None` runs `torchrun`
    /// from the agent's PATH (the process runtime, e.g. the stand-in under `cosmos up`).
    pub image: Option<String>,
    /// The checkout root inside the image (scripts and `checkpoints/` under it).
    pub checkout_dir: String,
    /// Agent volume mounted at `<checkout_dir>/checkpoints` (image runs only).
    pub checkpoint_volume: Option<String>,
    /// Agent volume mounted as the Hugging Face cache (image runs only).
    pub hf_cache_volume: Option<String>,
    /// Shared memory for the container.
    pub shm_bytes: u64,
    /// Negative prompt given to prompts created without one.
    pub default_negative_prompt: String,
    /// Time limit of one attempt of a run.
    pub timeout_ms: u64,
    /// Attempts per run, the first included.
    pub max_attempts: u32,
    /// Environment every run gets (`--run-env NAME=VALUE`; `cosmos up` passes the stand-in's knobs this way).
    #[serde(default)]
    pub run_env: std::collections::BTreeMap<String, String>,
}

/// The negative prompt the predecessor used by default.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "The video captures a game playing, with bad crappy graphics and cartoonish frames. It represents a recording of old outdated games. The lighting looks very fake. The textures are very raw and basic. The geometries are very primitive. The images are very pixelated and of poor CG quality. There are many subtitles in the footage. Overall, the video is unrealistic at all.";

impl Default for CosmosConfig {
    fn default() -> Self {
        CosmosConfig {
            image: None,
            checkout_dir: "/workspace".into(),
            checkpoint_volume: Some("checkpoints".into()),
            hf_cache_volume: Some("hf_cache".into()),
            shm_bytes: 8 << 30,
            default_negative_prompt: DEFAULT_NEGATIVE_PROMPT.into(),
            timeout_ms: 4 * 3600 * 1000,
            max_attempts: 3,
            run_env: Default::default(),
        }
    }
}

pub use cosmos_controller_core::prompt::{BlobRef, Prompt, PromptVideos};
use cosmos_proto::spec::{InputArtifact, Mount, OutputArtifact};
use cosmos_proto::{JobSpec, Sha256};
use std::collections::BTreeMap;

/// Script of a transfer (and upscale) run, relative to the checkout.
pub const TRANSFER_SCRIPT: &str = "cosmos_transfer1/diffusion/inference/transfer.py";
/// Script of the Pixtral prompt upsampler, relative to the checkout.
pub const UPSAMPLER_SCRIPT: &str = "cosmos_transfer1/auxiliary/upsampler/inference/upsampler_pipeline.py";
/// Where a run's result lands, relative to its work directory.
pub const OUTPUT_VIDEO: &str = "outputs/output.mp4";
/// An enhancement's result: the upsampler prints it and writes no file, so
/// its standard output is delivered as the run's output.
pub const ENHANCE_RESULT: &str = cosmos_proto::spec::STDOUT_LOG;
/// What starts the upsampler's result line (`print("Upsampled prompt:", text)`).
pub const UPSAMPLED_PREFIX: &str = "Upsampled prompt: ";
/// Python's exit status for a usage error: argparse refused the arguments, or
/// the script file does not exist. Another attempt would fail the same way.
pub const PYTHON_USAGE_EXIT: i32 = 2;
/// Longest prompt text accepted.
pub const PROMPT_BYTES_MAX: usize = 16 * 1024;
/// Longest prompt name accepted (derived names are shorter).
pub const PROMPT_NAME_BYTES_MAX: usize = 64;
/// Longest derived name.
pub const DERIVED_NAME_BYTES_MAX: usize = 40;
/// Most runs one request may create.
pub const RUNS_PER_REQUEST_MAX: usize = 10_000;
/// Label keys on a run's job.
pub mod labels {
    /// The run id (`rs_…`).
    pub const RUN: &str = "cosmos.run";
    /// `transfer`, `upscale` or `enhance`.
    pub const KIND: &str = "cosmos.kind";
    /// The prompt id (`ps_…`).
    pub const PROMPT: &str = "cosmos.prompt";
    /// The run's parameters, as JSON.
    pub const PARAMS: &str = "cosmos.params";
    /// For an upscale: the run it upscales.
    pub const PARENT_RUN: &str = "cosmos.parent_run";
}

/// A prompt as submitted; the controller fills id, defaults and timestamps.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPrompt {
    /// The prompt text.
    pub text: String,
    /// A name; derived from the text when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Negative prompt; the controller's default when absent.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Videos already uploaded to the blob store.
    pub videos: Option<PromptVideos>,
    /// The prompt this one derives from.
    #[serde(default)]
    pub parent: Option<String>,
}

/// A parameter broke its rule.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("`{param}` {problem}")]
pub struct ParamError {
    /// The parameter, as the CLI flag names it (`steps`, `guidance`, …).
    pub param: &'static str,
    /// What is wrong, with the accepted range.
    pub problem: String,
}

fn param_err(param: &'static str, problem: impl Into<String>) -> ParamError {
    ParamError { param, problem: problem.into() }
}

impl NewPrompt {
    /// Checks the text, name, negative prompt and that videos are given.
    pub fn validate(&self) -> Result<(), ParamError> {
        self.validate_text()?;
        if self.videos.is_none() {
            return Err(param_err("videos", "are missing: a prompt needs at least color.mp4"));
        }
        Ok(())
    }

    /// Checks the text, name and negative prompt: what a client can check before uploading videos.
    pub fn validate_text(&self) -> Result<(), ParamError> {
        if self.text.trim().is_empty() {
            return Err(param_err("prompt", "is empty: give the text describing the video to generate"));
        }
        if self.text.len() > PROMPT_BYTES_MAX {
            return Err(param_err("prompt", format!("is {} bytes; at most {PROMPT_BYTES_MAX}", self.text.len())));
        }
        if let Some(n) = &self.negative_prompt {
            if n.len() > PROMPT_BYTES_MAX {
                return Err(param_err("negative", format!("is {} bytes; at most {PROMPT_BYTES_MAX}", n.len())));
            }
        }
        if let Some(name) = &self.name {
            let ok = !name.is_empty()
                && name.len() <= PROMPT_NAME_BYTES_MAX
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return Err(param_err(
                    "name",
                    format!("`{name}` must be 1 to {PROMPT_NAME_BYTES_MAX} characters of a-z, 0-9 and _"),
                ));
            }
        }
        Ok(())
    }
}

/// Words that say little about a scene, left out of derived names.
const STOP_WORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "of", "in", "on", "at", "to", "for", "with", "by", "from", "into", "onto",
    "over", "under", "is", "are", "was", "were", "be", "been", "being", "it", "its", "this", "that", "these", "those",
    "as", "while", "then", "than", "there", "here", "very", "some", "any", "each", "every", "video", "scene", "shows",
    "showing", "captures", "depicts", "image", "camera", "view", "which", "who", "has", "have", "had", "his", "her",
    "their", "our", "your", "my", "we", "they", "he", "she", "you", "i", "not", "no", "so", "up", "down", "out", "off",
];

/// A short name from the prompt text: its first three keywords, `[a-z0-9_]`,
/// at most [`DERIVED_NAME_BYTES_MAX`]; `prompt` when no keyword is left.
pub fn derive_name(text: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    for raw in text.split(|c: char| !c.is_alphanumeric()) {
        let word: String =
            raw.chars().flat_map(|c| c.to_lowercase()).map(fold_accent).filter(|c| c.is_ascii_alphanumeric()).collect();
        if word.len() < 2 || STOP_WORDS.contains(&word.as_str()) || word.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        words.push(word);
        if words.len() == 3 {
            break;
        }
    }
    let mut name = String::new();
    for w in words {
        let sep = usize::from(!name.is_empty());
        if name.len() + sep + w.len() > DERIVED_NAME_BYTES_MAX {
            if name.is_empty() {
                name = w[..DERIVED_NAME_BYTES_MAX].to_string();
            }
            break;
        }
        if sep == 1 {
            name.push('_');
        }
        name.push_str(&w);
    }
    if name.is_empty() { "prompt".to_string() } else { name }
}

/// Latin letters with diacritics as their base letter, so `café` names as `cafe`.
fn fold_accent(c: char) -> char {
    match c {
        'à'..='å' => 'a',
        'ç' => 'c',
        'è'..='ë' => 'e',
        'ì'..='ï' => 'i',
        'ñ' => 'n',
        'ò'..='ö' | 'ø' => 'o',
        'ù'..='ü' => 'u',
        'ý' | 'ÿ' => 'y',
        'ß' => 's',
        other => other,
    }
}

/// `vis` blur strength and `edge` canny threshold levels.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strength {
    /// `very_low`.
    VeryLow,
    /// `low`.
    Low,
    /// `medium`, the default.
    #[default]
    Medium,
    /// `high`.
    High,
    /// `very_high`.
    VeryHigh,
}

impl Strength {
    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Strength::VeryLow => "very_low",
            Strength::Low => "low",
            Strength::Medium => "medium",
            Strength::High => "high",
            Strength::VeryHigh => "very_high",
        }
    }
}

impl std::str::FromStr for Strength {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "very_low" => Strength::VeryLow,
            "low" => Strength::Low,
            "medium" => Strength::Medium,
            "high" => Strength::High,
            "very_high" => Strength::VeryHigh,
            _ => return Err(format!("`{s}` is not one of very_low, low, medium, high, very_high")),
        })
    }
}

/// Control weights, each 0–1; a weight of 0 leaves that control out.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Blurred visual input.
    pub vis: f64,
    /// Canny edges.
    pub edge: f64,
    /// Depth.
    pub depth: f64,
    /// Segmentation.
    pub seg: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { vis: 0.25, edge: 0.25, depth: 0.25, seg: 0.25 }
    }
}

/// Parameters of a transfer run; every field has the contract's default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferParams {
    /// Control weights.
    pub weights: Weights,
    /// Diffusion steps, 1–100.
    pub steps: u32,
    /// Classifier-free guidance, 1–20.
    pub guidance: f64,
    /// Initial noise level, 0–80.
    pub sigma_max: f64,
    /// Blur of the `vis` control.
    pub blur_strength: Strength,
    /// Threshold of the `edge` control.
    pub canny_threshold: Strength,
    /// Enhance the prompt with the upsampler before generating (`transfer.py --upsample_prompt`).
    pub upsample_prompt: bool,
    /// Frames per second of the output, 1–60.
    pub fps: u32,
    /// Random seed, 1–2^32−1.
    pub seed: u64,
    /// GPUs for the run (one process each).
    pub gpus: u32,
    /// Higher runs first.
    pub priority: i32,
}

impl Default for TransferParams {
    fn default() -> Self {
        TransferParams {
            weights: Weights::default(),
            steps: 35,
            guidance: 5.0,
            sigma_max: 70.0,
            blur_strength: Strength::Medium,
            canny_threshold: Strength::Medium,
            upsample_prompt: false,
            fps: 24,
            seed: 1,
            gpus: 1,
            priority: 0,
        }
    }
}

/// Most GPUs one run may use (one node).
pub const RUN_GPUS_MAX: u32 = 8;

fn check_range(param: &'static str, value: f64, lo: f64, hi: f64, default: &str) -> Result<(), ParamError> {
    if !(value.is_finite() && value >= lo && value <= hi) {
        return Err(param_err(param, format!("must be between {lo} and {hi} (default {default}); got {value}")));
    }
    Ok(())
}

impl TransferParams {
    /// Checks every range the contract gives.
    pub fn validate(&self) -> Result<(), ParamError> {
        check_range("steps", f64::from(self.steps), 1.0, 100.0, "35")?;
        check_range("guidance", self.guidance, 1.0, 20.0, "5.0")?;
        check_range("sigma-max", self.sigma_max, 0.0, 80.0, "70")?;
        check_range("fps", f64::from(self.fps), 1.0, 60.0, "24")?;
        if !(1..=u64::from(u32::MAX)).contains(&self.seed) {
            return Err(param_err("seed", format!("must be between 1 and 4294967295 (default 1); got {}", self.seed)));
        }
        let w = self.weights;
        for (name, value) in [
            ("weights (vis)", w.vis),
            ("weights (edge)", w.edge),
            ("weights (depth)", w.depth),
            ("weights (seg)", w.seg),
        ] {
            check_range(name, value, 0.0, 1.0, "0.25")?;
        }
        if [w.vis, w.edge, w.depth, w.seg].iter().all(|&v| v == 0.0) {
            return Err(param_err("weights", "are all 0: give at least one control a weight above 0"));
        }
        if !(1..=RUN_GPUS_MAX).contains(&self.gpus) {
            return Err(param_err(
                "gpus",
                format!("must be between 1 and {RUN_GPUS_MAX} (one node); got {}", self.gpus),
            ));
        }
        Ok(())
    }
}

/// Parameters of an upscale run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpscaleParams {
    /// Weight of the upscale control, 0–1.
    pub weight: f64,
    /// A prompt to guide the upscale; none keeps the model's default.
    pub prompt: Option<String>,
    /// GPUs for the run.
    pub gpus: u32,
    /// Higher runs first.
    pub priority: i32,
}

impl Default for UpscaleParams {
    fn default() -> Self {
        UpscaleParams { weight: 0.5, prompt: None, gpus: 1, priority: 0 }
    }
}

/// Diffusion steps of an upscale, as the contract fixes them.
pub const UPSCALE_STEPS: u32 = 10;
/// Where an upscale's input video goes in its work directory.
pub const UPSCALE_INPUT: &str = "inputs/input.mp4";

impl UpscaleParams {
    /// Checks the weight, prompt and GPUs.
    pub fn validate(&self) -> Result<(), ParamError> {
        check_range("weight", self.weight, 0.0, 1.0, "0.5")?;
        if self.weight == 0.0 {
            return Err(param_err("weight", "is 0, which upscales nothing: give a weight above 0"));
        }
        if self.prompt.as_ref().is_some_and(|p| p.len() > PROMPT_BYTES_MAX) {
            return Err(param_err("prompt", format!("is over {PROMPT_BYTES_MAX} bytes")));
        }
        if !(1..=RUN_GPUS_MAX).contains(&self.gpus) {
            return Err(param_err(
                "gpus",
                format!("must be between 1 and {RUN_GPUS_MAX} (one node); got {}", self.gpus),
            ));
        }
        Ok(())
    }
}

/// What a run does.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Video to video with control signals.
    Transfer,
    /// 4K upscale of a finished transfer.
    Upscale,
    /// Prompt enhancement with the upsampler.
    Enhance,
}

impl RunKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Transfer => "transfer",
            RunKind::Upscale => "upscale",
            RunKind::Enhance => "enhance",
        }
    }

    /// From the label value.
    pub fn parse(s: &str) -> Option<RunKind> {
        [RunKind::Transfer, RunKind::Upscale, RunKind::Enhance].into_iter().find(|k| k.as_str() == s)
    }
}

/// A file the run's job needs, whose bytes the caller must put in the blob
/// store (the spec JSON and item lists are generated here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Path in the work directory.
    pub path: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// A run compiled into a job: the spec, and generated files whose digests the
/// spec's inputs already name (store them before submitting).
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The job.
    pub spec: JobSpec,
    /// Files to put in the blob store.
    pub files: Vec<GeneratedFile>,
}

impl CosmosConfig {
    /// Checks the configuration by compiling a sample run: a bad image name or
    /// limit is reported at start-up, not at every submission.
    pub fn validate(&self) -> Result<(), cosmos_proto::SpecError> {
        if !self.checkout_dir.starts_with('/') {
            return Err(cosmos_proto::SpecError {
                field: "checkout_dir",
                problem: format!("`{}` must be an absolute path inside the image", self.checkout_dir),
            });
        }
        let blob = BlobRef { sha256: Sha256([0; 32]), size_bytes: 1 };
        let prompt = Prompt {
            id: "ps_000000000000".into(),
            name: "sample".into(),
            text: "sample".into(),
            negative_prompt: self.default_negative_prompt.clone(),
            videos: PromptVideos { color: blob, depth: Some(blob), seg: Some(blob) },
            parent: None,
            created_ms: 0,
        };
        self.compile_transfer("rs_000000000000", &prompt, &TransferParams::default()).spec.validate()
    }

    fn script(&self, script: &str) -> String {
        format!("{}/{script}", self.checkout_dir.trim_end_matches('/'))
    }

    fn torchrun(&self, gpus: u32, script: &str) -> Vec<String> {
        vec![
            "torchrun".into(),
            format!("--nproc_per_node={gpus}"),
            "--nnodes=1".into(),
            "--node_rank=0".into(),
            self.script(script),
        ]
    }

    /// The job skeleton every kind of run shares: image, mounts, shared memory, limits, labels.
    fn base_spec(&self, name: String, command: Vec<String>, gpus: u32, priority: i32) -> JobSpec {
        let mut spec = JobSpec::command(&name, command);
        spec.gpus = gpus;
        spec.priority = priority;
        spec.timeout_ms = self.timeout_ms;
        spec.max_attempts = self.max_attempts;
        spec.env.extend(self.run_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        // Every Cosmos command is a Python script under torchrun: exit 2 is a usage error.
        spec.terminal_exit_codes = vec![PYTHON_USAGE_EXIT];
        if let Some(image) = &self.image {
            spec.image = Some(image.clone());
            // The contract runs the scripts from the checkout root; the job's files are then
            // reached through absolute paths under the work mount (see `work`).
            spec.workdir = Some(self.checkout_dir.clone());
            spec.ipc_host = true;
            spec.shm_bytes = Some(self.shm_bytes);
            spec.env.insert("PYTHONPATH".into(), self.checkout_dir.clone());
            if let Some(v) = &self.checkpoint_volume {
                spec.mounts.push(Mount {
                    volume: v.clone(),
                    target: format!("{}/checkpoints", self.checkout_dir.trim_end_matches('/')),
                    read_only: true,
                });
            }
            if let Some(v) = &self.hf_cache_volume {
                spec.mounts.push(Mount {
                    volume: v.clone(),
                    target: "/root/.cache/huggingface".into(),
                    read_only: false,
                });
                spec.env.insert("HF_HOME".into(), "/root/.cache/huggingface".into());
            }
        }
        spec
    }

    /// `transfer.py` with one process per GPU, reading `inputs/spec.json` and writing into `outputs/`.
    fn transfer_command(&self, gpus: u32) -> Vec<String> {
        let mut command = self.torchrun(gpus, TRANSFER_SCRIPT);
        command.extend([
            "--checkpoint_dir".into(),
            self.checkpoint_dir(),
            "--video_save_folder".into(),
            self.work("outputs"),
            "--controlnet_specs".into(),
            self.work("inputs/spec.json"),
            "--num_gpus".into(),
            gpus.to_string(),
        ]);
        command
    }

    /// A path in the attempt's work directory as the command sees it: relative for
    /// a plain process (it runs there), under the work mount in an image (it runs
    /// in the checkout).
    fn work(&self, rel: &str) -> String {
        match self.image {
            Some(_) => format!("{}/{rel}", cosmos_proto::spec::CONTAINER_WORK_DIR),
            None => rel.to_string(),
        }
    }

    fn checkpoint_dir(&self) -> String {
        format!("{}/checkpoints", self.checkout_dir.trim_end_matches('/'))
    }

    /// A transfer run of `prompt` with `params`, as the contract's command and controlnet spec.
    pub fn compile_transfer(&self, run_id: &str, prompt: &Prompt, params: &TransferParams) -> Compiled {
        let mut inputs = vec![input(&prompt.videos.color, "inputs/color.mp4")];
        let mut controls = serde_json::Map::new();
        let mut outputs = vec![OutputArtifact { path: OUTPUT_VIDEO.into(), required: true }];
        let w = params.weights;
        // Blur strength and canny threshold are script arguments, never control keys:
        // `transfer.py` ignores them inside `vis`/`edge` (they go on the command line below).
        if w.vis > 0.0 {
            controls.insert("vis".into(), serde_json::json!({ "control_weight": w.vis }));
        }
        if w.edge > 0.0 {
            controls.insert("edge".into(), serde_json::json!({ "control_weight": w.edge }));
        }
        for (name, weight, video, file) in [
            ("depth", w.depth, &prompt.videos.depth, "depth.mp4"),
            ("seg", w.seg, &prompt.videos.seg, "segmentation.mp4"),
        ] {
            if weight <= 0.0 {
                continue;
            }
            let mut control = serde_json::json!({ "control_weight": weight });
            match video {
                Some(v) => {
                    let path = format!("inputs/{file}");
                    control["input_control"] = serde_json::Value::String(self.work(&path));
                    inputs.push(input(v, &path));
                }
                // The model derives the control itself and may save what it derived.
                None => {
                    outputs.push(OutputArtifact { path: format!("outputs/{name}_input_control.mp4"), required: false })
                }
            }
            controls.insert(name.into(), control);
        }
        let mut doc = serde_json::json!({
            "prompt": prompt.text,
            "negative_prompt": prompt.negative_prompt,
            "input_video_path": self.work("inputs/color.mp4"),
            "num_steps": params.steps,
            "guidance": params.guidance,
            "sigma_max": params.sigma_max,
            "seed": params.seed,
            "fps": params.fps,
        });
        for (k, v) in controls {
            doc[k] = v;
        }
        let spec_json = serde_json::to_vec_pretty(&doc).expect("JSON values serialise");
        let mut command = self.transfer_command(params.gpus);
        command.extend([
            "--offload_text_encoder_model".into(),
            "--offload_guardrail_models".into(),
            "--guidance".into(),
            params.guidance.to_string(),
            "--seed".into(),
            params.seed.to_string(),
            // Flags rather than spec keys: argparse checks their choices before any
            // weights load, where a spec key is taken as is (see README, Cosmos Transfer).
            "--blur_strength".into(),
            params.blur_strength.as_str().into(),
            "--canny_threshold".into(),
            params.canny_threshold.as_str().into(),
        ]);
        if params.upsample_prompt {
            command.push("--upsample_prompt".into());
        }
        let mut spec = self.base_spec(format!("transfer {}", prompt.name), command, params.gpus, params.priority);
        inputs.push(generated_input("inputs/spec.json", &spec_json));
        spec.inputs = inputs;
        spec.outputs = outputs;
        spec.labels =
            run_labels(run_id, RunKind::Transfer, &prompt.id, serde_json::to_string(params).expect("params serialise"));
        Compiled { spec, files: vec![GeneratedFile { path: "inputs/spec.json".into(), bytes: spec_json }] }
    }

    /// An upscale of a finished transfer run's video.
    pub fn compile_upscale(
        &self,
        run_id: &str,
        parent_run: &str,
        prompt_id: &str,
        video: Option<&BlobRef>,
        params: &UpscaleParams,
    ) -> Compiled {
        let mut doc = serde_json::json!({
            "input_video_path": self.work(UPSCALE_INPUT),
            "upscale": { "control_weight": params.weight },
        });
        if let Some(p) = &params.prompt {
            doc["prompt"] = serde_json::Value::String(p.clone());
        }
        let spec_json = serde_json::to_vec_pretty(&doc).expect("JSON values serialise");
        let mut command = self.transfer_command(params.gpus);
        command.extend([
            "--num_steps".into(),
            UPSCALE_STEPS.to_string(),
            "--batch_size".into(),
            "1".into(),
            "--offload_text_encoder_model".into(),
        ]);
        let mut spec = self.base_spec(format!("upscale {parent_run}"), command, params.gpus, params.priority);
        // Without the video (its run has not ended yet) the scheduler adds it at
        // UPSCALE_INPUT from that run's output once it succeeds.
        spec.inputs = video.map(|v| input(v, UPSCALE_INPUT)).into_iter().collect();
        spec.inputs.push(generated_input("inputs/spec.json", &spec_json));
        spec.outputs = vec![OutputArtifact { path: OUTPUT_VIDEO.into(), required: true }];
        spec.labels =
            run_labels(run_id, RunKind::Upscale, prompt_id, serde_json::to_string(params).expect("params serialise"));
        spec.labels.insert(labels::PARENT_RUN.into(), parent_run.into());
        Compiled { spec, files: vec![GeneratedFile { path: "inputs/spec.json".into(), bytes: spec_json }] }
    }

    /// A prompt enhancement of `prompt` with the upsampler: `upsampler_pipeline.py`
    /// under torchrun with one process, its result read from its standard output.
    pub fn compile_enhance(&self, run_id: &str, prompt: &Prompt) -> Compiled {
        let mut command = self.torchrun(1, UPSAMPLER_SCRIPT);
        command.extend([
            // `--prompt=TEXT`, one argument: a prompt that starts with `-` stays a value for argparse.
            format!("--prompt={}", prompt.text),
            format!("--input_video={}", self.work("inputs/color.mp4")),
            "--checkpoint_dir".into(),
            self.checkpoint_dir(),
        ]);
        let mut spec = self.base_spec(format!("enhance {}", prompt.name), command, 1, 0);
        spec.env.insert("VLLM_WORKER_MULTIPROC_METHOD".into(), "spawn".into());
        spec.inputs = vec![input(&prompt.videos.color, "inputs/color.mp4")];
        spec.outputs = vec![OutputArtifact { path: ENHANCE_RESULT.into(), required: true }];
        spec.labels = run_labels(run_id, RunKind::Enhance, &prompt.id, "{}".into());
        Compiled { spec, files: Vec::new() }
    }
}

/// The upsampler's result in its standard output: the text of the last line
/// that starts with [`UPSAMPLED_PREFIX`] (the rest is logs), or `None` when no
/// such line holds any text.
pub fn upsampled_prompt(stdout: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find_map(|l| l.strip_prefix(UPSAMPLED_PREFIX.trim_end()))?;
    let prompt = line.trim();
    (!prompt.is_empty()).then(|| prompt.to_string())
}

fn input(blob: &BlobRef, path: &str) -> InputArtifact {
    InputArtifact { sha256: blob.sha256, size_bytes: blob.size_bytes, path: path.into() }
}

fn generated_input(path: &str, bytes: &[u8]) -> InputArtifact {
    InputArtifact { sha256: cosmos_cas::digest(bytes), size_bytes: bytes.len() as u64, path: path.into() }
}

fn run_labels(run_id: &str, kind: RunKind, prompt_id: &str, params: String) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::RUN.into(), run_id.into()),
        (labels::KIND.into(), kind.as_str().into()),
        (labels::PROMPT.into(), prompt_id.into()),
        (labels::PARAMS.into(), params),
    ])
}

/// The id with `prefix` (`ps` or `rs`) and `random` as 12 hex digits; the
/// shell draws the bytes (see `shared::new_id`), so this module stays pure.
pub fn format_id(prefix: &str, random: [u8; 6]) -> String {
    format!("{prefix}_{}", random.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Whether `s` looks like an id with `prefix`.
pub fn is_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('_'))
        .is_some_and(|h| h.len() == 12 && h.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(b: u8) -> BlobRef {
        BlobRef { sha256: Sha256([b; 32]), size_bytes: u64::from(b) }
    }

    fn prompt(depth: bool) -> Prompt {
        Prompt {
            id: "ps_000000000001".into(),
            name: "robot_arm".into(),
            text: "A robot arm picks a red cube".into(),
            negative_prompt: "blurry".into(),
            videos: PromptVideos { color: blob(1), depth: depth.then(|| blob(2)), seg: None },
            parent: None,
            created_ms: 0,
        }
    }

    fn spec_json(c: &Compiled) -> serde_json::Value {
        serde_json::from_slice(&c.files[0].bytes).unwrap()
    }

    #[test]
    fn names_come_from_keywords() {
        assert_eq!(derive_name("A robot arm picks up a red cube in a warehouse"), "robot_arm_picks");
        assert_eq!(derive_name("The video shows a CAR, driving at night!"), "car_driving_night");
        assert_eq!(derive_name("the a of 42"), "prompt");
        assert_eq!(derive_name(""), "prompt");
        assert_eq!(derive_name("Ünïcödé café straße"), "unicode_cafe_strase");
        let long = derive_name(&"x".repeat(100));
        assert_eq!(long.len(), DERIVED_NAME_BYTES_MAX);
        for text in ["Über-fast drone over São Paulo", "a b c", "!!!", "rain rain rain rain"] {
            let n = derive_name(text);
            assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'), "{n}");
            assert!(!n.is_empty() && n.len() <= DERIVED_NAME_BYTES_MAX);
            assert_eq!(n, derive_name(text), "deterministic");
        }
    }

    #[test]
    fn defaults_are_the_contracts_and_valid() {
        let p = TransferParams::default();
        assert_eq!((p.steps, p.guidance, p.sigma_max, p.fps, p.seed), (35, 5.0, 70.0, 24, 1));
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn every_range_is_enforced_and_named() {
        let cases: Vec<(&str, Box<dyn Fn(&mut TransferParams)>)> = vec![
            ("steps", Box::new(|p| p.steps = 0)),
            ("steps", Box::new(|p| p.steps = 101)),
            ("guidance", Box::new(|p| p.guidance = 0.5)),
            ("guidance", Box::new(|p| p.guidance = 20.5)),
            ("sigma-max", Box::new(|p| p.sigma_max = -1.0)),
            ("sigma-max", Box::new(|p| p.sigma_max = 81.0)),
            ("fps", Box::new(|p| p.fps = 0)),
            ("fps", Box::new(|p| p.fps = 61)),
            ("seed", Box::new(|p| p.seed = 0)),
            ("seed", Box::new(|p| p.seed = 1 << 32)),
            ("weights (vis)", Box::new(|p| p.weights.vis = 1.5)),
            ("weights (seg)", Box::new(|p| p.weights.seg = -0.1)),
            ("weights (edge)", Box::new(|p| p.weights.edge = f64::NAN)),
            ("weights", Box::new(|p| p.weights = Weights { vis: 0.0, edge: 0.0, depth: 0.0, seg: 0.0 })),
            ("gpus", Box::new(|p| p.gpus = 0)),
            ("gpus", Box::new(|p| p.gpus = RUN_GPUS_MAX + 1)),
        ];
        for (param, breaks) in cases {
            let mut p = TransferParams::default();
            breaks(&mut p);
            let err = p.validate().expect_err(param);
            assert_eq!(err.param, param, "{err}");
        }
        let mut p = TransferParams { steps: 100, guidance: 20.0, ..TransferParams::default() };
        p.sigma_max = 0.0;
        p.seed = u64::from(u32::MAX);
        assert_eq!(p.validate(), Ok(()), "bounds are inclusive");
    }

    #[test]
    fn transfer_spec_follows_the_contract() {
        let cfg = CosmosConfig::default();
        let mut params = TransferParams::default();
        params.weights.edge = 0.0;
        params.blur_strength = Strength::High;
        params.gpus = 2;
        let c = cfg.compile_transfer("rs_0123456789ab", &prompt(true), &params);
        let doc = spec_json(&c);
        assert!(doc.get("edge").is_none(), "a weight-0 control is left out");
        assert_eq!(doc["vis"], serde_json::json!({"control_weight": 0.25}), "nothing the script ignores");
        assert_eq!(doc["depth"]["input_control"], "inputs/depth.mp4");
        assert!(doc["seg"].get("input_control").is_none(), "seg has no video: the model derives it");
        assert_eq!(doc["prompt"], "A robot arm picks a red cube");
        assert_eq!(doc["negative_prompt"], "blurry");
        assert_eq!(doc["input_video_path"], "inputs/color.mp4");
        let cmd = &c.spec.command;
        assert_eq!(cmd[0], "torchrun");
        assert!(cmd.contains(&"--nproc_per_node=2".to_string()));
        assert_eq!(cmd[cmd.iter().position(|a| a == "--num_gpus").unwrap() + 1], "2");
        assert!(cmd[4].ends_with(TRANSFER_SCRIPT));
        assert_eq!(c.spec.gpus, 2);
        let paths: Vec<&str> = c.spec.inputs.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["inputs/color.mp4", "inputs/depth.mp4", "inputs/spec.json"]);
        assert_eq!(c.spec.inputs[2].sha256, cosmos_cas::digest(&c.files[0].bytes));
        assert!(c.spec.outputs.iter().any(|o| o.path == OUTPUT_VIDEO && o.required));
        assert!(c.spec.outputs.iter().any(|o| o.path == "outputs/seg_input_control.mp4" && !o.required));
        assert_eq!(c.spec.labels[labels::RUN], "rs_0123456789ab");
        assert!(c.spec.image.is_none() && c.spec.mounts.is_empty(), "no image configured: a plain process");
        assert_eq!(c.spec.validate(), Ok(()));
    }

    #[test]
    fn image_runs_get_mounts_shared_memory_and_ipc() {
        let cfg = CosmosConfig { image: Some("cosmos-transfer1:latest".into()), ..CosmosConfig::default() };
        let c = cfg.compile_transfer("rs_0123456789ab", &prompt(false), &TransferParams::default());
        assert_eq!(c.spec.image.as_deref(), Some("cosmos-transfer1:latest"));
        assert!(c.spec.ipc_host);
        assert_eq!(c.spec.shm_bytes, Some(8 << 30));
        let targets: Vec<&str> = c.spec.mounts.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(targets, ["/workspace/checkpoints", "/root/.cache/huggingface"]);
        assert_eq!(c.spec.workdir.as_deref(), Some("/workspace"), "run from the checkout root, as the contract says");
        let cmd = &c.spec.command;
        assert_eq!(cmd[cmd.iter().position(|a| a == "--controlnet_specs").unwrap() + 1], "/work/inputs/spec.json");
        assert_eq!(cmd[cmd.iter().position(|a| a == "--video_save_folder").unwrap() + 1], "/work/outputs");
        assert_eq!(spec_json(&c)["input_video_path"], "/work/inputs/color.mp4");
        assert_eq!(c.spec.validate(), Ok(()));
    }

    #[test]
    fn upscale_and_enhance_compile_to_valid_specs() {
        let cfg = CosmosConfig::default();
        let params = UpscaleParams { prompt: Some("sharper".into()), ..UpscaleParams::default() };
        let c = cfg.compile_upscale("rs_0123456789ab", "rs_ba9876543210", "ps_000000000001", Some(&blob(9)), &params);
        let doc = spec_json(&c);
        assert_eq!(doc["upscale"]["control_weight"], 0.5);
        assert_eq!(doc["prompt"], "sharper");
        assert!(c.spec.command.windows(2).any(|w| w[0] == "--num_steps" && w[1] == "10"));
        assert_eq!(c.spec.labels[labels::PARENT_RUN], "rs_ba9876543210");
        assert_eq!(c.spec.validate(), Ok(()));
        assert_eq!(c.spec.terminal_exit_codes, [PYTHON_USAGE_EXIT]);
    }

    /// What `transfer.py` ends up using for `key`: the `--key` flag's value when
    /// the exact token is on the command line, else the spec's top-level key,
    /// else `default` (`parse_arguments`, with `load_controlnet_specs` putting
    /// only top-level non-object keys among the arguments).
    fn as_transfer_py_reads(c: &Compiled, key: &str, default: &str) -> String {
        let cmd = &c.spec.command;
        let script = cmd.iter().position(|a| a.ends_with(TRANSFER_SCRIPT)).expect("transfer.py");
        let argv = &cmd[script + 1..];
        if let Some(i) = argv.iter().rposition(|a| *a == format!("--{key}")) {
            return argv[i + 1].clone();
        }
        match &spec_json(c)[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => default.to_string(),
            other => other.to_string(),
        }
    }

    #[test]
    fn blur_and_canny_reach_the_script_as_it_reads_them() {
        let cfg = CosmosConfig::default();
        let mut params =
            TransferParams { blur_strength: Strength::High, canny_threshold: Strength::Low, ..Default::default() };
        let c = cfg.compile_transfer("rs_0123456789ab", &prompt(false), &params);
        assert_eq!(as_transfer_py_reads(&c, "blur_strength", "medium"), "high");
        assert_eq!(as_transfer_py_reads(&c, "canny_threshold", "medium"), "low");
        let doc = spec_json(&c);
        for control in ["vis", "edge", "depth", "seg"] {
            let keys: Vec<&String> = doc[control].as_object().expect(control).keys().collect();
            assert!(
                keys.iter().all(|k| ["control_weight", "input_control"].contains(&k.as_str())),
                "{control}: {keys:?}"
            );
        }
        let d = cfg.compile_transfer("rs_0123456789ab", &prompt(false), &TransferParams::default());
        assert_eq!(as_transfer_py_reads(&d, "blur_strength", "medium"), "medium");
        assert!(!c.spec.command.contains(&"--upsample_prompt".to_string()));
        params.upsample_prompt = true;
        let u = cfg.compile_transfer("rs_0123456789ab", &prompt(false), &params);
        assert!(u.spec.command.contains(&"--upsample_prompt".to_string()));
        assert_eq!(u.spec.validate(), Ok(()));
    }

    #[test]
    fn enhancement_runs_the_real_upsampler_and_keeps_its_stdout() {
        let cfg = CosmosConfig { image: Some("cosmos-transfer1:latest".into()), ..CosmosConfig::default() };
        let mut p = prompt(false);
        p.text = "-starts with a dash".into();
        let e = cfg.compile_enhance("rs_0123456789ab", &p);
        assert_eq!(e.spec.env["VLLM_WORKER_MULTIPROC_METHOD"], "spawn");
        assert_eq!(
            e.spec.command,
            [
                "torchrun",
                "--nproc_per_node=1",
                "--nnodes=1",
                "--node_rank=0",
                "/workspace/cosmos_transfer1/auxiliary/upsampler/inference/upsampler_pipeline.py",
                "--prompt=-starts with a dash",
                "--input_video=/work/inputs/color.mp4",
                "--checkpoint_dir",
                "/workspace/checkpoints",
            ]
        );
        assert_eq!(e.spec.outputs, [OutputArtifact { path: cosmos_proto::spec::STDOUT_LOG.into(), required: true }]);
        assert!(e.files.is_empty(), "no item file: the upsampler takes its prompt as an argument");
        assert_eq!(e.spec.gpus, 1);
        assert_eq!(e.spec.terminal_exit_codes, [PYTHON_USAGE_EXIT]);
        assert_eq!(e.spec.validate(), Ok(()));
    }

    #[test]
    fn the_upsampled_prompt_is_the_last_result_line() {
        let out =
            b"Loading model\nUpsampled prompt: first try\nINFO more logs\nUpsampled prompt:  A red cube. \r\nbye\n";
        assert_eq!(upsampled_prompt(out).as_deref(), Some("A red cube."));
        assert_eq!(upsampled_prompt(b"Loading model\nDone\n"), None);
        assert_eq!(upsampled_prompt(b"Upsampled prompt: x\nUpsampled prompt: \n"), None, "the last line is empty");
        assert_eq!(upsampled_prompt(b""), None);
        assert_eq!(upsampled_prompt(b"log: Upsampled prompt: not at the start\n"), None);
    }

    #[test]
    fn ids_have_their_prefix_and_twelve_hex_digits() {
        let a = format_id("rs", [0, 1, 0xab, 0xcd, 0xef, 0xff]);
        assert_eq!(a, "rs_0001abcdefff");
        assert!(is_id(&a, "rs"), "{a}");
        assert!(!is_id(&a, "ps"));
        assert!(!is_id("rs_xyz", "rs"));
    }
}
