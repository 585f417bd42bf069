//! The admin endpoint over real loopback TCP, driven by curl (and raw sockets for the
//! requests curl will not send): `/status` JSON fields and types, `/metrics` checked
//! against the exposition format (0.0.4) by a small checker, counters moving after
//! updates, the bearer token, odd requests, the connection limit, graceful shutdown.
//!
//! Needs `curl` on PATH. Every wait has a deadline; timings are printed, never asserted.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value as Json;
use shared::admin::{
    self, AdminState, Direction, FailoverRecord, GateQueue, PeerState, Protection, ResumePath, UnprotectedReason,
};
use shared::protocol::Role;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokio::sync::oneshot;

const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// A server on 127.0.0.1:0 in its own runtime
// ---------------------------------------------------------------------------------

struct Server {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    /// The listening socket's inode, to tell whether this process still holds it.
    listener_inode: u64,
    state: AdminState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    fn start(token: Option<&str>) -> Result<Server> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let state = AdminState::new("node-a", "pair \"one\"", Role::Primary, 7, Instant::now());
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let listener_inode = {
            use std::os::fd::{AsFd, AsRawFd};
            std::fs::metadata(format!("/proc/self/fd/{}", listener.as_fd().as_raw_fd()))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = {
            let _guard = rt.enter();
            admin::serve(listener, state.clone(), token, async {
                let _ = stopped.await;
            })?
        };
        let task = rt.spawn(serving);
        Ok(Server { rt, addr, listener_inode, state, stop: Some(stop), task: Some(task) })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signals shutdown and waits (bounded) for `serve` to return; returns how long it took.
    fn shutdown(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            self.rt
                .block_on(async { tokio::time::timeout(DEADLINE, task).await })
                .context("serve did not return after the shutdown signal")?
                .context("serve task failed")?;
        }
        Ok(t0.elapsed())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

// ---------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn curl(extra: &[&str], url: &str) -> Result<Reply> {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--noproxy", "*", "--max-time", "5"])
        .args(extra)
        .arg(url)
        .output()
        .context("running curl (is it installed?)")?;
    ensure!(out.status.success(), "curl {extra:?} {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).context("curl output is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("no header end in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    Ok(Reply { status, headers, body: body.to_owned() })
}

fn get(server: &Server, path: &str) -> Result<Reply> {
    curl(&[], &server.url(path))
}

/// Sends raw bytes on a fresh connection and reads until the server closes or the
/// response so far contains a complete head.
fn raw(addr: SocketAddr, bytes: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.write_all(bytes)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // The server may reset after answering a request it did not read whole.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !got.is_empty() => break,
            Err(e) => return Err(e).context("reading raw response"),
        }
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

// ---------------------------------------------------------------------------------
// An exposition-format checker (text format 0.0.4)
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_metric_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn valid_label_name(n: &str) -> bool {
    let mut c = n.chars();
    !n.starts_with("__")
        && matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_value(s: &str) -> Result<f64> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().with_context(|| format!("value {s:?} is not a number")),
    }
}

/// Parses `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).with_context(|| format!("no value in {line:?}"))?;
    let name = &line[..name_end];
    ensure!(valid_metric_name(name), "invalid metric name {name:?}");
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        loop {
            // label name
            let start = chars.peek().map(|&(i, _)| i).context("unterminated label set")?;
            if r[start..].starts_with('}') {
                chars.next();
                break;
            }
            let eq = r[start..].find('=').context("label without '='")? + start;
            let lname = &r[start..eq];
            ensure!(valid_label_name(lname), "invalid label name {lname:?} in {line:?}");
            while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                chars.next();
            }
            ensure!(chars.next().map(|(_, c)| c) == Some('"'), "label value not quoted in {line:?}");
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => bail!("bad escape {other:?} in {line:?}"),
                    },
                    Some('\n') | None => bail!("unterminated label value in {line:?}"),
                    Some(c) => value.push(c),
                }
            }
            ensure!(labels.insert(lname.to_owned(), value).is_none(), "label {lname} repeated in {line:?}");
            match chars.next().map(|(_, c)| c) {
                Some(',') => {}
                Some('}') => break,
                other => bail!("expected ',' or '}}', got {other:?} in {line:?}"),
            }
        }
        let consumed = chars.peek().map_or(r.len(), |&(i, _)| i);
        rest = &r[consumed..];
    }
    let rest = rest.strip_prefix(' ').with_context(|| format!("no space before the value in {line:?}"))?;
    let mut parts = rest.split(' ');
    let value = parse_value(parts.next().unwrap_or_default())?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>().with_context(|| format!("bad timestamp in {line:?}"))?;
    }
    ensure!(parts.next().is_none(), "trailing fields in {line:?}");
    Ok(Sample { name: name.to_owned(), labels, value })
}

