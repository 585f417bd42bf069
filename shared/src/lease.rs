//! The primary's lease on protected service, and what a primary does when it runs out
//! (ARCHITECTURE.md "Who owns the VIP", issue 3 part 8 "Backup loss"). Pure logic: time comes in as
//! `now: Instant`, nothing here reads a clock, sends a probe or touches a socket.
//!
//! # Why the lease is anchored at send time
//!
//! The backup resets its silence timer when a frame of the primary *arrives* (at `r`), and claims the VIP no
//! earlier than `r + detection + fencing` (the ARP probe waits its whole timeout before it reads as
//! unanswered). The primary renews its lease from the backup's answers, but it dates each renewal at the time
//! it *sent* what the backup answers (`sent_at`: the echoed heartbeat's `sent_us`, or the sending time of the
//! acknowledged record), never at the time the answer arrived. Since `sent_at <= r`,
//!
//! ```text
//! lease expiry = sent_at + lease <= r + lease < r + detection + arp_time <= the backup's earliest claim
//! ```
//!
//! whenever `lease < detection + arp_time`, which `NodeConfig::validate` enforces. Dating at arrival would
//! break this: a primary frozen for a second (SIGSTOP, a VM pause) wakes to a socket full of the backup's
//! answers sent during the freeze, and would renew a lease the backup has already acted on.
//!
//! A broken link ends the lease at once ([`Lease::handle_link_down`]): ending it early is always safe (the
//! primary holds and probes), and it makes a backup process crash (its kernel resets the link) cost only the
//! probe. The backup may suspect a broken link at once too, so it can claim before this lease would have run
//! out; that is still safe because a primary releases nothing to clients without the backup's acks
//! (invariant 1), and its ARP responder is what the backup's fence probes.
//!
//! # After expiry
//!
//! The primary holds every VIP segment (it stops releasing even acked ones: acks from a backup that may have
//! taken over prove nothing about the address), probes the VIP with ARP, and asks [`LeaseOutcome::decide`]:
//! another node answering, or a higher epoch anywhere, means step down; nobody answering means the backup is
//! gone and the primary carries on unprotected. A probe error never counts as "nobody answered".
//!
//! # Backup loss: the worst-case stall
//!
//! When the backup dies, client segments wait in the gate (no acks come) until the lease runs out and the
//! probe finds the address unclaimed. A segment that arrives at `t >= sent_at` (the last renewal's anchor) is
//! released at `sent_at + lease + probe time`, so no client stalls longer than [`backup_loss_stall`]:
//! `lease + arp_time`. With the defaults (lease = detection + arp_time / 2 = 100 ms + 22.5 ms, probe
//! 3 × 15 ms) that is 167.5 ms: detection time plus one and a half probe times. When the backup's process dies
//! on a live host its kernel resets the link and the stall is the probe alone (45 ms).

use std::time::{Duration, Instant};

use crate::vip::{ArpError, Mac, ProbeOutcome};

/// Why a lease could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// A zero lease would be expired from the start: every segment would be held and probed for.
    #[error("lease duration must be above zero")]
    ZeroDuration,
}

/// Whether the primary may still trust its backup at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed recently enough; runs out at `until` unless renewed again.
    Valid { until: Instant },
    /// Ran out (or the link broke) at `since`: hold every VIP segment and probe the VIP.
    Expired { since: Instant },
}

impl LeaseState {
    pub fn is_valid(&self) -> bool {
        matches!(self, LeaseState::Valid { .. })
    }
}

/// The primary's lease on its backup. Create one when a backup's handshake completes (a lease belongs to one
/// replication link); feed it [`handle_ack`](Lease::handle_ack) for every ack and heartbeat echo and
/// [`handle_link_down`](Lease::handle_link_down) when the link ends; read [`state`](Lease::state). The driver
/// arms a timer at [`poll_timeout`](Lease::poll_timeout) to notice expiry without traffic.
#[derive(Debug, Clone)]
pub struct Lease {
    duration: Duration,
    /// Latest anchor (send time of what the backup acknowledged) plus `duration`.
    expires_at: Instant,
    /// When the link broke; the lease cannot be renewed after that.
    revoked_at: Option<Instant>,
    renewals: u64,
}

impl Lease {
    /// A lease of `duration`, anchored at `granted_at`: when this node sent the handshake answer the backup
    /// has received (the backup starts its silence timer no earlier than that).
    pub fn new(duration: Duration, granted_at: Instant) -> Result<Lease, LeaseError> {
        if duration.is_zero() {
            return Err(LeaseError::ZeroDuration);
        }
        Ok(Lease { duration, expires_at: granted_at + duration, revoked_at: None, renewals: 0 })
    }

