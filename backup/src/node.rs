//! The `backup` node: joins the primary, keeps the replica, watches for the primary's death, and takes
//! over (ARCHITECTURE.md "Takeover (backup)", "Who owns the VIP"). The binary's `main` parses flags and
//! loads the [`NodeConfig`]; [`run`] does the rest, and tests call the same `run`.
//!
//! At start, on a blocking thread while the first join goes on ([`Arming`]), what an earlier run on this
//! host left for the VIP is cleared ([`primary::leftovers`]), then the takeover is armed (below). The
//! joined replica is watched only once both are done; until then a failure is noticed late.
//!
//! Standby, in a loop until shutdown or takeover:
//! 1. Join the primary at `--join` (retried every [`JOIN_RETRY`] while it is unreachable or refuses).
//! 2. Follow its stream ([`crate::replica`]); `/status` says `syncing` until the snapshot is applied,
//!    then `connected`.
//! 3. Feed the [`Detector`] what the link heard; on [`Action::Fence`] probe the VIP with ARP (and run
//!    the operator's fence command when configured). A stand-down (the primary's process still answers
//!    for the VIP) raises an alarm (`/status` `alarm`, `understudy_stand_downs_total`), kept until the
//!    primary is heard again or a rejoin syncs; a broken link is rejoined, a silent one watched and
//!    fenced again every recheck interval. Until the snapshot is applied the detector waits longer for
//!    silence; a primary gone before that is taken over from without its connections, and so is one
//!    that a fence found alive after the link was lost (it served on without this replica).
//!
//! Armed, after the leftovers ([`Armed::arm`]): the hold for VIP:port segments,
//! the gate above it (it will queue every client segment; the replicator applies them to the table and
//! releases them once serving), its output lease (revoked until a takeover), and the arptables rule that
//! keeps the kernel from answering ARP for the VIP. None of it acts while the VIP is elsewhere.
//!
//! Takeover, in order (each step logged and timed):
//! grant the output lease → stop the replica and take its table → plan every connection off this thread
//! (which then restores the silent ones once the address is here) → add the VIP → answer ARP and
//! announce → ask the clients with reply bytes in flight what they received
//! ([`takeover::ask_clients`]) → restore the other connections with `TCP_REPAIR` → bind the listener →
//! release the hold (in the background) → spawn each connection's task and record the takeover →
//! prompt every restored client to retransmit what the outage lost ([`crate::prompt`]) → serve as
//! primary at the next epoch (`primary::node::serve_after_takeover`), resuming each restored connection's
//! exchange in flight ([`crate::resume`]).

use crate::detector::{Action, Detector, DetectorConfig, FenceResult, Phase, SuspectReason};
use crate::prompt::{self, Prompt};
use crate::replica::{self, Replica, ReplicaConfig};
use crate::resume::{self, Restored};
use crate::staging::Stager;
use crate::takeover::{self, Armed, RestoreReport};
use primary::cli::Shutdown;
use primary::leftovers::LeftoverError;
use primary::node::{NodeError, Serving, TakenOver};
use primary::proxy::{ConnectionHooks, ShutdownSignal, ShutdownTrigger};
use primary::replicate::GateFeed;
use shared::admin::{self, AdminState, PeerState, ResumePath};
use shared::config::{NodeConfig, format_duration, role_name};
use shared::link::LocalIdentity;
use shared::protocol::Role;
use shared::replica::Decision;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{Instrument, error, info, warn};

/// Wait between attempts to join an unreachable or refusing primary.
pub const JOIN_RETRY: Duration = Duration::from_secs(1);

