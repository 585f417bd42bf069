//! The HTTP/1.1 proxy and the built-in static file server, on hyper 1.
//!
//! Layer: the primary's serving path (ARCHITECTURE.md "Data path"). A connection handed to
//! [`Proxy::serve_connection`] is any `AsyncRead + AsyncWrite`; [`Proxy::run`] accepts from a
//! listener and wraps each socket in a [`LoggedIo`] whose [`ReplyLog`] the
//! [`ConnectionHooks`] choose, so every reply byte is logged before the client can see it
//! (invariant 1). [`Unprotected`] is the mode without a backup.
//!
//! Protocol: RFC 9110 (semantics) and RFC 9112 (HTTP/1.1 framing); header rules in
//! [`headers`], file serving rules in [`static_files`]. Keep-alive, pipelining (answered in
//! order, one at a time), content-length and chunked bodies both ways, streamed with
//! back-pressure, `Expect: 100-continue`. Malformed requests get hyper's automatic 400 / 414 /
//! 431 and only that connection closes.
//!
//! Limits ([`Limits`]): head size and header count (431), a header read timeout that starts
//! at the first byte of a request head (slowloris: the connection is closed, logged as 408),
//! an idle keep-alive timeout, a send timeout (client stopped reading), upstream connect
//! (502/504) and response timeouts (504).
//! hyper's own header timer is not used: it also runs while a keep-alive connection idles, so
//! it cannot tell a slow head from a quiet client.
//!
//! Takeover: [`Proxy::serve_connection_from`] serves a restored connection whose exchange numbers
//! continue the replica's, resuming chosen exchanges (the logged `Idempotency-Key` reused, or
//! the logged upstream response replayed); [`Proxy::refetch`] re-issues a request to continue a
//! partly sent response (with `Range` / `If-Range`, against the upstream or the static root);
//! [`Proxy::record_resumed`] accounts for exchanges a takeover finished itself.
//!
//! Not supported: HTTP/2, `Upgrade` (WebSocket; the header is hop-by-hop and is removed),
//! `CONNECT` (501), TLS to the upstream.

pub mod headers;
pub mod hooks;
pub mod httpdate;
pub mod logged_io;
pub mod request_log;
pub mod static_files;

mod body;
mod pace;
mod server;
mod upstream;

pub use body::{BoxError, FetchedBody, RequestBody, ResponseBody};
pub use hooks::{ConnectionHooks, ExchangeInfo, ExchangeObserver, ExchangeOutcome, NoObserver, Unprotected};
pub use logged_io::{LoggedIo, NoLog, ReplyLog};
pub use request_log::{RequestLog, RequestLogEntry, RequestLogError};
pub use server::{
    ConnectionEnd, ConnectionSummary, ExchangeOverride, Replay, ReplayError, ResumeFrom, ResumedExchange,
    ShutdownSignal, ShutdownTrigger, shape_client_socket,
};
pub use static_files::{StaticFiles, StaticRootError};
pub use upstream::{LoggedKey, RangeFrom, Refetch, RefetchError, Refetched};

use serde::Serialize;
use shared::admin::{AdminState, Limit};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What the proxy serves from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Forward to an origin: `http://host:port` (no path, no TLS).
    Upstream(http::Uri),
    /// Serve files below this directory.
    Root(PathBuf),
}

