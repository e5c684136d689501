//! The agent's blob flow control as a state machine with no I/O: which chunks
//! to ask for, which to accept, when a stalled transfer is rewound, where a
//! resumed one starts, and when a retry budget is spent.
//!
//! quinn-proto's shape: the shell feeds inputs in (commands from the main loop,
//! the controller's blob frames, the writer's progress, the cache's answers,
//! the time as milliseconds), then polls [`Flow::poll_transmit`] for frames to
//! send and [`Flow::poll_event`] for file work to do and answers to give, and
//! sleeps until [`Flow::poll_timeout`] to call [`Flow::handle_timeout`]. Bytes
//! never pass through it: a chunk is judged by its offset, length and
//! checksum, and the shell moves the data. The same machine runs in the agent
//! daemon (`super`) and in the deterministic simulator.
//!
//! Flow control: downloads are pulled (one request per chunk) and uploads are
//! acknowledged chunk by chunk, so the agent alone bounds what is in flight:
//! [`BLOB_WINDOW_BYTES`] per blob and [`CONN_WINDOW_BYTES`] on the connection.
//! A download's window counts bytes asked for and not yet on disk, so a slow
//! disk holds back requests and memory stays bounded.

use crate::core::StageFailure;
use cosmos_proto::Classify;
use cosmos_proto::{
    AttemptId, BLOB_CHUNK_BYTES, BLOB_FRAMES_IN_FLIGHT_PER_BLOB_MAX, BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX, Sha256,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A transfer with frames in flight and no answer for this long is rewound and asked again.
pub const BLOB_STALL_TIMEOUT_MS: u64 = 15_000;
/// Whole-blob digest failures of one download before staging fails for good.
pub const DOWNLOAD_DIGEST_TRIES_MAX: u32 = 2;
/// Refusals of one upload the controller calls retryable before delivery fails.
pub const UPLOAD_TRIES_MAX: u32 = 3;
/// Bytes one request or upload chunk carries at most.
pub const CHUNK_BYTES: u64 = BLOB_CHUNK_BYTES as u64;
/// Bytes one blob may have asked for and not yet written (downloads) or sent and not acknowledged (uploads).
pub const BLOB_WINDOW_BYTES: u64 = BLOB_FRAMES_IN_FLIGHT_PER_BLOB_MAX as u64 * CHUNK_BYTES;
/// Bytes in flight on the connection, every blob together.
pub const CONN_WINDOW_BYTES: u64 = BLOB_FRAMES_IN_FLIGHT_PER_CONN_MAX as u64 * CHUNK_BYTES;

/// Why a blob could not be had or delivered, as far as the protocol tells.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
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
    /// The controller refused an upload.
    #[error("the controller refused output {sha256}: {reason}")]
    Refused {
        /// Which blob.
        sha256: Sha256,
        /// Its words.
        reason: String,
    },
}

impl cosmos_proto::Classify for FlowError {
    /// Whether another attempt may succeed.
    fn retry(&self) -> cosmos_proto::Retry {
        cosmos_proto::Retry::when(matches!(self, FlowError::Refused { .. }))
    }
}

/// A frame for the controller, polled with [`Flow::poll_transmit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Ask for a piece of a download.
    Request {
        /// Which blob.
        sha256: Sha256,
        /// From which byte.
        offset: u64,
        /// How many bytes, at most [`CHUNK_BYTES`].
        len_bytes: u32,
    },
    /// Announce an upload; the controller answers where to start.
    Offer {
        /// Which blob.
        sha256: Sha256,
        /// Its size.
        size_bytes: u64,
    },
    /// Send these bytes of an upload's file (the shell reads them; when it cannot, [`Flow::chunk_unreadable`]).
    Chunk {
        /// Which blob.
        sha256: Sha256,
        /// From which byte.
        offset: u64,
        /// How many bytes.
        len_bytes: u32,
    },
}

