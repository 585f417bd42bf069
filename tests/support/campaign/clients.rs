//! The campaign's clients, on plain blocking sockets in the `client` host, against `us-origin` through
//! the VIP. Each checks every byte it gets (pattern bodies, by sha256 for the long ones), and measures its
//! stall: the longest single wait in a read for bytes it was owed. A client that fails stops and reports
//! the error: that is the campaign's finding, never retried.

use crate::pair::{PORT, VIP};
use crate::pattern;
use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A read that waits longer than this is an error (the client gave up).
pub const READ_LIMIT: Duration = Duration::from_secs(30);

pub fn vip() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 100], PORT))
}

/// Moves the calling thread into the network namespace `/run/netns/<ns>`.
pub fn enter_ns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns(2) on a descriptor we hold; it changes this thread only.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {path}"));
    }
    Ok(())
}

/// What one client did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub name: String,
    pub requests: u64,
    pub error: Option<String>,
    pub stall: Duration,
    /// POSTs it made: (Idempotency-Key, body length, body sha256).
    pub posts: Vec<(String, usize, String)>,
    /// Request targets it sent (each carries a unique `rid`).
    pub targets: Vec<String>,
}

/// A keep-alive connection with a read buffer.
pub struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    pub stall: Duration,
}

/// A response head.
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> Result<u64> {
        self.header("content-length").context("no content-length")?.trim().parse().context("content-length")
    }
}

impl Conn {
    pub fn new(s: TcpStream) -> Result<Conn> {
        s.set_read_timeout(Some(READ_LIMIT))?;
        s.set_nodelay(true)?;
        Ok(Conn { s, buf: Vec::with_capacity(64 * 1024), stall: Duration::ZERO })
    }

    pub fn connect() -> Result<Conn> {
        Conn::new(TcpStream::connect_timeout(&vip(), Duration::from_secs(10)).context("connecting to the VIP")?)
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.s.write_all(bytes).context("writing")
    }

    /// Reads more bytes; `owed` says whether the wait counts as a stall.
    fn more(&mut self, owed: bool) -> Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let t = Instant::now();
        // A signal (SIGCHLD when a node this process started is stopped or continued) ends a read that has a
        // timeout with EINTR even under SA_RESTART: not the server's doing, read again.
        let n = loop {
            match self.s.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.context("reading")?,
            }
        };
        if owed {
            self.stall = self.stall.max(t.elapsed());
        }
        ensure!(n > 0, "the server closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads a response head; `first_owed`: whether waiting for its first byte counts as a stall (not for
    /// a request the origin holds on purpose).
    pub fn head(&mut self, first_owed: bool) -> Result<Head> {
        let mut owed = first_owed || !self.buf.is_empty();
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            ensure!(self.buf.len() < 64 * 1024, "response head over 64 KiB");
            self.more(owed)?;
            owed = true;
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&self.buf[..end]).context("parsing the response head")?;
        let head = Head {
            status: resp.code.context("no status")?,
            headers: resp
                .headers
                .iter()
                .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                .collect(),
        };
        self.buf.drain(..end);
        Ok(head)
    }

    /// Reads `len` body bytes, each handed to `check(offset, bytes)`.
    pub fn body(&mut self, len: u64, mut check: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let mut off = 0;
        while off < len {
            if self.buf.is_empty() {
                self.more(true)?;
            }
            let take = self.buf.len().min((len - off) as usize);
            check(off, &self.buf[..take])?;
            off += take as u64;
            self.buf.drain(..take);
        }
        Ok(())
    }

    /// A GET of `/file?len=L&key=K&rid=R` (or `path` of that form): 200, `len` pattern bytes of `key`.
    pub fn get_pattern(&mut self, target: &str, key: u64, len: u64, first_owed: bool) -> Result<()> {
        self.write(format!("GET {target} HTTP/1.1\r\nHost: {VIP}\r\n\r\n").as_bytes())?;
        self.read_pattern(target, key, len, first_owed)
    }

    fn read_pattern(&mut self, target: &str, key: u64, len: u64, first_owed: bool) -> Result<()> {
        let head = self.head(first_owed).with_context(|| format!("GET {target}"))?;
        ensure!(head.status == 200, "GET {target}: status {}", head.status);
        ensure!(
            head.content_length()? == len,
            "GET {target}: content-length {:?}, want {len}",
            head.header("content-length")
        );
        if let Some(t) = head.header("x-request-target") {
            ensure!(t == target, "GET {target} answered for {t}");
        }
        self.body(len, |off, b| match pattern::first_mismatch(key, off, b) {
            Some(at) => bail!("GET {target}: body differs at byte {}", off + at as u64),
            None => Ok(()),
        })
    }

    /// A POST of `body` with an Idempotency-Key: 200 and the origin's JSON naming its key.
    pub fn post(&mut self, target: &str, key: &str, body: &[u8], first_owed: bool) -> Result<()> {
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: {VIP}\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.write(head.as_bytes())?;
        self.write(body)?;
        self.post_answer(target, key, first_owed)
    }

    pub fn post_answer(&mut self, target: &str, key: &str, first_owed: bool) -> Result<()> {
        let head = self.head(first_owed).with_context(|| format!("POST {target}"))?;
        let len = head.content_length()?;
        let mut answer = Vec::new();
        self.body(len, |_, b| {
            answer.extend_from_slice(b);
            Ok(())
        })?;
        ensure!(head.status == 200, "POST {target}: status {}: {}", head.status, String::from_utf8_lossy(&answer));
        let v: serde_json::Value = serde_json::from_slice(&answer).context("POST answer is not JSON")?;
        ensure!(v["key"] == key, "POST {target} answered for key {}", v["key"]);
        Ok(())
    }
}

