//! The `primary` node: claims the VIP, serves HTTP on it, and replicates every client connection to a
//! backup that joins on the replication address. The binary's `main` parses flags and loads the
//! [`NodeConfig`]; [`run`] does the rest, and tests call the same `run`. A backup that took over serves
//! through the same loop ([`serve_after_takeover`]).
//!
//! Start ([`run`], in order, each step logged; everything done is undone on any later failure):
//! 1. Bind the admin endpoint and the replication listener (local addresses only: a bad address fails
//!    before the network is touched).
//! 2. Probe the VIP on `iface` ([`probe_vip`], RFC 5227). An answer, a contesting prober or a probe error
//!    refuses the start: two nodes answering for the VIP is the worst failure there is.
//!    Then clear what an earlier run on this host left for the VIP ([`leftovers::clear`]).
//! 3. Start the gate ([`Gate::start`]: NFQUEUE rules for VIP:port, fail-closed, tagged with the node
//!    name so that a restart removes the rules a crashed or stepped-down run left).
//! 4. Claim the VIP ([`VipClaim`]): the arptables rule and the address, the listener on VIP:port, then
//!    this process's ARP responder and a gratuitous ARP, so the first client that resolves the VIP
//!    finds it listening.
//! 5. Serve: the replication sender ([`Replicator`]) starts at [`INITIAL_EPOCH`] with an empty table,
//!    reads the gate and accepts one backup at a time on the replication listener; the proxy's reply log
//!    and observer are the sender's ([`NodeHooks`]). Until a backup joins, and after it is lost, nothing
//!    waits for it (unprotected, `/status` peer `none`); once one has acknowledged its snapshot, nothing
//!    reaches a client before the backup holds it (`connected`).
//!
//! Backup loss and step-down (ARCHITECTURE.md "Who owns the VIP", the lease in `replicate`): when the
//! backup's acks stop, the sender probes the VIP ([`ArpVipCheck`]). Nobody answers: it drops the backup
//! and serves unprotected. Another node answers, or a later epoch shows up: the sender stops releasing
//! anything, and this node steps down — the ARP responder stops and the address goes at once, the
//! gate's rules stay (its queue, no longer read, drops what the kernel still tries to send: no FIN, no
//! RST), and [`run`] returns [`NodeError::SteppedDown`].
//!
//! Stop (the shutdown signal): the proxy stops accepting and lets exchanges in progress finish (its
//! drain timeout; restored connections of a takeover drain with them); then the node waits (as long
//! again, at most) until the closed connections' last bytes and FINs are acknowledged, because the
//! kernel still holds them in send queues and a removed address would strand them ([`unflushed`]) —
//! the sender and the gate keep running meanwhile, since those FINs and the clients' ACKs pass the gate;
//! then the sender stops (the backup's link closes), the gate's rules are removed, and the claim is
//! undone: address, responder, rule.
//!
//! The `ip`, `arptables` and `iptables` commands, the ARP sockets and the NFQUEUE socket act in the
//! calling thread's network namespace, so a caller that switched namespaces with `setns` must run this
//! on a current-thread runtime in that thread.

pub use crate::claim::{ArpVipCheck, VipClaim, probe_vip};

use crate::gate::{Gate, GateConfig, GateError};
use crate::leftovers::{self, LeftoverError};
use crate::proxy::{
    Backend, ConnectionHooks, ExchangeInfo, ExchangeObserver, ExchangeOutcome, Limits, Proxy, ProxyConfig, ProxyError,
    ShutdownSignal, ShutdownTrigger,
};
use crate::replicate::{
    GateFeed, ReplicaHooks, ReplicaLog, ReplicaObserver, Replicator, ReplyRefused, SenderConfig, SenderStatus,
    StartError,
};
use bytes::Bytes;
use shared::admin::{self, AdminState, Direction, SwitchoverReply};
use shared::config::{NodeConfig, role_name};
use shared::lease::StepDownReason;
use shared::protocol::Role;
use shared::replica::ReplicaTable;
use shared::vip::addr::AddrError;
use shared::vip::rules::RulesError;
use shared::vip::{ArpError, ArpKind, Mac};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};
use tracing::{Instrument, error, info, warn};

/// The epoch a primary starts at. The config has no epoch key: only a takeover raises it (the backup
/// serves at its replica's epoch + 1, [`serve_after_takeover`]).
pub const INITIAL_EPOCH: u64 = 1;

