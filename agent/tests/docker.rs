//! The Docker runtime against the real engine, beyond the runtime contract
//! (tests/contract.rs): what the created containers look like through the
//! API, GPU device requests, and the failures a user must be able to act on.
//!
//! These tests need Docker and the `cosmos-testjob:dev` image
//! (scripts/build-images); without them they fail, saying so. They never skip.

use bollard::query_parameters::{ListContainersOptions, RemoveContainerOptions};
use cosmos_agent::core::{ExitStatus, RuntimeEvent};
use cosmos_agent::docker::{
    DockerConfig, DockerError, DockerRuntime, LABEL_AGENT, LABEL_ATTEMPT, LABEL_EPOCH, LABEL_GPUS, LABEL_JOB,
    WORK_MOUNT, container_name,
};
use cosmos_agent::runtime::{EVENT_QUEUE_LEN, Runtime, StartRequest, attempt_dir};
use cosmos_proto::spec::Mount;
use cosmos_proto::{AttemptId, Epoch, JobId, JobSpec};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

mod common;
use common::*;

const IMAGE: &str = "cosmos-testjob:dev";

async fn docker_client() -> bollard::Docker {
    let socket = DockerConfig::new("probe", "/").socket;
    let connect = async {
        let docker = bollard::Docker::connect_with_unix(socket.to_str().unwrap(), 60, bollard::API_DEFAULT_VERSION)?;
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, bollard::errors::Error>(docker)
    };
    let docker = connect.await.unwrap_or_else(|e| {
        panic!(
            "Docker is not usable at {} ({e}). The Docker runtime's tests need it: start Docker, let this user \
             use its socket, then run scripts/build-images",
            socket.display()
        )
    });
    docker
        .inspect_image(IMAGE)
        .await
        .unwrap_or_else(|e| panic!("image {IMAGE} is not on this host ({e}): run scripts/build-images"));
    docker
}

/// An agent's name of its own for each test, and its containers removed however the test ends.
struct Agent {
    name: String,
    dir: tempfile::TempDir,
}

impl Agent {
    fn new(test: &str) -> Agent {
        let agent =
            Agent { name: format!("dockertest-{test}-{}", std::process::id()), dir: tempfile::tempdir().unwrap() };
        remove_labelled(&agent.name);
        agent
    }

    fn config(&self) -> DockerConfig {
        let mut config = DockerConfig::new(self.name.clone(), self.dir.path());
        config.gpus_simulated = true;
        config.user = Some(format!("{}:{}", unsafe { libc::getuid() }, unsafe { libc::getgid() }));
        config
    }

    fn request(&self, id: u64, args: &[&str]) -> StartRequest {
        let attempt_id = AttemptId(id);
        let mut spec = JobSpec::command("docker-test", std::iter::once("/testjob").chain(args.iter().copied()));
        spec.image = Some(IMAGE.into());
        StartRequest {
            attempt_id,
            job_id: JobId(1000 + id),
            epoch: Epoch(7),
            spec,
            gpu_uuids: vec!["GPU-sim-a".into(), "GPU-sim-b".into()],
            gpu_indices: vec![2, 0],
            work_dir: attempt_dir(self.dir.path(), attempt_id),
        }
    }

    async fn containers(&self, docker: &bollard::Docker) -> Vec<String> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={}", self.name)])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let listed = docker.list_containers(Some(options)).await.unwrap();
        let mut names: Vec<String> = listed
            .into_iter()
            .filter_map(|c| c.names?.first().map(|n| n.trim_start_matches('/').to_string()))
            .collect();
        names.sort();
        names
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        remove_labelled(&self.name);
    }
}

