//! What the agent tells operators' tooling besides its logs: spans of the
//! phases it runs for each attempt, children of the controller's `attempt`
//! span (whose id comes in the assign's `traceparent`), and its own
//! Prometheus metrics on a loopback port for a node-level scrape.
//!
//! Spans (service `cosmos-agent` unless `OTEL_SERVICE_NAME` says otherwise,
//! with `host.name` and `cosmos.agent.name`): `stage inputs` (inputs, bytes,
//! cache hits and misses), `start` (the runtime and its handle), `deliver
//! outputs` (files, bytes) and `stop` (a cancel or timeout, to the exit).
//! Each is built when its phase ends, with the times the shell saw. Each
//! attempt's context is also kept in its directory ([`TRACEPARENT_FILE`]),
//! so an agent restarted mid-attempt goes on with the spans of the attempts
//! it adopts (their outputs' delivery, their stop) in the job's trace.

use cosmos_proto::spec::{ArtifactRef, InputArtifact};
use cosmos_proto::{Assign, AttemptId, GpuInfo, GpuUsage};
use cosmos_telemetry::{Exporter, SpanBuilder, SpanCounters, SpanId, Traceparent};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// The file in an attempt's directory holding the `traceparent` its assign carried.
pub const TRACEPARENT_FILE: &str = "traceparent";

/// One attempt's trace context and the phases in progress.
#[derive(Debug)]
struct Ctx {
    parent: Traceparent,
    staging: Option<(SystemTime, Vec<InputArtifact>, u64, u64)>,
    starting: Option<SystemTime>,
    delivering: Option<(SystemTime, u64, usize)>,
    stopping: Option<(SystemTime, u64)>,
}

/// The agent's spans, derived from what its shell does.
pub struct AgentTracer {
    exporter: Arc<Exporter>,
    runtime: &'static str,
    /// The runtime's root: attempts' directories are under it (see [`crate::runtime::attempt_dir`]).
    root: PathBuf,
    attempts: HashMap<AttemptId, Ctx>,
}

impl Ctx {
    fn new(parent: Traceparent) -> Ctx {
        Ctx { parent, staging: None, starting: None, delivering: None, stopping: None }
    }
}

impl AgentTracer {
    /// Spans to `exporter`, naming `runtime` on `start` spans; contexts kept under `root`.
    pub fn new(exporter: Arc<Exporter>, runtime: &'static str, root: PathBuf) -> AgentTracer {
        AgentTracer { exporter, runtime, root, attempts: HashMap::new() }
    }

    /// What a restarted agent found: picks up the contexts the attempts' directories kept.
    pub fn recovered(&mut self, attempts: impl IntoIterator<Item = AttemptId>) {
        for att in attempts {
            let path = crate::runtime::attempt_dir(&self.root, att).join(TRACEPARENT_FILE);
            // None for an attempt assigned while the controller did not trace.
            let Some(parent) = std::fs::read_to_string(&path).ok().and_then(|t| Traceparent::parse(&t)) else {
                continue;
            };
            self.attempts.entry(att).or_insert(Ctx::new(parent));
        }
    }

    /// The exporter spans go to.
    pub fn exporter(&self) -> &Arc<Exporter> {
        &self.exporter
    }

