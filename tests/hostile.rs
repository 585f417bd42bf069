//! Hostile clients against the replicated pair (issue 6, item 5; README "Limits"): the limits hold on
//! connections a takeover restored, a client that stops reading keeps its replica within
//! `limits.replica_bytes_per_connection` and back-pressures the origin, and a flood of bogus segments
//! (bad checksums, out of window, unknown connections) changes no tracked state.
//!
//! Needs root, nginx, curl (installed by `scripts/test`) and the workspace's binaries built. Timings are
//! printed, never asserted.

use anyhow::{Context, Result, bail, ensure};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{self, MutableIpv4Packet};
use pnet_packet::tcp::{self, MutableTcpPacket, TcpFlags};
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use understudy_tests::harness::{unique_id, wait_until};
use understudy_tests::netns;
use understudy_tests::pair::{PORT, Pair, PairOptions, VIP};
use understudy_tests::pattern;

const MIB: u64 = 1 << 20;

fn vip() -> SocketAddr {
    SocketAddr::from((VIP.parse::<Ipv4Addr>().expect("VIP"), PORT))
}

/// Node flags that load `[limits]` from a file in the pair's scratch directory.
fn limits_file(dir: &std::path::Path, limits: &str) -> Result<Vec<String>> {
    let path = dir.join("limits.toml");
    fs::write(&path, format!("[limits]\n{limits}"))?;
    Ok(vec!["--config".into(), path.to_str().context("path")?.into()])
}

/// A keep-alive GET on `c`; returns the body.
fn get(c: &mut TcpStream, path: &str) -> Result<Vec<u8>> {
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())?;
    let (status, body) = response(c)?;
    ensure!(status == 200, "GET {path}: status {status}");
    Ok(body)
}

