//! The durable store: the controller's records in SQLite (the default, embedded)
//! or PostgreSQL ([`postgres`], for controllers that fail over between hosts).
//!
//! The JSON in each `record` column is the source of truth, so a record
//! round-trips exactly whatever fields it grows; the other columns copy the
//! fields that queries filter or sort on. Every [`Store::apply`] is one
//! transaction: the caller batches many transitions into it (group commit),
//! so one fsync makes all of them durable together.

use crate::cosmos::Prompt;
use crate::records::{ALL_JOB_STATES, AgentRecord, AttemptRecord, EventRecord, JobRecord, JobState, Snapshot, StoreOp};
use cosmos_proto::{AttemptId, Epoch, JobId};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod postgres;
pub use postgres::{Lease, LeaseInfo, PgStore};

/// How long a statement waits for another connection's lock before failing with a retryable error.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one migration per entry, applied in order; `PRAGMA user_version` counts those applied.
///
/// Never edit an entry once released: append a new one, since stores in the
/// field already ran the old ones.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value ANY NOT NULL
    ) STRICT;

    CREATE TABLE jobs (
        id           INTEGER PRIMARY KEY,
        name         TEXT NOT NULL,
        state        TEXT NOT NULL,
        priority     INTEGER NOT NULL,
        submitted_ms INTEGER NOT NULL,
        record       TEXT NOT NULL
    ) STRICT;
    CREATE INDEX jobs_by_state ON jobs (state);

    -- Deferred, so a batch may name an attempt before its job as long as the job is there at commit.
    CREATE TABLE attempts (
        id          INTEGER PRIMARY KEY,
        job_id      INTEGER NOT NULL REFERENCES jobs (id) DEFERRABLE INITIALLY DEFERRED,
        agent       TEXT NOT NULL,
        state       TEXT NOT NULL,
        assigned_ms INTEGER NOT NULL,
        record      TEXT NOT NULL
    ) STRICT;
    CREATE INDEX attempts_by_job ON attempts (job_id);
    CREATE INDEX attempts_by_state ON attempts (state);

    CREATE TABLE agents (
        name   TEXT PRIMARY KEY,
        record TEXT NOT NULL
    ) STRICT;

    -- AUTOINCREMENT so a sequence number is never reused, even if old events are pruned.
    CREATE TABLE events (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms      INTEGER NOT NULL,
        job_id     INTEGER,
        attempt_id INTEGER,
        agent      TEXT,
        kind       TEXT NOT NULL,
        detail     TEXT NOT NULL
    ) STRICT;
    CREATE INDEX events_by_job ON events (job_id);
    ",
    // 2: Cosmos Transfer prompts (runs are jobs carrying `cosmos.*` labels).
    "
    CREATE TABLE prompts (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        record     TEXT NOT NULL
    ) STRICT;
    CREATE INDEX prompts_by_name ON prompts (name);
    ",
];

/// Upserts rather than `INSERT OR REPLACE`: a replace deletes the row first,
/// which would trip the foreign key from attempts to their job.
const PUT_JOB: &str =
    "INSERT INTO jobs (id, name, state, priority, submitted_ms, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT (id) DO UPDATE SET name = excluded.name, state = excluded.state, priority = excluded.priority,
         submitted_ms = excluded.submitted_ms, record = excluded.record";
const PUT_ATTEMPT: &str =
    "INSERT INTO attempts (id, job_id, agent, state, assigned_ms, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT (id) DO UPDATE SET job_id = excluded.job_id, agent = excluded.agent, state = excluded.state,
         assigned_ms = excluded.assigned_ms, record = excluded.record";
const PUT_AGENT: &str = "INSERT INTO agents (name, record) VALUES (?1, ?2)
     ON CONFLICT (name) DO UPDATE SET record = excluded.record";
const APPEND_EVENT: &str =
    "INSERT INTO events (at_ms, job_id, attempt_id, agent, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

