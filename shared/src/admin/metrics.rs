//! Counters, gauges and histograms behind typed handles, for the hot paths.
//!
//! Every handle is a plain atomic (relaxed ordering: each value is independent, and a
//! scrape needs no cross-metric consistency), reached through a struct field and, for
//! labelled families, an enum index. Nothing on a hot path looks a metric up by name or
//! takes a lock, except [`Replication`], whose in-flight book (for the age of the oldest
//! unacknowledged record) sits behind an uncontended mutex touched once per sent batch and
//! once per ack.
//!
//! Rendering in the exposition format lives in `expo` and `state`.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A monotonically increasing count (exposed with a `_total` name).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Adds `d` (negative to subtract).
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.add(-1);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram of durations with fixed bucket bounds, kept in microseconds.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds (inclusive, `le`) in microseconds, ascending; `+Inf` is implied.
    bounds_us: &'static [u64],
    /// Per-bucket (not cumulative) counts; one more than `bounds_us` for `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

/// A consistent-enough reading of a [`Histogram`] for one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, cumulative count)`, ascending, without `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    /// Observations in all, which is also the `+Inf` bucket.
    pub count: u64,
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    /// A histogram with the given inclusive upper bounds, in microseconds, ascending.
    pub fn new(bounds_us: &'static [u64]) -> Self {
        debug_assert!(bounds_us.windows(2).all(|w| w[0] < w[1]), "histogram bounds must ascend");
        Histogram {
            bounds_us,
            buckets: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = self.bounds_us.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The cumulative buckets. The count is derived from the buckets themselves so that
    /// `+Inf` always equals `_count`, even while other threads observe.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(self.bounds_us.len());
        for (i, &b) in self.bounds_us.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            buckets.push((b as f64 / 1e6, cumulative));
        }
        cumulative += self.buckets[self.bounds_us.len()].load(Ordering::Relaxed);
        HistogramSnapshot { buckets, count: cumulative, sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6 }
    }
}

/// One label of a metric family whose values are a closed set, so that a family is an
/// array indexed by the enum.
pub trait Label: Copy + 'static {
    /// The label's name in the exposition.
    const NAME: &'static str;
    /// Every value, in exposition order; `ALL[v.index()] == v`.
    const ALL: &'static [Self];
    /// Position in [`Label::ALL`].
    fn index(self) -> usize;
    /// The label value in the exposition and in `/status`.
    fn as_str(self) -> &'static str;
}

/// One metric per value of the label `L`.
#[derive(Debug)]
pub struct Family<L: Label, M> {
    members: Box<[M]>,
    _label: PhantomData<L>,
}

impl<L: Label, M: Default> Default for Family<L, M> {
    fn default() -> Self {
        Family { members: L::ALL.iter().map(|_| M::default()).collect(), _label: PhantomData }
    }
}

impl<L: Label, M> Family<L, M> {
    /// The metric for one label value.
    pub fn get(&self, label: L) -> &M {
        &self.members[label.index()]
    }

    /// Every `(label value, metric)`, in [`Label::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (L, &M)> {
        L::ALL.iter().copied().zip(self.members.iter())
    }
}

macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $key:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $value:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl Label for $name {
            const NAME: &'static str = $key;
            const ALL: &'static [Self] = &[$( $name::$variant, )+];
            fn index(self) -> usize {
                self as usize
            }
            fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $value, )+
                }
            }
        }
    };
}

label_enum! {
    /// How a failover resumed an exchange that was in flight (ARCHITECTURE.md, "Finishing an
    /// exchange in flight"). Every path is counted; none is a silent guess.
    pub enum ResumePath: "path" {
        /// Request complete, no reply byte sent: the reply came from the logged upstream response.
        ReplayedFromLog => "replayed_from_log",
        /// Request complete, no reply byte sent, nothing logged: the request went upstream again.
        ResentUpstream => "resent_upstream",
        /// Reply partly sent: continued at the client's byte offset from the upstream log.
        ContinuedAtOffset => "continued_at_offset",
        /// Reply partly sent: the rest fetched with `Range` + `If-Range`.
        RangeRefetch => "range_refetch",
        /// Reply partly sent: full refetch, the skipped prefix matched the logged CRC.
        FullRefetch => "full_refetch",
        /// Non-idempotent request not re-executed under the retry policy: closed.
        ClosedNeverPolicy => "closed_never_policy",
        /// Full refetch whose prefix did not match what was sent: closed honestly.
        ClosedMismatch => "closed_mismatch",
        /// Nothing in flight, or the reply was fully written (it is in the restored send queue).
        NothingToDo => "nothing_to_do",
    }
}

