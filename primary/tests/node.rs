//! The `primary` binary end to end on a `scripts/testbed --pair` bed: client 10.0.0.1, server 10.0.0.2
//! (primary; eth1 10.1.0.2 replication), spare 10.0.0.3 (eth1 10.1.0.3; the backup's replica,
//! `backup::replica`, runs there on a thread of this process), origin 10.2.0.10 running nginx. Real
//! kernels, real ARP, the real NFQUEUE gate, curl as the client.
//!
//! Needs root, `nginx`, `curl`, `arptables`, `iptables`, `iproute2` and `ethtool` (the test bed). The flag
//! tests need none of that. Timings are printed, never asserted.

use anyhow::{Context, Result, anyhow, bail, ensure};
use backup::replica::{self, ReplicaConfig};
use sha2::{Digest, Sha256};
use shared::auth::{LinkAuth, Psk};
use shared::link::{HandshakeError, LinkConfig, LocalIdentity, WelcomeError};
use shared::protocol::Role;
use shared::replica::ReplicaTable;
use shared::vip::{Mac, ProbeOutcome};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use understudy_tests::harness::{Proc, Testbed, is_root, output, testbed_id, wait_until};
use understudy_tests::netns::Netns;
use understudy_tests::nginx::{self, NginxOptions};
use understudy_tests::pattern;
use understudy_tests::psk;
use understudy_tests::tempdir::TempDir;

const PRIMARY: &str = env!("CARGO_BIN_EXE_primary");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const IFACE: &str = "eth0";
const REPL: &str = "10.1.0.2:7700";
/// The node name the tests give the primary; it tags the gate's iptables rules.
const NODE: &str = "primary-test";
const BIG: u64 = 16 << 20;

// ---------------------------------------------------------------- plumbing (understudy_tests::harness)

/// Key of the origin's files (`understudy_tests::pattern`).
const CONTENT: u64 = 0x6e6f_6465;

/// The `--pair` test bed `n<tag><pid in base 36>`, with this test's queries; `Drop` takes it down.
struct Bed(Testbed);

impl Deref for Bed {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.0
    }
}

impl Bed {
    fn up(tag: char) -> Result<Bed> {
        ensure!(is_root(), "the node test needs root (network namespaces, raw sockets)");
        let tb = Testbed::up_pair(&testbed_id('n', tag))?;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        Ok(Bed(tb))
    }

    /// Starts `args` in `host`, stdout and stderr to `log`.
    fn spawn(&self, name: &str, host: &str, args: &[&str], log: &Path) -> Result<Proc> {
        let mut cmd = self.command(host, args);
        // The log checks below read info-level lines.
        cmd.env("RUST_LOG", "info");
        self.spawn_command(name, cmd, log)
    }

    /// The hardware address of `host`'s eth0.
    fn mac(&self, host: &str) -> Result<Mac> {
        Ok(Mac(self.hw_addr(host, IFACE)?))
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

    /// `host`'s iptables rules tagged by a gate (`understudy:` comments), from `iptables -t mangle -S`.
    fn gate_rules(&self, host: &str) -> Result<Vec<String>> {
        let out = self.exec(host, &["iptables", "-t", "mangle", "-S"])?;
        Ok(out.lines().filter(|l| l.contains(&format!("understudy:{NODE}"))).map(str::to_owned).collect())
    }

    /// The client's TCP connections to the VIP that are still established (`ss`): a connection that
    /// received a FIN or a RST is not.
    fn client_established(&self) -> Result<usize> {
        let out = self.exec("client", &["ss", "-Htn", "state", "established", "dst", &VIP.to_string()])?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
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

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("temp path is not UTF-8")
}

fn sha256_file(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(fs::read(path).with_context(|| format!("reading {}", path.display()))?)))
}

