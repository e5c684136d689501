//! The core's invariants, checked by its tests and by the simulator after every step.

use super::*;

impl Core {
    /// Checks the core's internal consistency; the simulator calls it after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut holders: HashMap<(&str, &str), AttemptId> = HashMap::new();
        for att in self.live.values() {
            for uuid in &att.gpu_uuids {
                if let Some(other) = holders.insert((att.agent.as_str(), uuid.as_str()), att.id) {
                    return Err(format!("GPU {uuid} on {} given to live attempts {other} and {}", att.agent, att.id));
                }
            }
            let job = self.jobs.get(&att.job_id).ok_or_else(|| format!("live attempt {} has no job", att.id))?;
            if job.live != Some(att.id) {
                return Err(format!("job {} does not point at its live attempt {}", att.job_id, att.id));
            }
        }
        for job in self.jobs.values() {
            let id = job.rec.id;
            if let Some(att) = job.live {
                if !self.live.contains_key(&att) {
                    return Err(format!("job {id} is lost: it waits on attempt {att}, which nothing tracks any more"));
                }
            }
            let queued = self.ready.contains(&job.rec.spec, id)
                || self.backoff.contains(&(job.not_before_mono_ms, id))
                || self.blocked.contains_key(&id);
            match (job.rec.state.is_final(), job.live, queued) {
                (true, None, false) | (false, Some(_), false) | (false, None, true) => {}
                other => {
                    return Err(format!("job {id} in state {:?} has (final, live, queued) = {other:?}", job.rec.state));
                }
            }
        }
        let mut counts = [0usize; ALL_JOB_STATES.len()];
        for job in self.jobs.values() {
            if job.counted != job.rec.state {
                // Every change of state is persisted (and counted) in the step that makes it.
                return Err(format!(
                    "job {} is {:?} but was last persisted as {:?}",
                    job.rec.id, job.rec.state, job.counted
                ));
            }
            counts[job.rec.state as usize] += 1;
        }
        if counts != self.job_counts {
            return Err(format!("jobs per state are {counts:?}, the running counts say {:?}", self.job_counts));
        }
        for (id, pending) in &self.blocked {
            for dep in pending {
                let state = self.jobs.get(dep).map(|j| j.rec.state);
                if state.is_none_or(|s| s.is_final()) {
                    return Err(format!("job {id} waits for {dep}, which is {state:?}: it can never start"));
                }
            }
        }
        let mut shapes: BTreeMap<(u32, u64), usize> = BTreeMap::new();
        for &(_, id) in &self.ready.order {
            let spec = &self.jobs[&id].rec.spec;
            *shapes.entry((spec.gpus, spec.min_free_vram_bytes)).or_insert(0) += 1;
        }
        if shapes != self.ready.shapes {
            return Err(format!("ready queue shape counts {:?} do not match its jobs {shapes:?}", self.ready.shapes));
        }
        for (idx, agent) in self.agents.iter().enumerate() {
            let indexed: Vec<u32> = self.free_index.iter().filter(|&&(_, i)| i == idx).map(|&(f, _)| f).collect();
            let expected: Vec<u32> = if agent.schedulable() { vec![agent.free_gpus()] } else { vec![] };
            if indexed != expected {
                return Err(format!("agent {} indexed with free GPUs {indexed:?}, expected {expected:?}", agent.name));
            }
            let armed: Vec<u64> = self.liveness.iter().filter(|&&(_, i)| i == idx).map(|&(at, _)| at).collect();
            let deadline: Vec<u64> = self.liveness_deadline(idx).into_iter().collect();
            if armed != deadline || agent.indexed_deadline != deadline.first().copied() {
                return Err(format!(
                    "agent {} indexed with liveness deadline {armed:?}, expected {deadline:?}",
                    agent.name
                ));
            }
        }
        Ok(())
    }
}
