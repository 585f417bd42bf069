//! `us-demo`: the main job's demonstration (`scripts/demo`). The replicated pair runs in a namespace
//! test bed (client, primary on `server`, backup on `spare`, nginx on `origin`); a client downloads a
//! large file, uploads another and a set of keep-alive clients make sequential requests, all through the
//! VIP. Mid-way the primary fails (`kill -9` of its process, or a power cut of its host). The backup
//! takes over the same TCP connections; the report shows the takeover's phases (from the backup's
//! `/status`), what the clients saw (errors, connections, largest stall) and the sha256 of every body
//! against the original.
//!
//! Exit status: 0 when every client finished without error and every body matches; 1 otherwise (or when
//! the demo itself fails); 130 after SIGINT/SIGTERM. Every exit path ends the processes and removes the
//! test bed (the `Pair`'s drop), and the scratch directory unless `--keep`.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use understudy_tests::harness::{Capture, Proc, packets_after, run, unique_id};
use understudy_tests::pair::{Pair, PairOptions, VIP, read_offset};
use understudy_tests::pattern;
use understudy_tests::tool::{self, Clock, check_interrupted};

const MB: u64 = 1_000_000;
/// Pattern keys of the generated bodies (`pattern::fill`).
const DOWNLOAD_KEY: u64 = 7;
const UPLOAD_KEY: u64 = 21;
/// The keep-alive clients' files: `f{i}.bin` has `KEEPALIVE_SIZES[i]` bytes of key `100 + i`.
const KEEPALIVE_SIZES: [u64; 7] = [1_000, 10_000, 100_000, 700_000, 2_000_000, 50, 300_000];
/// Fixed client ports, so the capture can tell the transfers apart (below the ephemeral range).
const DOWNLOAD_PORT: u16 = 20001;
const UPLOAD_PORT: u16 = 20002;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Failure {
    /// SIGKILL to the primary process; its host stays up (its kernel must not reset any connection).
    Kill,
    /// Every interface of the primary's host goes down at once; the cut-off process keeps running.
    PowerCut,
}

impl Failure {
    fn describe(self) -> &'static str {
        match self {
            Failure::Kill => "kill -9 of the primary process (host stays up)",
            Failure::PowerCut => "power cut of the primary host (all its interfaces down)",
        }
    }
}

#[derive(Parser)]
#[command(
    name = "us-demo",
    about = "The replicated pair under failure: live downloads, uploads and keep-alive clients survive the primary's death",
    long_about = "Builds a namespace test bed (client, primary, backup, nginx origin), starts the pair and waits \
until it is protected, then runs through the VIP: one rate-limited download, one rate-limited upload \
(Content-Length) and a set of keep-alive clients making sequential requests of varied sizes. When the download \
or the upload reaches --kill-at percent, the primary fails (--failure). The backup detects it, fences it (ARP probe of the \
VIP), claims the VIP and rebuilds every connection with TCP_REPAIR; the clients carry on.\n\n\
The report: the takeover's phases from the backup's /status, then per client the errors, the TCP connections \
used (1 each: nothing reconnected), the largest stall (download: longest pause in the received file's growth; \
upload: longest pause between the VIP's ACK advances, from a client-side capture), resets seen at the client, \
and the sha256 of what was received or stored against the original.\n\n\
Exit status 0 when every client finished without error and every body matches, 1 otherwise, 130 when \
interrupted. Everything is cleaned up on every exit path. Needs root, nginx, curl, tcpdump, iptables, arptables \
and the release build of primary, backup and us-demo side by side (scripts/demo does all of that)."
)]
struct Cli {
    /// Size of the download, in MB (10^6 bytes).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    download_mb: u64,
    /// The download client's rate limit, in MB/s (so the failure lands mid-transfer).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    rate_mb: u64,
    /// Size of the upload (a PUT to the origin's /up/), in MB; 0 for none.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    upload_mb: u64,
    /// The upload client's rate limit, in MB/s.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    upload_rate_mb: u64,
    /// Number of keep-alive clients (each one TCP connection, sequential requests); 0 for none.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=1000))]
    clients: u64,
    /// Requests per keep-alive client (sizes from 50 B to 2 MB, each body checked).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    requests: u64,
    /// Each keep-alive client's rate limit, in kB/s.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    client_rate_kb: u64,
    /// When the primary fails: once the download or the upload (whichever is first) reaches this percentage.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=99))]
    kill_at: u64,
    /// How the primary fails.
    #[arg(long, value_enum, default_value_t = Failure::Kill)]
    failure: Failure,
    /// Keep the scratch directory (bodies, node logs, request logs, client capture); its path is printed.
    #[arg(long)]
    keep: bool,
}

