//! The node's observable state: identity, role, peer, epoch, failovers, and the
//! [`Metrics`]; read as a [`NodeStatus`] (`GET /status`) or as the exposition
//! (`GET /metrics`). Reading takes the time as an argument, so both are deterministic.

use super::expo::{Encoder, Value};
use super::metrics::{FailoverPhase, Label, Metrics, UnprotectedReason};
use crate::protocol::Role;
use crate::replica::{ReplicaTable, TableSummary};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Failovers kept for `/status`, newest last; older ones only count in the total.
pub const FAILOVER_HISTORY: usize = 32;

/// Where this node stands with its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// No peer: a primary serving unprotected, or a backup not joined.
    None,
    /// Joining: the snapshot is being transferred; a failover now would lose connections.
    Syncing,
    /// Joined and streaming: the pair is protected.
    Connected,
}

impl PeerState {
    /// The name used in `/status` and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::None => "none",
            PeerState::Syncing => "syncing",
            PeerState::Connected => "connected",
        }
    }

    const ALL: [PeerState; 3] = [PeerState::None, PeerState::Syncing, PeerState::Connected];
}

fn role_str(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Backup => "backup",
    }
}

/// `Role` as `"primary"` / `"backup"` in `/status`.
mod role_name {
    use crate::protocol::Role;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(role: &Role, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::role_str(*role))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        match String::deserialize(d)?.as_str() {
            "primary" => Ok(Role::Primary),
            "backup" => Ok(Role::Backup),
            other => Err(D::Error::unknown_variant(other, &["primary", "backup"])),
        }
    }
}

/// One takeover, as the backup that performed it measured it. Filled by the takeover
/// driver and handed to [`AdminState::record_failover`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRecord {
    /// When the takeover finished (wall clock).
    pub at: SystemTime,
    /// Why: what the detector saw ("5 heartbeats missed", "replication link reset").
    pub reason: String,
    /// The epoch this node serves under after the takeover.
    pub epoch: u64,
    /// Last sign of life from the primary → primary declared lost.
    pub detection: Duration,
    /// The fencing check (ARP probe of the VIP, optional operator command).
    pub fencing: Duration,
    /// Rebuilding the connections with `TCP_REPAIR`.
    pub restore: Duration,
    /// Last sign of life → serving as primary.
    pub total: Duration,
    /// Connections rebuilt.
    pub connections_restored: u64,
    /// Connections the replica held that could not be rebuilt.
    pub connections_lost: u64,
    /// Of the restored, how many had their sockets staged by the standby ahead of the takeover (only
    /// taken out of repair mode; the others were rebuilt whole).
    pub connections_staged: u64,
}

impl FailoverRecord {
    fn phase(&self, phase: FailoverPhase) -> Duration {
        match phase {
            FailoverPhase::Detection => self.detection,
            FailoverPhase::Fencing => self.fencing,
            FailoverPhase::Restore => self.restore,
            FailoverPhase::Total => self.total,
        }
    }
}

/// `GET /status`: what an operator asks a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node's name.
    pub node: String,
    /// The cluster (pair) name.
    pub cluster: String,
    /// The understudy version running.
    pub version: String,
    /// `"primary"` or `"backup"`.
    #[serde(with = "role_name")]
    pub role: Role,
    /// The epoch this node is at.
    pub epoch: u64,
    /// `"none"`, `"syncing"` or `"connected"`.
    pub peer: PeerState,
    /// The peer's node name, when there is one.
    pub peer_node: Option<String>,
    /// When `peer` last changed (RFC 3339, UTC, and Unix milliseconds): since when the pair is protected,
    /// syncing, or alone; `null` while it never changed.
    #[serde(default)]
    pub peer_since: Option<String>,
    #[serde(default)]
    pub peer_since_unix_ms: Option<u64>,
    /// Is the pair protected right now: would a failure of either node lose no connection
    /// that can be protected? True exactly when the peer is `connected`.
    pub protected: bool,
    /// Milliseconds since this node started.
    pub uptime_ms: u64,
    pub connections: ConnectionsStatus,
    pub replication: ReplicationStatus,
    /// Latest heartbeat round trip in milliseconds (measured on the primary).
    pub heartbeat_rtt_ms: Option<f64>,
    /// Failovers this node performed since it started.
    pub failovers_total: u64,
    /// The latest failovers (at most [`FAILOVER_HISTORY`]), oldest first.
    pub failovers: Vec<FailoverStatus>,
    /// A backup that did not take over although it lost its primary (a split-brain guard: the fence found
    /// the VIP answered, or could not confirm the primary is fenced); `null` when none is raised.
    #[serde(default)]
    pub alarm: Option<AlarmStatus>,
    /// A primary that gave its backup up and serves unprotected: why and when; `null` while a backup is
    /// linked, or when none ever was.
    #[serde(default)]
    pub peer_lost: Option<PeerLostStatus>,
    /// Client connections each limit refused or closed since start, by limit (every limit listed).
    #[serde(default)]
    pub limits: BTreeMap<String, u64>,
    /// This node's replica table (the backup's replica, or the primary's own copy of it); `null` while
    /// there is none (a backup not yet joined).
    #[serde(default)]
    pub replica: Option<ReplicaStatus>,
}