/// Shared by a set of clients: the stop flag and their completed requests.
#[derive(Clone, Default)]
pub struct Control {
    pub stop: Arc<AtomicBool>,
    pub done: Arc<AtomicU64>,
}

impl Control {
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn count(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// A client running on its own thread in the client host's namespace.
pub struct Client {
    pub name: String,
    handle: JoinHandle<Report>,
}

impl Client {
    /// Starts `body` on a thread inside namespace `ns`; `body` fills in the report and returns its error.
    pub fn spawn(
        ns: &str,
        name: impl Into<String>,
        body: impl FnOnce(&mut Report) -> Result<()> + Send + 'static,
    ) -> Client {
        let name = name.into();
        let (ns, n) = (ns.to_string(), name.clone());
        let handle = std::thread::spawn(move || {
            let mut report = Report { name: n, ..Report::default() };
            if let Err(e) = enter_ns(&ns).and_then(|()| body(&mut report)) {
                report.error = Some(format!("{e:#}"));
            }
            report
        });
        Client { name, handle }
    }

    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub fn join(self) -> Report {
        let name = self.name;
        self.handle.join().unwrap_or_else(|_| Report {
            name,
            error: Some("the client thread panicked".into()),
            ..Report::default()
        })
    }
}

/// Sizes of the keep-alive loops' GETs.
const LOOP_SIZES: [u64; 5] = [1_000, 20_000, 150_000, 5, 60_000];

/// Sequential GETs on one keep-alive connection until stopped, 10 ms apart.
pub fn get_loop(ns: &str, tag: &str, c: usize, ctl: &Control) -> Client {
    let (tag, ctl) = (tag.to_string(), ctl.clone());
    Client::spawn(ns, format!("loop{c}"), move |r| {
        let mut conn = Conn::connect()?;
        let mut j = 0u64;
        let result = (|| {
            while !ctl.stopped() {
                let len = LOOP_SIZES[(c + j as usize) % LOOP_SIZES.len()];
                let key = 1000 + j % 7;
                let target = format!("/file?len={len}&key={key}&rid={tag}-l{c}-{j}");
                r.targets.push(target.clone());
                conn.get_pattern(&target, key, len, true)?;
                r.requests += 1;
                ctl.count();
                j += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })();
        r.stall = conn.stall;
        result
    })
}

/// Pipelined bursts of 6 GETs on one connection until stopped, each answered in order, bodies checked.
pub fn burst_loop(ns: &str, tag: &str, ctl: &Control) -> Client {
    let (tag, ctl) = (tag.to_string(), ctl.clone());
    Client::spawn(ns, "bursts", move |r| {
        let mut conn = Conn::connect()?;
        let mut b = 0u64;
        let result = (|| {
            while !ctl.stopped() {
                let reqs: Vec<(String, u64, u64)> = (0..6u64)
                    .map(|i| {
                        let len = [3_000, 70_000, 11, 250_000, 900, 40_000][i as usize];
                        (format!("/file?len={len}&key={}&rid={tag}-b{b}-{i}", 2000 + i), 2000 + i, len)
                    })
                    .collect();
                let burst: String =
                    reqs.iter().map(|(t, ..)| format!("GET {t} HTTP/1.1\r\nHost: {VIP}\r\n\r\n")).collect();
                conn.write(burst.as_bytes())?;
                for (t, key, len) in &reqs {
                    r.targets.push(t.clone());
                    conn.read_pattern(t, *key, *len, true)?;
                    r.requests += 1;
                    ctl.count();
                }
                b += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })();
        r.stall = conn.stall;
        result
    })
}

/// POSTs with an Idempotency-Key on one connection until stopped, 20 ms apart.
pub fn post_loop(ns: &str, tag: &str, ctl: &Control) -> Client {
    let (tag, ctl) = (tag.to_string(), ctl.clone());
    Client::spawn(ns, "posts", move |r| {
        let mut conn = Conn::connect()?;
        let mut j = 0u64;
        let result = (|| {
            while !ctl.stopped() {
                let len = 100 + (j as usize * 397) % 3000;
                let mut body = vec![0u8; len];
                pattern::fill(3000 + j, 0, &mut body);
                let key = format!("{tag}-p{j}");
                r.posts.push((key.clone(), len, hex::encode(Sha256::digest(&body))));
                conn.post(&format!("/post?ms=5&rid={key}"), &key, &body, true)?;
                r.requests += 1;
                ctl.count();
                j += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })();
        r.stall = conn.stall;
        result
    })
}

/// New connections one after the other until stopped: connect, one GET with `Connection: close`, the
/// whole response, the server's close.
pub fn churn(ns: &str, tag: &str, ctl: &Control) -> Client {
    let (tag, ctl) = (tag.to_string(), ctl.clone());
    Client::spawn(ns, "handshakes", move |r| {
        let mut j = 0u64;
        while !ctl.stopped() {
            let len = 2_000 + j % 5 * 1000;
            let target = format!("/file?len={len}&key=4000&rid={tag}-h{j}");
            let mut conn = Conn::connect()?;
            conn.write(format!("GET {target} HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n").as_bytes())?;
            r.targets.push(target.clone());
            conn.read_pattern(&target, 4000, len, true)?;
            r.stall = r.stall.max(conn.stall);
            r.requests += 1;
            ctl.count();
            j += 1;
        }
        Ok(())
    })
}

/// One GET of `len` bytes read at about `rate` bytes/s; its progress (bytes) in `progress`; checked by
/// sha256 against the pattern's.
pub fn download(ns: &str, tag: &str, len: u64, rate: u64, progress: Arc<AtomicU64>) -> Client {
    let tag = tag.to_string();
    Client::spawn(ns, "download", move |r| {
        let key = 77;
        let target = format!("/file?len={len}&key={key}&rid={tag}-dl");
        r.targets.push(target.clone());
        let mut conn = Conn::connect()?;
        conn.write(format!("GET {target} HTTP/1.1\r\nHost: {VIP}\r\n\r\n").as_bytes())?;
        let head = conn.head(true)?;
        ensure!(head.status == 200 && head.content_length()? == len, "download: status {}", head.status);
        let started = Instant::now();
        let mut sha = Sha256::new();
        let result = conn.body(len, |off, b| {
            sha.update(b);
            progress.store(off + b.len() as u64, Ordering::Relaxed);
            // Paced: the next read waits until the rate allows it.
            let due = Duration::from_secs_f64((off + b.len() as u64) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            Ok(())
        });
        r.stall = conn.stall;
        result?;
        let got = hex::encode(sha.finalize());
        ensure!(got == pattern::sha256_hex(key, len), "download: sha256 {got} differs from the pattern's");
        r.requests = 1;
        Ok(())
    })
}

/// One POST of `len` bytes sent at about `rate` bytes/s with an Idempotency-Key; its progress in `progress`.
pub fn upload(ns: &str, tag: &str, len: usize, rate: u64, progress: Arc<AtomicU64>) -> Client {
    let tag = tag.to_string();
    Client::spawn(ns, "upload", move |r| {
        let key = format!("{tag}-up");
        let mut body = vec![0u8; len];
        pattern::fill(5000, 0, &mut body);
        r.posts.push((key.clone(), len, hex::encode(Sha256::digest(&body))));
        let target = format!("/upload?rid={key}");
        let mut conn = Conn::connect()?;
        let head =
            format!("POST {target} HTTP/1.1\r\nHost: {VIP}\r\nIdempotency-Key: {key}\r\nContent-Length: {len}\r\n\r\n");
        conn.write(head.as_bytes())?;
        let started = Instant::now();
        for (i, piece) in body.chunks(16 * 1024).enumerate() {
            conn.write(piece).context("uploading")?;
            let sent = (i * 16 * 1024 + piece.len()) as u64;
            progress.store(sent, Ordering::Relaxed);
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let result = conn.post_answer(&target, &key, true);
        r.stall = conn.stall;
        result?;
        r.requests = 1;
        Ok(())
    })
}

/// A GET and a POST (with an Idempotency-Key) that the origin holds for `ms` before it answers, each on
/// its own connection; the wait for their first byte is not a stall.
pub fn slow_requests(ns: &str, tag: &str, ms: u64) -> Vec<Client> {
    let (t1, t2) = (tag.to_string(), tag.to_string());
    vec![
        Client::spawn(ns, "slow GET", move |r| {
            let target = format!("/slow?ms={ms}&len=300000&key=6000&rid={t1}-sg");
            r.targets.push(target.clone());
            let mut conn = Conn::connect()?;
            conn.get_pattern(&target, 6000, 300_000, false)?;
            r.stall = conn.stall;
            r.requests = 1;
            Ok(())
        }),
        Client::spawn(ns, "slow POST", move |r| {
            let key = format!("{t2}-sp");
            let body = vec![b'x'; 2048];
            r.posts.push((key.clone(), body.len(), hex::encode(Sha256::digest(&body))));
            let mut conn = Conn::connect()?;
            conn.post(&format!("/post?ms={ms}&rid={key}"), &key, &body, false)?;
            r.stall = conn.stall;
            r.requests = 1;
            Ok(())
        }),
    ]
}

/// Keep-alive connections that made one GET and then sit idle, until [`Idle::finish`] makes one more GET
/// on each.
pub struct Idle {
    conns: Vec<Conn>,
    tag: String,
}

impl Idle {
    pub fn open(ns: &str, tag: &str, n: usize) -> Result<Idle> {
        let (ns, t) = (ns.to_string(), tag.to_string());
        std::thread::spawn(move || -> Result<Idle> {
            enter_ns(&ns)?;
            let mut conns = Vec::new();
            for i in 0..n {
                let mut c = Conn::connect()?;
                c.get_pattern(&format!("/file?len=4000&key=7000&rid={t}-i{i}-0"), 7000, 4000, true)?;
                conns.push(c);
            }
            Ok(Idle { conns, tag: t })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the idle connections' thread panicked"))?
    }

    /// One more GET on each idle connection (the sockets live in the client namespace already).
    pub fn finish(self) -> Report {
        let mut r = Report { name: "idle".into(), ..Report::default() };
        for (i, mut c) in self.conns.into_iter().enumerate() {
            let target = format!("/file?len=9000&key=7001&rid={}-i{i}-1", self.tag);
            r.targets.push(target.clone());
            match c.get_pattern(&target, 7001, 9000, true) {
                Ok(()) => r.requests += 1,
                Err(e) => {
                    r.error = Some(format!("idle connection {i}: {e:#}"));
                    break;
                }
            }
            r.stall = r.stall.max(c.stall);
        }
        r
    }
}