/// The startup probe listens at least this long: RFC 5227 asks for seconds at boot, a takeover has
/// milliseconds; a start can afford a little more than the fencing budget.
pub const STARTUP_PROBE_TIME: Duration = Duration::from_millis(300);

/// Gratuitous ARP rounds after the first (which is sent before serving), and their spacing: a client
/// that missed the first frame updates its cache from a later one.
pub const ANNOUNCE_REPEATS: u32 = 2;
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(500);

/// Why the primary did not start, or stopped other than by its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The proxy refused its configuration (a limit out of range, the static root, the request log).
    #[error("cannot set up the proxy: {0}")]
    Proxy(#[from] ProxyError),
    /// The replication key named by the configuration cannot be used.
    #[error("replication key: {0}")]
    Key(shared::config::ConfigError),
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
    /// What an earlier run left on this host could not be cleared.
    #[error("cannot clear what an earlier run left on this host: {0}")]
    Leftovers(#[from] LeftoverError),
    /// The gate (NFQUEUE socket and iptables rules) could not start.
    #[error("cannot start the inbound gate: {0}")]
    Gate(#[from] GateError),
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
    /// The replication sender refused its settings (lease, link tuning).
    #[error("cannot start the replication sender: {0}")]
    Replication(#[from] StartError),
    /// The replication sender's task ended while serving (a panic): nothing could reach clients any more.
    #[error("the replication sender stopped while serving: {0}")]
    SenderStopped(String),
    /// The ARP responder stopped while serving: the VIP went silent, so the node lost it.
    #[error("the ARP responder for {vip} on {iface} stopped, so the VIP is no longer answered: {source}")]
    ResponderStopped {
        vip: Ipv4Addr,
        iface: String,
        #[source]
        source: ArpError,
    },
    /// Another node serves the VIP, or a later epoch exists: this node stopped answering for the VIP,
    /// removed it, and sent nothing more for its connections (the gate's rules were left in place).
    #[error("stepped down: {}; the VIP was given up and nothing more was sent for its connections", describe(.reason))]
    SteppedDown { reason: StepDownReason },
    /// The proxy's task ended abnormally (a panic).
    #[error("the HTTP server task failed: {0}")]
    Serving(String),
    /// Not a failure: a planned switchover handed every connection to the backup, which now serves the
    /// VIP; this node is to rejoin it as the spare at `join` (the binaries restart as `backup --join`).
    #[error("handed over to the backup (planned switchover); rejoin it as the spare at {join}")]
    HandedOver { join: SocketAddr },
    /// A planned switchover stopped this node but the backup did not confirm; it takes over by failover.
    #[error("planned switchover not confirmed ({0}); this node gave up the VIP and the backup takes over by failover")]
    HandoverFailed(crate::replicate::HandoverError),
    /// Undoing the VIP claim or removing the gate's rules left something behind; every step was tried.
    /// The text lists what failed.
    #[error("releasing the VIP left state behind: {0}")]
    Release(String),
}

/// Why a node stepped down, in words.
fn describe(reason: &StepDownReason) -> String {
    match reason {
        StepDownReason::Answered { mac } => format!("another node ({mac}) answers for the VIP"),
        StepDownReason::HigherEpoch { ours, seen } => {
            format!("a node has seen epoch {seen}, later than this node's {ours} (a takeover happened)")
        }
    }
}

/// What a backup that took over hands to the serving loop ([`serve_after_takeover`]).
pub struct TakenOver {
    /// The new epoch (the replica's + 1).
    pub epoch: u64,
    /// The backup's replica table (its epoch is below `epoch`).
    pub table: ReplicaTable,
    /// The backup's admin state (it keeps its failover records); set to role primary at `epoch` here.
    pub admin: AdminState,
    /// Address taken and responder answering.
    pub claim: VipClaim,
    /// Bound on VIP:port after the restore.
    pub listener: TcpListener,
    /// Started by the caller before it released its hold.
    pub gate: GateFeed,
    /// The backup's `--repl-listen` socket, for a spare to join later.
    pub repl_listener: TcpListener,
}

/// The serving loop's handles, given to the `restored` callback of [`serve_after_takeover`] once the
/// replicator runs.
pub struct Serving {
    pub proxy: Proxy,
    /// The hooks the node's proxy uses: open one per restored connection.
    pub hooks: NodeHooks,
    /// Fires when the node stops: finish the exchange in progress and close.
    pub shutdown: ShutdownSignal,
}

/// Runs the primary until `shutdown` resolves, then drains and releases the VIP. Returns `Ok` after a
/// clean stop; an error means it did not start, stepped down, lost the VIP while serving, or could not
/// undo its claim (each logged as it happened). Must run inside a tokio runtime with I/O and time enabled.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), NodeError> {
    let span = tracing::info_span!("node", role = role_name(Role::Primary), epoch = INITIAL_EPOCH);
    run_in_span(config, shutdown).instrument(span).await
}

async fn run_in_span(mut config: NodeConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), NodeError> {
    info!("starting: {config}");
    prepare_link_auth(&mut config).map_err(NodeError::Key)?;
    let vip = config.vip.addr;
    let proxy = Proxy::new(proxy_config(&config))?;
    let admin_state = AdminState::new(&config.node, &config.cluster, Role::Primary, INITIAL_EPOCH, Instant::now());
    // The admin endpoint outlives the serving loop; the late signal stops it at the very end.
    let (late_trigger, late_signal) = ShutdownTrigger::new();
    let mut side_tasks = Tasks::default();

    // 1. Local listeners first: a wrong address fails before the network is touched.
    if let Some(addr) = config.admin {
        let listener = bind("admin endpoint", addr).await?;
        let serving =
            admin::serve(listener, admin_state.clone(), config.admin_token.as_deref(), wait(late_signal.clone()))?;
        side_tasks.spawn(serving.in_current_span());
    }
    let repl_addr = SocketAddr::V4(config.repl_listen);
    let repl_listener = bind("replication listener", repl_addr).await?;
    info!(addr = %repl_addr, "replication listener bound; a backup may join once the VIP is claimed");

    // 2. Nobody else may answer for the VIP.
    let probe_time = config.fencing.arp_time().max(STARTUP_PROBE_TIME);
    probe_vip(&config.iface, vip, config.fencing.arp_probes, probe_time).await?;
    // An earlier run's orphaned sockets and address go before this run's gate and claim.
    leftovers::clear(&config.iface, vip, config.vip.prefix, config.port, &config.node)?;

    // 3. The gate, before the address exists: no VIP segment ever reaches the kernel ungated.
    let (gate, diverted) = Gate::start(gate_config(&config))?;
    let gate = GateFeed::new(Arc::new(gate), diverted);

    // 4. Claim the VIP. Whatever was done is undone if a later step fails.
    let mut claim = VipClaim::new(&config.iface, vip, config.vip.prefix);
    let listener = match claim_vip(&mut claim, config.service_addr().into()).await {
        Ok(listener) => listener,
        Err(e) => {
            error!(error = %e, "start failed; undoing the VIP claim");
            side_tasks.stop(&late_trigger).await;
            return Err(abandon(&mut claim, gate.gate, e));
        }
    };

    // 5. Serve.
    let taken = TakenOver {
        epoch: INITIAL_EPOCH,
        table: ReplicaTable::new(),
        admin: admin_state,
        claim,
        listener,
        gate,
        repl_listener,
    };
    let outcome = serve(&config, proxy, taken, |_| Vec::new(), shutdown).await;
    side_tasks.stop(&late_trigger).await;
    outcome
}

/// Reads the replication key if the configuration names one that is not loaded yet ([`NodeConfig::load`]
/// loads it; a configuration built otherwise may not have), and warns when the link runs unauthenticated.
pub fn prepare_link_auth(config: &mut NodeConfig) -> Result<(), shared::config::ConfigError> {
    if config.psk.is_none() && config.replication.psk_file.is_some() {
        config.load_psk()?;
    }
    match &config.replication.psk_file {
        Some(path) => {
            info!(psk_file = %path.display(), "the replication link is authenticated with the pre-shared key")
        }
        None => warn!(
            "the replication link is NOT authenticated (--insecure-replication): anyone who reaches the \
             replication port can join as the spare or alter the stream; give both nodes --psk-file"
        ),
    }
    Ok(())
}

/// Serves as primary after a takeover: starts the replicator with the taken-over table, calls
/// `restored(&serving)`, which returns the tasks serving the restored connections (they are drained with
/// the proxy's connections on stop), then serves and stops exactly like [`run`]. The caller keeps its own
/// admin endpoint running; `restored` records the takeover, which sets `taken.admin`'s role to primary.
pub async fn serve_after_takeover(
    config: NodeConfig,
    taken: TakenOver,
    restored: impl FnOnce(&Serving) -> Vec<JoinHandle<()>> + Send,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let span = tracing::info_span!("node", role = role_name(Role::Primary), epoch = taken.epoch);
    async move {
        let proxy = match Proxy::new(proxy_config(&config)) {
            Ok(proxy) => proxy,
            Err(e) => {
                let e = NodeError::Proxy(e);
                error!(error = %e, "cannot serve after the takeover; giving up the VIP");
                let TakenOver { mut claim, gate, .. } = taken;
                return Err(abandon(&mut claim, gate.gate, e));
            }
        };
        info!(connections = taken.table.len(), "serving as primary after a takeover");
        serve(&config, proxy, taken, restored, shutdown).await
    }
    .instrument(span)
    .await
}

/// Rule, address, listener, responder, first announcement. Returns the listener on VIP:port.
async fn claim_vip(claim: &mut VipClaim, service: SocketAddr) -> Result<TcpListener, NodeError> {
    claim.take_address()?;
    let listener = bind("HTTP service", service).await?;
    info!(addr = %service, "HTTP listener bound on the VIP");
    claim.answer().await?;
    Ok(listener)
}

/// The gate of a node: VIP:port, rules tagged with the node's name (so the next start of the same node
/// removes rules a crash or a step-down left), queue `queues.inbound` for both directions (one ordered
/// stream), `queues.outbound` for the segments of closed sockets (passed while this process lives,
/// dropped once it died).
pub fn gate_config(config: &NodeConfig) -> GateConfig {
    let mut g = GateConfig::new(config.vip.addr, config.port, config.node.clone());
    g.queue = config.queues.inbound;
    g.orphan_queue = Some(config.queues.outbound);
    // A frozen node's kernel stops sending within the detection time: before the backup can even fence.
    g.output_lease = Some(config.detection.detection_time());
    g
}

/// Undoes a claim and the gate after a failed start; the error says what was left behind, if anything.
fn abandon(claim: &mut VipClaim, gate: Arc<Gate>, e: NodeError) -> NodeError {
    let mut left = Vec::new();
    stop_gate(gate, &mut left);
    if let Err(l) = claim.release() {
        left.push(l);
    }
    if left.is_empty() { e } else { NodeError::Release(format!("{} (after: {e})", left.join("; "))) }
}

/// Removes the gate's rules and unbinds its queue (the sender, its other holder, has stopped).
fn stop_gate(gate: Arc<Gate>, left: &mut Vec<String>) {
    match Arc::try_unwrap(gate) {
        Ok(gate) => {
            if let Err(e) = gate.shutdown() {
                error!(error = %e, "removing the gate's rules failed");
                left.push(format!("removing the gate's rules: {e}"));
            }
        }
        // Dropping the last handle does the same and logs failures.
        Err(shared) => {
            warn!("the gate is still in use elsewhere; its rules go when the last handle does");
            drop(shared);
        }
    }
}

/// How the serving loop ended.
enum Stopping {
    /// The shutdown signal.
    Requested,
    /// Lost the VIP or a task: stop like on shutdown, then report this.
    Failed(NodeError),
    /// Another node serves the VIP: give it up at once and send nothing more.
    SteppedDown(StepDownReason),
    /// A planned switchover is under way (nothing is committed any more): give the VIP up, hand over.
    HandingOver(SwitchoverReply),
}

/// The serving loop shared by [`run`] and [`serve_after_takeover`]: the sender, the joins, the proxy;
/// then the stop.
async fn serve(
    config: &NodeConfig,
    proxy: Proxy,
    taken: TakenOver,
    restored: impl FnOnce(&Serving) -> Vec<JoinHandle<()>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let TakenOver { epoch, table, admin, mut claim, listener, gate, repl_listener } = taken;
    proxy.report_to(&admin);
    let gate_handle = gate.gate.clone();
    let check = ArpVipCheck::new(&config.iface, claim.vip(), config.fencing.arp_probes, config.fencing.arp_time());
    let started =
        Replicator::start(SenderConfig::from_node(config, epoch), table, Some(gate), admin.clone(), Arc::new(check));
    let (replicator, sender_task) = match started {
        Ok(started) => started,
        Err(e) => {
            let e = NodeError::Replication(e);
            error!(error = %e, "start failed; undoing the VIP claim");
            return Err(abandon(&mut claim, gate_handle, e));
        }
    };
    let repl_addr = repl_listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
    let joins = replicator.serve_joins(repl_listener);

    let hooks = NodeHooks { replica: replicator.hooks(), admin: admin.clone(), upstream: config.upstream.is_some() };
    let (trigger, signal) = ShutdownTrigger::new();
    let resumed = restored(&Serving { proxy: proxy.clone(), hooks: hooks.clone(), shutdown: signal.clone() });
    let serving = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.run(listener, hooks, wait(signal)).await }.in_current_span())
    };
    let reannounce = {
        let (iface, vip) = (config.iface.clone(), claim.vip());
        tokio::spawn(
            async move {
                // Due rounds, not a sleep then rounds: a round whose time passed while this process was
                // stalled is dropped (a successor may hold the VIP by now; it would give way to it).
                let first = tokio::time::Instant::now() + ANNOUNCE_INTERVAL;
                if let Err(e) =
                    shared::vip::announce_from(&iface, vip, first, ANNOUNCE_REPEATS, ANNOUNCE_INTERVAL).await
                {
                    warn!(%vip, iface, error = %e, "repeated gratuitous ARP failed; the responder still answers");
                }
            }
            .in_current_span(),
        )
    };
    info!(
        addr = %config.service_addr(), node = %config.node, replication = %repl_addr, restored = resumed.len(),
        "serving HTTP on the VIP (unprotected until a backup joins)"
    );

    let mut handles = Handles { serving, served: false, sender_task, sender_done: false, resumed, joins };
    let (switchover_tx, mut switchovers) = tokio::sync::mpsc::unbounded_channel();
    admin.set_switchover(Some(switchover_tx));
    let stopping =
        watch_serving(&mut claim, &mut handles, replicator.status(), &replicator, &mut switchovers, shutdown).await;
    admin.set_switchover(None);
    // Requests that came too late are told so.
    while let Ok(reply) = switchovers.try_recv() {
        let _ = reply.send((409, serde_json::json!({ "error": "this node is stopping" })));
    }
    // No more announcements whatever happens next: a node stepping down must not speak as the VIP.
    reannounce.abort();

    match stopping {
        Stopping::SteppedDown(reason) => Err(step_down(reason, &mut claim, handles, &replicator, gate_handle).await),
        Stopping::HandingOver(reply) => Err(hand_over(reply, &mut claim, handles, &replicator, gate_handle).await),
        Stopping::Requested => {
            stop(config, &proxy, &trigger, &mut claim, handles, &replicator, gate_handle, None).await
        }
        Stopping::Failed(e) => {
            stop(config, &proxy, &trigger, &mut claim, handles, &replicator, gate_handle, Some(e)).await
        }
    }
}