/// `replica` in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Connections in the table.
    pub connections: u64,
    /// Bytes the table holds for them (unanswered request bytes, unacknowledged reply bytes, upstream
    /// payload not yet sent, partial heads).
    pub bytes: u64,
    /// The most one connection holds (bounded by `limits.replica_bytes_per_connection` for reply bytes).
    pub largest_connection_bytes: u64,
    /// A digest of every connection's TCP state (sequence numbers, acknowledgements, windows, flags), as
    /// 16 hex digits: the same on both nodes when their tables agree, unchanged while no state moves.
    pub digest: String,
    /// On a standby, its idle connections' sockets staged for a takeover (rebuilt ahead, in repair mode);
    /// `null` on a primary.
    #[serde(default)]
    pub staged_sockets: Option<u64>,
}

/// `alarm` in `/status`: raised by the backup's first stand-down, updated by each one after, cleared when
/// the primary is heard again (the link recovers or a rejoin syncs) or this node takes over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmStatus {
    /// Always `"stood_down"` today.
    pub kind: String,
    /// The latest stand-down's reason ("the primary (02:..) still answers for the VIP; replication link:
    /// silence").
    pub reason: String,
    /// The first stand-down of this episode, RFC 3339 UTC with milliseconds, and in Unix milliseconds.
    pub since: String,
    pub since_unix_ms: u64,
    /// The latest stand-down.
    pub last: String,
    pub last_unix_ms: u64,
    /// Stand-downs in this episode (the detector fences again every recheck interval).
    pub count: u64,
}

/// `peer_lost` in `/status`: set when the primary gives its backup up and carries on unprotected, cleared
/// when a backup joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLostStatus {
    /// Why the backup was suspected ("replication link ended", ...); the VIP probe found nobody else.
    pub reason: String,
    /// The backup given up.
    pub node: Option<String>,
    /// When, RFC 3339 UTC with milliseconds, and in Unix milliseconds.
    pub at: String,
    pub at_unix_ms: u64,
}

/// Client connections open now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsStatus {
    /// `protected + unprotected`.
    pub total: u64,
    /// Connections a failover would carry over.
    pub protected: u64,
    /// Connections a failover would lose.
    pub unprotected: u64,
    /// Open unprotected connections by reason (every reason listed, zeros included).
    pub unprotected_reasons: BTreeMap<String, u64>,
    /// Connections opened since start.
    pub opened_total: u64,
    /// Connections closed since start.
    pub closed_total: u64,
}

/// The replication stream (primary side).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// Records sent and not yet acknowledged.
    pub lag_records: u64,
    /// Bytes sent and not yet acknowledged.
    pub lag_bytes: u64,
    /// Age of the oldest unacknowledged record in milliseconds; `null` when none is.
    pub oldest_unacked_ms: Option<f64>,
    pub records_sent: u64,
    pub records_acked: u64,
    pub bytes_sent: u64,
    pub bytes_acked: u64,
}

/// One failover in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverStatus {
    /// When it finished, RFC 3339 UTC with milliseconds.
    pub at: String,
    /// The same, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub reason: String,
    pub epoch: u64,
    pub detection_ms: f64,
    pub fencing_ms: f64,
    pub restore_ms: f64,
    pub total_ms: f64,
    pub connections_restored: u64,
    pub connections_lost: u64,
    /// Of the restored, how many had sockets staged ahead of the takeover.
    #[serde(default)]
    pub connections_staged: u64,
}

impl From<&FailoverRecord> for FailoverStatus {
    fn from(r: &FailoverRecord) -> Self {
        let unix = r.at.duration_since(UNIX_EPOCH).unwrap_or_default();
        FailoverStatus {
            at: rfc3339_utc(unix),
            at_unix_ms: u64::try_from(unix.as_millis()).unwrap_or(u64::MAX),
            reason: r.reason.clone(),
            epoch: r.epoch,
            detection_ms: ms(r.detection),
            fencing_ms: ms(r.fencing),
            restore_ms: ms(r.restore),
            total_ms: ms(r.total),
            connections_restored: r.connections_restored,
            connections_lost: r.connections_lost,
            connections_staged: r.connections_staged,
        }
    }
}

/// Milliseconds, as the nearest float (one division, so 420 µs prints as 0.42).
fn ms(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

/// Whether a client connection would survive a failover now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    Protected,
    Unprotected(UnprotectedReason),
}

