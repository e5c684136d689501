//! Blob traffic of one agent connection: serving input chunks the agent asks
//! for and taking in the outputs it uploads, beside the core and never in it.
//!
//! One task per connection handles the agent's blob frames in order (appends
//! to a partial file must be sequential) and hands its answers to the
//! connection's bulk queue, which the writer sends only when no control
//! message waits. File reads, writes and hashing happen off the actix system
//! (it is single-threaded and the core lives there): uploads on the blocking
//! pool, downloads on one reader thread per connection that reads, checksums
//! and encodes the requested chunks one after the other into the bulk queue, so
//! the next chunk is read while the writer sends the last one.

/// The store blobs live in, for callers that fill the controller's store directly (tests, tools).
pub use cosmos_cas::{CasError, Store};
use cosmos_proto::{
    AgentBlob, AttemptOutcome, AttemptPhase, AttemptReport, BLOB_CHUNK_BYTES, BlobChunk, ControllerBlob,
    MAX_BLOB_FRAMES_IN_FLIGHT_PER_CONN, Sha256, encode_blob, encode_controller_chunk_into,
};
use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Blob frames from one agent waiting for the blob task. An agent keeps at most
/// [`MAX_BLOB_FRAMES_IN_FLIGHT_PER_CONN`] unanswered, twice that for a moment
/// after it rewinds a transfer; more means it ignores the protocol, and its connection is dropped.
pub const BLOB_INBOX_LEN: usize = 4 * MAX_BLOB_FRAMES_IN_FLIGHT_PER_CONN + 16;
/// Encoded blob frames waiting for the connection's writer (behind any control message).
pub const BULK_QUEUE_LEN: usize = 4;
/// Blobs kept open per connection for serving ranges.
const OPEN_FILES_MAX: usize = 16;
/// Uploads one connection may have announced and not finished.
const UPLOADS_MAX: usize = 256;
/// Download requests waiting for the connection's reader thread.
const READ_QUEUE_LEN: usize = BLOB_INBOX_LEN;

/// Serves one connection's blob frames until the connection goes (its inbox or bulk queue closes).
pub async fn serve(
    store: Arc<Store>,
    mut inbox: mpsc::Receiver<AgentBlob>,
    bulk: mpsc::Sender<Vec<u8>>,
    agent: String,
) {
    let (reads, reads_rx) = mpsc::channel(READ_QUEUE_LEN);
    {
        let (store, bulk, agent) = (store.clone(), bulk.clone(), agent.clone());
        let spawned = std::thread::Builder::new()
            .name("blob-reader".into())
            .spawn(move || Reader { store, agent, files: HashMap::new(), buf: Vec::new() }.run(reads_rx, bulk));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a blob reader thread; dropping the agent's blob traffic");
            return;
        }
    }
    let mut conn = BlobConn { store, agent, uploads: HashMap::new() };
    while let Some(blob) = inbox.recv().await {
        let reply = match blob {
            AgentBlob::Request { sha256, offset, len_bytes } => {
                // Bounded by the agent's window; the inbox in front bounds it too.
                if reads.send((sha256, offset, len_bytes)).await.is_err() {
                    return;
                }
                continue;
            }
            AgentBlob::Offer { sha256, size_bytes } => conn.offer(sha256, size_bytes),
            AgentBlob::Chunk(chunk) => conn.receive(chunk).await,
        };
        let Some(reply) = reply else { continue };
        if bulk.send(reply).await.is_err() {
            return;
        }
    }
}

struct BlobConn {
    store: Arc<Store>,
    agent: String,
    /// Announced uploads: digest → size.
    uploads: HashMap<Sha256, u64>,
}

/// Serves one connection's download requests, in order, on its own thread.
struct Reader {
    store: Arc<Store>,
    agent: String,
    files: HashMap<Sha256, File>,
    /// Chunks are read here, then checksummed and encoded into their frame.
    buf: Vec<u8>,
}

impl Reader {
    /// Until the connection's blob task or its writer goes.
    fn run(mut self, mut requests: mpsc::Receiver<(Sha256, u64, u32)>, bulk: mpsc::Sender<Vec<u8>>) {
        while let Some((sha256, offset, len_bytes)) = requests.blocking_recv() {
            let Some(payload) = self.read(sha256, offset, len_bytes) else { continue };
            // Waits while the writer has its queue full: that is the back-pressure.
            if bulk.blocking_send(payload).is_err() {
                return;
            }
        }
    }

    fn file(&mut self, sha256: &Sha256) -> Option<&File> {
        if !self.files.contains_key(sha256) {
            let file = File::open(self.store.path(sha256)).ok()?;
            if self.files.len() >= OPEN_FILES_MAX {
                self.files.clear();
            }
            self.files.insert(*sha256, file);
        }
        self.files.get(sha256)
    }

    fn read(&mut self, sha256: Sha256, offset: u64, len_bytes: u32) -> Option<Vec<u8>> {
        let len = len_bytes.min(BLOB_CHUNK_BYTES) as usize;
        let mut buf = std::mem::take(&mut self.buf);
        let Some(file) = self.file(&sha256) else {
            self.buf = buf;
            return missing(sha256, "the controller's blob store does not hold it; upload it to the controller first");
        };
        let read = read_range_into(file, offset, len, &mut buf);
        let reply = match read {
            Ok(()) if buf.is_empty() && len > 0 => missing(sha256, &format!("the blob ends before byte {offset}")),
            Ok(()) => {
                let mut payload = Vec::new();
                match encode_controller_chunk_into(sha256, offset, &buf, &mut payload) {
                    Ok(()) => Some(payload),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode a blob frame");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(agent = self.agent, %sha256, error = %e, "cannot read a blob for an agent");
                self.files.remove(&sha256);
                missing(sha256, &format!("the controller cannot read it: {e}"))
            }
        };
        self.buf = buf;
        reply
    }
}

/// Reads up to `len` bytes at `offset` into `buf` (fewer at the file's end), reusing its allocation.
fn read_range_into(file: &File, offset: u64, len: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    buf.resize(len, 0);
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(())
}

fn encoded(blob: &ControllerBlob) -> Option<Vec<u8>> {
    match encode_blob(blob) {
        Ok(payload) => Some(payload),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a blob frame");
            None
        }
    }
}

