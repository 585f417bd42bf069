//! Linux `TCP_REPAIR`: checkpoint a live TCP socket into a [`RestorePlan`], and
//! rebuild a connection from a plan in this kernel without a handshake, so that
//! the peer never notices the move.
//!
//! Read first: the kernel's `net/ipv4/tcp.c` (`do_tcp_setsockopt` for
//! `TCP_REPAIR*`, `TCP_QUEUE_SEQ`, `TCP_TIMESTAMP`, `tcp_repair_options_est`,
//! `tcp_repair_set_window`; `tcp_recvmsg_locked` and `tcp_peek_sndq` for peeking
//! in repair mode; `__tcp_close` and `tcp_disconnect`), `tcp_output.c`
//! (`tcp_write_xmit` counts bytes written in SEND repair mode as in flight
//! without transmitting them; `tcp_connect` skips the handshake;
//! `tcp_send_window_probe`), and CRIU's libsoccr (`criu/soccr/soccr.c`), whose
//! restore order this module follows.
//!
//! Kernel behaviour relied on (seen on 6.18):
//! * `TCP_REPAIR` needs `CAP_NET_ADMIN` in the socket's network namespace;
//!   replaying the peer's FIN (or its ACK of ours) needs `CAP_NET_RAW` too.
//! * Repair mode does not silence a socket: its timers still retransmit and
//!   segments that arrive are processed and acknowledged. A checkpoint is only
//!   consistent while nothing arrives (the product holds inbound segments), and
//!   a held socket should be [`vanish`]ed promptly.
//! * Closing or disconnecting a socket in repair mode emits neither FIN nor RST.
//! * With `IP_TRANSPARENT`, a socket binds and, in repair mode, connects from an
//!   address this host does not have ([`stage`]); leaving repair mode sends
//!   nothing with `TCP_REPAIR_OFF_NO_WP`, so that may happen before the address
//!   arrives, as long as nothing is written until it has.
//! * `TCP_MAXSEG` read in repair mode returns `mss_clamp`: the MSS the peer
//!   advertised in its SYN (limited by a `TCP_MAXSEG` set on the socket).
//! * The low bit of a `TCP_TIMESTAMP` value flags microsecond timestamps (since
//!   6.7): the kernel reports millisecond clocks with the bit cleared, and a
//!   restore must pass it cleared.
//! * Leaving repair mode with `TCP_REPAIR_OFF` sends a window probe and sets
//!   `snd_wl1` to `rcv_nxt - 1`, so that the peer's answer refreshes the window.
//!   It also drops the forced address reuse to none: `restore` sets `SO_REUSEADDR`
//!   afterwards, so a listener with `SO_REUSEADDR` can bind the same port later.
//! * A segment sent through a raw socket to a local address is delivered to the
//!   local socket as if it came from the wire. It carries [`INJECT_MARK`] as its
//!   `SO_MARK`, so a firewall rule that holds inbound traffic during a takeover
//!   can let it through.
//!
//! How the plan's fields map to the kernel (`checkpoint` reports, `restore`
//! expects):
//! * `snd_una` is the kernel's `snd_una`. In FIN_WAIT2 our FIN is acknowledged,
//!   so it sits at `snd_una - 1` and `snd_nxt()` counts it twice. The tracker
//!   uses the same convention.
//! * `fin_sent`: our FIN was transmitted (it lies before `snd_nxt`). FIN_WAIT1,
//!   LAST_ACK or CLOSING with `fin_sent == false` means the application shut
//!   down writing but the FIN has not left yet (it waits behind `unsent`, or for
//!   window): `restore` queues it after `unsent`.
//! * `rcv_nxt` excludes a received FIN. `window.rcv_wup` is never after
//!   `rcv_nxt`: when the kernel's is (it counted the FIN), it is moved back and
//!   `rcv_wnd` grown by as much, which keeps the window's right edge.
//! * `options.mss` is `mss_clamp` (above); `tsval` may be 1 ms behind (above);
//!   `ts_recent` cannot be read from the kernel and is always `None`.
//! * `unsent`: bytes the application wrote that never left (`SIOCOUTQNSD`).
//!
//! A plan without window scaling is restored with `TCP_WINDOW_CLAMP` at 65535
//! before `connect`; otherwise the kernel picks a receive scale from its sysctls
//! and would scale windows that the peer reads unscaled.
//!
//! Supported: IPv4 connections in ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT,
//! LAST_ACK and CLOSING, except CLOSING with our FIN behind unsent bytes (the
//! FIN must be queued before the peer's is replayed, and nothing can be written
//! after it). Not carried over: urgent data, TCP-MD5/AO, ECN state, congestion
//! state (the restored socket starts with a fresh RTO and window), and
//! microsecond timestamps.

use crate::plan::{NoSource, PlanOptions, Queue, QueueSource, RepairWindow, RestorePlan, TcpState};
use crate::segment::{SegmentBuilder, TcpFlags, TcpOptions, Timestamps};
use crate::seq::Seq;
use crate::tracker::Dir;
use libc::{c_int, c_void, socklen_t};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use std::io;
use std::mem::size_of;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// `SO_MARK` of the segments `restore` injects to replay the peer's FIN or ACK.
pub const INJECT_MARK: u32 = 0x7573_7464;

// Kernel ABI (include/uapi/linux/tcp.h) that libc does not carry.
const TCP_REPAIR_ON: c_int = 1;
const TCP_REPAIR_OFF: c_int = 0;
/// `TCP_RTO_MAX_MS` (Linux 6.15+; not in libc yet): the socket's largest retransmission timeout.
const TCP_RTO_MAX_MS: c_int = 44;
/// The largest retransmission timeout of a restored socket, in milliseconds.
pub const RESTORED_RTO_MAX_MS: c_int = 3000;
/// Leave repair mode without sending the window probe `TCP_REPAIR_OFF` sends.
const TCP_REPAIR_OFF_NO_WP: c_int = -1;
const TCP_NO_QUEUE: c_int = 0;
const TCP_RECV_QUEUE: c_int = 1;
const TCP_SEND_QUEUE: c_int = 2;
// include/net/tcp.h
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCP_MAX_WSCALE: u8 = 14;
// tcpi_options bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const TCPI_OPT_USEC_TS: u8 = 64;

/// `struct tcp_repair_window` (uapi/linux/tcp.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
struct tcp_repair_window {
    snd_wl1: u32,
    snd_wnd: u32,
    max_window: u32,
    rcv_wnd: u32,
    rcv_wup: u32,
}

/// `struct tcp_repair_opt` (uapi/linux/tcp.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
struct tcp_repair_opt {
    opt_code: u32,
    opt_val: u32,
}

/// The first bytes of `struct tcp_info`: all this module reads.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct TcpInfoHead {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    /// `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4` (low nibble first).
    wscale: u8,
    flags: u8,
}