/// The shared, cheaply cloned handle to a node's observable state. Hot counters are
/// atomics in [`Metrics`]; role, peer, epoch and failovers (which change a few times in
/// a node's life) sit behind one mutex that a scrape holds for microseconds.
#[derive(Debug, Clone)]
pub struct AdminState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: String,
    cluster: String,
    started: Instant,
    started_wall: SystemTime,
    metrics: Metrics,
    dynamic: Mutex<Dynamic>,
    switchover: Mutex<Option<tokio::sync::mpsc::UnboundedSender<SwitchoverReply>>>,
    /// The table `/status` summarises.
    replica: Mutex<Option<Arc<Mutex<ReplicaTable>>>>,
    /// A standby's count of the sockets it staged for a takeover.
    staged: Mutex<Option<Arc<AtomicUsize>>>,
}

/// Where a node answers a planned-switchover request of the admin endpoint: an HTTP status and a JSON
/// body.
pub type SwitchoverReply = tokio::sync::oneshot::Sender<(u16, serde_json::Value)>;

#[derive(Debug)]
struct Dynamic {
    role: Role,
    epoch: u64,
    peer: PeerState,
    peer_node: Option<String>,
    /// When `peer` last changed.
    peer_since: Option<SystemTime>,
    failovers_total: u64,
    failovers: VecDeque<FailoverRecord>,
    alarm: Option<StandDownAlarm>,
    peer_lost: Option<PeerLost>,
}

#[derive(Debug, Clone)]
struct StandDownAlarm {
    reason: String,
    since: SystemTime,
    last: SystemTime,
    count: u64,
}

#[derive(Debug, Clone)]
struct PeerLost {
    reason: String,
    node: Option<String>,
    at: SystemTime,
}

/// RFC 3339 and Unix milliseconds of a wall-clock time.
fn wall(at: SystemTime) -> (String, u64) {
    let unix = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    (rfc3339_utc(unix), u64::try_from(unix.as_millis()).unwrap_or(u64::MAX))
}

impl AdminState {
    /// A node named `node` in `cluster`, starting at `now` in `role` at `epoch`, with no peer.
    pub fn new(node: impl Into<String>, cluster: impl Into<String>, role: Role, epoch: u64, now: Instant) -> Self {
        AdminState {
            inner: Arc::new(Inner {
                node: node.into(),
                cluster: cluster.into(),
                started: now,
                started_wall: SystemTime::now(),
                metrics: Metrics::default(),
                dynamic: Mutex::new(Dynamic {
                    role,
                    epoch,
                    peer: PeerState::None,
                    peer_node: None,
                    peer_since: None,
                    failovers_total: 0,
                    failovers: VecDeque::new(),
                    alarm: None,
                    peer_lost: None,
                }),
                switchover: Mutex::new(None),
                replica: Mutex::new(None),
                staged: Mutex::new(None),
            }),
        }
    }

    fn dynamic(&self) -> MutexGuard<'_, Dynamic> {
        // The data is plain values; a panic elsewhere cannot leave it half-updated.
        self.inner.dynamic.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The replica table `/status` summarises (`None`: none now).
    pub fn set_replica(&self, table: Option<Arc<Mutex<ReplicaTable>>>) {
        *self.inner.replica.lock().unwrap_or_else(PoisonError::into_inner) = table;
    }

    /// Where a standby counts the sockets it staged for a takeover (`None`: it stages none now).
    pub fn set_staged(&self, count: Option<Arc<AtomicUsize>>) {
        *self.inner.staged.lock().unwrap_or_else(PoisonError::into_inner) = count;
    }

    fn staged(&self) -> Option<u64> {
        let count = self.inner.staged.lock().unwrap_or_else(PoisonError::into_inner);
        count.as_ref().map(|c| c.load(std::sync::atomic::Ordering::Relaxed) as u64)
    }

    /// The summary of the table set with [`AdminState::set_replica`], if any.
    pub fn replica(&self) -> Option<TableSummary> {
        let table = self.inner.replica.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
        let summary = table.lock().unwrap_or_else(PoisonError::into_inner).summary();
        Some(summary)
    }

    /// Who answers `POST /admin/switchover` (a serving primary); `None` when nobody can.
    pub fn set_switchover(&self, handler: Option<tokio::sync::mpsc::UnboundedSender<SwitchoverReply>>) {
        *self.inner.switchover.lock().unwrap_or_else(PoisonError::into_inner) = handler;
    }

    /// Asks the node for a planned switchover; `None` when it cannot take one (not a serving primary).
    pub fn request_switchover(&self) -> Option<tokio::sync::oneshot::Receiver<(u16, serde_json::Value)>> {
        let handler = self.inner.switchover.lock().unwrap_or_else(PoisonError::into_inner).clone()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        handler.send(tx).ok()?;
        Some(rx)
    }

