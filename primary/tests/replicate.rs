//! Replication between the nodes against the real kernel (ARCHITECTURE.md invariants 1 to 3): the
//! primary's sender (`primary::replicate`) with the real proxy and the real NFQUEUE gate, and the
//! backup's replica (`backup::replica`), on a `scripts/testbed up ID --pair` bed:
//!
//! * `client` 10.0.0.1 talks HTTP/1.1 keep-alive to the VIP 10.0.0.100:80, held by `server`;
//! * `server` runs the gate, the proxy and the sender, and accepts joins on 10.1.0.2:7700;
//! * `spare` runs the backup's replica, joining over the replication network;
//! * `origin` 10.2.0.10:8080 is a small raw HTTP server answering `GET /bytes/N?delay=MS&seed=S` with
//!   N pattern bytes after MS milliseconds.
//!
//! Everything runs in this one process: each node is a thread that entered its host's namespace and
//! runs its own Tokio runtime (the backup's is single-threaded, so holding its table stalls it the way
//! a paused process would be stalled). The client's sockets and a packet capture (AF_PACKET, kernel
//! receive timestamps) are made in the client's namespace. Root only. Timings are printed, never
//! asserted.

use anyhow::{Context, Result, anyhow, bail, ensure};
use backup::replica::{self, Progress, ReplicaConfig};
use primary::gate::{Gate, GateConfig};
use primary::proxy::{Backend, Limits, Proxy, ProxyConfig};
use primary::replicate::{GateFeed, NoVipCheck, Replicator, SenderConfig, SenderStatus};
use shared::admin::{AdminState, PeerState};
use shared::link::{HandshakeError, LinkConfig, LocalIdentity, WelcomeError};
use shared::protocol::Role;
use shared::replica::ReplicaTable;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use understudy_tests::harness::{Testbed, is_root, run, testbed_id, wait_until};
use understudy_tests::netns::{enter, in_ns};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const PORT: u16 = 80;
const REPL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 7700);
const ORIGIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 10), 8080);
const CLUSTER: &str = "replicate-test";
/// Upper bound for anything that should happen promptly.
const PROMPT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------------
// The test bed, namespaces and node threads.

/// A `scripts/testbed up ID --pair` bed with the VIP on `server`; `Drop` takes it down.
fn up_bed(tag: char) -> Result<Testbed> {
    ensure!(is_root(), "the replication tests need root (namespaces, iptables, NFQUEUE)");
    let bed = Testbed::up_pair(&testbed_id('r', tag))?;
    bed.vip("server")?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Ok(bed)
}

/// A node: a thread inside a namespace running a Tokio runtime until told to stop.
struct NodeThread {
    name: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl NodeThread {
    /// Starts `body` in namespace `ns`. The body sends its handle through the first argument once
    /// ready, then waits for the second (stop) and tears down.
    fn spawn<T, F, Fut>(ns: &str, name: &str, multi_thread: bool, body: F) -> Result<(NodeThread, T)>
    where
        T: Send + 'static,
        F: FnOnce(std::sync::mpsc::SyncSender<T>, tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>>,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let ns = ns.to_string();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            enter(&ns)?;
            let rt = if multi_thread {
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?
            } else {
                tokio::runtime::Builder::new_current_thread().enable_all().build()?
            };
            rt.block_on(body(ready_tx, stop_rx))
        })?;
        let mut node = NodeThread { name: name.to_string(), stop: Some(stop_tx), thread: Some(thread) };
        match ready_rx.recv_timeout(PROMPT) {
            Ok(handle) => Ok((node, handle)),
            Err(_) => {
                let result = node.finish();
                Err(anyhow!("{name} did not start: {:?}", result.err()))
            }
        }
    }

    /// Stops the node and waits for its thread.
    fn finish(&mut self) -> Result<()> {
        drop(self.stop.take());
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("{} panicked", self.name))?,
            None => Ok(()),
        }
    }
}

impl Drop for NodeThread {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("{}: {e:#}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The origin, the primary and the backup.

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64).map(|i| ((i.wrapping_add(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 56) as u8).collect()
}

/// Parses `/bytes/N?delay=MS&seed=S`.
fn parse_target(target: &str) -> (usize, u64, u64) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let len = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok()).unwrap_or(0);
    let param = |name: &str| {
        query.split('&').find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('='))?.parse().ok())
    };
    (len, param("delay").unwrap_or(0), param("seed").unwrap_or(0))
}

