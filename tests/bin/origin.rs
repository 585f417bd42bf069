//! `us-origin`: the test origin of the pair's exchange tests (`tests/pair_exchanges.rs`), in place of
//! nginx where a test needs an origin that is slow on purpose, deduplicates by key, or streams chunked.
//!
//! Routes (bodies are `understudy_tests::pattern` bytes of `key`, default 0):
//! * `GET /file?len=L&key=K` — L bytes with a Content-Length.
//! * `GET /slow?ms=N&len=L&key=K` — the same after N ms.
//! * `GET /chunked?len=L&chunk=C&rate=R&key=K` — L bytes with `Transfer-Encoding: chunked` (no
//!   Content-Length), one chunk of C bytes at a time, paced at R bytes/s (0: unpaced).
//! * `POST` any target (`?ms=N`): executes once per `Idempotency-Key` (RFC draft
//!   "The Idempotency-Key HTTP Header Field"): the first request with a key runs (N ms, in a task of
//!   its own, so a client that goes away does not cancel it); a repeat with the same key, even while
//!   the first still runs, gets the stored response and does not run again. Without a key every POST
//!   runs. The response is JSON naming the execution.
//!
//! Every request that arrives complete gets one line in the `--log` file (JSON lines: `method`,
//! `target`, `key`, `outcome` = "executed" | "deduplicated", `execution`, `conn`, `bytes_in`, for a POST
//! the `sha256` of its body, `ms` since start), appended with one write each, so tests count executions while it runs. Every
//! response echoes its request target in `x-request-target`, so a pipelining client can check order.

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use understudy_tests::pattern;

#[derive(Parser)]
#[command(name = "us-origin", about = "Test origin: slow, deduplicating and chunked responses")]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "10.2.0.10:8080")]
    listen: SocketAddr,
    /// JSON-lines file recording every request that arrived complete.
    #[arg(long)]
    log: PathBuf,
}

type Resp = Response<BoxBody<Bytes, Infallible>>;

/// A stored POST response, shared by an execution and its deduplicated repeats.
#[derive(Clone)]
struct Stored {
    status: StatusCode,
    body: Bytes,
}

/// An execution's number, and its response (`None` while it runs).
type Execution = (u64, watch::Receiver<Option<Stored>>);

struct Origin {
    log: Mutex<File>,
    started: Instant,
    executions: AtomicU64,
    /// Executions by Idempotency-Key.
    keys: Mutex<HashMap<String, Execution>>,
}

impl Origin {
    fn record(&self, line: serde_json::Value) {
        let mut text = line.to_string();
        text.push('\n');
        // One write(2) on an O_APPEND file: lines never interleave.
        let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(text.as_bytes()) {
            eprintln!("us-origin: writing the log: {e}");
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cli.log)
        .with_context(|| format!("opening {}", cli.log.display()))?;
    let origin = Arc::new(Origin {
        log: Mutex::new(log),
        started: Instant::now(),
        executions: AtomicU64::new(0),
        keys: Mutex::new(HashMap::new()),
    });
    let listener = TcpListener::bind(cli.listen).await.with_context(|| format!("binding {}", cli.listen))?;
    println!("us-origin listening on {}", cli.listen);
    loop {
        let (stream, peer) = listener.accept().await.context("accept")?;
        let origin = origin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(origin.clone(), peer, req));
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                eprintln!("us-origin: connection {peer}: {e}");
            }
        });
    }
}

/// The query parameter `name` as a number.
fn param(query: &str, name: &str) -> Option<u64> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).and_then(|(_, v)| v.parse().ok())
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

