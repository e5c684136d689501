//! The simulator has teeth: each deliberately broken controller (and agent core, agent blob machine, and store
//! fence) is caught by the invariant meant for it, within a bounded number of seeds.
//!
//! `cargo test -p cosmos-sim --features sabotage --test teeth -- --nocapture`
//! prints how many seeds each took.

use cosmos_agent::blobs::machine::Sabotage as BlobSabotage;
use cosmos_agent::core::Sabotage as AgentSabotage;
use cosmos_controller::core::Sabotage;
use cosmos_sim::{Scenario, run_seed};

/// Seeds tried before declaring the simulator blind to a sabotage.
const SEEDS_MAX: u64 = 300;

fn caught_within(sabotage: Sabotage, expected: &[&str]) {
    let mut scenario = Scenario::ci();
    scenario.core.sabotage = sabotage;
    for seed in 0..SEEDS_MAX {
        if let Some(v) = run_seed(&scenario, seed).violation {
            println!("{sabotage:?}: caught at seed {seed} ({} seeds run), {v}", seed + 1);
            assert!(
                expected.iter().any(|e| v.what.contains(e)),
                "{sabotage:?} was caught, but by another check than expected ({expected:?}): {v}"
            );
            return;
        }
    }
    panic!("{sabotage:?} went unnoticed for {SEEDS_MAX} seeds: the simulator is blind to it");
}

#[test]
fn double_booked_gpus_are_caught() {
    caught_within(Sabotage::DoubleBookGpus, &["given to live attempts", "runs two attempts at once"]);
}

#[test]
fn forgotten_attempts_of_a_lost_host_are_caught() {
    caught_within(Sabotage::ForgetLostAttempts, &["is lost", "liveness"]);
}

#[test]
fn missing_fencing_is_caught() {
    caught_within(Sabotage::NoFencing, &["fencing", "succeeded twice"]);
}

#[test]
fn a_second_success_is_caught() {
    caught_within(Sabotage::SucceedTwice, &["written again", "succeeded twice"]);
}

#[test]
fn liveness_on_the_wall_clock_is_caught() {
    caught_within(Sabotage::WallClockDeadlines, &["declared lost after", "before next_deadline_ms did work"]);
}

// One sabotage per index or record the core keeps beside its jobs: each of these is caught by the
// check of `check_invariants` written for it, so none of those checks can pass whatever the state.

#[test]
fn per_state_counts_that_miss_a_change_are_caught() {
    caught_within(Sabotage::MiscountStates, &["jobs per state are"]);
}

#[test]
fn a_change_of_state_left_unpersisted_is_caught() {
    caught_within(Sabotage::UnpersistedCascade, &["was last persisted as"]);
}

#[test]
fn a_job_left_waiting_on_a_failed_dependency_is_caught() {
    caught_within(Sabotage::NoCascade, &["it can never start"]);
}

#[test]
fn a_final_job_left_among_the_blocked_is_caught() {
    caught_within(Sabotage::KeepBlockedWhenFinal, &["(final, live, queued)"]);
}

#[test]
fn a_stale_placement_index_is_caught() {
    caught_within(Sabotage::StaleFreeIndex, &["indexed with free GPUs"]);
}

#[test]
fn stale_ready_queue_shape_counts_are_caught() {
    caught_within(Sabotage::StaleShapeCounts, &["ready queue shape counts"]);
}

#[test]
fn a_stale_liveness_index_is_caught() {
    caught_within(Sabotage::StaleLivenessIndex, &["indexed with liveness deadline"]);
}

#[test]
fn a_liveness_deadline_left_out_of_the_index_is_caught() {
    caught_within(Sabotage::UnindexedLivenessDeadline, &["indexed with liveness deadline"]);
}

#[test]
fn a_download_resumed_past_its_good_bytes_is_caught() {
    // The agent's blob machine, on a rewind (a stall, a corrupt chunk, a cut link), resumes one
    // chunk past the bytes it has: the next chunk it accepts leaves a hole in the partial file.
    let mut scenario = Scenario::ci();
    scenario.blob_sabotage = BlobSabotage::ResumePastEnd;
    for seed in 0..SEEDS_MAX {
        if let Some(v) = run_seed(&scenario, seed).violation {
            println!("ResumePastEnd: caught at seed {seed} ({} seeds run), {v}", seed + 1);
            assert!(v.what.contains("past a hole"), "caught, but by another check than expected: {v}");
            return;
        }
    }
    panic!("ResumePastEnd went unnoticed for {SEEDS_MAX} seeds: the simulator is blind to it");
}

#[test]
fn an_agent_deadline_left_out_of_next_deadline_ms_is_caught() {
    // The agent core forgets to say when a stop's grace runs out: its daemon, sleeping until
    // next_deadline_ms, would never force-kill a container that ignores the stop.
    let mut scenario = Scenario::ci();
    scenario.agent_sabotage = AgentSabotage::ForgetKillDeadline;
    for seed in 0..SEEDS_MAX {
        if let Some(v) = run_seed(&scenario, seed).violation {
            println!("ForgetKillDeadline: caught at seed {seed} ({} seeds run), {v}", seed + 1);
            assert!(
                v.what.contains("before next_deadline_ms did work"),
                "caught, but by another check than expected: {v}"
            );
            return;
        }
    }
    panic!("ForgetKillDeadline went unnoticed for {SEEDS_MAX} seeds: the simulator is blind to it");
}

#[test]
fn a_deposed_leader_committing_past_the_fence_is_caught() {
    // The store's group commits skip the lease fence (the renewer still checks it): a leader
    // stopped past its lease, woken, commits what it had queued over its successor's state.
    let mut scenario = Scenario::failover();
    scenario.skip_fence = true;
    for seed in 0..SEEDS_MAX {
        if let Some(v) = run_seed(&scenario, seed).violation {
            println!("skip_fence: caught at seed {seed} ({} seeds run), {v}", seed + 1);
            assert!(
                v.what.contains("a deposed leader wrote") || v.what.contains("committed at epoch"),
                "caught, but by another check than expected: {v}"
            );
            return;
        }
    }
    panic!("skip_fence went unnoticed for {SEEDS_MAX} seeds: the simulator is blind to it");
}

#[test]
fn the_sound_core_passes_the_same_seeds() {
    // The control: without sabotage, the seeds the others are judged on pass.
    for scenario in [Scenario::ci(), Scenario::failover()] {
        for seed in 0..20 {
            let report = run_seed(&scenario, seed);
            assert!(report.violation.is_none(), "seed {seed}: {:?}", report.violation);
        }
    }
}
