//! What an attacker's probe and a careless user found (issue 10), through the
//! real binary: the HTTP API, the agent port and the CLI. Each test failed on
//! the code before its fix.

use super::{BIN, Cluster, Proc};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on any one answer the tests wait for: far above what a healthy
/// controller needs, far below "hung".
const ANSWER_TIMEOUT: Duration = Duration::from_secs(8);

fn token(c: &Cluster) -> String {
    std::fs::read_to_string(c.data().join("api.token")).unwrap().trim().to_string()
}

fn addr(c: &Cluster) -> String {
    c.api.trim_start_matches("http://").to_string()
}

/// An HTTP call with a bound on its answer: (status, body).
fn call(c: &Cluster, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(ANSWER_TIMEOUT))
        .build()
        .new_agent();
    let url = format!("{}{path}", c.api);
    let with = |mut r: ureq::RequestBuilder<ureq::typestate::WithBody>| {
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send(body)
    };
    let resp = match method {
        "POST" => with(agent.post(&url)),
        "PUT" => with(agent.put(&url)),
        _ => {
            let mut r = agent.get(&url);
            for (k, v) in headers {
                r = r.header(*k, *v);
            }
            r.call()
        }
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path} got no answer: {e}"));
    (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap_or_default())
}

fn authed(bearer: &str) -> Vec<(&str, &str)> {
    vec![("Authorization", bearer)]
}

/// Reads one HTTP status line from a raw connection, or fails the test after the bound.
fn status_line(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or_else(|e| panic!("no answer: {e}"));
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string()
}

#[test]
fn two_uploads_of_one_blob_do_not_wedge_the_api_and_sigterm_still_stops_it() {
    let mut c = Cluster::start(0, 10_000);
    let bearer = format!("Bearer {}", token(&c));
    let sha = "ab".repeat(32);
    // A slow upload: its headers and the first MiB of 8, then it pauses.
    let mut slow = TcpStream::connect(addr(&c)).unwrap();
    write!(
        slow,
        "PUT /v1/blobs/{sha} HTTP/1.1\r\nHost: x\r\nAuthorization: {bearer}\r\nContent-Length: {}\r\n\r\n",
        8 << 20
    )
    .unwrap();
    slow.write_all(&vec![7u8; 1 << 20]).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let (status, body) = call(&c, "PUT", &format!("/v1/blobs/{sha}"), &authed(&bearer), b"other bytes");
    assert_eq!(status, 409, "a second upload of the same blob: {body}");
    assert!(body.contains("in progress"), "{body}");
    for _ in 0..3 {
        let (status, body) = call(&c, "GET", "/v1/status", &authed(&bearer), b"");
        assert_eq!(status, 200, "status after the concurrent upload: {body}");
    }
    // The refused upload did not release the first one's hold on the blob.
    let (status, body) = call(&c, "PUT", &format!("/v1/blobs/{sha}"), &authed(&bearer), b"third bytes");
    assert_eq!(status, 409, "a third upload while the first still runs: {body}");

    // SIGTERM with the slow upload still open: the controller stops within its grace.
    let ctl = c.controller.take().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(ctl.0.id() as i32, libc::SIGTERM) };
    let exited = wait_exit(ctl, Duration::from_secs(20));
    assert!(exited.is_some(), "the controller did not stop on SIGTERM with an upload open");
    drop(slow);
}

