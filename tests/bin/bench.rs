//! `us-bench`: what replication costs and what a failover costs, side by side (`scripts/bench`).
//!
//! One namespace test bed (`scripts/testbed up ID --pair`: client, `server`, `spare`, origin) and one origin
//! (nginx on `origin` serving `1k.bin` and `1m.bin`) for every measurement:
//!
//! * throughput, latency and CPU per request, measured with wrk from the client host through the VIP, for
//!   (a) the understudy primary without a backup, (b) the replicated pair (`peer: connected` on both
//!   `/status`, checked before and after each point), (c) nginx as a reverse proxy on the primary's host;
//!   CPU time from `/proc/<pid>/stat` (utime + stime) of the proxy processes (both nodes for (b));
//! * a failover under load: (d) the pair, the primary killed (`kill -9`); (e) nginx on `server` and `spare`
//!   behind a keepalived VIP (VRRPv3, `advert_int 0.01`, the least keepalived accepts), the master's nginx
//!   and keepalived killed (`kill -9`). The load is [`bench_load::Load`]: keep-alive GETs back to back, every
//!   body checked, each completion time-stamped, each failed attempt classified (a reset is `ECONNRESET` or
//!   `EPIPE`), failed requests retried on a new connection. RST segments from the VIP are also counted on
//!   the client's interface (tcpdump);
//! * the takeover's scale: idle keep-alive connections (100, 1000, 10 000 by default) on the protected pair,
//!   the primary killed; the restore time is the new primary's `/status` `failovers[]` entry, and every
//!   connection then makes a second request.
//!
//! Each throughput point also counts the read and write system calls of each proxy process
//! (`/proc/<pid>/io`). With `--profile` each understudy process is recorded with `perf record -e cpu-clock
//! -g` over one more run of one point of (a) and (b), and the report summarises the profiles.
//!
//! The report (`target/bench/report.md`, with SVG plots, CSV series and `results.json`) gives the figures,
//! the machine, and the targets of issue 5 with by how much each was met or missed, and for each missed
//! one what replication costs there and the profiles ("Why targets are missed"). Exit status 0 when the
//! run completed (targets are reported, not asserted), 1 when it failed, 130 when interrupted; the test bed
//! and every process are removed on every exit path.

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use understudy_tests::bench_load::{
    self, Failure, IdleConns, IdleSpec, Load, LoadRecord, LoadSpec, Recovery, longest_gap, per_bucket, percentile,
    recovery,
};
use understudy_tests::harness::{Capture, Proc, unique_id, workspace_root};
use understudy_tests::pair::{ORIGIN, PORT, Pair, PairOptions, VIP};
use understudy_tests::pattern;
use understudy_tests::plot::{Plot, Series};
use understudy_tests::tool::{self, Clock, check_interrupted};

/// Width of the throughput buckets across a failover.
const BUCKET: Duration = Duration::from_millis(100);
/// Throughput is back when a window of this many buckets averages [`RECOVERED`] of the baseline.
const RECOVERY_WINDOW: usize = 5;
const RECOVERED: f64 = 0.9;
/// RST segments from the VIP, as the client's interface sees them.
const RST_FILTER: &str = "src host 10.0.0.100 and tcp[tcpflags] & tcp-rst != 0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
enum Size {
    /// 1 KiB responses (`/1k.bin`).
    #[value(name = "1k")]
    K1,
    /// 1 MiB responses (`/1m.bin`).
    #[value(name = "1m")]
    M1,
}

impl Size {
    fn path(self) -> &'static str {
        match self {
            Size::K1 => "/1k.bin",
            Size::M1 => "/1m.bin",
        }
    }
    fn len(self) -> u64 {
        match self {
            Size::K1 => 1024,
            Size::M1 => 1 << 20,
        }
    }
    fn key(self) -> u64 {
        match self {
            Size::K1 => 501,
            Size::M1 => 502,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Size::K1 => "1 KiB",
            Size::M1 => "1 MiB",
        }
    }
    fn body(self) -> Arc<Vec<u8>> {
        let mut b = vec![0u8; self.len() as usize];
        pattern::fill(self.key(), 0, &mut b);
        Arc::new(b)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
enum Mode {
    /// Keep-alive: each wrk connection sends request after request.
    KeepAlive,
    /// A connection per request (`Connection: close`).
    Close,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "conn/request",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
enum Phase {
    /// (a) throughput of the primary without a backup.
    A,
    /// (b) throughput of the replicated pair.
    B,
    /// (c) throughput of nginx as a reverse proxy.
    C,
    /// (d) failover of the pair under load (kill -9 of the primary).
    D,
    /// (e) failover of two nginx behind keepalived under load (kill -9 of the master).
    E,
    /// Restore time against the number of idle connections.
    Scale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Proxy {
    A,
    B,
    C,
}

impl Proxy {
    fn label(self) -> &'static str {
        match self {
            Proxy::A => "(a) primary, no backup",
            Proxy::B => "(b) replicated pair",
            Proxy::C => "(c) nginx reverse proxy",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Proxy::A => "a",
            Proxy::B => "b",
            Proxy::C => "c",
        }
    }
}

#[derive(Parser)]
#[command(
    name = "us-bench",
    about = "Throughput, latency and CPU of understudy with and without replication against nginx, failover under \
load against nginx + keepalived, and restore time against connections; writes target/bench/report.md",
    long_about = "Builds one namespace test bed (client, server, spare, origin) with one origin (nginx serving a 1 KiB \
and a 1 MiB file) and measures, in this order:\n\n\
(b) the replicated pair (primary on server, backup on spare, both /status saying `peer: connected` before and after \
every point) and then (a) the same primary with its backup killed: wrk from the client through the VIP, for each \
--sizes, --modes and --concurrency, --duration seconds after --warmup seconds; requests/s, MB/s, latency p50/p99/p99.9 \
and the proxy processes' CPU time per request (/proc/<pid>/stat utime+stime; both nodes for (b)).\n\n\
(d) a spare joins, then the failover load (--failover-conns keep-alive connections of --failover-size GETs back to \
back, every body checked) runs --failover-before seconds, the primary is killed (kill -9), and it runs \
--failover-after seconds more. Reported: failed attempts by kind (reset = ECONNRESET/EPIPE, refused = RST to a \
SYN, closed = EOF mid-request, timeout), RST segments from the VIP seen on the client's interface, the longest stall \
(the longest time a request waited, retries included), the longest time with no completion at all, the time until \
throughput (per 100 ms) is back to 90 % of the seconds before the failure, and the takeover's phases from /status.\n\n\
(scale) for each --scale N: N idle keep-alive connections (one GET each) on the protected pair, kill -9 of the \
primary, the restore time from the new primary's /status failovers[], then a second GET on every connection.\n\n\
(c) the nodes are stopped and nginx (2 workers, upstream keep-alive, access log on as the nodes' request log is) \
runs as a reverse proxy on server with the VIP: the same wrk matrix. (e) a second nginx on spare, keepalived on \
both (VRRPv3, advert_int 0.01, the least keepalived accepts; server MASTER), the same failover load, and the master's \
nginx and keepalived are killed (kill -9; the VIP stays on its interface, as after any crash of keepalived).\n\n\
The report goes to --out (target/bench by default): report.md with tables, the machine, the targets of issue 5 \
(met, or missed and by how much), failover.svg and restore.svg, CSV series and results.json. Targets are reported, \
not asserted. Exit status 0 when the run completed, 1 when it failed, 130 when interrupted; the test bed and every \
process are removed on every exit path. Needs root, wrk, nginx, keepalived, tcpdump, curl, iptables, arptables, \
nftables and the release build of primary, backup and us-bench side by side (scripts/bench does all of that). The \
default run takes about 7 minutes; --quick about 2."
)]
struct Cli {
    /// Short run for development: 2 s points at concurrency 1 and 16, a shorter failover load, scale 100 and 1000
    /// connections. Any flag given as well overrides its part.
    #[arg(long)]
    quick: bool,
    /// Seconds of each throughput point (default 8; 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: Option<u64>,
    /// Seconds of wrk before each point, not measured (0: none).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    warmup: u64,
    /// wrk connections of the throughput points, comma-separated (default 1,16,64; 1,16 with --quick). The added
    /// p99 latency of replication is judged at the lowest.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: Option<Vec<u32>>,
    /// Response sizes of the throughput points, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Size::K1, Size::M1])]
    sizes: Vec<Size>,
    /// Connection modes of the throughput points, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Mode::KeepAlive, Mode::Close])]
    modes: Vec<Mode>,
    /// What to measure, comma-separated (a, b, c: throughput; d, e: failover; scale: restore time).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Phase::A, Phase::B, Phase::C, Phase::D, Phase::E, Phase::Scale])]
    phases: Vec<Phase>,
    /// Keep-alive connections of the failover load of (d) and (e).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1000))]
    failover_conns: u64,
    /// Response size of the failover load.
    #[arg(long, value_enum, default_value_t = Size::K1)]
    failover_size: Size,
    /// Seconds of failover load before the kill (default 5; 3 with --quick). The last up to 3 s (not the first
    /// second) are the baseline throughput.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=600))]
    failover_before: Option<u64>,
    /// Seconds of failover load after the kill (default 8; 4 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    failover_after: Option<u64>,
    /// Idle connection counts of the takeover's scale, comma-separated (default 100,1000,10000; 100,1000 with
    /// --quick).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=30_000))]
    scale: Option<Vec<u64>>,
    /// A TOML file appended to the nodes' configuration, to try other detection or fencing settings (for example
    /// `[detection]` `misses = 10`); it must not have a `[limits]` table (the run sets one). Default: the nodes'
    /// defaults.
    #[arg(long)]
    node_config: Option<PathBuf>,
    /// Directory of the report (default: target/bench of the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the scratch directory (node logs, wrk output, nginx and keepalived configs and logs); its path is
    /// printed.
    #[arg(long)]
    keep: bool,
    /// Profile each understudy process (`perf record -e cpu-clock -F 4000 -g -p PID`) during one more run of
    /// the point SIZE:MODE:CONNECTIONS (default 1k:keep-alive:16) of (a) and (b), after the point is measured
    /// (the figures are not taken under perf). The report's "Why targets are missed" section summarises the
    /// profiles (kernel and user share, top symbols and threads from `perf report --stdio`); the `perf.data`
    /// files stay next to the report. Without perf the report says why there is no profile.
    #[arg(long, num_args = 0..=1, default_missing_value = "1k:keep-alive:16", value_name = "POINT")]
    profile: Option<String>,
}

/// `v` sorted, without repeats.
fn dedup<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v.dedup();
    v
}

/// The flags with the defaults of the run resolved.
struct Settings {
    quick: bool,
    duration: u64,
    warmup: u64,
    concurrency: Vec<u32>,
    sizes: Vec<Size>,
    modes: Vec<Mode>,
    phases: Vec<Phase>,
    failover_conns: usize,
    failover_size: Size,
    before: u64,
    after: u64,
    scale: Vec<u64>,
    node_config: Option<String>,
    out: PathBuf,
    command_line: String,
    profile: Option<(Size, Mode, u32)>,
}

/// `SIZE:MODE:CONNECTIONS`, as `--profile` takes it.
fn parse_point(text: &str) -> Result<(Size, Mode, u32)> {
    let parts: Vec<&str> = text.split(':').collect();
    ensure!(parts.len() == 3, "--profile {text}: expected SIZE:MODE:CONNECTIONS, for example 1k:keep-alive:16");
    let size = Size::from_str(parts[0], true).map_err(|e| anyhow::anyhow!("--profile {text}: size: {e}"))?;
    let mode = Mode::from_str(parts[1], true).map_err(|e| anyhow::anyhow!("--profile {text}: mode: {e}"))?;
    let conns = parts[2].parse().with_context(|| format!("--profile {text}: connections"))?;
    Ok((size, mode, conns))
}

