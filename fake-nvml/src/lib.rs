//! A fake NVML: the C functions the agent's GPU monitor calls, exported as
//! `libfake_nvml.so`, with GPUs, processes, memory and events read from a
//! JSON scenario file named by `FAKE_NVML_SCENARIO`.
//!
//! Loaded through `cosmos agent --nvml-lib`, it runs nvml-wrapper's real code
//! path: symbol loading at `Nvml::init`, the struct layouts of
//! `nvml-wrapper-sys` 0.10 (checked by this crate's tests against that crate's
//! declarations), the count-then-fill convention of the process lists
//! (`NVML_ERROR_INSUFFICIENT_SIZE` on the sizing call), `NVML_ERROR_NOT_SUPPORTED`
//! per metric, `NVML_ERROR_GPU_IS_LOST`, and event sets fed from the scenario's
//! queued events.
//!
//! The file is re-read when it changes (a test rewrites it, by rename, while
//! the agent runs); the check is a `stat` at most every
//! [`RELOAD_CHECK_INTERVAL_US`]. Only the functions listed here exist: any
//! other symbol is missing, as it is from an old driver, and nvml-wrapper
//! reports `FailedToLoadSymbol` for it.
//!
//! Scenario (every field optional unless said):
//! ```json
//! { "driver_version": "550.54.15", "nvml_version": "12.550.54.15",
//!   "init_error": 9, "hang_ms": 0,
//!   "gpus": [ { "uuid": "GPU-…", "name": "…", "total_bytes": 85899345920,
//!               "reserved_bytes": 0, "unlisted_bytes": 0, "mig": false,
//!               "lost": false, "unsupported": ["utilization", "temperature", "power", "events", "mig"],
//!               "utilization_pct": 0, "temperature_c": 35, "power_mw": 70000,
//!               "processes": [ { "pid": 42, "bytes": 1073741824, "graphics": false } ],
//!               "events": [ { "id": 1, "kind": "xid", "data": 79 } ] } ] }
//! ```
//! `used` is the listed processes' bytes plus `unlisted_bytes` (memory held
//! with no process listed); `free` is `total - reserved - used`, as NVML's v2
//! memory info counts them. A process's `bytes: null` is NVML's
//! `NVML_VALUE_NOT_AVAILABLE`. `hang_ms` makes every call about a GPU block
//! that long before it answers, as calls into a wedged driver do (a GPU fallen
//! off the bus can hold `nvmlDeviceGet…` for minutes).
#![allow(non_snake_case, clippy::missing_safety_doc)]

use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_uint, c_ulonglong, c_void};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Environment variable naming the scenario file.
pub const SCENARIO_ENV: &str = "FAKE_NVML_SCENARIO";
/// Least time between two checks of the scenario file for changes.
pub const RELOAD_CHECK_INTERVAL_US: u64 = 1_000;
/// How often an event wait looks at the scenario again.
const EVENT_POLL_MS: u64 = 5;

type Ret = c_uint;
const SUCCESS: Ret = 0;
const ERROR_UNINITIALIZED: Ret = 1;
const ERROR_INVALID_ARGUMENT: Ret = 2;
const ERROR_NOT_SUPPORTED: Ret = 3;
const ERROR_INSUFFICIENT_SIZE: Ret = 7;
const ERROR_DRIVER_NOT_LOADED: Ret = 9;
const ERROR_TIMEOUT: Ret = 10;
const ERROR_GPU_IS_LOST: Ret = 15;
const ERROR_ARGUMENT_VERSION_MISMATCH: Ret = 25;
const ERROR_UNKNOWN: Ret = 999;
/// `NVML_VALUE_NOT_AVAILABLE` as an unsigned long long.
const VALUE_NOT_AVAILABLE: u64 = u64::MAX;
/// `gpuInstanceId`/`computeInstanceId` when the GPU is not in MIG mode.
const NO_INSTANCE: u32 = 0xFFFF_FFFF;
const EVENT_DOUBLE_BIT_ECC: u64 = 2;
const EVENT_XID: u64 = 8;

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct Memory {
    /// Struct version: `sizeof | 2 << 24`.
    pub version: c_uint,
    /// Total installed memory.
    pub total: c_ulonglong,
    /// Reserved by the driver.
    pub reserved: c_ulonglong,
    /// Free.
    pub free: c_ulonglong,
    /// Used by allocations (reserved excluded).
    pub used: c_ulonglong,
}

