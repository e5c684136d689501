//! What a user of the CLI hits (issue 20, "Defects a user hits"), through the
//! binary: clients that outlive a controller restart, a port in use, missing
//! ids, errors in the terms of the command typed, one JSON schema per object.
//! Each test failed on the code before its fix.

use super::{BIN, Cluster, Proc};
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A deadline no healthy run comes near: the tests poll against it, never time anything.
const NEVER: Duration = Duration::from_secs(120);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Cluster {
    /// A client command started in the background, its output captured.
    fn spawn_cli(&self, args: &[&str]) -> std::process::Child {
        Command::new(BIN)
            .args(args)
            .env("COSMOS_CONTROLLER", &self.api)
            .env("COSMOS_DATA_DIR", self.data())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn job_state(&self, id: &str) -> String {
        self.json(&["jobs", "show", id, "--json"])["state"].as_str().unwrap().to_string()
    }

    /// Polls until `done` holds for the output of `args`.
    fn poll(&self, what: &str, args: &[&str], mut done: impl FnMut(&Output) -> bool) {
        let deadline = Instant::now() + NEVER;
        loop {
            if done(&self.cli(args)) {
                return;
            }
            assert!(Instant::now() < deadline, "never saw {what}; logs in {}", self.dir.path().display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits for a background client to end: its exit status, stdout and stderr.
fn finish(mut child: std::process::Child) -> (bool, String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = se.read_to_string(&mut e);
        e
    });
    let _ = so.read_to_string(&mut out);
    err.push_str(&t.join().unwrap());
    let status = child.wait().unwrap();
    (status.success(), out, err)
}

fn write_jobs(dir: &Path, name: &str, lines: &[Value]) -> String {
    let path = dir.join(name);
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn waiting_and_following_clients_carry_on_through_a_controller_restart() {
    let mut c = Cluster::start(1, 30_000);
    // A job that prints numbered lines slowly, past the controller's restart;
    // it waits for `go` before its second half, so the restart surely falls mid-run.
    let go = c.dir.path().join("go");
    let script = format!(
        "for i in $(seq 1 20); do echo line $i; sleep 0.05; done; \
         while [ ! -e {go} ]; do sleep 0.05; done; \
         for i in $(seq 21 40); do echo line $i; sleep 0.05; done",
        go = go.display()
    );
    let batch = write_jobs(
        c.dir.path(),
        "slow.jsonl",
        &[serde_json::json!({ "name": "slow", "command": ["sh", "-c", script], "max_attempts": 1 })],
    );
    let out = c.cli(&["jobs", "submit", &batch]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.poll("the first half of the log", &["jobs", "logs", "job-1"], |o| text(&o.stdout).contains("line 20\n"));

    let mut waiter = c.spawn_cli(&["jobs", "wait", "job-1"]);
    let (said, heard) = std::sync::mpsc::channel::<String>();
    let waiter_err = waiter.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(waiter_err)).map_while(Result::ok) {
            let _ = said.send(line);
        }
    });
    let follower = c.spawn_cli(&["jobs", "logs", "-f", "job-1"]);
    let json_follower = c.spawn_cli(&["jobs", "logs", "-f", "job-1", "--json"]);
    // Let the followers print the first half before the controller goes away.
    std::thread::sleep(Duration::from_millis(500));
    Cluster::kill9(&mut c.controller);
    // Down until the waiter has noticed: it polls, and a short outage could fall between two polls.
    let mut waiter_said = Vec::new();
    while !waiter_said.iter().any(|l: &String| l.contains("retrying for up to")) {
        waiter_said.push(heard.recv_timeout(NEVER).expect("the waiter says it is retrying"));
    }
    let (api, agents) = (c.api.trim_start_matches("http://").to_string(), c.agent_addr.clone());
    c.start_controller(&api, &agents);
    // The second half is printed once the agent is back: what an agent
    // printed into the outage is its own delivery problem, not the clients'.
    c.wait_agents(1);
    std::fs::write(&go, "").unwrap();

    let status = waiter.wait().unwrap();
    waiter_said.extend(heard.iter());
    assert!(status.success(), "`jobs wait` gave up across the restart: {waiter_said:?}");
    assert!(waiter_said.iter().any(|l| l.contains("reachable again")), "{waiter_said:?}");
    let (ok, out, err) = finish(follower);
    assert!(ok, "`jobs logs -f` gave up across the restart: {err}");
    let expected: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "every line once, in order; stderr: {err}");
    let (ok, out, err) = finish(json_follower);
    assert!(ok, "{err}");
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    let texts: Vec<&str> = lines.iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(texts, expected, "{out}");
    assert!(lines.iter().all(|l| l["job_id"] == "job-1" && l["stream"] == "stdout" && l["attempt_id"] == "att-1"));
    assert_eq!(c.job_state("job-1"), "succeeded");
}

#[test]
fn a_waiting_client_gives_up_on_a_controller_that_stays_away_and_says_so() {
    let mut c = Cluster::start(1, 30_000);
    let batch = write_jobs(
        c.dir.path(),
        "long.jsonl",
        &[serde_json::json!({ "name": "long", "command": ["sleep", "600"], "max_attempts": 1 })],
    );
    assert!(c.cli(&["jobs", "submit", &batch]).status.success());
    let waiter = c.spawn_cli(&["jobs", "wait", "job-1", "--reconnect-wait-s", "1"]);
    std::thread::sleep(Duration::from_millis(300));
    Cluster::kill9(&mut c.controller);
    let (ok, _, err) = finish(waiter);
    assert!(!ok, "the waiter claimed success without a controller");
    assert!(err.contains("retrying for up to 1 s"), "{err}");
    assert!(err.contains("stayed unreachable for 1 s"), "{err}");
    assert!(err.contains("--reconnect-wait-s"), "the error names the fix: {err}");
}

#[test]
fn a_controller_whose_port_is_taken_says_so_without_a_panic() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    for (flag, other) in [("--api-listen", "--agent-listen"), ("--agent-listen", "--api-listen")] {
        let out = Command::new(BIN)
            .args(["controller", "--data-dir"])
            .arg(dir.path().join(flag.trim_start_matches('-')))
            .args([flag, &port, other, "127.0.0.1:0"])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{flag}: started on a taken port");
        assert!(err.contains(&format!("cannot listen on {port}: address in use")), "{flag}: {err}");
        assert!(err.contains(flag), "{flag}: the error names the flag to change: {err}");
        assert!(!err.contains("panicked"), "{flag}: {err}");
    }
}

