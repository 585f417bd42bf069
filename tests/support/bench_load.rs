//! Load clients of the benchmarks (`us-bench`, `scripts/bench`), run from inside a network namespace.
//!
//! * [`Load`]: a closed-loop keep-alive load. `conns` connections, each sending GETs of one file back to
//!   back and checking every body byte for byte. It records when each request completed, how long it took
//!   from its first attempt, and every failed attempt by kind, so that throughput over time, the longest
//!   stall and the resets around a failover can be read afterwards. A failed request is retried on a new
//!   connection (as a browser or wrk would), so throughput can recover after a failover that loses
//!   connections; the retries count toward that request's time.
//! * [`IdleConns`]: many idle keep-alive connections (one GET each), then a second GET on each (after a
//!   takeover), for the takeover's scale.
//! * The analysis, without I/O: [`per_bucket`], [`recovery`], [`longest_gap`], [`percentile`].
//!
//! What counts as a reset: `ECONNRESET` (or `EPIPE`, which Linux returns on a write after a reset was
//! reported) on an established connection. A refused connect (`ECONNREFUSED`: the answer to the SYN was a
//! RST) is counted apart, and so is an orderly close by the server (EOF) before a response was complete.

use crate::netns;
use anyhow::{Context, Result};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

/// Why an attempt failed, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// `ECONNRESET` or `EPIPE` on an established connection: a RST reached the client.
    Reset,
    /// `ECONNREFUSED`: the SYN was answered with a RST.
    Refused,
    /// The server closed the connection (EOF) before the response was complete.
    Closed,
    /// No byte (or no connection) within the time limit.
    Timeout,
    /// A status other than 200, a wrong length, or a body that differs from the file.
    BadResponse,
    /// Any other error (`EHOSTUNREACH`, ...).
    Other,
}

impl Failure {
    pub const ALL: [Failure; 6] =
        [Failure::Reset, Failure::Refused, Failure::Closed, Failure::Timeout, Failure::BadResponse, Failure::Other];

    /// The kind of an I/O error of a client socket.
    pub fn classify(e: &io::Error) -> Failure {
        match e.raw_os_error() {
            Some(libc::ECONNRESET) | Some(libc::EPIPE) => return Failure::Reset,
            Some(libc::ECONNREFUSED) => return Failure::Refused,
            Some(libc::ETIMEDOUT) => return Failure::Timeout,
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Failure::Reset,
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::TimedOut => Failure::Timeout,
            io::ErrorKind::UnexpectedEof => Failure::Closed,
            _ => Failure::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Failure::Reset => "reset",
            Failure::Refused => "refused",
            Failure::Closed => "closed",
            Failure::Timeout => "timeout",
            Failure::BadResponse => "bad response",
            Failure::Other => "other",
        }
    }
}

/// What the load asks for and where.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    /// The path of the file (`/1k.bin`).
    pub path: String,
    /// The file's exact content: every body is compared with it.
    pub body: Arc<Vec<u8>>,
    pub conns: usize,
    /// A connect, or a read or write, with no progress for this long fails as [`Failure::Timeout`].
    pub timeout: Duration,
    /// The pause after a failed connect before the next one.
    pub retry_pause: Duration,
}

/// A request that completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub conn: u32,
    /// When it completed, since the load's start.
    pub at: Duration,
    /// From the start of its first attempt to its completion (retries and reconnects included).
    pub latency: Duration,
    /// 1 when it succeeded at once.
    pub attempts: u32,
}

/// An attempt that failed (a connect, or a request on a connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub conn: u32,
    pub at: Duration,
    pub kind: Failure,
    /// Whether it was a connect (else a request on an open connection).
    pub connecting: bool,
    pub text: String,
}

/// What a load saw, times relative to its start.
#[derive(Debug, Clone, Default)]
pub struct LoadRecord {
    /// Every completed request, ordered by completion time.
    pub done: Vec<Done>,
    /// Every failed attempt, ordered by time.
    pub failed: Vec<Failed>,
    /// Per connection, when the request still in progress at the stop began (its first attempt).
    pub unfinished: Vec<Duration>,
    /// Connections opened (the first ones included).
    pub connects: u64,
    /// When the load stopped.
    pub ended: Duration,
}

