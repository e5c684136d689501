//! Videos and outputs by sha256: resumable uploads, streamed downloads.

use super::*;
use cosmos_proto::Sha256;
use std::io::Read;

/// Largest blob accepted by upload.
pub const BLOB_BYTES_MAX: u64 = 64 << 30;
/// Chunks of an upload buffered between the network and the disk writer.
const UPLOAD_QUEUE_CHUNKS: usize = 16;
/// Read size when streaming a blob out.
const DOWNLOAD_CHUNK_BYTES: usize = 256 * 1024;
/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/blobs/{sha256}", web::put().to(put_blob))
        .route("/v1/blobs/{sha256}", web::get().to(get_blob))
        .route("/v1/blobs/{sha256}", web::head().to(head_blob));
}

/// A blob as the API reports it.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlobView {
    /// Its digest.
    pub sha256: Sha256,
    /// Its size.
    pub size_bytes: u64,
}

pub(crate) fn parse_sha(s: &str) -> Result<Sha256, HttpResponse> {
    s.parse().map_err(|_| bad(format!("`{s}` is not a sha256 digest (64 hex digits)")))
}

// ---- blobs ----

/// A `Read` over upload chunks handed across from the async side.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<web::Bytes>,
    current: web::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The right to upload one blob, released when the request ends however it ends.
struct UploadGuard {
    shared: std::sync::Arc<crate::shared::Shared>,
    sha: Sha256,
}

impl UploadGuard {
    /// The right, unless another upload of `sha` holds it.
    fn take(shared: &std::sync::Arc<crate::shared::Shared>, sha: Sha256) -> Option<UploadGuard> {
        // The lock is released before a guard exists: dropping one locks again.
        let taken = shared.uploading.lock().unwrap_or_else(|e| e.into_inner()).insert(sha);
        taken.then(|| UploadGuard { shared: shared.clone(), sha })
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        self.shared.uploading.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.sha);
    }
}

/// Query of a resumable upload: where this body starts in the blob, and the blob's size.
#[derive(Deserialize)]
struct PutQuery {
    offset: Option<u64>,
    size: Option<u64>,
}

/// Feeds the request body to the disk writer; the error answer when the body broke off or is too large.
async fn pump(
    body: &mut web::Payload,
    tx: tokio::sync::mpsc::Sender<web::Bytes>,
    limit: u64,
    metrics: &crate::metrics::Metrics,
) -> Option<HttpResponse> {
    let mut received = 0u64;
    loop {
        let idle = std::time::Duration::from_millis(crate::http::BODY_IDLE_TIMEOUT_MS);
        let Ok(next) = tokio::time::timeout(idle, body.next()).await else {
            return Some(crate::http::closing(error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the upload stalled for {} ms after {received} bytes; upload again to resume",
                    crate::http::BODY_IDLE_TIMEOUT_MS
                ),
                None,
                true,
            )));
        };
        let Some(chunk) = next else { break };
        match chunk {
            Ok(bytes) => {
                received += bytes.len() as u64;
                metrics.artifact("uploaded", bytes.len() as u64);
                if received > limit {
                    return Some(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "the body is longer than the {limit} bytes announced (blobs are at most {BLOB_BYTES_MAX})"
                        ),
                        None,
                        false,
                    ));
                }
                // The writer only stops early on a disk error, reported by the caller.
                if tx.send(bytes).await.is_err() {
                    return None;
                }
            }
            Err(e) => {
                return Some(bad(format!("the upload broke off after {received} bytes: {e}; upload again to resume")));
            }
        }
    }
    None
}

