//! Reconciliation: what a (re)connecting agent reports is the truth about what
//! runs there; attempts it runs that are no longer live are fenced off, their
//! GPUs held until it reports them gone.

use super::*;

impl Core {
    /// An agent completed its handshake and sent its hello on a new connection.
    pub fn on_connect(
        &mut self,
        now: Now,
        conn: ConnId,
        name: &str,
        hello: AgentHello,
        held: &HeldBlobs,
        out: &mut Vec<Output>,
    ) {
        let idx = self.agent_index(name, now);
        let heard_ms = self.deadline_clock_ms(now);
        if let Some(old) = self.agents[idx].conn.replace(conn) {
            self.conn_agent.remove(&old);
            self.sends.push(Output::Close { conn: old });
        }
        self.conn_agent.insert(conn, idx);
        let was_lost = self.agents[idx].health == Health::Lost;
        {
            let agent = &mut self.agents[idx];
            agent.last_heard_ms = heard_ms;
            agent.health = Health::Up;
            agent.gpus_simulated = hello.gpus_simulated;
            let old: HashMap<String, Gpu> = agent.gpus.drain(..).map(|g| (g.info.uuid.clone(), g)).collect();
            agent.gpus = hello
                .gpus
                .iter()
                .map(|info| match old.get(&info.uuid) {
                    Some(g) => Gpu { info: info.clone(), ..g.clone() },
                    None => new_gpu(info.clone()),
                })
                .collect();
            for g in &mut agent.gpus {
                g.holder = None;
            }
            agent.fenced.clear();
        }
        self.rearm(idx);
        self.sends.push(Output::Send {
            conn,
            msg: ControllerMsg::Welcome { epoch: self.epoch, heartbeat_interval_ms: self.config.heartbeat_interval_ms },
        });
        self.ops.push(StoreOp::PutAgent(self.agents[idx].record()));
        let verb = if was_lost { "returned" } else { "connected" };
        self.event(now, None, None, Some(name.to_string()), "agent_connected", format!("agent {name} {verb}"));

        // Reconcile: what the agent reports is the truth about what runs there.
        let reported: BTreeMap<AttemptId, &cosmos_proto::AttemptReport> =
            hello.attempts.iter().map(|r| (r.attempt_id, r)).collect();
        let mine: Vec<AttemptId> = self.agents[idx].attempts.iter().copied().collect();
        let mut finished_acks = Vec::new();
        for att_id in mine {
            match reported.get(&att_id).map(|r| &r.phase) {
                Some(AttemptPhase::Finished(outcome)) => {
                    finished_acks.push(att_id);
                    self.attempt_ended(now, att_id, outcome.clone(), held);
                }
                Some(AttemptPhase::Running { .. }) => self.mark_started(now, att_id),
                Some(AttemptPhase::Starting | AttemptPhase::Stopping) => {}
                None => self.attempt_ended(
                    now,
                    att_id,
                    AttemptOutcome::Lost {
                        reason: format!(
                            "agent {name} no longer knows the attempt (restarted, or the order never arrived)"
                        ),
                    },
                    held,
                ),
            }
        }
        let keep: Vec<AttemptId> = self.agents[idx].attempts.iter().copied().collect();
        for &att_id in &keep {
            let att = &self.live[&att_id];
            let gpu_uuids = att.gpu_uuids.clone();
            let stopping = att.state == AttemptState::Stopping;
            for uuid in gpu_uuids {
                if let Some(g) = self.agents[idx].gpus.iter_mut().find(|g| g.info.uuid == uuid) {
                    g.holder = Some(att_id);
                }
            }
            if stopping {
                self.sends.push(Output::Send {
                    conn,
                    msg: ControllerMsg::Cancel { attempt_id: att_id, grace_ms: self.config.cancel_grace_ms },
                });
            }
        }
        #[cfg(feature = "sabotage")]
        let fencing = self.config.sabotage != Sabotage::NoFencing;
        #[cfg(not(feature = "sabotage"))]
        let fencing = true;
        let mut keep = keep;
        for report in &hello.attempts {
            if keep.contains(&report.attempt_id) {
                continue;
            }
            if let AttemptPhase::Finished(_) = report.phase {
                finished_acks.push(report.attempt_id);
            } else if fencing {
                self.track_fenced(idx, report.attempt_id, &report.gpu_uuids);
            } else {
                keep.push(report.attempt_id);
            }
        }
        self.sends.push(Output::Send { conn, msg: ControllerMsg::Reconcile { epoch: self.epoch, keep } });
        if !finished_acks.is_empty() {
            self.sends.push(Output::Send { conn, msg: ControllerMsg::AckFinished { attempt_ids: finished_acks } });
        }
        if self.agents[idx].draining {
            self.sends.push(Output::Send { conn, msg: ControllerMsg::Drain { draining: true } });
        }
        self.reindex(idx);
        self.dirty = true;
        self.finish(now, out);
    }

    pub(super) fn track_fenced(&mut self, idx: usize, att_id: AttemptId, gpu_uuids: &[String]) {
        let agent = &mut self.agents[idx];
        let gpus: Vec<usize> =
            gpu_uuids.iter().filter_map(|u| agent.gpus.iter().position(|g| &g.info.uuid == u)).collect();
        for &i in &gpus {
            if agent.gpus[i].holder.is_none() {
                agent.gpus[i].holder = Some(att_id);
            }
        }
        agent.fenced.insert(att_id, gpus);
        if let Some(conn) = agent.conn {
            self.sends.push(Output::Send {
                conn,
                msg: ControllerMsg::Cancel { attempt_id: att_id, grace_ms: self.config.cancel_grace_ms },
            });
        }
    }

    pub(super) fn release_fenced(&mut self, idx: usize, att_id: AttemptId) {
        if let Some(gpus) = self.agents[idx].fenced.remove(&att_id) {
            for i in gpus {
                if self.agents[idx].gpus[i].holder == Some(att_id) {
                    self.agents[idx].gpus[i].holder = None;
                }
            }
            self.dirty = true;
        }
    }
}
