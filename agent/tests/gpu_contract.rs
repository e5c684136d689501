//! The GPU monitor contract: the same cases against the simulated GPUs,
//! against NVML (nvml-wrapper) over the project's fake NVML library, and
//! against the real driver where one exists. A world (GPUs, processes,
//! memory held with no process, lost GPUs, unsupported metrics, events) is
//! set up through each backend's own means: the simulated GPUs' handle, or
//! the fake library's scenario file rewritten while the source is open.
//!
//! The fake library is built by `scripts/test` (`cargo build -p
//! cosmos-fake-nvml --release`) next to this test binary's directory.

use cosmos_agent::gpu::nvml::NvmlSource;
use cosmos_agent::gpu::simulated::{SimulatedGpuHandle, SimulatedGpuState, SimulatedGpus};
use cosmos_agent::gpu::{GpuError, GpuSelection, GpuSource, HealthEvent, Metric, ProcessUse};
use cosmos_proto::GpuInfo;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
/// Longest wait for a queued event to come out of a source.
const EVENT_WAIT_MS: u32 = 2_000;

/// One GPU of a test world.
#[derive(Clone, Default)]
struct WorldGpu {
    uuid: String,
    total_bytes: u64,
    processes: Vec<ProcessUse>,
    unlisted_bytes: u64,
    lost: bool,
    no_utilization: bool,
    events: Vec<(u64, &'static str, u64)>,
}

fn world(n: usize) -> Vec<WorldGpu> {
    (0..n)
        .map(|i| WorldGpu { uuid: format!("GPU-c0ffee00-{i:04}"), total_bytes: 80 * GIB, ..Default::default() })
        .collect()
}

/// A way to build a world and read it back through a [`GpuSource`].
trait Backend {
    fn name(&self) -> &'static str;
    /// Sets the world up and opens a source on it.
    fn open(&mut self, world: &[WorldGpu], selection: &GpuSelection) -> Result<Box<dyn GpuSource>, GpuError>;
    /// Changes the world under an open source.
    fn change(&mut self, world: &[WorldGpu]);
}

struct Simulated {
    handle: Option<SimulatedGpuHandle>,
    pushed: u64,
}

impl Backend for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn open(&mut self, world: &[WorldGpu], selection: &GpuSelection) -> Result<Box<dyn GpuSource>, GpuError> {
        let infos = world
            .iter()
            .enumerate()
            .map(|(i, g)| GpuInfo {
                index: i as u32,
                uuid: g.uuid.clone(),
                name: "sim".into(),
                total_vram_bytes: g.total_bytes,
            })
            .collect::<Vec<_>>();
        // The simulated GPUs apply the same selection rules as NVML discovery.
        let discovered =
            infos.iter().cloned().map(|info| cosmos_agent::gpu::DiscoveredGpu { info, mig: None }).collect();
        let kept: Vec<GpuInfo> = selection.apply(discovered)?.into_iter().map(|g| g.info).collect();
        let kept_world: Vec<WorldGpu> =
            world.iter().filter(|w| kept.iter().any(|k| k.uuid == w.uuid)).cloned().collect();
        let gpus = SimulatedGpus::new(kept);
        self.handle = Some(gpus.handle());
        self.pushed = world.iter().flat_map(|g| g.events.iter().map(|e| e.0)).max().unwrap_or(0);
        self.change(&kept_world);
        Ok(Box::new(gpus))
    }

    fn change(&mut self, world: &[WorldGpu]) {
        let handle = self.handle.as_ref().expect("open first");
        for (i, g) in world.iter().enumerate() {
            handle.set(
                i,
                SimulatedGpuState { processes: g.processes.clone(), unlisted_bytes: g.unlisted_bytes, lost: g.lost },
            );
            for &(id, kind, data) in &g.events {
                if id > self.pushed {
                    let e = match kind {
                        "xid" => HealthEvent::Xid { uuid: g.uuid.clone(), xid: data },
                        _ => HealthEvent::DoubleBitEcc { uuid: g.uuid.clone() },
                    };
                    handle.push_event(e);
                }
            }
        }
        self.pushed = world.iter().flat_map(|g| g.events.iter().map(|e| e.0)).max().unwrap_or(self.pushed);
    }
}

/// The fake NVML library built beside this test binary (target/<profile>/libfake_nvml.so).
pub fn fake_nvml_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let lib = profile_dir.join("libfake_nvml.so");
    assert!(
        lib.exists(),
        "{} is missing: build it with `cargo build -p cosmos-fake-nvml --release` (scripts/test does)",
        lib.display()
    );
    lib
}

