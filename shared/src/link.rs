//! The replication link: one TCP connection from a backup to its primary, carrying
//! the primary's ordered record stream one way and cumulative acks the other
//! (ARCHITECTURE.md, invariants 1 and 2).
//!
//! # Wire format
//!
//! Every message is one frame (see `frame`: `[u32 length][u32 crc32][payload]`,
//! big-endian header) whose payload is one bincode-encoded value (see `codec`) of a
//! type from `protocol`. The side that connects is the backup (`--join`); the side
//! that accepts is the primary (`--repl-listen`).
//!
//! ```text
//!  backup (connects)                                   primary (accepts)
//!    Handshake::Hello { version, min_version,
//!                       cluster, node, role, epoch } ──▶
//!                                                     ◀── Handshake::Welcome(Accepted { version, node, epoch })
//!                                                         or Welcome(Refused { reason }), then FIN
//!    ─── from here on, each direction independently ───
//!                                                     ◀── ToBackup::Record { seq, epoch, msg }   seq = n, n+1, ...
//!                                                     ◀── ToBackup::Heartbeat { sent_us, epoch }  every interval
//!    ToPrimary::Ack { upto }                         ──▶  cumulative: records ..=upto are held
//!    ToPrimary::Heartbeat { sent_us, echo_us }       ──▶  echo_us: the primary heartbeat being answered, or 0
//! ```
//!
//! With a pre-shared key ([`LinkConfig::auth`], `--psk-file`; protocol 4 on) the handshake proves the key
//! both ways, and every later frame carries a tag (see `auth` for the derivations):
//!
//! ```text
//!    Handshake::AuthHello { hello, nonce_b }        ──▶
//!                                                     ◀── Handshake::AuthWelcome { Accepted, nonce_p, proof_p }
//!                                                         or Welcome(Refused { reason }), then FIN
//!    Handshake::Proof { proof_b }                   ──▶   (or Abort { reason } if proof_p is wrong, then FIN)
//!    ─── from here on each frame's payload is [message][HMAC tag over frame number and message] ───
//! ```
//!
//! * Authentication is all or nothing: a primary with a key refuses a plain `Hello` ("no authentication"),
//!   one without a key refuses an `AuthHello`, and a joining node with a key takes nothing but an
//!   `AuthWelcome` with a good proof. A wrong key fails the primary's proof at the joining node, which
//!   logs "wrong key" and tells the primary (`Abort`), which logs it with the peer's address; a joining
//!   impostor fails its own proof at the primary. A primary before protocol 4 cannot read an `AuthHello`
//!   and closes the connection, which the joining node reports as such.
//! * An authenticated link speaks protocol 4 or later. A node without a key still speaks 2..=4 with no
//!   tags, so an upgrade from a release before 4 can run unauthenticated until both nodes have keys.
//! * A frame that fails its tag (altered, replayed, reordered, after a lost one) ends the link with
//!   [`LinkError::Integrity`]. The maximum frame size counts the 32-byte tag.
//! * Handshake frames are limited to [`HANDSHAKE_MAX_FRAME`], so an unauthenticated
//!   connection cannot make the primary allocate a full-sized frame. Both handshake
//!   messages must arrive within `handshake_timeout`.
//! * Versions: each side speaks `[min_version, version]`; the link speaks
//!   `min(both versions)` if that is within both ranges, else the primary refuses.
//! * Roles: only a primary accepts, and only a backup may join it. A joining node
//!   that says it is a primary is refused ("two primaries").
//! * Epochs ([`check_hello`]): the primary refuses a joining node whose epoch is
//!   higher than its own. Such a node has seen a takeover this primary has not, so
//!   this primary is the stale one and must step down (stepping down is the caller's
//!   business); it never streams to a node that knows better. The backup likewise
//!   refuses a `Welcome` whose epoch is below its own. After the handshake the
//!   backup rejects any record or heartbeat whose epoch is below the highest it has
//!   seen on the link ([`StreamError::EpochRegressed`]).
//! * Records are numbered by the primary's link from a start value its caller gives
//!   (the position of the snapshot in the primary's stream), one apart, and sent
//!   without waiting for acks. The backup takes the first record's `seq` as the start
//!   and ends the link on any gap ([`StreamError::Gap`]).
//! * Acks are cumulative and sent only once the backup's caller reports a record
//!   applied ([`BackupLink::applied`]): at once when the backup is idle (everything
//!   received is applied and the reader has drained its input) if the primary waits on
//!   one of those records ([`Message::holds_output`]), otherwise after at most
//!   `ack_every` records or `ack_delay` (zero: no timer), and records nothing waits on
//!   within `ack_lazy` or with any other frame the backup writes. An ack may never
//!   exceed what was sent nor go backwards.
//! * Heartbeats: the primary sends one every `heartbeat_interval`; the backup answers
//!   each at once (so `echo_us` yields the round-trip time) and sends its own when it
//!   has answered none for an interval. Any received byte counts as hearing the peer
//!   ([`PeerLiveness`]); deciding that a peer is dead is the failure detector's job.
//! * A corrupt, oversized, truncated or undecodable frame, or a broken stream rule,
//!   ends the link with a logged reason and a [`LinkError`]; nothing here panics on
//!   peer input.
//!
//! TCP: set `TCP_NODELAY` ([`prepare_tcp`]). The link writes whole batches and small
//! acks; Nagle's algorithm would hold an ack behind the peer's delayed ACK (RFC 9293
//! §3.7.4, RFC 1122 §4.2.3.2), up to 40 ms on Linux, which output commit would feel.
//!
//! The pure parts ([`check_hello`], [`check_welcome`], [`SendBook`], [`ReceiveBook`],
//! [`AckBatcher`]) take time as an argument and do no I/O; the drivers spawned by
//! [`Accepted::start`] and [`join`] own the socket and the timers.

use crate::auth::{self, IntegrityError, LinkAuth, Opener, Sealer, SessionKeys, TAG_LEN};
use crate::codec;
use crate::frame::{self, DecodeError, EncodeError, HEADER_LEN, Parsed};
use crate::protocol::{
    AUTH_VERSION, Handshake, Hello, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, Record, Role, ToBackup, ToPrimary,
    Welcome,
};
use bytes::BytesMut;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::net::SocketAddrV4;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Largest handshake frame either side accepts.
pub const HANDSHAKE_MAX_FRAME: usize = 64 << 10;

// ---------------------------------------------------------------------------------
// Configuration and identity
// ---------------------------------------------------------------------------------

/// Tuning of a link. Both nodes of a pair should use the same `max_frame`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Time allowed for the whole handshake.
    pub handshake_timeout: Duration,
    /// Interval between heartbeats sent by each side.
    pub heartbeat_interval: Duration,
    /// Largest frame payload sent or accepted after the handshake.
    pub max_frame: usize,
    /// Longest an applied record waits before the backup acknowledges it while busy.
    /// Zero sets no timer: acks go out when idle or every `ack_every` records.
    pub ack_delay: Duration,
    /// The backup acknowledges at once when this many applied records are unacknowledged.
    pub ack_every: u64,
    /// Longest the backup holds the ack of records the primary does not wait on
    /// ([`Message::holds_output`]) when no other ack or write carries it. Zero: acknowledge
    /// them like the others. Far below the lease, which a record waits before its backup is
    /// suspected.
    pub ack_lazy: Duration,
    /// Records queued between the link and its caller, each way. A full queue makes
    /// the primary's `send` wait and the backup stop reading: TCP pushes back.
    pub queue: usize,
    /// Bytes of frames the primary gathers before a write.
    pub write_batch: usize,
    /// Time a closing link has to hand its last bytes to the peer.
    pub close_timeout: Duration,
    /// Authentication: a pre-shared key both nodes hold, or none. Both nodes must agree; the default is
    /// none, which the binaries allow only when told explicitly (`--insecure-replication`).
    pub auth: LinkAuth,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            handshake_timeout: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(20),
            max_frame: frame::DEFAULT_MAX_FRAME,
            ack_delay: Duration::from_millis(1),
            ack_every: 64,
            ack_lazy: Duration::from_millis(5),
            queue: 4096,
            write_batch: 256 << 10,
            close_timeout: Duration::from_secs(2),
            auth: LinkAuth::Insecure,
        }
    }
}

/// A [`LinkConfig`] value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replication link config: {field} {problem}")]
pub struct InvalidLinkConfig {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl LinkConfig {
    /// Checks that every value is usable.
    pub fn validate(&self) -> Result<(), InvalidLinkConfig> {
        let bad = |field, problem: String| Err(InvalidLinkConfig { field, problem });
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout", "must be positive".into());
        }
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval", "must be positive".into());
        }
        if self.max_frame < HANDSHAKE_MAX_FRAME || self.max_frame > frame::MAX_FRAME_LIMIT {
            return bad(
                "max_frame",
                format!("must be between {HANDSHAKE_MAX_FRAME} and {} bytes", frame::MAX_FRAME_LIMIT),
            );
        }
        if self.ack_every == 0 {
            return bad("ack_every", "must be at least 1".into());
        }
        if self.queue == 0 {
            return bad("queue", "must be at least 1".into());
        }
        if self.write_batch == 0 {
            return bad("write_batch", "must be at least 1".into());
        }
        if self.close_timeout.is_zero() {
            return bad("close_timeout", "must be positive".into());
        }
        Ok(())
    }

    /// The largest message a frame carries: `max_frame` less the tag, when frames carry one.
    fn max_body(&self) -> usize {
        if self.auth.is_secure() { self.max_frame - TAG_LEN } else { self.max_frame }
    }

    /// `local` as this link's authentication has it speak: versions from [`AUTH_VERSION`] when it
    /// authenticates.
    fn speaking(&self, local: &LocalIdentity) -> LocalIdentity {
        let mut local = local.clone();
        if self.auth.is_secure() {
            local.min_version = local.min_version.max(AUTH_VERSION);
        }
        local
    }
}

/// Who this node is, as the handshake states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    /// Cluster name; both nodes of a pair must agree.
    pub cluster: String,
    /// This node's name (logs and status).
    pub node: String,
    /// This node's current role.
    pub role: Role,
    /// This node's current epoch.
    pub epoch: u64,
    /// Highest protocol version spoken ([`PROTOCOL_VERSION`]).
    pub version: u16,
    /// Lowest protocol version accepted ([`MIN_PROTOCOL_VERSION`]).
    pub min_version: u16,
}

