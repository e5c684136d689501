//! A cluster on Docker: the controller and three agents each in their own
//! container on a private network; agents start the jobs as sibling containers
//! through the mounted Docker socket. Mid-batch one agent's container is killed
//! and another is cut off the network, then both come back. Every run must
//! succeed exactly once, and no job container may be left on the engine.
//!
//! Needs Docker and the images `cosmos:dev` and `cosmos-testjob:dev`
//! (`scripts/build-cosmos-image`, `scripts/build-images`; `scripts/setup` runs
//! both). Missing any of them fails the test: it does not skip.

use serde_json::Value;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cosmos");
const JOBS: usize = 100;
const AGENTS: usize = 3;

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("the docker CLI runs")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes everything the test created, however it ends.
struct Env {
    tag: String,
    dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        let names = docker(&["ps", "-aq", "--filter", &format!("name={}", self.tag)]);
        for id in String::from_utf8_lossy(&names.stdout).split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
        for agent in 0..AGENTS {
            let jobs = docker(&["ps", "-aq", "--filter", &format!("label=cosmos.agent={}-agent-{agent}", self.tag)]);
            for id in String::from_utf8_lossy(&jobs.stdout).split_whitespace() {
                let _ = docker(&["rm", "-f", id]);
            }
        }
        let _ = docker(&["network", "rm", &self.tag]);
    }
}

impl Env {
    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.tag)
    }

    fn path(&self, what: &str) -> String {
        self.dir.path().join(what).to_string_lossy().into_owned()
    }

    fn start_agent(&self, i: usize) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let work = self.path(&format!("agent-{i}"));
        docker_ok(&[
            "run",
            "-d",
            "--name",
            &self.name(&format!("agent-{i}")),
            "--network",
            &self.tag,
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            "-v",
            &format!("{dir}:{dir}"),
            "cosmos:dev",
            "agent",
            "--controller",
            &format!("{}:7701", self.name("ctl")),
            "--token-file",
            &self.path("ctl/agent.token"),
            "--work-dir",
            &work,
            "--simulated-gpus",
            "4x80GiB",
            "--name",
            &self.name(&format!("agent-{i}")),
            "--runtime",
            "docker",
        ]);
    }
}

fn cli(api: &str, env: &Env, args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("COSMOS_CONTROLLER", api).env("COSMOS_DATA_DIR", env.path("ctl")).output().unwrap()
}

fn jobs(api: &str, env: &Env) -> Option<Vec<Value>> {
    let out = cli(api, env, &["jobs", "list", "--json"]);
    out.status.success().then(|| serde_json::from_slice::<Value>(&out.stdout).ok()?.as_array().cloned()).flatten()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_batch_on_a_docker_cluster_survives_a_killed_and_a_partitioned_agent() {
    for image in ["cosmos:dev", "cosmos-testjob:dev"] {
        let out = docker(&["image", "inspect", image]);
        assert!(
            out.status.success(),
            "image {image} is missing (or Docker is not running): run scripts/build-cosmos-image and scripts/build-images"
        );
    }
    let env = Env { tag: format!("cosmos-mh-{}", std::process::id()), dir: tempfile::tempdir().unwrap() };
    docker_ok(&["network", "create", &env.tag]);
    let dir = env.dir.path().to_string_lossy().into_owned();
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &env.name("ctl"),
        "--network",
        &env.tag,
        "-v",
        &format!("{dir}:{dir}"),
        "-p",
        "127.0.0.1::7700",
        "cosmos:dev",
        "controller",
        "--data-dir",
        &env.path("ctl"),
        "--api-listen",
        "0.0.0.0:7700",
        "--agent-listen",
        "0.0.0.0:7701",
        "--lost-after-ms",
        "5000",
    ]);
    let api = format!("http://{}", docker_ok(&["port", &env.name("ctl"), "7700/tcp"]).lines().next().unwrap());
    wait_for("the controller's token", Duration::from_secs(30), || env.dir.path().join("ctl/api.token").exists());
    for i in 0..AGENTS {
        env.start_agent(i);
    }
    wait_for("three agents", Duration::from_secs(60), || {
        let out = cli(&api, &env, &["agents", "list", "--json"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v.as_array().unwrap().iter().filter(|a| a["connected"] == true).count() == AGENTS)
    });

    let batch = env.dir.path().join("batch.jsonl");
    let lines: Vec<String> = (0..JOBS)
        .map(|i| {
            serde_json::json!({
                "name": format!("run-{i}"), "image": "cosmos-testjob:dev",
                "command": ["/testjob", "--steps", "4", "--step-ms", "250", "--write", "out.txt=done"],
                "max_attempts": 5,
            })
            .to_string()
        })
        .collect();
    std::fs::write(&batch, lines.join("\n")).unwrap();
    let out = cli(&api, &env, &["jobs", "submit", batch.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    wait_for("the batch to get going", Duration::from_secs(120), || {
        jobs(&api, &env).is_some_and(|j| j.iter().filter(|j| j["state"] == "succeeded").count() >= 15)
    });
    // One agent dies; another is cut off the network, long enough to be declared lost.
    docker_ok(&["kill", &env.name("agent-0")]);
    docker_ok(&["network", "disconnect", &env.tag, &env.name("agent-1")]);
    std::thread::sleep(Duration::from_secs(8));
    docker_ok(&["network", "connect", &env.tag, &env.name("agent-1")]);
    docker_ok(&["start", &env.name("agent-0")]);

    wait_for("every run to end", Duration::from_secs(300), || {
        jobs(&api, &env).is_some_and(|j| {
            j.len() == JOBS
                && j.iter().all(|j| ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap()))
        })
    });
    let all = jobs(&api, &env).unwrap();
    let bad: Vec<&Value> = all.iter().filter(|j| j["state"] != "succeeded").collect();
    assert!(bad.is_empty(), "runs that did not succeed: {bad:?}");
    // The faults really hit running work: some runs needed another attempt.
    let attempts: u64 = all.iter().map(|j| j["attempts"].as_u64().unwrap()).sum();
    assert!(attempts > JOBS as u64, "no run was retried: the faults missed the batch ({attempts} attempts)");

    // Stray containers (the killed agent's, the fenced ones) are reaped by their agents.
    let strays = || {
        (0..AGENTS)
            .flat_map(|i| {
                let out = docker(&[
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=cosmos.agent={}", env.name(&format!("agent-{i}"))),
                ]);
                String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    wait_for("no job container left on the engine", Duration::from_secs(120), || strays().is_empty());
}