/// `nvmlProcessInfo_t` (= `nvmlProcessInfo_v2_t`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    /// Host pid.
    pub pid: c_uint,
    /// Bytes, or `NVML_VALUE_NOT_AVAILABLE`.
    pub usedGpuMemory: c_ulonglong,
    /// MIG GPU instance, or all ones.
    pub gpuInstanceId: c_uint,
    /// MIG compute instance, or all ones.
    pub computeInstanceId: c_uint,
}

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct Utilization {
    /// GPU busy percent.
    pub gpu: c_uint,
    /// Memory busy percent.
    pub memory: c_uint,
}

/// `nvmlEventData_t`.
#[repr(C)]
pub struct EventData {
    /// The device the event happened on.
    pub device: *mut c_void,
    /// One event type bit.
    pub eventType: c_ulonglong,
    /// The Xid, for Xid events.
    pub eventData: c_ulonglong,
    /// MIG GPU instance, or all ones.
    pub gpuInstanceId: c_uint,
    /// MIG compute instance, or all ones.
    pub computeInstanceId: c_uint,
}

/// The scenario file's contents.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Scenario {
    /// What `nvmlSystemGetDriverVersion` says.
    pub driver_version: Option<String>,
    /// What `nvmlSystemGetNVMLVersion` says.
    pub nvml_version: Option<String>,
    /// `nvmlInit_v2` fails with this code.
    pub init_error: Option<u32>,
    /// Every call about a GPU blocks this long first (a wedged driver).
    pub hang_ms: u64,
    /// The GPUs, by index.
    pub gpus: Vec<Gpu>,
}

/// One fake GPU.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Gpu {
    /// `GPU-…`.
    pub uuid: String,
    /// Model name.
    pub name: String,
    /// Installed memory.
    pub total_bytes: u64,
    /// Driver reservation.
    pub reserved_bytes: u64,
    /// Memory held with no process listed.
    pub unlisted_bytes: u64,
    /// MIG mode on.
    pub mig: bool,
    /// Every call about this GPU fails with `GPU_IS_LOST`.
    pub lost: bool,
    /// Metrics answered with `NOT_SUPPORTED`: utilization, temperature, power, events, mig.
    pub unsupported: Vec<String>,
    /// Percent busy.
    pub utilization_pct: u32,
    /// Degrees Celsius.
    pub temperature_c: u32,
    /// Milliwatts.
    pub power_mw: u32,
    /// Processes with a context on it.
    pub processes: Vec<Process>,
    /// Events queued on it, delivered once each to each event set, in `id` order.
    pub events: Vec<Event>,
}

/// A process on a fake GPU.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Process {
    /// Host pid.
    pub pid: u32,
    /// Bytes held; `None` is NVML's "not available".
    pub bytes: Option<u64>,
    /// A graphics context rather than a compute one.
    pub graphics: bool,
}

/// A queued event.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Event {
    /// Unique, increasing: what an event set has delivered is remembered by it.
    pub id: u64,
    /// `xid` or `ecc_double_bit`.
    pub kind: String,
    /// The Xid.
    pub data: u64,
}

impl Gpu {
    fn supports(&self, metric: &str) -> bool {
        !self.unsupported.iter().any(|m| m == metric)
    }
}

struct State {
    initialized: u32,
    /// Set by [`fakeNvmlSetScenario`]; wins over the environment.
    path: Option<std::path::PathBuf>,
    scenario: Scenario,
    file_key: Option<(u64, i64, i64, u64)>,
    last_check: Option<Instant>,
    calls: BTreeMap<&'static str, u64>,
}

static STATE: Mutex<State> = Mutex::new(State {
    initialized: 0,
    path: None,
    scenario: Scenario { driver_version: None, nvml_version: None, init_error: None, hang_ms: 0, gpus: Vec::new() },
    file_key: None,
    last_check: None,
    calls: BTreeMap::new(),
});

