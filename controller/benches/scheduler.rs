//! Scheduling throughput of the core, on one thread, with no I/O.
//!
//! - `placements/drain_100k`: 100,000 queued single-GPU jobs onto 1,000 hosts × 8
//!   GPUs (80 GiB). The jobs are queued first; then the agents connect (8,000
//!   placements) and attempts are reported finished one at a time, each freeing a
//!   GPU that the next job takes, until all 100,000 have been placed.
//! - `pass/*`: one scheduling pass (`reschedule`) with 100,000 jobs queued, with
//!   the cluster full, and with exactly one free GPU whose free VRAM (10 GiB) is
//!   below every queued job's floor (40 GiB).
//!
//! Run with `cargo bench -p cosmos-controller --bench scheduler`
//! (add `-- --warm-up-time 1 --measurement-time 5` to shorten).

use cosmos_controller::core::{ConnId, Core, CoreConfig, HeldBlobs, Now, Output};
use cosmos_controller::records::Snapshot;
use cosmos_proto::{
    AgentHello, AgentMsg, AttemptId, AttemptOutcome, ControllerMsg, Epoch, GpuInfo, GpuUsage, Heartbeat, JobSpec,
};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

const JOBS: usize = 100_000;
const HOSTS: usize = 1_000;
const GPUS_PER_HOST: u32 = 8;
const GIB: u64 = 1 << 30;
const NOW: Now = Now::at(1_000);

fn name(host: usize) -> String {
    format!("gpu-node-{host:04}")
}

fn conn(host: usize) -> ConnId {
    host as ConnId + 1
}

fn hello(host: usize) -> AgentHello {
    AgentHello {
        gpus: (0..GPUS_PER_HOST)
            .map(|i| GpuInfo {
                index: i,
                uuid: format!("GPU-{host:04}-{i}"),
                name: "NVIDIA H100 80GB HBM3".to_string(),
                total_vram_bytes: 80 * GIB,
            })
            .collect(),
        gpus_simulated: true,
        runtime: "simulated".to_string(),
        attempts: Vec::new(),
        incarnation: 1,
    }
}

fn job_spec(i: usize, min_free_vram_bytes: u64) -> JobSpec {
    let mut spec = JobSpec::command(
        &format!("transfer-{i}"),
        ["python3", "-m", "cosmos_transfer1.inference", "--controlnet_specs", "spec.json"],
    );
    spec.image = Some("nvcr.io/nvidia/cosmos-transfer1:1.0".to_string());
    spec.min_free_vram_bytes = min_free_vram_bytes;
    spec
}

/// A core with `JOBS` single-GPU jobs queued and no agent connected.
fn queued_core(min_free_vram_bytes: u64) -> Core {
    let mut core = Core::recover(CoreConfig::default(), Snapshot { epoch: Epoch(1), ..Default::default() }, Now::at(0));
    let specs: Vec<JobSpec> = (0..JOBS).map(|i| job_spec(i, min_free_vram_bytes)).collect();
    let mut out = Vec::new();
    core.submit(Now::at(0), specs, &mut out).expect("the batch is accepted");
    assert!(!out.iter().any(|o| matches!(o, Output::Send { .. })), "nothing placed without agents");
    core
}

/// Takes the Assigns out of `out`, as (connection, attempt), clearing it.
fn collect_assigns(out: &mut Vec<Output>, into: &mut VecDeque<(ConnId, AttemptId)>) -> usize {
    let mut n = 0;
    for o in out.drain(..) {
        if let Output::Send { conn, msg: ControllerMsg::Assign(a) } = o {
            into.push_back((conn, a.attempt_id));
            n += 1;
        }
    }
    n
}

/// Connects every agent; returns the running attempts, oldest first.
fn connect_all(core: &mut Core, hellos: Vec<AgentHello>) -> VecDeque<(ConnId, AttemptId)> {
    let mut running = VecDeque::with_capacity(HOSTS * GPUS_PER_HOST as usize);
    let mut out = Vec::new();
    for (host, hello) in hellos.into_iter().enumerate() {
        core.on_connect(NOW, conn(host), &name(host), hello, &HeldBlobs::none(), &mut out);
        collect_assigns(&mut out, &mut running);
    }
    running
}

/// Reports the oldest running attempt finished until every job has been placed.
/// Returns the number of placements (connect's included).
fn drain(core: &mut Core, hellos: Vec<AgentHello>) -> usize {
    let mut running = connect_all(core, hellos);
    let mut placed = running.len();
    let mut out = Vec::new();
    while placed < JOBS {
        let (conn, attempt_id) = running.pop_front().expect("something runs");
        let outcome = AttemptOutcome::Succeeded { outputs: Vec::new() };
        core.on_message(NOW, conn, AgentMsg::AttemptFinished { attempt_id, outcome }, &HeldBlobs::none(), &mut out);
        placed += collect_assigns(&mut out, &mut running);
    }
    placed
}

fn setup_drain() -> (Core, Vec<AgentHello>) {
    (queued_core(0), (0..HOSTS).map(hello).collect())
}

