//! The agent's blob engine: fetches attempts' inputs from the controller into
//! this host's cache and delivers their outputs back, in bounded chunks.
//!
//! It runs as its own task beside the main loop, so bulk data never passes
//! through the loop that keeps heartbeats and cancels moving. The reader task
//! hands it the controller's blob frames directly; it sends its own frames to
//! the link's bulk queue, which the writer serves only when no control message
//! waits.
//!
//! Every protocol decision (windows, stall rewinds, resume offsets, retry
//! budgets, which stage waits for which blob) is [`machine::Flow`]'s, a state
//! machine with no I/O that the simulator drives too. This shell does the file
//! work it asks for and feeds the results back: cache look-ups and re-hashes,
//! one writer per download on the blocking pool (it appends accepted chunks to
//! the cache's partial file and feeds the blob's sha256 as it goes, so the
//! digest is known when the last byte lands), reading upload chunks, placing
//! inputs into work directories, and keeping the cache under its bound.

pub use cosmos_agent_core::blobs::machine;

use cosmos_cas::{CasError, Store};
use cosmos_proto::Classify;
use cosmos_proto::{
    AgentBlob, AttemptId, BLOB_FRAMES_IN_FLIGHT_PER_BLOB_MAX, BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX, BlobChunk,
    ControllerBlob, Sha256, encode_blob, encode_blob_chunk_into,
    spec::{ArtifactRef, InputArtifact},
};
pub use machine::{BLOB_STALL_TIMEOUT_MS, DOWNLOAD_DIGEST_TRIES_MAX, UPLOAD_TRIES_MAX};
use machine::{Commit, Event, Flow, FlowError, Resolution, Transmit};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

pub use crate::core::StageFailure;

/// Default bound on the host cache: blobs no attempt directory links to and no
/// stage needs are removed, least recently used first, once the cache holds more.
/// An attempt's inputs leave its directory once its finish is acknowledged
/// ([`Command::Release`]).
pub const CACHE_BYTES_MAX_DEFAULT: u64 = 256 << 30;
/// Blob frames from the controller waiting for the engine; the controller only
/// sends what was asked for, so more than this means it ignores the protocol.
pub const WIRE_INBOX_LEN: usize = 4 * BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX + 16;
/// Written chunks a download's hasher may lag behind its writer.
const HASH_QUEUE_LEN: usize = BLOB_FRAMES_IN_FLIGHT_PER_BLOB_MAX;
/// How long the engine sleeps when the machine names no deadline (it wakes on any input anyway).
const IDLE_WAKE_MS: u64 = 60_000;

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

