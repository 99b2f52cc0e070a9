//! Incremental Internet checksum updates (RFC 1624, eqn. 3): `HC' = ~(~HC + ~m + m')`.
//! The one's-complement sum does not care about byte order, so raw wire-order values are used.

pub use lb_common::csum::{fold, sum_words};

/// What replacing 4 bytes `old` with `new` adds to a checksum (`~m + m'`), unfolded: the
/// differences of several words add up, for one update of the checksum.
#[inline(always)]
pub fn diff4(old: u32, new: u32) -> u32 {
    (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16)
}

/// The same for 2 bytes.
#[inline(always)]
pub fn diff2(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// Applies an unfolded difference to a checksum.
#[inline(always)]
pub fn apply(csum: u16, diff: u32) -> u16 {
    !fold((!csum) as u32 + diff)
}

#[inline(always)]
pub fn replace4(csum: u16, old: u32, new: u32) -> u16 {
    apply(csum, diff4(old, new))
}

#[inline(always)]
pub fn replace2(csum: u16, old: u16, new: u16) -> u16 {
    apply(csum, diff2(old, new))
}