impl LoadRecord {
    /// Failed attempts of one kind.
    pub fn count(&self, kind: Failure) -> usize {
        self.failed.iter().filter(|f| f.kind == kind).count()
    }

    /// Requests that needed more than one attempt.
    pub fn retried(&self) -> usize {
        self.done.iter().filter(|d| d.attempts > 1).count()
    }

    /// The longest time a request waited, from its first attempt to its completion (or to the stop, for a
    /// request still in progress then), and when it began.
    pub fn longest_wait(&self) -> (Duration, Duration) {
        let done = self.done.iter().map(|d| (d.latency, d.at.saturating_sub(d.latency)));
        let open = self.unfinished.iter().map(|&began| (self.ended.saturating_sub(began), began));
        done.chain(open).max_by_key(|&(wait, _)| wait).unwrap_or_default()
    }

    /// [`LoadRecord::longest_wait`] among the requests that completed in `[from, to)` (a request still in
    /// progress at the stop counts as completing then).
    pub fn longest_wait_ending(&self, from: Duration, to: Duration) -> (Duration, Duration) {
        let done =
            self.done.iter().filter(|d| d.at >= from && d.at < to).map(|d| (d.latency, d.at.saturating_sub(d.latency)));
        let open = self
            .unfinished
            .iter()
            .filter(|_| self.ended >= from && self.ended < to)
            .map(|&began| (self.ended.saturating_sub(began), began));
        done.chain(open).max_by_key(|&(wait, _)| wait).unwrap_or_default()
    }

    /// The completion times, in order.
    pub fn times(&self) -> Vec<Duration> {
        self.done.iter().map(|d| d.at).collect()
    }
}

/// What a running [`Load`] shows while it runs.
#[derive(Debug, Default)]
pub struct LoadLive {
    pub done: AtomicU64,
    pub failed: AtomicU64,
}

/// A closed-loop keep-alive load running on its own thread and runtime inside a network namespace;
/// [`Load::stop`] ends it and returns the record. Dropping it stops it too.
pub struct Load {
    pub base: Instant,
    pub live: Arc<LoadLive>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<LoadRecord>>>,
}

impl Load {
    /// Starts `spec.conns` connections from network namespace `ns` (a name under `/run/netns`).
    pub fn start(ns: &str, spec: LoadSpec) -> Result<Load> {
        let live = Arc::new(LoadLive::default());
        let (stop, stop_rx) = watch::channel(false);
        let base = Instant::now();
        let l = live.clone();
        let thread = spawn_in_ns(ns, "bench-load", move || run_load(spec, base, l, stop_rx))?;
        Ok(Load { base, live, stop, thread: Some(thread) })
    }

    /// Whether the load's thread has ended (it ends only on a stop, or when it failed to start).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops every connection (a request in progress is left unfinished) and returns the record.
    pub fn stop(mut self) -> Result<LoadRecord> {
        let _ = self.stop.send(true);
        let t = self.thread.take().context("the load was stopped already")?;
        t.join().map_err(|p| anyhow::anyhow!("the load thread panicked: {}", netns::panic_text(&p)))?
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `make()`'s future on a new thread inside network namespace `ns`, on a two-worker Tokio runtime
/// built there (its workers are in the namespace too, and so is every socket its tasks open).
pub fn spawn_in_ns<T, F>(
    ns: &str,
    name: &str,
    make: impl FnOnce() -> F + Send + 'static,
) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: Future<Output = Result<T>>,
{
    let ns = ns.to_string();
    let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || -> Result<T> {
        netns::enter(&ns)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-client")
            .enable_all()
            .build()
            .context("starting the load's runtime")?;
        let out = rt.block_on(make());
        rt.shutdown_timeout(Duration::from_secs(2));
        out
    })?;
    Ok(thread)
}

/// One attempt's error: its kind and a description.
type AttemptError = (Failure, String);

fn io_failure(what: &str, e: io::Error) -> AttemptError {
    (Failure::classify(&e), format!("{what}: {e}"))
}

/// A client connection and the bytes read past the current response's head.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    chunk: Vec<u8>,
}

