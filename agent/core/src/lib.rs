//! The agent's sans-I/O state machines: the attempt core (what runs, what is reported, when a
//! stop turns into a kill), how an exit becomes an outcome, and the blob flow that stages inputs
//! and delivers outputs. No I/O, no runtime: the agent daemon (the `cosmos-agent` crate) drives
//! them, the simulator calls them directly. A crate of its own so that nothing here can reach a
//! socket, a container or a clock by accident, and so a change to it rebuilds only it (a
//! mutation run rebuilds it per mutant).

pub mod core;
pub mod exit;

/// The blob state machines.
pub mod blobs {
    pub mod machine;
}
