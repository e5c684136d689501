//! Retention of the controller's history: finished jobs older than a cutoff
//! leave the core and the store with their attempts, events and log files
//! (`--retain-days`, and `cosmos jobs prune --before DATE` through the API),
//! and then blobs that no prompt, run or remaining job references are
//! collected. Every removal is logged with what it was and why.

use crate::actor::{BlobsInUse, CoreActor, Prunable, Prune};
use crate::shared::Shared;
use actix::Addr;
use cosmos_proto::{JobId, Sha256};
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

/// Default age past which finished jobs are pruned, in days.
pub const RETAIN_DAYS_DEFAULT: f64 = 90.0;
/// A blob younger than this is never collected, referenced or not: it may be
/// an upload whose prompt is about to be created, or an output whose
/// success is about to be recorded.
pub const BLOB_GC_AGE_MIN_MS: u64 = 3_600_000;
/// Longest time between two retention passes of `--retain-days`.
pub const PASS_INTERVAL_MAX_MS: u64 = 3_600_000;
/// Shortest time between two passes (a very short retention, as in tests).
pub const PASS_INTERVAL_MIN_MS: u64 = 1_000;

/// What one pass removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pruned {
    /// Jobs removed with their history.
    pub jobs: Vec<JobId>,
    /// Their attempts.
    pub attempts: usize,
    /// Logs removed (an attempt's stdout or its stderr).
    pub log_files: usize,
    /// Bytes those logs held.
    pub log_bytes: u64,
    /// Blobs collected.
    pub blobs: usize,
    /// Bytes those blobs held.
    pub blob_bytes: u64,
}

/// Why [`prune`] could not finish.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The core is gone (the controller stops).
    #[error("the controller is shutting down; retry")]
    Stopping,
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The attempt logs could not be pruned.
    #[error("the attempt logs: {0}")]
    Logs(String),
}

/// Removes finished jobs that ended before `before_ms` (and that no
/// unfinished job names), their attempts, events and logs, then the blobs
/// nothing references any more. `why` says why, in every log line.
pub async fn prune(core: &Addr<CoreActor>, shared: &Shared, before_ms: u64, why: &str) -> Result<Pruned, PruneError> {
    // No run may be created from a blob between the look below and its removal.
    let _gc = shared.blob_gc.write().await;
    let candidates = core.send(Prunable(before_ms)).await.map_err(|_| PruneError::Stopping)?;
    let mut report = Pruned::default();
    if !candidates.is_empty() {
        // Read before the jobs go: their attempts' rows go with them.
        let mut attempts = Vec::new();
        {
            let store = shared.reader.lock().unwrap_or_else(|e| e.into_inner());
            for id in &candidates {
                attempts.push((*id, store.attempts_of(*id)?.into_iter().map(|a| a.id).collect::<Vec<_>>()));
            }
        }
        let rx = core.send(Prune { jobs: candidates, before_ms }).await.map_err(|_| PruneError::Stopping)?;
        let pruned: BTreeSet<JobId> = rx.await.map_err(|_| PruneError::Stopping)?.into_iter().collect();
        for (job, atts) in attempts.into_iter().filter(|(j, _)| pruned.contains(j)) {
            let gone = shared.logs.forget(&atts).map_err(|e| PruneError::Logs(e.to_string()))?;
            let (files, bytes) = (gone.logs, gone.bytes);
            tracing::info!(job = %job, attempts = atts.len(), log_files = files, log_bytes = bytes, reason = why, "pruned a finished job, its attempts and its logs");
            report.jobs.push(job);
            report.attempts += atts.len();
            report.log_files += files;
            report.log_bytes += bytes;
        }
    }
    let (blobs, blob_bytes) = collect_blobs(core, shared).await?;
    report.blobs = blobs;
    report.blob_bytes = blob_bytes;
    Ok(report)
}

/// Removes the blobs that no prompt's videos, no job's inputs and no job's
/// outputs name, once they are older than [`BLOB_GC_AGE_MIN_MS`]. The caller holds `blob_gc` for writing.
async fn collect_blobs(core: &Addr<CoreActor>, shared: &Shared) -> Result<(usize, u64), PruneError> {
    // Gathered in the core: a copy of every job would double the controller's memory at a million.
    let mut referenced: BTreeSet<Sha256> =
        core.send(BlobsInUse { except_prompt: None }).await.map_err(|_| PruneError::Stopping)?;
    let prompts = shared.reader.lock().unwrap_or_else(|e| e.into_inner()).prompts()?;
    referenced.extend(prompts.iter().flat_map(|p| p.videos.all().into_iter().map(|b| b.sha256)));
    let root = shared.blobs.root().join("sha256");
    let now = SystemTime::now();
    let (mut count, mut bytes) = (0, 0);
    for shard in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            let Some(sha) = entry.file_name().to_str().and_then(|n| n.parse::<Sha256>().ok()) else { continue };
            if referenced.contains(&sha) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or(Duration::ZERO);
            if age < Duration::from_millis(BLOB_GC_AGE_MIN_MS) {
                continue;
            }
            if std::fs::remove_file(entry.path()).is_ok() {
                tracing::info!(blob = %sha, bytes = meta.len(), reason = "no prompt, run or remaining job references it", "collected a blob");
                count += 1;
                bytes += meta.len();
            }
        }
    }
    Ok((count, bytes))
}

/// Time between two passes for a retention of `retain_ms`: a tenth of it,
/// within [`PASS_INTERVAL_MIN_MS`, `PASS_INTERVAL_MAX_MS`].
pub fn pass_interval_ms(retain_ms: u64) -> u64 {
    (retain_ms / 10).clamp(PASS_INTERVAL_MIN_MS, PASS_INTERVAL_MAX_MS)
}

/// Prunes what is older than `retain_ms` now and then, until the core is gone.
pub async fn keep(core: Addr<CoreActor>, shared: std::sync::Arc<Shared>, retain_ms: u64, retain_days: f64) {
    let why = format!("finished more than {retain_days} days ago (--retain-days)");
    loop {
        let before_ms = crate::shared::wall_ms().saturating_sub(retain_ms);
        match prune(&core, &shared, before_ms, &why).await {
            Ok(p) if !p.jobs.is_empty() || p.blobs > 0 => tracing::info!(
                jobs = p.jobs.len(),
                log_bytes = p.log_bytes,
                blobs = p.blobs,
                blob_bytes = p.blob_bytes,
                "retention pass done"
            ),
            Ok(_) => {}
            Err(PruneError::Stopping) => return,
            Err(e) => tracing::warn!(error = %e, "the retention pass failed; it runs again later"),
        }
        tokio::time::sleep(Duration::from_millis(pass_interval_ms(retain_ms))).await;
    }
}
