//! `scripts/faults` against a running pair (issue 6): each command puts its fault in place, the pair reacts
//! as it should, and the opposite command (or `clear`) undoes it. The campaign builds on these commands.
//!
//! Needs root, nginx, curl (installed by `scripts/test`) and the workspace's binaries built.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use understudy_tests::harness::unique_id;
use understudy_tests::pair::{Pair, PairOptions};

fn faults(args: &[&str]) -> Result<Output> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/faults");
    Command::new(script).args(args).output().with_context(|| format!("running scripts/faults {args:?}"))
}

/// Runs `scripts/faults ARGS`, which must succeed; its standard output.
fn fault(args: &[&str]) -> Result<String> {
    let out = faults(args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "scripts/faults {args:?}: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// A GET through the VIP from the client host.
fn get(pair: &Pair) -> Result<()> {
    let code = pair.get_status("/small.bin")?;
    ensure!(code == "200", "GET through the VIP answered {code}");
    Ok(())
}

fn role(s: &Value) -> &str {
    s["role"].as_str().unwrap_or("")
}

/// Whatever happens, the fault rules go with the bed, and the remembered command lines with `clear`.
struct Forget(String);

impl Drop for Forget {
    fn drop(&mut self) {
        let _ = faults(&["clear", &self.0]);
    }
}

#[test]
fn faults_kill_restart_partition_heal_and_loss_act_on_a_running_pair() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the faults test needs root (network namespaces, iptables)");
    }
    let id = unique_id('f');
    let mut pair = Pair::up(&id, &PairOptions::default(), |www| Ok(std::fs::write(www.join("small.bin"), b"hello")?))?;
    // Declared after the pair, so dropped before its bed goes down (`clear` needs the bed).
    let _forget = Forget(id.clone());
    get(&pair)?;

    // Bad usage is refused with exit status 2, an unknown bed with 1; nothing changes.
    ensure!(faults(&["loss", &id, "wan", "5"])?.status.code() == Some(2), "a bad network is bad usage");
    ensure!(faults(&["kill", &id, "client"])?.status.code() == Some(2), "a bad host is bad usage");
    ensure!(faults(&["status", "nosuchbd"])?.status.code() == Some(1), "an unknown test bed fails");

    // Loss on both networks: the rules are in place and the pair keeps serving; 0 clears them.
    fault(&["loss", &id, "repl", "2"])?;
    fault(&["loss", &id, "client", "2"])?;
    let status = fault(&["status", &id])?;
    ensure!(status.matches("usfault:loss-repl").count() == 4, "two rules per host for the replication loss:\n{status}");
    ensure!(status.matches("usfault:loss-client").count() == 4, "two rules per host for the client loss:\n{status}");
    for _ in 0..5 {
        get(&pair)?;
    }
    fault(&["loss", &id, "repl", "0"])?;
    fault(&["loss", &id, "client", "0"])?;
    ensure!(!fault(&["status", &id])?.contains("usfault:"), "loss 0 leaves no rule");

    // kill -9 of the primary: the backup takes over; `restart` brings the dead side back as the spare.
    let killed = fault(&["kill", &id, "server"])?;
    ensure!(killed.contains("killed"), "{killed}");
    pair.wait_taken_over(Duration::from_secs(20))?;
    pair.promoted()?;
    get(&pair)?;
    let restarted = fault(&["restart", &id, "server"])?;
    ensure!(restarted.contains("restarted server as the spare joining 10.1.0.3:7700"), "{restarted}");
    pair.wait_status("server", "the restarted spare to be connected", Duration::from_secs(20), |s| {
        role(s) == "backup" && s["peer"] == "connected"
    })?;
    pair.wait_status("spare", "the new primary to be protected", Duration::from_secs(20), |s| {
        role(s) == "primary" && s["peer"] == "connected"
    })?;

    // A replication partition with both nodes alive: the primary loses its backup and serves on; the backup
    // fences, finds the primary answering, and does not take the VIP.
    fault(&["partition", &id])?;
    pair.wait_status("spare", "the primary to give its backup up", Duration::from_secs(10), |s| {
        role(s) == "primary" && s["peer"] == "none"
    })?;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let s = pair.status("server")?;
        ensure!(role(&s) == "backup", "the backup took the VIP from a live primary: {s}\n{}", pair.logs_tail());
        get(&pair)?;
    }
    // Healed, the backup rejoins and the pair is protected again.
    fault(&["heal", &id])?;
    pair.wait_status("spare", "the pair to be protected after the partition", Duration::from_secs(30), |s| {
        role(s) == "primary" && s["peer"] == "connected"
    })?;

    // `clear` removes whatever is left; `stop`/`cont` freeze and resume a node.
    fault(&["partition", &id])?;
    fault(&["clear", &id])?;
    ensure!(!fault(&["status", &id])?.contains("usfault:"), "clear leaves no rule");
    let stopped = fault(&["stop", &id, "server"])?;
    ensure!(fault(&["status", &id])?.contains("state T"), "a stopped node shows state T: {stopped}");
    fault(&["cont", &id, "server"])?;
    ensure!(!fault(&["status", &id])?.contains("state T"), "cont resumes the node");
    Ok(())
}