async fn serve_origin(mut s: tokio::net::TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await? {
                0 => return Ok(()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let (len, delay, seed) = parse_target(head.split_whitespace().nth(1).unwrap_or("/"));
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(&pattern(len, seed)).await?;
    }
}

fn start_origin(bed: &Testbed) -> Result<NodeThread> {
    let (node, ()) = NodeThread::spawn(&bed.ns("origin"), "origin", true, |ready, stop| async move {
        let listener = tokio::net::TcpListener::bind(ORIGIN).await?;
        ready.send(())?;
        let accept = async {
            loop {
                if let Ok((s, _)) = listener.accept().await {
                    tokio::spawn(serve_origin(s));
                }
            }
        };
        tokio::select! {
            _ = stop => {}
            () = accept => {}
        }
        Ok(())
    })?;
    Ok(node)
}

#[derive(Clone)]
struct PrimaryHandle {
    replicator: Replicator,
    admin: AdminState,
}

impl PrimaryHandle {
    fn status(&self) -> SenderStatus {
        self.replicator.status().borrow().clone()
    }

    fn table(&self) -> ReplicaTable {
        self.replicator.with_table(|t| t.clone())
    }

    /// Waits until the backup holds every record the primary numbered.
    fn wait_all_acked(&self) -> Result<SenderStatus> {
        wait_until("the backup to acknowledge everything", PROMPT, || {
            let s = self.status();
            Ok((s.acked == Some(s.sent)).then_some(s))
        })
    }

    fn wait_peer(&self, peer: PeerState, limit: Duration) -> Result<Instant> {
        wait_until(&format!("peer state {}", peer.as_str()), limit, || {
            Ok((self.status().peer == peer).then(Instant::now))
        })
    }
}

fn start_primary(bed: &Testbed, lease: Duration) -> Result<(NodeThread, PrimaryHandle)> {
    NodeThread::spawn(&bed.ns("server"), "primary", true, move |ready, stop| async move {
        let instance = format!("rt{}", std::process::id());
        let (gate, diverted) = Gate::start(GateConfig::new(VIP, PORT, instance))?;
        let gate = Arc::new(gate);
        let admin = AdminState::new("primary-a", CLUSTER, Role::Primary, 1, Instant::now());
        let identity = LocalIdentity::new(CLUSTER, "primary-a", Role::Primary, 1);
        let config = SenderConfig::new(identity, LinkConfig::default(), lease);
        let feed = GateFeed::new(gate.clone(), diverted);
        let (replicator, task) =
            Replicator::start(config, ReplicaTable::new(), Some(feed), admin.clone(), Arc::new(NoVipCheck))?;
        let joins = replicator.serve_joins(tokio::net::TcpListener::bind(REPL).await?);
        let limits = Limits { drain_timeout: Duration::from_secs(1), ..Limits::default() };
        let proxy = Proxy::new(ProxyConfig {
            node: "primary-a".into(),
            backend: Backend::Upstream(format!("http://{ORIGIN}").parse()?),
            request_log: None,
            limits,
        })?;
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((VIP, PORT))).await?;
        let hooks = replicator.hooks();
        let serving = tokio::spawn(async move {
            proxy
                .run(listener, hooks, async {
                    let _ = stop.await;
                })
                .await
        });
        ready.send(PrimaryHandle { replicator: replicator.clone(), admin })?;
        serving.await?;
        replicator.shutdown().await;
        joins.abort();
        task.await?;
        drop(gate);
        Ok(())
    })
}

struct BackupHandle {
    table: Arc<Mutex<ReplicaTable>>,
    progress: tokio::sync::watch::Receiver<Progress>,
}

impl BackupHandle {
    fn table(&self) -> ReplicaTable {
        self.table.lock().expect("backup table lock").clone()
    }
}

fn backup_identity(name: &str) -> LocalIdentity {
    LocalIdentity::new(CLUSTER, name, Role::Backup, 0)
}

