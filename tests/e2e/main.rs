//! End to end through the real `cosmos` binary: a controller and agents on
//! loopback, real processes, `kill -9`, restarts. Outcomes are checked from
//! what the jobs themselves recorded and from the CLI's JSON.

use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod artifacts;
mod cli;
mod clock;
mod cosmos;
mod failover;
mod failstop;
mod gpu;
mod install;
mod metrics;
mod observability;
mod ops;
mod restart;
mod security;
mod ssh;
mod telemetry;
mod traces;

const BIN: &str = env!("CARGO_BIN_EXE_cosmos");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    api: String,
    agent_addr: String,
    controller: Option<Proc>,
    agents: Vec<Option<Proc>>,
    lost_after_ms: u64,
    /// Extra flags for the controller and for every agent.
    extra: (Vec<String>, Vec<String>),
    /// Extra environment of the controller's process.
    controller_env: Vec<(String, String)>,
    /// Extra environment of every agent's process.
    agent_env: Vec<(String, String)>,
}

impl Cluster {
    fn start(agents: usize, lost_after_ms: u64) -> Cluster {
        Cluster::start_with(agents, lost_after_ms, Vec::new(), |_| Vec::new())
    }

    /// A cluster whose controller and agents get extra flags (the agents' from the test directory).
    fn start_with(
        agents: usize,
        lost_after_ms: u64,
        controller_args: Vec<String>,
        agent_args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Cluster {
        Cluster::start_in(tempfile::tempdir().unwrap(), agents, lost_after_ms, controller_args, Vec::new(), agent_args)
    }

    /// A cluster in `dir` whose controller also gets extra environment variables.
    fn start_in(
        dir: tempfile::TempDir,
        agents: usize,
        lost_after_ms: u64,
        controller_args: Vec<String>,
        controller_env: Vec<(String, String)>,
        agent_args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Cluster {
        Cluster::start_env(dir, agents, lost_after_ms, controller_args, controller_env, Vec::new(), agent_args)
    }

    /// A cluster in `dir` whose controller and agents get extra environment variables.
    fn start_env(
        dir: tempfile::TempDir,
        agents: usize,
        lost_after_ms: u64,
        controller_args: Vec<String>,
        controller_env: Vec<(String, String)>,
        agent_env: Vec<(String, String)>,
        agent_args: impl FnOnce(&Path) -> Vec<String>,
    ) -> Cluster {
        let extra = (controller_args, agent_args(dir.path()));
        let mut c = Cluster {
            dir,
            api: String::new(),
            agent_addr: String::new(),
            controller: None,
            agents: Vec::new(),
            lost_after_ms,
            extra,
            controller_env,
            agent_env,
        };
        c.start_controller("127.0.0.1:0", "127.0.0.1:0");
        for i in 0..agents {
            let a = c.spawn_agent(i);
            c.agents.push(Some(a));
        }
        c.wait_agents(agents);
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("ctl")
    }

    fn start_controller(&mut self, api: &str, agents: &str) {
        let mut child = Command::new(BIN)
            .args(["controller", "--data-dir"])
            .arg(self.data())
            .args(["--api-listen", api, "--agent-listen", agents, "--lost-after-ms", &self.lost_after_ms.to_string()])
            .args(&self.extra.0)
            .envs(self.controller_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("ctl.log")).unwrap(),
            )
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line =
            lines.find_map(|l| l.ok().filter(|l| l.contains("API on"))).expect("controller prints its addresses");
        let rest = line.split("API on ").nth(1).unwrap();
        let (api, agents) = rest.split_once(", agents on ").unwrap();
        self.api = api.to_string();
        self.agent_addr = agents.to_string();
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.controller = Some(Proc(child));
    }

    /// A directory holding `torchrun` (the stand-in: this binary under that name), for agents' PATH.
    fn standin_bin(&self) -> PathBuf {
        let bin = self.dir.path().join("bin");
        if !bin.join("torchrun").exists() {
            std::fs::create_dir_all(&bin).unwrap();
            std::os::unix::fs::symlink(BIN, bin.join("torchrun")).unwrap();
        }
        bin
    }

    fn spawn_agent(&self, i: usize) -> Proc {
        let path = format!("{}:{}", self.standin_bin().display(), std::env::var("PATH").unwrap_or_default());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("agent-{i}.log")))
            .unwrap();
        Proc(
            Command::new(BIN)
                .args(["agent", "--controller", &self.agent_addr, "--token-file"])
                .arg(self.data().join("agent.token"))
                .arg("--work-dir")
                .arg(self.dir.path().join(format!("agent-{i}")))
                .args(["--simulated-gpus", "8x80GiB", "--name", &format!("agent-{i}")])
                .args(&self.extra.1)
                .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
                .env("PATH", &path)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("COSMOS_CONTROLLER", &self.api)
            .env("COSMOS_DATA_DIR", self.data())
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(out.status.success(), "cosmos {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("cosmos {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    fn wait_agents(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cli(&["agents", "list", "--json"]);
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                if v.as_array().unwrap().iter().filter(|a| a["connected"] == true).count() >= n {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "agents did not connect; logs in {}", self.dir.path().display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill9(p: &mut Option<Proc>) {
        if let Some(mut p) = p.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(p.0.id() as i32, libc::SIGKILL) };
            let _ = p.0.wait();
        }
    }

    fn states(&self) -> Vec<String> {
        self.json(&["jobs", "list", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["state"].as_str().unwrap().to_string())
            .collect()
    }

    fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut(&[String]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.cli(&["jobs", "list", "--json"]);
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                let states: Vec<String> =
                    v.as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap().to_string()).collect();
                if done(&states) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; logs in {}", self.dir.path().display());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A controller of its own on `data` (run under `wrapper`, such as `prlimit …`,
/// when one is given), its stderr in `log`: the process, the API's URL and the agents' address.
fn spawn_controller(wrapper: &[&str], data: &Path, log: &Path) -> (Proc, String, String) {
    let (program, first) = match wrapper.split_first() {
        Some((p, rest)) => (*p, [rest, &[BIN]].concat()),
        None => (BIN, Vec::new()),
    };
    let mut cmd = Command::new(program);
    cmd.args(first).args(["controller", "--data-dir"]).arg(data).args([
        "--api-listen",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
    ]);
    start_controller(cmd, log)
}

/// Starts a `cosmos controller` command, its stderr in `log`, and reads the
/// addresses it prints: the process, the API's URL and the agents' address.
fn start_controller(mut cmd: Command, log: &Path) -> (Proc, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(std::fs::File::create(log).unwrap()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line =
        lines.find_map(|l| l.ok().filter(|l| l.contains("API on"))).expect("the controller prints its addresses");
    std::thread::spawn(move || for _ in lines {});
    let rest = line.split("API on ").nth(1).unwrap();
    let (api, agents) = rest.split_once(", agents on ").unwrap();
    (Proc(child), api.to_string(), agents.to_string())
}

/// A token file as an operator installs one: mode 0600.
fn write_token(path: &Path, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn write_batch(dir: &Path, n: usize, record: &Path, marker: &str) -> PathBuf {
    let path = dir.join("batch.jsonl");
    let mut text = String::new();
    for i in 0..n {
        // Each attempt records its own start and end; the marker finds leftovers.
        let script = format!(
            "echo \"$COSMOS_JOB_ID $COSMOS_ATTEMPT_ID start $(date +%s%N)\" >> {rec}; sleep 0.3; echo \"$COSMOS_JOB_ID $COSMOS_ATTEMPT_ID end $(date +%s%N)\" >> {rec} # {marker}",
            rec = record.display()
        );
        text.push_str(
            &serde_json::json!({ "name": format!("j{i}"), "command": ["sh", "-c", script], "max_attempts": 5 })
                .to_string(),
        );
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Parses the records: per job, the (start, end) of every attempt that ran to its end.
fn runs(record: &Path) -> std::collections::BTreeMap<String, Vec<(u128, u128)>> {
    let mut starts = std::collections::HashMap::new();
    let mut by_job: std::collections::BTreeMap<String, Vec<(u128, u128)>> = Default::default();
    for line in std::fs::read_to_string(record).unwrap_or_default().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 4 {
            continue;
        }
        let t: u128 = f[3].parse().unwrap();
        match f[2] {
            "start" => {
                starts.insert((f[0].to_string(), f[1].to_string()), t);
            }
            _ => {
                let s = starts.get(&(f[0].to_string(), f[1].to_string())).copied().unwrap_or(t);
                by_job.entry(f[0].to_string()).or_default().push((s, t));
            }
        }
    }
    by_job
}

fn leftovers(marker: &str) -> usize {
    let out = Command::new("pgrep").args(["-f", marker]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn a_batch_survives_kill_9_of_an_agent_and_of_the_controller() {
    let mut c = Cluster::start(2, 3_000);
    let record = c.dir.path().join("record.txt");
    let marker = format!("cosmos-e2e-{}", std::process::id());
    let batch = write_batch(c.dir.path(), 200, &record, &marker);
    let out = c.cli(&["jobs", "submit", batch.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Mid-batch: the first agent dies without a word.
    c.wait_until("some jobs done", Duration::from_secs(60), |s| s.iter().filter(|s| *s == "succeeded").count() >= 30);
    Cluster::kill9(&mut c.agents[0]);

    // Later: the controller dies too, and comes back on the same data directory and ports.
    c.wait_until("more jobs done", Duration::from_secs(120), |s| s.iter().filter(|s| *s == "succeeded").count() >= 80);
    Cluster::kill9(&mut c.controller);
    let (api, agents) = (c.api.trim_start_matches("http://").to_string(), c.agent_addr.clone());
    c.start_controller(&api, &agents);

    c.wait_until("every job final", Duration::from_secs(300), |s| {
        s.len() == 200 && s.iter().all(|s| s == "succeeded" || s == "failed" || s == "cancelled")
    });
    let states = c.states();
    assert!(states.iter().all(|s| s == "succeeded"), "not all succeeded: {states:?}");

    // Every job ran to its end at least once, and no two of its attempts overlapped in time.
    let runs = runs(&record);
    assert_eq!(runs.len(), 200, "jobs that recorded a complete run");
    for (job, mut spans) in runs {
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{job}: attempts overlapped: {spans:?}");
        }
    }
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(leftovers(&marker), 0, "job processes were left behind");
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let c = Cluster::start(1, 10_000);
    let dir = c.dir.path();
    let cases: Vec<(&str, &str, &str)> = vec![
        ("malformed.jsonl", "{\"command\": [\"true\"]}\n{not json\n", ":2: not valid JSON"),
        ("unknown.jsonl", "{\"command\": [\"true\"], \"gpu\": 1}\n", "unknown field `gpu`"),
        ("nocommand.jsonl", "{\"name\": \"x\"}\n", "missing field `command`"),
        (
            "toolarge.jsonl",
            "{\"command\": [\"true\"]}\n{\"command\": [\"true\"], \"gpus\": 9}\n",
            "needs 9 GPUs on one host, but the largest host has 8",
        ),
    ];
    for (file, text, expected) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        let out = c.cli(&["jobs", "submit", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(err.contains(expected), "{file}: expected `{expected}` in: {err}");
        assert!(err.contains("nothing was submitted"), "{file}: {err}");
    }
    assert_eq!(c.json(&["jobs", "list", "--json"]).as_array().unwrap().len(), 0, "a rejected batch left jobs behind");

    let wrong = Command::new(BIN).args(["status", "--controller", &c.api, "--token", "wrong"]).output().unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("token refused"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    let unreachable =
        Command::new(BIN).args(["status", "--controller", "http://127.0.0.1:9", "--token", "x"]).output().unwrap();
    assert!(!unreachable.status.success());
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the controller"),
        "{}",
        String::from_utf8_lossy(&unreachable.stderr)
    );
}

#[test]
fn an_agent_with_a_wrong_token_is_refused_and_says_why() {
    let c = Cluster::start(0, 10_000);
    let bad = c.dir.path().join("bad.token");
    write_token(&bad, &"f".repeat(64));
    let out = Command::new(BIN)
        .args(["agent", "--controller", &c.agent_addr, "--token-file", bad.to_str().unwrap(), "--work-dir"])
        .arg(c.dir.path().join("w"))
        .args(["--simulated-gpus", "1x16GiB"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_agent_without_gpus_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("t");
    write_token(&token, &"0".repeat(64));
    let out = Command::new(BIN)
        .args(["agent", "--controller", "127.0.0.1:9", "--token-file", token.to_str().unwrap(), "--work-dir"])
        .arg(dir.path())
        // Named, so that the test means the same on a host that has a driver.
        .args(["--nvml-lib", "/nonexistent/libnvidia-ml.so.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for says in ["/nonexistent/libnvidia-ml.so.1", "NVIDIA driver", "--nvml-lib", "--simulated-gpus"] {
        assert!(err.contains(says), "{says}: {err}");
    }
}

#[test]
fn the_client_finds_controller_and_token_in_its_config_file() {
    let c = Cluster::start(1, 10_000);
    let config = c.dir.path().join("xdg");
    std::fs::create_dir_all(config.join("cosmos")).unwrap();
    let token = std::fs::read_to_string(c.data().join("api.token")).unwrap();
    let text = serde_json::json!({ "controller": c.api, "token": token.trim() }).to_string();
    std::fs::write(config.join("cosmos/client.json"), text).unwrap();
    let out = Command::new(BIN)
        .args(["agents", "list", "--json"])
        .env("XDG_CONFIG_HOME", &config)
        .env_remove("COSMOS_CONTROLLER")
        .env_remove("COSMOS_TOKEN")
        .env_remove("COSMOS_DATA_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let agents: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(agents[0]["name"], "agent-0");
    assert_eq!(agents[0]["gpus_simulated"], true);
}

#[test]
fn waiting_for_a_job_that_does_not_exist_fails_at_once_naming_it() {
    let c = Cluster::start(0, 10_000);
    let out = c.cli(&["jobs", "wait", "job-99"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "waiting for a missing job succeeded: {err}");
    assert!(err.contains("no job job-99"), "{err}");
}

#[test]
fn a_controller_address_without_a_scheme_is_taken_as_http() {
    let c = Cluster::start(0, 10_000);
    let out = Command::new(BIN)
        .args(["status", "--json"])
        .env("COSMOS_CONTROLLER", c.api.trim_start_matches("http://"))
        .env("COSMOS_DATA_DIR", c.data())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_failed_batch_names_the_job_whose_logs_to_read() {
    let c = Cluster::start(1, 10_000);
    let path = c.dir.path().join("fails.jsonl");
    std::fs::write(&path, "{\"name\": \"f\", \"command\": [\"false\"], \"max_attempts\": 1}\n").unwrap();
    let out = c.cli(&["jobs", "submit", path.to_str().unwrap(), "--wait"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("logs: cosmos jobs logs job-1"), "{text}");
    assert!(!text.contains("<job id>"), "{text}");
}
