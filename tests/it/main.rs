//! Integration tests: the real `nixfleet-agent` binary against a fake NixFleet v1 dashboard on
//! 127.0.0.1, with real git repositories and real child processes.
//!
//! Index:
//! - `support`: the harness (fake dashboard, agent process, git repos, stand-in tools).
//! - `commands`: issue 3's command set with real git and processes: switch argv per mode and
//!   its cwd, failure and timeout reports (whole tree killed, heartbeats go on), pull-switch,
//!   git pull timeout, pull-reset, the test runner's progress and TIMEOUT, update (commit, push,
//!   refused push undone), the child environment allowlist, missing tools, a 50 MiB flood,
//!   invalid UTF-8.
//! - `core`: registration fields, the start report, command delivery and reports, config
//!   errors (exit 78), `restart`, unknown commands, SIGTERM.
//! - `tokens`: per-host token migration used at once and persisted 0600, fallback from a
//!   refused cached token, 401 back-off naming the token source.
//! - `resilience`: dashboard down then up, hanging, garbage and oversized replies, 500, 422,
//!   heartbeats during a long command, commands queued while busy, TLS with CA file and pin.
//! - `crash`: kill -9 during a detached switch and a test run, outbox across restarts, corrupt
//!   state files, queued commands after a crash, a bounded chaos run, exit 10 after a switch
//!   that installed a new binary, waiting for a manual switch that holds its lock.
//! - `hardening`: issue 10 (threat model in SECURITY.md): not dumpable and no core files, a
//!   flood of random 422 details, secrets in repo_url, planted token caches, prepared clone
//!   staging dirs, foreign-owned checkouts, linked or exposed state dirs, a journal pointing
//!   outside the state dir, and the TLS proofs (pin without trust, redirects, a trickled body).
//! - `rows`: regression tests that every result lands on its own dashboard log row (outage
//!   notes, reports made during a heartbeat, resumed switches, a proxy 404 blip).
//! - `supervisor`: sd-notify over path and abstract sockets (READY after the lock, STATUS,
//!   WATCHDOG stopping under SIGSTOP and a wedged loop, WATCHDOG_PID, STOPPING), stall exit 70,
//!   the instance lock (refusal 75, release after kill -9, verified takeover, unrelated holders
//!   never signalled), exit 73 without a directory, timestamped logs outside journald, SIGTERM
//!   at the first notification is a clean stop.
//! - `v2`: the same agent against the fake v2 (WebSocket) dashboard: bearer token, keepalive
//!   and redial, two agents with one hostname, every v2 command answered by name, busy
//!   refusals and stop, restart/reboot, a bounded output flood, results kept across outages and
//!   kill -9, the re-register that completes a switch, wss:// with a CA file.
//! - `fleet`: issue 11: switch isolation without systemd, restart causes, changes made by
//!   others, `nixfleet-agent status`, reboot needed, the metrics file.

#![allow(
    clippy::disallowed_methods,
    reason = "tests drive real processes directly to observe the agent from outside"
)]

mod commands;
mod core;
mod crash;
mod fleet;
mod hardening;
mod resilience;
mod rows;
mod supervisor;
mod support;
mod tokens;
mod v2;
