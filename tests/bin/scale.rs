//! `us-scale`: the scale of one takeover (`scripts/scale`). The replicated pair runs in a namespace test
//! bed (client, primary on `server`, spare on `spare`, nginx on `origin`). The backup is killed, so the
//! primary serves unprotected while the clients open many idle keep-alive connections (each makes one
//! request, then stays open and idle) and a smaller number of active transfers (keep-alive GET loops and
//! long downloads read at a fixed rate, every body checked byte for byte). A spare then joins the
//! primary (snapshot of every connection, then the stream), and once the pair is protected the primary
//! fails. The new primary restores every connection; each active transfer must carry on, and each idle
//! connection then makes a second request on the same connection.
//!
//! Measured: the join time (spare started → both nodes `connected`, by the `peer_since` their `/status` gives), the snapshot (the
//! primary's log), the takeover's phases (the new primary's `/status`), and what the clients saw: errors,
//! and the longest wait for a byte of the active transfers before, during the join, while protected and
//! across the takeover.
//!
//! The clients are tasks of a small Tokio runtime on threads that entered the client host's network
//! namespace (the sockets stay there). Exit status: 0 when no client saw an error and every connection
//! continued after the takeover; 1 otherwise (or when the run itself fails); 130 after SIGINT/SIGTERM.
//! Every exit path ends the processes and removes the test bed (the `Pair`'s drop), and the scratch
//! directory unless `--keep`.

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use serde_json::Value;
use std::fs;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use understudy_tests::harness::unique_id;
use understudy_tests::pair::{PORT, Pair, PairOptions, VIP};
use understudy_tests::pattern;
use understudy_tests::tool::{self, Clock, check_interrupted};

const MB: f64 = 1e6;

/// A file of the origin's document root: pattern `key`, `len` bytes.
#[derive(Clone, Copy, Debug)]
struct Doc {
    name: &'static str,
    key: u64,
    len: u64,
}

/// What each idle connection asks for when it opens, and again after the takeover.
const IDLE_FIRST: Doc = Doc { name: "idle1.bin", key: 300, len: 512 };
const IDLE_SECOND: Doc = Doc { name: "idle2.bin", key: 301, len: 2048 };
/// The keep-alive loops of the active transfers (even-numbered ones) cycle through these.
const LOOP_DOCS: [Doc; 4] = [
    Doc { name: "a0.bin", key: 400, len: 1_000 },
    Doc { name: "a1.bin", key: 401, len: 20_000 },
    Doc { name: "a2.bin", key: 402, len: 150_000 },
    Doc { name: "a3.bin", key: 403, len: 5 },
];
/// The long download of the download transfers (its length follows their rate).
const BIG_NAME: &str = "big.bin";
const BIG_KEY: u64 = 7;
/// Waits for data at least this long are kept for the stall report.
const WAIT_RECORD: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Failure {
    /// SIGKILL to the primary process; its host stays up.
    Kill,
    /// Every interface of the primary's host goes down at once; the cut-off process keeps running.
    PowerCut,
}

impl Failure {
    fn describe(self) -> &'static str {
        match self {
            Failure::Kill => "kill -9 of the primary process (host stays up)",
            Failure::PowerCut => "power cut of the primary host (all its interfaces down)",
        }
    }
}

#[derive(Parser)]
#[command(
    name = "us-scale",
    about = "The scale of one takeover: a spare joins a primary serving many idle keep-alive connections and \
active transfers, then the primary fails; join time, snapshot, restore time and client stalls are reported",
    long_about = "Builds a namespace test bed (client, primary, spare, nginx origin) and starts the pair, then \
kills the backup so that the primary serves unprotected. From the client host, --idle connections each make one \
request and then stay open and idle, and --active transfers run continuously, every body checked byte for byte: \
--downloads of them (half by default) are long downloads read at --download-rate-kb, the others keep-alive GET \
loops (5 B to 150 kB, read at full speed, --loop-pause-ms between requests). After --settle seconds a spare joins the primary (snapshot of every connection, then the stream); the \
join time is from starting the spare until both nodes are connected (their /status `peer_since`, which each node stamps when its peer state changes; polling /status only notices it). Once the pair has \
stayed protected for --settle seconds in a row (a primary may give its backup up and let it join again: each \
such re-join is counted), the primary fails (--failure); the spare restores every connection with TCP_REPAIR and serves them. \
Every active transfer must receive bytes the new primary sent (beyond what its socket held when the takeover \
was seen), then every idle connection makes a second request on the same connection and checks the body.\n\n\
The report: join time and the snapshot (connections, approximate bytes, time to build it; from the primary's \
log), the takeover's phases from the new primary's /status (detection, fencing, restore of all connections, \
total), the connections restored, and per client kind the errors. \"Stall\" is the longest time an active \
transfer waited in a read for its next byte (a download's own rate pauses and a loop's pauses between requests \
excluded; a loop's wait for a response counts), in four windows: \
before the join (waits entirely before it), overlapping the join, protected (waits entirely between the join \
and the failure), and overlapping the failure or after it. Goals (issue 4): join under 1 s, restore of all \
connections under 200 ms, no client error.\n\n\
Exit status 0 when no client saw an error and every connection continued after the takeover, 1 otherwise, \
130 when interrupted. The test bed, every process and (unless --keep) the scratch directory are removed on \
every exit path. Needs root, nginx, curl, iptables, arptables, nftables and the release build of primary, \
backup and us-scale side by side (scripts/scale does all of that). The open-files limit is raised for the \
clients and the nodes."
)]
struct Cli {
    /// Idle keep-alive connections: one request each, then idle until after the takeover.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=45_000))]
    idle: u64,
    /// Active transfers running through the join and the takeover.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=5_000))]
    active: u64,
    /// Each download's read rate, in kB/s (10^3 bytes).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    download_rate_kb: u64,
    /// How many of the active transfers are downloads (the others are GET loops); default: half.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=5_000))]
    downloads: Option<u64>,
    /// Pause between the requests of a GET loop, in ms.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    loop_pause_ms: u64,
    /// Idle connections opening (or making their second request) at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=900))]
    concurrency: u64,
    /// Seconds the clients run before the spare starts, and again between the join and the failure.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=600))]
    settle: u64,
    /// How the primary fails.
    #[arg(long, value_enum, default_value_t = Failure::Kill)]
    failure: Failure,
    /// A client that waits this long (seconds) for a byte counts an error.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=600))]
    stall_limit: u64,
    /// Keep the scratch directory (node logs, request logs, origin's files); its path is printed.
    #[arg(long)]
    keep: bool,
}