fn remove_labelled(agent: &str) {
    let agent = agent.to_string();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let docker = docker_client().await;
            let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_AGENT}={agent}")])]);
            let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
            for c in docker.list_containers(Some(options)).await.unwrap_or_default() {
                let rm = RemoveContainerOptions { force: true, ..Default::default() };
                let _ = docker.remove_container(&c.id.unwrap_or_default(), Some(rm)).await;
            }
        })
    })
    .join();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_is_labelled_named_mounted_and_unprivileged_as_configured() {
    let docker = docker_client().await;
    let agent = Agent::new("inspect");
    let models = tempfile::tempdir().unwrap();
    std::fs::write(models.path().join("weights.bin"), b"w").unwrap();
    let mut config = agent.config();
    config.volumes.insert("models".into(), models.path().to_path_buf());
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut rt = DockerRuntime::new(config, tx);
    let mut req = agent.request(5, &["--sleep-ms", "120000"]);
    req.spec.shm_bytes = Some(256 << 20);
    req.spec.ipc_host = true;
    req.spec.mounts.push(Mount { volume: "models".into(), target: "/models".into(), read_only: true });
    req.spec.labels.insert("team".into(), "vision".into());
    req.spec.labels.insert(LABEL_ATTEMPT.into(), "att-999".into()); // A job cannot forge the agent's labels.
    req.spec.env.insert("EXTRA".into(), "1".into());
    rt.start(req.clone());
    let mut seen = Seen::default();
    watch_until(&mut rx, AttemptId(5), &mut seen, |s| s.started.is_some() || s.start_failed.is_some()).await;
    let name = seen.started.clone().unwrap_or_else(|| panic!("started: {seen:?}"));
    assert_eq!(name, container_name(&agent.name, AttemptId(5)));
    assert_eq!(name, format!("cosmos-{}-att-5", agent.name), "derived from the agent and the full attempt id");

    let info = docker.inspect_container(&name, None).await.unwrap();
    let config = info.config.unwrap();
    let labels = config.labels.unwrap();
    assert_eq!(labels[LABEL_AGENT], agent.name);
    assert_eq!(labels[LABEL_ATTEMPT], "att-5");
    assert_eq!(labels[LABEL_JOB], "job-1005");
    assert_eq!(labels[LABEL_EPOCH], "7");
    assert_eq!(labels[LABEL_GPUS], "GPU-sim-a,GPU-sim-b");
    assert_eq!(labels["team"], "vision");
    let env = config.env.unwrap();
    for var in [
        "CUDA_VISIBLE_DEVICES=2,0",
        "NVIDIA_VISIBLE_DEVICES=void",
        "COSMOS_GPU_UUIDS=GPU-sim-a,GPU-sim-b",
        "COSMOS_ATTEMPT_ID=att-5",
        "EXTRA=1",
    ] {
        assert!(env.iter().any(|e| e == var), "{var} in {env:?}");
    }
    assert_eq!(config.working_dir.as_deref(), Some(WORK_MOUNT));
    assert_eq!(config.entrypoint, Some(vec!["/testjob".to_string()]), "the command's program, not the image's");

    let host = info.host_config.unwrap();
    assert_eq!(host.privileged, Some(false));
    assert!(host.security_opt.unwrap_or_default().iter().any(|o| o.starts_with("no-new-privileges")));
    assert_eq!(host.init, Some(true));
    assert_eq!(host.shm_size, Some(256 << 20));
    assert_eq!(host.ipc_mode.as_deref(), Some("host"));
    assert_ne!(host.network_mode.as_deref(), Some("host"), "no host network unless configured");
    assert!(host.device_requests.unwrap_or_default().is_empty(), "simulated GPUs: no device request");

    let mut mounts: Vec<(String, String, bool)> =
        info.mounts.unwrap().into_iter().map(|m| (m.destination.unwrap(), m.source.unwrap(), m.rw.unwrap())).collect();
    mounts.sort();
    assert_eq!(
        mounts,
        [
            ("/models".to_string(), models.path().display().to_string(), false),
            (WORK_MOUNT.to_string(), req.work_dir.display().to_string(), true),
        ]
    );

    // A second agent on the same engine runs the same attempt id under its own name.
    let other = Agent::new("inspect-other");
    let (tx2, mut rx2) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut rt2 = DockerRuntime::new(other.config(), tx2);
    rt2.start(other.request(5, &["--sleep-ms", "120000"]));
    let mut seen2 = Seen::default();
    watch_until(&mut rx2, AttemptId(5), &mut seen2, |s| s.started.is_some() || s.start_failed.is_some()).await;
    assert_ne!(seen2.started.as_deref(), Some(name.as_str()));
    assert_eq!(agent.containers(&docker).await, std::slice::from_ref(&name), "each agent sees its own containers only");

    rt.stop(AttemptId(5), 0);
    rt2.stop(AttemptId(5), 0);
    watch_until(&mut rx, AttemptId(5), &mut seen, |s| s.exit.is_some()).await;
    watch_until(&mut rx2, AttemptId(5), &mut seen2, |s| s.exit.is_some()).await;
    assert_eq!(seen.status(), &ExitStatus { code: None, signal: Some(9), oom_killed: false });
    assert!(agent.containers(&docker).await.is_empty(), "removed once Exited is reported");
    assert!(other.containers(&docker).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_gpus_get_a_device_request_for_exactly_their_uuids() {
    let docker = docker_client().await;
    let agent = Agent::new("gpus");
    let mut config = agent.config();
    config.gpus_simulated = false;
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut rt = DockerRuntime::new(config, tx);
    let mut req = agent.request(1, &[]);
    req.gpu_uuids = vec!["GPU-1111aaaa".into(), "GPU-3333cccc".into()];
    req.gpu_indices = vec![1, 3];
    req.spec.env.insert("NVIDIA_VISIBLE_DEVICES".into(), "all".into()); // Cannot widen the request.

    // Created only: this host has no NVIDIA runtime to start it with.
    let id = rt.create_only(&req).await.expect("created");
    let info = docker.inspect_container(&id, None).await.unwrap();
    let requests = info.host_config.unwrap().device_requests.unwrap_or_default();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r.driver.as_deref(), Some("nvidia"));
    assert_eq!(r.device_ids, Some(vec!["GPU-1111aaaa".to_string(), "GPU-3333cccc".to_string()]));
    assert_eq!(r.capabilities, Some(vec![vec!["gpu".to_string()]]));
    assert!(r.count.unwrap_or(0) == 0, "a count of -1 would mean all GPUs: {r:?}");
    let env = info.config.unwrap().env.unwrap();
    assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=GPU-1111aaaa,GPU-3333cccc".to_string()), "{env:?}");
    assert!(env.contains(&"CUDA_VISIBLE_DEVICES=0,1".to_string()), "numbered from 0 inside: {env:?}");
    docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await.unwrap();

    // Started for real on this host, it fails retryably (another host may have the runtime) and leaves nothing.
    rt.start(agent.request(2, &[]).with_gpus(&["GPU-1111aaaa"], &[1]));
    let seen = run_to_end(&mut rx, AttemptId(2)).await;
    let (reason, retryable) = seen.start_failed.unwrap_or_else(|| panic!("start failed: {:?}", seen.exit));
    assert!(retryable, "{reason}");
    assert!(reason.contains("NVIDIA Container Toolkit"), "{reason}");
    assert!(agent.containers(&docker).await.is_empty());
}

trait WithGpus {
    fn with_gpus(self, uuids: &[&str], indices: &[u32]) -> Self;
}

impl WithGpus for StartRequest {
    fn with_gpus(mut self, uuids: &[&str], indices: &[u32]) -> Self {
        self.gpu_uuids = uuids.iter().map(|u| u.to_string()).collect();
        self.gpu_indices = indices.to_vec();
        self.spec.gpus = uuids.len() as u32;
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_for_good_and_says_how_to_get_it() {
    let docker = docker_client().await;
    let agent = Agent::new("image");
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut rt = DockerRuntime::new(agent.config(), tx);
    let mut req = agent.request(1, &[]);
    req.spec.image = Some("cosmos-no-such-image:never".into());
    rt.start(req);
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    let (reason, retryable) = seen.start_failed.expect("start failed");
    assert!(!retryable, "{reason}");
    assert!(reason.contains("cosmos-no-such-image:never"), "{reason}");
    assert!(reason.contains("scripts/build-images") && reason.contains("docker load"), "{reason}");
    assert!(agent.containers(&docker).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_volume_fails_for_good_naming_it() {
    let docker = docker_client().await;
    let agent = Agent::new("volume");
    let mut config = agent.config();
    config.volumes.insert("checkpoints".into(), agent.dir.path().to_path_buf());
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut rt = DockerRuntime::new(config, tx);
    let mut req = agent.request(1, &[]);
    req.spec.mounts.push(Mount { volume: "model-cache".into(), target: "/cache".into(), read_only: false });
    rt.start(req);
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    let (reason, retryable) = seen.start_failed.expect("start failed");
    assert!(!retryable, "{reason}");
    assert!(reason.contains("`model-cache`") && reason.contains("checkpoints"), "{reason}");
    assert!(agent.containers(&docker).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_daemon_is_retryable_and_fails_the_ping() {
    let agent = Agent::new("unreachable");
    let mut config = agent.config();
    config.socket = agent.dir.path().join("no-docker.sock");
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut rt = DockerRuntime::new(config, tx);
    let ping = rt.ping().await;
    assert!(matches!(ping, Err(DockerError::Unreachable { .. })), "{ping:?}");
    let message = ping.unwrap_err().to_string();
    assert!(message.contains("no-docker.sock") && message.contains("unreachable"), "{message}");

    rt.start(agent.request(1, &[]));
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    let (reason, retryable) = seen.start_failed.expect("start failed");
    assert!(retryable, "{reason}");
    assert!(reason.contains("Docker daemon") && reason.contains("unreachable"), "{reason}");
    assert_eq!(rt.recover(), vec![], "nothing to adopt, and no panic");
    assert!(rt.reap(&[]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_removes_containers_no_attempt_claims() {
    let docker = docker_client().await;
    let agent = Agent::new("reaper");
    let bystander = Agent::new("reaper-bystander");
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut first = DockerRuntime::new(agent.config(), tx);
    let (btx, mut brx) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut other = DockerRuntime::new(bystander.config(), btx);
    for id in [1, 2] {
        first.start(agent.request(id, &["--sleep-ms", "120000"]));
    }
    other.start(bystander.request(1, &["--sleep-ms", "120000"]));
    // Both started (their events interleave).
    let mut started = std::collections::BTreeSet::new();
    while started.len() < 2 {
        match tokio::time::timeout(WAIT, rx.recv()).await.expect("events in time").expect("channel open") {
            RuntimeEvent::Started { attempt_id, .. } => {
                started.insert(attempt_id);
            }
            RuntimeEvent::StartFailed { reason, .. } => panic!("{reason}"),
            _ => {}
        }
    }
    let mut seen = Seen::default();
    watch_until(&mut brx, AttemptId(1), &mut seen, |s| s.started.is_some()).await;
    drop(first); // A restarted agent that has not adopted them.
    drop(rx);

    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let mut second = DockerRuntime::new(agent.config(), tx);
    let removed = second.reap(&[AttemptId(1)]).await.unwrap();
    assert_eq!(removed, [container_name(&agent.name, AttemptId(2))]);
    assert_eq!(agent.containers(&docker).await, [container_name(&agent.name, AttemptId(1))]);
    assert_eq!(bystander.containers(&docker).await.len(), 1, "another agent's containers are not this reaper's");

    // Stopping what this runtime does not watch removes it at once and reports it killed.
    second.stop(AttemptId(1), 10_000);
    let seen = run_to_end(&mut rx, AttemptId(1)).await;
    assert_eq!(seen.status(), &ExitStatus { code: None, signal: Some(9), oom_killed: false });
    assert!(agent.containers(&docker).await.is_empty());
    other.stop(AttemptId(1), 0);
    let seen = run_to_end(&mut brx, AttemptId(1)).await;
    assert!(seen.exit.is_some());
    assert!(bystander.containers(&docker).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_work_dir_root_is_what_the_engine_mounts() {
    // An agent in a container sees its work dir at one path, the engine (on the host) at another.
    let agent = Agent::new("hostpath");
    let mut config = agent.config();
    config.host_work_dir_root = Some("/srv/cosmos/agent-a".into());
    let (tx, _rx) = mpsc::channel(EVENT_QUEUE_LEN);
    let rt = DockerRuntime::new(config, tx);
    let (_, body) = rt.container_config(&agent.request(3, &[])).unwrap();
    let mounts = body.host_config.unwrap().mounts.unwrap();
    assert_eq!(mounts[0].target.as_deref(), Some(WORK_MOUNT));
    assert_eq!(mounts[0].source.as_deref(), Some(Path::new("/srv/cosmos/agent-a/attempts/att-3").to_str().unwrap()));
}

/// The agent's daemon with the Docker runtime, against a controller speaking the real protocol.
mod daemon_on_docker {
    use super::*;
    use cosmos_agent::core::AgentConfig;
    use cosmos_agent::daemon::{self, AgentOptions, RuntimeKind};
    use cosmos_proto::frame::FRAME_BYTES_MAX_DEFAULT;
    use cosmos_proto::handshake::{self, Role, Token};
    use cosmos_proto::spec::OutputArtifact;
    use cosmos_proto::{
        AgentBlob, AgentFrame, AgentMsg, Assign, AttemptOutcome, AttemptPhase, Connection, ControllerBlob,
        ControllerMsg, TraceContext, encode_blob,
    };
    use tokio::net::{TcpListener, TcpStream};

    struct Controller {
        conn: Connection<TcpStream>,
    }

    impl Controller {
        async fn send(&mut self, msg: ControllerMsg) {
            self.conn.writer.send(&msg).await.unwrap();
        }

        /// The next message other than a heartbeat (acknowledged on the way). Output
        /// deliveries are answered as if the controller already held every blob: this
        /// test is about containers, `tests/e2e/artifacts.rs` about transfers.
        async fn recv(&mut self) -> AgentMsg {
            loop {
                let frame = tokio::time::timeout(WAIT, self.conn.reader.read_frame()).await.expect("in time");
                let frame = frame.unwrap().expect("connected");
                let msg = match AgentFrame::decode(&frame).unwrap() {
                    AgentFrame::Msg(msg) => msg,
                    AgentFrame::Blob(AgentBlob::Offer { sha256, .. }) => {
                        let stored = encode_blob(&ControllerBlob::Stored { sha256 }).unwrap();
                        self.conn.writer.write_frame(&stored).await.unwrap();
                        continue;
                    }
                    AgentFrame::Blob(other) => panic!("no blob traffic but output offers expected: {other:?}"),
                };
                match msg {
                    AgentMsg::Heartbeat(hb) => self.send(ControllerMsg::HeartbeatAck { seq: hb.seq }).await,
                    other => return other,
                }
            }
        }

        async fn finished(&mut self, id: AttemptId) -> AttemptOutcome {
            loop {
                if let AgentMsg::AttemptFinished { attempt_id, outcome } = self.recv().await {
                    if attempt_id == id {
                        return outcome;
                    }
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_daemon_adopts_or_stops_runs_and_reaps_containers() {
        let docker = docker_client().await;
        let agent = Agent::new("daemon");
        // A container left by a previous agent process.
        let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
        let mut previous = DockerRuntime::new(agent.config(), tx);
        previous.start(agent.request(1, &["--sleep-ms", "120000"]));
        let mut seen = Seen::default();
        watch_until(&mut rx, AttemptId(1), &mut seen, |s| s.started.is_some()).await;
        drop(previous);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token = Token("t0ken".into());
        let opts = AgentOptions {
            link: cosmos_agent::daemon::ControllerLink::Dial(listener.local_addr().unwrap().to_string()),
            token: token.clone(),
            name: agent.name.clone(),
            work_dir: agent.dir.path().to_path_buf(),
            gpus: daemon::parse_simulated_gpus("2x80GiB").unwrap(),
            gpus_simulated: true,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            config: AgentConfig { heartbeat_interval_ms: 100, stop_grace_ms: 1_000, ..AgentConfig::default() },
            reconnect_min_ms: 50,
            reconnect_max_ms: 500,
            runtime: RuntimeKind::Docker(agent.config()),
            cache_max_bytes: cosmos_agent::blobs::CACHE_BYTES_MAX_DEFAULT,
            job_supervisor: cosmos_agent::supervise::Launcher::standalone(
                env!("CARGO_BIN_EXE_cosmos-job-supervise").into(),
            ),
            nvml: Default::default(),
            trace: None,
            metrics_listen: None,
            retention: Default::default(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(opts, async move {
            let _ = stopped.await;
        }));

        let (socket, _) = tokio::time::timeout(WAIT, listener.accept()).await.unwrap().unwrap();
        let mut conn = Connection::new(socket, FRAME_BYTES_MAX_DEFAULT);
        handshake::accept(&mut conn, "controller", Role::Agent, &token, 10_000).await.unwrap();
        let mut ctl = Controller { conn };
        let AgentMsg::Hello(hello) = ctl.recv().await else { panic!("a hello first") };
        assert_eq!(hello.runtime, "docker");
        assert!(
            hello
                .attempts
                .iter()
                .any(|r| r.attempt_id == AttemptId(1) && matches!(r.phase, AttemptPhase::Running { .. })),
            "the running container is adopted: {:?}",
            hello.attempts
        );

        // The controller does not keep it: it is stopped and removed.
        ctl.send(ControllerMsg::Welcome { epoch: Epoch(2), heartbeat_interval_ms: 100 }).await;
        ctl.send(ControllerMsg::Reconcile { epoch: Epoch(2), keep: vec![] }).await;
        assert_eq!(ctl.finished(AttemptId(1)).await, AttemptOutcome::Cancelled);
        assert!(agent.containers(&docker).await.is_empty());

        // A job runs to success, with its output.
        let mut spec = JobSpec::command("d", ["/testjob", "--steps", "2", "--step-ms", "10", "--write", "out.txt=x"]);
        spec.image = Some(IMAGE.into());
        spec.outputs.push(OutputArtifact { path: "out.txt".into(), required: true });
        let assign = Assign {
            epoch: Epoch(2),
            attempt_id: AttemptId(2),
            job_id: JobId(2),
            spec,
            gpu_uuids: vec![hello.gpus[1].uuid.clone()],
            trace: TraceContext::default(),
        };
        ctl.send(ControllerMsg::Assign(Box::new(assign))).await;
        match ctl.finished(AttemptId(2)).await {
            AttemptOutcome::Succeeded { outputs } => assert_eq!(outputs[0].path, "out.txt"),
            other => panic!("succeeded: {other:?}"),
        }

        // A container of this agent that no attempt claims goes at the next reconcile.
        let (tx, mut rx) = mpsc::channel(EVENT_QUEUE_LEN);
        let mut stray = DockerRuntime::new(agent.config(), tx);
        stray.start(agent.request(3, &["--sleep-ms", "120000"]));
        let mut seen = Seen::default();
        watch_until(&mut rx, AttemptId(3), &mut seen, |s| s.started.is_some()).await;
        drop(stray);
        ctl.send(ControllerMsg::Reconcile { epoch: Epoch(2), keep: vec![] }).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        while !agent.containers(&docker).await.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the reaper removes the stray container");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let _ = stop.send(());
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    }
}