async fn handle(origin: Arc<Origin>, peer: SocketAddr, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let target = req.uri().path_and_query().map_or("/".to_string(), |p| p.as_str().to_string());
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (_, body) = req.into_parts();
    // The request counts only once it arrived whole.
    let (bytes_in, sha256) = match body.collect().await {
        Ok(b) => {
            let b = b.to_bytes();
            (b.len(), hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&b)))
        }
        Err(e) => {
            eprintln!("us-origin: {method} {target} from {peer}: request body: {e}");
            return Ok(full(StatusCode::BAD_REQUEST, "request body failed\n"));
        }
    };
    let ms = param(&query, "ms").unwrap_or(0);
    let mut resp = if method == Method::POST {
        post(&origin, peer, &target, key, (bytes_in, &sha256), ms).await
    } else {
        let line = |execution: u64| {
            serde_json::json!({
                "method": method.as_str(), "target": target, "key": key, "outcome": "executed",
                "execution": execution, "conn": peer.to_string(), "bytes_in": bytes_in,
                "ms": origin.started.elapsed().as_millis() as u64,
            })
        };
        origin.record(line(origin.executions.fetch_add(1, Ordering::Relaxed) + 1));
        get(&path, &query, ms).await
    };
    if let Ok(v) = header::HeaderValue::from_str(&target) {
        resp.headers_mut().insert("x-request-target", v);
    }
    Ok(resp)
}

async fn get(path: &str, query: &str, ms: u64) -> Resp {
    let len = param(query, "len").unwrap_or(0);
    let key = param(query, "key").unwrap_or(0);
    match path {
        "/file" | "/slow" => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut r = Response::new(PatternBody::start(key, len, 64 * 1024, 0, true).boxed());
            r.headers_mut().insert(header::CONTENT_LENGTH, len.into());
            r
        }
        "/chunked" => {
            let chunk = param(query, "chunk").unwrap_or(64 * 1024).max(1);
            let rate = param(query, "rate").unwrap_or(0);
            // No exact size hint: hyper then frames the body as chunked, one chunk per frame.
            Response::new(PatternBody::start(key, len, chunk, rate, false).boxed())
        }
        _ => full(StatusCode::NOT_FOUND, "no such route\n"),
    }
}

async fn post(
    origin: &Arc<Origin>,
    peer: SocketAddr,
    target: &str,
    key: Option<String>,
    (bytes_in, sha256): (usize, &str),
    ms: u64,
) -> Resp {
    let (mut rx, execution, outcome) = {
        let mut keys = origin.keys.lock().unwrap_or_else(|p| p.into_inner());
        match key.as_ref().and_then(|k| keys.get(k)) {
            Some((execution, rx)) => (rx.clone(), *execution, "deduplicated"),
            None => {
                let (tx, rx) = watch::channel(None);
                let execution = origin.executions.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(k) = &key {
                    keys.insert(k.clone(), (execution, rx.clone()));
                }
                let body = serde_json::json!({
                    "execution": execution, "key": key, "target": target, "bytes_in": bytes_in,
                })
                .to_string();
                // Its own task: the execution completes even if the client leaves.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = tx.send(Some(Stored { status: StatusCode::OK, body: Bytes::from(body + "\n") }));
                });
                (rx, execution, "executed")
            }
        }
    };
    // Recorded on arrival, so a test can fail the proxy while the execution runs.
    origin.record(serde_json::json!({
        "method": "POST", "target": target, "key": key, "outcome": outcome, "execution": execution,
        "conn": peer.to_string(), "bytes_in": bytes_in, "sha256": sha256,
        "ms": origin.started.elapsed().as_millis() as u64,
    }));
    let stored = match rx.wait_for(Option::is_some).await {
        Ok(s) => s.clone(),
        Err(_) => None,
    };
    match stored {
        Some(s) => full(s.status, s.body),
        None => full(StatusCode::INTERNAL_SERVER_ERROR, "execution lost\n"),
    }
}

/// A body of pattern bytes fed by a generator task, one frame per piece.
struct PatternBody {
    rx: mpsc::Receiver<Bytes>,
    len: u64,
    exact: bool,
}

impl PatternBody {
    fn start(key: u64, len: u64, piece: u64, rate: u64, exact: bool) -> PatternBody {
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut off = 0u64;
            while off < len {
                if rate > 0 {
                    // Piece i goes out when the rate allows its first byte.
                    tokio::time::sleep_until(started + Duration::from_secs_f64(off as f64 / rate as f64)).await;
                }
                let n = piece.min(len - off) as usize;
                let mut buf = vec![0u8; n];
                pattern::fill(key, off, &mut buf);
                if tx.send(Bytes::from(buf)).await.is_err() {
                    return; // the connection went away
                }
                off += n as u64;
            }
        });
        PatternBody { rx, len, exact }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact { SizeHint::with_exact(self.len) } else { SizeHint::default() }
    }
}
