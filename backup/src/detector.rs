//! The backup's failure detector and takeover policy (ARCHITECTURE.md "Takeover (backup)" steps 1 and 2,
//! invariant 4 "fence before takeover"). Pure logic in the quinn-proto style: no clock, no socket, no task.
//!
//! # Call order
//!
//! A thin driver owns the replication link's reader, a timer, the ARP probe and the operator's fence command:
//!
//! 1. [`Detector::new`] when the link's handshake completes (that counts as hearing the primary).
//! 2. For every frame from the primary, [`handle_heartbeat`](Detector::handle_heartbeat) or
//!    [`handle_record`](Detector::handle_record); [`handle_reading_paused`](Detector::handle_reading_paused)
//!    when the link stops or resumes reading because this node's own queue is full
//!    (`PeerLiveness::reading_paused`); [`handle_link_down`](Detector::handle_link_down) when the link ends.
//! 3. Arm the timer at [`poll_timeout`](Detector::poll_timeout) after every call; when it fires, first drain
//!    whatever input is ready, then call [`handle_timeout`](Detector::handle_timeout).
//! 4. After every call, drain [`poll_action`](Detector::poll_action):
//!    * [`Action::Suspect`]: log it (once per episode of silence or link loss).
//!    * [`Action::Fence`]: probe the VIP with ARP on the client network; if nobody answered and a fence
//!      command is configured, run it; report both with
//!      [`handle_fence_result`](Detector::handle_fence_result).
//!    * [`Action::Recovered`]: the primary spoke again while fencing; abandon the probe.
//!    * [`Action::StandDown`]: raise the alarm; do not take over. The detector keeps watching.
//!    * [`Action::TakeOver`]: hold, claim, restore (steps 3 to 7). The detector is finished; complete the
//!      [`FailoverRecord`] with [`FailoverRecord::restored`] for `/status`.
//!
//! # Never fail over on a healthy but busy pair
//!
//! * Any frame from the primary counts as life, records as much as heartbeats, so a primary whose heartbeat
//!   is queued behind a burst of records is still heard. Heartbeats are sent on their own timer, so a busy
//!   proxy does not delay them either.
//! * Suspicion needs `misses × heartbeat_interval` of silence with no frame at all; a heartbeat that is late
//!   but arrives before that resets the count (jitter never triggers).
//! * Silence while this node's own link reader is paused (its queue full) says nothing about the primary:
//!   the frames wait in this node's socket buffer. The silence timer stops while paused and restarts on
//!   resume.
//! * If the timer fires late by a heartbeat interval or more, this node itself was starved (a loaded host):
//!   frames may be waiting unread. The detector then grants one more interval for them to be read before it
//!   suspects. Drivers must still read ready input before they call `handle_timeout`.
//! * While the replica is still syncing, silence must last [`SYNCING_SILENCE_FACTOR`] detection times
//!   (a broken link is still immediate suspicion): see [`Detector::joining`].
//! * Suspicion alone never takes over: the ARP fence must find the VIP unanswered (a live primary's process
//!   answers ARP for it), and the operator's command, if configured, must succeed.
//!
//! A broken link is immediate suspicion: a killed primary's kernel resets the connection, and waiting for
//! silence would only add the detection time to the takeover. A link broken while the primary lives (a
//! corrupt frame, a middlebox reset) is caught by the fence.
//!
//! # After a stand-down
//!
//! The detector keeps watching. If the primary is heard again, everything resets. If it stays silent (or
//! the link stays down), the detector suspects again after [`DetectorConfig::recheck_interval`] and fences
//! again, so that a primary that dies after a partition is still taken over from, and alarms are not raised
//! every detection period.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use shared::config::NodeConfig;
use shared::vip::{ArpError, Mac, ProbeOutcome};

/// ARP probe runs that may fail with an error before the detector gives up and alarms.
pub const DEFAULT_FENCE_ATTEMPTS: u32 = 3;
/// After a stand-down, the least time before a still-silent primary is suspected and fenced again.
pub const DEFAULT_RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// While the replica is still syncing (a join's snapshot on its way), silence must last this many
/// detection times before suspicion. The primary is then at its busiest (building and sending the
/// snapshot, its heartbeats queued behind it), a takeover would restore nothing, and a fence that fails
/// open against a starved but live primary would reset every connection it serves. Mirrors the
/// primary's patience with a syncing backup (`primary::replicate::SYNCING_SILENCE_LEASES`).
pub const SYNCING_SILENCE_FACTOR: u32 = 8;

/// How the detector judges silence and fences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Time between the primary's heartbeats (`detection.heartbeat_interval`).
    pub heartbeat_interval: Duration,
    /// Intervals of silence before suspicion (`detection.misses`).
    pub misses: u32,
    /// Whether an operator fence command is configured (`fencing.command`): then it must succeed too.
    pub fence_command: bool,
    /// ARP probe runs tried when they fail with an error, before standing down with an alarm.
    pub fence_attempts: u32,
    /// Wait between a failed probe run and the next.
    pub fence_retry_delay: Duration,
    /// After a stand-down, the least time before fencing a still-silent primary again.
    pub recheck_interval: Duration,
}

impl DetectorConfig {
    /// `misses` heartbeats of `heartbeat_interval`, no fence command, and the default retry and recheck
    /// policy (retries one heartbeat interval apart).
    pub fn new(heartbeat_interval: Duration, misses: u32) -> Self {
        DetectorConfig {
            heartbeat_interval,
            misses,
            fence_command: false,
            fence_attempts: DEFAULT_FENCE_ATTEMPTS,
            fence_retry_delay: heartbeat_interval,
            recheck_interval: DEFAULT_RECHECK_INTERVAL,
        }
    }

    /// The node's `[detection]` and `[fencing]` settings with the default retry and recheck policy.
    pub fn from_node(config: &NodeConfig) -> Self {
        DetectorConfig {
            fence_command: config.fencing.command.is_some(),
            ..DetectorConfig::new(config.detection.heartbeat_interval, config.detection.misses)
        }
    }

    /// Interval × misses: the silence after which the primary is suspected.
    pub fn detection_time(&self) -> Duration {
        self.heartbeat_interval.saturating_mul(self.misses)
    }