/// Work for the shell and answers for the main loop, polled with [`Flow::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Look `sha256` up in the cache and answer with [`Flow::resolved`].
    Resolve {
        /// Which blob.
        sha256: Sha256,
        /// Its size.
        size_bytes: u64,
    },
    /// Start a writer appending to the blob's partial file, which holds `start_bytes` good bytes
    /// (0: the shell empties it first); the bytes of accepted chunks go to it in order.
    WriterStart {
        /// Which blob.
        sha256: Sha256,
        /// Where the writer starts.
        start_bytes: u64,
        /// The blob's size.
        size_bytes: u64,
    },
    /// Every byte is accepted: the writer finishes, checks the digest and installs the blob,
    /// then [`Flow::on_commit`].
    WriterClose {
        /// Which blob.
        sha256: Sha256,
    },
    /// Nobody waits for the download any more: the writer stops, its partial file stays to resume from.
    WriterDrop {
        /// Which blob.
        sha256: Sha256,
    },
    /// Every input of the attempt is in the cache: the shell places them.
    InputsReady {
        /// Which attempt.
        attempt_id: AttemptId,
    },
    /// An input cannot be had: staging failed.
    StageFailed {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Why, and whether another attempt may do better.
        failure: StageFailure,
    },
    /// Every output is in the controller's store.
    Delivered {
        /// Which attempt.
        attempt_id: AttemptId,
    },
    /// An output could not be delivered.
    DeliveryFailed {
        /// Which attempt.
        attempt_id: AttemptId,
        /// Why.
        reason: String,
    },
}

/// What the cache holds of a blob, the shell's answer to [`Event::Resolve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The blob is there and good.
    Ready,
    /// It must be fetched; its partial file holds this many bytes to resume from.
    Fetch {
        /// Good bytes on disk.
        have_bytes: u64,
    },
    /// The cache failed.
    Failed(StageFailure),
}

/// How a download's writer ended, the shell's answer to [`Event::WriterClose`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Verified and installed.
    Stored,
    /// The bytes did not match the digest; the partial file is gone.
    DigestMismatch,
    /// The cache failed (disk full, I/O error).
    Failed(StageFailure),
}

/// Deliberate defects, for the simulator's teeth tests.
#[cfg(feature = "sabotage")]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Sabotage {
    /// The sound machine.
    #[default]
    None,
    /// A rewound download resumes one chunk past the bytes it really has.
    ResumePastEnd,
}

#[derive(Debug)]
struct Download {
    size: u64,
    /// Bytes accepted in order with good checksums, handed to the writer.
    end: u64,
    /// Bytes the writer has on disk; `end - written` wait for it.
    written: u64,
    /// Bytes asked for; `requested - end` are in flight.
    requested: u64,
    /// Every byte is accepted: the writer verifies and installs.
    committing: bool,
    digest_failures: u32,
    last_progress_ms: u64,
}

#[derive(Debug)]
struct Upload {
    size: u64,
    acked: u64,
    sent: u64,
    /// Offered and waiting for the controller to say where to start.
    awaiting_resume: bool,
    refusals: u32,
    last_progress_ms: u64,
}

/// The agent's blob flow control over one host cache, across connections.
#[derive(Debug, Default)]
pub struct Flow {
    link_up: bool,
    downloads: BTreeMap<Sha256, Download>,
    /// Blobs the shell is looking up in the cache.
    resolving: BTreeMap<Sha256, u64>,
    /// Inputs each staging attempt still waits for.
    stages: BTreeMap<AttemptId, BTreeSet<Sha256>>,
    uploads: BTreeMap<Sha256, Upload>,
    /// Outputs each delivering attempt still waits for.
    deliveries: BTreeMap<AttemptId, BTreeSet<Sha256>>,
    control: VecDeque<Transmit>,
    events: VecDeque<Event>,
    #[cfg(feature = "sabotage")]
    sabotage: Sabotage,
}

impl Flow {
    /// A machine with no transfers and no link.
    pub fn new() -> Flow {
        Flow::default()
    }

    /// A deliberately broken machine.
    #[cfg(feature = "sabotage")]
    pub fn sabotaged(sabotage: Sabotage) -> Flow {
        Flow { sabotage, ..Flow::default() }
    }

    // ---- from the main loop ----

    /// Stage `inputs` (digest, size) for an attempt: answered by [`Event::InputsReady`] or [`Event::StageFailed`].
    pub fn stage(&mut self, attempt_id: AttemptId, inputs: &[(Sha256, u64)]) {
        let pending: BTreeSet<Sha256> = inputs.iter().map(|i| i.0).collect();
        if pending.is_empty() {
            self.events.push_back(Event::InputsReady { attempt_id });
            return;
        }
        self.stages.insert(attempt_id, pending);
        for &(sha256, size_bytes) in inputs {
            self.need(sha256, size_bytes);
        }
    }

