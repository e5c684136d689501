//! The agents' port: the TCP listener, each connection's handshake and
//! hello, and the connection actor that hands what an agent says to the core
//! actor, with its file work (logs, looking outputs up in the blob store)
//! done off the core's thread. Connections the controller opens itself (to a
//! listening agent, through SSH: see the hosts module) join the same path
//! after one more handshake step, [`serve_dialed`]; from the agent's hello
//! on, nothing here knows which transport a connection came over.

use crate::actor::{AgentConnected, AgentGone, AgentMessage, Claim, ClaimName, CoreActor, OutputFacts, Peer, Unclaim};
use crate::core::{ConnId, HeldBlobs};
use crate::logs::{LOG_QUEUE_CHUNKS_MAX, write_logs};
use crate::shared::Shared;
use actix::prelude::*;
use cosmos_proto::handshake::{self, DEFAULT_HANDSHAKE_TIMEOUT_MS, Role, Token};
use cosmos_proto::{AgentFrame, AgentMsg, BoxStream, Connection, ControllerMsg};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Messages waiting for one agent connection's writer before it is deemed stuck.
pub const CONN_QUEUE_LEN: usize = 4096;
/// Agent connections that may be in their handshake at once; more are closed
/// at once, so peers that connect and say nothing cannot exhaust memory or descriptors.
pub const HANDSHAKES_PENDING_MAX: usize = 64;
/// Bound on an agent's handshake and first message together.
pub const AGENT_HELLO_TIMEOUT_MS: u64 = 5_000;

/// Pause after a failed accept before the next one.
const ACCEPT_RETRY_MS: u64 = 100;

/// Connection ids, inbound and outbound alike: never reused within a process.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

fn next_conn() -> ConnId {
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

/// Accepts agent connections until the process ends, each served on a task of its own.
pub(crate) async fn accept_agents(
    listener: tokio::net::TcpListener,
    core: Addr<CoreActor>,
    token: Token,
    frame_bytes_max: u32,
    shared: Arc<Shared>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_PENDING_MAX));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an agent connection failed");
                // Out of descriptors, most likely: give closing connections time to free some.
                tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(
                %peer,
                pending_max = HANDSHAKES_PENDING_MAX,
                "too many agent connections in their handshake; closing this one"
            );
            continue;
        };
        let _ = socket.set_nodelay(true);
        actix::spawn(serve_agent(
            next_conn(),
            Box::new(socket),
            peer.to_string().into(),
            permit,
            core.clone(),
            token.clone(),
            frame_bytes_max,
            shared.clone(),
        ));
    }
}

/// The handshake and the agent's first message, or why not.
async fn agent_hello(
    c: &mut Connection<BoxStream>,
    conn: ConnId,
    peer: &Peer,
    core: &Addr<CoreActor>,
    token: &Token,
) -> Result<(cosmos_proto::Hello, cosmos_proto::AgentHello), String> {
    let check = |hello: cosmos_proto::Hello| async move {
        let claim = Claim { conn, peer: peer.clone(), incarnation: hello.incarnation };
        match core.send(ClaimName { name: hello.node_id.clone(), claim }).await {
            Ok(Err(holder)) => {
                Err(cosmos_proto::Refusal::NameInUse { name: hello.node_id, holder: holder.to_string() })
            }
            _ => Ok(()),
        }
    };
    let hello = handshake::accept_checked(c, "controller", Role::Agent, token, DEFAULT_HANDSHAKE_TIMEOUT_MS, check)
        .await
        .map_err(|e| format!("refused an agent connection: {e}"))?;
    match c.reader.read_frame().await {
        Ok(Some(payload)) => match AgentFrame::decode(&payload) {
            Ok(AgentFrame::Msg(AgentMsg::Hello(h))) => Ok((hello, h)),
            other => Err(format!("agent {} did not open with a hello: {other:?}", hello.node_id)),
        },
        other => Err(format!("agent {} did not open with a hello: {other:?}", hello.node_id)),
    }
}

/// The agent's handshake and hello within [`AGENT_HELLO_TIMEOUT_MS`]; on failure its claim goes.
async fn open_agent(
    c: &mut Connection<BoxStream>,
    conn: ConnId,
    peer: &Peer,
    core: &Addr<CoreActor>,
    token: &Token,
) -> Result<(cosmos_proto::Hello, cosmos_proto::AgentHello), String> {
    let opened =
        tokio::time::timeout(Duration::from_millis(AGENT_HELLO_TIMEOUT_MS), agent_hello(c, conn, peer, core, token))
            .await
            .unwrap_or_else(|_| Err(format!("agent said nothing acceptable within {AGENT_HELLO_TIMEOUT_MS} ms")));
    if opened.is_err() {
        core.do_send(Unclaim(conn));
    }
    opened
}

