//! Process exit codes: the one place that gives them names.
//!
//! Every code here means something to the supervisor (systemd `Restart=`,
//! `RestartPreventExitStatus=`, `RestartForceExitStatus=`; launchd `KeepAlive`), so each is
//! documented in README.md and ARCHITECTURE.md as well. Nothing else in the crate may call
//! `std::process::exit` with a literal.

/// Normal stop (SIGTERM/SIGINT) and the dashboard's `restart` command. systemd
/// `Restart=always` and launchd `KeepAlive=true` start the agent again.
pub const OK: u8 = 0;
/// An unexpected runtime failure (a bug, or the OS refusing something basic). Restarted.
pub const FAILURE: u8 = 1;
/// A successful switch replaced the agent's own executable or changed its service definition
/// (`NIXFLEET_RESTART_ON_CHANGE`): exit so the supervisor starts the new one.
/// `RestartForceExitStatus=10`.
pub const RESTART_NEW_BINARY: u8 = 10;
/// The stall monitor found the main loop wedged and aborted the process (EX_SOFTWARE).
/// Restarted.
pub const STALLED: u8 = 70;
/// No usable state/runtime directory for the lock and state files (EX_CANTCREAT). Restarted
/// after `RestartSec`, since a directory may appear (a mount that comes late).
pub const NO_STATE_DIR: u8 = 73;
/// Another agent holds the instance lock and is making progress (EX_TEMPFAIL). Under a
/// supervisor this is retried after `RestartSec`; by hand it simply tells you one is running.
pub const ALREADY_RUNNING: u8 = 75;
/// Invalid configuration (EX_CONFIG): the message names the setting. `RestartPreventExitStatus=78`
/// so a broken config does not restart in a loop.
pub const CONFIG: u8 = 78;
