//! An AF_PACKET socket for ARP on one interface, usable from tokio.
//!
//! Kernel behaviour relied on (packet(7), net/packet/af_packet.c):
//! * The socket is created with protocol 0, so it receives nothing until `bind` names the
//!   interface and ETH_P_ARP: no frame of another interface slips in between.
//! * A socket bound to one protocol hangs off `ptype_base`, which only sees received
//!   frames: this host's own transmissions are not looped back (only ETH_P_ALL taps see
//!   those). Frames marked PACKET_OUTGOING are skipped anyway, and PACKET_OTHERHOST
//!   (promiscuous mode) too, as `arp_rcv` drops them.
//! * `getsockname` on a bound packet socket reports the device's hardware address, so the
//!   MAC is read in the socket's own network namespace (sysfs may show another one).
//! * Frames sent here go straight to the device (`dev_queue_xmit`), never through
//!   `arp_xmit`, so arptables OUTPUT rules do not see them: that is what lets the
//!   responder answer while the kernel is silenced (verified in shared/tests/vip.rs).
//! * When the device goes down the socket reports ENETDOWN once and keeps working after
//!   it comes back up.

use super::arp::{ArpFrame, ArpParseError, Mac};
use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Why an ARP socket operation (open, send, receive, probe, announce) failed.
#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    /// The interface name is empty, longer than IFNAMSIZ-1 bytes, or contains NUL.
    #[error("bad interface name {0:?}")]
    InterfaceName(String),
    /// No interface of that name in this network namespace.
    #[error("no interface {iface} in this network namespace: {source}")]
    NoSuchInterface {
        iface: String,
        #[source]
        source: io::Error,
    },
    /// The interface does not carry Ethernet (loopback, tun, ...).
    #[error("interface {iface} is not Ethernet (hardware type {hatype}, address length {halen})")]
    NotEthernet { iface: String, hatype: u16, halen: u8 },
    /// A system call failed; `step` names it (`socket`, `bind`, `send`, `recvfrom`, ...).
    /// `socket` failing with EPERM means CAP_NET_RAW is missing.
    #[error("{step} on ARP socket of {iface} failed: {source}")]
    Syscall {
        step: &'static str,
        iface: String,
        #[source]
        source: io::Error,
    },
    /// The kernel took only part of a frame.
    #[error("short send on {iface}: {sent} of {len} bytes")]
    ShortSend { iface: String, sent: usize, len: usize },
    /// A probe was asked to send no probes.
    #[error("probe count must be at least 1")]
    NoProbes,
    /// The address cannot be probed or announced (unspecified, broadcast, multicast).
    #[error("{0} is not a unicast address")]
    NotUnicast(std::net::Ipv4Addr),
    /// Called outside a tokio runtime (the socket is driven by tokio's reactor).
    #[error("ARP sockets must be opened inside a tokio runtime (with I/O enabled)")]
    NoRuntime,
    /// The responder task ended abnormally (it panicked).
    #[error("ARP responder task failed: {0}")]
    ResponderFailed(String),
}

/// What [`ArpSocket::recv`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A well-formed Ethernet/IPv4 ARP frame.
    Arp(ArpFrame),
    /// A frame that is not one; callers count these and carry on.
    Malformed(ArpParseError),
}

/// A raw ARP socket bound to one interface, non-blocking, registered with tokio.
#[derive(Debug)]
pub struct ArpSocket {
    fd: AsyncFd<OwnedFd>,
    iface: String,
    ifindex: u32,
    mac: Mac,
}

const ETH_P_ARP: u16 = libc::ETH_P_ARP as u16;
const ARPHRD_ETHER: u16 = libc::ARPHRD_ETHER;