fn start_backup(bed: &Testbed, name: &str) -> Result<(NodeThread, BackupHandle)> {
    let identity = backup_identity(name);
    NodeThread::spawn(&bed.ns("spare"), name, false, move |ready, stop| async move {
        let config = ReplicaConfig::new(LinkConfig::default());
        let replica = replica::join(REPL.into(), &identity, &config).await?;
        ready.send(BackupHandle { table: replica.table(), progress: replica.progress() })?;
        let _ = stop.await;
        replica.stop().await;
        Ok(())
    })
}

/// Waits until the backup holds everything, then until both tables are equal (a client ACK may
/// still be on its way); returns the primary's.
fn tables_match(primary: &PrimaryHandle, backup: &BackupHandle) -> Result<ReplicaTable> {
    let mut last = None;
    let matched = wait_until("the backup's table to equal the primary's", PROMPT, || {
        primary.wait_all_acked()?;
        let (p, b) = (primary.table(), backup.table());
        if p == b {
            return Ok(Some(p));
        }
        last = Some((p, b));
        Ok(None)
    });
    matched.map_err(|e| match last {
        Some((p, b)) => anyhow!("{e}\nprimary: {p:#?}\nbackup: {b:#?}"),
        None => e,
    })
}

// ---------------------------------------------------------------------------------------------------
// The client and the capture.

struct Client {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
    local: SocketAddr,
}

impl Client {
    fn connect(bed: &Testbed) -> Result<Client> {
        let stream = in_ns(&bed.ns("client"), || {
            Ok(std::net::TcpStream::connect_timeout(&SocketAddr::from((VIP, PORT)), PROMPT)?)
        })?;
        stream.set_read_timeout(Some(PROMPT))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        Ok(Client { stream, buf: Vec::new(), local })
    }

    fn send_get(&mut self, len: usize, delay_ms: u64, seed: u64) -> Result<()> {
        let req = format!("GET /bytes/{len}?delay={delay_ms}&seed={seed} HTTP/1.1\r\nHost: vip\r\n\r\n");
        self.stream.write_all(req.as_bytes())?;
        Ok(())
    }

    fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk).context("reading the response")?;
        ensure!(n > 0, "the VIP closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads one response and checks it is a 200 carrying `pattern(len, seed)`.
    fn read_response(&mut self, len: usize, seed: u64) -> Result<()> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        ensure!(head.starts_with("http/1.1 200"), "unexpected response head: {head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .context("no content-length")?
            .trim()
            .parse()?;
        ensure!(length == len, "content-length {length}, expected {len}");
        while self.buf.len() < end + len {
            self.fill()?;
        }
        let body: Vec<u8> = self.buf.drain(..end + len).skip(end).collect();
        ensure!(body == pattern(len, seed), "the body differs from the origin's");
        Ok(())
    }

    fn get(&mut self, len: usize, seed: u64) -> Result<Duration> {
        let t = Instant::now();
        self.send_get(len, 0, seed)?;
        self.read_response(len, seed)?;
        Ok(t.elapsed())
    }
}

#[derive(Debug, Clone, Copy)]
struct Pkt {
    at: SystemTime,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    payload: usize,
    seq: u32,
    ack: u32,
}

impl Pkt {
    /// Sequence number after this segment's data (and FIN).
    fn seq_end(&self) -> u32 {
        self.seq.wrapping_add(self.payload as u32).wrapping_add(u32::from(self.flags & FIN != 0))
    }
}

/// `a` is after `b` in sequence space (RFC 793 comparison, wrap-safe).
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

const FIN: u8 = 0x01;
const RST: u8 = 0x04;
/// `SO_TIMESTAMPNS` (`SCM_TIMESTAMPNS`) on x86_64 and aarch64 Linux.
const SO_TIMESTAMPNS: libc::c_int = 35;

/// Every TCP segment seen on the client's eth0, with the kernel's receive time.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    packets: Arc<Mutex<Vec<Pkt>>>,
}

