//! Serving connections: hyper's HTTP/1.1 server per connection, a watchdog for the header and
//! idle timeouts, and the accept loop with graceful shutdown.
//!
//! hyper answers pipelined requests one at a time in order (RFC 9112 §9.3.2), sends
//! `100 Continue` when a request body is first read (RFC 9110 §10.1.1), and answers a
//! malformed or oversized head itself (400, 414, 431) before closing that connection.
//!
//! Timeouts: a connection is "idle" while no exchange is in progress. The header timeout runs
//! from the first byte read while idle (the start of the next head) until hyper hands over the
//! parsed request; the idle timeout runs from the end of the last exchange; the send timeout
//! runs while writes to the client make no progress (a client that stopped reading, or a
//! reply log that stopped accepting). Any of them expiring drops the connection (the socket
//! closes; nothing is sent, as nginx does on `client_header_timeout`, because hyper may still
//! hold unflushed bytes of the previous response and a 408 after them would corrupt it).

use super::body::{BodyKind, Exchange, RequestBody, ResponseBody, now_rfc3339};
use super::hooks::{ConnectionHooks, ExchangeObserver};
use super::logged_io::{LoggedIo, ReplyLog};
use super::pace::LogBudget;
use super::request_log::RequestLogEntry;
use super::static_files::{StaticBody, text_response};
use super::upstream::LoggedKey;
use super::{BackendImpl, Inner, Limits, Proxy};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use shared::admin::Limit;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// Tells connections to finish their exchange in progress and close.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// The receiving side of a [`ShutdownTrigger`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(Option<watch::Receiver<bool>>);

impl ShutdownTrigger {
    pub fn new() -> (ShutdownTrigger, ShutdownSignal) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), ShutdownSignal(Some(rx)))
    }

    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl ShutdownSignal {
    /// A signal that never fires.
    pub fn never() -> Self {
        ShutdownSignal(None)
    }

    pub fn is_triggered(&self) -> bool {
        self.0.as_ref().is_some_and(|rx| *rx.borrow())
    }

    /// Resolves once triggered; never if the trigger was dropped untriggered.
    pub async fn wait(&mut self) {
        if let Some(rx) = self.0.as_mut()
            && rx.wait_for(|fired| *fired).await.is_ok()
        {
            return;
        }
        std::future::pending::<()>().await
    }
}

/// How a client connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The client closed, or the connection ended after `Connection: close`.
    Closed,
    /// A malformed or oversized request: hyper answered `status` (400, 414, 431) and closed.
    BadRequest { status: u16, reason: String },
    /// A request head took longer than the header timeout.
    HeaderTimeout,
    /// No request within the idle timeout.
    IdleTimeout,
    /// The client read nothing of a response for the send timeout.
    SendTimeout,
    /// Closed after a shutdown signal.
    Shutdown,
    /// The client went away mid-request or the socket failed.
    Aborted(String),
}

/// What happened on one client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSummary {
    /// Exchanges begun (requests handed to the proxy).
    pub exchanges: u64,
    pub end: ConnectionEnd,
}

/// Which timeout a connection is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeout {
    Header,
    Idle,
    Send,
}

#[derive(Debug)]
struct ActivityState {
    /// Exchanges begun and not yet ended.
    active: u32,
    /// When the connection last became idle.
    idle_since: Instant,
    /// First byte read since it became idle: a request head is under way.
    head_started: Option<Instant>,
    /// Since when writes to the client have made no progress.
    write_blocked: Option<Instant>,
    /// Last write progress: the tail of a response may still be flushing after its exchange
    /// ended, and a slow reader taking it in is not idle.
    last_write: Instant,
}

