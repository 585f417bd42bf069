//! The `primary` node: claims the VIP, serves HTTP on it, and answers on the admin and replication
//! addresses. The binary's `main` parses flags and loads the [`NodeConfig`]; [`run`] does the rest, and
//! tests call the same `run`.
//!
//! This build serves **unprotected**: there is no replication sender yet, so the inbound gate is not
//! installed and every connection is counted as unprotected (`no_backup`), as ARCHITECTURE.md "Who owns
//! the VIP" describes for a primary whose backup is gone. The replication address is still bound (a
//! misconfigured address fails at start) and a joining backup gets the real handshake, answered with
//! `Welcome::Refused` and the reason [`REFUSAL_REASON`] (see [`refuse_join`]).
//!
//! Start, in order (each step logged; everything done is undone on any later failure):
//! 1. Bind the admin endpoint and the replication listener (local addresses only: a bad address fails
//!    before the network is touched).
//! 2. Probe the VIP on `iface` (RFC 5227 probes, `shared::vip::probe`). An answer, a contesting prober or
//!    a probe error refuses the start: two nodes answering for the VIP is the worst failure there is.
//! 3. Claim the VIP (ARCHITECTURE.md "Who owns the VIP"): the arptables rule that keeps the kernel from
//!    answering ARP for it, the address, the listener on VIP:port, the ARP responder of this process,
//!    then gratuitous ARP. The listener is bound before the responder answers, so the first client that
//!    resolves the VIP finds it listening.
//! 4. Serve until `shutdown` (or until the responder dies: the VIP has gone silent, which is losing it).
//!
//! Stop: the proxy stops accepting and lets exchanges in progress finish (its drain timeout); then the
//! node waits (as long again, at most) until the closed connections' last bytes and FINs are
//! acknowledged, because the kernel still holds them in send queues and a removed address would strand
//! them ([`unflushed`]); the admin and replication listeners close; and the claim is undone in reverse:
//! address, responder, rule.
//!
//! Kernel behaviour relied on: `ip addr add` sends no gratuitous ARP for IPv4 (hence the announcement);
//! the kernel answers ARP for an address as soon as it is added unless the arptables OUTPUT rule is
//! already there; AF_PACKET frames bypass that rule (see `shared::vip`). The `ip` and `arptables`
//! commands run in the calling thread's network namespace, so a caller that switched namespaces with
//! `setns` must run this on a current-thread runtime in that thread.

use crate::proxy::{
    Backend, ConnectionHooks, ExchangeObserver, ExchangeOutcome, Limits, NoLog, Proxy, ProxyConfig, ProxyError,
    ShutdownSignal, ShutdownTrigger, Unprotected,
};
use bytes::{Bytes, BytesMut};
use shared::admin::{self, AdminState, ConnectionGuard, Direction, Protection, UnprotectedReason};
use shared::codec::{self, CodecError};
use shared::config::{NodeConfig, format_duration, role_name};
use shared::frame::{self, DecodeError, EncodeError, HEADER_LEN, Parsed};
use shared::link::{HANDSHAKE_MAX_FRAME, LinkConfig, LocalIdentity, check_hello};
use shared::protocol::{Handshake, Role, Welcome};
use shared::vip::addr::{self, AddrChange, AddrError};
use shared::vip::rules::RulesError;
use shared::vip::{ArpError, KernelArpSilence, Mac, ProbeOutcome, Responder};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{Instrument, error, info, warn};

/// The epoch a primary starts at. The config has no epoch key: only a takeover raises it, and this build
/// performs none.
pub const INITIAL_EPOCH: u64 = 1;

/// What a joining backup is told. The backup logs it as the primary's reason.
pub const REFUSAL_REASON: &str = "this primary build cannot replicate yet; it serves unprotected";

/// The startup probe listens at least this long: RFC 5227 asks for seconds at boot, a takeover has
/// milliseconds; a start can afford a little more than the fencing budget.
pub const STARTUP_PROBE_TIME: Duration = Duration::from_millis(300);

/// Gratuitous ARP rounds after the first (which is sent before serving), and their spacing: a client
/// that missed the first frame updates its cache from a later one.
pub const ANNOUNCE_REPEATS: u32 = 2;
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(500);