const EPOCH_KEY: &str = "epoch";
/// Key of the store's identity in `meta`.
const INSTANCE_KEY: &str = "instance_id";
/// The highest job id given, once jobs were pruned (their rows no longer say it).
const JOB_ID_MAX_KEY: &str = "job_id_max";
/// The highest attempt id given, once attempts were pruned.
const ATTEMPT_ID_MAX_KEY: &str = "attempt_id_max";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused or failed the operation.
    #[error(
        "the controller's database failed: {0}. If it is busy or locked, retry; \
         if the disk is full or read-only, free space or fix permissions and restart the controller"
    )]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not decode into a record.
    #[error(
        "the controller's database holds a row that does not decode ({what}). Restore the database \
         from a backup, or run the controller version that wrote it"
    )]
    Corrupt {
        /// Which row, and what was wrong with it.
        what: String,
    },
    /// The file system refused write-ahead logging, which durability and concurrent readers rely on.
    #[error(
        "could not switch the controller's database {} to WAL journaling (it stayed in `{mode}` mode). \
         Put it on a local file system (not NFS or a read-only mount)",
        path.display()
    )]
    NoWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// A record could not be turned into its stored form.
    #[error("could not encode {what} for the controller's database; this is a bug, please report it")]
    Encode {
        /// Which record, and why.
        what: String,
    },
    /// PostgreSQL refused or failed the operation, or the connection to it failed.
    #[error(
        "the controller's PostgreSQL database failed: {0}. A lost connection or a restarting server is \
         retried; otherwise fix what PostgreSQL says (permissions, disk, the --store URL) and restart the controller"
    )]
    Postgres(#[from] tokio_postgres::Error),
    /// PostgreSQL did not answer within the bound (a frozen server, or a link that drops packets).
    #[error(
        "the controller's PostgreSQL database did not answer {what} within {after_ms} ms; it is retried, \
         and a leader that cannot renew its lease for a whole lease stops"
    )]
    Timeout {
        /// What went unanswered.
        what: &'static str,
        /// How long it was given.
        after_ms: u64,
    },
    /// Another controller took the lease: this one's epoch is over and it must not write again.
    #[error(
        "this controller ({holder}, epoch {epoch}) is no longer the leader: the lease row now names {now}. \
         It stops so that only the leader writes; restarted, it waits as a standby"
    )]
    Deposed {
        /// This controller's holder name.
        holder: String,
        /// The epoch it held.
        epoch: u64,
        /// Who holds the lease now, as the row says.
        now: String,
    },
    /// Another controller holds the lease and it has not expired: this one is a standby.
    #[error(
        "another controller leads: {} (API {}, epoch {}), its lease runs {} ms more; this one waits as a standby",
        .0.holder, .0.api, .0.epoch.0, .0.expires_in_ms
    )]
    NotLeader(LeaseInfo),
    /// A PostgreSQL writer wrote before taking the lease; every write is fenced by it.
    #[error(
        "the store was written before this controller took the lease (begin_epoch); this is a bug, please report it"
    )]
    NoLease,
    /// A write went to a read-only connection (the API's reader).
    #[error("this store connection is read-only (the API's reader); every write goes through the controller's writer")]
    ReadOnly,
    /// The `--store` URL cannot be used.
    #[error("the store URL is unusable: {0}")]
    Url(String),
    /// The database was written by a newer controller with a schema this one does not know.
    #[error(
        "the controller's database has schema version {found}, but this controller knows only up to \
         version {known}. Run a controller at least as new as the one that last opened it"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
}

impl cosmos_proto::Classify for StoreError {
    /// Whether retrying the same operation later may succeed (another connection held a lock).
    fn retry(&self) -> cosmos_proto::Retry {
        cosmos_proto::Retry::when(match self {
            StoreError::Sqlite(e) => {
                matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
            }
            StoreError::Postgres(e) => postgres::retryable(e),
            // A standby retries until the lease is free.
            StoreError::NotLeader(_) | StoreError::Timeout { .. } => true,
            StoreError::Deposed { .. } | StoreError::NoLease | StoreError::ReadOnly | StoreError::Url(_) => false,
            StoreError::Corrupt { .. }
            | StoreError::NoWal { .. }
            | StoreError::Encode { .. }
            | StoreError::SchemaTooNew { .. } => false,
        })
    }
}

