//! Forwarding to the upstream: a pooled HTTP/1.1 client (hyper-util's legacy client) and the
//! mapping of upstream failures to statuses (RFC 9110 §15.6.3 502, §15.6.5 504).
//!
//! * Connect refused, reset, or an unparsable upstream response: 502. Connect timeout, or no
//!   response head within `upstream_timeout` of the request's last body byte: 504. The
//!   timeout counts from the last progress of the request body, so a long upload is not cut
//!   while it moves.
//! * The client broke off its request body: the upstream request is abandoned; the client
//!   (if still there) gets 400.
//! * Requests go upstream as HTTP/1.1 in origin form, with the client's `Host`. hyper-util
//!   retries a request on a pooled connection only if the connection closed before any of it
//!   was written, which is safe for every method.

use super::body::{
    BodyKind, BoxError, Exchange, FetchedBody, RequestBody, RequestProgress, ResponseBody, UpstreamBody,
};
use super::headers;
use super::static_files::text_response;
use super::{BackendImpl, Limits, Proxy, ProxyError};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(crate) struct Upstream {
    client: Client<HttpConnector, RequestBody>,
    authority: Authority,
    timeout: Duration,
    /// For the request bodies' pace.
    limits: Arc<Limits>,
}

/// The upstream request head's key, from [`Upstream::prepare`].
struct Prepared {
    key: Option<String>,
    /// The key was made by a proxy (this one or, before a takeover, the primary).
    generated: bool,
    /// The key was made just now.
    new_key: bool,
}

/// How forwarding failed, before any response byte came back.
enum Failure {
    /// 502.
    Bad(String),
    /// 504.
    Timeout(String),
    /// The client's own body broke; 400.
    Client(String),
}

impl Upstream {
    pub(crate) fn new(uri: &Uri, limits: &Limits) -> Result<Self, ProxyError> {
        let invalid = |reason| ProxyError::InvalidUpstream { uri: uri.to_string(), reason };
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(invalid("only http:// upstreams are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host"))?;
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(invalid("a path or query is not supported; give http://host:port"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.upstream_connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(limits.pool_idle_timeout)
            .pool_max_idle_per_host(limits.pool_max_idle)
            // A response body is read a buffer ahead of the client at most (see `HYPER_BUFFER`).
            .http1_max_buf_size(super::server::HYPER_BUFFER)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Upstream { client, authority, timeout: limits.upstream_timeout, limits: Arc::new(limits.clone()) })
    }

    /// Forwards one request and hands back the response for the client. `logged_key`: the key
    /// the primary sent upstream for this exchange before a takeover, sent again as it was.
    pub(crate) async fn forward(
        &self,
        req: Request<Incoming>,
        mut ex: Exchange,
        logged_key: Option<LoggedKey>,
    ) -> Response<ResponseBody> {
        let upstream = self.authority.to_string();
        let conn = ex.conn().clone();
        let (mut parts, body) = req.into_parts();

        if parts.method == Method::CONNECT {
            ex.start(Some(upstream), None, false);
            ex.set_error("CONNECT is not supported");
            return ex.respond(text_response(StatusCode::NOT_IMPLEMENTED).map(BodyKind::Static));
        }
        let Some(pq) = origin_form(&parts.uri) else {
            ex.start(Some(upstream), None, false);
            ex.set_error("request target has no path");
            return ex.respond(text_response(StatusCode::BAD_REQUEST).map(BodyKind::Static));
        };
        let prepared = self.prepare(&mut parts, pq, &conn.inner.node, conn.peer.ip(), logged_key);
        let (key, generated) = (prepared.key, prepared.generated);
        if prepared.new_key {
            conn.inner.stats.keys_generated.fetch_add(1, Ordering::Relaxed);
        }
        ex.start(Some(upstream.clone()), key, generated);

        let progress = ex.progress.clone();
        let request = Request::from_parts(parts, RequestBody::new(body, progress.clone(), &self.limits));
        let result = self.send(request, &progress).await;

        let stats = &conn.inner.stats;
        let response = match result {
            Ok(response) => response,
            Err(failure) => {
                let (status, error) = match failure {
                    Failure::Bad(e) => {
                        stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                        (StatusCode::BAD_GATEWAY, e)
                    }
                    Failure::Timeout(e) => {
                        stats.upstream_timeouts.fetch_add(1, Ordering::Relaxed);
                        (StatusCode::GATEWAY_TIMEOUT, e)
                    }
                    Failure::Client(e) if progress.too_slow() => return super::server::body_too_slow(ex, e),
                    Failure::Client(e) => (StatusCode::BAD_REQUEST, e),
                };
                tracing::warn!(conn = %conn.peer, exchange = ex.id, %upstream, %status, %error, "upstream request failed");
                ex.set_error(error);
                // An unread request body is hyper's to drain or, failing that, to close on.
                return ex.respond(text_response(status).map(BodyKind::Static));
            }
        };

        let (mut parts, body) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        headers::append_via(&mut parts.headers, parts.version, &conn.inner.node);
        parts.version = Version::HTTP_11;
        conn.observer.on_upstream_head(ex.id, &parts);
        ex.respond(Response::from_parts(parts, BodyKind::Upstream(UpstreamBody::new(body, self.timeout))))
    }

    /// Turns the client's request head into the upstream's: origin form, HTTP/1.1, hop-by-hop
    /// fields and `Expect` removed, the `Idempotency-Key` (the client's, the logged one, or a
    /// new one), `Via` and `X-Forwarded-For`.
    fn prepare(
        &self,
        parts: &mut http::request::Parts,
        pq: PathAndQuery,
        node: &str,
        client: IpAddr,
        logged_key: Option<LoggedKey>,
    ) -> Prepared {
        parts.uri = upstream_uri(&self.authority, pq);
        let received = parts.version;
        parts.version = Version::HTTP_11;
        headers::remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::EXPECT);
        let mut new_key = false;
        let (key, generated) = if headers::is_idempotent(&parts.method) {
            (None, false)
        } else if let Some(own) = parts.headers.get(&headers::IDEMPOTENCY_KEY) {
            (Some(String::from_utf8_lossy(own.as_bytes()).into_owned()), false)
        } else {
            let (key, generated) = match logged_key {
                Some(logged) => (logged.key, logged.generated),
                None => {
                    new_key = true;
                    (headers::generate_idempotency_key(), true)
                }
            };
            match HeaderValue::from_str(&key) {
                Ok(value) => {
                    parts.headers.insert(headers::IDEMPOTENCY_KEY.clone(), value);
                    (Some(key), generated)
                }
                Err(_) => {
                    // A logged key came from a header value or from the generator: cannot happen.
                    tracing::error!(key, "idempotency key is not a header value; sent without one");
                    (None, false)
                }
            }
        };
        headers::append_via(&mut parts.headers, received, node);
        headers::append_forwarded_for(&mut parts.headers, client);
        Prepared { key, generated, new_key }
    }

