//! End-to-end test of split brain (issue 6, part 3): the `primary` and `backup` binaries in a
//! `scripts/testbed --pair` bed, nginx as the origin. Only the replication network is cut (the spare's
//! eth1 goes down; the client network stays intact), so both nodes lose each other while both live.
//! The backup must fence, find the primary answering for the VIP, stand down and say so; the primary must
//! give the backup up and serve on unprotected; only once the primary is really gone may the backup
//! take the VIP. Two nodes must never answer for the VIP: an ARP capture at the client proves it.
//!
//! The backup's replica stopped at the cut while the primary served on, so it matches none of the
//! connections any more: the takeover restores none of them. The test asserts that an old connection
//! is refused promptly by the new primary (not left hanging), and that no reset ever came from the
//! old primary.
//!
//! Needs root, nginx, curl, tcpdump, arping (installed by `scripts/test`) and the workspace's binaries
//! built. Timings are printed, never asserted.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use understudy_tests::campaign::vip_claims;
use understudy_tests::harness::{Capture, count_matching, output, unique_id};
use understudy_tests::load::{self, Load};
use understudy_tests::pair::{PORT, Pair, PairOptions, VIP};

const SIZES: [u64; 4] = [1_000, 20_000, 5, 60_000];
/// Stand-downs the backup must have made (rechecks are 1 s apart) before the primary is killed: several
/// detection periods, and more than one fence of a partitioned primary.
const STAND_DOWNS: u64 = 3;

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// One ARP request for the VIP from the client (broadcast): the MAC that answered, if any did.
fn arping_vip(pair: &Pair) -> Result<Option<String>> {
    let out = output(&mut pair.tb.command("client", &["arping", "-b", "-c", "1", "-w", "1", "-I", "eth0", VIP]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "Broadcast reply from 10.0.0.100 [02:AA:...]  0.6ms"
    Ok(text.lines().find(|l| l.contains("reply from")).and_then(|l| {
        let start = l.find('[')? + 1;
        let end = l[start..].find(']')? + start;
        Some(l[start..end].to_ascii_lowercase())
    }))
}

/// A keep-alive connection from the client that has made one GET of `f0.bin`.
fn idle_connection(pair: &Pair) -> Result<TcpStream> {
    let vip: SocketAddr = format!("{VIP}:{PORT}").parse()?;
    let mut s = pair.connect_from("client", vip, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    get_f0(&mut s)?;
    Ok(s)
}

/// One GET of `f0.bin` (SIZES[0] bytes) on `s`, the response read in full.
fn get_f0(s: &mut TcpStream) -> Result<()> {
    write!(s, "GET /f0.bin HTTP/1.1\r\nHost: {VIP}\r\n\r\n").context("writing the request")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            load::check_head(&buf[..end + 4], SIZES[0])?;
            if (buf.len() - end - 4) as u64 >= SIZES[0] {
                return Ok(());
            }
        }
        match s.read(&mut chunk).context("reading the response")? {
            0 => bail!("closed after {} bytes", buf.len()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// How the replication network is cut (in the spare's namespace, which goes with the bed).
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The spare's replication interface goes down: the link falls silent (nothing tells TCP).
    InterfaceDown,
    /// Everything from the replication network is dropped and everything to it refused with a reset: the
    /// backup's link ends at its next heartbeat, and its rejoins are refused at once.
    LinkReset,
}

#[test]
fn silent_partition_backup_stands_down_while_the_primary_lives_and_takes_over_once_it_is_gone() -> Result<()> {
    partition_then_kill('p', Cut::InterfaceDown)
}

#[test]
fn broken_link_backup_keeps_fencing_while_it_rejoins_and_takes_over_once_the_primary_is_gone() -> Result<()> {
    partition_then_kill('q', Cut::LinkReset)
}

#[test]
fn backup_that_stood_down_over_a_live_link_clears_its_alarm_once_the_primary_speaks_again() -> Result<()> {
    // Only the primary's side of the link falls silent at the backup, for a few detection times: the
    // backup fences, finds the primary answering and stands down with its link up; the primary, which
    // still hears the backup and has nothing waiting for an ack, keeps it. Then TCP delivers again.
    let pair = Pair::up(&unique_id('r'), &PairOptions::default(), |www| load::write_files(www, &SIZES))?;
    pair.wait_protected(Duration::from_secs(20))?;
    let rule = ["INPUT", "-i", "eth1", "-p", "tcp", "--sport", "7700", "-j", "DROP"];
    let mut add = vec!["iptables", "-A"];
    add.extend(rule);
    pair.tb.exec("spare", &add)?;
    let stood = pair.wait_status("spare", "the backup to stand down", Duration::from_secs(10), |s| {
        s["alarm"]["kind"] == "stood_down"
    });
    let mut del = vec!["iptables", "-D"];
    del.extend(rule);
    pair.tb.exec("spare", &del)?;
    let stood = stood?;
    ensure!(stood["role"] == "backup" && stood["peer"] == "none", "while silent: {stood}");
    let reason = stood["alarm"]["reason"].as_str().unwrap_or("");
    ensure!(reason.contains("silence"), "alarm reason: {reason}");
    let cleared = Instant::now();
    let back = pair.wait_status("spare", "the alarm to clear", Duration::from_secs(10), |s| {
        s["alarm"].is_null() && s["peer"] == "connected"
    })?;
    ensure!(back["role"] == "backup", "the backup changed role: {back}\n{}", pair.logs_tail());
    let primary = pair.status("server")?;
    ensure!(primary["role"] == "primary", "the primary changed role: {primary}");
    println!("alarm cleared {:?} after the link delivered again", cleared.elapsed());
    Ok(())
}

fn partition_then_kill(tag: char, how: Cut) -> Result<()> {
    let mut pair = Pair::up(&unique_id(tag), &PairOptions::default(), |www| load::write_files(www, &SIZES))?;
    let primary_mac = mac_text(pair.tb.hw_addr("server", "eth0")?);
    let backup_mac = mac_text(pair.tb.hw_addr("spare", "eth0")?);
    let dir = pair.dir.0.clone();
    let arp_pcap = dir.join("client-arp.pcap");
    let arp = Capture::start(&pair.tb, "client", "eth0", "arp", 0, &arp_pcap)?;
    let tcp_pcap = dir.join("client-tcp.pcap");
    let tcp = Capture::start(&pair.tb, "client", "eth0", &format!("tcp and host {VIP}"), 96, &tcp_pcap)?;

    let mut old = (0..4).map(|_| idle_connection(&pair)).collect::<Result<Vec<_>>>()?;
    let load = Load::start(&pair, 16, &SIZES, Duration::from_millis(20))?;
    load.wait_progress(200, Duration::from_secs(30))?;

    // Cut the replication network only.
    let cut_at = unix_now();
    let cut = Instant::now();
    match how {
        Cut::InterfaceDown => pair.tb.exec("spare", &["ip", "link", "set", "eth1", "down"])?,
        Cut::LinkReset => pair.tb.exec("spare", &["sh", "-ec",
            "iptables -A INPUT -i eth1 -j DROP; iptables -A OUTPUT -o eth1 -p tcp -j REJECT --reject-with tcp-reset"])?,
    };

    let primary = pair.wait_status("server", "the primary to give its backup up", Duration::from_secs(10), |s| {
        s["peer"] == "none" && s["peer_lost"].is_object()
    })?;
    ensure!(primary["role"] == "primary", "the primary changed role: {primary}");
    let lost = &primary["peer_lost"];
    ensure!(lost["node"] == "bravo" && lost["reason"].as_str().is_some_and(|r| !r.is_empty()), "peer_lost: {lost}");
    println!("primary gave its backup up {:?} after the cut: {lost}", cut.elapsed());

    // The backup stands down again and again while the primary lives, and never takes the VIP.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answers = 0u32;
    let backup = loop {
        let s = pair.status("spare")?;
        ensure!(s["role"] == "backup", "the backup took over from a live primary: {s}\n{}", pair.logs_tail());
        if let Some(mac) = arping_vip(&pair)? {
            ensure!(mac == primary_mac, "{mac} answered for the VIP during the partition (primary {primary_mac})");
            answers += 1;
        }
        if s["alarm"]["count"].as_u64().unwrap_or(0) >= STAND_DOWNS && answers >= 3 {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "the backup did not stand down {STAND_DOWNS} times: {s}\n{}",
            pair.logs_tail()
        );
    };
    let alarm = &backup["alarm"];
    ensure!(alarm["kind"] == "stood_down", "alarm: {alarm}");
    let reason = alarm["reason"].as_str().unwrap_or("");
    ensure!(reason.contains(&primary_mac) && reason.contains("answers for the VIP"), "alarm reason: {reason}");
    let link = match how {
        Cut::InterfaceDown => "replication link: silence",
        Cut::LinkReset => "replication link: link down",
    };
    ensure!(reason.contains(link), "alarm reason: {reason} (want `{link}`)");
    ensure!(backup["peer"] == "none" && backup["protected"] == false, "the backup claims a peer: {backup}");
    let metrics = pair.metrics("spare")?;
    ensure!(metrics.contains("\nunderstudy_alarm 1\n"), "backup metrics:\n{metrics}");
    ensure!(!metrics.contains("\nunderstudy_stand_downs_total 0\n"), "backup metrics:\n{metrics}");
    ensure!(pair.metrics("server")?.contains("\nunderstudy_peers_lost_total 1\n"), "primary metrics");
    println!("backup stood down {} times in {:?}: {alarm}", alarm["count"], cut.elapsed());

    // The primary served on through the partition: no client error.
    load.wait_progress(200, Duration::from_secs(30))?;
    let report = load.stop()?;
    let errors = report.errors();
    ensure!(errors.is_empty(), "{} load errors:\n{}\n{}", errors.len(), errors.join("\n"), pair.logs_tail());
    println!("partition: {} requests, 0 errors, slowest {:?}", report.requests(), report.slowest());

    // Now the primary really dies while the partition stands: the next recheck finds the VIP silent.
    pair.kill_primary()?;
    let killed_at = unix_now();
    let killed = Instant::now();
    let taken = pair.wait_taken_over(Duration::from_secs(15))?;
    println!("backup took over {:?} after the kill", killed.elapsed());
    ensure!(taken["alarm"].is_null(), "the alarm outlived the takeover: {taken}");
    let failover = taken["failovers"].as_array().and_then(|f| f.last()).cloned().unwrap_or(Value::Null);
    ensure!(failover["connections_restored"] == 0, "connections restored from a stale replica: {failover}");
    pair.promoted()?;
    let taken_at = unix_now();

    // New connections are served, and the VIP answers with the new primary's MAC.
    for _ in 0..5 {
        let code = pair.get_status("/f1.bin")?;
        ensure!(code == "200", "a new request after the takeover: {code}\n{}", pair.logs_tail());
    }
    let mac = arping_vip(&pair)?.context("nobody answers for the VIP after the takeover")?;
    ensure!(mac == backup_mac, "{mac} answers for the VIP after the takeover (new primary {backup_mac})");

    // An old connection is refused at once by the new primary (it has no socket for it).
    for (i, s) in old.iter_mut().enumerate() {
        let started = Instant::now();
        match get_f0(s) {
            Ok(()) => bail!("old connection {i} was served by a takeover that restored nothing"),
            Err(e) => {
                let reset = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
                });
                ensure!(reset, "old connection {i} was not reset by the new primary: {e:#}\n{}", pair.logs_tail());
                println!("old connection {i}: {e:#} after {:?}", started.elapsed());
            }
        }
    }

    let arp_stats = arp.stop()?;
    let tcp_stats = tcp.stop()?;
    ensure!(arp_stats.dropped_by_kernel == 0 && tcp_stats.dropped_by_kernel == 0, "captures dropped packets");
    // Never two nodes on the VIP: before the kill only the primary claimed it, after it only the backup.
    let claims = vip_claims(&arp_pcap)?;
    for (at, mac) in &claims {
        let ok = (mac == &primary_mac && *at < killed_at) || (mac == &backup_mac && *at > cut_at);
        ensure!(ok, "{mac} claimed the VIP at {at:.3} (cut {cut_at:.3}, killed {killed_at:.3}): {claims:?}");
    }
    let in_partition = claims.iter().filter(|(at, m)| *m == primary_mac && *at > cut_at).count();
    let first_backup = claims.iter().filter(|(_, m)| *m == backup_mac).map(|(at, _)| *at).fold(f64::MAX, f64::min);
    ensure!(in_partition >= 3, "the capture holds {in_partition} answers of the primary during the partition");
    ensure!(first_backup > killed_at && first_backup <= taken_at, "the backup's first claim at {first_backup:.3}");
    let (resets, lines) =
        count_matching(&tcp_pcap, &format!("ether src {primary_mac} and tcp[tcpflags] & tcp-rst != 0"))?;
    ensure!(resets == 0, "{resets} resets from the old primary reached the client:\n{lines}");
    println!(
        "ARP: {} claims on the VIP, {in_partition} by the primary during the partition, the backup's first {:.0} ms \
         after the kill",
        claims.len(),
        (first_backup - killed_at) * 1000.0
    );
    Ok(())
}
