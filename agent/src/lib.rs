//! The agent: runs attempts on a GPU host.

pub mod core;
