//! End-to-end tests of the exchanges a failover interrupts (issue 3, tests 5 to 7): the `primary` and
//! `backup` binaries in a `scripts/testbed --pair` bed with `us-origin` (tests/bin/origin.rs) as the
//! origin, and `kill -9` of the primary process while requests are in flight.
//!
//! * A pipelined burst on one connection is answered in order, every body checked (RFC 9112 §9.3.2).
//! * A request complete at a slow origin when the primary dies: a GET is re-issued (RFC 9110 §9.2.2);
//!   a POST with the client's `Idempotency-Key` executes once at an origin that deduplicates by key;
//!   under `--non-idempotent-retry never` a POST is closed without re-execution, counted in the
//!   backup's metrics and request log (ARCHITECTURE.md, "Finishing an exchange in flight").
//! * A chunked response cut mid-body continues as a well-formed chunked message (RFC 9112 §7.1).
//!
//! Needs root, curl, and the workspace's binaries built (`cargo build --workspace --bins`). Timings
//! are printed, never asserted. `UNDERSTUDY_KEEP=1` keeps the scratch directory (node logs, request
//! logs, the origin's log).

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use understudy_tests::harness::{Capture, run, unique_id, wait_until};
use understudy_tests::pair::{Origin, PORT, Pair, PairOptions, VIP, workspace_bin};
use understudy_tests::pattern;

const MB: u64 = 1_000_000;

fn us_origin(node_flags: &[&str]) -> PairOptions {
    PairOptions { node_flags: node_flags.iter().map(|s| s.to_string()).collect(), origin: Origin::UsOrigin }
}

fn vip() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 100], PORT))
}

/// One HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Header fields, names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line)?;
    ensure!(n > 0, "connection closed");
    ensure!(line.ends_with(b"\r\n"), "line without CRLF: {:?}", String::from_utf8_lossy(&line));
    line.truncate(line.len() - 2);
    String::from_utf8(line).context("line is not UTF-8")
}

/// Reads one response to a GET: Content-Length or chunked framing (RFC 9112 §6.3, §7.1), strictly.
fn read_response(r: &mut impl BufRead) -> Result<RawResponse> {
    let status_line = read_line(r).context("status line")?;
    let mut parts = status_line.splitn(3, ' ');
    ensure!(parts.next() == Some("HTTP/1.1"), "status line {status_line:?}");
    let status = parts.next().and_then(|s| s.parse().ok()).with_context(|| format!("status line {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r).context("header line")?;
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').with_context(|| format!("header line {line:?}"))?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut resp = RawResponse { status, headers, body: Vec::new() };
    if resp.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let size_line = read_line(r).context("chunk-size line")?;
            let size = u64::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("chunk-size line {size_line:?}"))?;
            if size == 0 {
                // Trailer section, then the final CRLF.
                while !read_line(r).context("trailer")?.is_empty() {}
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size as usize, 0);
            r.read_exact(&mut resp.body[start..]).context("chunk data")?;
            ensure!(read_line(r).context("chunk end")?.is_empty(), "chunk data longer than its size");
        }
    } else {
        let len: usize = resp
            .header("content-length")
            .context("response without Content-Length or chunked framing")?
            .parse()
            .context("Content-Length")?;
        resp.body.resize(len, 0);
        r.read_exact(&mut resp.body).context("body")?;
    }
    Ok(resp)
}

/// Counts the bytes read through it, for a test watching a reader thread's progress.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// What curl's `-w` printed: the last line of its log (stderr shares the file, and `ip netns` may
/// print a warning there when another bed's namespace is being deleted meanwhile).
fn curl_w(log: &str) -> &str {
    log.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("")
}

/// The request log lines of `role` whose target is `target`.
fn log_lines(pair: &Pair, role: &str, target: &str) -> Result<Vec<Value>> {
    Ok(pair.request_log(role)?.into_iter().filter(|l| l["target"] == target).collect())
}

/// The origin's lines for `target`.
fn origin_lines(pair: &Pair, target: &str) -> Result<Vec<Value>> {
    Ok(pair.origin_executions()?.into_iter().filter(|l| l["target"] == target).collect())
}

