//! The primary's replication sender (ARCHITECTURE.md invariants 1 to 3, "Data path", "Inbound gate",
//! "Outbound control", "Reply log", "Who owns the VIP").
//!
//! One task owns the stream. It takes, in one order:
//! * every [`Diverted`] segment from the gate (client segments, and this node's SYN-ACK/FIN/RST) as
//!   [`Message::Segment`], stamped with its direction and arrival time;
//! * from the proxy's [`ReplicaHooks`]: reply bytes ([`Message::Reply`]), exchange starts, upstream
//!   response bytes and exchange ends;
//! * from its own sweep: [`Message::ConnClosed`] once a connection is over;
//! * for a joining spare: the snapshot ([`Message::SnapshotBegin`] .. [`Message::SnapshotEnd`]).
//!
//! Each record is numbered, applied to the primary's own [`ReplicaTable`] and queued on the link in
//! the same step, so the local table is the stream's deterministic function (invariant 2), and a
//! snapshot taken between two steps is a consistent point: nothing is applied between it and the
//! first record streamed after it (invariant 3).
//!
//! **Always applied locally.** With no backup the table is still kept: it is what a spare joining
//! later gets as its snapshot, and a spare needs every live connection from its handshake on (a
//! connection first seen mid-stream can never be protected).
//!
//! # Output commit
//!
//! The task keeps a commit point (a sequence number). A diverted segment is released into the kernel
//! (`Gate::release_upto`, in queue order) and a reply append resolves only once the commit point has
//! reached its record. [`OutputCommit`] moves the point:
//! * no backup: at once (serving unprotected);
//! * a spare is syncing (its snapshot not yet acknowledged): at once. It holds no usable replica
//!   before its snapshot, so waiting would stall clients for the whole transfer and protect nothing.
//!   The pair counts as protected ([`PeerState::Connected`]) once the backup acknowledged every
//!   record released that way;
//! * protected: to the backup's cumulative ack, while the lease is valid;
//! * suspecting the backup, or stepped down: not at all.
//!
//! # Backup loss (the lease, `shared::lease`)
//!
//! Each ack renews the lease from the time its record was *queued* (never later than it was sent), each
//! heartbeat echo from the time the echoed heartbeat was sent, so an idle pair keeps its lease and a
//! process resumed from a freeze finds it expired whatever answers wait in its socket. The backup is suspected when the link breaks, or when the lease has expired
//! and either a record has waited a whole lease for its ack or the backup has been silent for a lease.
//! A suspected backup stops the commit point; the VIP is probed ([`VipCheck`]) and
//! [`LeaseOutcome::decide`] says: nobody answers, so drop the backup and serve unprotected (everything
//! held is released); another node answers or a later epoch exists, so step down (nothing more is ever
//! released, reply appends fail); or probe again. Acks resuming meanwhile end the suspicion. Worst-case
//! client stall when the backup dies silently: lease + probe time ([`shared::lease::backup_loss_stall`]).
//!
//! # What goes in the records
//!
//! * `Segment.at_us`: wall-clock microseconds since the Unix epoch at this task's start plus monotonic
//!   time since, so it never goes backwards within a run, and a backup can relate it to its own clock.
//! * `ExchangeStart.request_offset` is 0: hyper reads ahead and the proxy cannot tell where a request
//!   began; the replica's framer is authoritative and pairs requests with starts by exchange number.
//! * `Upstream`: the proxy sees the upstream's response head after hop-by-hop processing and its body
//!   de-chunked (RFC 9112 §7.1). The log carries an HTTP/1.1 message rebuilt from them: the status line
//!   and fields, then the body as received when the head has a `Content-Length`, otherwise re-chunked
//!   (`Transfer-Encoding: chunked` added, one chunk per piece, the last chunk when the exchange ends
//!   complete). Decoded body offsets are the upstream's.
//! * `ExchangeEnd` only for an exchange whose response reached its end.
//! * `ConnClosed` when the proxy has closed the connection and the table shows it over (RST, or both
//!   FINs acknowledged) and the records that showed it so are committed (this node's kernel then
//!   acknowledged the client's last FIN; frozen for a switchover, it never does, and the backup takes
//!   the connection over to acknowledge it), it was never followed (unprotected), or no segment has
//!   been seen for `conn_linger`; and for connections the proxy never opened once they are over or older than
//!   `conn_linger`. The check and the record are one step, so a reused port never loses its new
//!   connection.
//!
//! Known gap: the proxy's observer API is synchronous, so a request may go upstream before its
//! `ExchangeStart` is acknowledged (see [`ReplicaObserver::start_committed`]).

use crate::gate::{Checksum, Diverted, Gate};
use crate::proxy::{ConnectionHooks, ExchangeInfo, ExchangeObserver, ExchangeOutcome, ReplyLog};
use bytes::{Bytes, BytesMut};
use shared::admin::{AdminState, ConnectionGuard, GateQueue, PeerState, Protection, UnprotectedReason};
use shared::codec;
use shared::config::NodeConfig;
use shared::frame::{self, Parsed};
use shared::lease::{Lease, LeaseOutcome, LeaseState, StepDownReason, VipProbe};
use shared::link::{
    self, Accepted, HandshakeError, InvalidLinkConfig, LinkConfig, LocalIdentity, PeerLiveness, PrimaryLink,
    RecordSender, Refusal, TrySendError,
};
use shared::protocol::{ConnKey, ExchangeStart, HANDOVER_VERSION, Handshake, Message, Record, Role, Welcome};
use shared::replica::table::Unprotection;
use shared::replica::{Applied, ReplicaTable};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tcp_replay::{Dir, TcpState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// Largest piece of upstream body carried in one record.
const MAX_UPSTREAM_PIECE: usize = 256 << 10;
/// How far ahead the output lease is granted while no backup is linked (nobody can take over then; a
/// grant is renewed at every wake-up and revoked the moment a backup is suspected).
const ALONE_GRANT: Duration = Duration::from_secs(3600);
/// Leases of silence after which a backup still receiving its snapshot is given up.
pub const SYNCING_SILENCE_LEASES: u32 = 8;
/// How far ahead the output lease is granted while a joining backup receives its snapshot (renewed at
/// every wake-up): longer than building and sending a large snapshot keeps the sender busy.
const SYNCING_GRANT: Duration = Duration::from_secs(1);
/// Inputs handled per wake-up before the commit point and the gate are looked at again.
const BATCH: usize = 64;

// -------------------------------------------------------------------------------------------------
// The commit rule (pure)
// -------------------------------------------------------------------------------------------------

/// What [`OutputCommit`] asks its driver to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitEvent {
    /// The pair's state as `/status` shows it changed.
    Peer(PeerState),
    /// Probe the VIP and report the result with [`OutputCommit::handle_probe`]`(id, ..)`.
    Probe { id: u64 },
    /// Queue a [`lease_ping`] record: a live backup's ack of it renews the lease at once.
    LeasePing,
    /// The backup, suspected for `reason`, is given up: close its link; the node serves unprotected from
    /// now on.
    DropLink { reason: SuspectReason },
    /// Another node serves the VIP, or a later epoch exists: release nothing more, ever.
    StepDown(StepDownReason),
}

/// Why a join cannot start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkUpError {
    /// A backup is connected (or being given up): one at a time.
    #[error("a backup is already connected")]
    Busy,
    /// This node stepped down.
    #[error("this node stepped down and streams to nobody")]
    SteppedDown,
}

/// Why the backup is suspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspectReason {
    /// The replication link ended.
    LinkDown,
    /// The lease ran out while a record waited a whole lease for its ack.
    AckOverdue,
    /// The lease ran out and nothing was heard from the backup for a whole lease.
    Silent,
}

impl std::fmt::Display for SuspectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SuspectReason::LinkDown => "replication link ended",
            SuspectReason::AckOverdue => "the backup's acknowledgements overdue by a lease",
            SuspectReason::Silent => "the backup silent for a lease",
        })
    }
}

/// Records and encoded bytes an ack newly covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acked {
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
struct InFlight {
    seq: u64,
    at: Instant,
    bytes: u64,
}

#[derive(Debug, Clone)]
struct Suspicion {
    reason: SuspectReason,
    probe: u64,
}

#[derive(Debug, Clone)]
struct LinkBook {
    lease: Lease,
    acked: u64,
    /// Last record of the joining spare's snapshot.
    snapshot_end: u64,
    /// Highest record released before the backup acknowledged it (while syncing).
    early_upto: u64,
    synced: bool,
    down: bool,
    /// Records not acknowledged yet.
    in_flight: VecDeque<InFlight>,
    /// Records (sequence, queued at) the commit point has not reached, once synced.
    uncommitted: VecDeque<(u64, Instant)>,
    suspect: Option<Suspicion>,
}

#[derive(Debug, Clone)]
enum State {
    Alone,
    Linked(Box<LinkBook>),
    SteppedDown(StepDownReason),
}

/// The output-commit rule of the module documentation, as a state machine: inputs through
/// `handle_*` (time passed in), outputs through [`committed`](Self::committed) and
/// [`poll_event`](Self::poll_event). Call order: number each record with
/// [`handle_sent`](Self::handle_sent); feed acks, link ends, probe results and the time; after every
/// call drain `poll_event`, and wake up at [`poll_timeout`](Self::poll_timeout).
#[derive(Debug, Clone)]
pub struct OutputCommit {
    lease: Duration,
    own_epoch: u64,
    highest_epoch: u64,
    sent: u64,
    committed: u64,
    state: State,
    peer: PeerState,
    next_probe: u64,
    events: VecDeque<CommitEvent>,
    /// Handing over (planned switchover): nothing more is committed, whatever comes.
    frozen: bool,
}

impl OutputCommit {
    /// A primary at `own_epoch` with no backup, whose last record was `last_seq` (0 for a fresh
    /// stream), holding backups to a lease of `lease` (above zero).
    pub fn new(lease: Duration, own_epoch: u64, last_seq: u64) -> Result<OutputCommit, shared::lease::LeaseError> {
        Lease::new(lease, Instant::now())?;
        Ok(OutputCommit {
            lease,
            own_epoch,
            highest_epoch: own_epoch,
            sent: last_seq,
            committed: last_seq,
            state: State::Alone,
            peer: PeerState::None,
            next_probe: 0,
            events: VecDeque::new(),
            frozen: false,
        })
    }

    /// Stops committing for good (a planned switchover): records are still numbered and sent to the
    /// backup, which takes over with them, but none reaches a client from here, the backup is never
    /// suspected, and the output grant is revoked.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Whether [`freeze`](Self::freeze) was called.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Numbers the next record (`bytes`: its approximate encoded size) queued at `now`.
    pub fn handle_sent(&mut self, now: Instant, bytes: u64) -> u64 {
        self.sent += 1;
        let seq = self.sent;
        match &mut self.state {
            State::Alone if !self.frozen => self.committed = seq,
            State::Alone => {}
            State::Linked(l) => {
                if !l.down {
                    l.in_flight.push_back(InFlight { seq, at: now, bytes });
                }
                if !l.synced && l.suspect.is_none() && !self.frozen {
                    self.committed = seq;
                    l.early_upto = seq;
                } else {
                    l.uncommitted.push_back((seq, now));
                }
            }
            State::SteppedDown(_) => {}
        }
        seq
    }

