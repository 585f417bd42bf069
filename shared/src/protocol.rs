//! Replication protocol messages (ARCHITECTURE.md: "one ordered replication stream").
//!
//! The primary sends one ordered stream of [`Record`]s, each numbered by `seq`;
//! the backup acknowledges cumulatively ([`ToPrimary::Ack`]). Heartbeats travel
//! both ways outside the numbering, on the same connection. The connection opens
//! with a [`Hello`] from the joining side (the backup) and a [`Welcome`] from the
//! side that accepted it (the primary).
//!
//! Everything the backup knows comes from this stream, so the replica table is a
//! deterministic function of it (invariant 2). Every record carries the sender's
//! epoch: a node never accepts records, joins or switchovers from a lower epoch.
//!
//! Types only: encoding lives in `codec` (bincode), framing in `frame`, the
//! session (handshake, heartbeats, acks) in `link`.

use serde::{Deserialize, Serialize};
use std::net::SocketAddrV4;
use tcp_replay::Dir;

/// Protocol version this build speaks (4: the authenticated handshake, [`Handshake::AuthHello`] and what
/// follows it, and tagged frames; 3: planned switchover, [`Message::Handover`] and [`ToPrimary::TakingOver`]).
pub const PROTOCOL_VERSION: u16 = 4;
/// Oldest peer version this build can work with (2: snapshot states in parts). A link at version 2
/// works in full except for the planned switchover, which the primary then refuses with the reason.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// First version with the planned switchover.
pub const HANDOVER_VERSION: u16 = 3;
/// First version that can authenticate. An authenticated link speaks this version or a later one; a peer
/// before it can only link with a node run with `--insecure-replication`.
pub const AUTH_VERSION: u16 = 4;

/// Identifies a client connection: the client's address and the VIP:port it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnKey {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
}

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Backup,
}

/// First frame each side sends on a new replication connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Highest protocol version the sender speaks.
    pub version: u16,
    /// Lowest protocol version the sender accepts.
    pub min_version: u16,
    /// Cluster name: both nodes of a pair must agree.
    pub cluster: String,
    /// The sender's node name (for logs and status).
    pub node: String,
    pub role: Role,
    /// The sender's current epoch.
    pub epoch: u64,
}

/// The accepting side's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Welcome {
    /// The link is up, speaking `version`.
    Accepted { version: u16, node: String, epoch: u64 },
    /// The link is refused; `reason` says why in words an operator can act on.
    Refused { reason: String },
}

/// One numbered item of the primary's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the stream, from 1; acknowledgements are cumulative.
    pub seq: u64,
    /// The primary's epoch when it produced the record.
    pub epoch: u64,
    pub msg: Message,
}

/// What the primary tells the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A segment for VIP:port seen by the primary: an inbound client segment
    /// admitted by the gate, or the primary's own SYN-ACK, FIN or RST (`ToClient`).
    /// `datagram` is the whole IPv4 datagram.
    Segment {
        at_us: u64,
        dir: Dir,
        #[serde(with = "crate::codec::bytes")]
        datagram: Vec<u8>,
    },
    /// Reply bytes for the client, at their offset in the server's byte stream
    /// (0 = first byte after the SYN-ACK). Written to the client only once acknowledged.
    Reply {
        conn: ConnKey,
        offset: u64,
        #[serde(with = "crate::codec::bytes")]
        bytes: Vec<u8>,
    },
    /// A request's head was read and an exchange begins.
    ExchangeStart(ExchangeStart),
    /// Bytes of the upstream's response (head and body as received), at their
    /// offset within that response, logged as they arrive.
    Upstream {
        conn: ConnKey,
        exchange: u64,
        offset: u64,
        #[serde(with = "crate::codec::bytes")]
        bytes: Vec<u8>,
    },
    /// The exchange's response was fully handed to the client's socket.
    ExchangeEnd { conn: ConnKey, exchange: u64, status: u16 },
    /// The connection is gone on the primary; its replica can be dropped.
    ConnClosed { conn: ConnKey },
    /// A joining spare's snapshot starts; `connections` entries follow.
    SnapshotBegin { connections: u64 },
    /// One connection's replica state, encoded by the replica module, in one or more consecutive
    /// parts (a connection's state may hold megabytes of unacknowledged reply bytes, more than a
    /// frame): `more` is set on every part but the last.
    SnapshotConn {
        conn: ConnKey,
        #[serde(with = "crate::codec::bytes")]
        state: Vec<u8>,
        more: bool,
    },
    /// The snapshot is complete; the stream continues from the next record.
    SnapshotEnd,
    /// Changes nothing; the backup's ack of it renews the primary's lease (sent when
    /// a backup is suspected over a live link, so a merely slow backup can answer).
    Ping,
    /// Planned switchover (version 3 on): the primary has stopped releasing anything, revoked its
    /// kernel's right to send from the VIP and given the address up; every record before this one is
    /// all there is. The backup applies it, answers [`ToPrimary::TakingOver`], and takes over at once
    /// (no detection, no fencing) at a higher epoch.
    Handover,
}

