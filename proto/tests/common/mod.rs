//! proptest strategies for every protocol type.

#![allow(dead_code)]

use cosmos_proto::handshake::{Hello, HelloReply, Refusal, Role, Token};
use cosmos_proto::spec::{ArtifactRef, InputArtifact, Mount, OutputArtifact};
use cosmos_proto::*;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, short: the codec must carry whatever users type.
    any::<String>().prop_map(|s| s.chars().take(24).collect())
}

fn sha() -> impl Strategy<Value = Sha256> {
    any::<[u8; 32]>().prop_map(Sha256)
}

pub fn job_spec() -> impl Strategy<Value = JobSpec> {
    (
        (text(), option::of(text()), vec(text(), 0..5), btree_map(text(), text(), 0..4)),
        (
            vec(
                (text(), text(), any::<bool>()).prop_map(|(volume, target, read_only)| Mount {
                    volume,
                    target,
                    read_only,
                }),
                0..3,
            ),
            vec(
                (sha(), any::<u64>(), text()).prop_map(|(sha256, size_bytes, path)| InputArtifact {
                    sha256,
                    size_bytes,
                    path,
                }),
                0..3,
            ),
            vec((text(), any::<bool>()).prop_map(|(path, required)| OutputArtifact { path, required }), 0..3),
        ),
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<i32>(), option::of(any::<u64>()), any::<bool>()),
        btree_map(text(), text(), 0..3),
    )
        .prop_map(
            |(
                (name, image, command, env),
                (mounts, inputs, outputs),
                (gpus, vram, timeout_ms, max_attempts, priority, shm_bytes, ipc_host),
                labels,
            )| JobSpec {
                name,
                command,
                env,
                mounts,
                inputs,
                outputs,
                gpus,
                min_free_vram_bytes: vram,
                timeout_ms,
                max_attempts,
                priority,
                shm_bytes,
                ipc_host,
                // Derived, to keep the generator's tuples within proptest's arity.
                workdir: image.as_ref().map(|i| format!("/{}", i.len())),
                terminal_exit_codes: vec![priority.rem_euclid(255) + 1],
                image,
                labels,
            },
        )
}

fn attempt_id() -> impl Strategy<Value = AttemptId> {
    any::<u64>().prop_map(AttemptId)
}

fn outcome() -> impl Strategy<Value = AttemptOutcome> {
    prop_oneof![
        vec(
            (text(), sha(), any::<u64>()).prop_map(|(path, sha256, size_bytes)| ArtifactRef {
                path,
                sha256,
                size_bytes
            }),
            0..3
        )
        .prop_map(|outputs| AttemptOutcome::Succeeded { outputs }),
        (option::of(any::<i32>()), text(), any::<bool>()).prop_map(|(exit_code, reason, retryable)| {
            AttemptOutcome::Failed { exit_code, reason, retry: Retry::when(retryable) }
        }),
        Just(AttemptOutcome::Cancelled),
        text().prop_map(|reason| AttemptOutcome::Lost { reason }),
        text().prop_map(|reason| AttemptOutcome::Rejected { reason }),
    ]
}

fn report() -> impl Strategy<Value = AttemptReport> {
    let phase = prop_oneof![
        Just(AttemptPhase::Starting),
        (any::<u32>(), any::<u32>()).prop_map(|(step, total)| AttemptPhase::Running { step, total }),
        Just(AttemptPhase::Stopping),
        outcome().prop_map(AttemptPhase::Finished),
    ];
    (attempt_id(), phase, vec(text(), 0..4)).prop_map(|(attempt_id, phase, gpu_uuids)| AttemptReport {
        attempt_id,
        phase,
        gpu_uuids,
    })
}

fn gpu_quarantine() -> impl Strategy<Value = GpuQuarantine> {
    (text(), any::<u64>(), vec(any::<u32>(), 0..4), any::<u64>())
        .prop_map(|(reason, held_bytes, pids, for_ms)| GpuQuarantine { reason, held_bytes, pids, for_ms })
}

fn gpu_usage() -> impl Strategy<Value = GpuUsage> {
    (
        (text(), any::<u64>(), any::<u64>(), any::<u64>()),
        (option::of(any::<u8>()), option::of(any::<i16>()), any::<bool>(), option::of(gpu_quarantine())),
    )
        .prop_map(
            |(
                (uuid, used_vram_bytes, free_vram_bytes, foreign_vram_bytes),
                (utilization_pct, temperature_c, healthy, quarantine),
            )| {
                GpuUsage {
                    uuid,
                    used_vram_bytes,
                    free_vram_bytes,
                    foreign_vram_bytes,
                    utilization_pct,
                    temperature_c,
                    healthy,
                    quarantine,
                }
            },
        )
}

