//! loadBalancerSourceRanges: the client CIDRs each LoadBalancer frontend accepts.

/// LPM trie `(prefix length, SourceRange4V1) -> u8`: one entry per CIDR of a frontend. The
/// prefix length counts the 32 bits of `service_id` plus the CIDR's own length, so one lookup
/// answers "is this client in this frontend's ranges", however many ranges there are.
pub const MAP_SOURCE_RANGES: &str = "LB4_SRCRANGE_V1";

/// The data part of an LPM key: the frontend, then the client address (wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange4V1 {
    /// Always matched whole (the first 32 prefix bits), so its byte order does not matter.
    pub service_id: u32,
    pub addr: u32,
}

impl SourceRange4V1 {
    /// Bits of the key that name the frontend, ahead of the address bits.
    pub const SERVICE_BITS: u32 = 32;

    #[inline(always)]
    pub const fn new(service_id: u32, addr: u32) -> Self {
        Self { service_id, addr }
    }
}

#[cfg(feature = "user")]
super::impl_pod!(SourceRange4V1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn source_range() {
        assert_layout!(SourceRange4V1, size 8, align 4, { service_id @ 0, addr @ 4 });
    }
}
