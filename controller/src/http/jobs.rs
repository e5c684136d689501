//! Jobs, agents and cluster status: the scheduler's part of the HTTP API.

use super::*;
use crate::actor::{Cancel, GetJob, JobSummary, PageJobs, Retry, SetDraining, Status, SubmitWith};
use crate::core::SubmitError;
use crate::logs::{LogCursor, LogStart, Unended, read_log};
use crate::records::{Idempotency, JobState};
use cosmos_proto::{AttemptId, JobId, JobSpec, LogStream};
use std::collections::BTreeMap;

/// How often a followed log is checked for growth.
const FOLLOW_POLL_MS: u64 = 200;

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/jobs", web::post().to(submit))
        .route("/v1/jobs", web::get().to(list_jobs))
        .route("/v1/jobs/{id}", web::get().to(show_job))
        .route("/v1/jobs/{id}/cancel", web::post().to(cancel))
        .route("/v1/jobs/{id}/retry", web::post().to(retry))
        .route("/v1/jobs/{id}/logs", web::get().to(logs))
        .route("/v1/agents", web::get().to(agents))
        .route("/v1/agents/{name}/drain", web::post().to(drain))
        .route("/v1/agents/{name}/undrain", web::post().to(undrain))
        .route("/v1/agents/{name}/gpus/{uuid}/release", web::post().to(release_gpu))
        .route("/v1/hosts", web::get().to(list_hosts))
        .route("/v1/hosts", web::post().to(add_host))
        .route("/v1/hosts/{name}", web::delete().to(remove_host))
        .route("/v1/status", web::get().to(status))
        .route("/v1/events", web::get().to(events));
}

/// Jobs in a page of `GET /v1/jobs` when the request names no `limit`.
pub const JOBS_PAGE_DEFAULT: usize = 1_000;
/// Most jobs in one page.
pub const JOBS_PAGE_MAX: usize = 10_000;
/// Response header: where the next page starts (`after=` for the next request); absent on the last page.
pub const NEXT_AFTER_HEADER: &str = "Cosmos-Next-After";
/// Response header: the event stream's cursor as of this page (`GET /v1/events?after=`).
pub const EVENTS_CURSOR_HEADER: &str = "Cosmos-Events-Cursor";
/// How often an idle event stream sends a comment, so proxies and clients see it alive.
const EVENTS_KEEPALIVE_MS: u64 = 15_000;

/// One job as submitted: a line of a JSONL batch file. Only `command` is required.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobLine {
    /// Shown in listings.
    #[serde(default)]
    pub name: Option<String>,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Container image (Docker runtime only).
    #[serde(default)]
    pub image: Option<String>,
    /// GPUs on one host (default 1).
    #[serde(default)]
    pub gpus: Option<u32>,
    /// Free VRAM each GPU must have, in MiB.
    #[serde(default)]
    pub min_vram_mib: Option<u64>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Time limit per attempt, in seconds.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Attempts in all (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Higher runs first (default 0).
    #[serde(default)]
    pub priority: Option<i32>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Files from the controller's blob store placed in the work directory before start.
    #[serde(default)]
    pub inputs: Vec<cosmos_proto::InputArtifact>,
    /// Files collected from the work directory after a successful exit.
    #[serde(default)]
    pub outputs: Vec<cosmos_proto::OutputArtifact>,
    /// Jobs (`job-N`) that must succeed before this one starts; if one fails
    /// or is cancelled, this one is cancelled too (Slurm's `afterok`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
}

impl JobLine {
    /// The job spec this line asks for.
    pub fn into_spec(self) -> JobSpec {
        let mut spec = JobSpec::command(self.name.as_deref().unwrap_or("job"), self.command);
        spec.image = self.image;
        spec.gpus = self.gpus.unwrap_or(1);
        spec.min_free_vram_bytes = self.min_vram_mib.unwrap_or(0).saturating_mul(1 << 20);
        spec.env = self.env;
        if let Some(t) = self.timeout_s {
            spec.timeout_ms = t.saturating_mul(1000);
        }
        if let Some(n) = self.max_attempts {
            spec.max_attempts = n;
        }
        spec.priority = self.priority.unwrap_or(0);
        spec.labels = self.labels;
        spec.inputs = self.inputs;
        spec.outputs = self.outputs;
        spec
    }
}

