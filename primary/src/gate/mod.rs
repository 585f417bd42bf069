//! The inbound gate and outbound control (ARCHITECTURE.md, "Inbound gate" and "Outbound control").
//!
//! Every segment addressed to VIP:port, and the primary's own SYN-ACK, FIN and RST from VIP:port, is
//! diverted by iptables into an NFQUEUE ([`rules`]) and read here ([`nfqueue`], [`netlink`]). Each one
//! comes out of [`Gate::start`]'s channel as a [`Diverted`] and stays held in the kernel until the
//! owner answers it: [`Gate::release_upto`] lets it (and everything queued before it) continue into the
//! stack in queue order, [`Gate::drop`] discards it. The owner (the replication sender) releases a
//! segment only after the backup acknowledged it. The gate knows nothing of the replication link.
//!
//! Orphans: what TCP still sends from VIP:port for sockets no process holds any more (closed, or left
//! behind by a process that died: their retransmissions and unsent data) is diverted into a second
//! queue, [`GateConfig::orphan_queue`], on the same netlink socket. The gate accepts those at once,
//! itself, without handing them to the owner: the bytes were committed before they were written, and a
//! clean stop needs closed connections' last bytes to reach their clients. Their FINs and RSTs still go
//! through the first queue like every other control segment. Once the process is dead the orphan queue
//! has no reader either, and the kernel drops what the dead process's sockets still try to send.
//!
//! Fail-closed: the queues are never fail-open and the rules have no `--queue-bypass`, so when this
//! process dies, or stops reading, the kernel drops matching segments instead of accepting them. Its
//! socket closing drops whatever was still queued. A full queue or a full socket buffer drops too; both
//! are counted (kernel: [`KernelQueueStats`], here: [`GateStats::enobufs`]).
//!
//! Kernel behaviour the design depends on (see `nfqueue` and `netlink` for the details):
//! * A batch verdict is processed inside the `sendmsg`: released packets run through the rest of
//!   netfilter and TCP on the caller's thread before [`Gate::release_upto`] returns.
//! * Without `gso`, the kernel segments GSO packets (veth passes the sender's 64 KiB TSO packets through
//!   whole, and real NICs merge with GRO) and finishes partial checksums before queueing, so every
//!   datagram is at most one MTU (64 KiB on loopback) with a valid checksum, unless marked
//!   [`Checksum::Unverified`]. With `gso`, datagrams can be super-packets with unfinished checksums.
//! * Packet ids are per queue instance: they count from 1 (again after a restart or rebind), wrap at
//!   2^32, and skip ids the kernel failed to deliver; a batch verdict compares them wrap-safely.

pub mod netlink;
pub mod nfqueue;
pub mod output_lease;
pub mod rules;

use bytes::Bytes;
use netlink::{Event, MAX_COPY_RANGE, Verdict};
use nfqueue::{QueueError, QueueParams, QueueSocket, RecvBatch};
use rules::{Iptables, Rules, RulesError};
use serde::Serialize;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tcp_replay::Dir;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// How long the kernel may take to answer a queue configuration request.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes copied of each orphan segment: the IPv4 and TCP headers with any options (60 + 60 at most).
/// Nothing reads the payload; the verdict only needs the id.
const ORPHAN_COPY_RANGE: u32 = 120;

