//! Adding and removing the VIP on an interface: rtnetlink (`RTM_NEWADDR`, `RTM_DELADDR`) for the two
//! changes, which a takeover waits on (a request and its acknowledgement, where spawning `ip` took ten
//! milliseconds), and the `ip` command (iproute2) to look the address up.
//!
//! Kernel behaviour to know:
//! * Adding an address sends no gratuitous ARP for IPv4: announce with `probe::announce`.
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
//! The functions block until the kernel answers and act in the calling thread's network namespace.
//! Both changes are idempotent: adding a present address or removing an absent one succeeds and says so.

use super::command::{Ran, run};
use std::net::Ipv4Addr;
use tracing::info;

/// Why adding, removing or looking up the VIP failed.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The prefix length is above 32.
    #[error("prefix length {0} is above 32")]
    Prefix(u8),
    /// No interface of that name in this network namespace.
    #[error("no interface `{0}` here")]
    NoInterface(String),
    /// The kernel refused the change (not permitted, ...), or the netlink socket failed.
    #[error("{op} {vip}/{prefix} on {iface}: {source}")]
    Netlink {
        op: &'static str,
        vip: Ipv4Addr,
        prefix: u8,
        iface: String,
        #[source]
        source: std::io::Error,
    },
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

/// Adds `vip/prefix` to `iface`.
pub fn add(iface: &str, vip: Ipv4Addr, prefix: u8) -> Result<AddrChange, AddrError> {
    let change = change(RtmOp::Add, iface, vip, prefix)?;
    if change == AddrChange::Done {
        info!(iface, %vip, prefix, "VIP added");
    }
    Ok(change)
}

/// Removes `vip/prefix` from `iface`.
pub fn remove(iface: &str, vip: Ipv4Addr, prefix: u8) -> Result<AddrChange, AddrError> {
    let change = change(RtmOp::Remove, iface, vip, prefix)?;
    if change == AddrChange::Done {
        info!(iface, %vip, prefix, "VIP removed");
    }
    Ok(change)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RtmOp {
    Add,
    Remove,
}

/// One `RTM_NEWADDR` or `RTM_DELADDR` request, and the kernel's acknowledgement.
fn change(op: RtmOp, iface: &str, vip: Ipv4Addr, prefix: u8) -> Result<AddrChange, AddrError> {
    if prefix > 32 {
        return Err(AddrError::Prefix(prefix));
    }
    let name = std::ffi::CString::new(iface).map_err(|_| AddrError::NoInterface(iface.to_string()))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(AddrError::NoInterface(iface.to_string()));
    }
    let op_name = if op == RtmOp::Add { "adding" } else { "removing" };
    let fail = |source| AddrError::Netlink { op: op_name, vip, prefix, iface: iface.to_string(), source };
    match request(&address_message(op, index, vip, prefix)) {
        Ok(()) => Ok(AddrChange::Done),
        Err(e) if op == RtmOp::Add && e.raw_os_error() == Some(libc::EEXIST) => Ok(AddrChange::Unchanged),
        Err(e) if op == RtmOp::Remove && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(AddrChange::Unchanged),
        Err(e) => Err(fail(e)),
    }
}

/// The request: `nlmsghdr`, `ifaddrmsg`, then `IFA_LOCAL` and `IFA_ADDRESS` (both the VIP, as `ip` sends
/// for an address without a peer).
fn address_message(op: RtmOp, index: u32, vip: Ipv4Addr, prefix: u8) -> Vec<u8> {
    const HEADER: usize = 16;
    const IFADDRMSG: usize = 8;
    const ATTR: usize = 8; // rtattr (4) + an IPv4 address (4)
    let len = HEADER + IFADDRMSG + 2 * ATTR;
    let (kind, flags) = match op {
        RtmOp::Add => (libc::RTM_NEWADDR, libc::NLM_F_CREATE | libc::NLM_F_EXCL),
        RtmOp::Remove => (libc::RTM_DELADDR, 0),
    };
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags) as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[libc::AF_INET as u8, prefix, 0, libc::RT_SCOPE_UNIVERSE]);
    m.extend_from_slice(&index.to_ne_bytes());
    for attr in [libc::IFA_LOCAL, libc::IFA_ADDRESS] {
        m.extend_from_slice(&(ATTR as u16).to_ne_bytes());
        m.extend_from_slice(&attr.to_ne_bytes());
        m.extend_from_slice(&vip.octets());
    }
    m
}

/// Sends `message` on a new `NETLINK_ROUTE` socket and waits for its acknowledgement: `Ok` or the
/// kernel's error.
fn request(message: &[u8]) -> std::io::Result<()> {
    use std::io::Error;
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: sockaddr_nl is plain data; zero is "the kernel" for nl_pid and nl_groups.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `message` and `kernel` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd,
            message.as_ptr().cast(),
            message.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        // nlmsghdr: len (4), type (2), flags (2), seq (4), pid (4); an NLMSG_ERROR carries the error
        // (0 for the acknowledgement) right after it.
        if n < 20 {
            return Err(Error::other(format!("short netlink answer ({n} bytes)")));
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if kind != libc::NLMSG_ERROR as u16 {
            continue;
        }
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return if code == 0 { Ok(()) } else { Err(Error::from_raw_os_error(-code)) };
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_prefix_or_an_unknown_interface_is_refused_before_any_request() {
        let vip = Ipv4Addr::new(10, 0, 0, 100);
        assert!(matches!(add("lo", vip, 33), Err(AddrError::Prefix(33))));
        let err = remove("no-such-if0", vip, 24).unwrap_err();
        assert!(matches!(&err, AddrError::NoInterface(i) if i == "no-such-if0"), "{err}");
    }

    #[test]
    fn the_request_is_an_ifaddrmsg_with_the_vip_as_local_and_address() {
        let m = address_message(RtmOp::Add, 7, Ipv4Addr::new(10, 0, 0, 100), 24);
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), libc::RTM_NEWADDR);
        let flags = u16::from_ne_bytes(m[6..8].try_into().unwrap()) as libc::c_int;
        assert_eq!(flags, libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL);
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 24, 0, libc::RT_SCOPE_UNIVERSE]);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        assert_eq!(&m[28..32], &[10, 0, 0, 100]);
        assert_eq!(&m[36..40], &[10, 0, 0, 100]);
        let del = address_message(RtmOp::Remove, 7, Ipv4Addr::new(10, 0, 0, 100), 24);
        assert_eq!(u16::from_ne_bytes(del[4..6].try_into().unwrap()), libc::RTM_DELADDR);
    }
}
