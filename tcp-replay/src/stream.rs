//! Exactly-once reassembly of one direction of a TCP byte stream.
//!
//! Offsets are 64-bit stream positions (0 = first byte after the SYN), so the
//! 32-bit sequence wrap never reaches this layer. The first copy of a byte wins:
//! retransmissions and overlaps never deliver a byte twice. Bytes that a peer's
//! ACK proves were sent but that were never seen (a capture that dropped them)
//! become a zero-filled, recorded gap, so the stream can move on; a hole too large
//! to fill takes the retained bytes before it into its gap instead.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

/// Largest hole [`Stream::skip_to`] zero-fills. A peer's ACK may run up to a window
/// (1 GiB with window scaling) past the bytes seen: filling that would let one
/// 40-byte packet of a hostile capture allocate a gigabyte.
pub const MAX_ZERO_FILL: u64 = 1 << 20;

/// One direction's reassembled bytes, retained from `start()` on.
///
/// Deserialising checks the invariants (a snapshot from the network is untrusted).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "StreamParts")]
pub struct Stream {
    /// Offset of `data[0]`.
    start: u64,
    /// Contiguous bytes `[start, start + data.len())`.
    #[serde(serialize_with = "as_bytes::serialize_deque")]
    data: VecDeque<u8>,
    /// Non-overlapping out-of-order pieces beyond the contiguous end, by offset.
    #[serde(serialize_with = "as_bytes::serialize_pieces")]
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    /// Ranges that were never seen and are zero-filled in `data`.
    gaps: Vec<Range<u64>>,
}

/// The serialised form of a [`Stream`], checked before it becomes one.
#[derive(serde::Deserialize)]
struct StreamParts {
    start: u64,
    #[serde(deserialize_with = "as_bytes::deserialize_deque")]
    data: VecDeque<u8>,
    #[serde(deserialize_with = "as_bytes::deserialize_pieces")]
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    gaps: Vec<Range<u64>>,
}

/// The bytes of a stream as byte strings (`serialize_bytes`), not sequences of numbers: the same bincode
/// encoding (a length, then the bytes), but copied at once instead of one serde call per byte, which
/// made a joining spare's snapshot of a few hundred megabytes take seconds. Either form is read back.
mod as_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_bytes::{ByteBuf, Bytes};
    use std::collections::{BTreeMap, VecDeque};

    pub fn serialize_deque<S: Serializer>(data: &VecDeque<u8>, s: S) -> Result<S::Ok, S::Error> {
        match data.as_slices() {
            (a, []) => Bytes::new(a).serialize(s),
            (a, b) => Bytes::new(&[a, b].concat()).serialize(s),
        }
    }

    pub fn serialize_pieces<S: Serializer>(pieces: &BTreeMap<u64, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(pieces.iter().map(|(off, piece)| (off, Bytes::new(piece))))
    }

    pub fn deserialize_deque<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<u8>, D::Error> {
        ByteBuf::deserialize(d).map(|b| VecDeque::from(b.into_vec()))
    }

    pub fn deserialize_pieces<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, Vec<u8>>, D::Error> {
        let pieces = BTreeMap::<u64, ByteBuf>::deserialize(d)?;
        Ok(pieces.into_iter().map(|(off, piece)| (off, piece.into_vec())).collect())
    }
}

impl TryFrom<StreamParts> for Stream {
    type Error = String;

    fn try_from(p: StreamParts) -> Result<Stream, String> {
        let end = p.start.checked_add(p.data.len() as u64).ok_or("stream end overflows")?;
        let mut cursor = end;
        let mut total = 0usize;
        for (i, (off, piece)) in p.pending.iter().enumerate() {
            // The first piece lies beyond a hole (touching the contiguous bytes, it would
            // have joined them); a later one may touch the piece before it.
            let overlaps = if i == 0 { *off <= cursor } else { *off < cursor };
            if overlaps || piece.is_empty() {
                return Err(format!("out-of-order piece at {off} overlaps what precedes it"));
            }
            cursor = off.checked_add(piece.len() as u64).ok_or("piece end overflows")?;
            total += piece.len();
        }
        if total != p.pending_bytes {
            return Err(format!("pending byte count {} does not match the pieces ({total})", p.pending_bytes));
        }
        if p.gaps.iter().any(|g| g.start >= g.end) || p.gaps.windows(2).any(|w| w[0].end > w[1].start) {
            return Err("gaps are empty or out of order".into());
        }
        Ok(Stream { start: p.start, data: p.data, pending: p.pending, pending_bytes: p.pending_bytes, gaps: p.gaps })
    }
}