    /// The typed metric handles.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The role changed (a takeover, a switchover), with the epoch that came with it.
    pub fn set_role(&self, role: Role, epoch: u64) {
        let mut d = self.dynamic();
        d.role = role;
        d.epoch = epoch;
    }

    /// The epoch changed without a role change.
    pub fn set_epoch(&self, epoch: u64) {
        self.dynamic().epoch = epoch;
    }

    /// The peer's state changed; `node` names the peer when there is one. A peer (syncing or connected)
    /// clears `peer_lost`.
    pub fn set_peer(&self, peer: PeerState, node: Option<&str>) {
        let mut d = self.dynamic();
        if d.peer != peer {
            d.peer_since = Some(SystemTime::now());
        }
        d.peer = peer;
        d.peer_node = if peer == PeerState::None { None } else { node.map(str::to_owned) };
        if peer != PeerState::None {
            d.peer_lost = None;
        }
    }

    /// The primary gave its backup (`node`) up at `at` for `reason` and serves unprotected.
    pub fn peer_lost(&self, at: SystemTime, reason: &str, node: Option<&str>) {
        self.inner.metrics.peers_lost.inc();
        self.dynamic().peer_lost = Some(PeerLost { reason: reason.to_owned(), node: node.map(str::to_owned), at });
    }

    /// The backup stood down at `at` (it lost its primary but did not take over) for `reason`: raises
    /// the alarm, or updates it if already raised.
    pub fn stood_down(&self, at: SystemTime, reason: &str) {
        self.inner.metrics.stand_downs.inc();
        let mut d = self.dynamic();
        match &mut d.alarm {
            Some(a) => {
                a.reason = reason.to_owned();
                a.last = at;
                a.count += 1;
            }
            None => d.alarm = Some(StandDownAlarm { reason: reason.to_owned(), since: at, last: at, count: 1 }),
        }
    }

    /// The condition behind the alarm is over (the primary is heard again, or this node took over).
    /// Returns whether one was raised.
    pub fn clear_alarm(&self) -> bool {
        self.dynamic().alarm.take().is_some()
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.dynamic().role
    }

    /// Whether the pair is protected now (the peer is connected).
    pub fn protected(&self) -> bool {
        self.dynamic().peer == PeerState::Connected
    }

    /// This node took over: it is primary at the record's epoch. The role and the record change together,
    /// so a status that reads `primary` after a takeover always shows that takeover.
    pub fn took_over(&self, record: FailoverRecord) {
        let mut d = self.dynamic();
        d.role = Role::Primary;
        d.epoch = record.epoch;
        Self::push_failover(&mut d, record);
    }

    /// A takeover finished (its record only; [`AdminState::took_over`] also makes this node primary).
    pub fn record_failover(&self, record: FailoverRecord) {
        Self::push_failover(&mut self.dynamic(), record);
    }

    fn push_failover(d: &mut Dynamic, record: FailoverRecord) {
        d.failovers_total += 1;
        if d.failovers.len() == FAILOVER_HISTORY {
            d.failovers.pop_front();
        }
        d.failovers.push_back(record);
    }

    /// A client connection opened; the guard counts it until dropped.
    pub fn connection_opened(&self, protection: Protection) -> ConnectionGuard {
        let c = &self.inner.metrics.connections;
        c.opened.inc();
        add_open(&self.inner.metrics, protection, 1);
        ConnectionGuard { state: self.clone(), protection }
    }

