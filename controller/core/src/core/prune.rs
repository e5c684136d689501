//! Pruning job history (`--retain-days`, `cosmos jobs prune --before DATE`):
//! finished jobs that ended before a time leave the core and the store,
//! unless a job that has not ended still names them (`after`, or an input it
//! takes from their outputs). Ids stay unique: the store keeps the highest
//! job and attempt ids ever given, so a pruned id is never given again.

use super::{Core, Now, Output};
use crate::records::StoreOp;
use cosmos_proto::JobId;
use std::collections::BTreeSet;

impl Core {
    /// Finished jobs that ended before `before_ms` (controller wall clock) and that no unfinished job names.
    pub fn prunable(&self, before_ms: u64) -> Vec<JobId> {
        let named: BTreeSet<JobId> = self
            .jobs
            .values()
            .filter(|j| !j.rec.state.is_final())
            .flat_map(|j| j.rec.after.iter().copied().chain(j.rec.inputs_from.iter().map(|i| i.job)))
            .collect();
        self.jobs
            .values()
            .filter(|j| j.rec.state.is_final() && j.live.is_none())
            .filter(|j| j.rec.finished_ms.is_some_and(|f| f < before_ms))
            .map(|j| j.rec.id)
            .filter(|id| !named.contains(id))
            .collect()
    }

    /// Removes those of `ids` that are still prunable before `before_ms`; returns them.
    pub fn prune(&mut self, now: Now, ids: &[JobId], before_ms: u64, out: &mut Vec<Output>) -> Vec<JobId> {
        let prunable: BTreeSet<JobId> = self.prunable(before_ms).into_iter().collect();
        let pruned: Vec<JobId> = ids.iter().copied().filter(|id| prunable.contains(id)).collect();
        if pruned.is_empty() {
            return pruned;
        }
        for id in &pruned {
            if let Some(job) = self.jobs.remove(id) {
                // The per-state counts answer `status` without a walk; a pruned job leaves the one it was counted in.
                self.job_counts[job.counted as usize] -= 1;
            }
            self.dependents.remove(id);
        }
        // A key whose jobs are all gone answers nothing any more; a repeat of it is a new submission.
        let gone: BTreeSet<JobId> = pruned.iter().copied().collect();
        self.submitted_keys.retain(|_, (_, jobs)| {
            jobs.retain(|j| !gone.contains(j));
            !jobs.is_empty()
        });
        self.ops.push(StoreOp::PruneJobs {
            jobs: pruned.clone(),
            job_id_max: JobId(self.next_job_id.saturating_sub(1)),
            attempt_id_max: cosmos_proto::AttemptId(self.next_attempt_id.saturating_sub(1)),
        });
        self.finish(now, out);
        pruned
    }
}