impl LocalIdentity {
    /// An identity speaking this build's protocol versions.
    pub fn new(cluster: impl Into<String>, node: impl Into<String>, role: Role, epoch: u64) -> Self {
        LocalIdentity {
            cluster: cluster.into(),
            node: node.into(),
            role,
            epoch,
            version: PROTOCOL_VERSION,
            min_version: MIN_PROTOCOL_VERSION,
        }
    }

    /// The `Hello` this node sends when it joins.
    pub fn hello(&self) -> Hello {
        Hello {
            version: self.version,
            min_version: self.min_version,
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            role: self.role,
            epoch: self.epoch,
        }
    }
}

/// The other end of an established link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node name.
    pub node: String,
    /// The peer's role.
    pub role: Role,
    /// The peer's epoch at the handshake.
    pub epoch: u64,
    /// The protocol version the link speaks.
    pub version: u16,
}

// ---------------------------------------------------------------------------------
// Handshake decisions (pure)
// ---------------------------------------------------------------------------------

/// Why the primary refuses a joining node. The `Display` text is what the joining
/// node is told and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The joining node belongs to another cluster.
    #[error("wrong cluster: this node is in cluster {ours:?}, the joining node {node:?} in {theirs:?}")]
    WrongCluster { ours: String, theirs: String, node: String },
    /// The joining node's `Hello` states a version range that is empty.
    #[error("invalid version range from {node:?}: min_version {min} is above version {max}")]
    InvalidVersionRange { node: String, min: u16, max: u16 },
    /// No protocol version is in both ranges.
    #[error(
        "incompatible protocol versions: this node speaks {our_min}..={our_max}, \
         the joining node {node:?} speaks {their_min}..={their_max}"
    )]
    IncompatibleVersion { node: String, our_min: u16, our_max: u16, their_min: u16, their_max: u16 },
    /// The joining node has this node's name: most likely it connected to itself.
    #[error("the joining node has this node's own name {node:?} (did it connect to itself?)")]
    SameNode { node: String },
    /// This node is not a primary, so there is no stream to join.
    #[error("this node is a {ours:?}, not the primary; join the primary instead")]
    NotPrimary { ours: Role },
    /// The joining node is a primary too.
    #[error(
        "two primaries: {node:?} (epoch {their_epoch}) claims to be primary, and so does this node (epoch {our_epoch})"
    )]
    TwoPrimaries { node: String, our_epoch: u64, their_epoch: u64 },
    /// This node requires a key, and the joining node sent a plain `Hello`.
    #[error(
        "no authentication: the joining node {node:?} sent no proof of a key, and this node requires the \
         pre-shared key (give both nodes the same --psk-file; a node before protocol 4 cannot authenticate)"
    )]
    NoAuthentication { node: String },
    /// The joining node authenticates, and this node runs without a key.
    #[error(
        "the joining node {node:?} authenticates with a pre-shared key, but this node runs with \
         --insecure-replication: give both nodes the same --psk-file, or both --insecure-replication"
    )]
    NotAuthenticating { node: String },
    /// The joining node has seen a later epoch: this primary is stale and must step down.
    #[error(
        "joining node {node:?} is at epoch {their_epoch}, ahead of this primary's epoch {our_epoch}: \
         this primary is stale and must step down"
    )]
    PeerEpochAhead { node: String, our_epoch: u64, their_epoch: u64 },
}

/// Decides whether the primary accepts a joining node that authenticates (`offered`) or not, when this
/// node requires authentication (`required`) or not. Checked before [`check_hello`].
pub fn check_auth(offered: bool, required: bool, node: &str) -> Result<(), Refusal> {
    match (offered, required) {
        (false, true) => Err(Refusal::NoAuthentication { node: node.to_owned() }),
        (true, false) => Err(Refusal::NotAuthenticating { node: node.to_owned() }),
        _ => Ok(()),
    }
}

/// Decides whether the primary (`local`) accepts the joining node's `hello`, and if
/// so which protocol version the link speaks. Checks, in order: cluster, version
/// ranges, node name, roles, epoch.
pub fn check_hello(hello: &Hello, local: &LocalIdentity) -> Result<u16, Refusal> {
    let node = || hello.node.clone();
    if hello.cluster != local.cluster {
        return Err(Refusal::WrongCluster { ours: local.cluster.clone(), theirs: hello.cluster.clone(), node: node() });
    }
    if hello.min_version > hello.version {
        return Err(Refusal::InvalidVersionRange { node: node(), min: hello.min_version, max: hello.version });
    }
    let version = hello.version.min(local.version);
    if version < hello.min_version.max(local.min_version) {
        return Err(Refusal::IncompatibleVersion {
            node: node(),
            our_min: local.min_version,
            our_max: local.version,
            their_min: hello.min_version,
            their_max: hello.version,
        });
    }
    if hello.node == local.node {
        return Err(Refusal::SameNode { node: node() });
    }
    if local.role != Role::Primary {
        return Err(Refusal::NotPrimary { ours: local.role });
    }
    if hello.role == Role::Primary {
        return Err(Refusal::TwoPrimaries { node: node(), our_epoch: local.epoch, their_epoch: hello.epoch });
    }
    if hello.epoch > local.epoch {
        return Err(Refusal::PeerEpochAhead { node: node(), our_epoch: local.epoch, their_epoch: hello.epoch });
    }
    Ok(version)
}

/// Why the joining node does not take the primary's `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WelcomeError {
    /// The primary refused; `reason` is its words.
    #[error("refused by the primary: {reason}")]
    Refused { reason: String },
    /// The primary chose a version outside this node's range.
    #[error("the primary chose protocol version {version}, outside this node's {min}..={max}")]
    VersionOutOfRange { version: u16, min: u16, max: u16 },
    /// This node requires a key and the primary accepted without proving one.
    #[error("the primary {node:?} accepted without proving the pre-shared key; refusing an unauthenticated link")]
    NotAuthenticated { node: String },
    /// The primary's epoch is below this node's: a stream from it must not be accepted.
    #[error("the primary {node:?} is at epoch {theirs}, behind this node's epoch {ours}")]
    StaleEpoch { node: String, ours: u64, theirs: u64 },
}

/// Decides whether the joining node (`local`) takes the primary's `welcome`.
pub fn check_welcome(welcome: &Welcome, local: &LocalIdentity) -> Result<PeerInfo, WelcomeError> {
    match welcome {
        Welcome::Refused { reason } => Err(WelcomeError::Refused { reason: reason.clone() }),
        &Welcome::Accepted { version, ref node, epoch } => {
            if version < local.min_version || version > local.version {
                return Err(WelcomeError::VersionOutOfRange { version, min: local.min_version, max: local.version });
            }
            if epoch < local.epoch {
                return Err(WelcomeError::StaleEpoch { node: node.clone(), ours: local.epoch, theirs: epoch });
            }
            Ok(PeerInfo { node: node.clone(), role: Role::Primary, epoch, version })
        }
    }
}

// ---------------------------------------------------------------------------------
// Stream bookkeeping (pure)
// ---------------------------------------------------------------------------------

/// A broken rule of the record stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A record is not numbered one after the previous.
    #[error("sequence gap: expected record {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    /// A record numbered 0 (numbering starts at 1).
    #[error("record numbered 0")]
    ZeroSeq,
    /// A record or heartbeat from an epoch below one already seen on the link.
    #[error("epoch went back from {current} to {got}")]
    EpochRegressed { current: u64, got: u64 },
    /// An ack for a record that was never sent.
    #[error("ack up to {upto}, but only up to {sent} was sent")]
    AckBeyondSent { upto: u64, sent: u64 },
    /// An ack below an earlier one.
    #[error("ack went back from {acked} to {upto}")]
    AckRegressed { upto: u64, acked: u64 },
    /// The local caller reported a record applied that the link never delivered.
    #[error("record {applied} reported applied, but only up to {received} was received")]
    AppliedBeyondReceived { applied: u64, received: u64 },
}

/// The primary's view of its stream on one link: what was sent, what is acked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendBook {
    sent: u64,
    acked: u64,
}

impl SendBook {
    /// A stream whose first record is `first_seq`.
    pub fn new(first_seq: NonZeroU64) -> Self {
        let before = first_seq.get() - 1;
        SendBook { sent: before, acked: before }
    }

    /// Record `seq` is being sent; it must be the next one.
    pub fn handle_sent(&mut self, seq: u64) -> Result<(), StreamError> {
        if seq != self.sent + 1 {
            return Err(StreamError::Gap { expected: self.sent + 1, got: seq });
        }
        self.sent = seq;
        Ok(())
    }

    /// The backup holds everything up to `upto`. Returns whether that is news.
    pub fn handle_ack(&mut self, upto: u64) -> Result<bool, StreamError> {
        if upto > self.sent {
            return Err(StreamError::AckBeyondSent { upto, sent: self.sent });
        }
        if upto < self.acked {
            return Err(StreamError::AckRegressed { upto, acked: self.acked });
        }
        let news = upto > self.acked;
        self.acked = upto;
        Ok(news)
    }

    /// Last record sent (start − 1 before any).
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Last record acknowledged (start − 1 before any).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Records sent and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.sent - self.acked
    }
}

/// The backup's check of the incoming stream: consecutive numbers, no epoch going back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveBook {
    epoch: u64,
    last: Option<u64>,
}

impl ReceiveBook {
    /// A stream from a primary at `epoch` (its `Welcome`).
    pub fn new(epoch: u64) -> Self {
        ReceiveBook { epoch, last: None }
    }

    /// A record arrived. The first fixes the start; each later one must follow.
    pub fn handle_record(&mut self, seq: u64, epoch: u64) -> Result<(), StreamError> {
        match self.last {
            None if seq == 0 => return Err(StreamError::ZeroSeq),
            Some(last) if seq != last.wrapping_add(1) => {
                return Err(StreamError::Gap { expected: last.wrapping_add(1), got: seq });
            }
            _ => {}
        }
        self.handle_epoch(epoch)?;
        self.last = Some(seq);
        Ok(())
    }

