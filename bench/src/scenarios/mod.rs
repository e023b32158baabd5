//! The benchmark scenarios; each returns its markdown table(s).

pub mod acting;
pub mod commands;
pub mod nodes;
pub mod queries;
pub mod rebalance;
pub mod state;
pub mod throughput;
