//! The agent's transfer engine: fetches attempts' inputs from the controller
//! into this host's cache and delivers their outputs back, in bounded chunks.
//!
//! It runs as its own task beside the main loop, so bulk data never passes
//! through the loop that keeps heartbeats and cancels moving. The reader task
//! hands it the controller's blob frames directly; it sends its own frames to
//! the link's bulk queue, which the writer serves only when no control message
//! waits.
//!
//! Flow control: downloads are pulled (the agent requests each chunk) and
//! uploads are acknowledged chunk by chunk, so the agent alone bounds what is
//! in flight: [`MAX_BLOB_FRAMES_IN_FLIGHT_PER_BLOB`] chunks per blob and
//! [`MAX_BLOB_FRAMES_IN_FLIGHT_PER_CONN`] on the connection.
//!
//! Each download has a writer on the blocking pool: the engine checks a chunk's
//! checksum and order and hands its bytes over; the writer appends them to the
//! cache's partial file and feeds them to the blob's sha256 as it goes, so the
//! digest is known when the last byte lands (a resumed download hashes what is
//! already on disk first). The window counts bytes asked for and not yet
//! written, so a slow disk holds back requests and memory stays bounded.
//!
//! Failures: a chunk that fails its checksum is requested again from where the
//! good bytes end; a dropped link resumes every transfer from what is on disk
//! (the cache's partial file, the controller's partial length); a whole blob is
//! verified against its digest before use. A blob the controller does not hold
//! fails the attempt for good; everything else is retried.

