//! Supervisor integration: what lets systemd or launchd, and the agent itself, notice that the
//! main loop stopped making progress.
//!
//! - [`progress`]: the main loop's heartbeat (in memory and as a file's mtime).
//! - [`notify`]: systemd `sd_notify` (READY, STATUS, WATCHDOG, STOPPING); a no-op elsewhere.
//! - [`stall`]: an OS thread that aborts the process with `exit::STALLED` when the heartbeat
//!   stops, so the supervisor restarts a wedged agent.
//!
//! Nothing here owns agent state or decides policy (thresholds come from config), and nothing
//! here pings the watchdog on its own: pings come from the main loop's progress, so a wedged
//! loop stops them. Platform differences sit in `linux.rs` / `macos.rs`, chosen below.

pub mod notify;
pub mod progress;
pub mod stall;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as platform;
#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
use macos as platform;
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
compile_error!("nixfleet-agent supports Linux and macOS only");