/// Issue 3, test 5: 20 GETs written at once on one connection, the primary killed while they are
/// answered. Every response arrives, in order, byte-correct, on the same connection, which then
/// carries one more request.
#[test]
fn pipelined_burst_of_20_is_answered_in_order_across_kill_9() -> Result<()> {
    let id = unique_id('5');
    let mut pair = Pair::up(&id, &us_origin(&[]), |_| Ok(()))?;
    const SIZES: [u64; 10] = [1_000, 250_000, 17, 1_500_000, 64_000, 700_000, 3, 2_000_000, 120_000, 5_000];
    let requests: Vec<(String, u64, u64)> = (0..20u64)
        .map(|i| {
            let (len, key) = (SIZES[i as usize % SIZES.len()] + i, 500 + i);
            // Every fourth is held at the origin, so some wait upstream when the primary dies.
            let target = if i % 4 == 1 {
                format!("/slow?ms=300&len={len}&key={key}")
            } else {
                format!("/file?len={len}&key={key}")
            };
            (target, len, key)
        })
        .collect();
    let total: u64 = requests.iter().map(|r| r.1).sum();
    let burst: String = requests
        .iter()
        .map(|(t, ..)| format!("GET {t} HTTP/1.1\r\nHost: {VIP}\r\nUser-Agent: burst\r\n\r\n"))
        .collect();

    let mut conn = pair.connect_from("client", vip(), Duration::from_secs(10))?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    conn.set_nodelay(true)?;
    let read = Arc::new(AtomicU64::new(0));
    let reader_conn = conn.try_clone()?;
    let reader_read = read.clone();
    let reader = std::thread::spawn(move || -> Result<(Vec<RawResponse>, BufReader<Counting<TcpStream>>)> {
        let mut r = BufReader::with_capacity(64 * 1024, Counting { inner: reader_conn, read: reader_read });
        let mut got = Vec::new();
        for i in 0..20 {
            got.push(read_response(&mut r).with_context(|| format!("response {i}"))?);
        }
        Ok((got, r))
    });

    let started = Instant::now();
    conn.write_all(burst.as_bytes())?;
    // The burst is in; kill the primary in the middle of response 3 (1.5 MB, from byte ~251 k on), so
    // that responses were written, one is partly sent and the rest wait (or soon, if nothing comes).
    let _ = wait_until("1 MB of responses", Duration::from_secs(2), || {
        Ok((read.load(Ordering::Relaxed) >= MB).then_some(()))
    });
    let read_at_kill = read.load(Ordering::Relaxed);
    pair.kill_primary()?;
    let killed = started.elapsed();
    let taken = pair.wait_taken_over(Duration::from_secs(30))?;
    let (responses, mut r) = match reader.join() {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => bail!("{e:#} ({} bytes read)\n{}", read.load(Ordering::Relaxed), pair.logs_tail()),
        Err(_) => bail!("the reader thread panicked"),
    };
    let all_read = started.elapsed();
    let mut errors = Vec::new();
    for (i, (resp, (target, len, key))) in responses.iter().zip(&requests).enumerate() {
        if resp.status != 200 {
            errors.push(format!("response {i} ({target}): status {}", resp.status));
        }
        if resp.header("x-request-target") != Some(target.as_str()) {
            errors.push(format!("response {i}: answers {:?}, not {target}", resp.header("x-request-target")));
        }
        if resp.body.len() as u64 != *len {
            errors.push(format!("response {i} ({target}): {} body bytes", resp.body.len()));
        } else if let Some(at) = pattern::first_mismatch(*key, 0, &resp.body) {
            errors.push(format!("response {i} ({target}): wrong byte at {at}"));
        }
    }
    ensure!(errors.is_empty(), "{}\n{}", errors.join("\n"), pair.logs_tail());

    // The same connection carries on.
    let after = "/file?len=12345&key=599";
    conn.write_all(format!("GET {after} HTTP/1.1\r\nHost: {VIP}\r\n\r\n").as_bytes())?;
    let resp = read_response(&mut r).context("the request after the burst")?;
    ensure!(resp.status == 200 && pattern::first_mismatch(599, 0, &resp.body).is_none() && resp.body.len() == 12345);

    let paths: Vec<String> = pair
        .request_log("backup")?
        .iter()
        .filter_map(|l| Some(format!("{}:{}", l["exchange"], l["resume"].as_str()?)))
        .collect();
    let served_by_primary = pair.request_log("primary")?.iter().filter(|l| l["complete"] == true).count();
    println!(
        "pipelined burst: {total} bytes in 20 responses; primary killed {killed:?} after the write with \
         {read_at_kill} bytes read; all read after {all_read:?}; primary completed {served_by_primary}, \
         backup resume paths {paths:?}; failover {}",
        taken["failovers"][0]
    );
    Ok(())
}

