//! The failure detector (backup/src/detector.rs) driven the way its driver will drive it, over random
//! arrival schedules: no suspicion while frames keep coming within the detection time, exactly one at the
//! right time when they stop, and, with the primary's lease (shared/src/lease.rs) on the other side, never a
//! takeover while the primary could still trust its lease.

use std::time::{Duration, Instant};

use backup::detector::{Action, Detector, DetectorConfig, FenceResult, SuspectReason};
use proptest::prelude::*;
use shared::lease::Lease;

const US: Duration = Duration::from_micros(1);

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

/// A frame from the primary: when it reached this node's socket, and whether it is a heartbeat or a record.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    at: Instant,
    heartbeat: bool,
}

/// When the driver wakes for its timer.
#[derive(Debug, Clone)]
enum Timer {
    /// At `poll_timeout`, late by the next of these (cycled).
    Armed(Vec<Duration>),
    /// Every `period` from t0, whatever `poll_timeout` says (a coarse polling driver).
    Periodic(Duration),
}

/// Runs a driver until `end`: frames are handled when they arrive, before a timer due at the same instant;
/// returns every action with the time it was emitted. Fences stay outstanding (never answered).
fn drive(d: &mut Detector, t0: Instant, arrivals: &[Arrival], timer: &Timer, end: Instant) -> Vec<(Instant, Action)> {
    let mut out = Vec::new();
    let mut next = 0;
    let mut fired = 0usize;
    let mut tick = match timer {
        Timer::Periodic(period) => t0 + *period,
        Timer::Armed(_) => t0,
    };
    loop {
        let due = match timer {
            Timer::Armed(late) => d.poll_timeout().map(|t| t + late[fired % late.len()]),
            Timer::Periodic(_) => Some(tick),
        };
        let frame = arrivals.get(next).copied();
        match (due, frame) {
            (Some(due), Some(f)) if due < f.at => {
                d.handle_timeout(due);
                fired += 1;
                if let Timer::Periodic(period) = timer {
                    tick += *period;
                }
                out.extend(std::iter::from_fn(|| d.poll_action()).map(|a| (due, a)));
            }
            (_, Some(f)) => {
                if f.heartbeat {
                    d.handle_heartbeat(f.at);
                } else {
                    d.handle_record(f.at);
                }
                next += 1;
                out.extend(std::iter::from_fn(|| d.poll_action()).map(|a| (f.at, a)));
            }
            (Some(due), None) if due <= end => {
                d.handle_timeout(due);
                fired += 1;
                if let Timer::Periodic(period) = timer {
                    tick += *period;
                }
                out.extend(std::iter::from_fn(|| d.poll_action()).map(|a| (due, a)));
            }
            _ => break,
        }
    }
    out
}

/// Arrivals from gaps (µs) that are each below the detection time.
fn schedule(t0: Instant, gaps: &[(u64, bool)]) -> Vec<Arrival> {
    let mut at = t0;
    gaps.iter()
        .map(|&(gap, heartbeat)| {
            at += us(gap);
            Arrival { at, heartbeat }
        })
        .collect()
}

/// Detection configs and gap lists whose gaps are all below interval × misses.
fn config_and_gaps() -> impl Strategy<Value = (DetectorConfig, Vec<(u64, bool)>)> {
    (1u64..50, 1u32..10).prop_flat_map(|(interval_ms, misses)| {
        let detection_us = interval_ms * 1000 * u64::from(misses);
        let gaps = proptest::collection::vec((0..detection_us, any::<bool>()), 1..150);
        (Just(DetectorConfig::new(Duration::from_millis(interval_ms), misses)), gaps)
    })
}

fn suspects(actions: &[(Instant, Action)]) -> Vec<(Instant, Instant, Duration, SuspectReason)> {
    actions
        .iter()
        .filter_map(|(at, a)| match a {
            Action::Suspect { since, silent_for, reason } => Some((*at, *since, *silent_for, reason.clone())),
            _ => None,
        })
        .collect()
}

