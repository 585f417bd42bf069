//! HTTP/1.1 message framing over one direction of a connection, fed incrementally
//! at stream offsets.
//!
//! Read RFC 9112 (§2.2 empty lines before a message, §6 message body length and the
//! order of its rules in §6.3, §7.1 chunked coding and §7.1.2 trailers, §9.3
//! persistence and pipelining) and RFC 9110 (§6.4.1: no content after HEAD, 1xx,
//! 204 and 304; §9.2.2 idempotent methods; §10.1.1 `Expect: 100-continue`; §15.2
//! interim responses; §9.3.6 CONNECT). Heads are parsed with `httparse`; bodies are
//! counted, never buffered, so a framer holds one head at most.
//!
//! A [`Framer`] follows one direction. On the request side it numbers requests from
//! 0; on the response side it pairs each final response with the oldest request
//! still waiting ([`Framer::expect_response`]), which decides whether a body can
//! follow (HEAD, CONNECT). [`ConnFramer`] wires the two directions of a connection
//! together. The framer never guesses: input it cannot frame is a [`FrameError`],
//! after which it stays failed and the connection is reported unprotected.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::ops::Range;

/// Largest head (start line and header section) a framer buffers: the largest the
/// proxy can be configured to accept (`limits`), so a head the proxy serves is never
/// refused here.
pub const MAX_HEAD_BYTES: usize = 1 << 20;
/// Header fields per head.
const MAX_HEADERS: usize = 256;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section.
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// Which direction a framer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    /// Client to server: requests.
    Request,
    /// Server to client (or upstream to proxy): responses.
    Response,
}

/// Why bytes could not be framed. The framer stays failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum FrameError {
    /// The head is not HTTP/1.x (`httparse`'s reason).
    #[error("{side:?} head at offset {offset} is malformed: {reason}")]
    MalformedHead { side: Side, offset: u64, reason: String },
    /// The head grew beyond [`MAX_HEAD_BYTES`] without ending.
    #[error("{side:?} head at offset {offset} exceeds {limit} bytes")]
    HeadTooLarge { side: Side, offset: u64, limit: usize },
    /// A Content-Length that is not a number, or several that disagree (RFC 9110 §8.6).
    #[error("{side:?} head at offset {offset} has an invalid Content-Length")]
    BadContentLength { side: Side, offset: u64 },
    /// A Transfer-Encoding the framer cannot delimit: a request whose final coding is
    /// not chunked, chunked applied twice, or any transfer coding in HTTP/1.0
    /// (RFC 9112 §6.1, §6.3).
    #[error("{side:?} head at offset {offset} has an unusable Transfer-Encoding")]
    BadTransferEncoding { side: Side, offset: u64 },
    /// A request with both Transfer-Encoding and Content-Length (RFC 9112 §6.3: a
    /// smuggling risk the proxy refuses too).
    #[error("request at offset {offset} has both Transfer-Encoding and Content-Length")]
    AmbiguousLength { offset: u64 },
    /// A malformed chunk-size line, chunk data not followed by CRLF, or an oversized
    /// chunk line or trailer section.
    #[error("{side:?} chunked body is malformed at offset {offset}: {reason}")]
    BadChunk { side: Side, offset: u64, reason: String },
    /// A response with no request waiting for it.
    #[error("response at offset {offset} answers no request")]
    UnsolicitedResponse { offset: u64 },
    /// The connection left HTTP/1.1 (101 Switching Protocols, or a 2xx to CONNECT):
    /// what follows is not framed.
    #[error("connection switched protocols at offset {offset} (status {status})")]
    ProtocolSwitch { offset: u64, status: u16 },
    /// Bytes fed beyond the next expected offset (a hole the caller must not create).
    #[error("{side:?} bytes fed at offset {got}, expected {expected}")]
    OutOfOrder { side: Side, expected: u64, got: u64 },
    /// Response bytes after a response that closes the connection.
    #[error("response bytes at offset {offset} after the connection was to close")]
    DataAfterClose { offset: u64 },
}

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyFraming {
    /// No body: HEAD responses, 1xx, 204, 304, requests without a length.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Transfer-Encoding chunked.
    Chunked,
    /// A response delimited by the connection closing.
    UntilClose,
}

/// Where a chunked body stands, exactly: what a continuation must write first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkPos {
    /// In a chunk-size line; `line` holds its bytes so far (empty: at a chunk boundary).
    SizeLine {
        #[serde(with = "crate::codec::bytes")]
        line: Vec<u8>,
    },
    /// In chunk data, `remaining` bytes to go.
    Data { remaining: u64 },
    /// After chunk data, in its CRLF; `cr` says whether the CR was seen.
    DataEnd { cr: bool },
    /// After the last chunk, in the trailer section: `line` is the field line so far,
    /// `total` the bytes of the section so far.
    Trailers {
        #[serde(with = "crate::codec::bytes")]
        line: Vec<u8>,
        total: usize,
    },
}

/// Body progress of the message being read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyState {
    Length { remaining: u64 },
    Chunked(ChunkPos),
    UntilClose,
}

/// A request head, with what the replica needs of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Request number on the connection, from 0.
    pub index: u64,
    /// Stream offset of the head's first byte (leading empty lines included).
    pub start: u64,
    /// Stream offset just after the head.
    pub head_end: u64,
    pub method: String,
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub framing: BodyFraming,
    /// The client's own `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// The request carries a `Range` header.
    pub range: bool,
    /// The connection closes after this exchange (RFC 9112 §9.3).
    pub close: bool,
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// The request it answers.
    pub index: u64,
    pub start: u64,
    pub head_end: u64,
    pub status: u16,
    pub version: u8,
    pub framing: BodyFraming,
    /// The connection closes after this response.
    pub close: bool,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub content_range: Option<String>,
}

