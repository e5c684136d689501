//! The transport contract: what every byte stream the controller and its
//! agents talk over must do, whichever side dialed. The in-memory pipe, TCP
//! and Unix sockets are held to it in `proto/tests/transport.rs`; SSH
//! channels to real OpenSSH in `ssh/tests/sshd.rs` (which includes this file).
//!
//! Each case takes a fresh pair of connected streams: `(controller side, agent side)`.

#![allow(dead_code)]

use cosmos_proto::frame::FRAME_BYTES_MAX_DEFAULT;
use cosmos_proto::handshake::{self, DEFAULT_HANDSHAKE_TIMEOUT_MS, HandshakeError, Hello, Refusal, Role, Token};
use cosmos_proto::{AgentHello, AgentMsg, BoxStream, Connection, ControllerMsg, Epoch};
use std::time::Duration;

const TOKEN: &str = "contract-token-0123456789abcdef0123456789";
/// Guards every case, so a transport that stalls fails instead of hanging.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

fn hello(role: Role, name: &str, token: &str) -> Hello {
    Hello { role, node_id: name.into(), token: Token(token.into()), incarnation: 9 }
}

/// The controller dialed: it proves the token, then answers the agent's hello as on its own port.
async fn controller_dials(
    controller: BoxStream,
    agent: BoxStream,
    controller_token: &str,
) -> (Result<Connection<BoxStream>, HandshakeError>, Result<Connection<BoxStream>, HandshakeError>) {
    let controller_token = controller_token.to_string();
    let c = tokio::spawn(async move {
        let mut conn = Connection::new(controller, FRAME_BYTES_MAX_DEFAULT);
        let agent_name =
            handshake::dial_agent(&mut conn, &hello(Role::Controller, "controller", &controller_token), 10_000).await?;
        assert_eq!(agent_name, "gpu-host-1");
        let h = handshake::accept(&mut conn, "controller", Role::Agent, &Token(TOKEN.into()), 10_000).await?;
        assert_eq!(h.node_id, "gpu-host-1");
        Ok(conn)
    });
    let mut conn = Connection::new(agent, FRAME_BYTES_MAX_DEFAULT);
    let a = handshake::answer_controller(
        &mut conn,
        &hello(Role::Agent, "gpu-host-1", TOKEN),
        &Token(TOKEN.into()),
        DEFAULT_HANDSHAKE_TIMEOUT_MS,
        |_| async { Ok(()) },
    )
    .await
    .map(|controller_name| {
        assert_eq!(controller_name, "controller");
        conn
    });
    (c.await.expect("the controller side does not panic"), a)
}

async fn exchange(controller: &mut Connection<BoxStream>, agent: &mut Connection<BoxStream>) {
    let msg = AgentMsg::Hello(AgentHello {
        gpus: vec![],
        gpus_simulated: true,
        runtime: "process".into(),
        attempts: vec![],
        incarnation: 9,
    });
    agent.writer.send(&msg).await.unwrap();
    assert_eq!(controller.reader.recv::<AgentMsg>().await.unwrap(), Some(msg));
    let welcome = ControllerMsg::Welcome { epoch: Epoch(3), heartbeat_interval_ms: 1000 };
    controller.writer.send(&welcome).await.unwrap();
    assert_eq!(agent.reader.recv::<ControllerMsg>().await.unwrap(), Some(welcome));
}

/// A controller that dialed an agent gets through the handshake and messages flow both ways.
pub async fn handshake_then_messages(controller: BoxStream, agent: BoxStream) {
    let (c, a) = controller_dials(controller, agent, TOKEN).await;
    let (mut c, mut a) = (c.expect("controller side"), a.expect("agent side"));
    exchange(&mut c, &mut a).await;
}

/// A dialing controller with the wrong token is refused, both sides say so, and the agent never sent its token.
pub async fn a_wrong_token_is_refused(controller: BoxStream, agent: BoxStream) {
    let (c, a) = controller_dials(controller, agent, "guess-guess-guess-guess-guess-guess").await;
    assert!(matches!(c, Err(HandshakeError::Refused(Refusal::BadToken))), "{:?}", c.err());
    assert!(matches!(a, Err(HandshakeError::RefusedPeer(Refusal::BadToken))), "{:?}", a.err());
}

