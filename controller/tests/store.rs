//! The durable store, through its public API: exact round trips, epochs, durability across
//! reopen, live-attempt filtering, batch atomicity and schema-version refusal.

use cosmos_controller::records::{
    AgentRecord, AttemptRecord, AttemptState, EventRecord, Idempotency, JobRecord, JobState, Snapshot, StoreOp,
};
use cosmos_controller::store::{Store, StoreError};
use cosmos_proto::Classify;
use cosmos_proto::spec::{ArtifactRef, InputArtifact, Mount, OutputArtifact};
use cosmos_proto::{AttemptId, Epoch, GpuInfo, JobId, JobSpec, Sha256};
use std::path::Path;
use std::time::Duration;

fn spec(name: &str) -> JobSpec {
    let mut spec = JobSpec::command(name, ["python3", "-m", "cosmos_transfer1.inference", "--prompt", "«un chat» 🐈"]);
    spec.image = Some("nvcr.io/nvidia/cosmos-transfer1:1.0".to_string());
    spec.env.insert("HF_HOME".to_string(), "/cache/hf".to_string());
    spec.env.insert("PROMPT".to_string(), "ein Hund läuft über die Straße".to_string());
    spec.mounts.push(Mount { volume: "checkpoints".to_string(), target: "/checkpoints".to_string(), read_only: true });
    spec.inputs.push(InputArtifact {
        sha256: Sha256([0x5a; 32]),
        size_bytes: 73_400_320,
        path: "inputs/color.mp4".to_string(),
    });
    spec.outputs.push(OutputArtifact { path: "outputs/out.mp4".to_string(), required: true });
    spec.gpus = 8;
    spec.min_free_vram_bytes = 70 * (1 << 30);
    spec.timeout_ms = 6 * 3600 * 1000;
    spec.max_attempts = 5;
    spec.priority = -3;
    spec.shm_bytes = Some(64 << 30);
    spec.ipc_host = true;
    spec.labels.insert("team".to_string(), "視覚".to_string());
    spec
}

/// A job with every optional field set.
fn finished_job(id: u64) -> JobRecord {
    JobRecord {
        id: JobId(id),
        spec: spec(&format!("transfer-{id} — résumé")),
        state: JobState::Succeeded,
        attempts_used: 2,
        attempts_lost: 1,
        cancel_requested: false,
        not_before_ms: 1_700_000_123_456,
        exit_code: Some(0),
        error: Some("attempt att-7 ran out of memory; retried".to_string()),
        outputs: vec![ArtifactRef {
            path: "outputs/out.mp4".to_string(),
            sha256: Sha256([0xc3; 32]),
            size_bytes: u64::from(u32::MAX) + 17,
        }],
        agent: Some("gpu-node-ä1".to_string()),
        submitted_ms: 1_700_000_000_000,
        finished_ms: Some(1_700_000_999_999),
        idempotency: Some(Idempotency { key: "cli-1f2e".to_string(), request_sha256: "ab".repeat(32) }),
        started_ms: Some(1_700_000_000_500),
        gpu_ms: 4_000,
        retries: 1,
        after: Vec::new(),
        inputs_from: Vec::new(),
    }
}

/// A job with every optional field unset.
fn queued_job(id: u64) -> JobRecord {
    JobRecord {
        id: JobId(id),
        spec: JobSpec::command("plain", ["true"]),
        state: JobState::Queued,
        attempts_used: 0,
        attempts_lost: 0,
        cancel_requested: true,
        not_before_ms: 0,
        exit_code: None,
        error: None,
        outputs: Vec::new(),
        agent: None,
        submitted_ms: 1_700_000_000_001,
        finished_ms: None,
        idempotency: None,
        started_ms: None,
        gpu_ms: 0,
        retries: 0,
        after: Vec::new(),
        inputs_from: Vec::new(),
    }
}

fn attempt(id: u64, job: u64, state: AttemptState) -> AttemptRecord {
    AttemptRecord {
        id: AttemptId(id),
        job_id: JobId(job),
        agent: "gpu-node-ä1".to_string(),
        gpu_uuids: vec!["GPU-0f3c2a1e-aaaa".to_string(), "GPU-0f3c2a1e-bbbb".to_string()],
        epoch: Epoch(3),
        state,
        assigned_ms: 1_700_000_000_500 + id,
        started_ms: None,
        ended_ms: None,
        exit_code: None,
        reason: None,
    }
}