/// Shorthand for this module's results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The controller's durable state in one SQLite database; one writer, the controller.
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if absent) and migrates the database file at `path`, durable across power loss.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets readers (an API, an operator's sqlite3) run beside the writer;
        // FULL fsyncs the WAL at every commit, so an acknowledged commit survives
        // power loss (NORMAL in WAL mode does not).
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path: path.to_path_buf(), mode });
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        SqliteStore::init(conn)
    }

    /// Opens a connection that can only read, for the API's queries: every
    /// write goes through the one writer, in the core's order, so a write
    /// attempted here fails instead of racing it. The writer must have opened
    /// (and migrated) the database first.
    pub fn open_reader(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(SqliteStore { conn })
    }

    /// Opens a fresh private in-memory database: no fsync, so the simulator can run thousands of seeds.
    pub fn open_in_memory() -> Result<SqliteStore> {
        SqliteStore::init(Connection::open_in_memory()?)
    }

    /// Sets how long a statement waits for another connection's lock before failing retryably.
    pub fn set_busy_timeout(&mut self, timeout: Duration) -> Result<()> {
        Ok(self.conn.busy_timeout(timeout)?)
    }

    fn init(mut conn: Connection) -> Result<SqliteStore> {
        // Off by default in SQLite, per connection: the attempts → jobs reference needs it.
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(SqliteStore { conn })
    }

    /// Persists every op in one transaction: all of them or, on error, none.
    pub fn apply(&mut self, ops: &[StoreOp]) -> Result<()> {
        // IMMEDIATE takes the write lock up front, so contention shows as a
        // wait (busy timeout) rather than a failed lock upgrade mid-batch.
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for op in ops {
            match op {
                StoreOp::PutJob(job) => {
                    tx.prepare_cached(PUT_JOB)?.execute(params![
                        job.id.0,
                        job.spec.name,
                        job.state.as_str(),
                        job.spec.priority,
                        job.submitted_ms,
                        encode(&**job, || format!("job {}", job.id))?,
                    ])?;
                }
                StoreOp::PutAttempt(att) => {
                    tx.prepare_cached(PUT_ATTEMPT)?.execute(params![
                        att.id.0,
                        att.job_id.0,
                        att.agent,
                        att.state.as_str(),
                        att.assigned_ms,
                        encode(att, || format!("attempt {}", att.id))?,
                    ])?;
                }
                StoreOp::PutAgent(agent) => {
                    tx.prepare_cached(PUT_AGENT)?
                        .execute(params![agent.name, encode(agent, || format!("agent `{}`", agent.name))?])?;
                }
                StoreOp::PutPrompt(p) => put_prompt(&tx, p)?,
                StoreOp::DeletePrompt(id) => {
                    tx.execute("DELETE FROM prompts WHERE id = ?1", [id])?;
                }
                StoreOp::PruneJobs { jobs, job_id_max, attempt_id_max } => {
                    for id in jobs {
                        tx.prepare_cached("DELETE FROM events WHERE job_id = ?1")?.execute([id.0])?;
                        tx.prepare_cached("DELETE FROM attempts WHERE job_id = ?1")?.execute([id.0])?;
                        tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?.execute([id.0])?;
                    }
                    for (key, value) in [(JOB_ID_MAX_KEY, job_id_max.0), (ATTEMPT_ID_MAX_KEY, attempt_id_max.0)] {
                        tx.prepare_cached(
                            "INSERT INTO meta (key, value) VALUES (?1, ?2)
                             ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                        )?
                        .execute(params![key, value])?;
                    }
                }
                StoreOp::Event(ev) => {
                    tx.prepare_cached(APPEND_EVENT)?.execute(params![
                        ev.at_ms,
                        ev.job_id.map(|j| j.0),
                        ev.attempt_id.map(|a| a.0),
                        ev.agent,
                        ev.kind,
                        ev.detail,
                    ])?;
                }
            }
        }
        // A deferred foreign-key violation fails here; dropping `tx` then rolls the batch back.
        tx.commit()?;
        Ok(())
    }

    /// This store's identity: random, made at first use and kept (traces are named after it,
    /// so two stores' job-1s never share a trace, and a restart continues its jobs' traces).
    pub fn instance_id(&mut self) -> Result<String> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: Option<String> =
            tx.query_row("SELECT value FROM meta WHERE key = ?1", [INSTANCE_KEY], |r| r.get(0)).optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                let mut bytes = [0u8; 16];
                if std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                    .is_err()
                {
                    // Only without /dev/urandom: the time and the pid still tell stores apart.
                    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    bytes[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
                    bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
                }
                let id = hex::encode(bytes);
                tx.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", params![INSTANCE_KEY, id])?;
                id
            }
        };
        tx.commit()?;
        Ok(id)
    }

    /// Increments and persists the controller epoch, returning the new one (`Epoch(1)` on a new store).
    pub fn begin_epoch(&mut self) -> Result<Epoch> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let old: Option<u64> =
            tx.query_row("SELECT value FROM meta WHERE key = ?1", [EPOCH_KEY], |r| r.get(0)).optional()?;
        let new = old.unwrap_or(0).checked_add(1).ok_or_else(|| StoreError::Corrupt {
            what: "meta.epoch is at its maximum and cannot be incremented".to_string(),
        })?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![EPOCH_KEY, new],
        )?;
        // Agents fence on the epoch, so it must be durable before anyone is told it.
        tx.commit()?;
        Ok(Epoch(new))
    }

    /// Starts a new epoch and reads everything the core rebuilds from (jobs and attempts by id, agents by name).
    pub fn load(&mut self) -> Result<Snapshot> {
        let epoch = self.begin_epoch()?;
        // One read transaction, so the pieces are from the same moment.
        let tx = self.conn.transaction()?;
        let jobs = {
            // Sized first: growing a vector of a million records by doubling copies it over and over.
            let count: i64 = tx.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))?;
            let mut jobs = JobDecoder::new(usize::try_from(count).unwrap_or(0));
            let mut stmt = tx.prepare_cached("SELECT id, record FROM jobs ORDER BY id")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                // Borrowed from SQLite's row buffer: copied once, into the decoders' chunk.
                let json = row.get_ref(1)?.as_str().map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
                })?;
                jobs.push(row.get(0)?, json)?;
            }
            jobs.finish()?
        };
        let live_attempts = {
            let mut stmt = tx.prepare_cached(
                "SELECT id, record FROM attempts WHERE state IN ('assigned', 'running', 'stopping') ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
            let attempts = rows
                .map(|row| {
                    let (id, json) = row?;
                    decode::<AttemptRecord>(&json, || format!("attempt {id}"))
                })
                .collect::<Result<Vec<_>>>()?;
            // The SQL names the live states; this catches the list drifting from `is_live`.
            if let Some(bad) = attempts.iter().find(|a| !a.state.is_live()) {
                return Err(StoreError::Corrupt {
                    what: format!("attempt {}: state column says live, record says {}", bad.id, bad.state.as_str()),
                });
            }
            attempts
        };
        let max_attempt_id: Option<u64> = tx.query_row("SELECT MAX(id) FROM attempts", [], |r| r.get(0))?;
        let meta = |key: &str| -> Result<Option<u64>> {
            Ok(tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
        };
        let max_attempt_id = max_attempt_id.max(meta(ATTEMPT_ID_MAX_KEY)?);
        let max_job_id = meta(JOB_ID_MAX_KEY)?.map(JobId);
        let agents = {
            let mut stmt = tx.prepare_cached("SELECT name, record FROM agents ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            rows.map(|row| {
                let (name, json) = row?;
                decode::<AgentRecord>(&json, || format!("agent `{name}`"))
            })
            .collect::<Result<Vec<_>>>()?
        };
        tx.commit()?;
        Ok(Snapshot { epoch, jobs, live_attempts, max_attempt_id: max_attempt_id.map(AttemptId), max_job_id, agents })
    }

    /// One job, if it exists.
    pub fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        let json: Option<String> = self
            .conn
            .prepare_cached("SELECT record FROM jobs WHERE id = ?1")?
            .query_row([id.0], |r| r.get(0))
            .optional()?;
        json.map(|j| decode(&j, || format!("job {id}"))).transpose()
    }

    /// Every attempt of a job, finished ones included, oldest first.
    pub fn attempts_of(&self, job: JobId) -> Result<Vec<AttemptRecord>> {
        let mut stmt = self.conn.prepare_cached("SELECT id, record FROM attempts WHERE job_id = ?1 ORDER BY id")?;
        let rows = stmt.query_map([job.0], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (id, json) = row?;
            decode(&json, || format!("attempt {id}"))
        })
        .collect()
    }

    /// Every event about a job, in the order they were appended.
    pub fn events_of(&self, job: JobId) -> Result<Vec<EventRecord>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, at_ms, job_id, attempt_id, agent, kind, detail FROM events WHERE job_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([job.0], |r| {
            Ok(EventRecord {
                at_ms: r.get(1)?,
                job_id: r.get::<_, Option<u64>>(2)?.map(JobId),
                attempt_id: r.get::<_, Option<u64>>(3)?.map(AttemptId),
                agent: r.get(4)?,
                kind: r.get(5)?,
                detail: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// How many jobs are in each state: every state, in lifecycle order, zeros included.
    pub fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        let mut counts: Vec<(JobState, u64)> = ALL_JOB_STATES.iter().map(|&s| (s, 0)).collect();
        let mut stmt = self.conn.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            let n: u64 = row.get(1)?;
            let state = JobState::parse(&name)
                .ok_or_else(|| StoreError::Corrupt { what: format!("{n} job(s) in unknown state `{name}`") })?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = n;
            }
        }
        Ok(counts)
    }
}

