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
    AgentBlob, BLOB_CHUNK_BYTES, BlobChunk, ControllerBlob,
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
/// Uploads one connection keeps announced and unfinished; past it the least recently active is forgotten.
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
    let (commits_tx, mut commits) = mpsc::unbounded_channel();
    let mut conn = BlobConn { store, agent, uploads: HashMap::new(), activity: 0, commits: commits_tx };
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
    /// Announced uploads, by digest.
    uploads: HashMap<Sha256, Incoming>,
    /// Counts the connection's upload frames: an upload's last activity (the least recent goes first when full).
    activity: u64,
    /// Where detached commits report.
    commits: mpsc::UnboundedSender<Commit>,
}

/// An upload the agent announced and has not finished.
struct Incoming {
    size_bytes: u64,
    last_active: u64,
    /// Its complete partial file is being verified and installed off this task; the result answers.
    committing: bool,
}

/// A finished commit, for the blob task to answer.
struct Commit {
    sha256: Sha256,
    size_bytes: u64,
    /// Started by an offer that found the whole blob already there (rather than by its last chunk).
    on_offer: bool,
    result: Result<(), CasError>,
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
        let len = len_bytes.min(BLOB_CHUNK_BYTES) as usize;
        let mut buf = std::mem::take(&mut self.buf);
        let agent = self.agent.clone();
        let file = match self.file(&sha256) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.buf = buf;
                return missing(
                    sha256,
                    "the controller's blob store does not hold it; upload it to the controller first",
                );
            }
            Err(e) => {
                self.buf = buf;
                tracing::warn!(agent, %sha256, error = %e, "cannot open a blob for an agent; it will ask again");
                return None;
            }
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
                tracing::warn!(agent = self.agent, %sha256, error = %e, "cannot read a blob for an agent; it will ask again");
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
        self.activity += 1;
        if let Some(u) = self.uploads.get_mut(&sha256) {
            u.last_active = self.activity;
            if u.committing {
                // Offered again while its commit runs (the agent saw no answer for a while): the commit answers.
                return None;
            }
        } else if self.uploads.len() >= UPLOADS_MAX {
            // Uploads the agent gave up on (cancelled, fenced, timed out) leave no word: the least
            // recently active one goes, and its partial file stays for whoever offers it again.
            let stale = self.uploads.iter().filter(|(_, u)| !u.committing).min_by_key(|(_, u)| u.last_active);
            if let Some((&stale, _)) = stale {
                tracing::info!(agent = self.agent, sha256 = %stale, "forgetting the least recently active upload of a full table");
                self.uploads.remove(&stale);
            }
        }
        let mut have_bytes = self.store.partial_len(&sha256);
        if have_bytes > size_bytes {
            self.store.discard_partial(&sha256);
            have_bytes = 0;
        }
        let committing = have_bytes == size_bytes;
        self.uploads.insert(sha256, Incoming { size_bytes, last_active: self.activity, committing });
        if committing {
            // Every byte is here but was never committed (a restart mid-commit, a failed commit, another
            // connection delivering the same content): "resume at the end" would leave the agent nothing
            // to send and nothing to wait for. Verify and install it; the result answers.
            self.commit(sha256, size_bytes, true);
            return None;
        }
        encoded(&ControllerBlob::Resume { sha256, have_bytes })
    }

    /// Verifies and installs a complete partial file on the blocking pool, so the connection's other
    /// transfers go on meanwhile; [`BlobConn::committed`] answers.
    fn commit(&mut self, sha256: Sha256, size_bytes: u64, on_offer: bool) {
        let (store, commits) = (self.store.clone(), self.commits.clone());
        tokio::task::spawn_blocking(move || {
            let result = store.commit_partial(&sha256, size_bytes).map(drop);
            // Another connection may have committed the same content first (taking the partial file).
            let result = match result {
                Err(_) if store.size(&sha256) == Some(size_bytes) => Ok(()),
                other => other,
            };
            if result.is_err() && on_offer {
                store.discard_partial(&sha256);
            }
            let _ = commits.send(Commit { sha256, size_bytes, on_offer, result });
        });
    }

    fn committed(&mut self, Commit { sha256, size_bytes, on_offer, result }: Commit) -> Option<Vec<u8>> {
        match result {
            Ok(()) => {
                self.uploads.remove(&sha256);
                tracing::info!(agent = self.agent, %sha256, size_bytes, "stored an uploaded blob");
                encoded(&ControllerBlob::Stored { sha256 })
            }
            Err(e) if on_offer => {
                // The leftover bytes were bad or unreadable and are gone: the agent sends them all again.
                tracing::warn!(agent = self.agent, %sha256, error = %e, "a complete partial upload did not commit; asking for all of it again");
                if let Some(u) = self.uploads.get_mut(&sha256) {
                    u.committing = false;
                }
                encoded(&ControllerBlob::Resume { sha256, have_bytes: 0 })
            }
            Err(e) => {
                self.uploads.remove(&sha256);
                tracing::warn!(agent = self.agent, %sha256, error = %e, "cannot store an uploaded blob");
                encoded(&ControllerBlob::Refused { sha256, reason: e.to_string(), retryable: e.is_retryable() })
            }
        }
    }

    async fn receive(&mut self, chunk: BlobChunk) -> Option<Vec<u8>> {
        let sha256 = chunk.sha256;
        self.activity += 1;
        let Some(u) = self.uploads.get_mut(&sha256) else {
            let reason = "a chunk of a blob that was not offered on this connection".to_string();
            return encoded(&ControllerBlob::Refused { sha256, reason, retryable: true });
        };
        u.last_active = self.activity;
        if u.committing {
            // Sent before a rewind; every byte is here already.
            return None;
        }
        let size_bytes = u.size_bytes;
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
                return Ok(Written::Complete);
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
            Ok(Written::Complete) => {
                // Hashing a large blob takes a while: off this task, so the connection's other transfers go on.
                if let Some(u) = self.uploads.get_mut(&sha256) {
                    u.committing = true;
                }
                self.commit(sha256, size_bytes, false);
                None
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
    /// Every byte is in the partial file: it is committed next.
    Complete,
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
            tokio::spawn(serve(store.clone(), inbox_rx, bulk_tx, "test".into()));
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
        let blobs: Vec<Vec<u8>> = (0..=UPLOADS_MAX).map(|i| format!("blob {i}, two chunks").into_bytes()).collect();
        for data in &blobs {
            let sha = cosmos_cas::digest(data);
            conn.send(AgentBlob::Offer { sha256: sha, size_bytes: data.len() as u64 }).await;
            assert_eq!(conn.next().await, ControllerBlob::Resume { sha256: sha, have_bytes: 0 });
        }
        // The first was abandoned and forgotten; the second is still known and finishes.
        let first = cosmos_cas::digest(&blobs[0]);
        conn.send(AgentBlob::Chunk(BlobChunk::new(first, 0, blobs[0].clone()))).await;
        assert!(matches!(conn.next().await, ControllerBlob::Refused { retryable: true, .. }));
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
