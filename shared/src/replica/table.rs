//! The replica table: per client connection, a TCP tracker, an HTTP/1.1 framer over
//! both directions and per-exchange records, as a deterministic function of the
//! replication stream (ARCHITECTURE.md, "Replica table"; invariants 2, 3 and 5).
//!
//! Protocol rules come in through tcp-replay's tracker (RFC 9293, RFC 7323, RFC
//! 5961) and [`super::http`] (RFC 9112, RFC 9110).
//!
//! **What the server's kernel received.** The primary mirrors only its SYN-ACK, FIN
//! and RST, never its pure ACKs, so no ACK of client bytes is ever seen. Every
//! inbound segment in the stream was admitted by the gate into the primary's kernel,
//! in stream order, so trackers run with [`ServerAcks::Inferred`]: the contiguous
//! client bytes count as received. That can run ahead of the kernel (a segment it
//! dropped beyond its window): harmless, the restored socket then holds bytes the
//! client still has unacknowledged and retransmits as duplicates. It never lags.
//!
//! **Bounded memory (invariant 5).** Per connection the table holds the tracker's
//! retained streams: client bytes from the first request not yet answered in full
//! (trimmed when the reply log completes a response), and server bytes the client
//! has not acknowledged (trimmed by client ACKs); one partial head or chunk line per
//! direction; and per exchange not yet acknowledged by the client a small record plus
//! the upstream payload the reply has not yet covered. A connection that cannot be
//! followed (first seen mid-stream, framing failed) keeps only its reason.
//!
//! **Snapshots** carry each connection whole, encoded with [`crate::codec`]: the
//! tracker itself (private window bookkeeping, timestamps and statistics counters
//! included), the framer and the exchange records. A joining spare decodes exactly
//! the state the primary holds, so both continue identically from the same records.

use super::http::{ConnFramer, Event, FrameError, Framer, Phase, RequestHead, ResponseHead};
use crate::codec::{self, CodecError};
use crate::protocol::{ConnKey, ExchangeStart, Message, Record};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tcp_replay::{Checksums, Dir, ParseError, Segment, ServerAcks, TcpState, TrackError, Tracker};

/// Why a record was refused. Except for snapshot errors the table is unchanged; after
/// a snapshot error it holds a partial snapshot and the join must start over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The record comes from an older epoch than the table's: a deposed primary.
    #[error("record {seq} of epoch {record} refused: the table is at epoch {table}")]
    StaleEpoch { seq: u64, record: u64, table: u64 },
    /// Within an epoch records arrive in increasing order; a repeat or a step back is
    /// refused. (Forward jumps are allowed: the primary's own table does not apply the
    /// snapshot records numbered for a joining spare.)
    #[error("record {got} out of sequence: the last applied was {last}")]
    OutOfSequence { last: u64, got: u64 },
    /// The snapshot part of a join is inconsistent.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// What is wrong with a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// A `SnapshotConn` or `SnapshotEnd` without a `SnapshotBegin`.
    #[error("{0} outside a snapshot")]
    NotInSnapshot(&'static str),
    /// A record other than the snapshot's own arrived before `SnapshotEnd`.
    #[error("snapshot interrupted by another record")]
    Interrupted,
    /// A connection's state does not decode.
    #[error("snapshot state of {conn:?} does not decode: {source}")]
    Decode { conn: ConnKey, source: CodecError },
    /// A connection's state decodes but contradicts itself or its key.
    #[error("snapshot state of {conn:?} is inconsistent: {reason}")]
    Inconsistent { conn: ConnKey, reason: &'static str },
    /// `SnapshotEnd` after a different number of connections than announced.
    #[error("snapshot announced {announced} connections and carried {received}")]
    Count { announced: u64, received: u64 },
    /// A connection's state parts were cut: another connection's part, or the snapshot's end,
    /// arrived before its last part.
    #[error("snapshot state of {conn:?} was cut before its last part")]
    PartsCut { conn: ConnKey },
}

/// What a record did. None of these is an error: the driver counts and logs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The record was taken into the table.
    Taken,
    /// The record changes nothing, for this reason.
    Ignored(Ignored),
    /// The record left `conn` unprotected: it stays in the table, reported as such,
    /// and is never guessed at.
    Unprotected { conn: ConnKey, reason: Unprotection },
}

/// Why a record changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// Not a well-formed IPv4/TCP datagram, or a checksum the kernel would reject.
    BadDatagram(ParseError),
    /// A segment or reply bytes the tracker refuses (the server's kernel would drop them).
    Refused(TrackError),
    /// A segment without SYN or payload for a connection not in the table: the tail
    /// of a closed connection.
    Stray,
    /// A record about a connection not in the table.
    UnknownConnection(ConnKey),
    /// A record about an exchange the table does not hold: finished and dropped, or never framed.
    UnknownExchange { conn: ConnKey, exchange: u64 },
    /// A record about a connection already unprotected.
    Unprotected(ConnKey),
}

/// Why a connection is not protected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Unprotection {
    /// First seen without its handshake: options and window scale are unknown.
    #[error("first seen mid-stream")]
    MidStream,
    /// Its HTTP could not be framed.
    #[error("HTTP framing failed: {0}")]
    Framing(FrameError),
    /// The primary began an exchange with another method than the request framed.
    #[error("exchange {exchange}: the primary logged {logged}, the request is {framed}")]
    ExchangeMismatch { exchange: u64, logged: String, framed: String },
}