    /// A heartbeat (or anything else carrying the primary's epoch) arrived.
    pub fn handle_epoch(&mut self, epoch: u64) -> Result<(), StreamError> {
        if epoch < self.epoch {
            return Err(StreamError::EpochRegressed { current: self.epoch, got: epoch });
        }
        self.epoch = epoch;
        Ok(())
    }

    /// Last record received.
    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// Highest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// When the backup acknowledges. Inputs: records handed to the caller
/// (`handle_delivered`, saying whether the primary holds client output on it), records
/// the caller applied (`handle_applied`), whether the reader has a frame waiting
/// (`handle_input`). Output: `poll_ack(now)` says what to acknowledge now;
/// `poll_timeout()` when to ask again; `flush()` everything applied (the last ack, or one
/// riding in a write that goes out anyway).
///
/// An ack is one write on each side and a wake-up of the primary's sender, so the
/// batcher sends as few as it can without delaying any client: at once when the input
/// read so far is applied and holds a record the primary waits on
/// ([`Message::holds_output`]); a batch of records nothing waits on (logged upstream
/// bytes, exchange ends) waits up to `lazy` for the next such ack or any other write.
/// Cumulative acks make that safe: acknowledging a later record covers the earlier ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckBatcher {
    every: u64,
    delay: Duration,
    lazy: Duration,
    delivered: u64,
    /// Highest delivered record the primary holds output on.
    awaited: u64,
    applied: u64,
    acked: u64,
    input_waiting: bool,
    pending_since: Option<Instant>,
}

impl AckBatcher {
    /// Acks after `every` applied records or `delay`, whichever comes first, and at
    /// once when idle. A zero `delay` sets no timer: acks go out when idle or every
    /// `every` records only. Records nothing waits on are acknowledged when idle only if
    /// `lazy` is zero; otherwise within `lazy` (see the type's documentation).
    pub fn new(every: u64, delay: Duration, lazy: Duration) -> Self {
        AckBatcher {
            every: every.max(1),
            delay,
            lazy,
            delivered: 0,
            awaited: 0,
            applied: 0,
            acked: 0,
            input_waiting: false,
            pending_since: None,
        }
    }

    /// Record `seq` was handed to the caller (called before the caller can see it);
    /// `awaited`: the primary holds client output until it is acknowledged.
    pub fn handle_delivered(&mut self, seq: u64, awaited: bool) {
        self.delivered = self.delivered.max(seq);
        if awaited || self.lazy.is_zero() {
            self.awaited = self.awaited.max(seq);
        }
    }

    /// Whether the reader holds or is reading more frames (`true`), or has drained its
    /// input and waits on the socket (`false`).
    pub fn handle_input(&mut self, waiting: bool) {
        self.input_waiting = waiting;
    }

    /// The caller has applied every record up to `seq`.
    pub fn handle_applied(&mut self, now: Instant, seq: u64) -> Result<(), StreamError> {
        if seq > self.delivered {
            return Err(StreamError::AppliedBeyondReceived { applied: seq, received: self.delivered });
        }
        if seq > self.applied {
            self.applied = seq;
            self.pending_since.get_or_insert(now);
        }
        Ok(())
    }

    /// What to acknowledge now, if anything.
    pub fn poll_ack(&mut self, now: Instant) -> Option<u64> {
        if self.applied <= self.acked {
            return None;
        }
        let idle = self.applied == self.delivered && !self.input_waiting;
        let urgent = idle && self.awaited > self.acked;
        let many = self.applied - self.acked >= self.every;
        let late = self.poll_timeout().is_some_and(|t| now >= t);
        if !(urgent || many || late) {
            return None;
        }
        self.flush()
    }

    /// Everything applied, unless already acknowledged: the last ack before closing, or
    /// one that rides in a write going out anyway.
    pub fn flush(&mut self) -> Option<u64> {
        if self.applied <= self.acked {
            return None;
        }
        self.acked = self.applied;
        self.pending_since = None;
        Some(self.acked)
    }

    /// When `poll_ack` will have something to say without further input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let since = self.pending_since?;
        [self.delay, self.lazy].into_iter().filter(|d| !d.is_zero()).min().map(|d| since + d)
    }

    /// Last value acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }
}

// ---------------------------------------------------------------------------------
// Errors of the drivers
// ---------------------------------------------------------------------------------

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The link configuration is unusable.
    #[error(transparent)]
    Config(#[from] InvalidLinkConfig),
    /// The handshake did not complete in time.
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The socket failed.
    #[error("handshake i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before sending its handshake frame.
    #[error("peer closed the connection during the handshake")]
    Closed,
    /// The primary closed the connection instead of answering this node's authenticated hello.
    #[error(
        "the primary closed the connection without answering the authenticated hello: a primary before \
         protocol 4 cannot authenticate (upgrade it, or run both nodes with --insecure-replication); \
         else see the primary's log"
    )]
    ClosedOnAuthHello,
    /// The peer's proof does not match this node's key.
    #[error(
        "wrong key: {peer}'s proof does not match this node's pre-shared key (both nodes need the same --psk-file)"
    )]
    WrongKey { peer: String },
    /// The joining node gave up the handshake, and said why.
    #[error("the joining node {peer:?} gave up the handshake: {reason}")]
    PeerAborted { peer: String, reason: String },
    /// No nonce could be drawn from the kernel.
    #[error("cannot draw a handshake nonce: {0}")]
    Nonce(getrandom::Error),
    /// The peer's bytes are not a valid handshake frame.
    #[error("handshake frame: {0}")]
    Frame(#[from] DecodeError),
    /// This node's handshake message could not be framed (too long a name?).
    #[error("cannot send handshake: {0}")]
    Encode(#[from] EncodeError),
    /// The peer sent a handshake message of the wrong kind.
    #[error("expected a {expected} in the handshake")]
    Unexpected { expected: &'static str },
    /// This node (the primary) refused the joining node, and told it why.
    #[error("refused the joining node: {0}")]
    Refused(Refusal),
    /// This node (joining) did not get or did not take the primary's welcome.
    #[error(transparent)]
    Welcome(#[from] WelcomeError),
}

/// Why an established link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed.
    #[error("replication link i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection between two frames.
    #[error("peer closed the replication link")]
    PeerClosed,
    /// The peer's bytes are not a valid frame or message: bad CRC, oversized,
    /// truncated at the end of the stream, or an undecodable payload.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] DecodeError),
    /// A message could not be framed for sending.
    #[error("cannot send: {0}")]
    Encode(#[from] EncodeError),
    /// A frame failed its authentication tag: altered, replayed, reordered, or after a lost frame.
    #[error("replication frame failed authentication: {0}")]
    Integrity(#[from] IntegrityError),
    /// The stream's rules were broken (gap, epoch regression, impossible ack or apply).
    #[error("replication stream: {0}")]
    Stream(#[from] StreamError),
    /// Closing, the peer did not take the last bytes within `close_timeout`.
    #[error("peer did not take the last bytes within {0:?} of closing")]
    CloseTimedOut(Duration),
    /// The link's task died (a panic, or the runtime shutting down).
    #[error("replication link task: {0}")]
    Task(String),
}

/// The link is down; nothing more will be sent or acknowledged on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("replication link is down")]
pub struct LinkDown;

/// Why a message was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The link is down.
    #[error("replication link is down")]
    LinkDown,
    /// The message could exceed the maximum frame size; it was not numbered.
    #[error("message of up to {bound} bytes exceeds the maximum frame of {max}")]
    TooLarge { bound: usize, max: usize },
}

/// Why a message was not queued without waiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    /// The queue is full; the message is handed back, not numbered.
    #[error("replication queue is full")]
    Full(Box<Message>),
    /// The link is down.
    #[error("replication link is down")]
    LinkDown,
    /// The message could exceed the maximum frame size; it was not numbered.
    #[error("message of up to {bound} bytes exceeds the maximum frame of {max}")]
    TooLarge { bound: usize, max: usize },
}

// ---------------------------------------------------------------------------------
// Liveness
// ---------------------------------------------------------------------------------

/// What the link has heard from its peer, for the failure detector. Cheap to clone
/// and read from any thread.
#[derive(Debug, Clone)]
pub struct PeerLiveness {
    inner: Arc<LivenessInner>,
}

#[derive(Debug)]
struct LivenessInner {
    base: Instant,
    heard_us: AtomicU64,
    heartbeat_us: AtomicU64,
    heartbeats: AtomicU64,
    rtt_us: AtomicU64,
    echo_us: AtomicU64,
    paused: AtomicBool,
}

const NONE_US: u64 = u64::MAX;

impl PeerLiveness {
    fn new(base: Instant) -> Self {
        PeerLiveness {
            inner: Arc::new(LivenessInner {
                base,
                heard_us: AtomicU64::new(0),
                heartbeat_us: AtomicU64::new(NONE_US),
                heartbeats: AtomicU64::new(0),
                rtt_us: AtomicU64::new(NONE_US),
                echo_us: AtomicU64::new(NONE_US),
                paused: AtomicBool::new(false),
            }),
        }
    }

    fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.inner.base).as_micros() as u64
    }

    fn at(&self, us: u64) -> Instant {
        self.inner.base + Duration::from_micros(us)
    }

    fn heard(&self, now: Instant) {
        self.inner.heard_us.store(self.us(now), Ordering::Relaxed);
    }

    fn heartbeat(&self, now: Instant) {
        self.inner.heartbeat_us.store(self.us(now), Ordering::Relaxed);
        self.inner.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    fn set_rtt(&self, rtt: Duration) {
        self.inner.rtt_us.store(rtt.as_micros() as u64, Ordering::Relaxed);
    }

    /// The peer answered a heartbeat this node sent `sent_us` (microseconds after `base`).
    fn echoed(&self, sent_us: u64) {
        let latest = self.inner.echo_us.load(Ordering::Relaxed);
        if latest == NONE_US || sent_us > latest {
            self.inner.echo_us.store(sent_us, Ordering::Relaxed);
        }
    }

    /// When the last byte arrived from the peer (the handshake's end at first).
    pub fn last_heard(&self) -> Instant {
        self.at(self.inner.heard_us.load(Ordering::Relaxed))
    }

    /// How long the peer has been silent at `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard())
    }

    /// When the last heartbeat arrived, if any has.
    pub fn last_heartbeat(&self) -> Option<Instant> {
        let us = self.inner.heartbeat_us.load(Ordering::Relaxed);
        (us != NONE_US).then(|| self.at(us))
    }

    /// Heartbeats received so far.
    pub fn heartbeats(&self) -> u64 {
        self.inner.heartbeats.load(Ordering::Relaxed)
    }

    /// Whether the link has stopped reading because the local consumer's queue is
    /// full (backup only). Silence then says nothing about the peer: its frames wait
    /// in this node's socket buffer.
    pub fn reading_paused(&self) -> bool {
        self.inner.paused.load(Ordering::Relaxed)
    }

    fn set_paused(&self, paused: bool) {
        self.inner.paused.store(paused, Ordering::Relaxed);
    }

    /// When this node sent the latest of its heartbeats the peer has answered (primary only): the peer
    /// heard this node no earlier than that, whenever its answer is read.
    pub fn last_echoed(&self) -> Option<Instant> {
        let us = self.inner.echo_us.load(Ordering::Relaxed);
        (us != NONE_US).then(|| self.at(us))
    }

    /// Latest heartbeat round-trip time (measured on the primary only).
    pub fn rtt(&self) -> Option<Duration> {
        let us = self.inner.rtt_us.load(Ordering::Relaxed);
        (us != NONE_US).then(|| Duration::from_micros(us))
    }
}

/// Microseconds on the link's own monotonic clock, never 0 (0 means "no echo").
fn clock_us(base: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(base).as_micros() as u64 + 1
}

// ---------------------------------------------------------------------------------
// Handshake drivers
// ---------------------------------------------------------------------------------

/// Sets the socket options the link wants on a TCP stream (`TCP_NODELAY`).
pub fn prepare_tcp(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)
}

