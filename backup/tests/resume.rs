//! The resume executor with real components: the replica table fed real replication records (IPv4/TCP
//! datagrams, the reply log, exchange starts, the upstream log), the real resume planner, the real
//! proxy, and real origins (nginx; a small hyper origin where a deduplicating one is needed; the
//! static file server).
//!
//! A "restored socket" is the server end of a loopback TCP connection: the test's client end first
//! writes exactly the plan's receive queue (what a restore puts back), then reads what a real client
//! would get next. The client's view is the reply bytes it already had (the reply log up to the cut)
//! followed by what it reads; it is decoded by the replica's HTTP framer or by hyper's client.
//!
//! Needs `nginx` (`apt-get install -y nginx`). Timings are printed, never asserted.

use anyhow::{Context, Result, bail, ensure};
use backup::resume::{
    ContinuationEncoder, EncodeError, InFlight, Pending, PrefixCheck, Restored, ResumeOutcome, Steps, resume_connection,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use primary::proxy::{
    Backend, ExchangeInfo, ExchangeObserver, ExchangeOutcome, Limits, Proxy, ProxyConfig, ReplyLog, ShutdownSignal,
    Unprotected,
};
use serde_json::Value;
use shared::config::{RetryConfig, RetryPolicy};
use shared::protocol::{ConnKey, ExchangeStart, Message, Record};
use shared::replica::ReplicaTable;
use shared::replica::http::{Event, Framer};
use shared::replica::resume::{ConnResume, Continuation, Decision, plan_conn};
use shared::replica::table::Conn;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fs;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tcp_replay::repair::UnsentLeft;
use tcp_replay::segment::SegmentBuilder;
use tcp_replay::{Dir, Seq, TcpFlags, TcpOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use understudy_tests::harness::{free_port, wait_until_async};
use understudy_tests::hyper_origin;
use understudy_tests::nginx::{Nginx, NginxOptions};
use understudy_tests::tempdir::TempDir;

/// Deterministic test content (`understudy_tests::pattern`); `seed` makes different contents of one
/// length.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    understudy_tests::pattern::fill(seed, 0, &mut data);
    data
}

// ------------------------------------------------------------------ the primary's replication stream

const SERVER: &str = "10.0.0.100:80";
static PORTS: AtomicU32 = AtomicU32::new(0);

/// One client connection scripted as the primary's replication stream shows it.
struct Script {
    key: ConnKey,
    cisn: u32,
    sisn: u32,
    /// Client bytes sent, reply bytes logged, reply bytes the client acknowledged.
    sent: u64,
    logged: u64,
    acked: u64,
    now_us: u64,
    records: Vec<Record>,
    /// Every reply byte logged.
    reply: Vec<u8>,
}

impl Script {
    /// A connection through its handshake (MSS, window scale, SACK).
    fn open() -> Script {
        let port = 30000 + (PORTS.fetch_add(1, Ordering::Relaxed) % 30000) as u16;
        let client = SocketAddrV4::new("10.0.0.1".parse().unwrap(), port);
        let mut s = Script {
            key: ConnKey { client, server: SERVER.parse().unwrap() },
            cisn: 4_000_000_000 + port as u32,
            sisn: 77_000 + port as u32,
            sent: 0,
            logged: 0,
            acked: 0,
            now_us: 1_000_000,
            records: Vec::new(),
            reply: Vec::new(),
        };
        let mut o = TcpOptions::default();
        o.mss = Some(1460);
        o.wscale = Some(7);
        o.sack_permitted = true;
        s.seg(Dir::ToServer, TcpFlags::SYN, s.cisn, 0, o, b"");
        o.wscale = Some(9);
        s.seg(Dir::ToClient, TcpFlags::SYN | TcpFlags::ACK, s.sisn, s.cisn.wrapping_add(1), o, b"");
        s.seg(Dir::ToServer, TcpFlags::ACK, s.cseq(0), s.sseq(0), TcpOptions::default(), b"");
        s
    }

    fn push(&mut self, msg: Message) {
        self.records.push(Record { seq: self.records.len() as u64 + 1, epoch: 1, msg });
    }

    fn seg(&mut self, dir: Dir, flags: u8, seq: u32, ack: u32, options: TcpOptions, payload: &[u8]) {
        self.now_us += 150;
        let (src, dst) = match dir {
            Dir::ToServer => (self.key.client, self.key.server),
            Dir::ToClient => (self.key.server, self.key.client),
        };
        let mut b = SegmentBuilder::new(src, dst);
        b.flags = flags;
        b.seq = Seq(seq);
        b.ack = Seq(ack);
        b.window = if flags & TcpFlags::SYN != 0 { 64240 } else { 4000 };
        b.options = options;
        self.push(Message::Segment { at_us: self.now_us, dir, datagram: b.build(payload) });
    }

    fn cseq(&self, off: u64) -> u32 {
        self.cisn.wrapping_add(1).wrapping_add(off as u32)
    }

    fn sseq(&self, off: u64) -> u32 {
        self.sisn.wrapping_add(1).wrapping_add(off as u32)
    }

    /// Client bytes, in segments of at most 1400 bytes.
    fn send(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(1400) {
            let (seq, ack) = (self.cseq(self.sent), self.sseq(self.acked));
            self.seg(Dir::ToServer, TcpFlags::ACK | TcpFlags::PSH, seq, ack, TcpOptions::default(), piece);
            self.sent += piece.len() as u64;
        }
    }

    /// Reply bytes in the primary's reply log.
    fn reply(&mut self, bytes: &[u8]) {
        self.push(Message::Reply { conn: self.key, offset: self.logged, bytes: bytes.to_vec() });
        self.logged += bytes.len() as u64;
        self.reply.extend_from_slice(bytes);
    }

    /// The client acknowledges every reply byte logged so far.
    fn ack_all(&mut self) {
        self.acked = self.logged;
        let (seq, ack) = (self.cseq(self.sent), self.sseq(self.acked));
        self.seg(Dir::ToServer, TcpFlags::ACK, seq, ack, TcpOptions::default(), b"");
    }

    fn start(&mut self, exchange: u64, method: &str, target: &str, key: Option<&str>, generated: bool) {
        self.push(Message::ExchangeStart(ExchangeStart {
            conn: self.key,
            exchange,
            request_offset: 0,
            method: method.into(),
            target: target.into(),
            idempotency_key: key.map(String::from),
            key_generated: generated,
            upstream: Some("127.0.0.1:1".into()),
        }));
    }

    fn upstream(&mut self, exchange: u64, offset: u64, bytes: &[u8]) {
        self.push(Message::Upstream { conn: self.key, exchange, offset, bytes: bytes.to_vec() });
    }

    fn end(&mut self, exchange: u64, status: u16) {
        self.push(Message::ExchangeEnd { conn: self.key, exchange, status });
    }

    /// One exchange answered in full and acknowledged.
    fn answered(&mut self, exchange: u64, target: &str, body: &[u8]) {
        self.send(format!("GET {target} HTTP/1.1\r\nHost: o\r\n\r\n").as_bytes());
        self.start(exchange, "GET", target, None, false);
        let resp = length_response("", body);
        self.upstream(exchange, 0, &resp);
        self.reply(&resp);
        self.end(exchange, 200);
        self.ack_all();
    }

    /// The planner's decision and the table entry, as the takeover sees them.
    fn plan(&self, retry: &RetryConfig) -> (ConnResume, Conn) {
        let mut table = ReplicaTable::new();
        for r in &self.records {
            table.apply(r).expect("a well-formed stream applies");
        }
        let conn = table.conn(&self.key).expect("connection in the table").clone();
        let plan = plan_conn(&conn, Duration::from_secs(10), retry);
        (plan, conn)
    }
}

fn with_key() -> RetryConfig {
    RetryConfig { non_idempotent: RetryPolicy::WithKey, origin_honours_generated_keys: false, ..RetryConfig::default() }
}

/// An HTTP/1.1 response with a Content-Length body; `fields` are extra header lines.
fn length_response(fields: &str, body: &[u8]) -> Vec<u8> {
    [format!("HTTP/1.1 200 OK\r\n{fields}content-length: {}\r\n\r\n", body.len()).as_bytes(), body].concat()
}

/// The upstream log of a response whose origin sent no Content-Length, as the primary rebuilds it
/// (primary/src/replicate.rs): the head with `transfer-encoding: chunked`, one chunk per piece the
/// proxy received, the last chunk once the exchange ended.
fn rechunked(fields: &str, pieces: &[&[u8]], complete: bool) -> Vec<u8> {
    let mut m = format!("HTTP/1.1 200 OK\r\n{fields}transfer-encoding: chunked\r\n\r\n").into_bytes();
    for p in pieces {
        m.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
        m.extend_from_slice(p);
        m.extend_from_slice(b"\r\n");
    }
    if complete {
        m.extend_from_slice(b"0\r\n\r\n");
    }
    m
}

/// `body` in chunks of `size` (as hyper writes a streamed body to an HTTP/1.1 client).
fn chunked_body(body: &[u8], size: usize) -> Vec<u8> {
    let mut m = Vec::new();
    for p in body.chunks(size) {
        m.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
        m.extend_from_slice(p);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b"0\r\n\r\n");
    m
}

// ------------------------------------------------------------------ decoding what the client sees

#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
    complete: bool,
}

