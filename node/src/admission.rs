//! Admission at the edge: keyed token buckets (governor's GCRA) per user, per client
//! IP and, optionally, per device, checked before a request costs the engine anything.
//!
//! Memory stays bounded however many distinct buyers arrive: a bucket that has
//! refilled is indistinguishable from a fresh one, so [`Admission::evict_idle`]
//! (run every [`EVICT_INTERVAL`]) drops it and shrinks the maps. What remains is the
//! buckets of clients seen within about `burst / rate` seconds. User and device ids
//! are stored as 64-bit keyed hashes rather than strings: a few bytes per bucket
//! instead of up to 128, and the per-process random key (SipHash) keeps anyone from
//! crafting ids that collide into one bucket. Those keys are already uniform and
//! secret, so their bucket maps hash them again with foldhash rather than a second
//! SipHash; the IP map, keyed by addresses a client picks, keeps SipHash.
//!
//! Measured (`KEYDROP_ADMISSION_USERS=10000000 cargo test -p keydrop-node --lib
//! memory_per_bucket -- --nocapture`, dev profile, mimalloc as in the binary):
//! 10,000,000 distinct users inside one refill window hold 10M buckets, about 288 MiB
//! of RSS (~30 bytes each); one eviction pass, off the async workers, drops them all,
//! and mimalloc returns the memory a second later (its purge delay). In steady state
//! only the users of the last few seconds are held.
//!
//! The client IP is the socket peer, or the right-most address of `X-Forwarded-For`
//! that is not itself a trusted proxy, only when the peer is a configured trusted
//! proxy: anyone else could write any address there.

use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use keydrop_engine::{DeviceId, UserId};

use crate::config::Config;
use crate::lag::LagMonitor;
use crate::order_slots::{Bound, OrderSlot, OrderSlots};

/// How often idle buckets are dropped.
pub const EVICT_INTERVAL: Duration = Duration::from_secs(5);

/// `X-Forwarded-For` hops read, from the right; past them a request counts against
/// the last trusted proxy seen.
const FORWARDED_HOPS_MAX: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Ip,
    Device,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Ip => "ip",
            Scope::Device => "device",
        }
    }
}

/// A request over its budget, and when the bucket has a token again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub scope: Scope,
    pub retry_after: Duration,
}

/// Keyed token buckets, their map hashing keys with `S`.
struct Limiter<K: std::hash::Hash + Eq + Clone, S: BuildHasher + Clone> {
    scope: Scope,
    buckets: RateLimiter<
        K,
        DashMapStateStore<K, S>,
        DefaultClock,
        NoOpMiddleware<<DefaultClock as Clock>::Instant>,
    >,
}

impl<K: std::hash::Hash + Eq + Clone, S: BuildHasher + Clone + Default> Limiter<K, S> {
    /// `None` when the rate is 0 (off).
    fn new(scope: Scope, rate: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(Limiter {
            scope,
            buckets: RateLimiter::dashmap_with_clock_and_hasher(
                quota,
                DefaultClock::default(),
                S::default(),
            ),
        })
    }

    fn check(&self, key: &K) -> Result<(), Rejected> {
        self.buckets.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.buckets.clock().now());
            Rejected {
                scope: self.scope,
                retry_after: wait,
            }
        })
    }

    fn evict_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// Buckets keyed by a keyed hash of an id (see the module doc).
type HashedIdLimiter = Limiter<u64, foldhash::fast::RandomState>;

pub struct Admission {
    per_user: Option<HashedIdLimiter>,
    per_ip: Option<Limiter<IpAddr, std::hash::RandomState>>,
    per_device: Option<HashedIdLimiter>,
    trusted_proxies: Vec<IpAddr>,
    hasher: std::hash::RandomState,
    /// Slots for orders inside the node, and how their bound moves; `None` when
    /// unbounded.
    pub order_slots: Option<(std::sync::Arc<OrderSlots>, Bound)>,
    /// Scheduling lag, and the lag past which orders are shed; `None` when off.
    pub lag: std::sync::Arc<LagMonitor>,
    pub shed_lag: Option<Duration>,
    /// A Weyl sequence over u64 for the share of orders shed while lagging: spread
    /// evenly, so a share of 0.3 refuses 3 orders in every 10, not a run of them.
    shed_draws: std::sync::atomic::AtomicU64,
}

