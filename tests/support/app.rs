//! The application the takeover tests run over a live TCP connection (`us-testapp`).
//!
//! Line protocol, several requests per connection, one at a time:
//! * `GET <n>\n` → `n` bytes of [`pattern`] with key `response_key(i)`, where `i` is
//!   the request's index on the connection (0-based);
//! * `PUT <n>\n` followed by `n` bytes → `OK <sha256 hex of the n bytes>\n`.
//!
//! Application state is not TCP state. The server keeps its own [`Record`]: which
//! responses it owes and from which server-stream offset, how many response bytes it
//! handed to the kernel, how many client bytes it consumed, and (for an upload) the
//! consumed body bytes in a file. When the file `DIR/freeze` appears it finishes its
//! current step, writes `DIR/record.json` and holds the socket open forever. A server
//! on another host restores the TCP connection from a packet-derived plan and carries
//! on from that record ([`resume`]).
//!
//! Stream offsets count bytes after the SYN (offset 0 = ISN + 1) in each direction.

use crate::pattern;
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Seek, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest request line the server accepts.
const MAX_LINE: usize = 64;
/// How often a blocked server looks for the freeze file.
const POLL_INTERVAL_MS: i32 = 10;
const CHUNK: usize = 64 * 1024;

/// What a response consists of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// `len` bytes of the pattern with `key`.
    Pattern { key: u64, len: u64 },
    /// Literal text.
    Text(String),
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Pattern { len, .. } => *len,
            Body::Text(t) => t.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the body's bytes from `offset` (within the body).
    fn fill(&self, offset: u64, buf: &mut [u8]) {
        match self {
            Body::Pattern { key, .. } => pattern::fill(*key, offset, buf),
            Body::Text(t) => buf.copy_from_slice(&t.as_bytes()[offset as usize..offset as usize + buf.len()]),
        }
    }
}

/// A response placed in the server's outgoing stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Server-stream offset of the response's first byte.
    pub start: u64,
    pub body: Body,
}

/// An upload (PUT body) being received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// Request index on the connection.
    pub index: u64,
    /// Announced body length.
    pub len: u64,
    /// Body bytes consumed so far; they are in `file` (inside the record directory).
    pub received: u64,
    pub file: String,
}

/// Where the server application stands on its one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Process holding the socket, and the socket's descriptor in it.
    pub pid: u32,
    pub fd: i32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Client-stream offset up to which the application read (consumed) bytes.
    pub client_offset: u64,
    /// Server-stream offset up to which the application handed bytes to the kernel.
    pub server_offset: u64,
    /// Bytes read but not yet parsed (a partial request line).
    #[serde(with = "tcp_replay::plan::hex_bytes")]
    pub pending: Vec<u8>,
    /// Requests parsed so far.
    pub requests: u64,
    /// Every response owed so far, in stream order.
    pub responses: Vec<Response>,
    pub upload: Option<Upload>,
    /// The client closed its side (EOF read).
    pub eof: bool,
}

impl Record {
    /// End of the responses owed so far.
    pub fn responses_end(&self) -> u64 {
        self.responses.last().map_or(0, |r| r.start + r.body.len())
    }

    /// Fills `buf` with the outgoing stream from `offset`. Returns how many bytes it filled.
    fn fill_out(&self, offset: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        let idx = self.responses.partition_point(|r| r.start + r.body.len() <= offset);
        for r in &self.responses[idx..] {
            let pos = offset + done as u64;
            if done == buf.len() || pos < r.start {
                break;
            }
            let within = pos - r.start;
            let n = ((r.body.len() - within) as usize).min(buf.len() - done);
            r.body.fill(within, &mut buf[done..done + n]);
            done += n;
        }
        done
    }
}

/// Files in the record directory.
pub mod files {
    pub const PID: &str = "pid";
    pub const READY: &str = "ready";
    pub const FREEZE: &str = "freeze";
    pub const RECORD: &str = "record.json";
    pub const RESTORED: &str = "restored.json";
}

