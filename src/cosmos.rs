//! The Cosmos Transfer commands: prompts, runs, batches, upscale, enhance, download.
//!
//! Videos are hashed here and uploaded to the controller's blob store only
//! when it does not hold them yet; everything a command sends is checked
//! first, so a bad batch line is reported before a single byte moves.

use crate::client::{ApiError, Client, ClientArgs, printable};
use crate::jobs::{elapsed_text, error_summary, gpu_seconds_text, truncate};
use crate::jobs::{print_accounting, print_error};
use anyhow::{Context, bail};
use cosmos_controller::cosmos::{
    BlobRef, NewPrompt, ParamError, Prompt, PromptVideos, Strength, TransferParams, UpscaleParams, Weights,
};
use cosmos_controller::http::JobView;
use cosmos_controller::http::cosmos::{ApplyEnhancement, CreateRuns, CreatedRun, CreatedRuns, RunLine, RunView};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// The input video every prompt needs.
pub const COLOR_VIDEO: &str = "color.mp4";
/// Optional control videos, with the control they feed.
pub const CONTROL_VIDEOS: [(&str, &str); 2] = [("depth.mp4", "depth"), ("segmentation.mp4", "seg")];
/// Most lines in a batch file.
pub const BATCH_LINES_MAX: usize = 10_000;

/// Parameters from the command line; unset ones keep the contract's defaults.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ParamArgs {
    /// Control weights, each 0–1 (0 leaves a control out).
    #[arg(long, num_args = 4, allow_negative_numbers = true, value_names = ["VIS", "EDGE", "DEPTH", "SEG"])]
    pub weights: Option<Vec<f64>>,
    /// Diffusion steps, 1–100 [default 35].
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<u32>,
    /// Guidance, 1–20 [default 5.0].
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// Initial noise, 0–80 [default 70].
    #[arg(long, allow_negative_numbers = true)]
    pub sigma_max: Option<f64>,
    /// Blur of the vis control: very_low, low, medium, high, very_high [default medium].
    #[arg(long, allow_negative_numbers = true)]
    pub blur_strength: Option<Strength>,
    /// Canny threshold of the edge control: very_low … very_high [default medium].
    #[arg(long, allow_negative_numbers = true)]
    pub canny_threshold: Option<Strength>,
    /// Enhance the prompt with the upsampler before generating (`transfer.py --upsample_prompt`).
    #[arg(long)]
    pub upsample_prompt: bool,
    /// Output frames per second, 1–60 [default 24].
    #[arg(long, allow_negative_numbers = true)]
    pub fps: Option<u32>,
    /// Random seed, 1–4294967295 [default 1]; a range or list makes one run each: `1..8`, `1,5,9`.
    #[arg(long, allow_negative_numbers = true, value_name = "SEED|A..B|A,B,…")]
    pub seed: Option<String>,
    /// GPUs per run, on one host [default 1].
    #[arg(long, allow_negative_numbers = true)]
    pub gpus: Option<u32>,
    /// Higher runs first [default 0].
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// One run per combination, submitted together: `seed=1..8,guidance=5,7` (repeatable). Sweeps seed,
    /// guidance, steps, sigma-max, fps, blur-strength, canny-threshold; `A..B[:STEP]` includes both ends.
    #[arg(long, value_name = "PARAM=VALUES")]
    pub sweep: Vec<String>,
}

impl ParamArgs {
    /// The parameters these flags give, checked against the contract's ranges.
    pub fn params(&self) -> Result<TransferParams, ParamError> {
        let d = TransferParams::default();
        let weights = match self.weights.as_deref() {
            Some([vis, edge, depth, seg]) => Weights { vis: *vis, edge: *edge, depth: *depth, seg: *seg },
            Some(_) => {
                return Err(ParamError { param: "weights", problem: "takes four numbers: VIS EDGE DEPTH SEG".into() });
            }
            None => d.weights,
        };
        let p = TransferParams {
            weights,
            steps: self.steps.unwrap_or(d.steps),
            guidance: self.guidance.unwrap_or(d.guidance),
            sigma_max: self.sigma_max.unwrap_or(d.sigma_max),
            blur_strength: self.blur_strength.unwrap_or(d.blur_strength),
            canny_threshold: self.canny_threshold.unwrap_or(d.canny_threshold),
            upsample_prompt: self.upsample_prompt,
            fps: self.fps.unwrap_or(d.fps),
            seed: match self.seed.as_deref() {
                // A sweep's seeds are set per run; the base keeps the default.
                Some(s) if crate::sweep::is_sweep(s) => d.seed,
                Some(s) => s.parse().map_err(|_| ParamError {
                    param: "seed",
                    problem: format!("takes a whole number, a range `A..B` or a list `A,B`; got `{s}`"),
                })?,
                None => d.seed,
            },
            gpus: self.gpus.unwrap_or(d.gpus),
            priority: self.priority.unwrap_or(d.priority),
        };
        p.validate()?;
        Ok(p)
    }
}