impl Stream {
    pub fn new() -> Stream {
        Stream::default()
    }

    /// Oldest offset still retained.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// End of the contiguous bytes: everything below it is known (or a recorded gap).
    pub fn contiguous_end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    /// End of the highest byte seen, including out-of-order pieces.
    pub fn highest_end(&self) -> u64 {
        match self.pending.last_key_value() {
            Some((off, piece)) => off + piece.len() as u64,
            None => self.contiguous_end(),
        }
    }

    /// Bytes held out of order, waiting for a hole to fill.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Bytes held in memory in all.
    pub fn retained_bytes(&self) -> usize {
        self.data.len() + self.pending_bytes
    }

    /// Ranges skipped because they were never seen (zero-filled in the data).
    pub fn gaps(&self) -> &[Range<u64>] {
        &self.gaps
    }

    /// Inserts `bytes` at stream offset `offset`. Bytes already known are ignored.
    /// Returns how far the contiguous end advanced.
    pub fn insert(&mut self, offset: u64, bytes: &[u8]) -> u64 {
        let end_before = self.contiguous_end();
        let end = offset + bytes.len() as u64;
        if end <= end_before || bytes.is_empty() {
            return 0;
        }
        let (mut offset, mut bytes) = (offset, bytes);
        if offset < end_before {
            bytes = &bytes[(end_before - offset) as usize..];
            offset = end_before;
        }
        if offset == end_before && self.pending.is_empty() {
            self.data.extend(bytes);
            return bytes.len() as u64;
        }
        self.insert_pending(offset, bytes);
        self.drain_pending();
        self.contiguous_end() - end_before
    }

    /// Stores the parts of `[offset, offset+len)` not already pending.
    fn insert_pending(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        let mut cursor = offset;
        // Pieces that could overlap: the one starting at or before `offset`, and all up to `end`.
        let first = self.pending.range(..=offset).next_back().map(|(k, _)| *k).unwrap_or(offset);
        let covered: Vec<(u64, u64)> = self.pending.range(first..end).map(|(k, v)| (*k, *k + v.len() as u64)).collect();
        for (s, e) in covered {
            if e <= cursor {
                continue;
            }
            if s > cursor {
                self.add_piece(cursor, &bytes[(cursor - offset) as usize..(s - offset) as usize]);
            }
            cursor = cursor.max(e);
            if cursor >= end {
                break;
            }
        }
        if cursor < end {
            self.add_piece(cursor, &bytes[(cursor - offset) as usize..]);
        }
    }

