//! Request and response bodies as they pass through the proxy, and the per-exchange record.
//!
//! Bodies are streamed frame by frame with hyper's own back-pressure: the proxy holds at most
//! a frame or two of any body, never a whole one. The response body owns the [`Exchange`]
//! record; when hyper drops the body (sent, or abandoned), the exchange ends: the observer
//! hears of it, the request log gets its line, and the connection counts as idle again.

use super::Limits;
use super::hooks::{ExchangeInfo, ExchangeOutcome};
use super::pace::BodyPace;
use super::request_log::RequestLogEntry;
use super::server::ConnShared;
use super::static_files::StaticBody;
use bytes::Bytes;
use http::{Method, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the request body reader shares with the exchange and the upstream timeout.
#[derive(Debug)]
pub(crate) struct RequestProgress {
    started: Instant,
    bytes_in: AtomicU64,
    /// Nanoseconds after `started` of the last request body frame read from the client.
    last_progress_ns: AtomicU64,
    /// Set when reading the client's body failed (the client broke off its upload).
    client_error: Mutex<Option<String>>,
    /// The body was cut for being too slow (`limits.body_read_timeout`).
    too_slow: std::sync::atomic::AtomicBool,
}

impl RequestProgress {
    pub(crate) fn new(started: Instant) -> Self {
        RequestProgress {
            started,
            bytes_in: AtomicU64::new(0),
            last_progress_ns: AtomicU64::new(0),
            client_error: Mutex::new(None),
            too_slow: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The client's body was cut for being too slow.
    pub(crate) fn too_slow(&self) -> bool {
        self.too_slow.load(Ordering::Relaxed)
    }

    /// When the request body last moved (or the exchange started).
    pub(crate) fn last_progress(&self) -> Instant {
        self.started + Duration::from_nanos(self.last_progress_ns.load(Ordering::Relaxed))
    }

    pub(crate) fn client_error(&self) -> Option<String> {
        self.client_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn touch(&self) {
        let ns = self.started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.last_progress_ns.store(ns, Ordering::Relaxed);
    }
}

/// Where a request body comes from.
enum RequestSource {
    /// Read by hyper from the client connection.
    Client(Incoming),
    /// Read by a takeover from a restored connection's receive queue (see [`super::Refetch`]).
    Resumed(BoxBody<Bytes, BoxError>),
}

/// The client's request body on its way upstream; counts bytes, notes progress, and cuts a body
/// slower than `limits.body_read_timeout` / `body_min_rate` allow.
pub struct RequestBody {
    inner: RequestSource,
    progress: Arc<RequestProgress>,
    pace: BodyPace,
    /// Armed at the pace's deadline while waiting on the client.
    timer: Pin<Box<tokio::time::Sleep>>,
}

/// A request body cut for being too slow.
#[derive(Debug, thiserror::Error)]
#[error(
    "request body too slow: fewer than {min_bytes} bytes in {timeout:?} of waiting (limits.body_read_timeout, limits.body_min_rate)"
)]
pub struct BodyTooSlow {
    min_bytes: u64,
    timeout: Duration,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, progress: Arc<RequestProgress>, limits: &Limits) -> Self {
        Self::with_source(RequestSource::Client(inner), progress, limits)
    }

    pub(crate) fn resumed(inner: BoxBody<Bytes, BoxError>, progress: Arc<RequestProgress>, limits: &Limits) -> Self {
        Self::with_source(RequestSource::Resumed(inner), progress, limits)
    }

    fn with_source(inner: RequestSource, progress: Arc<RequestProgress>, limits: &Limits) -> Self {
        RequestBody {
            inner,
            progress,
            pace: BodyPace::new(limits.body_read_timeout, limits.body_min_rate),
            timer: Box::pin(tokio::time::sleep(limits.body_read_timeout)),
        }
    }

    /// Waiting on the client: `Ready` with the error once the pace is broken, else `Pending` with the
    /// timer armed.
    fn poll_pace(&mut self, cx: &mut Context<'_>) -> Poll<BodyTooSlow> {
        let now = Instant::now();
        self.pace.handle_waiting(now);
        loop {
            let Some(deadline) = self.pace.deadline() else { return Poll::Pending };
            if self.pace.expired(Instant::now()) {
                return Poll::Ready(BodyTooSlow { min_bytes: self.pace.min_bytes(), timeout: self.pace.timeout() });
            }
            if self.timer.deadline() != deadline.into() {
                self.timer.as_mut().reset(deadline.into());
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut self.inner {
            RequestSource::Client(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestSource::Resumed(b) => Pin::new(b).poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                self.progress.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                self.pace.handle_data(Instant::now(), n);
                self.progress.touch();
            }
            Poll::Ready(Some(Err(e))) => {
                *self.progress.client_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            Poll::Ready(None) => self.progress.touch(),
            Poll::Pending => {
                if let Poll::Ready(slow) = self.poll_pace(cx) {
                    self.progress.too_slow.store(true, Ordering::Relaxed);
                    *self.progress.client_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(slow.to_string());
                    return Poll::Ready(Some(Err(Box::new(slow))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RequestSource::Client(b) => b.is_end_stream(),
            RequestSource::Resumed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RequestSource::Client(b) => b.size_hint(),
            RequestSource::Resumed(b) => b.size_hint(),
        }
    }
}

/// One request and its response on a connection, from head parsed to body done.
pub(crate) struct Exchange {
    conn: Arc<ConnShared>,
    pub(crate) id: u64,
    method: Method,
    target: String,
    started: Instant,
    pub(crate) progress: Arc<RequestProgress>,
    upstream: Option<String>,
    key: Option<String>,
    key_generated: bool,
    status: Option<u16>,
    bytes_out: u64,
    complete: bool,
    error: Option<String>,
    /// The takeover path that resumed this exchange, for the request log.
    resume: Option<&'static str>,
}

impl Exchange {
    pub(crate) fn new(conn: Arc<ConnShared>, id: u64, method: Method, target: String) -> Self {
        conn.activity.exchange_started();
        let started = Instant::now();
        Exchange {
            conn,
            id,
            method,
            target,
            started,
            progress: Arc::new(RequestProgress::new(started)),
            upstream: None,
            key: None,
            key_generated: false,
            status: None,
            bytes_out: 0,
            complete: false,
            error: None,
            resume: None,
        }
    }

    pub(crate) fn set_resume(&mut self, path: &'static str) {
        self.resume = Some(path);
    }

    pub(crate) fn conn(&self) -> &Arc<ConnShared> {
        &self.conn
    }

    /// Fixes the exchange's routing and tells the observer it started.
    pub(crate) fn start(&mut self, upstream: Option<String>, key: Option<String>, key_generated: bool) {
        self.upstream = upstream;
        self.key = key;
        self.key_generated = key_generated;
        let info = ExchangeInfo {
            exchange: self.id,
            method: self.method.clone(),
            target: self.target.clone(),
            idempotency_key: self.key.clone(),
            key_generated,
            upstream: self.upstream.clone(),
        };
        self.conn.observer.on_exchange_start(&info);
    }

    pub(crate) fn set_error(&mut self, error: impl Into<String>) {
        self.error = Some(error.into());
    }

    /// Hands `response` to the client connection; the body carries the exchange from here.
    pub(crate) fn respond(mut self, response: Response<BodyKind>) -> Response<ResponseBody> {
        self.status = Some(response.status().as_u16());
        let (parts, kind) = response.into_parts();
        Response::from_parts(parts, ResponseBody { kind, exchange: Some(self) })
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let bytes_in = self.progress.bytes_in.load(Ordering::Relaxed);
        if self.status.is_none() && self.error.is_none() {
            self.error = Some("client connection ended before the response".into());
        }
        let outcome = ExchangeOutcome {
            exchange: self.id,
            status: self.status,
            bytes_in,
            bytes_out: self.bytes_out,
            complete: self.complete,
        };
        self.conn.observer.on_exchange_end(&outcome);
        let inner = &self.conn.inner;
        inner.stats.exchange_ended(self.status, self.complete);
        tracing::debug!(
            conn = %self.conn.peer, exchange = self.id, method = %self.method, target = %self.target,
            status = ?self.status, bytes_in, bytes_out = self.bytes_out, complete = self.complete,
            error = ?self.error, resume = ?self.resume, "exchange end"
        );
        if let Some(log) = &inner.request_log {
            log.write(&RequestLogEntry {
                time: now_rfc3339(),
                node: inner.node.clone(),
                connection: self.conn.peer.to_string(),
                exchange: Some(self.id),
                method: Some(self.method.to_string()),
                target: Some(self.target.clone()),
                status: self.status,
                sent: self.status.is_some(),
                bytes_in,
                bytes_out: self.bytes_out,
                complete: self.complete,
                duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
                upstream: self.upstream.clone(),
                idempotency_key: self.key.clone(),
                key_generated: self.key_generated,
                error: self.error.take(),
                resume: self.resume.map(str::to_owned),
            });
        }
        self.conn.activity.exchange_ended();
    }
}

pub(crate) fn now_rfc3339() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    super::httpdate::format_rfc3339_millis(ms)
}

/// The upstream's response body, with an idle timeout between frames.
pub(crate) struct UpstreamBody {
    body: Incoming,
    /// Body bytes received so far (offset of the next chunk).
    offset: u64,
    idle: Duration,
    last: Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl UpstreamBody {
    pub(crate) fn new(body: Incoming, idle: Duration) -> Self {
        let last = Instant::now();
        UpstreamBody { body, offset: 0, idle, last, sleep: Box::pin(tokio::time::sleep(idle)) }
    }
}

/// What a response body is made of.
pub(crate) enum BodyKind {
    Static(StaticBody),
    Upstream(UpstreamBody),
}

/// The body of every response the proxy sends.
pub struct ResponseBody {
    kind: BodyKind,
    exchange: Option<Exchange>,
}

impl BodyKind {
    /// Polls the next frame; upstream data is reported to `observe` with its body offset first.
    fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        observe: impl FnOnce(u64, &Bytes),
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            BodyKind::Static(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            BodyKind::Upstream(u) => match Pin::new(&mut u.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        observe(u.offset, data);
                        u.offset += data.len() as u64;
                    }
                    u.last = Instant::now();
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(format!("upstream body: {e}").into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => {
                    let deadline = tokio::time::Instant::from_std(u.last + u.idle);
                    if u.sleep.deadline() != deadline {
                        u.sleep.as_mut().reset(deadline);
                    }
                    match u.sleep.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                            "upstream body idle for {:?} after {} bytes",
                            u.idle, u.offset
                        )
                        .into()))),
                        Poll::Pending => Poll::Pending,
                    }
                }
            },
        }
    }

    fn is_end(&self) -> bool {
        match self {
            BodyKind::Static(b) => b.is_end_stream(),
            BodyKind::Upstream(u) => u.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            BodyKind::Static(b) => b.size_hint(),
            BodyKind::Upstream(u) => u.body.size_hint(),
        }
    }
}

impl ResponseBody {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let exchange = self.exchange.as_ref();
        self.kind.poll_body(cx, |offset, data| {
            if let Some(ex) = exchange {
                ex.conn.observer.on_upstream_data(ex.id, offset, data);
            }
        })
    }

    fn inner_is_end(&self) -> bool {
        self.kind.is_end()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.poll_inner(cx);
        if let Some(ex) = this.exchange.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        ex.bytes_out += data.len() as u64;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(conn = %ex.conn.peer, exchange = ex.id, error = %e, "response body ended short");
                    ex.error = Some(e.to_string());
                }
                Poll::Ready(None) => ex.complete = true,
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner_is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.kind.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper stops polling once `is_end_stream` says so; a body it finished is complete.
        let end = self.inner_is_end();
        if let Some(ex) = self.exchange.as_mut() {
            ex.complete |= end && ex.error.is_none();
        }
    }
}

/// A response body fetched by a takeover to continue a partly sent response
/// ([`super::Proxy::refetch`]): the upstream's body (de-chunked) or a static file's, with the
/// same idle timeout as a served response. Nothing is observed or logged for it.
pub struct FetchedBody {
    kind: BodyKind,
}

impl FetchedBody {
    pub(crate) fn new(kind: BodyKind) -> Self {
        FetchedBody { kind }
    }
}

impl Body for FetchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().kind.poll_body(cx, |_, _| {})
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.kind.size_hint()
    }
}
