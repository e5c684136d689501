//! Operating the daemons (issue 18): the systemd units as systemd reads them
//! (`systemd-analyze verify`), the `sd_notify` protocol as systemd hears it
//! (READY, STATUS, WATCHDOG, STOPPING on a datagram socket of the test's
//! own), config files and `cosmos config check`, and a graceful stop.

use super::*;
use std::os::unix::net::UnixDatagram;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `systemd-analyze verify` on `unit` as systemd would load it, but with
/// ExecStart's binary replaced by this build's (the unit names where an
/// installation puts it; verify checks that the binary exists and runs).
/// Every line it prints is a finding: systemd only warns about, say, a
/// misspelt value. Man pages named in Documentation= are not looked up.
fn verify_unit(unit: &Path) -> (bool, String) {
    let analyze = which("systemd-analyze").unwrap_or_else(|| {
        panic!(
            "systemd-analyze is missing: install Debian's systemd package (apt-get install systemd); scripts/setup does"
        )
    });
    let text = std::fs::read_to_string(unit).unwrap();
    let binary = exec_start_binary(&text);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(unit.file_name().unwrap());
    std::fs::write(&copy, text.replace(&format!("ExecStart={binary} "), &format!("ExecStart={BIN} "))).unwrap();
    let out = Command::new(analyze).args(["verify", "--man=no"]).arg(&copy).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && text.trim().is_empty(), text)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn exec_start_binary(unit_text: &str) -> String {
    let line = unit_text.lines().find(|l| l.starts_with("ExecStart=")).expect("the unit has an ExecStart");
    line["ExecStart=".len()..].split_whitespace().next().unwrap().to_string()
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let mut units: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    units.sort();
    assert!(units.len() >= 2, "deploy/ has the controller's and the agent's units: {units:?}");
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        let (ok, findings) = verify_unit(unit);
        assert!(ok, "systemd-analyze verify {}:\n{findings}", unit.display());
        for directive in
            ["Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes"]
        {
            assert!(text.lines().any(|l| l.starts_with(directive)), "{} lacks {directive}", unit.display());
        }
    }
    // The agent's jobs and their supervisor outlive an agent restart; a private /tmp would not.
    let agent = std::fs::read_to_string(repo().join("deploy/cosmos-agent.service")).unwrap();
    assert!(agent.lines().any(|l| l == "KillMode=process"), "the agent unit keeps KillMode=process");
    assert!(!agent.lines().any(|l| l.starts_with("PrivateTmp=yes")), "no PrivateTmp for the agent: jobs outlive it");
}

#[test]
fn a_broken_unit_is_caught_by_the_check() {
    // The check itself has teeth: a misspelt value is a finding even though systemd only warns.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("deploy/cosmos-agent.service")).unwrap();
    let broken = dir.path().join("cosmos-agent.service");
    std::fs::write(&broken, text.replace("KillMode=process", "KillMode=proces")).unwrap();
    let (ok, findings) = verify_unit(&broken);
    assert!(!ok && findings.contains("kill mode"), "a bad KillMode went unnoticed: {findings}");
}

/// What a service manager hears on its notify socket.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    heard: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        NotifySocket { sock, path, heard: Vec::new() }
    }

    /// Reads datagrams until one has a line starting with `prefix` (and `also`); returns that line.
    fn wait_for(&mut self, prefix: &str, also: &str, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = vec![0u8; 4096];
        loop {
            if let Some(l) = self.heard.iter().find(|l| l.starts_with(prefix) && l.contains(also)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "never heard {what}; heard {:?}", self.heard);
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.heard.extend(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string));
            }
        }
    }
}

fn sigterm(p: &Proc) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
}

