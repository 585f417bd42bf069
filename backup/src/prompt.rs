//! Prompting clients to retransmit what they sent during the outage.
//!
//! Segments a client sent between the primary's death and the takeover were lost. Its TCP resends them
//! on its own retransmission timer, and during the outage that timer backed off (200 ms, 400 ms, 800 ms,
//! ...), so the next resend can come long after the backup is ready. Duplicate ACKs do not help: with
//! SACK and RACK (Linux's default) loss is only inferred from data delivered after the hole, and we have
//! none.
//!
//! RFC 6069 gives a standard lever: an ICMP host-unreachable that quotes a segment starting at the
//! sender's oldest unacknowledged byte tells it the silence was a connectivity disruption, not congestion,
//! and Linux (`tcp_ld_RTO_revert`) undoes one step of the backoff per message and resends at once when the
//! undone timeout has already run out. So after the hold lifts, the backup sends each restored client a
//! short burst of them quoting `rcv_nxt` (the byte it expects next, which its restored socket has just
//! acknowledged). A client with nothing outstanding, or not in backoff, ignores them (the message only
//! sets a soft error that is never reported on a connected socket unless the application asked for
//! `IP_RECVERR`).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use pnet_packet::MutablePacket;
use pnet_packet::icmp::destination_unreachable::{IcmpCodes, MutableDestinationUnreachablePacket};
use pnet_packet::icmp::{IcmpPacket, IcmpTypes, checksum as icmp_checksum};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::{Ipv4Flags, MutableIpv4Packet, checksum as ipv4_checksum};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tcp_replay::TcpState;
use tcp_replay::plan::RestorePlan;

/// Most messages per connection: each undoes one backoff step, so this many cover an outage of up to
/// 200 ms × (2^6 − 1) = 12.6 s at the minimum retransmission timeout.
pub const BURST: usize = 6;

/// Linux's smallest retransmission timeout (`TCP_RTO_MIN`): no client backs off faster.
const RTO_MIN: Duration = Duration::from_millis(200);

/// Messages per connection after an outage of `outage` (from the old primary's last sign of life to the
/// prompts): one per backoff step a client can have taken meanwhile (its timeouts come at 200 ms × (2^k − 1)
/// at the fastest), and one more, at most [`BURST`]. A takeover of 10 000 connections sends 20 000 after a
/// usual outage of a few hundred milliseconds instead of 60 000, on the CPU its restored connections'
/// first requests need.
pub fn burst_for(outage: Duration) -> usize {
    let mut steps = 0;
    while steps < BURST - 1 && RTO_MIN * ((1u32 << (steps + 1)) - 1) <= outage {
        steps += 1;
    }
    steps + 1
}

/// ICMP header (8) + quoted IPv4 header (20) + the first 8 bytes of the quoted TCP header.
pub const MESSAGE_LEN: usize = 8 + 20 + 8;

/// One connection to prompt: the client, the VIP side, and the next client byte the server expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prompt {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub seq: u32,
}

impl Prompt {
    /// The prompt for a restored connection, or `None` when its client can have nothing outstanding: the
    /// client's FIN was received (it sends no more data) or the connection is closing on both sides.
    pub fn for_plan(plan: &RestorePlan) -> Option<Prompt> {
        let open_for_data = matches!(plan.state, TcpState::Established | TcpState::FinWait1 | TcpState::FinWait2);
        (open_for_data && !plan.fin_received).then_some(Prompt {
            client: plan.remote,
            server: plan.local,
            seq: plan.rcv_nxt.0,
        })
    }

    /// The ICMP message (type 3, code 1 host unreachable) without an IP header: the raw socket adds it.
    /// It quotes the client's own segment to the server, starting at `seq`, as a router would.
    pub fn message(&self) -> [u8; MESSAGE_LEN] {
        let mut buf = [0u8; MESSAGE_LEN];
        {
            let mut icmp = MutableDestinationUnreachablePacket::new(&mut buf).expect("buffer fits the header");
            icmp.set_icmp_type(IcmpTypes::DestinationUnreachable);
            icmp.set_icmp_code(IcmpCodes::DestinationHostUnreachable);
            let quote = icmp.payload_mut();
            {
                let mut ip = MutableIpv4Packet::new(&mut quote[..20]).expect("20 bytes hold an IPv4 header");
                ip.set_version(4);
                ip.set_header_length(5);
                // The quoted datagram's length as sent: a bare TCP header. Receivers only read the ports
                // and the sequence number.
                ip.set_total_length(40);
                ip.set_flags(Ipv4Flags::DontFragment);
                ip.set_ttl(64);
                ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
                ip.set_source(*self.client.ip());
                ip.set_destination(*self.server.ip());
                let sum = ipv4_checksum(&ip.to_immutable());
                ip.set_checksum(sum);
            }
            let tcp = &mut quote[20..28];
            tcp[0..2].copy_from_slice(&self.client.port().to_be_bytes());
            tcp[2..4].copy_from_slice(&self.server.port().to_be_bytes());
            tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        }
        let sum = icmp_checksum(&IcmpPacket::new(&buf).expect("buffer fits the header"));
        buf[2..4].copy_from_slice(&sum.to_be_bytes());
        buf
    }
}

