//! The GPU boundary: what the agent knows of its GPUs and how it learns it.
//!
//! A [`GpuSource`] discovers the GPUs once and then samples them: memory
//! (NVML's v2 accounting: `used` excludes the driver's reservation), the
//! processes holding memory, utilisation, temperature, power. Two sources
//! implement it: [`nvml::NvmlSource`] (the real one, over `nvml-wrapper`,
//! also run in CI against the project's fake NVML library) and
//! [`simulated::SimulatedGpus`] (for hosts without GPUs, and the simulator).
//! The GPU monitor contract suite (`agent/tests/gpu_contract.rs`) holds both
//! to the same cases. [`monitor`] runs a source on a thread of its own;
//! [`attribution`] tells an attempt's processes from foreign ones.

pub mod attribution;
pub mod monitor;
pub mod nvml;
pub mod simulated;

use cosmos_proto::GpuInfo;

/// What discovery found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// The GPUs offered, in index order.
    pub gpus: Vec<DiscoveredGpu>,
    /// The driver's version, as NVML says it.
    pub driver_version: String,
    /// NVML's own version.
    pub nvml_version: String,
}

/// One GPU as discovered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredGpu {
    /// Index, UUID, name, total memory.
    pub info: GpuInfo,
    /// MIG mode, when the GPU supports MIG at all.
    pub mig: Option<bool>,
}

/// One GPU's reading at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuSample {
    /// Which GPU.
    pub uuid: String,
    /// Installed memory.
    pub total_bytes: u64,
    /// Memory allocated by processes (the driver's reservation left out).
    pub used_bytes: u64,
    /// Memory free for allocation.
    pub free_bytes: u64,
    /// The driver's reservation.
    pub reserved_bytes: u64,
    /// Processes with a compute or graphics context, by host pid.
    pub processes: Vec<ProcessUse>,
    /// Percent busy, when supported.
    pub utilization_pct: Option<u8>,
    /// Degrees Celsius, when supported.
    pub temperature_c: Option<i16>,
    /// Milliwatts, when supported.
    pub power_mw: Option<u32>,
    /// Set when the GPU could not be read: it is lost (memory figures are then zero).
    pub lost: Option<String>,
}

/// A process holding memory on a GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessUse {
    /// Host pid (NVML never reports container pids).
    pub pid: u32,
    /// Bytes held; `None` when the driver cannot say (NVML's `Unavailable`).
    pub used_bytes: Option<u64>,
}

/// A metric a GPU may not support; asked once, then not again.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// GPU utilisation (MIG GPUs refuse it).
    Utilization,
    /// Core temperature.
    Temperature,
    /// Board power draw.
    Power,
}

/// A health event from the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthEvent {
    /// A critical Xid.
    Xid {
        /// Which GPU.
        uuid: String,
        /// The Xid number.
        xid: u64,
    },
    /// A double-bit (uncorrectable) ECC error.
    DoubleBitEcc {
        /// Which GPU.
        uuid: String,
    },
}

/// Why GPUs could not be discovered or offered.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The NVML library could not be loaded.
    #[error(
        "cannot load the NVIDIA management library `{path}` ({detail}): install the NVIDIA driver (package nvidia-driver-<version>, or libnvidia-ml / nvidia-utils), or name the library with --nvml-lib PATH; on a host without NVIDIA GPUs run the agent with --simulated-gpus COUNTxSIZE"
    )]
    Library {
        /// What was loaded.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// This agent is a static build, which cannot load shared libraries at all.
    #[error(
        "cannot load the NVIDIA management library `{path}`: this cosmos is a static (musl) build, and static programs \
         cannot load shared libraries; run the glibc build on GPU hosts (the .deb's, or `cargo build --release -p cosmos`), \
         or --simulated-gpus COUNTxSIZE"
    )]
    StaticBuild {
        /// What was to be loaded.
        path: String,
    },
    /// The library loaded but NVML would not start or answer.
    #[error(
        "NVML ({path}) failed: {detail}; check `nvidia-smi`, or run with --simulated-gpus COUNTxSIZE on a host without NVIDIA GPUs"
    )]
    Nvml {
        /// The library.
        path: String,
        /// What NVML said.
        detail: String,
    },
    /// NVML runs but offers no GPU.
    #[error(
        "NVML ({path}) found no GPU to offer: {detail}; check `nvidia-smi`, or run with --simulated-gpus COUNTxSIZE on a host without NVIDIA GPUs"
    )]
    NoGpus {
        /// The library.
        path: String,
        /// What NVML said.
        detail: String,
    },
    /// `--gpus` names GPUs that are not there, or is malformed.
    #[error("--gpus {given}: {detail}")]
    Selection {
        /// What was given.
        given: String,
        /// What is wrong.
        detail: String,
    },
}