    fn validate(&self) -> Result<(), DetectorConfigError> {
        if self.heartbeat_interval.is_zero() {
            return Err(DetectorConfigError::ZeroInterval);
        }
        if self.misses == 0 {
            return Err(DetectorConfigError::ZeroMisses);
        }
        if self.fence_attempts == 0 {
            return Err(DetectorConfigError::ZeroFenceAttempts);
        }
        if self.recheck_interval.is_zero() {
            return Err(DetectorConfigError::ZeroRecheck);
        }
        Ok(())
    }
}

/// Why a [`DetectorConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectorConfigError {
    /// A zero heartbeat interval would make any instant a detection deadline.
    #[error("heartbeat interval must be above zero")]
    ZeroInterval,
    /// Zero misses would suspect the primary the moment it was heard.
    #[error("heartbeat misses must be at least 1")]
    ZeroMisses,
    /// Zero attempts would give up fencing before probing once.
    #[error("fence attempts must be at least 1")]
    ZeroFenceAttempts,
    /// A zero recheck interval would fence a partitioned live primary in a tight loop.
    #[error("recheck interval must be above zero")]
    ZeroRecheck,
}

/// What made the detector suspect the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuspectReason {
    /// No frame for the detection time.
    Silence,
    /// The replication link ended; `reason` is the link's error, for the log.
    LinkDown { reason: String },
}

impl fmt::Display for SuspectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuspectReason::Silence => f.write_str("silence"),
            SuspectReason::LinkDown { reason } => write!(f, "link down: {reason}"),
        }
    }
}

/// What the ARP probe of the VIP found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceResult {
    /// A node answered for the VIP: the primary's process is alive.
    Answered { mac: Mac },
    /// Another node probed the VIP at the same time (the primary whose lease ran out, or a spare).
    Contested { mac: Mac },
    /// Nobody answered within the probe's timeout.
    Unanswered,
    /// The probe could not be made (interface down, socket error). Never read as unanswered.
    Error(String),
}

impl From<&Result<ProbeOutcome, ArpError>> for FenceResult {
    fn from(result: &Result<ProbeOutcome, ArpError>) -> Self {
        match result {
            Ok(ProbeOutcome::Answered { mac, .. }) => FenceResult::Answered { mac: *mac },
            Ok(ProbeOutcome::Contested { mac, .. }) => FenceResult::Contested { mac: *mac },
            Ok(ProbeOutcome::Unanswered { .. }) => FenceResult::Unanswered,
            Err(e) => FenceResult::Error(e.to_string()),
        }
    }
}

/// Why the backup did not take over. Every alarm needs an operator's attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alarm {
    /// The primary's process answered ARP for the VIP: it serves, though the link says otherwise.
    PrimaryAnswered { mac: Mac },
    /// Another node probed the VIP while this one did.
    Contested { mac: Mac },
    /// The operator's fence command failed or timed out.
    FenceCommandFailed,
    /// Every ARP probe run failed with an error; `error` is the last one.
    FenceFailed { attempts: u32, error: String },
}

impl fmt::Display for Alarm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alarm::PrimaryAnswered { mac } => write!(f, "the primary ({mac}) still answers for the VIP"),
            Alarm::Contested { mac } => write!(f, "{mac} probed the VIP at the same time"),
            Alarm::FenceCommandFailed => f.write_str("the fence command did not confirm the primary is fenced"),
            Alarm::FenceFailed { attempts, error } => {
                write!(f, "the ARP probe failed {attempts} times, last: {error}")
            }
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The primary is suspected: last heard at `since`, silent for `silent_for` when suspected. Emitted once
    /// per episode; an [`Action::Fence`] follows.
    Suspect { since: Instant, silent_for: Duration, reason: SuspectReason },
    /// Probe the VIP (and run the fence command if the probe is unanswered), then call
    /// [`Detector::handle_fence_result`]. `attempt` counts from 1 within the episode.
    Fence { attempt: u32 },
    /// The primary was heard while fencing, after `silent_for` of silence: abandon the probe.
    Recovered { silent_for: Duration },
    /// Do not take over; alarm. The detector keeps watching.
    StandDown { alarm: Alarm },
    /// The primary is fenced: take over. The record holds detection and fencing times.
    TakeOver { record: FailoverRecord },
}

/// Why [`Detector::handle_fence_result`] refused its input. The detector's state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceResultError {
    /// No [`Action::Fence`] is outstanding (the primary was heard meanwhile, or the result came twice).
    #[error("no fence is outstanding")]
    NotFencing,
    /// The probe went unanswered and a fence command is configured, but its result was not given.
    #[error("a fence command is configured but its result is missing")]
    CommandResultMissing,
    /// A command result was given, but no fence command is configured.
    #[error("a fence command result was given but none is configured")]
    CommandNotConfigured,
}

/// The reason of a takeover the primary asked for.
pub const PLANNED_SWITCHOVER: &str = "planned switchover";

/// One takeover, for `/status`'s `failovers` list. Times serialize as milliseconds (`detection_ms`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailoverRecord {
    /// Why the primary was suspected ("silence", "link down: ...").
    pub reason: String,
    /// ARP probe runs it took (more than 1 when runs failed with errors).
    pub fence_attempts: u32,
    /// From the primary's last frame to suspicion.
    #[serde(rename = "detection_ms", serialize_with = "millis")]
    pub detection: Duration,
    /// From suspicion to the fence passing.
    #[serde(rename = "fencing_ms", serialize_with = "millis")]
    pub fencing: Duration,
    /// From the fence passing to every connection restored (set by [`FailoverRecord::restored`]).
    #[serde(rename = "restore_ms", serialize_with = "opt_millis")]
    pub restore: Option<Duration>,
    /// From the primary's last frame to serving again (set by [`FailoverRecord::restored`]).
    #[serde(rename = "total_ms", serialize_with = "opt_millis")]
    pub total: Option<Duration>,
    /// Connections restored.
    pub connections: Option<u64>,
    /// A fence found the primary alive after it was last heard (it answered or probed the VIP): it has
    /// since given this node up and served on without it, so the replica no longer matches its
    /// connections and must not be restored.
    #[serde(skip)]
    pub replica_stale: bool,
    #[serde(skip)]
    last_heard: Instant,
    #[serde(skip)]
    fenced_at: Instant,
}

impl FailoverRecord {
    /// A planned switchover: the primary handed over at `now` (no detection, no fence).
    pub fn handover(now: Instant) -> FailoverRecord {
        FailoverRecord {
            reason: PLANNED_SWITCHOVER.into(),
            fence_attempts: 0,
            detection: Duration::ZERO,
            fencing: Duration::ZERO,
            restore: None,
            total: None,
            connections: None,
            replica_stale: false,
            last_heard: now,
            fenced_at: now,
        }
    }

