//! An agent restarted under its process-runtime jobs (issue 20): stopped with
//! SIGTERM as systemd does, or killed with `kill -9`, while a job runs or
//! while it ends, the restarted agent reports the job's real outcome, with
//! its outputs, and the job is never run a second time.

use super::Cluster;
use cosmos_controller::blobs::Store;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The controller never declares the agent lost while a test keeps it down:
/// a re-queued job would run twice for a reason other than the one tested.
const LOST_AFTER_MS: u64 = 300_000;
/// Bound on every wait of these tests.
const WAIT: Duration = Duration::from_secs(60);
/// How long a job has been running when its agent is stopped.
const RUNNING_FOR: Duration = Duration::from_millis(1_000);

/// Submits one job that sleeps `sleep_s` seconds, then writes `content` into
/// its required output `out.txt` and exits with `exit_code`; returns its id.
fn submit(c: &Cluster, name: &str, sleep_s: u32, content: &str, exit_code: i32) -> String {
    let path = c.dir.path().join(format!("{name}.jsonl"));
    let line = json!({
        "name": name,
        "command": ["sh", "-c", format!("sleep {sleep_s}; echo {content} > out.txt; exit {exit_code}")],
        "outputs": [{ "path": "out.txt", "required": true }],
        // One attempt only: a lost attempt then shows as a failure, not as a quiet second run.
        "max_attempts": 1,
    });
    std::fs::write(&path, format!("{line}\n")).unwrap();
    let v = c.json(&["jobs", "submit", path.to_str().unwrap(), "--json"]);
    v[0].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

fn job(c: &Cluster, id: &str) -> Value {
    c.json(&["jobs", "show", id, "--json"])
}

fn wait_until(c: &Cluster, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; logs in {}", c.dir.path().display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_final(c: &Cluster, id: &str) -> Value {
    let mut last = Value::Null;
    wait_until(c, &format!("{id} to end"), || {
        last = job(c, id);
        matches!(last["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
    });
    last
}

/// The directory of the agent's only attempt, once its record is written.
fn attempt_dir(c: &Cluster) -> PathBuf {
    let attempts = c.dir.path().join("agent-0/attempts");
    let mut found = None;
    wait_until(c, "the attempt to start", || {
        found = std::fs::read_dir(&attempts)
            .ok()
            .and_then(|d| d.flatten().map(|e| e.path()).find(|p| started(p).is_some()));
        found.is_some()
    });
    found.unwrap()
}

/// The start the attempt's record holds, once written.
fn started(dir: &std::path::Path) -> Option<Value> {
    let path = dir.join(cosmos_agent::process::RECORD_LOG);
    cosmos_agent::supervise::read_log::<Value>(&path).ok()??.started
}

/// The process group the attempt's record names.
fn pgid(dir: &std::path::Path) -> i32 {
    started(dir).expect("a start record")["pgid"].as_i64().unwrap() as i32
}

/// Starts a job and returns once it has run for [`RUNNING_FOR`]: its id and attempt directory.
fn start_job(c: &Cluster, name: &str, sleep_s: u32, content: &str, exit_code: i32) -> (String, PathBuf) {
    let id = submit(c, name, sleep_s, content, exit_code);
    wait_until(c, "the job to run", || job(c, &id)["state"] == "running");
    let dir = attempt_dir(c);
    std::thread::sleep(RUNNING_FOR);
    (id, dir)
}

/// Ends the agent with `signal` and waits for it to be gone.
fn stop_agent(c: &mut Cluster, signal: i32) {
    let mut agent = c.agents[0].take().expect("the agent runs");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.0.id() as i32, signal) };
    let status = agent.0.wait().unwrap();
    if signal == libc::SIGTERM {
        assert!(status.success(), "the agent did not stop cleanly on SIGTERM: {status:?}");
    }
}

fn start_agent(c: &mut Cluster) {
    c.agents[0] = Some(c.spawn_agent(0));
    c.wait_agents(1);
}

/// Asserts the job succeeded on its first attempt and its output reached the controller.
fn assert_delivered_once(c: &Cluster, j: &Value, content: &str) {
    assert_eq!(j["state"], "succeeded", "{j}; logs in {}", c.dir.path().display());
    assert_eq!(j["attempts"], 1, "the job ran again: {j}");
    let expected = format!("{content}\n");
    let scratch = tempfile::tempdir().unwrap();
    let (sha, size) = Store::open(scratch.path()).unwrap().put_bytes(expected.as_bytes()).unwrap();
    let store = Store::open(c.data().join("blobs")).unwrap();
    assert_eq!(store.size(&sha), Some(size), "the output is in the controller's store");
    assert!(store.verify(&sha).unwrap());
}

/// A job ends while its agent is down: waits until its process group is gone.
fn wait_job_gone(c: &Cluster, dir: &std::path::Path) {
    let pgid = pgid(dir);
    wait_until(c, "the job to end while its agent is down", || !cosmos_agent::process::group_exists(pgid));
}

#[test]
fn an_agent_stopped_with_sigterm_mid_run_reports_the_job_it_adopted() {
    let mut c = Cluster::start(1, LOST_AFTER_MS);
    let (id, _) = start_job(&c, "term-mid-run", 4, "term-mid-run-done", 0);
    stop_agent(&mut c, libc::SIGTERM);
    start_agent(&mut c);
    let j = wait_final(&c, &id);
    assert_delivered_once(&c, &j, "term-mid-run-done");
}

#[test]
fn an_agent_killed_mid_run_reports_the_job_it_adopted() {
    let mut c = Cluster::start(1, LOST_AFTER_MS);
    let (id, _) = start_job(&c, "kill-mid-run", 4, "kill-mid-run-done", 0);
    stop_agent(&mut c, libc::SIGKILL);
    start_agent(&mut c);
    let j = wait_final(&c, &id);
    assert_delivered_once(&c, &j, "kill-mid-run-done");
}

#[test]
fn a_job_that_succeeds_while_its_agent_is_down_is_reported_when_it_returns() {
    let mut c = Cluster::start(1, LOST_AFTER_MS);
    let (id, dir) = start_job(&c, "term-at-exit", 2, "term-at-exit-done", 0);
    stop_agent(&mut c, libc::SIGTERM);
    wait_job_gone(&c, &dir);
    start_agent(&mut c);
    let j = wait_final(&c, &id);
    assert_delivered_once(&c, &j, "term-at-exit-done");
}

#[test]
fn a_job_that_fails_while_its_agent_is_down_is_reported_with_its_exit_code() {
    let mut c = Cluster::start(1, LOST_AFTER_MS);
    let (id, dir) = start_job(&c, "kill-at-exit", 2, "partial", 42);
    stop_agent(&mut c, libc::SIGKILL);
    wait_job_gone(&c, &dir);
    start_agent(&mut c);
    let j = wait_final(&c, &id);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    assert_eq!(j["exit_code"], 42, "the real exit code is reported: {j}");
    assert!(j["error"].as_str().unwrap_or("").contains("exited with code 42"), "{j}");
}

#[test]
fn a_job_adopted_after_a_restart_is_cancelled_with_its_whole_group() {
    let mut c = Cluster::start(1, LOST_AFTER_MS);
    let (id, dir) = start_job(&c, "cancel-adopted", 120, "never", 0);
    stop_agent(&mut c, libc::SIGTERM);
    start_agent(&mut c);
    let out = c.cli(&["jobs", "cancel", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j = wait_final(&c, &id);
    assert_eq!(j["state"], "cancelled", "{j}");
    wait_job_gone(&c, &dir);
}