/// Joining backups handled at once on the replication listener; more are closed on accept.
pub const MAX_PENDING_JOINS: usize = 16;

/// Why the primary did not start, or stopped other than by its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The proxy refused its configuration (a limit out of range, the static root, the request log).
    #[error("cannot set up the proxy: {0}")]
    Proxy(#[from] ProxyError),
    /// A listening socket could not be bound (address in use, not local).
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The admin endpoint refused its access settings (a non-loopback address needs a token).
    #[error("admin endpoint: {0}")]
    Admin(#[from] admin::ServeError),
    /// The ARP probe of the VIP could not be made; that is not "nobody answered".
    #[error("cannot probe {vip} on {iface} (refusing to start without knowing who holds it): {source}")]
    Probe {
        vip: Ipv4Addr,
        iface: String,
        #[source]
        source: ArpError,
    },
    /// Another node answered the probe: it serves the VIP.
    #[error(
        "{vip} is already answered for on {iface} by {mac} (after {after:?}): another node serves the VIP; \
         refusing to start as primary"
    )]
    VipInUse { vip: Ipv4Addr, iface: String, mac: Mac, after: Duration },
    /// Another node probed the VIP at the same time: neither may take it without a decision elsewhere.
    #[error("{mac} probed {vip} on {iface} at the same time: another node is claiming the VIP; refusing to start")]
    VipContested { vip: Ipv4Addr, iface: String, mac: Mac },
    /// The arptables rule that keeps the kernel silent for the VIP could not be installed.
    #[error("cannot silence the kernel's ARP replies for {vip} on {iface}: {source}")]
    Silence {
        vip: Ipv4Addr,
        iface: String,
        #[source]
        source: RulesError,
    },
    /// The VIP could not be added to the interface.
    #[error("cannot add {vip}/{prefix} to {iface}: {source}")]
    AddAddress {
        vip: Ipv4Addr,
        prefix: u8,
        iface: String,
        #[source]
        source: AddrError,
    },
    /// The ARP responder could not start.
    #[error("cannot start the ARP responder for {vip} on {iface}: {source}")]
    Responder {
        vip: Ipv4Addr,
        iface: String,
        #[source]
        source: ArpError,
    },
    /// The first gratuitous ARP could not be sent.
    #[error("cannot announce {vip} on {iface}: {source}")]
    Announce {
        vip: Ipv4Addr,
        iface: String,
        #[source]
        source: ArpError,
    },
    /// The ARP responder stopped while serving: the VIP went silent, so the node lost it.
    #[error("the ARP responder for {vip} on {iface} stopped, so the VIP is no longer answered: {source}")]
    ResponderStopped {
        vip: Ipv4Addr,
        iface: String,
        #[source]
        source: ArpError,
    },
    /// The proxy's task ended abnormally (a panic).
    #[error("the HTTP server task failed: {0}")]
    Serving(String),
    /// Undoing the VIP claim left something behind; every step was tried. The text lists what failed.
    #[error("releasing the VIP left state behind: {0}")]
    Release(String),
}

/// Runs the primary until `shutdown` resolves, then drains and releases the VIP. Returns `Ok` after a
/// clean stop; an error means it did not start, or lost the VIP while serving, or could not undo its
/// claim (each logged as it happened). Must run inside a tokio runtime with I/O and time enabled.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), NodeError> {
    let span = tracing::info_span!("node", role = role_name(Role::Primary), epoch = INITIAL_EPOCH);
    run_in_span(config, shutdown).instrument(span).await
}

