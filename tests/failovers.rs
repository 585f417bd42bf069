//! End-to-end tests of reintegration and repeated failovers (issue 4): the `primary` and `backup`
//! binaries in a `scripts/testbed --pair` bed, nginx as the origin. After each takeover the dead node is
//! restarted as a spare that joins the survivor, so roles move between the two hosts; the load runs
//! through every failover and every body is checked.
//!
//! Needs root, nginx, curl (installed by `scripts/test`) and the workspace's binaries built. Timings are
//! printed, never asserted.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use std::time::{Duration, Instant};
use understudy_tests::harness::{Capture, Proc, count_matching, packets_after, unique_id, wait_until};
use understudy_tests::load::{self, Load};
use understudy_tests::pair::{Pair, PairOptions, VIP};
use understudy_tests::pattern;

const MB: u64 = 1_000_000;
/// Sizes of the keep-alive load's files: mostly small, some large.
const SIZES: [u64; 6] = [1_000, 20_000, 150_000, 5, 400_000, 60_000];

/// A rate-limited curl download of `big.bin` through the VIP, to `out` in the scratch directory.
fn start_download(pair: &Pair, name: &str, rate: &str) -> Result<Proc> {
    let out = pair.dir.0.join(format!("{name}.out"));
    let out_s = out.to_str().context("path")?;
    let url = format!("http://{VIP}/big.bin");
    let args = ["curl", "-sS", "--limit-rate", rate, "-o", out_s, "-w", "%{num_connects} %{http_code}\n", &url];
    pair.tb.spawn(name, "client", &args, &pair.dir.0.join(format!("{name}.log")))
}

/// Waits for a download and checks it: exit 0, one connection, status 200, sha256 of the original.
fn finish_download(pair: &Pair, mut curl: Proc, name: &str, sha: &str) -> Result<()> {
    let status = curl.wait(Duration::from_secs(300))?;
    let log = curl.log_text();
    ensure!(status.success(), "{name} failed ({status}): {log}\n{}", pair.logs_tail());
    let summary = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    ensure!(summary == "1 200", "{name}: curl says `{summary}` (connections, status); want `1 200`");
    let got = Pair::sha256(&pair.dir.0.join(format!("{name}.out")))?;
    ensure!(got == sha, "{name}: sha256 {got} differs from the original {sha}");
    Ok(())
}

/// After some more progress, stops the load and checks everything the clients saw: no load error, both
/// downloads complete and intact, no reset from the VIP in the client's capture (none dropped).
fn finish_load(
    pair: &Pair,
    load: Load,
    downloads: [Proc; 2],
    sha: &str,
    capture: Capture,
    pcap: &std::path::Path,
) -> Result<load::LoadReport> {
    load.wait_progress(200, Duration::from_secs(60))?;
    let report = load.stop()?;
    let errors = report.errors();
    ensure!(errors.is_empty(), "{} load errors:\n{}\n{}", errors.len(), errors.join("\n"), pair.logs_tail());
    for (i, d) in downloads.into_iter().enumerate() {
        finish_download(pair, d, &format!("dl{i}"), sha)?;
    }
    let stats = capture.stop()?;
    let (resets, lines) = count_matching(pcap, &format!("src host {VIP} and tcp[tcpflags] & tcp-rst != 0"))?;
    ensure!(resets == 0, "{resets} resets from the VIP reached the client:\n{lines}");
    ensure!(stats.dropped_by_kernel == 0, "the client capture dropped packets: {stats:?}");
    Ok(report)
}

/// A protected pair whose origin serves the load's files and `big.bin` of `big` bytes; its sha256.
fn pair_with_files(tag: char, big: u64) -> Result<(Pair, String)> {
    let pair = Pair::up(&unique_id(tag), &PairOptions::default(), |www| {
        load::write_files(www, &SIZES)?;
        pattern::write_file(&www.join("big.bin"), 7, big)?;
        Ok(())
    })?;
    Ok((pair, pattern::sha256_hex(7, big)))
}

/// The latest failover record of a status.
fn last_failover(status: &Value) -> Value {
    status["failovers"].as_array().and_then(|f| f.last()).cloned().unwrap_or(Value::Null)
}