fn lock() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Re-reads the scenario if its file changed; `Err` when there is none to read.
fn refresh(state: &mut State) -> Result<(), Ret> {
    let now = Instant::now();
    if state.file_key.is_some()
        && state.last_check.is_some_and(|t| now.duration_since(t) < Duration::from_micros(RELOAD_CHECK_INTERVAL_US))
    {
        return Ok(());
    }
    state.last_check = Some(now);
    let Some(path) = state.path.clone().map(Into::into).or_else(|| std::env::var_os(SCENARIO_ENV)) else {
        return Err(ERROR_DRIVER_NOT_LOADED);
    };
    let Ok(meta) = std::fs::metadata(&path) else { return Err(ERROR_DRIVER_NOT_LOADED) };
    let key = (meta.ino(), meta.mtime(), meta.mtime_nsec(), meta.len());
    if state.file_key == Some(key) {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|_| ERROR_DRIVER_NOT_LOADED)?;
    match serde_json::from_str::<Scenario>(&text) {
        Ok(s) => {
            state.scenario = s;
            state.file_key = Some(key);
            Ok(())
        }
        // Half-written by a writer that does not rename: keep the last good one.
        Err(_) if state.file_key.is_some() => Ok(()),
        Err(_) => Err(ERROR_UNKNOWN),
    }
}

/// Runs `f` on the scenario, counting the call under `name`; fails as NVML does before init.
fn with_state(name: &'static str, f: impl FnOnce(&mut State) -> Ret) -> Ret {
    let mut state = lock();
    *state.calls.entry(name).or_default() += 1;
    if state.initialized == 0 {
        return ERROR_UNINITIALIZED;
    }
    if let Err(code) = refresh(&mut state) {
        return code;
    }
    f(&mut state)
}

/// Device handles are `index + 1`, never dereferenced (NVML's are opaque too).
fn handle_of(index: usize) -> *mut c_void {
    (index + 1) as *mut c_void
}

fn index_of(device: *mut c_void) -> usize {
    (device as usize).wrapping_sub(1)
}

/// Runs `f` on the device's GPU, answering `GPU_IS_LOST` for a lost one and
/// `NOT_SUPPORTED` when `metric` is listed as unsupported.
fn with_gpu(name: &'static str, device: *mut c_void, metric: Option<&str>, f: impl FnOnce(&Gpu) -> Ret) -> Ret {
    // Blocks outside the lock, so the test that rewrites the scenario (and other calls) are not held by it.
    let hang_ms = {
        let mut state = lock();
        if state.initialized == 0 || refresh(&mut state).is_err() { 0 } else { state.scenario.hang_ms }
    };
    if hang_ms > 0 {
        std::thread::sleep(Duration::from_millis(hang_ms));
    }
    with_state(name, |state| {
        let Some(gpu) = state.scenario.gpus.get(index_of(device)) else { return ERROR_INVALID_ARGUMENT };
        if gpu.lost {
            return ERROR_GPU_IS_LOST;
        }
        if metric.is_some_and(|m| !gpu.supports(m)) {
            return ERROR_NOT_SUPPORTED;
        }
        f(gpu)
    })
}

/// Copies `s` into a C buffer of `length` bytes, NUL-terminated.
unsafe fn write_str(s: &str, buf: *mut c_char, length: c_uint) -> Ret {
    if buf.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if s.len() + 1 > length as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller gave a buffer of `length` bytes, checked above to hold s and its NUL.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        *buf.add(s.len()) = 0;
    }
    SUCCESS
}

/// Test hook (not NVML): how many times the named function was called in this process.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fakeNvmlCallCount(name: *const c_char) -> c_ulonglong {
    if name.is_null() {
        return 0;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
    lock().calls.iter().find(|(k, _)| **k == name).map_or(0, |(_, v)| *v)
}

