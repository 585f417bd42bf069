//! TCP sequence numbers: 32-bit values compared with wrapping arithmetic (RFC 9293 §3.4).
//!
//! `Seq` deliberately has no `Ord`: two sequence numbers are only comparable when
//! they are less than 2^31 apart, which is always true inside one window.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::ops::{Add, Sub};

/// A TCP sequence (or acknowledgement) number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u32);

impl Seq {
    /// Signed distance `self - other`, correct across the 2^32 wrap.
    #[inline]
    pub fn diff(self, other: Seq) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }

    /// The later of two sequence numbers.
    #[inline]
    pub fn max(self, other: Seq) -> Seq {
        if self.diff(other) >= 0 { self } else { other }
    }

    /// The earlier of two sequence numbers.
    #[inline]
    pub fn min(self, other: Seq) -> Seq {
        if self.diff(other) <= 0 { self } else { other }
    }
}

impl PartialOrd for Seq {
    #[inline]
    fn partial_cmp(&self, other: &Seq) -> Option<Ordering> {
        Some(self.diff(*other).cmp(&0))
    }
}

impl Add<u32> for Seq {
    type Output = Seq;
    #[inline]
    fn add(self, rhs: u32) -> Seq {
        Seq(self.0.wrapping_add(rhs))
    }
}

impl Sub<u32> for Seq {
    type Output = Seq;
    #[inline]
    fn sub(self, rhs: u32) -> Seq {
        Seq(self.0.wrapping_sub(rhs))
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seq({})", self.0)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_holds_across_the_wrap() {
        let before = Seq(u32::MAX - 10);
        let after = before + 20;
        assert_eq!(after, Seq(9));
        assert!(before < after);
        assert!(after > before);
        assert_eq!(after.diff(before), 20);
        assert_eq!(before.diff(after), -20);
        assert_eq!(before.max(after), after);
        assert_eq!(before.min(after), before);
        assert_eq!(after - 20, before);
    }

    #[test]
    fn equal_numbers_compare_equal() {
        assert_eq!(Seq(5).partial_cmp(&Seq(5)), Some(Ordering::Equal));
        assert!(Seq(5) <= Seq(5));
    }

    #[test]
    fn half_space_apart_is_the_limit() {
        let a = Seq(0);
        assert!(a + 0x7fff_ffff > a);
        // Exactly 2^31 apart is ambiguous; diff reports it as negative.
        assert!((a + 0x8000_0000).diff(a) < 0);
    }
}
