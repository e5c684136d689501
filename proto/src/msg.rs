//! Messages exchanged after the handshake.
//!
//! Timestamps never cross the wire: hosts' clocks drift apart, so no
//! correctness decision may compare times taken on two machines. Durations
//! (`*_ms`) measured on one host are fine.

use crate::codec::{self, CodecError};
use crate::ids::{AttemptId, Epoch, JobId, Sha256};
use crate::retry::Retry;
use crate::spec::{ArtifactRef, JobSpec};
use serde::{Deserialize, Serialize};

/// Largest log chunk an agent sends; longer output is split.
pub const LOG_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// What an agent says to the controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message after the handshake: inventory and what is running.
    Hello(AgentHello),
    /// Periodic liveness and usage report.
    Heartbeat(Heartbeat),
    /// The attempt's container or process is running.
    AttemptStarted {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Runtime-specific handle (container id, process group id).
        handle: String,
    },
    /// Progress of an attempt, from tqdm-style `n/m` output.
    Progress {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Steps done.
        step: u32,
        /// Steps in all.
        total: u32,
    },
    /// A piece of an attempt's output.
    LogChunk(LogChunk),
    /// The attempt ended. Resent after reconnects until acknowledged.
    AttemptFinished {
        /// Which attempt.
        attempt_id: AttemptId,
        /// How it ended.
        outcome: AttemptOutcome,
    },
    /// A GPU misbehaves and should get no new work.
    GpuFault {
        /// Which GPU.
        gpu_uuid: String,
        /// What is wrong.
        fault: GpuFault,
    },
    /// A GPU reported faulty is healthy again.
    GpuRecovered {
        /// Which GPU.
        gpu_uuid: String,
    },
}

/// What the controller says to an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControllerMsg {
    /// Answer to [`AgentMsg::Hello`].
    Welcome {
        /// The controller's current epoch; older ones must be refused from now on.
        epoch: Epoch,
        /// How often the agent should send heartbeats.
        heartbeat_interval_ms: u64,
    },
    /// Run an attempt.
    Assign(Box<Assign>),
    /// Stop an attempt: graceful signal, then kill after `grace_ms`.
    Cancel {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Time between the graceful stop and the kill.
        grace_ms: u64,
    },
    /// The host is (or no longer is) draining: it gets no new work.
    Drain {
        /// True while draining.
        draining: bool,
    },
    /// After a (re)connection: keep these attempts, stop every other one.
    Reconcile {
        /// The epoch this decision was made in.
        epoch: Epoch,
        /// Attempts the controller still considers live on this agent.
        keep: Vec<AttemptId>,
    },
    /// These finished attempts are durably recorded; the agent may forget them.
    AckFinished {
        /// Which attempts.
        attempt_ids: Vec<AttemptId>,
    },
    /// Answer to a heartbeat, so the agent can tell a dead link from a quiet one.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// An operator fixed a quarantined GPU by hand: return it to scheduling now.
    ReleaseGpu {
        /// Which GPU.
        gpu_uuid: String,
    },
}

/// An order to run one attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assign {
    /// Epoch of the controller that made the decision.
    pub epoch: Epoch,
    /// The attempt to run.
    pub attempt_id: AttemptId,
    /// The job it belongs to.
    pub job_id: JobId,
    /// What to run.
    pub spec: JobSpec,
    /// Exactly the GPUs to use.
    pub gpu_uuids: Vec<String>,
    /// W3C trace context, so the agent's spans join the job's trace.
    pub trace: TraceContext,
}

/// W3C trace-context headers carried across the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// `traceparent` header value; empty when not traced.
    pub traceparent: String,
    /// `tracestate` header value.
    pub tracestate: String,
}

/// An agent's inventory and state, sent once per connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentHello {
    /// GPUs on this host.
    pub gpus: Vec<GpuInfo>,
    /// True when the GPUs are simulated rather than read through NVML.
    pub gpus_simulated: bool,
    /// Name of the container runtime (`docker`, `process`, `simulated`).
    pub runtime: String,
    /// Attempts the agent is running or has finished without acknowledgement.
    pub attempts: Vec<AttemptReport>,
    /// Changes at every agent process start, so the controller can tell a
    /// reconnect from a restart.
    pub incarnation: u64,
}