/// Why the backup did not start, or stopped other than by its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The configuration has no `--join` address.
    #[error("no primary to join: --join (or `join` in the config file) is required")]
    NoJoin,
    /// The replication key named by the configuration cannot be used.
    #[error("replication key: {0}")]
    Key(shared::config::ConfigError),
    /// The detection settings are unusable.
    #[error("detection settings: {0}")]
    Detector(#[from] crate::detector::DetectorConfigError),
    /// A listening socket could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The admin endpoint refused its settings.
    #[error("admin endpoint: {0}")]
    Admin(#[from] admin::ServeError),
    /// What an earlier run left on this host (orphaned VIP sockets, the address) could not be cleared.
    #[error("cannot clear what an earlier run left on this host: {0}")]
    Leftovers(#[from] LeftoverError),
    /// The takeover could not claim the VIP (the hold is released and the address removed again).
    #[error("takeover failed while claiming the VIP: {0}")]
    Claim(NodeError),
    /// What a takeover needs could not be prepared at start (the gate, the ARP silence).
    #[error("{0}")]
    Arm(#[from] takeover::ArmError),
    #[error("preparing the takeover panicked: {0}")]
    ArmingPanicked(String),
    /// Serving as primary after the takeover failed.
    #[error("serving after the takeover: {0}")]
    Serving(NodeError),
}

/// Runs the backup until `shutdown` resolves. After a takeover it serves as primary until `shutdown`.
/// Must run inside a tokio runtime with I/O and time enabled, in the network namespace of `iface`.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), BackupError> {
    let span = tracing::info_span!("node", role = role_name(Role::Backup));
    run_in_span(config, shutdown).instrument(span).await
}

async fn run_in_span(
    mut config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BackupError> {
    info!("starting: {config}");
    primary::node::prepare_link_auth(&mut config).map_err(BackupError::Key)?;
    let join = SocketAddr::V4(config.join.ok_or(BackupError::NoJoin)?);
    let detector_config = DetectorConfig::from_node(&config);
    Detector::new(detector_config.clone(), Instant::now())?;
    let admin_state = AdminState::new(&config.node, &config.cluster, Role::Backup, 0, Instant::now());
    let (late_trigger, late_signal) = ShutdownTrigger::new();
    let mut admin_task = None;
    if let Some(addr) = config.admin {
        let listener = bind("admin endpoint", addr).await?;
        let serving =
            admin::serve(listener, admin_state.clone(), config.admin_token.as_deref(), wait(late_signal.clone()))?;
        admin_task = Some(tokio::spawn(serving.in_current_span()));
    }
    // Bound now so a wrong address fails at start; a spare joins here once this node serves.
    let repl_listener = bind("replication listener", SocketAddr::V4(config.repl_listen)).await?;
    info!(addr = %config.repl_listen, "replication listener bound (joins are accepted after a takeover)");
    // While the first join goes on (its snapshot takes a while at scale), on a thread of its own: a primary
    // that died on this host (this node before a restart as the spare) left its orphaned sockets on VIP:port,
    // which hold the four-tuples a takeover here must restore; after they are cleared, what the takeover
    // needs is installed, inert until the VIP is here. Both run commands (ss, iptables, arptables): a few
    // hundred milliseconds under load, which the join no longer waits for.
    let mut arming = Arming::start(&config);

    let mut shutdown: Shutdown = Box::pin(shutdown);
    let identity = LocalIdentity::new(&config.cluster, &config.node, Role::Backup, 0);
    let replica_config = ReplicaConfig::from_node(&config);
    // After a stand-down on a broken link: the lost replica (for its epoch, should the takeover come
    // before a rejoin) and the detector that keeps fencing while the joins fail.
    let mut lost: Option<(Replica, Detector)> = None;
    let outcome = loop {
        let fencing = lost.as_mut().map(|(_, detector)| detector);
        let replica =
            match join_primary(join, &identity, &replica_config, &admin_state, &mut shutdown, fencing, &config).await {
                Joined::Shutdown => break None,
                Joined::Replica(replica) => {
                    if !arming.wait().await {
                        replica.stop().await;
                        break None;
                    }
                    replica
                }
                Joined::TakeOver(record) => {
                    let (old, _) = lost.take().expect("only a carried detector takes over while joining");
                    error!("the primary is gone while this node was rejoining: taking over without its connections");
                    admin_state.clear_alarm();
                    break Some((old, record, false, None));
                }
            };
        // Joined: the new replica replaces the lost one.
        drop(lost.take());
        // Idle connections' sockets, rebuilt ahead of a takeover (dropped, silently, with the replica).
        let stager = Stager::start(replica.table(), replica.progress());
        admin_state.set_staged(stager.as_ref().map(Stager::counter));
        match watch_primary(&config, &detector_config, &replica, &admin_state, &mut shutdown).await {
            Watched::Shutdown => {
                drop(stager);
                replica.stop().await;
                break None;
            }
            Watched::Rejoin(why, detector) => {
                warn!(reason = %why, "rejoining the primary");
                drop(stager);
                admin_state.set_staged(None);
                admin_state.set_peer(PeerState::None, None);
                lost = detector.map(|d| (replica, d));
                tokio::select! {
                    () = &mut shutdown => break None,
                    () = tokio::time::sleep(JOIN_RETRY) => {}
                }
            }
            Watched::TakeOver(record, synced) => break Some((replica, record, synced, stager)),
        }
    };
    // Armed by now, unless the node stops before its first join (or the arming failed: that error).
    let armed = arming.finish().await?;
    let result = match outcome {
        None => {
            armed.disarm();
            info!("stopped cleanly");
            Ok(())
        }
        Some((replica, record, synced, stager)) => {
            let taking = Taking { armed, replica, stager, record, synced };
            take_over(&config, taking, admin_state.clone(), repl_listener, shutdown).await
        }
    };
    late_trigger.trigger();
    if let Some(task) = admin_task
        && let Err(e) = task.await
    {
        error!(error = %e, "admin endpoint task failed");
    }
    result
}

/// The takeover's arming ([`Armed::arm`], after the leftovers of an earlier run are cleared), on a
/// blocking thread while the node joins.
struct Arming {
    task: Option<JoinHandle<Result<Armed, BackupError>>>,
    done: Option<Result<Armed, BackupError>>,
}

impl Arming {
    fn start(config: &NodeConfig) -> Arming {
        let config = config.clone();
        let span = tracing::Span::current();
        let task = tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            primary::leftovers::clear(&config.iface, config.vip.addr, config.vip.prefix, config.port, &config.node)?;
            Ok(Armed::arm(&config)?)
        });
        Arming { task: Some(task), done: None }
    }

    /// Waits until the arming is over; whether the takeover is armed.
    async fn wait(&mut self) -> bool {
        if let Some(task) = self.task.take() {
            self.done = Some(task.await.unwrap_or_else(|e| Err(BackupError::ArmingPanicked(e.to_string()))));
        }
        matches!(self.done, Some(Ok(_)))
    }

    /// What the arming made, or why it failed.
    async fn finish(mut self) -> Result<Armed, BackupError> {
        self.wait().await;
        self.done.take().expect("waited for")
    }
}

enum Watched {
    Shutdown,
    /// Why; after a stand-down, the detector that keeps fencing while the rejoin attempts fail.
    Rejoin(String, Option<Detector>),
    /// The record, and whether the replica's table is usable (synced, and not left behind by a primary
    /// that served on after the link was lost).
    TakeOver(crate::detector::FailoverRecord, bool),
}

enum Joined {
    Shutdown,
    Replica(Replica),
    /// The carried detector's fence found the VIP unanswered while the joins failed.
    TakeOver(crate::detector::FailoverRecord),
}

/// Joins the primary, retrying. With `fencing` (a detector carried over from a stand-down on a broken
/// link), the detector's rechecks go on meanwhile: a primary that died after the partition is taken over
/// from even though it can no longer be joined.
async fn join_primary(
    addr: SocketAddr,
    identity: &LocalIdentity,
    config: &ReplicaConfig,
    admin_state: &AdminState,
    shutdown: &mut Shutdown,
    mut fencing: Option<&mut Detector>,
    node: &NodeConfig,
) -> Joined {
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let attempt = replica::join(addr, identity, config);
        tokio::pin!(attempt);
        let joined = loop {
            let due = fencing.as_ref().and_then(|d| d.poll_timeout());
            tokio::select! {
                () = &mut *shutdown => return Joined::Shutdown,
                joined = &mut attempt => break joined,
                () = sleep_until_some(due) => {
                    let detector = fencing.as_mut().expect("a deadline comes only from a detector");
                    if let Some(record) = fence_rejoining(detector, node, admin_state).await {
                        return Joined::TakeOver(record);
                    }
                }
            }
        };
        match joined {
            Ok(replica) => {
                let peer = replica.peer().clone();
                info!(primary = %peer.node, epoch = peer.epoch, %addr, attempts, "joined the primary; syncing");
                admin_state.set_epoch(peer.epoch);
                admin_state.set_peer(PeerState::Syncing, Some(&peer.node));
                return Joined::Replica(replica);
            }
            Err(e) => {
                // Logged loudly once, then quietly: a backup started before its primary is normal.
                if attempts == 1 {
                    warn!(%addr, error = %e, retry = %format_duration(JOIN_RETRY), "cannot join the primary; retrying");
                } else {
                    tracing::debug!(%addr, error = %e, attempts, "cannot join the primary");
                }
            }
        }
        let pause = tokio::time::sleep(JOIN_RETRY);
        tokio::pin!(pause);
        loop {
            let due = fencing.as_ref().and_then(|d| d.poll_timeout());
            tokio::select! {
                () = &mut *shutdown => return Joined::Shutdown,
                () = &mut pause => break,
                () = sleep_until_some(due) => {
                    let detector = fencing.as_mut().expect("a deadline comes only from a detector");
                    if let Some(record) = fence_rejoining(detector, node, admin_state).await {
                        return Joined::TakeOver(record);
                    }
                }
            }
        }
    }
}