impl Capture {
    fn start(bed: &Testbed) -> Result<Capture> {
        let ns = bed.ns("client");
        let stop = Arc::new(AtomicBool::new(false));
        let packets = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (s, p) = (stop.clone(), packets.clone());
        let thread = std::thread::spawn(move || {
            let opened = enter(&ns).and_then(|()| open_packet_socket("eth0"));
            let fd = match opened {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            capture_loop(&fd, &s, &p);
        });
        ready_rx.recv_timeout(PROMPT).context("the capture did not start")??;
        Ok(Capture { stop, thread: Some(thread), packets })
    }

    /// Segments from the VIP to `client` received in `[from, to)`.
    fn vip_segments(&self, client: SocketAddr, from: SystemTime, to: SystemTime) -> Vec<Pkt> {
        let vip = SocketAddrV4::new(VIP, PORT);
        let packets = self.packets.lock().expect("capture lock");
        packets
            .iter()
            .filter(|p| p.src == vip && SocketAddr::V4(p.dst) == client && p.at >= from && p.at < to)
            .copied()
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_packet_socket(iface: &str) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    ensure!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {iface}");
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: binding with a valid sockaddr_ll of the given length.
    let r = unsafe { libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), len) };
    ensure!(r == 0, "binding the capture to {iface}: {}", std::io::Error::last_os_error());
    let on: libc::c_int = 1;
    let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
    // SAFETY: setsockopt with values of the sizes given.
    unsafe {
        let int = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        ensure!(libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_TIMESTAMPNS, (&raw const on).cast(), int) == 0);
        let tvl = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        ensure!(
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), tvl) == 0
        );
    }
    Ok(fd)
}

fn capture_loop(fd: &OwnedFd, stop: &AtomicBool, packets: &Mutex<Vec<Pkt>>) {
    let mut frame = vec![0u8; 65536];
    let mut control = [0u64; 16];
    while !stop.load(Ordering::Relaxed) {
        let mut iov = libc::iovec { iov_base: frame.as_mut_ptr().cast(), iov_len: frame.len() };
        // SAFETY: msghdr is plain data; zeroed is valid, and the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: recvmsg into the buffers described by `msg`.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, 0) };
        if n <= 0 {
            continue;
        }
        // SAFETY: the kernel filled `control` with cmsghdrs within msg_controllen.
        let at = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            if !cmsg.is_null() && (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == SO_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
            } else {
                SystemTime::now()
            }
        };
        if let Some(p) = parse_frame(&frame[..n as usize], at) {
            packets.lock().expect("capture lock").push(p);
        }
    }
}