/// The tasks of the serving loop.
struct Handles {
    serving: JoinHandle<()>,
    /// `serving` has been awaited.
    served: bool,
    sender_task: JoinHandle<()>,
    /// `sender_task` has been awaited.
    sender_done: bool,
    resumed: Vec<JoinHandle<()>>,
    joins: JoinHandle<()>,
}

/// What ended a wait of [`watch_serving`].
enum Event {
    Shutdown,
    /// The responder saw a conflict, or ended (`None`).
    Conflict(Option<shared::vip::Conflict>),
    Served(Result<(), JoinError>),
    SenderEnded(Result<(), JoinError>),
    SteppedDown(StepDownReason),
    Switchover(SwitchoverReply),
}

/// Serves until `shutdown`, a step-down, or the loss of the responder, the proxy or the sender.
async fn watch_serving(
    claim: &mut VipClaim,
    h: &mut Handles,
    mut status: watch::Receiver<SenderStatus>,
    replicator: &Replicator,
    switchovers: &mut tokio::sync::mpsc::UnboundedReceiver<SwitchoverReply>,
    shutdown: impl Future<Output = ()>,
) -> Stopping {
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            () = &mut shutdown => Event::Shutdown,
            conflict = claim.conflict() => Event::Conflict(conflict),
            joined = &mut h.serving => Event::Served(joined),
            joined = &mut h.sender_task, if !h.sender_done => Event::SenderEnded(joined),
            reason = stepped_down(&mut status) => Event::SteppedDown(reason),
            Some(reply) = switchovers.recv() => Event::Switchover(reply),
        };
        match event {
            Event::Shutdown => {
                info!("shutdown requested: no new connections; letting exchanges in progress finish");
                return Stopping::Requested;
            }
            Event::Conflict(Some(c)) if matches!(c.kind, ArpKind::Announcement | ArpKind::GratuitousReply) => {
                // Only a claim announces the address, and a backup claims only after its fence found this
                // node silent: it took over (this node was stalled past the fence), and it serves the
                // connections at a later epoch. Two nodes must not serve the VIP: this one gives way.
                error!(vip = %claim.vip(), mac = %c.mac, kind = ?c.kind,
                    "another node announced the VIP: it took over while this node was stalled");
                return Stopping::SteppedDown(StepDownReason::Answered { mac: c.mac });
            }
            Event::Conflict(Some(c)) => {
                // The responder logged it too. Who serves is the lease's decision (the sender probes when
                // the backup's acks stop); until then this is an alarm.
                error!(vip = %claim.vip(), mac = %c.mac, kind = ?c.kind, "another node speaks as the VIP");
            }
            Event::Conflict(None) => {
                let source = claim.responder_stopped().await;
                let e = NodeError::ResponderStopped { vip: claim.vip(), iface: claim.iface().to_owned(), source };
                error!(error = %e, "lost the VIP; stopping");
                return Stopping::Failed(e);
            }
            Event::Served(joined) => {
                h.served = true;
                let e = NodeError::Serving(match joined {
                    Ok(()) => "it returned before shutdown".into(),
                    Err(e) => e.to_string(),
                });
                error!(error = %e, "stopping");
                return Stopping::Failed(e);
            }
            Event::SenderEnded(joined) => {
                h.sender_done = true;
                let e = NodeError::SenderStopped(match joined {
                    Ok(()) => "its task returned".into(),
                    Err(e) => e.to_string(),
                });
                error!(error = %e, "stopping");
                return Stopping::Failed(e);
            }
            Event::SteppedDown(reason) => return Stopping::SteppedDown(reason),
            Event::Switchover(reply) => {
                info!("planned switchover requested");
                match replicator.freeze_for_handover().await {
                    Ok(()) => return Stopping::HandingOver(reply),
                    Err(e) => {
                        warn!(error = %e, "planned switchover refused; serving on");
                        let status = if e.refused() { 409 } else { 500 };
                        let _ = reply.send((status, serde_json::json!({ "error": e.to_string() })));
                    }
                }
            }
        }
    }
}