/// Sleeps until `due`, or forever without one.
async fn sleep_until_some(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The carried detector's timer fired while rejoining: its recheck fences; returns the record when the
/// fence passed. The primary is never heard here (no link), so only suspicions, fences, stand-downs and
/// a takeover can come.
async fn fence_rejoining(
    detector: &mut Detector,
    node: &NodeConfig,
    admin_state: &AdminState,
) -> Option<crate::detector::FailoverRecord> {
    detector.handle_timeout(Instant::now());
    let mut suspected = None;
    while let Some(action) = detector.poll_action() {
        match action {
            Action::Suspect { silent_for, reason, .. } => {
                warn!(silent = %format_duration(silent_for), %reason, "primary still unreachable; fencing again");
                suspected = Some(reason);
            }
            Action::Fence { attempt } => {
                let (result, command) = fence(node).await;
                info!(attempt, result = ?result, command = ?command, "fence result");
                if let Err(e) = detector.handle_fence_result(Instant::now(), result, command) {
                    error!(error = %e, "fence result refused while rejoining");
                }
            }
            Action::Recovered { .. } => {}
            Action::StandDown { alarm } => stood_down(admin_state, &alarm, suspected.as_ref()),
            Action::TakeOver { record } => return Some(record),
        }
    }
    None
}

/// Raises (or updates) the alarm of a stand-down.
fn stood_down(admin_state: &AdminState, alarm: &crate::detector::Alarm, suspected: Option<&SuspectReason>) {
    let link = suspected.map_or_else(|| "lost".to_owned(), ToString::to_string);
    error!(%alarm, replication_link = %link, "ALARM: not taking over");
    admin_state.stood_down(SystemTime::now(), &format!("{alarm}; replication link: {link}"));
    // Not protected while the primary is not heard, whatever the link's socket says.
    admin_state.set_peer(PeerState::None, None);
}

/// Follows the primary until shutdown, a reason to rejoin, or a takeover decision.
async fn watch_primary(
    config: &NodeConfig,
    detector_config: &DetectorConfig,
    replica: &Replica,
    admin_state: &AdminState,
    shutdown: &mut Shutdown,
) -> Watched {
    admin_state.set_replica(Some(replica.table()));
    let liveness = replica.liveness();
    let mut progress = replica.progress();
    let mut handover = replica.progress();
    let mut detector = match Detector::joining(detector_config.clone(), liveness.last_heard()) {
        Ok(d) => d,
        Err(e) => return Watched::Rejoin(format!("detector: {e}"), None),
    };
    let mut fed = liveness.last_heard();
    let mut synced = false;
    let mut link_down = false;
    // Why the primary is suspected in the current episode, for the alarm.
    let mut suspected: Option<SuspectReason> = None;
    // When this node stood down over a link that stayed up: hearing the primary after it ends the alarm.
    let mut stood_down_at: Option<Instant> = None;
    // The link's pause state is sampled, so sample it well within a heartbeat interval; records do not
    // wake this loop (any frame renews `last_heard`, read at each wake-up).
    let sample = detector_config.heartbeat_interval / 2;
    loop {
        let now = Instant::now();
        let due = detector.poll_timeout().map_or(now + sample, |t| t.min(now + sample));
        let mut ended = None;
        tokio::select! {
            () = &mut *shutdown => return Watched::Shutdown,
            () = tokio::time::sleep_until(due.into()) => {}
            Some(records) = async { progress.wait_for(|p| p.synced).await.ok().map(|p| p.records) }, if !synced => {
                synced = true;
                detector.handle_synced();
                admin_state.set_peer(PeerState::Connected, Some(&replica.peer().node));
                info!(records, "replica synced: the pair is protected");
                if admin_state.clear_alarm() {
                    info!("alarm cleared: rejoined the primary");
                }
            }
            Ok(_) = handover.wait_for(|p| p.handover), if synced => {
                // The primary stopped, gave the VIP up and said so at the end of its stream: no
                // detection and no fence to wait for.
                info!("planned switchover: the primary handed over; taking over now");
                return Watched::TakeOver(crate::detector::FailoverRecord::handover(Instant::now()), true);
            }
            end = replica.lost(), if !link_down => ended = Some(end),
        }
        let now = Instant::now();
        // Input first, then the timer (the detector's call order).
        let heard = liveness.last_heard();
        if heard > fed {
            detector.handle_record(heard);
            fed = heard;
            if stood_down_at.is_some_and(|t| heard > t) && !link_down && detector.phase() == Phase::Watching {
                // The primary answered the fence and now speaks again on the same link: a pause, not a
                // partition. The replica is current (the detector reset what the fence found).
                stood_down_at = None;
                let peer = if synced { PeerState::Connected } else { PeerState::Syncing };
                admin_state.set_peer(peer, Some(&replica.peer().node));
                if admin_state.clear_alarm() {
                    info!("alarm cleared: the primary is heard again on the link");
                }
            }
        }
        detector.handle_reading_paused(now, liveness.reading_paused());
        if let Some(end) = ended {
            link_down = true;
            detector.handle_link_down(now, end.to_string());
        }
        detector.handle_timeout(now);
        while let Some(action) = detector.poll_action() {
            match action {
                Action::Suspect { silent_for, reason, .. } => {
                    warn!(silent = %format_duration(silent_for), %reason, "primary suspected; fencing");
                    suspected = Some(reason);
                }
                Action::Fence { attempt } => {
                    let (result, command) = fence(config).await;
                    info!(attempt, result = ?result, command = ?command, "fence result");
                    if let Err(e) = detector.handle_fence_result(Instant::now(), result, command) {
                        // The primary was heard while the probe ran: the detector moved on.
                        info!(error = %e, "fence result no longer wanted");
                    }
                }
                Action::Recovered { silent_for } => {
                    info!(silent = %format_duration(silent_for), "primary heard again; no takeover");
                    let peer = if synced { PeerState::Connected } else { PeerState::Syncing };
                    admin_state.set_peer(peer, Some(&replica.peer().node));
                    if admin_state.clear_alarm() {
                        info!("alarm cleared: the primary is heard again");
                    }
                }
                Action::StandDown { alarm } => {
                    stood_down(admin_state, &alarm, suspected.as_ref());
                    stood_down_at = (!link_down).then(Instant::now);
                    if link_down {
                        return Watched::Rejoin(format!("stood down: {alarm}"), Some(detector));
                    }
                }
                Action::TakeOver { record } => {
                    if !synced {
                        // The fence passed: nobody serves the VIP. Serving it without the existing
                        // connections beats leaving it dead; `take_over` starts from an empty table.
                        error!(
                            "the primary is gone before this replica was synced: taking over without its connections"
                        );
                    } else if record.replica_stale {
                        // Restoring sockets at sequence numbers the clients have left behind would leave
                        // them hanging; without a socket they are reset at once and can reconnect.
                        error!(
                            "the primary served without this replica after the link was lost: taking over \
                             without its connections (their clients are reset)"
                        );
                    }
                    if admin_state.clear_alarm() {
                        info!("alarm cleared: taking over");
                    }
                    let usable = synced && !record.replica_stale;
                    return Watched::TakeOver(record, usable);
                }
            }
        }
    }
}

/// The fence (ARCHITECTURE.md invariant 4): ARP probe of the VIP, then the operator's command when the
/// probe went unanswered and one is configured.
async fn fence(config: &NodeConfig) -> (FenceResult, Option<bool>) {
    let f = &config.fencing;
    let probed = shared::vip::probe(&config.iface, config.vip.addr, f.arp_probes, f.arp_time()).await;
    let result = FenceResult::from(&probed);
    let command = match (&result, &f.command) {
        (FenceResult::Unanswered, Some(argv)) => Some(run_fence_command(argv, f.command_timeout).await),
        _ => None,
    };
    (result, command)
}

/// Runs the operator's fence command; true only if it exits 0 within `timeout`.
async fn run_fence_command(argv: &[String], timeout: Duration) -> bool {
    let Some((program, args)) = argv.split_first() else { return false };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true).stdin(std::process::Stdio::null());
    let started = Instant::now();
    match tokio::time::timeout(timeout, cmd.status()).await {
        Ok(Ok(status)) if status.success() => {
            info!(command = ?argv, took = ?started.elapsed(), "fence command confirmed the primary is fenced");
            true
        }
        Ok(Ok(status)) => {
            error!(command = ?argv, %status, "fence command failed");
            false
        }
        Ok(Err(e)) => {
            error!(command = ?argv, error = %e, "fence command could not be run");
            false
        }
        Err(_) => {
            error!(command = ?argv, ?timeout, "fence command timed out (killed)");
            false
        }
    }
}

