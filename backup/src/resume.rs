//! Finishing each restored connection's exchange in flight (ARCHITECTURE.md "Finishing an exchange in
//! flight"), then handing the socket to the HTTP server for the requests that follow.
//!
//! Read RFC 9112 (§6.3 message length, §7.1 chunked coding: a continuation finishes the chunk-size
//! line or chunk in progress, then sends further chunks and the last chunk; §9.3 persistence and
//! pipelining), RFC 9110 (§9.2.2 idempotent methods; §14.2 `Range`, §13.1.5 `If-Range`, §15.3.7 206
//! and `Content-Range`), and the resume planner (`shared::replica::resume`), whose [`Decision`] per
//! connection this module carries out.
//!
//! **What the restored socket holds.** Its receive queue holds the client's bytes from
//! [`ConnResume::recv_start`] on: the replica trims client bytes only once a request is complete
//! and answered in full, so the queue starts at a request boundary with the first request not yet
//! answered in full (or, rarely, one answered early whose body is still arriving), followed by any
//! pipelined requests. Its send queue holds every reply byte the client has not acknowledged; this
//! node writes on from the end of the reply log ([`Steps::reply_offset`]).
//!
//! **Who reads what.** Requests this node answers itself (a partly sent response it continues, or
//! one answered before the takeover whose body is still in the queue) are read and framed here with
//! the replica's framer, and their bytes consumed; the bytes behind them go to hyper first, then the
//! socket ([`ClientIo`]). Requests answered afresh (re-sent, replayed from the upstream log, not
//! started, still arriving) are left in the queue for hyper, which numbers them on from the
//! replica's exchange numbers ([`ResumeFrom`]).
//!
//! **Closing honestly.** A refused or truncated exchange gets no made-up byte: the socket is shut
//! down (FIN after what the send queue holds) and the client's later bytes are drained for a while
//! before it is closed, because closing a socket with unread bytes makes Linux send a RST that would
//! destroy replies still in its send queue ([`Graceful`]).
//!
//! The pure parts — which exchange is whose ([`Steps::plan`]), the continuation's framing
//! ([`ContinuationEncoder`]) and the refetch's prefix check ([`PrefixCheck`]) — take no I/O and are
//! tested on their own; [`resume_connection`] is the driver.

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, SizeHint};
use primary::proxy::{
    BoxError, ConnectionSummary, ExchangeObserver, ExchangeOutcome, ExchangeOverride, LoggedIo, LoggedKey, Proxy,
    RangeFrom, Refetch, RefetchError, Replay, ReplayError, ReplyLog, ResumeFrom, ResumedExchange, ShutdownSignal,
};
use shared::protocol::ConnKey;
use shared::replica::http::{BodyFraming, Event, FrameError, Framer, Phase, RequestHead};
use shared::replica::resume::{ConnResume, Continuation, ContinueAt, Decision};
use shared::replica::table::{Conn, Exchange};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, info, warn};

/// How long a socket closed by the takeover keeps draining the client's bytes after its FIN, so
/// that the close never turns into a RST while replies are still in its send queue.
pub const LINGER: Duration = Duration::from_secs(10);
/// Largest piece written to the client at once.
const WRITE_PIECE: usize = 64 * 1024;

/// A connection the takeover driver restored, with what the planner decided for it.
pub struct Restored {
    /// The restored socket (already out of repair mode).
    pub stream: TcpStream,
    pub plan: ConnResume,
    /// The table's entry for the connection at takeover.
    pub conn: Conn,
}

/// What resuming one connection did. Every path is counted by [`ResumeOutcome::path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeOutcome {
    pub conn: ConnKey,
    /// `Decision::kind` of the exchange in flight.
    pub path: &'static str,
    /// The exchange in flight.
    pub exchange: Option<u64>,
    /// How a continuation got its bytes: `"log"`, `"range"`, `"range_200_refetch"`, `"refetch"`.
    pub source: Option<&'static str>,
    /// Body bytes this node wrote to finish the exchange in flight.
    pub continued_bytes: u64,
    /// Pipelined exchanges behind it and their paths.
    pub queued: Vec<(u64, &'static str)>,
    /// Why the exchange in flight could not be finished, when it could not.
    pub error: Option<String>,
    /// Why this node closed the connection instead of serving on (`"refuse"`, `"truncate"`,
    /// `"failed"`, `"response_closes"`, `"closed_before_takeover"`, `"not_restorable"`).
    pub closed: Option<&'static str>,
    /// The HTTP server's part: exchanges it served after the resume and how the connection ended.
    pub served: Option<ConnectionSummary>,
}