/// A joining node that the primary accepted, before its stream starts.
#[derive(Debug)]
pub struct Accepted<S> {
    stream: S,
    peer: PeerInfo,
    local: LocalIdentity,
    cfg: LinkConfig,
    keys: Option<SessionKeys>,
}

/// Primary side: reads the joining node's `Hello` or `AuthHello`, decides with [`check_auth`] and
/// [`check_hello`], and answers; with a key, proves it and checks the joining node's proof. On refusal the
/// peer is told why, the reason is logged, and the connection is closed.
pub async fn accept<S>(mut stream: S, local: &LocalIdentity, cfg: &LinkConfig) -> Result<Accepted<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    cfg.validate()?;
    let speaking = cfg.speaking(local);
    let exchange = async {
        let (hello, nonce_b) = match read_frame::<_, Handshake>(&mut stream, HANDSHAKE_MAX_FRAME).await? {
            Handshake::Hello(hello) => (hello, None),
            Handshake::AuthHello { hello, nonce } => (hello, Some(nonce)),
            _ => return Err(HandshakeError::Unexpected { expected: "Hello" }),
        };
        let decided = check_auth(nonce_b.is_some(), cfg.auth.is_secure(), &hello.node)
            .and_then(|()| check_hello(&hello, &speaking));
        let version = match decided {
            Ok(version) => version,
            Err(refusal) => {
                warn!(role = "primary", epoch = local.epoch, peer = %hello.node, reason = %refusal,
                    "refusing replication peer");
                let welcome = Welcome::Refused { reason: refusal.to_string() };
                write_frame(&mut stream, &Handshake::Welcome(welcome)).await?;
                // FIN after the reason, so the peer reads it before the end of stream.
                let _ = stream.shutdown().await;
                return Err(HandshakeError::Refused(refusal));
            }
        };
        let welcome = Welcome::Accepted { version, node: local.node.clone(), epoch: local.epoch };
        let peer = PeerInfo { node: hello.node.clone(), role: hello.role, epoch: hello.epoch, version };
        let (LinkAuth::Psk(psk), Some(nonce_b)) = (&cfg.auth, nonce_b) else {
            write_frame(&mut stream, &Handshake::Welcome(welcome)).await?;
            return Ok((peer, None));
        };
        let nonce_b: auth::Nonce =
            nonce_b.try_into().map_err(|_| HandshakeError::Unexpected { expected: "a 32-byte nonce" })?;
        let nonce_p = auth::nonce().map_err(HandshakeError::Nonce)?;
        let keys = SessionKeys::derive(psk, auth::transcript(&hello, &nonce_b, &welcome, &nonce_p));
        let proof = keys.proof(Role::Primary).to_vec();
        write_frame(&mut stream, &Handshake::AuthWelcome { welcome, nonce: nonce_p.to_vec(), proof }).await?;
        match read_frame::<_, Handshake>(&mut stream, HANDSHAKE_MAX_FRAME).await? {
            Handshake::Proof { proof } => match keys.verify_proof(Role::Backup, &proof) {
                Ok(()) => Ok((peer, Some(keys))),
                Err(_) => Err(HandshakeError::WrongKey { peer: format!("joining node {:?}", hello.node) }),
            },
            Handshake::Abort { reason } => Err(HandshakeError::PeerAborted { peer: hello.node, reason }),
            _ => Err(HandshakeError::Unexpected { expected: "Proof" }),
        }
    };
    let (peer, keys) = match tokio::time::timeout(cfg.handshake_timeout, exchange).await {
        Ok(result) => result?,
        Err(_) => return Err(HandshakeError::Timeout(cfg.handshake_timeout)),
    };
    info!(role = "primary", epoch = local.epoch, peer = %peer.node, peer_epoch = peer.epoch, version = peer.version,
        authenticated = keys.is_some(), "replication peer accepted");
    Ok(Accepted { stream, peer, local: local.clone(), cfg: cfg.clone(), keys })
}

impl<S> Accepted<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    /// The accepted peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Starts streaming: the first message sent gets `first_seq`.
    pub fn start(self, first_seq: NonZeroU64) -> PrimaryLink {
        PrimaryLink::spawn(self.stream, self.peer, self.local, self.cfg, first_seq, self.keys)
    }
}

/// Backup side: sends this node's `Hello` (`AuthHello` with a key), reads the primary's `Welcome` and
/// checks it with [`check_welcome`] (with a key: the primary's proof, then sends its own), then starts
/// receiving. A refusal is logged with the primary's reason and returned as [`WelcomeError::Refused`].
pub async fn join<S>(mut stream: S, local: &LocalIdentity, cfg: &LinkConfig) -> Result<BackupLink, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    cfg.validate()?;
    let speaking = cfg.speaking(local);
    let exchange = async {
        let LinkAuth::Psk(psk) = &cfg.auth else {
            write_frame(&mut stream, &Handshake::Hello(speaking.hello())).await?;
            let welcome = match read_frame::<_, Handshake>(&mut stream, HANDSHAKE_MAX_FRAME).await? {
                Handshake::Welcome(welcome) => welcome,
                _ => return Err(HandshakeError::Unexpected { expected: "Welcome" }),
            };
            return Ok((check_welcome(&welcome, &speaking)?, None));
        };
        let hello = speaking.hello();
        let nonce_b = auth::nonce().map_err(HandshakeError::Nonce)?;
        write_frame(&mut stream, &Handshake::AuthHello { hello: hello.clone(), nonce: nonce_b.to_vec() }).await?;
        let answer = match read_frame::<_, Handshake>(&mut stream, HANDSHAKE_MAX_FRAME).await {
            Err(HandshakeError::Closed) => return Err(HandshakeError::ClosedOnAuthHello),
            other => other?,
        };
        let (welcome, nonce_p, proof) = match answer {
            Handshake::AuthWelcome { welcome, nonce, proof } => (welcome, nonce, proof),
            Handshake::Welcome(welcome) => {
                // A refusal is taken as the reason; an acceptance without a proof is refused here.
                let peer = check_welcome(&welcome, &speaking)?;
                return Err(WelcomeError::NotAuthenticated { node: peer.node }.into());
            }
            _ => return Err(HandshakeError::Unexpected { expected: "Welcome" }),
        };
        let peer = check_welcome(&welcome, &speaking)?;
        let nonce_p: auth::Nonce =
            nonce_p.try_into().map_err(|_| HandshakeError::Unexpected { expected: "a 32-byte nonce" })?;
        let keys = SessionKeys::derive(psk, auth::transcript(&hello, &nonce_b, &welcome, &nonce_p));
        if keys.verify_proof(Role::Primary, &proof).is_err() {
            let reason = format!(
                "wrong key: the primary's proof does not match the pre-shared key of joining node {:?}",
                local.node
            );
            let _ = write_frame(&mut stream, &Handshake::Abort { reason }).await;
            let _ = stream.shutdown().await;
            return Err(HandshakeError::WrongKey { peer: format!("the primary {:?}", peer.node) });
        }
        write_frame(&mut stream, &Handshake::Proof { proof: keys.proof(Role::Backup).to_vec() }).await?;
        Ok((peer, Some(keys)))
    };
    let (peer, keys) = match tokio::time::timeout(cfg.handshake_timeout, exchange).await {
        Ok(Ok(joined)) => joined,
        Ok(Err(e)) => {
            warn!(role = "backup", epoch = local.epoch, error = %e, "joining the primary failed");
            return Err(e);
        }
        Err(_) => return Err(HandshakeError::Timeout(cfg.handshake_timeout)),
    };
    info!(role = "backup", epoch = local.epoch, peer = %peer.node, peer_epoch = peer.epoch, version = peer.version,
        authenticated = keys.is_some(), "joined the primary");
    Ok(BackupLink::spawn(stream, peer, local.clone(), cfg.clone(), keys))
}

