//! Takeover steps 3 to 5 (ARCHITECTURE.md "Takeover (backup)"): hold, restore. The claim itself is
//! `primary::claim::VipClaim`; the order is the node's (backup/src/node.rs).
//!
//! **Hold.** Until every socket exists, a segment for VIP:port that finds no socket would be answered
//! by the kernel with a RST, which kills the client's connection. The hold drops such segments in
//! `mangle PREROUTING`, ahead of TCP, with two exceptions inserted above it:
//! * segments that match a socket (`-m socket --nowildcard`, xt_socket): a restored connection's own
//!   traffic passes at once, so the client's answer to the window probe a restored socket sends when it
//!   leaves repair mode is not lost;
//! * segments `tcp_replay::repair::restore` injects itself (a replayed FIN), marked
//!   [`INJECT_MARK`](tcp_replay::repair::INJECT_MARK).
//!
//! Known cost: removing the socket-match rule drops the kernel's last user of IPv4 defragmentation, whose
//! hook then goes, and unregistering any hook flushes every NFQUEUE of the namespace, so the client segments
//! the gate holds at that moment (the answers to the restored sockets' window probes among them) are lost
//! and clients recover on their timers (downloads stall for seconds). A hold without that rule keeps them,
//! but then back-to-back failovers can leave a restored download stuck (the answer's stale timestamp echo
//! becomes its first RTT sample, among what is understood so far); see the README's Limitations.
//!
//! The gate the new primary starts inserts its NFQUEUE rules at the top of the same chain. A segment the
//! queue accepts leaves the chain there (an accepted verdict continues with the next hook, not the next
//! rule), so starting the gate is what lifts the hold; [`Hold::release`] then removes the rules. Rules
//! carry the comment `understudy:<node>-hold`; a crashed run's leftovers are removed on install.
//!
//! **Restore.** Each connection the planner can restore is rebuilt with `TCP_REPAIR` from the tracker's
//! plan; the VIP must already be on an interface (repair-mode bind needs a local address). Connections
//! that cannot be restored are logged with the failing step and left to the client's retransmission
//! (which meets no socket once the hold is gone, and is reset: honest, and counted).

use crate::resume::Restored;
use primary::gate::rules::{Iptables, RuleSpec, Rules, RulesError, tag};
use shared::config::RetryConfig;
use shared::protocol::ConnKey;
use shared::replica::{ConnResume, Decision, ReplicaTable, plan_takeover};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tcp_replay::repair::{self, INJECT_MARK};
use tracing::{error, info, warn};

/// The iptables binary the hold runs (the one `primary::gate` uses).
const IPTABLES: &str = "iptables";

/// Inbound VIP:port segments held while sockets are rebuilt.
#[derive(Debug)]
pub struct Hold {
    rules: Rules,
}

impl Hold {
    /// Installs the hold for `vip:port`, tagged for `node`, in this thread's network namespace.
    pub fn install(vip: Ipv4Addr, port: u16, node: &str) -> Result<Hold, RulesError> {
        let tag = tag(&format!("{node}-hold"))?;
        let ipt = Iptables::here(Path::new(IPTABLES))?;
        let (rules, stale) = Rules::install(ipt, &tag, hold_rules(vip, port, &tag))?;
        if stale > 0 {
            warn!(stale, %tag, "removed hold rules left by an earlier run");
        }
        Ok(Hold { rules })
    }

    /// Removes the hold's rules.
    pub fn release(self) -> Result<(), RulesError> {
        self.rules.remove()
    }
}