/// Issue 3, test 6 (a, b): a GET and a POST with the client's `Idempotency-Key` are complete at an
/// origin that answers after 2 s when the primary dies. The GET is re-issued and answered; the POST is
/// executed once (a repeat with its key is deduplicated by the origin) and the client gets the answer.
#[test]
fn slow_origin_get_is_reissued_and_keyed_post_executes_once_across_kill_9() -> Result<()> {
    let id = unique_id('6');
    let mut pair = Pair::up(&id, &us_origin(&[]), |_| Ok(()))?;
    let dir = pair.dir.0.clone();
    let get_target = "/slow?ms=2000&len=300000&key=61";
    let post_target = "/order?ms=2000";
    let key = format!("order-{id}");
    let get_out = dir.join("get.bin");
    let get_args = [
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-o",
        get_out.to_str().context("path")?,
        "-w",
        "%{num_connects} %{http_code}",
        &format!("http://{VIP}{get_target}"),
    ];
    let mut get = pair.tb.spawn("curl GET", "client", &get_args, &dir.join("get.log"))?;
    let post_out = dir.join("post.json");
    let key_header = format!("Idempotency-Key: {key}");
    let post_args = [
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-X",
        "POST",
        "-H",
        &key_header,
        "--data-binary",
        "item=42&qty=1",
        "-o",
        post_out.to_str().context("path")?,
        "-w",
        "%{num_connects} %{http_code}",
        &format!("http://{VIP}{post_target}"),
    ];
    let mut post = pair.tb.spawn("curl POST", "client", &post_args, &dir.join("post.log"))?;

    // Both requests are at the origin, which holds them for 2 s: the primary dies while waiting.
    wait_until("both requests to reach the origin", Duration::from_secs(20), || {
        Ok((!origin_lines(&pair, get_target)?.is_empty() && !origin_lines(&pair, post_target)?.is_empty())
            .then_some(()))
    })?;
    let killed = Instant::now();
    pair.kill_primary()?;
    let taken = pair.wait_taken_over(Duration::from_secs(30))?;
    let get_status = get.wait(Duration::from_secs(90))?;
    let get_done = killed.elapsed();
    let post_status = post.wait(Duration::from_secs(90))?;
    let post_done = killed.elapsed();

    let mut errors = Vec::new();
    // (a) The GET.
    let get_log = fs::read_to_string(dir.join("get.log"))?;
    if !get_status.success() || curl_w(&get_log) != "1 200" {
        errors.push(format!("GET: curl {get_status}, {get_log:?} (want \"1 200\": one connection, 200)"));
    } else {
        let body = fs::read(&get_out)?;
        if body.len() != 300_000 || pattern::first_mismatch(61, 0, &body).is_some() {
            errors.push(format!("GET: body of {} bytes differs from the origin's", body.len()));
        }
    }
    let get_origin = origin_lines(&pair, get_target)?;
    if get_origin.len() != 2 {
        errors.push(format!("GET: the origin saw it {} times (want 2: the primary's, the re-issue)", get_origin.len()));
    }
    let get_resumed = log_lines(&pair, "backup", get_target)?;
    if !get_resumed.iter().any(|l| l["resume"] == "resend" && l["status"] == 200) {
        errors.push(format!("GET: no backup request log line with resume \"resend\" and status 200: {get_resumed:?}"));
    }
    // (b) The POST.
    let post_log = fs::read_to_string(dir.join("post.log"))?;
    let post_origin = origin_lines(&pair, post_target)?;
    let executed: Vec<&Value> = post_origin.iter().filter(|l| l["outcome"] == "executed").collect();
    let deduplicated = post_origin.iter().filter(|l| l["outcome"] == "deduplicated").count();
    if executed.len() != 1 || deduplicated > 1 || post_origin.iter().any(|l| l["key"] != key.as_str()) {
        errors.push(format!("POST: want one execution with key {key} (and at most one repeat): {post_origin:?}"));
    }
    if !post_status.success() || curl_w(&post_log) != "1 200" {
        errors.push(format!("POST: curl {post_status}, {post_log:?} (want \"1 200\")"));
    } else {
        let answer: Value = serde_json::from_slice(&fs::read(&post_out)?).context("the POST's answer")?;
        if executed.first().is_none_or(|e| answer["execution"] != e["execution"]) || answer["key"] != key.as_str() {
            errors.push(format!("POST: the client got {answer}, not the answer of the execution {executed:?}"));
        }
    }
    let post_resumed = log_lines(&pair, "backup", post_target)?;
    if !post_resumed.iter().any(|l| l["resume"] == "resend" && l["status"] == 200) {
        errors
            .push(format!("POST: no backup request log line with resume \"resend\" and status 200: {post_resumed:?}"));
    }
    ensure!(errors.is_empty(), "{}\n{}", errors.join("\n"), pair.logs_tail());
    println!(
        "slow origin: GET answered {get_done:?} and POST {post_done:?} after the kill; origin saw the GET {} \
         times, the POST executed once + {deduplicated} deduplicated; failover {}",
        get_origin.len(),
        taken["failovers"][0]
    );
    Ok(())
}

