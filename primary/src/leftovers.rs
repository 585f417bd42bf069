//! What an earlier run on this host left behind when it died without cleaning up (`kill -9`, OOM, a
//! crash, a takeover elsewhere while it was frozen), cleared when a node starts.
//!
//! A dead primary leaves the VIP on its interface, the arptables rule that silenced the kernel's ARP for
//! it, its gate's rules (which keep dropping what the next item sends), and the kernel's orphaned
//! sockets of its client connections: FIN_WAIT or LAST_ACK, retransmitting for minutes. When that host
//! rejoins as the spare, the orphans hold the four-tuples the next takeover must restore on this host
//! (`connect` in repair mode fails with `EADDRNOTAVAIL`), and a later gate would let their old segments
//! out. So before anything else touches VIP:port, [`clear`]:
//! 1. refuses if a listener is bound on VIP:port (another process on this host serves it);
//! 2. drops everything sent from VIP:port (a tagged mangle OUTPUT rule) while it
//! 3. destroys every socket on VIP:port (`ss -K`, `SOCK_DESTROY`): an aborted socket sends an RST,
//!    which that rule drops, so the client never sees it;
//! 4. removes the VIP address, then the arptables rule (in that order, so the kernel never answers ARP
//!    for an address it still holds), and finally the drop rule.

use crate::gate::rules::{Iptables, RuleSpec, Rules, RulesError, tag};
use shared::vip::addr::{self, AddrError};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use tracing::{info, warn};

/// Why the leftovers could not be cleared.
#[derive(Debug, thiserror::Error)]
pub enum LeftoverError {
    #[error("a process on this host listens on {vip}:{port} (another node serves the VIP here); stop it first")]
    Listening { vip: Ipv4Addr, port: u16 },
    #[error("`{command}` failed: {reason}")]
    Ss { command: String, reason: String },
    #[error("cannot silence {vip}:{port} while its sockets are destroyed: {source}")]
    Silence {
        vip: Ipv4Addr,
        port: u16,
        #[source]
        source: RulesError,
    },
    #[error("cannot remove the VIP {vip} left on {iface}: {source}")]
    Address {
        vip: Ipv4Addr,
        iface: String,
        #[source]
        source: AddrError,
    },
    #[error("cannot remove the arptables rule for {vip} on {iface}: {source}")]
    ArpRule {
        vip: Ipv4Addr,
        iface: String,
        #[source]
        source: shared::vip::rules::RulesError,
    },
}

/// What [`clear`] found and removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleared {
    /// Sockets on VIP:port destroyed (orphans of a dead run, and any left in TIME_WAIT).
    pub sockets: usize,
    /// The VIP was still on the interface.
    pub address: bool,
    /// arptables rules for the VIP removed.
    pub arp_rules: u32,
}

impl Cleared {
    pub fn anything(&self) -> bool {
        self.sockets > 0 || self.address || self.arp_rules > 0
    }
}

/// Clears what an earlier run left for `vip/prefix` and port `port` on `iface` (see the module docs), in this thread's
/// network namespace. `node` tags the temporary drop rule.
pub fn clear(iface: &str, vip: Ipv4Addr, prefix: u8, port: u16, node: &str) -> Result<Cleared, LeftoverError> {
    let local = format!("{vip}:{port}");
    if !ss(&["-Hltn", "src", &local])?.trim().is_empty() {
        return Err(LeftoverError::Listening { vip, port });
    }
    let mut cleared = Cleared::default();
    // Anything on VIP:port at all? Most starts find nothing and skip the rule.
    let sockets = ss(&["-Htn", "state", "all", "src", &local])?;
    if !sockets.trim().is_empty() {
        let silence = silence(vip, port, node).map_err(|source| LeftoverError::Silence { vip, port, source })?;
        let destroyed = ss(&["-HKtn", "state", "all", "src", &local]);
        if let Err(e) = silence.remove() {
            warn!(error = %e, "removing the temporary drop rule failed");
        }
        cleared.sockets = destroyed?.lines().filter(|l| !l.trim().is_empty()).count();
    }
    let err_addr = |source| LeftoverError::Address { vip, iface: iface.to_owned(), source };
    if addr::has(iface, vip).map_err(err_addr)? {
        addr::remove(iface, vip, prefix).map_err(err_addr)?;
        cleared.address = true;
    }
    cleared.arp_rules = shared::vip::rules::remove_all(iface, vip).map_err(|source| LeftoverError::ArpRule {
        vip,
        iface: iface.to_owned(),
        source,
    })?;
    if cleared.anything() {
        info!(%vip, port, iface, sockets = cleared.sockets, address = cleared.address, arp_rules = cleared.arp_rules,
            "cleared what an earlier run left on this host");
    }
    Ok(cleared)
}

/// A rule dropping every segment from `vip:port`, above any other (the gate's included).
fn silence(vip: Ipv4Addr, port: u16, node: &str) -> Result<Rules, RulesError> {
    let tag = tag(&format!("{node}-clear"))?;
    let args: Vec<String> = ["-p", "tcp", "-s", &format!("{vip}/32"), "--sport", &port.to_string(), "-j", "DROP"]
        .into_iter()
        .map(String::from)
        .chain(["-m", "comment", "--comment", &tag].map(String::from))
        .collect();
    let ipt = Iptables::here(Path::new("iptables"))?;
    Ok(Rules::install(ipt, &tag, vec![RuleSpec { chain: "OUTPUT", args }])?.0)
}

fn ss(args: &[&str]) -> Result<String, LeftoverError> {
    let command = format!("ss {}", args.join(" "));
    let out = Command::new("ss")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LeftoverError::Ss { command: command.clone(), reason: e.to_string() })?;
    if !out.status.success() {
        let reason = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        return Err(LeftoverError::Ss { command, reason });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
