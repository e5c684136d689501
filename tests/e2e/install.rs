//! `cosmos agent install` and `uninstall` against a real host: a container of
//! `cosmos-host:dev` (scripts/build-host-image) booting a real systemd as PID
//! 1, with OpenSSH's sshd and sudo, on a Docker network of its own. The
//! installer reaches it only through SSH; the test reads the host's state
//! with `docker exec` (what an operator would see there).
//!
//! Installs this checkout's build of `cosmos`; needs Docker and the image, and
//! fails saying which is missing.

use super::*;

const IMAGE: &str = "cosmos-host:dev";
const SUDO_PASSWORD: &str = "cosmos-sudo-pw";

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("the docker CLI runs (Docker is needed by the install tests)")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The binary hosts get: this checkout's build (glibc, as the agent must be to load NVML;
/// the host image is this machine's packages, so its glibc is as new as the build's).
fn host_binary() -> PathBuf {
    PathBuf::from(BIN)
}

/// A host in a container on a network of its own, removed with the test.
struct TestHost {
    name: String,
    ip: String,
    keys: tempfile::TempDir,
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
        let _ = docker(&["network", "rm", &self.name]);
    }
}

impl TestHost {
    /// Boots the image's systemd (or, with `systemd` false, a host whose PID 1 is `sleep`), with sshd
    /// letting in root, `ops` (passwordless sudo) and `pw` (sudo asks for a password).
    fn start(label: &str, systemd: bool) -> TestHost {
        let out = docker(&["image", "inspect", IMAGE]);
        assert!(
            out.status.success(),
            "image {IMAGE} is missing (or Docker is not running): run scripts/build-host-image (scripts/setup does)"
        );
        let name = format!("cosmos-install-{}-{label}", std::process::id());
        let keys = tempfile::tempdir().unwrap();
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(keys.path().join("id_ed25519"))
            .output()
            .expect("ssh-keygen runs (Debian's openssh-client; scripts/setup installs it)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let _ = docker(&["rm", "-f", &name]);
        let _ = docker(&["network", "rm", &name]);
        docker_ok(&["network", "create", &name]);
        let mut run = vec!["run", "-d", "--name", &name, "--hostname", label, "--network", &name];
        // systemd as PID 1 wants its own /run and the cgroup hierarchy.
        run.extend(["--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp"]);
        run.extend(["-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", IMAGE]);
        if !systemd {
            run.extend(["/bin/sleep", "infinity"]);
        }
        docker_ok(&run);
        let host = TestHost {
            ip: docker_ok(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &name]),
            name,
            keys,
        };
        let start_sshd = if systemd {
            // Booted far enough to start units (degraded is fine: a container lacks some).
            "i=0; while [ ! -S /run/systemd/private ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n\
             systemctl is-system-running --wait >/dev/null || true\nsystemctl restart ssh"
        } else {
            "mkdir -p /run/sshd && /usr/sbin/sshd"
        };
        let setup = format!(
            "set -e\n\
             ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key\n\
             printf 'HostKey /etc/ssh/ssh_host_ed25519_key\\nUsePAM no\\nPasswordAuthentication no\\n\
             PermitRootLogin prohibit-password\\nAllowStreamLocalForwarding yes\\nAllowTcpForwarding yes\\n\
             Subsystem sftp /usr/lib/openssh/sftp-server\\n' > /etc/ssh/sshd_config\n\
             mkdir -p /root/.ssh && cat > /root/.ssh/authorized_keys\n\
             for u in ops pw; do\n\
               useradd -m -s /bin/sh $u\n\
               mkdir -p /home/$u/.ssh && cp /root/.ssh/authorized_keys /home/$u/.ssh/ && chown -R $u: /home/$u/.ssh\n\
             done\n\
             usermod -p '*' ops\n\
             echo 'pw:{SUDO_PASSWORD}' | chpasswd\n\
             echo 'ops ALL=(root) NOPASSWD: ALL' > /etc/sudoers.d/ops\n\
             echo 'pw ALL=(ALL) ALL' > /etc/sudoers.d/pw\n\
             {start_sshd}\n"
        );
        let mut child = Command::new("docker")
            .args(["exec", "-i", &host.name, "sh", "-c", &setup])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&std::fs::read(host.key().with_extension("pub")).unwrap()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "setting up the host failed: {}", String::from_utf8_lossy(&out.stderr));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((host.ip.as_str(), 22)).is_err() {
            assert!(Instant::now() < deadline, "sshd in {} did not listen on {}:22", host.name, host.ip);
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    fn key(&self) -> PathBuf {
        self.keys.path().join("id_ed25519")
    }

    fn url(&self, user: &str) -> String {
        format!("ssh://{user}@{}", self.ip)
    }

    /// A shell command's stdout on the host, as root.
    fn sh(&self, script: &str) -> String {
        docker_ok(&["exec", &self.name, "sh", "-c", script])
    }

    /// The agent service's main pid and its restarts, and the installed binary's inode.
    fn agent_facts(&self) -> (String, String, String) {
        let show = |p: &str| self.sh(&format!("systemctl show -p {p} --value cosmos-agent"));
        (show("MainPID"), show("NRestarts"), self.sh("stat -c %i /usr/local/bin/cosmos"))
    }
}

/// `cosmos agent install` or `uninstall` with the test's key and known_hosts, against `c`'s controller.
fn manage(c: &Cluster, host: &TestHost, verb: &str, user: &str, extra: &[&str], stdin: &str) -> (bool, String, String) {
    let known_hosts = c.dir.path().join("known_hosts");
    let empty = c.dir.path().join("empty_ssh_config");
    std::fs::write(&empty, "").unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["agent", verb, &host.url(user), "--identity"])
        .arg(host.key())
        .arg("--known-hosts")
        .arg(&known_hosts)
        .arg("--ssh-config")
        .arg(&empty)
        .arg("--accept-new-host-key")
        .args(extra)
        .env("COSMOS_CONTROLLER", &c.api)
        .env("COSMOS_DATA_DIR", c.data())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    println!("--- cosmos agent {verb} {} {extra:?}:\n{stdout}{stderr}", host.url(user));
    (out.status.success(), stdout, stderr)
}

