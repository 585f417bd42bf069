//! The ARP responder: the serving process answers who-has for the VIP itself.
//!
//! ARCHITECTURE.md "Who owns the VIP": the node's kernel is kept from answering for the VIP
//! (see `rules`), so an ARP answer for the VIP exists only while this task runs. When the
//! process dies, or the [`Responder`] is dropped, the address goes quiet at once although
//! it is still configured, and the backup's probe tells the truth. The decisions are
//! [`respond`]'s (RFC 826 replies, RFC 5227 §2.4 conflict detection).
//!
//! The responder runs on its own thread with its own single-threaded runtime, not as a task of the
//! node's runtime: a healthy primary whose workers are busy with client traffic must still answer the
//! backup's fencing probe within milliseconds, or the backup would take over from a live primary.

use super::arp::{ArpKind, Mac, ResponderAction, respond};
use super::socket::{ArpError, ArpSocket, Incoming};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};
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

/// A thread answering ARP for the VIP. Dropping it stops the answers.
#[derive(Debug)]
pub struct Responder {
    /// Dropped (or sent) to stop the thread; `None` once stopping.
    stop: Option<oneshot::Sender<()>>,
    /// Why the thread ended by itself; `None` once [`Responder::stopped`] has taken it.
    ended: Option<oneshot::Receiver<ArpError>>,
    counters: Arc<Counters>,
    conflicts: mpsc::Receiver<Conflict>,
    mac: Mac,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    /// Opens an ARP socket on `iface` (bound before this returns, so no request arriving
    /// afterwards is missed) and starts answering for `vip` on a dedicated thread, which inherits
    /// the calling thread's network namespace (it must be that of `iface`).
    pub fn spawn(iface: &str, vip: Ipv4Addr) -> Result<Responder, ArpError> {
        let counters = Arc::new(Counters::default());
        let (conflict_tx, conflicts) = mpsc::channel(CONFLICT_QUEUE);
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (ended_tx, ended) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (iface, thread_counters) = (iface.to_string(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("arp-responder".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(ArpError::ResponderFailed(format!("runtime: {e}"))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    // Opened here so that the socket is polled by this thread's reactor.
                    let socket = match ArpSocket::open(&iface) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(socket.mac()));
                    tokio::select! {
                        _ = stop_rx => {}
                        e = run(socket, vip, thread_counters, conflict_tx) => {
                            let _ = ended_tx.send(e);
                        }
                    }
                });
            })
            .map_err(|e| ArpError::ResponderFailed(format!("thread: {e}")))?;
        let mac = ready_rx.recv().map_err(|_| ArpError::ResponderFailed("thread ended at start".into()))??;
        Ok(Responder { stop: Some(stop), ended: Some(ended), counters, conflicts, mac, thread: Some(thread) })
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

    /// The next conflict seen; pending forever while there is none and the thread runs,
    /// `None` once it has ended.
    pub async fn conflict(&mut self) -> Option<Conflict> {
        self.conflicts.recv().await
    }

    /// False once the thread has ended (its socket failed: see [`Responder::stopped`]).
    pub fn is_running(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| !s.is_closed())
    }

    /// Waits for the thread to end by itself and returns why (it only ends on a socket
    /// error). A responder that stops leaves the VIP silent: its owner must treat this as
    /// losing the address.
    pub async fn stopped(mut self) -> ArpError {
        let Some(ended) = self.ended.take() else { return ArpError::ResponderFailed("already stopped".into()) };
        ended.await.unwrap_or_else(|_| ArpError::ResponderFailed("the responder thread ended".into()))
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        // The thread's select ends at its next wakeup: at most a reply already being sent leaves. Wait for
        // it, so that nothing answers for the VIP once the responder is gone (its socket closes with it).
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the ARP responder thread panicked");
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
