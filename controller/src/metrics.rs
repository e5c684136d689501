//! The controller's Prometheus metrics, served at `GET /metrics`.
//!
//! One prefix, `cosmos_`; base units (seconds, bytes); `_total` on counters;
//! no job or attempt ids as labels (their number is unbounded). Counters and
//! histograms move as the shells act; the gauges (jobs by state, queue,
//! agents, GPUs) are set from a snapshot of the core at each scrape.

use crate::records::{ALL_JOB_STATES, JobState};
use cosmos_proto::{GpuInfo, GpuUsage};
use cosmos_telemetry::SpanCounters;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// `Content-Type` of what [`Metrics::render`] writes (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state's stable name.
    pub state: &'static str,
}

/// An `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// How an attempt ended.
    pub outcome: &'static str,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why a job runs again: `failed`, `lost`, `rejected`, `cancelled` (its attempt), `operator` (`jobs retry`).
    pub reason: &'static str,
}

/// A `direction` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `to_agents` (inputs staged), `from_agents` (outputs delivered), `uploaded`, `downloaded` (through the API).
    pub direction: &'static str,
}

/// The labels of one GPU: as DCGM's exporter names them (`Hostname`, `gpu`, `UUID`), lower-case, so dashboards join on `uuid`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    /// The agent's name.
    pub host: String,
    /// The GPU's index on its host.
    pub gpu: String,
    /// The GPU's UUID (`GPU-…`).
    pub uuid: String,
}

/// Every attempt outcome, so each series exists from the start.
pub const OUTCOMES: [&str; 5] = ["succeeded", "failed", "cancelled", "lost", "rejected"];
/// Every retry reason.
pub const RETRY_REASONS: [&str; 5] = ["failed", "lost", "rejected", "cancelled", "operator"];
/// Every artifact direction.
pub const DIRECTIONS: [&str; 4] = ["to_agents", "from_agents", "uploaded", "downloaded"];
/// Every agent state counted by `cosmos_agents`.
pub const AGENT_STATES: [&str; 4] = ["up", "suspect", "lost", "draining"];

/// What a scrape reads from the core and the shells.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Jobs by state.
    pub jobs: Vec<(JobState, u64)>,
    /// Jobs waiting (queued, backing off, or waiting for dependencies).
    pub queue_depth: u64,
    /// Per agent: its state (`up`, `suspect`, `lost`), whether draining, and its GPUs.
    pub agents: Vec<AgentGpus>,
}

/// One agent in a [`Snapshot`].
#[derive(Clone, Debug)]
pub struct AgentGpus {
    /// Its name.
    pub name: String,
    /// `up`, `suspect` or `lost`.
    pub health: &'static str,
    /// An operator drained it.
    pub draining: bool,
    /// Per GPU: what it is, its last reported usage (none before the first heartbeat), quarantined.
    pub gpus: Vec<(GpuInfo, Option<GpuUsage>, bool)>,
}