fn wait_exit(p: &mut Proc, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_controller_tells_systemd_it_is_ready_how_it_stands_and_that_it_lives() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let data = dir.path().join("ctl");
    let mut child = Command::new(BIN)
        .args(["controller", "--data-dir"])
        .arg(&data)
        .args(["--api-listen", "127.0.0.1:0", "--agent-listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify.path)
        // 400 ms: pings every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("ctl.log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.find_map(|l| l.ok().filter(|l| l.contains("API on"))).unwrap();
    std::thread::spawn(move || for _ in lines {});
    let api = line.split("API on ").nth(1).unwrap().split(',').next().unwrap().to_string();
    let mut ctl = Proc(child);
    notify.wait_for("READY=1", "", "READY=1");
    // Ready means serving: the API answers at once.
    let out = Command::new(BIN)
        .args(["status"])
        .env("COSMOS_CONTROLLER", &api)
        .env("COSMOS_DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(out.status.success(), "the API did not answer after READY=1: {}", String::from_utf8_lossy(&out.stderr));
    let status = notify.wait_for("STATUS=", "agents connected", "a status line");
    assert!(status.contains("0 jobs running, 0 queued; 0 of 0 agents connected; 0 GPUs quarantined"), "{status}");
    // Pings keep coming while the core answers.
    let pings_before = notify.heard.iter().filter(|l| *l == "WATCHDOG=1").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while notify.heard.iter().filter(|l| *l == "WATCHDOG=1").count() < pings_before + 3 {
        assert!(Instant::now() < deadline, "watchdog pings stopped: {:?}", notify.heard);
        let mut buf = [0u8; 4096];
        if let Ok(n) = notify.sock.recv(&mut buf) {
            notify.heard.extend(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string));
        }
    }
    sigterm(&ctl);
    notify.wait_for("STOPPING=1", "", "STOPPING=1");
    let status = wait_exit(&mut ctl, "the controller");
    assert!(status.success(), "the controller did not stop cleanly on SIGTERM: {status:?}");
}

#[test]
fn the_agent_tells_systemd_whether_its_controller_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    let (ctl, _api, agents) = spawn_controller(&[], &dir.path().join("ctl"), &dir.path().join("ctl.log"));
    let mut notify = NotifySocket::bind(dir.path());
    let mut agent = Proc(
        Command::new(BIN)
            .args(["agent", "--controller", &agents, "--token-file"])
            .arg(dir.path().join("ctl/agent.token"))
            .arg("--work-dir")
            .arg(dir.path().join("agent"))
            .args(["--simulated-gpus", "2x24GiB", "--name", "a1"])
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "400000")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    notify.wait_for("READY=1", "", "READY=1");
    let status = notify.wait_for("STATUS=", "connected to the controller", "a connected status line");
    assert!(status.contains("0 attempts running; 0 of 2 GPUs quarantined"), "{status}");
    notify.wait_for("WATCHDOG=1", "", "a watchdog ping");
    drop(ctl);
    notify.wait_for("STATUS=", "waiting for the controller", "a status line once the controller is gone");
    sigterm(&agent);
    notify.wait_for("STOPPING=1", "", "STOPPING=1");
    let status = wait_exit(&mut agent, "the agent");
    assert!(status.success(), "the agent did not stop cleanly on SIGTERM: {status:?}");
}

fn cosmos(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("COSMOS_LOG_FORMAT").output().unwrap()
}

#[test]
fn config_check_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("controller.toml");
    std::fs::write(&file, "data_dir = \"/var/lib/cosmos\"\napi_listen = \"127.0.0.1:7700\"\nretry_budget = 3\n")
        .unwrap();
    let out = cosmos(&["config", "check", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown key passed the check");
    assert!(err.contains(&format!("{}: unknown key `retry_budget`", file.display())), "{err}");
    std::fs::write(&file, "data_dir = \"/var/lib/cosmos\"\nrun_max_attempts = \"many\"\n").unwrap();
    let out = cosmos(&["config", "check", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("--run-max-attempts")
            && err.contains("`run_max_attempts` comes from the config file"),
        "{err}"
    );
    // The daemon's own start-up checks run too (here the Cosmos run settings).
    std::fs::write(&file, "data_dir = \"/var/lib/cosmos\"\nrun_max_attempts = 0\n").unwrap();
    let out = cosmos(&["config", "check", file.to_str().unwrap()]);
    assert!(!out.status.success(), "run_max_attempts = 0 passed: {}", String::from_utf8_lossy(&out.stdout));
    std::fs::write(&file, "data_dir = \"/var/lib/cosmos\"\nlost_after_ms = 20000\nrun_env = [\"A=1\"]\n").unwrap();
    let out = cosmos(&["config", "check", file.to_str().unwrap()]);
    assert!(out.status.success(), "a good file failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("a valid config file for cosmos controller"));

    // The shipped files: the controller's passes; the agent's every key is
    // right, and only its token file (not on this machine) is missing.
    let out = cosmos(&["config", "check", repo().join("deploy/controller.toml").to_str().unwrap()]);
    assert!(out.status.success(), "deploy/controller.toml: {}", String::from_utf8_lossy(&out.stderr));
    if !Path::new("/etc/cosmos/agent.token").exists() {
        let out = cosmos(&["config", "check", repo().join("deploy/agent.toml").to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("/etc/cosmos/agent.token"), "deploy/agent.toml: {err}");
    }
}

#[test]
fn an_agent_token_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("agent.token");
    write_token(&token, &"t".repeat(64));
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        format!(
            "controller = \"127.0.0.1:7701\"\ntoken_file = \"{}\"\nwork_dir = \"{}\"\nsimulated_gpus = \"2x24GiB\"\n",
            token.display(),
            dir.path().join("work").display()
        ),
    )
    .unwrap();
    let out = cosmos(&["config", "check", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.path().join("work").exists(), "config check created the work directory");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [vec!["config", "check", file.to_str().unwrap()], vec!["agent", "--config", file.to_str().unwrap()]] {
        let out = cosmos(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "cosmos {args:?} took a token others can read");
        assert!(err.contains(&token.display().to_string()) && err.contains("chmod 600"), "cosmos {args:?}: {err}");
    }
}

#[test]
fn a_controller_runs_from_its_config_file_and_flags_and_variables_win() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ctl");
    let file = dir.path().join("controller.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\napi_listen = \"127.0.0.1:0\"\nagent_listen = \"127.0.0.1:0\"\nlog_format = \"text\"\n",
            data.display()
        ),
    )
    .unwrap();
    // COSMOS_LOG_FORMAT beats the file's log_format; the file's data_dir and listeners hold.
    let mut child = Command::new(BIN)
        .args(["controller", "--config"])
        .arg(&file)
        .env("COSMOS_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.find_map(|l| l.ok().filter(|l| l.contains("API on")));
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first_log = stderr.next().and_then(|l| l.ok()).unwrap_or_default();
    let ctl = Proc(child);
    assert!(line.is_some(), "the controller did not start from its config file: {first_log}");
    assert!(data.join("api.token").exists(), "the file's data_dir was not used");
    assert!(first_log.starts_with('{'), "COSMOS_LOG_FORMAT=json did not override the file: {first_log}");
    drop(ctl);
    // A flag beats the file: another data directory.
    let other = dir.path().join("other");
    let out = Command::new(BIN).args(["config", "check"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (mut p, _, _) = spawn_controller_with_config(&file, &other, &dir.path().join("c2.log"));
    assert!(other.join("api.token").exists(), "--data-dir did not override the file's data_dir");
    sigterm(&p);
    assert!(wait_exit(&mut p, "the controller").success());
}

fn spawn_controller_with_config(file: &Path, data: &Path, log: &Path) -> (Proc, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["controller", "--config"]).arg(file).arg("--data-dir").arg(data);
    super::start_controller(cmd, log)
}

#[test]
fn sigterm_stops_the_controller_cleanly_and_running_jobs_carry_on() {
    let mut c = Cluster::start(2, 15_000);
    let record = c.dir.path().join("record.txt");
    let batch = write_batch(c.dir.path(), 6, &record, "graceful-stop");
    let out = c.cli(&["jobs", "submit", batch.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_until("a job running", Duration::from_secs(30), |s| s.iter().any(|s| s == "running"));
    let mut ctl = c.controller.take().unwrap();
    sigterm(&ctl);
    let status = wait_exit(&mut ctl, "the controller");
    assert!(status.success(), "the controller did not exit 0 on SIGTERM: {status:?}");
    let log = std::fs::read_to_string(c.dir.path().join("ctl.log")).unwrap();
    assert!(log.contains("controller stopped; the store is flushed"), "{log}");
    // Its agents were told at once: their links closed rather than timing out.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agent_log = std::fs::read_to_string(c.dir.path().join("agent-0.log")).unwrap_or_default();
        if agent_log.contains("the controller closed the connection") {
            break;
        }
        assert!(Instant::now() < deadline, "agent-0 never saw its link close: {agent_log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The next controller on the same directory finishes every job, each once.
    let (api, agents) = (c.api.trim_start_matches("http://").to_string(), c.agent_addr.clone());
    c.start_controller(&api, &agents);
    c.wait_until("every job succeeded", Duration::from_secs(120), |s| {
        s.len() == 6 && s.iter().all(|s| s == "succeeded")
    });
    for (job, attempts) in runs(&record) {
        assert_eq!(attempts.len(), 1, "{job} ran {} times", attempts.len());
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A batch file of quick jobs, one per command.
fn jobs_file(dir: &Path, name: &str, commands: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let lines: Vec<String> = commands
        .iter()
        .enumerate()
        .map(|(i, cmd)| serde_json::json!({"name": format!("j{i}"), "command": ["sh", "-c", cmd]}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn blob_path(data: &Path, sha: &str) -> PathBuf {
    data.join("blobs/sha256").join(&sha[..2]).join(sha)
}

/// Makes a file look `hours` old, as a blob uploaded that long ago is.
fn age(path: &Path, hours: u32) {
    let out = Command::new("touch").arg("-d").arg(format!("{hours} hours ago")).arg(path).output().unwrap();
    assert!(out.status.success(), "touch -d: {}", String::from_utf8_lossy(&out.stderr));
}

fn video(dir: &Path, tag: &str) -> (PathBuf, String) {
    let d = dir.join(tag);
    std::fs::create_dir_all(&d).unwrap();
    let bytes = format!("color video of {tag}").repeat(100);
    std::fs::write(d.join("color.mp4"), &bytes).unwrap();
    (d, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes.as_bytes())))
}

#[test]
fn jobs_prune_removes_finished_jobs_their_logs_and_blobs_nothing_references() {
    let mut c = Cluster::start(1, 15_000);
    let batch = jobs_file(c.dir.path(), "b.jsonl", &["echo one", "echo two"]);
    assert!(c.cli(&["jobs", "submit", batch.to_str().unwrap(), "--wait"]).status.success());
    assert_eq!(String::from_utf8_lossy(&c.cli(&["jobs", "logs", "job-1"]).stdout), "one\n", "no log was written");
    // Two prompts' videos; the first prompt is deleted, so its video is referenced by nothing.
    let (gone_dir, gone_sha) = video(c.dir.path(), "gone");
    let (kept_dir, kept_sha) = video(c.dir.path(), "kept");
    let gone = c.json(&["create", "prompt", "a gone street", gone_dir.to_str().unwrap(), "--json"]);
    c.json(&["create", "prompt", "a kept street", kept_dir.to_str().unwrap(), "--json"]);
    assert!(c.cli(&["prompts", "delete", gone["id"].as_str().unwrap()]).status.success());
    // A blob younger than an hour is never collected (an upload whose prompt is on its way).
    let cutoff = now_ms().to_string();
    let first = c.json(&["jobs", "prune", "--before", &cutoff, "--json"]);
    assert_eq!(first["jobs"].as_array().unwrap().len(), 2, "{first}");
    assert_eq!(first["blobs"], 0, "a fresh blob was collected: {first}");
    assert!(blob_path(&c.data(), &gone_sha).exists());
    assert!(c.json(&["jobs", "list", "--json"]).as_array().unwrap().is_empty());
    assert_eq!(
        (first["log_files"].as_u64(), first["log_bytes"].as_u64()),
        (Some(2), Some(8)),
        "each job's stdout went: {first}"
    );
    let out = c.cli(&["jobs", "show", "job-1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no job job-1"));
    age(&blob_path(&c.data(), &gone_sha), 2);
    age(&blob_path(&c.data(), &kept_sha), 2);
    let second = c.json(&["jobs", "prune", "--before", &cutoff, "--json"]);
    assert_eq!((second["jobs"].as_array().unwrap().len(), second["blobs"].as_u64()), (0, Some(1)), "{second}");
    assert!(!blob_path(&c.data(), &gone_sha).exists(), "the unreferenced blob stayed");
    assert!(blob_path(&c.data(), &kept_sha).exists(), "a prompt's video was collected");
    let log = std::fs::read_to_string(c.dir.path().join("ctl.log")).unwrap();
    assert!(log.contains("pruned a finished job") && log.contains("collected a blob"), "{log}");
    // A time to come is refused; and pruned ids are never given again, across a restart too.
    let out = c.cli(&["jobs", "prune", "--before", &(now_ms() + 3_600_000).to_string()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in the future"));
    Cluster::kill9(&mut c.controller);
    let (api, agents) = (c.api.trim_start_matches("http://").to_string(), c.agent_addr.clone());
    c.start_controller(&api, &agents);
    c.wait_agents(1);
    let one = jobs_file(c.dir.path(), "c.jsonl", &["echo three"]);
    let ids = c.json(&["jobs", "submit", one.to_str().unwrap(), "--json"]);
    assert_eq!(ids, serde_json::json!(["job-3"]), "a pruned job id was given again");
}

#[test]
fn a_controller_prunes_past_its_retention_by_itself() {
    // 0.00002 days is 1.7 s: passes run every second.
    let c = Cluster::start_with(1, 15_000, vec!["--retain-days".into(), "0.00002".into()], |_| Vec::new());
    let batch = jobs_file(c.dir.path(), "b.jsonl", &["echo one"]);
    assert!(c.cli(&["jobs", "submit", batch.to_str().unwrap(), "--wait"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.json(&["jobs", "list", "--json"]).as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the finished job was never pruned");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(c.dir.path().join("ctl.log")).unwrap();
    assert!(log.contains("(--retain-days)"), "the removal does not say why: {log}");
}

fn attempt_dirs(work: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(work.join("attempts"))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn an_agent_removes_delivered_attempts_after_their_retention() {
    let c = Cluster::start_with(1, 15_000, Vec::new(), |_| vec!["--attempt-retain-s".into(), "0".into()]);
    let batch = jobs_file(c.dir.path(), "b.jsonl", &["echo one > out.txt", "echo two"]);
    assert!(c.cli(&["jobs", "submit", batch.to_str().unwrap(), "--wait"]).status.success());
    let work = c.dir.path().join("agent-0");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !attempt_dirs(&work).is_empty() {
        assert!(Instant::now() < deadline, "delivered attempts stayed: {:?}", attempt_dirs(&work));
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(c.dir.path().join("agent-0.log")).unwrap();
    assert!(log.contains("removed a finished attempt's directory") && log.contains("--attempt-retain-s"), "{log}");
    // The controller still has what they produced: logs stay there.
    let out = c.cli(&["jobs", "logs", "job-2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("two"), "the job's logs went with its directory");
}

#[test]
fn a_low_work_disk_takes_delivered_attempts_early_but_never_a_running_one() {
    // A floor no disk meets: the disk is always "low".
    let c =
        Cluster::start_with(1, 15_000, Vec::new(), |_| vec!["--work-disk-free-min-gib".into(), "1000000000".into()]);
    let batch = jobs_file(c.dir.path(), "b.jsonl", &["sleep 30", "echo quick"]);
    assert!(c.cli(&["jobs", "submit", batch.to_str().unwrap()]).status.success());
    c.wait_until("the quick job done", Duration::from_secs(60), |s| s.iter().any(|s| s == "succeeded"));
    let work = c.dir.path().join("agent-0");
    let deadline = Instant::now() + Duration::from_secs(60);
    while attempt_dirs(&work).len() != 1 {
        assert!(Instant::now() < deadline, "the delivered attempt stayed: {:?}", attempt_dirs(&work));
        std::thread::sleep(Duration::from_millis(200));
    }
    let states = c.states();
    assert!(states.iter().any(|s| s == "running"), "{states:?}");
    let running = c.json(&["jobs", "show", "job-1", "--json"]);
    assert_eq!(running["state"], "running", "job-1 is the sleeper: {running}");
    assert_eq!(attempt_dirs(&work), ["att-1"], "the running attempt's directory went");
    let log = std::fs::read_to_string(c.dir.path().join("agent-0.log")).unwrap();
    assert!(log.contains("removed a finished attempt's directory early"), "{log}");
}

/// The newest .deb scripts/build-deb left in this build's target directory.
fn built_deb() -> PathBuf {
    let target = Path::new(BIN).parent().and_then(Path::parent).unwrap();
    let dir = target.join("debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "deb")).collect())
        .unwrap_or_default();
    debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop()
        .unwrap_or_else(|| panic!("no .deb in {}: run scripts/build-deb first (scripts/test does)", dir.display()))
}

/// A container of `cosmos-debian:dev`, removed when dropped.
struct Container(String);

impl Container {
    fn exec(&self, script: &str) -> (bool, String) {
        let out = Command::new("docker").args(["exec", &self.0, "sh", "-c", script]).output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

#[test]
fn the_deb_installs_on_a_clean_debian_and_its_units_run_under_systemd() {
    const IMAGE: &str = "cosmos-debian:dev";
    let deb = built_deb();
    let docker = Command::new("docker").args(["image", "inspect", IMAGE]).output();
    assert!(
        docker.is_ok_and(|o| o.status.success()),
        "the image {IMAGE} is missing (or Docker is not running): run scripts/build-debian-image (scripts/setup does)"
    );
    let name = format!("cosmos-deb-{}", std::process::id());
    let deb_dir = deb.parent().unwrap().display().to_string();
    // systemd as PID 1 wants its own /run and the cgroup hierarchy.
    let out = Command::new("docker")
        .args(["run", "-d", "--name", &name, "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp"])
        .args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "-v", &format!("{deb_dir}:/deb:ro"), IMAGE])
        .output()
        .unwrap();
    assert!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));
    let c = Container(name);
    let deb_in = format!("/deb/{}", deb.file_name().unwrap().to_string_lossy());
    assert!(c.exec("! command -v cosmos").0, "the image is not clean: it has cosmos already");

    let (ok, text) = c.exec(&format!(
        "set -e; echo \"depends: $(dpkg-deb -f {deb_in} Depends)\"; dpkg -i {deb_in}; cosmos version; id -un cosmos; \
         stat -c '%n %U:%G %a' /etc/cosmos /etc/cosmos/controller.toml /etc/cosmos/agent.toml /var/lib/cosmos-controller /var/lib/cosmos-agent; \
         ls /usr/share/man/man1/cosmos.1.gz /usr/share/man/man1/cosmos-controller.1.gz /usr/share/man/man1/cosmos-agent.1.gz \
            /usr/share/bash-completion/completions/cosmos /usr/share/zsh/vendor-completions/_cosmos /usr/share/fish/vendor_completions.d/cosmos.fish; \
         systemd-analyze verify --man=no /lib/systemd/system/cosmos-controller.service /lib/systemd/system/cosmos-agent.service; \
         echo verified; cosmos config check /etc/cosmos/controller.toml"
    ));
    assert!(ok, "installing the package failed:\n{text}");
    assert!(text.contains(&format!("cosmos {}", env!("CARGO_PKG_VERSION"))), "{text}");
    // The glibc build (its agent loads NVML), with the C library it needs as a dependency.
    let depends = text.lines().find_map(|l| l.strip_prefix("depends: ")).unwrap_or_default();
    assert!(depends.contains("libc6 (>=") && depends.contains("passwd"), "{text}");
    for line in [
        "/etc/cosmos root:cosmos 750",
        "/etc/cosmos/controller.toml root:cosmos 640",
        "/etc/cosmos/agent.toml root:cosmos 640",
        "/var/lib/cosmos-controller cosmos:cosmos 700",
        "/var/lib/cosmos-agent cosmos:cosmos 750",
    ] {
        assert!(text.lines().any(|l| l == line), "expected `{line}`:\n{text}");
    }
    let verified = text.split("verified").next().unwrap();
    assert!(!verified.contains("cosmos-controller.service:") && !verified.contains("cosmos-agent.service:"), "{text}");

    // Under systemd: the controller as shipped; the agent dialing it, with simulated GPUs.
    let (ok, text) = c.exec(
        "set -e; systemctl start cosmos-controller; \
         install -o cosmos -g cosmos -m 0600 /var/lib/cosmos-controller/agent.token /etc/cosmos/agent.token; \
         printf 'controller = \"127.0.0.1:7701\"\\ntoken_file = \"/etc/cosmos/agent.token\"\\nwork_dir = \"/var/lib/cosmos-agent\"\\nsimulated_gpus = \"2x24GiB\"\\nname = \"h1\"\\n' > /etc/cosmos/agent.toml; \
         systemctl start cosmos-agent; \
         export COSMOS_CONTROLLER=http://127.0.0.1:7700 COSMOS_DATA_DIR=/var/lib/cosmos-controller; \
         printf '{\"name\":\"s\",\"command\":[\"sh\",\"-c\",\"sleep 4; id -un\"]}\\n' > /tmp/b.jsonl; \
         cosmos jobs submit /tmp/b.jsonl; \
         for i in $(seq 100); do cosmos jobs list | grep -q running && break; sleep 0.1; done; \
         systemctl restart cosmos-agent; cosmos jobs wait job-1; cosmos jobs show job-1; cosmos jobs logs job-1; \
         for i in $(seq 100); do systemctl show -p StatusText cosmos-controller | grep -q '0 jobs running, 0 queued; 1 of 1 agents' && \
            systemctl show -p StatusText cosmos-agent | grep -q '0 attempts running' && break; sleep 0.2; done; \
         systemctl show -p ActiveState -p StatusText cosmos-controller cosmos-agent",
    );
    assert!(ok, "the units did not run the job:\n{text}");
    assert!(text.contains("attempts 1"), "the job did not survive the agent's restart once: {text}");
    assert!(text.lines().any(|l| l == "cosmos"), "the job did not run as the cosmos user: {text}");
    assert!(text.contains("StatusText=0 jobs running, 0 queued; 1 of 1 agents connected"), "{text}");
    assert!(text.contains("StatusText=connected to the controller 127.0.0.1:7701; 0 attempts running"), "{text}");
    assert_eq!(text.matches("ActiveState=active").count(), 2, "{text}");
    // SIGTERM through systemd: the controller stops cleanly.
    let (ok, text) =
        c.exec("systemctl stop cosmos-controller; systemctl show -p Result -p ExecMainStatus cosmos-controller");
    assert!(ok && text.contains("Result=success") && text.contains("ExecMainStatus=0"), "{text}");
}