/// Responses in `stream` (which starts at a response boundary), for requests made with `methods`,
/// decoded by the replica's HTTP/1.1 framer. Fails on malformed framing.
fn decode(stream: &[u8], methods: &[&str]) -> Result<Vec<Resp>> {
    let mut f = Framer::responses(0).with_body_events();
    for (i, m) in methods.iter().enumerate() {
        f.expect_response(i as u64, m);
    }
    let mut ev = Vec::new();
    f.feed(0, stream, &mut ev).map_err(|e| anyhow::anyhow!("the client's stream is malformed: {e}"))?;
    let mut out: Vec<Resp> = Vec::new();
    for e in ev {
        match e {
            Event::ResponseHead { head, raw } if !head.interim() => out.push(Resp {
                status: head.status,
                head: String::from_utf8_lossy(&raw).into_owned(),
                body: Vec::new(),
                complete: false,
            }),
            Event::Body { range, .. } => out
                .last_mut()
                .context("body before a head")?
                .body
                .extend_from_slice(&stream[range.start as usize..range.end as usize]),
            Event::Complete { .. } => out.last_mut().context("end before a head")?.complete = true,
            _ => {}
        }
    }
    Ok(out)
}

fn complete_responses(stream: &[u8], methods: &[&str]) -> usize {
    decode(stream, methods).map_or(0, |r| r.iter().filter(|r| r.complete).count())
}

/// Decodes one response with hyper's client: it is fed `stream` after sending its request, and
/// fails on anything not well-formed (a truncated or garbled body included).
async fn hyper_decode(stream: Vec<u8>, target: &str) -> Result<(u16, Bytes)> {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut theirs = theirs;
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = theirs.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        theirs.write_all(&stream).await?;
        theirs.shutdown().await?;
        // Hold the pipe open until the client is done with it.
        let _ = theirs.read(&mut buf).await;
        Ok::<_, std::io::Error>(())
    });
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours)).await?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(Request::get(target).header("host", "o").body(Empty::<Bytes>::new())?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.context("hyper's client decoding the body")?.to_bytes();
    drop(sender);
    driver.abort();
    server.abort();
    Ok((status, body))
}

// ------------------------------------------------------------------ reply log and observer that record

/// A reply log that accepts at once and records where each append went.
#[derive(Clone, Default)]
struct RecordingLog(Arc<Mutex<Vec<(u64, usize)>>>);

impl ReplyLog for RecordingLog {
    type Error = Infallible;
    fn append(&self, offset: u64, bytes: Bytes) -> impl Future<Output = Result<(), Infallible>> + Send + 'static {
        self.0.lock().unwrap().push((offset, bytes.len()));
        std::future::ready(Ok(()))
    }
}

impl RecordingLog {
    fn first_offset(&self) -> Option<u64> {
        self.0.lock().unwrap().first().map(|a| a.0)
    }
}

/// An exchange start as observed: number, target, key, key generated.
type Start = (u64, String, Option<String>, bool);

#[derive(Default)]
struct Recorder {
    starts: Mutex<Vec<Start>>,
    ends: Mutex<Vec<(u64, Option<u16>, bool)>>,
}

impl ExchangeObserver for Recorder {
    fn on_exchange_start(&self, info: &ExchangeInfo) {
        self.starts.lock().unwrap().push((
            info.exchange,
            info.target.clone(),
            info.idempotency_key.clone(),
            info.key_generated,
        ));
    }
    fn on_exchange_end(&self, o: &ExchangeOutcome) {
        self.ends.lock().unwrap().push((o.exchange, o.status, o.complete));
    }
}

// ------------------------------------------------------------------ the node under test

struct Node {
    proxy: Proxy,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Node {
    fn new(backend: Backend) -> Node {
        let dir = TempDir::new("node").expect("create temp dir");
        let log_path = dir.join("requests.jsonl");
        let proxy = Proxy::new(ProxyConfig {
            node: "backup".into(),
            backend,
            request_log: Some(log_path.clone()),
            limits: Limits { idle_timeout: Duration::from_secs(10), ..Limits::default() },
        })
        .expect("proxy config");
        Node { proxy, log_path, _dir: dir }
    }

    fn requests(&self) -> Vec<Value> {
        fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("request log line is JSON"))
            .collect()
    }

    /// The request log line of exchange `n` of the connection, once written.
    async fn request(&self, conn: &ConnKey, n: u64) -> Result<Value> {
        let client = conn.client.to_string();
        wait_until_async(&format!("request log line of exchange {n}"), Duration::from_secs(10), || {
            Ok(self.requests().into_iter().find(|v| v["exchange"] == n && v["connection"] == client.as_str()))
        })
        .await
    }

    /// Restores `plan` onto the server end of a fresh loopback connection whose client end has
    /// already written the plan's receive queue, and runs the executor on it.
    async fn resume(&self, plan: ConnResume, conn: Conn) -> Result<Session> {
        self.resume_with_pending(plan, conn, None).await
    }

