//! Simulated GPUs: for hosts without NVIDIA GPUs (`--simulated-gpus`, shown
//! as such in `cosmos status`) and for tests. A [`SimulatedGpus`] starts idle;
//! its [`SimulatedGpuHandle`] puts processes, held memory, lost GPUs and
//! events on it, as the fake NVML library's scenario file does for NVML.

use super::{DiscoveredGpu, Discovery, EventWatch, GpuSample, GpuSource, HealthEvent, Metric, ProcessUse};
use cosmos_proto::GpuInfo;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What one simulated GPU holds.
#[derive(Clone, Debug, Default)]
pub struct SimulatedGpuState {
    /// Processes and their bytes (`None`: not available).
    pub processes: Vec<ProcessUse>,
    /// Memory held with no process listed.
    pub unlisted_bytes: u64,
    /// Reads fail as for a GPU fallen off the bus.
    pub lost: bool,
}

#[derive(Default)]
struct Shared {
    gpus: Vec<SimulatedGpuState>,
    events: VecDeque<HealthEvent>,
}

/// Changes what simulated GPUs report; clones share the GPUs.
#[derive(Clone, Default)]
pub struct SimulatedGpuHandle {
    shared: Arc<(Mutex<Shared>, Condvar)>,
}

impl SimulatedGpuHandle {
    /// Sets GPU `index`'s state.
    pub fn set(&self, index: usize, state: SimulatedGpuState) {
        let mut s = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = s.gpus.get_mut(index) {
            *g = state;
        }
    }

    /// Queues a health event.
    pub fn push_event(&self, event: HealthEvent) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).events.push_back(event);
        cv.notify_all();
    }
}

/// GPUs that exist only in memory.
pub struct SimulatedGpus {
    discovery: Discovery,
    handle: SimulatedGpuHandle,
}

impl SimulatedGpus {
    /// These GPUs, idle.
    pub fn new(gpus: Vec<GpuInfo>) -> SimulatedGpus {
        let handle = SimulatedGpuHandle::default();
        handle.shared.0.lock().unwrap_or_else(|e| e.into_inner()).gpus = vec![SimulatedGpuState::default(); gpus.len()];
        let gpus = gpus.into_iter().map(|info| DiscoveredGpu { info, mig: None }).collect();
        let discovery = Discovery { gpus, driver_version: "simulated".into(), nvml_version: "simulated".into() };
        SimulatedGpus { discovery, handle }
    }

    /// The handle that changes what they report.
    pub fn handle(&self) -> SimulatedGpuHandle {
        self.handle.clone()
    }
}

impl GpuSource for SimulatedGpus {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        let s = self.handle.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        self.discovery
            .gpus
            .iter()
            .zip(&s.gpus)
            .map(|(g, st)| {
                let total = g.info.total_vram_bytes;
                let used =
                    (st.processes.iter().filter_map(|p| p.used_bytes).sum::<u64>() + st.unlisted_bytes).min(total);
                GpuSample {
                    uuid: g.info.uuid.clone(),
                    total_bytes: total,
                    used_bytes: if st.lost { 0 } else { used },
                    free_bytes: if st.lost { 0 } else { total - used },
                    reserved_bytes: 0,
                    processes: if st.lost { Vec::new() } else { st.processes.clone() },
                    utilization_pct: None,
                    temperature_c: None,
                    power_mw: None,
                    lost: st.lost.then(|| "simulated: GPU is lost".to_string()),
                }
            })
            .collect()
    }

    fn unsupported(&self) -> Vec<(String, Metric)> {
        let mut out = Vec::new();
        for g in &self.discovery.gpus {
            // Simulated GPUs have no sensors at all.
            for m in [Metric::Utilization, Metric::Temperature, Metric::Power] {
                out.push((g.info.uuid.clone(), m));
            }
        }
        out
    }

    fn events(&mut self) -> Option<Box<dyn EventWatch>> {
        Some(Box::new(SimulatedEvents { handle: self.handle.clone() }))
    }
}

struct SimulatedEvents {
    handle: SimulatedGpuHandle,
}

impl EventWatch for SimulatedEvents {
    fn wait(&mut self, timeout_ms: u32) -> Option<HealthEvent> {
        let (lock, cv) = &*self.handle.shared;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (mut guard, _) = cv
            .wait_timeout_while(guard, Duration::from_millis(u64::from(timeout_ms)), |s| s.events.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        guard.events.pop_front()
    }
}
