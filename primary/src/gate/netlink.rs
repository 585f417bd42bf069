//! The nfnetlink_queue wire format: building requests and parsing what the kernel sends. Pure: no I/O.
//!
//! Read the kernel UAPI `linux/netlink.h` (nlmsghdr, nlattr, NLMSG_ERROR), `linux/netfilter/nfnetlink.h`
//! (nfgenmsg, subsystem ids) and `linux/netfilter/nfnetlink_queue.h` (messages, attributes, flags), and the
//! kernel's `net/netfilter/nfnetlink_queue.c` for what it does with them:
//! * Netlink headers and attribute headers are in host byte order; nfgenmsg's `res_id` (the queue number)
//!   and every nfqueue attribute value are big-endian. Messages and attributes are padded to 4 bytes; the
//!   last attribute of a packet message (the payload) may end unpadded.
//! * Packet ids count up from 1 per queue instance and wrap at 2^32. An id is consumed even when the
//!   kernel then fails to deliver the packet, so gaps are normal.
//! * A batch verdict applies to every queued entry from the head of the queue up to the first one whose id
//!   is after the given id (`(int)(id - max) > 0`), so it releases in queue order and is wrap-safe.
//! * Without `NLM_F_ACK` the kernel still answers a failed request with an `NLMSG_ERROR` carrying the
//!   request's sequence number (for example `ENOENT` for a verdict on an id no longer queued).
//!
//! Everything read from a buffer is bounds-checked first: hostile or truncated input is a [`ParseError`],
//! never a panic.

use std::fmt;

/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Length of `struct nfgenmsg`.
pub const NFGENMSG_LEN: usize = 4;
/// Length of `struct nlattr`.
pub const NLA_HDRLEN: usize = 4;
/// The largest packet copy the kernel can make (`0xffff - NLA_HDRLEN`: `nla_len` is 16 bits).
pub const MAX_COPY_RANGE: u32 = 0xffff - NLA_HDRLEN as u32;
/// A receive buffer this large holds any single packet message the kernel can build.
pub const MAX_MESSAGE_LEN: usize = 0x10000 + 4096;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_OUTDEV: u16 = 6;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CAP_LEN: u16 = 13;
const NFQA_SKB_INFO: u16 = 14;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_PACKET: u8 = 2;

/// `NFQA_CFG_F_FAIL_OPEN`: accept packets when the queue is full. Never set by understudy.
pub const CFG_F_FAIL_OPEN: u32 = 1 << 0;
/// `NFQA_CFG_F_GSO`: hand GSO packets over whole (and with unfinished checksums) instead of segmenting them.
pub const CFG_F_GSO: u32 = 1 << 2;

/// `NFQA_SKB_CSUMNOTREADY`: the checksum is not finished (`CHECKSUM_PARTIAL`); the packet is fine.
pub const SKB_CSUM_NOT_READY: u32 = 1 << 0;
/// `NFQA_SKB_GSO`: the packet is a GSO super-packet, larger than the device MTU.
pub const SKB_GSO: u32 = 1 << 1;
/// `NFQA_SKB_CSUM_NOTVERIFIED`: nobody has verified the checksum yet; it may be wrong.
pub const SKB_CSUM_NOT_VERIFIED: u32 = 1 << 2;

/// Netfilter's verdict codes (`linux/netfilter.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `NF_DROP`.
    Drop = 0,
    /// `NF_ACCEPT`: continue with the next hook.
    Accept = 1,
}

/// Why a buffer is not a well-formed nfnetlink_queue message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer bytes than a header or a length field needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    /// A length field smaller than its own header.
    #[error("impossible {what} length {len}")]
    BadLength { what: &'static str, len: usize },
    /// A packet message without an attribute every packet message carries.
    #[error("packet message without {0}")]
    MissingAttribute(&'static str),
    /// A fixed-size attribute of the wrong size.
    #[error("attribute {attr} has {len} bytes, want {want}")]
    BadAttribute { attr: u16, len: usize, want: usize },
}

/// One netlink message, borrowed from a receive buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NlMsg<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub portid: u32,
    /// Everything after the 16-byte header, up to `nlmsg_len`.
    pub body: &'a [u8],
}

impl fmt::Debug for NlMsg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NlMsg")
            .field("kind", &self.kind)
            .field("flags", &self.flags)
            .field("seq", &self.seq)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The netlink messages in one datagram. Stops after the first malformed header: past it, the