async fn run_in_span(config: NodeConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), NodeError> {
    info!("starting: {config}");
    info!("serving unprotected: replication not available in this build");
    let vip = config.vip.addr;
    let iface = config.iface.clone();

    let proxy = Proxy::new(proxy_config(&config))?;
    let admin_state = AdminState::new(&config.node, &config.cluster, Role::Primary, INITIAL_EPOCH, Instant::now());
    // The listeners and tasks that outlive startup; the late signal stops them after the proxy drained.
    let (late_trigger, late_signal) = ShutdownTrigger::new();
    let mut side_tasks = Tasks::default();

    // 1. Local listeners first: a wrong address fails before the network is touched.
    if let Some(addr) = config.admin {
        let listener = bind("admin endpoint", addr).await?;
        let serving = admin::serve(listener, admin_state.clone(), None, wait(late_signal.clone()))?;
        side_tasks.spawn(serving.in_current_span());
    }
    let repl_addr = SocketAddr::V4(config.repl_listen);
    let repl = bind("replication listener", repl_addr).await?;
    let local = LocalIdentity::new(&config.cluster, &config.node, Role::Primary, INITIAL_EPOCH);
    info!(addr = %repl_addr, "replication listener bound; joining backups are refused: {REFUSAL_REASON}");
    side_tasks.spawn(
        refuse_joins(repl, local, LinkConfig::default().handshake_timeout, wait(late_signal.clone())).in_current_span(),
    );

    // 2. Nobody else may answer for the VIP.
    probe_vip(&config).await?;

    // 3. Claim it. The guard undoes whatever was done if a later step fails.
    let mut claim = VipClaim::new(&iface, vip, config.vip.prefix);
    let started = claim_vip(&mut claim, config.service_addr().into()).await;
    let listener = match started {
        Ok(listener) => listener,
        Err(e) => {
            error!(error = %e, "start failed; undoing the VIP claim");
            side_tasks.stop(&late_trigger).await;
            return match claim.release() {
                Ok(()) => Err(e),
                Err(left) => Err(NodeError::Release(format!("{left} (after the start failed: {e})"))),
            };
        }
    };
    let reannounce = {
        let iface = iface.clone();
        tokio::spawn(
            async move {
                tokio::time::sleep(ANNOUNCE_INTERVAL).await;
                if let Err(e) = shared::vip::announce(&iface, vip, ANNOUNCE_REPEATS, ANNOUNCE_INTERVAL).await {
                    warn!(%vip, iface, error = %e, "repeated gratuitous ARP failed; the responder still answers");
                }
            }
            .in_current_span(),
        )
    };

    // 4. Serve.
    let hooks = CountingHooks { admin: admin_state.clone(), upstream: config.upstream.is_some() };
    let (trigger, signal) = ShutdownTrigger::new();
    let serving = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.run(listener, hooks, wait(signal)).await }.in_current_span())
    };
    info!(addr = %config.service_addr(), node = %config.node, "serving HTTP on the VIP (unprotected)");
    let outcome = watch(&mut claim, serving, &trigger, shutdown).await;

    // Stop: the exchanges are drained by now. Their last bytes may still sit in the kernel's send
    // queues: keep the VIP (while it is still answered) until the clients acknowledged them. Then close
    // the side listeners and undo the claim.
    reannounce.abort();
    let stats = proxy.stats();
    info!(
        connections = stats.connections_total,
        exchanges = stats.exchanges_total,
        incomplete = stats.exchanges_incomplete,
        "HTTP server stopped"
    );
    if claim.responder.is_some() {
        flush_sockets(config.service_addr(), proxy.limits().drain_timeout).await;
    }
    side_tasks.stop(&late_trigger).await;
    info!("releasing the VIP");
    let released = claim.release();
    match (outcome, released) {
        (Ok(()), Ok(())) => {
            info!("stopped cleanly");
            Ok(())
        }
        (Ok(()), Err(left)) => Err(NodeError::Release(left)),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(left)) => Err(NodeError::Release(format!("{left} (after stopping on an error: {e})"))),
    }
}

/// What ended a wait of [`watch`].
enum Event {
    Shutdown,
    /// The responder saw a conflict, or ended (`None`).
    Conflict(Option<shared::vip::Conflict>),
    Served(Result<(), tokio::task::JoinError>),
}

