//! The store on PostgreSQL, for controllers that fail over between hosts.
//!
//! The same records and the same group commit as SQLite, with one addition:
//! a lease row (`cosmos_lease`) naming the leading controller, its epoch and
//! when its lease ends, by the database's clock only. A writer takes the lease
//! in [`PgStore::begin_epoch`] (bumping the epoch, which is the controller
//! epoch agents fence on), renews it in [`PgStore::renew`], and every
//! group-commit transaction first checks the row still names it at its epoch
//! (the fence): a deposed leader, however long it was paused, commits nothing.
//!
//! The interface is synchronous like SQLite's: each store owns a small
//! current-thread tokio runtime that drives its one connection inside
//! `block_on`, so it must be called from a blocking thread (the writer thread,
//! `web::block`), never from inside an async task. Within a transaction the
//! statements are pipelined: sent together, answered together.
//!
//! TLS is not built: the connection is plain TCP (or a Unix socket). Job
//! specs, environments and the password would cross the network in the clear,
//! so a host other than loopback or a socket is refused unless the URL says
//! `sslmode=disable`, the operator's explicit acceptance of that.

use super::{JobDecoder, Result, StoreError, decode, encode};
use crate::cosmos::Prompt;
use crate::records::{ALL_JOB_STATES, AgentRecord, AttemptRecord, EventRecord, JobRecord, JobState, Snapshot, StoreOp};
use cosmos_proto::{AttemptId, Epoch, JobId};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Statement};

/// Default length of the leader's lease: a standby takes over this long (plus a renewal period) after the leader stops renewing.
pub const LEASE_MS_DEFAULT: u64 = 10_000;
/// Bound on connecting to the server.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Bound on data a reader's connection leaves unacknowledged before it is closed (`TCP_USER_TIMEOUT`):
/// a link that drops packets fails the call instead of hanging until the kernel gives up (minutes).
/// A writer's bound is its lease.
pub const READER_TCP_USER_TIMEOUT_MS: u64 = 30_000;
/// Idle time after which TCP keepalives probe the server, so a vanished server is noticed.
pub const KEEPALIVE_IDLE_MS: u64 = 10_000;
/// Floor of the writer's `idle_in_transaction_session_timeout` (otherwise one lease).
pub const IDLE_IN_TRANSACTION_MS_MIN: u64 = 1_000;
/// Advisory lock held while migrating, so two controllers starting together migrate once.
const MIGRATION_LOCK_KEY: i64 = 0x636f_736d_6f73;

/// The schema, one migration per entry, applied in order; `cosmos_schema.version` counts those applied.
///
/// The SQLite schema translated (BIGINT for its INTEGER, identity for
/// AUTOINCREMENT), entry for entry, plus the lease row in the first. Never
/// edit an entry once released: append one, alongside SQLite's.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema, and the lease.
    "
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    CREATE TABLE jobs (
        id           BIGINT PRIMARY KEY,
        name         TEXT NOT NULL,
        state        TEXT NOT NULL,
        priority     INTEGER NOT NULL,
        submitted_ms BIGINT NOT NULL,
        record       TEXT NOT NULL
    );
    CREATE INDEX jobs_by_state ON jobs (state);

    -- Deferred, so a batch may name an attempt before its job as long as the job is there at commit.
    CREATE TABLE attempts (
        id          BIGINT PRIMARY KEY,
        job_id      BIGINT NOT NULL REFERENCES jobs (id) DEFERRABLE INITIALLY DEFERRED,
        agent       TEXT NOT NULL,
        state       TEXT NOT NULL,
        assigned_ms BIGINT NOT NULL,
        record      TEXT NOT NULL
    );
    CREATE INDEX attempts_by_job ON attempts (job_id);
    CREATE INDEX attempts_by_state ON attempts (state);

    CREATE TABLE agents (
        name   TEXT PRIMARY KEY,
        record TEXT NOT NULL
    );

    -- An identity column never reuses a number, even if old events are pruned.
    CREATE TABLE events (
        seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at_ms      BIGINT NOT NULL,
        job_id     BIGINT,
        attempt_id BIGINT,
        agent      TEXT,
        kind       TEXT NOT NULL,
        detail     TEXT NOT NULL
    );
    CREATE INDEX events_by_job ON events (job_id);

    -- One row: who leads, at which epoch, until when (the database's clock).
    CREATE TABLE cosmos_lease (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        epoch   BIGINT NOT NULL,
        holder  TEXT NOT NULL,
        api     TEXT NOT NULL,
        agents  TEXT NOT NULL,
        since   TIMESTAMPTZ NOT NULL,
        expires TIMESTAMPTZ NOT NULL
    );
    INSERT INTO cosmos_lease VALUES (1, 0, '', '', '', now(), '-infinity');
    ",
    // 2: Cosmos Transfer prompts (runs are jobs carrying `cosmos.*` labels).
    "
    CREATE TABLE prompts (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        record     TEXT NOT NULL
    );
    CREATE INDEX prompts_by_name ON prompts (name);
    ",
];