    /// A spare's handshake completed at `granted_at` and its snapshot of `snapshot_records` records
    /// follows. Returns the sequence number of the snapshot's first record.
    pub fn handle_link_up(&mut self, granted_at: Instant, snapshot_records: u64) -> Result<u64, LinkUpError> {
        match self.state {
            State::Alone => {}
            State::Linked(_) => return Err(LinkUpError::Busy),
            State::SteppedDown(_) => return Err(LinkUpError::SteppedDown),
        }
        let lease = Lease::new(self.lease, granted_at).expect("the lease duration was checked in new");
        self.state = State::Linked(Box::new(LinkBook {
            lease,
            acked: self.sent,
            snapshot_end: self.sent + snapshot_records,
            early_upto: self.sent,
            synced: snapshot_records == 0,
            down: false,
            in_flight: VecDeque::new(),
            uncommitted: VecDeque::new(),
            suspect: None,
        }));
        self.update_peer();
        Ok(self.sent + 1)
    }

    /// The backup acknowledged every record up to `upto` at `now`.
    pub fn handle_ack(&mut self, now: Instant, upto: u64) -> Acked {
        let State::Linked(l) = &mut self.state else { return Acked::default() };
        if l.down || upto <= l.acked {
            return Acked::default();
        }
        let mut acked = Acked::default();
        let mut anchor = None;
        while l.in_flight.front().is_some_and(|f| f.seq <= upto) {
            let f = l.in_flight.pop_front().expect("front exists");
            acked.records += 1;
            acked.bytes += f.bytes;
            anchor = Some(f.at);
        }
        if let Some(sent_at) = anchor {
            l.lease.handle_ack(now, sent_at);
        }
        l.acked = upto.min(self.sent);
        if !l.synced && l.acked >= l.snapshot_end {
            l.synced = true;
        }
        if l.suspect.is_some() && l.lease.state(now).is_valid() {
            l.suspect = None;
        }
        self.advance(now);
        self.update_peer();
        acked
    }

    /// The backup answered, by `now`, a heartbeat this node sent at `sent_at`: renews the lease like an ack
    /// of a record sent then (an idle pair keeps its lease; a resumed process reading old answers does not).
    pub fn handle_echo(&mut self, now: Instant, sent_at: Instant) {
        let State::Linked(l) = &mut self.state else { return };
        l.lease.handle_ack(now, sent_at);
        if l.suspect.is_some() && l.lease.state(now).is_valid() {
            l.suspect = None;
        }
        self.advance(now);
    }

    /// The link ended at `now`: the lease ends, and the backup is suspected at once.
    pub fn handle_link_down(&mut self, now: Instant) {
        let State::Linked(l) = &mut self.state else { return };
        l.lease.handle_link_down(now);
        l.down = true;
        l.in_flight.clear();
        if l.suspect.is_none() && !self.frozen {
            self.suspect(SuspectReason::LinkDown);
        }
    }

    /// Time passed: `peer_silent_for` is how long nothing was heard from the backup.
    ///
    /// A record that waited a whole lease for its ack makes the backup suspect even while the lease is
    /// valid: heartbeat echoes keep the lease of a backup whose link is alive but whose applier is stuck,
    /// and clients must not wait on it for longer than that.
    ///
    /// A backup still syncing holds nothing a client waits for (records are released at once), while a
    /// large snapshot keeps both ends busy and delays its answers: it is given up only after
    /// [`SYNCING_SILENCE_LEASES`] leases of silence, so a join is not restarted from scratch over and over.
    pub fn handle_timeout(&mut self, now: Instant, peer_silent_for: Duration) {
        let grace = self.lease;
        let State::Linked(l) = &mut self.state else { return };
        if l.suspect.is_some() || self.frozen {
            return;
        }
        let silence = if l.synced { grace } else { grace * SYNCING_SILENCE_LEASES };
        let overdue = l.uncommitted.front().is_some_and(|&(_, at)| now.saturating_duration_since(at) >= grace);
        if overdue {
            self.suspect(SuspectReason::AckOverdue);
        } else if l.lease.state(now).is_valid() {
            self.advance(now);
        } else if peer_silent_for >= silence {
            self.suspect(SuspectReason::Silent);
        }
    }

    /// The VIP probe `id` finished with `probe`.
    pub fn handle_probe(&mut self, id: u64, probe: &VipProbe) {
        let State::Linked(l) = &self.state else { return };
        if self.frozen || l.suspect.as_ref().is_none_or(|s| s.probe != id) {
            return;
        }
        match LeaseOutcome::decide(self.own_epoch, self.highest_epoch, probe) {
            LeaseOutcome::CarryOnUnprotected => {
                let reason = l.suspect.as_ref().map_or(SuspectReason::LinkDown, |s| s.reason);
                self.state = State::Alone;
                self.committed = self.sent;
                self.events.push_back(CommitEvent::DropLink { reason });
            }
            LeaseOutcome::StepDown { reason } => self.step_down(reason),
            LeaseOutcome::KeepHolding { probe_again: true } => {
                let reason = l.suspect.as_ref().map_or(SuspectReason::LinkDown, |s| s.reason);
                self.suspect(reason);
            }
            LeaseOutcome::KeepHolding { probe_again: false } => {}
        }
        self.update_peer();
    }

    /// Some node showed `epoch` (a refused join, a handshake): a later one than this node's means
    /// this primary is stale and steps down at once.
    pub fn handle_epoch_seen(&mut self, epoch: u64) {
        self.highest_epoch = self.highest_epoch.max(epoch);
        if epoch > self.own_epoch && !matches!(self.state, State::SteppedDown(_)) {
            self.step_down(StepDownReason::HigherEpoch { ours: self.own_epoch, seen: epoch });
            self.update_peer();
        }
    }

    /// The next thing for the driver to do.
    pub fn poll_event(&mut self) -> Option<CommitEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) has something to decide without other input.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let State::Linked(l) = &self.state else { return None };
        if l.suspect.is_some() || l.down {
            return None;
        }
        // Silence is the driver's to poll (it reads the link); an expired lease needs no more wake-ups.
        let expiry = Some(l.lease.poll_timeout()).filter(|_| l.lease.state(now).is_valid());
        let overdue = l.uncommitted.front().map(|&(_, at)| at + self.lease);
        expiry.into_iter().chain(overdue).min()
    }

    /// Every record up to this one may reach the client.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The last record numbered.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The backup's cumulative ack, while one is linked.
    pub fn acked(&self) -> Option<u64> {
        match &self.state {
            State::Linked(l) => Some(l.acked),
            _ => None,
        }
    }

    /// The pair's state for `/status`.
    pub fn peer(&self) -> PeerState {
        self.peer
    }

    /// Whether records are held because the backup is suspected.
    pub fn suspected(&self) -> Option<SuspectReason> {
        match &self.state {
            State::Linked(l) => l.suspect.as_ref().map(|s| s.reason),
            _ => None,
        }
    }

    /// Why this node stepped down, if it did.
    pub fn stepped_down(&self) -> Option<StepDownReason> {
        match self.state {
            State::SteppedDown(r) => Some(r),
            _ => None,
        }
    }

    /// Until when this node's kernel may go on sending from the VIP ([`Gate::grant_output`]): `alone` ahead
    /// while no backup exists, `syncing` ahead while it receives its snapshot; once it is synced, no later than `after_answer` past the send time of its
    /// latest answer (never arrival time: a process resumed from a freeze reads answers the backup sent
    /// long ago) and never past the lease; `now` (revoked) once suspected, expired or stepped down.
    pub fn output_grant(&self, now: Instant, alone: Duration, syncing: Duration, after_answer: Duration) -> Instant {
        if self.frozen {
            return now;
        }
        match &self.state {
            State::Alone => now + alone,
            State::SteppedDown(_) => now,
            State::Linked(l) if l.suspect.is_some() => now,
            // A backup still receiving its snapshot restores nothing if it takes over, so this kernel's
            // output harms no connection of it; and its answers wait behind the snapshot's bytes.
            State::Linked(l) if !l.synced => now + syncing,
            State::Linked(l) => match l.lease.state(now) {
                LeaseState::Valid { until } => until.min(l.lease.anchor() + after_answer).max(now),
                LeaseState::Expired { .. } => now,
            },
        }
    }

    /// Whether a backup is linked (or being given up): a join must wait.
    pub fn is_linked(&self) -> bool {
        matches!(self.state, State::Linked(_))
    }

    fn advance(&mut self, now: Instant) {
        if let State::Linked(l) = &mut self.state
            && !self.frozen
            && l.synced
            && l.suspect.is_none()
            && l.lease.state(now).is_valid()
        {
            self.committed = self.committed.max(l.acked);
            while l.uncommitted.front().is_some_and(|&(seq, _)| seq <= self.committed) {
                l.uncommitted.pop_front();
            }
        }
    }

    fn suspect(&mut self, reason: SuspectReason) {
        let id = self.next_probe;
        self.next_probe += 1;
        if let State::Linked(l) = &mut self.state {
            l.suspect = Some(Suspicion { reason, probe: id });
            if !l.down {
                self.events.push_back(CommitEvent::LeasePing);
            }
            self.events.push_back(CommitEvent::Probe { id });
        }
    }

    fn step_down(&mut self, reason: StepDownReason) {
        self.state = State::SteppedDown(reason);
        self.events.push_back(CommitEvent::StepDown(reason));
    }

    fn update_peer(&mut self) {
        let peer = match &self.state {
            State::Alone | State::SteppedDown(_) => PeerState::None,
            State::Linked(l) if l.synced && l.acked >= l.early_upto => PeerState::Connected,
            // Once connected, a suspicion does not make the pair "syncing" again.
            State::Linked(l) if l.suspect.is_some() && self.peer == PeerState::Connected => PeerState::Connected,
            State::Linked(_) => PeerState::Syncing,
        };
        if peer != self.peer {
            self.peer = peer;
            self.events.push_back(CommitEvent::Peer(peer));
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Configuration, errors, the VIP check
// -------------------------------------------------------------------------------------------------

/// How the sender runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// This node as the handshake states it (role primary, its epoch).
    pub identity: LocalIdentity,
    /// The replication link's tuning.
    pub link: LinkConfig,
    /// The lease (`NodeConfig::lease`).
    pub lease: Duration,
    /// How long after the send time of the backup's latest answer the kernel may still send from the VIP:
    /// less than the detection time, after which the backup declares this node dead.
    pub output_grant: Duration,
    /// How long a connection the proxy closed may stay in the table without any segment before it
    /// is dropped anyway (a client that never acknowledges our FIN).
    pub conn_linger: Duration,
    /// How often the table is swept for connections to close.
    pub sweep_interval: Duration,
    /// Records waiting for room on the link beyond which the sender stops taking input (the gate's
    /// queue then fills: fail-closed).
    pub max_backlog: usize,
    /// Wait before probing the VIP again after an inconclusive probe.
    pub probe_retry: Duration,
}

impl SenderConfig {
    /// Defaults around `identity`, `link` and `lease`.
    pub fn new(identity: LocalIdentity, link: LinkConfig, lease: Duration) -> SenderConfig {
        SenderConfig {
            identity,
            link,
            lease,
            output_grant: lease,
            conn_linger: Duration::from_secs(60),
            sweep_interval: Duration::from_millis(250),
            max_backlog: 4096,
            probe_retry: Duration::from_millis(20),
        }
    }

    /// The sender of a node configured by `node`, primary at `epoch`.
    pub fn from_node(node: &NodeConfig, epoch: u64) -> SenderConfig {
        let identity = LocalIdentity::new(node.cluster.clone(), node.node.clone(), Role::Primary, epoch);
        let mut config = SenderConfig::new(identity, link_config(node), node.lease());
        config.output_grant = output_grant(node.detection.detection_time()).min(config.lease);
        config
    }

    /// Checks that every value can work.
    pub fn validate(&self) -> Result<(), StartError> {
        self.link.validate()?;
        let bad = |field, problem: &str| Err(StartError::Config { field, problem: problem.into() });
        if self.identity.role != Role::Primary {
            return bad("identity.role", "must be primary");
        }
        if self.lease.is_zero() {
            return bad("lease", "must be positive");
        }
        if self.output_grant.is_zero() {
            return bad("output_grant", "must be positive");
        }
        if self.conn_linger.is_zero() || self.sweep_interval.is_zero() || self.probe_retry.is_zero() {
            return bad("conn_linger/sweep_interval/probe_retry", "must be positive");
        }
        if self.max_backlog == 0 {
            return bad("max_backlog", "must be at least 1");
        }
        Ok(())
    }
}

/// The output grant for a detection time of `detection`: a tenth less, for the time a renewal takes to
/// reach the kernel (`nft` reads it from a pipe) and the scheduling of its thread.
pub fn output_grant(detection: Duration) -> Duration {
    detection - detection / 10
}

/// The link tuning a node's configuration asks for (both roles use it).
pub fn link_config(node: &NodeConfig) -> LinkConfig {
    LinkConfig {
        heartbeat_interval: node.detection.heartbeat_interval,
        max_frame: node.replication.max_frame_bytes as usize,
        ack_every: u64::from(node.replication.ack_max_records),
        ack_delay: node.replication.ack_max_delay,
        // A fallback only: the backup's heartbeats, each interval, carry these acks anyway.
        ack_lazy: (node.detection.heartbeat_interval / 4).min(Duration::from_millis(5)),
        auth: node.link_auth(),
        ..LinkConfig::default()
    }
}

/// Why the sender could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A sender setting cannot work.
    #[error("replication sender config: {field} {problem}")]
    Config { field: &'static str, problem: String },
    /// The link setting cannot work.
    #[error(transparent)]
    Link(#[from] InvalidLinkConfig),
    /// Not called inside a Tokio runtime.
    #[error("the replication sender must start inside a Tokio runtime")]
    Runtime,
}

/// Why reply bytes may never be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyRefused {
    /// This node stepped down: another node serves the VIP.
    #[error("this primary stepped down; the bytes are never sent")]
    SteppedDown,
    /// The sender stopped (the node is shutting down) before the bytes were committed.
    #[error("the replication sender stopped before the bytes were replicated")]
    Stopped,
}

/// The primary's check that nobody else serves the VIP, run when the backup is suspected.
pub trait VipCheck: Send + Sync + 'static {
    /// Probes the VIP on the client network (an ARP probe, as `shared::vip::probe`).
    fn probe(&self) -> Pin<Box<dyn Future<Output = VipProbe> + Send + 'static>>;
}

