//! The resume planner: what the backup does with each connection at takeover
//! (ARCHITECTURE.md, "Finishing an exchange in flight"). Pure: it reads the replica
//! table at time `now` and returns one typed [`Decision`] per connection, plus the
//! TCP restore plan; the takeover driver carries them out and counts them by
//! [`Decision::kind`].
//!
//! Rules it encodes: RFC 9110 §9.2.2 (idempotent methods may be re-sent), §14.2 and
//! §13.1.5 (Range with If-Range, which needs a strong validator, §8.8.1), RFC 9112
//! §7.1 (a chunked body continues from inside a chunk: finish the chunk-size line or
//! the chunk, then any chunks, then the last chunk) and §6.3 (a Content-Length body
//! continues with exactly the bytes still owed).
//!
//! The "exchange in flight" is the oldest exchange whose response is not fully in the
//! reply log. Exchanges before it were written in full (their bytes are in the
//! restored send queue); requests after it (pipelined) have no reply byte and each
//! get their own decision in [`ConnResume::queued`].

use super::http::{BodyState, ChunkPos, Framer, Phase};
use super::table::{Conn, Exchange, ExchangeMeta, ReplicaTable, Unprotection};
use crate::config::{RetryConfig, RetryPolicy};
use crate::protocol::ConnKey;
use std::time::Duration;
use tcp_replay::tracker::PlanError;
use tcp_replay::{Dir, RestorePlan};

/// Why a request is sent to the upstream again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResendReason {
    /// An idempotent method (RFC 9110 §9.2.2): always.
    Idempotent,
    /// Non-idempotent with the client's own Idempotency-Key, under `with-key`.
    ClientKey,
    /// Non-idempotent with a generated key the origin is declared to honour, under `with-key`.
    GeneratedKey,
    /// Non-idempotent, under `always`.
    PolicyAlways,
}

/// Why a non-idempotent request is not sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The policy is `never`.
    PolicyNever,
    /// `with-key`, and the request carried no Idempotency-Key.
    NoKey,
    /// `with-key`, the key was generated, and the origin is not declared to honour generated keys.
    GeneratedKeyNotHonoured,
}

/// Why a partly sent reply cannot be continued: the connection is closed and the
/// client sees a truncated message, never wrong bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TruncateReason {
    /// The reply log ends inside the response head, whose rest is unknown.
    PartialHead,
    /// The reply log ends inside a trailer field.
    PartialTrailer,
    /// The reply log ends inside a chunk-size line that is not a chunk size.
    MalformedChunkLine,
    /// The request was still arriving: it cannot be sent again to fetch the rest.
    RequestIncomplete,
    /// The rest would need the request sent again, which the policy refuses.
    NotResendable(RefuseReason),
    /// The upstream log and the reply disagree on how much body remains.
    LogDisagrees,
    /// The response framer is not inside this response's body.
    Unframed,
}

/// How the body continues after the reply log's last byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continuation {
    /// Content-Length: exactly `remaining` more payload bytes.
    Length { remaining: u64 },
    /// Chunked. Write `prefix` first (it completes the chunk-size line or CRLF in
    /// progress). If `finished`, the message is then complete. Otherwise write
    /// `open_chunk` payload bytes, and CRLF after them if `open_chunk > 0`, then the
    /// rest of the payload in chunks of any size, then `0\r\n\r\n`.
    Chunked { prefix: Vec<u8>, open_chunk: u64, finished: bool },
    /// Delimited by the close: the rest of the payload, then close.
    UntilClose,
}

/// Where a partly sent response continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContinueAt {
    /// Offset in the server's stream of the first byte to write (the end of the reply
    /// log: everything before it is in the restored send queue).
    pub reply_offset: u64,
    /// Status of the response being continued.
    pub status: u16,
    /// Payload bytes already in the reply log, and their crc32: a refetch must skip
    /// exactly these and its skipped prefix must match the crc.
    pub body_offset: u64,
    pub body_crc: u32,
    pub framing: Continuation,
}