/// One timed run outside criterion, with phases, for the record.
fn report_once() {
    let t = Instant::now();
    let specs: Vec<JobSpec> = (0..JOBS).map(|i| job_spec(i, 0)).collect();
    let build = t.elapsed();
    let mut core = Core::recover(CoreConfig::default(), Snapshot { epoch: Epoch(1), ..Default::default() }, Now::at(0));
    let mut out = Vec::new();
    let t = Instant::now();
    core.submit(Now::at(0), specs, &mut out).expect("the batch is accepted");
    let submit = t.elapsed();
    let t = Instant::now();
    drop(out);
    let drop_out = t.elapsed();
    println!(
        "scheduler: build {JOBS} specs {:.1} ms; submit them in one batch {:.1} ms ({:.0} jobs/s); \
         drop its outputs {:.1} ms",
        build.as_secs_f64() * 1e3,
        submit.as_secs_f64() * 1e3,
        JOBS as f64 / submit.as_secs_f64(),
        drop_out.as_secs_f64() * 1e3,
    );
    let hellos: Vec<AgentHello> = (0..HOSTS).map(hello).collect();
    let t = Instant::now();
    let mut running = connect_all(&mut core, hellos);
    let connect = t.elapsed();
    let mut placed = running.len();
    let mut out = Vec::new();
    let t = Instant::now();
    while placed < JOBS {
        let (conn, attempt_id) = running.pop_front().unwrap();
        let outcome = AttemptOutcome::Succeeded { outputs: Vec::new() };
        core.on_message(NOW, conn, AgentMsg::AttemptFinished { attempt_id, outcome }, &HeldBlobs::none(), &mut out);
        placed += collect_assigns(&mut out, &mut running);
    }
    let completions = t.elapsed();
    let total = connect + completions;
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "scheduler: connect {HOSTS} agents ({} placements) {:.1} ms ({:.0}/s); \
         {} completions+placements {:.1} ms ({:.0}/s); all {placed} placements {:.1} ms = {:.0} placements/s",
        HOSTS * GPUS_PER_HOST as usize,
        connect.as_secs_f64() * 1e3,
        rate(HOSTS * GPUS_PER_HOST as usize, connect),
        placed - HOSTS * GPUS_PER_HOST as usize,
        completions.as_secs_f64() * 1e3,
        rate(placed - HOSTS * GPUS_PER_HOST as usize, completions),
        total.as_secs_f64() * 1e3,
        rate(placed, total),
    );
    assert_eq!(core.queue_depth(), 0);
}

/// True under `cargo bench`, false when `cargo test --all-targets` runs each bench once as a test.
fn benchmarking() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test")
}

fn placements(c: &mut Criterion) {
    if benchmarking() {
        report_once();
    }
    let mut group = c.benchmark_group("placements");
    group.sample_size(10);
    group.throughput(Throughput::Elements(JOBS as u64));
    group.bench_function("drain_100k", |b| {
        b.iter_batched(
            setup_drain,
            |(mut core, hellos)| {
                let placed = drain(&mut core, hellos);
                assert_eq!(placed, JOBS);
                core // dropped outside the measurement
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn passes(c: &mut Criterion) {
    let mut group = c.benchmark_group("pass");
    let mut out = Vec::new();

    // Full cluster: 8,000 running, 92,000 queued, no free GPU.
    let mut core = queued_core(40 * GIB);
    let running = connect_all(&mut core, (0..HOSTS).map(hello).collect());
    assert_eq!(running.len(), HOSTS * GPUS_PER_HOST as usize);
    let queued = core.queue_depth();
    assert_eq!(queued, JOBS - running.len());
    group.bench_function("full_cluster_92k_queued", |b| {
        b.iter(|| {
            core.reschedule(NOW, &mut out);
            black_box(&out);
            out.clear();
        })
    });

    // One GPU frees, but something else holds 70 GiB of it: no queued job (40 GiB floor) fits.
    let host = 0;
    let gpu0 = format!("GPU-{host:04}-0");
    let usage = GpuUsage {
        uuid: gpu0.clone(),
        used_vram_bytes: 70 * GIB,
        free_vram_bytes: 10 * GIB,
        foreign_vram_bytes: 70 * GIB,
        utilization_pct: None,
        temperature_c: None,
        healthy: true,
        quarantine: None,
    };
    core.on_message(
        NOW,
        conn(host),
        AgentMsg::Heartbeat(Heartbeat { seq: 1, gpus: vec![usage], attempts: Vec::new(), unhealthy: None }),
        &HeldBlobs::none(),
        &mut out,
    );
    out.clear();
    let holder = core.live_attempts().find(|a| a.agent == name(host) && a.gpu_uuids == [gpu0.clone()]).unwrap().id;
    let outcome = AttemptOutcome::Succeeded { outputs: Vec::new() };
    core.on_message(
        NOW,
        conn(host),
        AgentMsg::AttemptFinished { attempt_id: holder, outcome },
        &HeldBlobs::none(),
        &mut out,
    );
    assert!(!out.iter().any(|o| matches!(o, Output::Send { msg: ControllerMsg::Assign(_), .. })));
    out.clear();
    assert_eq!(core.queue_depth(), queued);
    let t = Instant::now();
    core.reschedule(NOW, &mut out);
    println!("scheduler: one pass over {queued} queued jobs, one free GPU too small for all: {:?}", t.elapsed());
    out.clear();
    group.bench_function("one_small_free_gpu_92k_queued", |b| {
        b.iter(|| {
            core.reschedule(NOW, &mut out);
            black_box(&out);
            out.clear();
        })
    });
    assert_eq!(core.queue_depth(), queued, "nothing was placed");
    group.finish();
}

criterion_group!(benches, placements, passes);
criterion_main!(benches);
