//! The admin HTTP server (hyper 1, HTTP/1.1) and its bearer-token check.
//!
//! Routes: `GET /status` (JSON), `GET /metrics` (exposition 0.0.4), `GET /healthz`; `HEAD`
//! too (hyper sends the head without the body); `POST /admin/switchover` (planned switchover, on a
//! primary: answers once the backup took over, or says why not). Anything else is 404, a known path
//! with another method 405 with `Allow`.
//!
//! Access (RFC 6750 §2.1, RFC 9110 §11.6.1): on a loopback address the endpoint is open
//! unless a token is configured; on any other address a token is required and `serve`
//! refuses to start without one. With a token, every route except `/healthz` (which tells
//! nothing but "up") needs `Authorization: Bearer <token>`, else 401 with
//! `WWW-Authenticate: Bearer`. The check runs before routing, so an unauthorised caller
//! cannot probe which paths exist.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections (more are closed on accept), request
//! heads of at most [`MAX_HEAD_BYTES`], and [`HEAD_TIMEOUT`] to send a head, which also
//! closes idle keep-alive connections. Bodies sent with a request are ignored.

use super::expo;
use super::state::AdminState;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Longest wait for a node's answer to a switchover request (the node bounds its own steps well below).
pub const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent admin connections; a scraper and a few operators need far fewer.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head accepted (hyper answers 431 above it).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time a client has to send a request head, and the idle limit between requests.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// After the shutdown signal, how long requests in progress may take to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the admin endpoint's access settings are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    /// The address is reachable from other hosts and no token was configured.
    #[error("admin endpoint on {addr} is not a loopback address: configure an admin token")]
    TokenRequired { addr: SocketAddr },
    /// The token is empty or has characters a bearer token cannot carry.
    #[error("admin token: {reason}")]
    InvalidToken { reason: &'static str },
}

/// Why the admin server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener's own address could not be read.
    #[error("admin listener address: {0}")]
    LocalAddr(#[source] std::io::Error),
    /// The access settings are refused.
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
}

/// Why a request was not authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    /// No `Authorization` header.
    #[error("missing bearer token")]
    Missing,
    /// More than one `Authorization` header, or not `Bearer <token>`.
    #[error("malformed Authorization header")]
    Malformed,
    /// A bearer token that is not the configured one.
    #[error("invalid bearer token")]
    Invalid,
}

/// Who may use the admin endpoint.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the token.
        f.debug_struct("AdminAuth").field("token", &self.token.as_ref().map(|_| "<set>")).finish()
    }
}

impl AdminAuth {
    /// Access for an endpoint listening on `listen`: `token` is required unless the address
    /// is loopback, and enforced whenever given.
    pub fn new(listen: SocketAddr, token: Option<&str>) -> Result<Self, AuthConfigError> {
        match token {
            None if listen.ip().is_loopback() => Ok(AdminAuth { token: None }),
            None => Err(AuthConfigError::TokenRequired { addr: listen }),
            Some(t) => {
                validate_token(t)?;
                Ok(AdminAuth { token: Some(t.as_bytes().into()) })
            }
        }
    }

    /// Whether a token is enforced.
    pub fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    /// Checks a request's headers.
    pub fn authorise(&self, headers: &HeaderMap) -> Result<(), Unauthorized> {
        let Some(expected) = &self.token else { return Ok(()) };
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values.next().ok_or(Unauthorized::Missing)?;
        if values.next().is_some() {
            return Err(Unauthorized::Malformed);
        }
        let value = value.as_bytes();
        let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ').ok_or(Unauthorized::Malformed)?);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return Err(Unauthorized::Malformed);
        }
        let presented = rest.trim_ascii();
        if presented.is_empty() || presented.contains(&b' ') {
            return Err(Unauthorized::Malformed);
        }
        if constant_time_eq(presented, expected) { Ok(()) } else { Err(Unauthorized::Invalid) }
    }
}

