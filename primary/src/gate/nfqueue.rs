//! A `NETLINK_NETFILTER` socket bound to one NFQUEUE queue: configuration, batched receive
//! (`recvmmsg`), single and batch verdicts. Non-blocking; the driver in `gate` owns readiness.
//!
//! Kernel behaviour this relies on (net/netfilter/nfnetlink_queue.c, net/netlink/af_netlink.c):
//! * Each queued packet is its own netlink datagram, so one `recv` returns one packet; `recvmmsg` is what
//!   takes many per system call.
//! * When the socket's receive buffer is full the kernel drops the packet (it is never accepted unless
//!   the queue is fail-open, which ours is not) and the next receive fails with `ENOBUFS`.
//! * Closing the socket (process exit included) destroys the queue instance; the packets still queued
//!   are dropped, and packets reaching an `NFQUEUE` rule without `--queue-bypass` while no instance
//!   exists are dropped too. That is the fail-closed property.
//! * A verdict is processed inside the `sendmsg` call: accepted packets continue through the stack
//!   (up to TCP) on the sending thread before the call returns.
//! * `BIND` fails with `EPERM` while another socket holds the queue number (in this network namespace);
//!   `EBUSY` only when the same socket binds it twice.

use super::netlink::{self, Event, MAX_COPY_RANGE, MAX_MESSAGE_LEN, ParseError, Verdict};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How the queue is configured after binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueParams {
    /// Packets the kernel holds in the queue before it drops new ones.
    pub max_len: u32,
    /// Hand GSO packets over whole, with unfinished checksums (`NFQA_CFG_F_GSO`), instead of letting
    /// the kernel segment them and finish their checksums.
    pub gso: bool,
    /// Bytes of each packet copied to user space (at most [`MAX_COPY_RANGE`]; longer packets arrive cut,
    /// with their real length).
    pub copy_range: u32,
}

