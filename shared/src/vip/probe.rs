//! The fencing check (RFC 5227 probes: is anyone answering for the VIP?) and the
//! announcement after claiming it (gratuitous ARP).
//!
//! Read RFC 5227 §2.1 (probing) and §2.3 (announcing). The RFC's timings (1–2 s between
//! probes) are for hosts configuring an address at boot; a takeover has a budget of
//! milliseconds, so the caller sets count and timeout. What counts as an answer is
//! [`probe_evidence`]: a reply or announcement from another MAC with the VIP as sender.
//! An ARP answer proves a live process, because the serving node answers from its
//! process and keeps its kernel silent (ARCHITECTURE.md "Who owns the VIP").

use super::arp::{ArpFrame, Mac, ProbeEvidence, probe_evidence};
use super::socket::{ArpError, ArpSocket, Incoming};
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

/// The result of probing an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Another node holds the address (its reply or announcement arrived): stand down.
    Answered {
        /// Who answered.
        mac: Mac,
        /// Time from the first probe to the answer.
        after: Duration,
        probes_sent: u32,
    },
    /// Another node probed the same address while we did (RFC 5227 §2.1.1): neither
    /// should take it without a decision from elsewhere.
    Contested { mac: Mac, after: Duration, probes_sent: u32 },
    /// Nobody answered before the timeout.
    Unanswered {
        probes_sent: u32,
        /// Time from the first probe until giving up.
        waited: Duration,
        /// Frames from another node's kernel that used the address as sender IP in an
        /// ordinary request: reported, not counted (see [`ProbeEvidence::Solicitation`]).
        solicitations: u32,
    },
}

impl ProbeOutcome {
    /// True when someone else holds or contests the address.
    pub fn is_answered(&self) -> bool {
        !matches!(self, ProbeOutcome::Unanswered { .. })
    }
}

fn check_unicast(vip: Ipv4Addr) -> Result<(), ArpError> {
    if vip.is_unspecified() || vip.is_broadcast() || vip.is_multicast() {
        return Err(ArpError::NotUnicast(vip));
    }
    Ok(())
}

/// Probes `vip` on `iface`: opens an ARP socket (see [`ArpSocket::open`] for where and
/// with what rights), then [`probe_on`].
pub async fn probe(iface: &str, vip: Ipv4Addr, count: u32, timeout: Duration) -> Result<ProbeOutcome, ArpError> {
    let socket = ArpSocket::open(iface)?;
    probe_on(&socket, vip, count, timeout).await
}

/// Sends `count` RFC 5227 probes for `vip`, spread evenly over `timeout`, and listens
/// until `timeout` has passed since the first, returning at the first answer. Frames
/// queued before the call, our own frames and answers about other addresses are ignored.
/// An error (interface down, ...) means the check could not be made: a fence must not
/// read it as "unanswered".
pub async fn probe_on(
    socket: &ArpSocket,
    vip: Ipv4Addr,
    count: u32,
    timeout: Duration,
) -> Result<ProbeOutcome, ArpError> {
    if count == 0 {
        return Err(ArpError::NoProbes);
    }
    check_unicast(vip)?;
    let ours = socket.mac();
    let iface = socket.iface();
    let stale = socket.drain()?;
    if stale > 0 {
        debug!(iface, %vip, stale, "discarded ARP frames queued before the probe");
    }
    let frame = ArpFrame::probe(ours, vip).emit();
    let spacing = timeout / count;
    let start = Instant::now();
    let deadline = start + timeout;
    let (mut sent, mut solicitations) = (0u32, 0u32);
    loop {
        let now = Instant::now();
        if sent < count && now >= start + spacing * sent {
            socket.send(&frame).await?;
            sent += 1;
            continue;
        }
        if sent == count && now >= deadline {
            let waited = now - start;
            info!(iface, %vip, probes = sent, ?waited, solicitations, "ARP probe unanswered");
            return Ok(ProbeOutcome::Unanswered { probes_sent: sent, waited, solicitations });
        }
        let wake = if sent < count { start + spacing * sent } else { deadline };
        tokio::select! {
            incoming = socket.recv() => {
                let frame = match incoming? {
                    Incoming::Arp(f) => f,
                    Incoming::Malformed(e) => {
                        debug!(iface, %vip, error = %e, "ignored malformed ARP frame");
                        continue;
                    }
                };
                let after = start.elapsed();
                match probe_evidence(&frame, ours, vip) {
                    ProbeEvidence::Holder(mac) => {
                        info!(iface, %vip, %mac, ?after, probes = sent, "ARP probe answered: the address is held");
                        return Ok(ProbeOutcome::Answered { mac, after, probes_sent: sent });
                    }
                    ProbeEvidence::Prober(mac) => {
                        warn!(iface, %vip, %mac, ?after, "another node probes the same address");
                        return Ok(ProbeOutcome::Contested { mac, after, probes_sent: sent });
                    }
                    ProbeEvidence::Solicitation(mac) => {
                        solicitations += 1;
                        debug!(iface, %vip, %mac, "a kernel solicits with the address as sender; not an answer");
                    }
                    ProbeEvidence::Own | ProbeEvidence::Unrelated => {}
                }
            }
            _ = sleep_until(wake) => {}
        }
    }
}

