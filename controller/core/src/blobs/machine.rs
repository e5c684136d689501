//! The controller's side of blob flow control as a state machine with no I/O:
//! what to answer an agent's offers, chunks and requests, and when an upload
//! is complete and must be verified. The connection's blob task (`super`) does
//! the file work and feeds the results back; the simulator drives the same
//! machine. Bytes never pass through it: a chunk is judged by its offset,
//! length and checksum.

use cosmos_proto::{BLOB_CHUNK_BYTES, ControllerBlob, Sha256};
use std::collections::HashMap;

/// Uploads one connection keeps announced and unfinished; past it the least recently active is forgotten.
pub const UPLOADS_MAX: usize = 256;

/// What to do with an agent's offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OfferAction {
    /// Answer this.
    Reply(ControllerBlob),
    /// An empty blob: no chunk will follow; store it now and answer [`Intake::on_committed`].
    StoreEmpty,
    /// Drop the blob's partial file (it is longer than the blob), then answer this.
    DiscardThenReply(ControllerBlob),
    /// Every byte is there but was never committed: verify and install it, then [`Intake::on_committed`].
    Commit,
    /// Nothing: a commit under way answers.
    Wait,
}

/// What to do with an upload chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkAction {
    /// Append it at its offset, then [`Intake::on_appended`].
    Append,
    /// Drop it: sent before a rewind, or while every byte is here.
    Ignore,
    /// Answer this (a refusal, or where to resend from after a bad checksum).
    Reply(ControllerBlob),
}

/// What follows a written chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Answer this.
    Reply(ControllerBlob),
    /// Every byte is in the partial file: verify and install it, then [`Intake::on_committed`].
    Commit,
    /// The partial file was not where the chunk continued (another connection moved it): drop it.
    Ignore,
}

/// What to do with a download request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serve {
    /// Read and send these bytes.
    Read {
        /// From which byte.
        offset: u64,
        /// How many, at most [`BLOB_CHUNK_BYTES`].
        len_bytes: u32,
    },
    /// Answer this.
    Reply(ControllerBlob),
}

#[derive(Debug)]
struct Incoming {
    size_bytes: u64,
    /// Bytes in the partial file: where the next chunk must start.
    have_bytes: u64,
    last_active: u64,
    /// Its complete partial file is being verified and installed; the result answers.
    committing: bool,
    /// That commit began at an offer (leftover bytes) rather than at the last chunk.
    on_offer: bool,
}

/// One agent connection's uploads.
#[derive(Debug, Default)]
pub struct Intake {
    uploads: HashMap<Sha256, Incoming>,
    /// Counts the connection's upload frames: an upload's last activity (the least recent goes first when full).
    activity: u64,
}

/// A download request, answered from a store holding the blob at `stored_size` bytes (None: not at all).
pub fn serve(sha256: Sha256, offset: u64, len_bytes: u32, stored_size: Option<u64>) -> Serve {
    let Some(size) = stored_size else {
        let reason = "the controller's blob store does not hold it; upload it to the controller first".to_string();
        return Serve::Reply(ControllerBlob::Missing { sha256, reason });
    };
    let len_bytes = len_bytes.min(BLOB_CHUNK_BYTES);
    if offset >= size && len_bytes > 0 {
        let reason = format!("the blob ends before byte {offset}");
        return Serve::Reply(ControllerBlob::Missing { sha256, reason });
    }
    Serve::Read { offset, len_bytes: len_bytes.min((size - offset).min(u64::from(u32::MAX)) as u32) }
}

impl Intake {
    /// A connection with no uploads.
    pub fn new() -> Intake {
        Intake::default()
    }

    /// The agent offers `sha256`; the store holds it at `stored_size` (None: not complete) and
    /// `partial_bytes` of it in its partial file.
    pub fn on_offer(
        &mut self,
        sha256: Sha256,
        size_bytes: u64,
        stored_size: Option<u64>,
        partial_bytes: u64,
    ) -> OfferAction {
        if stored_size == Some(size_bytes) {
            return OfferAction::Reply(ControllerBlob::Stored { sha256 });
        }
        if size_bytes == 0 {
            return OfferAction::StoreEmpty;
        }
        self.activity += 1;
        if let Some(u) = self.uploads.get_mut(&sha256) {
            u.last_active = self.activity;
            if u.committing {
                // Offered again while its commit runs (the agent saw no answer for a while): the commit answers.
                return OfferAction::Wait;
            }
        } else if self.uploads.len() >= UPLOADS_MAX {
            // Uploads the agent gave up on (cancelled, fenced, timed out) leave no word: the least
            // recently active one goes, and its partial file stays for whoever offers it again.
            let stale = self.uploads.iter().filter(|(_, u)| !u.committing).min_by_key(|(_, u)| u.last_active);
            if let Some((&stale, _)) = stale {
                tracing::info!(sha256 = %stale, "forgetting the least recently active upload of a full table");
                self.uploads.remove(&stale);
            }
        }
        let discard = partial_bytes > size_bytes;
        let have_bytes = if discard { 0 } else { partial_bytes };
        let committing = have_bytes == size_bytes;
        let incoming =
            Incoming { size_bytes, have_bytes, last_active: self.activity, committing, on_offer: committing };
        self.uploads.insert(sha256, incoming);
        if committing {
            // Every byte is here but was never committed (a restart mid-commit, a failed commit, another
            // connection delivering the same content): "resume at the end" would leave the agent nothing
            // to send and nothing to wait for. Verify and install it; the result answers.
            return OfferAction::Commit;
        }
        let resume = ControllerBlob::Resume { sha256, have_bytes };
        if discard { OfferAction::DiscardThenReply(resume) } else { OfferAction::Reply(resume) }
    }

