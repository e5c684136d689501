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

    /// Kills the controller and starts it again on the same directory and ports.
    fn restart_controller(&mut self) {
        Cluster::kill9(&mut self.controller);
        let (api, agents) = (self.api.trim_start_matches("http://").to_string(), self.agent_addr.clone());
        self.start_controller(&api, &agents);
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

    let waiter = c.spawn_cli(&["jobs", "wait", "job-1"]);
    let follower = c.spawn_cli(&["jobs", "logs", "-f", "job-1"]);
    let json_follower = c.spawn_cli(&["jobs", "logs", "-f", "job-1", "--json"]);
    // Let the followers print the first half before the controller goes away.
    std::thread::sleep(Duration::from_millis(500));
    c.restart_controller();
    // The second half is printed once the agent is back: what an agent
    // printed into the outage is its own delivery problem, not the clients'.
    c.wait_agents(1);
    std::fs::write(&go, "").unwrap();

    let (ok, out, err) = finish(waiter);
    assert!(ok, "`jobs wait` gave up across the restart: {out}\n{err}");
    assert!(err.contains("retrying for up to"), "the waiter said nothing of the outage: {err}");
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
