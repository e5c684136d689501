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
//!
//! What to answer is [`machine`]'s to decide (a state machine with no I/O that
//! the simulator drives too); this module does the file work around it.

pub use cosmos_controller_core::blobs::machine;

/// The store blobs live in, for callers that fill the controller's store directly (tests, tools).
pub use cosmos_cas::{CasError, Store};
use cosmos_proto::Classify;
use cosmos_proto::{
    AgentBlob, BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX, BlobChunk, ControllerBlob, Sha256, encode_blob,
    encode_controller_chunk_into,
};
use machine::{Appended, ChunkAction, Intake, OfferAction, Serve};
use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Blob frames from one agent waiting for the blob task. An agent keeps at most
/// [`BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX`] unanswered, twice that for a moment
/// after it rewinds a transfer; more means it ignores the protocol, and its connection is dropped.
pub const BLOB_INBOX_LEN: usize = 4 * BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX + 16;
/// Encoded blob frames waiting for the connection's writer (behind any control message).
pub const BULK_QUEUE_LEN: usize = 4;
/// Blobs kept open per connection for serving ranges.
const OPEN_FILES_MAX: usize = 16;
/// Download requests waiting for the connection's reader thread.
const READ_QUEUE_LEN: usize = BLOB_INBOX_LEN;

