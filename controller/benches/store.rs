//! Persisted state transitions per second on a file store (WAL, synchronous=FULL),
//! with 1, 100 and 1000 transitions per transaction: what group commit buys; then
//! the same on PostgreSQL (a throwaway server on loopback, fsync and
//! synchronous_commit on, the lease fence in every transaction), in the same run.
//!
//! A transition is what the core emits when an attempt changes state: the
//! attempt, its job and an event. Run with `cargo bench -p cosmos-controller --bench store`.

use cosmos_controller::records::{AttemptRecord, AttemptState, EventRecord, JobRecord, JobState, StoreOp};
use cosmos_controller::store::{Lease, Store};
use cosmos_proto::{AttemptId, Epoch, JobId, JobSpec};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Jobs the transitions rotate over; upserts of existing rows, as in a busy controller.
const JOBS: u64 = 1000;

fn job(id: u64) -> JobRecord {
    let mut spec = JobSpec::command(
        &format!("transfer-{id}"),
        ["python3", "-m", "cosmos_transfer1.inference", "--controlnet_specs", "spec.json"],
    );
    spec.image = Some("nvcr.io/nvidia/cosmos-transfer1:1.0".to_string());
    spec.gpus = 8;
    JobRecord {
        id: JobId(id),
        spec,
        state: JobState::Running,
        attempts_used: 1,
        attempts_lost: 0,
        cancel_requested: false,
        not_before_ms: 0,
        exit_code: None,
        error: None,
        outputs: Vec::new(),
        agent: Some("gpu-node-01".to_string()),
        submitted_ms: 1_700_000_000_000 + id,
        finished_ms: None,
        idempotency: None,
        started_ms: None,
        gpu_ms: 0,
        retries: 0,
        after: Vec::new(),
        inputs_from: Vec::new(),
    }
}

fn transition(i: u64) -> [StoreOp; 3] {
    let job_id = 1 + i % JOBS;
    let attempt = AttemptRecord {
        id: AttemptId(1 + i),
        job_id: JobId(job_id),
        agent: "gpu-node-01".to_string(),
        gpu_uuids: (0..8).map(|g| format!("GPU-5f1e0c3a-0000-0000-0000-00000000000{g}")).collect(),
        epoch: Epoch(1),
        state: AttemptState::Running,
        assigned_ms: 1_700_000_100_000 + i,
        started_ms: Some(1_700_000_100_500 + i),
        ended_ms: None,
        exit_code: None,
        reason: None,
    };
    let event = EventRecord {
        at_ms: 1_700_000_100_500 + i,
        job_id: Some(JobId(job_id)),
        attempt_id: Some(AttemptId(1 + i)),
        agent: Some("gpu-node-01".to_string()),
        kind: "running".to_string(),
        detail: format!("attempt att-{} started on gpu-node-01", 1 + i),
    };
    [StoreOp::PutAttempt(attempt), StoreOp::PutJob(Box::new(job(job_id))), StoreOp::Event(event)]
}

fn transitions_per_transaction(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("bench.db")).expect("open store");
    run(c, "store_file_wal_full", store);
    let pg = cosmos_pgtest::Postgres::start();
    let lease = Lease { holder: "bench".into(), api: "http://bench".into(), agents: "bench".into(), lease_ms: 600_000 };
    let mut store = Store::open_postgres(&pg.url(), lease).expect("open store");
    store.begin_epoch().expect("take the lease");
    run(c, "store_postgres", store);
}

fn run(c: &mut Criterion, name: &str, mut store: Store) {
    let jobs: Vec<StoreOp> = (1..=JOBS).map(|id| StoreOp::PutJob(Box::new(job(id)))).collect();
    store.apply(&jobs).expect("seed jobs");

    let mut group = c.benchmark_group(name);
    for per_tx in [1u64, 100, 1000] {
        let ops: Vec<StoreOp> = (0..per_tx).flat_map(transition).collect();
        group.throughput(Throughput::Elements(per_tx));
        group.bench_with_input(BenchmarkId::new("transitions_per_tx", per_tx), &ops, |b, ops| {
            b.iter(|| store.apply(ops).expect("apply"));
        });
    }
    group.finish();
}

criterion_group!(benches, transitions_per_transaction);
criterion_main!(benches);
