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
