//! The backup's replica maintenance (ARCHITECTURE.md invariants 1 to 3, "Replica table", "Roles over
//! time"): join the primary, apply every record of its stream to this node's own [`ReplicaTable`] in
//! stream order, and acknowledge each record only once it is applied. The primary's output commit
//! waits for those acks, so an ack must mean "this node holds it": reporting a record before applying
//! it would let the primary release bytes this node could not reproduce.
//!
//! A join's stream opens with the primary's snapshot (`SnapshotBegin`, one `SnapshotConn` per
//! connection, `SnapshotEnd`) and continues with the live stream; the replica is *synced* once
//! `SnapshotEnd` is applied. Before that it holds no usable table and must not take over. A stream
//! that does not open with a snapshot, or a record the table refuses (an older epoch, a repeat, a
//! broken snapshot), ends the link: the table no longer mirrors the primary's and the join must start
//! over with a fresh table.
//!
//! For the failure detector: [`Replica::liveness`] (every byte heard, heartbeats, whether reading is
//! paused because this node is behind), [`Replica::progress`] (records applied and when the last one
//! arrived), and [`Replica::lost`] when the link ends. The table is behind a mutex shared with the
//! apply loop: a takeover stops the replica ([`Replica::stop`]) and takes the table.

use primary::replicate::link_config;
use shared::config::NodeConfig;
use shared::link::{self, BackupLink, HandshakeError, LinkConfig, LocalIdentity, PeerInfo, PeerLiveness};
use shared::protocol::Message;
use shared::replica::{Applied, ApplyError, ReplicaTable};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

/// How a replica joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// The replication link's tuning (both nodes should agree on `max_frame`).
    pub link: LinkConfig,
    /// Time allowed for the TCP connection to the primary.
    pub connect_timeout: Duration,
    /// This node's replication listener, where the primary rejoins after a planned switchover.
    pub repl_listen: SocketAddrV4,
}

impl ReplicaConfig {
    /// `link`, and a 2 s connect timeout; no replication listener (0.0.0.0:0).
    pub fn new(link: LinkConfig) -> ReplicaConfig {
        ReplicaConfig {
            link,
            connect_timeout: Duration::from_secs(2),
            repl_listen: SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
        }
    }

    /// The replica of a node configured by `node`.
    pub fn from_node(node: &NodeConfig) -> ReplicaConfig {
        ReplicaConfig { repl_listen: node.repl_listen, ..ReplicaConfig::new(link_config(node)) }
    }
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The TCP connection to the primary failed.
    #[error("connecting to the primary at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection to the primary did not complete in time.
    #[error("connecting to the primary at {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    /// The handshake failed, or the primary refused this node (its reason is in the error).
    #[error("joining the primary at {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: HandshakeError,
    },
}

/// Why a replica stopped following its primary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaEnd {
    /// The link ended: the primary closed it, the connection broke, or a frame was bad.
    #[error("replication link lost: {0}")]
    LinkLost(String),
    /// The stream did not open with a snapshot.
    #[error("the primary's stream opened with {first} instead of a snapshot")]
    NotAJoin { first: String },
    /// The table refused a record: it no longer mirrors the primary's.
    #[error("record {seq} refused by the replica: {error}")]
    Refused { seq: u64, error: ApplyError },
    /// This node closed the link.
    #[error("closed by this node")]
    Closed,
}

/// How far the replica has got.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    /// Last record applied (and so acknowledged); 0 before any.
    pub applied: u64,
    /// Records applied on this link.
    pub records: u64,
    /// The snapshot is applied in full: the table is usable for a takeover.
    pub synced: bool,
    /// When the last record arrived.
    pub last_record_at: Option<Instant>,
    /// The primary handed over (planned switchover): every record it will send is applied, and the
    /// link told it this node is taking over.
    pub handover: bool,
    /// Set once the replica stopped following.
    pub ended: Option<ReplicaEnd>,
}