/// No VIP to probe (a bed without ARP ownership): every probe reads as unanswered, so a suspected
/// backup is given up at once. Never use it where a backup can take the VIP over.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoVipCheck;

impl VipCheck for NoVipCheck {
    fn probe(&self) -> Pin<Box<dyn Future<Output = VipProbe> + Send + 'static>> {
        Box::pin(std::future::ready(VipProbe::Unanswered))
    }
}

/// The sender's state, as its driver last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderStatus {
    pub peer: PeerState,
    /// The backup's node name while one is linked.
    pub peer_node: Option<String>,
    /// Last record numbered (and applied locally).
    pub sent: u64,
    /// The backup's cumulative ack, while one is linked.
    pub acked: Option<u64>,
    /// The commit point.
    pub committed: u64,
    /// Segments held in the gate.
    pub held_segments: usize,
    /// Records waiting for room on the link.
    pub backlog: usize,
    pub suspected: Option<SuspectReason>,
    pub stepped_down: Option<StepDownReason>,
}

// -------------------------------------------------------------------------------------------------
// The handle
// -------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CommitPoint {
    upto: u64,
    /// Set when nothing beyond `upto` will ever be committed, and why.
    refused: Option<ReplyRefused>,
    /// A planned switchover froze the sender: what is logged now is for the backup to carry on.
    handing_over: bool,
}

enum Item {
    Record { msg: Message, seq: Option<oneshot::Sender<u64>> },
    Opened(ConnKey),
    Closed(ConnKey),
    EpochSeen(u64),
    Join { accepted: Box<Accepted<TcpStream>>, granted_at: Instant, from: SocketAddr },
    Freeze(oneshot::Sender<Result<(), HandoverError>>),
    HandOver(oneshot::Sender<Result<SocketAddrV4, HandoverError>>),
    Shutdown(oneshot::Sender<()>),
}

/// How long a handing-over primary waits for the heads of answers to requests it sent upstream.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a handing-over primary waits for its backup's [`shared::protocol::ToPrimary::TakingOver`].
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a planned switchover was refused, or did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    #[error("no backup is connected: there is nobody to hand the connections to")]
    NoBackup,
    #[error(
        "the backup {node} is still syncing (its snapshot is not applied yet): try again once /status says connected"
    )]
    Syncing { node: String },
    #[error("the backup {node} is suspected (its acks stopped): it cannot be trusted with the connections")]
    Suspected { node: String },
    #[error(
        "the backup {node} speaks replication protocol {version}, which has no planned switchover (needs {needs}): \
         upgrade the backup first"
    )]
    OldBackup { node: String, version: u16, needs: u16 },
    #[error("this node stepped down; it serves nothing")]
    SteppedDown,
    #[error("a switchover is already under way")]
    InProgress,
    #[error("the backup did not confirm the handover within {0:?}: it takes over by failover once it misses this node")]
    Unconfirmed(Duration),
    #[error("the replication link ended during the handover: the backup takes over by failover")]
    LinkLost,
    #[error("the replication sender is gone")]
    SenderGone,
}

impl HandoverError {
    /// Whether nothing changed (the node serves on as before) rather than the handover failing midway.
    pub fn refused(&self) -> bool {
        !matches!(self, HandoverError::Unconfirmed(_) | HandoverError::LinkLost | HandoverError::SenderGone)
    }
}

struct Shared {
    items: mpsc::UnboundedSender<Item>,
    commit: watch::Receiver<CommitPoint>,
    status: watch::Receiver<SenderStatus>,
    table: Arc<Mutex<ReplicaTable>>,
    identity: LocalIdentity,
    link: LinkConfig,
    /// Taken while a backup is linked or joining: one at a time.
    slot: Arc<AtomicBool>,
}

/// The running sender. Cheap to clone; the task stops when [`shutdown`](Self::shutdown) is called.
#[derive(Clone)]
pub struct Replicator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").field("status", &*self.shared.status.borrow()).finish()
    }
}

/// A gate for the sender to read and release.
pub struct GateFeed {
    pub gate: Arc<Gate>,
    pub diverted: mpsc::Receiver<Diverted>,
    /// Segments already taken from `diverted` (a takeover reads the clients' answers to its probes
    /// before the sender starts): handled first, in this order.
    pub early: Vec<Diverted>,
}

impl GateFeed {
    pub fn new(gate: Arc<Gate>, diverted: mpsc::Receiver<Diverted>) -> GateFeed {
        GateFeed { gate, diverted, early: Vec::new() }
    }
}