/// Serves until `shutdown` or until the responder dies; then triggers the proxy's drain and waits for it.
async fn watch(
    claim: &mut VipClaim,
    mut serving: JoinHandle<()>,
    trigger: &ShutdownTrigger,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    tokio::pin!(shutdown);
    let mut drained = false;
    let outcome = loop {
        let event = {
            let responder = claim.responder.as_mut();
            tokio::select! {
                () = &mut shutdown => Event::Shutdown,
                conflict = async {
                    match responder {
                        Some(r) => r.conflict().await,
                        None => std::future::pending().await,
                    }
                } => Event::Conflict(conflict),
                joined = &mut serving => Event::Served(joined),
            }
        };
        match event {
            Event::Shutdown => {
                info!("shutdown requested: no new connections; letting exchanges in progress finish");
                break Ok(());
            }
            Event::Conflict(Some(c)) => {
                // The responder logged it too. This build has no peer to fence with, so it keeps serving
                // and alarms: a node that speaks as the VIP after this one claimed it is misbehaving.
                error!(vip = %claim.vip, mac = %c.mac, kind = ?c.kind, "another node speaks as the VIP");
            }
            Event::Conflict(None) => {
                let source = match claim.responder.take() {
                    Some(r) => r.stopped().await,
                    None => ArpError::ResponderFailed("already stopped".into()),
                };
                let e = NodeError::ResponderStopped { vip: claim.vip, iface: claim.iface.clone(), source };
                error!(error = %e, "lost the VIP; stopping");
                break Err(e);
            }
            Event::Served(joined) => {
                drained = true;
                let e = NodeError::Serving(match joined {
                    Ok(()) => "it returned before shutdown".into(),
                    Err(e) => e.to_string(),
                });
                error!(error = %e, "stopping");
                break Err(e);
            }
        }
    };
    trigger.trigger();
    if !drained && let Err(e) = serving.await {
        error!(error = %e, "the HTTP server task failed while draining");
    }
    outcome
}

fn proxy_config(config: &NodeConfig) -> ProxyConfig {
    let backend = match (&config.upstream, &config.root) {
        (Some(u), _) => Backend::Upstream(
            // `Upstream` is validated as http://HOST:PORT, which is always a valid URI.
            format!("http://{}/", u.authority()).parse().expect("a validated upstream is a URI"),
        ),
        (None, Some(root)) => Backend::Root(root.clone()),
        // NodeConfig::validate refuses a config with neither.
        (None, None) => Backend::Root(".".into()),
    };
    let l = &config.limits;
    ProxyConfig {
        node: config.node.clone(),
        backend,
        request_log: config.request_log.clone(),
        limits: Limits {
            max_header_bytes: l.max_header_bytes,
            max_headers: l.max_headers,
            header_timeout: l.header_read_timeout,
            idle_timeout: l.idle_timeout,
            ..Limits::default()
        },
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr).await.map_err(|source| NodeError::Bind { what, addr, source })
}

async fn wait(mut signal: ShutdownSignal) {
    signal.wait().await
}