/// Resolves when the sender reports that it stepped down; never if it is gone (its task's end is
/// watched on its own).
async fn stepped_down(status: &mut watch::Receiver<SenderStatus>) -> StepDownReason {
    let seen = status.wait_for(|s| s.stepped_down.is_some()).await.ok().and_then(|s| s.stepped_down);
    match seen {
        Some(reason) => reason,
        None => std::future::pending().await,
    }
}

/// Gives the VIP up at once and sends nothing more for its connections: the responder and the address
/// go first, then every connection is dropped without a drain (the sender refuses their reply bytes,
/// and their FINs and RSTs meet the gate, which releases nothing any more). The gate's rules stay in
/// place on purpose: until this process exits its queue holds what the kernel still tries to send, and
/// after it exits the kernel drops it (no reader, no bypass). The next start of this node removes them.
async fn step_down(
    reason: StepDownReason,
    claim: &mut VipClaim,
    h: Handles,
    replicator: &Replicator,
    gate: Arc<Gate>,
) -> NodeError {
    let e = NodeError::SteppedDown { reason };
    error!(error = %e, "stepping down: giving up the VIP; the gate's rules stay until this node's next start");
    claim.stop_answering();
    if let Err(left) = claim.release() {
        error!(left, "giving up the VIP left state behind");
    }
    give_up(h, replicator, gate).await;
    e
}