/// What the primary logged when an exchange began ([`ExchangeStart`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeMeta {
    /// The key sent upstream: the client's own or a generated one.
    pub idempotency_key: Option<String>,
    pub key_generated: bool,
    pub upstream: Option<String>,
    /// The primary's idea of the request's offset (the framer's is authoritative).
    pub request_offset: u64,
}

/// The response as the reply log shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyProgress {
    /// Offset in the server's stream of the response's first byte (an interim response's, if any).
    pub start: Option<u64>,
    /// A 1xx interim response (`100 Continue`) was logged.
    pub interim_sent: bool,
    /// The final response's head, once logged in full.
    pub head: Option<ResponseHead>,
    /// Body payload bytes logged (chunk framing excluded), and their crc32.
    pub body_logged: u64,
    pub body_crc: u32,
    /// Offset just after the response, once logged in full.
    pub end: Option<u64>,
}

/// The upstream's response to one exchange, as logged by the primary: its head and
/// the decoded payload the client-facing reply has not covered yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamLog {
    framer: Framer,
    /// The final response head and its bytes.
    pub head: Option<ResponseHead>,
    #[serde(with = "crate::codec::bytes")]
    pub head_raw: Vec<u8>,
    /// Decoded payload bytes logged in all.
    pub logged: u64,
    /// Decoded body offset of `payload[0]`.
    pub payload_start: u64,
    #[serde(with = "deque_bytes")]
    pub payload: VecDeque<u8>,
    /// The whole response was logged.
    pub complete: bool,
    /// The log cannot be used (a gap, or framing failed), and why.
    pub broken: Option<String>,
}

impl UpstreamLog {
    fn new(index: u64, method: &str) -> UpstreamLog {
        let mut framer = Framer::responses(0).with_body_events();
        framer.expect_response(index, method);
        UpstreamLog {
            framer,
            head: None,
            head_raw: Vec::new(),
            logged: 0,
            payload_start: 0,
            payload: VecDeque::new(),
            complete: false,
            broken: None,
        }
    }

    fn handle(&mut self, offset: u64, bytes: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        let mut events = Vec::new();
        if let Err(e) = self.framer.feed(offset, bytes, &mut events) {
            self.break_with(e.to_string());
            return;
        }
        for e in events {
            match e {
                Event::ResponseHead { head, raw } if !head.interim() => {
                    self.head = Some(head);
                    self.head_raw = raw;
                }
                Event::Body { range, body_offset, .. } => {
                    let piece = &bytes[(range.start - offset) as usize..(range.end - offset) as usize];
                    if body_offset + piece.len() as u64 > self.payload_start {
                        let skip = self.payload_start.saturating_sub(body_offset) as usize;
                        self.payload.extend(&piece[skip..]);
                    }
                    self.logged = body_offset + piece.len() as u64;
                }
                Event::Complete { .. } => self.complete = true,
                _ => {}
            }
        }
    }

    fn break_with(&mut self, reason: String) {
        self.broken = Some(reason);
        self.payload = VecDeque::new();
        self.head_raw = Vec::new();
    }

    /// Drops payload below decoded body offset `to`: the reply has it.
    fn trim(&mut self, to: u64) {
        if to > self.payload_start {
            let n = ((to - self.payload_start) as usize).min(self.payload.len());
            self.payload.drain(..n);
            self.payload_start = to;
        }
    }

    /// The exchange ended on the primary: a body delimited by the upstream's close is complete.
    fn exchange_ended(&mut self) {
        if matches!(self.framer.phase(), Phase::Body { body: super::http::BodyState::UntilClose, .. }) {
            self.complete = true;
        }
    }

    /// Whether the log holds the whole response from decoded body offset `from` on.
    pub fn covers_from(&self, from: u64) -> bool {
        self.broken.is_none()
            && self.complete
            && self.head.is_some()
            && self.payload_start <= from
            && from <= self.logged
    }

    /// The logged payload from decoded body offset `from` on.
    pub fn payload_from(&self, from: u64) -> Vec<u8> {
        let skip = from.saturating_sub(self.payload_start) as usize;
        self.payload.iter().skip(skip).copied().collect()
    }
}

/// One request and its response on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub index: u64,
    /// The request as framed from the client's bytes.
    pub request: RequestHead,
    /// Offset just after the request, once complete.
    pub request_end: Option<u64>,
    /// What the primary logged when it began the exchange (it may send upstream only after).
    pub meta: Option<ExchangeMeta>,
    pub reply: ReplyProgress,
    pub upstream: Option<UpstreamLog>,
    /// Status from the primary's `ExchangeEnd`: the response was handed to the socket.
    pub ended: Option<u16>,
}

impl Exchange {
    fn new(request: RequestHead) -> Exchange {
        Exchange {
            index: request.index,
            request,
            request_end: None,
            meta: None,
            reply: ReplyProgress::default(),
            upstream: None,
            ended: None,
        }
    }