async fn probe_vip(config: &NodeConfig) -> Result<(), NodeError> {
    let (vip, iface) = (config.vip.addr, config.iface.clone());
    let probes = config.fencing.arp_probes;
    let time = config.fencing.arp_time().max(STARTUP_PROBE_TIME);
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

/// Rule, address, listener, responder, first announcement. Returns the listener on VIP:port.
async fn claim_vip(claim: &mut VipClaim, service: SocketAddr) -> Result<TcpListener, NodeError> {
    let (vip, iface, prefix) = (claim.vip, claim.iface.clone(), claim.prefix);
    let silence = KernelArpSilence::install(&iface, vip).map_err(|source| NodeError::Silence {
        vip,
        iface: iface.clone(),
        source,
    })?;
    claim.silence = Some(silence);

    let change = addr::add(&iface, vip, prefix).map_err(|source| NodeError::AddAddress {
        vip,
        prefix,
        iface: iface.clone(),
        source,
    })?;
    claim.address = true;
    if change == AddrChange::Unchanged {
        warn!(%vip, iface, "the VIP was already on the interface (left by an earlier run?); it is removed on exit");
    }

    let listener = bind("HTTP service", service).await?;
    info!(addr = %service, "HTTP listener bound on the VIP");

    let responder =
        Responder::spawn(&iface, vip).map_err(|source| NodeError::Responder { vip, iface: iface.clone(), source })?;
    info!(%vip, iface, mac = %responder.mac(), "ARP responder answering for the VIP");
    claim.responder = Some(responder);

    shared::vip::announce(&iface, vip, 1, Duration::ZERO).await.map_err(|source| NodeError::Announce {
        vip,
        iface: iface.clone(),
        source,
    })?;
    Ok(listener)
}

/// Waits (up to `timeout`) until no closed connection on `service` still owes its client bytes or a FIN
/// ([`unflushed`]), so that releasing the VIP does not strand them: once the address is gone, the
/// client's ACKs are no longer delivered to those sockets, and a client whose reply was fully handed to
/// the kernel would wait for bytes that never come.
async fn flush_sockets(service: SocketAddrV4, timeout: Duration) {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let mut first = None;
    loop {
        let owed = match std::fs::read_to_string("/proc/thread-self/net/tcp") {
            Ok(table) => unflushed(&table, service),
            Err(e) => {
                warn!(error = %e, "cannot read /proc/thread-self/net/tcp; releasing the VIP without waiting");
                return;
            }
        };
        if owed == 0 {
            if let Some(n) = first {
                info!(sockets = n, waited = ?started.elapsed(), "closed connections delivered their last bytes");
            }
            return;
        }
        first.get_or_insert(owed);
        if tokio::time::Instant::now() >= deadline {
            warn!(sockets = owed, ?timeout, "closed connections still owe their clients bytes; releasing the VIP");
            return;
        }
        tokio::time::sleep(FLUSH_POLL).await;
    }
}

/// How often [`flush_sockets`] looks at the socket table.
const FLUSH_POLL: Duration = Duration::from_millis(10);

/// Sockets on `local` in a `/proc/net/tcp` table that still owe their peer bytes or a FIN: FIN_WAIT1,
/// CLOSING and LAST_ACK (our FIN not yet acknowledged, data maybe before it), and ESTABLISHED or
/// CLOSE_WAIT with a non-empty send queue. Lines that do not parse are skipped.
///
/// Format (net/ipv4/tcp_ipv4.c, `get_tcp4_sock`): `sl local rem st tx_queue:rx_queue ...`, addresses as
/// `%08X:%04X` of the raw (network order) address read as a native integer and the port in host order;
/// `st` from include/net/tcp_states.h.
pub fn unflushed(table: &str, local: SocketAddrV4) -> usize {
    const ESTABLISHED: u8 = 0x01;
    const FIN_WAIT1: u8 = 0x04;
    const CLOSE_WAIT: u8 = 0x08;
    const LAST_ACK: u8 = 0x09;
    const CLOSING: u8 = 0x0B;
    let parse = |line: &str| -> Option<(SocketAddrV4, u8, u32)> {
        let mut fields = line.split_whitespace().skip(1);
        let (addr, port) = fields.next()?.split_once(':')?;
        fields.next()?;
        let state = u8::from_str_radix(fields.next()?, 16).ok()?;
        let tx_queue = u32::from_str_radix(fields.next()?.split_once(':')?.0, 16).ok()?;
        let ip = Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?.to_ne_bytes());
        Some((SocketAddrV4::new(ip, u16::from_str_radix(port, 16).ok()?), state, tx_queue))
    };
    table
        .lines()
        .skip(1)
        .filter_map(parse)
        .filter(|&(addr, state, tx_queue)| {
            addr == local
                && match state {
                    FIN_WAIT1 | CLOSING | LAST_ACK => true,
                    ESTABLISHED | CLOSE_WAIT => tx_queue > 0,
                    _ => false,
                }
        })
        .count()
}

/// What this process did to claim the VIP, undone by [`VipClaim::release`] (or on drop, logged).
struct VipClaim {
    iface: String,
    vip: Ipv4Addr,
    prefix: u8,
    silence: Option<KernelArpSilence>,
    /// The address is on the interface because of this claim (or was found there and adopted).
    address: bool,
    responder: Option<Responder>,
}

impl VipClaim {
    fn new(iface: &str, vip: Ipv4Addr, prefix: u8) -> Self {
        VipClaim { iface: iface.to_owned(), vip, prefix, silence: None, address: false, responder: None }
    }