/// Why moving a blob failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The protocol gave up (missing at the controller, digest, refusal).
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The cache or the work directory failed.
    #[error(transparent)]
    Cache(#[from] CasError),
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

impl BlobError {
    fn stage_failure(&self) -> StageFailure {
        StageFailure { reason: self.to_string(), retry: self.retry() }
    }
}

impl cosmos_proto::Classify for BlobError {
    /// Whether another attempt may succeed.
    fn retry(&self) -> cosmos_proto::Retry {
        cosmos_proto::Retry::when(match self {
            BlobError::Flow(e) => e.is_retryable(),
            BlobError::Cache(e) => e.is_retryable(),
            BlobError::Output { .. } => true,
        })
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
        flow: Flow::new(),
        epoch: Instant::now(),
        cache,
        cache_max_bytes,
        bulk: None,
        done,
        bg,
        writers: HashMap::new(),
        writers_started: 0,
        sizes: HashMap::new(),
        verified: HashMap::new(),
        uses: Arc::new(Mutex::new(CacheUse::default())),
        evicting: Arc::new(Mutex::new(())),
        placed: HashMap::new(),
        stages: HashMap::new(),
        files: HashMap::new(),
        progress: HashMap::new(),
    };
    tokio::spawn(engine.run(commands_rx, wire_rx, bg_rx));
    (Handle { commands, wire }, done_rx)
}

/// A download's writer on the blocking pool.
struct Writer {
    /// Which writer's reports count (a refetch after a digest failure starts another).
    id: u64,
    /// Its queue; dropped once every byte is accepted (the writer then commits) or
    /// with the download (the writer then stops, leaving the partial file to resume from).
    queue: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

/// For the log line of a finished download.
struct Progress {
    started: Instant,
    /// Bytes received in this process, resends included.
    received_bytes: u64,
    corrupt_chunks: u32,
}

struct Stage {
    work_dir: PathBuf,
    inputs: Vec<InputArtifact>,
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
    flow: Flow,
    /// The machine's clock counts milliseconds from here.
    epoch: Instant,
    cache: Arc<Store>,
    cache_max_bytes: u64,
    bulk: Option<mpsc::Sender<Vec<u8>>>,
    done: mpsc::UnboundedSender<Done>,
    bg: mpsc::UnboundedSender<Bg>,
    writers: HashMap<Sha256, Writer>,
    /// Writers started so far (names the next one).
    writers_started: u64,
    /// Sizes of blobs being looked up or fetched.
    sizes: HashMap<Sha256, u64>,
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
    /// Open outputs being uploaded, by digest.
    files: HashMap<Sha256, (Arc<std::fs::File>, PathBuf)>,
    progress: HashMap<Sha256, Progress>,
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Engine {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut wire: mpsc::Receiver<ControllerBlob>,
        mut bg: mpsc::UnboundedReceiver<Bg>,
    ) {
        loop {
            let wake_ms = self.flow.poll_timeout().unwrap_or_else(|| self.now_ms() + IDLE_WAKE_MS);
            let wake = tokio::time::Instant::from_std(self.epoch + Duration::from_millis(wake_ms));
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                Some(blob) = wire.recv() => self.on_controller_blob(blob),
                Some(result) = bg.recv() => self.background(result),
                _ = tokio::time::sleep_until(wake) => {
                    let now = self.now_ms();
                    self.flow.handle_timeout(now);
                }
            }
            self.drive().await;
        }
    }

    /// Does what the machine asks until it asks nothing more.
    async fn drive(&mut self) {
        loop {
            let mut busy = false;
            while let Some(event) = self.flow.poll_event() {
                busy = true;
                self.event(event);
            }
            let now = self.now_ms();
            while self.bulk.is_some() {
                let Some(t) = self.flow.poll_transmit(now) else { break };
                busy = true;
                self.transmit(t).await;
            }
            if !busy {
                break;
            }
        }
        let flow = &self.flow;
        self.files.retain(|sha, _| flow.uploading(sha));
    }

    async fn transmit(&mut self, t: Transmit) {
        let payload = match t {
            Transmit::Request { sha256, offset, len_bytes } => {
                encode_blob(&AgentBlob::Request { sha256, offset, len_bytes })
            }
            Transmit::Offer { sha256, size_bytes } => encode_blob(&AgentBlob::Offer { sha256, size_bytes }),
            Transmit::Chunk { sha256, offset, len_bytes } => {
                let len = len_bytes as usize;
                // A megabyte at most, from the page cache: cheap enough to read here.
                let data = match self.files.get(&sha256).map(|(f, _)| cosmos_cas::read_range(f, offset, len)) {
                    Some(Ok(data)) if data.len() == len => data,
                    _ => {
                        if let Some((_, path)) = self.files.get(&sha256) {
                            tracing::warn!(path = %path.display(), "an output changed while it was being delivered");
                        }
                        self.flow.chunk_unreadable(sha256);
                        return;
                    }
                };
                let mut payload = Vec::with_capacity(len + 64);
                let chunk = AgentBlob::Chunk(BlobChunk::new(sha256, offset, data));
                encode_blob_chunk_into(&chunk, &mut payload).map(|()| payload)
            }
        };
        let payload = match payload {
            Ok(payload) => payload,
            Err(e) => return tracing::error!(error = %e, "cannot encode a blob frame"),
        };
        let Some(bulk) = &self.bulk else { return };
        if bulk.send(payload).await.is_err() {
            // The writer is gone; the main loop says LinkDown too, and LinkUp resumes everything.
            self.bulk = None;
            self.flow.link_down();
        }
    }

    fn command(&mut self, cmd: Command) {
        let now = self.now_ms();
        match cmd {
            Command::Stage { attempt_id, work_dir, inputs } => {
                let needs: Vec<(Sha256, u64)> = inputs.iter().map(|i| (i.sha256, i.size_bytes)).collect();
                self.stages.insert(attempt_id, Stage { work_dir, inputs });
                self.pin();
                self.flow.stage(attempt_id, &needs);
            }
            Command::AbortStage { attempt_id } => {
                self.stages.remove(&attempt_id);
                self.pin();
                self.flow.abort_stage(attempt_id);
            }
            Command::Upload { attempt_id, work_dir, outputs } => {
                for o in &outputs {
                    if self.files.contains_key(&o.sha256) {
                        continue;
                    }
                    let path = work_dir.join(&o.path);
                    match std::fs::File::open(&path) {
                        Ok(file) => drop(self.files.insert(o.sha256, (Arc::new(file), path))),
                        Err(source) => {
                            let e = BlobError::Output { path, source };
                            let _ = self.done.send(Done::Uploaded { attempt_id, result: Err(e.to_string()) });
                            return;
                        }
                    }
                }
                let outputs: Vec<(Sha256, u64)> = outputs.iter().map(|o| (o.sha256, o.size_bytes)).collect();
                self.flow.upload(now, attempt_id, &outputs);
            }
            Command::AbortUpload { attempt_id } => self.flow.abort_upload(attempt_id),
            Command::Release { attempt_id } => {
                if let Some(links) = self.placed.remove(&attempt_id) {
                    self.release(links);
                }
            }
            Command::LinkUp { bulk } => {
                self.bulk = Some(bulk);
                self.flow.link_up(now);
            }
            Command::LinkDown => {
                self.bulk = None;
                self.flow.link_down();
            }
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Resolve { sha256, size_bytes } => self.resolve(sha256, size_bytes),
            Event::WriterStart { sha256, start_bytes, size_bytes } => {
                if start_bytes == 0 {
                    self.cache.discard_partial(&sha256);
                }
                self.sizes.insert(sha256, size_bytes);
                self.progress.entry(sha256).or_insert(Progress {
                    started: Instant::now(),
                    received_bytes: 0,
                    corrupt_chunks: 0,
                });
                let writer = self.start_writer(sha256, start_bytes, size_bytes);
                self.writers.insert(sha256, writer);
            }
            Event::WriterClose { sha256 } => {
                // Closing the queue tells the writer that all is there: it verifies and installs.
                if let Some(w) = self.writers.get_mut(&sha256) {
                    w.queue = None;
                }
            }
            Event::WriterDrop { sha256 } => {
                self.writers.remove(&sha256);
                self.progress.remove(&sha256);
            }
            Event::InputsReady { attempt_id } => self.place(attempt_id),
            Event::StageFailed { attempt_id, failure } => {
                self.stages.remove(&attempt_id);
                self.pin();
                let _ = self.done.send(Done::Staged { attempt_id, result: Err(failure) });
            }
            Event::Delivered { attempt_id } => {
                let _ = self.done.send(Done::Uploaded { attempt_id, result: Ok(()) });
            }
            Event::DeliveryFailed { attempt_id, reason } => {
                let _ = self.done.send(Done::Uploaded { attempt_id, result: Err(reason) });
            }
        }
    }

    /// Answers the machine's look-up of `sha256`: at once, after a re-hash, or "fetch it".
    fn resolve(&mut self, sha256: Sha256, size: u64) {
        let now = self.now_ms();
        if self.cache.size(&sha256) == Some(size) {
            let path = self.cache.path(&sha256);
            let stamp = mtime(&path);
            if stamp.is_some() && self.verified.get(&sha256) == stamp.as_ref() {
                return self.flow.resolved(now, sha256, Resolution::Ready);
            }
            // Not hashed by this process, or touched since: it may have been written through an attempt's link.
            let (cache, bg) = (self.cache.clone(), self.bg.clone());
            self.sizes.insert(sha256, size);
            tokio::task::spawn_blocking(move || {
                let good = matches!(cache.verify(&sha256), Ok(true));
                let _ = bg.send(Bg::Verified(sha256, good.then(|| mtime(&cache.path(&sha256))).flatten()));
            });
            return;
        }
        if size == 0 {
            let resolution = match self.cache.put_bytes(&[]) {
                Ok(_) => Resolution::Ready,
                Err(e) => Resolution::Failed(BlobError::Cache(e).stage_failure()),
            };
            return self.flow.resolved(now, sha256, resolution);
        }
        let mut have_bytes = self.cache.partial_len(&sha256);
        if have_bytes > size {
            self.cache.discard_partial(&sha256);
            have_bytes = 0;
        }
        self.flow.resolved(now, sha256, Resolution::Fetch { have_bytes });
    }

    /// Starts the writer of a download whose partial file holds `start` bytes:
    /// it hashes those, then appends and hashes what it is sent; when its queue
    /// closes with all `size` bytes written it checks the digest and installs
    /// the blob, otherwise it just stops (the partial file stays for a resume).
    fn start_writer(&mut self, sha256: Sha256, start: u64, size: u64) -> Writer {
        self.writers_started += 1;
        let id = self.writers_started;
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
        Writer { id, queue: Some(tx) }
    }

    fn on_controller_blob(&mut self, blob: ControllerBlob) {
        let now = self.now_ms();
        match blob {
            ControllerBlob::Chunk(chunk) => {
                let sha256 = chunk.sha256;
                let len = chunk.data.len() as u64;
                let intact = chunk.is_intact();
                let accepted = self.flow.on_chunk(now, sha256, chunk.offset, len, intact);
                if let Some(p) = self.progress.get_mut(&sha256) {
                    p.received_bytes += len;
                    p.corrupt_chunks += u32::from(!intact);
                }
                if accepted {
                    // A writer that is gone failed: its report (on its way) fails the download.
                    if let Some(queue) = self.writers.get(&sha256).and_then(|w| w.queue.as_ref()) {
                        let _ = queue.send(chunk.data);
                    }
                }
            }
            ControllerBlob::Missing { sha256, reason } => self.flow.on_missing(sha256, reason),
            ControllerBlob::Resume { sha256, have_bytes } => self.flow.on_resume(now, sha256, have_bytes),
            ControllerBlob::Ack { sha256, have_bytes } => self.flow.on_ack(now, sha256, have_bytes),
            ControllerBlob::Stored { sha256 } => self.flow.on_stored(sha256),
            ControllerBlob::Refused { sha256, reason, retry } => self.flow.on_refused(sha256, reason, retry),
        }
    }

    fn background(&mut self, result: Bg) {
        let now = self.now_ms();
        match result {
            Bg::Wrote(sha256, id, len) => {
                if self.writers.get(&sha256).is_some_and(|w| w.id == id) {
                    self.flow.on_written(sha256, len);
                }
            }
            Bg::Committed(sha256, id, result) => {
                if self.writers.get(&sha256).is_none_or(|w| w.id != id) {
                    return;
                }
                self.writers.remove(&sha256);
                let commit = match result {
                    Ok(()) => {
                        if let Some(p) = self.progress.remove(&sha256) {
                            let secs = p.started.elapsed().as_secs_f64().max(1e-6);
                            tracing::info!(
                                %sha256,
                                size_bytes = self.sizes.get(&sha256).copied().unwrap_or(0),
                                received_bytes = p.received_bytes,
                                corrupt_chunks = p.corrupt_chunks,
                                mb_per_s = (p.received_bytes as f64 / 1e6 / secs).round(),
                                "fetched an input into the cache"
                            );
                        }
                        if let Some(t) = mtime(&self.cache.path(&sha256)) {
                            self.verified.insert(sha256, t);
                        }
                        self.uses().last_used.insert(sha256, SystemTime::now());
                        self.evict();
                        Commit::Stored
                    }
                    // The writer removed the partial file: a refetch starts from nothing.
                    Err(CasError::DigestMismatch { .. }) => Commit::DigestMismatch,
                    Err(e) => {
                        self.progress.remove(&sha256);
                        Commit::Failed(BlobError::Cache(e).stage_failure())
                    }
                };
                self.flow.on_commit(now, sha256, commit);
            }
            Bg::Verified(sha256, good) => {
                let resolution = match good {
                    Some(t) => {
                        self.verified.insert(sha256, t);
                        Resolution::Ready
                    }
                    None => {
                        // `verify` removed the bad copy: it is fetched again.
                        tracing::warn!(%sha256, "a cached input no longer matches its digest; fetching it again");
                        self.verified.remove(&sha256);
                        let size = self.sizes.get(&sha256).copied().unwrap_or(0);
                        let have_bytes = self.cache.partial_len(&sha256);
                        if have_bytes > size {
                            self.cache.discard_partial(&sha256);
                        }
                        Resolution::Fetch { have_bytes: if have_bytes > size { 0 } else { have_bytes } }
                    }
                };
                self.flow.resolved(now, sha256, resolution);
            }
            Bg::Placed(attempt_id, result, links) => {
                if self.stages.remove(&attempt_id).is_none() {
                    // Aborted meanwhile: the attempt never runs with them.
                    self.release(links);
                    return;
                }
                self.pin();
                self.placed.entry(attempt_id).or_default().extend(links);
                let result = result.map_err(|e| BlobError::Cache(e).stage_failure());
                let _ = self.done.send(Done::Staged { attempt_id, result });
            }
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