/// Cosmos prompts, read by the API (written through [`Store::apply`]).
impl SqliteStore {
    /// One prompt.
    pub fn prompt(&self, id: &str) -> Result<Option<Prompt>> {
        let json: Option<String> =
            self.conn.query_row("SELECT record FROM prompts WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        json.map(|j| decode(&j, || format!("prompt {id}"))).transpose()
    }

    /// Every prompt, oldest first.
    pub fn prompts(&self) -> Result<Vec<Prompt>> {
        let mut stmt = self.conn.prepare("SELECT id, record FROM prompts ORDER BY created_ms, id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row?;
            out.push(decode(&json, || format!("prompt {id}"))?);
        }
        Ok(out)
    }
}

fn put_prompt(tx: &rusqlite::Transaction<'_>, p: &Prompt) -> Result<()> {
    let record = encode(p, || format!("prompt {}", p.id))?;
    tx.prepare_cached(
        "INSERT INTO prompts (id, name, created_ms, record) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, record = excluded.record",
    )?
    .execute(params![p.id, p.name, p.created_ms as i64, record])?;
    Ok(())
}

/// Brings the schema up to date, refusing databases from a newer build.
fn migrate(conn: &mut Connection) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    if found == known {
        return Ok(());
    }
    // One transaction, so a crash mid-migration leaves the old schema intact.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

fn encode<T: serde::Serialize>(record: &T, what: impl FnOnce() -> String) -> Result<String> {
    serde_json::to_string(record).map_err(|e| StoreError::Encode { what: format!("{}: {e}", what()) })
}

fn decode<T: serde::de::DeserializeOwned>(json: &str, what: impl FnOnce() -> String) -> Result<T> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt { what: format!("{}: {e}", what()) })
}

