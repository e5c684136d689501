//! Two controllers on one PostgreSQL store (a throwaway server, `cosmos-pgtest`):
//! the leader killed mid-batch and the standby taking over, and a leader
//! paused past its lease that is fenced out when it wakes, and the server
//! itself restarted mid-batch.

use super::{BIN, Proc, runs, write_batch, write_token};
use cosmos_pgtest::Postgres;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A free loopback address for a controller to listen on (its standby must know it before it leads).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// One controller of the pair.
pub(crate) struct Ctl {
    pub(crate) proc: Option<Proc>,
    pub(crate) api: String,
    pub(crate) agents: String,
    pub(crate) name: String,
}

/// Two controllers (or more) sharing one PostgreSQL store and the same tokens, and agents given every address.
pub(crate) struct Pair {
    pub(crate) pg: Postgres,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) ctls: Vec<Ctl>,
    pub(crate) agents: Vec<Proc>,
    lease_ms: u64,
}

const TOKEN_API: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const TOKEN_AGENT: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

impl Pair {
    /// A store, and controllers named `names` (not started).
    pub(crate) fn new(names: &[&str], lease_ms: u64) -> Pair {
        let pg = Postgres::start();
        let dir = tempfile::tempdir().unwrap();
        let ctls = names
            .iter()
            .map(|n| {
                let data = dir.path().join(format!("ctl-{n}"));
                std::fs::create_dir_all(&data).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
                // Standbys serve the same clients and agents: the same tokens in every data directory.
                write_token(&data.join("api.token"), TOKEN_API);
                write_token(&data.join("agent.token"), TOKEN_AGENT);
                Ctl { proc: None, api: format!("http://{}", free_addr()), agents: free_addr(), name: n.to_string() }
            })
            .collect();
        Pair { pg, dir, ctls, agents: Vec::new(), lease_ms }
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("ctl-{}", self.ctls[i].name))
    }

    pub(crate) fn start(&mut self, i: usize) {
        let log = |ext: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(format!("ctl-{}.{ext}", self.ctls[i].name)))
                .unwrap()
        };
        let c = &self.ctls[i];
        let child = Command::new(BIN)
            .args(["controller", "--data-dir"])
            .arg(self.data(i))
            .args(["--store", &self.pg.url(), "--lease-ms", &self.lease_ms.to_string(), "--controller-id", &c.name])
            .args(["--api-listen", c.api.trim_start_matches("http://"), "--agent-listen", &c.agents])
            .args(["--lost-after-ms", "5000"])
            .stdout(log("out"))
            .stderr(log("log"))
            .spawn()
            .unwrap();
        self.ctls[i].proc = Some(Proc(child));
    }

    /// Every controller's API address, comma-separated, as the CLI takes them.
    pub(crate) fn apis(&self) -> String {
        self.ctls.iter().map(|c| c.api.clone()).collect::<Vec<_>>().join(",")
    }

    pub(crate) fn cli_at(&self, api: &str, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("COSMOS_CONTROLLER", api)
            .env("COSMOS_TOKEN", TOKEN_API)
            .env("COSMOS_RECONNECT_WAIT_S", "600")
            .output()
            .unwrap()
    }

    /// Waits until controller `i` answers its API as the leader.
    pub(crate) fn wait_leads(&self, i: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.cli_at(&self.ctls[i].api, &["status", "--json"]);
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{} never led; logs in {}",
                self.ctls[i].name,
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Controllers `a` and `b` with a lease of `lease_ms`, `a` leading, and `agents` agents
    /// connected; `a`'s first status.
    pub(crate) fn leading_with_agents(lease_ms: u64, agents: usize) -> (Pair, Value) {
        let mut p = Pair::new(&["a", "b"], lease_ms);
        p.start(0);
        let first = p.wait_leads(0);
        p.start(1);
        p.spawn_agents(agents);
        p.wait_agents(agents);
        (p, first)
    }

    pub(crate) fn spawn_agents(&mut self, n: usize) {
        let addrs = self.ctls.iter().map(|c| c.agents.clone()).collect::<Vec<_>>().join(",");
        for i in 0..n {
            let log = std::fs::File::create(self.dir.path().join(format!("agent-{i}.log"))).unwrap();
            let child = Command::new(BIN)
                .args(["agent", "--controller", &addrs, "--token-file"])
                .arg(self.data(0).join("agent.token"))
                .arg("--work-dir")
                .arg(self.dir.path().join(format!("agent-{i}")))
                .args(["--simulated-gpus", "8x80GiB", "--name", &format!("agent-{i}")])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            self.agents.push(Proc(child));
        }
    }

    pub(crate) fn wait_agents(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.cli_at(&self.apis(), &["agents", "list", "--json"]);
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

    pub(crate) fn states(&self) -> Vec<String> {
        let out = self.cli_at(&self.apis(), &["jobs", "list", "--all", "--json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap().to_string()).collect()
    }

    pub(crate) fn wait_until(&self, what: &str, mut done: impl FnMut(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if done(&self.states()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; logs in {}", self.dir.path().display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn signal(&self, i: usize, sig: i32) {
        let pid = self.ctls[i].proc.as_ref().expect("running").0.id() as i32;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, sig) };
    }

    pub(crate) fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("ctl-{}.log", self.ctls[i].name))).unwrap_or_default()
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn succeeded(s: &[String]) -> usize {
    s.iter().filter(|s| *s == "succeeded").count()
}

/// Submits `part` through the CLI, given every controller; the ids it acknowledged.
fn submit_part(p: &Pair, part: &Path) -> Vec<String> {
    let out = p.cli_at(&p.apis(), &["jobs", "submit", part.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "submitting {}: {}", part.display(), String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().expect("the ids submitted").iter().map(|id| id.as_str().unwrap().to_string()).collect()
}

/// Every job's id, as listed.
fn listed_ids(p: &Pair) -> Vec<String> {
    let out = p.cli_at(&p.apis(), &["jobs", "list", "--all", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
}

/// Waits until `jobs` jobs are final, then checks the batch's outcome: exactly
/// `jobs` jobs (none made twice), all succeeded, every `acknowledged` id listed,
/// and each job ran to its end exactly once (its attempts record start and end).
fn assert_every_job_succeeded_once(p: &Pair, record: &Path, jobs: usize, acknowledged: &[String]) {
    p.wait_until("every job final", |s| {
        s.len() >= jobs && s.iter().all(|s| s == "succeeded" || s == "failed" || s == "cancelled")
    });
    let states = p.states();
    assert_eq!(states.len(), jobs, "one job per line submitted, none twice");
    assert!(states.iter().all(|s| s == "succeeded"), "not all succeeded: {states:?}");
    let listed: std::collections::BTreeSet<String> = listed_ids(p).into_iter().collect();
    for id in acknowledged {
        assert!(listed.contains(id), "acknowledged job {id} is gone");
    }
    let runs = runs(record);
    assert_eq!(runs.len(), jobs, "jobs that recorded a complete run");
    for (job, spans) in runs {
        assert_eq!(spans.len(), 1, "{job} ran to its end {} times: {spans:?}", spans.len());
    }
}

#[test]
fn the_standby_takes_over_when_the_leader_is_killed_and_every_job_succeeds_exactly_once() {
    let (parts, per_part) = (5, 100);
    let mut p = Pair::new(&["a", "b"], 2_000);
    p.start(0);
    let first = p.wait_leads(0);
    assert_eq!(first["leader"]["holder"], "a", "{first}");
    p.start(1);
    // The standby answers, but only to say who leads.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = p.cli_at(&p.ctls[1].api, &["status"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // Until its first read of the lease, a standby says only that it is one and has not yet read who leads.
        if err.contains("standby") && !err.contains("not yet read who leads") {
            assert!(!out.status.success());
            assert!(err.contains(&p.ctls[0].api), "the standby names the leader: {err}");
            break;
        }
        assert!(Instant::now() < deadline, "the standby never answered as one: {err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    p.spawn_agents(3);
    p.wait_agents(3);

    let record = p.path().join("record.txt");
    let marker = format!("cosmos-failover-{}", std::process::id());
    let batches: Vec<PathBuf> = (0..parts)
        .map(|k| {
            let dir = p.path().join(format!("part-{k}"));
            std::fs::create_dir_all(&dir).unwrap();
            write_batch(&dir, per_part, &record, &marker)
        })
        .collect();
    let mut acknowledged: Vec<String> = batches[..2].iter().flat_map(|b| submit_part(&p, b)).collect();

    p.wait_until("some jobs done", |s| succeeded(s) >= 60);
    let mut a = p.ctls[0].proc.take();
    if let Some(proc) = a.as_mut() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(proc.0.id() as i32, libc::SIGKILL) };
        let _ = proc.0.wait();
    }
    // Submitted while no one leads: the CLI follows the failover and each part is made once.
    for b in &batches[2..] {
        acknowledged.extend(submit_part(&p, b));
    }
    let status = p.wait_leads(1);
    assert_eq!(status["leader"]["holder"], "b", "{status}");
    assert!(status["epoch"].as_u64().unwrap() > first["epoch"].as_u64().unwrap(), "{status}");

    let jobs = parts * per_part;
    assert_eq!(acknowledged.len(), jobs);
    assert_every_job_succeeded_once(&p, &record, jobs, &acknowledged);
}

#[test]
fn a_leader_paused_past_its_lease_is_fenced_out_and_exits_when_it_wakes() {
    let (mut p, first) = Pair::leading_with_agents(1_500, 1);
    // Paused mid-batch: jobs are running on the agent, more wait in the queue.
    let jobs = 40;
    let record = p.path().join("record.txt");
    let marker = format!("cosmos-fenced-{}", std::process::id());
    let batch = write_batch(p.path(), jobs, &record, &marker);
    let out = p.cli_at(&p.apis(), &["jobs", "submit", batch.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p.wait_until("some jobs done", |s| succeeded(s) >= 8);

    p.signal(0, libc::SIGSTOP);
    let status = p.wait_leads(1);
    assert_eq!(status["leader"]["holder"], "b", "{status}");
    assert!(status["epoch"].as_u64().unwrap() > first["epoch"].as_u64().unwrap());

    // Woken, the old leader's next renewal (or write) fails the epoch check: it exits non-zero, saying why.
    p.signal(0, libc::SIGCONT);
    let proc = p.ctls[0].proc.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(exit) = proc.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the deposed leader kept running; log: {}", p.log(0));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!exit.success(), "a deposed leader exits non-zero");
    let log = p.log(0);
    assert!(log.contains("no longer the leader") && log.contains("now names b"), "{log}");

    // The new leader serves: the agent found it, and the batch ends there, each job run once. What
    // the old leader decided while paused never reached the agent: its sends wait for their commit,
    // which the fence refused (and the agent refuses the old epoch besides).
    p.wait_agents(1);
    assert_every_job_succeeded_once(&p, &record, jobs, &[]);
}

#[test]
fn postgresql_restarted_mid_batch_loses_nothing_and_the_leader_carries_on() {
    // A lease longer than the server's restart: the leader rides it out by reconnecting.
    let (mut p, first) = Pair::leading_with_agents(10_000, 2);
    let record = p.path().join("record.txt");
    let marker = format!("cosmos-pg-restart-{}", std::process::id());
    let dirs: Vec<PathBuf> = (0..2).map(|k| p.path().join(format!("part-{k}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut acknowledged = submit_part(&p, &write_batch(&dirs[0], 100, &record, &marker));
    p.wait_until("some jobs done", |s| succeeded(s) >= 20);

    // Stopped as a crash would stop it, then started again on the same port and data.
    p.pg.restart();
    acknowledged.extend(submit_part(&p, &write_batch(&dirs[1], 50, &record, &marker)));

    assert_every_job_succeeded_once(&p, &record, 150, &acknowledged);
    // Both controllers reconnected: the same leader at the same epoch, the standby still standing by.
    let status = p.wait_leads(0);
    assert_eq!(
        (&status["leader"]["holder"], &status["epoch"]),
        (&first["leader"]["holder"], &first["epoch"]),
        "{status}"
    );
    for i in 0..2 {
        let exited = p.ctls[i].proc.as_mut().unwrap().0.try_wait().unwrap();
        assert!(exited.is_none(), "controller {} exited: {}", p.ctls[i].name, p.log(i));
    }
}