/// One response with a Content-Length body.
fn response(c: &mut TcpStream) -> Result<(u16, Vec<u8>)> {
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let mut hs = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut hs);
        if let httparse::Status::Complete(n) = r.parse(&buf)? {
            let status = r.code.unwrap_or(0);
            let len: usize = r
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < n + len {
                let got = c.read(&mut chunk)?;
                ensure!(got > 0, "closed inside a body");
                buf.extend_from_slice(&chunk[..got]);
            }
            return Ok((status, buf[n..n + len].to_vec()));
        }
        let got = c.read(&mut chunk).context("reading a response")?;
        ensure!(got > 0, "closed before a response ({} bytes)", buf.len());
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// True once the peer closed `c` (EOF or reset) within `timeout`.
fn closed_within(c: &mut TcpStream, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        c.set_read_timeout(Some(Duration::from_millis(200)))?;
        match c.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

fn replica(status: &Value) -> Result<(u64, u64, String)> {
    let r = &status["replica"];
    let n = |k: &str| r[k].as_u64().with_context(|| format!("replica.{k} in {status}"));
    Ok((n("connections")?, n("largest_connection_bytes")?, r["digest"].as_str().context("digest")?.to_owned()))
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

// ------------------------------------------------------------------------------------------------

#[test]
fn limits_hold_on_connections_a_takeover_restored() -> Result<()> {
    let id = unique_id('h');
    let scratch = understudy_tests::pair::Scratch::new(&format!("{id}-limits"))?;
    let opts = PairOptions {
        node_flags: limits_file(
            &scratch.0,
            "max_connections = 3\nheader_read_timeout = \"2s\"\nidle_timeout = \"8s\"\n\
             body_read_timeout = \"2s\"\nbody_min_rate = 100\n",
        )?,
        ..PairOptions::default()
    };
    let mut pair = Pair::up(&id, &opts, |www| {
        fs::write(www.join("ok.txt"), "ok\n")?;
        fs::create_dir_all(www.join("up"))?;
        Ok(())
    })?;
    let connect = |pair: &Pair| pair.connect_from("client", vip(), Duration::from_secs(5));
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut c = connect(&pair)?;
        ensure!(get(&mut c, "/ok.txt")? == b"ok\n");
        conns.push(c);
    }
    // The fourth is refused with a 503 on the primary, through the gate like any reply.
    let refused = |pair: &Pair| -> Result<()> {
        let mut c = connect(pair)?;
        c.write_all(b"GET /ok.txt HTTP/1.1\r\nHost: t\r\n\r\n")?;
        let (status, body) = response(&mut c)?;
        ensure!(status == 503, "status {status}: {}", String::from_utf8_lossy(&body));
        ensure!(closed_within(&mut c, Duration::from_secs(10))?, "refused connection left open");
        Ok(())
    };
    refused(&pair)?;
    let metrics = pair.metrics(pair.primary_host)?;
    assert_eq!(metric(&metrics, "understudy_limit_hits_total{limit=\"max_connections\"}"), Some(1.0), "{metrics}");

    pair.kill_primary()?;
    let failover = pair.wait_taken_over(Duration::from_secs(20))?;
    pair.promoted()?;
    println!("takeover: {failover}");
    // The three restored connections hold their places: a new one is still refused.
    refused(&pair)?;
    for c in &mut conns {
        ensure!(get(c, "/ok.txt")? == b"ok\n", "a restored connection stopped serving");
    }
    let [mut trickle, mut slow_head, mut idle] = <[TcpStream; 3]>::try_from(conns).expect("three");

    // Restored connection 1: a request body trickled below the minimum rate gets 408 and close.
    trickle.write_all(b"PUT /up/trickle.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")?;
    let t = Instant::now();
    let status = loop {
        ensure!(t.elapsed() < Duration::from_secs(60), "a trickled body on a restored connection was never cut");
        let _ = trickle.write_all(b"x");
        trickle.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut peek = [0u8; 1];
        match trickle.peek(&mut peek) {
            Ok(_) => break response(&mut trickle)?.0,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => bail!("reading the answer to the trickled body: {e}"),
        }
    };
    assert_eq!(status, 408);
    assert!(closed_within(&mut trickle, Duration::from_secs(10))?, "restored connection left open after 408");
    println!("trickled body on a restored connection cut after {:?}", t.elapsed());

    // Restored connection 2: half a request head is cut at the header timeout.
    slow_head.write_all(b"GET /ok.txt HTTP/1.1\r\nHo")?;
    let t = Instant::now();
    assert!(closed_within(&mut slow_head, Duration::from_secs(20))?, "slow head on a restored connection not cut");
    println!("slow head on a restored connection cut after {:?}", t.elapsed());

    // Restored connection 3: closed at the idle timeout.
    let t = Instant::now();
    assert!(closed_within(&mut idle, Duration::from_secs(30))?, "idle restored connection never closed");
    println!("idle restored connection closed after {:?} (idle timeout 8 s)", t.elapsed());

    // Their places are free again.
    let mut c = wait_until("a place to free", Duration::from_secs(10), || {
        let mut c = connect(&pair)?;
        c.write_all(b"GET /ok.txt HTTP/1.1\r\nHost: t\r\n\r\n")?;
        Ok((response(&mut c)?.0 == 200).then_some(c))
    })?;
    ensure!(get(&mut c, "/ok.txt")? == b"ok\n");
    let status = pair.status(pair.primary_host)?;
    let limits = &status["limits"];
    println!("limit hits on the new primary: {limits}");
    assert!(limits["max_connections"].as_u64() >= Some(1), "{status}");
    assert_eq!(limits["body_read_timeout"].as_u64(), Some(1), "{status}");
    assert!(limits["header_read_timeout"].as_u64() >= Some(1), "{status}");
    assert!(limits["idle_timeout"].as_u64() >= Some(1), "{status}");
    Ok(())
}

#[test]
fn client_that_stops_reading_keeps_its_replica_within_the_bound_and_the_origin_waits() -> Result<()> {
    let id = unique_id('r');
    let len = 64 * MIB;
    let mut sha = String::new();
    let pair = Pair::up(&id, &PairOptions::default(), |www| {
        sha = pattern::write_file(&www.join("big.bin"), 11, len)?;
        Ok(())
    })?;
    let mut c = pair.connect_from("client", vip(), Duration::from_secs(5))?;
    // A small receive buffer: what the client's kernel takes in is not the proxy's to hold.
    socket_rcvbuf(&c, 64 * 1024)?;
    c.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")?;

    // Nothing is read: the replica grows, then stays put.
    let (mut last, mut since) = (u64::MAX, Instant::now());
    let settled = wait_until("the stalled connection's replica to settle", Duration::from_secs(60), || {
        let (_, largest, _) = replica(&pair.status(pair.backup_host())?)?;
        if largest != last {
            (last, since) = (largest, Instant::now());
        }
        Ok((largest > 0 && since.elapsed() >= Duration::from_secs(2)).then_some(largest))
    })?;
    let (_, primary_largest, _) = replica(&pair.status(pair.primary_host)?)?;
    let read_upstream = |pair: &Pair| -> Result<f64> {
        let m = pair.metrics(pair.primary_host)?;
        metric(&m, "understudy_upstream_bytes_total{direction=\"received\"}").context("upstream bytes metric")
    };
    let upstream = read_upstream(&pair)?;
    std::thread::sleep(Duration::from_secs(2));
    let upstream_later = read_upstream(&pair)?;
    println!(
        "stalled reader: backup replica {settled} B, primary's {primary_largest} B (bound {} B); read from the \
         origin {upstream} B, 2 s later {upstream_later} B, of {len}",
        MIB
    );
    println!("{}", pair.tb.exec(pair.primary_host, &["ss", "-tnmi", "sport = :80"])?);
    // Up to three 64 KiB buffers in flight (a reply-log append, hyper's on each side), plus the socket's
    // unsent bytes (an eighth of the bound, and one write beyond it) and what the log ran ahead of the
    // socket in the second it filled (64 KiB and what it took): about half the bound, never the whole.
    let slack = 192 * 1024;
    assert!(settled <= MIB / 2 + slack, "the backup holds {settled} bytes for a stalled connection");
    assert!(primary_largest <= MIB / 2 + slack, "the primary holds {primary_largest} bytes for it");
    assert_eq!(upstream, upstream_later, "the proxy kept reading from the origin for a stalled client");
    assert!(upstream < (len / 4) as f64, "the proxy read {upstream} bytes of the origin's {len} for a stalled client");

    // The client reads again: the whole body arrives intact.
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut head = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut body = 0u64;
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    while body < len {
        let n = c.read(&mut chunk)?;
        ensure!(n > 0, "closed after {body} body bytes");
        let mut data = &chunk[..n];
        if head.is_empty() || !head.ends_with(b"\r\n\r\n") {
            let mut i = 0;
            while i < data.len() && !head.ends_with(b"\r\n\r\n") {
                head.push(data[i]);
                i += 1;
            }
            data = &data[i..];
        }
        sha2::Digest::update(&mut hasher, data);
        body += data.len() as u64;
    }
    assert_eq!(hex::encode(sha2::Digest::finalize(hasher)), sha, "body differs");
    Ok(())
}

fn socket_rcvbuf(c: &TcpStream, bytes: libc::c_int) -> Result<()> {
    // SAFETY: setsockopt on a socket we own, with a c_int value.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The bogus segment flood

/// The client's next sequence number and the next it expects, read with `TCP_REPAIR` (root) and left
/// at once.
fn client_seqs(c: &TcpStream) -> Result<(u32, u32)> {
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let fd = c.as_raw_fd();
    let set = |opt: libc::c_int, v: libc::c_int| -> Result<()> {
        // SAFETY: setsockopt on a socket we own, with a c_int value.
        let rc = unsafe {
            libc::setsockopt(fd, libc::IPPROTO_TCP, opt, (&raw const v).cast(), std::mem::size_of::<libc::c_int>() as _)
        };
        ensure!(rc == 0, "setsockopt {opt}: {}", std::io::Error::last_os_error());
        Ok(())
    };
    let seq = |queue: libc::c_int| -> Result<u32> {
        set(libc::TCP_REPAIR_QUEUE, queue)?;
        let mut v: u32 = 0;
        let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: getsockopt into a u32 we own, its size passed.
        let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, (&raw mut v).cast(), &mut len) };
        ensure!(rc == 0, "TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
        Ok(v)
    };
    set(libc::TCP_REPAIR, 1)?;
    let read = seq(TCP_SEND_QUEUE).and_then(|snd| Ok((snd, seq(TCP_RECV_QUEUE)?)));
    // TCP_REPAIR_OFF_NO_WP: leave repair mode without a window probe.
    set(libc::TCP_REPAIR, -1)?;
    read
}

/// An IPv4 TCP segment; `good_checksum` false gives it a wrong TCP checksum.
#[allow(clippy::too_many_arguments)]
fn segment(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
    good_checksum: bool,
) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + 20 + payload.len()];
    {
        let mut t = MutableTcpPacket::new(&mut buf[20..]).expect("tcp buffer");
        t.set_source(src.port());
        t.set_destination(dst.port());
        t.set_sequence(seq);
        t.set_acknowledgement(ack);
        t.set_data_offset(5);
        t.set_flags(flags);
        t.set_window(502);
        t.set_payload(payload);
        let sum = tcp::ipv4_checksum(&t.to_immutable(), src.ip(), dst.ip());
        t.set_checksum(if good_checksum { sum } else { sum ^ 0x5a5a });
    }
    let total = buf.len() as u16;
    let mut ip = MutableIpv4Packet::new(&mut buf).expect("ip buffer");
    ip.set_version(4);
    ip.set_header_length(5);
    ip.set_total_length(total);
    ip.set_ttl(64);
    ip.set_identification(seq as u16);
    ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
    ip.set_source(*src.ip());
    ip.set_destination(*dst.ip());
    let sum = ipv4::checksum(&ip.to_immutable());
    ip.set_checksum(sum);
    buf
}