/// A joined replica: the link to the primary and the task applying its stream.
#[derive(Debug)]
pub struct Replica {
    table: Arc<Mutex<ReplicaTable>>,
    peer: PeerInfo,
    liveness: PeerLiveness,
    progress: watch::Receiver<Progress>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    epoch: u64,
}

/// Connects to the primary at `addr`, joins as `identity` (role backup), and starts applying its
/// stream to a fresh table.
pub async fn join(addr: SocketAddr, identity: &LocalIdentity, config: &ReplicaConfig) -> Result<Replica, JoinError> {
    let stream = match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(JoinError::Connect { addr, source }),
        Err(_) => return Err(JoinError::ConnectTimeout { addr, after: config.connect_timeout }),
    };
    link::prepare_tcp(&stream).map_err(|source| JoinError::Connect { addr, source })?;
    let link =
        link::join(stream, identity, &config.link).await.map_err(|source| JoinError::Handshake { addr, source })?;
    Ok(Replica::start(link, identity.epoch, config.repl_listen))
}

impl Replica {
    /// Applies the stream of an established `link` to a fresh table.
    pub fn start(link: BackupLink, epoch: u64, repl_listen: SocketAddrV4) -> Replica {
        let table = Arc::new(Mutex::new(ReplicaTable::new()));
        let peer = link.peer().clone();
        let liveness = link.liveness();
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(apply_loop(link, table.clone(), progress_tx, stop_rx, epoch, repl_listen));
        Replica { table, peer, liveness, progress, stop: Some(stop_tx), task: Some(task), epoch }
    }

    /// The primary this replica follows.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The table, shared with the apply loop. Hold its lock briefly: while it is held nothing is
    /// applied, so nothing is acknowledged, and the primary's clients wait.
    pub fn table(&self) -> Arc<Mutex<ReplicaTable>> {
        self.table.clone()
    }

    /// Runs `f` on the table.
    pub fn with_table<R>(&self, f: impl FnOnce(&ReplicaTable) -> R) -> R {
        f(&lock(&self.table))
    }

    /// What the link has heard from the primary (for the failure detector).
    pub fn liveness(&self) -> PeerLiveness {
        self.liveness.clone()
    }

    /// How far the replica has got, updated per batch of records applied. Receivers are woken only when
    /// the replica syncs, the primary hands over or the replica ends; `applied`, `records` and
    /// `last_record_at` change without a wake-up (read them with `borrow`).
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Whether the snapshot is applied in full.
    pub fn is_synced(&self) -> bool {
        self.progress.borrow().synced
    }

    /// Waits until the replica stops following, and says why.
    pub async fn lost(&self) -> ReplicaEnd {
        let mut progress = self.progress.clone();
        match progress.wait_for(|p| p.ended.is_some()).await {
            Ok(p) => p.ended.clone().unwrap_or(ReplicaEnd::Closed),
            Err(_) => ReplicaEnd::LinkLost("the apply task is gone".into()),
        }
    }

    /// Stops following: what is applied is acknowledged and the link closed. Returns the table as
    /// it stands (for a takeover; the apply loop no longer touches it).
    pub async fn stop(mut self) -> ReplicaTable {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            error!(role = "backup", epoch = self.epoch, error = %e, "replica task failed");
        }
        std::mem::take(&mut *lock(&self.table))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // The apply loop closes the link when its stop signal goes away.
        drop(self.stop.take());
    }
}

/// Records applied per wake-up: one report to the link and one progress update for all of them.
const APPLY_BATCH: usize = 256;
/// Within a batch, applied records are reported to the link at least this often.
const REPORT_EVERY: u64 = 16;

enum Step {
    Records(usize),
    Stop,
}