label_enum! {
    /// Why a client connection is not protected (a failover would lose it).
    pub enum UnprotectedReason: "reason" {
        /// No backup holds a replica: none connected, still syncing, or lost.
        NoBackup => "no_backup",
        /// The tracker first saw the connection mid-stream (no handshake): options unknown.
        MidStream => "mid_stream",
        /// The TCP tracker could not follow the connection.
        TrackerLost => "tracker_lost",
        /// The HTTP framer could not follow the exchanges.
        HttpUnframed => "http_unframed",
    }
}

label_enum! {
    /// A limit on client connections (README "Limits") that refused or closed a connection.
    pub enum Limit: "limit" {
        /// `limits.max_connections`: a new connection answered 503 and closed.
        MaxConnections => "max_connections",
        /// `limits.max_header_bytes` or `limits.max_headers`: 431 (414 for a request line alone).
        HeadTooLarge => "max_header_bytes",
        /// A malformed request head: 400.
        BadRequest => "bad_request",
        /// `limits.header_read_timeout`: a request head too slow; closed.
        HeaderReadTimeout => "header_read_timeout",
        /// `limits.body_read_timeout` / `limits.body_min_rate`: a request body too slow; 408 and closed.
        BodyReadTimeout => "body_read_timeout",
        /// `limits.idle_timeout`: an idle keep-alive connection closed.
        IdleTimeout => "idle_timeout",
        /// The send timeout: a client that stopped reading its response; closed.
        SendTimeout => "send_timeout",
    }
}

label_enum! {
    /// Which NFQUEUE a gate counter is about.
    pub enum GateQueue: "queue" {
        /// Client segments to VIP:port (every one is replicated before the kernel sees it).
        Inbound => "inbound",
        /// This node's own SYN-ACK, FIN and RST for VIP:port.
        Outbound => "outbound",
    }
}

label_enum! {
    /// Direction of bytes, seen from this node.
    pub enum Direction: "direction" {
        /// Bytes this node read.
        Received => "received",
        /// Bytes this node wrote.
        Sent => "sent",
    }
}

label_enum! {
    /// One phase of a takeover, timed in a [`super::FailoverRecord`].
    pub enum FailoverPhase: "phase" {
        /// From the last sign of life to declaring the primary lost.
        Detection => "detection",
        /// The ARP probe of the VIP (and the optional fencing command).
        Fencing => "fencing",
        /// Rebuilding every connection with `TCP_REPAIR`.
        Restore => "restore",
        /// From the last sign of life to serving.
        Total => "total",
    }
}

/// Heartbeat round-trip bucket bounds: 50 µs to 1 s (a healthy pair sits well under 1 ms;
/// the top buckets show a stalled peer before the detector gives up on it).
pub const HEARTBEAT_RTT_BOUNDS_US: &[u64] =
    &[50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000];

/// Open client connections by protection, plus the counts behind them. Updated through
/// [`super::ConnectionGuard`], which keeps the gauges balanced.
#[derive(Debug, Default)]
pub struct Connections {
    pub(super) protected: Gauge,
    pub(super) unprotected: Family<UnprotectedReason, Gauge>,
    pub(super) opened: Counter,
    pub(super) closed: Counter,
    pub(super) became_unprotected: Family<UnprotectedReason, Counter>,
}

impl Connections {
    /// Open connections that a failover would carry over.
    pub fn protected(&self) -> u64 {
        self.protected.get().max(0) as u64
    }

    /// Open connections that are not protected, for one reason.
    pub fn unprotected(&self, reason: UnprotectedReason) -> u64 {
        self.unprotected.get(reason).get().max(0) as u64
    }

    /// Open connections that are not protected, all reasons.
    pub fn unprotected_total(&self) -> u64 {
        self.unprotected.iter().map(|(_, g)| g.get().max(0) as u64).sum()
    }

    /// Connections opened since start.
    pub fn opened(&self) -> u64 {
        self.opened.get()
    }

    /// Connections closed since start.
    pub fn closed(&self) -> u64 {
        self.closed.get()
    }

    /// Times a connection opened unprotected or lost its protection, for one reason.
    pub fn became_unprotected(&self, reason: UnprotectedReason) -> u64 {
        self.became_unprotected.get(reason).get()
    }
}

/// Records in flight are remembered in at most this many send batches; beyond it, new
/// batches merge into the newest one, which keeps the oldest send time exact.
const MAX_IN_FLIGHT_BATCHES: usize = 4096;

/// The replication stream's traffic and lag, fed by the sender (primary side).
#[derive(Debug, Default)]
pub struct Replication {
    records_sent: Counter,
    records_acked: Counter,
    bytes_sent: Counter,
    bytes_acked: Counter,
    in_flight: Mutex<InFlight>,
}