/// Issue 3, test 6 (c): under `--non-idempotent-retry never`, a POST complete at a slow origin when
/// the primary dies is not sent again: the client sees the connection closed with no response, the
/// origin executed it once (the primary had sent it), and the backup counts the path in `/metrics`
/// and names it in its request log.
#[test]
fn slow_origin_post_under_never_is_closed_without_reexecution() -> Result<()> {
    let id = unique_id('n');
    let mut pair = Pair::up(&id, &us_origin(&["--non-idempotent-retry", "never"]), |_| Ok(()))?;
    let dir = pair.dir.0.clone();
    let target = "/order?ms=2000";
    let out = dir.join("post.out");
    let args = [
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-X",
        "POST",
        "--data-binary",
        "item=7",
        "-o",
        out.to_str().context("path")?,
        "-w",
        "%{num_connects} %{http_code}",
        &format!("http://{VIP}{target}"),
    ];
    let mut post = pair.tb.spawn("curl POST", "client", &args, &dir.join("post.log"))?;
    wait_until("the POST to reach the origin", Duration::from_secs(20), || {
        Ok((!origin_lines(&pair, target)?.is_empty()).then_some(()))
    })?;
    let killed = Instant::now();
    pair.kill_primary()?;
    let taken = pair.wait_taken_over(Duration::from_secs(30))?;
    let status = post.wait(Duration::from_secs(90))?;
    let closed_after = killed.elapsed();
    // The origin's execution ends 2 s after it began; a re-sent request would have arrived by then.
    wait_until("the origin's execution to end", Duration::from_secs(10), || {
        Ok((killed.elapsed() > Duration::from_millis(2500)).then_some(()))
    })?;

    let mut errors = Vec::new();
    let log = fs::read_to_string(dir.join("post.log"))?;
    // curl 52: "Empty reply from server", the connection closed before any response byte.
    if status.code() != Some(52) || !log.contains("curl: (52)") || curl_w(&log) != "1 000" {
        errors.push(format!("client: curl {status}, {log:?} (want exit 52: closed with no response)"));
    }
    if fs::metadata(&out).is_ok_and(|m| m.len() > 0) {
        errors.push(format!("client: got a response body: {:?}", fs::read_to_string(&out)));
    }
    let origin = origin_lines(&pair, target)?;
    if origin.len() != 1 || origin[0]["outcome"] != "executed" {
        errors.push(format!("origin: want exactly the primary's one execution: {origin:?}"));
    }
    let resumed = log_lines(&pair, "backup", target)?;
    if !resumed.iter().any(|l| l["resume"] == "refuse" && l["sent"] == false) {
        errors.push(format!("backup request log: no line with resume \"refuse\" for {target}: {resumed:?}"));
    }
    let metrics = pair.metrics("spare")?;
    let counted = metrics.lines().find(|l| l.starts_with("understudy_resume_total{path=\"closed_never_policy\"}"));
    if counted.and_then(|l| l.split_whitespace().last()) != Some("1") {
        let resume_lines: Vec<&str> = metrics.lines().filter(|l| l.starts_with("understudy_resume_total")).collect();
        errors.push(format!(
            "backup /metrics: understudy_resume_total{{path=\"closed_never_policy\"}} is not 1: {resume_lines:?}"
        ));
    }
    ensure!(errors.is_empty(), "{}\n{}", errors.join("\n"), pair.logs_tail());
    println!("POST under never: closed {closed_after:?} after the kill; failover {}", taken["failovers"][0]);
    Ok(())
}