/// A parameter error as a command-line flag names it: `--steps must be between …`.
pub fn flag_error(e: &ParamError) -> anyhow::Error {
    anyhow::anyhow!("--{} {}", e.param, flag_terms(&e.problem))
}

/// A parameter error as a batch line names its key: `` `sigma_max` must be between … ``.
fn key_error(e: &ParamError) -> String {
    format!("`{}` {}", e.param.replace('-', "_"), e.problem)
}

/// `text` with the job spec's field names turned into the flags a single-run command takes.
fn flag_terms(text: &str) -> String {
    text.replace("`gpus`", "--gpus").replace("`steps`", "--steps").replace("`priority`", "--priority")
}

/// A refused single-run submission in the terms of the command typed: the
/// prompt (or run) it is about, never a line of a batch file the user did not write.
fn single_run_error(e: anyhow::Error, subjects: &[String], what: &str) -> anyhow::Error {
    let api = match e.downcast::<ApiError>() {
        Ok(api) => api,
        Err(e) => return e,
    };
    let Some(l) = api.body.line else { return anyhow::anyhow!("{}", flag_terms(&api.body.error)) };
    let rest = api.body.error.strip_prefix(&format!("line {l}: ")).unwrap_or(&api.body.error);
    let rest = flag_terms(rest);
    match subjects.get(l.wrapping_sub(1)) {
        Some(s) if rest.contains(s.as_str()) => anyhow::anyhow!("{rest}"),
        Some(s) => anyhow::anyhow!("{what} {s}: {rest}"),
        None => anyhow::anyhow!("{rest}"),
    }
}

/// A video directory's files, checked and hashed (not yet uploaded).
struct LocalVideos {
    dir: PathBuf,
    /// (file name, sha256 hex, size, path)
    files: Vec<(&'static str, String, u64, PathBuf)>,
}

/// Finds and hashes `color.mp4` and the optional control videos of `dir`.
fn scan_video_dir(dir: &Path) -> anyhow::Result<LocalVideos> {
    if !dir.is_dir() {
        bail!("video directory {} does not exist or is not a directory", dir.display());
    }
    let mut files = Vec::new();
    for name in std::iter::once(COLOR_VIDEO).chain(CONTROL_VIDEOS.iter().map(|(f, _)| *f)) {
        let path = dir.join(name);
        if !path.is_file() {
            if name == COLOR_VIDEO {
                bail!(
                    "video directory {} has no {COLOR_VIDEO}: a prompt needs its input video there \
                     (depth.mp4 and segmentation.mp4 are optional)",
                    dir.display()
                );
            }
            continue;
        }
        let (sha, size) = cosmos_cas::hash_file(&path).with_context(|| format!("cannot read {}", path.display()))?;
        files.push((name, sha.to_string(), size, path));
    }
    // Say which files were taken and which not: `Depth.mp4` is not `depth.mp4`.
    let taken: Vec<&str> = files.iter().map(|f| f.0).collect();
    let mut skipped: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| !taken.contains(&n.as_str()))
        .collect();
    skipped.sort();
    let known = std::iter::once(COLOR_VIDEO).chain(CONTROL_VIDEOS.iter().map(|(f, _)| *f));
    let hint = skipped
        .iter()
        .filter_map(|n| known.clone().find(|k| k.eq_ignore_ascii_case(n) && *k != n).map(|k| format!("{n} is not {k}")))
        .collect::<Vec<_>>();
    eprintln!(
        "{}: taken {}{}",
        dir.display(),
        taken.join(", "),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(
                "; not taken {} (only {COLOR_VIDEO}, depth.mp4 and segmentation.mp4 are read{})",
                skipped.join(", "),
                if hint.is_empty() {
                    String::new()
                } else {
                    format!("; names are case-sensitive: {}", hint.join(", "))
                }
            )
        }
    );
    Ok(LocalVideos { dir: dir.to_path_buf(), files })
}

impl LocalVideos {
    /// Uploads what the controller lacks; returns the blob references.
    fn upload(&self, client: &Client) -> anyhow::Result<PromptVideos> {
        let mut refs: BTreeMap<&str, BlobRef> = BTreeMap::new();
        for (name, sha, size, path) in &self.files {
            client.put_blob(sha, path, *size).with_context(|| format!("uploading {}", path.display()))?;
            refs.insert(name, BlobRef { sha256: sha.parse().expect("hash_file gives hex"), size_bytes: *size });
        }
        Ok(PromptVideos {
            color: refs[COLOR_VIDEO],
            depth: refs.get("depth.mp4").copied(),
            seg: refs.get("segmentation.mp4").copied(),
        })
    }
}

