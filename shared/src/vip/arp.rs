//! ARP over Ethernet for IPv4: checked frame views, the frames understudy sends, and the
//! pure decisions the prober and the responder make about what they receive.
//!
//! Read RFC 826 (ARP), RFC 5227 (IPv4 address conflict detection: probes with sender IP
//! 0.0.0.0, announcements, §2.1.1 what counts as a conflict during probing, §2.4 ongoing
//! detection) and RFC 5944 §4.6 (gratuitous ARP, request and reply forms).
//!
//! Linux behaviour relied on (net/ipv4/arp.c):
//! * The kernel answers a probe (sender IP 0) for a local address with a *unicast* reply to
//!   the prober's MAC, target IP 0.0.0.0 — so does [`respond`].
//! * `arp_is_garp`: a gratuitous *reply* only overrides an existing neighbour entry within
//!   its `locktime` if the target hardware address equals the sender's; the request form
//!   needs sender IP == target IP. [`ArpFrame::gratuitous_reply`] and
//!   [`ArpFrame::announcement`] follow that.
//! * Short frames: the kernel pads nothing on veth, so frames are emitted at the Ethernet
//!   minimum of 60 bytes; parsing accepts any trailing padding.
//!
//! Every length is checked once, before `pnet_packet`'s views read a field, so no hostile
//! frame can make a getter panic.

use pnet_packet::Packet;
use pnet_packet::arp::{ArpHardwareTypes, ArpOperation, ArpOperations, ArpPacket, MutableArpPacket};
use pnet_packet::ethernet::{EtherTypes, EthernetPacket, MutableEthernetPacket};
use std::fmt;
use std::net::Ipv4Addr;

/// Ethernet header length.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// ARP payload length for Ethernet/IPv4 (hardware length 6, protocol length 4).
pub const ARP_LEN: usize = 28;
/// Smallest Ethernet frame without the FCS; emitted frames are padded to it.
pub const FRAME_LEN: usize = 60;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    pub const ZERO: Mac = Mac([0; 6]);

    pub fn is_zero(self) -> bool {
        self == Mac::ZERO
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a buffer is not an Ethernet/IPv4 ARP frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArpParseError {
    /// Fewer bytes than the Ethernet header plus the 28-byte ARP body.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// The Ethernet type is not ARP (0x0806).
    #[error("not ARP (ethertype {0:#06x})")]
    NotArp(u16),
    /// ARP hardware type other than Ethernet (1).
    #[error("ARP hardware type {0} is not Ethernet")]
    HardwareType(u16),
    /// ARP protocol type other than IPv4 (0x0800).
    #[error("ARP protocol type {0:#06x} is not IPv4")]
    ProtocolType(u16),
    /// Address lengths other than 6 (hardware) and 4 (protocol).
    #[error("ARP address lengths {hardware}/{protocol}, want 6/4")]
    AddressLengths { hardware: u8, protocol: u8 },
    /// An operation other than request (1) or reply (2) (RARP, InARP, ...).
    #[error("ARP operation {0} is neither request nor reply")]
    Operation(u16),
}

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArpOp {
    Request,
    Reply,
}

impl ArpOp {
    fn wire(self) -> ArpOperation {
        match self {
            ArpOp::Request => ArpOperations::Request,
            ArpOp::Reply => ArpOperations::Reply,
        }
    }
}

/// An ARP body (Ethernet/IPv4), parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpRepr {
    pub op: ArpOp,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

/// What an ARP body is, in RFC 5227 terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArpKind {
    /// Request with sender IP 0.0.0.0: someone checks whether `target_ip` is free.
    Probe,
    /// Request with sender IP == target IP: someone claims `sender_ip` (gratuitous request form).
    Announcement,
    /// An ordinary who-has request.
    Request,
    /// Reply with sender IP == target IP: gratuitous reply form.
    GratuitousReply,
    /// An ordinary reply.
    Reply,
}

impl ArpRepr {
    pub fn kind(&self) -> ArpKind {
        match self.op {
            ArpOp::Request if self.sender_ip.is_unspecified() => ArpKind::Probe,
            ArpOp::Request if self.sender_ip == self.target_ip => ArpKind::Announcement,
            ArpOp::Request => ArpKind::Request,
            ArpOp::Reply if self.sender_ip == self.target_ip => ArpKind::GratuitousReply,
            ArpOp::Reply => ArpKind::Reply,
        }
    }
}

