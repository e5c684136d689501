//! The durable store, through its public API: exact round trips, epochs, durability across
//! reopen, live-attempt filtering, batch atomicity and schema-version refusal — one contract,
//! run against both backends (SQLite in a temporary file, PostgreSQL in a database of its own
//! on a throwaway server the tests share, `cosmos-pgtest`), then what only PostgreSQL has: the
//! lease, fencing, reconnecting.

use cosmos_controller::records::{
    AgentRecord, AttemptRecord, AttemptState, EventRecord, Idempotency, JobRecord, JobState, Snapshot, StoreOp,
};
use cosmos_controller::store::{Lease, Store, StoreError};
use cosmos_pgtest::{Database, Postgres};
use cosmos_proto::Classify;
use cosmos_proto::spec::{ArtifactRef, InputArtifact, Mount, OutputArtifact};
use cosmos_proto::{AttemptId, Epoch, GpuInfo, JobId, JobSpec, Sha256};
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

/// Which backend a contract test runs on.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Postgres,
}

/// One store's home: a SQLite file in a temporary directory, or a PostgreSQL database of its own.
enum Env {
    Sqlite(tempfile::TempDir),
    Postgres(Database),
}

/// The lease a test writer holds: long enough never to run out during a test.
fn lease(holder: &str) -> Lease {
    Lease {
        holder: holder.to_string(),
        api: format!("http://{holder}:7700"),
        agents: format!("{holder}:7701"),
        lease_ms: 600_000,
    }
}

impl Env {
    fn new(kind: Kind) -> Env {
        match kind {
            Kind::Sqlite => Env::Sqlite(tempfile::tempdir().unwrap()),
            Kind::Postgres => Env::Postgres(Database::create()),
        }
    }

    /// Opens (creating and migrating) the store, as the controller's writer does at start.
    fn open(&self) -> Store {
        match self {
            Env::Sqlite(dir) => Store::open(&dir.path().join("cosmos.db")).expect("open store"),
            Env::Postgres(pg) => Store::open_postgres(&pg.url(), lease("test-controller")).expect("open store"),
        }
    }

    /// Opens the store and begins an epoch, as a writer must before it writes.
    fn writer(&self) -> Store {
        let mut store = self.open();
        store.begin_epoch().unwrap();
        store
    }

    /// A read-only connection, as the API's.
    fn reader(&self) -> Store {
        match self {
            Env::Sqlite(dir) => Store::open_reader(&dir.path().join("cosmos.db")).expect("open reader"),
            Env::Postgres(pg) => Store::open_postgres_reader(&pg.url()).expect("open reader"),
        }
    }

    /// Runs SQL behind the store's back (to damage it on purpose).
    fn sql(&self, sql: &str) {
        match self {
            Env::Sqlite(dir) => {
                rusqlite::Connection::open(dir.path().join("cosmos.db")).unwrap().execute_batch(sql).unwrap()
            }
            Env::Postgres(pg) => {
                pg.psql(sql);
            }
        }
    }
}

/// Each contract test, once per backend: `sqlite::NAME` and `postgres::NAME`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::Kind::Sqlite) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(super::Kind::Postgres) } )*
        }
    };
}

contract!(
    every_record_type_round_trips_exactly,
    puts_replace_the_previous_version,
    epoch_increments_on_every_start_of_the_same_store,
    a_reopened_store_keeps_every_applied_op,
    load_returns_only_live_attempts_but_counts_every_id,
    an_empty_store_loads_empty,
    a_batch_with_a_failing_op_leaves_nothing_behind,
    an_attempt_may_precede_its_job_within_one_batch,
    a_database_from_a_newer_build_is_refused,
    a_row_that_does_not_decode_is_reported_as_corrupt,
    a_large_store_loads_every_job_in_order_and_names_the_one_that_does_not_decode,
    the_api_reader_sees_the_writers_commits_and_cannot_write,
    prompts_round_trip_and_delete,
    the_instance_id_is_made_once_and_kept,
    pruned_jobs_leave_with_their_attempts_and_events_and_their_ids_stay_taken,
);