fn parse_frame(f: &[u8], at: SystemTime) -> Option<Pkt> {
    if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[9] != 6 || ip.len() < ihl + 20 || total > ip.len() {
        return None;
    }
    let tcp = &ip[ihl..];
    let addr =
        |a: &[u8], p: &[u8]| SocketAddrV4::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]), u16::from_be_bytes([p[0], p[1]]));
    let doff = usize::from(tcp[12] >> 4) * 4;
    Some(Pkt {
        at,
        src: addr(&ip[12..16], &tcp[0..2]),
        dst: addr(&ip[16..20], &tcp[2..4]),
        flags: tcp[13],
        payload: total.saturating_sub(ihl + doff),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn since(a: SystemTime, b: SystemTime) -> Duration {
    b.duration_since(a).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------
// The tests.

/// (a) Output commit and (b) equal tables: a backup whose apply loop is stalled holds back every
/// client segment (nothing reaches the primary's kernel, so it neither ACKs nor answers) and every
/// reply byte (the reply log waits for the ack); once it resumes everything arrives intact, and the
/// backup's table equals the primary's.
#[test]
fn stalled_backup_holds_client_segments_and_reply_bytes_then_everything_arrives_and_tables_match() -> Result<()> {
    let bed = up_bed('a')?;
    let _origin = start_origin(&bed)?;
    let (_primary_node, primary) = start_primary(&bed, Duration::from_secs(2))?;
    let (_backup_node, backup) = start_backup(&bed, "backup-b")?;
    primary.wait_peer(PeerState::Connected, PROMPT)?;
    ensure!(primary.admin.protected(), "/status must say protected once connected");

    let capture = Capture::start(&bed)?;
    let mut client = Client::connect(&bed)?;
    let mut baseline = Duration::ZERO;
    for (i, len) in [1000, 100_000, 2_000_000].into_iter().enumerate() {
        let took = client.get(len, i as u64)?;
        println!("warm-up GET of {len} bytes: {:.2} ms", ms(took));
        baseline = baseline.max(took);
    }
    tables_match(&primary, &backup)?;

    // (a1) Inbound gate: the request is sent while the backup is stalled.
    let stall = Duration::from_millis(200);
    let held = backup.table.lock().expect("backup table lock");
    let t0 = SystemTime::now();
    let sent_at = Instant::now();
    client.send_get(5000, 0, 7)?;
    std::thread::sleep(stall / 2);
    let gated = primary.status().held_segments;
    std::thread::sleep(stall / 2);
    let t1 = SystemTime::now();
    drop(held);
    client.read_response(5000, 7)?;
    let latency = sent_at.elapsed();
    let during = capture.vip_segments(client.local, t0, t1);
    let first_after = capture.vip_segments(client.local, t1, SystemTime::now()).first().map(|p| since(t1, p.at));
    println!(
        "(a1) request sent while the backup was stalled for {stall:?}: {gated} segment(s) held in the gate, \
         {} segment(s) from the VIP during the stall, first one {:?} after it, response after {:.1} ms \
         (longest warm-up: {:.1} ms)",
        during.len(),
        first_after,
        ms(latency),
        ms(baseline)
    );
    ensure!(gated > 0, "the request's segment should have been held in the gate");
    // Output commit: nothing new during the stall. The kernel may still resend bytes it sent before (a
    // tail-loss probe while the client's last ACK waits in the gate): the backup holds those already.
    let before = capture.vip_segments(client.local, SystemTime::UNIX_EPOCH, t0);
    let sent = before.iter().map(Pkt::seq_end).reduce(|a, b| if seq_after(b, a) { b } else { a });
    let acked = before.iter().map(|p| p.ack).reduce(|a, b| if seq_after(b, a) { b } else { a });
    let (sent, acked) = (sent.context("segments before the stall")?, acked.context("ACKs before the stall")?);
    let new: Vec<&Pkt> = during.iter().filter(|p| seq_after(p.seq_end(), sent) || seq_after(p.ack, acked)).collect();
    ensure!(new.is_empty(), "the VIP sent new bytes or acknowledged the held request during the stall: {new:?}");

    // (a2) Reply log: the request is in and replicated, the origin answers while the backup is stalled.
    client.send_get(300_000, 100, 8)?;
    wait_until("the request's exchange to be replicated", PROMPT, || {
        let started = primary.replicator.with_table(|t| {
            t.conns()
                .any(|c| c.tracked().is_some_and(|t| t.exchanges().iter().any(|e| e.index == 4 && e.meta.is_some())))
        });
        let s = primary.status();
        Ok((started && s.acked == Some(s.sent)).then_some(()))
    })?;
    let held = backup.table.lock().expect("backup table lock");
    let t0 = SystemTime::now();
    let stalled_at = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let t1 = SystemTime::now();
    drop(held);
    client.read_response(300_000, 8)?;
    let latency = stalled_at.elapsed();
    let during = capture.vip_segments(client.local, t0, t1);
    let data: Vec<&Pkt> = during.iter().filter(|p| p.payload > 0 || p.flags & (FIN | RST) != 0).collect();
    println!(
        "(a2) origin answered 100 ms into a 300 ms stall: {} segment(s) from the VIP during the stall \
         ({} carrying data, FIN or RST), response complete {:.1} ms after the stall began",
        during.len(),
        data.len(),
        ms(latency)
    );
    ensure!(data.is_empty(), "reply bytes reached the client before the backup held them: {data:?}");

    // (b) The tables agree: tracker state and exchanges of the connection.
    let table = tables_match(&primary, &backup)?;
    let conn = table.conns().next().context("the connection is in the table")?;
    let tracked = conn.tracked().context("the connection is protected")?;
    println!(
        "(b) tables equal: {} connection(s); tracker state {:?}, {} exchange(s) retained, {} bytes retained",
        table.len(),
        tracked.tracker().state(),
        tracked.exchanges().len(),
        table.retained_bytes()
    );
    ensure!(table.len() == 1, "one client connection expected, found {}", table.len());
    ensure!(backup.progress.borrow().synced, "the backup reports its snapshot applied");
    Ok(())
}

/// (c) A spare joining while a connection is live gets the snapshot and then the stream, and its table
/// ends equal to the primary's; a second spare is refused while the first is connected.
#[test]
fn spare_joining_a_live_connection_gets_the_snapshot_then_the_stream_and_matches_the_primary() -> Result<()> {
    let bed = up_bed('c')?;
    let _origin = start_origin(&bed)?;
    let (_primary_node, primary) = start_primary(&bed, Duration::from_secs(2))?;
    let mut client = Client::connect(&bed)?;
    for i in 0..3 {
        client.get(50_000 + i * 1000, i as u64)?;
    }
    let status = primary.status();
    ensure!(status.peer == PeerState::None && status.committed == status.sent, "alone, nothing waits: {status:?}");
    ensure!(primary.table().len() == 1, "the primary keeps its table without a backup");

    let joined = Instant::now();
    let (_backup_node, backup) = start_backup(&bed, "backup-b")?;
    let connected = primary.wait_peer(PeerState::Connected, PROMPT)?;
    println!("spare joined with one live connection: connected after {:.1} ms", ms(connected - joined));
    let table = tables_match(&primary, &backup)?;
    ensure!(table.len() == 1, "the snapshot carries the live connection");

    let refused = in_ns(&bed.ns("spare"), || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let identity = backup_identity("backup-c2");
        Ok(rt.block_on(replica::join(REPL.into(), &identity, &ReplicaConfig::new(LinkConfig::default()))))
    })?;
    match refused {
        Err(replica::JoinError::Handshake {
            source: HandshakeError::Welcome(WelcomeError::Refused { reason }),
            ..
        }) => {
            println!("second spare refused: {reason}");
            ensure!(reason.contains("already connected"), "the reason should say why: {reason}");
        }
        Err(e) => bail!("the second spare failed for another reason: {e}"),
        Ok(_) => bail!("a second spare was accepted while one is connected"),
    }
    ensure!(primary.status().peer == PeerState::Connected, "the refusal leaves the first backup connected");

    for i in 3..6 {
        client.get(20_000 + i * 1000, i as u64)?;
    }
    let mut second = Client::connect(&bed)?;
    for i in 0..2 {
        second.get(10_000, 100 + i)?;
    }
    let table = tables_match(&primary, &backup)?;
    println!(
        "after the stream: tables equal with {} connection(s), backup applied {} record(s)",
        table.len(),
        backup.progress.borrow().records
    );
    ensure!(table.len() == 2, "both connections are replicated, found {}", table.len());
    Ok(())
}

/// When each request started and how long it took.
type Timings = Vec<(Instant, Duration)>;

/// Requests in a loop on one keep-alive connection, on its own thread, timing each.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Timings>>>,
}

impl Load {
    fn start(bed: &Testbed) -> Result<Load> {
        let mut client = Client::connect(bed)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut done = Vec::new();
            let mut seed = 0;
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let took = client.get(20_000, seed).with_context(|| format!("request {seed}"))?;
                done.push((at, took));
                seed += 1;
            }
            Ok(done)
        });
        Ok(Load { stop, thread: Some(thread) })
    }

    fn finish(mut self) -> Result<Timings> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().context("finished twice")?;
        t.join().map_err(|_| anyhow!("the load thread panicked"))?
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The longest request under way at some time in `[from, to]`: the client's stall around a loss.
fn longest(done: &[(Instant, Duration)], from: Instant, to: Instant) -> Duration {
    done.iter().filter(|(s, d)| *s <= to && *s + *d >= from).map(|(_, d)| *d).max().unwrap_or_default()
}

