//! The runtime contract: one suite, written once over `dyn Runtime`, run
//! unchanged against the simulated runtime, the process runtime and the
//! Docker runtime (`simulated::*`, `process::*`, `docker::*`). The job is
//! `cosmos-testjob` everywhere: the binary (built by this test into its own
//! target directory), the same binary in the `cosmos-testjob:dev` image
//! (scripts/build-images), or its simulation. A fake that fails the suite is
//! a bug in the fake.
//!
//! The Docker cases need Docker and the image; without them they fail, with
//! a message saying what to do. They never skip.

use cosmos_agent::core::{ExitStatus, Recovered, RuntimeEvent};
use cosmos_agent::docker::{DockerConfig, DockerRuntime, LABEL_AGENT};
use cosmos_agent::process::{ProcessRuntime, group_exists};
use cosmos_agent::runtime::{EVENT_QUEUE_LEN, EventSender, Runtime, StartRequest, attempt_dir};
use cosmos_agent::simulated::{SimulatedHost, SimulatedRuntime};
use cosmos_agent::supervise::Launcher;
use cosmos_proto::spec::{ArtifactRef, OutputArtifact};
use cosmos_proto::{AttemptId, Epoch, JobId, JobSpec, LogStream, Sha256};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::mpsc;

mod common;
use common::*;

/// The image the Docker cases run.
const IMAGE: &str = "cosmos-testjob:dev";
/// Its label recording the sources it was built from (scripts/build-images).
const SOURCE_LABEL: &str = "cosmos.testjob.source";
const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;

// ---------------------------------------------------------------- harnesses

/// What the suite needs of each runtime: how to make one (again, for a
/// restart), how to say "run cosmos-testjob with these flags", and how to
/// find what it left behind.
trait Harness: Sized {
    async fn new(test: &str) -> Self;
    fn runtime(&self, events: EventSender) -> Box<dyn Runtime>;
    /// The spec running cosmos-testjob with `args`.
    fn spec(&self, args: &[&str]) -> JobSpec;
    /// The same, with another program in place of cosmos-testjob.
    fn spec_with_program(&self, program: &str, args: &[&str]) -> JobSpec;
    fn root(&self) -> &Path;
    async fn is_running(&self, id: AttemptId) -> bool;
    /// Whatever still runs or exists for this test's attempts (processes, containers, simulated jobs).
    async fn leftovers(&self) -> Vec<String>;
}

struct Simulated {
    dir: tempfile::TempDir,
    host: SimulatedHost,
}

impl Harness for Simulated {
    async fn new(_test: &str) -> Self {
        Simulated { dir: tempfile::tempdir().unwrap(), host: SimulatedHost::new() }
    }

    fn runtime(&self, events: EventSender) -> Box<dyn Runtime> {
        Box::new(SimulatedRuntime::new(self.host.clone(), self.dir.path().to_path_buf(), events))
    }

    fn spec(&self, args: &[&str]) -> JobSpec {
        self.spec_with_program("cosmos-testjob", args)
    }

    fn spec_with_program(&self, program: &str, args: &[&str]) -> JobSpec {
        JobSpec::command("contract", std::iter::once(program).chain(args.iter().copied()))
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    async fn is_running(&self, id: AttemptId) -> bool {
        self.host.running().contains(&id)
    }

    async fn leftovers(&self) -> Vec<String> {
        self.host.jobs().iter().map(|id| format!("simulated job {id}")).collect()
    }
}

struct Process {
    dir: tempfile::TempDir,
}

/// The cosmos-testjob binary, built once per test run into its own target
/// directory (the cargo running this test holds the main one's lock).
fn testjob_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        // <target>/<profile>/deps/contract-<hash>
        let target = exe.ancestors().nth(3).expect("a cargo target directory").to_path_buf();
        let own = target.join("testjob");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(&cargo)
            .args(["build", "--quiet", "-p", "cosmos-testjob", "--bin", "cosmos-testjob", "--target-dir"])
            .arg(&own)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap_or_else(|e| panic!("cannot run `{cargo} build -p cosmos-testjob`: {e}"));
        assert!(status.success(), "`cargo build -p cosmos-testjob --target-dir {}` failed", own.display());
        let bin = own.join("debug").join("cosmos-testjob");
        assert!(bin.exists(), "built cosmos-testjob but {} is missing", bin.display());
        bin
    })
}