/// Why a checkpoint or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// A socket call failed; `step` names it (`"TCP_REPAIR_WINDOW"`, `"SIOCOUTQ"`, ...).
    #[error("{step} failed: {source}")]
    Syscall {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel refused for lack of privilege: `needs` names the capability.
    #[error("{step} refused: it needs {needs} in the socket's network namespace ({source})")]
    NotPermitted {
        step: &'static str,
        needs: &'static str,
        #[source]
        source: io::Error,
    },
    /// The plan's local address cannot be bound here (step `bind`): not configured
    /// on this host, or taken by a socket that is not in repair mode.
    #[error("bind {addr} failed (is the address configured on this host?): {source}")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    /// A TCP state that cannot be checkpointed or restored.
    #[error("cannot {action} a socket in state {state:?}: {reason}")]
    UnsupportedState { state: TcpState, action: &'static str, reason: &'static str },
    /// `TCP_INFO` reported a state number this module does not know.
    #[error("kernel reported unknown TCP state {0}")]
    UnknownState(u8),
    /// The connection uses something `TCP_REPAIR` cannot carry over.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// The plan contradicts itself.
    #[error("inconsistent restore plan: {0}")]
    InvalidPlan(String),
    /// The socket kept changing while it was read (segments arriving, the
    /// application using it): no consistent checkpoint.
    #[error("socket kept changing while being checkpointed ({what})")]
    NotQuiescent { what: &'static str },
    /// After restoring, the socket is not in the planned state.
    #[error("restored socket is in state {actual:?}, the plan says {expected:?}")]
    StateMismatch { expected: TcpState, actual: Option<TcpState> },
}

impl RepairError {
    /// The socket call that failed, when a call failed.
    pub fn step(&self) -> Option<&'static str> {
        match self {
            RepairError::Syscall { step, .. } | RepairError::NotPermitted { step, .. } => Some(step),
            RepairError::Bind { .. } => Some("bind"),
            _ => None,
        }
    }

    /// The OS error behind a failed call.
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            RepairError::Syscall { source, .. }
            | RepairError::NotPermitted { source, .. }
            | RepairError::Bind { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn sys(step: &'static str) -> impl FnOnce(io::Error) -> RepairError {
    move |source| RepairError::Syscall { step, source }
}

// ---------------------------------------------------------------------------
// Thin wrappers over the raw calls.

fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    val: &T,
    step: &'static str,
) -> Result<(), RepairError> {
    // SAFETY: `val` points to a live `T` of the size passed.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, val as *const T as *const c_void, size_of::<T>() as socklen_t)
    };
    if r == 0 { Ok(()) } else { Err(sys(step)(io::Error::last_os_error())) }
}

fn setsockopt_slice<T>(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    val: &[T],
    step: &'static str,
) -> Result<(), RepairError> {
    // SAFETY: the slice is live and its byte length is passed.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, val.as_ptr() as *const c_void, size_of_val(val) as socklen_t)
    };
    if r == 0 { Ok(()) } else { Err(sys(step)(io::Error::last_os_error())) }
}

/// Reads a plain-old-data option. Only used with `#[repr(C)]` integer structs.
fn getsockopt<T: Copy + Default>(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    step: &'static str,
) -> Result<T, RepairError> {
    let mut val = T::default();
    let mut len = size_of::<T>() as socklen_t;
    // SAFETY: `val` is a writable `T`; the kernel writes at most `len` bytes.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, &mut val as *mut T as *mut c_void, &mut len) };
    if r != 0 {
        return Err(sys(step)(io::Error::last_os_error()));
    }
    Ok(val)
}

fn tcp_opt(fd: BorrowedFd<'_>, name: c_int, val: c_int, step: &'static str) -> Result<(), RepairError> {
    setsockopt(fd, libc::SOL_TCP, name, &val, step)
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::Ioctl, step: &'static str) -> Result<u32, RepairError> {
    let mut v: c_int = 0;
    // SAFETY: these ioctls write one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut c_int) };
    if r != 0 {
        return Err(sys(step)(io::Error::last_os_error()));
    }
    Ok(v as u32)
}

fn tcp_info(fd: BorrowedFd<'_>) -> Result<TcpInfoHead, RepairError> {
    getsockopt(fd, libc::SOL_TCP, libc::TCP_INFO, "TCP_INFO")
}

fn state_of(info: &TcpInfoHead) -> Result<TcpState, RepairError> {
    TcpState::from_linux(info.state).ok_or(RepairError::UnknownState(info.state))
}

/// The socket's current TCP state.
pub fn tcp_state(sock: &impl AsFd) -> Result<TcpState, RepairError> {
    state_of(&tcp_info(sock.as_fd())?)
}

fn repair_mode(fd: BorrowedFd<'_>, val: c_int) -> Result<(), RepairError> {
    tcp_opt(fd, libc::TCP_REPAIR, val, "TCP_REPAIR").map_err(|e| match e {
        RepairError::Syscall { step, source } if source.raw_os_error() == Some(libc::EPERM) => {
            RepairError::NotPermitted { step, needs: "CAP_NET_ADMIN", source }
        }
        e => e,
    })
}

/// `IP_TRANSPARENT`: the socket may bind, and route from, an address this host does not have.
fn set_transparent(fd: BorrowedFd<'_>, on: bool) -> Result<(), RepairError> {
    setsockopt(fd, libc::SOL_IP, libc::IP_TRANSPARENT, &(on as c_int), "IP_TRANSPARENT").map_err(|e| match e {
        RepairError::Syscall { step, source } if source.raw_os_error() == Some(libc::EPERM) => {
            RepairError::NotPermitted { step, needs: "CAP_NET_ADMIN", source }
        }
        e => e,
    })
}

