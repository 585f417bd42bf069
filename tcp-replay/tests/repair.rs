//! `TCP_REPAIR` checkpoint and restore against the real kernel.
//!
//! Each test builds its own pair of network namespaces joined by a veth pair
//! (client 10.77.0.1, server 10.77.0.2), named from the PID and a counter, and
//! removes them when it ends, however it ends. Sockets are created by threads
//! that `setns(2)` into a namespace; a socket keeps its namespace afterwards, so
//! the test thread drives both ends. Firewall rules inside the namespaces stand
//! in for the product's hold (inbound segments dropped while a socket is
//! rebuilt) and simulate lost ACKs. Needs root.

#![cfg(target_os = "linux")]

use anyhow::{Context, Result, bail, ensure};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use tcp_replay::repair::{self, RepairError};
use tcp_replay::{RestorePlan, TcpState};

const CLIENT_IP: &str = "10.77.0.1";
const SERVER_IP: &str = "10.77.0.2";
const PORT: u16 = 8080;
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Harness.

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces joined by a veth pair; deleted on drop.
struct Net {
    client: String,
    server: String,
    server_if: String,
}

impl Net {
    fn new() -> Result<Net> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", std::process::id(), n);
        let net = Net { client: format!("usrep{id}c"), server: format!("usrep{id}s"), server_if: format!("urs{id}") };
        let client_if = format!("urc{id}");
        // From here on, Drop removes whatever was created.
        run(&["ip", "netns", "add", &net.client])?;
        run(&["ip", "netns", "add", &net.server])?;
        run(&[
            "ip",
            "link",
            "add",
            &client_if,
            "netns",
            &net.client,
            "type",
            "veth",
            "peer",
            "name",
            &net.server_if,
            "netns",
            &net.server,
        ])?;
        for (ns, ifname, ip) in [(&net.client, &client_if, CLIENT_IP), (&net.server, &net.server_if, SERVER_IP)] {
            run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname])?;
            run(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn sysctl(&self, ns: &str, key: &str, value: u32) -> Result<()> {
        run(&["ip", "netns", "exec", ns, "sysctl", "-qw", &format!("{key}={value}")]).map(drop)
    }

    fn iptables(&self, ns: &str, rule: &str) -> Result<()> {
        let mut args = vec!["ip", "netns", "exec", ns, "iptables", "-w"];
        args.extend(rule.split_whitespace());
        run(&args).map(drop)
    }

    /// Client segments stop reaching the client's wire (its ACKs are lost).
    fn drop_client_output(&self, on: bool) -> Result<()> {
        let op = if on { "-I" } else { "-D" };
        self.iptables(&self.client, &format!("{op} OUTPUT -p tcp --dport {PORT} -j DROP"))
    }

    /// The product's hold: the server drops the client's segments while it rebuilds.
    fn hold_server_input(&self, on: bool) -> Result<()> {
        let op = if on { "-I" } else { "-D" };
        self.iptables(&self.server, &format!("{op} INPUT -i {} -p tcp --dport {PORT} -j DROP", self.server_if))
    }

    /// Starts counting FIN and RST segments the server sends.
    fn count_server_fin_rst(&self) -> Result<()> {
        for flag in ["FIN", "RST"] {
            self.iptables(
                &self.server,
                &format!("-A OUTPUT -p tcp --sport {PORT} --tcp-flags {flag} {flag} -m comment --comment usrep-{flag}"),
            )?;
        }
        Ok(())
    }

    /// Packets counted by `count_server_fin_rst` rules: (FIN, RST).
    fn server_fin_rst(&self) -> Result<(u64, u64)> {
        let out = run(&["ip", "netns", "exec", &self.server, "iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"])?;
        let count = |tag: &str| -> Result<u64> {
            let line = out.lines().find(|l| l.contains(tag)).with_context(|| format!("no {tag} rule in {out}"))?;
            Ok(line.split_whitespace().next().unwrap_or("x").parse()?)
        };
        Ok((count("usrep-FIN")?, count("usrep-RST")?))
    }

    /// Runs `f` on a thread inside namespace `ns`.
    fn within<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{ns}");
        let handle = thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd affects this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        });
        handle.join().map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }

    /// A connected (client, server) pair; the listener is gone afterwards.
    fn pair(&self) -> Result<(TcpStream, TcpStream)> {
        let listener = self.within(&self.server, || TcpListener::bind((SERVER_IP, PORT)))??;
        let client = self.within(&self.client, || TcpStream::connect((SERVER_IP, PORT)))??;
        let (server, _) = listener.accept()?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(DEADLINE))?;
            s.set_write_timeout(Some(DEADLINE))?;
        }
        Ok((client, server))
    }

    fn restore(&self, plan: &RestorePlan) -> Result<(TcpStream, Duration), RepairError> {
        let plan = plan.clone();
        self.within(&self.server, move || {
            let t = Instant::now();
            repair::restore(&plan).map(|s| (s, t.elapsed()))
        })
        .expect("namespace thread")
    }
}