/// Where a chunked message's bytes sit on the wire.
#[derive(Debug)]
struct ChunkedWire {
    /// Length of the response head.
    head_len: u64,
    /// Stream offsets `[start, end)` of each chunk's data (without its size line and CRLF).
    chunks: Vec<(u64, u64)>,
    body: Vec<u8>,
}

impl ChunkedWire {
    /// Parses a whole server-to-client stream holding one chunked response, strictly.
    fn parse(stream: &[u8]) -> Result<ChunkedWire> {
        let mut r = std::io::Cursor::new(stream);
        let resp = read_response(&mut r).context("the response on the wire")?;
        ensure!(
            r.position() as usize == stream.len(),
            "{} bytes after the response",
            stream.len() as u64 - r.position()
        );
        // Walk it again for the chunk positions.
        let head_len = stream.windows(4).position(|w| w == b"\r\n\r\n").context("no head")? as u64 + 4;
        let (mut pos, mut chunks) = (head_len as usize, Vec::new());
        loop {
            let eol = stream[pos..].windows(2).position(|w| w == b"\r\n").context("size line")? + pos;
            let size =
                usize::from_str_radix(std::str::from_utf8(&stream[pos..eol])?.split(';').next().unwrap_or(""), 16)?;
            if size == 0 {
                break;
            }
            chunks.push(((eol + 2) as u64, (eol + 2 + size) as u64));
            pos = eol + 2 + size + 2;
        }
        Ok(ChunkedWire { head_len, chunks, body: resp.body })
    }

    /// Where stream offset `at` falls, in words.
    fn describe(&self, at: u64) -> String {
        if at < self.head_len {
            return format!("inside the head ({at} of {})", self.head_len);
        }
        let n = self.chunks.len();
        let mut line_start = self.head_len;
        for (i, &(start, end)) in self.chunks.iter().enumerate() {
            if at == line_start {
                return format!("between chunks: at the start of chunk {i}'s size line");
            }
            if at <= start {
                return format!("inside chunk {i}'s size line ({} of {} bytes)", at - line_start, start - line_start);
            }
            if at < end {
                return format!("inside chunk {i} of {n}: {} of its {} data bytes sent", at - start, end - start);
            }
            if at < end + 2 {
                return format!("inside chunk {i}'s closing CRLF (all {} data bytes sent)", end - start);
            }
            line_start = end + 2;
        }
        "after the last data chunk".to_string()
    }
}

/// The `reply_offset` the backup's resume started writing at (its log line "resuming connection").
fn resume_reply_offset(pair: &Pair) -> Option<u64> {
    let log = fs::read_to_string(pair.dir.0.join("backup.log")).ok()?;
    let line = log.lines().find(|l| l.contains("resuming connection"))?;
    line.split_whitespace().find_map(|w| w.strip_prefix("reply_offset=")).and_then(|v| v.parse().ok())
}

