//! Login rate limiting: failed logins are counted per account and per client address, and a
//! key that reaches its limit is locked for a while, during which every login for it gets
//! 429, even with the right password.
//!
//! **Attempts in flight count.** [`LoginLimiter::begin`] admits an attempt only while the
//! key's failures plus its attempts still being checked stay under the limit, so a burst of
//! parallel requests gets no more password guesses than a sequence would.
//!
//! **Bounded memory.** Each of the two maps keeps at most [`MAX_TRACKED`] keys. A key is
//! tracked from its first attempt and dropped once it has nothing in flight, no failures in
//! the window and no lockout; a successful login clears the account's failures. When a map is
//! full, the oldest key is evicted first (FIFO), so at worst about 2 × 65,536 entries of
//! ~100 bytes: under 15 MB. Evicting a locked key early takes 65,536 newer keys inside
//! the lockout, which the per-address limit spreads over thousands of addresses.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most keys each map (accounts, addresses) tracks at once.
pub const MAX_TRACKED: usize = 65_536;

/// How long to wait when a key is at its limit only because of attempts still in flight.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Counts failed logins and locks accounts and addresses that fail too often.
pub struct LoginLimiter {
    // std Mutexes: held only for a few map operations, never across an await. Always taken
    // in this order (accounts, then addrs).
    accounts: Mutex<Tracker<String>>,
    addrs: Mutex<Tracker<IpAddr>>,
}

/// Which keys a failure locked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    pub account: bool,
    pub addr: bool,
}

impl LoginLimiter {
    /// `window` is both how long failures count and how long a lockout lasts.
    pub fn new(max_per_account: u32, max_per_addr: u32, window: Duration) -> LoginLimiter {
        LoginLimiter {
            accounts: Mutex::new(Tracker::new(max_per_account, window, MAX_TRACKED)),
            addrs: Mutex::new(Tracker::new(max_per_addr, window, MAX_TRACKED)),
        }
    }

    /// Admits a password check for `account` from `addr`, or says how long to wait
    /// (`Err(retry_after)`) if either is locked or at its limit. The returned attempt must
    /// be settled with [`Attempt::failed`] or [`Attempt::succeeded`]; dropped unsettled (a
    /// cancelled request), it counts as neither.
    pub fn begin(
        &self,
        account: &str,
        addr: IpAddr,
        now: Instant,
    ) -> Result<Attempt<'_>, Duration> {
        let addr = addr_key(addr);
        let mut accounts = lock(&self.accounts);
        let mut addrs = lock(&self.addrs);
        let wait = accounts
            .blocked_for(account, now)
            .max(addrs.blocked_for(&addr, now));
        if let Some(d) = wait {
            return Err(d);
        }
        accounts.begin(account, now);
        addrs.begin(&addr, now);
        Ok(Attempt {
            limiter: self,
            account: account.to_string(),
            addr,
            settled: false,
        })
    }

    /// How many keys are tracked (accounts, addresses).
    pub fn tracked(&self) -> (usize, usize) {
        (lock(&self.accounts).len(), lock(&self.addrs).len())
    }
}

/// A password check admitted by [`LoginLimiter::begin`].
pub struct Attempt<'a> {
    limiter: &'a LoginLimiter,
    account: String,
    addr: IpAddr,
    settled: bool,
}

