//! The HTTP API (actix-web, JSON), for the `cosmos` CLI and other tools.
//!
//! Every route needs `Authorization: Bearer <token>` with the token from the
//! data directory: anyone who can call this API can run commands on every GPU
//! host. The token is checked from the headers alone, by a middleware that
//! runs before any handler reads a byte of the body, so an unauthenticated
//! caller costs no more than its headers. Field names here are an interface
//! scripts rely on; keep them stable.

use crate::core::{CommandError, SubmitError};
use crate::daemon::{Cancel, CoreActor, JobSummary, ListJobs, SetDraining, Shared, Status, SubmitWith};
use crate::model::{Idempotency, JobState};
use actix::Addr;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, dev::Server, http::StatusCode, web};
use cosmos_proto::{AttemptId, JobId, JobSpec, LogStream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest JSON request body: a batch of many job lines.
pub const BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bytes of JSON request bodies held at once, all requests together, in KiB:
/// a chunk that would go past it waits (within the idle timeout) for room.
pub const BODY_KIB_IN_FLIGHT_MAX: usize = 256 * 1024;
/// A body whose sender pauses this long between bytes is dropped (stalled clients hold descriptors).
pub const BODY_IDLE_TIMEOUT_MS: u64 = 10_000;
/// Bound on reading one JSON body whole, however steadily it trickles in.
pub const BODY_READ_TIMEOUT_MS: u64 = 120_000;
/// Bound on the request head (line and headers).
const REQUEST_HEAD_TIMEOUT_MS: u64 = 5_000;
/// Most API connections at once, whatever the descriptor limit allows.
pub const API_CONNECTIONS_MAX: usize = 1024;
/// HTTP worker threads.
const API_WORKERS: usize = 2;
/// Longest `Idempotency-Key` accepted.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;
/// How often a followed log is checked for growth.
const FOLLOW_POLL_MS: u64 = 200;
/// Bytes of one log file read at a time: a reader's memory, whatever the log's size.
const LOG_READ_CHUNK_BYTES: u64 = 256 * 1024;

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
}

pub(crate) fn error(status: StatusCode, error: String, line: Option<usize>, retryable: bool) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody { error, line, retryable })
}

/// `resp`, closing the connection after it: a body left unread must not
/// keep the connection (and its descriptor) open while the server drains it,
/// outside the bound on connections.
pub(crate) fn closing(mut resp: HttpResponse) -> HttpResponse {
    resp.head_mut().set_connection_type(actix_web::http::ConnectionType::Close);
    resp
}

fn authorize(req: &actix_web::dev::ServiceRequest, shared: &Shared) -> Result<(), HttpResponse> {
    // A controller whose store failed answers nothing from state it could not keep.
    if let Some(reason) = shared.store_failure.get() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the controller's store cannot be written ({reason}); it is stopping, retry once it is restarted"),
            None,
            true,
        ));
    }
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

/// API connections allowed at once: an eighth of the descriptor limit, so
/// clients that connect and stall can never take the descriptors the store,
/// the logs and the agents' connections need.
pub fn api_connections_max() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 1024 };
    usize::try_from(nofile / 8).unwrap_or(API_CONNECTIONS_MAX).clamp(API_WORKERS, API_CONNECTIONS_MAX)
}