impl Replicator {
    /// Starts the sender task with `table` (empty for a fresh primary; the replica of a backup that
    /// took over, whose epoch is below `config.identity.epoch`). Without a gate nothing inbound is
    /// held (for tests of the reply path only).
    pub fn start(
        config: SenderConfig,
        table: ReplicaTable,
        gate: Option<GateFeed>,
        admin: AdminState,
        vip: Arc<dyn VipCheck>,
    ) -> Result<(Replicator, JoinHandle<()>), StartError> {
        config.validate()?;
        tokio::runtime::Handle::try_current().map_err(|_| StartError::Runtime)?;
        let core = OutputCommit::new(config.lease, config.identity.epoch, 0)
            .map_err(|e| StartError::Config { field: "lease", problem: e.to_string() })?;
        let (items_tx, items_rx) = mpsc::unbounded_channel();
        let (commit_tx, commit_rx) = watch::channel(CommitPoint { upto: 0, refused: None, handing_over: false });
        let status = SenderStatus {
            peer: PeerState::None,
            peer_node: None,
            sent: 0,
            acked: None,
            committed: 0,
            held_segments: 0,
            backlog: 0,
            suspected: None,
            stepped_down: None,
        };
        let (status_tx, status_rx) = watch::channel(status);
        let table = Arc::new(Mutex::new(table));
        let slot = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            items: items_tx,
            commit: commit_rx,
            status: status_rx,
            table: table.clone(),
            identity: config.identity.clone(),
            link: config.link.clone(),
            slot: slot.clone(),
        });
        admin.set_peer(PeerState::None, None);
        admin.set_replica(Some(table.clone()));
        let now = Instant::now();
        let (gate, diverted, early) = match gate {
            Some(g) => (Some(g.gate), Some(g.diverted), g.early),
            None => (None, None, Vec::new()),
        };
        let driver = Driver {
            epoch: config.identity.epoch,
            next_sweep: now + config.sweep_interval,
            cfg: config,
            core,
            table,
            gate,
            admin,
            vip,
            link: None,
            outbound: VecDeque::new(),
            held: VecDeque::new(),
            commit_tx,
            status_tx,
            open: HashMap::new(),
            closing: HashMap::new(),
            settling: HashMap::new(),
            unopened: HashMap::new(),
            clock: WallClock::new(now),
            slot,
            retry_at: None,
            probe: None,
            last_probe_end: None,
            warned_partial: false,
            last_peer: None,
        };
        info!(
            role = "primary",
            epoch = driver.epoch,
            "replication sender started; serving unprotected until a backup joins"
        );
        let task = tokio::spawn(driver.run(items_rx, diverted, early));
        Ok((Replicator { shared }, task))
    }

    /// The proxy hooks that log replies and exchanges on this stream.
    pub fn hooks(&self) -> ReplicaHooks {
        ReplicaHooks { shared: self.shared.clone() }
    }

    /// Accepts joining backups on `listener` (the `--repl-listen` socket) until the sender stops.
    pub fn serve_joins(&self, listener: TcpListener) -> JoinHandle<()> {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shared.items.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, from)) => {
                            tokio::spawn(handle_join(shared.clone(), stream, from));
                        }
                        Err(e) => {
                            warn!(role = "primary", epoch = shared.identity.epoch, error = %e,
                                "accepting a replication connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        })
    }

    /// Runs `f` on the primary's own replica table.
    pub fn with_table<R>(&self, f: impl FnOnce(&ReplicaTable) -> R) -> R {
        f(&lock(&self.shared.table))
    }

    /// The sender's state, updated as it changes.
    pub fn status(&self) -> watch::Receiver<SenderStatus> {
        self.shared.status.clone()
    }

    /// Planned switchover, step 1: refuses (nothing changed) unless a synced backup that speaks the
    /// handover is linked; else nothing more is committed (no byte or segment reaches a client from this
    /// node again) and the kernel's output lease is revoked.
    pub async fn freeze_for_handover(&self) -> Result<(), HandoverError> {
        let (tx, rx) = oneshot::channel();
        self.shared.items.send(Item::Freeze(tx)).map_err(|_| HandoverError::SenderGone)?;
        rx.await.map_err(|_| HandoverError::SenderGone)?
    }

    /// Planned switchover, step 2 (after the VIP is given up): the handover record ends the stream; returns
    /// where the backup, now taking over, accepts this node as its spare.
    pub async fn hand_over(&self) -> Result<SocketAddrV4, HandoverError> {
        // Requests already sent upstream get their answers' heads logged first (nothing new reaches the
        // proxy any more), so the backup continues them instead of sending them to the origin again.
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        loop {
            let awaiting = self.with_table(ReplicaTable::awaiting_upstream);
            if awaiting == 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(
                    role = "primary",
                    epoch = self.shared.identity.epoch,
                    awaiting,
                    ?QUIESCE_TIMEOUT,
                    "handing over with upstream requests unanswered: the backup sends them again"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (tx, rx) = oneshot::channel();
        self.shared.items.send(Item::HandOver(tx)).map_err(|_| HandoverError::SenderGone)?;
        rx.await.map_err(|_| HandoverError::SenderGone)?
    }

    /// Stops the task: the link is closed (what is queued is still sent), held segments are never
    /// released, pending reply appends fail.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.items.send(Item::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn handle_join(shared: Arc<Shared>, mut stream: TcpStream, from: SocketAddr) {
    let epoch = shared.identity.epoch;
    let _ = link::prepare_tcp(&stream);
    if shared.slot.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
        let current = shared.status.borrow().peer_node.clone().unwrap_or_else(|| "(joining)".into());
        let limit = shared.link.handshake_timeout;
        match tokio::time::timeout(limit, refuse_busy(&shared, &mut stream, &current)).await {
            Ok(Ok(reason)) => info!(role = "primary", epoch, %from, %reason, "refused a joining node"),
            Ok(Err(e)) => debug!(role = "primary", epoch, %from, error = %e, "refusing a joining node failed"),
            Err(_) => debug!(role = "primary", epoch, %from, "refusing a joining node timed out"),
        }
        return;
    }
    let granted_at = Instant::now();
    match link::accept(stream, &shared.identity, &shared.link).await {
        Ok(accepted) => {
            let item = Item::Join { accepted: Box::new(accepted), granted_at, from };
            if shared.items.send(item).is_err() {
                shared.slot.store(false, Ordering::Release);
            }
        }
        Err(e) => {
            shared.slot.store(false, Ordering::Release);
            if let HandshakeError::Refused(Refusal::PeerEpochAhead { their_epoch, .. }) = &e {
                let _ = shared.items.send(Item::EpochSeen(*their_epoch));
            }
            warn!(role = "primary", epoch, %from, error = %e, "replication handshake failed");
        }
    }
}

/// Answers a `Hello` with a refusal while another backup is linked. Returns the reason given.
async fn refuse_busy(shared: &Shared, stream: &mut TcpStream, current: &str) -> Result<String, String> {
    let first = read_handshake(stream).await?;
    let Some(hello) = first.hello() else {
        return Err("expected a Hello".into());
    };
    let authenticates = matches!(first, Handshake::AuthHello { .. });
    let decided = link::check_auth(authenticates, shared.link.auth.is_secure(), &hello.node)
        .and_then(|()| link::check_hello(hello, &shared.identity));
    let reason = match decided {
        Err(refusal) => {
            if let Refusal::PeerEpochAhead { their_epoch, .. } = refusal {
                let _ = shared.items.send(Item::EpochSeen(their_epoch));
            }
            refusal.to_string()
        }
        Ok(_) => format!(
            "backup {current:?} is already connected to this primary; only one backup at a time \
             (node {:?} may join once it is gone)",
            hello.node
        ),
    };
    let mut buf = BytesMut::new();
    let welcome = Handshake::Welcome(Welcome::Refused { reason: reason.clone() });
    frame::encode_value(&welcome, link::HANDSHAKE_MAX_FRAME, &mut buf).map_err(|e| e.to_string())?;
    stream.write_all(&buf).await.map_err(|e| e.to_string())?;
    let _ = stream.shutdown().await;
    Ok(reason)
}

/// Reads exactly one handshake frame.
async fn read_handshake(stream: &mut TcpStream) -> Result<Handshake, String> {
    let mut buf = vec![0; frame::HEADER_LEN];
    let mut have = 0;
    loop {
        let need = match frame::parse(&buf[..have], link::HANDSHAKE_MAX_FRAME).map_err(|e| e.to_string())? {
            Parsed::Frame { payload, .. } => return codec::decode(payload).map_err(|e| e.to_string()),
            Parsed::Incomplete { need } => need,
        };
        buf.resize(need, 0);
        while have < need {
            match stream.read(&mut buf[have..need]).await.map_err(|e| e.to_string())? {
                0 => return Err("closed during the handshake".into()),
                n => have += n,
            }
        }
    }
}

// -------------------------------------------------------------------------------------------------
// The proxy hooks
// -------------------------------------------------------------------------------------------------

/// [`ConnectionHooks`] that put every connection's replies and exchanges on the stream.
#[derive(Clone)]
pub struct ReplicaHooks {
    shared: Arc<Shared>,
}

impl ConnectionHooks for ReplicaHooks {
    type Log = ReplicaLog;
    type Observer = ReplicaObserver;

    fn open(&self, peer: SocketAddr, local: SocketAddr) -> (ReplicaLog, ReplicaObserver) {
        let conn = match (peer, local) {
            (SocketAddr::V4(client), SocketAddr::V4(server)) => Some(ConnKey { client, server }),
            _ => None,
        };
        if let Some(conn) = conn {
            let _ = self.shared.items.send(Item::Opened(conn));
        } else {
            // The gate diverts IPv4 only: such a connection is not on the VIP and has no replica.
            warn!(role = "primary", epoch = self.shared.identity.epoch, %peer, %local,
                "connection is not IPv4: served without replication");
        }
        let handle = Arc::new(ConnHandle { conn, shared: self.shared.clone(), exchanges: Mutex::new(HashMap::new()) });
        (ReplicaLog { handle: handle.clone() }, ReplicaObserver { handle })
    }
}

struct ConnHandle {
    conn: Option<ConnKey>,
    shared: Arc<Shared>,
    exchanges: Mutex<HashMap<u64, ExchangeLog>>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        if let Some(conn) = self.conn {
            let _ = self.shared.items.send(Item::Closed(conn));
        }
    }
}

#[derive(Default)]
struct ExchangeLog {
    head_request: bool,
    started: Option<oneshot::Receiver<u64>>,
    upstream: Option<UpstreamEncoding>,
}

/// How the rebuilt upstream message continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UpstreamEncoding {
    /// Offset of the next byte of the rebuilt message.
    next: u64,
    /// Body re-chunked (no `Content-Length`), or carried as received.
    chunked: bool,
    head_len: u64,
}

impl ConnHandle {
    /// Queues `msg`; the receiver yields its sequence number.
    fn record(&self, msg: Message) -> Option<oneshot::Receiver<u64>> {
        let (tx, rx) = oneshot::channel();
        self.shared.items.send(Item::Record { msg, seq: Some(tx) }).ok().map(|_| rx)
    }

    fn record_only(&self, msg: Message) {
        let _ = self.shared.items.send(Item::Record { msg, seq: None });
    }

    fn exchanges(&self) -> MutexGuard<'_, HashMap<u64, ExchangeLog>> {
        lock(&self.exchanges)
    }

    /// Resolves once record `seq` (when it gets one) is committed.
    fn committed(
        &self,
        seq: Option<oneshot::Receiver<u64>>,
    ) -> impl Future<Output = Result<(), ReplyRefused>> + Send + 'static {
        let mut commit = self.shared.commit.clone();
        async move {
            let seq = seq.ok_or(ReplyRefused::Stopped)?.await.map_err(|_| ReplyRefused::Stopped)?;
            match commit.wait_for(|c| c.upto >= seq || c.refused.is_some()).await {
                Ok(c) if c.upto >= seq => Ok(()),
                Ok(c) => Err(c.refused.unwrap_or(ReplyRefused::Stopped)),
                Err(_) => Err(ReplyRefused::Stopped),
            }
        }
    }
}

/// The reply log of one connection: each append is a [`Message::Reply`] and resolves once committed.
pub struct ReplicaLog {
    handle: Arc<ConnHandle>,
}

impl ReplyLog for ReplicaLog {
    type Error = ReplyRefused;

    fn append(&self, offset: u64, bytes: Bytes) -> impl Future<Output = Result<(), ReplyRefused>> + Send + 'static {
        let seq = match self.handle.conn {
            Some(conn) => self.handle.record(Message::Reply { conn, offset, bytes: bytes.to_vec() }),
            None => {
                // Not replicable (see `open`): nothing to wait for.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(0);
                Some(rx)
            }
        };
        self.handle.committed(seq)
    }

    fn handing_over(&self) -> bool {
        self.handle.shared.commit.borrow().handing_over
    }
}

/// The exchange observer of one connection.
pub struct ReplicaObserver {
    handle: Arc<ConnHandle>,
}

impl ReplicaObserver {
    /// Resolves once exchange `exchange`'s `ExchangeStart` is committed (acknowledged by the backup).
    /// The proxy should await it before sending the request upstream, so that a backup never re-sends
    /// a request it does not know was sent; the observer API cannot block, so today it does not.
    pub fn start_committed(&self, exchange: u64) -> impl Future<Output = Result<(), ReplyRefused>> + Send + 'static {
        let seq = self.handle.exchanges().get_mut(&exchange).and_then(|e| e.started.take());
        self.handle.committed(seq)
    }
}

impl ExchangeObserver for ReplicaObserver {
    fn on_exchange_start(&self, info: &ExchangeInfo) {
        let Some(conn) = self.handle.conn else { return };
        let start = ExchangeStart {
            conn,
            exchange: info.exchange,
            request_offset: 0,
            method: info.method.as_str().to_owned(),
            target: info.target.clone(),
            idempotency_key: info.idempotency_key.clone(),
            key_generated: info.key_generated,
            upstream: info.upstream.clone(),
        };
        let started = self.handle.record(Message::ExchangeStart(start));
        let log = ExchangeLog { head_request: info.method == http::Method::HEAD, started, upstream: None };
        self.handle.exchanges().insert(info.exchange, log);
    }

    fn on_upstream_head(&self, exchange: u64, head: &http::response::Parts) {
        let Some(conn) = self.handle.conn else { return };
        let mut exchanges = self.handle.exchanges();
        let log = exchanges.entry(exchange).or_default();
        let (bytes, chunked) = upstream_head(head, log.head_request);
        let len = bytes.len() as u64;
        log.upstream = Some(UpstreamEncoding { next: len, chunked, head_len: len });
        drop(exchanges);
        self.handle.record_only(Message::Upstream { conn, exchange, offset: 0, bytes });
    }

    fn on_upstream_data(&self, exchange: u64, offset: u64, data: &Bytes) {
        let Some(conn) = self.handle.conn else { return };
        let mut exchanges = self.handle.exchanges();
        let Some(enc) = exchanges.get_mut(&exchange).and_then(|l| l.upstream.as_mut()) else { return };
        let mut records = Vec::new();
        for (i, piece) in data.chunks(MAX_UPSTREAM_PIECE).enumerate() {
            let at = offset + (i * MAX_UPSTREAM_PIECE) as u64;
            let bytes = if enc.chunked {
                let mut b = format!("{:x}\r\n", piece.len()).into_bytes();
                b.extend_from_slice(piece);
                b.extend_from_slice(b"\r\n");
                b
            } else {
                enc.next = enc.head_len + at;
                piece.to_vec()
            };
            let offset = enc.next;
            enc.next += bytes.len() as u64;
            records.push(Message::Upstream { conn, exchange, offset, bytes });
        }
        drop(exchanges);
        for msg in records {
            self.handle.record_only(msg);
        }
    }

