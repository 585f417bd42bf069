//! The sans-IO TCP connection tracker.
//!
//! Read RFC 9293 (§3.4 sequence numbers, §3.8 window management, §3.10 event
//! processing), RFC 7323 (window scaling, timestamps, PAWS) and RFC 5961 (RST
//! acceptance). The tracker follows one connection from segments of both
//! directions, fed with the time they were seen, and derives the state the
//! *server's* kernel is in: the side that received the SYN is the server.
//!
//! Call order: `handle_segment` for every segment of either direction, in the
//! order they were seen; `handle_server_data` for server bytes learnt from
//! elsewhere (the primary's reply log: outbound data segments are not mirrored);
//! `restore_plan(now)` whenever a takeover needs one; `trim` as the application
//! layer consumes client bytes. Nothing here reads a clock or touches a socket.
//!
//! What the tracker believes about the server's kernel is based on what the
//! server *acknowledged*: client bytes beyond the server's last ACK may or may not
//! have reached it, and the client will retransmit them if they did not.
//!
//! A segment the server's kernel would drop (outside the window, RST with a bad
//! sequence number, an ACK of bytes never sent) is refused with a [`TrackError`]
//! and changes nothing.

use crate::plan::{PlanOptions, Queue, QueueSource, RepairWindow, RestorePlan, TcpState};
use crate::segment::Segment;
use crate::seq::Seq;
use crate::stream::Stream;
use std::net::SocketAddrV4;
use std::ops::Range;
use std::time::Duration;

/// How strictly segments are checked against the windows seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Validation {
    /// Refuse what the receiving kernel would drop, judged by the windows and
    /// sequence numbers seen. For a complete view of the traffic (the backup's).
    #[default]
    Kernel,
    /// For captures that may have missed packets (tcpdump drops, a capture started
    /// late): a missed window update must not make everything after it look out of
    /// window. Only segments absurdly far (2^30) from the stream are refused. What
    /// the server acknowledged still decides what it received.
    Observer,
}

/// How the tracker learns which client bytes the server's kernel received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ServerAcks {
    /// From the server's ACKs seen on the wire (a capture of both directions).
    #[default]
    Seen,
    /// The server's pure ACKs are not observed: the primary mirrors only its
    /// SYN-ACK, FIN and RST. Every inbound segment the tracker is fed was admitted
    /// into the server's kernel, so the contiguous client bytes count as received.
    /// That may run ahead of what the kernel really took (say, a segment beyond its
    /// window), which is safe: the restored socket then holds bytes the client still
    /// has unacknowledged, and the client's retransmission of them is a duplicate.
    /// It must never lag behind, so client data is not held to any window here.
    Inferred,
}

/// Direction of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Dir {
    /// Sent by the client (the side that sent the SYN).
    ToServer,
    /// Sent by the server.
    ToClient,
}

impl Dir {
    /// The other direction.
    pub fn reverse(self) -> Dir {
        match self {
            Dir::ToServer => Dir::ToClient,
            Dir::ToClient => Dir::ToServer,
        }
    }
}

/// Why a segment or data was refused. The tracker's state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    /// The segment's addresses do not belong to this connection.
    #[error("segment {src} -> {dst} does not belong to this connection")]
    WrongConnection { src: SocketAddrV4, dst: SocketAddrV4 },
    /// A SYN travelling the wrong way, or a SYN-ACK that does not acknowledge the client's SYN.
    #[error("unexpected SYN ({0:?})")]
    UnexpectedSyn(Dir),
    /// A SYN with a new ISN on an established connection (port reuse is the caller's business).
    #[error("SYN with a new ISN {isn} on a tracked connection")]
    NewIsn { isn: Seq },
    /// Data outside the receiver's window: its kernel would drop it.
    #[error("{dir:?} segment at seq {seq} is outside the receive window")]
    OutOfWindow { dir: Dir, seq: Seq },
    /// An ACK of bytes the other side cannot have sent.
    #[error("{dir:?} ACK {ack} acknowledges data never sent (next is {next})")]
    AckOfUnsent { dir: Dir, ack: Seq, next: Seq },
    /// A RST whose sequence number is not in the window (RFC 5961 §3).
    #[error("{dir:?} RST at seq {seq} is not acceptable")]
    BadRst { dir: Dir, seq: Seq },
    /// Server bytes fed before the server's ISN is known.
    #[error("server data before the SYN-ACK")]
    NoServerIsn,
}

/// Why no restore plan can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The handshake was not seen: options and window scaling are unknown.
    #[error("connection first seen mid-stream: options unknown, not restorable")]
    MidStream,
    /// The handshake has not completed.
    #[error("handshake not complete (state {0:?})")]
    HandshakeIncomplete(TcpState),
    /// The connection is reset or fully closed: nothing to restore.
    #[error("connection is {0:?}: nothing to restore")]
    Closed(TcpState),
    /// Bytes the restored socket needs were never seen.
    #[error("{dir:?} bytes {from}..{to} needed for the restore were never seen")]
    MissingBytes { dir: Dir, from: u64, to: u64 },
    /// The caller trimmed client bytes the server has not consumed yet... or
    /// trimmed past the server's ACK.
    #[error("client stream trimmed to {trimmed}, beyond the server's ACK at {acked}")]
    TrimmedPastAck { trimmed: u64, acked: u64 },
}

/// What the tracker knows about one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    /// Initial sequence number, when the SYN (or SYN-ACK) was seen.
    pub isn: Option<Seq>,
    /// Options this endpoint offered in its SYN.
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub timestamps: bool,
    /// Unique payload bytes seen from this endpoint.
    pub payload_bytes: u64,
    /// Payload bytes seen again (retransmissions, overlaps).
    pub retransmitted_bytes: u64,
    /// Bytes the peer acknowledged that were never seen.
    pub missing_bytes: u64,
    pub fin_seen: bool,
    pub rst_seen: bool,
    /// Sequence number of stream offset 0 (ISN + 1, or the first seen sequence number).
    seq0: Option<Seq>,
    /// Highest sequence number sent, as (sequence, stream offset): extends offsets to 64 bits.
    high: (Seq, u64),
    /// Sequence number of this endpoint's FIN, and the ACK that FIN carried.
    fin_seq: Option<Seq>,
    fin_ack: Option<Seq>,
    /// Highest ACK this endpoint sent (acknowledges the peer's data).
    acked: Option<Seq>,
    /// Latest window update, scaled (a SYN's window never is), its raw field, and
    /// the (seq, ack) of the segment that carried it.
    window: u32,
    window_raw: u16,
    wl: Option<(Seq, Seq)>,
    /// Largest window advertised after the handshake, scaled (the kernel's `max_window`).
    max_window: u32,
    /// The (unscaled) window of the SYN.
    syn_window: u32,
    /// Latest timestamp value sent, and when it was seen.
    ts_val: Option<(u32, Duration)>,
    stream: Stream,
}

impl Endpoint {
    fn new(addr: SocketAddrV4) -> Endpoint {
        Endpoint {
            addr,
            isn: None,
            mss: None,
            wscale: None,
            sack_permitted: false,
            timestamps: false,
            payload_bytes: 0,
            retransmitted_bytes: 0,
            missing_bytes: 0,
            fin_seen: false,
            rst_seen: false,
            seq0: None,
            high: (Seq(0), 0),
            fin_seq: None,
            fin_ack: None,
            acked: None,
            window: 0,
            window_raw: 0,
            wl: None,
            max_window: 0,
            syn_window: 0,
            ts_val: None,
            stream: Stream::new(),
        }
    }

    /// Highest ACK this endpoint has sent.
    pub fn acked(&self) -> Option<Seq> {
        self.acked
    }

    /// When this endpoint's latest timestamp value was first seen (the clock of `handle_segment`): about
    /// when it last sent anything. `None` without timestamps.
    pub fn last_timestamp_at(&self) -> Option<Duration> {
        self.ts_val.map(|(_, at)| at)
    }

    /// Highest sequence number this endpoint has sent (after its data and FIN).
    pub fn snd_max(&self) -> Option<Seq> {
        self.seq0.map(|_| self.high.0)
    }

    /// Latest timestamp value this endpoint sent.
    pub fn ts_val(&self) -> Option<u32> {
        self.ts_val.map(|(v, _)| v)
    }

    /// Raw window field of this endpoint's latest window update.
    pub fn window_raw(&self) -> u16 {
        self.window_raw
    }

    /// Stream offset of a sequence number of this endpoint (negative: before the stream).
    fn offset(&self, seq: Seq) -> i64 {
        self.high.1 as i64 + seq.diff(self.high.0) as i64
    }

    /// Stream offset where this endpoint's data ends (its FIN, if seen).
    fn data_end_offset(&self) -> Option<u64> {
        self.fin_seq.map(|f| self.offset(f).max(0) as u64)
    }

    fn set_seq0(&mut self, seq0: Seq) {
        self.seq0 = Some(seq0);
        self.high = (seq0, 0);
    }

    /// Moves the highest-sent mark forward if `end` is later.
    fn advance_high(&mut self, end: Seq) {
        let d = end.diff(self.high.0);
        if d > 0 {
            self.high = (end, self.high.1 + d as u64);
        }
    }
}