#[test]
fn five_failovers_alternating_between_hosts_under_load() -> Result<()> {
    let big = 100 * MB;
    let (mut pair, sha) = pair_with_files('f', big)?;
    // Headers only, at the client: proof that no reset from the VIP reached it.
    let pcap = pair.dir.0.join("client.pcap");
    let capture = Capture::start(&pair.tb, "client", "eth0", "tcp port 80", 96, &pcap)?;
    let load = Load::start(&pair, 64, &SIZES, Duration::from_millis(20))?;
    let mut downloads = [start_download(&pair, "dl0", "4M")?, start_download(&pair, "dl1", "4M")?];
    let mut epoch = 1;
    let mut taken = Vec::new();
    for round in 1..=5 {
        load.wait_progress(200, Duration::from_secs(60))?;
        let started = Instant::now();
        pair.kill_primary()?;
        let status = pair.wait_taken_over(Duration::from_secs(30))?;
        let f = last_failover(&status);
        let new_epoch = status["epoch"].as_u64().context("epoch")?;
        ensure!(new_epoch > epoch, "round {round}: epoch went from {epoch} to {new_epoch}");
        epoch = new_epoch;
        // Every connection open before the failure was protected: the 64 of the load and the downloads. A
        // download still running now was running at the failure (its end needs the new primary). On a
        // slow machine one can have ended before a late round; it is checked at the end like the others.
        let mut running = 0;
        for d in &mut downloads {
            running += u64::from(d.try_wait()?.is_none());
        }
        if running < 2 {
            println!("round {round}: {} of the 2 downloads had already ended", 2 - running);
        }
        let restored = f["connections_restored"].as_u64().unwrap_or(0);
        ensure!(
            restored >= 64 + running,
            "round {round}: only {restored} connections restored, with {running} downloads running: {f}\n{}",
            pair.logs_tail()
        );
        ensure!(f["connections_lost"] == 0, "round {round}: connections lost: {f}");
        pair.promoted()?;
        load.wait_progress(200, Duration::from_secs(60))?;
        pair.start_spare()?;
        let join_started = Instant::now();
        pair.wait_protected(Duration::from_secs(60))?;
        println!(
            "round {round}: {} took over (epoch {epoch}), total {} ms, {restored} restored; spare joined in {:?}; round {:?}",
            pair.primary_host,
            f["total_ms"],
            join_started.elapsed(),
            started.elapsed()
        );
        taken.push(f);
    }
    let report = finish_load(&pair, load, downloads, &sha, capture, &pcap)?;
    println!(
        "five failovers: {} requests on 64 keep-alive connections, 0 errors, slowest request {:?} ({}); 2 downloads of {} MB verified",
        report.requests(),
        report.slowest(),
        report.slowest_what(),
        big / MB
    );
    Ok(())
}

/// Reintegration under load: the primary serves 2 000 keep-alive connections unprotected (its backup
/// was killed), a spare joins (snapshot of every connection plus the stream), and the primary is
/// killed right after: every connection carries on at the new primary.
#[test]
fn a_spare_joining_under_2000_connections_protects_all_of_them() -> Result<()> {
    const CONNS: usize = 2000;
    let id = unique_id('j');
    let sizes = [1_000, 5, 20_000, 300];
    let mut pair = Pair::up(&id, &PairOptions::default(), |www| load::write_files(www, &sizes))?;
    pair.kill_backup()?;
    pair.wait_status(pair.primary_host, "the primary to serve unprotected", Duration::from_secs(10), |s| {
        s["peer"] == "none"
    })?;
    let load = Load::start(&pair, CONNS, &sizes, Duration::from_millis(1000))?;
    load.wait_progress(2 * CONNS as u64, Duration::from_secs(120))?;

    pair.start_spare()?;
    let joining = Instant::now();
    pair.wait_protected(Duration::from_secs(120))?;
    let joined = joining.elapsed();
    let status = pair.status(pair.primary_host)?;
    let protected = status["connections"]["protected"].as_u64().unwrap_or(0);
    ensure!(protected >= CONNS as u64, "{protected} of {CONNS} connections protected after the join: {status}");
    load.wait_progress(CONNS as u64, Duration::from_secs(120))?;

    pair.kill_primary()?;
    let taken = pair.wait_taken_over(Duration::from_secs(60))?;
    let f = last_failover(&taken);
    let restored = f["connections_restored"].as_u64().unwrap_or(0);
    ensure!(restored >= CONNS as u64, "only {restored} of {CONNS} connections restored: {f}\n{}", pair.logs_tail());
    pair.promoted()?;
    load.wait_progress(2 * CONNS as u64, Duration::from_secs(120))?;
    let report = load.stop()?;
    let errors = report.errors();
    ensure!(errors.is_empty(), "{} load errors, first: {:?}\n{}", errors.len(), errors.first(), pair.logs_tail());
    println!(
        "{CONNS} connections: spare joined in {joined:?}; takeover restored {restored} (restore {} ms, total {} ms); \
         {} requests, 0 errors, slowest {:?} ({})",
        f["restore_ms"],
        f["total_ms"],
        report.requests(),
        report.slowest(),
        report.slowest_what()
    );
    Ok(())
}

