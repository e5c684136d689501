//! Real-GPU path end to end, without a GPU: an agent reads its GPUs through
//! NVML (nvml-wrapper) loaded from the project's fake NVML library, whose
//! scenario file this test rewrites while the agent runs. Each step is
//! checked in `cosmos agents list --json`.

use super::{BIN, Cluster, Proc};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
/// Agent-side bound for a GPU to return to its baseline after a job (short, for the test).
const VRAM_RELEASE_BOUND_MS: u64 = 1_000;
/// How long any one step may take to show.
const STEP_TIMEOUT_S: u64 = 30;

/// The fake NVML library, built by scripts/test beside the test binaries' directory.
fn fake_nvml_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent().and_then(Path::parent).unwrap().join("libfake_nvml.so");
    assert!(
        lib.exists(),
        "{} is missing: `cargo build -p cosmos-fake-nvml --release` (scripts/test does)",
        lib.display()
    );
    lib
}

fn uuid(i: usize) -> String {
    format!("GPU-fa4e0000-0000-0000-0000-00000000000{i}")
}

/// Writes the scenario by rename, so the library never reads half a file.
fn write_scenario(path: &Path, gpus: &[(Vec<(u32, u64)>, u64)]) {
    let gpus: Vec<Value> = gpus
        .iter()
        .enumerate()
        .map(|(i, (procs, unlisted))| {
            json!({
                "uuid": uuid(i), "name": "NVIDIA Fake H100 80GB", "total_bytes": 80 * GIB,
                "reserved_bytes": 256u64 << 20, "unlisted_bytes": unlisted,
                "processes": procs.iter().map(|(pid, b)| json!({"pid": pid, "bytes": b})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "driver_version": "550.54.15", "gpus": gpus }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn gpu(agents: &Value, i: usize) -> &Value {
    let a = agents.as_array().unwrap().iter().find(|a| a["name"] == "gpu-host").expect("the agent is listed");
    a["gpus"].as_array().unwrap().iter().find(|g| g["uuid"] == uuid(i).as_str()).expect("the GPU is listed")
}

fn wait_for(c: &Cluster, what: &str, mut done: impl FnMut(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(STEP_TIMEOUT_S);
    loop {
        let v = c.json(&["agents", "list", "--json"]);
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {v:#}; logs in {}", c.dir.path().display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An agent named `gpu-host` on the fake NVML library reading `scenario`, sampling every
/// 100 ms, joining `c`; its output goes to `gpu-agent.log` in the cluster's directory.
fn spawn_nvml_agent(c: &Cluster, scenario: &Path, extra: &[&str]) -> Proc {
    let log = std::fs::File::create(c.dir.path().join("gpu-agent.log")).unwrap();
    Proc(
        Command::new(BIN)
            .args(["agent", "--controller", &c.agent_addr, "--token-file"])
            .arg(c.data().join("agent.token"))
            .arg("--work-dir")
            .arg(c.dir.path().join("gpu-agent"))
            .arg("--nvml-lib")
            .arg(fake_nvml_lib())
            .args(["--gpu-sample-interval-ms", "100", "--name", "gpu-host"])
            .args(extra)
            .env("FAKE_NVML_SCENARIO", scenario)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn an_agent_on_nvml_avoids_foreign_use_and_quarantines_a_gpu_a_job_left_dirty_until_it_is_clean() {
    let c = Cluster::start(0, 10_000);
    let scenario = c.dir.path().join("nvml.json");
    write_scenario(&scenario, &[(vec![], 0), (vec![], 0)]);
    let release_bound = VRAM_RELEASE_BOUND_MS.to_string();
    let _agent = spawn_nvml_agent(&c, &scenario, &["--vram-release-bound-ms", &release_bound]);

    // 1. It registers the GPUs NVML lists, as real ones.
    let v = wait_for(&c, "the agent to register", |v| {
        v.as_array().unwrap().iter().any(|a| a["name"] == "gpu-host" && a["connected"] == true)
    });
    let a = &v.as_array().unwrap()[0];
    assert_eq!(a["gpus_simulated"], false, "{a:#}");
    assert_eq!(a["gpus"].as_array().unwrap().len(), 2);
    assert_eq!(gpu(&v, 0)["name"], "NVIDIA Fake H100 80GB");
    assert_eq!(gpu(&v, 0)["total_vram_mib"], 80 * 1024);

    // 2. A foreign process fills GPU 0: its free memory drops, and a job needing 10 GiB goes to GPU 1.
    let mut foreign = Proc(Command::new("sleep").arg("120").stdout(Stdio::null()).spawn().unwrap());
    write_scenario(&scenario, &[(vec![(foreign.0.id(), 75 * GIB)], 0), (vec![], 0)]);
    wait_for(&c, "GPU 0's foreign use to show", |v| gpu(v, 0)["free_vram_mib"].as_u64().unwrap() < 5 * 1024);
    let record = c.dir.path().join("ran-on");
    let pid_file = c.dir.path().join("job-pid");
    let batch = c.dir.path().join("gpu-batch.jsonl");
    let go = c.dir.path().join("go");
    // It runs until the test has staged its memory, so the scenario never lists a pid that is gone.
    let script = format!(
        "echo $CUDA_VISIBLE_DEVICES > {}; echo $$ > {}; while [ ! -e {} ]; do sleep 0.05; done",
        record.display(),
        pid_file.display(),
        go.display()
    );
    std::fs::write(
        &batch,
        json!({ "name": "g", "command": ["sh", "-c", script], "min_vram_mib": 10 * 1024 }).to_string(),
    )
    .unwrap();
    let out = c.cli(&["jobs", "submit", batch.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // 3. While it runs its process holds 8 GiB on GPU 1; when it ends that memory stays held
    //    with no process listed: GPU 1 is quarantined, with the reason.
    let deadline = Instant::now() + Duration::from_secs(STEP_TIMEOUT_S);
    let job_pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()) {
            break pid;
        }
        assert!(Instant::now() < deadline, "the job did not start; logs in {}", c.dir.path().display());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(std::fs::read_to_string(&record).unwrap().trim(), "1", "placement avoided the filled GPU 0");
    write_scenario(&scenario, &[(vec![(foreign.0.id(), 75 * GIB)], 0), (vec![(job_pid, 8 * GIB)], 0)]);
    wait_for(&c, "the job's memory to show", |v| gpu(v, 1)["free_vram_mib"].as_u64().unwrap() < 73 * 1024);
    // As NVML shows a process that died in another namespace, or a zombie: the memory, no pid.
    write_scenario(&scenario, &[(vec![(foreign.0.id(), 75 * GIB)], 0), (vec![], 8 * GIB)]);
    std::fs::write(&go, "").unwrap();
    let exited = Instant::now();
    c.wait_until("the job to succeed", Duration::from_secs(STEP_TIMEOUT_S), |s| s == ["succeeded"]);
    let v = wait_for(&c, "GPU 1 to be quarantined", |v| {
        gpu(v, 1)["healthy"] == false && gpu(v, 1)["quarantine"].is_object()
    });
    // A figure, not a bound: the release bound plus a sample and a heartbeat, seen through the CLI's polling.
    eprintln!(
        "figure: job exit to its GPU quarantined in agents list: {:?} (bound {VRAM_RELEASE_BOUND_MS} ms)",
        exited.elapsed()
    );
    let q = &gpu(&v, 1)["quarantine"];
    assert_eq!(q["held_bytes"], 8 * GIB, "{q:#}");
    assert!(q["reason"].as_str().unwrap().contains("no process of it listed"), "{q:#}");
    assert_eq!(gpu(&v, 0)["healthy"], true, "foreign use is not a leak");
    let text = c.cli(&["agents", "list"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("QUARANTINED"), "{}", String::from_utf8_lossy(&text.stdout));

    // 4. The memory is freed: GPU 1 returns by itself.
    write_scenario(&scenario, &[(vec![(foreign.0.id(), 75 * GIB)], 0), (vec![], 0)]);
    let freed = Instant::now();
    let v = wait_for(&c, "GPU 1 to return", |v| gpu(v, 1)["healthy"] == true && gpu(v, 1).get("quarantine").is_none());
    assert!(gpu(&v, 1).get("quarantine").is_none(), "{v:#}");
    eprintln!("figure: memory freed to its GPU back in agents list: {:?}", freed.elapsed());

    // 5. A lost GPU is quarantined for good; an operator who fixed it returns it by hand.
    let _ = foreign.0.kill();
    write_scenario(&scenario, &[(vec![], 0), (vec![], 0)]);
    let mut lost = std::fs::read_to_string(&scenario).unwrap().parse::<Value>().unwrap();
    lost["gpus"][0]["lost"] = json!(true);
    std::fs::write(scenario.with_extension("tmp"), lost.to_string()).unwrap();
    std::fs::rename(scenario.with_extension("tmp"), &scenario).unwrap();
    let v = wait_for(&c, "GPU 0 to be quarantined as lost", |v| gpu(v, 0)["quarantine"].is_object());
    assert!(gpu(&v, 0)["quarantine"]["reason"].as_str().unwrap().contains("lost"), "{v:#}");
    write_scenario(&scenario, &[(vec![], 0), (vec![], 0)]);
    let out = c.cli(&["agents", "undrain", "gpu-host", "--gpu", &uuid(0)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(&c, "GPU 0 to be released", |v| gpu(v, 0)["healthy"] == true);
}

#[test]
fn an_agent_whose_nvml_calls_stop_returning_stops_saying_so() {
    let c = Cluster::start(0, 10_000);
    let scenario = c.dir.path().join("nvml.json");
    write_scenario(&scenario, &[(vec![], 0)]);
    let log_path = c.dir.path().join("gpu-agent.log");
    let mut agent = spawn_nvml_agent(&c, &scenario, &[]);
    wait_for(&c, "the agent to register", |v| {
        v.as_array().unwrap().iter().any(|a| a["name"] == "gpu-host" && a["connected"] == true)
    });

    // The driver wedges: every call about a GPU blocks for ten minutes.
    let text = std::fs::read_to_string(&scenario).unwrap();
    let mut wedged: Value = serde_json::from_str(&text).unwrap();
    wedged["hang_ms"] = json!(600_000);
    let tmp = scenario.with_extension("tmp");
    std::fs::write(&tmp, wedged.to_string()).unwrap();
    std::fs::rename(&tmp, &scenario).unwrap();

    // Its VRAM is no longer measured, so the agent stops (systemd restarts it) rather than go on blind.
    let deadline = Instant::now() + Duration::from_secs(STEP_TIMEOUT_S);
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent kept running on a wedged NVML; log in {}", log_path.display());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains("the GPU monitor stopped (no GPU sample for") && text.contains("NVML calls are not returning"),
        "{text}"
    );
}