    /// `GET /status` at `now`.
    pub fn status(&self, now: Instant) -> NodeStatus {
        // Before the dynamic lock: the two locks are never held together.
        let replica = self.replica();
        let staged = self.staged();
        let m = &self.inner.metrics;
        let c = m.connections();
        let r = m.replication();
        let lag = r.lag(now);
        let protected = c.protected();
        let unprotected = c.unprotected_total();
        let d = self.dynamic();
        NodeStatus {
            node: self.inner.node.clone(),
            cluster: self.inner.cluster.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            role: d.role,
            epoch: d.epoch,
            peer: d.peer,
            peer_node: d.peer_node.clone(),
            peer_since: d.peer_since.map(|at| wall(at).0),
            peer_since_unix_ms: d.peer_since.map(|at| wall(at).1),
            protected: d.peer == PeerState::Connected,
            uptime_ms: u64::try_from(now.saturating_duration_since(self.inner.started).as_millis()).unwrap_or(u64::MAX),
            connections: ConnectionsStatus {
                total: protected + unprotected,
                protected,
                unprotected,
                unprotected_reasons: UnprotectedReason::ALL
                    .iter()
                    .map(|&reason| (reason.as_str().to_owned(), c.unprotected(reason)))
                    .collect(),
                opened_total: c.opened(),
                closed_total: c.closed(),
            },
            replication: ReplicationStatus {
                lag_records: lag.records,
                lag_bytes: lag.bytes,
                oldest_unacked_ms: lag.oldest_unacked.map(ms),
                records_sent: r.records_sent(),
                records_acked: r.records_acked(),
                bytes_sent: r.bytes_sent(),
                bytes_acked: r.bytes_acked(),
            },
            heartbeat_rtt_ms: m.last_heartbeat_rtt().map(ms),
            failovers_total: d.failovers_total,
            failovers: d.failovers.iter().map(FailoverStatus::from).collect(),
            alarm: d.alarm.as_ref().map(|a| {
                let ((since, since_unix_ms), (last, last_unix_ms)) = (wall(a.since), wall(a.last));
                AlarmStatus {
                    kind: "stood_down".into(),
                    reason: a.reason.clone(),
                    since,
                    since_unix_ms,
                    last,
                    last_unix_ms,
                    count: a.count,
                }
            }),
            peer_lost: d.peer_lost.as_ref().map(|p| {
                let (at, at_unix_ms) = wall(p.at);
                PeerLostStatus { reason: p.reason.clone(), node: p.node.clone(), at, at_unix_ms }
            }),
            limits: m.limit_hits.iter().map(|(l, c)| (l.as_str().to_owned(), c.get())).collect(),
            replica: replica.map(|r| ReplicaStatus {
                connections: r.connections,
                bytes: r.bytes,
                largest_connection_bytes: r.largest_connection_bytes,
                digest: format!("{:016x}", r.digest),
                staged_sockets: staged,
            }),
        }
    }