async fn apply_loop(
    mut link: BackupLink,
    table: Arc<Mutex<ReplicaTable>>,
    progress: watch::Sender<Progress>,
    mut stop: oneshot::Receiver<()>,
    epoch: u64,
    repl_listen: SocketAddrV4,
) {
    let peer = link.peer().node.clone();
    let mut batch = Vec::with_capacity(APPLY_BATCH);
    let end = 'follow: loop {
        let step = tokio::select! {
            biased;
            _ = &mut stop => Step::Stop,
            n = link.recv_many(&mut batch, APPLY_BATCH) => Step::Records(n),
        };
        match step {
            Step::Stop => {
                if let Err(e) = link.close().await {
                    debug!(role = "backup", epoch, peer = %peer, error = %e, "closing the replication link");
                }
                break ReplicaEnd::Closed;
            }
            Step::Records(0) => {
                let why = match link.join().await {
                    Ok(()) => "the primary closed the link".to_string(),
                    Err(e) => e.to_string(),
                };
                break ReplicaEnd::LinkLost(why);
            }
            Step::Records(_) => {}
        }
        let now = Instant::now();
        let mut update = Progress::default();
        let mut failed = None;
        for rec in batch.drain(..) {
            let first = progress.borrow().records == 0 && update.records == 0;
            if first && !matches!(rec.msg, Message::SnapshotBegin { .. }) {
                failed = Some(ReplicaEnd::NotAJoin { first: message_kind(&rec.msg).into() });
                break;
            }
            // Locked per record: a batch of snapshot parts can take a while to apply.
            let applied = lock(&table).apply(&rec);
            match applied {
                Ok(Applied::Taken) => {}
                Ok(Applied::Ignored(why)) => debug!(role = "backup", epoch, seq = rec.seq, ?why, "record ignored"),
                Ok(Applied::Unprotected { conn, reason }) => {
                    warn!(role = "backup", epoch, conn = ?conn, %reason, "connection unprotected")
                }
                Err(error) => {
                    error!(role = "backup", epoch, peer = %peer, seq = rec.seq, %error,
                        "the replica refused a record; leaving the link (a new join starts over)");
                    failed = Some(ReplicaEnd::Refused { seq: rec.seq, error });
                    break;
                }
            }
            update.applied = rec.seq;
            update.records += 1;
            if update.records.is_multiple_of(REPORT_EVERY) {
                // A long batch (a backup behind its primary) still lets the link's ack-every bound work.
                link.applied(rec.seq);
            }
            if matches!(rec.msg, Message::SnapshotEnd) {
                // Acknowledged before the rest of the batch (the stream that queued up behind a large
                // snapshot): the primary counts the pair protected from this ack on.
                link.applied(rec.seq);
                update.synced = true;
                let connections = lock(&table).len();
                info!(role = "backup", epoch, peer = %peer, seq = rec.seq, connections, "snapshot applied: replica synced");
            }
            if matches!(rec.msg, Message::Handover) {
                update.handover = true;
                info!(role = "backup", epoch, peer = %peer, seq = rec.seq, "the primary hands over: taking over");
                link.confirm_handover(rec.seq, repl_listen);
            }
        }
        batch.clear();
        if update.records > 0 {
            // Only now may the primary count them as held.
            link.applied(update.applied);
            // Receivers wake only for what they wait on; the counters are read with `borrow`.
            progress.send_if_modified(|p| {
                let news = (update.synced && !p.synced) || (update.handover && !p.handover);
                p.applied = update.applied;
                p.records += update.records;
                p.synced |= update.synced;
                p.last_record_at = Some(now);
                p.handover |= update.handover;
                news
            });
        }
        if let Some(end) = failed {
            break 'follow end;
        }
    };
    match &end {
        ReplicaEnd::Closed => info!(role = "backup", epoch, peer = %peer, "stopped following the primary"),
        other => warn!(role = "backup", epoch, peer = %peer, reason = %other, "lost the primary's stream"),
    }
    // Dropping the link (if still held) closes it; what was applied was acknowledged.
    progress.send_modify(|p| p.ended = Some(end));
}

fn message_kind(msg: &Message) -> &'static str {
    match msg {
        Message::Segment { .. } => "Segment",
        Message::Reply { .. } => "Reply",
        Message::ExchangeStart(_) => "ExchangeStart",
        Message::Upstream { .. } => "Upstream",
        Message::ExchangeEnd { .. } => "ExchangeEnd",
        Message::ConnClosed { .. } => "ConnClosed",
        Message::SnapshotBegin { .. } => "SnapshotBegin",
        Message::SnapshotConn { .. } => "SnapshotConn",
        Message::SnapshotEnd => "SnapshotEnd",
        Message::Ping => "Ping",
        Message::Handover => "Handover",
    }
}