/// boundaries of the rest are unknown.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { buf, failed: false }
}

/// Iterator returned by [`messages`].
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    buf: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<NlMsg<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.buf.is_empty() {
            return None;
        }
        let r = split_message(self.buf);
        match r {
            Ok((msg, rest)) => {
                self.buf = rest;
                Some(Ok(msg))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

fn split_message(buf: &[u8]) -> Result<(NlMsg<'_>, &[u8]), ParseError> {
    let have = buf.len();
    if have < NLMSG_HDRLEN {
        return Err(ParseError::Truncated { what: "netlink header", need: NLMSG_HDRLEN, have });
    }
    let len = ne_u32(&buf[0..4]) as usize;
    if len < NLMSG_HDRLEN {
        return Err(ParseError::BadLength { what: "netlink message", len });
    }
    if len > have {
        return Err(ParseError::Truncated { what: "netlink message", need: len, have });
    }
    let msg = NlMsg {
        kind: ne_u16(&buf[4..6]),
        flags: ne_u16(&buf[6..8]),
        seq: ne_u32(&buf[8..12]),
        portid: ne_u32(&buf[12..16]),
        body: &buf[NLMSG_HDRLEN..len],
    };
    let next = align4(len).min(have);
    Ok((msg, &buf[next..]))
}

/// What one message from the kernel means to the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A queued packet.
    Packet(PacketMsg<'a>),
    /// The request with this sequence number succeeded (only sent when the request asked for an ack).
    Ack { seq: u32 },
    /// The request with this sequence number failed with `errno` (positive).
    Error { seq: u32, errno: i32 },
    /// `NLMSG_OVERRUN`: the kernel lost messages.
    Overrun,
    /// Anything else (`NLMSG_NOOP`, `NLMSG_DONE`, other subsystems): nothing to do.
    Ignored { kind: u16 },
}

/// A packet the kernel queued, borrowed from the receive buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PacketMsg<'a> {
    /// The queue number (`nfgenmsg.res_id`).
    pub queue: u16,
    /// The address family of the hook (`AF_INET` = 2).
    pub family: u8,
    /// The packet id to give in a verdict.
    pub id: u32,
    /// `skb->protocol` (big-endian on the wire, host order here).
    pub hw_protocol: u16,
    /// The netfilter hook number (`NF_INET_PRE_ROUTING` = 0 … `NF_INET_POST_ROUTING` = 4).
    pub hook: u8,
    /// `skb->mark`, 0 when the kernel sent none.
    pub mark: u32,
    /// `NFQA_SKB_INFO` flags (`SKB_*`), 0 when absent.
    pub skb_info: u32,
    /// The packet's real length when the copy was truncated (`NFQA_CAP_LEN`).
    pub cap_len: Option<u32>,
    pub indev: Option<u32>,
    pub outdev: Option<u32>,
    /// The packet from its network header on (for IPv4 hooks: the IPv4 datagram).
    pub payload: &'a [u8],
}

impl fmt::Debug for PacketMsg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketMsg")
            .field("queue", &self.queue)
            .field("id", &self.id)
            .field("hook", &self.hook)
            .field("mark", &self.mark)
            .field("skb_info", &self.skb_info)
            .field("cap_len", &self.cap_len)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Interprets one message from the kernel.
pub fn parse_event<'a>(msg: &NlMsg<'a>) -> Result<Event<'a>, ParseError> {
    match msg.kind {
        NLMSG_ERROR => {
            let have = msg.body.len();
            if have < 4 {
                return Err(ParseError::Truncated { what: "netlink error", need: 4, have });
            }
            // The kernel sends -errno; 0 is an ack.
            let code = i32::from_ne_bytes([msg.body[0], msg.body[1], msg.body[2], msg.body[3]]);
            if code == 0 {
                Ok(Event::Ack { seq: msg.seq })
            } else {
                Ok(Event::Error { seq: msg.seq, errno: code.checked_neg().unwrap_or(i32::MAX) })
            }
        }
        NLMSG_OVERRUN => Ok(Event::Overrun),
        NLMSG_NOOP | NLMSG_DONE => Ok(Event::Ignored { kind: msg.kind }),
        k if k == nfq_type(NFQNL_MSG_PACKET) => parse_packet(msg.body).map(Event::Packet),
        k => Ok(Event::Ignored { kind: k }),
    }
}