/// Stores the body under its digest; the digest in the path must match the content.
///
/// With `?offset=N&size=S` the upload is resumable: the body continues the
/// blob at byte N, what arrives is kept even if the connection breaks (`HEAD`
/// then says how much), and the blob is verified and stored once S bytes are in.
async fn put_blob(
    state: web::Data<State>,
    sha: web::Path<String>,
    q: web::Query<PutQuery>,
    mut body: web::Payload,
) -> HttpResponse {
    let sha = match parse_sha(&sha) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some(size_bytes) = state.shared.blobs.size(&sha) {
        return HttpResponse::Ok().json(BlobView { sha256: sha, size_bytes });
    }
    // Two bodies appended to one partial file would corrupt it: one upload of a blob at a time.
    let Some(_uploading) = UploadGuard::take(&state.shared, sha) else {
        return error(
            StatusCode::CONFLICT,
            format!("another upload of {sha} is in progress; retry in a moment"),
            None,
            true,
        );
    };
    // Hashing and writing happen on a blocking thread, fed chunk by chunk: a
    // large video is never held in memory.
    let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_QUEUE_CHUNKS);
    let blobs = state.shared.blobs.clone();
    let reader = ChannelReader { rx, current: web::Bytes::new() };
    let (offset, size) = match (q.offset, q.size) {
        (None, None) => {
            let writer = tokio::task::spawn_blocking(move || blobs.put_reader(reader, Some(&sha)));
            let failure = pump(&mut body, tx.clone(), BLOB_BYTES_MAX, &state.shared.metrics).await;
            if failure.is_some() {
                // A truncated body must not be stored: make the writer fail its digest check.
                let _ = tx.send(web::Bytes::from_static(b"\0truncated")).await;
            }
            drop(tx);
            let stored = writer.await;
            if let Some(f) = failure {
                return f;
            }
            return match stored {
                Ok(Ok((sha256, size_bytes))) => HttpResponse::Created().json(BlobView { sha256, size_bytes }),
                Ok(Err(e)) => stored_error(&sha, e),
                Err(e) => internal(format!("the blob writer failed: {e}")),
            };
        }
        (Some(offset), Some(size)) => (offset, size),
        _ => return bad("give both `offset` and `size` (a resumable upload) or neither"),
    };
    if size > BLOB_BYTES_MAX || offset > size {
        return bad(format!("offset {offset} and size {size} must satisfy offset <= size <= {BLOB_BYTES_MAX}"));
    }
    let have = blobs.partial_len(&sha);
    if have != offset {
        return error(
            StatusCode::CONFLICT,
            format!("the controller holds {have} bytes of {sha}: resume at offset {have}"),
            None,
            true,
        );
    }
    if offset > 0 {
        tracing::info!(%sha, offset, size, "resuming an upload");
    }
    let writer = tokio::task::spawn_blocking(move || -> Result<Option<u64>, cosmos_cas::CasError> {
        let path = blobs.partial_path(&sha);
        let io = |source| cosmos_cas::CasError::Io { context: "cannot write", path: path.clone(), source };
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        let mut reader = reader;
        std::io::copy(&mut reader, &mut file).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < size {
            return Ok(None);
        }
        blobs.commit_partial(&sha, size)?;
        Ok(Some(size))
    });
    let failure = pump(&mut body, tx, size - offset, &state.shared.metrics).await;
    let stored = writer.await;
    match (stored, failure) {
        (Ok(Ok(Some(size_bytes))), _) => HttpResponse::Created().json(BlobView { sha256: sha, size_bytes }),
        (Ok(Err(e)), _) => stored_error(&sha, e),
        (Err(e), _) => internal(format!("the blob writer failed: {e}")),
        (Ok(Ok(None)), Some(f)) => f,
        (Ok(Ok(None)), None) => HttpResponse::Accepted()
            .json(serde_json::json!({ "sha256": sha, "have_bytes": state.shared.blobs.partial_len(&sha) })),
    }
}

fn stored_error(sha: &Sha256, e: cosmos_cas::CasError) -> HttpResponse {
    match e {
        cosmos_cas::CasError::DigestMismatch { actual, size_bytes, .. } => bad(format!(
            "the {size_bytes} bytes uploaded hash to {actual}, not to {sha} as the URL says; upload the file again"
        )),
        e => internal(format!("cannot store the blob: {e}")),
    }
}

async fn head_blob(state: web::Data<State>, sha: web::Path<String>) -> HttpResponse {
    let sha = match parse_sha(&sha) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match state.shared.blobs.size(&sha) {
        Some(size) => HttpResponse::Ok().insert_header(("x-cosmos-size-bytes", size.to_string())).finish(),
        // What a resumable upload left: the next one continues there.
        None => HttpResponse::NotFound()
            .insert_header(("x-cosmos-partial-bytes", state.shared.blobs.partial_len(&sha).to_string()))
            .finish(),
    }
}

async fn get_blob(state: web::Data<State>, sha: web::Path<String>) -> HttpResponse {
    let sha = match parse_sha(&sha) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let path = state.shared.blobs.path(&sha);
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return not_found(format!("no blob {sha} on the controller"));
    };
    let size = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return internal(e),
    };
    let metrics = state.shared.metrics.clone();
    let stream = futures::stream::unfold((file, metrics), |(mut file, metrics)| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; DOWNLOAD_CHUNK_BYTES];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                metrics.artifact("downloaded", n as u64);
                Some((Ok::<_, std::io::Error>(web::Bytes::from(buf)), (file, metrics)))
            }
            Err(e) => Some((Err(e), (file, metrics))),
        }
    });
    HttpResponse::Ok().content_type("application/octet-stream").no_chunking(size).streaming(stream)
}

// ---- prompts ----
