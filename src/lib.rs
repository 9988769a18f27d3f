//! nixfleet-agent: a host agent for the NixFleet dashboard.
//!
//! The binary in `main.rs` only calls [`cli::main`]. Everything else lives here so the
//! integration tests and the benchmark can reach the pure parts (config validation, backoff,
//! wire types) without a process in between. See ARCHITECTURE.md for the code map.

pub mod agent;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod definition;
pub mod detach;
pub mod exec;
pub mod exit;
pub mod facts;
pub mod harden;
pub mod lock;
pub mod logging;
pub mod metrics_file;
pub mod restart_cause;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod text;
pub mod trust;