fn repair_queue(fd: BorrowedFd<'_>, queue: c_int) -> Result<(), RepairError> {
    tcp_opt(fd, libc::TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")
}

fn queue_seq(fd: BorrowedFd<'_>, queue: c_int) -> Result<Seq, RepairError> {
    repair_queue(fd, queue)?;
    let v: u32 = getsockopt(fd, libc::SOL_TCP, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")?;
    Ok(Seq(v))
}

fn set_queue_seq(fd: BorrowedFd<'_>, queue: c_int, seq: Seq) -> Result<(), RepairError> {
    repair_queue(fd, queue)?;
    setsockopt(fd, libc::SOL_TCP, libc::TCP_QUEUE_SEQ, &seq.0, "TCP_QUEUE_SEQ")
}

/// Reads exactly `len` bytes of the current repair queue without consuming them.
/// `None` when the queue does not hold exactly `len` bytes (it changed).
fn peek_queue(fd: BorrowedFd<'_>, len: usize) -> Result<Option<Vec<u8>>, RepairError> {
    if len == 0 {
        return Ok(Some(Vec::new()));
    }
    // One byte more than expected proves the queue holds no more than `len`.
    let mut buf = vec![0u8; len + 1];
    // SAFETY: `buf` is writable for `len + 1` bytes.
    let n = unsafe {
        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut c_void, buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(sys("recv(MSG_PEEK)")(e));
    }
    if n as usize != len {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some(buf))
}

/// The bytes of queue `q` (in direction `dir`), from `source` when the plan left them there.
fn queue_bytes<'a>(
    what: &str,
    q: &'a Queue,
    dir: Dir,
    source: &'a dyn QueueSource,
) -> Result<[&'a [u8]; 2], RepairError> {
    q.pieces(dir, source).ok_or_else(|| match q {
        Queue::InStream(r) => invalid(format!("the {what}'s bytes ({r:?} of the stream) are not in the source given")),
        Queue::Bytes(_) => invalid(format!("the {what} has no bytes")),
    })
}

/// Writes both pieces with [`send_all`].
fn send_pieces(fd: BorrowedFd<'_>, pieces: [&[u8]; 2], step: &'static str) -> Result<(), RepairError> {
    pieces.into_iter().try_for_each(|p| send_all(fd, p, step))
}

/// Writes all of `data` with `send(2)`; `step` names the queue for errors.
fn send_all(fd: BorrowedFd<'_>, mut data: &[u8], step: &'static str) -> Result<(), RepairError> {
    while !data.is_empty() {
        // SAFETY: `data` is a live slice.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data.as_ptr() as *const c_void,
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(sys(step)(e));
        }
        if n == 0 {
            return Err(sys(step)(io::Error::new(io::ErrorKind::WriteZero, "the kernel took no bytes")));
        }
        data = &data[n as usize..];
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Checkpoint.

/// Pauses `sock` (`TCP_REPAIR` on), reads its complete state and resumes it. The
/// connection goes on as if nothing happened: resuming sends nothing.
///
/// Needs `CAP_NET_ADMIN`. The socket must be quiescent while it is read (see the
/// module docs).
pub fn checkpoint(sock: &impl AsFd) -> Result<RestorePlan, RepairError> {
    let fd = sock.as_fd();
    pause(fd)?;
    let plan = read_paused(fd);
    // Resume even when reading failed; the reading error is the one to report.
    let resumed = repair_mode(fd, TCP_REPAIR_OFF_NO_WP);
    let plan = plan?;
    resumed?;
    Ok(plan)
}

/// Like [`checkpoint`], but leaves `sock` in repair mode: the application can
/// no longer read or write it, and closing it sends neither FIN nor RST, so the
/// peer sees nothing. This is "take this socket's state, then make it vanish":
/// follow it with [`vanish`] (or close it) promptly, since repair mode stops
/// neither the socket's retransmission timers nor its processing of arriving
/// segments. [`resume`] brings the socket back instead. On error the socket is
/// resumed.
pub fn checkpoint_and_hold(sock: &impl AsFd) -> Result<RestorePlan, RepairError> {
    let fd = sock.as_fd();
    pause(fd)?;
    match read_paused(fd) {
        Ok(plan) => Ok(plan),
        Err(e) => {
            let _ = repair_mode(fd, TCP_REPAIR_OFF_NO_WP);
            Err(e)
        }
    }
}

/// Disconnects `sock` in repair mode: nothing is sent (no FIN, no RST), the
/// socket reads `ECONNABORTED` from then on, and its four-tuple is free at once.
///
/// Closing a held socket sends nothing either, but frees the four-tuple only
/// when the last reference to the socket goes (a child forked meanwhile holds
/// one until it execs); restoring the same connection on the same host right
/// after needs it free. Puts the socket in repair mode first, so it is never
/// reset by mistake.
pub fn vanish(sock: &impl AsFd) -> Result<(), RepairError> {
    let fd = sock.as_fd();
    let state = state_of(&tcp_info(fd)?)?;
    if state == TcpState::Listen {
        return Err(RepairError::UnsupportedState { state, action: "vanish", reason: "a listener has no peer" });
    }
    repair_mode(fd, TCP_REPAIR_ON)?;
    // SAFETY: a zeroed sockaddr is a valid AF_UNSPEC address.
    let mut unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
    unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // connect(AF_UNSPEC) is tcp_disconnect(), which in repair mode sends nothing.
    // SAFETY: `unspec` is a live sockaddr of the size passed.
    let r = unsafe { libc::connect(fd.as_raw_fd(), &unspec, size_of::<libc::sockaddr>() as socklen_t) };
    if r != 0 {
        return Err(sys("connect(AF_UNSPEC)")(io::Error::last_os_error()));
    }
    Ok(())
}

/// Takes a socket held by [`checkpoint_and_hold`] out of repair mode.
pub fn resume(sock: &impl AsFd) -> Result<(), RepairError> {
    repair_mode(sock.as_fd(), TCP_REPAIR_OFF_NO_WP)
}

fn pause(fd: BorrowedFd<'_>) -> Result<(), RepairError> {
    let state = state_of(&tcp_info(fd)?)?;
    check_supported(state, "checkpoint")?;
    repair_mode(fd, TCP_REPAIR_ON)
}

fn check_supported(state: TcpState, action: &'static str) -> Result<(), RepairError> {
    use TcpState::*;
    let reason = match state {
        Established | FinWait1 | FinWait2 | CloseWait | LastAck | Closing => return Ok(()),
        Listen => "a listening socket has no connection",
        SynSent | SynRecv => "the handshake has not completed",
        TimeWait | Close => "the connection is over",
    };
    Err(RepairError::UnsupportedState { state, action, reason })
}

/// The counters that move when anything happens on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    state: TcpState,
    options: u8,
    wscale: u8,
    rcv_nxt: Seq,
    write_seq: Seq,
    outq: u32,
    notsent: u32,
    inq: u32,
    window: tcp_repair_window,
}

fn counters(fd: BorrowedFd<'_>) -> Result<Counters, RepairError> {
    let info = tcp_info(fd)?;
    let state = state_of(&info)?;
    check_supported(state, "checkpoint")?;
    Ok(Counters {
        state,
        options: info.options,
        wscale: info.wscale,
        rcv_nxt: queue_seq(fd, TCP_RECV_QUEUE)?,
        write_seq: queue_seq(fd, TCP_SEND_QUEUE)?,
        outq: ioctl_int(fd, libc::TIOCOUTQ, "SIOCOUTQ")?,
        notsent: ioctl_int(fd, libc::SIOCOUTQNSD, "SIOCOUTQNSD")?,
        inq: ioctl_int(fd, libc::FIONREAD, "SIOCINQ")?,
        window: getsockopt(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, "TCP_REPAIR_WINDOW")?,
    })
}

const CHECKPOINT_ATTEMPTS: usize = 5;

fn read_paused(fd: BorrowedFd<'_>) -> Result<RestorePlan, RepairError> {
    let sock = SockRef::from(&fd);
    let local = v4(sock.local_addr().map_err(sys("getsockname"))?)?;
    let remote = v4(sock.peer_addr().map_err(sys("getpeername"))?)?;
    let mut what = "queues";
    for _ in 0..CHECKPOINT_ATTEMPTS {
        let before = counters(fd)?;
        let plan = read_once(fd, &before, local, remote)?;
        let after = counters(fd)?;
        match plan {
            Some(plan) if before == after => {
                repair_queue(fd, TCP_NO_QUEUE)?;
                return Ok(plan);
            }
            Some(_) => what = "counters",
            None => what = "queues",
        }
    }
    Err(RepairError::NotQuiescent { what })
}

fn v4(addr: SockAddr) -> Result<SocketAddrV4, RepairError> {
    match addr.as_socket() {
        Some(SocketAddr::V4(a)) => Ok(a),
        _ => Err(RepairError::Unsupported("only IPv4 sockets can be checkpointed")),
    }
}

/// One reading of everything; `None` when a queue did not match its counter.
fn read_once(
    fd: BorrowedFd<'_>,
    c: &Counters,
    local: SocketAddrV4,
    remote: SocketAddrV4,
) -> Result<Option<RestorePlan>, RepairError> {
    use TcpState::*;
    if c.options & TCPI_OPT_USEC_TS != 0 {
        return Err(RepairError::Unsupported("microsecond TCP timestamps cannot be restored"));
    }
    let fin_queued = matches!(c.state, FinWait1 | FinWait2 | Closing | LastAck);
    let fin_acked = c.state == FinWait2;
    let fin_received = matches!(c.state, CloseWait | LastAck | Closing);

    // outq = write_seq - snd_una and notsent = write_seq - snd_nxt both count
    // a queued FIN while it is unacknowledged (unsent, for notsent).
    let fin_in_outq = (fin_queued && !fin_acked) as u32;
    let Some(data_outq) = c.outq.checked_sub(fin_in_outq) else {
        return Ok(None);
    };
    let fin_unsent = fin_in_outq == 1 && c.notsent > 0;
    let unsent_len = c.notsent - fin_unsent as u32;
    let Some(in_flight) = data_outq.checked_sub(unsent_len) else {
        return Ok(None);
    };
    let snd_una = c.write_seq - c.outq;

    repair_queue(fd, TCP_SEND_QUEUE)?;
    let Some(mut send_queue) = peek_queue(fd, data_outq as usize)? else {
        return Ok(None);
    };
    let unsent = send_queue.split_off(in_flight as usize);

    repair_queue(fd, TCP_RECV_QUEUE)?;
    let Some(recv_queue) = peek_queue(fd, c.inq as usize)? else {
        return Ok(None);
    };
    let rcv_nxt = c.rcv_nxt - fin_received as u32;

    // In repair mode TCP_MAXSEG reports mss_clamp, not the current MSS.
    let mss: c_int = getsockopt(fd, libc::SOL_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")?;
    let timestamps = c.options & TCPI_OPT_TIMESTAMPS != 0;
    // The kernel reports the millisecond clock with its low bit cleared (the bit
    // flags microsecond timestamps), so this may be up to 1 ms behind.
    let tsval = if timestamps {
        Some(getsockopt::<u32>(fd, libc::SOL_TCP, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")?)
    } else {
        None
    };
    let w = c.window;
    let mut window = RepairWindow {
        snd_wl1: Seq(w.snd_wl1),
        snd_wnd: w.snd_wnd,
        max_window: w.max_window,
        rcv_wnd: w.rcv_wnd,
        rcv_wup: Seq(w.rcv_wup),
    };
    // The kernel's rcv_wup may count the peer's FIN, which the plan's rcv_nxt does not.
    let past = window.rcv_wup.diff(rcv_nxt);
    if past > 0 {
        window.rcv_wup = rcv_nxt;
        window.rcv_wnd = window.rcv_wnd.saturating_add(past as u32);
    }

    Ok(Some(RestorePlan {
        local,
        remote,
        state: c.state,
        options: PlanOptions {
            mss: mss.clamp(0, u16::MAX as c_int) as u16,
            wscale: (c.options & TCPI_OPT_WSCALE != 0).then_some((c.wscale & 0x0f, c.wscale >> 4)),
            sack: c.options & TCPI_OPT_SACK != 0,
            timestamps,
        },
        snd_una,
        send_queue: send_queue.into(),
        unsent: unsent.into(),
        rcv_nxt,
        recv_queue: recv_queue.into(),
        fin_sent: fin_queued && !fin_unsent,
        fin_received,
        window,
        tsval,
        ts_recent: None,
    }))
}

// ---------------------------------------------------------------------------
// Restore.

/// What becomes of our FIN in a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OurFin {
    /// The application has not shut down writing.
    None,
    /// Transmitted, not acknowledged: queued in SEND repair mode, counted in flight.
    InFlight,
    /// Transmitted and acknowledged (FIN_WAIT2): queued in flight, then the
    /// peer's ACK of it is replayed.
    Acked,
    /// Never transmitted, behind `unsent`: shut down after writing them.
    AfterUnsent,
    /// Never transmitted, nothing unsent (CLOSING): queued in repair mode
    /// before the peer's FIN is replayed, and transmitted as the kernel can.
    Now,
}

/// How the FINs of a plan are put back, derived from its state by [`shape`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    our_fin: OurFin,
    /// Replay the peer's FIN.
    peer_fin: bool,
    /// The peer's FIN came before ours (LAST_ACK): replay it before queueing ours.
    peer_fin_first: bool,
}

fn invalid(msg: impl Into<String>) -> RepairError {
    RepairError::InvalidPlan(msg.into())
}

fn shape(plan: &RestorePlan) -> Result<Shape, RepairError> {
    use TcpState::*;
    check_supported(plan.state, "restore")?;
    let peer_fin = matches!(plan.state, CloseWait | LastAck | Closing);
    if plan.fin_received != peer_fin {
        return Err(invalid(format!("fin_received is {} in state {:?}", plan.fin_received, plan.state)));
    }
    let closed_by_us = matches!(plan.state, FinWait1 | FinWait2 | LastAck | Closing);
    if plan.fin_sent && !closed_by_us {
        return Err(invalid(format!("fin_sent in state {:?}", plan.state)));
    }
    if plan.fin_sent && !plan.unsent.is_empty() {
        return Err(invalid("fin_sent with unsent bytes (they would follow the FIN)"));
    }
    let our_fin = match plan.state {
        Established | CloseWait => OurFin::None,
        FinWait2 if !plan.fin_sent => return Err(invalid("FIN_WAIT2 needs fin_sent")),
        FinWait2 if !(plan.send_queue.is_empty() && plan.unsent.is_empty()) => {
            return Err(invalid("FIN_WAIT2 (our FIN acknowledged) with bytes still queued"));
        }
        FinWait2 => OurFin::Acked,
        _ if plan.fin_sent => OurFin::InFlight,
        Closing if !plan.unsent.is_empty() => {
            return Err(RepairError::UnsupportedState {
                state: Closing,
                action: "restore",
                reason: "our FIN is queued behind unsent bytes: CLOSING can only be rebuilt \
                         with the FIN queued before the peer's, and nothing can be written after it",
            });
        }
        Closing => OurFin::Now,
        _ => OurFin::AfterUnsent,
    };
    if let Some((snd, rcv)) = plan.options.wscale
        && (snd > TCP_MAX_WSCALE || rcv > TCP_MAX_WSCALE)
    {
        return Err(invalid(format!("window scale ({snd}, {rcv}) above {TCP_MAX_WSCALE}")));
    }
    for (what, a) in [("local", plan.local), ("remote", plan.remote)] {
        // Port 0 would bind an ephemeral port: a different connection.
        if a.port() == 0 || a.ip().is_unspecified() {
            return Err(invalid(format!("{what} address {a} is not a connection endpoint")));
        }
    }
    if plan.options.mss == 0 {
        return Err(invalid("options.mss is 0"));
    }
    if plan.options.timestamps && plan.tsval.is_none() {
        return Err(invalid("timestamps negotiated but no tsval to continue from"));
    }
    if plan.window.max_window < plan.window.snd_wnd {
        return Err(invalid("window.max_window below window.snd_wnd"));
    }
    Ok(Shape { our_fin, peer_fin, peer_fin_first: plan.state == LastAck })
}

/// How long `restore` waits for the kernel to process an injected segment.
const INJECT_DEADLINE: Duration = Duration::from_secs(2);

/// Rebuilds the server end of the connection described by `plan` in this kernel
/// and returns it as a connected, blocking stream. No handshake happens. The
/// peer sees the window probe that ends repair mode (which prompts it to
/// acknowledge, and so resynchronises the window; skipped when the socket has
/// nothing to send and no FIN to finish), the ACK of a replayed FIN,
/// the plan's `unsent` bytes and a FIN that had not left yet; bytes in flight
/// are retransmitted on the restored socket's timers (its RTO starts at 1 s: it
/// has no RTT sample).
///
/// `plan.local` must be an address of this host (bound in repair mode, which
/// ignores port conflicts, even with a listener, but not a missing address), and
/// no other socket may hold the same four-tuple. The peer's segments should be
/// held back until this returns: one arriving before the socket exists is
/// answered with a RST by the kernel.
///
/// Needs `CAP_NET_ADMIN`, and `CAP_NET_RAW` when the plan says the peer's FIN
/// (or its ACK of ours) was received. On error the half-built socket is closed
/// in repair mode, which sends nothing.
pub fn restore(plan: &RestorePlan) -> Result<TcpStream, RepairError> {
    rebuild(plan, Type::STREAM, &NoSource, Unsent::Write).map(|(stream, _)| stream)
}

/// [`restore`], returning a non-blocking stream (for an event loop). The socket is created
/// non-blocking: a takeover of thousands of connections saves a system call on each.
pub fn restore_nonblocking(plan: &RestorePlan) -> Result<TcpStream, RepairError> {
    restore_nonblocking_from(plan, &NoSource)
}

/// [`restore_nonblocking`] of a plan whose queues may be left in a tracker's streams
/// ([`Tracker::restore_plan_in_place`](crate::Tracker::restore_plan_in_place)): they are written from
/// `source`, the tracker the plan was made from.
pub fn restore_nonblocking_from(plan: &RestorePlan, source: &dyn QueueSource) -> Result<TcpStream, RepairError> {
    // In repair mode connect() completes at once, so it does not return EINPROGRESS here.
    rebuild(plan, Type::STREAM.nonblocking(), source, Unsent::Write).map(|(stream, _)| stream)
}

/// [`restore_nonblocking_from`], except that the plan's unsent bytes, when no FIN of ours follows them, are
/// left for the caller to write, before anything else, as an application write after the restore: a
/// takeover of many busy connections spends most of its restore copying such bytes into sockets, which
/// their clients (slow readers, mostly, or they would not have so many) can wait a few milliseconds for.
/// The socket's buffer is sized for them meanwhile; [`UnsentLeft::written`] hands it back to the kernel's
/// autotuning once they are written. `None` when nothing was left (none unsent, or a FIN follows them).
pub fn restore_nonblocking_leaving_unsent(
    plan: &RestorePlan,
    source: &dyn QueueSource,
) -> Result<(TcpStream, Option<UnsentLeft>), RepairError> {
    rebuild(plan, Type::STREAM.nonblocking(), source, Unsent::Leave)
}

/// The unsent bytes [`restore_nonblocking_leaving_unsent`] left to the caller. The default has nothing to
/// hand back (no buffer size was forced for them).
#[derive(Debug, Default)]
#[must_use = "the socket's buffer stays forced to the size of the bytes left until `written`"]
pub struct UnsentLeft {
    forced_buffers: bool,
}

impl UnsentLeft {
    /// The bytes left are written into `sock`: its buffer sizes go back to the kernel's autotuning.
    pub fn written(self, sock: &impl AsFd) -> Result<(), RepairError> {
        if self.forced_buffers { release_buffers(sock.as_fd()) } else { Ok(()) }
    }
}

/// What a restore does with the plan's unsent bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unsent {
    Write,
    /// Leave them to the caller when no FIN of ours follows them.
    Leave,
}

fn rebuild(
    plan: &RestorePlan,
    ty: Type,
    source: &dyn QueueSource,
    unsent: Unsent,
) -> Result<(TcpStream, Option<UnsentLeft>), RepairError> {
    // Found before the socket is made: a plan whose bytes are not all there restores nothing.
    let bytes = queue_bytes("unsent bytes", &plan.unsent, Dir::ToClient, source)?;
    let built = build_in_repair(plan, ty, source, Bind::Local)?;
    let leave = unsent == Unsent::Leave && !plan.unsent.is_empty() && built.shape.our_fin == OurFin::None;
    if leave {
        let forced_buffers = built.unlock;
        let stream = leave_repair(InRepair { unlock: false, ..built }, plan, [&[], &[]])?;
        Ok((stream, Some(UnsentLeft { forced_buffers })))
    } else {
        Ok((leave_repair(built, plan, bytes)?, None))
    }
}

/// Where [`build_in_repair`] may bind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bind {
    /// `plan.local` is an address of this host.
    Local,
    /// `plan.local` need not be on this host yet (`IP_TRANSPARENT`, which also lets `connect` route from it).
    Anywhere,
}