/// A batch submission.
#[derive(Debug, Deserialize, Serialize)]
pub struct SubmitRequest {
    /// The job lines, in order.
    pub jobs: Vec<serde_json::Value>,
}

/// A job as the API shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct JobView {
    /// `job-N`.
    pub id: String,
    /// Its name.
    pub name: String,
    /// `queued|assigned|running|retrying|succeeded|failed|cancelled`.
    pub state: String,
    /// Attempts made (counted failures, plus the live one).
    pub attempts: u32,
    /// Agent of the latest attempt.
    pub agent: Option<String>,
    /// GPUs of the live attempt.
    pub gpus: Vec<String>,
    /// Exit code of the deciding attempt.
    pub exit_code: Option<i32>,
    /// Why it failed or is retrying.
    pub error: Option<String>,
    /// Steps done and in all, while running.
    pub progress: Option<(u32, u32)>,
    /// GPUs asked for.
    pub gpus_requested: u32,
    /// Priority.
    pub priority: i32,
    /// Accepted at (ms since the Unix epoch).
    pub submitted_ms: u64,
    /// Final at.
    pub finished_ms: Option<u64>,
    /// When its first attempt started running.
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// From its first start to its end (or to now, while it runs), in ms.
    #[serde(default)]
    pub elapsed_ms: Option<u64>,
    /// GPU time used by all its attempts, in GPU-seconds.
    #[serde(default)]
    pub gpu_seconds: f64,
    /// Times an operator re-queued it (`cosmos jobs retry`).
    #[serde(default)]
    pub retries: u32,
    /// Why it waits, while queued or retrying (`needs 4 free GPUs on one host; …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Every attempt, oldest first (`show` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_history: Vec<AttemptView>,
}

/// One attempt as the API shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct AttemptView {
    /// `att-N`.
    pub id: String,
    /// Its agent.
    pub agent: String,
    /// Its GPUs.
    pub gpus: Vec<String>,
    /// Its state.
    pub state: String,
    /// Assigned at (ms since the Unix epoch, controller clock).
    pub assigned_ms: u64,
    /// Reported started at.
    pub started_ms: Option<u64>,
    /// Reported ended at.
    pub ended_ms: Option<u64>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Why it ended so.
    pub reason: Option<String>,
}

/// An agent as the API shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct AgentInfo {
    /// Node id.
    pub name: String,
    /// `up|suspect|lost`.
    pub state: String,
    /// Operator drain.
    pub draining: bool,
    /// Connected now.
    pub connected: bool,
    /// GPUs are simulated, not real.
    pub gpus_simulated: bool,
    /// Why it takes no new work, when its runtime is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
    /// Its GPUs.
    pub gpus: Vec<GpuView>,
}

/// A GPU as the API shows it.
#[derive(Debug, Deserialize, Serialize)]
pub struct GpuView {
    /// Driver index.
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Model name.
    pub name: String,
    /// Total memory in MiB.
    pub total_vram_mib: u64,
    /// Free memory in MiB, as last reported.
    pub free_vram_mib: u64,
    /// Out of scheduling when false.
    pub healthy: bool,
    /// Why the agent quarantined it, while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<cosmos_proto::GpuQuarantine>,
    /// Attempt holding it.
    pub attempt: Option<String>,
}

/// Cluster status.
#[derive(Debug, Deserialize, Serialize)]
pub struct StatusBody {
    /// Controller epoch.
    pub epoch: u64,
    /// Jobs waiting for GPUs or a retry.
    pub queue_depth: usize,
    /// Jobs per state.
    pub jobs: BTreeMap<String, usize>,
    /// Agents.
    pub agents: Vec<AgentInfo>,
    /// Who leads (the lease row), on a PostgreSQL store; absent on SQLite, whose one controller always leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<crate::store::LeaseInfo>,
}

/// A batch submission as read: each line kept as its raw text until checked,
/// so a large body costs its own size, not a tree of JSON values.
#[derive(Deserialize)]
struct RawSubmit<'a> {
    #[serde(borrow)]
    jobs: Vec<&'a serde_json::value::RawValue>,
}

/// Label prefix reserved for what the controller itself attaches (Cosmos runs).
pub const RESERVED_LABEL_PREFIX: &str = "cosmos.";