/// One TCP connection, followed from its packets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tracker {
    client: Option<Endpoint>,
    server: Option<Endpoint>,
    handshake_seen: bool,
    /// The client acknowledged the server's SYN.
    established: bool,
    rst: bool,
    trim_on_ack: bool,
    validation: Validation,
    server_acks: ServerAcks,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

/// Slack beyond the largest advertised window within which data is still taken:
/// one byte for a zero-window probe.
const WINDOW_SLACK: u32 = 1;

/// Window assumed before the receiver has advertised one (first segments seen mid-stream).
const UNKNOWN_WINDOW: u32 = 1 << 30;

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::with_validation(Validation::Kernel)
    }

    /// A tracker with the given segment validation.
    pub fn with_validation(validation: Validation) -> Tracker {
        Tracker {
            client: None,
            server: None,
            handshake_seen: false,
            established: false,
            rst: false,
            trim_on_ack: true,
            validation,
            server_acks: ServerAcks::Seen,
        }
    }

    /// Whether server bytes are released once the client acknowledges them (default
    /// on: that is what bounds memory). Off keeps every byte until `trim`.
    pub fn set_trim_on_ack(&mut self, on: bool) {
        self.trim_on_ack = on;
    }

    /// How the server's reception of client bytes is learnt (default [`ServerAcks::Seen`]).
    pub fn set_server_acks(&mut self, server_acks: ServerAcks) {
        self.server_acks = server_acks;
    }

    /// Whether the connection was followed from its handshake.
    pub fn handshake_seen(&self) -> bool {
        self.handshake_seen
    }

    /// The endpoint that sends in `dir`. Panics only if no segment was handled yet.
    pub fn sender(&self, dir: Dir) -> &Endpoint {
        self.endpoint(dir).expect("sender() called before any segment was handled")
    }

    /// The endpoint that sends in `dir`, once a segment was handled.
    pub fn endpoint(&self, dir: Dir) -> Option<&Endpoint> {
        match dir {
            Dir::ToServer => self.client.as_ref(),
            Dir::ToClient => self.server.as_ref(),
        }
    }

    /// Offset in `dir`'s stream up to which the receiver has acknowledged (data only, a FIN excluded).
    pub fn acked_offset(&self, dir: Dir) -> Option<u64> {
        let sender = self.endpoint(dir)?;
        let acked = self.endpoint(dir.reverse())?.acked?;
        let off = sender.offset(acked).max(0) as u64;
        Some(sender.data_end_offset().map_or(off, |end| off.min(end)))
    }

    /// The reassembled bytes sent in `dir` (offset 0 is the byte after the SYN).
    pub fn stream(&self, dir: Dir) -> &Stream {
        &self.sender(dir).stream
    }

    /// Releases bytes sent in `dir` below `offset`.
    pub fn trim(&mut self, dir: Dir, offset: u64) {
        if let Some(e) = self.endpoint_mut(dir) {
            e.stream.trim(offset);
        }
    }

    fn endpoint_mut(&mut self, dir: Dir) -> Option<&mut Endpoint> {
        match dir {
            Dir::ToServer => self.client.as_mut(),
            Dir::ToClient => self.server.as_mut(),
        }
    }

    /// The server socket's state, as Linux would report it.
    pub fn state(&self) -> TcpState {
        let (Some(c), Some(s)) = (&self.client, &self.server) else {
            return if self.client.as_ref().is_some_and(|c| c.isn.is_some()) {
                TcpState::SynRecv
            } else {
                TcpState::Close
            };
        };
        if self.rst {
            return TcpState::Close;
        }
        if !self.established {
            return TcpState::SynRecv;
        }
        // The server received the client's FIN once it acknowledged it.
        let fin_received = matches!((c.fin_seq, s.acked), (Some(f), Some(a)) if a.diff(f) > 0);
        let fin_sent = s.fin_seq.is_some();
        let fin_acked = matches!((s.fin_seq, c.acked), (Some(f), Some(a)) if a.diff(f) > 0);
        match (fin_sent, fin_acked, fin_received) {
            (false, _, false) => TcpState::Established,
            (false, _, true) => TcpState::CloseWait,
            (true, false, false) => TcpState::FinWait1,
            (true, true, false) => TcpState::FinWait2,
            // Which FIN came first decides between Closing/LastAck; the server
            // acknowledging the client's FIN after sending its own is Closing.
            (true, false, true) => {
                if self.server_fin_first() {
                    TcpState::Closing
                } else {
                    TcpState::LastAck
                }
            }
            (true, true, true) => {
                if self.server_fin_first() {
                    TcpState::TimeWait
                } else {
                    TcpState::Close
                }
            }
        }
    }

    /// Whether the server sent its FIN before it acknowledged the client's
    /// (active close), judged by the ACK the server's FIN carried.
    fn server_fin_first(&self) -> bool {
        let (Some(c), Some(s)) = (&self.client, &self.server) else {
            return false;
        };
        match (c.fin_seq, s.fin_ack) {
            (Some(cf), Some(ack_on_fin)) => ack_on_fin.diff(cf) <= 0,
            _ => true,
        }
    }

    /// Handles one segment seen at time `now`, travelling in `dir`.
    pub fn handle_segment(&mut self, now: Duration, dir: Dir, seg: &Segment) -> Result<(), TrackError> {
        // What the steps set before a later check refuses the segment (the endpoints
        // of a first segment, a stream's origin) is undone: a refusal changes nothing.
        let had = [&self.client, &self.server].map(|e| e.as_ref().map(|e| e.seq0.is_some()));
        let result = self.apply_segment(now, dir, seg);
        if result.is_err() {
            for (slot, had) in [&mut self.client, &mut self.server].into_iter().zip(had) {
                match (had, slot.as_mut()) {
                    (None, _) => *slot = None,
                    (Some(false), Some(e)) => {
                        e.seq0 = None;
                        e.high = (Seq(0), 0);
                    }
                    _ => {}
                }
            }
            if had[0].is_none() {
                self.handshake_seen = false;
                self.established = false;
            }
        }
        result
    }

    fn apply_segment(&mut self, now: Duration, dir: Dir, seg: &Segment) -> Result<(), TrackError> {
        let first = self.client.is_none();
        self.check_addresses(dir, seg)?;
        if seg.flags.syn() {
            return self.handle_syn(now, dir, seg);
        }
        if first {
            // First seen mid-stream: options and window scaling are unknown.
            self.handshake_seen = false;
            self.established = true;
        }
        self.ensure_seq0(dir, seg);
        self.check_acceptable(dir, seg)?;
        if seg.flags.rst() {
            self.rst = true;
            self.sender_mut(dir).rst_seen = true;
            return Ok(());
        }
        let prev_ack = self.sender(dir).acked;
        if seg.flags.ack() {
            self.handle_ack(dir, seg)?;
        }
        self.update_window(dir, seg, prev_ack);
        self.update_timestamp(now, dir, seg);
        self.handle_payload(dir, seg.seq, seg.payload);
        if seg.flags.fin() {
            let s = self.sender_mut(dir);
            let fin = seg.seq + seg.payload.len() as u32;
            if s.fin_seq.is_none() {
                s.fin_seq = Some(fin);
                if dir == Dir::ToClient {
                    s.fin_ack = seg.flags.ack().then_some(seg.ack);
                }
            }
            s.fin_seen = true;
            s.advance_high(fin + 1);
        }
        if dir == Dir::ToServer && self.server_acks == ServerAcks::Inferred {
            self.infer_server_ack();
        }
        Ok(())
    }

    /// [`ServerAcks::Inferred`]: the server has received the contiguous client bytes
    /// (and the client's FIN right after them).
    fn infer_server_ack(&mut self) {
        let (Some(c), Some(s)) = (self.client.as_ref(), self.server.as_mut()) else { return };
        let Some(seq0) = c.seq0 else { return };
        let end = c.stream.contiguous_end();
        let mut ack = seq0 + end as u32;
        if c.data_end_offset() == Some(end) {
            ack = ack + 1;
        }
        if s.acked.is_none_or(|prev| ack.diff(prev) > 0) {
            s.acked = Some(ack);
        }
    }

    /// Feeds server bytes at stream offset `offset` (the primary's reply log).
    pub fn handle_server_data(&mut self, offset: u64, data: &[u8]) -> Result<(), TrackError> {
        let s = self.server.as_mut().ok_or(TrackError::NoServerIsn)?;
        let seq0 = s.seq0.ok_or(TrackError::NoServerIsn)?;
        // Keep the 64-bit offset exact even across several 4 GiB wraps.
        let end = offset + data.len() as u64;
        if end > s.high.1 {
            s.high = (seq0 + end as u32, end);
        }
        Self::insert_payload(s, offset, data);
        Ok(())
    }

    fn sender_mut(&mut self, dir: Dir) -> &mut Endpoint {
        self.endpoint_mut(dir).expect("endpoints exist once a segment was handled")
    }

    fn receiver(&self, dir: Dir) -> Option<&Endpoint> {
        match dir {
            Dir::ToServer => self.server.as_ref(),
            Dir::ToClient => self.client.as_ref(),
        }
    }

    fn check_addresses(&mut self, dir: Dir, seg: &Segment) -> Result<(), TrackError> {
        let (client, server) = match dir {
            Dir::ToServer => (seg.src, seg.dst),
            Dir::ToClient => (seg.dst, seg.src),
        };
        match (&self.client, &self.server) {
            (Some(c), _) if c.addr != client => Err(TrackError::WrongConnection { src: seg.src, dst: seg.dst }),
            (_, Some(s)) if s.addr != server => Err(TrackError::WrongConnection { src: seg.src, dst: seg.dst }),
            _ => {
                // Both endpoints exist from the first segment on, so later checks can rely on them.
                if self.client.is_none() {
                    self.client = Some(Endpoint::new(client));
                }
                if self.server.is_none() {
                    self.server = Some(Endpoint::new(server));
                }
                Ok(())
            }
        }
    }

    fn handle_syn(&mut self, now: Duration, dir: Dir, seg: &Segment) -> Result<(), TrackError> {
        if seg.flags.rst() || (dir == Dir::ToServer) == seg.flags.ack() {
            return Err(TrackError::UnexpectedSyn(dir));
        }
        if dir == Dir::ToClient {
            // A SYN-ACK must acknowledge the client's SYN, when we saw it.
            if let Some(isn) = self.client.as_ref().and_then(|c| c.isn)
                && seg.ack != isn + 1
            {
                return Err(TrackError::UnexpectedSyn(dir));
            }
        }
        let e = self.sender_mut(dir);
        if let Some(isn) = e.isn {
            if isn != seg.seq {
                return Err(TrackError::NewIsn { isn: seg.seq });
            }
            // A retransmitted SYN: nothing new.
            return Ok(());
        }
        if e.seq0.is_some() {
            // A SYN after mid-stream data from the same endpoint: a different connection.
            return Err(TrackError::NewIsn { isn: seg.seq });
        }
        e.isn = Some(seg.seq);
        e.set_seq0(seg.seq + 1);
        e.mss = seg.options.mss;
        e.wscale = seg.options.wscale;
        e.sack_permitted = seg.options.sack_permitted;
        e.timestamps = seg.options.timestamps.is_some();
        // The window in a SYN is never scaled (RFC 7323 §2.2).
        e.window = seg.window as u32;
        e.window_raw = seg.window;
        e.wl = Some((seg.seq, seg.ack));
        e.syn_window = seg.window as u32;
        if let Some(ts) = seg.options.timestamps {
            e.ts_val = Some((ts.val, now));
        }
        if dir == Dir::ToClient {
            e.acked = Some(seg.ack);
            let client = self.client.as_mut().expect("endpoints exist");
            if client.isn.is_none() && client.seq0.is_none() {
                // Handshake seen from the SYN-ACK on: the client's ISN follows from its ACK.
                client.isn = Some(seg.ack - 1);
                client.set_seq0(seg.ack);
            }
            self.handshake_seen = self.client.as_ref().is_some_and(|c| c.isn.is_some());
        }
        Ok(())
    }

    /// Gives each endpoint a stream origin the first time its sequence space shows up.
    fn ensure_seq0(&mut self, dir: Dir, seg: &Segment) {
        let s = self.sender_mut(dir);
        if s.seq0.is_none() {
            s.set_seq0(seg.seq);
        }
        if seg.flags.ack() {
            let r = self.endpoint_mut(dir.reverse()).expect("endpoints exist");
            if r.seq0.is_none() {
                r.set_seq0(seg.ack);
            }
        }
    }

    /// Refuses segments the receiver's kernel would drop (RFC 9293 §3.10.7.4, RFC 5961).
    fn check_acceptable(&self, dir: Dir, seg: &Segment) -> Result<(), TrackError> {
        let Some(r) = self.receiver(dir) else {
            return Ok(());
        };
        let Some(rcv_nxt) = r.acked else {
            return Ok(());
        };
        // Without the handshake the window scale is unknown, so windows mean nothing.
        let inferred = dir == Dir::ToServer && self.server_acks == ServerAcks::Inferred;
        let windows_known = self.handshake_seen && self.validation == Validation::Kernel;
        let window = if inferred && windows_known {
            // The server's windows are not seen: hold client data to the largest
            // window the server could ever advertise, which never lags the real one
            // but still bounds what a flooding client can make the replica keep.
            let scaled = self.client.as_ref().is_some_and(|c| c.wscale.is_some()) && r.wscale.is_some();
            let shift = if scaled { r.wscale.unwrap_or(0).min(14) } else { 0 };
            ((u16::MAX as u32) << shift).max(r.syn_window)
        } else if r.wl.is_some() && windows_known {
            r.max_window.max(r.syn_window)
        } else {
            UNKNOWN_WINDOW
        };
        let right = rcv_nxt + window.max(1) + WINDOW_SLACK;
        if seg.flags.rst() {
            // RFC 5961 §3.2: a RST must fall in the window; exactly rcv_nxt resets at
            // once, others draw a challenge ACK. Accept the window as the kernel's
            // own check allows a RST at rcv_nxt - 1 after a FIN too.
            let ok = seg.seq.diff(rcv_nxt - 1) >= 0 && seg.seq.diff(right) < 0;
            return if ok { Ok(()) } else { Err(TrackError::BadRst { dir, seq: seg.seq }) };
        }
        let end = seg.seq + seg.seq_len();
        // Entirely beyond the window, or absurdly old (more than a window behind).
        if seg.seq.diff(right) >= 0 || end.diff(rcv_nxt - window.max(1 << 16)) < 0 {
            return Err(TrackError::OutOfWindow { dir, seq: seg.seq });
        }
        Ok(())
    }

    fn handle_ack(&mut self, dir: Dir, seg: &Segment) -> Result<(), TrackError> {
        let trim_on_ack = self.trim_on_ack;
        let windows_known = self.handshake_seen && self.validation == Validation::Kernel;
        let (s, r) = match dir {
            Dir::ToServer => (self.client.as_mut(), self.server.as_mut()),
            Dir::ToClient => (self.server.as_mut(), self.client.as_mut()),
        };
        let (s, r) = (s.expect("endpoints exist"), r.expect("endpoints exist"));
        let ack = seg.ack;
        if s.acked.is_some_and(|prev| ack.diff(prev) <= 0) {
            return Ok(()); // Old or duplicate ACK.
        }
        // The ACK may cover bytes the capture missed, but never more than the
        // acknowledging side ever allowed the other to send.
        let next = r.high.0;
        if ack.diff(next) > 0 {
            let allowed = match s.acked {
                Some(prev) if s.wl.is_some() && windows_known => prev + s.max_window.max(s.syn_window).max(1),
                _ => next + UNKNOWN_WINDOW,
            };
            if ack.diff(allowed) > 0 {
                return Err(TrackError::AckOfUnsent { dir, ack, next });
            }
            r.advance_high(ack);
        }
        s.acked = Some(ack);
        if dir == Dir::ToServer && r.isn.is_some() && ack.diff(r.isn.unwrap_or(ack)) > 0 {
            self.established = true;
        }
        // Bytes below the ACK (excluding a FIN) exist: fill the gaps the capture missed.
        let mut ack_off = r.offset(ack).max(0) as u64;
        if let Some(end) = r.data_end_offset() {
            ack_off = ack_off.min(end);
        }
        let trim = trim_on_ack && dir == Dir::ToServer;
        let stream_end = r.stream.contiguous_end();
        if ack_off > stream_end && ack_off > r.stream.start() {
            let hole = if trim {
                let seen_above = r.stream.highest_end().min(ack_off);
                let missing =
                    ack_off - stream_end - r.stream.pending_bytes().min((seen_above - stream_end) as usize) as u64;
                r.stream.trim(ack_off);
                missing
            } else {
                r.stream.skip_to(ack_off)
            };
            r.missing_bytes += hole;
        } else if trim {
            r.stream.trim(ack_off);
        }
        Ok(())
    }

    /// Takes the sender's window from this segment when the receiving kernel would
    /// (Linux `tcp_may_update_window`, a refinement of RFC 9293 §3.10.7.4): the ACK
    /// advances, or the segment is newer, or the same segment grows (or zeroes) the window.
    fn update_window(&mut self, dir: Dir, seg: &Segment, prev_ack: Option<Seq>) {
        if !seg.flags.ack() {
            return;
        }
        let both_scale = self.client.as_ref().is_some_and(|c| c.wscale.is_some())
            && self.server.as_ref().is_some_and(|s| s.wscale.is_some());
        let s = self.sender_mut(dir);
        let shift = if both_scale { s.wscale.unwrap_or(0).min(14) } else { 0 };
        let nwin = (seg.window as u32) << shift;
        let cur = s.window;
        let ack_advanced = prev_ack.is_none_or(|p| seg.ack.diff(p) > 0);
        let update = match s.wl {
            None => true,
            Some((wl1, _)) => ack_advanced || seg.seq.diff(wl1) > 0 || (seg.seq == wl1 && (nwin > cur || nwin == 0)),
        };
        if update {
            s.window = nwin;
            s.window_raw = seg.window;
            s.wl = Some((seg.seq, seg.ack));
            s.max_window = s.max_window.max(nwin);
        }
    }

    fn update_timestamp(&mut self, now: Duration, dir: Dir, seg: &Segment) {
        if let Some(ts) = seg.options.timestamps {
            let s = self.sender_mut(dir);
            match s.ts_val {
                Some((v, _)) if (ts.val.wrapping_sub(v) as i32) <= 0 => {}
                _ => s.ts_val = Some((ts.val, now)),
            }
        }
    }

    fn handle_payload(&mut self, dir: Dir, seq: Seq, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let s = self.sender_mut(dir);
        let off = s.offset(seq);
        s.advance_high(seq + payload.len() as u32);
        let (off, bytes) = if off < 0 {
            // Bytes before the stream start (e.g. a keep-alive probe at ISN).
            let skip = (-off) as usize;
            if skip >= payload.len() {
                s.retransmitted_bytes += payload.len() as u64;
                return;
            }
            s.retransmitted_bytes += skip as u64;
            (0u64, &payload[skip..])
        } else {
            (off as u64, payload)
        };
        Self::insert_payload(s, off, bytes);
    }

    fn insert_payload(s: &mut Endpoint, off: u64, bytes: &[u8]) {
        let end = off + bytes.len() as u64;
        // Bytes below the retained start were seen (or trimmed) before.
        let start = s.stream.start();
        let (off, bytes) = if off < start {
            let skip = ((start - off) as usize).min(bytes.len());
            s.retransmitted_bytes += skip as u64;
            (start, &bytes[skip..])
        } else {
            (off, bytes)
        };
        if bytes.is_empty() || end <= start {
            return;
        }
        let before = s.stream.contiguous_end() + s.stream.pending_bytes() as u64;
        s.stream.insert(off, bytes);
        let after = s.stream.contiguous_end() + s.stream.pending_bytes() as u64;
        let new = after - before;
        s.payload_bytes += new;
        s.retransmitted_bytes += bytes.len() as u64 - new;
    }

    /// Client bytes seen beyond the server's last ACK (the kernel may hold them unacknowledged).
    pub fn client_bytes_beyond_ack(&self) -> u32 {
        let (Some(c), Some(s)) = (&self.client, &self.server) else {
            return 0;
        };
        let Some(acked) = s.acked else { return 0 };
        let high = c.stream.highest_end();
        let acked_off = c.offset(acked).max(0) as u64;
        high.saturating_sub(acked_off).min(u32::MAX as u64) as u32
    }

    /// Whether the server end is established with every byte it sent acknowledged: its
    /// [`restore_plan`](Self::restore_plan), if it has one, sends nothing (no send queue, no FIN either
    /// way). Costs no copy, so a takeover can sort thousands of connections by it before planning.
    pub fn at_rest(&self) -> bool {
        let (Some(c), Some(s)) = (&self.client, &self.server) else {
            return false;
        };
        let Some(snd_una) = c.acked else { return false };
        self.handshake_seen && self.state() == TcpState::Established && s.offset(snd_una) >= s.high.1 as i64
    }

    /// Derives everything `TCP_REPAIR` needs to recreate the server end at time `now`.
    ///
    /// The receive queue holds the client bytes retained (not `trim`med) up to the
    /// server's ACK; the send queue holds the server bytes the client has not
    /// acknowledged. `tsval` is the server's last timestamp advanced by the time
    /// elapsed since it was seen (Linux's timestamp clock ticks in milliseconds).
    pub fn restore_plan(&self, now: Duration) -> Result<RestorePlan, PlanError> {
        self.plan(now, true)
    }

    /// [`restore_plan`](Self::restore_plan) with its queues left in this tracker's streams
    /// ([`Queue::InStream`]): nothing is copied, and the restore reads them from this tracker
    /// ([`QueueSource`]), which must not change meanwhile.
    pub fn restore_plan_in_place(&self, now: Duration) -> Result<RestorePlan, PlanError> {
        self.plan(now, false)
    }

    fn plan(&self, now: Duration, copy: bool) -> Result<RestorePlan, PlanError> {
        let state = self.state();
        if !self.handshake_seen {
            return Err(PlanError::MidStream);
        }
        match state {
            TcpState::SynRecv | TcpState::SynSent | TcpState::Listen => {
                return Err(PlanError::HandshakeIncomplete(state));
            }
            TcpState::Close => return Err(PlanError::Closed(state)),
            _ => {}
        }
        // The server acknowledged the client's FIN, but that ACK may have been lost with the primary (its
        // gate holds it until replicated, and a frozen kernel's lease drops it): the client then resends
        // its FIN to the new primary, which without a socket would answer with a RST. So TIME_WAIT is
        // restored one step back, in FIN_WAIT2 without the client's FIN, and the resent FIN is acknowledged.
        // (A client that did get the ACK answers the restored socket's window probe with a RST, which
        // ends the socket.)
        let fin_acked_by_server =
            matches!(state, TcpState::CloseWait | TcpState::LastAck | TcpState::Closing | TcpState::TimeWait);
        let state = if state == TcpState::TimeWait { TcpState::FinWait2 } else { state };
        let (c, s) = match (&self.client, &self.server) {
            (Some(c), Some(s)) => (c, s),
            _ => return Err(PlanError::HandshakeIncomplete(state)),
        };
        let snd_una = c.acked.ok_or(PlanError::HandshakeIncomplete(state))?;
        let server_acked = s.acked.ok_or(PlanError::HandshakeIncomplete(state))?;

        // Send queue: server data from the client's ACK to the end of what was sent.
        let una_off = s.offset(snd_una).max(0) as u64;
        let data_end = s.data_end_offset().unwrap_or(s.high.1);
        let una_off = una_off.min(data_end);
        if s.stream.contiguous_end() < data_end || s.stream.has_gap_in(0..data_end) || s.stream.start() > una_off {
            let from = una_off.max(s.stream.start().min(una_off));
            return Err(PlanError::MissingBytes { dir: Dir::ToClient, from, to: data_end });
        }
        let queue = |stream: &Stream, range: Range<u64>| {
            if copy { Queue::Bytes(stream.copy_range(range)) } else { Queue::InStream(range) }
        };
        let send_queue = queue(&s.stream, una_off..data_end);

        // Receive queue: retained client bytes up to the server's ACK (before a FIN).
        let fin_received = matches!(state, TcpState::CloseWait | TcpState::LastAck | TcpState::Closing);
        let acked_off = c.offset(server_acked).max(0) as u64;
        let rcv_end = match c.data_end_offset() {
            Some(end) if fin_acked_by_server => end,
            _ => acked_off,
        };
        let rcv_start = c.stream.start();
        if rcv_start > rcv_end {
            return Err(PlanError::TrimmedPastAck { trimmed: rcv_start, acked: rcv_end });
        }
        if c.stream.contiguous_end() < rcv_end || c.stream.has_gap_in(0..rcv_end) {
            return Err(PlanError::MissingBytes { dir: Dir::ToServer, from: rcv_start, to: rcv_end });
        }
        let recv_queue = queue(&c.stream, rcv_start..rcv_end);
        let rcv_nxt = if fin_acked_by_server { server_acked - 1 } else { server_acked };

        let both_scale = c.wscale.is_some() && s.wscale.is_some();
        let (snd_shift, rcv_shift) =
            if both_scale { (c.wscale.unwrap_or(0).min(14), s.wscale.unwrap_or(0).min(14)) } else { (0, 0) };
        let timestamps = c.timestamps && s.timestamps;
        let window = RepairWindow {
            snd_wl1: c.wl.map(|(seq, _)| seq).unwrap_or(snd_una),
            snd_wnd: c.window,
            max_window: c.max_window,
            rcv_wnd: s.window,
            rcv_wup: if rcv_nxt.diff(server_acked) < 0 { rcv_nxt } else { server_acked },
        };
        let tsval = if timestamps {
            s.ts_val.map(|(v, seen)| v.wrapping_add(now.saturating_sub(seen).as_millis() as u32))
        } else {
            None
        };
        Ok(RestorePlan {
            local: s.addr,
            remote: c.addr,
            state,
            options: PlanOptions {
                mss: c.mss.unwrap_or(536),
                wscale: both_scale.then_some((snd_shift, rcv_shift)),
                sack: c.sack_permitted && s.sack_permitted,
                timestamps,
            },
            snd_una,
            send_queue,
            unsent: Queue::default(),
            rcv_nxt,
            recv_queue,
            fin_sent: s.fin_seq.is_some(),
            fin_received,
            window,
            tsval,
            ts_recent: if timestamps { c.ts_val() } else { None },
        })
    }

    /// The plan of a connection whose handshake ended unseen: the server's SYN-ACK was seen, the
    /// client's ACK of it was not (lost with the primary, whose gate held it). The plan is the
    /// established connection that ACK would have made, with nothing sent either way; it is right only
    /// if the client did receive the SYN-ACK, so the caller must confirm that with the client (a
    /// client still in SYN-SENT would keep resending its SYN to an established socket). `None` unless
    /// the connection is in exactly that state.
    pub fn unconfirmed_handshake_plan(&self, now: Duration) -> Option<RestorePlan> {
        use crate::segment::{SegmentBuilder, TcpFlags, TcpOptions, Timestamps};
        let (c, s) = (self.client.as_ref()?, self.server.as_ref()?);
        let (client_isn, server_isn) = (c.isn?, s.isn?);
        let seen_nothing_after = self.state() == TcpState::SynRecv
            && self.handshake_seen
            && !self.rst
            && s.acked == Some(client_isn + 1)
            && c.acked.is_none()
            && c.payload_bytes == 0
            && s.payload_bytes == 0
            && !c.fin_seen
            && !s.fin_seen;
        if !seen_nothing_after {
            return None;
        }
        let mut ack = SegmentBuilder::new(c.addr, s.addr);
        ack.flags = TcpFlags::ACK;
        ack.seq = client_isn + 1;
        ack.ack = server_isn + 1;
        let shift = if c.wscale.is_some() && s.wscale.is_some() { c.wscale.unwrap_or(0).min(14) } else { 0 };
        ack.window = (c.syn_window >> shift).min(u32::from(u16::MAX)) as u16;
        let mut opts = TcpOptions::default();
        if c.timestamps && s.timestamps {
            opts.timestamps = Some(Timestamps { val: c.ts_val().unwrap_or(0), ecr: s.ts_val().unwrap_or(0) });
        }
        ack.options = opts;
        let bytes = ack.build(&[]);
        let seg = Segment::parse_ipv4(&bytes, crate::segment::Checksums::Skip).ok()?;
        let mut t = self.clone();
        let at = c.ts_val.map_or(now, |(_, seen)| seen);
        t.handle_segment(at, Dir::ToServer, &seg).ok()?;
        t.restore_plan(now).ok().filter(|p| p.state == TcpState::Established)
    }

    /// Addresses of (client, server), once a segment was handled.
    pub fn addresses(&self) -> Option<(SocketAddrV4, SocketAddrV4)> {
        Some((self.client.as_ref()?.addr, self.server.as_ref()?.addr))
    }
}