#[test]
fn a_controller_listening_beyond_loopback_warns_that_the_token_is_the_only_protection() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ctl.log");
    let mut child = Command::new(BIN)
        .args(["controller", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(["--api-listen", "0.0.0.0:0", "--agent-listen", "0.0.0.0:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    // The controller prints its addresses once it listens; the warnings come before.
    let _ = child.stdout.as_mut().unwrap().read(&mut first);
    let _p = Proc(child);
    let err = std::fs::read_to_string(&log).unwrap();
    for flag in ["--api-listen 0.0.0.0:0", "--agent-listen 0.0.0.0:0"] {
        assert!(err.contains(&format!("warning: {flag} is reachable from other hosts")), "{err}");
    }
    assert!(err.contains("the only protection"), "{err}");
}

/// Runs a client command to its end (polling against a never-reached deadline, so a hang fails the test).
fn run_to_end(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let mut child = c.spawn_cli(args);
    let deadline = Instant::now() + NEVER;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cosmos {args:?} never ended");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    finish(child)
}

#[test]
fn every_command_that_names_a_missing_id_fails_naming_it() {
    let c = Cluster::start(1, 30_000);
    let (job, run, prompt, agent) = ("job-99", "rs_000000000000", "ps_000000000000", "no-such-host");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["jobs", "show", job], job),
        (vec!["jobs", "cancel", job], job),
        (vec!["jobs", "logs", job], job),
        (vec!["jobs", "logs", "-f", job], job),
        (vec!["jobs", "wait", job], job),
        (vec!["agents", "drain", agent], agent),
        (vec!["agents", "undrain", agent], agent),
        (vec!["runs", "show", run], run),
        (vec!["runs", "cancel", run], run),
        (vec!["runs", "logs", run], run),
        (vec!["runs", "logs", "-f", run], run),
        (vec!["runs", "wait", run], run),
        (vec!["upscale", run], run),
        (vec!["upscale", run, "--wait"], run),
        (vec!["download", run], run),
        (vec!["prompts", "show", prompt], prompt),
        (vec!["prompts", "delete", prompt], prompt),
        (vec!["prompt-enhance", prompt], prompt),
        (vec!["inference", prompt], prompt),
        (vec!["inference", prompt, "--wait"], prompt),
        (vec!["runs", "list", "--prompt", prompt], prompt),
    ];
    for (args, id) in cases {
        let (ok, out, err) = run_to_end(&c, &args);
        assert!(!ok, "cosmos {args:?} succeeded: {out}");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: no "), "cosmos {args:?}: {err}");
        assert!(first.contains(id), "cosmos {args:?} does not name {id}: {err}");
        assert!(!first.contains("line 1"), "cosmos {args:?} speaks of a file the user never wrote: {err}");
    }
}

/// An agent of `gpus` simulated GPUs (`2x16GiB`) joining `c`, named `name`.
fn spawn_agent_with(c: &Cluster, name: &str, gpus: &str) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["agent", "--controller", &c.agent_addr, "--token-file"])
            .arg(c.data().join("agent.token"))
            .arg("--work-dir")
            .arg(c.dir.path().join(name))
            .args(["--simulated-gpus", gpus, "--name", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A prompt on `c` from a fresh video directory: its id.
fn make_prompt(c: &Cluster, tag: &str, extra_files: &[&str]) -> String {
    let dir = c.dir.path().join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("color.mp4"), format!("color of {tag}").repeat(50)).unwrap();
    for f in extra_files {
        std::fs::write(dir.join(f), format!("{f} of {tag}")).unwrap();
    }
    let p = c.json(&["create", "prompt", &format!("a scene of {tag}"), dir.to_str().unwrap(), "--json"]);
    p["id"].as_str().unwrap().to_string()
}

#[test]
fn single_run_commands_name_the_flag_or_the_prompt_and_batches_keep_the_line() {
    let c = Cluster::start(0, 30_000);
    let _small = spawn_agent_with(&c, "small", "2x16GiB");
    c.wait_agents(1);
    let ps = make_prompt(&c, "yard", &[]);

    let (ok, _, err) = run_to_end(&c, &["inference", &ps, "--gpus", "4"]);
    assert!(!ok);
    let first = err.lines().next().unwrap_or_default();
    assert!(first.contains(&format!("prompt {ps}: needs 4 GPUs on one host, but the largest host has 2")), "{err}");
    assert!(first.contains("lower --gpus"), "names the flag: {err}");
    assert!(!first.contains("line") && !first.contains("job 0"), "{err}");

    let (ok, _, err) = run_to_end(&c, &["inference", &ps, "--steps", "500"]);
    assert!(!ok);
    assert!(err.contains("error: --steps must be between 1 and 100"), "{err}");
    let (ok, _, err) = run_to_end(&c, &["inference", &ps, "--sigma-max", "99"]);
    assert!(!ok);
    assert!(err.contains("error: --sigma-max must be between 0 and 80"), "{err}");

    // A batch names the line of its file, once, and the key as the file spells it.
    let file = c.dir.path().join("runs.jsonl");
    let lines = format!(
        "# two runs\n{}\n\n{}\n",
        serde_json::json!({ "prompt_id": ps }),
        serde_json::json!({ "prompt_id": ps, "gpus": 4 })
    );
    std::fs::write(&file, lines).unwrap();
    let (ok, _, err) = run_to_end(&c, &["batch", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("runs.jsonl:4: needs 4 GPUs on one host"), "{err}");
    assert!(!err.contains("job 1 (line 2)"), "counts the file's lines only: {err}");
    std::fs::write(&file, format!("{}\n", serde_json::json!({ "prompt_id": ps, "sigma_max": 99 }))).unwrap();
    let (ok, _, err) = run_to_end(&c, &["batch", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("runs.jsonl:1: `sigma_max` must be between 0 and 80"), "{err}");
}

#[test]
fn json_has_one_shape_per_object_with_the_state_on_top() {
    let c = Cluster::start(1, 30_000);
    let ps = make_prompt(&c, "dock", &[]);
    let out = c.cli(&["inference", &ps, "--steps", "3", "--wait", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let runs: Value = serde_json::from_slice(&out.stdout).expect("one JSON document, the runs");
    let run = &runs[0];
    assert_eq!(run["state"], "succeeded", "the final state with --wait: {run}");
    let id = run["id"].as_str().unwrap().to_string();
    assert!(run["job_id"].as_str().unwrap().starts_with("job-") && run["prompt_id"] == ps.as_str(), "{run}");
    for r in c.json(&["runs", "list", "--json"]).as_array().unwrap() {
        assert!(r["state"].is_string() && r["job_id"].is_string(), "state at the top of every run: {r}");
    }
    assert_eq!(c.json(&["runs", "show", &id, "--json"])["state"], "succeeded");

    // Downloads print {"runs": [run…], "files": [file…]}, whichever command downloads.
    let to = c.dir.path().join("dl");
    let one = c.json(&["download", &id, "--to", to.to_str().unwrap(), "--json"]);
    let batch = c.dir.path().join("b.jsonl");
    std::fs::write(&batch, format!("{}\n", serde_json::json!({ "prompt_id": ps, "steps": 2 }))).unwrap();
    let many = c.json(&["batch", batch.to_str().unwrap(), "--download", to.to_str().unwrap(), "--json"]);
    for doc in [&one, &many] {
        let keys: Vec<&String> = doc.as_object().expect("an object").keys().collect();
        assert_eq!(keys, ["files", "runs"], "{doc}");
        assert_eq!(doc["runs"][0]["state"], "succeeded", "{doc}");
        let f = &doc["files"][0];
        assert!(f["run_id"].is_string() && f["path"].is_string() && f["sha256"].is_string(), "{f}");
        assert!(f["size_bytes"].is_u64(), "{f}");
    }

    // Jobs: objects with their state, from submit as from list; logs as JSON lines.
    let jobs = write_jobs(c.dir.path(), "j.jsonl", &[serde_json::json!({ "command": ["echo", "hello"] })]);
    let submitted = c.json(&["jobs", "submit", &jobs, "--wait", "--json"]);
    let job = submitted[0]["id"].as_str().unwrap().to_string();
    assert_eq!(submitted[0]["state"], "succeeded", "{submitted}");
    let out = c.cli(&["jobs", "logs", &job, "--json"]);
    let line: Value = serde_json::from_str(text(&out.stdout).lines().next().unwrap_or("")).expect("a JSON line");
    assert_eq!((line["job_id"].as_str(), line["line"].as_str()), (Some(job.as_str()), Some("hello")), "{line}");
    assert_eq!(line["stream"], "stdout");
}

#[test]
fn deleting_outputs_counts_what_it_removed_and_kept_and_later_commands_say_they_are_gone() {
    let c = Cluster::start(1, 30_000);
    let a = make_prompt(&c, "quay", &[]);
    let out = c.cli(&["inference", &a, "--steps", "2", "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = c.json(&["runs", "list", "--json"])[0].clone();
    let id = run["id"].as_str().unwrap();
    let outputs = run["outputs"].as_array().unwrap().len();
    assert!(outputs >= 2, "a transfer delivers its video and the derived control: {run}");

    let out = c.cli(&["prompts", "delete", &a, "--delete-outputs"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    let answer = c.json(&["runs", "show", id, "--json"]);
    assert_eq!(answer["outputs"].as_array().unwrap().len(), outputs);
    assert!(said.contains(&format!("of the {outputs} output files of its 1 runs, removed")), "{said}");
    assert!(said.contains("kept"), "{said}");

    let out = c.cli(&["runs", "show", id]);
    assert!(text(&out.stdout).contains("DELETED with its prompt"), "{}", text(&out.stdout));
    let out = c.cli(&["download", id, "--to", c.dir.path().join("x").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&format!("the outputs of run {id} were deleted")) && !err.contains("no blob"), "{err}");
}

#[test]
fn cosmos_up_hands_the_stand_in_its_knobs() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("out");
    let out = Command::new(BIN)
        .args(["up", "--agents", "1", "--", "demo", "--to", to.to_str().unwrap()])
        .env("COSMOS_STANDIN_FAIL", "1")
        .env("TMPDIR", dir.path())
        .env_remove("COSMOS_CONTROLLER")
        .env_remove("COSMOS_DATA_DIR")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the demo succeeded although every run was told to fail: {err}");
    assert!(err.contains("not every example run succeeded"), "{err}");
    assert!(err.contains("remove it with `rm -rf"), "up says how to remove its temporary directory: {err}");
}

#[test]
fn the_smaller_defects_of_show_list_create_and_enhance() {
    let c = Cluster::start(1, 30_000);
    // A misspelt control video is named, with what was taken.
    let dir = c.dir.path().join("pier");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("color.mp4"), "color".repeat(40)).unwrap();
    std::fs::write(dir.join("Depth.mp4"), "depth".repeat(40)).unwrap();
    let long = "a_very_long_prompt_name_that_goes_on_and_on";
    let out = c.cli(&["create", "prompt", "a pier at dusk", dir.to_str().unwrap(), "--name", long, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("taken color.mp4") && err.contains("not taken Depth.mp4"), "{err}");
    assert!(err.contains("Depth.mp4 is not depth.mp4"), "{err}");
    let ps: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ps = ps["id"].as_str().unwrap().to_string();

    // Long names keep the columns: the PARENT column starts where its header does.
    let listing = text(&c.cli(&["prompts", "list"]).stdout);
    let mut rows = listing.lines();
    let column = rows.next().unwrap().find("PARENT").unwrap();
    let row = rows.find(|r| r.starts_with(&ps)).unwrap();
    assert_eq!(row.chars().nth(column), Some('-'), "{listing}");

    // --overwrite without a terminal is refused before any run is made.
    let out = c.cli(&["prompt-enhance", &ps, "--overwrite"]);
    assert!(!out.status.success() && text(&out.stderr).contains("--yes"), "{}", text(&out.stderr));
    assert!(c.json(&["runs", "list", "--json"]).as_array().unwrap().is_empty(), "a run was made before refusing");

    // runs show: host, GPUs and readable parameters; jobs show: the exit code on the deciding attempt.
    assert!(c.cli(&["inference", &ps, "--steps", "2", "--wait"]).status.success());
    let run = c.json(&["runs", "list", "--json"])[0].clone();
    let shown = text(&c.cli(&["runs", "show", run["id"].as_str().unwrap()]).stdout);
    assert!(shown.contains("host agent-0  GPUs GPU-"), "{shown}");
    assert!(shown.contains("steps") && !shown.contains("params {"), "{shown}");
    let job = text(&c.cli(&["jobs", "show", run["job_id"].as_str().unwrap()]).stdout);
    assert!(job.contains("exit 0") && !job.contains("exit -"), "{job}");

    // A cancelled running run counts the attempt it lists.
    let slow = c.dir.path().join("slow.jsonl");
    std::fs::write(&slow, format!("{}\n", serde_json::json!({ "prompt_id": ps, "steps": 100 }))).unwrap();
    let created = c.json(&["batch", slow.to_str().unwrap(), "--json"]);
    let slow_run = created[0]["id"].as_str().unwrap().to_string();
    c.poll("the slow run running", &["runs", "show", &slow_run, "--json"], |o| {
        serde_json::from_slice::<Value>(&o.stdout).is_ok_and(|v| v["state"] == "running")
    });
    assert!(c.cli(&["runs", "cancel", &slow_run]).status.success());
    c.poll("the slow run cancelled", &["runs", "show", &slow_run, "--json"], |o| {
        serde_json::from_slice::<Value>(&o.stdout).is_ok_and(|v| v["state"] == "cancelled")
    });
    let shown = text(&c.cli(&["runs", "show", &slow_run]).stdout);
    assert!(shown.contains("attempts 1"), "{shown}");
}

#[test]
fn a_cancelled_job_keeps_what_it_wrote_on_stderr_while_it_was_stopped() {
    let c = Cluster::start(1, 30_000);
    // As a Python job does on SIGTERM: the traceback comes after the stop.
    let script = "trap 'echo stopping-now >&2; exit 143' TERM; echo started; sleep 60 & wait";
    let batch =
        write_jobs(c.dir.path(), "term.jsonl", &[serde_json::json!({ "name": "t", "command": ["sh", "-c", script] })]);
    let ids = c.json(&["jobs", "submit", &batch, "--json"]);
    let job = ids[0].as_str().or(ids[0]["id"].as_str()).unwrap_or_else(|| panic!("no id in {ids}")).to_string();
    c.poll("the job printing", &["jobs", "logs", &job], |o| text(&o.stdout).contains("started"));
    assert!(c.cli(&["jobs", "cancel", &job]).status.success());
    c.poll("the job cancelled", &["jobs", "show", &job, "--json"], |o| {
        serde_json::from_slice::<Value>(&o.stdout).is_ok_and(|v| v["state"] == "cancelled")
    });
    let attempts = c.dir.path().join("agent-0/attempts");
    let on_disk: String = std::fs::read_dir(&attempts)
        .unwrap()
        .flatten()
        .map(|d| std::fs::read_to_string(d.path().join("stderr.log")).unwrap_or_default())
        .collect();
    assert!(on_disk.contains("stopping-now"), "the job did not get its SIGTERM: {on_disk:?}");
    c.poll("the stop's stderr in the job's logs", &["jobs", "logs", &job], |o| {
        text(&o.stdout).contains("stopping-now") || text(&o.stderr).contains("stopping-now")
    });
}

#[test]
fn a_failed_job_is_retried_under_its_id_and_a_waiting_one_says_why() {
    let c = Cluster::start(1, 30_000);
    let batch = write_jobs(
        c.dir.path(),
        "fails.jsonl",
        &[serde_json::json!({ "name": "fails", "command": ["sh", "-c", "exit 3"], "max_attempts": 1 })],
    );
    assert!(c.cli(&["jobs", "submit", &batch]).status.success());
    c.poll("job-1 failed", &["jobs", "show", "job-1", "--json"], |o| text(&o.stdout).contains("\"state\": \"failed\""));

    let out = c.cli(&["jobs", "retry", "job-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("job-1 re-queued"), "{}", text(&out.stdout));
    c.poll("job-1's second attempt ended", &["jobs", "show", "job-1", "--json"], |o| {
        let j: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        j["state"] == "failed" && j["attempt_history"].as_array().is_some_and(|a| a.len() == 2)
    });
    let j = c.json(&["jobs", "show", "job-1", "--json"]);
    assert_eq!(j["retries"], 1, "{j}");
    assert!(j["started_ms"].as_u64().is_some() && j["gpu_seconds"].as_f64().is_some(), "accounting: {j}");
    // A succeeded job cannot be retried; the refusal says why.
    let ok = write_jobs(c.dir.path(), "ok.jsonl", &[serde_json::json!({ "name": "ok", "command": ["true"] })]);
    assert!(c.cli(&["jobs", "submit", &ok, "--wait"]).status.success());
    let out = c.cli(&["jobs", "retry", "job-2"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("only a failed or cancelled job can be retried"), "{}", text(&out.stderr));

    // Listing since a time: an hour back holds both, the future holds none.
    let recent = c.json(&["jobs", "list", "--since", "1h", "--json"]);
    assert_eq!(recent.as_array().map(Vec::len), Some(2), "{recent}");
    let future = format!("{}", u64::MAX / 2);
    let none = c.json(&["jobs", "list", "--since", &future, "--json"]);
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");
    let out = c.cli(&["jobs", "list", "--since", "yesterday"]);
    assert!(!out.status.success() && text(&out.stderr).contains("--since yesterday"), "{}", text(&out.stderr));

    // A job after a failed one is refused, naming the fix; one after a running
    // one waits, says why, and runs once that one succeeds.
    let after_failed =
        write_jobs(c.dir.path(), "late.jsonl", &[serde_json::json!({ "command": ["true"], "after": ["job-1"] })]);
    let out = c.cli(&["jobs", "submit", &after_failed]);
    assert!(!out.status.success() && text(&out.stderr).contains("retry that one first"), "{}", text(&out.stderr));
    let go = c.dir.path().join("go");
    let chain = write_jobs(
        c.dir.path(),
        "chain.jsonl",
        &[
            serde_json::json!({ "name": "first", "command": ["sh", "-c", format!("while [ ! -e {} ]; do sleep 0.05; done", go.display())] }),
        ],
    );
    assert!(c.cli(&["jobs", "submit", &chain]).status.success());
    let then = write_jobs(
        c.dir.path(),
        "then.jsonl",
        &[serde_json::json!({ "name": "then", "command": ["true"], "after": ["job-3"] })],
    );
    assert!(c.cli(&["jobs", "submit", &then]).status.success());
    let shown = text(&c.cli(&["jobs", "show", "job-4"]).stdout);
    assert!(shown.contains("waiting: waiting for job-3 to succeed"), "{shown}");
    std::fs::write(&go, b"").unwrap();
    c.poll("job-4 ran after job-3", &["jobs", "show", "job-4", "--json"], |o| {
        text(&o.stdout).contains("\"state\": \"succeeded\"")
    });
}

/// The text of `row` from the character column where `header` has `name`.
fn column<'a>(header: &str, row: &'a str, name: &str) -> &'a str {
    let at = header.find(name).unwrap_or_else(|| panic!("no column {name} in {header}"));
    let (byte, _) = row.char_indices().nth(at).unwrap_or_else(|| panic!("row too short for {name}: {row}"));
    row[byte..].trim_start()
}

#[test]
fn tables_show_host_gpus_elapsed_and_gpu_seconds_in_their_columns() {
    let c = Cluster::start(1, 30_000);
    let dir = c.dir.path().join("long");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("color.mp4"), "color".repeat(40)).unwrap();
    let long = "a_prompt_name_long_enough_to_push_every_column_aside";
    let p = c.json(&["create", "prompt", "a long night", dir.to_str().unwrap(), "--name", long, "--json"]);
    let ps = p["id"].as_str().unwrap();
    let out = c.cli(&["inference", ps, "--steps", "2", "--gpus", "2", "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = c.json(&["runs", "list", "--json"])[0].clone();
    let id = run["id"].as_str().unwrap();

    let listing = text(&c.cli(&["runs", "list"]).stdout);
    let mut rows = listing.lines();
    let header = rows.next().unwrap();
    let row = rows.find(|r| r.starts_with(id)).unwrap();
    assert!(column(header, row, "HOST").starts_with("agent-0 "), "{listing}");
    assert!(column(header, row, "GPUS").starts_with("2 "), "{listing}");
    let elapsed = column(header, row, "ELAPSED");
    assert!(elapsed.split_whitespace().next().unwrap().ends_with('s'), "{listing}");
    let gpu_s: f64 = column(header, row, "GPU-S").split_whitespace().next().unwrap().parse().unwrap();
    assert!(gpu_s > 0.0, "two GPUs for a while: {listing}");
    assert!(row.contains('…'), "the long name is cut: {listing}");

    let shown = text(&c.cli(&["runs", "show", id]).stdout);
    assert!(shown.contains("host agent-0  GPUs GPU-"), "{shown}");
    assert!(shown.contains("since its first start") && shown.contains("GPU-seconds"), "{shown}");

    let jobs = write_jobs(
        c.dir.path(),
        "named.jsonl",
        &[serde_json::json!({ "name": "a-job-name-far-longer-than-its-column-is-wide", "command": ["true"] })],
    );
    assert!(c.cli(&["jobs", "submit", &jobs, "--wait"]).status.success());
    let listing = text(&c.cli(&["jobs", "list"]).stdout);
    let mut rows = listing.lines();
    let header = rows.next().unwrap();
    for row in rows {
        assert!(column(header, row, "HOST").starts_with("agent-0 "), "{listing}");
        assert!(column(header, row, "EXIT").starts_with("0 "), "{listing}");
    }
}

#[test]
fn a_failure_shows_the_last_lines_of_its_stderr_not_only_the_last() {
    let controller_args = ["--run-env", "COSMOS_STANDIN_FAIL=CUDA out of memory", "--run-max-attempts", "1"];
    let c = Cluster::start_with(1, 30_000, controller_args.map(String::from).to_vec(), |_| Vec::new());
    let ps = make_prompt(&c, "oom", &[]);
    let (ok, out, err) = run_to_end(&c, &["inference", &ps, "--steps", "3", "--wait"]);
    assert!(!ok, "{out}{err}");
    // The waiting command's summary quotes the traceback under the failure.
    assert!(out.contains("    Traceback (most recent call last):"), "{out}");
    assert!(out.contains("    RuntimeError: CUDA out of memory"), "{out}");
    let run = c.json(&["runs", "list", "--json"])[0].clone();
    let error = run["error"].as_str().unwrap();
    let lines: Vec<&str> = error.lines().collect();
    assert!(
        lines[0].ends_with("its last error output: RuntimeError: CUDA out of memory (after 1 of 1 attempts)"),
        "the summary ends with the exception and the attempts: {error}"
    );
    assert!(lines.iter().any(|l| l.trim() == "Traceback (most recent call last):"), "{error}");
    assert!(lines.len() <= 2 + 5, "at most five quoted lines: {error}");
    let shown = text(&c.cli(&["runs", "show", run["id"].as_str().unwrap()]).stdout);
    assert!(shown.contains("\n    Traceback (most recent call last):\n"), "{shown}");
    // A table row keeps to the summary.
    let listing = text(&c.cli(&["runs", "list"]).stdout);
    assert_eq!(listing.lines().count(), 2, "{listing}");
    assert!(listing.contains("CUDA out of memory (after 1 of 1 attempts) …"), "{listing}");

    // Any job: the last five lines of its stderr, oldest first.
    let script = "for i in 1 2 3 4 5 6 7; do echo \"err $i\" >&2; done; exit 1";
    let jobs = write_jobs(
        c.dir.path(),
        "noisy.jsonl",
        &[serde_json::json!({ "name": "noisy", "command": ["sh", "-c", script], "max_attempts": 1 })],
    );
    let (ok, out, _) = run_to_end(&c, &["jobs", "submit", &jobs, "--wait"]);
    assert!(!ok);
    let quoted: Vec<&str> = out.lines().filter(|l| l.starts_with("      err")).collect();
    assert_eq!(quoted, ["      err 3", "      err 4", "      err 5", "      err 6", "      err 7"], "{out}");
    let job = c.json(&["jobs", "list", "--json"]).as_array().unwrap().last().unwrap().clone();
    let shown = text(&c.cli(&["jobs", "show", job["id"].as_str().unwrap()]).stdout);
    assert!(shown.contains("its last error output: err 7 (after 1 of 1 attempts)\n"), "{shown}");
    assert!(shown.contains("\n    err 3\n") && !shown.contains("err 2"), "{shown}");
}

#[test]
fn a_run_is_followed_and_waited_for_under_its_own_id() {
    let c = Cluster::start(1, 30_000);
    let ps = make_prompt(&c, "lane", &[]);
    let created = c.json(&["inference", &ps, "--steps", "3", "--json"]);
    let id = created[0]["id"].as_str().unwrap().to_string();
    let follower = c.spawn_cli(&["runs", "logs", "-f", &id]);
    let waiter = c.spawn_cli(&["runs", "wait", &id]);
    let (ok, out, err) = finish(waiter);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("{id} ")) && out.contains("1 of 1 runs succeeded"), "{out}");
    let (ok, out, err) = finish(follower);
    assert!(ok, "{err}");
    assert!(out.contains("| 3/3 ["), "the follower printed the run's progress to its end: {out}");
    let again = c.json(&["runs", "wait", &id, "--json"]);
    assert_eq!(again[0]["id"], id.as_str(), "{again}");
    assert_eq!(again[0]["state"], "succeeded", "{again}");

    // A run that does not succeed: `runs wait` exits non-zero, naming it and how to read its logs.
    let slow = c.json(&["inference", &ps, "--steps", "100", "--json"]);
    let slow = slow[0]["id"].as_str().unwrap().to_string();
    let waiter = c.spawn_cli(&["runs", "wait", &slow, &id]);
    c.poll("the slow run running", &["runs", "show", &slow, "--json"], |o| {
        serde_json::from_slice::<Value>(&o.stdout).is_ok_and(|v| v["state"] == "running")
    });
    assert!(c.cli(&["runs", "cancel", &slow]).status.success());
    let (ok, out, _) = finish(waiter);
    assert!(!ok, "{out}");
    assert!(out.contains("1 of 2 runs succeeded"), "{out}");
    assert!(out.contains(&format!("logs: cosmos runs logs {slow}")), "{out}");
}

/// A background client whose stdout is read as it comes: the process, and a receiver of its bytes.
fn spawn_reading(c: &Cluster, args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<Vec<u8>>) {
    let mut child = c.spawn_cli(args);
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for a client from [`spawn_reading`] to end: its exit status, the rest of its stdout, its stderr.
fn finish_reading(mut child: std::process::Child, rx: std::sync::mpsc::Receiver<Vec<u8>>) -> (bool, Vec<u8>, String) {
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let status = child.wait().unwrap();
    let rest = rx.iter().flatten().collect();
    (status.success(), rest, err)
}

/// Reads `rx` until what it gave contains `wanted`; all it gave.
fn read_until(rx: &std::sync::mpsc::Receiver<Vec<u8>>, got: &mut Vec<u8>, wanted: &str) {
    while !text(got).contains(wanted) {
        match rx.recv_timeout(NEVER) {
            Ok(bytes) => got.extend(bytes),
            Err(_) => panic!("never saw {wanted:?}; got {:?}", text(got)),
        }
    }
}

#[test]
fn progress_without_a_newline_reaches_followers_while_the_job_runs() {
    let c = Cluster::start(1, 30_000);
    // tqdm's way: each update after a `\r`, the newline only at the end; the
    // job then waits for `go`, so it surely runs while the followers look.
    let go = c.dir.path().join("go");
    let script = format!(
        "printf 'step 1/3\\r'; sleep 0.3; printf 'step 2/3\\r'; \
         while [ ! -e {go} ]; do sleep 0.05; done; printf 'step 3/3\\n'",
        go = go.display()
    );
    let batch = write_jobs(
        c.dir.path(),
        "bar.jsonl",
        &[serde_json::json!({ "name": "bar", "command": ["sh", "-c", script], "max_attempts": 1 })],
    );
    assert!(c.cli(&["jobs", "submit", &batch]).status.success());
    let (follower, rx) = spawn_reading(&c, &["jobs", "logs", "-f", "job-1"]);
    let (json_follower, json_rx) = spawn_reading(&c, &["jobs", "logs", "-f", "job-1", "--json"]);
    let mut got = Vec::new();
    read_until(&rx, &mut got, "step 2/3\r");
    let mut json_got = Vec::new();
    read_until(&json_rx, &mut json_got, "step 2/3\\r");
    assert_eq!(c.job_state("job-1"), "running", "seen while the job runs, not at its end");
    // A reader that does not follow sees the unended line too.
    let once = c.cli(&["jobs", "logs", "job-1"]);
    assert!(text(&once.stdout).ends_with("step 2/3\r\n"), "{:?}", text(&once.stdout));

    std::fs::write(&go, b"").unwrap();
    let (ok, rest, err) = finish_reading(follower, rx);
    assert!(ok, "{err}");
    got.extend(rest);
    assert_eq!(text(&got), "step 1/3\rstep 2/3\rstep 3/3\n", "the bytes as the job wrote them, once");
    let (ok, rest, err) = finish_reading(json_follower, json_rx);
    assert!(ok, "{err}");
    json_got.extend(rest);
    let objects: Vec<Value> = text(&json_got).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let joined: String = objects.iter().map(|o| o["line"].as_str().unwrap()).collect();
    assert_eq!(joined, "step 1/3\rstep 2/3\rstep 3/3", "{objects:?}");
    assert_eq!(objects.last().unwrap().get("partial"), None, "the line's end is not partial: {objects:?}");
    assert!(objects[..objects.len() - 1].iter().all(|o| o["partial"] == true), "{objects:?}");
}

#[test]
fn progress_without_a_newline_reaches_followers_from_a_container_too() {
    let image = "cosmos-transfer-standin:dev";
    let inspect = Command::new("docker").args(["image", "inspect", image]).output();
    assert!(
        inspect.as_ref().is_ok_and(|o| o.status.success()),
        "Docker with the image {image} is needed: run scripts/build-images (CI runs it through scripts/setup)"
    );
    // A minute a step: the run is surely in its first step while the follower looks.
    let controller = ["--cosmos-image", image, "--run-env", "COSMOS_STANDIN_STEP_MS=60000"];
    let c = Cluster::start_with(1, 15_000, controller.map(String::from).to_vec(), |dir| {
        let mut args = vec!["--runtime".to_string(), "docker".to_string()];
        for volume in ["checkpoints", "hf_cache"] {
            std::fs::create_dir_all(dir.join(volume)).unwrap();
            args.extend(["--volume".to_string(), format!("{volume}={}", dir.join(volume).display())]);
        }
        args
    });
    let ps = make_prompt(&c, "hold", &[]);
    let created = c.json(&["inference", &ps, "--steps", "3", "--json"]);
    let run = created[0]["id"].as_str().unwrap().to_string();
    let (follower, rx) = spawn_reading(&c, &["runs", "logs", "-f", &run]);
    let mut got = Vec::new();
    // tqdm's first bar, `  0%|          | 0/3 [00:00<?, ?it/s]`, ends in `\r`, not a newline.
    read_until(&rx, &mut got, "| 0/3 [");
    assert_eq!(c.json(&["runs", "show", &run, "--json"])["state"], "running", "seen while it runs");
    assert!(c.cli(&["runs", "cancel", &run]).status.success());
    let (ok, _, err) = finish_reading(follower, rx);
    assert!(ok, "the follower ends with the run: {err}");
}

#[test]
fn a_listing_comes_in_pages_and_the_event_stream_resumes_from_its_cursor() {
    // No agent: the jobs stay queued, so every listing below sees the same five.
    let c = Cluster::start(0, 10_000);
    let lines: Vec<Value> =
        (0..5).map(|i| serde_json::json!({ "name": format!("p{i}"), "command": ["true"] })).collect();
    let batch = write_jobs(c.dir.path(), "paged", &lines);
    assert!(c.cli(&["jobs", "submit", &batch]).status.success());
    let page = |args: &[&str]| {
        let out = c.cli(&[&["jobs", "list", "--json"], args].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        let ids: Vec<String> = serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect();
        (ids, text(&out.stderr))
    };
    let (first, hint) = page(&["--limit", "2"]);
    assert_eq!(first, ["job-1", "job-2"]);
    assert!(hint.contains("cosmos jobs list --after job-2"), "{hint}");
    let (second, _) = page(&["--limit", "2", "--after", "job-2"]);
    assert_eq!(second, ["job-3", "job-4"]);
    let (last, hint) = page(&["--limit", "2", "--after", "job-4"]);
    assert_eq!((last.as_slice(), hint.as_str()), (&["job-5".to_string()][..], ""), "the last page says no more");
    assert_eq!(page(&["--all"]).0.len(), 5);
    let out = c.cli(&["jobs", "list", "--limit", "10001"]);
    assert!(!out.status.success() && text(&out.stderr).contains("over 10000"), "{}", text(&out.stderr));

    // The stream from a listing's cursor carries what changed after it, each change once.
    let token = std::fs::read_to_string(c.data().join("api.token")).unwrap();
    let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let listing = agent
        .get(format!("{}/v1/jobs?limit=1", c.api))
        .header("Authorization", format!("Bearer {}", token.trim()))
        .call()
        .unwrap();
    let cursor = listing.headers()["Cosmos-Events-Cursor"].to_str().unwrap().to_string();
    assert!(c.cli(&["jobs", "cancel", "job-3"]).status.success());
    let mut stream = agent
        .get(format!("{}/v1/events?after={cursor}", c.api))
        .header("Authorization", format!("Bearer {}", token.trim()))
        .call()
        .unwrap()
        .into_body()
        .into_reader();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("\n\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let data = seen.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_else(|| panic!("{seen}"));
    let job: Value = serde_json::from_str(data).unwrap();
    assert_eq!((job["id"].as_str(), job["state"].as_str()), (Some("job-3"), Some("cancelled")), "{seen}");
    assert!(seen.contains("event: job") && seen.lines().any(|l| l.starts_with("id: ")), "{seen}");

    // A cursor of another controller start (or one gone from the ring) is told to list again.
    let stale = agent
        .get(format!("{}/v1/events?after=0:99", c.api))
        .header("Authorization", format!("Bearer {}", token.trim()))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(stale.contains("event: resync"), "{stale}");
}

#[test]
fn runs_list_and_search_page_through_runs_only_and_say_where_the_next_page_starts() {
    let c = Cluster::start(1, 30_000);
    let (dock, beach) = (make_prompt(&c, "dock", &[]), make_prompt(&c, "beach", &[]));
    let plain = c.dir.path().join("plain.jsonl");
    std::fs::write(&plain, "{\"command\": [\"true\"]}\n{\"command\": [\"true\"]}\n").unwrap();
    let batch = c.dir.path().join("runs.jsonl");
    for (i, ps) in [&dock, &beach, &dock, &beach, &dock].into_iter().enumerate() {
        // Plain jobs between the runs: a page of runs skips them.
        assert!(c.cli(&["jobs", "submit", plain.to_str().unwrap()]).status.success());
        std::fs::write(&batch, format!("{}\n", serde_json::json!({ "prompt_id": ps, "steps": i + 1 }))).unwrap();
        let out = c.cli(&["batch", batch.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let ids =
        |v: &Value| v.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let all = ids(&c.json(&["runs", "list", "--all", "--json"]));
    assert_eq!(all.len(), 5, "{all:?}");

    // Page by page, each full page says where the next one starts.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["runs", "list", "--limit", "2", "--json"];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        let out = c.cli(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let page = ids(&serde_json::from_slice(&out.stdout).unwrap());
        assert!(page.len() <= 2, "{page:?}");
        seen.extend(page);
        let err = text(&out.stderr);
        match err.split("--after ").nth(1).and_then(|t| t.split_whitespace().next()) {
            Some(next) => {
                assert!(next.starts_with("job-") && err.contains("cosmos runs list"), "{err}");
                after = Some(next.to_string());
            }
            None => break,
        }
        assert!(seen.len() <= 5, "pages go on past the runs: {seen:?}");
    }
    assert_eq!(seen, all, "the pages, one after the other, are the whole listing");

    let beach_runs = ids(&c.json(&["runs", "list", "--prompt", &beach, "--all", "--json"]));
    assert_eq!(beach_runs, vec![all[1].clone(), all[3].clone()]);
    let out = c.cli(&["runs", "search", "beach", "--limit", "1", "--json"]);
    assert_eq!(ids(&serde_json::from_slice(&out.stdout).unwrap()), vec![all[1].clone()]);
    assert!(text(&out.stderr).contains("more runs follow: cosmos runs search --after job-"), "{}", text(&out.stderr));
    let (ok, _, err) = run_to_end(&c, &["runs", "list", "--limit", "0"]);
    assert!(!ok && err.contains("`limit` must be 1 to 10000"), "{err}");
}