impl ResponseHead {
    /// A 1xx interim response: the final response still follows.
    pub fn interim(&self) -> bool {
        (100..200).contains(&self.status)
    }
}

/// What framing bytes revealed, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request head; `raw` is its bytes.
    RequestHead { head: RequestHead, raw: Vec<u8> },
    /// A response head (interim ones included); `raw` is its bytes.
    ResponseHead { head: ResponseHead, raw: Vec<u8> },
    /// Body payload (chunk framing excluded) at stream offsets `range`, which is
    /// `body_offset..` of the decoded body. Only from framers made `with_body_events`.
    Body { index: u64, range: Range<u64>, body_offset: u64 },
    /// Message `index` ends at stream offset `end`.
    Complete { side: Side, index: u64, end: u64 },
}

/// Where a framer stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Before or inside a head that starts at `start`; `buf` holds its bytes so far
    /// (empty between messages, or only empty lines).
    Head {
        start: u64,
        #[serde(with = "crate::codec::bytes")]
        buf: Vec<u8>,
    },
    /// Inside message `index`'s body, `body_offset` payload bytes in. `close`: the
    /// side ends with this message.
    Body { index: u64, body: BodyState, body_offset: u64, close: bool },
    /// No further message on this side: a request that closes the connection was
    /// read (later bytes are ignored, as the server ignores them), or a response
    /// that closes it ended.
    Done,
    /// Framing failed.
    Failed(FrameError),
}

/// A request waiting for its final response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Awaiting {
    pub index: u64,
    /// A HEAD request: its responses have no body.
    pub head: bool,
    /// A CONNECT request: a 2xx turns the connection into a tunnel.
    pub connect: bool,
}

/// One direction's framer. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Framer {
    side: Side,
    /// Next stream offset expected.
    pos: u64,
    phase: Phase,
    /// Request side: index of the next request.
    next_index: u64,
    /// Response side: requests waiting for a final response, oldest first.
    awaiting: VecDeque<Awaiting>,
    body_events: bool,
}

/// What a complete head decided.
enum AfterHead {
    /// Message `index` has a body framed by `framing`; `close` ends the side after it.
    Message { index: u64, framing: BodyFraming, close: bool },
    /// An interim response: another head follows.
    Interim,
}

impl Framer {
    /// A framer of requests, from stream offset `pos`.
    pub fn requests(pos: u64) -> Framer {
        Framer::new(Side::Request, pos)
    }

    /// A framer of responses, from stream offset `pos`.
    pub fn responses(pos: u64) -> Framer {
        Framer::new(Side::Response, pos)
    }

    fn new(side: Side, pos: u64) -> Framer {
        Framer {
            side,
            pos,
            phase: Phase::Head { start: pos, buf: Vec::new() },
            next_index: 0,
            awaiting: VecDeque::new(),
            body_events: false,
        }
    }

    /// Reports body payload ranges ([`Event::Body`]).
    pub fn with_body_events(mut self) -> Framer {
        self.body_events = true;
        self
    }