/// A way to read the host's GPUs.
pub trait GpuSource: Send {
    /// Short name for logs (`nvml`, `simulated`).
    fn name(&self) -> &'static str;
    /// What discovery found (the GPUs offered, after any `--gpus` restriction).
    fn discovery(&self) -> &Discovery;
    /// Reads every offered GPU now.
    fn sample(&mut self) -> Vec<GpuSample>;
    /// Metrics found unsupported so far, per GPU uuid (each is asked once only).
    fn unsupported(&self) -> Vec<(String, Metric)>;
    /// Health events, on a thread of their own; `None` where no GPU supports them.
    fn events(&mut self) -> Option<Box<dyn EventWatch>>;
}

/// A stream of health events.
pub trait EventWatch: Send {
    /// Waits up to `timeout_ms` for the next event.
    fn wait(&mut self, timeout_ms: u32) -> Option<HealthEvent>;
}

/// Which GPUs an agent offers, from `--gpus 0,1` or `--gpus GPU-…,GPU-…`
/// (as `CUDA_VISIBLE_DEVICES` names them), for hosts shared with other work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuSelection {
    /// Every GPU NVML lists.
    All,
    /// Those with these indices or UUIDs (UUID prefixes of at least `GPU-` and 4 more characters match, as CUDA allows).
    Only(Vec<String>),
}

impl GpuSelection {
    /// Parses the `--gpus` value: `all`, or a comma-separated list of indices or UUIDs.
    pub fn parse(s: &str) -> Result<GpuSelection, GpuError> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("all") {
            return Ok(GpuSelection::All);
        }
        let items: Vec<String> = s.split(',').map(|i| i.trim().to_string()).collect();
        for i in &items {
            let uuid_like = i.starts_with("GPU-") && i.len() >= 8;
            if !(uuid_like || i.parse::<u32>().is_ok()) {
                return Err(GpuError::Selection {
                    given: s.to_string(),
                    detail: format!("`{i}` is neither a GPU index (0, 1, …) nor a UUID (GPU-…)"),
                });
            }
        }
        Ok(GpuSelection::Only(items))
    }

    /// Keeps the selected GPUs, failing on a selection that names a GPU not there.
    pub fn apply(&self, gpus: Vec<DiscoveredGpu>) -> Result<Vec<DiscoveredGpu>, GpuError> {
        let GpuSelection::Only(items) = self else { return Ok(gpus) };
        let matches = |i: &str, g: &DiscoveredGpu| match i.parse::<u32>() {
            Ok(index) => g.info.index == index,
            Err(_) => g.info.uuid.starts_with(i),
        };
        for i in items {
            if !gpus.iter().any(|g| matches(i, g)) {
                let have: Vec<String> = gpus.iter().map(|g| format!("{} ({})", g.info.index, g.info.uuid)).collect();
                return Err(GpuError::Selection {
                    given: items.join(","),
                    detail: format!("no GPU `{i}` on this host; it has {}", have.join(", ")),
                });
            }
        }
        Ok(gpus.into_iter().filter(|g| items.iter().any(|i| matches(i, g))).collect())
    }
}