/// What `resume` reports once the connection is restored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restored {
    pub restore_us: u64,
    pub pid: u32,
}

/// Writes `value` as JSON to `path` atomically (readers never see a partial file).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(value)?).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// Reads a JSON file written by [`write_json_atomic`].
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Token-bucket-free pacing: after `done` bytes, sleep until `done / rate` seconds passed.
struct Pacer {
    start: Instant,
    rate: Option<u64>,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Pacer {
        Pacer { start: Instant::now(), rate }
    }

    /// Bytes that may be moved now, having moved `done` so far (`usize::MAX` if unlimited).
    fn allowance(&self, done: u64) -> usize {
        match self.rate {
            None => usize::MAX,
            Some(rate) => {
                let budget = (self.start.elapsed().as_secs_f64() * rate as f64) as u64;
                budget.saturating_sub(done).min(usize::MAX as u64) as usize
            }
        }
    }

    /// How long until one more chunk of `chunk` bytes is allowed.
    fn wait_for(&self, done: u64, chunk: usize) -> Duration {
        match self.rate {
            None => Duration::ZERO,
            Some(rate) => {
                let due = Duration::from_secs_f64((done + chunk as u64) as f64 / rate as f64);
                due.saturating_sub(self.start.elapsed())
            }
        }
    }
}

/// The server side of the protocol over one nonblocking socket.
struct Server {
    dir: PathBuf,
    rec: Record,
    stream: TcpStream,
    hasher: Option<Sha256>,
    upload_file: Option<File>,
    /// Client bytes still to drop: the predecessor consumed them already.
    skip_in: u64,
    pacer: Pacer,
    /// Bytes read through the pacer.
    paced: u64,
}

/// How a server loop ended.
enum Outcome {
    /// The client closed and every response was handed to the kernel.
    Done,
    /// `DIR/freeze` appeared and the record was written.
    Frozen,
}

impl Server {
    fn new(dir: &Path, rec: Record, stream: TcpStream, read_rate: Option<u64>) -> Result<Server> {
        stream.set_nonblocking(true)?;
        let mut s = Server {
            dir: dir.to_path_buf(),
            rec,
            stream,
            hasher: None,
            upload_file: None,
            skip_in: 0,
            pacer: Pacer::new(read_rate),
            paced: 0,
        };
        if let Some(up) = s.rec.upload.clone() {
            // Resuming an upload: hash what the predecessor consumed, append the rest.
            let path = s.dir.join(&up.file);
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let on_disk = f.metadata()?.len();
            ensure!(
                on_disk >= up.received,
                "{} holds {on_disk} bytes, fewer than the {} consumed",
                path.display(),
                up.received
            );
            f.set_len(up.received)?;
            let mut h = Sha256::new();
            io::copy(&mut (&mut f).take(up.received), &mut h)?;
            f.seek(io::SeekFrom::End(0))?;
            s.hasher = Some(h);
            s.upload_file = Some(f);
        }
        Ok(s)
    }

    fn run(&mut self) -> Result<Outcome> {
        let mut buf = vec![0u8; CHUNK];
        let fd = self.stream.as_raw_fd();
        loop {
            if self.dir.join(files::FREEZE).exists() {
                write_json_atomic(&self.dir.join(files::RECORD), &self.rec)?;
                return Ok(Outcome::Frozen);
            }
            let want_write = self.rec.server_offset < self.rec.responses_end();
            if self.rec.eof && !want_write {
                return Ok(Outcome::Done);
            }
            let allowance = self.pacer.allowance(self.paced);
            let want_read = !self.rec.eof && allowance > 0;
            let mut events = 0;
            if want_read {
                events |= libc::POLLIN;
            }
            if want_write {
                events |= libc::POLLOUT;
            }
            let timeout = if want_read || self.pacer.rate.is_none() {
                POLL_INTERVAL_MS
            } else {
                (self.pacer.wait_for(self.paced, 1).as_millis() as i32).clamp(1, POLL_INTERVAL_MS)
            };
            let mut pfd = libc::pollfd { fd, events, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, timeout) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("poll");
            }
            if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && want_read {
                let n = allowance.min(buf.len());
                match self.stream.read(&mut buf[..n]) {
                    Ok(0) => self.rec.eof = true,
                    Ok(n) => {
                        self.paced += n as u64;
                        self.consume(&buf[..n])?;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("reading from the client"),
                }
            }
            if pfd.revents & libc::POLLOUT != 0 && want_write {
                let want = (self.rec.responses_end() - self.rec.server_offset).min(buf.len() as u64) as usize;
                let n = self.rec.fill_out(self.rec.server_offset, &mut buf[..want]);
                match self.stream.write(&buf[..n]) {
                    Ok(w) => self.rec.server_offset += w as u64,
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("writing to the client"),
                }
            }
        }
    }

