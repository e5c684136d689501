//! The span queue and its exporter thread.
//!
//! Not the SDK's `BatchSpanProcessor`: it counts the spans it drops but
//! keeps the count to itself (it only logs it at shutdown), and the
//! daemons must show it in `/metrics`. This one is the same shape (a
//! bounded channel, one thread that sends batches when full or when the
//! oldest span has waited the schedule delay) with its counts public.

use crate::config::{Protocol as Wire, TraceConfig};
use crate::grpc::GrpcClient;
use crate::http_client::UreqClient;
use crate::span::SpanBuilder;
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Why spans were lost.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` (the exporter was behind: collector slow or down) or `export_failed` (the collector refused or never answered).
    pub reason: &'static str,
}

/// What happened to the spans a daemon made; registered in its `/metrics`
/// whether or not export is on, so dashboards find the series.
#[derive(Clone, Debug, Default)]
pub struct SpanCounters {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans lost, by reason.
    pub dropped: Family<DropLabels, Counter>,
}

impl SpanCounters {
    /// Registers `cosmos_spans_exported_total` and `cosmos_spans_dropped_total{reason}` (prefix from `registry`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("spans_exported", "Spans the OTLP collector accepted", self.exported.clone());
        registry.register(
            "spans_dropped",
            "Spans lost without reaching the collector (queue full, or the export failed)",
            self.dropped.clone(),
        );
        // Both series exist from the start, at zero.
        for reason in ["queue_full", "export_failed"] {
            let _ = self.dropped.get_or_create(&DropLabels { reason });
        }
    }

    fn drop_spans(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&DropLabels { reason }).inc_by(n);
    }
}

enum Msg {
    Span(Box<SpanData>),
    Flush(mpsc::Sender<()>),
    Shutdown(mpsc::Sender<()>),
}

/// Could not start exporting.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The OTLP exporter refused its settings.
    #[error("the OTLP exporter for {endpoint}: {reason}")]
    Build {
        /// Where it would have exported.
        endpoint: String,
        /// Its words.
        reason: String,
    },
    /// The gRPC client's runtime could not be made.
    #[error("starting the OTLP/gRPC client: {0}")]
    Grpc(std::io::Error),
    /// The thread could not be started.
    #[error("starting the span exporter thread: {0}")]
    Thread(std::io::Error),
}

/// Hands finished spans to the exporter thread without ever waiting for it.
pub struct Exporter {
    tx: SyncSender<Msg>,
    counters: SpanCounters,
    scope: InstrumentationScope,
    thread: Mutex<Option<JoinHandle<()>>>,
    endpoint: String,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl Exporter {
    /// Starts exporting to `config`'s endpoint over OTLP (HTTP protobuf or gRPC), counting into `counters`.
    pub fn start(
        config: &TraceConfig,
        scope_name: &'static str,
        counters: SpanCounters,
    ) -> Result<Exporter, ExportError> {
        let build_err =
            |e: &dyn std::fmt::Display| ExportError::Build { endpoint: config.endpoint.clone(), reason: e.to_string() };
        let builder = opentelemetry_otlp::SpanExporter::builder().with_http();
        // Both carry the same protobuf request; gRPC frames it and speaks HTTP/2 (see `grpc`).
        let builder = match config.protocol {
            Wire::HttpProtobuf => builder.with_http_client(UreqClient::new(config.timeout())),
            Wire::Grpc => builder.with_http_client(GrpcClient::new(config.timeout()).map_err(ExportError::Grpc)?),
        };
        let mut exporter = builder
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.endpoint.clone())
            .with_timeout(config.timeout())
            .build()
            .map_err(|e| build_err(&e))?;
        let resource = Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .with_attributes(config.resource.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
            .build();
        exporter.set_resource(&resource);
        let scope = InstrumentationScope::builder(scope_name).with_version(env!("CARGO_PKG_VERSION")).build();
        let (tx, rx) = mpsc::sync_channel(config.queue_spans_max);
        let batch_max = config.batch_spans_max;
        let delay = Duration::from_millis(config.schedule_delay_ms);
        let thread_counters = counters.clone();
        let endpoint = config.endpoint.clone();
        let thread = std::thread::Builder::new()
            .name("span-export".into())
            .spawn(move || export_loop(rx, exporter, batch_max, delay, thread_counters, endpoint))
            .map_err(ExportError::Thread)?;
        Ok(Exporter { tx, counters, scope, thread: Mutex::new(Some(thread)), endpoint: config.endpoint.clone() })
    }

    /// Queues a finished span; when the queue is full the span is dropped and counted. Never blocks.
    pub fn emit(&self, span: SpanBuilder) {
        match self.tx.try_send(Msg::Span(Box::new(span.build(&self.scope)))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.counters.drop_spans("queue_full", 1),
        }
    }

    /// Where spans go.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The counters it keeps.
    pub fn counters(&self) -> &SpanCounters {
        &self.counters
    }

    /// Sends what is queued now; waits at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = mpsc::channel();
        self.control(Msg::Flush(ack), timeout) && done.recv_timeout(timeout).is_ok()
    }

    /// Sends what is queued and stops the thread; waits at most `timeout`
    /// (dropping the exporter does not flush: a daemon calls this on its way out).
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        let (ack, done) = mpsc::channel();
        if !self.control(Msg::Shutdown(ack), timeout) {
            return false;
        }
        let ok = done.recv_timeout(timeout.saturating_sub(start.elapsed())).is_ok();
        if ok {
            if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = t.join();
            }
        }
        ok
    }

    /// Queues a control message behind the spans, retrying while the queue is full, up to `timeout`.
    fn control(&self, mut msg: Msg, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

fn export_loop(
    rx: Receiver<Msg>,
    exporter: opentelemetry_otlp::SpanExporter,
    batch_max: usize,
    delay: Duration,
    counters: SpanCounters,
    endpoint: String,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(batch_max);
    let mut due: Option<Instant> = None;
    // The collector's state as last seen, so an outage is logged once, and its end once.
    let mut failing = false;
    let mut send = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(batch_max));
        let n = spans.len() as u64;
        match futures_executor::block_on(exporter.export(spans)) {
            Ok(()) => {
                counters.exported.inc_by(n);
                if failing {
                    tracing::info!(endpoint, "the OTLP collector accepts spans again");
                    failing = false;
                }
            }
            Err(e) => {
                counters.drop_spans("export_failed", n);
                if !failing {
                    tracing::warn!(endpoint, error = %e, spans = n, "cannot export spans; they are dropped (counted in cosmos_spans_dropped_total) until the collector answers");
                    failing = true;
                }
            }
        }
    };
    loop {
        let msg = match due {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match msg {
            Ok(Msg::Span(span)) => {
                if batch.is_empty() {
                    due = Some(Instant::now() + delay);
                }
                batch.push(*span);
                if batch.len() >= batch_max {
                    send(&mut batch);
                    due = None;
                }
            }
            Ok(Msg::Flush(ack)) => {
                send(&mut batch);
                due = None;
                let _ = ack.send(());
            }
            Ok(Msg::Shutdown(ack)) => {
                send(&mut batch);
                let _ = exporter.shutdown();
                let _ = ack.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                send(&mut batch);
                due = None;
            }
            Err(RecvTimeoutError::Disconnected) => {
                send(&mut batch);
                return;
            }
        }
    }
}