fn main() {
    let cli = Cli::parse();
    tool::main("us-scale", cli.keep, || scale(&cli));
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------------------------------------------------
// The clients: Tokio tasks inside the client host's network namespace.

/// What every client task shares with the run (counters, the stall records, the phase signals).
struct Shared {
    base: Instant,
    idle: usize,
    /// Active transfers `0..downloads` are downloads.
    downloads: usize,
    idle_opened: AtomicUsize,
    idle_open_failed: AtomicUsize,
    idle_second_ok: AtomicUsize,
    idle_second_failed: AtomicUsize,
    /// Per idle connection: how long its second request took, in ns (0: not made).
    idle_second_ns: Vec<AtomicU64>,
    active_started: AtomicUsize,
    active_requests: AtomicU64,
    active_bytes: AtomicU64,
    actives: Vec<ActiveState>,
    /// When the new primary was seen serving ([`Shared::ns`]; 0: not yet).
    takeover_ns: AtomicU64,
    errors: AtomicUsize,
    error_lines: Mutex<Vec<String>>,
}

/// One active transfer, as seen from the run. Times are [`Shared::ns`] values (0: never).
#[derive(Default)]
struct ActiveState {
    /// Bytes read from the socket.
    bytes: AtomicU64,
    /// `bytes` plus what the socket's receive queue held when the transfer first read after the takeover
    /// was seen (0: not yet): bytes beyond it were sent by the new primary.
    owed: AtomicU64,
    /// When it first read bytes the new primary sent.
    continued_at: AtomicU64,
    /// When the read in progress began, if one waits for data now.
    waiting_since: AtomicU64,
    failed: AtomicBool,
    /// Waits for data of [`WAIT_RECORD`] or more: (began, ended).
    waits: Mutex<Vec<(u64, u64)>>,
}

impl Shared {
    /// Nanoseconds since the run's base instant, plus one (0 means "never").
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64 + 1
    }

    fn at(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns.saturating_sub(1))
    }

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut lines = self.error_lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() < 20 {
            lines.push(what);
        }
    }
}

/// The client side of the run.
#[derive(Clone, Copy)]
struct ClientConfig {
    vip: SocketAddr,
    idle: usize,
    active: usize,
    rate: u64,
    /// Active transfers `0..downloads` are downloads, the others GET loops.
    downloads: usize,
    pause: Duration,
    concurrency: usize,
    big_len: u64,
    stall_limit: Duration,
}

/// Keeps an active transfer's reads at its rate. A transfer that fell more than half a second behind
/// (a stall) starts over from now instead of catching up in a burst.
struct Pacer {
    start: Instant,
    bytes: u64,
    rate: u64,
}

impl Pacer {
    async fn wait(&mut self) {
        let due = self.start + Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        } else if now - due > Duration::from_millis(500) {
            self.start = now;
            self.bytes = 0;
        }
    }
}

/// A client connection with the response bytes read but not yet used.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    /// The most bytes one read asks for.
    read_len: usize,
    pace: Option<Pacer>,
    /// Active transfers: the shared state and their index.
    probe: Option<(Arc<Shared>, usize)>,
    stall_limit: Duration,
}

impl Conn {
    async fn read_more(&mut self) -> Result<()> {
        if let Some(p) = self.pace.as_mut() {
            p.wait().await;
        }
        if let Some((sh, i)) = &self.probe {
            let a = &sh.actives[*i];
            if sh.takeover_ns.load(Ordering::Relaxed) != 0 && a.owed.load(Ordering::Relaxed) == 0 {
                let mut queued: libc::c_int = 0;
                // SAFETY: FIONREAD on a socket we own, into an int on this frame.
                if unsafe { libc::ioctl(self.s.as_raw_fd(), libc::FIONREAD, &mut queued) } != 0 {
                    bail!("FIONREAD: {}", std::io::Error::last_os_error());
                }
                a.owed.store(a.bytes.load(Ordering::Relaxed) + queued.max(0) as u64 + 1, Ordering::Relaxed);
            }
        }
        let began = Instant::now();
        if let Some((sh, i)) = &self.probe {
            sh.actives[*i].waiting_since.store(sh.ns(began), Ordering::Relaxed);
        }
        let read = tokio::time::timeout(self.stall_limit, self.s.read(&mut self.chunk[..self.read_len])).await;
        let ended = Instant::now();
        if let Some((sh, i)) = &self.probe {
            let a = &sh.actives[*i];
            a.waiting_since.store(0, Ordering::Relaxed);
            if ended - began >= WAIT_RECORD {
                a.waits.lock().unwrap_or_else(|e| e.into_inner()).push((sh.ns(began), sh.ns(ended)));
            }
        }
        let n = match read {
            Err(_) => bail!("no byte for {:?}", self.stall_limit),
            Ok(r) => r.context("reading the response")?,
        };
        ensure!(n > 0, "the server closed the connection");
        if let Some((sh, i)) = &self.probe {
            let a = &sh.actives[*i];
            let now = sh.ns(ended);
            let bytes = a.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            sh.active_bytes.fetch_add(n as u64, Ordering::Relaxed);
            let owed = a.owed.load(Ordering::Relaxed);
            if owed != 0 && bytes >= owed && a.continued_at.load(Ordering::Relaxed) == 0 {
                a.continued_at.store(now, Ordering::Relaxed);
            }
        }
        if let Some(p) = self.pace.as_mut() {
            p.bytes += n as u64;
        }
        self.buf.extend_from_slice(&self.chunk[..n]);
        Ok(())
    }

