//! The restore plan: everything `TCP_REPAIR` needs to rebuild the server end of a
//! connection in another kernel, and the comparison of a tracker-derived plan with
//! the one the kernel itself reports (`repair::checkpoint`).
//!
//! The plan describes the *server* socket (the side that accepted the SYN). Field
//! names follow the kernel's (`struct tcp_sock`, `struct tcp_repair_window`).

use crate::seq::Seq;
use crate::tracker::Dir;
use serde::{Deserialize, Serialize};
use std::net::SocketAddrV4;
use std::ops::Range;

/// Linux TCP states, as `TCP_INFO` reports them (include/net/tcp_states.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
}

impl TcpState {
    /// Maps the kernel's numeric state (`tcpi_state`).
    pub fn from_linux(v: u8) -> Option<TcpState> {
        use TcpState::*;
        Some(match v {
            1 => Established,
            2 => SynSent,
            3 => SynRecv,
            4 => FinWait1,
            5 => FinWait2,
            6 => TimeWait,
            7 => Close,
            8 => CloseWait,
            9 => LastAck,
            10 => Listen,
            11 => Closing,
            _ => return None,
        })
    }
}

/// Mirror of the kernel's `struct tcp_repair_window` (values already scaled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RepairWindow {
    /// Sequence number of the peer segment that last updated `snd_wnd`.
    pub snd_wl1: Seq,
    /// Peer's receive window, scaled.
    pub snd_wnd: u32,
    /// Largest window the peer has advertised, scaled.
    pub max_window: u32,
    /// Our last advertised receive window, scaled.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when our window was last advertised.
    pub rcv_wup: Seq,
}

/// Negotiated TCP options of the connection (RFC 7323, RFC 2018, RFC 9293 MSS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PlanOptions {
    /// MSS the peer advertised in its SYN (the kernel's `mss_clamp`).
    pub mss: u16,
    /// Window scale shifts: `snd` applies to windows the peer advertises, `rcv` to ours.
    /// `None` when window scaling was not negotiated.
    pub wscale: Option<(u8, u8)>,
    pub sack: bool,
    pub timestamps: bool,
}

/// Everything needed to recreate the server end of an established connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePlan {
    /// The server's address: the restored socket binds here.
    pub local: SocketAddrV4,
    /// The client's address: the restored socket "connects" here (no handshake).
    pub remote: SocketAddrV4,
    /// State the restored socket must be in.
    pub state: TcpState,
    pub options: PlanOptions,
    /// Oldest server sequence number the client has not acknowledged (past our FIN
    /// once that FIN is acknowledged, as in the kernel).
    pub snd_una: Seq,
    /// Server bytes from `snd_una` on, already sent (or logged) and not acknowledged.
    /// They go into the send queue in repair mode and count as in flight.
    #[serde(with = "queue_hex")]
    pub send_queue: Queue,
    /// Bytes the server application wrote that were never transmitted. They are
    /// written normally after repair mode ends. Always empty in a tracker's plan.
    #[serde(default, with = "queue_hex")]
    pub unsent: Queue,
    /// Next client sequence number the server expects (after `recv_queue`, before a FIN).
    pub rcv_nxt: Seq,
    /// Client bytes the server acknowledged but its application has not consumed.
    #[serde(with = "queue_hex")]
    pub recv_queue: Queue,
    /// The server's FIN was transmitted after `send_queue` (acknowledged or not:
    /// see `state`). In FIN_WAIT1, CLOSING or LAST_ACK without it, the application
    /// has shut down but the FIN still waits behind `unsent` (kernel plans only).
    pub fin_sent: bool,
    /// The client's FIN (at `rcv_nxt`) was received and acknowledged.
    pub fin_received: bool,
    pub window: RepairWindow,
    /// Server timestamp clock (`TCP_TIMESTAMP`, ms) to continue from, if negotiated.
    pub tsval: Option<u32>,
    /// Latest timestamp the client sent (what the server echoes next).
    pub ts_recent: Option<u32>,
}

impl RestorePlan {
    /// Whether our FIN was sent and the client has not acknowledged it yet.
    pub fn fin_in_flight(&self) -> bool {
        self.fin_sent && matches!(self.state, TcpState::FinWait1 | TcpState::Closing | TcpState::LastAck)
    }