use cosmos_cas::{CasError, Store};
use cosmos_proto::{
    AgentBlob, AttemptId, BLOB_CHUNK_BYTES, BlobChunk, ControllerBlob, MAX_BLOB_FRAMES_IN_FLIGHT_PER_BLOB,
    MAX_BLOB_FRAMES_IN_FLIGHT_PER_CONN, Sha256, encode_blob, encode_blob_chunk_into,
    spec::{ArtifactRef, InputArtifact},
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

pub use crate::core::StageFailure;

/// A transfer with frames in flight and no answer for this long is rewound and asked again.
pub const BLOB_STALL_TIMEOUT_MS: u64 = 15_000;
/// Whole-blob digest failures of one download before staging fails for good.
pub const DOWNLOAD_DIGEST_TRIES_MAX: u32 = 2;
/// Refusals of one upload the controller calls retryable before delivery fails.
pub const UPLOAD_TRIES_MAX: u32 = 3;
/// Default bound on the host cache: blobs no attempt directory links to and no
/// stage needs are removed, least recently used first, once the cache holds more.
/// An attempt's inputs leave its directory once its finish is acknowledged
/// ([`Command::Release`]).
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 256 << 30;
/// Blob frames from the controller waiting for the engine; the controller only
/// sends what was asked for, so more than this means it ignores the protocol.
pub const WIRE_INBOX_LEN: usize = 4 * MAX_BLOB_FRAMES_IN_FLIGHT_PER_CONN + 16;
/// How often stalled transfers are looked for.
const STALL_CHECK_MS: u64 = 1_000;
const CHUNK: u64 = BLOB_CHUNK_BYTES as u64;
const BLOB_WINDOW_BYTES: u64 = MAX_BLOB_FRAMES_IN_FLIGHT_PER_BLOB as u64 * CHUNK;
const CONN_WINDOW_BYTES: u64 = MAX_BLOB_FRAMES_IN_FLIGHT_PER_CONN as u64 * CHUNK;
/// Written chunks a download's hasher may lag behind its writer.
const HASH_QUEUE_LEN: usize = MAX_BLOB_FRAMES_IN_FLIGHT_PER_BLOB;

/// What the main loop asks of the engine.
#[derive(Debug)]
pub enum Command {
    /// Fetch these inputs and place them under `work_dir`; answered with [`Done::Staged`].
    Stage {
        /// Which attempt.
        attempt_id: AttemptId,
        /// The attempt's work directory.
        work_dir: PathBuf,
        /// What to place there.
        inputs: Vec<InputArtifact>,
    },
    /// Forget a stage; no answer follows. What was fetched stays cached.
    AbortStage {
        /// Which attempt.
        attempt_id: AttemptId,
    },
    /// Deliver these files of `work_dir` to the controller; answered with [`Done::Uploaded`].
    Upload {
        /// Which attempt.
        attempt_id: AttemptId,
        /// The attempt's work directory.
        work_dir: PathBuf,
        /// The files, with digests.
        outputs: Vec<ArtifactRef>,
    },
    /// Forget a delivery; no answer follows.
    AbortUpload {
        /// Which attempt.
        attempt_id: AttemptId,
    },
    /// The controller recorded the attempt's finish: the inputs placed for it
    /// leave its work directory (outputs and logs stay; the controller still
    /// holds the inputs), so the cache can evict them. No answer follows.
    Release {
        /// Which attempt.
        attempt_id: AttemptId,
    },
    /// A connection is up; blob frames go to `bulk`.
    LinkUp {
        /// The link writer's bulk queue (encoded frames).
        bulk: mpsc::Sender<Vec<u8>>,
    },
    /// The connection is gone; transfers wait for the next one and resume.
    LinkDown,
}

/// What the engine answers.
#[derive(Debug)]
pub enum Done {
    /// Every input is in the work directory, verified, or staging failed.
    Staged {
        /// Which attempt.
        attempt_id: AttemptId,
        /// How it went.
        result: Result<(), StageFailure>,
    },
    /// Every output is in the controller's store, or delivery failed.
    Uploaded {
        /// Which attempt.
        attempt_id: AttemptId,
        /// How it went.
        result: Result<(), String>,
    },
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The controller does not hold an input: no attempt can run until someone uploads it.
    #[error("input {sha256} is not available from the controller: {reason}")]
    Missing {
        /// Which blob.
        sha256: Sha256,
        /// The controller's words.
        reason: String,
    },
    /// The fetched bytes never matched their digest.
    #[error("input {sha256} did not match its digest after {tries} downloads; the controller's copy may be damaged")]
    Digest {
        /// Which blob.
        sha256: Sha256,
        /// Downloads tried.
        tries: u32,
    },
    /// The cache or the work directory failed.
    #[error(transparent)]
    Cache(#[from] CasError),
    /// The controller refused an upload.
    #[error("the controller refused output {sha256}: {reason}")]
    Refused {
        /// Which blob.
        sha256: Sha256,
        /// Its words.
        reason: String,
    },
    /// An output cannot be read.
    #[error("cannot read output {path}: {source}")]
    Output {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl TransferError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransferError::Missing { .. } | TransferError::Digest { .. } => false,
            TransferError::Cache(e) => e.is_retryable(),
            TransferError::Refused { .. } | TransferError::Output { .. } => true,
        }
    }
}

/// The engine's inputs, as the main loop and the link's reader hold them.
#[derive(Clone)]
pub struct Handle {
    /// From the main loop.
    pub commands: mpsc::UnboundedSender<Command>,
    /// From the reader task: the controller's blob frames (`try_send`; full means a broken peer).
    pub wire: mpsc::Sender<ControllerBlob>,
}

/// Starts the engine over `cache`; answers arrive on the returned receiver.
pub fn spawn(cache: Arc<Store>, cache_max_bytes: u64) -> (Handle, mpsc::UnboundedReceiver<Done>) {
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let (wire, wire_rx) = mpsc::channel(WIRE_INBOX_LEN);
    let (done, done_rx) = mpsc::unbounded_channel();
    let (bg, bg_rx) = mpsc::unbounded_channel();
    let engine = Engine {
        cache,
        cache_max_bytes,
        bulk: None,
        done,
        bg,
        downloads: BTreeMap::new(),
        writers: 0,
        verifying: BTreeSet::new(),
        verified: HashMap::new(),
        uses: Arc::new(Mutex::new(CacheUse::default())),
        evicting: Arc::new(Mutex::new(())),
        placed: HashMap::new(),
        stages: HashMap::new(),
        uploads: BTreeMap::new(),
        deliveries: HashMap::new(),
    };
    tokio::spawn(engine.run(commands_rx, wire_rx, bg_rx));
    (Handle { commands, wire }, done_rx)
}

struct Download {
    size: u64,
    /// Bytes accepted in order with good checksums, handed to the writer.
    end: u64,
    /// Bytes the writer has on disk and hashed; `end - written` wait for it.
    written: u64,
    /// Bytes asked for; `requested - end` are in flight, `requested - written` held in memory at most.
    requested: u64,
    /// Every byte is accepted: the writer finishes, checks the digest and installs the blob.
    committing: bool,
    /// Which writer's reports count (a refetch after a digest failure starts another).
    writer_id: u64,
    /// The writer's queue; dropped once every byte is accepted (the writer then commits) or
    /// with the download (the writer then stops, leaving the partial file to resume from).
    writer: Option<mpsc::UnboundedSender<Vec<u8>>>,
    digest_failures: u32,
    last_progress: Instant,
    /// Bytes received in this process, resends included (for the log).
    received_bytes: u64,
    corrupt_chunks: u32,
    started: Instant,
}

struct Stage {
    work_dir: PathBuf,
    inputs: Vec<InputArtifact>,
    pending: BTreeSet<Sha256>,
}

struct Upload {
    size: u64,
    file: Arc<std::fs::File>,
    path: PathBuf,
    acked: u64,
    sent: u64,
    /// Offered and waiting for the controller to say where to start.
    awaiting_resume: bool,
    refusals: u32,
    last_progress: Instant,
}

/// Results of blocking work.
enum Bg {
    /// A download's writer has this many bytes on disk.
    Wrote(Sha256, u64, u64),
    /// A download's writer finished: the blob is in the cache, or why not.
    Committed(Sha256, u64, Result<(), CasError>),
    Verified(Sha256, Option<SystemTime>),
    /// An attempt's inputs are placed (the links made, even when one failed).
    Placed(AttemptId, Result<(), CasError>, Vec<PlacedLink>),
}

/// An input placed in a work directory: removed at release only while it is still that file.
#[derive(Debug)]
struct PlacedLink {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// What eviction must know of the cache's use, shared with it (it runs off the engine).
#[derive(Default)]
struct CacheUse {
    /// Blobs that live stages need: never evicted. A stage pins its inputs
    /// before it looks for them in the cache, and eviction checks the pins
    /// under this lock as it removes each blob, so a blob found in the cache
    /// stays there until it is placed.
    pinned: BTreeSet<Sha256>,
    /// When each blob was last fetched or placed, in this process (older
    /// blobs count from their modification time, the time they were fetched).
    last_used: HashMap<Sha256, SystemTime>,
}

struct Engine {
    cache: Arc<Store>,
    cache_max_bytes: u64,
    bulk: Option<mpsc::Sender<Vec<u8>>>,
    done: mpsc::UnboundedSender<Done>,
    bg: mpsc::UnboundedSender<Bg>,
    downloads: BTreeMap<Sha256, Download>,
    /// Writers started so far (names the next one).
    writers: u64,
    /// Cached blobs being re-hashed before use.
    verifying: BTreeSet<Sha256>,
    /// Cached blobs known good, with the modification time they had then: a
    /// blob whose time has not moved is used without hashing it again.
    verified: HashMap<Sha256, SystemTime>,
    /// Pins and last uses, for eviction.
    uses: Arc<Mutex<CacheUse>>,
    /// Held by the running eviction: one at a time.
    evicting: Arc<Mutex<()>>,
    /// Inputs placed for each attempt, until it is released.
    placed: HashMap<AttemptId, Vec<PlacedLink>>,
    stages: HashMap<AttemptId, Stage>,
    uploads: BTreeMap<Sha256, Upload>,
    /// Outputs each delivering attempt waits for.
    deliveries: HashMap<AttemptId, BTreeSet<Sha256>>,
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Engine {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut wire: mpsc::Receiver<ControllerBlob>,
        mut bg: mpsc::UnboundedReceiver<Bg>,
    ) {
        let mut stall = tokio::time::interval(Duration::from_millis(STALL_CHECK_MS));
        stall.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => return,
                },
                Some(blob) = wire.recv() => self.from_controller(blob).await,
                Some(result) = bg.recv() => self.background(result).await,
                _ = stall.tick() => self.unstall().await,
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Stage { attempt_id, work_dir, inputs } => {
                let pending: BTreeSet<Sha256> = inputs.iter().map(|i| i.sha256).collect();
                let needs: BTreeMap<Sha256, u64> = inputs.iter().map(|i| (i.sha256, i.size_bytes)).collect();
                self.stages.insert(attempt_id, Stage { work_dir, inputs, pending });
                self.pin();
                if needs.is_empty() {
                    self.place(attempt_id);
                }
                for (sha256, size) in needs {
                    self.need(sha256, size);
                }
                self.pump().await;
            }
            Command::AbortStage { attempt_id } => {
                self.stages.remove(&attempt_id);
                self.pin();
                // Downloads nobody waits for stop asking; their partial files stay for the next try.
                let wanted: BTreeSet<Sha256> = self.stages.values().flat_map(|s| s.pending.iter().copied()).collect();
                self.downloads.retain(|sha, d| d.committing || wanted.contains(sha));
            }
            Command::Upload { attempt_id, work_dir, outputs } => {
                let mut pending = BTreeSet::new();
                for o in outputs {
                    pending.insert(o.sha256);
                    if self.uploads.contains_key(&o.sha256) {
                        continue;
                    }
                    let path = work_dir.join(&o.path);
                    match std::fs::File::open(&path) {
                        Ok(file) => {
                            let upload = Upload {
                                size: o.size_bytes,
                                file: Arc::new(file),
                                path,
                                acked: 0,
                                sent: 0,
                                awaiting_resume: true,
                                refusals: 0,
                                last_progress: Instant::now(),
                            };
                            self.uploads.insert(o.sha256, upload);
                            self.send(&AgentBlob::Offer { sha256: o.sha256, size_bytes: o.size_bytes }).await;
                        }
                        Err(source) => {
                            let e = TransferError::Output { path, source };
                            let _ = self.done.send(Done::Uploaded { attempt_id, result: Err(e.to_string()) });
                            return;
                        }
                    }
                }
                if pending.is_empty() {
                    let _ = self.done.send(Done::Uploaded { attempt_id, result: Ok(()) });
                } else {
                    self.deliveries.insert(attempt_id, pending);
                }
            }
            Command::AbortUpload { attempt_id } => {
                self.deliveries.remove(&attempt_id);
                let wanted: BTreeSet<Sha256> = self.deliveries.values().flat_map(|s| s.iter().copied()).collect();
                self.uploads.retain(|sha, _| wanted.contains(sha));
            }
            Command::Release { attempt_id } => {
                if let Some(links) = self.placed.remove(&attempt_id) {
                    self.release(links);
                }
            }
            Command::LinkUp { bulk } => {
                self.bulk = Some(bulk);
                for (sha256, d) in &self.downloads {
                    if d.end > 0 && !d.committing {
                        tracing::info!(%sha256, resume_at_bytes = d.end, size_bytes = d.size, "resuming an input download");
                    }
                }
                let offers: Vec<(Sha256, u64)> = self.uploads.iter().map(|(s, u)| (*s, u.size)).collect();
                for (sha256, size_bytes) in offers {
                    self.send(&AgentBlob::Offer { sha256, size_bytes }).await;
                }
                self.pump().await;
            }
            Command::LinkDown => self.link_down(),
        }
    }

    /// Everything in flight is lost with the link: resume from what is on disk.
    fn link_down(&mut self) {
        self.bulk = None;
        for d in self.downloads.values_mut() {
            d.requested = d.end;
        }
        for u in self.uploads.values_mut() {
            u.awaiting_resume = true;
            u.sent = u.acked;
        }
    }

    /// Makes `sha256` available in the cache: at once, after a re-hash, or after a download.
    fn need(&mut self, sha256: Sha256, size: u64) {
        if self.downloads.contains_key(&sha256) || self.verifying.contains(&sha256) {
            return;
        }
        if self.cache.size(&sha256) == Some(size) {
            let path = self.cache.path(&sha256);
            let now = mtime(&path);
            if now.is_some() && self.verified.get(&sha256) == now.as_ref() {
                self.ready(sha256);
                return;
            }
            // Not hashed by this process, or touched since: it may have been written through an attempt's link.
            self.verifying.insert(sha256);
            let (cache, bg) = (self.cache.clone(), self.bg.clone());
            tokio::task::spawn_blocking(move || {
                let good = matches!(cache.verify(&sha256), Ok(true));
                let _ = bg.send(Bg::Verified(sha256, good.then(|| mtime(&cache.path(&sha256))).flatten()));
            });
            return;
        }
        if size == 0 {
            match self.cache.put_bytes(&[]) {
                Ok(_) => self.ready(sha256),
                Err(e) => self.fail(sha256, TransferError::Cache(e)),
            }
            return;
        }
        let mut end = self.cache.partial_len(&sha256);
        if end > size {
            self.cache.discard_partial(&sha256);
            end = 0;
        }
        if end > 0 {
            tracing::info!(%sha256, resume_at_bytes = end, size_bytes = size, "resuming an input download");
        }
        let now = Instant::now();
        let (writer_id, writer) = self.start_writer(sha256, end, size);
        self.downloads.insert(
            sha256,
            Download {
                size,
                end,
                written: end,
                requested: end,
                // All there already: the writer only hashes it and commits.
                committing: end == size,
                writer_id,
                writer: (end < size).then_some(writer),
                digest_failures: 0,
                last_progress: now,
                received_bytes: 0,
                corrupt_chunks: 0,
                started: now,
            },
        );
    }

    /// Starts the writer of a download whose partial file holds `start` bytes:
    /// it hashes those, then appends and hashes what it is sent; when its queue
    /// closes with all `size` bytes written it checks the digest and installs
    /// the blob, otherwise it just stops (the partial file stays for a resume).
    fn start_writer(&mut self, sha256: Sha256, start: u64, size: u64) -> (u64, mpsc::UnboundedSender<Vec<u8>>) {
        self.writers += 1;
        let id = self.writers;
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (cache, bg) = (self.cache.clone(), self.bg.clone());
        tokio::task::spawn_blocking(move || {
            let result = (|| -> Result<bool, CasError> {
                let (mut w, mut h) = cache.partial_writer(&sha256, start)?;
                // Hashing runs beside writing, a few chunks behind at most.
                let (to_hasher, hashing) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(HASH_QUEUE_LEN);
                let hasher = std::thread::Builder::new()
                    .name("blob-hasher".into())
                    .spawn(move || {
                        for data in hashing {
                            h.update(&data);
                        }
                        h
                    })
                    .map_err(|source| CasError::Io {
                        context: "cannot start hashing",
                        path: cache.partial_path(&sha256),
                        source,
                    })?;
                let mut failed = None;
                while let Some(data) = rx.blocking_recv() {
                    let data = Arc::new(data);
                    let _ = to_hasher.send(data.clone());
                    match w.append(&data) {
                        Ok(len) => drop(bg.send(Bg::Wrote(sha256, id, len))),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                drop(to_hasher);
                let h = hasher.join().map_err(|_| CasError::Io {
                    context: "hashing failed for",
                    path: cache.partial_path(&sha256),
                    source: std::io::Error::other("the hashing thread panicked"),
                })?;
                if let Some(e) = failed {
                    return Err(e);
                }
                if w.len() < size {
                    return Ok(false);
                }
                cache.commit_written(w, h, size).map(|_| true)
            })();
            match result {
                Ok(false) => {}
                Ok(true) => drop(bg.send(Bg::Committed(sha256, id, Ok(())))),
                Err(e) => drop(bg.send(Bg::Committed(sha256, id, Err(e)))),
            }
        });
        (id, tx)
    }

    fn in_flight_bytes(&self) -> u64 {
        let down: u64 = self.downloads.values().map(|d| d.requested - d.written).sum();
        let up: u64 = self.uploads.values().map(|u| u.sent - u.acked).sum();
        down + up
    }

    /// Sends requests and upload chunks while the windows allow.
    async fn pump(&mut self) {
        if self.bulk.is_none() {
            return;
        }
        let mut in_flight = self.in_flight_bytes();
        let mut frames = Vec::new();
        for (sha256, d) in self.downloads.iter_mut() {
            while !d.committing
                && d.requested < d.size
                && d.requested - d.written < BLOB_WINDOW_BYTES
                && in_flight < CONN_WINDOW_BYTES
            {
                let len = CHUNK.min(d.size - d.requested);
                frames.push(encode_blob(&AgentBlob::Request {
                    sha256: *sha256,
                    offset: d.requested,
                    len_bytes: len as u32,
                }));
                if d.requested == d.end {
                    d.last_progress = Instant::now();
                }
                d.requested += len;
                in_flight += len;
            }
        }
        for (sha256, u) in self.uploads.iter_mut() {
            while !u.awaiting_resume
                && u.sent < u.size
                && u.sent - u.acked < BLOB_WINDOW_BYTES
                && in_flight < CONN_WINDOW_BYTES
            {
                let len = CHUNK.min(u.size - u.sent) as usize;
                // A megabyte at most, from the page cache: cheap enough to read here.
                let data = match cosmos_cas::read_range(&u.file, u.sent, len) {
                    Ok(data) if data.len() == len => data,
                    Ok(_) | Err(_) => {
                        // The file shrank or vanished; the controller's digest check would refuse it anyway.
                        tracing::warn!(path = %u.path.display(), "an output changed while it was being delivered");
                        u.awaiting_resume = true;
                        break;
                    }
                };
                let mut payload = Vec::with_capacity(len + 64);
                let chunk = AgentBlob::Chunk(BlobChunk::new(*sha256, u.sent, data));
                frames.push(encode_blob_chunk_into(&chunk, &mut payload).map(|()| payload));
                if u.sent == u.acked {
                    u.last_progress = Instant::now();
                }
                u.sent += len as u64;
                in_flight += len as u64;
            }
        }
        for frame in frames {
            match frame {
                Ok(payload) => self.send_payload(payload).await,
                Err(e) => tracing::error!(error = %e, "cannot encode a blob frame"),
            }
        }
    }

    async fn send(&mut self, blob: &AgentBlob) {
        match encode_blob(blob) {
            Ok(payload) => self.send_payload(payload).await,
            Err(e) => tracing::error!(error = %e, "cannot encode a blob frame"),
        }
    }

    async fn send_payload(&mut self, payload: Vec<u8>) {
        let Some(bulk) = &self.bulk else { return };
        if bulk.send(payload).await.is_err() {
            // The writer is gone; the main loop says LinkDown too, and LinkUp resumes everything.
            self.link_down();
        }
    }

    async fn from_controller(&mut self, blob: ControllerBlob) {
        match blob {
            ControllerBlob::Chunk(chunk) => self.chunk(chunk).await,
            ControllerBlob::Missing { sha256, reason } => {
                if self.downloads.remove(&sha256).is_some() {
                    self.fail(sha256, TransferError::Missing { sha256, reason });
                }
            }
            ControllerBlob::Resume { sha256, have_bytes } => {
                if let Some(u) = self.uploads.get_mut(&sha256) {
                    // After a cut, or a restart with bytes already at the controller.
                    if have_bytes > 0 && (u.awaiting_resume || (u.acked == 0 && u.sent == 0)) {
                        tracing::info!(%sha256, resume_at_bytes = have_bytes, "resuming an output upload");
                    }
                    u.acked = have_bytes.min(u.size);
                    u.sent = u.acked;
                    u.awaiting_resume = false;
                    u.last_progress = Instant::now();
                }
                self.pump().await;
            }
            ControllerBlob::Ack { sha256, have_bytes } => {
                if let Some(u) = self.uploads.get_mut(&sha256) {
                    if have_bytes > u.acked && have_bytes <= u.sent {
                        u.acked = have_bytes;
                        u.last_progress = Instant::now();
                    }
                }
                self.pump().await;
            }
            ControllerBlob::Stored { sha256 } => {
                if self.uploads.remove(&sha256).is_none() {
                    return;
                }
                let mut finished = Vec::new();
                for (attempt_id, pending) in self.deliveries.iter_mut() {
                    if pending.remove(&sha256) && pending.is_empty() {
                        finished.push(*attempt_id);
                    }
                }
                for attempt_id in finished {
                    self.deliveries.remove(&attempt_id);
                    let _ = self.done.send(Done::Uploaded { attempt_id, result: Ok(()) });
                }
                self.pump().await;
            }
            ControllerBlob::Refused { sha256, reason, retryable } => {
                let Some(u) = self.uploads.get_mut(&sha256) else { return };
                if retryable && u.awaiting_resume {
                    // Chunks that were in flight when the controller forgot the upload, each refused in
                    // turn, or a refusal before the answer to the offer: one refusal per offer counts
                    // (should the offer itself go unanswered, the stall check offers again).
                    return;
                }
                u.refusals += 1;
                if retryable && u.refusals < UPLOAD_TRIES_MAX {
                    tracing::warn!(%sha256, %reason, "the controller refused an output; offering it again");
                    u.awaiting_resume = true;
                    u.sent = u.acked;
                    let size_bytes = u.size;
                    self.send(&AgentBlob::Offer { sha256, size_bytes }).await;
                    return;
                }
                self.uploads.remove(&sha256);
                let e = TransferError::Refused { sha256, reason };
                let failed: Vec<AttemptId> =
                    self.deliveries.iter().filter(|(_, p)| p.contains(&sha256)).map(|(a, _)| *a).collect();
                for attempt_id in failed {
                    self.deliveries.remove(&attempt_id);
                    let _ = self.done.send(Done::Uploaded { attempt_id, result: Err(e.to_string()) });
                }
                self.pump().await;
            }
        }
    }

    async fn chunk(&mut self, chunk: BlobChunk) {
        let sha256 = chunk.sha256;
        let Some(d) = self.downloads.get_mut(&sha256) else { return };
        // Only the piece that continues the good bytes counts; others were asked for before a rewind.
        if d.committing || chunk.offset != d.end {
            return;
        }
        d.received_bytes += chunk.data.len() as u64;
        if !chunk.is_intact() || chunk.data.is_empty() || chunk.offset + chunk.data.len() as u64 > d.size {
            d.corrupt_chunks += 1;
            tracing::warn!(%sha256, offset = chunk.offset, "an input chunk failed its checksum; fetching it again");
            d.requested = d.end;
            self.pump().await;
            return;
        }
        let len = chunk.data.len() as u64;
        // A writer that is gone failed: its report (on its way) fails the download.
        if !d.writer.as_ref().is_some_and(|w| w.send(chunk.data).is_ok()) {
            return;
        }
        d.end += len;
        d.requested = d.requested.max(d.end);
        d.last_progress = Instant::now();
        if d.end == d.size {
            // Closing the queue tells the writer that all is there: it verifies and installs.
            d.committing = true;
            d.writer = None;
        }
    }

    async fn background(&mut self, result: Bg) {
        match result {
            Bg::Wrote(sha256, id, len) => {
                let Some(d) = self.downloads.get_mut(&sha256).filter(|d| d.writer_id == id) else { return };
                d.written = len;
                self.pump().await;
            }
            Bg::Committed(sha256, id, result) => {
                let Some(d) = self.downloads.get_mut(&sha256).filter(|d| d.writer_id == id) else { return };
                match result {
                    Ok(()) => {
                        let secs = d.started.elapsed().as_secs_f64().max(1e-6);
                        tracing::info!(
                            %sha256,
                            size_bytes = d.size,
                            received_bytes = d.received_bytes,
                            corrupt_chunks = d.corrupt_chunks,
                            mb_per_s = (d.received_bytes as f64 / 1e6 / secs).round(),
                            "fetched an input into the cache"
                        );
                        self.downloads.remove(&sha256);
                        if let Some(t) = mtime(&self.cache.path(&sha256)) {
                            self.verified.insert(sha256, t);
                        }
                        self.uses().last_used.insert(sha256, SystemTime::now());
                        self.ready(sha256);
                        self.evict();
                    }
                    Err(e @ CasError::DigestMismatch { .. }) if d.digest_failures + 1 < DOWNLOAD_DIGEST_TRIES_MAX => {
                        tracing::warn!(%sha256, error = %e, "a fetched input failed its digest; fetching it again");
                        d.digest_failures += 1;
                        d.committing = false;
                        d.end = 0;
                        d.written = 0;
                        d.requested = 0;
                        // The writer removed the partial file: the next one starts from nothing.
                        let size = d.size;
                        let (writer_id, writer) = self.start_writer(sha256, 0, size);
                        if let Some(d) = self.downloads.get_mut(&sha256) {
                            d.writer_id = writer_id;
                            d.writer = Some(writer);
                        }
                    }
                    Err(CasError::DigestMismatch { .. }) => {
                        let tries = d.digest_failures + 1;
                        self.downloads.remove(&sha256);
                        self.fail(sha256, TransferError::Digest { sha256, tries });
                    }
                    Err(e) => {
                        self.downloads.remove(&sha256);
                        self.fail(sha256, TransferError::Cache(e));
                    }
                }
                self.pump().await;
            }
            Bg::Verified(sha256, good) => {
                self.verifying.remove(&sha256);
                match good {
                    Some(t) => {
                        self.verified.insert(sha256, t);
                        self.ready(sha256);
                    }
                    None => {
                        tracing::warn!(%sha256, "a cached input no longer matches its digest; fetching it again");
                        self.verified.remove(&sha256);
                        let size = self
                            .stages
                            .values()
                            .flat_map(|s| s.inputs.iter())
                            .find(|i| i.sha256 == sha256)
                            .map(|i| i.size_bytes);
                        if let Some(size) = size {
                            self.need(sha256, size);
                        }
                        self.pump().await;
                    }
                }
            }
            Bg::Placed(attempt_id, result, links) => {
                if self.stages.remove(&attempt_id).is_none() {
                    // Aborted meanwhile: the attempt never runs with them.
                    self.release(links);
                    return;
                }
                self.pin();
                self.placed.entry(attempt_id).or_default().extend(links);
                let result = result.map_err(|e| {
                    let e = TransferError::Cache(e);
                    StageFailure { reason: e.to_string(), retryable: e.is_retryable() }
                });
                let _ = self.done.send(Done::Staged { attempt_id, result });
            }
        }
    }

    /// `sha256` is in the cache and good: stages waiting only for it get placed.
    fn ready(&mut self, sha256: Sha256) {
        let mut complete = Vec::new();
        for (attempt_id, stage) in self.stages.iter_mut() {
            if stage.pending.remove(&sha256) && stage.pending.is_empty() {
                complete.push(*attempt_id);
            }
        }
        for attempt_id in complete {
            self.place(attempt_id);
        }
    }

    /// Links (or copies, across filesystems) every input into the work directory, off the engine's task.
    fn place(&mut self, attempt_id: AttemptId) {
        let Some(stage) = self.stages.get(&attempt_id) else { return };
        let (cache, bg, work_dir, inputs) =
            (self.cache.clone(), self.bg.clone(), stage.work_dir.clone(), stage.inputs.clone());
        {
            let now = SystemTime::now();
            let mut uses = self.uses();
            for i in &inputs {
                uses.last_used.insert(i.sha256, now);
            }
        }
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            let mut links = Vec::new();
            let result = inputs.iter().try_for_each(|i| {
                let path = work_dir.join(&i.path);
                cache.place(&i.sha256, &path)?;
                if let Ok(m) = std::fs::symlink_metadata(&path) {
                    links.push(PlacedLink { path, dev: m.dev(), ino: m.ino() });
                }
                Ok(())
            });
            let _ = bg.send(Bg::Placed(attempt_id, result, links));
        });
    }

    /// `sha256` cannot be had: every stage waiting for it fails.
    fn fail(&mut self, sha256: Sha256, e: TransferError) {
        tracing::warn!(%sha256, error = %e, retryable = e.is_retryable(), "staging an input failed");
        let failure = StageFailure { reason: e.to_string(), retryable: e.is_retryable() };
        let failed: Vec<AttemptId> =
            self.stages.iter().filter(|(_, s)| s.pending.contains(&sha256)).map(|(a, _)| *a).collect();
        for attempt_id in failed {
            self.stages.remove(&attempt_id);
            let _ = self.done.send(Done::Staged { attempt_id, result: Err(failure.clone()) });
        }
        self.pin();
    }

    /// Transfers with frames out and no answer for too long are asked again from where they stand.
    async fn unstall(&mut self) {
        if self.bulk.is_none() {
            return;
        }
        let stalled = |last: Instant| last.elapsed() >= Duration::from_millis(BLOB_STALL_TIMEOUT_MS);
        let mut offers = Vec::new();
        for (sha256, d) in self.downloads.iter_mut() {
            if !d.committing && d.requested > d.end && stalled(d.last_progress) {
                tracing::warn!(%sha256, at_bytes = d.end, "an input download stalled; asking again");
                d.requested = d.end;
                d.last_progress = Instant::now();
            }
        }
        for (sha256, u) in self.uploads.iter_mut() {
            // All acknowledged and still not stored is waiting too: the controller's commit may have failed unsaid.
            let waiting = u.awaiting_resume || u.sent > u.acked || u.acked == u.size;
            if waiting && stalled(u.last_progress) {
                tracing::warn!(%sha256, at_bytes = u.acked, "an output upload stalled; offering it again");
                u.awaiting_resume = true;
                u.sent = u.acked;
                u.last_progress = Instant::now();
                offers.push((*sha256, u.size));
            }
        }
        for (sha256, size_bytes) in offers {
            self.send(&AgentBlob::Offer { sha256, size_bytes }).await;
        }
        self.pump().await;
    }

    fn uses(&self) -> std::sync::MutexGuard<'_, CacheUse> {
        self.uses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins exactly the inputs of live stages.
    fn pin(&mut self) {
        let pinned = self.stages.values().flat_map(|s| s.inputs.iter().map(|i| i.sha256)).collect();
        self.uses().pinned = pinned;
    }

    /// Keeps the cache under its bound, off the engine's task (see [`evict`]).
    fn evict(&mut self) {
        self.release(Vec::new());
    }

    /// Removes placed inputs from their work directory (those still the file
    /// placed there: a job may have replaced one), then evicts what that freed.
    fn release(&mut self, links: Vec<PlacedLink>) {
        let (cache, max, uses, evicting) =
            (self.cache.clone(), self.cache_max_bytes, self.uses.clone(), self.evicting.clone());
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            for l in links {
                let same = std::fs::symlink_metadata(&l.path).is_ok_and(|m| m.dev() == l.dev && m.ino() == l.ino);
                if same {
                    let _ = std::fs::remove_file(&l.path);
                }
            }
            let _one_at_a_time = evicting.lock().unwrap_or_else(|e| e.into_inner());
            evict(&cache, max, &uses);
        });
    }
}