/// Test hook (not NVML): read the scenario from this file from now on, whatever
/// the environment says (tests in one process cannot safely change it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fakeNvmlSetScenario(path: *const c_char) {
    let mut state = lock();
    state.path = (!path.is_null())
        // SAFETY: the caller passes a NUL-terminated string.
        .then(|| std::path::PathBuf::from(unsafe { CStr::from_ptr(path) }.to_string_lossy().into_owned()));
    state.file_key = None;
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> Ret {
    let mut state = lock();
    *state.calls.entry("nvmlInit_v2").or_default() += 1;
    state.file_key = None;
    if let Err(code) = refresh(&mut state) {
        return code;
    }
    if let Some(code) = state.scenario.init_error {
        return code;
    }
    state.initialized += 1;
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    nvmlInit_v2()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> Ret {
    let mut state = lock();
    *state.calls.entry("nvmlShutdown").or_default() += 1;
    if state.initialized == 0 {
        return ERROR_UNINITIALIZED;
    }
    state.initialized -= 1;
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let s: &'static CStr = match result {
        SUCCESS => c"Success",
        ERROR_UNINITIALIZED => c"Uninitialized",
        ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        ERROR_NOT_SUPPORTED => c"Not Supported",
        ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        ERROR_TIMEOUT => c"Timeout",
        ERROR_GPU_IS_LOST => c"GPU is lost",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> Ret {
    with_state("nvmlSystemGetDriverVersion", |s| {
        let v = s.scenario.driver_version.clone().unwrap_or_else(|| "550.54.15".into());
        // SAFETY: NVML's contract: `version` holds `length` bytes.
        unsafe { write_str(&v, version, length) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(version: *mut c_char, length: c_uint) -> Ret {
    with_state("nvmlSystemGetNVMLVersion", |s| {
        let v = s.scenario.nvml_version.clone().unwrap_or_else(|| "12.550.54.15".into());
        // SAFETY: NVML's contract: `version` holds `length` bytes.
        unsafe { write_str(&v, version, length) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    with_state("nvmlDeviceGetCount_v2", |s| {
        if count.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: non-null out pointer from the caller.
        unsafe { *count = s.scenario.gpus.len() as c_uint };
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut *mut c_void) -> Ret {
    with_state("nvmlDeviceGetHandleByIndex_v2", |s| {
        if device.is_null() || index as usize >= s.scenario.gpus.len() {
            return ERROR_INVALID_ARGUMENT;
        }
        if s.scenario.gpus[index as usize].lost {
            return ERROR_GPU_IS_LOST;
        }
        // SAFETY: non-null out pointer from the caller.
        unsafe { *device = handle_of(index as usize) };
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: *mut c_void, index: *mut c_uint) -> Ret {
    with_gpu("nvmlDeviceGetIndex", device, None, |_| {
        // SAFETY: out pointer from the caller.
        unsafe { *index = index_of(device) as c_uint };
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(device: *mut c_void, uuid: *mut c_char, length: c_uint) -> Ret {
    // SAFETY: NVML's contract: `uuid` holds `length` bytes.
    with_gpu("nvmlDeviceGetUUID", device, None, |g| unsafe { write_str(&g.uuid, uuid, length) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(device: *mut c_void, name: *mut c_char, length: c_uint) -> Ret {
    // SAFETY: NVML's contract: `name` holds `length` bytes.
    with_gpu("nvmlDeviceGetName", device, None, |g| unsafe { write_str(&g.name, name, length) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: *mut c_void, memory: *mut Memory) -> Ret {
    with_gpu("nvmlDeviceGetMemoryInfo_v2", device, None, |g| {
        if memory.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: non-null, caller-allocated nvmlMemory_v2_t.
        let m = unsafe { &mut *memory };
        // Real NVML checks the struct version the caller set; so does this one.
        if m.version != (std::mem::size_of::<Memory>() as u32 | (2 << 24)) {
            return ERROR_ARGUMENT_VERSION_MISMATCH;
        }
        let used: u64 = g.processes.iter().filter_map(|p| p.bytes).sum::<u64>() + g.unlisted_bytes;
        m.total = g.total_bytes;
        m.reserved = g.reserved_bytes;
        m.used = used;
        m.free = g.total_bytes.saturating_sub(g.reserved_bytes).saturating_sub(used);
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(device: *mut c_void, current: *mut c_uint, pending: *mut c_uint) -> Ret {
    with_gpu("nvmlDeviceGetMigMode", device, Some("mig"), |g| {
        // SAFETY: out pointers from the caller.
        unsafe {
            *current = u32::from(g.mig);
            *pending = u32::from(g.mig);
        }
        SUCCESS
    })
}

/// NVML's count-then-fill: `*count` in is the room at `infos`, out is how many there are;
/// too little room answers `INSUFFICIENT_SIZE` with the count set.
unsafe fn processes(g: &Gpu, graphics: bool, count: *mut c_uint, infos: *mut ProcessInfo) -> Ret {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let list: Vec<ProcessInfo> = g
        .processes
        .iter()
        .filter(|p| p.graphics == graphics)
        .map(|p| ProcessInfo {
            pid: p.pid,
            usedGpuMemory: p.bytes.unwrap_or(VALUE_NOT_AVAILABLE),
            gpuInstanceId: NO_INSTANCE,
            computeInstanceId: NO_INSTANCE,
        })
        .collect();
    // SAFETY: non-null in/out count from the caller; `infos` has room for `*count` entries.
    unsafe {
        let room = *count as usize;
        *count = list.len() as c_uint;
        if list.is_empty() {
            return SUCCESS;
        }
        if room < list.len() || infos.is_null() {
            return ERROR_INSUFFICIENT_SIZE;
        }
        std::ptr::copy_nonoverlapping(list.as_ptr(), infos, list.len());
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: *mut c_void,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    // SAFETY: pointers passed through from the caller.
    with_gpu("nvmlDeviceGetComputeRunningProcesses_v3", device, None, |g| unsafe { processes(g, false, count, infos) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: *mut c_void,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    // SAFETY: pointers passed through from the caller.
    with_gpu("nvmlDeviceGetGraphicsRunningProcesses_v3", device, None, |g| unsafe { processes(g, true, count, infos) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(device: *mut c_void, utilization: *mut Utilization) -> Ret {
    with_gpu("nvmlDeviceGetUtilizationRates", device, Some("utilization"), |g| {
        // MIG GPUs refuse utilisation on real drivers.
        if g.mig {
            return ERROR_NOT_SUPPORTED;
        }
        // SAFETY: out pointer from the caller.
        unsafe { *utilization = Utilization { gpu: g.utilization_pct, memory: 0 } };
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(device: *mut c_void, sensor: c_uint, temp: *mut c_uint) -> Ret {
    with_gpu("nvmlDeviceGetTemperature", device, Some("temperature"), |g| {
        if sensor != 0 {
            return ERROR_INVALID_ARGUMENT; // Only NVML_TEMPERATURE_GPU exists.
        }
        // SAFETY: out pointer from the caller.
        unsafe { *temp = g.temperature_c };
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: *mut c_void, power: *mut c_uint) -> Ret {
    with_gpu("nvmlDeviceGetPowerUsage", device, Some("power"), |g| {
        // SAFETY: out pointer from the caller.
        unsafe { *power = g.power_mw };
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(device: *mut c_void, types: *mut c_ulonglong) -> Ret {
    with_gpu("nvmlDeviceGetSupportedEventTypes", device, Some("events"), |_| {
        // SAFETY: out pointer from the caller.
        unsafe { *types = EVENT_XID | EVENT_DOUBLE_BIT_ECC };
        SUCCESS
    })
}

/// An event set: which devices it watches for which types, and what it delivered.
struct EventSet {
    registered: Vec<(usize, u64)>,
    delivered: BTreeMap<usize, u64>,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut *mut c_void) -> Ret {
    with_state("nvmlEventSetCreate", |_| {
        if set.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        let boxed = Box::new(EventSet { registered: Vec::new(), delivered: BTreeMap::new() });
        // SAFETY: non-null out pointer from the caller.
        unsafe { *set = Box::into_raw(boxed).cast() };
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(device: *mut c_void, types: c_ulonglong, set: *mut c_void) -> Ret {
    with_gpu("nvmlDeviceRegisterEvents", device, Some("events"), |g| {
        if set.is_null() || types & !(EVENT_XID | EVENT_DOUBLE_BIT_ECC) != 0 {
            return ERROR_NOT_SUPPORTED;
        }
        // SAFETY: a set made by nvmlEventSetCreate and not yet freed (the caller's contract).
        let set = unsafe { &mut *set.cast::<EventSet>() };
        let index = index_of(device);
        // Events queued before registration are not delivered, as on a real driver.
        let seen = g.events.iter().map(|e| e.id).max().unwrap_or(0);
        set.delivered.insert(index, seen);
        set.registered.push((index, types));
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(set: *mut c_void, data: *mut EventData, timeout_ms: c_uint) -> Ret {
    if set.is_null() || data.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        let ret = with_state("nvmlEventSetWait_v2", |s| {
            // SAFETY: a set made by nvmlEventSetCreate; waits on one set are not concurrent.
            let set = unsafe { &mut *set.cast::<EventSet>() };
            for &(index, types) in &set.registered {
                let Some(gpu) = s.scenario.gpus.get(index) else { continue };
                let seen = set.delivered.get(&index).copied().unwrap_or(0);
                let mut next = gpu.events.iter().filter(|e| e.id > seen).collect::<Vec<_>>();
                next.sort_by_key(|e| e.id);
                for e in next {
                    set.delivered.insert(index, e.id);
                    let kind = match e.kind.as_str() {
                        "xid" => EVENT_XID,
                        "ecc_double_bit" => EVENT_DOUBLE_BIT_ECC,
                        _ => 0,
                    };
                    if kind & types == 0 {
                        continue;
                    }
                    // SAFETY: non-null out pointer from the caller.
                    unsafe {
                        *data = EventData {
                            device: handle_of(index),
                            eventType: kind,
                            eventData: e.data,
                            gpuInstanceId: NO_INSTANCE,
                            computeInstanceId: NO_INSTANCE,
                        };
                    }
                    return SUCCESS;
                }
            }
            ERROR_TIMEOUT
        });
        if ret != ERROR_TIMEOUT || Instant::now() >= deadline {
            return ret;
        }
        std::thread::sleep(Duration::from_millis(EVENT_POLL_MS).min(deadline - Instant::now()));
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: *mut c_void) -> Ret {
    let mut state = lock();
    *state.calls.entry("nvmlEventSetFree").or_default() += 1;
    if set.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: made by Box::into_raw in nvmlEventSetCreate; freed once (the caller's contract).
    drop(unsafe { Box::from_raw(set.cast::<EventSet>()) });
    SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvml_wrapper_sys::bindings as sys;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn layouts_match_nvml_wrapper_sys() {
        assert_eq!(size_of::<Memory>(), size_of::<sys::nvmlMemory_v2_t>());
        assert_eq!(align_of::<Memory>(), align_of::<sys::nvmlMemory_v2_t>());
        assert_eq!(offset_of!(Memory, version), offset_of!(sys::nvmlMemory_v2_t, version));
        assert_eq!(offset_of!(Memory, total), offset_of!(sys::nvmlMemory_v2_t, total));
        assert_eq!(offset_of!(Memory, reserved), offset_of!(sys::nvmlMemory_v2_t, reserved));
        assert_eq!(offset_of!(Memory, free), offset_of!(sys::nvmlMemory_v2_t, free));
        assert_eq!(offset_of!(Memory, used), offset_of!(sys::nvmlMemory_v2_t, used));

        assert_eq!(size_of::<ProcessInfo>(), size_of::<sys::nvmlProcessInfo_t>());
        assert_eq!(offset_of!(ProcessInfo, pid), offset_of!(sys::nvmlProcessInfo_t, pid));
        assert_eq!(offset_of!(ProcessInfo, usedGpuMemory), offset_of!(sys::nvmlProcessInfo_t, usedGpuMemory));
        assert_eq!(offset_of!(ProcessInfo, gpuInstanceId), offset_of!(sys::nvmlProcessInfo_t, gpuInstanceId));
        assert_eq!(offset_of!(ProcessInfo, computeInstanceId), offset_of!(sys::nvmlProcessInfo_t, computeInstanceId));

        assert_eq!(size_of::<Utilization>(), size_of::<sys::nvmlUtilization_t>());
        assert_eq!(offset_of!(Utilization, memory), offset_of!(sys::nvmlUtilization_t, memory));

        assert_eq!(size_of::<EventData>(), size_of::<sys::nvmlEventData_t>());
        assert_eq!(offset_of!(EventData, eventType), offset_of!(sys::nvmlEventData_t, eventType));
        assert_eq!(offset_of!(EventData, eventData), offset_of!(sys::nvmlEventData_t, eventData));
        assert_eq!(offset_of!(EventData, gpuInstanceId), offset_of!(sys::nvmlEventData_t, gpuInstanceId));
        assert_eq!(offset_of!(EventData, computeInstanceId), offset_of!(sys::nvmlEventData_t, computeInstanceId));
    }

    #[test]
    fn return_codes_and_constants_match_nvml_wrapper_sys() {
        assert_eq!(ERROR_UNINITIALIZED, sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED);
        assert_eq!(ERROR_INVALID_ARGUMENT, sys::nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT);
        assert_eq!(ERROR_NOT_SUPPORTED, sys::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED);
        assert_eq!(ERROR_INSUFFICIENT_SIZE, sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE);
        assert_eq!(ERROR_DRIVER_NOT_LOADED, sys::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED);
        assert_eq!(ERROR_TIMEOUT, sys::nvmlReturn_enum_NVML_ERROR_TIMEOUT);
        assert_eq!(ERROR_GPU_IS_LOST, sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST);
        assert_eq!(ERROR_ARGUMENT_VERSION_MISMATCH, sys::nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
        assert_eq!(ERROR_UNKNOWN, sys::nvmlReturn_enum_NVML_ERROR_UNKNOWN);
        assert_eq!(VALUE_NOT_AVAILABLE, sys::NVML_VALUE_NOT_AVAILABLE as u64);
        assert_eq!(EVENT_XID, u64::from(sys::nvmlEventTypeXidCriticalError));
        assert_eq!(EVENT_DOUBLE_BIT_ECC, u64::from(sys::nvmlEventTypeDoubleBitEccError));
    }
}