    fn add_piece(&mut self, offset: u64, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.pending_bytes += bytes.len();
            self.pending.insert(offset, bytes.to_vec());
        }
    }

    fn drain_pending(&mut self) {
        loop {
            let end = self.contiguous_end();
            let Some(entry) = self.pending.first_entry() else {
                break;
            };
            if *entry.key() > end {
                break;
            }
            let off = *entry.key();
            let piece = entry.remove();
            self.pending_bytes -= piece.len();
            let skip = (end - off) as usize;
            if skip < piece.len() {
                self.data.extend(&piece[skip..]);
            }
        }
    }

    /// Declares that everything below `offset` was sent although not all of it was
    /// seen: holes below `offset` become recorded gaps, zero-filled when bytes before
    /// them are still retained (else the start just moves on). A hole larger than
    /// [`MAX_ZERO_FILL`] is not filled: the retained bytes before it are given up and
    /// the gap covers them too. Returns the bytes skipped (the holes).
    pub fn skip_to(&mut self, offset: u64) -> u64 {
        let mut skipped = 0;
        while self.contiguous_end() < offset {
            let end = self.contiguous_end();
            let next = self.pending.first_key_value().map(|(k, _)| *k).unwrap_or(offset).min(offset);
            let hole = next - end;
            if self.data.is_empty() || hole > MAX_ZERO_FILL {
                let from = self.start;
                // Gaps inside the bytes given up join the one that now covers them.
                self.gaps.retain(|g| g.end <= from);
                self.gaps.push(from..next);
                self.data.clear();
                self.start = next;
            } else {
                self.gaps.push(end..next);
                self.data.extend(std::iter::repeat_n(0u8, hole as usize));
            }
            skipped += hole;
            self.drain_pending();
        }
        skipped
    }

    /// Drops retained bytes below `offset` (they are no longer needed). Gaps below it are forgotten.
    pub fn trim(&mut self, offset: u64) {
        if offset <= self.start {
            return;
        }
        let end = self.contiguous_end();
        if offset >= end {
            self.data.clear();
            self.start = offset;
            // Pending pieces entirely below `offset` go too; one straddling it is cut.
            while let Some(entry) = self.pending.first_entry() {
                let k = *entry.key();
                if k >= offset {
                    break;
                }
                let piece = entry.remove();
                self.pending_bytes -= piece.len();
                let piece_end = k + piece.len() as u64;
                if piece_end > offset {
                    let rest = piece[(offset - k) as usize..].to_vec();
                    self.pending_bytes += rest.len();
                    self.pending.insert(offset, rest);
                }
            }
            self.drain_pending();
        } else {
            self.data.drain(..(offset - self.start) as usize);
            self.start = offset;
        }
        self.gaps.retain(|g| g.end > offset);
    }

    /// Copies the retained contiguous bytes in `range` (clamped to what is held).
    pub fn copy_range(&self, range: Range<u64>) -> Vec<u8> {
        let (a, b) = self.slices(range);
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        v
    }

    /// The retained contiguous bytes in `range` as (at most) two slices.
    pub fn slices(&self, range: Range<u64>) -> (&[u8], &[u8]) {
        let from = range.start.clamp(self.start, self.contiguous_end());
        let to = range.end.clamp(from, self.contiguous_end());
        let (a, b) = self.data.as_slices();
        let (lo, hi) = ((from - self.start) as usize, (to - self.start) as usize);
        if hi <= a.len() {
            (&a[lo..hi], &[])
        } else if lo >= a.len() {
            (&b[lo - a.len()..hi - a.len()], &[])
        } else {
            (&a[lo..], &b[..hi - a.len()])
        }
    }

    /// Whether any byte in `range` lies in a recorded gap.
    pub fn has_gap_in(&self, range: Range<u64>) -> bool {
        self.gaps.iter().any(|g| g.start < range.end && range.start < g.end)
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn in_order_bytes_are_contiguous() {
        let mut s = Stream::new();
        assert_eq!(s.insert(0, b"hello "), 6);
        assert_eq!(s.insert(6, b"world"), 5);
        assert_eq!(s.copy_range(0..11), b"hello world");
    }

    #[test]
    fn retransmitted_bytes_are_not_delivered_twice() {
        let mut s = Stream::new();
        s.insert(0, b"abcdef");
        assert_eq!(s.insert(2, b"XYZ"), 0);
        assert_eq!(s.insert(4, b"XXgh"), 2);
        assert_eq!(s.copy_range(0..8), b"abcdefgh");
    }

    #[test]
    fn out_of_order_pieces_fill_in_when_the_hole_closes() {
        let mut s = Stream::new();
        assert_eq!(s.insert(6, b"ghi"), 0);
        assert_eq!(s.insert(3, b"def"), 0);
        assert_eq!(s.highest_end(), 9);
        assert_eq!(s.pending_bytes(), 6);
        assert_eq!(s.insert(0, b"abc"), 9);
        assert_eq!(s.copy_range(0..9), b"abcdefghi");
        assert_eq!(s.pending_bytes(), 0);
    }

    #[test]
    fn overlapping_out_of_order_pieces_keep_the_first_copy() {
        let mut s = Stream::new();
        s.insert(4, b"EFGH");
        s.insert(2, b"cdxxxxij"); // overlaps EFGH; its x's must not replace them
        s.insert(0, b"ab");
        assert_eq!(s.copy_range(0..10), b"abcdEFGHij");
    }

    #[test]
    fn trimming_releases_memory_and_keeps_later_bytes() {
        let mut s = Stream::new();
        s.insert(0, b"0123456789");
        s.trim(4);
        assert_eq!(s.start(), 4);
        assert_eq!(s.copy_range(0..10), b"456789");
        s.insert(12, b"cd");
        s.trim(11); // beyond the contiguous end: the hole at 10..11 is forgotten
        assert_eq!(s.contiguous_end(), 11);
        s.insert(11, b"b");
        assert_eq!(s.copy_range(11..14), b"bcd");
    }

    #[test]
    fn skipping_a_lost_range_records_a_gap() {
        let mut s = Stream::new();
        s.insert(0, b"ab");
        s.insert(5, b"fg");
        assert_eq!(s.skip_to(7), 3);
        assert_eq!(s.gaps(), &[2..5]);
        assert_eq!(s.copy_range(0..7), b"ab\0\0\0fg");
        assert!(s.has_gap_in(4..6));
        assert!(!s.has_gap_in(5..7));
        s.trim(5);
        assert!(s.gaps().is_empty());
    }

    #[test]
    fn skipping_with_nothing_retained_allocates_nothing() {
        let mut s = Stream::new();
        s.insert(0, b"ab");
        s.trim(2);
        s.insert(1 << 40, b"z");
        assert_eq!(s.skip_to((1 << 40) + 1), (1 << 40) - 2);
        assert_eq!(s.gaps(), &[2..(1 << 40)]);
        assert_eq!(s.copy_range(0..u64::MAX), b"z");
        assert_eq!(s.start(), 1 << 40);
    }

    #[test]
    fn deserialising_refuses_broken_invariants() {
        let mut s = Stream::new();
        s.insert(0, b"ab");
        s.insert(5, b"fg");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Stream>(&json).unwrap(), s);
        let bad_count = json.replace("\"pending_bytes\":2", "\"pending_bytes\":9");
        assert!(serde_json::from_str::<Stream>(&bad_count).is_err());
        let overlapping = json.replace("\"5\":", "\"1\":");
        assert!(serde_json::from_str::<Stream>(&overlapping).is_err());
    }

    #[test]
    fn a_hole_too_large_to_fill_gives_up_the_bytes_before_it_as_a_gap() {
        // Found by the tracker fuzz target: a server ACK 62 MB past the client bytes
        // seen made the tracker zero-fill 62 MB.
        let mut s = Stream::new();
        s.insert(0, b"ab");
        s.insert(3, b"c");
        s.skip_to(3);
        let far = 4 + MAX_ZERO_FILL + 1;
        s.insert(far, b"z");
        assert_eq!(s.skip_to(far + 1), MAX_ZERO_FILL + 1);
        assert_eq!(s.gaps(), &[0..far]);
        assert_eq!(s.start(), far);
        assert_eq!(s.retained_bytes(), 1);
        assert_eq!(s.copy_range(0..far + 1), b"z");
        assert!(s.has_gap_in(0..1));
        // A hole of exactly the limit is still filled.
        let mut s = Stream::new();
        s.insert(0, b"a");
        assert_eq!(s.skip_to(1 + MAX_ZERO_FILL), MAX_ZERO_FILL);
        assert_eq!(s.retained_bytes() as u64, 1 + MAX_ZERO_FILL);
        assert_eq!(s.gaps(), &[1..1 + MAX_ZERO_FILL]);
    }

    #[test]
    fn adjacent_out_of_order_pieces_survive_the_snapshot_encoding() {
        // Found by the tracker fuzz target on the cooked-sll fixture: a piece that
        // lands right after another is kept as its own piece, and a joining spare
        // refused the snapshot of such a stream.
        let mut s = Stream::new();
        s.insert(0, b"ab");
        s.insert(5, b"fg");
        s.insert(7, b"hi");
        assert_eq!(s.pending_bytes(), 4);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Stream>(&json).unwrap(), s);
        // A first piece touching the contiguous bytes is still refused: it would have joined them.
        let touching = json.replace("\"5\":", "\"2\":").replace("\"7\":", "\"4\":");
        assert!(serde_json::from_str::<Stream>(&touching).is_err());
        s.insert(2, b"cde");
        assert_eq!(s.copy_range(0..9), b"abcdefghi");
    }

    #[test]
    fn slices_span_the_ring_buffer_seam() {
        let mut s = Stream::new();
        s.insert(0, &[1u8; 10]);
        s.trim(8);
        s.insert(10, &[2u8; 20]);
        let v = s.copy_range(9..25);
        assert_eq!(v.len(), 16);
        assert_eq!(v[0], 1);
        assert!(v[1..].iter().all(|b| *b == 2));
    }
}
