//! The primary's lease (shared/src/lease.rs) against a model, and the two timing promises it carries: a
//! lease always runs out before the backup can claim the VIP, and a dead backup stalls clients for at most
//! `lease + probe time`.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use shared::lease::{Lease, LeaseOutcome, LeaseState, VipProbe, backup_loss_stall};
use shared::vip::Mac;

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

/// One answer from the backup: sent by the primary at `sent`, arrived back at `sent + rtt` (µs from t0).
#[derive(Debug, Clone)]
struct Answer {
    sent: u64,
    rtt: u64,
}

fn answers() -> impl Strategy<Value = Vec<Answer>> {
    proptest::collection::vec((0u64..2_000_000, 0u64..500_000).prop_map(|(sent, rtt)| Answer { sent, rtt }), 0..60)
}

proptest! {
    /// Whatever order answers arrive in, the lease is valid exactly until the latest send time plus its
    /// duration (or the link's end, if earlier), and expired from then on.
    #[test]
    fn state_follows_the_latest_send_time(
        duration_us in 1u64..300_000,
        mut answers in answers(),
        link_down in proptest::option::of(0u64..3_000_000),
        probes in proptest::collection::vec(0u64..3_000_000, 1..40),
    ) {
        let t0 = Instant::now();
        let at = |n: u64| t0 + us(n);
        let duration = us(duration_us);
        let mut lease = Lease::new(duration, t0).unwrap();
        // Arrival order, as the primary processes them.
        answers.sort_by_key(|a| a.sent + a.rtt);
        for a in &answers {
            let arrival = a.sent + a.rtt;
            if link_down.is_some_and(|d| d <= arrival) {
                lease.handle_link_down(at(link_down.unwrap()));
            }
            lease.handle_ack(at(arrival), at(a.sent));
        }
        if let Some(d) = link_down {
            lease.handle_link_down(at(d));
        }
        let counted = answers.iter().filter(|a| link_down.is_none_or(|d| a.sent + a.rtt < d));
        let renewed = counted.map(|a| a.sent + duration_us).max().unwrap_or(0).max(duration_us);
        let end = link_down.map_or(renewed, |d| d.min(renewed));
        prop_assert_eq!(lease.poll_timeout(), at(end));
        for p in probes {
            let want = if p < end { LeaseState::Valid { until: at(end) } } else { LeaseState::Expired { since: at(end) } };
            prop_assert_eq!(lease.state(at(p)), want);
        }
    }

    /// The safety argument of the module documentation, on random schedules: the primary sends a heartbeat
    /// every interval until it is cut off or frozen; each may be lost or delayed; the backup echoes every one
    /// it hears; echoes may be lost or delayed arbitrarily (a frozen primary reads them when it wakes). The
    /// backup cannot claim before its last hearing + detection + ARP probe time. The primary's lease must
    /// have run out by then, whatever answers it processes afterwards.
    #[test]
    fn lease_runs_out_before_the_backup_can_claim(
        interval_ms in 1u64..50,
        misses in 1u32..10,
        arp_probes in 1u32..5,
        arp_timeout_ms in 1u64..30,
        lease_fraction in 0.0f64..1.0,
        beats in proptest::collection::vec((any::<bool>(), 0u64..40_000, any::<bool>(), 0u64..3_000_000), 1..80),
    ) {
        let t0 = Instant::now();
        let interval = interval_ms * 1000;
        let detection = interval * u64::from(misses);
        let arp_time = arp_timeout_ms * 1000 * u64::from(arp_probes);
        // Any lease strictly between the interval and detection + probe time (what config validation allows).
        let (low, high) = (interval + 1, detection + arp_time);
        prop_assume!(low < high);
        let lease_us = low + ((high - 1 - low) as f64 * lease_fraction) as u64;
        let mut lease = Lease::new(us(lease_us), t0).unwrap();
        let mut last_heard = 0u64; // the handshake at t0 counts as hearing
        let mut echoes = Vec::new();
        for (k, (delivered, delay, echoed, echo_delay)) in beats.iter().enumerate() {
            let sent = k as u64 * interval;
            if *delivered {
                let heard = sent + delay;
                last_heard = last_heard.max(heard);
                if *echoed {
                    echoes.push((heard + echo_delay, sent));
                }
            }
        }
        echoes.sort();
        for (arrival, sent) in echoes {
            lease.handle_ack(t0 + us(arrival), t0 + us(sent));
        }
        let earliest_claim = last_heard + detection + arp_time;
        prop_assert!(
            lease.poll_timeout() < t0 + us(earliest_claim),
            "lease ends {:?} after t0, backup may claim {}us after t0",
            lease.poll_timeout() - t0,
            earliest_claim
        );
        prop_assert!(!lease.state(t0 + us(earliest_claim)).is_valid());
    }

    /// A backup that dies silently: client segments wait for acks that never come. The primary releases them
    /// when its lease has run out and its probe found nobody (`CarryOnUnprotected`). No segment that arrived
    /// after the backup's last answer was sent waits longer than `lease + probe time`.
    #[test]
    fn backup_loss_stalls_clients_at_most_lease_plus_probe(
        lease_ms in 2u64..300,
        probe_ms in 1u64..100,
        last_anchor in 0u64..1_000_000,
        arrivals in proptest::collection::vec(0u64..400_000, 1..20),
    ) {
        let t0 = Instant::now();
        let lease_d = Duration::from_millis(lease_ms);
        let probe = Duration::from_millis(probe_ms);
        let mut lease = Lease::new(lease_d, t0).unwrap();
        lease.handle_ack(t0 + us(last_anchor), t0 + us(last_anchor));
        let LeaseState::Expired { since } = lease.state(t0 + Duration::from_secs(10)) else {
            panic!("a lease nobody renews must expire")
        };
        prop_assert_eq!(LeaseOutcome::decide(1, 1, &VipProbe::Unanswered), LeaseOutcome::CarryOnUnprotected);
        let released = since + probe;
        for a in arrivals {
            let arrived = t0 + us(last_anchor + a);
            let stall = released.saturating_duration_since(arrived);
            prop_assert!(stall <= backup_loss_stall(lease_d, probe), "stall {stall:?}");
        }
    }

    /// Only an unanswered probe at the highest epoch lets a primary serve unprotected.
    #[test]
    fn only_an_unanswered_probe_at_the_highest_epoch_carries_on(
        own in 0u64..5,
        highest in 0u64..5,
        kind in 0u8..5,
        last in any::<u8>(),
    ) {
        let mac = Mac([2, 0, 0, 0, 0, last]);
        let probe = match kind {
            0 => VipProbe::Pending,
            1 => VipProbe::Unanswered,
            2 => VipProbe::Answered { mac },
            3 => VipProbe::Contested { mac },
            _ => VipProbe::Failed { error: "down".into() },
        };
        let outcome = LeaseOutcome::decide(own, highest, &probe);
        let carries_on = outcome == LeaseOutcome::CarryOnUnprotected;
        prop_assert_eq!(carries_on, probe == VipProbe::Unanswered && highest <= own);
        let steps_down = matches!(outcome, LeaseOutcome::StepDown { .. });
        prop_assert_eq!(steps_down, highest > own || matches!(probe, VipProbe::Answered { .. }));
    }
}

/// The defaults of shared/src/config.rs: 20 ms × 5 detection, 3 × 15 ms probes, lease = detection + half the
/// probe time. Printed, not asserted against a budget: the figure belongs in the operator's documentation.
#[test]
fn default_backup_loss_stall_is_printed() {
    let config = shared::config::DetectionConfig::default();
    let fencing = shared::config::FencingConfig::default();
    let lease = config.detection_time() + fencing.arp_time() / 2;
    let stall = backup_loss_stall(lease, fencing.arp_time());
    println!(
        "backup loss: lease {lease:?} + probe {:?} = worst-case client stall {stall:?} (link reset: {:?})",
        fencing.arp_time(),
        fencing.arp_time()
    );
    assert_eq!(stall, lease + fencing.arp_time());
}