/// Why opening or configuring the queue socket failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A system call on the netlink socket failed.
    #[error("{call} on the NETLINK_NETFILTER socket failed: {source}")]
    Io {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// Another socket (another process, or a live earlier instance) holds the queue number.
    #[error("NFQUEUE {queue} is already bound by another socket in this network namespace (netlink port id {holder})")]
    Busy { queue: u16, holder: u32 },
    /// The kernel refused a configuration step.
    #[error("NFQUEUE {queue}: {step} refused by the kernel: {source}")]
    Refused {
        queue: u16,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel did not answer a configuration step in time.
    #[error("NFQUEUE {queue}: no answer to {step} within {timeout:?}")]
    Timeout { queue: u16, step: &'static str, timeout: Duration },
}

/// An open `NETLINK_NETFILTER` socket.
#[derive(Debug)]
pub struct QueueSocket {
    fd: OwnedFd,
    seq: AtomicU32,
    portid: u32,
}

impl AsRawFd for QueueSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl QueueSocket {
    /// Opens a non-blocking socket in the calling thread's network namespace, with a receive buffer
    /// of `recv_buffer` bytes (`SO_RCVBUFFORCE` when privileged, else capped by `rmem_max`).
    pub fn open(recv_buffer: usize) -> Result<QueueSocket, QueueError> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(QueueError::Io { call: "socket", source: io::Error::last_os_error() });
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zero means "let the kernel pick the port id".
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_nl of `len` bytes.
        if unsafe { libc::bind(raw, (&raw const addr).cast(), len) } != 0 {
            return Err(QueueError::Io { call: "bind", source: io::Error::last_os_error() });
        }
        let mut got_len = len;
        // SAFETY: addr and got_len are valid for writing.
        if unsafe { libc::getsockname(raw, (&raw mut addr).cast(), &mut got_len) } != 0 {
            return Err(QueueError::Io { call: "getsockname", source: io::Error::last_os_error() });
        }
        let size = recv_buffer.min(i32::MAX as usize) as libc::c_int;
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, size)
                .map_err(|source| QueueError::Io { call: "setsockopt(SO_RCVBUF)", source })?;
        }
        // Error messages then carry only the request's header, not a copy of the request.
        let _ = setsockopt_int(raw, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        Ok(QueueSocket { fd, seq: AtomicU32::new(1), portid: addr.nl_pid })
    }

    /// The port id the kernel gave this socket (what `/proc/net/netfilter/nfnetlink_queue` shows).
    pub fn portid(&self) -> u32 {
        self.portid
    }

    /// Binds `queue` to this socket and configures it: packet copies of `params.copy_range` bytes,
    /// `params.max_len`, never fail-open, GSO as `params.gso`. One socket may bind several queues. Waits (at most `timeout`) for the kernel's answer to each step.
    /// Packets the kernel queued meanwhile are returned as raw datagrams, in order, for the caller to
    /// handle before anything it receives later.
    pub fn bind_queue(&self, queue: u16, params: QueueParams, timeout: Duration) -> Result<Vec<Vec<u8>>, QueueError> {
        let mut early = Vec::new();
        let seq = self.next_seq();
        self.send(&netlink::request::bind(seq, queue))
            .map_err(|source| QueueError::Io { call: "send(bind)", source })?;
        match self.await_ack(seq, timeout, &mut early) {
            Ok(()) => {}
            // EPERM when another socket holds the queue (checked before EBUSY, which only a second bind
            // from the same socket gets); EPERM also means "not CAP_NET_ADMIN", so look at the holder.
            Err(AckError::Refused(e)) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EBUSY)) => {
                return Err(match super::KernelQueueStats::read_here(queue) {
                    Ok(Some(holder)) => QueueError::Busy { queue, holder: holder.portid },
                    _ => QueueError::Refused { queue, step: "bind", source: e },
                });
            }
            Err(e) => return Err(e.into_queue_error(queue, "bind", timeout)),
        }
        let flags = if params.gso { netlink::CFG_F_GSO } else { 0 };
        let mask = netlink::CFG_F_GSO | netlink::CFG_F_FAIL_OPEN;
        let seq = self.next_seq();
        let range = params.copy_range.min(MAX_COPY_RANGE);
        let msg = netlink::request::params(seq, queue, range, params.max_len, flags, mask);
        self.send(&msg).map_err(|source| QueueError::Io { call: "send(params)", source })?;
        self.await_ack(seq, timeout, &mut early).map_err(|e| e.into_queue_error(queue, "configure", timeout))?;
        Ok(early)
    }

    /// Unbinds `queue`; the kernel drops whatever is still queued in it. The kernel acts inside this call
    /// (the queue number is free when it returns); a refusal arrives later as an error event, because a
    /// reader may be receiving on this socket concurrently and would take the answer.
    pub fn unbind_queue(&self, queue: u16) -> io::Result<()> {
        self.send(&netlink::request::unbind(self.next_seq(), queue))
    }

    /// A verdict on packet `id` alone. Returns the request's sequence number; a failure arrives later as
    /// an error event with it.
    pub fn verdict(&self, queue: u16, id: u32, verdict: Verdict) -> io::Result<u32> {
        let seq = self.next_seq();
        self.send(&netlink::request::verdict(seq, queue, id, verdict))?;
        Ok(seq)
    }

    /// A verdict on every packet queued up to and including `id`, in queue order.
    pub fn verdict_batch(&self, queue: u16, id: u32, verdict: Verdict) -> io::Result<u32> {
        let seq = self.next_seq();
        self.send(&netlink::request::verdict_batch(seq, queue, id, verdict))?;
        Ok(seq)
    }

    /// Receives as many datagrams as are waiting, up to the batch's capacity, without blocking.
    /// `WouldBlock` when there is none; `ENOBUFS` when the kernel dropped packets for lack of room.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.count = 0;
        let slots = batch.lens.len();
        let slot_len = batch.slot_len;
        let base = batch.data.as_mut_ptr();
        let mut iovecs: Vec<libc::iovec> = (0..slots)
            .map(|i| libc::iovec {
                // SAFETY: slot i lies within `data`, which holds slots * slot_len bytes.
                iov_base: unsafe { base.add(i * slot_len) }.cast(),
                iov_len: slot_len,
            })
            .collect();
        // SAFETY: sockaddr_nl is plain data.
        let mut names: Vec<libc::sockaddr_nl> = vec![unsafe { mem::zeroed() }; slots];
        let mut hdrs: Vec<libc::mmsghdr> = (0..slots)
            .map(|i| {
                // SAFETY: msghdr is plain data; the pointers set below stay valid for the call.
                let mut h: libc::msghdr = unsafe { mem::zeroed() };
                h.msg_name = (&raw mut names[i]).cast();
                h.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                h.msg_iov = &raw mut iovecs[i];
                h.msg_iovlen = 1;
                libc::mmsghdr { msg_hdr: h, msg_len: 0 }
            })
            .collect();
        // SAFETY: hdrs describes `slots` buffers owned by `batch`, iovecs and names, all alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                slots as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().take(n).enumerate() {
            batch.lens[i] = (h.msg_len as usize).min(slot_len);
            batch.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            batch.from_kernel[i] = names[i].nl_pid == 0;
        }
        batch.count = n;
        Ok(n)
    }

    fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: msg is a valid buffer; an unconnected netlink socket sends to the kernel (port 0).
            let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives until the answer to `seq` arrives, keeping packet datagrams in `early`.
    fn await_ack(&self, seq: u32, timeout: Duration, early: &mut Vec<Vec<u8>>) -> Result<(), AckError> {
        let deadline = Instant::now() + timeout;
        let mut batch = RecvBatch::new(4);
        loop {
            match self.recv_batch(&mut batch) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(AckError::Timeout);
                    }
                    let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, ms) };
                    continue;
                }
                // Overrun while configuring: packets were dropped (fail-closed); keep waiting.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) => return Err(AckError::Io(e)),
            }
            for dgram in batch.datagrams().filter_map(|d| d.ok()) {
                let mut is_packet = false;
                for msg in netlink::messages(dgram) {
                    match msg.and_then(|m| netlink::parse_event(&m)).map_err(AckError::Parse)? {
                        Event::Ack { seq: s } if s == seq => return Ok(()),
                        Event::Error { seq: s, errno } if s == seq => {
                            return Err(AckError::Refused(io::Error::from_raw_os_error(errno)));
                        }
                        Event::Packet(_) => is_packet = true,
                        _ => {}
                    }
                }
                if is_packet {
                    early.push(dgram.to_vec());
                }
            }
        }
    }
}

