//! What a simulation run sets up: cluster size, workload and the faults allowed.

use cosmos_controller::core::CoreConfig;

/// Which kinds of fault a run may inject.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Broken connections, silent partitions, one-way partitions.
    pub network: bool,
    /// Agent processes crash (their containers survive or die with the host).
    pub agent_crash: bool,
    /// The controller crashes, also between persisting and sending.
    pub controller_crash: bool,
    /// Containers fail, hang, exit slowly, fail to start.
    pub containers: bool,
    /// Foreign processes take VRAM; jobs leak VRAM after they exit.
    pub gpus: bool,
    /// Blob chunks are damaged on the wire, reads fail unanswered, the host cache's disk and the
    /// controller's blob store fail (on top of the network faults the blob machines also meet).
    pub transfers: bool,
    /// A store write fails (disk full, I/O error): its transaction is lost and
    /// the controller stops, as the daemon fail-stops, then restarts on what was durable.
    pub store_failure: bool,
    /// The controller host's wall clock is stepped by minutes, forward and back.
    pub clock_steps: bool,
    /// With several controllers: the leader is paused (SIGSTOP) for up to three leases, also
    /// mid-commit and between persisting and sending; its host goes down for longer than a
    /// lease; it alone is cut off from the store for a while; a standby crashes.
    pub failover: bool,
}

impl Faults {
    /// Every kind.
    pub fn all() -> Faults {
        Faults {
            network: true,
            agent_crash: true,
            controller_crash: true,
            containers: true,
            gpus: true,
            transfers: true,
            store_failure: true,
            clock_steps: true,
            failover: false,
        }
    }

    /// Whether any kind is on.
    pub fn any(&self) -> bool {
        self.network
            || self.agent_crash
            || self.controller_crash
            || self.containers
            || self.gpus
            || self.transfers
            || self.store_failure
            || self.clock_steps
            || self.failover
    }
}

/// One simulated workload on one simulated cluster.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// GPU hosts.
    pub agents: usize,
    /// GPUs on each host.
    pub gpus_per_agent: u32,
    /// Jobs submitted at the start, as one batch.
    pub jobs: usize,
    /// Faults allowed.
    pub faults: Faults,
    /// Faults happen only before this virtual time.
    pub fault_window_ms: u64,
    /// Mean-ish gap between faults.
    pub fault_gap_ms: u64,
    /// After the fault window, every job must be final within this.
    pub liveness_bound_ms: u64,
    /// After the last job ended, time allowed for stray containers to be stopped.
    pub settle_ms: u64,
    /// The controller's tunables (shorter than production, to keep runs short).
    pub core: CoreConfig,
    /// Controller processes over the one store, each on its own host; with more than one they
    /// share a lease, as on PostgreSQL, and agents are given every address.
    pub controllers: usize,
    /// How long the lease lasts after each renewal (`--lease-ms`); leaders renew and standbys
    /// retry every third of it.
    pub lease_ms: u64,
    /// Whether the controllers share one blob store (`blobs/` on shared storage); otherwise
    /// each has its own, and outputs delivered to one are not on the other after a failover.
    pub shared_blob_store: bool,
    /// A deliberately broken agent blob machine, for the teeth tests.
    #[cfg(feature = "sabotage")]
    pub blob_sabotage: cosmos_agent::blobs::machine::Sabotage,
    /// A deliberately broken agent core, for the teeth tests.
    #[cfg(feature = "sabotage")]
    pub agent_sabotage: cosmos_agent::core::Sabotage,
    /// A store whose group commits skip the lease fence (the renewer still checks it), for the teeth tests.
    #[cfg(feature = "sabotage")]
    pub skip_fence: bool,
}

impl Scenario {
    /// The CI scenario: several agents, hundreds of jobs, every fault kind.
    pub fn ci() -> Scenario {
        Scenario {
            agents: 5,
            gpus_per_agent: 4,
            jobs: 200,
            faults: Faults::all(),
            fault_window_ms: 60_000,
            fault_gap_ms: 3_000,
            liveness_bound_ms: 600_000,
            settle_ms: 60_000,
            core: CoreConfig { lost_after_ms: 10_000, ..CoreConfig::default() },
            controllers: 1,
            lease_ms: 3_000,
            shared_blob_store: true,
            #[cfg(feature = "sabotage")]
            blob_sabotage: Default::default(),
            #[cfg(feature = "sabotage")]
            agent_sabotage: Default::default(),
            #[cfg(feature = "sabotage")]
            skip_fence: false,
        }
    }

    /// Two controllers over one store with a lease, under every fault kind plus pauses past
    /// the lease and failover at arbitrary points; each controller keeps its own blob store.
    /// Smaller than [`Scenario::ci`], so that CI's 1,000 seeds of it stay near a minute.
    pub fn failover() -> Scenario {
        Scenario {
            agents: 4,
            jobs: 60,
            controllers: 2,
            shared_blob_store: false,
            faults: Faults { failover: true, ..Faults::all() },
            ..Scenario::ci()
        }
    }

    /// Only the controller's wall clock is stepped, often, by minutes: nothing
    /// else goes wrong, so nothing may be lost or retried.
    pub fn clock_steps() -> Scenario {
        Scenario { faults: Faults { clock_steps: true, ..Faults::default() }, fault_gap_ms: 1_000, ..Scenario::ci() }
    }

    /// No faults at all: the happy path.
    pub fn calm() -> Scenario {
        Scenario { faults: Faults::default(), ..Scenario::ci() }
    }

    /// The controller's configuration for this run.
    pub fn core_config(&self) -> CoreConfig {
        self.core.clone()
    }
}