/// Shared between the service, the IO wrapper and the watchdog of one connection.
#[derive(Debug)]
pub(crate) struct Activity {
    state: Mutex<ActivityState>,
    notify: Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            state: Mutex::new(ActivityState {
                active: 0,
                idle_since: Instant::now(),
                head_started: None,
                write_blocked: None,
                last_write: Instant::now(),
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn exchange_started(&self) {
        let mut s = self.lock();
        s.active += 1;
        s.head_started = None;
    }

    pub(crate) fn exchange_ended(&self) {
        let mut s = self.lock();
        s.active = s.active.saturating_sub(1);
        if s.active == 0 {
            s.idle_since = Instant::now();
            s.head_started = None;
            drop(s);
            // The watchdog was waiting without a deadline.
            self.notify.notify_one();
        }
    }

    fn bytes_read(&self) {
        let mut s = self.lock();
        if s.active == 0 && s.head_started.is_none() {
            s.head_started = Some(Instant::now());
            drop(s);
            self.notify.notify_one();
        }
    }

    /// A write or flush returned `Pending` (`blocked`), or completed having moved `wrote` bytes.
    /// (A flush with nothing to flush completes at once: that is not progress for the idle
    /// timer, or every poll of the idle connection would postpone it.)
    fn write_polled(&self, blocked: bool, wrote: usize) {
        let mut s = self.lock();
        if blocked {
            if s.write_blocked.is_none() {
                s.write_blocked = Some(Instant::now());
                drop(s);
                self.notify.notify_one();
            }
            return;
        }
        s.write_blocked = None;
        if wrote > 0 {
            s.last_write = Instant::now();
        }
    }

    /// The earliest deadline the connection is under now, if any.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Timeout)> {
        let s = self.lock();
        let send = s.write_blocked.map(|t| (t + limits.send_timeout, Timeout::Send));
        let wait = match (s.active, s.head_started) {
            (0, Some(t)) => Some((t + limits.header_timeout, Timeout::Header)),
            (0, None) => Some((s.idle_since.max(s.last_write) + limits.idle_timeout, Timeout::Idle)),
            _ => None,
        };
        match (send, wait) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

/// What the exchanges of one connection share.
pub(crate) struct ConnShared {
    pub(crate) inner: Arc<Inner>,
    pub(crate) peer: SocketAddr,
    pub(crate) observer: Arc<dyn ExchangeObserver>,
    pub(crate) activity: Activity,
    /// How a takeover resumes some of the next exchanges, by number; each taken once. `None` on every
    /// connection that was not restored, so their requests take no lock.
    resume: Option<Mutex<HashMap<u64, ExchangeOverride>>>,
    /// A request asked for the connection to close after its response (see [`Cork`]).
    closing: std::sync::atomic::AtomicBool,
}

/// Holds a socket's partial segments back (`TCP_CORK`) or lets them go. A connection whose client
/// asked it to close corks its socket from the final response on, so the FIN that the close sends
/// rides in the response's last segment. A FIN of its own is a control segment the gate holds until the
/// replication sender has recorded it: it would reach the client a moment after the response, and a
/// client that closes as soon as it has read the response would close first and keep the TIME_WAIT
/// (tens of thousands of them run a connection-per-request client out of ports). Called only while
/// the socket it was made for is open.
pub type Cork = Box<dyn Fn(bool) + Send + Sync>;

/// A [`Cork`] for the socket `fd`; the caller keeps `fd` open while the cork may be called.
pub fn cork_for(fd: std::os::fd::RawFd) -> Cork {
    Box::new(move |on| {
        let value = libc::c_int::from(on);
        // SAFETY: a plain setsockopt on a descriptor the caller keeps open; failure only means no cork.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_CORK,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    })
}

/// Whether `req` asks for its connection to close after the response (RFC 9112 9.3: `Connection:
/// close`, or HTTP/1.0 without `keep-alive`).
fn asks_to_close<B>(req: &Request<B>) -> bool {
    let tokens = || {
        req.headers()
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    if tokens().any(|t| t.eq_ignore_ascii_case("close")) {
        return true;
    }
    req.version() == hyper::Version::HTTP_10 && !tokens().any(|t| t.eq_ignore_ascii_case("keep-alive"))
}

impl ConnShared {
    fn take_override(&self, exchange: u64) -> Option<ExchangeOverride> {
        self.resume.as_ref()?.lock().unwrap_or_else(|p| p.into_inner()).remove(&exchange)
    }
}

/// Where a connection restored by a takeover continues: the replica numbers exchanges per
/// connection from 0, and a restored connection goes on counting.
#[derive(Debug, Clone, Default)]
pub struct ResumeFrom {
    /// The number of the first request hyper reads.
    pub first_exchange: u64,
    /// How particular exchanges are resumed, by number.
    pub exchanges: HashMap<u64, ExchangeOverride>,
}

/// How a takeover resumes one exchange that hyper reads again from the restored receive queue.
#[derive(Debug, Clone)]
pub struct ExchangeOverride {
    /// The resume path (`shared::replica::Decision::kind`), written to the request log.
    pub path: &'static str,
    /// The `Idempotency-Key` the primary sent upstream: sent again as it was (a generated key
    /// is reused, never regenerated).
    pub idempotency_key: Option<LoggedKey>,
    /// Answer with the upstream's logged response instead of forwarding the request.
    pub replay: Option<Replay>,
}

/// An upstream response the primary logged in full, answered again by a takeover.
#[derive(Debug, Clone)]
pub struct Replay {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// The upstream that gave it (`host:port`), for the request log.
    upstream: Option<String>,
}

/// Why a logged upstream response cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The logged head is not an HTTP/1.1 response head.
    #[error("logged upstream head does not parse: {0}")]
    Head(String),
    /// The logged head's `Content-Length` disagrees with the logged body.
    #[error("logged upstream head says Content-Length {head}, the logged body has {body} bytes")]
    Length { head: u64, body: u64 },
}

impl Replay {
    /// The response logged as `head_raw` (the HTTP/1.1 head the primary rebuilt, after hop-by-hop
    /// processing) and its decoded `body`. hyper re-frames it for the client.
    pub fn from_logged(head_raw: &[u8], body: Bytes, upstream: Option<String>) -> Result<Replay, ReplayError> {
        let mut fields = [httparse::EMPTY_HEADER; 256];
        let mut parsed = httparse::Response::new(&mut fields);
        match parsed.parse(head_raw) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(ReplayError::Head("incomplete".into())),
            Err(e) => return Err(ReplayError::Head(e.to_string())),
        }
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| ReplayError::Head("no status".into()))?;
        let mut headers = HeaderMap::new();
        for f in parsed.headers.iter() {
            let name = http::HeaderName::from_bytes(f.name.as_bytes()).map_err(|e| ReplayError::Head(e.to_string()))?;
            // The log's own framing; hyper frames the replay for this client.
            if name == http::header::TRANSFER_ENCODING {
                continue;
            }
            let value = http::HeaderValue::from_bytes(f.value).map_err(|e| ReplayError::Head(e.to_string()))?;
            headers.append(name, value);
        }
        let length = headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        // A HEAD, 204 or 304 response states a length without carrying a body.
        if let Some(head) = length
            && !body.is_empty()
            && head != body.len() as u64
        {
            return Err(ReplayError::Length { head, body: body.len() as u64 });
        }
        Ok(Replay { status, headers, body, upstream })
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// An exchange a takeover finished (or refused) itself, outside hyper: for the counters and the
/// request log ([`Proxy::record_resumed`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ResumedExchange {
    pub peer: SocketAddr,
    pub exchange: u64,
    pub method: String,
    pub target: String,
    /// Status of the response (continued, or cut); `None` when none was sent.
    pub status: Option<u16>,
    pub sent: bool,
    pub bytes_in: u64,
    /// Response body bytes this node wrote.
    pub bytes_out: u64,
    /// The response reached its end.
    pub complete: bool,
    pub duration: Duration,
    pub upstream: Option<String>,
    pub idempotency_key: Option<String>,
    pub key_generated: bool,
    pub error: Option<String>,
    /// The resume path (`Decision::kind`).
    pub resume: &'static str,
}

/// The client socket as hyper sees it: reads note activity for the header timeout.
struct Watched<I> {
    io: I,
    conn: Arc<ConnShared>,
    /// Declared after `io`, so never called once the socket is gone.
    cork: Option<Cork>,
    corked: bool,
}

impl<I> Watched<I> {
    /// Corks the socket before the first write after a request asked to close.
    fn cork_if_closing(&mut self) {
        if !self.corked
            && let Some(cork) = &self.cork
            && self.conn.closing.load(Ordering::Relaxed)
        {
            cork(true);
            self.corked = true;
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.activity.bytes_read();
        }
        polled
    }
}

impl<I> Watched<I> {
    /// Notes whether a write made progress, for the send and idle timeouts.
    fn watch_write(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        let wrote = match &polled {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        self.conn.activity.write_polled(polled.is_pending(), wrote);
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.cork_if_closing();
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch_write(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cork_if_closing();
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch_write(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.conn.activity.write_polled(polled.is_pending(), 0);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The FIN joins the corked tail and leaves with it (the kernel pushes it past the cork).
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        if polled.is_ready()
            && self.corked
            && let Some(cork) = &self.cork
        {
            cork(false);
            self.corked = false;
        }
        polled
    }
}

/// The hyper service of one connection: numbers the exchanges in request order.
#[derive(Clone)]
struct ConnService {
    conn: Arc<ConnShared>,
    next: Arc<AtomicU64>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = asks_to_close(&req);
        let conn = Arc::clone(&self.conn);
        Box::pin(async move {
            let response = handle(Arc::clone(&conn), id, req).await;
            // From the final response on, not before: an interim `100 Continue` corked would wait for
            // the kernel's cork limit while the client waits for it to send its body.
            if close {
                conn.closing.store(true, Ordering::Relaxed);
            }
            Ok(response)
        })
    }
}

async fn handle(conn: Arc<ConnShared>, id: u64, req: Request<Incoming>) -> Response<ResponseBody> {
    let resume = conn.take_override(id);
    let mut ex = Exchange::new(Arc::clone(&conn), id, req.method().clone(), req.uri().to_string());
    let (logged_key, replay) = match resume {
        Some(o) => {
            tracing::info!(conn = %conn.peer, exchange = id, path = o.path, "resumed exchange read again");
            ex.set_resume(o.path);
            (o.idempotency_key, o.replay)
        }
        None => (None, None),
    };
    if let Some(replay) = replay {
        return answer_replay(req, ex, logged_key, replay).await;
    }
    match &conn.inner.backend {
        BackendImpl::Static(files) => {
            ex.start(None, None, false);
            let uri = req.uri();
            let response = files.serve(req.method(), uri.path(), uri.query(), req.headers()).await;
            ex.respond(response.map(BodyKind::Static))
        }
        BackendImpl::Upstream(upstream) => upstream.forward(req, ex, logged_key).await,
    }
}

/// Answers with a logged upstream response. The request body (already in the receive queue) is
/// read to its end first, so that the connection stays usable for the next request.
async fn answer_replay(
    req: Request<Incoming>,
    mut ex: Exchange,
    key: Option<LoggedKey>,
    replay: Replay,
) -> Response<ResponseBody> {
    let (_, body) = req.into_parts();
    let mut body = RequestBody::new(body, ex.progress.clone(), &ex.conn().inner.limits);
    while let Some(frame) = body.frame().await {
        if let Err(e) = frame {
            ex.start(replay.upstream.clone(), key.as_ref().map(|k| k.key.clone()), key.is_some_and(|k| k.generated));
            if ex.progress.too_slow() {
                return body_too_slow(ex, e.to_string());
            }
            ex.set_error(format!("client request body: {e}"));
            return ex.respond(text_response(StatusCode::BAD_REQUEST).map(BodyKind::Static));
        }
    }
    let generated = key.as_ref().is_some_and(|k| k.generated);
    ex.start(replay.upstream.clone(), key.map(|k| k.key), generated);
    let mut response = Response::new(BodyKind::Static(StaticBody::Full(Some(replay.body))));
    *response.status_mut() = replay.status;
    *response.headers_mut() = replay.headers;
    ex.respond(response)
}

/// The answer to a request whose body was too slow: 408, and the connection closes (the rest of the
/// body is never read). Counted and logged.
pub(crate) fn body_too_slow(mut ex: Exchange, error: String) -> Response<ResponseBody> {
    let conn = Arc::clone(ex.conn());
    conn.inner.stats.body_timeouts.fetch_add(1, Ordering::Relaxed);
    conn.inner.limit_hit(Limit::BodyReadTimeout);
    tracing::info!(conn = %conn.peer, exchange = ex.id, %error, "request body too slow: 408 and close");
    ex.set_error(error);
    let mut response = text_response(StatusCode::REQUEST_TIMEOUT);
    response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    ex.respond(response.map(BodyKind::Static))
}

/// The status hyper sent for a parse error, if it sent one (hyper's `Server::on_error`).
fn parse_error_status(e: &hyper::Error) -> Option<u16> {
    let text = e.to_string();
    if e.is_parse_too_large() {
        Some(if text.contains("URI too long") { 414 } else { 431 })
    } else if e.is_parse() && !text.contains("HTTP2") && !text.contains("internal") {
        Some(400)
    } else {
        None
    }
}

impl Proxy {
    /// Serves HTTP/1.1 on one client connection until it ends.
    ///
    /// `io` is the client socket, usually a [`LoggedIo`]; `peer` the client's address (for
    /// logs and `X-Forwarded-For`); `observer` hears of every exchange. On `shutdown` the
    /// exchange in progress finishes and the connection closes.
    pub async fn serve_connection<I>(
        &self,
        io: I,
        peer: SocketAddr,
        observer: Arc<dyn ExchangeObserver>,
        shutdown: ShutdownSignal,
    ) -> ConnectionSummary
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(io, peer, observer, shutdown, ResumeFrom::default(), None).await
    }

    /// [`serve_connection`](Self::serve_connection) for a connection a takeover restored: the
    /// first request hyper reads is exchange `resume.first_exchange`, and the exchanges in
    /// `resume.exchanges` are resumed as they say. [`ConnectionSummary::exchanges`] counts the
    /// exchanges begun here.
    pub async fn serve_connection_from<I>(
        &self,
        io: I,
        peer: SocketAddr,
        observer: Arc<dyn ExchangeObserver>,
        shutdown: ShutdownSignal,
        resume: ResumeFrom,
    ) -> ConnectionSummary
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(io, peer, observer, shutdown, resume, None).await
    }

    /// [`serve_connection`](Self::serve_connection) of a socket that `cork` can cork (see [`Cork`]).
    pub async fn serve_corkable<I>(
        &self,
        io: I,
        peer: SocketAddr,
        observer: Arc<dyn ExchangeObserver>,
        shutdown: ShutdownSignal,
        cork: Cork,
    ) -> ConnectionSummary
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.serve(io, peer, observer, shutdown, ResumeFrom::default(), Some(cork)).await
    }

    async fn serve<I>(
        &self,
        io: I,
        peer: SocketAddr,
        observer: Arc<dyn ExchangeObserver>,
        mut shutdown: ShutdownSignal,
        resume: ResumeFrom,
        cork: Option<Cork>,
    ) -> ConnectionSummary
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = &self.inner;
        let limits = &inner.limits;
        inner.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        inner.stats.connections_total.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnShared {
            inner: Arc::clone(inner),
            peer,
            observer,
            activity: Activity::new(),
            resume: (!resume.exchanges.is_empty()).then(|| Mutex::new(resume.exchanges)),
            closing: std::sync::atomic::AtomicBool::new(false),
        });
        let first = resume.first_exchange;
        let next = Arc::new(AtomicU64::new(first));
        let service = ConnService { conn: Arc::clone(&conn), next: Arc::clone(&next) };

        let mut builder = http1::Builder::new();
        builder
            .keep_alive(true)
            // A client that shuts down its sending side after a pipelined burst still gets
            // every response.
            .half_close(true)
            .max_headers(limits.max_headers)
            .max_header_size(limits.max_header_bytes)
            // hyper's write buffer holds response bytes read from the upstream and not yet logged: kept
            // small, it leaves the reply log window to bound what a connection's replica holds.
            .max_buf_size((limits.max_header_bytes + 8192).max(HYPER_BUFFER))
            .header_read_timeout(None);
        // Boxed so that it can be dropped, closing the socket, before this function returns.
        let mut connection = Box::pin(
            builder
                .serve_connection(TokioIo::new(Watched { io, conn: Arc::clone(&conn), cork, corked: false }), service),
        );

        let mut draining = false;
        let end = loop {
            let deadline = conn.activity.deadline(limits);
            let notified = conn.activity.notify.notified();
            let sleep_until = deadline.map_or_else(Instant::now, |(at, _)| at);
            tokio::select! {
                biased;
                result = connection.as_mut() => break match result {
                    Ok(()) if draining => ConnectionEnd::Shutdown,
                    Ok(()) => ConnectionEnd::Closed,
                    Err(e) => match parse_error_status(&e) {
                        Some(status) => ConnectionEnd::BadRequest { status, reason: e.to_string() },
                        None if e.is_incomplete_message() => ConnectionEnd::Aborted(e.to_string()),
                        None => {
                            let mut text = e.to_string();
                            if let Some(source) = std::error::Error::source(&e) {
                                text = format!("{text}: {source}");
                            }
                            ConnectionEnd::Aborted(text)
                        }
                    },
                },
                _ = shutdown.wait(), if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                }
                _ = notified => {}
                _ = tokio::time::sleep_until(sleep_until.into()), if deadline.is_some() => {
                    if let Some((at, which)) = conn.activity.deadline(limits)
                        && at <= Instant::now()
                    {
                        break match which {
                            Timeout::Header => ConnectionEnd::HeaderTimeout,
                            Timeout::Idle => ConnectionEnd::IdleTimeout,
                            Timeout::Send => ConnectionEnd::SendTimeout,
                        };
                    }
                }
            }
        };
        // Counted and logged before the socket is dropped. A client can see the close earlier: after an
        // error response hyper shuts the write side down itself.
        let exchanges = next.load(Ordering::Relaxed) - first;
        self.log_connection_end(&conn, exchanges, &end);
        inner.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        // Dropping hyper's connection closes the socket (on a timeout, mid-head or idle).
        drop(connection);
        ConnectionSummary { exchanges, end }
    }