/// An Ethernet frame carrying ARP, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpFrame {
    pub eth_dst: Mac,
    pub eth_src: Mac,
    pub arp: ArpRepr,
}

impl ArpFrame {
    /// Parses an Ethernet frame. Trailing bytes (padding, FCS) are ignored.
    pub fn parse(frame: &[u8]) -> Result<ArpFrame, ArpParseError> {
        let need = ETHERNET_HEADER_LEN + ARP_LEN;
        if frame.len() < need {
            return Err(ArpParseError::Truncated { need, have: frame.len() });
        }
        let eth = EthernetPacket::new(frame).ok_or(ArpParseError::Truncated { need, have: frame.len() })?;
        if eth.get_ethertype() != EtherTypes::Arp {
            return Err(ArpParseError::NotArp(eth.get_ethertype().0));
        }
        let body = &frame[ETHERNET_HEADER_LEN..];
        // The fixed-layout view below assumes 6/4 address lengths: check them (and the
        // types they belong to) from the raw bytes before it reads anything.
        let hardware_type = u16::from_be_bytes([body[0], body[1]]);
        let protocol_type = u16::from_be_bytes([body[2], body[3]]);
        let (hardware, protocol) = (body[4], body[5]);
        if hardware_type != ArpHardwareTypes::Ethernet.0 {
            return Err(ArpParseError::HardwareType(hardware_type));
        }
        if protocol_type != EtherTypes::Ipv4.0 {
            return Err(ArpParseError::ProtocolType(protocol_type));
        }
        if (hardware, protocol) != (6, 4) {
            return Err(ArpParseError::AddressLengths { hardware, protocol });
        }
        let arp = ArpPacket::new(body).ok_or(ArpParseError::Truncated { need, have: frame.len() })?;
        let op = match arp.get_operation() {
            ArpOperations::Request => ArpOp::Request,
            ArpOperations::Reply => ArpOp::Reply,
            other => return Err(ArpParseError::Operation(other.0)),
        };
        Ok(ArpFrame {
            eth_dst: Mac(eth.get_destination().octets()),
            eth_src: Mac(eth.get_source().octets()),
            arp: ArpRepr {
                op,
                sender_mac: Mac(arp.get_sender_hw_addr().octets()),
                sender_ip: arp.get_sender_proto_addr(),
                target_mac: Mac(arp.get_target_hw_addr().octets()),
                target_ip: arp.get_target_proto_addr(),
            },
        })
    }

    /// The frame's bytes, padded to the 60-byte Ethernet minimum.
    pub fn emit(&self) -> [u8; FRAME_LEN] {
        let mut buf = [0u8; FRAME_LEN];
        {
            // Both views fit: FRAME_LEN > 14 + 28, so `new` cannot return None.
            let mut eth = MutableEthernetPacket::new(&mut buf).expect("60 bytes hold an Ethernet header");
            eth.set_destination(self.eth_dst.0.into());
            eth.set_source(self.eth_src.0.into());
            eth.set_ethertype(EtherTypes::Arp);
        }
        let mut arp = MutableArpPacket::new(&mut buf[ETHERNET_HEADER_LEN..]).expect("46 bytes hold an ARP body");
        arp.set_hardware_type(ArpHardwareTypes::Ethernet);
        arp.set_protocol_type(EtherTypes::Ipv4);
        arp.set_hw_addr_len(6);
        arp.set_proto_addr_len(4);
        arp.set_operation(self.arp.op.wire());
        arp.set_sender_hw_addr(self.arp.sender_mac.0.into());
        arp.set_sender_proto_addr(self.arp.sender_ip);
        arp.set_target_hw_addr(self.arp.target_mac.0.into());
        arp.set_target_proto_addr(self.arp.target_ip);
        debug_assert_eq!(arp.packet().len(), FRAME_LEN - ETHERNET_HEADER_LEN);
        buf
    }

