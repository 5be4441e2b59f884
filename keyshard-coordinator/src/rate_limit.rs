//! A per-VM token bucket: each VM may send a burst of requests, then a steady few per second.
//! A request over the limit is refused before any work (no quote, no unseal, no SNP check),
//! so a guest looping writes costs the host a bounded amount of work and of audit log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::nonces::Clock;

/// How many requests a VM may send at once, and how fast the allowance refills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: u32,
}

/// A boot asks for a few shares (an `sev` share takes two requests); 8 at once and 2 a second
/// after that leaves room for retries and refuses a flood.
pub const DEFAULT_RATE_LIMIT: RateLimit = RateLimit {
    burst: 8,
    per_second: 2,
};

/// Buckets kept at most; beyond, the fullest (idle longest) are dropped, which only forgives.
const MAX_BUCKETS: usize = 1024;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    limit: RateLimit,
    clock: Arc<dyn Clock>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit, clock: Arc<dyn Clock>) -> Self {
        Self {
            limit,
            clock,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one request's token for `vm_id`; false when the VM is over its limit (or the
    /// limiter is unusable: fail closed).
    pub fn allow(&self, vm_id: &str) -> bool {
        let now = self.clock.now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        let burst = f64::from(self.limit.burst);
        let rate = f64::from(self.limit.per_second);
        if !buckets.contains_key(vm_id) && buckets.len() >= MAX_BUCKETS {
            let idle = Duration::from_secs_f64(if rate > 0.0 { burst / rate } else { 0.0 });
            buckets.retain(|_, b| now.saturating_duration_since(b.updated) < idle);
        }
        let bucket = buckets.entry(vm_id.to_owned()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestClock(Mutex<Instant>);

    impl Clock for TestClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    impl TestClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    #[test]
    fn a_burst_then_the_refill_rate_per_vm() {
        let clock = Arc::new(TestClock(Mutex::new(Instant::now())));
        let limiter = RateLimiter::new(DEFAULT_RATE_LIMIT, clock.clone());
        let allowed = (0..100).filter(|_| limiter.allow("vm1")).count();
        assert_eq!(allowed, 8);
        // Another VM has its own bucket.
        assert!(limiter.allow("vm2"));
        // Half a second refills one request; ten seconds refill the burst, not more.
        clock.advance(Duration::from_millis(500));
        assert!(limiter.allow("vm1"));
        assert!(!limiter.allow("vm1"));
        clock.advance(Duration::from_secs(10));
        assert_eq!((0..100).filter(|_| limiter.allow("vm1")).count(), 8);
    }
}
