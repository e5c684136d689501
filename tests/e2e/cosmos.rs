//! Cosmos Transfer end to end: prompts, runs, batches, upscale, enhance and
//! downloads through the binary, with the stand-in model as `torchrun`. Outputs
//! are checked against the bytes of the inputs that went in.

use super::{BIN, Cluster};
use serde_json::Value;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A video directory with `color.mp4` (and optionally `depth.mp4`) whose bytes name `tag`.
fn video_dir(root: &Path, tag: &str, depth: bool) -> PathBuf {
    let dir = root.join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("color.mp4"), format!("color video of {tag}").repeat(100)).unwrap();
    if depth {
        std::fs::write(dir.join("depth.mp4"), format!("depth video of {tag}").repeat(50)).unwrap();
    }
    dir
}

fn file_sha(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

fn header(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    cosmos_standin::parse_output(&bytes).unwrap_or_else(|| panic!("{} is not a stand-in output", path.display()))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

impl Cluster {
    fn run_state(&self, run: &str) -> String {
        self.json(&["runs", "show", run, "--json"])["job"]["state"].as_str().unwrap().to_string()
    }

    fn wait_run(&self, run: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let state = self.run_state(run);
            if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
                return state;
            }
            assert!(std::time::Instant::now() < deadline, "run {run} stuck in {state}; logs in {:?}", self.dir.path());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_prompt_runs_upscales_and_downloads_outputs_made_from_its_inputs() {
    let c = Cluster::start(2, 15_000);
    let videos = video_dir(c.dir.path(), "warehouse", true);
    let prompt = c.json(&[
        "create",
        "prompt",
        "A robot arm picks up a red cube in a warehouse",
        videos.to_str().unwrap(),
        "--json",
    ]);
    let ps = prompt["id"].as_str().unwrap().to_string();
    assert!(ps.starts_with("ps_"), "{prompt}");
    assert_eq!(prompt["name"], "robot_arm_picks", "named from the text's keywords");
    assert!(!prompt["negative_prompt"].as_str().unwrap().is_empty(), "the default negative prompt applies");

    let out = c.cli(&[
        "inference",
        &ps,
        "--steps",
        "7",
        "--guidance",
        "6.5",
        "--seed",
        "42",
        "--weights",
        "0.5",
        "0",
        "0.4",
        "0.3",
        "--blur-strength",
        "high",
        "--gpus",
        "2",
        "--wait",
    ]);
    assert!(out.status.success(), "inference failed: {}\n{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    let runs = c.json(&["runs", "list", "--json"]);
    let run = runs[0]["id"].as_str().unwrap().to_string();
    assert_eq!(runs[0]["job"]["state"], "succeeded", "{runs}");

    let to = c.dir.path().join("downloads");
    let out = c.cli(&["download", &run, "--to", to.to_str().unwrap()]);
    assert!(out.status.success(), "download failed: {}", stderr(&out));
    let video = to.join(&run).join("output.mp4");
    assert!(String::from_utf8_lossy(&out.stdout).contains(video.to_str().unwrap()), "prints the path");
    let h = header(&video);
    assert_eq!(h["mode"], "transfer");
    assert_eq!(h["input_video_sha256"], file_sha(&videos.join("color.mp4")), "the prompt's own color video went in");
    assert_eq!(h["controls"]["depth"]["input_control_sha256"], file_sha(&videos.join("depth.mp4")));
    assert!(h["controls"]["seg"]["input_control_sha256"].is_null(), "no segmentation.mp4: the model derives it");
    assert!(h["controls"].get("edge").is_none(), "weight 0 leaves the control out");
    assert_eq!((h["blur_strength"].as_str(), h["canny_threshold"].as_str()), (Some("high"), Some("medium")));
    assert_eq!((h["num_steps"].as_i64(), h["seed"].as_i64(), h["num_gpus"].as_i64()), (Some(7), Some(42), Some(2)));
    assert_eq!(h["guidance"].as_f64(), Some(6.5));
    assert_eq!(h["prompt"], "A robot arm picks up a red cube in a warehouse");
    // The derived segmentation came back too, kept with the run.
    assert!(to.join(&run).join("seg_input_control.mp4").exists());

    // Upscale the finished run: the 4K pass reads exactly the transfer's output.
    let out = c.cli(&["upscale", &run, "--weight", "0.8", "--wait", "--json"]);
    assert!(out.status.success(), "upscale failed: {}", stderr(&out));
    let upscales = c.json(&["runs", "list", "--json"]);
    let up = upscales.as_array().unwrap().iter().find(|r| r["kind"] == "upscale").expect("an upscale run");
    assert_eq!(up["parent_run"], run.as_str());
    let up_id = up["id"].as_str().unwrap();
    let out = c.cli(&["download", up_id, "--to", to.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let h = header(&to.join(up_id).join("output.mp4"));
    assert_eq!(h["mode"], "upscale");
    assert_eq!(h["input_video_sha256"], file_sha(&video));
    assert_eq!(h["controls"]["upscale"]["control_weight"].as_f64(), Some(0.8));
    assert_eq!(h["num_steps"].as_i64(), Some(10), "the contract fixes 10 steps for an upscale");

    // An upscale only starts from a succeeded transfer.
    let out = c.cli(&["upscale", up_id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a transfer run"), "{}", stderr(&out));
    let out = c.cli(&["upscale", "rs_000000000000"]);
    assert!(stderr(&out).contains("no run rs_000000000000"), "{}", stderr(&out));

    // Search finds runs by the prompt's words; show tells the parameters.
    let found = c.json(&["runs", "search", "ROBOT", "cube", "--json"]);
    assert_eq!(found.as_array().unwrap().len(), 2, "{found}");
    assert!(c.json(&["runs", "search", "zebra", "--json"]).as_array().unwrap().is_empty());
    let shown = c.json(&["runs", "show", &run, "--json"]);
    assert_eq!(shown["params"]["steps"], 7);
    assert_eq!(shown["params"]["weights"]["edge"].as_f64(), Some(0.0));

    // Deleting the prompt keeps its runs' outputs unless asked.
    let out = c.cli(&["prompts", "delete", &ps]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = c.dir.path().join("again");
    let out = c.cli(&["download", &run, "--to", again.to_str().unwrap()]);
    assert!(out.status.success(), "outputs stay after the prompt is deleted: {}", stderr(&out));
}

#[test]
fn a_prompt_with_active_runs_cannot_be_deleted_and_outputs_go_when_asked() {
    let c = Cluster::start(1, 15_000);
    let videos = video_dir(c.dir.path(), "street", false);
    let ps = c.json(&["create", "prompt", "A rainy street at night", videos.to_str().unwrap(), "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // 100 steps at the stand-in's pace keep the run active for a while.
    let out = c.cli(&["inference", &ps, "--steps", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = c.json(&["runs", "list", "--json"])[0]["id"].as_str().unwrap().to_string();
    let out = c.cli(&["prompts", "delete", &ps]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("still active") && stderr(&out).contains(&run), "{}", stderr(&out));
    assert_eq!(c.wait_run(&run), "succeeded");
    // Another prompt whose video is one of this run's outputs: that blob must survive the deletion.
    let reuse = c.dir.path().join("reuse");
    let out = c.cli(&["download", &run, "--to", reuse.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let from_output = c.dir.path().join("from-output");
    std::fs::create_dir_all(&from_output).unwrap();
    std::fs::copy(reuse.join(&run).join("seg_input_control.mp4"), from_output.join("color.mp4")).unwrap();
    let second = c.json(&["create", "prompt", "the street again", from_output.to_str().unwrap(), "--json"]);

    let out = c.cli(&["prompts", "delete", &ps, "--delete-outputs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.cli(&["download", &run, "--to", c.dir.path().join("d").to_str().unwrap()]);
    assert!(!out.status.success(), "its outputs are gone");
    let out = c.cli(&["upscale", &run]);
    assert!(stderr(&out).contains("is not on the controller"), "{}", stderr(&out));
    let prompts = c.json(&["prompts", "list", "--json"]);
    assert_eq!(prompts.as_array().unwrap().len(), 1, "{prompts}");
    let out = c.cli(&["inference", second["id"].as_str().unwrap(), "--steps", "2", "--wait"]);
    assert!(out.status.success(), "the other prompt's video was kept: {}", stderr(&out));
}

#[test]
fn a_batch_with_a_bad_line_is_rejected_whole_naming_the_line() {
    let c = Cluster::start(1, 15_000);
    let root = c.dir.path();
    video_dir(root, "a", false);
    video_dir(root, "b", true);
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let cases = [
        (r#"{"prompt": "fine", "video_dir": "b", "steps": 500}"#, ":2:", "steps"),
        (r#"{"prompt": "fine", "video_dir": "empty"}"#, ":2:", "color.mp4"),
        (r#"{"prompt": "fine", "video_dir": "b", "blur_strength": "extreme"}"#, ":2:", "extreme"),
        (r#"{"prompt_id": "ps_0123456789ab"}"#, ":2:", "no prompt ps_0123456789ab"),
        (r#"{"prompt": "no video dir"}"#, ":2:", "video_dir"),
        (r#"{"prompt": "fine", "video_dir": "b", "colour": 1}"#, ":2:", "colour"),
    ];
    for (bad, line, says) in cases {
        let file = root.join("batch.jsonl");
        std::fs::write(
            &file,
            format!(
                "{}\n{bad}\n{}\n",
                r#"{"prompt": "ok one", "video_dir": "a"}"#, r#"{"prompt": "ok two", "video_dir": "b"}"#
            ),
        )
        .unwrap();
        let out = c.cli(&["batch", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{bad} was accepted");
        let err = stderr(&out);
        assert!(err.contains(line) && err.contains(says) && err.contains("nothing was submitted"), "{bad}: {err}");
    }
    assert!(c.json(&["runs", "list", "--json"]).as_array().unwrap().is_empty(), "no run from a rejected batch");
    assert!(c.json(&["prompts", "list", "--json"]).as_array().unwrap().is_empty(), "no prompt either");

    // The same file without the bad line goes through whole, each run with its own parameters.
    let file = root.join("good.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n# a comment\n\n{}\n",
            r#"{"prompt": "ok one", "video_dir": "a", "steps": 3, "fps": 12}"#,
            r#"{"prompt": "ok two", "video_dir": "b", "steps": 4, "sigma_max": 10, "negative": "fog"}"#
        ),
    )
    .unwrap();
    let to = root.join("out");
    let out = c.cli(&["batch", file.to_str().unwrap(), "--download", to.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let runs = c.json(&["runs", "list", "--json"]);
    assert_eq!(runs.as_array().unwrap().len(), 2);
    for r in runs.as_array().unwrap() {
        let h = header(&to.join(r["id"].as_str().unwrap()).join("output.mp4"));
        let prompt = c.json(&["prompts", "show", r["prompt_id"].as_str().unwrap(), "--json"]);
        assert_eq!(h["prompt"], prompt["text"]);
        if h["prompt"] == "ok one" {
            assert_eq!((h["num_steps"].as_i64(), h["fps"].as_i64()), (Some(3), Some(12)));
            assert_eq!(h["input_video_sha256"], file_sha(&root.join("a/color.mp4")));
        } else {
            assert_eq!((h["num_steps"].as_i64(), h["sigma_max"].as_f64()), (Some(4), Some(10.0)));
            assert_eq!(h["negative_prompt"], "fog", "per-run negative prompts survive the batch path");
            assert_eq!(h["input_video_sha256"], file_sha(&root.join("b/color.mp4")));
        }
    }
}

#[test]
fn every_parameter_range_is_rejected_with_a_clear_message() {
    let c = Cluster::start(1, 15_000);
    let videos = video_dir(c.dir.path(), "v", false);
    let ps = c.json(&["create", "prompt", "A quiet lake", videos.to_str().unwrap(), "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--steps", "0"], "between 1 and 100"),
        (&["--steps", "101"], "between 1 and 100"),
        (&["--guidance", "0.9"], "between 1 and 20"),
        (&["--guidance", "21"], "between 1 and 20"),
        (&["--sigma-max", "-1"], "between 0 and 80"),
        (&["--sigma-max", "80.5"], "between 0 and 80"),
        (&["--fps", "0"], "between 1 and 60"),
        (&["--fps", "61"], "between 1 and 60"),
        (&["--seed", "0"], "between 1 and 4294967295"),
        (&["--seed", "4294967296"], "between 1 and 4294967295"),
        (&["--weights", "1.1", "0", "0", "0"], "between 0 and 1"),
        (&["--weights", "0", "0", "0", "-0.5"], "between 0 and 1"),
        (&["--weights", "0", "0", "0", "0"], "at least one control"),
        (&["--gpus", "0"], "between 1 and 8"),
        (&["--canny-threshold", "huge"], "very_low, low, medium, high, very_high"),
    ];
    for (flags, says) in cases {
        let mut args = vec!["inference", ps.as_str()];
        args.extend_from_slice(flags);
        let out = c.cli(&args);
        assert!(!out.status.success(), "{flags:?} was accepted");
        let err = stderr(&out);
        let flag = flags[0].trim_start_matches("--");
        assert!(err.contains(says) && err.contains(flag), "{flags:?}: {err}");
    }
    let out = c.cli(&["upscale", "rs_0123456789ab", "--weight", "1.5"]);
    assert!(stderr(&out).contains("weight") && stderr(&out).contains("between 0 and 1"), "{}", stderr(&out));
    assert!(c.json(&["runs", "list", "--json"]).as_array().unwrap().is_empty(), "nothing was submitted");
}

#[test]
fn a_prompt_without_color_mp4_is_rejected_at_creation() {
    let c = Cluster::start(1, 15_000);
    let dir = c.dir.path().join("only-depth");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("depth.mp4"), b"depth").unwrap();
    let out = c.cli(&["create", "prompt", "A forest", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("has no color.mp4"), "{}", stderr(&out));
    let out = c.cli(&["create", "prompt", "A forest", c.dir.path().join("missing").to_str().unwrap()]);
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    let videos = video_dir(c.dir.path(), "ok", false);
    let out = c.cli(&["create", "prompt", "A forest", videos.to_str().unwrap(), "--name", "Bad Name"]);
    assert!(stderr(&out).contains("a-z, 0-9 and _"), "{}", stderr(&out));
    assert!(c.json(&["prompts", "list", "--json"]).as_array().unwrap().is_empty());
}

/// A `torchrun` for the agents that records each command line and controlnet
/// spec under `root/calls/` before running the stand-in with them.
fn recording_torchrun(root: &Path) {
    let bin = root.join("bin");
    let real = root.join("real-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir_all(root.join("calls")).unwrap();
    std::os::unix::fs::symlink(BIN, real.join("torchrun")).unwrap();
    let calls = root.join("calls");
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > {calls}/$$.argv\n[ -f inputs/spec.json ] && cp inputs/spec.json {calls}/$$.spec.json\nexec {real} \"$@\"\n",
        calls = calls.display(),
        real = real.join("torchrun").display()
    );
    std::fs::write(bin.join("torchrun"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("torchrun"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What `transfer.py` makes of `key` from its argv and controlnet spec, as its
/// `parse_arguments` does: the value after the exact token `--key`, else the
/// spec's top-level key, else `default`.
fn as_transfer_py_reads(argv: &[String], spec: &Value, key: &str, default: &str) -> String {
    let script = argv.iter().position(|a| a.ends_with(cosmos_standin::TRANSFER_SCRIPT)).expect("transfer.py");
    let args = &argv[script + 1..];
    if let Some(i) = args.iter().rposition(|a| *a == format!("--{key}")) {
        return args[i + 1].clone();
    }
    spec.get(key).and_then(Value::as_str).unwrap_or(default).to_string()
}

#[test]
fn blur_strength_and_canny_threshold_reach_the_model() {
    let c = Cluster::start_with(1, 15_000, Vec::new(), |root| {
        recording_torchrun(root);
        Vec::new()
    });
    let videos = video_dir(c.dir.path(), "canal", false);
    let ps = c.json(&["create", "prompt", "barges on a canal", videos.to_str().unwrap(), "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = c.cli(&[
        "inference",
        &ps,
        "--weights",
        "0.5",
        "0.5",
        "0",
        "0",
        "--blur-strength",
        "high",
        "--canny-threshold",
        "low",
        "--steps",
        "2",
        "--wait",
    ]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    let run = c.json(&["runs", "list", "--json"])[0]["id"].as_str().unwrap().to_string();
    let to = c.dir.path().join("out");
    assert!(c.cli(&["download", &run, "--to", to.to_str().unwrap()]).status.success());
    let h = header(&to.join(&run).join("output.mp4"));
    assert_eq!((h["blur_strength"].as_str(), h["canny_threshold"].as_str()), (Some("high"), Some("low")), "{h}");
    // The command and spec the model was given, read as transfer.py reads them.
    let calls = c.dir.path().join("calls");
    let argv_file = std::fs::read_dir(&calls)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "argv"))
        .expect("the recorded command line");
    let argv: Vec<String> = std::fs::read_to_string(&argv_file).unwrap().lines().map(String::from).collect();
    let spec: Value = serde_json::from_slice(&std::fs::read(argv_file.with_extension("spec.json")).unwrap()).unwrap();
    assert_eq!(as_transfer_py_reads(&argv, &spec, "blur_strength", "medium"), "high", "{argv:?}");
    assert_eq!(as_transfer_py_reads(&argv, &spec, "canny_threshold", "medium"), "low", "{argv:?}");
    for control in ["vis", "edge"] {
        assert_eq!(spec[control], serde_json::json!({"control_weight": 0.5}), "nothing misplaced in {control}");
    }
}

#[test]
fn upsample_prompt_enhances_inline_from_the_command_line_and_from_batch_lines() {
    let c = Cluster::start(1, 15_000);
    let videos = video_dir(c.dir.path(), "bridge", false);
    let text = "a bridge at night";
    let ps =
        c.json(&["create", "prompt", text, videos.to_str().unwrap(), "--json"])["id"].as_str().unwrap().to_string();
    let out = c.cli(&["inference", &ps, "--upsample-prompt", "--steps", "2", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    let batch = c.dir.path().join("runs.jsonl");
    let lines = [
        serde_json::json!({"prompt_id": ps, "steps": 2, "upsample_prompt": true}),
        serde_json::json!({"prompt_id": ps, "steps": 3}),
    ];
    std::fs::write(&batch, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let out = c.cli(&["batch", batch.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    let upsampled = cosmos_standin::upsample_prompt(text, &file_sha(&videos.join("color.mp4")));
    let to = c.dir.path().join("out");
    let runs = c.json(&["runs", "list", "--json"]);
    let mut prompts = Vec::new();
    for r in runs.as_array().unwrap() {
        let id = r["id"].as_str().unwrap();
        assert!(c.cli(&["download", id, "--to", to.to_str().unwrap()]).status.success());
        let h = header(&to.join(id).join("output.mp4"));
        prompts.push((h["num_steps"].as_i64().unwrap(), h["prompt"].as_str().unwrap().to_string()));
    }
    prompts.sort();
    assert_eq!(
        prompts,
        [(2, upsampled.clone()), (2, upsampled), (3, text.to_string())],
        "upsampled where asked, by the model itself before generating"
    );
}

#[test]
fn a_missing_model_script_fails_once_with_its_own_message() {
    // A wrong checkout directory: the image has no script at that path.
    let controller = vec!["--cosmos-checkout-dir".to_string(), "/opt/cosmos-elsewhere".to_string()];
    let c = Cluster::start_with(1, 15_000, controller, |_| Vec::new());
    let videos = video_dir(c.dir.path(), "quay", false);
    let ps =
        c.json(&["create", "prompt", "a quay", videos.to_str().unwrap(), "--json"])["id"].as_str().unwrap().to_string();
    let out = c.cli(&["prompt-enhance", &ps]);
    assert!(!out.status.success());
    let script = "/opt/cosmos-elsewhere/cosmos_transfer1/auxiliary/upsampler/inference/upsampler_pipeline.py";
    let message = format!("python: can't open file '{script}': [Errno 2] No such file or directory");
    assert!(stderr(&out).contains(&message), "the CLI says why: {}", stderr(&out));
    let out = c.cli(&["inference", &ps, "--steps", "2", "--wait"]);
    assert!(!out.status.success());
    let runs = c.json(&["runs", "list", "--json"]);
    assert_eq!(runs.as_array().unwrap().len(), 2, "{runs}");
    for r in runs.as_array().unwrap() {
        let job = &r["job"];
        assert_eq!(job["state"], "failed", "{r}");
        assert_eq!(job["attempts"], 1, "a usage error is not retried: {r}");
        // torchrun exits 1 when its worker fails; the worker's exit 2 is in its report.
        assert_eq!(job["exit_code"], 1, "{r}");
        let error = job["error"].as_str().unwrap();
        assert!(
            error.contains("the worker it blames exited with code 2")
                && error.contains("not retried")
                && error.contains("python: can't open file '/opt/cosmos-elsewhere/"),
            "{r}"
        );
    }
}

#[test]
fn an_upsampler_that_prints_no_result_fails_the_run_saying_so() {
    let c = Cluster::start_with(1, 15_000, Vec::new(), |root| {
        // Exits 0 after logs, as an upsampler of another version might: no result line.
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("torchrun"), "#!/bin/sh\necho 'Loading Pixtral'\necho 'INFO all done'\nexit 0\n")
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("torchrun"), std::fs::Permissions::from_mode(0o755)).unwrap();
        Vec::new()
    });
    let videos = video_dir(c.dir.path(), "pier", false);
    let ps =
        c.json(&["create", "prompt", "a pier", videos.to_str().unwrap(), "--json"])["id"].as_str().unwrap().to_string();
    let out = c.cli(&["prompt-enhance", &ps]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("printed no `Upsampled prompt:` line"), "{}", stderr(&out));
    let run = &c.json(&["runs", "list", "--json"])[0];
    assert_eq!((run["job"]["state"].as_str(), run["job"]["attempts"].as_u64()), (Some("failed"), Some(1)), "{run}");
    assert_eq!(c.json(&["prompts", "list", "--json"]).as_array().unwrap().len(), 1, "no enhanced prompt");
}

#[test]
fn enhancing_a_prompt_creates_a_linked_prompt_from_its_video() {
    let c = Cluster::start(1, 15_000);
    let videos = video_dir(c.dir.path(), "harbor", false);
    let original =
        c.json(&["create", "prompt", "boats in a harbor", videos.to_str().unwrap(), "--name", "harbor", "--json"]);
    let ps = original["id"].as_str().unwrap();
    let enhanced = c.json(&["prompt-enhance", ps, "--json"]);
    assert_eq!(enhanced["name"], "harbor_enhanced");
    assert_eq!(enhanced["parent"], ps);
    assert_ne!(enhanced["id"], ps);
    let text = enhanced["text"].as_str().unwrap();
    let sha = file_sha(&videos.join("color.mp4"));
    assert!(text.starts_with("boats in a harbor.") && text.contains(&sha[..8]), "derived from the video: {text}");
    assert_eq!(enhanced["videos"], original["videos"], "same videos");
    let listed = c.json(&["prompts", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    // Overwriting asks first; --yes confirms for scripts.
    let out = c.cli(&["prompt-enhance", ps, "--overwrite"]);
    assert!(!out.status.success() && stderr(&out).contains("--yes"), "{}", stderr(&out));
    let updated = c.json(&["prompt-enhance", ps, "--overwrite", "--yes", "--json"]);
    assert_eq!(updated["id"], ps);
    assert_eq!(updated["text"], text);
    // The result came from the upsampler's standard output, delivered as the run's output.
    let runs = c.json(&["runs", "list", "--json"]);
    let run = runs.as_array().unwrap().iter().find(|r| r["kind"] == "enhance").unwrap();
    assert_eq!(run["outputs"][0]["path"], cosmos_proto::spec::STDOUT_LOG, "{run}");
}

#[test]
fn the_main_command_runs_the_example_batch_and_an_upscale_on_a_local_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("videos");
    let out = std::process::Command::new(BIN)
        .args(["up", "--agents", "2", "--gpus", "2x80GiB", "--data-dir"])
        .arg(dir.path().join("cluster"))
        .args(["--", "demo", "--to"])
        .arg(&to)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cosmos up -- demo failed:\n{stdout}\n{}", stderr(&out));
    let paths: Vec<&str> = stdout.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    let videos: Vec<&&str> = paths.iter().filter(|p| p.ends_with("output.mp4")).collect();
    assert_eq!(videos.len(), 4, "three transfers and one upscale: {stdout}");
    let modes: Vec<String> =
        videos.iter().map(|p| header(Path::new(p))["mode"].as_str().unwrap().to_string()).collect();
    assert_eq!(modes.iter().filter(|m| *m == "upscale").count(), 1, "{modes:?}");
}

/// The production path: runs compile to the image's `torchrun`, with the
/// checkpoint and cache volumes mounted, and run as Docker containers (the
/// stand-in image in place of the model's). Needs Docker and
/// `cosmos-transfer-standin:dev` (`scripts/build-images`); fails loudly without them.
#[test]
fn runs_as_containers_of_the_model_image_with_its_volumes() {
    let image = "cosmos-transfer-standin:dev";
    let inspect = std::process::Command::new("docker").args(["image", "inspect", image]).output();
    assert!(
        inspect.as_ref().is_ok_and(|o| o.status.success()),
        "Docker with the image {image} is needed: run scripts/build-images (CI runs it through scripts/setup)"
    );
    let controller = vec!["--cosmos-image".to_string(), image.to_string()];
    let c = Cluster::start_with(1, 15_000, controller, |dir| {
        let mut args = vec!["--runtime".to_string(), "docker".to_string()];
        for volume in ["checkpoints", "hf_cache"] {
            std::fs::create_dir_all(dir.join(volume)).unwrap();
            args.extend(["--volume".to_string(), format!("{volume}={}", dir.join(volume).display())]);
        }
        args
    });
    let videos = video_dir(c.dir.path(), "dock", true);
    let ps = c.json(&["create", "prompt", "cranes at a container port", videos.to_str().unwrap(), "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = c.cli(&["inference", &ps, "--steps", "3", "--gpus", "2", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    let run = c.json(&["runs", "list", "--json"])[0]["id"].as_str().unwrap().to_string();
    let to = c.dir.path().join("out");
    let out = c.cli(&["download", &run, "--to", to.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let h = header(&to.join(&run).join("output.mp4"));
    assert_eq!(h["input_video_sha256"], file_sha(&videos.join("color.mp4")));
    assert_eq!(
        h["num_gpus"].as_i64(),
        Some(2),
        "torchrun, --num_gpus and CUDA_VISIBLE_DEVICES agreed in the container"
    );
    // The upsampler's result is its stdout, which the Docker runtime streams into stdout.log.
    let enhanced = c.json(&["prompt-enhance", &ps, "--json"]);
    let upsampled = cosmos_standin::upsample_prompt("cranes at a container port", &file_sha(&videos.join("color.mp4")));
    assert_eq!(enhanced["text"], upsampled.as_str(), "{enhanced}");
    let leftover = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", "label=cosmos.agent=agent-0", "--filter", "label=cosmos.job"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&leftover.stdout).trim().is_empty(), "no container left behind");
}

#[test]
fn an_interrupted_video_upload_resumes_where_it_broke_off() {
    use std::io::Write;
    let c = Cluster::start(1, 15_000);
    let dir = c.dir.path().join("big");
    std::fs::create_dir_all(&dir).unwrap();
    let video: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(dir.join("color.mp4"), &video).unwrap();
    let (sha, size, half) = (sha256_hex(&video), video.len(), video.len() / 2);
    let token = std::fs::read_to_string(c.data().join("api.token")).unwrap();
    // A client that dies half way through its upload.
    let mut conn = std::net::TcpStream::connect(c.api.trim_start_matches("http://")).unwrap();
    write!(
        conn,
        "PUT /v1/blobs/{sha}?offset=0&size={size} HTTP/1.1\r\nHost: cosmos\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {size}\r\n\r\n",
        token.trim()
    )
    .unwrap();
    conn.write_all(&video[..half]).unwrap();
    let partial = c.data().join("blobs/partial").join(&sha);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < half as u64 {
        assert!(std::time::Instant::now() < deadline, "the controller did not keep the bytes it received");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(conn);

    let prompt = c.json(&["create", "prompt", "a resumed upload", dir.to_str().unwrap(), "--json"]);
    assert_eq!(prompt["videos"]["color"]["sha256"], sha.as_str());
    let log = std::fs::read_to_string(c.dir.path().join("ctl.log")).unwrap();
    assert!(log.contains("resuming an upload") && log.contains(&format!("offset={half}")), "{log}");
    assert!(!partial.exists(), "the finished blob left no partial file");
    assert_eq!(file_sha(&c.data().join("blobs/sha256").join(&sha[..2]).join(&sha)), sha);
}

impl Cluster {
    /// A prompt from a fresh video directory named `tag`: its id.
    fn prompt(&self, tag: &str) -> String {
        let videos = video_dir(self.dir.path(), tag, false);
        let p = self.json(&["create", "prompt", &format!("a scene of {tag}"), videos.to_str().unwrap(), "--json"]);
        p["id"].as_str().unwrap().to_string()
    }

    fn run_count(&self) -> usize {
        self.json(&["runs", "list", "--json"]).as_array().unwrap().len()
    }
}

#[test]
fn a_sweep_makes_one_run_per_combination_in_one_submission() {
    let c = Cluster::start(1, 15_000);
    let ps = c.prompt("field");
    let out =
        c.cli(&["inference", &ps, "--steps", "2", "--seed", "1..3", "--sweep", "guidance=5,7.5", "--wait", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut made: Vec<(i64, f64)> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["state"], "succeeded", "{r}");
            (r["params"]["seed"].as_i64().unwrap(), r["params"]["guidance"].as_f64().unwrap())
        })
        .collect();
    made.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(made, [(1, 5.0), (1, 7.5), (2, 5.0), (2, 7.5), (3, 5.0), (3, 7.5)]);
    // What reached the model: one run's output says so.
    let one = runs.as_array().unwrap().iter().find(|r| r["params"]["seed"] == 3 && r["params"]["guidance"] == 7.5);
    let id = one.unwrap()["id"].as_str().unwrap();
    let to = c.dir.path().join("dl");
    assert!(c.cli(&["download", id, "--to", to.to_str().unwrap()]).status.success());
    let h = header(&to.join(id).join("output.mp4"));
    assert_eq!((h["seed"].as_i64(), h["guidance"].as_f64()), (Some(3), Some(7.5)));

    // The table names each run with its combination, all ids printed.
    let out = c.cli(&["inference", &ps, "--seed", "4,5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(said.lines().filter(|l| l.starts_with("rs_")).count(), 2, "{said}");
    assert!(said.contains(&format!("prompt {ps} seed=4 (job")) && said.contains("seed=5"), "{said}");

    // A bad value, the cap, or one refused run: nothing is submitted, and the error says why.
    let before = c.run_count();
    let cases: [(&[&str], &str); 4] = [
        (&["--sweep", "guidance=5,70"], "--sweep guidance=70: --guidance must be between 1 and 20"),
        (&["--seed", "0..2"], "--seed must be between 1 and 4294967295"),
        (&["--seed", "1..600", "--sweep", "steps=2,3"], "makes 1200 runs"),
        (&["--sweep", "colour=1,2"], "`colour` is not a parameter a sweep can vary"),
    ];
    for (flags, said) in cases {
        let args: Vec<&str> = ["inference", ps.as_str()].into_iter().chain(flags.iter().copied()).collect();
        let out = c.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(said), "{args:?}: {}", stderr(&out));
    }
    let out = c.cli(&["inference", &ps, "rs_000000000000", "--seed", "1..2"]);
    assert!(!out.status.success());
    assert_eq!(c.run_count(), before, "all or nothing");
}

#[test]
fn an_upscale_waits_for_its_transfer_and_is_cancelled_with_it() {
    let c = Cluster::start(1, 15_000);
    let ps = c.prompt("dune");
    // Submitted while its transfer is still to run (the only host drained, so it surely waits),
    // it takes the transfer's video once that succeeds.
    assert!(c.cli(&["agents", "drain", "agent-0"]).status.success());
    let transfer = c.json(&["inference", &ps, "--steps", "3", "--json"])[0]["id"].as_str().unwrap().to_string();
    let up = c.json(&["upscale", "--after", &transfer, "--weight", "0.7", "--json"]);
    let up_id = up["id"].as_str().unwrap().to_string();
    assert_eq!(up["parent_run"], transfer.as_str(), "{up}");
    assert_eq!(up["state"], "queued", "{up}");
    let shown = String::from_utf8_lossy(&c.cli(&["runs", "show", &up_id]).stdout).into_owned();
    assert!(shown.contains("waiting: waiting for job-1 to succeed"), "{shown}");
    assert!(c.cli(&["agents", "undrain", "agent-0"]).status.success());
    let out = c.cli(&["runs", "wait", &up_id, &transfer]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    let to = c.dir.path().join("dl");
    for run in [&transfer, &up_id] {
        assert!(c.cli(&["download", run, "--to", to.to_str().unwrap()]).status.success());
    }
    let h = header(&to.join(&up_id).join("output.mp4"));
    assert_eq!(h["mode"], "upscale");
    assert_eq!(h["input_video_sha256"], file_sha(&to.join(&transfer).join("output.mp4")), "the transfer's video");
    assert_eq!(h["controls"]["upscale"]["control_weight"].as_f64(), Some(0.7));

    // One submission of both; a transfer that does not succeed takes its upscale with it.
    let out = c.cli(&["inference", &ps, "--steps", "100", "--then-upscale", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let both: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (t, u) = (&both[0], &both[1]);
    assert_eq!((t["kind"].as_str(), u["kind"].as_str()), (Some("transfer"), Some("upscale")), "{both}");
    assert_eq!(u["parent_run"], t["id"]);
    let t = t["id"].as_str().unwrap();
    let u = u["id"].as_str().unwrap();
    assert!(c.cli(&["runs", "cancel", t]).status.success());
    assert_eq!(c.wait_run(u), "cancelled");
    let error = c.json(&["runs", "show", u, "--json"])["error"].as_str().unwrap().to_string();
    assert!(error.contains("which it waited for, cancelled"), "{error}");
    // An upscale after a run that already failed or was cancelled is refused, naming the fix.
    let out = c.cli(&["upscale", "--after", t]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("retry it first") && stderr(&out).contains(&format!("cosmos runs retry {t}")));
    // After a succeeded one, --after is the plain upscale.
    let out = c.cli(&["upscale", "--after", &transfer, "--wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
