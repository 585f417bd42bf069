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
use tcp_replay::Dir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, error, info, warn};

/// How long a socket closed by the takeover keeps draining the client's bytes after its FIN, so
/// that the close never turns into a RST while replies are still in its send queue.
pub const LINGER: Duration = Duration::from_secs(10);
/// Largest piece written to the client at once.
const WRITE_PIECE: usize = 64 * 1024;

/// A connection the takeover driver restored, with what the planner decided for it.
pub struct Restored {
    /// The restored socket (already out of repair mode, non-blocking). The executor registers it with
    /// the runtime: at a takeover of thousands, one thread registering them all would wait on the
    /// runtime's poller, woken by each new socket (all are writable at once).
    pub stream: std::net::TcpStream,
    pub plan: ConnResume,
    /// What resuming takes from the table's entry, read at takeover.
    pub prepared: Prepared,
    /// Bytes the old primary wrote that never left its kernel, left by the restore for the executor to
    /// write before anything else ([`tcp_replay::repair::restore_nonblocking_leaving_unsent`]).
    pub pending: Option<Pending>,
}

/// The unsent bytes of a restored connection, which its task writes first.
pub struct Pending {
    pub bytes: Vec<u8>,
    pub left: tcp_replay::repair::UnsentLeft,
}

/// What resuming a connection takes from its table entry. Read from the entry at takeover, so the
/// entry itself (the bytes both ways, the upstream logs: megabytes for busy connections) stays in the
/// table uncopied.
#[derive(Debug)]
pub struct Prepared {
    /// Boxed: each restored connection's task holds its `Prepared`, and a takeover spawns thousands of
    /// tasks; unboxed, [`Restored`] would be three times as large (976 bytes).
    pub steps: Result<Box<Steps>, ResumeError>,
    /// When the client's last segment was seen (the stream's clock), if it carried a timestamp.
    pub heard: Option<Duration>,
}

impl Prepared {
    /// Reads what resuming `plan` takes from `conn`, the table entry it was planned from.
    pub fn of(plan: &ConnResume, conn: &Conn) -> Prepared {
        let heard = conn.tracked().and_then(|t| t.tracker().endpoint(Dir::ToServer)?.last_timestamp_at());
        Prepared { steps: Steps::plan(plan, conn).map(Box::new), heard }
    }
}

impl Restored {
    pub fn new(stream: std::net::TcpStream, plan: ConnResume, conn: &Conn) -> Restored {
        let prepared = Prepared::of(&plan, conn);
        Restored { stream, plan, prepared, pending: None }
    }
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

mod client_io;
mod encode;
mod steps;

use client_io::{Capture, ChannelBody, parse_request_head};

pub use client_io::{ClientIo, Graceful};
pub use encode::{ContinuationEncoder, EncodeError, PrefixCheck, PrefixMismatch};
pub use steps::{Continue, InFlight, Source, Steps, StopAt};

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
    let Restored { stream, plan, prepared, pending } = restored;
    let peer = SocketAddr::V4(plan.conn.client);
    let limits = proxy.limits().clone();
    // A restored connection is never refused, but takes its place among `max_connections`.
    let _slot = proxy.take_slot();
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
    let mut stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(e) => {
            error!(error = %e, "cannot register the restored socket with the runtime; closing it");
            outcome.error = Some(format!("registering with the runtime: {e}"));
            outcome.closed = Some("failed");
            return outcome;
        }
    };
    if let Some(Pending { bytes, left }) = pending {
        // The socket's buffer was sized for them: this returns at once unless the client went away.
        let written = tokio::time::timeout(limits.send_timeout, stream.write_all(&bytes)).await;
        if let Err(e) = left.written(&stream) {
            warn!(error = %e, "cannot hand the restored socket's buffer sizes back to the kernel");
        }
        let failed = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("timed out after {:?}", limits.send_timeout)),
        };
        if let Some(e) = failed {
            warn!(error = %e, bytes = bytes.len(), "the bytes the old primary wrote could not be written; closing");
            outcome.error = Some(format!("writing the old primary's unsent bytes: {e}"));
            outcome.closed = Some("failed");
            drop(Graceful::new(stream));
            return outcome;
        }
    }
    let steps = match prepared.steps {
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
    primary::proxy::shape_client_socket(&stream, &limits, peer);
    let io = LoggedIo::with_offset(Graceful::new(stream), log, steps.reply_offset).with_window(limits.reply_window);
    let mut client = ClientIo::new(io, plan.recv_start);
    if plan.decision.exchange().is_some() || !steps.queued.is_empty() {
        info!(recv_start = plan.recv_start, reply_offset = steps.reply_offset,
            first_exchange = steps.resume.first_exchange, queued = ?steps.queued, "resuming connection");
    } else {
        // An idle keep-alive connection: thousands of them at scale.
        debug!(recv_start = plan.recv_start, reply_offset = steps.reply_offset, "resuming idle connection");
    }

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
        InFlight::Closes { exchange } => {
            // What the client sends after a closing response is never read.
            info!(exchange, "the response written ends the connection: closing after it");
            outcome.closed = Some("response_closes");
            client.close(limits.send_timeout).await;
            return outcome;
        }
        InFlight::Close { exchange, why } => {
            info!(exchange = ?exchange, why, "closing without re-executing or inventing a reply");
            if let Some(record) = &steps.closed_record {
                proxy.record_resumed(record);
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
        if let Some(record) = &stop.record {
            proxy.record_resumed(record);
        }
        outcome.closed = Some(stop.path);
    }
    outcome.served = Some(summary);
    outcome
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