fn parse_packet(body: &[u8]) -> Result<PacketMsg<'_>, ParseError> {
    let have = body.len();
    if have < NFGENMSG_LEN {
        return Err(ParseError::Truncated { what: "nfgenmsg", need: NFGENMSG_LEN, have });
    }
    let family = body[0];
    let queue = u16::from_be_bytes([body[2], body[3]]);
    let mut hdr = None;
    let mut payload = None;
    let mut pkt = PacketMsg {
        queue,
        family,
        id: 0,
        hw_protocol: 0,
        hook: 0,
        mark: 0,
        skb_info: 0,
        cap_len: None,
        indev: None,
        outdev: None,
        payload: &[],
    };
    for attr in attributes(&body[NFGENMSG_LEN..]) {
        let (kind, value) = attr?;
        match kind {
            NFQA_PACKET_HDR => {
                // struct nfqnl_msg_packet_hdr is packed: be32 id, be16 hw_protocol, u8 hook.
                if value.len() < 7 {
                    return Err(ParseError::BadAttribute { attr: kind, len: value.len(), want: 7 });
                }
                hdr = Some((
                    u32::from_be_bytes([value[0], value[1], value[2], value[3]]),
                    u16::from_be_bytes([value[4], value[5]]),
                    value[6],
                ));
            }
            NFQA_MARK => pkt.mark = be_u32_attr(kind, value)?,
            NFQA_SKB_INFO => pkt.skb_info = be_u32_attr(kind, value)?,
            NFQA_CAP_LEN => pkt.cap_len = Some(be_u32_attr(kind, value)?),
            NFQA_IFINDEX_INDEV => pkt.indev = Some(be_u32_attr(kind, value)?),
            NFQA_IFINDEX_OUTDEV => pkt.outdev = Some(be_u32_attr(kind, value)?),
            NFQA_PAYLOAD => payload = Some(value),
            _ => {}
        }
    }
    let (id, hw_protocol, hook) = hdr.ok_or(ParseError::MissingAttribute("NFQA_PACKET_HDR"))?;
    pkt.id = id;
    pkt.hw_protocol = hw_protocol;
    pkt.hook = hook;
    pkt.payload = payload.ok_or(ParseError::MissingAttribute("NFQA_PAYLOAD"))?;
    Ok(pkt)
}

fn be_u32_attr(attr: u16, value: &[u8]) -> Result<u32, ParseError> {
    match value {
        [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(ParseError::BadAttribute { attr, len: value.len(), want: 4 }),
    }
}

/// The attributes in `buf` as `(type, value)`, with the nested/byte-order flag bits masked off. Stops
/// after the first malformed attribute.
pub fn attributes(buf: &[u8]) -> Attributes<'_> {
    Attributes { buf, failed: false }
}

/// Iterator returned by [`attributes`].
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    buf: &'a [u8],
    failed: bool,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.buf.is_empty() {
            return None;
        }
        let have = self.buf.len();
        if have < NLA_HDRLEN {
            self.failed = true;
            return Some(Err(ParseError::Truncated { what: "attribute header", need: NLA_HDRLEN, have }));
        }
        let len = ne_u16(&self.buf[0..2]) as usize;
        let kind = ne_u16(&self.buf[2..4]) & 0x3fff;
        if len < NLA_HDRLEN {
            self.failed = true;
            return Some(Err(ParseError::BadLength { what: "attribute", len }));
        }
        if len > have {
            self.failed = true;
            return Some(Err(ParseError::Truncated { what: "attribute", need: len, have }));
        }
        let value = &self.buf[NLA_HDRLEN..len];
        self.buf = &self.buf[align4(len).min(have)..];
        Some(Ok((kind, value)))
    }
}

/// Builds the requests the gate sends. Each returns one complete netlink message.
pub mod request {
    use super::*;

    /// `NFQNL_CFG_CMD_BIND` for `queue`, asking for an ack.
    pub fn bind(seq: u32, queue: u16) -> Vec<u8> {
        config_cmd(seq, queue, NFQNL_CFG_CMD_BIND, NLM_F_REQUEST | NLM_F_ACK)
    }

