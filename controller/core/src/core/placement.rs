//! Placement: which queued job goes to which GPUs of which host.
//!
//! Best fit by free GPUs (and free VRAM), in priority then submission order;
//! a job that fits no host now reserves the host closest to fitting it, so
//! smaller jobs cannot starve it.

use super::*;

impl Core {
    pub(super) fn schedule(&mut self, now: Now) {
        // A job that finds no room reserves the host closest to fitting it, and
        // other jobs may not use that host: as its attempts end it drains towards
        // the waiting job while the rest of the cluster keeps backfilling. The
        // reservation is dropped when its job runs or ends, or its host can no
        // longer serve it (drained, lost, GPUs gone), so nobody waits on a host for nothing.
        if let Some((holder, host)) = self.reservation {
            let waiting = self.jobs.get(&holder).is_some_and(|j| j.live.is_none() && !j.rec.state.is_final());
            let spec = &self.jobs[&holder].rec.spec;
            if !waiting
                || !self.agents[host].schedulable()
                || !self.could_hold(host, spec.gpus, spec.min_free_vram_bytes)
            {
                self.reservation = None;
            }
        }
        // Shapes (GPUs, VRAM) that found no host this pass: any job at least as
        // demanding is skipped without searching, which keeps a pass cheap when
        // the queue is long and the cluster full.
        let mut failed: Vec<(u32, u64)> = Vec::new();
        let mut holder_tried = false;
        let mut cursor = self.ready.first();
        while let Some(key) = cursor {
            cursor = self.ready.after(key);
            // With no GPU free anywhere only a job that needs none can start (shapes sort by GPU count).
            let needs_none_queued = self.ready.shapes.keys().next().is_some_and(|&(gpus, _)| gpus == 0);
            if self.free_index.last().is_none_or(|&(free, _)| free == 0) && !needs_none_queued {
                break;
            }
            let job_id = key.1;
            let spec = &self.jobs[&job_id].rec.spec;
            let shape = (spec.gpus, spec.min_free_vram_bytes);
            let is_holder = self.reservation.is_some_and(|(h, _)| h == job_id);
            if !is_holder && failed.iter().any(|&(g, v)| shape.0 >= g && shape.1 >= v) {
                continue;
            }
            let exclude = self.reservation.filter(|_| !is_holder).map(|(_, host)| host);
            match self.find_host(shape.0, shape.1, exclude) {
                Some((idx, gpus)) => {
                    #[cfg(feature = "sabotage")]
                    if self.config.sabotage == Sabotage::StaleShapeCounts {
                        self.ready.order.remove(&key);
                    }
                    self.ready.remove(&self.jobs[&job_id].rec.spec, job_id);
                    if is_holder {
                        self.reservation = None;
                    }
                    self.assign(now, job_id, idx, gpus);
                }
                None => {
                    if is_holder {
                        holder_tried = true;
                    } else {
                        failed.push(shape);
                    }
                    // Every shape still queued is at least as demanding as one that
                    // just failed: nothing further can be placed (a long queue of
                    // VRAM-blocked jobs would otherwise be walked in full).
                    let hopeless =
                        self.ready.shapes.keys().all(|&(g, v)| failed.iter().any(|&(fg, fv)| g >= fg && v >= fv));
                    if hopeless && (self.reservation.is_none() || holder_tried) {
                        break;
                    }
                    if self.reservation.is_none() {
                        // Tried without exclusions: this job is the one to wait for.
                        self.reservation = self.reserve_for(shape.0, shape.1).map(|host| (job_id, host));
                        holder_tried = true;
                    }
                    // Nothing smaller exists; stop, unless the holder is still to come.
                    if (shape.0 == 0 || (shape == (1, 0) && !needs_none_queued)) && holder_tried {
                        break;
                    }
                }
            }
        }
    }

    /// Whether a host could run a job of this shape once its GPUs are free.
    pub(super) fn could_hold(&self, idx: usize, gpus: u32, min_vram: u64) -> bool {
        let capable = self.agents[idx].gpus.iter().filter(|g| g.healthy && g.info.total_vram_bytes >= min_vram).count();
        capable as u32 >= gpus
    }

