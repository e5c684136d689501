//! OTLP over gRPC: the exporter's protobuf request carried as one unary
//! gRPC call (`TraceService/Export`) over HTTP/2 (`h2`, cleartext, prior
//! knowledge), on the exporter's own thread.
//!
//! Not tonic: it would bring tower, hyper's HTTP/2 client and a channel
//! layer for one unary call. OTLP/gRPC and OTLP/HTTP carry the same
//! messages (`ExportTraceServiceRequest` in, `ExportTraceServiceResponse`
//! out), so this is an [`HttpClient`] for the OTLP crate's HTTP exporter
//! that frames its protobuf body as gRPC does and turns the gRPC status back
//! into the HTTP status the exporter's retry rules read. What it sends follows
//! tonic's client (`Grpc::prepare_request`): `POST` to the endpoint's path
//! (if any) followed by the method's, `te: trailers`, `content-type:
//! application/grpc`, the exporter's headers (`User-Agent`,
//! `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`) as metadata; one uncompressed
//! length-prefixed message. An answer's status is read from the trailers, or
//! from the headers of a trailers-only answer, as tonic does.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, TE};
use http::{StatusCode, Uri};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The OTLP trace service's one method, from `opentelemetry/proto/collector/trace/v1/trace_service.proto`.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Largest answer read back (an `ExportTraceServiceResponse` is a few bytes; a partial-success one a few more).
pub const RESPONSE_BYTES_MAX: usize = 1 << 20;

/// gRPC status codes (`grpc/doc/statuscodes.md`) the OTLP specification says to retry.
const RETRYABLE_CODES: [u32; 6] = [
    1,  // CANCELLED
    4,  // DEADLINE_EXCEEDED
    10, // ABORTED
    11, // OUT_OF_RANGE
    14, // UNAVAILABLE
    15, // DATA_LOSS
];

/// Not an answer: the connection, the HTTP/2 layer or the framing failed.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The endpoint has no host.
    #[error("{0}: no host:port to connect to")]
    Endpoint(String),
    /// TCP connect failed.
    #[error("connecting to the collector at {authority}: {source}")]
    Connect {
        /// host:port.
        authority: String,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP/2 failed (handshake, stream reset, connection closed).
    #[error("HTTP/2 to the collector: {0}")]
    H2(#[from] h2::Error),
    /// No answer within the export timeout.
    #[error("no answer from the collector within {0} ms")]
    Timeout(u128),
    /// The answer is not a gRPC one this client can read.
    #[error("the collector's answer is not a readable gRPC message: {0}")]
    Frame(&'static str),
}

/// A connection kept between exports.
struct Conn {
    authority: String,
    send: h2::client::SendRequest<Bytes>,
}

/// Carries the OTLP HTTP exporter's requests as gRPC calls.
pub struct GrpcClient {
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
    /// Last non-OK gRPC status logged (0: none), so a failing collector is logged once per status.
    last_logged: AtomicU32,
}

impl std::fmt::Debug for GrpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClient").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl GrpcClient {
    /// A client whose every call (connect, send, answer) ends within `timeout`.
    pub fn new(timeout: Duration) -> std::io::Result<GrpcClient> {
        // Its own single-threaded runtime, driven only while a call is made from the exporter thread:
        // neither actix's runtimes nor the agent's are involved.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
        Ok(GrpcClient { runtime, timeout, conn: Mutex::new(None), last_logged: AtomicU32::new(0) })
    }

    async fn connect(authority: &str) -> Result<h2::client::SendRequest<Bytes>, GrpcError> {
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|source| GrpcError::Connect { authority: authority.to_string(), source })?;
        let _ = tcp.set_nodelay(true);
        let (send, connection) = h2::client::handshake(tcp).await?;
        // Driven by the runtime whenever a call runs; ends when the collector closes it.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(send)
    }

    /// A ready stream sender: the kept connection, or a new one when there is none or it died.
    async fn ready(&self, authority: &str) -> Result<h2::client::SendRequest<Bytes>, GrpcError> {
        let kept = self.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        let reused = match kept.filter(|c| c.authority == authority) {
            Some(c) => c.send.ready().await.ok(),
            None => None,
        };
        let send = match reused {
            Some(send) => send,
            None => GrpcClient::connect(authority).await?.ready().await?,
        };
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Conn { authority: authority.to_string(), send: send.clone() });
        Ok(send)
    }

    async fn call(&self, request: http::Request<()>, message: Bytes, authority: &str) -> Result<Answer, GrpcError> {
        let mut send = self.ready(authority).await?;
        let (answer, mut stream) = send.send_request(request, false)?;
        // One length-prefixed message: 0 (uncompressed), its length (big-endian u32), the message.
        let len = u32::try_from(message.len()).map_err(|_| GrpcError::Frame("request over 4 GiB"))?;
        let mut frame = BytesMut::with_capacity(5 + message.len());
        frame.put_u8(0);
        frame.put_u32(len);
        frame.put_slice(&message);
        stream.send_data(frame.freeze(), true)?;
        let (head, mut body) = answer.await?.into_parts();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if data.len() + chunk.len() > RESPONSE_BYTES_MAX + 5 {
                return Err(GrpcError::Frame("answer over the size limit"));
            }
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?;
        Ok(Answer { status: head.status, headers: head.headers, data: data.freeze(), trailers })
    }

    fn log_status(&self, code: u32, message: &str) {
        if code == 0 {
            self.last_logged.store(0, Ordering::Relaxed);
        } else if self.last_logged.swap(code, Ordering::Relaxed) != code {
            tracing::warn!(grpc_status = code, grpc_message = message, "the collector refused spans over gRPC");
        }
    }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    data: Bytes,
    trailers: Option<http::HeaderMap>,
}

