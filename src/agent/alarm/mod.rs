//! The main loop's alarm: sleep until an instant with one wake-up.
//!
//! tokio's timer wheel wakes a thread at each level boundary on the way to a far deadline (a
//! 30 s sleep ends in three wake-ups: at the 4 s slot, the 64 ms slot, then the instant). For an
//! agent that sleeps half a minute between heartbeats that triples its idle wake-ups. On Linux a
//! `timerfd` in the runtime's reactor fires once, at the instant; elsewhere tokio's sleep is
//! used. Chosen here, in one place.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(not(target_os = "linux"))]
mod portable;

#[cfg(target_os = "linux")]
pub use linux::Alarm;
#[cfg(not(target_os = "linux"))]
pub use portable::Alarm;
