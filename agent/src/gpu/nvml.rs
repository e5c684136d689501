//! The real GPU source: NVML through `nvml-wrapper`, loaded at run time
//! (`Nvml::builder().lib_path(…)`), so the binary has no build or link
//! dependency on the driver.

use super::{
    DiscoveredGpu, Discovery, EventWatch, GpuError, GpuSample, GpuSelection, GpuSource, HealthEvent, Metric, ProcessUse,
};
use cosmos_proto::GpuInfo;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

/// The library NVML lives in on a Linux host with the NVIDIA driver.
pub const DEFAULT_NVML_LIB: &str = "libnvidia-ml.so.1";
/// How long the event thread waits in NVML before it looks whether it should stop.
const EVENT_WAIT_MS: u32 = 200;
/// How long asking for events waits for the event thread to have registered the GPUs:
/// NVML delivers no event from before registration, so returning earlier could lose one.
const EVENT_REGISTER_WAIT_MS: u64 = 5_000;

/// One offered GPU: its NVML index and what it was found not to support.
struct Offered {
    index: u32,
    uuid: String,
    total_bytes: u64,
    unsupported: BTreeSet<Metric>,
}

/// GPUs read through NVML. The handle is owned here; [`super::monitor`]
/// keeps the source on one thread, and only the event thread shares it.
pub struct NvmlSource {
    nvml: Arc<Nvml>,
    discovery: Discovery,
    offered: Vec<Offered>,
}

impl NvmlSource {
    /// Loads NVML from `lib_path` and discovers the GPUs `selection` offers.
    pub fn open(lib_path: &str, selection: &GpuSelection) -> Result<NvmlSource, GpuError> {
        let path = lib_path.to_string();
        // A static musl program's dlopen always fails ("Dynamic loading not supported"), which would
        // otherwise read as a missing driver.
        if cfg!(all(target_env = "musl", target_feature = "crt-static")) {
            return Err(GpuError::StaticBuild { path });
        }
        let nvml = Nvml::builder().lib_path(OsStr::new(lib_path)).init().map_err(|e| match e {
            NvmlError::LibloadingError(e) => GpuError::Library { path: path.clone(), detail: e.to_string() },
            // nvml-wrapper tolerates missing symbols at load but needs nvmlInit_v2 to start.
            NvmlError::FailedToLoadSymbol(s) => GpuError::Library { path: path.clone(), detail: s },
            e => GpuError::Nvml { path: path.clone(), detail: format!("nvmlInit_v2: {e}") },
        })?;
        let nvml_err = |what: &str, e: NvmlError| GpuError::Nvml { path: path.clone(), detail: format!("{what}: {e}") };
        let driver_version = nvml.sys_driver_version().map_err(|e| nvml_err("driver version", e))?;
        let nvml_version = nvml.sys_nvml_version().map_err(|e| nvml_err("NVML version", e))?;
        let count = nvml.device_count().map_err(|e| nvml_err("device count", e))?;
        if count == 0 {
            return Err(GpuError::NoGpus { path, detail: "nvmlDeviceGetCount_v2 reports 0 devices".into() });
        }
        let mut gpus = Vec::new();
        let mut skipped = Vec::new();
        for index in 0..count {
            match discover(&nvml, index) {
                Ok(g) => gpus.push(g),
                // A GPU that fell off the bus is not offered; the others still are.
                Err(e) => {
                    tracing::error!(index, error = %e, "GPU cannot be read; it is not offered");
                    skipped.push(format!("GPU {index}: {e}"));
                }
            }
        }
        if gpus.is_empty() {
            return Err(GpuError::NoGpus { path, detail: skipped.join("; ") });
        }
        let gpus = selection.apply(gpus)?;
        let offered = gpus
            .iter()
            .map(|g| Offered {
                index: g.info.index,
                uuid: g.info.uuid.clone(),
                total_bytes: g.info.total_vram_bytes,
                // MIG GPUs refuse utilisation: known before asking.
                unsupported: if g.mig == Some(true) { [Metric::Utilization].into() } else { BTreeSet::new() },
            })
            .collect();
        Ok(NvmlSource { nvml: Arc::new(nvml), discovery: Discovery { gpus, driver_version, nvml_version }, offered })
    }
}

fn discover(nvml: &Nvml, index: u32) -> Result<DiscoveredGpu, NvmlError> {
    let d = nvml.device_by_index(index)?;
    let mig = match d.mig_mode() {
        Ok(m) => Some(m.current == 1),
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => None,
        Err(e) => return Err(e),
    };
    Ok(DiscoveredGpu {
        info: GpuInfo { index, uuid: d.uuid()?, name: d.name()?, total_vram_bytes: d.memory_info()?.total },
        mig,
    })
}

/// Reads a metric unless it is known unsupported; the first `NotSupported` records it.
fn metric<T>(unsupported: &mut BTreeSet<Metric>, m: Metric, read: impl FnOnce() -> Result<T, NvmlError>) -> Option<T> {
    if unsupported.contains(&m) {
        return None;
    }
    match read() {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {
            unsupported.insert(m);
            None
        }
        // Transient: asked again next time.
        Err(_) => None,
    }
}