/// nginx in the origin host on 10.2.0.10:8080, one process (`master_process off`), config and logs in
/// `dir`; ended by PID (the `Proc` drop).
fn start_nginx(tb: &Bed, dir: &TempDir, root: &Path) -> Result<Proc> {
    let d = dir.join("nginx");
    fs::create_dir_all(&d)?;
    let opts = NginxOptions { http: "keepalive_requests 100000;", ..NginxOptions::default() };
    let argv = nginx::write_config(&d, "10.2.0.10:8080", root, &opts)?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut nginx = tb.spawn("nginx", "origin", &argv, &dir.join("nginx.log"))?;
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
fn admin_get(tb: &Bed, path: &str) -> Result<String> {
    tb.exec("server", &["curl", "-sS", "--fail", &format!("http://127.0.0.1:9900{path}")])
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn primary_args<'a>(repl: &'a str, node: &'a str, iface: &'a str, psk: &'a Path) -> Vec<&'a str> {
    vec![
        PRIMARY,
        "--psk-file",
        psk.to_str().expect("temp paths are UTF-8"),
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

/// `GET /status` of the primary, parsed.
fn status(tb: &Bed) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&admin_get(tb, "/status")?)?)
}

/// Waits until `/status` says `peer` is `want`; returns the status then.
fn wait_peer(tb: &Bed, want: &str, timeout: Duration) -> Result<serde_json::Value> {
    wait_until(&format!("/status peer {want:?}"), timeout, || {
        let s = status(tb)?;
        Ok((s["peer"] == want).then_some(s))
    })
}

/// Starts the primary binary in `server` with the admin endpoint on 127.0.0.1:9900 and `extra` flags,
/// and waits until it serves.
fn start_primary(tb: &Bed, dir: &TempDir, log: &str, extra: &[&str]) -> Result<Proc> {
    let psk = psk::key_file(dir.path())?;
    let mut args = primary_args(REPL, NODE, IFACE, &psk);
    args.extend(["--admin", "127.0.0.1:9900"]);
    args.extend(extra);
    let started = Instant::now();
    let mut primary = tb.spawn("primary", "server", &args, &dir.join(log))?;
    primary.wait_for_log("serving HTTP on the VIP", Duration::from_secs(15))?;
    println!("primary: start to serving in {:?} (includes the 300 ms startup probe)", started.elapsed());
    Ok(primary)
}

/// A rate-limited download of `big.bin` through the VIP, by curl in the client host.
fn start_download(tb: &Bed, dir: &TempDir, name: &str, rate: &str) -> Result<(Proc, PathBuf)> {
    let out = dir.join(name);
    let args = ["curl", "-sS", "--fail", "--limit-rate", rate, "-o", path_str(&out)?, "http://10.0.0.100/big.bin"];
    let proc = tb.spawn(name, "client", &args, &dir.join(format!("{name}.log")))?;
    Ok((proc, out))
}

/// Waits until the download writing `out` has at least `bytes`.
fn wait_downloaded(proc: &mut Proc, out: &Path, bytes: u64) -> Result<()> {
    wait_until("the download to be under way", Duration::from_secs(10), || {
        if let Some(status) = proc.try_wait()? {
            bail!("curl exited ({status}) early: {}", proc.log_text());
        }
        Ok((fs::metadata(out).map_or(0, |m| m.len()) >= bytes).then_some(()))
    })
}

/// The backup's replica (`backup::replica::join`), on its own thread inside the spare host with a
/// current-thread runtime: while the thread is blocked outside the runtime the whole backup is frozen,
/// as a stopped process would be.
struct Backup {
    table: Arc<Mutex<ReplicaTable>>,
    unfreeze: Option<std::sync::mpsc::Sender<()>>,
    /// `true`: stop the replica cleanly; `false` (or dropped): end abruptly.
    stop: Option<tokio::sync::oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Backup {
    /// Joins the primary at [`REPL`] as `node` (at `epoch`); with `frozen`, the backup does nothing after
    /// the handshake until [`Backup::unfreeze`].
    fn join(tb: &Bed, psk: &Path, node: &str, epoch: u64, frozen: bool) -> Result<Backup> {
        let ns = tb.ns("spare");
        let auth = LinkAuth::Psk(Psk::load(psk)?);
        let identity = LocalIdentity::new("understudy", node, Role::Backup, epoch);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (unfreeze_tx, unfreeze_rx) = std::sync::mpsc::channel::<()>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<bool>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let _inside = Netns::enter(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let addr: SocketAddr = REPL.parse()?;
            let config = ReplicaConfig::new(LinkConfig { auth, ..LinkConfig::default() });
            let replica = match rt.block_on(replica::join(addr, &identity, &config)) {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok(replica.table()));
            if frozen {
                let _ = unfreeze_rx.recv();
            }
            if rt.block_on(async { stop_rx.await.unwrap_or(false) }) {
                rt.block_on(replica.stop());
            } else {
                // The runtime goes with the link's tasks unfinished: the kernel closes the socket, as for a
                // killed process.
                drop(replica);
            }
            drop(rt);
            Ok(())
        });
        let joined = ready_rx.recv_timeout(Duration::from_secs(10));
        let mut backup =
            Backup { table: Arc::default(), unfreeze: Some(unfreeze_tx), stop: Some(stop_tx), thread: Some(thread) };
        match joined {
            Ok(Ok(table)) => {
                backup.table = table;
                Ok(backup)
            }
            Ok(Err(e)) => {
                backup.finish(false)?;
                Err(anyhow!(e).context("the backup could not join"))
            }
            Err(_) => {
                let ended = backup.finish(false);
                bail!("the backup did not join in time ({ended:?})")
            }
        }
    }

    fn unfreeze(&mut self) {
        drop(self.unfreeze.take());
    }

    /// Whether the replica holds a connection from the client that it follows (not unprotected).
    fn follows_client(&self) -> bool {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.conns().any(|c| *c.key().client.ip() == CLIENT && c.tracked().is_some())
    }

    /// Ends the backup: `clean` stops the replica (its link closes in order), otherwise it dies abruptly.
    fn finish(&mut self, clean: bool) -> Result<()> {
        self.unfreeze();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(clean);
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("the backup thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        if let Err(e) = self.finish(false) {
            eprintln!("backup: {e:#}");
        }
    }
}

/// A second ARP responder for the VIP, in `host` (another node answering for the address).
struct Impostor {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Impostor {
    fn start(tb: &Bed, host: &str) -> Result<Impostor> {
        let ns = tb.ns(host);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let _inside = Netns::enter(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let responder = shared::vip::Responder::spawn(IFACE, VIP)?;
                let _ = ready_tx.send(());
                let _ = stop_rx.await;
                drop(responder);
                Ok(())
            })
        });
        let mut impostor = Impostor { stop: Some(stop_tx), thread: Some(thread) };
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let ended = impostor.finish();
            bail!("the second responder did not start: {ended:?}");
        }
        Ok(impostor)
    }

    fn finish(&mut self) -> Result<()> {
        drop(self.stop.take());
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("the responder thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("second responder: {e:#}");
        }
    }
}