async fn submit(req: HttpRequest, state: web::Data<State>, body: web::Payload) -> HttpResponse {
    let body = match read_body(&state.shared, &req, body, BODY_BYTES_MAX).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let bytes = &body.bytes;
    let key = match idempotency(&req, bytes) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let raw: RawSubmit<'_> = match parse_json(bytes) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let mut specs = Vec::with_capacity(raw.jobs.len());
    let mut after = Vec::with_capacity(raw.jobs.len());
    for (i, value) in raw.jobs.into_iter().enumerate() {
        let line = match serde_json::from_str::<JobLine>(value.get()) {
            Ok(line) => line,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("line {}: {e}", i + 1), Some(i + 1), false),
        };
        if let Some(label) = line.labels.keys().find(|k| k.starts_with(RESERVED_LABEL_PREFIX)) {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "line {}: label `{label}` is reserved: `{RESERVED_LABEL_PREFIX}*` labels are set by the controller for Cosmos runs (`cosmos inference`); rename it",
                    i + 1
                ),
                Some(i + 1),
                false,
            );
        }
        let mut deps = Vec::with_capacity(line.after.len());
        for dep in &line.after {
            match dep.parse::<JobId>() {
                Ok(d) => deps.push(d),
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, format!("line {}: `after`: {e}", i + 1), Some(i + 1), false);
                }
            }
        }
        after.push(deps);
        specs.push(line.into_spec());
    }
    match submit_specs(&state, specs, Vec::new(), key, after, Vec::new(), None).await {
        Ok((ids, _)) => {
            HttpResponse::Ok().json(serde_json::json!({ "ids": ids.iter().map(|i| i.to_string()).collect::<Vec<_>>() }))
        }
        Err(r) => r,
    }
}

/// Submits a batch (with records stored beside it) and waits until it is durable;
/// the error answer names the 1-based line at fault: with `line_of`, the
/// line of the request each spec came from (`line N: …`), else the core's count.
pub(crate) async fn submit_specs(
    state: &web::Data<State>,
    specs: Vec<cosmos_proto::JobSpec>,
    extra: Vec<crate::records::StoreOp>,
    key: Option<Idempotency>,
    after: Vec<Vec<JobId>>,
    inputs_from: Vec<Vec<crate::core::InputFromDep>>,
    line_of: Option<&[usize]>,
) -> Result<crate::actor::Submitted, HttpResponse> {
    match state.core.send(SubmitWith { specs, extra, key, after, inputs_from }).await {
        Ok(Ok(rx)) => rx.await.map_err(|_| unavailable()),
        Ok(Err(e)) => {
            let mut line = e.line();
            let msg = match (line, line_of) {
                // The core counts jobs of the batch (`job 0 (line 1) …`); say it once, as the request's line.
                (Some(l), Some(lines)) => {
                    let text = e.to_string();
                    let own = format!("job {} (line {l})", l - 1);
                    let rest =
                        text.strip_prefix(&own).map_or(text.as_str(), |r| r.trim_start_matches(':').trim_start());
                    let l = lines.get(l - 1).copied().unwrap_or(l);
                    line = Some(l);
                    format!("line {l}: {rest}")
                }
                _ => e.to_string(),
            };
            Err(error(e.status(), msg, line, e.retryable()))
        }
        Err(_) => Err(unavailable()),
    }
}

/// The 1-based line of the batch a refused submission blames, if one.
pub(crate) fn submit_error_line(e: &SubmitError) -> Option<usize> {
    match e {
        SubmitError::InvalidSpec { index, .. }
        | SubmitError::Unplaceable { index, .. }
        | SubmitError::TooMuchVram { index, .. }
        | SubmitError::UnknownDependency { index, .. }
        | SubmitError::BadBatchDependency { index, .. }
        | SubmitError::DependencyEnded { index, .. } => Some(index + 1),
        _ => None,
    }
}