/// (d) Backup loss: the primary releases what it held and keeps serving, first when the backup's
/// link closes (its process ended), then, with a new backup joined, when the replication network is
/// cut silently (the lease runs out). The client sees no error.
#[test]
fn backup_loss_releases_what_is_held_and_serving_continues_unprotected() -> Result<()> {
    let bed = up_bed('d')?;
    let _origin = start_origin(&bed)?;
    let lease = Duration::from_millis(150);
    let (_primary_node, primary) = start_primary(&bed, lease)?;
    let (mut backup_node, _backup) = start_backup(&bed, "backup-b")?;
    primary.wait_peer(PeerState::Connected, PROMPT)?;

    let load = Load::start(&bed)?;
    std::thread::sleep(Duration::from_millis(300));
    let ended = Instant::now();
    backup_node.finish()?;
    let unprotected = primary.wait_peer(PeerState::None, PROMPT)?;
    std::thread::sleep(Duration::from_millis(300));

    let (_backup_node2, _backup2) = start_backup(&bed, "backup-d")?;
    primary.wait_peer(PeerState::Connected, PROMPT)?;
    std::thread::sleep(Duration::from_millis(300));
    let cut = Instant::now();
    run(Command::new("ip").args(["-n", &bed.ns("spare"), "link", "set", "eth1", "down"]))?;
    let given_up = primary.wait_peer(PeerState::None, PROMPT)?;
    std::thread::sleep(Duration::from_millis(300));
    let done = load.finish()?;

    let status = primary.status();
    let typical = {
        let mut all: Vec<Duration> = done.iter().map(|(_, d)| *d).collect();
        all.sort();
        all.get(all.len() / 2).copied().unwrap_or_default()
    };
    println!(
        "backup process ended: unprotected after {:.1} ms, longest request meanwhile {:.1} ms",
        ms(unprotected - ended),
        ms(longest(&done, ended, unprotected))
    );
    println!(
        "replication network cut silently (lease {lease:?}): unprotected after {:.1} ms, longest request \
         meanwhile {:.1} ms (the time until serving resumed); {} requests in all, median {:.2} ms, no client error",
        ms(given_up - cut),
        ms(longest(&done, cut, given_up)),
        done.len(),
        ms(typical)
    );
    ensure!(status.suspected.is_none() && status.stepped_down.is_none(), "serving unprotected: {status:?}");
    ensure!(!primary.admin.protected(), "/status must say unprotected");
    let held = wait_until("held segments to drain", PROMPT, || {
        let s = primary.status();
        Ok((s.held_segments == 0).then_some(s))
    })?;
    ensure!(held.committed == held.sent, "everything is released without a backup: {held:?}");
    Ok(())
}