impl Harness for Process {
    async fn new(_test: &str) -> Self {
        testjob_binary();
        Process { dir: tempfile::tempdir().unwrap() }
    }

    fn runtime(&self, events: EventSender) -> Box<dyn Runtime> {
        let supervisor = Launcher::standalone(env!("CARGO_BIN_EXE_cosmos-job-supervise").into());
        Box::new(ProcessRuntime::new(self.dir.path().to_path_buf(), events, supervisor))
    }

    fn spec(&self, args: &[&str]) -> JobSpec {
        self.spec_with_program(testjob_binary().to_str().unwrap(), args)
    }

    fn spec_with_program(&self, program: &str, args: &[&str]) -> JobSpec {
        JobSpec::command("contract", std::iter::once(program).chain(args.iter().copied()))
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    async fn is_running(&self, id: AttemptId) -> bool {
        self.pgid(id).is_some_and(group_exists)
    }

    async fn leftovers(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("attempts")) else { return Vec::new() };
        let mut left = Vec::new();
        for e in entries.filter_map(|e| e.ok()) {
            let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<AttemptId>().ok()) else { continue };
            if let Some(pgid) = self.pgid(id).filter(|p| group_exists(*p)) {
                left.push(format!("process group {pgid} of {id}"));
            }
        }
        left
    }
}

impl Process {
    fn pgid(&self, id: AttemptId) -> Option<i32> {
        let path = attempt_dir(self.dir.path(), id).join(cosmos_agent::process::RECORD_LOG);
        let record = cosmos_agent::supervise::read_log::<serde_json::Value>(&path).ok()??.started?;
        record["pgid"].as_i64().map(|p| p as i32)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // However the test ended, its processes end with it.
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("attempts")) else { return };
        for e in entries.filter_map(|e| e.ok()) {
            if let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<AttemptId>().ok()) {
                if let Some(pgid) = self.pgid(id).filter(|p| *p > 1) {
                    unsafe { libc::killpg(pgid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// A Docker client for checks and clean-up, on whatever runtime calls it.
async fn docker_client() -> bollard::Docker {
    let socket = DockerConfig::new("probe", "/").socket;
    let connect = async {
        let docker = bollard::Docker::connect_with_unix(socket.to_str().unwrap(), 60, bollard::API_DEFAULT_VERSION)?;
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, bollard::errors::Error>(docker)
    };
    connect.await.unwrap_or_else(|e| {
        panic!(
            "Docker is not usable at {} ({e}). The Docker runtime's tests need it: start Docker, let this user \
             use its socket, then run scripts/build-images",
            socket.display()
        )
    })
}

/// Fails unless `cosmos-testjob:dev` is present and built from the checkout's testjob sources.
pub async fn check_image(docker: &bollard::Docker) {
    let image = docker.inspect_image(IMAGE).await.unwrap_or_else(|e| {
        panic!("image {IMAGE} is not on this host ({e}): run scripts/build-images (it builds it from testjob/)")
    });
    let built_from = image.config.and_then(|c| c.labels).and_then(|l| l.get(SOURCE_LABEL).cloned());
    let testjob = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testjob");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(testjob.join("src"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    sources.sort_by(|a, b| a.as_os_str().as_encoded_bytes().cmp(b.as_os_str().as_encoded_bytes()));
    let mut hasher = sha2::Sha256::new();
    for path in std::iter::once(testjob.join("Cargo.toml")).chain(sources) {
        hasher.update(std::fs::read(path).unwrap());
    }
    let checkout = hex::encode(hasher.finalize());
    assert_eq!(
        built_from.as_deref(),
        Some(checkout.as_str()),
        "image {IMAGE} was built from other testjob sources than this checkout's: run scripts/build-images"
    );
}

/// Containers carrying this agent's label, as `name (state)`.
async fn labelled_containers(docker: &bollard::Docker, agent: &str) -> Vec<String> {
    let filters = std::collections::HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={agent}")])]);
    let options =
        bollard::query_parameters::ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    let listed = docker.list_containers(Some(options)).await.expect("list containers");
    listed
        .into_iter()
        .map(|c| format!("{} ({})", c.names.unwrap_or_default().join(","), c.status.unwrap_or_default()))
        .collect()
}

/// Removes this agent's containers, from any context (a `Drop` included).
fn remove_labelled_containers(agent: &str) {
    let agent = agent.to_string();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let docker = docker_client().await;
            let filters =
                std::collections::HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={agent}")])]);
            let options = bollard::query_parameters::ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            };
            for c in docker.list_containers(Some(options)).await.unwrap_or_default() {
                if let Some(id) = c.id {
                    let rm = bollard::query_parameters::RemoveContainerOptions { force: true, ..Default::default() };
                    let _ = docker.remove_container(&id, Some(rm)).await;
                }
            }
        })
    })
    .join();
}