/// The controller's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Jobs accepted.
    pub jobs_submitted: Counter,
    /// Jobs that reached a final state, by state.
    pub jobs_finished: Family<StateLabel, Counter>,
    /// Attempts that ended, by outcome.
    pub attempts: Family<OutcomeLabel, Counter>,
    /// Times a job was queued again, by reason.
    pub retries: Family<ReasonLabel, Counter>,
    /// From a job's submission to its first attempt's start.
    pub submit_to_start: Histogram,
    /// One scheduling pass of the core (the call that ran it, whole).
    pub scheduling_pass: Histogram,
    /// One store transaction, from its start to its fsync.
    pub store_commit: Histogram,
    /// Records in one store transaction (group commit).
    pub store_commit_ops: Histogram,
    /// Artifact bytes moved, by direction.
    pub artifact_bytes: Family<DirectionLabel, Counter>,
    /// Spans exported and dropped.
    pub spans: SpanCounters,
    jobs: Family<StateLabel, Gauge>,
    queue_depth: Gauge,
    agents: Family<StateLabel, Gauge>,
    gpu_total: Family<GpuLabels, Gauge>,
    gpu_used: Family<GpuLabels, Gauge>,
    gpu_free: Family<GpuLabels, Gauge>,
    gpu_foreign: Family<GpuLabels, Gauge>,
    gpu_quarantined: Family<GpuLabels, Gauge>,
    gpus_quarantined: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric registered, each labelled series present at zero.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("cosmos")),
            jobs_submitted: Counter::default(),
            jobs_finished: Family::default(),
            attempts: Family::default(),
            retries: Family::default(),
            // 1 ms to about 9 hours.
            submit_to_start: Histogram::new(exponential_buckets(0.001, 4.0, 15)),
            // 10 µs to about 10 s.
            scheduling_pass: Histogram::new(exponential_buckets(0.000_01, 4.0, 11)),
            // 0.1 ms to about 26 s.
            store_commit: Histogram::new(exponential_buckets(0.000_1, 4.0, 10)),
            // 1 to about 1M records.
            store_commit_ops: Histogram::new(exponential_buckets(1.0, 4.0, 11)),
            artifact_bytes: Family::default(),
            spans: SpanCounters::default(),
            jobs: Family::default(),
            queue_depth: Gauge::default(),
            agents: Family::default(),
            gpu_total: Family::default(),
            gpu_used: Family::default(),
            gpu_free: Family::default(),
            gpu_foreign: Family::default(),
            gpu_quarantined: Family::default(),
            gpus_quarantined: Gauge::default(),
        };
        {
            let mut r = m.registry.lock().expect("not poisoned yet");
            r.register("jobs_submitted", "Jobs accepted", m.jobs_submitted.clone());
            r.register("jobs_finished", "Jobs that reached a final state, by state", m.jobs_finished.clone());
            r.register("jobs", "Jobs by state, as stored", m.jobs.clone());
            r.register(
                "queue_depth",
                "Jobs waiting: queued, backing off or waiting for dependencies",
                m.queue_depth.clone(),
            );
            r.register("attempts", "Attempts that ended, by outcome", m.attempts.clone());
            r.register("job_retries", "Times a job was queued again, by reason", m.retries.clone());
            r.register_with_unit(
                "job_submit_to_start",
                "From a job's submission to its first attempt's start (controller clock)",
                prometheus_client::registry::Unit::Seconds,
                m.submit_to_start.clone(),
            );
            r.register_with_unit(
                "scheduling_pass_duration",
                "One input to the scheduler that ran a scheduling pass, whole",
                prometheus_client::registry::Unit::Seconds,
                m.scheduling_pass.clone(),
            );
            r.register_with_unit(
                "store_commit_duration",
                "One store transaction, from its start to its fsync",
                prometheus_client::registry::Unit::Seconds,
                m.store_commit.clone(),
            );
            r.register(
                "store_commit_records",
                "Records in one store transaction (group commit)",
                m.store_commit_ops.clone(),
            );
            r.register_with_unit(
                "artifact",
                "Artifact bytes moved, by direction",
                prometheus_client::registry::Unit::Bytes,
                m.artifact_bytes.clone(),
            );
            r.register("agents", "Agents by state (draining counted apart from their health)", m.agents.clone());
            let bytes = prometheus_client::registry::Unit::Bytes;
            r.register_with_unit("gpu_vram_total", "Memory of each GPU", bytes.clone(), m.gpu_total.clone());
            r.register_with_unit(
                "gpu_vram_used",
                "Memory in use on each GPU, by anyone",
                bytes.clone(),
                m.gpu_used.clone(),
            );
            r.register_with_unit(
                "gpu_vram_free",
                "Free memory on each GPU, by the driver's account",
                bytes.clone(),
                m.gpu_free.clone(),
            );
            r.register_with_unit(
                "gpu_vram_foreign",
                "Memory on each GPU held by processes Cosmos did not start",
                bytes,
                m.gpu_foreign.clone(),
            );
            r.register(
                "gpu_quarantined",
                "1 while a GPU is out of scheduling (memory left held, hardware fault)",
                m.gpu_quarantined.clone(),
            );
            r.register("gpus_quarantined", "GPUs out of scheduling", m.gpus_quarantined.clone());
            m.spans.register(&mut r);
        }
        for s in ALL_JOB_STATES.into_iter().filter(|s| s.is_final()) {
            let _ = m.jobs_finished.get_or_create(&StateLabel { state: s.as_str() });
        }
        for outcome in OUTCOMES {
            let _ = m.attempts.get_or_create(&OutcomeLabel { outcome });
        }
        for reason in RETRY_REASONS {
            let _ = m.retries.get_or_create(&ReasonLabel { reason });
        }
        for direction in DIRECTIONS {
            let _ = m.artifact_bytes.get_or_create(&DirectionLabel { direction });
        }
        m
    }

    /// Counts artifact bytes moved in `direction` (one of [`DIRECTIONS`]).
    pub fn artifact(&self, direction: &'static str, bytes: u64) {
        self.artifact_bytes.get_or_create(&DirectionLabel { direction }).inc_by(bytes);
    }

    /// Sets the gauges from `snap` and writes every metric in the Prometheus text format.
    pub fn render(&self, snap: &Snapshot) -> String {
        // One scrape at a time: the gauges are set, then read.
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        for state in ALL_JOB_STATES {
            let n = snap.jobs.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
            self.jobs.get_or_create(&StateLabel { state: state.as_str() }).set(n as i64);
        }
        self.queue_depth.set(snap.queue_depth as i64);
        for state in AGENT_STATES {
            let n =
                snap.agents.iter().filter(|a| if state == "draining" { a.draining } else { a.health == state }).count();
            self.agents.get_or_create(&StateLabel { state }).set(n as i64);
        }
        for f in [&self.gpu_total, &self.gpu_used, &self.gpu_free, &self.gpu_foreign, &self.gpu_quarantined] {
            // Hosts and GPUs come and go: only those known now are shown.
            f.clear();
        }
        let mut quarantined = 0;
        for a in &snap.agents {
            for (info, usage, q) in &a.gpus {
                let l = GpuLabels { host: a.name.clone(), gpu: info.index.to_string(), uuid: info.uuid.clone() };
                self.gpu_total.get_or_create(&l).set(info.total_vram_bytes as i64);
                if let Some(u) = usage {
                    self.gpu_used.get_or_create(&l).set(u.used_vram_bytes as i64);
                    self.gpu_free.get_or_create(&l).set(u.free_vram_bytes as i64);
                    self.gpu_foreign.get_or_create(&l).set(u.foreign_vram_bytes as i64);
                }
                self.gpu_quarantined.get_or_create(&l).set(i64::from(*q));
                quarantined += i64::from(*q);
            }
        }
        self.gpus_quarantined.set(quarantined);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing into a String does not fail");
        out
    }
}