    /// Sent (or about to be sent) upstream in full, with no response head logged yet and not ended: a
    /// takeover now would have to send the request again, since nothing says whether the origin got it. A
    /// request whose body is still arriving is not awaiting: the origin answers once it has the whole body,
    /// and a handing-over primary, which releases no more client bytes, would wait for it in vain.
    pub fn awaiting_upstream(&self) -> bool {
        self.request_end.is_some()
            && self.meta.as_ref().is_some_and(|m| m.upstream.is_some())
            && self.ended.is_none()
            && self.upstream.as_ref().is_none_or(|u| u.head.is_none() && u.broken.is_none())
    }

    /// Whether the connection ends with this exchange's response: its head or its request said so.
    pub fn closes(&self) -> bool {
        self.request.close || self.reply.head.as_ref().is_some_and(|h| h.close)
    }

    fn retained_bytes(&self) -> usize {
        self.upstream.as_ref().map_or(0, |u| u.payload.len() + u.head_raw.len() + u.framer.retained_bytes())
    }
}

/// A connection followed from its handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracked {
    tracker: Tracker,
    framer: ConnFramer,
    /// Exchanges not yet acknowledged in full by the client, by index, consecutive.
    exchanges: VecDeque<Exchange>,
}

/// A connection that cannot be followed: only why, and how far it has closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Lost {
    reason: Unprotection,
    client_fin: bool,
    server_fin: bool,
}

/// A connection's state; a snapshot carries it as its [`codec`] encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    Tracked(Box<Tracked>),
    Unprotected(Lost),
}

impl State {
    /// Decodes a snapshot's state for `key`, refusing what the table could not follow.
    fn decode(key: ConnKey, bytes: &[u8]) -> Result<State, SnapshotError> {
        let state: State = codec::decode(bytes).map_err(|source| SnapshotError::Decode { conn: key, source })?;
        if let State::Tracked(t) = &state {
            let inconsistent = |reason| Err(SnapshotError::Inconsistent { conn: key, reason });
            if t.tracker.addresses().is_some_and(|a| a != (key.client, key.server)) {
                return inconsistent("the tracker follows another connection");
            }
            if t.exchanges.iter().zip(t.exchanges.iter().skip(1)).any(|(a, b)| a.index.checked_add(1) != Some(b.index))
            {
                return inconsistent("exchange indexes are not consecutive");
            }
            if t.exchanges.iter().any(|ex| ex.request.index != ex.index) {
                return inconsistent("an exchange holds another exchange's request");
            }
        }
        Ok(state)
    }
}

/// One client connection in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    key: ConnKey,
    state: State,
}

impl Conn {
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The connection's state, when it is protected.
    pub fn tracked(&self) -> Option<&Tracked> {
        match &self.state {
            State::Tracked(t) => Some(t),
            State::Unprotected(_) => None,
        }
    }

    /// Why the connection is not protected, if it is not.
    pub fn unprotected(&self) -> Option<&Unprotection> {
        match &self.state {
            State::Tracked(_) => None,
            State::Unprotected(l) => Some(&l.reason),
        }
    }

    /// Bytes held for this connection.
    pub fn retained_bytes(&self) -> usize {
        match &self.state {
            State::Tracked(t) => {
                let t = &**t;
                let streams = [Dir::ToServer, Dir::ToClient]
                    .iter()
                    .map(|&d| t.tracker.endpoint(d).map_or(0, |_| t.tracker.stream(d).retained_bytes()))
                    .sum::<usize>();
                streams + t.framer.retained_bytes() + t.exchanges.iter().map(Exchange::retained_bytes).sum::<usize>()
            }
            State::Unprotected(_) => 0,
        }
    }

    /// Feeds what identifies this connection's TCP state (sequence numbers, acknowledgements, windows,
    /// flags, stream bounds; not the bytes) into `h`.
    fn digest_into(&self, h: &mut Fnv) {
        h.write(&self.key.client.ip().octets());
        h.write(&self.key.client.port().to_be_bytes());
        h.write(&self.key.server.ip().octets());
        h.write(&self.key.server.port().to_be_bytes());
        let t = match &self.state {
            State::Tracked(t) => &t.tracker,
            State::Unprotected(l) => {
                h.write(l.reason.to_string().as_bytes());
                return;
            }
        };
        h.write(format!("{:?}", t.state()).as_bytes());
        for dir in [Dir::ToServer, Dir::ToClient] {
            let Some(e) = t.endpoint(dir) else {
                h.write(&[0]);
                continue;
            };
            let seq = |s: Option<tcp_replay::Seq>| s.map_or(u64::MAX, |s| u64::from(s.0));
            for v in [seq(e.isn), seq(e.snd_max()), seq(e.acked()), u64::from(e.window_raw()), e.payload_bytes] {
                h.write(&v.to_be_bytes());
            }
            let stream = t.stream(dir);
            for v in [stream.start(), stream.contiguous_end(), u64::from(e.fin_seen), u64::from(e.rst_seen)] {
                h.write(&v.to_be_bytes());
            }
        }
    }

    fn unprotect(&mut self, reason: Unprotection) -> Applied {
        let (client_fin, server_fin) = match &self.state {
            State::Tracked(t) => (fin_seen(&t.tracker, Dir::ToServer), fin_seen(&t.tracker, Dir::ToClient)),
            State::Unprotected(l) => (l.client_fin, l.server_fin),
        };
        tracing::warn!(conn = ?self.key, %reason, "connection unprotected");
        self.state = State::Unprotected(Lost { reason: reason.clone(), client_fin, server_fin });
        Applied::Unprotected { conn: self.key, reason }
    }
}