impl Conn {
    fn new(s: TcpStream) -> Conn {
        Conn::with_chunk(s, 64 * 1024)
    }

    /// A connection that reads at most `chunk` bytes at a time (small for the many idle connections).
    fn with_chunk(s: TcpStream, chunk: usize) -> Conn {
        Conn { s, buf: Vec::new(), chunk: vec![0; chunk] }
    }

    async fn read_chunk(&mut self, timeout: Duration) -> Result<usize, AttemptError> {
        match tokio::time::timeout(timeout, self.s.read(&mut self.chunk)).await {
            Err(_) => Err((Failure::Timeout, format!("no byte for {timeout:?}"))),
            Ok(Err(e)) => Err(io_failure("reading the response", e)),
            Ok(Ok(0)) => Err((Failure::Closed, "the server closed the connection".into())),
            Ok(Ok(n)) => Ok(n),
        }
    }

    /// One GET (`req`) whose body must be `body`. `Ok(true)` when the server said it closes the connection
    /// after this response.
    async fn get(&mut self, req: &[u8], body: &[u8], timeout: Duration) -> Result<bool, AttemptError> {
        match tokio::time::timeout(timeout, self.s.write_all(req)).await {
            Err(_) => return Err((Failure::Timeout, format!("writing the request took over {timeout:?}"))),
            Ok(Err(e)) => return Err(io_failure("writing the request", e)),
            Ok(Ok(())) => {}
        }
        let head_end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err((Failure::BadResponse, "response head over 64 KiB".into()));
            }
            let n = self.read_chunk(timeout).await?;
            self.buf.extend_from_slice(&self.chunk[..n]);
        };
        let closes = check_head(&self.buf[..head_end], body.len() as u64).map_err(|e| (Failure::BadResponse, e))?;
        let mut offset = 0usize;
        let rest = &self.buf[head_end..];
        if rest.len() > body.len() {
            return Err((Failure::BadResponse, format!("{} bytes after the response", rest.len() - body.len())));
        }
        if rest != &body[..rest.len()] {
            return Err((Failure::BadResponse, "the body differs from the file".into()));
        }
        offset += rest.len();
        self.buf.clear();
        while offset < body.len() {
            let n = self.read_chunk(timeout).await?;
            if offset + n > body.len() {
                return Err((Failure::BadResponse, format!("{} bytes after the response", offset + n - body.len())));
            }
            if self.chunk[..n] != body[offset..offset + n] {
                return Err((Failure::BadResponse, format!("the body differs from the file near byte {offset}")));
            }
            offset += n;
        }
        Ok(closes)
    }
}