/// A GPU as discovered on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Index as the driver numbers it.
    pub index: u32,
    /// Stable identity (`GPU-…`).
    pub uuid: String,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total memory.
    pub total_vram_bytes: u64,
}

/// Periodic report of a host's live state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increments with every heartbeat on a connection.
    pub seq: u64,
    /// Usage of every GPU.
    pub gpus: Vec<GpuUsage>,
    /// State of every attempt the agent knows.
    pub attempts: Vec<AttemptReport>,
    /// Why the agent cannot start work now (e.g. its container runtime does
    /// not answer); `None` while it can. The controller gives it no new work meanwhile.
    pub unhealthy: Option<String>,
}

/// Live usage of one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuUsage {
    /// Which GPU.
    pub uuid: String,
    /// Memory in use, by anyone.
    pub used_vram_bytes: u64,
    /// Memory free, by the driver's account.
    pub free_vram_bytes: u64,
    /// Part of `used_vram_bytes` held by processes the orchestrator did not start.
    pub foreign_vram_bytes: u64,
    /// Utilisation in percent, when known.
    pub utilization_pct: Option<u8>,
    /// Temperature in degrees Celsius, when known.
    pub temperature_c: Option<i16>,
    /// False while the GPU is faulty and must get no work.
    pub healthy: bool,
    /// Why the GPU is out of scheduling, while it is (memory a job left held, a hardware error).
    pub quarantine: Option<GpuQuarantine>,
}

/// Why a GPU gets no work, as its agent reports it with every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuQuarantine {
    /// What is wrong and what to do, in words.
    pub reason: String,
    /// Memory held above the GPU's baseline when it was quarantined (0 for hardware errors).
    pub held_bytes: u64,
    /// Host pids seen holding that memory (empty: none listed, or a hardware error).
    pub pids: Vec<u32>,
    /// How long it has been quarantined, by the agent's clock.
    pub for_ms: u64,
}

impl GpuUsage {
    /// A GPU with nothing on it: all memory free, healthy, nothing known of load or heat.
    pub fn idle(gpu: &GpuInfo) -> GpuUsage {
        GpuUsage {
            uuid: gpu.uuid.clone(),
            used_vram_bytes: 0,
            free_vram_bytes: gpu.total_vram_bytes,
            foreign_vram_bytes: 0,
            utilization_pct: None,
            temperature_c: None,
            healthy: true,
            quarantine: None,
        }
    }
}

/// What an agent knows of one attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptReport {
    /// Which attempt.
    pub attempt_id: AttemptId,
    /// Where it stands.
    pub phase: AttemptPhase,
    /// GPUs it holds.
    pub gpu_uuids: Vec<String>,
}

/// Where an attempt stands on its agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AttemptPhase {
    /// Accepted, staging inputs or starting.
    Starting,
    /// Running, with progress when known.
    Running {
        /// Steps done.
        step: u32,
        /// Steps in all; zero when unknown.
        total: u32,
    },
    /// Being stopped.
    Stopping,
    /// Ended; not yet acknowledged by the controller.
    Finished(AttemptOutcome),
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// Exit code 0 and every required output present.
    Succeeded {
        /// What it produced.
        outputs: Vec<ArtifactRef>,
    },
    /// It ran and failed.
    Failed {
        /// Exit code, when it exited rather than being killed.
        exit_code: Option<i32>,
        /// What happened, in words a user understands.
        reason: String,
        /// Whether another attempt could succeed (OOM, lost device) or not (bad arguments).
        retry: Retry,
    },
    /// It was stopped on the controller's order.
    Cancelled,
    /// The agent refused the assign (stale epoch, GPU busy or unknown); it never ran.
    Rejected {
        /// Why, in words.
        reason: String,
    },
    /// The agent lost track of it (e.g. the container vanished).
    Lost {
        /// What is known.
        reason: String,
    },
}

/// Which output stream a log chunk comes from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of an attempt's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// Which attempt.
    pub attempt_id: AttemptId,
    /// Which stream.
    pub stream: LogStream,
    /// Byte offset of this chunk within its stream, so resends are harmless.
    pub offset: u64,
    /// The bytes, at most [`LOG_CHUNK_BYTES_MAX`].
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// What is wrong with a GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuFault {
    /// After an attempt ended, memory did not return to its baseline in time.
    VramNotReleased {
        /// The attempt that last used the GPU.
        attempt_id: AttemptId,
        /// Memory used before the attempt started, foreign processes' left out.
        baseline_bytes: u64,
        /// Memory still used (foreign processes' left out) when the bound ran out.
        held_bytes: u64,
    },
    /// The driver reports an error (XID, ECC, fallen off the bus).
    Hardware {
        /// The driver's words.
        detail: String,
    },
}