    fn log_connection_end(&self, conn: &ConnShared, exchanges: u64, end: &ConnectionEnd) {
        let inner = &self.inner;
        let (status, sent, error) = match end {
            ConnectionEnd::BadRequest { status, reason } => {
                inner.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                inner.limit_hit(if matches!(status, 414 | 431) { Limit::HeadTooLarge } else { Limit::BadRequest });
                tracing::info!(conn = %conn.peer, status, %reason, "bad request; connection closed");
                (Some(*status), true, reason.clone())
            }
            ConnectionEnd::HeaderTimeout => {
                inner.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                inner.limit_hit(Limit::HeaderReadTimeout);
                tracing::info!(conn = %conn.peer, timeout = ?inner.limits.header_timeout, "request head timed out; connection closed");
                (Some(408), false, format!("request head not complete within {:?}", inner.limits.header_timeout))
            }
            ConnectionEnd::SendTimeout => {
                inner.stats.send_timeouts.fetch_add(1, Ordering::Relaxed);
                inner.limit_hit(Limit::SendTimeout);
                tracing::info!(conn = %conn.peer, timeout = ?inner.limits.send_timeout, "client stopped reading; connection closed");
                return;
            }
            ConnectionEnd::IdleTimeout => {
                inner.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                inner.limit_hit(Limit::IdleTimeout);
                tracing::debug!(conn = %conn.peer, exchanges, "idle keep-alive connection closed");
                return;
            }
            ConnectionEnd::Aborted(reason) => {
                tracing::debug!(conn = %conn.peer, exchanges, %reason, "connection aborted");
                return;
            }
            ConnectionEnd::Closed | ConnectionEnd::Shutdown => {
                tracing::debug!(conn = %conn.peer, exchanges, ?end, "connection closed");
                return;
            }
        };
        if let Some(log) = &inner.request_log {
            log.write(&RequestLogEntry {
                time: now_rfc3339(),
                node: inner.node.clone(),
                connection: conn.peer.to_string(),
                exchange: None,
                method: None,
                target: None,
                status,
                sent,
                bytes_in: 0,
                bytes_out: 0,
                complete: false,
                duration_ms: 0.0,
                upstream: None,
                idempotency_key: None,
                key_generated: false,
                error: Some(error),
                resume: None,
            });
        }
    }

