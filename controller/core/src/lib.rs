//! The controller's sans-I/O state machines and the records they persist: the scheduling core,
//! the blob intake, and the store's record types. No I/O, no runtime: the controller's actor
//! shells (the `cosmos-controller` crate) drive them, the simulator and the core tests call
//! them directly. A crate of its own so that nothing here can reach a socket or a clock by
//! accident, and so a change to it rebuilds only it (a mutation run rebuilds it per mutant).

pub mod core;
pub mod prompt;
pub mod records;

/// The blob state machines.
pub mod blobs {
    pub mod machine;
}
