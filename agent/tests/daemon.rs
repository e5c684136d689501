//! The agent's shell against a controller speaking the real protocol over
//! loopback TCP: the handshake and messages are the proto crate's own.

use cosmos_agent::core::AgentConfig;
use cosmos_agent::daemon::{self, AgentError, AgentOptions};
use cosmos_proto::frame::FRAME_BYTES_MAX_DEFAULT;
use cosmos_proto::handshake::{self, HandshakeError, Refusal, Role, Token};
use cosmos_proto::{
    AgentHello, AgentMsg, Assign, AttemptId, AttemptOutcome, AttemptPhase, Connection, ControllerMsg, Epoch, JobId,
    JobSpec, TraceContext,
};
use std::path::Path;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Guards every wait, so a broken agent fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "s3cret";

fn options(addr: String, token: &str, work_dir: &Path) -> AgentOptions {
    AgentOptions {
        controller_addr: addr,
        token: Token(token.into()),
        name: "test-agent".into(),
        work_dir: work_dir.to_path_buf(),
        gpus: daemon::parse_simulated_gpus("2x80GiB").unwrap(),
        gpus_simulated: true,
        frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
        config: AgentConfig { heartbeat_interval_ms: 100, ..AgentConfig::default() },
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        runtime: daemon::RuntimeKind::Process,
        cache_max_bytes: cosmos_agent::blobs::CACHE_BYTES_MAX_DEFAULT,
        job_supervisor: cosmos_agent::supervise::Launcher::standalone(
            env!("CARGO_BIN_EXE_cosmos-job-supervise").into(),
        ),
        nvml: Default::default(),
    }
}

/// A running agent and the switch that shuts it down.
struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    fn start(opts: AgentOptions) -> Agent {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(opts, async move {
            let _ = stopped.await;
        }));
        Agent { stop: Some(stop), task }
    }

    async fn shut_down(mut self) -> Result<(), AgentError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task).await.expect("the agent stops in time").unwrap()
    }
}

/// The controller's side of one agent connection.
struct Controller {
    conn: Connection<TcpStream>,
}

impl Controller {
    /// Accepts the next agent, runs the handshake, and reads its hello.
    async fn accept(listener: &TcpListener) -> (Controller, AgentHello) {
        let (socket, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("the agent dials").unwrap();
        let mut conn = Connection::new(socket, FRAME_BYTES_MAX_DEFAULT);
        let hello = handshake::accept(&mut conn, "controller", Role::Agent, &Token(TOKEN.into()), 10_000)
            .await
            .expect("the agent's handshake is accepted");
        assert_eq!(hello.node_id, "test-agent");
        let mut controller = Controller { conn };
        match controller.recv().await {
            Some(AgentMsg::Hello(h)) => (controller, h),
            other => panic!("the agent must open with a hello, got {other:?}"),
        }
    }

    async fn send(&mut self, msg: ControllerMsg) {
        self.conn.writer.send(&msg).await.unwrap();
    }

    /// The next message, heartbeats included (and acknowledged); `None` once the agent closed.
    async fn recv(&mut self) -> Option<AgentMsg> {
        let msg = tokio::time::timeout(WAIT, self.conn.reader.recv::<AgentMsg>()).await.expect("a message in time");
        let msg = msg.ok().flatten()?;
        if let AgentMsg::Heartbeat(hb) = &msg {
            self.send(ControllerMsg::HeartbeatAck { seq: hb.seq }).await;
        }
        Some(msg)
    }

    async fn welcome(&mut self, keep: Vec<AttemptId>) {
        self.send(ControllerMsg::Welcome { epoch: Epoch(1), heartbeat_interval_ms: 100 }).await;
        self.send(ControllerMsg::Reconcile { epoch: Epoch(1), keep }).await;
    }

    async fn assign(&mut self, attempt: u64, gpu_uuid: &str, command: &[&str]) {
        let assign = Assign {
            epoch: Epoch(1),
            attempt_id: AttemptId(attempt),
            job_id: JobId(attempt + 100),
            spec: JobSpec::command("test", command.iter().copied()),
            gpu_uuids: vec![gpu_uuid.to_string()],
            trace: TraceContext::default(),
        };
        self.send(ControllerMsg::Assign(Box::new(assign))).await;
    }
}

fn outcome_in(msg: &AgentMsg, id: AttemptId) -> Option<AttemptOutcome> {
    match msg {
        AgentMsg::AttemptFinished { attempt_id, outcome } if *attempt_id == id => Some(outcome.clone()),
        AgentMsg::Heartbeat(hb) => hb.attempts.iter().find(|r| r.attempt_id == id).and_then(|r| match &r.phase {
            AttemptPhase::Finished(outcome) => Some(outcome.clone()),
            _ => None,
        }),
        _ => None,
    }
}

#[tokio::test]
async fn the_agent_runs_an_assigned_job_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = Agent::start(options(listener.local_addr().unwrap().to_string(), TOKEN, dir.path()));