// ---- blobs: inputs and outputs moved in bounded chunks ----
//
// Blob frames travel beside the messages above without changing their
// encoding: a blob frame's payload starts with [`BLOB_FRAME_TAG`], a byte no
// message can start with (bincode writes an enum's variant index first, and
// both message enums have far fewer than 0xB1 variants). Receivers look at
// that byte to tell the two apart (see [`AgentFrame::decode`] and
// [`ControllerFrame::decode`]), so the cores never see blob traffic.

/// First payload byte of every blob frame.
pub const BLOB_FRAME_TAG: u8 = 0xB1;
/// Largest piece of a blob in one frame: small enough that a control message
/// queued behind one waits at most one chunk's transmission time (about a
/// millisecond on loopback, a few on a fast LAN), large enough that per-frame
/// costs (wake-ups, system calls, checksums set-up) stay small next to the copy.
/// A quarter of the default frame limit.
pub const BLOB_CHUNK_BYTES: u32 = 1024 * 1024;

/// Most blob frames an agent keeps unanswered on one connection (requests for
/// downloads plus chunks of uploads not yet acknowledged). The controller drops
/// a connection that exceeds a multiple of it, so its queue for blob work stays bounded.
pub const BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX: usize = 16;
/// Most blob frames an agent keeps unanswered for one blob (with
/// [`BLOB_CHUNK_BYTES`], 8 MiB: far above loopback's or a LAN's bandwidth-delay product).
pub const BLOB_FRAMES_IN_FLIGHT_PER_BLOB_MAX: usize = 8;

/// Blob traffic from an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentBlob {
    /// Send bytes `offset .. offset + len_bytes` of a blob (a download).
    Request {
        /// Which blob.
        sha256: Sha256,
        /// Where the range starts.
        offset: u64,
        /// How many bytes, at most [`BLOB_CHUNK_BYTES`].
        len_bytes: u32,
    },
    /// The agent is about to upload a blob: answered with [`ControllerBlob::Resume`] (where
    /// to start) or [`ControllerBlob::Stored`] (already there).
    Offer {
        /// Which blob.
        sha256: Sha256,
        /// Its whole size.
        size_bytes: u64,
    },
    /// A piece of an upload.
    Chunk(BlobChunk),
}

/// Blob traffic from the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerBlob {
    /// A piece of a download, answering [`AgentBlob::Request`].
    Chunk(BlobChunk),
    /// The controller does not hold the blob (or not that range): the attempt cannot run.
    Missing {
        /// Which blob.
        sha256: Sha256,
        /// Why, in words.
        reason: String,
    },
    /// Upload: the controller holds this many bytes; send from there on. Answers an offer,
    /// and a chunk that failed its checksum.
    Resume {
        /// Which blob.
        sha256: Sha256,
        /// Bytes held.
        have_bytes: u64,
    },
    /// Upload: a chunk was written; the controller now holds this many bytes.
    Ack {
        /// Which blob.
        sha256: Sha256,
        /// Bytes held.
        have_bytes: u64,
    },
    /// Upload: the blob is verified against its digest and in the controller's store.
    Stored {
        /// Which blob.
        sha256: Sha256,
    },
    /// Upload: the controller cannot take the blob.
    Refused {
        /// Which blob.
        sha256: Sha256,
        /// Why, in words.
        reason: String,
        /// Whether offering it again may work (the content did not match its digest) or not.
        retry: Retry,
    },
}

/// A piece of a blob, with a checksum so a corrupted piece is refetched
/// rather than found only when the whole blob fails its digest.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobChunk {
    /// Which blob.
    pub sha256: Sha256,
    /// Where the piece starts.
    pub offset: u64,
    /// CRC-32 (IEEE) of `data`.
    pub crc32: u32,
    /// The bytes, at most [`BLOB_CHUNK_BYTES`].
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for BlobChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the bytes: a chunk is up to a megabyte.
        f.debug_struct("BlobChunk")
            .field("sha256", &self.sha256)
            .field("offset", &self.offset)
            .field("crc32", &self.crc32)
            .field("len_bytes", &self.data.len())
            .finish()
    }
}

