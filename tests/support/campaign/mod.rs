//! The fault campaign (issue 6, item 2; `scripts/campaign`, `us-campaign`, `tests/campaign.rs`): one test
//! bed with the pair and `us-origin`, and a list of injections, each a fault at a moment under a mixed
//! workload ([`clients`]). After each injection the pair is made protected again (the dead node restarted as
//! the spare) and the injection is judged ([`plan::Outcome`]): every client finished with every byte
//! checked, no reset from the VIP at the client, the origin's ledger shows every POST executed once with the
//! body sent, and the VIP changed hands on ARP exactly as often as the injection handed it over.

pub mod clients;
pub mod plan;

use crate::harness::{Capture, output};
use crate::pair::{Origin, Pair, PairOptions, VIP};
use anyhow::{Context, Result, ensure};
use clients::{Client, Control, Idle, Report};
use plan::{Fault, Injection, Moment, Outcome, arp_changes, ledger_problems};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the pair may take to be protected again after an injection.
const PROTECT_WITHIN: Duration = Duration::from_secs(60);
const DOWNLOAD: u64 = 6_000_000;
const DOWNLOAD_RATE: u64 = 3_000_000;
const UPLOAD: usize = 3_000_000;
const UPLOAD_RATE: u64 = 1_500_000;
/// How long the origin holds the slow requests.
const SLOW_MS: u64 = 1500;

/// The test bed and what the campaign needs around it.
pub struct Campaign {
    pub pair: Pair,
    ns: String,
    macs: HashMap<&'static str, String>,
    faults_script: PathBuf,
    corrupt_bin: Option<PathBuf>,
    /// Injections made so far, for unique request ids.
    count: usize,
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Every claim on the VIP in an ARP capture, in time order: (time, MAC) of each reply "VIP is-at MAC" and
/// of each gratuitous request "who-has VIP tell VIP".
pub fn vip_claims(pcap: &Path) -> Result<Vec<(f64, String)>> {
    let out = output(Command::new("tcpdump").args(["-nn", "-e", "-tt", "-r"]).arg(pcap).arg("arp"))?;
    ensure!(out.status.success(), "tcpdump -r {}: {}", pcap.display(), String::from_utf8_lossy(&out.stderr));
    let mut claims = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut words = line.split_whitespace();
        let (Some(at), Some(src)) = (words.next(), words.next()) else { continue };
        let Ok(at) = at.parse::<f64>() else { continue };
        let reply = format!("Reply {VIP} is-at ");
        let mac = if let Some(i) = line.find(&reply) {
            line[i + reply.len()..].split([',', ' ']).next().unwrap_or("").to_string()
        } else if line.contains(&format!("tell {VIP},")) {
            src.to_string()
        } else {
            continue;
        };
        claims.push((at, mac.to_ascii_lowercase()));
    }
    Ok(claims)
}

impl Campaign {
    /// Builds test bed `id` with the pair (`us-origin` as the origin) and waits until it is protected.
    /// `corrupt_bin`: the `us-corrupt` to use (else `scripts/faults` finds it next to the nodes).
    pub fn up(id: &str, corrupt_bin: Option<PathBuf>) -> Result<Campaign> {
        let pair = Pair::up(id, &PairOptions { node_flags: Vec::new(), origin: Origin::UsOrigin }, |_| Ok(()))?;
        let mut macs = HashMap::new();
        for host in ["server", "spare"] {
            macs.insert(host, mac_text(pair.tb.hw_addr(host, "eth0")?));
        }
        Ok(Campaign {
            ns: pair.tb.ns("client"),
            pair,
            macs,
            faults_script: crate::harness::workspace_root().join("scripts/faults"),
            corrupt_bin,
            count: 0,
        })
    }