    /// Feeds client bytes to the protocol.
    fn consume(&mut self, mut data: &[u8]) -> Result<()> {
        let skip = self.skip_in.min(data.len() as u64) as usize;
        self.skip_in -= skip as u64;
        data = &data[skip..];
        self.rec.client_offset += data.len() as u64;
        while !data.is_empty() {
            if let Some(up) = self.rec.upload.as_mut() {
                let n = ((up.len - up.received) as usize).min(data.len());
                let file = self.upload_file.as_mut().context("upload without a file")?;
                file.write_all(&data[..n])?;
                self.hasher.as_mut().context("upload without a hash")?.update(&data[..n]);
                up.received += n as u64;
                data = &data[n..];
                if up.received == up.len {
                    self.finish_upload();
                }
                continue;
            }
            match data.iter().position(|&b| b == b'\n') {
                None => {
                    self.rec.pending.extend_from_slice(data);
                    ensure!(self.rec.pending.len() <= MAX_LINE, "request line longer than {MAX_LINE} bytes");
                    data = &[];
                }
                Some(i) => {
                    let mut line = std::mem::take(&mut self.rec.pending);
                    line.extend_from_slice(&data[..i]);
                    data = &data[i + 1..];
                    self.request(&line)?;
                }
            }
        }
        Ok(())
    }

    fn request(&mut self, line: &[u8]) -> Result<()> {
        let text = std::str::from_utf8(line).context("request line is not UTF-8")?;
        let (verb, n) = text.split_once(' ').with_context(|| format!("bad request line {text:?}"))?;
        let n: u64 = n.parse().with_context(|| format!("bad length in {text:?}"))?;
        let index = self.rec.requests;
        self.rec.requests += 1;
        match verb {
            "GET" => self.respond(Body::Pattern { key: pattern::response_key(index), len: n }),
            "PUT" => {
                let file = format!("upload-{index}.bin");
                self.upload_file = Some(File::create(self.dir.join(&file))?);
                self.hasher = Some(Sha256::new());
                self.rec.upload = Some(Upload { index, len: n, received: 0, file });
                if n == 0 {
                    self.finish_upload();
                }
            }
            _ => bail!("unknown request {text:?}"),
        }
        Ok(())
    }

    fn finish_upload(&mut self) {
        self.rec.upload = None;
        self.upload_file = None;
        let sha = hex::encode(self.hasher.take().unwrap_or_default().finalize());
        self.respond(Body::Text(format!("OK {sha}\n")));
    }

    fn respond(&mut self, body: Body) {
        let start = self.rec.responses_end();
        self.rec.responses.push(Response { start, body });
    }
}

