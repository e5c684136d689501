//! The agent: runs attempts on a GPU host.

pub use cosmos_agent_core::{core, exit};

pub mod blobs;
pub mod daemon;
pub mod docker;
pub mod gpu;
pub mod listen;
pub mod process;
pub mod retention;
pub mod runtime;
pub mod service;
pub mod simulated;
pub mod supervise;
pub mod supervisor_link;
pub mod telemetry;