fn controller_for_ssh() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("known_hosts");
    let empty = dir.path().join("empty_ssh_config");
    std::fs::write(&empty, "").unwrap();
    let args = vec![
        "--known-hosts".to_string(),
        known_hosts.display().to_string(),
        "--ssh-config".into(),
        empty.display().to_string(),
    ];
    Cluster::start_in(dir, 0, 5_000, args, Vec::new(), |_| Vec::new())
}

fn hosts(c: &Cluster) -> Vec<Value> {
    c.json(&["agents", "hosts", "--json"]).as_array().unwrap().clone()
}

#[test]
fn install_twice_changes_nothing_the_second_time_and_uninstall_removes_it() {
    let binary_path = host_binary();
    let host = TestHost::start("gpu-a", true);
    let c = controller_for_ssh();
    let binary = ["--binary", binary_path.to_str().unwrap()];
    let flags = |gpus: &'static str| -> Vec<&str> {
        [&binary[..], &["--", "--simulated-gpus", gpus, "--name", "gpu-a"]].concat()
    };

    // First install, as a user with passwordless sudo: everything is new.
    let (ok, out, err) = manage(&c, &host, "install", "ops", &flags("2x80GiB"), "");
    assert!(ok, "{out}{err}");
    for says in [
        "preflight ok: x86_64, systemd, as ops with sudo",
        "binary: uploaded",
        "verified on the host",
        "token: wrote /etc/cosmos/agent.token",
        "settings: wrote /etc/cosmos/agent.toml",
        "config: wrote /etc/cosmos/agent.env",
        "unit: wrote /etc/systemd/system/cosmos-agent.service",
        "created the group cosmos",
        "created the system user cosmos (the agent runs as it)",
        "added ops to the group cosmos",
        "systemd: daemon-reload",
        "service: enabled",
        "service: started",
        "healthy: agent `gpu-a` answered the controller's handshake over SSH",
        "the controller is linked to its agent",
    ] {
        assert!(out.contains(says), "the first install should say `{says}`:\n{out}");
    }
    // The host holds what was sent: the same binary, a private token, the unit of deploy/.
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(&binary_path).unwrap()));
    assert_eq!(host.sh("sha256sum < /usr/local/bin/cosmos | cut -d' ' -f1"), sha);
    // The agent runs as cosmos (the unit's User=), which must own its token: it refuses one others can read.
    assert_eq!(host.sh("stat -c '%a %U' /etc/cosmos/agent.token"), "600 cosmos");
    assert_eq!(host.sh("stat -c %U /proc/$(systemctl show -p MainPID --value cosmos-agent)"), "cosmos");
    let deploy =
        |f: &str| std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(f)).unwrap();
    assert_eq!(host.sh("cat /etc/systemd/system/cosmos-agent.service"), deploy("cosmos-agent.service").trim_end());
    assert_eq!(host.sh("cat /etc/cosmos/agent.toml"), deploy("agent.toml").trim_end());
    assert_eq!(host.sh("systemctl is-enabled cosmos-agent"), "enabled");
    assert_eq!(host.sh("ls -A /home/ops/.cosmos-install 2>/dev/null | wc -l"), "0", "the uploads are cleaned up");
    c.wait_agents(1);
    let agents = c.json(&["agents", "list", "--json"]);
    assert_eq!(agents[0]["name"], "gpu-a");
    assert_eq!(agents[0]["gpus"].as_array().unwrap().len(), 2);
    // Jobs run there.
    let batch = c.dir.path().join("batch.jsonl");
    std::fs::write(&batch, "{\"name\": \"a\", \"command\": [\"sh\", \"-c\", \"echo on-$(uname -n)\"]}\n").unwrap();
    let out = c.cli(&["jobs", "submit", batch.to_str().unwrap(), "--wait", "--json"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let logs = c.cli(&["jobs", "logs", "job-1"]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("on-gpu-a"), "{logs:?}");
    let before = host.agent_facts();

    // Second install, the same: no upload, no reload, no restart — in its output and on the host.
    let (ok, out, err) = manage(&c, &host, "install", "ops", &flags("2x80GiB"), "");
    assert!(ok, "{out}{err}");
    for says in [
        "binary: /usr/local/bin/cosmos is up to date",
        "not uploaded",
        "token: /etc/cosmos/agent.token unchanged",
        "settings: /etc/cosmos/agent.toml unchanged",
        "config: /etc/cosmos/agent.env unchanged",
        "unit: /etc/systemd/system/cosmos-agent.service unchanged",
        "is running; not restarted (nothing changed)",
        "healthy: the agent answered the handshake over SSH",
        "the controller is linked to its agent",
    ] {
        assert!(out.contains(says), "the second install should say `{says}`:\n{out}");
    }
    for never in
        ["binary: uploaded", "wrote", "daemon-reload", "service: restarted", "service: started", "created", "added"]
    {
        assert!(!out.contains(never), "the second install changed something (`{never}`):\n{out}");
    }
    assert_eq!(host.agent_facts(), before, "(main pid, restarts, binary inode) changed on the host");
    assert_eq!(hosts(&c)[0]["state"], "connected");

    // Another agent flag: the config changes, so the agent restarts; the unit and binary stay.
    let (ok, out, err) = manage(&c, &host, "install", "ops", &flags("4x80GiB"), "");
    assert!(ok, "{out}{err}");
    assert!(out.contains("config: wrote") && out.contains("restarted cosmos-agent.service"), "{out}");
    assert!(out.contains("not uploaded") && !out.contains("daemon-reload"), "{out}");
    let after = host.agent_facts();
    assert_ne!(after.0, before.0, "the agent was restarted");
    assert_eq!(after.2, before.2, "the binary was left alone");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let agents = c.json(&["agents", "list", "--json"]);
        if agents[0]["connected"] == true && agents[0]["gpus"].as_array().unwrap().len() == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted agent never came back with 4 GPUs: {agents}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A user whose sudo asks for a password: refused before anything is written, saying what to do.
    let (ok, out, err) = manage(&c, &host, "install", "pw", &flags("4x80GiB"), "");
    assert!(!ok, "{out}{err}");
    let ip = &host.ip;
    assert!(
        err.contains(&format!("sudo asks for a password on {ip}"))
            && err.contains("give pw NOPASSWD")
            && err.contains("--sudo-password-stdin"),
        "{err}"
    );
    assert!(!out.contains("binary:"), "{out}");
    assert_eq!(host.sh("test -e /home/pw/.cosmos-install && echo staged || echo clean"), "clean");
    // With the password on stdin it goes through sudo -S; nothing needs changing but pw's group.
    let stdin = format!("{SUDO_PASSWORD}\n");
    let (ok, out, err) =
        manage(&c, &host, "install", "pw", &[&["--sudo-password-stdin"][..], &flags("4x80GiB")].concat(), &stdin);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("as pw with sudo (password from stdin)") && out.contains("added pw to the group cosmos"),
        "{out}"
    );
    assert!(out.contains("not uploaded") && out.contains("not restarted"), "{out}");
    let wrong = "not-the-password\n";
    let (ok, _, err) =
        manage(&c, &host, "install", "pw", &[&["--sudo-password-stdin"][..], &flags("4x80GiB")].concat(), wrong);
    assert!(!ok && err.contains("sudo refused the password given on stdin"), "{err}");

    // Uninstall: unregistered, stopped, disabled, removed — but for a config file the operator edited.
    host.sh("echo '# name = \"gpu-a\"' >> /etc/cosmos/agent.toml");
    let (ok, out, err) = manage(&c, &host, "uninstall", "ops", &[], "");
    assert!(ok, "{out}{err}");
    assert!(out.contains("unregistered from the controller") && out.contains("stopped and disabled"), "{out}");
    assert!(out.contains("kept /etc/cosmos/agent.toml: it was edited on the host"), "{out}");
    assert!(hosts(&c).is_empty(), "{:?}", hosts(&c));
    assert_eq!(
        host.sh("systemctl is-active cosmos-agent; for f in /usr/local/bin/cosmos /etc/cosmos/agent.token /etc/cosmos/agent.env /etc/systemd/system/cosmos-agent.service; do test -e $f && echo $f; done; true"),
        "inactive"
    );
    assert_eq!(host.sh("ls /etc/cosmos"), "agent.toml");
    assert_eq!(host.sh("pgrep -c -x cosmos || true"), "0", "an agent process is left");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.json(&["agents", "list", "--json"])[0]["connected"] == true {
        assert!(Instant::now() < deadline, "the controller still holds a link to the uninstalled agent");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn install_refuses_a_host_without_systemd_before_touching_it() {
    let binary_path = host_binary();
    let host = TestHost::start("no-systemd", false);
    let c = controller_for_ssh();
    let (ok, out, err) = manage(&c, &host, "install", "root", &["--binary", binary_path.to_str().unwrap()], "");
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains(&format!("{} does not run systemd (PID 1 is `sleep`)", host.ip))
            && err.contains("cosmos agents add"),
        "{err}"
    );
    assert_eq!(host.sh("ls /usr/local/bin /root/.cosmos-install 2>/dev/null | grep -c cosmos || true"), "0");
    assert!(hosts(&c).is_empty());

    // An encrypted key: with no terminal the error says how to give its passphrase; at a
    // terminal (a pty from `script`) it is asked for, and then the login goes through.
    let passphrase = "open sesame";
    let out = Command::new("ssh-keygen").args(["-q", "-p", "-N", passphrase, "-f"]).arg(host.key()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let install = format!(
        "{BIN} agent install {} --identity {} --known-hosts {} --ssh-config /dev/null --accept-new-host-key --binary {}",
        host.url("root"),
        host.key().display(),
        c.dir.path().join("known_hosts").display(),
        binary_path.display()
    );
    // setsid: no controlling terminal, as under cron or CI.
    let out = Command::new("setsid")
        .args(["-w", "sh", "-c", &install])
        .env("COSMOS_CONTROLLER", &c.api)
        .env("COSMOS_DATA_DIR", c.data())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--identity-passphrase-file") && err.contains("at a terminal"),
        "{err}"
    );
    let mut typed = Command::new("script")
        .args(["-q", "-e", "-c", &install, "/dev/null"])
        .env("COSMOS_CONTROLLER", &c.api)
        .env("COSMOS_DATA_DIR", c.data())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    typed.stdin.take().unwrap().write_all(format!("{passphrase}\n").as_bytes()).unwrap();
    let out = typed.wait_with_output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("Enter passphrase for key"), "{all}");
    assert!(all.contains("does not run systemd"), "the typed passphrase opened the key: {all}");
}
