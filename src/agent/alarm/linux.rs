//! The alarm on Linux: a monotonic `timerfd` registered with tokio's reactor, so a far deadline
//! costs one wake-up. Falls back to tokio's sleep if the timerfd cannot be made.

use std::time::Instant;

use nix::sys::time::TimeSpec;
use nix::sys::timer::Expiration;
use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Sleeps until an instant (cancel-safe: a dropped sleep leaves the timer armed, and the next
/// [`Alarm::sleep_until`] re-arms it, which also clears a pending expiry).
#[derive(Debug)]
pub struct Alarm {
    timer: Option<AsyncFd<Timer>>,
}

/// The timerfd as tokio's reactor wants it (`AsRawFd`).
#[derive(Debug)]
struct Timer(TimerFd);

impl std::os::fd::AsRawFd for Timer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

impl Alarm {
    pub fn new() -> Alarm {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .ok()
        .and_then(|fd| {
            // SAFETY: `Timer` owns the timerfd for as long as the `AsyncFd` holds it, and its
            // `as_raw_fd` always returns that descriptor.
            unsafe { AsyncFd::register_with_interest(Timer(fd), Interest::READABLE) }.ok()
        });
        if timer.is_none() {
            tracing::debug!("no timerfd; the main loop sleeps with tokio's timer");
        }
        Alarm { timer }
    }

    pub async fn sleep_until(&mut self, at: Instant) {
        let Some(timer) = &self.timer else {
            return tokio::time::sleep_until(at.into()).await;
        };
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // Due already: still give the other tasks a turn (tokio's own sleep does, through
            // its budget), so a loop whose deadline passed cannot starve them.
            return tokio::task::yield_now().await;
        }
        let armed = timer.get_ref().0.set(
            Expiration::OneShot(TimeSpec::from_duration(left)),
            TimerSetTimeFlags::empty(),
        );
        if armed.is_err() {
            return tokio::time::sleep_until(at.into()).await;
        }
        loop {
            let Ok(mut ready) = timer.readable().await else {
                return tokio::time::sleep_until(at.into()).await;
            };
            let mut expirations = [0u8; 8];
            match nix::unistd::read(&timer.get_ref().0, &mut expirations) {
                Ok(_) => return,
                // Readiness from an expiry the re-arming cleared: wait on.
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(_) => return tokio::time::sleep_until(at.into()).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn fires_at_the_instant_and_can_be_rearmed_after_a_cancelled_sleep() {
        let mut alarm = Alarm::new();
        assert!(alarm.timer.is_some(), "timerfd available on Linux");
        // A sleep dropped before it fired, then one that is awaited.
        let early = Instant::now() + Duration::from_millis(30);
        let _ = tokio::time::timeout(Duration::from_millis(5), alarm.sleep_until(early)).await;
        let at = Instant::now() + Duration::from_millis(80);
        alarm.sleep_until(at).await;
        let late = Instant::now().saturating_duration_since(at);
        assert!(Instant::now() >= at);
        assert!(late < Duration::from_millis(50), "{late:?} late");
        // A past instant returns at once.
        let t = Instant::now();
        alarm.sleep_until(t - Duration::from_secs(1)).await;
        assert!(t.elapsed() < Duration::from_millis(20));
    }
}