/// Why an exchange in flight could not be finished. The connection is then closed: the client sees
/// a truncated message (or none), never wrong bytes.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The plan is for a connection that is not restored (unprotected, not restorable).
    #[error("connection not resumable: {0}")]
    NotResumable(&'static str),
    /// The table holds no record of the exchange the plan names.
    #[error("exchange {0} is not in the replica table")]
    UnknownExchange(u64),
    /// The client's bytes in the receive queue do not frame as HTTP/1.1.
    #[error("client bytes do not frame: {0}")]
    Framing(#[from] FrameError),
    /// The client closed before the request being consumed was complete.
    #[error("client closed at offset {0} before the request was complete")]
    ClientClosed(u64),
    /// The client sent nothing for the idle timeout while a request was being consumed.
    #[error("client sent nothing for {0:?}")]
    ClientTimeout(Duration),
    /// Reading from or writing to the client failed.
    #[error("client socket: {0}")]
    Socket(#[from] io::Error),
    /// The client read nothing for the send timeout.
    #[error("client read nothing for {0:?}")]
    SendTimeout(Duration),
    /// The request head read from the receive queue does not parse.
    #[error("request head: {0}")]
    RequestHead(String),
    /// Re-issuing the request got no response head.
    #[error("re-issuing the request: {0}")]
    Refetch(#[from] RefetchError),
    /// The re-issued request was answered with another status than the response being continued.
    #[error("re-issued request answered {got}, the response being continued is {want}")]
    Status { got: u16, want: u16 },
    /// A 206 whose `Content-Range` does not continue where the client stands.
    #[error("206 with Content-Range {got:?}, expected bytes {from}-…")]
    ContentRange { got: Option<String>, from: u64 },
    /// The representation fetched has another length than the response being continued.
    #[error("the body fetched ends at {got}, the response being continued at {want}")]
    Length { got: u64, want: u64 },
    /// The refetched body's first `body_offset` bytes differ from what the client already has.
    #[error(transparent)]
    Prefix(#[from] PrefixMismatch),
    /// The source's bytes do not fit the client's framing.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The fetched body failed part way.
    #[error("fetched body: {0}")]
    Body(String),
    /// The logged upstream response cannot be replayed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

// -------------------------------------------------------------------------------------------------
// The plan of work (pure)
// -------------------------------------------------------------------------------------------------

/// Where a continuation's body bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The upstream log: the payload from `at.body_offset` on.
    Log(Bytes),
    /// The backend, with `Range` and this `If-Range` validator.
    Range(String),
    /// The backend, whole, skipping what the client has.
    Refetch,
}

/// An exchange this node finishes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continue {
    pub exchange: u64,
    pub at: ContinueAt,
    pub source: Source,
    pub request: RequestHead,
    /// The request is complete in the receive queue (else its rest is still arriving).
    pub request_complete: bool,
    pub key: Option<LoggedKey>,
    pub upstream: Option<String>,
    /// The connection ends with this response (its head or the request said so, or its body is
    /// delimited by the close).
    pub closes: bool,
}

/// What this node does with the exchange in flight before hyper takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InFlight {
    /// Nothing: hyper reads it (or the next request) from the receive queue.
    Hyper,
    /// Finish a partly sent response.
    Continue(Box<Continue>),
    /// Close without another byte.
    Close { exchange: Option<u64>, why: String },
}

/// A pipelined request at which hyper must stop reading: it is not re-sent and the connection
/// closes before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopAt {
    pub exchange: u64,
    /// Client-stream offset where its request starts.
    pub offset: u64,
    pub path: &'static str,
    pub why: String,
}

/// What resuming one connection takes, worked out from its plan and table entry.
#[derive(Debug, Clone)]
pub struct Steps {
    /// Server-stream offset of the next byte this node writes (the end of the reply log).
    pub reply_offset: u64,
    /// Exchange number of the request at `recv_start` (or of the next request, if none is there).
    pub base: u64,
    pub in_flight: InFlight,
    /// Requests up to this exchange are consumed here; hyper starts after them.
    pub skip_through: Option<u64>,
    /// What hyper does, from which exchange on.
    pub resume: ResumeFrom,
    pub stop_at: Option<StopAt>,
    /// Pipelined exchanges behind the one in flight, with their paths.
    pub queued: Vec<(u64, &'static str)>,
}

impl Steps {
    /// Works out the steps for `plan` on `conn` (the table entry it was planned from).
    pub fn plan(plan: &ConnResume, conn: &Conn) -> Result<Steps, ResumeError> {
        let t = match (&plan.decision, conn.tracked(), &plan.restore) {
            (Decision::Unprotected { .. }, ..) => return Err(ResumeError::NotResumable("unprotected")),
            (Decision::NotRestorable { .. }, ..) | (_, _, None) => {
                return Err(ResumeError::NotResumable("not restorable"));
            }
            (_, None, _) => return Err(ResumeError::NotResumable("unprotected")),
            (_, Some(t), Some(_)) => t,
        };
        let requests = t.framer().requests();
        let base = t
            .exchanges()
            .iter()
            .find(|ex| ex.request.start >= plan.recv_start)
            .map_or(requests.next_index(), |ex| ex.index);
        let exchange = |index| t.exchange(index).ok_or(ResumeError::UnknownExchange(index));
        let mut overrides = HashMap::new();
        let mut stop_at = None;
        let in_flight = match &plan.decision {
            Decision::Idle | Decision::Written { .. } => InFlight::Hyper,
            Decision::Refuse { exchange, why } => {
                InFlight::Close { exchange: Some(*exchange), why: format!("not re-sent: {why:?}") }
            }
            Decision::Truncate { exchange, why } => {
                InFlight::Close { exchange: Some(*exchange), why: format!("cannot be continued: {why:?}") }
            }
            Decision::ContinueFromLog { exchange: n, at } => {
                let ex = exchange(*n)?;
                let log = ex.upstream.as_ref().ok_or(ResumeError::UnknownExchange(*n))?;
                let payload = Bytes::from(log.payload_from(at.body_offset));
                InFlight::Continue(Box::new(continuation(ex, at, Source::Log(payload))))
            }
            Decision::ContinueWithRange { exchange: n, at, if_range } => {
                InFlight::Continue(Box::new(continuation(exchange(*n)?, at, Source::Range(if_range.clone()))))
            }
            Decision::ContinueWithRefetch { exchange: n, at, .. } => {
                InFlight::Continue(Box::new(continuation(exchange(*n)?, at, Source::Refetch)))
            }
            d => match hyper_override(d, t.exchange(d.exchange().unwrap_or(u64::MAX))) {
                Ok(o) => {
                    if let Some(o) = o {
                        overrides.insert(d.exchange().unwrap_or(base), o);
                    }
                    InFlight::Hyper
                }
                Err(e) => InFlight::Close { exchange: d.exchange(), why: e.to_string() },
            },
        };
        let mut queued = Vec::new();
        for q in &plan.queued {
            queued.push((q.exchange, q.decision.kind()));
            if stop_at.is_some() {
                continue;
            }
            let ex = t.exchange(q.exchange);
            let stop = |why: String| StopAt {
                exchange: q.exchange,
                offset: ex.map_or(requests.pos(), |ex| ex.request.start),
                path: q.decision.kind(),
                why,
            };
            match &q.decision {
                Decision::Refuse { why, .. } => stop_at = Some(stop(format!("not re-sent: {why:?}"))),
                d => match hyper_override(d, ex) {
                    Ok(Some(o)) => {
                        overrides.insert(q.exchange, o);
                    }
                    Ok(None) => {}
                    Err(e) => stop_at = Some(stop(e.to_string())),
                },
            }
        }
        let owned = match &in_flight {
            InFlight::Continue(c) => Some(c.exchange),
            _ => None,
        };
        let skip_through = plan.written.last().copied().max(owned).filter(|&n| n >= base);
        let first_exchange = skip_through.map_or(base, |n| n + 1);
        Ok(Steps {
            reply_offset: t.framer().responses().pos(),
            base,
            in_flight,
            skip_through,
            resume: ResumeFrom { first_exchange, exchanges: overrides },
            stop_at,
            queued,
        })
    }
}

fn continuation(ex: &Exchange, at: &ContinueAt, source: Source) -> Continue {
    let head_closes = ex.reply.head.as_ref().is_some_and(|h| h.close);
    Continue {
        exchange: ex.index,
        at: at.clone(),
        source,
        request: ex.request.clone(),
        request_complete: ex.request_end.is_some(),
        key: logged_key(ex),
        upstream: ex.meta.as_ref().and_then(|m| m.upstream.clone()),
        closes: head_closes || ex.request.close || at.framing == Continuation::UntilClose,
    }
}

fn logged_key(ex: &Exchange) -> Option<LoggedKey> {
    let meta = ex.meta.as_ref()?;
    Some(LoggedKey { key: meta.idempotency_key.clone()?, generated: meta.key_generated })
}

/// How hyper resumes an exchange it reads again (`None`: normally, nothing to note).
fn hyper_override(d: &Decision, ex: Option<&Exchange>) -> Result<Option<ExchangeOverride>, ResumeError> {
    let path = d.kind();
    let plain = |key| Ok(Some(ExchangeOverride { path, idempotency_key: key, replay: None }));
    match d {
        Decision::Idle | Decision::Written { .. } => Ok(None),
        Decision::NotStarted { .. } | Decision::KeepReading { started_upstream: false, .. } => plain(None),
        // The origin saw at most part of it: it is sent again, whole, with the key it had.
        Decision::KeepReading { started_upstream: true, .. } => plain(ex.and_then(logged_key)),
        Decision::Resend { idempotency_key, .. } => {
            let generated = ex.and_then(|e| e.meta.as_ref()).is_some_and(|m| m.key_generated);
            plain(idempotency_key.clone().map(|key| LoggedKey { key, generated }))
        }
        Decision::ReplayFromLog { exchange } => {
            let ex = ex.ok_or(ResumeError::UnknownExchange(*exchange))?;
            let log = ex.upstream.as_ref().ok_or(ResumeError::UnknownExchange(*exchange))?;
            let upstream = ex.meta.as_ref().and_then(|m| m.upstream.clone());
            let replay = Replay::from_logged(&log.head_raw, Bytes::from(log.payload_from(0)), upstream)?;
            Ok(Some(ExchangeOverride { path, idempotency_key: logged_key(ex), replay: Some(replay) }))
        }
        // Not planned for a request hyper reads; noted so the request log shows it.
        _ => plain(None),
    }
}

// -------------------------------------------------------------------------------------------------
// The continuation's framing (pure)
// -------------------------------------------------------------------------------------------------

/// Why a continuation's source does not fit the client's framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The source has more payload than the client's framing leaves room for.
    #[error("the source has more body than the {framing} framing allows")]
    TooLong { framing: &'static str },
    /// The source ended before the client's framing was satisfied.
    #[error("the source ended {missing} bytes short")]
    Short { missing: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum EncodeState {
    /// Content-Length: `total` payload bytes to write, `taken` so far; the last byte waits for
    /// the source's end, so a longer source never completes the client's message.
    Length {
        total: u64,
        taken: u64,
        held: Option<u8>,
    },
    /// Chunked: `open` bytes of the chunk in progress still owed; `finished`: the message is
    /// complete once the prefix is out.
    Chunked {
        open: u64,
        finished: bool,
    },
    UntilClose,
}

/// Writes a body's rest in the framing the client is in the middle of (RFC 9112 §6.3, §7.1):
/// what the source hands over with [`push`](Self::push), then [`finish`](Self::finish) at its end.
/// Nothing is emitted before the first payload byte or the end, so a check that fails before
/// (the refetch prefix) leaves the client with nothing new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinuationEncoder {
    prefix: Option<Vec<u8>>,
    state: EncodeState,
}

impl ContinuationEncoder {
    pub fn new(framing: &Continuation) -> ContinuationEncoder {
        let (prefix, state) = match framing {
            Continuation::Length { remaining } => {
                (None, EncodeState::Length { total: *remaining, taken: 0, held: None })
            }
            Continuation::Chunked { prefix, open_chunk, finished } => {
                (Some(prefix.clone()), EncodeState::Chunked { open: *open_chunk, finished: *finished })
            }
            Continuation::UntilClose => (None, EncodeState::UntilClose),
        };
        ContinuationEncoder { prefix: prefix.filter(|p| !p.is_empty()), state }
    }

    /// Appends the framed form of `data`, the source's next payload bytes, to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.state {
            EncodeState::Length { total, taken, held } => {
                if *taken + data.len() as u64 > *total {
                    return Err(EncodeError::TooLong { framing: "Content-Length" });
                }
                *taken += data.len() as u64;
                if *taken == *total {
                    let (last, rest) = data.split_last().expect("data is not empty");
                    *held = Some(*last);
                    data = rest;
                }
                out.extend_from_slice(data);
            }
            EncodeState::Chunked { finished: true, .. } => {
                return Err(EncodeError::TooLong { framing: "chunked (last chunk sent)" });
            }
            EncodeState::Chunked { open, .. } => {
                if let Some(p) = self.prefix.take() {
                    out.extend_from_slice(&p);
                }
                if *open > 0 {
                    let n = (*open).min(data.len() as u64) as usize;
                    out.extend_from_slice(&data[..n]);
                    *open -= n as u64;
                    if *open == 0 {
                        out.extend_from_slice(b"\r\n");
                    }
                    data = &data[n..];
                }
                if !data.is_empty() {
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(data);
                    out.extend_from_slice(b"\r\n");
                }
            }
            EncodeState::UntilClose => out.extend_from_slice(data),
        }
        Ok(())
    }

    /// The source ended: appends what completes the message to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match &mut self.state {
            EncodeState::Length { total, taken, held } => {
                if taken < total {
                    return Err(EncodeError::Short { missing: *total - *taken });
                }
                out.extend(held.take());
            }
            EncodeState::Chunked { open, finished } => {
                if *open > 0 {
                    return Err(EncodeError::Short { missing: *open });
                }
                if let Some(p) = self.prefix.take() {
                    out.extend_from_slice(&p);
                }
                if !*finished {
                    out.extend_from_slice(b"0\r\n\r\n");
                    *finished = true;
                }
            }
            EncodeState::UntilClose => {}
        }
        Ok(())
    }

    /// Payload bytes the client's framing still requires, when it says.
    pub fn remaining(&self) -> Option<u64> {
        match &self.state {
            EncodeState::Length { total, taken, .. } => Some(total - taken),
            _ => None,
        }
    }
}