impl ArpSocket {
    /// Opens and binds the socket in the calling thread's network namespace. Must run
    /// inside a tokio runtime with I/O enabled (the socket registers with its reactor).
    /// Needs CAP_NET_RAW.
    pub fn open(iface: &str) -> Result<ArpSocket, ArpError> {
        if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
            return Err(ArpError::InterfaceName(iface.to_string()));
        }
        let name = CString::new(iface).map_err(|_| ArpError::InterfaceName(iface.to_string()))?;
        let syscall = |step| {
            let iface = iface.to_string();
            move |source| ArpError::Syscall { step, iface, source }
        };
        // SAFETY: plain socket(2); the result is checked before it becomes an OwnedFd.
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(syscall("socket")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(ArpError::NoSuchInterface { iface: iface.to_string(), source: io::Error::last_os_error() });
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ARP.to_be();
        sll.sll_ifindex = ifindex as i32;
        let len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `sll` is a valid sockaddr_ll of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), len) } != 0 {
            return Err(syscall("bind")(io::Error::last_os_error()));
        }
        // SAFETY: as above; getsockname writes at most `len` bytes into `name_out`.
        let mut name_out: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut len_out = len;
        if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut name_out).cast(), &mut len_out) } != 0 {
            return Err(syscall("getsockname")(io::Error::last_os_error()));
        }
        if name_out.sll_hatype != ARPHRD_ETHER || name_out.sll_halen != 6 {
            return Err(ArpError::NotEthernet {
                iface: iface.to_string(),
                hatype: name_out.sll_hatype,
                halen: name_out.sll_halen,
            });
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&name_out.sll_addr[..6]);
        // Registering outside a runtime would panic in tokio: say so instead.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ArpError::NoRuntime);
        }
        // SAFETY: the AsyncFd owns `fd`, so it stays open and the same until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
            .map_err(|e| syscall("register with tokio")(e.into()))?;
        Ok(ArpSocket { fd, iface: iface.to_string(), ifindex, mac: Mac(mac) })
    }

    /// The interface's hardware address (as it was when the socket was opened).
    pub fn mac(&self) -> Mac {
        self.mac
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Sends one whole Ethernet frame out of the interface.
    pub async fn send(&self, frame: &[u8]) -> Result<(), ArpError> {
        loop {
            let mut guard = self.fd.writable().await.map_err(|e| self.err("poll writable", e))?;
            // SAFETY: `frame` is valid for `frame.len()` bytes; the socket is bound, so
            // send(2) needs no address.
            match guard.try_io(|fd| {
                let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            }) {
                Ok(Ok(n)) if n == frame.len() => return Ok(()),
                Ok(Ok(n)) => return Err(ArpError::ShortSend { iface: self.iface.clone(), sent: n, len: frame.len() }),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(self.err("send", e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives the next ARP frame another host sent to this interface. Cancel safe: a
    /// frame is either returned or still queued.
    pub async fn recv(&self) -> Result<Incoming, ArpError> {
        let mut buf = [0u8; 256];
        loop {
            let mut guard = self.fd.readable().await.map_err(|e| self.err("poll readable", e))?;
            match guard.try_io(|fd| recv_from(fd.as_raw_fd(), &mut buf)) {
                Ok(Ok((n, pkttype))) => {
                    if pkttype == libc::PACKET_OUTGOING || pkttype == libc::PACKET_OTHERHOST {
                        continue;
                    }
                    return Ok(match ArpFrame::parse(&buf[..n]) {
                        Ok(f) => Incoming::Arp(f),
                        Err(e) => Incoming::Malformed(e),
                    });
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(self.err("recvfrom", e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Discards every frame already queued (answers to an earlier probe must not count
    /// for the next one). Returns how many.
    pub fn drain(&self) -> Result<usize, ArpError> {
        let mut buf = [0u8; 64];
        let mut n = 0;
        loop {
            match recv_from(self.fd.get_ref().as_raw_fd(), &mut buf) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The once-only ENETDOWN of a device that went down says nothing about queued frames.
                Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => continue,
                Err(e) => return Err(self.err("recvfrom", e)),
            }
        }
    }

    fn err(&self, step: &'static str, source: io::Error) -> ArpError {
        ArpError::Syscall { step, iface: self.iface.clone(), source }
    }
}

/// One recvfrom(2): the frame length (truncated to `buf`) and its packet type.
fn recv_from(fd: i32, buf: &mut [u8]) -> io::Result<(usize, u8)> {
    // SAFETY: sockaddr_ll is plain old data; recvfrom writes at most `len` bytes of it and
    // at most `buf.len()` bytes of frame.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    let n = unsafe { libc::recvfrom(fd, buf.as_mut_ptr().cast(), buf.len(), 0, (&raw mut sll).cast(), &mut len) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(((n as usize).min(buf.len()), sll.sll_pkttype))
}
