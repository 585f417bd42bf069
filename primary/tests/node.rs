//! The `primary` binary end to end, serving unprotected on a `scripts/testbed --pair` bed: client
//! 10.0.0.1, server 10.0.0.2 (primary; eth1 10.1.0.2 replication), spare 10.0.0.3 (eth1 10.1.0.3),
//! origin 10.2.0.10 running nginx. Real kernels, real ARP, curl as the client, the real link handshake
//! from the spare.
//!
//! Needs root, `nginx`, `curl`, `arptables`, `iproute2` and `ethtool` (the test bed). The flag tests need
//! none of that. Timings are printed, never asserted.

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use shared::link::{HandshakeError, LinkConfig, LocalIdentity, WelcomeError, join};
use shared::protocol::Role;
use shared::vip::{Mac, ProbeOutcome};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const PRIMARY: &str = env!("CARGO_BIN_EXE_primary");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const IFACE: &str = "eth0";
const BIG: u64 = 16 << 20;

// ---------------------------------------------------------------- plumbing (after tests/support/harness.rs)

/// Polls `probe` every few milliseconds until it yields a value; fails with `what` after `timeout`.
fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("starting {cmd:?}"))
}

/// Runs a command to completion; fails with its output unless it exits 0.
fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Test bed `pn<pid in base 36>` with the pair networks; `Drop` takes it down.
struct Testbed {
    id: String,
    script: PathBuf,
}

impl Testbed {
    fn up_pair() -> Result<Testbed> {
        // SAFETY: geteuid has no preconditions.
        ensure!(unsafe { libc::geteuid() } == 0, "the node test needs root (network namespaces, raw sockets)");
        let mut pid = std::process::id();
        let mut digits = Vec::new();
        while {
            digits.push(char::from_digit(pid % 36, 36).expect("digit below 36"));
            pid /= 36;
            pid > 0
        } {}
        let id: String = "pn".chars().chain(digits.into_iter().rev()).collect();
        let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/testbed"));
        run(Command::new(&script).args(["up", &id, "--pair"]))?;
        Ok(Testbed { id, script })
    }

    fn ns(&self, host: &str) -> String {
        format!("us{}-{host}", self.id)
    }

    /// `scripts/testbed exec ID HOST ARGS...` (it execs: the child's PID is the program's).
    fn command(&self, host: &str, args: &[&str]) -> Command {
        let mut c = Command::new(&self.script);
        c.args(["exec", &self.id, host]).args(args);
        c
    }

    fn exec(&self, host: &str, args: &[&str]) -> Result<String> {
        run(&mut self.command(host, args))
    }

    /// Starts `args` in `host`, stdout and stderr to `log`.
    fn spawn(&self, name: &str, host: &str, args: &[&str], log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = self
            .command(host, args)
            // The log checks below read info-level lines.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.to_string(), child: Some(child), log: log.to_path_buf() })
    }

    /// The hardware address of `host`'s eth0.
    fn mac(&self, host: &str) -> Result<Mac> {
        let out = self.exec(host, &["ip", "-j", "link", "show", "dev", IFACE])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        parse_mac(v[0]["address"].as_str().context("no address in `ip link` output")?)
    }

    /// Whether `host`'s eth0 carries the VIP.
    fn has_vip(&self, host: &str) -> Result<bool> {
        let out = self.exec(host, &["ip", "-j", "-4", "addr", "show", "dev", IFACE])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let infos = v[0]["addr_info"].as_array().cloned().unwrap_or_default();
        Ok(infos.iter().any(|a| a["local"].as_str() == Some(&VIP.to_string())))
    }

    /// `host`'s arptables OUTPUT rules that name the VIP.
    fn vip_arp_rules(&self, host: &str) -> Result<Vec<String>> {
        let out = self.exec(host, &["arptables", "-L", "OUTPUT", "-n"])?;
        Ok(out.lines().filter(|l| l.contains(&VIP.to_string())).map(str::to_owned).collect())
    }