    /// Forget a stage; no answer follows. Downloads nobody else waits for stop asking.
    pub fn abort_stage(&mut self, attempt_id: AttemptId) {
        if self.stages.remove(&attempt_id).is_none() {
            return;
        }
        let wanted: BTreeSet<Sha256> = self.stages.values().flatten().copied().collect();
        let dropped: Vec<Sha256> =
            self.downloads.iter().filter(|(s, d)| !d.committing && !wanted.contains(s)).map(|(s, _)| *s).collect();
        for sha256 in dropped {
            self.downloads.remove(&sha256);
            self.events.push_back(Event::WriterDrop { sha256 });
        }
    }

    /// Deliver `outputs` (digest, size) of an attempt: answered by [`Event::Delivered`] or [`Event::DeliveryFailed`].
    pub fn upload(&mut self, now_ms: u64, attempt_id: AttemptId, outputs: &[(Sha256, u64)]) {
        let pending: BTreeSet<Sha256> = outputs.iter().map(|o| o.0).collect();
        if pending.is_empty() {
            self.events.push_back(Event::Delivered { attempt_id });
            return;
        }
        for &(sha256, size) in outputs {
            if self.uploads.contains_key(&sha256) {
                continue;
            }
            let upload =
                Upload { size, acked: 0, sent: 0, awaiting_resume: true, refusals: 0, last_progress_ms: now_ms };
            self.uploads.insert(sha256, upload);
            if self.link_up {
                self.control.push_back(Transmit::Offer { sha256, size_bytes: size });
            }
        }
        self.deliveries.insert(attempt_id, pending);
    }

    /// Forget a delivery; no answer follows.
    pub fn abort_upload(&mut self, attempt_id: AttemptId) {
        self.deliveries.remove(&attempt_id);
        let wanted: BTreeSet<Sha256> = self.deliveries.values().flatten().copied().collect();
        self.uploads.retain(|sha, _| wanted.contains(sha));
    }

    /// A connection is up: every upload is offered again, every download asks from where it stands.
    pub fn link_up(&mut self, now_ms: u64) {
        self.link_up = true;
        self.control.clear();
        for (sha256, u) in self.uploads.iter_mut() {
            u.awaiting_resume = true;
            u.sent = u.acked;
            u.last_progress_ms = now_ms;
            self.control.push_back(Transmit::Offer { sha256: *sha256, size_bytes: u.size });
        }
        for (sha256, d) in self.downloads.iter_mut() {
            if d.end > 0 && !d.committing {
                tracing::info!(%sha256, resume_at_bytes = d.end, size_bytes = d.size, "resuming an input download");
            }
            d.last_progress_ms = now_ms;
        }
    }

    /// The connection is gone: everything in flight is lost with it; resume from what is on disk.
    pub fn link_down(&mut self) {
        self.link_up = false;
        self.control.clear();
        let rewind = self.rewind_fn();
        for d in self.downloads.values_mut() {
            rewind(d);
        }
        for u in self.uploads.values_mut() {
            u.awaiting_resume = true;
            u.sent = u.acked;
        }
    }

    // ---- from the shell's file work ----

    /// The cache's answer to [`Event::Resolve`].
    pub fn resolved(&mut self, now_ms: u64, sha256: Sha256, resolution: Resolution) {
        let Some(size) = self.resolving.remove(&sha256) else { return };
        match resolution {
            Resolution::Ready => self.ready(sha256),
            Resolution::Failed(failure) => self.fail(sha256, failure),
            Resolution::Fetch { have_bytes } => {
                let start = if have_bytes > size { 0 } else { have_bytes };
                if start > 0 {
                    tracing::info!(%sha256, resume_at_bytes = start, size_bytes = size, "resuming an input download");
                }
                let d = Download {
                    size,
                    end: start,
                    written: start,
                    requested: start,
                    committing: start == size,
                    digest_failures: 0,
                    last_progress_ms: now_ms,
                };
                self.events.push_back(Event::WriterStart { sha256, start_bytes: start, size_bytes: size });
                if d.committing {
                    // All there already: the writer only hashes it and commits.
                    self.events.push_back(Event::WriterClose { sha256 });
                }
                self.downloads.insert(sha256, d);
            }
        }
    }