/// How late a round of gratuitous ARP may go out. Later than this, the process was stalled (frozen,
/// starved) while the round was due, and another node may have fenced it and taken the address over
/// meanwhile: announcing then would claim the address back from under the new owner, which gives way to
/// another node's announcement. The rounds still due are dropped; the responder keeps answering, and the
/// node's lease and probe decide whether it still owns the address.
pub const STALE_ROUND: Duration = Duration::from_millis(100);

/// Whether a round due at `due` is stale at `now` ([`STALE_ROUND`]).
pub fn round_is_stale(due: Instant, now: Instant) -> bool {
    now.saturating_duration_since(due) > STALE_ROUND
}

/// Announces `vip` on `iface`: opens an ARP socket, then [`announce_on`].
pub async fn announce(iface: &str, vip: Ipv4Addr, count: u32, interval: Duration) -> Result<u32, ArpError> {
    announce_from(iface, vip, Instant::now(), count, interval).await
}

/// [`announce`] with the first round due at `first` (later rounds `interval` apart): opens the socket now.
pub async fn announce_from(
    iface: &str,
    vip: Ipv4Addr,
    first: Instant,
    count: u32,
    interval: Duration,
) -> Result<u32, ArpError> {
    let socket = ArpSocket::open(iface)?;
    announce_on_from(&socket, vip, first, count, interval).await
}

/// Sends `count` rounds of gratuitous ARP for `vip`, `interval` apart, the first at once.
/// Each round carries both forms: the request form (RFC 5227 announcement) and the reply
/// form, for stacks that only update their caches from replies. Both override a Linux
/// neighbour entry even within its `locktime`. Returns the number of frames sent.
pub async fn announce_on(socket: &ArpSocket, vip: Ipv4Addr, count: u32, interval: Duration) -> Result<u32, ArpError> {
    announce_on_from(socket, vip, Instant::now(), count, interval).await
}

/// [`announce_on`] with the first round due at `first`. A round that would go out later than
/// [`STALE_ROUND`] after it was due is not sent, nor any after it (logged).
pub async fn announce_on_from(
    socket: &ArpSocket,
    vip: Ipv4Addr,
    first: Instant,
    count: u32,
    interval: Duration,
) -> Result<u32, ArpError> {
    check_unicast(vip)?;
    let ours = socket.mac();
    let frames = [ArpFrame::announcement(ours, vip).emit(), ArpFrame::gratuitous_reply(ours, vip).emit()];
    let mut sent = 0;
    let mut rounds = 0;
    for round in 0..count {
        let due = first + interval * round;
        sleep_until(due).await;
        let now = Instant::now();
        if round_is_stale(due, now) {
            warn!(iface = socket.iface(), %vip, late = ?now.duration_since(due), rounds_left = count - round,
                "gratuitous ARP dropped: its round ran late (this process was stalled), and another node may \
                 hold the address now");
            break;
        }
        for f in &frames {
            socket.send(f).await?;
            sent += 1;
        }
        rounds += 1;
    }
    info!(iface = socket.iface(), %vip, %ours, rounds, "announced address with gratuitous ARP");
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_later_than_the_stale_limit_is_stale() {
        let due = Instant::now();
        assert!(!round_is_stale(due, due));
        assert!(!round_is_stale(due, due + STALE_ROUND));
        assert!(round_is_stale(due, due + STALE_ROUND + Duration::from_millis(1)));
        // A round still ahead (the clock before it is due) is never stale.
        assert!(!round_is_stale(due + Duration::from_secs(1), due));
    }
}