impl primary::cli::NodeEnd for BackupError {
    fn handed_over(&self) -> Option<SocketAddr> {
        match self {
            BackupError::Serving(e) => e.handed_over(),
            _ => None,
        }
    }
}

/// What a takeover starts from.
struct Taking {
    armed: Armed,
    replica: Replica,
    stager: Option<Stager>,
    record: crate::detector::FailoverRecord,
    /// Whether the replica's table is usable (see [`Watched::TakeOver`]).
    synced: bool,
}

/// Takeover steps 3 to 7, then serving as primary until `shutdown`.
async fn take_over(
    config: &NodeConfig,
    taking: Taking,
    admin_state: AdminState,
    repl_listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), BackupError> {
    let Taking { armed, replica, stager, mut record, synced } = taking;
    let vip = config.vip.addr;
    info!(reason = %record.reason, detection = ?record.detection, fencing = ?record.fencing, "taking over");
    let mut phases = takeover::Phases::start(record.fenced_at());
    // 3. The hold, the gate above it and the ARP silence were armed at start (`Armed::arm`). The gate queues
    // every client segment from the moment the address is here; the output lease lets VIP output pass
    // from now (restored sockets send as they leave repair).
    let Armed { hold, gate, diverted, mut claim } = armed;
    if let Err(e) = gate.grant_output_now(Instant::now() + primary::gate::output_lease::STARTUP_GRANT) {
        error!(error = %e, "cannot grant the output lease at once; VIP output passes from its next renewal");
    }
    let mut gate = GateFeed::new(Arc::new(gate), diverted);
    phases.mark("lease");
    // Above every epoch this node has heard of: the primary's at the handshake, and any in its stream.
    let primary_epoch = replica.peer().epoch;
    // The stager first: it would take the table the replica hands over for an emptied one, and drop
    // every socket it staged.
    let staged = Arc::new(stager.map(Stager::stop).unwrap_or_default());
    admin_state.set_staged(None);
    let mut table = replica.stop().await;
    phases.mark("replica_stop");
    let epoch = table.epoch().max(primary_epoch) + 1;
    if !synced {
        // A partial snapshot, or a table the primary went on without, does not match the clients.
        table = shared::replica::ReplicaTable::new();
        staged.discard();
        warn!("the replica is not usable (not synced, or stale after a partition): no connection is restored");
    }

    // 4a. Plan, and restore the connections whose restore sends nothing (idle keep-alive connections,
    // most of a large table), on another thread while this one claims, gates and announces the address.
    // The hold drops their clients' segments until the gate takes them.
    let table = Arc::new(table);
    let mut early = takeover::Early::start(table.clone(), config.retry.clone(), staged.clone());

    // 4b. Claim the address (the kernel stays silent on ARP for it until this process answers). From here
    // every client segment lands in the gate's queue, and only the replicator (started with the table
    // once serving) applies it to the table and releases it, in order. Segments of connections restored
    // meanwhile wait there instead of reaching their sockets unseen by the table (the hold alone lets
    // segments that find a socket through), and the table stays exactly what the kernel received, as the
    // next spare's snapshot needs.
    if let Err(e) = claim.take_address() {
        let _ = claim.release();
        early.abandon().await;
        return Err(BackupError::Claim(e));
    }
    early.address_ready();
    phases.mark("address");

    // Announce before the other restores: such a socket sends a window probe as it leaves repair mode,
    // and the client answers at once, to the MAC its ARP cache holds. Before the announcement that is
    // the dead primary's, and the answer is lost; when the client already had bytes the replica thought
    // unacknowledged, the restored socket then retransmits them on its timer, the client's duplicate ACK
    // echoes a timestamp as old as the outage, and Linux takes that as the first RTT sample (seconds).
    // Segments that arrive early wait in the gate like any other.
    if let Err(e) = claim.answer().await {
        let _ = claim.release();
        early.abandon().await;
        return Err(BackupError::Claim(e));
    }
    phases.mark("announce");

    // 5. Restore the others, after asking the clients what they received of the reply bytes in flight.
    let loud = early.loud_plans().await;
    phases.mark("plan");
    let answers = takeover::ask_clients(&loud, &mut gate, takeover::ANSWER_WAIT).await;
    phases.mark("ask");
    let mut report: RestoreReport = takeover::restore_all(&table, loud, &answers, &staged);
    info!(restored = report.restored.len(), took = ?report.took, "restored the connections asked about");
    report.merge(early.finish().await);
    // Connections not restored (failed or skipped) may still hold a staged socket: closed silently.
    let unused = staged.discard();
    phases.mark("restore");
    gate.early = answers.read;
    info!(restored = report.restored.len(), staged = report.staged, staged_unused = unused,
        failed = report.failed.len(), skipped = report.skipped.len(), took = ?report.took, "connections restored");
    let table = Arc::try_unwrap(table).unwrap_or_else(|shared| (*shared).clone());
    // The listener after the restore, as a restored socket may not bind beside a listener on the port
    // (short of SO_REUSEPORT on both). Restored sockets carry SO_REUSEADDR (`repair::restore` sets it)
    // so this bind succeeds beside them.
    let service = SocketAddr::V4(config.service_addr());
    let listener = match TcpListener::bind(service).await {
        Ok(l) => l,
        Err(source) => {
            let _ = claim.release();
            report.discard();
            return Err(BackupError::Bind { what: "HTTP service", addr: service, source });
        }
    };
    phases.mark("listener");
    // The gate is above the hold and passes every segment it releases with the mark the hold lets
    // through, so the hold has no effect any more: its removal (iptables runs) need not delay serving.
    if let Some(hold) = hold {
        tokio::task::spawn_blocking(move || {
            if let Err(e) = hold.release() {
                error!(error = %e, "removing the hold's rules failed; the gate is above them, so segments pass");
            }
        });
    }
    admin_state.set_peer(PeerState::None, None);

    let record_admin = admin_state.clone();
    let taken = TakenOver { epoch, table, admin: admin_state, claim, listener, gate, repl_listener };
    let lost = report.failed.len() as u64;
    let staged_count = report.staged as u64;
    let restored = report.restored;
    // The takeover is done once every restored connection has its task: the restore time runs to here.
    let prompt = config.retry.prompt_retransmit;
    let resume = move |serving: &Serving| {
        let restored_count = restored.len() as u64;
        // Prompts are made before the tasks take the restored connections, and sent after they are
        // spawned: thousands of them take a while, and the spawning must not share the CPU with them.
        let prompts = if prompt { takeover_prompts(&restored) } else { Vec::new() };
        phases.mark("prompts");
        let tasks = resume_all(serving, restored, record_admin.clone(), record.fenced_at());
        phases.mark("tasks");
        record.restored(Instant::now(), restored_count);
        record_admin.took_over(shared::admin::FailoverRecord {
            at: SystemTime::now(),
            reason: record.reason.clone(),
            epoch,
            detection: record.detection,
            fencing: record.fencing,
            restore: record.restore.unwrap_or_default(),
            total: record.total.unwrap_or_default(),
            connections_restored: restored_count,
            connections_lost: lost,
            connections_staged: staged_count,
        });
        info!(
            epoch,
            detection = ?record.detection,
            fencing = ?record.fencing,
            restore = ?record.restore,
            total = ?record.total,
            connections = restored_count,
            lost,
            %phases,
            "took over: serving as primary"
        );
        // The clients' retransmission timers may have run since the old primary was last heard from.
        prompt_clients(vip, prompts, record.last_heard(), record_admin);
        tasks
    };
    primary::node::serve_after_takeover(config.clone(), taken, resume, shutdown).await.map_err(BackupError::Serving)
}