/// A request body read whole, with its share of the bodies' memory budget,
/// held until this is dropped (after the handler has parsed and used it).
pub(crate) struct ReadBody {
    /// The bytes.
    pub bytes: web::Bytes,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Reads a request body of at most `limit` bytes: each chunk within
/// [`BODY_IDLE_TIMEOUT_MS`] of the last, the whole within
/// [`BODY_READ_TIMEOUT_MS`], and all bodies held together within
/// [`BODY_KIB_IN_FLIGHT_MAX`]. A body that announces its length reserves
/// all of it before reading (budget taken piece by piece could leave several
/// bodies each waiting for the others' share); a chunked one takes it as it comes.
pub(crate) async fn read_body(
    shared: &Shared,
    req: &HttpRequest,
    mut body: web::Payload,
    limit: usize,
) -> Result<ReadBody, HttpResponse> {
    let idle = Duration::from_millis(BODY_IDLE_TIMEOUT_MS);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(BODY_READ_TIMEOUT_MS);
    let stalled = || {
        closing(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body stalled for {BODY_IDLE_TIMEOUT_MS} ms or took over {BODY_READ_TIMEOUT_MS} ms; send it again"
            ),
            None,
            true,
        ))
    };
    let too_large = || {
        closing(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {limit} bytes; split the batch"),
            None,
            false,
        ))
    };
    let busy = || {
        closing(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is busy reading other large requests; retry".into(),
            None,
            true,
        ))
    };
    let kib = |n: usize| u32::try_from(n.div_ceil(1024)).unwrap_or(u32::MAX);
    let announced = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut held = match announced {
        Some(n) if n > limit => return Err(too_large()),
        Some(n) => match tokio::time::timeout(idle, shared.bodies.clone().acquire_many_owned(kib(n))).await {
            Ok(Ok(permit)) => Some(permit),
            _ => return Err(busy()),
        },
        None => None,
    };
    let mut buf = web::BytesMut::with_capacity(announced.unwrap_or(0));
    loop {
        let wait = idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, body.next()).await {
            Err(_) => return Err(stalled()),
            Ok(None) => return Ok(ReadBody { bytes: buf.freeze(), _budget: held }),
            Ok(Some(Err(e))) => {
                return Err(closing(error(
                    StatusCode::BAD_REQUEST,
                    format!("the request body broke off: {e}"),
                    None,
                    true,
                )));
            }
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                if announced.is_none() {
                    let Ok(Ok(permit)) =
                        tokio::time::timeout(wait, shared.bodies.clone().acquire_many_owned(kib(chunk.len()))).await
                    else {
                        return Err(busy());
                    };
                    match &mut held {
                        Some(h) => h.merge(permit),
                        None => held = Some(permit),
                    }
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}

/// Decodes a JSON body, the error naming what is wrong.
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, HttpResponse> {
    serde_json::from_slice(bytes).map_err(|e| {
        error(StatusCode::BAD_REQUEST, format!("the request body is not the expected JSON: {e}"), None, false)
    })
}

/// A JSON body read through [`read_body`] (bounded in size, time and number
/// in flight), with its raw bytes for the idempotency digest.
pub(crate) struct JsonBody<T> {
    /// The decoded value.
    pub value: T,
    /// The bytes it was decoded from, with their share of the memory budget.
    pub body: ReadBody,
}

impl<T: serde::de::DeserializeOwned + 'static> actix_web::FromRequest for JsonBody<T> {
    type Error = actix_web::Error;
    type Future = futures::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let state = req.app_data::<web::Data<State>>().cloned();
        let body = web::Payload::from_request(req, payload);
        let req = req.clone();
        Box::pin(async move {
            let refuse =
                |r: HttpResponse| actix_web::Error::from(actix_web::error::InternalError::from_response("", r));
            let state = state.ok_or_else(|| refuse(unavailable()))?;
            let body = read_body(&state.shared, &req, body.await?, BODY_BYTES_MAX).await.map_err(refuse)?;
            let value = parse_json(&body.bytes).map_err(refuse)?;
            Ok(JsonBody { value, body })
        })
    }
}

/// The request's `Idempotency-Key`, with the digest of `body` it must keep meaning.
pub(crate) fn idempotency(req: &HttpRequest, body: &[u8]) -> Result<Option<Idempotency>, HttpResponse> {
    let Some(value) = req.headers().get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().unwrap_or("");
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("`Idempotency-Key` must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters"),
            None,
            false,
        ));
    }
    use sha2::Digest;
    Ok(Some(Idempotency { key: key.to_string(), request_sha256: hex::encode(sha2::Sha256::digest(body)) }))
}