    /// [`Node::resume`], with `pending` bytes left by the restore for the executor to write first.
    async fn resume_with_pending(&self, plan: ConnResume, conn: Conn, pending: Option<Vec<u8>>) -> Result<Session> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut client = TcpStream::connect(listener.local_addr()?).await?;
        let (server, _) = listener.accept().await?;
        let queue = plan.restore.as_ref().context("a restorable plan")?.recv_queue.bytes().map(<[u8]>::to_vec);
        client.write_all(&queue.context("a plan holding its bytes (plan_conn)")?).await?;
        let (log, observer) = (RecordingLog::default(), Arc::new(Recorder::default()));
        let (proxy, l, o) = (self.proxy.clone(), log.clone(), observer.clone());
        let mut restored = Restored::new(server.into_std()?, plan, &conn);
        restored.pending = pending.map(|bytes| Pending { bytes, left: UnsentLeft::default() });
        let task =
            tokio::spawn(async move { resume_connection(&proxy, restored, l, o, ShutdownSignal::never()).await });
        Ok(Session { client, got: Vec::new(), task, log, observer })
    }
}

/// The test's end of a resumed connection.
struct Session {
    client: TcpStream,
    /// Bytes read from the resumed connection so far.
    got: Vec<u8>,
    task: tokio::task::JoinHandle<ResumeOutcome>,
    log: RecordingLog,
    observer: Arc<Recorder>,
}

impl Session {
    /// Reads until `done(got)` holds; false if the connection closed first.
    async fn read_until(&mut self, mut done: impl FnMut(&[u8]) -> bool) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut buf = vec![0u8; 64 * 1024];
        while !done(&self.got) {
            let n = tokio::time::timeout_at(deadline, self.client.read(&mut buf))
                .await
                .context("timed out reading from the resumed connection")??;
            if n == 0 {
                return Ok(false);
            }
            self.got.extend_from_slice(&buf[..n]);
        }
        Ok(true)
    }

    /// Reads to EOF.
    async fn read_to_end(&mut self) -> Result<()> {
        let closed = !self.read_until(|_| false).await?;
        ensure!(closed, "unreachable: read_until(false) ends only at EOF");
        Ok(())
    }

    async fn outcome(self) -> Result<ResumeOutcome> {
        drop(self.client);
        Ok(tokio::time::timeout(Duration::from_secs(20), self.task).await.context("resume did not end")??)
    }
}

// ------------------------------------------------------------------ origins

/// nginx on a loopback port; its access log: `request|range|if-range|status`.
const NGINX: NginxOptions =
    NginxOptions { worker_connections: 256, log_format: Some("$request|$http_range|$http_if_range|$status"), http: "" };

fn upstream(addr: SocketAddr) -> Backend {
    Backend::Upstream(format!("http://{addr}").parse().expect("upstream uri"))
}

/// GETs `path` from `addr` on a fresh connection; the head's bytes (without its hop-by-hop
/// `Connection` field, as the proxy passes it on) and the body.
async fn raw_get(addr: SocketAddr, path: &str) -> Result<(String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).await?;
    let r = decode(&all, &["GET"])?.into_iter().next().context("no response")?;
    ensure!(r.status == 200 && r.complete, "GET {path}: {}", r.head);
    let head = r.head.split_inclusive("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).collect();
    Ok((head, r.body))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// What the hyper origin saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    key: Option<String>,
}

/// A small origin: `GET /plain/<len>` (pattern bytes, no validators), `POST /orders` (executes once
/// per `Idempotency-Key`, answering a repeat with the first answer).
struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    executions: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    async fn start() -> Result<Origin> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let executions = Arc::new(AtomicU64::new(0));
        let done: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let (s, e) = (seen.clone(), executions.clone());
        let task = hyper_origin::serve(listener, move |req: Request<Incoming>| {
            let (s, e, done) = (s.clone(), e.clone(), done.clone());
            async move { Ok::<_, Infallible>(origin_answer(req, &s, &e, &done).await) }
        });
        Ok(Origin { addr, seen, executions, task })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn origin_answer(
    req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    executions: &AtomicU64,
    done: &Mutex<HashMap<String, String>>,
) -> Response<Full<Bytes>> {
    let key = req.headers().get("idempotency-key").map(|v| v.to_str().unwrap_or("").to_owned());
    let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
    seen.lock().unwrap().push(Seen { method: method.clone(), path: path.clone(), key: key.clone() });
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if let Some(len) = path.strip_prefix("/plain/").and_then(|l| l.parse::<usize>().ok()) {
        return Response::new(Full::new(Bytes::from(pattern(3, len))));
    }
    if method == "POST" && path == "/orders" {
        let answer = {
            let mut done = done.lock().unwrap();
            match key.as_ref().and_then(|k| done.get(k)) {
                Some(a) => a.clone(),
                None => {
                    let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
                    let a = format!("order-{n} of {} bytes", body.len());
                    if let Some(k) = key {
                        done.insert(k, a.clone());
                    }
                    a
                }
            }
        };
        let mut r = Response::new(Full::new(Bytes::from(answer)));
        *r.status_mut() = http::StatusCode::CREATED;
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from_static(b"no such thing\n")));
    *r.status_mut() = http::StatusCode::NOT_FOUND;
    r
}

/// An address nothing listens on: a backend that must never be asked.
fn nowhere() -> Backend {
    upstream(SocketAddr::from(([127, 0, 0, 1], free_port())))
}

// ------------------------------------------------------------------ pure parts

/// The continuation a chunked response cut at `cut` gets from `rest`, fed in pieces of `piece`.
fn encode_all(c: &Continuation, rest: &[u8], piece: usize) -> Result<Vec<u8>, EncodeError> {
    let mut enc = ContinuationEncoder::new(c);
    let mut out = Vec::new();
    for p in rest.chunks(piece.max(1)) {
        enc.push(p, &mut out)?;
    }
    enc.finish(&mut out)?;
    Ok(out)
}

#[test]
fn encoder_finishes_a_chunked_body_cut_anywhere_into_a_message_the_framer_accepts() {
    let body = pattern(1, 3000);
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let reply = [head.as_slice(), &chunked_body(&body, 0x400)].concat();
    // Every cut inside the body, the last chunk included.
    for cut in head.len()..reply.len() {
        let mut f = Framer::responses(0).with_body_events();
        f.expect_response(0, "GET");
        let mut ev = Vec::new();
        f.feed(0, &reply[..cut], &mut ev).unwrap();
        let shared::replica::http::Phase::Body { body: state, body_offset, .. } = f.phase().clone() else {
            panic!("cut {cut}: not in the body")
        };
        let framing = continuation_of(&state);
        for piece in [1, 7, 5000] {
            let cont = encode_all(&framing, &body[body_offset as usize..], piece).unwrap();
            let whole = [&reply[..cut], &cont[..]].concat();
            let r = decode(&whole, &["GET"]).unwrap_or_else(|e| panic!("cut {cut} piece {piece}: {e}"));
            assert!(r[0].complete && r[0].body == body, "cut {cut} piece {piece}");
        }
    }
}