/// Locks the table. Nothing panics while holding it, so a poisoned lock still holds a consistent table.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::link::{PrimaryLink, accept};
    use shared::protocol::{ConnKey, Role};
    use std::num::NonZeroU64;

    const PROMPT: Duration = Duration::from_secs(5);

    /// A primary's link and a replica joined to it over an in-memory pipe.
    async fn pair() -> (PrimaryLink, Replica) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let cfg = LinkConfig::default();
        let primary = LocalIdentity::new("c", "p", Role::Primary, 2);
        let backup = LocalIdentity::new("c", "b", Role::Backup, 1);
        let (accepted, joined) = tokio::join!(accept(a, &primary, &cfg), link::join(b, &backup, &cfg));
        let link = accepted.expect("accept").start(NonZeroU64::new(1).expect("nonzero"));
        (link, Replica::start(joined.expect("join"), 1, SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 7700)))
    }

    fn nowhere() -> Message {
        let addr = "0.0.0.0:0".parse().expect("address");
        Message::ConnClosed { conn: ConnKey { client: addr, server: addr } }
    }

    // Multi-threaded: holding the table blocks the apply loop's thread, as a stalled backup would.
    // Holding it across awaits is the point.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_are_acknowledged_only_once_applied_and_the_snapshot_end_syncs() {
        let (link, replica) = pair().await;
        link.send(Message::SnapshotBegin { connections: 0 }).await.expect("send");
        link.send(Message::SnapshotEnd).await.expect("send");
        tokio::time::timeout(PROMPT, link.wait_acked(2)).await.expect("acked in time").expect("link up");
        assert!(replica.is_synced());
        let table = replica.table();
        let held = lock(&table);
        link.send(nowhere()).await.expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*link.acked().borrow(), 2, "a record the replica has not applied is not acknowledged");
        drop(held);
        tokio::time::timeout(PROMPT, link.wait_acked(3)).await.expect("acked in time").expect("link up");
        assert_eq!(replica.progress().borrow().applied, 3);
        let table = replica.stop().await;
        assert!(table.is_empty() && table.epoch() == 2, "{table:?}");
    }

    #[tokio::test]
    async fn stream_without_a_snapshot_is_not_a_join() {
        let (link, replica) = pair().await;
        link.send(nowhere()).await.expect("send");
        let end = tokio::time::timeout(PROMPT, replica.lost()).await.expect("ends in time");
        assert_eq!(end, ReplicaEnd::NotAJoin { first: "ConnClosed".into() });
        assert_eq!(*link.acked().borrow(), 0);
    }

    #[tokio::test]
    async fn refused_record_ends_the_replica_unacknowledged() {
        let (link, replica) = pair().await;
        link.send(Message::SnapshotBegin { connections: 0 }).await.expect("send");
        link.send(Message::SnapshotEnd).await.expect("send");
        link.send(Message::SnapshotEnd).await.expect("send");
        let end = tokio::time::timeout(PROMPT, replica.lost()).await.expect("ends in time");
        assert!(matches!(end, ReplicaEnd::Refused { seq: 3, error: ApplyError::Snapshot(_) }), "{end:?}");
        assert!(*link.acked().borrow() <= 2);
    }

    #[tokio::test]
    async fn primary_closing_the_link_is_reported_as_lost() {
        let (link, replica) = pair().await;
        link.send(Message::SnapshotBegin { connections: 0 }).await.expect("send");
        link.send(Message::SnapshotEnd).await.expect("send");
        link.close().await.expect("close");
        let end = tokio::time::timeout(PROMPT, replica.lost()).await.expect("ends in time");
        assert!(matches!(end, ReplicaEnd::LinkLost(_)), "{end:?}");
        assert_eq!(replica.progress().borrow().applied, 2, "what came before the close was applied");
    }
}
