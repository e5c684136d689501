//! The agent: runs attempts on a GPU host.

pub mod core;
pub mod daemon;
pub mod process;
pub mod runtime;