    /// Every connection was restored and the node serves at `now`: sets the restore and total times.
    pub fn restored(&mut self, now: Instant, connections: u64) {
        self.restore = Some(now.saturating_duration_since(self.fenced_at));
        self.total = Some(now.saturating_duration_since(self.last_heard));
        self.connections = Some(connections);
    }

    /// When the primary was last heard.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// When the fence passed.
    pub fn fenced_at(&self) -> Instant {
        self.fenced_at
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

fn opt_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

/// Where the detector stands, for `/status` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Hearing the primary, or silent for less than the detection time.
    Watching,
    /// Suspecting the primary; a fence is outstanding or will be retried.
    Fencing,
    /// The fence passed; this node takes over. Final.
    TakenOver,
}

#[derive(Debug, Clone)]
struct Fencing {
    reason: SuspectReason,
    suspected_at: Instant,
    attempt: u32,
    /// An [`Action::Fence`] awaits its result.
    outstanding: bool,
    /// A failed run is retried at this time.
    retry_at: Option<Instant>,
}

#[derive(Debug, Clone)]
enum State {
    Watching,
    Fencing(Fencing),
    TakenOver,
}

/// The backup's failure detector and takeover policy for one replication link. See the module documentation
/// for the call order.
#[derive(Debug, Clone)]
pub struct Detector {
    config: DetectorConfig,
    state: State,
    /// When the primary was last heard.
    last_heard: Instant,
    /// Whether the replica holds the primary's whole state (see [`Detector::joining`]).
    synced: bool,
    /// Start of the silence being timed: `last_heard`, or later when this node's reader was paused.
    silence_from: Instant,
    reading_paused: bool,
    /// The link's error once it ended.
    link_down: Option<String>,
    /// After a stand-down: no new suspicion before this.
    recheck_at: Option<Instant>,
    /// A late wake's extra interval, granted once per silence.
    grace_until: Option<Instant>,
    grace_used: bool,
    /// A fence found the primary alive since it was last heard (see [`FailoverRecord::replica_stale`]).
    primary_seen_alive: bool,
    actions: VecDeque<Action>,
    heartbeats: u64,
    records: u64,
    suspicions: u64,
    stand_downs: u64,
}

impl Detector {
    /// A detector for a synced replica whose primary was heard at `now`.
    pub fn new(config: DetectorConfig, now: Instant) -> Result<Detector, DetectorConfigError> {
        config.validate()?;
        Ok(Detector {
            config,
            state: State::Watching,
            last_heard: now,
            synced: true,
            silence_from: now,
            reading_paused: false,
            link_down: None,
            recheck_at: None,
            grace_until: None,
            grace_used: false,
            primary_seen_alive: false,
            actions: VecDeque::new(),
            heartbeats: 0,
            records: 0,
            suspicions: 0,
            stand_downs: 0,
        })
    }

    /// A detector for a replica that has just joined (the handshake ended at `now`) and is not synced
    /// yet: until [`handle_synced`](Self::handle_synced), silence is suspected only after
    /// [`SYNCING_SILENCE_FACTOR`] detection times.
    pub fn joining(config: DetectorConfig, now: Instant) -> Result<Detector, DetectorConfigError> {
        Ok(Detector { synced: false, ..Detector::new(config, now)? })
    }

    /// The replica caught up with the primary: from now on the normal detection time applies.
    pub fn handle_synced(&mut self) {
        self.synced = true;
    }

    /// The silence after which the primary is suspected, now.
    pub fn suspicion_time(&self) -> Duration {
        let t = self.config.detection_time();
        if self.synced { t } else { t.saturating_mul(SYNCING_SILENCE_FACTOR) }
    }

    /// A heartbeat from the primary arrived at `now`.
    pub fn handle_heartbeat(&mut self, now: Instant) {
        self.heartbeats += 1;
        self.heard(now);
    }

    /// A record (or any other frame) from the primary arrived at `now`.
    pub fn handle_record(&mut self, now: Instant) {
        self.records += 1;
        self.heard(now);
    }

    /// The link stopped (`true`) or resumed (`false`) reading because this node's queue is full. Silence
    /// is not timed while paused.
    pub fn handle_reading_paused(&mut self, now: Instant, paused: bool) {
        if paused == self.reading_paused {
            return;
        }
        self.reading_paused = paused;
        if !paused {
            self.silence_from = self.silence_from.max(now);
        }
    }

    /// The replication link ended at `now` for `reason`: immediate suspicion, unless already fencing or
    /// already known.
    pub fn handle_link_down(&mut self, now: Instant, reason: impl Into<String>) {
        if matches!(self.state, State::TakenOver) || self.link_down.is_some() {
            return;
        }
        let reason = reason.into();
        self.link_down = Some(reason.clone());
        if matches!(self.state, State::Watching) {
            self.suspect(now, SuspectReason::LinkDown { reason });
        }
    }