/// Drops every connection without a drain and stops the sender; the gate's rules stay (see
/// [`step_down`]).
async fn give_up(h: Handles, replicator: &Replicator, gate: Arc<Gate>) {
    h.serving.abort();
    for task in &h.resumed {
        task.abort();
    }
    if !h.served {
        let _ = h.serving.await;
    }
    for task in h.resumed {
        let _ = task.await;
    }
    replicator.shutdown().await;
    if !h.sender_done
        && let Err(e) = h.sender_task.await
    {
        error!(error = %e, "the replication sender task failed");
    }
    let _ = h.joins.await;
    // Deliberately never dropped (see above): dropping the last handle would remove the rules.
    std::mem::forget(gate);
}

/// A planned switchover, once nothing is committed any more: the VIP goes (no ARP answers, no address),
/// then the handover record ends the stream and the backup's confirmation says where to rejoin. This
/// node's connections are then dropped like on a step-down: the output lease is revoked and the gate
/// releases nothing, so no FIN or RST reaches a client; the backup serves them from here.
async fn hand_over(
    reply: SwitchoverReply,
    claim: &mut VipClaim,
    h: Handles,
    replicator: &Replicator,
    gate: Arc<Gate>,
) -> NodeError {
    let started = Instant::now();
    let backup = replicator.status().borrow().peer_node.clone().unwrap_or_default();
    claim.stop_answering();
    if let Err(left) = claim.release() {
        error!(left, "giving up the VIP for the switchover left state behind");
    }
    let handed = replicator.hand_over().await;
    let took_ms = started.elapsed().as_secs_f64() * 1000.0;
    let e = match handed {
        Ok(join) => {
            info!(backup, %join, took_ms, "handed over: the backup serves every connection; rejoining it as the spare");
            let _ = reply.send((
                200,
                serde_json::json!({ "handed_over_to": backup, "rejoin": join.to_string(), "took_ms": took_ms }),
            ));
            NodeError::HandedOver { join: SocketAddr::V4(join) }
        }
        Err(e) => {
            error!(error = %e, backup, "planned switchover not confirmed; the backup takes over by failover");
            let _ = reply.send((504, serde_json::json!({ "error": e.to_string(), "took_ms": took_ms })));
            NodeError::HandoverFailed(e)
        }
    };
    give_up(h, replicator, gate).await;
    e
}

