//! The plan of work on one restored connection (pure): which exchange this node finishes itself,
//! what hyper reads again, and with which overrides.

use super::*;

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
    /// The response written last ends the connection (its head or its request said so): close once the
    /// restored send queue is out. (The primary never got to close: it was frozen or died first.)
    Closes { exchange: u64 },
}

/// A pipelined request at which hyper must stop reading: it is not re-sent and the connection
/// closes before it.
#[derive(Debug, Clone, PartialEq)]
pub struct StopAt {
    pub exchange: u64,
    /// Client-stream offset where its request starts.
    pub offset: u64,
    pub path: &'static str,
    pub why: String,
    /// Its request log record, when the replica knows the exchange.
    pub record: Option<ResumedExchange>,
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
    /// The request log record of the exchange in flight when it is closed ([`InFlight::Close`]).
    pub closed_record: Option<ResumedExchange>,
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
        let peer = SocketAddr::V4(plan.conn.client);
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
            Decision::Written { exchange: n } if t.exchange(*n).is_some_and(|ex| ex.closes()) => {
                InFlight::Closes { exchange: *n }
            }
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
                record: ex.map(|ex| closed_record(peer, ex, q.decision.kind(), why.clone())),
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
        let closed_record = match &in_flight {
            InFlight::Close { exchange: Some(n), why } => {
                t.exchange(*n).map(|ex| closed_record(peer, ex, plan.decision.kind(), why.clone()))
            }
            _ => None,
        };
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
            closed_record,
        })
    }
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

fn continuation(ex: &Exchange, at: &ContinueAt, source: Source) -> Continue {
    Continue {
        exchange: ex.index,
        at: at.clone(),
        source,
        request: ex.request.clone(),
        request_complete: ex.request_end.is_some(),
        key: logged_key(ex),
        upstream: ex.meta.as_ref().and_then(|m| m.upstream.clone()),
        closes: ex.closes() || at.framing == Continuation::UntilClose,
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
