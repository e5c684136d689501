//! The agent's shell against a controller speaking the real protocol over
//! loopback TCP: the handshake and messages are the proto crate's own.

use cosmos_agent::core::AgentConfig;
use cosmos_agent::daemon::{self, AgentError, AgentOptions};
use cosmos_proto::frame::FRAME_BYTES_MAX_DEFAULT;
use cosmos_proto::handshake::{self, HandshakeError, Refusal, Role, Token};
use cosmos_proto::{
    AgentHello, AgentMsg, Assign, AttemptId, AttemptOutcome, AttemptPhase, BoxStream, Connection, ControllerMsg, Epoch,
    JobId, JobSpec, TraceContext,
};
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Guards every wait, so a broken agent fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "s3cret";

fn options(addr: String, token: &str, work_dir: &Path) -> AgentOptions {
    AgentOptions {
        link: daemon::ControllerLink::Dial(addr),
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
        trace: None,
        metrics_listen: None,
        retention: Default::default(),
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
    conn: Connection<BoxStream>,
}

impl Controller {
    /// Accepts the next agent, runs the handshake, and reads its hello.
    async fn accept(listener: &TcpListener) -> (Controller, AgentHello) {
        let (socket, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("the agent dials").unwrap();
        let conn = Connection::new(Box::new(socket) as BoxStream, FRAME_BYTES_MAX_DEFAULT);
        Controller::agent_opens(conn).await
    }

    /// Dials a listening agent's socket: proves the token, then takes the agent's handshake and hello.
    async fn dial(path: &Path, token: &str) -> Result<(Controller, AgentHello), HandshakeError> {
        let socket = tokio::time::timeout(WAIT, async {
            loop {
                match tokio::net::UnixStream::connect(path).await {
                    Ok(s) => return s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await
        .expect("the agent listens");
        let mut conn = Connection::new(Box::new(socket) as BoxStream, FRAME_BYTES_MAX_DEFAULT);
        let controller_hello = cosmos_proto::Hello {
            role: Role::Controller,
            node_id: "controller".into(),
            token: Token(token.into()),
            incarnation: 1,
        };
        let agent = handshake::dial_agent(&mut conn, &controller_hello, 10_000).await?;
        assert_eq!(agent, "test-agent");
        Ok(Controller::agent_opens(conn).await)
    }

    async fn agent_opens(mut conn: Connection<BoxStream>) -> (Controller, AgentHello) {
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
    let acked = cosmos_agent::process::acknowledged_unix_ms(&dir.path().join("attempts/att-1"));
    assert!(acked.is_some(), "the acknowledgement is in the attempt's record");

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
    let mut conn = Connection::new(Box::new(socket) as BoxStream, FRAME_BYTES_MAX_DEFAULT);
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

fn listening(work_dir: &Path, socket: &Path) -> AgentOptions {
    let mut opts = options(String::new(), TOKEN, work_dir);
    opts.link = daemon::ControllerLink::Listen(daemon::ListenAddr::Unix { path: socket.to_path_buf(), group: None });
    opts
}

#[tokio::test]
async fn a_listening_agent_serves_the_controller_that_dials_it_and_refuses_a_second() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("agent.sock");
    let agent = Agent::start(listening(&dir.path().join("work"), &socket));

    let (mut ctl, hello) = Controller::dial(&socket, TOKEN).await.expect("the agent takes the controller");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    ctl.welcome(vec![]).await;
    ctl.assign(1, &hello.gpus[0].uuid, &["sh", "-c", "echo over-the-socket"]).await;
    let id = AttemptId(1);
    loop {
        let msg = ctl.recv().await.expect("the agent stays connected");
        if let Some(outcome) = outcome_in(&msg, id) {
            assert_eq!(outcome, AttemptOutcome::Succeeded { outputs: vec![] });
            break;
        }
    }

    // A second controller is refused, told why, while the first is served.
    let second = Controller::dial(&socket, TOKEN).await.err().expect("one controller at a time");
    let HandshakeError::Refused(Refusal::Other(reason)) = &second else { panic!("{second:?}") };
    assert!(reason.contains("one controller at a time") && reason.contains("already serves"), "{reason}");
    ctl.send(ControllerMsg::HeartbeatAck { seq: 0 }).await;
    assert!(ctl.recv().await.is_some(), "the first controller is still served");

    // Once the first goes, the next is taken.
    drop(ctl);
    let (mut ctl, _) = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(c) = Controller::dial(&socket, TOKEN).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the agent takes the next controller");
    ctl.welcome(vec![AttemptId(1)]).await;
    assert!(ctl.recv().await.is_some());
    agent.shut_down().await.expect("a clean shutdown");
    assert!(!socket.exists(), "the agent removes its socket when it stops");
}

#[tokio::test]
async fn a_listening_agent_refuses_a_controller_without_its_token_and_never_shows_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = Agent::start(listening(&dir.path().join("work"), &socket));
    let refused = Controller::dial(&socket, "guess").await.err().expect("a wrong token");
    assert!(matches!(refused, HandshakeError::Refused(Refusal::BadToken)), "{refused:?}");
    // The agent keeps listening for the right controller.
    let (mut ctl, _) = Controller::dial(&socket, TOKEN).await.expect("the right token is taken");
    ctl.welcome(vec![]).await;
    assert!(ctl.recv().await.is_some());
    agent.shut_down().await.unwrap();
}

#[tokio::test]
async fn a_socket_another_agent_serves_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let first = Agent::start(listening(&dir.path().join("work-1"), &socket));
    let (mut ctl, _) = Controller::dial(&socket, TOKEN).await.unwrap();
    ctl.welcome(vec![]).await;
    let second = daemon::run(listening(&dir.path().join("work-2"), &socket), std::future::pending()).await;
    let err = second.expect_err("the socket is in use");
    assert!(err.to_string().contains("another process accepts connections"), "{err}");
    first.shut_down().await.unwrap();
}