/// Largest token file read (a token is a line; a wrong path must not be read whole).
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// Why an admin token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("{} may be read by other users (mode {mode:o}): make it readable by its owner (and group) only", path.display())]
    Exposed { path: std::path::PathBuf, mode: u32 },
    #[error("{}: longer than {MAX_TOKEN_FILE_BYTES} bytes; a token is one line", path.display())]
    TooLong { path: std::path::PathBuf },
    #[error("{}: {source}", path.display())]
    Format { path: std::path::PathBuf, source: AuthConfigError },
}

/// Reads the admin endpoint's bearer token from `path`: one line (surrounding white space ignored), in a
/// file other users may not read, as for the replication key.
pub fn load_token(path: &std::path::Path) -> Result<String, TokenFileError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let read = |source| TokenFileError::Read { path: path.to_owned(), source };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mode = file.metadata().map_err(read)?.mode();
    crate::auth::check_mode(mode).map_err(|mode| TokenFileError::Exposed { path: path.to_owned(), mode })?;
    let mut text = String::new();
    file.by_ref().take(MAX_TOKEN_FILE_BYTES + 1).read_to_string(&mut text).map_err(read)?;
    if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(TokenFileError::TooLong { path: path.to_owned() });
    }
    let token = text.trim();
    validate_token(token).map_err(|source| TokenFileError::Format { path: path.to_owned(), source })?;
    Ok(token.to_owned())
}

/// RFC 6750 `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn validate_token(t: &str) -> Result<(), AuthConfigError> {
    let body = t.trim_end_matches('=');
    if body.is_empty() {
        return Err(AuthConfigError::InvalidToken { reason: "empty" });
    }
    if !body.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)) {
        return Err(AuthConfigError::InvalidToken {
            reason: "only letters, digits and - . _ ~ + / (then optional trailing =) are allowed",
        });
    }
    Ok(())
}

/// Compares without stopping at the first difference, so the time taken does not tell an
/// attacker how much of a guess was right (the length may leak; it is not the secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the admin endpoint on `listener` until `shutdown` completes, then lets requests
/// in progress finish (for up to [`SHUTDOWN_GRACE`]) and returns.
///
/// Checks the access settings first (see [`AdminAuth::new`]): the error comes back before
/// anything is served. Accept errors (out of file descriptors) are logged and retried;
/// the future itself never fails.
pub fn serve(
    listener: TcpListener,
    state: AdminState,
    token: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = ()> + Send + 'static, ServeError> {
    let addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let auth = AdminAuth::new(addr, token)?;
    Ok(run(listener, addr, Arc::new(Ctx { state, auth }), shutdown))
}

struct Ctx {
    state: AdminState,
    auth: AdminAuth,
}

async fn run(listener: TcpListener, addr: SocketAddr, ctx: Arc<Ctx>, shutdown: impl Future<Output = ()> + Send) {
    tracing::info!(%addr, token = ctx.auth.requires_token(), "admin endpoint listening");
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => log_join(done),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
                        conns.spawn(async move {
                            connection(stream, peer, ctx, stop).await;
                            drop(slot);
                        });
                    }
                    Err(_) => tracing::warn!(%peer, limit = MAX_CONNECTIONS, "admin connection refused: too many"),
                },
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "admin accept failed");
                    // EMFILE and friends: give descriptors a moment to come back.
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(done) = conns.join_next().await {
            log_join(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(%addr, left = conns.len(), "admin connections still open after the grace period; closing them");
        conns.shutdown().await;
    }
    tracing::info!(%addr, "admin endpoint stopped");
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "admin connection task failed");
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let service = service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move {
            let response = match route(req.uri().path()) {
                Some(Route::Switchover)
                    if req.method() == Method::POST && ctx.auth.authorise(req.headers()).is_ok() =>
                {
                    switchover(&ctx.state).await
                }
                _ => handle(&ctx, &req),
            };
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT).max_buf_size(MAX_HEAD_BYTES).keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stopping = async {
        // An error means the server is gone, which is a stop too.
        let _ = stop.wait_for(|&s| s).await;
    };
    let finished = tokio::select! {
        r = conn.as_mut() => Some(r),
        () = stopping => None,
    };
    let result = match finished {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Bad requests, timeouts and resets end up here; hyper already answered what it could.
        tracing::debug!(%peer, error = %e, "admin connection ended");
    }
}

