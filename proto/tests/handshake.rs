//! Handshakes between real endpoints, over an in-memory pipe and loopback TCP.

use cosmos_proto::Classify;
use cosmos_proto::handshake::{self, DEFAULT_HANDSHAKE_TIMEOUT_MS, HandshakeError, Hello, Refusal, Role, Token};
use cosmos_proto::{AgentHello, AgentMsg, Connection, ControllerMsg, Epoch, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

const FRAME_BYTES_MAX: u32 = 1024 * 1024;

fn agent_hello(token: &str) -> Hello {
    Hello { role: Role::Agent, node_id: "gpu-host-1".into(), token: Token(token.into()), incarnation: 7 }
}

/// Runs both sides concurrently and returns (agent's result, controller's result).
async fn handshake_pair<T: AsyncRead + AsyncWrite + Send + 'static>(
    agent_side: T,
    controller_side: T,
    hello: Hello,
) -> (Result<(String, Connection<T>), HandshakeError>, Result<(Hello, Connection<T>), HandshakeError>) {
    let controller = tokio::spawn(async move {
        let mut conn = Connection::new(controller_side, FRAME_BYTES_MAX);
        handshake::accept(&mut conn, "controller", Role::Agent, &Token("s3cret".into()), DEFAULT_HANDSHAKE_TIMEOUT_MS)
            .await
            .map(|hello| (hello, conn))
    });
    let mut conn = Connection::new(agent_side, FRAME_BYTES_MAX);
    let agent = handshake::connect(&mut conn, &hello, DEFAULT_HANDSHAKE_TIMEOUT_MS).await.map(|peer| (peer, conn));
    (agent, controller.await.unwrap())
}

/// After a successful handshake, messages flow both ways.
async fn exchange<T: AsyncRead + AsyncWrite>(agent: &mut Connection<T>, controller: &mut Connection<T>) {
    let hello = AgentMsg::Hello(AgentHello {
        gpus: vec![],
        gpus_simulated: true,
        runtime: "process".into(),
        attempts: vec![],
        incarnation: 7,
    });
    agent.writer.send(&hello).await.unwrap();
    assert_eq!(controller.reader.recv::<AgentMsg>().await.unwrap(), Some(hello));
    let welcome = ControllerMsg::Welcome { epoch: Epoch(3), heartbeat_interval_ms: 1000 };
    controller.writer.send(&welcome).await.unwrap();
    assert_eq!(agent.reader.recv::<ControllerMsg>().await.unwrap(), Some(welcome));
}

#[tokio::test]
async fn handshake_over_an_in_memory_pipe() {
    let (a, c) = tokio::io::duplex(4096);
    let (agent, controller) = handshake_pair(a, c, agent_hello("s3cret")).await;
    let (peer, mut agent_conn) = agent.unwrap();
    let (hello, mut controller_conn) = controller.unwrap();
    assert_eq!(peer, "controller");
    assert_eq!(hello.node_id, "gpu-host-1");
    exchange(&mut agent_conn, &mut controller_conn).await;
}

#[tokio::test]
async fn handshake_over_loopback_tcp() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (agent_side, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (agent, controller) = handshake_pair(agent_side.unwrap(), accepted.unwrap().0, agent_hello("s3cret")).await;
    let (mut agent_conn, mut controller_conn) = (agent.unwrap().1, controller.unwrap().1);
    exchange(&mut agent_conn, &mut controller_conn).await;
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_both_sides_say_so() {
    let (a, c) = tokio::io::duplex(4096);
    let (agent, controller) = handshake_pair(a, c, agent_hello("guess")).await;
    assert!(matches!(agent, Err(HandshakeError::Refused(Refusal::BadToken))));
    assert!(matches!(controller, Err(HandshakeError::RefusedPeer(Refusal::BadToken))));
    let message = agent.err().unwrap().to_string();
    assert!(message.contains("token"), "{message}");
    assert!(!message.contains("s3cret") && !message.contains("guess"), "a token leaked into: {message}");
}

#[tokio::test]
async fn a_peer_of_another_version_is_refused_and_both_sides_name_the_versions() {
    let (a, c) = tokio::io::duplex(4096);
    let controller = tokio::spawn(async move {
        let mut conn = Connection::new(c, FRAME_BYTES_MAX);
        handshake::accept(&mut conn, "controller", Role::Agent, &Token("s3cret".into()), DEFAULT_HANDSHAKE_TIMEOUT_MS)
            .await
    });
    // An agent of a newer release: its header says so.
    let mut conn = Connection::new(a, FRAME_BYTES_MAX);
    let payload = handshake::encode_payload_with_version(&agent_hello("s3cret"), PROTOCOL_VERSION + 1).unwrap();
    conn.writer.write_frame(&payload).await.unwrap();
    let reply = conn.reader.read_frame().await.unwrap().unwrap();
    let reply: handshake::HelloReply = handshake::decode_payload(&reply).unwrap();
    let expected = Refusal::VersionMismatch { controller: PROTOCOL_VERSION, agent: PROTOCOL_VERSION + 1 };
    assert_eq!(reply, handshake::HelloReply::Refused(expected.clone()));
    assert!(matches!(controller.await.unwrap(), Err(HandshakeError::RefusedPeer(r)) if r == expected));
    assert!(expected.to_string().contains("same cosmos release"));
}

#[tokio::test]
async fn the_wrong_role_on_a_port_is_refused() {
    let (a, c) = tokio::io::duplex(4096);
    let hello = Hello { role: Role::Controller, ..agent_hello("s3cret") };
    let (agent, _) = handshake_pair(a, c, hello).await;
    assert!(matches!(
        agent,
        Err(HandshakeError::Refused(Refusal::WrongRole { expected: Role::Agent, got: Role::Controller }))
    ));
}

#[tokio::test]
async fn an_http_client_on_the_agent_port_is_told_apart() {
    let (mut a, c) = tokio::io::duplex(4096);
    let controller = tokio::spawn(async move {
        let mut conn = Connection::new(c, FRAME_BYTES_MAX);
        handshake::accept(&mut conn, "controller", Role::Agent, &Token("s3cret".into()), DEFAULT_HANDSHAKE_TIMEOUT_MS)
            .await
    });
    a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let err = controller.await.unwrap().unwrap_err();
    assert!(matches!(err, HandshakeError::BadMagic), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_times_out() {
    let (_silent, c) = tokio::io::duplex(4096);
    let mut conn = Connection::new(c, FRAME_BYTES_MAX);
    let err = handshake::accept(&mut conn, "controller", Role::Agent, &Token("t".into()), 5_000).await.unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout { timeout_ms: 5_000 }));
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_peer_that_hangs_up_mid_handshake_is_retryable() {
    let (a, c) = tokio::io::duplex(4096);
    drop(a);
    let mut conn = Connection::new(c, FRAME_BYTES_MAX);
    let err = handshake::accept(&mut conn, "controller", Role::Agent, &Token("t".into()), 5_000).await.unwrap_err();
    assert!(matches!(err, HandshakeError::Closed));
    assert!(err.is_retryable());
}