    /// Sends `request` and waits for the response head, for at most `timeout` after the request
    /// body's last progress.
    async fn send(
        &self,
        request: Request<RequestBody>,
        progress: &RequestProgress,
    ) -> Result<Response<Incoming>, Failure> {
        let sent = self.client.request(request);
        tokio::pin!(sent);
        loop {
            let deadline = progress.last_progress() + self.timeout;
            tokio::select! {
                r = &mut sent => break r.map_err(|e| classify(&e, progress.client_error())),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if progress.last_progress() + self.timeout <= std::time::Instant::now() {
                        break Err(Failure::Timeout(format!("no response head within {:?}", self.timeout)));
                    }
                }
            }
        }
    }

    /// The upstream's answer to a request a takeover re-issues (see [`Proxy::refetch`]).
    async fn refetch(&self, node: &str, r: Refetch) -> Result<Refetched, RefetchError> {
        let upstream = self.authority.to_string();
        let Refetch { peer, exchange, head: mut parts, body, idempotency_key, range } = r;
        let target = parts.uri.to_string();
        let pq = origin_form(&parts.uri).ok_or(RefetchError::BadTarget(target))?;
        let key = self.prepare(&mut parts, pq, node, peer.ip(), idempotency_key).key;
        if let Some(range) = &range {
            range.apply(&mut parts.headers)?;
        }
        tracing::info!(conn = %peer, exchange, %upstream, method = %parts.method, target = %parts.uri,
            range = ?range.as_ref().map(|r| r.from), key = ?key, "re-issuing a request to continue its response");
        let progress = Arc::new(RequestProgress::new(std::time::Instant::now()));
        let request = Request::from_parts(parts, RequestBody::resumed(body, progress.clone(), &self.limits));
        match self.send(request, &progress).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let body = FetchedBody::new(BodyKind::Upstream(UpstreamBody::new(body, self.timeout)));
                Ok(Refetched { response: Response::from_parts(parts, body), upstream: Some(upstream) })
            }
            Err(Failure::Timeout(reason)) => Err(RefetchError::Timeout { upstream, reason }),
            Err(Failure::Bad(reason) | Failure::Client(reason)) => Err(RefetchError::Upstream { upstream, reason }),
        }
    }
}