    /// Counts an exchange a takeover finished or refused itself and writes its request log line.
    pub fn record_resumed(&self, r: &ResumedExchange) {
        let inner = &self.inner;
        inner.stats.exchange_ended(r.status, r.complete);
        if let Some(log) = &inner.request_log {
            log.write(&RequestLogEntry {
                time: now_rfc3339(),
                node: inner.node.clone(),
                connection: r.peer.to_string(),
                exchange: Some(r.exchange),
                method: Some(r.method.clone()),
                target: Some(r.target.clone()),
                status: r.status,
                sent: r.sent,
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                complete: r.complete,
                duration_ms: r.duration.as_secs_f64() * 1000.0,
                upstream: r.upstream.clone(),
                idempotency_key: r.idempotency_key.clone(),
                key_generated: r.key_generated,
                error: r.error.clone(),
                resume: Some(r.resume.to_owned()),
            });
        }
    }

    /// Accepts connections from `listener` until `shutdown` resolves, serving each through a
    /// [`LoggedIo`] with the reply log and observer `hooks` choose. Then stops accepting, lets
    /// exchanges in progress finish for up to `drain_timeout`, and drops what remains.
    pub async fn run<H: ConnectionHooks>(&self, listener: TcpListener, hooks: H, shutdown: impl Future<Output = ()>) {
        let (trigger, signal) = ShutdownTrigger::new();
        let mut tasks = JoinSet::new();
        let mut refusals = JoinSet::new();
        let mut refusal_log = LogBudget::new(Duration::from_secs(1));
        let window = self.inner.limits.reply_window;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Replies are already batched by hyper; Nagle would only add latency.
                        let _ = stream.set_nodelay(true);
                        shape_client_socket(&stream, &self.inner.limits, peer);
                        let slot = self.try_slot();
                        let local = match stream.local_addr() {
                            Ok(local) => local,
                            Err(e) => {
                                tracing::debug!(conn = %peer, error = %e, "accepted connection already gone");
                                continue;
                            }
                        };
                        let (log, observer) = hooks.open(peer, local);
                        let Some(slot) = slot else {
                            self.refuse(&mut refusals, &mut refusal_log, LoggedIo::new(stream, log).with_window(window), peer);
                            continue;
                        };
                        // The socket lives inside `io`, which the connection owns as long as the cork.
                        let cork = cork_for(std::os::fd::AsRawFd::as_raw_fd(&stream));
                        let io = LoggedIo::new(stream, log).with_window(window);
                        let (proxy, signal) = (self.clone(), signal.clone());
                        let span = tracing::info_span!("conn", conn = %peer, node = %self.inner.node);
                        tasks.spawn(
                            async move {
                                let summary = proxy.serve_corkable(io, peer, Arc::new(observer), signal, cork).await;
                                drop(slot);
                                summary
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin; the listener stays.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = refusals.join_next(), if !refusals.is_empty() => {}
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = joined && e.is_panic() {
                        tracing::error!(error = %e, "connection task panicked");
                    }
                }
            }
        }
        drop(listener);
        refusals.abort_all();
        trigger.trigger();
        let deadline = tokio::time::Instant::now() + self.inner.limits.drain_timeout;
        let open = tasks.len();
        tracing::info!(connections = open, drain = ?self.inner.limits.drain_timeout, "shutting down");
        while !tasks.is_empty() {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(connections = tasks.len(), "drain timeout; dropping connections");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                }
            }
        }
    }
}