    /// The backup answered, at `now`, something this node sent at `sent_at`: an ack of records up to one sent
    /// at `sent_at`, or a heartbeat whose `echo_us` is the `sent_us` of a heartbeat sent at `sent_at`. Renews
    /// the lease to `sent_at + duration` unless it already runs longer. A `sent_at` after `now` is a caller
    /// bug and is read as `now`. Ignored once the link broke.
    pub fn handle_ack(&mut self, now: Instant, sent_at: Instant) {
        if self.revoked_at.is_some() {
            return;
        }
        let anchor = sent_at.min(now);
        let until = anchor + self.duration;
        if until > self.expires_at {
            self.expires_at = until;
            self.renewals += 1;
        }
    }

    /// The replication link broke (reset, closed, corrupt frame, timeout): the lease ends at `now` and cannot
    /// be renewed; a backup that comes back joins again and gets a new lease.
    pub fn handle_link_down(&mut self, now: Instant) {
        if self.revoked_at.is_none() {
            self.revoked_at = Some(now);
        }
    }

    /// Valid until the end of the last renewal (or the link's end, if earlier), expired from then on.
    pub fn state(&self, now: Instant) -> LeaseState {
        let end = self.end();
        if now < end { LeaseState::Valid { until: end } } else { LeaseState::Expired { since: end } }
    }

    /// When the lease runs out unless renewed: the driver's next timer. Renewals only push it later.
    pub fn poll_timeout(&self) -> Instant {
        self.end()
    }

    /// The send time of the latest answered message (the anchor of the last renewal): the backup heard this
    /// node no earlier than that, so it declares it dead no earlier than this plus its detection time.
    pub fn anchor(&self) -> Instant {
        self.expires_at - self.duration
    }

    /// The configured lease duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// How many answers extended the lease (answers dated no later than an earlier one do not).
    pub fn renewals(&self) -> u64 {
        self.renewals
    }

    /// Whether the link broke.
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    fn end(&self) -> Instant {
        match self.revoked_at {
            Some(at) => at.min(self.expires_at),
            None => self.expires_at,
        }
    }
}

/// What the primary's ARP probe of the VIP said, as far as it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipProbe {
    /// The probe has not finished (or not started).
    Pending,
    /// Nobody else answered within the probe's timeout.
    Unanswered,
    /// Another node holds the address: it answered or announced it.
    Answered { mac: Mac },
    /// Another node probed the address at the same time (a backup fencing us, a spare): it wants the address
    /// but does not hold it.
    Contested { mac: Mac },
    /// The probe could not be made (interface down, socket error): nothing is known.
    Failed { error: String },
}

impl From<&Result<ProbeOutcome, ArpError>> for VipProbe {
    fn from(result: &Result<ProbeOutcome, ArpError>) -> Self {
        match result {
            Ok(ProbeOutcome::Unanswered { .. }) => VipProbe::Unanswered,
            Ok(ProbeOutcome::Answered { mac, .. }) => VipProbe::Answered { mac: *mac },
            Ok(ProbeOutcome::Contested { mac, .. }) => VipProbe::Contested { mac: *mac },
            Err(e) => VipProbe::Failed { error: e.to_string() },
        }
    }
}

/// Why a primary gives up the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepDownReason {
    /// Another node answers for the VIP: the backup took over while this node was cut off or frozen.
    Answered { mac: Mac },
    /// A node this one can reach has seen a later takeover.
    HigherEpoch { ours: u64, seen: u64 },
}

/// What a primary whose lease expired does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// Nobody else holds the address and no later epoch exists: the backup is gone. Release what is held and
    /// serve without waiting for acks; `/status` reports the pair unprotected.
    CarryOnUnprotected,
    /// Drop all VIP state and emit nothing more for VIP connections (no FIN, no RST: the fail-closed queues
    /// swallow them); stop answering ARP for the VIP.
    StepDown { reason: StepDownReason },
    /// Keep holding every VIP segment. `probe_again`: the probe finished without an answer this node can act
    /// on (another node was probing too, or the probe failed), so start another; otherwise one is running.
    KeepHolding { probe_again: bool },
}

