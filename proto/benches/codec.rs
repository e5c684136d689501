//! Encode/decode throughput of the two hottest messages: the heartbeat every
//! agent sends every second, and the assign the controller sends per attempt.
//!
//! `cargo bench -p cosmos-proto --bench codec`; criterion reports elements/s,
//! i.e. messages per second, on one core.

use bytes::BytesMut;
use cosmos_proto::frame::{FRAME_BYTES_MAX_DEFAULT, encode_frame};
use cosmos_proto::spec::{InputArtifact, Mount, OutputArtifact};
use cosmos_proto::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

/// A heartbeat from an 8-GPU host running 4 attempts.
fn heartbeat() -> AgentMsg {
    AgentMsg::Heartbeat(Heartbeat {
        seq: 123_456,
        gpus: (0..8)
            .map(|i| GpuUsage {
                uuid: format!("GPU-8f3c2a4e-1b7d-4c55-9e0a-00000000000{i}"),
                used_vram_bytes: 41 << 30,
                free_vram_bytes: 39 << 30,
                foreign_vram_bytes: 512 << 20,
                utilization_pct: Some(97),
                temperature_c: Some(71),
                healthy: true,
                quarantine: None,
            })
            .collect(),
        attempts: (0..4)
            .map(|i| AttemptReport {
                attempt_id: AttemptId(1_000_000 + i),
                phase: AttemptPhase::Running { step: 12, total: 35 },
                gpu_uuids: vec![format!("GPU-8f3c2a4e-1b7d-4c55-9e0a-00000000000{}", i * 2)],
            })
            .collect(),
        unhealthy: None,
    })
}

/// An assign of a Cosmos Transfer run as it will look in production.
fn assign() -> ControllerMsg {
    let mut spec = JobSpec::command(
        "warehouse_robot_arm",
        [
            "torchrun",
            "--nproc_per_node=2",
            "--nnodes=1",
            "--node_rank=0",
            "cosmos_transfer1/diffusion/inference/transfer.py",
            "--checkpoint_dir",
            "checkpoints",
            "--video_save_folder",
            "outputs",
            "--controlnet_specs",
            "spec.json",
            "--num_gpus",
            "2",
        ],
    );
    spec.image = Some("cosmos-transfer1:latest".into());
    spec.gpus = 2;
    spec.min_free_vram_bytes = 60 << 30;
    spec.env.insert("HF_HOME".into(), "/hf_cache".into());
    spec.mounts.push(Mount { volume: "checkpoints".into(), target: "/workspace/checkpoints".into(), read_only: true });
    spec.inputs.push(InputArtifact { sha256: Sha256([7; 32]), size_bytes: 12 << 20, path: "inputs/color.mp4".into() });
    spec.inputs.push(InputArtifact { sha256: Sha256([9; 32]), size_bytes: 2 << 10, path: "spec.json".into() });
    spec.outputs.push(OutputArtifact { path: "outputs/output.mp4".into(), required: true });
    spec.shm_bytes = Some(8 << 30);
    spec.labels.insert("cosmos.run".into(), "rs_4f1c9a".into());
    ControllerMsg::Assign(Box::new(Assign {
        epoch: Epoch(12),
        attempt_id: AttemptId(9_876_543),
        job_id: JobId(1_234_567),
        spec,
        gpu_uuids: vec![
            "GPU-8f3c2a4e-1b7d-4c55-9e0a-000000000000".into(),
            "GPU-8f3c2a4e-1b7d-4c55-9e0a-000000000001".into(),
        ],
        trace: TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: String::new(),
        },
    }))
}

fn bench_message<M>(c: &mut Criterion, name: &str, msg: M)
where
    M: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    let mut scratch = Vec::new();
    let mut wire = BytesMut::new();
    group.bench_function("encode", |b| {
        b.iter(|| {
            scratch.clear();
            wire.clear();
            codec::encode_into(black_box(&msg), &mut scratch).unwrap();
            encode_frame(&scratch, FRAME_BYTES_MAX_DEFAULT, &mut wire).unwrap();
        })
    });
    let mut framed = BytesMut::new();
    encode_frame(&codec::encode(&msg).unwrap(), FRAME_BYTES_MAX_DEFAULT, &mut framed).unwrap();
    let framed = framed.freeze();
    println!("{name}: {} bytes on the wire", framed.len());
    let decoder = FrameDecoder::default();
    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&framed[..]);
            let frame = decoder.decode(&mut buf).unwrap().unwrap();
            black_box(codec::decode::<M>(&frame).unwrap())
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_message(c, "heartbeat", heartbeat());
    bench_message(c, "assign", assign());
}

criterion_group!(codec_benches, benches);
criterion_main!(codec_benches);