/// What the gate diverts and how. Build with [`GateConfig::new`], adjust fields, then
/// [`GateConfig::validate`] (also done by [`Gate::start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateConfig {
    /// The virtual IP clients connect to.
    pub vip: Ipv4Addr,
    /// The TCP port served on the VIP.
    pub port: u16,
    /// Names this node's rules (`understudy:<instance>`): a restart removes rules left by a crashed run
    /// of the same instance. 1-64 of `[A-Za-z0-9._-]`.
    pub instance: String,
    /// NFQUEUE number (per network namespace). Default 0.
    pub queue: u16,
    /// NFQUEUE for the segments from VIP:port of sockets without an open file (orphans: closed by this
    /// process, or left behind when it died), passed at once by the gate while it runs. `None`: not
    /// diverted (a dead process's sockets then keep sending). Only with `outbound_control`. Default 1.
    pub orphan_queue: Option<u16>,
    /// Packets the kernel holds in the queue before it drops new ones (the queue is never fail-open).
    /// Bounds the segments awaiting the backup's ack. Default 16384.
    pub queue_max_len: u32,
    /// Receive buffer of the netlink socket in bytes; when full, the kernel drops packets. Default 16 MiB.
    pub recv_buffer: usize,
    /// Datagrams taken per `recvmmsg` (each slot is 68 KiB). Default 16.
    pub recv_batch: usize,
    /// `NFQA_CFG_F_GSO`: receive GSO packets whole, with unfinished checksums. Default off: the kernel
    /// segments them and finishes checksums, so every datagram is a wire-sized segment.
    pub gso: bool,
    /// Also divert the server's SYN-ACK, FIN and RST from VIP:port (outbound control). Default on.
    pub outbound_control: bool,
    /// The iptables program. Default `iptables`.
    pub iptables: PathBuf,
    /// Install an [`output_lease::OutputLease`] with this time to live: the kernel drops VIP:port output
    /// unless the sender keeps granting it ([`Gate::grant_output`]). Default none.
    pub output_lease: Option<Duration>,
}

impl GateConfig {
    pub fn new(vip: Ipv4Addr, port: u16, instance: impl Into<String>) -> GateConfig {
        GateConfig {
            vip,
            port,
            instance: instance.into(),
            queue: 0,
            orphan_queue: Some(1),
            queue_max_len: 16384,
            recv_buffer: 16 << 20,
            recv_batch: 16,
            gso: false,
            outbound_control: true,
            iptables: PathBuf::from("iptables"),
            output_lease: None,
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), GateError> {
        let bad = |field, reason: &str| Err(GateError::Config { field, reason: reason.to_string() });
        if self.port == 0 {
            return bad("port", "must not be 0");
        }
        if self.vip.is_unspecified() || self.vip.is_broadcast() || self.vip.is_multicast() {
            return bad("vip", "must be a unicast address");
        }
        if self.orphan_queue == Some(self.queue) {
            return bad("orphan_queue", "must differ from queue");
        }
        if self.queue_max_len == 0 {
            return bad("queue_max_len", "must be at least 1");
        }
        if self.recv_buffer < 1 << 16 {
            return bad("recv_buffer", "must be at least 64 KiB");
        }
        if !(1..=1024).contains(&self.recv_batch) {
            return bad("recv_batch", "must be 1..=1024");
        }
        rules::tag(&self.instance)?;
        Ok(())
    }

    /// The orphan queue in use: `orphan_queue` when outbound control is on.
    pub fn orphans(&self) -> Option<u16> {
        self.orphan_queue.filter(|_| self.outbound_control)
    }
}

/// The netfilter hook a packet was queued from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Hook {
    PreRouting,
    LocalIn,
    Forward,
    LocalOut,
    PostRouting,
    Other(u8),
}

impl Hook {
    fn from_raw(hook: u8) -> Hook {
        match hook {
            0 => Hook::PreRouting,
            1 => Hook::LocalIn,
            2 => Hook::Forward,
            3 => Hook::LocalOut,
            4 => Hook::PostRouting,
            h => Hook::Other(h),
        }
    }

    /// The direction of a segment queued at this hook: inbound hooks carry client segments.
    pub fn dir(self) -> Option<Dir> {
        match self {
            Hook::PreRouting | Hook::LocalIn => Some(Dir::ToServer),
            Hook::LocalOut | Hook::PostRouting => Some(Dir::ToClient),
            Hook::Forward | Hook::Other(_) => None,
        }
    }
}