/// A socket [`build_in_repair`] made: still in repair mode, so it sends nothing.
struct InRepair {
    sock: Socket,
    shape: Shape,
    /// The buffer sizes were forced (and must be handed back to autotuning).
    unlock: bool,
}

/// The part of a restore done in repair mode: the socket bound, connected, with its options, queues,
/// window and FINs, in the plan's state, sending nothing yet.
fn build_in_repair(
    plan: &RestorePlan,
    ty: Type,
    source: &dyn QueueSource,
    bind: Bind,
) -> Result<InRepair, RepairError> {
    let shape = shape(plan)?;
    let recv_queue = queue_bytes("receive queue", &plan.recv_queue, Dir::ToServer, source)?;
    let send_queue = queue_bytes("send queue", &plan.send_queue, Dir::ToClient, source)?;
    let sock = Socket::new(Domain::IPV4, ty, Some(Protocol::TCP)).map_err(sys("socket"))?;
    let fd = sock.as_fd();
    // Repair mode forces address reuse (SK_FORCE_REUSE: even next to a listener
    // on the same port). SO_REUSEADDR would downgrade that, so it is not set.
    repair_mode(fd, TCP_REPAIR_ON)?;
    if bind == Bind::Anywhere {
        set_transparent(fd, true)?;
    }
    let unlock = size_buffers(&sock, plan)?;
    if plan.options.wscale.is_none() {
        // Keeps the receive scale the kernel picks at connect() at 0.
        tcp_opt(fd, libc::TCP_WINDOW_CLAMP, u16::MAX as c_int, "TCP_WINDOW_CLAMP")?;
    }
    // connect() computes the segment size from mss_clamp, which TCP_REPAIR_OPTIONS
    // sets only afterwards: without this the restored socket sends 536-byte segments.
    tcp_opt(fd, libc::TCP_MAXSEG, plan.options.mss as c_int, "TCP_MAXSEG")?;
    sock.bind(&SockAddr::from(plan.local)).map_err(|source| RepairError::Bind { addr: plan.local, source })?;

    // In FIN_WAIT2 snd_una counts our acknowledged FIN.
    let data_una = plan.snd_una - (shape.our_fin == OurFin::Acked) as u32;
    set_queue_seq(fd, TCP_RECV_QUEUE, plan.recv_queue_seq())?;
    set_queue_seq(fd, TCP_SEND_QUEUE, data_una)?;
    // In repair mode connect() only hashes the socket and marks it established.
    sock.connect(&SockAddr::from(plan.remote)).map_err(sys("connect"))?;

    set_options(fd, plan)?;
    if plan.options.timestamps {
        // The value's low bit selects microsecond timestamps (Linux 6.7+): keep it
        // clear, rounding up so the clock never goes back (the peer's PAWS).
        let tsval = plan.tsval.unwrap_or_default().wrapping_add(1) & !1;
        setsockopt(fd, libc::SOL_TCP, libc::TCP_TIMESTAMP, &tsval, "TCP_TIMESTAMP")?;
    }

    if !plan.recv_queue.is_empty() {
        repair_queue(fd, TCP_RECV_QUEUE)?;
        send_pieces(fd, recv_queue, "send(receive queue)")?;
    }
    if !plan.send_queue.is_empty() {
        repair_queue(fd, TCP_SEND_QUEUE)?;
        send_pieces(fd, send_queue, "send(send queue)")?;
    }
    let window = repair_window(plan);
    setsockopt(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &window, "TCP_REPAIR_WINDOW")?;

    let mut injector = None;
    if shape.peer_fin && shape.peer_fin_first {
        replay_peer_fin(fd, plan, &mut injector, TcpState::CloseWait)?;
    }
    match shape.our_fin {
        OurFin::InFlight | OurFin::Acked => {
            // In SEND repair mode the FIN is queued as already transmitted.
            repair_queue(fd, TCP_SEND_QUEUE)?;
            sock.shutdown(std::net::Shutdown::Write).map_err(sys("shutdown(SHUT_WR)"))?;
        }
        OurFin::Now => {
            repair_queue(fd, TCP_NO_QUEUE)?;
            sock.shutdown(std::net::Shutdown::Write).map_err(sys("shutdown(SHUT_WR)"))?;
        }
        OurFin::None | OurFin::AfterUnsent => {}
    }
    if shape.our_fin == OurFin::Acked {
        let mut ack = SegmentBuilder::new(plan.remote, plan.local);
        ack.flags = TcpFlags::ACK;
        ack.seq = plan.rcv_nxt;
        ack.ack = plan.snd_una;
        inject(fd, plan, &mut injector, ack, TcpState::FinWait2)?;
    }
    if shape.peer_fin && !shape.peer_fin_first {
        let ours = matches!(shape.our_fin, OurFin::InFlight | OurFin::Now);
        replay_peer_fin(fd, plan, &mut injector, if ours { TcpState::Closing } else { TcpState::CloseWait })?;
    }
    if injector.is_some() {
        // The injected segment set the send window from its own fields: put the plan's back.
        let now: tcp_repair_window = getsockopt(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, "TCP_REPAIR_WINDOW")?;
        let fixed = tcp_repair_window { rcv_wnd: now.rcv_wnd, rcv_wup: now.rcv_wup, ..window };
        setsockopt(fd, libc::SOL_TCP, libc::TCP_REPAIR_WINDOW, &fixed, "TCP_REPAIR_WINDOW")?;
    }

    let before_unsent = match shape.our_fin {
        OurFin::AfterUnsent if shape.peer_fin => TcpState::CloseWait,
        OurFin::AfterUnsent => TcpState::Established,
        _ => plan.state,
    };
    // Until its FINs are replayed a connection is ESTABLISHED once connect() in repair mode returned, so
    // only the FIN steps above are checked: TCP_INFO is the dearest call of a restore, and a takeover
    // makes thousands. (The queue selected last needs no reset: only repair mode consults it.)
    if shape.peer_fin || !matches!(shape.our_fin, OurFin::None | OurFin::AfterUnsent) {
        expect_state(fd, before_unsent)?;
    }
    Ok(InRepair { sock, shape, unlock })
}