    /// Runs `f` on a fresh thread inside `host`'s network namespace, on a current-thread runtime.
    fn within<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>>>> + Send + 'static,
    ) -> Result<T> {
        let ns = self.ns(host);
        std::thread::spawn(move || -> Result<T> {
            let _inside = Netns::enter(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {host} panicked"))?
    }

    /// RFC 5227 probes of the VIP from `host` (`shared::vip::probe`, the fencing check).
    fn probe_vip(&self, host: &str) -> Result<ProbeOutcome> {
        self.within(host, || {
            Box::pin(async { Ok(shared::vip::probe(IFACE, VIP, 3, Duration::from_millis(300)).await?) })
        })
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        match Command::new(&self.script).args(["down", &self.id]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("testbed down {} failed: {}", self.id, String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("testbed down {} failed: {e}", self.id),
        }
    }
}

/// This thread inside another network namespace until dropped.
struct Netns {
    home: File,
}

impl Netns {
    fn enter(ns: &str) -> Result<Netns> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's namespace")?;
        let target = File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening namespace {ns}"))?;
        // SAFETY: setns(2) on a namespace descriptor we hold; it affects this thread only.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {ns}"));
        }
        Ok(Netns { home })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // SAFETY: as above, back to where the thread was.
        let rc = unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "cannot return to the original network namespace: {}", std::io::Error::last_os_error());
    }
}

/// A process started by the test; `Drop` kills it (by PID) and reaps it.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} was already reaped", self.name),
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = self.name.clone();
        let status = wait_until(&format!("{name} to exit"), timeout, || self.try_wait())
            .with_context(|| format!("log of {name}:\n{}", self.log_text()))?;
        self.child = None;
        Ok(status)
    }

    fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.child.as_ref().map_or(0, Child::id) as libc::pid_t;
        ensure!(pid > 0, "{} is not running", self.name);
        // SAFETY: plain kill(2) on our own child's PID.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("signalling {}", self.name));
        }
        Ok(())
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails early (with the log) if the process exits.
    fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let name = self.name.clone();
        wait_until(&format!("{name} to log {needle:?}"), timeout, || {
            if let Some(status) = self.try_wait()? {
                bail!("{name} exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            Ok(self.log_text().contains(needle).then_some(()))
        })
        .with_context(|| format!("log of {name}:\n{}", self.log_text()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("us-node-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn parse_mac(s: &str) -> Result<Mac> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    ensure!(parts.len() == 6, "not a MAC: {s}");
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("not a MAC: {s}"))?;
    }
    Ok(Mac(mac))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("temp path is not UTF-8")
}

/// Writes `len` deterministic, non-repeating bytes to `path`; returns their sha256.
fn write_pattern_file(path: &Path, len: u64) -> Result<String> {
    let mut w = BufWriter::new(File::create(path)?);
    let mut h = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(block.len() as u64) as usize;
        for (j, b) in block[..n].iter_mut().enumerate() {
            let i = at + j as u64;
            *b = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i >> 20) as u8;
        }
        h.update(&block[..n]);
        w.write_all(&block[..n])?;
        at += n as u64;
    }
    w.flush()?;
    Ok(hex::encode(h.finalize()))
}

fn sha256_file(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(fs::read(path).with_context(|| format!("reading {}", path.display()))?)))
}

/// nginx in the origin host on 10.2.0.10:8080, one process (`master_process off`), config and logs in
/// `dir`; ended by PID (the `Proc` drop).
fn start_nginx(tb: &Testbed, dir: &TempDir, root: &Path) -> Result<Proc> {
    let d = dir.join("nginx");
    fs::create_dir_all(&d)?;
    let dd = d.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dd}/nginx.pid;\nerror_log {dd}/error.log warn;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n  access_log {dd}/access.log;\n  client_body_temp_path {dd}/body;\n  proxy_temp_path {dd}/proxy;\n\
         fastcgi_temp_path {dd}/fastcgi;\n  uwsgi_temp_path {dd}/uwsgi;\n  scgi_temp_path {dd}/scgi;\n\
         keepalive_requests 100000;\n  types {{ text/plain txt; application/octet-stream bin; }}\n\
         server {{ listen 10.2.0.10:8080; root {root}; location / {{ }} }}\n}}\n",
        root = root.display()
    );
    let conf_path = d.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let prefix = format!("{dd}/");
    let mut nginx = tb.spawn(
        "nginx",
        "origin",
        &["nginx", "-p", &prefix, "-c", path_str(&conf_path)?, "-e", &format!("{dd}/error.log")],
        &dir.join("nginx.log"),
    )?;
    wait_until("nginx to serve on 10.2.0.10:8080", Duration::from_secs(10), || {
        if let Some(status) = nginx.try_wait()? {
            bail!("nginx exited ({status}): {}", fs::read_to_string(d.join("error.log")).unwrap_or_default());
        }
        let probe =
            output(&mut tb.command("server", &["curl", "-sf", "-o", "/dev/null", "http://10.2.0.10:8080/small.txt"]))?;
        Ok(probe.status.success().then_some(()))
    })?;
    Ok(nginx)
}