/// What to do with one connection's exchange in flight. Every path is its own variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The connection is not protected: it is not restored.
    Unprotected { reason: Unprotection },
    /// The tracker cannot plan a restore (handshake incomplete, closed, bytes missing).
    NotRestorable { error: PlanError },
    /// Nothing in flight: hand the socket to the server for the next request.
    Idle,
    /// The last response was fully written and waits in the restored send queue: nothing to do.
    Written { exchange: u64 },
    /// The request is incomplete: keep reading it from the client and process it
    /// normally. `started_upstream`: the primary had begun it, the origin saw at most
    /// an incomplete request.
    KeepReading { exchange: u64, started_upstream: bool },
    /// The request is complete and never left the primary: process it normally.
    NotStarted { exchange: u64 },
    /// No reply byte sent, the upstream's response is logged in full: replay it.
    ReplayFromLog { exchange: u64 },
    /// No reply byte sent: send the request upstream again, with the logged key.
    Resend { exchange: u64, why: ResendReason, idempotency_key: Option<String> },
    /// No reply byte sent, not re-sendable: close without re-executing.
    Refuse { exchange: u64, why: RefuseReason },
    /// Reply partly sent: the rest of the body is in the upstream log.
    ContinueFromLog { exchange: u64, at: ContinueAt },
    /// Reply partly sent: fetch the rest with `Range: bytes=<body_offset>-` and
    /// `If-Range: <if_range>`; a 200 instead of a 206 falls back to the refetch check.
    ContinueWithRange { exchange: u64, at: ContinueAt, if_range: String },
    /// Reply partly sent: fetch the whole body again, skip `at.body_offset` bytes whose
    /// crc must match `at.body_crc`, else close.
    ContinueWithRefetch { exchange: u64, at: ContinueAt, why: ResendReason },
    /// Reply partly sent and it cannot be continued: close.
    Truncate { exchange: u64, why: TruncateReason },
}

impl Decision {
    /// A stable label per path, for metrics and the request log.
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Unprotected { .. } => "unprotected",
            Decision::NotRestorable { .. } => "not_restorable",
            Decision::Idle => "idle",
            Decision::Written { .. } => "written",
            Decision::KeepReading { .. } => "keep_reading",
            Decision::NotStarted { .. } => "not_started",
            Decision::ReplayFromLog { .. } => "replay_from_log",
            Decision::Resend { .. } => "resend",
            Decision::Refuse { .. } => "refuse",
            Decision::ContinueFromLog { .. } => "continue_from_log",
            Decision::ContinueWithRange { .. } => "continue_with_range",
            Decision::ContinueWithRefetch { .. } => "continue_with_refetch",
            Decision::Truncate { .. } => "truncate",
        }
    }

    /// The exchange the decision is about.
    pub fn exchange(&self) -> Option<u64> {
        match self {
            Decision::Unprotected { .. } | Decision::NotRestorable { .. } | Decision::Idle => None,
            Decision::Written { exchange }
            | Decision::KeepReading { exchange, .. }
            | Decision::NotStarted { exchange }
            | Decision::ReplayFromLog { exchange }
            | Decision::Resend { exchange, .. }
            | Decision::Refuse { exchange, .. }
            | Decision::ContinueFromLog { exchange, .. }
            | Decision::ContinueWithRange { exchange, .. }
            | Decision::ContinueWithRefetch { exchange, .. }
            | Decision::Truncate { exchange, .. } => Some(*exchange),
        }
    }
}

/// A pipelined request behind the exchange in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub exchange: u64,
    pub decision: Decision,
}

/// The takeover plan of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnResume {
    pub conn: ConnKey,
    /// The TCP restore plan, unless the decision is `Unprotected` or `NotRestorable`.
    pub restore: Option<RestorePlan>,
    /// Offset in the client's stream of the restore plan's first receive-queue byte.
    pub recv_start: u64,
    /// Exchanges written in full whose bytes wait in the send queue.
    pub written: Vec<u64>,
    /// The exchange in flight.
    pub decision: Decision,
    /// Pipelined requests after it, in order.
    pub queued: Vec<Queued>,
    /// The restore plan assumes the handshake's last ACK, which was not seen: restore only once the
    /// client confirms it holds an established connection (`RestorePlan::confirm_handshake`).
    pub unconfirmed_handshake: bool,
}

/// Plans every connection of the table at time `now` (the replication stream's clock).
pub fn plan_takeover(table: &ReplicaTable, now: Duration, retry: &RetryConfig) -> Vec<ConnResume> {
    table.conns().map(|c| plan_conn(c, now, retry)).collect()
}

/// Plans one connection; the restore plan holds its queues' bytes.
pub fn plan_conn(conn: &Conn, now: Duration, retry: &RetryConfig) -> ConnResume {
    plan(conn, now, retry, true)
}

/// [`plan_conn`] with the restore plan's queues left in the connection's tracker
/// ([`Tracker::restore_plan_in_place`](tcp_replay::Tracker::restore_plan_in_place)): a takeover writes
/// them from there (`conn.tracked()`'s tracker is their source) instead of copying every connection's
/// bytes in flight first. The table must not change until then.
pub fn plan_conn_in_place(conn: &Conn, now: Duration, retry: &RetryConfig) -> ConnResume {
    plan(conn, now, retry, false)
}