/// Every node log written so far, concatenated with its name.
fn node_logs(pair: &Pair) -> Vec<(String, String)> {
    pair.node_log_stems()
        .iter()
        .map(|s| (s.clone(), std::fs::read_to_string(pair.dir.0.join(format!("{s}.log"))).unwrap_or_default()))
        .collect()
}

/// `faults corrupt` with the `us-corrupt` built for this test.
fn corrupt(args: &[&str]) -> Result<String> {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/faults"))
        .args(args)
        .env("US_CORRUPT", env!("CARGO_BIN_EXE_us-corrupt"))
        .output()
        .with_context(|| format!("running scripts/faults {args:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "scripts/faults {args:?}: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// Issue 6, item 1: replication segments altered in flight with valid TCP checksums. `tamper` (frame CRC
/// recomputed) must be caught by the frame's authentication tag, `wire` by the frame CRC; either ends the
/// link with the error logged by the node that received the frame, the pair is protected again once the
/// corruption stops, and the clients (keep-alive loops, every body checked) see no error and no reset.
#[test]
fn corrupted_replication_frames_end_the_link_and_the_pair_recovers_unseen_by_clients() -> Result<()> {
    use understudy_tests::harness::{Capture, count_matching};
    use understudy_tests::load::{self, Load};
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the faults test needs root (network namespaces, iptables)");
    }
    let id = unique_id('c');
    const SIZES: [u64; 4] = [1_000, 20_000, 5, 150_000];
    let pair = Pair::up(&id, &PairOptions::default(), |www| load::write_files(www, &SIZES))?;
    let _forget = Forget(id.clone());
    let pcap = pair.dir.0.join("client.pcap");
    let capture = Capture::start(&pair.tb, "client", "eth0", "tcp port 80", 96, &pcap)?;
    let load = Load::start(&pair, 8, &SIZES, Duration::from_millis(10))?;
    load.wait_progress(50, Duration::from_secs(30))?;

    ensure!(faults(&["corrupt", &id, "client", "5"])?.status.code() == Some(2), "corrupt is for repl only");
    ensure!(faults(&["corrupt", &id, "repl", "5", "bitrot"])?.status.code() == Some(2), "a bad mode is bad usage");
    for (mode, error) in [("tamper", "replication frame failed authentication: frame"), ("wire", "frame CRC mismatch")]
    {
        let before: usize = node_logs(&pair).iter().map(|(_, t)| t.matches(error).count()).sum();
        let started = Instant::now();
        let said = corrupt(&["corrupt", &id, "repl", "3", mode])?;
        ensure!(said.contains(&format!("mode {mode}")), "{said}");
        let status = fault(&["status", &id])?;
        ensure!(status.matches("usfault:corrupt-repl").count() == 2, "one queue rule per host:\n{status}");
        let (stem, line) = understudy_tests::harness::wait_until(
            &format!("a node to log {error:?}"),
            Duration::from_secs(30),
            || {
                let logs = node_logs(&pair);
                let now: usize = logs.iter().map(|(_, t)| t.matches(error).count()).sum();
                Ok((now > before).then(|| {
                    logs.iter()
                        .find_map(|(s, t)| {
                            t.lines().rev().find(|l| l.contains(error)).map(|l| (s.clone(), l.to_string()))
                        })
                        .unwrap_or_default()
                }))
            },
        )?;
        let status = fault(&["status", &id])?;
        let altered: u64 = status
            .lines()
            .filter_map(|l| l.strip_suffix(" segments altered")?.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        ensure!(altered > 0, "no segment altered, yet {error:?} was logged:\n{status}");
        corrupt(&["corrupt", &id, "repl", "0"])?;
        ensure!(!fault(&["status", &id])?.contains("usfault:"), "corrupt 0 leaves no rule");
        pair.wait_protected(Duration::from_secs(60))?;
        ensure!(pair.primary_host == "server", "the primary moved");
        load.wait_progress(50, Duration::from_secs(30))?;
        println!("{mode}: {stem} logged `{line}`; protected again {:?} after the corruption began", started.elapsed());
    }
    // `clear` ends a corruption in place too.
    corrupt(&["corrupt", &id, "repl", "1", "wire"])?;
    fault(&["clear", &id])?;
    let status = fault(&["status", &id])?;
    ensure!(!status.contains("usfault:") && !status.contains("corrupter"), "clear leaves no rule or helper:\n{status}");
    pair.wait_protected(Duration::from_secs(60))?;

    let report = load.stop()?;
    let errors = report.errors();
    ensure!(errors.is_empty(), "{} load errors:\n{}\n{}", errors.len(), errors.join("\n"), pair.logs_tail());
    capture.stop()?;
    let (resets, lines) =
        count_matching(&pcap, &format!("src host {} and tcp[tcpflags] & tcp-rst != 0", understudy_tests::pair::VIP))?;
    ensure!(resets == 0, "{resets} resets from the VIP reached the client:\n{lines}");
    println!(
        "corruption: {} requests on 8 keep-alive connections, 0 errors, 0 resets, slowest {:?}",
        report.requests(),
        report.slowest()
    );
    Ok(())
}