/// The gRPC status of `headers`: its code and message (percent-decoded), if it names one.
fn grpc_status(headers: &http::HeaderMap) -> Option<(u32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).map(crate::config::percent_decode);
    Some((code, message.unwrap_or_default()))
}

/// The one message of an answer's body.
fn unframe(data: &[u8]) -> Result<Bytes, GrpcError> {
    let Some((head, rest)) = data.split_first_chunk::<5>() else {
        return Err(GrpcError::Frame("missing response message"));
    };
    if head[0] != 0 {
        // This client never offers compression (no `grpc-accept-encoding`), so a compressed answer is wrong.
        return Err(GrpcError::Frame("compressed message, though none was accepted"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    rest.get(..len).map(Bytes::copy_from_slice).ok_or(GrpcError::Frame("truncated message"))
}

/// The HTTP status that makes the OTLP HTTP exporter retry (or not) as OTLP/gRPC says to.
fn http_status_of(code: u32) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        c if RETRYABLE_CODES.contains(&c) => StatusCode::SERVICE_UNAVAILABLE,
        // RESOURCE_EXHAUSTED is retried only with a RetryInfo detail, which this client does not read;
        // the rest are the sender's fault, and retrying would not help.
        _ => StatusCode::BAD_REQUEST,
    }
}

/// Headers a gRPC request carries from the exporter's: not the HTTP body's own, nor HTTP/1 connection ones (HTTP/2 forbids them).
fn forwarded(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "content-type"
            | "content-length"
            | "content-encoding"
            | "host"
            | "te"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
    )
}

#[async_trait::async_trait]
impl HttpClient for GrpcClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, message) = request.into_parts();
        let uri = parts.uri;
        let authority =
            uri.authority().map(|a| a.as_str().to_string()).ok_or_else(|| GrpcError::Endpoint(uri.to_string()))?;
        // As tonic: the endpoint's path, when it has one, prefixes the method's.
        let prefix = uri.path().trim_end_matches('/');
        let target: Uri = format!("http://{authority}{prefix}{EXPORT_PATH}").parse()?;
        let mut grpc = http::Request::builder().method(http::Method::POST).uri(target).version(http::Version::HTTP_2);
        for (name, value) in parts.headers.iter().filter(|(n, _)| forwarded(n)) {
            grpc = grpc.header(name, value);
        }
        let grpc = grpc
            .header(TE, HeaderValue::from_static("trailers"))
            .header(CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
            .body(())?;
        let timeout = self.timeout;
        // Blocking on purpose: this runs on the exporter's own thread, under a plain executor.
        let answer = self.runtime.block_on(async {
            match tokio::time::timeout(timeout, self.call(grpc, message, &authority)).await {
                Ok(answer) => answer,
                Err(_) => Err(GrpcError::Timeout(timeout.as_millis())),
            }
        });
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                // A hung or broken connection is not kept for the next try.
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return Err(e.into());
            }
        };
        if answer.status != StatusCode::OK {
            // Not gRPC's answer (a proxy's, say): its HTTP status is what the exporter judges.
            return Ok(Response::builder().status(answer.status).body(Bytes::new())?);
        }
        // A trailers-only answer carries its status in the headers.
        let (code, text) = grpc_status(&answer.headers)
            .or_else(|| answer.trailers.as_ref().and_then(grpc_status))
            .unwrap_or((2, "the answer has no grpc-status".to_string())); // UNKNOWN, as tonic reads it
        let (status, body) = match code {
            0 => match unframe(&answer.data) {
                Ok(message) => (StatusCode::OK, message),
                Err(e) => {
                    // The collector said OK: sending the spans again would not be better.
                    tracing::warn!(error = %e, "the collector's gRPC answer is unreadable; its spans count as exported");
                    (StatusCode::OK, Bytes::new())
                }
            },
            _ => (http_status_of(code), Bytes::new()),
        };
        self.log_status(code, &text);
        Ok(Response::builder().status(status).body(body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_retry_as_the_otlp_specification_says() {
        assert_eq!(http_status_of(0), StatusCode::OK);
        for retried in [1, 4, 10, 11, 14, 15] {
            assert_eq!(http_status_of(retried), StatusCode::SERVICE_UNAVAILABLE, "{retried}");
        }
        for not in [2, 3, 5, 6, 7, 8, 9, 12, 13, 16] {
            assert_eq!(http_status_of(not), StatusCode::BAD_REQUEST, "{not}");
        }
    }

    #[test]
    fn an_answer_is_one_uncompressed_length_prefixed_message() {
        assert_eq!(unframe(&[0, 0, 0, 0, 2, 8, 1]).unwrap(), Bytes::from_static(&[8, 1]));
        assert_eq!(unframe(&[0, 0, 0, 0, 0]).unwrap(), Bytes::new());
        assert!(matches!(unframe(&[]), Err(GrpcError::Frame("missing response message"))));
        assert!(matches!(unframe(&[0, 0, 0, 0, 3, 8]), Err(GrpcError::Frame("truncated message"))));
        assert!(matches!(unframe(&[1, 0, 0, 0, 0]), Err(GrpcError::Frame(_))));
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("14"));
        h.insert("grpc-message", HeaderValue::from_static("collector%20busy"));
        assert_eq!(grpc_status(&h), Some((14, "collector busy".to_string())));
    }
}