fn failed_attempt(id: u64, job: u64) -> AttemptRecord {
    AttemptRecord {
        started_ms: Some(1_700_000_001_000),
        ended_ms: Some(1_700_000_002_000),
        exit_code: Some(-9),
        reason: Some("killed: CUDA out of memory on GPU-0f3c2a1e-aaaa".to_string()),
        ..attempt(id, job, AttemptState::Failed)
    }
}

fn agent(name: &str, draining: bool) -> AgentRecord {
    AgentRecord {
        name: name.to_string(),
        draining,
        gpus: (0..2)
            .map(|i| GpuInfo {
                index: i,
                uuid: format!("GPU-{name}-{i}"),
                name: "NVIDIA H100 80GB HBM3".to_string(),
                total_vram_bytes: 85_520_809_984,
            })
            .collect(),
        gpus_simulated: !draining,
    }
}

fn event(job: Option<u64>, attempt: Option<u64>, kind: &str) -> EventRecord {
    EventRecord {
        at_ms: 1_700_000_003_000,
        job_id: job.map(JobId),
        attempt_id: attempt.map(AttemptId),
        agent: attempt.map(|_| "gpu-node-ä1".to_string()),
        kind: kind.to_string(),
        detail: format!("{kind}: détails «ok»"),
    }
}

fn open(path: &Path) -> Store {
    Store::open(&path.join("cosmos.db")).expect("open store")
}

#[test]
fn every_record_type_round_trips_exactly() {
    let mut store = Store::open_in_memory().unwrap();
    let jobs = vec![finished_job(1), queued_job(2)];
    let attempts = [failed_attempt(7, 1), attempt(8, 1, AttemptState::Running), attempt(9, 2, AttemptState::Assigned)];
    let agents = [agent("gpu-node-ä1", false), agent("gpu-node-b2", true)];
    let events =
        [event(Some(1), Some(7), "attempt_failed"), event(None, None, "agent_lost"), event(Some(1), None, "succeeded")];

    let mut ops: Vec<StoreOp> = Vec::new();
    ops.extend(jobs.iter().cloned().map(|j| StoreOp::PutJob(Box::new(j))));
    ops.extend(attempts.iter().cloned().map(StoreOp::PutAttempt));
    ops.extend(agents.iter().cloned().map(StoreOp::PutAgent));
    ops.extend(events.iter().cloned().map(StoreOp::Event));
    store.apply(&ops).unwrap();

    assert_eq!(store.job(JobId(1)).unwrap(), Some(jobs[0].clone()));
    assert_eq!(store.job(JobId(2)).unwrap(), Some(jobs[1].clone()));
    assert_eq!(store.job(JobId(3)).unwrap(), None);
    assert_eq!(store.attempts_of(JobId(1)).unwrap(), attempts[..2].to_vec());
    assert_eq!(store.attempts_of(JobId(2)).unwrap(), attempts[2..].to_vec());
    assert_eq!(store.events_of(JobId(1)).unwrap(), vec![events[0].clone(), events[2].clone()]);
    assert_eq!(store.events_of(JobId(2)).unwrap(), Vec::new());

    let snap = store.load().unwrap();
    assert_eq!(
        snap,
        Snapshot {
            epoch: Epoch(1),
            jobs,
            live_attempts: attempts[1..].to_vec(),
            max_attempt_id: Some(AttemptId(9)),
            max_job_id: None,
            // By name, in byte order: `ä` sorts after every ASCII letter.
            agents: vec![agents[1].clone(), agents[0].clone()],
        }
    );
}

#[test]
fn puts_replace_the_previous_version() {
    let mut store = Store::open_in_memory().unwrap();
    store
        .apply(&[StoreOp::PutJob(Box::new(queued_job(1))), StoreOp::PutAttempt(attempt(1, 1, AttemptState::Assigned))])
        .unwrap();
    let mut job = finished_job(1);
    job.spec.name = "renamed".to_string();
    let done = failed_attempt(1, 1);
    store.apply(&[StoreOp::PutAttempt(done.clone()), StoreOp::PutJob(Box::new(job.clone()))]).unwrap();
    assert_eq!(store.job(JobId(1)).unwrap(), Some(job));
    assert_eq!(store.attempts_of(JobId(1)).unwrap(), vec![done]);
    assert_eq!(store.count_jobs_by_state().unwrap().iter().map(|(_, n)| n).sum::<u64>(), 1);
}

