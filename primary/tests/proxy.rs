//! The proxy and the static file server against real clients and real origins.
//!
//! Clients: curl, and raw `TcpStream`s where curl cannot do it (pipelining, slow heads,
//! 100-continue step by step, malformed requests). Origins: nginx (downloads, keep-alive,
//! pipelining; run on a loopback port with its own config in a temp dir, ended by PID) and a
//! small hyper origin in this process for what nginx cannot show: it hashes request bodies as
//! they stream in and echoes the headers it received (uploads, hop-by-hop stripping,
//! `Idempotency-Key`), streams chunked responses, and answers slowly on request.
//!
//! Needs `nginx` and `curl` (`apt-get install -y nginx curl`). Timings are printed, never
//! asserted. Memory bounds are asserted loosely (a buffered body would exceed them by far).

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use primary::proxy::{
    Backend, ConnectionHooks, ExchangeInfo, ExchangeObserver, ExchangeOutcome, Limits, NoLog, NoObserver, Proxy,
    ProxyConfig, ReplyLog, Unprotected,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use understudy_tests::harness::{free_port, wait_until};
use understudy_tests::hyper_origin;
use understudy_tests::nginx::{Nginx, NginxOptions};
use understudy_tests::tempdir::TempDir;

const NODE: &str = "node-test";
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- fixtures

/// Key of the test content (`understudy_tests::pattern`): files, streamed bodies, uploads.
const CONTENT: u64 = 0x7072_6f78;

/// `len` bytes of the test content.
fn pattern(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    understudy_tests::pattern::fill(CONTENT, 0, &mut data);
    data
}

/// Writes `len` bytes of the test content to `path`; returns their sha256.
fn write_pattern_file(path: &Path, len: u64) -> String {
    understudy_tests::pattern::write_file(path, CONTENT, len).expect("write fixture")
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Resident set size of this process, KiB.
fn rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples RSS every 20 ms until stopped; reports the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib());
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssSampler { stop, thread }
    }
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("rss sampler")
    }
}

// ---------------------------------------------------------------- nginx

/// nginx on a loopback port; its access log: `connection requests-on-connection request-line`.
const NGINX: NginxOptions = NginxOptions {
    worker_connections: 512,
    log_format: Some("$connection $connection_requests $request"),
    http: "keepalive_requests 100000;\n  keepalive_timeout 75s;",
};

// ---------------------------------------------------------------- hyper origin

/// What the hyper origin saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    bytes: u64,
    sha256: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

type OriginBody = BoxBody<Bytes, std::io::Error>;

/// A hyper origin on its own runtime:
/// * `/echo…` (any method): hashes the body as it streams in, answers JSON of what it saw;
/// * `/hop`: answers with hop-by-hop fields the client must not see;
/// * `/stream?n=N`: N pattern bytes without Content-Length (chunked);
/// * `/slow?ms=N`: answers after N ms.
struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    rt: Option<tokio::runtime::Runtime>,
}

fn query_u64(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn origin_service(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<OriginBody>, std::io::Error> {
    let full = |b: Vec<u8>| Full::new(Bytes::from(b)).map_err(|never| match never {}).boxed();
    let path = req.uri().path().to_owned();
    if path == "/hop" {
        let r = Response::builder()
            .header("connection", "x-hop-resp")
            .header("x-hop-resp", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic realm=x")
            .header("x-kept", "yes")
            .body(full(b"hop".to_vec()))
            .expect("response");
        return Ok(r);
    }
    if path == "/stream" {
        let n = query_u64(&req, "n");
        let chunk = 37_000u64;
        let frames = futures_util::stream::iter((0..n.div_ceil(chunk)).map(move |i| {
            let start = i * chunk;
            let mut data = vec![0u8; ((start + chunk).min(n) - start) as usize];
            understudy_tests::pattern::fill(CONTENT, start, &mut data);
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(data)))
        }));
        return Ok(Response::new(StreamBody::new(frames).boxed()));
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(query_u64(&req, "ms"))).await;
        return Ok(Response::new(full(b"slow".to_vec())));
    }
    let method = req.method().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let mut body = req.into_body();
    let mut h = Sha256::new();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(std::io::Error::other)?;
        if let Some(d) = frame.data_ref() {
            h.update(d);
            bytes += d.len() as u64;
        }
    }
    let s = Seen { method, path, headers, bytes, sha256: hex::encode(h.finalize()) };
    let mut map = serde_json::Map::new();
    for (k, v) in &s.headers {
        map.entry(k.clone())
            .or_insert_with(|| serde_json::json!([]))
            .as_array_mut()
            .expect("array")
            .push(v.clone().into());
    }
    let json =
        serde_json::json!({"method": s.method, "path": s.path, "bytes": s.bytes, "sha256": s.sha256, "headers": map});
    seen.lock().expect("seen").push(s);
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(full(json.to_string().into_bytes()))
        .expect("response"))
}