    /// One GET of `doc` on the keep-alive connection, the body checked byte for byte.
    async fn get(&mut self, doc: Doc) -> Result<()> {
        let req = format!("GET /{} HTTP/1.1\r\nHost: {VIP}\r\n\r\n", doc.name);
        tokio::time::timeout(self.stall_limit, self.s.write_all(req.as_bytes()))
            .await
            .context("writing the request timed out")?
            .context("writing the request")?;
        let head_end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            ensure!(self.buf.len() < 64 * 1024, "response head over 64 KiB");
            self.read_more().await?;
        };
        understudy_tests::load::check_head(&self.buf[..head_end], doc.len)?;
        self.buf.drain(..head_end);
        let mut offset = 0u64;
        while offset < doc.len {
            if self.buf.is_empty() {
                self.read_more().await?;
            }
            let take = self.buf.len().min((doc.len - offset) as usize);
            if let Some(at) = pattern::first_mismatch(doc.key, offset, &self.buf[..take]) {
                bail!("body differs at byte {}", offset + at as u64);
            }
            offset += take as u64;
            self.buf.drain(..take);
        }
        ensure!(self.buf.is_empty(), "{} bytes after the response", self.buf.len());
        Ok(())
    }
}

async fn connect(cfg: &ClientConfig) -> Result<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(cfg.vip))
        .await
        .context("connecting timed out")?
        .context("connecting")?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One idle connection: connect and GET once (holding an opening permit), then idle until the second
/// round (any byte, FIN or reset meanwhile is an error), GET again, and stay open until the stop.
async fn idle_conn(
    i: usize,
    cfg: ClientConfig,
    permit: tokio::sync::OwnedSemaphorePermit,
    sem: Arc<Semaphore>,
    sh: Arc<Shared>,
    mut round2: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let opened = async {
        let s = connect(&cfg).await?;
        let mut c = Conn {
            s,
            buf: Vec::new(),
            chunk: vec![0; 4096],
            read_len: 4096,
            pace: None,
            probe: None,
            stall_limit: cfg.stall_limit,
        };
        c.get(IDLE_FIRST).await?;
        anyhow::Ok(c)
    }
    .await;
    drop(permit);
    let mut c = match opened {
        Ok(c) => {
            sh.idle_opened.fetch_add(1, Ordering::Relaxed);
            c
        }
        Err(e) => {
            sh.idle_open_failed.fetch_add(1, Ordering::Relaxed);
            sh.error(format!("idle connection {i}: first request: {e:#}"));
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
                Err(e) => format!("{e}"),
            };
            sh.idle_second_failed.fetch_add(1, Ordering::Relaxed);
            sh.error(format!("idle connection {i} while idle: {what}"));
            return;
        }
    }
    let Ok(permit) = sem.acquire_owned().await else { return };
    let began = Instant::now();
    match c.get(IDLE_SECOND).await {
        Ok(()) => {
            sh.idle_second_ns[i].store(began.elapsed().as_nanos() as u64 + 1, Ordering::Relaxed);
            sh.idle_second_ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            sh.idle_second_failed.fetch_add(1, Ordering::Relaxed);
            sh.error(format!("idle connection {i}: second request (after the takeover): {e:#}"));
        }
    }
    drop(permit);
    let _ = stop.wait_for(|s| *s).await;
}

