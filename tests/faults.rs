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

#[test]
fn faults_kill_restart_partition_heal_and_loss_act_on_a_running_pair() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the faults test needs root (network namespaces, iptables)");
    }
    let id = unique_id('f');
    // Whatever happens, the rules go with the bed, and the remembered command lines with `clear`.
    struct Forget(String);
    impl Drop for Forget {
        fn drop(&mut self) {
            let _ = faults(&["clear", &self.0]);
        }
    }
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
