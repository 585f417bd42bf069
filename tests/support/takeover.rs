//! One kernel takeover scenario, end to end, in a fresh test bed:
//!
//! 1. a client (10.0.0.1) and a server app on the VIP (10.0.0.100, host `server`)
//!    run a transfer; tcpdump on the server's eth0 is the only observer;
//! 2. at the trigger point the server host is cut off (`ip link set eth0 down`),
//!    its app freezes (record written, socket held open), the capture stops;
//! 3. a restore plan is derived from the capture alone (plus how many client bytes
//!    the app consumed, from its record);
//! 4. oracle: the frozen socket is taken out of the server app (`pidfd_getfd`),
//!    checkpointed, and `plan::compare` must find no mismatch;
//! 5. the spare (10.0.0.3) holds VIP segments, takes the VIP, restores the socket
//!    from the plan (`us-testapp resume`), releases the hold and serves on;
//! 6. the client must finish byte-identical, with no RST and no second SYN in a
//!    capture taken on its side, on the same connection.
//!
//! Evidence (captures, plans, records, logs) is kept under
//! `target/takeover-evidence/<scenario>/` when the scenario fails (always, with
//! `TAKEOVER_KEEP_EVIDENCE=1`).

use crate::app::{self, ClientResult, Progress, Restored};
use crate::derive::{self, Derived};
use crate::harness::{Capture, Proc, Testbed, count_matching, take_fd, unique_id, wait_until, workspace_root};
use crate::pattern;
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tcp_replay::RestorePlan;

pub const VIP: &str = "10.0.0.100";
pub const CLIENT_IP: &str = "10.0.0.1";
/// Set this environment variable to keep the evidence of passing scenarios too.
pub const KEEP_EVIDENCE: &str = "TAKEOVER_KEEP_EVIDENCE";
/// Timestamp clock drift allowed between the tracker's plan and the kernel's checkpoint.
const TS_TOLERANCE_MS: u32 = 100;

/// What the client does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// One GET of `bytes`, read at `rate` bytes/s; cut at `cut_percent` of it.
    Download { bytes: u64, rate: u64, cut_percent: u64 },
    /// One PUT of `bytes`, written at `rate`; the server reads at `server_read_rate`.
    Upload { bytes: u64, rate: u64, server_read_rate: u64, cut_percent: u64 },
    /// GET `first`, idle (cut here), then GET `second` after the takeover.
    Idle { first: u64, second: u64 },
}

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Test name; names the evidence directory.
    pub name: &'static str,
    /// One letter ([a-z0-9]) that makes the test bed ID unique among concurrent scenarios.
    pub tag: char,
    pub port: u16,
    pub kind: Kind,
}

/// Timings of one run (printed, never asserted).
#[derive(Debug, Default)]
struct Timeline {
    start: Option<Instant>,
    marks: Vec<(&'static str, Duration)>,
}

impl Timeline {
    fn mark(&mut self, what: &'static str) {
        let start = *self.start.get_or_insert_with(Instant::now);
        self.marks.push((what, start.elapsed()));
    }