    /// Response side: request `index`, made with `method`, waits for its response.
    pub fn expect_response(&mut self, index: u64, method: &str) {
        self.awaiting.push_back(Awaiting {
            index,
            head: method.eq_ignore_ascii_case("HEAD"),
            connect: method.eq_ignore_ascii_case("CONNECT"),
        });
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// Next stream offset expected.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Response side: the request the next (or current) response answers.
    pub fn awaiting(&self) -> Option<&Awaiting> {
        self.awaiting.front()
    }

    /// Request side: the index the next request gets.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Bytes held in memory: a partial head, chunk line or trailer line.
    pub fn retained_bytes(&self) -> usize {
        match &self.phase {
            Phase::Head { buf, .. } => buf.len(),
            Phase::Body { body: BodyState::Chunked(ChunkPos::SizeLine { line }), .. }
            | Phase::Body { body: BodyState::Chunked(ChunkPos::Trailers { line, .. }), .. } => line.len(),
            _ => 0,
        }
    }

    /// Feeds `bytes` found at stream offset `offset`, appending what they reveal to
    /// `out`. Bytes before [`Framer::pos`] were framed already and are skipped; a
    /// start beyond it is an error. After an error the framer stays failed.
    pub fn feed(&mut self, offset: u64, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), FrameError> {
        if let Phase::Failed(e) = &self.phase {
            return Err(e.clone());
        }
        if offset > self.pos {
            return self.fail(FrameError::OutOfOrder { side: self.side, expected: self.pos, got: offset });
        }
        let skip = (self.pos - offset).min(bytes.len() as u64) as usize;
        let mut input = &bytes[skip..];
        while !input.is_empty() {
            let used = match self.step(input, out) {
                Ok(used) => used,
                Err(e) => return self.fail(e),
            };
            input = &input[used..];
        }
        Ok(())
    }

    fn fail(&mut self, e: FrameError) -> Result<(), FrameError> {
        self.phase = Phase::Failed(e.clone());
        Err(e)
    }

    /// Consumes a prefix of `input` (at least one byte), advancing `pos`, and
    /// returns its length.
    fn step(&mut self, input: &[u8], out: &mut Vec<Event>) -> Result<usize, FrameError> {
        match &self.phase {
            Phase::Head { .. } => self.step_head(input, out),
            Phase::Body { .. } => self.step_body(input, out),
            Phase::Done => match self.side {
                Side::Request => {
                    self.pos += input.len() as u64;
                    Ok(input.len())
                }
                Side::Response => Err(FrameError::DataAfterClose { offset: self.pos }),
            },
            Phase::Failed(e) => Err(e.clone()),
        }
    }

    fn step_head(&mut self, input: &[u8], out: &mut Vec<Event>) -> Result<usize, FrameError> {
        let side = self.side;
        let Phase::Head { start, buf } = &mut self.phase else { unreachable!("step_head outside a head") };
        let start = *start;
        let mut from = 0;
        // Only an LF that ends an empty line can end the head; httparse decides.
        while let Some(i) = input[from..].iter().position(|&b| b == b'\n') {
            let lf = from + i;
            let back = |k: usize| -> Option<u8> {
                // The byte `k` positions before the LF, in the input or the buffer.
                if k <= lf { Some(input[lf - k]) } else { buf.len().checked_sub(k - lf).map(|j| buf[j]) }
            };
            let blank_line = back(1) == Some(b'\n') || (back(1) == Some(b'\r') && back(2) == Some(b'\n'));
            from = lf + 1;
            if !blank_line {
                continue;
            }
            if buf.len() + from > MAX_HEAD_BYTES {
                return Err(FrameError::HeadTooLarge { side, offset: start, limit: MAX_HEAD_BYTES });
            }
            buf.extend_from_slice(&input[..from]);
            let raw = std::mem::take(buf);
            self.pos += from as u64;
            match self.parse_head(start, &raw)? {
                None => {
                    // Only empty lines so far (RFC 9112 §2.2): keep reading.
                    self.phase = Phase::Head { start, buf: raw };
                }
                Some((after, event)) => self.after_head(after, event, raw, out),
            }
            return Ok(from);
        }
        if buf.len() + input.len() > MAX_HEAD_BYTES {
            return Err(FrameError::HeadTooLarge { side, offset: start, limit: MAX_HEAD_BYTES });
        }
        buf.extend_from_slice(input);
        self.pos += input.len() as u64;
        Ok(input.len())
    }

    /// Emits a complete head's event and enters its body.
    fn after_head(&mut self, after: AfterHead, mut event: Event, raw: Vec<u8>, out: &mut Vec<Event>) {
        if let Event::RequestHead { raw: r, .. } | Event::ResponseHead { raw: r, .. } = &mut event {
            *r = raw;
        }
        out.push(event);
        match after {
            AfterHead::Interim => self.phase = Phase::Head { start: self.pos, buf: Vec::new() },
            AfterHead::Message { index, framing, close } => {
                let body = match framing {
                    BodyFraming::Empty | BodyFraming::Length(0) => None,
                    BodyFraming::Length(n) => Some(BodyState::Length { remaining: n }),
                    BodyFraming::Chunked => Some(BodyState::Chunked(ChunkPos::SizeLine { line: Vec::new() })),
                    BodyFraming::UntilClose => Some(BodyState::UntilClose),
                };
                match body {
                    Some(body) => self.phase = Phase::Body { index, body, body_offset: 0, close },
                    None => self.complete(index, close, out),
                }
            }
        }
    }

    fn complete(&mut self, index: u64, close: bool, out: &mut Vec<Event>) {
        out.push(Event::Complete { side: self.side, index, end: self.pos });
        self.phase = if close { Phase::Done } else { Phase::Head { start: self.pos, buf: Vec::new() } };
    }

    fn step_body(&mut self, input: &[u8], out: &mut Vec<Event>) -> Result<usize, FrameError> {
        let (side, pos) = (self.side, self.pos);
        let Phase::Body { index, body, body_offset, close } = &mut self.phase else {
            unreachable!("step_body outside a body")
        };
        let (index, close) = (*index, *close);
        let len = input.len() as u64;
        // Payload, when any, is the prefix of what a step consumes.
        let (used, payload, done) = match body {
            BodyState::Length { remaining } => {
                let n = (*remaining).min(len);
                *remaining -= n;
                (n, n, *remaining == 0)
            }
            BodyState::UntilClose => (len, len, false),
            BodyState::Chunked(c) => step_chunk(side, pos, c, input)?,
        };
        if payload > 0 {
            if self.body_events {
                out.push(Event::Body { index, range: pos..pos + payload, body_offset: *body_offset });
            }
            *body_offset += payload;
        }
        self.pos += used;
        if done {
            self.complete(index, close, out);
        }
        Ok(used as usize)
    }

    /// Parses a head that ends with an empty line; `None` when it holds only empty lines.
    fn parse_head(&mut self, start: u64, raw: &[u8]) -> Result<Option<(AfterHead, Event)>, FrameError> {
        let side = self.side;
        let malformed = |reason: String| FrameError::MalformedHead { side, offset: start, reason };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head_end = start + raw.len() as u64;
        match side {
            Side::Request => {
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(raw) {
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
                    Ok(httparse::Status::Complete(_)) => return Err(malformed("head ends early".into())),
                    Err(e) => return Err(malformed(e.to_string())),
                }
                let version = req.version.unwrap_or(1);
                let method = req.method.unwrap_or_default().to_string();
                let target = req.path.unwrap_or_default().to_string();
                let f = Fields::of(req.headers);
                let framing = if f.transfer_encoding.is_some() {
                    if f.content_length.is_some() {
                        return Err(FrameError::AmbiguousLength { offset: start });
                    }
                    if version == 0 || f.final_coding() != Some(Coding::ChunkedOnce) {
                        return Err(FrameError::BadTransferEncoding { side, offset: start });
                    }
                    BodyFraming::Chunked
                } else {
                    match f.content_length {
                        None | Some(Some(0)) => BodyFraming::Empty,
                        Some(Some(n)) => BodyFraming::Length(n),
                        Some(None) => return Err(FrameError::BadContentLength { side, offset: start }),
                    }
                };
                let close = f.closes(version);
                let index = self.next_index;
                self.next_index += 1;
                let head = RequestHead {
                    index,
                    start,
                    head_end,
                    method,
                    target,
                    version,
                    framing,
                    idempotency_key: f.idempotency_key,
                    expect_continue: f.expect_continue,
                    range: f.range,
                    close,
                };
                Ok(Some((AfterHead::Message { index, framing, close }, Event::RequestHead { head, raw: Vec::new() })))
            }
            Side::Response => {
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(raw) {
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Ok(httparse::Status::Complete(n)) if n == raw.len() => {}
                    Ok(httparse::Status::Complete(_)) => return Err(malformed("head ends early".into())),
                    Err(e) => return Err(malformed(e.to_string())),
                }
                let version = resp.version.unwrap_or(1);
                let status = resp.code.unwrap_or(0);
                let f = Fields::of(resp.headers);
                let Some(awaiting) = self.awaiting.front().cloned() else {
                    return Err(FrameError::UnsolicitedResponse { offset: start });
                };
                if status == 101 || (awaiting.connect && (200..300).contains(&status)) {
                    return Err(FrameError::ProtocolSwitch { offset: start, status });
                }
                let mut head = ResponseHead {
                    index: awaiting.index,
                    start,
                    head_end,
                    status,
                    version,
                    framing: BodyFraming::Empty,
                    close: false,
                    etag: f.etag.clone(),
                    last_modified: f.last_modified.clone(),
                    content_range: f.content_range.clone(),
                };
                if head.interim() {
                    return Ok(Some((AfterHead::Interim, Event::ResponseHead { head, raw: Vec::new() })));
                }
                self.awaiting.pop_front();
                let framing = if awaiting.head || status == 204 || status == 304 {
                    BodyFraming::Empty
                } else if f.transfer_encoding.is_some() {
                    match f.final_coding() {
                        _ if version == 0 => return Err(FrameError::BadTransferEncoding { side, offset: start }),
                        Some(Coding::ChunkedOnce) => BodyFraming::Chunked,
                        Some(Coding::ChunkedMisplaced) => {
                            return Err(FrameError::BadTransferEncoding { side, offset: start });
                        }
                        // A final coding other than chunked: the body runs to the close (RFC 9112 §6.3 ¶4).
                        Some(Coding::Other) | None => BodyFraming::UntilClose,
                    }
                } else {
                    match f.content_length {
                        None => BodyFraming::UntilClose,
                        Some(Some(n)) => BodyFraming::Length(n),
                        Some(None) => return Err(FrameError::BadContentLength { side, offset: start }),
                    }
                };
                head.framing = framing;
                head.close = framing == BodyFraming::UntilClose || f.closes(version);
                let close = head.close;
                Ok(Some((
                    AfterHead::Message { index: awaiting.index, framing, close },
                    Event::ResponseHead { head, raw: Vec::new() },
                )))
            }
        }
    }
}

/// Steps a chunked body: one line's worth, one data run, or one CRLF byte. Returns
/// (bytes used, payload bytes among them, body complete).
fn step_chunk(side: Side, pos: u64, c: &mut ChunkPos, input: &[u8]) -> Result<(u64, u64, bool), FrameError> {
    // A line's error is reported at the line's start, wherever the input was cut.
    let bad = |at: u64, reason: &str| FrameError::BadChunk { side, offset: at, reason: reason.to_string() };
    match c {
        ChunkPos::SizeLine { line } => {
            let at = pos - line.len() as u64;
            let Some(used) = take_line(line, input, MAX_CHUNK_LINE).map_err(|_| bad(at, "chunk-size line too long"))?
            else {
                return Ok((input.len() as u64, 0, false));
            };
            let size = parse_chunk_size(line).ok_or_else(|| bad(at, "malformed chunk-size line"))?;
            *c = if size == 0 {
                ChunkPos::Trailers { line: Vec::new(), total: 0 }
            } else {
                ChunkPos::Data { remaining: size }
            };
            Ok((used as u64, 0, false))
        }
        ChunkPos::Data { remaining } => {
            let n = (*remaining).min(input.len() as u64);
            *remaining -= n;
            if *remaining == 0 {
                *c = ChunkPos::DataEnd { cr: false };
            }
            Ok((n, n, false))
        }
        ChunkPos::DataEnd { cr } => {
            match (*cr, input[0]) {
                (false, b'\r') => *cr = true,
                (true, b'\n') => *c = ChunkPos::SizeLine { line: Vec::new() },
                _ => return Err(bad(pos, "chunk data not followed by CRLF")),
            }
            Ok((1, 0, false))
        }
        ChunkPos::Trailers { line, total } => {
            let room = MAX_TRAILER_BYTES.saturating_sub(*total);
            let before = line.len();
            let at = pos - before as u64;
            let Some(used) = take_line(line, input, room + before).map_err(|_| bad(at, "trailer section too large"))?
            else {
                *total += input.len();
                return Ok((input.len() as u64, 0, false));
            };
            *total += used;
            if line.as_slice() == b"\r\n" {
                return Ok((used as u64, 0, true));
            }
            if !line.ends_with(b"\r\n") || !line.contains(&b':') {
                return Err(bad(at, "malformed trailer field"));
            }
            line.clear();
            Ok((used as u64, 0, false))
        }
    }
}

/// Appends `input` to `line` up to and including the first LF. Returns the bytes
/// used when the line is complete, `None` when all of `input` was taken without an
/// LF, and an error when the line would exceed `max`.
fn take_line(line: &mut Vec<u8>, input: &[u8], max: usize) -> Result<Option<usize>, ()> {
    let (used, complete) = match input.iter().position(|&b| b == b'\n') {
        Some(i) => (i + 1, true),
        None => (input.len(), false),
    };
    if line.len() + used > max {
        return Err(());
    }
    line.extend_from_slice(&input[..used]);
    Ok(complete.then_some(used))
}

/// Parses `chunk-size [ BWS ";" ext ] CRLF` (RFC 9112 §7.1.1).
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let body = line.strip_suffix(b"\r\n")?;
    let digits = body.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let size = u64::from_str_radix(std::str::from_utf8(&body[..digits]).ok()?, 16).ok()?;
    let rest = &body[digits..];
    let rest = &rest[rest.iter().take_while(|b| matches!(b, b' ' | b'\t')).count()..];
    let ext_ok = rest.is_empty() || (rest[0] == b';' && rest.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b)));
    ext_ok.then_some(size)
}

