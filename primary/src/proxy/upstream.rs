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

use super::body::{BodyKind, Exchange, RequestBody, ResponseBody, UpstreamBody};
use super::headers;
use super::static_files::text_response;
use super::{Limits, ProxyError};
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(crate) struct Upstream {
    client: Client<HttpConnector, RequestBody>,
    authority: Authority,
    timeout: Duration,
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
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Upstream { client, authority, timeout: limits.upstream_timeout })
    }

    /// Forwards one request and hands back the response for the client.
    pub(crate) async fn forward(&self, req: Request<Incoming>, mut ex: Exchange) -> Response<ResponseBody> {
        let upstream = self.authority.to_string();
        let conn = ex.conn().clone();
        let (mut parts, body) = req.into_parts();

        if parts.method == Method::CONNECT {
            ex.start(Some(upstream), None, false);
            ex.set_error("CONNECT is not supported");
            return ex.respond(text_response(StatusCode::NOT_IMPLEMENTED).map(BodyKind::Static));
        }
        let Some(pq) = parts.uri.path_and_query().filter(|pq| pq.as_str().starts_with('/')).cloned() else {
            ex.start(Some(upstream), None, false);
            ex.set_error("request target has no path");
            return ex.respond(text_response(StatusCode::BAD_REQUEST).map(BodyKind::Static));
        };
        parts.uri = upstream_uri(&self.authority, pq);

        let received = parts.version;
        parts.version = Version::HTTP_11;
        headers::remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::EXPECT);
        let (key, generated) = if headers::is_idempotent(&parts.method) {
            (None, false)
        } else if let Some(own) = parts.headers.get(&headers::IDEMPOTENCY_KEY) {
            (Some(String::from_utf8_lossy(own.as_bytes()).into_owned()), false)
        } else {
            let key = headers::generate_idempotency_key();
            let value = HeaderValue::from_str(&key).expect("a generated key is a valid header value");
            parts.headers.insert(headers::IDEMPOTENCY_KEY.clone(), value);
            conn.inner.stats.keys_generated.fetch_add(1, Ordering::Relaxed);
            (Some(key), true)
        };
        headers::append_via(&mut parts.headers, received, &conn.inner.node);
        headers::append_forwarded_for(&mut parts.headers, conn.peer.ip());
        ex.start(Some(upstream.clone()), key, generated);

        let progress = ex.progress.clone();
        let request = Request::from_parts(parts, RequestBody::new(body, progress.clone()));
        let sent = self.client.request(request);
        tokio::pin!(sent);
        let result = loop {
            let deadline = progress.last_progress() + self.timeout;
            tokio::select! {
                r = &mut sent => break r.map_err(|e| classify(&e, progress.client_error())),
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if progress.last_progress() + self.timeout <= std::time::Instant::now() {
                        break Err(Failure::Timeout(format!("no response head within {:?}", self.timeout)));
                    }
                }
            }
        };

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