#[allow(clippy::too_many_arguments)]
async fn serve_agent(
    conn: ConnId,
    socket: BoxStream,
    peer: Peer,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
    core: Addr<CoreActor>,
    token: Token,
    frame_bytes_max: u32,
    shared: Arc<Shared>,
) {
    let mut c = Connection::new(socket, frame_bytes_max);
    let opened = open_agent(&mut c, conn, &peer, &core, &token).await;
    drop(handshake_permit);
    match opened {
        Ok((hello, agent_hello)) => {
            // Nobody waits for an inbound connection's end: the agent redials.
            let _ = start_connection(conn, c, peer, hello, agent_hello, core, shared).await;
        }
        Err(e) => tracing::warn!(%peer, "{e}"),
    }
}

/// A connection the controller opened, while it is served. Dropping it closes the connection.
pub(crate) struct DialedLink {
    ended: tokio::sync::oneshot::Receiver<String>,
    conn: Addr<AgentConnection>,
}

impl DialedLink {
    /// Resolves when the connection has ended, with why.
    pub(crate) async fn ended(&mut self) -> String {
        (&mut self.ended).await.unwrap_or_else(|_| "the connection closed".into())
    }
}

impl Drop for DialedLink {
    fn drop(&mut self) {
        self.conn.do_send(Close);
    }
}

/// Serves a connection the controller opened to a listening agent (through
/// SSH): proves the controller holds the agent token, then takes the agent's
/// handshake and hello as on the agents' port. Returns once the agent is
/// registered.
pub(crate) async fn serve_dialed(
    socket: BoxStream,
    peer: Peer,
    core: Addr<CoreActor>,
    token: Token,
    frame_bytes_max: u32,
    shared: Arc<Shared>,
) -> Result<DialedLink, String> {
    let conn = next_conn();
    let mut c = Connection::new(socket, frame_bytes_max);
    // The agent reads no incarnation from its controller: it tells controllers apart by connection.
    let hello = cosmos_proto::Hello {
        role: Role::Controller,
        node_id: "controller".into(),
        token: token.clone(),
        incarnation: 0,
    };
    handshake::dial_agent(&mut c, &hello, DEFAULT_HANDSHAKE_TIMEOUT_MS).await.map_err(|e| e.to_string())?;
    let (hello, agent_hello) = open_agent(&mut c, conn, &peer, &core, &token).await?;
    let (conn, ended) = start_connection(conn, c, peer, hello, agent_hello, core, shared).await;
    Ok(DialedLink { ended, conn })
}

/// Registers an agent whose hello arrived and serves its connection; the
/// receiver resolves, with why, when the connection has ended.
async fn start_connection(
    conn: ConnId,
    c: Connection<BoxStream>,
    peer: Peer,
    hello: cosmos_proto::Hello,
    agent_hello: cosmos_proto::AgentHello,
    core: Addr<CoreActor>,
    shared: Arc<Shared>,
) -> (Addr<AgentConnection>, tokio::sync::oneshot::Receiver<String>) {
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    let (reader, writer) = c.split();
    let facts = OutputFacts::gather(shared.blobs.clone(), HeldBlobs::wanted_in_hello(&agent_hello)).await;
    tracing::info!(%peer, agent = hello.node_id, gpus = agent_hello.gpus.len(), "agent connected");
    let (tx, rx) = mpsc::channel::<ControllerMsg>(CONN_QUEUE_LEN);
    core.do_send(AgentConnected {
        conn,
        peer,
        incarnation: hello.incarnation,
        name: hello.node_id.clone(),
        hello: agent_hello,
        facts,
        tx,
    });
    // Log chunks go to a task of their own and outputs are looked up in the
    // blob store here, off the core's thread: the actor gets messages whose
    // file work is done. A slow disk slows this agent's reads, nothing else.
    let (log_tx, log_rx) = mpsc::channel(LOG_QUEUE_CHUNKS_MAX);
    actix::spawn(write_logs(log_rx, shared.clone()));
    let facts_blobs = shared.blobs.clone();
    let incoming = futures::stream::unfold(Some(reader), move |reader| {
        let (log_tx, blobs) = (log_tx.clone(), facts_blobs.clone());
        async move {
            let mut reader = reader?;
            loop {
                match recv_frame(&mut reader).await {
                    Ok(Some(AgentFrame::Msg(AgentMsg::LogChunk(chunk)))) => {
                        if log_tx.send(chunk).await.is_err() {
                            return Some((Err("the log writer stopped".to_string()), None));
                        }
                    }
                    Ok(Some(AgentFrame::Msg(msg))) => {
                        let facts = OutputFacts::gather(blobs, HeldBlobs::wanted(&msg)).await;
                        return Some((Ok(Incoming::Msg(msg, facts)), Some(reader)));
                    }
                    Ok(Some(AgentFrame::Blob(blob))) => return Some((Ok(Incoming::Blob(blob)), Some(reader))),
                    Ok(None) => return None,
                    Err(e) => return Some((Err(e), None)),
                }
            }
        }
    });
    let (blob_tx, blob_rx) = mpsc::channel(crate::blobs::BLOB_INBOX_LEN);
    let (bulk_tx, bulk_rx) = mpsc::channel(crate::blobs::BULK_QUEUE_LEN);
    actix::spawn(crate::blobs::serve(
        shared.blobs.clone(),
        blob_rx,
        bulk_tx,
        hello.node_id.clone(),
        shared.metrics.clone(),
    ));
    let addr = AgentConnection::create(move |ctx| {
        ctx.add_stream(incoming);
        let me = ctx.address();
        actix::spawn(async move {
            let result = write_frames(writer, rx, bulk_rx).await;
            me.do_send(WriterDone(result));
        });
        AgentConnection { conn, name: hello.node_id, core, blobs: blob_tx, ended: Some(ended_tx), end_reason: None }
    });
    (addr, ended)
}