impl Origin {
    fn start() -> Origin {
        let rt = runtime();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let s = Arc::clone(&seen);
        // Shutting the runtime down (on drop) ends the origin's tasks.
        let _in_runtime = rt.enter();
        hyper_origin::serve(listener, move |req| origin_service(req, Arc::clone(&s)));
        Origin { addr, seen, rt: Some(rt) }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

// ---------------------------------------------------------------- the proxy under test

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// A [`Proxy`] running `run` on its own runtime, listening on a loopback port.
struct Served {
    addr: SocketAddr,
    proxy: Proxy,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Served {
    fn start(config: ProxyConfig) -> Served {
        Served::start_with(config, Unprotected)
    }

    fn start_with<H: ConnectionHooks>(config: ProxyConfig, hooks: H) -> Served {
        let rt = runtime();
        let proxy = Proxy::new(config).expect("proxy config");
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let p = proxy.clone();
        let done = rt.spawn(async move {
            p.run(listener, hooks, async {
                let _ = stopped.await;
            })
            .await
        });
        Served { addr, proxy, stop: Some(stop), done: Some(done), rt: Some(rt) }
    }

    /// Resolves the shutdown future given to `run`.
    fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits up to `timeout` for `run` to return.
    fn stopped_within(&mut self, timeout: Duration) -> bool {
        match (self.rt.as_ref(), self.done.take()) {
            (Some(rt), Some(done)) => rt.block_on(async { tokio::time::timeout(timeout, done).await.is_ok() }),
            _ => true,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(rt), Some(done)) = (self.rt.take(), self.done.take()) {
            let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), done).await });
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn config(backend: Backend) -> ProxyConfig {
    ProxyConfig { node: NODE.into(), backend, request_log: None, limits: Limits::default() }
}

fn upstream(addr: SocketAddr) -> Backend {
    Backend::Upstream(format!("http://{addr}").parse().expect("uri"))
}

fn nginx_upstream(nginx: &Nginx) -> Backend {
    upstream(nginx.addr())
}

// ---------------------------------------------------------------- clients

fn curl(args: &[&str]) -> Result<std::process::Output> {
    Command::new("curl")
        .args(["-sS", "--max-time", "120"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running curl (apt-get install -y curl)")
}

/// curl's stdout, failing unless it exits 0.
fn curl_ok(args: &[&str]) -> Result<Vec<u8>> {
    let out = curl(args)?;
    ensure!(out.status.success(), "curl {args:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(out.stdout)
}

/// `curl -D -` split into (status, lower-cased headers, body).
fn curl_full(args: &[&str]) -> Result<(u16, HashMap<String, String>, Vec<u8>)> {
    let mut all = vec!["-D", "/dev/stderr"];
    all.extend_from_slice(args);
    let out = curl(&all)?;
    ensure!(out.status.success(), "curl {args:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let head = String::from_utf8_lossy(&out.stderr).into_owned();
    // The last head is the final response (after any 100 Continue).
    let last = head.trim_end().rsplit("\r\n\r\n").next().unwrap_or("").to_owned();
    let mut lines = last.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, out.stdout))
}

/// Streams curl's body into sha256; returns (sha256, bytes).
fn curl_sha256(url: &str, extra: &[&str]) -> Result<(String, u64)> {
    let mut child = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "300"])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("running curl")?;
    let mut out = child.stdout.take().context("curl stdout")?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0u64;
    loop {
        let k = out.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let status = child.wait()?;
    ensure!(status.success(), "curl {url}: {status}");
    Ok((hex::encode(h.finalize()), n))
}

/// A response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/1.1 client connection with its read buffer.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Result<Raw> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Raw { stream, buf: Vec::new() })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads more bytes; false at EOF.
    fn fill(&mut self) -> Result<bool> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk).context("reading from the proxy")?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    fn need(&mut self, len: usize) -> Result<()> {
        while self.buf.len() < len {
            ensure!(self.fill()?, "connection closed with {} of {len} bytes", self.buf.len());
        }
        Ok(())
    }

    fn line(&mut self) -> Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            ensure!(self.fill()?, "connection closed inside a line");
        }
    }

    /// Reads one response; `head_request` when it answers a HEAD.
    fn response(&mut self, head_request: bool) -> Result<RawResponse> {
        let (status, headers, consumed) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            if let httparse::Status::Complete(n) = r.parse(&self.buf)? {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect::<Vec<_>>();
                break (r.code.unwrap_or(0), headers, n);
            }
            ensure!(self.fill()?, "connection closed inside a response head ({} bytes)", self.buf.len());
        };
        self.buf.drain(..consumed);
        let mut resp = RawResponse { status, headers, body: Vec::new() };
        if head_request || status < 200 || status == 204 || status == 304 {
            return Ok(resp);
        }
        if resp.header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            loop {
                let size_line = self.line()?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)?;
                if size == 0 {
                    while !self.line()?.is_empty() {}
                    return Ok(resp);
                }
                self.need(size + 2)?;
                resp.body.extend_from_slice(&self.buf[..size]);
                ensure!(&self.buf[size..size + 2] == b"\r\n", "chunk not followed by CRLF");
                self.buf.drain(..size + 2);
            }
        }
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.trim().parse()?;
            self.need(len)?;
            resp.body = self.buf.drain(..len).collect();
            return Ok(resp);
        }
        while self.fill()? {}
        resp.body = std::mem::take(&mut self.buf);
        Ok(resp)
    }

    /// True once the peer closed (EOF or reset) within `timeout`; bytes read meanwhile are kept.
    fn closed_within(&mut self, timeout: Duration) -> Result<bool> {
        self.stream.set_read_timeout(Some(timeout))?;
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(true),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
}

// ---------------------------------------------------------------- downloads

#[test]
fn download_200mb_from_nginx_streams_through_proxy_with_matching_sha256_and_bounded_rss() -> Result<()> {
    let files = TempDir::new("dl")?;
    let len = 200 * MIB;
    let sha = write_pattern_file(&files.join("big.bin"), len);
    let nginx = Nginx::start(files.path(), &NGINX)?;
    let proxy = Served::start(config(nginx_upstream(&nginx)));
    let base = rss_kib();
    let sampler = RssSampler::start();
    let t = Instant::now();
    let (got, n) = curl_sha256(&proxy.url("/big.bin"), &[])?;
    let took = t.elapsed();
    let peak = sampler.stop();
    println!(
        "nginx → proxy → curl: {n} bytes in {took:?} ({:.0} MB/s); test process RSS {} MiB before, peak {} MiB",
        n as f64 / took.as_secs_f64() / 1e6,
        base / 1024,
        peak / 1024
    );
    assert_eq!(n, len);
    assert_eq!(got, sha);
    assert!(peak.saturating_sub(base) < 64 * 1024, "RSS grew by {} KiB during a 200 MB download", peak - base);
    Ok(())
}

#[test]
fn download_200mb_from_static_root_streams_with_matching_sha256_and_bounded_rss() -> Result<()> {
    let files = TempDir::new("static-dl")?;
    let len = 200 * MIB;
    let sha = write_pattern_file(&files.join("big.bin"), len);
    let proxy = Served::start(config(Backend::Root(files.path().to_owned())));
    let base = rss_kib();
    let sampler = RssSampler::start();
    let t = Instant::now();
    let (got, n) = curl_sha256(&proxy.url("/big.bin"), &[])?;
    let took = t.elapsed();
    let peak = sampler.stop();
    println!(
        "static root → curl: {n} bytes in {took:?} ({:.0} MB/s); test process RSS {} MiB before, peak {} MiB",
        n as f64 / took.as_secs_f64() / 1e6,
        base / 1024,
        peak / 1024
    );
    assert_eq!((n, got), (len, sha));
    assert!(peak.saturating_sub(base) < 64 * 1024, "RSS grew by {} KiB during a 200 MB download", peak - base);
    Ok(())
}

#[test]
fn chunked_origin_response_reaches_http11_client_chunked_and_http10_client_close_delimited() -> Result<()> {
    let origin = Origin::start();
    let proxy = Served::start(config(upstream(origin.addr)));
    let n = 5_000_003usize;
    let want = sha256_hex(&pattern(n));
    let (status, headers, body) = curl_full(&[&proxy.url(&format!("/stream?n={n}"))])?;
    assert_eq!(status, 200);
    assert_eq!(headers.get("transfer-encoding").map(String::as_str), Some("chunked"));
    assert_eq!(sha256_hex(&body), want);
    let (status, headers, body) = curl_full(&["--http1.0", &proxy.url(&format!("/stream?n={n}"))])?;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("transfer-encoding"), "HTTP/1.0 has no chunked coding: {headers:?}");
    assert_eq!(sha256_hex(&body), want);
    Ok(())
}