#[derive(Debug, Default)]
struct InFlight {
    records: u64,
    bytes: u64,
    /// `(records of this batch still unacknowledged, when it was sent)`, oldest first.
    batches: VecDeque<(u64, Instant)>,
}

/// Records and bytes sent but not yet acknowledged, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// Records sent minus records acknowledged on the current link.
    pub records: u64,
    /// Bytes sent minus bytes acknowledged on the current link.
    pub bytes: u64,
    /// Age of the oldest unacknowledged record; `None` when all are acknowledged.
    pub oldest_unacked: Option<Duration>,
}

impl Replication {
    /// `records` records of `bytes` encoded bytes were written to the link at `now`.
    pub fn record_sent(&self, now: Instant, records: u64, bytes: u64) {
        self.records_sent.add(records);
        self.bytes_sent.add(bytes);
        let mut f = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        f.records += records;
        f.bytes += bytes;
        if records == 0 {
            return;
        }
        if f.batches.len() < MAX_IN_FLIGHT_BATCHES {
            f.batches.push_back((records, now));
        } else if let Some(newest) = f.batches.back_mut() {
            newest.0 += records;
        }
    }

    /// The peer acknowledged `records` more records, `bytes` encoded bytes in all.
    /// Acknowledging more than is in flight (a caller's slip) saturates at zero.
    pub fn record_acked(&self, records: u64, bytes: u64) {
        self.records_acked.add(records);
        self.bytes_acked.add(bytes);
        let mut f = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        f.records = f.records.saturating_sub(records);
        f.bytes = f.bytes.saturating_sub(bytes);
        let mut left = records;
        while left > 0 {
            let Some(oldest) = f.batches.front_mut() else { break };
            let take = left.min(oldest.0);
            oldest.0 -= take;
            left -= take;
            if oldest.0 == 0 {
                f.batches.pop_front();
            }
        }
        if f.records == 0 {
            f.batches.clear();
        }
    }

    /// The link ended: what was in flight will never be acknowledged on it (a new
    /// backup starts from a snapshot), so the lag starts again from zero.
    pub fn reset_in_flight(&self) {
        let mut f = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        *f = InFlight::default();
    }

    /// The lag at `now`.
    pub fn lag(&self, now: Instant) -> Lag {
        let f = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        Lag {
            records: f.records,
            bytes: f.bytes,
            oldest_unacked: f.batches.front().map(|&(_, at)| now.saturating_duration_since(at)),
        }
    }

    /// Records sent since start.
    pub fn records_sent(&self) -> u64 {
        self.records_sent.get()
    }

    /// Records acknowledged since start.
    pub fn records_acked(&self) -> u64 {
        self.records_acked.get()
    }

    /// Encoded bytes sent since start.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.get()
    }

    /// Encoded bytes acknowledged since start.
    pub fn bytes_acked(&self) -> u64 {
        self.bytes_acked.get()
    }
}

/// Every metric a node keeps. Reach it through [`super::AdminState::metrics`]; the fields
/// are the typed handles the serving path increments.
#[derive(Debug)]
pub struct Metrics {
    /// HTTP exchanges (request and response) completed.
    pub exchanges: Counter,
    /// Bytes read from and written to clients.
    pub client_bytes: Family<Direction, Counter>,
    /// Bytes read from and written to upstreams.
    pub upstream_bytes: Family<Direction, Counter>,
    /// Packets that passed through each gate queue (given a verdict).
    pub gate_packets: Family<GateQueue, Counter>,
    /// Verdict batches sent to the kernel, per queue.
    pub gate_batches: Family<GateQueue, Counter>,
    /// Packets the gate dropped, per queue (fail-closed, held, or stood down).
    pub gate_drops: Family<GateQueue, Counter>,
    /// Exchanges resumed after a failover, by path.
    pub resumes: Family<ResumePath, Counter>,
    /// Restored connections whose client was prompted to retransmit after a takeover.
    pub retransmit_prompts: Counter,
    /// Stand-downs of a backup that lost its primary and did not take over.
    pub stand_downs: Counter,
    /// Backups a primary gave up to carry on unprotected.
    pub peers_lost: Counter,
    /// Client connections a limit refused or closed, by limit.
    pub limit_hits: Family<Limit, Counter>,
    /// Heartbeat round-trip times (measured on the primary).
    pub heartbeat_rtt: Histogram,
    /// Latest heartbeat round-trip time in microseconds; `u64::MAX` before the first.
    pub(super) last_rtt_us: AtomicU64,
    pub(super) connections: Connections,
    pub(super) replication: Replication,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            exchanges: Counter::default(),
            client_bytes: Family::default(),
            upstream_bytes: Family::default(),
            gate_packets: Family::default(),
            gate_batches: Family::default(),
            gate_drops: Family::default(),
            resumes: Family::default(),
            retransmit_prompts: Counter::default(),
            stand_downs: Counter::default(),
            peers_lost: Counter::default(),
            limit_hits: Family::default(),
            heartbeat_rtt: Histogram::new(HEARTBEAT_RTT_BOUNDS_US),
            last_rtt_us: AtomicU64::new(u64::MAX),
            connections: Connections::default(),
            replication: Replication::default(),
        }
    }
}