/// Where "chunked" stands among the transfer codings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    /// The final coding is chunked, applied once.
    ChunkedOnce,
    /// Chunked applied more than once, or not last (RFC 9112 §6.1, §6.3).
    ChunkedMisplaced,
    /// The final coding is something else.
    Other,
}

/// The header fields framing and resuming depend on.
#[derive(Default)]
struct Fields {
    /// `None`: absent; `Some(None)`: present but invalid or conflicting.
    content_length: Option<Option<u64>>,
    /// Transfer codings, lowercased, in order; `None` when the field is absent.
    transfer_encoding: Option<Vec<String>>,
    connection_close: bool,
    connection_keep_alive: bool,
    idempotency_key: Option<String>,
    expect_continue: bool,
    range: bool,
    etag: Option<String>,
    last_modified: Option<String>,
    content_range: Option<String>,
}

impl Fields {
    fn of(headers: &[httparse::Header<'_>]) -> Fields {
        let mut f = Fields::default();
        for h in headers {
            let value = String::from_utf8_lossy(h.value);
            let value = value.trim_matches([' ', '\t']);
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                for item in value.split(',').map(|s| s.trim_matches([' ', '\t'])) {
                    let n = (!item.is_empty() && item.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| item.parse::<u64>().ok())
                        .flatten();
                    f.content_length = match (f.content_length, n) {
                        (None, n) => Some(n),
                        (Some(Some(a)), Some(b)) if a == b => Some(Some(a)),
                        _ => Some(None),
                    };
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                let codings = f.transfer_encoding.get_or_insert_with(Vec::new);
                for item in value.split(',') {
                    let coding = item.split(';').next().unwrap_or("").trim_matches([' ', '\t']).to_ascii_lowercase();
                    if !coding.is_empty() {
                        codings.push(coding);
                    }
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(|s| s.trim_matches([' ', '\t'])) {
                    f.connection_close |= token.eq_ignore_ascii_case("close");
                    f.connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                }
            } else if name.eq_ignore_ascii_case("idempotency-key") {
                f.idempotency_key.get_or_insert_with(|| value.to_string());
            } else if name.eq_ignore_ascii_case("expect") {
                f.expect_continue |= value.eq_ignore_ascii_case("100-continue");
            } else if name.eq_ignore_ascii_case("range") {
                f.range = true;
            } else if name.eq_ignore_ascii_case("etag") {
                f.etag = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("last-modified") {
                f.last_modified = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("content-range") {
                f.content_range = Some(value.to_string());
            }
        }
        f
    }

    fn final_coding(&self) -> Option<Coding> {
        let codings = self.transfer_encoding.as_ref()?;
        let chunked = codings.iter().filter(|c| *c == "chunked").count();
        Some(match (codings.last().map(String::as_str), chunked) {
            (Some("chunked"), 1) => Coding::ChunkedOnce,
            (_, 0) => Coding::Other,
            _ => Coding::ChunkedMisplaced,
        })
    }

    /// Whether the connection closes after this message (RFC 9112 §9.3).
    fn closes(&self, version: u8) -> bool {
        if version == 0 { !self.connection_keep_alive || self.connection_close } else { self.connection_close }
    }
}

/// Both directions of one connection: requests from the client's byte stream,
/// responses from the server's, paired in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnFramer {
    requests: Framer,
    responses: Framer,
}

impl Default for ConnFramer {
    fn default() -> Self {
        ConnFramer::new()
    }
}

impl ConnFramer {
    /// Framers for a connection followed from its first byte each way. Responses
    /// report body ranges.
    pub fn new() -> ConnFramer {
        ConnFramer { requests: Framer::requests(0), responses: Framer::responses(0).with_body_events() }
    }

    /// Client bytes at `offset` of the client's stream.
    pub fn handle_client(&mut self, offset: u64, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), FrameError> {
        let first = out.len();
        let result = self.requests.feed(offset, bytes, out);
        // Requests framed before an error still wait for their responses.
        for e in &out[first..] {
            if let Event::RequestHead { head, .. } = e {
                self.responses.expect_response(head.index, &head.method);
            }
        }
        result
    }

    /// Server bytes at `offset` of the server's stream.
    pub fn handle_server(&mut self, offset: u64, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), FrameError> {
        self.responses.feed(offset, bytes, out)
    }

    pub fn requests(&self) -> &Framer {
        &self.requests
    }

    pub fn responses(&self) -> &Framer {
        &self.responses
    }

    /// Bytes held in memory.
    pub fn retained_bytes(&self) -> usize {
        self.requests.retained_bytes() + self.responses.retained_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn feed_all(f: &mut ConnFramer, client: &[u8], server: &[u8]) -> (Vec<Event>, Vec<Event>) {
        let (mut c, mut s) = (Vec::new(), Vec::new());
        f.handle_client(0, client, &mut c).unwrap();
        f.handle_server(0, server, &mut s).unwrap();
        (c, s)
    }

    fn request_heads(events: &[Event]) -> Vec<RequestHead> {
        events
            .iter()
            .filter_map(|e| if let Event::RequestHead { head, .. } = e { Some(head.clone()) } else { None })
            .collect()
    }

    fn response_heads(events: &[Event]) -> Vec<ResponseHead> {
        events
            .iter()
            .filter_map(|e| if let Event::ResponseHead { head, .. } = e { Some(head.clone()) } else { None })
            .collect()
    }

    fn completions(events: &[Event]) -> Vec<(u64, u64)> {
        events
            .iter()
            .filter_map(|e| if let Event::Complete { index, end, .. } = e { Some((*index, *end)) } else { None })
            .collect()
    }

    #[test]
    fn pipelined_requests_are_numbered_with_exact_boundaries() {
        let a = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let b = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nIdempotency-Key: k1\r\n\r\nhello";
        let c = b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let stream = [&a[..], b, c].concat();
        let mut f = ConnFramer::new();
        let mut ev = Vec::new();
        f.handle_client(0, &stream, &mut ev).unwrap();
        let heads = request_heads(&ev);
        assert_eq!(heads.len(), 3);
        assert_eq!((heads[0].index, heads[0].start, heads[0].head_end), (0, 0, a.len() as u64));
        assert_eq!(heads[1].method, "POST");
        assert_eq!(heads[1].framing, BodyFraming::Length(5));
        assert_eq!(heads[1].idempotency_key.as_deref(), Some("k1"));
        assert!(heads[2].close && !heads[1].close);
        let ab = (a.len() + b.len()) as u64;
        assert_eq!(completions(&ev), vec![(0, a.len() as u64), (1, ab), (2, stream.len() as u64)]);
        assert_eq!(f.requests().phase(), &Phase::Done);
        // Bytes after a closing request are ignored, as the server ignores them.
        f.handle_client(stream.len() as u64, b"garbage", &mut ev).unwrap();
    }

    #[test]
    fn chunked_request_with_extensions_and_trailers_completes_after_the_trailer_section() {
        let req = b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;name=v\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n";
        let mut f = Framer::requests(100).with_body_events();
        let mut ev = Vec::new();
        f.feed(100, req, &mut ev).unwrap();
        let body: Vec<_> = ev
            .iter()
            .filter_map(|e| if let Event::Body { range, .. } = e { Some(range.clone()) } else { None })
            .collect();
        let head_len = req.iter().position(|&b| b == b'5').unwrap() as u64;
        let data = 100 + head_len + 10;
        assert_eq!(body, vec![data..data + 5]);
        assert_eq!(completions(&ev), vec![(0, 100 + req.len() as u64)]);
    }

    #[test]
    fn responses_pair_with_requests_and_head_204_304_carry_no_body() {
        let client = b"HEAD /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\nGET /d HTTP/1.1\r\n\r\n";
        let server = [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"[..],
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\nETag: \"v1\"\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        ]
        .concat();
        let mut f = ConnFramer::new();
        let (_, ev) = feed_all(&mut f, client, &server);
        let heads = response_heads(&ev);
        assert_eq!(
            heads.iter().map(|h| (h.index, h.status, h.framing)).collect::<Vec<_>>(),
            vec![
                (0, 200, BodyFraming::Empty),
                (1, 204, BodyFraming::Empty),
                (2, 304, BodyFraming::Empty),
                (3, 200, BodyFraming::Length(3))
            ]
        );
        assert_eq!(heads[2].etag.as_deref(), Some("\"v1\""));
        assert_eq!(completions(&ev).last(), Some(&(3, server.len() as u64)));
        assert!(f.responses().awaiting().is_none());
    }

    #[test]
    fn interim_100_continue_precedes_the_final_response_of_the_same_request() {
        let client = b"PUT /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok";
        let server = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        let mut f = ConnFramer::new();
        let (c, s) = feed_all(&mut f, client, server);
        assert!(request_heads(&c)[0].expect_continue);
        let heads = response_heads(&s);
        assert_eq!(heads.len(), 2);
        assert!(heads[0].interim() && heads[0].index == 0);
        assert_eq!((heads[1].index, heads[1].status, heads[1].start), (0, 201, 25));
        assert_eq!(completions(&s), vec![(0, server.len() as u64)]);
    }

    #[test]
    fn chunked_response_cut_mid_chunk_reports_the_exact_position() {
        let mut f = ConnFramer::new();
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut server = head.to_vec();
        server.extend_from_slice(b"10\r\n0123456789abcdef\r\n20\r\n0123");
        feed_all(&mut f, b"GET / HTTP/1.1\r\n\r\n", &server);
        assert_eq!(
            f.responses().phase(),
            &Phase::Body {
                index: 0,
                body: BodyState::Chunked(ChunkPos::Data { remaining: 0x20 - 4 }),
                body_offset: 20,
                close: false
            }
        );
        // The rest of the chunk, its CRLF, part of a size line.
        let mut ev = Vec::new();
        let at = server.len() as u64;
        f.handle_server(at, &[b'x'; 28], &mut ev).unwrap();
        f.handle_server(at + 28, b"\r", &mut ev).unwrap();
        assert!(matches!(
            f.responses().phase(),
            Phase::Body { body: BodyState::Chunked(ChunkPos::DataEnd { cr: true }), .. }
        ));
        f.handle_server(at + 29, b"\n1", &mut ev).unwrap();
        assert!(matches!(
            f.responses().phase(),
            Phase::Body { body: BodyState::Chunked(ChunkPos::SizeLine { line }), .. } if line == b"1"
        ));
        f.handle_server(at + 31, b"\r\nz\r\n0\r\n\r\n", &mut ev).unwrap();
        assert_eq!(completions(&ev), vec![(0, at + 41)]);
    }

    #[test]
    fn a_framer_cut_anywhere_round_trips_through_the_codec_and_continues_identically() {
        let client = b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\nGET /next HTTP/1.1\r\nHost: o\r\n\r\n";
        let server = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nend";
        // The client side cut anywhere (no response yet), then the server side.
        let cuts = (0..=client.len()).map(|c| (c, 0)).chain((0..=server.len()).map(|s| (client.len(), s)));
        for (cut, (c, s)) in cuts.enumerate() {
            let mut f = ConnFramer::new();
            feed_all(&mut f, &client[..c], &server[..s]);
            let mut copy: ConnFramer = crate::codec::decode(&crate::codec::encode(&f).unwrap()).unwrap();
            assert_eq!(copy, f, "cut at {cut}");
            let mut rest = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
            for (f, (ce, se)) in [&mut f, &mut copy].into_iter().zip(&mut rest) {
                f.handle_client(c as u64, &client[c..], ce).unwrap();
                f.handle_server(s as u64, &server[s..], se).unwrap();
            }
            assert_eq!(rest[0], rest[1], "cut at {cut}");
            assert_eq!(copy, f, "cut at {cut}");
            assert_eq!((copy.requests().pos(), copy.responses().pos()), (client.len() as u64, server.len() as u64));
        }
    }

    #[test]
    fn http10_and_close_delimited_responses_end_the_connection() {
        let mut f = ConnFramer::new();
        let (c, s) = feed_all(&mut f, b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\nstream until close");
        assert!(request_heads(&c)[0].close);
        let h = &response_heads(&s)[0];
        assert_eq!(h.framing, BodyFraming::UntilClose);
        assert!(h.close);
        assert!(completions(&s).is_empty());
        assert!(matches!(f.responses().phase(), Phase::Body { body: BodyState::UntilClose, body_offset: 18, .. }));
    }

    #[test]
    fn leading_empty_lines_belong_to_the_next_request() {
        let mut f = Framer::requests(0);
        let mut ev = Vec::new();
        f.feed(0, b"\r\n", &mut ev).unwrap();
        f.feed(2, b"\r\nGET / HTTP/1.1\r\n\r\n", &mut ev).unwrap();
        let h = &request_heads(&ev)[0];
        assert_eq!((h.start, h.head_end), (0, 22));
    }

    #[test]
    fn bytes_already_framed_are_skipped_and_a_hole_is_an_error() {
        let mut f = Framer::requests(0);
        let mut ev = Vec::new();
        f.feed(0, b"GET / HT", &mut ev).unwrap();
        f.feed(4, b"/ HTTP/1.1\r\n\r\n", &mut ev).unwrap();
        assert_eq!(request_heads(&ev)[0].target, "/");
        let err = f.feed(100, b"x", &mut ev).unwrap_err();
        assert_eq!(err, FrameError::OutOfOrder { side: Side::Request, expected: 18, got: 100 });
        assert_eq!(f.feed(18, b"GET", &mut ev), Err(err), "a failed framer stays failed");
    }

    fn request_error(bytes: &[u8]) -> FrameError {
        Framer::requests(0).feed(0, bytes, &mut Vec::new()).unwrap_err()
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        assert!(matches!(request_error(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"), FrameError::MalformedHead { .. }));
        assert!(matches!(request_error(b"\x00\x01 nonsense\r\n\r\n"), FrameError::MalformedHead { .. }));
        assert_eq!(
            request_error(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            FrameError::AmbiguousLength { offset: 0 }
        );
        assert!(matches!(
            request_error(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            FrameError::BadTransferEncoding { .. }
        ));
        assert!(matches!(
            request_error(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"),
            FrameError::BadTransferEncoding { .. }
        ));
        assert!(matches!(
            request_error(b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n"),
            FrameError::BadContentLength { .. }
        ));
        assert!(matches!(
            request_error(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            FrameError::BadContentLength { .. }
        ));
        assert!(matches!(
            request_error(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            FrameError::BadChunk { .. }
        ));
        assert!(matches!(
            request_error(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab"),
            FrameError::BadChunk { .. }
        ));
        let huge = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD_BYTES]].concat();
        assert!(matches!(request_error(&huge), FrameError::HeadTooLarge { .. }));
        // Identical repeated lengths are fine (RFC 9110 §8.6).
        let mut ev = Vec::new();
        let req = b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nok";
        Framer::requests(0).feed(0, req, &mut ev).unwrap();
        assert_eq!(completions(&ev), vec![(0, req.len() as u64)]);
    }

    #[test]
    fn responses_that_cannot_be_followed_are_typed_errors() {
        let mut f = ConnFramer::new();
        let err = f.handle_server(0, b"HTTP/1.1 408 Request Timeout\r\n\r\n", &mut Vec::new()).unwrap_err();
        assert_eq!(err, FrameError::UnsolicitedResponse { offset: 0 });
        let mut f = ConnFramer::new();
        f.handle_client(0, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", &mut Vec::new())
            .unwrap();
        let err = f.handle_server(0, b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &mut Vec::new()).unwrap_err();
        assert_eq!(err, FrameError::ProtocolSwitch { offset: 0, status: 101 });
        let mut f = ConnFramer::new();
        f.handle_client(0, b"CONNECT h:443 HTTP/1.1\r\n\r\n", &mut Vec::new()).unwrap();
        let err = f.handle_server(0, b"HTTP/1.1 200 OK\r\n\r\n", &mut Vec::new()).unwrap_err();
        assert!(matches!(err, FrameError::ProtocolSwitch { status: 200, .. }));
        let mut f = ConnFramer::new();
        f.handle_client(0, b"GET / HTTP/1.1\r\n\r\n", &mut Vec::new()).unwrap();
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\nHTTP/1.1";
        assert!(matches!(f.handle_server(0, resp, &mut Vec::new()), Err(FrameError::DataAfterClose { .. })));
    }

    #[test]
    fn a_malformed_chunk_line_is_reported_at_its_start_however_the_bytes_were_cut() {
        // Found by the http_framer fuzz target: the offset was where the last piece began.
        let head = b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for (body, at) in [(&b"5\r\nhello\r\nz;\r\n"[..], 10), (b"0\r\nno colon\r\n", 3)] {
            let stream = [&head[..], body].concat();
            let expected = head.len() as u64 + at;
            for cut in head.len()..stream.len() {
                let mut f = Framer::requests(0);
                let mut ev = Vec::new();
                let first = f.feed(0, &stream[..cut], &mut ev);
                let err = first.and_then(|()| f.feed(cut as u64, &stream[cut..], &mut ev)).unwrap_err();
                assert!(matches!(err, FrameError::BadChunk { offset, .. } if offset == expected), "cut {cut}: {err:?}");
            }
        }
    }

    /// A message with a random body framing, and its bytes.
    fn message(response: bool, kind: u8, body: &[u8], chunks: &[usize]) -> Vec<u8> {
        let start = if response { "HTTP/1.1 200 OK\r\n".to_string() } else { "POST /x HTTP/1.1\r\nHost: h\r\n".into() };
        match kind % 3 {
            0 => format!("{start}Content-Length: {}\r\n\r\n", body.len())
                .into_bytes()
                .into_iter()
                .chain(body.iter().copied())
                .collect(),
            1 => {
                let mut m = format!("{start}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
                let mut rest = body;
                for &c in chunks.iter().cycle().take(body.len() + 1) {
                    if rest.is_empty() {
                        break;
                    }
                    let n = c.clamp(1, rest.len());
                    m.extend_from_slice(format!("{n:x};e=1\r\n").as_bytes());
                    m.extend_from_slice(&rest[..n]);
                    m.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                m.extend_from_slice(b"0\r\nT: v\r\n\r\n");
                m
            }
            // No body: a response says so, a request just has no length.
            _ if response => format!("{start}Content-Length: 0\r\n\r\n").into_bytes(),
            _ => format!("{start}\r\n").into_bytes(),
        }
    }

    /// Events with adjacent body ranges merged, so that different splits compare equal.
    fn normalise(events: Vec<Event>) -> Vec<Event> {
        let mut out: Vec<Event> = Vec::new();
        for e in events {
            if let (Some(Event::Body { index: i, range: r, .. }), Event::Body { index: j, range: s, .. }) =
                (out.last_mut(), &e)
                && *i == *j
                && r.end == s.start
            {
                r.end = s.end;
                continue;
            }
            out.push(e);
        }
        out
    }

    fn feed_split(framer: &mut Framer, stream: &[u8], cuts: &[usize]) -> Result<Vec<Event>, FrameError> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut ev = Vec::new();
        let mut at = 0;
        for c in cuts.into_iter().chain([stream.len()]) {
            framer.feed(at as u64, &stream[at..c], &mut ev)?;
            at = c;
        }
        Ok(normalise(ev))
    }

    proptest! {
        #[test]
        fn any_split_of_a_valid_stream_frames_identically(
            msgs in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..300), prop::collection::vec(1usize..64, 1..5)), 1..6),
            cuts in prop::collection::vec(any::<usize>(), 0..40),
            response in any::<bool>(),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(|(k, b, c)| message(response, *k, b, c)).collect();
            let make = || {
                let mut f = if response { Framer::responses(0) } else { Framer::requests(0) }.with_body_events();
                for i in 0..msgs.len() as u64 {
                    f.expect_response(i, "GET");
                }
                f
            };
            let whole = feed_split(&mut make(), &stream, &[]).unwrap();
            let mut f = make();
            let split = feed_split(&mut f, &stream, &cuts).unwrap();
            prop_assert_eq!(&whole, &split);
            let ends = completions(&whole);
            prop_assert_eq!(ends.len(), msgs.len());
            prop_assert_eq!(ends.last().unwrap().1, stream.len() as u64);
            prop_assert_eq!(f.pos(), stream.len() as u64);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
            let mut f = ConnFramer::new();
            let _ = feed_split(&mut f.requests.clone(), &bytes, &cuts);
            f.handle_client(0, b"GET / HTTP/1.1\r\n\r\n", &mut Vec::new()).unwrap();
            let _ = f.handle_server(0, &bytes, &mut Vec::new());
        }
    }
}