    /// The timer armed at [`poll_timeout`](Self::poll_timeout) fired (or any time: an early call does
    /// nothing).
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Watching => {
                let Some(deadline) = self.deadline() else { return };
                if now < deadline {
                    return;
                }
                let late_wake = now.saturating_duration_since(deadline) >= self.config.heartbeat_interval;
                if late_wake && !self.grace_used && self.link_down.is_none() {
                    // This node was starved: frames may wait unread. Give them one interval.
                    self.grace_used = true;
                    self.grace_until = Some(now + self.config.heartbeat_interval);
                    return;
                }
                let reason = match &self.link_down {
                    Some(reason) => SuspectReason::LinkDown { reason: reason.clone() },
                    None => SuspectReason::Silence,
                };
                self.suspect(now, reason);
            }
            State::Fencing(f) => {
                if f.retry_at.is_some_and(|at| now >= at) {
                    f.retry_at = None;
                    f.attempt += 1;
                    f.outstanding = true;
                    self.actions.push_back(Action::Fence { attempt: f.attempt });
                }
            }
            State::TakenOver => {}
        }
    }

    /// The outcome of the outstanding [`Action::Fence`]: the ARP probe's `result`, and `command`, the fence
    /// command's success if one is configured and the probe went unanswered (`None` otherwise). Takes over
    /// only when the probe went unanswered and the command (if any) succeeded.
    pub fn handle_fence_result(
        &mut self,
        now: Instant,
        result: FenceResult,
        command: Option<bool>,
    ) -> Result<(), FenceResultError> {
        let State::Fencing(f) = &mut self.state else { return Err(FenceResultError::NotFencing) };
        if !f.outstanding {
            return Err(FenceResultError::NotFencing);
        }
        if result == FenceResult::Unanswered {
            match (self.config.fence_command, command) {
                (true, None) => return Err(FenceResultError::CommandResultMissing),
                (false, Some(_)) => return Err(FenceResultError::CommandNotConfigured),
                _ => {}
            }
        }
        f.outstanding = false;
        if matches!(result, FenceResult::Error(_)) && f.attempt < self.config.fence_attempts {
            f.retry_at = Some(now + self.config.fence_retry_delay);
            return Ok(());
        }
        let (attempt, suspected_at, reason) = (f.attempt, f.suspected_at, f.reason.to_string());
        match result {
            FenceResult::Answered { mac } => self.stand_down(now, Alarm::PrimaryAnswered { mac }),
            FenceResult::Contested { mac } => self.stand_down(now, Alarm::Contested { mac }),
            FenceResult::Error(error) => self.stand_down(now, Alarm::FenceFailed { attempts: attempt, error }),
            FenceResult::Unanswered if command == Some(false) => self.stand_down(now, Alarm::FenceCommandFailed),
            FenceResult::Unanswered => {
                let record = FailoverRecord {
                    reason,
                    fence_attempts: attempt,
                    detection: suspected_at.saturating_duration_since(self.last_heard),
                    fencing: now.saturating_duration_since(suspected_at),
                    restore: None,
                    total: None,
                    connections: None,
                    replica_stale: self.primary_seen_alive,
                    last_heard: self.last_heard,
                    fenced_at: now,
                };
                self.state = State::TakenOver;
                self.actions.push_back(Action::TakeOver { record });
            }
        }
        Ok(())
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, if a timer is needed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Watching => self.deadline(),
            State::Fencing(f) => f.retry_at,
            State::TakenOver => None,
        }
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::Watching => Phase::Watching,
            State::Fencing(_) => Phase::Fencing,
            State::TakenOver => Phase::TakenOver,
        }
    }

    /// When the primary was last heard.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// How long the primary has been silent at `now`.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// Heartbeats, records, suspicions and stand-downs so far, for metrics.
    pub fn counts(&self) -> DetectorCounts {
        DetectorCounts {
            heartbeats: self.heartbeats,
            records: self.records,
            suspicions: self.suspicions,
            stand_downs: self.stand_downs,
        }
    }

    fn heard(&mut self, now: Instant) {
        if matches!(self.state, State::TakenOver) {
            return;
        }
        let silent_for = now.saturating_duration_since(self.last_heard);
        self.last_heard = self.last_heard.max(now);
        self.silence_from = self.silence_from.max(now);
        self.link_down = None;
        self.recheck_at = None;
        self.grace_until = None;
        self.grace_used = false;
        self.primary_seen_alive = false;
        if matches!(self.state, State::Fencing(_)) {
            self.state = State::Watching;
            self.actions.push_back(Action::Recovered { silent_for });
        }
    }

    /// The instant silence (or a pending recheck) turns into suspicion, when the silence is being timed.
    fn deadline(&self) -> Option<Instant> {
        if self.reading_paused && self.link_down.is_none() {
            return None;
        }
        let silence = self.silence_from + self.suspicion_time();
        Some(silence.max(self.recheck_at.unwrap_or(silence)).max(self.grace_until.unwrap_or(silence)))
    }

    fn suspect(&mut self, now: Instant, reason: SuspectReason) {
        self.suspicions += 1;
        self.recheck_at = None;
        self.grace_until = None;
        self.grace_used = false;
        self.actions.push_back(Action::Suspect {
            since: self.last_heard,
            silent_for: now.saturating_duration_since(self.last_heard),
            reason: reason.clone(),
        });
        self.actions.push_back(Action::Fence { attempt: 1 });
        self.state =
            State::Fencing(Fencing { reason, suspected_at: now, attempt: 1, outstanding: true, retry_at: None });
    }

    fn stand_down(&mut self, now: Instant, alarm: Alarm) {
        self.stand_downs += 1;
        // A failed probe or command says nothing about the primary; an answer or a rival probe does.
        self.primary_seen_alive |= matches!(alarm, Alarm::PrimaryAnswered { .. } | Alarm::Contested { .. });
        self.state = State::Watching;
        self.recheck_at = Some(now + self.config.recheck_interval);
        self.grace_until = None;
        self.grace_used = false;
        self.actions.push_back(Action::StandDown { alarm });
    }
}