/// Protocol limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and headers), bytes; beyond it: 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request; beyond it: 431.
    pub max_headers: usize,
    /// From the first byte of a request head to its end; beyond it the connection is closed.
    pub header_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long writes to the client may make no progress before the connection is dropped.
    pub send_timeout: Duration,
    /// TCP connect to the upstream; beyond it: 504 (a refused connect is 502).
    pub upstream_connect_timeout: Duration,
    /// From the request's last body byte (or its head) to the upstream's response head, and
    /// between two upstream body frames. Beyond it: 504, or a response ended short.
    pub upstream_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle_timeout: Duration,
    /// Most idle pooled connections to the upstream.
    pub pool_max_idle: usize,
    /// On shutdown, how long in-flight exchanges may take before connections are dropped.
    pub drain_timeout: Duration,
    /// Bytes a connection may have appended to its reply log but not yet written.
    pub reply_window: usize,
    /// `SO_SNDBUF` of client sockets (the kernel doubles it); `None` leaves the kernel's autotuning.
    pub client_send_buffer: Option<usize>,
    /// `TCP_NOTSENT_LOWAT` of client sockets: bytes the kernel holds for a client beyond those in flight;
    /// `None` leaves the kernel's default (no bound below the send buffer).
    pub client_unsent_bytes: Option<u32>,
    /// Client connections served at once, restored ones included; beyond it: 503 and close.
    pub max_connections: usize,
    /// Waiting on a request body this long must have brought `body_min_rate` bytes per second;
    /// beyond it: 408 (or the response cut) and close.
    pub body_read_timeout: Duration,
    /// Bytes per second, over each `body_read_timeout` (0: one byte per timeout is enough).
    pub body_min_rate: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle: 128,
            drain_timeout: Duration::from_secs(10),
            reply_window: logged_io::DEFAULT_WINDOW,
            client_send_buffer: None,
            client_unsent_bytes: None,
            max_connections: 10_000,
            body_read_timeout: Duration::from_secs(20),
            body_min_rate: 500,
        }
    }
}

/// The proxy's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// This node's name: in `Via`, and in the request log.
    pub node: String,
    pub backend: Backend,
    /// Where to append the JSON-lines request log, if anywhere.
    pub request_log: Option<PathBuf>,
    pub limits: Limits,
}

/// Why a [`Proxy`] could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The node name is empty or not an HTTP token (it goes into `Via`).
    #[error("node name {0:?} must be a non-empty HTTP token (letters, digits, -._~ and the like)")]
    InvalidNode(String),
    /// The upstream URI is not `http://host:port` (with an optional trailing `/`).
    #[error("upstream {uri}: {reason}")]
    InvalidUpstream { uri: String, reason: &'static str },
    /// A limit is out of its range.
    #[error("limit {name}: {reason}")]
    InvalidLimit { name: &'static str, reason: &'static str },
    /// The static root cannot be served.
    #[error(transparent)]
    Root(#[from] StaticRootError),
    /// The request log cannot be opened.
    #[error(transparent)]
    RequestLog(#[from] RequestLogError),
}

/// Counters for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    exchanges_total: AtomicU64,
    exchanges_incomplete: AtomicU64,
    responses_5xx: AtomicU64,
    upstream_errors: AtomicU64,
    upstream_timeouts: AtomicU64,
    keys_generated: AtomicU64,
    bad_requests: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    send_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
    refused: AtomicU64,
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Client connections being served now.
    pub connections_open: u64,
    pub connections_total: u64,
    /// Exchanges ended (response sent or abandoned).
    pub exchanges_total: u64,
    /// Exchanges whose response did not reach its end.
    pub exchanges_incomplete: u64,
    /// Responses with a 5xx status (the origin's own included).
    pub responses_5xx: u64,
    /// Upstream failures answered 502.
    pub upstream_errors: u64,
    /// Upstream timeouts answered 504.
    pub upstream_timeouts: u64,
    /// `Idempotency-Key`s the proxy generated.
    pub keys_generated: u64,
    /// Connections ended by a malformed or oversized request (400, 414, 431).
    pub bad_requests: u64,
    pub header_timeouts: u64,
    pub idle_timeouts: u64,
    pub send_timeouts: u64,
    /// Requests whose body was too slow (408).
    pub body_timeouts: u64,
    /// Connections refused at `max_connections` (503).
    pub refused: u64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    pub(crate) fn exchange_ended(&self, status: Option<u16>, complete: bool) {
        bump(&self.exchanges_total);
        if !complete {
            bump(&self.exchanges_incomplete);
        }
        if status.is_some_and(|s| s >= 500) {
            bump(&self.responses_5xx);
        }
    }

    fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections_open: g(&self.connections_open),
            connections_total: g(&self.connections_total),
            exchanges_total: g(&self.exchanges_total),
            exchanges_incomplete: g(&self.exchanges_incomplete),
            responses_5xx: g(&self.responses_5xx),
            upstream_errors: g(&self.upstream_errors),
            upstream_timeouts: g(&self.upstream_timeouts),
            keys_generated: g(&self.keys_generated),
            bad_requests: g(&self.bad_requests),
            header_timeouts: g(&self.header_timeouts),
            idle_timeouts: g(&self.idle_timeouts),
            send_timeouts: g(&self.send_timeouts),
            body_timeouts: g(&self.body_timeouts),
            refused: g(&self.refused),
        }
    }
}