/// The refetched body's first `skip` bytes differ from the ones the client already has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the first {skip} body bytes fetched have crc32 {got:#010x}, the client has {want:#010x}")]
pub struct PrefixMismatch {
    pub skip: u64,
    pub want: u32,
    pub got: u32,
}

/// Skips a refetched body's first `skip` bytes, checking their crc32 against what the client got.
#[derive(Debug, Clone)]
pub struct PrefixCheck {
    skip: u64,
    seen: u64,
    hasher: crc32fast::Hasher,
    want: u32,
}

impl PrefixCheck {
    pub fn new(skip: u64, want: u32) -> PrefixCheck {
        PrefixCheck { skip, seen: 0, hasher: crc32fast::Hasher::new(), want }
    }

    /// Takes the source's next bytes; returns those after the prefix (once it has checked out).
    pub fn feed<'a>(&mut self, data: &'a [u8]) -> Result<&'a [u8], PrefixMismatch> {
        if self.seen >= self.skip {
            return Ok(data);
        }
        let n = (self.skip - self.seen).min(data.len() as u64) as usize;
        self.hasher.update(&data[..n]);
        self.seen += n as u64;
        if self.seen == self.skip {
            let got = self.hasher.clone().finalize();
            if got != self.want {
                return Err(PrefixMismatch { skip: self.skip, want: self.want, got });
            }
        }
        Ok(&data[n..])
    }

    /// Whether the whole prefix was seen (and matched).
    pub fn passed(&self) -> bool {
        self.seen >= self.skip
    }
}

