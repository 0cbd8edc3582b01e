//! Per-rule, per-client-address request rate limits of the L7 path ([`RateLimit`] on an `l7` rule), sans-IO.
//!
//! Each (rule, client address) has a token bucket of `requests` tokens refilled at `requests / per_secs` a second,
//! kept as one number: the generic cell rate algorithm's theoretical arrival time (a request is admitted when
//! the bucket's clock is no more than one period minus one interval ahead of now). A refusal says when the next
//! request would be admitted (`Retry-After`).
//!
//! Buckets are keyed by the rule's index: a reload keeps each bucket while the rule at that index has the same
//! limit, and starts it afresh when the limit changed. The table holds at most [`MAX_CLIENTS`] buckets; when
//! full, idle ones (full buckets, which a fresh one equals) are dropped; if none is idle, a new client is
//! refused (the L7 path's clients completed a TCP handshake, so they are real inside hosts, never spoofed).

use std::net::Ipv4Addr;

use crate::policy::l7::RateLimit;
use crate::policy::RuleId;
use crate::time::Instant;
// Keys come from clients (addresses, ports): seeded foldhash, much faster than SipHash.
use foldhash::HashMap;

/// Buckets held at most.
pub const MAX_CLIENTS: usize = 65_536;

const NANOS_PER_SEC: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    limit: RateLimit,
    /// The bucket's clock (nanoseconds of [`Instant`]): now, when full; a request moves it one interval on.
    theoretical_arrival: u64,
}

impl Bucket {
    fn interval(limit: RateLimit) -> u64 {
        (u64::from(limit.per_secs) * NANOS_PER_SEC / u64::from(limit.requests.max(1))).max(1)
    }

    fn is_idle(&self, now: u64) -> bool {
        self.theoretical_arrival <= now
    }
}

/// The buckets of every rate-limited rule and client.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: HashMap<(u32, Ipv4Addr), Bucket>,
    capacity: usize,
}

impl RateLimiter {
    pub fn new() -> RateLimiter {
        RateLimiter::with_capacity(MAX_CLIENTS)
    }

    pub fn with_capacity(capacity: usize) -> RateLimiter {
        RateLimiter { buckets: HashMap::default(), capacity: capacity.max(1) }
    }

    /// One request of `client` under `rule` at `now`: admitted, or refused with the whole seconds (≥ 1) until
    /// one would be.
    pub fn admit(
        &mut self,
        now: Instant,
        rule: RuleId,
        client: Ipv4Addr,
        limit: RateLimit,
    ) -> Result<(), u64> {
        let now = now.as_nanos();
        let interval = Bucket::interval(limit);
        let tolerance = (u64::from(limit.per_secs) * NANOS_PER_SEC).saturating_sub(interval);
        let key = (rule.0, client);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.capacity {
            self.buckets.retain(|_, b| !b.is_idle(now));
            if self.buckets.len() >= self.capacity {
                return Err(u64::from(limit.per_secs).max(1));
            }
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket { limit, theoretical_arrival: now });
        if bucket.limit != limit {
            *bucket = Bucket { limit, theoretical_arrival: now };
        }
        let arrival = bucket.theoretical_arrival.max(now);
        if arrival - now > tolerance {
            let wait = arrival - tolerance - now;
            return Err(wait.div_ceil(NANOS_PER_SEC).max(1));
        }
        bucket.theoretical_arrival = arrival + interval;
        Ok(())
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn at(millis: u64) -> Instant {
        Instant(millis * 1_000_000)
    }

    #[test]
    fn a_burst_of_the_limit_then_one_per_interval_per_client_and_rule() {
        let mut r = RateLimiter::new();
        let limit = RateLimit { requests: 5, per_secs: 10 };
        for i in 0..5 {
            assert_eq!(r.admit(at(1000), RuleId(0), A, limit), Ok(()), "request {i} of the burst");
        }
        // The sixth waits for the next token: 2 s (10 s / 5).
        assert_eq!(r.admit(at(1000), RuleId(0), A, limit), Err(2));
        assert_eq!(r.admit(at(2500), RuleId(0), A, limit), Err(1), "half a second left, said as 1");
        // Another client, and the same client under another rule, have their own buckets.
        assert_eq!(r.admit(at(1000), RuleId(0), B, limit), Ok(()));
        assert_eq!(r.admit(at(1000), RuleId(1), A, limit), Ok(()));
        // One token back every 2 s, never more than the burst.
        assert_eq!(r.admit(at(3000), RuleId(0), A, limit), Ok(()));
        assert_eq!(r.admit(at(3000), RuleId(0), A, limit), Err(2));
        let later = at(1_000_000);
        for _ in 0..5 {
            assert_eq!(r.admit(later, RuleId(0), A, limit), Ok(()));
        }
        assert!(r.admit(later, RuleId(0), A, limit).is_err(), "an idle hour earns one burst, not more");
    }

    #[test]
    fn a_changed_limit_starts_afresh() {
        let mut r = RateLimiter::new();
        let strict = RateLimit { requests: 1, per_secs: 60 };
        assert_eq!(r.admit(at(0), RuleId(0), A, strict), Ok(()));
        assert_eq!(r.admit(at(0), RuleId(0), A, strict), Err(60));
        let relaxed = RateLimit { requests: 2, per_secs: 60 };
        assert_eq!(r.admit(at(0), RuleId(0), A, relaxed), Ok(()));
        assert_eq!(r.admit(at(0), RuleId(0), A, relaxed), Ok(()));
        assert_eq!(r.admit(at(0), RuleId(0), A, relaxed), Err(30));
    }

    #[test]
    fn a_full_table_drops_idle_buckets_and_refuses_new_clients_while_all_are_busy() {
        let mut r = RateLimiter::with_capacity(2);
        let limit = RateLimit { requests: 1, per_secs: 1 };
        assert_eq!(r.admit(at(0), RuleId(0), A, limit), Ok(()));
        assert_eq!(r.admit(at(0), RuleId(0), B, limit), Ok(()));
        let c = Ipv4Addr::new(10, 0, 0, 3);
        assert_eq!(r.admit(at(500), RuleId(0), c, limit), Err(1), "both buckets busy");
        assert_eq!(r.len(), 2);
        // A second later both are full again (idle): they give way.
        assert_eq!(r.admit(at(1000), RuleId(0), c, limit), Ok(()));
        assert_eq!(r.len(), 1);
    }
}