/// `cosmos create prompt TEXT VIDEO_DIR`.
pub fn create_prompt(
    args: &ClientArgs,
    text: &str,
    video_dir: &Path,
    name: Option<String>,
    negative: Option<String>,
) -> anyhow::Result<()> {
    let local = scan_video_dir(video_dir)?;
    let new = NewPrompt { text: text.to_string(), name, negative_prompt: negative, videos: None, parent: None };
    // Checked before the upload, so a bad name costs no transfer.
    new.validate_text().map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = Client::new(args)?;
    let videos = local.upload(&client)?;
    let prompt: Prompt = client.post("/v1/prompts", &NewPrompt { videos: Some(videos), ..new })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&prompt)?);
    } else {
        println!("{} {}  ({} videos from {})", prompt.id, prompt.name, local.files.len(), local.dir.display());
    }
    Ok(())
}

/// `cosmos inference PROMPT_ID…`: one run per prompt and sweep combination,
/// submitted together (all or none); with `then_upscale`, each with its
/// upscale, which runs once it has succeeded.
pub fn inference(
    args: &ClientArgs,
    prompt_ids: &[String],
    flags: &ParamArgs,
    then_upscale: Option<UpscaleParams>,
    wait: bool,
) -> anyhow::Result<bool> {
    let base = flags.params().map_err(|e| flag_error(&e))?;
    if let Some(up) = &then_upscale {
        up.validate().map_err(|e| anyhow::anyhow!("--upscale-{} {}", e.param, e.problem))?;
    }
    let axes = crate::sweep::axes(flags.seed.as_deref(), &flags.sweep)?;
    let combos = crate::sweep::combinations(&base, &axes, flag_error)?;
    let per_run = if then_upscale.is_some() { 2 } else { 1 };
    let total = prompt_ids.len().saturating_mul(combos.len()).saturating_mul(per_run);
    if !axes.is_empty() && total > crate::sweep::SWEEP_RUNS_MAX {
        bail!(
            "this sweep makes {total} runs ({} prompts × {} combinations{}); at most {} are submitted at once \
             (SWEEP_RUNS_MAX): narrow the ranges or split the sweep; nothing was submitted",
            prompt_ids.len(),
            combos.len(),
            if per_run == 2 { " × 2 with --then-upscale" } else { "" },
            crate::sweep::SWEEP_RUNS_MAX
        );
    }
    let mut runs = Vec::with_capacity(prompt_ids.len() * combos.len());
    let mut subjects = Vec::with_capacity(runs.capacity());
    let mut labels = Vec::with_capacity(runs.capacity());
    for id in prompt_ids {
        for (label, params) in &combos {
            runs.push(RunLine {
                prompt_id: Some(id.clone()),
                prompt: None,
                params: params.clone(),
                then_upscale: then_upscale.clone(),
            });
            subjects.push(id.clone());
            labels.push(label.clone());
        }
    }
    let client = Client::new(args)?;
    let created: CreatedRuns =
        client.post("/v1/runs", &CreateRuns { runs }).map_err(|e| single_run_error(e, &subjects, "prompt"))?;
    if !args.json {
        // In line order, each line's upscale right after its transfer.
        let per_line = if then_upscale.is_some() { 2 } else { 1 };
        for (i, r) in created.runs.iter().enumerate() {
            if per_line == 2 && i % 2 == 1 {
                println!("{} upscale of {} (job {})", r.run_id, created.runs[i - 1].run_id, r.job_id);
                continue;
            }
            let label = labels.get(i / per_line).filter(|l| !l.is_empty()).map(|l| format!(" {l}"));
            println!("{} prompt {}{} (job {})", r.run_id, r.prompt_id, label.unwrap_or_default(), r.job_id);
        }
    }
    let ok = if wait { wait_runs(args, &client, &created.runs)? } else { true };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run_views(&client, &created.runs)?)?);
    }
    Ok(ok)
}

/// One line of a batch file: a prompt (by id, or text and video directory) and its parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    /// An existing prompt.
    #[serde(default)]
    prompt_id: Option<String>,
    /// Text of a new prompt.
    #[serde(default)]
    prompt: Option<String>,
    /// Its video directory (relative paths start at the batch file's directory).
    #[serde(default)]
    video_dir: Option<PathBuf>,
    /// Its name.
    #[serde(default)]
    name: Option<String>,
    /// Its negative prompt.
    #[serde(default)]
    negative: Option<String>,
    #[serde(default)]
    weights: Option<[f64; 4]>,
    #[serde(default)]
    steps: Option<u32>,
    #[serde(default)]
    guidance: Option<f64>,
    #[serde(default)]
    sigma_max: Option<f64>,
    #[serde(default)]
    blur_strength: Option<Strength>,
    #[serde(default)]
    canny_threshold: Option<Strength>,
    #[serde(default)]
    upsample_prompt: Option<bool>,
    #[serde(default)]
    fps: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    gpus: Option<u32>,
    #[serde(default)]
    priority: Option<i32>,
}