/// Counters of a [`Detector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DetectorCounts {
    pub heartbeats: u64,
    pub records: u64,
    pub suspicions: u64,
    pub stand_downs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::Role;

    const MS: Duration = Duration::from_millis(1);

    fn mac(last: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, last])
    }

    /// 20 ms × 5 = 100 ms detection, no command.
    fn detector(t0: Instant) -> Detector {
        Detector::new(DetectorConfig::new(20 * MS, 5), t0).unwrap()
    }

    fn with_command(t0: Instant) -> Detector {
        Detector::new(DetectorConfig { fence_command: true, ..DetectorConfig::new(20 * MS, 5) }, t0).unwrap()
    }

    fn drain(d: &mut Detector) -> Vec<Action> {
        std::iter::from_fn(|| d.poll_action()).collect()
    }

    /// Silent from `t0`, fires the timer at the deadline, and checks the suspicion.
    fn suspect_by_silence(d: &mut Detector, t0: Instant) -> Instant {
        let at = d.poll_timeout().unwrap();
        d.handle_timeout(at);
        assert_eq!(
            drain(d),
            vec![
                Action::Suspect { since: t0, silent_for: at - t0, reason: SuspectReason::Silence },
                Action::Fence { attempt: 1 }
            ]
        );
        at
    }

    #[test]
    fn config_with_zeroes_is_refused() {
        let t0 = Instant::now();
        let base = DetectorConfig::new(20 * MS, 5);
        let err = |c: DetectorConfig| Detector::new(c, t0).unwrap_err();
        assert_eq!(err(DetectorConfig::new(Duration::ZERO, 5)), DetectorConfigError::ZeroInterval);
        assert_eq!(err(DetectorConfig::new(20 * MS, 0)), DetectorConfigError::ZeroMisses);
        assert_eq!(err(DetectorConfig { fence_attempts: 0, ..base.clone() }), DetectorConfigError::ZeroFenceAttempts);
        assert_eq!(err(DetectorConfig { recheck_interval: Duration::ZERO, ..base }), DetectorConfigError::ZeroRecheck);
    }

    #[test]
    fn config_from_node_takes_detection_and_fence_command() {
        let text = "vip = '10.0.0.100/24'\niface = 'eth0'\nrepl_listen = '10.1.0.3:7700'\njoin = '10.1.0.2:7700'\n\
                    upstream = 'http://10.2.0.10:8080'\n[detection]\nheartbeat_interval = '10ms'\nmisses = 8\n\
                    [fencing]\ncommand = ['/sbin/fence']\n";
        let node = NodeConfig::from_toml_str(Role::Backup, text).unwrap();
        let c = DetectorConfig::from_node(&node);
        assert_eq!((c.heartbeat_interval, c.misses, c.fence_command), (10 * MS, 8, true));
        assert_eq!(c.detection_time(), 80 * MS);
        assert_eq!(c.fence_retry_delay, 10 * MS);
        assert_eq!((c.fence_attempts, c.recheck_interval), (DEFAULT_FENCE_ATTEMPTS, DEFAULT_RECHECK_INTERVAL));
    }

    #[test]
    fn fresh_detector_times_silence_from_creation() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        assert_eq!(d.phase(), Phase::Watching);
        assert_eq!(d.poll_timeout(), Some(t0 + 100 * MS));
        d.handle_timeout(t0 + 99 * MS);
        assert_eq!(d.poll_action(), None);
        assert_eq!(suspect_by_silence(&mut d, t0), t0 + 100 * MS);
        assert_eq!(d.phase(), Phase::Fencing);
    }

    #[test]
    fn a_joining_replica_waits_longer_for_silence_but_not_for_a_broken_link() {
        let t0 = Instant::now();
        let config = DetectorConfig::new(20 * MS, 5);
        let mut d = Detector::joining(config.clone(), t0).unwrap();
        assert_eq!(d.suspicion_time(), 800 * MS);
        // A snapshot in flight: 100 ms of silence is not suspicious yet.
        d.handle_timeout(t0 + 100 * MS);
        assert_eq!(d.poll_action(), None);
        assert_eq!(d.poll_timeout(), Some(t0 + 800 * MS));
        d.handle_record(t0 + 700 * MS);
        assert_eq!(d.poll_timeout(), Some(t0 + 1500 * MS));
        // Synced: back to the normal detection time from the last frame.
        d.handle_synced();
        assert_eq!(d.poll_timeout(), Some(t0 + 800 * MS));
        let at = d.poll_timeout().unwrap();
        d.handle_timeout(at);
        assert!(matches!(
            drain(&mut d)[..],
            [Action::Suspect { reason: SuspectReason::Silence, .. }, Action::Fence { .. }]
        ));

        // Still joining, a broken link is suspected at once.
        let mut d = Detector::joining(config, t0).unwrap();
        d.handle_link_down(t0 + 10 * MS, "reset");
        assert!(matches!(
            drain(&mut d)[..],
            [Action::Suspect { reason: SuspectReason::LinkDown { .. }, .. }, Action::Fence { .. }]
        ));
    }

    #[test]
    fn heartbeat_and_record_both_reset_the_silence() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_heartbeat(t0 + 90 * MS);
        assert_eq!(d.poll_timeout(), Some(t0 + 190 * MS));
        d.handle_record(t0 + 180 * MS);
        assert_eq!(d.poll_timeout(), Some(t0 + 280 * MS));
        d.handle_timeout(t0 + 190 * MS);
        assert_eq!(d.poll_action(), None);
        assert_eq!(d.counts(), DetectorCounts { heartbeats: 1, records: 1, suspicions: 0, stand_downs: 0 });
        assert_eq!(d.silent_for(t0 + 200 * MS), 20 * MS);
    }

    #[test]
    fn out_of_order_timestamps_never_move_last_heard_back() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_heartbeat(t0 + 50 * MS);
        d.handle_record(t0 + 40 * MS);
        assert_eq!(d.last_heard(), t0 + 50 * MS);
        assert_eq!(d.poll_timeout(), Some(t0 + 150 * MS));
    }

    #[test]
    fn late_heartbeat_below_the_threshold_does_not_trigger() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        // Four heartbeats lost, the fifth arrives 1 ms before the deadline.
        d.handle_heartbeat(t0 + 99 * MS);
        d.handle_timeout(t0 + 100 * MS);
        assert_eq!(d.poll_action(), None);
        assert_eq!(d.phase(), Phase::Watching);
    }

    #[test]
    fn suspicion_is_emitted_once_while_fencing() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        suspect_by_silence(&mut d, t0);
        assert_eq!(d.poll_timeout(), None, "no timer while the fence is outstanding");
        d.handle_timeout(t0 + 500 * MS);
        d.handle_link_down(t0 + 600 * MS, "reset");
        assert_eq!(d.poll_action(), None);
        assert_eq!(d.counts().suspicions, 1);
    }

    #[test]
    fn link_down_is_immediate_suspicion() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_heartbeat(t0 + 10 * MS);
        d.handle_link_down(t0 + 15 * MS, "connection reset by peer");
        assert_eq!(
            drain(&mut d),
            vec![
                Action::Suspect {
                    since: t0 + 10 * MS,
                    silent_for: 5 * MS,
                    reason: SuspectReason::LinkDown { reason: "connection reset by peer".into() }
                },
                Action::Fence { attempt: 1 }
            ]
        );
        d.handle_fence_result(t0 + 60 * MS, FenceResult::Unanswered, None).unwrap();
        let Some(Action::TakeOver { record }) = d.poll_action() else { panic!("expected a takeover") };
        assert_eq!(record.reason, "link down: connection reset by peer");
        assert_eq!((record.detection, record.fencing), (5 * MS, 45 * MS));
    }

    #[test]
    fn link_down_while_reading_paused_still_suspects() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_reading_paused(t0, true);
        d.handle_link_down(t0 + MS, "eof");
        assert!(matches!(d.poll_action(), Some(Action::Suspect { .. })));
    }

    #[test]
    fn unanswered_probe_without_command_takes_over_with_timings() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_heartbeat(t0 + 20 * MS);
        let at = d.poll_timeout().unwrap();
        d.handle_timeout(at);
        drain(&mut d);
        d.handle_fence_result(at + 45 * MS, FenceResult::Unanswered, None).unwrap();
        let Some(Action::TakeOver { mut record }) = d.poll_action() else { panic!("expected a takeover") };
        assert_eq!(d.phase(), Phase::TakenOver);
        assert_eq!(record.reason, "silence");
        assert_eq!((record.fence_attempts, record.detection, record.fencing), (1, 100 * MS, 45 * MS));
        assert_eq!((record.restore, record.total, record.connections), (None, None, None));
        assert_eq!((record.last_heard(), record.fenced_at()), (t0 + 20 * MS, at + 45 * MS));
        record.restored(at + 50 * MS, 64);
        assert_eq!((record.restore, record.total, record.connections), (Some(5 * MS), Some(150 * MS), Some(64)));
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"reason": "silence", "fence_attempts": 1, "detection_ms": 100.0, "fencing_ms": 45.0,
                               "restore_ms": 5.0, "total_ms": 150.0, "connections": 64})
        );
    }

    #[test]
    fn unanswered_probe_and_successful_command_take_over() {
        let t0 = Instant::now();
        let mut d = with_command(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at + 300 * MS, FenceResult::Unanswered, Some(true)).unwrap();
        assert!(matches!(d.poll_action(), Some(Action::TakeOver { record }) if record.fencing == 300 * MS));
    }

    #[test]
    fn failed_command_stands_down_with_alarm() {
        let t0 = Instant::now();
        let mut d = with_command(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at + 5 * MS, FenceResult::Unanswered, Some(false)).unwrap();
        assert_eq!(drain(&mut d), vec![Action::StandDown { alarm: Alarm::FenceCommandFailed }]);
        assert_eq!(d.phase(), Phase::Watching);
    }

    #[test]
    fn command_result_must_match_the_configuration() {
        let t0 = Instant::now();
        let mut d = with_command(t0);
        let at = suspect_by_silence(&mut d, t0);
        assert_eq!(
            d.handle_fence_result(at, FenceResult::Unanswered, None),
            Err(FenceResultError::CommandResultMissing)
        );
        assert_eq!(d.phase(), Phase::Fencing, "a refused result changes nothing");
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        assert_eq!(
            d.handle_fence_result(at, FenceResult::Unanswered, Some(true)),
            Err(FenceResultError::CommandNotConfigured)
        );
        assert_eq!(d.poll_action(), None);
        // An answered probe never runs the command, so no result is expected either way.
        let mut d = with_command(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Answered { mac: mac(1) }, None).unwrap();
        assert_eq!(drain(&mut d), vec![Action::StandDown { alarm: Alarm::PrimaryAnswered { mac: mac(1) } }]);
    }

    #[test]
    fn answered_probe_stands_down_even_if_the_command_succeeded() {
        let t0 = Instant::now();
        let mut d = with_command(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Answered { mac: mac(3) }, Some(true)).unwrap();
        assert_eq!(drain(&mut d), vec![Action::StandDown { alarm: Alarm::PrimaryAnswered { mac: mac(3) } }]);
    }

    #[test]
    fn contested_probe_stands_down() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Contested { mac: mac(4) }, None).unwrap();
        assert_eq!(drain(&mut d), vec![Action::StandDown { alarm: Alarm::Contested { mac: mac(4) } }]);
    }

    #[test]
    fn probe_errors_are_retried_then_alarm_and_never_take_over() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at + MS, FenceResult::Error("network is down".into()), None).unwrap();
        assert_eq!(d.poll_action(), None);
        assert_eq!(d.poll_timeout(), Some(at + 21 * MS));
        assert_eq!(
            d.handle_fence_result(at + 2 * MS, FenceResult::Unanswered, None),
            Err(FenceResultError::NotFencing),
            "no fence outstanding while waiting to retry"
        );
        d.handle_timeout(at + 20 * MS);
        assert_eq!(d.poll_action(), None, "early timer");
        d.handle_timeout(at + 21 * MS);
        assert_eq!(drain(&mut d), vec![Action::Fence { attempt: 2 }]);
        d.handle_fence_result(at + 22 * MS, FenceResult::Error("network is down".into()), None).unwrap();
        d.handle_timeout(at + 42 * MS);
        assert_eq!(drain(&mut d), vec![Action::Fence { attempt: 3 }]);
        d.handle_fence_result(at + 43 * MS, FenceResult::Error("no such device".into()), None).unwrap();
        assert_eq!(
            drain(&mut d),
            vec![Action::StandDown { alarm: Alarm::FenceFailed { attempts: 3, error: "no such device".into() } }]
        );
        assert_eq!(d.phase(), Phase::Watching);
    }

    #[test]
    fn retry_then_unanswered_counts_attempts_in_the_record() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Error("busy".into()), None).unwrap();
        d.handle_timeout(at + 20 * MS);
        drain(&mut d);
        d.handle_fence_result(at + 65 * MS, FenceResult::Unanswered, None).unwrap();
        let Some(Action::TakeOver { record }) = d.poll_action() else { panic!("expected a takeover") };
        assert_eq!((record.fence_attempts, record.fencing), (2, 65 * MS));
    }

    #[test]
    fn primary_heard_while_fencing_recovers_and_late_result_is_refused() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_heartbeat(at + 10 * MS);
        assert_eq!(drain(&mut d), vec![Action::Recovered { silent_for: 110 * MS }]);
        assert_eq!(d.phase(), Phase::Watching);
        assert_eq!(
            d.handle_fence_result(at + 20 * MS, FenceResult::Unanswered, None),
            Err(FenceResultError::NotFencing)
        );
        assert_eq!(d.poll_timeout(), Some(at + 110 * MS));
    }

    #[test]
    fn after_stand_down_a_silent_primary_is_rechecked_after_the_recheck_interval() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at + 5 * MS, FenceResult::Answered { mac: mac(1) }, None).unwrap();
        drain(&mut d);
        let recheck = at + 5 * MS + DEFAULT_RECHECK_INTERVAL;
        assert_eq!(d.poll_timeout(), Some(recheck));
        d.handle_timeout(recheck - MS);
        assert_eq!(d.poll_action(), None);
        d.handle_timeout(recheck);
        assert_eq!(
            drain(&mut d),
            vec![
                Action::Suspect { since: t0, silent_for: recheck - t0, reason: SuspectReason::Silence },
                Action::Fence { attempt: 1 }
            ]
        );
        assert_eq!(d.counts().suspicions, 2);
        assert_eq!(d.counts().stand_downs, 1);
    }

    /// Fences again at the recheck after a stand-down at `at`, and lets the probe go unanswered.
    fn recheck_unanswered(d: &mut Detector, at: Instant) -> FailoverRecord {
        let recheck = at + DEFAULT_RECHECK_INTERVAL;
        d.handle_timeout(recheck);
        assert!(matches!(drain(d).last(), Some(Action::Fence { attempt: 1 })));
        d.handle_fence_result(recheck, FenceResult::Unanswered, None).unwrap();
        match d.poll_action() {
            Some(Action::TakeOver { record }) => record,
            other => panic!("expected a takeover, got {other:?}"),
        }
    }

    #[test]
    fn takeover_after_the_primary_answered_a_fence_marks_the_replica_stale() {
        for found in [FenceResult::Answered { mac: mac(1) }, FenceResult::Contested { mac: mac(2) }] {
            let t0 = Instant::now();
            let mut d = detector(t0);
            let at = suspect_by_silence(&mut d, t0);
            d.handle_fence_result(at, found.clone(), None).unwrap();
            drain(&mut d);
            assert!(recheck_unanswered(&mut d, at).replica_stale, "{found:?}");
        }
    }

    #[test]
    fn takeover_without_a_sign_of_the_primary_keeps_the_replica() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Unanswered, None).unwrap();
        let Some(Action::TakeOver { record }) = d.poll_action() else { panic!("expected a takeover") };
        assert!(!record.replica_stale);
        // Probe errors until the alarm say nothing about the primary either.
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        let mut now = at;
        for _ in 0..DEFAULT_FENCE_ATTEMPTS {
            d.handle_timeout(now);
            d.handle_fence_result(now, FenceResult::Error("down".into()), None).unwrap();
            now += 20 * MS;
        }
        assert!(matches!(drain(&mut d).last(), Some(Action::StandDown { alarm: Alarm::FenceFailed { .. } })));
        assert!(!recheck_unanswered(&mut d, now - 20 * MS).replica_stale);
    }

    #[test]
    fn hearing_the_primary_after_it_answered_makes_the_replica_current_again() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Answered { mac: mac(1) }, None).unwrap();
        drain(&mut d);
        let heard = at + 10 * MS;
        d.handle_heartbeat(heard);
        let at = suspect_by_silence(&mut d, heard);
        d.handle_fence_result(at, FenceResult::Unanswered, None).unwrap();
        let Some(Action::TakeOver { record }) = d.poll_action() else { panic!("expected a takeover") };
        assert!(!record.replica_stale);
    }

    #[test]
    fn after_stand_down_hearing_the_primary_resets_everything() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Answered { mac: mac(1) }, None).unwrap();
        drain(&mut d);
        d.handle_heartbeat(at + 30 * MS);
        assert_eq!(d.poll_timeout(), Some(at + 130 * MS));
        assert_eq!(d.poll_action(), None);
    }

    #[test]
    fn after_stand_down_a_link_break_is_new_evidence() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Answered { mac: mac(1) }, None).unwrap();
        drain(&mut d);
        d.handle_link_down(at + 50 * MS, "eof");
        assert!(matches!(d.poll_action(), Some(Action::Suspect { reason: SuspectReason::LinkDown { .. }, .. })));
    }

    #[test]
    fn link_down_stand_down_rechecks_with_the_link_reason() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_link_down(t0, "eof");
        drain(&mut d);
        d.handle_fence_result(t0 + 45 * MS, FenceResult::Answered { mac: mac(1) }, None).unwrap();
        drain(&mut d);
        let recheck = t0 + 45 * MS + DEFAULT_RECHECK_INTERVAL;
        assert_eq!(d.poll_timeout(), Some(recheck));
        // A second report of the same broken link is not new evidence.
        d.handle_link_down(t0 + 50 * MS, "eof");
        assert_eq!(d.poll_action(), None);
        d.handle_timeout(recheck + 5 * DEFAULT_RECHECK_INTERVAL);
        assert!(matches!(
            d.poll_action(),
            Some(Action::Suspect { reason: SuspectReason::LinkDown { reason }, .. }) if reason == "eof"
        ));
    }

    #[test]
    fn paused_reading_stops_the_silence_timer_and_resume_restarts_it() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_reading_paused(t0 + 10 * MS, true);
        assert_eq!(d.poll_timeout(), None);
        d.handle_timeout(t0 + 500 * MS);
        assert_eq!(d.poll_action(), None);
        d.handle_reading_paused(t0 + 600 * MS, false);
        assert_eq!(d.poll_timeout(), Some(t0 + 700 * MS));
        d.handle_timeout(t0 + 700 * MS);
        assert!(matches!(
            d.poll_action(),
            Some(Action::Suspect { since, silent_for, .. }) if since == t0 && silent_for == 700 * MS
        ));
    }

    #[test]
    fn repeated_pause_reports_are_idempotent() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_reading_paused(t0, false);
        assert_eq!(d.poll_timeout(), Some(t0 + 100 * MS));
        d.handle_reading_paused(t0 + 10 * MS, true);
        d.handle_reading_paused(t0 + 20 * MS, true);
        d.handle_reading_paused(t0 + 30 * MS, false);
        d.handle_reading_paused(t0 + 40 * MS, false);
        assert_eq!(d.poll_timeout(), Some(t0 + 130 * MS));
    }

    #[test]
    fn late_wake_gets_one_interval_of_grace_then_suspects() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        // This node was starved for 400 ms: its timer fires 300 ms late.
        d.handle_timeout(t0 + 400 * MS);
        assert_eq!(d.poll_action(), None);
        assert_eq!(d.poll_timeout(), Some(t0 + 420 * MS));
        d.handle_timeout(t0 + 420 * MS);
        assert!(matches!(d.poll_action(), Some(Action::Suspect { silent_for, .. }) if silent_for == 420 * MS));
    }

    #[test]
    fn late_wake_with_waiting_frames_does_not_suspect() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        // Timer handled before the frames that waited during the stall: grace, then the frames are read.
        d.handle_timeout(t0 + 400 * MS);
        d.handle_heartbeat(t0 + 401 * MS);
        d.handle_record(t0 + 401 * MS);
        d.handle_timeout(t0 + 420 * MS);
        assert_eq!(d.poll_action(), None);
        assert_eq!(d.poll_timeout(), Some(t0 + 501 * MS));
    }

    #[test]
    fn a_timer_less_than_an_interval_late_suspects_at_once() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        d.handle_timeout(t0 + 119 * MS);
        assert!(matches!(d.poll_action(), Some(Action::Suspect { silent_for, .. }) if silent_for == 119 * MS));
    }

    #[test]
    fn taken_over_is_final() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        let at = suspect_by_silence(&mut d, t0);
        d.handle_fence_result(at, FenceResult::Unanswered, None).unwrap();
        drain(&mut d);
        d.handle_heartbeat(at + MS);
        d.handle_link_down(at + MS, "eof");
        d.handle_timeout(at + 10 * DEFAULT_RECHECK_INTERVAL);
        assert_eq!(d.poll_action(), None);
        assert_eq!(d.poll_timeout(), None);
        assert_eq!(d.phase(), Phase::TakenOver);
        assert_eq!(d.handle_fence_result(at, FenceResult::Unanswered, None), Err(FenceResultError::NotFencing));
    }

    #[test]
    fn fence_result_before_any_suspicion_is_refused() {
        let t0 = Instant::now();
        let mut d = detector(t0);
        assert_eq!(d.handle_fence_result(t0, FenceResult::Unanswered, None), Err(FenceResultError::NotFencing));
        assert_eq!(d.phase(), Phase::Watching);
    }

    #[test]
    fn probe_outcomes_convert_and_errors_stay_errors() {
        let ok = |o: ProbeOutcome| FenceResult::from(&Ok(o));
        assert_eq!(
            ok(ProbeOutcome::Unanswered { probes_sent: 3, waited: 45 * MS, solicitations: 0 }),
            FenceResult::Unanswered
        );
        assert_eq!(
            ok(ProbeOutcome::Answered { mac: mac(5), after: MS, probes_sent: 1 }),
            FenceResult::Answered { mac: mac(5) }
        );
        assert_eq!(
            ok(ProbeOutcome::Contested { mac: mac(5), after: MS, probes_sent: 2 }),
            FenceResult::Contested { mac: mac(5) }
        );
        assert_eq!(
            FenceResult::from(&Err(ArpError::NoProbes)),
            FenceResult::Error("probe count must be at least 1".into())
        );
    }

    #[test]
    fn alarms_and_reasons_read_well() {
        assert_eq!(
            Alarm::PrimaryAnswered { mac: mac(1) }.to_string(),
            "the primary (02:00:00:00:00:01) still answers for the VIP"
        );
        assert_eq!(
            Alarm::FenceFailed { attempts: 3, error: "eperm".into() }.to_string(),
            "the ARP probe failed 3 times, last: eperm"
        );
        assert_eq!(SuspectReason::LinkDown { reason: "eof".into() }.to_string(), "link down: eof");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Heartbeat,
        Record,
        Paused(bool),
        LinkDown,
        Timeout,
        /// Probe result kind (0 answered, 1 contested, 2 unanswered, 3 error) and command result.
        Fence(u8, Option<bool>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Heartbeat),
            Just(Op::Record),
            any::<bool>().prop_map(Op::Paused),
            Just(Op::LinkDown),
            Just(Op::Timeout),
            Just(Op::Timeout),
            (0u8..4, proptest::option::of(any::<bool>())).prop_map(|(k, c)| Op::Fence(k, c)),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever the inputs, in any order: suspicion of silence needs the full detection time, each
        /// suspicion starts one fence and ends (by recovery or stand-down) before the next, attempts stay
        /// bounded, and only an unanswered probe with a passing (or absent) command takes over, after which
        /// nothing more happens.
        #[test]
        fn any_input_sequence_keeps_the_takeover_rules(
            command in any::<bool>(),
            ops in proptest::collection::vec((op(), 0u64..60), 0..120),
        ) {
            let t0 = Instant::now();
            let config = DetectorConfig { fence_command: command, ..DetectorConfig::new(20 * MS, 3) };
            let mut d = Detector::new(config.clone(), t0).unwrap();
            let mut now = t0;
            let (mut episode_open, mut taken_over) = (false, false);
            for (op, advance) in ops {
                now += Duration::from_millis(advance);
                let mut fence_input = None;
                match op {
                    Op::Heartbeat => d.handle_heartbeat(now),
                    Op::Record => d.handle_record(now),
                    Op::Paused(p) => d.handle_reading_paused(now, p),
                    Op::LinkDown => d.handle_link_down(now, "eof"),
                    Op::Timeout => d.handle_timeout(now),
                    Op::Fence(kind, cmd) => {
                        let result = match kind {
                            0 => FenceResult::Answered { mac: mac(1) },
                            1 => FenceResult::Contested { mac: mac(1) },
                            2 => FenceResult::Unanswered,
                            _ => FenceResult::Error("down".into()),
                        };
                        if d.handle_fence_result(now, result.clone(), cmd).is_ok() {
                            fence_input = Some((result, cmd));
                        }
                    }
                }
                let actions = drain(&mut d);
                if taken_over {
                    prop_assert!(actions.is_empty(), "{actions:?} after a takeover");
                }
                for (i, action) in actions.iter().enumerate() {
                    match action {
                        Action::Suspect { silent_for, reason, .. } => {
                            prop_assert!(!episode_open, "second suspicion in one episode");
                            episode_open = true;
                            if *reason == SuspectReason::Silence {
                                prop_assert!(*silent_for >= config.detection_time());
                            }
                            prop_assert_eq!(actions.get(i + 1), Some(&Action::Fence { attempt: 1 }));
                        }
                        Action::Fence { attempt } => {
                            prop_assert!(episode_open);
                            prop_assert!(*attempt >= 1 && *attempt <= config.fence_attempts);
                        }
                        Action::Recovered { .. } | Action::StandDown { .. } => {
                            prop_assert!(episode_open);
                            episode_open = false;
                        }
                        Action::TakeOver { record } => {
                            let expected = if command { Some(true) } else { None };
                            prop_assert_eq!(&fence_input, &Some((FenceResult::Unanswered, expected)));
                            prop_assert!(record.fence_attempts <= config.fence_attempts);
                            taken_over = true;
                        }
                    }
                }
                prop_assert_eq!(d.phase() == Phase::TakenOver, taken_over);
            }
        }
    }
}
