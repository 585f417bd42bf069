//! Takeover steps 3 to 5 (ARCHITECTURE.md "Takeover (backup)"): hold, ask, restore. The claim itself is
//! `primary::claim::VipClaim`; the order is the node's (backup/src/node.rs).
//!
//! **Hold.** Until every socket exists, a segment for VIP:port that finds no socket would be answered
//! by the kernel with a RST, which kills the client's connection. The hold drops such segments in
//! `mangle PREROUTING`, ahead of TCP, except the segments `tcp_replay::repair::restore` injects itself (a
//! replayed FIN), marked [`INJECT_MARK`](tcp_replay::repair::INJECT_MARK), which pass.
//!
//! The gate, armed with the hold when the backup starts ([`Armed`]), inserts its NFQUEUE rules at the top
//! of the same chain, above the hold's. A segment the queue accepts leaves the chain there (an accepted
//! verdict continues with the next hook, not the next rule), so the hold only catches what the gate does
//! not queue (nothing, while its rules are in place), and every client segment,
//! including the answers to the window probes restored sockets send, waits in the gate until the new
//! primary's replicator has applied it. [`Hold::release`] then removes the rules. Rules carry the comment
//! `understudy:<node>-hold`; a crashed run's leftovers are removed on install.
//!
//! The hold has no socket match (`-m socket`): removing such a rule drops the kernel's last user of IPv4
//! defragmentation, whose hook then goes, and unregistering any hook flushes every NFQUEUE of the
//! namespace: the segments waiting in the gate would be lost (their verdicts fail with ENOENT), and with
//! them the clients' answers to the window probes, stalling restored downloads until their
//! retransmission timers fire (seconds).
//!
//! **Ask.** The replica knows which reply bytes the old primary wrote, not which its kernel transmitted
//! nor which the client received since its last ACK the replica saw. Restored as in flight, bytes the
//! client never got would wait for the restored socket's retransmission timer, and duplicates of bytes
//! it had would earn ACKs echoing timestamps as old as the outage, which Linux takes as RTT samples
//! (seconds of stall, compounding over back-to-back takeovers). So before the restore, every client with
//! unacknowledged reply bytes gets an out-of-window ACK from the server end ([`ask_clients`]), and its
//! answer, read from the gate, says exactly what it holds ([`RestorePlan::apply_client_ack`]). The VIP
//! must be announced first, or the answers go to the dead primary's MAC.
//!
//! **Restore.** Each connection the planner can restore is rebuilt with `TCP_REPAIR` from the tracker's
//! plan; the VIP must already be on an interface (repair-mode bind needs a local address). An idle
//! connection whose socket the standby staged ([`crate::staging`]) and that still fits its plan only
//! leaves repair mode, which sends nothing and so is done before the address is here. Connections
//! that cannot be restored are logged with the failing step and left to the client's retransmission
//! (which meets no socket once the hold is gone, and is reset: honest, and counted).

use crate::resume::{Pending, Prepared, Restored};
use crate::staging::StagedSockets;
use primary::claim::VipClaim;
use primary::gate::rules::{Iptables, RuleSpec, Rules, RulesError, tag};
use primary::gate::{Diverted, Gate, Hook};
use primary::replicate::GateFeed;
use shared::config::{NodeConfig, RetryConfig};
use shared::protocol::ConnKey;
use shared::replica::resume::plan_conn_in_place;
use shared::replica::table::Conn;
use shared::replica::{ConnResume, Decision, ReplicaTable};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tcp_replay::plan::{NoSource, QueueSource};
use tcp_replay::repair::{self, INJECT_MARK, Staged};
use tcp_replay::segment::{Checksums, Segment, SegmentBuilder, TcpFlags, TcpOptions, Timestamps};
use tcp_replay::{Dir, RestorePlan, Seq};
use tracing::{debug, error, info, warn};

/// The iptables binary the hold runs (the one `primary::gate` uses).
const IPTABLES: &str = "iptables";

/// Inbound VIP:port segments held while sockets are rebuilt.
#[derive(Debug)]
pub struct Hold {
    rules: Rules,
}

impl Hold {
    /// Installs the hold for `vip:port`, tagged for `node`, in this thread's network namespace.
    pub fn install(vip: Ipv4Addr, port: u16, node: &str) -> Result<Hold, RulesError> {
        let tag = tag(&format!("{node}-hold"))?;
        let ipt = Iptables::here(Path::new(IPTABLES))?;
        let (rules, stale) = Rules::install(ipt, &tag, hold_rules(vip, port, &tag))?;
        if stale > 0 {
            warn!(stale, %tag, "removed hold rules left by an earlier run");
        }
        Ok(Hold { rules })
    }

    /// Removes the hold's rules.
    pub fn release(self) -> Result<(), RulesError> {
        self.rules.remove()
    }
}