/// A checked batch line: its line number, the run to ask for and the videos to upload.
struct PreparedLine {
    line: usize,
    run: RunLine,
    videos: Option<LocalVideos>,
}

/// Reads and checks every line of a batch file; the first bad line fails the whole file.
fn prepare_batch(file: &Path) -> anyhow::Result<Vec<PreparedLine>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        if out.len() == BATCH_LINES_MAX {
            bail!("{}: more than {BATCH_LINES_MAX} runs; split the batch", file.display());
        }
        let at = |msg: String| anyhow::anyhow!("{}:{n}: {msg}; nothing was submitted", file.display());
        let line: BatchLine = serde_json::from_str(raw).map_err(|e| at(format!("not a valid run line: {e}")))?;
        let args = ParamArgs {
            weights: line.weights.map(|w| w.to_vec()),
            steps: line.steps,
            guidance: line.guidance,
            sigma_max: line.sigma_max,
            blur_strength: line.blur_strength,
            canny_threshold: line.canny_threshold,
            upsample_prompt: line.upsample_prompt.unwrap_or(false),
            fps: line.fps,
            seed: line.seed.map(|s| s.to_string()),
            gpus: line.gpus,
            priority: line.priority,
            sweep: Vec::new(),
        };
        let params = args.params().map_err(|e| at(key_error(&e)))?;
        let (run, videos) = match (line.prompt_id, line.prompt, line.video_dir) {
            (Some(id), None, None) => {
                if line.name.is_some() || line.negative.is_some() {
                    return Err(at("`name` and `negative` apply to a new prompt, not to `prompt_id`".into()));
                }
                (RunLine { prompt_id: Some(id), params, ..Default::default() }, None)
            }
            (None, Some(text), Some(dir)) => {
                let dir = if dir.is_absolute() { dir } else { base.join(dir) };
                let videos = scan_video_dir(&dir).map_err(|e| at(e.to_string()))?;
                let new =
                    NewPrompt { text, name: line.name, negative_prompt: line.negative, videos: None, parent: None };
                new.validate_text().map_err(|e| at(e.to_string()))?;
                (RunLine { prompt: Some(new), params, ..Default::default() }, Some(videos))
            }
            _ => {
                return Err(at(
                    "give either `prompt_id`, or `prompt` with `video_dir` (a directory holding color.mp4)".into(),
                ));
            }
        };
        out.push(PreparedLine { line: n, run, videos });
    }
    if out.is_empty() {
        bail!("{}: no runs in the file", file.display());
    }
    Ok(out)
}

/// `cosmos batch FILE.jsonl`: every line checked, then videos uploaded, then all runs submitted at once.
/// `json_answer`: with `--json`, print the created runs as this command's answer
/// (callers that print a fuller answer themselves pass false).
pub fn batch(args: &ClientArgs, file: &Path, wait: bool, json_answer: bool) -> anyhow::Result<(bool, Vec<CreatedRun>)> {
    let mut lines = prepare_batch(file)?;
    let client = Client::new(args)?;
    for l in &mut lines {
        if let Some(v) = &l.videos {
            let videos = v.upload(&client).with_context(|| format!("{}:{}", file.display(), l.line))?;
            l.run.prompt.as_mut().expect("new prompts have videos").videos = Some(videos);
        }
    }
    let numbers: Vec<usize> = lines.iter().map(|l| l.line).collect();
    let runs = lines.into_iter().map(|l| l.run).collect();
    let created: CreatedRuns =
        client.post("/v1/runs", &CreateRuns { runs }).map_err(|e| match e.downcast::<ApiError>() {
            // The controller counts runs; the user counts lines of the file.
            Ok(api) => match api.body.line.and_then(|l| numbers.get(l - 1)) {
                Some(n) => anyhow::anyhow!(
                    "{}:{n}: {}; nothing was submitted",
                    file.display(),
                    api.body.error.split_once(": ").map_or(api.body.error.as_str(), |(_, rest)| rest)
                ),
                None => anyhow::anyhow!("{}; nothing was submitted", api.body.error),
            },
            Err(e) => e,
        })?;
    report_created(args, &created.runs);
    let ok = if wait { wait_runs(args, &client, &created.runs)? } else { true };
    if args.json && json_answer {
        println!("{}", serde_json::to_string_pretty(&run_views(&client, &created.runs)?)?);
    }
    Ok((ok, created.runs))
}

/// The run objects of `runs`, as they stand now (with `--json`, commands print these).
fn run_views(client: &Client, runs: &[CreatedRun]) -> anyhow::Result<Vec<RunView>> {
    runs.iter().map(|r| client.get(&format!("/v1/runs/{}", r.run_id))).collect()
}

