//! The HTTP API (actix-web, JSON), for the `cosmos` CLI and other tools.
//!
//! Every route needs `Authorization: Bearer <token>` with the token from the
//! data directory: anyone who can call this API can run commands on every GPU
//! host. Field names here are an interface scripts rely on; keep them stable.

use crate::core::{CommandError, SubmitError};
use crate::daemon::{Cancel, CoreActor, JobSummary, ListJobs, SetDraining, Shared, Status, Submit};
use crate::model::JobState;
use actix::Addr;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, dev::Server, http::StatusCode, web};
use cosmos_proto::{AttemptId, JobId, JobSpec, LogStream};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body: a batch of many job lines.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// How often a followed log is checked for growth.
const FOLLOW_POLL_MS: u64 = 200;

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

/// An error answer.
#[derive(Debug, Deserialize, Serialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
    /// The 1-based line of the batch at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Whether retrying later may help.
    #[serde(default)]
    pub retryable: bool,
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
}

pub(crate) fn error(status: StatusCode, error: String, line: Option<usize>, retryable: bool) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody { error, line, retryable })
}

pub(crate) fn authorize(req: &HttpRequest, shared: &Shared) -> Result<(), HttpResponse> {
    let given =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if shared.api_token.matches(&cosmos_proto::Token(t.trim().to_string())) => Ok(()),
        Some(_) => Err(error(
            StatusCode::UNAUTHORIZED,
            "API token refused: use the token in the controller's data directory (api.token)".into(),
            None,
            false,
        )),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <token>`: pass --token, COSMOS_TOKEN or --data-dir".into(),
            None,
            false,
        )),
    }
}

pub(crate) fn unavailable() -> HttpResponse {
    error(StatusCode::SERVICE_UNAVAILABLE, "the controller is shutting down; retry".into(), None, true)
}

/// What every handler gets.
pub(crate) struct State {
    pub(crate) core: Addr<CoreActor>,
    pub(crate) shared: Arc<Shared>,
}

/// Binds the API server and starts serving; returns it with the address it bound.
pub fn server(listen: SocketAddr, core: Addr<CoreActor>, shared: Arc<Shared>) -> std::io::Result<(Server, SocketAddr)> {
    let state = web::Data::new(State { core, shared });
    let bound = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::JsonConfig::default().limit(MAX_BODY_BYTES))
            .route("/v1/jobs", web::post().to(submit))
            .route("/v1/jobs", web::get().to(list_jobs))
            .route("/v1/jobs/{id}", web::get().to(show_job))
            .route("/v1/jobs/{id}/cancel", web::post().to(cancel))
            .route("/v1/jobs/{id}/logs", web::get().to(logs))
            .route("/v1/agents", web::get().to(agents))
            .route("/v1/agents/{name}/drain", web::post().to(drain))
            .route("/v1/agents/{name}/undrain", web::post().to(undrain))
            .route("/v1/status", web::get().to(status))
            .configure(crate::api_transfer::routes)
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(2)
    .bind(listen)?;
    let addr = bound.addrs()[0];
    Ok((bound.run(), addr))
}

async fn submit(req: HttpRequest, state: web::Data<State>, body: web::Json<SubmitRequest>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
    let mut specs = Vec::with_capacity(body.jobs.len());
    for (i, value) in body.into_inner().jobs.into_iter().enumerate() {
        match serde_json::from_value::<JobLine>(value) {
            Ok(line) => specs.push(line.into_spec()),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("line {}: {e}", i + 1), Some(i + 1), false),
        }
    }
    match state.core.send(Submit(specs)).await {
        Ok(Ok(rx)) => match rx.await {
            Ok(Ok(ids)) => HttpResponse::Ok()
                .json(serde_json::json!({ "ids": ids.iter().map(|i| i.to_string()).collect::<Vec<_>>() })),
            _ => unavailable(),
        },
        Ok(Err(e)) => {
            let line = submit_error_line(&e);
            let status = if e.is_retryable() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::BAD_REQUEST };
            error(status, e.to_string(), line, e.is_retryable())
        }
        Err(_) => unavailable(),
    }
}

/// The 1-based line of the batch a refused submission blames, if one.
pub(crate) fn submit_error_line(e: &SubmitError) -> Option<usize> {
    match e {
        SubmitError::InvalidSpec { index, .. }
        | SubmitError::Unplaceable { index, .. }
        | SubmitError::TooMuchVram { index, .. } => Some(index + 1),
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
        attempt_history: Vec::new(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
}

async fn list_jobs(req: HttpRequest, state: web::Data<State>, q: web::Query<ListQuery>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
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
    match state.core.send(ListJobs(None)).await {
        Ok(jobs) => HttpResponse::Ok()
            .json(jobs.iter().filter(|j| filter.is_none_or(|f| j.record.state == f)).map(view).collect::<Vec<_>>()),
        Err(_) => unavailable(),
    }
}

fn parse_job(id: &str) -> Result<JobId, HttpResponse> {
    id.parse().map_err(|e: cosmos_proto::ids::IdParseError| error(StatusCode::BAD_REQUEST, e.to_string(), None, false))
}

async fn show_job(req: HttpRequest, state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
    let id = match parse_job(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Ok(found) = state.core.send(ListJobs(Some(id))).await else { return unavailable() };
    let Some(summary) = found.first() else {
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
    }
    HttpResponse::Ok().json(v)
}

async fn cancel(req: HttpRequest, state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
    let id = match parse_job(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    command_result(state.core.send(Cancel(id)).await).await
}

async fn command_result(
    r: Result<Result<tokio::sync::oneshot::Receiver<()>, CommandError>, actix::MailboxError>,
) -> HttpResponse {
    match r {
        Ok(Ok(rx)) => match rx.await {
            Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "ok": true })),
            Err(_) => unavailable(),
        },
        Ok(Err(e @ (CommandError::UnknownJob(_) | CommandError::UnknownAgent(_)))) => {
            error(StatusCode::NOT_FOUND, e.to_string(), None, false)
        }
        Ok(Err(e)) => error(StatusCode::CONFLICT, e.to_string(), None, false),
        Err(_) => unavailable(),
    }
}

async fn drain(req: HttpRequest, state: web::Data<State>, name: web::Path<String>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
    command_result(state.core.send(SetDraining(name.into_inner(), true)).await).await
}

async fn undrain(req: HttpRequest, state: web::Data<State>, name: web::Path<String>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
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

async fn agents(req: HttpRequest, state: web::Data<State>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
    match state.core.send(Status).await {
        Ok(s) => HttpResponse::Ok().json(agent_infos(s.agents)),
        Err(_) => unavailable(),
    }
}

async fn status(req: HttpRequest, state: web::Data<State>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
    let (Ok(s), Ok(jobs)) = (state.core.send(Status).await, state.core.send(ListJobs(None)).await) else {
        return unavailable();
    };
    let mut by_state = BTreeMap::new();
    for j in &jobs {
        *by_state.entry(j.record.state.as_str().to_string()).or_insert(0) += 1;
    }
    HttpResponse::Ok().json(StatusBody {
        epoch: s.epoch,
        queue_depth: s.queue_depth,
        jobs: by_state,
        agents: agent_infos(s.agents),
    })
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

/// Server-sent events: one `data:` line per log line, across the job's attempts
/// in order; with `follow`, new lines as they come until the job is final.
async fn logs(
    req: HttpRequest,
    state: web::Data<State>,
    id: web::Path<String>,
    q: web::Query<LogQuery>,
) -> HttpResponse {
    if let Err(r) = authorize(&req, &state.shared) {
        return r;
    }
    let id = match parse_job(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Ok(found) = state.core.send(ListJobs(Some(id))).await else { return unavailable() };
    if found.is_empty() {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"), None, false);
    }
    let follow = q.follow;
    let core = state.core.clone();
    let shared = state.shared.clone();
    let stream = futures::stream::unfold(LogCursor::default(), move |mut cur| {
        let core = core.clone();
        let shared = shared.clone();
        async move {
            loop {
                if cur.done {
                    return None;
                }
                let shared2 = shared.clone();
                let attempts = web::block(move || {
                    shared2.reader.lock().ok().and_then(|s| s.attempts_of(id).ok()).unwrap_or_default()
                })
                .await
                .unwrap_or_default();
                let mut out = String::new();
                for a in &attempts {
                    for stream in [LogStream::Stdout, LogStream::Stderr] {
                        let path = shared.dir.log_file(a.id, stream);
                        let key = (a.id, stream == LogStream::Stdout);
                        let from = *cur.offsets.get(&key).unwrap_or(&0);
                        if let Ok(bytes) = std::fs::read(&path) {
                            if bytes.len() as u64 > from {
                                // Only whole lines; a partial last line waits for its end.
                                let new = &bytes[from as usize..];
                                let upto = new.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                                for line in String::from_utf8_lossy(&new[..upto]).lines() {
                                    out.push_str("data: ");
                                    out.push_str(line);
                                    out.push_str("\n\n");
                                }
                                cur.offsets.insert(key, from + upto as u64);
                            }
                        }
                    }
                }
                let final_ = core
                    .send(ListJobs(Some(id)))
                    .await
                    .ok()
                    .and_then(|j| j.first().map(|j| j.record.state.is_final()))
                    .unwrap_or(true);
                if !follow || final_ {
                    cur.done = true;
                    if final_ && follow {
                        out.push_str("event: end\ndata: \n\n");
                    }
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

#[derive(Default)]
struct LogCursor {
    offsets: BTreeMap<(AttemptId, bool), u64>,
    done: bool,
}
