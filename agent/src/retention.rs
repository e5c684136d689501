//! Retention of finished attempts' directories (`WORK_DIR/attempts/att-N`):
//! once the controller has acknowledged an attempt (its outcome and outputs are
//! recorded there: the acknowledgement line of its `attempt.jsonl`, or the
//! `acknowledged` marker of the Docker runtime and of older agents), its
//! directory is kept for a retention period, then removed; earlier, oldest
//! first, when the work disk's free space falls below its floor. A directory
//! that is not acknowledged — a live attempt's, or one whose outputs have not
//! reached the controller — is never removed. Every removal is logged with
//! what was removed and why.
//!
//! [`choose`] decides (no I/O); [`sweep`] looks at the disk and removes.

use crate::process::acknowledged_unix_ms;
use cosmos_proto::AttemptId;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Default time a delivered attempt's directory is kept: a week.
pub const ATTEMPT_RETAIN_S_DEFAULT: u64 = 7 * 24 * 3600;
/// Default floor of free space on the work disk, below which delivered attempts go early.
pub const WORK_DISK_FREE_MIN_GIB_DEFAULT: u64 = 10;
/// Time between two sweeps.
pub const SWEEP_INTERVAL_MS: u64 = 10_000;

/// What is kept, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long a delivered attempt's directory is kept after its acknowledgement, in seconds.
    pub retain_s: u64,
    /// Free bytes the work disk should keep; below it delivered attempts go early, oldest first.
    pub disk_free_min_bytes: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { retain_s: ATTEMPT_RETAIN_S_DEFAULT, disk_free_min_bytes: WORK_DISK_FREE_MIN_GIB_DEFAULT << 30 }
    }
}

/// A delivered attempt's directory that may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Its directory.
    pub dir: PathBuf,
    /// Seconds since the controller acknowledged it.
    pub age_s: u64,
    /// Bytes it holds (what removing it frees).
    pub bytes: u64,
}

/// Why a directory goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// Its retention period passed.
    Expired {
        /// Seconds since its acknowledgement.
        age_s: u64,
        /// The period.
        retain_s: u64,
    },
    /// The work disk is low on space.
    DiskLow {
        /// Free bytes before this removal.
        free_bytes: u64,
        /// The floor.
        free_min_bytes: u64,
    },
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Expired { age_s, retain_s } => {
                write!(f, "delivered {age_s} s ago, past its retention of {retain_s} s (--attempt-retain-s)")
            }
            Why::DiskLow { free_bytes, free_min_bytes } => write!(
                f,
                "the work disk has {} MiB free, below its floor of {} MiB (--work-disk-free-min-gib); oldest delivered attempts go first",
                free_bytes >> 20,
                free_min_bytes >> 20
            ),
        }
    }
}

/// Which candidates go, and why: every expired one, then — while the disk
/// stays below its floor — the oldest of the rest. `candidates` may come in
/// any order; live attempts are never among them (see [`sweep`]).
pub fn choose(candidates: &[Candidate], policy: &Policy, free_bytes: u64) -> Vec<(usize, Why)> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Oldest first; ties by attempt id, so the choice is the same on every run.
    order.sort_by_key(|&i| (std::cmp::Reverse(candidates[i].age_s), candidates[i].attempt_id));
    let mut free = free_bytes;
    let mut chosen = Vec::new();
    for i in order {
        let c = &candidates[i];
        if c.age_s >= policy.retain_s {
            chosen.push((i, Why::Expired { age_s: c.age_s, retain_s: policy.retain_s }));
        } else if free < policy.disk_free_min_bytes {
            chosen.push((i, Why::DiskLow { free_bytes: free, free_min_bytes: policy.disk_free_min_bytes }));
        } else {
            continue;
        }
        free = free.saturating_add(c.bytes);
    }
    chosen
}

/// What one sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Attempts whose directories were removed.
    pub removed: Vec<AttemptId>,
    /// Bytes freed.
    pub bytes: u64,
}

/// Looks at `attempts_root/attempts`, removes what [`choose`] picks — never
/// the directory of an attempt in `live` nor of one not acknowledged — and
/// logs each removal. Blocking: run it off the agent's loop.
pub fn sweep(attempts_root: &Path, live: &BTreeSet<AttemptId>, policy: &Policy) -> Swept {
    let dir = attempts_root.join("attempts");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Swept::default() };
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let free = free_bytes(attempts_root);
    let low = free.is_some_and(|f| f < policy.disk_free_min_bytes);
    let mut candidates = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(attempt_id) = attempt_of(&path) else { continue };
        if live.contains(&attempt_id) {
            continue;
        }
        let Some(acked_ms) = acknowledged_unix_ms(&path) else { continue };
        let age_s = now_ms.saturating_sub(acked_ms) / 1000;
        // Sizes matter only to know when enough is freed; walking every tree each sweep would not.
        let bytes = if low || age_s >= policy.retain_s { tree_bytes(&path) } else { 0 };
        candidates.push(Candidate { attempt_id, dir: path, age_s, bytes });
    }
    let mut swept = Swept::default();
    for (i, why) in choose(&candidates, policy, free.unwrap_or(u64::MAX)) {
        let c = &candidates[i];
        match std::fs::remove_dir_all(&c.dir) {
            Ok(()) => {
                match why {
                    Why::Expired { .. } => {
                        tracing::info!(attempt = %c.attempt_id, dir = %c.dir.display(), bytes = c.bytes, reason = %why, "removed a finished attempt's directory")
                    }
                    Why::DiskLow { .. } => {
                        tracing::warn!(attempt = %c.attempt_id, dir = %c.dir.display(), bytes = c.bytes, reason = %why, "removed a finished attempt's directory early")
                    }
                }
                swept.removed.push(c.attempt_id);
                swept.bytes += c.bytes;
            }
            Err(e) => {
                tracing::warn!(attempt = %c.attempt_id, dir = %c.dir.display(), error = %e, reason = %why, "cannot remove a finished attempt's directory")
            }
        }
    }
    if low && free_bytes(attempts_root).is_some_and(|f| f < policy.disk_free_min_bytes) {
        tracing::warn!(
            dir = %attempts_root.display(),
            free_min_bytes = policy.disk_free_min_bytes,
            "the work disk stays below its floor with every delivered attempt removed: live attempts and the input cache hold the rest"
        );
    }
    swept
}