/// The rest of a restore: out of repair mode (with a window probe unless the connection is quiet), then
/// the unsent bytes and a FIN that follows them.
fn leave_repair(built: InRepair, plan: &RestorePlan, unsent: [&[u8]; 2]) -> Result<TcpStream, RepairError> {
    let InRepair { sock, shape, unlock } = built;
    let fd = sock.as_fd();
    // Ends repair mode with a window probe: the peer answers with an ACK, which
    // resynchronises its window and prompts retransmission of anything lost. A connection
    // with nothing to send and no FIN to finish learns nothing from it (the client's window
    // comes with its next segment) and goes without: at a takeover of thousands of idle
    // keep-alive connections each probe and its answer cost a trip through both stacks.
    let quiet = shape.our_fin == OurFin::None && plan.send_queue.is_empty() && plan.unsent.is_empty();
    repair_mode(fd, if quiet { TCP_REPAIR_OFF_NO_WP } else { TCP_REPAIR_OFF })?;
    // The peer's answer to that probe echoes the timestamp of the last segment it accepted, which may be
    // seconds old (its data stopped with the failure, or with several in a row), and Linux takes it as
    // the first RTT sample of a socket that has none: the retransmission timeout would grow to that many
    // seconds and a connection missing bytes would crawl. Capping it (Linux 6.15+; older kernels refuse
    // the option, and go without) bounds the wait until real samples bring the estimate down. A quiet
    // socket sends no probe, and its first sample is the ACK of data it sends later, which echoes a fresh
    // timestamp: it goes without the call (one in 16 of an idle connection's restore).
    if !quiet {
        let _ = tcp_opt(fd, TCP_RTO_MAX_MS, RESTORED_RTO_MAX_MS, "TCP_RTO_MAX_MS");
    }
    // Out of repair mode the socket has no address reuse at all (SK_NO_REUSE), so a listener could no
    // longer bind its port. With SO_REUSEADDR it is like a socket accepted from such a listener.
    sock.set_reuse_address(true).map_err(sys("SO_REUSEADDR"))?;
    send_pieces(fd, unsent, "send(unsent)")?;
    if shape.our_fin == OurFin::AfterUnsent {
        sock.shutdown(std::net::Shutdown::Write).map_err(sys("shutdown(SHUT_WR)"))?;
    }
    if unlock {
        release_buffers(fd)?;
    }
    Ok(sock.into())
}