/// Holds the process (and so the socket) forever, as a server cut off mid-flight would.
fn hold_forever(_stream: &TcpStream) -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `us-testapp serve`: accept one connection on `listen` and serve it until the
/// client closes, or until `DIR/freeze` appears (then write the record and hold).
pub fn serve(listen: SocketAddr, dir: &Path, read_rate: Option<u64>) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(files::PID), std::process::id().to_string())?;
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    fs::write(dir.join(files::READY), listener.local_addr()?.to_string())?;
    let (stream, remote) = listener.accept().context("accepting")?;
    drop(listener);
    let rec = Record {
        pid: std::process::id(),
        fd: stream.as_raw_fd(),
        local: stream.local_addr()?,
        remote,
        client_offset: 0,
        server_offset: 0,
        pending: Vec::new(),
        requests: 0,
        responses: Vec::new(),
        upload: None,
        eof: false,
    };
    let mut server = Server::new(dir, rec, stream, read_rate)?;
    match server.run()? {
        Outcome::Done => Ok(()),
        Outcome::Frozen => hold_forever(&server.stream),
    }
}

/// Where the restored socket's queues sit in the two byte streams (from the tracker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOffsets {
    /// Server-stream offset of the plan's `snd_una` (first byte of its send queue).
    pub snd_una: u64,
    /// Client-stream offset of the first byte of the plan's receive queue.
    pub recv_queue: u64,
}

/// Continues serving on `stream`, a restored socket whose send queue ends at
/// server-stream offset `sent_end` and whose receive queue starts at client-stream
/// offset `recv_start`, from the old server's record in `dir`.
pub fn serve_restored(
    stream: TcpStream,
    dir: &Path,
    sent_end: u64,
    recv_start: u64,
    read_rate: Option<u64>,
) -> Result<()> {
    let mut rec: Record = read_json(&dir.join(files::RECORD))?;
    ensure!(
        sent_end <= rec.server_offset,
        "the plan's send queue ends at server offset {sent_end}, beyond the {} bytes the old server wrote",
        rec.server_offset
    );
    ensure!(
        recv_start <= rec.client_offset,
        "the plan's receive queue starts at client offset {recv_start}, after the {} bytes the old server consumed: bytes lost",
        rec.client_offset
    );
    let skip = rec.client_offset - recv_start;
    // Bytes the old kernel took but never sent are ours to send again.
    rec.server_offset = sent_end;
    rec.pid = std::process::id();
    rec.fd = stream.as_raw_fd();
    let mut server = Server::new(dir, rec, stream, read_rate)?;
    server.skip_in = skip;
    // A resumed server is not frozen again; drop a stale freeze request.
    let _ = fs::remove_file(dir.join(files::FREEZE));
    match server.run()? {
        Outcome::Done => Ok(()),
        Outcome::Frozen => hold_forever(&server.stream),
    }
}

/// `us-testapp resume`: restore the connection from `plan` and carry on from the
/// record in `dir`.
#[cfg(target_os = "linux")]
pub fn resume(plan: &Path, offsets: PlanOffsets, dir: &Path, read_rate: Option<u64>) -> Result<()> {
    let plan: tcp_replay::RestorePlan = read_json(plan)?;
    let t0 = Instant::now();
    let stream = tcp_replay::repair::restore(&plan).context("restoring the connection")?;
    let restore_us = t0.elapsed().as_micros() as u64;
    write_json_atomic(&dir.join(files::RESTORED), &Restored { restore_us, pid: std::process::id() })?;
    let sent_end = offsets.snd_una + (plan.send_queue.len() + plan.unsent.len()) as u64;
    serve_restored(stream, dir, sent_end, offsets.recv_queue, read_rate)
}

/// What the client does on its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    /// One `GET bytes`, read at `rate` bytes/s.
    Download { bytes: u64, rate: Option<u64> },
    /// One `PUT bytes`, written at `rate` bytes/s.
    Upload { bytes: u64, rate: Option<u64> },
    /// `GET first`; phase `idle` until `go` exists; then `GET second`.
    Idle { first: u64, second: u64, go: PathBuf },
}

/// The client's progress, rewritten atomically as it goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub local_port: u16,
    /// `connected`, `transfer`, `idle`, `finished`.
    pub phase: String,
    /// Bytes of the current transfer done (read, or handed to the kernel).
    pub done: u64,
    pub total: u64,
}

