//! Heartbeat timing as pure functions: the regular interval with a little jitter, and
//! exponential backoff with full jitter after failures. Randomness comes in as a number in
//! `[0, 1)` so tests can pin it.

use std::time::Duration;

/// Never retry faster than this, whatever the jitter draws (the v1 dashboard rate-limits
/// register at 30/min per IP).
pub const MIN_RETRY: Duration = Duration::from_secs(1);

/// Delay until the next heartbeat after a success: the interval plus up to 10 % (at most 2 s),
/// so a fleet started together spreads out instead of beating in lockstep.
pub fn next_interval(interval: Duration, random: f64) -> Duration {
    let spread = (interval / 10).min(Duration::from_secs(2));
    interval + spread.mul_f64(random.clamp(0.0, 1.0))
}

/// Delay before retry number `failures` (1 = first failure): full jitter over
/// `min(cap, interval * 2^failures)`, never under [`MIN_RETRY`]. Full jitter means that after
/// an outage of any length, the whole fleet is back within about one `cap`, spread evenly.
pub fn retry_delay(interval: Duration, cap: Duration, failures: u32, random: f64) -> Duration {
    let exp = interval.saturating_mul(1u32 << failures.min(16));
    let ceiling = exp.min(cap).max(MIN_RETRY);
    ceiling.mul_f64(random.clamp(0.0, 1.0)).max(MIN_RETRY)
}

/// After the dashboard refused our token: wait long (between half the cap and the cap), since
/// retrying fast cannot help and only fills its auth-failure metric.
pub fn auth_delay(cap: Duration, random: f64) -> Duration {
    let half = cap / 2;
    (half + half.mul_f64(random.clamp(0.0, 1.0))).max(MIN_RETRY)
}

/// The first heartbeat interval after an outage: anywhere within two intervals (at least
/// [`MIN_RETRY`]). A fleet reconnects in one wave (the retries' full jitter spreads it over
/// about one back-off cap); scheduling the next beats at a plain interval would echo that wave
/// one interval later, on top of the agents still reconnecting.
pub fn after_outage_interval(interval: Duration, random: f64) -> Duration {
    (interval * 2)
        .mul_f64(random.clamp(0.0, 1.0))
        .max(MIN_RETRY)
}

/// When, after reconnecting, the outage note is sent: anywhere within four intervals, so the
/// notes of a fleet spread out instead of doubling the reconnect wave.
pub fn outage_note_delay(interval: Duration, random: f64) -> Duration {
    (interval * 4).mul_f64(random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn regular_interval_has_small_positive_jitter() {
        assert_eq!(next_interval(S(30), 0.0), S(30));
        assert_eq!(next_interval(S(30), 0.999_999).as_secs(), 31);
        assert!(next_interval(S(600), 0.99) <= S(602));
        assert!(next_interval(S(1), 0.5) >= S(1));
    }

    #[test]
    fn backoff_grows_then_caps_with_full_jitter() {
        let cap = S(60);
        assert_eq!(retry_delay(S(30), cap, 1, 1.0), S(60));
        assert_eq!(retry_delay(S(1), cap, 1, 1.0), S(2));
        assert_eq!(retry_delay(S(1), cap, 3, 1.0), S(8));
        assert_eq!(retry_delay(S(1), cap, 30, 1.0), cap);
        assert_eq!(retry_delay(S(1), cap, 30, 0.0), MIN_RETRY);
        assert_eq!(retry_delay(S(1), cap, 30, 0.5), S(30));
    }

    #[test]
    fn fleet_returns_within_one_cap_after_any_outage() {
        // 30 agents after a 75 s outage with default cap 60 s: every one has retried within
        // 60 s of the dashboard coming back, whatever their failure count.
        for agent in 0..30u32 {
            for failures in 1..20 {
                let r = f64::from(agent) / 30.0;
                assert!(retry_delay(S(30), S(60), failures, r) <= S(60));
            }
        }
    }

    #[test]
    fn auth_failures_wait_long() {
        assert_eq!(auth_delay(S(60), 0.0), S(30));
        assert_eq!(auth_delay(S(60), 1.0), S(60));
    }

    /// Requests per second of a fleet of `agents` at `interval` through an outage of
    /// `outage`, using the agent's own timing functions: a heartbeat at each retry, then on
    /// reconnecting the note and the beats.
    fn fleet_requests(seed: u64, agents: u32, interval: f64, cap: f64, outage: f64) -> Vec<u32> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let end = outage + 600.0;
        let mut per_second = vec![0u32; end as usize + 1];
        let secs = Duration::from_secs_f64;
        let mut count = |t: f64| {
            if t < end {
                per_second[t as usize] += 1;
            }
        };
        for _ in 0..agents {
            let mut t = rng.f64() * interval;
            let mut failures = 0;
            while t < outage {
                failures += 1;
                t += retry_delay(secs(interval), secs(cap), failures, rng.f64()).as_secs_f64();
            }
            count(t);
            count(t + outage_note_delay(secs(interval), rng.f64()).as_secs_f64());
            let mut beat = t + after_outage_interval(secs(interval), rng.f64()).as_secs_f64();
            while beat < end {
                count(beat);
                beat += next_interval(secs(interval), rng.f64()).as_secs_f64();
            }
        }
        per_second
    }

    #[test]
    fn a_fleet_reconnecting_after_an_outage_stays_under_twice_its_steady_rate() {
        // 1000 agents at 30 s (mean 31 s with the jitter), a 10 minute outage, cap 60 s.
        let steady = 1000.0 / 31.0;
        let mut peaks: Vec<f64> = (0..21)
            .map(|seed| {
                let per_second = fleet_requests(seed, 1000, 30.0, 60.0, 600.0);
                f64::from(*per_second[600..900].iter().max().unwrap()) / steady
            })
            .collect();
        peaks.sort_by(f64::total_cmp);
        let median = peaks[peaks.len() / 2];
        // A steady fleet's busiest second over 5 minutes is itself about 1.5x (Poisson noise).
        assert!(
            median < 2.0,
            "busiest second {median:.2}x the steady rate: {peaks:?}"
        );
    }
}