/// The hold's rules, in chain order: pass injected segments, drop the rest.
pub fn hold_rules(vip: Ipv4Addr, port: u16, tag: &str) -> Vec<RuleSpec> {
    let base = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> =
            ["-p", "tcp", "-d", &format!("{vip}/32"), "--dport", &port.to_string()].map(String::from).to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["-m", "comment", "--comment", tag].map(String::from));
        args
    };
    let mark = format!("{INJECT_MARK:#x}");
    vec![
        RuleSpec { chain: "PREROUTING", args: base(&["-m", "mark", "--mark", &mark, "-j", "ACCEPT"]) },
        RuleSpec { chain: "PREROUTING", args: base(&["-j", "DROP"]) },
    ]
}

/// What a takeover needs that a standby backup prepares in advance, so that the takeover itself only
/// adds the address and announces it: the hold, the gate (queues bound, rules installed, output lease
/// installed and revoked) and the arptables rule that keeps the kernel from answering ARP for the VIP.
/// None of them has any effect while the VIP is not on this host. Installing them took tens of ms, and
/// under load a hundred, between the fence and the restore.
pub struct Armed {
    pub hold: Option<Hold>,
    pub gate: Gate,
    pub diverted: tokio::sync::mpsc::Receiver<Diverted>,
    pub claim: VipClaim,
}

