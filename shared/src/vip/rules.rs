//! Keeping the kernel from answering ARP for the VIP (arptables).
//!
//! ARCHITECTURE.md "Who owns the VIP": the serving node's kernel must not answer for the
//! VIP, so that only the serving process (the `Responder`) does. Kernel behaviour relied
//! on (verified in shared/tests/vip.rs):
//! * The kernel's ARP replies — to requests and to RFC 5227 probes — leave through
//!   `arp_xmit`, which runs the arptables OUTPUT hook, so
//!   `arptables -A OUTPUT -o IFACE --h-length 6 --opcode Reply --source-ip VIP -j DROP`
//!   silences them.
//! * Frames from an AF_PACKET socket go to the device directly and never meet that hook,
//!   so the responder's replies still leave.
//! * Only replies are dropped: the kernel's own who-has requests (sender IP = VIP, for
//!   traffic it sends from the VIP) must still go out, or the node could not reach its
//!   clients. The prober does not count those as answers.
//! * The kernel still *receives* requests for the VIP and learns the asker's MAC from
//!   them, so replies to the asker need no ARP round of their own.
//!
//! Install the rule before adding the address, so the kernel never answers in between.
//! arptables has no comment match to tag rules with, so the rule spec itself is the tag:
//! it is deterministic for (iface, VIP), and install first deletes every copy a crashed
//! run left (delete until `-C` reports it absent). Needs `arptables` (the nft backend, as
//! on Debian; `-C` is needed) and CAP_NET_ADMIN in the namespace.

use super::command::{Ran, run, this_netns};
use std::fs::File;
use std::net::Ipv4Addr;
use tracing::{info, warn};

/// Why installing or removing the arptables rule failed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// `arptables` could not be started (not installed?).
    #[error("cannot run `{command}` (is arptables installed?): {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// `arptables` exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: std::process::ExitStatus, stderr: String },
    /// The calling thread's network namespace could not be opened (no /proc?).
    #[error("cannot open this thread's network namespace: {0}")]
    Netns(#[source] std::io::Error),
    /// Deleting the rule did not make it go away.
    #[error("`{command}` still finds the rule after {attempts} deletions")]
    StillPresent { command: String, attempts: u32 },
}

const ARPTABLES: &str = "arptables";
/// More copies than any sequence of crashed runs leaves; a bound against a command that
/// claims success without deleting.
const MAX_DELETIONS: u32 = 256;

/// The rule's match and target, after the chain (`-A OUTPUT` / `-D OUTPUT` / `-C OUTPUT`).
pub fn rule_spec(iface: &str, vip: Ipv4Addr) -> Vec<String> {
    ["-o", iface, "--h-length", "6", "--opcode", "Reply", "--source-ip", &vip.to_string(), "-j", "DROP"]
        .map(String::from)
        .to_vec()
}

fn arptables(op: &str, iface: &str, vip: Ipv4Addr, netns: Option<&File>) -> Result<Ran, RulesError> {
    let mut args = vec![op.to_string(), "OUTPUT".to_string()];
    args.extend(rule_spec(iface, vip));
    run(ARPTABLES, &args, netns).map_err(|(command, source)| RulesError::Spawn { command, source })
}

fn failed(ran: Ran) -> RulesError {
    RulesError::Failed { command: ran.line, status: ran.status, stderr: ran.stderr }
}

/// Whether the rule is installed (at least once) in this thread's network namespace.
pub fn is_installed(iface: &str, vip: Ipv4Addr) -> Result<bool, RulesError> {
    installed_in(iface, vip, None)
}

fn installed_in(iface: &str, vip: Ipv4Addr, netns: Option<&File>) -> Result<bool, RulesError> {
    let ran = arptables("-C", iface, vip, netns)?;
    // `-C`: 0 = present, 1 = absent ("Bad rule (does a matching rule exist in that chain?)").
    match ran.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(ran)),
    }
}

/// Deletes every copy of the rule in this thread's network namespace. Returns how many
/// there were.
pub fn remove_all(iface: &str, vip: Ipv4Addr) -> Result<u32, RulesError> {
    remove_all_in(iface, vip, None)
}

fn remove_all_in(iface: &str, vip: Ipv4Addr, netns: Option<&File>) -> Result<u32, RulesError> {
    let mut removed = 0;
    while installed_in(iface, vip, netns)? {
        if removed == MAX_DELETIONS {
            let command = arptables("-C", iface, vip, netns)?.line;
            return Err(RulesError::StillPresent { command, attempts: removed });
        }
        let ran = arptables("-D", iface, vip, netns)?;
        if !ran.status.success() {
            return Err(failed(ran));
        }
        removed += 1;
    }
    Ok(removed)
}

/// The installed rule; dropping it removes it (errors are logged), or call
/// [`KernelArpSilence::remove`] to see them. Removal happens in the network namespace the
/// rule was installed in, whichever thread drops the guard.
#[derive(Debug)]
pub struct KernelArpSilence {
    iface: String,
    vip: Ipv4Addr,
    netns: File,
    installed: bool,
}

impl KernelArpSilence {
    /// Removes copies left by a crashed run, then installs the rule once, in this thread's
    /// network namespace.
    pub fn install(iface: &str, vip: Ipv4Addr) -> Result<KernelArpSilence, RulesError> {
        let netns = this_netns().map_err(RulesError::Netns)?;
        let stale = remove_all_in(iface, vip, Some(&netns))?;
        if stale > 0 {
            warn!(iface, %vip, stale, "removed arptables rules left by an earlier run");
        }
        let ran = arptables("-A", iface, vip, Some(&netns))?;
        if !ran.status.success() {
            return Err(failed(ran));
        }
        info!(iface, %vip, "kernel ARP replies for the VIP dropped (arptables OUTPUT)");
        Ok(KernelArpSilence { iface: iface.to_string(), vip, netns, installed: true })
    }

    /// Removes the rule: the kernel answers for the VIP again (if it has it).
    pub fn remove(mut self) -> Result<(), RulesError> {
        self.installed = false;
        remove_all_in(&self.iface, self.vip, Some(&self.netns)).map(drop)
    }
}

impl Drop for KernelArpSilence {
    fn drop(&mut self) {
        if self.installed
            && let Err(e) = remove_all_in(&self.iface, self.vip, Some(&self.netns))
        {
            warn!(iface = self.iface, vip = %self.vip, error = %e, "could not remove the arptables rule");
        }
    }
}