/// The next frame from an agent, told apart into message or blob traffic.
async fn recv_frame(
    reader: &mut cosmos_proto::FrameReader<tokio::io::ReadHalf<BoxStream>>,
) -> Result<Option<AgentFrame>, String> {
    match reader.read_frame().await {
        Ok(Some(payload)) => AgentFrame::decode(&payload).map(Some).map_err(|e| e.to_string()),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Control messages [`write_frames`] sends in a row while a blob frame waits,
/// before it sends that one: a flood of messages must not starve transfers.
/// Also the most it puts in one write.
const CONTROL_BURST_MAX: u32 = 8;

/// Writes what the core sends until it drops the channel (superseded, lost or
/// stuck agent) or the socket fails. Writes are not cancel-safe, so this one
/// task does them all. Control messages go first: a blob chunk is sent only
/// when none waits, so a cancel or heartbeat ack waits for one chunk at most;
/// yet after [`CONTROL_BURST_MAX`] messages in a row a waiting chunk goes next.
async fn write_frames<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: cosmos_proto::FrameWriter<W>,
    mut rx: mpsc::Receiver<ControllerMsg>,
    mut bulk: mpsc::Receiver<Vec<u8>>,
) -> Result<(), String> {
    let mut bulk_open = true;
    let mut burst = 0;
    loop {
        if burst >= CONTROL_BURST_MAX {
            burst = 0;
            if let Ok(payload) = bulk.try_recv() {
                writer.write_frame(&payload).await.map_err(|e| e.to_string())?;
                continue;
            }
        }
        tokio::select! {
            biased;
            msg = rx.recv() => match msg {
                Some(msg) => {
                    // What else is ready goes in the same write (a pass's assignments, acks).
                    writer.queue(&msg).map_err(|e| e.to_string())?;
                    burst += 1;
                    while burst < CONTROL_BURST_MAX {
                        let Ok(more) = rx.try_recv() else { break };
                        writer.queue(&more).map_err(|e| e.to_string())?;
                        burst += 1;
                    }
                    writer.flush_queued().await.map_err(|e| e.to_string())?
                }
                None => break,
            },
            payload = bulk.recv(), if bulk_open => match payload {
                Some(payload) => {
                    burst = 0;
                    writer.write_frame(&payload).await.map_err(|e| e.to_string())?
                }
                None => bulk_open = false,
            },
        }
    }
    let _ = writer.shutdown().await;
    Ok(())
}

/// One agent connection, as an actor: it feeds what the agent says to the core
/// (logs straight to their files) and lives as long as both directions do.
struct AgentConnection {
    conn: ConnId,
    name: String,
    core: Addr<CoreActor>,
    /// The connection's blob task (see [`crate::blobs`]).
    blobs: mpsc::Sender<cosmos_proto::AgentBlob>,
    /// Told why when the actor stops: whoever opened the connection reconnects.
    ended: Option<tokio::sync::oneshot::Sender<String>>,
    /// Why the connection is ending, once known.
    end_reason: Option<String>,
}

impl AgentConnection {
    fn end(&mut self, reason: String, ctx: &mut Context<Self>) {
        self.end_reason.get_or_insert(reason);
        ctx.stop();
    }
}

/// Closes the connection (its host was removed from the registry).
struct Close;
impl Message for Close {
    type Result = ();
}
impl Handler<Close> for AgentConnection {
    type Result = ();
    fn handle(&mut self, _: Close, ctx: &mut Self::Context) {
        self.end("closed by the controller".into(), ctx);
    }
}

/// A frame from an agent, with the file work its message needs already done.
enum Incoming {
    /// A message for the core, with what the blob store holds of the outputs it names.
    Msg(AgentMsg, OutputFacts),
    /// Artifact traffic, for the connection's blob task.
    Blob(cosmos_proto::AgentBlob),
}

impl Actor for AgentConnection {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.core.do_send(AgentGone(self.conn));
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(self.end_reason.take().unwrap_or_else(|| "the connection closed".into()));
        }
    }
}