// -------------------------------------------------------------------------------------------------
// Sockets
// -------------------------------------------------------------------------------------------------

/// A restored socket that closes gracefully: when dropped, a task shuts it down (FIN after the send
/// queue) and drains the client's bytes until the client closes or [`LINGER`] passes.
pub struct Graceful {
    stream: Option<TcpStream>,
}

impl Graceful {
    pub fn new(stream: TcpStream) -> Graceful {
        Graceful { stream: Some(stream) }
    }

    fn get(&mut self) -> &mut TcpStream {
        self.stream.as_mut().expect("the stream is only taken on drop")
    }
}

impl Drop for Graceful {
    fn drop(&mut self) {
        let (Some(mut stream), Ok(rt)) = (self.stream.take(), tokio::runtime::Handle::try_current()) else { return };
        rt.spawn(async move {
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 16 * 1024];
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

impl AsyncRead for Graceful {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Graceful {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().get()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().get()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().get()).poll_shutdown(cx)
    }
}

/// What to keep of the request being consumed: its head (to re-issue it) and its body.
struct Capture {
    exchange: u64,
    head: Option<oneshot::Sender<Vec<u8>>>,
    body: Option<mpsc::Sender<Result<Bytes, BoxError>>>,
}

/// The client side of a restored connection: client bytes this node read ahead go to hyper first,
/// then the socket's; reads can be made to end at a client-stream offset (a request that must not
/// be read). Writes go to the connection's [`LoggedIo`].
pub struct ClientIo<T> {
    io: T,
    /// Client bytes read but not consumed, from stream offset `pos`.
    buf: BytesMut,
    pos: u64,
    /// Reads end (EOF) at this client-stream offset.
    limit: Option<u64>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> ClientIo<T> {
    /// `io` positioned at client-stream offset `pos` (the restored receive queue's start).
    pub fn new(io: T, pos: u64) -> ClientIo<T> {
        ClientIo { io, buf: BytesMut::new(), pos, limit: None }
    }

    /// Client-stream offset of the next byte not consumed.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Reads more client bytes into the buffer.
    async fn fill(&mut self, idle: Duration) -> Result<(), ResumeError> {
        let end = self.pos + self.buf.len() as u64;
        match tokio::time::timeout(idle, self.io.read_buf(&mut self.buf)).await {
            Err(_) => Err(ResumeError::ClientTimeout(idle)),
            Ok(Ok(0)) => Err(ResumeError::ClientClosed(end)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Consumes the client's requests from the current offset (a request boundary, numbered `base`)
    /// through exchange `through`, framing them with the replica's framer. `capture` receives one
    /// request's head and body on the way.
    async fn consume_through(
        &mut self,
        base: u64,
        through: u64,
        mut capture: Option<Capture>,
        idle: Duration,
    ) -> Result<(), ResumeError> {
        if through < base {
            return Ok(());
        }
        let mut framer = Framer::requests(self.pos).with_body_events();
        let mut events = Vec::new();
        loop {
            if self.buf.is_empty() {
                self.fill(idle).await?;
            }
            let chunk = self.buf.split().freeze();
            let at = self.pos;
            events.clear();
            framer.feed(at, &chunk, &mut events)?;
            let mut end = None;
            for e in events.drain(..) {
                match e {
                    Event::RequestHead { head, raw } => {
                        if let Some(c) = capture.as_mut().filter(|c| c.exchange == base + head.index)
                            && let Some(tx) = c.head.take()
                        {
                            let _ = tx.send(raw);
                        }
                    }
                    Event::Body { index, range, .. } => {
                        if let Some(c) = capture.as_mut().filter(|c| c.exchange == base + index)
                            && let Some(tx) = &c.body
                            && tx
                                .send(Ok(chunk.slice((range.start - at) as usize..(range.end - at) as usize)))
                                .await
                                .is_err()
                        {
                            // The re-issued request stopped reading; the rest is only consumed.
                            c.body = None;
                        }
                    }
                    Event::Complete { index, end: e, .. } if base + index == through => {
                        end = Some(e);
                        break;
                    }
                    _ => {}
                }
            }
            match end {
                Some(e) => {
                    self.buf = BytesMut::from(&chunk[(e - at) as usize..]);
                    self.pos = e;
                    return Ok(());
                }
                None => self.pos = at + chunk.len() as u64,
            }
            if framer.phase() == &Phase::Done {
                // A closing request before `through`: nothing after it is ever read.
                return Err(ResumeError::ClientClosed(self.pos));
            }
        }
    }

    /// Writes `bytes` to the client, failing if it makes no progress for `timeout`.
    async fn send(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ResumeError> {
        for piece in bytes.chunks(WRITE_PIECE) {
            match tokio::time::timeout(timeout, self.io.write_all(piece)).await {
                Err(_) => return Err(ResumeError::SendTimeout(timeout)),
                Ok(r) => r?,
            }
        }
        Ok(())
    }

    async fn flush(&mut self, timeout: Duration) -> Result<(), ResumeError> {
        match tokio::time::timeout(timeout, self.io.flush()).await {
            Err(_) => Err(ResumeError::SendTimeout(timeout)),
            Ok(r) => Ok(r?),
        }
    }

    /// Closes the connection honestly: what was written is flushed, then FIN; the socket drains
    /// the client's bytes for a while after (see [`Graceful`]).
    async fn close(mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.io.shutdown()).await;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let max = this.limit.map_or(usize::MAX, |l| l.saturating_sub(this.pos).min(usize::MAX as u64) as usize);
        if max == 0 || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.buf.is_empty() {
            let n = this.buf.len().min(buf.remaining()).min(max);
            buf.put_slice(&this.buf[..n]);
            this.buf.advance(n);
            this.pos += n as u64;
            return Poll::Ready(Ok(()));
        }
        if max >= buf.remaining() {
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.io).poll_read(cx, buf);
            this.pos += (buf.filled().len() - before) as u64;
            return polled;
        }
        // Only up to the limit: read into a bounded buffer.
        let mut scratch = vec![0u8; max.min(16 * 1024)];
        let mut small = ReadBuf::new(&mut scratch);
        let polled = Pin::new(&mut this.io).poll_read(cx, &mut small);
        let n = small.filled().len();
        buf.put_slice(small.filled());
        this.pos += n as u64;
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body read from the restored receive queue as the consumer frames it.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    /// Bytes still expected, for a Content-Length body.
    remaining: Option<u64>,
    done: bool,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(r) = &mut this.remaining {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.done = true;
                match this.remaining {
                    Some(r) if r > 0 => Poll::Ready(Some(Err("client request body ended short".into()))),
                    _ => Poll::Ready(None),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(r) => SizeHint::with_exact(r),
            None => SizeHint::default(),
        }
    }
}

/// The request head the client sent, as `http` parts.
fn parse_request_head(raw: &[u8]) -> Result<http::request::Parts, ResumeError> {
    let bad = |e: &dyn std::fmt::Display| ResumeError::RequestHead(e.to_string());
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad(&"incomplete")),
        Err(e) => return Err(bad(&e)),
    }
    let mut b = http::Request::builder()
        .method(req.method.unwrap_or("GET"))
        .uri(req.path.unwrap_or("/"))
        .version(if req.version == Some(0) { http::Version::HTTP_10 } else { http::Version::HTTP_11 });
    for f in req.headers.iter() {
        b = b.header(f.name, f.value);
    }
    let (parts, ()) = b.body(()).map_err(|e| bad(&e))?.into_parts();
    Ok(parts)
}

// -------------------------------------------------------------------------------------------------
// The driver
// -------------------------------------------------------------------------------------------------

/// Carries out `restored.plan` on the socket, then serves the connection with `proxy` until it
/// ends. `log` and `observer` are what the connection hooks chose for this connection; replies
/// written here go through the same [`LoggedIo`] (at the reply log's end offset) that the server
/// then keeps using.
pub async fn resume_connection<L: ReplyLog + Unpin>(
    proxy: &Proxy,
    restored: Restored,
    log: L,
    observer: Arc<dyn ExchangeObserver>,
    shutdown: ShutdownSignal,
) -> ResumeOutcome {
    let key = restored.plan.conn;
    let path = restored.plan.decision.kind();
    let exchange = restored.plan.decision.exchange();
    let span = tracing::info_span!("resume", conn = %key.client, path, exchange = ?exchange);
    resume(proxy, restored, log, observer, shutdown).instrument(span).await
}

async fn resume<L: ReplyLog + Unpin>(
    proxy: &Proxy,
    restored: Restored,
    log: L,
    observer: Arc<dyn ExchangeObserver>,
    shutdown: ShutdownSignal,
) -> ResumeOutcome {
    let Restored { stream, plan, conn } = restored;
    let peer = SocketAddr::V4(plan.conn.client);
    let limits = proxy.limits().clone();
    let mut outcome = ResumeOutcome {
        conn: plan.conn,
        path: plan.decision.kind(),
        exchange: plan.decision.exchange(),
        source: None,
        continued_bytes: 0,
        queued: Vec::new(),
        error: None,
        closed: None,
        served: None,
    };
    let steps = match Steps::plan(&plan, &conn) {
        Ok(steps) => steps,
        Err(e) => {
            warn!(error = %e, "connection cannot be resumed; closing");
            outcome.error = Some(e.to_string());
            outcome.closed = Some("not_restorable");
            drop(Graceful::new(stream));
            return outcome;
        }
    };
    outcome.queued = steps.queued.clone();
    let io = LoggedIo::with_offset(Graceful::new(stream), log, steps.reply_offset).with_window(limits.reply_window);
    let mut client = ClientIo::new(io, plan.recv_start);
    info!(recv_start = plan.recv_start, reply_offset = steps.reply_offset, first_exchange = steps.resume.first_exchange,
        queued = ?steps.queued, "resuming connection");

    if plan.restore.as_ref().is_some_and(|r| r.fin_sent) {
        // The primary had closed its side: nothing more is written, and nothing read is answered.
        info!("the primary had already closed this connection; draining it");
        outcome.closed = Some("closed_before_takeover");
        client.close(limits.send_timeout).await;
        return outcome;
    }

    let mut consumed = false;
    match &steps.in_flight {
        InFlight::Hyper => {}
        InFlight::Close { exchange, why } => {
            info!(exchange = ?exchange, why, "closing without re-executing or inventing a reply");
            if let Some(n) = *exchange
                && let Some(ex) = conn.tracked().and_then(|t| t.exchange(n))
            {
                proxy.record_resumed(&closed_record(peer, ex, outcome.path, why.clone()));
            }
            outcome.error = Some(why.clone());
            outcome.closed = Some(outcome.path);
            client.close(limits.send_timeout).await;
            return outcome;
        }
        InFlight::Continue(c) => {
            let started = Instant::now();
            let mut written = 0;
            let result = continue_response(proxy, &mut client, &steps, c, peer, &mut written, &limits).await;
            outcome.continued_bytes = written;
            let complete = result.is_ok();
            let (source, error) = match result {
                Ok((source, read)) => {
                    consumed = read;
                    (Some(source), None)
                }
                Err(e) => (None, Some(e.to_string())),
            };
            outcome.source = source;
            outcome.error = error.clone();
            proxy.record_resumed(&ResumedExchange {
                peer,
                exchange: c.exchange,
                method: c.request.method.clone(),
                target: c.request.target.clone(),
                status: Some(c.at.status),
                sent: true,
                bytes_in: match c.request.framing {
                    BodyFraming::Length(n) => n,
                    _ => 0,
                },
                bytes_out: written,
                complete,
                duration: started.elapsed(),
                upstream: c.upstream.clone(),
                idempotency_key: c.key.as_ref().map(|k| k.key.clone()),
                key_generated: c.key.as_ref().is_some_and(|k| k.generated),
                error: error.clone(),
                resume: outcome.path,
            });
            observer.on_exchange_end(&ExchangeOutcome {
                exchange: c.exchange,
                status: Some(c.at.status),
                bytes_in: 0,
                bytes_out: written,
                complete,
            });
            match &error {
                Some(e) => {
                    warn!(exchange = c.exchange, error = %e, written, "continuation failed; closing (the client sees a truncated message)");
                    outcome.closed = Some("failed");
                    client.close(limits.send_timeout).await;
                    return outcome;
                }
                None => {
                    info!(exchange = c.exchange, source = ?outcome.source, written, "response continued to its end")
                }
            }
            if c.closes {
                // What the client sends after a closing response is never read.
                outcome.closed = Some("response_closes");
                client.close(limits.send_timeout).await;
                return outcome;
            }
        }
    }

    if let Some(through) = steps.skip_through.filter(|_| !consumed)
        && let Err(e) = client.consume_through(steps.base, through, None, limits.idle_timeout).await
    {
        warn!(error = %e, through, "answered requests could not be consumed; closing");
        outcome.error = Some(e.to_string());
        outcome.closed = Some("failed");
        client.close(limits.send_timeout).await;
        return outcome;
    }
    client.limit = steps.stop_at.as_ref().map(|s| s.offset);
    let summary = proxy.serve_connection_from(client, peer, observer, shutdown, steps.resume.clone()).await;
    info!(exchanges = summary.exchanges, end = ?summary.end, "resumed connection served to its end");
    if let Some(stop) = &steps.stop_at {
        info!(
            exchange = stop.exchange,
            path = stop.path,
            why = stop.why,
            "pipelined request not re-sent; connection closed before it"
        );
        if let Some(ex) = conn.tracked().and_then(|t| t.exchange(stop.exchange)) {
            proxy.record_resumed(&closed_record(peer, ex, stop.path, stop.why.clone()));
        }
        outcome.closed = Some(stop.path);
    }
    outcome.served = Some(summary);
    outcome
}

/// The request log record of an exchange closed without a reply byte from this node.
fn closed_record(peer: SocketAddr, ex: &Exchange, path: &'static str, why: String) -> ResumedExchange {
    let key = logged_key(ex);
    ResumedExchange {
        peer,
        exchange: ex.index,
        method: ex.request.method.clone(),
        target: ex.request.target.clone(),
        status: ex.reply.head.as_ref().map(|h| h.status),
        sent: ex.reply.head.is_some(),
        bytes_in: 0,
        bytes_out: 0,
        complete: false,
        duration: Duration::ZERO,
        upstream: ex.meta.as_ref().and_then(|m| m.upstream.clone()),
        idempotency_key: key.as_ref().map(|k| k.key.clone()),
        key_generated: key.is_some_and(|k| k.generated),
        error: Some(why),
        resume: path,
    }
}

/// Finishes a partly sent response. Returns where the bytes came from, and whether its request
/// (and answered ones before it) were consumed from the receive queue on the way (a re-issued
/// request is read from there; a continuation from the log does not wait for it).
async fn continue_response<T: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Proxy,
    client: &mut ClientIo<T>,
    steps: &Steps,
    c: &Continue,
    peer: SocketAddr,
    written: &mut u64,
    limits: &primary::proxy::Limits,
) -> Result<(&'static str, bool), ResumeError> {
    let mut enc = ContinuationEncoder::new(&c.at.framing);
    let through = steps.skip_through.unwrap_or(c.exchange);
    let range = match &c.source {
        Source::Log(payload) => {
            // Without reading the request first: its rest may still be on its way, and a client
            // may wait for the response before sending it.
            let mut out = Vec::with_capacity(WRITE_PIECE + 64);
            for piece in payload.chunks(WRITE_PIECE) {
                enc.push(piece, &mut out)?;
                client.send(&out, limits.send_timeout).await?;
                *written += piece.len() as u64;
                out.clear();
            }
            enc.finish(&mut out)?;
            client.send(&out, limits.send_timeout).await?;
            client.flush(limits.send_timeout).await?;
            return Ok(("log", false));
        }
        Source::Range(if_range) => Some(RangeFrom { from: c.at.body_offset, if_range: if_range.clone() }),
        Source::Refetch => None,
    };

    // The request is read again from the receive queue while the backend is asked.
    let (head_tx, head_rx) = oneshot::channel();
    let (body_tx, body_rx) = mpsc::channel(8);
    let capture = Capture { exchange: c.exchange, head: Some(head_tx), body: Some(body_tx) };
    let consume = client.consume_through(steps.base, through, Some(capture), limits.idle_timeout);
    let fetch = async {
        let raw = head_rx.await.map_err(|_| ResumeError::RequestHead("the request head was not read".into()))?;
        let head = parse_request_head(&raw)?;
        let body: BoxBody<Bytes, BoxError> = match c.request.framing {
            BodyFraming::Empty => Empty::new().map_err(|never| match never {}).boxed(),
            BodyFraming::Length(n) => ChannelBody { rx: body_rx, remaining: Some(n), done: false }.boxed(),
            _ => ChannelBody { rx: body_rx, remaining: None, done: false }.boxed(),
        };
        let r =
            Refetch { peer, exchange: c.exchange, head, body, idempotency_key: c.key.clone(), range: range.clone() };
        Ok::<_, ResumeError>(proxy.refetch(r).await?)
    };
    let (consumed, fetched) = tokio::join!(consume, fetch);
    consumed?;
    let fetched = fetched?;
    let status = fetched.response.status();
    let content_range =
        fetched.response.headers().get(http::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let length = fetched.response.body().size_hint().exact();
    let want_end = enc.remaining().map(|r| c.at.body_offset + r);
    let (mut check, source) = match (&range, status) {
        (Some(_), StatusCode::PARTIAL_CONTENT) => {
            let (_, last, _) = content_range
                .as_deref()
                .and_then(parse_content_range)
                .filter(|(first, ..)| *first == c.at.body_offset)
                .ok_or(ResumeError::ContentRange { got: content_range.clone(), from: c.at.body_offset })?;
            if let Some(want) = want_end
                && last + 1 != want
            {
                return Err(ResumeError::Length { got: last + 1, want });
            }
            (None, "range")
        }
        (Some(_), StatusCode::OK) => {
            info!(
                exchange = c.exchange,
                "If-Range did not match (200): the body is skipped up to the client's offset and checked"
            );
            (Some(PrefixCheck::new(c.at.body_offset, c.at.body_crc)), "range_200_refetch")
        }
        (None, s) if s.as_u16() == c.at.status => (Some(PrefixCheck::new(c.at.body_offset, c.at.body_crc)), "refetch"),
        (_, s) => return Err(ResumeError::Status { got: s.as_u16(), want: c.at.status }),
    };
    if check.is_some()
        && let (Some(got), Some(want)) = (length, want_end)
        && got != want
    {
        return Err(ResumeError::Length { got, want });
    }
    let mut body = fetched.response.into_body();
    let mut out = Vec::with_capacity(WRITE_PIECE + 64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ResumeError::Body(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        let data = match &mut check {
            Some(check) => check.feed(&data)?,
            None => &data[..],
        };
        enc.push(data, &mut out)?;
        client.send(&out, limits.send_timeout).await?;
        *written += data.len() as u64;
        out.clear();
    }
    if let Some(check) = &check
        && !check.passed()
    {
        return Err(EncodeError::Short { missing: c.at.body_offset }.into());
    }
    enc.finish(&mut out)?;
    client.send(&out, limits.send_timeout).await?;
    client.flush(limits.send_timeout).await?;
    Ok((source, true))
}

/// `bytes first-last/complete` (RFC 9110 §14.4): first, last and the complete length if known.
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, complete) = rest.split_once('/')?;
    let (first, last) = range.trim().split_once('-')?;
    let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    let complete = match complete.trim() {
        "*" => None,
        n => Some(n.parse().ok()?),
    };
    (first <= last).then_some((first, last, complete))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses_and_rejects_garbage() {
        assert_eq!(parse_content_range("bytes 100-999/1000"), Some((100, 999, Some(1000))));
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("bytes 9-1/10"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