    /// An upload chunk of `len_bytes` at `offset` arrived; `intact`: its checksum holds.
    pub fn on_chunk(&mut self, sha256: Sha256, offset: u64, len_bytes: u64, intact: bool) -> ChunkAction {
        self.activity += 1;
        let Some(u) = self.uploads.get_mut(&sha256) else {
            let reason = "a chunk of a blob that was not offered on this connection".to_string();
            return ChunkAction::Reply(ControllerBlob::Refused {
                sha256,
                reason,
                retry: cosmos_proto::Retry::Retryable,
            });
        };
        u.last_active = self.activity;
        if u.committing {
            // Sent before a rewind; every byte is here already.
            return ChunkAction::Ignore;
        }
        let end = offset.saturating_add(len_bytes);
        if end > u.size_bytes {
            let size_bytes = u.size_bytes;
            self.uploads.remove(&sha256);
            let reason = format!("a chunk ends at byte {end}, past the announced size of {size_bytes} bytes");
            return ChunkAction::Reply(ControllerBlob::Refused {
                sha256,
                reason,
                retry: cosmos_proto::Retry::Terminal,
            });
        }
        if offset != u.have_bytes {
            // Sent before the agent rewound: the resent one follows.
            return ChunkAction::Ignore;
        }
        if !intact {
            tracing::warn!(%sha256, have_bytes = u.have_bytes, "an uploaded chunk failed its checksum; asking for it again");
            return ChunkAction::Reply(ControllerBlob::Resume { sha256, have_bytes: u.have_bytes });
        }
        ChunkAction::Append
    }

    /// A chunk ending at `end` was appended; the partial file now holds `have_bytes`.
    pub fn on_appended(&mut self, sha256: Sha256, end: u64, have_bytes: u64) -> Appended {
        let Some(u) = self.uploads.get_mut(&sha256) else { return Appended::Ignore };
        u.have_bytes = have_bytes;
        if have_bytes != end {
            return Appended::Ignore;
        }
        if have_bytes == u.size_bytes {
            // Hashing a large blob takes a while: off the connection's task, so its other transfers go on.
            u.committing = true;
            u.on_offer = false;
            return Appended::Commit;
        }
        Appended::Reply(ControllerBlob::Ack { sha256, have_bytes })
    }

    /// Appending a chunk failed (disk full, I/O error): the upload is refused.
    pub fn on_append_failed(&mut self, sha256: Sha256, reason: String, retry: cosmos_proto::Retry) -> ControllerBlob {
        self.uploads.remove(&sha256);
        ControllerBlob::Refused { sha256, reason, retry }
    }

    /// A commit (or an empty blob's store) ended; `Err` carries the reason and whether it is worth retrying.
    /// A failed commit begun at an offer removed its bad leftover bytes: the agent sends them all again.
    pub fn on_committed(
        &mut self,
        sha256: Sha256,
        result: Result<(), (String, cosmos_proto::Retry)>,
    ) -> ControllerBlob {
        let on_offer = self.uploads.get(&sha256).is_some_and(|u| u.committing && u.on_offer);
        match result {
            Ok(()) => {
                self.uploads.remove(&sha256);
                ControllerBlob::Stored { sha256 }
            }
            Err((reason, _)) if on_offer => {
                tracing::warn!(%sha256, %reason, "a complete partial upload did not commit; asking for all of it again");
                if let Some(u) = self.uploads.get_mut(&sha256) {
                    u.committing = false;
                    u.on_offer = false;
                    u.have_bytes = 0;
                }
                ControllerBlob::Resume { sha256, have_bytes: 0 }
            }
            Err((reason, retry)) => {
                self.uploads.remove(&sha256);
                ControllerBlob::Refused { sha256, reason, retry }
            }
        }
    }

    /// The announced size of an upload this connection knows.
    pub fn size_bytes(&self, sha256: &Sha256) -> Option<u64> {
        self.uploads.get(sha256).map(|u| u.size_bytes)
    }

    /// Whether a commit begun at an offer is under way for `sha256` (its failure discards the leftover bytes).
    pub fn commit_on_offer(&self, sha256: &Sha256) -> bool {
        self.uploads.get(sha256).is_some_and(|u| u.committing && u.on_offer)
    }
}