/// The flood against the live connection `live` (client side `client`, with its sequence numbers) and
/// against unknown connections from the same client address. Returns the segments sent.
fn flood(client: SocketAddrV4, (snd_nxt, rcv_nxt): (u32, u32), rounds: u32) -> Result<u64> {
    let server = SocketAddrV4::new(VIP.parse()?, PORT);
    // SAFETY: a raw IPv4 socket (IPPROTO_RAW: we write the IP header); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(*server.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let evil = b"GET /evil HTTP/1.1\r\nHost: t\r\n\r\n";
    let (ack, psh, rst, syn, fin) = (TcpFlags::ACK, TcpFlags::PSH, TcpFlags::RST, TcpFlags::SYN, TcpFlags::FIN);
    let mut sent = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..rounds {
        let far = 1u32 << 31;
        let mut segs = vec![
            // The live connection: in-window data with a bad checksum (it would be a request).
            segment(client, server, snd_nxt, rcv_nxt, ack | psh, evil, false),
            // Out of window (half the sequence space away), good checksum.
            segment(client, server, snd_nxt.wrapping_add(far), rcv_nxt, ack | psh, evil, true),
            segment(client, server, snd_nxt.wrapping_sub(100_000), rcv_nxt, ack | psh, evil, true),
            // Acknowledging bytes never sent.
            segment(client, server, snd_nxt, rcv_nxt.wrapping_add(1 << 30), ack, b"", true),
            // A blind reset and a blind SYN out of window, and a reset with a bad checksum at the exact seq.
            segment(client, server, snd_nxt.wrapping_add(far), 0, rst, b"", true),
            segment(client, server, snd_nxt.wrapping_add(far), 0, syn, b"", true),
            segment(client, server, snd_nxt, rcv_nxt, rst | ack, b"", false),
            // FIN out of window.
            segment(client, server, snd_nxt.wrapping_add(far), rcv_nxt, fin | ack, b"", true),
        ];
        // Unknown connections: other ports of the same client, every kind of segment.
        for flags in [0, ack, rst, rst | ack, syn | ack, fin | ack, ack | psh, fin, syn | fin, 0xff] {
            let port = 20_000 + (next() % 30_000) as u16;
            let from = SocketAddrV4::new(*client.ip(), if port == client.port() { port + 1 } else { port });
            let (seq, acknowledged) = (next() as u32, next() as u32);
            segs.push(segment(from, server, seq, acknowledged, flags, evil, true));
            segs.push(segment(from, server, seq, acknowledged, flags, evil, false));
        }
        for s in &segs {
            // SAFETY: sendto on our raw socket with a buffer and a sockaddr_in we own.
            let n = unsafe {
                libc::sendto(
                    fd,
                    s.as_ptr().cast(),
                    s.len(),
                    0,
                    (&raw const dst).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: closing the socket opened above.
                unsafe { libc::close(fd) };
                bail!("sendto: {e}");
            }
            sent += 1;
        }
    }
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    Ok(sent)
}

/// Both nodes' replica summaries, once they agree and hold still for a second.
fn settled_replicas(pair: &Pair, what: &str) -> Result<((u64, String), (u64, String))> {
    let mut last: Option<(String, Instant)> = None;
    wait_until(what, Duration::from_secs(30), || {
        let (pn, _, pd) = replica(&pair.status(pair.primary_host)?)?;
        let (bn, _, bd) = replica(&pair.status(pair.backup_host())?)?;
        let key = format!("{pn} {pd} {bn} {bd}");
        let still = match &last {
            Some((k, since)) if *k == key => since.elapsed() >= Duration::from_secs(1),
            _ => {
                last = Some((key, Instant::now()));
                false
            }
        };
        Ok((still && pd == bd && pn == bn).then(|| ((pn, pd.clone()), (bn, bd.clone()))))
    })
}

#[test]
fn bogus_segment_flood_changes_no_tracked_state_and_a_takeover_right_after_continues_the_connection() -> Result<()> {
    let id = unique_id('x');
    let mut pair = Pair::up(&id, &PairOptions::default(), |www| {
        fs::write(www.join("ok.txt"), "ok\n")?;
        Ok(())
    })?;
    let mut live = pair.connect_from("client", vip(), Duration::from_secs(5))?;
    ensure!(get(&mut live, "/ok.txt")? == b"ok\n");
    let client = match live.local_addr()? {
        SocketAddr::V4(a) => a,
        other => bail!("client address {other}"),
    };
    let (before_p, before_b) = settled_replicas(&pair, "the replicas to settle before the flood")?;
    assert_eq!(before_b.0, 1, "the live connection alone is tracked");
    let gate_before = pair.metrics(pair.primary_host)?;

    let seqs = client_seqs(&live)?;
    let t = Instant::now();
    let sent = netns::in_ns(&pair.tb.ns("client"), move || flood(client, seqs, 200))?;
    println!("flood: {sent} segments in {:?}", t.elapsed());
    let gate_after = pair.metrics(pair.primary_host)?;
    let inbound = "understudy_gate_packets_total{queue=\"inbound\"}";
    println!("gate inbound verdicts {:?} -> {:?}", metric(&gate_before, inbound), metric(&gate_after, inbound));

    let (after_p, after_b) = settled_replicas(&pair, "the replicas to settle after the flood")?;
    assert_eq!(after_b, before_b, "the backup's replica changed under the flood");
    assert_eq!(after_p, before_p, "the primary's table changed under the flood");
    assert_eq!(seqs, client_seqs(&live)?, "the live connection's own state moved");
    ensure!(get(&mut live, "/ok.txt")? == b"ok\n", "the live connection stopped serving after the flood");

    // Again, and the primary dies right after: the backup continues the live connection.
    settled_replicas(&pair, "the replicas to settle before the second flood")?;
    let seqs = client_seqs(&live)?;
    let sent = netns::in_ns(&pair.tb.ns("client"), move || flood(client, seqs, 100))?;
    pair.kill_primary()?;
    let failover = pair.wait_taken_over(Duration::from_secs(20))?;
    pair.promoted()?;
    println!("second flood of {sent} segments, then takeover: {failover}");
    ensure!(get(&mut live, "/ok.txt")? == b"ok\n", "the live connection did not survive the takeover");
    let restored = failover["failovers"][0]["connections_restored"].as_u64();
    assert_eq!(restored, Some(1), "{failover}");
    Ok(())
}