    /// An assign came: remember its context (none: the controller does not trace), here and in
    /// the attempt's directory for the next agent.
    pub fn assigned(&mut self, a: &Assign) {
        let Some(parent) = Traceparent::parse(&a.trace.traceparent) else { return };
        if self.attempts.contains_key(&a.attempt_id) {
            return;
        }
        self.attempts.insert(a.attempt_id, Ctx::new(parent));
        let dir = crate::runtime::attempt_dir(&self.root, a.attempt_id);
        let tmp = dir.join(format!("{TRACEPARENT_FILE}.tmp"));
        // Renamed into place: a crash leaves no torn header (a torn one would only be ignored, but so would the trace).
        let kept = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&tmp, parent.header()))
            .and_then(|()| std::fs::rename(&tmp, dir.join(TRACEPARENT_FILE)));
        if let Err(e) = kept {
            tracing::warn!(attempt = %a.attempt_id, dir = %dir.display(), error = %e, "cannot keep the attempt's trace context; an agent restarted under it would stop tracing it");
        }
    }

    fn span(&self, ctx: &Ctx, name: &'static str, start: SystemTime, att: AttemptId) -> SpanBuilder {
        SpanBuilder::new(
            name,
            ctx.parent.trace_id,
            SpanId::random(),
            Some(ctx.parent.parent_id),
            start,
            SystemTime::now(),
        )
        .remote_parent()
        .attr("cosmos.attempt.id", att.to_string())
    }

    /// Staging began: `hits` of the inputs were in the host cache already, `hit_bytes` of their bytes.
    pub fn staging(&mut self, att: AttemptId, inputs: Vec<InputArtifact>, hits: u64, hit_bytes: u64) {
        if let Some(c) = self.attempts.get_mut(&att) {
            c.staging = Some((SystemTime::now(), inputs, hits, hit_bytes));
        }
    }

    /// Staging ended, well or not.
    pub fn staged(&mut self, att: AttemptId, error: Option<&str>) {
        let Some(c) = self.attempts.get_mut(&att) else { return };
        let Some((start, inputs, hits, hit_bytes)) = c.staging.take() else { return };
        let c = &self.attempts[&att];
        let bytes: u64 = inputs.iter().map(|i| i.size_bytes).sum();
        let mut span = self
            .span(c, "stage inputs", start, att)
            .attr("cosmos.inputs", inputs.len() as i64)
            .attr("cosmos.inputs.bytes", bytes as i64)
            .attr("cosmos.cache.hits", hits as i64)
            .attr("cosmos.cache.misses", (inputs.len() as u64).saturating_sub(hits) as i64)
            .attr("cosmos.cache.fetched_bytes", bytes.saturating_sub(hit_bytes) as i64);
        span = match error {
            Some(e) => span.error(e.to_string()),
            None => span.ok(),
        };
        self.exporter.emit(span);
    }

    /// The runtime was asked to start the attempt.
    pub fn starting(&mut self, att: AttemptId) {
        if let Some(c) = self.attempts.get_mut(&att) {
            c.starting = Some(SystemTime::now());
        }
    }

    /// The runtime started it (`Ok(handle)`) or could not (`Err(reason)`).
    pub fn started(&mut self, att: AttemptId, result: Result<&str, &str>) {
        let Some(c) = self.attempts.get_mut(&att) else { return };
        let Some(start) = c.starting.take() else { return };
        let c = &self.attempts[&att];
        let span = self.span(c, "start", start, att).attr("cosmos.runtime", self.runtime);
        self.exporter.emit(match result {
            Ok(handle) => span.attr("cosmos.runtime.handle", handle.to_string()).ok(),
            Err(reason) => span.error(reason.to_string()),
        });
    }

    /// Its outputs are being delivered to the controller.
    pub fn delivering(&mut self, att: AttemptId, outputs: &[ArtifactRef]) {
        if let Some(c) = self.attempts.get_mut(&att) {
            c.delivering = Some((SystemTime::now(), outputs.iter().map(|o| o.size_bytes).sum(), outputs.len()));
        }
    }

    /// Delivery ended.
    pub fn delivered(&mut self, att: AttemptId, error: Option<&str>) {
        let Some(c) = self.attempts.get_mut(&att) else { return };
        let Some((start, bytes, files)) = c.delivering.take() else { return };
        let c = &self.attempts[&att];
        let span = self
            .span(c, "deliver outputs", start, att)
            .attr("cosmos.outputs", files as i64)
            .attr("cosmos.outputs.bytes", bytes as i64);
        self.exporter.emit(match error {
            Some(e) => span.error(e.to_string()),
            None => span.ok(),
        });
    }

    /// A stop was sent to the runtime.
    pub fn stopping(&mut self, att: AttemptId, grace_ms: u64) {
        if let Some(c) = self.attempts.get_mut(&att) {
            c.stopping.get_or_insert((SystemTime::now(), grace_ms));
        }
    }

    /// The attempt's process or container ended.
    pub fn exited(&mut self, att: AttemptId, code: Option<i32>, signal: Option<i32>, oom_killed: bool) {
        let Some(c) = self.attempts.get_mut(&att) else { return };
        let Some((start, grace_ms)) = c.stopping.take() else { return };
        let c = &self.attempts[&att];
        let span = self
            .span(c, "stop", start, att)
            .attr("cosmos.stop.grace_ms", grace_ms as i64)
            .attr_opt("cosmos.exit.code", code.map(i64::from))
            .attr_opt("cosmos.exit.signal", signal.map(i64::from))
            .attr("cosmos.exit.oom_killed", oom_killed);
        self.exporter.emit(span);
    }

    /// A `tracing` span carrying the attempt's trace and parent span ids, so
    /// the log lines of its phases name them (`trace_id` and `span_id` in
    /// `--log-format json`); a disabled span when it is not traced.
    pub fn log_span(&self, att: AttemptId) -> tracing::Span {
        match self.attempts.get(&att) {
            Some(c) => tracing::info_span!(
                "attempt",
                attempt = %att,
                trace_id = %c.parent.trace_id,
                span_id = %c.parent.parent_id
            ),
            None => tracing::Span::none(),
        }
    }

    /// The controller recorded the attempt's end: nothing more comes of it.
    pub fn forget(&mut self, att: AttemptId) {
        self.attempts.remove(&att);
    }
}

/// A `cache` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    /// `hit` or `miss`.
    pub cache: &'static str,
}

/// One GPU of this host.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    /// Its index.
    pub gpu: String,
    /// Its UUID.
    pub uuid: String,
}

/// An `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitLabel {
    /// `exited_0`, `exited_nonzero`, `signalled`, `oom_killed`.
    pub how: &'static str,
}

