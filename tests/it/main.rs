//! Integration tests: the real `nixfleet-agent` binary against a fake NixFleet v1 dashboard on
//! 127.0.0.1, with real git repositories and real child processes.
//!
//! Index:
//! - `support`: the harness (fake dashboard, agent process, git repos, stand-in tools).
//! - `core`: registration fields, the start report, command delivery and reports, config
//!   errors (exit 78), `restart`, unknown commands, SIGTERM.
//! - `tokens`: per-host token migration used at once and persisted 0600, fallback from a
//!   refused cached token, 401 back-off naming the token source.
//! - `resilience`: dashboard down then up, hanging, garbage and oversized replies, 500, 422,
//!   heartbeats during a long command, commands queued while busy, TLS with CA file and pin.

#![allow(
    clippy::disallowed_methods,
    reason = "tests drive real processes directly to observe the agent from outside"
)]

mod core;
mod resilience;
mod support;
mod tokens;