/// Sets the buffer sizes back to the defaults, then to the kernel's autotuning. Forced sizes would stay:
/// autotuning only grows a buffer, so a connection restored with a large queue would keep a send buffer
/// large enough for it forever (and the next takeover's queue, and buffer, larger still).
fn release_buffers(fd: BorrowedFd<'_>) -> Result<(), RepairError> {
    let (snd, rcv) = default_buffer_sizes();
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &(snd / 2), "SO_SNDBUF")?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(rcv / 2), "SO_RCVBUF")?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_BUF_LOCK, &(0 as c_int), "SO_BUF_LOCK")
}

/// Whether [`restore`] sends nothing for `plan`: the connection is open both ways (no FIN to replay,
/// whose ACK would go out) with nothing of ours to send or in flight, so it also leaves repair mode
/// without a window probe. An invalid plan, which `restore` refuses, sends nothing either. Such a
/// connection may be restored before the address is announced: no answer can go astray.
pub fn restores_silently(plan: &RestorePlan) -> bool {
    let open = shape(plan).map_or(true, |s| s.our_fin == OurFin::None && !s.peer_fin);
    open && plan.send_queue.is_empty() && plan.unsent.is_empty()
}

/// The socket of an idle connection rebuilt ahead of need by [`stage`], still in repair mode: it holds
/// the connection's four-tuple and sends nothing, whatever arrives (a connection's segments reach it
/// only once its address is on this host). [`Staged::finish`] makes it the socket [`restore`] would
/// have made; dropping it closes it silently (a socket in repair mode closes without FIN or RST).
#[derive(Debug)]
pub struct Staged {
    sock: Socket,
    plan: RestorePlan,
    at: Instant,
}

/// Rebuilds, in repair mode, the socket of an idle connection (open both ways, nothing queued either
/// way, see [`restores_silently`]) before the connection is needed here, and leaves it there, where
/// it sends nothing. `plan.local` need not be an address of this host yet (`IP_TRANSPARENT`: binds
/// and routes from it anyway). Taking it over later is three system calls ([`Staged::finish`]) instead
/// of the score a [`restore`] makes, and the socket's timestamp clock runs on meanwhile as the plan's
/// does. Needs `CAP_NET_ADMIN`.
pub fn stage(plan: &RestorePlan) -> Result<Staged, RepairError> {
    if plan.state != TcpState::Established || !restores_silently(plan) || !plan.recv_queue.is_empty() {
        return Err(invalid(format!(
            "only an idle connection can be staged (ESTABLISHED with nothing queued); this one is {:?} with \
             {} bytes in flight, {} unsent and {} unread",
            plan.state,
            plan.send_queue.len(),
            plan.unsent.len(),
            plan.recv_queue.len()
        )));
    }
    let built = build_in_repair(plan, Type::STREAM.nonblocking(), &NoSource, Bind::Anywhere)?;
    Ok(Staged { sock: built.sock, plan: plan.clone(), at: Instant::now() })
}

impl Staged {
    /// The plan the socket was built from.
    pub fn plan(&self) -> &RestorePlan {
        &self.plan
    }

    /// Whether this socket is the one `plan` (of the same connection, made now) would restore: the
    /// connection has not moved since it was staged.
    pub fn fits(&self, plan: &RestorePlan) -> bool {
        staged_fits(&self.plan, plan, self.at.elapsed())
    }

    /// `TCP_NODELAY`, set ahead like the rest.
    pub fn set_nodelay(&self, on: bool) -> Result<(), RepairError> {
        self.sock.set_tcp_nodelay(on).map_err(sys("TCP_NODELAY"))
    }

    /// Takes the socket out of repair mode, without a window probe, as [`restore`] would have left it.
    /// It sends nothing by itself (no window probe, no timer armed), but its address must be on this host
    /// before anything is written to it: it no longer routes from elsewhere. On error the socket is
    /// closed, silently unless the error came after it left repair mode.
    pub fn finish(self) -> Result<TcpStream, RepairError> {
        let fd = self.sock.as_fd();
        set_transparent(fd, false)?;
        let shape = shape(&self.plan)?;
        leave_repair(InRepair { sock: self.sock, shape, unlock: false }, &self.plan, [&[], &[]])
    }
}