fn plan(conn: &Conn, now: Duration, retry: &RetryConfig, copy: bool) -> ConnResume {
    let mut out = ConnResume {
        conn: conn.key(),
        restore: None,
        recv_start: 0,
        written: Vec::new(),
        decision: Decision::Idle,
        queued: Vec::new(),
        unconfirmed_handshake: false,
    };
    let Some(t) = conn.tracked() else {
        let reason = conn.unprotected().cloned().unwrap_or(Unprotection::MidStream);
        out.decision = Decision::Unprotected { reason };
        return out;
    };
    let restore = if copy { t.tracker().restore_plan(now) } else { t.tracker().restore_plan_in_place(now) };
    match restore {
        Ok(plan) => out.restore = Some(plan),
        // The client's ACK (and any request) waited in the dead primary's gate: the client may be
        // established and about to resend its request. Nothing was exchanged, so the connection is idle.
        Err(error @ PlanError::HandshakeIncomplete(_)) => match t.tracker().unconfirmed_handshake_plan(now) {
            Some(plan) => {
                out.restore = Some(plan);
                out.unconfirmed_handshake = true;
                return out;
            }
            None => {
                out.decision = Decision::NotRestorable { error };
                return out;
            }
        },
        Err(error) => {
            out.decision = Decision::NotRestorable { error };
            return out;
        }
    }
    out.recv_start = t.tracker().stream(Dir::ToServer).start();
    let responses = t.framer().responses();
    let mut in_flight = None;
    for ex in t.exchanges() {
        if ex.reply.end.is_some() {
            out.written.push(ex.index);
        } else if in_flight.is_none() {
            in_flight = Some(decide_in_flight(ex, responses, retry));
        } else {
            out.queued.push(Queued { exchange: ex.index, decision: unanswered(ex, retry) });
        }
    }
    // A request whose head is still arriving has no exchange yet.
    let requests = t.framer().requests();
    if let Phase::Head { buf, .. } = requests.phase()
        && buf.iter().any(|b| !matches!(b, b'\r' | b'\n'))
    {
        let reading = Decision::KeepReading { exchange: requests.next_index(), started_upstream: false };
        match in_flight {
            None => in_flight = Some(reading),
            Some(_) => out.queued.push(Queued { exchange: requests.next_index(), decision: reading }),
        }
    }
    out.decision = in_flight.unwrap_or(match out.written.last() {
        Some(&exchange) => Decision::Written { exchange },
        None => Decision::Idle,
    });
    out
}

/// The oldest exchange whose response is not fully in the reply log.
fn decide_in_flight(ex: &Exchange, responses: &Framer, retry: &RetryConfig) -> Decision {
    if ex.reply.head.is_some() {
        return partly_sent(ex, responses, retry);
    }
    let head_cut = matches!(responses.phase(), Phase::Head { buf, .. } if !buf.is_empty())
        && responses.awaiting().is_some_and(|a| a.index == ex.index);
    if head_cut {
        return Decision::Truncate { exchange: ex.index, why: TruncateReason::PartialHead };
    }
    unanswered(ex, retry)
}

/// An exchange with no byte of its final response in the reply log.
fn unanswered(ex: &Exchange, retry: &RetryConfig) -> Decision {
    let exchange = ex.index;
    if ex.request_end.is_none() {
        return Decision::KeepReading { exchange, started_upstream: ex.meta.is_some() };
    }
    let Some(meta) = &ex.meta else { return Decision::NotStarted { exchange } };
    if ex.upstream.as_ref().is_some_and(|log| log.covers_from(0)) {
        return Decision::ReplayFromLog { exchange };
    }
    match resendable(&ex.request.method, Some(meta), retry) {
        Ok(why) => Decision::Resend { exchange, why, idempotency_key: meta.idempotency_key.clone() },
        Err(why) => Decision::Refuse { exchange, why },
    }
}