impl Attempt<'_> {
    /// Counts a failure (wrong password, unknown user); says which keys it locked.
    pub fn failed(mut self, now: Instant) -> Locked {
        self.settled = true;
        let mut accounts = lock(&self.limiter.accounts);
        let mut addrs = lock(&self.limiter.addrs);
        accounts.end(&self.account);
        addrs.end(&self.addr);
        Locked {
            account: accounts.failure(&self.account, now),
            addr: addrs.failure(&self.addr, now),
        }
    }

    /// Clears the account's failures. The address keeps its count, so that logging in to
    /// one's own account does not reset a guessing attack on others.
    pub fn succeeded(mut self) {
        self.settled = true;
        let mut accounts = lock(&self.limiter.accounts);
        let mut addrs = lock(&self.limiter.addrs);
        accounts.end(&self.account);
        accounts.clear(&self.account);
        addrs.end(&self.addr);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.settled {
            lock(&self.limiter.accounts).end(&self.account);
            lock(&self.limiter.addrs).end(&self.addr);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// IPv6 clients usually own a whole /64, so one /64 counts as one address. IPv4-mapped IPv6
/// addresses count as the IPv4 address. (Also the key of the WebSocket connection rate,
/// [`crate::ws::ConnectionRate`].)
pub(crate) fn addr_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

struct Entry {
    /// Failures since `window_start`.
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
    /// Admitted attempts not yet settled.
    in_flight: u32,
    /// Tells this entry apart from an earlier one of the same key in `order`.
    generation: u64,
}

impl Entry {
    fn roll_window(&mut self, window: Duration, now: Instant) {
        if now.saturating_duration_since(self.window_start) >= window {
            self.failures = 0;
            self.window_start = now;
        }
    }

    /// Nothing left to remember.
    fn idle(&self, window: Duration, now: Instant) -> bool {
        self.in_flight == 0
            && self.locked_until.is_none_or(|u| u <= now)
            && (self.failures == 0 || now.saturating_duration_since(self.window_start) >= window)
    }
}

/// Failure counts for one kind of key, at most `cap` keys.
struct Tracker<K> {
    max_failures: u32,
    window: Duration,
    cap: usize,
    entries: HashMap<K, Entry>,
    /// Keys in the order they started being tracked, with their generation; entries that
    /// were dropped since are skipped (and compacted away) lazily.
    order: VecDeque<(K, u64)>,
    next_generation: u64,
}

impl<K: Hash + Eq + Clone> Tracker<K> {
    fn new(max_failures: u32, window: Duration, cap: usize) -> Self {
        Tracker {
            max_failures,
            window,
            cap,
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_generation: 0,
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// How long the key must wait: until its lockout ends, or briefly if its failures plus
    /// attempts in flight already reach the limit.
    fn blocked_for<Q>(&self, key: &Q, now: Instant) -> Option<Duration>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let e = self.entries.get(key)?;
        if let Some(until) = e.locked_until.filter(|u| *u > now) {
            return Some(until - now);
        }
        let failures = if now.saturating_duration_since(e.window_start) >= self.window {
            0
        } else {
            e.failures
        };
        (failures + e.in_flight >= self.max_failures).then_some(BUSY_RETRY)
    }

    fn entry<Q>(&mut self, key: &Q, now: Instant) -> &mut Entry
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if !self.entries.contains_key(key) {
            self.make_room(now);
            let generation = self.next_generation;
            self.next_generation += 1;
            self.order.push_back((key.to_owned(), generation));
            self.entries.insert(
                key.to_owned(),
                Entry {
                    failures: 0,
                    window_start: now,
                    locked_until: None,
                    in_flight: 0,
                    generation,
                },
            );
        }
        self.entries.get_mut(key).expect("just inserted")
    }

    fn begin<Q>(&mut self, key: &Q, now: Instant)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.entry(key, now).in_flight += 1;
    }

    /// Settles one attempt (a no-op if the key was evicted meanwhile).
    fn end<Q>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(e) = self.entries.get_mut(key) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }

    fn clear<Q>(&mut self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(e) = self.entries.get_mut(key) {
            e.failures = 0;
            e.locked_until = None;
            if e.in_flight == 0 {
                self.entries.remove(key);
            }
        }
    }

    /// Counts a failure; true if it locked the key.
    fn failure<Q>(&mut self, key: &Q, now: Instant) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let (max, window) = (self.max_failures, self.window);
        let e = self.entry(key, now);
        if e.locked_until.is_some_and(|u| u > now) {
            return false;
        }
        e.locked_until = None;
        e.roll_window(window, now);
        e.failures += 1;
        if e.failures >= max {
            e.failures = 0;
            e.window_start = now;
            e.locked_until = Some(now + window);
            true
        } else {
            false
        }
    }

    /// Evicts the oldest keys until one more fits, drops idle keys at the front, and keeps
    /// `order` from growing without bound when keys come and go.
    fn make_room(&mut self, now: Instant) {
        if self.order.len() > 2 * self.cap {
            let entries = &self.entries;
            self.order
                .retain(|(k, g)| entries.get(k).is_some_and(|e| e.generation == *g));
        }
        while self.entries.len() >= self.cap {
            let Some((k, g)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&k).is_some_and(|e| e.generation == g) {
                self.entries.remove(&k);
            }
        }
        while let Some((k, g)) = self.order.front() {
            match self.entries.get(k) {
                Some(e) if e.generation == *g => {
                    if !e.idle(self.window, now) {
                        break;
                    }
                    self.entries.remove(k);
                }
                _ => {}
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn fail(l: &LoginLimiter, account: &str, ip: IpAddr, now: Instant) -> Locked {
        l.begin(account, ip, now).expect("admitted").failed(now)
    }

    #[test]
    fn locks_after_max_failures_for_the_lockout() {
        let l = LoginLimiter::new(3, 100, Duration::from_secs(60));
        let t = Instant::now();
        assert_eq!(fail(&l, "a", IP, t), Locked::default());
        assert!(!fail(&l, "a", IP, t).account);
        assert!(fail(&l, "a", IP, t).account);
        assert_eq!(l.begin("a", IP, t).err(), Some(Duration::from_secs(60)));
        l.begin("b", IP, t)
            .expect("other accounts are not locked")
            .succeeded();
        let later = t + Duration::from_secs(61);
        assert!(l.begin("a", IP, later).is_ok(), "the lockout ends");
    }

    #[test]
    fn failures_outside_the_window_do_not_count_and_success_clears() {
        let l = LoginLimiter::new(2, 100, Duration::from_secs(10));
        let t = Instant::now();
        fail(&l, "a", IP, t);
        assert!(!fail(&l, "a", IP, t + Duration::from_secs(11)).account);
        l.begin("a", IP, t + Duration::from_secs(12))
            .unwrap()
            .succeeded();
        assert!(!fail(&l, "a", IP, t + Duration::from_secs(12)).account);
        assert!(fail(&l, "a", IP, t + Duration::from_secs(12)).account);
    }

    #[test]
    fn parallel_attempts_get_no_more_guesses() {
        let l = LoginLimiter::new(3, 100, Duration::from_secs(60));
        let t = Instant::now();
        let held: Vec<Attempt<'_>> = (0..3).map(|_| l.begin("a", IP, t).unwrap()).collect();
        assert_eq!(l.begin("a", IP, t).err(), Some(BUSY_RETRY));
        // A cancelled attempt frees its place without counting.
        let mut held = held.into_iter();
        drop(held.next());
        let again = l.begin("a", IP, t).unwrap();
        let locked: Vec<bool> = held
            .chain(std::iter::once(again))
            .map(|a| a.failed(t).account)
            .collect();
        assert_eq!(locked, [false, false, true]);
        assert_eq!(l.begin("a", IP, t).err(), Some(Duration::from_secs(60)));
    }

    #[test]
    fn addresses_lock_across_accounts_and_ipv6_counts_per_64() {
        let l = LoginLimiter::new(100, 3, Duration::from_secs(60));
        let t = Instant::now();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2:3".parse().unwrap();
        let other: IpAddr = "2001:db9::1".parse().unwrap();
        fail(&l, "x", a, t);
        fail(&l, "y", b, t);
        assert!(fail(&l, "z", a, t).addr);
        assert!(l.begin("new", b, t).is_err(), "same /64");
        assert!(l.begin("new", other, t).is_ok());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(addr_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn memory_is_bounded() {
        let mut tr: Tracker<String> = Tracker::new(5, Duration::from_secs(60), 100);
        let t = Instant::now();
        for i in 0..10_000 {
            tr.failure(format!("user{i}").as_str(), t);
            if i % 3 == 0 {
                tr.clear(format!("user{i}").as_str());
            }
        }
        assert!(tr.len() <= 100);
        assert!(tr.order.len() <= 2 * 100 + 1);
        // The newest keys survive eviction.
        assert!(tr.entries.contains_key("user9998"));
        // Idle keys are dropped as new ones arrive.
        tr.failure("late", t + Duration::from_secs(120));
        assert_eq!(tr.len(), 1);
    }

    #[test]
    fn successful_logins_leave_nothing_behind_for_accounts() {
        let l = LoginLimiter::new(3, 100, Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..50 {
            l.begin(&format!("u{i}"), IP, t).unwrap().succeeded();
        }
        assert_eq!(l.tracked(), (0, 1));
    }
}