/// Starts the resume executor on every restored connection.
fn resume_all(
    serving: &Serving,
    restored: Vec<Restored>,
    admin_state: AdminState,
    fenced_at: Instant,
) -> Vec<JoinHandle<()>> {
    // Busy connections (a request or a reply in flight) are spawned last. A runtime thread that spawns
    // thousands of tasks keeps the newest in its own queue and moves the oldest to the shared one, which
    // its threads look at only now and then: spawned first, a busy connection's first poll waited behind
    // thousands of idle ones (0.6 s at 10 000). The idle ones are spawned as they come (they are most of
    // them: sorting them into a vector of their own would copy them all once more).
    let mut tasks = Vec::with_capacity(restored.len());
    let mut busy = Vec::new();
    let started = Arc::new(TasksStarted { left: AtomicUsize::new(restored.len()), fenced_at });
    for r in restored {
        let p = &r.plan;
        let is_busy = p.decision.exchange().is_some()
            || !p.queued.is_empty()
            || p.restore.as_ref().is_some_and(|t| !t.send_queue.is_empty() || !t.recv_queue.is_empty());
        if is_busy {
            busy.push(r);
        } else {
            tasks.push(spawn_resume(serving, r, &admin_state, &started));
        }
    }
    tasks.extend(busy.into_iter().map(|r| spawn_resume(serving, r, &admin_state, &started)));
    tasks
}