    /// `snd_nxt`: after the send queue, and after our FIN if it is in flight. (Once
    /// the client acknowledged our FIN, `snd_una` is already past it.)
    pub fn snd_nxt(&self) -> Seq {
        self.snd_una + self.send_queue.len() as u32 + self.fin_in_flight() as u32
    }

    /// First client sequence number of the receive queue.
    pub fn recv_queue_seq(&self) -> Seq {
        self.rcv_nxt - self.recv_queue.len() as u32
    }

    /// Takes in what the live client says it holds, from a segment it sent after the server end went
    /// away (its answer to a probe): `ack` is everything it received, `window` its advertised window as
    /// on the wire (unscaled), `seq` the segment's sequence number. The bytes in flight it acknowledged
    /// leave the plan and the rest, which it never received (lost with the old server, or never
    /// transmitted), become unsent: the restored socket sends them at once instead of on a
    /// retransmission timer that has no RTT sample. An answer that does not fit (acknowledging bytes
    /// never sent, or fewer than the plan knows) changes nothing, nor does one for a connection whose
    /// FIN was sent or that has nothing in flight. Returns whether the plan changed.
    pub fn apply_client_ack(&mut self, ack: Seq, window: u16, seq: Seq) -> bool {
        let open = matches!(self.state, TcpState::Established | TcpState::CloseWait);
        let acked = ack.diff(self.snd_una);
        if !open
            || self.fin_sent
            || self.send_queue.is_empty()
            || acked < 0
            || acked as usize > self.send_queue.len()
            || !self.send_queue.joins(&self.unsent)
        {
            return false;
        }
        self.unsent = self.send_queue.split_off(acked as usize).joined(&self.unsent);
        self.send_queue = Queue::default();
        self.snd_una = ack;
        let shift = self.options.wscale.map_or(0, |(snd, _)| snd);
        self.window.snd_wnd = u32::from(window) << shift;
        self.window.max_window = self.window.max_window.max(self.window.snd_wnd);
        // The kernel refuses a window update point past what it will have received.
        self.window.snd_wl1 = if seq.diff(self.rcv_nxt) > 0 { self.rcv_nxt } else { seq };
        true
    }

    /// Whether the client's answer to a probe (its `ack`, raw `window` and `seq`) confirms a plan made
    /// without the handshake's last ACK ([`crate::Tracker::unconfirmed_handshake_plan`]): it
    /// acknowledges exactly the SYN-ACK, as an established client does. Takes its window when it does.
    pub fn confirm_handshake(&mut self, ack: Seq, window: u16, seq: Seq) -> bool {
        if ack != self.snd_una || seq.diff(self.rcv_nxt) < 0 || self.state != TcpState::Established {
            return false;
        }
        let shift = self.options.wscale.map_or(0, |(snd, _)| snd);
        self.window.snd_wnd = u32::from(window) << shift;
        self.window.max_window = self.window.max_window.max(self.window.snd_wnd);
        self.window.snd_wl1 = self.rcv_nxt;
        true
    }
}

/// The bytes of one of a plan's queues: held by the plan, or left in the stream of the tracker the plan was
/// made from ([`Tracker::restore_plan_in_place`](crate::Tracker::restore_plan_in_place)), as the stream
/// offsets they occupy there. A takeover writes those straight from the tracker into the rebuilt socket
/// ([`QueueSource`]): copying a busy connection's megabyte into the plan first took most of its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queue {
    Bytes(Vec<u8>),
    /// Offsets in the tracker's stream of the queue's direction: the server's for the send queue and the
    /// unsent bytes, the client's for the receive queue.
    InStream(Range<u64>),
}

impl Default for Queue {
    fn default() -> Queue {
        Queue::Bytes(Vec::new())
    }
}

impl From<Vec<u8>> for Queue {
    fn from(bytes: Vec<u8>) -> Queue {
        Queue::Bytes(bytes)
    }
}

impl From<&[u8]> for Queue {
    fn from(bytes: &[u8]) -> Queue {
        Queue::Bytes(bytes.to_vec())
    }
}

impl Queue {
    pub fn len(&self) -> usize {
        match self {
            Queue::Bytes(b) => b.len(),
            Queue::InStream(r) => (r.end - r.start) as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes to change, when the plan holds them.
    pub fn bytes_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Queue::Bytes(b) => Some(b),
            Queue::InStream(_) => None,
        }
    }

