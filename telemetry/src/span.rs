//! Spans built after the fact: explicit ids, start and end.

use crate::ids::{SpanId, TraceId};
use opentelemetry::trace::{Event, SpanContext, SpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Most events kept on one span (progress reports, say); later ones are counted as dropped.
pub const SPAN_EVENTS_MAX: usize = 128;

/// Milliseconds since the Unix epoch as a [`SystemTime`].
pub fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// One finished span, put together field by field.
#[derive(Clone, Debug)]
pub struct SpanBuilder {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    parent_is_remote: bool,
    kind: SpanKind,
    name: Cow<'static, str>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    events: SpanEvents,
    status: Status,
}

impl SpanBuilder {
    /// A span of `trace` named `name` from `start` to `end` (an end before its start is taken as the start).
    pub fn new(
        name: impl Into<Cow<'static, str>>,
        trace_id: TraceId,
        span_id: SpanId,
        parent: Option<SpanId>,
        start: SystemTime,
        end: SystemTime,
    ) -> SpanBuilder {
        SpanBuilder {
            trace_id,
            span_id,
            parent,
            parent_is_remote: false,
            kind: SpanKind::Internal,
            name: name.into(),
            start,
            end: end.max(start),
            attributes: Vec::new(),
            events: SpanEvents::default(),
            status: Status::Unset,
        }
    }

    /// The parent span was made by another process (the controller, for the agent's spans).
    pub fn remote_parent(mut self) -> SpanBuilder {
        self.parent_is_remote = true;
        self
    }

    /// The span's kind (internal by default).
    pub fn kind(mut self, kind: SpanKind) -> SpanBuilder {
        self.kind = kind;
        self
    }

    /// Adds an attribute.
    pub fn attr(mut self, key: &'static str, value: impl Into<Value>) -> SpanBuilder {
        self.attributes.push(KeyValue::new(key, value));
        self
    }

    /// Adds an attribute when there is a value.
    pub fn attr_opt(self, key: &'static str, value: Option<impl Into<Value>>) -> SpanBuilder {
        match value {
            Some(v) => self.attr(key, v),
            None => self,
        }
    }

    /// Adds a string-array attribute.
    pub fn attr_strings(mut self, key: &'static str, values: &[String]) -> SpanBuilder {
        let values: Vec<StringValue> = values.iter().map(|v| StringValue::from(v.clone())).collect();
        self.attributes.push(KeyValue::new(key, Value::Array(values.into())));
        self
    }

    /// Adds an event at `at` (past [`SPAN_EVENTS_MAX`], counted as dropped).
    pub fn event(
        mut self,
        name: impl Into<Cow<'static, str>>,
        at: SystemTime,
        attributes: Vec<KeyValue>,
    ) -> SpanBuilder {
        if self.events.events.len() < SPAN_EVENTS_MAX {
            self.events.events.push(Event::new(name, at, attributes, 0));
        } else {
            self.events.dropped_count += 1;
        }
        self
    }

    /// Marks the span failed, with why.
    pub fn error(mut self, message: impl Into<Cow<'static, str>>) -> SpanBuilder {
        self.status = Status::error(message);
        self
    }

    /// Marks the span as having ended well.
    pub fn ok(mut self) -> SpanBuilder {
        self.status = Status::Ok;
        self
    }

    /// The exportable span.
    pub fn build(self, scope: &InstrumentationScope) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                self.trace_id.otel(),
                self.span_id.otel(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: self.parent.map_or(opentelemetry::trace::SpanId::INVALID, SpanId::otel),
            parent_span_is_remote: self.parent_is_remote,
            span_kind: self.kind,
            name: self.name,
            start_time: self.start,
            end_time: self.end,
            attributes: self.attributes,
            dropped_attributes_count: 0,
            events: self.events,
            links: SpanLinks::default(),
            status: self.status,
            instrumentation_scope: scope.clone(),
        }
    }
}