/// Why a backup could not prepare its takeover.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    #[error("cannot start the gate a takeover needs: {0}")]
    Gate(#[from] primary::gate::GateError),
    #[error("cannot keep the kernel from answering ARP for the VIP: {0}")]
    Claim(#[from] primary::node::NodeError),
    #[error("cannot revoke the output lease of a standby backup: {0}")]
    Lease(#[source] std::io::Error),
}

impl Armed {
    /// Installs the hold, then the gate above it (its rules go to the top of the chain), then the
    /// arptables rule. The hold is optional, as at a takeover: without it a segment that meets no socket
    /// could be reset, but the gate queues every client segment before that anyway.
    pub fn arm(config: &NodeConfig) -> Result<Armed, ArmError> {
        let (vip, port) = (config.vip.addr, config.port);
        let hold = match Hold::install(vip, port, &config.node) {
            Ok(h) => Some(h),
            Err(e) => {
                error!(error = %e, "cannot install the hold for VIP segments; a takeover restores without it");
                None
            }
        };
        let (gate, diverted) = Gate::start(primary::node::gate_config(config))?;
        // Nothing may leave from the VIP until this node takes over.
        gate.revoke_output().map_err(ArmError::Lease)?;
        let mut claim = VipClaim::new(&config.iface, vip, config.vip.prefix);
        claim.silence_kernel()?;
        info!(%vip, port, "takeover armed: hold, gate and ARP silence in place (inert until the VIP is here)");
        Ok(Armed { hold, gate, diverted, claim })
    }

    /// Removes what [`Armed::arm`] installed (a backup that stops without taking over). Every step is
    /// tried; failures are logged.
    pub fn disarm(self) {
        let Armed { hold, gate, diverted, mut claim } = self;
        drop(diverted);
        if let Err(e) = gate.shutdown() {
            error!(error = %e, "removing the gate's rules failed");
        }
        if let Some(hold) = hold
            && let Err(e) = hold.release()
        {
            error!(error = %e, "removing the hold's rules failed");
        }
        if let Err(e) = claim.release() {
            error!(error = %e, "removing the ARP silence failed");
        }
    }
}

/// What the restore step did.
#[derive(Default)]
pub struct RestoreReport {
    /// Connections rebuilt, with their plans, ready for the resume executor.
    pub restored: Vec<Restored>,
    /// Connections whose restore failed, with the error.
    pub failed: Vec<(ConnKey, String)>,
    /// Connections not restored by decision (unprotected, not restorable), with the decision's kind.
    pub skipped: Vec<(ConnKey, &'static str)>,
    /// Of the restored, how many were staged sockets that only left repair mode (`crate::staging`).
    pub staged: usize,
    /// Time the restore took.
    pub took: Duration,
}

/// How long each step of a takeover took, in order, for the log: where the time of a slow takeover went.
#[derive(Debug)]
pub struct Phases {
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Phases {
    pub fn start(at: Instant) -> Self {
        Phases { last: at, steps: Vec::new() }
    }

    /// Step `name` ended now.
    pub fn mark(&mut self, name: &'static str) {
        self.mark_at(name, Instant::now());
    }

    pub fn mark_at(&mut self, name: &'static str, now: Instant) {
        self.steps.push((name, now.saturating_duration_since(self.last)));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, took)) in self.steps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={:.1}ms", took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// The replication stream's clock (wall-clock time since the Unix epoch, as the primary stamps
/// segments), read now.
pub fn stream_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Plans every connection of `table` at the stream's clock, now, split across threads like the restore.
/// The plans leave the bytes queued both ways in the table, which the restore writes them from.
pub fn plan_all(table: &ReplicaTable, retry: &RetryConfig) -> Vec<ConnResume> {
    let conns: Vec<&Conn> = table.conns().collect();
    plan_conns(&conns, stream_now(), retry)
}

/// Plans `conns` at the stream's clock `now`, split across threads.
fn plan_conns(conns: &[&Conn], now: Duration, retry: &RetryConfig) -> Vec<ConnResume> {
    in_parallel("plan", conns, |c| plan_conn_in_place(c, now, retry))
}

/// How long the takeover waits at most for the clients' answers to its probes (all of them usually
/// arrive within a round trip; a missing one leaves its plan as it was).
pub const ANSWER_WAIT: Duration = Duration::from_millis(50);

/// When most clients have answered, how long the takeover waits for the rest: [`LATE_ANSWER_FACTOR`]
/// times as long as most took, and at least this. A client may not answer at all (gone, or its answer
/// lost), and waiting the whole [`ANSWER_WAIT`] for it delays every connection's restore.
pub const LATE_ANSWER_MIN: Duration = Duration::from_millis(5);
pub const LATE_ANSWER_FACTOR: u32 = 3;

/// Whether the wait for answers is over: all `asked` answered, `wait` is up, or nine in ten answered by
/// `most_at` and the rest had [`LATE_ANSWER_FACTOR`] times as long (at least [`LATE_ANSWER_MIN`]).
/// Clients far away answer later than near ones; the rule waits for them as long as they are not the
/// last tenth.
pub fn answers_done(
    asked: usize,
    answered: usize,
    elapsed: Duration,
    wait: Duration,
    most_at: Option<Duration>,
) -> bool {
    answered >= asked || elapsed >= answers_deadline(wait, most_at)
}

/// How long after the probes the wait for answers ends at the latest (see [`answers_done`]).
fn answers_deadline(wait: Duration, most_at: Option<Duration>) -> Duration {
    most_at.map_or(wait, |t| (t * LATE_ANSWER_FACTOR).max(LATE_ANSWER_MIN).min(wait))
}

/// How many answers are "most" of `asked`: nine in ten, rounded up.
fn most_of(asked: usize) -> usize {
    (asked * 9).div_ceil(10)
}

/// What the clients said when asked.
#[derive(Default)]
pub struct Answers {
    /// Per connection, the latest answer: (ack, raw window, seq).
    pub by_conn: HashMap<ConnKey, (Seq, u16, Seq)>,
    /// Everything read from the gate meanwhile, in order, for the replicator ([`GateFeed::early`]).
    pub read: Vec<Diverted>,
    pub probed: usize,
    /// Clients asked whose last window was closed, and how many of them answered.
    pub closed_windows: (usize, usize),
    pub took: Duration,
}

/// Asks every client with reply bytes the replica holds as unacknowledged what it really received: a
/// segment from the server end repeating one byte the client already acknowledged (seq `snd_una - 1`),
/// which a live TCP answers at once with its `rcv_nxt` and window (RFC 9293 3.10.7.4: an unacceptable
/// segment is acknowledged at once). A pure ACK out of the window would do, but Linux answers those at
/// most once per `tcp_invalid_ratelimit` (500 ms) per socket, and a client whose window was closed had
/// just answered the old primary's zero-window probes, which are exactly that: most such clients never
/// answered, and the takeover waited the whole [`ANSWER_WAIT`] for them. The answers are read from the
/// gate, which must hold the clients' segments already (the VIP announced). Without them, bytes the old
/// primary wrote but its kernel never transmitted would be restored as in flight and resent only on the
/// restored socket's retransmission timer, which has no RTT sample; see [`RestorePlan::apply_client_ack`].
pub async fn ask_clients(plans: &[ConnResume], feed: &mut GateFeed, wait: Duration) -> Answers {
    let started = Instant::now();
    let mut answers = Answers::default();
    let asked: Vec<&RestorePlan> = plans
        .iter()
        .filter(|p| p.unconfirmed_handshake || p.restore.as_ref().is_some_and(|r| !r.send_queue.is_empty()))
        .filter_map(|p| p.restore.as_ref())
        .collect();
    if asked.is_empty() {
        return answers;
    }
    let raw = match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))) {
        Ok(raw) => raw,
        Err(e) => {
            warn!(error = %e, "cannot ask the clients what they received (raw socket); restoring bytes in flight as they are");
            return answers;
        }
    };
    for plan in &asked {
        let packet = probe(plan);
        let dst = SockAddr::from(SocketAddrV4::new(*plan.remote.ip(), 0));
        match raw.send_to(&packet, &dst) {
            Ok(_) => answers.probed += 1,
            Err(e) => debug!(conn = %plan.remote, error = %e, "probing the client failed"),
        }
    }
    let wanted: HashSet<ConnKey> = asked.iter().map(|p| ConnKey { client: p.remote, server: p.local }).collect();
    let sent_at = tokio::time::Instant::now();
    let mut most_at = None;
    loop {
        let elapsed = sent_at.elapsed();
        if answers.by_conn.len() >= most_of(wanted.len()) {
            most_at.get_or_insert(elapsed);
        }
        if answers_done(wanted.len(), answers.by_conn.len(), elapsed, wait, most_at) {
            break;
        }
        let until = sent_at + answers_deadline(wait, most_at);
        let d = match tokio::time::timeout_at(until, feed.diverted.recv()).await {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(_) => continue,
        };
        if d.hook == Hook::PreRouting
            && let Ok(seg) = Segment::parse_ipv4(&d.datagram, Checksums::Verify)
            && seg.flags.ack()
            && !seg.flags.rst()
            && !seg.flags.syn()
        {
            let key = ConnKey { client: seg.src, server: seg.dst };
            if wanted.contains(&key) {
                let newer = answers.by_conn.get(&key).is_none_or(|&(ack, _, _)| seg.ack.diff(ack) >= 0);
                if newer {
                    answers.by_conn.insert(key, (seg.ack, seg.window, seg.seq));
                }
            }
        }
        answers.read.push(d);
    }
    answers.took = started.elapsed();
    let closed: Vec<ConnKey> =
        asked.iter().filter(|p| p.window.snd_wnd == 0).map(|p| ConnKey { client: p.remote, server: p.local }).collect();
    answers.closed_windows = (closed.len(), closed.iter().filter(|k| answers.by_conn.contains_key(k)).count());
    answers
}

/// The probe [`ask_clients`] sends for `plan`: an IPv4 datagram from the server end, one byte at
/// `snd_una - 1` (its value does not matter: the client has that byte and drops the copy).
fn probe(plan: &RestorePlan) -> Vec<u8> {
    let mut seg = SegmentBuilder::new(plan.local, plan.remote);
    seg.flags = TcpFlags::ACK;
    seg.seq = plan.snd_una - 1;
    seg.ack = plan.rcv_nxt;
    let shift = plan.options.wscale.map_or(0, |(_, rcv)| rcv);
    seg.window = (plan.window.rcv_wnd >> shift).min(u32::from(u16::MAX)) as u16;
    let mut opts = TcpOptions::default();
    if plan.options.timestamps {
        opts.timestamps = Some(Timestamps { val: plan.tsval.unwrap_or(0), ecr: plan.ts_recent.unwrap_or(0) });
    }
    seg.options = opts;
    seg.build(&[0])
}

/// Splits `plans` into the connections [`repair::restores_silently`] restores (open both ways, nothing
/// of ours unacknowledged or unsent: idle keep-alive connections, requests being read), which may be
/// restored before the address is announced and the clients are asked, and the rest.
pub fn split_silent(plans: Vec<ConnResume>) -> (Vec<ConnResume>, Vec<ConnResume>) {
    plans
        .into_iter()
        .partition(|p| !p.unconfirmed_handshake && p.restore.as_ref().is_some_and(repair::restores_silently))
}

/// Connections to restore, each plan with its table entry; the plans that restore nothing are already
/// in `report`.
pub struct Batch<'t> {
    todo: Vec<(ConnResume, &'t Conn)>,
    report: RestoreReport,
}

impl<'t> Batch<'t> {
    /// The restorable connections of `plans` (from [`plan_all`] on `table`), each adjusted by its
    /// client's answer when there is one.
    pub fn new(table: &'t ReplicaTable, plans: Vec<ConnResume>, answers: &Answers) -> Batch<'t> {
        let mut report = RestoreReport::default();
        let mut todo = Vec::with_capacity(plans.len());
        let mut adjusted = 0usize;
        for mut plan in plans {
            let answer = answers.by_conn.get(&plan.conn).copied();
            if plan.unconfirmed_handshake {
                // Restored only for a client that answers as an established connection. One still in
                // SYN-SENT ignores the probe, and its next SYN reaches the listener: a new handshake.
                let confirmed =
                    plan.restore.as_mut().zip(answer).is_some_and(|(r, (a, w, s))| r.confirm_handshake(a, w, s));
                if !confirmed {
                    info!(conn = %plan.conn.client, answered = answer.is_some(),
                        "handshake not restored: the client did not confirm it received the SYN-ACK");
                    report.skipped.push((plan.conn, "handshake_unconfirmed"));
                    continue;
                }
                info!(conn = %plan.conn.client, "restoring a handshake whose last ACK was lost: the client confirmed it");
            } else if let Some(r) = plan.restore.as_mut()
                && let Some((ack, window, seq)) = answer
                && r.apply_client_ack(ack, window, seq)
            {
                adjusted += 1;
            }
            let key = plan.conn;
            if plan.restore.is_none() {
                match &plan.decision {
                    Decision::Unprotected { reason } => {
                        warn!(conn = %key.client, %reason, "connection not restored: it was not protected")
                    }
                    Decision::NotRestorable { error } => warn!(conn = %key.client, %error, "connection not restored"),
                    other => warn!(conn = %key.client, path = other.kind(), "connection has no restore plan"),
                }
                report.skipped.push((key, plan.decision.kind()));
                continue;
            }
            match table.conn(&key) {
                Some(entry) => todo.push((plan, entry)),
                None => report.failed.push((key, "vanished from the table".into())),
            }
        }
        if answers.probed > 0 {
            info!(probed = answers.probed, answered = answers.by_conn.len(), adjusted, waited = ?answers.took,
                closed_windows = answers.closed_windows.0, closed_windows_answered = answers.closed_windows.1,
                "asked the clients what they received");
        }
        Batch { todo, report }
    }

    /// Rebuilds every connection of the batch. Must run in the network namespace that holds the VIP,
    /// with the VIP on an interface and the hold in place. The sockets are rebuilt on up to
    /// [`RESTORE_THREADS`] threads at once: each costs a score of system calls, and a takeover of ten
    /// thousand connections waits on them.
    pub fn restore(self, staged: &StagedSockets) -> RestoreReport {
        let started = Instant::now();
        let Batch { todo, mut report } = self;
        let results = restore_parallel(&todo, staged);
        for ((plan, _), result) in todo.into_iter().zip(results) {
            let key = plan.conn;
            let restore = plan.restore.as_ref().expect("only plans with a restore are to do");
            match result {
                Ok((RestoredSocket { stream, staged: was_staged, pending }, prepared)) => {
                    report.staged += was_staged as usize;
                    let (unacked, unread) = (restore.send_queue.len(), restore.recv_queue.len());
                    // Thousands of idle keep-alive connections would flood the log at takeover time.
                    if unacked == 0 && unread == 0 {
                        debug!(conn = %key.client, state = ?restore.state, path = plan.decision.kind(),
                            "connection restored");
                    } else {
                        info!(conn = %key.client, state = ?restore.state, unacked, unread,
                            path = plan.decision.kind(), "connection restored");
                    }
                    report.restored.push(Restored { stream, plan, prepared, pending });
                }
                Err(e) => {
                    error!(conn = %key.client, error = %e, "restoring the connection failed");
                    report.failed.push((key, e));
                }
            }
        }
        report.took = started.elapsed();
        report
    }
}

/// The first part of a restore, on a thread of its own while the takeover claims, gates and announces the
/// address: plan every connection (its queued bytes stay in the table, and the restore writes them into
/// the sockets from there), then, once the address is on the interface ([`Early::address_ready`]), restore
/// the connections [`split_silent`] finds silent. The others' plans come back for the main thread
/// ([`Early::loud_plans`]), which asks their clients first. The connections at rest
/// ([`Tracker::at_rest`](tcp_replay::Tracker::at_rest)) are planned and restored here while a worker plans the
/// others, so the asking overlaps the idle connections' restore. Should the thread not start, the same work
/// is done on the caller's thread, in [`Early::loud_plans`] and [`Early::finish`].
pub struct Early {
    address: std::sync::mpsc::Sender<bool>,
    loud: Option<tokio::sync::oneshot::Receiver<Vec<ConnResume>>>,
    restored: tokio::sync::oneshot::Receiver<RestoreReport>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Without a thread: the table and the silent plans, restored by `finish`.
    inline: Option<(Arc<ReplicaTable>, RetryConfig, Vec<ConnResume>)>,
    staged: Arc<StagedSockets>,
}

impl Early {
    /// Starts the thread (in this thread's network namespace).
    pub fn start(table: Arc<ReplicaTable>, retry: RetryConfig, staged: Arc<StagedSockets>) -> Early {
        let (address, address_rx) = std::sync::mpsc::channel();
        let (loud_tx, loud) = tokio::sync::oneshot::channel();
        let (restored_tx, restored) = tokio::sync::oneshot::channel();
        let (t, r, st) = (table.clone(), retry.clone(), staged.clone());
        let spawned = std::thread::Builder::new().name("restore".into()).spawn(move || {
            let started = Instant::now();
            let now = stream_now();
            // Most of a large table is at rest (idle keep-alive connections): it all restores silently, here,
            // as soon as the address is up. The others (bytes in flight, closing, opening) are planned
            // meanwhile on a thread of their own, for the main thread to ask their clients.
            let (at_rest, others): (Vec<&Conn>, Vec<&Conn>) =
                t.conns().partition(|c| c.tracked().is_some_and(|c| c.tracker().at_rest()));
            let loud_tx = std::sync::Mutex::new(Some(loud_tx));
            let plan_others = || {
                let (silent, loud) = split_silent(plan_conns(&others, now, &r));
                let bytes: usize = loud
                    .iter()
                    .filter_map(|p| p.restore.as_ref())
                    .map(|p| p.send_queue.len() + p.recv_queue.len())
                    .sum();
                info!(others = others.len(), loud = loud.len(), bytes, took = ?started.elapsed(),
                    "planned the connections not at rest");
                if let Some(tx) = loud_tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = tx.send(loud);
                }
                silent
            };
            std::thread::scope(|s| {
                let worker = std::thread::Builder::new().name("plan".into()).spawn_scoped(s, plan_others);
                // `at_rest` predicts `split_silent`; were it wrong, the connection is restored without asking
                // its client, which costs at worst a retransmission timer's wait.
                let mut silent = plan_conns(&at_rest, now, &r);
                info!(at_rest = at_rest.len(), took = ?started.elapsed(), "planned the connections at rest");
                let worker = match worker {
                    Ok(worker) => Some(worker),
                    Err(e) => {
                        warn!(error = %e, "cannot start a planning thread; planning every connection on this one");
                        silent.extend(plan_others());
                        None
                    }
                };
                // Staged sockets need no address: they leave repair mode now, while the takeover claims and
                // announces it (nothing is sent before their tasks write, after the takeover).
                let (early_report, silent) = finish_staged(&t, silent, &st);
                let batch = Batch::new(&t, silent, &Answers::default());
                // Without the address a restore cannot bind; `false` or the sender gone: the takeover gave up.
                if address_rx.recv() != Ok(true) {
                    early_report.discard();
                    return;
                }
                let mut report = batch.restore(&st);
                let took = report.took + early_report.took;
                report.merge(early_report);
                report.took = took;
                match worker.map(|w| w.join()) {
                    Some(Ok(more)) => {
                        // Restored after the others, not beside them: the times add up.
                        let more = Batch::new(&t, more, &Answers::default()).restore(&st);
                        let took = report.took + more.took;
                        report.merge(more);
                        report.took = took;
                    }
                    Some(Err(_)) => error!("planning the connections not at rest panicked; they are not restored"),
                    None => {}
                }
                info!(restored = report.restored.len(), staged = report.staged, took = ?report.took,
                    "restored the silent connections");
                let _ = restored_tx.send(report);
            });
        });
        let mut early = Early { address, loud: Some(loud), restored, thread: None, inline: None, staged };
        match spawned {
            Ok(thread) => early.thread = Some(thread),
            Err(e) => {
                warn!(error = %e, "cannot start a restore thread; planning and restoring on this one");
                early.loud = None;
                early.inline = Some((table, retry, Vec::new()));
            }
        }
        early
    }

    /// The address is on the interface: the silent connections may be restored.
    pub fn address_ready(&self) {
        let _ = self.address.send(true);
    }

    /// The plans of the connections left to restore (each call after the first gets none).
    pub async fn loud_plans(&mut self) -> Vec<ConnResume> {
        if let Some((table, retry, silent)) = self.inline.as_mut() {
            let (s, loud) = split_silent(plan_all(table, retry));
            *silent = s;
            return loud;
        }
        match self.loud.take() {
            Some(rx) => rx.await.unwrap_or_else(|_| {
                error!("planning the takeover failed (the restore thread ended); no connection is restored");
                Vec::new()
            }),
            None => Vec::new(),
        }
    }

    /// The silent connections' restore, once done.
    pub async fn finish(mut self) -> RestoreReport {
        if let Some((table, _, silent)) = self.inline.take() {
            return Batch::new(&table, silent, &Answers::default()).restore(&self.staged);
        }
        let report = (&mut self.restored).await.unwrap_or_else(|_| {
            error!("the restore of the idle connections did not finish (its thread ended); they are lost");
            RestoreReport::default()
        });
        self.join();
        report
    }

    /// The takeover gives up: whatever was restored is closed silently.
    pub async fn abandon(mut self) {
        let _ = self.address.send(false);
        if self.thread.is_some()
            && let Ok(report) = (&mut self.restored).await
        {
            report.discard();
        }
        self.join();
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("the restore thread panicked");
        }
    }
}

