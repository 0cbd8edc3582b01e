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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        let t = Instant(u64::MAX - 5);
        assert_eq!(t + Duration::from_secs(1), Instant(u64::MAX));
        assert_eq!(Instant(5).saturating_since(Instant(10)), Duration::ZERO);
        assert_eq!(Instant::from_secs(3).saturating_since(Instant::from_secs(1)), Duration::from_secs(2));
    }
}