/// The share of orders shed at a given worker lag: none up to `limit`, all from
/// twice it, in proportion between. A gate that shuts at once refuses the whole crowd
/// until the lag decays, then lets the whole crowd back in and lags again; shedding in
/// proportion holds the lag near the limit instead.
pub fn lag_shed_share(lag: Duration, limit: Duration) -> f64 {
    ((lag.as_secs_f64() - limit.as_secs_f64()) / limit.as_secs_f64()).clamp(0.0, 1.0)
}

/// The per-IP bucket an address counts against: an IPv4 address (also one mapped
/// into IPv6) alone, an IPv6 address by its /64. One subscriber is handed a whole
/// /64, and a bucket per address would let them take a fresh one for every request.
pub fn ip_bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// Why an order was shed with 503 `overloaded` before any work was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// The workers are running behind: requests already wait in front of the handlers.
    Lag,
    /// Every order slot is taken (see `order_slots.rs`).
    InFlight,
}

impl Overload {
    pub fn as_str(self) -> &'static str {
        match self {
            Overload::Lag => "lag",
            Overload::InFlight => "in_flight",
        }
    }
}

impl Admission {
    /// Lets one order request past the gate, before anything of it is read; or says
    /// why the node is too busy for it, and the caller answers 503 at once. Its slot
    /// is taken later, by [`Admission::take_order_slot`], once its body is in: a
    /// client that stalls mid-body holds nothing.
    pub fn admit_order(&self) -> Result<(), Overload> {
        if let Some(limit) = self.shed_lag {
            if self.draw_shed(lag_shed_share(self.lag.current(), limit)) {
                return Err(Overload::Lag);
            }
        }
        match &self.order_slots {
            Some((slots, _)) if !slots.has_room() => Err(Overload::InFlight),
            _ => Ok(()),
        }
    }

    /// A slot for an admitted order about to go to the engine (when slots are
    /// bounded), freed when dropped; `Err` when the slots filled up since
    /// [`Admission::admit_order`].
    pub fn take_order_slot(&self) -> Result<Option<OrderSlot<'_>>, Overload> {
        match &self.order_slots {
            None => Ok(None),
            Some((slots, _)) => slots.try_acquire().map(Some).ok_or(Overload::InFlight),
        }
    }

    /// True for about `share` of the calls (0 never, 1 always).
    fn draw_shed(&self, share: f64) -> bool {
        if share <= 0.0 {
            return false;
        }
        const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
        let draw = self
            .shed_draws
            .fetch_add(GOLDEN, std::sync::atomic::Ordering::Relaxed);
        ((draw >> 11) as f64 / (1u64 << 53) as f64) < share
    }

    pub fn new(config: &Config) -> Self {
        Admission {
            order_slots: (config.orders_in_flight_max > 0).then(|| {
                let bound = Bound::new(
                    config.orders_in_flight_min,
                    config.orders_in_flight_max,
                    (config.orders_in_flight_target_ms > 0)
                        .then(|| Duration::from_millis(config.orders_in_flight_target_ms.into())),
                    (config.orders_in_flight_open_after_ms > 0).then(|| {
                        let tick_ms = crate::order_slots::TICK.as_millis() as u32;
                        config.orders_in_flight_open_after_ms.div_ceil(tick_ms)
                    }),
                );
                (std::sync::Arc::new(OrderSlots::new(bound.current())), bound)
            }),
            per_user: Limiter::new(Scope::User, config.rate_per_user, config.burst_per_user),
            per_ip: Limiter::new(Scope::Ip, config.rate_per_ip, config.burst_per_ip),
            per_device: Limiter::new(
                Scope::Device,
                config.rate_per_device,
                config.burst_per_device,
            ),
            trusted_proxies: config.trusted_proxies.clone(),
            hasher: std::hash::RandomState::new(),
            lag: std::sync::Arc::new(LagMonitor::default()),
            shed_lag: (config.shed_lag_ms > 0)
                .then(|| Duration::from_millis(config.shed_lag_ms.into())),
            shed_draws: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Rejected> {
        self.per_ip
            .as_ref()
            .map_or(Ok(()), |l| l.check(&ip_bucket(ip)))
    }

    pub fn check_user(&self, user: &UserId) -> Result<(), Rejected> {
        let key = self.hasher.hash_one(user.as_str());
        self.per_user.as_ref().map_or(Ok(()), |l| l.check(&key))
    }

    pub fn check_device(&self, device: &DeviceId) -> Result<(), Rejected> {
        let key = self.hasher.hash_one(device.as_str());
        self.per_device.as_ref().map_or(Ok(()), |l| l.check(&key))
    }

    /// The address to account a request to (see the module doc).
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.ip().to_canonical();
        if !self.trusted_proxies.contains(&peer) {
            return peer;
        }
        // From the right: each hop was written by the proxy to its right, so the walk
        // stops at the first one no trusted proxy stands behind, and whatever the
        // client wrote further left is never read.
        let lines: Vec<&HeaderValue> = headers.get_all("x-forwarded-for").iter().collect();
        let hops = lines
            .iter()
            .rev()
            .flat_map(|line| line.as_bytes().rsplit(|&b| b == b','))
            .take(FORWARDED_HOPS_MAX);
        let mut nearest = peer;
        for hop in hops {
            let Some(ip) = forwarded_hop(hop) else {
                // Not an address a proxy would write: account to the last proxy seen.
                return nearest;
            };
            if !self.trusted_proxies.contains(&ip) {
                return ip;
            }
            nearest = ip;
        }
        nearest
    }

    /// Drops buckets that have refilled, and the memory they held.
    pub fn evict_idle(&self) {
        if let Some(l) = &self.per_user {
            l.evict_idle();
        }
        if let Some(l) = &self.per_ip {
            l.evict_idle();
        }
        if let Some(l) = &self.per_device {
            l.evict_idle();
        }
    }

    /// Live buckets per scope, for the `keydrop_admission_buckets` gauge.
    pub fn bucket_counts(&self) -> [(Scope, usize); 3] {
        [
            (
                Scope::User,
                self.per_user.as_ref().map_or(0, |l| l.buckets.len()),
            ),
            (
                Scope::Ip,
                self.per_ip.as_ref().map_or(0, |l| l.buckets.len()),
            ),
            (
                Scope::Device,
                self.per_device.as_ref().map_or(0, |l| l.buckets.len()),
            ),
        ]
    }
}