impl RestoreReport {
    /// Adds `other`'s connections to this report, restored at the same time: the time is the longer.
    pub fn merge(&mut self, other: RestoreReport) {
        self.restored.extend(other.restored);
        self.failed.extend(other.failed);
        self.skipped.extend(other.skipped);
        self.staged += other.staged;
        self.took = self.took.max(other.took);
    }

    /// Closes every restored socket without a segment to its client (a takeover that gives up: the
    /// connections are lost either way, but a FIN or RST from the address would end them at once).
    pub fn discard(self) {
        for r in self.restored {
            if let Err(e) = repair::vanish(&r.stream) {
                debug!(conn = %r.plan.conn.client, error = %e, "closing a restored socket silently failed");
            }
        }
    }
}

/// Takes the sockets `staged` for `plans` out of repair mode where they fit, which needs no address on this
/// host yet; the plans left (no staged socket that fits, or one that failed to leave repair mode) are
/// returned, to be rebuilt once the address is here.
fn finish_staged(
    table: &ReplicaTable,
    plans: Vec<ConnResume>,
    staged: &StagedSockets,
) -> (RestoreReport, Vec<ConnResume>) {
    let started = Instant::now();
    let mut report = RestoreReport::default();
    if staged.is_empty() {
        return (report, plans);
    }
    let (ready, mut rest): (Vec<ConnResume>, Vec<ConnResume>) = plans.into_iter().partition(|p| {
        !p.unconfirmed_handshake
            && table.conn(&p.conn).is_some()
            && p.restore.as_ref().is_some_and(|r| staged.fits(&p.conn, r))
    });
    let finished = in_parallel("restore", &ready, |p| staged.take(&p.conn).map(|s| s.finish()));
    for (plan, finished) in ready.into_iter().zip(finished) {
        match (finished, table.conn(&plan.conn)) {
            (Some(Ok(stream)), Some(conn)) => {
                let prepared = Prepared::of(&plan, conn);
                report.staged += 1;
                report.restored.push(Restored { stream, plan, prepared, pending: None });
            }
            (finished, _) => {
                match finished {
                    Some(Err(e)) => {
                        warn!(conn = %plan.conn.client, error = %e, "a staged socket failed to leave repair mode; rebuilding it")
                    }
                    // Its entry went (it cannot while the takeover holds the table): closed without a segment.
                    Some(Ok(stream)) => drop(repair::vanish(&stream)),
                    None => {}
                }
                rest.push(plan);
            }
        }
    }
    report.took = started.elapsed();
    (report, rest)
}