/// What [`send`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PromptReport {
    /// Connections whose whole burst went out.
    pub prompted: u64,
    /// Connections with at least one message the kernel refused, and the last such error.
    pub failed: u64,
    pub last_error: Option<String>,
}

/// Sends every prompt's burst (`burst` messages, see [`burst_for`]) from `source` (the VIP) through a raw
/// ICMP socket. Blocking: run it off the runtime's worker threads. Fails only when the socket cannot be
/// made (no `CAP_NET_RAW`).
pub fn send(source: Ipv4Addr, prompts: &[Prompt], burst: usize) -> io::Result<PromptReport> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    socket.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))?;
    let mut report = PromptReport::default();
    for p in prompts {
        let message = p.message();
        let to = SockAddr::from(SocketAddrV4::new(*p.client.ip(), 0));
        let mut error = None;
        for _ in 0..burst {
            if let Err(e) = socket.send_to(&message, &to) {
                error = Some(format!("{}: {e}", p.client));
            }
        }
        match error {
            None => report.prompted += 1,
            Some(e) => {
                report.failed += 1;
                report.last_error = Some(e);
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::Packet;
    use pnet_packet::icmp::destination_unreachable::DestinationUnreachablePacket;
    use pnet_packet::ipv4::Ipv4Packet;
    use tcp_replay::Seq;

    fn prompt() -> Prompt {
        Prompt { client: "10.0.0.1:40000".parse().unwrap(), server: "10.0.0.100:80".parse().unwrap(), seq: 0xfedc_ba98 }
    }

    #[test]
    fn message_quotes_the_clients_segment_at_the_expected_byte() {
        let buf = prompt().message();
        let icmp = DestinationUnreachablePacket::new(&buf).unwrap();
        assert_eq!(icmp.get_icmp_type(), IcmpTypes::DestinationUnreachable);
        assert_eq!(icmp.get_icmp_code(), IcmpCodes::DestinationHostUnreachable);
        assert_eq!(icmp.get_checksum(), icmp_checksum(&IcmpPacket::new(&buf).unwrap()));
        let ip = Ipv4Packet::new(&icmp.payload()[..20]).unwrap();
        assert_eq!(ip.get_source(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(ip.get_destination(), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(ip.get_next_level_protocol(), IpNextHeaderProtocols::Tcp);
        assert_eq!(ip.get_checksum(), ipv4_checksum(&ip));
        let tcp = &icmp.payload()[20..28];
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 40000);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 80);
        assert_eq!(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]), 0xfedc_ba98);
    }

    #[test]
    fn the_burst_undoes_every_backoff_step_the_outage_allowed_and_one_more() {
        let ms = Duration::from_millis;
        // Timeouts at 200, 600, 1400, 3000, 6200 ms (RTO doubling from 200 ms).
        assert_eq!(burst_for(ms(0)), 1);
        assert_eq!(burst_for(ms(199)), 1);
        assert_eq!(burst_for(ms(200)), 2);
        assert_eq!(burst_for(ms(599)), 2);
        assert_eq!(burst_for(ms(600)), 3);
        assert_eq!(burst_for(ms(1400)), 4);
        assert_eq!(burst_for(ms(6200)), BURST);
        assert_eq!(burst_for(Duration::from_secs(3600)), BURST);
    }

    #[test]
    fn a_corrupted_message_fails_its_checksum() {
        let mut buf = prompt().message();
        buf[30] ^= 1;
        let icmp = IcmpPacket::new(&buf).unwrap();
        assert_ne!(icmp.get_checksum(), icmp_checksum(&icmp));
    }

    fn established_plan() -> RestorePlan {
        use tcp_replay::plan::{PlanOptions, RepairWindow};
        RestorePlan {
            local: "10.0.0.100:80".parse().unwrap(),
            remote: "10.0.0.1:40000".parse().unwrap(),
            state: TcpState::Established,
            options: PlanOptions { mss: 1460, wscale: Some((7, 7)), sack: true, timestamps: true },
            snd_una: Seq(1),
            send_queue: Default::default(),
            unsent: Default::default(),
            rcv_nxt: Seq(7),
            recv_queue: Default::default(),
            fin_sent: false,
            fin_received: false,
            window: RepairWindow {
                snd_wl1: Seq(7),
                snd_wnd: 65536,
                max_window: 65536,
                rcv_wnd: 65536,
                rcv_wup: Seq(7),
            },
            tsval: None,
            ts_recent: None,
        }
    }

    #[test]
    fn only_connections_whose_client_may_still_send_are_prompted() {
        let mut plan = established_plan();
        assert_eq!(Prompt::for_plan(&plan).map(|p| p.seq), Some(7));
        for state in [TcpState::FinWait1, TcpState::FinWait2] {
            plan.state = state;
            assert!(Prompt::for_plan(&plan).is_some(), "{state:?}");
        }
        plan.fin_received = true;
        assert_eq!(Prompt::for_plan(&plan), None, "the client's FIN was received");
        plan.fin_received = false;
        for state in [TcpState::CloseWait, TcpState::LastAck, TcpState::Closing, TcpState::TimeWait] {
            plan.state = state;
            assert_eq!(Prompt::for_plan(&plan), None, "{state:?}");
        }
    }
}