/// Says which runs were created; with `--json` the command prints run objects at its end instead.
fn report_created(args: &ClientArgs, runs: &[CreatedRun]) {
    if args.json {
        return;
    }
    for r in runs {
        println!("{} prompt {} (job {})", r.run_id, r.prompt_id, r.job_id);
    }
}

/// Follows runs to their end with progress bars; true when all succeeded.
fn wait_runs(args: &ClientArgs, client: &Client, runs: &[CreatedRun]) -> anyhow::Result<bool> {
    let jobs: Vec<String> = runs.iter().map(|r| r.job_id.clone()).collect();
    let names = runs.iter().map(|r| (r.job_id.clone(), r.run_id.clone())).collect();
    crate::jobs::wait_for(args, client, &jobs, &names, !args.json)
}

/// `cosmos upscale RUN_ID` (a succeeded transfer), or with `after`, `cosmos
/// upscale --after RUN_ID` (one that may still run: the upscale waits for it).
#[allow(clippy::too_many_arguments)]
pub fn upscale(
    args: &ClientArgs,
    run_id: &str,
    after: bool,
    weight: Option<f64>,
    prompt: Option<String>,
    gpus: Option<u32>,
    wait: bool,
    json_answer: bool,
) -> anyhow::Result<(bool, CreatedRun)> {
    let d = UpscaleParams::default();
    let params = UpscaleParams {
        weight: weight.unwrap_or(d.weight),
        prompt,
        gpus: gpus.unwrap_or(d.gpus),
        priority: d.priority,
    };
    params.validate().map_err(|e| flag_error(&e))?;
    let client = Client::new(args)?;
    let run: CreatedRun = client
        .post(&format!("/v1/runs/{}/upscale?after={after}", url_escape(run_id)), &params)
        .map_err(|e| single_run_error(e, &[run_id.to_string()], "run"))?;
    report_created(args, std::slice::from_ref(&run));
    let ok = if wait { wait_runs(args, &client, std::slice::from_ref(&run))? } else { true };
    if args.json && json_answer {
        let view: RunView = client.get(&format!("/v1/runs/{}", run.run_id))?;
        println!("{}", serde_json::to_string_pretty(&view)?);
    }
    Ok((ok, run))
}

/// `cosmos prompt-enhance PROMPT_ID`: runs the upsampler, then creates `<name>_enhanced` (or overwrites).
pub fn prompt_enhance(args: &ClientArgs, prompt_id: &str, overwrite: bool, yes: bool) -> anyhow::Result<bool> {
    // Refused before the GPU job runs, not after: the answer cannot come without a terminal.
    if overwrite && !yes && !std::io::stdin().is_terminal() {
        bail!(
            "--overwrite replaces the text of {prompt_id} in place: confirm with --yes when not at a terminal \
             (nothing was run)"
        );
    }
    let client = Client::new(args)?;
    let original: Prompt = client.get(&format!("/v1/prompts/{prompt_id}"))?;
    let run: CreatedRun = client.post(&format!("/v1/prompts/{prompt_id}/enhance"), &serde_json::json!({}))?;
    if !args.json {
        println!("enhancing {} {} with run {}", original.id, original.name, run.run_id);
    }
    if !wait_runs(args, &client, std::slice::from_ref(&run))? {
        let view: Option<RunView> = client.get(&format!("/v1/runs/{}", run.run_id)).ok();
        let why = view.and_then(|v| v.error).map(|e| format!(": {}", printable(&e))).unwrap_or_default();
        bail!("the enhancement run {} did not succeed{why} (`cosmos runs show {}`)", run.run_id, run.run_id);
    }
    if overwrite && !yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "--overwrite replaces the text of {} in place: confirm with --yes when not at a terminal \
                 (or apply it later: run {} holds the result)",
                original.id,
                run.run_id
            );
        }
        eprint!("Replace the text of {} ({}) with the enhanced prompt? [y/N] ", original.id, original.name);
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&original)?);
            } else {
                println!("left {} unchanged; the enhancement stays in run {}", original.id, run.run_id);
            }
            return Ok(true);
        }
    }
    let prompt: Prompt = client.post(&format!("/v1/runs/{}/enhanced", run.run_id), &ApplyEnhancement { overwrite })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&prompt)?);
    } else {
        let verb = if overwrite { "updated" } else { "created" };
        println!("{verb} {} {} (from {}):\n  {}", prompt.id, prompt.name, original.id, prompt.text);
    }
    Ok(true)
}