struct Docker {
    dir: tempfile::TempDir,
    agent: String,
    client: bollard::Docker,
}

impl Harness for Docker {
    async fn new(test: &str) -> Self {
        let client = docker_client().await;
        check_image(&client).await;
        let agent = format!("contract-{test}-{}", std::process::id());
        remove_labelled_containers(&agent);
        Docker { dir: tempfile::tempdir().unwrap(), agent, client }
    }

    fn runtime(&self, events: EventSender) -> Box<dyn Runtime> {
        let mut config = DockerConfig::new(self.agent.clone(), self.dir.path());
        config.gpus_simulated = true;
        // The job's files then belong to whoever runs the tests, and its temp dir can be removed.
        config.user = Some(format!("{}:{}", unsafe { libc::getuid() }, unsafe { libc::getgid() }));
        Box::new(DockerRuntime::new(config, events))
    }

    fn spec(&self, args: &[&str]) -> JobSpec {
        self.spec_with_program("/testjob", args)
    }

    fn spec_with_program(&self, program: &str, args: &[&str]) -> JobSpec {
        let mut spec = JobSpec::command("contract", std::iter::once(program).chain(args.iter().copied()));
        spec.image = Some(IMAGE.into());
        spec
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    async fn is_running(&self, id: AttemptId) -> bool {
        let name = cosmos_agent::docker::container_name(&self.agent, id);
        match self.client.inspect_container(&name, None).await {
            Ok(info) => info.state.and_then(|s| s.running).unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn leftovers(&self) -> Vec<String> {
        labelled_containers(&self.client, &self.agent).await
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        remove_labelled_containers(&self.agent);
    }
}

// ---------------------------------------------------------------- helpers

fn request<H: Harness>(h: &H, id: u64, spec: JobSpec) -> StartRequest {
    let attempt_id = AttemptId(id);
    StartRequest {
        attempt_id,
        job_id: JobId(1000 + id),
        epoch: Epoch(1),
        spec,
        gpu_uuids: vec!["GPU-test-0".into()],
        gpu_indices: vec![0],
        work_dir: attempt_dir(h.root(), attempt_id),
    }
}

fn channel() -> (EventSender, mpsc::Receiver<RuntimeEvent>) {
    mpsc::channel(EVENT_QUEUE_LEN)
}

/// Waits until the attempt has printed `text` on `stream`.
async fn wait_for(
    rx: &mut mpsc::Receiver<RuntimeEvent>,
    id: AttemptId,
    seen: &mut Seen,
    stream: LogStream,
    text: &str,
) {
    let text = text.as_bytes().to_vec();
    watch_until(rx, id, seen, |s| {
        assert!(
            s.exit.is_none() && s.start_failed.is_none(),
            "ended before printing {:?}: {s:?}",
            String::from_utf8_lossy(&text)
        );
        s.stream(stream).windows(text.len()).any(|w| w == text.as_slice())
    })
    .await;
}

async fn assert_no_leftovers<H: Harness>(h: &H) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = h.leftovers().await;
        if left.is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn exited(code: i32) -> ExitStatus {
    ExitStatus { code: Some(code), signal: None, oom_killed: false }
}

fn signalled(signal: i32) -> ExitStatus {
    ExitStatus { code: None, signal: Some(signal), oom_killed: false }
}

fn steps(n: u32) -> String {
    (1..=n).map(|i| cosmos_testjob::step_line(i, n)).collect()
}

// ---------------------------------------------------------------- the cases

async fn runs_to_exit_zero<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    rt.start(request(&h, 1, h.spec(&["--steps", "3", "--step-ms", "20"])));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    assert!(seen.started.as_deref().is_some_and(|h| !h.is_empty()), "Started comes first, with a handle: {seen:?}");
    assert_eq!(seen.status(), &exited(0));
    assert_eq!(seen.text(LogStream::Stdout), steps(3));
    let stderr = format!("{}{}", cosmos_testjob::STARTED, cosmos_testjob::exiting_line(0));
    assert_eq!(seen.text(LogStream::Stderr), stderr);
    // The output is also kept in the attempt's directory.
    let dir = attempt_dir(h.root(), AttemptId(1));
    assert_eq!(std::fs::read_to_string(dir.join("stdout.log")).unwrap(), steps(3));
    assert_eq!(std::fs::read_to_string(dir.join("stderr.log")).unwrap(), stderr);
    assert_no_leftovers(&h).await;
}

async fn output_streams_in_order_with_offsets<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    rt.start(request(&h, 1, h.spec(&["--steps", "2", "--step-ms", "10", "--stdout-bytes", "200000"])));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    assert_eq!(seen.status(), &exited(0));
    let mut expected = steps(2).into_bytes();
    expected.extend(std::iter::repeat_n(b'a', 200_000));
    assert_eq!(seen.stream(LogStream::Stdout), expected, "all of stdout, in order, before the exit");
    assert!(seen.logs.iter().filter(|l| l.0 == LogStream::Stdout).count() >= 4, "200 kB comes in several chunks");
    assert!(seen.text(LogStream::Stderr).starts_with(cosmos_testjob::STARTED));
    let dir = attempt_dir(h.root(), AttemptId(1));
    assert_eq!(std::fs::read(dir.join("stdout.log")).unwrap(), expected);
    assert_no_leftovers(&h).await;
}

async fn progress_is_parsed<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    rt.start(request(&h, 1, h.spec(&["--steps", "5", "--step-ms", "50"])));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    assert_eq!(seen.progress.last(), Some(&(5, 5)), "{:?}", seen.progress);
    // Each change once, in order (lines read together may report only the latest).
    assert!(seen.progress.windows(2).all(|w| w[0].0 < w[1].0), "{:?}", seen.progress);
    assert!(seen.progress.iter().all(|&(s, t)| t == 5 && (1..=5).contains(&s)), "{:?}", seen.progress);
    assert_no_leftovers(&h).await;
}

