//! Time to turn a restore plan into a live repaired socket (`tcp_replay::repair::restore`,
//! `TCP_REPAIR`), per connection, alone and in batches of 100 and 1000 restored back to
//! back, as a takeover restores every connection (all bound to the one VIP:port, so the
//! batches show what a growing bind bucket and established hash cost).
//!
//! Needs root and a real kernel. Before anything else the benchmark moves its own
//! thread into a new, private network namespace (`unshare(CLONE_NEWNET)`, then `lo`
//! up with an Ethernet MTU) and works on 127.0.0.1 there only, so the host's network is never touched;
//! it goes back to its original namespace when done, and the private one disappears
//! with its last socket. Without root the group is skipped with a message.
//!
//! Plans are real: for each connection a client connects to a listener on
//! 127.0.0.1:8080, sends a request the server reads and answers, and the server socket
//! is checkpointed (`checkpoint_and_hold`) and made to vanish silently, leaving the
//! client connected, as on a primary that died. Two kinds:
//!
//! * `idle`: a keep-alive connection between requests (empty queues);
//! * `active`: the next request (400 bytes) received and not yet read (receive queue,
//!   as checkpointed), and a reply of 14 600 bytes (an initial window of ten 1460-byte
//!   segments) written and not yet acknowledged (send queue, added to the plan as the
//!   backup's reply log would hold it).
//!
//! Each measured restore is undone (`vanish`, then close) outside the timing, so the
//! same plans are restored again in the next iteration. Reports connections/s; the
//! time per iteration divided by the batch size is the time per connection.

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};
use tcp_replay::RestorePlan;
use tcp_replay::repair;

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080);
const BATCHES: [usize; 2] = [100, 1000];
/// Ten 1460-byte segments: the initial congestion window (RFC 6928).
const IN_FLIGHT: usize = 10 * 1460;
const UNREAD: usize = 400;
const SETTLE: Duration = Duration::from_secs(10);
/// Ethernet's MTU on the private `lo`: plans then carry the MSS a client on a LAN
/// advertises (1460). With `lo`'s own 65536 they would carry 65483, which `restore`
/// cannot set (`TCP_MAXSEG` accepts at most 32767).
const MTU: libc::c_int = 1500;

/// The calling thread in a private network namespace of its own; back in the original
/// one on drop.
struct PrivateNet {
    home: File,
}

impl PrivateNet {
    fn enter() -> Result<PrivateNet, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (unshare(CLONE_NEWNET), TCP_REPAIR)".into());
        }
        let home = File::open("/proc/thread-self/ns/net").map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
        // SAFETY: affects the calling thread's network namespace only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        let net = PrivateNet { home };
        lo_up().map_err(|e| format!("bringing lo up: {e}"))?;
        Ok(net)
    }
}