pub(crate) enum BackendImpl {
    Upstream(upstream::Upstream),
    Static(Arc<StaticFiles>),
}

pub(crate) struct Inner {
    pub(crate) node: String,
    pub(crate) limits: Limits,
    pub(crate) backend: BackendImpl,
    pub(crate) request_log: Option<RequestLog>,
    pub(crate) stats: Stats,
    /// Where limit hits are counted for `/status` and `/metrics`, once set.
    admin: OnceLock<AdminState>,
    /// Connections holding a [`Slot`].
    live: AtomicUsize,
}

impl Inner {
    /// Counts a connection a limit refused or closed.
    pub(crate) fn limit_hit(&self, limit: Limit) {
        if let Some(admin) = self.admin.get() {
            admin.metrics().limit_hits.get(limit).inc();
        }
    }
}

/// One of the `max_connections` places, held by a connection from accept (or restore) to close.
#[derive(Debug)]
pub struct Slot(Arc<Inner>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("node", &self.node).field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// The proxy: shared state of every connection it serves. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

/// RFC 9110 §5.6.2 `token`.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Proxy {
    /// Checks `config`, opens the static root and the request log, and builds the upstream
    /// client. Needs no runtime; serving does.
    pub fn new(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        if !is_token(&config.node) {
            return Err(ProxyError::InvalidNode(config.node));
        }
        let l = &config.limits;
        let limit = |ok: bool, name, reason| if ok { Ok(()) } else { Err(ProxyError::InvalidLimit { name, reason }) };
        limit(l.max_header_bytes >= 1024, "max_header_bytes", "must be at least 1024")?;
        limit(l.max_header_bytes <= 1 << 20, "max_header_bytes", "must be at most 1 MiB")?;
        limit(l.max_headers >= 8, "max_headers", "must be at least 8")?;
        for (name, d) in [
            ("header_timeout", l.header_timeout),
            ("idle_timeout", l.idle_timeout),
            ("send_timeout", l.send_timeout),
            ("upstream_connect_timeout", l.upstream_connect_timeout),
            ("upstream_timeout", l.upstream_timeout),
            ("pool_idle_timeout", l.pool_idle_timeout),
        ] {
            limit(!d.is_zero(), name, "must be positive")?;
        }
        limit(l.reply_window >= 4096, "reply_window", "must be at least 4096")?;
        limit(l.max_connections >= 1, "max_connections", "must be at least 1")?;
        limit(!l.body_read_timeout.is_zero(), "body_read_timeout", "must be positive")?;
        let backend = match &config.backend {
            Backend::Upstream(uri) => BackendImpl::Upstream(upstream::Upstream::new(uri, &config.limits)?),
            Backend::Root(root) => BackendImpl::Static(Arc::new(StaticFiles::new(root)?)),
        };
        let request_log = config.request_log.as_deref().map(RequestLog::open).transpose()?;
        Ok(Proxy {
            inner: Arc::new(Inner {
                node: config.node,
                limits: config.limits,
                backend,
                request_log,
                stats: Stats::default(),
                admin: OnceLock::new(),
                live: AtomicUsize::new(0),
            }),
        })
    }

    /// The proxy's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Counts limit hits in `admin`'s metrics from now on (the first call wins).
    pub fn report_to(&self, admin: &AdminState) {
        let _ = self.inner.admin.set(admin.clone());
    }

    /// A place among `max_connections` whether or not one is free: for connections a takeover
    /// restored, which are never refused but take their places.
    pub fn take_slot(&self) -> Slot {
        self.inner.live.fetch_add(1, Ordering::AcqRel);
        Slot(Arc::clone(&self.inner))
    }

    /// A place among `max_connections`, if one is free.
    pub fn try_slot(&self) -> Option<Slot> {
        let max = self.inner.limits.max_connections;
        self.inner.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(Arc::clone(&self.inner)))
    }

    /// Connections holding a place now.
    pub fn live_connections(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }
}
