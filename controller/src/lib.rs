//! The controller: scheduling core (no I/O), durable store.

pub mod core;
pub mod model;
pub mod store;