    /// RFC 5227 probe: broadcast request, sender IP 0.0.0.0 (so no cache learns a
    /// mapping from it), target hardware zero, target IP `vip`.
    pub fn probe(mac: Mac, vip: Ipv4Addr) -> ArpFrame {
        Self::broadcast(mac, ArpOp::Request, Ipv4Addr::UNSPECIFIED, Mac::ZERO, vip)
    }

    /// Gratuitous ARP, request form (RFC 5227 announcement): sender IP = target IP = `vip`,
    /// target hardware zero, broadcast.
    pub fn announcement(mac: Mac, vip: Ipv4Addr) -> ArpFrame {
        Self::broadcast(mac, ArpOp::Request, vip, Mac::ZERO, vip)
    }

    /// Gratuitous ARP, reply form: sender IP = target IP = `vip`, target hardware = our own
    /// (what Linux's `arp_is_garp` requires of replies), broadcast.
    pub fn gratuitous_reply(mac: Mac, vip: Ipv4Addr) -> ArpFrame {
        Self::broadcast(mac, ArpOp::Reply, vip, mac, vip)
    }

    /// The reply `mac` gives to `request` for the address it asked about: unicast to
    /// the requester's hardware address, as Linux answers (probes included: the target
    /// IP is then 0.0.0.0).
    pub fn reply_to(request: &ArpRepr, mac: Mac) -> ArpFrame {
        ArpFrame {
            eth_dst: request.sender_mac,
            eth_src: mac,
            arp: ArpRepr {
                op: ArpOp::Reply,
                sender_mac: mac,
                sender_ip: request.target_ip,
                target_mac: request.sender_mac,
                target_ip: request.sender_ip,
            },
        }
    }

    fn broadcast(mac: Mac, op: ArpOp, sender_ip: Ipv4Addr, target_mac: Mac, target_ip: Ipv4Addr) -> ArpFrame {
        ArpFrame {
            eth_dst: Mac::BROADCAST,
            eth_src: mac,
            arp: ArpRepr { op, sender_mac: mac, sender_ip, target_mac, target_ip },
        }
    }

    /// Sent by `mac`, at either layer.
    fn is_from(&self, mac: Mac) -> bool {
        self.eth_src == mac || self.arp.sender_mac == mac
    }
}

/// What a frame received while probing says about the probed address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeEvidence {
    /// Nothing about the address (another address, or a request for it by a third host).
    Unrelated,
    /// Our own frame (ignored).
    Own,
    /// Another node holds the address: a reply from it (to anyone), or its gratuitous
    /// announcement. This is the "answered" of the fencing check.
    Holder(Mac),
    /// Another node probes the same address (RFC 5227 §2.1.1 counts this as a conflict).
    Prober(Mac),
    /// Another node's kernel asks who-has something else using the address as its sender
    /// IP. RFC 5227 calls this a conflict; understudy does not count it as an answer,
    /// because a host whose understudy process died still sends these for traffic its
    /// kernel emits, and the fence must only see live processes (ARCHITECTURE.md "Who owns
    /// the VIP").
    Solicitation(Mac),
}

/// Classifies a frame seen while probing `vip` from `ours`.
pub fn probe_evidence(frame: &ArpFrame, ours: Mac, vip: Ipv4Addr) -> ProbeEvidence {
    if frame.is_from(ours) {
        return ProbeEvidence::Own;
    }
    let arp = &frame.arp;
    let from = arp.sender_mac;
    match arp.kind() {
        ArpKind::Reply | ArpKind::GratuitousReply | ArpKind::Announcement if arp.sender_ip == vip => {
            ProbeEvidence::Holder(from)
        }
        ArpKind::Probe if arp.target_ip == vip => ProbeEvidence::Prober(from),
        ArpKind::Request if arp.sender_ip == vip => ProbeEvidence::Solicitation(from),
        _ => ProbeEvidence::Unrelated,
    }
}

/// What the VIP's responder does with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponderAction {
    /// Not for us, or our own.
    Ignore,
    /// Send this reply.
    Reply(ArpFrame),
    /// Another node uses the VIP as its sender address (RFC 5227 §2.4): it claims or
    /// answers for the address we serve.
    Conflict { mac: Mac, kind: ArpKind },
}

