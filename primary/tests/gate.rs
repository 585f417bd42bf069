//! Kernel tests of the gate (ARCHITECTURE.md, "Inbound gate" and "Outbound control"): real NFQUEUE,
//! real iptables, real TCP. Each test builds its own two namespaces joined by a veth pair, a client
//! (10.99.0.1) and a server holding the VIP (10.99.0.100) with a listener on VIP:8080 and the gate, and
//! removes them on every exit path. Offloads stay at their defaults (TSO/GSO and checksum offload on),
//! as on a real host. Root only.
//!
//! The test process itself stays in the root namespace; work inside a namespace runs on a thread that
//! entered it (a socket keeps the namespace it was created in, whichever thread uses it later).

mod support;

use anyhow::{Context, Result, bail, ensure};
use primary::gate::nfqueue::QueueError;
use primary::gate::rules::Iptables;
use primary::gate::{Checksum, Diverted, Gate, GateConfig, GateError, Hook, KernelQueueStats};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};
use tcp_replay::segment::SegmentBuilder;
use tcp_replay::{Checksums, Segment, Seq, TcpFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc::Receiver;
use tokio::time::{sleep, timeout};

use support::{base36, in_ns, run};
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const PORT: u16 = 8080;
/// How long a test holds a segment before releasing it.
const HOLD: Duration = Duration::from_millis(100);
/// Upper bound for anything that should happen promptly.
const PROMPT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------------
// Namespaces, threads inside them, sockets created there.

/// A client and a server namespace joined by a veth pair; `Drop` deletes both.
struct Net {
    client: String,
    server: String,
}

impl Net {
    fn up(test: char) -> Result<Net> {
        // SAFETY: geteuid has no preconditions.
        ensure!(unsafe { libc::geteuid() } == 0, "the gate tests need root (namespaces, iptables, NFQUEUE)");
        let id = format!("ug{}{test}", base36(std::process::id()));
        let net = Net { client: format!("{id}c"), server: format!("{id}s") };
        for ns in [&net.client, &net.server] {
            run(Command::new("ip").args(["netns", "add", ns]))?;
        }
        let (c, s) = (net.client.as_str(), net.server.as_str());
        run(Command::new("ip")
            .args(["-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", s]))?;
        for (ns, addr) in [(c, format!("{CLIENT}/24")), (s, format!("{VIP}/24"))] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", &addr, "dev", "eth0"]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", "eth0", "up"]))?;
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            if let Err(e) = run(Command::new("ip").args(["netns", "del", ns])) {
                eprintln!("removing namespace {ns}: {e:#}");
            }
        }
    }
}

/// Runs the future made by `make` on a current-thread runtime, on a thread inside namespace `ns`.
fn run_in_ns<T: Send + 'static, F: Future<Output = Result<T>>>(
    ns: &str,
    make: impl FnOnce() -> F + Send + 'static,
) -> Result<T> {
    in_ns(ns, move || {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(make())
    })
}

/// A TCP socket of the client namespace, ready to connect from any thread.
fn client_socket(client_ns: &str) -> Result<TcpSocket> {
    let std = in_ns(client_ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        Ok(std::net::TcpStream::from(s))
    })?;
    Ok(TcpSocket::from_std_stream(std))
}

fn vip_addr() -> SocketAddr {
    SocketAddr::from((VIP, PORT))
}

fn config(instance: &str) -> GateConfig {
    GateConfig::new(VIP, PORT, instance)
}

// ---------------------------------------------------------------------------------------------------
// Observing the kernel.

/// A counter of the `Tcp:` lines of /proc/net/snmp in the calling thread's namespace.
fn tcp_mib(name: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().context("no Tcp header")?, tcp.next().context("no Tcp values")?);
    let i = names.split_whitespace().position(|n| n == name).with_context(|| format!("no Tcp {name}"))?;
    values.split_whitespace().nth(i).context("short Tcp line")?.parse().context("Tcp counter")
}

fn tcp_info(s: &impl AsRawFd) -> Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let r =
        unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    ensure!(r == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    Ok(info)
}

/// Polls `probe` until it yields a value; fails with `what` after `limit`.
async fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        sleep(Duration::from_millis(5)).await;
    }
}

async fn next(rx: &mut Receiver<Diverted>) -> Result<Diverted> {
    match timeout(PROMPT, rx.recv()).await {
        Ok(Some(d)) => Ok(d),
        Ok(None) => bail!("the gate's channel closed"),
        Err(_) => bail!("no diverted segment within {PROMPT:?}"),
    }
}

fn seg(d: &Diverted) -> Result<Segment<'_>> {
    let check = if d.checksum == Checksum::Partial { Checksums::Skip } else { Checksums::Verify };
    Segment::parse_ipv4(&d.datagram, check).with_context(|| format!("diverted id {} does not parse", d.id))
}

fn flags(d: &Diverted) -> String {
    seg(d).map(|s| format!("{:?}", s.flags)).unwrap_or_else(|e| format!("{e}"))
}

/// Releases everything diverted, one batch verdict per wake-up, recording what passed.
fn autopilot(
    gate: Arc<Gate>,
    mut rx: Receiver<Diverted>,
    log: Arc<Mutex<Vec<Diverted>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(d) = rx.try_recv() {
                batch.push(d);
            }
            let last = batch.last().map(|d| (d.queue, d.id)).expect("batch has one");
            log.lock().expect("log lock").extend(batch);
            if let Err(e) = gate.release_upto(last.0, last.1) {
                panic!("release failed: {e}");
            }
        }
    })
}