/// One active transfer: a GET loop over [`LOOP_DOCS`] (reading at full speed, pausing between requests), or
/// a download of the big file (again and again) at the download rate. Runs until it fails or the runtime stops.
async fn active_conn(i: usize, cfg: ClientConfig, sh: Arc<Shared>) {
    let download = i < cfg.downloads;
    let result = async {
        let s = connect(&cfg).await?;
        let read_len = if download { (cfg.rate / 10).clamp(1024, 65536) as usize } else { 65536 };
        let mut c = Conn {
            s,
            buf: Vec::new(),
            chunk: vec![0; read_len],
            read_len,
            pace: download.then(|| Pacer { start: Instant::now(), bytes: 0, rate: cfg.rate }),
            probe: Some((sh.clone(), i)),
            stall_limit: cfg.stall_limit,
        };
        sh.active_started.fetch_add(1, Ordering::Relaxed);
        let big = Doc { name: BIG_NAME, key: BIG_KEY, len: cfg.big_len };
        for j in 0usize.. {
            let doc = if download { big } else { LOOP_DOCS[(i + j) % LOOP_DOCS.len()] };
            c.get(doc).await.with_context(|| format!("request {j} ({})", doc.name))?;
            sh.active_requests.fetch_add(1, Ordering::Relaxed);
            if !download && !cfg.pause.is_zero() {
                tokio::time::sleep(cfg.pause).await;
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        sh.actives[i].failed.store(true, Ordering::Relaxed);
        sh.error(format!("active transfer {i} ({}): {e:#}", if download { "download" } else { "GET loop" }));
    }
}

/// All the clients: idle connections first (at most `concurrency` opening at once), then the active
/// transfers; until the stop.
async fn run_clients(
    cfg: ClientConfig,
    sh: Arc<Shared>,
    round2: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..cfg.idle {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        tasks.spawn(idle_conn(i, cfg, permit, sem.clone(), sh.clone(), round2.clone(), stop.clone()));
    }
    // Every first request answered (or failed) before the transfers start.
    tokio::select! {
        p = sem.acquire_many(cfg.concurrency as u32) => drop(p),
        _ = stop.wait_for(|s| *s) => return,
    }
    for i in 0..cfg.active {
        tasks.spawn(active_conn(i, cfg, sh.clone()));
    }
    let _ = stop.wait_for(|s| *s).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// The client threads and how to steer them. Dropping it stops them.
struct Clients {
    sh: Arc<Shared>,
    round2: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Clients {
    /// Starts the clients on a thread inside network namespace `ns` (`/run/netns/...`); the runtime's
    /// workers are started from it, so they are in the namespace too.
    fn start(ns: String, cfg: ClientConfig) -> Result<Clients> {
        let sh = Arc::new(Shared {
            base: Instant::now(),
            idle: cfg.idle,
            downloads: cfg.downloads,
            idle_opened: AtomicUsize::new(0),
            idle_open_failed: AtomicUsize::new(0),
            idle_second_ok: AtomicUsize::new(0),
            idle_second_failed: AtomicUsize::new(0),
            idle_second_ns: (0..cfg.idle).map(|_| AtomicU64::new(0)).collect(),
            active_started: AtomicUsize::new(0),
            active_requests: AtomicU64::new(0),
            active_bytes: AtomicU64::new(0),
            actives: (0..cfg.active).map(|_| ActiveState::default()).collect(),
            takeover_ns: AtomicU64::new(0),
            errors: AtomicUsize::new(0),
            error_lines: Mutex::new(Vec::new()),
        });
        let (round2, round2_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let shared = sh.clone();
        let thread = std::thread::Builder::new().name("clients".into()).spawn(move || -> Result<()> {
            let target = fs::File::open(&ns).with_context(|| format!("opening namespace {ns}"))?;
            // SAFETY: setns(2) with a namespace descriptor we hold; it changes this thread only (and the
            // threads it starts).
            if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {ns}"));
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("client")
                .enable_all()
                .build()
                .context("starting the clients' runtime")?;
            rt.block_on(run_clients(cfg, shared, round2_rx, stop_rx));
            rt.shutdown_timeout(Duration::from_secs(2));
            Ok(())
        })?;
        Ok(Clients { sh, round2, stop, thread: Some(thread) })
    }

    /// Fails if the client thread ended before it was told to.
    fn check(&mut self) -> Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished())
            && let Some(t) = self.thread.take()
        {
            t.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
            bail!("the clients stopped early");
        }
        Ok(())
    }

    fn second_round(&self) {
        let _ = self.round2.send(true);
    }

    fn stop(&mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        }
        Ok(())
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------------------------------------
// The run.

/// Every "backup joined: snapshot queued" line of a node log, in order: (connections, approximate bytes,
/// the time to build it as logged).
fn snapshot_lines(log: &str) -> Vec<(u64, u64, String)> {
    log.lines()
        .filter(|l| l.contains("backup joined: snapshot queued"))
        .filter_map(|line| {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{key}=")))
                    .map(|v| v.trim_matches('"').to_string())
            };
            Some((field("connections")?.parse().ok()?, field("bytes")?.parse().ok()?, field("took")?))
        })
        .collect()
}

/// How many lines of a node's log (`stem`.log in `dir`) contain `needle`.
fn log_count(dir: &std::path::Path, stem: &str, needle: &str) -> usize {
    fs::read_to_string(dir.join(format!("{stem}.log")))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// When the new primary's last restored connection's task first ran, after the fence, as its log says it.
fn tasks_started(dir: &std::path::Path, stem: &str) -> Option<String> {
    let log = fs::read_to_string(dir.join(format!("{stem}.log"))).ok()?;
    let line = log.lines().rfind(|l| l.contains("every restored connection's task has started"))?;
    let at = line.find("since_fence=")? + "since_fence=".len();
    Some(line[at..].split_whitespace().next()?.to_owned())
}

fn describe_snapshot(s: &(u64, u64, String)) -> String {
    format!("{} connections, ≈ {:.1} MB, built in {}", s.0, s.1 as f64 / MB, s.2)
}

/// The waits for data of one kind of active transfer (`downloads`: the downloads, or else the GET loops) that
/// overlap `[from, to)` (`overlap`), or lie entirely inside it (`unfinished`: when each transfer's wait in
/// progress at `now` began, 0 for none; it counts as ending at `now`): the longest (which transfer, when it began relative to `origin`), the median over
/// the transfers of each one's longest, and how many waited at least `over`.
struct WindowStall {
    longest: Duration,
    which: Option<(usize, f64)>,
    median: Duration,
    over: usize,
}

#[allow(clippy::too_many_arguments)]
fn stall_in(
    sh: &Shared,
    downloads: bool,
    from: Instant,
    to: Instant,
    overlap: bool,
    now: Instant,
    unfinished: &[u64],
    origin: Instant,
    over: Duration,
) -> WindowStall {
    let (from, to) = (sh.ns(from), sh.ns(to));
    let mut w = WindowStall { longest: Duration::ZERO, which: None, median: Duration::ZERO, over: 0 };
    let mut each = Vec::new();
    let split = sh.downloads;
    for (i, a) in sh.actives.iter().enumerate().filter(|&(i, _)| (i < split) == downloads) {
        let mut waits = a.waits.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // A wait still in progress at `now` (begun before it) counts as ending then.
        let since = unfinished[i];
        if since != 0 && since < sh.ns(now) {
            waits.push((since, sh.ns(now)));
        }
        let mut longest_here = Duration::ZERO;
        for (b, e) in waits {
            let counts = if overlap { b < to && e > from } else { b >= from && e < to };
            if counts {
                let d = Duration::from_nanos(e - b);
                longest_here = longest_here.max(d);
                if d > w.longest {
                    w.longest = d;
                    let began = sh.at(b);
                    let offset =
                        if began >= origin { (began - origin).as_secs_f64() } else { -(origin - began).as_secs_f64() };
                    w.which = Some((i, offset));
                }
            }
        }
        if longest_here >= over {
            w.over += 1;
        }
        each.push(longest_here);
    }
    each.sort_unstable();
    w.median = each.get(each.len() / 2).copied().unwrap_or_default();
    w
}

fn describe_stall(w: &WindowStall, what: &str) -> String {
    let short = |d: Duration| if d < WAIT_RECORD { format!("< {}", ms(WAIT_RECORD)) } else { ms(d) };
    match w.which {
        Some((i, at)) => format!(
            "{} (transfer {i}, began {at:+.2} s from {what}); median {}; {} waited 1 s or more",
            ms(w.longest),
            short(w.median),
            w.over
        ),
        None => format!("< {}", ms(WAIT_RECORD)),
    }
}

/// Polls `/status` of `host` every few milliseconds until `ok`; prints progress every second.
fn wait_status(
    pair: &Pair,
    clients: &mut Clients,
    host: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Result<(Value, Instant)> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        clients.check()?;
        if let Ok(s) = pair.status(host)
            && ok(&s)
        {
            return Ok((s, Instant::now()));
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}\n{}", pair.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sleeps `d` while checking for interruption and for the clients' health; progress every second.
fn settle(clients: &mut Clients, clock: &Clock, d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    let mut next = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        check_interrupted()?;
        clients.check()?;
        if Instant::now() >= next {
            next += Duration::from_secs(1);
            clock.line(&progress(&clients.sh));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn progress(sh: &Shared) -> String {
    let r = Ordering::Relaxed;
    format!(
        "idle {}/{} open ({} second requests done) · active {}/{}: {} requests, {:.1} MB · client errors {}",
        sh.idle_opened.load(r),
        sh.idle,
        sh.idle_second_ok.load(r),
        sh.active_started.load(r),
        sh.actives.len(),
        sh.active_requests.load(r),
        sh.active_bytes.load(r) as f64 / MB,
        sh.errors.load(r)
    )
}

/// Runs the measurement; `Ok(true)` when no client saw an error and every connection continued.
fn scale(cli: &Cli) -> Result<bool> {
    let (idle, active) = (cli.idle as usize, cli.active as usize);
    ensure!(idle + active > 0, "nothing to measure: --idle and --active are both 0");
    let downloads = cli.downloads.map_or(active / 2, |d| d as usize);
    ensure!(downloads <= active, "--downloads {downloads} is more than --active {active}");
    let rate = cli.download_rate_kb * 1000;
    // Long enough that a download lasts the whole run (10 minutes at its rate).
    let big_len = (rate * 600).clamp(1_000_000, 200_000_000);
    let clock = Clock(Instant::now());
    println!(
        "understudy scale: {idle} idle keep-alive connections and {active} active transfers ({} GET loops \
         pausing {} ms, {downloads} downloads at {} kB/s) through the VIP {VIP};",
        active - downloads,
        cli.loop_pause_ms,
        cli.download_rate_kb
    );
    println!("a spare joins the unprotected primary, then the primary fails: {}.", cli.failure.describe());

    // The clients, and each node (which inherits the limit), need a descriptor per connection and some more.
    tool::raise_open_files((idle + active) as u64 + 2048)?;

    let id = unique_id('s');
    // Pair::up makes the scratch directory at this path; the nodes' config file goes there.
    let dir = std::env::temp_dir().join(format!("understudy-{id}-{}", std::process::id()));
    let config = dir.join("scale.toml");
    let opts = PairOptions {
        node_flags: vec!["--config".into(), config.to_str().context("path")?.into()],
        ..PairOptions::default()
    };
    clock.line(&format!("writing the origin's files; building test bed {id}, starting the pair"));
    let mut pair = Pair::up(&id, &opts, |www| {
        let scratch = www.parent().context("www has no parent")?;
        // Idle connections must outlast the run; room for every connection of the run.
        fs::write(
            scratch.join("scale.toml"),
            format!("[limits]\nidle_timeout = \"60m\"\nmax_connections = {}\n", idle + active + 1000),
        )?;
        for d in [IDLE_FIRST, IDLE_SECOND].iter().chain(LOOP_DOCS.iter()) {
            pattern::write_file(&www.join(d.name), d.key, d.len)?;
        }
        pattern::write_file(&www.join(BIG_NAME), BIG_KEY, big_len)?;
        check_interrupted()
    })?;
    ensure!(pair.dir.0 == dir, "the scratch directory is {}, not {}", pair.dir.0.display(), dir.display());
    check_interrupted()?;
    if cli.keep {
        clock.line(&format!("scratch directory (kept): {}", dir.display()));
    }
    clock.line("pair protected; killing the backup so that the primary serves unprotected");
    pair.kill_backup()?;
    pair.wait_status(pair.primary_host, "the primary to serve unprotected", Duration::from_secs(10), |s| {
        s["peer"] == "none"
    })?;
    if idle + active > 20_000 {
        // The client's ephemeral ports: the default range (32768-60999) holds 28 232.
        let range = "/proc/sys/net/ipv4/ip_local_port_range";
        pair.tb.exec("client", &["sh", "-c", &format!("echo '10000 64999' > {range}")])?;
    }

    let cfg = ClientConfig {
        vip: format!("{VIP}:{PORT}").parse()?,
        idle,
        active,
        rate,
        downloads,
        pause: Duration::from_millis(cli.loop_pause_ms),
        concurrency: cli.concurrency as usize,
        big_len,
        stall_limit: Duration::from_secs(cli.stall_limit),
    };
    let mut clients = Clients::start(format!("/run/netns/{}", pair.tb.ns("client")), cfg)?;
    let sh = clients.sh.clone();
    let r = Ordering::Relaxed;

    // Idle connections, then the transfers.
    let opening = Instant::now();
    let mut next = Instant::now() + Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_millis(20) * idle as u32;
    while sh.idle_opened.load(r) + sh.idle_open_failed.load(r) < idle || sh.active_started.load(r) < active {
        check_interrupted()?;
        clients.check()?;
        if sh.errors.load(r) > 0 && sh.idle_opened.load(r) + sh.idle_open_failed.load(r) == idle {
            // A transfer failed to start; the report says why.
            break;
        }
        if Instant::now() >= next {
            next += Duration::from_secs(1);
            clock.line(&progress(&sh));
        }
        ensure!(
            Instant::now() < deadline,
            "the connections did not open in time: {}\n{}",
            progress(&sh),
            pair.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let opened_in = opening.elapsed();
    let status = pair.status(pair.primary_host)?;
    clock.line(&format!(
        "{} idle connections open in {:.1} s, {} transfers running; the primary counts {} connections",
        sh.idle_opened.load(r),
        opened_in.as_secs_f64(),
        sh.active_started.load(r),
        status["connections"]["total"].as_u64().map_or_else(|| status["connections"].to_string(), |n| n.to_string())
    ));
    let transfers_from = Instant::now();
    settle(&mut clients, &clock, Duration::from_secs(cli.settle))?;

    // The join.
    clock.line("starting the spare");
    let joins_before = snapshot_lines(&fs::read_to_string(dir.join("primary.log")).unwrap_or_default()).len();
    let suspected_before = log_count(&dir, "primary", "backup suspected");
    let spare_started = Instant::now();
    let spare_started_unix_ms = unix_ms(SystemTime::now());
    pair.start_spare()?;
    let primary_host = pair.primary_host;
    let backup_host = pair.backup_host();
    let spare_stem = pair.node_log_stems().last().context("no spare log")?.clone();
    // Until both say `peer: connected`. A spare that takes the VIP meanwhile (it judged the primary dead while
    // joining) ends the run: there is nothing left to measure.
    let join_deadline = spare_started + Duration::from_secs(180);
    let (mut primary_saw, mut joined) = (None, None);
    let mut next = Instant::now() + Duration::from_secs(1);
    let joined_at = loop {
        check_interrupted()?;
        clients.check()?;
        let spare = pair.status(backup_host).ok();
        if let Some(s) = &spare
            && s["role"] == "primary"
        {
            bail!(
                "the spare took over while joining, though the primary was not failed (epoch {}, {}); {}\n{}",
                s["epoch"],
                s["failovers"],
                progress(&sh),
                pair.logs_tail()
            );
        }
        if joined.is_none()
            && let Some(s) = spare.as_ref().filter(|s| s["role"] == "backup" && s["peer"] == "connected")
        {
            joined = Some((Instant::now(), s["peer_since_unix_ms"].as_u64()));
        }
        if primary_saw.is_none()
            && let Some(s) =
                pair.status(primary_host).ok().filter(|s| s["role"] == "primary" && s["peer"] == "connected")
        {
            primary_saw = Some((Instant::now(), s["peer_since_unix_ms"].as_u64()));
        }
        if let (Some(p), Some(j)) = (primary_saw, joined) {
            break p.0.max(j.0);
        }
        if Instant::now() >= next {
            next += Duration::from_secs(1);
            clock.line(&format!("joining · {}", progress(&sh)));
        }
        ensure!(Instant::now() < join_deadline, "the spare did not join within 180 s\n{}", pair.logs_tail());
        // The nodes stamp when they became connected: polling only has to notice it, and cheaply (each poll
        // is a process on these two cores, and a `/status` that walks the table on the node).
        std::thread::sleep(Duration::from_millis(50));
    };
    // From the nodes' own times where they give them (same host, same clock), else when the poll saw it.
    let node_time = |saw: Option<(Instant, Option<u64>)>| {
        let (seen, stamped) = saw.unwrap_or((joined_at, None));
        stamped.map_or(seen - spare_started, |ms| Duration::from_millis(ms.saturating_sub(spare_started_unix_ms)))
    };
    let (primary_saw, spare_saw) = (node_time(primary_saw), node_time(joined));
    let join = primary_saw.max(spare_saw);
    let polled = joined_at - spare_started;
    let status = pair.status(primary_host)?;
    let protected = status["connections"]["protected"].as_u64().unwrap_or(0);
    clock.line(&format!(
        "pair protected again: joined in {} (the primary connected after {}, the spare after {}; polling saw both \
         after {}); {protected} connections protected",
        ms(join),
        ms(primary_saw),
        ms(spare_saw),
        ms(polled)
    ));

    // Protected for --settle seconds in a row before the failure. The primary may give its backup up (a late
    // ack) and let it join again; after `hold_limit` the failure comes at the next moment the pair is protected.
    let settle_for = Duration::from_secs(cli.settle);
    let hold_limit = joined_at + Duration::from_secs(120);
    let (mut drops, mut protected_since, mut was_protected) = (0usize, joined_at, true);
    let mut next = Instant::now() + Duration::from_secs(1);
    loop {
        check_interrupted()?;
        clients.check()?;
        let now = Instant::now();
        let connected =
            |host: &str, role: &str| pair.status(host).is_ok_and(|s| s["role"] == role && s["peer"] == "connected");
        if connected(primary_host, "primary") && connected(backup_host, "backup") {
            if !was_protected {
                protected_since = now;
                clock.line("the pair is protected again");
            }
            was_protected = true;
            if now - protected_since >= settle_for {
                break;
            }
            if now >= hold_limit {
                clock.line(&format!(
                    "the pair did not stay protected for {} s in a row within {} s of the join: failing the primary \
                     now, while it is protected",
                    cli.settle,
                    (hold_limit - joined_at).as_secs()
                ));
                break;
            }
        } else {
            if was_protected {
                drops += 1;
                clock.line("the pair lost its protection (the primary gave its backup up, or the backup rejoins)");
            }
            was_protected = false;
            ensure!(
                now < hold_limit + Duration::from_secs(60),
                "the pair was not protected again within {} s of the join\n{}",
                (hold_limit - joined_at).as_secs() + 60,
                pair.logs_tail()
            );
        }
        if now >= next {
            next += Duration::from_secs(1);
            clock.line(&progress(&sh));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let snapshots: Vec<_> = snapshot_lines(&fs::read_to_string(dir.join("primary.log")).unwrap_or_default())
        .into_iter()
        .skip(joins_before)
        .collect();
    let backup_suspected = log_count(&dir, "primary", "backup suspected") - suspected_before;
    let false_alarms = log_count(&dir, &spare_stem, "ALARM: not taking over");

    // The failure and the takeover.
    match cli.failure {
        Failure::Kill => pair.kill_primary()?,
        Failure::PowerCut => pair.power_cut_primary()?,
    }
    let failed_at = Instant::now();
    clock.line(&format!("FAILURE: {}; {}", cli.failure.describe(), progress(&sh)));
    let (taken, taken_seen) =
        wait_status(&pair, &mut clients, backup_host, "the spare to take over", Duration::from_secs(60), |s| {
            s["role"] == "primary" && s["failovers"].as_array().is_some_and(|f| !f.is_empty())
        })?;
    sh.takeover_ns.store(sh.ns(taken_seen), r);
    pair.promoted()?;
    let f = taken["failovers"].as_array().and_then(|f| f.last()).cloned().unwrap_or(Value::Null);
    let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    clock.line(&format!(
        "the spare serves as primary: takeover total {:.1} ms (restore {:.1} ms), {} connections restored, {} lost",
        num("total_ms"),
        num("restore_ms"),
        f["connections_restored"],
        f["connections_lost"]
    ));

    // Every transfer must get fresh bytes from the new primary; then the idle connections' second round.
    let resume_deadline = Instant::now() + cfg.stall_limit + Duration::from_secs(10);
    let mut next = Instant::now() + Duration::from_secs(1);
    let pending = |sh: &Shared| sh.actives.iter().filter(|a| !a.failed.load(r) && a.continued_at.load(r) == 0).count();
    while pending(&sh) > 0 && Instant::now() < resume_deadline {
        check_interrupted()?;
        clients.check()?;
        if Instant::now() >= next {
            next += Duration::from_secs(1);
            clock.line(&format!("{} of {active} transfers waiting for the new primary's bytes", pending(&sh)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let resumed = sh
        .actives
        .iter()
        .map(|a| a.continued_at.load(r))
        .filter(|&t| t != 0)
        .map(|t| sh.at(t))
        .max()
        .map(|t| t.saturating_duration_since(failed_at));
    let active_continued = sh.actives.iter().filter(|a| !a.failed.load(r) && a.continued_at.load(r) != 0).count();
    clock.line(&format!(
        "{active_continued} of {active} transfers carry on{}; second request on each idle connection",
        resumed.map(|d| format!(" (the last {:.2} s after the failure)", d.as_secs_f64())).unwrap_or_default()
    ));
    clients.second_round();
    let round2_started = Instant::now();
    let round2_deadline = Instant::now() + cfg.stall_limit + Duration::from_secs(60);
    let opened = sh.idle_opened.load(r);
    while sh.idle_second_ok.load(r) + sh.idle_second_failed.load(r) < opened && Instant::now() < round2_deadline {
        check_interrupted()?;
        clients.check()?;
        if Instant::now() >= next {
            next += Duration::from_secs(1);
            clock.line(&progress(&sh));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let round2_took = round2_started.elapsed();
    settle(&mut clients, &clock, Duration::from_secs(cli.settle))?;
    let ended = Instant::now();
    let unfinished: Vec<u64> = sh.actives.iter().map(|a| a.waiting_since.load(r)).collect();
    let new_primary_status = pair.status(pair.primary_host).ok();
    clients.stop()?;
    check_interrupted()?;

    // The report.
    let one_sec = Duration::from_secs(1);
    // (what, from, to, the instant "began" is relative to, its name); the last one takes unfinished waits.
    // (what, from, to, waits overlapping the window (else: entirely inside it), "began" relative to, its name).
    let windows = [
        ("unprotected, before the join", transfers_from, spare_started, false, spare_started, "the spare's start"),
        ("overlapping the join", spare_started, joined_at, true, spare_started, "the spare's start"),
        ("protected, after the join", joined_at, failed_at, false, failed_at, "the failure"),
        ("across the takeover", failed_at, ended, true, failed_at, "the failure"),
    ];
    let stalls: Vec<[WindowStall; 2]> = windows
        .iter()
        .map(|&(_, from, to, overlap, origin, _)| {
            [false, true].map(|d| stall_in(&sh, d, from, to, overlap, ended, &unfinished, origin, one_sec))
        })
        .collect();
    let mut second: Vec<u64> = sh.idle_second_ns.iter().map(|a| a.load(r)).filter(|&n| n != 0).map(|n| n - 1).collect();
    second.sort_unstable();
    let pct = |p: f64| -> String {
        if second.is_empty() {
            return "-".into();
        }
        let i = ((second.len() - 1) as f64 * p).round() as usize;
        ms(Duration::from_nanos(second[i]))
    };
    let errors = sh.errors.load(r);
    let idle_ok = sh.idle_second_ok.load(r);
    let restored = f["connections_restored"].as_u64().unwrap_or(0);
    let lost = f["connections_lost"].as_u64().unwrap_or(u64::MAX);
    let restore = Duration::from_secs_f64(num("restore_ms").max(0.0) / 1e3);
    let all_ok = errors == 0 && idle_ok == idle && active_continued == active && lost == 0;

    println!();
    println!("understudy scale — report ({idle} idle + {active} active connections; {})", cli.failure.describe());
    println!("join (spare started → both nodes connected, by their /status `peer_since`)");
    println!(
        "  join time            {:>9}   (the primary connected after {}, the spare after {}; polling /status saw \
         both after {})",
        ms(join),
        ms(primary_saw),
        ms(spare_saw),
        ms(polled)
    );
    match snapshots.first() {
        Some(first) => println!("  snapshot             {} (primary's log)", describe_snapshot(first)),
        None => println!("  snapshot             (no \"backup joined\" line in the primary's log)"),
    }
    println!("  protected after join {protected} connections (primary's /status)");
    println!(
        "  until the failure    {drops} losses of protection, {} re-joins{}; the primary suspected its backup {} \
         times, the spare stood down {} times (\"ALARM: not taking over\")",
        snapshots.len().saturating_sub(1),
        match snapshots.last() {
            Some(last) if snapshots.len() > 1 => format!(" (last snapshot: {})", describe_snapshot(last)),
            _ => String::new(),
        },
        backup_suspected,
        false_alarms
    );
    println!("takeover (new primary's /status, epoch {}): {}", f["epoch"], f["reason"].as_str().unwrap_or("?"));
    println!("  detection {:>9.1} ms", num("detection_ms"));
    println!("  fencing   {:>9.1} ms", num("fencing_ms"));
    println!(
        "  restore   {:>9.1} ms   ({restored} connections, {:.1} µs each)",
        num("restore_ms"),
        num("restore_ms") * 1e3 / restored.max(1) as f64
    );
    println!("  total     {:>9.1} ms", num("total_ms"));
    match tasks_started(&dir, &spare_stem) {
        Some(t) => println!("  every restored connection's task running {t} after the fence (new primary's log)"),
        None => println!("  (no \"task has started\" line in the new primary's log)"),
    }
    println!(
        "  connections restored {restored}, lost {}; {} of them staged on the standby ahead of the takeover",
        f["connections_lost"], f["connections_staged"]
    );
    if let Some(s) = &new_primary_status {
        println!("  new primary's connections now: {}", s["connections"]);
    }
    println!("clients");
    println!(
        "  idle      {} opened, {} failed to open; second request after the takeover: {idle_ok} ok, {} failed \
         (round of {:.1} s; latency median {}, p99 {}, max {})",
        sh.idle_opened.load(r),
        sh.idle_open_failed.load(r),
        sh.idle_second_failed.load(r),
        round2_took.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "  active    {} started, {active_continued} carried on after the takeover{}; {} requests, {:.1} MB, \
         every body checked",
        sh.active_started.load(r),
        resumed.map(|d| format!(" (the last {:.2} s after the failure)", d.as_secs_f64())).unwrap_or_default(),
        sh.active_requests.load(r),
        sh.active_bytes.load(r) as f64 / MB
    );
    println!("  largest stall of the active transfers (longest wait in a read for the next byte):");
    for (kind, name, n) in [(0, "GET loops", active - downloads), (1, "downloads", downloads)] {
        if n == 0 {
            continue;
        }
        println!("    {name} ({n})");
        for ((what, _, _, _, _, origin), st) in windows.iter().zip(&stalls) {
            println!("      {what:<30} {}", describe_stall(&st[kind], origin));
        }
    }
    println!("  client errors: {errors}");
    for l in sh.error_lines.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("    {l}");
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("goals");
    println!("  join under 1 s                         {} ({})", verdict(join < one_sec), ms(join));
    println!(
        "  restore of all connections under 200 ms {} ({:.1} ms for {restored})",
        verdict(restore < Duration::from_millis(200) && restored >= (idle + active) as u64),
        num("restore_ms")
    );
    println!("  no client error                        {} ({errors})", verdict(errors == 0));
    println!("result: {}", if all_ok { "PASS" } else { "FAIL" });
    if !all_ok {
        println!("{}", pair.logs_tail());
    }
    Ok(all_ok)
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