/// The planner's continuation for a body state (the planner's own mapping, through a table).
fn continuation_of(state: &shared::replica::http::BodyState) -> Continuation {
    use shared::replica::http::{BodyState, ChunkPos};
    match state {
        BodyState::Length { remaining } => Continuation::Length { remaining: *remaining },
        BodyState::UntilClose => Continuation::UntilClose,
        BodyState::Chunked(ChunkPos::Data { remaining }) => {
            Continuation::Chunked { prefix: vec![], open_chunk: *remaining, finished: false }
        }
        BodyState::Chunked(ChunkPos::DataEnd { cr }) => Continuation::Chunked {
            prefix: if *cr { b"\n".to_vec() } else { b"\r\n".to_vec() },
            open_chunk: 0,
            finished: false,
        },
        BodyState::Chunked(ChunkPos::SizeLine { line }) if line.is_empty() => {
            Continuation::Chunked { prefix: vec![], open_chunk: 0, finished: false }
        }
        BodyState::Chunked(ChunkPos::SizeLine { line }) => {
            let text = line.strip_suffix(b"\r").unwrap_or(line);
            let size = u64::from_str_radix(std::str::from_utf8(text).unwrap(), 16).unwrap();
            let end: &[u8] = if line.ends_with(b"\r") { b"\n" } else { b"\r\n" };
            if size == 0 {
                Continuation::Chunked { prefix: [end, b"\r\n"].concat(), open_chunk: 0, finished: true }
            } else {
                Continuation::Chunked { prefix: end.to_vec(), open_chunk: size, finished: false }
            }
        }
        BodyState::Chunked(ChunkPos::Trailers { line, .. }) => Continuation::Chunked {
            prefix: if line.is_empty() { b"\r\n".to_vec() } else { b"\n".to_vec() },
            open_chunk: 0,
            finished: true,
        },
    }
}

#[test]
fn encoder_holds_back_the_last_content_length_byte_until_the_source_ends() {
    let c = Continuation::Length { remaining: 5 };
    let mut enc = ContinuationEncoder::new(&c);
    let mut out = Vec::new();
    enc.push(b"abcde", &mut out).unwrap();
    assert_eq!(out, b"abcd", "the last byte waits for the source's end");
    assert_eq!(enc.push(b"f", &mut out), Err(EncodeError::TooLong { framing: "Content-Length" }));
    assert_eq!(out, b"abcd", "a longer source never completes the client's message");
    let mut enc = ContinuationEncoder::new(&c);
    let mut out = Vec::new();
    enc.push(b"abc", &mut out).unwrap();
    assert_eq!(enc.finish(&mut out), Err(EncodeError::Short { missing: 2 }));
    let mut enc = ContinuationEncoder::new(&c);
    let mut out = Vec::new();
    enc.push(b"abcde", &mut out).unwrap();
    enc.finish(&mut out).unwrap();
    assert_eq!(out, b"abcde");
    // A chunked continuation that owes the rest of a chunk cannot end early, and writes nothing
    // (not even the size line's end) before its first payload byte.
    let c = Continuation::Chunked { prefix: b"\r\n".to_vec(), open_chunk: 4, finished: false };
    let mut enc = ContinuationEncoder::new(&c);
    let mut out = Vec::new();
    assert_eq!(enc.finish(&mut out), Err(EncodeError::Short { missing: 4 }));
    assert!(out.is_empty());
}

#[test]
fn prefix_check_skips_exactly_the_bytes_the_client_has_and_checks_their_crc() {
    let body = pattern(9, 1000);
    let mut ok = PrefixCheck::new(300, crc32fast::hash(&body[..300]));
    let mut rest = Vec::new();
    for piece in body.chunks(77) {
        rest.extend_from_slice(ok.feed(piece).unwrap());
    }
    assert!(ok.passed());
    assert_eq!(rest, &body[300..]);
    let mut other = body.clone();
    other[299] ^= 1;
    let mut bad = PrefixCheck::new(300, crc32fast::hash(&body[..300]));
    let err = other.chunks(77).map(|p| bad.feed(p).map(|r| r.len())).find_map(Result::err);
    assert!(err.is_some(), "a changed prefix is refused");
}

#[test]
fn steps_of_a_pipelined_connection_number_hyper_s_exchanges_after_the_continued_one() {
    let mut s = Script::open();
    s.answered(0, "/a", b"alpha");
    s.send(b"GET /b HTTP/1.1\r\nHost: o\r\n\r\nGET /c HTTP/1.1\r\nHost: o\r\n\r\nGET /d HTTP/1.1\r\nHost: o\r\n\r\n");
    s.start(1, "GET", "/b", None, false);
    let body = pattern(2, 5000);
    let resp = length_response("", &body);
    s.upstream(1, 0, &resp);
    s.reply(&resp[..1000]);
    let (plan, conn) = s.plan(&with_key());
    let steps = Steps::plan(&plan, &conn).unwrap();
    assert!(matches!(steps.in_flight, InFlight::Continue(ref c) if c.exchange == 1), "{:?}", steps.in_flight);
    assert_eq!((steps.base, steps.skip_through, steps.resume.first_exchange), (1, Some(1), 2));
    assert_eq!(steps.reply_offset, s.logged);
    assert_eq!(steps.queued, vec![(2, "not_started"), (3, "not_started")]);
    assert!(steps.stop_at.is_none());
}