// ---------------------------------------------------------------- uploads

#[test]
fn uploads_with_content_length_and_chunked_reach_the_origin_whole_and_streamed() -> Result<()> {
    let files = TempDir::new("up")?;
    let len = 100 * MIB;
    let sha = write_pattern_file(&files.join("up.bin"), len);
    let origin = Origin::start();
    let proxy = Served::start(config(upstream(origin.addr)));
    let file = files.join("up.bin");
    let file = file.to_str().context("path")?;
    for (name, extra) in [("content-length", None), ("chunked", Some("Transfer-Encoding: chunked"))] {
        let mut args = vec!["-T", file, "-X", "POST"];
        if let Some(h) = extra {
            args.extend(["-H", h]);
        }
        let url = proxy.url(&format!("/echo-{name}"));
        args.push(&url);
        let base = rss_kib();
        let sampler = RssSampler::start();
        let t = Instant::now();
        let body = curl_ok(&args)?;
        let took = t.elapsed();
        let peak = sampler.stop();
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        println!(
            "{name} upload: {len} bytes in {took:?} ({:.0} MB/s); RSS {} MiB before, peak {} MiB",
            len as f64 / took.as_secs_f64() / 1e6,
            base / 1024,
            peak / 1024
        );
        assert_eq!(json["bytes"], len, "{json}");
        assert_eq!(json["sha256"], sha.as_str());
        let seen = origin.seen().into_iter().find(|s| s.path == format!("/echo-{name}")).context("origin saw it")?;
        match name {
            "chunked" => {
                assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
                assert_eq!(seen.header("content-length"), None);
            }
            _ => assert_eq!(seen.header("content-length"), Some(len.to_string().as_str())),
        }
        assert_eq!(seen.header("expect"), None, "the proxy answers 100-continue itself");
        assert!(peak.saturating_sub(base) < 64 * 1024, "RSS grew by {} KiB during a 100 MB upload", peak - base);
    }
    Ok(())
}

#[test]
fn expect_100_continue_is_answered_before_the_body_and_not_forwarded() -> Result<()> {
    let origin = Origin::start();
    let proxy = Served::start(config(upstream(origin.addr)));
    let mut c = Raw::connect(proxy.addr)?;
    c.send(b"POST /echo-expect HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")?;
    let interim = c.response(false)?;
    assert_eq!(interim.status, 100, "the client must be told to go on before it sends the body");
    c.send(b"hello world")?;
    let r = c.response(false)?;
    assert_eq!(r.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(json["bytes"], 11);
    assert_eq!(json["headers"].get("expect"), None);

    // With curl, which waits for the 100 before it sends.
    let (status, _, body) =
        curl_full(&["-H", "Expect: 100-continue", "--data-binary", "abc", &proxy.url("/echo-curl")])?;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body)?["bytes"], 3);
    Ok(())
}

// ---------------------------------------------------------------- connections

#[test]
fn keep_alive_client_uses_one_connection_and_the_upstream_pool_reuses_connections() -> Result<()> {
    let files = TempDir::new("ka")?;
    let mut want = Vec::new();
    let mut urls = Vec::new();
    let proxy_files: Vec<String> = (0..10).map(|i| format!("/f{i}.txt")).collect();
    for (i, f) in proxy_files.iter().enumerate() {
        let data = pattern(1000 + i * 7919);
        fs::write(files.join(&f[1..]), &data)?;
        want.extend_from_slice(&data);
    }
    let nginx = Nginx::start(files.path(), &NGINX)?;
    let proxy = Served::start(config(nginx_upstream(&nginx)));
    for f in &proxy_files {
        urls.push(proxy.url(f));
    }
    let mut args = vec!["-w", "%{stderr}%{num_connects} %{http_code}\n"];
    args.extend(urls.iter().map(String::as_str));
    let t = Instant::now();
    let out = curl(&args)?;
    println!("10 keep-alive requests in {:?}", t.elapsed());
    ensure!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let stats = String::from_utf8_lossy(&out.stderr);
    let connects: u32 =
        stats.lines().map(|l| l.split_whitespace().next().unwrap_or("0").parse::<u32>().unwrap_or(0)).sum();
    assert!(stats.lines().all(|l| l.ends_with(" 200")), "{stats}");
    assert_eq!(connects, 1, "curl opened {connects} connections:\n{stats}");
    assert_eq!(out.stdout, want);
    let log = wait_until("nginx to log 10 requests", Duration::from_secs(10), || {
        let l = nginx.access_log();
        Ok((l.len() >= 10).then_some(l))
    })?;
    let upstream_conns: std::collections::HashSet<&str> = log.iter().filter_map(|l| l.split(' ').next()).collect();
    println!("nginx saw {} requests on {} upstream connection(s)", log.len(), upstream_conns.len());
    assert!(upstream_conns.len() < log.len(), "no upstream connection was reused: {log:?}");
    Ok(())
}