async fn exit_codes_are_reported<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    rt.start(request(&h, 1, h.spec(&["--exit-code", "3"])));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    assert_eq!(seen.status(), &exited(3));
    assert!(seen.text(LogStream::Stderr).ends_with(&cosmos_testjob::exiting_line(3)));

    rt.start(request(&h, 2, h.spec(&["--no-such-flag"])));
    let seen = run_to_end(&mut rx, AttemptId(2)).await;
    assert_eq!(seen.status(), &exited(cosmos_testjob::EXIT_USAGE));
    assert!(seen.text(LogStream::Stderr).contains("unknown option `--no-such-flag`"), "{seen:?}");
    assert_no_leftovers(&h).await;
}

async fn outputs_are_reported_with_digests<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    let mut spec = h.spec(&["--write", "out.txt=hello", "--write", "sub/b.bin=world"]);
    for (path, required) in [("out.txt", true), ("sub/b.bin", false), ("missing.txt", false)] {
        spec.outputs.push(OutputArtifact { path: path.into(), required });
    }
    rt.start(request(&h, 1, spec));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    assert_eq!(seen.status(), &exited(0));
    let digest = |data: &[u8]| Sha256(sha2::Sha256::digest(data).into());
    let expected = vec![
        ArtifactRef { path: "out.txt".into(), sha256: digest(b"hello\n"), size_bytes: 6 },
        ArtifactRef { path: "sub/b.bin".into(), sha256: digest(b"world\n"), size_bytes: 6 },
    ];
    assert_eq!(seen.exit.as_ref().unwrap().1, expected, "the files present, with their digests");
    let dir = attempt_dir(h.root(), AttemptId(1));
    assert_eq!(std::fs::read(dir.join("out.txt")).unwrap(), b"hello\n", "written in the attempt's work dir");
    assert_no_leftovers(&h).await;
}