/// Idle keep-alive connections get their sockets staged on the standby ahead of a takeover (its `/status`
/// counts them); the takeover only takes those sockets out of repair mode, and every connection carries
/// its next request.
#[test]
fn idle_connections_staged_on_the_standby_carry_on_after_a_takeover() -> Result<()> {
    const CONNS: usize = 100;
    let id = unique_id('g');
    let sizes = [1_000, 20_000];
    let mut pair = Pair::up(&id, &PairOptions::default(), |www| load::write_files(www, &sizes))?;
    let vip = format!("{VIP}:{}", understudy_tests::pair::PORT).parse()?;
    let mut conns = Vec::with_capacity(CONNS);
    for c in 0..CONNS {
        let mut s = pair.connect_from("client", vip, Duration::from_secs(5))?;
        s.set_read_timeout(Some(load::STALL_LIMIT))?;
        let mut buf = Vec::new();
        load::get(&mut s, &mut buf, c % 2, sizes[c % 2]).with_context(|| format!("conn {c}'s first request"))?;
        conns.push((s, buf));
    }
    let staged_all = |s: &Value| s["replica"]["staged_sockets"].as_u64() >= Some(CONNS as u64);
    let standby = pair.wait_status(
        pair.backup_host(),
        "the standby to stage every idle connection",
        Duration::from_secs(30),
        staged_all,
    )?;

    pair.kill_primary()?;
    let taken = pair.wait_taken_over(Duration::from_secs(30))?;
    let f = last_failover(&taken);
    let (restored, staged) =
        (f["connections_restored"].as_u64().unwrap_or(0), f["connections_staged"].as_u64().unwrap_or(0));
    ensure!(
        restored >= CONNS as u64 && f["connections_lost"] == 0,
        "restored {restored} of {CONNS}: {f}\n{}",
        pair.logs_tail()
    );
    ensure!(
        staged >= CONNS as u64,
        "only {staged} of {CONNS} idle connections took over staged sockets: {f}\n{}",
        pair.logs_tail()
    );
    for (c, (s, buf)) in conns.iter_mut().enumerate() {
        let i = (c + 1) % 2;
        load::get(s, buf, i, sizes[i]).with_context(|| format!("conn {c}'s request after the takeover"))?;
    }
    println!(
        "{CONNS} idle connections: the standby had staged {}; the takeover restored {restored} ({staged} staged) in {} ms",
        standby["replica"]["staged_sockets"], f["restore_ms"]
    );
    Ok(())
}