/// Releases segments one at a time until `connect` has completed and `listener` has accepted the
/// connection; returns both ends and what passed.
async fn finish_handshake(
    gate: &Gate,
    rx: &mut Receiver<Diverted>,
    listener: &TcpListener,
    mut connect: tokio::task::JoinHandle<std::io::Result<TcpStream>>,
) -> Result<(TcpStream, TcpStream, Vec<Diverted>)> {
    let mut seen = Vec::new();
    let (mut client, mut server) = (None, None);
    let deadline = tokio::time::Instant::now() + PROMPT;
    while client.is_none() || server.is_none() {
        tokio::select! {
            r = &mut connect, if client.is_none() => client = Some(r??),
            r = listener.accept(), if server.is_none() => server = Some(r?.0),
            d = rx.recv() => {
                let d = d.context("the gate's channel closed")?;
                gate.release_upto(d.queue, d.id)?;
                seen.push(d);
            }
            _ = tokio::time::sleep_until(deadline) => bail!("no connection within {PROMPT:?}"),
        }
    }
    Ok((client.context("client")?, server.context("server")?, seen))
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------------
// (a) Inbound: held segments reach the listener only after release.

#[test]
fn held_syn_and_data_reach_the_listener_only_after_release() -> Result<()> {
    let net = Net::up('a')?;
    let client_ns = net.client.clone();
    run_in_ns(&net.server, move || async move {
        let listener = TcpListener::bind(vip_addr()).await?;
        let (gate, mut rx) = Gate::start(config("ta"))?;
        let gate = Arc::new(gate);
        let in_segs = tcp_mib("InSegs")?;

        let t0 = Instant::now();
        let connect = tokio::spawn(client_socket(&client_ns)?.connect(vip_addr()));
        let syn = next(&mut rx).await?;
        let s = seg(&syn)?;
        ensure!(s.flags.syn() && !s.flags.ack() && syn.hook == Hook::PreRouting, "first diverted: {}", flags(&syn));
        ensure!(s.dst == SocketAddrV4::new(VIP, PORT));
        sleep(HOLD).await;
        ensure!(!connect.is_finished(), "connect completed while its SYN was held");
        ensure!(tcp_mib("InSegs")? == in_segs, "a segment reached the server's TCP while the SYN was held");
        gate.release_upto(syn.queue, syn.id)?;

        let synack = next(&mut rx).await?;
        let s = seg(&synack)?;
        ensure!(
            s.flags.syn() && s.flags.ack() && synack.hook == Hook::LocalOut,
            "expected the SYN-ACK: {}",
            flags(&synack)
        );
        gate.release_upto(synack.queue, synack.id)?;
        let (mut client, mut server, rest) = finish_handshake(&gate, &mut rx, &listener, connect).await?;
        let connect_time = t0.elapsed();
        ensure!(
            rest.iter().all(|d| d.hook == Hook::PreRouting),
            "unexpected: {:?}",
            rest.iter().map(flags).collect::<Vec<_>>()
        );
        println!("connect() took {connect_time:?} with the SYN held for {HOLD:?} (ids {} then {})", syn.id, synack.id);

        // Data: the first segment is held; nothing may reach the application until it is released.
        let data = pattern(256 * 1024);
        let sent = data.clone();
        let t_write = Instant::now();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(16 * 1024) {
                client.write_all(chunk).await?;
            }
            Ok::<_, std::io::Error>(client)
        });
        let first = loop {
            let d = next(&mut rx).await?;
            if !seg(&d)?.payload.is_empty() {
                break d;
            }
            gate.release_upto(d.queue, d.id)?; // a pure ACK before the data
        };
        sleep(HOLD).await;
        let mut buf = vec![0u8; data.len()];
        match server.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => bail!("the server read {other:?} while the first data segment was held"),
        }
        let log = Arc::new(Mutex::new(vec![first.clone()]));
        gate.release_upto(first.queue, first.id)?;
        let released = Instant::now();
        let pilot = autopilot(gate.clone(), rx, log.clone());
        let n = timeout(PROMPT, server.read(&mut buf[..1])).await??;
        let arrived = Instant::now();
        timeout(PROMPT, server.read_exact(&mut buf[n..])).await??;
        ensure!(buf == data, "the bytes arrived changed or out of order");
        let _client = writer.await??;
        pilot.abort();
        let segments = log.lock().unwrap().iter().filter(|d| d.hook == Hook::PreRouting).count();
        println!(
            "first data byte reached the listener {:?} after write(), {:?} after its release; \
             {} KiB arrived intact in {segments} diverted segments, {:?} in all",
            arrived.duration_since(t_write),
            arrived.duration_since(released),
            data.len() / 1024,
            t_write.elapsed()
        );
        let stats = gate.stats();
        println!("gate stats: {stats:?}");
        ensure!(stats.enobufs == 0 && stats.malformed == 0 && stats.verdict_errors == 0, "{stats:?}");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------
// (c) Outbound control: SYN-ACK, FIN and RST wait for release; plain data does not.

#[test]
fn server_synack_fin_and_rst_wait_for_release_but_its_data_does_not() -> Result<()> {
    let net = Net::up('c')?;
    let client_ns = net.client.clone();
    run_in_ns(&net.server, move || async move {
        let listener = TcpListener::bind(vip_addr()).await?;
        let (gate, mut rx) = Gate::start(config("tc"))?;

        // SYN-ACK.
        let connect = tokio::spawn(client_socket(&client_ns)?.connect(vip_addr()));
        let syn = next(&mut rx).await?;
        gate.release_upto(syn.queue, syn.id)?;
        let synack = next(&mut rx).await?;
        let s = seg(&synack)?;
        ensure!(
            synack.hook == Hook::LocalOut && s.flags.syn() && s.flags.ack(),
            "expected SYN-ACK: {}",
            flags(&synack)
        );
        ensure!(s.src == SocketAddrV4::new(VIP, PORT));
        sleep(HOLD).await;
        ensure!(!connect.is_finished(), "the client completed its handshake while the SYN-ACK was held");
        gate.release_upto(synack.queue, synack.id)?;
        let (mut client, mut server, _) = finish_handshake(&gate, &mut rx, &listener, connect).await?;
        println!("SYN-ACK (id {}) held {HOLD:?} on OUTPUT; options {:?}", synack.id, s.options);

        // Plain data from the server reaches the client with no release at all.
        let data = pattern(8 * 1024);
        server.write_all(&data).await?;
        let mut got = vec![0u8; data.len()];
        timeout(PROMPT, client.read_exact(&mut got)).await??;
        ensure!(got == data);
        let mut inbound = Vec::new();
        while let Ok(Some(d)) = timeout(HOLD, rx.recv()).await {
            inbound.push(d);
        }
        for d in &inbound {
            let s = seg(d)?;
            ensure!(d.hook == Hook::PreRouting && s.dst.port() == PORT, "server data was diverted: {}", flags(d));
        }
        if let Some(last) = inbound.last() {
            gate.release_upto(last.queue, last.id)?;
        }
        println!(
            "8 KiB of server data arrived with nothing released; {} client ACKs were diverted meanwhile",
            inbound.len()
        );

        // FIN.
        server.shutdown().await?;
        let fin = next(&mut rx).await?;
        ensure!(fin.hook == Hook::LocalOut && seg(&fin)?.flags.fin(), "expected the FIN: {}", flags(&fin));
        let mut b = [0u8; 16];
        ensure!(timeout(HOLD, client.read(&mut b)).await.is_err(), "the client saw the FIN while it was held");
        gate.release_upto(fin.queue, fin.id)?;
        let n = timeout(PROMPT, client.read(&mut b)).await??;
        ensure!(n == 0, "expected EOF after the FIN's release, read {n} bytes");
        println!("FIN (id {}) held {HOLD:?}, then the client read EOF", fin.id);
        let ack = next(&mut rx).await?; // the client's ACK of the FIN
        gate.release_upto(ack.queue, ack.id)?;

        // RST: an abortive close (SO_LINGER 0).
        let connect = tokio::spawn(client_socket(&client_ns)?.connect(vip_addr()));
        let (mut client2, server2, _) = finish_handshake(&gate, &mut rx, &listener, connect).await?;
        socket2::SockRef::from(&server2).set_linger(Some(Duration::ZERO))?;
        drop(server2);
        let rst = next(&mut rx).await?;
        ensure!(rst.hook == Hook::LocalOut && seg(&rst)?.flags.rst(), "expected the RST: {}", flags(&rst));
        ensure!(timeout(HOLD, client2.read(&mut b)).await.is_err(), "the client saw the RST while it was held");
        gate.release_upto(rst.queue, rst.id)?;
        match timeout(PROMPT, client2.read(&mut b)).await? {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => bail!("expected a reset after the RST's release, got {other:?}"),
        }
        println!("RST (id {}) held {HOLD:?}, then the client saw ECONNRESET", rst.id);
        drop(client);
        Ok(())
    })
}

/// A segment the gate held while the output lease lapsed does not leave when it is released: the lease
/// is checked as segments leave, not as they enter the gate's queue. (A primary frozen just after its
/// kernel queued a FIN or an orphan's ACK must not send it on `SIGCONT`, after the backup took over.)
#[test]
fn a_held_segment_released_after_the_output_lease_lapsed_never_leaves() -> Result<()> {
    let net = Net::up('l')?;
    let client_ns = net.client.clone();
    run_in_ns(&net.server, move || async move {
        let listener = TcpListener::bind(vip_addr()).await?;
        let mut cfg = config("tl");
        cfg.output_lease = Some(Duration::from_millis(100));
        let (gate, mut rx) = Gate::start(cfg)?;
        let connect = tokio::spawn(client_socket(&client_ns)?.connect(vip_addr()));
        let (mut client, mut server, _) = finish_handshake(&gate, &mut rx, &listener, connect).await?;

        server.shutdown().await?;
        let fin = next(&mut rx).await?;
        ensure!(fin.hook == Hook::LocalOut && seg(&fin)?.flags.fin(), "expected the FIN: {}", flags(&fin));
        gate.revoke_output()?;
        // `nft -i` applies the revocation on its own time: wait until the kernel's set is empty.
        wait_for("the lease's element to go", PROMPT, || {
            let set = run(Command::new("nft").args(["list", "set", "inet", "understudy_tl", "lease"]))?;
            Ok((!set.contains("elements")).then_some(()))
        })
        .await?;
        gate.release_upto(fin.queue, fin.id)?;
        // The FIN's retransmissions come through the gate too: released as they come, dropped by the lease.
        let gate = Arc::new(gate);
        let released = autopilot(gate.clone(), rx, Arc::new(Mutex::new(Vec::new())));
        let mut b = [0u8; 16];
        ensure!(
            timeout(Duration::from_millis(500), client.read(&mut b)).await.is_err(),
            "the client saw the FIN released after the lease was revoked"
        );
        gate.grant_output_now(Instant::now() + PROMPT)?;
        let n = timeout(PROMPT, client.read(&mut b)).await??;
        ensure!(n == 0, "expected EOF once the lease was granted again, read {n} bytes");
        println!("FIN released with the lease revoked: not seen in 500 ms; its retransmission passed once granted");
        released.abort();
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------
// (b) Fail-closed: with the gate process gone, segments are dropped, never accepted; (e, part) the next
// start removes the crashed run's rules and traffic resumes.

const CHILD_ENV: &str = "UNDERSTUDY_GATE_TEST_CHILD";
const CHILD_READY: &str = "gate-child: ready";
const CHILD_HELD: &str = "gate-child: holding";

/// The gate process of the fail-closed test: passes segments until the first one carrying data,
/// then holds everything (reports it, never answers).
fn child_gate(instance: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let (gate, mut rx) = Gate::start(config(instance))?;
        println!("{CHILD_READY}");
        let mut holding = false;
        while let Some(d) = rx.recv().await {
            if !holding && seg(&d)?.payload.is_empty() {
                gate.release_upto(d.queue, d.id)?;
            } else if !holding {
                holding = true;
                println!("{CHILD_HELD} {}", d.id);
            }
        }
        bail!("the gate's channel closed")
    })
}

/// A process started by a test; `Drop` kills it by PID and reaps it.
struct ChildProc(Option<Child>);

impl ChildProc {
    /// Runs this test binary's test `name` alone in namespace `ns`, with `env=value` set, and collects
    /// its standard output lines.
    fn spawn(ns: &str, name: &str, env: &str, value: &str) -> Result<(ChildProc, std_mpsc::Receiver<String>)> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(&exe).args([name, "--exact", "--nocapture", "--test-threads=1"]);
        cmd.env(env, value).stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = ChildProc(Some(cmd.spawn().with_context(|| format!("starting {name} in {ns}"))?));
        let stdout = child.0.as_mut().and_then(|c| c.stdout.take()).context("child stdout")?;
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ok((child, lines))
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.0.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

/// The child's next output line containing `prefix`, from `prefix` on (libtest's "test NAME ... " may
/// share the line).
fn wait_line(lines: &std_mpsc::Receiver<String>, prefix: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(prefix) => return Ok(l[l.find(prefix).unwrap_or(0)..].to_string()),
            Ok(_) => continue,
            Err(e) => bail!("child process: no {prefix:?} line: {e}"),
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[test]
fn with_the_gate_process_gone_segments_are_dropped_never_accepted() -> Result<()> {
    const NAME: &str = "with_the_gate_process_gone_segments_are_dropped_never_accepted";
    if let Ok(instance) = std::env::var(CHILD_ENV) {
        return child_gate(&instance);
    }
    let net = Net::up('b')?;
    let client_ns = net.client.clone();
    let server_ns = net.server.clone();
    run_in_ns(&net.server, move || async move {
        let instance = "tb";
        let listener = TcpListener::bind(vip_addr()).await?;
        let (mut child, lines) = ChildProc::spawn(&server_ns, NAME, CHILD_ENV, instance)?;
        wait_line(&lines, CHILD_READY)?;
        let ipt = Iptables::here(Path::new("iptables"))?;
        let tag = format!("understudy:{instance}");

        // Through the live gate process: a connection opens.
        let connect = client_socket(&client_ns)?.connect(vip_addr());
        let mut client = timeout(PROMPT, connect).await.context("connect through the gate process")??;
        let (mut server, _) = timeout(PROMPT, listener.accept()).await??;

        // Data is queued in the gate process, which then dies with it.
        client.write_all(b"bytes held by a gate that dies").await?;
        let held = wait_line(&lines, CHILD_HELD)?;
        let in_segs = tcp_mib("InSegs")?;
        let killed = Instant::now();
        child.kill()?;
        wait_for("the queue instance to go", PROMPT, || Ok(KernelQueueStats::read_here(0)?.is_none().then_some(())))
            .await?;
        ensure!(ipt.count_tagged(&tag)? == 5, "a killed process leaves its rules behind");

        // Nothing gets through: neither the held segment nor the client's retransmissions, nor a new SYN.
        let connect2 = tokio::spawn(client_socket(&client_ns)?.connect(vip_addr()));
        let retrans = wait_for("two client retransmissions", Duration::from_secs(10), || {
            let i = tcp_info(&client)?;
            Ok((i.tcpi_total_retrans >= 2).then_some(i.tcpi_total_retrans))
        })
        .await?;
        let info = tcp_info(&client)?;
        let mut buf = [0u8; 64];
        ensure!(
            matches!(server.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the server received data after the gate died"
        );
        ensure!(tcp_mib("InSegs")? == in_segs, "a segment reached the server's TCP with no gate");
        ensure!(info.tcpi_unacked > 0, "the server acknowledged data it never saw");
        ensure!(!connect2.is_finished(), "a new connection opened with no gate");
        println!(
            "gate process killed while holding ({held}); in the {:?} since, {retrans} client retransmissions \
             and a new SYN: 0 segments reached the server's TCP, {} segments unacknowledged",
            killed.elapsed(),
            info.tcpi_unacked
        );

        // A new run of the same instance removes the stale rules, and the connection resumes.
        let (gate, rx) = Gate::start(config(instance))?;
        ensure!(ipt.count_tagged(&tag)? == 5, "stale rules were not replaced: {}", ipt.count_tagged(&tag)?);
        let started = Instant::now();
        let pilot = autopilot(Arc::new(gate), rx, Arc::new(Mutex::new(Vec::new())));
        let n = timeout(Duration::from_secs(15), server.read(&mut buf)).await??;
        ensure!(&buf[..n] == b"bytes held by a gate that dies", "got {:?}", &buf[..n]);
        println!("after the restart the client's retransmission arrived in {:?}", started.elapsed());
        timeout(Duration::from_secs(15), connect2).await???;
        println!("and the new connection opened {:?} after the restart", started.elapsed());
        pilot.abort();
        let _ = pilot.await;
        ensure!(ipt.count_tagged(&tag)? == 0, "rules left after the gate was dropped");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------
// (f) Orphans: what TCP still sends for a closed socket passes a live gate, and never a dead one.

const ORPHAN_CHILD_ENV: &str = "UNDERSTUDY_GATE_TEST_ORPHAN_CHILD";
const ORPHAN_CHILD_WRITING: &str = "orphan-child: writing";

/// The packet counters of the rules in `table`/`chain` of namespace `ns`, in rule order.
fn rule_packets(ns: &str, table: &str, chain: &str) -> Result<Vec<u64>> {
    let out =
        run(Command::new("ip")
            .args(["netns", "exec", ns, "iptables", "-w", "-t", table, "-L", chain, "-n", "-v", "-x"]))?;
    // "Chain X (policy ...)", the column header, then the rules.
    let counter = |l: &str| l.split_whitespace().next().context("empty rule line")?.parse().context("packet counter");
    out.lines().skip(2).map(counter).collect()
}

/// The server process of the kill test: a gate that passes everything (orphans too when the spec ends
/// in `:orphans`), a listener, and one connection on which it writes 256 KiB once the client said "go".
fn orphan_child(spec: &str) -> Result<()> {
    let (instance, mode) = spec.split_once(':').context("spec is INSTANCE:MODE")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(vip_addr()).await?;
        let mut cfg = config(instance);
        if mode != "orphans" {
            cfg.orphan_queue = None;
        }
        let (gate, rx) = Gate::start(cfg)?;
        let pilot = autopilot(Arc::new(gate), rx, Arc::new(Mutex::new(Vec::new())));
        println!("{CHILD_READY}");
        let (mut conn, _) = listener.accept().await?;
        let mut go = [0u8; 2];
        conn.read_exact(&mut go).await?;
        println!("{ORPHAN_CHILD_WRITING}");
        // The client acknowledges nothing from here on: this never completes.
        conn.write_all(&pattern(256 * 1024)).await?;
        pilot.await?;
        bail!("the gate's pilot ended")
    })
}

/// What the server's kernel sent for a killed process's connection, and what of it reached the client.
#[derive(Debug)]
struct AfterKill {
    /// Segments from VIP:PORT the server's TCP emitted after the kill (raw OUTPUT, before the gate).
    emitted: u64,
    /// Of those, segments that arrived at the client.
    reached: u64,
    waited: Duration,
}

/// Starts `orphan_child` in a fresh test bed, lets its connection get data in flight that the client
/// never acknowledges (the client drops every segment from VIP:PORT, counting them), SIGKILLs it, and
/// counts for as long as it takes the server's kernel to emit at least two more segments.
fn kill_with_data_in_flight(test: char, name: &str, orphans: bool) -> Result<AfterKill> {
    let net = Net::up(test)?;
    let (client_ns, server_ns) = (net.client.clone(), net.server.clone());
    let from_vip: Vec<String> =
        ["-p", "tcp", "-s", &format!("{VIP}/32"), "--sport", &PORT.to_string()].map(String::from).to_vec();
    let iptables = |ns: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "iptables", "-w"]);
        c
    };
    // Counts what TCP emits from VIP:PORT, before the gate's mangle rules see it.
    run(iptables(&server_ns).args(["-t", "raw", "-I", "OUTPUT"]).args(&from_vip))?;
    let mode = if orphans { "orphans" } else { "none" };
    let (mut child, lines) = ChildProc::spawn(&server_ns, name, ORPHAN_CHILD_ENV, &format!("tk{test}:{mode}"))?;
    wait_line(&lines, CHILD_READY)?;
    let mut client = run_in_ns(&client_ns, {
        let client_ns = client_ns.clone();
        move || async move { Ok(timeout(PROMPT, client_socket(&client_ns)?.connect(vip_addr())).await??.into_std()?) }
    })?;
    // From now on the client sees nothing from VIP:PORT (each segment counted) and ACKs nothing.
    // Rule 1 counts the segments that carry data, rule 2 the others.
    for data in [&["-m", "length", "--length", "100:65535"][..], &[]] {
        run(iptables(&client_ns).args(["-A", "INPUT"]).args(&from_vip).args(data).args(["-j", "DROP"]))?;
    }
    let at_client = || -> Result<(u64, u64)> {
        let c = rule_packets(&client_ns, "filter", "INPUT")?;
        ensure!(c.len() == 2, "expected the client's 2 rules: {c:?}");
        Ok((c[0], c[0] + c[1]))
    };
    let emitted_here =
        || -> Result<u64> { rule_packets(&server_ns, "raw", "OUTPUT")?.first().copied().context("no raw rule") };
    std::io::Write::write_all(&mut client, b"go")?;
    wait_line(&lines, ORPHAN_CHILD_WRITING)?;
    let deadline = Instant::now() + PROMPT;
    while at_client()?.0 == 0 {
        ensure!(Instant::now() < deadline, "no server data reached the client within {PROMPT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = Instant::now();
    child.kill()?;
    let (emitted0, reached0) = (emitted_here()?, at_client()?.1);
    // Each retransmission comes at least 200 ms after the one before, long after a veth delivered that
    // one: the client's count covers every segment but the last.
    let deadline = Instant::now() + Duration::from_secs(15);
    let emitted = loop {
        let n = emitted_here()? - emitted0;
        if n >= 3 {
            break n;
        }
        ensure!(Instant::now() < deadline, "the dead process's socket emitted {n} segments in 15 s, expected 3");
        std::thread::sleep(Duration::from_millis(5));
    };
    let reached = at_client()?.1 - reached0;
    let after = AfterKill { emitted, reached, waited: killed.elapsed() };
    println!("orphan diversion {mode}: {after:?}");
    drop(client);
    drop(net);
    Ok(after)
}

#[test]
fn killed_server_process_sends_nothing_from_the_vip_when_orphans_are_diverted() -> Result<()> {
    const NAME: &str = "killed_server_process_sends_nothing_from_the_vip_when_orphans_are_diverted";
    if let Ok(spec) = std::env::var(ORPHAN_CHILD_ENV) {
        return orphan_child(&spec);
    }
    // The defect, first: without the orphan rule, the dead process's socket keeps sending its data.
    let without = kill_with_data_in_flight('k', NAME, false)?;
    ensure!(without.reached > 0, "without the orphan rule nothing reached the client: {without:?}");
    let with = kill_with_data_in_flight('K', NAME, true)?;
    ensure!(with.reached == 0, "segments of a dead process's socket reached the client: {with:?}");
    println!(
        "after SIGKILL: without the orphan queue {} of {} segments the server's TCP emitted reached the client \
         (in {:?}); with it, 0 of {} (in {:?})",
        without.reached, without.emitted, without.waited, with.emitted, with.waited
    );
    Ok(())
}

#[test]
fn socket_closed_with_data_queued_delivers_all_of_it_and_its_fin_through_a_live_gate() -> Result<()> {
    let net = Net::up('f')?;
    let client_ns = net.client.clone();
    run_in_ns(&net.server, move || async move {
        let listener = TcpListener::bind(vip_addr()).await?;
        let (gate, rx) = Gate::start(config("tf"))?;
        let gate = Arc::new(gate);
        let orphan_queue = gate.orphan_queue().context("no orphan queue")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let pilot = autopilot(gate.clone(), rx, log.clone());
        // A small receive buffer and no reading: the server's data backs up in its send queue.
        let socket = client_socket(&client_ns)?;
        socket.set_recv_buffer_size(4096)?;
        let mut client = timeout(PROMPT, socket.connect(vip_addr())).await??;
        let (server, _) = timeout(PROMPT, listener.accept()).await??;

        let data = pattern(4 << 20);
        let mut written = 0;
        loop {
            match server.try_write(&data[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        drop(server); // the socket is orphaned with its send queue full and its FIN behind it
        let here = SocketAddrV4::new(VIP, PORT);
        let table = std::fs::read_to_string("/proc/thread-self/net/tcp")?;
        ensure!(primary::node::unflushed(&table, here) == 1, "no closed socket owes the client bytes:\n{table}");
        sleep(HOLD).await;

        let started = Instant::now();
        let mut got = Vec::new();
        timeout(Duration::from_secs(20), client.read_to_end(&mut got)).await??;
        let took = started.elapsed();
        ensure!(got.len() == written, "the client read {} bytes of {written}", got.len());
        ensure!(got == data[..written], "the bytes changed in transit");
        let stats = gate.stats();
        ensure!(stats.orphans > 0, "no segment went through the orphan queue: {stats:?}");
        let outbound: Vec<String> =
            log.lock().unwrap().iter().filter(|d| d.hook == Hook::LocalOut).map(flags).collect();
        let fins = outbound.iter().filter(|f| f.contains("FIN")).count();
        ensure!(fins >= 1, "the FIN did not go through the gate's own queue: {outbound:?}");
        ensure!(
            outbound.iter().all(|f| ["FIN", "RST", "SYN"].iter().any(|c| f.contains(c))),
            "orphan data reached the owner's channel: {outbound:?}"
        );
        // The client's last ACKs pass the gate's own queue (the pilot) before the socket sees them.
        wait_for("the client's ACK of the last bytes and the FIN", PROMPT, || {
            let table = std::fs::read_to_string("/proc/thread-self/net/tcp")?;
            Ok((primary::node::unflushed(&table, here) == 0).then_some(()))
        })
        .await?;
        let kernel = KernelQueueStats::read_here(orphan_queue)?.context("orphan queue not bound")?;
        ensure!(kernel.queued == 0 && kernel.dropped_full == 0 && kernel.dropped_user == 0, "{kernel:?}");
        println!(
            "server wrote {} KiB, then closed with its send queue full: all of it and the FIN arrived in \
             {took:?}; {} segments passed the orphan queue, the FIN ({fins}) went through queue {}",
            written / 1024,
            stats.orphans,
            gate.queue()
        );
        pilot.abort();
        let _ = pilot.await;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------
// (d) One batch verdict releases thousands of held segments.

/// RST segments for VIP:PORT from the client: a listener discards them silently, so each one shows up
/// as exactly one InSegs and causes no reply.
fn rst_segments(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let src = SocketAddrV4::new(CLIENT, 20000 + (i % 30000) as u16);
            let mut b = SegmentBuilder::new(src, SocketAddrV4::new(VIP, PORT));
            b.flags = TcpFlags::RST;
            b.seq = Seq(i as u32);
            b.build(&[])
        })
        .collect()
}

fn raw_socket(client_ns: &str) -> Result<socket2::Socket> {
    in_ns(client_ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(libc::IPPROTO_RAW.into()))?;
        Ok(s)
    })
}

#[test]
fn one_batch_verdict_releases_ten_thousand_held_segments() -> Result<()> {
    const N: usize = 10_000;
    let net = Net::up('d')?;
    let client_ns = net.client.clone();
    run_in_ns(&net.server, move || async move {
        let _listener = TcpListener::bind(vip_addr()).await?;
        let (gate, mut rx) = Gate::start(config("td"))?;
        let raw = raw_socket(&client_ns)?;
        let dst = socket2::SockAddr::from(SocketAddrV4::new(VIP, 0));
        let packets = rst_segments(N);
        let in_segs = tcp_mib("InSegs")?;

        let mut held = Vec::with_capacity(N);
        let t0 = Instant::now();
        // Chunks, so the client's veth backlog (netdev_max_backlog) never overflows.
        for (i, chunk) in packets.chunks(250).enumerate() {
            for p in chunk {
                raw.send_to(p, &dst)?;
            }
            while held.len() < i * 250 + chunk.len() {
                held.push(next(&mut rx).await?);
            }
        }
        let diverting = t0.elapsed();
        ensure!(held.iter().all(|d| d.hook == Hook::PreRouting), "a segment came from another hook");
        ensure!(held.windows(2).all(|w| w[1].id == w[0].id.wrapping_add(1)), "ids are not consecutive");
        ensure!(tcp_mib("InSegs")? == in_segs, "a held segment reached TCP");
        let ks = gate.kernel_stats()?.context("no kernel queue stats")?;
        ensure!(ks.queued as usize == N, "the kernel holds {} segments, expected {N}", ks.queued);

        let last = held.last().context("nothing held")?;
        let t = Instant::now();
        gate.release_upto(last.queue, last.id)?;
        let release = t.elapsed();
        let after = tcp_mib("InSegs")? - in_segs;
        ensure!(after == N as u64, "{after} segments reached TCP after the batch verdict returned, expected {N}");
        let ks = gate.kernel_stats()?.context("no kernel queue stats")?;
        ensure!(ks.queued == 0, "{} still queued", ks.queued);
        let stats = gate.stats();
        ensure!(stats.batches == 1 && stats.packets == N as u64, "{stats:?}");
        println!(
            "{N} segments: diverted and read in {diverting:?} ({:.0} packets/s including sending them); \
             one batch verdict released all {N} into TCP in {release:?} ({:.0} packets/s), inside the sendmsg",
            N as f64 / diverting.as_secs_f64(),
            N as f64 / release.as_secs_f64()
        );
        Ok(())
    })
}

/// With a small socket buffer and a stalled reader, the kernel drops what does not fit (and says
/// ENOBUFS); nothing it dropped ever reaches TCP.
#[test]
fn socket_overrun_drops_segments_and_counts_enobufs() -> Result<()> {
    const N: usize = 3000;
    let net = Net::up('o')?;
    let client_ns = net.client.clone();
    run_in_ns(&net.server, move || async move {
        let _listener = TcpListener::bind(vip_addr()).await?;
        let mut cfg = config("to");
        cfg.recv_buffer = 64 * 1024;
        let (gate, mut rx) = Gate::start(cfg)?;
        let raw = raw_socket(&client_ns)?;
        let dst = socket2::SockAddr::from(SocketAddrV4::new(VIP, 0));
        let in_segs = tcp_mib("InSegs")?;
        // The reader runs on this thread: while we send, it cannot read.
        for p in rst_segments(N) {
            raw.send_to(&p, &dst)?;
        }
        let ks = gate.kernel_stats()?.context("no kernel queue stats")?;
        let mut held = Vec::new();
        while let Ok(Some(d)) = timeout(Duration::from_millis(300), rx.recv()).await {
            held.push(d);
        }
        let stats = gate.stats();
        ensure!(ks.dropped_user > 0, "the kernel dropped nothing: {ks:?}");
        ensure!(stats.enobufs >= 1, "the reader saw no ENOBUFS: {stats:?}");
        ensure!(
            held.len() + (ks.dropped_user as usize) <= N,
            "{} held + {} dropped > {N}",
            held.len(),
            ks.dropped_user
        );
        ensure!(tcp_mib("InSegs")? == in_segs, "a segment reached TCP before release");
        let last = held.last().context("nothing held")?;
        gate.release_upto(last.queue, last.id)?;
        let reached = tcp_mib("InSegs")? - in_segs;
        ensure!(reached == held.len() as u64, "{reached} reached TCP, {} were held", held.len());
        println!(
            "{N} sent into a 64 KiB socket buffer: {} held, {} dropped by the kernel (ENOBUFS seen {} times); \
             only the {} held ones reached TCP",
            held.len(),
            ks.dropped_user,
            stats.enobufs,
            reached
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------
// (e) Rules: stale ones removed at start, ours removed on drop and on shutdown, a bound queue refused.

#[test]
fn stale_rules_are_removed_at_start_and_ours_on_drop() -> Result<()> {
    let net = Net::up('e')?;
    run_in_ns(&net.server, move || async move {
        let ipt = Iptables::here(Path::new("iptables"))?;
        let tag = "understudy:te";
        let nfq = ["-j", "NFQUEUE", "--queue-num", "7"];
        let c = ["-m", "comment", "--comment"];
        // What a crashed run of instance "te" left, and rules that are not ours.
        let stale_in =
            [&["-A", "PREROUTING", "-p", "tcp", "-d", "10.99.0.100/32", "--dport", "8080"][..], &c, &[tag], &nfq]
                .concat();
        let stale_out = [&["-A", "OUTPUT", "-p", "tcp", "--tcp-flags", "FIN", "FIN"][..], &c, &[tag], &nfq].concat();
        ipt.run(&stale_in)?;
        ipt.run(&stale_out)?;
        ipt.run(&["-A", "OUTPUT", "-p", "tcp", "-m", "comment", "--comment", "understudy:te2", "-j", "ACCEPT"])?;
        ipt.run(&["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])?;
        ensure!(ipt.count_tagged(tag)? == 2);

        let mut cfg = config("te");
        cfg.queue = 7;
        cfg.orphan_queue = Some(8);
        let (gate, _rx) = Gate::start(cfg.clone())?;
        let save = ipt.run(&["-S"])?;
        ensure!(ipt.count_tagged(tag)? == 5, "expected exactly our 5 rules:\n{save}");
        let output: Vec<&str> = save.lines().filter(|l| l.starts_with("-A OUTPUT")).collect();
        ensure!(
            output.iter().position(|l| l.contains("--socket-exists")) == Some(3)
                && output[3].ends_with("--queue-num 8")
                && output[..3].iter().all(|l| l.contains("--tcp-flags") && l.ends_with("--queue-num 7")),
            "the orphan rule must follow the three control rules:\n{save}"
        );
        ensure!(
            ipt.count_tagged("understudy:te2")? == 1 && save.contains("--dport 22"),
            "foreign rules touched:\n{save}"
        );
        let first_output = save.lines().find(|l| l.starts_with("-A OUTPUT")).unwrap_or_default();
        ensure!(first_output.contains(tag), "our rules are not at the top of OUTPUT:\n{save}");

        // A second gate on the same queue is refused before it touches any rule.
        match Gate::start(cfg.clone()) {
            Err(GateError::Queue(QueueError::Busy { queue: 7, holder })) => {
                println!("second gate refused: holder {holder}")
            }
            other => bail!("a second gate on a bound queue: {other:?}"),
        }
        ensure!(ipt.count_tagged(tag)? == 5, "the refused gate changed the rules");
        let mut orphans_taken = cfg.clone();
        orphans_taken.queue = 9;
        match Gate::start(orphans_taken) {
            Err(GateError::Queue(QueueError::Busy { queue: 8, .. })) => {}
            other => bail!("a gate whose orphan queue is bound elsewhere: {other:?}"),
        }
        // A process another test forks meanwhile holds a copy of every socket until it execs (CLOEXEC):
        // the kernel unbinds a queue once the last copy is closed, so these wait for that, not for ever.
        let unbound = |q: u16| move || Ok(KernelQueueStats::read_here(q)?.is_none().then_some(()));
        wait_for("the refused gate's first queue to be unbound", PROMPT, unbound(9)).await?;
        ensure!(ipt.count_tagged(tag)? == 5, "the refused gate changed the rules");

        drop(gate);
        ensure!(ipt.count_tagged(tag)? == 0, "rules left after drop:\n{}", ipt.run(&["-S"])?);
        ensure!(ipt.count_tagged("understudy:te2")? == 1, "drop removed a foreign rule");

        let (gate, _rx) = Gate::start(cfg)?;
        ensure!(KernelQueueStats::read_here(7)?.is_some() && KernelQueueStats::read_here(8)?.is_some());
        gate.shutdown()?;
        ensure!(ipt.count_tagged(tag)? == 0, "rules left after shutdown");
        wait_for("the queue to be unbound after shutdown", PROMPT, unbound(7)).await?;
        wait_for("the orphan queue to be unbound after shutdown", PROMPT, unbound(8)).await?;
        println!("stale rules replaced, ours removed on drop and on shutdown, foreign rules untouched");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------
// What the kernel hands over: sizes and checksum state, with and without NFQA_CFG_F_GSO.

#[derive(Debug, Default)]
struct Seen {
    packets: usize,
    max_inbound: usize,
    max_outbound: usize,
    gso: usize,
    partial: usize,
    unverified: usize,
    bad_checksum: usize,
    truncated: usize,
    fin_len: Vec<usize>,
}

fn observe(log: &[Diverted]) -> Seen {
    let mut s = Seen { packets: log.len(), ..Seen::default() };
    for d in log {
        let len = d.datagram.len();
        match d.hook {
            Hook::PreRouting => s.max_inbound = s.max_inbound.max(len),
            _ => s.max_outbound = s.max_outbound.max(len),
        }
        s.gso += d.gso as usize;
        s.partial += (d.checksum == Checksum::Partial) as usize;
        s.unverified += (d.checksum == Checksum::Unverified) as usize;
        s.truncated += d.original_len.is_some() as usize;
        if d.checksum != Checksum::Partial && Segment::parse_ipv4(&d.datagram, Checksums::Verify).is_err() {
            s.bad_checksum += 1;
        }
        if d.hook == Hook::LocalOut && Segment::parse_ipv4(&d.datagram, Checksums::Skip).is_ok_and(|g| g.flags.fin()) {
            s.fin_len.push(len);
        }
    }
    s
}

#[test]
fn without_gso_flag_every_diverted_datagram_is_wire_sized_with_a_valid_checksum() -> Result<()> {
    let net = Net::up('g')?;
    let client_ns = net.client.clone();
    run_in_ns(&net.server, move || async move {
        let listener = TcpListener::bind(vip_addr()).await?;
        for gso in [false, true] {
            let mut cfg = config(if gso { "tg1" } else { "tg0" });
            cfg.gso = gso;
            let (gate, rx) = Gate::start(cfg)?;
            let log = Arc::new(Mutex::new(Vec::new()));
            let pilot = autopilot(Arc::new(gate), rx, log.clone());
            let mut client = timeout(PROMPT, client_socket(&client_ns)?.connect(vip_addr())).await??;
            let (mut server, _) = timeout(PROMPT, listener.accept()).await??;
            let up = pattern(4 << 20);
            let down = pattern(4 << 20);
            let (up2, down2) = (up.clone(), down.clone());
            let c = tokio::spawn(async move {
                client.write_all(&up2).await?;
                client.shutdown().await?;
                let mut got = Vec::new();
                client.read_to_end(&mut got).await?;
                Ok::<_, std::io::Error>(got)
            });
            let mut got_up = Vec::new();
            timeout(Duration::from_secs(30), server.read_to_end(&mut got_up)).await??;
            server.write_all(&down2).await?;
            server.shutdown().await?;
            let got_down = timeout(Duration::from_secs(30), c).await???;
            ensure!(got_up == up && got_down == down, "gso={gso}: bytes changed in transit");
            // The last ACK may still be on its way; give the pilot a moment to log it.
            sleep(HOLD).await;
            pilot.abort();
            let _ = pilot.await;
            let seen = observe(&log.lock().unwrap());
            let mode = if gso { "on " } else { "off" };
            println!("NFQA_CFG_F_GSO {mode}: {} packets diverted: {seen:?}", seen.packets);
            if !gso {
                ensure!(seen.gso == 0 && seen.partial == 0, "gso off, yet GSO or partial-checksum packets: {seen:?}");
                ensure!(seen.max_inbound <= 1500 && seen.max_outbound <= 1500, "a datagram over the MTU: {seen:?}");
                ensure!(seen.bad_checksum == 0, "checksums that do not verify: {seen:?}");
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------
// The takeover's hold under the gate: removing it must not cost the segments the gate holds.

/// A takeover holds VIP segments (backup::takeover::Hold), starts the gate above the hold, and removes
/// the hold while the gate still holds segments. Removing a rule can unregister a netfilter hook (a
/// socket match's defragmentation, for one), and the kernel then flushes every queue of the namespace;
/// the held SYN here must survive the hold's removal and complete its handshake when released.
#[test]
fn segments_held_by_the_gate_survive_the_removal_of_the_takeover_hold() -> Result<()> {
    let net = Net::up('h')?;
    let client_ns = net.client.clone();
    run_in_ns(&net.server, move || async move {
        let listener = TcpListener::bind(vip_addr()).await?;
        let hold = backup::takeover::Hold::install(VIP, PORT, "th")?;
        let (gate, mut rx) = Gate::start(config("th"))?;
        let connect = tokio::spawn(client_socket(&client_ns)?.connect(vip_addr()));
        let syn = next(&mut rx).await?;
        ensure!(seg(&syn)?.flags.syn() && syn.hook == Hook::PreRouting, "first diverted: {}", flags(&syn));
        let queued = || -> Result<u64> {
            let stats = KernelQueueStats::read_here(syn.queue)?.context("the gate's queue is not listed")?;
            Ok(u64::from(stats.queued))
        };
        ensure!(queued()? == 1, "the SYN is not waiting in the queue");
        hold.release()?;
        ensure!(queued()? == 1, "removing the hold flushed the gate's queue");
        let released = Instant::now();
        gate.release_upto(syn.queue, syn.id)?;
        let synack = next(&mut rx).await?;
        ensure!(
            seg(&synack)?.flags.syn() && synack.hook == Hook::LocalOut,
            "after the release: {} (the held SYN was lost; this is the client's retransmission)",
            flags(&synack)
        );
        let after = released.elapsed();
        ensure!(after < Duration::from_millis(500), "the SYN-ACK came {after:?} after the release");
        let gate = Arc::new(gate);
        gate.release_upto(synack.queue, synack.id)?;
        let _ = finish_handshake(&gate, &mut rx, &listener, connect).await?;
        let stats = gate.stats();
        ensure!(stats.verdict_errors == 0, "verdicts refused by the kernel: {stats:?}");
        Ok(())
    })
}