    /// The bytes, when the plan holds them (none for [`Queue::InStream`]).
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Queue::Bytes(b) => Some(b),
            Queue::InStream(_) => None,
        }
    }

    /// The bytes the plan holds: all of them, or none for [`Queue::InStream`].
    fn held(&self) -> &[u8] {
        self.bytes().unwrap_or_default()
    }

    /// The bytes, from `source` when they are left in a tracker's stream (`dir`: the queue's direction).
    /// `None` when the source no longer holds all of them.
    pub fn pieces<'a>(&'a self, dir: Dir, source: &'a dyn QueueSource) -> Option<[&'a [u8]; 2]> {
        match self {
            Queue::Bytes(b) => Some([b, &[]]),
            Queue::InStream(r) if r.is_empty() => Some([&[], &[]]),
            Queue::InStream(r) => source.queue_bytes(dir, r.clone()),
        }
    }

    /// Splits the queue at byte `at` (at most its length): this keeps the bytes before, the rest is
    /// returned.
    pub fn split_off(&mut self, at: usize) -> Queue {
        match self {
            Queue::Bytes(b) => Queue::Bytes(b.split_off(at)),
            Queue::InStream(r) => {
                let cut = r.start + at as u64;
                let rest = cut..r.end;
                r.end = cut;
                Queue::InStream(rest)
            }
        }
    }

    /// Whether `next` can follow this queue's bytes in one queue: both held, or both in the stream with
    /// `next` starting where this ends (or either empty).
    pub fn joins(&self, next: &Queue) -> bool {
        match (self, next) {
            _ if self.is_empty() || next.is_empty() => true,
            (Queue::Bytes(_), Queue::Bytes(_)) => true,
            (Queue::InStream(a), Queue::InStream(b)) => a.end == b.start,
            _ => false,
        }
    }

    /// This queue followed by `next`, which must [`join`](Self::joins) it (else `next` is left out).
    pub fn joined(self, next: &Queue) -> Queue {
        debug_assert!(self.joins(next), "{self:?} then {next:?}");
        match (self, next) {
            (this, next) if next.is_empty() => this,
            (this, next) if this.is_empty() => next.clone(),
            (Queue::Bytes(mut a), Queue::Bytes(b)) => {
                a.extend_from_slice(b);
                Queue::Bytes(a)
            }
            (Queue::InStream(a), Queue::InStream(b)) => Queue::InStream(a.start..b.end.max(a.end)),
            (this, _) => this,
        }
    }
}

impl PartialEq<[u8]> for Queue {
    fn eq(&self, other: &[u8]) -> bool {
        self.bytes() == Some(other)
    }
}

impl PartialEq<Vec<u8>> for Queue {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.bytes() == Some(other.as_slice())
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Queue {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.bytes() == Some(other.as_slice())
    }
}

/// Where the bytes of a plan's [`Queue::InStream`] queues are: the tracker it was made from.
pub trait QueueSource {
    /// The bytes at stream offsets `range` of direction `dir`, in at most two pieces; `None` unless all
    /// of them are held.
    fn queue_bytes(&self, dir: Dir, range: Range<u64>) -> Option<[&[u8]; 2]>;
}

/// No source: for a plan that holds its bytes (from a checkpoint, a file,
/// [`Tracker::restore_plan`](crate::Tracker::restore_plan)).
pub struct NoSource;

impl QueueSource for NoSource {
    fn queue_bytes(&self, _: Dir, _: Range<u64>) -> Option<[&[u8]; 2]> {
        None
    }
}

/// One difference between a tracker-derived plan and the kernel's own state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub field: &'static str,
    pub tracker: String,
    pub kernel: String,
}