/// Job records per chunk a decoding thread takes: enough that handing one over costs nothing next to decoding it.
const DECODE_CHUNK_RECORDS: usize = 2_048;
/// Most threads decoding job records at load.
const DECODE_THREADS_MAX: usize = 8;
/// Chunks read ahead of the decoders, so the text waiting to be decoded stays a few megabytes.
const DECODE_CHUNKS_AHEAD_PER_THREAD: usize = 2;

/// Records of one chunk: their text, one after another, and each one's id and span in it.
struct DecodeChunk {
    index: usize,
    text: String,
    spans: Vec<(i64, usize, usize)>,
}

/// What a decoding thread made of one chunk: its records in order, or what is wrong with one.
#[allow(clippy::vec_box, reason = "boxed records move into the core as they are (Snapshot::jobs)")]
type Decoded = (usize, std::result::Result<Vec<Box<JobRecord>>, String>);

/// Decodes job records on every core, in the order they were pushed. Parsing a
/// million JSON records is most of a restart's time (`scripts/bench-million`);
/// a store of few jobs is decoded on the caller's thread.
#[allow(clippy::vec_box, reason = "boxed records move into the core as they are (Snapshot::jobs)")]
struct JobDecoder {
    jobs: Vec<Box<JobRecord>>,
    chunk: DecodeChunk,
    /// Where full chunks go, while there are decoding threads.
    work: Option<std::sync::mpsc::SyncSender<DecodeChunk>>,
    done: std::sync::mpsc::Receiver<Decoded>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl JobDecoder {
    /// A decoder for about `count` records.
    fn new(count: usize) -> JobDecoder {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = if count >= 4 * DECODE_CHUNK_RECORDS { cores.min(DECODE_THREADS_MAX) } else { 0 };
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut decoder = JobDecoder {
            jobs: Vec::with_capacity(count),
            chunk: DecodeChunk { index: 0, text: String::new(), spans: Vec::new() },
            work: None,
            done,
            threads: Vec::new(),
        };
        if threads > 1 {
            let (work, work_rx) =
                std::sync::mpsc::sync_channel::<DecodeChunk>(threads * DECODE_CHUNKS_AHEAD_PER_THREAD);
            let work_rx = std::sync::Arc::new(std::sync::Mutex::new(work_rx));
            for _ in 0..threads {
                let (work_rx, done_tx) = (work_rx.clone(), done_tx.clone());
                decoder.threads.push(std::thread::spawn(move || {
                    loop {
                        // The lock is held only to take a chunk, not while decoding it.
                        let next = work_rx.lock().map(|rx| rx.recv());
                        let Ok(Ok(chunk)) = next else { return };
                        let index = chunk.index;
                        if done_tx.send((index, decode_chunk(chunk))).is_err() {
                            return;
                        }
                    }
                }));
            }
            decoder.work = Some(work);
        }
        decoder
    }

    /// Adds the record of job `id`.
    fn push(&mut self, id: i64, json: &str) -> Result<()> {
        let Some(work) = &self.work else {
            self.jobs.push(Box::new(decode(json, || job_name(id))?));
            return Ok(());
        };
        let start = self.chunk.text.len();
        self.chunk.text.push_str(json);
        self.chunk.spans.push((id, start, self.chunk.text.len()));
        if self.chunk.spans.len() == DECODE_CHUNK_RECORDS {
            let next = DecodeChunk { index: self.chunk.index + 1, text: String::new(), spans: Vec::new() };
            let full = std::mem::replace(&mut self.chunk, next);
            if work.send(full).is_err() {
                // Every decoding thread has stopped, which only a panic makes them do.
                self.work = None;
                self.join();
            }
        }
        Ok(())
    }

    /// Waits for the decoding threads; a panic in one goes on in the caller, as if it had decoded itself.
    fn join(&mut self) {
        for t in self.threads.drain(..) {
            if let Err(panic) = t.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }

    /// Every record pushed, in order, or the first one that does not decode.
    #[allow(clippy::vec_box, reason = "boxed records move into the core as they are (Snapshot::jobs)")]
    fn finish(mut self) -> Result<Vec<Box<JobRecord>>> {
        let Some(work) = self.work.take() else { return Ok(self.jobs) };
        let chunks = self.chunk.index + 1;
        let last = std::mem::replace(&mut self.chunk, DecodeChunk { index: 0, text: String::new(), spans: Vec::new() });
        let _ = work.send(last);
        drop(work);
        let mut decoded: Vec<Decoded> = self.done.iter().take(chunks).collect();
        self.join();
        assert_eq!(decoded.len(), chunks, "decoding threads that did not panic decoded every chunk");
        decoded.sort_unstable_by_key(|(index, _)| *index);
        for (_, chunk) in decoded {
            self.jobs.extend(chunk.map_err(|what| StoreError::Corrupt { what })?);
        }
        Ok(self.jobs)
    }
}

/// How an error names the job of row `id`: as the API does (`job-7`).
fn job_name(id: i64) -> String {
    u64::try_from(id).map_or_else(|_| format!("job row {id}"), |id| JobId(id).to_string())
}

#[allow(clippy::vec_box, reason = "boxed records move into the core as they are (Snapshot::jobs)")]
fn decode_chunk(chunk: DecodeChunk) -> std::result::Result<Vec<Box<JobRecord>>, String> {
    chunk
        .spans
        .iter()
        .map(|&(id, start, end)| {
            serde_json::from_str::<JobRecord>(&chunk.text[start..end])
                .map(Box::new)
                .map_err(|e| format!("{}: {e}", job_name(id)))
        })
        .collect()
}

/// The controller's store: one interface over either backend.
///
/// SQLite is embedded and the default; PostgreSQL lets two controllers share
/// one store, the one holding the lease row ([`Lease`]) writing, the other waiting.
pub enum Store {
    /// A SQLite file (or an in-memory database).
    Sqlite(SqliteStore),
    /// A PostgreSQL database.
    Postgres(Box<PgStore>),
}

/// Where a controller's store is: a SQLite file, or a PostgreSQL URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// The SQLite file (the default: `cosmos.db` in the data directory).
    Sqlite(PathBuf),
    /// A `postgres://` (or `postgresql://`) URL.
    Postgres(String),
}

impl StoreLocation {
    /// Reads `--store`: a `postgres://` URL, or a path to a SQLite file.
    pub fn parse(value: &str) -> StoreLocation {
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            StoreLocation::Postgres(value.to_string())
        } else {
            StoreLocation::Sqlite(PathBuf::from(value.strip_prefix("sqlite:").unwrap_or(value)))
        }
    }