/// The agent's own metrics (prefix `cosmos_agent_`).
pub struct AgentMetrics {
    registry: Registry,
    /// Attempts live on this agent now.
    pub attempts_live: Gauge,
    /// Attempt processes or containers that ended, by how.
    pub exits: Family<ExitLabel, Counter>,
    /// Inputs staged, by whether the host cache held them.
    pub inputs: Family<CacheLabel, Counter>,
    /// Input bytes staged, by whether the host cache held them.
    pub input_bytes: Family<CacheLabel, Counter>,
    /// Output bytes delivered to the controller.
    pub output_bytes: Counter,
    /// Spans exported and dropped.
    pub spans: SpanCounters,
    gpu_total: Family<GpuLabels, Gauge>,
    gpu_used: Family<GpuLabels, Gauge>,
    gpu_free: Family<GpuLabels, Gauge>,
    gpu_foreign: Family<GpuLabels, Gauge>,
}

impl Default for AgentMetrics {
    fn default() -> AgentMetrics {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Every metric registered.
    pub fn new() -> AgentMetrics {
        let mut m = AgentMetrics {
            registry: Registry::with_prefix("cosmos_agent"),
            attempts_live: Gauge::default(),
            exits: Family::default(),
            inputs: Family::default(),
            input_bytes: Family::default(),
            output_bytes: Counter::default(),
            spans: SpanCounters::default(),
            gpu_total: Family::default(),
            gpu_used: Family::default(),
            gpu_free: Family::default(),
            gpu_foreign: Family::default(),
        };
        let r = &mut m.registry;
        r.register("attempts_live", "Attempts live on this agent", m.attempts_live.clone());
        r.register("attempt_exits", "Attempt processes or containers that ended, by how", m.exits.clone());
        r.register("inputs_staged", "Inputs staged, by whether the host cache held them", m.inputs.clone());
        r.register_with_unit(
            "inputs_staged",
            "Input bytes staged, by whether the host cache held them",
            Unit::Bytes,
            m.input_bytes.clone(),
        );
        r.register_with_unit(
            "outputs_delivered",
            "Output bytes delivered to the controller",
            Unit::Bytes,
            m.output_bytes.clone(),
        );
        r.register_with_unit("gpu_vram_total", "Memory of each GPU", Unit::Bytes, m.gpu_total.clone());
        r.register_with_unit("gpu_vram_used", "Memory in use on each GPU, by anyone", Unit::Bytes, m.gpu_used.clone());
        r.register_with_unit("gpu_vram_free", "Free memory on each GPU", Unit::Bytes, m.gpu_free.clone());
        r.register_with_unit(
            "gpu_vram_foreign",
            "Memory held by processes this agent did not start",
            Unit::Bytes,
            m.gpu_foreign.clone(),
        );
        m.spans.register(r);
        for how in ["exited_0", "exited_nonzero", "signalled", "oom_killed"] {
            let _ = m.exits.get_or_create(&ExitLabel { how });
        }
        for cache in ["hit", "miss"] {
            let _ = m.inputs.get_or_create(&CacheLabel { cache });
            let _ = m.input_bytes.get_or_create(&CacheLabel { cache });
        }
        m
    }

    /// Records this host's GPUs and their latest readings.
    pub fn gpus(&self, gpus: &[GpuInfo], usage: &[GpuUsage]) {
        for g in gpus {
            let l = GpuLabels { gpu: g.index.to_string(), uuid: g.uuid.clone() };
            self.gpu_total.get_or_create(&l).set(g.total_vram_bytes as i64);
            if let Some(u) = usage.iter().find(|u| u.uuid == g.uuid) {
                self.gpu_used.get_or_create(&l).set(u.used_vram_bytes as i64);
                self.gpu_free.get_or_create(&l).set(u.free_vram_bytes as i64);
                self.gpu_foreign.get_or_create(&l).set(u.foreign_vram_bytes as i64);
            }
        }
    }

    /// Every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing into a String does not fail");
        out
    }
}

/// The agent's `--metrics-listen` is not a loopback address.
#[derive(Debug, thiserror::Error)]
pub enum MetricsListenError {
    /// Not loopback.
    #[error(
        "--metrics-listen {0}: the agent serves /metrics on loopback only (127.0.0.1 or [::1]); \
         a node-level Prometheus or agent on this host scrapes it there"
    )]
    NotLoopback(SocketAddr),
    /// Could not bind.
    #[error("--metrics-listen {addr}: cannot listen: {source}; pick another port")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Most bytes of a request head the metrics listener reads.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// A scraper gets this long to send its request.
const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// Binds `addr` (loopback only) for [`serve_metrics`].
pub async fn bind_metrics(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsListenError> {
    if !addr.ip().is_loopback() {
        return Err(MetricsListenError::NotLoopback(addr));
    }
    tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsListenError::Bind { addr, source })
}

/// Answers `GET /metrics` (and 404 to anything else) on `listener`, one short connection at a time per request.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<AgentMetrics>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_millis(REQUEST_TIMEOUT_MS), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_HEAD_BYTES_MAX {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if read != Ok(true) {
                return;
            }
            let ok = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?");
            let (status, body, ctype) = if ok {
                let body = metrics.render();
                ("200 OK", body, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)
            } else {
                ("404 Not Found", "only GET /metrics is served here\n".to_string(), "text/plain; charset=utf-8")
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