fn every_record_type_round_trips_exactly(kind: Kind) {
    let env = Env::new(kind);
    let mut store = env.writer();
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
            epoch: Epoch(2),
            jobs: jobs.into_iter().map(Box::new).collect(),
            live_attempts: attempts[1..].to_vec(),
            max_attempt_id: Some(AttemptId(9)),
            max_job_id: None,
            // By name, in byte order: `ä` sorts after every ASCII letter.
            agents: vec![agents[1].clone(), agents[0].clone()],
        }
    );
}

fn puts_replace_the_previous_version(kind: Kind) {
    let env = Env::new(kind);
    let mut store = env.writer();
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

fn epoch_increments_on_every_start_of_the_same_store(kind: Kind) {
    let env = Env::new(kind);
    assert_eq!(env.open().load().unwrap().epoch, Epoch(1));
    assert_eq!(env.open().load().unwrap().epoch, Epoch(2));
    let mut store = env.open();
    assert_eq!(store.begin_epoch().unwrap(), Epoch(3));
    assert_eq!(store.load().unwrap().epoch, Epoch(4));
    drop(store);
    assert_eq!(env.open().begin_epoch().unwrap(), Epoch(5));
}

fn a_reopened_store_keeps_every_applied_op(kind: Kind) {
    let env = Env::new(kind);
    let jobs: Vec<JobRecord> = (1..=20).map(|i| if i % 2 == 0 { finished_job(i) } else { queued_job(i) }).collect();
    let live = attempt(31, 3, AttemptState::Stopping);
    {
        let mut store = env.writer();
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
    let mut store = env.open();
    let snap = store.load().unwrap();
    assert_eq!(snap.jobs, jobs.iter().cloned().map(Box::new).collect::<Vec<_>>());
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

fn load_returns_only_live_attempts_but_counts_every_id(kind: Kind) {
    let env = Env::new(kind);
    let mut store = env.writer();
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

fn an_empty_store_loads_empty(kind: Kind) {
    let env = Env::new(kind);
    let mut store = env.open();
    assert_eq!(store.load().unwrap(), Snapshot { epoch: Epoch(1), ..Snapshot::default() });
    store.apply(&[]).unwrap();
}

fn a_batch_with_a_failing_op_leaves_nothing_behind(kind: Kind) {
    let env = Env::new(kind);
    let mut store = env.writer();
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
    assert!(matches!(err, StoreError::Sqlite(_) | StoreError::Postgres(_)), "{err:?}");
    assert!(!err.is_retryable(), "{err:?}");

    // An id the database cannot hold fails mid-batch, after earlier ops ran.
    let too_big = vec![StoreOp::PutJob(Box::new(queued_job(2))), StoreOp::PutJob(Box::new(queued_job(u64::MAX)))];
    assert!(store.apply(&too_big).is_err());

    // The same store object stays usable, and a reopen sees the same.
    for store in [store, env.open()] {
        assert_eq!(store.job(JobId(1)).unwrap(), Some(queued_job(1)));
        assert_eq!(store.job(JobId(2)).unwrap(), None);
        assert_eq!(store.events_of(JobId(1)).unwrap(), Vec::new());
        assert_eq!(store.attempts_of(JobId(99)).unwrap(), Vec::new());
    }
    let snap = env.open().load().unwrap();
    assert_eq!(snap.agents, Vec::new());
    assert_eq!(snap.max_attempt_id, None);
}

fn an_attempt_may_precede_its_job_within_one_batch(kind: Kind) {
    let env = Env::new(kind);
    let mut store = env.writer();
    store
        .apply(&[StoreOp::PutAttempt(attempt(1, 1, AttemptState::Assigned)), StoreOp::PutJob(Box::new(queued_job(1)))])
        .unwrap();
    assert_eq!(store.attempts_of(JobId(1)).unwrap().len(), 1);
}

fn a_database_from_a_newer_build_is_refused(kind: Kind) {
    let env = Env::new(kind);
    drop(env.open());
    match kind {
        Kind::Sqlite => env.sql("PRAGMA user_version = 3"),
        Kind::Postgres => env.sql("UPDATE cosmos_schema SET version = 3"),
    }
    for err in [env.open_err(), env.reader_err()] {
        match &err {
            StoreError::SchemaTooNew { found, known } => assert_eq!((*found, *known), (3, 2)),
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
        assert!(!err.is_retryable());
        let message = err.to_string();
        assert!(message.contains("schema version") && message.contains("at least as new"), "{message}");
    }
}

impl Env {
    fn open_err(&self) -> StoreError {
        match self {
            Env::Sqlite(dir) => Store::open(&dir.path().join("cosmos.db")).err(),
            Env::Postgres(pg) => Store::open_postgres(&pg.url(), lease("test-controller")).err(),
        }
        .expect("the store must be refused")
    }

    fn reader_err(&self) -> StoreError {
        match self {
            // SQLite's reader does not migrate: the writer's check is the one that counts there.
            Env::Sqlite(_) => self.open_err(),
            Env::Postgres(pg) => Store::open_postgres_reader(&pg.url()).err().expect("the store must be refused"),
        }
    }
}

fn a_row_that_does_not_decode_is_reported_as_corrupt(kind: Kind) {
    let env = Env::new(kind);
    env.writer().apply(&[StoreOp::PutJob(Box::new(queued_job(4)))]).unwrap();
    env.sql("UPDATE jobs SET record = '{\"id\": 4}'");
    let mut store = env.open();
    let err = store.job(JobId(4)).unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { what } if what.contains("job-4")), "{err:?}");
    assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
}

/// Large enough that the load decodes on several threads (a restart with a million jobs does).
fn a_large_store_loads_every_job_in_order_and_names_the_one_that_does_not_decode(kind: Kind) {
    let env = Env::new(kind);
    let jobs: Vec<JobRecord> = (1..=20_000).map(|i| if i % 3 == 0 { finished_job(i) } else { queued_job(i) }).collect();
    let ops: Vec<StoreOp> = jobs.iter().map(|j| StoreOp::PutJob(Box::new(j.clone()))).collect();
    env.writer().apply(&ops).unwrap();
    let loaded = env.open().load().unwrap().jobs;
    assert_eq!(loaded.len(), jobs.len());
    for (got, want) in loaded.iter().zip(&jobs) {
        assert_eq!(**got, *want);
    }
    env.sql("UPDATE jobs SET record = '{\"id\": 12345}' WHERE id = 12345");
    let err = env.open().load().unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { what } if what.starts_with("job-12345: ")), "{err:?}");
}

fn the_api_reader_sees_the_writers_commits_and_cannot_write(kind: Kind) {
    let env = Env::new(kind);
    let mut writer = env.writer();
    let reader = env.reader();
    writer.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();
    assert_eq!(reader.job(JobId(1)).unwrap().map(|j| j.id), Some(JobId(1)));

    // Every write goes through the one writer, in the core's order; the reader refuses.
    let mut reader = reader;
    let err = reader.apply(&[StoreOp::PutJob(Box::new(queued_job(2)))]).unwrap_err();
    let message = err.to_string().to_lowercase();
    assert!(message.contains("readonly") || message.contains("read-only"), "{err}");
    assert_eq!(writer.load().unwrap().jobs.len(), 1);
}

fn prompts_round_trip_and_delete(kind: Kind) {
    let env = Env::new(kind);
    let mut store = env.writer();
    use cosmos_controller::cosmos::{BlobRef, Prompt, PromptVideos};
    let prompt = |id: &str, created_ms: u64| Prompt {
        id: id.to_string(),
        name: format!("robot_arm_{id}"),
        text: "a robot arm picks up a red cube «rouge»".to_string(),
        negative_prompt: "blurry".to_string(),
        videos: PromptVideos {
            color: BlobRef { sha256: Sha256([7; 32]), size_bytes: 1 << 20 },
            depth: None,
            seg: None,
        },
        parent: None,
        created_ms,
    };
    let (a, b) = (prompt("ps_b", 2), prompt("ps_a", 1));
    store.apply(&[StoreOp::PutPrompt(Box::new(a.clone())), StoreOp::PutPrompt(Box::new(b.clone()))]).unwrap();
    assert_eq!(store.prompt("ps_b").unwrap(), Some(a.clone()));
    // Oldest first.
    assert_eq!(store.prompts().unwrap(), vec![b.clone(), a]);
    store.apply(&[StoreOp::DeletePrompt("ps_b".to_string())]).unwrap();
    assert_eq!(store.prompt("ps_b").unwrap(), None);
    assert_eq!(env.reader().prompts().unwrap(), vec![b]);
}

fn the_instance_id_is_made_once_and_kept(kind: Kind) {
    let env = Env::new(kind);
    let id = env.open().instance_id().unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(env.open().instance_id().unwrap(), id);
}

// ---- SQLite only ----

#[test]
fn sqlite_a_locked_database_is_a_retryable_error() {
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
fn sqlite_in_memory_keeps_the_contract_within_one_process() {
    let mut store = Store::open_in_memory().unwrap();
    store.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();
    assert_eq!(store.load().unwrap().jobs, vec![Box::new(queued_job(1))]);
    assert_eq!(store.lease().unwrap(), None, "SQLite has one controller and no lease");
}

// ---- PostgreSQL only: the lease, fencing, reconnecting ----

fn short_lease(holder: &str, lease_ms: u64) -> Lease {
    Lease { lease_ms, ..lease(holder) }
}

#[test]
fn postgres_a_second_controller_waits_while_the_lease_runs_and_names_the_leader() {
    let pg = Database::create();
    let mut a = Store::open_postgres(&pg.url(), lease("a")).unwrap();
    assert_eq!(a.load().unwrap().epoch, Epoch(1));
    let mut b = Store::open_postgres(&pg.url(), lease("b")).unwrap();
    let err = b.load().unwrap_err();
    match &err {
        StoreError::NotLeader(info) => {
            assert_eq!((info.holder.as_str(), info.api.as_str(), info.epoch), ("a", "http://a:7700", Epoch(1)));
            assert!(info.expires_in_ms > 0, "{info:?}");
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    assert!(err.is_retryable(), "a standby retries");
    assert!(err.to_string().contains("http://a:7700"), "{err}");
    // B never took the lease, so it cannot write either.
    assert!(matches!(b.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]), Err(StoreError::NoLease)));
    // The leader keeps writing and renewing.
    a.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();
    a.renew().unwrap();
    let leader = Store::open_postgres_reader(&pg.url()).unwrap().lease().unwrap().expect("a lease row");
    assert_eq!((leader.holder.as_str(), leader.epoch), ("a", Epoch(1)));
}

#[test]
fn postgres_on_expiry_the_standby_takes_over_and_the_old_leader_is_fenced_out() {
    let pg = Database::create();
    // A short lease: A stands for a leader paused past it while B waits it out. (Not 1 ms: a
    // renewal is bounded by a third of the lease, and A's must get its answer, that it is
    // deposed, from a server that may be busy; at 1 ms it timed out under load.)
    let mut a = Store::open_postgres(&pg.url(), short_lease("a", 900)).unwrap();
    a.load().unwrap();
    a.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();
    let mut b = Store::open_postgres(&pg.url(), lease("b")).unwrap();
    let snap = loop {
        match b.load() {
            Ok(snap) => break snap,
            Err(StoreError::NotLeader(_)) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(snap.epoch, Epoch(2), "the takeover bumps the epoch agents fence on");
    assert_eq!(snap.jobs, vec![Box::new(queued_job(1))], "what A committed survives");

    // A wakes up: its next group commit is fenced out, whole, and says why.
    let err =
        a.apply(&[StoreOp::PutJob(Box::new(finished_job(1))), StoreOp::PutJob(Box::new(queued_job(2)))]).unwrap_err();
    match &err {
        StoreError::Deposed { holder, epoch, now } => {
            assert_eq!((holder.as_str(), *epoch), ("a", 1));
            assert!(now.contains('b') && now.contains("epoch 2"), "{now}");
        }
        other => panic!("expected Deposed, got {other:?}"),
    }
    assert!(!err.is_retryable(), "a deposed leader stops");
    let renewed = a.renew();
    assert!(matches!(renewed, Err(StoreError::Deposed { .. })), "{renewed:?}");
    assert_eq!(b.job(JobId(1)).unwrap(), Some(queued_job(1)));
    assert_eq!(b.job(JobId(2)).unwrap(), None);
    b.apply(&[StoreOp::PutJob(Box::new(queued_job(2)))]).unwrap();
    // A restarted A waits: B's lease runs.
    assert!(matches!(Store::open_postgres(&pg.url(), lease("a")).unwrap().load(), Err(StoreError::NotLeader(_))));
}

#[test]
fn postgres_a_second_connection_of_the_leader_writes_under_its_epoch() {
    let pg = Database::create();
    let mut a = Store::open_postgres(&pg.url(), lease("a")).unwrap();
    let epoch = a.load().unwrap().epoch;
    let mut renewer = Store::open_postgres(&pg.url(), lease("a")).unwrap();
    renewer.hold_epoch(epoch);
    renewer.renew().unwrap();
    a.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();
    // Holding an epoch that is not the lease's is fenced.
    renewer.hold_epoch(Epoch(epoch.0 + 7));
    assert!(matches!(renewer.renew(), Err(StoreError::Deposed { .. })));
}

#[test]
fn postgres_a_lost_connection_is_retryable_and_the_store_reconnects() {
    // A server of its own: it stops and restarts it.
    let mut pg = Postgres::start();
    let mut store = Store::open_postgres(&pg.url(), lease("a")).unwrap();
    store.load().unwrap();
    let reader = Store::open_postgres_reader(&pg.url()).unwrap();
    store.apply(&[StoreOp::PutJob(Box::new(queued_job(1)))]).unwrap();
    pg.stop();
    let err = store.apply(&[StoreOp::PutJob(Box::new(queued_job(2)))]).unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(reader.job(JobId(1)).unwrap_err().is_retryable());
    pg.restart();
    // Reconnected, still the leader (its lease outlived the restart): the batch goes in.
    store.apply(&[StoreOp::PutJob(Box::new(queued_job(2)))]).unwrap();
    assert_eq!(reader.job(JobId(2)).unwrap(), Some(queued_job(2)));
}

#[test]
fn postgres_a_remote_server_without_tls_is_refused_unless_the_url_accepts_it() {
    let err = Store::open_postgres("postgres://cosmos@192.0.2.7/cosmos", lease("a")).err().expect("refused");
    let message = err.to_string();
    assert!(matches!(err, StoreError::Url(_)) && message.contains("sslmode=disable"), "{message}");
    // A password never appears in messages.
    let err = Store::open_postgres("postgres://cosmos:hunter2@192.0.2.7/cosmos", lease("a")).err().expect("refused");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

fn pruned_jobs_leave_with_their_attempts_and_events_and_their_ids_stay_taken(kind: Kind) {
    let env = Env::new(kind);
    let mut store = env.writer();
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
    let snap = env.open().load().unwrap();
    assert!(snap.jobs.is_empty());
    assert_eq!((snap.max_job_id, snap.max_attempt_id), (Some(JobId(2)), Some(AttemptId(5))));
}

#[test]
fn postgres_a_renewal_the_server_does_not_answer_is_bounded_and_retryable() {
    // A server of its own: it stops every controller connection the server lists.
    let pg = Postgres::start();
    let lease_ms = 3_000;
    let mut a = Store::open_postgres(&pg.url(), short_lease("a", lease_ms)).unwrap();
    let epoch = a.load().unwrap().epoch;
    let mut renewer = Store::open_postgres(&pg.url(), short_lease("a", lease_ms)).unwrap();
    renewer.hold_epoch(epoch);
    renewer.renew().unwrap();
    // The server processes that serve this controller stop answering (as a frozen server does);
    // the kernel still acknowledges what is sent, so only a bound on the call can notice.
    let backends: Vec<i32> = pg
        .psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'cosmos-controller'")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(!backends.is_empty(), "the controller's connections are listed");
    let signal = |sig| {
        for &pid in &backends {
            // SAFETY: kill(2) on the test server's own backends.
            unsafe { libc::kill(pid, sig) };
        }
    };
    signal(libc::SIGSTOP);
    let err = renewer.renew().unwrap_err();
    signal(libc::SIGCONT);
    // A third of the lease: the renewer tries again within the lease, and stops the controller after it.
    assert!(matches!(err, StoreError::Timeout { after_ms: 1_000, .. }), "{err:?}");
    assert!(err.is_retryable(), "{err}");
    // Answered again, the same connection renews.
    renewer.renew().unwrap();
}