/// Removes blobs that only the cache links to (removing them frees space) and
/// no stage needs, least recently used first, until the cache holds at most
/// `max_bytes`; returns the bytes freed.
fn evict(cache: &Store, max_bytes: u64, uses: &Mutex<CacheUse>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let lock = || uses.lock().unwrap_or_else(|e| e.into_inner());
    let mut total = 0u64;
    let mut candidates = Vec::new();
    let Ok(shards) = std::fs::read_dir(cache.root().join("sha256")) else { return 0 };
    for shard in shards.flatten() {
        let Ok(files) = std::fs::read_dir(shard.path()) else { continue };
        for f in files.flatten() {
            let Ok(meta) = f.metadata() else { continue };
            total += meta.len();
            let sha: Option<Sha256> = f.file_name().to_str().and_then(|n| n.parse().ok());
            if let Some(sha) = sha.filter(|_| meta.nlink() == 1) {
                candidates.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), sha, f.path()));
            }
        }
    }
    if total <= max_bytes {
        return 0;
    }
    {
        let uses = lock();
        for c in &mut candidates {
            if let Some(&t) = uses.last_used.get(&c.2) {
                c.0 = t;
            }
        }
    }
    candidates.sort();
    let mut freed = 0u64;
    for (_, len, sha, path) in candidates {
        if total - freed <= max_bytes {
            break;
        }
        // Checked and removed under the lock: a stage that pinned it meanwhile keeps it.
        let mut uses = lock();
        if uses.pinned.contains(&sha) {
            continue;
        }
        let still_unlinked = std::fs::metadata(&path).is_ok_and(|m| m.nlink() == 1);
        if still_unlinked && std::fs::remove_file(&path).is_ok() {
            uses.last_used.remove(&sha);
            drop(uses);
            tracing::info!(%sha, size_bytes = len, "evicted a cached input");
            freed += len;
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosmos_proto::AgentFrame;

    const SIZE: usize = 1000;

    /// An engine over a fresh cache, fed by a controller that serves `blobs`' requests.
    struct Rig {
        _dir: tempfile::TempDir,
        root: PathBuf,
        cache: Arc<Store>,
        controller: Arc<Store>,
        engine: Handle,
        done: mpsc::UnboundedReceiver<Done>,
    }

    impl Rig {
        async fn new(cache_max_bytes: u64) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            let cache = Arc::new(Store::open(root.join("cache")).unwrap());
            let controller = Arc::new(Store::open(root.join("controller")).unwrap());
            let (engine, done) = spawn(cache.clone(), cache_max_bytes);
            let (bulk, mut bulk_rx) = mpsc::channel::<Vec<u8>>(4);
            let (store, wire) = (controller.clone(), engine.wire.clone());
            tokio::spawn(async move {
                while let Some(payload) = bulk_rx.recv().await {
                    if let Ok(AgentFrame::Blob(AgentBlob::Request { sha256, offset, len_bytes })) =
                        AgentFrame::decode(&payload)
                    {
                        let data = store.read_at(&sha256, offset, len_bytes as usize).unwrap();
                        let _ = wire.send(ControllerBlob::Chunk(BlobChunk::new(sha256, offset, data))).await;
                    }
                }
            });
            engine.commands.send(Command::LinkUp { bulk }).unwrap();
            Rig { _dir: dir, root, cache, controller, engine, done }
        }

        fn blob(&self, seed: u8) -> Sha256 {
            let data: Vec<u8> = (0..SIZE).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect();
            self.controller.put_bytes(&data).unwrap().0
        }

        fn work_dir(&self, attempt: u64) -> PathBuf {
            self.root.join(format!("attempts/{attempt}/work"))
        }

        async fn stage(&mut self, attempt: u64, sha256: Sha256) {
            let attempt_id = AttemptId(attempt);
            let inputs = vec![InputArtifact { sha256, size_bytes: SIZE as u64, path: "inputs/video.mp4".into() }];
            let work_dir = self.work_dir(attempt);
            self.engine.commands.send(Command::Stage { attempt_id, work_dir, inputs }).unwrap();
            match tokio::time::timeout(Duration::from_secs(10), self.done.recv()).await.unwrap().unwrap() {
                Done::Staged { attempt_id: a, result: Ok(()) } if a == attempt_id => {}
                other => panic!("{other:?}"),
            }
            assert!(self.work_dir(attempt).join("inputs/video.mp4").exists());
        }

        fn release(&self, attempt: u64) {
            self.engine.commands.send(Command::Release { attempt_id: AttemptId(attempt) }).unwrap();
        }

        fn cached(&self, sha256: &Sha256) -> bool {
            self.cache.size(sha256).is_some()
        }

        /// Waits until `sha256` leaves the cache.
        async fn evicted(&self, sha256: &Sha256) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.cached(sha256) {
                assert!(Instant::now() < deadline, "{sha256} was never evicted");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        /// Lets the engine and its blocking work settle.
        async fn settle(&self) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test]
    async fn released_inputs_are_evicted_once_the_cache_is_over_its_bound() {
        let mut rig = Rig::new(SIZE as u64 * 3 / 2).await;
        let (a, b) = (rig.blob(3), rig.blob(5));
        rig.stage(1, a).await;
        std::fs::write(rig.work_dir(1).join("output.txt"), b"result").unwrap();
        rig.stage(2, b).await;
        rig.settle().await;
        // Over the bound, but both are in attempt directories: removing either would free nothing.
        assert!(rig.cached(&a) && rig.cached(&b));

        rig.release(1);
        rig.evicted(&a).await;
        assert!(rig.cached(&b), "the newer input stays");
        assert!(!rig.work_dir(1).join("inputs/video.mp4").exists(), "the released input left the work directory");
        assert!(rig.work_dir(1).join("output.txt").exists(), "outputs stay");
        assert!(rig.work_dir(2).join("inputs/video.mp4").exists(), "unreleased inputs stay");

        rig.release(2);
        rig.settle().await;
        assert!(rig.cached(&b), "under the bound, released inputs stay cached");
    }

    #[tokio::test]
    async fn eviction_takes_the_least_recently_used_not_the_oldest_fetched() {
        let mut rig = Rig::new(SIZE as u64 * 5 / 2).await;
        let (a, b, c) = (rig.blob(3), rig.blob(5), rig.blob(7));
        rig.stage(1, a).await;
        rig.stage(2, b).await;
        rig.release(1);
        rig.release(2);
        // `a` was fetched first but is used again, from the cache.
        rig.stage(3, a).await;
        rig.release(3);
        rig.settle().await;
        assert!(rig.cached(&a) && rig.cached(&b));
        rig.stage(4, c).await;
        rig.evicted(&b).await;
        assert!(rig.cached(&a) && rig.cached(&c));
    }

    #[tokio::test]
    async fn a_pinned_blob_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Store::open(dir.path()).unwrap();
        let (a, _) = cache.put_bytes(b"needed by a stage").unwrap();
        let (b, _) = cache.put_bytes(b"needed by nobody").unwrap();
        let uses = Mutex::new(CacheUse::default());
        uses.lock().unwrap().pinned.insert(a);
        assert_eq!(evict(&cache, 0, &uses), b"needed by nobody".len() as u64);
        assert!(cache.size(&a).is_some());
        assert!(cache.size(&b).is_none());
    }
}
