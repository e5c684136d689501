//! A batch whose jobs run on an agent the controller reaches only through
//! SSH: a real OpenSSH sshd on a loopback high port, the agent listening on a
//! Unix socket behind it (`cosmos agent --listen unix:…`), the host
//! registered with `cosmos agents add ssh://…`; 1 GiB goes each way through
//! the channel (an input staged, an output delivered). Then the link survives an
//! sshd stopped with SIGSTOP (keepalive notices, the controller redials
//! after SIGCONT) and a controller restart (the registry is stored).
//!
//! Needs Debian's openssh-server and openssh-client (`scripts/setup`).

use super::*;

fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists()).unwrap_or_else(|| {
        panic!("{name} is not installed: this test needs Debian's openssh-server and openssh-client (scripts/setup installs them)")
    })
}

/// `size_bytes` of a pattern that does not repeat within a chunk, written in
/// pieces; returns the digest of the pattern followed by `suffix`.
fn write_pattern(path: &Path, size_bytes: u64, suffix: &[u8]) -> String {
    use sha2::Digest;
    use std::io::Write;
    let mut with_suffix = sha2::Sha256::new();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..size_bytes / block.len() as u64 {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
        with_suffix.update(&block);
    }
    f.flush().unwrap();
    with_suffix.update(suffix);
    hex::encode(with_suffix.finalize())
}