/// The clean stop (and the stop after a failure): drain, flush, sender, gate, claim.
#[allow(clippy::too_many_arguments)]
async fn stop(
    config: &NodeConfig,
    proxy: &Proxy,
    trigger: &ShutdownTrigger,
    claim: &mut VipClaim,
    h: Handles,
    replicator: &Replicator,
    gate: Arc<Gate>,
    failed: Option<NodeError>,
) -> Result<(), NodeError> {
    let drain = proxy.limits().drain_timeout;
    let deadline = tokio::time::Instant::now() + drain;
    trigger.trigger();
    if !h.served
        && let Err(e) = h.serving.await
    {
        error!(error = %e, "the HTTP server task failed while draining");
    }
    for task in h.resumed {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_cancelled() => {}
            Ok(Err(e)) => error!(error = %e, "a restored connection's task failed"),
            Err(_) => {
                warn!("a restored connection outlived the drain timeout; dropping it");
                abort.abort();
            }
        }
    }
    let stats = proxy.stats();
    info!(
        connections = stats.connections_total,
        exchanges = stats.exchanges_total,
        incomplete = stats.exchanges_incomplete,
        "HTTP server stopped"
    );
    // The last bytes and FINs pass the gate (and the clients' ACKs too): the sender still runs here.
    if claim.is_answering() {
        flush_sockets(config.service_addr(), drain).await;
    }
    replicator.shutdown().await;
    if !h.sender_done
        && let Err(e) = h.sender_task.await
    {
        error!(error = %e, "the replication sender task failed");
    }
    let _ = h.joins.await;
    let mut left = Vec::new();
    stop_gate(gate, &mut left);
    info!("releasing the VIP");
    if let Err(l) = claim.release() {
        left.push(l);
    }
    match (failed, left.is_empty()) {
        (None, true) => {
            info!("stopped cleanly");
            Ok(())
        }
        (None, false) => Err(NodeError::Release(left.join("; "))),
        (Some(e), true) => Err(e),
        (Some(e), false) => Err(NodeError::Release(format!("{} (after stopping on an error: {e})", left.join("; ")))),
    }
}