/// `att-N` directories only: anything else under `attempts/` is not ours to remove.
fn attempt_of(path: &Path) -> Option<AttemptId> {
    let name = path.file_name()?.to_str()?;
    let n = name.strip_prefix("att-")?.parse().ok()?;
    (crate::runtime::attempt_dir(path.parent()?.parent()?, AttemptId(n)) == path).then_some(AttemptId(n))
}

fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).map_or(0, |entries| entries.flatten().map(|e| tree_bytes(&e.path())).sum())
}

/// Free bytes for an unprivileged user on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) writes into the struct we pass; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, age_s: u64, bytes: u64) -> Candidate {
        Candidate { attempt_id: AttemptId(id), dir: PathBuf::from(format!("/w/attempts/att-{id}")), age_s, bytes }
    }

    #[test]
    fn expired_attempts_go_and_recent_ones_stay() {
        let policy = Policy { retain_s: 100, disk_free_min_bytes: 10 };
        let chosen = choose(&[c(1, 150, 5), c(2, 50, 5), c(3, 100, 5)], &policy, 1_000);
        let ids: Vec<u64> = chosen.iter().map(|(i, _)| [1, 2, 3][*i]).collect();
        assert_eq!(ids, [1, 3]);
        assert!(chosen.iter().all(|(_, w)| matches!(w, Why::Expired { retain_s: 100, .. })));
    }

    #[test]
    fn a_low_disk_takes_the_oldest_first_until_enough_is_free() {
        let policy = Policy { retain_s: 1_000, disk_free_min_bytes: 100 };
        // 40 free: the oldest (att-2, 30 bytes) brings 70, the next (att-3) 110: enough.
        let chosen = choose(&[c(1, 10, 50), c(2, 300, 30), c(3, 200, 40), c(4, 20, 1)], &policy, 40);
        let ids: Vec<u64> = chosen.iter().map(|(i, _)| [1, 2, 3, 4][*i]).collect();
        assert_eq!(ids, [2, 3]);
        assert_eq!(chosen[0].1, Why::DiskLow { free_bytes: 40, free_min_bytes: 100 });
        assert_eq!(chosen[1].1, Why::DiskLow { free_bytes: 70, free_min_bytes: 100 });
    }

    #[test]
    fn sweep_removes_only_acknowledged_attempts_not_live_ones() {
        let root = tempfile::tempdir().unwrap();
        // Odd attempts in the record-file layout, even ones in the marker layout (Docker's, older agents').
        let mk = |id: u64, acked: bool| {
            let d = crate::runtime::attempt_dir(root.path(), AttemptId(id));
            std::fs::create_dir_all(d.join("outputs")).unwrap();
            std::fs::write(d.join("outputs/out.bin"), vec![0u8; 1000]).unwrap();
            let log = d.join(crate::process::RECORD_LOG);
            if id % 2 == 1 {
                std::fs::File::create(&log).unwrap();
            }
            if acked && id % 2 == 1 {
                let entry = crate::supervise::Entry::<()>::Acknowledged { unix_ms: crate::runtime::unix_ms() };
                crate::supervise::append_entry(&log, &entry).unwrap();
            } else if acked {
                std::fs::write(d.join(crate::process::ACK_FILE), b"").unwrap();
            }
            d
        };
        let (delivered, unacked, live) = (mk(1, true), mk(2, false), mk(3, true));
        std::fs::create_dir_all(root.path().join("attempts/not-an-attempt")).unwrap();
        let policy = Policy { retain_s: 0, disk_free_min_bytes: 0 };
        let swept = sweep(root.path(), &BTreeSet::from([AttemptId(3)]), &policy);
        assert_eq!(swept.removed, [AttemptId(1)]);
        assert!(swept.bytes >= 1000, "{swept:?}");
        assert!(!delivered.exists() && unacked.exists() && live.exists());
        assert!(root.path().join("attempts/not-an-attempt").exists());
        // A disk "always low" takes every delivered attempt, still never a live one.
        mk(4, true);
        mk(5, false);
        let policy = Policy { retain_s: u64::MAX, disk_free_min_bytes: u64::MAX };
        let swept = sweep(root.path(), &BTreeSet::from([AttemptId(3)]), &policy);
        assert_eq!(swept.removed, [AttemptId(4)]);
        assert!(live.exists() && unacked.exists());
    }
}
