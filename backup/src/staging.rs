//! Staging (ARCHITECTURE.md "Takeover (backup)", step 5): while this node is the standby, the sockets of
//! the replica's idle connections are rebuilt ahead of a takeover and kept in repair mode, where they send
//! nothing ([`tcp_replay::repair::stage`]; bound to the VIP with `IP_TRANSPARENT`, so the address need not be
//! here). A takeover then only takes each out of repair mode, three system calls instead of a score: at
//! scale most connections are idle keep-alive ones, and rebuilding ten thousand of them was most of the
//! takeover's restore (150-200 ms on two cores).
//!
//! A [`Stager`] thread surveys the table every [`SURVEY_EVERY`]. A connection at rest (nothing in flight,
//! open both ways, nothing unread) whose plan has not moved since the previous survey gets a socket; a
//! staged socket whose connection moved, ended or left the table is dropped, which closes it silently (it
//! is in repair mode). The staging never decides what a takeover restores, only how fast: the takeover
//! uses a staged socket only if it fits the plan it restores ([`Staged::fits`]), and rebuilds the others.
//!
//! The thread runs at a lower priority (nice [`NICE`]): background work on a host that may be busy.

use crate::replica::Progress;
use shared::protocol::ConnKey;
use shared::replica::ReplicaTable;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tcp_replay::repair::{self, RepairError, Staged};
use tcp_replay::{RestorePlan, Seq, TcpState};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How often the stager looks at the table. A connection is staged after it stayed at rest for one
/// interval, so a keep-alive connection between two requests close together is not staged in vain.
pub const SURVEY_EVERY: Duration = Duration::from_millis(250);

/// Connections whose plans a survey makes per hold of the table's lock (the apply loop waits meanwhile).
const SURVEY_CHUNK: usize = 512;

/// Rounds that stage at least this many sockets are logged at info (a join's table, a burst gone idle).
const LOG_FROM: usize = 100;

/// The stager's nice value.
const NICE: libc::c_int = 10;

/// Sockets staged for a takeover, by connection.
#[derive(Debug, Default)]
pub struct StagedSockets {
    sockets: Mutex<HashMap<ConnKey, Staged>>,
}

impl StagedSockets {
    /// How many are staged.
    pub fn len(&self) -> usize {
        lock(&self.sockets).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a socket is staged for `key` and fits `plan` ([`Staged::fits`]).
    pub fn fits(&self, key: &ConnKey, plan: &RestorePlan) -> bool {
        lock(&self.sockets).get(key).is_some_and(|s| s.fits(plan))
    }

    /// Takes the socket staged for `key`. Whoever restores a connection takes its staged socket first:
    /// one that does not fit must be dropped before the connection is rebuilt (they share the four-tuple).
    pub fn take(&self, key: &ConnKey) -> Option<Staged> {
        lock(&self.sockets).remove(key)
    }

    /// Closes, silently, every socket still staged (connections the takeover did not restore); how many.
    pub fn discard(&self) -> usize {
        let all = std::mem::take(&mut *lock(&self.sockets));
        all.len()
    }
}

/// The staging thread of a standby's replica (see the module's docs).
pub struct Stager {
    stop: Arc<AtomicBool>,
    wake: std::sync::mpsc::Sender<()>,
    staged: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<HashMap<ConnKey, Staged>>>,
}

impl Stager {
    /// Starts staging the idle connections of `table` once `progress` says the replica is synced. `None`
    /// if the thread cannot start (logged): takeovers rebuild every socket then.
    pub fn start(table: Arc<Mutex<ReplicaTable>>, progress: watch::Receiver<Progress>) -> Option<Stager> {
        let stop = Arc::new(AtomicBool::new(false));
        let staged = Arc::new(AtomicUsize::new(0));
        let (wake, woken) = std::sync::mpsc::channel();
        let (s, n) = (stop.clone(), staged.clone());
        let span = tracing::Span::current();
        let spawned = std::thread::Builder::new().name("stager".into()).spawn(move || {
            let _span = span.enter();
            // SAFETY: setpriority on this thread's own id (Linux applies nice per thread).
            unsafe {
                let tid = libc::gettid() as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, NICE);
            }
            let mut stager =
                Staging { table, progress, stop: s, staged: n, sockets: HashMap::new(), marks: HashMap::new() };
            while !stager.stopped() {
                stager.round();
                match woken.recv_timeout(SURVEY_EVERY) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            }
            stager.sockets
        });
        match spawned {
            Ok(thread) => Some(Stager { stop, wake, staged, thread: Some(thread) }),
            Err(e) => {
                warn!(error = %e, "cannot start the staging thread; a takeover rebuilds every socket");
                None
            }
        }
    }

    /// How many sockets are staged now, for `/status`.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        self.staged.clone()
    }

    /// Stops the thread (within one socket's staging) and hands over what it staged.
    pub fn stop(mut self) -> StagedSockets {
        StagedSockets { sockets: Mutex::new(self.halt()) }
    }

    fn halt(&mut self) -> HashMap<ConnKey, Staged> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.send(());
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(sockets)) => sockets,
            Some(Err(_)) => {
                warn!("the staging thread panicked; its sockets are closed");
                HashMap::new()
            }
            None => HashMap::new(),
        }
    }
}

impl Drop for Stager {
    /// A standby that stops, or rejoins with a new replica, closes what it staged (silently).
    fn drop(&mut self) {
        if self.thread.is_some() {
            drop(self.halt());
        }
    }
}

/// What identifies where a connection at rest stands: when it changes, the connection moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    snd_una: Seq,
    rcv_nxt: Seq,
    snd_wnd: u32,
    rcv_wnd: u32,
}