async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, value: &T) -> Result<(), HandshakeError> {
    let mut buf = BytesMut::new();
    frame::encode_value(value, HANDSHAKE_MAX_FRAME, &mut buf)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads exactly one frame, never past it: the bytes after it belong to the link.
async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R, max: usize) -> Result<T, HandshakeError> {
    let mut buf = vec![0; HEADER_LEN];
    let mut have = 0;
    loop {
        let need = match frame::parse(&buf[..have], max)? {
            Parsed::Frame { payload, .. } => return Ok(codec::decode(payload).map_err(DecodeError::Payload)?),
            Parsed::Incomplete { need } => need,
        };
        // `parse` checked the length against `max` before this resize.
        buf.resize(need, 0);
        while have < need {
            match r.read(&mut buf[have..need]).await? {
                0 if have == 0 => return Err(HandshakeError::Closed),
                0 => return Err(DecodeError::Truncated { have, need }.into()),
                n => have += n,
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Primary side
// ---------------------------------------------------------------------------------

/// Upper bound on the encoded size of a record carrying `msg`: payload lengths plus
/// a generous 9 bytes (the longest varint) per integer and per length prefix.
fn encoded_len_bound(msg: &Message) -> usize {
    const INT: usize = 9;
    const CONN: usize = 4 * INT; // two (4-byte address, varint port) pairs
    const ENVELOPE: usize = 4 * INT; // ToBackup tag, seq, epoch, Message tag
    let string = |s: &str| INT + s.len();
    ENVELOPE
        + match msg {
            Message::Segment { datagram, .. } => 3 * INT + datagram.len(),
            Message::Reply { bytes, .. } => CONN + 2 * INT + bytes.len(),
            Message::ExchangeStart(x) => {
                CONN + 4 * INT
                    + string(&x.method)
                    + string(&x.target)
                    + x.idempotency_key.as_deref().map_or(0, string)
                    + x.upstream.as_deref().map_or(0, string)
            }
            Message::Upstream { bytes, .. } => CONN + 3 * INT + bytes.len(),
            Message::ExchangeEnd { .. } => CONN + 2 * INT,
            Message::ConnClosed { .. } => CONN,
            Message::SnapshotBegin { .. } => INT,
            Message::SnapshotConn { state, .. } => CONN + INT + state.len(),
            Message::SnapshotEnd | Message::Ping | Message::Handover => 0,
        }
}

/// Queues messages on the primary's link and numbers them. Clones share one
/// numbering; the order of the stream is the order of successful `send` calls.
#[derive(Debug, Clone)]
pub struct RecordSender {
    tx: mpsc::Sender<Record>,
    shared: Arc<SenderShared>,
}

#[derive(Debug)]
struct SenderShared {
    next: Mutex<u64>,
    epoch: u64,
    max_frame: usize,
}

impl RecordSender {
    fn check_size(&self, msg: &Message) -> Result<(), (usize, usize)> {
        let bound = encoded_len_bound(msg);
        if bound > self.shared.max_frame { Err((bound, self.shared.max_frame)) } else { Ok(()) }
    }

    /// Queues `msg`, waiting while the queue is full, and returns its sequence number.
    pub async fn send(&self, msg: Message) -> Result<u64, SendError> {
        self.check_size(&msg).map_err(|(bound, max)| SendError::TooLarge { bound, max })?;
        let permit = self.tx.reserve().await.map_err(|_| SendError::LinkDown)?;
        // Numbering and queueing under one lock keep the queue in sequence order.
        let mut next = lock(&self.shared.next);
        let seq = *next;
        *next += 1;
        permit.send(Record { seq, epoch: self.shared.epoch, msg });
        Ok(seq)
    }

    /// Queues `msg` if there is room now, and returns its sequence number.
    pub fn try_send(&self, msg: Message) -> Result<u64, TrySendError> {
        if let Err((bound, max)) = self.check_size(&msg) {
            return Err(TrySendError::TooLarge { bound, max });
        }
        let permit = match self.tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => return Err(TrySendError::Full(Box::new(msg))),
            Err(mpsc::error::TrySendError::Closed(())) => return Err(TrySendError::LinkDown),
        };
        let mut next = lock(&self.shared.next);
        let seq = *next;
        *next += 1;
        permit.send(Record { seq, epoch: self.shared.epoch, msg });
        Ok(seq)
    }

    /// The number the next queued message will get.
    pub fn next_seq(&self) -> u64 {
        *lock(&self.shared.next)
    }

    /// Whether the link behind this sender has ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Waits until the backup holds record `seq` (the ack watch reaches it). Fails once
/// the link is down, unless `seq` was acknowledged before.
pub async fn wait_acked(acked: &mut watch::Receiver<u64>, seq: u64) -> Result<(), LinkDown> {
    acked.wait_for(|&upto| upto >= seq).await.map(|_| ()).map_err(|_| LinkDown)
}

/// The primary's end of an established link. Dropping it closes the link as
/// [`PrimaryLink::close`] does, without waiting.
#[derive(Debug)]
pub struct PrimaryLink {
    peer: PeerInfo,
    sender: RecordSender,
    acked: watch::Receiver<u64>,
    taking_over: watch::Receiver<Option<(u64, SocketAddrV4)>>,
    liveness: PeerLiveness,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), LinkError>>>,
}

impl PrimaryLink {
    fn spawn<S>(
        stream: S,
        peer: PeerInfo,
        local: LocalIdentity,
        cfg: LinkConfig,
        first_seq: NonZeroU64,
        keys: Option<SessionKeys>,
    ) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let base = Instant::now();
        let (tx, rx) = mpsc::channel(cfg.queue);
        let (acked_tx, acked) = watch::channel(first_seq.get() - 1);
        let (taking_over_tx, taking_over) = watch::channel(None);
        let liveness = PeerLiveness::new(base);
        let cancel = CancellationToken::new();
        let sender = RecordSender {
            tx,
            shared: Arc::new(SenderShared {
                next: Mutex::new(first_seq.get()),
                epoch: local.epoch,
                max_frame: cfg.max_body(),
            }),
        };
        let sealer = keys.as_ref().map(|k| k.sealer(Role::Primary));
        let opener = keys.as_ref().map(|k| k.opener(Role::Primary));
        let driver = PrimaryDriver {
            cfg,
            epoch: local.epoch,
            base,
            book: Mutex::new(SendBook::new(first_seq)),
            acked: acked_tx,
            taking_over: taking_over_tx,
            liveness: liveness.clone(),
        };
        let (reader, writer) = tokio::io::split(stream);
        let token = cancel.clone();
        let peer_name = peer.node.clone();
        let task = tokio::spawn(async move {
            let result = tokio::select! {
                r = driver.read(reader, opener) => r,
                w = driver.write(writer, rx, token, sealer) => w,
            };
            log_end("primary", driver.epoch, &peer_name, &result);
            result
        });
        PrimaryLink { peer, sender, acked, taking_over, liveness, cancel, task: Some(task) }
    }

    /// The backup at the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// A handle that queues messages on this link.
    pub fn sender(&self) -> RecordSender {
        self.sender.clone()
    }

    /// Queues `msg` (see [`RecordSender::send`]).
    pub async fn send(&self, msg: Message) -> Result<u64, SendError> {
        self.sender.send(msg).await
    }

    /// The cumulative ack: the highest record the backup holds (start − 1 before
    /// any). Closed when the link ends.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.acked.clone()
    }

    /// The backup's answer to a [`Message::Handover`]: its record number and where to rejoin.
    pub fn taking_over(&self) -> watch::Receiver<Option<(u64, SocketAddrV4)>> {
        self.taking_over.clone()
    }

    /// Waits until the backup holds record `seq`.
    pub async fn wait_acked(&self, seq: u64) -> Result<(), LinkDown> {
        wait_acked(&mut self.acked.clone(), seq).await
    }

    /// What has been heard from the backup.
    pub fn liveness(&self) -> PeerLiveness {
        self.liveness.clone()
    }

    /// Whether the link has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the link to end on its own, and says why it did.
    pub async fn join(mut self) -> Result<(), LinkError> {
        join_task(self.task.take()).await
    }

    /// Sends what is queued, closes the connection and waits for the link to end.
    pub async fn close(mut self) -> Result<(), LinkError> {
        self.cancel.cancel();
        join_task(self.task.take()).await
    }
}

impl Drop for PrimaryLink {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct PrimaryDriver {
    cfg: LinkConfig,
    epoch: u64,
    base: Instant,
    book: Mutex<SendBook>,
    acked: watch::Sender<u64>,
    taking_over: watch::Sender<Option<(u64, SocketAddrV4)>>,
    liveness: PeerLiveness,
}

impl PrimaryDriver {
    async fn read<S: AsyncRead>(&self, mut reader: ReadHalf<S>, mut opener: Option<Opener>) -> Result<(), LinkError> {
        let mut buf = BytesMut::with_capacity(8 << 10);
        loop {
            while let Some(payload) = frame::decode(&mut buf, self.cfg.max_frame)? {
                let msg: ToPrimary = decode_message(&payload, &mut opener)?;
                match msg {
                    ToPrimary::Ack { upto } => {
                        if lock(&self.book).handle_ack(upto)? {
                            self.acked.send_replace(upto);
                        }
                    }
                    ToPrimary::Heartbeat { echo_us, .. } => {
                        let now = Instant::now();
                        self.liveness.heartbeat(now);
                        // An echo from the future (a confused peer) proves nothing and is ignored.
                        if echo_us != 0 && echo_us <= clock_us(self.base, now) {
                            let rtt = clock_us(self.base, now) - echo_us;
                            self.liveness.set_rtt(Duration::from_micros(rtt));
                            self.liveness.echoed(echo_us - 1);
                        }
                    }
                    ToPrimary::TakingOver { seq, repl_listen } => {
                        info!(role = "primary", epoch = self.epoch, seq, %repl_listen, "the backup is taking over");
                        self.taking_over.send_replace(Some((seq, repl_listen)));
                    }
                }
            }
            read_more(&mut reader, &mut buf, self.cfg.max_frame, &self.liveness).await?;
        }
    }

    async fn write<S: AsyncWrite>(
        &self,
        mut writer: WriteHalf<S>,
        mut rx: mpsc::Receiver<Record>,
        cancel: CancellationToken,
        mut sealer: Option<Sealer>,
    ) -> Result<(), LinkError> {
        const RECV_BATCH: usize = 512;
        let mut tick = heartbeat_timer(self.cfg.heartbeat_interval);
        let mut buf = BytesMut::with_capacity(self.cfg.write_batch.min(1 << 20) + (64 << 10));
        let mut batch = Vec::with_capacity(RECV_BATCH);
        loop {
            let mut closing = false;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => closing = true,
                _ = tick.tick() => {
                    let hb = ToBackup::Heartbeat { sent_us: clock_us(self.base, Instant::now()), epoch: self.epoch };
                    encode_message(&hb, self.cfg.max_frame, &mut sealer, &mut buf)?;
                }
                n = rx.recv_many(&mut batch, RECV_BATCH) => {
                    closing = n == 0;
                    self.encode_records(&mut batch, &mut sealer, &mut buf)?;
                }
            }
            // Gather more while more is queued and the batch is small; write once.
            if !closing && !buf.is_empty() && (rx.is_empty() || buf.len() >= self.cfg.write_batch) {
                // `write_all_buf` consumes `buf` as it goes, so a close in the middle
                // resumes exactly where the write stopped.
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => closing = true,
                    written = writer.write_all_buf(&mut buf) => {
                        written?;
                        if rx.is_empty() {
                            writer.flush().await?;
                        }
                    }
                }
            }
            if closing {
                // Send what was queued before the close, then FIN; a peer that stopped
                // reading cannot hold the task beyond `close_timeout`.
                let drain = async {
                    rx.close();
                    while let Some(rec) = rx.recv().await {
                        batch.push(rec);
                        self.encode_records(&mut batch, &mut sealer, &mut buf)?;
                        if buf.len() >= self.cfg.write_batch {
                            writer.write_all_buf(&mut buf).await?;
                        }
                    }
                    writer.write_all_buf(&mut buf).await?;
                    writer.shutdown().await?;
                    Ok(())
                };
                return within_close_timeout(self.cfg.close_timeout, drain).await;
            }
        }
    }

    fn encode_records(
        &self,
        batch: &mut Vec<Record>,
        sealer: &mut Option<Sealer>,
        buf: &mut BytesMut,
    ) -> Result<(), LinkError> {
        let mut book = lock(&self.book);
        for rec in batch.drain(..) {
            book.handle_sent(rec.seq)?;
            encode_message(&ToBackup::Record(rec), self.cfg.max_frame, sealer, buf)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Backup side
// ---------------------------------------------------------------------------------

/// The backup's end of an established link: records in order, and the means to
/// acknowledge them. Dropping it closes the link.
#[derive(Debug)]
pub struct BackupLink {
    peer: PeerInfo,
    records: mpsc::Receiver<Record>,
    applied: Arc<watch::Sender<u64>>,
    liveness: PeerLiveness,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), LinkError>>>,
    shared: Arc<Mutex<BackupShared>>,
    wake_writer: Arc<Notify>,
}

/// Reports applied records to the link from another task than the one receiving.
#[derive(Debug, Clone)]
pub struct Applier {
    applied: Arc<watch::Sender<u64>>,
}

impl Applier {
    /// Every record up to `seq` is applied (see [`BackupLink::applied`]).
    pub fn applied(&self, seq: u64) {
        report_applied(&self.applied, seq);
    }
}

fn report_applied(applied: &watch::Sender<u64>, seq: u64) {
    applied.send_if_modified(|v| {
        let news = seq > *v;
        *v = (*v).max(seq);
        news
    });
}

#[derive(Debug)]
struct BackupShared {
    batcher: AckBatcher,
    /// The latest primary heartbeat not answered yet.
    echo: Option<u64>,
    /// A handover to confirm ([`ToPrimary::TakingOver`]) at the next write.
    taking_over: Option<(u64, SocketAddrV4)>,
}

impl BackupLink {
    fn spawn<S>(stream: S, peer: PeerInfo, local: LocalIdentity, cfg: LinkConfig, keys: Option<SessionKeys>) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let base = Instant::now();
        let (records_tx, records) = mpsc::channel(cfg.queue);
        let (applied_tx, applied_rx) = watch::channel(0);
        let liveness = PeerLiveness::new(base);
        let cancel = CancellationToken::new();
        let shared = Arc::new(Mutex::new(BackupShared {
            batcher: AckBatcher::new(cfg.ack_every, cfg.ack_delay, cfg.ack_lazy),
            echo: None,
            taking_over: None,
        }));
        let wake_writer = Arc::new(Notify::new());
        let sealer = keys.as_ref().map(|k| k.sealer(Role::Backup));
        let opener = keys.as_ref().map(|k| k.opener(Role::Backup));
        let driver = BackupDriver {
            shared: shared.clone(),
            wake_writer: wake_writer.clone(),
            book: Mutex::new(ReceiveBook::new(peer.epoch)),
            liveness: liveness.clone(),
            base,
            cfg,
        };
        let (reader, writer) = tokio::io::split(stream);
        let token = cancel.clone();
        let peer_name = peer.node.clone();
        let epoch = local.epoch;
        let task = tokio::spawn(async move {
            let result = tokio::select! {
                r = driver.read(reader, records_tx, opener) => r,
                w = driver.write(writer, applied_rx, token, sealer) => w,
            };
            log_end("backup", epoch, &peer_name, &result);
            result
        });
        BackupLink {
            peer,
            records,
            applied: Arc::new(applied_tx),
            liveness,
            cancel,
            task: Some(task),
            shared,
            wake_writer,
        }
    }

    /// The primary at the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The next record, in stream order; `None` once the link has ended and every
    /// record received before has been returned.
    pub async fn recv(&mut self) -> Option<Record> {
        self.records.recv().await
    }

    /// The records that have arrived, in stream order, up to `limit` of them appended to
    /// `records` (waiting for the first); 0 once the link has ended and every record
    /// received before has been returned.
    pub async fn recv_many(&mut self, records: &mut Vec<Record>, limit: usize) -> usize {
        self.records.recv_many(records, limit).await
    }

    /// Reports every record up to `seq` applied: the link acknowledges it to the
    /// primary (batched). Reporting a record not yet returned by `recv` ends the link.
    pub fn applied(&self, seq: u64) {
        report_applied(&self.applied, seq);
    }

    /// Confirms the primary's [`Message::Handover`] (record `seq`, applied with everything before it):
    /// sends [`ToPrimary::TakingOver`] so the old primary rejoins at `repl_listen`.
    pub fn confirm_handover(&self, seq: u64, repl_listen: SocketAddrV4) {
        lock(&self.shared).taking_over = Some((seq, repl_listen));
        self.wake_writer.notify_one();
    }

    /// A handle for reporting applied records from elsewhere.
    pub fn applier(&self) -> Applier {
        Applier { applied: self.applied.clone() }
    }

    /// What has been heard from the primary.
    pub fn liveness(&self) -> PeerLiveness {
        self.liveness.clone()
    }

    /// Whether the link has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the link to end on its own, and says why it did. Meant for after
    /// `recv` returned `None`; records still arriving meanwhile are discarded (and
    /// never acknowledged) so that the link cannot stall on a full queue.
    pub async fn join(mut self) -> Result<(), LinkError> {
        let Some(mut task) = self.task.take() else { return Ok(()) };
        loop {
            tokio::select! {
                result = &mut task => return result.unwrap_or_else(|e| Err(LinkError::Task(e.to_string()))),
                rec = self.records.recv() => if rec.is_none() {
                    return join_task(Some(task)).await;
                },
            }
        }
    }

    /// Acknowledges what is applied, closes the connection and waits for the link to end.
    pub async fn close(mut self) -> Result<(), LinkError> {
        self.cancel.cancel();
        join_task(self.task.take()).await
    }
}

impl Drop for BackupLink {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct BackupDriver {
    shared: Arc<Mutex<BackupShared>>,
    wake_writer: Arc<Notify>,
    book: Mutex<ReceiveBook>,
    liveness: PeerLiveness,
    base: Instant,
    cfg: LinkConfig,
}

impl BackupDriver {
    async fn read<S: AsyncRead>(
        &self,
        mut reader: ReadHalf<S>,
        records: mpsc::Sender<Record>,
        mut opener: Option<Opener>,
    ) -> Result<(), LinkError> {
        let mut buf = BytesMut::with_capacity(64 << 10);
        loop {
            while let Some(payload) = frame::decode(&mut buf, self.cfg.max_frame)? {
                let msg: ToBackup = decode_message(&payload, &mut opener)?;
                match msg {
                    ToBackup::Record(rec) => {
                        lock(&self.book).handle_record(rec.seq, rec.epoch)?;
                        lock(&self.shared).batcher.handle_delivered(rec.seq, rec.msg.holds_output());
                        let sent = match records.try_send(rec) {
                            Ok(()) => Ok(()),
                            Err(mpsc::error::TrySendError::Full(rec)) => {
                                self.liveness.set_paused(true);
                                let sent = records.send(rec).await.map_err(|_| ());
                                self.liveness.set_paused(false);
                                sent
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
                        };
                        if sent.is_err() {
                            // The `BackupLink` is gone and has cancelled the link; the
                            // writer acknowledges what was applied and closes.
                            std::future::pending::<()>().await;
                        }
                    }
                    ToBackup::Heartbeat { sent_us, epoch } => {
                        lock(&self.book).handle_epoch(epoch)?;
                        self.liveness.heartbeat(Instant::now());
                        lock(&self.shared).echo = Some(sent_us);
                        self.wake_writer.notify_one();
                    }
                }
            }
            lock(&self.shared).batcher.handle_input(false);
            self.wake_writer.notify_one();
            read_more(&mut reader, &mut buf, self.cfg.max_frame, &self.liveness).await?;
            lock(&self.shared).batcher.handle_input(true);
        }
    }

    async fn write<S: AsyncWrite>(
        &self,
        mut writer: WriteHalf<S>,
        mut applied: watch::Receiver<u64>,
        cancel: CancellationToken,
        mut sealer: Option<Sealer>,
    ) -> Result<(), LinkError> {
        let mut tick = heartbeat_timer(self.cfg.heartbeat_interval);
        let mut buf = BytesMut::with_capacity(256);
        loop {
            let deadline = lock(&self.shared).batcher.poll_timeout();
            let mut heartbeat_due = false;
            let mut closing = false;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => closing = true,
                changed = applied.changed() => match changed {
                    Ok(()) => {
                        let seq = *applied.borrow_and_update();
                        lock(&self.shared).batcher.handle_applied(Instant::now(), seq)?;
                    }
                    Err(_) => closing = true,
                },
                _ = self.wake_writer.notified() => {}
                _ = tick.tick() => heartbeat_due = true,
                _ = sleep_until(deadline), if deadline.is_some() => {}
            }
            let now = Instant::now();
            {
                let mut shared = lock(&self.shared);
                // Closing, everything applied is acknowledged below, just before the FIN. A
                // heartbeat or a confirmation goes out anyway: the ack rides in the same write.
                let echo = shared.echo.take();
                let writing = echo.is_some() || heartbeat_due || shared.taking_over.is_some();
                let ack = match (closing, writing) {
                    (true, _) => None,
                    (false, true) => shared.batcher.flush(),
                    (false, false) => shared.batcher.poll_ack(now),
                };
                if let Some(upto) = ack {
                    encode_message(&ToPrimary::Ack { upto }, self.cfg.max_frame, &mut sealer, &mut buf)?;
                }
                if let Some((seq, repl_listen)) = shared.taking_over.take() {
                    let taking_over = ToPrimary::TakingOver { seq, repl_listen };
                    encode_message(&taking_over, self.cfg.max_frame, &mut sealer, &mut buf)?;
                }
                if echo.is_some() || heartbeat_due {
                    let hb = ToPrimary::Heartbeat { sent_us: clock_us(self.base, now), echo_us: echo.unwrap_or(0) };
                    encode_message(&hb, self.cfg.max_frame, &mut sealer, &mut buf)?;
                    if echo.is_some() {
                        // An answer is a heartbeat: the next own one is due an interval later.
                        tick.reset();
                    }
                }
            }
            if !closing && !buf.is_empty() {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => closing = true,
                    written = writer.write_all_buf(&mut buf) => {
                        written?;
                        writer.flush().await?;
                    }
                }
            }
            if closing {
                let last = async {
                    let upto = *applied.borrow();
                    let ack = {
                        let mut shared = lock(&self.shared);
                        shared.batcher.handle_applied(Instant::now(), upto)?;
                        shared.batcher.flush()
                    };
                    if let Some(upto) = ack {
                        encode_message(&ToPrimary::Ack { upto }, self.cfg.max_frame, &mut sealer, &mut buf)?;
                    }
                    writer.write_all_buf(&mut buf).await?;
                    writer.shutdown().await?;
                    Ok(())
                };
                return within_close_timeout(self.cfg.close_timeout, last).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Shared driver helpers
// ---------------------------------------------------------------------------------

/// Appends the frame of `msg`, tagged when the link authenticates.
fn encode_message<T: Serialize>(
    msg: &T,
    max_frame: usize,
    sealer: &mut Option<Sealer>,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    match sealer {
        None => frame::encode_value(msg, max_frame, buf),
        Some(sealer) => frame::encode_value_sealed(msg, max_frame, buf, |body| sealer.seal(body)),
    }
}

/// The message in a frame's `payload`, whose tag is checked first when the link authenticates.
fn decode_message<T: DeserializeOwned>(payload: &[u8], opener: &mut Option<Opener>) -> Result<T, LinkError> {
    let body = match opener {
        None => payload,
        Some(opener) => opener.open(payload)?,
    };
    Ok(codec::decode(body).map_err(DecodeError::Payload)?)
}

/// Reads more bytes into `buf`. End of stream between frames is `PeerClosed`; inside
/// a frame it is a truncated frame.
async fn read_more<S: AsyncRead>(
    reader: &mut ReadHalf<S>,
    buf: &mut BytesMut,
    max_frame: usize,
    liveness: &PeerLiveness,
) -> Result<(), LinkError> {
    // Room for a good read; `frame::decode` has already reserved the rest of a large frame.
    if buf.capacity() - buf.len() < 16 << 10 {
        buf.reserve(64 << 10);
    }
    if reader.read_buf(buf).await? == 0 {
        frame::check_eof(buf, max_frame)?;
        return Err(LinkError::PeerClosed);
    }
    liveness.heard(Instant::now());
    Ok(())
}

fn heartbeat_timer(interval: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(at) = deadline {
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
    }
}

async fn within_close_timeout(
    limit: Duration,
    close: impl Future<Output = Result<(), LinkError>>,
) -> Result<(), LinkError> {
    tokio::time::timeout(limit, close).await.unwrap_or(Err(LinkError::CloseTimedOut(limit)))
}

async fn join_task(task: Option<JoinHandle<Result<(), LinkError>>>) -> Result<(), LinkError> {
    match task {
        Some(task) => task.await.unwrap_or_else(|e| Err(LinkError::Task(e.to_string()))),
        None => Ok(()),
    }
}

fn log_end(role: &'static str, epoch: u64, peer: &str, result: &Result<(), LinkError>) {
    match result {
        Ok(()) => info!(role, epoch, peer, "replication link closed"),
        Err(e) => warn!(role, epoch, peer, error = %e, "replication link ended"),
    }
}

/// Locks a driver mutex. Nothing panics while holding one, so a poisoned lock still
/// holds consistent state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ConnKey, ExchangeStart};
    use tcp_replay::Dir;

    fn primary() -> LocalIdentity {
        LocalIdentity::new("prod", "node-a", Role::Primary, 5)
    }

    fn hello() -> Hello {
        LocalIdentity::new("prod", "node-b", Role::Backup, 5).hello()
    }

    #[test]
    fn hello_from_a_matching_backup_is_accepted_at_the_common_version() {
        assert_eq!(check_hello(&hello(), &primary()), Ok(PROTOCOL_VERSION));
        let mut newer = hello();
        newer.version = PROTOCOL_VERSION + 3;
        assert_eq!(check_hello(&newer, &primary()), Ok(PROTOCOL_VERSION));
        let mut lower_epoch = hello();
        lower_epoch.epoch = 0;
        assert_eq!(check_hello(&lower_epoch, &primary()), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn version_ranges_agree_on_the_lower_maximum() {
        let mut local = primary();
        (local.min_version, local.version) = (2, 5);
        let mut h = hello();
        (h.min_version, h.version) = (1, 3);
        assert_eq!(check_hello(&h, &local), Ok(3));
        (h.min_version, h.version) = (4, 9);
        assert_eq!(check_hello(&h, &local), Ok(5));
        (h.min_version, h.version) = (6, 9);
        assert!(matches!(check_hello(&h, &local), Err(Refusal::IncompatibleVersion { their_min: 6, .. })));
        (h.min_version, h.version) = (1, 1);
        assert!(matches!(check_hello(&h, &local), Err(Refusal::IncompatibleVersion { their_max: 1, .. })));
        (h.min_version, h.version) = (4, 3);
        assert!(matches!(check_hello(&h, &local), Err(Refusal::InvalidVersionRange { min: 4, max: 3, .. })));
    }

    #[test]
    fn hello_is_refused_for_each_rule_with_an_actionable_reason() {
        let mut h = hello();
        h.cluster = "staging".into();
        let r = check_hello(&h, &primary()).unwrap_err();
        assert!(matches!(r, Refusal::WrongCluster { .. }));
        assert!(r.to_string().contains("\"prod\"") && r.to_string().contains("\"staging\""), "{r}");

        let mut h = hello();
        h.node = "node-a".into();
        assert!(matches!(check_hello(&h, &primary()), Err(Refusal::SameNode { .. })));

        let mut local = primary();
        local.role = Role::Backup;
        assert_eq!(check_hello(&hello(), &local), Err(Refusal::NotPrimary { ours: Role::Backup }));

        let mut h = hello();
        h.role = Role::Primary;
        let r = check_hello(&h, &primary()).unwrap_err();
        assert_eq!(r, Refusal::TwoPrimaries { node: "node-b".into(), our_epoch: 5, their_epoch: 5 });
        assert!(r.to_string().contains("two primaries"));

        let mut h = hello();
        h.epoch = 6;
        let r = check_hello(&h, &primary()).unwrap_err();
        assert_eq!(r, Refusal::PeerEpochAhead { node: "node-b".into(), our_epoch: 5, their_epoch: 6 });
        assert!(r.to_string().contains("step down"));
    }

    #[test]
    fn welcome_checks_version_and_epoch() {
        let local = LocalIdentity::new("prod", "node-b", Role::Backup, 5);
        let ok = Welcome::Accepted { version: PROTOCOL_VERSION, node: "node-a".into(), epoch: 7 };
        assert_eq!(
            check_welcome(&ok, &local),
            Ok(PeerInfo { node: "node-a".into(), role: Role::Primary, epoch: 7, version: PROTOCOL_VERSION })
        );
        let stale = Welcome::Accepted { version: PROTOCOL_VERSION, node: "node-a".into(), epoch: 4 };
        assert!(matches!(check_welcome(&stale, &local), Err(WelcomeError::StaleEpoch { ours: 5, theirs: 4, .. })));
        let odd = Welcome::Accepted { version: PROTOCOL_VERSION + 1, node: "node-a".into(), epoch: 5 };
        assert!(matches!(check_welcome(&odd, &local), Err(WelcomeError::VersionOutOfRange { .. })));
        let refused = Welcome::Refused { reason: "no".into() };
        assert_eq!(check_welcome(&refused, &local), Err(WelcomeError::Refused { reason: "no".into() }));
    }

    #[test]
    fn send_book_numbers_from_the_start_and_checks_acks() {
        let mut book = SendBook::new(NonZeroU64::new(100).unwrap());
        assert_eq!((book.sent(), book.acked()), (99, 99));
        assert_eq!(book.handle_sent(101), Err(StreamError::Gap { expected: 100, got: 101 }));
        for seq in 100..110 {
            book.handle_sent(seq).unwrap();
        }
        assert_eq!(book.in_flight(), 10);
        assert_eq!(book.handle_ack(99), Ok(false));
        assert_eq!(book.handle_ack(104), Ok(true));
        assert_eq!(book.handle_ack(104), Ok(false));
        assert_eq!(book.handle_ack(103), Err(StreamError::AckRegressed { upto: 103, acked: 104 }));
        assert_eq!(book.handle_ack(110), Err(StreamError::AckBeyondSent { upto: 110, sent: 109 }));
        assert_eq!(book.handle_ack(109), Ok(true));
        assert_eq!(book.in_flight(), 0);
    }

    #[test]
    fn receive_book_takes_the_first_seq_then_requires_consecutive_records() {
        let mut book = ReceiveBook::new(3);
        assert_eq!(book.handle_record(0, 3), Err(StreamError::ZeroSeq));
        book.handle_record(41, 3).unwrap();
        book.handle_record(42, 3).unwrap();
        assert_eq!(book.handle_record(44, 3), Err(StreamError::Gap { expected: 43, got: 44 }));
        assert_eq!(book.handle_record(42, 3), Err(StreamError::Gap { expected: 43, got: 42 }));
        assert_eq!(book.last(), Some(42));
    }

    #[test]
    fn receive_book_rejects_epoch_regressions_and_follows_increases() {
        let mut book = ReceiveBook::new(3);
        assert_eq!(book.handle_record(1, 2), Err(StreamError::EpochRegressed { current: 3, got: 2 }));
        book.handle_record(1, 4).unwrap();
        assert_eq!(book.handle_epoch(3), Err(StreamError::EpochRegressed { current: 4, got: 3 }));
        book.handle_epoch(4).unwrap();
        assert_eq!(book.epoch(), 4);
    }

    #[test]
    fn ack_batcher_acks_at_once_when_idle() {
        let t0 = Instant::now();
        let mut b = AckBatcher::new(64, Duration::from_millis(1), Duration::ZERO);
        b.handle_delivered(1, true);
        assert_eq!(b.poll_ack(t0), None, "nothing applied yet");
        b.handle_applied(t0, 1).unwrap();
        assert_eq!(b.poll_ack(t0), Some(1));
        assert_eq!(b.poll_ack(t0), None);
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn ack_batcher_waits_while_busy_then_acks_after_the_delay() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut b = AckBatcher::new(64, ms, Duration::ZERO);
        b.handle_input(true);
        for seq in 1..=10 {
            b.handle_delivered(seq, true);
        }
        b.handle_applied(t0, 5).unwrap();
        assert_eq!(b.poll_ack(t0), None, "more delivered than applied");
        assert_eq!(b.poll_timeout(), Some(t0 + ms));
        b.handle_applied(t0 + ms / 2, 10).unwrap();
        assert_eq!(b.poll_ack(t0 + ms / 2), None, "input still waiting");
        assert_eq!(b.poll_timeout(), Some(t0 + ms), "the first unacked record sets the deadline");
        assert_eq!(b.poll_ack(t0 + ms), Some(10));
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn ack_batcher_acks_every_n_records() {
        let t0 = Instant::now();
        let mut b = AckBatcher::new(4, Duration::from_secs(1), Duration::ZERO);
        b.handle_input(true);
        let mut acks = Vec::new();
        for seq in 1..=10 {
            b.handle_delivered(seq + 1, true);
            b.handle_applied(t0, seq).unwrap();
            acks.extend(b.poll_ack(t0));
        }
        assert_eq!(acks, [4, 8]);
        b.handle_input(false);
        b.handle_applied(t0, 11).unwrap();
        assert_eq!(b.poll_ack(t0), Some(11), "idle again");
    }

    #[test]
    fn ack_batcher_with_zero_delay_acks_only_when_idle_or_every_n() {
        let t0 = Instant::now();
        let mut b = AckBatcher::new(4, Duration::ZERO, Duration::ZERO);
        b.handle_input(true);
        b.handle_delivered(10, true);
        b.handle_applied(t0, 2).unwrap();
        assert_eq!(b.poll_timeout(), None, "no timer");
        assert_eq!(b.poll_ack(t0 + Duration::from_secs(1)), None);
        b.handle_input(false);
        assert_eq!(b.poll_ack(t0), None, "applied is behind delivered");
        b.handle_applied(t0, 10).unwrap();
        assert_eq!(b.poll_ack(t0), Some(10));
    }

    #[test]
    fn ack_batcher_flush_acks_everything_applied() {
        let t0 = Instant::now();
        let mut b = AckBatcher::new(64, Duration::from_secs(1), Duration::ZERO);
        b.handle_input(true);
        b.handle_delivered(10, true);
        b.handle_applied(t0, 7).unwrap();
        assert_eq!(b.poll_ack(t0), None);
        assert_eq!(b.flush(), Some(7));
        assert_eq!(b.flush(), None);
    }

    #[test]
    fn ack_batcher_refuses_applying_what_was_not_delivered() {
        let mut b = AckBatcher::new(4, Duration::from_millis(1), Duration::ZERO);
        b.handle_delivered(3, true);
        assert_eq!(
            b.handle_applied(Instant::now(), 4),
            Err(StreamError::AppliedBeyondReceived { applied: 4, received: 3 })
        );
        b.handle_applied(Instant::now(), 3).unwrap();
        b.handle_applied(Instant::now(), 2).unwrap();
        assert_eq!(b.poll_ack(Instant::now()), Some(3), "an older report changes nothing");
    }

    #[test]
    fn ack_batcher_acks_a_held_record_at_once_and_lets_the_others_ride() {
        let t0 = Instant::now();
        let lazy = Duration::from_millis(5);
        let mut b = AckBatcher::new(64, Duration::ZERO, lazy);
        // Logged upstream bytes and an exchange end: nothing waits on them.
        b.handle_delivered(1, false);
        b.handle_delivered(2, false);
        b.handle_applied(t0, 2).unwrap();
        assert_eq!(b.poll_ack(t0), None, "idle, but nothing held: no write of its own");
        assert_eq!(b.poll_timeout(), Some(t0 + lazy));
        // A client segment arrives: the ack covers it and everything before it.
        b.handle_input(true);
        b.handle_delivered(3, true);
        b.handle_applied(t0, 3).unwrap();
        assert_eq!(b.poll_ack(t0), None, "input still waiting");
        b.handle_input(false);
        assert_eq!(b.poll_ack(t0), Some(3));
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn ack_batcher_acks_unheld_records_after_the_lazy_delay_or_with_another_write() {
        let t0 = Instant::now();
        let lazy = Duration::from_millis(5);
        let mut b = AckBatcher::new(64, Duration::ZERO, lazy);
        b.handle_delivered(1, false);
        b.handle_applied(t0, 1).unwrap();
        assert_eq!(b.poll_ack(t0 + lazy / 2), None);
        assert_eq!(b.poll_ack(t0 + lazy), Some(1), "never held longer than the lazy delay");
        b.handle_delivered(2, false);
        b.handle_applied(t0 + lazy, 2).unwrap();
        assert_eq!(b.flush(), Some(2), "a heartbeat going out carries it");
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn ack_batcher_never_delays_a_held_record_behind_unheld_ones() {
        let t0 = Instant::now();
        let mut b = AckBatcher::new(64, Duration::ZERO, Duration::from_secs(1));
        b.handle_delivered(1, true);
        b.handle_delivered(2, false);
        b.handle_applied(t0, 1).unwrap();
        assert_eq!(b.poll_ack(t0), None, "record 2 is delivered, not applied yet");
        b.handle_applied(t0, 2).unwrap();
        assert_eq!(b.poll_ack(t0), Some(2), "held record 1 goes out with 2 as soon as both are applied");
        // The ack-every bound holds for unheld records too.
        let mut b = AckBatcher::new(4, Duration::ZERO, Duration::from_secs(1));
        for seq in 1..=4 {
            b.handle_delivered(seq, false);
        }
        b.handle_applied(t0, 3).unwrap();
        assert_eq!(b.poll_ack(t0), None);
        b.handle_applied(t0, 4).unwrap();
        assert_eq!(b.poll_ack(t0), Some(4));
    }

    #[test]
    fn ack_batcher_with_zero_lazy_delay_treats_every_record_as_held() {
        let t0 = Instant::now();
        let mut b = AckBatcher::new(64, Duration::ZERO, Duration::ZERO);
        b.handle_delivered(1, false);
        b.handle_applied(t0, 1).unwrap();
        assert_eq!(b.poll_ack(t0), Some(1));
    }

    #[test]
    fn holds_output_marks_what_the_primary_waits_on() {
        let addr = "10.0.0.1:1".parse().unwrap();
        let conn = ConnKey { client: addr, server: addr };
        let held = [
            Message::Segment { at_us: 0, dir: Dir::ToServer, datagram: vec![] },
            Message::Reply { conn, offset: 0, bytes: vec![] },
            Message::SnapshotEnd,
            Message::Ping,
            Message::Handover,
        ];
        assert!(held.iter().all(Message::holds_output));
        let riding = [
            Message::Upstream { conn, exchange: 0, offset: 0, bytes: vec![] },
            Message::ExchangeEnd { conn, exchange: 0, status: 200 },
            Message::ConnClosed { conn },
            Message::SnapshotBegin { connections: 1 },
            Message::SnapshotConn { conn, state: vec![], more: false },
        ];
        assert!(!riding.iter().any(Message::holds_output));
    }

    #[test]
    fn size_bound_covers_every_message_kind() {
        let conn =
            ConnKey { client: "255.255.255.255:65535".parse().unwrap(), server: "10.0.0.100:80".parse().unwrap() };
        let big = u64::MAX;
        let msgs = [
            Message::Segment { at_us: big, dir: Dir::ToClient, datagram: vec![1; 1500] },
            Message::Reply { conn, offset: big, bytes: vec![2; 300] },
            Message::ExchangeStart(ExchangeStart {
                conn,
                exchange: big,
                request_offset: big,
                method: "POST".into(),
                target: "/a/b?c".repeat(50),
                idempotency_key: Some("k".repeat(40)),
                key_generated: true,
                upstream: Some("http://10.2.0.10:8080".into()),
            }),
            Message::Upstream { conn, exchange: big, offset: big, bytes: vec![3; 10] },
            Message::ExchangeEnd { conn, exchange: big, status: 599 },
            Message::ConnClosed { conn },
            Message::SnapshotBegin { connections: big },
            Message::SnapshotConn { conn, state: vec![4; 70_000], more: false },
            Message::SnapshotEnd,
        ];
        for msg in msgs {
            let bound = encoded_len_bound(&msg);
            let rec = ToBackup::Record(Record { seq: big, epoch: big, msg });
            let len = codec::encode(&rec).unwrap().len();
            assert!(len <= bound, "{len} > {bound} for {rec:?}");
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        assert_eq!(LinkConfig::default().validate(), Ok(()));
        let cfg = LinkConfig { heartbeat_interval: Duration::ZERO, ..LinkConfig::default() };
        assert_eq!(cfg.validate().unwrap_err().field, "heartbeat_interval");
        let cfg = LinkConfig { max_frame: usize::MAX, ..LinkConfig::default() };
        assert_eq!(cfg.validate().unwrap_err().field, "max_frame");
        let cfg = LinkConfig { ack_every: 0, ..LinkConfig::default() };
        assert_eq!(cfg.validate().unwrap_err().field, "ack_every");
    }
}
