//! Liveness: hosts turning suspect and lost on the monotonic clock, retry
//! backoffs ending, and when the core next needs waking.

use super::*;

impl Core {
    /// Time passed: liveness of hosts, retry backoffs, then scheduling.
    pub fn tick(&mut self, now: Now, out: &mut Vec<Output>) {
        // Only the hosts whose deadline has come, in the order of a walk of all of them.
        let now_ms = self.deadline_clock_ms(now);
        let mut due: Vec<usize> = self.liveness.range(..=(now_ms, usize::MAX)).map(|&(_, idx)| idx).collect();
        due.sort_unstable();
        for idx in due {
            let silence = self.deadline_clock_ms(now).saturating_sub(self.agents[idx].last_heard_ms);
            match self.agents[idx].health {
                Health::Lost => {}
                _ if silence >= self.config.lost_after_ms => self.agent_lost(now, idx, silence),
                Health::Up if silence >= self.config.suspect_after_ms => {
                    self.agents[idx].health = Health::Suspect;
                    self.reindex(idx);
                    self.rearm(idx);
                    let name = self.agents[idx].name.clone();
                    self.event(
                        now,
                        None,
                        None,
                        Some(name.clone()),
                        "agent_suspect",
                        format!("agent {name} silent for {silence} ms"),
                    );
                }
                _ => {}
            }
        }
        while let Some(&(at, id)) = self.backoff.first() {
            if at > now.mono_ms {
                break;
            }
            self.backoff.remove(&(at, id));
            self.ready.insert(&self.jobs[&id].rec.spec, id);
            self.dirty = true;
        }
        self.finish(now, out);
    }

    /// When [`Core::tick`] next has work, on the monotonic clock (`Now::mono_ms`):
    /// a host turning suspect or lost, a retry backoff ending. A shell sleeps
    /// until then, or until its next input; ticking earlier changes nothing.
    /// `None`: no deadline is pending.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.dirty {
            // Recovered and not yet scheduled: due at once.
            return Some(0);
        }
        let liveness = self.liveness.first().map(|&(at, _)| at);
        let backoff = self.backoff.first().map(|&(at, _)| at);
        liveness.into_iter().chain(backoff).min()
    }

    /// When a host next turns suspect or lost, on the deadline clock; `None` once lost.
    pub(super) fn liveness_deadline(&self, idx: usize) -> Option<u64> {
        let a = &self.agents[idx];
        match a.health {
            Health::Lost => None,
            Health::Up => Some(a.last_heard_ms + self.config.suspect_after_ms.min(self.config.lost_after_ms)),
            Health::Suspect => Some(a.last_heard_ms + self.config.lost_after_ms),
        }
    }

    /// Puts a host under its current deadline in the liveness index, or takes it
    /// out once lost. Call after any change to its health or `last_heard_ms`.
    pub(super) fn rearm(&mut self, idx: usize) {
        let deadline = self.liveness_deadline(idx);
        let agent = &mut self.agents[idx];
        if agent.indexed_deadline == deadline {
            return;
        }
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::StaleLivenessIndex && agent.indexed_deadline.is_some() {
            return;
        }
        if let Some(at) = agent.indexed_deadline.take() {
            self.liveness.remove(&(at, idx));
        }
        if let Some(at) = deadline {
            agent.indexed_deadline = Some(at);
            #[cfg(feature = "sabotage")]
            if self.config.sabotage == Sabotage::UnindexedLivenessDeadline {
                return;
            }
            self.liveness.insert((at, idx));
        }
    }

    pub(super) fn agent_lost(&mut self, now: Now, idx: usize, silence_ms: u64) {
        let name = self.agents[idx].name.clone();
        self.agents[idx].health = Health::Lost;
        self.reindex(idx);
        self.rearm(idx);
        // Whatever it says from now on must come through a new connection and
        // its reconciliation, so the attempts given up here get fenced off.
        if let Some(conn) = self.agents[idx].conn.take() {
            self.conn_agent.remove(&conn);
            self.sends.push(Output::Close { conn });
        }
        self.event(
            now,
            None,
            None,
            Some(name.clone()),
            "agent_lost",
            format!("agent {name} silent for {silence_ms} ms; its attempts are re-queued"),
        );
        let attempts: Vec<AttemptId> = self.agents[idx].attempts.iter().copied().collect();
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::ForgetLostAttempts {
            self.agents[idx].attempts.clear();
            for a in attempts {
                self.live.remove(&a);
            }
            return;
        }
        for att_id in attempts {
            let reason = format!("agent {name} was lost (silent for {silence_ms} ms)");
            self.attempt_ended(now, att_id, AttemptOutcome::Lost { reason }, &HeldBlobs::none());
        }
        // Whatever it still runs will be fenced off when it reconnects.
        self.agents[idx].fenced.clear();
        for g in &mut self.agents[idx].gpus {
            g.holder = None;
        }
    }

    /// The clock deadlines are measured on.
    pub(super) fn deadline_clock_ms(&self, now: Now) -> u64 {
        #[cfg(feature = "sabotage")]
        if self.config.sabotage == Sabotage::WallClockDeadlines {
            return now.wall_ms;
        }
        now.mono_ms
    }

    pub(super) fn heard(&mut self, now: Now, idx: usize) {
        let heard_ms = self.deadline_clock_ms(now);
        let agent = &mut self.agents[idx];
        agent.last_heard_ms = heard_ms;
        if agent.health == Health::Suspect && agent.conn.is_some() {
            self.agents[idx].health = Health::Up;
            self.reindex(idx);
            self.dirty = true;
        }
        self.rearm(idx);
    }
}
