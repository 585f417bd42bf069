//! End-to-end tests of the replicated pair (issue 3): the `primary` and `backup` binaries in a
//! `scripts/testbed --pair` bed, nginx as the origin, curl as the clients, tcpdump at the client.
//! A primary failure (power cut: every interface down; or `kill -9` of its process) mid-transfer must
//! be invisible to clients: same TCP connection, byte-identical bodies, no reset.
//!
//! Needs root, nginx, curl, tcpdump (installed by `scripts/test`) and the workspace's binaries built
//! (`cargo build --workspace`). Timings are printed, never asserted.

use anyhow::{Context, Result, ensure};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};
use understudy_tests::harness::{Capture, Proc, count_matching, unique_id, wait_until};
use understudy_tests::pair::{Pair, PairOptions, VIP, read_offset};
use understudy_tests::pattern;

const MB: u64 = 1_000_000;

/// curl's `-w '%{num_connects} %{http_code}\n'` summary: the last line of its log (lines before it may
/// come from the test bed's `exec`).
fn curl_summary(log: &str) -> (&str, &str) {
    let mut w = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").split_whitespace();
    (w.next().unwrap_or(""), w.next().unwrap_or(""))
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// How the primary fails.
#[derive(Clone, Copy, Debug)]
enum Failure {
    PowerCut,
    Kill,
}

/// A rate-limited download through the VIP; the primary fails at ~40 %.
fn download_survives(tag: char, failure: Failure) -> Result<()> {
    let id = unique_id(tag);
    let len = 200 * MB;
    let mut sha = String::new();
    let mut pair = Pair::up(&id, &PairOptions::default(), |www| {
        sha = pattern::write_file(&www.join("big.bin"), 7, len)?;
        fs::write(www.join("small.txt"), "hello\n")?;
        Ok(())
    })?;
    let dir = pair.dir.0.clone();
    let got = dir.join("got.bin");
    let capture =
        Capture::start(&pair.tb, "client", "eth0", &format!("tcp and host {VIP}"), 96, &dir.join("client.pcap"))?;
    let url = format!("http://{VIP}/big.bin");
    let got_s = got.to_str().context("path")?;
    let args = ["curl", "-sS", "--limit-rate", "40M", "-o", got_s, "-w", "%{num_connects} %{http_code}\n", &url];
    let mut curl = pair.tb.spawn("curl download", "client", &args, &dir.join("curl.log"))?;

    // Watch progress; fail the primary at 40 %; record the largest stall.
    let started = Instant::now();
    let (mut last_len, mut last_change, mut largest_gap) = (0u64, Instant::now(), Duration::ZERO);
    let mut failed_at = None;
    let mut new_conns: Option<Proc> = None;
    let status = loop {
        if let Some(status) = curl.try_wait()? {
            break status;
        }
        let now_len = file_len(&got);
        let now = Instant::now();
        if now_len != last_len {
            if failed_at.is_some() {
                largest_gap = largest_gap.max(now - last_change);
            }
            last_len = now_len;
            last_change = now;
        }
        if failed_at.is_none() && now_len >= len * 4 / 10 {
            match failure {
                Failure::PowerCut => pair.power_cut_primary()?,
                Failure::Kill => pair.kill_primary()?,
            }
            failed_at = Some(now);
            println!("{failure:?} at {} MB after {:?}", now_len / MB, started.elapsed());
            // New connections during the takeover: they must succeed once it completes.
            let small = format!("http://{VIP}/small.txt");
            let script = format!(
                "for i in 1 2 3 4 5; do curl -sS --max-time 20 -o /dev/null -w '%{{http_code}}\\n' {small} || echo fail; done"
            );
            new_conns =
                Some(pair.tb.spawn("new connections", "client", &["sh", "-c", &script], &dir.join("new.log"))?);
        }
        ensure!(started.elapsed() < Duration::from_secs(180), "download did not finish in 180 s\n{}", pair.logs_tail());
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = fs::read_to_string(dir.join("curl.log"))?;
    ensure!(status.success(), "curl failed ({status}): {out}\n{}", pair.logs_tail());
    ensure!(failed_at.is_some(), "the download finished before the failure was injected");
    let (connects, code) = curl_summary(&out);
    ensure!(code == "200", "status {code}");
    ensure!(connects == "1", "curl opened {connects} connections");
    ensure!(file_len(&got) == len, "got {} bytes of {len}", file_len(&got));
    ensure!(Pair::sha256(&got)? == sha, "sha256 of the download differs from the original");

    // After the takeover: new connections were answered.
    if let Some(mut p) = new_conns {
        p.wait(Duration::from_secs(120))?;
        let codes = fs::read_to_string(dir.join("new.log"))?;
        ensure!(codes.lines().count() == 5 && codes.lines().all(|l| l == "200"), "new connections: {codes}");
    }
    let after = pair.client(&["curl", "-sS", "--max-time", "10", &format!("http://{VIP}/small.txt")])?;
    ensure!(after == "hello\n", "request after the takeover: {after:?}");

    let stats = capture.stop()?;
    let pcap = dir.join("client.pcap");
    let (_, syn_lines) =
        count_matching(&pcap, &format!("dst host {VIP} and tcp[tcpflags] & tcp-syn != 0 and dst port 80"))?;
    let (rsts, rst_lines) = count_matching(&pcap, "tcp[tcpflags] & tcp-rst != 0")?;
    ensure!(rsts == 0, "{rsts} resets seen at the client:\n{rst_lines}");
    // One connection each: the download, the new ones, and the final request (a SYN the outage dropped
    // is retransmitted from the same port, so ports are counted, not SYNs).
    let ports: std::collections::BTreeSet<&str> =
        syn_lines.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    ensure!(ports.len() == 1 + 5 + 1, "{} connections at the client (want 7):\n{syn_lines}", ports.len());
    if matches!(failure, Failure::Kill) {
        // No FIN from the VIP before the client's own FIN on the download connection.
        let (lines, text) =
            count_matching(&pcap, &format!("tcp[tcpflags] & tcp-fin != 0 and port {}", download_port(&pcap)?))?;
        let first = text.lines().next().unwrap_or("");
        ensure!(lines == 0 || !first.contains(&format!("{VIP}.80 >")), "the VIP sent the first FIN: {first}");
    }

    let status = pair.status("spare")?;
    let f = &status["failovers"][0];
    println!(
        "{failure:?}: detection {} ms, fencing {} ms, restore {} ms, total {} ms, connections {}; \
         largest client stall {:?}; capture {} packets ({} dropped)",
        f["detection_ms"],
        f["fencing_ms"],
        f["restore_ms"],
        f["total_ms"],
        f["connections_restored"],
        largest_gap,
        stats.captured,
        stats.dropped_by_kernel
    );
    Ok(())
}

/// The client port of the first connection to the VIP in a capture.
fn download_port(pcap: &Path) -> Result<String> {
    let (_, text) = count_matching(pcap, &format!("dst host {VIP} and tcp[tcpflags] & tcp-syn != 0"))?;
    let line = text.lines().next().context("no SYN in the capture")?;
    // "12:00:00.000000 IP 10.0.0.1.41234 > 10.0.0.100.80: Flags [S], ..."
    let src = line.split_whitespace().nth(2).context("capture line")?;
    Ok(src.rsplit('.').next().unwrap_or_default().to_string())
}

#[test]
fn download_200mb_survives_a_power_cut_of_the_primary() -> Result<()> {
    download_survives('p', Failure::PowerCut)
}

#[test]
fn download_200mb_survives_kill_9_of_the_primary_with_no_fin_or_rst() -> Result<()> {
    download_survives('k', Failure::Kill)
}

/// 64 keep-alive clients doing sequential requests of varied sizes across a failover.
#[test]
fn sixty_four_keep_alive_clients_see_no_error_across_a_failover() -> Result<()> {
    let id = unique_id('a');
    let sizes: Vec<u64> = vec![1_000, 10_000, 100_000, 700_000, 2_000_000, 50, 300_000];
    let mut pair = Pair::up(&id, &PairOptions::default(), |www| {
        for (i, &n) in sizes.iter().enumerate() {
            pattern::write_file(&www.join(format!("f{i}.bin")), 100 + i as u64, n)?;
        }
        Ok(())
    })?;
    let dir = pair.dir.0.clone();
    let clients = 64;
    let per_client = 12;
    // One shell starts every client, so the harness's own process spawning does not load the host
    // while the pair serves; each client's exit status goes to its `.rc` file.
    let mut script = String::new();
    for c in 0..clients {
        let urls: Vec<String> =
            (0..per_client).map(|j| format!("'http://{VIP}/f{}.bin'", (c + j) % sizes.len())).collect();
        let out = dir.join(format!("c{c}.out")).display().to_string();
        script.push_str(&format!(
            "(curl -sS --limit-rate 1M -w '%{{num_connects}} %{{http_code}}\\n' {} > {out} 2> {out}.err; echo $? > {out}.rc) &\n",
            urls.join(" ")
        ));
    }
    script.push_str("wait\n");
    let mut all = pair.tb.spawn("clients", "client", &["sh", "-c", &script], &dir.join("clients.log"))?;
    // Kill once every client is mid-way: each has received at least one byte.
    wait_until("every client to be receiving", Duration::from_secs(60), || {
        Ok((0..clients).all(|c| file_len(&dir.join(format!("c{c}.out"))) > 0).then_some(()))
    })?;
    // The failover of a protected pair. Under this load on a 2-core host the primary may give its backup
    // up as silent (a known limitation, see the README); the backup then re-joins with a snapshot of every
    // connection, and the kill waits for that.
    let before = pair.status("server")?;
    if before["peer"] != "connected" {
        println!("the pair was unprotected before the kill ({}); waiting for the re-join", before["peer_lost"]);
    }
    pair.wait_protected(Duration::from_secs(30))?;
    pair.kill_primary()?;
    let taken = pair.wait_taken_over(Duration::from_secs(30))?;
    all.wait(Duration::from_secs(180))?;
    let mut errors = Vec::new();
    for c in 0..clients {
        let out = fs::read(dir.join(format!("c{c}.out")))?;
        let err = fs::read_to_string(dir.join(format!("c{c}.out.err"))).unwrap_or_default();
        let rc = fs::read_to_string(dir.join(format!("c{c}.out.rc"))).unwrap_or_default();
        if rc.trim() != "0" {
            errors.push(format!("client {c}: exit {} {err}", rc.trim()));
            continue;
        }
        // Bodies then the -w lines are interleaved: body j, then its line. Walk them in order.
        let mut pos = 0usize;
        let mut connects = 0;
        for j in 0..per_client {
            let i = (c + j) % sizes.len();
            let n = sizes[i] as usize;
            let body = &out[pos..(pos + n).min(out.len())];
            if body.len() != n || pattern::first_mismatch(100 + i as u64, 0, body).is_some() {
                errors.push(format!("client {c} request {j}: body of f{i}.bin wrong"));
                break;
            }
            pos += n;
            let end = out[pos..].iter().position(|&b| b == b'\n').map(|e| pos + e).unwrap_or(out.len());
            let line = String::from_utf8_lossy(&out[pos..end]).to_string();
            pos = end + 1;
            let mut w = line.split_whitespace();
            connects += w.next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(99);
            if w.next() != Some("200") {
                errors.push(format!("client {c} request {j}: {line}"));
            }
        }
        if connects != 1 {
            errors.push(format!("client {c}: {connects} connections"));
        }
    }
    ensure!(errors.is_empty(), "{} errors:\n{}\n{}", errors.len(), errors.join("\n"), pair.logs_tail());
    println!("64 keep-alive clients: 0 errors; failover {}", taken["failovers"][0]);
    Ok(())
}

/// The backup dies under load: the primary drops it and serves on, unprotected; clients see nothing.
#[test]
fn backup_killed_under_load_leaves_clients_unharmed_and_primary_unprotected() -> Result<()> {
    let id = unique_id('b');
    let len = 50 * MB;
    let mut sha = String::new();
    let mut pair = Pair::up(&id, &PairOptions::default(), |www| {
        sha = pattern::write_file(&www.join("big.bin"), 9, len)?;
        Ok(())
    })?;
    let dir = pair.dir.0.clone();
    let got = dir.join("got.bin");
    let url = format!("http://{VIP}/big.bin");
    let args = ["curl", "-sS", "--limit-rate", "20M", "-o", got.to_str().context("path")?, &url];
    let mut curl = pair.tb.spawn("curl download", "client", &args, &dir.join("curl.log"))?;
    wait_until("a third of the download", Duration::from_secs(60), || Ok((file_len(&got) >= len / 3).then_some(())))?;
    let killed = Instant::now();
    pair.kill_backup()?;
    let status = pair.wait_status("server", "the primary to drop its backup", Duration::from_secs(10), |s| {
        s["peer"] == "none" && s["protected"] == false
    })?;
    println!("primary unprotected {:?} after the backup was killed", killed.elapsed());
    let exit = curl.wait(Duration::from_secs(120))?;
    ensure!(exit.success(), "curl failed: {}", fs::read_to_string(dir.join("curl.log"))?);
    ensure!(Pair::sha256(&got)? == sha, "sha256 differs");
    ensure!(status["role"] == "primary");
    let metrics = pair.metrics("server")?;
    ensure!(metrics.contains("understudy_protected 0"), "metrics do not say unprotected:\n{metrics}");
    Ok(())
}

/// An upload in progress when the primary dies: the origin stores the whole body exactly once and the
/// client gets the origin's answer. `chunked` sends it with `Transfer-Encoding: chunked`.
fn upload_survives(tag: char, chunked: bool) -> Result<()> {
    let id = unique_id(tag);
    let len = 60 * MB;
    let mut pair = Pair::up(&id, &PairOptions::default(), |_| Ok(()))?;
    let dir = pair.dir.0.clone();
    let src = dir.join("upload.bin");
    let sha = pattern::write_file(&src, 21, len)?;
    let url = format!("http://{VIP}/up/file.bin");
    let src_s = src.to_str().context("path")?;
    // A file goes with a Content-Length, unless the request names chunked coding.
    let mut args = vec!["curl", "-sS", "--limit-rate", "12M", "-T", src_s, "-w", "%{num_connects} %{http_code}\n"];
    if chunked {
        args.extend(["-H", "Transfer-Encoding: chunked"]);
    }
    args.push(&url);
    let mut curl = pair.tb.spawn("curl upload", "client", &args, &dir.join("curl.log"))?;
    // Kill once curl has read 40 % of the file (its descriptor's offset; the rate limit paces it).
    wait_until("the upload to reach 40 %", Duration::from_secs(60), || {
        if let Some(status) = curl.try_wait()? {
            anyhow::bail!("curl ended before the failure ({status}): {}", curl.log_text());
        }
        Ok(read_offset(curl.pid(), &src).is_some_and(|at| at >= len * 4 / 10).then_some(()))
    })?;
    pair.kill_primary()?;
    let taken = pair.wait_taken_over(Duration::from_secs(30))?;
    // The one restored connection, mid-upload, was prompted to resend what the outage lost.
    wait_until("the backup to prompt the client", Duration::from_secs(10), || {
        Ok(pair.metrics("spare")?.contains("understudy_retransmit_prompts_total 1\n").then_some(()))
    })?;
    let status = curl.wait(Duration::from_secs(180))?;
    let out = fs::read_to_string(dir.join("curl.log"))?;
    ensure!(status.success(), "curl failed ({status}): {out}\n{}", pair.logs_tail());
    let (connects, code) = curl_summary(&out);
    ensure!(connects == "1", "curl opened {connects} connections");
    ensure!(code == "201" || code == "204", "origin answered {code}: {out}");
    let stored = dir.join("www/up/file.bin");
    ensure!(Pair::sha256(&stored)? == sha, "the stored upload differs from what was sent");
    let puts: Vec<String> = pair
        .origin_log()
        .into_iter()
        .filter(|l| l.contains(" PUT ") && !l.contains(" 400 ") && !l.contains(" 499 "))
        .collect();
    let complete: Vec<&String> = puts.iter().filter(|l| l.contains(" 201 ") || l.contains(" 204 ")).collect();
    ensure!(complete.len() == 1, "the origin completed {} PUTs: {puts:?}", complete.len());
    let coding = if chunked { "chunked" } else { "-" };
    ensure!(complete[0].ends_with(&format!(" {coding}")), "the PUT was not sent with coding {coding}: {}", complete[0]);
    println!("upload (chunked: {chunked}): stored once, sha256 matches; failover {}", taken["failovers"][0]);
    Ok(())
}

#[test]
fn upload_60mb_content_length_in_progress_is_stored_once() -> Result<()> {
    upload_survives('u', false)
}

#[test]
fn upload_60mb_chunked_in_progress_is_stored_once() -> Result<()> {
    upload_survives('c', true)
}