/// Serves one connection's blob frames until the connection goes (its inbox or bulk queue closes).
pub async fn serve(
    store: Arc<Store>,
    mut inbox: mpsc::Receiver<AgentBlob>,
    bulk: mpsc::Sender<Vec<u8>>,
    agent: String,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let (reads, reads_rx) = mpsc::channel(READ_QUEUE_LEN);
    {
        let (store, bulk, agent, metrics) = (store.clone(), bulk.clone(), agent.clone(), metrics.clone());
        let spawned = std::thread::Builder::new().name("blob-reader".into()).spawn(move || {
            Reader { store, agent, files: HashMap::new(), buf: Vec::new(), metrics }.run(reads_rx, bulk)
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a blob reader thread; dropping the agent's blob traffic");
            return;
        }
    }
    let (commits_tx, mut commits) = mpsc::unbounded_channel();
    let mut conn = BlobConn { store, agent, intake: Intake::new(), commits: commits_tx, metrics };
    loop {
        let reply = tokio::select! {
            blob = inbox.recv() => match blob {
                Some(AgentBlob::Request { sha256, offset, len_bytes }) => {
                    // Bounded by the agent's window; the inbox in front bounds it too.
                    if reads.send((sha256, offset, len_bytes)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(AgentBlob::Offer { sha256, size_bytes }) => conn.offer(sha256, size_bytes),
                Some(AgentBlob::Chunk(chunk)) => conn.receive(chunk).await,
                None => return,
            },
            // The sender lives in `conn`: this never ends first.
            Some(done) = commits.recv() => conn.committed(done),
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
    /// What to answer, decided without I/O.
    intake: Intake,
    /// Where detached commits report.
    commits: mpsc::UnboundedSender<Commit>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// A finished commit, for the blob task to answer.
struct Commit {
    sha256: Sha256,
    size_bytes: u64,
    result: Result<(), CasError>,
}

/// Serves one connection's download requests, in order, on its own thread.
struct Reader {
    store: Arc<Store>,
    agent: String,
    files: HashMap<Sha256, File>,
    /// Chunks are read here, then checksummed and encoded into their frame.
    buf: Vec<u8>,
    metrics: Arc<crate::metrics::Metrics>,
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

    fn file(&mut self, sha256: &Sha256) -> std::io::Result<&File> {
        if !self.files.contains_key(sha256) {
            let file = File::open(self.store.path(sha256))?;
            if self.files.len() >= OPEN_FILES_MAX {
                self.files.clear();
            }
            self.files.insert(*sha256, file);
        }
        Ok(&self.files[sha256])
    }

    /// The chunk's frame; `Missing` only when the store does not hold the blob. Other
    /// failures (too many open files, permissions, I/O) may pass: they answer nothing,
    /// and the agent asks again when its request stalls.
    fn read(&mut self, sha256: Sha256, offset: u64, len_bytes: u32) -> Option<Vec<u8>> {
        let agent = self.agent.clone();
        let size = match self.file(&sha256).and_then(|f| f.metadata()) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(agent, %sha256, error = %e, "cannot open a blob for an agent; it will ask again");
                return None;
            }
        };
        let (offset, len) = match machine::serve(sha256, offset, len_bytes, size) {
            Serve::Reply(blob) => return encoded(&blob),
            Serve::Read { offset, len_bytes } => (offset, len_bytes as usize),
        };
        let mut buf = std::mem::take(&mut self.buf);
        let read = self.file(&sha256).and_then(|file| read_range_into(file, offset, len, &mut buf));
        let reply = match read {
            Ok(()) => {
                let mut payload = Vec::new();
                match encode_controller_chunk_into(sha256, offset, &buf, &mut payload) {
                    Ok(()) => {
                        self.metrics.artifact("to_agents", buf.len() as u64);
                        Some(payload)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode a blob frame");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(agent, %sha256, error = %e, "cannot read a blob for an agent; it will ask again");
                self.files.remove(&sha256);
                None
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
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

impl BlobConn {
    fn offer(&mut self, sha256: Sha256, size_bytes: u64) -> Option<Vec<u8>> {
        let (stored, partial) = (self.store.size(&sha256), self.store.partial_len(&sha256));
        match self.intake.on_offer(sha256, size_bytes, stored, partial) {
            OfferAction::Reply(blob) => encoded(&blob),
            OfferAction::DiscardThenReply(blob) => {
                self.store.discard_partial(&sha256);
                encoded(&blob)
            }
            OfferAction::StoreEmpty => {
                // No chunk will follow an empty blob: store it now.
                let result = self
                    .store
                    .put_reader(&[][..], Some(&sha256))
                    .map(drop)
                    .map_err(|e| (e.to_string(), cosmos_proto::Retry::Terminal));
                encoded(&self.intake.on_committed(sha256, result))
            }
            OfferAction::Commit => {
                self.commit(sha256, size_bytes);
                None
            }
            OfferAction::Wait => None,
        }
    }

    /// Verifies and installs a complete partial file on the blocking pool, so the connection's other
    /// transfers go on meanwhile; [`BlobConn::committed`] answers.
    fn commit(&mut self, sha256: Sha256, size_bytes: u64) {
        let (store, commits) = (self.store.clone(), self.commits.clone());
        let on_offer = self.intake.commit_on_offer(&sha256);
        tokio::task::spawn_blocking(move || {
            let result = store.commit_partial(&sha256, size_bytes).map(drop);
            // Another connection may have committed the same content first (taking the partial file).
            let result = match result {
                Err(_) if store.size(&sha256) == Some(size_bytes) => Ok(()),
                other => other,
            };
            if result.is_err() && on_offer {
                // The leftover bytes were bad or unreadable: they go, and the agent sends them all again.
                store.discard_partial(&sha256);
            }
            let _ = commits.send(Commit { sha256, size_bytes, result });
        });
    }

    fn committed(&mut self, Commit { sha256, size_bytes, result }: Commit) -> Option<Vec<u8>> {
        match &result {
            Ok(()) => tracing::info!(agent = self.agent, %sha256, size_bytes, "stored an uploaded blob"),
            Err(e) => tracing::warn!(agent = self.agent, %sha256, error = %e, "an uploaded blob did not commit"),
        }
        let result = result.map_err(|e| (e.to_string(), e.retry()));
        encoded(&self.intake.on_committed(sha256, result))
    }

    async fn receive(&mut self, chunk: BlobChunk) -> Option<Vec<u8>> {
        let sha256 = chunk.sha256;
        let len = chunk.data.len() as u64;
        match self.intake.on_chunk(sha256, chunk.offset, len, chunk.is_intact()) {
            ChunkAction::Reply(blob) => return encoded(&blob),
            ChunkAction::Ignore => return None,
            ChunkAction::Append => {}
        }
        let end = chunk.offset + len;
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || store.append_partial(&sha256, chunk.offset, &chunk.data))
            .await
            .unwrap_or_else(|e| {
                Err(CasError::Io { context: "blob writer failed for", path: "-".into(), source: e.into() })
            });
        if written.is_ok() {
            self.metrics.artifact("from_agents", len);
        }
        match written {
            Ok(have_bytes) => match self.intake.on_appended(sha256, end, have_bytes) {
                Appended::Reply(blob) => encoded(&blob),
                Appended::Commit => {
                    let size_bytes = self.intake.size_bytes(&sha256).unwrap_or(end);
                    self.commit(sha256, size_bytes);
                    None
                }
                Appended::Ignore => None,
            },
            Err(e) => {
                tracing::warn!(agent = self.agent, %sha256, error = %e, "cannot store an uploaded blob");
                encoded(&self.intake.on_append_failed(sha256, e.to_string(), e.retry()))
            }
        }
    }
}

/// How much of the end of an enhancement's standard output is searched for its
/// result line: the line comes last, whatever logs came before it.
pub const ENHANCE_STDOUT_TAIL_BYTES: u64 = 4 << 20;

/// The last [`ENHANCE_STDOUT_TAIL_BYTES`] of an enhancement's delivered standard output.
pub fn read_enhance_stdout(blobs: &cosmos_cas::Store, sha256: &Sha256) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(blobs.path(sha256))?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(ENHANCE_STDOUT_TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.take(ENHANCE_STDOUT_TAIL_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosmos_proto::ControllerFrame;
    use std::time::Duration;

    struct Conn {
        inbox: mpsc::Sender<AgentBlob>,
        bulk: mpsc::Receiver<Vec<u8>>,
    }

    impl Conn {
        fn open(store: &Arc<Store>) -> Conn {
            let (inbox, inbox_rx) = mpsc::channel(BLOB_INBOX_LEN);
            let (bulk_tx, bulk) = mpsc::channel(BULK_QUEUE_LEN);
            let metrics = Arc::new(crate::metrics::Metrics::new());
            tokio::spawn(serve(store.clone(), inbox_rx, bulk_tx, "test".into(), metrics));
            Conn { inbox, bulk }
        }

        async fn send(&self, blob: AgentBlob) {
            self.inbox.send(blob).await.unwrap();
        }

        async fn next(&mut self) -> ControllerBlob {
            let payload = tokio::time::timeout(Duration::from_secs(10), self.bulk.recv()).await.unwrap().unwrap();
            match ControllerFrame::decode(&payload).unwrap() {
                ControllerFrame::Blob(blob) => blob,
                other => panic!("not a blob frame: {other:?}"),
            }
        }

        async fn nothing_for(&mut self, ms: u64) {
            let got = tokio::time::timeout(Duration::from_millis(ms), self.bulk.recv()).await;
            assert!(got.is_err(), "expected silence, got {got:?}");
        }
    }

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        (dir, store)
    }

    #[tokio::test]
    async fn an_offer_of_a_complete_uncommitted_partial_is_committed_and_stored() {
        let (_dir, store) = store();
        let data = b"every byte arrived but the commit never ran".to_vec();
        let sha = cosmos_cas::digest(&data);
        store.append_partial(&sha, 0, &data).unwrap();
        let mut conn = Conn::open(&store);
        conn.send(AgentBlob::Offer { sha256: sha, size_bytes: data.len() as u64 }).await;
        assert_eq!(conn.next().await, ControllerBlob::Stored { sha256: sha });
        assert_eq!(store.size(&sha), Some(data.len() as u64));
        assert_eq!(store.partial_len(&sha), 0);
    }

    #[tokio::test]
    async fn an_offer_of_a_complete_bad_partial_starts_over() {
        let (_dir, store) = store();
        let data = b"the good bytes".to_vec();
        let sha = cosmos_cas::digest(&data);
        store.append_partial(&sha, 0, b"the evil bytes").unwrap();
        let mut conn = Conn::open(&store);
        conn.send(AgentBlob::Offer { sha256: sha, size_bytes: data.len() as u64 }).await;
        assert_eq!(conn.next().await, ControllerBlob::Resume { sha256: sha, have_bytes: 0 });
        assert_eq!(store.partial_len(&sha), 0);
        // The upload goes on as any other.
        conn.send(AgentBlob::Chunk(BlobChunk::new(sha, 0, data.clone()))).await;
        assert_eq!(conn.next().await, ControllerBlob::Stored { sha256: sha });
        assert_eq!(store.size(&sha), Some(data.len() as u64));
    }

    #[tokio::test]
    async fn a_full_upload_table_forgets_the_least_recently_active_upload() {
        let (_dir, store) = store();
        let mut conn = Conn::open(&store);
        let blobs: Vec<Vec<u8>> =
            (0..=machine::UPLOADS_MAX).map(|i| format!("blob {i}, two chunks").into_bytes()).collect();
        for data in &blobs {
            let sha = cosmos_cas::digest(data);
            conn.send(AgentBlob::Offer { sha256: sha, size_bytes: data.len() as u64 }).await;
            assert_eq!(conn.next().await, ControllerBlob::Resume { sha256: sha, have_bytes: 0 });
        }
        // The first was abandoned and forgotten; the second is still known and finishes.
        let first = cosmos_cas::digest(&blobs[0]);
        conn.send(AgentBlob::Chunk(BlobChunk::new(first, 0, blobs[0].clone()))).await;
        assert!(matches!(conn.next().await, ControllerBlob::Refused { retry: cosmos_proto::Retry::Retryable, .. }));
        let second = cosmos_cas::digest(&blobs[1]);
        conn.send(AgentBlob::Chunk(BlobChunk::new(second, 0, blobs[1][..4].to_vec()))).await;
        assert_eq!(conn.next().await, ControllerBlob::Ack { sha256: second, have_bytes: 4 });
        conn.send(AgentBlob::Chunk(BlobChunk::new(second, 4, blobs[1][4..].to_vec()))).await;
        assert_eq!(conn.next().await, ControllerBlob::Stored { sha256: second });
    }

    #[tokio::test]
    async fn only_a_blob_the_store_lacks_is_missing() {
        let (_dir, store) = store();
        let mut conn = Conn::open(&store);
        let absent = cosmos_cas::digest(b"nobody uploaded this");
        conn.send(AgentBlob::Request { sha256: absent, offset: 0, len_bytes: 10 }).await;
        assert!(matches!(conn.next().await, ControllerBlob::Missing { .. }));

        // A blob the controller cannot open for now is no verdict: nothing answers, the agent asks again.
        let (sha, _) = store.put_bytes(b"unreadable for a while").unwrap();
        let path = store.path(&sha);
        let shard = path.parent().unwrap().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shard, std::fs::Permissions::from_mode(0o000)).unwrap();
        let readable = File::open(&path).is_ok(); // root reads anyway
        conn.send(AgentBlob::Request { sha256: sha, offset: 0, len_bytes: 10 }).await;
        if !readable {
            conn.nothing_for(300).await;
        }
        std::fs::set_permissions(&shard, std::fs::Permissions::from_mode(0o755)).unwrap();
        if readable {
            assert!(matches!(conn.next().await, ControllerBlob::Chunk(_)));
        }
        conn.send(AgentBlob::Request { sha256: sha, offset: 0, len_bytes: 10 }).await;
        match conn.next().await {
            ControllerBlob::Chunk(c) => assert_eq!(c.data, b"unreadable"),
            other => panic!("{other:?}"),
        }
    }
}
