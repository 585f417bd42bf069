//! Adding and removing the VIP on an interface, with the `ip` command (iproute2).
//!
//! Kernel behaviour to know:
//! * `ip addr add` sends no gratuitous ARP for IPv4: announce with `probe::announce`.
//! * The kernel answers ARP for the address as soon as it is added, unless the arptables
//!   rule (`rules`) is already there: install the rule first.
//! * A VIP inside the subnet of the interface's own address becomes a *secondary*
//!   address; deleting the primary address deletes its secondaries too unless
//!   `net.ipv4.conf.IFACE.promote_secondaries=1`.
//! * Binding to the VIP before it is configured (a listener started early): set
//!   `IP_FREEBIND` on that socket (`socket2::Socket::set_freebind`), or sysctl
//!   `net.ipv4.ip_nonlocal_bind=1` for the namespace. Restored `TCP_REPAIR` sockets bind
//!   to the VIP as well, so a takeover claims the address before it restores.
//!
//! The functions block for the few milliseconds `ip` takes and act in the calling thread's
//! network namespace. Both are idempotent: adding a present address or removing an
//! absent one succeeds and says so.

use super::command::{Ran, run};
use std::net::Ipv4Addr;
use tracing::info;

/// Why adding, removing or looking up the VIP failed.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The prefix length is above 32.
    #[error("prefix length {0} is above 32")]
    Prefix(u8),
    /// `ip` could not be started (iproute2 missing?).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// `ip` exited with an error (no such device, not permitted, ...).
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: std::process::ExitStatus, stderr: String },
    /// `ip -j` printed something that is not the JSON it documents.
    #[error("cannot read the output of `{command}`: {reason}")]
    Output { command: String, reason: String },
}

/// What [`add`] or [`remove`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrChange {
    /// The address was added (or removed) now.
    Done,
    /// It was already there (or already absent): nothing to do.
    Unchanged,
}

fn ip(args: &[String]) -> Result<Ran, AddrError> {
    run("ip", args, None).map_err(|(command, source)| AddrError::Spawn { command, source })
}

fn failed(ran: Ran) -> AddrError {
    AddrError::Failed { command: ran.line, status: ran.status, stderr: ran.stderr }
}

fn addr_args(op: &str, iface: &str, vip: Ipv4Addr, prefix: u8) -> Result<Vec<String>, AddrError> {
    if prefix > 32 {
        return Err(AddrError::Prefix(prefix));
    }
    Ok(["-4", "addr", op, &format!("{vip}/{prefix}"), "dev", iface].map(String::from).to_vec())
}

/// Adds `vip/prefix` to `iface`.
pub fn add(iface: &str, vip: Ipv4Addr, prefix: u8) -> Result<AddrChange, AddrError> {
    let ran = ip(&addr_args("add", iface, vip, prefix)?)?;
    if ran.status.success() {
        info!(iface, %vip, prefix, "VIP added");
        return Ok(AddrChange::Done);
    }
    // "File exists" if present; asking is sturdier than matching the message.
    if has(iface, vip)? { Ok(AddrChange::Unchanged) } else { Err(failed(ran)) }
}

/// Removes `vip/prefix` from `iface`.
pub fn remove(iface: &str, vip: Ipv4Addr, prefix: u8) -> Result<AddrChange, AddrError> {
    let ran = ip(&addr_args("del", iface, vip, prefix)?)?;
    if ran.status.success() {
        info!(iface, %vip, prefix, "VIP removed");
        return Ok(AddrChange::Done);
    }
    if has(iface, vip)? { Err(failed(ran)) } else { Ok(AddrChange::Unchanged) }
}

/// Whether `vip` is configured on `iface` (any prefix length).
pub fn has(iface: &str, vip: Ipv4Addr) -> Result<bool, AddrError> {
    let ran = ip(&["-j", "-4", "addr", "show", "dev", iface].map(String::from))?;
    if !ran.status.success() {
        return Err(failed(ran));
    }
    let output = |reason: String| AddrError::Output { command: ran.line.clone(), reason };
    let links: Vec<serde_json::Value> = serde_json::from_str(&ran.stdout).map_err(|e| output(e.to_string()))?;
    let want = vip.to_string();
    for link in &links {
        let Some(infos) = link.get("addr_info").and_then(|a| a.as_array()) else { continue };
        if infos.iter().any(|a| a.get("local").and_then(|l| l.as_str()) == Some(want.as_str())) {
            return Ok(true);
        }
    }
    Ok(false)
}
