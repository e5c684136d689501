//! One trace per job, derived from what the core persists.
//!
//! The core stays unaware of tracing: the actor hands every batch of
//! [`StoreOp`]s it is about to persist to a [`JobTracer`], which compares
//! each record with what it last saw of it and emits a span for every phase
//! that ended: `submit` (the batch it came in, until durable), `queued`
//! (ready until placed, with the host and GPUs chosen and why it waited),
//! `attempt` (assigned until it ended, with its outcome), `running` (short
//! segments with progress as events), `retry backoff` (with the reason),
//! `cancel`, and the job's root span once it is final. Spans are built once
//! their end is known, with explicit times, so nothing is held open for the
//! hours a run may take.
//!
//! The same ids go on the controller's log lines about a job (its end, and
//! each attempt that did not succeed): `trace_id` and `span_id` in
//! `--log-format json`.
//!
//! Every id is derived from the store's id and the job's or attempt's own
//! (see `cosmos_telemetry::ids`): a restarted controller goes on with the
//! same trace, and the `attempt` span can be named as the parent of the
//! agent's spans (through the `traceparent` of the assign) before it ends.

use crate::core::{Core, Now};
use crate::records::{AttemptRecord, AttemptState, JobRecord, JobState, StoreOp};
use cosmos_proto::{AttemptId, JobId, TraceContext};
use cosmos_telemetry::span::at_ms;
use cosmos_telemetry::{Exporter, SpanBuilder, SpanId, TraceId, Traceparent};
use std::collections::HashMap;
use std::sync::Arc;

/// Longest `running` segment: a run's time is cut into spans no longer than
/// this, each exported when it ends (on the next progress report after it, or the attempt's end).
pub const RUNNING_SEGMENT_MS: u64 = 60_000;

/// What the tracer remembers of a job that is not final.
#[derive(Debug)]
struct JobTrace {
    state: JobState,
    retries: u32,
    cancel_requested: bool,
    /// Start of the job's root span (its submission, or an operator's re-queue).
    since_ms: u64,
    /// Since when it has been ready to be placed (or waiting for what it needs first).
    ready_ms: u64,
    /// Why it waited, as the core said when it started waiting.
    waited: Option<String>,
    cancel_ms: Option<u64>,
    /// Attempts placed, this tracer's count (1 for the first).
    placed: u32,
    /// The reason the last attempt ended with, for the backoff span.
    last_reason: Option<String>,
}

#[derive(Debug)]
struct AttemptTrace {
    job: JobId,
    number: u32,
    state: AttemptState,
    segment: Option<Segment>,
    stop_ms: Option<u64>,
}

#[derive(Debug)]
struct Segment {
    start_ms: u64,
    /// (at, step, total)
    progress: Vec<(u64, u32, u32)>,
    /// Set on the first segment after a controller restart.
    resumed: bool,
}

/// Derives the spans of every job's trace and hands them to the exporter.
pub struct JobTracer {
    exporter: Arc<Exporter>,
    store_id: String,
    jobs: HashMap<JobId, JobTrace>,
    attempts: HashMap<AttemptId, AttemptTrace>,
}

impl JobTracer {
    /// A tracer for the jobs of the store `store_id`, picking up what `core` holds after a restart.
    pub fn new(exporter: Arc<Exporter>, store_id: String, core: &Core, now: Now) -> JobTracer {
        let mut t = JobTracer { exporter, store_id, jobs: HashMap::new(), attempts: HashMap::new() };
        for rec in core.jobs().filter(|r| !r.state.is_final()) {
            // A job still waiting for its first attempt has waited since its submission;
            // one waiting again, since some time before this start that is not known.
            let ready_ms = if rec.state == JobState::Retrying {
                rec.not_before_ms
            } else if rec.attempts_used == 0 && rec.attempts_lost == 0 {
                rec.submitted_ms
            } else {
                now.wall_ms
            };
            t.jobs.insert(rec.id, JobTrace::new(rec, rec.submitted_ms, ready_ms));
            if let Some(jt) = t.jobs.get_mut(&rec.id) {
                jt.waited = core.wait_reason(rec.id);
            }
        }
        for att in core.live_attempts() {
            let segment = (att.state == AttemptState::Running).then(|| Segment {
                start_ms: now.wall_ms,
                progress: Vec::new(),
                resumed: true,
            });
            let number = t.jobs.get(&att.job_id).map_or(1, |j| j.placed);
            t.attempts
                .insert(att.id, AttemptTrace { job: att.job_id, number, state: att.state, segment, stop_ms: None });
        }
        t
    }