/// Rebuilds the restorable connections of `plans` (see [`Batch`]), with the sockets `staged` for them
/// where they fit.
pub fn restore_all(
    table: &ReplicaTable,
    plans: Vec<ConnResume>,
    answers: &Answers,
    staged: &StagedSockets,
) -> RestoreReport {
    Batch::new(table, plans, answers).restore(staged)
}

/// Threads [`restore_all`] rebuilds sockets on at most (the machine's parallelism bounds it too).
pub const RESTORE_THREADS: usize = 4;

/// Fewest connections worth a thread of their own. A busy connection's restore writes up to a megabyte (its
/// `replica_bytes_per_connection`) into its socket, so even a few dozen are worth splitting: with 256, the
/// hundred busy connections of `us-scale` were restored on one thread (A/B, three runs each, when their plans
/// still copied those bytes too: restore 297, 298 and 305 ms with 32, against 292, 363 and 430 ms).
const PER_THREAD_MIN: usize = 32;

/// Restores each plan of `todo` (all have a restore plan), in order, split across threads, and reads
/// what resuming it takes from its table entry; whether the socket was a staged one.
fn restore_parallel(
    todo: &[(ConnResume, &Conn)],
    staged: &StagedSockets,
) -> Vec<Result<(RestoredSocket, Prepared), String>> {
    in_parallel("restore", todo, |(plan, conn)| {
        let restore = plan.restore.as_ref().expect("only plans with a restore are to do");
        let restored = restore_one(restore, conn, staged.take(&plan.conn));
        restored.map(|socket| (socket, Prepared::of(plan, conn)))
    })
}