pub fn agent_msg() -> impl Strategy<Value = AgentMsg> {
    let gpu = (any::<u32>(), text(), text(), any::<u64>()).prop_map(|(index, uuid, name, total_vram_bytes)| GpuInfo {
        index,
        uuid,
        name,
        total_vram_bytes,
    });
    let fault = prop_oneof![
        (attempt_id(), any::<u64>(), any::<u64>()).prop_map(|(attempt_id, baseline_bytes, held_bytes)| {
            GpuFault::VramNotReleased { attempt_id, baseline_bytes, held_bytes }
        }),
        text().prop_map(|detail| GpuFault::Hardware { detail }),
    ];
    prop_oneof![
        (vec(gpu, 0..4), any::<bool>(), text(), vec(report(), 0..3), any::<u64>()).prop_map(
            |(gpus, gpus_simulated, runtime, attempts, incarnation)| AgentMsg::Hello(AgentHello {
                gpus,
                gpus_simulated,
                runtime,
                attempts,
                incarnation
            })
        ),
        (any::<u64>(), vec(gpu_usage(), 0..8), vec(report(), 0..4), option::of(text())).prop_map(
            |(seq, gpus, attempts, unhealthy)| AgentMsg::Heartbeat(Heartbeat { seq, gpus, attempts, unhealthy })
        ),
        (attempt_id(), text()).prop_map(|(attempt_id, handle)| AgentMsg::AttemptStarted { attempt_id, handle }),
        (attempt_id(), any::<u32>(), any::<u32>()).prop_map(|(attempt_id, step, total)| AgentMsg::Progress {
            attempt_id,
            step,
            total
        }),
        (attempt_id(), any::<bool>(), any::<u64>(), vec(any::<u8>(), 0..300)).prop_map(
            |(attempt_id, err, offset, data)| AgentMsg::LogChunk(LogChunk {
                attempt_id,
                stream: if err { LogStream::Stderr } else { LogStream::Stdout },
                offset,
                data
            })
        ),
        (attempt_id(), outcome()).prop_map(|(attempt_id, outcome)| AgentMsg::AttemptFinished { attempt_id, outcome }),
        (text(), fault).prop_map(|(gpu_uuid, fault)| AgentMsg::GpuFault { gpu_uuid, fault }),
        text().prop_map(|gpu_uuid| AgentMsg::GpuRecovered { gpu_uuid }),
    ]
}

pub fn controller_msg() -> impl Strategy<Value = ControllerMsg> {
    prop_oneof![
        (any::<u64>(), any::<u64>())
            .prop_map(|(e, heartbeat_interval_ms)| ControllerMsg::Welcome { epoch: Epoch(e), heartbeat_interval_ms }),
        (any::<u64>(), attempt_id(), any::<u64>(), job_spec(), vec(text(), 0..8), text(), text()).prop_map(
            |(e, attempt_id, job, spec, gpu_uuids, traceparent, tracestate)| ControllerMsg::Assign(Box::new(Assign {
                epoch: Epoch(e),
                attempt_id,
                job_id: JobId(job),
                spec,
                gpu_uuids,
                trace: TraceContext { traceparent, tracestate },
            }))
        ),
        (attempt_id(), any::<u64>()).prop_map(|(attempt_id, grace_ms)| ControllerMsg::Cancel { attempt_id, grace_ms }),
        any::<bool>().prop_map(|draining| ControllerMsg::Drain { draining }),
        (any::<u64>(), vec(attempt_id(), 0..16))
            .prop_map(|(e, keep)| ControllerMsg::Reconcile { epoch: Epoch(e), keep }),
        vec(attempt_id(), 0..16).prop_map(|attempt_ids| ControllerMsg::AckFinished { attempt_ids }),
        any::<u64>().prop_map(|seq| ControllerMsg::HeartbeatAck { seq }),
        text().prop_map(|gpu_uuid| ControllerMsg::ReleaseGpu { gpu_uuid }),
    ]
}

pub fn hello() -> impl Strategy<Value = Hello> {
    (any::<bool>(), text(), text(), any::<u64>()).prop_map(|(agent, node_id, token, incarnation)| Hello {
        role: if agent { Role::Agent } else { Role::Controller },
        node_id,
        token: Token(token),
        incarnation,
    })
}

pub fn hello_reply() -> impl Strategy<Value = HelloReply> {
    prop_oneof![
        text().prop_map(|node_id| HelloReply::Accepted { node_id }),
        (any::<u16>(), any::<u16>())
            .prop_map(|(controller, agent)| HelloReply::Refused(Refusal::VersionMismatch { controller, agent })),
        Just(HelloReply::Refused(Refusal::BadToken)),
        text().prop_map(|s| HelloReply::Refused(Refusal::BadNodeId(s))),
        text().prop_map(|s| HelloReply::Refused(Refusal::Other(s))),
    ]
}

fn blob_chunk() -> impl Strategy<Value = cosmos_proto::BlobChunk> {
    (sha(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..512), any::<bool>()).prop_map(
        |(sha256, offset, data, intact)| {
            let mut chunk = cosmos_proto::BlobChunk::new(sha256, offset, data);
            if !intact {
                chunk.crc32 ^= 1;
            }
            chunk
        },
    )
}

/// Any blob message an agent may send.
pub fn agent_blob() -> impl Strategy<Value = cosmos_proto::AgentBlob> {
    use cosmos_proto::AgentBlob;
    prop_oneof![
        (sha(), any::<u64>(), any::<u32>()).prop_map(|(sha256, offset, len_bytes)| AgentBlob::Request {
            sha256,
            offset,
            len_bytes
        }),
        (sha(), any::<u64>()).prop_map(|(sha256, size_bytes)| AgentBlob::Offer { sha256, size_bytes }),
        blob_chunk().prop_map(AgentBlob::Chunk),
    ]
}

/// Any blob message the controller may send.
pub fn controller_blob() -> impl Strategy<Value = cosmos_proto::ControllerBlob> {
    use cosmos_proto::ControllerBlob;
    prop_oneof![
        blob_chunk().prop_map(ControllerBlob::Chunk),
        (sha(), text()).prop_map(|(sha256, reason)| ControllerBlob::Missing { sha256, reason }),
        (sha(), any::<u64>()).prop_map(|(sha256, have_bytes)| ControllerBlob::Resume { sha256, have_bytes }),
        (sha(), any::<u64>()).prop_map(|(sha256, have_bytes)| ControllerBlob::Ack { sha256, have_bytes }),
        sha().prop_map(|sha256| ControllerBlob::Stored { sha256 }),
        (sha(), text(), any::<bool>()).prop_map(|(sha256, reason, retryable)| ControllerBlob::Refused {
            sha256,
            reason,
            retry: Retry::when(retryable)
        }),
    ]
}