/// What the kernel says about a diverted datagram's TCP checksum (`NFQA_SKB_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Checksum {
    /// Complete, or already verified by the device or the kernel.
    Ok,
    /// Unfinished (`CHECKSUM_PARTIAL`, only with `gso`): the field holds the pseudo-header sum; the
    /// packet itself is fine. Do not verify it.
    Partial,
    /// Nobody verified it yet; TCP will, and drops the segment if it is wrong.
    Unverified,
}

/// A segment held in the kernel until the gate's owner answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diverted {
    /// Packet id within `queue`, for [`Gate::release_upto`] and [`Gate::drop`].
    pub id: u32,
    pub queue: u16,
    /// PreRouting for client segments, LocalOut for the server's SYN-ACK/FIN/RST.
    pub hook: Hook,
    /// The IPv4 datagram (a copy; the kernel keeps the original until the verdict).
    pub datagram: Bytes,
    /// When the gate received it.
    pub at: Instant,
    pub checksum: Checksum,
    /// A GSO super-packet (only with `gso`).
    pub gso: bool,
    /// The real length when `datagram` is a truncated copy (over 65531 bytes, possible on loopback or
    /// with `gso`). Such a datagram cannot be replicated whole.
    pub original_len: Option<u32>,
}

/// Counters since start, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GateStats {
    /// Packets diverted to the gate.
    pub packets: u64,
    /// Bytes of those packets (whole datagrams).
    pub bytes: u64,
    /// Batch release verdicts sent.
    pub batches: u64,
    /// Drop verdicts sent (single and batch).
    pub drops: u64,
    /// Receives that failed with ENOBUFS or found NLMSG_OVERRUN: the kernel dropped packets because the
    /// socket buffer was full.
    pub enobufs: u64,
    /// Verdicts the kernel refused (id no longer queued).
    pub verdict_errors: u64,
    /// Datagrams that did not parse, were cut, or did not come from the kernel.
    pub malformed: u64,
    /// Packets handed over truncated (`original_len` set).
    pub truncated: u64,
    /// Orphan segments the gate accepted itself (never handed over).
    pub orphans: u64,
}

#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
    drops: AtomicU64,
    enobufs: AtomicU64,
    verdict_errors: AtomicU64,
    malformed: AtomicU64,
    truncated: AtomicU64,
    orphans: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> GateStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GateStats {
            packets: g(&self.packets),
            bytes: g(&self.bytes),
            batches: g(&self.batches),
            drops: g(&self.drops),
            enobufs: g(&self.enobufs),
            verdict_errors: g(&self.verdict_errors),
            malformed: g(&self.malformed),
            truncated: g(&self.truncated),
            orphans: g(&self.orphans),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A queue's line in `/proc/net/netfilter/nfnetlink_queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KernelQueueStats {
    pub queue: u16,
    /// Netlink port id of the socket bound to the queue.
    pub portid: u32,
    /// Packets waiting for a verdict now.
    pub queued: u32,
    pub copy_mode: u8,
    pub copy_range: u32,
    /// Packets dropped because the queue was full.
    pub dropped_full: u32,
    /// Packets dropped because the socket buffer was full.
    pub dropped_user: u32,
    /// The last packet id handed out.
    pub id_sequence: u32,
}