    /// A download's writer has `written_bytes` on disk.
    pub fn on_written(&mut self, sha256: Sha256, written_bytes: u64) {
        if let Some(d) = self.downloads.get_mut(&sha256) {
            d.written = written_bytes.min(d.end);
        }
    }

    /// How a download's writer ended, after [`Event::WriterClose`] (or when it failed earlier).
    pub fn on_commit(&mut self, now_ms: u64, sha256: Sha256, commit: Commit) {
        let Some(d) = self.downloads.get_mut(&sha256) else { return };
        match commit {
            Commit::Stored => {
                self.downloads.remove(&sha256);
                self.ready(sha256);
            }
            Commit::DigestMismatch if d.digest_failures + 1 < DOWNLOAD_DIGEST_TRIES_MAX => {
                tracing::warn!(%sha256, "a fetched input failed its digest; fetching it again");
                d.digest_failures += 1;
                d.committing = false;
                d.end = 0;
                d.written = 0;
                d.requested = 0;
                d.last_progress_ms = now_ms;
                let size_bytes = d.size;
                self.events.push_back(Event::WriterStart { sha256, start_bytes: 0, size_bytes });
            }
            Commit::DigestMismatch => {
                let tries = d.digest_failures + 1;
                self.downloads.remove(&sha256);
                let e = FlowError::Digest { sha256, tries };
                self.fail(sha256, StageFailure { reason: e.to_string(), retry: e.retry() });
            }
            Commit::Failed(failure) => {
                self.downloads.remove(&sha256);
                self.fail(sha256, failure);
            }
        }
    }

    /// The shell could not read the upload chunk it was told to send (the file shrank or vanished).
    pub fn chunk_unreadable(&mut self, sha256: Sha256) {
        if let Some(u) = self.uploads.get_mut(&sha256) {
            tracing::warn!(%sha256, "an output changed while it was being delivered");
            // The stall check offers it again; the controller's digest check refuses changed bytes.
            u.awaiting_resume = true;
            u.sent = u.acked;
        }
    }

    // ---- from the controller ----

    /// A download chunk arrived: whether its bytes go to the writer (true) or are dropped.
    pub fn on_chunk(&mut self, now_ms: u64, sha256: Sha256, offset: u64, len_bytes: u64, intact: bool) -> bool {
        let rewind = self.rewind_fn();
        let Some(d) = self.downloads.get_mut(&sha256) else { return false };
        // Only the piece that continues the good bytes counts; others were asked for before a rewind.
        if d.committing || offset != d.end {
            return false;
        }
        if !intact || len_bytes == 0 || offset + len_bytes > d.size {
            tracing::warn!(%sha256, offset, "an input chunk failed its checksum; fetching it again");
            rewind(d);
            return false;
        }
        d.end += len_bytes;
        d.requested = d.requested.max(d.end);
        d.last_progress_ms = now_ms;
        if d.end == d.size {
            d.committing = true;
            self.events.push_back(Event::WriterClose { sha256 });
        }
        true
    }

    /// The controller does not hold a download's blob.
    pub fn on_missing(&mut self, sha256: Sha256, reason: String) {
        if self.downloads.remove(&sha256).is_some() {
            self.events.push_back(Event::WriterDrop { sha256 });
            let e = FlowError::Missing { sha256, reason };
            self.fail(sha256, StageFailure { reason: e.to_string(), retry: e.retry() });
        }
    }

    /// The controller holds `have_bytes` of an upload: send from there.
    pub fn on_resume(&mut self, now_ms: u64, sha256: Sha256, have_bytes: u64) {
        if let Some(u) = self.uploads.get_mut(&sha256) {
            if have_bytes > 0 && (u.awaiting_resume || (u.acked == 0 && u.sent == 0)) {
                tracing::info!(%sha256, resume_at_bytes = have_bytes, "resuming an output upload");
            }
            u.acked = have_bytes.min(u.size);
            u.sent = u.acked;
            u.awaiting_resume = false;
            u.last_progress_ms = now_ms;
        }
    }