/// Checks an exposition and returns its samples. Rules: every sample's family has a HELP
/// and a TYPE before its first sample; each at most once; a family's samples are
/// contiguous; names and label names valid; values numbers; no series twice; counters end
/// in `_total` and are finite and non-negative; histogram buckets ascend in `le`, are
/// cumulative, end with `+Inf` equal to `_count`, and come with `_sum`.
fn check_exposition(text: &str) -> Result<Vec<Sample>> {
    ensure!(text.ends_with('\n'), "exposition must end with a newline");
    let mut help = BTreeSet::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut finished_families = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut f = c.trim_start().splitn(3, ' ');
            match (f.next(), f.next(), f.next()) {
                (Some("HELP"), Some(name), _) => {
                    ensure!(valid_metric_name(name), "{}: invalid name", at());
                    ensure!(help.insert(name.to_owned()), "{}: second HELP", at());
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    ensure!(valid_metric_name(name), "{}: invalid name", at());
                    ensure!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{}: unknown type",
                        at()
                    );
                    ensure!(
                        !finished_families.contains(name) && current.as_deref() != Some(name),
                        "{}: TYPE after samples",
                        at()
                    );
                    ensure!(types.insert(name.to_owned(), kind.to_owned()).is_none(), "{}: second TYPE", at());
                    ensure!(kind != "counter" || name.ends_with("_total"), "{}: counter without _total", at());
                }
                _ => {} // a plain comment
            }
            continue;
        }
        let s = parse_sample(line).with_context(at)?;
        let family = if types.contains_key(&s.name) {
            s.name.clone()
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suf| s.name.strip_suffix(suf))
                .find(|base| matches!(types.get(*base).map(String::as_str), Some("histogram" | "summary")))
                .with_context(|| format!("{}: sample without a TYPE", at()))?
                .to_owned()
        };
        ensure!(help.contains(&family), "{}: family {family} has no HELP", at());
        if current.as_deref() != Some(family.as_str()) {
            ensure!(!finished_families.contains(&family), "{}: family {family} is not contiguous", at());
            if let Some(prev) = current.replace(family.clone()) {
                finished_families.insert(prev);
            }
        }
        if types[&family] == "counter" {
            ensure!(s.value.is_finite() && s.value >= 0.0, "{}: counter value must be finite and >= 0", at());
        }
        let key = format!("{}{:?}", s.name, s.labels);
        ensure!(series.insert(key), "{}: series repeated", at());
        samples.push(s);
    }
    for name in help.iter() {
        ensure!(types.contains_key(name), "HELP without TYPE for {name}");
    }
    for (name, kind) in &types {
        ensure!(help.contains(name), "TYPE without HELP for {name}");
        if kind == "histogram" {
            check_histogram(name, &samples)?;
        }
    }
    Ok(samples)
}

/// A histogram's label set without `le`.
type LabelSet = Vec<(String, String)>;

fn check_histogram(name: &str, samples: &[Sample]) -> Result<()> {
    let bucket = format!("{name}_bucket");
    let mut groups: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == bucket) {
        let le = parse_value(s.labels.get("le").with_context(|| format!("{bucket} without le"))?)?;
        let rest = s.labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
        groups.entry(rest).or_default().push((le, s.value));
    }
    ensure!(!groups.is_empty(), "histogram {name} has no buckets");
    for (labels, buckets) in groups {
        for w in buckets.windows(2) {
            ensure!(w[0].0 < w[1].0, "{name}{labels:?}: le not ascending: {w:?}");
            ensure!(w[0].1 <= w[1].1, "{name}{labels:?}: buckets not cumulative: {w:?}");
        }
        let (last_le, last) = *buckets.last().expect("group is non-empty");
        ensure!(last_le == f64::INFINITY, "{name}{labels:?}: no +Inf bucket");
        let find = |suffix: &str| {
            samples
                .iter()
                .find(|s| {
                    s.name == format!("{name}{suffix}")
                        && s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<LabelSet>() == labels
                })
                .map(|s| s.value)
        };
        let count = find("_count").with_context(|| format!("{name}{labels:?}: no _count"))?;
        find("_sum").with_context(|| format!("{name}{labels:?}: no _sum"))?;
        ensure!(count == last, "{name}{labels:?}: +Inf bucket {last} != _count {count}");
    }
    Ok(())
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
        .with_context(|| format!("no sample {name}{labels:?}"))
}

