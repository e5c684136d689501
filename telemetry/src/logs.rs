//! JSON log lines that name the trace they belong to.
//!
//! A log shipper joins a line to its trace by two top-level keys,
//! `trace_id` and `span_id` (the names the OpenTelemetry log data model and
//! Grafana's trace-to-logs links use). The daemons' spans are built after
//! the fact, not held open as `tracing` spans, so a traced operation opens a
//! `tracing` span with `trace_id` and `span_id` fields (lowercase hex, e.g.
//! `trace_id = %TraceId`); every event inside it, however deeply nested,
//! gets them on its line.

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The ids a `tracing` span names, kept in its extensions.
#[derive(Clone, Debug)]
struct TraceIds {
    trace_id: String,
    span_id: String,
}

#[derive(Default)]
struct IdsVisitor {
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl IdsVisitor {
    fn keep(&mut self, field: &Field, value: String) {
        // Only lowercase hex of the right length: the value goes into the line unescaped.
        let hex =
            |n: usize| value.len() == n && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match field.name() {
            "trace_id" if hex(32) => self.trace_id = Some(value),
            "span_id" if hex(16) => self.span_id = Some(value),
            _ => {}
        }
    }
}

impl Visit for IdsVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.keep(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if matches!(field.name(), "trace_id" | "span_id") {
            self.keep(field, format!("{value:?}"));
        }
    }
}

/// Remembers the trace ids of each new span that names them, for [`WithTraceIds`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceIdsLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for TraceIdsLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut v = IdsVisitor::default();
        attrs.record(&mut v);
        if let (Some(trace_id), Some(span_id), Some(span)) = (v.trace_id, v.span_id, ctx.span(id)) {
            span.extensions_mut().insert(TraceIds { trace_id, span_id });
        }
    }
}

/// A JSON event format whose lines get `trace_id` and `span_id` first when
/// the event is inside a span that names them (the innermost such span);
/// needs [`TraceIdsLayer`] on the same subscriber.
#[derive(Clone, Debug)]
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let ids =
            ctx.event_scope().and_then(|mut scope| scope.find_map(|span| span.extensions().get::<TraceIds>().cloned()));
        let Some(ids) = ids else { return self.0.format_event(ctx, writer, event) };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}", ids.trace_id, ids.span_id),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SpanId, TraceId};
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_inside_a_traced_span_carry_its_ids_at_the_top_and_others_do_not() {
        let buf = Buf::default();
        let out = buf.clone();
        let format = tracing_subscriber::fmt::format().json().flatten_event(true).with_current_span(true);
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(WithTraceIds(format))
            .with_writer(move || out.clone())
            .finish()
            .with(TraceIdsLayer);
        let (trace, span) = (TraceId::derive(&[b"t"]), SpanId::derive(&[b"s"]));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let _traced = tracing::info_span!("attempt", trace_id = %trace, span_id = %span).entered();
            let _inner = tracing::info_span!("inner", step = 3).entered();
            tracing::info!(n = 1, "inside, nested");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(lines[1]["message"], "inside, nested");
        assert_eq!(lines[1]["trace_id"], trace.to_string(), "{text}");
        assert_eq!(lines[1]["span_id"], span.to_string(), "{text}");
        assert_eq!(lines[1]["n"], 1, "the event's own fields stay: {text}");
        assert_eq!(trace.to_string().len(), 32);
    }
}