/// Checks a response head: 200 and a `Content-Length` of `len`. Returns whether it says `Connection: close`.
fn check_head(head: &[u8], len: u64) -> Result<bool, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).map_err(|e| format!("unparsable response head: {e}"))?;
    if resp.code != Some(200) {
        return Err(format!("status {:?}", resp.code));
    }
    let header = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let length = header("content-length")
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
        .ok_or("no content-length")?;
    if length != len {
        return Err(format!("content-length {length}, the file has {len}"));
    }
    Ok(header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close")))
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, AttemptError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err((Failure::Timeout, format!("connect took over {timeout:?}"))),
        Ok(Err(e)) => Err(io_failure("connecting", e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// What one connection of a [`Load`] saw.
#[derive(Default)]
struct ConnLog {
    done: Vec<Done>,
    failed: Vec<Failed>,
    unfinished: Option<Duration>,
    connects: u64,
}

async fn run_load(
    spec: LoadSpec,
    base: Instant,
    live: Arc<LoadLive>,
    stop: watch::Receiver<bool>,
) -> Result<LoadRecord> {
    let spec = Arc::new(spec);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..spec.conns {
        tasks.spawn(conn_loop(i as u32, spec.clone(), base, live.clone(), stop.clone()));
    }
    let mut record = LoadRecord::default();
    while let Some(log) = tasks.join_next().await {
        let log = log.context("a load task failed")?;
        record.done.extend(log.done);
        record.failed.extend(log.failed);
        record.unfinished.extend(log.unfinished);
        record.connects += log.connects;
    }
    record.ended = base.elapsed();
    record.done.sort_by_key(|d| d.at);
    record.failed.sort_by_key(|f| f.at);
    Ok(record)
}

/// One connection of a [`Load`]: requests back to back until the stop; a failed attempt drops the
/// connection and the request is tried again on a new one.
async fn conn_loop(
    i: u32,
    spec: Arc<LoadSpec>,
    base: Instant,
    live: Arc<LoadLive>,
    mut stop: watch::Receiver<bool>,
) -> ConnLog {
    let mut log = ConnLog::default();
    let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", spec.path, spec.host).into_bytes();
    let mut conn: Option<Conn> = None;
    let fail = |log: &mut ConnLog, (kind, text): AttemptError, connecting: bool| {
        live.failed.fetch_add(1, Ordering::Relaxed);
        log.failed.push(Failed { conn: i, at: base.elapsed(), kind, connecting, text });
    };
    'requests: loop {
        let began = Instant::now();
        let mut attempts = 0u32;
        loop {
            if *stop.borrow() {
                log.unfinished = Some(began - base);
                break 'requests;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => {
                    let r = tokio::select! {
                        r = connect(spec.addr, spec.timeout) => r,
                        _ = stop.wait_for(|s| *s) => continue,
                    };
                    match r {
                        Ok(s) => {
                            log.connects += 1;
                            conn.insert(Conn::new(s))
                        }
                        Err(e) => {
                            fail(&mut log, e, true);
                            tokio::select! {
                                _ = tokio::time::sleep(spec.retry_pause) => {}
                                _ = stop.wait_for(|s| *s) => {}
                            }
                            continue;
                        }
                    }
                }
            };
            attempts += 1;
            let r = tokio::select! {
                r = c.get(&req, &spec.body, spec.timeout) => r,
                _ = stop.wait_for(|s| *s) => continue,
            };
            match r {
                Ok(closes) => {
                    let now = Instant::now();
                    log.done.push(Done { conn: i, at: now - base, latency: now - began, attempts });
                    live.done.fetch_add(1, Ordering::Relaxed);
                    if closes {
                        conn = None;
                    }
                    continue 'requests;
                }
                Err(e) => {
                    fail(&mut log, e, false);
                    conn = None;
                }
            }
        }
    }
    log
}

// ---------------------------------------------------------------------------------------------------------

/// Idle keep-alive connections for a takeover's scale.
#[derive(Debug, Clone)]
pub struct IdleSpec {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub body: Arc<Vec<u8>>,
    pub count: usize,
    /// Connections opening (or making their second request) at once.
    pub concurrency: usize,
    pub timeout: Duration,
}

/// What the idle connections saw.
#[derive(Debug, Clone, Default)]
pub struct IdleReport {
    pub opened: usize,
    pub open_failed: usize,
    /// Connections that got a byte, a close or a reset while idle.
    pub broke_while_idle: usize,
    pub second_ok: usize,
    pub second_failed: usize,
    /// How long each successful second request took, sorted.
    pub second_latency: Vec<Duration>,
    /// The first few errors.
    pub errors: Vec<String>,
}

#[derive(Default)]
struct IdleShared {
    opened: AtomicUsize,
    open_failed: AtomicUsize,
    broke: AtomicUsize,
    second_ok: AtomicUsize,
    second_failed: AtomicUsize,
    latencies: std::sync::Mutex<Vec<Duration>>,
    errors: std::sync::Mutex<Vec<String>>,
}

impl IdleShared {
    fn error(&self, text: String) {
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if e.len() < 10 {
            e.push(text);
        }
    }
}

/// `count` connections, each opened with one GET and then idle until [`IdleConns::second_round`], which
/// makes one more GET on each. They stay open until [`IdleConns::finish`] (or the drop) closes them all.
pub struct IdleConns {
    sh: Arc<IdleShared>,
    count: usize,
    round2: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl IdleConns {
    /// Starts opening the connections from network namespace `ns`; [`IdleConns::settled`] says when every
    /// one is open or failed.
    pub fn open(ns: &str, spec: IdleSpec) -> Result<IdleConns> {
        let sh = Arc::new(IdleShared::default());
        let (round2, round2_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let count = spec.count;
        let s = sh.clone();
        let thread = spawn_in_ns(ns, "bench-idle", move || run_idle(spec, s, round2_rx, stop_rx))?;
        Ok(IdleConns { sh, count, round2, stop, thread: Some(thread) })
    }

    /// (opened, failed to open) so far.
    pub fn opening(&self) -> (usize, usize) {
        (self.sh.opened.load(Ordering::Relaxed), self.sh.open_failed.load(Ordering::Relaxed))
    }

    /// Every connection is open or failed to open.
    pub fn settled(&self) -> bool {
        let (ok, failed) = self.opening();
        ok + failed >= self.count
    }

    pub fn second_round(&self) {
        let _ = self.round2.send(true);
    }

    /// Second requests finished (well or not), and connections that broke while idle.
    pub fn second_done(&self) -> usize {
        let r = Ordering::Relaxed;
        self.sh.second_ok.load(r) + self.sh.second_failed.load(r) + self.sh.broke.load(r)
    }

    pub fn opened(&self) -> usize {
        self.sh.opened.load(Ordering::Relaxed)
    }

    /// Whether the client thread ended early (it failed).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Closes every connection and reports.
    pub fn finish(mut self) -> Result<IdleReport> {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|p| anyhow::anyhow!("the idle client thread panicked: {}", netns::panic_text(&p)))??;
        }
        let r = Ordering::Relaxed;
        let mut second_latency = self.sh.latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
        second_latency.sort_unstable();
        Ok(IdleReport {
            opened: self.sh.opened.load(r),
            open_failed: self.sh.open_failed.load(r),
            broke_while_idle: self.sh.broke.load(r),
            second_ok: self.sh.second_ok.load(r),
            second_failed: self.sh.second_failed.load(r),
            second_latency,
            errors: self.sh.errors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }
}

impl Drop for IdleConns {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run_idle(
    spec: IdleSpec,
    sh: Arc<IdleShared>,
    round2: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let spec = Arc::new(spec);
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..spec.count {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.context("semaphore closed")?,
            _ = stop.wait_for(|s| *s) => break,
        };
        tasks.spawn(idle_conn(i, spec.clone(), permit, sem.clone(), sh.clone(), round2.clone(), stop.clone()));
    }
    let _ = stop.wait_for(|s| *s).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn idle_conn(
    i: usize,
    spec: Arc<IdleSpec>,
    permit: tokio::sync::OwnedSemaphorePermit,
    sem: Arc<Semaphore>,
    sh: Arc<IdleShared>,
    mut round2: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", spec.path, spec.host).into_bytes();
    let opened = async {
        let mut c = Conn::with_chunk(connect(spec.addr, spec.timeout).await?, 4096);
        c.get(&req, &spec.body, spec.timeout).await?;
        Ok::<_, AttemptError>(c)
    }
    .await;
    drop(permit);
    let mut c = match opened {
        Ok(c) => {
            sh.opened.fetch_add(1, Ordering::Relaxed);
            c
        }
        Err((kind, text)) => {
            sh.open_failed.fetch_add(1, Ordering::Relaxed);
            sh.error(format!("connection {i}: first request: {} ({text})", kind.name()));
            return;
        }
    };
    let mut probe = [0u8; 1];
    tokio::select! {
        _ = round2.wait_for(|go| *go) => {}
        _ = stop.wait_for(|s| *s) => return,
        r = c.s.read(&mut probe) => {
            let what = match r {
                Ok(0) => "the server closed it".to_string(),
                Ok(_) => "the server sent bytes unasked".to_string(),
                Err(e) => format!("{} ({e})", Failure::classify(&e).name()),
            };
            sh.broke.fetch_add(1, Ordering::Relaxed);
            sh.error(format!("connection {i} while idle: {what}"));
            return;
        }
    }
    let Ok(permit) = sem.acquire_owned().await else { return };
    let began = Instant::now();
    match c.get(&req, &spec.body, spec.timeout).await {
        Ok(_) => {
            sh.latencies.lock().unwrap_or_else(|e| e.into_inner()).push(began.elapsed());
            sh.second_ok.fetch_add(1, Ordering::Relaxed);
        }
        Err((kind, text)) => {
            sh.second_failed.fetch_add(1, Ordering::Relaxed);
            sh.error(format!("connection {i}: second request: {} ({text})", kind.name()));
        }
    }
    drop(permit);
    let _ = stop.wait_for(|s| *s).await;
}

// ---------------------------------------------------------------------------------------------------------
// The analysis.

/// Completions per bucket of `width`: bucket `k` counts the times in `[from + k·width, from + (k+1)·width)`,
/// for every whole bucket before `to`. `times` must be sorted.
pub fn per_bucket(times: &[Duration], from: Duration, to: Duration, width: Duration) -> Vec<u64> {
    if to <= from || width.is_zero() {
        return Vec::new();
    }
    let n = ((to - from).as_nanos() / width.as_nanos()) as usize;
    let mut out = vec![0u64; n];
    let start = times.partition_point(|&t| t < from);
    for &t in &times[start..] {
        let k = ((t - from).as_nanos() / width.as_nanos()) as usize;
        if k >= n {
            break;
        }
        out[k] += 1;
    }
    out
}

/// How throughput came back after a failure, from completions per bucket counted from the failure on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// No bucket fell below the fraction of the baseline.
    NoDip,
    /// The first window of buckets whose mean is back at the fraction of the baseline starts this many
    /// buckets after the failure.
    After(usize),
    /// No whole window after the dip got back to it.
    Never,
}

/// `after[k]` is the count of bucket `k` after the failure, `baseline` the mean count per bucket before it.
/// Throughput has recovered at the first bucket, from the first one below `fraction · baseline` on, that is at
/// least `fraction · baseline` itself and starts `window` consecutive buckets whose mean is too (a catch-up
/// burst right after an outage does not count the outage as recovered).
pub fn recovery(after: &[u64], baseline: f64, fraction: f64, window: usize) -> Recovery {
    let floor = fraction * baseline;
    let Some(dip) = after.iter().position(|&c| (c as f64) < floor) else { return Recovery::NoDip };
    let window = window.max(1);
    for k in dip..after.len() {
        let Some(w) = after.get(k..k + window) else { break };
        let mean = w.iter().sum::<u64>() as f64 / window as f64;
        if after[k] as f64 >= floor && mean >= floor {
            return Recovery::After(k);
        }
    }
    Recovery::Never
}

/// The longest time in `[from, to]` with no completion (sorted `times`), and when it began.
pub fn longest_gap(times: &[Duration], from: Duration, to: Duration) -> (Duration, Duration) {
    let mut last = from;
    let mut best = (Duration::ZERO, from);
    for &t in times.iter().filter(|&&t| t >= from && t <= to) {
        if t - last > best.0 {
            best = (t - last, last);
        }
        last = t;
    }
    if to > last && to - last > best.0 {
        best = (to - last, last);
    }
    best
}

/// The nearest-rank percentile `p` (0..=100) of sorted `values`; zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // The small offset keeps float dust (0.999 · 1000 = 999.0000000000001) from moving up a rank.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn errors_are_classified_by_what_the_client_saw() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(Failure::classify(&os(libc::ECONNRESET)), Failure::Reset);
        assert_eq!(Failure::classify(&os(libc::EPIPE)), Failure::Reset);
        assert_eq!(Failure::classify(&os(libc::ECONNREFUSED)), Failure::Refused);
        assert_eq!(Failure::classify(&os(libc::ETIMEDOUT)), Failure::Timeout);
        assert_eq!(Failure::classify(&os(libc::EHOSTUNREACH)), Failure::Other);
        assert_eq!(Failure::classify(&io::Error::from(io::ErrorKind::UnexpectedEof)), Failure::Closed);
    }

    #[test]
    fn buckets_count_half_open_intervals_and_drop_the_partial_last_one() {
        let times = [ms(5), ms(99), ms(100), ms(150), ms(299), ms(300), ms(350)];
        assert_eq!(per_bucket(&times, ms(0), ms(350), ms(100)), vec![2, 2, 1]);
        assert_eq!(per_bucket(&times, ms(100), ms(300), ms(100)), vec![2, 1]);
        assert!(per_bucket(&times, ms(300), ms(300), ms(100)).is_empty());
    }

    #[test]
    fn recovery_is_the_first_full_window_back_at_the_fraction_after_the_dip() {
        // Baseline 10 per bucket; floor 9.
        assert_eq!(recovery(&[10, 9, 12, 10], 10.0, 0.9, 3), Recovery::NoDip);
        assert_eq!(recovery(&[10, 0, 0, 5, 9, 10, 10, 10], 10.0, 0.9, 3), Recovery::After(4));
        // The outage's buckets are not recovered because a burst follows them.
        assert_eq!(recovery(&[0, 0, 30, 20, 9, 9, 9], 10.0, 0.9, 3), Recovery::After(2));
        // A single good bucket inside a poor window is not a recovery.
        assert_eq!(recovery(&[0, 20, 0, 0, 9, 9, 9], 10.0, 0.9, 3), Recovery::After(4));
        assert_eq!(recovery(&[0, 0, 0, 9, 9], 10.0, 0.9, 3), Recovery::Never);
    }

    #[test]
    fn longest_gap_includes_both_edges() {
        let times = [ms(10), ms(20), ms(80), ms(90)];
        assert_eq!(longest_gap(&times, ms(0), ms(100)), (ms(60), ms(20)));
        assert_eq!(longest_gap(&times, ms(0), ms(300)), (ms(210), ms(90)));
        assert_eq!(longest_gap(&[], ms(5), ms(15)), (ms(10), ms(5)));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<Duration> = (1..=1000).map(ms).collect();
        assert_eq!(percentile(&v, 50.0), ms(500));
        assert_eq!(percentile(&v, 99.0), ms(990));
        assert_eq!(percentile(&v, 99.9), ms(999));
        assert_eq!(percentile(&v, 100.0), ms(1000));
        assert_eq!(percentile(&v, 0.0), ms(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn the_longest_wait_counts_a_request_still_waiting_at_the_stop() {
        let mut r = LoadRecord {
            done: vec![Done { conn: 0, at: ms(500), latency: ms(300), attempts: 2 }],
            ended: ms(1000),
            ..Default::default()
        };
        assert_eq!(r.longest_wait(), (ms(300), ms(200)));
        r.unfinished.push(ms(400));
        assert_eq!(r.longest_wait(), (ms(600), ms(400)));
        assert_eq!(r.retried(), 1);
        // Split at a moment: what completed before it, and what completed (or was still waiting) after it.
        assert_eq!(r.longest_wait_ending(ms(0), ms(600)), (ms(300), ms(200)));
        assert_eq!(r.longest_wait_ending(ms(600), Duration::MAX), (ms(600), ms(400)));
        assert_eq!(r.longest_wait_ending(ms(0), ms(400)), (Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn response_heads_are_checked_for_status_and_length() {
        assert_eq!(check_head(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", 4), Ok(false));
        assert_eq!(check_head(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nConnection: close\r\n\r\n", 4), Ok(true));
        assert!(check_head(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\n", 4).is_err());
        assert!(check_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 4).is_err());
    }
}
