//! Attempts and jobs: an attempt starts, ends, and decides what becomes of its job
//! (success, retry after a backoff, failure, re-queue after a loss).

use super::*;

/// Doublings of the retry backoff before it stops growing: past this the
/// shift would overflow long before `retry_backoff_max_ms` matters.
const BACKOFF_DOUBLINGS_MAX: u32 = 20;

impl Core {
    pub(super) fn mark_started(&mut self, now: Now, att_id: AttemptId) {
        let Some(att) = self.live.get_mut(&att_id) else { return };
        if att.state != AttemptState::Assigned {
            return;
        }
        att.state = AttemptState::Running;
        att.started_ms = Some(now.wall_ms);
        let att = att.clone();
        self.ops.push(StoreOp::PutAttempt(att.clone()));
        let job = self.jobs.get_mut(&att.job_id).expect("attempts belong to jobs");
        if job.rec.started_ms.is_none() {
            job.rec.started_ms = Some(now.wall_ms);
        }
        if job.rec.state == JobState::Assigned {
            job.rec.state = JobState::Running;
        }
        self.put_job(att.job_id);
    }

    pub(super) fn stop_attempt(&mut self, now: Now, att_id: AttemptId) {
        let Some(att) = self.live.get_mut(&att_id) else { return };
        att.state = AttemptState::Stopping;
        let att = att.clone();
        self.ops.push(StoreOp::PutAttempt(att.clone()));
        self.event(now, Some(att.job_id), Some(att_id), Some(att.agent.clone()), "stopping", "cancel sent".into());
        if let Some(conn) = self.agent_by_name.get(&att.agent).and_then(|&i| self.agents[i].conn) {
            self.sends.push(Output::Send {
                conn,
                msg: ControllerMsg::Cancel { attempt_id: att_id, grace_ms: self.config.cancel_grace_ms },
            });
        }
    }