/// A node that has seen a later epoch tries to join: it is refused, this primary steps down at once,
/// and from then on no reply byte is committed; after a shutdown appends fail as stopped. (Loopback
/// only, no gate: runs without root.)
#[tokio::test]
async fn joiner_from_a_later_epoch_makes_the_primary_step_down_and_refuse_reply_bytes() -> Result<()> {
    use primary::proxy::{ConnectionHooks, ReplyLog};
    use primary::replicate::ReplyRefused;
    use shared::lease::StepDownReason;

    let (replicator, task, joins, addr) = loopback_replicator().await?;
    let (log, _observer) = replicator.hooks().open("10.0.0.1:40000".parse()?, "10.0.0.100:80".parse()?);
    tokio::time::timeout(PROMPT, log.append(0, bytes::Bytes::from_static(b"alone")))
        .await
        .context("an append without a backup resolves at once")??;

    let ahead = LocalIdentity::new(CLUSTER, "backup-x", Role::Backup, 5);
    let refused = replica::join(addr, &ahead, &ReplicaConfig::new(LinkConfig::default())).await;
    match refused {
        Err(replica::JoinError::Handshake {
            source: HandshakeError::Welcome(WelcomeError::Refused { reason }),
            ..
        }) => {
            println!("joiner at a later epoch refused: {reason}");
        }
        Err(e) => bail!("refused for another reason: {e}"),
        Ok(_) => bail!("a joiner from a later epoch was accepted"),
    }
    let mut status = replicator.status();
    let stepped = tokio::time::timeout(PROMPT, status.wait_for(|s| s.stepped_down.is_some())).await??.clone();
    ensure!(stepped.stepped_down == Some(StepDownReason::HigherEpoch { ours: 1, seen: 5 }), "{stepped:?}");
    let after = tokio::time::timeout(PROMPT, log.append(5, bytes::Bytes::from_static(b"never"))).await?;
    ensure!(after == Err(ReplyRefused::SteppedDown), "after stepping down: {after:?}");

    replicator.shutdown().await;
    task.await?;
    joins.abort();
    let stopped = tokio::time::timeout(PROMPT, log.append(10, bytes::Bytes::from_static(b"late"))).await?;
    ensure!(stopped == Err(ReplyRefused::Stopped), "after shutdown: {stopped:?}");
    Ok(())
}