/// Fields that cannot be known from packets, and how `compare` treats them.
///
/// * `recv_queue`: how much the application has read is invisible on the wire. The
///   kernel's unread bytes must be a suffix of the tracker's retained client bytes.
/// * `rcv_nxt`: the kernel may hold client bytes it has not acknowledged yet
///   (delayed ACK); the tracker only trusts what the server acknowledged. The
///   kernel's value may be ahead by at most the client bytes seen beyond the ACK.
/// * `window.rcv_wnd`, `window.rcv_wup`: the kernel's internal receive-window
///   bookkeeping; the tracker knows only the last advertised window.
/// * `snd_nxt`, `send_queue`: segments still in the device queue when the link
///   went down count as sent for the kernel but never reached the wire (or the
///   capture). The kernel may be ahead, by bytes that extend the tracker's send
///   queue; the client never saw them, so a restore without them is correct.
/// * `window.max_window`: ACKs coalesced in the kernel's socket backlog keep only
///   the last window, so the kernel may never see the largest one on the wire: its
///   value must lie between its `snd_wnd` and the tracker's.
/// * `window.snd_wl1`: the kernel updates it on segments the tracker may not rank
///   the same way (it is compared for being within the window, not for equality).
/// * `tsval`: the clock keeps running; the kernel's value must not be behind the
///   tracker's by more than the tolerance, and the tracker's must not be behind
///   the last value the server sent.
/// * `ts_recent`: the kernel updates it only for in-order segments; not compared.
/// * `options.mss`: the kernel reports its current MSS, not the peer's clamp.
pub const NOT_FROM_PACKETS: &[&str] = &[
    "snd_nxt, send_queue (≥, a device queue dropped at link down)",
    "recv_queue",
    "rcv_nxt (delayed ACK)",
    "window.max_window (≤)",
    "window.rcv_wnd",
    "window.rcv_wup",
    "window.snd_wl1",
    "tsval (clock runs)",
    "ts_recent",
    "options.mss",
];

/// Compares the plan a tracker derived (`tracker`) with the kernel's checkpoint of
/// the same socket (`kernel`). `client_ahead` is how many client bytes the tracker
/// saw beyond the server's last ACK; `ts_tolerance_ms` bounds clock drift between
/// the two readings. Returns every field that differs beyond what packets can know.
pub fn compare(tracker: &RestorePlan, kernel: &RestorePlan, client_ahead: u32, ts_tolerance_ms: u32) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let mut check = |field: &'static str, ok: bool, t: String, k: String| {
        if !ok {
            out.push(Mismatch { field, tracker: t, kernel: k });
        }
    };
    check("local", tracker.local == kernel.local, tracker.local.to_string(), kernel.local.to_string());
    check("remote", tracker.remote == kernel.remote, tracker.remote.to_string(), kernel.remote.to_string());
    check("state", tracker.state == kernel.state, format!("{:?}", tracker.state), format!("{:?}", kernel.state));
    check(
        "options.wscale",
        tracker.options.wscale == kernel.options.wscale,
        format!("{:?}", tracker.options.wscale),
        format!("{:?}", kernel.options.wscale),
    );
    check(
        "options.sack",
        tracker.options.sack == kernel.options.sack,
        tracker.options.sack.to_string(),
        kernel.options.sack.to_string(),
    );
    check(
        "options.timestamps",
        tracker.options.timestamps == kernel.options.timestamps,
        tracker.options.timestamps.to_string(),
        kernel.options.timestamps.to_string(),
    );
    check("snd_una", tracker.snd_una == kernel.snd_una, tracker.snd_una.to_string(), kernel.snd_una.to_string());
    check(
        "snd_nxt",
        kernel.snd_nxt().diff(tracker.snd_nxt()) >= 0
            && kernel.snd_nxt().diff(tracker.snd_nxt()) as usize
                == kernel.send_queue.len().saturating_sub(tracker.send_queue.len()),
        tracker.snd_nxt().to_string(),
        kernel.snd_nxt().to_string(),
    );
    let (t_send, k_send) = (tracker.send_queue.held(), kernel.send_queue.held());
    check(
        "send_queue",
        k_send.starts_with(t_send),
        format!("{} bytes", tracker.send_queue.len()),
        format!("{} bytes{}", kernel.send_queue.len(), first_difference(t_send, k_send)),
    );
    let ahead = kernel.rcv_nxt.diff(tracker.rcv_nxt);
    check(
        "rcv_nxt",
        ahead >= 0 && ahead as u32 <= client_ahead,
        tracker.rcv_nxt.to_string(),
        kernel.rcv_nxt.to_string(),
    );
    // The kernel's unread bytes, where they overlap the tracker's receive queue,
    // must be the same bytes. The kernel may have read further (bytes it had not
    // acknowledged: the rcv_nxt rule bounds those), but its unread bytes may not
    // start before the tracker's: that would mean the tracker dropped unread bytes.
    let k_start = kernel.recv_queue_seq();
    let t_start = tracker.recv_queue_seq();
    let recv_ok = k_start.diff(t_start) >= 0 && {
        let skip = k_start.diff(t_start) as usize;
        let (t, k) = (tracker.recv_queue.held(), kernel.recv_queue.held());
        let common = t.len().saturating_sub(skip).min(k.len());
        common == 0 || t[skip..skip + common] == k[..common]
    };
    check(
        "recv_queue",
        recv_ok,
        format!("{} bytes from {}", tracker.recv_queue.len(), t_start),
        format!("{} bytes from {}", kernel.recv_queue.len(), k_start),
    );
    check("fin_sent", tracker.fin_sent == kernel.fin_sent, tracker.fin_sent.to_string(), kernel.fin_sent.to_string());
    check(
        "fin_received",
        tracker.fin_received == kernel.fin_received,
        tracker.fin_received.to_string(),
        kernel.fin_received.to_string(),
    );
    check(
        "window.snd_wnd",
        tracker.window.snd_wnd == kernel.window.snd_wnd,
        tracker.window.snd_wnd.to_string(),
        kernel.window.snd_wnd.to_string(),
    );
    // The kernel can miss a window the wire carried (ACKs coalesced in the socket
    // backlog keep only the last one), so its maximum may be lower, never higher.
    check(
        "window.max_window",
        kernel.window.max_window <= tracker.window.max_window && kernel.window.max_window >= kernel.window.snd_wnd,
        tracker.window.max_window.to_string(),
        kernel.window.max_window.to_string(),
    );
    match (tracker.tsval, kernel.tsval) {
        (Some(t), Some(k)) => {
            let d = k.wrapping_sub(t) as i32;
            check("tsval", d.unsigned_abs() <= ts_tolerance_ms, t.to_string(), k.to_string());
        }
        (None, None) => {}
        (t, k) => check("tsval", false, format!("{t:?}"), format!("{k:?}")),
    }
    out
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(", first difference at byte {i}"),
        None => String::new(),
    }
}