    /// A live attempt ended: free its GPUs and decide what becomes of its job.
    pub(super) fn attempt_ended(&mut self, now: Now, att_id: AttemptId, outcome: AttemptOutcome, held: &HeldBlobs) {
        let Some(mut att) = self.live.remove(&att_id) else { return };
        // A success that does not carry every required output (e.g. reported by an
        // agent restarted after the job ended, which no longer knows what it made),
        // or whose outputs are not safe in the blob store, would leave the user
        // nothing to download: run it again instead.
        let outcome = match (outcome, self.jobs.get(&att.job_id)) {
            (AttemptOutcome::Succeeded { outputs }, Some(job)) => {
                let unreported: Vec<&str> = job
                    .rec
                    .spec
                    .outputs
                    .iter()
                    .filter(|o| o.required && !outputs.iter().any(|r| r.path == o.path))
                    .map(|o| o.path.as_str())
                    .collect();
                let unheld: Vec<String> =
                    outputs.iter().filter(|o| !held.holds(o)).map(|o| format!("{} ({})", o.path, o.sha256)).collect();
                if !unreported.is_empty() {
                    AttemptOutcome::Failed {
                        exit_code: Some(0),
                        reason: format!(
                            "exited 0 but its required outputs did not reach the controller: {}",
                            unreported.join(", ")
                        ),
                        retry: cosmos_proto::Retry::Retryable,
                    }
                } else if !unheld.is_empty() {
                    AttemptOutcome::Failed {
                        exit_code: Some(0),
                        reason: format!(
                            "outputs not delivered: {} not in the controller's blob store; another attempt will run",
                            unheld.join(", ")
                        ),
                        retry: cosmos_proto::Retry::Retryable,
                    }
                } else {
                    AttemptOutcome::Succeeded { outputs }
                }
            }
            (outcome, _) => outcome,
        };
        if let Some(&idx) = self.agent_by_name.get(&att.agent) {
            let agent = &mut self.agents[idx];
            agent.attempts.remove(&att_id);
            for g in agent.gpus.iter_mut().filter(|g| g.holder == Some(att_id)) {
                g.holder = None;
            }
            self.reindex(idx);
        }
        self.dirty = true;
        att.ended_ms = Some(now.wall_ms);
        let job_id = att.job_id;
        let job = self.jobs.get_mut(&job_id).expect("attempts belong to jobs");
        job.live = None;
        if let Some(started) = att.started_ms {
            // Wall-clock stamps: a clock step while it ran skews this one figure, nothing else.
            let ran_ms = now.wall_ms.saturating_sub(started);
            job.rec.gpu_ms = job.rec.gpu_ms.saturating_add(ran_ms.saturating_mul(att.gpu_uuids.len() as u64));
        }
        let (attempt_state, reason) = match &outcome {
            AttemptOutcome::Succeeded { .. } => (AttemptState::Succeeded, None),
            AttemptOutcome::Failed { exit_code, reason, .. } => {
                att.exit_code = *exit_code;
                (AttemptState::Failed, Some(reason.clone()))
            }
            AttemptOutcome::Cancelled => (AttemptState::Cancelled, None),
            AttemptOutcome::Lost { reason } => (AttemptState::Lost, Some(reason.clone())),
            AttemptOutcome::Rejected { reason } => (AttemptState::Rejected, Some(reason.clone())),
        };
        att.state = attempt_state;
        att.reason = reason.clone();
        self.ops.push(StoreOp::PutAttempt(att.clone()));
        self.event(
            now,
            Some(job_id),
            Some(att_id),
            Some(att.agent.clone()),
            attempt_state.as_str(),
            reason.clone().unwrap_or_default(),
        );

        let job = self.jobs.get_mut(&job_id).expect("attempts belong to jobs");
        if job.rec.state.is_final() {
            return;
        }
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::SucceedTwice
            && matches!(outcome, AttemptOutcome::Succeeded { .. })
            && job.rec.exit_code != Some(0)
        {
            // The broken version: a success is mistaken for a reason to run again.
            job.rec.exit_code = Some(0);
            job.rec.state = JobState::Queued;
            self.put_job(job_id);
            self.enqueue_or_wait(now, job_id);
            return;
        }
        match outcome {
            AttemptOutcome::Succeeded { outputs } => {
                job.rec.outputs = outputs;
                job.rec.exit_code = Some(0);
                self.conclude(now, job_id, JobState::Succeeded, Some(0), None);
            }
            _ if job.rec.cancel_requested => {
                self.conclude(now, job_id, JobState::Cancelled, att.exit_code, Some("cancelled by user".into()));
            }
            AttemptOutcome::Failed { exit_code, reason, retry } => {
                let retryable = retry.is_retryable();
                job.rec.attempts_used += 1;
                let used = job.rec.attempts_used;
                if retryable && used < job.rec.spec.max_attempts {
                    let shift = (used - 1).min(BACKOFF_DOUBLINGS_MAX);
                    let delay = self
                        .config
                        .retry_backoff_base_ms
                        .saturating_mul(1 << shift)
                        .min(self.config.retry_backoff_max_ms);
                    job.rec.state = JobState::Retrying;
                    // Stored as wall time for users and for a restart to recompute from;
                    // waited out on the monotonic clock, which no clock step moves.
                    job.rec.not_before_ms = now.wall_ms + delay;
                    job.not_before_mono_ms = now.mono_ms + delay;
                    job.rec.exit_code = exit_code;
                    job.rec.error = Some(format!(
                        "attempt {used} failed: {}",
                        noted(&reason, &format!("; retrying in {delay} ms"))
                    ));
                    self.put_job(job_id);
                    self.enqueue_or_wait(now, job_id);
                } else {
                    let why = if retryable {
                        noted(&reason, &format!(" (after {used} of {} attempts)", job.rec.spec.max_attempts))
                    } else {
                        noted(&reason, " (not retryable)")
                    };
                    self.conclude(now, job_id, JobState::Failed, exit_code, Some(why));
                }
            }
            AttemptOutcome::Cancelled | AttemptOutcome::Lost { .. } | AttemptOutcome::Rejected { .. } => {
                job.rec.attempts_lost += 1;
                if job.rec.attempts_lost > self.config.lost_attempts_max {
                    let why = format!(
                        "lost or refused {} times; last: {}",
                        job.rec.attempts_lost,
                        reason.unwrap_or_default()
                    );
                    self.conclude(now, job_id, JobState::Failed, None, Some(why));
                } else {
                    job.rec.state = JobState::Queued;
                    self.put_job(job_id);
                    self.enqueue_or_wait(now, job_id);
                }
            }
        }
    }