// ---------------------------------------------------------------------------------
// The proxy hooks: the sender's reply log and observer, plus the admin counters
// ---------------------------------------------------------------------------------

/// The [`ConnectionHooks`] the node's proxy uses: the sender's [`ReplicaHooks`] (every reply byte
/// waits for the commit point; exchanges and upstream bytes go on the stream) plus the admin counters
/// of exchanges and bytes. Open connections and their protection are counted by the sender itself,
/// from its own state (a backup connected or not, the connection followed or not).
#[derive(Clone)]
pub struct NodeHooks {
    replica: ReplicaHooks,
    admin: AdminState,
    /// Whether requests go to an upstream (request bodies are then upstream bytes sent).
    upstream: bool,
}

impl ConnectionHooks for NodeHooks {
    type Log = ReplicaLog;
    type Observer = NodeObserver;

    fn open(&self, peer: SocketAddr, local: SocketAddr) -> (ReplicaLog, NodeObserver) {
        let (log, replica) = self.replica.open(peer, local);
        (log, NodeObserver { replica, admin: self.admin.clone(), upstream: self.upstream })
    }
}

/// One connection's observer: the sender's, and the admin counters.
pub struct NodeObserver {
    replica: ReplicaObserver,
    admin: AdminState,
    upstream: bool,
}