#[test]
fn pipelined_burst_of_20_requests_is_answered_in_order() -> Result<()> {
    let files = TempDir::new("pipe")?;
    let bodies: Vec<Vec<u8>> = (0..20).map(|i| pattern(i * 15_013 + i)).collect();
    for (i, b) in bodies.iter().enumerate() {
        fs::write(files.join(format!("p{i}.bin")), b)?;
    }
    let nginx = Nginx::start(files.path(), &NGINX)?;
    let proxy = Served::start(config(nginx_upstream(&nginx)));
    let mut burst = String::new();
    for i in 0..20 {
        let method = if i == 7 { "HEAD" } else { "GET" };
        let path = if i == 13 { "/missing".to_owned() } else { format!("/p{i}.bin") };
        let close = if i == 19 { "Connection: close\r\n" } else { "" };
        burst.push_str(&format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{close}\r\n"));
    }
    let mut c = Raw::connect(proxy.addr)?;
    let t = Instant::now();
    c.send(burst.as_bytes())?;
    for (i, body) in bodies.iter().enumerate() {
        let r = c.response(i == 7)?;
        match i {
            7 => {
                assert_eq!(r.status, 200);
                assert_eq!(r.header("content-length"), Some(body.len().to_string().as_str()));
                assert!(r.body.is_empty());
            }
            13 => assert_eq!(r.status, 404),
            _ => {
                assert_eq!(r.status, 200, "response {i}");
                assert!(r.body == *body, "response {i}: body of {} bytes differs", r.body.len());
            }
        }
    }
    assert!(c.closed_within(Duration::from_secs(10))?, "Connection: close must close");
    assert!(c.buf.is_empty(), "{} stray bytes after 20 responses", c.buf.len());
    println!("20 pipelined responses in {:?}", t.elapsed());
    Ok(())
}

// ---------------------------------------------------------------- header rules

#[test]
fn hop_by_hop_headers_are_stripped_both_ways_and_via_and_forwarded_for_added() -> Result<()> {
    let origin = Origin::start();
    let proxy = Served::start(config(upstream(origin.addr)));
    let body = curl_ok(&[
        "-H",
        "Connection: keep-alive, X-Hop",
        "-H",
        "X-Hop: secret",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
        "-H",
        "Trailer: X-Sum",
        "-H",
        "Upgrade: h2c",
        "-H",
        "Proxy-Authorization: Basic abc",
        "-H",
        "Proxy-Connection: keep-alive",
        "-H",
        "X-Forwarded-For: 10.9.9.9",
        "-H",
        "Via: 1.0 edge",
        "-H",
        "X-End-To-End: kept",
        &proxy.url("/echo-hop"),
    ])?;
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    let h = &json["headers"];
    for gone in ["x-hop", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"] {
        assert!(h.get(gone).is_none(), "origin saw {gone}: {h}");
    }
    if let Some(conn) = h.get("connection") {
        assert!(!conn.to_string().to_ascii_lowercase().contains("x-hop"), "{conn}");
    }
    assert_eq!(h["x-end-to-end"][0], "kept");
    assert_eq!(h["via"][0], format!("1.0 edge, 1.1 {NODE}"));
    assert_eq!(h["x-forwarded-for"][0], "10.9.9.9, 127.0.0.1");
    assert_eq!(h["host"][0], proxy.addr.to_string(), "the client's Host goes upstream");

    let (status, headers, body) = curl_full(&[&proxy.url("/hop")])?;
    assert_eq!((status, body.as_slice()), (200, b"hop".as_slice()));
    for gone in ["x-hop-resp", "keep-alive", "proxy-authenticate"] {
        assert!(!headers.contains_key(gone), "client saw {gone}: {headers:?}");
    }
    assert_eq!(headers.get("x-kept").map(String::as_str), Some("yes"));
    assert_eq!(headers.get("via").map(String::as_str), Some(format!("1.1 {NODE}").as_str()));
    Ok(())
}

#[test]
fn non_idempotent_requests_carry_an_idempotency_key_and_the_request_log_records_it() -> Result<()> {
    let dir = TempDir::new("idem")?;
    let origin = Origin::start();
    let log_path = dir.join("requests.jsonl");
    let mut cfg = config(upstream(origin.addr));
    cfg.request_log = Some(log_path.clone());
    let proxy = Served::start(cfg);
    let key_of = |args: &[&str]| -> Result<Option<String>> {
        let json: serde_json::Value = serde_json::from_slice(&curl_ok(args)?)?;
        Ok(json["headers"].get("idempotency-key").map(|v| v[0].as_str().unwrap_or_default().to_owned()))
    };
    let post1 = key_of(&["-d", "a", &proxy.url("/echo-post1")])?.context("POST without a key got none")?;
    let post2 = key_of(&["-d", "a", &proxy.url("/echo-post2")])?.context("POST without a key got none")?;
    assert_ne!(post1, post2, "generated keys must be unique");
    assert!(post1.starts_with('"') && post1.len() == 38, "{post1}");
    let own = key_of(&["-d", "a", "-H", "Idempotency-Key: client-123", &proxy.url("/echo-own")])?;
    assert_eq!(own.as_deref(), Some("client-123"));
    assert!(key_of(&["-X", "PATCH", "-d", "a", &proxy.url("/echo-patch")])?.is_some());
    assert!(key_of(&["-X", "PROPFIND", &proxy.url("/echo-propfind")])?.is_some());
    for idempotent in ["GET", "PUT", "DELETE", "OPTIONS"] {
        let key = key_of(&["-X", idempotent, &proxy.url("/echo-idem")])?;
        assert_eq!(key, None, "{idempotent} must not get a key");
    }
    assert_eq!(proxy.proxy.stats().keys_generated, 4);

    let lines = wait_until("request log lines", Duration::from_secs(10), || {
        let Ok(text) = fs::read_to_string(&log_path) else { return Ok(None) };
        let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        Ok((lines.len() >= 9).then_some(lines))
    })?;
    let by_target = |t: &str| lines.iter().find(|l| l["target"] == t).cloned().unwrap_or_default();
    let p1 = by_target("/echo-post1");
    assert_eq!(p1["method"], "POST");
    assert_eq!(p1["status"], 200);
    assert_eq!(p1["node"], NODE);
    assert_eq!(p1["key_generated"], true);
    assert_eq!(p1["idempotency_key"], post1.as_str());
    assert_eq!(p1["bytes_in"], 1);
    assert_eq!(p1["complete"], true);
    assert_eq!(p1["resume"], serde_json::Value::Null);
    assert_eq!(p1["upstream"], origin.addr.to_string());
    assert!(p1["connection"].as_str().unwrap_or("").starts_with("127.0.0.1:"), "{p1}");
    assert!(p1["bytes_out"].as_u64().unwrap_or(0) > 0);
    let o = by_target("/echo-own");
    assert_eq!((o["key_generated"].clone(), o["idempotency_key"].clone()), (false.into(), "client-123".into()));
    println!("request log line: {p1}");
    Ok(())
}

// ---------------------------------------------------------------- bad input and limits

#[test]
fn oversized_and_malformed_requests_get_431_or_400_and_close_only_their_connection() -> Result<()> {
    let dir = TempDir::new("bad")?;
    fs::write(dir.join("ok.txt"), b"ok")?;
    let log_path = dir.join("requests.jsonl");
    let mut cfg = config(Backend::Root(dir.path().to_owned()));
    cfg.limits.max_header_bytes = 8192;
    cfg.limits.max_headers = 20;
    cfg.request_log = Some(log_path.clone());
    let proxy = Served::start(cfg);

    // A healthy keep-alive connection, opened first, must survive the others' errors.
    let mut healthy = Raw::connect(proxy.addr)?;
    healthy.send(get("/ok.txt").as_bytes())?;
    assert_eq!(healthy.response(false)?.status, 200);

    let big = format!("GET /ok.txt HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    let mut many = String::from("GET /ok.txt HTTP/1.1\r\nHost: t\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let cases: Vec<(&str, String, u16)> = vec![
        ("head too large", big, 431),
        ("too many headers", many, 431),
        ("header without colon", "GET / HTTP/1.1\r\nHost t\r\n\r\n".into(), 400),
        ("bad content-length", "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n".into(), 400),
        ("transfer-encoding not chunked", "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n".into(), 400),
        ("garbage request line", "\x01\x02 nonsense\r\n\r\n".into(), 400),
        ("bad version", "GET / HTTP/9.9\r\nHost: t\r\n\r\n".into(), 400),
    ];
    for (what, request, status) in &cases {
        let mut c = Raw::connect(proxy.addr)?;
        c.send(request.as_bytes())?;
        let r = c.response(false).with_context(|| format!("{what}: no response"))?;
        assert_eq!(r.status, *status, "{what}");
        assert!(c.closed_within(Duration::from_secs(10))?, "{what}: connection left open");
        healthy.send(get("/ok.txt").as_bytes())?;
        assert_eq!(healthy.response(false)?.status, 200, "healthy connection after {what}");
    }
    // Counted by each connection's task as it ends, which may come after the client saw the close.
    let counted = wait_until("every bad request counted", Duration::from_secs(10), || {
        let n = proxy.proxy.stats().bad_requests;
        Ok((n >= cases.len() as u64).then_some(n))
    })?;
    assert_eq!(counted, cases.len() as u64);
    let statuses = wait_until("request log lines for the bad requests", Duration::from_secs(10), || {
        let Ok(text) = fs::read_to_string(&log_path) else { return Ok(None) };
        let s: Vec<u64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["method"].is_null())
            .filter_map(|l| l["status"].as_u64())
            .collect();
        Ok((s.len() >= cases.len()).then_some(s))
    })?;
    assert_eq!(statuses.iter().filter(|s| **s == 431).count(), 2, "{statuses:?}");
    Ok(())
}

#[test]
fn slow_request_head_is_cut_at_the_header_timeout_and_idle_connections_at_the_idle_timeout() -> Result<()> {
    let dir = TempDir::new("slow")?;
    fs::write(dir.join("ok.txt"), b"ok")?;
    let mut cfg = config(Backend::Root(dir.path().to_owned()));
    cfg.limits.header_timeout = Duration::from_secs(1);
    cfg.limits.idle_timeout = Duration::from_secs(3);
    let proxy = Served::start(cfg);

    // Half a head, then silence.
    let mut c = Raw::connect(proxy.addr)?;
    let t = Instant::now();
    c.send(b"GET /ok.txt HTTP/1.1\r\nHost:")?;
    assert!(c.closed_within(Duration::from_secs(10))?, "stalled head not cut");
    println!("stalled head closed after {:?} (header timeout 1 s)", t.elapsed());
    assert!(c.buf.is_empty(), "nothing is sent on a header timeout");

    // Slowloris: a byte every 200 ms keeps the socket busy but the head never ends in time.
    let mut c = Raw::connect(proxy.addr)?;
    let t = Instant::now();
    let head = b"GET /ok.txt HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut = false;
    for b in head {
        if c.stream.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        if c.closed_within(Duration::from_millis(200))? {
            cut = true;
            break;
        }
    }
    assert!(cut, "a head dribbled over {:?} was served", t.elapsed());
    println!("slowloris head closed after {:?}", t.elapsed());

    // A keep-alive connection quiet for longer than the header timeout is still served...
    let mut c = Raw::connect(proxy.addr)?;
    c.send(get("/ok.txt").as_bytes())?;
    assert_eq!(c.response(false)?.status, 200);
    assert!(!c.closed_within(Duration::from_millis(1500))?, "idle connection cut at the header timeout");
    c.send(get("/ok.txt").as_bytes())?;
    assert_eq!(c.response(false)?.status, 200);
    // ...and closed once idle for the idle timeout.
    let t = Instant::now();
    assert!(c.closed_within(Duration::from_secs(15))?, "idle connection never closed");
    println!("idle keep-alive connection closed after {:?} (idle timeout 3 s)", t.elapsed());
    let stats = wait_until("the timeouts to be counted", Duration::from_secs(5), || {
        let s = proxy.proxy.stats();
        Ok((s.idle_timeouts > 0).then_some(s))
    })?;
    assert_eq!((stats.header_timeouts, stats.idle_timeouts), (2, 1), "{stats:?}");
    Ok(())
}

#[test]
fn refused_upstream_is_502_slow_upstream_is_504_and_the_connection_survives() -> Result<()> {
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = Served::start(config(upstream(dead)));
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{stderr}%{num_connects} %{http_code}\n",
        &proxy.url("/a"),
        &proxy.url("/b"),
    ])?;
    let stats = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stats.lines().map(|l| l.split(' ').nth(1).unwrap_or("")).collect::<Vec<_>>(), ["502", "502"], "{stats}");
    assert_eq!(
        stats.lines().filter(|l| l.starts_with('1')).count(),
        1,
        "a 502 must not cost the client its connection"
    );
    // A POST expecting 100-continue gets the 502 without being asked for its body.
    let mut c = Raw::connect(proxy.addr)?;
    c.send(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")?;
    assert_eq!(c.response(false)?.status, 502);
    assert_eq!(proxy.proxy.stats().upstream_errors, 3);

    let origin = Origin::start();
    let mut cfg = config(upstream(origin.addr));
    cfg.limits.upstream_timeout = Duration::from_secs(1);
    let proxy = Served::start(cfg);
    let t = Instant::now();
    let (status, _, _) = curl_full(&[&proxy.url("/slow?ms=4000")])?;
    println!("504 after {:?} (upstream timeout 1 s)", t.elapsed());
    assert_eq!(status, 504);
    let (status, _, body) = curl_full(&[&proxy.url("/slow?ms=100")])?;
    assert_eq!((status, body.as_slice()), (200, b"slow".as_slice()));
    assert_eq!(proxy.proxy.stats().upstream_timeouts, 1);
    Ok(())
}