impl Drop for PrivateNet {
    fn drop(&mut self) {
        // SAFETY: `home` is a network namespace fd; setns affects the calling thread only.
        if unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "restore: could not return to the original network namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// `ip link set lo up mtu 1500`, through SIOCSIFFLAGS and SIOCSIFMTU.
fn lo_up() -> std::io::Result<()> {
    // SAFETY: plain socket creation; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write an ifreq whose name is set.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_mtu = MTU;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &ifr) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An int-valued ioctl (FIONREAD, TIOCOUTQ).
fn ioctl_int(s: &impl AsFd, req: libc::Ioctl) -> u32 {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    let rc = unsafe { libc::ioctl(s.as_fd().as_raw_fd(), req, &mut v) };
    assert_eq!(rc, 0, "ioctl {req:#x}: {}", std::io::Error::last_os_error());
    v as u32
}

/// Connections whose server ends were checkpointed and vanished: the clients stay
/// connected, the plans restore their server ends.
struct Captured {
    _clients: Vec<TcpStream>,
    plans: Vec<RestorePlan>,
}

fn capture(n: usize, active: bool) -> Captured {
    let listener = TcpListener::bind(VIP).expect("binding the listener in the private namespace");
    let request = bench::http::request("GET", "/index.html", bench::http::Framing::Length, b"");
    let reply = bench::http::response(bench::http::Framing::Length, &bench::http::body(2000));
    let next = [&request[..], &vec![b'x'; UNREAD - request.len()]].concat();
    let mut clients = Vec::with_capacity(n);
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        let mut client = TcpStream::connect(VIP).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(&request).unwrap();
        server.read_exact(&mut vec![0; request.len()]).unwrap();
        server.write_all(&reply).unwrap();
        client.read_exact(&mut vec![0; reply.len()]).unwrap();
        if active {
            client.write_all(&next).unwrap();
        }
        clients.push(client);
        servers.push(server);
    }
    drop(listener);
    // Quiescent before the checkpoint: every reply byte acknowledged, the unread request in.
    let deadline = Instant::now() + SETTLE;
    let unread = if active { UNREAD as u32 } else { 0 };
    while !servers.iter().all(|s| ioctl_int(s, libc::TIOCOUTQ) == 0 && ioctl_int(s, libc::FIONREAD) == unread) {
        assert!(Instant::now() < deadline, "connections did not settle within {SETTLE:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let plans = servers
        .into_iter()
        .map(|server| {
            let mut plan = repair::checkpoint_and_hold(&server).expect("checkpoint");
            repair::vanish(&server).expect("vanish");
            assert_eq!((plan.recv_queue.len(), plan.send_queue.len()), (unread as usize, 0));
            if active {
                plan.send_queue = bench::http::body(IN_FLIGHT).into();
                plan.window.snd_wnd = plan.window.snd_wnd.max(IN_FLIGHT as u32);
                plan.window.max_window = plan.window.max_window.max(plan.window.snd_wnd);
            }
            plan
        })
        .collect();
    Captured { _clients: clients, plans }
}

/// Restores every plan, timing only the restores; then undoes them silently.
fn restore_all(plans: &[RestorePlan], iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut socks = Vec::with_capacity(plans.len());
    for _ in 0..iters {
        let t = Instant::now();
        for plan in plans {
            socks.push(repair::restore(plan).unwrap_or_else(|e| panic!("restore {}: {e}", plan.remote)));
        }
        total += t.elapsed();
        for s in socks.drain(..) {
            repair::vanish(&s).expect("vanish");
        }
    }
    total
}

fn restore(c: &mut Criterion) {
    let net = match PrivateNet::enter() {
        Ok(net) => net,
        Err(why) => {
            eprintln!("restore: skipped: {why}");
            return;
        }
    };
    let max = BATCHES[BATCHES.len() - 1];
    let kinds = [("idle", capture(max, false)), ("active", capture(max, true))];
    // What is measured restores the connection as planned.
    for (kind, cap) in &kinds {
        let plan = &cap.plans[0];
        eprintln!(
            "restore: {kind} plans: {:?}, {} B in flight, {} B unread",
            plan.options,
            plan.send_queue.len(),
            plan.recv_queue.len()
        );
        let s = repair::restore(plan).expect("restore");
        let got = repair::checkpoint(&s).expect("checkpoint of the restored socket");
        assert_eq!(
            (got.state, got.recv_queue.len(), got.send_queue.len(), got.snd_una, got.rcv_nxt),
            (plan.state, plan.recv_queue.len(), plan.send_queue.len(), plan.snd_una, plan.rcv_nxt),
            "{kind}"
        );
        repair::vanish(&s).expect("vanish");
    }

    let mut g = c.benchmark_group("restore");
    for (kind, cap) in &kinds {
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{kind}/1"), |b| b.iter_custom(|iters| restore_all(&cap.plans[..1], iters)));
    }
    // Milliseconds per batch: few samples, each of the same iteration count.
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    for (kind, cap) in &kinds {
        for n in BATCHES {
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("{kind}/{n}"), |b| b.iter_custom(|iters| restore_all(&cap.plans[..n], iters)));
        }
    }
    g.finish();
    drop(kinds);
    drop(net);
}

criterion_group!(benches, restore);
criterion_main!(benches);