    /// `NFQNL_CFG_CMD_UNBIND` for `queue` (no ack; a failure comes back as an error).
    pub fn unbind(seq: u32, queue: u16) -> Vec<u8> {
        config_cmd(seq, queue, NFQNL_CFG_CMD_UNBIND, NLM_F_REQUEST)
    }

    fn config_cmd(seq: u32, queue: u16, cmd: u8, flags: u16) -> Vec<u8> {
        let mut b = header(nfq_type(NFQNL_MSG_CONFIG), flags, seq, queue);
        // struct nfqnl_msg_config_cmd: u8 command, u8 pad, be16 pf.
        let pf = (libc::AF_INET as u16).to_be_bytes();
        put_attr(&mut b, NFQA_CFG_CMD, &[cmd, 0, pf[0], pf[1]]);
        finish(b)
    }

    /// Copy mode `NFQNL_COPY_PACKET` with `copy_range`, the queue's maximum length, and `flags` for
    /// the flag bits in `mask`; asks for an ack.
    pub fn params(seq: u32, queue: u16, copy_range: u32, max_len: u32, flags: u32, mask: u32) -> Vec<u8> {
        let mut b = header(nfq_type(NFQNL_MSG_CONFIG), NLM_F_REQUEST | NLM_F_ACK, seq, queue);
        // struct nfqnl_msg_config_params is packed: be32 copy_range, u8 copy_mode.
        let r = copy_range.to_be_bytes();
        put_attr(&mut b, NFQA_CFG_PARAMS, &[r[0], r[1], r[2], r[3], NFQNL_COPY_PACKET]);
        put_attr(&mut b, NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes());
        put_attr(&mut b, NFQA_CFG_MASK, &mask.to_be_bytes());
        put_attr(&mut b, NFQA_CFG_FLAGS, &flags.to_be_bytes());
        finish(b)
    }

    /// A verdict on the one packet `id` (no ack; failures come back as errors).
    pub fn verdict(seq: u32, queue: u16, id: u32, verdict: Verdict) -> Vec<u8> {
        verdict_msg(NFQNL_MSG_VERDICT, seq, queue, id, verdict)
    }

    /// A verdict on every packet queued up to and including `id` (no ack).
    pub fn verdict_batch(seq: u32, queue: u16, id: u32, verdict: Verdict) -> Vec<u8> {
        verdict_msg(NFQNL_MSG_VERDICT_BATCH, seq, queue, id, verdict)
    }

    fn verdict_msg(kind: u16, seq: u32, queue: u16, id: u32, verdict: Verdict) -> Vec<u8> {
        let mut b = header(nfq_type(kind), NLM_F_REQUEST, seq, queue);
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&(verdict as u32).to_be_bytes());
        v[4..].copy_from_slice(&id.to_be_bytes());
        put_attr(&mut b, NFQA_VERDICT_HDR, &v);
        finish(b)
    }

    fn header(kind: u16, flags: u16, seq: u32, queue: u16) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by finish()
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // portid: the kernel fills in the sender
        // struct nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id = queue.
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&queue.to_be_bytes());
        b
    }

    fn put_attr(b: &mut Vec<u8>, kind: u16, value: &[u8]) {
        let len = (NLA_HDRLEN + value.len()) as u16;
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(value);
        b.resize(align4(b.len()), 0);
    }

    fn finish(mut b: Vec<u8>) -> Vec<u8> {
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b
    }
}