fn exchange_in(exchanges: &mut VecDeque<Exchange>, index: u64) -> Option<&mut Exchange> {
    let first = exchanges.front()?.index;
    exchanges.get_mut(index.checked_sub(first)? as usize)
}

fn fin_seen(t: &Tracker, dir: Dir) -> bool {
    t.endpoint(dir).is_some_and(|e| e.fin_seen)
}

impl Tracked {
    fn new() -> Tracked {
        let mut tracker = Tracker::new();
        tracker.set_server_acks(ServerAcks::Inferred);
        Tracked { tracker, framer: ConnFramer::new(), exchanges: VecDeque::new() }
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    pub fn framer(&self) -> &ConnFramer {
        &self.framer
    }

    /// Exchanges not yet acknowledged in full by the client, oldest first.
    pub fn exchanges(&self) -> &VecDeque<Exchange> {
        &self.exchanges
    }

    pub fn exchange(&self, index: u64) -> Option<&Exchange> {
        let first = self.exchanges.front()?.index;
        self.exchanges.get(index.checked_sub(first)? as usize)
    }

    fn exchange_mut(&mut self, index: u64) -> Option<&mut Exchange> {
        exchange_in(&mut self.exchanges, index)
    }

    fn handle_segment(&mut self, at_us: u64, dir: Dir, seg: &Segment<'_>) -> Result<Applied, Unprotection> {
        if let Err(e) = self.tracker.handle_segment(Duration::from_micros(at_us), dir, seg) {
            return Ok(Applied::Ignored(Ignored::Refused(e)));
        }
        if dir == Dir::ToServer {
            self.frame_client().map_err(Unprotection::Framing)?;
            self.drop_acknowledged();
        }
        Ok(Applied::Taken)
    }

    fn handle_reply(&mut self, offset: u64, bytes: &[u8]) -> Result<Applied, Unprotection> {
        if let Err(e) = self.tracker.handle_server_data(offset, bytes) {
            return Ok(Applied::Ignored(Ignored::Refused(e)));
        }
        self.frame_server().map_err(Unprotection::Framing)?;
        Ok(Applied::Taken)
    }

    /// Frames the client bytes that became contiguous.
    fn frame_client(&mut self) -> Result<(), FrameError> {
        let Tracked { tracker, framer, .. } = self;
        let pos = framer.requests().pos();
        let st = tracker.stream(Dir::ToServer);
        let end = st.contiguous_end();
        if end <= pos {
            return Ok(());
        }
        let (a, b) = st.slices(pos..end);
        let mut events = Vec::new();
        framer.handle_client(pos, a, &mut events)?;
        framer.handle_client(pos + a.len() as u64, b, &mut events)?;
        let answered = self.exchanges.back().is_none_or(|ex| ex.reply.end.is_some() && ex.request_end.is_some());
        if events.is_empty() && answered && self.framer.requests().phase() == &Phase::Done {
            // Bytes after the closing request, which was answered: the server never reads them.
            self.tracker.trim(Dir::ToServer, end);
        }
        for e in events {
            match e {
                Event::RequestHead { head, .. } => self.exchanges.push_back(Exchange::new(head)),
                Event::Complete { index, end, .. } => {
                    if let Some(ex) = self.exchange_mut(index) {
                        ex.request_end = Some(end);
                        if ex.reply.end.is_some() {
                            self.trim_answered(end);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Frames the reply bytes that became contiguous.
    fn frame_server(&mut self) -> Result<(), FrameError> {
        let Tracked { tracker, framer, .. } = self;
        let pos = framer.responses().pos();
        let st = tracker.stream(Dir::ToClient);
        let end = st.contiguous_end();
        if st.start() > pos {
            // Reply bytes released before they were framed: cannot happen while the
            // reply log precedes the client's ACKs, and is not guessed at if it does.
            return Err(FrameError::OutOfOrder { side: super::http::Side::Response, expected: pos, got: st.start() });
        }
        if end <= pos {
            return Ok(());
        }
        let (a, b) = st.slices(pos..end);
        let mut events = Vec::new();
        framer.handle_server(pos, a, &mut events)?;
        framer.handle_server(pos + a.len() as u64, b, &mut events)?;
        for e in events {
            match e {
                Event::ResponseHead { head, .. } => {
                    if let Some(ex) = self.exchange_mut(head.index) {
                        ex.reply.start.get_or_insert(head.start);
                        if head.interim() {
                            ex.reply.interim_sent = true;
                        } else {
                            ex.reply.head = Some(head);
                        }
                    }
                }
                Event::Body { index, range, body_offset } => {
                    let (x, y) = self.tracker.stream(Dir::ToClient).slices(range.clone());
                    if let Some(ex) = exchange_in(&mut self.exchanges, index) {
                        let mut h = crc32fast::Hasher::new_with_initial(ex.reply.body_crc);
                        h.update(x);
                        h.update(y);
                        ex.reply.body_crc = h.finalize();
                        ex.reply.body_logged = body_offset + (range.end - range.start);
                        let covered = ex.reply.body_logged;
                        if let Some(u) = &mut ex.upstream {
                            u.trim(covered);
                        }
                    }
                }
                Event::Complete { index, end, .. } => {
                    if let Some(ex) = self.exchange_mut(index) {
                        ex.reply.end = Some(end);
                        if let Some(req_end) = ex.request_end {
                            self.trim_answered(req_end);
                        }
                    }
                }
                Event::RequestHead { .. } => {}
            }
        }
        Ok(())
    }

    /// Releases client bytes up to `end`, the end of a request answered in full. After
    /// a request that closes the connection nothing more is read by the server, so
    /// whatever the client sent after it goes too.
    fn trim_answered(&mut self, end: u64) {
        let closing_answered = self.framer.requests().phase() == &Phase::Done
            && self.exchanges.back().is_some_and(|ex| ex.request_end == Some(end) && ex.reply.end.is_some());
        let end = if closing_answered { self.tracker.stream(Dir::ToServer).contiguous_end().max(end) } else { end };
        self.tracker.trim(Dir::ToServer, end);
    }

    /// Forgets exchanges whose request is complete and whose response the client acknowledged in full.
    fn drop_acknowledged(&mut self) {
        let acked = self.tracker.acked_offset(Dir::ToClient).unwrap_or(0);
        while let Some(ex) = self.exchanges.front() {
            if ex.request_end.is_none() || ex.reply.end.is_none_or(|end| end > acked) {
                break;
            }
            self.exchanges.pop_front();
        }
    }

    fn handle_exchange_start(&mut self, es: &ExchangeStart) -> Result<Applied, Unprotection> {
        let Some(ex) = self.exchange_mut(es.exchange) else {
            return Ok(Applied::Ignored(Ignored::UnknownExchange { conn: es.conn, exchange: es.exchange }));
        };
        if ex.request.method != es.method {
            return Err(Unprotection::ExchangeMismatch {
                exchange: es.exchange,
                logged: es.method.clone(),
                framed: ex.request.method.clone(),
            });
        }
        ex.meta = Some(ExchangeMeta {
            idempotency_key: es.idempotency_key.clone(),
            key_generated: es.key_generated,
            upstream: es.upstream.clone(),
            request_offset: es.request_offset,
        });
        if es.upstream.is_some() && ex.upstream.is_none() {
            ex.upstream = Some(UpstreamLog::new(ex.index, &ex.request.method));
        }
        Ok(Applied::Taken)
    }
}

/// The replica table. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct ReplicaTable {
    epoch: u64,
    /// Last record applied in `epoch`.
    last_seq: Option<u64>,
    conns: BTreeMap<ConnKey, Conn>,
    /// A snapshot being received.
    snapshot: Option<Incoming>,
}

/// [`ReplicaTable::summary`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableSummary {
    pub connections: u64,
    /// Bytes held for every connection (streams, partial heads, upstream payload).
    pub bytes: u64,
    /// The most any one connection holds.
    pub largest_connection_bytes: u64,
    /// FNV-1a over every connection's TCP state in key order: equal on two nodes whose tables agree, and
    /// unchanged while no connection's state moves.
    pub digest: u64,
}

/// 64-bit FNV-1a: small, stable across builds and hosts.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A snapshot being received: connections announced, received so far, and the parts of the one
/// whose state is still arriving.
#[derive(Debug, Clone, Default)]
struct Incoming {
    announced: u64,
    received: u64,
    parts: Option<(ConnKey, Vec<u8>)>,
}

/// Two tables are equal when they hold the same epoch and the same connections,
/// every field of every tracker included: what a snapshot carries. Where each table
/// stands in the stream (a primary never applies the snapshot records it numbered
/// for a spare) is not compared.
impl PartialEq for ReplicaTable {
    fn eq(&self, other: &ReplicaTable) -> bool {
        self.epoch == other.epoch && self.conns == other.conns
    }
}

impl Eq for ReplicaTable {}

impl ReplicaTable {
    pub fn new() -> ReplicaTable {
        ReplicaTable::default()
    }

    /// Highest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn conn(&self, key: &ConnKey) -> Option<&Conn> {
        self.conns.get(key)
    }

    /// Every connection, in key order.
    pub fn conns(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    /// Connections that are not protected.
    pub fn unprotected(&self) -> usize {
        self.conns.values().filter(|c| c.unprotected().is_some()).count()
    }

    /// Exchanges over every connection that [`Exchange::awaiting_upstream`].
    pub fn awaiting_upstream(&self) -> usize {
        self.conns
            .values()
            .map(|c| c.tracked().map_or(0, |t| t.exchanges().iter().filter(|x| x.awaiting_upstream()).count()))
            .sum()
    }

    /// Bytes held in all (streams, partial heads, upstream payload).
    pub fn retained_bytes(&self) -> usize {
        self.conns.values().map(Conn::retained_bytes).sum()
    }

    /// Connections, bytes and a digest of the TCP state, for `/status`: O(connections), no byte copied.
    pub fn summary(&self) -> TableSummary {
        let mut sum = TableSummary { connections: self.conns.len() as u64, ..TableSummary::default() };
        let mut digest = Fnv::default();
        for c in self.conns.values() {
            let bytes = c.retained_bytes() as u64;
            sum.bytes += bytes;
            sum.largest_connection_bytes = sum.largest_connection_bytes.max(bytes);
            c.digest_into(&mut digest);
        }
        sum.digest = digest.0;
        sum
    }

    /// Applies one record of the replication stream.
    pub fn apply(&mut self, rec: &Record) -> Result<Applied, ApplyError> {
        if rec.epoch < self.epoch {
            return Err(ApplyError::StaleEpoch { seq: rec.seq, record: rec.epoch, table: self.epoch });
        }
        if rec.epoch == self.epoch
            && let Some(last) = self.last_seq
            && rec.seq <= last
        {
            return Err(ApplyError::OutOfSequence { last, got: rec.seq });
        }
        if self.snapshot.is_some() && !matches!(rec.msg, Message::SnapshotConn { .. } | Message::SnapshotEnd) {
            return Err(SnapshotError::Interrupted.into());
        }
        let applied = self.apply_message(&rec.msg)?;
        self.epoch = rec.epoch;
        self.last_seq = Some(rec.seq);
        Ok(applied)
    }

    fn apply_message(&mut self, msg: &Message) -> Result<Applied, ApplyError> {
        Ok(match msg {
            Message::Segment { at_us, dir, datagram } => self.apply_segment(*at_us, *dir, datagram),
            Message::Reply { conn, offset, bytes } => self.with_tracked(conn, |t| t.handle_reply(*offset, bytes)),
            Message::ExchangeStart(es) => self.with_tracked(&es.conn, |t| t.handle_exchange_start(es)),
            Message::Upstream { conn, exchange, offset, bytes } => self.with_tracked(conn, |t| {
                let Some(ex) = t.exchange_mut(*exchange) else {
                    return Ok(Applied::Ignored(Ignored::UnknownExchange { conn: *conn, exchange: *exchange }));
                };
                let method = ex.request.method.clone();
                ex.upstream.get_or_insert_with(|| UpstreamLog::new(*exchange, &method)).handle(*offset, bytes);
                Ok(Applied::Taken)
            }),
            Message::ExchangeEnd { conn, exchange, status } => self.with_tracked(conn, |t| {
                let Some(ex) = t.exchange_mut(*exchange) else {
                    return Ok(Applied::Ignored(Ignored::UnknownExchange { conn: *conn, exchange: *exchange }));
                };
                ex.ended = Some(*status);
                if let Some(u) = &mut ex.upstream {
                    u.exchange_ended();
                }
                Ok(Applied::Taken)
            }),
            Message::Ping | Message::Handover => Applied::Taken,
            Message::ConnClosed { conn } => match self.conns.remove(conn) {
                Some(_) => Applied::Taken,
                None => Applied::Ignored(Ignored::UnknownConnection(*conn)),
            },
            Message::SnapshotBegin { connections } => {
                self.conns.clear();
                self.snapshot = Some(Incoming { announced: *connections, ..Incoming::default() });
                Applied::Taken
            }
            Message::SnapshotConn { conn, state, more } => {
                let Some(incoming) = &mut self.snapshot else {
                    return Err(SnapshotError::NotInSnapshot("SnapshotConn").into());
                };
                // A state in one part (most) is decoded where it lies: a join's snapshot is megabytes.
                let whole = match incoming.parts.take() {
                    Some((cut, _)) if cut != *conn => return Err(SnapshotError::PartsCut { conn: cut }.into()),
                    Some((_, mut bytes)) => {
                        bytes.extend_from_slice(state);
                        std::borrow::Cow::Owned(bytes)
                    }
                    None => std::borrow::Cow::Borrowed(&state[..]),
                };
                if *more {
                    incoming.parts = Some((*conn, whole.into_owned()));
                    return Ok(Applied::Taken);
                }
                incoming.received += 1;
                let state = State::decode(*conn, &whole)?;
                self.conns.insert(*conn, Conn { key: *conn, state });
                Applied::Taken
            }
            Message::SnapshotEnd => {
                let Some(incoming) = self.snapshot.take() else {
                    return Err(SnapshotError::NotInSnapshot("SnapshotEnd").into());
                };
                if let Some((conn, _)) = incoming.parts {
                    return Err(SnapshotError::PartsCut { conn }.into());
                }
                let Incoming { announced, received, .. } = incoming;
                if announced != received {
                    return Err(SnapshotError::Count { announced, received }.into());
                }
                Applied::Taken
            }
        })
    }

    /// Runs `f` on a protected connection; an error from it unprotects the connection.
    fn with_tracked(
        &mut self,
        key: &ConnKey,
        f: impl FnOnce(&mut Tracked) -> Result<Applied, Unprotection>,
    ) -> Applied {
        let Some(conn) = self.conns.get_mut(key) else {
            return Applied::Ignored(Ignored::UnknownConnection(*key));
        };
        let State::Tracked(t) = &mut conn.state else {
            return Applied::Ignored(Ignored::Unprotected(*key));
        };
        match f(t) {
            Ok(applied) => applied,
            Err(reason) => conn.unprotect(reason),
        }
    }

    fn apply_segment(&mut self, at_us: u64, dir: Dir, datagram: &[u8]) -> Applied {
        let seg = match Segment::parse_ipv4(datagram, Checksums::Verify) {
            Ok(seg) => seg,
            Err(e) => return Applied::Ignored(Ignored::BadDatagram(e)),
        };
        let key = match dir {
            Dir::ToServer => ConnKey { client: seg.src, server: seg.dst },
            Dir::ToClient => ConnKey { client: seg.dst, server: seg.src },
        };
        let f = seg.flags;
        // Only what a listening socket takes as a connection request (RFC 9293 3.10.7.2; Linux drops a SYN
        // that also carries FIN or RST): anything else would leave state the kernel never had.
        let opens = dir == Dir::ToServer && f.syn() && !f.ack() && !f.fin() && !f.rst();
        let replace = match self.conns.get(&key).map(|c| &c.state) {
            None => true,
            Some(State::Unprotected(_)) => opens,
            // Port reuse after a close the primary has not reported yet.
            Some(State::Tracked(t)) => {
                opens
                    && matches!(t.tracker.state(), TcpState::Close | TcpState::TimeWait)
                    && t.tracker.endpoint(Dir::ToServer).and_then(|e| e.isn) != Some(seg.seq)
            }
        };
        if replace {
            if opens {
                self.conns.insert(key, Conn { key, state: State::Tracked(Box::new(Tracked::new())) });
            } else if dir == Dir::ToServer && !seg.payload.is_empty() && f.ack() && !f.syn() && !f.rst() {
                // (Data without ACK, or with SYN, is dropped by every TCP, RFC 9293 3.10.7.4: a flood of
                // such segments for unknown connections must leave nothing behind.)
                // Data from a connection never seen opening: served, not protected.
                let lost = Lost { reason: Unprotection::MidStream, client_fin: seg.flags.fin(), server_fin: false };
                tracing::warn!(conn = ?key, reason = %lost.reason, "connection unprotected");
                self.conns.insert(key, Conn { key, state: State::Unprotected(lost) });
                return Applied::Unprotected { conn: key, reason: Unprotection::MidStream };
            } else if !self.conns.contains_key(&key) {
                return Applied::Ignored(Ignored::Stray);
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else { return Applied::Ignored(Ignored::Stray) };
        match &mut conn.state {
            State::Tracked(t) => match t.handle_segment(at_us, dir, &seg) {
                Ok(applied) => applied,
                Err(reason) => conn.unprotect(reason),
            },
            State::Unprotected(lost) => {
                // Kept only until it visibly ends.
                match dir {
                    Dir::ToServer => lost.client_fin |= seg.flags.fin(),
                    Dir::ToClient => lost.server_fin |= seg.flags.fin(),
                }
                if seg.flags.rst() || (lost.client_fin && lost.server_fin) {
                    self.conns.remove(&key);
                }
                Applied::Ignored(Ignored::Unprotected(key))
            }
        }
    }

    /// The table as messages a joining spare applies to an empty table (invariant 3):
    /// `SnapshotBegin`, each connection's state in as many `SnapshotConn` parts as it takes for
    /// every record to fit a frame of `max_frame` bytes, `SnapshotEnd`. Applied in records of
    /// this epoch, they rebuild an equal table.
    pub fn snapshot(&self, max_frame: usize) -> Vec<Message> {
        // Room for the record around a part: sequence, epoch, message tag, key, lengths.
        const ENVELOPE: usize = 256;
        let max_part = max_frame.saturating_sub(ENVELOPE).max(1);
        let mut out = Vec::with_capacity(self.conns.len() + 2);
        out.push(Message::SnapshotBegin { connections: self.conns.len() as u64 });
        for (key, conn) in &self.conns {
            let state = codec::encode(&conn.state)
                .expect("replica state has only sized sequences and no custom serialisers: bincode cannot fail on it");
            if state.len() <= max_part {
                // Moved, not copied: the table is locked while this runs.
                out.push(Message::SnapshotConn { conn: *key, state, more: false });
                continue;
            }
            let parts = state.len().div_ceil(max_part);
            for (i, part) in state.chunks(max_part).enumerate() {
                out.push(Message::SnapshotConn { conn: *key, state: part.to_vec(), more: i + 1 < parts });
            }
        }
        out.push(Message::SnapshotEnd);
        out
    }
}

/// Serde adapter for `VecDeque<u8>`: the bytes as one slice, which bincode copies
/// at once instead of one `u8` at a time. Same encoding as serde's default.
mod deque_bytes {
    use serde::{Deserializer, Serializer};
    use std::collections::VecDeque;

    pub fn serialize<S: Serializer>(bytes: &VecDeque<u8>, serializer: S) -> Result<S::Ok, S::Error> {
        match bytes.as_slices() {
            (a, []) => serializer.serialize_bytes(a),
            (a, b) => serializer.serialize_bytes(&[a, b].concat()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<VecDeque<u8>, D::Error> {
        crate::codec::bytes::deserialize(deserializer).map(VecDeque::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(method: &str) -> UpstreamLog {
        UpstreamLog::new(0, method)
    }

    #[test]
    fn an_exchange_awaits_upstream_only_once_its_request_is_complete() {
        let request = RequestHead {
            index: 0,
            start: 0,
            head_end: 60,
            method: "POST".into(),
            target: "/upload".into(),
            version: 1,
            framing: super::super::http::BodyFraming::Length(3_000_000),
            idempotency_key: Some("k".into()),
            expect_continue: false,
            range: false,
            close: false,
        };
        let mut ex = Exchange::new(request);
        ex.meta = Some(ExchangeMeta {
            idempotency_key: Some("k".into()),
            key_generated: false,
            upstream: Some("http://10.2.0.10:8080".into()),
            request_offset: 0,
        });
        assert!(!ex.awaiting_upstream(), "the body is still arriving: the origin cannot answer yet");
        ex.request_end = Some(3_000_060);
        assert!(ex.awaiting_upstream(), "complete and sent upstream, no head yet");
        ex.ended = Some(201);
        assert!(!ex.awaiting_upstream());
    }

    #[test]
    fn upstream_log_keeps_only_payload_beyond_what_the_reply_covered() {
        let mut u = log_with("GET");
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        u.handle(0, head);
        u.handle(head.len() as u64, b"01234");
        assert_eq!((u.payload_start, u.logged, u.payload_from(0)), (0, 5, b"01234".to_vec()));
        u.trim(3);
        assert_eq!(u.payload_from(3), b"34");
        // The reply ran ahead of the log: bytes below it are not kept when they arrive.
        u.trim(7);
        u.handle(head.len() as u64 + 5, b"56789");
        assert_eq!((u.payload_start, u.logged, u.payload_from(7)), (7, 10, b"789".to_vec()));
        assert!(u.complete && u.covers_from(7) && !u.covers_from(6));
    }

    #[test]
    fn upstream_log_with_a_gap_or_bad_framing_is_unusable_and_empty() {
        let mut u = log_with("GET");
        u.handle(0, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01");
        u.handle(100, b"x");
        assert!(u.broken.is_some() && u.payload.is_empty() && !u.covers_from(0));
        let mut u = log_with("GET");
        u.handle(0, b"NOT HTTP\r\n\r\n");
        assert!(u.broken.is_some());
    }

    #[test]
    fn upstream_log_of_a_close_delimited_response_completes_when_the_exchange_ends() {
        let mut u = log_with("GET");
        u.handle(0, b"HTTP/1.1 200 OK\r\n\r\nall of it");
        assert!(!u.complete);
        u.exchange_ended();
        assert!(u.complete && u.covers_from(0));
        assert_eq!(u.payload_from(0), b"all of it");
        // HEAD: no body whatever the length says.
        let mut u = log_with("HEAD");
        u.handle(0, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n");
        assert!(u.complete && u.logged == 0);
    }

    #[test]
    fn exchange_records_round_trip_through_the_codec_with_the_same_encoding_as_plain_serde() {
        let mut u = log_with("GET");
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        u.handle(0, head);
        u.handle(head.len() as u64, b"0123456");
        u.trim(5);
        u.handle(head.len() as u64 + 7, b"78");
        // The payload's ring buffer wraps: the adapter must join both halves.
        assert!(!u.payload.as_slices().1.is_empty(), "{:?}", u.payload.as_slices());
        let request = RequestHead {
            index: 4,
            start: 100,
            head_end: 140,
            method: "POST".into(),
            target: "/o".into(),
            version: 1,
            framing: super::super::http::BodyFraming::Length(3),
            idempotency_key: Some("k".into()),
            expect_continue: true,
            range: false,
            close: false,
        };
        let mut ex = Exchange::new(request);
        ex.request_end = Some(143);
        ex.meta = Some(ExchangeMeta {
            idempotency_key: Some("k".into()),
            key_generated: false,
            upstream: Some("http://10.2.0.10:8080".into()),
            request_offset: 100,
        });
        ex.reply = ReplyProgress {
            start: Some(0),
            interim_sent: true,
            head: u.head.clone(),
            body_logged: 5,
            body_crc: 7,
            end: None,
        };
        ex.upstream = Some(u.clone());
        ex.ended = Some(200);
        let bytes = codec::encode(&ex).unwrap();
        assert_eq!(codec::decode::<Exchange>(&bytes), Ok(ex.clone()));
        let copy = codec::decode::<Exchange>(&bytes).unwrap().upstream.unwrap();
        assert_eq!(copy.payload_from(5), b"5678");
        // Same bytes as serde's default for a deque and a vector of bytes.
        #[derive(Serialize)]
        struct Plain<'a>(&'a VecDeque<u8>, &'a Vec<u8>);
        #[derive(Serialize)]
        struct Adapted<'a>(
            #[serde(with = "deque_bytes")] &'a VecDeque<u8>,
            #[serde(with = "crate::codec::bytes")] &'a Vec<u8>,
        );
        assert_eq!(codec::encode(&Plain(&u.payload, &u.head_raw)), codec::encode(&Adapted(&u.payload, &u.head_raw)));
    }

    #[test]
    fn records_for_unknown_connections_and_exchanges_are_ignored() {
        let mut t = ReplicaTable::new();
        let conn = ConnKey { client: "10.0.0.1:1".parse().unwrap(), server: "10.0.0.2:80".parse().unwrap() };
        let rec = |seq, msg| Record { seq, epoch: 1, msg };
        let reply = Message::Reply { conn, offset: 0, bytes: b"x".to_vec() };
        assert_eq!(t.apply(&rec(1, reply)), Ok(Applied::Ignored(Ignored::UnknownConnection(conn))));
        let garbage = Message::Segment { at_us: 0, dir: Dir::ToServer, datagram: vec![0x45, 0, 0] };
        assert!(matches!(t.apply(&rec(2, garbage)), Ok(Applied::Ignored(Ignored::BadDatagram(_)))));
        assert_eq!(
            t.apply(&rec(3, Message::ConnClosed { conn })),
            Ok(Applied::Ignored(Ignored::UnknownConnection(conn)))
        );
        assert!(t.is_empty());
    }
}