// ---------------------------------------------------------------- the tests

#[test]
fn primary_serves_vip_through_the_gate_refuses_second_primary_and_releases_vip_and_gate_on_sigterm() -> Result<()> {
    let tb = Bed::up('a')?;
    let dir = TempDir::new("e2e")?;
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    let big_sha = pattern::write_file(&www.join("big.bin"), CONTENT, BIG)?;
    fs::write(www.join("small.txt"), b"small file from the origin\n")?;
    let _nginx = start_nginx(&tb, &dir, &www)?;
    let server_mac = tb.mac("server")?;

    // The primary claims the VIP and serves, every VIP segment through the gate.
    let mut primary = start_primary(&tb, &dir, "primary.log", &[])?;
    ensure!(tb.has_vip("server")?, "the VIP is not on the server's eth0");
    ensure!(tb.vip_arp_rules("server")?.len() == 1, "want one arptables rule: {:?}", tb.vip_arp_rules("server")?);
    let rules = tb.gate_rules("server")?;
    ensure!(rules.len() == 5, "want the gate's 5 rules (inbound; SYN-ACK, FIN, RST, orphans out): {rules:#?}");
    ensure!(rules[..4].iter().all(|r| r.contains("--queue-num 7701")), "the gate uses queues.inbound: {rules:#?}");
    ensure!(
        rules[4].contains("! --socket-exists") && rules[4].contains("--queue-num 7702"),
        "orphans go to queues.outbound: {rules:#?}"
    );

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

    // A planned switchover needs a backup: refused with the reason, and the primary serves on.
    let answer = tb.exec(
        "server",
        &["curl", "-sS", "-X", "POST", "-w", "\n%{http_code}", "http://127.0.0.1:9900/admin/switchover"],
    )?;
    ensure!(answer.ends_with("\n409") && answer.contains("no backup is connected"), "switchover answer: {answer}");
    ensure!(crate::status(&tb)?["role"] == "primary", "the primary stopped serving after a refused switchover");

    // A second primary on the spare finds the VIP answered, says by whom, and changes nothing.
    let t = Instant::now();
    let mut second = tb.spawn(
        "second primary",
        "spare",
        &primary_args("10.1.0.3:7700", "spare-test", IFACE, &psk::key_file(dir.path())?),
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
        &primary_args("10.1.0.3:7700", "spare-test", "eth7", &psk::key_file(dir.path())?),
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
    // The gate's reader task is spawned outside its caller's span (primary/src/gate/mod.rs), so its
    // "receiver dropped" line, logged when a segment arrives after the sender stopped, has no fields.
    let bare: Vec<&str> = log
        .lines()
        .filter(|l| !(l.contains("role=\"primary\"") && l.contains("epoch=1")))
        .filter(|l| !l.contains("primary::gate: gate reader: receiver dropped"))
        .collect();
    ensure!(bare.is_empty(), "log lines without the role and epoch fields: {bare:#?}");
    let (stopped, removed) = (log.find("HTTP server stopped"), log.find("VIP removed"));
    ensure!(stopped.is_some() && removed > stopped, "the VIP must be released after the drain:\n{log}");
    ensure!(!tb.has_vip("server")?, "the VIP is still on the server");
    ensure!(tb.vip_arp_rules("server")?.is_empty(), "arptables rule left: {:?}", tb.vip_arp_rules("server")?);
    ensure!(tb.gate_rules("server")?.is_empty(), "gate rules left: {:?}", tb.gate_rules("server")?);
    ensure!(log.contains("gate stopped"), "{log}");
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
        ([&base[..], &["--upstream", "http://o"]].concat(), "--psk-file"),
        ([&base[..], &["--upstream", "http://o", "--psk-file", "/nonexistent-us-psk"]].concat(), "/nonexistent-us-psk"),
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
fn help_says_what_the_primary_does_with_a_backup() -> Result<()> {
    let out = primary_cmd(&["--help"])?;
    let help = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "--help exited {}", out.status);
    ensure!(help.contains("serves unprotected") && help.contains("steps down"), "{help}");
    ensure!(help.contains("One backup at a time"), "{help}");
    ensure!(help.contains("--repl-listen") && help.contains("--upstream") && help.contains("--root"), "{help}");
    ensure!(help.contains("primary switchover"), "--help does not name the switchover command: {help}");
    let out = primary_cmd(&["switchover", "--help"])?;
    let help = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && help.contains("Planned switchover") && help.contains("--admin"), "{help}");
    // Nothing listens on port 1: a clear error and exit 1, never a hang.
    let out = primary_cmd(&["switchover", "--admin", "127.0.0.1:1"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1) && stderr.contains("cannot reach the admin endpoint"), "{stderr}");
    let out = primary_cmd(&["switchover", "--admin", "nowhere"])?;
    ensure!(out.status.code() == Some(2), "a bad --admin exits 2: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The origin's files for the replication tests; returns big.bin's sha256.
fn origin_files(dir: &TempDir) -> Result<(PathBuf, String)> {
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    let big_sha = pattern::write_file(&www.join("big.bin"), CONTENT, BIG)?;
    fs::write(www.join("small.txt"), b"small file from the origin\n")?;
    Ok((www, big_sha))
}

/// A backup joins the running binary: `/status` goes none → syncing (the backup is frozen before it
/// applied its snapshot) → connected. A download through the VIP is replicated (the backup's table
/// follows the client's connection) and completes. Then, under load, the backup dies: every transfer
/// completes intact, `/status` says peer none and the metrics say unprotected.
#[test]
fn backup_joins_running_primary_replicates_a_download_and_its_loss_under_load_costs_no_client_error() -> Result<()> {
    let tb = Bed::up('b')?;
    let dir = TempDir::new("join")?;
    let (www, big_sha) = origin_files(&dir)?;
    let _nginx = start_nginx(&tb, &dir, &www)?;
    // Slower heartbeats give a lease of about 520 ms, so a backup frozen for 250 ms is not given up.
    let mut primary = start_primary(&tb, &dir, "primary.log", &["--heartbeat-interval", "100ms"])?;

    let s = status(&tb)?;
    ensure!(s["peer"] == "none" && s["protected"] == false, "alone: {s}");
    println!("/status before the join: peer {}", s["peer"]);

    // The backup joins, and stays frozen before applying its snapshot.
    let t = Instant::now();
    // A node with another key is refused, and the primary logs why and from where.
    let other = psk::write_key(&dir.join("other-psk"))?;
    match Backup::join(&tb, &other, "backup-wrong-key", 0, false) {
        Err(e) => match e.downcast_ref::<replica::JoinError>() {
            Some(replica::JoinError::Handshake { source: source @ HandshakeError::WrongKey { .. }, .. }) => {
                println!("joiner with another key refused: {source}")
            }
            _ => bail!("the joiner with another key failed otherwise: {e:#}"),
        },
        Ok(_) => bail!("a joiner with another key was accepted"),
    }
    primary.wait_for_log("wrong key", Duration::from_secs(5))?;
    let line = primary.log_text().lines().find(|l| l.contains("wrong key")).unwrap_or_default().to_owned();
    ensure!(line.contains("10.1.0.3") && line.contains("backup-wrong-key"), "the primary's log line: {line}");
    ensure!(status(&tb)?["peer"] == "none", "a refused joiner is not a peer");

    let mut backup = Backup::join(&tb, &psk::key_file(dir.path())?, "backup-test", 0, true)?;
    let syncing = wait_peer(&tb, "syncing", Duration::from_secs(5))?;
    println!("/status after the handshake: peer {} ({:?} after the join began)", syncing["peer"], t.elapsed());
    ensure!(syncing["peer_node"] == "backup-test" && syncing["protected"] == false, "{syncing}");
    std::thread::sleep(Duration::from_millis(250));
    ensure!(status(&tb)?["peer"] == "syncing", "a frozen backup has not acknowledged its snapshot");
    let t = Instant::now();
    backup.unfreeze();
    let connected = wait_peer(&tb, "connected", Duration::from_secs(5))?;
    println!("/status: peer {} {:?} after the backup resumed", connected["peer"], t.elapsed());
    ensure!(connected["protected"] == true, "{connected}");
    primary.wait_for_log("backup joined", Duration::from_secs(5))?;

    // A download through the VIP while protected: the backup follows the connection.
    let t = Instant::now();
    let (mut download, out) = start_download(&tb, &dir, "protected.bin", "8M")?;
    wait_until("the backup's replica to follow the client's connection", Duration::from_secs(10), || {
        Ok(backup.follows_client().then_some(()))
    })?;
    println!("backup: follows the client's connection {:?} after curl started", t.elapsed());
    let during = status(&tb)?;
    ensure!(during["connections"]["protected"] == 1, "the download is counted protected: {during}");
    let code = download.wait(Duration::from_secs(30))?;
    println!("client: {BIG} bytes through the VIP with the backup joined in {:?}", t.elapsed());
    ensure!(code.success(), "the protected download failed ({code}): {}", download.log_text());
    ensure!(sha256_file(&out)? == big_sha, "the protected download differs from the origin's");
    let metrics = admin_get(&tb, "/metrics")?;
    ensure!(metric(&metrics, "understudy_protected") == Some(1.0), "{metrics}");
    ensure!(metric(&metrics, "understudy_replication_records_acked_total") > Some(100.0), "{metrics}");

    // Load: three downloads of about 4 s each and a stream of small keep-alive requests.
    let mut loads = Vec::new();
    for i in 0..3 {
        loads.push(start_download(&tb, &dir, &format!("load-{i}.bin"), "4M")?);
    }
    let urls: Vec<String> = (0..400).map(|_| "http://10.0.0.100/small.txt".to_string()).collect();
    let mut small: Vec<&str> = vec!["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{http_code}\n"];
    for url in &urls {
        small.extend(["-o", "/dev/null", url.as_str()]);
    }
    let mut smalls = tb.spawn("small requests", "client", &small, &dir.join("small.log"))?;
    for (proc, out) in &mut loads {
        wait_downloaded(proc, out, 1 << 20)?;
    }
    let before = admin_get(&tb, "/metrics")?;
    let protected_before = metric(&before, "understudy_connections{state=\"protected\"}");
    ensure!(protected_before >= Some(3.0), "the transfers under way are protected: {before}");

    // The backup dies (its socket closed by the kernel, as for a killed process).
    let killed = Instant::now();
    backup.finish(false)?;
    let alone = wait_peer(&tb, "none", Duration::from_secs(5))?;
    println!("backup killed under load: /status peer none after {:?}", killed.elapsed());
    ensure!(alone["protected"] == false && alone["peer_node"].is_null(), "{alone}");
    let metrics = admin_get(&tb, "/metrics")?;
    let unprotected = metric(&metrics, "understudy_connections{state=\"unprotected\"}");
    println!(
        "metrics after the loss: protected {}, unprotected connections {:?} (protected before: {:?})",
        metric(&metrics, "understudy_protected").unwrap_or(-1.0),
        unprotected,
        protected_before
    );
    ensure!(metric(&metrics, "understudy_protected") == Some(0.0), "{metrics}");
    ensure!(metric(&metrics, "understudy_peer{state=\"none\"}") == Some(1.0), "{metrics}");
    ensure!(metric(&metrics, "understudy_connections{state=\"protected\"}") == Some(0.0), "{metrics}");
    ensure!(unprotected >= Some(3.0), "the transfers still running are unprotected now: {metrics}");

    // Zero client errors.
    for (i, (proc, out)) in loads.iter_mut().enumerate() {
        let code = proc.wait(Duration::from_secs(30))?;
        ensure!(code.success(), "download {i} failed across the backup's loss ({code}): {}", proc.log_text());
        ensure!(sha256_file(out)? == big_sha, "download {i} differs from the origin's");
    }
    let code = smalls.wait(Duration::from_secs(30))?;
    let codes = smalls.log_text();
    ensure!(code.success(), "small requests failed ({code}): {codes}");
    ensure!(codes.lines().filter(|l| *l == "200").count() == urls.len(), "every small request answered 200");
    println!("client: 3 downloads and {} small requests across the backup's loss, all intact", urls.len());
    let log = primary.log_text();
    ensure!(log.contains("backup given up: nobody else answers for the VIP; serving unprotected"), "{log}");

    primary.signal(libc::SIGTERM)?;
    let code = primary.wait(Duration::from_secs(20))?;
    ensure!(code.code() == Some(0), "want exit 0 after SIGTERM, got {code}:\n{}", primary.log_text());
    ensure!(tb.gate_rules("server")?.is_empty(), "gate rules left: {:?}", tb.gate_rules("server")?);
    Ok(())
}

/// The backup is lost while another node answers for the VIP (it took the VIP over): the primary's
/// probe is answered, so it steps down — exit 1 naming the other node, the VIP and its ARP answers gone,
/// nothing sent to the client (its connection stays established: no FIN, no RST), the gate's rules left
/// in place. The next start removes them; a joiner from a later epoch makes that one step down too.
#[test]
fn primary_steps_down_when_another_node_answers_for_the_vip_after_its_backup_is_lost() -> Result<()> {
    let tb = Bed::up('c')?;
    let dir = TempDir::new("stepdown")?;
    let (www, _) = origin_files(&dir)?;
    let _nginx = start_nginx(&tb, &dir, &www)?;
    let spare_mac = tb.mac("spare")?;
    let mut primary = start_primary(&tb, &dir, "primary.log", &[])?;
    let mut backup = Backup::join(&tb, &psk::key_file(dir.path())?, "backup-test", 0, false)?;
    wait_peer(&tb, "connected", Duration::from_secs(5))?;

    // A download in progress, then another node answers for the VIP and the backup's link ends.
    let (mut download, out) = start_download(&tb, &dir, "cut.bin", "2M")?;
    wait_downloaded(&mut download, &out, 512 << 10)?;
    ensure!(tb.client_established()? == 1, "the download's connection is established");
    let _impostor = Impostor::start(&tb, "spare")?;
    let lost = Instant::now();
    backup.finish(true)?;
    let code = primary.wait(Duration::from_secs(10))?;
    println!("primary: exited {:?} after its backup's link ended", lost.elapsed());
    let log = primary.log_text();
    let last = log.lines().last().unwrap_or_default();
    ensure!(code.code() == Some(1), "want exit 1 after stepping down, got {code}:\n{log}");
    ensure!(
        last.starts_with("primary: stepped down") && last.contains(&spare_mac.to_string()),
        "the error should say it stepped down for {spare_mac}: {last:?}"
    );
    ensure!(!tb.has_vip("server")?, "the VIP is still on the server");
    let rules = tb.gate_rules("server")?;
    ensure!(rules.len() == 5, "the gate's fail-closed rules stay after a step-down: {rules:#?}");

    // Nothing reached the client: the connection neither closed nor reset, the transfer is stuck.
    std::thread::sleep(Duration::from_millis(300));
    ensure!(download.try_wait()?.is_none(), "curl ended after the step-down: {}", download.log_text());
    ensure!(tb.client_established()? == 1, "the client's connection was closed or reset by the VIP");
    drop(download);
    drop(_impostor);
    match tb.probe_vip("client")? {
        ProbeOutcome::Unanswered { .. } => {}
        other => bail!("the VIP should be silent once the other node stopped answering, got {other:?}"),
    }

    // The next start removes the rules the step-down left, and serves.
    let mut again = start_primary(&tb, &dir, "again.log", &[])?;
    let log = again.log_text();
    ensure!(log.contains("removed iptables rules left by an earlier run"), "{log}");
    let rules = tb.gate_rules("server")?;
    ensure!(rules.len() == 5, "one set of gate rules after the restart: {rules:#?}");
    let body = tb.exec("client", &["curl", "-sS", "--fail", "http://10.0.0.100/small.txt"])?;
    ensure!(body == "small file from the origin\n", "{body:?}");

    // A node that has seen a later epoch tries to join: refused, and this primary steps down at once.
    let t = Instant::now();
    match Backup::join(&tb, &psk::key_file(dir.path())?, "backup-later", 5, false) {
        Err(e) => match e.downcast_ref::<replica::JoinError>() {
            Some(replica::JoinError::Handshake {
                source: HandshakeError::Welcome(WelcomeError::Refused { reason }),
                ..
            }) => println!("joiner at epoch 5 refused: {reason}"),
            _ => bail!("the later-epoch joiner failed otherwise: {e:#}"),
        },
        Ok(_) => bail!("a joiner from a later epoch was accepted"),
    }
    let code = again.wait(Duration::from_secs(10))?;
    println!("restarted primary: exited {:?} after the later-epoch join", t.elapsed());
    let log = again.log_text();
    let last = log.lines().last().unwrap_or_default();
    ensure!(code.code() == Some(1), "want exit 1, got {code}:\n{log}");
    ensure!(last.contains("stepped down") && last.contains("epoch 5"), "{last:?}");
    ensure!(!tb.has_vip("server")?, "the VIP is still on the server");

    // Serving alone, a primary that sees another node announce the VIP (a backup that took over while
    // this one was stalled past its fence) gives way at once: two nodes must never serve the VIP.
    let mut third = start_primary(&tb, &dir, "third.log", &[])?;
    let t = Instant::now();
    let ns = tb.ns("spare");
    std::thread::spawn(move || -> Result<()> {
        let _inside = Netns::enter(&ns)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(shared::vip::announce(IFACE, VIP, 1, Duration::from_millis(10)))?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow!("the announcing thread panicked"))??;
    let code = third.wait(Duration::from_secs(10))?;
    println!("primary alone: stepped down {:?} after another node announced the VIP", t.elapsed());
    let log = third.log_text();
    let last = log.lines().last().unwrap_or_default();
    ensure!(code.code() == Some(1), "want exit 1 after an announcement from another node, got {code}:\n{log}");
    ensure!(last.contains("stepped down") && last.contains(&spare_mac.to_string()), "{last:?}");
    ensure!(!tb.has_vip("server")?, "the VIP is still on the server");
    Ok(())
}

/// The admin endpoint on an address other hosts reach: every route but `/healthz` needs the bearer token
/// from `--admin-token-file`, and `primary switchover --token-file` sends it.
#[test]
fn an_admin_endpoint_on_the_network_needs_its_token_and_the_switchover_command_sends_it() -> Result<()> {
    let tb = Bed::up('d')?;
    let dir = TempDir::new("token")?;
    let token_file = dir.join("admin.token");
    fs::write(&token_file, "Zm9vYmFy-token\n")?;
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let token_path = path_str(&token_file)?;
    let psk = psk::key_file(dir.path())?;
    let mut args = primary_args(REPL, NODE, IFACE, &psk);
    args.extend(["--admin", "10.0.0.2:9901", "--admin-token-file", token_path]);
    let mut primary = tb.spawn("primary", "server", &args, &dir.join("primary.log"))?;
    primary.wait_for_log("serving HTTP on the VIP", Duration::from_secs(15))?;

    // From the client host, as another machine on the network would.
    let get = |path: &str, auth: Option<&str>| -> Result<String> {
        let url = format!("http://10.0.0.2:9901{path}");
        let header = auth.map(|t| format!("Authorization: Bearer {t}"));
        let mut args = vec!["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", &url];
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        tb.exec("client", &args)
    };
    assert_eq!(get("/status", None)?, "401", "no token");
    assert_eq!(get("/status", Some("Zm9vYmFy-wrong"))?, "401", "a wrong token");
    assert_eq!(get("/metrics", None)?, "401", "no token for the metrics");
    assert_eq!(get("/status", Some("Zm9vYmFy-token"))?, "200", "the token");
    assert_eq!(get("/healthz", None)?, "200", "health needs no token");

    // The switchover command: refused for its missing token, then let through (and refused for what it is:
    // there is no backup to hand over to).
    let switchover = |extra: &[&str]| -> Result<Output> {
        let mut a = vec![PRIMARY, "switchover", "--admin", "10.0.0.2:9901"];
        a.extend(extra);
        output(&mut tb.command("client", &a))
    };
    let without = switchover(&[])?;
    let text = String::from_utf8_lossy(&without.stdout).to_string() + &String::from_utf8_lossy(&without.stderr);
    ensure!(without.status.code() == Some(1) && text.contains("bearer token"), "without the token: {text}");
    let with = switchover(&["--token-file", token_path])?;
    let text = String::from_utf8_lossy(&with.stdout).to_string() + &String::from_utf8_lossy(&with.stderr);
    ensure!(with.status.code() == Some(1), "no backup to hand over to: {text}");
    ensure!(!text.contains("bearer token") && text.contains("backup"), "the token was accepted: {text}");

    // A token file other users may read is refused at start, with the reason.
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let refused = primary_cmd(&[&args[1..], &["--admin-token-file", token_path]].concat())?;
    let err = String::from_utf8_lossy(&refused.stderr);
    ensure!(refused.status.code() == Some(2) && err.contains("--admin-token-file") && err.contains("644"), "{err}");
    primary.signal(libc::SIGTERM)?;
    let status = primary.wait(Duration::from_secs(30))?;
    ensure!(status.code() == Some(0), "want exit 0 after SIGTERM, got {status}:\n{}", primary.log_text());
    Ok(())
}
