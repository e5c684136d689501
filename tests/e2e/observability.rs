//! The operations bundle in `deploy/observability`, checked offline (its
//! images cannot be pulled here): the compose file, Prometheus's config,
//! rules and their unit tests, and that every metric the dashboard and the
//! rules query exists in the `/metrics` of a running controller and agent.

use super::metrics::{agent_metrics_url, metrics_cluster, scrape};
use super::*;
use std::collections::BTreeSet;

fn bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/observability")
}

fn run_ok(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| {
        panic!(
            "{program} does not run ({e}); scripts/setup installs it (Debian's prometheus and docker-compose packages)"
        )
    });
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_compose_file_validates() {
    let dir = bundle();
    // Compose v2 (the docker CLI plugin) where it is installed, else Debian's docker-compose.
    let v2 = Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success());
    if v2 {
        run_ok("docker", &["compose", "-f", "compose.yaml", "config", "-q"], &dir);
    } else {
        run_ok("docker-compose", &["-f", "compose.yaml", "config", "-q"], &dir);
    }
}

#[test]
fn the_prometheus_config_and_rules_validate_and_the_alerts_fire_on_sample_series() {
    let dir = bundle().join("prometheus");
    run_ok("promtool", &["check", "config", "prometheus.yml"], &dir);
    run_ok("promtool", &["check", "rules", "rules.yml"], &dir);
    run_ok("promtool", &["test", "rules", "rules_test.yml"], &dir);
}

/// Every `cosmos_…` metric name in `text` (recording rules' `cosmos:…` names left out).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("cosmos_") {
        let start = i + at;
        let before_ok = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b':');
        let end =
            text[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(text.len(), |e| start + e);
        if before_ok {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Sample names in a Prometheus text exposition.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn every_metric_the_dashboard_and_the_rules_query_exists() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(bundle().join("grafana/dashboards/cosmos.json")).unwrap())
            .unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "the dashboard's queries were found: {exprs:?}");
    let rules = std::fs::read_to_string(bundle().join("prometheus/rules.yml")).unwrap();
    let wanted: BTreeSet<String> =
        exprs.iter().flat_map(|e| names_in(e)).chain(names_in(&rules)).filter(|n| n != "cosmos_").collect();

    let c = metrics_cluster();
    // One job, so that every series has been touched once.
    let batch = c.dir.path().join("one.jsonl");
    std::fs::write(&batch, "{\"name\": \"one\", \"command\": [\"true\"]}\n").unwrap();
    c.json(&["jobs", "submit", batch.to_str().unwrap(), "--json", "--wait"]);
    // Per-GPU usage is known from the agent's first heartbeat on (one a second).
    let deadline = Instant::now() + Duration::from_secs(30);
    let controller = loop {
        let names = exposed(&scrape(&format!("{}/metrics", c.api)));
        if names.contains("cosmos_gpu_vram_used_bytes") || Instant::now() > deadline {
            break names;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let agent = exposed(&scrape(&agent_metrics_url(&c, 0)));
    let missing: Vec<&String> = wanted.iter().filter(|n| !controller.contains(*n) && !agent.contains(*n)).collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}\ncontroller: {controller:?}\nagent: {agent:?}");
}
