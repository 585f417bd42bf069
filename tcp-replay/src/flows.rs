//! Demultiplexes captured segments into per-connection [`Tracker`]s.
//!
//! A connection is keyed by (client address, server address). Who is the client:
//! the sender of a SYN without ACK; the destination of a SYN-ACK when that is the
//! first segment seen; for a connection first seen mid-stream, the side with the
//! higher port (on a tie, the higher address), since clients use ephemeral ports.
//!
//! Port reuse (RFC 9293 §3.4.1, and Linux accepting a SYN on a TIME-WAIT socket): a
//! SYN with a new ISN on a key whose connection is closed, reset or has seen both
//! FINs starts a new connection; the old one stays in the results. Connections are
//! kept and iterated in order of first appearance.
//!
//! Segments that do not parse, and segments a tracker refuses, are counted by kind
//! ([`FlowStats`]) and change nothing.

use crate::TcpState;
use crate::segment::{Checksums, ParseError, Segment};
use crate::stream::Stream;
use crate::tracker::{Dir, Tracker, Validation};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddrV4;
use std::ops::Range;
use std::time::Duration;

/// Index of a connection in [`Flows`], in order of first appearance.
pub type ConnId = usize;

/// One connection of the capture.
#[derive(Debug, Clone)]
pub struct Connection {
    client: SocketAddrV4,
    server: SocketAddrV4,
    tracker: Tracker,
    first_seen: Duration,
    last_seen: Duration,
    segments: u64,
    refused: u64,
    ordinal: u32,
    /// Stream offset up to which [`Flows::drain`] handed bytes out, per direction.
    delivered: [u64; 2],
}

fn slot(dir: Dir) -> usize {
    match dir {
        Dir::ToServer => 0,
        Dir::ToClient => 1,
    }
}

impl Connection {
    /// The client's address (the side that sent, or is taken to have sent, the SYN).
    pub fn client(&self) -> SocketAddrV4 {
        self.client
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddrV4 {
        self.server
    }

    /// The connection's tracker.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// The connection's tracker, for trimming or feeding more data.
    pub fn tracker_mut(&mut self) -> &mut Tracker {
        &mut self.tracker
    }

    /// Time of the first segment.
    pub fn first_seen(&self) -> Duration {
        self.first_seen
    }

    /// Time of the latest segment.
    pub fn last_seen(&self) -> Duration {
        self.last_seen
    }

    /// Segments seen, refused ones included.
    pub fn segments(&self) -> u64 {
        self.segments
    }

    /// Segments the tracker refused.
    pub fn refused_segments(&self) -> u64 {
        self.refused
    }

    /// 1 for the first connection on its (client, server) pair, 2 for the next one
    /// after port reuse, and so on.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// Bytes sent in `dir` that were never seen: those the peer acknowledged, plus
    /// holes below the highest byte seen that never filled.
    pub fn gap_bytes(&self, dir: Dir) -> u64 {
        let s = self.tracker.stream(dir);
        let holes = s.highest_end().saturating_sub(s.contiguous_end() + s.pending_bytes() as u64);
        self.tracker.sender(dir).missing_bytes + holes
    }

    /// Whether the connection is over: reset, closed, or both FINs seen. Only then
    /// does a new SYN on the same addresses start a new connection.
    pub fn finished(&self) -> bool {
        let t = &self.tracker;
        let (c, s) = (t.sender(Dir::ToServer), t.sender(Dir::ToClient));
        c.rst_seen
            || s.rst_seen
            || (c.fin_seen && s.fin_seen)
            || matches!(t.state(), TcpState::Close | TcpState::TimeWait)
    }
}

/// A piece of a drained stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes as seen on the wire, in stream order.
    Data(&'a [u8]),
    /// Stream offsets whose bytes were sent but never captured.
    Gap(Range<u64>),
}

/// Why segments did not parse, by [`ParseError`] kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ParseErrorCounts {
    pub truncated: u64,
    pub not_ipv4: u64,
    pub not_tcp: u64,
    pub bad_header_length: u64,
    pub fragment: u64,
    pub bad_ip_checksum: u64,
    pub bad_tcp_checksum: u64,
    pub bad_option: u64,
}