/// The hold's rules, in chain order: pass what finds a socket, pass injected segments, drop the rest.
pub fn hold_rules(vip: Ipv4Addr, port: u16, tag: &str) -> Vec<RuleSpec> {
    let base = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> =
            ["-p", "tcp", "-d", &format!("{vip}/32"), "--dport", &port.to_string()].map(String::from).to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["-m", "comment", "--comment", tag].map(String::from));
        args
    };
    let mark = format!("{INJECT_MARK:#x}");
    vec![
        RuleSpec { chain: "PREROUTING", args: base(&["-m", "socket", "--nowildcard", "-j", "ACCEPT"]) },
        RuleSpec { chain: "PREROUTING", args: base(&["-m", "mark", "--mark", &mark, "-j", "ACCEPT"]) },
        RuleSpec { chain: "PREROUTING", args: base(&["-j", "DROP"]) },
    ]
}

/// What the restore step did.
#[derive(Default)]
pub struct RestoreReport {
    /// Connections rebuilt, with their plans, ready for the resume executor.
    pub restored: Vec<Restored>,
    /// Connections whose restore failed, with the error.
    pub failed: Vec<(ConnKey, String)>,
    /// Connections not restored by decision (unprotected, not restorable), with the decision's kind.
    pub skipped: Vec<(ConnKey, &'static str)>,
    /// Time the restore took.
    pub took: Duration,
}

/// The replication stream's clock (wall-clock time since the Unix epoch, as the primary stamps
/// segments), read now.
pub fn stream_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Plans every connection of `table` and rebuilds the restorable ones. Must run in the network
/// namespace that holds the VIP, with the VIP on an interface and the hold in place.
pub fn restore_all(table: &ReplicaTable, retry: &RetryConfig) -> RestoreReport {
    let started = Instant::now();
    let mut report = RestoreReport::default();
    for plan in plan_takeover(table, stream_now(), retry) {
        let key = plan.conn;
        let conn = format!("{}", key.client);
        let Some(restore) = &plan.restore else {
            match &plan.decision {
                Decision::Unprotected { reason } => {
                    warn!(conn, %reason, "connection not restored: it was not protected")
                }
                Decision::NotRestorable { error } => warn!(conn, %error, "connection not restored"),
                other => warn!(conn, path = other.kind(), "connection has no restore plan"),
            }
            report.skipped.push((key, plan.decision.kind()));
            continue;
        };
        let Some(entry) = table.conn(&key).cloned() else {
            report.failed.push((key, "vanished from the table".into()));
            continue;
        };
        match restore_one(restore, &plan) {
            Ok(stream) => {
                info!(conn, state = ?restore.state, unacked = restore.send_queue.len(), unread = restore.recv_queue.len(),
                    path = plan.decision.kind(), "connection restored");
                report.restored.push(Restored { stream, plan, conn: entry });
            }
            Err(e) => {
                error!(conn, error = %e, "restoring the connection failed");
                report.failed.push((key, e));
            }
        }
    }
    report.took = started.elapsed();
    report
}

fn restore_one(plan: &tcp_replay::RestorePlan, _resume: &ConnResume) -> Result<tokio::net::TcpStream, String> {
    let stream = repair::restore(plan).map_err(|e| e.to_string())?;
    stream.set_nonblocking(true).map_err(|e| format!("set_nonblocking: {e}"))?;
    let _ = stream.set_nodelay(true);
    tokio::net::TcpStream::from_std(stream).map_err(|e| format!("registering with the runtime: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_passes_sockets_and_injected_segments_before_dropping() {
        let rules = hold_rules(Ipv4Addr::new(10, 0, 0, 100), 80, "understudy:b-hold");
        let text: Vec<String> = rules.iter().map(|r| r.args.join(" ")).collect();
        assert_eq!(rules.len(), 3);
        assert!(text[0].contains("-m socket --nowildcard -j ACCEPT"), "{}", text[0]);
        assert!(text[1].contains(&format!("--mark {INJECT_MARK:#x} -j ACCEPT")), "{}", text[1]);
        assert!(text[2].ends_with("-j DROP -m comment --comment understudy:b-hold"), "{}", text[2]);
        assert!(text.iter().all(|t| t.starts_with("-p tcp -d 10.0.0.100/32 --dport 80")));
    }
}