impl KernelQueueStats {
    /// Finds `queue` in the text of `/proc/net/netfilter/nfnetlink_queue`.
    pub fn parse(text: &str, queue: u16) -> Option<KernelQueueStats> {
        text.lines().find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|s| s.parse::<u32>().ok());
            let s = KernelQueueStats {
                queue: f.first()?.parse().ok()?,
                portid: n(1)?,
                queued: n(2)?,
                copy_mode: f.get(3)?.parse().ok()?,
                copy_range: n(4)?,
                dropped_full: n(5)?,
                dropped_user: n(6)?,
                id_sequence: n(7)?,
            };
            (s.queue == queue).then_some(s)
        })
    }

    /// Reads `queue`'s line in the calling thread's network namespace; `None` when no socket binds it.
    pub fn read_here(queue: u16) -> io::Result<Option<KernelQueueStats>> {
        match std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue") {
            Ok(text) => Ok(KernelQueueStats::parse(&text, queue)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Why the gate could not start.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// A configuration field is unusable.
    #[error("gate config: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    /// Not called inside a Tokio runtime, or the socket could not be registered with it.
    #[error("the gate must start inside a Tokio runtime with I/O enabled: {0}")]
    Runtime(#[source] io::Error),
    /// Opening, binding or configuring the NFQUEUE socket failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Installing or removing the iptables rules failed.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// The output lease (nftables) could not be installed.
    #[error(transparent)]
    OutputLease(#[from] output_lease::OutputLeaseError),
}

/// Why a verdict could not be given.
#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    /// The queue number is not this gate's.
    #[error("queue {queue} is not this gate's (it owns queue {owned})")]
    UnknownQueue { queue: u16, owned: u16 },
    /// The verdict could not be sent to the kernel.
    #[error("sending a {what} verdict on queue {queue} for id {id} failed: {source}")]
    Send {
        what: &'static str,
        queue: u16,
        id: u32,
        #[source]
        source: io::Error,
    },
}

struct Shared {
    sock: AsyncFd<QueueSocket>,
    queue: u16,
    orphans: Option<u16>,
    counters: Counters,
}

/// A running gate: the bound queues, its rules, and the task that reads them. Dropping it removes the
/// rules (blocking on iptables) and closes the queues, which drops whatever was still held.
pub struct Gate {
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
    rules: Option<Rules>,
    lease: Option<output_lease::OutputLease>,
    proc_stats: Mutex<Option<File>>,
    config: GateConfig,
    unbound: bool,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("config", &self.config).field("stats", &self.stats()).finish()
    }
}

impl Gate {
    /// Binds the queue (and the orphan queue), removes stale rules of this instance, installs the rules,
    /// and starts reading.
    ///
    /// Call inside a Tokio runtime (the socket registers with its reactor and the reader is spawned on
    /// it). Works in the calling thread's network namespace: the socket is created there and iptables
    /// runs there, now and at removal. Blocks while iptables runs (tens of milliseconds).
    ///
    /// The receiver yields every diverted segment in queue order. It closes when the reader fails (logged)
    /// or the gate is dropped; with the receiver dropped, nothing is released any more and the queue
    /// fills up and drops (fail-closed).
    pub fn start(config: GateConfig) -> Result<(Gate, mpsc::Receiver<Diverted>), GateError> {
        config.validate()?;
        let tag = rules::tag(&config.instance)?;
        let ipt = Iptables::here(&config.iptables)?;
        if let Err(e) = tokio::runtime::Handle::try_current() {
            return Err(GateError::Runtime(io::Error::other(e)));
        }
        let sock = QueueSocket::open(config.recv_buffer)?;
        // SAFETY: QueueSocket owns its descriptor for its whole life and always returns that one.
        let sock = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
            .map_err(|e| GateError::Runtime(e.into_parts().1))?;
        let params = QueueParams { max_len: config.queue_max_len, gso: config.gso, copy_range: MAX_COPY_RANGE };
        let mut early = sock.get_ref().bind_queue(config.queue, params, CONFIG_TIMEOUT)?;
        let orphans = config.orphans();
        if let Some(q) = orphans {
            // Whole GSO packets and headers only: nothing is segmented or copied just to be accepted.
            let params = QueueParams { max_len: config.queue_max_len, gso: true, copy_range: ORPHAN_COPY_RANGE };
            early.extend(sock.get_ref().bind_queue(q, params, CONFIG_TIMEOUT)?);
        }
        // Only a process that could bind the queues may clean up: a live owner would have made bind fail.
        // The lease before the queue rules: replacing a table an earlier run left unregisters its hook, and
        // the kernel then flushes every NFQUEUE of the namespace (a segment queued already would be lost).
        let lease = match config.output_lease {
            Some(ttl) => Some(output_lease::OutputLease::install(config.vip, config.port, &config.instance, ttl)?),
            None => None,
        };
        let specs = rules::gate_rules(config.vip, config.port, config.queue, &tag, config.outbound_control, orphans);
        let (rules, stale) = match Rules::install(ipt, &tag, specs) {
            Ok(installed) => installed,
            Err(e) => {
                if let Some(lease) = lease
                    && let Err(removal) = lease.remove()
                {
                    warn!(error = %removal, "removing the output lease after the gate failed to start");
                }
                return Err(e.into());
            }
        };
        if stale > 0 {
            warn!(instance = %config.instance, stale, "removed iptables rules left by an earlier run");
        }
        let proc_stats = File::open("/proc/thread-self/net/netfilter/nfnetlink_queue").ok();
        info!(
            instance = %config.instance, queue = config.queue, orphan_queue = ?orphans,
            portid = sock.get_ref().portid(), vip = %config.vip, port = config.port, gso = config.gso,
            "gate started"
        );
        let shared = Arc::new(Shared { sock, queue: config.queue, orphans, counters: Counters::default() });
        let (tx, rx) = mpsc::channel(config.queue_max_len.clamp(1, 1 << 20) as usize);
        let reader = tokio::spawn(read_loop(shared.clone(), tx, early, config.recv_batch));
        let gate = Gate {
            shared,
            reader,
            rules: Some(rules),
            lease,
            proc_stats: Mutex::new(proc_stats),
            config,
            unbound: false,
        };
        Ok((gate, rx))
    }

    /// Accepts every packet held in `queue` up to and including `id`, in queue order (one batch verdict).
    /// The kernel processes them inside this call.
    pub fn release_upto(&self, queue: u16, id: u32) -> Result<(), VerdictError> {
        self.check_queue(queue)?;
        let r = self.shared.sock.get_ref().verdict_batch(queue, id, Verdict::Accept);
        r.map_err(|source| VerdictError::Send { what: "batch accept", queue, id, source })?;
        bump(&self.shared.counters.batches, 1);
        Ok(())
    }

    /// Drops the one packet `id`.
    pub fn drop(&self, queue: u16, id: u32) -> Result<(), VerdictError> {
        self.check_queue(queue)?;
        let r = self.shared.sock.get_ref().verdict(queue, id, Verdict::Drop);
        r.map_err(|source| VerdictError::Send { what: "drop", queue, id, source })?;
        bump(&self.shared.counters.drops, 1);
        Ok(())
    }

    /// Drops every packet held in `queue` up to and including `id`.
    pub fn drop_upto(&self, queue: u16, id: u32) -> Result<(), VerdictError> {
        self.check_queue(queue)?;
        let r = self.shared.sock.get_ref().verdict_batch(queue, id, Verdict::Drop);
        r.map_err(|source| VerdictError::Send { what: "batch drop", queue, id, source })?;
        bump(&self.shared.counters.drops, 1);
        Ok(())
    }

    fn check_queue(&self, queue: u16) -> Result<(), VerdictError> {
        if queue == self.shared.queue {
            Ok(())
        } else {
            Err(VerdictError::UnknownQueue { queue, owned: self.shared.queue })
        }
    }

    /// The queue this gate reads.
    pub fn queue(&self) -> u16 {
        self.shared.queue
    }

    /// The orphan queue, when bound (the gate answers it itself).
    pub fn orphan_queue(&self) -> Option<u16> {
        self.shared.orphans
    }

    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// Counters since start.
    pub fn stats(&self) -> GateStats {
        self.shared.counters.snapshot()
    }

    /// The kernel's view of the queue (held packets, drops), from the gate's network namespace.
    pub fn kernel_stats(&self) -> io::Result<Option<KernelQueueStats>> {
        let mut guard = self.proc_stats.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = guard.as_mut() else { return Ok(None) };
        let mut text = String::new();
        file.rewind()?;
        file.read_to_string(&mut text)?;
        Ok(KernelQueueStats::parse(&text, self.shared.queue))
    }

    /// The installed rules.
    pub fn rules(&self) -> &[rules::RuleSpec] {
        self.rules.as_ref().map_or(&[], |r| r.specs())
    }

    /// Removes the rules and unbinds the queues (dropping what they still hold), reporting failures.
    /// (Dropping the gate does the same and logs failures instead.)
    pub fn shutdown(mut self) -> Result<(), GateError> {
        let removed = self.rules.take().map_or(Ok(()), Rules::remove);
        if let Some(lease) = self.lease.take()
            && let Err(e) = lease.remove()
        {
            warn!(error = %e, "removing the output lease failed; VIP output stays dropped on this host");
        }
        self.reader.abort();
        let unbound = self.unbind();
        info!(instance = %self.config.instance, queue = self.shared.queue, "gate stopped");
        removed?;
        unbound.map_err(|source| QueueError::Io { call: "send(unbind)", source })?;
        Ok(())
    }

    /// Lets the kernel pass VIP output until `until` (no effect without an output lease).
    pub fn grant_output(&self, until: std::time::Instant) {
        if let Some(lease) = &self.lease {
            lease.grant_until(until);
        }
    }

    /// Lets the kernel pass VIP output until `until`, from now on rather than from the lease's next
    /// renewal (no effect without an output lease).
    pub fn grant_output_now(&self, until: std::time::Instant) -> std::io::Result<()> {
        match &self.lease {
            Some(lease) => lease.grant_now(until),
            None => Ok(()),
        }
    }

    /// Lets the output lease also follow the backup's heartbeat echoes ([`output_lease::OutputLease::follow_echoes`]).
    pub fn follow_echoes(&self, follow: Option<(shared::link::PeerLiveness, std::time::Duration)>) {
        if let Some(lease) = &self.lease {
            lease.follow_echoes(follow);
        }
    }

    /// Revokes the kernel's right to send from the VIP at once (no effect without an output lease).
    pub fn revoke_output(&self) -> std::io::Result<()> {
        match &self.lease {
            Some(lease) => lease.revoke_now(),
            None => Ok(()),
        }
    }

    /// Unbinds both queues (both are tried); the first failure is returned.
    fn unbind(&mut self) -> io::Result<()> {
        self.unbound = true;
        let sock = self.shared.sock.get_ref();
        let main = sock.unbind_queue(self.shared.queue);
        let orphans = self.shared.orphans.map_or(Ok(()), |q| sock.unbind_queue(q));
        main.and(orphans)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        // Rules first: the segments they would divert from now on flow normally instead of meeting a
        // closing queue. Rules' own Drop logs failures. Then unbind at once: the socket itself closes
        // only when the aborted reader task is dropped, and until then the queue number stays taken.
        drop(self.rules.take());
        self.reader.abort();
        if self.unbound {
            return;
        }
        if let Err(e) = self.unbind() {
            warn!(queue = self.shared.queue, error = %e, "gate: unbinding the queues failed");
        }
    }
}

async fn read_loop(shared: Arc<Shared>, tx: mpsc::Sender<Diverted>, early: Vec<Vec<u8>>, slots: usize) {
    let queue = shared.queue;
    let mut out = Vec::with_capacity(slots);
    let mut orphans = None;
    for d in &early {
        handle_datagram(&shared, d, Instant::now(), &mut out, &mut orphans);
    }
    pass_orphans(&shared, &tx, orphans.take());
    if !forward(&tx, &mut out).await {
        return;
    }
    let mut batch = RecvBatch::new(slots);
    let mut overruns = RateLimited::new(Duration::from_secs(1));
    loop {
        let mut guard = match shared.sock.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!(queue, error = %e, "gate reader: waiting for the queue socket failed; stopping");
                return;
            }
        };
        match guard.try_io(|s| s.get_ref().recv_batch(&mut batch)) {
            Err(_would_block) => continue,
            Ok(Ok(_)) => {
                drop(guard);
                let now = Instant::now();
                for d in batch.datagrams() {
                    match d {
                        Ok(d) => handle_datagram(&shared, d, now, &mut out, &mut orphans),
                        Err(e) => {
                            bump(&shared.counters.malformed, 1);
                            warn!(queue, error = %e, "gate reader: unusable datagram");
                        }
                    }
                }
            }
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                bump(&shared.counters.enobufs, 1);
                if let Some(n) = overruns.hit(Instant::now()) {
                    warn!(queue, overruns = n, "gate reader: socket buffer overrun, the kernel dropped packets");
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => {
                error!(queue, error = %e, "gate reader: receive failed; stopping (the queue now drops)");
                return;
            }
        }
        // Before waiting on the owner: orphans never wait for the channel.
        pass_orphans(&shared, &tx, orphans.take());
        if !forward(&tx, &mut out).await {
            return;
        }
    }
}

