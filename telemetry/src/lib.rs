//! What leaves the Cosmos daemons besides log lines: traces over OTLP and
//! metrics for Prometheus.
//!
//! Traces are off unless an OTLP endpoint is configured through the standard
//! `OTEL_*` variables ([`TraceConfig::from_env`]). Spans are not held open
//! while the work they describe goes on (a run can take hours, and a
//! controller restart must not lose its trace): each daemon builds a span
//! once its phase is over, with explicit start and end times and, on the
//! controller, ids derived from the store and the job ([`ids`]), and hands it
//! to an [`Exporter`]: a bounded queue that never blocks its caller and
//! counts what it drops, drained by a thread of its own that speaks
//! OTLP/HTTP with a blocking client, or OTLP/gRPC over HTTP/2 on a runtime
//! of its own (so none of the daemons' runtimes can be the wrong one).

pub mod config;
pub mod export;
pub mod grpc;
pub mod http_client;
pub mod ids;
pub mod logs;
pub mod span;

pub use config::{ConfigError, Protocol, TraceConfig};
pub use export::{Exporter, SpanCounters};
pub use ids::{SpanId, TraceId, Traceparent};
pub use span::SpanBuilder;

/// Re-exported so the daemons build attributes with the same crate version.
pub use opentelemetry::{KeyValue, Value};