fn scrape(server: &Server) -> Result<Vec<Sample>> {
    let r = get(server, "/metrics")?;
    ensure!(r.status == 200, "GET /metrics: {}", r.status);
    check_exposition(&r.body).with_context(|| format!("exposition:\n{}", r.body))
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

fn failover(reason: &str) -> FailoverRecord {
    FailoverRecord {
        at: UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
        reason: reason.to_owned(),
        epoch: 8,
        detection: Duration::from_micros(120_500),
        fencing: Duration::from_millis(30),
        restore: Duration::from_micros(290),
        total: Duration::from_millis(160),
        connections_restored: 65,
        connections_lost: 1,
        connections_staged: 60,
    }
}

#[test]
fn status_json_has_every_field_with_its_type() -> Result<()> {
    let server = Server::start(None)?;
    let s = &server.state;
    s.set_peer(PeerState::Connected, Some("node-b"));
    let _p = s.connection_opened(Protection::Protected);
    let _u = s.connection_opened(Protection::Unprotected(UnprotectedReason::MidStream));
    s.metrics().replication().record_sent(Instant::now(), 4, 4000);
    s.metrics().replication().record_acked(1, 1000);
    s.metrics().observe_heartbeat_rtt(Duration::from_micros(420));
    s.record_failover(failover("5 heartbeats missed"));

    let r = get(&server, "/status")?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j: Json = serde_json::from_str(&r.body).context("status is JSON")?;
    println!("{}", r.body);

    assert_eq!(j["role"], "primary");
    assert_eq!(j["peer"], "connected");
    assert_eq!(j["peer_node"], "node-b");
    assert_eq!(j["epoch"], 7);
    assert_eq!(j["node"], "node-a");
    assert_eq!(j["cluster"], "pair \"one\"");
    assert_eq!(j["protected"], true);
    assert!(j["version"].is_string());
    assert!(j["uptime_ms"].is_u64());
    let c = &j["connections"];
    assert_eq!((c["total"].as_u64(), c["protected"].as_u64(), c["unprotected"].as_u64()), (Some(2), Some(1), Some(1)));
    let reasons = c["unprotected_reasons"].as_object().context("reasons is an object")?;
    let names: Vec<&str> = reasons.keys().map(String::as_str).collect();
    assert_eq!(names, ["http_unframed", "mid_stream", "no_backup", "tracker_lost"]);
    assert_eq!(reasons["mid_stream"], 1);
    assert!(reasons.values().all(Json::is_u64));
    assert!(c["opened_total"].is_u64() && c["closed_total"].is_u64());
    let rep = &j["replication"];
    assert_eq!((rep["lag_records"].as_u64(), rep["lag_bytes"].as_u64()), (Some(3), Some(3000)));
    assert!(rep["oldest_unacked_ms"].as_f64().is_some_and(|v| v >= 0.0));
    for k in ["records_sent", "records_acked", "bytes_sent", "bytes_acked"] {
        assert!(rep[k].is_u64(), "{k}");
    }
    assert_eq!(j["heartbeat_rtt_ms"].as_f64(), Some(0.42));
    assert_eq!(j["failovers_total"], 1);
    let f = &j["failovers"].as_array().context("failovers is a list")?[0];
    assert_eq!(f["at"], "2026-11-18T11:06:40.123Z");
    assert_eq!(f["at_unix_ms"], 1_795_000_000_123u64);
    assert_eq!(f["reason"], "5 heartbeats missed");
    assert_eq!(f["epoch"], 8);
    assert_eq!(f["detection_ms"].as_f64(), Some(120.5));
    assert_eq!(f["fencing_ms"].as_f64(), Some(30.0));
    assert_eq!(f["restore_ms"].as_f64(), Some(0.29));
    assert_eq!(f["total_ms"].as_f64(), Some(160.0));
    assert_eq!((f["connections_restored"].as_u64(), f["connections_lost"].as_u64()), (Some(65), Some(1)));
    assert_eq!(f["connections_staged"].as_u64(), Some(60));
    let limits = j["limits"].as_object().context("limits is an object")?;
    let names: Vec<&str> = limits.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "bad_request",
            "body_read_timeout",
            "header_read_timeout",
            "idle_timeout",
            "max_connections",
            "max_header_bytes",
            "send_timeout"
        ]
    );
    assert!(limits.values().all(|v| v == 0));
    assert!(j["replica"].is_null(), "no table set: {}", j["replica"]);
    s.metrics().limit_hits.get(shared::admin::Limit::MaxConnections).inc();
    s.set_replica(Some(std::sync::Arc::new(std::sync::Mutex::new(shared::replica::ReplicaTable::new()))));
    let j: Json = serde_json::from_str(&get(&server, "/status")?.body)?;
    assert_eq!(j["limits"]["max_connections"], 1);
    let r = &j["replica"];
    assert_eq!(
        (r["connections"].as_u64(), r["bytes"].as_u64(), r["largest_connection_bytes"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
    assert!(r["digest"].as_str().is_some_and(|d| d.len() == 16), "{r}");

    // Everything acknowledged and no peer: unprotected, and the age is null.
    s.metrics().replication().record_acked(3, 3000);
    s.set_peer(PeerState::None, None);
    let j: Json = serde_json::from_str(&get(&server, "/status")?.body)?;
    assert_eq!(j["protected"], false);
    assert_eq!(j["peer"], "none");
    assert!(j["peer_node"].is_null() && j["replication"]["oldest_unacked_ms"].is_null());
    Ok(())
}

#[test]
fn metrics_are_a_valid_exposition_with_every_family() -> Result<()> {
    let server = Server::start(None)?;
    server.state.metrics().observe_heartbeat_rtt(Duration::from_micros(300));
    server.state.metrics().observe_heartbeat_rtt(Duration::from_millis(3));
    let r = get(&server, "/metrics")?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let samples = check_exposition(&r.body).with_context(|| r.body.clone())?;
    println!("{}{} samples, {} bytes", r.body, samples.len(), r.body.len());

    for family in [
        "understudy_role",
        "understudy_epoch",
        "understudy_peer",
        "understudy_protected",
        "understudy_connections",
        "understudy_limit_hits_total",
        "understudy_connections_unprotected",
        "understudy_connections_opened_total",
        "understudy_connections_unprotected_total",
        "understudy_http_exchanges_total",
        "understudy_client_bytes_total",
        "understudy_upstream_bytes_total",
        "understudy_replication_records_sent_total",
        "understudy_replication_records_acked_total",
        "understudy_replication_sent_bytes_total",
        "understudy_replication_acked_bytes_total",
        "understudy_replication_lag_records",
        "understudy_replication_lag_bytes",
        "understudy_replication_oldest_unacked_seconds",
        "understudy_gate_packets_total",
        "understudy_gate_batches_total",
        "understudy_gate_dropped_packets_total",
        "understudy_resume_total",
        "understudy_failovers_total",
        "understudy_heartbeat_rtt_seconds_bucket",
    ] {
        assert!(samples.iter().any(|s| s.name == family), "no samples of {family}");
    }
    assert!(r.body.contains("# TYPE understudy_last_failover_seconds gauge\n"));
    for path in [
        "replayed_from_log",
        "resent_upstream",
        "continued_at_offset",
        "range_refetch",
        "full_refetch",
        "closed_never_policy",
        "closed_mismatch",
        "nothing_to_do",
    ] {
        assert_eq!(value(&samples, "understudy_resume_total", &[("path", path)])?, 0.0);
    }
    assert_eq!(
        value(
            &samples,
            "understudy_node_info",
            &[("node", "node-a"), ("cluster", "pair \"one\""), ("version", env!("CARGO_PKG_VERSION"))]
        )?,
        1.0
    );
    assert_eq!(value(&samples, "understudy_role", &[("role", "primary")])?, 1.0);
    assert_eq!(value(&samples, "understudy_peer", &[("state", "none")])?, 1.0);
    assert_eq!(value(&samples, "understudy_protected", &[])?, 0.0);
    assert_eq!(value(&samples, "understudy_heartbeat_rtt_seconds_bucket", &[("le", "0.00025")])?, 0.0);
    assert_eq!(value(&samples, "understudy_heartbeat_rtt_seconds_bucket", &[("le", "0.0005")])?, 1.0);
    assert_eq!(value(&samples, "understudy_heartbeat_rtt_seconds_bucket", &[("le", "+Inf")])?, 2.0);
    assert!((value(&samples, "understudy_heartbeat_rtt_seconds_sum", &[])? - 0.0033).abs() < 1e-12);

    // HEAD gets the head only.
    let head = curl(&["-I"], &server.url("/metrics"))?;
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");
    Ok(())
}

#[test]
fn counters_and_gauges_move_after_updates() -> Result<()> {
    let server = Server::start(None)?;
    let s = &server.state;
    let before = scrape(&server)?;
    let m = s.metrics();
    m.exchanges.add(3);
    m.client_bytes.get(Direction::Sent).add(1500);
    m.upstream_bytes.get(Direction::Received).add(1400);
    m.gate_packets.get(GateQueue::Inbound).add(40);
    m.gate_batches.get(GateQueue::Inbound).add(4);
    m.gate_drops.get(GateQueue::Outbound).inc();
    m.resumes.get(ResumePath::RangeRefetch).inc();
    m.resumes.get(ResumePath::ClosedNeverPolicy).add(2);
    m.replication().record_sent(Instant::now(), 10, 9000);
    m.replication().record_acked(6, 5000);
    m.observe_heartbeat_rtt(Duration::from_millis(20));
    let mut conn = s.connection_opened(Protection::Protected);
    let _other = s.connection_opened(Protection::Protected);
    conn.set_protection(Protection::Unprotected(UnprotectedReason::NoBackup));
    s.set_role(Role::Primary, 8);
    s.set_peer(PeerState::Connected, Some("node-b"));
    s.record_failover(failover("replication link reset"));
    let after = scrape(&server)?;

    let delta = |name: &str, labels: &[(&str, &str)]| -> Result<f64> {
        Ok(value(&after, name, labels)? - value(&before, name, labels)?)
    };
    assert_eq!(delta("understudy_http_exchanges_total", &[])?, 3.0);
    assert_eq!(delta("understudy_client_bytes_total", &[("direction", "sent")])?, 1500.0);
    assert_eq!(delta("understudy_client_bytes_total", &[("direction", "received")])?, 0.0);
    assert_eq!(delta("understudy_upstream_bytes_total", &[("direction", "received")])?, 1400.0);
    assert_eq!(delta("understudy_gate_packets_total", &[("queue", "inbound")])?, 40.0);
    assert_eq!(delta("understudy_gate_batches_total", &[("queue", "inbound")])?, 4.0);
    assert_eq!(delta("understudy_gate_dropped_packets_total", &[("queue", "outbound")])?, 1.0);
    assert_eq!(delta("understudy_resume_total", &[("path", "range_refetch")])?, 1.0);
    assert_eq!(delta("understudy_resume_total", &[("path", "closed_never_policy")])?, 2.0);
    assert_eq!(delta("understudy_replication_records_sent_total", &[])?, 10.0);
    assert_eq!(delta("understudy_replication_acked_bytes_total", &[])?, 5000.0);
    assert_eq!(value(&after, "understudy_replication_lag_records", &[])?, 4.0);
    assert_eq!(value(&after, "understudy_replication_lag_bytes", &[])?, 4000.0);
    assert!(value(&after, "understudy_replication_oldest_unacked_seconds", &[])? >= 0.0);
    assert_eq!(delta("understudy_heartbeat_rtt_seconds_count", &[])?, 1.0);
    assert_eq!(delta("understudy_heartbeat_rtt_seconds_bucket", &[("le", "0.025")])?, 1.0);
    assert_eq!(delta("understudy_heartbeat_rtt_seconds_bucket", &[("le", "0.01")])?, 0.0);
    assert_eq!(value(&after, "understudy_connections", &[("state", "protected")])?, 1.0);
    assert_eq!(value(&after, "understudy_connections", &[("state", "unprotected")])?, 1.0);
    assert_eq!(value(&after, "understudy_connections_unprotected", &[("reason", "no_backup")])?, 1.0);
    assert_eq!(delta("understudy_connections_opened_total", &[])?, 2.0);
    assert_eq!(delta("understudy_connections_unprotected_total", &[("reason", "no_backup")])?, 1.0);
    assert_eq!(value(&after, "understudy_epoch", &[])?, 8.0);
    assert_eq!(value(&after, "understudy_protected", &[])?, 1.0);
    assert_eq!(value(&after, "understudy_peer", &[("state", "connected")])?, 1.0);
    assert_eq!(value(&after, "understudy_peer", &[("state", "none")])?, 0.0);
    assert_eq!(delta("understudy_failovers_total", &[])?, 1.0);
    assert_eq!(value(&after, "understudy_last_failover_seconds", &[("phase", "total")])?, 0.16);

    drop(conn);
    let closed = scrape(&server)?;
    assert_eq!(value(&closed, "understudy_connections", &[("state", "unprotected")])?, 0.0);
    assert_eq!(value(&closed, "understudy_connections_closed_total", &[])?, 1.0);
    Ok(())
}

#[test]
fn configured_token_is_required_except_for_healthz() -> Result<()> {
    let server = Server::start(Some("s3cr3t-T0ken"))?;
    for path in ["/status", "/metrics", "/nope"] {
        let r = get(&server, path)?;
        assert_eq!(r.status, 401, "{path} without a token");
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"understudy\""));
        let r = curl(&["-H", "Authorization: Bearer wrong"], &server.url(path))?;
        assert_eq!(r.status, 401, "{path} with a wrong token");
        assert!(r.header("www-authenticate").is_some_and(|v| v.contains("invalid_token")));
        let r = curl(&["-u", "user:s3cr3t-T0ken"], &server.url(path))?;
        assert_eq!(r.status, 401, "{path} with basic auth");
    }
    let auth = ["-H", "Authorization: Bearer s3cr3t-T0ken"];
    assert_eq!(curl(&auth, &server.url("/status"))?.status, 200);
    let m = curl(&auth, &server.url("/metrics"))?;
    assert_eq!(m.status, 200);
    check_exposition(&m.body)?;
    assert_eq!(curl(&auth, &server.url("/nope"))?.status, 404);
    let h = get(&server, "/healthz")?;
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    Ok(())
}