// ---------------------------------------------------------------- static file server

#[test]
fn static_root_serves_ranges_validators_conditionals_and_head() -> Result<()> {
    let dir = TempDir::new("static")?;
    let data = pattern(1000);
    fs::write(dir.join("a.txt"), &data)?;
    fs::write(dir.join("empty.bin"), b"")?;
    fs::write(dir.join("page.html"), b"<p>hi</p>")?;
    let proxy = Served::start(config(Backend::Root(dir.path().to_owned())));
    let url = proxy.url("/a.txt");

    let (status, h, body) = curl_full(&[&url])?;
    assert_eq!((status, body.as_slice()), (200, data.as_slice()));
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(h["content-length"], "1000");
    assert_eq!(h["accept-ranges"], "bytes");
    let etag = h["etag"].clone();
    let last_modified = h["last-modified"].clone();
    assert!(etag.starts_with('"') && !etag.starts_with("W/"), "strong etag: {etag}");
    assert_eq!(curl_full(&[&proxy.url("/page.html")])?.1["content-type"], "text/html; charset=utf-8");

    let (status, h, body) = curl_full(&["-r", "10-19", &url])?;
    assert_eq!((status, body.as_slice()), (206, &data[10..20]));
    assert_eq!(h["content-range"], "bytes 10-19/1000");
    let (status, h, body) = curl_full(&["-H", "Range: bytes=-10", &url])?;
    assert_eq!((status, body.as_slice()), (206, &data[990..]));
    assert_eq!(h["content-range"], "bytes 990-999/1000");
    let (status, h, _) = curl_full(&["-r", "5000-", &url])?;
    assert_eq!(status, 416);
    assert_eq!(h["content-range"], "bytes */1000");
    assert_eq!(curl_full(&["-r", "0-", &proxy.url("/empty.bin")])?.0, 416);
    let (status, _, body) = curl_full(&["-r", "0-1,5-6", &url])?;
    assert_eq!((status, body.len()), (200, 1000), "several ranges are answered with the whole file");

    let (status, _, body) = curl_full(&["-H", &format!("If-None-Match: {etag}"), &url])?;
    assert_eq!((status, body.len()), (304, 0));
    let (status, _, _) = curl_full(&["-H", &format!("If-Modified-Since: {last_modified}"), &url])?;
    assert_eq!(status, 304);
    let (status, _, _) = curl_full(&["-H", "If-None-Match: \"other\"", &url])?;
    assert_eq!(status, 200);
    let (status, _, body) = curl_full(&["-r", "0-4", "-H", &format!("If-Range: {etag}"), &url])?;
    assert_eq!((status, body.as_slice()), (206, &data[..5]));
    let (status, _, body) = curl_full(&["-r", "0-4", "-H", "If-Range: \"stale\"", &url])?;
    assert_eq!((status, body.len()), (200, 1000));
    assert_eq!(curl_full(&["-H", "If-Match: \"stale\"", &url])?.0, 412);

    // HEAD: GET's headers, no body; a GET pipelined behind it proves no body bytes were sent.
    let (status, h, _) = curl_full(&["-I", &url])?;
    assert_eq!((status, h["content-length"].as_str()), (200, "1000"));
    let mut c = Raw::connect(proxy.addr)?;
    c.send(format!("HEAD /a.txt HTTP/1.1\r\nHost: t\r\n\r\n{}", get("/a.txt")).as_bytes())?;
    let head = c.response(true)?;
    assert_eq!((head.status, head.header("content-length")), (200, Some("1000")));
    let r = c.response(false)?;
    assert_eq!((r.status, r.body.as_slice()), (200, data.as_slice()));

    let (status, h, _) = curl_full(&["-X", "POST", "-d", "x", &url])?;
    assert_eq!((status, h["allow"].as_str()), (405, "GET, HEAD"));
    Ok(())
}