fn main() {
    let cli = Cli::parse();
    tool::main("us-demo", cli.keep, || demo(&cli));
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Records the instants at which a file grew, sampled every 2 ms on its own thread (the main loop
/// blocks briefly while it queries the nodes). Stopped and joined on drop.
struct GrowthWatch {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<Instant>>>,
    thread: Option<JoinHandle<()>>,
}

impl GrowthWatch {
    fn start(path: PathBuf) -> GrowthWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (stop.clone(), changes.clone());
        let thread = std::thread::spawn(move || {
            let mut last = 0;
            while !s.load(Ordering::Relaxed) {
                let len = file_len(&path);
                if len != last {
                    last = len;
                    c.lock().expect("growth watch lock poisoned").push(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        GrowthWatch { stop, changes, thread: Some(thread) }
    }

    fn changes(&self) -> Vec<Instant> {
        self.changes.lock().expect("growth watch lock poisoned").clone()
    }
}

impl Drop for GrowthWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The largest gap between consecutive instants, split at `split`: (before, spanning or after).
fn largest_gaps(times: &[Instant], split: Instant) -> (Duration, Duration) {
    let (mut before, mut after) = (Duration::ZERO, Duration::ZERO);
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        if w[1] <= split {
            before = before.max(gap);
        } else {
            after = after.max(gap);
        }
    }
    (before, after)
}

/// One client process and what it reported.
struct Client {
    proc: Proc,
    done: Option<(ExitStatus, Instant)>,
}

impl Client {
    fn poll(&mut self) -> Result<bool> {
        if self.done.is_none()
            && let Some(status) = self.proc.try_wait()?
        {
            self.done = Some((status, Instant::now()));
        }
        Ok(self.done.is_some())
    }
}

/// One row of the client table.
struct Row {
    what: String,
    requests: u64,
    errors: u64,
    connections: String,
    stall: String,
    sha: String,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Runs the demo; `Ok(true)` when every client finished without error and every body matched.
fn demo(cli: &Cli) -> Result<bool> {
    let download_len = cli.download_mb * MB;
    let upload_len = cli.upload_mb * MB;
    let clock = Clock(Instant::now());
    println!(
        "understudy demo: {} MB download at {} MB/s, {} MB upload at {} MB/s and {} keep-alive clients \
         ({} requests each) through the VIP {VIP};",
        cli.download_mb, cli.rate_mb, cli.upload_mb, cli.upload_rate_mb, cli.clients, cli.requests
    );
    println!("failure at {} % of the download or the upload: {}.", cli.kill_at, cli.failure.describe());

    let id = unique_id('d');
    clock.line(&format!("writing the origin's files and the upload body; building test bed {id}, starting the pair"));
    let mut download_sha = String::new();
    let mut upload_sha = String::new();
    let mut pair = Pair::up(&id, &PairOptions::default(), |www| {
        download_sha = pattern::write_file(&www.join("big.bin"), DOWNLOAD_KEY, download_len)?;
        for (i, &n) in KEEPALIVE_SIZES.iter().enumerate() {
            pattern::write_file(&www.join(format!("f{i}.bin")), 100 + i as u64, n)?;
        }
        fs::write(www.join("small.txt"), "hello\n")?;
        let scratch = www.parent().context("www has no parent")?;
        upload_sha = pattern::write_file(&scratch.join("upload.bin"), UPLOAD_KEY, upload_len)?;
        check_interrupted()
    })?;
    check_interrupted()?;
    let dir = pair.dir.0.clone();
    if cli.keep {
        clock.line(&format!("scratch directory (kept): {}", dir.display()));
    }
    clock.line("pair protected: primary serving on server, backup connected on spare");
    let primary_mac = pair.tb.exec("server", &["cat", "/sys/class/net/eth0/address"])?.trim().to_string();

    let capture =
        Capture::start(&pair.tb, "client", "eth0", &format!("tcp and host {VIP}"), 96, &dir.join("client.pcap"))?;
    let got = dir.join("got.bin");
    let got_s = got.to_str().context("path")?;
    let download_url = format!("http://{VIP}/big.bin");
    let (dport, uport) = (DOWNLOAD_PORT.to_string(), UPLOAD_PORT.to_string());
    let rate = format!("{}", cli.rate_mb * MB);
    let args = [
        "curl",
        "-sS",
        "--local-port",
        &dport,
        "--limit-rate",
        &rate,
        "-o",
        got_s,
        "-w",
        "%{num_connects} %{http_code}",
        &download_url,
    ];
    let mut download =
        Client { proc: pair.tb.spawn("download", "client", &args, &dir.join("download.log"))?, done: None };
    let watch = GrowthWatch::start(got.clone());

    let src = dir.join("upload.bin");
    let mut upload = None;
    if upload_len > 0 {
        let urate = format!("{}", cli.upload_rate_mb * MB);
        let url = format!("http://{VIP}/up/upload.bin");
        let args = [
            "curl",
            "-sS",
            "--local-port",
            &uport,
            "--limit-rate",
            &urate,
            "-T",
            src.to_str().context("path")?,
            "-w",
            "%{num_connects} %{http_code}",
            &url,
        ];
        upload = Some(Client { proc: pair.tb.spawn("upload", "client", &args, &dir.join("upload.log"))?, done: None });
    }

    let mut clients = Vec::new();
    for c in 0..cli.clients {
        let mut args: Vec<String> = vec![
            "curl".into(),
            "-sS".into(),
            "--limit-rate".into(),
            format!("{}", cli.client_rate_kb * 1000),
            "-w".into(),
            "%{stderr}KA %{num_connects} %{http_code}\\n".into(),
        ];
        args.extend((0..cli.requests).map(|j| format!("http://{VIP}/f{}.bin", (c + j) % KEEPALIVE_SIZES.len() as u64)));
        let out = dir.join(format!("ka{c}"));
        let script = format!(
            "{} > {}.out 2> {}.err",
            args.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" "),
            out.display(),
            out.display()
        );
        let proc =
            pair.tb.spawn(&format!("client {c}"), "client", &["sh", "-c", &script], &dir.join(format!("ka{c}.log")))?;
        clients.push(Client { proc, done: None });
    }
    clock.line(&format!(
        "clients started: download, {}, {} keep-alive clients",
        if upload.is_some() { "upload" } else { "no upload" },
        cli.clients
    ));

    // Expected duration of the slowest client, for the deadline.
    let ka_bytes: u64 = (0..cli.requests).map(|j| KEEPALIVE_SIZES[j as usize % KEEPALIVE_SIZES.len()]).sum();
    let expected = [
        download_len / (cli.rate_mb * MB),
        upload_len / (cli.upload_rate_mb * MB),
        if cli.clients > 0 { ka_bytes / (cli.client_rate_kb * 1000) } else { 0 },
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(expected * 3 + 60);

    let mut failed_at: Option<Instant> = None;
    let mut failure_wall = 0f64;
    let mut takeover: Option<Value> = None;
    let mut new_conn: Option<Client> = None;
    let mut next_progress = Instant::now() + Duration::from_secs(1);
    let mut next_status = Instant::now();
    loop {
        check_interrupted()?;
        let now = Instant::now();
        let got_len = file_len(&got);
        let download_done = download.poll()?;
        let upload_done = match upload.as_mut() {
            Some(u) => u.poll()?,
            None => true,
        };
        let mut running = 0;
        for c in &mut clients {
            if !c.poll()? {
                running += 1;
            }
        }
        if failed_at.is_none() {
            if download_done {
                bail!(
                    "the download ended before the failure ({} of {download_len} bytes): {}\n{}",
                    got_len,
                    fs::read_to_string(dir.join("download.log")).unwrap_or_default(),
                    pair.logs_tail()
                );
            }
            // Whichever transfer reaches --kill-at first triggers the failure, so both are in flight.
            let upload_read = match &upload {
                Some(u) if u.done.is_none() => read_offset(u.proc.pid(), &src),
                _ => None,
            };
            let upload_due = upload_read.is_some_and(|r| r * 100 >= upload_len * cli.kill_at);
            if got_len * 100 >= download_len * cli.kill_at || upload_due {
                let upload_state = match (&upload, upload_read) {
                    (Some(_), Some(r)) => format!("upload at {} MB", r / MB),
                    (Some(u), None) if u.done.is_some() => "upload finished".into(),
                    (Some(_), None) => "upload starting".into(),
                    (None, _) => "no upload".into(),
                };
                match cli.failure {
                    Failure::Kill => pair.kill_primary()?,
                    Failure::PowerCut => pair.power_cut_primary()?,
                }
                failed_at = Some(Instant::now());
                failure_wall = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
                clock.line(&format!(
                    "FAILURE: {} — download at {} MB, {upload_state}, {running} keep-alive clients running",
                    cli.failure.describe(),
                    got_len / MB
                ));
            }
        } else if takeover.is_none() && now >= next_status {
            next_status = now + Duration::from_millis(50);
            if let Ok(s) = pair.status("spare")
                && s["role"] == "primary"
                && s["failovers"].as_array().is_some_and(|f| !f.is_empty())
            {
                let f = &s["failovers"][0];
                clock.line(&format!(
                    "backup serves as primary: takeover took {:.1} ms, {} connections restored",
                    f["total_ms"].as_f64().unwrap_or(f64::NAN),
                    f["connections_restored"]
                ));
                let script =
                    format!("curl -sS --max-time 20 -w ' %{{num_connects}} %{{http_code}}' http://{VIP}/small.txt");
                let proc = pair.tb.spawn("new connection", "client", &["sh", "-c", &script], &dir.join("new.log"))?;
                new_conn = Some(Client { proc, done: None });
                takeover = Some(s);
            } else if failed_at.is_some_and(|t| now - t > Duration::from_secs(30)) {
                bail!("the backup did not take over within 30 s of the failure\n{}", pair.logs_tail());
            }
        }
        let new_done = match new_conn.as_mut() {
            Some(n) => n.poll()?,
            None => false,
        };
        if download_done && upload_done && running == 0 && new_done {
            break;
        }
        if now >= next_progress {
            next_progress += Duration::from_secs(1);
            let mut line = format!("download {:>4}/{} MB", got_len / MB, cli.download_mb);
            if let Some(u) = &upload {
                let sent = if u.done.is_some() { upload_len } else { read_offset(u.proc.pid(), &src).unwrap_or(0) };
                let _ = write!(line, " · upload {:>3}/{} MB read by curl", sent / MB, cli.upload_mb);
            }
            let requests: usize = (0..cli.clients)
                .map(|c| {
                    fs::read_to_string(dir.join(format!("ka{c}.err")))
                        .map(|t| t.lines().filter(|l| l.starts_with("KA ")).count())
                        .unwrap_or(0)
                })
                .sum();
            let _ = write!(line, " · keep-alive {requests}/{} requests", cli.clients * cli.requests);
            clock.line(&line);
        }
        if now >= deadline {
            bail!("the clients did not finish in time\n{}", pair.logs_tail());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let failed_at = failed_at.context("no failure injected")?;
    let takeover = takeover.context("no takeover seen")?;
    let stats = capture.stop()?;
    check_interrupted()?;
    clock.line("all clients finished; checking bodies and the client-side capture");

    let mut rows = Vec::new();
    let mut all_ok = true;
    let pcap = dir.join("client.pcap");

    // Download.
    {
        let out = fs::read_to_string(dir.join("download.log")).unwrap_or_default();
        let (status, _) = download.done.context("download not finished")?;
        let mut w = out.split_whitespace();
        let (connects, code) = (w.next().unwrap_or("?"), w.next().unwrap_or("?"));
        let sha = sha256_file(&got)?;
        let ok_body = sha == download_sha;
        let errors = u64::from(!status.success() || code != "200");
        if errors > 0 {
            println!("download: curl {status}, HTTP {code}: {out}");
        }
        let (before, after) = largest_gaps(&watch.changes(), failed_at);
        all_ok &= errors == 0 && ok_body && connects == "1";
        rows.push(Row {
            what: format!("download {} MB", cli.download_mb),
            requests: 1,
            errors,
            connections: connects.to_string(),
            stall: format!("{} (normal {})", ms(after), ms(before)),
            sha: format!("{} {} {}", short(&sha), if ok_body { "=" } else { "≠" }, short(&download_sha)),
        });
    }

    check_interrupted()?;
    // Upload.
    if let Some(u) = &upload {
        let out = fs::read_to_string(dir.join("upload.log")).unwrap_or_default();
        let (status, ended) = u.done.context("upload not finished")?;
        let mut w = out.split_whitespace();
        let (connects, code) = (w.next().unwrap_or("?"), w.next().unwrap_or("?"));
        let stored = dir.join("www/up/upload.bin");
        let sha = sha256_file(&stored).unwrap_or_else(|_| "(missing)".into());
        let ok_body = sha == upload_sha;
        let complete_puts = pair
            .origin_log()
            .iter()
            .filter(|l| l.contains(" PUT ") && (l.contains(" 201 ") || l.contains(" 204 ")))
            .count();
        let errors = u64::from(!status.success() || (code != "201" && code != "204"));
        if errors > 0 {
            println!("upload: curl {status}, HTTP {code}: {out}");
        }
        if complete_puts != 1 {
            println!("upload: the origin completed {complete_puts} PUTs (want exactly 1)");
        }
        let (before, after) = ack_gaps(&pcap, failure_wall)?;
        all_ok &= errors == 0 && ok_body && connects == "1" && complete_puts == 1;
        rows.push(Row {
            what: format!("upload {} MB", cli.upload_mb),
            requests: 1,
            errors,
            connections: connects.to_string(),
            stall: match (before, after) {
                _ if ended < failed_at => "- (done before failure)".into(),
                (Some(b), Some(a)) => format!("{} (normal {})", ms(a), ms(b)),
                _ => "-".into(),
            },
            sha: format!("{} {} {}", short(&sha), if ok_body { "=" } else { "≠" }, short(&upload_sha)),
        });
    }

    check_interrupted()?;
    // Keep-alive clients: bodies in .out, one "KA connects code" line per request in .err.
    if cli.clients > 0 {
        let (mut errors, mut connections, mut bodies_ok) = (0u64, 0u64, true);
        for (c, client) in clients.iter().enumerate() {
            let (status, _) = client.done.context("client not finished")?;
            let out = fs::read(dir.join(format!("ka{c}.out")))?;
            let err = fs::read_to_string(dir.join(format!("ka{c}.err")))?;
            let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("KA ")).collect();
            let mut pos = 0usize;
            let mut client_errors = 0;
            for j in 0..cli.requests as usize {
                let i = (c + j) % KEEPALIVE_SIZES.len();
                let mut w = lines.get(j).map(|l| l.split_whitespace().skip(1)).into_iter().flatten();
                let (conn, code) = (w.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0), w.next());
                connections += conn;
                let n = KEEPALIVE_SIZES[i] as usize;
                let body = &out[pos.min(out.len())..(pos + n).min(out.len())];
                pos += n;
                let body_ok = body.len() == n && pattern::first_mismatch(100 + i as u64, 0, body).is_none();
                bodies_ok &= body_ok;
                if code != Some("200") || !body_ok {
                    client_errors += 1;
                }
            }
            if client_errors > 0 || !status.success() {
                println!("keep-alive client {c}: {status}, {client_errors} failed requests: {}", err.trim());
            }
            errors += client_errors.max(u64::from(!status.success()));
        }
        all_ok &= errors == 0 && bodies_ok && connections == cli.clients;
        rows.push(Row {
            what: format!("{} keep-alive clients", cli.clients),
            requests: cli.clients * cli.requests,
            errors,
            connections: connections.to_string(),
            stall: "-".into(),
            sha: if bodies_ok { "every body checked: ok".into() } else { "body mismatch".into() },
        });
    }

    // A new connection after the takeover.
    {
        let n = new_conn.as_ref().context("no new connection")?;
        let (status, _) = n.done.context("new connection not finished")?;
        let out = fs::read_to_string(dir.join("new.log")).unwrap_or_default();
        let ok = status.success() && out.starts_with("hello\n") && out.ends_with(" 1 200");
        if !ok {
            println!("new connection after the takeover: {status}: {out}");
        }
        all_ok &= ok;
        rows.push(Row {
            what: "new connection after".into(),
            requests: 1,
            errors: u64::from(!ok),
            connections: "1".into(),
            stall: "-".into(),
            sha: "-".into(),
        });
    }

    check_interrupted()?;
    let resets = resets_from_vip(&pcap)?;
    if !resets.while_open.is_empty() {
        println!("resets from the VIP while the client's connection was open:\n{}", resets.while_open.join("\n"));
    }
    all_ok &= resets.while_open.is_empty();
    let from_dead = packets_after(&pcap, &format!("ether src {primary_mac} and src host {VIP}"), failure_wall)?.len();
    let errors: u64 = rows.iter().map(|r| r.errors).sum();
    let prompted = pair
        .metrics("spare")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("understudy_retransmit_prompts_total ").map(str::to_owned)))
        .unwrap_or_else(|| "?".into());

    let f = &takeover["failovers"][0];
    let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    println!();
    println!("understudy demo — report ({})", cli.failure.describe());
    println!("takeover (backup's /status, epoch {}): {}", f["epoch"], f["reason"].as_str().unwrap_or("?"));
    println!("  detection {:>8.1} ms", num("detection_ms"));
    println!("  fencing   {:>8.1} ms", num("fencing_ms"));
    println!("  restore   {:>8.1} ms", num("restore_ms"));
    println!("  total     {:>8.1} ms", num("total_ms"));
    println!(
        "  connections restored {} (lost {}); clients prompted to retransmit {prompted}",
        f["connections_restored"], f["connections_lost"]
    );
    println!();
    println!(
        "  {:<22} {:>8} {:>7} {:>12}  {:<22} sha256 received / original",
        "client", "requests", "errors", "connections", "largest stall"
    );
    for r in &rows {
        println!("  {:<22} {:>8} {:>7} {:>12}  {:<22} {}", r.what, r.requests, r.errors, r.connections, r.stall, r.sha);
    }
    println!(
        "  client errors: {errors}\n  resets from the VIP at the client: {} while a connection was open, {} after the \
         client had closed it (client capture: {} packets, {} dropped)",
        resets.while_open.len(),
        resets.after_close,
        stats.captured,
        stats.dropped_by_kernel
    );
    println!("  segments from the failed primary's host that reached the client after the failure: {from_dead}");
    println!(
        "  stall: download = longest pause in the received file's growth after the failure; upload = longest \
         pause\n  between the VIP's ACK advances on the client's capture; \"normal\" = the same before the failure"
    );
    println!("result: {}", if all_ok { "PASS" } else { "FAIL" });
    if !all_ok {
        println!("{}", pair.logs_tail());
    }
    Ok(all_ok)
}

/// Resets the VIP sent to the client, split by whether the client had already closed (sent its FIN on)
/// that connection: only the first kind can break a client.
struct Resets {
    /// tcpdump lines of resets that reached an open connection.
    while_open: Vec<String>,
    after_close: usize,
}

fn resets_from_vip(pcap: &Path) -> Result<Resets> {
    let out = run(std::process::Command::new("tcpdump")
        .args(["-nn", "-tt", "-r"])
        .arg(pcap)
        .arg("tcp[tcpflags] & (tcp-rst|tcp-fin) != 0"))?;
    let vip = format!("{VIP}.");
    let mut closed = std::collections::HashSet::new();
    let mut resets = Resets { while_open: Vec::new(), after_close: 0 };
    for line in out.lines() {
        // "1763782000.123456 IP 10.0.0.1.20001 > 10.0.0.100.80: Flags [F.], seq ..."
        let w: Vec<&str> = line.split_whitespace().collect();
        let (Some(src), Some(dst), Some(flags)) = (w.get(2), w.get(4), w.get(6)) else { continue };
        if src.starts_with(&vip) {
            let port = dst.trim_end_matches(':').rsplit('.').next().unwrap_or_default();
            if flags.contains('R') {
                if closed.contains(port) {
                    resets.after_close += 1;
                } else {
                    resets.while_open.push(line.to_string());
                }
            }
        } else if flags.contains('F') {
            closed.insert(src.rsplit('.').next().unwrap_or_default().to_string());
        }
    }
    Ok(resets)
}

/// Largest gaps between the VIP's ACK advances on the upload connection (from the client capture):
/// (before the failure, spanning or after it). `None` when the capture has no such ACKs.
/// `failure_wall` is wall-clock seconds since the Unix epoch, as tcpdump prints packet times.
fn ack_gaps(pcap: &Path, failure_wall: f64) -> Result<(Option<Duration>, Option<Duration>)> {
    let out = run(std::process::Command::new("tcpdump")
        .args(["-nn", "-tt", "-S", "-r"])
        .arg(pcap)
        .arg(format!("src host {VIP} and src port 80 and dst port {UPLOAD_PORT} and tcp[tcpflags] & tcp-ack != 0")))?;
    let mut advances: Vec<f64> = Vec::new();
    let mut last_ack: Option<u32> = None;
    for line in out.lines() {
        let Some(t) = line.split_whitespace().next().and_then(|t| t.parse::<f64>().ok()) else { continue };
        let Some(ack) =
            line.split(", ack ").nth(1).and_then(|r| r.split(',').next()).and_then(|a| a.parse::<u32>().ok())
        else {
            continue;
        };
        if last_ack.is_none_or(|l| (ack.wrapping_sub(l) as i32) > 0) {
            last_ack = Some(ack);
            advances.push(t);
        }
    }
    if advances.len() < 2 {
        return Ok((None, None));
    }
    let (mut before, mut after) = (0f64, 0f64);
    for w in advances.windows(2) {
        let gap = w[1] - w[0];
        if w[1] <= failure_wall {
            before = before.max(gap);
        } else {
            after = after.max(gap);
        }
    }
    Ok((Some(Duration::from_secs_f64(before)), Some(Duration::from_secs_f64(after))))
}