#[test]
fn unknown_paths_are_404_and_other_methods_405() -> Result<()> {
    let server = Server::start(None)?;
    for path in ["/", "/status/", "/statusx", "/admin/switchover/", "/STATUS"] {
        assert_eq!(get(&server, path)?.status, 404, "{path}");
    }
    // The server does not normalise dot segments.
    assert_eq!(curl(&["--path-as-is"], &server.url("/metrics/../status"))?.status, 404);
    // The switchover takes POST only; a node that is not a serving primary refuses it with the reason.
    let r = get(&server, "/admin/switchover")?;
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    let r = curl(&["-X", "POST", "-d", "x=1"], &server.url("/admin/switchover"))?;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("cannot hand over"), "{}", r.body);
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let r = curl(&["-X", method], &server.url("/status"))?;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }
    // A query string does not change the route.
    assert_eq!(get(&server, "/metrics?name[]=understudy_epoch")?.status, 200);
    Ok(())
}

#[test]
fn odd_requests_get_4xx_and_the_server_keeps_serving() -> Result<()> {
    let server = Server::start(None)?;
    let garbage = raw(server.addr, b"\x00\x01\x02 not http at all\r\n\r\n")?;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
    let huge = format!("GET /status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000));
    let r = raw(server.addr, huge.as_bytes())?;
    assert!(r.starts_with("HTTP/1.1 431"), "{r:?}");
    let r = raw(server.addr, b"GET /st%ff%00atus HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    assert!(r.starts_with("HTTP/1.1 404"), "{r:?}");
    let r = raw(server.addr, b"GET http://elsewhere/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    assert!(r.starts_with("HTTP/1.1 200"), "absolute-form: {r:?}");
    let r = raw(server.addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")?;
    assert!(r.starts_with("HTTP/1.1 405"), "{r:?}");
    let r = raw(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")?;
    assert!(r.starts_with("HTTP/1.1 400"), "{r:?}");
    // A client that connects and says nothing, and one that hangs up mid-head.
    let _silent = TcpStream::connect(server.addr)?;
    {
        let mut cut = TcpStream::connect(server.addr)?;
        cut.write_all(b"GET /sta")?;
    }
    let h = get(&server, "/healthz")?;
    assert_eq!(h.status, 200);
    Ok(())
}

#[test]
fn connections_over_the_limit_are_closed_on_accept() -> Result<()> {
    let server = Server::start(None)?;
    // Fill every slot with a kept-alive connection that has been served once (so it
    // has certainly been accepted and holds its slot).
    let mut held = Vec::new();
    for _ in 0..admin::server::MAX_CONNECTIONS {
        let mut s = TcpStream::connect(server.addr)?;
        s.set_read_timeout(Some(DEADLINE))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf)?;
        ensure!(buf[..n].starts_with(b"HTTP/1.1 200"), "slot connection not served");
        held.push(s);
    }
    let mut extra = TcpStream::connect(server.addr)?;
    extra.set_read_timeout(Some(DEADLINE))?;
    let t0 = Instant::now();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    match extra.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => bail!("connection over the limit was not closed: {other:?}"),
    }
    println!("over-limit connection closed after {:?}", t0.elapsed());
    drop(held);
    // Slots come back once the held connections are gone.
    let deadline = Instant::now() + DEADLINE;
    loop {
        match get(&server, "/healthz") {
            Ok(r) if r.status == 200 => break,
            other => ensure!(Instant::now() < deadline, "slots never came back: {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn shutdown_closes_idle_keepalive_connections_and_returns() -> Result<()> {
    let mut server = Server::start(None)?;
    let mut idle = TcpStream::connect(server.addr)?;
    idle.set_read_timeout(Some(DEADLINE))?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf)?;
    ensure!(buf[..n].starts_with(b"HTTP/1.1 200"), "not served: {:?}", String::from_utf8_lossy(&buf[..n]));
    // Whether this process still holds the listening socket itself. The port says nothing: the tests of
    // this binary run in parallel, and another one's listener or client may take it at once.
    let wanted = format!("socket:[{}]", server.listener_inode);
    let held = || -> Result<bool> {
        Ok(std::fs::read_dir("/proc/self/fd")?
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|target| target.to_string_lossy() == wanted))
    };
    ensure!(held()?, "the listener {} ({wanted}) is not found while serving", server.addr);
    let took = server.shutdown()?;
    println!("serve returned {took:?} after the shutdown signal");
    assert_eq!(idle.read(&mut buf)?, 0, "idle keep-alive connection closed");
    ensure!(!held()?, "listener {} ({wanted}) still open after shutdown", server.addr);
    Ok(())
}

#[test]
fn checker_rejects_broken_expositions() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n";
    assert!(check_exposition(ok).is_ok());
    let broken = [
        ("no HELP", "# TYPE a_total counter\na_total 1\n"),
        ("no TYPE", "# HELP a_total A.\na_total 1\n"),
        ("bad name", "# HELP a-b A.\n# TYPE a-b gauge\na-b 1\n"),
        ("not a number", "# HELP a A.\n# TYPE a gauge\na one\n"),
        ("counter name", "# HELP a A.\n# TYPE a counter\na 1\n"),
        ("duplicate", "# HELP a A.\n# TYPE a gauge\na 1\na 2\n"),
        ("unquoted label", "# HELP a A.\n# TYPE a gauge\na{x=1} 1\n"),
        ("bad escape", "# HELP a A.\n# TYPE a gauge\na{x=\"\\t\"} 1\n"),
        ("interleaved", "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na{x=\"1\"} 1\nb 1\na{x=\"2\"} 1\n"),
        (
            "not cumulative",
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        ),
        ("inf != count", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n"),
        ("no trailing newline", "# HELP a A.\n# TYPE a gauge\na 1"),
    ];
    for (what, text) in broken {
        assert!(check_exposition(text).is_err(), "checker accepted: {what}");
    }
}
