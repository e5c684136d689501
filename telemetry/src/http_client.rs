//! The OTLP exporter's HTTP client: blocking `ureq`, called from the
//! exporter's own thread.
//!
//! The OTLP crate's async clients need a tokio reactor on the calling thread
//! and panic without one (the exporter thread has none, and actix's
//! runtimes are not the one they would look for); its blocking reqwest
//! client would bring a second HTTP stack. `ureq` is already the CLI's client.

use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use std::time::Duration;

/// Largest collector answer read back (an OTLP answer is a few bytes; a partial-success one a few more).
pub const RESPONSE_BYTES_MAX: u64 = 1 << 20;

/// A blocking HTTP client for the exporter thread.
#[derive(Debug)]
pub struct UreqClient {
    agent: ureq::Agent,
}

impl UreqClient {
    /// A client whose every request (connect, send, answer) ends within `timeout`.
    pub fn new(timeout: Duration) -> UreqClient {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // The exporter reads the status itself (and retries 429 and 5xx).
            .http_status_as_error(false)
            .build()
            .new_agent();
        UreqClient { agent }
    }
}

#[async_trait::async_trait]
impl HttpClient for UreqClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, body.to_vec());
        // Blocking on purpose: this runs on the exporter's own thread, under a plain executor.
        let mut answer = self.agent.run(request)?;
        let body = answer.body_mut().with_config().limit(RESPONSE_BYTES_MAX).read_to_vec()?;
        let mut out = Response::builder().status(answer.status());
        for (k, v) in answer.headers() {
            out = out.header(k, v);
        }
        Ok(out.body(Bytes::from(body))?)
    }
}