async fn the_job_sees_exactly_its_gpus<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    let mut req = request(
        &h,
        7,
        h.spec(&[
            "--print-env",
            "CUDA_VISIBLE_DEVICES",
            "--print-env",
            "COSMOS_ATTEMPT_ID",
            "--print-env",
            "COSMOS_JOB_ID",
            "--print-env",
            "EXTRA",
        ]),
    );
    req.gpu_indices = vec![3, 1];
    req.gpu_uuids = vec!["GPU-c".into(), "GPU-a".into()];
    req.spec.gpus = 2;
    req.spec.env.insert("EXTRA".into(), "from the spec".into());
    // The spec cannot widen the assignment.
    req.spec.env.insert("CUDA_VISIBLE_DEVICES".into(), "0,1,2,3".into());
    rt.start(req);
    let seen = run_to_end(&mut rx, AttemptId(7)).await;
    assert_eq!(seen.status(), &exited(0));
    assert_eq!(
        seen.text(LogStream::Stdout),
        "CUDA_VISIBLE_DEVICES=3,1\nCOSMOS_ATTEMPT_ID=att-7\nCOSMOS_JOB_ID=job-1007\nEXTRA=from the spec\n"
    );
    assert_no_leftovers(&h).await;
}

async fn sigterm_ends_a_job_within_its_grace<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    rt.start(request(&h, 1, h.spec(&["--steps", "1000", "--step-ms", "50"])));
    let mut seen = Seen::default();
    wait_for(&mut rx, AttemptId(1), &mut seen, LogStream::Stderr, cosmos_testjob::STARTED).await;
    // A grace longer than the test's patience: only the graceful signal can end it in time.
    rt.stop(AttemptId(1), 120_000);
    watch_until(&mut rx, AttemptId(1), &mut seen, |s| s.exit.is_some()).await;
    assert_eq!(seen.status(), &signalled(SIGTERM));
    assert!(!seen.text(LogStream::Stderr).contains(cosmos_testjob::IGNORING_TERM));
    assert_no_leftovers(&h).await;
}

async fn a_job_ignoring_sigterm_is_killed_after_the_grace<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    rt.start(request(&h, 1, h.spec(&["--ignore-term", "--sleep-ms", "120000"])));
    let mut seen = Seen::default();
    wait_for(&mut rx, AttemptId(1), &mut seen, LogStream::Stderr, cosmos_testjob::STARTED).await;
    let stopped = tokio::time::Instant::now();
    rt.stop(AttemptId(1), 1_000);
    watch_until(&mut rx, AttemptId(1), &mut seen, |s| s.exit.is_some()).await;
    assert_eq!(seen.status(), &signalled(SIGKILL));
    assert!(stopped.elapsed() >= Duration::from_millis(900), "killed only after the grace: {:?}", stopped.elapsed());
    assert!(seen.text(LogStream::Stderr).contains(cosmos_testjob::IGNORING_TERM), "it got SIGTERM first: {seen:?}");
    assert_no_leftovers(&h).await;
}