#[test]
fn static_root_never_serves_a_file_outside_the_root() -> Result<()> {
    let outer = TempDir::new("escape")?;
    let root = outer.join("www");
    fs::create_dir_all(root.join("sub"))?;
    fs::create_dir_all(root.join("noindex"))?;
    fs::write(outer.join("secret.txt"), b"SECRET")?;
    fs::write(root.join("in.txt"), b"inside")?;
    fs::write(root.join("sub/index.html"), b"<h1>sub</h1>")?;
    std::os::unix::fs::symlink("../secret.txt", root.join("link-out"))?;
    std::os::unix::fs::symlink(outer.join("secret.txt"), root.join("link-abs"))?;
    std::os::unix::fs::symlink("..", root.join("link-up"))?;
    std::os::unix::fs::symlink("in.txt", root.join("link-in"))?;
    let proxy = Served::start(config(Backend::Root(root.clone())));

    let cases: &[(&str, u16)] = &[
        ("/../secret.txt", 403),
        ("/sub/../../secret.txt", 403),
        ("/%2e%2e/secret.txt", 403),
        ("/%2E%2E%2fsecret.txt", 404),
        ("/sub%2Findex.html", 404),
        ("/link-out", 403),
        ("/link-abs", 403),
        ("/link-up/secret.txt", 403),
        ("/missing.txt", 404),
        ("/in.txt/", 404),
        ("/noindex/", 403),
        ("/a%00b", 400),
        ("/link-in", 200),
        ("/in.txt", 200),
        ("/sub/", 200),
    ];
    for (path, want) in cases {
        let (status, _, body) = curl_full(&["--path-as-is", &proxy.url(path)])?;
        assert_eq!(status, *want, "{path}");
        assert!(!body.windows(6).any(|w| w == b"SECRET"), "{path} leaked the secret");
    }
    let (status, h, _) = curl_full(&[&proxy.url("/sub?x=1")])?;
    assert_eq!((status, h["location"].as_str()), (301, "/sub/?x=1"));
    let (_, h, body) = curl_full(&[&proxy.url("/sub/")])?;
    assert_eq!((h["content-type"].as_str(), body.as_slice()), ("text/html; charset=utf-8", b"<h1>sub</h1>".as_slice()));
    Ok(())
}

// ---------------------------------------------------------------- the replication hooks

/// Per connection: the reply log's bytes and acceptance point, and the observer's events.
#[derive(Default)]
struct ConnRecord {
    log: Mutex<LogState>,
    events: Mutex<Vec<Event>>,
}

#[derive(Default)]
struct LogState {
    bytes: Vec<u8>,
    /// End offset of what the log has accepted (acknowledged).
    accepted: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Start(u64, String, String),
    Head(u64, u16),
    Data(u64, u64, usize),
    End(ExchangeOutcome),
}

/// A reply log that accepts each append after a pseudo-random delay of up to 2 ms, in order.
struct DelayedLog {
    rec: Arc<ConnRecord>,
    acks: tokio::sync::mpsc::UnboundedSender<(u64, tokio::sync::oneshot::Sender<()>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("delayed log closed")]
struct LogClosed;

impl ReplyLog for DelayedLog {
    type Error = LogClosed;
    fn append(&self, offset: u64, bytes: Bytes) -> impl Future<Output = Result<(), LogClosed>> + Send + 'static {
        let mut log = self.rec.log.lock().expect("log");
        assert_eq!(offset, log.bytes.len() as u64, "reply log offsets must be contiguous");
        log.bytes.extend_from_slice(&bytes);
        let end = log.bytes.len() as u64;
        drop(log);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self.acks.send((end, tx)).is_ok();
        async move { if queued { rx.await.map_err(|_| LogClosed) } else { Err(LogClosed) } }
    }
}

struct Recorder(Arc<ConnRecord>);

impl ExchangeObserver for Recorder {
    fn on_exchange_start(&self, info: &ExchangeInfo) {
        self.0.events.lock().expect("events").push(Event::Start(
            info.exchange,
            info.method.to_string(),
            info.target.clone(),
        ));
    }
    fn on_upstream_head(&self, exchange: u64, head: &http::response::Parts) {
        self.0.events.lock().expect("events").push(Event::Head(exchange, head.status.as_u16()));
    }
    fn on_upstream_data(&self, exchange: u64, offset: u64, data: &Bytes) {
        self.0.events.lock().expect("events").push(Event::Data(exchange, offset, data.len()));
    }
    fn on_exchange_end(&self, outcome: &ExchangeOutcome) {
        self.0.events.lock().expect("events").push(Event::End(outcome.clone()));
    }
}