impl LeaseOutcome {
    /// The policy of ARCHITECTURE.md "Who owns the VIP", for a primary whose lease expired. `own_epoch` is
    /// this node's epoch, `highest_epoch` the highest it has seen from any node it can reach (handshakes,
    /// refused joins). A higher epoch wins at once, whatever the probe says. A contested probe is probed
    /// again rather than read either way: the other prober is usually the backup fencing this node, which
    /// will hear this node's ARP responder and stand down, or will claim the address and announce it, which
    /// the next probe sees. If the lease becomes valid again meanwhile (the backup's answers resumed), the
    /// caller returns to protected service and the probe's result no longer matters.
    pub fn decide(own_epoch: u64, highest_epoch: u64, probe: &VipProbe) -> LeaseOutcome {
        if highest_epoch > own_epoch {
            return LeaseOutcome::StepDown {
                reason: StepDownReason::HigherEpoch { ours: own_epoch, seen: highest_epoch },
            };
        }
        match probe {
            VipProbe::Answered { mac } => LeaseOutcome::StepDown { reason: StepDownReason::Answered { mac: *mac } },
            VipProbe::Unanswered => LeaseOutcome::CarryOnUnprotected,
            VipProbe::Pending => LeaseOutcome::KeepHolding { probe_again: false },
            VipProbe::Contested { .. } | VipProbe::Failed { .. } => LeaseOutcome::KeepHolding { probe_again: true },
        }
    }
}