/// Full-size frames cross both ways byte for byte, concurrently (windows and flow control), both sides reading.
pub async fn full_frames_both_ways(controller: BoxStream, agent: BoxStream) {
    let (c, a) = controller_dials(controller, agent, TOKEN).await;
    let (c, a) = (c.unwrap(), a.unwrap());
    let payload: Vec<u8> = (0..FRAME_BYTES_MAX_DEFAULT as usize).map(|i| (i * 31 % 251) as u8).collect();
    const FRAMES: usize = 8;
    let (mut c_read, mut c_write) = c.split();
    let (mut a_read, mut a_write) = a.split();
    let p = payload.clone();
    let send_down = tokio::spawn(async move {
        for _ in 0..FRAMES {
            c_write.write_frame(&p).await.unwrap();
        }
        c_write
    });
    let p = payload.clone();
    let send_up = tokio::spawn(async move {
        for _ in 0..FRAMES {
            a_write.write_frame(&p).await.unwrap();
        }
        a_write
    });
    // Both sides read at once, as both daemons do (a reader task
    // per link). Over SSH that is required, not only usual: russh replenishes
    // a channel's window as data arrives, so its one brake is the channel's
    // queue, and a full queue stops the whole connection, the other
    // direction's window adjustments included. Reading one side while the
    // other's data piles up can then wedge both.
    let down = async {
        for _ in 0..FRAMES {
            assert!(a_read.read_frame().await.unwrap().expect("a frame") == payload[..]);
        }
    };
    let up = async {
        for _ in 0..FRAMES {
            assert!(c_read.read_frame().await.unwrap().expect("a frame") == payload[..]);
        }
    };
    tokio::join!(down, up);
    let _ = (send_down.await.unwrap(), send_up.await.unwrap());
}

/// A side that shuts its writer down is seen as a clean close between frames.
pub async fn a_shutdown_is_a_clean_close(controller: BoxStream, agent: BoxStream) {
    let (c, a) = controller_dials(controller, agent, TOKEN).await;
    let (mut c, mut a) = (c.unwrap(), a.unwrap());
    a.writer.write_frame(b"last words").await.unwrap();
    a.writer.shutdown().await.unwrap();
    assert_eq!(&c.reader.read_frame().await.unwrap().unwrap()[..], b"last words");
    assert!(c.reader.read_frame().await.unwrap().is_none(), "the close is seen as the end of the stream");
}

/// A side that goes away (its stream dropped) ends the other side's reads.
pub async fn a_dropped_peer_ends_reads(controller: BoxStream, agent: BoxStream) {
    let (c, a) = controller_dials(controller, agent, TOKEN).await;
    let (mut c, a) = (c.unwrap(), a.unwrap());
    drop(a);
    let read = c.reader.read_frame().await;
    assert!(matches!(read, Ok(None) | Err(_)), "{read:?}");
}

/// Messages queued in a burst go in one flush, in order, with a frame written behind them;
/// one over the bound is refused without disturbing the queue; nothing goes before the flush.
pub async fn queued_frames_go_in_one_flush_in_order(controller: BoxStream, agent: BoxStream) {
    let (c, a) = controller_dials(controller, agent, TOKEN).await;
    let (mut c, mut a) = (c.unwrap(), a.unwrap());
    let msgs: Vec<ControllerMsg> = (1..=3).map(|seq| ControllerMsg::HeartbeatAck { seq }).collect();
    for m in &msgs {
        c.writer.queue(m).unwrap();
    }
    let queued = c.writer.queued_bytes();
    assert!(queued > 0);
    let huge = ControllerMsg::Cancel { attempt_id: cosmos_proto::AttemptId(u64::MAX), grace_ms: u64::MAX };
    let mut small = cosmos_proto::FrameWriter::new(tokio::io::sink(), 4);
    assert!(small.queue(&huge).is_err(), "a frame over the bound is refused");
    assert_eq!(small.queued_bytes(), 0, "and queues nothing");
    // Nothing is on the wire yet.
    let early = tokio::time::timeout(Duration::from_millis(100), a.reader.read_frame()).await;
    assert!(early.is_err(), "a queued frame went before the flush: {early:?}");
    // A frame written while others are queued goes behind them.
    c.writer.write_frame(b"after the burst").await.unwrap();
    assert_eq!(c.writer.queued_bytes(), 0, "the write took the queue with it");
    for m in &msgs {
        assert_eq!(a.reader.recv::<ControllerMsg>().await.unwrap().as_ref(), Some(m));
    }
    assert_eq!(&a.reader.read_frame().await.unwrap().unwrap()[..], b"after the burst");
    c.writer.queue(&msgs[0]).unwrap();
    c.writer.flush_queued().await.unwrap();
    c.writer.flush_queued().await.unwrap();
    assert_eq!(a.reader.recv::<ControllerMsg>().await.unwrap(), Some(msgs[0].clone()), "once, for two flushes");
}

/// Runs every case, each on a fresh pair from `pair`.
pub async fn run_all<F, Fut>(mut pair: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (BoxStream, BoxStream)>,
{
    macro_rules! case {
        ($f:ident) => {{
            let (c, a) = pair().await;
            tokio::time::timeout(CASE_TIMEOUT, $f(c, a)).await.expect(concat!(stringify!($f), " finishes in time"));
        }};
    }
    case!(handshake_then_messages);
    case!(a_wrong_token_is_refused);
    case!(full_frames_both_ways);
    case!(a_shutdown_is_a_clean_close);
    case!(a_dropped_peer_ends_reads);
    case!(queued_frames_go_in_one_flush_in_order);
}