impl Metrics {
    /// Records one heartbeat round trip.
    pub fn observe_heartbeat_rtt(&self, rtt: Duration) {
        self.heartbeat_rtt.observe(rtt);
        self.last_rtt_us.store(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX - 1), Ordering::Relaxed);
    }

    /// The latest heartbeat round trip, if any was measured.
    pub fn last_heartbeat_rtt(&self) -> Option<Duration> {
        let us = self.last_rtt_us.load(Ordering::Relaxed);
        (us != u64::MAX).then(|| Duration::from_micros(us))
    }

    /// Open connections, by protection.
    pub fn connections(&self) -> &Connections {
        &self.connections
    }

    /// The replication stream's counters and lag.
    pub fn replication(&self) -> &Replication {
        &self.replication
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bucket_bound_is_inclusive_and_cumulative() {
        let h = Histogram::new(&[100, 1000]);
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(5));
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(0.0001, 1), (0.001, 2)]);
        assert_eq!(s.count, 3);
        assert!((s.sum_seconds - 5.000201).abs() < 1e-9);
    }

    #[test]
    fn label_all_is_indexed_by_index() {
        fn check<L: Label + PartialEq + std::fmt::Debug>() {
            for (i, l) in L::ALL.iter().enumerate() {
                assert_eq!(l.index(), i, "{l:?}");
            }
        }
        check::<ResumePath>();
        check::<UnprotectedReason>();
        check::<GateQueue>();
        check::<Direction>();
        check::<FailoverPhase>();
        check::<Limit>();
        assert_eq!(ResumePath::ALL.len(), 8);
    }

    #[test]
    fn lag_oldest_unacked_follows_partial_acks() {
        let r = Replication::default();
        let t0 = Instant::now();
        r.record_sent(t0, 3, 300);
        r.record_sent(t0 + Duration::from_millis(10), 2, 200);
        let now = t0 + Duration::from_millis(50);
        assert_eq!(r.lag(now), Lag { records: 5, bytes: 500, oldest_unacked: Some(Duration::from_millis(50)) });
        r.record_acked(2, 200);
        assert_eq!(r.lag(now).oldest_unacked, Some(Duration::from_millis(50)), "one record of batch 1 left");
        r.record_acked(1, 100);
        assert_eq!(r.lag(now), Lag { records: 2, bytes: 200, oldest_unacked: Some(Duration::from_millis(40)) });
        r.record_acked(2, 200);
        assert_eq!(r.lag(now), Lag { records: 0, bytes: 0, oldest_unacked: None });
        assert_eq!((r.records_sent(), r.records_acked(), r.bytes_sent(), r.bytes_acked()), (5, 5, 500, 500));
    }

    #[test]
    fn lag_over_acknowledged_saturates_and_reset_clears() {
        let r = Replication::default();
        let t0 = Instant::now();
        r.record_sent(t0, 1, 10);
        r.record_acked(5, 50);
        assert_eq!(r.lag(t0), Lag { records: 0, bytes: 0, oldest_unacked: None });
        r.record_sent(t0, 4, 40);
        r.reset_in_flight();
        assert_eq!(r.lag(t0), Lag { records: 0, bytes: 0, oldest_unacked: None });
        assert_eq!(r.records_sent(), 5, "counters are cumulative across links");
    }

    #[test]
    fn lag_with_full_batch_book_keeps_oldest_send_time() {
        let r = Replication::default();
        let t0 = Instant::now();
        for i in 0..(MAX_IN_FLIGHT_BATCHES as u64 + 10) {
            r.record_sent(t0 + Duration::from_micros(i), 1, 1);
        }
        let now = t0 + Duration::from_secs(1);
        assert_eq!(r.lag(now).oldest_unacked, Some(Duration::from_secs(1)));
        r.record_acked(MAX_IN_FLIGHT_BATCHES as u64 + 9, 0);
        // The merged tail batch keeps the send time of its first member: an upper bound.
        assert!(r.lag(now).oldest_unacked.is_some());
        r.record_acked(1, 0);
        assert_eq!(r.lag(now).oldest_unacked, None);
    }
}