    /// A job reached a final state; jobs that waited for it start (it
    /// succeeded) or end with it (it failed or was cancelled), and so on down.
    pub(super) fn conclude(
        &mut self,
        now: Now,
        job_id: JobId,
        state: JobState,
        exit_code: Option<i32>,
        error: Option<String>,
    ) {
        let mut work = vec![(job_id, state, exit_code, error)];
        while let Some((id, state, exit_code, error)) = work.pop() {
            let job = self.jobs.get_mut(&id).expect("concluded jobs exist");
            job.rec.state = state;
            job.rec.exit_code = exit_code.or(job.rec.exit_code);
            job.rec.error = error.clone();
            job.rec.finished_ms = Some(now.wall_ms);
            #[cfg(feature = "sabotage")]
            let unblock = self.config.sabotage != Sabotage::KeepBlockedWhenFinal;
            #[cfg(not(feature = "sabotage"))]
            let unblock = true;
            if unblock {
                self.blocked.remove(&id);
            }
            self.put_job(id);
            self.event(now, Some(id), None, None, state.as_str(), error.unwrap_or_default());
            for waiter in self.dependents.remove(&id).unwrap_or_default() {
                let Some(pending) = self.blocked.get_mut(&waiter) else { continue };
                if state == JobState::Succeeded {
                    pending.remove(&id);
                    if pending.is_empty() {
                        self.blocked.remove(&waiter);
                        self.enqueue_or_wait(now, waiter);
                    }
                } else {
                    #[cfg(feature = "sabotage")]
                    if self.config.sabotage == Sabotage::NoCascade {
                        continue;
                    }
                    let why = format!("not run: {id}, which it waited for, {}", state.as_str());
                    work.push((waiter, JobState::Cancelled, None, Some(why)));
                }
            }
        }
    }

    /// Puts a job that may run in the queue (or its retry backoff), or, while
    /// jobs it waits for have not succeeded, among the blocked ones. A job
    /// that may run first takes the inputs it was to take from their outputs;
    /// one it cannot take fails, naming it.
    pub(super) fn enqueue_or_wait(&mut self, now: Now, job_id: JobId) {
        let job = &self.jobs[&job_id];
        if job.rec.after.is_empty() && job.rec.inputs_from.is_empty() {
            // Most jobs: one lookup, not three (a restart enqueues a million of them).
            if job.rec.not_before_ms > 0 && job.rec.state == JobState::Retrying {
                self.backoff.insert((job.not_before_mono_ms, job_id));
            } else {
                self.ready.insert(&job.rec.spec, job_id);
            }
            self.dirty = true;
            return;
        }
        // A dependency that is gone (pruned history) counts as met.
        let pending: BTreeSet<JobId> = job
            .rec
            .after
            .iter()
            .copied()
            .filter(|d| self.jobs.get(d).is_some_and(|j| j.rec.state != JobState::Succeeded))
            .collect();
        if !pending.is_empty() {
            for &dep in &pending {
                self.dependents.entry(dep).or_default().push(job_id);
            }
            self.blocked.insert(job_id, pending);
            return;
        }
        if !self.jobs[&job_id].rec.inputs_from.is_empty() {
            if let Err(why) = self.take_inputs(job_id) {
                self.conclude(now, job_id, JobState::Failed, None, Some(why));
                return;
            }
            self.put_job(job_id);
        }
        let rec = &self.jobs[&job_id].rec;
        if rec.not_before_ms > 0 && rec.state == JobState::Retrying {
            self.backoff.insert((self.jobs[&job_id].not_before_mono_ms, job_id));
        } else {
            self.ready.insert(&rec.spec, job_id);
        }
        self.dirty = true;
    }

    /// Moves the inputs a job takes from its dependencies' outputs into its
    /// spec, now that they have all succeeded; the error names what is missing.
    fn take_inputs(&mut self, job_id: JobId) -> Result<(), String> {
        let wanted = std::mem::take(&mut self.jobs.get_mut(&job_id).expect("queued jobs exist").rec.inputs_from);
        let mut inputs = Vec::with_capacity(wanted.len());
        for f in &wanted {
            let found = self.jobs.get(&f.job).and_then(|d| d.rec.outputs.iter().find(|o| o.path == f.output));
            let Some(out) = found else {
                self.jobs.get_mut(&job_id).expect("queued jobs exist").rec.inputs_from = wanted.clone();
                return Err(format!(
                    "not run: it takes `{}` from {}, which ended without that output (or is gone)",
                    f.output, f.job
                ));
            };
            inputs.push(cosmos_proto::spec::InputArtifact {
                sha256: out.sha256,
                size_bytes: out.size_bytes,
                path: f.path.clone(),
            });
        }
        self.jobs.get_mut(&job_id).expect("queued jobs exist").rec.spec.inputs.extend(inputs);
        Ok(())
    }
}

/// `reason` with `note` at the end of its first line: an agent's reason may
/// quote the command's stderr on the lines under its summary, and a note
/// about the job belongs to the summary, not to the last quoted line.
fn noted(reason: &str, note: &str) -> String {
    match reason.split_once('\n') {
        Some((first, rest)) => format!("{first}{note}\n{rest}"),
        None => format!("{reason}{note}"),
    }
}