proptest! {
    /// Frames whose gaps are all below the detection time never raise suspicion, however late the driver's
    /// timer fires.
    #[test]
    fn gaps_below_detection_never_suspect(
        (config, gaps) in config_and_gaps(),
        late in proptest::collection::vec(0u64..200_000, 1..8),
    ) {
        let t0 = Instant::now();
        let arrivals = schedule(t0, &gaps);
        let end = arrivals.last().unwrap().at;
        let mut d = Detector::new(config, t0).unwrap();
        let timer = Timer::Armed(late.into_iter().map(us).collect());
        let actions = drive(&mut d, t0, &arrivals, &timer, end);
        prop_assert!(actions.is_empty(), "unexpected actions: {actions:?}");
    }

    /// The same with a driver polling on a fixed period instead of arming the timer.
    #[test]
    fn gaps_below_detection_never_suspect_with_periodic_checks(
        (config, gaps) in config_and_gaps(),
        period_us in 1u64..100_000,
    ) {
        let t0 = Instant::now();
        let arrivals = schedule(t0, &gaps);
        let end = arrivals.last().unwrap().at;
        let mut d = Detector::new(config, t0).unwrap();
        let actions = drive(&mut d, t0, &arrivals, &Timer::Periodic(us(period_us)), end);
        prop_assert!(actions.is_empty(), "unexpected actions: {actions:?}");
    }

    /// After frames below the detection time, a silence longer than it raises exactly one suspicion, no
    /// earlier than last frame + detection time and less than one check (a heartbeat interval of timer
    /// lateness) after it, followed by the first fence.
    #[test]
    fn silence_beyond_detection_suspects_exactly_once_on_time(
        (config, gaps) in config_and_gaps(),
        late_fraction in proptest::collection::vec(0.0f64..1.0, 1..8),
        extra in 0u64..5,
    ) {
        let t0 = Instant::now();
        let arrivals = schedule(t0, &gaps);
        let last = arrivals.last().unwrap().at;
        let interval = config.heartbeat_interval;
        let detection = config.detection_time();
        let end = last + detection + interval * (2 + extra as u32);
        let late: Vec<Duration> = late_fraction.iter().map(|f| interval.mul_f64(*f).min(interval - US)).collect();
        let mut d = Detector::new(config, t0).unwrap();
        let actions = drive(&mut d, t0, &arrivals, &Timer::Armed(late), end);
        let found = suspects(&actions);
        prop_assert_eq!(found.len(), 1, "actions: {:?}", actions);
        let (at, since, silent_for, reason) = found[0].clone();
        prop_assert_eq!(since, last);
        prop_assert_eq!(reason, SuspectReason::Silence);
        prop_assert_eq!(silent_for, at - last);
        prop_assert!(at >= last + detection && at < last + detection + interval, "suspected {:?} after the last frame", at - last);
        prop_assert_eq!(&actions[1].1, &Action::Fence { attempt: 1 });
        prop_assert_eq!(actions.len(), 2);
    }

    /// The same with a periodic check: suspicion comes at the first check at or after the deadline.
    #[test]
    fn silence_beyond_detection_suspects_at_the_first_check_after_the_deadline(
        (config, gaps) in config_and_gaps(),
        period_fraction in 0.001f64..=1.0,
    ) {
        let t0 = Instant::now();
        let arrivals = schedule(t0, &gaps);
        let last = arrivals.last().unwrap().at;
        let period = config.heartbeat_interval.mul_f64(period_fraction).max(US);
        let detection = config.detection_time();
        let end = last + detection + period * 3;
        let mut d = Detector::new(config, t0).unwrap();
        let actions = drive(&mut d, t0, &arrivals, &Timer::Periodic(period), end);
        let found = suspects(&actions);
        prop_assert_eq!(found.len(), 1, "actions: {:?}", actions);
        let at = found[0].0;
        prop_assert!(at >= last + detection && at < last + detection + period, "suspected {:?} after the last frame", at - last);
    }

    /// This node stalls (a loaded host): frames that reached the socket during the stall are read when it
    /// wakes, before the overdue timer. Gaps between arrivals at the socket stay below the detection time, so
    /// no stall, however long, raises suspicion.
    #[test]
    fn a_stalled_backup_that_reads_waiting_frames_first_never_suspects(
        (config, gaps) in config_and_gaps(),
        stall_start in 0u64..2_000_000,
        stall_len in 0u64..2_000_000,
    ) {
        let t0 = Instant::now();
        let (from, to) = (t0 + us(stall_start), t0 + us(stall_start + stall_len));
        // Frames that arrived during the stall are handled at its end.
        let arrivals: Vec<Arrival> = schedule(t0, &gaps)
            .into_iter()
            .map(|a| if a.at >= from && a.at < to { Arrival { at: to, ..a } } else { a })
            .collect();
        let end = arrivals.last().unwrap().at;
        let mut d = Detector::new(config, t0).unwrap();
        // The timer cannot fire inside the stall either: it fires at its end at the earliest.
        let mut actions = Vec::new();
        let mut next = 0;
        loop {
            let due = d.poll_timeout().map(|t| if t >= from && t < to { to } else { t });
            match (due, arrivals.get(next)) {
                (Some(due), Some(f)) if due < f.at => {
                    d.handle_timeout(due);
                }
                (_, Some(f)) => {
                    d.handle_record(f.at);
                    next += 1;
                }
                (Some(due), None) if due <= end => d.handle_timeout(due),
                _ => break,
            }
            actions.extend(std::iter::from_fn(|| d.poll_action()));
        }
        prop_assert!(actions.is_empty(), "unexpected actions: {actions:?}");
    }

    /// The pair: the primary sends a heartbeat every interval until it is cut off (or frozen) at a random
    /// beat; heartbeats may be lost or delayed; the backup's detector hears them, echoes each at once, and
    /// when it suspects, fences (the probe waits its whole timeout, nobody answers) and takes over. The
    /// primary renews its lease from the echoes it gets, however late. When the backup takes over, the
    /// primary's lease has run out, and no later echo revives it.
    #[test]
    fn takeover_never_happens_while_the_primary_lease_is_valid(
        interval_ms in 1u64..40,
        misses in 2u32..8,
        arp_probes in 1u32..4,
        arp_timeout_ms in 1u64..20,
        lease_fraction in 0.0f64..1.0,
        beats in proptest::collection::vec((0u8..10, 0u64..30_000, 0u64..2_000_000), 1..60),
    ) {
        let t0 = Instant::now();
        let interval = Duration::from_millis(interval_ms);
        let config = DetectorConfig::new(interval, misses);
        let detection = config.detection_time();
        let arp_time = Duration::from_millis(arp_timeout_ms) * arp_probes;
        let (low, high) = (interval + US, detection + arp_time);
        prop_assume!(low < high);
        let lease_len = low + (high - US - low).mul_f64(lease_fraction);
        let mut lease = Lease::new(lease_len, t0).unwrap();
        let mut d = Detector::new(config, t0).unwrap();

        // Heartbeats that reach the backup (one in ten is lost), in arrival order.
        let mut arrivals: Vec<(Instant, Instant, u64)> = beats
            .iter()
            .enumerate()
            .filter(|(_, (loss, _, _))| *loss != 0)
            .map(|(k, (_, delay, echo_delay))| {
                let sent = t0 + interval * k as u32;
                (sent + us(*delay), sent, *echo_delay)
            })
            .collect();
        arrivals.sort();
        let mut echoes = Vec::new();
        let mut claim = None;
        let mut fence_done: Option<Instant> = None;
        let mut next = 0;
        while claim.is_none() {
            // Earliest event first; at the same instant a frame, then the fence, then the timer.
            let frame = arrivals.get(next).copied();
            let due = d.poll_timeout();
            let now = if let Some((at, sent, echo_delay)) = frame.filter(|(at, _, _)| {
                fence_done.is_none_or(|f| *at <= f) && due.is_none_or(|t| *at <= t)
            }) {
                d.handle_heartbeat(at);
                echoes.push((at + us(echo_delay), sent));
                next += 1;
                at
            } else if let Some(done) = fence_done.filter(|f| due.is_none_or(|t| *f <= t)) {
                fence_done = None;
                d.handle_fence_result(done, FenceResult::Unanswered, None).unwrap();
                done
            } else if let Some(due) = due {
                d.handle_timeout(due);
                due
            } else {
                return Err(TestCaseError::fail("detector idle with the primary silent"));
            };
            while let Some(action) = d.poll_action() {
                match action {
                    // The probe waits its whole timeout: nobody answers.
                    Action::Fence { .. } => fence_done = Some(now + arp_time),
                    Action::Recovered { .. } => fence_done = None,
                    Action::TakeOver { record } => claim = Some(record.fenced_at()),
                    _ => {}
                }
            }
        }
        let claim = claim.unwrap();
        echoes.sort();
        for (at, sent) in echoes {
            lease.handle_ack(at, sent);
            if at >= claim {
                prop_assert!(!lease.state(at).is_valid(), "lease revived at {:?} by an echo", at - t0);
            }
        }
        prop_assert!(!lease.state(claim).is_valid(), "lease valid until {:?}, takeover at {:?}", lease.poll_timeout() - t0, claim - t0);
    }
}