/// An exchange whose final response head is in the reply log and whose body is not complete.
fn partly_sent(ex: &Exchange, responses: &Framer, retry: &RetryConfig) -> Decision {
    let exchange = ex.index;
    let truncate = |why| Decision::Truncate { exchange, why };
    let Some(head) = &ex.reply.head else { return truncate(TruncateReason::Unframed) };
    let Phase::Body { index, body, body_offset, .. } = responses.phase() else {
        return truncate(TruncateReason::Unframed);
    };
    if *index != exchange {
        return truncate(TruncateReason::Unframed);
    }
    let framing = match continuation(body) {
        Ok(c) => c,
        Err(why) => return truncate(why),
    };
    let at = ContinueAt {
        reply_offset: responses.pos(),
        status: head.status,
        body_offset: *body_offset,
        body_crc: ex.reply.body_crc,
        framing,
    };
    if let Some(log) = &ex.upstream
        && log.covers_from(at.body_offset)
    {
        let rest = log.logged - at.body_offset;
        let agrees = match &at.framing {
            Continuation::Length { remaining } => *remaining == rest,
            Continuation::Chunked { finished: true, .. } => rest == 0,
            Continuation::Chunked { open_chunk, .. } => *open_chunk <= rest,
            Continuation::UntilClose => true,
        };
        return if agrees {
            Decision::ContinueFromLog { exchange, at }
        } else {
            truncate(TruncateReason::LogDisagrees)
        };
    }
    if ex.request_end.is_none() {
        return truncate(TruncateReason::RequestIncomplete);
    }
    let why = match resendable(&ex.request.method, ex.meta.as_ref(), retry) {
        Ok(why) => why,
        Err(refused) => return truncate(TruncateReason::NotResendable(refused)),
    };
    let validator = head.etag.as_ref().filter(|e| !e.starts_with("W/")).or(head.last_modified.as_ref()).cloned();
    match validator {
        Some(if_range) if ex.request.method == "GET" && head.status == 200 && !ex.request.range => {
            Decision::ContinueWithRange { exchange, at, if_range }
        }
        _ => Decision::ContinueWithRefetch { exchange, at, why },
    }
}

/// Whether the request may be sent to the upstream again (RFC 9110 §9.2.2 and the retry policy).
fn resendable(method: &str, meta: Option<&ExchangeMeta>, retry: &RetryConfig) -> Result<ResendReason, RefuseReason> {
    if matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE") {
        return Ok(ResendReason::Idempotent);
    }
    let key = meta.and_then(|m| m.idempotency_key.as_ref().map(|_| m.key_generated));
    match (retry.non_idempotent, key) {
        (RetryPolicy::Never, _) => Err(RefuseReason::PolicyNever),
        (RetryPolicy::Always, _) => Ok(ResendReason::PolicyAlways),
        (RetryPolicy::WithKey, None) => Err(RefuseReason::NoKey),
        (RetryPolicy::WithKey, Some(false)) => Ok(ResendReason::ClientKey),
        (RetryPolicy::WithKey, Some(true)) if retry.origin_honours_generated_keys => Ok(ResendReason::GeneratedKey),
        (RetryPolicy::WithKey, Some(true)) => Err(RefuseReason::GeneratedKeyNotHonoured),
    }
}

