//! A cluster on Docker: the controller and three agents each in their own
//! container on a private network; agents start the jobs as sibling containers
//! through the mounted Docker socket. Mid-batch one agent's container is killed
//! and another is cut off the network, then both come back. Every run must
//! succeed exactly once, and no job container may be left on the engine.
//!
//! It runs twice: with agents that dial the controller over TCP, and with
//! agents in containers that run sshd (`cosmos-host:dev`, the `cosmos` under
//! test mounted in) and listen on a Unix socket, which the controller reaches
//! only through SSH (`cosmos agents add ssh://root@AGENT`).
//!
//! Needs Docker and the images `cosmos-debian:dev`, `cosmos-testjob:dev` and
//! `cosmos-host:dev` (`scripts/build-debian-image`, `scripts/build-images`,
//! `scripts/build-host-image`; `scripts/setup` runs them). It builds
//! `cosmos:dev` itself: `cosmos-debian:dev` with the binary under test in it.
//! Missing any of them fails the test: it does not skip.

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

/// How the controller and its agents find each other.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Link {
    /// The agents dial the controller's agent port.
    Tcp,
    /// The controller reaches each agent through the sshd of its container.
    Ssh,
}

/// Removes everything the test created, however it ends.
struct Env {
    tag: String,
    dir: tempfile::TempDir,
    link: Link,
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
        let name = self.name(&format!("agent-{i}"));
        let token = self.path("ctl/agent.token");
        let mut args: Vec<String> =
            ["run", "-d", "--name", &name, "--network", &self.tag].into_iter().map(String::from).collect();
        args.extend(
            ["-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", &format!("{dir}:{dir}")].map(String::from),
        );
        let agent_flags = ["--token-file", &token, "--work-dir", &work, "--simulated-gpus", "4x80GiB", "--name", &name];
        let agent_flags = agent_flags.iter().chain(&["--runtime", "docker"]).map(|s| s.to_string());
        match self.link {
            Link::Tcp => {
                args.extend(["cosmos:dev", "agent", "--controller"].map(String::from));
                args.push(format!("{}:7701", self.name("ctl")));
                args.extend(agent_flags);
            }
            Link::Ssh => {
                // sshd lets in the test's key as root; the agent waits on its socket. The host key
                // is made once, so a restarted container presents the one the controller learned.
                let flags: Vec<String> = agent_flags.collect();
                let script = format!(
                    "set -e\n\
                     [ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key\n\
                     printf 'HostKey /etc/ssh/ssh_host_ed25519_key\\nUsePAM no\\nPasswordAuthentication no\\n\
                     PermitRootLogin prohibit-password\\nAllowStreamLocalForwarding yes\\nAllowTcpForwarding yes\\n' > /etc/ssh/sshd_config\n\
                     mkdir -p /root/.ssh /run/sshd\n\
                     cp {dir}/id_ed25519.pub /root/.ssh/authorized_keys\n\
                     /usr/sbin/sshd -E {dir}/sshd-{i}.log\n\
                     exec /usr/local/bin/cosmos agent --listen unix:/run/cosmos/agent.sock {}",
                    flags.join(" ")
                );
                args.extend(["-v", &format!("{BIN}:/usr/local/bin/cosmos:ro")].map(String::from));
                args.extend(["cosmos-host:dev", "sh", "-c", &script].map(String::from));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&args);
    }
}

/// Builds `cosmos:dev`, the image the controller and the TCP agents run: a
/// clean Debian of this machine's packages (glibc, as the build links) with
/// the binary under test as its entrypoint. Once per test process; skipped
/// when the image already holds these bytes (its label is their sha256).
fn cosmos_image() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let bytes = std::fs::read(BIN).unwrap();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let label = docker(&[
            "image",
            "inspect",
            "--format",
            "{{ index .Config.Labels \"cosmos.binary.sha256\" }}",
            "cosmos:dev",
        ]);
        if String::from_utf8_lossy(&label.stdout).trim() == sha {
            return;
        }
        let old = docker(&["image", "inspect", "--format", "{{.Id}}", "cosmos:dev"]);
        let ctx = tempfile::tempdir().unwrap();
        std::fs::copy(BIN, ctx.path().join("cosmos")).unwrap();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!(
                "FROM cosmos-debian:dev\nCOPY cosmos /usr/local/bin/cosmos\nLABEL cosmos.binary.sha256={sha}\n\
                 ENTRYPOINT [\"/usr/local/bin/cosmos\"]\n"
            ),
        )
        .unwrap();
        let out = Command::new("docker")
            .args(["build", "-q", "-t", "cosmos:dev"])
            .arg(ctx.path())
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .expect("the docker CLI runs");
        assert!(
            out.status.success(),
            "building cosmos:dev on cosmos-debian:dev (scripts/build-debian-image builds that): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The image it replaces would otherwise stay behind, untagged, at every rebuild.
        let old = String::from_utf8_lossy(&old.stdout).trim().to_string();
        if !old.is_empty() {
            let _ = docker(&["image", "rm", &old]);
        }
    });
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
    batch_survives_a_killed_and_a_partitioned_agent(Link::Tcp);
}