/// Counts the restored connections whose task has not started yet, and says when the last one did: the
/// takeover's restore time ends once every task is spawned; its connection is served once it runs.
struct TasksStarted {
    left: AtomicUsize,
    fenced_at: Instant,
}

impl TasksStarted {
    fn started(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            info!(since_fence = ?self.fenced_at.elapsed(), "every restored connection's task has started");
        }
    }
}

/// Spawns the task that serves one restored connection.
fn spawn_resume(
    serving: &Serving,
    r: Restored,
    admin_state: &AdminState,
    started: &Arc<TasksStarted>,
) -> JoinHandle<()> {
    let started = started.clone();
    let hooks = serving.hooks.clone();
    let proxy = serving.proxy.clone();
    let signal: ShutdownSignal = serving.shutdown.clone();
    let admin_state = admin_state.clone();
    // The connection's hooks and span are made by the task's first poll, on a worker thread: with ten
    // thousand connections they would take tens of milliseconds of the takeover here. The task's state is
    // boxed by that poll too: a task is allocated at the size of its future's largest state (1.6 kB
    // unboxed), fresh pages the spawning thread would fault in, ten thousand times over.
    tokio::spawn(async move {
        started.started();
        Box::pin(async move {
            let key = r.plan.conn;
            let (log, observer) = hooks.open(SocketAddr::V4(key.client), SocketAddr::V4(key.server));
            let span = tracing::info_span!("conn", conn = %key.client, resumed = true);
            resume_one(proxy, r, log, observer, signal, admin_state).instrument(span).await
        })
        .await
    })
}

