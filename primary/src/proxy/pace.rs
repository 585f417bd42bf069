//! The pace a request body must keep, and a log line budget for floods of refusals. Pure logic: time
//! comes in as arguments.
//!
//! A body read timeout alone (the time between two reads) lets a client that sends one byte just
//! before each timeout hold its connection, and the upstream connection behind it, for ever. So, as
//! Apache's `mod_reqtimeout` `MinRate`, the body must deliver `min_bytes` within each `timeout` of
//! waiting. Only time spent waiting on the client counts: while the upstream does not take the body
//! (back-pressure) the proxy does not ask the client for more, and the clock stands still.

use std::time::{Duration, Instant};

/// The body pace check of one request.
#[derive(Debug, Clone)]
pub(crate) struct BodyPace {
    timeout: Duration,
    /// Bytes each period must deliver (at least 1).
    min_bytes: u64,
    /// Waiting time spent in this period, not counting the wait under way.
    waited: Duration,
    /// The wait under way: the proxy asked for more and the client had nothing.
    waiting_since: Option<Instant>,
    /// Bytes received in this period.
    bytes: u64,
}

impl BodyPace {
    /// At least `min_rate` bytes per second over each `timeout` of waiting (and at least one byte).
    pub(crate) fn new(timeout: Duration, min_rate: u32) -> BodyPace {
        let min_bytes = ((f64::from(min_rate) * timeout.as_secs_f64()).ceil() as u64).max(1);
        BodyPace { timeout, min_bytes, waited: Duration::ZERO, waiting_since: None, bytes: 0 }
    }

    /// The proxy asked for body bytes at `now` and none were there.
    pub(crate) fn handle_waiting(&mut self, now: Instant) {
        self.waiting_since.get_or_insert(now);
    }

    /// `n` body bytes (or the body's end, with `n` 0) arrived at `now`.
    pub(crate) fn handle_data(&mut self, now: Instant, n: usize) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += now.saturating_duration_since(since);
        }
        self.bytes += n as u64;
        if self.bytes >= self.min_bytes {
            // The period delivered its share: a new one starts.
            self.bytes = 0;
            self.waited = Duration::ZERO;
        }
    }

    /// When the wait under way runs out of the period's time; `None` while not waiting.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.waiting_since.map(|since| since + self.timeout.saturating_sub(self.waited))
    }

    /// The body is too slow at `now`.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|at| at <= now)
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The bytes each period must deliver.
    pub(crate) fn min_bytes(&self) -> u64 {
        self.min_bytes
    }
}

/// At most one log line per `every` for a recurring event; the lines in between are counted.
#[derive(Debug, Clone)]
pub(crate) struct LogBudget {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogBudget {
    pub(crate) fn new(every: Duration) -> LogBudget {
        LogBudget { every, last: None, suppressed: 0 }
    }

    /// The event happened at `now`: `Some(events not logged since the last line)` to log it, `None` to
    /// stay quiet.
    pub(crate) fn handle_event(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn trickling_body_expires_although_every_byte_comes_before_the_timeout() {
        let t0 = Instant::now();
        let mut p = BodyPace::new(10 * S, 100);
        assert_eq!(p.min_bytes(), 1000);
        let mut now = t0;
        for _ in 0..3 {
            p.handle_waiting(now);
            assert!(!p.expired(now));
            now += 3 * S;
            assert!(!p.expired(now));
            p.handle_data(now, 1);
        }
        // 9 s waited for 3 bytes: the period has 1 s left.
        p.handle_waiting(now);
        assert_eq!(p.deadline(), Some(now + S));
        assert!(p.expired(now + S));
    }

    #[test]
    fn body_just_above_the_minimum_rate_never_expires() {
        let mut now = Instant::now();
        let mut p = BodyPace::new(10 * S, 100);
        for _ in 0..100 {
            p.handle_waiting(now);
            now += S * 9 / 10;
            assert!(!p.expired(now));
            p.handle_data(now, 100);
        }
    }

    #[test]
    fn time_not_spent_waiting_on_the_client_does_not_count() {
        let t0 = Instant::now();
        let mut p = BodyPace::new(10 * S, 100);
        p.handle_waiting(t0);
        p.handle_data(t0 + 6 * S, 10);
        // The upstream back-pressures for a minute: the proxy does not ask.
        let later = t0 + 66 * S;
        p.handle_waiting(later);
        assert_eq!(p.deadline(), Some(later + 4 * S));
        assert!(!p.expired(later + 3 * S));
        assert!(p.expired(later + 4 * S));
    }

    #[test]
    fn zero_rate_needs_one_byte_per_timeout() {
        let t0 = Instant::now();
        let mut p = BodyPace::new(5 * S, 0);
        assert_eq!(p.min_bytes(), 1);
        p.handle_waiting(t0);
        p.handle_data(t0 + 4 * S, 1);
        p.handle_waiting(t0 + 4 * S);
        assert!(!p.expired(t0 + 8 * S), "a new period started with the byte");
        assert!(p.expired(t0 + 9 * S));
    }

    #[test]
    fn log_budget_logs_the_first_and_then_one_per_period_with_the_count_between() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(S);
        assert_eq!(b.handle_event(t0), Some(0));
        assert_eq!(b.handle_event(t0 + S / 10), None);
        assert_eq!(b.handle_event(t0 + S / 2), None);
        assert_eq!(b.handle_event(t0 + S), Some(2));
        assert_eq!(b.handle_event(t0 + 3 * S), Some(0));
    }
}