/// Decides what the process serving `vip` from `ours` does with `frame`: answer every
/// who-has for the VIP (probes included, which is what makes the fence see a live
/// process), report any other node that speaks as the VIP.
pub fn respond(frame: &ArpFrame, ours: Mac, vip: Ipv4Addr) -> ResponderAction {
    if frame.is_from(ours) {
        return ResponderAction::Ignore;
    }
    let arp = &frame.arp;
    if arp.sender_ip == vip {
        return ResponderAction::Conflict { mac: arp.sender_mac, kind: arp.kind() };
    }
    // A zero or broadcast/multicast sender hardware address cannot be answered (the reply
    // would be unicast to it).
    let answerable = !arp.sender_mac.is_zero() && arp.sender_mac.0[0] & 1 == 0;
    if arp.op == ArpOp::Request && arp.target_ip == vip && answerable {
        return ResponderAction::Reply(ArpFrame::reply_to(arp, ours));
    }
    ResponderAction::Ignore
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OURS: Mac = Mac([0x02, 0, 0, 0, 0, 0x01]);
    const THEIRS: Mac = Mac([0x02, 0, 0, 0, 0, 0x02]);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    /// A who-has for VIP from the client, as Linux sends it (from a capture: 42 bytes).
    fn client_request() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&THEIRS.0);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&THEIRS.0);
        f.extend_from_slice(&CLIENT.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&VIP.octets());
        f
    }

    #[test]
    fn request_bytes_parse_to_their_fields() {
        let f = ArpFrame::parse(&client_request()).expect("valid request");
        assert_eq!(f.eth_dst, Mac::BROADCAST);
        assert_eq!(f.eth_src, THEIRS);
        assert_eq!(
            f.arp,
            ArpRepr {
                op: ArpOp::Request,
                sender_mac: THEIRS,
                sender_ip: CLIENT,
                target_mac: Mac::ZERO,
                target_ip: VIP
            }
        );
        assert_eq!(f.arp.kind(), ArpKind::Request);
    }

    #[test]
    fn emitted_frames_are_padded_and_parse_back() {
        for f in [
            ArpFrame::probe(OURS, VIP),
            ArpFrame::announcement(OURS, VIP),
            ArpFrame::gratuitous_reply(OURS, VIP),
            ArpFrame::reply_to(&ArpFrame::parse(&client_request()).unwrap().arp, OURS),
        ] {
            let bytes = f.emit();
            assert_eq!(bytes.len(), FRAME_LEN);
            assert!(bytes[ETHERNET_HEADER_LEN + ARP_LEN..].iter().all(|&b| b == 0), "padding is zero");
            assert_eq!(ArpFrame::parse(&bytes), Ok(f));
            // The first 42 bytes are the frame; what follows is padding.
            assert_eq!(ArpFrame::parse(&bytes[..42]), Ok(f));
        }
    }

    #[test]
    fn emitted_request_matches_linux_bytes() {
        let f = ArpFrame::parse(&client_request()).unwrap();
        assert_eq!(&f.emit()[..42], &client_request()[..]);
    }

    #[test]
    fn probe_has_rfc5227_fields() {
        let p = ArpFrame::probe(OURS, VIP);
        assert_eq!(p.eth_dst, Mac::BROADCAST);
        assert_eq!(p.arp.op, ArpOp::Request);
        assert_eq!(p.arp.sender_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(p.arp.target_mac, Mac::ZERO);
        assert_eq!(p.arp.target_ip, VIP);
        assert_eq!(p.arp.kind(), ArpKind::Probe);
    }

    #[test]
    fn gratuitous_forms_satisfy_linux_arp_is_garp() {
        let a = ArpFrame::announcement(OURS, VIP);
        assert_eq!((a.arp.op, a.arp.sender_ip, a.arp.target_ip), (ArpOp::Request, VIP, VIP));
        assert_eq!(a.arp.kind(), ArpKind::Announcement);
        let r = ArpFrame::gratuitous_reply(OURS, VIP);
        assert_eq!((r.arp.op, r.arp.sender_ip, r.arp.target_ip), (ArpOp::Reply, VIP, VIP));
        assert_eq!(r.arp.target_mac, r.arp.sender_mac, "Linux wants tha == sha on gratuitous replies");
        assert_eq!(r.eth_dst, Mac::BROADCAST);
        assert_eq!(r.arp.kind(), ArpKind::GratuitousReply);
    }

    #[test]
    fn probe_is_answered_unicast_with_target_ip_zero() {
        let probe = ArpFrame::probe(THEIRS, VIP);
        let ResponderAction::Reply(r) = respond(&probe, OURS, VIP) else { panic!("a probe for the VIP is answered") };
        assert_eq!(r.eth_dst, THEIRS);
        assert_eq!(r.eth_src, OURS);
        assert_eq!(
            r.arp,
            ArpRepr {
                op: ArpOp::Reply,
                sender_mac: OURS,
                sender_ip: VIP,
                target_mac: THEIRS,
                target_ip: Ipv4Addr::UNSPECIFIED
            }
        );
        // And the prober counts that as the holder.
        assert_eq!(probe_evidence(&r, THEIRS, VIP), ProbeEvidence::Holder(OURS));
    }

    #[test]
    fn request_for_vip_is_answered_other_addresses_are_not() {
        let req = ArpFrame::parse(&client_request()).unwrap();
        let ResponderAction::Reply(r) = respond(&req, OURS, VIP) else { panic!("who-has VIP is answered") };
        assert_eq!((r.arp.sender_ip, r.arp.target_ip, r.eth_dst), (VIP, CLIENT, THEIRS));
        let mut other = req;
        other.arp.target_ip = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(respond(&other, OURS, VIP), ResponderAction::Ignore);
        let mut reply = req;
        reply.arp.op = ArpOp::Reply;
        assert_eq!(respond(&reply, OURS, VIP), ResponderAction::Ignore, "replies are never answered");
    }

    #[test]
    fn responder_ignores_own_frames_and_unanswerable_senders() {
        let mut own = ArpFrame::probe(OURS, VIP);
        assert_eq!(respond(&own, OURS, VIP), ResponderAction::Ignore);
        own.arp.sender_mac = THEIRS; // Ethernet source still ours
        assert_eq!(respond(&own, OURS, VIP), ResponderAction::Ignore);
        let mut zero = ArpFrame::probe(THEIRS, VIP);
        zero.arp.sender_mac = Mac::ZERO;
        assert_eq!(respond(&zero, OURS, VIP), ResponderAction::Ignore);
        let mut multicast = ArpFrame::probe(THEIRS, VIP);
        multicast.arp.sender_mac = Mac([0x01, 0, 0x5e, 0, 0, 1]);
        assert_eq!(respond(&multicast, OURS, VIP), ResponderAction::Ignore);
    }

    #[test]
    fn responder_reports_another_node_speaking_as_vip() {
        for (f, kind) in [
            (ArpFrame::announcement(THEIRS, VIP), ArpKind::Announcement),
            (ArpFrame::gratuitous_reply(THEIRS, VIP), ArpKind::GratuitousReply),
            (ArpFrame::reply_to(&ArpFrame::probe(OURS, VIP).arp, THEIRS), ArpKind::Reply),
        ] {
            assert_eq!(respond(&f, OURS, VIP), ResponderAction::Conflict { mac: THEIRS, kind });
        }
        // Our own announcement is not a conflict.
        assert_eq!(respond(&ArpFrame::announcement(OURS, VIP), OURS, VIP), ResponderAction::Ignore);
    }

    #[test]
    fn probe_evidence_classifies_what_the_fence_sees() {
        let reply = ArpFrame::reply_to(&ArpFrame::probe(OURS, VIP).arp, THEIRS);
        assert_eq!(probe_evidence(&reply, OURS, VIP), ProbeEvidence::Holder(THEIRS));
        assert_eq!(probe_evidence(&ArpFrame::announcement(THEIRS, VIP), OURS, VIP), ProbeEvidence::Holder(THEIRS));
        assert_eq!(probe_evidence(&ArpFrame::gratuitous_reply(THEIRS, VIP), OURS, VIP), ProbeEvidence::Holder(THEIRS));
        assert_eq!(probe_evidence(&ArpFrame::probe(THEIRS, VIP), OURS, VIP), ProbeEvidence::Prober(THEIRS));
        // Our own frames, at either layer, never count.
        assert_eq!(probe_evidence(&ArpFrame::gratuitous_reply(OURS, VIP), OURS, VIP), ProbeEvidence::Own);
        let mut spoof = reply;
        spoof.eth_src = OURS;
        assert_eq!(probe_evidence(&spoof, OURS, VIP), ProbeEvidence::Own);
        // Answers about other addresses do not count.
        let other = Ipv4Addr::new(10, 0, 0, 2);
        let reply_other = ArpFrame::reply_to(&ArpFrame::probe(OURS, other).arp, THEIRS);
        assert_eq!(probe_evidence(&reply_other, OURS, VIP), ProbeEvidence::Unrelated);
        assert_eq!(probe_evidence(&ArpFrame::probe(THEIRS, other), OURS, VIP), ProbeEvidence::Unrelated);
        // A third host asking who-has VIP says nothing about who holds it.
        let req = ArpFrame::parse(&client_request()).unwrap();
        assert_eq!(probe_evidence(&req, OURS, VIP), ProbeEvidence::Unrelated);
        // A kernel soliciting with the VIP as sender is reported, not counted.
        let mut sol = req;
        sol.arp.sender_ip = VIP;
        sol.arp.target_ip = CLIENT;
        assert_eq!(probe_evidence(&sol, OURS, VIP), ProbeEvidence::Solicitation(THEIRS));
    }

    #[test]
    fn truncated_frames_are_rejected() {
        let full = client_request();
        for len in 0..42 {
            assert_eq!(
                ArpFrame::parse(&full[..len]),
                Err(ArpParseError::Truncated { need: 42, have: len }),
                "length {len}"
            );
        }
    }

    #[test]
    fn wrong_types_lengths_and_operations_are_rejected() {
        let set = |at: usize, bytes: &[u8]| {
            let mut f = client_request();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            ArpFrame::parse(&f)
        };
        assert_eq!(set(12, &[0x08, 0x00]), Err(ArpParseError::NotArp(0x0800)));
        assert_eq!(set(12, &[0x81, 0x00]), Err(ArpParseError::NotArp(0x8100)), "VLAN tag");
        assert_eq!(set(14, &[0, 6]), Err(ArpParseError::HardwareType(6)), "IEEE 802");
        assert_eq!(set(16, &[0x86, 0xdd]), Err(ArpParseError::ProtocolType(0x86dd)));
        assert_eq!(set(18, &[8, 4]), Err(ArpParseError::AddressLengths { hardware: 8, protocol: 4 }));
        assert_eq!(set(18, &[6, 16]), Err(ArpParseError::AddressLengths { hardware: 6, protocol: 16 }));
        assert_eq!(set(18, &[0, 0]), Err(ArpParseError::AddressLengths { hardware: 0, protocol: 0 }));
        assert_eq!(set(18, &[255, 255]), Err(ArpParseError::AddressLengths { hardware: 255, protocol: 255 }));
        assert_eq!(set(20, &[0, 3]), Err(ArpParseError::Operation(3)), "RARP request");
        assert_eq!(set(20, &[0, 0]), Err(ArpParseError::Operation(0)));
        assert_eq!(set(20, &[0xff, 0xff]), Err(ArpParseError::Operation(0xffff)));
    }

    proptest! {
        /// Any bytes: parsing never panics, and whatever parses re-emits to the same 42 bytes.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(f) = ArpFrame::parse(&bytes) {
                prop_assert_eq!(&f.emit()[..42], &bytes[..42]);
                let _ = respond(&f, OURS, VIP);
                let _ = probe_evidence(&f, OURS, VIP);
            }
        }

        /// A valid header with any body: parses or errors, never panics; decisions are total.
        #[test]
        fn arbitrary_arp_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64), valid_lengths: bool) {
            let mut f = client_request()[..14].to_vec();
            f.extend_from_slice(&body);
            if valid_lengths && f.len() >= 22 {
                f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
            }
            if let Ok(frame) = ArpFrame::parse(&f) {
                let _ = respond(&frame, OURS, VIP);
                let _ = probe_evidence(&frame, OURS, VIP);
            }
        }
    }
}
