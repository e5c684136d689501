//! What the daemons give operators' tooling: structured log lines.

use super::*;

/// Every line of a log file, each parsed as one JSON object.
fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: not a JSON line ({e}): {l}", path.display())))
        .collect()
}

#[test]
fn log_format_json_gives_one_object_per_line_with_the_events_fields_at_the_top() {
    let json = vec!["--log-format".to_string(), "json".to_string()];
    let c = Cluster::start_with(1, 10_000, json.clone(), |_| json);
    let dir = c.dir.path();
    let batch = dir.join("one.jsonl");
    std::fs::write(&batch, "{\"name\": \"j\", \"command\": [\"true\"]}\n").unwrap();
    let v = c.json(&["jobs", "submit", batch.to_str().unwrap(), "--json", "--wait"]);
    assert_eq!(v[0]["state"], "succeeded", "{v}");

    let ctl = json_lines(&dir.join("ctl.log"));
    for line in &ctl {
        for key in ["timestamp", "level", "target"] {
            assert!(line[key].is_string(), "no `{key}` in a controller line: {line}");
        }
    }
    let start = ctl.iter().find(|l| l["message"] == "controller starting").expect("the start line");
    assert_eq!(start["level"], "INFO", "{start}");
    assert_eq!(start["target"], "cosmos_controller::daemon", "{start}");
    assert!(start["epoch"].is_u64(), "the event's fields are top-level keys: {start}");

    let agent = json_lines(&dir.join("agent-0.log"));
    assert!(!agent.is_empty(), "the agent logged nothing");
    assert!(agent.iter().all(|l| l["level"].is_string() && l["message"].is_string()), "{agent:?}");
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_choices() {
    let out =
        Command::new(BIN).args(["controller", "--log-format", "yaml", "--data-dir", "/nonexistent"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("yaml") && err.contains("text") && err.contains("json"), "{err}");
}