    let (mut ctl, hello) = Controller::accept(&listener).await;
    assert_eq!(hello.runtime, "process");
    assert!(hello.gpus_simulated);
    assert!(hello.attempts.is_empty());
    let uuids: Vec<&str> = hello.gpus.iter().map(|g| g.uuid.as_str()).collect();
    assert_eq!(uuids, ["GPU-sim-test-agent-0", "GPU-sim-test-agent-1"]);
    ctl.welcome(vec![]).await;
    ctl.assign(1, &hello.gpus[1].uuid, &["sh", "-c", "echo hi"]).await;

    let id = AttemptId(1);
    let mut seen = Vec::new();
    let mut heartbeats = 0;
    while heartbeats < 2 || !seen.iter().any(|m| matches!(m, AgentMsg::AttemptFinished { .. })) {
        let msg = ctl.recv().await.expect("the agent stays connected");
        if let AgentMsg::Heartbeat(hb) = &msg {
            heartbeats += 1;
            assert_eq!(hb.gpus.len(), 2);
            assert!(hb.gpus.iter().all(|g| g.healthy && g.free_vram_bytes == 80 << 30), "{hb:?}");
        } else {
            seen.push(msg);
        }
    }
    let started =
        seen.iter().position(|m| matches!(m, AgentMsg::AttemptStarted { attempt_id, .. } if *attempt_id == id));
    let logged = seen.iter().position(
        |m| matches!(m, AgentMsg::LogChunk(c) if c.attempt_id == id && String::from_utf8_lossy(&c.data).contains("hi")),
    );
    let finished =
        seen.iter().position(|m| matches!(m, AgentMsg::AttemptFinished { attempt_id, .. } if *attempt_id == id));
    let (Some(started), Some(logged), Some(finished)) = (started, logged, finished) else {
        panic!("expected started, a log with `hi` and finished: {seen:?}");
    };
    assert!(started < logged && logged < finished, "{seen:?}");
    assert_eq!(outcome_in(&seen[finished], id), Some(AttemptOutcome::Succeeded { outputs: vec![] }));

    ctl.send(ControllerMsg::AckFinished { attempt_ids: vec![id] }).await;
    // Once acknowledged, heartbeats stop listing it.
    loop {
        if let Some(AgentMsg::Heartbeat(hb)) = ctl.recv().await {
            if hb.attempts.is_empty() {
                break;
            }
        }
    }
    assert!(dir.path().join("attempts/att-1/acknowledged").exists());

    agent.shut_down().await.expect("a clean shutdown");
    // The agent closed the connection on its way out.
    while ctl.recv().await.is_some() {}
}

#[tokio::test]
async fn a_wrong_token_stops_the_agent_with_the_controllers_reason() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = Agent::start(options(listener.local_addr().unwrap().to_string(), "guess", dir.path()));
    let (socket, _) = tokio::time::timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    let mut conn = Connection::new(socket, FRAME_BYTES_MAX_DEFAULT);
    let refused = handshake::accept(&mut conn, "controller", Role::Agent, &Token(TOKEN.into()), 10_000).await;
    assert!(matches!(refused, Err(HandshakeError::RefusedPeer(Refusal::BadToken))), "{refused:?}");

    let result = tokio::time::timeout(WAIT, agent.task).await.expect("the agent gives up at once").unwrap();
    let err = result.expect_err("a refused agent stops");
    assert!(matches!(err, AgentError::Refused { refusal: Refusal::BadToken, .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("token"), "{message}");
    assert!(!message.contains("guess") && !message.contains(TOKEN), "a token leaked into: {message}");
    // No retry loop: nothing dials again.
    assert!(tokio::time::timeout(Duration::from_millis(300), listener.accept()).await.is_err());
}

#[tokio::test]
async fn a_bad_controller_address_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let result = daemon::run(options("no-port-here".into(), TOKEN, dir.path()), std::future::pending()).await;
    assert!(matches!(result, Err(AgentError::BadAddress { .. })), "{result:?}");
}