impl Mark {
    fn of(plan: &RestorePlan) -> Mark {
        Mark {
            snd_una: plan.snd_una,
            rcv_nxt: plan.rcv_nxt,
            snd_wnd: plan.window.snd_wnd,
            rcv_wnd: plan.window.rcv_wnd,
        }
    }
}

/// The plan of `conn` if it can be staged: at rest, ESTABLISHED, nothing queued either way.
fn stageable(conn: &shared::replica::table::Conn, now: Duration) -> Option<RestorePlan> {
    let tracker = conn.tracked()?.tracker();
    if !tracker.at_rest() {
        return None;
    }
    let plan = tracker.restore_plan_in_place(now).ok()?;
    let idle = plan.state == TcpState::Established && plan.recv_queue.is_empty() && repair::restores_silently(&plan);
    idle.then_some(plan)
}

/// What a survey found for one connection.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Its staged socket fits: nothing to do.
    Keep,
    /// Stage it (its staged socket, if any, no longer fits).
    Stage,
    /// It moved since the last survey: drop its staged socket, if any, and wait for it to settle.
    Wait,
}

/// The survey's rule for a connection at rest: `fits` whether its staged socket (if any) fits, `mark` where
/// it stands now and `before` where it stood at the previous survey.
fn verdict(fits: Option<bool>, mark: Mark, before: Option<Mark>) -> Verdict {
    match fits {
        Some(true) => Verdict::Keep,
        _ if before == Some(mark) => Verdict::Stage,
        _ => Verdict::Wait,
    }
}

/// The stager thread's state.
struct Staging {
    table: Arc<Mutex<ReplicaTable>>,
    progress: watch::Receiver<Progress>,
    stop: Arc<AtomicBool>,
    staged: Arc<AtomicUsize>,
    sockets: HashMap<ConnKey, Staged>,
    /// Where each connection at rest stood at the previous survey.
    marks: HashMap<ConnKey, Mark>,
}

impl Staging {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// One survey, then the staging it asks for.
    fn round(&mut self) {
        if !self.progress.borrow().synced {
            return;
        }
        let started = Instant::now();
        let now = crate::takeover::stream_now();
        let keys: Vec<ConnKey> = lock(&self.table).conns().map(|c| c.key()).collect();
        let mut marks = HashMap::with_capacity(self.marks.len());
        let mut to_stage = Vec::new();
        let mut dropped = 0usize;
        for chunk in keys.chunks(SURVEY_CHUNK) {
            if self.stopped() {
                return;
            }
            let table = lock(&self.table);
            for key in chunk {
                let Some(plan) = table.conn(key).and_then(|c| stageable(c, now)) else { continue };
                let mark = Mark::of(&plan);
                let fits = self.sockets.get(key).map(|s| s.fits(&plan));
                if fits == Some(false) {
                    self.sockets.remove(key);
                    dropped += 1;
                }
                if verdict(fits, mark, self.marks.get(key).copied()) == Verdict::Stage {
                    to_stage.push(plan);
                }
                marks.insert(*key, mark);
            }
        }
        // Connections no longer at rest, or gone.
        let before = self.sockets.len();
        self.sockets.retain(|k, _| marks.contains_key(k));
        dropped += before - self.sockets.len();
        self.marks = marks;
        let surveyed = started.elapsed();

        let (mut made, mut failed) = (0usize, 0usize);
        for mut plan in to_stage {
            if self.stopped() {
                break;
            }
            // The plan's timestamp clock is the primary's at `now`; the socket's runs on from the value it
            // is given, so it gets the primary's clock at this moment (or it would fit no later plan).
            let since = crate::takeover::stream_now().saturating_sub(now).as_millis() as u32;
            plan.tsval = plan.tsval.map(|v| v.wrapping_add(since));
            match repair::stage(&plan) {
                Ok(staged) => {
                    let _ = staged.set_nodelay(true);
                    self.sockets.insert(ConnKey { client: plan.remote, server: plan.local }, staged);
                    made += 1;
                }
                Err(e) => {
                    failed += 1;
                    if failed == 1 {
                        warn!(conn = %plan.remote, error = %e, "cannot stage a connection's socket; a takeover rebuilds it");
                    }
                    if matches!(e, RepairError::Syscall { step: "socket", .. } | RepairError::NotPermitted { .. }) {
                        // Out of descriptors, or no privilege: the rest would fail alike.
                        break;
                    }
                }
            }
        }
        self.staged.store(self.sockets.len(), Ordering::Relaxed);
        if made + dropped + failed > 0 {
            debug!(staged = self.sockets.len(), made, dropped, failed, ?surveyed, took = ?started.elapsed(), "staging round");
        }
        if made >= LOG_FROM {
            info!(staged = self.sockets.len(), made, took = ?started.elapsed(), "staged idle connections' sockets for a takeover");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_staged_once_it_stayed_put_for_a_survey() {
        let at = |n: u32| Mark { snd_una: Seq(n), rcv_nxt: Seq(7), snd_wnd: 1000, rcv_wnd: 1000 };
        // First seen: wait a survey.
        assert_eq!(verdict(None, at(1), None), Verdict::Wait);
        // Still there: stage.
        assert_eq!(verdict(None, at(1), Some(at(1))), Verdict::Stage);
        // Staged and unchanged: keep.
        assert_eq!(verdict(Some(true), at(1), Some(at(1))), Verdict::Keep);
        // It answered a request since: its socket goes, and it waits to settle again.
        assert_eq!(verdict(Some(false), at(2), Some(at(1))), Verdict::Wait);
        // Its socket no longer fits though it did not move (its timestamp clock fell behind): restage.
        assert_eq!(verdict(Some(false), at(1), Some(at(1))), Verdict::Stage);
    }
}