const PUT_JOB: &str =
    "INSERT INTO jobs (id, name, state, priority, submitted_ms, record) VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (id) DO UPDATE SET name = excluded.name, state = excluded.state, priority = excluded.priority,
         submitted_ms = excluded.submitted_ms, record = excluded.record";
const PUT_ATTEMPT: &str =
    "INSERT INTO attempts (id, job_id, agent, state, assigned_ms, record) VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (id) DO UPDATE SET job_id = excluded.job_id, agent = excluded.agent, state = excluded.state,
         assigned_ms = excluded.assigned_ms, record = excluded.record";
const PUT_AGENT: &str = "INSERT INTO agents (name, record) VALUES ($1, $2)
     ON CONFLICT (name) DO UPDATE SET record = excluded.record";
const PUT_PROMPT: &str = "INSERT INTO prompts (id, name, created_ms, record) VALUES ($1, $2, $3, $4)
     ON CONFLICT (id) DO UPDATE SET name = excluded.name, record = excluded.record";
const DELETE_PROMPT: &str = "DELETE FROM prompts WHERE id = $1";
/// Pruning (`StoreOp::PruneJobs`): a job's events and attempts go before it.
const PRUNE_EVENTS: &str = "DELETE FROM events WHERE job_id = ANY($1)";
const PRUNE_ATTEMPTS: &str = "DELETE FROM attempts WHERE job_id = ANY($1)";
const PRUNE_JOBS: &str = "DELETE FROM jobs WHERE id = ANY($1)";
/// The highest job and attempt ids given, kept once their rows are pruned, so no id is given twice.
const JOB_ID_MAX_KEY: &str = "job_id_max";
const ATTEMPT_ID_MAX_KEY: &str = "attempt_id_max";
const RAISE_META: &str = "INSERT INTO meta (key, value) VALUES ($1, $2)
     ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value::bigint, excluded.value::bigint)::text";
const APPEND_EVENT: &str =
    "INSERT INTO events (at_ms, job_id, attempt_id, agent, kind, detail) VALUES ($1, $2, $3, $4, $5, $6)";
/// The fence, and a renewal on the way: zero rows means another controller took the lease.
const FENCE: &str = "UPDATE cosmos_lease SET expires = now() + $3::bigint * interval '1 millisecond'
     WHERE id = 1 AND epoch = $1 AND holder = $2 RETURNING epoch";
/// Takes the lease if it is free, expired, or this holder's own (a restart), bumping the epoch.
const ACQUIRE: &str = "UPDATE cosmos_lease SET epoch = epoch + 1, holder = $1, api = $2, agents = $3, since = now(),
         expires = now() + $4::bigint * interval '1 millisecond'
     WHERE id = 1 AND (holder = $1 OR holder = '' OR expires < now()) RETURNING epoch";
const LEASE_INFO: &str = "SELECT epoch, holder, api, agents, (extract(epoch FROM since) * 1000)::bigint,
         (extract(epoch FROM greatest(expires, now()) - now()) * 1000)::bigint
     FROM cosmos_lease WHERE id = 1";