/// Sends what was parsed; false when the receiver is gone.
async fn forward(tx: &mpsc::Sender<Diverted>, out: &mut Vec<Diverted>) -> bool {
    for d in out.drain(..) {
        if tx.send(d).await.is_err() {
            info!("gate reader: receiver dropped; stopping (the queue now fills and drops)");
            return false;
        }
    }
    true
}

/// Accepts every orphan segment queued up to `last` (one batch verdict), while the owner still takes
/// the gate's segments: an owner that stopped (a step-down) releases nothing, orphans included.
fn pass_orphans(shared: &Shared, tx: &mpsc::Sender<Diverted>, last: Option<u32>) {
    let (Some(queue), Some(id)) = (shared.orphans, last) else { return };
    if tx.is_closed() {
        return;
    }
    if let Err(e) = shared.sock.get_ref().verdict_batch(queue, id, Verdict::Accept) {
        bump(&shared.counters.verdict_errors, 1);
        warn!(queue, id, error = %e, "gate: accepting orphan segments failed; the kernel keeps them queued");
    }
}

/// Parses one datagram: packets of the gate's queue go to `out`; the last orphan id seen is kept in
/// `orphans` for [`pass_orphans`].
fn handle_datagram(shared: &Shared, dgram: &[u8], now: Instant, out: &mut Vec<Diverted>, orphans: &mut Option<u32>) {
    let c = &shared.counters;
    for msg in netlink::messages(dgram) {
        let event = match msg.and_then(|m| netlink::parse_event(&m)) {
            Ok(e) => e,
            Err(e) => {
                bump(&c.malformed, 1);
                warn!(queue = shared.queue, error = %e, "gate reader: malformed netlink message");
                return;
            }
        };
        match event {
            Event::Packet(p) if Some(p.queue) == shared.orphans => {
                bump(&c.orphans, 1);
                *orphans = Some(p.id);
            }
            Event::Packet(p) => {
                if p.queue != shared.queue {
                    bump(&c.malformed, 1);
                    warn!(queue = shared.queue, got = p.queue, id = p.id, "gate reader: packet of another queue");
                    continue;
                }
                bump(&c.packets, 1);
                bump(&c.bytes, p.payload.len() as u64);
                let original_len = p.cap_len.filter(|&l| l as usize > p.payload.len());
                if original_len.is_some() {
                    bump(&c.truncated, 1);
                }
                let checksum = if p.skb_info & netlink::SKB_CSUM_NOT_READY != 0 {
                    Checksum::Partial
                } else if p.skb_info & netlink::SKB_CSUM_NOT_VERIFIED != 0 {
                    Checksum::Unverified
                } else {
                    Checksum::Ok
                };
                out.push(Diverted {
                    id: p.id,
                    queue: p.queue,
                    hook: Hook::from_raw(p.hook),
                    datagram: Bytes::copy_from_slice(p.payload),
                    at: now,
                    checksum,
                    gso: p.skb_info & netlink::SKB_GSO != 0,
                    original_len,
                });
            }
            Event::Error { seq, errno } => {
                bump(&c.verdict_errors, 1);
                let e = io::Error::from_raw_os_error(errno);
                warn!(queue = shared.queue, seq, error = %e, "gate: the kernel refused a request (verdict or unbind)");
            }
            Event::Overrun => {
                bump(&c.enobufs, 1);
                warn!(queue = shared.queue, "gate reader: netlink overrun, the kernel dropped packets");
            }
            Event::Ack { seq } => debug!(queue = shared.queue, seq, "gate: ack"),
            Event::Ignored { kind } => debug!(queue = shared.queue, kind, "gate: ignored netlink message"),
        }
    }
}