/// The queues of a plan made in place ([`Tracker::restore_plan_in_place`]) are read from here.
impl QueueSource for Tracker {
    fn queue_bytes(&self, dir: Dir, range: Range<u64>) -> Option<[&[u8]; 2]> {
        let s = self.stream(dir);
        let held = s.start() <= range.start && range.start <= range.end && range.end <= s.contiguous_end();
        held.then(|| s.slices(range).into())
    }
}

#[cfg(test)]
#[allow(clippy::too_many_arguments, clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::segment::{Checksums, SegmentBuilder, TcpFlags, TcpOptions, Timestamps};

    const A: u8 = TcpFlags::ACK;
    const C: &str = "10.0.0.1:40000";
    const S: &str = "10.0.0.2:80";

    /// Drives a tracker with well-formed segments of a scripted connection.
    struct Conn {
        t: Tracker,
        cseq: Seq,
        sseq: Seq,
        now: Duration,
        ts: bool,
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    impl Conn {
        fn seg(
            &mut self,
            dir: Dir,
            flags: u8,
            seq: Seq,
            ack: Seq,
            window: u16,
            opts: TcpOptions,
            payload: &[u8],
        ) -> Result<(), TrackError> {
            let (src, dst) = match dir {
                Dir::ToServer => (C, S),
                Dir::ToClient => (S, C),
            };
            let mut b = SegmentBuilder::new(src.parse().unwrap(), dst.parse().unwrap());
            b.flags = flags;
            b.seq = seq;
            b.ack = ack;
            b.window = window;
            b.options = opts;
            if self.ts && b.options.timestamps.is_none() {
                let val = self.now.as_millis() as u32 + if dir == Dir::ToServer { 1_000_000 } else { 0 };
                b.options.timestamps = Some(Timestamps { val, ecr: 0 });
            }
            let bytes = b.build(payload);
            let seg = Segment::parse_ipv4(&bytes, Checksums::Verify).unwrap();
            self.t.handle_segment(self.now, dir, &seg)
        }

        /// Handshake with window scaling 7 both ways, SACK, and optionally timestamps.
        fn open(cisn: u32, sisn: u32, ts: bool) -> Conn {
            let mut c = Conn { t: Tracker::new(), cseq: Seq(cisn), sseq: Seq(sisn), now: ms(1000), ts };
            let mut o = TcpOptions::default();
            o.mss = Some(1460);
            o.wscale = Some(7);
            o.sack_permitted = true;
            if ts {
                o.timestamps = Some(Timestamps { val: 1_000_000, ecr: 0 });
            }
            c.seg(Dir::ToServer, TcpFlags::SYN, c.cseq, Seq(0), 64240, o, b"").unwrap();
            if ts {
                o.timestamps = Some(Timestamps { val: 500, ecr: 1_000_000 });
            }
            o.wscale = Some(9);
            let (s, ack) = (c.sseq, c.cseq + 1);
            c.seg(Dir::ToClient, TcpFlags::SYN | A, s, ack, 65160, o, b"").unwrap();
            c.cseq = c.cseq + 1;
            c.sseq = c.sseq + 1;
            c.ack(Dir::ToServer, 502);
            c
        }

        fn data(&mut self, dir: Dir, payload: &[u8]) {
            let (seq, ack) = self.seqs(dir);
            self.seg(dir, A | TcpFlags::PSH, seq, ack, 502, TcpOptions::default(), payload).unwrap();
            *self.next(dir) = seq + payload.len() as u32;
        }

        fn ack(&mut self, dir: Dir, window: u16) {
            let (seq, ack) = self.seqs(dir);
            self.seg(dir, A, seq, ack, window, TcpOptions::default(), b"").unwrap();
        }

        fn fin(&mut self, dir: Dir) {
            let (seq, ack) = self.seqs(dir);
            self.seg(dir, A | TcpFlags::FIN, seq, ack, 502, TcpOptions::default(), b"").unwrap();
            *self.next(dir) = seq + 1;
        }

        fn seqs(&self, dir: Dir) -> (Seq, Seq) {
            match dir {
                Dir::ToServer => (self.cseq, self.sseq),
                Dir::ToClient => (self.sseq, self.cseq),
            }
        }

        fn next(&mut self, dir: Dir) -> &mut Seq {
            match dir {
                Dir::ToServer => &mut self.cseq,
                Dir::ToClient => &mut self.sseq,
            }
        }
    }

    #[test]
    fn last_timestamp_at_follows_each_sender() {
        let mut c = Conn::open(5000, 7000, true);
        c.now = ms(2000);
        c.data(Dir::ToServer, b"GET / HTTP/1.1\r\n\r\n");
        c.now = ms(2500);
        c.ack(Dir::ToClient, 502);
        assert_eq!(c.t.sender(Dir::ToServer).last_timestamp_at(), Some(ms(2000)));
        assert_eq!(c.t.sender(Dir::ToClient).last_timestamp_at(), Some(ms(2500)));
        let plain = Conn::open(5000, 7000, false);
        assert_eq!(plain.t.sender(Dir::ToServer).last_timestamp_at(), None);
    }

    #[test]
    fn at_rest_is_exactly_a_restore_that_sends_nothing() {
        // Whether the plan, if any, restores without sending anything, and whether `at_rest` says so.
        fn check(c: &Conn, step: &str, expected: bool) {
            let silent = c.t.restore_plan(ms(5000)).is_ok_and(|p| crate::repair::restores_silently(&p));
            assert_eq!(silent, expected, "{step}: restores silently");
            assert_eq!(c.t.at_rest(), expected, "{step}: at_rest");
        }
        let mut c = Conn::open(100, 9000, true);
        check(&c, "established", true);
        c.data(Dir::ToServer, b"GET / HTTP/1.1\r\n\r\n");
        check(&c, "request unacknowledged", true);
        c.ack(Dir::ToClient, 1000);
        check(&c, "request acknowledged", true);
        c.data(Dir::ToClient, b"HTTP/1.1 200 OK\r\n\r\n");
        check(&c, "reply in flight", false);
        c.ack(Dir::ToServer, 502);
        check(&c, "reply acknowledged", true);
        c.fin(Dir::ToServer);
        check(&c, "client FIN not acknowledged", true);
        c.ack(Dir::ToClient, 1000);
        check(&c, "client FIN acknowledged (CLOSE_WAIT)", false);

        let mut c = Conn::open(100, 9000, false);
        c.fin(Dir::ToClient);
        check(&c, "server FIN in flight", false);
        c.ack(Dir::ToServer, 502);
        check(&c, "server FIN acknowledged (FIN_WAIT2)", false);

        let mut t = Tracker::new();
        assert!(!t.at_rest(), "nothing seen");
        let mut c = Conn { t: std::mem::take(&mut t), cseq: Seq(7), sseq: Seq(70), now: ms(1000), ts: false };
        c.seg(Dir::ToServer, TcpFlags::SYN, Seq(7), Seq(0), 64240, TcpOptions::default(), b"").unwrap();
        c.seg(Dir::ToClient, TcpFlags::SYN | A, Seq(70), Seq(8), 64240, TcpOptions::default(), b"").unwrap();
        assert!(!c.t.at_rest(), "handshake without its last ACK");
    }

    #[test]
    fn handshake_negotiates_options_and_establishes() {
        let c = Conn::open(100, 9000, true);
        assert!(c.t.handshake_seen());
        assert_eq!(c.t.state(), TcpState::Established);
        assert_eq!(c.t.sender(Dir::ToServer).isn, Some(Seq(100)));
        assert_eq!(c.t.sender(Dir::ToClient).isn, Some(Seq(9000)));
        let p = c.t.restore_plan(ms(1000)).unwrap();
        assert_eq!(p.options, PlanOptions { mss: 1460, wscale: Some((7, 9)), sack: true, timestamps: true });
        assert_eq!(p.snd_una, Seq(9001));
        assert_eq!(p.rcv_nxt, Seq(101));
        assert!(p.send_queue.is_empty() && p.recv_queue.is_empty());
        assert_eq!(p.window.snd_wnd, 502 << 7);
        assert_eq!(p.window.rcv_wnd, 65160, "the SYN-ACK window is not scaled");
        assert_eq!(p.ts_recent, Some(1_001_000));
    }

    #[test]
    fn established_exchange_across_the_sequence_wrap_plans_exact_queues() {
        let mut c = Conn::open(u32::MAX - 5, u32::MAX - 2, false);
        c.data(Dir::ToServer, b"GET / HTTP/1.1\r\n\r\n");
        c.ack(Dir::ToClient, 1000);
        c.data(Dir::ToClient, b"HTTP/1.1 200 OK\r\n");
        c.data(Dir::ToClient, b"body");
        // The client acknowledged only the status line so far.
        let (seq, _) = c.seqs(Dir::ToServer);
        let ack = c.sseq - 4;
        c.seg(Dir::ToServer, A, seq, ack, 502, TcpOptions::default(), b"").unwrap();
        assert_eq!(c.t.stream(Dir::ToServer).copy_range(0..100), b"GET / HTTP/1.1\r\n\r\n");
        let p = c.t.restore_plan(ms(2000)).unwrap();
        assert_eq!(p.send_queue, b"body");
        assert_eq!(p.snd_una, ack);
        assert_eq!(p.snd_nxt(), c.sseq);
        assert_eq!(p.rcv_nxt, c.cseq);
        assert_eq!(p.recv_queue, b"GET / HTTP/1.1\r\n\r\n", "nothing trimmed: the whole request is unread");
        assert_eq!(p.tsval, None);
        // Once the application consumed the request, the receive queue is empty.
        c.t.trim(Dir::ToServer, 18);
        assert!(c.t.restore_plan(ms(2000)).unwrap().recv_queue.is_empty());
    }

    #[test]
    fn established_retransmitted_segment_is_not_reassembled_twice() {
        let mut c = Conn::open(1, 1, false);
        c.t.set_trim_on_ack(false);
        c.data(Dir::ToClient, b"abcd");
        let (seq, ack) = c.seqs(Dir::ToClient);
        c.seg(Dir::ToClient, A, seq - 4, ack, 502, TcpOptions::default(), b"abcd").unwrap();
        c.data(Dir::ToClient, b"ef");
        let e = c.t.sender(Dir::ToClient);
        assert_eq!(e.payload_bytes, 6);
        assert_eq!(e.retransmitted_bytes, 4);
        assert_eq!(c.t.stream(Dir::ToClient).copy_range(0..10), b"abcdef");
    }

    #[test]
    fn out_of_order_data_is_held_until_the_hole_fills() {
        let mut c = Conn::open(1, 1, false);
        let (seq, ack) = c.seqs(Dir::ToServer);
        c.seg(Dir::ToServer, A, seq + 3, ack, 502, TcpOptions::default(), b"def").unwrap();
        assert_eq!(c.t.stream(Dir::ToServer).contiguous_end(), 0);
        c.seg(Dir::ToServer, A, seq, ack, 502, TcpOptions::default(), b"abc").unwrap();
        assert_eq!(c.t.stream(Dir::ToServer).copy_range(0..6), b"abcdef");
        assert_eq!(c.t.client_bytes_beyond_ack(), 6);
    }

    #[test]
    fn client_ack_trims_the_server_stream() {
        let mut c = Conn::open(1, 1, false);
        c.data(Dir::ToClient, &[7u8; 3000]);
        assert_eq!(c.t.stream(Dir::ToClient).retained_bytes(), 3000);
        c.ack(Dir::ToServer, 502);
        assert_eq!(c.t.stream(Dir::ToClient).retained_bytes(), 0);
        assert!(c.t.restore_plan(ms(1)).unwrap().send_queue.is_empty());
    }

    #[test]
    fn reply_log_bytes_fill_the_send_queue() {
        let mut c = Conn::open(1, 1, false);
        c.t.handle_server_data(0, b"HTTP/1.1 200 OK\r\n").unwrap();
        c.t.handle_server_data(17, b"xyz").unwrap();
        let p = c.t.restore_plan(ms(1)).unwrap();
        assert_eq!(p.send_queue, b"HTTP/1.1 200 OK\r\nxyz");
        assert_eq!(p.snd_nxt(), Seq(2 + 20));
    }

    #[test]
    fn out_of_window_data_changes_nothing() {
        let mut c = Conn::open(1, 1, false);
        let (seq, ack) = c.seqs(Dir::ToServer);
        let before = format!("{:?}", c.t);
        let err = c.seg(Dir::ToServer, A, seq + 10_000_000, ack, 502, TcpOptions::default(), b"evil").unwrap_err();
        assert!(matches!(err, TrackError::OutOfWindow { dir: Dir::ToServer, .. }));
        let err = c.seg(Dir::ToServer, A, seq, ack + 5_000_000, 502, TcpOptions::default(), b"").unwrap_err();
        assert!(matches!(err, TrackError::AckOfUnsent { .. }));
        let err =
            c.seg(Dir::ToServer, TcpFlags::RST, seq + 9_000_000, Seq(0), 0, TcpOptions::default(), b"").unwrap_err();
        assert!(matches!(err, TrackError::BadRst { .. }));
        assert_eq!(format!("{:?}", c.t), before);
    }

    #[test]
    fn in_window_reset_closes_and_plans_nothing() {
        let mut c = Conn::open(1, 1, false);
        let (seq, _) = c.seqs(Dir::ToServer);
        c.seg(Dir::ToServer, TcpFlags::RST, seq, Seq(0), 0, TcpOptions::default(), b"").unwrap();
        assert_eq!(c.t.state(), TcpState::Close);
        assert!(c.t.sender(Dir::ToServer).rst_seen);
        assert_eq!(c.t.restore_plan(ms(1)), Err(PlanError::Closed(TcpState::Close)));
    }

    #[test]
    fn client_half_close_is_close_wait_then_last_ack() {
        let mut c = Conn::open(10, 20, false);
        c.data(Dir::ToServer, b"upload");
        c.fin(Dir::ToServer);
        assert_eq!(c.t.state(), TcpState::Established, "FIN not acknowledged by the server yet");
        c.ack(Dir::ToClient, 502);
        assert_eq!(c.t.state(), TcpState::CloseWait);
        c.data(Dir::ToClient, b"still sending");
        let p = c.t.restore_plan(ms(1)).unwrap();
        assert!(p.fin_received && !p.fin_sent);
        assert_eq!(p.rcv_nxt, Seq(11 + 6), "rcv_nxt stops before the FIN");
        assert_eq!(p.recv_queue, b"upload");
        assert_eq!(p.send_queue, b"still sending");
        c.fin(Dir::ToClient);
        assert_eq!(c.t.state(), TcpState::LastAck);
        let p = c.t.restore_plan(ms(1)).unwrap();
        assert_eq!(p.snd_nxt(), c.sseq);
        c.ack(Dir::ToServer, 502);
        assert_eq!(c.t.state(), TcpState::Close);
    }

    #[test]
    fn a_plan_made_in_place_reads_the_bytes_the_copied_plan_holds() {
        let mut c = Conn::open(10, 20, false);
        c.data(Dir::ToServer, b"GET /next HTTP/1.1\r\n\r\n");
        c.ack(Dir::ToClient, 502);
        // Sent, acknowledged and trimmed in turns, so the stream's ring buffer wraps; the last pieces
        // stay unacknowledged.
        for i in 0..40u8 {
            c.data(Dir::ToClient, &vec![i; 1000]);
            if i % 4 == 3 && i < 36 {
                c.ack(Dir::ToServer, 502);
                let acked = c.t.acked_offset(Dir::ToClient).unwrap();
                c.t.trim(Dir::ToClient, acked);
            }
        }
        let copied = c.t.restore_plan(ms(1)).unwrap();
        let in_place = c.t.restore_plan_in_place(ms(1)).unwrap();
        assert_eq!(copied.send_queue.len(), 4000);
        assert!(matches!(in_place.send_queue, Queue::InStream(_)), "{:?}", in_place.send_queue);
        let read = |q: &Queue, dir| q.pieces(dir, &c.t).map(|[a, b]| [a, b].concat());
        assert_eq!(
            read(&in_place.send_queue, Dir::ToClient).as_ref(),
            copied.send_queue.bytes().map(|b| b.to_vec()).as_ref()
        );
        assert_eq!(read(&in_place.recv_queue, Dir::ToServer).as_deref(), Some(&b"GET /next HTTP/1.1\r\n\r\n"[..]));
        assert_eq!((in_place.snd_nxt(), in_place.recv_queue_seq()), (copied.snd_nxt(), copied.recv_queue_seq()));

        // The client holds 1500 of the 4000 bytes: the rest is unsent, still read from the stream.
        let mut adjusted = in_place.clone();
        assert!(adjusted.apply_client_ack(in_place.snd_una + 1500, 502, in_place.rcv_nxt));
        let unsent = read(&adjusted.unsent, Dir::ToClient).unwrap();
        assert_eq!(unsent, copied.send_queue.bytes().unwrap()[1500..]);
        // Bytes trimmed since are no longer there: the restore refuses the plan rather than send others.
        c.t.trim(Dir::ToClient, c.t.stream(Dir::ToClient).contiguous_end());
        assert_eq!(in_place.send_queue.pieces(Dir::ToClient, &c.t), None);
    }

    #[test]
    fn server_active_close_walks_fin_wait_to_time_wait() {
        let mut c = Conn::open(10, 20, false);
        c.data(Dir::ToClient, b"bye");
        c.fin(Dir::ToClient);
        assert_eq!(c.t.state(), TcpState::FinWait1);
        let p = c.t.restore_plan(ms(1)).unwrap();
        assert_eq!(p.send_queue, b"bye");
        assert!(p.fin_in_flight());
        assert_eq!(p.snd_nxt(), c.sseq);
        c.ack(Dir::ToServer, 502);
        assert_eq!(c.t.state(), TcpState::FinWait2);
        let p = c.t.restore_plan(ms(1)).unwrap();
        assert_eq!(p.snd_una, c.sseq, "snd_una is past the acknowledged FIN");
        assert_eq!(p.snd_nxt(), c.sseq);
        c.fin(Dir::ToServer);
        c.ack(Dir::ToClient, 502);
        assert_eq!(c.t.state(), TcpState::TimeWait);
        assert_eq!(c.t.unconfirmed_handshake_plan(ms(1)), None);
        // Restored one step back: FIN_WAIT2 expecting the client's FIN again, to acknowledge its resend.
        let p = c.t.restore_plan(ms(1)).unwrap();
        assert_eq!(p.state, TcpState::FinWait2);
        assert!(p.fin_sent && !p.fin_received);
        assert_eq!(p.rcv_nxt, c.cseq - 1, "rcv_nxt is the client's FIN");
        assert!(p.recv_queue.is_empty() && p.send_queue.is_empty());
    }

    #[test]
    fn a_handshake_whose_last_ack_was_not_seen_has_an_unconfirmed_established_plan() {
        for ts in [false, true] {
            let mut c = Conn { t: Tracker::new(), cseq: Seq(100), sseq: Seq(9000), now: ms(1000), ts };
            let mut o = TcpOptions::default();
            o.mss = Some(1460);
            o.wscale = Some(7);
            o.sack_permitted = true;
            o.timestamps = ts.then_some(Timestamps { val: 1_000_000, ecr: 0 });
            c.seg(Dir::ToServer, TcpFlags::SYN, Seq(100), Seq(0), 64240, o, b"").unwrap();
            assert_eq!(c.t.unconfirmed_handshake_plan(ms(1)), None, "no SYN-ACK yet");
            o.wscale = Some(9);
            o.timestamps = ts.then_some(Timestamps { val: 500, ecr: 1_000_000 });
            c.seg(Dir::ToClient, TcpFlags::SYN | A, Seq(9000), Seq(101), 65160, o, b"").unwrap();
            assert_eq!(c.t.state(), TcpState::SynRecv);
            assert_eq!(c.t.restore_plan(ms(1)), Err(PlanError::HandshakeIncomplete(TcpState::SynRecv)));

            let p = c.t.unconfirmed_handshake_plan(ms(1)).expect("a plan");
            assert_eq!(p.state, TcpState::Established);
            assert_eq!((p.rcv_nxt, p.snd_una), (Seq(101), Seq(9001)));
            assert!(p.send_queue.is_empty() && p.recv_queue.is_empty() && !p.fin_sent && !p.fin_received);
            assert_eq!(p.options.wscale, Some((7, 9)));
            assert_eq!((p.options.mss, p.options.sack, p.options.timestamps), (1460, true, ts));
            assert_eq!(p.tsval.is_some(), ts);
            assert!(p.window.snd_wnd >= 64240 >> 7 << 7, "the client's window from its SYN: {}", p.window.snd_wnd);

            // Once the client's ACK is seen the ordinary plan applies.
            c.cseq = Seq(101);
            c.sseq = Seq(9001);
            c.ack(Dir::ToServer, 502);
            assert_eq!(c.t.unconfirmed_handshake_plan(ms(1)), None);
            assert!(c.t.restore_plan(ms(1)).is_ok());
        }
    }

    #[test]
    fn mid_stream_connection_is_flagged_and_not_restorable() {
        let mut c = Conn { t: Tracker::new(), cseq: Seq(5000), sseq: Seq(7000), now: ms(0), ts: false };
        c.data(Dir::ToServer, b"more request");
        c.ack(Dir::ToClient, 1000);
        assert!(!c.t.handshake_seen());
        assert_eq!(c.t.state(), TcpState::Established);
        assert_eq!(c.t.stream(Dir::ToServer).copy_range(0..12), b"more request");
        assert_eq!(c.t.restore_plan(ms(0)), Err(PlanError::MidStream));
    }

    #[test]
    fn zero_window_probe_and_keepalive_deliver_nothing_twice() {
        let mut c = Conn::open(1, 1, false);
        c.data(Dir::ToClient, b"abc");
        c.ack(Dir::ToServer, 0); // client's window closes
        let (seq, ack) = c.seqs(Dir::ToClient);
        // Zero-window probe: one byte beyond the closed window.
        c.seg(Dir::ToClient, A, seq, ack, 502, TcpOptions::default(), b"d").unwrap();
        c.seg(Dir::ToClient, A, seq, ack, 502, TcpOptions::default(), b"d").unwrap();
        // Keep-alive from the client: seq one below its next, no data.
        let (cseq, cack) = c.seqs(Dir::ToServer);
        c.seg(Dir::ToServer, A, cseq - 1, cack, 0, TcpOptions::default(), b"").unwrap();
        let e = c.t.sender(Dir::ToClient);
        assert_eq!(e.payload_bytes, 4);
        assert_eq!(e.retransmitted_bytes, 1);
        assert_eq!(c.t.restore_plan(ms(1)).unwrap().send_queue, b"d");
    }

    #[test]
    fn timestamp_clock_is_extrapolated_from_the_last_value_seen() {
        let mut c = Conn::open(1, 1, true);
        c.now = ms(5000);
        c.data(Dir::ToClient, b"x"); // server tsval 5000
        let p = c.t.restore_plan(ms(5250)).unwrap();
        assert_eq!(p.tsval, Some(5250));
        assert!(p.options.timestamps);
    }

    #[test]
    fn acked_bytes_missing_from_the_capture_become_a_gap() {
        let mut c = Conn::open(1, 1, false);
        let (seq, ack) = c.seqs(Dir::ToServer);
        c.seg(Dir::ToServer, A, seq + 5, ack, 502, TcpOptions::default(), b"fghij").unwrap();
        // The server acknowledges all ten bytes: the first five were sent, not captured.
        let (sseq, _) = c.seqs(Dir::ToClient);
        c.seg(Dir::ToClient, A, sseq, seq + 10, 502, TcpOptions::default(), b"").unwrap();
        let st = c.t.stream(Dir::ToServer);
        assert_eq!(st.gaps(), &[0..5]);
        assert_eq!(st.copy_range(5..10), b"fghij");
        assert_eq!(c.t.sender(Dir::ToServer).missing_bytes, 5);
        assert!(matches!(c.t.restore_plan(ms(1)), Err(PlanError::MissingBytes { dir: Dir::ToServer, .. })));
        c.t.trim(Dir::ToServer, 10);
        assert!(c.t.restore_plan(ms(1)).is_ok());
    }

    #[test]
    fn a_serialised_tracker_continues_exactly_like_the_original() {
        // What a joining spare's snapshot relies on.
        let mut c = Conn::open(u32::MAX - 3, 7, true);
        c.data(Dir::ToServer, b"GET / HTTP/1.1\r\n\r\n");
        c.data(Dir::ToClient, b"HTTP/1.1 200 OK\r\n");
        let json = serde_json::to_string(&c.t).unwrap();
        let copy: Tracker = serde_json::from_str(&json).unwrap();
        assert_eq!(copy, c.t);
        let mut d = Conn { t: copy, cseq: c.cseq, sseq: c.sseq, now: c.now, ts: true };
        for conn in [&mut c, &mut d] {
            conn.ack(Dir::ToServer, 502);
            conn.data(Dir::ToClient, b"body");
        }
        assert_eq!(c.t, d.t);
        assert_eq!(c.t.restore_plan(ms(9)), d.t.restore_plan(ms(9)));
    }

    #[test]
    fn segments_of_another_connection_are_refused() {
        let mut c = Conn::open(1, 1, false);
        let mut b = SegmentBuilder::new("10.0.0.9:1".parse().unwrap(), S.parse().unwrap());
        b.flags = A;
        let bytes = b.build(b"");
        let seg = Segment::parse_ipv4(&bytes, Checksums::Verify).unwrap();
        assert!(matches!(c.t.handle_segment(ms(1), Dir::ToServer, &seg), Err(TrackError::WrongConnection { .. })));
    }

    #[test]
    fn syn_with_a_new_isn_is_refused_and_a_retransmitted_syn_is_harmless() {
        let mut c = Conn::open(1, 1, false);
        let o = TcpOptions::default();
        c.seg(Dir::ToServer, TcpFlags::SYN, Seq(1), Seq(0), 100, o, b"").unwrap();
        assert_eq!(
            c.seg(Dir::ToServer, TcpFlags::SYN, Seq(77), Seq(0), 100, o, b""),
            Err(TrackError::NewIsn { isn: Seq(77) })
        );
        assert_eq!(
            c.seg(Dir::ToClient, TcpFlags::SYN, Seq(5), Seq(0), 100, o, b""),
            Err(TrackError::UnexpectedSyn(Dir::ToClient))
        );
        assert_eq!(c.t.state(), TcpState::Established);
    }

    // Found by the tracker fuzz target: both refusals left endpoints or a stream origin behind.
    #[test]
    fn refused_first_segment_leaves_no_connection_behind() {
        let mut t = Tracker::new();
        let mut b = SegmentBuilder::new(C.parse().unwrap(), S.parse().unwrap());
        b.flags = TcpFlags::SYN | TcpFlags::RST;
        let bytes = b.build(b"");
        let seg = Segment::parse_ipv4(&bytes, Checksums::Verify).unwrap();
        assert_eq!(t.handle_segment(ms(0), Dir::ToServer, &seg), Err(TrackError::UnexpectedSyn(Dir::ToServer)));
        assert_eq!(t, Tracker::new());
        assert_eq!(t.addresses(), None);
    }

    #[test]
    fn refused_ack_of_unsent_bytes_leaves_the_senders_stream_origin_unset() {
        let mut t = Tracker::new();
        let mut b = SegmentBuilder::new(C.parse().unwrap(), S.parse().unwrap());
        b.flags = TcpFlags::SYN;
        b.seq = Seq(1000);
        let syn = b.build(b"");
        t.handle_segment(ms(0), Dir::ToServer, &Segment::parse_ipv4(&syn, Checksums::Verify).unwrap()).unwrap();
        let before = t.clone();
        // The server's first segment acknowledges far more than the client ever sent.
        let mut b = SegmentBuilder::new(S.parse().unwrap(), C.parse().unwrap());
        b.seq = Seq(5000);
        b.ack = Seq(1001 + (1 << 30) + 10);
        let bytes = b.build(b"");
        let seg = Segment::parse_ipv4(&bytes, Checksums::Verify).unwrap();
        assert!(matches!(t.handle_segment(ms(1), Dir::ToClient, &seg), Err(TrackError::AckOfUnsent { .. })));
        assert_eq!(t, before);
        assert_eq!(t.sender(Dir::ToClient).snd_max(), None);
    }
}