/// `cosmos runs list|search`.
pub fn list_runs(
    args: &ClientArgs,
    prompt: Option<&str>,
    state: Option<&str>,
    words: &[String],
    page: &crate::jobs::PageArgs,
) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let mut query = Vec::new();
    if let Some(p) = prompt {
        query.push(format!("prompt={}", url_escape(p)));
    }
    if let Some(s) = state {
        query.push(format!("state={}", url_escape(s)));
    }
    if !words.is_empty() {
        query.push(format!("q={}", url_escape(&words.join(" "))));
    }
    let (runs, next) = crate::jobs::read_pages::<RunView>(&client, "/v1/runs", query, page)?;
    if let (Some(p), true) = (prompt, runs.is_empty()) {
        // Runs of a deleted prompt are still listed; nothing listed for a prompt that never was is a typo.
        let _: Prompt = client.get(&format!("/v1/prompts/{}", url_escape(p)))?;
    }
    let command = if words.is_empty() { "list" } else { "search" };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        if let Some(next) = &next {
            eprintln!("more runs follow: cosmos runs {command} --after {next} (or --all)");
        }
        return Ok(());
    }
    println!(
        "{:<16} {:<8} {:<16} {:<22} {:<10} {:>8} {:<14} {:>4} {:>8} {:>8}  ERROR",
        "RUN", "KIND", "PROMPT", "NAME", "STATE", "PROGRESS", "HOST", "GPUS", "ELAPSED", "GPU-S"
    );
    for r in runs {
        let progress = r.job.progress.map_or("-".to_string(), |(s, t)| format!("{s}/{t}"));
        println!(
            "{:<16} {:<8} {:<16} {:<22} {:<10} {:>8} {:<14} {:>4} {:>8} {:>8}  {}",
            truncate(&r.id, 16),
            truncate(&r.kind, 8),
            truncate(&r.prompt_id, 16),
            truncate(&printable(r.prompt_name.as_deref().unwrap_or("(deleted)")), 22),
            r.state,
            truncate(&progress, 8),
            truncate(&printable(r.agent.as_deref().unwrap_or("-")), 14),
            r.job.gpus_requested,
            elapsed_text(r.job.elapsed_ms),
            gpu_seconds_text(r.job.gpu_seconds),
            error_summary(r.error.as_deref())
        );
    }
    if let Some(next) = next {
        eprintln!("more runs follow: cosmos runs {command} --after {next} (or --limit N, --all)");
    }
    Ok(())
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `cosmos runs show`.
pub fn show_run(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let r: RunView = client.get(&format!("/v1/runs/{id}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    // The attempts say where it ran, also once it has ended (the job lists only a live attempt's GPUs).
    let job: JobView = client.get(&format!("/v1/jobs/{}", r.job_id))?;
    println!("{} {}  prompt {} {}", r.id, r.kind, r.prompt_id, r.prompt_name.as_deref().unwrap_or("(deleted)"));
    if let Some(p) = &r.parent_run {
        println!("upscales {p}");
    }
    println!("job {}  state {}  attempts {}", r.job_id, r.state, job.attempts.max(job.attempt_history.len() as u32));
    match job.attempt_history.last() {
        Some(a) => println!(
            "host {}  GPUs {} ({})",
            printable(&a.agent),
            if a.gpus.is_empty() { "-".into() } else { a.gpus.join(",") },
            job.gpus_requested
        ),
        None => println!("host -  GPUs - (not placed yet; needs {})", job.gpus_requested),
    }
    if let Some((s, t)) = r.job.progress {
        println!("progress {s}/{t}");
    }
    if let Some(why) = &job.waiting {
        println!("waiting: {}", printable(why));
    }
    print_accounting(&job);
    print_error(r.error.as_deref());
    println!("params:");
    if let Some(params) = r.params.as_object() {
        for (k, v) in params {
            let v = match v {
                serde_json::Value::String(s) => printable(s).into_owned(),
                serde_json::Value::Object(o) => {
                    o.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
                }
                other => other.to_string(),
            };
            println!("  {k:<16} {v}");
        }
    }
    let gone = deleted_outputs(&client, &r)?;
    for o in &r.outputs {
        let note = if gone.contains(&o.path) { "  DELETED with its prompt; run it again to get it back" } else { "" };
        println!("  output {} ({} bytes, sha256 {}){note}", o.path, o.size_bytes, o.sha256);
    }
    Ok(())
}

/// `cosmos runs cancel`.
pub fn cancel_run(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    Client::new(args)?.command::<RunView>(
        args.json,
        &format!("/v1/runs/{id}"),
        "cancel",
        &format!("cancel of {id} recorded"),
    )
}

/// The runs `ids` name, each with its job; one that does not exist fails at
/// once, naming it. Through a controller restart, as the waiting that follows.
fn find_runs(client: &Client, ids: &[String]) -> anyhow::Result<Vec<CreatedRun>> {
    let mut reconnect = client.reconnect();
    ids.iter()
        .map(|id| {
            let r: RunView = client.get_patiently(&format!("/v1/runs/{}", url_escape(id)), &mut reconnect)?;
            Ok(CreatedRun { run_id: r.id, job_id: r.job_id, prompt_id: r.prompt_id })
        })
        .collect()
}

/// `cosmos runs logs RUN [-f]`: the logs of the run's job, as `jobs logs` prints them.
pub fn run_logs(args: &ClientArgs, id: &str, follow: bool, tail_bytes: Option<u64>) -> anyhow::Result<()> {
    let run = find_runs(&Client::new(args)?, &[id.to_string()])?.remove(0);
    crate::jobs::logs(args, &run.job_id, follow, tail_bytes)
}

/// `cosmos runs wait RUN…`: as `jobs wait`, under the runs' ids; with `--json`, the runs at their end.
pub fn wait_runs_cmd(args: &ClientArgs, ids: &[String]) -> anyhow::Result<bool> {
    let client = Client::new(args)?;
    let runs = find_runs(&client, ids)?;
    let ok = wait_runs(args, &client, &runs)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run_views(&client, &runs)?)?);
    }
    Ok(ok)
}

