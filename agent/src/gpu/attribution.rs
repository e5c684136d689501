//! Which attempt a GPU process belongs to. NVML reports host pids; the
//! process runtime runs each attempt in a process group of its own (handle
//! `pgid:N`), the Docker runtime in a container (handle: the container id),
//! and `/proc/<pid>/cgroup` names a process's container. A process that left
//! its group (`setsid`, a double fork) still carries the attempt's
//! `COSMOS_ATTEMPT_ID` in `/proc/<pid>/environ`, readable by the agent's user
//! or root. A process no live or recently ended attempt claims is foreign,
//! and so is its memory.

use super::GpuSample;
use crate::core::{GpuProcess, GpuReading};
use cosmos_proto::{AttemptId, GpuUsage};
use std::collections::{BTreeMap, VecDeque};

/// Ended attempts whose handles are kept, so that processes outliving them are still known as theirs.
pub const ENDED_HANDLES_KEPT: usize = 1024;

/// Attempts' runtime handles, to attribute pids.
#[derive(Default)]
pub struct Owners {
    groups: BTreeMap<i32, AttemptId>,
    containers: BTreeMap<String, AttemptId>,
    /// `COSMOS_ATTEMPT_ID` values of the known attempts.
    env_ids: BTreeMap<String, AttemptId>,
    order: VecDeque<AttemptId>,
}

impl Owners {
    /// An attempt started with this runtime handle (`pgid:N` or a container id); others are ignored.
    pub fn insert(&mut self, attempt_id: AttemptId, handle: &str) {
        if let Some(pgid) = handle.strip_prefix("pgid:").and_then(|p| p.parse().ok()) {
            self.groups.insert(pgid, attempt_id);
        } else if handle.len() >= 12 && handle.chars().all(|c| c.is_ascii_hexdigit()) {
            self.containers.insert(handle.to_string(), attempt_id);
        } else {
            return;
        }
        self.env_ids.insert(attempt_id.to_string(), attempt_id);
        self.order.push_back(attempt_id);
        // Bounded: the oldest handles go (their processes, if any still live, then count as foreign).
        while self.order.len() > ENDED_HANDLES_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.groups.retain(|_, a| *a != old);
                self.containers.retain(|_, a| *a != old);
                self.env_ids.retain(|_, a| *a != old);
            }
        }
    }

    /// The attempt owning host process `pid`, from `/proc`.
    pub fn owner_of(&self, pid: u32) -> Option<AttemptId> {
        if let Some(pgid) = process_group(pid) {
            if let Some(a) = self.groups.get(&pgid) {
                return Some(*a);
            }
        }
        if !self.containers.is_empty() {
            if let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
                if let Some((_, a)) = self.containers.iter().find(|(id, _)| cgroup.contains(id.as_str())) {
                    return Some(*a);
                }
            }
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        environ
            .split(|&b| b == 0)
            .find_map(|var| var.strip_prefix(b"COSMOS_ATTEMPT_ID="))
            .and_then(|id| self.env_ids.get(std::str::from_utf8(id).ok()?))
            .copied()
    }
}

/// The process group of `pid`, from `/proc/<pid>/stat` (field 5, after the parenthesised name).
pub fn process_group(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// A sample with its processes attributed by `owner`; unattributed processes' memory is foreign.
pub fn reading(sample: &GpuSample, owner: impl Fn(u32) -> Option<AttemptId>) -> GpuReading {
    let processes: Vec<GpuProcess> = sample
        .processes
        .iter()
        .map(|p| GpuProcess { pid: p.pid, used_bytes: p.used_bytes, attempt_id: owner(p.pid) })
        .collect();
    let foreign: u64 = processes.iter().filter(|p| p.attempt_id.is_none()).filter_map(|p| p.used_bytes).sum();
    GpuReading {
        usage: GpuUsage {
            uuid: sample.uuid.clone(),
            used_vram_bytes: sample.used_bytes,
            free_vram_bytes: sample.free_bytes,
            foreign_vram_bytes: foreign.min(sample.used_bytes),
            utilization_pct: sample.utilization_pct,
            temperature_c: sample.temperature_c,
            healthy: true,
            quarantine: None,
        },
        processes,
        lost: sample.lost.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_process_in_an_attempts_group_is_its_and_others_are_foreign() {
        let mut child = std::process::Command::new("sleep").arg("30").process_group(0).spawn().unwrap();
        let pid = child.id();
        let mut owners = Owners::default();
        owners.insert(AttemptId(3), &format!("pgid:{pid}"));
        assert_eq!(owners.owner_of(pid), Some(AttemptId(3)));
        assert_eq!(owners.owner_of(std::process::id()), None, "the test itself is foreign");
        let sample = GpuSample {
            uuid: "GPU-x".into(),
            total_bytes: 10 << 30,
            used_bytes: 6 << 30,
            free_bytes: 4 << 30,
            reserved_bytes: 0,
            processes: vec![
                super::super::ProcessUse { pid, used_bytes: Some(4 << 30) },
                super::super::ProcessUse { pid: std::process::id(), used_bytes: Some(2 << 30) },
            ],
            utilization_pct: None,
            temperature_c: None,
            power_mw: None,
            lost: None,
        };
        let r = reading(&sample, |p| owners.owner_of(p));
        assert_eq!(r.usage.foreign_vram_bytes, 2 << 30);
        assert_eq!(r.processes[0].attempt_id, Some(AttemptId(3)));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(owners.owner_of(pid), None, "gone");
        // One that left the group still carries the attempt's id in its environment.
        let mut escaped = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .env("COSMOS_ATTEMPT_ID", AttemptId(3).to_string())
            .spawn()
            .unwrap();
        // spawn can return before the child's exec has set its environment.
        for _ in 0..200 {
            if std::fs::read(format!("/proc/{}/environ", escaped.id())).is_ok_and(|e| !e.is_empty()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(owners.owner_of(escaped.id()), Some(AttemptId(3)));
        escaped.kill().unwrap();
        escaped.wait().unwrap();
    }
}
