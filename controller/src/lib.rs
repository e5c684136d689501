//! The controller: scheduling core (no I/O), durable store.

pub mod api;
pub mod api_transfer;
pub mod blobs;
pub mod core;
pub mod daemon;
pub mod model;
pub mod store;
pub mod transfer;