fn missing(sha256: Sha256, reason: &str) -> Option<Vec<u8>> {
    encoded(&ControllerBlob::Missing { sha256, reason: reason.to_string() })
}

impl BlobConn {
    fn offer(&mut self, sha256: Sha256, size_bytes: u64) -> Option<Vec<u8>> {
        if self.store.size(&sha256) == Some(size_bytes) {
            return encoded(&ControllerBlob::Stored { sha256 });
        }
        if size_bytes == 0 {
            // No chunk will follow an empty blob: store it now.
            return match self.store.put_reader(&[][..], Some(&sha256)) {
                Ok(_) => encoded(&ControllerBlob::Stored { sha256 }),
                Err(e) => encoded(&ControllerBlob::Refused { sha256, reason: e.to_string(), retryable: false }),
            };
        }
        if !self.uploads.contains_key(&sha256) && self.uploads.len() >= UPLOADS_MAX {
            return encoded(&ControllerBlob::Refused {
                sha256,
                reason: format!("more than {UPLOADS_MAX} uploads at once on one connection"),
                retryable: true,
            });
        }
        let mut have_bytes = self.store.partial_len(&sha256);
        if have_bytes > size_bytes {
            self.store.discard_partial(&sha256);
            have_bytes = 0;
        }
        self.uploads.insert(sha256, size_bytes);
        encoded(&ControllerBlob::Resume { sha256, have_bytes })
    }

    async fn receive(&mut self, chunk: BlobChunk) -> Option<Vec<u8>> {
        let sha256 = chunk.sha256;
        let Some(&size_bytes) = self.uploads.get(&sha256) else {
            let reason = "a chunk of a blob that was not offered on this connection".to_string();
            return encoded(&ControllerBlob::Refused { sha256, reason, retryable: true });
        };
        let end = chunk.offset.saturating_add(chunk.data.len() as u64);
        if end > size_bytes {
            self.uploads.remove(&sha256);
            let reason = format!("a chunk ends at byte {end}, past the announced size of {size_bytes} bytes");
            return encoded(&ControllerBlob::Refused { sha256, reason, retryable: false });
        }
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || -> Result<Written, CasError> {
            if !chunk.is_intact() {
                return Ok(Written::Corrupt(store.partial_len(&sha256)));
            }
            let have = store.append_partial(&sha256, chunk.offset, &chunk.data)?;
            if have != end {
                return Ok(Written::Stale);
            }
            if have == size_bytes {
                store.commit_partial(&sha256, size_bytes)?;
                return Ok(Written::Stored);
            }
            Ok(Written::Ack(have))
        })
        .await
        .unwrap_or_else(|e| {
            Err(CasError::Io { context: "blob writer failed for", path: "-".into(), source: e.into() })
        });
        match written {
            Ok(Written::Ack(have_bytes)) => encoded(&ControllerBlob::Ack { sha256, have_bytes }),
            // A chunk sent before the agent rewound: the resent one follows.
            Ok(Written::Stale) => None,
            Ok(Written::Corrupt(have_bytes)) => {
                tracing::warn!(agent = self.agent, %sha256, have_bytes, "an uploaded chunk failed its checksum; asking for it again");
                encoded(&ControllerBlob::Resume { sha256, have_bytes })
            }
            Ok(Written::Stored) => {
                self.uploads.remove(&sha256);
                tracing::info!(agent = self.agent, %sha256, size_bytes, "stored an uploaded blob");
                encoded(&ControllerBlob::Stored { sha256 })
            }
            Err(e) => {
                self.uploads.remove(&sha256);
                tracing::warn!(agent = self.agent, %sha256, error = %e, "cannot store an uploaded blob");
                encoded(&ControllerBlob::Refused { sha256, reason: e.to_string(), retryable: e.is_retryable() })
            }
        }
    }
}

enum Written {
    Ack(u64),
    Stale,
    Corrupt(u64),
    Stored,
}

/// A success whose outputs are not all in the blob store did not deliver what
/// it promised: it becomes a retryable failure before the core sees it.
pub fn guard_outcome(store: &Store, outcome: &mut AttemptOutcome) {
    let AttemptOutcome::Succeeded { outputs } = outcome else { return };
    let missing: Vec<String> = outputs
        .iter()
        .filter(|o| store.size(&o.sha256) != Some(o.size_bytes))
        .map(|o| format!("{} ({})", o.path, o.sha256))
        .collect();
    if !missing.is_empty() {
        *outcome = AttemptOutcome::Failed {
            exit_code: Some(0),
            reason: format!(
                "outputs not delivered: {} not in the controller's blob store; another attempt will run",
                missing.join(", ")
            ),
            retryable: true,
        };
    }
}

/// [`guard_outcome`] for the finished attempts of a hello or heartbeat.
pub fn guard_reports(store: &Store, reports: &mut [AttemptReport]) {
    for r in reports {
        if let AttemptPhase::Finished(outcome) = &mut r.phase {
            guard_outcome(store, outcome);
        }
    }
}