struct FakeNvml {
    lib: libloading::Library,
    path: PathBuf,
    scenario: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeNvml {
    fn new() -> FakeNvml {
        let path = fake_nvml_lib();
        let dir = tempfile::tempdir().unwrap();
        let scenario = dir.path().join("scenario.json");
        // SAFETY: our own library; its initialisers do nothing.
        let lib = unsafe { libloading::Library::new(&path) }.expect("load the fake NVML library");
        let fake = FakeNvml { lib, path, scenario, _dir: dir };
        let c = std::ffi::CString::new(fake.scenario.to_str().unwrap()).unwrap();
        // SAFETY: the hook's signature, as the fake declares it.
        unsafe {
            let set: libloading::Symbol<unsafe extern "C" fn(*const std::ffi::c_char)> =
                fake.lib.get(b"fakeNvmlSetScenario\0").unwrap();
            set(c.as_ptr());
        }
        fake
    }

    fn calls(&self, function: &str) -> u64 {
        let c = std::ffi::CString::new(function).unwrap();
        // SAFETY: the hook's signature, as the fake declares it.
        unsafe {
            let count: libloading::Symbol<unsafe extern "C" fn(*const std::ffi::c_char) -> u64> =
                self.lib.get(b"fakeNvmlCallCount\0").unwrap();
            count(c.as_ptr())
        }
    }

    fn write(&self, scenario: &serde_json::Value) {
        let tmp = self.scenario.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(scenario).unwrap()).unwrap();
        // By rename, so the library never reads half a file.
        std::fs::rename(&tmp, &self.scenario).unwrap();
        // The library looks at the file at most every millisecond.
        std::thread::sleep(Duration::from_millis(3));
    }