    fn render(&self) -> String {
        let mut s = String::new();
        let mut prev = Duration::ZERO;
        for (what, at) in &self.marks {
            let _ =
                writeln!(s, "  {:>8.1} ms (+{:>7.1}) {what}", at.as_secs_f64() * 1e3, (*at - prev).as_secs_f64() * 1e3);
            prev = *at;
        }
        s
    }
}

/// A plan as readable JSON, queues summarised (the full plans are in the evidence files).
pub fn plan_summary(p: &RestorePlan) -> String {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    for q in ["send_queue", "recv_queue", "unsent"] {
        if let Some(x) = v.get_mut(q) {
            let bytes = x.as_str().map_or(0, |h| h.len() / 2);
            *x = serde_json::Value::String(format!("<{bytes} bytes>"));
        }
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn now_since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

/// What a passing scenario measured (printed by tests and the demo, never asserted).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Human-readable timeline and figures.
    pub report: String,
    /// Bytes the client transferred in its main exchange.
    pub bytes: u64,
    /// Time `restore()` took on the spare.
    pub restore: Duration,
    /// From the server's cut to the restored socket on the spare.
    pub cut_to_restored: Duration,
    /// The client's longest wait in one read or write (its visible stall).
    pub client_stall: Duration,
    /// sha256 of what the client received or sent, as checked against the original.
    pub sha256: Vec<String>,
    /// Bytes in the restored send and receive queues.
    pub send_queue: usize,
    pub recv_queue: usize,
}

/// Runs `scenario` with the `us-testapp` binary at `app_bin`; returns an error
/// describing every failed expectation.
pub fn run(scenario: &Scenario, app_bin: &str) -> Result<Outcome> {
    let evidence = evidence_dir(scenario.name);
    let _ = fs::remove_dir_all(&evidence);
    fs::create_dir_all(&evidence).with_context(|| format!("creating {}", evidence.display()))?;
    match run_in(scenario, app_bin, &evidence) {
        Ok(outcome) => {
            if std::env::var_os(KEEP_EVIDENCE).is_none() {
                let _ = fs::remove_dir_all(&evidence);
            }
            Ok(outcome)
        }
        Err(e) => Err(e.context(format!("{} failed; evidence kept in {}", scenario.name, evidence.display()))),
    }
}

fn run_in(sc: &Scenario, app_bin: &str, ev: &Path) -> Result<Outcome> {
    let mut t = Timeline::default();
    t.mark("start");
    let id = unique_id(sc.tag);
    let tb = Testbed::up(&id)?;
    tb.vip("server")?;
    t.mark("test bed up, VIP on server");
    let filter = format!("tcp port {}", sc.port);
    let server_cap = Capture::start(&tb, "server", "eth0", &filter, 0, &ev.join("server.pcap"))?;
    // Headers are enough on the client side (RST/SYN checks), and keep the file small.
    let client_cap = Capture::start(&tb, "client", "eth0", &filter, 200, &ev.join("client.pcap"))?;

    let rec_dir = ev.join("record");
    let rec_s = path_str(&rec_dir)?.to_string();
    let listen = format!("{VIP}:{}", sc.port);
    let mut serve_args = vec![app_bin, "serve", "--listen", &listen, "--record", &rec_s];
    let read_rate;
    if let Kind::Upload { server_read_rate, .. } = sc.kind {
        read_rate = server_read_rate.to_string();
        serve_args.extend(["--read-rate", &read_rate]);
    }
    let mut server = tb.spawn("server app", "server", &serve_args, &ev.join("serve.log"))?;
    wait_until("the server app to listen", Duration::from_secs(10), || {
        exited_early(&mut server)?;
        Ok(rec_dir.join(app::files::READY).exists().then_some(()))
    })?;

    let (progress, result, go) = (ev.join("progress.json"), ev.join("result.json"), ev.join("go"));
    let (prog_s, res_s, go_s) = (path_str(&progress)?, path_str(&result)?, path_str(&go)?);
    let nums: Vec<String>;
    let mut client_args = vec![app_bin, "client", "--connect", &listen, "--progress", prog_s, "--result", res_s];
    let (total, cut_at, expected_sha) = match sc.kind {
        Kind::Download { bytes, rate, cut_percent } => {
            nums = vec![bytes.to_string(), rate.to_string()];
            client_args.extend(["download", "--bytes", &nums[0], "--rate", &nums[1]]);
            (bytes, bytes * cut_percent / 100, vec![pattern::sha256_hex(pattern::response_key(0), bytes)])
        }
        Kind::Upload { bytes, rate, cut_percent, .. } => {
            nums = vec![bytes.to_string(), rate.to_string()];
            client_args.extend(["upload", "--bytes", &nums[0], "--rate", &nums[1]]);
            (bytes, bytes * cut_percent / 100, vec![pattern::sha256_hex(pattern::upload_key(0), bytes)])
        }
        Kind::Idle { first, second } => {
            nums = vec![first.to_string(), second.to_string()];
            client_args.extend(["idle", "--first", &nums[0], "--second", &nums[1], "--go", go_s]);
            let shas = vec![
                pattern::sha256_hex(pattern::response_key(0), first),
                pattern::sha256_hex(pattern::response_key(1), second),
            ];
            (second, 0, shas)
        }
    };
    let mut client = tb.spawn("client app", "client", &client_args, &ev.join("client.log"))?;
    t.mark("client started");

    // Wait for the cut point.
    let idle = matches!(sc.kind, Kind::Idle { .. });
    let prog: Progress = wait_until("the client to reach the cut point", Duration::from_secs(30), || {
        exited_early(&mut client)?;
        let Ok(p) = app::read_json::<Progress>(&progress) else { return Ok(None) };
        let reached = if idle { p.phase == "idle" } else { p.phase == "transfer" && p.done >= cut_at };
        Ok(reached.then_some(p))
    })?;
    let client_addr: SocketAddrV4 = format!("{CLIENT_IP}:{}", prog.local_port).parse()?;
    let vip_addr: SocketAddrV4 = listen.parse()?;

    // Cut the server host off, then freeze its application.
    tb.exec("server", &["ip", "link", "set", "eth0", "down"])?;
    t.mark("server eth0 down");
    let cut_progress = app::read_json::<Progress>(&progress).map(|p| p.done).unwrap_or(prog.done);
    fs::write(rec_dir.join(app::files::FREEZE), "")?;
    let record: app::Record = wait_until("the server app to write its record", Duration::from_secs(10), || {
        exited_early(&mut server)?;
        Ok(app::read_json(&rec_dir.join(app::files::RECORD)).ok())
    })?;
    let server_stats = server_cap.stop()?;
    if server_stats.captured != server_stats.received || server_stats.dropped_by_kernel != 0 {
        bail!("the server capture is incomplete, a plan from it cannot be trusted: {server_stats:?}");
    }
    t.mark("server app frozen, server capture stopped");

    // The plan, from the capture alone.
    let derived = derive::plan_from_capture(
        &ev.join("server.pcap"),
        client_addr,
        vip_addr,
        record.client_offset,
        now_since_epoch(),
    )?;
    app::write_json_atomic(&ev.join("plan.json"), &derived.plan)?;
    t.mark("plan derived from the capture");

    // Oracle: the frozen socket's own state.
    let mismatches = oracle(&derived, &record, ev)?;
    t.mark("oracle checkpointed the frozen socket");

    // Takeover on the spare: hold VIP segments (no RST from a socketless kernel),
    // claim the VIP, restore, release. Segments that find a socket (the restored
    // connection, once it exists) pass at once, so the client's answer to the
    // restored socket's first window probe is not lost to the hold; so do the
    // segments restore() injects itself (a replayed FIN), marked INJECT_MARK.
    let port = sc.port.to_string();
    let mark = format!("{:#x}", tcp_replay::repair::INJECT_MARK);
    let pass = [
        "iptables",
        "-w",
        "-I",
        "INPUT",
        "-p",
        "tcp",
        "-d",
        VIP,
        "--dport",
        &port,
        "-m",
        "socket",
        "--nowildcard",
        "-j",
        "ACCEPT",
    ];
    let hold = [
        "iptables", "-w", "-I", "INPUT", "2", "-p", "tcp", "-d", VIP, "--dport", &port, "-m", "mark", "!", "--mark",
        &mark, "-j", "DROP",
    ];
    tb.exec("spare", &pass)?;
    tb.exec("spare", &hold)?;
    tb.vip("spare")?;
    t.mark("spare holds, VIP moved to spare");
    let (una, rq) = (derived.offsets.snd_una.to_string(), derived.offsets.recv_queue.to_string());
    let plan_path = ev.join("plan.json");
    let resume_args = [
        app_bin,
        "resume",
        "--plan",
        path_str(&plan_path)?,
        "--record",
        &rec_s,
        "--snd-una-offset",
        &una,
        "--recv-queue-offset",
        &rq,
    ];
    let mut resume = tb.spawn("resumed server", "spare", &resume_args, &ev.join("resume.log"))?;
    let restored: Restored = wait_until("the spare to restore the connection", Duration::from_secs(10), || {
        exited_early(&mut resume)?;
        Ok(app::read_json(&rec_dir.join(app::files::RESTORED)).ok())
    })?;
    let mut release: Vec<&str> = hold.to_vec();
    release[2] = "-D";
    release.remove(4); // the rule position
    tb.exec("spare", &release)?;
    t.mark("connection restored on the spare, hold released");
    if idle {
        fs::write(&go, "")?;
    }

    // The client must finish on the same connection, byte-identical.
    let client_status = client.wait(Duration::from_secs(60))?;
    t.mark("client finished");
    let res: Option<ClientResult> = app::read_json(&result).ok();
    let resume_status = resume.wait(Duration::from_secs(10));
    let client_stats = client_cap.stop()?;
    let client_pcap = ev.join("client.pcap");
    let (rsts, rst_lines) = count_matching(&client_pcap, &format!("src host {VIP} and tcp[tcpflags] & tcp-rst != 0"))?;
    let (syns, syn_lines) = count_matching(&client_pcap, "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn")?;
    let (strangers, stranger_lines) =
        count_matching(&client_pcap, &format!("not (host {CLIENT_IP} and port {})", prog.local_port))?;

    let mut report = String::new();
    let _ = writeln!(report, "timeline:\n{}", t.render());
    let _ = writeln!(
        report,
        "cut at {cut_progress} of {total} bytes; server app had consumed {} client bytes and written {} server bytes",
        record.client_offset, record.server_offset
    );
    let _ = writeln!(
        report,
        "plan: {} segments, send queue {} bytes from server offset {}, receive queue {} bytes from client offset {}, {} client bytes beyond ACK; tracker refused {} segments {:?}",
        derived.segments,
        derived.plan.send_queue.len(),
        derived.offsets.snd_una,
        derived.plan.recv_queue.len(),
        derived.offsets.recv_queue,
        derived.client_ahead,
        derived.refused_count,
        derived.refused,
    );
    let _ = writeln!(
        report,
        "captures: server {} packets ({} dropped by kernel), client {} packets ({} dropped)",
        server_stats.captured, server_stats.dropped_by_kernel, client_stats.captured, client_stats.dropped_by_kernel
    );
    let _ = writeln!(report, "restore() took {:.2} ms", restored.restore_us as f64 / 1e3);
    if let Some(r) = &res {
        let _ =
            writeln!(report, "client: longest wait in one read/write {} ms, total {} ms", r.max_wait_ms, r.elapsed_ms);
    }

    let mut failures = Vec::new();
    if !mismatches.is_empty() {
        failures.push(mismatches);
    }
    match &res {
        Some(r) if r.ok && client_status.success() => {
            if r.sha256 != expected_sha {
                failures.push(format!("client sha256 {:?}, expected {expected_sha:?}", r.sha256));
            }
            if r.local_port != prog.local_port {
                failures.push(format!("client ended on port {}, started on {}", r.local_port, prog.local_port));
            }
        }
        Some(r) => failures.push(format!("client failed ({client_status}): {}", r.error.as_deref().unwrap_or("?"))),
        None => failures.push(format!("client wrote no result ({client_status}): {}", client.log_text())),
    }
    match resume_status {
        Ok(s) if s.success() => {}
        Ok(s) => failures.push(format!("resumed server exited with {s}: {}", resume.log_text())),
        Err(e) => failures.push(format!("resumed server: {e:#}")),
    }
    if rsts != 0 {
        failures.push(format!("{rsts} RST from the VIP reached the client:\n{rst_lines}"));
    }
    if syns != 1 {
        failures.push(format!("expected exactly one SYN from the client, saw {syns}:\n{syn_lines}"));
    }
    if strangers != 0 {
        failures.push(format!("{strangers} packets of another connection on port {}:\n{stranger_lines}", sc.port));
    }
    if !failures.is_empty() {
        bail!("{}\n{report}", failures.join("\n"));
    }
    let mark = |what: &str| t.marks.iter().find(|(w, _)| *w == what).map(|(_, at)| *at).unwrap_or_default();
    Ok(Outcome {
        bytes: total,
        restore: Duration::from_micros(restored.restore_us),
        cut_to_restored: mark("connection restored on the spare, hold released")
            .saturating_sub(mark("server eth0 down")),
        client_stall: Duration::from_millis(res.as_ref().map_or(0, |r| r.max_wait_ms)),
        sha256: expected_sha,
        send_queue: derived.plan.send_queue.len(),
        recv_queue: derived.plan.recv_queue.len(),
        report,
    })
}

/// Checkpoints the frozen server socket and compares it with the tracker's plan,
/// derived again at the moment of the checkpoint. Returns a description of the
/// mismatches (empty if none); both plans are written to the evidence directory.
fn oracle(derived: &Derived, record: &app::Record, ev: &Path) -> Result<String> {
    let fd = take_fd(record.pid, record.fd).context("taking the frozen server's socket")?;
    let now = now_since_epoch();
    let kernel = tcp_replay::repair::checkpoint(&fd).context("checkpointing the frozen server's socket")?;
    drop(fd);
    let tracker = derived.tracker.restore_plan(now).context("deriving the plan at checkpoint time")?;
    app::write_json_atomic(&ev.join("kernel-plan.json"), &kernel)?;
    app::write_json_atomic(&ev.join("tracker-plan-at-checkpoint.json"), &tracker)?;
    let found = tcp_replay::plan::compare(&tracker, &kernel, derived.client_ahead, TS_TOLERANCE_MS);
    if found.is_empty() {
        return Ok(String::new());
    }
    let mut s = String::from("oracle: the tracker's plan differs from the kernel's checkpoint:\n");
    for m in &found {
        let _ = writeln!(s, "  {}: tracker {} / kernel {}", m.field, m.tracker, m.kernel);
    }
    let _ = writeln!(s, "tracker plan:\n{}\nkernel plan:\n{}", plan_summary(&tracker), plan_summary(&kernel));
    Ok(s)
}

/// Fails if `proc` has already exited.
fn exited_early(proc: &mut Proc) -> Result<()> {
    if let Some(status) = proc.try_wait()? {
        bail!("{} exited early ({status}): {}", proc.name, proc.log_text());
    }
    Ok(())
}

/// Where a scenario's evidence goes.
pub fn evidence_dir(name: &str) -> PathBuf {
    workspace_root().join("target/takeover-evidence").join(name)
}