/// The client's verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientResult {
    pub ok: bool,
    pub error: Option<String>,
    pub local_port: u16,
    /// SHA-256 of each transfer's body (response for GET, upload for PUT), in order.
    pub sha256: Vec<String>,
    /// Longest time one read or write call waited.
    pub max_wait_ms: u64,
    pub elapsed_ms: u64,
}

/// `us-testapp client`: run `scenario`, verify every byte, write `result`, and
/// fail on any error, reset or early EOF.
pub fn client(
    connect: SocketAddr,
    scenario: &Scenario,
    progress: &Path,
    result: &Path,
    io_timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    let mut c = Client {
        stream: None,
        progress: progress.to_path_buf(),
        state: Progress::default(),
        max_wait: Duration::ZERO,
        sha256: Vec::new(),
        last_report: 0,
    };
    let outcome = c.run(connect, scenario, io_timeout);
    let res = ClientResult {
        ok: outcome.is_ok(),
        error: outcome.as_ref().err().map(|e| format!("{e:#}")),
        local_port: c.state.local_port,
        sha256: c.sha256.clone(),
        max_wait_ms: c.max_wait.as_millis() as u64,
        elapsed_ms: start.elapsed().as_millis() as u64,
    };
    write_json_atomic(result, &res)?;
    outcome
}

struct Client {
    stream: Option<TcpStream>,
    progress: PathBuf,
    state: Progress,
    max_wait: Duration,
    sha256: Vec<String>,
    last_report: u64,
}

impl Client {
    fn run(&mut self, connect: SocketAddr, scenario: &Scenario, io_timeout: Duration) -> Result<()> {
        let stream =
            TcpStream::connect_timeout(&connect, io_timeout).with_context(|| format!("connecting to {connect}"))?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        stream.set_nodelay(true)?;
        self.state.local_port = stream.local_addr()?.port();
        self.stream = Some(stream);
        self.report("connected", 0, 0, true)?;
        match scenario {
            Scenario::Download { bytes, rate } => self.get(0, *bytes, *rate)?,
            Scenario::Upload { bytes, rate } => self.put(0, *bytes, *rate)?,
            Scenario::Idle { first, second, go } => {
                self.get(0, *first, None)?;
                self.report("idle", *first, *first, true)?;
                let deadline = Instant::now() + io_timeout;
                while !go.exists() {
                    ensure!(Instant::now() < deadline, "no go signal ({}) within {io_timeout:?}", go.display());
                    std::thread::sleep(Duration::from_millis(5));
                }
                self.get(1, *second, None)?;
            }
        }
        self.close()?;
        self.report("finished", self.state.done, self.state.total, true)
    }

    fn stream(&self) -> &TcpStream {
        self.stream.as_ref().expect("connected before any transfer")
    }

    fn report(&mut self, phase: &str, done: u64, total: u64, force: bool) -> Result<()> {
        self.state.phase = phase.to_string();
        self.state.done = done;
        self.state.total = total;
        if force || done - self.last_report.min(done) >= 256 * 1024 {
            self.last_report = done;
            write_json_atomic(&self.progress, &self.state)?;
        }
        Ok(())
    }

