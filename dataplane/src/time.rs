//! Time as a value. The engine never reads a clock: callers pass `now` in, so tests move a virtual clock
//! (2 h 4 min of TCP idle time is a function argument, not a sleep).

use std::time::Duration;

/// A monotonic instant in nanoseconds since an arbitrary origin (CLOCK_MONOTONIC in production, 0 in tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    pub const ZERO: Instant = Instant(0);

    pub fn from_secs(secs: u64) -> Instant {
        Instant(secs.saturating_mul(1_000_000_000))
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// Reads the process's monotonic clock. For the I/O layer only; the engine takes `now` as an argument.
    pub fn monotonic() -> Instant {
        use std::sync::OnceLock;
        static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(std::time::Instant::now);
        Instant(origin.elapsed().as_nanos() as u64)
    }

    pub fn saturating_add(self, d: Duration) -> Instant {
        Instant(self.0.saturating_add(d.as_nanos().min(u64::MAX as u128) as u64))
    }

    /// Time elapsed since `earlier`, zero if `earlier` is in the future.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        self.saturating_add(d)
    }
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A token bucket in virtual time: `burst` tokens, refilled at `per_sec`; the rate limit of what a worker
/// reports or sends on its own (audit events, ICMP errors). Tokens are kept in units of 1/10⁹ of
/// a token so a refill of a few nanoseconds is not lost to rounding.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    per_sec: u64,
    capacity: u64,
    units: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> TokenBucket {
        let capacity = u64::from(burst.max(1)) * NANOS_PER_SEC;
        TokenBucket { per_sec: u64::from(per_sec), capacity, units: capacity, last: now }
    }

    /// Takes one token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.0.saturating_sub(self.last.0);
        if now.0 > self.last.0 {
            self.last = now;
        }
        let earned = u128::from(elapsed) * u128::from(self.per_sec);
        self.units = (u128::from(self.units) + earned).min(u128::from(self.capacity)) as u64;
        if self.units < NANOS_PER_SEC {
            return false;
        }
        self.units -= NANOS_PER_SEC;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANOS_PER_SEC;

    #[test]
    fn the_bucket_allows_its_burst_then_refills_with_time() {
        let mut b = TokenBucket::new(1000, 50, Instant(0));
        assert_eq!((0..60).filter(|_| b.take(Instant(0))).count(), 50, "burst of 50");
        assert!(!b.take(Instant(999_999)), "not yet one ms");
        assert!(b.take(Instant(1_000_000)), "one token per ms");
        assert!(!b.take(Instant(1_000_000)));
        // A long idle spell refills to the burst, not beyond.
        assert_eq!((0..100).filter(|_| b.take(Instant(10 * SEC))).count(), 50);
        // Time going backwards earns nothing and does not panic.
        assert!(!b.take(Instant(5)));
    }

    #[test]
    fn a_bucket_of_one_per_second() {
        let mut b = TokenBucket::new(1, 1, Instant(7));
        assert!(b.take(Instant(7)));
        assert!(!b.take(Instant(7 + SEC / 2)));
        assert!(b.take(Instant(7 + SEC)));
    }

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        let t = Instant(u64::MAX - 5);
        assert_eq!(t + Duration::from_secs(1), Instant(u64::MAX));
        assert_eq!(Instant(5).saturating_since(Instant(10)), Duration::ZERO);
        assert_eq!(Instant::from_secs(3).saturating_since(Instant::from_secs(1)), Duration::from_secs(2));
    }
}
