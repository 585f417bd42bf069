//! A steady keep-alive load on the pair for as long as a test needs it: `conns` client connections,
//! each opened once from the `client` host and reused for sequential GETs of pattern files, every body
//! checked byte for byte. A connection that fails is not reopened: its error is the test's finding.
//!
//! The files are `f<i>.bin` with [`pattern`] key `100 + i`; [`write_files`] makes them in the origin's
//! document root.

use crate::pair::{PORT, Pair, VIP};
use crate::pattern;
use anyhow::{Context, Result, bail, ensure};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A response that takes longer than this, or a pause that long within one, is an error.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);

/// Writes `f<i>.bin` of `sizes[i]` bytes into `www`.
pub fn write_files(www: &Path, sizes: &[u64]) -> Result<()> {
    for (i, &n) in sizes.iter().enumerate() {
        pattern::write_file(&www.join(format!("f{i}.bin")), 100 + i as u64, n)?;
    }
    Ok(())
}

/// What one connection saw.
#[derive(Debug, Default, Clone)]
pub struct ConnReport {
    pub requests: u64,
    /// The error that ended the connection early, if one did.
    pub error: Option<String>,
    /// The longest request (write to last body byte), which request it was (`f<i>.bin`) and when it began.
    pub slowest: Duration,
    pub slowest_what: String,
}

/// What the whole load saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub conns: Vec<ConnReport>,
}

impl LoadReport {
    pub fn requests(&self) -> u64 {
        self.conns.iter().map(|c| c.requests).sum()
    }

    pub fn errors(&self) -> Vec<String> {
        self.conns.iter().enumerate().filter_map(|(i, c)| c.error.as_ref().map(|e| format!("conn {i}: {e}"))).collect()
    }

    pub fn slowest(&self) -> Duration {
        self.conns.iter().map(|c| c.slowest).max().unwrap_or_default()
    }

    /// The slowest request over every connection, described: connection index, local port, request.
    pub fn slowest_what(&self) -> String {
        self.conns.iter().max_by_key(|c| c.slowest).map(|c| c.slowest_what.clone()).unwrap_or_default()
    }
}

/// The running load; [`Load::stop`] ends it and reports.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<JoinHandle<ConnReport>>,
}

impl Load {
    /// Opens `conns` connections to the VIP and starts their request loops; `pause` between requests.
    pub fn start(pair: &Pair, conns: usize, sizes: &[u64], pause: Duration) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let vip: SocketAddr = format!("{VIP}:{PORT}").parse()?;
        let mut threads = Vec::with_capacity(conns);
        for c in 0..conns {
            let stream = pair.connect_from("client", vip, Duration::from_secs(5))?;
            let (stop, done, sizes) = (stop.clone(), done.clone(), sizes.to_vec());
            threads.push(std::thread::spawn(move || run_conn(stream, c, &sizes, pause, &stop, &done)));
        }
        Ok(Load { stop, done, threads })
    }

    /// Requests completed so far, over every connection.
    pub fn completed(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `more` further requests have completed (the load is making progress).
    pub fn wait_progress(&self, more: u64, timeout: Duration) -> Result<()> {
        let target = self.completed() + more;
        let deadline = Instant::now() + timeout;
        while self.completed() < target {
            ensure!(Instant::now() < deadline, "the load made no progress: {} of {target} requests", self.completed());
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Lets each connection finish its request in progress, then reports.
    pub fn stop(self) -> Result<LoadReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport::default();
        for t in self.threads {
            report.conns.push(t.join().map_err(|_| anyhow::anyhow!("a load thread panicked"))?);
        }
        Ok(report)
    }
}

fn run_conn(
    mut s: TcpStream,
    c: usize,
    sizes: &[u64],
    pause: Duration,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> ConnReport {
    let mut report = ConnReport::default();
    let _ = s.set_read_timeout(Some(STALL_LIMIT));
    let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut j = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let i = (c + j) % sizes.len();
        j += 1;
        let started = Instant::now();
        let wall = std::time::SystemTime::now();
        match get(&mut s, &mut buf, i, sizes[i]) {
            Ok(()) => {
                report.requests += 1;
                if started.elapsed() > report.slowest {
                    report.slowest = started.elapsed();
                    let at = wall.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
                    report.slowest_what = format!(
                        "conn {c} (port {port}) request {} f{i}.bin, began at unix {at:.3}",
                        report.requests - 1
                    );
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                report.error = Some(format!("request {} (f{i}.bin): {e:#}", report.requests));
                break;
            }
        }
        std::thread::sleep(pause);
    }
    report
}

/// One GET of `f<i>.bin` on a keep-alive connection; `buf` carries bytes read past a response.
pub fn get(s: &mut TcpStream, buf: &mut Vec<u8>, i: usize, len: u64) -> Result<()> {
    write!(s, "GET /f{i}.bin HTTP/1.1\r\nHost: {VIP}\r\n\r\n").context("writing the request")?;
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        ensure!(buf.len() < 64 * 1024, "response head over 64 KiB");
        read_more(s, buf)?;
    };
    check_head(&buf[..head_end], len)?;
    buf.drain(..head_end);
    let mut offset = 0u64;
    while offset < len {
        if buf.is_empty() {
            read_more(s, buf)?;
        }
        let take = buf.len().min((len - offset) as usize);
        if let Some(at) = pattern::first_mismatch(100 + i as u64, offset, &buf[..take]) {
            bail!("body differs at byte {}", offset + at as u64);
        }
        offset += take as u64;
        buf.drain(..take);
    }
    Ok(())
}

/// Checks the head of a keep-alive GET's response: 200, a `Content-Length` of the file's `len` bytes, and
/// no `Connection: close`.
pub fn check_head(head: &[u8], len: u64) -> Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).context("parsing the response head")?;
    ensure!(resp.code == Some(200), "status {:?}", resp.code);
    let length: u64 = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .context("no content-length")
        .and_then(|h| Ok(std::str::from_utf8(h.value)?.trim().parse::<u64>()?))?;
    ensure!(length == len, "content-length {length}, the file has {len}");
    let closes = resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close"));
    ensure!(!closes, "the server closes the connection");
    Ok(())
}

fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 64 * 1024];
    let n = s.read(&mut chunk).context("reading the response")?;
    ensure!(n > 0, "the server closed the connection");
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}