async fn stopping_an_unknown_attempt_reports_it_killed<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    rt.stop(AttemptId(99), 1_000);
    let seen = run_to_end(&mut rx, AttemptId(99)).await;
    assert_eq!(seen.status(), &signalled(SIGKILL));
    assert_no_leftovers(&h).await;
}

async fn a_missing_program_fails_to_start_for_good<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut rt = h.runtime(tx);
    let program = "/nonexistent/cosmos-no-such-program";
    rt.start(request(&h, 1, h.spec_with_program(program, &["--flag"])));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    let (reason, retryable) = seen.start_failed.clone().unwrap_or_else(|| panic!("start failed: {seen:?}"));
    assert!(!retryable, "{reason}");
    assert!(reason.contains(program) && reason.contains("not found"), "{reason}");

    let mut spec = h.spec(&[]);
    spec.command.clear();
    rt.start(request(&h, 2, spec));
    let seen = run_to_end(&mut rx, AttemptId(2)).await;
    let (reason, retryable) = seen.start_failed.clone().unwrap_or_else(|| panic!("start failed: {seen:?}"));
    assert!(!retryable && reason.contains("`command` is empty"), "{reason}");
    assert_no_leftovers(&h).await;
}

async fn a_restarted_runtime_adopts_a_running_job<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut first = h.runtime(tx);
    let mut spec = h.spec(&["--steps", "20", "--step-ms", "100", "--write", "done.txt=done"]);
    spec.timeout_ms = 3_600_000;
    spec.outputs.push(OutputArtifact { path: "done.txt".into(), required: true });
    first.start(request(&h, 1, spec));
    let mut before = Seen::default();
    wait_for(&mut rx, AttemptId(1), &mut before, LogStream::Stdout, "step 1/20\n").await;
    drop(first); // The agent "restarts": the job stays.
    drop(rx);
    assert!(h.is_running(AttemptId(1)).await, "the job outlives the runtime");

    let (tx, mut rx) = channel();
    let mut second = h.runtime(tx);
    let recovered = second.recover();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    let Recovered { attempt_id, job_id, ref gpu_uuids, exited: None, remaining_ms: Some(left), .. } = recovered[0]
    else {
        panic!("adopted while it runs: {recovered:?}");
    };
    assert_eq!(
        (attempt_id, job_id, gpu_uuids.as_slice()),
        (AttemptId(1), JobId(1001), &["GPU-test-0".to_string()][..])
    );
    assert!(left <= 3_600_000 && left > 3_600_000 - 60_000, "{left}");

    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    let status = seen.status();
    assert_eq!(status, &exited(0), "the exit of a job this runtime did not start is known");
    let (_, outputs) = seen.exit.as_ref().unwrap();
    assert_eq!(outputs.iter().map(|o| o.path.as_str()).collect::<Vec<_>>(), ["done.txt"]);
    // The adopter reports the output from its start again; the files hold it once.
    assert_eq!(seen.text(LogStream::Stdout), steps(20));
    let dir = attempt_dir(h.root(), AttemptId(1));
    assert_eq!(std::fs::read_to_string(dir.join("stdout.log")).unwrap(), steps(20));
    assert_no_leftovers(&h).await;
}

async fn an_adopted_job_can_be_stopped<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let (tx, mut rx) = channel();
    let mut first = h.runtime(tx);
    first.start(request(&h, 1, h.spec(&["--sleep-ms", "120000"])));
    let mut before = Seen::default();
    wait_for(&mut rx, AttemptId(1), &mut before, LogStream::Stderr, cosmos_testjob::STARTED).await;
    drop(first);
    drop(rx);

    let (tx, mut rx) = channel();
    let mut second = h.runtime(tx);
    let recovered = second.recover();
    assert!(matches!(recovered.as_slice(), [Recovered { exited: None, .. }]), "{recovered:?}");
    second.stop(AttemptId(1), 120_000);
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    assert_eq!(seen.status(), &signalled(SIGTERM));
    assert_no_leftovers(&h).await;
}