// ------------------------------------------------------------------ continuing partly sent responses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_body_continues_from_the_upstream_log_then_keep_alive_serves_exchange_2() -> Result<()> {
    let files = TempDir::new("files")?;
    let body = pattern(1, 300_000);
    fs::write(files.join("obj.bin"), &body)?;
    fs::write(files.join("next.txt"), b"next one\n")?;
    let nginx = Nginx::start(files.path(), &NGINX)?;
    let (nginx_head, nginx_body) = raw_get(nginx.addr(), "/obj.bin").await?;
    ensure!(nginx_body == body);
    let node = Node::new(upstream(nginx.addr()));

    let mut s = Script::open();
    s.answered(0, "/first", b"hi");
    s.send(b"GET /obj.bin HTTP/1.1\r\nHost: o\r\n\r\n");
    s.start(1, "GET", "/obj.bin", None, false);
    // The whole upstream response was logged; the primary died writing the reply.
    s.upstream(1, 0, &[nginx_head.as_bytes(), &body].concat());
    let etag = header(&nginx_head, "etag").context("nginx sends an ETag")?;
    let client_head =
        format!("HTTP/1.1 200 OK\r\netag: {etag}\r\nvia: 1.1 primary\r\ncontent-length: {}\r\n\r\n", body.len());
    let start = s.logged;
    s.reply(&[client_head.as_bytes(), &body[..100_000]].concat());
    let (plan, conn) = s.plan(&with_key());
    ensure!(matches!(plan.decision, Decision::ContinueFromLog { exchange: 1, .. }), "{:?}", plan.decision);

    let t0 = Instant::now();
    let mut session = node.resume(plan, conn).await?;
    ensure!(session.read_until(|g| g.len() >= 200_000).await?, "closed early");
    println!("continued 200000 bytes from the upstream log in {:?}", t0.elapsed());
    assert_eq!(session.got, &body[100_000..], "exactly the rest of the body");
    assert_eq!(session.log.first_offset(), Some(s.logged), "written through the reply log at its end offset");
    // Keep-alive: the next request on the same connection is served normally, as exchange 2.
    session.client.write_all(b"GET /next.txt HTTP/1.1\r\nHost: o\r\n\r\n").await?;
    let prefix = s.reply[start as usize..].to_vec();
    ensure!(session.read_until(|g| complete_responses(&[&prefix[..], g].concat(), &["GET", "GET"]) == 2).await?);
    let r = decode(&[&prefix[..], &session.got].concat(), &["GET", "GET"])?;
    assert_eq!((r[0].body == body, r[1].status, r[1].body.as_slice()), (true, 200, &b"next one\n"[..]));

    let e1 = node.request(&s.key, 1).await?;
    assert_eq!(
        (e1["resume"].as_str(), e1["complete"].as_bool(), e1["status"].as_u64()),
        (Some("continue_from_log"), Some(true), Some(200))
    );
    let e2 = node.request(&s.key, 2).await?;
    assert_eq!(
        (e2["resume"].clone(), e2["target"].as_str(), e2["status"].as_u64()),
        (Value::Null, Some("/next.txt"), Some(200))
    );
    let starts: Vec<u64> = session.observer.starts.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(starts, vec![2]);
    assert_eq!(session.observer.ends.lock().unwrap()[0], (1, Some(200), true));
    let outcome = session.outcome().await?;
    assert_eq!((outcome.path, outcome.source, outcome.continued_bytes), ("continue_from_log", Some("log"), 200_000));
    assert_eq!(outcome.served.map(|s| s.exchanges), Some(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_cut_mid_chunk_continues_into_a_message_hyper_s_client_decodes_whole() -> Result<()> {
    let node = Node::new(nowhere());
    let body = pattern(4, 50_000);
    let head = b"HTTP/1.1 200 OK\r\nvia: 1.1 primary\r\ntransfer-encoding: chunked\r\n\r\n";
    // The client-facing reply: hyper's chunks (one per upstream frame of 0x2000 bytes).
    let reply = [head.as_slice(), &chunked_body(&body, 0x2000)].concat();
    let second_line = head.len() + 6 + 0x2000 + 2;
    for cut in [head.len() + 3000, second_line + 2, second_line - 1, head.len() + 6 + 0x2000 + 1, reply.len() - 3] {
        let mut s = Script::open();
        s.send(b"GET /stream HTTP/1.1\r\nHost: o\r\n\r\n");
        s.start(0, "GET", "/stream", None, false);
        // The origin sent no Content-Length: the upstream log is re-chunked, in other pieces.
        let pieces: Vec<&[u8]> = body.chunks(7000).collect();
        s.upstream(0, 0, &rechunked("", &pieces, true));
        s.end(0, 200);
        s.reply(&reply[..cut]);
        let (plan, conn) = s.plan(&with_key());
        ensure!(matches!(plan.decision, Decision::ContinueFromLog { .. }), "cut {cut}: {:?}", plan.decision);
        let mut session = node.resume(plan, conn).await?;
        // The continuation ends with the last chunk; hyper's client must decode it all.
        let had = reply[..cut].to_vec();
        ensure!(
            session.read_until(|g| complete_responses(&[&had[..], g].concat(), &["GET"]) == 1).await?,
            "cut {cut}: closed early"
        );
        let (status, decoded) = hyper_decode([&reply[..cut], &session.got[..]].concat(), "/stream").await?;
        assert_eq!(status, 200);
        assert!(decoded == body, "cut {cut}: hyper decoded {} bytes, not the body", decoded.len());
        let outcome = session.outcome().await?;
        assert_eq!((outcome.path, outcome.error), ("continue_from_log", None), "cut {cut}");
    }
    Ok(())
}

/// A GET of `file` from the node's backend cut after `sent` body bytes, the upstream log holding
/// `logged` of them (incomplete): the planner asks for a Range continuation.
async fn cut_download(head: &str, body: &[u8], path: &str, sent: usize, logged: usize) -> (Script, u64) {
    let mut s = Script::open();
    s.answered(0, "/warmup", b"ok");
    s.send(format!("GET {path} HTTP/1.1\r\nHost: o\r\nUser-Agent: test\r\n\r\n").as_bytes());
    s.start(1, "GET", path, None, false);
    s.upstream(1, 0, &[head.as_bytes(), &body[..logged]].concat());
    let start = s.logged;
    s.reply(&[head.as_bytes(), &body[..sent]].concat());
    (s, start)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_sent_download_continues_with_range_from_nginx_and_from_the_static_root() -> Result<()> {
    let files = TempDir::new("files")?;
    let body = pattern(5, 2_000_000);
    fs::write(files.join("big.bin"), &body)?;
    fs::write(files.join("next.txt"), b"next one\n")?;
    let nginx = Nginx::start(files.path(), &NGINX)?;
    // The static root, serving the same files through a node of its own (for its real head).
    let root_node = Node::new(Backend::Root(files.path().to_owned()));
    let root_listener = TcpListener::bind("127.0.0.1:0").await?;
    let root_addr = root_listener.local_addr()?;
    let root_proxy = root_node.proxy.clone();
    let root_server =
        tokio::spawn(async move { root_proxy.run(root_listener, Unprotected, std::future::pending()).await });

    for (name, addr, node) in [
        ("nginx", nginx.addr(), Node::new(upstream(nginx.addr()))),
        ("root", root_addr, Node::new(Backend::Root(files.path().to_owned()))),
    ] {
        let (head, _) = raw_get(addr, "/big.bin").await?;
        let etag = header(&head, "etag").context("an ETag")?.to_owned();
        let (s, start) = cut_download(&head, &body, "/big.bin", 700_000, 900_000).await;
        let (plan, conn) = s.plan(&with_key());
        let Decision::ContinueWithRange { exchange: 1, if_range, .. } = &plan.decision else {
            bail!("{name}: expected a ranged continuation, got {:?}", plan.decision)
        };
        assert_eq!(if_range, &etag, "{name}: the strong ETag guards the range");
        let t0 = Instant::now();
        let mut session = node.resume(plan, conn).await?;
        ensure!(session.read_until(|g| g.len() >= body.len() - 700_000).await?, "{name}: closed early");
        println!("{name}: continued {} bytes with Range in {:?}", body.len() - 700_000, t0.elapsed());
        assert!(session.got == body[700_000..], "{name}: the rest of the body, byte for byte");
        session.client.write_all(b"GET /next.txt HTTP/1.1\r\nHost: o\r\n\r\n").await?;
        let prefix = s.reply[start as usize..].to_vec();
        ensure!(session.read_until(|g| complete_responses(&[&prefix[..], g].concat(), &["GET", "GET"]) == 2).await?);
        let r = decode(&[&prefix[..], &session.got].concat(), &["GET", "GET"])?;
        assert_eq!(r[1].body, b"next one\n", "{name}");
        let e1 = node.request(&s.key, 1).await?;
        assert_eq!(e1["resume"].as_str(), Some("continue_with_range"), "{name}");
        assert_eq!(node.request(&s.key, 2).await?["target"].as_str(), Some("/next.txt"), "{name}");
        let outcome = session.outcome().await?;
        assert_eq!((outcome.source, outcome.error.as_deref()), (Some("range"), None), "{name}");
        if name == "nginx" {
            // nginx logs a request once it has sent all of it, which may be after the client read it.
            let log = wait_until_async("nginx to log the ranged request", Duration::from_secs(10), || {
                let log = nginx.access_log();
                Ok((log.len() >= 3).then_some(log))
            })
            .await?;
            let ranged = log.iter().filter(|l| l.starts_with("GET /big.bin") && l.contains("|bytes=700000-|")).count();
            assert_eq!(ranged, 1, "nginx saw one ranged request: {log:?}");
            // nginx writes a quote in a logged field as \x22.
            let logged_etag = etag.replace('"', "\\x22");
            assert!(log.iter().any(|l| l.contains(&format!("|bytes=700000-|{logged_etag}|206"))), "{log:?}");
        }
    }
    root_server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_answered_200_after_the_file_was_touched_falls_back_to_a_checked_refetch() -> Result<()> {
    let files = TempDir::new("files")?;
    let body = pattern(6, 400_000);
    fs::write(files.join("big.bin"), &body)?;
    let nginx = Nginx::start(files.path(), &NGINX)?;
    let node = Node::new(upstream(nginx.addr()));
    let (head, _) = raw_get(nginx.addr(), "/big.bin").await?;
    let (s, _) = cut_download(&head, &body, "/big.bin", 100_000, 150_000).await;
    // Same bytes, new modification time: the ETag changes, so If-Range gets the whole file (200).
    let f = fs::File::options().write(true).open(files.join("big.bin"))?;
    f.set_modified(SystemTime::now() + Duration::from_secs(5))?;
    drop(f);
    let (plan, conn) = s.plan(&with_key());
    ensure!(matches!(plan.decision, Decision::ContinueWithRange { .. }), "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    ensure!(session.read_until(|g| g.len() >= 300_000).await?, "closed early");
    assert!(session.got == body[100_000..]);
    let outcome = session.outcome().await?;
    assert_eq!((outcome.source, outcome.error), (Some("range_200_refetch"), None));
    let log = wait_until_async("nginx to log the ranged request", Duration::from_secs(10), || {
        let log = nginx.access_log();
        Ok((log.len() >= 2).then_some(log))
    })
    .await?;
    assert!(log.iter().any(|l| l.contains("|bytes=100000-|") && l.ends_with("|200")), "{log:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refetch_continues_when_the_skipped_prefix_matches_and_closes_when_it_does_not() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let body = pattern(3, 120_000); // what the origin serves at /plain/120000
    // No validator in the head: no Range, a whole refetch.
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
    for (name, sent_bytes) in [("match", body.clone()), ("mismatch", pattern(8, 120_000))] {
        let (s, _) = cut_download(&head, &sent_bytes, "/plain/120000", 50_000, 60_000).await;
        let (plan, conn) = s.plan(&with_key());
        ensure!(matches!(plan.decision, Decision::ContinueWithRefetch { .. }), "{name}: {:?}", plan.decision);
        let mut session = node.resume(plan, conn).await?;
        if name == "match" {
            ensure!(session.read_until(|g| g.len() >= 70_000).await?, "closed early");
            assert!(session.got == body[50_000..]);
            let outcome = session.outcome().await?;
            assert_eq!((outcome.source, outcome.error), (Some("refetch"), None));
        } else {
            session.read_to_end().await?;
            assert!(session.got.is_empty(), "not one byte of another representation: got {}", session.got.len());
            let e1 = node.request(&s.key, 1).await?;
            assert_eq!((e1["resume"].as_str(), e1["complete"].as_bool()), (Some("continue_with_refetch"), Some(false)));
            assert!(e1["error"].as_str().unwrap_or("").contains("crc32"), "{e1}");
            let outcome = session.outcome().await?;
            assert_eq!(outcome.closed, Some("failed"));
        }
    }
    assert_eq!(origin.seen().iter().filter(|s| s.path == "/plain/120000").count(), 2);
    Ok(())
}

// ------------------------------------------------------------------ requests with no reply byte sent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_upstream_log_is_replayed_without_asking_the_origin() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let mut s = Script::open();
    s.send(b"GET /slow HTTP/1.1\r\nHost: o\r\n\r\n");
    s.start(0, "GET", "/slow", None, false);
    let logged = length_response("x-origin: yes\r\netag: \"v1\"\r\n", b"the slow answer");
    s.upstream(0, 0, &logged);
    let (plan, conn) = s.plan(&with_key());
    ensure!(plan.decision == Decision::ReplayFromLog { exchange: 0 }, "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    ensure!(session.read_until(|g| complete_responses(g, &["GET"]) == 1).await?);
    let r = decode(&session.got, &["GET"])?;
    assert_eq!((r[0].status, r[0].body.as_slice()), (200, &b"the slow answer"[..]));
    assert_eq!(header(&r[0].head, "x-origin"), Some("yes"));
    assert!(origin.seen().is_empty(), "the origin was not asked again");
    assert_eq!(node.request(&s.key, 0).await?["resume"].as_str(), Some("replay_from_log"));
    assert_eq!(session.log.first_offset(), Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_without_reply_is_resent_and_answered() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let mut s = Script::open();
    s.answered(0, "/a", b"a");
    s.send(b"GET /plain/5000 HTTP/1.1\r\nHost: o\r\n\r\n");
    s.start(1, "GET", "/plain/5000", None, false);
    let (plan, conn) = s.plan(&with_key());
    ensure!(matches!(plan.decision, Decision::Resend { exchange: 1, .. }), "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    ensure!(session.read_until(|g| complete_responses(g, &["GET"]) == 1).await?);
    let r = decode(&session.got, &["GET"])?;
    assert_eq!((r[0].status, r[0].body == pattern(3, 5000)), (200, true));
    assert_eq!(origin.seen().len(), 1);
    let e = node.request(&s.key, 1).await?;
    assert_eq!((e["resume"].as_str(), e["status"].as_u64()), (Some("resend"), Some(200)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_the_old_primary_never_sent_go_out_first_then_the_connection_serves_on() -> Result<()> {
    // A takeover leaves a busy connection's unsent bytes (written by the old primary, never transmitted) to
    // the connection's task: they must reach the client before anything the new primary writes.
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let mut s = Script::open();
    s.answered(0, "/a", b"a");
    let (plan, conn) = s.plan(&with_key());
    ensure!(matches!(plan.decision, Decision::Idle), "{:?}", plan.decision);
    let tail = pattern(9, 300_000);
    let mut session = node.resume_with_pending(plan, conn, Some(tail.clone())).await?;
    ensure!(session.read_until(|g| g.len() >= tail.len()).await?, "closed before the unsent bytes");
    ensure!(session.got == tail, "the unsent bytes arrived altered or followed by others");
    session.client.write_all(b"GET /plain/5000 HTTP/1.1\r\nHost: o\r\n\r\n").await?;
    let n = tail.len();
    ensure!(session.read_until(|g| complete_responses(&g[n..], &["GET"]) == 1).await?);
    let r = decode(&session.got[n..], &["GET"])?;
    assert_eq!((r[0].status, r[0].body == pattern(3, 5000)), (200, true));
    Ok(())
}

/// A POST the primary had sent upstream (the origin executed it) when it died.
fn post_in_flight(own_key: Option<&str>, logged_key: &str, generated: bool) -> Script {
    let mut s = Script::open();
    let mut req = b"POST /orders HTTP/1.1\r\nHost: o\r\nContent-Length: 11\r\n".to_vec();
    if let Some(k) = own_key {
        req.extend_from_slice(format!("Idempotency-Key: {k}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n{\"qty\": 1}\n");
    s.send(&req);
    s.start(0, "POST", "/orders", Some(logged_key), generated);
    s
}

/// What the primary sent before it died: the POST with `key`, executed once at the origin.
async fn primary_sent(origin: &Origin, key: &str) -> Result<String> {
    let mut c = TcpStream::connect(origin.addr).await?;
    let req = format!(
        "POST /orders HTTP/1.1\r\nHost: o\r\nIdempotency-Key: {key}\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{{\"qty\": 1}}\n"
    );
    c.write_all(req.as_bytes()).await?;
    let mut all = Vec::new();
    c.read_to_end(&mut all).await?;
    Ok(String::from_utf8_lossy(&decode(&all, &["POST"])?[0].body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_with_the_client_s_key_is_resent_and_the_origin_executes_it_once() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let first = primary_sent(&origin, "client-key-1").await?;
    let s = post_in_flight(Some("client-key-1"), "client-key-1", false);
    let (plan, conn) = s.plan(&with_key());
    ensure!(matches!(plan.decision, Decision::Resend { .. }), "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    ensure!(session.read_until(|g| complete_responses(g, &["POST"]) == 1).await?);
    let r = decode(&session.got, &["POST"])?;
    assert_eq!((r[0].status, String::from_utf8_lossy(&r[0].body).into_owned()), (201, first));
    assert_eq!(origin.executions.load(Ordering::SeqCst), 1, "executed once");
    let keys: Vec<_> = origin.seen().iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys, vec![Some("client-key-1".to_owned()); 2], "the origin saw the same key twice");
    assert!(origin.seen().iter().all(|s| s.method == "POST" && s.path == "/orders"));
    let e = node.request(&s.key, 0).await?;
    assert_eq!(
        (e["resume"].as_str(), e["idempotency_key"].as_str(), e["key_generated"].as_bool()),
        (Some("resend"), Some("client-key-1"), Some(false))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_with_a_generated_key_is_resent_with_the_logged_key_not_a_new_one() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    primary_sent(&origin, "gen-7f3a").await?;
    let s = post_in_flight(None, "gen-7f3a", true);
    let honours = RetryConfig {
        non_idempotent: RetryPolicy::WithKey,
        origin_honours_generated_keys: true,
        ..RetryConfig::default()
    };
    let (plan, conn) = s.plan(&honours);
    ensure!(matches!(plan.decision, Decision::Resend { .. }), "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    ensure!(session.read_until(|g| complete_responses(g, &["POST"]) == 1).await?);
    assert_eq!(decode(&session.got, &["POST"])?[0].status, 201);
    assert_eq!(origin.executions.load(Ordering::SeqCst), 1);
    assert_eq!(origin.seen()[1].key.as_deref(), Some("gen-7f3a"));
    assert_eq!(node.proxy.stats().keys_generated, 0, "no new key was made");
    let starts = session.observer.starts.lock().unwrap().clone();
    assert_eq!(starts, vec![(0, "/orders".to_owned(), Some("gen-7f3a".to_owned()), true)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_under_never_is_refused_the_connection_closed_without_a_byte_and_logged() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let s = post_in_flight(Some("k-9"), "k-9", false);
    let never = RetryConfig {
        non_idempotent: RetryPolicy::Never,
        origin_honours_generated_keys: false,
        ..RetryConfig::default()
    };
    let (plan, conn) = s.plan(&never);
    ensure!(matches!(plan.decision, Decision::Refuse { exchange: 0, .. }), "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    session.read_to_end().await?;
    assert!(session.got.is_empty(), "no made-up response: {:?}", String::from_utf8_lossy(&session.got));
    assert!(origin.seen().is_empty(), "not re-executed");
    let e = node.request(&s.key, 0).await?;
    assert_eq!(
        (e["resume"].as_str(), e["sent"].as_bool(), e["method"].as_str()),
        (Some("refuse"), Some(false), Some("POST"))
    );
    let outcome = session.outcome().await?;
    assert_eq!((outcome.path, outcome.closed), ("refuse", Some("refuse")));
    Ok(())
}

// ------------------------------------------------------------------ pipelining and keep-alive

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_behind_the_continued_one_are_answered_in_order() -> Result<()> {
    let files = TempDir::new("files")?;
    for (name, text) in [("c.txt", "see\n"), ("d.txt", "dee\n"), ("e.txt", "eee\n")] {
        fs::write(files.join(name), text)?;
    }
    let nginx = Nginx::start(files.path(), &NGINX)?;
    let node = Node::new(upstream(nginx.addr()));
    let mut s = Script::open();
    let burst = ["/a.txt", "/b.bin", "/cached", "/c.txt", "/d.txt", "/e.txt"]
        .iter()
        .map(|t| format!("GET {t} HTTP/1.1\r\nHost: o\r\n\r\n"))
        .collect::<String>();
    s.send(burst.as_bytes());
    // Exchange 0 written in full (in the send queue, not acknowledged).
    s.start(0, "GET", "/a.txt", None, false);
    let r0 = length_response("", b"aaa\n");
    s.upstream(0, 0, &r0);
    s.reply(&r0);
    s.end(0, 200);
    // Exchange 1 handed to the reply log in full, only part of it written; exchange 2 then fetched
    // whole by the primary, none of it written.
    let b = pattern(7, 80_000);
    let r1 = length_response("", &b);
    s.start(1, "GET", "/b.bin", None, false);
    s.upstream(1, 0, &r1);
    s.end(1, 200);
    s.start(2, "GET", "/cached", None, false);
    s.upstream(2, 0, &length_response("", b"cached answer\n"));
    s.end(2, 200);
    let start1 = s.logged;
    s.reply(&r1[..30_000]);
    let (plan, conn) = s.plan(&with_key());
    ensure!(matches!(plan.decision, Decision::ContinueFromLog { exchange: 1, .. }), "{:?}", plan.decision);
    let kinds: Vec<_> = plan.queued.iter().map(|q| q.decision.kind()).collect();
    assert_eq!(kinds, ["replay_from_log", "not_started", "not_started", "not_started"]);
    let mut session = node.resume(plan, conn).await?;
    let prefix = s.reply[start1 as usize..].to_vec();
    let methods = ["GET"; 5];
    ensure!(session.read_until(|g| complete_responses(&[&prefix[..], g].concat(), &methods) == 5).await?);
    let r = decode(&[&prefix[..], &session.got].concat(), &methods)?;
    let bodies: Vec<&[u8]> = r.iter().map(|r| r.body.as_slice()).collect();
    assert_eq!(bodies, vec![&b[..], b"cached answer\n", b"see\n", b"dee\n", b"eee\n"]);
    for (n, path) in
        [(1, "continue_from_log"), (2, "replay_from_log"), (3, "not_started"), (4, "not_started"), (5, "not_started")]
    {
        assert_eq!(node.request(&s.key, n).await?["resume"].as_str(), Some(path), "exchange {n}");
    }
    let log = wait_until_async("nginx to log three requests", Duration::from_secs(10), || {
        let log = nginx.access_log();
        Ok((log.len() >= 3).then_some(log))
    })
    .await?;
    assert_eq!(log.len(), 3, "only the three not started reached the origin: {log:?}");
    // Keep-alive after the burst: the next request is exchange 6, served normally.
    session.client.write_all(b"GET /c.txt HTTP/1.1\r\nHost: o\r\n\r\n").await?;
    let methods = ["GET"; 6];
    ensure!(session.read_until(|g| complete_responses(&[&prefix[..], g].concat(), &methods) == 6).await?);
    let e6 = node.request(&s.key, 6).await?;
    assert_eq!((e6["resume"].clone(), e6["target"].as_str()), (Value::Null, Some("/c.txt")));
    let outcome = session.outcome().await?;
    assert_eq!(outcome.queued.len(), 4);
    assert_eq!(outcome.served.map(|s| s.exchanges), Some(5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_post_refused_under_never_ends_the_connection_after_the_responses_before_it() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let post = "POST /orders HTTP/1.1\r\nHost: o\r\nIdempotency-Key: p-1\r\nContent-Length: 2\r\n\r\n{}";
    let never = RetryConfig {
        non_idempotent: RetryPolicy::Never,
        origin_honours_generated_keys: false,
        ..RetryConfig::default()
    };
    let r0 = length_response("", &pattern(3, 100));
    let mut s2 = Script::open();
    s2.send(
        format!("GET /plain/100 HTTP/1.1\r\nHost: o\r\n\r\n{post}GET /plain/300 HTTP/1.1\r\nHost: o\r\n\r\n")
            .as_bytes(),
    );
    // Exchange 0 handed to the reply log in full, part of it written; the POST behind it had gone
    // upstream when the primary died.
    s2.start(0, "GET", "/plain/100", None, false);
    s2.upstream(0, 0, &r0);
    s2.end(0, 200);
    s2.start(1, "POST", "/orders", Some("p-1"), false);
    s2.reply(&r0[..60]);
    let (plan, conn2) = s2.plan(&never);
    let kinds: Vec<_> = plan.queued.iter().map(|q| q.decision.kind()).collect();
    assert_eq!(kinds, ["refuse", "not_started"]);
    let mut session = node.resume(plan, conn2).await?;
    session.read_to_end().await?;
    let prefix = s2.reply.clone();
    let r = decode(&[&prefix[..], &session.got].concat(), &["GET", "POST"])?;
    assert_eq!(r.len(), 1, "nothing after the refused request");
    assert!(r[0].complete && r[0].body == pattern(3, 100));
    assert!(origin.seen().is_empty(), "the POST was not re-sent, nothing behind it was served");
    let e1 = node.request(&s2.key, 1).await?;
    assert_eq!((e1["resume"].as_str(), e1["method"].as_str()), (Some("refuse"), Some("POST")));
    let outcome = session.outcome().await?;
    assert_eq!((outcome.path, outcome.closed), ("continue_from_log", Some("refuse")));
    assert_eq!(outcome.queued, vec![(1, "refuse"), (2, "not_started")]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_still_arriving_is_read_on_and_served_with_its_exchange_number() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let mut s = Script::open();
    s.answered(0, "/plain/1", b"x");
    s.answered(1, "/plain/2", b"xy");
    s.send(b"GET /plain/10 HTTP/1.1\r\nHo");
    let (plan, conn) = s.plan(&with_key());
    ensure!(plan.decision == Decision::KeepReading { exchange: 2, started_upstream: false }, "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    session.client.write_all(b"st: o\r\n\r\n").await?;
    ensure!(session.read_until(|g| complete_responses(g, &["GET"]) == 1).await?);
    assert_eq!(decode(&session.got, &["GET"])?[0].body, pattern(3, 10));
    assert_eq!(node.request(&s.key, 2).await?["resume"].as_str(), Some("keep_reading"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answer_to_an_upload_still_arriving_is_not_answered_twice() -> Result<()> {
    let origin = Origin::start().await?;
    let node = Node::new(upstream(origin.addr));
    let mut s = Script::open();
    let body = pattern(1, 20_000);
    s.send(b"PUT /too-big HTTP/1.1\r\nHost: o\r\nContent-Length: 20000\r\n\r\n");
    s.send(&body[..5000]);
    s.start(0, "PUT", "/too-big", None, false);
    // The origin answered before the body was in (a 413, say); the reply went out in full.
    let r0 = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
    s.upstream(0, 0, r0);
    s.reply(r0);
    s.end(0, 413);
    let (plan, conn) = s.plan(&with_key());
    ensure!(plan.decision == Decision::Written { exchange: 0 }, "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    // The client sends the rest of its upload, then its next request.
    session.client.write_all(&body[5000..]).await?;
    session.client.write_all(b"GET /plain/7 HTTP/1.1\r\nHost: o\r\n\r\n").await?;
    ensure!(session.read_until(|g| complete_responses(g, &["GET"]) == 1).await?);
    assert_eq!(decode(&session.got, &["GET"])?[0].body, pattern(3, 7));
    let seen = origin.seen();
    assert_eq!((seen.len(), seen[0].path.as_str()), (1, "/plain/7"), "the upload was not re-sent");
    assert_eq!(node.request(&s.key, 1).await?["target"].as_str(), Some("/plain/7"));
    Ok(())
}

/// The primary wrote a response that ends the connection but never closed (frozen for a switchover, or
/// dead first): the resumed connection closes after it instead of waiting for a request that will not
/// come. The same response on a keep-alive exchange leaves the connection to hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_response_that_ends_the_connection_is_followed_by_the_close() -> Result<()> {
    let node = Node::new(nowhere());
    for (request, closes) in [("Connection: close\r\n", true), ("", false)] {
        let mut s = Script::open();
        s.send(format!("GET /a HTTP/1.1\r\nHost: o\r\n{request}\r\n").as_bytes());
        s.start(0, "GET", "/a", None, false);
        let resp = length_response("", b"alpha");
        s.upstream(0, 0, &resp);
        s.reply(&resp);
        s.end(0, 200);
        let (plan, conn) = s.plan(&with_key());
        ensure!(plan.decision == Decision::Written { exchange: 0 }, "{:?}", plan.decision);
        let steps = Steps::plan(&plan, &conn)?;
        let mut session = node.resume(plan, conn).await?;
        if closes {
            ensure!(steps.in_flight == InFlight::Closes { exchange: 0 }, "{:?}", steps.in_flight);
            session.read_to_end().await?;
            let outcome = session.outcome().await?;
            assert_eq!((outcome.closed, outcome.error), (Some("response_closes"), None));
        } else {
            ensure!(steps.in_flight == InFlight::Hyper, "{:?}", steps.in_flight);
            let open = tokio::time::timeout(Duration::from_millis(300), session.read_until(|_| false)).await;
            ensure!(open.is_err(), "a keep-alive connection was closed after its written response: {open:?}");
            assert!(session.outcome().await?.closed.is_none());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_head_cut_in_the_middle_is_truncated_honestly() -> Result<()> {
    let node = Node::new(nowhere());
    let mut s = Script::open();
    s.send(b"GET /x HTTP/1.1\r\nHost: o\r\n\r\n");
    s.start(0, "GET", "/x", None, false);
    s.reply(b"HTTP/1.1 200 OK\r\nContent-Le");
    let (plan, conn) = s.plan(&with_key());
    ensure!(matches!(plan.decision, Decision::Truncate { .. }), "{:?}", plan.decision);
    let mut session = node.resume(plan, conn).await?;
    session.read_to_end().await?;
    assert!(session.got.is_empty());
    assert_eq!(node.request(&s.key, 0).await?["resume"].as_str(), Some("truncate"));
    assert_eq!(session.outcome().await?.closed, Some("truncate"));
    Ok(())
}