impl ParseErrorCounts {
    fn add(&mut self, e: &ParseError) {
        let n = match e {
            ParseError::Truncated { .. } => &mut self.truncated,
            ParseError::NotIpv4(_) => &mut self.not_ipv4,
            ParseError::NotTcp(_) => &mut self.not_tcp,
            ParseError::BadHeaderLength { .. } => &mut self.bad_header_length,
            ParseError::Fragment => &mut self.fragment,
            ParseError::BadIpChecksum => &mut self.bad_ip_checksum,
            ParseError::BadTcpChecksum => &mut self.bad_tcp_checksum,
            ParseError::BadOption { .. } => &mut self.bad_option,
        };
        *n += 1;
    }

    /// All parse errors.
    pub fn total(&self) -> u64 {
        self.truncated
            + self.not_ipv4
            + self.not_tcp
            + self.bad_header_length
            + self.fragment
            + self.bad_ip_checksum
            + self.bad_tcp_checksum
            + self.bad_option
    }

    /// Checksum failures (IPv4 header or TCP).
    pub fn checksum(&self) -> u64 {
        self.bad_ip_checksum + self.bad_tcp_checksum
    }

    /// (name, count) of every non-zero kind.
    pub fn nonzero(&self) -> Vec<(&'static str, u64)> {
        [
            ("truncated", self.truncated),
            ("not IPv4", self.not_ipv4),
            ("not TCP", self.not_tcp),
            ("bad header length", self.bad_header_length),
            ("IPv4 fragment", self.fragment),
            ("bad IPv4 checksum", self.bad_ip_checksum),
            ("bad TCP checksum", self.bad_tcp_checksum),
            ("bad TCP option", self.bad_option),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

/// Segments of one kind a tracker refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedTally {
    pub count: u64,
    /// The first such error, as text.
    pub first: String,
}

/// Counts over everything handled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FlowStats {
    /// Datagrams handled.
    pub packets: u64,
    /// Datagrams that parsed as TCP segments.
    pub segments: u64,
    /// Datagrams that did not, by reason.
    pub parse_errors: ParseErrorCounts,
    /// Segments trackers refused, by `TrackError` variant name.
    pub refused: BTreeMap<String, RefusedTally>,
}

impl FlowStats {
    /// Segments refused by trackers, all kinds.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().map(|t| t.count).sum()
    }
}

/// Per-connection trackers for a stream of captured datagrams.
///
/// Call order: [`handle_packet`](Flows::handle_packet) for every datagram in capture
/// order; after each, optionally [`drain`](Flows::drain) the connection it touched;
/// at the end, [`drain_all`](Flows::drain_all) every connection to get the bytes that
/// sit beyond a hole that never filled.
#[derive(Debug)]
pub struct Flows {
    checksums: Checksums,
    validation: Validation,
    trim_on_ack: bool,
    conns: Vec<Connection>,
    /// (client, server) -> latest connection on that pair.
    index: HashMap<(SocketAddrV4, SocketAddrV4), ConnId>,
    ordinals: HashMap<(SocketAddrV4, SocketAddrV4), u32>,
    stats: FlowStats,
}

impl Flows {
    /// Empty demultiplexer; `checksums` applies to every datagram.
    pub fn new(checksums: Checksums) -> Flows {
        Flows {
            checksums,
            validation: Validation::Kernel,
            trim_on_ack: true,
            conns: Vec::new(),
            index: HashMap::new(),
            ordinals: HashMap::new(),
            stats: FlowStats::default(),
        }
    }

    /// Segment validation for connections created from now on (default [`Validation::Kernel`]).
    pub fn set_validation(&mut self, validation: Validation) {
        self.validation = validation;
    }

    /// Sets [`Tracker::set_trim_on_ack`] for every connection, present and future.
    /// Turn it off to [`drain`](Flows::drain) server bytes: otherwise they may be
    /// released as soon as the client acknowledges them.
    pub fn set_trim_on_ack(&mut self, on: bool) {
        self.trim_on_ack = on;
        for c in &mut self.conns {
            c.tracker.set_trim_on_ack(on);
        }
    }