/// The planned switchover's protocol over a real link (loopback, no gate: runs without root). A backup
/// that speaks only protocol 2 is refused with the reason and nothing changes; one at protocol 3 gets the
/// handover record after everything else, answers that it is taking over, and the primary learns where
/// to rejoin it (the backup's unspecified listen address read as the address its link came from).
#[tokio::test]
async fn handover_is_refused_to_an_old_backup_and_confirmed_by_a_current_one() -> Result<()> {
    use primary::proxy::{ConnectionHooks, ReplyLog};
    use primary::replicate::HandoverError;

    let (replicator, task, joins, addr) = loopback_replicator().await?;
    let refused = tokio::time::timeout(PROMPT, replicator.freeze_for_handover()).await?;
    ensure!(refused == Err(HandoverError::NoBackup), "without a backup: {refused:?}");

    // A backup that speaks protocol 2 only: linked and protecting, but it cannot take a handover.
    let mut old = backup_identity("backup-old");
    (old.min_version, old.version) = (2, 2);
    let replica_config = ReplicaConfig::new(LinkConfig::default());
    let old_replica = replica::join(addr, &old, &replica_config).await?;
    replicator_peer(&replicator, PeerState::Connected).await?;
    let refused = tokio::time::timeout(PROMPT, replicator.freeze_for_handover()).await?;
    match &refused {
        Err(e @ HandoverError::OldBackup { version: 2, needs: 3, .. }) => {
            ensure!(e.refused() && e.to_string().contains("upgrade the backup first"), "{e}");
        }
        other => bail!("an old backup: {other:?}"),
    }
    let (log, _observer) = replicator.hooks().open("10.0.0.1:40000".parse()?, "10.0.0.100:80".parse()?);
    tokio::time::timeout(PROMPT, log.append(0, bytes::Bytes::from_static(b"still served")))
        .await
        .context("after a refused switchover, reply bytes are committed as before")??;
    old_replica.stop().await;
    replicator_peer(&replicator, PeerState::None).await?;

    // A current backup listening on an unspecified address.
    let current_config =
        ReplicaConfig { repl_listen: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7799), ..replica_config.clone() };
    let current = replica::join(addr, &backup_identity("backup-new"), &current_config).await?;
    replicator_peer(&replicator, PeerState::Connected).await?;
    tokio::time::timeout(PROMPT, replicator.freeze_for_handover()).await??;
    // Frozen: nothing more is committed.
    let held =
        tokio::time::timeout(Duration::from_millis(300), log.append(12, bytes::Bytes::from_static(b"held"))).await;
    ensure!(held.is_err(), "a reply byte was committed after the freeze: {held:?}");
    let again = tokio::time::timeout(PROMPT, replicator.freeze_for_handover()).await?;
    ensure!(again == Err(HandoverError::InProgress), "a second switchover: {again:?}");
    let rejoin = tokio::time::timeout(PROMPT, replicator.hand_over()).await??;
    ensure!(rejoin == SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7799), "rejoin at {rejoin}");
    let progress = current.progress().borrow().clone();
    ensure!(progress.handover && progress.synced, "the backup's replica: {progress:?}");
    current.stop().await;
    replicator.shutdown().await;
    task.await?;
    joins.abort();
    Ok(())
}

/// A primary's replication sender at epoch 1 with no gate, accepting joins on a loopback port: the
/// sender, its task, the join acceptor and the port's address.
async fn loopback_replicator()
-> Result<(Replicator, tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>, SocketAddr)> {
    let admin = AdminState::new("primary-a", CLUSTER, Role::Primary, 1, Instant::now());
    let identity = LocalIdentity::new(CLUSTER, "primary-a", Role::Primary, 1);
    let config = SenderConfig::new(identity, LinkConfig::default(), Duration::from_secs(1));
    let (replicator, task) = Replicator::start(config, ReplicaTable::new(), None, admin, Arc::new(NoVipCheck))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let joins = replicator.serve_joins(listener);
    Ok((replicator, task, joins, addr))
}

/// Waits until the sender reports `peer`.
async fn replicator_peer(replicator: &Replicator, peer: PeerState) -> Result<()> {
    let mut status = replicator.status();
    tokio::time::timeout(PROMPT, status.wait_for(|s| s.peer == peer))
        .await
        .with_context(|| format!("the sender never reported peer {}", peer.as_str()))??;
    Ok(())
}