/// Binds the API server and starts serving; returns it with the address it bound.
pub fn server(listen: SocketAddr, core: Addr<CoreActor>, shared: Arc<Shared>) -> std::io::Result<(Server, SocketAddr)> {
    let state = web::Data::new(State { core, shared: shared.clone() });
    let connections_max = api_connections_max();
    let bound = HttpServer::new(move || {
        let shared = shared.clone();
        App::new()
            .app_data(state.clone())
            .wrap_fn(move |req, srv| {
                use actix_web::dev::Service;
                use futures::future::{Either, FutureExt};
                match authorize(&req, &shared) {
                    Ok(()) => Either::Left(srv.call(req).map(|r| r.map(|r| r.map_into_left_body()))),
                    Err(refused) => {
                        let refused = closing(refused);
                        Either::Right(futures::future::ready(Ok(req.into_response(refused).map_into_right_body())))
                    }
                }
            })
            .route("/v1/jobs", web::post().to(submit))
            .route("/v1/jobs", web::get().to(list_jobs))
            .route("/v1/jobs/{id}", web::get().to(show_job))
            .route("/v1/jobs/{id}/cancel", web::post().to(cancel))
            .route("/v1/jobs/{id}/logs", web::get().to(logs))
            .route("/v1/agents", web::get().to(agents))
            .route("/v1/agents/{name}/drain", web::post().to(drain))
            .route("/v1/agents/{name}/undrain", web::post().to(undrain))
            .route("/v1/agents/{name}/gpus/{uuid}/release", web::post().to(release_gpu))
            .route("/v1/status", web::get().to(status))
            .configure(crate::api_transfer::routes)
    })
    .workers(API_WORKERS)
    .max_connections(connections_max.div_ceil(API_WORKERS))
    .client_request_timeout(Duration::from_millis(REQUEST_HEAD_TIMEOUT_MS))
    .disable_signals()
    .shutdown_timeout(2)
    .bind(listen)?;
    let addr = bound.addrs()[0];
    Ok((bound.run(), addr))
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
        specs.push(line.into_spec());
    }
    match submit_specs(&state, specs, Vec::new(), key, false).await {
        Ok((ids, _)) => {
            HttpResponse::Ok().json(serde_json::json!({ "ids": ids.iter().map(|i| i.to_string()).collect::<Vec<_>>() }))
        }
        Err(r) => r,
    }
}

