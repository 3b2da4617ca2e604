//! Limits failed authentications per source address: after `max_failures` within a window the
//! address is refused (429) until the window passes. IPv6 addresses count per /64 network (one
//! host usually owns a whole /64 and could otherwise rotate through it). The table is bounded,
//! and keeping it bounded costs amortized O(1) per failure.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_config::FailureLimitConfig;

/// Failed attempts per address.
pub struct FailureLimiter {
    max: u32,
    window: Duration,
    capacity: usize,
    table: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    pub fn new(cfg: &FailureLimitConfig) -> Self {
        Self {
            max: cfg.max_failures,
            window: Duration::from_millis(cfg.window_ms),
            capacity: cfg.max_tracked_addresses,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// How long `addr` must wait before it may try again, if it is over its limit.
    pub fn blocked(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let addr = source(addr);
        let t = self.table.lock().unwrap();
        let &(start, n) = t.get(&addr)?;
        let end = start + self.window;
        (n >= self.max && now < end).then(|| end - now)
    }

    /// Counts one failure of `addr`.
    pub fn record(&self, addr: IpAddr, now: Instant) {
        let addr = source(addr);
        let mut t = self.table.lock().unwrap();
        if t.len() >= self.capacity && !t.contains_key(&addr) {
            let window = self.window;
            t.retain(|_, (start, _)| now.duration_since(*start) < window);
            if t.len() * 2 > self.capacity {
                // Still mostly live windows (many addresses failing at once): start over rather
                // than pay a full scan for every new address. Throttled addresses get a fresh
                // window, which only ever happens under a flood this large.
                t.clear();
            }
        }
        let e = t.entry(addr).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}

/// Credentials that authenticated recently, by SHA-256: while an address is throttled, these
/// still get in (they are verified as usual), so a guesser behind a NAT slows down its own
/// guesses, not the producers that share its address. Bounded like the failure table.
pub struct KnownGood {
    ttl: Duration,
    capacity: usize,
    table: Mutex<HashMap<[u8; 32], Instant>>,
}

impl KnownGood {
    pub fn new(cfg: &FailureLimitConfig) -> Self {
        Self {
            ttl: Duration::from_millis(cfg.remember_ok_ms),
            capacity: cfg.max_tracked_addresses,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers a credential that just authenticated.
    pub fn record(&self, digest: [u8; 32], now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut t = self.table.lock().unwrap();
        if t.len() >= self.capacity && !t.contains_key(&digest) {
            let ttl = self.ttl;
            t.retain(|_, seen| now.duration_since(*seen) < ttl);
            if t.len() * 2 > self.capacity {
                t.clear();
            }
        }
        t.insert(digest, now);
    }

    /// Whether the credential with this digest authenticated within the remembered time.
    pub fn knows(&self, digest: &[u8; 32], now: Instant) -> bool {
        self.table
            .lock()
            .unwrap()
            .get(digest)
            .is_some_and(|seen| now.duration_since(*seen) < self.ttl)
    }
}

/// The key an address counts under: itself for IPv4, its /64 network for IPv6.
fn source(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_until_the_window_passes_and_stays_bounded() {
        let l = FailureLimiter::new(&FailureLimitConfig {
            max_failures: 3,
            window_ms: 1000,
            max_tracked_addresses: 2,
            remember_ok_ms: 0,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..2 {
            l.record(a, t0);
        }
        assert_eq!(l.blocked(a, t0), None);
        l.record(a, t0);
        assert_eq!(
            l.blocked(a, t0 + Duration::from_millis(400)),
            Some(Duration::from_millis(600))
        );
        assert_eq!(l.blocked(a, t0 + Duration::from_millis(1000)), None);
        l.record("10.0.0.2".parse().unwrap(), t0);
        l.record("10.0.0.3".parse().unwrap(), t0 + Duration::from_millis(1));
        assert!(l.tracked() <= 2, "capacity bounds the table");
    }

    #[test]
    fn ipv6_hosts_count_per_64_network() {
        let l = FailureLimiter::new(&FailureLimitConfig {
            max_failures: 2,
            window_ms: 1000,
            max_tracked_addresses: 10,
            remember_ok_ms: 0,
        });
        let t0 = Instant::now();
        l.record("2001:db8:1:2::1".parse().unwrap(), t0);
        l.record("2001:db8:1:2:ffff::9".parse().unwrap(), t0);
        assert!(
            l.blocked("2001:db8:1:2::abcd".parse().unwrap(), t0)
                .is_some()
        );
        assert!(l.blocked("2001:db8:1:3::1".parse().unwrap(), t0).is_none());
        l.record("::ffff:10.0.0.9".parse().unwrap(), t0);
        l.record("10.0.0.9".parse().unwrap(), t0);
        assert!(
            l.blocked("10.0.0.9".parse().unwrap(), t0).is_some(),
            "v4-mapped is v4"
        );
    }
}
