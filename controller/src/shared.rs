//! What the controller's shells share: the data directory's layout, the
//! clocks, and the state every API handler and agent connection reads.

use crate::core::Now;
use crate::store::Store;
use cosmos_proto::handshake::Token;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Paths of the files in a data directory.
pub struct DataDir {
    /// The directory.
    pub root: PathBuf,
}

impl DataDir {
    /// The SQLite store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store.sqlite")
    }
    /// Token clients present to the API.
    pub fn api_token(&self) -> PathBuf {
        self.root.join("api.token")
    }
    /// Token agents present in their handshake.
    pub fn agent_token(&self) -> PathBuf {
        self.root.join("agent.token")
    }
    /// Attempt logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// The content-addressed store of input videos and run outputs.
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }
}

/// Milliseconds since the Unix epoch: the controller's clock, persisted in
/// records, so it must keep counting across restarts (unlike an Instant).
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The controller's clocks: a monotonic one for the core's deadlines, the wall
/// clock for the timestamps it stores.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: std::time::Instant,
}

impl Clock {
    /// A clock whose monotonic origin is now.
    pub fn new() -> Clock {
        Clock { start: std::time::Instant::now() }
    }

    /// Both readings, for one input to the core.
    pub fn now(&self) -> Now {
        Now { mono_ms: self.start.elapsed().as_millis() as u64, wall_ms: wall_ms() }
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

/// What the API handlers share.
pub struct Shared {
    /// The data directory.
    pub dir: DataDir,
    /// The API's bearer token.
    pub api_token: Token,
    /// A read-only connection for history queries (WAL lets it read beside the writer).
    pub reader: std::sync::Mutex<Store>,
    /// Input videos and run outputs, by sha256 (shared with the agent connections).
    pub blobs: Arc<cosmos_cas::Store>,
    /// How Cosmos Transfer runs compile into jobs.
    pub cosmos: crate::cosmos::CosmosConfig,
    /// Blobs being uploaded through the API now: one upload of a blob at a time.
    pub uploading: std::sync::Mutex<std::collections::BTreeSet<cosmos_proto::Sha256>>,
    /// Held shared while runs are created from stored blobs and exclusively while
    /// outputs are deleted, so a run never names a blob removed under it.
    pub blob_gc: tokio::sync::RwLock<()>,
    /// KiB of request bodies being read now, bounding their memory (see `http::BODY_KIB_IN_FLIGHT_MAX`).
    pub bodies: Arc<tokio::sync::Semaphore>,
    /// Attempt logs, in shared segments (bounded per stream by `--attempt-log-bytes-max`).
    pub logs: crate::logstore::LogStore,
    /// Why the store can no longer be written, once it cannot: the API then answers 503 with it.
    pub store_failure: std::sync::OnceLock<String>,
    /// What `/metrics` shows, and what the shells count into.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `/metrics` needs no token: the API listens on loopback only.
    pub metrics_open: bool,
}

/// A fresh id with `prefix` (`ps` or `rs`) from the OS's randomness.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).is_err() {
        // Only reachable without /dev/urandom; time and a counter still keep ids apart.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = wall_ms() ^ (SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 40);
        bytes.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    crate::cosmos::format_id(prefix, bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fresh_ids_have_their_prefix_and_differ() {
        let a = super::new_id("rs");
        assert!(crate::cosmos::is_id(&a, "rs"), "{a}");
        assert_ne!(a, super::new_id("rs"));
    }
}
