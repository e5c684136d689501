//! The built `torchrun` binary, run as a job would run it: in a working
//! directory, with relative paths, reading its environment.

use cosmos_standin::{
    ENV_CHECKOUT, ENV_FAIL, ENV_STEP_MS, TRANSFER_SCRIPT, UPSAMPLER_SCRIPT, parse_output, upsample_prompt,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::process::{Command, Output};

struct Work(tempfile::TempDir);

impl Work {
    fn new() -> Work {
        let w = Work(tempfile::tempdir().expect("temp dir"));
        w.write("inputs/color.mp4", b"color video bytes");
        w
    }

    fn write(&self, rel: &str, bytes: &[u8]) {
        let path = self.0.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write");
    }

    fn spec(&self, spec: Value) {
        self.write("spec.json", spec.to_string().as_bytes());
    }

    fn torchrun(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_torchrun"));
        cmd.current_dir(self.0.path()).args(args).env(ENV_STEP_MS, "1").env("CUDA_VISIBLE_DEVICES", "0");
        cmd.env_remove(ENV_FAIL).env_remove(ENV_CHECKOUT).env_remove("VLLM_WORKER_MULTIPROC_METHOD");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().expect("run torchrun")
    }

    /// `torchrun --nproc_per_node=1 --nnodes=1 --node_rank=0 transfer.py --controlnet_specs spec.json …`.
    fn transfer(&self, extra: &[&str]) -> Output {
        let script = format!("/workspace/{TRANSFER_SCRIPT}");
        let mut args = vec!["--nproc_per_node=1", "--nnodes=1", "--node_rank=0", &script];
        args.extend_from_slice(&["--checkpoint_dir", "checkpoints", "--video_save_folder", "out"]);
        args.extend_from_slice(&["--controlnet_specs", "spec.json", "--num_gpus", "1"]);
        args.extend_from_slice(extra);
        self.torchrun(&args, &[])
    }

    fn output(&self, rel: &str) -> Value {
        let bytes = std::fs::read(self.0.path().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        parse_output(&bytes).unwrap_or_else(|| panic!("{rel} is not a stand-in output"))
    }

    fn exists(&self, rel: &str) -> bool {
        self.0.path().join(rel).exists()
    }
}

/// torchrun exits 1 when its worker fails; the worker's own code is in its failure report.
fn worker_code(o: &Output) -> Option<i32> {
    assert_eq!(o.status.code(), Some(1), "torchrun exits 1 when its worker fails: {}", stderr(o));
    let err = stderr(o);
    let report = &err[err.find("Root Cause (first observed failure):")?..];
    report.lines().find_map(|l| l.trim().strip_prefix("exitcode  : "))?.split_whitespace().next()?.parse().ok()
}

/// What the worker itself wrote on stderr, before torchrun's report.
fn worker_stderr(o: &Output) -> String {
    let err = stderr(o);
    err.split_once("E0000 ").map_or(err.clone(), |(before, _)| before.to_string())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn basic_spec() -> Value {
    json!({"prompt": "a road at dusk", "input_video_path": "inputs/color.mp4", "vis": {"control_weight": 0.5}})
}

/// The agent's reading of progress: the last `n/m` of each line ended by `\n` or `\r`.
fn progress(stderr: &str) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for line in stderr.split(['\n', '\r']) {
        let mut last = line.split(|c: char| !c.is_ascii_digit() && c != '/').filter_map(|tok| {
            let (n, m) = tok.split_once('/')?;
            Some((n.parse().ok()?, m.parse().ok()?))
        });
        if let Some(p) = last.next_back() {
            found.push(p);
        }
    }
    found
}

#[test]
fn a_transfer_run_names_its_input_bytes_and_reports_progress() {
    let w = Work::new();
    w.spec(basic_spec());
    let o = w.transfer(&["--num_steps", "5", "--offload_text_encoder_model", "--offload_guardrail_models"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let h = w.output("out/output.mp4");
    assert_eq!(h["mode"], "transfer");
    assert_eq!(h["prompt"], "a road at dusk");
    assert_eq!(h["input_video_sha256"], sha(b"color video bytes"));
    assert_eq!(h["controls"]["vis"]["control_weight"], 0.5);
    assert_eq!(progress(&stderr(&o)), [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]);
    let err = stderr(&o);
    assert!(err.contains("| 2/5 [") && err.contains("]\r") && err.ends_with("]\n"), "tqdm redraws with \\r: {err:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("Saved video to out/output.mp4"));
}

#[test]
fn each_range_violation_is_rejected_naming_the_parameter() {
    let w = Work::new();
    w.spec(basic_spec());
    for (flag, value) in [
        ("num_steps", "0"),
        ("num_steps", "101"),
        ("guidance", "0.9"),
        ("guidance", "21"),
        ("sigma_max", "-0.5"),
        ("sigma_max", "80.5"),
        ("fps", "0"),
        ("fps", "61"),
        ("seed", "0"),
        ("seed", "4294967296"),
    ] {
        let o = w.transfer(&[&format!("--{flag}={value}")]);
        assert_eq!(o.status.code(), Some(1), "--{flag}={value}");
        assert!(stderr(&o).contains(&format!("ValueError: {flag} must be between")), "{flag}: {}", stderr(&o));
        assert!(!w.exists("out/output.mp4"));
    }
    // The same limits hold for values from the spec.
    let mut spec = basic_spec();
    spec["guidance"] = json!(25);
    w.spec(spec);
    assert!(stderr(&w.transfer(&[])).contains("guidance must be between 1 and 20"));
    let mut spec = basic_spec();
    spec["vis"]["control_weight"] = json!(-0.1);
    w.spec(spec);
    let err = stderr(&w.transfer(&[]));
    assert!(
        err.contains("ValueError: Control weight for vis must be a valid non-negative float or a path to a .pt file.")
    );
}

#[test]
fn mismatched_gpu_counts_fail() {
    let w = Work::new();
    w.spec(basic_spec());
    let script = format!("/workspace/{TRANSFER_SCRIPT}");
    let args = ["--nproc_per_node=2", &script, "--controlnet_specs", "spec.json", "--num_gpus", "2"];
    let o = w.torchrun(&args, &[("CUDA_VISIBLE_DEVICES", "0")]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("--num_gpus=2, torchrun --nproc_per_node=2, CUDA_VISIBLE_DEVICES=0 lists 1 device(s)"),
        "{err}"
    );
    let o = w.torchrun(&args, &[("CUDA_VISIBLE_DEVICES", "0,1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(w.output("outputs/output.mp4")["num_gpus"], 2, "default --video_save_folder is outputs/");
}

#[test]
fn torchrun_and_script_usage_errors_exit_2() {
    let w = Work::new();
    w.spec(basic_spec());
    let o = w.torchrun(&["--nnodes=2", TRANSFER_SCRIPT], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("single node"));
    let o = w.torchrun(&["--rdzv_backend=c10d", TRANSFER_SCRIPT], &[]);
    assert_eq!(o.status.code(), Some(2));
    // The script's own usage errors are its worker's exit 2, under torchrun's exit 1.
    let o = w.torchrun(&["cosmos_transfer1/other.py"], &[]);
    assert_eq!(worker_code(&o), Some(2));
    assert!(stderr(&o).contains("can't open file 'cosmos_transfer1/other.py'"));
    assert!(stderr(&o).contains("torch.distributed.elastic.multiprocessing.errors.ChildFailedError"));
    let o = w.transfer(&["--x"]);
    assert_eq!(worker_code(&o), Some(2));
    assert!(stderr(&o).contains("transfer.py: error: unrecognized arguments: --x"));
}

#[test]
fn injected_failure_exits_1_after_a_step() {
    let w = Work::new();
    w.spec(basic_spec());
    let script = format!("/workspace/{TRANSFER_SCRIPT}");
    let o = w.torchrun(&[&script, "--controlnet_specs", "spec.json"], &[(ENV_FAIL, "boom")]);
    assert_eq!(worker_code(&o), Some(1));
    assert_eq!(progress(&stderr(&o)).last(), Some(&(1, 35)));
    assert!(worker_stderr(&o).ends_with("RuntimeError: boom\n"));
}

#[test]
fn upscale_mode_reads_a_previous_output() {
    let w = Work::new();
    w.spec(basic_spec());
    assert!(w.transfer(&[]).status.success());
    let previous = std::fs::read(w.0.path().join("out/output.mp4")).expect("first output");
    w.spec(json!({"input_video_path": "out/output.mp4", "upscale": {"control_weight": 0.5}}));
    let o = w.torchrun(
        &[TRANSFER_SCRIPT, "--controlnet_specs", "spec.json", "--video_save_folder", "up", "--num_steps", "10"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let h = w.output("up/output.mp4");
    assert_eq!((h["mode"].as_str(), h["num_steps"].as_i64()), (Some("upscale"), Some(10)));
    assert_eq!(h["input_video_sha256"], sha(&previous));
}

#[test]
fn batch_mode_writes_one_directory_per_line() {
    let w = Work::new();
    w.write("inputs/b.mp4", b"second video");
    w.write("inputs/seg_b.mp4", b"second seg");
    // `validate_controlnet_specs` checks the base spec's own input video, batch mode or not.
    w.spec(json!({"prompt": "base", "input_video_path": "inputs/color.mp4",
                  "vis": {"control_weight": 0.3}, "seg": {"control_weight": 0.3}}));
    let lines = [
        json!({"visual_input": "inputs/color.mp4", "prompt": "one"}),
        json!({"visual_input": "inputs/b.mp4", "prompt": "two",
               "control_overrides": {"seg": {"control_weight": 0.9, "input_control": "inputs/seg_b.mp4"}}}),
        json!({"visual_input": "inputs/b.mp4", "control_overrides": {"depth": {"control_weight": 1.0}}}),
    ];
    let jsonl: String = lines.iter().map(|l| format!("{l}\n")).collect();
    w.write("batch.jsonl", jsonl.as_bytes());
    let o = w.transfer(&["--batch_input_path", "batch.jsonl", "--batch_size", "1", "--num_steps", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(progress(&stderr(&o)).iter().filter(|p| **p == (2, 2)).count(), 3);
    let (v0, v1, v2) =
        (w.output("out/video_0/output.mp4"), w.output("out/video_1/output.mp4"), w.output("out/video_2/output.mp4"));
    assert_eq!(
        (v0["prompt"].as_str(), v1["prompt"].as_str(), v2["prompt"].as_str()),
        (Some("one"), Some("two"), Some("base"))
    );
    assert_eq!(v0["input_video_sha256"], sha(b"color video bytes"));
    assert_eq!(v1["controls"]["seg"]["input_control_sha256"], sha(b"second seg"));
    assert!(v2["controls"].get("depth").is_none());
    assert!(w.exists("out/video_0/seg_input_control.mp4") && !w.exists("out/video_1/seg_input_control.mp4"));
}

#[test]
fn prompt_enhancement_prints_the_upsampled_prompt() {
    let w = Work::new();
    w.write("inputs/b.mp4", b"second video");
    let script = format!("/workspace/{UPSAMPLER_SCRIPT}");
    let run = |video: &str| {
        let args = ["--nproc_per_node=1", "--nnodes=1", "--node_rank=0", &script, "--prompt=a road"];
        let args = [&args[..], &["--input_video", video, "--checkpoint_dir", "checkpoints"]].concat();
        w.torchrun(&args, &[("VLLM_WORKER_MULTIPROC_METHOD", "spawn")])
    };
    let o = run("inputs/color.mp4");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let a_sha = sha(b"color video bytes");
    let line = out.lines().rfind(|l| l.starts_with("Upsampled prompt: ")).expect("the result line");
    assert_eq!(line, format!("Upsampled prompt: {}", upsample_prompt("a road", &a_sha)));
    assert!(line.ends_with(&format!("(video {})", &a_sha[..8])));
    let other = String::from_utf8_lossy(&run("inputs/b.mp4").stdout).into_owned();
    assert!(!other.contains(line), "another video, another prompt");
}

#[test]
fn the_old_upsampler_script_does_not_exist() {
    let w = Work::new();
    let old = "/workspace/cosmos_transfer1/auxiliary/upsampler/inference/prompt_upsampler.py";
    let o = w.torchrun(&["--nproc_per_node=1", old, "--input", "items.json", "--output", "outputs/result.json"], &[]);
    assert_eq!(worker_code(&o), Some(2));
    assert_eq!(worker_stderr(&o), format!("python: can't open file '{old}': [Errno 2] No such file or directory\n"));
    assert!(!w.exists("outputs/result.json"));
    // The real scripts too, when they are looked for outside the image's checkout.
    let elsewhere = format!("/opt/cosmos/{UPSAMPLER_SCRIPT}");
    let o = w.torchrun(&[&elsewhere, "--input_video", "inputs/color.mp4"], &[]);
    assert_eq!(worker_code(&o), Some(2));
    assert!(stderr(&o).contains(&format!("can't open file '{elsewhere}'")), "{}", stderr(&o));
    let o = w.torchrun(
        &[&elsewhere, "--input_video", "inputs/color.mp4"],
        &[(ENV_CHECKOUT, "/opt/cosmos/"), ("VLLM_WORKER_MULTIPROC_METHOD", "spawn")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}