    /// Best fit: the schedulable host with the fewest free GPUs that still has
    /// `gpus` healthy free ones with `min_vram` each; on it, the GPUs with most free VRAM.
    pub(super) fn find_host(&self, gpus: u32, min_vram: u64, exclude: Option<usize>) -> Option<(usize, Vec<usize>)> {
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::DoubleBookGpus {
            let idx = self.agents.iter().position(|a| a.schedulable() && a.gpus.len() as u32 >= gpus)?;
            return Some((idx, (0..gpus as usize).collect()));
        }
        for &(free, idx) in self.free_index.range((gpus, 0)..) {
            debug_assert!(free >= gpus);
            if Some(idx) == exclude {
                continue;
            }
            let mut candidates: Vec<usize> = self.agents[idx]
                .gpus
                .iter()
                .enumerate()
                .filter(|(_, g)| g.holder.is_none() && g.healthy && g.free_vram_bytes >= min_vram)
                .map(|(i, _)| i)
                .collect();
            if candidates.len() as u32 >= gpus {
                let gpu_list = &self.agents[idx].gpus;
                candidates.sort_by_key(|&i| (Reverse(gpu_list[i].free_vram_bytes), i));
                candidates.truncate(gpus as usize);
                return Some((idx, candidates));
            }
        }
        None
    }

    /// The host a blocked job should wait for: among schedulable hosts that
    /// could hold it once empty, the one with most free GPUs. None if no host
    /// ever could (its VRAM need is beyond every GPU): reserving would idle a host for nothing.
    pub(super) fn reserve_for(&self, gpus: u32, min_vram: u64) -> Option<usize> {
        self.free_index.iter().rev().map(|&(_, idx)| idx).find(|&idx| self.could_hold(idx, gpus, min_vram))
    }

    pub(super) fn assign(&mut self, now: Now, job_id: JobId, idx: usize, gpus: Vec<usize>) {
        let att_id = AttemptId(self.next_attempt_id);
        self.next_attempt_id += 1;
        let agent = &mut self.agents[idx];
        let gpu_uuids: Vec<String> = gpus.iter().map(|&i| agent.gpus[i].info.uuid.clone()).collect();
        for &i in &gpus {
            agent.gpus[i].holder = Some(att_id);
        }
        agent.attempts.insert(att_id);
        let conn = agent.conn.expect("schedulable agents are connected");
        let agent_name = agent.name.clone();
        self.reindex(idx);
        let att = AttemptRecord {
            id: att_id,
            job_id,
            agent: agent_name.clone(),
            gpu_uuids: gpu_uuids.clone(),
            epoch: self.epoch,
            state: AttemptState::Assigned,
            assigned_ms: now.wall_ms,
            started_ms: None,
            ended_ms: None,
            exit_code: None,
            reason: None,
        };
        self.ops.push(StoreOp::PutAttempt(att.clone()));
        self.live.insert(att_id, att);
        let job = self.jobs.get_mut(&job_id).expect("queued jobs exist");
        job.live = Some(att_id);
        job.progress = None;
        job.rec.state = JobState::Assigned;
        job.rec.agent = Some(agent_name.clone());
        let spec = job.rec.spec.clone();
        self.put_job(job_id);
        self.event(
            now,
            Some(job_id),
            Some(att_id),
            Some(agent_name),
            "assigned",
            format!("GPUs {}", gpu_uuids.join(",")),
        );
        self.sends.push(Output::Send {
            conn,
            msg: ControllerMsg::Assign(Box::new(Assign {
                epoch: self.epoch,
                attempt_id: att_id,
                job_id,
                spec,
                gpu_uuids,
                trace: TraceContext::default(),
            })),
        });
    }
}

/// Jobs waiting for GPUs, by priority then submission order, with a count of
/// each (GPUs, VRAM) shape among them so a pass knows when nothing can fit.
#[derive(Default)]
pub(super) struct ReadyQueue {
    /// Jobs in placement order: priority, then submission.
    pub(super) order: BTreeSet<(Reverse<i32>, JobId)>,
    /// How many queued jobs need each (GPU count, VRAM) shape.
    pub(super) shapes: BTreeMap<(u32, u64), usize>,
}

impl ReadyQueue {
    pub(super) fn insert(&mut self, spec: &JobSpec, id: JobId) {
        if self.order.insert((Reverse(spec.priority), id)) {
            *self.shapes.entry((spec.gpus, spec.min_free_vram_bytes)).or_insert(0) += 1;
        }
    }

    pub(super) fn remove(&mut self, spec: &JobSpec, id: JobId) {
        if self.order.remove(&(Reverse(spec.priority), id)) {
            let shape = (spec.gpus, spec.min_free_vram_bytes);
            if let Some(n) = self.shapes.get_mut(&shape) {
                *n -= 1;
                if *n == 0 {
                    self.shapes.remove(&shape);
                }
            }
        }
    }

    pub(super) fn contains(&self, spec: &JobSpec, id: JobId) -> bool {
        self.order.contains(&(Reverse(spec.priority), id))
    }

    pub(super) fn first(&self) -> Option<(Reverse<i32>, JobId)> {
        self.order.first().copied()
    }

    pub(super) fn after(&self, key: (Reverse<i32>, JobId)) -> Option<(Reverse<i32>, JobId)> {
        self.order.range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded)).next().copied()
    }

    pub(super) fn len(&self) -> usize {
        self.order.len()
    }
}