impl Net {
    /// Waits until the server's namespace holds no socket on the port any more. The four-tuple is free
    /// once the last reference is gone (another test thread's fork may hold one briefly).
    fn wait_server_socket_gone(&self) -> Result<()> {
        wait_until("the closed socket is gone", || {
            let sport = format!("sport = :{PORT}");
            Ok(run(&["ip", "netns", "exec", &self.server, "ss", "-Htan", "state", "all", &sport])?.trim().is_empty())
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        thread::sleep(Duration::from_millis(2));
    }
}

fn ioctl(s: &impl AsFd, req: libc::Ioctl) -> Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    if unsafe { libc::ioctl(s.as_fd().as_raw_fd(), req, &mut v) } != 0 {
        bail!("ioctl {req:#x}: {}", std::io::Error::last_os_error());
    }
    Ok(v as u32)
}

/// Unread bytes in the receive queue.
fn inq(s: &impl AsFd) -> Result<u32> {
    ioctl(s, libc::FIONREAD)
}

/// Bytes written and not yet acknowledged (a queued FIN counts one).
fn outq(s: &impl AsFd) -> Result<u32> {
    ioctl(s, libc::TIOCOUTQ)
}

/// Bytes written and never sent.
fn notsent(s: &impl AsFd) -> Result<u32> {
    ioctl(s, libc::SIOCOUTQNSD)
}

fn state(s: &impl AsFd) -> Result<TcpState> {
    Ok(repair::tcp_state(s)?)
}

/// Congestion-avoidance state of the sender (`tcpi_ca_state`); 4 is Loss (after an RTO).
fn ca_state(s: &impl AsFd) -> Result<u8> {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes of tcp_info.
    let r = unsafe {
        libc::getsockopt(s.as_fd().as_raw_fd(), libc::SOL_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    ensure!(r == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    Ok(info[1])
}

const CA_LOSS: u8 = 4;

/// Segment size the socket sends with (`tcpi_snd_mss`).
fn snd_mss(s: &impl AsFd) -> Result<u32> {
    let mut info = [0u8; 24];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes of tcp_info.
    let r = unsafe {
        libc::getsockopt(s.as_fd().as_raw_fd(), libc::SOL_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    ensure!(r == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    // u8 fields (8 bytes), then u32 rto, ato, snd_mss.
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}

/// Deterministic test bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes without blocking until the socket takes no more; returns how much it took.
fn write_until_full(s: &TcpStream, data: &[u8]) -> Result<usize> {
    s.set_nonblocking(true)?;
    let mut off = 0;
    while off < data.len() {
        match (&*s).write(&data[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    s.set_nonblocking(false)?;
    Ok(off)
}

fn read_exactly(s: &TcpStream, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0; len];
    (&*s).read_exact(&mut buf).with_context(|| format!("reading {len} bytes"))?;
    Ok(buf)
}

fn expect_eof(s: &TcpStream) -> Result<()> {
    let mut b = [0u8; 1];
    let n = (&*s).read(&mut b)?;
    ensure!(n == 0, "expected EOF, read a byte");
    Ok(())
}

/// Both directions carry `len` more bytes, concurrently, byte-exact.
fn exchange(a: &TcpStream, b: &TcpStream, seed: u64, len: usize) -> Result<()> {
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let (to_b, to_a) = (pattern(seed, len), pattern(seed + 1, len));
    let (tb, ta) = (to_b.clone(), to_a.clone());
    let w1 = thread::spawn(move || (&a2).write_all(&tb));
    let w2 = thread::spawn(move || (&b2).write_all(&ta));
    ensure!(read_exactly(b, len)? == to_b, "bytes to b differ");
    ensure!(read_exactly(a, len)? == to_a, "bytes to a differ");
    w1.join().expect("writer")?;
    w2.join().expect("writer")?;
    Ok(())
}

/// The peer socket saw nothing of a silent close: no RST left the server, no FIN
/// unless one was already in flight (retransmitting it is legitimate), and the
/// client still believes the connection is in `client_state`.
fn assert_vanished_silently(net: &Net, client: &TcpStream, client_state: TcpState, plan: &RestorePlan) -> Result<()> {
    let (fin, rst) = net.server_fin_rst()?;
    assert_eq!(rst, 0, "the held socket's close sent a RST");
    if !plan.fin_sent {
        assert_eq!(fin, 0, "the held socket's close sent a FIN");
    }
    assert_eq!(state(client)?, client_state);
    Ok(())
}

/// Fields a checkpoint of the restored socket must share with the plan it came from.
fn assert_same_connection(restored: &RestorePlan, plan: &RestorePlan) {
    assert_eq!(restored.local, plan.local);
    assert_eq!(restored.remote, plan.remote);
    assert_eq!(restored.state, plan.state);
    assert_eq!(restored.options, plan.options);
    assert_eq!(restored.snd_una, plan.snd_una);
    assert_eq!(restored.snd_nxt(), plan.snd_nxt());
    assert_eq!(restored.send_queue, plan.send_queue, "send queue");
    assert_eq!(restored.unsent, plan.unsent, "unsent");
    assert_eq!(restored.rcv_nxt, plan.rcv_nxt);
    assert_eq!(restored.recv_queue, plan.recv_queue, "receive queue");
    assert_eq!(restored.fin_sent, plan.fin_sent);
    assert_eq!(restored.fin_received, plan.fin_received);
    assert_eq!(restored.window.snd_wnd, plan.window.snd_wnd);
    assert_eq!(restored.window.max_window, plan.window.max_window);
    // Not snd_wl1: leaving repair mode sets it to rcv_nxt - 1 (tcp_send_window_probe)
    // so that the peer's answer to the probe updates the window.
    if let (Some(a), Some(b)) = (restored.tsval, plan.tsval) {
        let ahead = a.wrapping_sub(b) as i32;
        assert!((0..5_000).contains(&ahead), "timestamp clock jumped: plan {b}, restored {a}");
    } else {
        assert_eq!(restored.tsval, plan.tsval);
    }
}

/// A connection with bytes in every queue: the client sent `c_len` bytes the
/// server application has not read; the server wrote until its buffer filled
/// while the client's ACKs were lost, so part of it is in flight (received by
/// the client kernel, unacknowledged) and part never sent. Returns the pair,
/// the client's bytes and the server's bytes as written.
struct Loaded {
    client: TcpStream,
    server: TcpStream,
    from_client: Vec<u8>,
    from_server: Vec<u8>,
}

fn loaded(net: &Net, c_len: usize) -> Result<Loaded> {
    let (client, server) = net.pair()?;
    let from_client = pattern(1, c_len);
    (&client).write_all(&from_client)?;
    wait_until("the server kernel holds the client's bytes", || {
        Ok(inq(&server)? as usize == c_len && outq(&client)? == 0)
    })?;
    net.drop_client_output(true)?;
    let all = pattern(2, 8 << 20);
    let written = write_until_full(&server, &all)?;
    let from_server = all[..written].to_vec();
    // After the retransmission timeout the sender is in Loss and sends no new bytes:
    // the queues stop moving.
    wait_until("the server's in-flight bytes reached the client and the RTO fired", || {
        let sent = outq(&server)? - notsent(&server)?;
        Ok(ca_state(&server)? == CA_LOSS && inq(&client)? == sent)
    })?;
    Ok(Loaded { client, server, from_client, from_server })
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn established_checkpoint_matches_both_applications_and_connection_keeps_working() -> Result<()> {
    let net = Net::new()?;
    let Loaded { client, server, from_client, from_server } = loaded(&net, 40_000)?;

    let t = Instant::now();
    let s = repair::checkpoint(&server)?;
    println!(
        "checkpoint of {} queued bytes: {:?}",
        s.send_queue.len() + s.unsent.len() + s.recv_queue.len(),
        t.elapsed()
    );
    let c = repair::checkpoint(&client)?;

    assert_eq!(s.state, TcpState::Established);
    assert_eq!(c.state, TcpState::Established);
    assert_eq!(s.local, SocketAddrV4::new(SERVER_IP.parse()?, PORT));
    assert_eq!((s.local, s.remote), (c.remote, c.local));
    // The server application has read nothing and the client acknowledged nothing of the server's.
    assert_eq!(s.recv_queue, from_client);
    assert!(!s.send_queue.is_empty() && !s.unsent.is_empty(), "bytes both in flight and unsent");
    assert_eq!([s.send_queue.bytes().unwrap(), s.unsent.bytes().unwrap()].concat(), from_server);
    // The client kernel holds exactly the bytes in flight.
    assert_eq!(c.recv_queue, s.send_queue);
    assert!(c.send_queue.is_empty() && c.unsent.is_empty());
    // Sequence numbers agree across the two ends.
    assert_eq!(c.rcv_nxt, s.snd_nxt());
    assert_eq!(c.recv_queue_seq(), s.snd_una);
    assert_eq!(c.snd_una, s.rcv_nxt);
    assert_eq!(c.snd_nxt(), s.rcv_nxt);
    assert_eq!(s.recv_queue_seq(), c.snd_una - from_client.len() as u32);
    // Options as negotiated by default Linux ends over a 1500-byte MTU.
    assert_eq!(s.options.mss, 1460);
    assert_eq!(c.options.mss, 1460);
    assert!(s.options.sack && s.options.timestamps && c.options.sack && c.options.timestamps);
    let (snd, rcv) = s.options.wscale.context("window scaling negotiated")?;
    assert_eq!(c.options.wscale, Some((rcv, snd)));
    assert!(s.tsval.is_some() && c.tsval.is_some() && s.ts_recent.is_none());
    assert!(s.window.max_window >= s.window.snd_wnd);
    assert!(s.window.rcv_wup.diff(s.rcv_nxt) <= 0);
    assert!(!s.fin_sent && !s.fin_received);

    // Resumed, the connection carries on.
    net.drop_client_output(false)?;
    let srv = server.try_clone()?;
    let rest = pattern(3, 300_000);
    let rest2 = rest.clone();
    let writer = thread::spawn(move || (&srv).write_all(&rest2));
    assert_eq!(read_exactly(&client, from_server.len())?, from_server);
    assert_eq!(read_exactly(&client, rest.len())?, rest);
    writer.join().expect("writer")?;
    assert_eq!(read_exactly(&server, from_client.len())?, from_client);
    exchange(&client, &server, 10, 200_000)?;
    Ok(())
}

#[test]
fn held_socket_closes_silently_and_restored_socket_continues_both_ways() -> Result<()> {
    let net = Net::new()?;
    let Loaded { client, server, from_client, from_server } = loaded(&net, 100_000)?;

    net.hold_server_input(true)?;
    net.count_server_fin_rst()?;
    let plan = repair::checkpoint_and_hold(&server)?;
    // A plain close of the held socket: nothing leaves. The four-tuple is free once
    // the last reference is gone (another test thread's fork may hold one briefly).
    drop(server);
    net.wait_server_socket_gone()?;
    assert_vanished_silently(&net, &client, TcpState::Established, &plan)?;
    net.drop_client_output(false)?;

    let (restored, took) = net.restore(&plan)?;
    println!(
        "restore with {} in flight, {} unsent, {} unread: {} us",
        plan.send_queue.len(),
        plan.unsent.len(),
        plan.recv_queue.len(),
        took.as_micros()
    );
    assert_same_connection(&repair::checkpoint(&restored)?, &plan);
    net.hold_server_input(false)?;

    // Everything the old server application wrote arrives once, in order; then more.
    let (srv, more) = (restored.try_clone()?, pattern(4, 500_000));
    let more2 = more.clone();
    let writer = thread::spawn(move || (&srv).write_all(&more2));
    assert_eq!(read_exactly(&client, from_server.len())?, from_server);
    assert_eq!(read_exactly(&client, more.len())?, more);
    writer.join().expect("writer")?;
    assert_eq!(read_exactly(&restored, from_client.len())?, from_client);
    exchange(&client, &restored, 20, 1 << 20)?;
    assert_eq!(net.server_fin_rst()?.1, 0, "no RST");

    // A normal close still works: the client sees EOF once.
    drop(restored);
    expect_eof(&client)?;
    Ok(())
}

#[test]
fn queues_larger_than_default_buffers_are_restored_next_to_a_listener() -> Result<()> {
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    exchange(&client, &server, 50, 1_000)?;
    wait_until("queues settle", || Ok(outq(&server)? == 0 && outq(&client)? == 0))?;
    net.hold_server_input(true)?;
    let mut plan = repair::checkpoint_and_hold(&server)?;
    repair::vanish(&server)?;
    drop(server);

    // As if the old server had sent 3 MB that were all lost on the way, and its
    // application had 2 MB of the client's bytes still unread. The listener the
    // product binds on the same port must not get in the way.
    let lost = pattern(51, 3 << 20);
    let unread = pattern(52, 2 << 20);
    plan.send_queue.bytes_mut().unwrap().extend_from_slice(&lost);
    plan.window.snd_wnd = plan.window.snd_wnd.max(4 << 20);
    plan.window.max_window = plan.window.max_window.max(plan.window.snd_wnd);
    plan.recv_queue = unread.clone().into();
    let _listener = net.within(&net.server, || TcpListener::bind((SERVER_IP, PORT)))??;
    let (restored, took) = net.restore(&plan)?;
    println!("restore with {} B in flight and {} B unread: {} us", lost.len(), unread.len(), took.as_micros());
    let r = repair::checkpoint(&restored)?;
    assert_eq!(r.send_queue.len(), lost.len());
    assert!(r.send_queue == lost && r.recv_queue == unread);
    // The buffers were forced large enough for the queues during the restore, and handed back at the
    // defaults: a forced size would outlive the queues (autotuning never shrinks), and the next
    // checkpoint of this connection would carry as much again.
    let sock = socket2::SockRef::from(&restored);
    let (snd, rcv) = (sock.send_buffer_size()?, sock.recv_buffer_size()?);
    assert!(snd < lost.len() && rcv < unread.len(), "buffers left forced: SO_SNDBUF {snd}, SO_RCVBUF {rcv}");
    net.hold_server_input(false)?;

    // The kernel retransmits the lost bytes; the client takes them within its window.
    assert!(read_exactly(&client, lost.len())? == lost, "retransmitted bytes differ");
    assert!(read_exactly(&restored, unread.len())? == unread, "restored unread bytes differ");
    exchange(&client, &restored, 53, 100_000)?;
    Ok(())
}

/// Negotiates with the given per-namespace sysctls, moves the server socket and
/// checks the options survive and the connection carries bulk data both ways.
fn options_survive_restore(client_on: bool, server_on: bool) -> Result<RestorePlan> {
    let net = Net::new()?;
    for (ns, on) in [(&net.client, client_on), (&net.server, server_on)] {
        for key in ["net.ipv4.tcp_timestamps", "net.ipv4.tcp_sack", "net.ipv4.tcp_window_scaling"] {
            net.sysctl(ns, key, on as u32)?;
        }
    }
    let (client, server) = net.pair()?;
    // Some reply bytes the client has read, some it has not; a request the server has not read.
    let reply = pattern(5, 100_000);
    (&server).write_all(&reply)?;
    assert_eq!(read_exactly(&client, 30_000)?, reply[..30_000]);
    let request = pattern(6, 5_000);
    (&client).write_all(&request)?;
    wait_until("queues settle", || Ok(inq(&server)? == 5_000 && outq(&server)? == 0 && outq(&client)? == 0))?;

    net.hold_server_input(true)?;
    net.count_server_fin_rst()?;
    let mss_before = snd_mss(&server)?;
    let plan = repair::checkpoint_and_hold(&server)?;
    repair::vanish(&server)?;
    drop(server);
    assert_vanished_silently(&net, &client, TcpState::Established, &plan)?;
    let both = client_on && server_on;
    assert_eq!(plan.options.sack, both);
    assert_eq!(plan.options.timestamps, both);
    assert_eq!(plan.options.wscale.is_some(), both);
    assert_eq!(plan.tsval.is_some(), both);
    assert!(plan.send_queue.is_empty() && plan.unsent.is_empty());
    assert_eq!(plan.recv_queue, request);

    let (restored, took) = net.restore(&plan)?;
    println!("restore (sack/ts/wscale {client_on}/{server_on}): {} us", took.as_micros());
    assert_same_connection(&repair::checkpoint(&restored)?, &plan);
    // Full-sized segments, not the 536-byte default a socket has before it knows
    // the peer's MSS. connect() reserves room for timestamps when this host's
    // sysctl enables them; without negotiated timestamps the kernel adds those 12
    // bytes back per segment (tcp_current_mss), but tcpi_snd_mss still shows them.
    let after = snd_mss(&restored)?;
    let reserved = if plan.options.timestamps || !server_on { 0 } else { 12 };
    assert_eq!(after + reserved, mss_before, "segment size after restore");
    net.hold_server_input(false)?;

    assert_eq!(read_exactly(&client, 70_000)?, reply[30_000..]);
    assert_eq!(read_exactly(&restored, request.len())?, request);
    exchange(&client, &restored, 30, 10_000)?;
    // The window the restored end advertises is read right by the client: a
    // receive scale the client does not know about would shrink it to a trickle.
    let snd_wnd = || -> Result<u32> { Ok(repair::checkpoint(&client)?.window.snd_wnd) };
    if !both {
        let w = snd_wnd()?;
        assert!((16_384..=65_535).contains(&w), "unscaled window expected, got {w}");
    }
    exchange(&client, &restored, 31, 2 << 20)?;
    if both {
        let w = snd_wnd()?;
        assert!(w > 65_535, "scaled window expected, got {w}");
    }
    assert_eq!(net.server_fin_rst()?.1, 0, "no RST");
    Ok(plan)
}

#[test]
fn restore_keeps_timestamps_sack_and_window_scaling_on() -> Result<()> {
    options_survive_restore(true, true).map(drop)
}

#[test]
fn restore_keeps_timestamps_sack_and_window_scaling_off() -> Result<()> {
    options_survive_restore(false, false).map(drop)
}

#[test]
fn restore_without_negotiated_options_on_a_host_that_enables_them_stays_unscaled() -> Result<()> {
    options_survive_restore(false, true).map(drop)
}

#[test]
fn close_wait_restored_socket_reads_request_then_eof_once() -> Result<()> {
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    let request = pattern(7, 20_000);
    let partial = pattern(8, 10_000);
    (&server).write_all(&partial)?;
    (&client).write_all(&request)?;
    client.shutdown(Shutdown::Write)?;
    wait_until("the server is in CLOSE_WAIT with the request queued", || {
        // CLOSE_WAIT acknowledges the FIN with a delayed ACK: wait for the client to have it.
        Ok(state(&server)? == TcpState::CloseWait && inq(&server)? == 20_000 && state(&client)? == TcpState::FinWait2)
    })?;

    net.hold_server_input(true)?;
    net.count_server_fin_rst()?;
    let plan = repair::checkpoint_and_hold(&server)?;
    repair::vanish(&server)?;
    drop(server);
    assert_vanished_silently(&net, &client, TcpState::FinWait2, &plan)?;
    assert!(plan.fin_received && !plan.fin_sent);
    assert!(!repair::restores_silently(&plan), "the replayed FIN is acknowledged to the client");
    assert_eq!(plan.recv_queue, request);

    let (restored, took) = net.restore(&plan)?;
    println!("restore in CLOSE_WAIT: {} us", took.as_micros());
    assert_same_connection(&repair::checkpoint(&restored)?, &plan);
    net.hold_server_input(false)?;

    assert_eq!(read_exactly(&restored, request.len())?, request);
    expect_eof(&restored)?;
    let rest = pattern(9, 50_000);
    (&restored).write_all(&rest)?;
    restored.shutdown(Shutdown::Write)?;
    assert_eq!(read_exactly(&client, partial.len())?, partial);
    assert_eq!(read_exactly(&client, rest.len())?, rest);
    expect_eof(&client)?;
    wait_until("the client's connection completes its close", || Ok(state(&client)? == TcpState::Close))?;
    assert_eq!(net.server_fin_rst()?, (1, 0), "one FIN, no RST");
    Ok(())
}

#[test]
fn fin_wait2_restored_socket_keeps_receiving_and_peer_sees_one_eof() -> Result<()> {
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    let response = pattern(10, 30_000);
    (&server).write_all(&response)?;
    server.shutdown(Shutdown::Write)?;
    assert_eq!(read_exactly(&client, response.len())?, response);
    expect_eof(&client)?;
    let late = pattern(11, 20_000);
    (&client).write_all(&late)?;
    wait_until("the server is in FIN_WAIT2 with the late bytes queued", || {
        Ok(state(&server)? == TcpState::FinWait2 && inq(&server)? == 20_000 && outq(&client)? == 0)
    })?;
    let client_before = repair::checkpoint(&client)?;

    net.hold_server_input(true)?;
    net.count_server_fin_rst()?;
    let plan = repair::checkpoint_and_hold(&server)?;
    repair::vanish(&server)?;
    drop(server);
    assert_vanished_silently(&net, &client, TcpState::CloseWait, &plan)?;
    assert!(plan.fin_sent && !plan.fin_received);
    assert!(plan.send_queue.is_empty());
    // The FIN is acknowledged: snd_una is one past it and the client expects nothing more.
    assert_eq!(plan.snd_una, client_before.rcv_nxt + 1);

    let (restored, took) = net.restore(&plan)?;
    println!("restore in FIN_WAIT2: {} us", took.as_micros());
    assert_same_connection(&repair::checkpoint(&restored)?, &plan);
    net.hold_server_input(false)?;

    assert_eq!(read_exactly(&restored, late.len())?, late);
    let more = pattern(12, 100_000);
    (&client).write_all(&more)?;
    assert_eq!(read_exactly(&restored, more.len())?, more);
    // The client saw the server's FIN once: no byte and no second FIN reached it.
    let client_after = repair::checkpoint(&client)?;
    assert_eq!(client_after.state, TcpState::CloseWait);
    assert_eq!(client_after.rcv_nxt, client_before.rcv_nxt);
    assert!(client_after.recv_queue.is_empty());
    expect_eof(&client)?;
    client.shutdown(Shutdown::Write)?;
    expect_eof(&restored)?;
    assert_eq!(net.server_fin_rst()?, (0, 0), "the restored socket sent no FIN or RST");
    Ok(())
}

#[test]
fn fin_wait1_restored_socket_gets_its_fin_acknowledged() -> Result<()> {
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    net.drop_client_output(true)?;
    let response = pattern(13, 8_000);
    (&server).write_all(&response)?;
    server.shutdown(Shutdown::Write)?;
    wait_until("the client holds the response and the FIN", || {
        Ok(state(&client)? == TcpState::CloseWait && inq(&client)? == 8_000 && state(&server)? == TcpState::FinWait1)
    })?;

    net.hold_server_input(true)?;
    net.count_server_fin_rst()?;
    let plan = repair::checkpoint_and_hold(&server)?;
    repair::vanish(&server)?;
    drop(server);
    assert_vanished_silently(&net, &client, TcpState::CloseWait, &plan)?;
    assert_eq!(plan.state, TcpState::FinWait1);
    assert!(plan.fin_sent && plan.unsent.is_empty());
    assert_eq!(plan.send_queue, response);
    net.drop_client_output(false)?;

    let (restored, took) = net.restore(&plan)?;
    println!("restore in FIN_WAIT1: {} us", took.as_micros());
    assert_same_connection(&repair::checkpoint(&restored)?, &plan);
    net.hold_server_input(false)?;

    wait_until("the client acknowledges the FIN", || Ok(state(&restored)? == TcpState::FinWait2))?;
    assert_eq!(read_exactly(&client, response.len())?, response);
    expect_eof(&client)?;
    let bye = pattern(14, 3_000);
    (&client).write_all(&bye)?;
    client.shutdown(Shutdown::Write)?;
    assert_eq!(read_exactly(&restored, bye.len())?, bye);
    expect_eof(&restored)?;
    Ok(())
}

#[test]
fn fin_behind_unsent_bytes_is_sent_after_them() -> Result<()> {
    let net = Net::new()?;
    let Loaded { client, server, from_client, from_server } = loaded(&net, 1_000)?;
    server.shutdown(Shutdown::Write)?;
    assert_eq!(state(&server)?, TcpState::FinWait1);

    net.hold_server_input(true)?;
    net.count_server_fin_rst()?;
    let plan = repair::checkpoint_and_hold(&server)?;
    repair::vanish(&server)?;
    drop(server);
    assert_vanished_silently(&net, &client, TcpState::Established, &plan)?;
    assert_eq!(plan.state, TcpState::FinWait1);
    assert!(!plan.fin_sent, "the FIN waits behind unsent bytes");
    assert!(!plan.unsent.is_empty());
    assert_eq!([plan.send_queue.bytes().unwrap(), plan.unsent.bytes().unwrap()].concat(), from_server);
    net.drop_client_output(false)?;

    let (restored, took) = net.restore(&plan)?;
    println!("restore in FIN_WAIT1 with the FIN unsent: {} us", took.as_micros());
    assert_eq!(state(&restored)?, TcpState::FinWait1);
    net.hold_server_input(false)?;

    assert_eq!(read_exactly(&client, from_server.len())?, from_server);
    expect_eof(&client)?;
    assert_eq!(read_exactly(&restored, from_client.len())?, from_client);
    wait_until("the client acknowledges the FIN", || Ok(state(&restored)? == TcpState::FinWait2))?;
    client.shutdown(Shutdown::Write)?;
    expect_eof(&restored)?;
    Ok(())
}

#[test]
fn last_ack_restored_socket_finishes_the_close() -> Result<()> {
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    let request = pattern(15, 2_000);
    (&client).write_all(&request)?;
    client.shutdown(Shutdown::Write)?;
    wait_until("the server is in CLOSE_WAIT", || Ok(state(&server)? == TcpState::CloseWait && inq(&server)? == 2_000))?;
    assert_eq!(read_exactly(&server, request.len())?, request);
    expect_eof(&server)?;
    net.drop_client_output(true)?;
    let response = pattern(16, 5_000);
    (&server).write_all(&response)?;
    server.shutdown(Shutdown::Write)?;
    // The client (FIN_WAIT2) takes the bytes and the FIN and hands over to a
    // time-wait socket: its own socket reads CLOSE.
    wait_until("the client holds the response and the FIN", || {
        Ok(state(&server)? == TcpState::LastAck && inq(&client)? == 5_000 && state(&client)? == TcpState::Close)
    })?;

    net.hold_server_input(true)?;
    net.count_server_fin_rst()?;
    let plan = repair::checkpoint_and_hold(&server)?;
    repair::vanish(&server)?;
    drop(server);
    assert_vanished_silently(&net, &client, TcpState::Close, &plan)?;
    assert_eq!(plan.state, TcpState::LastAck);
    assert!(plan.fin_sent && plan.fin_received);
    assert!(plan.recv_queue.is_empty());
    assert_eq!(plan.send_queue, response);
    net.drop_client_output(false)?;

    let (restored, took) = net.restore(&plan)?;
    println!("restore in LAST_ACK: {} us", took.as_micros());
    assert_same_connection(&repair::checkpoint(&restored)?, &plan);
    net.hold_server_input(false)?;

    assert_eq!(read_exactly(&client, response.len())?, response);
    expect_eof(&client)?;
    wait_until("the client acknowledges the FIN", || Ok(state(&restored)? == TcpState::Close))?;
    Ok(())
}

/// Both ends send their FIN while neither reaches the other; then only the
/// client's gets through, so the server has sent a FIN and received one that does
/// not acknowledge its own: CLOSING. With `fin_left` the server's FIN left the
/// host and was lost (dropped at the client); otherwise the server's own firewall
/// refused it, so its kernel holds the FIN as never sent.
fn closing_is_restored_and_the_close_completes(fin_left: bool) -> Result<()> {
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    let block_server_fin = |on: bool| {
        let op = if on { "-I" } else { "-D" };
        if fin_left {
            net.iptables(&net.client, &format!("{op} INPUT -p tcp --sport {PORT} -j DROP"))
        } else {
            net.iptables(&net.server, &format!("{op} OUTPUT -p tcp --sport {PORT} -j DROP"))
        }
    };
    block_server_fin(true)?;
    net.drop_client_output(true)?;
    server.shutdown(Shutdown::Write)?;
    client.shutdown(Shutdown::Write)?;
    net.drop_client_output(false)?;
    wait_until("the server is in CLOSING", || Ok(state(&server)? == TcpState::Closing))?;

    net.hold_server_input(true)?;
    let plan = repair::checkpoint_and_hold(&server)?;
    repair::vanish(&server)?;
    drop(server);
    assert_eq!(plan.state, TcpState::Closing);
    assert_eq!(plan.fin_sent, fin_left);
    assert!(plan.fin_received);
    assert!(plan.send_queue.is_empty() && plan.unsent.is_empty() && plan.recv_queue.is_empty());
    let c = repair::checkpoint(&client)?;
    assert_eq!(c.state, TcpState::FinWait1);
    assert_eq!(c.snd_nxt(), plan.rcv_nxt + 1, "the client's FIN is the one the server received");
    assert_eq!(c.rcv_nxt, plan.snd_una, "the server's FIN never reached the client");
    block_server_fin(false)?;

    let (restored, took) = net.restore(&plan)?;
    println!("restore in CLOSING (FIN left: {fin_left}): {} us", took.as_micros());
    let r = repair::checkpoint(&restored)?;
    assert_eq!(r.state, TcpState::Closing);
    assert!(r.fin_sent && r.fin_received);
    assert_eq!((r.snd_una, r.rcv_nxt), (plan.snd_una, plan.rcv_nxt));
    net.hold_server_input(false)?;

    // The server's FIN reaches the client (retransmitted, or sent for the first
    // time), both ends see EOF once and the close completes on both sides.
    expect_eof(&restored)?;
    expect_eof(&client)?;
    wait_until("both ends finish the close", || {
        Ok(state(&restored)? == TcpState::Close && state(&client)? == TcpState::Close)
    })?;
    Ok(())
}

#[test]
fn closing_with_fin_lost_on_the_wire_is_restored_and_closes() -> Result<()> {
    closing_is_restored_and_the_close_completes(true)
}

#[test]
fn closing_with_fin_never_sent_is_restored_and_closes() -> Result<()> {
    closing_is_restored_and_the_close_completes(false)
}

#[test]
fn restore_to_an_address_not_on_this_host_fails_at_bind() -> Result<()> {
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    let mut plan = repair::checkpoint(&server)?;
    plan.local = "10.99.99.99:80".parse()?;
    let err = net.restore(&plan).expect_err("the address is not configured");
    assert_eq!(err.step(), Some("bind"), "{err}");
    assert_eq!(err.os_error().and_then(|e| e.raw_os_error()), Some(libc::EADDRNOTAVAIL), "{err}");
    assert!(err.to_string().contains("10.99.99.99:80"), "{err}");
    // The original connection is untouched.
    exchange(&client, &server, 40, 10_000)?;
    Ok(())
}

/// Drops CAP_NET_ADMIN from the calling thread's effective set (capabilities
/// are per thread; the thread ends right after).
fn drop_cap_net_admin() -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data structs, as documented.
    unsafe {
        ensure!(libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) == 0, "capget");
        data[0].effective &= !(1 << CAP_NET_ADMIN);
        ensure!(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) == 0, "capset");
    }
    Ok(())
}

#[test]
fn restore_without_cap_net_admin_says_so() -> Result<()> {
    let net = Net::new()?;
    let (_client, server) = net.pair()?;
    let plan = repair::checkpoint(&server)?;
    drop(server);
    let err = net.within(&net.server, move || -> Result<RepairError> {
        drop_cap_net_admin()?;
        Ok(repair::restore(&plan).expect_err("no privilege"))
    })??;
    assert!(matches!(err, RepairError::NotPermitted { step: "TCP_REPAIR", needs: "CAP_NET_ADMIN", .. }), "{err:?}");
    assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
    Ok(())
}

#[test]
fn listening_socket_cannot_be_checkpointed() -> Result<()> {
    let net = Net::new()?;
    let listener = net.within(&net.server, || TcpListener::bind((SERVER_IP, PORT)))??;
    match repair::checkpoint(&listener) {
        Err(RepairError::UnsupportedState { state: TcpState::Listen, .. }) => Ok(()),
        other => bail!("expected UnsupportedState(Listen), got {other:?}"),
    }
}

/// The retransmission timer of the server's established socket, as `ss` shows it (`timer:(on,996ms,0)`).
fn retransmit_timer(net: &Net) -> Result<Duration> {
    let sport = format!("sport = :{PORT}");
    let out = run(&["ip", "netns", "exec", &net.server, "ss", "-Htno", "state", "established", &sport])?;
    let timer = out
        .split("timer:(on,")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .with_context(|| format!("no retransmission timer in `{out}`"))?;
    let (number, scale) = match timer.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (timer.strip_suffix("sec").with_context(|| format!("timer `{timer}`"))?, 1.0),
    };
    Ok(Duration::from_secs_f64(number.parse::<f64>()? * scale))
}

#[test]
fn bytes_lost_in_flight_are_resent_on_a_timer_of_at_most_a_second() -> Result<()> {
    // A socket restored with bytes in flight that never reached the client (the dead server's kernel had
    // them queued, or they were lost) and whose client stays silent (its answer to the window probe is
    // held here) resends them on its first retransmission timer: the initial 1 s, as for a new
    // connection without an RTT sample, not the 3 s fallback, nor the cap restore sets for later ones.
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    // Dropped on arrival at the client: the server's kernel sends them (a local OUTPUT drop would keep
    // them unsent instead).
    net.iptables(&net.client, &format!("-I INPUT -p tcp --sport {PORT} -j DROP"))?;
    let lost = pattern(5, 10_000); // within the initial congestion window: all of it leaves at once
    (&server).write_all(&lost)?;
    wait_until("the server's bytes are in flight", || {
        Ok(outq(&server)? as usize == lost.len() && notsent(&server)? == 0)
    })?;
    net.hold_server_input(true)?;
    let plan = repair::checkpoint_and_hold(&server)?;
    drop(server);
    net.wait_server_socket_gone()?;
    net.iptables(&net.client, &format!("-D INPUT -p tcp --sport {PORT} -j DROP"))?;
    assert_eq!(plan.send_queue, lost, "every byte restored as in flight");
    assert!(!repair::restores_silently(&plan));
    // A backup's kernel has never talked to the client: nothing cached about its path.
    run(&["ip", "-n", &net.server, "tcp_metrics", "flush", "all"])?;

    let (restored, _) = net.restore(&plan)?;
    let timer = retransmit_timer(&net)?;
    println!("restored socket's retransmission timer: {timer:?}");
    assert!(timer <= Duration::from_millis(1000), "first retransmission only after {timer:?}");
    net.hold_server_input(false)?;
    assert_eq!(read_exactly(&client, lost.len())?, lost);
    exchange(&client, &restored, 30, 100_000)?;
    Ok(())
}

#[test]
fn an_idle_connection_is_restored_without_a_window_probe_and_keeps_working() -> Result<()> {
    // Nothing to send, no FIN: the probe would teach the socket nothing, and at a takeover of thousands
    // of idle keep-alive connections each probe and its answer cost a trip through both stacks.
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    exchange(&client, &server, 40, 10_000)?;
    net.hold_server_input(true)?;
    let plan = repair::checkpoint_and_hold(&server)?;
    drop(server);
    net.wait_server_socket_gone()?;
    assert!(plan.send_queue.is_empty() && plan.recv_queue.is_empty() && plan.unsent.is_empty());
    assert!(repair::restores_silently(&plan));
    net.iptables(&net.server, &format!("-A OUTPUT -p tcp --sport {PORT} -m comment --comment usrep-out"))?;
    let (restored, _) = net.restore(&plan)?;
    let out = run(&["ip", "netns", "exec", &net.server, "iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"])?;
    let line = out.lines().find(|l| l.contains("usrep-out")).context("counter rule")?;
    let sent: u64 = line.split_whitespace().next().unwrap_or("x").parse()?;
    assert_eq!(sent, 0, "the restore sent {sent} segments for an idle connection");
    net.hold_server_input(false)?;
    exchange(&client, &restored, 41, 50_000)?;
    exchange(&restored, &client, 42, 50_000)?;
    Ok(())
}

/// Packets the server sent from the port since `-A OUTPUT ... usrep-out` was added.
fn server_output(net: &Net) -> Result<u64> {
    let out = run(&["ip", "netns", "exec", &net.server, "iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"])?;
    let line = out.lines().find(|l| l.contains("usrep-out")).context("counter rule")?;
    Ok(line.split_whitespace().next().unwrap_or("x").parse()?)
}

#[test]
fn an_idle_connection_staged_before_its_address_is_here_is_taken_over_without_a_segment() -> Result<()> {
    // A standby stages the sockets of idle connections while the address they belong to is on another
    // host: nothing leaves while staged, a staged socket dropped sends nothing, and once the address is
    // here the staged socket is the connection.
    let net = Net::new()?;
    let (client, server) = net.pair()?;
    exchange(&client, &server, 50, 10_000)?;
    let plan = repair::checkpoint_and_hold(&server)?;
    drop(server);
    net.wait_server_socket_gone()?;
    // The server's host keeps an address of its own on the subnet (its route to the client) and loses
    // the connection's, as a standby without the VIP.
    net.sysctl(&net.server, &format!("net.ipv4.conf.{}.promote_secondaries", net.server_if), 1)?;
    run(&["ip", "-n", &net.server, "addr", "add", "10.77.0.3/24", "dev", &net.server_if])?;
    run(&["ip", "-n", &net.server, "addr", "del", &format!("{SERVER_IP}/24"), "dev", &net.server_if])?;
    let err = net.restore(&plan).expect_err("a restore needs the address");
    assert_eq!(err.step(), Some("bind"), "{err}");
    net.iptables(&net.server, &format!("-A OUTPUT -p tcp --sport {PORT} -m comment --comment usrep-out"))?;

    let stage = |plan: &RestorePlan| {
        let plan = plan.clone();
        net.within(&net.server, move || repair::stage(&plan))
    };
    // Dropped while staged: silent, and the four-tuple is free again.
    drop(stage(&plan)??);
    net.wait_server_socket_gone()?;
    let staged = stage(&plan)??;
    staged.set_nodelay(true)?;
    assert!(staged.fits(&plan));
    let mut moved = plan.clone();
    moved.rcv_nxt = moved.rcv_nxt + 18;
    assert!(!staged.fits(&moved), "a staged socket fits only the connection as it was");
    assert_eq!(state(&client)?, TcpState::Established);

    // The takeover: the socket leaves repair mode (which sends nothing, so it need not wait for the
    // address), then the address arrives.
    let restored = staged.finish()?;
    restored.set_nonblocking(false)?; // staged for an event loop
    run(&["ip", "-n", &net.server, "addr", "add", &format!("{SERVER_IP}/32"), "dev", &net.server_if])?;
    assert_eq!(server_output(&net)?, 0, "a staged socket sent something");
    // A listener can bind the port beside it (SO_REUSEADDR, as after a restore; a checkpoint drops it).
    let _listener = net.within(&net.server, || TcpListener::bind((SERVER_IP, PORT)))??;
    assert_same_connection(&repair::checkpoint(&restored)?, &plan);
    for s in [&client, &restored] {
        s.set_read_timeout(Some(DEADLINE))?;
    }
    exchange(&client, &restored, 51, 50_000)?;
    exchange(&restored, &client, 52, 50_000)?;
    Ok(())
}

#[test]
fn unsent_bytes_left_to_the_caller_arrive_once_it_writes_them() -> Result<()> {
    // A takeover leaves a busy connection's unsent bytes to the connection's task instead of copying
    // them into the socket during the restore: the socket is restored with its buffer sized for them,
    // the bytes in flight in its repair queue, and the caller writes the rest.
    let net = Net::new()?;
    let Loaded { client, server, from_client, from_server } = loaded(&net, 30_000)?;
    net.hold_server_input(true)?;
    let plan = repair::checkpoint_and_hold(&server)?;
    drop(server);
    net.wait_server_socket_gone()?;
    net.drop_client_output(false)?;
    assert!(!plan.unsent.is_empty() && !plan.send_queue.is_empty(), "bytes both in flight and unsent");

    let p = plan.clone();
    let (restored, left) =
        net.within(&net.server, move || repair::restore_nonblocking_leaving_unsent(&p, &repair_source()))??;
    let left = left.context("unsent bytes of an ESTABLISHED connection are left")?;
    restored.set_nonblocking(false)?;
    let forced = socket2::SockRef::from(&restored).send_buffer_size()?;
    assert!(forced >= plan.send_queue.len() + plan.unsent.len(), "the buffer holds what is to come ({forced})");
    // Nothing unsent is in the socket yet.
    assert_eq!(outq(&restored)? as usize, plan.send_queue.len());
    net.hold_server_input(false)?;
    (&restored).write_all(plan.unsent.bytes().context("a checkpoint's queues are bytes")?)?;
    left.written(&restored)?;
    let released = socket2::SockRef::from(&restored).send_buffer_size()?;
    assert!(released < forced, "the buffer size went back to autotuning ({released} after {forced})");
    for s in [&client, &restored] {
        s.set_read_timeout(Some(DEADLINE))?;
    }
    assert_eq!(read_exactly(&client, from_server.len())?, from_server, "every byte once, in order");
    assert_eq!(read_exactly(&restored, from_client.len())?, from_client);
    exchange(&client, &restored, 60, 100_000)?;

    // With a FIN behind them they cannot be left: the restore writes them, then the FIN.
    let net = Net::new()?;
    let (_client, server) = net.pair()?;
    let mut plan = repair::checkpoint_and_hold(&server)?;
    plan.unsent = b"tail".to_vec().into();
    plan.state = TcpState::FinWait1;
    drop(server);
    net.wait_server_socket_gone()?;
    net.within(&net.server, move || -> Result<()> {
        let (_s, left) = repair::restore_nonblocking_leaving_unsent(&plan, &repair_source())?;
        ensure!(left.is_none(), "unsent bytes before a FIN were left to the caller");
        Ok(())
    })??;
    Ok(())
}

fn repair_source() -> tcp_replay::plan::NoSource {
    tcp_replay::plan::NoSource
}