#[cfg(test)]
#[allow(clippy::too_many_arguments)]
mod validation_tests {
    #[test]
    fn inferred_server_acks_count_contiguous_client_bytes_as_received() {
        let mut t = Tracker::new();
        t.set_server_acks(ServerAcks::Inferred);
        handshake(&mut t);
        // No server ACK is ever seen; a segment far beyond the SYN-ACK's 100-byte window is kept.
        feed(&mut t, Dir::ToServer, TcpFlags::ACK, 1 + 5000, 1, 1, TcpOptions::default(), &[2u8; 1000]).unwrap();
        feed(&mut t, Dir::ToServer, TcpFlags::ACK, 1, 1, 1, TcpOptions::default(), &[1u8; 5000]).unwrap();
        assert_eq!(t.acked_offset(Dir::ToServer), Some(6000));
        let p = t.restore_plan(Duration::ZERO).unwrap();
        assert_eq!(p.rcv_nxt, Seq(6001));
        assert_eq!(p.recv_queue.len(), 6000);
        // The client's FIN right after its data counts as received too.
        feed(&mut t, Dir::ToServer, TcpFlags::ACK | TcpFlags::FIN, 6001, 1, 1, TcpOptions::default(), b"").unwrap();
        assert_eq!(t.state(), TcpState::CloseWait);
        assert_eq!(t.restore_plan(Duration::ZERO).unwrap().rcv_nxt, Seq(6001));
        // Still bounded: nothing beyond the largest window the server could offer (65535 << 7).
        let far = 6001 + (65535u32 << 7) + 10;
        let err = feed(&mut t, Dir::ToServer, TcpFlags::ACK, far, 1, 1, TcpOptions::default(), b"x");
        assert!(matches!(err, Err(TrackError::OutOfWindow { .. })));
    }