/// Submits a batch (with records stored beside it) and waits until it is durable;
/// the error answer names the 1-based line at fault.
pub(crate) async fn submit_specs(
    state: &web::Data<State>,
    specs: Vec<cosmos_proto::JobSpec>,
    extra: Vec<crate::model::StoreOp>,
    key: Option<Idempotency>,
    prefix_line: bool,
) -> Result<crate::daemon::Submitted, HttpResponse> {
    match state.core.send(SubmitWith { specs, extra, key }).await {
        Ok(Ok(rx)) => rx.await.map_err(|_| unavailable()),
        Ok(Err(e)) => {
            let line = submit_error_line(&e);
            let status = match e {
                _ if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
                SubmitError::KeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::BAD_REQUEST,
            };
            let msg = match line {
                Some(l) if prefix_line => format!("line {l}: {e}"),
                _ => e.to_string(),
            };
            Err(error(status, msg, line, e.is_retryable()))
        }
        Err(_) => Err(unavailable()),
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
    match state.core.send(ListJobs(None)).await {
        Ok(jobs) => HttpResponse::Ok()
            .json(jobs.iter().filter(|j| filter.is_none_or(|f| j.record.state == f)).map(view).collect::<Vec<_>>()),
        Err(_) => unavailable(),
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

async fn cancel(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
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
        Ok(Err(
            e @ (CommandError::UnknownJob(_) | CommandError::UnknownAgent(_) | CommandError::UnknownGpu { .. }),
        )) => error(StatusCode::NOT_FOUND, e.to_string(), None, false),
        Ok(Err(e)) => error(StatusCode::CONFLICT, e.to_string(), None, false),
        Err(_) => unavailable(),
    }
}

async fn drain(state: web::Data<State>, name: web::Path<String>) -> HttpResponse {
    command_result(state.core.send(SetDraining(name.into_inner(), true)).await).await
}

async fn undrain(state: web::Data<State>, name: web::Path<String>) -> HttpResponse {
    command_result(state.core.send(SetDraining(name.into_inner(), false)).await).await
}

async fn release_gpu(state: web::Data<State>, path: web::Path<(String, String)>) -> HttpResponse {
    let (name, uuid) = path.into_inner();
    command_result(state.core.send(crate::daemon::ReleaseGpu(name, uuid)).await).await
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

async fn status(state: web::Data<State>) -> HttpResponse {
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
    /// Keep streaming until the job is final.
    #[serde(default)]
    follow: bool,
    /// Start each log file this many bytes from its end (at the next line start).
    tail_bytes: Option<u64>,
    /// Start each log file at this byte.
    offset: Option<u64>,
}

/// Server-sent events: one `data:` line per log line, across the job's attempts
/// in order (each attempt's stdout, then its stderr); with `follow`, new lines
/// as they come until the job is final. `tail_bytes` and `offset` apply to each
/// log file. Files are read from the last position in bounded chunks on the
/// blocking pool, so a reader's memory does not grow with the log.
async fn logs(state: web::Data<State>, id: web::Path<String>, q: web::Query<LogQuery>) -> HttpResponse {
    let id = match parse_job(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Ok(found) = state.core.send(ListJobs(Some(id))).await else { return unavailable() };
    if found.is_empty() {
        return error(StatusCode::NOT_FOUND, format!("no job {id}; `cosmos jobs list` shows the ids"), None, false);
    }
    let q = q.into_inner();
    let (follow, start) = (q.follow, LogStart { tail_bytes: q.tail_bytes, offset: q.offset.unwrap_or(0) });
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
                // Final before reading: whatever was written before the end is then read in this pass.
                let final_ = core
                    .send(ListJobs(Some(id)))
                    .await
                    .ok()
                    .and_then(|j| j.first().map(|j| j.record.state.is_final()))
                    .unwrap_or(true);
                let shared2 = shared.clone();
                let (out, more, next) = web::block(move || {
                    let attempts = shared2.reader.lock().ok().and_then(|s| s.attempts_of(id).ok()).unwrap_or_default();
                    let mut out = String::new();
                    let mut more = false;
                    for a in &attempts {
                        for stream in [LogStream::Stdout, LogStream::Stderr] {
                            let path = shared2.dir.log_file(a.id, stream);
                            let key = (a.id, stream == LogStream::Stdout);
                            let pos = cur.offsets.entry(key).or_insert(None);
                            more |= read_log(&path, pos, start, final_, &mut out);
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

/// Where a log reader starts in each file.
#[derive(Clone, Copy)]
struct LogStart {
    tail_bytes: Option<u64>,
    offset: u64,
}

/// Appends the whole lines of `path` after `*pos` (at most [`LOG_READ_CHUNK_BYTES`]
/// of them) to `out` as events, moving `*pos` past them; a partial last line
/// waits for its end unless the job is final or it fills a whole chunk.
/// Returns whether more is there to read at once.
fn read_log(path: &std::path::Path, pos: &mut Option<u64>, start: LogStart, final_: bool, out: &mut String) -> bool {
    use std::io::{Read, Seek};
    let Ok(mut file) = std::fs::File::open(path) else { return false };
    let Ok(len) = file.metadata().map(|m| m.len()) else { return false };
    let from = match *pos {
        Some(p) => p,
        None => {
            let mut p = start.offset;
            if let Some(tail) = start.tail_bytes {
                p = p.max(len.saturating_sub(tail));
                // A tail starts at a line's beginning.
                if p > 0 && p < len {
                    let mut prev = [0u8; 1];
                    if file.seek(std::io::SeekFrom::Start(p - 1)).is_ok()
                        && file.read_exact(&mut prev).is_ok()
                        && prev[0] != b'\n'
                    {
                        let mut rest = Vec::new();
                        let _ = (&mut file).take(LOG_READ_CHUNK_BYTES).read_to_end(&mut rest);
                        match rest.iter().position(|&b| b == b'\n') {
                            Some(nl) => p += nl as u64 + 1,
                            None => p = len,
                        }
                    }
                }
            }
            p
        }
    };
    *pos = Some(from);
    if len <= from {
        return false;
    }
    let want = (len - from).min(LOG_READ_CHUNK_BYTES);
    let mut buf = Vec::with_capacity(want as usize);
    if file.seek(std::io::SeekFrom::Start(from)).is_err() || (&mut file).take(want).read_to_end(&mut buf).is_err() {
        return false;
    }
    let full_chunk = buf.len() as u64 == LOG_READ_CHUNK_BYTES;
    // Only the end of a final log may be a partial line; inside the file a line goes on in the next chunk.
    let at_end = from + buf.len() as u64 == len;
    let upto = match buf.iter().rposition(|&b| b == b'\n') {
        Some(p) => p + 1,
        None if (final_ && at_end) || full_chunk => buf.len(),
        None => 0,
    };
    for line in String::from_utf8_lossy(&buf[..upto]).lines() {
        out.push_str("data: ");
        out.push_str(line);
        out.push_str("\n\n");
    }
    // A final log's partial last line is sent as it is.
    let upto = if final_ && at_end && upto < buf.len() {
        for line in String::from_utf8_lossy(&buf[upto..]).lines() {
            out.push_str("data: ");
            out.push_str(line);
            out.push_str("\n\n");
        }
        buf.len()
    } else {
        upto
    };
    *pos = Some(from + upto as u64);
    from + (upto as u64) < len && upto > 0
}

#[derive(Default)]
struct LogCursor {
    /// Per attempt and stream (stdout: true), the next byte to read; `None` until the file was first seen.
    offsets: BTreeMap<(AttemptId, bool), Option<u64>>,
    done: bool,
}