#[derive(Clone, Default)]
struct RecordingHooks {
    conns: Arc<Mutex<HashMap<SocketAddr, Arc<ConnRecord>>>>,
}

impl ConnectionHooks for RecordingHooks {
    type Log = DelayedLog;
    type Observer = Recorder;

    fn open(&self, peer: SocketAddr, _local: SocketAddr) -> (DelayedLog, Recorder) {
        let rec = Arc::new(ConnRecord::default());
        self.conns.lock().expect("conns").insert(peer, Arc::clone(&rec));
        let (acks, mut pending) = tokio::sync::mpsc::unbounded_channel::<(u64, tokio::sync::oneshot::Sender<()>)>();
        let acceptor = Arc::clone(&rec);
        tokio::spawn(async move {
            let mut step = u64::from(peer.port());
            while let Some((end, done)) = pending.recv().await {
                step = step.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                tokio::time::sleep(Duration::from_micros((step >> 33) % 2000)).await;
                acceptor.log.lock().expect("log").accepted = end;
                let _ = done.send(());
            }
        });
        (DelayedLog { rec: Arc::clone(&rec), acks }, Recorder(rec))
    }
}

impl RecordingHooks {
    fn record(&self, peer: SocketAddr) -> Arc<ConnRecord> {
        Arc::clone(self.conns.lock().expect("conns").get(&peer).expect("connection recorded"))
    }
}

#[test]
fn logged_io_sends_exactly_the_logged_bytes_only_after_acceptance_and_observer_sees_each_exchange() -> Result<()> {
    let files = TempDir::new("logged")?;
    let sizes = [0usize, 1, 70_000, 3_000_000, 12_345];
    for (i, n) in sizes.iter().enumerate() {
        fs::write(files.join(format!("l{i}.bin")), pattern(*n))?;
    }
    let nginx = Nginx::start(files.path(), &NGINX)?;
    let hooks = RecordingHooks::default();
    let proxy = Served::start_with(config(nginx_upstream(&nginx)), hooks.clone());

    let mut c = Raw::connect(proxy.addr)?;
    let peer = c.stream.local_addr()?;
    let mut burst = String::new();
    for i in 0..sizes.len() {
        let close = if i + 1 == sizes.len() { "Connection: close\r\n" } else { "" };
        burst.push_str(&format!("GET /l{i}.bin HTTP/1.1\r\nHost: test\r\n{close}\r\n"));
    }
    let t = Instant::now();
    c.send(burst.as_bytes())?;
    let rec = wait_until("the connection's hooks", Duration::from_secs(10), || {
        Ok(hooks.conns.lock().ok().and_then(|c| c.get(&peer).cloned()))
    })?;
    // Read everything, checking at every read that no byte arrived before the log accepted it.
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 32 * 1024];
    loop {
        let n = c.stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
        let accepted = rec.log.lock().expect("log").accepted;
        assert!(received.len() as u64 <= accepted, "client has {} bytes, log accepted {accepted}", received.len());
    }
    println!("{} reply bytes through a delaying reply log in {:?}", received.len(), t.elapsed());
    let logged = rec.log.lock().expect("log").bytes.clone();
    assert!(received == logged, "client got {} bytes, log holds {}", received.len(), logged.len());

    let mut parse = Raw { stream: c.stream.try_clone()?, buf: received };
    for (i, n) in sizes.iter().enumerate() {
        let r = parse.response(false)?;
        assert_eq!(r.status, 200);
        assert!(r.body == pattern(*n), "exchange {i}");
    }

    let events = wait_until("every exchange to end", Duration::from_secs(10), || {
        let Ok(ev) = hooks.record(peer).events.lock().map(|e| e.clone()) else { return Ok(None) };
        Ok((ev.iter().filter(|e| matches!(e, Event::End(_))).count() == sizes.len()).then_some(ev))
    })?;
    for (i, n) in sizes.iter().enumerate() {
        let i = i as u64;
        let mine: Vec<&Event> = events
            .iter()
            .filter(|e| match e {
                Event::Start(x, ..) | Event::Head(x, _) | Event::Data(x, ..) => *x == i,
                Event::End(o) => o.exchange == i,
            })
            .collect();
        assert_eq!(*mine[0], Event::Start(i, "GET".into(), format!("/l{i}.bin")));
        assert_eq!(*mine[1], Event::Head(i, 200));
        let mut next = 0u64;
        for e in &mine[2..mine.len() - 1] {
            let Event::Data(_, offset, len) = e else { bail!("unexpected {e:?}") };
            assert_eq!(*offset, next, "upstream offsets are contiguous");
            next += *len as u64;
        }
        assert_eq!(next, *n as u64);
        let Event::End(o) = mine[mine.len() - 1] else { bail!("no end for {i}") };
        assert_eq!((o.status, o.bytes_out, o.complete), (Some(200), *n as u64, true));
    }
    let starts: Vec<u64> =
        events.iter().filter_map(|e| if let Event::Start(x, ..) = e { Some(*x) } else { None }).collect();
    assert_eq!(starts, (0..sizes.len() as u64).collect::<Vec<_>>(), "exchanges start in request order");

    // curl through the same delaying log: a keep-alive pair of downloads.
    let (sha, n) = curl_sha256(&proxy.url("/l3.bin"), &[])?;
    assert_eq!((sha, n), (sha256_hex(&pattern(sizes[3])), sizes[3] as u64));
    Ok(())
}

#[test]
fn serve_connection_runs_on_any_async_stream() -> Result<()> {
    let dir = TempDir::new("duplex")?;
    fs::write(dir.join("x.txt"), b"over a duplex pipe")?;
    let rt = runtime();
    let proxy = Proxy::new(config(Backend::Root(dir.path().to_owned())))?;
    let summary = rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1024);
        let peer: SocketAddr = "192.0.2.1:5555".parse().expect("addr");
        let served = tokio::spawn({
            let proxy = proxy.clone();
            let io = primary::proxy::LoggedIo::new(server, NoLog);
            async move {
                proxy.serve_connection(io, peer, Arc::new(NoObserver), primary::proxy::ShutdownSignal::never()).await
            }
        });
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(b"GET /x.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await?;
        let mut out = Vec::new();
        client.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        ensure!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("over a duplex pipe"), "{text}");
        Ok::<_, anyhow::Error>(served.await?)
    })?;
    assert_eq!(summary.exchanges, 1);
    assert_eq!(summary.end, primary::proxy::ConnectionEnd::Closed);
    Ok(())
}