/// hyper's buffers on both sides of the proxy: reads from the upstream and writes to the client.
pub(crate) const HYPER_BUFFER: usize = 64 * 1024;

/// Refusals answered at once; beyond them a connection over the limit is closed without an answer.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;
/// How long a refusal may wait for the request head, then for the client to read the answer and close.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

impl Proxy {
    /// Answers a connection beyond `max_connections` with a 503 (through its reply log, like any
    /// reply) once its request head is in, then closes it; counted and logged (at most a line a second).
    fn refuse<L: ReplyLog + Unpin>(
        &self,
        refusals: &mut JoinSet<()>,
        budget: &mut LogBudget,
        mut io: LoggedIo<tokio::net::TcpStream, L>,
        peer: SocketAddr,
    ) {
        let inner = &self.inner;
        inner.stats.refused.fetch_add(1, Ordering::Relaxed);
        inner.limit_hit(Limit::MaxConnections);
        let max = inner.limits.max_connections;
        let answered = refusals.len() < MAX_REFUSALS_IN_FLIGHT;
        if let Some(suppressed) = budget.handle_event(Instant::now()) {
            tracing::warn!(conn = %peer, max_connections = max, open = self.live_connections(), answered,
                refused_unlogged = suppressed,
                "connection refused: at limits.max_connections (answered 503 and closed)");
        }
        if !answered {
            return;
        }
        let body = format!("This server is at its connection limit ({max}); try again shortly.\n");
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Retry-After: 1\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        refusals.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let refuse = async {
                // Read the head first, so that the answer follows a request, as HTTP has it.
                let mut head = Vec::with_capacity(1024);
                let mut buf = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if io.write_all(answer.as_bytes()).await.is_err() || io.shutdown().await.is_err() {
                    return;
                }
                // Whatever else the client sends is read and dropped until it closes: a close with
                // unread bytes would reset the connection, answer and all.
                while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
            };
            let _ = tokio::time::timeout(REFUSAL_TIME, refuse).await;
        });
    }
}