/// How a body in state `body` continues (RFC 9112 §7.1 for chunked).
fn continuation(body: &BodyState) -> Result<Continuation, TruncateReason> {
    let chunked =
        |prefix: &[u8], open_chunk, finished| Continuation::Chunked { prefix: prefix.to_vec(), open_chunk, finished };
    Ok(match body {
        BodyState::Length { remaining } => Continuation::Length { remaining: *remaining },
        BodyState::UntilClose => Continuation::UntilClose,
        BodyState::Chunked(ChunkPos::Data { remaining }) => chunked(b"", *remaining, false),
        BodyState::Chunked(ChunkPos::DataEnd { cr: false }) => chunked(b"\r\n", 0, false),
        BodyState::Chunked(ChunkPos::DataEnd { cr: true }) => chunked(b"\n", 0, false),
        BodyState::Chunked(ChunkPos::SizeLine { line }) if line.is_empty() => chunked(b"", 0, false),
        BodyState::Chunked(ChunkPos::SizeLine { line }) => {
            // The size sent so far is the chunk's size: complete its line and honour it.
            let (text, cr) = match line.strip_suffix(b"\r") {
                Some(text) => (text, true),
                None => (line.as_slice(), false),
            };
            let digits = text.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            let rest = &text[digits..];
            let rest_ok = rest.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
                && (rest.is_empty() || matches!(rest[0], b' ' | b'\t' | b';'));
            if digits == 0 || digits > 16 || !rest_ok {
                return Err(TruncateReason::MalformedChunkLine);
            }
            let size = std::str::from_utf8(&text[..digits])
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or(TruncateReason::MalformedChunkLine)?;
            let end_line: &[u8] = if cr { b"\n" } else { b"\r\n" };
            if size == 0 {
                // The last chunk: an empty trailer section ends the message.
                chunked(&[end_line, b"\r\n"].concat(), 0, true)
            } else {
                chunked(end_line, size, false)
            }
        }
        BodyState::Chunked(ChunkPos::Trailers { line, .. }) => match line.as_slice() {
            b"" => chunked(b"\r\n", 0, true),
            b"\r" => chunked(b"\n", 0, true),
            _ => return Err(TruncateReason::PartialTrailer),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(pos: ChunkPos) -> Result<Continuation, TruncateReason> {
        continuation(&BodyState::Chunked(pos))
    }

    fn cont(prefix: &[u8], open_chunk: u64, finished: bool) -> Result<Continuation, TruncateReason> {
        Ok(Continuation::Chunked { prefix: prefix.to_vec(), open_chunk, finished })
    }

    #[test]
    fn chunked_continuation_finishes_what_was_cut_first() {
        assert_eq!(chunk(ChunkPos::Data { remaining: 7 }), cont(b"", 7, false));
        assert_eq!(chunk(ChunkPos::DataEnd { cr: false }), cont(b"\r\n", 0, false));
        assert_eq!(chunk(ChunkPos::DataEnd { cr: true }), cont(b"\n", 0, false));
        assert_eq!(chunk(ChunkPos::SizeLine { line: vec![] }), cont(b"", 0, false));
        // "1f" of what may have been "1f00": the chunk is 0x1f bytes, honestly.
        assert_eq!(chunk(ChunkPos::SizeLine { line: b"1f".to_vec() }), cont(b"\r\n", 0x1f, false));
        assert_eq!(chunk(ChunkPos::SizeLine { line: b"1F;x=y\r".to_vec() }), cont(b"\n", 0x1f, false));
        assert_eq!(chunk(ChunkPos::SizeLine { line: b"0".to_vec() }), cont(b"\r\n\r\n", 0, true));
        assert_eq!(chunk(ChunkPos::SizeLine { line: b"0\r".to_vec() }), cont(b"\n\r\n", 0, true));
        assert_eq!(chunk(ChunkPos::Trailers { line: vec![], total: 0 }), cont(b"\r\n", 0, true));
        assert_eq!(chunk(ChunkPos::Trailers { line: b"\r".to_vec(), total: 1 }), cont(b"\n", 0, true));
        assert_eq!(
            chunk(ChunkPos::Trailers { line: b"X-A: 1".to_vec(), total: 6 }),
            Err(TruncateReason::PartialTrailer)
        );
        assert_eq!(chunk(ChunkPos::SizeLine { line: b"zz".to_vec() }), Err(TruncateReason::MalformedChunkLine));
        assert_eq!(chunk(ChunkPos::SizeLine { line: b"1x".to_vec() }), Err(TruncateReason::MalformedChunkLine));
        assert_eq!(continuation(&BodyState::Length { remaining: 9 }), Ok(Continuation::Length { remaining: 9 }));
    }

    fn meta(key: Option<&str>, generated: bool) -> ExchangeMeta {
        ExchangeMeta {
            idempotency_key: key.map(String::from),
            key_generated: generated,
            upstream: Some("http://origin".into()),
            request_offset: 0,
        }
    }

    fn retry(policy: RetryPolicy, honours: bool) -> RetryConfig {
        RetryConfig { non_idempotent: policy, origin_honours_generated_keys: honours, ..RetryConfig::default() }
    }

    #[test]
    fn idempotent_methods_are_always_resent_and_others_follow_the_policy() {
        use RefuseReason::*;
        use ResendReason::*;
        use RetryPolicy::*;
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert_eq!(resendable(m, None, &retry(Never, false)), Ok(Idempotent));
        }
        let client = meta(Some("k"), false);
        let generated = meta(Some("g"), true);
        let none = meta(None, false);
        let cases = [
            (Never, false, &client, Err(PolicyNever)),
            (Always, false, &none, Ok(PolicyAlways)),
            (WithKey, false, &client, Ok(ClientKey)),
            (WithKey, false, &none, Err(NoKey)),
            (WithKey, false, &generated, Err(GeneratedKeyNotHonoured)),
            (WithKey, true, &generated, Ok(GeneratedKey)),
        ];
        for (policy, honours, m, want) in cases {
            assert_eq!(resendable("POST", Some(m), &retry(policy, honours)), want, "{policy:?} {honours} {m:?}");
            // The config module's own rule agrees.
            let key = m.idempotency_key.as_ref().map(|_| m.key_generated);
            assert_eq!(retry(policy, honours).may_resend_non_idempotent(key), want.is_ok());
        }
        assert_eq!(resendable("PATCH", None, &retry(WithKey, true)), Err(NoKey));
    }
}