/// The longest a client segment waits in the gate after the backup dies silently (host down, cable cut):
/// the lease plus the ARP probe time (`FencingConfig::arp_time`). See the module documentation.
pub fn backup_loss_stall(lease: Duration, probe_time: Duration) -> Duration {
    lease.saturating_add(probe_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn mac(last: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, last])
    }

    #[test]
    fn new_lease_is_valid_until_granted_plus_duration() {
        let t0 = Instant::now();
        let lease = Lease::new(100 * MS, t0).unwrap();
        assert_eq!(lease.state(t0), LeaseState::Valid { until: t0 + 100 * MS });
        assert_eq!(lease.state(t0 + 99 * MS), LeaseState::Valid { until: t0 + 100 * MS });
        assert_eq!(lease.state(t0 + 100 * MS), LeaseState::Expired { since: t0 + 100 * MS });
        assert_eq!(lease.poll_timeout(), t0 + 100 * MS);
        assert_eq!(Lease::new(Duration::ZERO, t0).unwrap_err(), LeaseError::ZeroDuration);
    }

    #[test]
    fn ack_renews_from_send_time_not_arrival() {
        let t0 = Instant::now();
        let mut lease = Lease::new(100 * MS, t0).unwrap();
        lease.handle_ack(t0 + 50 * MS, t0 + 40 * MS);
        assert_eq!(lease.state(t0 + 139 * MS), LeaseState::Valid { until: t0 + 140 * MS });
        assert_eq!(lease.state(t0 + 140 * MS), LeaseState::Expired { since: t0 + 140 * MS });
        assert_eq!(lease.renewals(), 1);
    }

    #[test]
    fn older_ack_never_shortens_the_lease() {
        let t0 = Instant::now();
        let mut lease = Lease::new(100 * MS, t0).unwrap();
        lease.handle_ack(t0 + 60 * MS, t0 + 50 * MS);
        lease.handle_ack(t0 + 70 * MS, t0 + 20 * MS);
        assert_eq!(lease.poll_timeout(), t0 + 150 * MS);
        assert_eq!(lease.renewals(), 1);
    }

    #[test]
    fn answers_queued_during_a_freeze_do_not_revive_an_expired_lease() {
        let t0 = Instant::now();
        let mut lease = Lease::new(100 * MS, t0).unwrap();
        lease.handle_ack(t0 + 10 * MS, t0 + 5 * MS);
        // Frozen from 20 ms to 1 s; the backup kept echoing the last heartbeat it heard (sent at 5 ms).
        let wake = t0 + 1000 * MS;
        for _ in 0..20 {
            lease.handle_ack(wake, t0 + 5 * MS);
        }
        assert_eq!(lease.state(wake), LeaseState::Expired { since: t0 + 105 * MS });
    }

    #[test]
    fn send_time_in_the_future_is_read_as_now() {
        let t0 = Instant::now();
        let mut lease = Lease::new(100 * MS, t0).unwrap();
        lease.handle_ack(t0 + 10 * MS, t0 + 500 * MS);
        assert_eq!(lease.poll_timeout(), t0 + 110 * MS);
    }

    #[test]
    fn link_down_expires_at_once_and_blocks_renewal() {
        let t0 = Instant::now();
        let mut lease = Lease::new(100 * MS, t0).unwrap();
        lease.handle_link_down(t0 + 30 * MS);
        assert!(lease.is_revoked());
        assert_eq!(lease.state(t0 + 29 * MS), LeaseState::Valid { until: t0 + 30 * MS });
        assert_eq!(lease.state(t0 + 30 * MS), LeaseState::Expired { since: t0 + 30 * MS });
        lease.handle_ack(t0 + 31 * MS, t0 + 29 * MS);
        assert_eq!(lease.state(t0 + 31 * MS), LeaseState::Expired { since: t0 + 30 * MS });
        // A second report keeps the first time.
        lease.handle_link_down(t0 + 50 * MS);
        assert_eq!(lease.poll_timeout(), t0 + 30 * MS);
    }

    #[test]
    fn link_down_after_expiry_keeps_the_expiry_time() {
        let t0 = Instant::now();
        let mut lease = Lease::new(100 * MS, t0).unwrap();
        lease.handle_link_down(t0 + 300 * MS);
        assert_eq!(lease.state(t0 + 300 * MS), LeaseState::Expired { since: t0 + 100 * MS });
    }

    #[test]
    fn decide_higher_epoch_steps_down_whatever_the_probe() {
        for probe in [
            VipProbe::Pending,
            VipProbe::Unanswered,
            VipProbe::Answered { mac: mac(1) },
            VipProbe::Contested { mac: mac(1) },
            VipProbe::Failed { error: "x".into() },
        ] {
            assert_eq!(
                LeaseOutcome::decide(3, 4, &probe),
                LeaseOutcome::StepDown { reason: StepDownReason::HigherEpoch { ours: 3, seen: 4 } }
            );
        }
    }

    #[test]
    fn decide_by_probe_at_own_epoch() {
        let d = |p: VipProbe| LeaseOutcome::decide(5, 5, &p);
        assert_eq!(d(VipProbe::Unanswered), LeaseOutcome::CarryOnUnprotected);
        assert_eq!(
            d(VipProbe::Answered { mac: mac(7) }),
            LeaseOutcome::StepDown { reason: StepDownReason::Answered { mac: mac(7) } }
        );
        assert_eq!(d(VipProbe::Pending), LeaseOutcome::KeepHolding { probe_again: false });
        assert_eq!(d(VipProbe::Contested { mac: mac(7) }), LeaseOutcome::KeepHolding { probe_again: true });
        assert_eq!(d(VipProbe::Failed { error: "iface down".into() }), LeaseOutcome::KeepHolding { probe_again: true });
        // A lower epoch seen elsewhere changes nothing.
        assert_eq!(LeaseOutcome::decide(5, 2, &VipProbe::Unanswered), LeaseOutcome::CarryOnUnprotected);
    }

    #[test]
    fn probe_results_convert_and_errors_never_read_as_unanswered() {
        let ok = |o: ProbeOutcome| VipProbe::from(&Ok(o));
        assert_eq!(
            ok(ProbeOutcome::Unanswered { probes_sent: 3, waited: 45 * MS, solicitations: 1 }),
            VipProbe::Unanswered
        );
        assert_eq!(
            ok(ProbeOutcome::Answered { mac: mac(9), after: MS, probes_sent: 1 }),
            VipProbe::Answered { mac: mac(9) }
        );
        assert_eq!(
            ok(ProbeOutcome::Contested { mac: mac(9), after: MS, probes_sent: 1 }),
            VipProbe::Contested { mac: mac(9) }
        );
        let failed = VipProbe::from(&Err(ArpError::NoProbes));
        assert_eq!(failed, VipProbe::Failed { error: "probe count must be at least 1".into() });
        assert_ne!(LeaseOutcome::decide(1, 1, &failed), LeaseOutcome::CarryOnUnprotected);
    }

    #[test]
    fn default_backup_loss_stall_is_within_the_promise() {
        let lease = 100 * MS + 45 * MS / 2;
        assert_eq!(backup_loss_stall(lease, 45 * MS), Duration::from_micros(167_500));
        assert_eq!(backup_loss_stall(Duration::MAX, MS), Duration::MAX);
    }

    use proptest::prelude::*;

    proptest! {
        /// Answers in any order only ever push the end later, never past the latest send time + duration,
        /// and never after the link broke.
        #[test]
        fn renewals_are_monotonic_and_bounded(
            answers in proptest::collection::vec((0u64..1000, 0u64..1000), 0..50),
            down_after in proptest::option::of(0usize..50),
        ) {
            let t0 = Instant::now();
            let mut lease = Lease::new(100 * MS, t0).unwrap();
            let mut end = lease.poll_timeout();
            let mut latest = t0;
            for (i, (sent, rtt)) in answers.into_iter().enumerate() {
                let (sent, now) = (t0 + Duration::from_millis(sent), t0 + Duration::from_millis(sent + rtt));
                if down_after == Some(i) {
                    lease.handle_link_down(now);
                    let frozen = lease.poll_timeout();
                    prop_assert!(frozen <= end);
                    end = frozen;
                }
                lease.handle_ack(now, sent);
                if !lease.is_revoked() {
                    latest = latest.max(sent);
                    prop_assert!(lease.poll_timeout() >= end);
                    prop_assert_eq!(lease.poll_timeout(), latest + 100 * MS);
                } else {
                    prop_assert_eq!(lease.poll_timeout(), end);
                }
                end = lease.poll_timeout();
            }
        }
    }
}