/// `cosmos runs retry`.
pub fn retry_run(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    Client::new(args)?.command::<RunView>(args.json, &format!("/v1/runs/{id}"), "retry", &format!("{id} re-queued"))
}

/// `cosmos prompts list`.
pub fn list_prompts(args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let prompts: Vec<Prompt> = client.get("/v1/prompts")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&prompts)?);
        return Ok(());
    }
    println!("{:<16} {:<28} {:<16} TEXT", "PROMPT", "NAME", "PARENT");
    for p in prompts {
        let text: String = printable(&p.text).chars().take(60).collect();
        println!("{:<16} {:<28} {:<16} {text}", p.id, truncate(&p.name, 28), p.parent.as_deref().unwrap_or("-"));
    }
    Ok(())
}

/// `cosmos prompts show`.
pub fn show_prompt(args: &ClientArgs, id: &str) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let p: Prompt = client.get(&format!("/v1/prompts/{id}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    println!("{} {}", p.id, p.name);
    if let Some(parent) = &p.parent {
        println!("enhanced from {parent}");
    }
    println!("prompt:   {}", printable(&p.text));
    println!("negative: {}", printable(&p.negative_prompt));
    println!("color.mp4 {} ({} bytes)", p.videos.color.sha256, p.videos.color.size_bytes);
    for (name, v) in [("depth.mp4", &p.videos.depth), ("segmentation.mp4", &p.videos.seg)] {
        if let Some(v) = v {
            println!("{name} {} ({} bytes)", v.sha256, v.size_bytes);
        }
    }
    Ok(())
}

/// `cosmos prompts delete`.
pub fn delete_prompt(args: &ClientArgs, id: &str, delete_outputs: bool) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let answer: serde_json::Value = client.delete(&format!("/v1/prompts/{id}?delete_outputs={delete_outputs}"))?;
    if args.json {
        println!("{answer}");
    } else if delete_outputs {
        println!(
            "deleted {id}; of the {} output files of its {} runs, removed {}, kept {} because other prompts' runs or videos still use the same content",
            answer["output_files"], answer["runs"], answer["outputs_deleted"], answer["outputs_kept"]
        );
    } else {
        println!("deleted {id}; the outputs of its {} runs stay (`cosmos download RUN_ID`)", answer["runs"]);
    }
    Ok(())
}

/// A downloaded file, as `--json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileView {
    /// The run it came from.
    pub run_id: String,
    /// Where it was written (absolute).
    pub path: PathBuf,
    /// Its sha256, verified.
    pub sha256: String,
    /// Its size.
    pub size_bytes: u64,
}

/// What a run's outputs still are on the controller: the names of those deleted.
fn deleted_outputs(client: &Client, r: &RunView) -> anyhow::Result<Vec<String>> {
    let mut gone = Vec::new();
    for o in &r.outputs {
        if client.blob_state(&o.sha256.to_string())? != crate::client::BlobState::Complete {
            gone.push(o.path.clone());
        }
    }
    Ok(gone)
}