#[tokio::test]
async fn the_agent_keeps_dialing_until_the_controller_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let agent = Agent::start(options(addr.to_string(), TOKEN, dir.path()));
    tokio::time::sleep(Duration::from_millis(400)).await; // Several refused dials.
    let listener = TcpListener::bind(addr).await.unwrap();
    let (mut ctl, _hello) = Controller::accept(&listener).await;
    ctl.welcome(vec![]).await;
    while !matches!(ctl.recv().await, Some(AgentMsg::Heartbeat(_))) {}
    agent.shut_down().await.unwrap();
}

#[tokio::test]
async fn outcomes_reached_while_disconnected_are_reported_after_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = Agent::start(options(listener.local_addr().unwrap().to_string(), TOKEN, dir.path()));
    let (mut ctl, hello) = Controller::accept(&listener).await;
    ctl.welcome(vec![]).await;
    ctl.assign(5, &hello.gpus[0].uuid, &["sh", "-c", "sleep 0.5; echo late"]).await;
    while !matches!(ctl.recv().await, Some(AgentMsg::AttemptStarted { .. })) {}
    drop(ctl); // The link breaks while the job runs.

    let (mut ctl, rehello) = Controller::accept(&listener).await;
    assert_eq!(rehello.incarnation, hello.incarnation, "a reconnect, not a restart");
    let id = AttemptId(5);
    let reported = rehello.attempts.iter().find(|r| r.attempt_id == id).expect("the attempt is reported");
    ctl.welcome(vec![id]).await;
    let outcome = match &reported.phase {
        AttemptPhase::Finished(outcome) => outcome.clone(),
        _ => loop {
            if let Some(outcome) = outcome_in(&ctl.recv().await.expect("connected"), id) {
                break outcome;
            }
        },
    };
    assert_eq!(outcome, AttemptOutcome::Succeeded { outputs: vec![] });
    agent.shut_down().await.unwrap();
}

#[tokio::test]
async fn a_restarted_agent_adopts_the_attempts_it_left_running() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let agent = Agent::start(options(addr.clone(), TOKEN, dir.path()));
    let (mut ctl, hello) = Controller::accept(&listener).await;
    ctl.welcome(vec![]).await;
    ctl.assign(9, &hello.gpus[0].uuid, &["sh", "-c", "echo started; sleep 1.5; echo finished"]).await;
    while !matches!(ctl.recv().await, Some(AgentMsg::AttemptStarted { .. })) {}
    agent.shut_down().await.unwrap();

    let agent = Agent::start(options(addr, TOKEN, dir.path()));
    let (mut ctl, rehello) = Controller::accept(&listener).await;
    assert_ne!(rehello.incarnation, hello.incarnation, "a restart");
    let id = AttemptId(9);
    let report = rehello.attempts.iter().find(|r| r.attempt_id == id).expect("the attempt is reported");
    assert!(matches!(report.phase, AttemptPhase::Running { .. }), "{report:?}");
    assert_eq!(report.gpu_uuids, [hello.gpus[0].uuid.clone()]);
    ctl.welcome(vec![id]).await;
    // Its output is still followed. (Chunks read while no controller was
    // connected are not resent; the whole log stays in the attempt's directory.)
    let mut chunks = Vec::new();
    let outcome = loop {
        let msg = ctl.recv().await.expect("connected");
        if let AgentMsg::LogChunk(c) = &msg {
            chunks.push((c.offset as usize, c.data.clone()));
        }
        if let Some(outcome) = outcome_in(&msg, id) {
            break outcome;
        }
    };
    let file = std::fs::read(dir.path().join("attempts/att-9/stdout.log")).unwrap();
    assert_eq!(file, b"started\nfinished\n");
    assert!(chunks.iter().any(|(_, data)| data.ends_with(b"finished\n")), "{chunks:?}");
    for (offset, data) in &chunks {
        assert_eq!(&file[*offset..*offset + data.len()], &data[..], "chunks sit at their offsets");
    }
    // Not the restarted agent's child, but its supervisor recorded how it ended.
    assert_eq!(outcome, AttemptOutcome::Succeeded { outputs: vec![] });
    agent.shut_down().await.unwrap();
}