/// Whether a socket staged from `staged`, `elapsed` ago, is what `now` would restore: the same
/// connection in every field but the timestamps, and, with timestamps, its clock (set from
/// `staged.tsval` and running since) not behind `now.tsval` by more than a tick. A client drops
/// segments whose timestamp is older than the last it saw (PAWS); being ahead is harmless.
/// `ts_recent` is not restored, so it does not count.
fn staged_fits(staged: &RestorePlan, now: &RestorePlan, elapsed: Duration) -> bool {
    let same = staged.local == now.local
        && staged.remote == now.remote
        && staged.state == now.state
        && staged.options == now.options
        && staged.snd_una == now.snd_una
        && staged.rcv_nxt == now.rcv_nxt
        && staged.send_queue.is_empty()
        && now.send_queue.is_empty()
        && staged.recv_queue.is_empty()
        && now.recv_queue.is_empty()
        && staged.unsent.is_empty()
        && now.unsent.is_empty()
        && staged.fin_sent == now.fin_sent
        && staged.fin_received == now.fin_received
        && staged.window == now.window;
    let clock = match (staged.tsval, now.tsval) {
        (Some(then), Some(want)) => {
            let runs_at = then.wrapping_add(elapsed.as_millis() as u32);
            want.wrapping_sub(runs_at) as i32 <= 1
        }
        (a, b) => a.is_none() && b.is_none(),
    };
    same && clock
}

/// The initial send and receive buffer sizes of a TCP socket (`tcp_wmem[1]`, `tcp_rmem[1]`, as
/// `SO_SNDBUF`/`SO_RCVBUF` read them), from the calling thread's network namespace; the kernel's
/// built-in defaults when they cannot be read.
fn default_buffer_sizes() -> (c_int, c_int) {
    let middle = |path: &str, fallback: c_int| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(fallback)
    };
    (middle("/proc/sys/net/ipv4/tcp_wmem", 16 * 1024), middle("/proc/sys/net/ipv4/tcp_rmem", 128 * 1024))
}

/// Grows the socket buffers when the plan's queues would not fit the defaults.
/// Returns whether the buffer sizes were locked (and must be unlocked).
fn size_buffers(sock: &Socket, plan: &RestorePlan) -> Result<bool, RepairError> {
    // Per-skb overhead is well under a quarter with page fragments.
    let need = |bytes: usize| bytes + bytes / 4 + 64 * 1024;
    let mut locked = false;
    let snd = plan.send_queue.len() + plan.unsent.len();
    if snd > 0 && need(snd) > sock.send_buffer_size().map_err(sys("SO_SNDBUF"))? {
        // The kernel doubles the value; FORCE ignores net.core.wmem_max.
        let v = need(snd).min(c_int::MAX as usize / 2) as c_int;
        setsockopt(sock.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &v, "SO_SNDBUFFORCE")?;
        locked = true;
    }
    let rcv = plan.recv_queue.len();
    if rcv > 0 && need(rcv) > sock.recv_buffer_size().map_err(sys("SO_RCVBUF"))? {
        let v = need(rcv).min(c_int::MAX as usize / 2) as c_int;
        setsockopt(sock.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &v, "SO_RCVBUFFORCE")?;
        locked = true;
    }
    Ok(locked)
}

fn set_options(fd: BorrowedFd<'_>, plan: &RestorePlan) -> Result<(), RepairError> {
    let o = &plan.options;
    let mut opts = Vec::with_capacity(4);
    if o.sack {
        opts.push(tcp_repair_opt { opt_code: TCPOPT_SACK_PERM, opt_val: 0 });
    }
    if let Some((snd, rcv)) = o.wscale {
        opts.push(tcp_repair_opt { opt_code: TCPOPT_WINDOW, opt_val: snd as u32 | (rcv as u32) << 16 });
    }
    if o.timestamps {
        opts.push(tcp_repair_opt { opt_code: TCPOPT_TIMESTAMP, opt_val: 0 });
    }
    opts.push(tcp_repair_opt { opt_code: TCPOPT_MAXSEG, opt_val: o.mss as u32 });
    setsockopt_slice(fd, libc::SOL_TCP, libc::TCP_REPAIR_OPTIONS, &opts, "TCP_REPAIR_OPTIONS")
}

/// The plan's window in kernel form, with `rcv_wup` kept at or before `rcv_nxt`
/// (the kernel refuses anything later) without moving the window's right edge.
fn repair_window(plan: &RestorePlan) -> tcp_repair_window {
    let w = &plan.window;
    let (mut rcv_wup, mut rcv_wnd) = (w.rcv_wup, w.rcv_wnd);
    let past = rcv_wup.diff(plan.rcv_nxt);
    if past > 0 {
        rcv_wup = plan.rcv_nxt;
        rcv_wnd = rcv_wnd.saturating_add(past as u32);
    }
    tcp_repair_window {
        snd_wl1: w.snd_wl1.0,
        snd_wnd: w.snd_wnd,
        max_window: w.max_window,
        rcv_wnd,
        rcv_wup: rcv_wup.0,
    }
}

fn replay_peer_fin(
    fd: BorrowedFd<'_>,
    plan: &RestorePlan,
    injector: &mut Option<Socket>,
    expect: TcpState,
) -> Result<(), RepairError> {
    let mut fin = SegmentBuilder::new(plan.remote, plan.local);
    fin.flags = TcpFlags::FIN | TcpFlags::ACK;
    fin.seq = plan.rcv_nxt;
    // Acknowledges nothing new: in CLOSING our FIN stays unacknowledged.
    fin.ack = plan.snd_una;
    inject(fd, plan, injector, fin, expect)
}