    /// How to name it in messages: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Sqlite(path) => path.display().to_string(),
            StoreLocation::Postgres(url) => postgres::redact(url),
        }
    }
}

impl Store {
    /// Opens (creating if absent) and migrates the SQLite file at `path`, durable across power loss.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store::Sqlite(SqliteStore::open(path)?))
    }

    /// Opens the SQLite file at `path` for reading only (see [`SqliteStore::open_reader`]).
    pub fn open_reader(path: &Path) -> Result<Store> {
        Ok(Store::Sqlite(SqliteStore::open_reader(path)?))
    }

    /// Opens a fresh private in-memory SQLite database: no fsync, so the simulator can run thousands of seeds.
    pub fn open_in_memory() -> Result<Store> {
        Ok(Store::Sqlite(SqliteStore::open_in_memory()?))
    }

    /// Connects to PostgreSQL at `url` and migrates it, as a writer that takes and holds `lease`.
    pub fn open_postgres(url: &str, lease: Lease) -> Result<Store> {
        Ok(Store::Postgres(Box::new(PgStore::open(url, Some(lease))?)))
    }

    /// Connects to PostgreSQL at `url` for reading only, for the API's queries and the lease's state.
    pub fn open_postgres_reader(url: &str) -> Result<Store> {
        Ok(Store::Postgres(Box::new(PgStore::open(url, None)?)))
    }

    /// Sets how long a statement waits for another connection's lock before failing retryably.
    pub fn set_busy_timeout(&mut self, timeout: Duration) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.set_busy_timeout(timeout),
            Store::Postgres(s) => s.set_lock_timeout(timeout),
        }
    }

    /// Persists every op in one transaction: all of them or, on error, none.
    ///
    /// On PostgreSQL the transaction first checks that this controller still
    /// holds the lease at its epoch; if not, nothing is written and the error is [`StoreError::Deposed`].
    pub fn apply(&mut self, ops: &[StoreOp]) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.apply(ops),
            Store::Postgres(s) => s.apply(ops),
        }
    }

    /// This store's identity: random, made at first use and kept.
    pub fn instance_id(&mut self) -> Result<String> {
        match self {
            Store::Sqlite(s) => s.instance_id(),
            Store::Postgres(s) => s.instance_id(),
        }
    }

    /// Increments and persists the controller epoch, returning the new one (`Epoch(1)` on a new store).
    ///
    /// On PostgreSQL this takes the lease (free, expired, or already this
    /// holder's); while another controller holds it, the error is [`StoreError::NotLeader`].
    pub fn begin_epoch(&mut self) -> Result<Epoch> {
        match self {
            Store::Sqlite(s) => s.begin_epoch(),
            Store::Postgres(s) => s.begin_epoch(),
        }
    }

    /// Starts a new epoch and reads everything the core rebuilds from (jobs and attempts by id, agents by name).
    pub fn load(&mut self) -> Result<Snapshot> {
        match self {
            Store::Sqlite(s) => s.load(),
            Store::Postgres(s) => s.load(),
        }
    }

    /// One job, if it exists.
    pub fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        match self {
            Store::Sqlite(s) => s.job(id),
            Store::Postgres(s) => s.job(id),
        }
    }

    /// Every attempt of a job, finished ones included, oldest first.
    pub fn attempts_of(&self, job: JobId) -> Result<Vec<AttemptRecord>> {
        match self {
            Store::Sqlite(s) => s.attempts_of(job),
            Store::Postgres(s) => s.attempts_of(job),
        }
    }

    /// Every event about a job, in the order they were appended.
    pub fn events_of(&self, job: JobId) -> Result<Vec<EventRecord>> {
        match self {
            Store::Sqlite(s) => s.events_of(job),
            Store::Postgres(s) => s.events_of(job),
        }
    }

    /// How many jobs are in each state: every state, in lifecycle order, zeros included.
    pub fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        match self {
            Store::Sqlite(s) => s.count_jobs_by_state(),
            Store::Postgres(s) => s.count_jobs_by_state(),
        }
    }

    /// One prompt.
    pub fn prompt(&self, id: &str) -> Result<Option<Prompt>> {
        match self {
            Store::Sqlite(s) => s.prompt(id),
            Store::Postgres(s) => s.prompt(id),
        }
    }

    /// Every prompt, oldest first.
    pub fn prompts(&self) -> Result<Vec<Prompt>> {
        match self {
            Store::Sqlite(s) => s.prompts(),
            Store::Postgres(s) => s.prompts(),
        }
    }

    /// Who leads, at which epoch, since when: the lease row on PostgreSQL; none on SQLite (one controller, no lease).
    pub fn lease(&self) -> Result<Option<LeaseInfo>> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => s.lease_info().map(Some),
        }
    }

    /// Makes this connection write under `epoch`, which another connection of the same controller took
    /// (the lease renewer's); no-op on SQLite.
    pub fn hold_epoch(&mut self, epoch: Epoch) {
        if let Store::Postgres(s) = self {
            s.hold_epoch(epoch);
        }
    }

    /// Extends this controller's lease; [`StoreError::Deposed`] once another controller took it. No-op on SQLite.
    pub fn renew(&mut self) -> Result<()> {
        match self {
            Store::Sqlite(_) => Ok(()),
            Store::Postgres(s) => s.renew(),
        }
    }
}

/// Keeps the SQL's list of live states in step with [`AttemptState::is_live`].
#[cfg(test)]
mod tests {
    use crate::records::AttemptState;

    #[test]
    fn the_live_state_list_in_sql_matches_is_live() {
        let live: Vec<&str> =
            crate::records::ALL_ATTEMPT_STATES.into_iter().filter(|s| s.is_live()).map(AttemptState::as_str).collect();
        assert_eq!(live, ["assigned", "running", "stopping"]);
    }
}