impl StreamHandler<Result<Incoming, String>> for AgentConnection {
    fn handle(&mut self, item: Result<Incoming, String>, ctx: &mut Self::Context) {
        match item {
            Ok(Incoming::Blob(blob)) => {
                if self.blobs.try_send(blob).is_err() {
                    tracing::warn!(
                        agent = self.name,
                        "agent has more blob frames unanswered than the protocol allows; closing its connection"
                    );
                    self.end("the agent sent more blob frames than the protocol allows".into(), ctx);
                }
            }
            Ok(Incoming::Msg(msg, facts)) => self.core.do_send(AgentMessage(self.conn, msg, facts)),
            Err(e) => {
                tracing::warn!(agent = self.name, error = %e, "agent connection failed");
                self.end(format!("reading from the agent failed: {e}"), ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        self.end("the agent closed the connection".into(), ctx);
    }
}

struct WriterDone(Result<(), String>);
impl Message for WriterDone {
    type Result = ();
}
impl Handler<WriterDone> for AgentConnection {
    type Result = ();
    fn handle(&mut self, WriterDone(result): WriterDone, ctx: &mut Self::Context) {
        match result {
            Err(e) => {
                tracing::warn!(agent = self.name, error = %e, "writing to the agent failed");
                self.end(format!("writing to the agent failed: {e}"), ctx);
            }
            Ok(()) => self.end("the controller let the connection go (superseded, lost or stuck)".into(), ctx),
        }
    }
}

/// Looks up what the blob store holds of the outputs a message names.
impl OutputFacts {
    /// Looks the outputs up on the blocking pool.
    async fn gather(blobs: Arc<cosmos_cas::Store>, wanted: Vec<&cosmos_proto::spec::ArtifactRef>) -> OutputFacts {
        if wanted.is_empty() {
            return OutputFacts::default();
        }
        let wanted: Vec<cosmos_proto::spec::ArtifactRef> = wanted.into_iter().cloned().collect();
        let looked = tokio::task::spawn_blocking(move || {
            let mut facts = OutputFacts::default();
            for o in &wanted {
                if blobs.size(&o.sha256) != Some(o.size_bytes) {
                    continue;
                }
                facts.held.insert(o.sha256, o.size_bytes);
                if o.path == crate::cosmos::ENHANCE_RESULT {
                    let found = crate::blobs::read_enhance_stdout(&blobs, &o.sha256)
                        .map(|stdout| crate::cosmos::upsampled_prompt(&stdout).is_some())
                        .map_err(|e| e.to_string());
                    facts.upsampled.insert(o.sha256, found);
                }
            }
            facts
        })
        .await;
        // A panicked lookup holds nothing: the success becomes a retryable failure.
        looked.unwrap_or_default()
    }
}

#[cfg(test)]
mod write_frames_tests {
    use super::*;
    use cosmos_proto::{ControllerFrame, FrameReader, FrameWriter};

    #[tokio::test]
    async fn a_flood_of_messages_lets_a_waiting_blob_frame_through() {
        const FRAME_BYTES_MAX: u32 = 1 << 20;
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (rx_tx, rx) = mpsc::channel(64);
        let (bulk_tx, bulk) = mpsc::channel(1);
        for seq in 0..32 {
            rx_tx.try_send(ControllerMsg::HeartbeatAck { seq }).unwrap();
        }
        let blob = cosmos_proto::ControllerBlob::Ack { sha256: cosmos_proto::Sha256([1; 32]), have_bytes: 1 };
        bulk_tx.try_send(cosmos_proto::encode_blob(&blob).unwrap()).unwrap();
        drop((rx_tx, bulk_tx));
        write_frames(FrameWriter::new(ours, FRAME_BYTES_MAX), rx, bulk).await.unwrap();
        let mut reader = FrameReader::new(theirs, FRAME_BYTES_MAX);
        let mut frames = Vec::new();
        while let Some(payload) = reader.read_frame().await.unwrap() {
            frames.push(ControllerFrame::decode(&payload).unwrap());
        }
        let at = frames.iter().position(|f| matches!(f, ControllerFrame::Blob(_))).expect("the blob frame was sent");
        assert_eq!(at, CONTROL_BURST_MAX as usize, "{frames:?}");
        assert_eq!(frames.len(), 33);
    }
}