    /// The controller wrote an upload's bytes up to `have_bytes`.
    pub fn on_ack(&mut self, now_ms: u64, sha256: Sha256, have_bytes: u64) {
        if let Some(u) = self.uploads.get_mut(&sha256) {
            if have_bytes > u.acked && have_bytes <= u.sent {
                u.acked = have_bytes;
                u.last_progress_ms = now_ms;
            }
        }
    }

    /// An upload is verified and in the controller's store.
    pub fn on_stored(&mut self, sha256: Sha256) {
        if self.uploads.remove(&sha256).is_none() {
            return;
        }
        for attempt_id in take_completed(&mut self.deliveries, &sha256) {
            self.events.push_back(Event::Delivered { attempt_id });
        }
    }

    /// The controller refused an upload.
    pub fn on_refused(&mut self, sha256: Sha256, reason: String, retry: cosmos_proto::Retry) {
        let retryable = retry.is_retryable();
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
            if self.link_up {
                self.control.push_back(Transmit::Offer { sha256, size_bytes });
            }
            return;
        }
        self.uploads.remove(&sha256);
        let reason = FlowError::Refused { sha256, reason }.to_string();
        let failed: Vec<AttemptId> =
            self.deliveries.iter().filter(|(_, p)| p.contains(&sha256)).map(|(a, _)| *a).collect();
        for attempt_id in failed {
            self.deliveries.remove(&attempt_id);
            self.events.push_back(Event::DeliveryFailed { attempt_id, reason: reason.clone() });
        }
    }

    // ---- time ----

    /// When [`Flow::handle_timeout`] must be called next (agent milliseconds), if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        if !self.link_up {
            return None;
        }
        let downs = self.downloads.values().filter(|d| download_waits(d)).map(|d| d.last_progress_ms);
        let ups = self.uploads.values().filter(|u| upload_waits(u)).map(|u| u.last_progress_ms);
        downs.chain(ups).min().map(|t| t + BLOB_STALL_TIMEOUT_MS)
    }

    /// Transfers with frames out and no answer for too long are asked again from where they stand.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if !self.link_up {
            return;
        }
        let stalled = |last: u64| now_ms >= last + BLOB_STALL_TIMEOUT_MS;
        let rewind = self.rewind_fn();
        for (sha256, d) in self.downloads.iter_mut() {
            if download_waits(d) && stalled(d.last_progress_ms) {
                tracing::warn!(%sha256, at_bytes = d.end, "an input download stalled; asking again");
                rewind(d);
                d.last_progress_ms = now_ms;
            }
        }
        for (sha256, u) in self.uploads.iter_mut() {
            if upload_waits(u) && stalled(u.last_progress_ms) {
                tracing::warn!(%sha256, at_bytes = u.acked, "an output upload stalled; offering it again");
                u.awaiting_resume = true;
                u.sent = u.acked;
                u.last_progress_ms = now_ms;
                self.control.push_back(Transmit::Offer { sha256: *sha256, size_bytes: u.size });
            }
        }
    }

    // ---- out ----

    /// The next frame to send, while the link is up and the windows allow.
    pub fn poll_transmit(&mut self, now_ms: u64) -> Option<Transmit> {
        if !self.link_up {
            return None;
        }
        if let Some(t) = self.control.pop_front() {
            return Some(t);
        }
        if self.in_flight_bytes() >= CONN_WINDOW_BYTES {
            return None;
        }
        for (sha256, d) in self.downloads.iter_mut() {
            if !d.committing && d.requested < d.size && d.requested - d.written < BLOB_WINDOW_BYTES {
                let len = CHUNK_BYTES.min(d.size - d.requested);
                let offset = d.requested;
                if d.requested == d.end {
                    d.last_progress_ms = now_ms;
                }
                d.requested += len;
                return Some(Transmit::Request { sha256: *sha256, offset, len_bytes: len as u32 });
            }
        }
        for (sha256, u) in self.uploads.iter_mut() {
            if !u.awaiting_resume && u.sent < u.size && u.sent - u.acked < BLOB_WINDOW_BYTES {
                let len = CHUNK_BYTES.min(u.size - u.sent);
                let offset = u.sent;
                if u.sent == u.acked {
                    u.last_progress_ms = now_ms;
                }
                u.sent += len;
                return Some(Transmit::Chunk { sha256: *sha256, offset, len_bytes: len as u32 });
            }
        }
        None
    }

    /// The next piece of work or answer for the shell.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- queries ----

    /// Whether `sha256` is being uploaded (the shell keeps its file open meanwhile).
    pub fn uploading(&self, sha256: &Sha256) -> bool {
        self.uploads.contains_key(sha256)
    }

    /// Whether `sha256` is being downloaded (the shell keeps its writer meanwhile).
    pub fn downloading(&self, sha256: &Sha256) -> bool {
        self.downloads.contains_key(sha256)
    }

    /// Whether nothing is staging, delivering or moving.
    pub fn is_idle(&self) -> bool {
        self.stages.is_empty()
            && self.deliveries.is_empty()
            && self.downloads.is_empty()
            && self.uploads.is_empty()
            && self.resolving.is_empty()
    }

    /// Attempts staging or delivering, for reports.
    pub fn busy_attempts(&self) -> impl Iterator<Item = AttemptId> + '_ {
        self.stages.keys().chain(self.deliveries.keys()).copied()
    }

    // ---- inside ----

    fn in_flight_bytes(&self) -> u64 {
        let down: u64 = self.downloads.values().map(|d| d.requested - d.written).sum();
        let up: u64 = self.uploads.values().map(|u| u.sent - u.acked).sum();
        down + up
    }

    /// Makes `sha256` available in the cache: asks the shell unless it is already fetched or looked up.
    fn need(&mut self, sha256: Sha256, size_bytes: u64) {
        if self.downloads.contains_key(&sha256) || self.resolving.contains_key(&sha256) {
            return;
        }
        self.resolving.insert(sha256, size_bytes);
        self.events.push_back(Event::Resolve { sha256, size_bytes });
    }

    /// `sha256` is in the cache and good: stages waiting only for it are ready.
    fn ready(&mut self, sha256: Sha256) {
        for attempt_id in take_completed(&mut self.stages, &sha256) {
            self.events.push_back(Event::InputsReady { attempt_id });
        }
    }

    /// `sha256` cannot be had: every stage waiting for it fails.
    fn fail(&mut self, sha256: Sha256, failure: StageFailure) {
        tracing::warn!(%sha256, reason = %failure.reason, retryable = failure.retry.is_retryable(), "staging an input failed");
        let failed: Vec<AttemptId> = self.stages.iter().filter(|(_, p)| p.contains(&sha256)).map(|(a, _)| *a).collect();
        for attempt_id in failed {
            self.stages.remove(&attempt_id);
            self.events.push_back(Event::StageFailed { attempt_id, failure: failure.clone() });
        }
    }

    /// How a download goes back to its good bytes: ask again from where they end.
    fn rewind_fn(&self) -> fn(&mut Download) {
        #[cfg(feature = "sabotage")]
        if self.sabotage == Sabotage::ResumePastEnd {
            return |d| {
                if !d.committing && d.end > 0 && d.end + CHUNK_BYTES < d.size {
                    d.end += CHUNK_BYTES;
                }
                d.requested = d.end;
            };
        }
        |d| {
            if !d.committing {
                d.requested = d.end;
            }
        }
    }
}

/// A download with requests out and not committing waits for the controller.
fn download_waits(d: &Download) -> bool {
    !d.committing && d.requested > d.end
}

/// An upload waits for the controller while its offer or chunks are unanswered, and while
/// all is acknowledged and not yet stored (the controller's commit may have failed unsaid).
fn upload_waits(u: &Upload) -> bool {
    u.awaiting_resume || u.sent > u.acked || u.acked == u.size
}

/// Takes `sha256` off every attempt's set of blobs it waits for; removes and
/// returns the attempts that now wait for nothing.
fn take_completed(waiting: &mut BTreeMap<AttemptId, BTreeSet<Sha256>>, sha256: &Sha256) -> Vec<AttemptId> {
    let done: Vec<AttemptId> = waiting
        .iter_mut()
        .filter_map(|(&attempt_id, pending)| (pending.remove(sha256) && pending.is_empty()).then_some(attempt_id))
        .collect();
    for attempt_id in &done {
        waiting.remove(attempt_id);
    }
    done
}