/// Caps what the kernel holds for a client: its send buffer (`SO_SNDBUF`), and so the reply bytes the
/// replica holds written but unacknowledged, and of those the bytes not yet sent (`TCP_NOTSENT_LOWAT`: the
/// socket takes more only below it). A slow reader's socket then holds little more than what is in flight;
/// the rest of its response waits upstream instead of in both nodes' memory.
pub fn shape_client_socket(stream: &tokio::net::TcpStream, limits: &Limits, peer: SocketAddr) {
    let sock = socket2::SockRef::from(stream);
    if let Some(bytes) = limits.client_send_buffer
        && let Err(e) = sock.set_send_buffer_size(bytes)
    {
        tracing::warn!(conn = %peer, bytes, error = %e, "cannot cap the client socket's send buffer");
    }
    if let Some(bytes) = limits.client_unsent_bytes
        && let Err(e) = sock.set_tcp_notsent_lowat(bytes)
    {
        tracing::warn!(conn = %peer, bytes, error = %e, "cannot cap the client socket's unsent bytes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: hyper::Version, connection: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri("/").version(version);
        for c in connection {
            b = b.header(hyper::header::CONNECTION, *c);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn requests_that_ask_to_close_are_recognised() {
        use hyper::Version;
        assert!(asks_to_close(&request(Version::HTTP_11, &["close"])));
        assert!(asks_to_close(&request(Version::HTTP_11, &["Upgrade, Close"])));
        assert!(asks_to_close(&request(Version::HTTP_11, &["keep-alive", "close"])));
        assert!(asks_to_close(&request(Version::HTTP_10, &[])));
        assert!(!asks_to_close(&request(Version::HTTP_10, &["Keep-Alive"])));
        assert!(!asks_to_close(&request(Version::HTTP_11, &[])));
        assert!(!asks_to_close(&request(Version::HTTP_11, &["keep-alive"])));
        assert!(!asks_to_close(&request(Version::HTTP_11, &["closed"])));
    }
}