    /// Undoes the claim in reverse: address, responder, rule. Every step is tried; the error lists the
    /// ones that failed.
    fn release(&mut self) -> Result<(), String> {
        let (vip, iface) = (self.vip, self.iface.as_str());
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
        if let Some(responder) = self.responder.take() {
            let counts = responder.counts();
            drop(responder);
            info!(%vip, iface, answered = counts.answered, conflicts = counts.conflicts, "ARP responder stopped");
        }
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
}

impl Drop for VipClaim {
    fn drop(&mut self) {
        if self.address || self.responder.is_some() || self.silence.is_some() {
            warn!(vip = %self.vip, "releasing the VIP claim on an abnormal exit");
            let _ = self.release();
        }
    }
}

/// Tasks that run beside the proxy (admin endpoint, replication listener); aborted if dropped.
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }

    /// Signals the tasks to stop and waits for them.
    async fn stop(&mut self, trigger: &ShutdownTrigger) {
        trigger.trigger();
        for task in self.0.drain(..) {
            if let Err(e) = task.await {
                error!(error = %e, "a side task failed");
            }
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------
// Serving unprotected, with the admin counters
// ---------------------------------------------------------------------------------

/// The [`Unprotected`] hooks (no reply log, nothing replicated) plus the admin accounting: each
/// connection is counted open (unprotected, `no_backup`) while it lives, and its exchanges and bytes go
/// into the admin metrics.
struct CountingHooks {
    admin: AdminState,
    /// Whether requests go to an upstream (request bodies are then upstream bytes sent).
    upstream: bool,
}

impl ConnectionHooks for CountingHooks {
    type Log = NoLog;
    type Observer = Counting;

    fn open(&self, peer: SocketAddr, local: SocketAddr) -> (NoLog, Counting) {
        let (log, _) = Unprotected.open(peer, local);
        let guard = self.admin.connection_opened(Protection::Unprotected(UnprotectedReason::NoBackup));
        (log, Counting { admin: self.admin.clone(), upstream: self.upstream, _open: guard })
    }
}

/// Counts one connection's exchanges; the guard counts the connection open until the proxy drops it.
struct Counting {
    admin: AdminState,
    upstream: bool,
    _open: ConnectionGuard,
}

impl ExchangeObserver for Counting {
    fn on_upstream_data(&self, _exchange: u64, _offset: u64, data: &Bytes) {
        self.admin.metrics().upstream_bytes.get(Direction::Received).add(data.len() as u64);
    }

    fn on_exchange_end(&self, outcome: &ExchangeOutcome) {
        let m = self.admin.metrics();
        m.exchanges.inc();
        m.client_bytes.get(Direction::Received).add(outcome.bytes_in);
        m.client_bytes.get(Direction::Sent).add(outcome.bytes_out);
        if self.upstream {
            m.upstream_bytes.get(Direction::Sent).add(outcome.bytes_in);
        }
    }
}

// ---------------------------------------------------------------------------------
// The replication listener: the real handshake, answered with a refusal
// ---------------------------------------------------------------------------------

/// Why a joining node could not be told that it is refused.
#[derive(Debug, thiserror::Error)]
pub enum RefuseError {
    /// The peer did not send its `Hello` in time.
    #[error("no Hello within {0:?}")]
    Timeout(Duration),
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed before sending a whole `Hello`.
    #[error("peer closed the connection before its Hello")]
    Closed,
    /// The peer's bytes are not a valid handshake frame (bad CRC, oversized, undecodable).
    #[error("handshake frame: {0}")]
    Frame(#[from] DecodeError),
    /// The peer sent a `Welcome`: it is not joining.
    #[error("expected a Hello, got a Welcome")]
    NotHello,
    /// The refusal could not be framed.
    #[error("cannot send the refusal: {0}")]
    Encode(#[from] EncodeError),
}

/// A joining node, refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The node name its `Hello` gave.
    pub node: String,
    /// What it was told.
    pub reason: String,
}

/// Primary side of the link handshake (`shared::link`, same frames and codec) for a build that cannot
/// replicate: reads the joining node's `Hello`, decides with [`check_hello`] (a wrong cluster or a newer
/// epoch is reported as such), and otherwise refuses with [`REFUSAL_REASON`]. The refusal is followed by
/// FIN; the peer's further bytes are read and discarded until it closes (for up to `timeout`), so the
/// close does not turn into a reset that could destroy the reason before the peer reads it.
pub async fn refuse_join<S>(mut stream: S, local: &LocalIdentity, timeout: Duration) -> Result<Refused, RefuseError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        let hello = match read_handshake(&mut stream).await? {
            Handshake::Hello(hello) => hello,
            Handshake::Welcome(_) => return Err(RefuseError::NotHello),
        };
        let reason = match check_hello(&hello, local) {
            Err(refusal) => refusal.to_string(),
            Ok(_version) => REFUSAL_REASON.to_owned(),
        };
        let mut buf = BytesMut::new();
        frame::encode_value(
            &Handshake::Welcome(Welcome::Refused { reason: reason.clone() }),
            HANDSHAKE_MAX_FRAME,
            &mut buf,
        )?;
        stream.write_all(&buf).await?;
        stream.flush().await?;
        let _ = stream.shutdown().await;
        Ok(Refused { node: hello.node, reason })
    };
    let refused = tokio::time::timeout(timeout, exchange).await.map_err(|_| RefuseError::Timeout(timeout))??;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(timeout, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(refused)
}

/// Reads exactly one handshake frame (at most [`HANDSHAKE_MAX_FRAME`]).
async fn read_handshake<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Handshake, RefuseError> {
    let mut buf = vec![0; HEADER_LEN];
    let mut have = 0;
    loop {
        let need = match frame::parse(&buf[..have], HANDSHAKE_MAX_FRAME)? {
            Parsed::Frame { payload, .. } => {
                return codec::decode(payload).map_err(|e: CodecError| RefuseError::Frame(DecodeError::Payload(e)));
            }
            Parsed::Incomplete { need } => need,
        };
        // `parse` checked the length against the maximum before this resize.
        buf.resize(need, 0);
        while have < need {
            match stream.read(&mut buf[have..need]).await? {
                0 if have == 0 => return Err(RefuseError::Closed),
                0 => return Err(DecodeError::Truncated { have, need }.into()),
                n => have += n,
            }
        }
    }
}

/// Accepts on the replication listener until `shutdown` and refuses every joining node.
async fn refuse_joins(
    listener: TcpListener,
    local: LocalIdentity,
    timeout: Duration,
    shutdown: impl Future<Output = ()> + Send,
) {
    let local = Arc::new(local);
    let slots = Arc::new(Semaphore::new(MAX_PENDING_JOINS));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        warn!(%peer, limit = MAX_PENDING_JOINS, "replication connection closed: too many joining at once");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let local = Arc::clone(&local);
                    tokio::spawn(
                        async move {
                            refuse_one(stream, peer, &local, timeout).await;
                            drop(slot);
                        }
                        .in_current_span(),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    info!("replication listener closed");
}

async fn refuse_one(stream: TcpStream, peer: SocketAddr, local: &LocalIdentity, timeout: Duration) {
    match refuse_join(stream, local, timeout).await {
        Ok(Refused { node, reason }) => warn!(%peer, peer_node = node, %reason, "refused a joining backup"),
        Err(e) => warn!(%peer, error = %e, "replication connection closed during the handshake"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::link::{HandshakeError, WelcomeError, join};

    fn local() -> LocalIdentity {
        LocalIdentity::new("c1", "primary-a", Role::Primary, INITIAL_EPOCH)
    }

    async fn join_and_refuse(hello_cluster: &str, epoch: u64) -> (Result<(), HandshakeError>, Refused) {
        let (a, b) = tokio::io::duplex(4096);
        let backup = LocalIdentity::new(hello_cluster, "backup-b", Role::Backup, epoch);
        let joining = tokio::spawn(async move { join(a, &backup, &LinkConfig::default()).await.map(drop) });
        let refused = refuse_join(b, &local(), Duration::from_secs(2)).await.expect("the refusal is sent");
        (joining.await.expect("join task"), refused)
    }

    #[tokio::test]
    async fn joining_backup_is_refused_with_the_unprotected_reason() {
        let (joined, refused) = join_and_refuse("c1", INITIAL_EPOCH).await;
        assert_eq!(refused, Refused { node: "backup-b".into(), reason: REFUSAL_REASON.into() });
        match joined {
            Err(HandshakeError::Welcome(WelcomeError::Refused { reason })) => assert_eq!(reason, REFUSAL_REASON),
            other => panic!("join should be refused, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn joining_backup_of_another_cluster_is_told_so() {
        let (joined, refused) = join_and_refuse("other", INITIAL_EPOCH).await;
        assert!(refused.reason.contains("wrong cluster"), "{}", refused.reason);
        assert!(matches!(joined, Err(HandshakeError::Welcome(WelcomeError::Refused { .. }))), "{joined:?}");
    }

    #[tokio::test]
    async fn garbage_on_the_replication_port_ends_without_a_refusal() {
        let (mut a, b) = tokio::io::duplex(4096);
        a.write_all(&[0xff; 16]).await.expect("write garbage");
        let err = refuse_join(b, &local(), Duration::from_secs(2)).await.expect_err("garbage is not a Hello");
        assert!(matches!(err, RefuseError::Frame(DecodeError::Oversized { .. })), "{err}");
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (_a, b) = tokio::io::duplex(4096);
        let err = refuse_join(b, &local(), Duration::from_millis(20)).await.expect_err("no Hello");
        assert!(matches!(err, RefuseError::Timeout(_)), "{err}");
    }

    #[test]
    fn unflushed_counts_sockets_on_the_service_that_owe_bytes_or_a_fin() {
        // 10.0.0.100:80 is "6400000A:0050" on a little-endian host.
        let vip = u32::from_ne_bytes([10, 0, 0, 100]);
        let line = |sl: u32, local: u32, port: u16, st: u8, tx: u32| {
            format!(
                "{sl:4}: {local:08X}:{port:04X} 0100000A:A0B2 {st:02X} {tx:08X}:00000000 01:00000014 00000000 0 0 \
                 0 1 0000000000000000 20 4 30 10 -1"
            )
        };
        let table = [
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode".into(),
            line(0, vip, 80, 0x0A, 0),                               // the listener
            line(1, vip, 80, 0x04, 4096),                            // FIN_WAIT1 with data queued: owes
            line(2, vip, 80, 0x04, 0),                               // FIN_WAIT1, only the FIN: owes
            line(3, vip, 80, 0x01, 0),                               // ESTABLISHED, all acknowledged
            line(4, vip, 80, 0x01, 10),                              // ESTABLISHED with bytes queued: owes
            line(5, vip, 80, 0x05, 0),                               // FIN_WAIT2: our FIN was acknowledged
            line(6, vip, 80, 0x06, 0),                               // TIME_WAIT
            line(7, vip, 80, 0x09, 0),                               // LAST_ACK: owes
            line(8, vip, 8080, 0x04, 1),                             // another port
            line(9, u32::from_ne_bytes([10, 0, 0, 2]), 80, 0x04, 1), // another address
            "garbage".into(),
        ]
        .join("\n");
        assert_eq!(unflushed(&table, SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80)), 4);
        assert_eq!(unflushed("", SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80)), 0);
    }

    #[test]
    fn proxy_config_follows_the_node_config() {
        let config = NodeConfig::from_toml_str(
            Role::Primary,
            "vip = '10.0.0.100/24'\niface = 'eth0'\nrepl_listen = '10.1.0.2:7700'\n\
             upstream = 'http://10.2.0.10:8080'\nnode = 'p1'\n[limits]\nidle_timeout = '5s'\nmax_headers = 50\n",
        )
        .expect("valid config");
        let p = proxy_config(&config);
        assert_eq!(p.node, "p1");
        assert_eq!(p.backend, Backend::Upstream("http://10.2.0.10:8080/".parse().unwrap()));
        assert_eq!(p.limits.idle_timeout, Duration::from_secs(5));
        assert_eq!(p.limits.max_headers, 50);
        assert_eq!(p.limits.header_timeout, config.limits.header_read_timeout);
    }
}