/// Sends `seg` (from the peer's address) to the restored socket through a raw
/// socket, and waits until the kernel has processed it (the state is `expect`).
fn inject(
    fd: BorrowedFd<'_>,
    plan: &RestorePlan,
    injector: &mut Option<Socket>,
    mut seg: SegmentBuilder,
    expect: TcpState,
) -> Result<(), RepairError> {
    let shift = plan.options.wscale.map_or(0, |(snd, _)| snd);
    seg.window = (plan.window.snd_wnd >> shift).min(u16::MAX as u32) as u16;
    let mut opts = TcpOptions::default();
    if plan.options.timestamps {
        // TSval 0 passes PAWS on a fresh socket and leaves ts_recent at 0, which
        // PAWS ignores, so the peer's next real timestamp is accepted whatever it is.
        let ecr: u32 = getsockopt(fd, libc::SOL_TCP, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")?;
        opts.timestamps = Some(Timestamps { val: 0, ecr });
    }
    seg.options = opts;
    let packet = seg.build(&[]);

    if injector.is_none() {
        let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).map_err(|source| {
            if source.raw_os_error() == Some(libc::EPERM) {
                RepairError::NotPermitted { step: "socket(SOCK_RAW)", needs: "CAP_NET_RAW", source }
            } else {
                sys("socket(SOCK_RAW)")(source)
            }
        })?;
        raw.set_mark(INJECT_MARK).map_err(sys("SO_MARK"))?;
        *injector = Some(raw);
    }
    let raw = injector.as_ref().expect("set above");
    let dst = SockAddr::from(SocketAddrV4::new(*plan.local.ip(), 0));
    let n = raw.send_to(&packet, &dst).map_err(sys("sendto(SOCK_RAW)"))?;
    if n != packet.len() {
        return Err(sys("sendto(SOCK_RAW)")(io::Error::new(io::ErrorKind::WriteZero, "short write")));
    }
    let deadline = Instant::now() + INJECT_DEADLINE;
    loop {
        let state = state_of(&tcp_info(fd)?)?;
        if state == expect {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RepairError::StateMismatch { expected: expect, actual: Some(state) });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn expect_state(fd: BorrowedFd<'_>, expected: TcpState) -> Result<(), RepairError> {
    let info = tcp_info(fd)?;
    let actual = TcpState::from_linux(info.state);
    if actual == Some(expected) { Ok(()) } else { Err(RepairError::StateMismatch { expected, actual }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(state: TcpState) -> RestorePlan {
        RestorePlan { state, ts_recent: None, ..crate::plan::sample_plan() }
    }

    #[test]
    fn kernel_structs_have_the_uapi_layout() {
        assert_eq!(size_of::<tcp_repair_window>(), 20);
        assert_eq!(size_of::<tcp_repair_opt>(), 8);
        assert_eq!(size_of::<TcpInfoHead>(), 8);
    }

    #[test]
    fn established_plan_has_no_fins_to_replay() {
        let s = shape(&plan(TcpState::Established)).unwrap();
        assert_eq!(s, Shape { our_fin: OurFin::None, peer_fin: false, peer_fin_first: false });
    }

    #[test]
    fn half_closed_states_map_to_fin_replays() {
        let mut p = plan(TcpState::FinWait2);
        p.fin_sent = true;
        p.send_queue = Queue::default();
        assert_eq!(shape(&p).unwrap(), Shape { our_fin: OurFin::Acked, peer_fin: false, peer_fin_first: false });

        let mut p = plan(TcpState::CloseWait);
        p.fin_received = true;
        assert_eq!(shape(&p).unwrap(), Shape { our_fin: OurFin::None, peer_fin: true, peer_fin_first: false });

        let mut p = plan(TcpState::LastAck);
        p.fin_sent = true;
        p.fin_received = true;
        assert_eq!(shape(&p).unwrap(), Shape { our_fin: OurFin::InFlight, peer_fin: true, peer_fin_first: true });

        let mut p = plan(TcpState::Closing);
        p.fin_sent = true;
        p.fin_received = true;
        assert_eq!(shape(&p).unwrap(), Shape { our_fin: OurFin::InFlight, peer_fin: true, peer_fin_first: false });

        // CLOSING whose FIN never left: queued again before the peer's FIN.
        p.fin_sent = false;
        assert_eq!(shape(&p).unwrap().our_fin, OurFin::Now);
        // ... which cannot be done with bytes to write before it.
        p.unsent = b"tail".to_vec().into();
        assert!(matches!(shape(&p), Err(RepairError::UnsupportedState { state: TcpState::Closing, .. })));

        // The application shut down while bytes were unsent: the FIN follows them.
        let mut p = plan(TcpState::FinWait1);
        p.unsent = b"tail".to_vec().into();
        assert_eq!(shape(&p).unwrap().our_fin, OurFin::AfterUnsent);
    }

    #[test]
    fn contradictory_plans_are_refused() {
        let mut p = plan(TcpState::FinWait2);
        p.fin_sent = true;
        assert!(matches!(shape(&p), Err(RepairError::InvalidPlan(_))), "FIN_WAIT2 with a send queue");

        let mut p = plan(TcpState::Established);
        p.fin_received = true;
        assert!(matches!(shape(&p), Err(RepairError::InvalidPlan(_))));

        let mut p = plan(TcpState::Established);
        p.tsval = None;
        assert!(matches!(shape(&p), Err(RepairError::InvalidPlan(_))));

        let mut p = plan(TcpState::Established);
        p.options.wscale = Some((15, 7));
        assert!(matches!(shape(&p), Err(RepairError::InvalidPlan(_))));

        let mut p = plan(TcpState::FinWait1);
        p.fin_sent = true;
        p.unsent = b"x".to_vec().into();
        assert!(matches!(shape(&p), Err(RepairError::InvalidPlan(_))));

        let mut p = plan(TcpState::Established);
        p.local.set_port(0);
        assert!(matches!(shape(&p), Err(RepairError::InvalidPlan(_))), "port 0 binds an ephemeral port");
    }

    #[test]
    fn states_without_a_connection_are_unsupported() {
        for state in [TcpState::Listen, TcpState::SynSent, TcpState::SynRecv, TcpState::TimeWait, TcpState::Close] {
            match shape(&plan(state)) {
                Err(RepairError::UnsupportedState { state: s, .. }) => assert_eq!(s, state),
                other => panic!("{state:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn receive_window_never_starts_after_rcv_nxt() {
        let mut p = plan(TcpState::CloseWait);
        p.fin_received = true;
        p.window.rcv_wup = p.rcv_nxt + 1;
        let w = repair_window(&p);
        assert_eq!(w.rcv_wup, p.rcv_nxt.0);
        assert_eq!(w.rcv_wnd, p.window.rcv_wnd + 1);
        let w = repair_window(&plan(TcpState::Established));
        assert_eq!((w.rcv_wup, w.rcv_wnd), (1000, 65536));
    }

    #[test]
    fn privilege_errors_name_the_capability() {
        let e = RepairError::NotPermitted {
            step: "TCP_REPAIR",
            needs: "CAP_NET_ADMIN",
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let text = e.to_string();
        assert!(text.contains("TCP_REPAIR") && text.contains("CAP_NET_ADMIN"), "{text}");
        assert_eq!(e.step(), Some("TCP_REPAIR"));
    }

    fn idle() -> RestorePlan {
        RestorePlan { send_queue: Queue::default(), recv_queue: Queue::default(), ..plan(TcpState::Established) }
    }

    #[test]
    fn a_staged_socket_fits_only_the_connection_it_was_built_from() {
        let ms = Duration::from_millis;
        let staged = idle();
        // Unchanged, its clock run on as long as the plan's.
        let later = RestorePlan { tsval: Some(5250), ts_recent: Some(99), ..idle() };
        assert!(staged_fits(&staged, &later, ms(250)));
        assert!(staged_fits(&staged, &later, ms(249)), "one tick behind passes PAWS");
        assert!(staged_fits(&staged, &later, ms(400)), "ahead is harmless");
        assert!(!staged_fits(&staged, &later, ms(200)), "50 ms behind: the client would drop its segments");
        // Across the timestamp's wrap.
        let near_wrap = RestorePlan { tsval: Some(u32::MAX - 10), ..idle() };
        assert!(staged_fits(&near_wrap, &RestorePlan { tsval: Some(19), ..idle() }, ms(30)));
        // The connection moved on: a request and its answer, a window update, a FIN.
        let moved: [fn(&mut RestorePlan); 7] = [
            |p| p.rcv_nxt = p.rcv_nxt + 18,
            |p| p.snd_una = p.snd_una + 100,
            |p| p.window.snd_wnd = 1024,
            |p| p.window.rcv_wnd = 1024,
            |p| p.options.mss = 1400,
            |p| p.send_queue = b"x".to_vec().into(),
            |p| p.recv_queue = b"GET".to_vec().into(),
        ];
        for (i, change) in moved.iter().enumerate() {
            let mut p = RestorePlan { tsval: Some(5000), ..idle() };
            change(&mut p);
            assert!(!staged_fits(&staged, &p, ms(0)), "change {i} went unnoticed");
        }
        let closing = RestorePlan { state: TcpState::CloseWait, fin_received: true, ..idle() };
        assert!(!staged_fits(&staged, &closing, ms(0)));
        let other = RestorePlan { remote: "10.0.0.1:40001".parse().unwrap(), ..idle() };
        assert!(!staged_fits(&staged, &other, ms(0)));
        // Timestamps on one side only.
        assert!(!staged_fits(&staged, &RestorePlan { tsval: None, ..idle() }, ms(0)));
    }

    #[test]
    fn only_idle_connections_are_staged() {
        // Refused before any socket is made (so without privilege too).
        for p in
            [plan(TcpState::Established), RestorePlan { recv_queue: Queue::default(), ..plan(TcpState::Established) }]
        {
            let e = stage(&p).expect_err("bytes queued");
            assert!(matches!(e, RepairError::InvalidPlan(_)), "{e:?}");
            assert!(e.to_string().contains("only an idle connection"), "{e}");
        }
        let e = stage(&RestorePlan { state: TcpState::CloseWait, fin_received: true, ..idle() })
            .expect_err("not ESTABLISHED");
        assert!(matches!(e, RepairError::InvalidPlan(_)), "{e:?}");
    }
}