/// Starts attempt 1 and lets it end with no runtime watching (the agent is "down").
async fn end_unwatched<H: Harness>(h: &H, spec: JobSpec) {
    let (tx, mut rx) = channel();
    let mut first = h.runtime(tx);
    first.start(request(h, 1, spec));
    let mut before = Seen::default();
    watch_until(&mut rx, AttemptId(1), &mut before, |s| s.started.is_some()).await;
    drop(first);
    drop(rx);
    let deadline = tokio::time::Instant::now() + WAIT;
    while h.is_running(AttemptId(1)).await {
        assert!(tokio::time::Instant::now() < deadline, "the job ends");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn the_outputs_of_a_job_that_ended_unwatched_are_recovered<H: Harness>(test: &str) {
    let h = H::new(test).await;
    let mut spec = h.spec(&["--sleep-ms", "300", "--write", "video.mp4=frames"]);
    spec.outputs.push(OutputArtifact { path: "video.mp4".into(), required: true });
    end_unwatched(&h, spec).await;
    let (tx, _rx) = channel();
    let mut second = h.runtime(tx);
    let recovered = second.recover();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    // A clean exit seen after the fact still yields what it made, so the agent can deliver it.
    let digest = Sha256(sha2::Sha256::digest(b"frames\n").into());
    assert_eq!(recovered[0].outputs, vec![ArtifactRef { path: "video.mp4".into(), sha256: digest, size_bytes: 7 }]);
    drop(second);
    assert_no_leftovers(&h).await;
}

async fn a_job_that_ended_unwatched_is_reported_until_acknowledged<H: Harness>(test: &str) {
    let h = H::new(test).await;
    end_unwatched(&h, h.spec(&["--sleep-ms", "300", "--exit-code", "3"])).await;

    let (tx, _rx) = channel();
    let mut second = h.runtime(tx);
    let recovered = second.recover();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!((recovered[0].attempt_id, recovered[0].job_id), (AttemptId(1), JobId(1001)));
    let expected = exited(3);
    assert_eq!(recovered[0].exited, Some(expected.clone()));
    assert_no_leftovers(&h).await;
    drop(second);

    // Until the controller has recorded it, every restart reports it again.
    let (tx, _rx) = channel();
    let mut third = h.runtime(tx);
    let recovered = third.recover();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0].exited, Some(expected));
    third.acknowledged(AttemptId(1));
    drop(third);
    let (tx, _rx) = channel();
    let mut fourth = h.runtime(tx);
    assert_eq!(fourth.recover(), vec![], "acknowledged outcomes are not reported again");
    assert_no_leftovers(&h).await;
}

// ---------------------------------------------------------------- instantiation

macro_rules! suite {
    ($module:ident, $harness:ty, [$($case:ident),* $(,)?]) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case::<$harness>(stringify!($case)).await;
                }
            )*
        }
    };
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        suite!(simulated, Simulated, [$($case),*]);
        suite!(process, Process, [$($case),*]);
        suite!(docker, Docker, [$($case),*]);
    };
}

contract!(
    runs_to_exit_zero,
    output_streams_in_order_with_offsets,
    progress_is_parsed,
    exit_codes_are_reported,
    outputs_are_reported_with_digests,
    the_job_sees_exactly_its_gpus,
    sigterm_ends_a_job_within_its_grace,
    a_job_ignoring_sigterm_is_killed_after_the_grace,
    stopping_an_unknown_attempt_reports_it_killed,
    a_missing_program_fails_to_start_for_good,
    a_restarted_runtime_adopts_a_running_job,
    an_adopted_job_can_be_stopped,
    a_job_that_ended_unwatched_is_reported_until_acknowledged,
    the_outputs_of_a_job_that_ended_unwatched_are_recovered,
);