/// Who a writer is, as the lease row names it, and how long its lease lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Unique among the controllers sharing the database (default: host name and API port).
    pub holder: String,
    /// The API address clients are sent to while this controller leads.
    pub api: String,
    /// The address agents connect to while this controller leads.
    pub agents: String,
    /// How long the lease lasts after each renewal.
    pub lease_ms: u64,
}

/// The lease row: who leads, at which epoch, since when.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseInfo {
    /// The leader's epoch (0: no controller ever led).
    pub epoch: Epoch,
    /// The leader's holder name (empty: none yet).
    pub holder: String,
    /// The leader's API address.
    pub api: String,
    /// The leader's agent address.
    pub agents: String,
    /// When it took the lease, in ms since the Unix epoch.
    pub since_ms: u64,
    /// How long its lease runs on without a renewal (0: expired).
    pub expires_in_ms: u64,
}

enum Role {
    /// Takes the lease and writes; `epoch` is the one taken, none before.
    Writer { lease: Lease, epoch: Option<Epoch> },
    /// Reads only (the API's queries, `cosmos status`).
    Reader,
}

/// The controller's durable state in one PostgreSQL database, over one connection.
pub struct PgStore {
    /// Taken only in `drop`, which shuts it down without blocking (a store may be dropped inside an async task).
    rt: Option<tokio::runtime::Runtime>,
    config: Config,
    /// In a cell so that the readers behind `&self` can reconnect too.
    client: RefCell<Client>,
    /// Prepared statements of this connection, by SQL (a reconnect clears it).
    prepared: RefCell<HashMap<&'static str, Statement>>,
    role: Role,
    /// `lock_timeout`, once set, so a reconnect sets it again.
    lock_timeout: Cell<Option<Duration>>,
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    // postgres://user:password@host/db → postgres://user:***@host/db
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((auth, tail)) = rest.rsplit_once('@') else { return url.to_string() };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{tail}"),
        None => url.to_string(),
    }
}

/// Whether retrying later may succeed: a lost connection, a restarting server, a serialization failure.
pub(super) fn retryable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            // Class 08: connection exceptions; 57P01-03: the server shutting down or starting.
            c.starts_with("08")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        }
        // No SQL state: the error is from the socket (refused, reset, timed out).
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
    }
}

/// One statement parameter, boxed: a batch's parameters are built before any is sent.
fn param<T: ToSql + Sync + Send + 'static>(v: T) -> Box<dyn ToSql + Sync + Send> {
    Box::new(v)
}

fn big(n: u64, what: impl FnOnce() -> String) -> Result<i64> {
    i64::try_from(n)
        .map_err(|_| StoreError::Encode { what: format!("{}: {n} does not fit PostgreSQL's BIGINT", what()) })
}

fn unsigned(n: i64, what: impl FnOnce() -> String) -> Result<u64> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt { what: format!("{}: negative value {n}", what()) })
}

fn parse_config(url: &str) -> Result<Config> {
    let config: Config = url.parse().map_err(|e| StoreError::Url(format!("{}: {e}", redact(url))))?;
    let local = config.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()),
        Host::Unix(_) => true,
    });
    if !local && config.get_ssl_mode() != SslMode::Disable {
        return Err(StoreError::Url(format!(
            "{}: TLS to PostgreSQL is not built into this controller, and this host is not on loopback. \
             Reach the server through a loopback address (an SSH tunnel, a local pgbouncer or stunnel), \
             or add `?sslmode=disable` to accept an unencrypted connection on a network you trust",
            redact(url)
        )));
    }
    Ok(config)
}