impl NodeObserver {
    /// Resolves once exchange `exchange`'s start is committed (see [`ReplicaObserver::start_committed`]).
    pub fn start_committed(&self, exchange: u64) -> impl Future<Output = Result<(), ReplyRefused>> + Send + 'static {
        self.replica.start_committed(exchange)
    }
}

impl ExchangeObserver for NodeObserver {
    fn on_exchange_start(&self, info: &ExchangeInfo) {
        self.replica.on_exchange_start(info);
    }

    fn on_upstream_head(&self, exchange: u64, head: &http::response::Parts) {
        self.replica.on_upstream_head(exchange, head);
    }

    fn on_upstream_data(&self, exchange: u64, offset: u64, data: &Bytes) {
        self.replica.on_upstream_data(exchange, offset, data);
        self.admin.metrics().upstream_bytes.get(Direction::Received).add(data.len() as u64);
    }

    fn on_exchange_end(&self, outcome: &ExchangeOutcome) {
        self.replica.on_exchange_end(outcome);
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
// Helpers
// ---------------------------------------------------------------------------------

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
            max_connections: l.max_connections as usize,
            body_read_timeout: l.body_read_timeout,
            body_min_rate: l.body_min_rate,
            reply_window: l.reply_window(),
            client_send_buffer: Some(l.client_send_buffer()),
            client_unsent_bytes: Some(l.client_unsent_bytes()),
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

/// Tasks that run beside the serving loop (the admin endpoint); aborted if dropped.
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

#[cfg(test)]
mod tests {
    use super::*;
    use shared::vip::Mac;

    #[test]
    fn gate_config_tags_rules_with_the_node_and_uses_both_queues() {
        let config = NodeConfig::from_toml_str(
            Role::Primary,
            "vip = '10.0.0.100/24'\niface = 'eth0'\nport = 8080\nrepl_listen = '10.1.0.2:7700'\nroot = '.'\n\
             node = 'p-1.a'\n[queues]\ninbound = 11\noutbound = 12\n",
        )
        .expect("valid config");
        let g = gate_config(&config);
        assert_eq!((g.vip, g.port, g.queue, g.orphans()), (Ipv4Addr::new(10, 0, 0, 100), 8080, 11, Some(12)));
        assert_eq!(g.instance, "p-1.a");
        assert!(g.outbound_control && !g.gso, "outbound control on, segments wire-sized");
        g.validate().expect("every valid node name is a valid gate instance");
    }

    #[test]
    fn serving_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        let config = NodeConfig::from_toml_str(
            Role::Primary,
            "vip = '10.0.0.100/24'\niface = 'eth0'\nrepl_listen = '10.1.0.2:7700'\nroot = '.'\n",
        )
        .expect("valid config");
        send(&run(config, async {}));
        // `serve_after_takeover` is awaited inside the backup's own `run`; its future must be `Send` too.
        fn takeover(config: NodeConfig, taken: TakenOver) -> impl Future<Output = Result<(), NodeError>> + Send {
            serve_after_takeover(config, taken, |_| Vec::new(), async {})
        }
        let _ = takeover;
    }

    #[test]
    fn stepped_down_error_says_why() {
        let mac = Mac([2, 0, 0, 0, 0, 9]);
        let answered = NodeError::SteppedDown { reason: StepDownReason::Answered { mac } }.to_string();
        assert!(answered.starts_with("stepped down: another node (02:00:00:00:00:09) answers"), "{answered}");
        let later = NodeError::SteppedDown { reason: StepDownReason::HigherEpoch { ours: 1, seen: 3 } }.to_string();
        assert!(later.contains("epoch 3") && later.contains("this node's 1"), "{later}");
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