    use super::*;
    use crate::segment::{Checksums, SegmentBuilder, TcpFlags, TcpOptions};

    fn feed(
        t: &mut Tracker,
        dir: Dir,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
        opts: TcpOptions,
        payload: &[u8],
    ) -> Result<(), TrackError> {
        let (c, s) = ("10.0.0.1:40000".parse().unwrap(), "10.0.0.2:80".parse().unwrap());
        let (src, dst) = if dir == Dir::ToServer { (c, s) } else { (s, c) };
        let mut b = SegmentBuilder::new(src, dst);
        b.flags = flags;
        b.seq = Seq(seq);
        b.ack = Seq(ack);
        b.window = window;
        b.options = opts;
        let bytes = b.build(payload);
        t.handle_segment(Duration::ZERO, dir, &Segment::parse_ipv4(&bytes, Checksums::Verify).unwrap())
    }

    fn handshake(t: &mut Tracker) {
        let mut o = TcpOptions::default();
        o.wscale = Some(7);
        feed(t, Dir::ToServer, TcpFlags::SYN, 0, 0, 100, o, b"").unwrap();
        feed(t, Dir::ToClient, TcpFlags::SYN | TcpFlags::ACK, 0, 1, 100, o, b"").unwrap();
        feed(t, Dir::ToServer, TcpFlags::ACK, 1, 1, 1, TcpOptions::default(), b"").unwrap();
    }