pub(crate) fn view(s: &JobSummary) -> JobView {
    let r = &s.record;
    let live = u32::from(matches!(r.state, JobState::Assigned | JobState::Running));
    JobView {
        id: r.id.to_string(),
        name: r.spec.name.clone(),
        state: r.state.as_str().to_string(),
        attempts: r.attempts_used + r.attempts_lost + live + u32::from(r.state == JobState::Succeeded),
        agent: r.agent.clone(),
        gpus: s.gpus.clone(),
        exit_code: r.exit_code,
        error: r.error.clone(),
        progress: s.progress,
        gpus_requested: r.spec.gpus,
        priority: r.spec.priority,
        submitted_ms: r.submitted_ms,
        finished_ms: r.finished_ms,
        started_ms: r.started_ms,
        elapsed_ms: r
            .started_ms
            .map(|start| r.finished_ms.unwrap_or_else(crate::shared::wall_ms).saturating_sub(start)),
        gpu_seconds: r.gpu_ms as f64 / 1000.0,
        retries: r.retries,
        waiting: s.waiting.clone(),
        attempt_history: Vec::new(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    /// Only jobs submitted at or after this time (ms since the Unix epoch), for reports.
    since_ms: Option<u64>,
    /// Jobs after this one (the previous page's `Cosmos-Next-After`).
    after: Option<String>,
    /// At most this many ([`JOBS_PAGE_DEFAULT`] when absent, at most [`JOBS_PAGE_MAX`]).
    limit: Option<usize>,
    /// Only jobs up to this one (a batch's last job, with `after` the one before its first).
    last: Option<String>,
}

async fn list_jobs(state: web::Data<State>, q: web::Query<ListQuery>) -> HttpResponse {
    let filter = match q.state.as_deref().map(|s| JobState::parse(s).ok_or(s)) {
        Some(Err(s)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unknown state `{s}`: use queued, assigned, running, retrying, succeeded, failed or cancelled"),
                None,
                false,
            );
        }
        Some(Ok(st)) => Some(st),
        None => None,
    };
    let after = match q.after.as_deref().map(parse_job).transpose() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let last = match q.last.as_deref().map(parse_job).transpose() {
        Ok(l) => l,
        Err(r) => return r,
    };
    let limit = match page_limit(q.limit) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let since_ms = q.since_ms;
    let filter = Box::new(move |r: &crate::records::JobRecord| {
        filter.is_none_or(|f| r.state == f)
            && since_ms.is_none_or(|t| r.submitted_ms >= t)
            && last.is_none_or(|l| r.id <= l)
    });
    let Ok(page) = state.core.send(PageJobs { after, limit, filter }).await else { return unavailable() };
    let mut response = HttpResponse::Ok();
    response.insert_header((EVENTS_CURSOR_HEADER, page.events.to_string()));
    // Past `last` there is nothing this listing wants.
    if let Some(next) = page.next_after.filter(|n| last.is_none_or(|l| *n < l)) {
        response.insert_header((NEXT_AFTER_HEADER, next.to_string()));
    }
    response.json(page.jobs.iter().map(view).collect::<Vec<_>>())
}

/// Server-sent events: each durable change of a job (and each new progress of
/// its live attempt) as `id: CURSOR` + `event: job` + `data: JOB` (the job as
/// `GET /v1/jobs` shows it), after the cursor `after` (a listing's
/// `Cosmos-Events-Cursor`, or the last `id:` seen). A cursor the controller can
/// no longer serve (it restarted, or the client fell more than
/// [`crate::events::EVENTS_KEPT_MAX`] events behind) gets `event: resync` with
/// the cursor to follow from after listing again. Idle streams get a comment
/// every 15 s.
async fn events(state: web::Data<State>, q: web::Query<EventsQuery>) -> HttpResponse {
    use crate::events::{Cursor, Since};
    let cursor: Cursor = match q.after.as_deref().map(str::parse).transpose() {
        Ok(c) => c.unwrap_or_else(|| state.events.head()),
        Err(e) => return bad(e),
    };
    let log = state.events.clone();
    let stream = futures::stream::unfold(Some(cursor), move |cursor| {
        let log = log.clone();
        async move {
            let mut cursor = cursor?;
            loop {
                let appended = log.appended();
                match log.since(cursor) {
                    Since::Resync(head) => {
                        let out = format!("id: {head}\nevent: resync\ndata: {head}\n\n");
                        // The client lists again and reconnects from `head`: this stream is done.
                        return Some((Ok::<_, actix_web::Error>(web::Bytes::from(out)), None));
                    }
                    Since::Events(events) if !events.is_empty() => {
                        let mut out = String::new();
                        for (seq, job) in &events {
                            cursor.seq = *seq;
                            out.push_str(&format!("id: {cursor}\nevent: job\ndata: "));
                            out.push_str(&serde_json::to_string(&view(job)).unwrap_or_default());
                            out.push_str("\n\n");
                        }
                        return Some((Ok(web::Bytes::from(out)), Some(cursor)));
                    }
                    Since::Events(_) => {}
                }
                let keepalive = tokio::time::sleep(Duration::from_millis(EVENTS_KEEPALIVE_MS));
                tokio::select! {
                    _ = appended => {}
                    _ = keepalive => return Some((Ok(web::Bytes::from_static(b": keepalive\n\n")), Some(cursor))),
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((EVENTS_CURSOR_HEADER, cursor.to_string()))
        .streaming(stream)
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Events after this cursor (`EPOCH:SEQ`); from now when absent.
    after: Option<String>,
}

fn state_is_final(state: &str) -> bool {
    JobState::parse(state).is_some_and(|s| s.is_final())
}

/// A listing's page size: `limit` when given (1 to [`JOBS_PAGE_MAX`]), else [`JOBS_PAGE_DEFAULT`].
pub(super) fn page_limit(limit: Option<usize>) -> Result<usize, HttpResponse> {
    match limit {
        Some(0) => Err(bad(format!("`limit` must be 1 to {JOBS_PAGE_MAX}"))),
        Some(n) if n > JOBS_PAGE_MAX => Err(bad(format!(
            "`limit` {n} is over {JOBS_PAGE_MAX}; page with `after` (the `{NEXT_AFTER_HEADER}` header)"
        ))),
        Some(n) => Ok(n),
        None => Ok(JOBS_PAGE_DEFAULT),
    }
}

fn parse_job(id: &str) -> Result<JobId, HttpResponse> {
    id.parse().map_err(|e: cosmos_proto::ids::IdParseError| error(StatusCode::BAD_REQUEST, e.to_string(), None, false))
}

async fn show_job(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let id = match parse_job(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Ok(found) = state.core.send(GetJob(id)).await else { return unavailable() };
    let Some(summary) = found.as_ref() else {
        return error(StatusCode::NOT_FOUND, format!("no job {id}; `cosmos jobs list` shows the ids"), None, false);
    };
    let mut v = view(summary);
    let shared = state.shared.clone();
    let history = web::block(move || {
        shared.reader.lock().map_err(|_| "poisoned".to_string())?.attempts_of(id).map_err(|e| e.to_string())
    })
    .await;
    if let Ok(Ok(attempts)) = history {
        v.attempt_history = attempts
            .into_iter()
            .map(|a| AttemptView {
                id: a.id.to_string(),
                agent: a.agent,
                gpus: a.gpu_uuids,
                state: a.state.as_str().to_string(),
                assigned_ms: a.assigned_ms,
                started_ms: a.started_ms,
                ended_ms: a.ended_ms,
                exit_code: a.exit_code,
                reason: a.reason,
            })
            .collect();
        // The job's count leaves out an attempt a cancel ended; the history lists it.
        v.attempts = v.attempts.max(u32::try_from(v.attempt_history.len()).unwrap_or(u32::MAX));
        // The deciding attempt's exit code is kept on the job; show it on that attempt too.
        if let (Some(code), Some(last)) = (v.exit_code, v.attempt_history.last_mut()) {
            if last.exit_code.is_none() && state_is_final(&v.state) {
                last.exit_code = Some(code);
            }
        }
    }
    HttpResponse::Ok().json(v)
}

async fn cancel(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let id = match parse_job(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    command_result(state.core.send(Cancel(id)).await).await
}

async fn retry(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let id = match parse_job(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    command_result(state.core.send(Retry(id)).await).await
}

async fn release_gpu(state: web::Data<State>, path: web::Path<(String, String)>) -> HttpResponse {
    let (name, uuid) = path.into_inner();
    command_result(state.core.send(crate::actor::ReleaseGpu(name, uuid)).await).await
}

async fn drain(state: web::Data<State>, name: web::Path<String>) -> HttpResponse {
    command_result(state.core.send(SetDraining(name.into_inner(), true)).await).await
}

async fn undrain(state: web::Data<State>, name: web::Path<String>) -> HttpResponse {
    command_result(state.core.send(SetDraining(name.into_inner(), false)).await).await
}

fn agent_infos(agents: Vec<crate::core::AgentView>) -> Vec<AgentInfo> {
    agents
        .into_iter()
        .map(|a| AgentInfo {
            name: a.name,
            state: a.health.as_str().to_string(),
            draining: a.draining,
            connected: a.connected,
            gpus_simulated: a.gpus_simulated,
            unhealthy: a.unhealthy,
            gpus: a
                .gpus
                .into_iter()
                .map(|(info, free, healthy, holder)| GpuView {
                    quarantine: a.gpu_quarantine.get(&info.uuid).cloned(),
                    index: info.index,
                    uuid: info.uuid,
                    name: info.name,
                    total_vram_mib: info.total_vram_bytes >> 20,
                    free_vram_mib: free >> 20,
                    healthy,
                    attempt: holder.map(|a: AttemptId| a.to_string()),
                })
                .collect(),
        })
        .collect()
}

async fn agents(state: web::Data<State>) -> HttpResponse {
    match state.core.send(Status).await {
        Ok(s) => HttpResponse::Ok().json(agent_infos(s.agents)),
        Err(_) => unavailable(),
    }
}

async fn list_hosts(state: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok().json(state.hosts.list())
}

fn hosts_error(e: crate::hosts::HostsError) -> HttpResponse {
    use crate::hosts::HostsError;
    match e {
        HostsError::NotFound(_) => super::not_found(e.to_string()),
        HostsError::File { .. } => super::internal(e),
        HostsError::NoDialer | HostsError::Invalid(_) => super::bad(e.to_string()),
    }
}

async fn add_host(state: web::Data<State>, body: super::JsonBody<crate::hosts::HostEntry>) -> HttpResponse {
    let hosts = state.hosts.clone();
    let entry = body.value;
    // The registry's file is synced to disk: off the worker's thread.
    match tokio::task::spawn_blocking(move || hosts.add(entry)).await {
        Ok(Ok(view)) => HttpResponse::Ok().json(view),
        Ok(Err(e)) => hosts_error(e),
        Err(e) => super::internal(e),
    }
}

async fn remove_host(state: web::Data<State>, name: web::Path<String>) -> HttpResponse {
    let hosts = state.hosts.clone();
    match tokio::task::spawn_blocking(move || hosts.remove(&name)).await {
        Ok(Ok(entry)) => HttpResponse::Ok().json(entry),
        Ok(Err(e)) => hosts_error(e),
        Err(e) => super::internal(e),
    }
}

async fn status(state: web::Data<State>) -> HttpResponse {
    let Ok(s) = state.core.send(Status).await else { return unavailable() };
    let by_state: BTreeMap<String, usize> =
        s.jobs.iter().filter(|(_, n)| *n > 0).map(|(st, n)| (st.as_str().to_string(), *n)).collect();
    let shared = state.shared.clone();
    let leader = match web::block(move || shared.reader.lock().unwrap_or_else(|p| p.into_inner()).lease()).await {
        Ok(Ok(leader)) => leader,
        Ok(Err(e)) => return super::internal(e),
        Err(e) => return super::internal(e),
    };
    HttpResponse::Ok().json(StatusBody {
        epoch: s.epoch,
        queue_depth: s.queue_depth,
        jobs: by_state,
        agents: agent_infos(s.agents),
        leader,
    })
}

#[derive(Deserialize)]
struct LogQuery {
    /// Keep streaming until the job is final.
    #[serde(default)]
    follow: bool,
    /// Start each log file this many bytes from its end (at the next line start).
    tail_bytes: Option<u64>,
    /// Start each log file at this byte.
    offset: Option<u64>,
    /// Resume a broken stream: the `id:` positions it had reached, comma-separated
    /// (`att-1/stdout/123,att-1/stderr/45`); files it names start there, others at their start.
    resume: Option<String>,
}

/// A log file's position as `id:` lines carry it: `att-N/stdout/OFFSET` (or `stderr`).
pub fn log_position(attempt: AttemptId, stdout: bool, offset: u64) -> String {
    format!("{attempt}/{}/{offset}", if stdout { "stdout" } else { "stderr" })
}

/// Parses a `resume` list of [`log_position`]s.
fn parse_resume(text: &str) -> Result<Vec<((AttemptId, bool), u64)>, String> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let bad = || format!("`resume` position `{p}` is not ATTEMPT/STREAM/OFFSET (e.g. att-1/stdout/123)");
            let mut it = p.splitn(3, '/');
            let (Some(a), Some(s), Some(o)) = (it.next(), it.next(), it.next()) else { return Err(bad()) };
            let attempt: AttemptId = a.parse().map_err(|_| bad())?;
            let stdout = match s {
                "stdout" => true,
                "stderr" => false,
                _ => return Err(bad()),
            };
            Ok(((attempt, stdout), o.parse().map_err(|_| bad())?))
        })
        .collect()
}

/// Server-sent events: one `data:` line per log line, across the job's attempts
/// in order (each attempt's stdout, then its stderr); with `follow`, new lines
/// as they come until the job is final. `tail_bytes` and `offset` apply to each
/// log file. Files are read from the last position in bounded chunks on the
/// blocking pool, so a reader's memory does not grow with the log. After each
/// file's lines comes an `id: att-N/stdout/OFFSET` line (no event of its own):
/// the file those lines came from and where it now stands, so a follower whose
/// stream broke resumes with `resume=` and prints nothing twice. A stream the
/// controller stops without `event: end` (it is shutting down) was cut, not finished.
async fn logs(state: web::Data<State>, id: web::Path<String>, q: web::Query<LogQuery>) -> HttpResponse {
    let id = match parse_job(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Ok(found) = state.core.send(GetJob(id)).await else { return unavailable() };
    if found.is_none() {
        return error(StatusCode::NOT_FOUND, format!("no job {id}; `cosmos jobs list` shows the ids"), None, false);
    }
    let q = q.into_inner();
    let mut cursor = LogCursor::default();
    let mut start = LogStart { tail_bytes: q.tail_bytes, offset: q.offset.unwrap_or(0) };
    if let Some(resume) = &q.resume {
        match parse_resume(resume) {
            Ok(positions) => cursor.offsets.extend(positions.into_iter().map(|(k, o)| (k, Some(o)))),
            Err(e) => return bad(e),
        }
        // A file the follower had not reached yet is new to it: all of it.
        start = LogStart { tail_bytes: None, offset: 0 };
    }
    let follow = q.follow;
    let core = state.core.clone();
    let shared = state.shared.clone();
    let stream = futures::stream::unfold(cursor, move |mut cur| {
        let core = core.clone();
        let shared = shared.clone();
        async move {
            loop {
                if cur.done {
                    return None;
                }
                // Final before reading: whatever was written before the end is then read in this pass.
                // A core that no longer answers is stopping: cut the stream without `end`, so the follower resumes.
                let final_ = match core.send(GetJob(id)).await {
                    Ok(j) => j.as_ref().is_none_or(|j| j.record.state.is_final()),
                    Err(_) => return None,
                };
                let shared2 = shared.clone();
                let (out, more, next) = web::block(move || {
                    let attempts = shared2.reader.lock().ok().and_then(|s| s.attempts_of(id).ok()).unwrap_or_default();
                    let mut out = String::new();
                    let mut more = false;
                    for a in &attempts {
                        for stream in [LogStream::Stdout, LogStream::Stderr] {
                            let key = (a.id, stream == LogStream::Stdout);
                            let pos = cur.offsets.entry(key).or_insert(None);
                            let before = *pos;
                            let mut held = cur.held.get(&key).copied();
                            let unended = match (final_, follow) {
                                (true, _) => Unended::Line,
                                (false, false) => Unended::Partial,
                                (false, true) => Unended::Hold,
                            };
                            more |= read_log(&shared2.logs, (a.id, stream), pos, &mut held, start, unended, &mut out);
                            match held {
                                Some(h) => cur.held.insert(key, h),
                                None => cur.held.remove(&key),
                            };
                            if let Some(now) = *pos {
                                if before != Some(now) {
                                    out.push_str("id: ");
                                    out.push_str(&log_position(a.id, key.1, now));
                                    out.push_str("\n\n");
                                }
                            }
                        }
                    }
                    (out, more, cur)
                })
                .await
                .unwrap_or_else(|_| (String::new(), false, LogCursor { done: true, ..Default::default() }));
                cur = next;
                if !more && (!follow || final_) {
                    cur.done = true;
                }
                let mut out = out;
                if cur.done && final_ && follow {
                    out.push_str("event: end\ndata: \n\n");
                }
                if !out.is_empty() {
                    return Some((Ok::<_, actix_web::Error>(web::Bytes::from(out)), cur));
                }
                if cur.done {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(FOLLOW_POLL_MS)).await;
            }
        }
    });
    HttpResponse::Ok().content_type("text/event-stream").streaming(stream)
}