/// `cosmos download RUN_ID [--to DIR]`: the run's outputs into `DIR/RUN_ID/`; returns the run and its files.
pub fn download(args: &ClientArgs, run_id: &str, to: &Path) -> anyhow::Result<(RunView, Vec<FileView>)> {
    let client = Client::new(args)?;
    let r: RunView = client.get(&format!("/v1/runs/{run_id}"))?;
    if r.state != "succeeded" {
        bail!("run {run_id} is {}; only a succeeded run has outputs to download", r.state);
    }
    let gone = deleted_outputs(&client, &r)?;
    if !gone.is_empty() {
        bail!(
            "the outputs of run {run_id} were deleted ({}), with its prompt (`prompts delete --delete-outputs`); \
             run it again to get them back",
            gone.join(", ")
        );
    }
    let dir = to.join(run_id);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = Vec::new();
    for o in &r.outputs {
        let name = Path::new(&o.path).file_name().map_or_else(|| o.path.clone(), |n| n.to_string_lossy().into_owned());
        let dest = dir.join(name);
        let sha = o.sha256.to_string();
        let fresh = cosmos_cas::hash_file(&dest).is_ok_and(|(have, _)| have == o.sha256);
        if !fresh {
            client.get_blob(&sha, &dest)?;
            let (got, _) = cosmos_cas::hash_file(&dest)?;
            if got != o.sha256 {
                let _ = std::fs::remove_file(&dest);
                bail!("download of {} arrived corrupted (sha256 {got}, expected {sha}); download again", o.path);
            }
        }
        let path = std::fs::canonicalize(&dest).unwrap_or(dest);
        files.push(FileView { run_id: run_id.to_string(), path, sha256: sha, size_bytes: o.size_bytes });
    }
    Ok((r, files))
}

/// Downloads every run's outputs into `to/RUN_ID/`; failures are reported on
/// stderr and make the first value false. Returns (all ok, the runs, their files).
pub fn download_all(args: &ClientArgs, runs: &[CreatedRun], to: &Path) -> (bool, Vec<RunView>, Vec<FileView>) {
    let mut ok = true;
    let (mut views, mut files) = (Vec::new(), Vec::new());
    for r in runs {
        match download(args, &r.run_id, to) {
            Ok((view, got)) => {
                views.push(view);
                files.extend(got);
            }
            Err(e) => {
                eprintln!("error: cannot download the outputs of {}: {e:#}", r.run_id);
                ok = false;
                if let Ok(view) = Client::new(args).and_then(|c| c.get(&format!("/v1/runs/{}", r.run_id))) {
                    views.push(view);
                }
            }
        }
    }
    (ok, views, files)
}

/// Prints downloaded files: `RUN  PATH` lines, or with `--json` `{"runs": [run…], "files": [file…]}`,
/// the one shape of every command that downloads (`download`, `batch --download`, `demo`).
pub fn print_files(args: &ClientArgs, runs: &[RunView], files: &[FileView]) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "runs": runs, "files": files }))?);
    } else {
        for f in files {
            println!("  {}  {}", f.run_id, f.path.display());
        }
    }
    Ok(())
}

/// `cosmos download` as a command: prints the paths (or, with `--json`, as [`print_files`]).
pub fn download_cmd(args: &ClientArgs, run_id: &str, to: &Path) -> anyhow::Result<()> {
    let (run, files) = download(args, run_id, to)?;
    if args.json {
        print_files(args, std::slice::from_ref(&run), &files)?;
    } else {
        for f in files {
            println!("{}", f.path.display());
        }
    }
    Ok(())
}

/// The example shipped in `examples/`, built in so `cosmos demo` runs from any directory.
const EXAMPLE_FILES: [(&str, &[u8]); 5] = [
    ("transfer.jsonl", include_bytes!("../examples/transfer.jsonl")),
    ("videos/warehouse/color.mp4", include_bytes!("../examples/videos/warehouse/color.mp4")),
    ("videos/warehouse/depth.mp4", include_bytes!("../examples/videos/warehouse/depth.mp4")),
    ("videos/street/color.mp4", include_bytes!("../examples/videos/street/color.mp4")),
    ("videos/street/segmentation.mp4", include_bytes!("../examples/videos/street/segmentation.mp4")),
];

/// `cosmos demo`: the example batch, an upscale of its first run, and every video downloaded.
pub fn demo(args: &ClientArgs, to: &Path) -> anyhow::Result<bool> {
    let inputs = to.join("example-inputs");
    for (path, bytes) in EXAMPLE_FILES {
        let dest = inputs.join(path);
        std::fs::create_dir_all(dest.parent().expect("relative paths have parents"))?;
        std::fs::write(&dest, bytes).with_context(|| format!("cannot write {}", dest.display()))?;
    }
    eprintln!("example batch: {}", inputs.join("transfer.jsonl").display());
    let (ok, runs) = batch(args, &inputs.join("transfer.jsonl"), true, false)?;
    if !ok {
        bail!("not every example run succeeded: `cosmos runs list` and `cosmos jobs logs JOB` say why");
    }
    eprintln!("upscaling {} to 4K", runs[0].run_id);
    let (ok, up) = upscale(args, &runs[0].run_id, false, None, None, None, true, false)?;
    if !ok {
        bail!("the upscale {} did not succeed: `cosmos runs show {}`", up.run_id, up.run_id);
    }
    let all: Vec<CreatedRun> = runs.into_iter().chain(std::iter::once(up)).collect();
    let (ok, views, files) = download_all(args, &all, to);
    if !args.json {
        println!("generated videos:");
    }
    print_files(args, &views, &files)?;
    Ok(ok)
}
