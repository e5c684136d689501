//! Runs a [`GpuSource`] on a thread that owns it (NVML calls block, and the
//! handle stays on one thread), sampling at a fixed interval; health events
//! come from a second thread where the GPUs support them. Reports reach the
//! agent's main loop on a channel, and the threads end when it is dropped.

use super::{GpuSample, GpuSource, HealthEvent, Metric};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Default time between two samples of every GPU.
pub const DEFAULT_SAMPLE_INTERVAL_MS: u64 = 500;
/// Least time one sample's NVML calls may take before the agent stops: calls that
/// do not return (a wedged driver) leave VRAM unmeasured, so leaks and foreign
/// use would go unseen while the agent still looked alive.
pub const SAMPLE_STALL_MS_MIN: u64 = 5_000;
/// Sample intervals one sample may take before the agent stops (at least [`SAMPLE_STALL_MS_MIN`]).
pub const SAMPLE_STALL_INTERVALS: u64 = 20;

/// How long one sample may take before the agent stops, for a sampling interval.
pub fn stall_bound_ms(sample_interval_ms: u64) -> u64 {
    sample_interval_ms.saturating_mul(SAMPLE_STALL_INTERVALS).max(SAMPLE_STALL_MS_MIN)
}

/// Whether the sampling thread is inside a sample, and since when: only a call
/// that does not return counts, not a main loop slow to take the reports.
#[derive(Clone, Debug)]
pub struct Sampling {
    origin: Instant,
    /// 0 between samples; else 1 + ms since `origin` when the current sample began.
    in_sample_since: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Sampling {
    fn new() -> Sampling {
        Sampling { origin: Instant::now(), in_sample_since: Default::default() }
    }

    fn begin(&self) {
        let at = self.origin.elapsed().as_millis() as u64 + 1;
        self.in_sample_since.store(at, std::sync::atomic::Ordering::Relaxed);
    }

    fn end(&self) {
        self.in_sample_since.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the sample under way has taken; none between samples.
    pub fn in_sample_ms(&self) -> Option<u64> {
        match self.in_sample_since.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            at => Some((self.origin.elapsed().as_millis() as u64 + 1).saturating_sub(at)),
        }
    }
}
/// Reports queued for the main loop before the monitor waits.
const REPORT_QUEUE_LEN: usize = 16;
/// How long the event thread waits at a time before it looks whether the agent still listens.
const EVENT_WAIT_MS: u32 = 250;

/// What the monitor tells the agent.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// Every offered GPU, read now.
    Samples(Vec<GpuSample>),
    /// A health event from the driver.
    Event(HealthEvent),
}

/// Starts sampling `source` every `sample_interval_ms`; the receiver closes if the monitor thread ends,
/// and [`Sampling`] tells how long a sample under way has taken.
pub fn spawn(
    mut source: Box<dyn GpuSource>,
    sample_interval_ms: u64,
) -> std::io::Result<(mpsc::Receiver<Report>, Sampling)> {
    let (tx, rx) = mpsc::channel(REPORT_QUEUE_LEN);
    let sampling = Sampling::new();
    let in_sample = sampling.clone();
    if let Some(mut events) = source.events() {
        let tx = tx.clone();
        std::thread::Builder::new().name("gpu-events".into()).spawn(move || {
            while !tx.is_closed() {
                if let Some(e) = events.wait(EVENT_WAIT_MS) {
                    if tx.blocking_send(Report::Event(e)).is_err() {
                        return;
                    }
                }
            }
        })?;
    }
    std::thread::Builder::new().name("gpu-monitor".into()).spawn(move || {
        let interval = Duration::from_millis(sample_interval_ms.max(1));
        let mut told: BTreeSet<(String, Metric)> = BTreeSet::new();
        loop {
            let started = Instant::now();
            in_sample.begin();
            let samples = source.sample();
            in_sample.end();
            for u in source.unsupported() {
                if told.insert(u.clone()) {
                    tracing::info!(gpu = u.0, metric = ?u.1, "GPU does not support this metric; not asked again");
                }
            }
            if tx.blocking_send(Report::Samples(samples)).is_err() {
                return;
            }
            std::thread::sleep(interval.saturating_sub(started.elapsed()));
        }
    })?;
    Ok((rx, sampling))
}