/// Serves one restored connection to its end and counts how it resumed.
async fn resume_one(
    proxy: primary::proxy::Proxy,
    r: Restored,
    log: primary::replicate::ReplicaLog,
    observer: primary::node::NodeObserver,
    signal: ShutdownSignal,
    admin_state: AdminState,
) {
    let in_flight = r.plan.decision.clone();
    let queued: Vec<_> = r.plan.queued.iter().map(|q| q.decision.clone()).collect();
    // Boxed: the executor's state is kilobytes, and unboxed each of thousands of tasks would reserve it
    // (zeroed pages, copied) while the takeover spawns them; boxed, it is made by the task's first poll.
    let outcome = Box::pin(resume::resume_connection(&proxy, r, log, Arc::new(observer), signal)).await;
    let resumes = &admin_state.metrics().resumes;
    resumes.get(resume_path(&in_flight, outcome.source)).inc();
    for d in &queued {
        resumes.get(resume_path(d, None)).inc();
    }
    match &outcome.error {
        None => info!(path = outcome.path, "resumed connection ended"),
        Some(e) => warn!(path = outcome.path, error = %e, "resumed connection ended with an error"),
    }
}

/// The prompts [`prompt_clients`] sends to the clients of `restored`, the clients heard from last first:
/// sending thousands takes a while, and a client busy when the primary failed most likely sent
/// something during the outage, while one idle for long has nothing to resend.
fn takeover_prompts(restored: &[Restored]) -> Vec<Prompt> {
    let mut prompts: Vec<(Option<Duration>, Prompt)> = restored
        .iter()
        .filter_map(|r| {
            let prompt = r.plan.restore.as_ref().and_then(Prompt::for_plan)?;
            Some((r.prepared.heard, prompt))
        })
        .collect();
    prompts.sort_by_key(|p| std::cmp::Reverse(p.0));
    prompts.into_iter().map(|(_, p)| p).collect()
}

