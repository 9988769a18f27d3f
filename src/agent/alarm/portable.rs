//! The alarm where there is no `timerfd`: tokio's sleep.

use std::time::Instant;

/// Sleeps until an instant (cancel-safe: dropping the future cancels the sleep).
#[derive(Debug, Default)]
pub struct Alarm;

impl Alarm {
    pub fn new() -> Alarm {
        Alarm
    }

    pub async fn sleep_until(&mut self, at: Instant) {
        tokio::time::sleep_until(at.into()).await;
    }
}