    fn scenario(world: &[WorldGpu]) -> serde_json::Value {
        let gpus: Vec<serde_json::Value> = world
            .iter()
            .map(|g| {
                json!({
                    "uuid": g.uuid, "name": "NVIDIA Fake 80GB", "total_bytes": g.total_bytes,
                    "reserved_bytes": 512u64 << 20, "unlisted_bytes": g.unlisted_bytes, "lost": g.lost,
                    "unsupported": if g.no_utilization { vec!["utilization"] } else { vec![] },
                    "utilization_pct": 7, "temperature_c": 41, "power_mw": 95_000,
                    "processes": g.processes.iter().map(|p| json!({"pid": p.pid, "bytes": p.used_bytes})).collect::<Vec<_>>(),
                    "events": g.events.iter().map(|(id, kind, data)| json!({"id": id, "kind": kind, "data": data})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({ "driver_version": "550.54.15", "nvml_version": "12.550.54.15", "gpus": gpus })
    }
}

impl Backend for FakeNvml {
    fn name(&self) -> &'static str {
        "nvml over the fake library"
    }

    fn open(&mut self, world: &[WorldGpu], selection: &GpuSelection) -> Result<Box<dyn GpuSource>, GpuError> {
        self.write(&FakeNvml::scenario(world));
        Ok(Box::new(NvmlSource::open(self.path.to_str().unwrap(), selection)?))
    }

    fn change(&mut self, world: &[WorldGpu]) {
        self.write(&FakeNvml::scenario(world));
    }
}

/// The cases every backend must pass.
fn contract(b: &mut dyn Backend) {
    let name = b.name();
    eprintln!("GPU contract against {name}:");

    eprintln!("  discovery lists every GPU with its uuid and memory");
    let w = world(2);
    let mut s = b.open(&w, &GpuSelection::All).unwrap();
    let d = s.discovery().clone();
    assert_eq!(d.gpus.len(), 2, "{name}");
    for (i, g) in d.gpus.iter().enumerate() {
        assert_eq!(g.info.index, i as u32, "{name}");
        assert_eq!(g.info.uuid, w[i].uuid, "{name}");
        assert_eq!(g.info.total_vram_bytes, 80 * GIB, "{name}");
    }
    assert!(!d.driver_version.is_empty(), "{name}");

    eprintln!("  an idle GPU's memory adds up and lists no process");
    let samples = s.sample();
    assert_eq!(samples.len(), 2, "{name}");
    for x in &samples {
        assert_eq!(x.used_bytes + x.free_bytes + x.reserved_bytes, x.total_bytes, "{name}: {x:?}");
        assert!(x.processes.is_empty() && x.lost.is_none(), "{name}: {x:?}");
    }

    eprintln!("  a process that appears is seen with its bytes, and `not available` is a value");
    let mut w2 = w.clone();
    w2[1].processes =
        vec![ProcessUse { pid: 4242, used_bytes: Some(3 * GIB) }, ProcessUse { pid: 4343, used_bytes: None }];
    b.change(&w2);
    let x = &s.sample()[1];
    assert_eq!(x.processes, w2[1].processes, "{name}");
    assert_eq!(x.used_bytes, 3 * GIB, "{name}: bytes not available count for nothing");
    assert_eq!(x.used_bytes + x.free_bytes + x.reserved_bytes, x.total_bytes, "{name}");
    assert!(s.sample()[0].processes.is_empty(), "{name}: the other GPU is untouched");

    eprintln!("  memory held with no process listed shows as used");
    w2[0].unlisted_bytes = 2 * GIB;
    b.change(&w2);
    let x = &s.sample()[0];
    assert_eq!((x.used_bytes, x.processes.len()), (2 * GIB, 0), "{name}");

    eprintln!("  a lost GPU is marked lost and the others still read");
    w2[0].lost = true;
    b.change(&w2);
    let samples = s.sample();
    assert!(samples[0].lost.is_some(), "{name}: {:?}", samples[0]);
    assert_eq!(samples[1].used_bytes, 3 * GIB, "{name}");
    assert!(samples[1].lost.is_none(), "{name}");
    drop(s);

    eprintln!("  an unsupported metric reads as unknown and is listed as unsupported");
    let mut w3 = world(2);
    w3[0].no_utilization = true;
    let mut s = b.open(&w3, &GpuSelection::All).unwrap();
    for _ in 0..3 {
        assert_eq!(s.sample()[0].utilization_pct, None, "{name}");
    }
    assert!(s.unsupported().contains(&(w3[0].uuid.clone(), Metric::Utilization)), "{name}: {:?}", s.unsupported());
    drop(s);

    eprintln!("  --gpus keeps the GPUs named by index or uuid, and refuses one not there");
    let w = world(3);
    let s = b.open(&w, &GpuSelection::parse("0,2").unwrap()).unwrap();
    let uuids: Vec<&str> = s.discovery().gpus.iter().map(|g| g.info.uuid.as_str()).collect();
    assert_eq!(uuids, [w[0].uuid.as_str(), w[2].uuid.as_str()], "{name}");
    drop(s);
    let mut s = b.open(&w, &GpuSelection::parse(&w[1].uuid).unwrap()).unwrap();
    assert_eq!(s.discovery().gpus.len(), 1, "{name}");
    assert_eq!(s.sample()[0].uuid, w[1].uuid, "{name}");
    drop(s);
    let err = b.open(&w, &GpuSelection::parse("7").unwrap()).err().expect("GPU 7 is not there");
    assert!(err.to_string().contains("no GPU `7`"), "{name}: {err}");

    eprintln!("  a queued Xid comes out of the event stream with its GPU and number");
    let mut w = world(2);
    let mut s = b.open(&w, &GpuSelection::All).unwrap();
    let mut events = s.events().expect("events supported");
    w[1].events.push((1, "xid", 79));
    b.change(&w);
    assert_eq!(events.wait(EVENT_WAIT_MS), Some(HealthEvent::Xid { uuid: w[1].uuid.clone(), xid: 79 }), "{name}");
    w[0].events.push((2, "ecc_double_bit", 0));
    b.change(&w);
    assert_eq!(events.wait(EVENT_WAIT_MS), Some(HealthEvent::DoubleBitEcc { uuid: w[0].uuid.clone() }), "{name}");
    assert_eq!(events.wait(50), None, "{name}: each event once");
}

#[test]
fn the_simulated_gpus_keep_the_contract() {
    contract(&mut Simulated { handle: None, pushed: 0 });
}

/// Every case runs in one test: the fake library is one per process, like NVML itself.
#[test]
fn nvml_over_the_fake_library_keeps_the_contract_and_nvmls_conventions() {
    let mut fake = FakeNvml::new();
    contract(&mut fake);

    eprintln!("NVML conventions, over the fake library:");
    eprintln!("  process lists are sized first (INSUFFICIENT_SIZE), then filled");
    let mut w = world(1);
    w[0].processes = vec![ProcessUse { pid: 1, used_bytes: Some(GIB) }];
    let mut s = fake.open(&w, &GpuSelection::All).unwrap();
    let before = fake.calls("nvmlDeviceGetComputeRunningProcesses_v3");
    assert_eq!(s.sample()[0].processes.len(), 1);
    assert_eq!(fake.calls("nvmlDeviceGetComputeRunningProcesses_v3") - before, 2, "a sizing call and a filling call");

    eprintln!("  a metric NVML refuses is asked once, then never again");
    w[0].no_utilization = true;
    let mut s2 = fake.open(&w, &GpuSelection::All).unwrap();
    drop(s);
    let before = fake.calls("nvmlDeviceGetUtilizationRates");
    for _ in 0..5 {
        s2.sample();
    }
    assert_eq!(fake.calls("nvmlDeviceGetUtilizationRates") - before, 1);
    let before = fake.calls("nvmlDeviceGetTemperature");
    s2.sample();
    assert_eq!(fake.calls("nvmlDeviceGetTemperature") - before, 1, "supported metrics are asked every time");
    drop(s2);

    eprintln!("  dropping the source shuts NVML down");
    let before = fake.calls("nvmlShutdown");
    drop(fake.open(&world(1), &GpuSelection::All).unwrap());
    assert_eq!(fake.calls("nvmlShutdown") - before, 1);

    eprintln!("  a library that does not start, or finds no GPU, says what NVML said");
    fake.write(&json!({ "init_error": 9, "gpus": [] }));
    let err = NvmlSource::open(fake.path.to_str().unwrap(), &GpuSelection::All).err().unwrap();
    assert!(matches!(err, GpuError::Nvml { .. }) && err.to_string().contains("nvmlInit_v2"), "{err}");
    assert!(err.to_string().contains("--simulated-gpus"), "{err}");
    fake.write(&json!({ "gpus": [] }));
    let err = NvmlSource::open(fake.path.to_str().unwrap(), &GpuSelection::All).err().unwrap();
    assert!(matches!(err, GpuError::NoGpus { .. }) && err.to_string().contains("0 devices"), "{err}");
}

#[test]
fn a_missing_nvml_library_is_named_with_the_driver_package_and_the_simulated_fallback() {
    let err = NvmlSource::open("/nonexistent/libnvidia-ml.so.1", &GpuSelection::All).err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, GpuError::Library { .. }), "{text}");
    for says in ["/nonexistent/libnvidia-ml.so.1", "nvidia-driver", "--nvml-lib", "--simulated-gpus"] {
        assert!(text.contains(says), "{says}: {text}");
    }
}

/// Against the real driver: the cases that need no staged world. On a machine
/// without one it says so and why. `COSMOS_EXPECT_GPU_PID=PID:BYTES` (set by
/// `scripts/device-check-gpu`) also checks that a process allocating on GPU 0 is seen.
#[test]
fn the_real_driver_keeps_the_contract_where_there_is_one() {
    let lib = std::env::var("COSMOS_NVML_LIB").unwrap_or_else(|_| cosmos_agent::gpu::nvml::DEFAULT_NVML_LIB.into());
    let mut s = match NvmlSource::open(&lib, &GpuSelection::All) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("GPU contract against the real driver DID NOT RUN: no NVIDIA driver here ({e})");
            return;
        }
    };
    let d = s.discovery().clone();
    eprintln!(
        "GPU contract against the real driver {} (NVML {}): {} GPU(s)",
        d.driver_version,
        d.nvml_version,
        d.gpus.len()
    );
    assert!(!d.gpus.is_empty());
    for g in &d.gpus {
        assert!(g.info.uuid.starts_with("GPU-") || g.info.uuid.starts_with("MIG-"), "{:?}", g.info);
        assert!(g.info.total_vram_bytes > 0);
    }
    let started = Instant::now();
    let samples = s.sample();
    eprintln!("  one sample of {} GPU(s) took {:?}", samples.len(), started.elapsed());
    for x in &samples {
        assert!(x.lost.is_none(), "{x:?}");
        assert!(x.used_bytes + x.free_bytes + x.reserved_bytes <= x.total_bytes, "{x:?}");
        eprintln!(
            "  {}: used {} MiB, free {} MiB, reserved {} MiB, util {:?}%, {:?} C, {:?} mW, processes {:?}",
            x.uuid,
            x.used_bytes >> 20,
            x.free_bytes >> 20,
            x.reserved_bytes >> 20,
            x.utilization_pct,
            x.temperature_c,
            x.power_mw,
            x.processes
        );
    }
    let first = d.gpus[0].info.uuid.clone();
    let only = NvmlSource::open(&lib, &GpuSelection::parse("0").unwrap()).unwrap();
    assert_eq!(only.discovery().gpus.iter().map(|g| g.info.uuid.clone()).collect::<Vec<_>>(), [first]);
    if let Ok(expect) = std::env::var("COSMOS_EXPECT_GPU_PID") {
        let (pid, bytes) = expect.split_once(':').expect("PID:BYTES");
        let (pid, bytes): (u32, u64) = (pid.parse().unwrap(), bytes.parse().unwrap());
        let seen = s.sample()[0].processes.iter().find(|p| p.pid == pid).cloned();
        eprintln!("  the foreign allocation of pid {pid}: {seen:?}");
        let seen = seen.expect("the allocating process is listed on GPU 0");
        // Containers without the host's PID namespace show no bytes: a value, not an error.
        if let Some(b) = seen.used_bytes {
            assert!(b >= bytes, "{b} < {bytes}");
        }
    }
}