#[test]
fn epoch_increments_on_every_start_of_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(open(dir.path()).load().unwrap().epoch, Epoch(1));
    assert_eq!(open(dir.path()).load().unwrap().epoch, Epoch(2));
    let mut store = open(dir.path());
    assert_eq!(store.begin_epoch().unwrap(), Epoch(3));
    assert_eq!(store.load().unwrap().epoch, Epoch(4));
    drop(store);
    assert_eq!(open(dir.path()).begin_epoch().unwrap(), Epoch(5));
}

#[test]
fn a_reopened_store_keeps_every_applied_op() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Vec<JobRecord> = (1..=20).map(|i| if i % 2 == 0 { finished_job(i) } else { queued_job(i) }).collect();
    let live = attempt(31, 3, AttemptState::Stopping);
    {
        let mut store = open(dir.path());
        // Many small batches, as the controller's writer would commit them.
        for job in &jobs {
            store
                .apply(&[
                    StoreOp::PutJob(Box::new(job.clone())),
                    StoreOp::Event(event(Some(job.id.0), None, "submitted")),
                ])
                .unwrap();
        }
        store.apply(&[StoreOp::PutAttempt(failed_attempt(30, 2)), StoreOp::PutAttempt(live.clone())]).unwrap();
        store.apply(&[StoreOp::PutAgent(agent("n1", true))]).unwrap();
    }
    let mut store = open(dir.path());
    let snap = store.load().unwrap();
    assert_eq!(snap.jobs, jobs);
    assert_eq!(snap.live_attempts, vec![live]);
    assert_eq!(snap.max_attempt_id, Some(AttemptId(31)));
    assert_eq!(snap.agents, vec![agent("n1", true)]);
    assert_eq!(store.attempts_of(JobId(2)).unwrap(), vec![failed_attempt(30, 2)]);
    for job in &jobs {
        assert_eq!(store.events_of(job.id).unwrap(), vec![event(Some(job.id.0), None, "submitted")]);
    }
    let counts = store.count_jobs_by_state().unwrap();
    assert_eq!(counts.len(), 7, "every state is listed, zeros included");
    assert!(counts.contains(&(JobState::Queued, 10)));
    assert!(counts.contains(&(JobState::Succeeded, 10)));
    assert!(counts.contains(&(JobState::Running, 0)));
}

#[test]
fn load_returns_only_live_attempts_but_counts_every_id() {
    let mut store = Store::open_in_memory().unwrap();
    let states = cosmos_controller::records::ALL_ATTEMPT_STATES;
    let mut ops = vec![StoreOp::PutJob(Box::new(queued_job(1)))];
    ops.extend(states.iter().enumerate().map(|(i, &s)| StoreOp::PutAttempt(attempt(i as u64 + 1, 1, s))));
    // The highest id belongs to a finished attempt: ids must not be reused after a restart.
    ops.push(StoreOp::PutAttempt(failed_attempt(1000, 1)));
    store.apply(&ops).unwrap();

    let snap = store.load().unwrap();
    let live: Vec<AttemptState> = snap.live_attempts.iter().map(|a| a.state).collect();
    assert_eq!(live, [AttemptState::Assigned, AttemptState::Running, AttemptState::Stopping]);
    assert_eq!(snap.max_attempt_id, Some(AttemptId(1000)));
    assert_eq!(store.attempts_of(JobId(1)).unwrap().len(), states.len() + 1);
}

#[test]
fn an_empty_store_loads_empty() {
    let mut store = Store::open_in_memory().unwrap();
    assert_eq!(store.load().unwrap(), Snapshot { epoch: Epoch(1), ..Snapshot::default() });
    store.apply(&[]).unwrap();
}

#[test]
fn a_batch_with_a_failing_op_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();

    // An attempt of a job that does not exist breaks the attempts → jobs reference at commit.
    let orphan = vec![
        StoreOp::PutJob(Box::new(finished_job(1))),
        StoreOp::PutJob(Box::new(queued_job(2))),
        StoreOp::Event(event(Some(1), None, "succeeded")),
        StoreOp::PutAgent(agent("n1", false)),
        StoreOp::PutAttempt(attempt(5, 99, AttemptState::Running)),
    ];
    let err = store.apply(&orphan).unwrap_err();
    assert!(matches!(err, StoreError::Sqlite(_)), "{err:?}");
    assert!(!err.is_retryable());

    // An id SQLite cannot hold fails mid-batch, after earlier ops ran.
    let too_big = vec![StoreOp::PutJob(Box::new(queued_job(2))), StoreOp::PutJob(Box::new(queued_job(u64::MAX)))];
    assert!(store.apply(&too_big).is_err());

    // The same store object stays usable, and a reopen sees the same.
    for store in [store, open(dir.path())] {
        assert_eq!(store.job(JobId(1)).unwrap(), Some(queued_job(1)));
        assert_eq!(store.job(JobId(2)).unwrap(), None);
        assert_eq!(store.events_of(JobId(1)).unwrap(), Vec::new());
        assert_eq!(store.attempts_of(JobId(99)).unwrap(), Vec::new());
    }
    let snap = open(dir.path()).load().unwrap();
    assert_eq!(snap.agents, Vec::new());
    assert_eq!(snap.max_attempt_id, None);
}