/// A connection's socket, as [`restore_one`] made it.
struct RestoredSocket {
    stream: std::net::TcpStream,
    /// It was staged ([`crate::staging`]) and only left repair mode.
    staged: bool,
    /// Its unsent bytes, for its task to write.
    pending: Option<Pending>,
}

/// `f` of each item, in order, split across up to [`RESTORE_THREADS`] threads (fewer for short lists or a
/// smaller machine). A thread that cannot start, or dies, leaves its part to the caller's thread.
fn in_parallel<T: Sync, R: Send>(what: &str, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = parallelism.min(RESTORE_THREADS).min(items.len() / PER_THREAD_MIN).max(1);
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                std::thread::Builder::new()
                    .name(what.to_owned())
                    .spawn_scoped(s, move || part.iter().map(f).collect::<Vec<_>>())
            })
            .collect();
        let mut results = Vec::with_capacity(items.len());
        for (worker, part) in workers.into_iter().zip(items.chunks(chunk)) {
            match worker.map_err(|e| e.to_string()).and_then(|w| w.join().map_err(|_| "panicked".to_owned())) {
                Ok(done) => results.extend(done),
                Err(e) => {
                    warn!(error = %e, items = part.len(), what, "a worker thread failed; doing its part here");
                    results.extend(part.iter().map(f));
                }
            }
        }
        results
    })
}

