//! Claiming the VIP for this process (ARCHITECTURE.md "Who owns the VIP"), shared by the primary's start
//! ([`crate::node::run`]) and a backup's takeover (which adds the address, restores its sockets, binds the
//! listener, and only then answers).
//!
//! The steps, in order: [`probe_vip`] (nobody else may answer), [`VipClaim::take_address`] (the arptables
//! rule that keeps the kernel from answering ARP for the VIP, then the address), [`VipClaim::answer`]
//! (this process's ARP responder, then a gratuitous ARP). [`VipClaim::release`] undoes them in reverse:
//! address, responder, rule.
//!
//! RFC 5227 (probing §2.1, announcing §2.3, conflicts §2.4). Kernel behaviour relied on: `ip addr add`
//! sends no gratuitous ARP for IPv4 (hence the announcement); the kernel answers ARP for an address as
//! soon as it is added unless the arptables OUTPUT rule is already there; AF_PACKET frames bypass that
//! rule (see `shared::vip`). The `ip` and `arptables` commands run in the calling thread's network
//! namespace.

use crate::node::NodeError;
use crate::replicate::VipCheck;
use shared::config::format_duration;
use shared::lease::VipProbe;
use shared::vip::addr::{self, AddrChange};
use shared::vip::{ArpError, Conflict, KernelArpSilence, ProbeOutcome, Responder};
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::time::Duration;
use tracing::{Instrument, error, info, warn};

/// What this process did to claim the VIP, undone by [`VipClaim::release`] (or on drop, logged).
#[derive(Debug)]
pub struct VipClaim {
    iface: String,
    vip: Ipv4Addr,
    prefix: u8,
    silence: Option<KernelArpSilence>,
    /// The address is on the interface because of this claim (or was found there and adopted).
    address: bool,
    responder: Option<Responder>,
}

impl VipClaim {
    /// Nothing claimed yet.
    pub fn new(iface: &str, vip: Ipv4Addr, prefix: u8) -> VipClaim {
        VipClaim { iface: iface.to_owned(), vip, prefix, silence: None, address: false, responder: None }
    }

    /// The arptables rule silencing the kernel's ARP for the VIP (once). A backup installs it while it
    /// stands by, so that its takeover only adds the address.
    pub fn silence_kernel(&mut self) -> Result<(), NodeError> {
        if self.silence.is_none() {
            let (vip, iface) = (self.vip, self.iface.clone());
            let silence =
                KernelArpSilence::install(&iface, vip).map_err(|source| NodeError::Silence { vip, iface, source })?;
            self.silence = Some(silence);
        }
        Ok(())
    }

    /// The arptables rule silencing the kernel's ARP for the VIP (unless already there), then `ip addr
    /// add`. After this the address is local (sockets may bind it) but nobody answers ARP for it yet.
    pub fn take_address(&mut self) -> Result<(), NodeError> {
        let (vip, prefix) = (self.vip, self.prefix);
        let iface = self.iface.clone();
        self.silence_kernel()?;
        let change = addr::add(&iface, vip, prefix).map_err(|source| NodeError::AddAddress {
            vip,
            prefix,
            iface: iface.clone(),
            source,
        })?;
        self.address = true;
        if change == AddrChange::Unchanged {
            warn!(%vip, iface, "the VIP was already on the interface (left by an earlier run?); it is removed on exit");
        }
        Ok(())
    }

    /// This process's ARP responder, then one gratuitous ARP. Bind the listener on the VIP before: the
    /// first client that resolves the address should find it listening.
    pub async fn answer(&mut self) -> Result<(), NodeError> {
        let vip = self.vip;
        let iface = self.iface.clone();
        if self.responder.is_none() {
            let responder = Responder::spawn(&iface, vip).map_err(|source| NodeError::Responder {
                vip,
                iface: iface.clone(),
                source,
            })?;
            info!(%vip, iface, mac = %responder.mac(), "ARP responder answering for the VIP");
            self.responder = Some(responder);
        }
        shared::vip::announce(&iface, vip, 1, Duration::ZERO).await.map_err(|source| NodeError::Announce {
            vip,
            iface,
            source,
        })?;
        Ok(())
    }

    /// Stops this process's ARP answers at once: the first step of giving the VIP up to another node
    /// (before the slower address removal, so no client learns this node's MAC again meanwhile).
    /// [`Self::release`] does the rest.
    pub fn stop_answering(&mut self) {
        if let Some(responder) = self.responder.take() {
            let counts = responder.counts();
            drop(responder);
            info!(vip = %self.vip, iface = self.iface, answered = counts.answered, conflicts = counts.conflicts,
                "ARP responder stopped");
        }
    }