/// Prompts the restored clients to retransmit what they sent during the outage (see [`prompt`]), off the
/// runtime's workers: thousands of connections take a while and serving must not wait for it.
fn prompt_clients(vip: Ipv4Addr, prompts: Vec<Prompt>, silent_since: Instant, admin_state: AdminState) {
    if prompts.is_empty() {
        return;
    }
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let burst = prompt::burst_for(started.saturating_duration_since(silent_since));
        match prompt::send(vip, &prompts, burst) {
            Ok(report) => {
                admin_state.metrics().retransmit_prompts.add(report.prompted);
                info!(prompted = report.prompted, burst, took = ?started.elapsed(), "clients prompted to retransmit");
                if report.failed > 0 {
                    warn!(
                        failed = report.failed,
                        last_error = report.last_error.as_deref().unwrap_or(""),
                        "some clients could not be prompted; they resend on their own timer"
                    );
                }
            }
            Err(e) => warn!(error = %e, clients = prompts.len(),
                "cannot open a raw ICMP socket to prompt clients; they resend on their own timer"),
        }
    });
}

/// The metric label of a decision carried out (`source`: where a continuation's bytes came from).
fn resume_path(decision: &Decision, source: Option<&str>) -> ResumePath {
    match decision {
        Decision::ReplayFromLog { .. } => ResumePath::ReplayedFromLog,
        Decision::Resend { .. } => ResumePath::ResentUpstream,
        Decision::ContinueFromLog { .. } => ResumePath::ContinuedAtOffset,
        Decision::ContinueWithRange { .. } if source == Some("range_200_refetch") => ResumePath::FullRefetch,
        Decision::ContinueWithRange { .. } => ResumePath::RangeRefetch,
        Decision::ContinueWithRefetch { .. } => ResumePath::FullRefetch,
        Decision::Refuse { .. } => ResumePath::ClosedNeverPolicy,
        Decision::Truncate { .. } => ResumePath::ClosedMismatch,
        Decision::Unprotected { .. }
        | Decision::NotRestorable { .. }
        | Decision::Idle
        | Decision::Written { .. }
        | Decision::KeepReading { .. }
        | Decision::NotStarted { .. } => ResumePath::NothingToDo,
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, BackupError> {
    TcpListener::bind(addr).await.map_err(|source| BackupError::Bind { what, addr, source })
}

async fn wait(mut signal: ShutdownSignal) {
    signal.wait().await
}
