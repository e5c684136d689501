//! Seed selection from the environment, and replay instructions on failure.

use crate::{Report, Scenario, run_seed};
use std::time::Instant;

/// The seeds to run: `COSMOS_SIM_SEED=S` runs just S; `COSMOS_SIM_SEEDS=N`
/// runs N seeds starting at `COSMOS_SIM_SEED_BASE` (default 0); else `default_count`.
pub fn from_env(default_count: u64) -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(seed) = var("COSMOS_SIM_SEED") {
        return vec![seed];
    }
    let base = var("COSMOS_SIM_SEED_BASE").unwrap_or(0);
    let count = var("COSMOS_SIM_SEEDS").unwrap_or(default_count);
    (base..base + count).collect()
}

/// Runs every seed of `seeds`; panics at the first violation with the command that replays it.
pub fn run_all(name: &str, test: &str, scenario: &Scenario, seeds: &[u64]) -> Vec<Report> {
    let started = Instant::now();
    let mut reports = Vec::with_capacity(seeds.len());
    for &seed in seeds {
        let report = run_seed(scenario, seed);
        if let Some(v) = &report.violation {
            panic!(
                "simulation `{name}` failed with seed {seed}: {v}\n  faults injected: {:?}\n  replay: COSMOS_SIM_SEED={seed} cargo test -p cosmos-sim --test sim -- {test} --exact --nocapture",
                report.faults
            );
        }
        reports.push(report);
    }
    let wall_s = started.elapsed().as_secs_f64();
    let simulated_s: f64 = reports.iter().map(|r| r.simulated_ms as f64 / 1000.0).sum();
    let events: u64 = reports.iter().map(|r| r.events).sum();
    println!(
        "sim {name}: {} seeds in {wall_s:.1} s ({:.1} seeds/s, {:.0} simulated s per wall s, {events} events)",
        seeds.len(),
        seeds.len() as f64 / wall_s,
        simulated_s / wall_s
    );
    reports
}