/// A primary frozen (SIGSTOP) until its backup took over, then resumed: from the takeover on, its host
/// sends nothing for a VIP connection (its kernel's output lease lapsed while it was frozen, and the
/// resumed process steps down without renewing it), and it gives the VIP up. A capture at the client
/// proves the first; the old primary's exit and its interface the second.
#[test]
fn a_frozen_primary_resumed_after_the_takeover_sends_nothing_and_gives_up_the_vip() -> Result<()> {
    let (mut pair, sha) = pair_with_files('z', 60 * MB)?;
    let old_mac = pair.tb.hw_addr("server", "eth0")?;
    let old_mac = old_mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let pcap = pair.dir.0.join("client.pcap");
    let capture = Capture::start(&pair.tb, "client", "eth0", "tcp port 80", 96, &pcap)?;
    let load = Load::start(&pair, 16, &SIZES, Duration::from_millis(20))?;
    let download = start_download(&pair, "dl", "4M")?;
    load.wait_progress(200, Duration::from_secs(60))?;

    let frozen = pair.primary.as_ref().context("primary")?;
    frozen.signal(libc::SIGSTOP)?;
    let taken = pair.wait_taken_over(Duration::from_secs(30))?;
    let f = last_failover(&taken);
    // When the backup declared the primary dead: the record's end, minus the whole takeover (which
    // starts at the last sign of life), plus the detection time. The frozen kernel may send until its
    // lease runs out (the detection time after the freeze at most), never after that.
    let num = |k: &str| f[k].as_f64().with_context(|| format!("{k} in {f}"));
    let since = (num("at_unix_ms")? - num("total_ms")? + num("detection_ms")?) / 1000.0;
    load.wait_progress(200, Duration::from_secs(60))?;

    let resumed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    frozen.signal(libc::SIGCONT)?;
    let mut old = pair.primary.take().context("primary")?;
    let status = old.wait(Duration::from_secs(20))?;
    let log = old.log_text();
    ensure!(
        !status.success() && log.contains("stepped down"),
        "the resumed primary did not step down ({status}):\n{log}"
    );
    let addrs = pair.tb.exec("server", &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    ensure!(!addrs.contains(&format!("{VIP}/")), "the old primary still holds the VIP: {addrs}");
    pair.primary = pair.backup.take();
    pair.primary_host = "spare";
    load.wait_progress(200, Duration::from_secs(60))?;

    let report = load.stop()?;
    finish_download(&pair, download, "dl", &sha)?;
    capture.stop()?;
    let leaked = packets_after(&pcap, &format!("ether src {old_mac} and src host {VIP}"), since)?;
    ensure!(
        leaked.is_empty(),
        "{} packets from the frozen primary after the takeover (declared at {since:.6}, resumed at {resumed:.6}):\n{}",
        leaked.len(),
        leaked.join("\n")
    );
    let errors = report.errors();
    ensure!(errors.is_empty(), "{} load errors:\n{}", errors.len(), errors.join("\n"));
    println!(
        "frozen primary: takeover total {} ms; resumed, it stepped down; 0 packets from it after the takeover; \
         {} requests, 0 errors",
        f["total_ms"],
        report.requests()
    );
    Ok(())
}

/// Planned switchover under the failover test's load, there and back: `primary switchover` (the command
/// line, which posts `/admin/switchover`) hands every connection to the backup with no detection and no
/// fence, the old primary's process restarts as the spare and rejoins, and nothing is lost or executed
/// twice at the origin: every keep-alive request reached nginx exactly once, and the downloads were only
/// continued (`Range`), never fetched whole again.
#[test]
fn planned_switchovers_under_load_lose_nothing_and_execute_nothing_twice() -> Result<()> {
    let (mut pair, sha) = pair_with_files('s', 60 * MB)?;
    let pcap = pair.dir.0.join("client.pcap");
    let capture = Capture::start(&pair.tb, "client", "eth0", "tcp port 80", 96, &pcap)?;
    let load = Load::start(&pair, 64, &SIZES, Duration::from_millis(20))?;
    let downloads = [start_download(&pair, "dl0", "4M")?, start_download(&pair, "dl1", "4M")?];
    // Both downloads under way before the first switchover: each must be among the connections handed over.
    wait_until("both downloads to receive bytes", Duration::from_secs(30), || {
        let received = |name: &str| std::fs::metadata(pair.dir.0.join(format!("{name}.out"))).map_or(0, |m| m.len());
        Ok((received("dl0") > 0 && received("dl1") > 0).then_some(()))
    })?;
    let mut epoch = 1;
    for round in 1..=2 {
        load.wait_progress(200, Duration::from_secs(60))?;
        let from = pair.primary_host;
        let answer = pair.switchover()?;
        let status = pair.wait_status(pair.primary_host, "the backup to serve", Duration::from_secs(30), |s| {
            s["role"] == "primary"
        })?;
        let f = last_failover(&status);
        ensure!(f["reason"] == "planned switchover", "round {round}: not a planned switchover: {f}");
        ensure!(f["fencing_ms"].as_f64() == Some(0.0), "round {round}: the switchover fenced: {f}");
        let restored = f["connections_restored"].as_u64().unwrap_or(0);
        ensure!(restored >= 66, "round {round}: only {restored} connections restored: {f}\n{}", pair.logs_tail());
        ensure!(f["connections_lost"] == 0, "round {round}: connections lost: {f}");
        let new_epoch = status["epoch"].as_u64().context("epoch")?;
        ensure!(new_epoch > epoch, "round {round}: epoch went from {epoch} to {new_epoch}");
        epoch = new_epoch;
        let rejoining = Instant::now();
        pair.wait_protected(Duration::from_secs(60))?;
        println!(
            "switchover {round}: {from} -> {} in {} ms (answer {answer}); restore {} ms, {restored} restored; \
             old primary rejoined as the spare in {:?}",
            pair.primary_host,
            f["total_ms"],
            f["restore_ms"],
            rejoining.elapsed()
        );
    }
    let report = finish_load(&pair, load, downloads, &sha, capture, &pcap)?;
    // Fields: connection method uri status request_length transfer_encoding.
    let origin = pair.origin_log();
    let field = |l: &String, i: usize| l.split_whitespace().nth(i).unwrap_or("").to_string();
    let small = origin.iter().filter(|l| field(l, 2).starts_with("/f")).count() as u64;
    ensure!(
        small == report.requests(),
        "the origin served {small} keep-alive requests, the clients made {}: a request was executed twice or lost",
        report.requests()
    );
    let whole: Vec<_> = origin.iter().filter(|l| field(l, 2) == "/big.bin" && field(l, 3) == "200").collect();
    let ranges = origin.iter().filter(|l| field(l, 2) == "/big.bin" && field(l, 3) == "206").count();
    ensure!(whole.len() == 2, "the downloads were fetched whole {} times: {whole:?}", whole.len());
    println!(
        "two planned switchovers: {} requests on 64 keep-alive connections, 0 errors, each served once by the \
         origin; 2 downloads verified ({ranges} range continuations); slowest request {:?} ({})",
        report.requests(),
        report.slowest(),
        report.slowest_what()
    );
    Ok(())
}

/// Found by the fault campaign (`scripts/campaign`, SIGSTOP of the primary during handshakes): a primary
/// frozen within a second of starting to serve, while its repeated gratuitous ARP was still pending, sent
/// that announcement the moment it was resumed, after its backup had taken over. The new primary read the
/// announcement as a later takeover and stepped down too, and nobody served the VIP. A node resumed after a
/// stall must not announce the VIP from a stale timer; the new primary must serve on.
#[test]
fn a_primary_frozen_just_after_it_started_serving_does_not_announce_over_its_successor() -> Result<()> {
    let (mut pair, _) = pair_with_files('a', MB)?;
    // Protected within a few hundred ms of the primary's start: its repeated announcements are still due.
    let frozen = pair.primary.as_ref().context("primary")?;
    frozen.signal(libc::SIGSTOP)?;
    let taken = pair.wait_taken_over(Duration::from_secs(30));
    frozen.signal(libc::SIGCONT)?;
    taken?;
    let mut old = pair.primary.take().context("primary")?;
    let status = old.wait(Duration::from_secs(20))?;
    ensure!(!status.success() && old.log_text().contains("stepped down"), "the resumed primary did not step down");
    pair.primary = pair.backup.take();
    pair.primary_host = "spare";
    // The successor serves on: still primary a while after the resumed node stepped down, and answering.
    std::thread::sleep(Duration::from_millis(1500));
    if let Some(exit) = pair.primary.as_mut().context("new primary")?.try_wait()? {
        anyhow::bail!("the new primary stopped serving and exited ({exit}):\n{}", pair.logs_tail());
    }
    let s = pair.status("spare")?;
    ensure!(s["role"] == "primary", "the new primary stopped serving: {s}\n{}", pair.logs_tail());
    let code = pair.get_status("/f0.bin")?;
    ensure!(code == "200", "GET through the VIP after the resumed primary stepped down: {code}\n{}", pair.logs_tail());
    Ok(())
}