const fn nfq_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_QUEUE << 8) | msg
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn ne_u16(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A packet message as the kernel builds it (attribute order of nfqnl_build_packet_message).
    fn kernel_packet(queue: u16, id: u32, hook: u8, extra: &[(u16, Vec<u8>)], payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&nfq_type(NFQNL_MSG_PACKET).to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&[2, 0]);
        b.extend_from_slice(&queue.to_be_bytes());
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&0x0800u16.to_be_bytes());
        hdr.push(hook);
        let mut attrs = vec![(NFQA_PACKET_HDR, hdr)];
        attrs.extend(extra.iter().cloned());
        for (k, v) in &attrs {
            b.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            b.extend_from_slice(&k.to_ne_bytes());
            b.extend_from_slice(v);
            b.resize(align4(b.len()), 0);
        }
        // The payload goes last, unpadded, as skb_zerocopy leaves it.
        b.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&NFQA_PAYLOAD.to_ne_bytes());
        b.extend_from_slice(payload);
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b
    }

    fn error_msg(seq: u32, code: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&code.to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]); // the offending request's header (NETLINK_CAP_ACK)
        b
    }

    fn only_event(buf: &[u8]) -> Result<Event<'_>, ParseError> {
        let mut it = messages(buf);
        let msg = it.next().expect("one message")?;
        assert!(it.next().is_none());
        parse_event(&msg)
    }

    #[test]
    fn packet_message_parses_id_hook_mark_flags_and_unpadded_payload() {
        let payload = [0x45u8, 0, 0, 21, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17];
        let buf = kernel_packet(
            7,
            0xfffffffe,
            3,
            &[
                (NFQA_IFINDEX_OUTDEV, 9u32.to_be_bytes().to_vec()),
                (NFQA_MARK, 0xabu32.to_be_bytes().to_vec()),
                (NFQA_SKB_INFO, (SKB_CSUM_NOT_READY | SKB_GSO).to_be_bytes().to_vec()),
                (NFQA_CAP_LEN, 70000u32.to_be_bytes().to_vec()),
            ],
            &payload,
        );
        assert_eq!(buf.len() % 4, 1, "the fixture must end unpadded");
        let Event::Packet(p) = only_event(&buf).unwrap() else { panic!("not a packet") };
        assert_eq!((p.queue, p.family, p.id, p.hook, p.hw_protocol), (7, 2, 0xfffffffe, 3, 0x0800));
        assert_eq!((p.mark, p.skb_info, p.cap_len), (0xab, SKB_CSUM_NOT_READY | SKB_GSO, Some(70000)));
        assert_eq!((p.indev, p.outdev), (None, Some(9)));
        assert_eq!(p.payload, &payload);
    }

    #[test]
    fn several_messages_in_one_datagram_are_all_returned() {
        let mut buf = kernel_packet(0, 1, 0, &[], b"abc");
        buf.resize(align4(buf.len()), 0);
        buf.extend(error_msg(42, -libc::ENOENT));
        buf.extend(error_msg(43, 0));
        let events: Vec<_> = messages(&buf).map(|m| parse_event(&m.unwrap()).unwrap()).collect();
        assert!(matches!(events[0], Event::Packet(p) if p.id == 1 && p.payload == b"abc"));
        assert_eq!(events[1], Event::Error { seq: 42, errno: libc::ENOENT });
        assert_eq!(events[2], Event::Ack { seq: 43 });
    }

    #[test]
    fn error_with_i32_min_code_does_not_overflow() {
        assert_eq!(only_event(&error_msg(1, i32::MIN)).unwrap(), Event::Error { seq: 1, errno: i32::MAX });
    }

    #[test]
    fn truncated_packet_message_is_an_error_at_every_cut() {
        let buf = kernel_packet(0, 5, 0, &[(NFQA_MARK, 1u32.to_be_bytes().to_vec())], &[0x45; 40]);
        for cut in 0..buf.len() {
            let r: Result<Vec<_>, _> = messages(&buf[..cut]).map(|m| m.and_then(|m| parse_event(&m))).collect();
            assert!(r.is_err() || cut == 0, "cut at {cut} parsed: {r:?}");
        }
    }

    #[test]
    fn lengths_below_their_header_are_rejected() {
        let mut buf = kernel_packet(0, 5, 0, &[], b"x");
        let mut small = buf.clone();
        small[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(messages(&small).next(), Some(Err(ParseError::BadLength { what: "netlink message", len: 8 })));
        // The first attribute (after header and nfgenmsg) claims 2 bytes.
        buf[20..22].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(only_event(&buf), Err(ParseError::BadLength { what: "attribute", len: 2 }));
    }

    #[test]
    fn attribute_running_past_the_message_is_truncated() {
        let mut buf = kernel_packet(0, 5, 0, &[], b"xyz");
        let n = buf.len();
        // The payload attribute header sits 7 bytes from the end (4 header + 3 payload).
        buf[n - 7..n - 5].copy_from_slice(&200u16.to_ne_bytes());
        assert!(matches!(only_event(&buf), Err(ParseError::Truncated { what: "attribute", .. })));
    }

    #[test]
    fn packet_without_header_or_payload_is_rejected() {
        let mut no_payload = kernel_packet(0, 5, 0, &[], b"");
        // Strip the empty payload attribute (the last 4 bytes).
        no_payload.truncate(no_payload.len() - 4);
        let len = no_payload.len() as u32;
        no_payload[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(only_event(&no_payload), Err(ParseError::MissingAttribute("NFQA_PAYLOAD")));

        let mut short_hdr = kernel_packet(0, 5, 0, &[], b"ab");
        short_hdr[20..22].copy_from_slice(&8u16.to_ne_bytes()); // packet header of 4 bytes
        assert!(only_event(&short_hdr).is_err());
    }

    #[test]
    fn fixed_size_attribute_of_wrong_size_is_rejected() {
        let buf = kernel_packet(0, 5, 0, &[(NFQA_MARK, vec![1, 2])], b"ab");
        assert_eq!(only_event(&buf), Err(ParseError::BadAttribute { attr: NFQA_MARK, len: 2, want: 4 }));
    }

    #[test]
    fn short_error_and_short_nfgenmsg_are_truncated() {
        let mut e = error_msg(1, 0);
        e.truncate(18);
        e[0..4].copy_from_slice(&18u32.to_ne_bytes());
        assert!(matches!(only_event(&e), Err(ParseError::Truncated { what: "netlink error", .. })));
        let mut p = kernel_packet(0, 1, 0, &[], b"");
        p.truncate(18);
        p[0..4].copy_from_slice(&18u32.to_ne_bytes());
        assert!(matches!(only_event(&p), Err(ParseError::Truncated { what: "nfgenmsg", .. })));
    }

    #[test]
    fn verdict_requests_have_the_kernel_layout() {
        let b = request::verdict_batch(9, 0x0102, 0xdeadbeef, Verdict::Accept);
        assert_eq!(b.len(), 16 + 4 + 4 + 8);
        let m = messages(&b).next().unwrap().unwrap();
        assert_eq!((m.kind, m.flags, m.seq), (nfq_type(NFQNL_MSG_VERDICT_BATCH), NLM_F_REQUEST, 9));
        assert_eq!(&m.body[..4], &[0, 0, 1, 2]);
        let (kind, v) = attributes(&m.body[4..]).next().unwrap().unwrap();
        assert_eq!(kind, NFQA_VERDICT_HDR);
        assert_eq!(v, &[0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]);
        let d = request::verdict(10, 3, 7, Verdict::Drop);
        let m = messages(&d).next().unwrap().unwrap();
        assert_eq!(m.kind, nfq_type(NFQNL_MSG_VERDICT));
    }

    #[test]
    fn config_requests_ask_for_an_ack_and_pad_the_packed_params() {
        let b = request::params(1, 4, MAX_COPY_RANGE, 4096, CFG_F_GSO, CFG_F_GSO | CFG_F_FAIL_OPEN);
        let m = messages(&b).next().unwrap().unwrap();
        assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_ACK);
        let attrs: Vec<_> = attributes(&m.body[4..]).map(|a| a.unwrap()).collect();
        assert_eq!(attrs[0], (NFQA_CFG_PARAMS, &[0, 0, 0xff, 0xfb, NFQNL_COPY_PACKET][..]));
        assert_eq!(attrs[1], (NFQA_CFG_QUEUE_MAXLEN, &4096u32.to_be_bytes()[..]));
        assert_eq!(attrs[3], (NFQA_CFG_FLAGS, &CFG_F_GSO.to_be_bytes()[..]));
        let bind = request::bind(2, 4);
        let m = messages(&bind).next().unwrap().unwrap();
        let (kind, v) = attributes(&m.body[4..]).next().unwrap().unwrap();
        assert_eq!((kind, v), (NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 2][..]));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            for m in messages(&buf).flatten() {
                let _ = parse_event(&m);
            }
        }

        #[test]
        fn mutated_packet_message_never_panics(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8),
            cut in 0usize..200,
        ) {
            let mut buf = kernel_packet(1, 2, 0, &[(NFQA_MARK, 3u32.to_be_bytes().to_vec())], &[0x45; 60]);
            for (i, b) in flips {
                if let Some(x) = buf.get_mut(i) {
                    *x = b;
                }
            }
            buf.truncate(cut.min(buf.len()));
            for m in messages(&buf).flatten() {
                if let Ok(Event::Packet(p)) = parse_event(&m) {
                    prop_assert!(p.payload.len() <= buf.len());
                }
            }
        }
    }
}