    /// `scripts/faults ARGS` on this bed; fails with its output unless it succeeded.
    fn faults(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.faults_script);
        cmd.arg(args[0]).arg(&self.pair.tb.id).args(&args[1..]);
        if let Some(bin) = &self.corrupt_bin {
            cmd.env("US_CORRUPT", bin);
        }
        let out = output(&mut cmd)?;
        ensure!(
            out.status.success(),
            "scripts/faults {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes one injection and judges it. An `Err` means the campaign cannot go on (the bed is broken);
    /// a fault the pair did not survive is an `Ok` outcome with its findings.
    pub fn inject(&mut self, inj: &Injection) -> Result<Outcome> {
        self.count += 1;
        let tag = format!("i{}", self.count);
        let mut rng = fastrand::Rng::with_seed(inj.seed);
        let mut out = Outcome::default();
        let pcap = self.pair.dir.0.join(format!("{tag}.pcap"));
        // Headers of the VIP's traffic and ARP: resets are counted and, when there are any, explained.
        let filter = "arp or tcp port 80".to_string();
        let capture = Capture::start(&self.pair.tb, "client", "eth0", &filter, 128, &pcap)?;
        let origin_before = self.pair.origin_executions()?.len();
        // The claim before the fault, so that the capture shows every change of hands.
        let arp_before = self.arping()?;
        let primary_before = self.macs[self.pair.primary_host].clone();
        if arp_before.as_ref() != Some(&primary_before) {
            out.problems.push(format!(
                "before the injection the VIP is answered by {arp_before:?}, not the primary's {primary_before}"
            ));
        }

        // The mixed workload, with what the moment needs.
        let ctl = Control::default();
        let ns = self.ns.clone();
        let mut clients: Vec<Client> = Vec::new();
        let idle = Idle::open(&ns, &tag, 4)?;
        for c in 0..3 {
            clients.push(clients::get_loop(&ns, &tag, c, &ctl));
        }
        clients.push(clients::burst_loop(&ns, &tag, &ctl));
        clients.push(clients::post_loop(&ns, &tag, &ctl));
        let (dl, ul) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        if inj.moment != Moment::Idle {
            clients.push(clients::download(&ns, &tag, DOWNLOAD, DOWNLOAD_RATE, dl.clone()));
            clients.push(clients::upload(&ns, &tag, UPLOAD, UPLOAD_RATE, ul.clone()));
        }
        let churn_ctl = Control::default();
        // Whatever way this returns, the clients stop (the ones still looping would run on otherwise).
        struct StopOnDrop(Vec<Control>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                for c in &self.0 {
                    c.stop.store(true, Ordering::Relaxed);
                }
            }
        }
        let _stop = StopOnDrop(vec![ctl.clone(), churn_ctl.clone()]);
        if inj.moment == Moment::Handshake {
            clients.push(clients::churn(&ns, &tag, &churn_ctl));
        }
        let wait = |what: &str, ok: &dyn Fn() -> bool| -> Result<()> {
            crate::harness::wait_until(what, Duration::from_secs(30), || Ok(ok().then_some(())))
        };
        let progress = |ctl: &Control, more: u64| -> Result<()> {
            let target = ctl.done.load(Ordering::Relaxed) + more;
            wait("the workload to make progress", &|| ctl.done.load(Ordering::Relaxed) >= target)
        };
        progress(&ctl, 20)?;

        // The moment.
        match inj.moment {
            Moment::Handshake => progress(&churn_ctl, 3 + rng.u64(..10))?,
            Moment::Upload => {
                let at = UPLOAD as u64 * rng.u64(20..70) / 100;
                wait("the upload to reach its moment", &|| ul.load(Ordering::Relaxed) >= at)?
            }
            Moment::MidResponse => {
                let at = DOWNLOAD * rng.u64(20..70) / 100;
                wait("the download to reach its moment", &|| dl.load(Ordering::Relaxed) >= at)?
            }
            Moment::SlowOrigin => {
                clients.extend(clients::slow_requests(&ns, &tag, SLOW_MS));
                std::thread::sleep(Duration::from_millis(200 + rng.u64(..800)));
            }
            Moment::Idle => std::thread::sleep(Duration::from_millis(300 + rng.u64(..500))),
            Moment::Join => {
                self.pair.kill_backup()?;
                let host = self.pair.primary_host;
                self.pair.wait_status(host, "the primary to give its backup up", Duration::from_secs(20), |s| {
                    s["peer"] == "none"
                })?;
                self.pair.start_spare()?;
                std::thread::sleep(Duration::from_millis(rng.u64(..200)));
            }
            Moment::Takeover => {
                self.pair.kill_primary()?;
                std::thread::sleep(Duration::from_millis(rng.u64(..60)));
            }
        }

        // The fault, and the pair made whole again.
        let epoch_before = self.epoch();
        let failure = self.fault(inj, &mut rng, &mut out.notes).err();
        if let Some(e) = &failure {
            out.problems.push(format!("{e:#}"));
        }
        // Whatever the fault's own undoing did (or skipped, on an error), no fault outlives its injection: a
        // corruption left running once spoiled every injection after it.
        if let Err(e) = self.faults(&["clear"]) {
            out.problems.push(format!("clearing the faults: {e:#}"));
        }
        if let Err(e) = self.restore(inj) {
            out.problems.push(format!("the pair was not protected again: {e:#}"));
            self.reconcile().context("the test bed could not be made protected again")?;
        }
        if let Ok(s) = self.pair.status(self.pair.primary_host)
            && s["epoch"].as_u64().unwrap_or(0) > epoch_before
            && let Some(f) = s["failovers"].as_array().and_then(|f| f.last())
        {
            out.notes.push(format!(
                "{}: total {} ms, {} connections restored",
                f["reason"].as_str().unwrap_or("takeover"),
                f["total_ms"],
                f["connections_restored"]
            ));
        }
        progress(&ctl, 20).unwrap_or_else(|e| out.problems.push(format!("after the injection: {e:#}")));

        // The clients finish; the idle connections make one more request each.
        ctl.stop.store(true, Ordering::Relaxed);
        churn_ctl.stop.store(true, Ordering::Relaxed);
        let mut reports: Vec<Report> = clients.into_iter().map(Client::join).collect();
        reports.push(idle.finish());
        let arp_from = self.arping()?;
        capture.stop()?;

        for r in &reports {
            out.requests += r.requests;
            out.max_stall = out.max_stall.max(r.stall);
            if let Some(e) = &r.error {
                out.client_errors.push(format!("{}: {e}", r.name));
            }
        }
        // With link-level headers: the MAC says which host sent a reset.
        let lines = crate::harness::run(
            Command::new("tcpdump")
                .args(["-nn", "-e", "-tt", "-r"])
                .arg(&pcap)
                .arg(format!("src host {VIP} and tcp[tcpflags] & tcp-rst != 0")),
        )?;
        let resets = lines.lines().count();
        out.resets = resets;
        if resets > 0 {
            // The history of each reset connection, from the capture.
            let mut history = String::new();
            // `… ethertype IPv4 (0x0800), length 54: 10.0.0.100.80 > 10.0.0.1.55796: Flags [R], …`
            let client_port = |l: &str| -> Option<String> {
                let ip = &l[l.find("length ")?..];
                let ip = &ip[ip.find(": ")? + 2..];
                Some(ip.split(" > ").nth(1)?.split(':').next()?.rsplit('.').next()?.to_string())
            };
            let mut ports: Vec<String> = lines.lines().filter_map(client_port).collect();
            ports.dedup();
            for port in ports {
                let conn = crate::harness::run(
                    Command::new("tcpdump")
                        .args(["-nn", "-e", "-tt", "-r"])
                        .arg(&pcap)
                        .arg(format!("tcp port {port} and host {VIP}")),
                )?;
                let all: Vec<&str> = conn.lines().collect();
                history
                    .push_str(&format!("connection from client port {port} ({} packets, the last 25):\n", all.len()));
                for l in &all[all.len().saturating_sub(25)..] {
                    history.push_str(l);
                    history.push('\n');
                }
            }
            out.problems.push(format!(
                "{resets} resets from the VIP at the client (server {}, spare {}):\n{lines}{history}",
                self.macs["server"], self.macs["spare"]
            ));
        }
        let claims = vip_claims(&pcap)?;
        let changes = arp_changes(&claims);
        (out.arp_claims, out.arp_changes) = (claims.len(), changes);
        // Claimed by the primary before and after, the VIP changes hands exactly once per handover: more is
        // two nodes answering (or an unplanned takeover), fewer a handover the clients were not told of.
        if changes != inj.handovers() {
            out.problems.push(format!(
                "the VIP changed hands {changes} times on ARP, the injection handed it over {} times: {claims:?}",
                inj.handovers()
            ));
        }
        let primary_mac = &self.macs[self.pair.primary_host];
        match arp_from {
            Some(mac) if &mac == primary_mac => {}
            other => out
                .problems
                .push(format!("after the injection the VIP is answered by {other:?}, not the primary's {primary_mac}")),
        }
        // The ledger: this injection's lines of the origin.
        let lines: Vec<Value> = self.pair.origin_executions()?.into_iter().skip(origin_before).collect();
        let posts: Vec<_> = reports.iter().flat_map(|r| r.posts.iter().cloned()).collect();
        // A POST the client never saw answered may or may not have reached the origin: only the answered
        // ones (all but a failed client's last) must be there once.
        let answered: Vec<_> = reports
            .iter()
            .flat_map(|r| {
                let n = r.posts.len() - usize::from(r.error.is_some() && !r.posts.is_empty());
                r.posts[..n].iter().cloned()
            })
            .collect();
        out.problems.extend(ledger_problems(&lines, &answered));
        let keys: std::collections::HashSet<&str> = posts.iter().map(|p| p.0.as_str()).collect();
        for l in &lines {
            if l["method"] == "POST" && l["outcome"] == "executed" {
                let k = l["key"].as_str().unwrap_or("");
                if !keys.contains(k) {
                    out.problems.push(format!("the origin executed a POST no client sent: {l}"));
                }
            }
        }
        let mut gets: HashMap<&str, usize> = HashMap::new();
        for l in &lines {
            if l["method"] == "GET" {
                *gets.entry(l["target"].as_str().unwrap_or("")).or_default() += 1;
            }
        }
        out.refetches = gets.values().filter(|&&n| n > 1).count();
        Ok(out)
    }