#[test]
fn client_that_stops_reading_is_dropped_after_the_send_timeout() -> Result<()> {
    let dir = TempDir::new("send")?;
    let len = 64 * MIB;
    write_pattern_file(&dir.join("big.bin"), len);
    let mut cfg = config(Backend::Root(dir.path().to_owned()));
    cfg.limits.send_timeout = Duration::from_secs(1);
    let proxy = Served::start(cfg);
    let mut c = Raw::connect(proxy.addr)?;
    let t = Instant::now();
    c.send(get("/big.bin").as_bytes())?;
    // The client reads nothing; socket buffers fill, then the proxy's writes stall.
    wait_until("the send timeout", Duration::from_secs(20), || {
        Ok((proxy.proxy.stats().send_timeouts == 1).then_some(()))
    })?;
    println!("stalled reader dropped {:?} after its request (send timeout 1 s)", t.elapsed());
    assert!(c.closed_within(Duration::from_secs(10))?, "connection not closed");
    assert!((c.buf.len() as u64) < len, "the whole body was delivered to a client that read nothing");
    Ok(())
}

#[test]
fn shutdown_finishes_a_download_in_progress_closes_idle_connections_and_stops_accepting() -> Result<()> {
    let dir = TempDir::new("shutdown")?;
    let len = 30 * MIB;
    let sha = write_pattern_file(&dir.join("big.bin"), len);
    fs::write(dir.join("small.txt"), b"small")?;
    let mut proxy = Served::start(config(Backend::Root(dir.path().to_owned())));
    let mut idle = Raw::connect(proxy.addr)?;
    idle.send(get("/small.txt").as_bytes())?;
    assert_eq!(idle.response(false)?.status, 200);

    let url = proxy.url("/big.bin");
    let download = std::thread::spawn(move || curl_sha256(&url, &["--limit-rate", "15M"]));
    wait_until("the download to start", Duration::from_secs(10), || {
        Ok((proxy.proxy.stats().connections_open == 2).then_some(()))
    })?;
    let t = Instant::now();
    proxy.begin_shutdown();
    assert!(idle.closed_within(Duration::from_secs(5))?, "idle keep-alive connection kept open on shutdown");
    wait_until("the listener to close", Duration::from_secs(5), || {
        Ok(TcpStream::connect(proxy.addr).is_err().then_some(()))
    })?;
    let (got, n) = download.join().expect("download thread")?;
    println!("download finished {:?} after shutdown began", t.elapsed());
    assert_eq!((got, n), (sha, len), "the download in progress must finish whole");
    assert!(proxy.stopped_within(Duration::from_secs(15)), "run did not return after its connections ended");
    Ok(())
}

// ---------------------------------------------------------------- hostile clients

#[test]
fn connection_beyond_max_connections_gets_503_and_close_others_are_served_and_a_closed_one_frees_its_place()
-> Result<()> {
    let dir = TempDir::new("maxconn")?;
    fs::write(dir.join("ok.txt"), b"ok")?;
    let mut cfg = config(Backend::Root(dir.path().to_owned()));
    cfg.limits.max_connections = 2;
    let proxy = Served::start(cfg);
    let served = |c: &mut Raw| -> Result<()> {
        c.send(get("/ok.txt").as_bytes())?;
        let r = c.response(false)?;
        ensure!(r.status == 200 && r.body == b"ok", "status {} body {:?}", r.status, r.body);
        Ok(())
    };
    let mut a = Raw::connect(proxy.addr)?;
    served(&mut a)?;
    let mut b = Raw::connect(proxy.addr)?;
    served(&mut b)?;

    // The third is answered 503 with its reason and closed.
    let mut c = Raw::connect(proxy.addr)?;
    c.send(get("/ok.txt").as_bytes())?;
    let r = c.response(false)?;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        String::from_utf8_lossy(&r.body).contains("connection limit (2)"),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(c.closed_within(Duration::from_secs(10))?, "refused connection left open");
    assert_eq!(proxy.proxy.stats().refused, 1);

    // The two in place are untouched.
    served(&mut a)?;
    served(&mut b)?;

    // A closed connection frees its place for the next one, and the limit holds again after it.
    drop(a);
    wait_until("the closed connection's place to free", Duration::from_secs(10), || {
        Ok((proxy.proxy.live_connections() == 1).then_some(()))
    })?;
    let mut d = Raw::connect(proxy.addr)?;
    served(&mut d)?;
    let mut e = Raw::connect(proxy.addr)?;
    e.send(get("/ok.txt").as_bytes())?;
    assert_eq!(e.response(false)?.status, 503);
    served(&mut b)?;
    served(&mut d)?;
    assert_eq!(proxy.proxy.stats().refused, 2);
    Ok(())
}

#[test]
fn request_body_slower_than_its_minimum_rate_gets_408_and_close_while_one_at_the_rate_is_served() -> Result<()> {
    let origin = Origin::start();
    let mut cfg = config(upstream(origin.addr));
    cfg.limits.body_read_timeout = Duration::from_secs(2);
    // 200 bytes per 2 s of waiting.
    cfg.limits.body_min_rate = 100;
    let proxy = Served::start(cfg);
    let post = |path: &str, len: usize| format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n");

    // At about 1 000 bytes per second (five times the minimum) the upload is served.
    let mut ok = Raw::connect(proxy.addr)?;
    ok.send(post("/paced", 3000).as_bytes())?;
    let body = pattern(3000);
    for piece in body.chunks(250) {
        std::thread::sleep(Duration::from_millis(250));
        ok.send(piece)?;
    }
    let r = ok.response(false)?;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = origin.seen();
    assert!(seen.iter().any(|s| s.path == "/paced" && s.sha256 == sha256_hex(&body)), "{seen:?}");

    // A byte every 300 ms: each comes well within the timeout, but the body never reaches its rate.
    let mut slow = Raw::connect(proxy.addr)?;
    slow.stream.set_read_timeout(Some(Duration::from_millis(300)))?;
    slow.send(post("/trickle", 10_000).as_bytes())?;
    let t = Instant::now();
    let mut sent = 0;
    let deadline = t + Duration::from_secs(60);
    let status = loop {
        ensure!(Instant::now() < deadline, "a trickled body was never cut ({sent} bytes sent)");
        if slow.stream.write_all(b"x").is_ok() {
            sent += 1;
        }
        let mut chunk = [0u8; 4096];
        match slow.stream.read(&mut chunk) {
            Ok(0) => bail!("closed without an answer after {sent} body bytes"),
            Ok(n) => {
                slow.buf.extend_from_slice(&chunk[..n]);
                slow.stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                break slow.response(false)?;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("reading the answer to the trickled body"),
        }
    };
    println!("trickled body cut after {:?} and {sent} bytes (timeout 2 s, 100 B/s)", t.elapsed());
    assert_eq!(status.status, 408, "{status:?}");
    assert_eq!(status.header("connection"), Some("close"));
    assert!(slow.closed_within(Duration::from_secs(10))?, "connection left open after the 408");
    assert!(sent < 10_000);
    assert_eq!(proxy.proxy.stats().body_timeouts, 1);
    assert!(!origin.seen().iter().any(|s| s.path == "/trickle"), "the origin got the whole trickled body");
    Ok(())
}