impl Message {
    /// Whether the primary holds client output until the backup acknowledges this record: a segment
    /// waits in the gate, reply bytes before the socket, the snapshot's end for the pair to count as
    /// protected, a lease ping and a handover for the backup's answer. The backup acknowledges those at
    /// once and lets the others (logged upstream bytes, exchange starts and ends, closes, snapshot parts)
    /// ride with the next ack. A record the primary starts waiting on must be added here.
    pub fn holds_output(&self) -> bool {
        match self {
            Message::Segment { .. }
            | Message::Reply { .. }
            | Message::SnapshotEnd
            | Message::Ping
            | Message::Handover => true,
            Message::ExchangeStart(_)
            | Message::Upstream { .. }
            | Message::ExchangeEnd { .. }
            | Message::ConnClosed { .. }
            | Message::SnapshotBegin { .. }
            | Message::SnapshotConn { .. } => false,
        }
    }
}

/// An exchange (one request and its response) on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeStart {
    pub conn: ConnKey,
    /// Exchange number on the connection, from 0, in request order.
    pub exchange: u64,
    /// Offset of the request's first byte in the client's byte stream.
    pub request_offset: u64,
    pub method: String,
    pub target: String,
    /// The `Idempotency-Key` sent upstream: the client's own, or one the proxy generated.
    pub idempotency_key: Option<String>,
    /// Whether the proxy generated the key (it counts for retries only when the
    /// operator declares that the origin honours generated keys).
    pub key_generated: bool,
    /// The upstream chosen for the request, if proxying.
    pub upstream: Option<String>,
}

/// Frames from the primary to the backup, after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToBackup {
    Record(Record),
    /// Liveness; `sent_us` on the primary's monotonic clock.
    Heartbeat {
        sent_us: u64,
        epoch: u64,
    },
}

/// Frames from the backup to the primary, after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToPrimary {
    /// Every record up to and including `upto` is held by the backup. Renews the
    /// primary's lease.
    Ack { upto: u64 },
    /// Liveness; `echo_us` is the latest primary heartbeat's `sent_us` (for RTT).
    Heartbeat { sent_us: u64, echo_us: u64 },
    /// The backup applied [`Message::Handover`] (record `seq`) and everything before it, and is taking
    /// over; the old primary rejoins as its spare at `repl_listen` (an unspecified address there means
    /// the address the backup's link came from). Version 3 on.
    TakingOver { seq: u64, repl_listen: SocketAddrV4 },
}

/// Frames of the handshake. Variants are only ever appended: a node before version 4 reads the first two,
/// and cannot read an `AuthHello` (it closes the connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Handshake {
    /// Joining without authentication (`--insecure-replication`, or a node before version 4).
    Hello(Hello),
    /// The primary's answer to a `Hello`, and any refusal.
    Welcome(Welcome),
    /// Joining with a pre-shared key (version 4 on): the hello and the joining node's fresh nonce.
    AuthHello {
        hello: Hello,
        #[serde(with = "crate::codec::bytes")]
        nonce: Vec<u8>,
    },
    /// The primary accepts an `AuthHello`: its welcome (always `Accepted`), its nonce, and its proof of the
    /// key over the transcript (see `auth`).
    AuthWelcome {
        welcome: Welcome,
        #[serde(with = "crate::codec::bytes")]
        nonce: Vec<u8>,
        #[serde(with = "crate::codec::bytes")]
        proof: Vec<u8>,
    },
    /// The joining node's proof of the key; the link starts after it.
    Proof {
        #[serde(with = "crate::codec::bytes")]
        proof: Vec<u8>,
    },
    /// The joining node gives up the handshake and says why (the primary's proof did not match its key).
    Abort { reason: String },
}

impl Handshake {
    /// The hello of a `Hello` or `AuthHello`.
    pub fn hello(&self) -> Option<&Hello> {
        match self {
            Handshake::Hello(hello) | Handshake::AuthHello { hello, .. } => Some(hello),
            _ => None,
        }
    }
}