impl PgStore {
    /// Connects and migrates; a writer when given its `lease`, else a reader.
    pub fn open(url: &str, lease: Option<Lease>) -> Result<PgStore> {
        let mut config = parse_config(url)?;
        let tcp_user_timeout_ms = lease.as_ref().map_or(READER_TCP_USER_TIMEOUT_MS, |l| l.lease_ms.max(1_000));
        config
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .tcp_user_timeout(Duration::from_millis(tcp_user_timeout_ms))
            .keepalives(true)
            .keepalives_idle(Duration::from_millis(KEEPALIVE_IDLE_MS))
            .application_name(if lease.is_some() { "cosmos-controller" } else { "cosmos-controller-reader" });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Url(format!("cannot start the store's I/O runtime: {e}")))?;
        let role = match lease {
            Some(lease) => Role::Writer { lease, epoch: None },
            None => Role::Reader,
        };
        let client = match connect(&rt, &config, &role) {
            Ok(c) => RefCell::new(c),
            Err(e) => {
                rt.shutdown_background();
                return Err(e);
            }
        };
        let mut store = PgStore {
            rt: Some(rt),
            config,
            client,
            prepared: RefCell::new(HashMap::new()),
            role,
            lock_timeout: Cell::new(None),
        };
        if matches!(store.role, Role::Writer { .. }) {
            store.migrate()?;
        } else {
            store.check_schema()?;
        }
        Ok(store)
    }

    /// Connects again after the connection was lost; the lease and epoch held stay (the fence checks them).
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives until drop")
    }

    fn ensure_connected(&self) -> Result<()> {
        if !self.client.borrow().is_closed() {
            return Ok(());
        }
        *self.client.borrow_mut() = connect(self.rt(), &self.config, &self.role)?;
        self.prepared.borrow_mut().clear();
        if let Some(t) = self.lock_timeout.get() {
            self.set_lock_timeout(t)?;
        }
        Ok(())
    }

    /// Sets how long a statement waits for a lock before failing retryably (`lock_timeout`).
    pub fn set_lock_timeout(&self, timeout: Duration) -> Result<()> {
        let sql = format!("SET lock_timeout = {}", timeout.as_millis().max(1));
        self.rt().block_on(self.client.borrow().batch_execute(&sql))?;
        self.lock_timeout.set(Some(timeout));
        Ok(())
    }

    fn statement(&self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.prepared.borrow().get(sql) {
            return Ok(s.clone());
        }
        let s = self.rt().block_on(self.client.borrow().prepare(sql))?;
        self.prepared.borrow_mut().insert(sql, s.clone());
        Ok(s)
    }

    fn check_schema(&mut self) -> Result<i64> {
        let known = MIGRATIONS.len() as i64;
        let row = self.rt().block_on(self.client.borrow().query_opt("SELECT version FROM cosmos_schema", &[]));
        let found = match row {
            Ok(Some(r)) => i64::from(r.get::<_, i32>(0)),
            Ok(None) => 0,
            // The table does not exist yet: a new database.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => 0,
            Err(e) => return Err(e.into()),
        };
        if found > known {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        Ok(found)
    }

    fn migrate(&mut self) -> Result<()> {
        if self.check_schema()? == MIGRATIONS.len() as i64 {
            return Ok(());
        }
        let known = MIGRATIONS.len() as i64;
        let mut client = self.client.borrow_mut();
        self.rt().block_on(async {
            // One transaction, under a lock: a crash mid-migration leaves the old
            // schema, and a second controller starting at once waits, then sees it done.
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS cosmos_schema (version INTEGER NOT NULL)").await?;
            let found = match tx.query_opt("SELECT version FROM cosmos_schema", &[]).await? {
                Some(r) => i64::from(r.get::<_, i32>(0)),
                None => {
                    tx.execute("INSERT INTO cosmos_schema VALUES (0)", &[]).await?;
                    0
                }
            };
            if found > known {
                return Err(StoreError::SchemaTooNew { found, known });
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
                tx.batch_execute(sql).await?;
                tx.execute("UPDATE cosmos_schema SET version = $1", &[&(i as i32 + 1)]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Persists every op in one transaction, fenced by the lease: all of them or, on error, none.
    pub fn apply(&mut self, ops: &[StoreOp]) -> Result<()> {
        let (lease_ms, holder, epoch) = match &self.role {
            Role::Reader => return Err(StoreError::ReadOnly),
            Role::Writer { epoch: None, .. } => return Err(StoreError::NoLease),
            Role::Writer { lease, epoch: Some(e) } => (lease.lease_ms as i64, lease.holder.clone(), e.0),
        };
        self.ensure_connected()?;
        let epoch_i = big(epoch, || "the epoch".to_string())?;
        // Encode everything first: a record that does not encode fails before anything is sent.
        let mut rows: Vec<(&'static str, Vec<Box<dyn ToSql + Sync + Send>>)> = Vec::with_capacity(ops.len());
        for op in ops {
            if let StoreOp::PruneJobs { jobs, job_id_max, attempt_id_max } = op {
                let ids = jobs.iter().map(|j| big(j.0, || format!("pruned job {j}"))).collect::<Result<Vec<i64>>>()?;
                for sql in [PRUNE_EVENTS, PRUNE_ATTEMPTS, PRUNE_JOBS] {
                    rows.push((sql, vec![param(ids.clone())]));
                }
                for (key, value) in [(JOB_ID_MAX_KEY, job_id_max.0), (ATTEMPT_ID_MAX_KEY, attempt_id_max.0)] {
                    rows.push((RAISE_META, vec![param(key.to_string()), param(value.to_string())]));
                }
                continue;
            }
            rows.push(match op {
                StoreOp::PruneJobs { .. } => continue,
                StoreOp::PutJob(job) => (
                    PUT_JOB,
                    vec![
                        param(big(job.id.0, || format!("job {}", job.id))?),
                        param(job.spec.name.clone()),
                        param(job.state.as_str().to_string()),
                        param(job.spec.priority),
                        param(big(job.submitted_ms, || format!("job {} submitted_ms", job.id))?),
                        param(encode(&**job, || format!("job {}", job.id))?),
                    ],
                ),
                StoreOp::PutAttempt(att) => (
                    PUT_ATTEMPT,
                    vec![
                        param(big(att.id.0, || format!("attempt {}", att.id))?),
                        param(big(att.job_id.0, || format!("attempt {} job", att.id))?),
                        param(att.agent.clone()),
                        param(att.state.as_str().to_string()),
                        param(big(att.assigned_ms, || format!("attempt {} assigned_ms", att.id))?),
                        param(encode(att, || format!("attempt {}", att.id))?),
                    ],
                ),
                StoreOp::PutAgent(agent) => (
                    PUT_AGENT,
                    vec![param(agent.name.clone()), param(encode(agent, || format!("agent `{}`", agent.name))?)],
                ),
                StoreOp::PutPrompt(p) => (
                    PUT_PROMPT,
                    vec![
                        param(p.id.clone()),
                        param(p.name.clone()),
                        param(big(p.created_ms, || format!("prompt {}", p.id))?),
                        param(encode(p, || format!("prompt {}", p.id))?),
                    ],
                ),
                StoreOp::DeletePrompt(id) => (DELETE_PROMPT, vec![param(id.clone())]),
                StoreOp::Event(ev) => (
                    APPEND_EVENT,
                    vec![
                        param(big(ev.at_ms, || "event at_ms".to_string())?),
                        param(ev.job_id.map(|j| big(j.0, || format!("event of {j}"))).transpose()?),
                        param(ev.attempt_id.map(|a| big(a.0, || format!("event of {a}"))).transpose()?),
                        param(ev.agent.clone()),
                        param(ev.kind.clone()),
                        param(ev.detail.clone()),
                    ],
                ),
            });
        }
        let mut statements = Vec::with_capacity(rows.len());
        for (sql, _) in &rows {
            statements.push(self.statement(sql)?);
        }
        let fence = self.statement(FENCE)?;
        let mut client = self.client.borrow_mut();
        let fenced = self.rt().block_on(async {
            let tx = client.transaction().await?;
            // The fence first: its row lock is held to commit, so no takeover
            // can slip between the check and the writes.
            let fence_params: [&(dyn ToSql + Sync); 3] = [&epoch_i, &holder, &lease_ms];
            let check = tx.query(&fence, &fence_params);
            let writes = rows.iter().zip(&statements).map(|((_, params), stmt)| {
                let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
                let tx = &tx;
                async move { tx.execute(stmt, &params).await }
            });
            // Pipelined: every statement is sent before the first answer is awaited.
            let (check, writes) = futures::future::join(check, futures::future::try_join_all(writes)).await;
            let held = !check?.is_empty();
            if !held {
                tx.rollback().await?;
                return Ok::<bool, StoreError>(false);
            }
            writes?;
            // A deferred foreign-key violation fails here, rolling the batch back.
            tx.commit().await?;
            Ok(true)
        })?;
        drop(client);
        if fenced { Ok(()) } else { Err(self.deposed(epoch, holder)) }
    }

    fn deposed(&self, epoch: u64, holder: String) -> StoreError {
        let now = match self.lease_info() {
            Ok(l) => format!("{} (API {}) at epoch {}", l.holder, l.api, l.epoch.0),
            Err(e) => format!("(unreadable: {e})"),
        };
        StoreError::Deposed { holder, epoch, now }
    }

    /// Extends this writer's lease; [`StoreError::Deposed`] once another controller took it.
    /// Bounded by a third of the lease ([`StoreError::Timeout`], retryable): a server that
    /// stopped answering (frozen, or behind a link that drops packets) must not hold the
    /// renewer past the lease, or a deposed leader would go on serving its API.
    pub fn renew(&mut self) -> Result<()> {
        let (lease_ms, holder, epoch) = match &self.role {
            Role::Reader => return Err(StoreError::ReadOnly),
            Role::Writer { epoch: None, .. } => return Err(StoreError::NoLease),
            Role::Writer { lease, epoch: Some(e) } => (lease.lease_ms as i64, lease.holder.clone(), e.0),
        };
        self.ensure_connected()?;
        let fence = self.statement(FENCE)?;
        let epoch_i = big(epoch, || "the epoch".to_string())?;
        let bound_ms = (lease_ms as u64 / 3).max(1);
        // The timer is made inside the runtime: it needs its clock.
        let client = self.client.borrow();
        let answer = self.rt().block_on(async {
            tokio::time::timeout(Duration::from_millis(bound_ms), client.query(&fence, &[&epoch_i, &holder, &lease_ms]))
                .await
        });
        drop(client);
        let Ok(rows) = answer else {
            return Err(StoreError::Timeout { what: "a lease renewal", after_ms: bound_ms });
        };
        if rows?.is_empty() { Err(self.deposed(epoch, holder)) } else { Ok(()) }
    }

    /// This store's identity: random, made at first use and kept.
    pub fn instance_id(&mut self) -> Result<String> {
        self.ensure_connected()?;
        let fresh = fresh_id();
        let row = self.rt().block_on(self.client.borrow().query_one(
            "WITH made AS (INSERT INTO meta (key, value) VALUES ('instance_id', $1) ON CONFLICT (key) DO NOTHING RETURNING value)
             SELECT value FROM made UNION ALL SELECT value FROM meta WHERE key = 'instance_id' LIMIT 1",
            &[&fresh],
        ))?;
        Ok(row.get(0))
    }

    /// Takes the lease, bumping the epoch: if it is free, expired, or already this holder's.
    ///
    /// Otherwise [`StoreError::NotLeader`] names the leader; a standby retries.
    pub fn begin_epoch(&mut self) -> Result<Epoch> {
        let lease = match &self.role {
            Role::Reader => return Err(StoreError::ReadOnly),
            Role::Writer { lease, .. } => lease.clone(),
        };
        self.ensure_connected()?;
        let acquire = self.statement(ACQUIRE)?;
        let lease_ms = lease.lease_ms as i64;
        let row = self.rt().block_on(
            self.client.borrow().query_opt(&acquire, &[&lease.holder, &lease.api, &lease.agents, &lease_ms]),
        )?;
        match row {
            Some(row) => {
                let epoch = Epoch(unsigned(row.get(0), || "cosmos_lease.epoch".to_string())?);
                if let Role::Writer { epoch: held, .. } = &mut self.role {
                    *held = Some(epoch);
                }
                Ok(epoch)
            }
            None => Err(StoreError::NotLeader(self.lease_info()?)),
        }
    }

    /// Writes and renews under `epoch`, taken by another connection of this same controller.
    pub fn hold_epoch(&mut self, epoch: Epoch) {
        if let Role::Writer { epoch: held, .. } = &mut self.role {
            *held = Some(epoch);
        }
    }

    /// The lease row as it is now.
    pub fn lease_info(&self) -> Result<LeaseInfo> {
        self.ensure_connected()?;
        let stmt = self.statement(LEASE_INFO)?;
        let r = self.rt().block_on(self.client.borrow().query_one(&stmt, &[]))?;
        Ok(LeaseInfo {
            epoch: Epoch(unsigned(r.get(0), || "cosmos_lease.epoch".to_string())?),
            holder: r.get(1),
            api: r.get(2),
            agents: r.get(3),
            since_ms: r.get::<_, i64>(4).max(0) as u64,
            expires_in_ms: r.get::<_, i64>(5).max(0) as u64,
        })
    }

    /// Takes the lease (a new epoch) and reads everything the core rebuilds from.
    pub fn load(&mut self) -> Result<Snapshot> {
        let epoch = self.begin_epoch()?;
        let mut client = self.client.borrow_mut();
        self.rt().block_on(async {
            // One snapshot, so the pieces are from the same moment.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let (jobs, attempts, max, agents, id_max) = futures::future::try_join5(
                tx.query("SELECT id, record FROM jobs ORDER BY id", &[]),
                tx.query(
                    "SELECT id, record FROM attempts WHERE state IN ('assigned', 'running', 'stopping') ORDER BY id",
                    &[],
                ),
                tx.query_one("SELECT MAX(id) FROM attempts", &[]),
                // Byte order, whatever the database's collation: as SQLite sorts.
                tx.query("SELECT name, record FROM agents ORDER BY name COLLATE \"C\"", &[]),
                tx.query("SELECT key, value FROM meta WHERE key IN ('job_id_max', 'attempt_id_max')", &[]),
            )
            .await?;
            tx.commit().await?;
            let mut decoder = JobDecoder::new(jobs.len());
            for r in &jobs {
                decoder.push(r.get(0), r.get(1))?;
            }
            let jobs = decoder.finish()?;
            let live_attempts = attempts
                .iter()
                .map(|r| decode::<AttemptRecord>(r.get(1), || format!("attempt {}", r.get::<_, i64>(0))))
                .collect::<Result<Vec<_>>>()?;
            if let Some(bad) = live_attempts.iter().find(|a| !a.state.is_live()) {
                return Err(StoreError::Corrupt {
                    what: format!("attempt {}: state column says live, record says {}", bad.id, bad.state.as_str()),
                });
            }
            let meta = |key: &str| -> Result<Option<u64>> {
                id_max
                    .iter()
                    .find(|r| r.get::<_, &str>(0) == key)
                    .map(|r| {
                        r.get::<_, &str>(1)
                            .parse::<u64>()
                            .map_err(|e| StoreError::Corrupt { what: format!("meta {key}: {e}") })
                    })
                    .transpose()
            };
            let max_attempt_id = max
                .get::<_, Option<i64>>(0)
                .map(|m| unsigned(m, || "MAX(attempts.id)".to_string()))
                .transpose()?
                .max(meta(ATTEMPT_ID_MAX_KEY)?)
                .map(AttemptId);
            let max_job_id = meta(JOB_ID_MAX_KEY)?.map(JobId);
            let agents = agents
                .iter()
                .map(|r| decode::<AgentRecord>(r.get(1), || format!("agent `{}`", r.get::<_, String>(0))))
                .collect::<Result<Vec<_>>>()?;
            Ok(Snapshot { epoch, jobs, live_attempts, max_attempt_id, max_job_id, agents })
        })
    }

    fn query(&self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<tokio_postgres::Row>> {
        self.ensure_connected()?;
        let stmt = self.statement(sql)?;
        Ok(self.rt().block_on(self.client.borrow().query(&stmt, params))?)
    }

    /// One job, if it exists.
    pub fn job(&self, id: JobId) -> Result<Option<JobRecord>> {
        let id_i = big(id.0, || format!("job {id}"))?;
        let rows = self.query("SELECT record FROM jobs WHERE id = $1", &[&id_i])?;
        rows.first().map(|r| decode(r.get(0), || format!("job {id}"))).transpose()
    }

    /// Every attempt of a job, finished ones included, oldest first.
    pub fn attempts_of(&self, job: JobId) -> Result<Vec<AttemptRecord>> {
        let id_i = big(job.0, || format!("job {job}"))?;
        let rows = self.query("SELECT id, record FROM attempts WHERE job_id = $1 ORDER BY id", &[&id_i])?;
        rows.iter().map(|r| decode(r.get(1), || format!("attempt {}", r.get::<_, i64>(0)))).collect()
    }

    /// Every event about a job, in the order they were appended.
    pub fn events_of(&self, job: JobId) -> Result<Vec<EventRecord>> {
        let id_i = big(job.0, || format!("job {job}"))?;
        let rows = self.query(
            "SELECT at_ms, job_id, attempt_id, agent, kind, detail FROM events WHERE job_id = $1 ORDER BY seq",
            &[&id_i],
        )?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    at_ms: unsigned(r.get(0), || "events.at_ms".to_string())?,
                    job_id: r
                        .get::<_, Option<i64>>(1)
                        .map(|j| unsigned(j, || "events.job_id".to_string()).map(JobId))
                        .transpose()?,
                    attempt_id: r
                        .get::<_, Option<i64>>(2)
                        .map(|a| unsigned(a, || "events.attempt_id".to_string()).map(AttemptId))
                        .transpose()?,
                    agent: r.get(3),
                    kind: r.get(4),
                    detail: r.get(5),
                })
            })
            .collect()
    }

    /// How many jobs are in each state: every state, in lifecycle order, zeros included.
    pub fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        let mut counts: Vec<(JobState, u64)> = ALL_JOB_STATES.iter().map(|&s| (s, 0)).collect();
        for row in self.query("SELECT state, COUNT(*) FROM jobs GROUP BY state", &[])? {
            let name: String = row.get(0);
            let n = row.get::<_, i64>(1).max(0) as u64;
            let state = JobState::parse(&name)
                .ok_or_else(|| StoreError::Corrupt { what: format!("{n} job(s) in unknown state `{name}`") })?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = n;
            }
        }
        Ok(counts)
    }

    /// One prompt.
    pub fn prompt(&self, id: &str) -> Result<Option<Prompt>> {
        let rows = self.query("SELECT record FROM prompts WHERE id = $1", &[&id])?;
        rows.first().map(|r| decode(r.get(0), || format!("prompt {id}"))).transpose()
    }

    /// Every prompt, oldest first.
    pub fn prompts(&self) -> Result<Vec<Prompt>> {
        let rows = self.query("SELECT id, record FROM prompts ORDER BY created_ms, id COLLATE \"C\"", &[])?;
        rows.iter().map(|r| decode(r.get(1), || format!("prompt {}", r.get::<_, String>(0)))).collect()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn connect(rt: &tokio::runtime::Runtime, config: &Config, role: &Role) -> Result<Client> {
    let (client, connection) = rt.block_on(config.connect(NoTls))?;
    // Driven whenever this store is inside `block_on`, which is whenever it waits on the server.
    rt.spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the connection to PostgreSQL ended");
        }
    });
    let settings = match role {
        // A leader frozen inside a transaction (SIGSTOP, a VM pause) would
        // hold the lease row's lock and stall the standby's takeover: the
        // server ends such a session after one lease (at least a second, so
        // the pause between two pipelined round trips never counts).
        Role::Writer { lease, .. } => format!(
            "SET idle_in_transaction_session_timeout = {}; SET synchronous_commit = on",
            lease.lease_ms.max(IDLE_IN_TRANSACTION_MS_MIN)
        ),
        Role::Reader => "SET default_transaction_read_only = on".to_string(),
    };
    rt.block_on(client.batch_execute(&settings))?;
    Ok(client)
}

fn fresh_id() -> String {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).is_err() {
        // Only without /dev/urandom: the time and the pid still tell stores apart.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        bytes[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    hex::encode(bytes)
}