    /// The exporter spans go to.
    pub fn exporter(&self) -> &Arc<Exporter> {
        &self.exporter
    }

    /// The W3C trace context an assign of `att` carries: the agent's spans become children of the attempt's span.
    pub fn context(&self, job: JobId, att: AttemptId) -> TraceContext {
        let tp = Traceparent {
            trace_id: trace_id(&self.store_id, job),
            parent_id: attempt_span_id(&self.store_id, att),
            sampled: true,
        };
        TraceContext { traceparent: tp.header(), tracestate: String::new() }
    }

    /// The `submit` span of each job of a batch, from when the actor took it
    /// (`received_ms`) until `durable_ms`: built by the returned closure, which
    /// the actor runs once the batch is durable.
    pub fn submitted(&self, ids: &[JobId], repeat: bool, received_ms: u64) -> impl FnOnce(u64) + Send + 'static {
        let exporter = self.exporter.clone();
        let first = ids.first().copied();
        let spans: Vec<(JobId, TraceId, SpanId, SpanId)> = ids
            .iter()
            .map(|&id| {
                let retries = self.jobs.get(&id).map_or(0, |j| j.retries);
                let span = SpanId::derive(&[self.store_id.as_bytes(), b"submit", &id.0.to_be_bytes()]);
                (id, trace_id(&self.store_id, id), span, root_id(&self.store_id, id, retries))
            })
            .collect();
        let size = ids.len() as i64;
        move |durable_ms: u64| {
            // A repeated submission made no jobs: their traces already hold their submit.
            if repeat {
                return;
            }
            for (index, (id, trace, span, root)) in spans.into_iter().enumerate() {
                exporter.emit(
                    SpanBuilder::new("submit", trace, span, Some(root), at_ms(received_ms), at_ms(durable_ms))
                        .attr("cosmos.job.id", id.to_string())
                        .attr("cosmos.batch.size", size)
                        .attr("cosmos.batch.index", index as i64)
                        .attr_opt("cosmos.batch.first_job", first.map(|f| f.to_string())),
                );
            }
        }
    }

    /// A progress report of a live attempt: an event of its current `running` segment.
    pub fn progress(&mut self, att: AttemptId, step: u32, total: u32, now: Now) {
        let Some(a) = self.attempts.get_mut(&att) else { return };
        let Some(seg) = a.segment.as_mut() else { return };
        if seg.progress.len() < cosmos_telemetry::span::SPAN_EVENTS_MAX {
            seg.progress.push((now.wall_ms, step, total));
        }
        if now.wall_ms.saturating_sub(seg.start_ms) >= RUNNING_SEGMENT_MS {
            self.end_segment(att, now.wall_ms, None);
            if let Some(a) = self.attempts.get_mut(&att) {
                a.segment = Some(Segment { start_ms: now.wall_ms, progress: Vec::new(), resumed: false });
            }
        }
    }

    /// Everything about to be persisted: emits the spans of the phases these records end.
    pub fn persisted(&mut self, ops: &[StoreOp], core: &Core, now: Now) {
        let mut waiting: Vec<JobId> = Vec::new();
        for op in ops {
            match op {
                StoreOp::PutAttempt(att) => self.attempt(att, core, now),
                StoreOp::PutJob(rec) => waiting.extend(self.job(rec, now).then_some(rec.id)),
                _ => {}
            }
        }
        // Asked once the pass has run: a job placed at once did not wait.
        for id in waiting {
            if let Some(jt) = self.jobs.get_mut(&id) {
                jt.waited = core.wait_reason(id);
            }
        }
    }

    /// A job record changed; true when it (again) waits to be placed.
    fn job(&mut self, rec: &JobRecord, now: Now) -> bool {
        let Some(jt) = self.jobs.get_mut(&rec.id) else {
            if rec.state.is_final() {
                return false;
            }
            // New, or re-queued by an operator after it ended.
            let since = if rec.retries == 0 { rec.submitted_ms } else { now.wall_ms };
            self.jobs.insert(rec.id, JobTrace::new(rec, since, since));
            return true;
        };
        let was = jt.state;
        jt.state = rec.state;
        if rec.cancel_requested && !jt.cancel_requested {
            jt.cancel_requested = true;
            jt.cancel_ms = Some(now.wall_ms);
        }
        let mut waits = false;
        match rec.state {
            JobState::Retrying if was != JobState::Retrying => {
                jt.ready_ms = rec.not_before_ms;
                waits = true;
                let reason = jt.last_reason.clone().unwrap_or_default();
                let (trace, root) = (trace_id(&self.store_id, rec.id), root_id(&self.store_id, rec.id, jt.retries));
                let number = jt.placed;
                let span = SpanId::derive(&[
                    self.store_id.as_bytes(),
                    b"backoff",
                    &rec.id.0.to_be_bytes(),
                    &number.to_be_bytes(),
                ]);
                // Its end is known now: the backoff's deadline.
                self.exporter.emit(
                    SpanBuilder::new(
                        "retry backoff",
                        trace,
                        span,
                        Some(root),
                        at_ms(now.wall_ms),
                        at_ms(rec.not_before_ms),
                    )
                    .attr("cosmos.job.id", rec.id.to_string())
                    .attr("cosmos.retry.after_attempt", i64::from(number))
                    .attr("cosmos.retry.reason", first_line(&reason))
                    .attr("cosmos.retry.backoff_ms", rec.not_before_ms.saturating_sub(now.wall_ms) as i64),
                );
            }
            JobState::Queued if matches!(was, JobState::Assigned | JobState::Running) => {
                // Its attempt was lost or refused: it waits again from now.
                jt.ready_ms = now.wall_ms;
                waits = true;
            }
            _ => {}
        }
        if rec.state.is_final() {
            let jt = self.jobs.remove(&rec.id).expect("looked up above");
            self.finish(rec, &jt, now);
        }
        waits
    }

    fn finish(&self, rec: &JobRecord, jt: &JobTrace, now: Now) {
        let trace = trace_id(&self.store_id, rec.id);
        let root = root_id(&self.store_id, rec.id, jt.retries);
        let end = rec.finished_ms.unwrap_or(now.wall_ms);
        if let Some(cancel_ms) = jt.cancel_ms {
            let span = SpanId::derive(&[
                self.store_id.as_bytes(),
                b"cancel",
                &rec.id.0.to_be_bytes(),
                &jt.retries.to_be_bytes(),
            ]);
            self.exporter.emit(
                SpanBuilder::new("cancel", trace, span, Some(root), at_ms(cancel_ms), at_ms(end))
                    .attr("cosmos.job.id", rec.id.to_string())
                    .attr("cosmos.job.state", rec.state.as_str()),
            );
        }
        {
            let _log = tracing::info_span!("job", job = %rec.id, trace_id = %trace, span_id = %root).entered();
            tracing::info!(
                name = rec.spec.name,
                state = rec.state.as_str(),
                attempts = rec.attempts_used,
                error = rec.error.as_deref().map(first_line),
                "job ended"
            );
        }
        let mut span = SpanBuilder::new("job", trace, root, None, at_ms(jt.since_ms), at_ms(end))
            .attr("cosmos.job.id", rec.id.to_string())
            .attr("cosmos.job.name", rec.spec.name.clone())
            .attr("cosmos.job.state", rec.state.as_str())
            .attr("cosmos.job.attempts", i64::from(rec.attempts_used))
            .attr("cosmos.job.attempts_lost", i64::from(rec.attempts_lost))
            .attr("cosmos.job.retries", i64::from(rec.retries))
            .attr("cosmos.job.gpus", i64::from(rec.spec.gpus))
            .attr("cosmos.job.priority", i64::from(rec.spec.priority))
            .attr_opt("cosmos.job.exit_code", rec.exit_code.map(i64::from))
            .attr_opt("cosmos.run.id", rec.spec.labels.get(crate::cosmos::labels::RUN).cloned())
            .attr_opt("cosmos.run.kind", rec.spec.labels.get(crate::cosmos::labels::KIND).cloned());
        span = match (rec.state, &rec.error) {
            (JobState::Succeeded, _) => span.ok(),
            (JobState::Failed, e) => span.error(first_line(e.as_deref().unwrap_or("failed"))),
            (_, Some(e)) => span.attr("cosmos.job.error", first_line(e)),
            _ => span,
        };
        self.exporter.emit(span);
    }

    /// An attempt record changed.
    fn attempt(&mut self, att: &AttemptRecord, core: &Core, now: Now) {
        if !self.attempts.contains_key(&att.id) {
            if !att.state.is_live() {
                return;
            }
            self.placed(att, core);
        }
        // Not placed when its job is not traced (it ended before this tracer saw it).
        let Some(a) = self.attempts.get_mut(&att.id) else { return };
        let was = a.state;
        a.state = att.state;
        match att.state {
            AttemptState::Running if was == AttemptState::Assigned => {
                let start_ms = att.started_ms.unwrap_or(now.wall_ms);
                a.segment = Some(Segment { start_ms, progress: Vec::new(), resumed: false });
            }
            AttemptState::Stopping if was != AttemptState::Stopping => a.stop_ms = Some(now.wall_ms),
            s if !s.is_live() => self.ended(att, now),
            _ => {}
        }
    }

    /// A new attempt: the job's `queued` span ends here, with where it went.
    fn placed(&mut self, att: &AttemptRecord, core: &Core) {
        let (trace, job_root) = match self.jobs.get(&att.job_id) {
            Some(jt) => (trace_id(&self.store_id, att.job_id), root_id(&self.store_id, att.job_id, jt.retries)),
            None => return,
        };
        let span_id = SpanId::derive(&[self.store_id.as_bytes(), b"queued", &att.id.0.to_be_bytes()]);
        let jt = self.jobs.get_mut(&att.job_id).expect("looked up above");
        jt.placed += 1;
        let number = jt.placed;
        let gpus_asked = core.job(att.job_id).map_or(0, |(r, _, _)| r.spec.gpus);
        let span = SpanBuilder::new(
            "queued",
            trace,
            span_id,
            Some(job_root),
            at_ms(jt.ready_ms.min(att.assigned_ms)),
            at_ms(att.assigned_ms),
        )
        .attr("cosmos.job.id", att.job_id.to_string())
        .attr("cosmos.attempt.id", att.id.to_string())
        .attr("cosmos.attempt.number", i64::from(number))
        .attr("cosmos.placement.host", att.agent.clone())
        .attr_strings("cosmos.placement.gpus", &att.gpu_uuids)
        .attr("cosmos.job.gpus", i64::from(gpus_asked))
        .attr_opt("cosmos.queue.waited_because", jt.waited.take());
        self.exporter.emit(span);
        self.attempts.insert(
            att.id,
            AttemptTrace { job: att.job_id, number, state: AttemptState::Assigned, segment: None, stop_ms: None },
        );
    }

    /// Emits the current `running` segment of `att`, ending at `end_ms`.
    fn end_segment(&mut self, att: AttemptId, end_ms: u64, outcome: Option<&str>) {
        let Some(a) = self.attempts.get_mut(&att) else { return };
        let Some(seg) = a.segment.take() else { return };
        let trace = trace_id(&self.store_id, a.job);
        let parent = attempt_span_id(&self.store_id, att);
        let span_id =
            SpanId::derive(&[self.store_id.as_bytes(), b"running", &att.0.to_be_bytes(), &seg.start_ms.to_be_bytes()]);
        let mut span = SpanBuilder::new("running", trace, span_id, Some(parent), at_ms(seg.start_ms), at_ms(end_ms))
            .attr("cosmos.attempt.id", att.to_string())
            .attr_opt("cosmos.attempt.outcome", outcome.map(str::to_string));
        if seg.resumed {
            span = span.attr("cosmos.controller.restarted", true);
        }
        if let Some(&(_, step, total)) = seg.progress.last() {
            span = span.attr("cosmos.progress.step", i64::from(step)).attr("cosmos.progress.total", i64::from(total));
        }
        for (at, step, total) in seg.progress {
            span = span.event(
                "progress",
                at_ms(at),
                vec![
                    cosmos_telemetry::KeyValue::new("step", i64::from(step)),
                    cosmos_telemetry::KeyValue::new("total", i64::from(total)),
                ],
            );
        }
        self.exporter.emit(span);
    }

    /// An attempt ended: its last `running` segment and its own span.
    fn ended(&mut self, att: &AttemptRecord, now: Now) {
        let end_ms = att.ended_ms.unwrap_or(now.wall_ms);
        self.end_segment(att.id, end_ms, Some(att.state.as_str()));
        let Some(a) = self.attempts.remove(&att.id) else { return };
        if let Some(jt) = self.jobs.get_mut(&att.job_id) {
            jt.last_reason = att.reason.clone();
        }
        let retries = self.jobs.get(&att.job_id).map_or(0, |j| j.retries);
        if att.state != AttemptState::Succeeded {
            let (trace, span) = (trace_id(&self.store_id, att.job_id), attempt_span_id(&self.store_id, att.id));
            let _log = tracing::info_span!("attempt", job = %att.job_id, attempt = %att.id, trace_id = %trace, span_id = %span)
                .entered();
            tracing::warn!(
                state = att.state.as_str(),
                host = att.agent,
                exit_code = att.exit_code,
                reason = att.reason.as_deref().map(first_line),
                "attempt did not succeed"
            );
        }
        let mut span = SpanBuilder::new(
            "attempt",
            trace_id(&self.store_id, att.job_id),
            attempt_span_id(&self.store_id, att.id),
            Some(root_id(&self.store_id, att.job_id, retries)),
            at_ms(att.assigned_ms),
            at_ms(end_ms),
        )
        .attr("cosmos.job.id", att.job_id.to_string())
        .attr("cosmos.attempt.id", att.id.to_string())
        .attr("cosmos.attempt.number", i64::from(a.number))
        .attr("cosmos.attempt.state", att.state.as_str())
        .attr("cosmos.placement.host", att.agent.clone())
        .attr_strings("cosmos.placement.gpus", &att.gpu_uuids)
        .attr("cosmos.epoch", att.epoch.0 as i64)
        .attr_opt("cosmos.attempt.exit_code", att.exit_code.map(i64::from))
        .attr_opt("cosmos.attempt.started_ms", att.started_ms.map(|m| m as i64));
        if let Some(stop) = a.stop_ms {
            span = span.event("stop sent", at_ms(stop), Vec::new());
        }
        span = match (att.state, &att.reason) {
            (AttemptState::Succeeded, _) => span.ok(),
            (AttemptState::Cancelled, _) => span,
            (_, Some(r)) => span.error(first_line(r)),
            (_, None) => span.error(att.state.as_str()),
        };
        self.exporter.emit(span);
    }
}

impl JobTrace {
    fn new(rec: &JobRecord, since_ms: u64, ready_ms: u64) -> JobTrace {
        JobTrace {
            state: rec.state,
            retries: rec.retries,
            cancel_requested: rec.cancel_requested,
            since_ms,
            ready_ms,
            waited: None,
            cancel_ms: None,
            placed: rec.attempts_used + rec.attempts_lost,
            last_reason: None,
        }
    }
}

fn trace_id(store: &str, job: JobId) -> TraceId {
    TraceId::derive(&[store.as_bytes(), b"job", &job.0.to_be_bytes()])
}

fn root_id(store: &str, job: JobId, retries: u32) -> SpanId {
    SpanId::derive(&[store.as_bytes(), b"job", &job.0.to_be_bytes(), &retries.to_be_bytes()])
}

fn attempt_span_id(store: &str, att: AttemptId) -> SpanId {
    SpanId::derive(&[store.as_bytes(), b"attempt", &att.0.to_be_bytes()])
}

/// The first line of a reason (the lines under it quote stderr).
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}
