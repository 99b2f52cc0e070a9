//! The Internet checksum's one's-complement arithmetic, for the datapath's rewrites and the
//! agent's own frames alike. The sum does not care about byte order, so raw wire-order words
//! are summed and the folded result is written back in the same order.

/// Folds a 32-bit one's-complement sum to 16 bits (enough for sums of up to 65,537 words).
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The one's-complement sum of 16-bit words, unfolded. A length known at compile time: the
/// verifier wants the loop unrolled.
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    for w in 0..N / 2 {
        sum += u16::from_ne_bytes([bytes[2 * w], bytes[2 * w + 1]]) as u32;
    }
    sum
}