/// `GET path` on the admin endpoint, from inside the server host.
fn admin_get(tb: &Testbed, path: &str) -> Result<String> {
    tb.exec("server", &["curl", "-sS", "--fail", &format!("http://127.0.0.1:9900{path}")])
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn primary_args<'a>(repl: &'a str, node: &'a str, iface: &'a str) -> Vec<&'a str> {
    vec![
        PRIMARY,
        "--vip",
        "10.0.0.100/24",
        "--iface",
        iface,
        "--port",
        "80",
        "--repl-listen",
        repl,
        "--upstream",
        "http://10.2.0.10:8080",
        "--node",
        node,
    ]
}

// ---------------------------------------------------------------- the tests

#[test]
fn primary_serves_vip_unprotected_refuses_second_primary_and_backups_and_releases_vip_on_sigterm() -> Result<()> {
    let tb = Testbed::up_pair()?;
    let dir = TempDir::new("e2e")?;
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    let big_sha = write_pattern_file(&www.join("big.bin"), BIG)?;
    fs::write(www.join("small.txt"), b"small file from the origin\n")?;
    let _nginx = start_nginx(&tb, &dir, &www)?;
    let server_mac = tb.mac("server")?;

    // The primary claims the VIP and serves.
    let mut args = primary_args("10.1.0.2:7700", "primary-test", IFACE);
    args.extend(["--admin", "127.0.0.1:9900"]);
    let started = Instant::now();
    let mut primary = tb.spawn("primary", "server", &args, &dir.join("primary.log"))?;
    primary.wait_for_log("serving HTTP on the VIP", Duration::from_secs(15))?;
    println!("primary: start to serving in {:?} (includes the 300 ms startup probe)", started.elapsed());
    let log = primary.log_text();
    ensure!(log.contains("serving unprotected: replication not available in this build"), "{log}");
    ensure!(tb.has_vip("server")?, "the VIP is not on the server's eth0");
    ensure!(tb.vip_arp_rules("server")?.len() == 1, "want one arptables rule: {:?}", tb.vip_arp_rules("server")?);

    // Through the VIP from the client, two requests on one connection (keep-alive).
    let (f1, f2) = (dir.join("got-big"), dir.join("got-small"));
    let t = Instant::now();
    let out = tb.exec(
        "client",
        &[
            "curl",
            "-sS",
            "--fail",
            "-o",
            path_str(&f1)?,
            "-o",
            path_str(&f2)?,
            "-w",
            "%{num_connects} %{http_code} %{size_download}\n",
            "http://10.0.0.100/big.bin",
            "http://10.0.0.100/small.txt",
        ],
    )?;
    println!("client: {BIG} + 27 bytes through the VIP in {:?}", t.elapsed());
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines == [format!("1 200 {BIG}"), "0 200 27".to_string()], "curl -w said {out:?}");
    ensure!(sha256_file(&f1)? == big_sha, "downloaded body differs from the origin's");
    ensure!(fs::read(&f2)? == b"small file from the origin\n", "small body differs");

    // The client resolved the VIP to the server, and a probe finds it there.
    match tb.probe_vip("client")? {
        ProbeOutcome::Answered { mac, after, .. } => {
            ensure!(mac == server_mac, "the VIP answered from {mac}, want the server's {server_mac}");
            println!("client probe: VIP answered by {mac} after {after:?}");
        }
        other => bail!("the VIP should be answered by the server, got {other:?}"),
    }

    // /status and /metrics.
    let status: serde_json::Value = wait_until("the connection to be counted closed", Duration::from_secs(5), || {
        let s: serde_json::Value = serde_json::from_str(&admin_get(&tb, "/status")?)?;
        let c = &s["connections"];
        Ok((c["total"] == 0 && c["opened_total"].as_u64() >= Some(1)).then_some(s))
    })?;
    ensure!(status["role"] == "primary", "{status}");
    ensure!(status["peer"] == "none", "{status}");
    ensure!(status["protected"] == false, "{status}");
    ensure!(status["epoch"] == 1, "{status}");
    ensure!(status["node"] == "primary-test", "{status}");
    let metrics = admin_get(&tb, "/metrics")?;
    ensure!(metric(&metrics, "understudy_http_exchanges_total") >= Some(2.0), "{metrics}");
    ensure!(metric(&metrics, "understudy_protected") == Some(0.0), "{metrics}");
    ensure!(metrics.contains("understudy_connections_unprotected_total{reason=\"no_backup\"} 1"), "{metrics}");

    // A backup joining on the replication address goes through the real handshake and is refused.
    let refused = tb.within("spare", || {
        Box::pin(async {
            let stream = tokio::net::TcpStream::connect("10.1.0.2:7700").await?;
            let me = LocalIdentity::new("understudy", "backup-test", Role::Backup, 1);
            match join(stream, &me, &LinkConfig::default()).await {
                Err(HandshakeError::Welcome(WelcomeError::Refused { reason })) => Ok(reason),
                Err(e) => bail!("join failed otherwise: {e}"),
                Ok(_) => bail!("the primary accepted a backup it cannot replicate to"),
            }
        })
    })?;
    ensure!(refused.contains("cannot replicate yet"), "refusal reason: {refused}");
    primary.wait_for_log("refused a joining backup", Duration::from_secs(5))?;

    // A second primary on the spare finds the VIP answered, says by whom, and changes nothing.
    let t = Instant::now();
    let mut second = tb.spawn(
        "second primary",
        "spare",
        &primary_args("10.1.0.3:7700", "spare-test", IFACE),
        &dir.join("second.log"),
    )?;
    let status = second.wait(Duration::from_secs(15))?;
    let second_log = second.log_text();
    println!("second primary refused to start in {:?}", t.elapsed());
    ensure!(!status.success(), "the second primary started ({status}):\n{second_log}");
    let last = second_log.lines().last().unwrap_or_default();
    ensure!(
        last.starts_with("primary: ") && last.contains("10.0.0.100") && last.contains(&server_mac.to_string()),
        "the error should name the VIP and the server's MAC {server_mac}: {last:?}"
    );
    ensure!(!tb.has_vip("spare")?, "the refused primary left the VIP on the spare");
    ensure!(tb.vip_arp_rules("spare")?.is_empty(), "the refused primary left arptables rules");
    let again = tb.exec("client", &["curl", "-sS", "--fail", "http://10.0.0.100/small.txt"])?;
    ensure!(again == "small file from the origin\n", "the first primary stopped serving: {again:?}");
    ensure!(primary.try_wait()?.is_none(), "the first primary exited");

    // An ARP probe that cannot be made is an error, not "free".
    let mut blind = tb.spawn(
        "primary on a missing interface",
        "spare",
        &primary_args("10.1.0.3:7700", "spare-test", "eth7"),
        &dir.join("blind.log"),
    )?;
    let status = blind.wait(Duration::from_secs(15))?;
    let last = blind.log_text().lines().last().unwrap_or_default().to_owned();
    ensure!(status.code() == Some(1), "want exit 1, got {status}: {last}");
    ensure!(last.contains("cannot probe") && last.contains("eth7"), "{last}");
    ensure!(!tb.has_vip("spare")?, "the blind primary left the VIP on the spare");

    // SIGTERM in the middle of a download: the download finishes (the drain), then the primary exits 0
    // and the VIP, the rule and the ARP answers are gone.
    let slow = dir.join("got-slow");
    let mut download = tb.spawn(
        "rate-limited curl",
        "client",
        &["curl", "-sS", "--fail", "--limit-rate", "4M", "-o", path_str(&slow)?, "http://10.0.0.100/big.bin"],
        &dir.join("curl-slow.log"),
    )?;
    wait_until("the slow download to be under way", Duration::from_secs(10), || {
        if let Some(status) = download.try_wait()? {
            bail!("curl exited ({status}) early: {}", download.log_text());
        }
        Ok((fs::metadata(&slow).map_or(0, |m| m.len()) >= 1 << 20).then_some(()))
    })?;
    let t = Instant::now();
    primary.signal(libc::SIGTERM)?;
    let curl_status =
        download.wait(Duration::from_secs(20)).with_context(|| format!("primary log:\n{}", primary.log_text()))?;
    println!("client: the download in progress at SIGTERM finished {:?} after it", t.elapsed());
    ensure!(curl_status.success(), "the download in progress failed ({curl_status}): {}", download.log_text());
    ensure!(sha256_file(&slow)? == big_sha, "the download in progress at SIGTERM differs from the origin's");
    let status = primary.wait(Duration::from_secs(20))?;
    println!("primary: SIGTERM to exit in {:?}", t.elapsed());
    let log = primary.log_text();
    ensure!(status.code() == Some(0), "want exit 0 after SIGTERM, got {status}:\n{log}");
    ensure!(log.contains("stopped cleanly"), "{log}");
    let bare: Vec<&str> = log.lines().filter(|l| !(l.contains("role=\"primary\"") && l.contains("epoch=1"))).collect();
    ensure!(bare.is_empty(), "log lines without the role and epoch fields: {bare:#?}");
    let (stopped, removed) = (log.find("HTTP server stopped"), log.find("VIP removed"));
    ensure!(stopped.is_some() && removed > stopped, "the VIP must be released after the drain:\n{log}");
    ensure!(!tb.has_vip("server")?, "the VIP is still on the server");
    ensure!(tb.vip_arp_rules("server")?.is_empty(), "arptables rule left: {:?}", tb.vip_arp_rules("server")?);
    match tb.probe_vip("client")? {
        ProbeOutcome::Unanswered { probes_sent, waited, .. } => {
            println!("client probe after exit: {probes_sent} probes unanswered in {waited:?}")
        }
        other => bail!("the VIP should be silent after the primary exited, got {other:?}"),
    }
    Ok(())
}