    /// `GET /metrics` at `now`: the exposition, version 0.0.4.
    pub fn render_metrics(&self, now: Instant) -> String {
        let m = &self.inner.metrics;
        let (role, epoch, peer, failovers_total, last_failover, alarm) = {
            let d = self.dynamic();
            (d.role, d.epoch, d.peer, d.failovers_total, d.failovers.back().cloned(), d.alarm.is_some())
        };
        let replica = self.replica();
        let mut e = Encoder::default();
        let flag = |b: bool| Value::Int(i64::from(b));

        e.gauge_samples(
            "understudy_node_info",
            "Identity of this node; the value is always 1.",
            &[(
                &[("node", &self.inner.node), ("cluster", &self.inner.cluster), ("version", env!("CARGO_PKG_VERSION"))],
                Value::Int(1),
            )],
        );
        let start = self.inner.started_wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        e.gauge(
            "understudy_start_time_seconds",
            "When this node started, in seconds since the Unix epoch.",
            Value::Float(start.as_secs_f64()),
        );
        e.gauge_samples(
            "understudy_role",
            "The node's role: 1 for the current one.",
            &[
                (&[("role", "primary")], flag(role == Role::Primary)),
                (&[("role", "backup")], flag(role == Role::Backup)),
            ],
        );
        e.gauge("understudy_epoch", "The epoch this node is at.", Value::Uint(epoch));
        let peer_samples: Vec<([(&str, &str); 1], Value)> =
            PeerState::ALL.iter().map(|&p| ([("state", p.as_str())], flag(p == peer))).collect();
        let peer_samples: Vec<(&[(&str, &str)], Value)> = peer_samples.iter().map(|(l, v)| (&l[..], *v)).collect();
        e.gauge_samples("understudy_peer", "The peer's state: 1 for the current one.", &peer_samples);
        e.gauge(
            "understudy_protected",
            "1 when the pair is protected (the peer is connected), else 0.",
            flag(peer == PeerState::Connected),
        );

        let c = m.connections();
        e.gauge_samples(
            "understudy_connections",
            "Client connections open now, by whether a failover would carry them over.",
            &[
                (&[("state", "protected")], Value::Uint(c.protected())),
                (&[("state", "unprotected")], Value::Uint(c.unprotected_total())),
            ],
        );
        e.gauge_family(
            "understudy_connections_unprotected",
            "Unprotected client connections open now, by reason.",
            &c.unprotected,
        );
        e.counter("understudy_connections_opened_total", "Client connections opened.", &c.opened);
        e.counter("understudy_connections_closed_total", "Client connections closed.", &c.closed);
        e.counter_family(
            "understudy_connections_unprotected_total",
            "Times a client connection opened unprotected or lost its protection, by reason.",
            &c.became_unprotected,
        );

        e.counter_family(
            "understudy_limit_hits_total",
            "Client connections a limit refused or closed, by limit (README, Limits).",
            &m.limit_hits,
        );
        if let Some(r) = replica {
            e.gauge(
                "understudy_replica_connections",
                "Connections in this node's replica table.",
                Value::Uint(r.connections),
            );
            e.gauge("understudy_replica_bytes", "Bytes this node's replica table holds.", Value::Uint(r.bytes));
            e.gauge(
                "understudy_replica_largest_connection_bytes",
                "The most bytes one connection holds in this node's replica table.",
                Value::Uint(r.largest_connection_bytes),
            );
        }
        if let Some(staged) = self.staged() {
            e.gauge(
                "understudy_standby_staged_sockets",
                "Idle connections whose sockets this standby rebuilt ahead of a takeover.",
                Value::Uint(staged),
            );
        }

        e.counter("understudy_http_exchanges_total", "HTTP exchanges (request and response) completed.", &m.exchanges);
        e.counter_family("understudy_client_bytes_total", "Bytes read from and written to clients.", &m.client_bytes);
        e.counter_family(
            "understudy_upstream_bytes_total",
            "Bytes read from and written to upstreams.",
            &m.upstream_bytes,
        );

        let r = m.replication();
        let lag = r.lag(now);
        e.counter_value("understudy_replication_records_sent_total", "Replication records sent.", r.records_sent());
        e.counter_value(
            "understudy_replication_records_acked_total",
            "Replication records acknowledged by the peer.",
            r.records_acked(),
        );
        e.counter_value("understudy_replication_sent_bytes_total", "Replication bytes sent.", r.bytes_sent());
        e.counter_value(
            "understudy_replication_acked_bytes_total",
            "Replication bytes acknowledged by the peer.",
            r.bytes_acked(),
        );
        e.gauge(
            "understudy_replication_lag_records",
            "Replication records sent and not yet acknowledged.",
            Value::Uint(lag.records),
        );
        e.gauge(
            "understudy_replication_lag_bytes",
            "Replication bytes sent and not yet acknowledged.",
            Value::Uint(lag.bytes),
        );
        e.gauge(
            "understudy_replication_oldest_unacked_seconds",
            "Age of the oldest unacknowledged replication record; 0 when none is.",
            Value::Float(lag.oldest_unacked.map_or(0.0, |d| d.as_secs_f64())),
        );

        e.counter_family(
            "understudy_gate_packets_total",
            "Packets given a verdict by the gate, per queue.",
            &m.gate_packets,
        );
        e.counter_family(
            "understudy_gate_batches_total",
            "Verdict batches sent by the gate, per queue.",
            &m.gate_batches,
        );
        e.counter_family(
            "understudy_gate_dropped_packets_total",
            "Packets the gate dropped, per queue.",
            &m.gate_drops,
        );

        e.counter_family(
            "understudy_resume_total",
            "Exchanges in flight at a failover, by how they were resumed.",
            &m.resumes,
        );
        e.counter(
            "understudy_retransmit_prompts_total",
            "Restored connections whose client was prompted (ICMP, RFC 6069) to retransmit after a takeover.",
            &m.retransmit_prompts,
        );
        e.counter_value("understudy_failovers_total", "Takeovers this node performed.", failovers_total);
        e.counter(
            "understudy_stand_downs_total",
            "Times this backup lost its primary but did not take over (the VIP answered, or the fence failed).",
            &m.stand_downs,
        );
        e.gauge(
            "understudy_alarm",
            "1 while this backup's stand-down alarm is raised (see /status `alarm`), else 0.",
            flag(alarm),
        );
        e.counter(
            "understudy_peers_lost_total",
            "Times this primary gave its backup up (nobody else answered for the VIP) and carried on unprotected.",
            &m.peers_lost,
        );
        let phases: Vec<([(&str, &str); 1], Value)> = match &last_failover {
            Some(f) => FailoverPhase::ALL
                .iter()
                .map(|&p| ([(FailoverPhase::NAME, p.as_str())], Value::Float(f.phase(p).as_secs_f64())))
                .collect(),
            None => Vec::new(),
        };
        let phases: Vec<(&[(&str, &str)], Value)> = phases.iter().map(|(l, v)| (&l[..], *v)).collect();
        e.gauge_samples(
            "understudy_last_failover_seconds",
            "Phases of the latest takeover; no samples before the first.",
            &phases,
        );
        e.histogram(
            "understudy_heartbeat_rtt_seconds",
            "Heartbeat round-trip time on the replication link.",
            &m.heartbeat_rtt.snapshot(),
        );
        e.finish()
    }
}

fn add_open(m: &Metrics, p: Protection, d: i64) {
    let c = &m.connections;
    match p {
        Protection::Protected => c.protected.add(d),
        Protection::Unprotected(reason) => {
            c.unprotected.get(reason).add(d);
            if d > 0 {
                c.became_unprotected.get(reason).inc();
            }
        }
    }
}