    /// Counts so far.
    pub fn stats(&self) -> &FlowStats {
        &self.stats
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection was seen.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connections in order of first appearance (the index is the [`ConnId`]).
    pub fn connections(&self) -> &[Connection] {
        &self.conns
    }

    /// One connection.
    pub fn get(&self, id: ConnId) -> Option<&Connection> {
        self.conns.get(id)
    }

    /// One connection, mutably.
    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Connection> {
        self.conns.get_mut(id)
    }

    /// Handles one IPv4 datagram seen at `now`. Returns the connection it belongs to
    /// and its direction, or `None` if it is not a valid TCP segment. A segment the
    /// tracker refuses still returns its connection (and is counted).
    pub fn handle_packet(&mut self, now: Duration, ip: &[u8]) -> Option<(ConnId, Dir)> {
        self.stats.packets += 1;
        let seg = match Segment::parse_ipv4(ip, self.checksums) {
            Ok(seg) => seg,
            Err(e) => {
                self.stats.parse_errors.add(&e);
                return None;
            }
        };
        self.stats.segments += 1;
        let (id, dir) = match self.lookup(&seg) {
            Some((id, dir)) if !self.starts_new_connection(id, dir, &seg) => (id, dir),
            _ => self.open(now, &seg),
        };
        let conn = &mut self.conns[id];
        conn.segments += 1;
        conn.last_seen = conn.last_seen.max(now);
        if let Err(e) = conn.tracker.handle_segment(now, dir, &seg) {
            conn.refused += 1;
            let text = format!("{e:?}");
            let kind = text.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("Other").to_string();
            self.stats
                .refused
                .entry(kind)
                .and_modify(|t| t.count += 1)
                .or_insert_with(|| RefusedTally { count: 1, first: e.to_string() });
        }
        Some((id, dir))
    }

    fn lookup(&self, seg: &Segment) -> Option<(ConnId, Dir)> {
        if let Some(&id) = self.index.get(&(seg.src, seg.dst)) {
            return Some((id, Dir::ToServer));
        }
        self.index.get(&(seg.dst, seg.src)).map(|&id| (id, Dir::ToClient))
    }

    fn starts_new_connection(&self, id: ConnId, dir: Dir, seg: &Segment) -> bool {
        let conn = &self.conns[id];
        seg.flags.syn()
            && !seg.flags.rst()
            && conn.tracker.addresses().is_some()
            && conn.tracker.sender(dir).isn != Some(seg.seq)
            && conn.finished()
    }

    fn open(&mut self, now: Duration, seg: &Segment) -> (ConnId, Dir) {
        let src_is_client = if seg.flags.syn() {
            !seg.flags.ack()
        } else {
            (seg.src.port(), seg.src.ip()) > (seg.dst.port(), seg.dst.ip())
        };
        let (client, server, dir) =
            if src_is_client { (seg.src, seg.dst, Dir::ToServer) } else { (seg.dst, seg.src, Dir::ToClient) };
        let ordinal = self.ordinals.entry((client, server)).or_insert(0);
        *ordinal += 1;
        let mut tracker = Tracker::with_validation(self.validation);
        tracker.set_trim_on_ack(self.trim_on_ack);
        let id = self.conns.len();
        self.conns.push(Connection {
            client,
            server,
            tracker,
            first_seen: now,
            last_seen: now,
            segments: 0,
            refused: 0,
            ordinal: *ordinal,
            delivered: [0, 0],
        });
        self.index.insert((client, server), id);
        // The same addresses with the roles swapped now belong to this connection.
        self.index.remove(&(server, client));
        (id, dir)
    }

    /// Hands `sink` the bytes sent in `dir` that became contiguous since the last
    /// drain, in stream order (a range never captured comes as a [`Piece::Gap`]), then
    /// releases them from the tracker. A connection drained this way can no longer
    /// give a restore plan that needs those bytes. An unknown `id` does nothing.
    pub fn drain<E>(&mut self, id: ConnId, dir: Dir, sink: impl FnMut(Piece<'_>) -> Result<(), E>) -> Result<(), E> {
        let Some(conn) = self.conns.get_mut(id) else { return Ok(()) };
        if conn.tracker.addresses().is_none() {
            return Ok(());
        }
        let stream = conn.tracker.stream(dir);
        // Not clamped to the stream's start: a skipped hole moves the start past it,
        // and the hole must still come out as a gap.
        let from = conn.delivered[slot(dir)];
        let to = stream.contiguous_end();
        emit(stream, from, to, sink)?;
        conn.delivered[slot(dir)] = to.max(from);
        conn.tracker.trim(dir, to);
        Ok(())
    }

    /// Like [`drain`](Flows::drain), but also hands out the bytes held beyond holes
    /// that never filled (each hole a [`Piece::Gap`]). Call it once the capture has
    /// ended: the holes are final then.
    pub fn drain_all<E>(
        &mut self,
        id: ConnId,
        dir: Dir,
        mut sink: impl FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.drain(id, dir, &mut sink)?;
        let Some(conn) = self.conns.get_mut(id) else { return Ok(()) };
        if conn.tracker.addresses().is_none() {
            return Ok(());
        }
        // Only the out-of-order pieces are left after the drain, so the copy is small.
        let mut rest: Stream = conn.tracker.stream(dir).clone();
        let end = rest.highest_end();
        if end <= rest.contiguous_end() {
            return Ok(());
        }
        rest.skip_to(end);
        let from = conn.delivered[slot(dir)];
        emit(&rest, from, end, sink)?;
        conn.delivered[slot(dir)] = end;
        conn.tracker.trim(dir, end);
        Ok(())
    }
}

/// Hands out `[from, to)` of `stream`, which must be contiguous there, splitting off gaps.
fn emit<E>(stream: &Stream, from: u64, to: u64, mut sink: impl FnMut(Piece<'_>) -> Result<(), E>) -> Result<(), E> {
    let data = |range: Range<u64>, sink: &mut dyn FnMut(Piece<'_>) -> Result<(), E>| {
        let (a, b) = stream.slices(range);
        for part in [a, b] {
            if !part.is_empty() {
                sink(Piece::Data(part))?;
            }
        }
        Ok(())
    };
    let mut gaps: Vec<Range<u64>> = stream.gaps().iter().filter(|g| g.start < to && from < g.end).cloned().collect();
    gaps.sort_by_key(|g| g.start);
    let mut cur = from;
    for g in gaps {
        let (gs, ge) = (g.start.max(cur), g.end.min(to));
        if gs > cur {
            data(cur..gs, &mut sink)?;
        }
        if ge > gs {
            sink(Piece::Gap(gs..ge))?;
        }
        cur = cur.max(ge);
    }
    if cur < to {
        data(cur..to, &mut sink)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{SegmentBuilder, TcpFlags};
    use crate::seq::Seq;

    const C: &str = "10.0.0.1:40000";
    const S: &str = "10.0.0.2:80";

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn pkt(src: &str, dst: &str, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = SegmentBuilder::new(addr(src), addr(dst));
        b.flags = flags;
        b.seq = Seq(seq);
        b.ack = Seq(ack);
        if flags & TcpFlags::SYN != 0 {
            b.options.mss = Some(1460);
        }
        b.build(payload)
    }

    fn t(ms: u64) -> Duration {
        Duration::from_millis(1_700_000_000_000 + ms)
    }

    const ACK: u8 = TcpFlags::ACK;
    const SYN: u8 = TcpFlags::SYN;
    const FIN: u8 = TcpFlags::FIN;

    /// Handshake (ISNs near the wrap), a request, a reply in two segments delivered
    /// out of order, one retransmission, and a FIN from each side.
    fn full_connection(client_isn: u32, server_isn: u32) -> Vec<Vec<u8>> {
        let c = |n: u32| client_isn.wrapping_add(n);
        let s = |n: u32| server_isn.wrapping_add(n);
        vec![
            pkt(C, S, SYN, c(0), 0, b""),
            pkt(S, C, SYN | ACK, s(0), c(1), b""),
            pkt(C, S, ACK, c(1), s(1), b""),
            pkt(C, S, ACK, c(1), s(1), b"GET / HTTP/1.1\r\n\r\n"),
            pkt(S, C, ACK, s(1), c(19), b""),
            pkt(S, C, ACK, s(6), c(19), b"world"),
            pkt(S, C, ACK, s(1), c(19), b"hello"),
            pkt(S, C, ACK, s(1), c(19), b"hello"),
            pkt(C, S, ACK, c(19), s(11), b""),
            pkt(C, S, FIN | ACK, c(19), s(11), b""),
            pkt(S, C, FIN | ACK, s(11), c(20), b""),
            pkt(C, S, ACK, c(20), s(12), b""),
        ]
    }

    fn collect(flows: &mut Flows, id: ConnId, dir: Dir, all: bool) -> (Vec<u8>, Vec<Range<u64>>) {
        let (mut bytes, mut gaps) = (Vec::new(), Vec::new());
        let sink = |p: Piece<'_>| -> Result<(), ()> {
            match p {
                Piece::Data(d) => bytes.extend_from_slice(d),
                Piece::Gap(g) => gaps.push(g),
            }
            Ok(())
        };
        if all {
            flows.drain_all(id, dir, sink).unwrap()
        } else {
            flows.drain(id, dir, sink).unwrap()
        }
        (bytes, gaps)
    }

    #[test]
    fn handshake_connection_is_keyed_by_the_syn_sender_and_reassembled() {
        let mut flows = Flows::new(Checksums::Verify);
        flows.set_trim_on_ack(false);
        let mut c2s = Vec::new();
        let mut s2c = Vec::new();
        for (i, p) in full_connection(u32::MAX - 5, u32::MAX - 1).iter().enumerate() {
            let (id, dir) = flows.handle_packet(t(i as u64), p).unwrap();
            assert_eq!(id, 0);
            let (bytes, gaps) = collect(&mut flows, id, dir, false);
            assert!(gaps.is_empty());
            match dir {
                Dir::ToServer => c2s.extend(bytes),
                Dir::ToClient => s2c.extend(bytes),
            }
        }
        assert_eq!(c2s, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(s2c, b"helloworld");
        let conn = &flows.connections()[0];
        assert_eq!((conn.client(), conn.server()), (addr(C), addr(S)));
        assert!(conn.tracker().handshake_seen());
        assert_eq!(conn.tracker().sender(Dir::ToClient).retransmitted_bytes, 5);
        assert_eq!((conn.first_seen(), conn.last_seen(), conn.segments()), (t(0), t(11), 12));
        assert_eq!(conn.refused_segments(), 0);
        assert!(conn.finished());
        assert_eq!(flows.stats().segments, 12);
    }

    #[test]
    fn syn_ack_first_makes_its_destination_the_client() {
        let mut flows = Flows::new(Checksums::Verify);
        let (id, dir) = flows.handle_packet(t(0), &pkt(S, C, SYN | ACK, 500, 101, b"")).unwrap();
        assert_eq!((id, dir), (0, Dir::ToClient));
        assert_eq!(flows.handle_packet(t(1), &pkt(C, S, ACK, 101, 501, b"")), Some((0, Dir::ToServer)));
        assert_eq!(flows.connections()[0].client(), addr(C));
    }

    #[test]
    fn mid_stream_client_is_the_higher_port_then_the_higher_address() {
        let mut flows = Flows::new(Checksums::Verify);
        // The first segment comes from the server (port 80).
        assert_eq!(flows.handle_packet(t(0), &pkt(S, C, ACK, 7, 9, b"x")), Some((0, Dir::ToClient)));
        let conn = &flows.connections()[0];
        assert_eq!(conn.client(), addr(C));
        assert!(!conn.tracker().handshake_seen());
        // Equal ports: the higher address is the client.
        flows.handle_packet(t(1), &pkt("10.0.0.5:9000", "10.0.0.9:9000", ACK, 1, 1, b"y"));
        assert_eq!(flows.connections()[1].client(), addr("10.0.0.9:9000"));
    }

    #[test]
    fn new_syn_after_close_starts_a_new_connection_and_keeps_the_old() {
        let mut flows = Flows::new(Checksums::Verify);
        for p in full_connection(1000, 5000) {
            flows.handle_packet(t(0), &p);
        }
        // A retransmitted copy of the old SYN belongs to the old connection.
        assert_eq!(flows.handle_packet(t(1), &full_connection(1000, 5000)[0]), Some((0, Dir::ToServer)));
        for p in full_connection(90_000, 7000) {
            assert_eq!(flows.handle_packet(t(2), &p).map(|(id, _)| id), Some(1));
        }
        assert_eq!(flows.len(), 2);
        let ordinals: Vec<_> = flows.connections().iter().map(|c| c.ordinal()).collect();
        assert_eq!(ordinals, vec![1, 2]);
        assert_eq!(flows.connections()[1].tracker().sender(Dir::ToServer).isn, Some(Seq(90_000)));
        assert_eq!(flows.stats().refused_total(), 0);
    }

    #[test]
    fn new_syn_on_a_live_connection_is_refused_not_split() {
        let mut flows = Flows::new(Checksums::Verify);
        for p in &full_connection(1000, 5000)[..4] {
            flows.handle_packet(t(0), p);
        }
        assert_eq!(flows.handle_packet(t(1), &pkt(C, S, SYN, 777, 0, b"")), Some((0, Dir::ToServer)));
        assert_eq!(flows.len(), 1);
        assert_eq!(flows.stats().refused.get("NewIsn").map(|t| t.count), Some(1));
        assert_eq!(flows.connections()[0].refused_segments(), 1);
    }

    #[test]
    fn reused_addresses_with_swapped_roles_follow_the_new_connection() {
        let mut flows = Flows::new(Checksums::Verify);
        for p in full_connection(1000, 5000) {
            flows.handle_packet(t(0), &p);
        }
        // The old server now connects out from port 80 to the old client's port.
        assert_eq!(flows.handle_packet(t(1), &pkt(S, C, SYN, 42, 0, b"")), Some((1, Dir::ToServer)));
        assert_eq!(flows.handle_packet(t(1), &pkt(C, S, SYN | ACK, 9, 43, b"")), Some((1, Dir::ToClient)));
        assert_eq!(flows.connections()[1].client(), addr(S));
    }

    #[test]
    fn unparsable_datagrams_are_counted_by_kind_and_change_nothing() {
        let mut flows = Flows::new(Checksums::Verify);
        let good = pkt(C, S, ACK, 1, 1, b"data");
        let mut bad_sum = good.clone();
        *bad_sum.last_mut().unwrap() ^= 0xff;
        let mut frag = good.clone();
        frag[6] = 0x20;
        let mut udp = good.clone();
        udp[9] = 17;
        assert_eq!(flows.handle_packet(t(0), &bad_sum), None);
        assert_eq!(flows.handle_packet(t(0), &good[..30]), None);
        assert_eq!(flows.handle_packet(t(0), &frag), None);
        assert_eq!(flows.handle_packet(t(0), &udp), None);
        assert_eq!(flows.handle_packet(t(0), &[]), None);
        assert!(flows.is_empty());
        let e = flows.stats().parse_errors;
        assert_eq!((e.bad_tcp_checksum, e.truncated, e.fragment, e.not_tcp), (1, 2, 1, 1));
        assert_eq!((e.total(), e.checksum()), (5, 1));
        // Without verification the corrupted copy is accepted.
        let mut lax = Flows::new(Checksums::Skip);
        assert!(lax.handle_packet(t(0), &bad_sum).is_some());
    }

    #[test]
    fn drain_all_hands_out_bytes_beyond_a_hole_that_never_filled() {
        let mut flows = Flows::new(Checksums::Verify);
        flows.set_trim_on_ack(false);
        let (c, s) = (100u32, 900u32);
        for p in [
            pkt(C, S, SYN, c, 0, b""),
            pkt(S, C, SYN | ACK, s, c + 1, b""),
            pkt(C, S, ACK, c + 1, s + 1, b"ab"),
            pkt(C, S, ACK, c + 6, s + 1, b"fg"), // "cde" never captured
        ] {
            flows.handle_packet(t(0), &p);
        }
        assert_eq!(collect(&mut flows, 0, Dir::ToServer, false), (b"ab".to_vec(), vec![]));
        assert_eq!(flows.connections()[0].gap_bytes(Dir::ToServer), 3);
        let (bytes, gaps) = collect(&mut flows, 0, Dir::ToServer, true);
        assert_eq!(bytes, b"fg");
        assert_eq!(gaps, vec![Range { start: 2, end: 5 }]);
        // Nothing is handed out twice.
        assert_eq!(collect(&mut flows, 0, Dir::ToServer, true), (vec![], vec![]));
    }

    #[test]
    fn bytes_acknowledged_but_never_seen_come_out_as_a_gap() {
        let mut flows = Flows::new(Checksums::Verify);
        flows.set_trim_on_ack(false);
        let (c, s) = (100u32, 900u32);
        for p in [
            pkt(C, S, SYN, c, 0, b""),
            pkt(S, C, SYN | ACK, s, c + 1, b""),
            pkt(C, S, ACK, c + 1, s + 1, b""),
            pkt(S, C, ACK, s + 1, c + 1, b"head"),
            pkt(C, S, ACK, c + 1, s + 11, b""), // acknowledges 6 bytes the capture lost
            pkt(S, C, ACK, s + 11, c + 1, b"tail"),
        ] {
            flows.handle_packet(t(0), &p);
        }
        let (bytes, gaps) = collect(&mut flows, 0, Dir::ToClient, true);
        assert_eq!(bytes, b"headtail");
        assert_eq!(gaps, vec![4..10]);
        assert_eq!(flows.connections()[0].tracker().sender(Dir::ToClient).missing_bytes, 6);
    }
}
