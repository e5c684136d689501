//! The controller's wall clock stepped by 10 minutes, forward and then back,
//! while agents run jobs (issue 11): liveness and retries run on its
//! monotonic clock, so no agent turns suspect or lost and no attempt is
//! re-queued. The real controller runs under libfaketime (Debian's
//! `faketime`, which scripts/setup installs): its wall clock is the real one
//! plus the offset in a file this test rewrites, read afresh at every call
//! (`FAKETIME_NO_CACHE`), and its monotonic clock is left alone
//! (`FAKETIME_DONT_FAKE_MONOTONIC`), as when NTP steps a host's clock.

use super::Cluster;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where Debian's libfaketime puts its library for threaded programs.
const LIBFAKETIME_MT: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
/// The step, forward and then back: 10 minutes.
const STEP_S: i64 = 600;
/// Far shorter than the step: a controller measuring silence on its wall clock loses every agent at the step.
const LOST_AFTER_MS: u64 = 10_000;
/// How long each clock setting is held while the jobs run: past the controller's suspect bound (3 s).
const HOLD: Duration = Duration::from_secs(5);
/// How long each job runs: through both steps.
const JOB_S: u32 = 20;
/// Jobs running through the steps, spread over the agents.
const JOBS: usize = 4;
/// Bound on every wait of this test.
const WAIT: Duration = Duration::from_secs(90);

/// Sets the controller's wall-clock offset. Written whole, then renamed, so
/// libfaketime never reads a half-written file (which it would take as no offset).
fn set_offset(file: &Path, offset_s: i64) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset_s:+}\n")).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

fn real_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Submits a job that sleeps `sleep_s` seconds; returns its id and its `submitted_ms` (the controller's wall clock).
fn submit(c: &Cluster, name: &str, sleep_s: u32) -> (String, i64) {
    let path = c.dir.path().join(format!("{name}.jsonl"));
    let line = json!({ "name": name, "command": ["sh", "-c", format!("sleep {sleep_s}")] });
    std::fs::write(&path, format!("{line}\n")).unwrap();
    let v = c.json(&["jobs", "submit", path.to_str().unwrap(), "--json"]);
    let id = v[0].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string();
    let shown = c.json(&["jobs", "show", &id, "--json"]);
    (id, shown["submitted_ms"].as_i64().unwrap_or_else(|| panic!("no submitted_ms in {shown}")))
}

/// Watches the agents for `hold` (at least once): every one stays up and connected throughout.
fn agents_stay_up(c: &Cluster, agents: usize, hold: Duration, when: &str) {
    let until = Instant::now() + hold;
    loop {
        let list = c.json(&["agents", "list", "--json"]);
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), agents, "{when}: {list:?}");
        for a in list {
            assert!(
                a["state"] == "up" && a["connected"] == true,
                "{when}, agent {} is {} (connected: {}); logs in {}",
                a["name"],
                a["state"],
                a["connected"],
                c.dir.path().display()
            );
        }
        if Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts the controller's wall clock is the real one plus `offset_s`, as a job submitted now shows it.
fn assert_offset(submitted_ms: i64, asked_ms: i64, offset_s: i64) {
    let skew_ms = submitted_ms - asked_ms - offset_s * 1_000;
    assert!(
        (-2_000..=5_000).contains(&skew_ms),
        "the controller's clock is not stepped by {offset_s} s (a job submitted at real {asked_ms} ms got \
         submitted_ms {submitted_ms}): is libfaketime working?"
    );
}

#[test]
fn a_controller_clock_stepped_10_minutes_forward_and_back_loses_no_agent_and_requeues_nothing() {
    assert!(
        Path::new(LIBFAKETIME_MT).exists(),
        "{LIBFAKETIME_MT} is missing: this test steps the controller's clock with libfaketime; \
         install Debian's faketime package (scripts/setup does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("faketime.rc");
    set_offset(&offset, 0);
    let env = [
        ("LD_PRELOAD", LIBFAKETIME_MT),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let agents = 2;
    let c = Cluster::start_in(dir, agents, LOST_AFTER_MS, Vec::new(), env, |_| Vec::new());

    let mut ids: Vec<String> = (0..JOBS).map(|i| submit(&c, &format!("through-{i}"), JOB_S).0).collect();
    c.wait_until("the jobs to run", WAIT, |s| s.iter().filter(|s| *s == "running").count() == JOBS);

    let asked = real_now_ms();
    set_offset(&offset, STEP_S);
    // A job submitted now carries the stepped clock: the step took.
    let (probe, submitted) = submit(&c, "after-forward-step", 1);
    assert_offset(submitted, asked, STEP_S);
    ids.push(probe);
    agents_stay_up(&c, agents, HOLD, "after the clock stepped 10 minutes forward");

    let asked = real_now_ms();
    set_offset(&offset, 0);
    let (probe, submitted) = submit(&c, "after-backward-step", 1);
    assert_offset(submitted, asked, 0);
    ids.push(probe);
    agents_stay_up(&c, agents, HOLD, "after the clock stepped 10 minutes back");

    c.wait_until("every job to end", WAIT, |s| {
        s.iter().all(|s| matches!(s.as_str(), "succeeded" | "failed" | "cancelled"))
    });
    let jobs = c.json(&["jobs", "list", "--json"]);
    let jobs: Vec<&Value> = jobs.as_array().unwrap().iter().collect();
    assert_eq!(jobs.len(), ids.len(), "{jobs:?}");
    for j in jobs {
        assert_eq!(j["state"], "succeeded", "{j}; logs in {}", c.dir.path().display());
        assert_eq!(j["attempts"], 1, "a job was re-queued: {j}; logs in {}", c.dir.path().display());
    }
    agents_stay_up(&c, agents, Duration::ZERO, "at the end");
}
