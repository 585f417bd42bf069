//! The ARP responder: the serving process answers who-has for the VIP itself.
//!
//! ARCHITECTURE.md "Who owns the VIP": the node's kernel is kept from answering for the VIP
//! (see `rules`), so an ARP answer for the VIP exists only while this task runs. When the
//! process dies, or the [`Responder`] is dropped, the address goes quiet at once although
//! it is still configured, and the backup's probe tells the truth. The decisions are
//! [`respond`]'s (RFC 826 replies, RFC 5227 §2.4 conflict detection).

use super::arp::{ArpKind, Mac, ResponderAction, respond};
use super::socket::{ArpError, ArpSocket, Incoming};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, warn};

/// Another node spoke as the VIP (RFC 5227 §2.4): it claims or answers for the address
/// this process serves. Two nodes answering for the VIP is the worst failure there is;
/// the owner decides (alarm, step down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict {
    pub mac: Mac,
    pub kind: ArpKind,
}

/// Counters of a running responder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponderCounts {
    /// Replies sent (requests and probes for the VIP).
    pub answered: u64,
    /// Frames from another node speaking as the VIP.
    pub conflicts: u64,
    /// Frames that were not well-formed Ethernet/IPv4 ARP.
    pub malformed: u64,
    /// Replies the device refused (interface down).
    pub send_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    answered: AtomicU64,
    conflicts: AtomicU64,
    malformed: AtomicU64,
    send_errors: AtomicU64,
}

/// Conflicts kept for the owner; older ones beyond this are only counted.
const CONFLICT_QUEUE: usize = 64;

/// A task answering ARP for the VIP. Dropping it stops the answers at once.
#[derive(Debug)]
pub struct Responder {
    /// `None` once [`Responder::stopped`] has taken it.
    task: Option<JoinHandle<ArpError>>,
    counters: Arc<Counters>,
    conflicts: mpsc::Receiver<Conflict>,
    mac: Mac,
}

impl Responder {
    /// Opens an ARP socket on `iface` (bound before this returns, so no request arriving
    /// afterwards is missed) and starts answering for `vip`. Must run inside a tokio
    /// runtime, in the network namespace of `iface`.
    pub fn spawn(iface: &str, vip: Ipv4Addr) -> Result<Responder, ArpError> {
        Ok(Self::spawn_on(ArpSocket::open(iface)?, vip))
    }

    /// Starts answering for `vip` on an open socket.
    pub fn spawn_on(socket: ArpSocket, vip: Ipv4Addr) -> Responder {
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(CONFLICT_QUEUE);
        let mac = socket.mac();
        let task = tokio::spawn(run(socket, vip, counters.clone(), tx));
        Responder { task: Some(task), counters, conflicts: rx, mac }
    }

    /// The hardware address the responder answers with.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    pub fn counts(&self) -> ResponderCounts {
        let c = &self.counters;
        ResponderCounts {
            answered: c.answered.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            send_errors: c.send_errors.load(Ordering::Relaxed),
        }
    }

    /// The next conflict seen; pending forever while there is none and the task runs,
    /// `None` once the task has ended.
    pub async fn conflict(&mut self) -> Option<Conflict> {
        self.conflicts.recv().await
    }

    /// False once the task has ended (its socket failed: see [`Responder::stopped`]).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits for the task to end by itself and returns why (it only ends on a socket
    /// error). A responder that stops leaves the VIP silent: its owner must treat this as
    /// losing the address.
    pub async fn stopped(mut self) -> ArpError {
        let Some(task) = self.task.take() else { return ArpError::ResponderFailed("already stopped".into()) };
        match task.await {
            Ok(e) => e,
            Err(join) => ArpError::ResponderFailed(join.to_string()),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        // Aborted before its next poll: no answer leaves after this (on a multi-thread
        // runtime, at most the reply of a poll already running on another worker).
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

async fn run(socket: ArpSocket, vip: Ipv4Addr, counters: Arc<Counters>, conflicts: mpsc::Sender<Conflict>) -> ArpError {
    let ours = socket.mac();
    let iface = socket.iface().to_string();
    debug!(iface, %vip, %ours, "ARP responder running");
    loop {
        let frame = match socket.recv().await {
            Ok(Incoming::Arp(f)) => f,
            Ok(Incoming::Malformed(e)) => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                debug!(iface, %vip, error = %e, "ignored malformed ARP frame");
                continue;
            }
            Err(ArpError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::ENETDOWN) => {
                warn!(iface, %vip, "interface went down; still listening");
                continue;
            }
            Err(e) => {
                error!(iface, %vip, error = %e, "ARP responder stopped: the VIP is no longer answered");
                return e;
            }
        };
        match respond(&frame, ours, vip) {
            ResponderAction::Ignore => {}
            ResponderAction::Reply(reply) => match socket.send(&reply.emit()).await {
                Ok(()) => {
                    counters.answered.fetch_add(1, Ordering::Relaxed);
                    debug!(iface, %vip, to = %reply.eth_dst, asked_by = %reply.arp.target_ip, "answered who-has");
                }
                Err(e) => {
                    // A reply lost to a downed device is like one lost on the wire: the asker retries.
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(iface, %vip, error = %e, "ARP reply not sent");
                }
            },
            ResponderAction::Conflict { mac, kind } => {
                counters.conflicts.fetch_add(1, Ordering::Relaxed);
                error!(iface, %vip, %mac, ?kind, "another node speaks as the VIP");
                // Full queue: the owner is not reading; the counter still moves.
                let _ = conflicts.try_send(Conflict { mac, kind });
            }
        }
    }
}