/// Counts events and says when to log: at most once per `every`, with the count since the last log.
struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    count: u64,
}

impl RateLimited {
    fn new(every: Duration) -> RateLimited {
        RateLimited { every, last: None, count: 0 }
    }

    fn hit(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_queue_stats_parse_the_proc_line_of_the_queue() {
        let text =
            "    0   1234     3 2 65531     0     7       42  1\n    5 4294963199     0 2 65531     1     0     9  1\n";
        let s = KernelQueueStats::parse(text, 0).unwrap();
        assert_eq!((s.portid, s.queued, s.copy_range, s.dropped_user, s.id_sequence), (1234, 3, 65531, 7, 42));
        assert_eq!(KernelQueueStats::parse(text, 5).map(|s| (s.portid, s.dropped_full)), Some((4294963199, 1)));
        assert_eq!(KernelQueueStats::parse(text, 9), None);
        assert_eq!(KernelQueueStats::parse("garbage\n1 2\n", 1), None);
    }

    #[test]
    fn config_validation_names_the_field() {
        let ok = GateConfig::new(Ipv4Addr::new(10, 0, 0, 100), 80, "n1");
        ok.validate().unwrap();
        type Breaker = fn(&mut GateConfig);
        let cases: [(&str, Breaker); 6] = [
            ("port", |c| c.port = 0),
            ("orphan_queue", |c| c.orphan_queue = Some(c.queue)),
            ("vip", |c| c.vip = Ipv4Addr::UNSPECIFIED),
            ("queue_max_len", |c| c.queue_max_len = 0),
            ("recv_batch", |c| c.recv_batch = 0),
            ("recv_buffer", |c| c.recv_buffer = 10),
        ];
        for (field, f) in cases {
            let mut c = ok.clone();
            f(&mut c);
            assert!(matches!(c.validate(), Err(GateError::Config { field: got, .. }) if got == field), "{field}");
        }
        let mut c = ok.clone();
        c.outbound_control = false;
        assert_eq!(c.orphans(), None, "orphans are part of outbound control");
        assert_eq!(ok.orphans(), Some(1));
        let mut c = ok.clone();
        c.instance = "bad name".into();
        assert!(matches!(c.validate(), Err(GateError::Rules(RulesError::BadInstance { .. }))));
    }

    #[test]
    fn rate_limited_logs_once_per_interval_with_the_count() {
        let mut r = RateLimited::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(r.hit(t), Some(1));
        assert_eq!(r.hit(t + Duration::from_millis(10)), None);
        assert_eq!(r.hit(t + Duration::from_millis(20)), None);
        assert_eq!(r.hit(t + Duration::from_millis(1001)), Some(3));
    }

    #[test]
    fn hooks_map_to_directions() {
        assert_eq!(Hook::from_raw(0).dir(), Some(Dir::ToServer));
        assert_eq!(Hook::from_raw(3).dir(), Some(Dir::ToClient));
        assert_eq!(Hook::from_raw(9), Hook::Other(9));
    }
}