    /// Undoes the claim in reverse: address, responder, rule. Every step is tried; the error lists the
    /// ones that failed. Releasing twice does nothing the second time.
    pub fn release(&mut self) -> Result<(), String> {
        let (vip, iface) = (self.vip, self.iface.clone());
        let iface = iface.as_str();
        let mut failed = Vec::new();
        if std::mem::take(&mut self.address) {
            match addr::remove(iface, vip, self.prefix) {
                Ok(AddrChange::Done) => {}
                Ok(AddrChange::Unchanged) => warn!(%vip, iface, "the VIP was already gone from the interface"),
                Err(e) => {
                    error!(%vip, iface, error = %e, "could not remove the VIP");
                    failed.push(format!("removing {vip} from {iface}: {e}"));
                }
            }
        }
        self.stop_answering();
        if let Some(silence) = self.silence.take() {
            match silence.remove() {
                Ok(()) => info!(%vip, iface, "arptables rule removed"),
                Err(e) => {
                    error!(%vip, iface, error = %e, "could not remove the arptables rule");
                    failed.push(format!("removing the arptables rule: {e}"));
                }
            }
        }
        if failed.is_empty() { Ok(()) } else { Err(failed.join("; ")) }
    }

    /// The claimed address.
    pub fn vip(&self) -> Ipv4Addr {
        self.vip
    }

    /// The interface it is claimed on.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Whether this process answers ARP for the VIP now.
    pub fn is_answering(&self) -> bool {
        self.responder.as_ref().is_some_and(Responder::is_running)
    }

    /// The next node that speaks as the VIP; `None` once the responder has ended (the VIP went silent:
    /// see [`Self::responder_stopped`]). Pending forever while nothing answers.
    pub(crate) async fn conflict(&mut self) -> Option<Conflict> {
        match self.responder.as_mut() {
            Some(r) => r.conflict().await,
            None => std::future::pending().await,
        }
    }

    /// Why the responder ended (after [`Self::conflict`] returned `None`); the responder is gone after.
    pub(crate) async fn responder_stopped(&mut self) -> ArpError {
        match self.responder.take() {
            Some(r) => r.stopped().await,
            None => ArpError::ResponderFailed("already stopped".into()),
        }
    }
}

impl Drop for VipClaim {
    fn drop(&mut self) {
        if self.address || self.responder.is_some() || self.silence.is_some() {
            warn!(vip = %self.vip, "releasing the VIP claim on an abnormal exit");
            let _ = self.release();
        }
    }
}

/// RFC 5227 probe of the VIP on `iface` (`probes` probes over `time`); `Err(VipInUse / VipContested /
/// Probe)` unless nobody answered. A probe that cannot be made is an error, never "free".
pub async fn probe_vip(iface: &str, vip: Ipv4Addr, probes: u32, time: Duration) -> Result<(), NodeError> {
    let iface = iface.to_owned();
    info!(%vip, iface, probes, time = %format_duration(time), "probing the VIP: is anyone serving it?");
    let outcome = shared::vip::probe(&iface, vip, probes, time).await.map_err(|source| NodeError::Probe {
        vip,
        iface: iface.clone(),
        source,
    })?;
    match outcome {
        ProbeOutcome::Unanswered { .. } => Ok(()),
        ProbeOutcome::Answered { mac, after, .. } => Err(NodeError::VipInUse { vip, iface, mac, after }),
        ProbeOutcome::Contested { mac, .. } => Err(NodeError::VipContested { vip, iface, mac }),
    }
}

/// The replication sender's check that nobody else serves the VIP: RFC 5227 probes on the client
/// network (`shared::vip::probe`), which ignore this process's own responder (same MAC). Runs in the
/// network namespace of the thread that polls it, and logs in the span it was created in.
#[derive(Debug, Clone)]
pub struct ArpVipCheck {
    iface: String,
    vip: Ipv4Addr,
    probes: u32,
    time: Duration,
    span: tracing::Span,
}

impl ArpVipCheck {
    /// Probes `vip` on `iface` with `probes` probes over `time` (the fencing settings).
    pub fn new(iface: &str, vip: Ipv4Addr, probes: u32, time: Duration) -> ArpVipCheck {
        ArpVipCheck { iface: iface.to_owned(), vip, probes, time, span: tracing::Span::current() }
    }
}

impl VipCheck for ArpVipCheck {
    fn probe(&self) -> Pin<Box<dyn Future<Output = VipProbe> + Send + 'static>> {
        let (iface, vip, probes, time) = (self.iface.clone(), self.vip, self.probes, self.time);
        Box::pin(
            async move { VipProbe::from(&shared::vip::probe(&iface, vip, probes, time).await) }
                .instrument(self.span.clone()),
        )
    }
}