/// The origin form (path and query) of a request target.
fn origin_form(uri: &Uri) -> Option<PathAndQuery> {
    uri.path_and_query().filter(|pq| pq.as_str().starts_with('/')).cloned()
}

/// The `Idempotency-Key` the primary sent upstream for an exchange, as its replica logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedKey {
    pub key: String,
    /// The primary generated it (the client sent none).
    pub generated: bool,
}

/// `Range: bytes=<from>-` guarded by `If-Range: <if_range>` (RFC 9110 §14.2, §13.1.5): the rest of
/// the representation from `from` on, or all of it (200) if it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeFrom {
    pub from: u64,
    /// A strong entity tag or an HTTP date.
    pub if_range: String,
}

impl RangeFrom {
    fn apply(&self, headers: &mut http::HeaderMap) -> Result<(), RefetchError> {
        let if_range =
            HeaderValue::from_str(&self.if_range).map_err(|_| RefetchError::BadValidator(self.if_range.clone()))?;
        let range = HeaderValue::from_str(&format!("bytes={}-", self.from)).expect("digits are a header value");
        headers.insert(header::RANGE, range);
        headers.insert(header::IF_RANGE, if_range);
        Ok(())
    }
}

/// A request a takeover re-issues to finish a response the client already partly received:
/// the client's own request, read again from the restored connection's receive queue.
pub struct Refetch {
    /// The client's address (`X-Forwarded-For`, logs).
    pub peer: SocketAddr,
    /// The exchange's number on its connection (logs).
    pub exchange: u64,
    /// The request head as the client sent it.
    pub head: http::request::Parts,
    /// The request body as the client sent it (de-chunked).
    pub body: BoxBody<Bytes, BoxError>,
    /// The key the primary sent upstream, sent again as it was.
    pub idempotency_key: Option<LoggedKey>,
    /// Ask for the rest only, if the representation is unchanged.
    pub range: Option<RangeFrom>,
}

/// The backend's answer to a [`Refetch`].
pub struct Refetched {
    /// Status and fields as the backend sent them (nothing removed or added); the body decoded.
    pub response: Response<FetchedBody>,
    /// The upstream asked (`host:port`); `None` for the static file server.
    pub upstream: Option<String>,
}

/// Why a [`Refetch`] got no response head.
#[derive(Debug, thiserror::Error)]
pub enum RefetchError {
    /// The request target is not in origin form.
    #[error("request target {0:?} has no path")]
    BadTarget(String),
    /// The `If-Range` validator cannot be sent as a header value.
    #[error("validator {0:?} is not a valid header value")]
    BadValidator(String),
    /// The upstream could not be reached or answered with something that is not HTTP.
    #[error("upstream {upstream}: {reason}")]
    Upstream { upstream: String, reason: String },
    /// No response head within the upstream timeout (or the connect timed out).
    #[error("upstream {upstream} timed out: {reason}")]
    Timeout { upstream: String, reason: String },
}

impl Proxy {
    /// Re-issues a request to whatever this node serves from (the upstream, or the static
    /// file server), to continue a response a takeover found partly sent. Nothing is logged
    /// or observed: the caller accounts for the exchange.
    pub async fn refetch(&self, r: Refetch) -> Result<Refetched, RefetchError> {
        let inner = &self.inner;
        match &inner.backend {
            BackendImpl::Upstream(upstream) => upstream.refetch(&inner.node, r).await,
            BackendImpl::Static(files) => {
                let Refetch { head: mut parts, range, .. } = r;
                if let Some(range) = &range {
                    range.apply(&mut parts.headers)?;
                }
                let uri = &parts.uri;
                let response = files.serve(&parts.method, uri.path(), uri.query(), &parts.headers).await;
                Ok(Refetched { response: response.map(|b| FetchedBody::new(BodyKind::Static(b))), upstream: None })
            }
        }
    }
}

fn upstream_uri(authority: &Authority, pq: PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).expect("scheme, authority and an absolute path make a valid URI")
}

fn classify(e: &hyper_util::client::legacy::Error, client_error: Option<String>) -> Failure {
    if let Some(client) = client_error {
        return Failure::Client(format!("client request body: {client}"));
    }
    let mut chain = String::new();
    let mut timed_out = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&err.to_string());
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = err.source();
    }
    if e.is_connect() && timed_out { Failure::Timeout(chain) } else { Failure::Bad(chain) }
}