#[test]
fn a_batch_on_a_docker_cluster_over_ssh_survives_a_killed_and_a_partitioned_agent() {
    batch_survives_a_killed_and_a_partitioned_agent(Link::Ssh);
}

fn batch_survives_a_killed_and_a_partitioned_agent(link: Link) {
    let mut images = vec!["cosmos-debian:dev", "cosmos-testjob:dev"];
    if link == Link::Ssh {
        images.push("cosmos-host:dev");
    }
    for image in images {
        let out = docker(&["image", "inspect", image]);
        assert!(
            out.status.success(),
            "image {image} is missing (or Docker is not running): run scripts/build-debian-image, scripts/build-images and scripts/build-host-image"
        );
    }
    cosmos_image();
    let kind = if link == Link::Ssh { "ssh" } else { "tcp" };
    let env = Env { tag: format!("cosmos-mh-{kind}-{}", std::process::id()), dir: tempfile::tempdir().unwrap(), link };
    docker_ok(&["network", "create", &env.tag]);
    let dir = env.dir.path().to_string_lossy().into_owned();
    let mut controller: Vec<String> =
        ["run", "-d", "--name", &env.name("ctl"), "--network", &env.tag].into_iter().map(String::from).collect();
    controller
        .extend(["-v", &format!("{dir}:{dir}"), "-p", "127.0.0.1::7700", "cosmos:dev", "controller"].map(String::from));
    controller.extend(["--data-dir", &env.path("ctl"), "--api-listen", "0.0.0.0:7700"].map(String::from));
    controller.extend(["--agent-listen", "0.0.0.0:7701", "--lost-after-ms", "5000"].map(String::from));
    if link == Link::Ssh {
        let keygen = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f", &env.path("id_ed25519")])
            .output()
            .expect("ssh-keygen runs (Debian's openssh-client; scripts/setup installs it)");
        assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
        std::fs::write(env.path("empty_ssh_config"), "").unwrap();
        controller.extend(
            ["--known-hosts", &env.path("known_hosts"), "--ssh-config", &env.path("empty_ssh_config")]
                .map(String::from),
        );
        // A host that stops answering is noticed in about 3 s.
        controller.extend(["--ssh-keepalive-interval-ms", "1000"].map(String::from));
    }
    let controller: Vec<&str> = controller.iter().map(String::as_str).collect();
    docker_ok(&controller);
    let api = format!("http://{}", docker_ok(&["port", &env.name("ctl"), "7700/tcp"]).lines().next().unwrap());
    wait_for("the controller's token", Duration::from_secs(30), || env.dir.path().join("ctl/api.token").exists());
    for i in 0..AGENTS {
        env.start_agent(i);
    }
    if link == Link::Ssh {
        // Registered by container name: the controller's container resolves it on the network.
        for i in 0..AGENTS {
            let url = format!("ssh://root@{}", env.name(&format!("agent-{i}")));
            let key = env.path("id_ed25519");
            let out = cli(&api, &env, &["agents", "add", &url, "--identity", &key, "--accept-new-host-key"]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    wait_for("three agents", Duration::from_secs(60), || {
        let out = cli(&api, &env, &["agents", "list", "--json"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v.as_array().unwrap().iter().filter(|a| a["connected"] == true).count() == AGENTS)
    });
    if link == Link::Ssh {
        // Each agent came through the link of its registered host (these agents dial nothing).
        let hosts = cli(&api, &env, &["agents", "hosts", "--json"]);
        let hosts: Value = serde_json::from_slice(&hosts.stdout).unwrap();
        assert!(hosts.as_array().unwrap().iter().all(|h| h["state"] == "connected"), "{hosts}");
    }

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

    if link == Link::Ssh {
        // The killed and the cut-off hosts are linked again, through SSH, by the controller's redials.
        wait_for("every host linked again over SSH", Duration::from_secs(60), || {
            let out = cli(&api, &env, &["agents", "hosts", "--json"]);
            serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| {
                let hosts = v.as_array().unwrap();
                hosts.len() == AGENTS && hosts.iter().all(|h| h["state"] == "connected")
            })
        });
    }
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