    fn on_exchange_end(&self, outcome: &ExchangeOutcome) {
        let Some(conn) = self.handle.conn else { return };
        let log = self.handle.exchanges().remove(&outcome.exchange);
        let Some(status) = outcome.status.filter(|_| outcome.complete) else { return };
        if let Some(enc) = log.and_then(|l| l.upstream).filter(|e| e.chunked) {
            let msg =
                Message::Upstream { conn, exchange: outcome.exchange, offset: enc.next, bytes: b"0\r\n\r\n".to_vec() };
            self.handle.record_only(msg);
        }
        self.handle.record_only(Message::ExchangeEnd { conn, exchange: outcome.exchange, status });
    }
}

/// The upstream response head as an HTTP/1.1 message head, and whether its body is re-chunked.
fn upstream_head(head: &http::response::Parts, head_request: bool) -> (Vec<u8>, bool) {
    let status = head.status;
    let bodiless = head_request || status.is_informational() || status.as_u16() == 204 || status.as_u16() == 304;
    let chunked = !bodiless && !head.headers.contains_key(http::header::CONTENT_LENGTH);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &head.headers {
        if name == http::header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (out, chunked)
}

// -------------------------------------------------------------------------------------------------
// The driver
// -------------------------------------------------------------------------------------------------

struct Linked {
    link: PrimaryLink,
    sender: RecordSender,
    acked: watch::Receiver<u64>,
    liveness: PeerLiveness,
    node: String,
    heartbeats: u64,
    /// Where the backup's link came from.
    from: SocketAddr,
}

struct Held {
    seq: u64,
    queue: u16,
    id: u32,
    dir: Dir,
}

struct OpenConn {
    guard: ConnectionGuard,
    own: Option<UnprotectedReason>,
}

struct Closing {
    last_segment: Instant,
}

/// `at_us` of the stream: wall-clock microseconds at start plus monotonic time since.
struct WallClock {
    base: Instant,
    base_us: u64,
}

impl WallClock {
    fn new(base: Instant) -> WallClock {
        let base_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        WallClock { base, base_us }
    }

    fn at_us(&self, at: Instant) -> u64 {
        self.base_us + at.saturating_duration_since(self.base).as_micros() as u64
    }
}

enum Wake {
    Acked(bool),
    Probe(u64, VipProbe),
    Gate(usize),
    Item(Option<Item>),
    Timer,
}

type ProbeFuture = Pin<Box<dyn Future<Output = VipProbe> + Send>>;

struct Driver {
    cfg: SenderConfig,
    epoch: u64,
    core: OutputCommit,
    table: Arc<Mutex<ReplicaTable>>,
    gate: Option<Arc<Gate>>,
    admin: AdminState,
    vip: Arc<dyn VipCheck>,
    link: Option<Linked>,
    /// Records numbered and applied, waiting for room on the link.
    outbound: VecDeque<(u64, Message)>,
    /// Segments held in the gate, in queue order.
    held: VecDeque<Held>,
    commit_tx: watch::Sender<CommitPoint>,
    status_tx: watch::Sender<SenderStatus>,
    open: HashMap<ConnKey, OpenConn>,
    closing: HashMap<ConnKey, Closing>,
    unopened: HashMap<ConnKey, Instant>,
    /// Connections seen over, with the last record numbered then: closed once that is committed.
    settling: HashMap<ConnKey, u64>,
    clock: WallClock,
    slot: Arc<AtomicBool>,
    retry_at: Option<Instant>,
    next_sweep: Instant,
    probe: Option<(u64, ProbeFuture)>,
    last_probe_end: Option<Instant>,
    warned_partial: bool,
    /// The latest backup linked, named in `/status` when it is given up (the link may be gone by then).
    last_peer: Option<String>,
}

impl Driver {
    async fn run(
        mut self,
        mut items: mpsc::UnboundedReceiver<Item>,
        mut gate_rx: Option<mpsc::Receiver<Diverted>>,
        early: Vec<Diverted>,
    ) {
        if !early.is_empty() {
            let now = Instant::now();
            for d in early {
                self.diverted(now, d);
            }
            self.after(now);
        }
        let mut diverted = Vec::with_capacity(BATCH);
        loop {
            let room = self.outbound.len() < self.cfg.max_backlog;
            let deadline = self.deadline();
            let wake = {
                let link = &mut self.link;
                let probe = &mut self.probe;
                let acked = async {
                    match link.as_mut() {
                        Some(l) => l.acked.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let probed = async {
                    match probe.as_mut() {
                        Some((id, f)) => (*id, f.as_mut().await),
                        None => std::future::pending().await,
                    }
                };
                let gate = async {
                    match gate_rx.as_mut() {
                        Some(rx) => rx.recv_many(&mut diverted, BATCH).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    ok = acked => Wake::Acked(ok),
                    (id, result) = probed => Wake::Probe(id, result),
                    n = gate, if room => Wake::Gate(n),
                    item = items.recv(), if room => Wake::Item(item),
                    _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
                }
            };
            let now = Instant::now();
            match wake {
                Wake::Acked(true) => self.acked(now),
                Wake::Acked(false) => self.link_down(now, "the replication link ended"),
                Wake::Probe(id, result) => {
                    self.probe = None;
                    self.last_probe_end = Some(now);
                    info!(role = "primary", epoch = self.epoch, probe = ?result, "VIP probe finished");
                    self.core.handle_probe(id, &result);
                }
                Wake::Gate(0) => {
                    error!(
                        role = "primary",
                        epoch = self.epoch,
                        "the gate's channel closed: its reader stopped, VIP segments are now dropped (fail-closed)"
                    );
                    gate_rx = None;
                }
                Wake::Gate(_) => {
                    for d in diverted.drain(..) {
                        self.diverted(now, d);
                    }
                }
                Wake::Item(None) => break,
                Wake::Item(Some(item)) => {
                    let mut next = Some(item);
                    let mut n = 0;
                    while let Some(item) = next.take() {
                        if let Some(done) = self.item(now, item) {
                            self.stop(done).await;
                            return;
                        }
                        n += 1;
                        if n < BATCH {
                            next = items.try_recv().ok();
                        }
                    }
                }
                Wake::Timer => {}
            }
            self.after(now);
        }
        info!(role = "primary", epoch = self.epoch, "replication sender stopped: every handle is gone");
    }

    fn deadline(&self) -> Instant {
        let mut at = self.next_sweep;
        if let Some(t) = self.core.poll_timeout(Instant::now()) {
            at = at.min(t);
        }
        if let Some(t) = self.retry_at {
            at = at.min(t);
        }
        if self.link.is_some() {
            // Silence and heartbeat round trips are read from the link's liveness.
            at = at.min(Instant::now() + self.cfg.link.heartbeat_interval);
        }
        at
    }

    /// Everything after an input: timers, the core's events, the link, the gate, the status.
    fn after(&mut self, now: Instant) {
        let silent = self.link.as_ref().map_or(Duration::ZERO, |l| l.liveness.silent_for(now));
        if let Some(sent_at) = self.link.as_ref().and_then(|l| l.liveness.last_echoed()) {
            self.core.handle_echo(now, sent_at);
        }
        self.core.handle_timeout(now, silent);
        if now >= self.next_sweep {
            self.sweep(now);
            self.next_sweep = now + self.cfg.sweep_interval;
        }
        self.heartbeat_rtt();
        while let Some(event) = self.core.poll_event() {
            self.event(now, event);
        }
        self.pump(now);
        self.release();
        self.publish();
    }

    fn item(&mut self, now: Instant, item: Item) -> Option<oneshot::Sender<()>> {
        match item {
            Item::Record { msg, seq } => {
                let s = self.record(now, msg);
                if let Some(tx) = seq {
                    let _ = tx.send(s);
                }
            }
            Item::Opened(conn) => {
                self.closing.remove(&conn);
                self.settling.remove(&conn);
                self.unopened.remove(&conn);
                let own = lock(&self.table).conn(&conn).and_then(|c| c.unprotected()).map(reason_label);
                let guard = self.admin.connection_opened(self.protection(own));
                self.open.insert(conn, OpenConn { guard, own });
            }
            Item::Closed(conn) => {
                if self.open.remove(&conn).is_some() {
                    self.closing.insert(conn, Closing { last_segment: now });
                }
            }
            Item::EpochSeen(epoch) => self.core.handle_epoch_seen(epoch),
            Item::Join { accepted, granted_at, from } => self.join(now, *accepted, granted_at, from),
            Item::Freeze(reply) => {
                let _ = reply.send(self.freeze(now));
            }
            Item::HandOver(reply) => self.hand_over(now, reply),
            Item::Shutdown(done) => return Some(done),
        }
        None
    }

    async fn stop(mut self, done: oneshot::Sender<()>) {
        info!(role = "primary", epoch = self.epoch, "replication sender stopping");
        self.pump(Instant::now());
        self.outbound.clear();
        if let Some(l) = self.link.take()
            && let Err(e) = l.link.close().await
        {
            warn!(role = "primary", epoch = self.epoch, error = %e, "closing the replication link");
        }
        self.commit_tx.send_modify(|c| c.refused = Some(ReplyRefused::Stopped));
        let _ = done.send(());
    }

    /// Numbers `msg`, applies it to the local table and queues it for the backup.
    fn record(&mut self, now: Instant, msg: Message) -> u64 {
        let seq = self.core.handle_sent(now, approx_len(&msg));
        let rec = Record { seq, epoch: self.epoch, msg };
        let applied = lock(&self.table).apply(&rec);
        match applied {
            Ok(Applied::Taken) => {}
            Ok(Applied::Ignored(why)) => debug!(role = "primary", epoch = self.epoch, seq, ?why, "record ignored"),
            Ok(Applied::Unprotected { conn, reason }) => {
                warn!(role = "primary", epoch = self.epoch, conn = ?conn, %reason, "connection unprotected");
                if let Some(oc) = self.open.get_mut(&conn) {
                    oc.own = Some(reason_label(&reason));
                }
                self.reprotect(Some(conn));
            }
            // Records this node numbers itself always apply; anything else is a bug to see in logs.
            Err(e) => error!(role = "primary", epoch = self.epoch, seq, error = %e, "local replica refused a record"),
        }
        if self.link.is_some() {
            self.outbound.push_back((seq, rec.msg));
        }
        seq
    }

    fn diverted(&mut self, now: Instant, d: Diverted) {
        let queue = GateQueue::from_dir(d.hook.dir());
        let Some(dir) = d.hook.dir() else {
            warn!(role = "primary", epoch = self.epoch, hook = ?d.hook, id = d.id, "segment from an unexpected hook: dropped");
            self.drop_segment(&d, queue);
            return;
        };
        if let Some(len) = d.original_len {
            // The replica cannot have what it was not given; the sender retransmits.
            warn!(
                role = "primary",
                epoch = self.epoch,
                id = d.id,
                len,
                "truncated segment cannot be replicated: dropped"
            );
            self.drop_segment(&d, queue);
            return;
        }
        if d.checksum == Checksum::Partial && !self.warned_partial {
            self.warned_partial = true;
            warn!(
                role = "primary",
                epoch = self.epoch,
                "gate delivers unfinished checksums (gso on): the replica drops such segments; run the gate without gso"
            );
        }
        if !self.closing.is_empty()
            && let Some(key) = conn_key_of(&d.datagram, dir)
            && let Some(c) = self.closing.get_mut(&key)
        {
            c.last_segment = now;
        }
        let at_us = self.clock.at_us(d.at);
        let seq = self.record(now, Message::Segment { at_us, dir, datagram: d.datagram.to_vec() });
        self.held.push_back(Held { seq, queue: d.queue, id: d.id, dir });
    }

    fn drop_segment(&self, d: &Diverted, queue: GateQueue) {
        if let Some(gate) = &self.gate {
            if let Err(e) = Gate::drop(gate, d.queue, d.id) {
                warn!(role = "primary", epoch = self.epoch, error = %e, "gate drop verdict failed");
            }
            self.admin.metrics().gate_drops.get(queue).inc();
        }
    }

    /// First step of a planned switchover: refuses unless a synced, trusted backup that speaks the
    /// handover is linked; else stops committing for good and revokes the kernel's output grant.
    fn freeze(&mut self, now: Instant) -> Result<(), HandoverError> {
        if self.core.stepped_down().is_some() {
            return Err(HandoverError::SteppedDown);
        }
        if self.core.is_frozen() {
            return Err(HandoverError::InProgress);
        }
        let Some(l) = &self.link else { return Err(HandoverError::NoBackup) };
        let node = l.node.clone();
        if self.core.suspected().is_some() {
            return Err(HandoverError::Suspected { node });
        }
        if self.core.peer() != PeerState::Connected {
            return Err(HandoverError::Syncing { node });
        }
        let version = l.link.peer().version;
        if version < HANDOVER_VERSION {
            return Err(HandoverError::OldBackup { node, version, needs: HANDOVER_VERSION });
        }
        self.core.freeze();
        // Wakes every reply log waiting on a commit: the proxy may now log in-flight responses in full.
        self.commit_tx.send_modify(|c| c.handing_over = true);
        if let Some(gate) = &self.gate {
            gate.grant_output(now);
            if let Err(e) = gate.revoke_output() {
                // The grant is revoked all the same; the element lapses within the detection time.
                warn!(role = "primary", epoch = self.epoch, error = %e, "revoking the output lease at once failed");
            }
        }
        info!(role = "primary", epoch = self.epoch, peer = %node, committed = self.core.committed(),
            "handing over: nothing more reaches a client from this node");
        Ok(())
    }

    /// Second step: the handover record goes at the end of the stream; the reply comes when the backup
    /// confirms it applied everything up to it.
    fn hand_over(&mut self, now: Instant, reply: oneshot::Sender<Result<SocketAddrV4, HandoverError>>) {
        if !self.core.is_frozen() {
            let _ = reply.send(Err(HandoverError::InProgress));
            return;
        }
        let Some(l) = &self.link else {
            let _ = reply.send(Err(HandoverError::LinkLost));
            return;
        };
        let (mut taking_over, from) = (l.link.taking_over(), l.from);
        let seq = self.record(now, Message::Handover);
        let epoch = self.epoch;
        info!(role = "primary", epoch, seq, "handover record queued; waiting for the backup's confirmation");
        let wait = async move {
            let confirmed = taking_over.wait_for(|t| t.is_some_and(|(s, _)| s == seq));
            let result = match tokio::time::timeout(HANDOVER_TIMEOUT, confirmed).await {
                Ok(Ok(t)) => {
                    let (_, mut addr) = t.expect("matched above");
                    if addr.ip().is_unspecified()
                        && let std::net::IpAddr::V4(ip) = from.ip()
                    {
                        addr.set_ip(ip);
                    }
                    Ok(addr)
                }
                Ok(Err(_)) => Err(HandoverError::LinkLost),
                Err(_) => Err(HandoverError::Unconfirmed(HANDOVER_TIMEOUT)),
            };
            let _ = reply.send(result);
        };
        tokio::spawn(tracing::Instrument::in_current_span(wait));
    }

    fn join(&mut self, now: Instant, accepted: Accepted<TcpStream>, granted_at: Instant, from: SocketAddr) {
        let node = accepted.peer().node.clone();
        let started = Instant::now();
        let (snapshot, conns) = {
            let table = lock(&self.table);
            (table.snapshot(self.cfg.link.max_frame), table.len())
        };
        let took = started.elapsed();
        let bytes: u64 = snapshot.iter().map(approx_len).sum();
        let first = match self.core.handle_link_up(granted_at, snapshot.len() as u64) {
            Ok(first) => first,
            Err(e) => {
                // Only a race with the slot gets here; the joiner sees its link close and retries.
                warn!(role = "primary", epoch = self.epoch, peer = %node, error = %e, "join dropped");
                return;
            }
        };
        let Some(first_seq) = NonZeroU64::new(first) else {
            error!(role = "primary", epoch = self.epoch, "stream numbering reached zero");
            return;
        };
        let link = accepted.start(first_seq);
        self.last_peer = Some(node.clone());
        self.link = Some(Linked {
            sender: link.sender(),
            acked: link.acked(),
            liveness: link.liveness(),
            link,
            node: node.clone(),
            heartbeats: 0,
            from,
        });
        for msg in snapshot {
            let seq = self.core.handle_sent(now, approx_len(&msg));
            self.outbound.push_back((seq, msg));
        }
        info!(role = "primary", epoch = self.epoch, peer = %node, first_seq = first, connections = conns, bytes, ?took,
            "backup joined: snapshot queued, stream follows");
    }

    fn acked(&mut self, now: Instant) {
        let Some(l) = self.link.as_mut() else { return };
        let upto = *l.acked.borrow_and_update();
        let acked = self.core.handle_ack(now, upto);
        if acked.records > 0 {
            self.admin.metrics().replication().record_acked(acked.records, acked.bytes);
        }
    }

    fn link_down(&mut self, now: Instant, why: &str) {
        let Some(l) = self.link.take() else { return };
        warn!(role = "primary", epoch = self.epoch, peer = %l.node, reason = why,
            "replication link down; holding VIP output until the VIP is probed");
        self.outbound.clear();
        self.admin.metrics().replication().reset_in_flight();
        self.core.handle_link_down(now);
        // The link's task logged why it ended; dropping the handle is all that is left.
        drop(l);
    }

    fn event(&mut self, now: Instant, event: CommitEvent) {
        let epoch = self.epoch;
        match event {
            CommitEvent::Peer(peer) => {
                let node = self.link.as_ref().map(|l| l.node.clone());
                info!(role = "primary", epoch, peer = peer.as_str(), node = ?node, "pair state changed");
                self.admin.set_peer(peer, node.as_deref());
                self.reprotect(None);
            }
            CommitEvent::LeasePing => {
                self.record(now, lease_ping());
            }
            CommitEvent::Probe { id } => {
                let reason = self.core.suspected();
                warn!(role = "primary", epoch, ?reason, "backup suspected: holding VIP output and probing the VIP");
                let probe = self.vip.probe();
                // An inconclusive probe is retried after a pause, not in a tight loop.
                let again =
                    self.last_probe_end.is_some_and(|t| now.saturating_duration_since(t) < self.cfg.probe_retry);
                let delay = if again { self.cfg.probe_retry } else { Duration::ZERO };
                let fut: ProbeFuture = Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    probe.await
                });
                self.probe = Some((id, fut));
            }
            CommitEvent::DropLink { reason } => {
                let node = self.link.as_ref().map(|l| l.node.clone()).or_else(|| self.last_peer.clone());
                warn!(role = "primary", epoch, peer = ?node, held = self.held.len(), %reason,
                    "backup given up: nobody else answers for the VIP; serving unprotected");
                self.admin.peer_lost(SystemTime::now(), &reason.to_string(), node.as_deref());
                if let Some(l) = self.link.take() {
                    self.outbound.clear();
                    self.admin.metrics().replication().reset_in_flight();
                    drop(l);
                }
                self.probe = None;
                self.slot.store(false, Ordering::Release);
            }
            CommitEvent::StepDown(reason) => {
                error!(
                    role = "primary",
                    epoch,
                    ?reason,
                    "stepping down: another node serves the VIP or a later epoch exists; nothing more is released"
                );
                self.link = None;
                self.outbound.clear();
                self.probe = None;
                self.commit_tx.send_modify(|c| c.refused = Some(ReplyRefused::SteppedDown));
            }
        }
    }

    /// Moves queued records onto the link while it has room.
    fn pump(&mut self, now: Instant) {
        self.retry_at = None;
        let Some(l) = self.link.as_mut() else {
            self.outbound.clear();
            return;
        };
        while let Some((seq, msg)) = self.outbound.pop_front() {
            let bytes = approx_len(&msg);
            match l.sender.try_send(msg) {
                Ok(got) if got == seq => self.admin.metrics().replication().record_sent(now, 1, bytes),
                Ok(got) => {
                    error!(
                        role = "primary",
                        epoch = self.epoch,
                        expected = seq,
                        got,
                        "link numbering diverged; dropping the link"
                    );
                    self.link_down(now, "numbering diverged");
                    return;
                }
                Err(TrySendError::Full(msg)) => {
                    self.outbound.push_front((seq, *msg));
                    self.retry_at = Some(now + Duration::from_millis(1));
                    return;
                }
                Err(TrySendError::LinkDown) => {
                    self.link_down(now, "the replication link ended");
                    return;
                }
                Err(TrySendError::TooLarge { bound, max }) => {
                    error!(
                        role = "primary",
                        epoch = self.epoch,
                        seq,
                        bound,
                        max,
                        "record exceeds the link's maximum frame; the backup cannot follow: dropping the link"
                    );
                    self.link_down(now, "record too large");
                    return;
                }
            }
        }
    }

    /// Releases held segments up to the commit point, one batch verdict per queue run.
    fn release(&mut self) {
        let upto = self.core.committed();
        let Some(gate) = self.gate.clone() else {
            self.held.retain(|h| h.seq > upto);
            return;
        };
        let metrics = self.admin.metrics();
        let mut last: Option<(u16, u32)> = None;
        let verdict = |queue: u16, id: u32| {
            if let Err(e) = gate.release_upto(queue, id) {
                warn!(role = "primary", epoch = self.epoch, error = %e, "gate release verdict failed");
            }
        };
        let mut batches = [0u64; 2];
        while self.held.front().is_some_and(|h| h.seq <= upto) {
            let h = self.held.pop_front().expect("front exists");
            if let Some((q, id)) = last
                && q != h.queue
            {
                verdict(q, id);
            }
            last = Some((h.queue, h.id));
            let queue = GateQueue::from_dir(Some(h.dir));
            metrics.gate_packets.get(queue).inc();
            batches[usize::from(h.dir == Dir::ToClient)] = 1;
        }
        if let Some((q, id)) = last {
            verdict(q, id);
            for (i, queue) in [GateQueue::Inbound, GateQueue::Outbound].into_iter().enumerate() {
                metrics.gate_batches.get(queue).add(batches[i]);
            }
        }
    }

    fn publish(&mut self) {
        self.grant_output();
        let upto = self.core.committed();
        self.commit_tx.send_if_modified(|c| {
            let news = c.upto != upto;
            c.upto = upto;
            news
        });
        let status = SenderStatus {
            peer: self.core.peer(),
            peer_node: self.link.as_ref().map(|l| l.node.clone()),
            sent: self.core.sent(),
            acked: self.core.acked(),
            committed: upto,
            held_segments: self.held.len(),
            backlog: self.outbound.len(),
            suspected: self.core.suspected(),
            stepped_down: self.core.stepped_down(),
        };
        self.status_tx.send_if_modified(|s| {
            let news = *s != status;
            *s = status;
            news
        });
    }

    /// Tells the gate's output lease how long the kernel may go on sending from the VIP
    /// ([`OutputCommit::output_grant`]). Runs at every wake-up, so a revocation reaches the kernel's lease at
    /// its next renewal.
    fn grant_output(&self) {
        let Some(gate) = &self.gate else { return };
        let now = Instant::now();
        let until = self.core.output_grant(now, ALONE_GRANT, SYNCING_GRANT, self.cfg.output_grant);
        // Between this task's wake-ups the lease follows the echoes itself, while the grant stands.
        let follow = match &self.link {
            Some(l) if until > now && self.core.is_linked() => Some((l.liveness.clone(), self.cfg.output_grant)),
            _ => None,
        };
        gate.follow_echoes(follow);
        gate.grant_output(until);
    }

    fn heartbeat_rtt(&mut self) {
        let Some(l) = self.link.as_mut() else { return };
        let n = l.liveness.heartbeats();
        if n != l.heartbeats {
            l.heartbeats = n;
            if let Some(rtt) = l.liveness.rtt() {
                self.admin.metrics().observe_heartbeat_rtt(rtt);
            }
        }
    }

    fn protection(&self, own: Option<UnprotectedReason>) -> Protection {
        match own {
            Some(reason) => Protection::Unprotected(reason),
            None if self.core.peer() == PeerState::Connected => Protection::Protected,
            None => Protection::Unprotected(UnprotectedReason::NoBackup),
        }
    }

    /// Recomputes the protection of one open connection, or of all.
    fn reprotect(&mut self, only: Option<ConnKey>) {
        let peer_connected = self.core.peer() == PeerState::Connected;
        let of = |own: Option<UnprotectedReason>| match own {
            Some(reason) => Protection::Unprotected(reason),
            None if peer_connected => Protection::Protected,
            None => Protection::Unprotected(UnprotectedReason::NoBackup),
        };
        match only {
            Some(key) => {
                if let Some(oc) = self.open.get_mut(&key) {
                    oc.guard.set_protection(of(oc.own));
                }
            }
            None => {
                for oc in self.open.values_mut() {
                    oc.guard.set_protection(of(oc.own));
                }
            }
        }
    }

    /// Sends `ConnClosed` for connections that are over (module documentation).
    ///
    /// One that is over waits in `settling` until every record numbered when it was seen over is
    /// committed, and at least one sweep: a client's last FIN reaches this node's kernel, which
    /// acknowledges it, only once committed. Dropped earlier (during a switchover nothing is committed),
    /// the backup would take over without the connection and reset the client's retransmitted FIN.
    fn sweep(&mut self, now: Instant) {
        let linger = self.cfg.conn_linger;
        let committed = self.core.committed();
        let mut close = Vec::new();
        {
            let table = lock(&self.table);
            let over = |key: &ConnKey| {
                table.conn(key).map(|c| {
                    c.tracked().is_none_or(|t| matches!(t.tracker().state(), TcpState::Close | TcpState::TimeWait))
                })
            };
            // Settled ones first, so a connection seen over in this sweep waits for the next.
            self.settling.retain(|key, seq| {
                if *seq > committed {
                    return true;
                }
                // Gone or reused by a new connection (tracked again by the proxy's events): not ours now.
                if over(key) == Some(true) {
                    close.push((*key, true));
                }
                false
            });
            let sent = self.core.sent();
            let settling = &mut self.settling;
            self.closing.retain(|key, c| {
                let Some(over) = over(key) else { return false };
                if over {
                    settling.insert(*key, sent);
                    return false;
                }
                if now.saturating_duration_since(c.last_segment) >= linger {
                    close.push((*key, false));
                    return false;
                }
                true
            });
            let mut seen = HashMap::with_capacity(self.unopened.len());
            // A set, not a scan of `close`: a burst of short connections closes thousands per sweep.
            let closed: HashSet<ConnKey> = close.iter().map(|(k, _)| *k).collect();
            for conn in table.conns() {
                let key = conn.key();
                if self.open.contains_key(&key)
                    || self.closing.contains_key(&key)
                    || self.settling.contains_key(&key)
                    || closed.contains(&key)
                {
                    continue;
                }
                let first = self.unopened.get(&key).copied().unwrap_or(now);
                let over =
                    conn.tracked().is_some_and(|t| matches!(t.tracker().state(), TcpState::Close | TcpState::TimeWait));
                if over {
                    self.settling.insert(key, sent);
                } else if now.saturating_duration_since(first) >= linger {
                    close.push((key, false));
                } else {
                    seen.insert(key, first);
                }
            }
            self.unopened = seen;
        }
        for (conn, over) in close {
            if !over {
                info!(role = "primary", epoch = self.epoch, conn = ?conn, linger = ?linger,
                    "connection unfinished after the linger time: its replica is dropped");
            }
            self.record(now, Message::ConnClosed { conn });
        }
    }
}

trait GateQueueExt {
    fn from_dir(dir: Option<Dir>) -> GateQueue;
}

impl GateQueueExt for GateQueue {
    fn from_dir(dir: Option<Dir>) -> GateQueue {
        match dir {
            Some(Dir::ToClient) => GateQueue::Outbound,
            _ => GateQueue::Inbound,
        }
    }
}

fn reason_label(reason: &Unprotection) -> UnprotectedReason {
    match reason {
        Unprotection::MidStream => UnprotectedReason::MidStream,
        Unprotection::Framing(_) | Unprotection::ExchangeMismatch { .. } => UnprotectedReason::HttpUnframed,
        // The tracker's own troubles (the variants change as the table does).
        #[allow(unreachable_patterns)]
        _ => UnprotectedReason::TrackerLost,
    }
}

/// The connection a VIP datagram belongs to (IPv4 header and TCP ports only; unchecked).
fn conn_key_of(datagram: &[u8], dir: Dir) -> Option<ConnKey> {
    let ihl = usize::from(*datagram.first()? & 0x0f) * 4;
    if datagram.len() < ihl + 4 || ihl < 20 {
        return None;
    }
    let ip = |at: usize| std::net::Ipv4Addr::new(datagram[at], datagram[at + 1], datagram[at + 2], datagram[at + 3]);
    let port = |at: usize| u16::from_be_bytes([datagram[at], datagram[at + 1]]);
    let src = SocketAddrV4::new(ip(12), port(ihl));
    let dst = SocketAddrV4::new(ip(16), port(ihl + 2));
    Some(match dir {
        Dir::ToServer => ConnKey { client: src, server: dst },
        Dir::ToClient => ConnKey { client: dst, server: src },
    })
}

/// A record that changes no replica. Queued when a backup is suspected over a live link, so that a
/// backup that was only slow renews the lease with its ack before the VIP probe decides.
pub fn lease_ping() -> Message {
    Message::Ping
}

/// A record's size on the wire, roughly: its payload plus a small envelope.
fn approx_len(msg: &Message) -> u64 {
    const ENVELOPE: u64 = 40;
    ENVELOPE
        + match msg {
            Message::Segment { datagram, .. } => datagram.len() as u64,
            Message::Reply { bytes, .. } | Message::Upstream { bytes, .. } => bytes.len() as u64,
            Message::SnapshotConn { state, .. } => state.len() as u64,
            Message::ExchangeStart(x) => (x.method.len() + x.target.len()) as u64 + 40,
            _ => 0,
        }
}

/// Locks a sender mutex. Nothing panics while holding one, so a poisoned lock still holds
/// consistent state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::vip::Mac;

    const MS: Duration = Duration::from_millis(1);
    const LEASE: Duration = Duration::from_millis(100);

    fn events(c: &mut OutputCommit) -> Vec<CommitEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    /// A commit rule with a linked backup whose two-record snapshot was acknowledged at `t0`.
    fn protected(t0: Instant) -> OutputCommit {
        let mut c = OutputCommit::new(LEASE, 3, 0).unwrap();
        assert_eq!(c.handle_link_up(t0, 2), Ok(1));
        c.handle_sent(t0, 10);
        c.handle_sent(t0, 10);
        c.handle_ack(t0, 2);
        assert_eq!(events(&mut c), [CommitEvent::Peer(PeerState::Syncing), CommitEvent::Peer(PeerState::Connected)]);
        c
    }

    #[test]
    fn alone_every_record_is_committed_at_once() {
        let t0 = Instant::now();
        let mut c = OutputCommit::new(LEASE, 1, 0).unwrap();
        assert_eq!(c.handle_sent(t0, 1), 1);
        assert_eq!(c.handle_sent(t0, 1), 2);
        assert_eq!(c.committed(), 2);
        assert_eq!(c.peer(), PeerState::None);
        assert_eq!(c.poll_timeout(t0), None);
    }

    #[test]
    fn syncing_spare_releases_at_once_and_is_connected_only_after_acking_the_early_releases() {
        let t0 = Instant::now();
        let mut c = OutputCommit::new(LEASE, 1, 5).unwrap();
        assert_eq!(c.handle_link_up(t0, 3), Ok(6));
        for _ in 0..3 {
            c.handle_sent(t0, 1);
        }
        assert_eq!(c.handle_sent(t0, 1), 9);
        assert_eq!(c.committed(), 9, "nothing waits for a spare that holds no replica yet");
        c.handle_ack(t0 + MS, 8);
        assert_eq!(c.peer(), PeerState::Syncing, "record 9 went out before the backup held it");
        assert_eq!(c.handle_sent(t0 + MS, 1), 10);
        assert_eq!(c.committed(), 9, "synced: record 10 waits for its ack");
        c.handle_ack(t0 + 2 * MS, 9);
        assert_eq!(c.peer(), PeerState::Connected);
        assert_eq!(c.committed(), 9);
        let acked = c.handle_ack(t0 + 2 * MS, 10);
        assert_eq!(acked, Acked { records: 1, bytes: 1 });
        assert_eq!(c.committed(), 10);
    }

    #[test]
    fn protected_commit_follows_acks_and_never_goes_back() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        c.handle_sent(t0, 1);
        c.handle_sent(t0, 1);
        assert_eq!(c.committed(), 2);
        c.handle_ack(t0 + MS, 3);
        assert_eq!(c.committed(), 3);
        c.handle_ack(t0 + MS, 2);
        assert_eq!(c.committed(), 3);
        c.handle_ack(t0 + MS, 4);
        assert_eq!(c.committed(), 4);
    }

    #[test]
    fn ack_of_a_record_queued_before_a_freeze_does_not_renew_the_lease() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        c.handle_sent(t0 + MS, 1);
        // Frozen for a second; the ack waiting in the socket is read on waking.
        let wake = t0 + 1000 * MS;
        c.handle_ack(wake, 3);
        assert_eq!(c.committed(), 2, "the lease anchored at the queueing time has run out");
        c.handle_timeout(wake, Duration::ZERO);
        assert_eq!(events(&mut c), [CommitEvent::LeasePing, CommitEvent::Probe { id: 0 }]);
        // The backup was only slow: it acknowledges the ping queued on waking.
        assert_eq!(c.handle_sent(wake, 1), 4);
        c.handle_ack(wake + MS, 4);
        assert_eq!((c.suspected(), c.committed()), (None, 4));
    }

    #[test]
    fn echoes_renew_the_lease_from_their_send_time_and_bound_the_output_grant() {
        const ALONE: Duration = Duration::from_secs(3600);
        const GRANT: Duration = Duration::from_millis(90);
        const SYNCING: Duration = Duration::from_secs(1);
        let t0 = Instant::now();
        let alone = OutputCommit::new(LEASE, 1, 0).unwrap();
        assert_eq!(alone.output_grant(t0, ALONE, SYNCING, GRANT), t0 + ALONE);
        let mut joining = OutputCommit::new(LEASE, 1, 0).unwrap();
        joining.handle_link_up(t0, 2).unwrap();
        assert_eq!(joining.output_grant(t0 + MS, ALONE, SYNCING, GRANT), t0 + MS + SYNCING, "syncing");
        let mut c = protected(t0);
        assert_eq!(
            c.output_grant(t0, ALONE, SYNCING, GRANT),
            t0 + GRANT,
            "the grant ends before the backup may declare"
        );
        // An idle pair: echoes keep the lease and the grant moving.
        let t1 = t0 + 3 * LEASE;
        c.handle_echo(t1 + MS, t1);
        c.handle_timeout(t1 + MS, MS);
        assert!(events(&mut c).is_empty());
        assert_eq!(c.output_grant(t1 + MS, ALONE, SYNCING, GRANT), t1 + GRANT);
        // Frozen for a second: the echoes read on waking answer heartbeats sent before the freeze.
        let wake = t1 + 1000 * MS;
        c.handle_echo(wake, t1 + 20 * MS);
        assert_eq!(c.output_grant(wake, ALONE, SYNCING, GRANT), wake, "revoked: nothing renews a grant on waking");
        // An echo of a heartbeat sent after waking grants again.
        c.handle_echo(wake + MS, wake);
        assert_eq!(c.output_grant(wake + MS, ALONE, SYNCING, GRANT), wake + GRANT);
        c.handle_link_down(wake + 2 * MS);
        c.handle_echo(wake + 3 * MS, wake + 3 * MS);
        assert_eq!(c.output_grant(wake + 3 * MS, ALONE, SYNCING, GRANT), wake + 3 * MS, "a broken link grants nothing");
        let mac = Mac([2, 0, 0, 0, 0, 9]);
        c.handle_probe(0, &VipProbe::Answered { mac });
        assert_eq!(c.stepped_down(), Some(StepDownReason::Answered { mac }));
        assert_eq!(c.output_grant(wake + 4 * MS, ALONE, SYNCING, GRANT), wake + 4 * MS);
    }

    #[test]
    fn idle_lease_lapse_is_harmless_and_the_next_ack_renews_it() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        let later = t0 + 10 * LEASE;
        c.handle_timeout(later, 5 * MS);
        assert!(events(&mut c).is_empty(), "nothing waits and the backup is heard: no suspicion");
        c.handle_sent(later, 1);
        c.handle_ack(later + MS, 3);
        assert_eq!(c.committed(), 3);
    }

    #[test]
    fn overdue_ack_suspects_probes_and_unanswered_probe_drops_the_backup() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        c.handle_sent(t0 + MS, 1);
        c.handle_sent(t0 + 2 * MS, 1);
        assert_eq!(c.poll_timeout(t0 + MS), Some(t0 + LEASE), "the lease runs out first");
        c.handle_timeout(t0 + LEASE, Duration::ZERO);
        assert!(events(&mut c).is_empty());
        assert_eq!(c.poll_timeout(t0 + LEASE), Some(t0 + MS + LEASE), "then the oldest record is overdue");
        c.handle_timeout(t0 + MS + LEASE - MS, Duration::ZERO);
        assert!(events(&mut c).is_empty());
        c.handle_timeout(t0 + MS + LEASE, Duration::ZERO);
        assert_eq!(events(&mut c), [CommitEvent::LeasePing, CommitEvent::Probe { id: 0 }]);
        assert_eq!(c.suspected(), Some(SuspectReason::AckOverdue));
        assert_eq!(c.committed(), 2);
        c.handle_probe(0, &VipProbe::Unanswered);
        assert_eq!(
            events(&mut c),
            [CommitEvent::DropLink { reason: SuspectReason::AckOverdue }, CommitEvent::Peer(PeerState::None)]
        );
        assert_eq!(c.committed(), 4, "everything held is released");
        assert_eq!(c.handle_sent(t0 + LEASE * 2, 1), 5);
        assert_eq!(c.committed(), 5);
    }

    #[test]
    fn a_backup_that_echoes_but_never_acks_is_suspected_when_a_record_waited_a_lease() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        c.handle_sent(t0 + MS, 1);
        for i in 1..=10 {
            let at = t0 + i * 10 * MS;
            c.handle_echo(at + MS, at);
            c.handle_timeout(at + MS, MS);
            if at + MS < t0 + MS + LEASE {
                assert!(events(&mut c).is_empty(), "at {i}: the record has waited less than a lease");
                assert_eq!(c.poll_timeout(at + MS), Some(t0 + MS + LEASE));
            }
        }
        assert_eq!(events(&mut c), [CommitEvent::LeasePing, CommitEvent::Probe { id: 0 }]);
        assert_eq!(c.suspected(), Some(SuspectReason::AckOverdue));
        assert_eq!(c.committed(), 2);
    }

    #[test]
    fn a_syncing_backup_is_given_up_only_after_a_long_silence() {
        let t0 = Instant::now();
        let mut c = OutputCommit::new(LEASE, 1, 0).unwrap();
        c.handle_link_up(t0, 3).unwrap();
        for _ in 0..3 {
            c.handle_sent(t0, 1);
        }
        let later = t0 + 4 * LEASE;
        c.handle_timeout(later, 3 * LEASE);
        assert_eq!(events(&mut c), [CommitEvent::Peer(PeerState::Syncing)], "a slow snapshot is not a dead backup");
        assert_eq!(c.handle_sent(later, 1), 4);
        assert_eq!(c.committed(), 4, "nothing waits for a syncing backup");
        c.handle_timeout(later, LEASE * SYNCING_SILENCE_LEASES);
        assert_eq!(events(&mut c), [CommitEvent::LeasePing, CommitEvent::Probe { id: 0 }]);
        assert_eq!(c.suspected(), Some(SuspectReason::Silent));
    }

    #[test]
    fn silent_backup_is_suspected_even_with_nothing_waiting() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        c.handle_timeout(t0 + 2 * LEASE, LEASE - MS);
        assert!(events(&mut c).is_empty());
        c.handle_timeout(t0 + 2 * LEASE, LEASE);
        assert_eq!(events(&mut c), [CommitEvent::LeasePing, CommitEvent::Probe { id: 0 }]);
        assert_eq!(c.suspected(), Some(SuspectReason::Silent));
    }

    #[test]
    fn link_down_holds_until_the_probe_and_an_answer_steps_down_for_good() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        c.handle_sent(t0, 1);
        c.handle_link_down(t0 + MS);
        assert_eq!(events(&mut c), [CommitEvent::Probe { id: 0 }]);
        c.handle_ack(t0 + MS, 3);
        assert_eq!(c.committed(), 2, "acks after the link broke count for nothing");
        let mac = Mac([2, 0, 0, 0, 0, 9]);
        c.handle_probe(0, &VipProbe::Answered { mac });
        let reason = StepDownReason::Answered { mac };
        assert_eq!(events(&mut c), [CommitEvent::StepDown(reason), CommitEvent::Peer(PeerState::None)]);
        c.handle_sent(t0 + 2 * MS, 1);
        assert_eq!(c.committed(), 2);
        assert_eq!(c.handle_link_up(t0 + 3 * MS, 2), Err(LinkUpError::SteppedDown));
    }

    #[test]
    fn link_down_and_an_unanswered_probe_drop_the_backup_with_the_reason_for_status() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        c.handle_link_down(t0 + MS);
        assert_eq!(events(&mut c), [CommitEvent::Probe { id: 0 }]);
        c.handle_probe(0, &VipProbe::Unanswered);
        let reason = SuspectReason::LinkDown;
        assert_eq!(events(&mut c), [CommitEvent::DropLink { reason }, CommitEvent::Peer(PeerState::None)]);
        assert_eq!(reason.to_string(), "replication link ended");
        assert_eq!(SuspectReason::Silent.to_string(), "the backup silent for a lease");
    }

    #[test]
    fn inconclusive_probe_probes_again_and_resumed_acks_end_the_suspicion() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        c.handle_sent(t0 + MS, 1);
        c.handle_timeout(t0 + MS + LEASE, Duration::ZERO);
        assert_eq!(events(&mut c), [CommitEvent::LeasePing, CommitEvent::Probe { id: 0 }]);
        c.handle_probe(0, &VipProbe::Failed { error: "iface down".into() });
        assert_eq!(events(&mut c), [CommitEvent::LeasePing, CommitEvent::Probe { id: 1 }]);
        c.handle_probe(0, &VipProbe::Unanswered);
        assert!(events(&mut c).is_empty(), "a stale probe decides nothing");
        // The backup answers a record queued just now: the lease is valid again.
        let now = t0 + 2 * LEASE;
        c.handle_sent(now, 1);
        c.handle_ack(now + MS, 4);
        assert_eq!(c.suspected(), None);
        assert_eq!(c.committed(), 4);
        c.handle_probe(1, &VipProbe::Unanswered);
        assert!(events(&mut c).is_empty(), "the probe no longer matters");
        assert_eq!(c.peer(), PeerState::Connected);
    }

    #[test]
    fn later_epoch_seen_steps_down_at_once_and_a_second_join_is_busy() {
        let t0 = Instant::now();
        let mut c = protected(t0);
        assert_eq!(c.handle_link_up(t0, 2), Err(LinkUpError::Busy));
        c.handle_epoch_seen(2);
        assert!(events(&mut c).is_empty());
        c.handle_epoch_seen(4);
        let reason = StepDownReason::HigherEpoch { ours: 3, seen: 4 };
        assert_eq!(events(&mut c), [CommitEvent::StepDown(reason), CommitEvent::Peer(PeerState::None)]);
        assert_eq!(c.stepped_down(), Some(reason));
    }

    #[test]
    fn upstream_head_is_rechunked_without_a_length_and_kept_with_one() {
        let (mut parts, ()) =
            http::Response::builder().status(200).header("content-type", "text/plain").body(()).unwrap().into_parts();
        let (head, chunked) = upstream_head(&parts, false);
        assert!(chunked);
        assert_eq!(head, b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n");
        parts.headers.insert("content-length", "5".parse().unwrap());
        assert!(!upstream_head(&parts, false).1);
        parts.headers.remove("content-length");
        assert!(!upstream_head(&parts, true).1, "a HEAD response has no body");
        parts.status = http::StatusCode::NOT_MODIFIED;
        assert!(!upstream_head(&parts, false).1);
    }

    #[test]
    fn conn_key_of_reads_both_directions_and_refuses_short_datagrams() {
        let mut d = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 100];
        d.extend_from_slice(&[0x9c, 0x40, 0, 80]);
        let client: SocketAddrV4 = "10.0.0.1:40000".parse().unwrap();
        let server: SocketAddrV4 = "10.0.0.100:80".parse().unwrap();
        assert_eq!(conn_key_of(&d, Dir::ToServer), Some(ConnKey { client, server }));
        assert_eq!(conn_key_of(&d, Dir::ToClient), Some(ConnKey { client: server, server: client }));
        assert_eq!(conn_key_of(&d[..22], Dir::ToServer), None);
        assert_eq!(conn_key_of(&[0x41; 30], Dir::ToServer), None);
    }
}