/// Runs the binary outside any test bed; these exit before touching the network.
fn primary_cmd(args: &[&str]) -> Result<Output> {
    output(Command::new(PRIMARY).args(args).env("RUST_LOG", "off"))
}

#[test]
fn bad_flags_and_bad_config_exit_2_with_one_line_error() -> Result<()> {
    let base = ["--vip", "10.0.0.100/24", "--iface", "eth0", "--repl-listen", "10.1.0.2:7700"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--bogus"], "--bogus"),
        (vec!["--vip", "nonsense", "--iface", "eth0"], "--vip"),
        (vec!["--port", "eighty"], "--port"),
        (base.to_vec(), "--upstream"),
        ([&base[..], &["--upstream", "https://origin"]].concat(), "https"),
        ([&base[..], &["--upstream", "http://origin", "--root", "/"]].concat(), "conflict"),
        (["--vip", "10.0.0.100/24", "--iface", "eth0", "--upstream", "http://o"].to_vec(), "--repl-listen"),
        ([&base[..], &["--root", "/nonexistent-us-node"]].concat(), "--root"),
    ];
    for (args, needle) in cases {
        let out = primary_cmd(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(2), "{args:?}: want exit 2, got {}: {stderr}", out.status);
        ensure!(stderr.lines().count() == 1, "{args:?}: want one line, got {stderr:?}");
        ensure!(stderr.starts_with("primary: ") && stderr.contains(needle), "{args:?}: {stderr:?}");
        ensure!(out.stdout.is_empty(), "{args:?}: stdout {:?}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

#[test]
fn help_says_this_build_serves_unprotected() -> Result<()> {
    let out = primary_cmd(&["--help"])?;
    let help = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "--help exited {}", out.status);
    ensure!(help.contains("serves unprotected"), "{help}");
    ensure!(help.contains("refuses joining backups"), "{help}");
    ensure!(help.contains("--repl-listen") && help.contains("--upstream") && help.contains("--root"), "{help}");
    Ok(())
}