/// Issue 3, test 7: a chunked response (no Content-Length) streamed by the origin, the primary killed
/// mid-body: curl's chunked decoder sees a well-formed message, the body is byte-identical, one
/// connection. A capture at the client shows the same on the wire, and where the cut fell.
#[test]
fn chunked_response_cut_mid_chunk_continues_well_formed() -> Result<()> {
    let id = unique_id('7');
    let mut pair = Pair::up(&id, &us_origin(&[]), |_| Ok(()))?;
    let dir = pair.dir.0.clone();
    // The origin streams 1 MB chunks unpaced, so the primary is held back by the client (its reply
    // window), in the middle of a chunk; 32 MB is well beyond what the send queue and the client's
    // receive buffer hold (~12 MB together), so the primary is still inside the body when it dies.
    let (len, key) = (32 * MB, 71);
    let target = format!("/chunked?len={len}&chunk=1000003&rate=0&key={key}");
    let got = dir.join("got.bin");
    let headers = dir.join("headers.txt");
    let pcap = dir.join("client.pcap");
    let capture = Capture::start(&pair.tb, "client", "eth0", &format!("tcp and host {VIP} and port {PORT}"), 0, &pcap)?;
    let url = format!("http://{VIP}{target}");
    let args = [
        "curl",
        "-sS",
        "--max-time",
        "120",
        "--limit-rate",
        "4M",
        "-D",
        headers.to_str().context("path")?,
        "-o",
        got.to_str().context("path")?,
        "-w",
        "%{num_connects} %{http_code}",
        &url,
    ];
    let mut curl = pair.tb.spawn("curl chunked", "client", &args, &dir.join("curl.log"))?;
    let started = Instant::now();
    let size = || fs::metadata(&got).map_or(0, |m| m.len());
    wait_until("a quarter of the chunked download", Duration::from_secs(60), || Ok((size() >= len / 4).then_some(())))?;
    let at = size();
    pair.kill_primary()?;
    let killed = started.elapsed();
    let taken = pair.wait_taken_over(Duration::from_secs(30))?;
    let status = curl.wait(Duration::from_secs(150))?;
    let done = started.elapsed();
    // tcpdump may lag behind the wire; a SIGINT would lose what it has not written yet.
    let mut last = (0u64, Instant::now());
    wait_until("the client's capture to catch up", Duration::from_secs(20), || {
        let now = fs::metadata(&pcap).map_or(0, |m| m.len());
        if now != last.0 {
            last = (now, Instant::now());
        }
        Ok((last.1.elapsed() >= Duration::from_millis(300)).then_some(()))
    })?;
    let stats = capture.stop()?;
    let out = fs::read_to_string(dir.join("curl.log"))?;
    ensure!(
        status.success() && curl_w(&out) == "1 200",
        "curl {status}: {out:?} (want \"1 200\")\n{}",
        pair.logs_tail()
    );
    let head = fs::read_to_string(&headers)?.to_ascii_lowercase();
    ensure!(head.contains("transfer-encoding: chunked"), "the response was not chunked: {head}");
    ensure!(size() == len, "got {} bytes of {len}", size());
    ensure!(Pair::sha256(&got)? == pattern::sha256_hex(key, len), "sha256 of the body differs from the origin's");

    // The wire, as the client received it: one connection, one well-formed chunked message.
    let streams = dir.join("streams");
    let tcp_replay = workspace_bin("tcp-replay")?;
    run(std::process::Command::new(&tcp_replay).arg("streams").arg(&pcap).arg("--out").arg(&streams))?;
    let s2c: Vec<_> = fs::read_dir(&streams)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "s2c"))
        .collect();
    ensure!(s2c.len() == 1, "{} connections in the client's capture: {s2c:?}", s2c.len());
    let wire = ChunkedWire::parse(&fs::read(&s2c[0])?).context("the server-to-client stream in the capture")?;
    ensure!(
        wire.body.len() as u64 == len && pattern::first_mismatch(key, 0, &wire.body).is_none(),
        "the body on the wire differs from the origin's"
    );
    let cut = resume_reply_offset(&pair);
    let paths: Vec<Value> = log_lines(&pair, "backup", &target)?.iter().map(|l| l["resume"].clone()).collect();
    let fetches = origin_lines(&pair, &target)?.len();
    println!(
        "chunked: primary killed at {} MB after {killed:?}; done after {done:?}; the backup continued at stream \
         offset {cut:?}: {}; {} chunks on the wire; backup resume {paths:?}; origin asked {fetches} times; \
         capture {} packets ({} dropped); failover {}",
        at / MB,
        cut.map_or("unknown".into(), |c| wire.describe(c)),
        wire.chunks.len(),
        stats.captured,
        stats.dropped_by_kernel,
        taken["failovers"][0]
    );
    Ok(())
}
