//! The controller: takes batch submissions, keeps them in a durable store,
//! schedules every job onto free GPUs of some agent, and retries.
//!
//! Read it top-down; no module imports one that imports it back:
//!
//! - [`core`]: the scheduling state machine, with no I/O. Placement, liveness,
//!   reconciliation, attempts and retries; time and facts come in as inputs.
//! - [`records`]: what the store persists and the core rebuilds from.
//! - [`cosmos`]: the Cosmos Transfer domain (prompts, run parameters) and its
//!   compilation into job specs; pure.
//! - [`store`]: the durable store (SQLite, WAL, one writer).
//! - [`gate`]: "persist, then act": releases what waited on a persist once it
//!   is durable, for the daemon and the simulator alike.
//! - [`shared`]: the data directory's layout, the clocks, what the shells share.
//! - [`actor`]: the core in an actix actor, and the messages it takes.
//! - [`logs`]: attempt logs, written as agents stream them and read by the API.
//! - [`blobs`]: artifact traffic of one agent connection (inputs out, outputs in).
//! - [`agent_link`]: the agents' port: handshakes and connection actors.
//! - [`http`]: the HTTP API (jobs, Cosmos runs, blobs), its auth and its errors.
//! - [`metrics`]: the Prometheus metrics `GET /metrics` serves.
//! - [`trace`]: each job's trace, derived from what the core persists.
//! - [`retention`]: pruning finished jobs, their logs, and blobs nothing references.
//! - [`service`]: what systemd hears (`sd_notify`): ready, status, watchdog pings.
//! - [`daemon`]: the wiring root; it imports everything and nothing imports it.

pub use cosmos_controller_core::{core, prompt, records};

pub mod actor;
pub mod agent_link;
pub mod blobs;
pub mod cosmos;
pub mod daemon;
pub mod events;
pub mod gate;
pub mod hosts;
pub mod http;
pub mod logs;
pub mod logstore;
pub mod metrics;
pub mod retention;
pub mod service;
pub mod shared;
pub mod store;
pub mod trace;
