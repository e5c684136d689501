//! Cost of one GPU sample (memory, processes, utilisation, temperature,
//! power) through nvml-wrapper over the fake NVML library, for 1 and 8 GPUs
//! with 4 processes each. Per-GPU cost: the time per iteration divided by the
//! GPU count. Reported, not asserted. Needs `cargo build -p cosmos-fake-nvml --release`.

use cosmos_agent::gpu::nvml::NvmlSource;
use cosmos_agent::gpu::{GpuSelection, GpuSource};
use criterion::{Criterion, criterion_group, criterion_main};
use std::path::Path;

fn bench(c: &mut Criterion) {
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent().and_then(Path::parent).unwrap().join("libfake_nvml.so");
    assert!(lib.exists(), "{} missing: cargo build -p cosmos-fake-nvml --release", lib.display());
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("s.json");
    // SAFETY: our own library; the hook's signature as the fake declares it.
    let fake = unsafe { libloading::Library::new(&lib) }.unwrap();
    let path = std::ffi::CString::new(scenario.to_str().unwrap()).unwrap();
    unsafe {
        let set: libloading::Symbol<unsafe extern "C" fn(*const std::ffi::c_char)> =
            fake.get(b"fakeNvmlSetScenario\0").unwrap();
        set(path.as_ptr());
    }
    let mut group = c.benchmark_group("gpu_sample_over_fake_nvml");
    for n in [1usize, 8] {
        let gpus: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                serde_json::json!({
                    "uuid": format!("GPU-bench-{i}"), "name": "bench", "total_bytes": 80u64 << 30,
                    "processes": (0..4).map(|p| serde_json::json!({"pid": 1000 + p, "bytes": 1u64 << 30})).collect::<Vec<_>>(),
                })
            })
            .collect();
        std::fs::write(&scenario, serde_json::json!({ "gpus": gpus }).to_string()).unwrap();
        let mut source = NvmlSource::open(lib.to_str().unwrap(), &GpuSelection::All).unwrap();
        group.bench_function(format!("{n}_gpus"), |b| b.iter(|| source.sample()));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