    /// Puts the injection's fault in place and, where it is a passing one, takes it away again.
    fn fault(&mut self, inj: &Injection, rng: &mut fastrand::Rng, notes: &mut Vec<String>) -> Result<()> {
        match inj.fault {
            Fault::Partition | Fault::LossClient | Fault::LossRepl | Fault::Corrupt => {
                return self.net_fault(inj, rng, notes);
            }
            _ => {}
        }
        let pair = &mut self.pair;
        match inj.fault {
            Fault::KillPrimary => {
                pair.kill_primary()?;
                pair.wait_taken_over(Duration::from_secs(30))?;
                pair.promoted()?;
            }
            Fault::StopPrimary => {
                let frozen = pair.primary.as_ref().context("no primary")?;
                frozen.signal(libc::SIGSTOP)?;
                let taken = pair.wait_taken_over(Duration::from_secs(30));
                frozen.signal(libc::SIGCONT)?;
                taken?;
                // Resumed, it must step down and exit by itself.
                let old = pair.primary.as_mut().context("no primary")?;
                let status = old.wait(Duration::from_secs(20)).context("the resumed primary did not step down")?;
                ensure!(!status.success(), "the resumed primary exited with {status}, not a step-down");
                pair.promoted()?;
            }
            Fault::PowerCut => {
                pair.power_cut_primary()?;
                let taken = pair.wait_taken_over(Duration::from_secs(30));
                // The host's power took its process too; it comes back with its links up, empty.
                pair.kill_primary()?;
                let host = pair.primary_host;
                pair.tb.exec(host, &["sh", "-c", "ip link set eth0 up; ip link set eth1 up; ip link set eth2 up"])?;
                taken?;
                pair.promoted()?;
            }
            Fault::KillBackup => {
                pair.kill_backup()?;
                let host = pair.primary_host;
                pair.wait_status(host, "the primary to give its backup up", Duration::from_secs(20), |s| {
                    s["peer"] == "none"
                })?;
            }
            Fault::Switchover => {
                pair.switchover()?;
            }
            _ => unreachable!("network faults are made by net_fault"),
        }
        Ok(())
    }