fn read(d: &Device<'_>, o: &mut Offered) -> Result<GpuSample, NvmlError> {
    let mem = d.memory_info()?;
    let mut by_pid: BTreeMap<u32, Option<u64>> = BTreeMap::new();
    // A process with both kinds of context appears in both lists with one figure.
    for p in d.running_compute_processes()?.into_iter().chain(d.running_graphics_processes()?) {
        let bytes = match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        };
        let e = by_pid.entry(p.pid).or_insert(bytes);
        *e = (*e).max(bytes);
    }
    let unsupported = &mut o.unsupported;
    let utilization_pct =
        metric(unsupported, Metric::Utilization, || d.utilization_rates()).map(|u| u.gpu.min(100) as u8);
    let temperature_c = metric(unsupported, Metric::Temperature, || d.temperature(TemperatureSensor::Gpu))
        .map(|t| t.min(i16::MAX as u32) as i16);
    let power_mw = metric(unsupported, Metric::Power, || d.power_usage());
    Ok(GpuSample {
        uuid: o.uuid.clone(),
        total_bytes: mem.total,
        used_bytes: mem.used,
        free_bytes: mem.free,
        reserved_bytes: mem.reserved,
        processes: by_pid.into_iter().map(|(pid, used_bytes)| ProcessUse { pid, used_bytes }).collect(),
        utilization_pct,
        temperature_c,
        power_mw,
        lost: None,
    })
}

impl GpuSource for NvmlSource {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        let nvml = self.nvml.clone();
        let mut out = Vec::with_capacity(self.offered.len());
        for o in &mut self.offered {
            let result = nvml.device_by_index(o.index).and_then(|d| read(&d, o));
            match result {
                Ok(s) => out.push(s),
                Err(NvmlError::GpuLost) => out.push(GpuSample {
                    uuid: o.uuid.clone(),
                    total_bytes: o.total_bytes,
                    used_bytes: 0,
                    free_bytes: 0,
                    reserved_bytes: 0,
                    processes: Vec::new(),
                    utilization_pct: None,
                    temperature_c: None,
                    power_mw: None,
                    lost: Some("NVML: GPU is lost".into()),
                }),
                // Left out of this sample: the core keeps the last reading.
                Err(e) => tracing::warn!(gpu = o.uuid, error = %e, "GPU sample failed; using the last one"),
            }
        }
        out
    }

    fn unsupported(&self) -> Vec<(String, Metric)> {
        self.offered.iter().flat_map(|o| o.unsupported.iter().map(|m| (o.uuid.clone(), *m))).collect()
    }

    fn events(&mut self) -> Option<Box<dyn EventWatch>> {
        let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
        let mut devices = Vec::new();
        for o in &self.offered {
            let supported = self.nvml.device_by_index(o.index).and_then(|d| d.supported_event_types());
            match supported {
                Ok(t) if t.intersects(wanted) => devices.push((o.index, t & wanted)),
                Ok(_) | Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {
                    tracing::info!(gpu = o.uuid, "no Xid/ECC events on this GPU (not supported)");
                }
                Err(e) => tracing::warn!(gpu = o.uuid, error = %e, "cannot ask for Xid/ECC events"),
            }
        }
        if devices.is_empty() {
            return None;
        }
        let (tx, rx) = mpsc::channel();
        let (registered_tx, registered_rx) = mpsc::channel::<()>();
        let stop = Arc::new(AtomicBool::new(false));
        let (nvml, stop2) = (self.nvml.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("nvml-events".into()).spawn(move || {
            let mut set = match nvml.create_event_set() {
                Ok(s) => s,
                Err(e) => return tracing::warn!(error = %e, "cannot create an NVML event set: no Xid/ECC events"),
            };
            for (index, types) in devices {
                let registered =
                    nvml.device_by_index(index).map_err(Into::into).and_then(|d| d.register_events(types, set));
                set = match registered {
                    Ok(s) => s,
                    Err(e) => return tracing::warn!(index, error = %e, "cannot register for Xid/ECC events"),
                };
            }
            let _ = registered_tx.send(());
            while !stop2.load(Ordering::Relaxed) {
                match set.wait(EVENT_WAIT_MS) {
                    Ok(data) => {
                        let Ok(uuid) = data.device.uuid() else { continue };
                        let event = if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                            let xid = match data.event_data {
                                Some(XidError::Value(x)) => x,
                                _ => 999,
                            };
                            HealthEvent::Xid { uuid, xid }
                        } else {
                            HealthEvent::DoubleBitEcc { uuid }
                        };
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                    Err(NvmlError::Timeout) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "waiting for NVML events failed; no more Xid/ECC events");
                        return;
                    }
                }
            }
        });
        if let Err(e) = thread {
            tracing::warn!(error = %e, "cannot start the NVML event thread");
            return None;
        }
        match registered_rx.recv_timeout(std::time::Duration::from_millis(EVENT_REGISTER_WAIT_MS)) {
            Ok(()) => {}
            // The thread said why and ended: no events.
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            Err(mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                wait_ms = EVENT_REGISTER_WAIT_MS,
                "NVML is slow to register the GPUs for Xid/ECC events; events until it has are not seen"
            ),
        }
        Some(Box::new(NvmlEvents { rx, stop }))
    }
}

/// Events from the NVML event thread; dropping it stops the thread.
struct NvmlEvents {
    rx: mpsc::Receiver<HealthEvent>,
    stop: Arc<AtomicBool>,
}

impl EventWatch for NvmlEvents {
    fn wait(&mut self, timeout_ms: u32) -> Option<HealthEvent> {
        self.rx.recv_timeout(std::time::Duration::from_millis(u64::from(timeout_ms))).ok()
    }
}

impl Drop for NvmlEvents {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
