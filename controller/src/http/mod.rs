//! The HTTP API (actix-web, JSON), for the `cosmos` CLI and other tools.
//!
//! Every route needs `Authorization: Bearer <token>` with the token from the
//! data directory: anyone who can call this API can run commands on every GPU
//! host. The token is checked from the headers alone, by a middleware that
//! runs before any handler reads a byte of the body, so an unauthenticated
//! caller costs no more than its headers. Field names here are an interface
//! scripts rely on; keep them stable.

//!
//! - [`jobs`]: jobs, agents, status, logs.
//! - [`cosmos`]: Cosmos prompts and runs (jobs with `cosmos.*` labels).
//! - [`prune`]: pruning finished jobs' history (retention).
//! - [`blobs`]: uploading and downloading videos and outputs by sha256.
//! - [`metrics`]: `GET /metrics` for Prometheus (open on a loopback API; see there).
//!
//! This module holds what they share: the server, its auth middleware, the
//! bounded body reader, and the error answers.

pub mod blobs;
pub mod cosmos;
pub mod jobs;
pub mod metrics;
pub mod prune;

pub use jobs::{AgentInfo, AttemptView, GpuView, JobLine, JobView, RESERVED_LABEL_PREFIX, StatusBody, SubmitRequest};

use crate::actor::CoreActor;
use crate::records::Idempotency;
use crate::shared::Shared;
use actix::Addr;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, dev::Server, http::StatusCode, web};
use cosmos_proto::Classify;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
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

pub(crate) fn bad(msg: impl Into<String>) -> HttpResponse {
    error(StatusCode::BAD_REQUEST, msg.into(), None, false)
}

pub(crate) fn bad_line(line: usize, msg: impl std::fmt::Display) -> HttpResponse {
    error(StatusCode::BAD_REQUEST, format!("line {line}: {msg}"), Some(line), false)
}

pub(crate) fn not_found(msg: impl Into<String>) -> HttpResponse {
    error(StatusCode::NOT_FOUND, msg.into(), None, false)
}

pub(crate) fn internal(msg: impl std::fmt::Display) -> HttpResponse {
    error(StatusCode::INTERNAL_SERVER_ERROR, msg.to_string(), None, true)
}

/// How a domain error is answered over HTTP: the one place statuses are chosen.
pub(crate) trait HttpError: std::fmt::Display {
    /// The status it is answered with.
    fn status(&self) -> StatusCode;
    /// Whether the same request may succeed later.
    fn retryable(&self) -> bool {
        self.status() == StatusCode::SERVICE_UNAVAILABLE
    }
    /// The 1-based line of a batch it blames, if one.
    fn line(&self) -> Option<usize> {
        None
    }
}

impl HttpError for crate::core::CommandError {
    fn status(&self) -> StatusCode {
        use crate::core::CommandError::*;
        match self {
            UnknownJob(_) | UnknownAgent(_) | UnknownGpu { .. } => StatusCode::NOT_FOUND,
            QueueFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::CONFLICT,
        }
    }
}

impl HttpError for crate::core::SubmitError {
    fn status(&self) -> StatusCode {
        match self {
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            crate::core::SubmitError::KeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        }
    }
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
    fn line(&self) -> Option<usize> {
        jobs::submit_error_line(self)
    }
}

impl HttpError for crate::store::StoreError {
    fn status(&self) -> StatusCode {
        StatusCode::SERVICE_UNAVAILABLE
    }
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
}

/// The answer to a domain error.
pub(crate) fn answer(e: &impl HttpError) -> HttpResponse {
    error(e.status(), e.to_string(), e.line(), e.retryable())
}

/// The answer to an operator command (cancel, drain): once its effect is durable, `ok`.
pub(crate) async fn command_result(
    r: Result<Result<tokio::sync::oneshot::Receiver<()>, crate::core::CommandError>, actix::MailboxError>,
) -> HttpResponse {
    match r {
        Ok(Ok(rx)) => match rx.await {
            Ok(()) => HttpResponse::Ok().json(serde_json::json!({ "ok": true })),
            Err(_) => unavailable(),
        },
        Ok(Err(e)) => answer(&e),
        Err(_) => unavailable(),
    }
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
    if shared.metrics_open && req.path() == "/metrics" {
        return Ok(());
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
    pub(crate) hosts: Arc<crate::hosts::Hosts>,
    /// Durable changes of jobs, for `GET /v1/events`.
    pub(crate) events: Arc<crate::events::EventLog<crate::actor::JobSummary>>,
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

/// Connections the kernel completes and queues while every API worker is at
/// its connection limit (actix's own default). `std`'s bind would give 128:
/// a burst of clients beyond the workers' limits then waits in SYN retries,
/// seconds each, instead of being accepted as soon as a worker frees up.
pub const API_ACCEPT_BACKLOG_MAX: u32 = 2048;

/// Binds the API's listener, with [`API_ACCEPT_BACKLOG_MAX`]; must run inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As std and tokio do: a restarted controller can rebind while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(API_ACCEPT_BACKLOG_MAX)?.into_std()
}

/// Starts serving the API on a bound listener; returns the server with its address.
pub fn server(
    listener: std::net::TcpListener,
    core: Addr<CoreActor>,
    shared: Arc<Shared>,
    hosts: Arc<crate::hosts::Hosts>,
    events: Arc<crate::events::EventLog<crate::actor::JobSummary>>,
) -> std::io::Result<(Server, SocketAddr)> {
    let state = web::Data::new(State { core, shared: shared.clone(), hosts, events });
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
            .configure(prune::routes)
            .configure(jobs::routes)
            .configure(cosmos::routes)
            .configure(blobs::routes)
            .configure(metrics::routes)
    })
    .workers(API_WORKERS)
    .max_connections(connections_max.div_ceil(API_WORKERS))
    .client_request_timeout(Duration::from_millis(REQUEST_HEAD_TIMEOUT_MS))
    .disable_signals()
    .shutdown_timeout(2)
    .listen(listener)?;
    let addr = bound.addrs()[0];
    Ok((bound.run(), addr))
}
