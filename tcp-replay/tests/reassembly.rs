//! Property: any segmentation, duplication, reordering and overlapping
//! retransmission of a byte stream reassembles to exactly the same bytes,
//! with each byte counted once, wherever the sequence space starts (the 2^32
//! wrap included).

use proptest::prelude::*;
use std::time::Duration;
use tcp_replay::segment::{Checksums, Segment, SegmentBuilder, TcpFlags, TcpOptions};
use tcp_replay::stream::Stream;
use tcp_replay::{Dir, Seq, Tracker};

/// A stream, and the pieces (offset, len) it is sent as, in wire order.
fn delivery() -> impl Strategy<Value = (Vec<u8>, Vec<(usize, usize)>)> {
    proptest::collection::vec(any::<u8>(), 1..6000).prop_flat_map(|data| {
        let n = data.len();
        // Cut points give a segmentation; extra random ranges are overlapping retransmissions.
        let cuts = proptest::collection::vec(1..n.max(2), 0..40);
        let extra = proptest::collection::vec((0..n, 1..1500usize), 0..15);
        (Just(data), cuts, extra, any::<u64>()).prop_map(move |(data, mut cuts, extra, seed)| {
            cuts.push(0);
            cuts.push(n);
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
            for (off, len) in extra {
                pieces.push((off, len.min(n - off)));
            }
            // Duplicate some pieces, then shuffle deterministically from the seed.
            let dups: Vec<_> = pieces.iter().copied().filter(|(o, _)| (o ^ seed as usize).is_multiple_of(3)).collect();
            pieces.extend(dups);
            let mut state = seed | 1;
            for i in (1..pieces.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                pieces.swap(i, (state % (i as u64 + 1)) as usize);
            }
            (data, pieces)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn stream_reassembles_any_delivery_exactly_once((data, pieces) in delivery(), base in any::<u32>()) {
        let mut s = Stream::new();
        let base = base as u64;
        s.trim(base);
        for (off, len) in &pieces {
            s.insert(base + *off as u64, &data[*off..off + len]);
        }
        prop_assert_eq!(s.contiguous_end(), base + data.len() as u64);
        prop_assert_eq!(s.pending_bytes(), 0);
        prop_assert_eq!(s.copy_range(base..base + data.len() as u64), data);
    }

    #[test]
    fn tracker_reassembles_any_delivery_across_the_wrap((data, pieces) in delivery(), isn_back in 0u32..8000) {
        // The ISN sits just below 2^32, so most deliveries cross the wrap.
        let isn = Seq(0u32.wrapping_sub(isn_back));
        let c = "10.0.0.1:40000".parse().unwrap();
        let s = "10.0.0.2:80".parse().unwrap();
        let mut t = Tracker::new();
        let mut feed = |dir: Dir, flags: u8, seq: Seq, ack: Seq, payload: &[u8]| {
            let (src, dst) = if dir == Dir::ToServer { (c, s) } else { (s, c) };
            let mut b = SegmentBuilder::new(src, dst);
            b.flags = flags;
            b.seq = seq;
            b.ack = ack;
            b.window = 65535;
            b.options = TcpOptions::default();
            let bytes = b.build(payload);
            let seg = Segment::parse_ipv4(&bytes, Checksums::Verify).unwrap();
            t.handle_segment(Duration::ZERO, dir, &seg).unwrap();
        };
        feed(Dir::ToServer, TcpFlags::SYN, isn, Seq(0), b"");
        feed(Dir::ToClient, TcpFlags::SYN | TcpFlags::ACK, Seq(77), isn + 1, b"");
        feed(Dir::ToServer, TcpFlags::ACK, isn + 1, Seq(78), b"");
        for (off, len) in &pieces {
            feed(Dir::ToServer, TcpFlags::ACK, isn + 1 + *off as u32, Seq(78), &data[*off..off + len]);
        }
        let sent: usize = pieces.iter().map(|(_, l)| l).sum();
        let e = t.sender(Dir::ToServer);
        prop_assert_eq!(e.payload_bytes, data.len() as u64);
        prop_assert_eq!(e.retransmitted_bytes, (sent - data.len()) as u64);
        prop_assert_eq!(t.stream(Dir::ToServer).copy_range(0..data.len() as u64), data);
    }
}