    /// The faults of the networks, put in place for a while and taken away.
    fn net_fault(&mut self, inj: &Injection, rng: &mut fastrand::Rng, notes: &mut Vec<String>) -> Result<()> {
        match inj.fault {
            Fault::Partition => {
                self.faults(&["partition"])?;
                std::thread::sleep(Duration::from_millis(800 + rng.u64(..1200)));
                self.faults(&["heal"])?;
            }
            Fault::LossClient | Fault::LossRepl => {
                let net = if inj.fault == Fault::LossClient { "client" } else { "repl" };
                let pct = rng.u64(3..16).to_string();
                notes.push(format!("{pct} % loss on the {net} network"));
                self.faults(&["loss", net, &pct])?;
                std::thread::sleep(Duration::from_millis(1000 + rng.u64(..1000)));
                self.faults(&["loss", net, "0"])?;
            }
            Fault::Corrupt => {
                let pct = rng.u64(2..11).to_string();
                let mode = if rng.bool() { "tamper" } else { "wire" };
                self.faults(&["corrupt", "repl", &pct, mode])?;
                std::thread::sleep(Duration::from_millis(1000 + rng.u64(..1000)));
                // Never fatal here: the corruption must be stopped below whatever `status` says.
                let status = self.faults(&["status"]).unwrap_or_else(|e| format!("{e:#}"));
                let altered: u64 = status
                    .lines()
                    .filter_map(|l| l.strip_suffix(" segments altered")?.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum();
                notes.push(format!("{pct} % of replication segments altered ({mode}): {altered} altered"));
                self.faults(&["corrupt", "repl", "0"])?;
            }
            _ => unreachable!("only network faults"),
        }
        Ok(())
    }

    /// After the fault: a takeover in progress (the moment) completed, the dead node back as the spare,
    /// and the pair protected.
    fn restore(&mut self, inj: &Injection) -> Result<()> {
        if inj.moment == Moment::Takeover {
            self.pair.wait_taken_over(Duration::from_secs(30))?;
            self.pair.promoted()?;
        }
        if self.pair.backup.is_none() {
            self.pair.start_spare()?;
        }
        self.pair.wait_protected(PROTECT_WITHIN)
    }

    /// Whatever state an injection left, back to a protected pair: faults removed, links up, the roles as
    /// the nodes say, a spare started where none runs.
    fn reconcile(&mut self) -> Result<()> {
        self.faults(&["clear"])?;
        for host in ["server", "spare"] {
            self.pair.tb.exec(host, &["sh", "-c", "ip link set eth0 up; ip link set eth1 up; ip link set eth2 up"])?;
        }
        let backup_host = self.pair.backup_host();
        if self.pair.status(backup_host).is_ok_and(|s| s["role"] == "primary") && self.pair.backup.is_some() {
            self.pair.promoted()?;
        }
        if let Some(b) = self.pair.backup.as_mut()
            && b.try_wait()?.is_some()
        {
            self.pair.backup = None;
        }
        if self.pair.backup.is_none() {
            self.pair.start_spare()?;
        }
        if self.pair.wait_protected(PROTECT_WITHIN / 2).is_ok() {
            return Ok(());
        }
        // No node serves (both stepped down, say): the pair starts over, the findings already recorded.
        self.pair.restart_fresh(PROTECT_WITHIN)
    }

    /// The primary's epoch (raised by every takeover).
    fn epoch(&self) -> u64 {
        self.pair.status(self.pair.primary_host).ok().and_then(|s| s["epoch"].as_u64()).unwrap_or(0)
    }

    /// An ARP request for the VIP from the client: the MAC that answered first (the capture sees every answer).
    fn arping(&self) -> Result<Option<String>> {
        let out =
            output(&mut self.pair.tb.command("client", &["arping", "-b", "-c", "1", "-w", "1", "-I", "eth0", VIP]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().find(|l| l.contains("reply from")).and_then(|l| {
            let start = l.find('[')? + 1;
            let end = l[start..].find(']')? + start;
            Some(l[start..end].to_ascii_lowercase())
        }))
    }
}

impl Drop for Campaign {
    /// Before the bed goes down (the pair is dropped after this): no fault rule, helper or remembered
    /// command line of `scripts/faults` outlives the campaign.
    fn drop(&mut self) {
        if let Err(e) = self.faults(&["clear"]) {
            eprintln!("campaign: clearing the faults of bed {}: {e:#}", self.pair.tb.id);
        }
    }
}

/// Runs `injections` on one bed, printing a progress line per injection; the outcomes in order.
pub fn run(
    id: &str,
    injections: &[Injection],
    corrupt_bin: Option<PathBuf>,
    log: &dyn Fn(&str),
) -> Result<Vec<(Injection, Outcome)>> {
    let mut c = Campaign::up(id, corrupt_bin)?;
    log(&format!("test bed {id} up, pair protected; {} injections", injections.len()));
    let mut results = Vec::new();
    for (i, inj) in injections.iter().enumerate() {
        crate::tool::check_interrupted()?;
        let started = Instant::now();
        log(&format!("[{}/{}] {} {} (seed {:#x})", i + 1, injections.len(), inj.fault, inj.moment, inj.seed));
        let out = match c.inject(inj) {
            Ok(out) => out,
            Err(e) => {
                // The injection could not be carried through (a wait of the workload or of the pair ran out):
                // not survived; the bed is made protected again for the next one, or the campaign stops.
                let out = Outcome { problems: vec![format!("{e:#}")], ..Outcome::default() };
                c.reconcile()
                    .with_context(|| format!("after injection {} ({} {}): {e:#}", i + 1, inj.fault, inj.moment))?;
                out
            }
        };
        let verdict = if out.survived() { "survived".to_string() } else { "NOT SURVIVED".to_string() };
        log(&format!(
            "      {verdict}: {} requests, {} client errors, {} resets, max stall {} ms, {} GETs re-sent to the origin, \
             ARP: {} claims, {} changes; {:.1} s",
            out.requests,
            out.client_errors.len(),
            out.resets,
            out.max_stall.as_millis(),
            out.refetches,
            out.arp_claims,
            out.arp_changes,
            started.elapsed().as_secs_f64()
        ));
        for n in &out.notes {
            log(&format!("      {n}"));
        }
        for p in out.client_errors.iter().chain(&out.problems) {
            log(&format!("      - {p}"));
        }
        if !out.survived() {
            log(&format!("      node logs:\n{}", c.pair.logs_tail()));
        }
        results.push((*inj, out));
    }
    if results.iter().any(|(_, o)| !o.survived()) && std::env::var_os("UNDERSTUDY_KEEP").is_none() {
        log("set UNDERSTUDY_KEEP=1 to keep the scratch directory (node logs, captures)");
    }
    Ok(results)
}