fn keygen(path: &Path) {
    let out =
        Command::new(tool("ssh-keygen")).args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// sshd and the processes it forked (each connection's session).
fn sshd_processes(root: u32) -> Vec<i32> {
    let mut pids = vec![root as i32];
    let mut i = 0;
    while i < pids.len() {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(pids[i]) && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        i += 1;
    }
    pids
}

fn signal(pids: &[i32], sig: i32) {
    for &p in pids {
        // SAFETY: kill(2) on processes this test started.
        unsafe { libc::kill(p, sig) };
    }
}

fn host_state(c: &Cluster) -> String {
    let hosts = c.json(&["agents", "hosts", "--json"]);
    hosts[0]["state"].as_str().unwrap_or_default().to_string()
}

fn wait_host(c: &Cluster, what: &str, mut ok: impl FnMut(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = host_state(c);
        if ok(&state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the host never became {what} (is {state}); logs in {}",
            c.dir.path().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_batch_runs_on_an_agent_reached_only_through_ssh() {
    let ssh = tempfile::tempdir().unwrap();
    let d = ssh.path();
    keygen(&d.join("host_key"));
    keygen(&d.join("id_ed25519"));
    std::fs::copy(d.join("id_ed25519.pub"), d.join("authorized_keys")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "ListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nUsePAM no\nStrictModes no\n\
             PasswordAuthentication no\nAllowStreamLocalForwarding yes\nAllowTcpForwarding yes\n",
            d.join("host_key").display(),
            d.join("authorized_keys").display()
        ),
    )
    .unwrap();
    let sshd = Proc(
        Command::new(tool("sshd"))
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .args(["-p", &port.to_string()])
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "sshd did not start: {}",
            std::fs::read_to_string(d.join("sshd.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(d.join("empty_config"), "").unwrap();
    let controller_args = vec![
        "--known-hosts".to_string(),
        d.join("known_hosts").display().to_string(),
        "--ssh-config".into(),
        d.join("empty_config").display().to_string(),
        "--ssh-keepalive-interval-ms".into(),
        "300".into(),
    ];
    // No agent dials in: the controller's agent port is never used.
    let mut c = Cluster::start_with(0, 5_000, controller_args, |_| Vec::new());
    let socket = c.dir.path().join("agent.sock");
    let agent_log = std::fs::File::create(c.dir.path().join("agent-ssh.log")).unwrap();
    let _agent = Proc(
        Command::new(BIN)
            .args(["agent", "--listen", &format!("unix:{}", socket.display()), "--token-file"])
            .arg(c.data().join("agent.token"))
            .arg("--work-dir")
            .arg(c.dir.path().join("agent-ssh"))
            .args(["--simulated-gpus", "2x80GiB", "--name", "ssh-host"])
            .stdout(agent_log.try_clone().unwrap())
            .stderr(agent_log)
            .spawn()
            .unwrap(),
    );

    // Strict by default: the unknown host is refused, saying how to trust it.
    let url = format!("ssh://root@127.0.0.1:{port}");
    let key = d.join("id_ed25519").display().to_string();
    let add = |extra: &[&str]| {
        let mut args = vec!["agents", "add", url.as_str(), "--identity", key.as_str()];
        args.extend(["--socket", socket.to_str().unwrap()]);
        args.extend(extra);
        let out = c.cli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    add(&[]);
    wait_host(&c, "refused", |_| {
        let hosts = c.json(&["agents", "hosts", "--json"]);
        hosts[0]["error"].as_str().is_some_and(|e| e.contains("not in") && e.contains("ssh-keyscan -p"))
    });
    // accept-new learns it, and the agent comes up through the channel.
    add(&["--accept-new-host-key"]);
    c.wait_agents(1);
    assert_eq!(host_state(&c), "connected");
    assert!(
        std::fs::read_to_string(d.join("known_hosts")).unwrap().contains(&format!("[127.0.0.1]:{port} ssh-ed25519"))
    );

    let record = c.dir.path().join("record.txt");
    let marker = format!("cosmos-e2e-ssh-{}", std::process::id());
    let batch = write_batch(c.dir.path(), 6, &record, &marker);
    let out = c.cli(&["jobs", "submit", batch.to_str().unwrap(), "--wait", "--json"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(c.states().iter().all(|s| s == "succeeded"), "{:?}", c.states());
    assert_eq!(runs(&record).len(), 6);

    // 1 GiB each way through the channel: staged in as an input, delivered back as an output.
    let size_bytes: u64 = 1 << 30;
    let input = c.dir.path().join("gib.bin");
    let out_sha = write_pattern(&input, size_bytes, b"tail\n");
    let store = cosmos_controller::blobs::Store::open(c.data().join("blobs")).unwrap();
    let (sha, _) = store.put_reader(std::fs::File::open(&input).unwrap(), None).unwrap();
    std::fs::remove_file(&input).unwrap();
    let line = serde_json::json!({
        "name": "gib",
        "command": ["sh", "-c", "{ cat inputs/x.bin; echo tail; } > out.bin"],
        "inputs": [{ "sha256": sha.to_string(), "size_bytes": size_bytes, "path": "inputs/x.bin" }],
        "outputs": [{ "path": "out.bin", "required": true }],
        "max_attempts": 1,
    });
    let gib = c.dir.path().join("gib.jsonl");
    std::fs::write(&gib, format!("{line}\n")).unwrap();
    let t0 = Instant::now();
    let out = c.cli(&["jobs", "submit", gib.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("1 GiB in and 1 GiB out through SSH in {:.1} s", t0.elapsed().as_secs_f64());
    let out_sha: cosmos_proto::Sha256 = out_sha.parse().unwrap();
    assert_eq!(store.size(&out_sha), Some(size_bytes + 5), "the output is in the controller's store");
    assert!(store.verify(&out_sha).unwrap(), "the stored output matches its digest");

    // sshd stopped: the controller's keepalives go unanswered and it drops the link; after SIGCONT it redials.
    let stopped = sshd_processes(sshd.0.id());
    signal(&stopped, libc::SIGSTOP);
    wait_host(&c, "dropped", |s| s != "connected");
    signal(&stopped, libc::SIGCONT);
    wait_host(&c, "connected again", |s| s == "connected");

    // The registry is stored: a restarted controller links to the host again by itself.
    Cluster::kill9(&mut c.controller);
    let (api, agents) = (c.api.trim_start_matches("http://").to_string(), c.agent_addr.clone());
    c.start_controller(&api, &agents);
    c.wait_agents(1);
    assert_eq!(host_state(&c), "connected");

    // Removed: the link closes and the agent goes.
    let out = c.cli(&["agents", "remove", "127.0.0.1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agents = c.json(&["agents", "list", "--json"]);
        if agents.as_array().unwrap().iter().all(|a| a["connected"] != true) {
            break;
        }
        assert!(Instant::now() < deadline, "the removed host's agent stays connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(sshd);
}