/// The known routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Status,
    Metrics,
    Healthz,
    Switchover,
}

fn route(path: &str) -> Option<Route> {
    match path {
        "/status" => Some(Route::Status),
        "/metrics" => Some(Route::Metrics),
        "/healthz" => Some(Route::Healthz),
        "/admin/switchover" => Some(Route::Switchover),
        _ => None,
    }
}

fn handle<B>(ctx: &Ctx, req: &Request<B>) -> Response<Full<Bytes>> {
    let route = route(req.uri().path());
    if route != Some(Route::Healthz)
        && let Err(why) = ctx.auth.authorise(req.headers())
    {
        tracing::debug!(path = req.uri().path(), %why, "admin request refused");
        let challenge = match why {
            Unauthorized::Missing => "Bearer realm=\"understudy\"",
            Unauthorized::Malformed => "Bearer realm=\"understudy\", error=\"invalid_request\"",
            Unauthorized::Invalid => "Bearer realm=\"understudy\", error=\"invalid_token\"",
        };
        let mut resp = text(StatusCode::UNAUTHORIZED, format!("{why}\n"));
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        return resp;
    }
    let Some(route) = route else {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    };
    if route == Route::Switchover {
        // POST is answered by `switchover` before this; anything else lands here.
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed here\n", req.method()));
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed here\n", req.method()));
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let now = Instant::now();
    match route {
        Route::Switchover => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into()),
        Route::Healthz => text(StatusCode::OK, "ok\n".into()),
        Route::Metrics => respond(StatusCode::OK, expo::CONTENT_TYPE, ctx.state.render_metrics(now).into()),
        Route::Status => match serde_json::to_vec_pretty(&ctx.state.status(now)) {
            Ok(mut body) => {
                body.push(b'\n');
                respond(StatusCode::OK, "application/json", body.into())
            }
            Err(e) => {
                tracing::error!(error = %e, "admin status did not serialise");
                text(StatusCode::INTERNAL_SERVER_ERROR, "status unavailable\n".into())
            }
        },
    }
}