    #[test]
    fn server_ack_far_past_the_client_bytes_seen_fills_no_gigabytes() {
        // Found by the tracker fuzz target: an ACK 62 MB past 32 retained client bytes
        // was zero-filled. Now the hole and the bytes before it are one gap.
        let mut t = Tracker::with_validation(Validation::Observer);
        handshake(&mut t);
        feed(&mut t, Dir::ToServer, TcpFlags::ACK, 1, 1, 1, TcpOptions::default(), &[7u8; 32]).unwrap();
        let far = 1 + 62_000_000;
        feed(&mut t, Dir::ToClient, TcpFlags::ACK, 1, far, 1, TcpOptions::default(), b"").unwrap();
        let s = t.stream(Dir::ToServer);
        assert_eq!(s.retained_bytes(), 0);
        assert_eq!(s.gaps().len(), 1);
        assert_eq!(s.gaps()[0], 0..far as u64 - 1);
        assert_eq!(t.sender(Dir::ToServer).missing_bytes, far as u64 - 1 - 32);
        assert!(matches!(t.restore_plan(Duration::ZERO), Err(PlanError::MissingBytes { dir: Dir::ToServer, .. })));
    }

    #[test]
    fn observer_accepts_data_beyond_a_window_update_the_capture_missed() {
        let far = 1 + 200 * 128; // beyond the 100-byte SYN-ACK window
        let mut strict = Tracker::new();
        handshake(&mut strict);
        let err = feed(&mut strict, Dir::ToServer, TcpFlags::ACK, far, 1, 1, TcpOptions::default(), b"x");
        assert!(matches!(err, Err(TrackError::OutOfWindow { .. })));
        let mut observer = Tracker::with_validation(Validation::Observer);
        handshake(&mut observer);
        feed(&mut observer, Dir::ToServer, TcpFlags::ACK, far, 1, 1, TcpOptions::default(), b"x").unwrap();
        // The server's ACK covering bytes the capture missed is taken too.
        feed(&mut observer, Dir::ToClient, TcpFlags::ACK, 1, far + 1, 1, TcpOptions::default(), b"").unwrap();
        assert_eq!(observer.acked_offset(Dir::ToServer), Some(far as u64));
        assert_eq!(observer.sender(Dir::ToServer).missing_bytes, far as u64 - 1);
        // Absurd positions are still refused.
        let err = feed(&mut observer, Dir::ToServer, TcpFlags::ACK, 1 << 31, 1, 1, TcpOptions::default(), b"y");
        assert!(matches!(err, Err(TrackError::OutOfWindow { .. })));
    }

    #[test]
    fn mid_stream_windows_are_not_enforced_since_their_scale_is_unknown() {
        let mut t = Tracker::new();
        // The server advertises a raw window of 64: with an unknown scale it could mean 8 KiB.
        feed(&mut t, Dir::ToClient, TcpFlags::ACK, 500, 1000, 64, TcpOptions::default(), b"").unwrap();
        feed(&mut t, Dir::ToServer, TcpFlags::ACK, 1000, 500, 64, TcpOptions::default(), &[1u8; 1000]).unwrap();
        feed(&mut t, Dir::ToServer, TcpFlags::ACK, 2000, 500, 64, TcpOptions::default(), &[2u8; 1000]).unwrap();
        assert_eq!(t.sender(Dir::ToServer).payload_bytes, 2000);
    }
}