/// One `X-Forwarded-For` hop: an address, with a port as some load balancers add.
fn forwarded_hop(hop: &[u8]) -> Option<IpAddr> {
    let hop = std::str::from_utf8(hop.trim_ascii()).ok()?;
    let ip = hop
        .parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|addr| addr.ip()))
        .ok()?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(config: Config) -> Admission {
        Admission::new(&config)
    }

    #[test]
    fn the_flood_setting_reaches_the_order_bound_in_whole_ticks() {
        use crate::order_slots::Tick;
        // Cut from 1,024 to the floor of 32, then ticks at the floor whose orders
        // still wait 60 ms: which tick opens the bound?
        let ticks_until_open = |open_after_ms: u32| {
            let a = admission(Config {
                orders_in_flight_open_after_ms: open_after_ms,
                ..Config::default()
            });
            let (_, mut bound) = a.order_slots.expect("the bound is on by default");
            let slow = Tick {
                completed: 100,
                held: Duration::from_millis(60) * 100,
                refused: 1_000,
            };
            while bound.current() > 32 {
                bound.next(slow);
            }
            (1..=100).find(|_| bound.next(slow) == 1_024)
        };
        assert_eq!(ticks_until_open(0), None, "off by default");
        assert_eq!(ticks_until_open(1_000), Some(10));
        assert_eq!(
            ticks_until_open(250),
            Some(3),
            "250 ms rounds up to 3 ticks"
        );
    }

    #[test]
    fn orders_are_shed_while_the_workers_lag_and_let_in_once_they_catch_up() {
        let a = admission(Config {
            shed_lag_ms: 50,
            orders_in_flight_max: 2,
            ..Config::default()
        });
        a.admit_order().expect("no lag, free slots");
        let slot = a.take_order_slot().expect("a free slot");
        a.lag.record(Duration::from_millis(100));
        assert_eq!(
            a.admit_order().unwrap_err(),
            Overload::Lag,
            "twice the limit"
        );
        // Prompt wake-ups halve the recorded lag: 50 ms is at the limit.
        a.lag.record(Duration::ZERO);
        a.admit_order().expect("caught up");
        let second = a.take_order_slot().expect("the last free slot");
        assert_eq!(a.admit_order().unwrap_err(), Overload::InFlight);
        drop((slot, second));
        assert!(a.admit_order().is_ok(), "slots come back when dropped");
    }

    #[test]
    fn an_order_past_the_gate_holds_no_slot_until_it_takes_one() {
        let a = admission(Config {
            shed_lag_ms: 0,
            orders_in_flight_max: 1,
            orders_in_flight_min: 1,
            ..Config::default()
        });
        // Two orders pass the gate while their bodies are read: neither holds the
        // one slot, so neither can shut out the other by stalling.
        a.admit_order().expect("room");
        a.admit_order().expect("still room: the first took no slot");
        let first = a.take_order_slot().expect("the first body is in");
        assert_eq!(
            a.take_order_slot().unwrap_err(),
            Overload::InFlight,
            "the slots filled up while the second body was read"
        );
        drop(first);
        assert!(a.take_order_slot().is_ok());
    }

    #[test]
    fn between_the_limit_and_twice_it_the_shed_share_grows_in_proportion() {
        let limit = Duration::from_millis(10);
        let share = |ms| lag_shed_share(Duration::from_millis(ms), limit);
        assert_eq!(share(0), 0.0);
        assert_eq!(share(10), 0.0);
        assert!((share(13) - 0.3).abs() < 1e-9);
        assert_eq!(share(20), 1.0);
        assert_eq!(share(500), 1.0);

        let a = admission(Config {
            shed_lag_ms: 10,
            orders_in_flight_max: 0,
            ..Config::default()
        });
        a.lag.record(Duration::from_millis(13));
        let shed = (0..1_000)
            .filter(|_| a.admit_order().is_err_and(|reason| reason == Overload::Lag))
            .count();
        assert!(
            (290..=310).contains(&shed),
            "30% of 1,000 shed evenly: {shed}"
        );
    }

    #[test]
    fn an_ipv6_client_is_bucketed_by_its_64() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(ip_bucket(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            ip_bucket(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(ip_bucket(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(ip_bucket(ip("::ffff:198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(ip_bucket(ip("198.51.100.7")), ip("198.51.100.7"));
        let a = admission(Config {
            rate_per_ip: 1,
            burst_per_ip: 1,
            ..Config::default()
        });
        a.check_ip(ip("2001:db8::1"))
            .expect("the first request of the /64");
        assert!(
            a.check_ip(ip("2001:db8::2")).is_err(),
            "another address of the same /64 shares its bucket"
        );
        a.check_ip(ip("2001:db8:0:1::1"))
            .expect("another /64 has a bucket of its own");
    }

    #[test]
    fn lag_shedding_can_be_turned_off() {
        let a = admission(Config {
            shed_lag_ms: 0,
            orders_in_flight_max: 0,
            ..Config::default()
        });
        a.lag.record(Duration::from_secs(5));
        assert!(a.admit_order().is_ok());
    }

    #[test]
    fn user_bucket_allows_burst_then_refuses_with_a_wait() {
        let a = admission(Config {
            rate_per_user: 1,
            burst_per_user: 3,
            ..Config::default()
        });
        let user = UserId::parse("u1").unwrap();
        for _ in 0..3 {
            assert_eq!(a.check_user(&user), Ok(()));
        }
        let rejected = a.check_user(&user).unwrap_err();
        assert_eq!(rejected.scope, Scope::User);
        assert!(rejected.retry_after > Duration::ZERO);
        assert!(rejected.retry_after <= Duration::from_secs(1));
        // Another user has their own bucket.
        assert_eq!(a.check_user(&UserId::parse("u2").unwrap()), Ok(()));
    }

    #[test]
    fn zero_rate_is_off() {
        let a = admission(Config {
            rate_per_ip: 0,
            ..Config::default()
        });
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        for _ in 0..10_000 {
            assert_eq!(a.check_ip(ip), Ok(()));
        }
        let device = DeviceId::parse("d").unwrap();
        assert_eq!(a.check_device(&device), Ok(()));
    }

    #[test]
    fn idle_buckets_are_evicted() {
        let a = admission(Config {
            rate_per_user: 1_000,
            burst_per_user: 1,
            ..Config::default()
        });
        for i in 0..10_000 {
            a.check_user(&UserId::parse(format!("user-{i}")).unwrap())
                .unwrap();
        }
        assert_eq!(a.bucket_counts()[0].1, 10_000);
        // A bucket of burst 1 at 1000/s is full again after 1 ms.
        evict_until_no_user_buckets(&a, Duration::from_secs(5), Duration::ZERO);
    }

    /// Runs eviction passes, `pause` apart, until no user bucket is left; fails
    /// after `within`.
    fn evict_until_no_user_buckets(a: &Admission, within: Duration, pause: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            a.evict_idle();
            if a.bucket_counts()[0].1 == 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "buckets never evicted"
            );
            if pause.is_zero() {
                std::thread::yield_now();
            } else {
                std::thread::sleep(pause);
            }
        }
    }

    fn rss_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Memory per bucket; the module doc gives the figure for 10M users.
    #[test]
    fn memory_per_bucket() {
        let users: u64 = std::env::var("KEYDROP_ADMISSION_USERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let a = admission(Config::default());
        let before = rss_kib().unwrap_or(0);
        for i in 0..users {
            let _ = a.check_user(&UserId::parse(format!("user-{i}")).unwrap());
        }
        let held = rss_kib().unwrap_or(0).saturating_sub(before);
        assert_eq!(a.bucket_counts()[0].1 as u64, users);
        // Default quota: 5/s with a burst of 5, so a bucket used once is full again
        // within a second.
        evict_until_no_user_buckets(&a, Duration::from_secs(10), Duration::from_millis(50));
        // mimalloc hands freed pages back to the OS a second after they were freed
        // (`purge_delay`), during a later allocator call on the thread that owns them;
        // on a node the workers make those all the time. Here, a second, small crowd
        // and its eviction, after that delay.
        std::thread::sleep(Duration::from_millis(1_200));
        for i in 0..1_000u64 {
            let _ = a.check_user(&UserId::parse(format!("later-{i}")).unwrap());
        }
        evict_until_no_user_buckets(&a, Duration::from_secs(10), Duration::from_millis(50));
        let after = rss_kib().unwrap_or(0).saturating_sub(before);
        eprintln!(
            "{users} users: +{} KiB RSS while held (~{} B per bucket), +{} KiB after eviction",
            held,
            held * 1024 / users.max(1),
            after
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let a = admission(Config {
            trusted_proxies: vec![proxy, "10.0.0.2".parse().unwrap()],
            ..Config::default()
        });
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.2".parse().unwrap(),
        );
        let from_proxy = SocketAddr::new(proxy, 1234);
        let from_client = SocketAddr::new("5.5.5.5".parse().unwrap(), 1234);
        // The right-most untrusted hop: 6.6.6.6 was written by the client itself.
        assert_eq!(
            a.client_ip(from_proxy, &headers),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(a.client_ip(from_client, &headers), from_client.ip());
        headers.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(a.client_ip(from_proxy, &headers), proxy);
        assert_eq!(a.client_ip(from_proxy, &HeaderMap::new()), proxy);
        // Whatever the client wrote left of the proxies' hops is never read: junk
        // there does not move it onto the proxy's bucket.
        headers.insert(
            "x-forwarded-for",
            "junk, [::1, 1.2.3.4, 10.0.0.2".parse().unwrap(),
        );
        assert_eq!(
            a.client_ip(from_proxy, &headers),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // Ports, as some load balancers write them, and the hops of several lines.
        headers.insert("x-forwarded-for", "1.2.3.4:5678".parse().unwrap());
        headers.append("x-forwarded-for", "[2001:db8::7]:443".parse().unwrap());
        assert_eq!(
            a.client_ip(from_proxy, &headers),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        headers.append("x-forwarded-for", "10.0.0.2".parse().unwrap());
        assert_eq!(
            a.client_ip(from_proxy, &headers),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        // Only trusted proxies: the farthest of them is the client as far as we know.
        headers.insert("x-forwarded-for", "10.0.0.2".parse().unwrap());
        assert_eq!(
            a.client_ip(from_proxy, &headers),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        // An unreadable hop behind a trusted one: the last proxy seen.
        headers.insert("x-forwarded-for", "junk, 10.0.0.2".parse().unwrap());
        assert_eq!(
            a.client_ip(from_proxy, &headers),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        // A chain longer than we walk ends at the last proxy seen, too.
        let long = vec!["10.0.0.2"; FORWARDED_HOPS_MAX + 1].join(", ");
        headers.insert(
            "x-forwarded-for",
            format!("1.2.3.4, {long}").parse().unwrap(),
        );
        assert_eq!(
            a.client_ip(from_proxy, &headers),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
    }
}