#[test]
fn an_attempt_may_precede_its_job_within_one_batch() {
    let mut store = Store::open_in_memory().unwrap();
    store
        .apply(&[StoreOp::PutAttempt(attempt(1, 1, AttemptState::Assigned)), StoreOp::PutJob(Box::new(queued_job(1)))])
        .unwrap();
    assert_eq!(store.attempts_of(JobId(1)).unwrap().len(), 1);
}

#[test]
fn a_database_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cosmos.db");
    drop(Store::open(&path).unwrap());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        conn.pragma_update(None, "user_version", current + 1).unwrap();
    }
    let err = Store::open(&path).err().expect("a newer schema must be refused");
    match &err {
        StoreError::SchemaTooNew { found, known } => assert_eq!(*found, *known + 1),
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(message.contains("schema version") && message.contains("at least as new"), "{message}");
}

#[test]
fn a_row_that_does_not_decode_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cosmos.db");
    Store::open(&path).unwrap().apply(&[StoreOp::PutJob(Box::new(queued_job(4)))]).unwrap();
    rusqlite::Connection::open(&path).unwrap().execute("UPDATE jobs SET record = '{\"id\": 4}'", []).unwrap();
    let mut store = Store::open(&path).unwrap();
    let err = store.job(JobId(4)).unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { what } if what.contains("job-4")), "{err:?}");
    assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
}

#[test]
fn a_locked_database_is_a_retryable_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cosmos.db");
    let mut store = Store::open(&path).unwrap();
    store.set_busy_timeout(Duration::from_millis(20)).unwrap();
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = store.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    other.execute_batch("ROLLBACK").unwrap();
    store.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();
}

#[test]
fn the_api_reader_sees_the_writers_commits_and_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = open(dir.path());
    let reader = Store::open_reader(&dir.path().join("cosmos.db")).expect("a reader opens beside the writer");
    writer.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();
    assert_eq!(reader.job(JobId(1)).unwrap().map(|j| j.id), Some(JobId(1)));

    // Every write goes through the one writer, in the core's order; the reader refuses.
    let mut reader = reader;
    let err = reader.apply(&[StoreOp::PutJob(Box::new(queued_job(2)))]).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("readonly"), "{err}");
    assert_eq!(writer.load().unwrap().jobs.len(), 1);
}

#[test]
fn pruned_jobs_leave_with_their_attempts_and_events_and_their_ids_stay_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store
        .apply(&[
            StoreOp::PutJob(Box::new(finished_job(1))),
            StoreOp::PutJob(Box::new(finished_job(2))),
            StoreOp::PutAttempt(failed_attempt(4, 1)),
            StoreOp::PutAttempt(failed_attempt(5, 2)),
            StoreOp::Event(event(Some(2), Some(5), "finished")),
        ])
        .unwrap();
    store
        .apply(&[StoreOp::PruneJobs { jobs: vec![JobId(2)], job_id_max: JobId(2), attempt_id_max: AttemptId(5) }])
        .unwrap();
    assert!(store.job(JobId(2)).unwrap().is_none());
    assert!(store.attempts_of(JobId(2)).unwrap().is_empty());
    assert!(store.events_of(JobId(2)).unwrap().is_empty());
    assert_eq!(store.attempts_of(JobId(1)).unwrap().len(), 1);
    // A later prune with lower ids does not lower what is kept.
    store
        .apply(&[StoreOp::PruneJobs { jobs: vec![JobId(1)], job_id_max: JobId(1), attempt_id_max: AttemptId(4) }])
        .unwrap();
    drop(store);
    let snap = open(dir.path()).load().unwrap();
    assert!(snap.jobs.is_empty());
    assert_eq!((snap.max_job_id, snap.max_attempt_id), (Some(JobId(2)), Some(AttemptId(5))));
}