/// Counts one open client connection in the gauges while it lives. Dropping it counts
/// the connection closed.
#[derive(Debug)]
#[must_use = "dropping the guard counts the connection as closed"]
pub struct ConnectionGuard {
    state: AdminState,
    protection: Protection,
}

impl ConnectionGuard {
    /// The connection's protection as last set.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// The connection's protection changed (it lost its backup, the tracker lost it, or
    /// a joining backup received it in a snapshot).
    pub fn set_protection(&mut self, protection: Protection) {
        if protection == self.protection {
            return;
        }
        let m = self.state.metrics();
        add_open(m, self.protection, -1);
        add_open(m, protection, 1);
        self.protection = protection;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let m = self.state.metrics();
        add_open(m, self.protection, -1);
        m.connections.closed.inc();
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a time since the Unix epoch.
fn rfc3339_utc(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, mo, d) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(now: Instant) -> AdminState {
        AdminState::new("n1", "c1", Role::Primary, 3, now)
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339_utc(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(Duration::from_millis(951_782_400_123)), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_utc(Duration::from_secs(1_795_000_000)), "2026-11-18T11:06:40.000Z");
    }

    #[test]
    fn connection_guard_moves_between_states_and_balances_on_drop() {
        let now = Instant::now();
        let s = state(now);
        let mut a = s.connection_opened(Protection::Protected);
        let b = s.connection_opened(Protection::Unprotected(UnprotectedReason::MidStream));
        let st = s.status(now).connections;
        assert_eq!((st.total, st.protected, st.unprotected), (2, 1, 1));
        assert_eq!(st.unprotected_reasons["mid_stream"], 1);
        a.set_protection(Protection::Unprotected(UnprotectedReason::NoBackup));
        a.set_protection(Protection::Unprotected(UnprotectedReason::NoBackup));
        let c = s.metrics().connections();
        assert_eq!(
            (c.protected(), c.unprotected_total(), c.became_unprotected(UnprotectedReason::NoBackup)),
            (0, 2, 1)
        );
        drop(a);
        drop(b);
        let st = s.status(now).connections;
        assert_eq!((st.total, st.opened_total, st.closed_total), (0, 2, 2));
    }

    #[test]
    fn protected_follows_peer_state() {
        let now = Instant::now();
        let s = state(now);
        assert!(!s.status(now).protected);
        s.set_peer(PeerState::Syncing, Some("n2"));
        assert!(!s.protected());
        s.set_peer(PeerState::Connected, Some("n2"));
        let st = s.status(now);
        assert!(st.protected);
        assert_eq!(st.peer_node.as_deref(), Some("n2"));
        assert!(s.render_metrics(now).contains("\nunderstudy_protected 1\n"));
        s.set_peer(PeerState::None, Some("ignored"));
        assert_eq!(s.status(now).peer_node, None);
    }

    #[test]
    fn peer_since_moves_only_when_the_peer_state_changes() {
        let now = Instant::now();
        let s = state(now);
        assert_eq!(s.status(now).peer_since_unix_ms, None);
        let before = wall(SystemTime::now()).1;
        s.set_peer(PeerState::Syncing, Some("n2"));
        let syncing = s.status(now).peer_since_unix_ms.expect("set by the change");
        assert!(syncing >= before);
        // Repeating the same state (as a primary does at every change of its commit core) keeps the time.
        let mut d = s.dynamic();
        d.peer_since = Some(UNIX_EPOCH + Duration::from_millis(syncing - 1));
        drop(d);
        s.set_peer(PeerState::Syncing, Some("n2"));
        assert_eq!(s.status(now).peer_since_unix_ms, Some(syncing - 1));
        s.set_peer(PeerState::Connected, Some("n2"));
        let st = s.status(now);
        assert!(st.peer_since_unix_ms.expect("changed") >= syncing);
        assert!(st.peer_since.expect("changed").ends_with('Z'));
    }

    #[test]
    fn failover_history_is_bounded_and_total_keeps_counting() {
        let now = Instant::now();
        let s = state(now);
        for i in 0..(FAILOVER_HISTORY as u64 + 5) {
            s.record_failover(FailoverRecord {
                at: UNIX_EPOCH + Duration::from_secs(i),
                reason: format!("r{i}"),
                epoch: i,
                detection: Duration::from_micros(1500),
                fencing: Duration::from_millis(2),
                restore: Duration::from_micros(290),
                total: Duration::from_millis(10),
                connections_restored: 1,
                connections_lost: 0,
                connections_staged: 0,
            });
        }
        let st = s.status(now);
        assert_eq!(st.failovers_total, FAILOVER_HISTORY as u64 + 5);
        assert_eq!(st.failovers.len(), FAILOVER_HISTORY);
        assert_eq!(st.failovers[0].reason, "r5");
        assert_eq!(st.failovers[0].detection_ms, 1.5);
        let text = s.render_metrics(now);
        assert!(text.contains("understudy_last_failover_seconds{phase=\"restore\"} 0.00029\n"), "{text}");
    }

    #[test]
    fn a_backup_reads_primary_only_with_the_takeover_that_made_it_so() {
        let now = Instant::now();
        let s = AdminState::new("b", "c1", Role::Backup, 1, now);
        let st = s.status(now);
        assert_eq!((st.role, st.epoch, st.failovers.len()), (Role::Backup, 1, 0));
        s.took_over(FailoverRecord {
            at: UNIX_EPOCH,
            reason: "planned switchover".into(),
            epoch: 2,
            detection: Duration::ZERO,
            fencing: Duration::ZERO,
            restore: Duration::from_millis(3),
            total: Duration::from_millis(4),
            connections_restored: 7,
            connections_lost: 0,
            connections_staged: 5,
        });
        let st = s.status(now);
        assert_eq!((st.role, st.epoch, st.failovers.len()), (Role::Primary, 2, 1));
        assert_eq!(s.role(), Role::Primary);
    }

    #[test]
    fn stand_downs_raise_one_alarm_that_counts_until_cleared() {
        let now = Instant::now();
        let s = AdminState::new("b", "c1", Role::Backup, 1, now);
        assert_eq!(s.status(now).alarm, None);
        assert!(s.render_metrics(now).contains("\nunderstudy_alarm 0\n"));
        let t1 = UNIX_EPOCH + Duration::from_millis(1_000_500);
        let t2 = t1 + Duration::from_secs(1);
        s.stood_down(t1, "first");
        s.stood_down(t2, "second");
        let alarm = s.status(now).alarm.expect("raised");
        assert_eq!((alarm.kind.as_str(), alarm.reason.as_str(), alarm.count), ("stood_down", "second", 2));
        assert_eq!((alarm.since_unix_ms, alarm.last_unix_ms), (1_000_500, 1_001_500));
        assert_eq!(alarm.since, "1970-01-01T00:16:40.500Z");
        let text = s.render_metrics(now);
        assert!(text.contains("\nunderstudy_alarm 1\n"), "{text}");
        assert!(text.contains("\nunderstudy_stand_downs_total 2\n"), "{text}");
        assert!(s.clear_alarm());
        assert!(!s.clear_alarm(), "nothing left to clear");
        assert_eq!(s.status(now).alarm, None);
        // A new episode starts its own count; the metric keeps the total.
        s.stood_down(t2, "third");
        assert_eq!(s.status(now).alarm.map(|a| (a.count, a.since_unix_ms)), Some((1, 1_001_500)));
        assert!(s.render_metrics(now).contains("\nunderstudy_stand_downs_total 3\n"));
    }

    #[test]
    fn peer_lost_is_reported_until_a_backup_joins() {
        let now = Instant::now();
        let s = state(now);
        s.set_peer(PeerState::Connected, Some("n2"));
        assert_eq!(s.status(now).peer_lost, None);
        s.set_peer(PeerState::None, None);
        s.peer_lost(UNIX_EPOCH + Duration::from_millis(42), "replication link ended", Some("n2"));
        let st = s.status(now);
        let lost = st.peer_lost.expect("reported");
        assert_eq!(st.peer, PeerState::None);
        assert_eq!(
            (lost.reason.as_str(), lost.node.as_deref(), lost.at_unix_ms),
            ("replication link ended", Some("n2"), 42)
        );
        assert!(s.render_metrics(now).contains("\nunderstudy_peers_lost_total 1\n"));
        s.set_peer(PeerState::None, None);
        assert!(s.status(now).peer_lost.is_some(), "still alone");
        s.set_peer(PeerState::Syncing, Some("n3"));
        assert_eq!(s.status(now).peer_lost, None);
    }

    #[test]
    fn status_json_round_trips() {
        let now = Instant::now();
        let s = state(now);
        let json = serde_json::to_string(&s.status(now)).expect("status serialises");
        assert!(json.contains("\"role\":\"primary\""), "{json}");
        assert!(json.contains("\"peer\":\"none\""), "{json}");
        let back: NodeStatus = serde_json::from_str(&json).expect("status parses back");
        assert_eq!(back, s.status(now));
        s.stood_down(UNIX_EPOCH, "the primary still answers for the VIP");
        s.peer_lost(UNIX_EPOCH, "replication link ended", None);
        let json = serde_json::to_string(&s.status(now)).expect("status serialises");
        assert!(json.contains("\"alarm\":{\"kind\":\"stood_down\""), "{json}");
        assert!(json.contains("\"peer_lost\":{\"reason\":\"replication link ended\""), "{json}");
        let back: NodeStatus = serde_json::from_str(&json).expect("status parses back");
        assert_eq!(back, s.status(now));
    }
}