/// The socket of `plan`, made in place from `conn`: `staged` out of repair mode if it fits the plan, else
/// rebuilt, its queues written from the entry's tracker, except for unsent bytes, copied for its task to
/// write (copying them into the socket here was most of a takeover's restore with busy connections).
fn restore_one(plan: &RestorePlan, conn: &Conn, staged: Option<Staged>) -> Result<RestoredSocket, String> {
    if let Some(staged) = staged {
        if staged.fits(plan) {
            match staged.finish() {
                Ok(stream) => return Ok(RestoredSocket { stream, staged: true, pending: None }),
                Err(e) => {
                    warn!(conn = %plan.remote, error = %e, "a staged socket failed to leave repair mode; rebuilding it")
                }
            }
        } else {
            // It holds the four-tuple the rebuild needs: closed first, silently (repair mode).
            debug!(conn = %plan.remote, "the staged socket no longer fits the connection; rebuilding it");
            drop(staged);
        }
    }
    let source: &dyn QueueSource = match conn.tracked() {
        Some(t) => t.tracker(),
        None => &NoSource,
    };
    let unsent = match plan.unsent.is_empty() {
        true => None,
        false => {
            let pieces = plan.unsent.pieces(Dir::ToClient, source);
            Some(pieces.ok_or("the unsent bytes are no longer in the table")?.concat())
        }
    };
    let (stream, left) = repair::restore_nonblocking_leaving_unsent(plan, source).map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let pending = left.zip(unsent).map(|(left, bytes)| Pending { bytes, left });
    Ok(RestoredSocket { stream, staged: false, pending })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_list_each_step_since_the_previous_one() {
        let t0 = Instant::now();
        let mut phases = Phases::start(t0);
        phases.mark_at("hold", t0 + Duration::from_micros(1500));
        phases.mark_at("restore", t0 + Duration::from_millis(12));
        assert_eq!(phases.to_string(), "hold=1.5ms restore=10.5ms");
    }

    #[test]
    fn hold_passes_injected_segments_before_dropping_and_matches_no_socket() {
        let rules = hold_rules(Ipv4Addr::new(10, 0, 0, 100), 80, "understudy:b-hold");
        let text: Vec<String> = rules.iter().map(|r| r.args.join(" ")).collect();
        assert_eq!(rules.len(), 2);
        assert!(text[0].contains(&format!("--mark {INJECT_MARK:#x} -j ACCEPT")), "{}", text[0]);
        assert!(text[1].ends_with("-j DROP -m comment --comment understudy:b-hold"), "{}", text[1]);
        // Removing a socket match would flush the gate's queue (see the module's docs).
        assert!(text.iter().all(|t| !t.contains("-m socket")), "{text:?}");
        assert!(text.iter().all(|t| t.starts_with("-p tcp -d 10.0.0.100/32 --dport 80")));
    }

    /// Waits up to `wait` for a pure ACK from `from` to `to`, read off `watch` (a raw TCP socket, which
    /// gets a copy of every TCP segment this host receives); its ack.
    fn answer(watch: &Socket, from: SocketAddrV4, to: SocketAddrV4, wait: Duration) -> Option<Seq> {
        let deadline = Instant::now() + wait;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            watch.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
            let Ok(n) = watch.recv(&mut buf) else { continue };
            // SAFETY: recv initialised the first n bytes.
            let bytes: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            if let Ok(seg) = Segment::parse_ipv4(&bytes, Checksums::Skip)
                && seg.src == from
                && seg.dst == to
                && seg.flags.ack()
                && seg.payload.is_empty()
            {
                return Some(seg.ack);
            }
        }
        None
    }

    /// The probe against a real client (loopback): answered at once, even right after the client answered
    /// a pure out-of-window ACK, which Linux answers at most once per `tcp_invalid_ratelimit`. Clients
    /// with a closed window answer the old primary's zero-window probes (such ACKs) all the time.
    #[test]
    fn a_client_answers_the_probe_even_right_after_answering_an_out_of_window_ack() {
        use std::io::{Read, Write};
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "needs root (TCP_REPAIR to read the server's state, raw sockets)");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        // Once the client's ACK of those bytes reached the server, its plan has nothing in flight.
        let deadline = Instant::now() + Duration::from_secs(5);
        let plan = loop {
            let plan = repair::checkpoint(&server).unwrap();
            if plan.send_queue.is_empty() {
                break plan;
            }
            assert!(Instant::now() < deadline, "the client never acknowledged the server's bytes");
            std::thread::sleep(Duration::from_millis(1));
        };
        let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).unwrap();
        let watch = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).unwrap();
        let to_client = SockAddr::from(SocketAddrV4::new(*plan.remote.ip(), 0));
        let wait = Duration::from_millis(300);

        // A pure ACK out of the window, as a zero-window probe: the client answers it...
        let mut oow = SegmentBuilder::new(plan.local, plan.remote);
        oow.flags = TcpFlags::ACK;
        oow.seq = plan.snd_una - 1;
        oow.ack = plan.rcv_nxt;
        oow.window = 1000;
        if plan.options.timestamps {
            let val = plan.tsval.unwrap_or(0);
            oow.options.timestamps = Some(Timestamps { val, ecr: 0 });
        }
        raw.send_to(&oow.build(&[]), &to_client).unwrap();
        assert_eq!(answer(&watch, plan.remote, plan.local, wait), Some(plan.snd_una), "a first out-of-window ACK");
        // ...and then the probe, at once.
        raw.send_to(&probe(&plan), &to_client).unwrap();
        assert_eq!(
            answer(&watch, plan.remote, plan.local, wait),
            Some(plan.snd_una),
            "the probe went unanswered after an out-of-window ACK"
        );
        drop((client, server));
    }

    #[test]
    fn the_wait_for_answers_ends_soon_after_most_clients_answered() {
        let ms = Duration::from_millis;
        let wait = ANSWER_WAIT;
        assert!(answers_done(200, 200, ms(1), wait, Some(ms(1))), "all answered");
        assert!(answers_done(200, 0, wait, wait, None), "nobody answered: the whole wait");
        assert!(!answers_done(200, 150, ms(40), wait, None), "fewer than nine in ten: waiting on");
        assert_eq!(most_of(200), 180);
        assert_eq!(most_of(1), 1);
        assert_eq!(most_of(11), 10);
        // Most answered after 2 ms: the last few get three times as long.
        assert!(!answers_done(200, 195, ms(5), wait, Some(ms(2))));
        assert!(answers_done(200, 195, ms(6), wait, Some(ms(2))));
        // Near clients: never less than the floor.
        assert!(!answers_done(200, 199, ms(4), wait, Some(Duration::from_micros(300))));
        assert!(answers_done(200, 199, LATE_ANSWER_MIN, wait, Some(Duration::from_micros(300))));
        // Far clients (most after 30 ms): the whole wait bounds the rest.
        assert!(!answers_done(200, 190, ms(49), wait, Some(ms(30))));
        assert!(answers_done(200, 190, wait, wait, Some(ms(30))));
    }
}