    /// Reads into `buf`, tracking how long the call waited; EOF is an error.
    fn read_some(&mut self, buf: &mut [u8], what: &str) -> Result<usize> {
        loop {
            let t = Instant::now();
            let r = Read::read(&mut self.stream(), buf);
            self.max_wait = self.max_wait.max(t.elapsed());
            match r {
                Ok(0) => bail!("connection closed by the server (EOF) during {what}"),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    bail!("no byte from the server for {:?} during {what}", t.elapsed())
                }
                Err(e) => return Err(e).with_context(|| format!("reading during {what}")),
            }
        }
    }

    fn write_all_timed(&mut self, data: &[u8], what: &str) -> Result<()> {
        let t = Instant::now();
        let r = Write::write_all(&mut self.stream(), data);
        self.max_wait = self.max_wait.max(t.elapsed());
        r.with_context(|| format!("writing during {what}"))
    }

    fn get(&mut self, index: u64, len: u64, rate: Option<u64>) -> Result<()> {
        let what = format!("GET {len} (request {index})");
        self.write_all_timed(format!("GET {len}\n").as_bytes(), &what)?;
        let key = pattern::response_key(index);
        let pacer = Pacer::new(rate);
        let mut buf = vec![0u8; CHUNK];
        let mut h = Sha256::new();
        let mut got = 0u64;
        self.last_report = 0;
        while got < len {
            let wait = pacer.wait_for(got, CHUNK.min((len - got) as usize));
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            let want = ((len - got) as usize).min(buf.len());
            let n = self.read_some(&mut buf[..want], &what)?;
            if let Some(i) = pattern::first_mismatch(key, got, &buf[..n]) {
                bail!("wrong byte at offset {} of {what}", got + i as u64);
            }
            h.update(&buf[..n]);
            got += n as u64;
            self.report("transfer", got, len, false)?;
        }
        self.sha256.push(hex::encode(h.finalize()));
        Ok(())
    }

    fn put(&mut self, index: u64, len: u64, rate: Option<u64>) -> Result<()> {
        let what = format!("PUT {len} (request {index})");
        self.write_all_timed(format!("PUT {len}\n").as_bytes(), &what)?;
        let key = pattern::upload_key(index);
        let pacer = Pacer::new(rate);
        let mut buf = vec![0u8; CHUNK];
        let mut h = Sha256::new();
        let mut sent = 0u64;
        self.last_report = 0;
        while sent < len {
            let n = ((len - sent) as usize).min(CHUNK);
            let wait = pacer.wait_for(sent, n);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            pattern::fill(key, sent, &mut buf[..n]);
            h.update(&buf[..n]);
            self.write_all_timed(&buf[..n], &what)?;
            sent += n as u64;
            self.report("transfer", sent, len, false)?;
        }
        let sha = hex::encode(h.finalize());
        let expected = format!("OK {sha}\n");
        let mut reply = Vec::new();
        while reply.len() < expected.len() {
            let n = self.read_some(&mut buf[..expected.len() - reply.len()], &what)?;
            reply.extend_from_slice(&buf[..n]);
        }
        ensure!(
            reply == expected.as_bytes(),
            "server replied {:?} to {what}, expected {expected:?}",
            String::from_utf8_lossy(&reply)
        );
        self.sha256.push(sha);
        Ok(())
    }

    /// Closes our side and expects the server's orderly close (EOF, not a reset).
    fn close(&mut self) -> Result<()> {
        self.stream().shutdown(std::net::Shutdown::Write).context("shutting down the write side")?;
        let mut buf = [0u8; 64];
        loop {
            let t = Instant::now();
            let r = Read::read(&mut self.stream(), &mut buf);
            self.max_wait = self.max_wait.max(t.elapsed());
            match r {
                Ok(0) => return Ok(()),
                Ok(n) => bail!("{n} unexpected bytes from the server after the last response"),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("waiting for the server to close"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    static NEXT: AtomicU32 = AtomicU32::new(0);

    /// A fresh scratch directory under the target directory, removed when the test passes.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
    }

    fn scratch(name: &str) -> Scratch {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/us-testapp-unit").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn wait_for(path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(Instant::now() < deadline, "{} did not appear within 10 s", path.display());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Starts `serve` on a loopback port in a thread; returns its address.
    fn start_server(dir: &Path, read_rate: Option<u64>) -> SocketAddr {
        let d = dir.to_path_buf();
        std::thread::spawn(move || serve("127.0.0.1:0".parse().unwrap(), &d, read_rate));
        wait_for(&dir.join(files::READY));
        fs::read_to_string(dir.join(files::READY)).unwrap().parse().unwrap()
    }

    fn run_client(addr: SocketAddr, scenario: Scenario, dir: &Path) -> (Result<()>, ClientResult) {
        let r = client(addr, &scenario, &dir.join("progress.json"), &dir.join("result.json"), Duration::from_secs(10));
        (r, read_json(&dir.join("result.json")).unwrap())
    }

    #[test]
    fn download_delivers_the_pattern_and_the_server_closes_cleanly() {
        let dir = scratch("download");
        let addr = start_server(&dir, None);
        let (r, res) = run_client(addr, Scenario::Download { bytes: 3_000_001, rate: None }, &dir);
        r.unwrap();
        assert!(res.ok);
        assert_eq!(res.sha256, vec![pattern::sha256_hex(pattern::response_key(0), 3_000_001)]);
        let p: Progress = read_json(&dir.join("progress.json")).unwrap();
        assert_eq!((p.phase.as_str(), p.done, p.local_port), ("finished", 3_000_001, res.local_port));
    }

    #[test]
    fn upload_is_answered_with_its_sha256_under_a_read_rate() {
        let dir = scratch("upload");
        let addr = start_server(&dir, Some(20_000_000));
        let (r, res) = run_client(addr, Scenario::Upload { bytes: 1_000_000, rate: Some(50_000_000) }, &dir);
        r.unwrap();
        assert_eq!(res.sha256, vec![pattern::sha256_hex(pattern::upload_key(0), 1_000_000)]);
    }

    #[test]
    fn idle_client_waits_for_go_then_sends_its_second_request() {
        let dir = scratch("idle");
        let addr = start_server(&dir, None);
        let go = dir.join("go");
        let scenario = Scenario::Idle { first: 1000, second: 200_000, go: go.clone() };
        let d = dir.to_path_buf();
        let client = std::thread::spawn(move || run_client(addr, scenario, &d));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if read_json::<Progress>(&dir.join("progress.json")).is_ok_and(|p| p.phase == "idle") {
                break;
            }
            assert!(Instant::now() < deadline, "client never went idle");
            std::thread::sleep(Duration::from_millis(2));
        }
        fs::write(&go, "").unwrap();
        let (r, res) = client.join().unwrap();
        r.unwrap();
        assert_eq!(res.sha256[1], pattern::sha256_hex(pattern::response_key(1), 200_000));
    }

    #[test]
    fn client_reports_an_early_eof_as_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 9];
            s.read_exact(&mut line).unwrap();
            let mut body = vec![0u8; 500];
            pattern::fill(pattern::response_key(0), 0, &mut body);
            s.write_all(&body).unwrap();
        });
        let dir = scratch("eof");
        let (r, res) = run_client(addr, Scenario::Download { bytes: 1000, rate: None }, &dir);
        assert!(r.is_err());
        assert!(!res.ok && res.error.unwrap().contains("EOF"));
    }

    /// A raw client for the resume tests: the test plays the TCP layer's part by
    /// hand, so the application-level takeover logic is checked without TCP_REPAIR.
    fn freeze(dir: &Path) -> Record {
        fs::write(dir.join(files::FREEZE), "").unwrap();
        wait_for(&dir.join(files::RECORD));
        read_json(&dir.join(files::RECORD)).unwrap()
    }

    fn set_rcvbuf(s: &TcpStream, bytes: libc::c_int) {
        use std::os::fd::AsRawFd;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let ptr = &bytes as *const libc::c_int as *const libc::c_void;
        // SAFETY: a valid socket fd and a c_int option value of the stated length.
        let rc = unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, ptr, len) };
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn download_frozen_midway_is_finished_by_a_resumed_server_from_the_sent_offset() {
        let dir = scratch("resume-get");
        let addr = start_server(&dir, None);
        let mut c1 = TcpStream::connect(addr).unwrap();
        // The freeze must land mid-response: a small, locked receive buffer keeps the
        // bytes in flight far below `len` whatever the host's tcp_rmem/tcp_wmem allow.
        set_rcvbuf(&c1, 128 * 1024);
        let len = 16_000_000u64;
        c1.write_all(format!("GET {len}\n").as_bytes()).unwrap();
        let mut got = vec![0u8; 300_000];
        c1.read_exact(&mut got).unwrap();
        let rec = freeze(&dir);
        assert_eq!(rec.client_offset, format!("GET {len}\n").len() as u64);
        assert!(rec.server_offset >= 300_000 && rec.server_offset < len, "{}", rec.server_offset);
        // Pretend the wire carried 1000 bytes less than the application wrote.
        let sent_end = rec.server_offset - 1000;
        let mut rest = vec![0u8; (sent_end - 300_000) as usize];
        c1.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c1.read_exact(&mut rest).unwrap();
        got.extend_from_slice(&rest);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c2 = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (s2, _) = listener.accept().unwrap();
        let d = dir.to_path_buf();
        let client_offset = rec.client_offset;
        let server = std::thread::spawn(move || serve_restored(s2, &d, sent_end, client_offset, None));
        c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tail = vec![0u8; (len - sent_end) as usize];
        c2.read_exact(&mut tail).unwrap();
        got.extend_from_slice(&tail);
        assert_eq!(pattern::first_mismatch(pattern::response_key(0), 0, &got), None);
        c2.shutdown(std::net::Shutdown::Write).unwrap();
        server.join().unwrap().unwrap();
        assert_eq!(c2.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn upload_frozen_midway_is_hashed_whole_by_a_resumed_server_that_skips_consumed_bytes() {
        let dir = scratch("resume-put");
        let addr = start_server(&dir, None);
        let mut c1 = TcpStream::connect(addr).unwrap();
        let len = 1_000_000u64;
        let key = pattern::upload_key(0);
        let head = format!("PUT {len}\n");
        c1.write_all(head.as_bytes()).unwrap();
        let mut body = vec![0u8; len as usize];
        pattern::fill(key, 0, &mut body);
        c1.write_all(&body[..400_000]).unwrap();
        // Freeze wherever the server got to; the rest is what a restored receive queue
        // plus the client's retransmissions would deliver, 5000 consumed bytes included.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_dir(&*dir).unwrap().any(|e| e.unwrap().file_name() == "upload-0.bin") {
            assert!(Instant::now() < deadline, "the server never started the upload");
            std::thread::sleep(Duration::from_millis(2));
        }
        let rec = freeze(&dir);
        let consumed = rec.upload.as_ref().map(|u| u.received).unwrap();
        assert_eq!(rec.client_offset, head.len() as u64 + consumed);
        let back = consumed.min(5000);
        let recv_start = rec.client_offset - back;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c2 = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (s2, _) = listener.accept().unwrap();
        let d = dir.to_path_buf();
        let sent_end = rec.server_offset;
        let server = std::thread::spawn(move || serve_restored(s2, &d, sent_end, recv_start, None));
        c2.write_all(&body[(consumed - back) as usize..]).unwrap();
        let expected = format!("OK {}\n", pattern::sha256_hex(key, len));
        let mut reply = vec![0u8; expected.len()];
        c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c2.read_exact(&mut reply).unwrap();
        assert_eq!(String::from_utf8(reply).unwrap(), expected);
        c2.shutdown(std::net::Shutdown::Write).unwrap();
        server.join().unwrap().unwrap();
    }

    #[test]
    fn resume_refuses_a_plan_that_lost_consumed_bytes() {
        let dir = scratch("resume-gap");
        let addr = start_server(&dir, None);
        let mut c1 = TcpStream::connect(addr).unwrap();
        c1.write_all(b"GET 10\n").unwrap();
        c1.read_exact(&mut [0u8; 10]).unwrap();
        let rec = freeze(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c2 = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (s2, _) = listener.accept().unwrap();
        let err = serve_restored(s2, &dir, rec.server_offset, rec.client_offset + 1, None).unwrap_err();
        assert!(format!("{err:#}").contains("bytes lost"), "{err:#}");
    }
}