/// Serde helper: byte vectors as hex strings in JSON.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        hex::decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// Serde helper: a [`Queue`] as a hex string (as [`hex_bytes`]). A queue left in a tracker's stream has
/// no bytes to write out and is refused.
pub mod queue_hex {
    use super::Queue;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(q: &Queue, s: S) -> Result<S::Ok, S::Error> {
        match q {
            Queue::Bytes(b) => super::hex_bytes::serialize(b, s),
            Queue::InStream(r) => Err(serde::ser::Error::custom(format!(
                "the queue's bytes are left in the tracker's stream ({r:?}): a plan made in place cannot be written out"
            ))),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Queue, D::Error> {
        super::hex_bytes::deserialize(d).map(Queue::Bytes)
    }
}

/// An established plan across the 2^32 wrap with bytes in both queues, for unit tests.
#[cfg(test)]
pub(crate) fn sample_plan() -> RestorePlan {
    RestorePlan {
        local: "10.0.0.2:80".parse().unwrap(),
        remote: "10.0.0.1:40000".parse().unwrap(),
        state: TcpState::Established,
        options: PlanOptions { mss: 1460, wscale: Some((7, 7)), sack: true, timestamps: true },
        snd_una: Seq(u32::MAX - 2),
        send_queue: b"hello".to_vec().into(),
        unsent: Queue::default(),
        rcv_nxt: Seq(1000),
        recv_queue: b"GET / HTTP/1.1\r\n\r\n".to_vec().into(),
        fin_sent: false,
        fin_received: false,
        window: RepairWindow {
            snd_wl1: Seq(990),
            snd_wnd: 65536,
            max_window: 65536,
            rcv_wnd: 65536,
            rcv_wup: Seq(1000),
        },
        tsval: Some(5000),
        ts_recent: Some(77),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RestorePlan {
        sample_plan()
    }

    #[test]
    fn plan_round_trips_through_json() {
        let p = plan();
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"send_queue\":\"68656c6c6f\""));
        let back: RestorePlan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert_eq!(p.snd_nxt(), Seq(2));
        assert_eq!(p.recv_queue_seq(), Seq(1000 - 18));
    }

    #[test]
    fn identical_plans_compare_clean() {
        assert!(compare(&plan(), &plan(), 0, 0).is_empty());
    }

    #[test]
    fn kernel_having_read_part_of_the_request_is_not_a_mismatch() {
        let mut k = plan();
        k.recv_queue = k.recv_queue.split_off(4);
        assert!(compare(&plan(), &k, 0, 0).is_empty());
    }

    #[test]
    fn differing_sequence_numbers_and_bytes_are_reported() {
        let mut k = plan();
        k.snd_una = k.snd_una + 1;
        k.send_queue = b"ello".to_vec().into();
        k.rcv_nxt = Seq(1010);
        let fields: Vec<_> = compare(&plan(), &k, 5, 0).into_iter().map(|m| m.field).collect();
        assert!(fields.contains(&"snd_una"));
        assert!(fields.contains(&"send_queue"));
        assert!(fields.contains(&"rcv_nxt"));
        assert!(
            compare(
                &plan(),
                &{
                    let mut k = plan();
                    k.rcv_nxt = Seq(1003);
                    k
                },
                5,
                0
            )
            .iter()
            .all(|m| m.field != "rcv_nxt")
        );
    }

    #[test]
    fn kernel_sent_bytes_the_wire_never_carried_extend_the_send_queue() {
        let mut k = plan();
        k.send_queue.bytes_mut().unwrap().extend_from_slice(b" world");
        assert!(compare(&plan(), &k, 0, 0).is_empty());
        // But they must extend it: different bytes, or a shorter kernel queue, are mismatches.
        k.send_queue.bytes_mut().unwrap()[0] = b'j';
        assert!(compare(&plan(), &k, 0, 0).iter().any(|m| m.field == "send_queue"));
        let mut k = plan();
        k.send_queue.bytes_mut().unwrap().truncate(2);
        let fields: Vec<_> = compare(&plan(), &k, 0, 0).into_iter().map(|m| m.field).collect();
        assert!(fields.contains(&"send_queue") && fields.contains(&"snd_nxt"));
    }

    #[test]
    fn kernel_reading_past_the_acknowledged_bytes_is_not_a_mismatch() {
        let mut k = plan();
        k.rcv_nxt = Seq(1040);
        k.recv_queue = b"later bytes".to_vec().into(); // starts at 1029, after the tracker's queue ends
        assert!(compare(&plan(), &k, 40, 0).is_empty());
        // Unread kernel bytes before the tracker's queue: the tracker lost them.
        let mut k = plan();
        k.recv_queue.bytes_mut().unwrap().insert(0, b'x');
        assert_eq!(compare(&plan(), &k, 0, 0)[0].field, "recv_queue");
    }

    #[test]
    fn a_lower_kernel_max_window_within_bounds_is_accepted() {
        let mut k = plan();
        k.window.max_window = 65536 - 1024;
        k.window.snd_wnd = 60000;
        let fields: Vec<_> = compare(&plan(), &k, 0, 0).into_iter().map(|m| m.field).collect();
        assert_eq!(fields, ["window.snd_wnd"]);
        k.window.max_window = 70000;
        assert!(compare(&plan(), &k, 0, 0).iter().any(|m| m.field == "window.max_window"));
    }

    #[test]
    fn timestamp_drift_beyond_tolerance_is_reported() {
        let mut k = plan();
        k.tsval = Some(5100);
        assert!(compare(&plan(), &k, 0, 200).is_empty());
        assert_eq!(compare(&plan(), &k, 0, 50)[0].field, "tsval");
    }

    #[test]
    fn a_client_ack_moves_what_it_never_received_to_unsent_across_the_wrap() {
        // snd_una is 3 before the wrap; the client holds 2 of the 5 bytes in flight.
        let mut p = plan();
        p.unsent = b"!".to_vec().into();
        let ack = p.snd_una + 2;
        assert!(p.apply_client_ack(ack, 100, Seq(1000)));
        assert_eq!(p.snd_una, ack);
        assert!(p.send_queue.is_empty());
        assert_eq!(p.unsent, b"llo!");
        assert_eq!(p.snd_nxt(), ack);
        assert_eq!(p.window.snd_wnd, 100 << 7);
        assert_eq!(p.window.max_window, 65536);
        assert_eq!(p.window.snd_wl1, Seq(1000));

        // Nothing received: every byte in flight becomes unsent. A later seq is capped at rcv_nxt.
        let mut p = plan();
        assert!(p.apply_client_ack(p.snd_una, 1000, Seq(1200)));
        assert_eq!((p.send_queue.len(), p.unsent.bytes()), (0, Some(&b"hello"[..])));
        assert_eq!(p.window.snd_wnd, 1000 << 7);
        assert_eq!(p.window.max_window, 1000 << 7);
        assert_eq!(p.window.snd_wl1, Seq(1000));

        // Everything received.
        let mut p = plan();
        assert!(p.apply_client_ack(p.snd_nxt(), 10, Seq(1000)));
        assert!(p.send_queue.is_empty() && p.unsent.is_empty());
    }

    #[test]
    fn a_client_ack_that_does_not_fit_changes_nothing() {
        let cases: [(&str, fn(&mut RestorePlan) -> Seq); 5] = [
            ("older than snd_una", |p| p.snd_una - 1),
            ("beyond what was sent", |p| p.snd_nxt() + 1),
            ("fin sent", |p| {
                p.fin_sent = true;
                p.state = TcpState::FinWait1;
                p.snd_una
            }),
            ("nothing in flight", |p| {
                p.send_queue = Queue::default();
                p.snd_una
            }),
            ("closing", |p| {
                p.state = TcpState::LastAck;
                p.snd_una
            }),
        ];
        for (what, setup) in cases {
            let mut p = plan();
            let ack = setup(&mut p);
            let before = p.clone();
            assert!(!p.apply_client_ack(ack, 10, Seq(1000)), "{what}");
            assert_eq!(p, before, "{what}");
        }
    }

    #[test]
    fn queues_left_in_the_stream_split_and_join_as_ranges() {
        // The tracker's plan of 5 bytes in flight at stream offsets 100..105; the client holds 2.
        let mut p = plan();
        p.send_queue = Queue::InStream(100..105);
        let ack = p.snd_una + 2;
        assert!(p.apply_client_ack(ack, 100, Seq(1000)));
        assert_eq!((p.send_queue.len(), &p.unsent), (0, &Queue::InStream(102..105)));
        assert_eq!(p.snd_nxt(), ack);

        // Bytes held and bytes in the stream are never joined: the answer changes nothing.
        let mut p = plan();
        p.send_queue = Queue::InStream(100..105);
        p.unsent = b"!".to_vec().into();
        let before = p.clone();
        assert!(!p.apply_client_ack(p.snd_una + 2, 100, Seq(1000)));
        assert_eq!(p, before);

        let mut q = Queue::InStream(10..20);
        assert_eq!((q.split_off(4), q), (Queue::InStream(14..20), Queue::InStream(10..14)));
        assert!(Queue::InStream(0..3).joins(&Queue::InStream(3..9)));
        assert!(!Queue::InStream(0..3).joins(&Queue::InStream(4..9)));
        assert_eq!(Queue::InStream(0..3).joined(&Queue::InStream(3..9)), Queue::InStream(0..9));
        assert_eq!(Queue::InStream(5..5).joined(&Queue::from(&b"x"[..])), b"x");
    }

    #[test]
    fn a_queue_left_in_the_stream_is_read_from_its_source_and_never_written_out() {
        struct Ring;
        impl QueueSource for Ring {
            fn queue_bytes(&self, dir: Dir, range: Range<u64>) -> Option<[&[u8]; 2]> {
                (dir == Dir::ToClient && range == (3..8)).then_some([&b"abc"[..], &b"de"[..]])
            }
        }
        let q = Queue::InStream(3..8);
        assert_eq!(q.pieces(Dir::ToClient, &Ring), Some([&b"abc"[..], &b"de"[..]]));
        assert_eq!(q.pieces(Dir::ToServer, &Ring), None);
        assert_eq!(q.pieces(Dir::ToClient, &NoSource), None);
        assert_eq!(Queue::InStream(3..3).pieces(Dir::ToClient, &NoSource), Some([&[][..], &[][..]]));
        let mut p = plan();
        p.send_queue = q;
        assert!(serde_json::to_string(&p).is_err(), "a plan made in place has no bytes to write out");
    }
}