/// `POST /admin/switchover`: hands the request to the node and answers with what it says.
async fn switchover(state: &AdminState) -> Response<Full<Bytes>> {
    let json = |status: StatusCode, body: serde_json::Value| {
        let mut body = serde_json::to_vec_pretty(&body).unwrap_or_default();
        body.push(b'\n');
        respond(status, "application/json", body.into())
    };
    let Some(answer) = state.request_switchover() else {
        let role = crate::config::role_name(state.role());
        let error = format!("this node ({role}) cannot hand over: only a serving primary with a connected backup can");
        return json(StatusCode::CONFLICT, serde_json::json!({ "error": error }));
    };
    match tokio::time::timeout(SWITCHOVER_TIMEOUT, answer).await {
        Ok(Ok((status, body))) => json(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body),
        Ok(Err(_)) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "error": "the node stopped before answering the switchover request" }),
        ),
        Err(_) => json(
            StatusCode::GATEWAY_TIMEOUT,
            serde_json::json!({ "error": format!("no answer from the node within {SWITCHOVER_TIMEOUT:?}") }),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.into())
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Role;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(v).expect("test header value"));
        }
        h
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn loopback_without_token_is_open() {
        for a in ["127.0.0.1:9900", "127.0.0.2:9900", "[::1]:9900"] {
            let auth = AdminAuth::new(addr(a), None).expect(a);
            assert!(!auth.requires_token());
            assert_eq!(auth.authorise(&headers(&[])), Ok(()));
        }
    }

    #[test]
    fn non_loopback_without_token_is_refused() {
        for a in ["0.0.0.0:9900", "10.1.0.2:9900", "[::]:9900"] {
            assert_eq!(
                AdminAuth::new(addr(a), None).unwrap_err(),
                AuthConfigError::TokenRequired { addr: addr(a) },
                "{a}"
            );
        }
    }

    #[test]
    fn non_loopback_with_token_requires_exact_bearer() {
        let auth = AdminAuth::new(addr("10.1.0.2:9900"), Some("s3cr3t-Token_1")).expect("valid token");
        assert!(auth.requires_token());
        assert_eq!(auth.authorise(&headers(&[])), Err(Unauthorized::Missing));
        assert_eq!(auth.authorise(&headers(&["Bearer s3cr3t-Token_1"])), Ok(()));
        assert_eq!(auth.authorise(&headers(&["bearer   s3cr3t-Token_1 "])), Ok(()));
        assert_eq!(auth.authorise(&headers(&["Bearer s3cr3t-Token_2"])), Err(Unauthorized::Invalid));
        assert_eq!(auth.authorise(&headers(&["Bearer s3cr3t-Token_"])), Err(Unauthorized::Invalid));
        assert_eq!(auth.authorise(&headers(&["Basic czNjcjN0"])), Err(Unauthorized::Malformed));
        assert_eq!(auth.authorise(&headers(&["Bearer"])), Err(Unauthorized::Malformed));
        assert_eq!(auth.authorise(&headers(&["Bearer "])), Err(Unauthorized::Malformed));
        assert_eq!(auth.authorise(&headers(&["Bearer a b"])), Err(Unauthorized::Malformed));
        assert_eq!(
            auth.authorise(&headers(&["Bearer s3cr3t-Token_1", "Bearer s3cr3t-Token_1"])),
            Err(Unauthorized::Malformed)
        );
    }

    #[test]
    fn bad_tokens_are_refused_at_configuration() {
        let a = addr("10.1.0.2:9900");
        assert_eq!(AdminAuth::new(a, Some("")).unwrap_err(), AuthConfigError::InvalidToken { reason: "empty" });
        assert_eq!(AdminAuth::new(a, Some("==")).unwrap_err(), AuthConfigError::InvalidToken { reason: "empty" });
        assert!(matches!(AdminAuth::new(a, Some("has space")), Err(AuthConfigError::InvalidToken { .. })));
        assert!(matches!(AdminAuth::new(a, Some("naïve")), Err(AuthConfigError::InvalidToken { .. })));
        assert!(AdminAuth::new(a, Some("YWJj+/==")).is_ok());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let auth = AdminAuth::new(addr("127.0.0.1:1"), Some("hunter2")).expect("valid token");
        assert!(!format!("{auth:?}").contains("hunter2"));
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_405_after_auth() {
        let ctx = Ctx {
            state: AdminState::new("n", "c", Role::Backup, 1, Instant::now()),
            auth: AdminAuth::new(addr("127.0.0.1:1"), Some("t")).expect("valid token"),
        };
        let req = |m: Method, p: &str, tok: Option<&str>| {
            let mut b = Request::builder().method(m).uri(p);
            if let Some(t) = tok {
                b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            b.body(()).expect("test request")
        };
        assert_eq!(handle(&ctx, &req(Method::GET, "/nope", None)).status(), StatusCode::UNAUTHORIZED);
        assert_eq!(handle(&ctx, &req(Method::GET, "/nope", Some("t"))).status(), StatusCode::NOT_FOUND);
        assert_eq!(handle(&ctx, &req(Method::GET, "/healthz", None)).status(), StatusCode::OK);
        let r = handle(&ctx, &req(Method::DELETE, "/status", Some("t")));
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
        let r = handle(&ctx, &req(Method::GET, "/admin/switchover", Some("t")));
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "POST");
        assert_eq!(handle(&ctx, &req(Method::POST, "/admin/switchover", None)).status(), StatusCode::UNAUTHORIZED);
    }
}