impl Settings {
    fn from(cli: &Cli) -> Result<Settings> {
        let q = cli.quick;
        let node_config = match &cli.node_config {
            Some(p) => Some(fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        Ok(Settings {
            quick: q,
            duration: cli.duration.unwrap_or(if q { 2 } else { 8 }),
            warmup: cli.warmup,
            concurrency: dedup(cli.concurrency.clone().unwrap_or(if q { vec![1, 16] } else { vec![1, 16, 64] })),
            sizes: dedup(cli.sizes.clone()),
            modes: dedup(cli.modes.clone()),
            phases: dedup(cli.phases.clone()),
            failover_conns: cli.failover_conns as usize,
            failover_size: cli.failover_size,
            before: cli.failover_before.unwrap_or(if q { 3 } else { 5 }),
            after: cli.failover_after.unwrap_or(if q { 4 } else { 8 }),
            scale: dedup(cli.scale.clone().unwrap_or(if q { vec![100, 1000] } else { vec![100, 1000, 10_000] })),
            node_config,
            out: cli.out.clone().unwrap_or_else(|| workspace_root().join("target/bench")),
            command_line: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
            profile: cli.profile.as_deref().map(parse_point).transpose()?,
        })
    }

    fn has(&self, p: Phase) -> bool {
        self.phases.contains(&p)
    }
}

fn main() {
    let cli = Cli::parse();
    tool::main("us-bench", cli.keep, || bench(&Settings::from(&cli)?))
}

// ---------------------------------------------------------------------------------------------------------
// Small helpers.

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// utime + stime of process `pid` (all its threads), if it exists.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64(ticks as f64 / hz))
}

/// Read and write system calls of process `pid` so far (`syscr`, `syscw` of `/proc/<pid>/io`: `read`,
/// `readv`, `write`, `writev` and the like, not `send` or `recv`), if it exists.
fn syscalls(pid: u32) -> Option<(u64, u64)> {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| io.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
    Some((field("syscr:")?, field("syscw:")?))
}

/// The children of process `pid` (from every process's parent PID in /proc).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Sleeps `d` in small steps, checking for SIGINT.
fn pause(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

/// Sends `sig` to `p` and waits up to `timeout` for it to exit; SIGKILL after that.
fn stop_proc(mut p: Proc, sig: i32, timeout: Duration) -> Result<()> {
    if p.try_wait()?.is_some() {
        return Ok(());
    }
    p.signal(sig)?;
    if p.wait(timeout).is_err() {
        let _ = p.signal(libc::SIGKILL);
        p.wait(Duration::from_secs(5))?;
    }
    Ok(())
}

/// Lines containing `needle` in every node log of the pair so far.
fn node_log_count(pair: &Pair, needle: &str) -> usize {
    pair.node_log_stems()
        .iter()
        .map(|stem| {
            fs::read_to_string(pair.dir.0.join(format!("{stem}.log")))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(needle))
                .count()
        })
        .sum()
}

/// Whether `host` has the VIP on its eth0.
fn has_vip(pair: &Pair, host: &str) -> bool {
    pair.tb
        .exec(host, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        .is_ok_and(|out| out.contains(&format!(" {VIP}/")))
}

/// Waits until a GET of `path` through the VIP from the client answers 200.
fn wait_serving(pair: &Pair, path: &str, timeout: Duration) -> Result<()> {
    let url = format!("http://{VIP}{path}");
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let code = pair.client(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", &url]);
        if code.as_deref().is_ok_and(|c| c.trim() == "200") {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{url} did not answer 200 from the client within {timeout:?}: {code:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------------------
// wrk.

const WRK_SCRIPT: &str = r#"-- us-bench: one summary line that us-bench parses.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%.0f duration_us=%.0f bytes=%.0f connect=%.0f read=%.0f write=%.0f status=%.0f timeout=%.0f p50_us=%.0f p99_us=%.0f p999_us=%.0f mean_us=%.1f max_us=%.0f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max))
end
"#;

/// What wrk measured for one point; latencies in µs.
#[derive(Debug, Clone, Default)]
struct WrkResult {
    requests: u64,
    secs: f64,
    bytes: u64,
    /// connect, read, write, status, timeout.
    errors: [u64; 5],
    p50: f64,
    p99: f64,
    p999: f64,
    mean: f64,
    max: f64,
}

impl WrkResult {
    fn rps(&self) -> f64 {
        if self.secs > 0.0 { self.requests as f64 / self.secs } else { 0.0 }
    }
    fn mbps(&self) -> f64 {
        if self.secs > 0.0 { self.bytes as f64 / self.secs / 1e6 } else { 0.0 }
    }
    fn error_total(&self) -> u64 {
        self.errors.iter().sum()
    }
    fn errors_text(&self) -> String {
        let names = ["connect", "read", "write", "status", "timeout"];
        let parts: Vec<String> =
            names.iter().zip(self.errors).filter(|&(_, n)| n > 0).map(|(name, n)| format!("{n} {name}")).collect();
        if parts.is_empty() { "0".into() } else { parts.join(", ") }
    }

    fn parse(out: &str) -> Result<WrkResult> {
        let line =
            out.lines().find(|l| l.starts_with("BENCH ")).with_context(|| format!("no summary from wrk:\n{out}"))?;
        let kv: BTreeMap<&str, f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let get = |k: &str| kv.get(k).copied().with_context(|| format!("wrk summary without {k}: {line}"));
        Ok(WrkResult {
            requests: get("requests")? as u64,
            secs: get("duration_us")? / 1e6,
            bytes: get("bytes")? as u64,
            errors: [
                get("connect")? as u64,
                get("read")? as u64,
                get("write")? as u64,
                get("status")? as u64,
                get("timeout")? as u64,
            ],
            p50: get("p50_us")?,
            p99: get("p99_us")?,
            p999: get("p999_us")?,
            mean: get("mean_us")?,
            max: get("max_us")?,
        })
    }
}

/// Runs wrk in the client host against the VIP and parses its summary.
fn run_wrk(pair: &Pair, dir: &Path, size: Size, mode: Mode, conns: u32, secs: u64, tag: &str) -> Result<WrkResult> {
    let script = dir.join("summary.lua");
    if !script.exists() {
        fs::write(&script, WRK_SCRIPT)?;
    }
    let (t, c, d) = (conns.min(2).to_string(), conns.to_string(), format!("{secs}s"));
    let url = format!("http://{VIP}{}", size.path());
    let script = script.to_str().context("path")?.to_string();
    let mut args = vec!["wrk", "-t", &t, "-c", &c, "-d", &d, "--timeout", "10s", "-s", &script];
    if mode == Mode::Close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let log = dir.join(format!("wrk-{tag}.log"));
    let mut p = pair.tb.spawn("wrk", "client", &args, &log)?;
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    loop {
        check_interrupted()?;
        if let Some(status) = p.try_wait()? {
            ensure!(status.success(), "wrk exited with {status}: {}", p.log_text());
            break;
        }
        ensure!(Instant::now() < deadline, "wrk did not finish within {} s: {}", secs + 30, p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    WrkResult::parse(&p.log_text())
}

// ---------------------------------------------------------------------------------------------------------
// The throughput matrix.

#[derive(Debug, Clone)]
struct Point {
    proxy: Proxy,
    size: Size,
    mode: Mode,
    conns: u32,
    wrk: WrkResult,
    /// CPU time of each proxy process over the point.
    cpu: Vec<(String, Duration)>,
    /// Read and write system calls of each proxy process over the point ([`syscalls`]).
    calls: Vec<(String, u64, u64)>,
    /// Something that makes the point doubtful (the pair lost its protection during it).
    note: Option<String>,
    /// TIME_WAIT sockets on the proxy's host when the point began (connection-per-request points).
    time_wait: Option<u64>,
    /// Client connections opened through this proxy in the 60 s before the point (wrk's, warm-ups included).
    recent_conns: u64,
}

impl Point {
    fn cpu_total(&self) -> Duration {
        self.cpu.iter().map(|c| c.1).sum()
    }
    fn cpu_per_request_us(&self) -> f64 {
        if self.wrk.requests == 0 { f64::NAN } else { self.cpu_total().as_secs_f64() * 1e6 / self.wrk.requests as f64 }
    }
    /// "primary 3.1 reads + 2.0 writes, backup ..." per request.
    fn calls_text(&self) -> String {
        let per = |n: u64| n as f64 / self.wrk.requests.max(1) as f64;
        let parts: Vec<String> = self
            .calls
            .iter()
            .map(|(name, r, w)| format!("{name} {:.2} reads + {:.2} writes", per(*r), per(*w)))
            .collect();
        if parts.is_empty() { "–".into() } else { parts.join(", ") }
    }
}

/// The processes whose CPU a point counts: (name, PID).
type Pids = Vec<(String, u32)>;

fn cpu_snapshot(pids: &Pids) -> Vec<Duration> {
    pids.iter().map(|(_, p)| cpu_time(*p).unwrap_or_default()).collect()
}

fn calls_snapshot(pids: &Pids) -> Vec<(u64, u64)> {
    pids.iter().map(|(_, p)| syscalls(*p).unwrap_or_default()).collect()
}

/// What went wrong with the pair's protection during the run, in order (for the report).
type Incidents = Vec<String>;

/// Brings the pair's roles in line with the nodes after a takeover nobody asked for (the backup judged a live
/// primary dead under load): the backup is then the primary, and the old primary (stepped down, or dead) is
/// dropped. Records the incident.
fn reconcile(pair: &mut Pair, clock: &Clock, incidents: &mut Incidents, during: &str) -> Result<()> {
    if pair.backup.is_none() {
        return Ok(());
    }
    let Ok(st) = pair.status(pair.backup_host()) else { return Ok(()) };
    if st["role"] != "primary" {
        return Ok(());
    }
    let f = st["failovers"].as_array().and_then(|f| f.last()).cloned().unwrap_or(Value::Null);
    let old = match pair.primary.as_mut().map(|p| p.try_wait()) {
        Some(Ok(Some(status))) => format!("the old primary exited ({status})"),
        Some(Ok(None)) => "the old primary still runs".to_string(),
        _ => "the old primary is gone".to_string(),
    };
    let text = format!(
        "during {during}: the backup on {} took over a live primary ({}; {} connections restored, {} lost); {old}",
        pair.backup_host(),
        f["reason"].as_str().unwrap_or("?"),
        f["connections_restored"],
        f["connections_lost"]
    );
    clock.line(&text);
    incidents.push(text);
    pair.promoted()
}

/// Makes sure the pair is protected: reconciles an unasked takeover, starts a spare if there is none, and
/// waits for both `/status` to say `connected`.
fn ensure_protected(pair: &mut Pair, clock: &Clock, incidents: &mut Incidents, during: &str) -> Result<()> {
    reconcile(pair, clock, incidents, during)?;
    if pair.backup.is_none() {
        pair.start_spare()?;
    }
    pair.wait_protected(Duration::from_secs(90))
}

/// Log lines that say the pair's protection was in doubt: the primary suspected its backup, or the backup its
/// primary.
fn suspicions(pair: &Pair) -> usize {
    node_log_count(pair, "backup suspected") + node_log_count(pair, "primary suspected")
}

/// Whether the pair stayed protected since `suspected` (from [`suspicions`]) at `epoch`: `None` if it did,
/// else what was seen.
fn protection_lost(pair: &Pair, suspected: usize, epoch: &Value) -> Option<String> {
    let primary = pair.status(pair.primary_host).ok();
    let backup = pair.status(pair.backup_host()).ok();
    let still =
        primary.as_ref().is_some_and(|p| p["role"] == "primary" && p["peer"] == "connected" && p["epoch"] == *epoch)
            && backup.as_ref().is_some_and(|b| b["role"] == "backup" && b["peer"] == "connected");
    let more = suspicions(pair) - suspected;
    (!still || more > 0).then(|| {
        format!(
            "the pair lost its protection ({more} suspicions in the nodes' logs; after it the primary's peer is {}, the \
             backup's role {})",
            primary.as_ref().map_or(Value::Null, |p| p["peer"].clone()),
            backup.as_ref().map_or(Value::Null, |b| b["role"].clone())
        )
    })
}

fn understudy_pids(pair: &Pair, proxy: Proxy) -> Pids {
    let mut pids = Vec::new();
    if let Some(p) = &pair.primary {
        pids.push(("primary".to_string(), p.pid()));
    }
    if proxy == Proxy::B
        && let Some(b) = &pair.backup
    {
        pids.push(("backup".to_string(), b.pid()));
    }
    pids
}

fn nginx_pids(master: &Proc) -> Pids {
    let mut pids = vec![("nginx master".to_string(), master.pid())];
    pids.extend(children(master.pid()).into_iter().map(|p| ("nginx worker".to_string(), p)));
    pids
}

/// Runs every point of the matrix against the proxy now on the VIP. A point of (b) during which the pair lost
/// its protection is measured once more; the incident is recorded either way. `history` holds (when a wrk run
/// ended, the client connections it opened) for the proxy processes measured: (a) and (b) share the primary.
#[allow(clippy::too_many_arguments)]
fn run_matrix(
    s: &Settings,
    pair: &mut Pair,
    clock: &Clock,
    proxy: Proxy,
    nginx: Option<&Proc>,
    points: &mut Vec<Point>,
    incidents: &mut Incidents,
    history: &mut Vec<(Instant, u64)>,
    profiles: &mut Vec<Profile>,
) -> Result<()> {
    let dir = pair.dir.0.clone();
    let opened = |w: &WrkResult, mode: Mode, conns: u32| if mode == Mode::Close { w.requests } else { conns as u64 };
    for &size in &s.sizes {
        for &mode in &s.modes {
            for &conns in &s.concurrency {
                let what = format!("{} {} {} c={conns}", proxy.label(), size.label(), mode.label());
                for attempt in 1..=2 {
                    check_interrupted()?;
                    if proxy == Proxy::B {
                        ensure_protected(pair, clock, incidents, &what)?;
                    }
                    let tag = format!("{}-{size:?}-{mode:?}-{conns}-{attempt}", proxy.short());
                    if s.warmup > 0 {
                        let w = run_wrk(pair, &dir, size, mode, conns, s.warmup, &format!("{tag}-warmup"))?;
                        history.push((Instant::now(), opened(&w, mode, conns)));
                    }
                    if proxy == Proxy::B {
                        ensure_protected(pair, clock, incidents, &format!("the warm-up of {what}"))?;
                    }
                    let pids = match nginx {
                        Some(n) => nginx_pids(n),
                        None => understudy_pids(pair, proxy),
                    };
                    let suspected = suspicions(pair);
                    let epoch = pair.status(pair.primary_host).map(|st| st["epoch"].clone()).unwrap_or(Value::Null);
                    // The server side closes first in connection-per-request points: its TIME_WAIT sockets pile up
                    // from one point to the next (60 s each), and a client port may meet one of them again.
                    let host = if nginx.is_some() { "server" } else { pair.primary_host };
                    let time_wait = (mode == Mode::Close)
                        .then(|| pair.tb.exec(host, &["ss", "-Htan", "state", "time-wait"]).ok())
                        .flatten()
                        .map(|out| out.lines().count() as u64);
                    let recent_conns = history
                        .iter()
                        .filter(|(t, _)| t.elapsed() < Duration::from_secs(60))
                        .map(|(_, n)| n)
                        .sum::<u64>();
                    let (before, calls_before) = (cpu_snapshot(&pids), calls_snapshot(&pids));
                    let wrk = run_wrk(pair, &dir, size, mode, conns, s.duration, &tag)?;
                    history.push((Instant::now(), opened(&wrk, mode, conns)));
                    let (after, calls_after) = (cpu_snapshot(&pids), calls_snapshot(&pids));
                    let cpu = pids
                        .iter()
                        .zip(before.iter().zip(&after))
                        .map(|((name, _), (b, a))| (name.clone(), a.saturating_sub(*b)))
                        .collect();
                    let calls = pids
                        .iter()
                        .zip(calls_before.iter().zip(&calls_after))
                        .map(|((name, _), (b, a))| (name.clone(), a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)))
                        .collect();
                    let mut note = None;
                    if proxy == Proxy::B
                        && let Some(why) = protection_lost(pair, suspected, &epoch)
                    {
                        incidents.push(format!("during {what} (attempt {attempt}): {why}"));
                        reconcile(pair, clock, incidents, &what)?;
                        if attempt == 1 {
                            clock.line(&format!("{what}: {why}; measuring it once more"));
                            continue;
                        }
                        note = Some(format!("in both attempts, {why}"));
                    }
                    let p = Point { proxy, size, mode, conns, wrk, cpu, calls, note, time_wait, recent_conns };
                    clock.line(&format!(
                        "{what}: {:.0} req/s ({:.1} MB/s), p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, CPU {:.1} \
                         µs/request ({}), errors {}{}",
                        p.wrk.rps(),
                        p.wrk.mbps(),
                        p.wrk.p50,
                        p.wrk.p99,
                        p.wrk.p999,
                        p.cpu_per_request_us(),
                        p.calls_text(),
                        p.wrk.errors_text(),
                        p.note.as_ref().map(|n| format!(" — {n}")).unwrap_or_default()
                    ));
                    points.push(p);
                    if proxy != Proxy::C && s.profile == Some((size, mode, conns)) {
                        profiles.extend(profile_point(s, pair, clock, proxy, size, mode, conns, &pids)?);
                    }
                    break;
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Profiles (`--profile`).

/// One process's CPU profile over one more run of a point.
#[derive(Debug, Clone)]
struct Profile {
    proxy: Proxy,
    node: String,
    /// "1 KiB keep-alive c=16".
    point: String,
    /// Throughput of the profiled run (perf running).
    rps: f64,
    data: PathBuf,
    /// What `perf report` made of it, or why there is none.
    summary: Result<ProfileSummary, String>,
}

#[derive(Debug, Clone, Default)]
struct ProfileSummary {
    samples: String,
    /// Share of the samples in the kernel, percent.
    kernel: f64,
    /// (percent, symbol) by self time, highest first.
    symbols: Vec<(f64, String)>,
    /// (percent, thread name).
    threads: Vec<(f64, String)>,
    /// (percent, system call) by time in the call and everything under it, highest first.
    syscalls: Vec<(f64, String)>,
}

/// Records every process of `pids` with perf during one more wrk run of the point; a perf that cannot run
/// gives profiles that say why.
#[allow(clippy::too_many_arguments)]
fn profile_point(
    s: &Settings,
    pair: &Pair,
    clock: &Clock,
    proxy: Proxy,
    size: Size,
    mode: Mode,
    conns: u32,
    pids: &Pids,
) -> Result<Vec<Profile>> {
    let dir = pair.dir.0.clone();
    let point = format!("{} {} c={conns}", size.label(), mode.label());
    let secs = s.duration.max(2);
    let mut perfs = Vec::new();
    for (name, pid) in pids {
        let data = s.out.join(format!("perf-{}-{name}.data", proxy.short()));
        let _ = fs::remove_file(&data);
        let mut cmd = std::process::Command::new("perf");
        let (pid, secs, out) = (pid.to_string(), secs.to_string(), data.to_string_lossy().into_owned());
        cmd.args(["record", "-q", "-e", "cpu-clock", "-F", "4000", "-g", "-p", &pid, "-o", &out, "--", "sleep", &secs]);
        let log = dir.join(format!("perf-{}-{name}.log", proxy.short()));
        let started = pair.tb.spawn_command("perf", cmd, &log).map_err(|e| format!("perf did not start: {e:#}"));
        perfs.push((name.clone(), data, started));
    }
    // perf attaches within a moment; wrk runs past the recording's end so that every sample is under load.
    pause(Duration::from_millis(300))?;
    clock.line(&format!("{} {point}: profiling ({secs} s, perf record -e cpu-clock -g)", proxy.label()));
    let wrk = run_wrk(pair, &dir, size, mode, conns, secs + 1, &format!("{}-profile", proxy.short()))?;
    let mut out = Vec::new();
    for (node, data, started) in perfs {
        let summary = started.and_then(|mut p| {
            let status = p.wait(Duration::from_secs(30)).map_err(|e| format!("perf record did not end: {e:#}"))?;
            let log = p.log_text();
            if !status.success() || !data.exists() {
                return Err(format!(
                    "perf record failed ({status}): {}",
                    log.lines().last().unwrap_or_default().trim()
                ));
            }
            summarise_profile(&data)
        });
        match &summary {
            Ok(x) => clock.line(&format!(
                "{} {point}: {node}: {}, kernel {:.0} %, system calls: {}",
                proxy.label(),
                x.samples,
                x.kernel,
                x.syscalls.iter().take(4).map(|(p, n)| format!("{n} {p:.1} %")).collect::<Vec<_>>().join(", ")
            )),
            Err(e) => clock.line(&format!("{} {point}: {node}: no profile: {e}", proxy.label())),
        }
        out.push(Profile { proxy, node, point: point.clone(), rps: wrk.rps(), data, summary });
    }
    Ok(out)
}

/// `perf report --stdio` of `data`, sorted by `sort`, without call graphs: (percent, name) lines and the
/// header's sample count. The percent is self time, or with `children` the time in the entry and below it.
fn perf_report(data: &Path, sort: &str, children: bool) -> Result<(String, Vec<(f64, String)>), String> {
    let input = data.to_string_lossy();
    let out = std::process::Command::new("perf")
        .args(["report", "-i", &input, "--stdio", "-g", "none", "--percent-limit", "0.5"])
        .arg(if children { "--children" } else { "--no-children" })
        .args(["--sort", sort])
        .output()
        .map_err(|e| format!("perf report did not run: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("perf report failed: {}", err.lines().last().unwrap_or_default().trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let samples = text
        .lines()
        .find_map(|l| l.strip_prefix("# Samples: "))
        .map_or_else(|| "? samples".into(), |v| format!("{} samples", v.split_whitespace().next().unwrap_or("?")));
    let rows = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (pct, rest) = l.trim_start().split_once('%')?;
            // With children, the self percentage follows the inclusive one.
            let rest = if children { rest.trim_start().split_once('%')?.1 } else { rest };
            Some((pct.trim().parse::<f64>().ok()?, rest.trim().to_string()))
        })
        .collect();
    Ok((samples, rows))
}

fn summarise_profile(data: &Path) -> Result<ProfileSummary, String> {
    let (samples, dsos) = perf_report(data, "dso", false)?;
    let kernel = dsos.iter().filter(|(_, d)| d.starts_with("[kernel")).map(|(p, _)| p).sum();
    let (_, symbols) = perf_report(data, "sym", false)?;
    let (_, threads) = perf_report(data, "comm", false)?;
    // Kernel call chains are whole (user ones are not: the release build has no frame pointers), so the
    // system calls' entry points give each call's share, with the network stack work it did.
    let (_, inclusive) = perf_report(data, "sym", true)?;
    let syscalls = inclusive
        .into_iter()
        .filter_map(|(p, n)| {
            // `writev` and `readv` enter their `do_` function directly on recent kernels.
            let vectored = ["[k] do_writev", "[k] do_readv"].contains(&n.as_str());
            let name = n.strip_prefix("[k] __x64_sys_").or_else(|| n.strip_prefix("[k] do_").filter(|_| vectored))?;
            Some((p, name.to_string()))
        })
        .take(8)
        .collect();
    Ok(ProfileSummary {
        samples,
        kernel,
        symbols: symbols.into_iter().take(12).collect(),
        threads: threads.into_iter().take(6).collect(),
        syscalls,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Failover under load.

#[derive(Debug, Clone)]
struct FailoverResult {
    label: String,
    record: LoadRecord,
    conns: usize,
    /// The kill, relative to the load's start.
    kill_at: Duration,
    /// The first bucket starts this long before the kill.
    lead: Duration,
    /// Completions per [`BUCKET`] from `kill_at - lead` to the end.
    buckets: Vec<u64>,
    baseline_rps: f64,
    recovery: Recovery,
    rst_on_wire: Option<u64>,
    /// What the surviving side reported: understudy's failovers[] entry, or when the VIP appeared on the
    /// keepalived backup.
    takeover: Value,
    takeover_text: String,
    /// What went wrong before the kill (a keepalived backup that became master, ...).
    notes: Vec<String>,
}

impl FailoverResult {
    #[allow(clippy::too_many_arguments)]
    fn analyse(
        label: &str,
        record: LoadRecord,
        conns: usize,
        kill_at: Duration,
        before: Duration,
        rst_on_wire: Option<u64>,
        takeover: Value,
        takeover_text: String,
    ) -> FailoverResult {
        // The baseline: up to 3 s before the kill, leaving out the load's first second.
        let lead = before.saturating_sub(Duration::from_secs(1)).min(Duration::from_secs(3));
        let lead = BUCKET * (lead.as_millis() / BUCKET.as_millis()) as u32;
        let times = record.times();
        let buckets = per_bucket(&times, kill_at - lead, record.ended, BUCKET);
        let n_before = (lead.as_millis() / BUCKET.as_millis()) as usize;
        // The median bucket: a stall of the machine before the kill does not lower it.
        let mut base: Vec<u64> = buckets[..n_before.min(buckets.len())].to_vec();
        base.sort_unstable();
        let baseline = base.get(base.len() / 2).copied().unwrap_or(0) as f64;
        let recovery = recovery(buckets.get(n_before..).unwrap_or(&[]), baseline, RECOVERED, RECOVERY_WINDOW);
        FailoverResult {
            label: label.into(),
            record,
            conns,
            kill_at,
            lead,
            buckets,
            baseline_rps: baseline / BUCKET.as_secs_f64(),
            recovery,
            rst_on_wire,
            takeover,
            takeover_text,
            notes: Vec::new(),
        }
    }

    fn errors(&self) -> usize {
        self.record.failed.len()
    }
    fn resets(&self) -> usize {
        self.record.count(Failure::Reset)
    }
    /// The longest wait of a request that completed after the kill (or was still waiting at the end), and when
    /// it began.
    fn stall_across(&self) -> (Duration, Duration) {
        self.record.longest_wait_ending(self.kill_at, Duration::MAX)
    }
    fn stall(&self) -> Duration {
        self.stall_across().0
    }
    /// The longest wait of a request that completed before the kill: the machine's own hiccups.
    fn stall_before(&self) -> Duration {
        self.record.longest_wait_ending(Duration::ZERO, self.kill_at).0
    }
    /// The longest time with no completion at all, from the kill on.
    fn gap(&self) -> Duration {
        longest_gap(&self.record.times(), self.kill_at, self.record.ended).0
    }
    /// The same in the baseline window before the kill.
    fn gap_before(&self) -> Duration {
        longest_gap(&self.record.times(), self.kill_at - self.lead, self.kill_at).0
    }
    fn recovery_text(&self) -> String {
        match self.recovery {
            Recovery::NoDip => "no dip below 90 %".into(),
            Recovery::After(k) => format!("{:.0} ms", ms(BUCKET * k as u32)),
            Recovery::Never => format!("not within {:.1} s", (self.record.ended - self.kill_at).as_secs_f64()),
        }
    }
    fn recovery_ms(&self) -> Option<f64> {
        match self.recovery {
            Recovery::NoDip => Some(0.0),
            Recovery::After(k) => Some(ms(BUCKET * k as u32)),
            Recovery::Never => None,
        }
    }
    /// (seconds from the kill at the bucket's middle, requests/s).
    fn series(&self) -> Vec<(f64, f64)> {
        let w = BUCKET.as_secs_f64();
        self.buckets
            .iter()
            .enumerate()
            .map(|(k, &c)| ((k as f64 + 0.5) * w - self.lead.as_secs_f64(), c as f64 / w))
            .collect()
    }

    /// Prints the throughput per 100 ms from 1 s before the kill to 3 s after it.
    fn print_series(&self) {
        println!("  {}: requests per 100 ms (10 per line), from 1 s before the kill:", self.label);
        let start = self.lead.saturating_sub(Duration::from_secs(1));
        let first = (start.as_millis() / BUCKET.as_millis()) as usize;
        let rows: Vec<&u64> = self.buckets.iter().skip(first).take(40).collect();
        for (i, row) in rows.chunks(10).enumerate() {
            let t = i as f64 - 1.0;
            let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
            println!("    {t:+.1} s {}", cells.join(""));
        }
    }

    fn write_csv(&self, out: &Path, stem: &str) -> Result<()> {
        let mut s = String::from("t_from_kill_s,requests_per_s\n");
        for (t, r) in self.series() {
            let _ = writeln!(s, "{t:.2},{r:.0}");
        }
        fs::write(out.join(format!("{stem}.csv")), s)?;
        let mut s = String::from("completed_at_s_from_kill,conn,latency_ms,attempts\n");
        for d in &self.record.done {
            let t = d.at.as_secs_f64() - self.kill_at.as_secs_f64();
            let _ = writeln!(s, "{t:.6},{},{:.3},{}", d.conn, ms(d.latency), d.attempts);
        }
        fs::write(out.join(format!("{stem}-requests.csv")), s)?;
        let mut s = String::from("at_s_from_kill,conn,kind,connecting,error\n");
        for f in &self.record.failed {
            let t = f.at.as_secs_f64() - self.kill_at.as_secs_f64();
            let _ =
                writeln!(s, "{t:.6},{},{},{},\"{}\"", f.conn, f.kind.name(), f.connecting, f.text.replace('"', "'"));
        }
        fs::write(out.join(format!("{stem}-errors.csv")), s)?;
        Ok(())
    }

    fn json(&self) -> Value {
        let kinds: BTreeMap<&str, usize> = Failure::ALL.iter().map(|&k| (k.name(), self.record.count(k))).collect();
        let (stall, stall_began) = self.stall_across();
        json!({
            "label": self.label,
            "connections": self.conns,
            "requests": self.record.done.len(),
            "failed_attempts": self.errors(),
            "failed_by_kind": kinds,
            "requests_retried": self.record.retried(),
            "connects": self.record.connects,
            "rst_segments_from_vip": self.rst_on_wire,
            "longest_stall_ms": ms(stall),
            "longest_stall_began_s_from_kill": stall_began.as_secs_f64() - self.kill_at.as_secs_f64(),
            "longest_gap_ms": ms(self.gap()),
            "longest_stall_before_kill_ms": ms(self.stall_before()),
            "longest_gap_before_kill_ms": ms(self.gap_before()),
            "notes": self.notes,
            "baseline_rps": self.baseline_rps,
            "recovery_90_ms": self.recovery_ms(),
            "takeover": self.takeover,
        })
    }
}

/// The failover load running on the VIP, with the client-side RST capture.
struct FailoverLoad {
    label: String,
    load: Load,
    capture: Option<Capture>,
    kill_at: Option<Duration>,
}

impl FailoverLoad {
    fn start(s: &Settings, pair: &Pair, clock: &Clock, label: &str, stem: &str) -> Result<FailoverLoad> {
        let size = s.failover_size;
        let spec = LoadSpec {
            addr: format!("{VIP}:{PORT}").parse()?,
            host: VIP.into(),
            path: size.path().into(),
            body: size.body(),
            conns: s.failover_conns,
            timeout: Duration::from_secs(30),
            retry_pause: Duration::from_millis(10),
        };
        let pcap = pair.dir.0.join(format!("{stem}-rst.pcap"));
        let capture = match Capture::start(&pair.tb, "client", "eth0", RST_FILTER, 128, &pcap) {
            Ok(c) => Some(c),
            Err(e) => {
                clock.line(&format!("no RST capture ({e:#}); resets are counted by the client only"));
                None
            }
        };
        let load = Load::start(&pair.tb.ns("client"), spec)?;
        Ok(FailoverLoad { label: label.into(), load, capture, kill_at: None })
    }

    /// Lets the load run until `until` after its start, with a progress line every second.
    fn run_until(&self, clock: &Clock, until: Duration, what: &str) -> Result<()> {
        let mut next = Instant::now() + Duration::from_secs(1);
        let mut last = self.load.live.done.load(Ordering::Relaxed);
        while self.load.base.elapsed() < until {
            check_interrupted()?;
            ensure!(!self.load.is_finished(), "the load stopped early");
            if Instant::now() >= next {
                next += Duration::from_secs(1);
                let done = self.load.live.done.load(Ordering::Relaxed);
                clock.line(&format!(
                    "{} {what}: {} requests/s, {} failed attempts so far",
                    self.label,
                    done - last,
                    self.load.live.failed.load(Ordering::Relaxed)
                ));
                last = done;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Marks the kill (called right before it); returns its time since the load's start.
    fn mark_kill(&mut self) -> Duration {
        let at = self.load.base.elapsed();
        self.kill_at = Some(at);
        at
    }

    /// Stops the load and the capture; analyses.
    fn finish(self, s: &Settings, clock: &Clock, takeover: Value, takeover_text: String) -> Result<FailoverResult> {
        let kill_at = self.kill_at.context("the load ended before the kill")?;
        let record = self.load.stop()?;
        let rst = match self.capture {
            Some(c) => Some(c.stop()?.captured),
            None => None,
        };
        let label = self.label;
        let r = FailoverResult::analyse(
            &label,
            record,
            s.failover_conns,
            kill_at,
            Duration::from_secs(s.before),
            rst,
            takeover,
            takeover_text,
        );
        r.print_series();
        clock.line(&format!(
            "{label}: {} requests, {} failed attempts ({} resets), {} RST from the VIP on the wire, longest stall \
             {:.0} ms, longest time without a completion {:.0} ms, back to 90 % of {:.0} req/s: {}",
            r.record.done.len(),
            r.errors(),
            r.resets(),
            r.rst_on_wire.map_or("?".into(), |n| n.to_string()),
            ms(r.stall()),
            ms(r.gap()),
            r.baseline_rps,
            r.recovery_text()
        ));
        Ok(r)
    }
}

// ---------------------------------------------------------------------------------------------------------
// The takeover's scale.

#[derive(Debug, Clone)]
struct ScalePoint {
    n: u64,
    opened: usize,
    open_failed: usize,
    protected_before: u64,
    failover: Value,
    report: bench_load::IdleReport,
}

fn scale_point(pair: &mut Pair, clock: &Clock, n: u64, incidents: &mut Incidents) -> Result<ScalePoint> {
    ensure_protected(pair, clock, incidents, &format!("scale {n}"))?;
    let suspected = suspicions(pair);
    let epoch = pair.status(pair.primary_host).map(|st| st["epoch"].clone()).unwrap_or(Value::Null);
    let spec = IdleSpec {
        addr: format!("{VIP}:{PORT}").parse()?,
        host: VIP.into(),
        path: Size::K1.path().into(),
        body: Size::K1.body(),
        count: n as usize,
        concurrency: 100,
        timeout: Duration::from_secs(30),
    };
    let idle = IdleConns::open(&pair.tb.ns("client"), spec)?;
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_millis(20) * n as u32;
    let mut next = Instant::now() + Duration::from_secs(1);
    while !idle.settled() {
        check_interrupted()?;
        ensure!(!idle.is_finished(), "the idle connections' client stopped early");
        ensure!(Instant::now() < deadline, "the {n} idle connections did not open in time ({:?})", idle.opening());
        if Instant::now() >= next {
            next += Duration::from_secs(1);
            clock.line(&format!("scale {n}: {} connections open", idle.opening().0));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (opened, open_failed) = idle.opening();
    // The primary counts them protected once the backup holds them.
    let st = pair.wait_status(pair.primary_host, "the connections to be protected", Duration::from_secs(60), |st| {
        st["connections"]["protected"].as_u64().is_some_and(|p| p >= opened as u64)
    });
    let protected_before = match st {
        Ok(st) => st["connections"]["protected"].as_u64().unwrap_or(0),
        Err(_) => {
            let st = pair.status(pair.primary_host)?;
            clock.line(&format!("scale {n}: not every connection is protected: {}", st["connections"]));
            st["connections"]["protected"].as_u64().unwrap_or(0)
        }
    };
    pause(Duration::from_millis(500))?;
    if let Some(why) = protection_lost(pair, suspected, &epoch) {
        incidents.push(format!("during scale {n}, while the connections opened: {why}"));
        ensure_protected(pair, clock, incidents, &format!("scale {n}"))?;
    }
    pair.wait_protected(Duration::from_secs(30))?;
    clock.line(&format!("scale {n}: {opened} open ({protected_before} protected); killing the primary (kill -9)"));
    pair.kill_primary()?;
    let taken = pair.wait_taken_over(Duration::from_secs(90))?;
    pair.promoted()?;
    let f = taken["failovers"].as_array().and_then(|f| f.last()).cloned().unwrap_or(Value::Null);
    clock.line(&format!(
        "scale {n}: taken over: restore {:.1} ms, total {:.1} ms, {} restored, {} lost; second request on each",
        f["restore_ms"].as_f64().unwrap_or(f64::NAN),
        f["total_ms"].as_f64().unwrap_or(f64::NAN),
        f["connections_restored"],
        f["connections_lost"]
    ));
    idle.second_round();
    let deadline = Instant::now() + Duration::from_secs(90) + Duration::from_millis(5) * n as u32;
    while idle.second_done() < opened {
        check_interrupted()?;
        if Instant::now() >= deadline {
            clock.line(&format!("scale {n}: only {} of {opened} second requests finished in time", idle.second_done()));
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = idle.finish()?;
    clock.line(&format!(
        "scale {n}: second requests {} ok, {} failed, {} broke while idle; p50 {:.1} ms, max {:.1} ms",
        report.second_ok,
        report.second_failed,
        report.broke_while_idle,
        ms(percentile(&report.second_latency, 50.0)),
        ms(report.second_latency.last().copied().unwrap_or_default())
    ));
    // The clients closed their connections; let the new primary see them go before the next point.
    let _ = pair.wait_status(pair.primary_host, "the closed connections to go", Duration::from_secs(30), |st| {
        st["connections"]["total"].as_u64().is_some_and(|t| t < 10)
    });
    Ok(ScalePoint { n, opened, open_failed, protected_before, failover: f, report })
}

// ---------------------------------------------------------------------------------------------------------
// nginx and keepalived.

/// Starts nginx as a reverse proxy to the origin on `host` (port 80, every address), two workers.
fn start_nginx_proxy(pair: &Pair, host: &str) -> Result<Proc> {
    let d = pair.dir.0.join(format!("nginx-proxy-{host}"));
    fs::create_dir_all(&d)?;
    let dd = d.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {dd}/nginx.pid;\nerror_log {dd}/error.log warn;\n\
         worker_rlimit_nofile 65536;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log {dd}/access.log;\n  client_body_temp_path {dd}/body;\n  proxy_temp_path {dd}/proxy;\n\
         fastcgi_temp_path {dd}/fastcgi;\n  uwsgi_temp_path {dd}/uwsgi;\n  scgi_temp_path {dd}/scgi;\n\
         keepalive_requests 1000000;\n  keepalive_timeout 75s;\n\
         upstream origin {{ server {ORIGIN}; keepalive 64; }}\n\
         server {{\n    listen {PORT} backlog=4096;\n    location / {{\n      proxy_pass http://origin;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
         proxy_buffers 16 16k;\n      proxy_max_temp_file_size 0;\n    }}\n  }}\n}}\n"
    );
    let conf_path = d.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let p = d.to_str().context("path")?;
    let c = conf_path.to_str().context("path")?;
    let mut proc = pair.tb.spawn("nginx proxy", host, &["nginx", "-p", p, "-c", c], &d.join("stdout.log"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        check_interrupted()?;
        if let Some(status) = proc.try_wait()? {
            bail!("nginx on {host} exited ({status}): {}", fs::read_to_string(d.join("error.log")).unwrap_or_default());
        }
        let listening = pair.tb.exec(host, &["ss", "-Hltn", &format!("sport = :{PORT}")])?;
        if !listening.trim().is_empty() && children(proc.pid()).len() >= 2 {
            return Ok(proc);
        }
        ensure!(Instant::now() < deadline, "nginx on {host} did not listen within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts keepalived (VRRP only) on `host` for the VIP on eth0.
fn start_keepalived(pair: &Pair, host: &str, master: bool) -> Result<Proc> {
    let d = pair.dir.0.join(format!("keepalived-{host}"));
    fs::create_dir_all(&d)?;
    let conf = format!(
        "global_defs {{\n  router_id us_bench_{host}\n  vrrp_version 3\n}}\n\
         vrrp_instance VI_BENCH {{\n  state {state}\n  interface eth0\n  virtual_router_id 51\n  priority {prio}\n\
         advert_int 0.01\n  virtual_ipaddress {{\n    {VIP}/24 dev eth0\n  }}\n}}\n",
        state = if master { "MASTER" } else { "BACKUP" },
        prio = if master { 150 } else { 100 }
    );
    let conf_path = d.join("keepalived.conf");
    fs::write(&conf_path, conf)?;
    let path = |name: &str| d.join(name).to_str().map(str::to_owned).context("path");
    let args = [
        "keepalived".to_string(),
        "--dont-fork".into(),
        "--log-console".into(),
        "--log-detail".into(),
        "--no-syslog".into(),
        "--dont-respawn".into(),
        "--vrrp".into(),
        "--use-file".into(),
        path("keepalived.conf")?,
        "--pid".into(),
        path("keepalived.pid")?,
        "--vrrp_pid".into(),
        path("vrrp.pid")?,
        "--checkers_pid".into(),
        path("checkers.pid")?,
        "--bfd_pid".into(),
        path("bfd.pid")?,
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = pair.tb.spawn("keepalived", host, &argv, &d.join("keepalived.log"))?;
    let want = if master { "Entering MASTER STATE" } else { "Entering BACKUP STATE" };
    proc.wait_for_log(want, Duration::from_secs(15))?;
    Ok(proc)
}

/// Removes what the nodes may have left in `host` (its own namespace of this run's test bed): iptables,
/// arptables and nftables rules and the VIP.
fn clear_host(pair: &Pair, host: &str) -> Result<()> {
    let script = format!(
        "for t in raw mangle nat filter; do iptables -t $t -F 2>/dev/null; iptables -t $t -X 2>/dev/null; done; \
         arptables -F 2>/dev/null; nft flush ruleset 2>/dev/null; \
         ip addr del {VIP}/24 dev eth0 2>/dev/null; true"
    );
    pair.tb.exec(host, &["sh", "-c", &script]).map(drop)
}

// ---------------------------------------------------------------------------------------------------------
// The run.

fn bench(s: &Settings) -> Result<bool> {
    let clock = Clock(Instant::now());
    let started_wall = std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output();
    let started_wall = started_wall.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let load_start = loadavg();
    let max_scale = if s.has(Phase::Scale) { s.scale.iter().copied().max().unwrap_or(0) } else { 0 };
    understudy_tests::tool::raise_open_files(max_scale + 8192)?;
    fs::create_dir_all(&s.out).with_context(|| format!("creating {}", s.out.display()))?;

    let id = unique_id('b');
    let dir = std::env::temp_dir().join(format!("understudy-{id}-{}", std::process::id()));
    let config = dir.join("bench.toml");
    let opts = PairOptions {
        node_flags: vec!["--config".into(), config.to_str().context("path")?.into()],
        ..PairOptions::default()
    };
    clock.line(&format!("test bed {id}: origin nginx (1k.bin, 1m.bin), primary on server, backup on spare"));
    let mut pair = Pair::up(&id, &opts, |www| {
        let scratch = www.parent().context("www has no parent")?;
        let extra = s.node_config.as_deref().unwrap_or_default();
        fs::write(
            scratch.join("bench.toml"),
            format!("[limits]\nidle_timeout = \"30m\"\nmax_connections = {}\n\n{extra}\n", max_scale + 4096),
        )?;
        for size in [Size::K1, Size::M1] {
            pattern::write_file(&www.join(&size.path()[1..]), size.key(), size.len())?;
        }
        check_interrupted()
    })?;
    ensure!(pair.dir.0 == dir, "the scratch directory is {}, not {}", pair.dir.0.display(), dir.display());
    if std::env::var_os("UNDERSTUDY_KEEP").is_some() {
        clock.line(&format!("scratch directory (kept): {}", dir.display()));
    }
    // Connection-per-request points open tens of thousands of connections.
    pair.client(&["sh", "-c", "echo '10000 64999' > /proc/sys/net/ipv4/ip_local_port_range"])?;
    wait_serving(&pair, Size::K1.path(), Duration::from_secs(10))?;

    let mut points: Vec<Point> = Vec::new();
    let mut loads: Vec<(String, String)> = vec![("start".into(), load_start)];
    let mut fail_d = None;
    let mut fail_e = None;
    let mut scale = Vec::new();
    let mut incidents = Incidents::new();
    let (mut primary_history, mut nginx_history) = (Vec::new(), Vec::new());
    let mut profiles = Vec::new();

    if s.has(Phase::B) {
        loads.push(("(b)".into(), loadavg()));
        clock.line("(b) the replicated pair");
        run_matrix(
            s,
            &mut pair,
            &clock,
            Proxy::B,
            None,
            &mut points,
            &mut incidents,
            &mut primary_history,
            &mut profiles,
        )?;
    }
    if s.has(Phase::A) {
        loads.push(("(a)".into(), loadavg()));
        clock.line("(a) the primary alone: killing the backup");
        reconcile(&mut pair, &clock, &mut incidents, "(b)")?;
        if pair.backup.is_some() {
            pair.kill_backup()?;
        }
        pair.wait_status(pair.primary_host, "the primary to serve unprotected", Duration::from_secs(10), |st| {
            st["peer"] == "none"
        })?;
        run_matrix(
            s,
            &mut pair,
            &clock,
            Proxy::A,
            None,
            &mut points,
            &mut incidents,
            &mut primary_history,
            &mut profiles,
        )?;
    }
    if s.has(Phase::D) {
        loads.push(("(d)".into(), loadavg()));
        clock.line("(d) failover of the pair under load");
        // A takeover of the live primary under the load itself (before the kill) spoils the measurement: it is
        // recorded, and the load starts over once.
        let mut attempt = 0;
        let mut fl = loop {
            attempt += 1;
            ensure_protected(&mut pair, &clock, &mut incidents, "(d) before the load")?;
            pause(Duration::from_secs(1))?;
            pair.wait_protected(Duration::from_secs(30))?;
            let suspected = suspicions(&pair);
            let epoch = pair.status(pair.primary_host).map(|st| st["epoch"].clone()).unwrap_or(Value::Null);
            let fl = FailoverLoad::start(s, &pair, &clock, "(d) understudy pair", "failover-d")?;
            fl.run_until(&clock, Duration::from_secs(s.before), "before the kill")?;
            let Some(why) = protection_lost(&pair, suspected, &epoch) else { break fl };
            drop(fl);
            incidents.push(format!("during (d), before the kill (attempt {attempt}): {why}"));
            reconcile(&mut pair, &clock, &mut incidents, "(d) before the kill")?;
            ensure!(attempt < 2, "(d): the pair lost its protection under the load before the kill, twice: {why}");
            clock.line(&format!("(d): {why}; starting the load over"));
        };
        let backup_host = pair.backup_host();
        let kill_at = fl.mark_kill();
        let killed = Instant::now();
        pair.kill_primary()?;
        clock.line("(d) understudy pair: KILLED the primary (kill -9)");
        let st = pair.wait_status(backup_host, "the backup to take over", Duration::from_secs(60), |st| {
            st["role"] == "primary" && st["failovers"].as_array().is_some_and(|f| !f.is_empty())
        })?;
        let f = st["failovers"].as_array().and_then(|f| f.last()).cloned().unwrap_or(Value::Null);
        let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
        let text = format!(
            "the backup serves as primary (seen {:.0} ms after the kill): detection {:.1} ms, fencing {:.1} ms, \
             restore {:.1} ms, total {:.1} ms, {} connections restored, {} lost",
            ms(killed.elapsed()),
            num("detection_ms"),
            num("fencing_ms"),
            num("restore_ms"),
            num("total_ms"),
            f["connections_restored"],
            f["connections_lost"]
        );
        clock.line(&format!("(d) understudy pair: {text}"));
        fl.run_until(&clock, kill_at + Duration::from_secs(s.after), "after the kill")?;
        let r = fl.finish(s, &clock, f, text)?;
        pair.promoted()?;
        fail_d = Some(r);
    }
    if s.has(Phase::Scale) {
        loads.push(("scale".into(), loadavg()));
        for &n in &s.scale {
            check_interrupted()?;
            clock.line(&format!("takeover scale: {n} idle keep-alive connections"));
            scale.push(scale_point(&mut pair, &clock, n, &mut incidents)?);
        }
    }

    // The nginx side: the nodes stop (cleanly), their hosts are cleared, nginx takes the primary's place.
    let mut nginx_server = None;
    if s.has(Phase::C) || s.has(Phase::E) {
        clock.line("stopping the understudy nodes; nginx takes their hosts");
        if let Some(b) = pair.backup.take() {
            stop_proc(b, libc::SIGTERM, Duration::from_secs(10))?;
        }
        if let Some(p) = pair.primary.take() {
            stop_proc(p, libc::SIGTERM, Duration::from_secs(20))?;
        }
        for host in ["server", "spare"] {
            clear_host(&pair, host)?;
        }
        nginx_server = Some(start_nginx_proxy(&pair, "server")?);
    }
    if s.has(Phase::C) {
        loads.push(("(c)".into(), loadavg()));
        clock.line("(c) nginx as a reverse proxy on server");
        pair.tb.vip("server")?;
        wait_serving(&pair, Size::K1.path(), Duration::from_secs(10))?;
        let nginx = nginx_server.as_ref().context("no nginx")?;
        run_matrix(
            s,
            &mut pair,
            &clock,
            Proxy::C,
            Some(nginx),
            &mut points,
            &mut incidents,
            &mut nginx_history,
            &mut profiles,
        )?;
        pair.tb.exec("server", &["ip", "addr", "del", &format!("{VIP}/24"), "dev", "eth0"])?;
    }
    if s.has(Phase::E) {
        loads.push(("(e)".into(), loadavg()));
        clock.line("(e) failover of nginx + keepalived under load");
        let nginx_spare = start_nginx_proxy(&pair, "spare")?;
        let ka_server = start_keepalived(&pair, "server", true)?;
        let ka_spare = start_keepalived(&pair, "spare", false)?;
        ensure!(has_vip(&pair, "server") && !has_vip(&pair, "spare"), "the VIP is not on the keepalived master");
        wait_serving(&pair, Size::K1.path(), Duration::from_secs(10))?;
        pause(Duration::from_secs(1))?;
        let nginx = nginx_server.take().context("no nginx on server")?;
        let mut victims: Vec<u32> = children(nginx.pid());
        victims.push(nginx.pid());
        victims.extend(children(ka_server.pid()));
        victims.push(ka_server.pid());
        let mut fl = FailoverLoad::start(s, &pair, &clock, "(e) nginx + keepalived", "failover-e")?;
        fl.run_until(&clock, Duration::from_secs(s.before), "before the kill")?;
        // keepalived's own view up to now: with adverts every 10 ms on a busy machine, the backup may have
        // missed three and taken the VIP for a while.
        let transitions = |host: &str, state: &str| {
            fs::read_to_string(pair.dir.0.join(format!("keepalived-{host}/keepalived.log")))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(&format!("Entering {state} STATE")))
                .count()
        };
        let mut notes = Vec::new();
        let flaps = transitions("spare", "MASTER");
        if flaps > 0 {
            notes.push(format!(
                "the keepalived backup became master {flaps} times under the load before the kill (the master \
                 {} times back to master)",
                transitions("server", "MASTER").saturating_sub(1)
            ));
        }
        let kill_at = fl.mark_kill();
        let killed = Instant::now();
        for &pid in &victims {
            // SAFETY: kill(2) on processes this run started (nginx and keepalived on server, and their children),
            // not yet reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        clock.line("(e) nginx + keepalived: KILLED the master's nginx and keepalived (kill -9)");
        let deadline = killed + Duration::from_secs(30);
        while !has_vip(&pair, "spare") {
            check_interrupted()?;
            ensure!(Instant::now() < deadline, "the keepalived backup did not take the VIP within 30 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        let t = ms(killed.elapsed());
        let text = format!("the VIP is on the keepalived backup {t:.0} ms after the kill (polled)");
        clock.line(&format!("(e) nginx + keepalived: {text}"));
        fl.run_until(&clock, kill_at + Duration::from_secs(s.after), "after the kill")?;
        let mut r = fl.finish(s, &clock, json!({ "vip_on_backup_ms": t }), text)?;
        for n in &notes {
            clock.line(&format!("(e) nginx + keepalived: before the kill, {n}"));
        }
        r.notes = notes;
        fail_e = Some(r);
        drop((nginx, ka_server, ka_spare, nginx_spare));
    }
    drop(nginx_server);
    loads.push(("end".into(), loadavg()));

    let report = Report { s, started_wall, loads, points, fail_d, fail_e, scale, incidents, profiles };
    report.write(&s.out)?;
    clock.line(&format!("report: {}", s.out.join("report.md").display()));
    println!();
    println!("{}", report.targets_text());
    Ok(true)
}

// ---------------------------------------------------------------------------------------------------------
// The report.

struct Report<'a> {
    s: &'a Settings,
    started_wall: String,
    loads: Vec<(String, String)>,
    points: Vec<Point>,
    fail_d: Option<FailoverResult>,
    fail_e: Option<FailoverResult>,
    scale: Vec<ScalePoint>,
    incidents: Incidents,
    profiles: Vec<Profile>,
}

fn cmd_out(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
            t.push_str(&String::from_utf8_lossy(&o.stderr));
            t.lines().next().unwrap_or_default().trim().to_string()
        })
        .unwrap_or_default()
}

fn fmt_us(us: f64) -> String {
    if !us.is_finite() {
        "–".into()
    } else if us.abs() >= 10_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else if us.abs() >= 1000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.0} µs")
    }
}

fn fmt_rps(r: f64) -> String {
    if r >= 100.0 { format!("{r:.0}") } else { format!("{r:.1}") }
}

/// A row of the failover table: how to show one result.
type FailoverCell = Box<dyn Fn(&FailoverResult) -> String>;

/// One target's outcome: the line for the report.
struct Verdict {
    met: bool,
    text: String,
}

impl Report<'_> {
    fn point(&self, proxy: Proxy, size: Size, mode: Mode, conns: u32) -> Option<&Point> {
        self.points.iter().find(|p| p.proxy == proxy && p.size == size && p.mode == mode && p.conns == conns)
    }

    /// One Markdown table over the throughput matrix: a row per size × mode × concurrency, a column per
    /// proxy (`cell` of its point, "–" without one), then a column per `extra` heading (`extras`).
    #[allow(clippy::too_many_arguments)]
    fn matrix_table(
        &self,
        md: &mut String,
        s: &Settings,
        proxies: &[Proxy],
        extra: &[&str],
        mut cell: impl FnMut(Proxy, &Point, Size, Mode, u32) -> String,
        extras: impl Fn(Size, Mode, u32) -> Vec<String>,
    ) {
        let mut head = String::from("| size | mode | c |");
        let mut rule = String::from("|---|---|---:|");
        for h in proxies.iter().map(|p| p.label()).chain(extra.iter().copied()) {
            let _ = write!(head, " {h} |");
            rule.push_str("---:|");
        }
        let _ = writeln!(md, "{head}\n{rule}");
        for &size in &s.sizes {
            for &mode in &s.modes {
                for &c in &s.concurrency {
                    let mut row = format!("| {} | {} | {c} |", size.label(), mode.label());
                    for &p in proxies {
                        let text =
                            self.point(p, size, mode, c).map_or_else(|| "–".into(), |x| cell(p, x, size, mode, c));
                        let _ = write!(row, " {text} |");
                    }
                    for text in extras(size, mode, c) {
                        let _ = write!(row, " {text} |");
                    }
                    let _ = writeln!(md, "{row}");
                }
            }
        }
    }

    fn machine(&self) -> Vec<(String, String)> {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
            .unwrap_or_else(|| "?".into());
        let mem = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
            .unwrap_or_default();
        let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let root = workspace_root();
        let root = root.to_str().unwrap_or(".");
        let commit = cmd_out("git", &["-C", root, "rev-parse", "--short", "HEAD"]);
        // The build is of the work tree: say so when the nodes' code differs from the commit.
        let dirty = std::process::Command::new("git")
            .args(["-C", root, "status", "--porcelain", "--", "primary", "backup", "shared", "tcp-replay"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).lines().map(|l| l[3.min(l.len())..].to_string()).collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let dirty = if dirty.is_empty() {
            String::new()
        } else {
            format!(", with uncommitted changes in {}", dirty.join(", "))
        };
        vec![
            ("date".into(), self.started_wall.clone()),
            ("nproc".into(), nproc.to_string()),
            ("CPU".into(), cpu),
            ("memory".into(), mem),
            ("kernel".into(), fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().into()),
            ("understudy".into(), format!("commit {commit}{dirty} (release build of the work tree)")),
            ("wrk".into(), cmd_out("wrk", &["-v"])),
            ("nginx".into(), cmd_out("nginx", &["-v"])),
            ("keepalived".into(), cmd_out("keepalived", &["--version"])),
            (
                "load average (1, 5, 15 min)".into(),
                self.loads.iter().map(|(w, l)| format!("{w}: {l}")).collect::<Vec<_>>().join("; "),
            ),
        ]
    }

    /// The targets of issue 5, judged on what was measured.
    fn verdicts(&self) -> Vec<(String, Vec<Verdict>)> {
        let mut out = Vec::new();
        let ka = Mode::KeepAlive;
        for (size, floor) in [(Size::K1, 0.80), (Size::M1, 0.95)] {
            let mut v = Vec::new();
            for &c in &self.s.concurrency {
                if let (Some(a), Some(b)) = (self.point(Proxy::A, size, ka, c), self.point(Proxy::B, size, ka, c)) {
                    let ratio = b.wrk.rps() / a.wrk.rps();
                    let met = ratio >= floor;
                    v.push(Verdict {
                        met,
                        text: format!(
                            "c={c}: (b) {} req/s is {:.1} % of (a) {} req/s{}",
                            fmt_rps(b.wrk.rps()),
                            ratio * 100.0,
                            fmt_rps(a.wrk.rps()),
                            if met {
                                String::new()
                            } else {
                                format!(" — missed by {:.1} points", (floor - ratio) * 100.0)
                            }
                        ),
                    });
                }
            }
            if !v.is_empty() {
                out.push((format!("(b) ≥ {:.0} % of (a), {} keep-alive", floor * 100.0, size.label()), v));
            }
        }
        let mut v = Vec::new();
        for b in self.points.iter().filter(|p| p.proxy == Proxy::B) {
            if let Some(c) = self.point(Proxy::C, b.size, b.mode, b.conns) {
                let ratio = b.wrk.rps() / c.wrk.rps();
                let met = ratio >= 1.0;
                v.push(Verdict {
                    met,
                    text: format!(
                        "{} {} c={}: (b) {} vs (c) {} req/s ({:.1} %){}",
                        b.size.label(),
                        b.mode.label(),
                        b.conns,
                        fmt_rps(b.wrk.rps()),
                        fmt_rps(c.wrk.rps()),
                        ratio * 100.0,
                        if met { String::new() } else { format!(" — missed by {:.1} %", (1.0 - ratio) * 100.0) }
                    ),
                });
            }
        }
        if !v.is_empty() {
            out.push(("(b) ≥ (c) throughput".into(), v));
        }
        // Judged where latency is not queueing: the lowest concurrency measured (1 by default). At higher
        // concurrency both run closed-loop at their own saturation, and latency follows throughput.
        let mut v = Vec::new();
        let lowest = self.s.concurrency.first().copied();
        for &c in &self.s.concurrency {
            if let (Some(a), Some(b)) = (self.point(Proxy::A, Size::K1, ka, c), self.point(Proxy::B, Size::K1, ka, c)) {
                let added = b.wrk.p99 - a.wrk.p99;
                let judged = Some(c) == lowest;
                let met = !judged || added <= 250.0;
                v.push(Verdict {
                    met,
                    text: format!(
                        "1 KiB keep-alive c={c}: p99 {} (b) − {} (a) = {} (p50: {} − {} = {}){}",
                        fmt_us(b.wrk.p99),
                        fmt_us(a.wrk.p99),
                        fmt_us(added),
                        fmt_us(b.wrk.p50),
                        fmt_us(a.wrk.p50),
                        fmt_us(b.wrk.p50 - a.wrk.p50),
                        if !judged {
                            " (for information: both saturated, closed loop)".to_string()
                        } else if met {
                            String::new()
                        } else {
                            format!(" — missed by {}", fmt_us(added - 250.0))
                        }
                    ),
                });
            }
        }
        if !v.is_empty() {
            out.push(("added p99 latency of replication ≤ 250 µs".into(), v));
        }
        if let Some(d) = &self.fail_d {
            let stall = ms(d.stall());
            out.push((
                "(d) zero client errors, zero resets, longest stall ≤ 150 ms".into(),
                vec![
                    Verdict { met: d.errors() == 0, text: format!("client errors (failed attempts): {}", d.errors()) },
                    Verdict {
                        met: d.resets() == 0 && d.rst_on_wire.unwrap_or(0) == 0,
                        text: format!(
                            "resets seen by the client: {}; RST segments from the VIP on the client's interface: {}",
                            d.resets(),
                            d.rst_on_wire.map_or("not captured".into(), |n| n.to_string())
                        ),
                    },
                    Verdict {
                        met: stall <= 150.0,
                        text: format!(
                            "longest stall {stall:.0} ms{}",
                            if stall <= 150.0 {
                                String::new()
                            } else {
                                format!(" — missed by {:.0} ms", stall - 150.0)
                            }
                        ),
                    },
                ],
            ));
        }
        out
    }

    /// "Why targets are missed": each missed target with its gap, what the points say about the cost of
    /// replication there, and the profiles.
    fn why_missed(&self, md: &mut String) {
        let missed: Vec<(String, Vec<Verdict>)> = self
            .verdicts()
            .into_iter()
            .map(|(t, vs)| (t, vs.into_iter().filter(|v| !v.met).collect::<Vec<_>>()))
            .filter(|(_, vs)| !vs.is_empty())
            .collect();
        if missed.is_empty() {
            return;
        }
        let _ = writeln!(md, "\n## Why targets are missed\n");
        let mut throughput = false;
        for (target, vs) in &missed {
            let _ = writeln!(md, "* **{target}**");
            for v in vs {
                let _ = writeln!(md, "  * {}", v.text);
            }
            if target.starts_with("(d)") {
                if let Some(d) = &self.fail_d {
                    let _ = writeln!(
                        md,
                        "  * The stall is the takeover, not CPU (a profile does not show waiting): {}.",
                        d.takeover_text
                    );
                }
            } else {
                throughput = true;
            }
        }
        if !throughput {
            return;
        }
        let ka = Mode::KeepAlive;
        let _ =
            writeln!(md, "\nWhat replication costs at each keep-alive point measured with and without the backup:\n");
        let _ = writeln!(md, "| point | CPU per request (a) | (b): primary + backup | writes per request (a) | (b) |");
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        for &size in &self.s.sizes {
            for &c in &self.s.concurrency {
                let (Some(a), Some(b)) = (self.point(Proxy::A, size, ka, c), self.point(Proxy::B, size, ka, c)) else {
                    continue;
                };
                let per = |x: &Point, name: &str| -> (f64, f64) {
                    let n = x.wrk.requests.max(1) as f64;
                    let cpu = x.cpu.iter().filter(|(k, _)| k == name).map(|(_, d)| d.as_secs_f64()).sum::<f64>();
                    let w = x.calls.iter().filter(|(k, _, _)| k == name).map(|(_, _, w)| *w).sum::<u64>();
                    (cpu * 1e6 / n, w as f64 / n)
                };
                let ((ac, aw), (pc, pw), (bc, bw)) = (per(a, "primary"), per(b, "primary"), per(b, "backup"));
                let _ = writeln!(
                    md,
                    "| {} c={c} | {ac:.0} µs | {:.0} µs = {pc:.0} + {bc:.0} | {aw:.2} | {pw:.2} + {bw:.2} |",
                    size.label(),
                    pc + bc
                );
            }
        }
        let _ = writeln!(
            md,
            "\nOn these {} cores every process competes for the same CPU (wrk, the nodes, the origin), so the \
             throughput of (b) follows its CPU per request; on top of that each client segment and each reply \
             waits for the backup's acknowledgement (output commit).\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        if self.profiles.is_empty() {
            let _ = writeln!(md, "No profiles in this run: `scripts/bench --profile` records them.");
            return;
        }
        let _ = writeln!(
            md,
            "Profiles: `perf record -e cpu-clock -F 4000 -g -p PID` of each process over one more run of the point \
             (figures above are from the run without perf), read with `perf report --stdio`. System calls: the \
             share of samples inside each call, the network stack work it did included (sending on a veth runs the \
             receiver's TCP too). Self time in `finish_task_switch` and `_raw_spin_unlock_irqrestore` is mostly \
             sleeping and waking threads: this VM has no hardware counters, and cpu-clock samples taken while \
             interrupts were off land where they are turned back on.\n"
        );
        for p in &self.profiles {
            let _ = write!(
                md,
                "* **{}, {}**, {} (profiled run {} req/s, `{}`): ",
                p.proxy.label(),
                p.node,
                p.point,
                fmt_rps(p.rps),
                p.data.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()
            );
            match &p.summary {
                Err(e) => {
                    let _ = writeln!(md, "no profile: {e}");
                }
                Ok(x) => {
                    let list = |v: &[(f64, String)]| {
                        v.iter().map(|(pct, n)| format!("`{n}` {pct:.1} %")).collect::<Vec<_>>().join(", ")
                    };
                    let _ = writeln!(
                        md,
                        "{}; kernel {:.0} %, user {:.0} %.\n  * system calls (inclusive): {}\n  * top symbols (self): \
                         {}\n  * threads: {}",
                        x.samples,
                        x.kernel,
                        100.0 - x.kernel,
                        list(&x.syscalls),
                        list(&x.symbols),
                        list(&x.threads)
                    );
                }
            }
        }
    }

    fn targets_text(&self) -> String {
        let mut s = String::from("Targets (reported, not asserted)\n");
        for (target, vs) in self.verdicts() {
            let all = vs.iter().all(|v| v.met);
            let _ = writeln!(s, "  {target}: {}", if all { "met" } else { "MISSED" });
            for v in vs {
                let _ = writeln!(s, "    [{}] {}", if v.met { "met" } else { "MISSED" }, v.text);
            }
        }
        s
    }

    fn write(&self, out: &Path) -> Result<()> {
        let mut md = String::new();
        let s = self.s;
        let _ = writeln!(md, "# understudy benchmark\n");
        let _ = writeln!(
            md,
            "Written by `scripts/bench{}{}` ({}). Targets are reported, not asserted. The machine is shared: another \
             test run may have used it at the same time (see the load averages).\n",
            if s.command_line.is_empty() { "" } else { " " },
            s.command_line,
            if s.quick { "quick run: short points, few of them" } else { "full run" }
        );
        let _ = writeln!(md, "## Machine\n\n| | |\n|---|---|");
        for (k, v) in self.machine() {
            let _ = writeln!(md, "| {k} | {} |", v.replace('|', "\\|"));
        }
        let _ = writeln!(
            md,
            "\n## Set-up\n\nOne namespace test bed (`scripts/testbed up ID --pair`): `client` 10.0.0.1, `server` and `spare` \
             on the client network (VIP {VIP}:{PORT}), a replication network, and `origin` 10.2.0.10 on its own \
             network: one nginx (1 worker, access log on) serving `1k.bin` (1 KiB) and `1m.bin` (1 MiB) for every \
             measurement. Every process shares the machine's {} cores: wrk or the load client, the proxy (and the \
             backup), and the origin.\n\n\
             * (a) `primary` on server, its backup killed (`peer: none`). (b) `primary` on server and `backup` on \
             spare, `peer: connected` on both `/status` before and after each point. Both with the default \
             configuration plus `--request-log`. (c) nginx as a reverse proxy on server with the VIP: 2 workers, \
             upstream keep-alive (64), `proxy_http_version 1.1`, in-memory buffering, access log on.\n\
             * Throughput and latency: wrk {} s per point after {} s of warm-up, `-t min(2, c)`, \
             `Connection: close` for connection-per-request; latency percentiles are wrk's. CPU per request: utime + \
             stime from `/proc/<pid>/stat` of the proxy processes over the point (primary; primary + backup for (b); \
             nginx master + workers for (c)) divided by the requests; softirq work done for them in interrupt \
             context is not in it.\n\
             * Failover: {} keep-alive connections of {} GETs back to back (every body checked), {} s before and {} s \
             after the kill. (d) `kill -9` of the primary. (e) nginx on server and spare, keepalived on both (VRRPv3, \
             `advert_int 0.01`, the least keepalived accepts; server MASTER priority 150, spare BACKUP 100); `kill -9` \
             of the master's nginx (master and workers) and keepalived (both processes); its VIP stays on server's \
             interface, as after any crash of keepalived. A failed request is retried on a new connection after 10 ms \
             (the retry counts in its time). \"Reset\" = `ECONNRESET`/`EPIPE` on an established connection; \
             \"refused\" = RST to a SYN; \"closed\" = EOF before the response was complete. \"Longest stall\" = the \
             longest a request waited from its first attempt to its completion. \"Back to 90 %\" = the start of the \
             first 500 ms window, from the first 100 ms below it on, whose throughput is ≥ 90 % of the baseline (up \
             to 3 s before the kill).\n\
             * Scale: N idle keep-alive connections (one GET of 1 KiB each) on the protected pair, `kill -9` of the \
             primary; times from the new primary's `/status` `failovers[]`; then a second GET on every connection.\n",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            s.duration,
            s.warmup,
            s.failover_conns,
            s.failover_size.label(),
            s.before,
            s.after
        );

        if let Some(extra) = &s.node_config {
            let _ = writeln!(
                md,
                "The nodes' configuration had these additions (`--node-config`):\n\n```toml\n{}\n```\n",
                extra.trim()
            );
        }
        if !self.points.is_empty() {
            let proxies: Vec<Proxy> = [Proxy::A, Proxy::B, Proxy::C]
                .into_iter()
                .filter(|p| self.points.iter().any(|x| x.proxy == *p))
                .collect();
            let _ = writeln!(md, "## Throughput (requests/s; MB/s of response bodies and heads)\n");
            let (has_a, has_b) = (proxies.contains(&Proxy::A), proxies.contains(&Proxy::B));
            let ratios: Vec<(&str, Proxy, Proxy)> = [("(b)/(a)", Proxy::B, Proxy::A), ("(b)/(c)", Proxy::B, Proxy::C)]
                .into_iter()
                .filter(|(_, x, y)| proxies.contains(x) && proxies.contains(y))
                .collect();
            let heads: Vec<&str> = ratios.iter().map(|r| r.0).collect();
            let mut notes = Vec::new();
            self.matrix_table(
                &mut md,
                s,
                &proxies,
                &heads,
                |p, x, size, mode, c| {
                    let mark = if x.note.is_some() || x.wrk.error_total() > 0 { " ¹" } else { "" };
                    if let Some(n) = &x.note {
                        notes.push(format!("{} {} {} c={c}: {n}", p.label(), size.label(), mode.label()));
                    }
                    if x.wrk.error_total() > 0 {
                        notes.push(format!(
                            "{} {} {} c={c}: wrk errors: {}",
                            p.label(),
                            size.label(),
                            mode.label(),
                            x.wrk.errors_text()
                        ));
                    }
                    format!("{} ({:.1} MB/s){mark}", fmt_rps(x.wrk.rps()), x.wrk.mbps())
                },
                |size, mode, c| {
                    ratios
                        .iter()
                        .map(|&(_, x, y)| match (self.point(x, size, mode, c), self.point(y, size, mode, c)) {
                            (Some(x), Some(y)) => format!("{:.1} %", x.wrk.rps() / y.wrk.rps() * 100.0),
                            _ => "–".into(),
                        })
                        .collect()
                },
            );
            if !notes.is_empty() {
                let _ = writeln!(md);
                for n in notes {
                    let _ = writeln!(md, "¹ {n}  ");
                }
            }

            let tw: Vec<String> = self
                .points
                .iter()
                .filter_map(|p| {
                    Some(format!(
                        "{} {} c={}: {} ({} in TIME_WAIT)",
                        p.proxy.short(),
                        p.size.label(),
                        p.conns,
                        p.recent_conns,
                        p.time_wait?
                    ))
                })
                .collect();
            if !tw.is_empty() {
                let _ = writeln!(
                    md,
                    "\nClient connections opened through the proxy in the 60 s before each connection-per-request point \
                     (the server closes first, so its host holds them in TIME_WAIT for 60 s): {}.",
                    tw.join(", ")
                );
            }

            let _ = writeln!(md, "\n## Latency (wrk: p50 / p99 / p99.9)\n");
            let added: &[&str] = if has_a && has_b { &["added p99 (b)−(a)"] } else { &[] };
            self.matrix_table(
                &mut md,
                s,
                &proxies,
                added,
                |_, x, _, _, _| format!("{} / {} / {}", fmt_us(x.wrk.p50), fmt_us(x.wrk.p99), fmt_us(x.wrk.p999)),
                |size, mode, c| {
                    if added.is_empty() {
                        return Vec::new();
                    }
                    vec![match (self.point(Proxy::A, size, mode, c), self.point(Proxy::B, size, mode, c)) {
                        (Some(a), Some(b)) => fmt_us(b.wrk.p99 - a.wrk.p99),
                        _ => "–".into(),
                    }]
                },
            );

            let _ = writeln!(md, "\n## CPU time per request (utime + stime of the proxy processes)\n");
            self.matrix_table(
                &mut md,
                s,
                &proxies,
                &[],
                |p, x, _, _, _| {
                    if p != Proxy::B {
                        return format!("{:.1} µs", x.cpu_per_request_us());
                    }
                    let part = |name: &str| -> f64 {
                        x.cpu.iter().filter(|(n, _)| n == name).map(|(_, d)| d.as_secs_f64()).sum::<f64>() * 1e6
                            / x.wrk.requests.max(1) as f64
                    };
                    format!(
                        "{:.1} µs (primary {:.1} + backup {:.1})",
                        x.cpu_per_request_us(),
                        part("primary"),
                        part("backup")
                    )
                },
                |_, _, _| Vec::new(),
            );
            let _ = writeln!(
                md,
                "\nCPU times come from clock ticks ({} per second), so a point with few requests (1 MiB at c=1) is coarse.",
                // SAFETY: sysconf has no preconditions.
                unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
            );
            let _ = writeln!(md, "\n## Read and write system calls per request (`/proc/<pid>/io`)\n");
            self.matrix_table(&mut md, s, &proxies, &[], |_, x, _, _, _| x.calls_text(), |_, _, _| Vec::new());
            let _ = writeln!(
                md,
                "\nCounted by the kernel per process (`syscr`, `syscw`): `read`, `write` and their vectored forms on \
                 sockets, files and pipes. Rust reads sockets with `recv`, which is not counted, so the reads are \
                 mostly of files and pipes; the writes include every socket write (a replication ack is one \
                 `writev`)."
            );
        }

        let fails: Vec<&FailoverResult> = self.fail_d.iter().chain(self.fail_e.iter()).collect();
        if !fails.is_empty() {
            let _ = writeln!(
                md,
                "\n## Failover under load ({} keep-alive connections, {} GETs)\n",
                s.failover_conns,
                s.failover_size.label()
            );
            let mut head = String::from("| |");
            let mut rule = String::from("|---|");
            for f in &fails {
                let _ = write!(head, " {} |", f.label);
                rule.push_str("---:|");
            }
            let _ = writeln!(md, "{head}\n{rule}");
            let rows: Vec<(&str, FailoverCell)> = vec![
                ("baseline throughput (before the kill)", Box::new(|f| format!("{} req/s", fmt_rps(f.baseline_rps)))),
                ("requests completed", Box::new(|f| f.record.done.len().to_string())),
                ("client errors (failed attempts)", Box::new(|f| f.errors().to_string())),
                ("— resets (ECONNRESET/EPIPE)", Box::new(|f| f.resets().to_string())),
                ("— refused (RST to SYN)", Box::new(|f| f.record.count(Failure::Refused).to_string())),
                ("— closed by the server mid-request", Box::new(|f| f.record.count(Failure::Closed).to_string())),
                ("— timeouts", Box::new(|f| f.record.count(Failure::Timeout).to_string())),
                (
                    "— other (bad response, other errors)",
                    Box::new(|f| (f.record.count(Failure::BadResponse) + f.record.count(Failure::Other)).to_string()),
                ),
                ("requests that needed a retry", Box::new(|f| f.record.retried().to_string())),
                (
                    "connections opened again",
                    Box::new(|f| (f.record.connects.saturating_sub(f.conns as u64)).to_string()),
                ),
                (
                    "RST segments from the VIP (client capture)",
                    Box::new(|f| f.rst_on_wire.map_or("–".into(), |n| n.to_string())),
                ),
                (
                    "longest client stall across the failover (when it began)",
                    Box::new(|f| {
                        let (wait, began) = f.stall_across();
                        let rel = began.as_secs_f64() - f.kill_at.as_secs_f64();
                        format!("{:.0} ms ({rel:+.2} s from the kill)", ms(wait))
                    }),
                ),
                ("longest time with no completion, from the kill on", Box::new(|f| format!("{:.0} ms", ms(f.gap())))),
                (
                    "for comparison, before the kill: longest stall / longest time with no completion",
                    Box::new(|f| format!("{:.0} ms / {:.0} ms", ms(f.stall_before()), ms(f.gap_before()))),
                ),
                ("time until throughput is back to 90 %", Box::new(|f| f.recovery_text())),
                ("takeover as the survivor saw it", Box::new(|f| f.takeover_text.clone())),
                (
                    "noticed before the kill",
                    Box::new(|f| if f.notes.is_empty() { "nothing".into() } else { f.notes.join("; ") }),
                ),
            ];
            for (name, cell) in rows {
                let mut row = format!("| {name} |");
                for f in &fails {
                    let _ = write!(row, " {} |", cell(f).replace('|', "\\|"));
                }
                let _ = writeln!(md, "{row}");
            }
            let mut plot =
                Plot::new("Throughput across the failover (per 100 ms)", "seconds from the kill", "requests/s");
            let colors = ["#1f77b4", "#d62728"];
            for (f, color) in fails.iter().zip(colors) {
                plot.series.push(Series {
                    name: f.label.clone(),
                    color: color.into(),
                    points: f.series(),
                    dots: false,
                });
            }
            plot.marks.push((0.0, "kill -9".into()));
            fs::write(out.join("failover.svg"), plot.to_svg())?;
            let _ = writeln!(md, "\n![throughput across the failover](failover.svg)\n");
            let _ = writeln!(
                md,
                "Series per 100 ms: {}; every request and every failed attempt: `*-requests.csv`, `*-errors.csv`.",
                fails
                    .iter()
                    .map(|f| format!("`{}.csv`", if f.label.starts_with("(d)") { "failover-d" } else { "failover-e" }))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for f in &fails {
                let stem = if f.label.starts_with("(d)") { "failover-d" } else { "failover-e" };
                f.write_csv(out, stem)?;
                let first: Vec<String> = f
                    .record
                    .failed
                    .iter()
                    .take(3)
                    .map(|e| {
                        format!("{:+.3} s conn {}: {}", e.at.as_secs_f64() - f.kill_at.as_secs_f64(), e.conn, e.text)
                    })
                    .collect();
                if !first.is_empty() {
                    let _ = writeln!(md, "\n{} first errors: {}", f.label, first.join("; "));
                }
            }
        }

        if !self.scale.is_empty() {
            let _ = writeln!(md, "\n## Takeover scale (idle keep-alive connections, kill -9 of the primary)\n");
            let _ = writeln!(
                md,
                "| connections | protected before | restored / lost | detection | fencing | restore | per connection | \
                 total | second request ok / failed | second request p50 / max |\n\
                 |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for p in &self.scale {
                let f = &p.failover;
                let num = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
                let restored = f["connections_restored"].as_u64().unwrap_or(0);
                let _ = writeln!(
                    md,
                    "| {} ({} opened{}) | {} | {} / {} | {:.1} ms | {:.1} ms | **{:.1} ms** | {:.1} µs | {:.1} ms | {} / {}{} | \
                     {:.1} / {:.1} ms |",
                    p.n,
                    p.opened,
                    if p.open_failed > 0 { format!(", {} failed", p.open_failed) } else { String::new() },
                    p.protected_before,
                    restored,
                    f["connections_lost"],
                    num("detection_ms"),
                    num("fencing_ms"),
                    num("restore_ms"),
                    num("restore_ms") * 1e3 / restored.max(1) as f64,
                    num("total_ms"),
                    p.report.second_ok,
                    p.report.second_failed,
                    if p.report.broke_while_idle > 0 {
                        format!(" ({} broke while idle)", p.report.broke_while_idle)
                    } else {
                        String::new()
                    },
                    ms(percentile(&p.report.second_latency, 50.0)),
                    ms(p.report.second_latency.last().copied().unwrap_or_default())
                );
            }
            for p in self.scale.iter().filter(|p| !p.report.errors.is_empty()) {
                let _ = writeln!(md, "\n{} connections, first errors: {}", p.n, p.report.errors.join("; "));
            }
            let mut plot = Plot::new("Takeover time against idle connections", "connections (log scale)", "ms");
            plot.x_log = true;
            let pts = |k: &str| -> Vec<(f64, f64)> {
                self.scale.iter().filter_map(|p| Some((p.n as f64, p.failover[k].as_f64()?))).collect()
            };
            plot.series.push(Series {
                name: "restore".into(),
                color: "#1f77b4".into(),
                points: pts("restore_ms"),
                dots: true,
            });
            plot.series.push(Series {
                name: "total".into(),
                color: "#ff7f0e".into(),
                points: pts("total_ms"),
                dots: true,
            });
            fs::write(out.join("restore.svg"), plot.to_svg())?;
            let _ = writeln!(md, "\n![restore time against connections](restore.svg)");
        }

        let _ = writeln!(md, "\n## Protection incidents\n");
        if self.incidents.is_empty() {
            let _ =
                writeln!(md, "None: the pair never lost its protection except by the kills of (d) and the scale runs.");
        } else {
            let _ = writeln!(
                md,
                "The pair lost its protection without being asked to (a point of (b) during which this happened was \
                 measured once more; a point marked ¹ lost it both times):\n"
            );
            for i in &self.incidents {
                let _ = writeln!(md, "* {i}");
            }
        }

        let _ = writeln!(md, "\n## Targets (issue 5)\n");
        let verdicts = self.verdicts();
        if verdicts.is_empty() {
            let _ = writeln!(md, "Not enough phases were run to judge any target.");
        }
        for (target, vs) in verdicts {
            let all = vs.iter().all(|v| v.met);
            let _ = writeln!(md, "* **{target}: {}**", if all { "met" } else { "missed" });
            for v in vs {
                let _ = writeln!(md, "  * {} {}", if v.met { "met:" } else { "**missed:**" }, v.text);
            }
        }
        self.why_missed(&mut md);
        fs::write(out.join("report.md"), md)?;

        let results = json!({
            "date": self.started_wall,
            "settings": {
                "duration_s": s.duration, "warmup_s": s.warmup, "concurrency": s.concurrency,
                "failover_conns": s.failover_conns, "failover_size": s.failover_size.label(),
                "failover_before_s": s.before, "failover_after_s": s.after, "scale": s.scale,
                "command_line": s.command_line,
            },
            "machine": self.machine().into_iter().collect::<BTreeMap<_, _>>(),
            "throughput": self.points.iter().map(|p| json!({
                "proxy": p.proxy.label(), "size": p.size.label(), "mode": p.mode.label(), "connections": p.conns,
                "requests": p.wrk.requests, "seconds": p.wrk.secs, "rps": p.wrk.rps(), "mb_per_s": p.wrk.mbps(),
                "p50_us": p.wrk.p50, "p99_us": p.wrk.p99, "p999_us": p.wrk.p999, "mean_us": p.wrk.mean,
                "max_us": p.wrk.max, "wrk_errors": p.wrk.errors,
                "cpu_s": p.cpu.iter().map(|(n, d)| json!([n, d.as_secs_f64()])).collect::<Vec<_>>(),
                "cpu_per_request_us": p.cpu_per_request_us(),
                "read_write_syscalls": p.calls.iter().map(|(n, r, w)| json!([n, r, w])).collect::<Vec<_>>(),
                "note": p.note, "time_wait_before": p.time_wait, "connections_in_the_60_s_before": p.recent_conns,
            })).collect::<Vec<_>>(),
            "failover": self.fail_d.iter().chain(self.fail_e.iter()).map(|f| f.json()).collect::<Vec<_>>(),
            "protection_incidents": self.incidents,
            "scale": self.scale.iter().map(|p| json!({
                "connections": p.n, "opened": p.opened, "open_failed": p.open_failed,
                "protected_before": p.protected_before, "failover": p.failover,
                "second_ok": p.report.second_ok, "second_failed": p.report.second_failed,
                "broke_while_idle": p.report.broke_while_idle,
                "second_p50_ms": ms(percentile(&p.report.second_latency, 50.0)),
                "second_max_ms": ms(p.report.second_latency.last().copied().unwrap_or_default()),
                "errors": p.report.errors,
            })).collect::<Vec<_>>(),
        });
        fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
        Ok(())
    }
}