impl BlobChunk {
    /// A chunk of `data` at `offset`, with its checksum.
    pub fn new(sha256: Sha256, offset: u64, data: Vec<u8>) -> BlobChunk {
        BlobChunk { sha256, offset, crc32: crc32fast::hash(&data), data }
    }

    /// Whether the data still matches its checksum.
    pub fn is_intact(&self) -> bool {
        crc32fast::hash(&self.data) == self.crc32
    }
}

/// Encodes a blob message as a tagged frame payload.
pub fn encode_blob<B: Serialize>(blob: &B) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    out.push(BLOB_FRAME_TAG);
    codec::encode_into(blob, &mut out)?;
    Ok(out)
}

/// Appends a blob chunk's tagged payload to `out`, reserving its size first,
/// so a chunk is copied once on its way to the socket.
pub fn encode_blob_chunk_into<B: Serialize>(blob: &B, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(BLOB_FRAME_TAG);
    codec::encode_into(blob, out)
}

/// Appends the tagged payload of `ControllerBlob::Chunk(BlobChunk::new(sha256, offset, data))`
/// to `out` (a download's piece), checksumming `data` on the way, without first
/// copying it into a [`BlobChunk`] of its own: `data` can be a reused read buffer.
pub fn encode_controller_chunk_into(
    sha256: Sha256,
    offset: u64,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    // ControllerBlob::Chunk is variant 0.
    encode_chunk_variant_into("ControllerBlob", 0, sha256, offset, data, out)
}

/// Appends the tagged payload of `AgentBlob::Chunk(BlobChunk::new(sha256, offset, data))`
/// to `out` (an upload's piece), like [`encode_controller_chunk_into`].
pub fn encode_agent_chunk_into(sha256: Sha256, offset: u64, data: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    // AgentBlob::Chunk is variant 2.
    encode_chunk_variant_into("AgentBlob", 2, sha256, offset, data, out)
}

fn encode_chunk_variant_into(
    name: &'static str,
    variant_index: u32,
    sha256: Sha256,
    offset: u64,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    /// [`BlobChunk`], borrowed: serializes to the same bytes.
    #[derive(Serialize)]
    #[serde(rename = "BlobChunk")]
    struct BlobChunkRef<'a> {
        sha256: Sha256,
        offset: u64,
        crc32: u32,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    }
    /// The enum variant holding the chunk.
    struct Variant<'a> {
        name: &'static str,
        variant_index: u32,
        chunk: BlobChunkRef<'a>,
    }
    impl Serialize for Variant<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_newtype_variant(self.name, self.variant_index, "Chunk", &self.chunk)
        }
    }
    let chunk = BlobChunkRef { sha256, offset, crc32: crc32fast::hash(data), data };
    out.reserve(data.len() + 64);
    out.push(BLOB_FRAME_TAG);
    codec::encode_into(&Variant { name, variant_index, chunk }, out)
}

/// One frame from an agent: a message for the core or blob traffic.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentFrame {
    /// A message.
    Msg(AgentMsg),
    /// Blob traffic.
    Blob(AgentBlob),
}

impl AgentFrame {
    /// Decodes a frame's payload.
    pub fn decode(payload: &[u8]) -> Result<AgentFrame, CodecError> {
        match payload.split_first() {
            Some((&BLOB_FRAME_TAG, rest)) => Ok(AgentFrame::Blob(codec::decode(rest)?)),
            _ => Ok(AgentFrame::Msg(codec::decode(payload)?)),
        }
    }
}

/// One frame from the controller: a message for the core or blob traffic.
#[derive(Clone, Debug, PartialEq)]
pub enum ControllerFrame {
    /// A message.
    Msg(ControllerMsg),
    /// Blob traffic.
    Blob(ControllerBlob),
}

impl ControllerFrame {
    /// Decodes a frame's payload.
    pub fn decode(payload: &[u8]) -> Result<ControllerFrame, CodecError> {
        match payload.split_first() {
            Some((&BLOB_FRAME_TAG, rest)) => Ok(ControllerFrame::Blob(codec::decode(rest)?)),
            _ => Ok(ControllerFrame::Msg(codec::decode(payload)?)),
        }
    }
}
