//! `/metrics` of the controller and of an agent: what Prometheus's own
//! checker says of them, and how they move as a batch runs.

use super::*;

/// Bound on every wait of these tests.
const WAIT: Duration = Duration::from_secs(60);

/// The body of `GET url`.
pub(crate) fn scrape(url: &str) -> String {
    let mut answer = ureq::get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    answer.body_mut().read_to_string().unwrap()
}

/// `promtool check metrics` (Prometheus's linter: names, units, `_total`, help) accepts `text`.
pub(crate) fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs: it comes with Debian's prometheus package, which scripts/setup installs");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused it:\n{}{}\n--- the metrics:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `name` (with its labels as written, e.g. `x{a="b"}`).
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')).and_then(|r| r.trim().parse().ok()))
}

fn value(text: &str, name: &str) -> f64 {
    sample(text, name).unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// The address the agent's log says it serves `/metrics` on.
pub(crate) fn agent_metrics_url(c: &Cluster, i: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(c.dir.path().join(format!("agent-{i}.log"))).unwrap_or_default();
        if let Some(addr) = log
            .lines()
            .find(|l| l.contains("serving /metrics"))
            .and_then(|l| l.split("addr=").nth(1))
            .map(|a| a.split_whitespace().next().unwrap_or("").to_string())
        {
            return format!("http://{addr}/metrics");
        }
        assert!(Instant::now() < deadline, "the agent never said where it serves /metrics:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn metrics_cluster() -> Cluster {
    Cluster::start_with(1, 10_000, Vec::new(), |_| vec!["--metrics-listen".into(), "127.0.0.1:0".into()])
}

#[test]
fn metrics_pass_promtool_and_move_as_a_batch_runs() {
    let c = metrics_cluster();
    let url = format!("{}/metrics", c.api);
    let before = scrape(&url);
    promtool_accepts(&before);
    assert_eq!(value(&before, "cosmos_queue_depth"), 0.0);
    assert_eq!(value(&before, "cosmos_agents{state=\"up\"}"), 1.0, "{before}");
    let gpu = "{host=\"agent-0\",gpu=\"0\",uuid=\"GPU-sim-agent-0-0\"}";
    assert_eq!(value(&before, &format!("cosmos_gpu_vram_total_bytes{gpu}")), (80u64 << 30) as f64, "{before}");

    // Drained, the agent takes nothing: the batch waits in the queue.
    assert!(c.cli(&["agents", "drain", "agent-0"]).status.success());
    let lines: String = (0..20)
        .map(|i| {
            serde_json::json!({ "name": format!("m{i}"), "command": ["sh", "-c", "sleep 0.1"] }).to_string() + "\n"
        })
        .collect();
    let batch = c.dir.path().join("twenty.jsonl");
    std::fs::write(&batch, lines).unwrap();
    c.json(&["jobs", "submit", batch.to_str().unwrap(), "--json"]);
    let queued = scrape(&url);
    assert_eq!(value(&queued, "cosmos_queue_depth"), 20.0, "{queued}");
    assert_eq!(value(&queued, "cosmos_jobs{state=\"queued\"}"), 20.0, "{queued}");
    assert_eq!(value(&queued, "cosmos_jobs_submitted_total"), 20.0);
    assert_eq!(value(&queued, "cosmos_agents{state=\"draining\"}"), 1.0);

    assert!(c.cli(&["agents", "undrain", "agent-0"]).status.success());
    c.wait_until("the batch to succeed", WAIT, |s| s.len() == 20 && s.iter().all(|s| s == "succeeded"));
    let after = scrape(&url);
    promtool_accepts(&after);
    assert_eq!(value(&after, "cosmos_queue_depth"), 0.0, "{after}");
    assert_eq!(value(&after, "cosmos_jobs{state=\"succeeded\"}"), 20.0, "{after}");
    assert_eq!(value(&after, "cosmos_jobs_finished_total{state=\"succeeded\"}"), 20.0);
    assert_eq!(value(&after, "cosmos_attempts_total{outcome=\"succeeded\"}"), 20.0);
    assert_eq!(value(&after, "cosmos_job_submit_to_start_seconds_count"), 20.0, "{after}");
    assert!(value(&after, "cosmos_scheduling_pass_duration_seconds_count") > 0.0);
    assert!(value(&after, "cosmos_store_commit_duration_seconds_count") > 0.0);
    assert!(value(&after, "cosmos_store_commit_records_sum") >= 40.0, "every job's records were committed: {after}");
    assert_eq!(
        value(&after, "cosmos_spans_dropped_total{reason=\"queue_full\"}"),
        0.0,
        "traces are off: nothing dropped"
    );

    let agent = scrape(&agent_metrics_url(&c, 0));
    promtool_accepts(&agent);
    assert_eq!(value(&agent, "cosmos_agent_attempt_exits_total{how=\"exited_0\"}"), 20.0, "{agent}");
    assert_eq!(value(&agent, "cosmos_agent_attempts_live"), 0.0, "{agent}");
}

#[test]
fn metrics_need_the_api_token_when_the_api_is_not_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let mut child = Command::new(BIN)
        .args(["controller", "--data-dir"])
        .arg(&data)
        .args(["--api-listen", "0.0.0.0:0", "--agent-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _ctl = Proc(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let line =
        lines.find_map(|l| l.ok().filter(|l| l.contains("API on"))).expect("the controller prints its addresses");
    // Keep reading its stdout: a closed pipe would stop it at its next line.
    std::thread::spawn(move || for _ in lines {});
    let port = line.split("API on http://0.0.0.0:").nth(1).unwrap().split(',').next().unwrap().to_string();
    let url = format!("http://127.0.0.1:{port}/metrics");
    match ureq::get(&url).call() {
        Err(ureq::Error::StatusCode(401)) => {}
        other => panic!("/metrics answered without the token: {other:?}"),
    }
    let token = std::fs::read_to_string(data.join("api.token")).unwrap();
    let mut ok = ureq::get(&url).header("Authorization", format!("Bearer {}", token.trim())).call().unwrap();
    assert!(ok.body_mut().read_to_string().unwrap().contains("cosmos_queue_depth"));
}

#[test]
fn an_agent_refuses_to_serve_metrics_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("agent.token");
    write_token(&token, &"t".repeat(40));
    let out = Command::new(BIN)
        .args(["agent", "--controller", "127.0.0.1:9", "--token-file"])
        .arg(&token)
        .arg("--work-dir")
        .arg(dir.path().join("w"))
        .args(["--simulated-gpus", "1x1GiB", "--metrics-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--metrics-listen 0.0.0.0:0") && err.contains("loopback only"), "{err}");
}