enum AckError {
    Refused(io::Error),
    Timeout,
    Io(io::Error),
    Parse(ParseError),
}

impl AckError {
    fn into_queue_error(self, queue: u16, step: &'static str, timeout: Duration) -> QueueError {
        match self {
            AckError::Refused(source) => QueueError::Refused { queue, step, source },
            AckError::Timeout => QueueError::Timeout { queue, step, timeout },
            AckError::Io(source) => QueueError::Io { call: "recvmmsg", source },
            AckError::Parse(e) => {
                QueueError::Io { call: "recvmmsg", source: io::Error::new(io::ErrorKind::InvalidData, e) }
            }
        }
    }
}

/// Receive buffers for [`QueueSocket::recv_batch`]: `slots` datagrams of up to [`MAX_MESSAGE_LEN`].
#[derive(Debug)]
pub struct RecvBatch {
    data: Vec<u8>,
    slot_len: usize,
    lens: Vec<usize>,
    truncated: Vec<bool>,
    from_kernel: Vec<bool>,
    count: usize,
}

/// Why a received datagram is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Larger than the receive slot: the kernel cut it (`MSG_TRUNC`).
    #[error("datagram larger than the receive buffer")]
    Truncated,
    /// Not sent by the kernel (another process wrote to our port id).
    #[error("datagram not sent by the kernel")]
    NotFromKernel,
}

impl RecvBatch {
    pub fn new(slots: usize) -> RecvBatch {
        let slots = slots.max(1);
        RecvBatch {
            data: vec![0; slots * MAX_MESSAGE_LEN],
            slot_len: MAX_MESSAGE_LEN,
            lens: vec![0; slots],
            truncated: vec![false; slots],
            from_kernel: vec![false; slots],
            count: 0,
        }
    }

    /// The datagrams of the last receive, in arrival order.
    pub fn datagrams(&self) -> impl Iterator<Item = Result<&[u8], DatagramError>> + '_ {
        (0..self.count).map(move |i| {
            if self.truncated[i] {
                Err(DatagramError::Truncated)
            } else if !self.from_kernel[i] {
                Err(DatagramError::NotFromKernel)
            } else {
                let start = i * self.slot_len;
                Ok(&self.data[start..start + self.lens[i]])
            }
        })
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: value is a c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&raw const value).cast(), mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