/// Waits for a child to exit; its status, or `None` after `within`.
fn wait_exit(mut p: Proc, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = p.0.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_controller_or_agent_on_one_directory_is_refused_naming_the_first() {
    let c = Cluster::start(1, 10_000);
    let out = Command::new(BIN)
        .args(["controller", "--data-dir"])
        .arg(c.data())
        .args(["--api-listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second controller started on the same data directory: {err}");
    let first = c.controller.as_ref().unwrap().0.id();
    assert!(err.contains(&format!("in use by another controller (pid {first})")), "{err}");

    let out = Command::new(BIN)
        .args(["agent", "--controller", &c.agent_addr, "--token-file"])
        .arg(c.data().join("agent.token"))
        .arg("--work-dir")
        .arg(c.dir.path().join("agent-0"))
        .args(["--simulated-gpus", "1x16GiB", "--name", "other"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second agent started on the same work directory: {err}");
    assert!(err.contains("in use by another agent (pid"), "{err}");
    // The first controller still serves, and still has the only job counter.
    assert_eq!(c.json(&["jobs", "list", "--json"]).as_array().unwrap().len(), 0);
}

#[test]
fn unauthenticated_requests_are_refused_before_any_body_is_read() {
    let c = Cluster::start(0, 10_000);
    for path in ["/v1/jobs", "/v1/prompts", "/v1/runs"] {
        let (status, body) = call(&c, "POST", path, &[], b"{not json");
        assert_eq!(status, 401, "POST {path} without a token and with bad JSON: {body}");
        let (status, body) = call(&c, "POST", path, &[("Authorization", "Bearer wrong")], b"{not json");
        assert_eq!(status, 401, "POST {path} with a wrong token: {body}");
    }
    // A huge body announced without a token is answered from the headers alone, before it arrives.
    let mut s = TcpStream::connect(addr(&c)).unwrap();
    write!(
        s,
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 62000000\r\n\r\n{{"
    )
    .unwrap();
    let line = status_line(&mut s);
    assert!(line.contains("401"), "answer to an unauthenticated 62 MB body before it was sent: {line}");
}

#[test]
fn stalled_clients_cannot_take_the_descriptors_agents_need() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    // A controller with 200 descriptors, as the probe ran it.
    let (_ctl, api, agents) =
        super::spawn_controller(&["prlimit", "--nofile=200:200", "--"], &data, &dir.path().join("ctl.log"));
    let (api, agents) = (api.trim_start_matches("http://"), agents.as_str());
    let bearer = format!("Bearer {}", std::fs::read_to_string(data.join("api.token")).unwrap().trim());
    // 260 authenticated clients that send their headers and `{`, then stall.
    // Beyond the workers' connection limits they wait in the accept backlog,
    // connected at once: a short backlog would leave them in SYN retries (and
    // this test cycling through body timeouts for a minute).
    let api_addr: std::net::SocketAddr = api.parse().unwrap();
    let stalled: Vec<TcpStream> = (0..260)
        .filter_map(|_| {
            let mut s = TcpStream::connect_timeout(&api_addr, Duration::from_secs(2)).ok()?;
            let head = format!(
                "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {bearer}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            );
            s.write_all(head.as_bytes()).ok()?;
            Some(s)
        })
        .collect();
    assert!(stalled.len() > 200, "the test could not open its stalled connections");
    std::thread::sleep(Duration::from_millis(500));
    // An agent still gets in while they stall.
    let mut agent = Proc(
        Command::new(BIN)
            .args(["agent", "--controller", agents, "--token-file"])
            .arg(data.join("agent.token"))
            .arg("--work-dir")
            .arg(dir.path().join("agent"))
            .args(["--simulated-gpus", "1x16GiB", "--name", "a1"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(dir.path().join("ctl.log")).unwrap().contains("agent connected") {
        assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited; see {}", dir.path().display());
        assert!(Instant::now() < deadline, "the agent never connected while clients stalled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(dir.path().join("ctl.log")).unwrap();
    assert!(!log.contains("Too many open files"), "the controller ran out of descriptors:\n{log}");
    // Once they are gone the API answers again, the agent still connected. (When
    // hundreds of peers close at once, actix's accept loop can still hit the
    // descriptor limit for an instant while it drains its backlog; it backs off
    // and goes on, and the agent's link is untouched: that is what is checked.)
    drop(stalled);
    let out = Command::new(BIN)
        .args(["agents", "list", "--json", "--controller", &format!("http://{api}"), "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "a1");
    assert_eq!(v[0]["connected"], true);
    let log = std::fs::read_to_string(dir.path().join("ctl.log")).unwrap();
    assert_eq!(log.matches("agent connected").count(), 1, "the agent's link broke:\n{log}");
}

#[test]
fn the_agent_port_closes_oversized_hellos_at_once_and_caps_pending_handshakes() {
    let c = Cluster::start(0, 10_000);
    let mut s = TcpStream::connect(&c.agent_addr).unwrap();
    s.write_all(&(4u32 << 20).to_be_bytes()).unwrap();
    s.write_all(b"CSMO").unwrap();
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => assert!(n < 64, "the controller kept reading a 4 MiB hello"),
        Err(e) => assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "the controller waited for a 4 MiB hello instead of closing: {e}"
        ),
    }

    // 100 peers that connect and say nothing: beyond the cap they are closed at once.
    let silent: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(&c.agent_addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1000));
    let closed = silent
        .iter()
        .filter(|s| {
            let mut r: &TcpStream = s;
            r.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            match r.read(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        })
        .count();
    assert!(closed >= 100 - 64, "only {closed} of 100 silent connections were closed; the cap is 64 pending");
    drop(silent);

    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cosmos-controller.service"))
        .unwrap();
    assert!(!unit.contains("0.0.0.0"), "the controller unit binds a port to every interface:\n{unit}");
}

#[test]
fn token_files_that_are_empty_short_or_readable_by_others_are_refused() {
    let c = Cluster::start(0, 10_000);
    let run_agent = |token: &Path| {
        Command::new(BIN)
            .args(["agent", "--controller", &c.agent_addr, "--token-file"])
            .arg(token)
            .arg("--work-dir")
            .arg(c.dir.path().join("w"))
            .args(["--simulated-gpus", "1x16GiB"])
            .output()
            .unwrap()
    };
    let good = std::fs::read_to_string(c.data().join("agent.token")).unwrap();
    for (name, text, mode, expected) in [
        ("empty.token", "", 0o600, "holds 0 characters"),
        ("short.token", "abc\n", 0o600, "holds 3 characters"),
        ("open.token", good.as_str(), 0o644, "chmod 600"),
    ] {
        let path = c.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = run_agent(&path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted: {err}");
        assert!(err.contains(expected) && err.contains(name), "{name}: expected `{expected}` in: {err}");
    }

    // The controller refuses its own token file once it is readable by others.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("api.token"), &good).unwrap();
    std::fs::set_permissions(data.join("api.token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(BIN)
        .args(["controller", "--data-dir"])
        .arg(&data)
        .args(["--api-listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the controller started with an open api.token: {err}");
    assert!(err.contains("api.token") && err.contains("chmod 600"), "{err}");
}

fn submit_line(c: &Cluster, name: &str, line: Value) -> std::process::Output {
    let path = c.dir.path().join(format!("{name}.jsonl"));
    std::fs::write(&path, format!("{line}\n")).unwrap();
    c.cli(&["jobs", "submit", path.to_str().unwrap(), "--json"])
}

fn wait_final(c: &Cluster, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = c.json(&["jobs", "show", id, "--json"]);
        if ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap()) {
            return j;
        }
        assert!(Instant::now() < deadline, "{id} never ended: {j}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn attempt_logs_are_capped_and_read_by_tail() {
    let c = Cluster::start_with(1, 10_000, vec!["--attempt-log-bytes-max".into(), "100000".into()], |_| Vec::new());
    let script = "i=0; while [ $i -lt 5000 ]; do echo \"line $i of a chatty job ....................................\"; i=$((i+1)); done";
    let out = submit_line(&c, "chatty", json!({ "name": "chatty", "command": ["sh", "-c", script] }));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].as_str().unwrap().to_string();
    assert_eq!(wait_final(&c, &id)["state"], "succeeded");
    let marker = cosmos_controller::logstore::log_cut_marker(100_000);
    let all = c.cli(&["jobs", "logs", &id]);
    let text = String::from_utf8_lossy(&all.stdout);
    assert!(text.starts_with("line 0 of a chatty job"), "{}", &text[..80]);
    // The stored log ends with the marker's newline, so what readers see is it byte for byte.
    assert_eq!(all.stdout.len(), 100_000 + marker.len(), "the stored log is cut at its bound");
    assert!(text.ends_with(&marker), "the cut is marked in what readers see");

    let short = "i=0; while [ $i -lt 1000 ]; do echo \"line $i\"; i=$((i+1)); done";
    let out = submit_line(&c, "short", json!({ "name": "short", "command": ["sh", "-c", short] }));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].as_str().unwrap().to_string();
    assert_eq!(wait_final(&c, &id)["state"], "succeeded");
    let tail = c.cli(&["jobs", "logs", &id, "--tail-bytes", "30"]);
    let text = String::from_utf8_lossy(&tail.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty() && lines.len() <= 4, "a 30-byte tail: {lines:?}");
    assert_eq!(*lines.last().unwrap(), "line 999");
    assert!(lines.iter().all(|l| l.starts_with("line ")), "a tail starts at a whole line: {lines:?}");
}

#[test]
fn a_long_finished_log_reads_back_line_for_line() {
    let c = Cluster::start(1, 10_000);
    // 3 MiB of numbered lines, read in several chunks: no line may be split or lost at a chunk's edge.
    let script = "i=0; while [ $i -lt 30000 ]; do printf 'line %06d %090d\\n' $i 0; i=$((i+1)); done";
    let out = submit_line(&c, "long", json!({ "name": "long", "command": ["sh", "-c", script] }));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].as_str().unwrap().to_string();
    assert_eq!(wait_final(&c, &id)["state"], "succeeded");
    let all = c.cli(&["jobs", "logs", &id]);
    let text = String::from_utf8_lossy(&all.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 30_000, "every line once");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("line {i:06} {:090}", 0), "line {i}");
    }
}

#[test]
fn a_second_agent_under_a_connected_name_is_refused_and_exits_naming_the_first() {
    let c = Cluster::start(1, 10_000);
    let impostor = Proc(
        Command::new(BIN)
            .args(["agent", "--controller", &c.agent_addr, "--token-file"])
            .arg(c.data().join("agent.token"))
            .arg("--work-dir")
            .arg(c.dir.path().join("impostor"))
            .args(["--simulated-gpus", "2x16GiB", "--name", "agent-0"])
            .stderr(std::fs::File::create(c.dir.path().join("impostor.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = wait_exit(impostor, Duration::from_secs(30)).expect("the second agent-0 kept running");
    let err = std::fs::read_to_string(c.dir.path().join("impostor.log")).unwrap();
    assert!(!status.success(), "a second agent-0 was let in: {err}");
    assert!(err.contains("another agent named `agent-0` is connected (from 127.0.0.1:"), "{err}");
    // The first one never lost its place: still connected, with its own 8 GPUs.
    let agents = c.json(&["agents", "list", "--json"]);
    assert_eq!(agents.as_array().unwrap().len(), 1);
    assert_eq!(agents[0]["connected"], true);
    assert_eq!(agents[0]["gpus"].as_array().unwrap().len(), 8);
    let log = std::fs::read_to_string(c.dir.path().join("ctl.log")).unwrap();
    assert_eq!(log.matches("agent connected").count(), 1, "the first agent was displaced:\n{log}");
}

#[test]
fn control_characters_in_names_and_reserved_labels_are_refused() {
    let c = Cluster::start(1, 10_000);
    for (file, line, expected) in [
        ("newline", json!({ "name": "a\nb", "command": ["true"] }), "control character"),
        ("escape", json!({ "name": "\u{1b}[2J", "command": ["true"] }), "control character"),
        (
            "reserved",
            json!({ "command": ["true"], "labels": { "cosmos.run": "rs_000000000000" } }),
            "`cosmos.run` is reserved",
        ),
    ] {
        let out = submit_line(&c, file, line);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(
            err.contains(expected) && err.contains(&format!("{file}.jsonl:1")),
            "{file}: expected `{expected}` in: {err}"
        );
    }
    // The API refuses them too, whatever client sends them.
    let bearer = format!("Bearer {}", token(&c));
    let body = json!({ "jobs": [{ "command": ["true"] }, { "command": ["true"], "labels": { "cosmos.kind": "x" } }] });
    let (status, answer) = call(
        &c,
        "POST",
        "/v1/jobs",
        &[("Authorization", bearer.as_str()), ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("line 2: label `cosmos.kind` is reserved"), "{answer}");
    assert_eq!(c.json(&["jobs", "list", "--json"]).as_array().unwrap().len(), 0);
}

#[test]
fn the_data_directory_and_its_files_are_private() {
    // As a controller started by hand would run; a stricter umask would hide the defect.
    // SAFETY: umask(2) only sets this process's file-creation mask.
    unsafe { libc::umask(0o022) };
    let c = Cluster::start(1, 10_000);
    let out = submit_line(&c, "hello", json!({ "command": ["sh", "-c", "echo hi; echo err >&2"] }));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].as_str().unwrap().to_string();
    wait_final(&c, &id);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.data()), 0o700, "data directory");
    for f in [
        "store.sqlite",
        "store.sqlite-wal",
        "api.token",
        "agent.token",
        "logs/seg-00000001.log",
        "logs/seg-00000001.idx",
    ] {
        let p = c.data().join(f);
        assert_eq!(mode(&p) & 0o077, 0, "{f} is readable by others: {:o}", mode(&p));
    }
}

#[test]
fn a_submission_repeated_under_its_idempotency_key_is_answered_with_the_first_ids() {
    let mut c = Cluster::start(0, 10_000);
    let bearer = format!("Bearer {}", token(&c));
    let body = json!({ "jobs": [{ "command": ["true"] }, { "command": ["true"], "name": "two" }] }).to_string();
    let headers =
        [("Authorization", bearer.as_str()), ("Content-Type", "application/json"), ("Idempotency-Key", "k-1")];
    let (status, first) = call(&c, "POST", "/v1/jobs", &headers, body.as_bytes());
    assert_eq!(status, 200, "{first}");
    let (status, again) = call(&c, "POST", "/v1/jobs", &headers, body.as_bytes());
    assert_eq!((status, &again), (200, &first), "a repeat answers the first ids");
    assert_eq!(c.json(&["jobs", "list", "--json"]).as_array().unwrap().len(), 2, "a repeat made no jobs");

    // After a restart too: the key is stored with the jobs.
    Cluster::kill9(&mut c.controller);
    let (api, agents) = (addr(&c), c.agent_addr.clone());
    c.start_controller(&api, &agents);
    let (status, after) = call(&c, "POST", "/v1/jobs", &headers, body.as_bytes());
    assert_eq!((status, &after), (200, &first), "a repeat after a restart answers the first ids");
    assert_eq!(c.json(&["jobs", "list", "--json"]).as_array().unwrap().len(), 2);

    let other = json!({ "jobs": [{ "command": ["false"] }] }).to_string();
    let (status, refused) = call(&c, "POST", "/v1/jobs", &headers, other.as_bytes());
    assert_eq!(status, 422, "the same key for another submission: {refused}");
    assert!(refused.contains("already used for a different submission"), "{refused}");
    let (status, fresh) = call(
        &c,
        "POST",
        "/v1/jobs",
        &[("Authorization", bearer.as_str()), ("Content-Type", "application/json"), ("Idempotency-Key", "k-2")],
        other.as_bytes(),
    );
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(c.json(&["jobs", "list", "--json"]).as_array().unwrap().len(), 3);
}

#[test]
fn prompt_text_with_control_characters_is_printed_escaped() {
    let c = Cluster::start(0, 10_000);
    let videos = c.dir.path().join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    std::fs::write(videos.join("color.mp4"), b"a color video".repeat(64)).unwrap();
    let text = "a street\n| ps_fake | injected row\u{1b}[2J";
    let out = c.cli(&["create", "prompt", text, videos.to_str().unwrap(), "--name", "street"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for args in [
        &["prompts", "list"][..],
        &["prompts", "show", c.json(&["prompts", "list", "--json"])[0]["id"].as_str().unwrap()],
    ] {
        let out = c.cli(args);
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(!shown.contains('\u{1b}'), "{args:?} printed a raw escape: {shown:?}");
        assert!(!shown.contains("\n| ps_fake"), "{args:?} printed a faked row: {shown}");
        assert!(shown.contains("a street\\n| ps_fake"), "{args:?} shows the newline escaped: {shown}");
    }
    // The stored text is what was given: escaping is for display only.
    assert_eq!(c.json(&["prompts", "list", "--json"])[0]["text"], text);
}

#[test]
fn a_run_creation_repeated_under_its_key_makes_its_runs_and_prompts_once() {
    let c = Cluster::start(0, 10_000);
    let videos = c.dir.path().join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    let color = b"color of a repeated run".repeat(64);
    std::fs::write(videos.join("color.mp4"), &color).unwrap();
    // Upload the video the way the CLI does, then create a prompt and a run in one request, twice.
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(&color));
    let bearer = format!("Bearer {}", token(&c));
    let (status, body) = call(&c, "PUT", &format!("/v1/blobs/{sha}"), &authed(&bearer), &color);
    assert!(status == 201 || status == 200, "{body}");
    let request = json!({ "runs": [{ "prompt": {
        "text": "a repeated run", "videos": { "color": { "sha256": sha, "size_bytes": color.len() } }
    } }] })
    .to_string();
    let headers =
        [("Authorization", bearer.as_str()), ("Content-Type", "application/json"), ("Idempotency-Key", "runs-1")];
    let (status, first) = call(&c, "POST", "/v1/runs", &headers, request.as_bytes());
    assert_eq!(status, 201, "{first}");
    let (status, again) = call(&c, "POST", "/v1/runs", &headers, request.as_bytes());
    assert_eq!(status, 201, "{again}");
    let (first, again): (Value, Value) = (serde_json::from_str(&first).unwrap(), serde_json::from_str(&again).unwrap());
    assert_eq!(first, again, "a repeat answers the runs and prompts the first request made");
    assert_eq!(c.json(&["runs", "list", "--json"]).as_array().unwrap().len(), 1);
    assert_eq!(c.json(&["prompts", "list", "--json"]).as_array().unwrap().len(), 1);
}

#[test]
fn an_agent_reconnecting_before_the_controller_saw_its_old_link_die_is_let_back_in() {
    use std::sync::{Arc, Mutex};
    let mut c = Cluster::start(0, 10_000);
    // A proxy between agent and controller that can cut the agent's side alone,
    // leaving the controller's side open as a half-open link would.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap().to_string();
    let agent_sides: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let kept: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    {
        let (target, agent_sides, kept) = (c.agent_addr.clone(), agent_sides.clone(), kept.clone());
        std::thread::spawn(move || {
            for a in listener.incoming() {
                let Ok(a) = a else { return };
                let Ok(b) = TcpStream::connect(&target) else { return };
                let pump = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                };
                pump(a.try_clone().unwrap(), b.try_clone().unwrap());
                pump(b.try_clone().unwrap(), a.try_clone().unwrap());
                agent_sides.lock().unwrap().push(a);
                kept.lock().unwrap().push(b);
            }
        });
    }
    c.agent_addr = proxy;
    c.agents.push(Some(c.spawn_agent(0)));
    c.wait_agents(1);
    // Cut the agent's side: it redials at once, while the controller still holds its old link.
    for s in agent_sides.lock().unwrap().drain(..) {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(c.dir.path().join("ctl.log")).unwrap();
        if log.matches("agent connected").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never got back in:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let agent = c.agents[0].as_mut().unwrap();
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited after its own reconnect was refused");
    let agents = c.json(&["agents", "list", "--json"]);
    assert_eq!(agents[0]["connected"], true, "{agents}");
    drop(kept);
}
