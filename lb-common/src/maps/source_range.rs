//! loadBalancerSourceRanges: the client CIDRs each LoadBalancer frontend accepts.
use super::{Addr4, Addr6, MapAddr};

/// LPM trie `(prefix length, SourceRange4V1) -> u8`: one entry per CIDR of a frontend. The
/// prefix length counts the 32 bits of `service_id` plus the CIDR's own length, so one lookup
/// answers "is this client in this frontend's ranges", however many ranges there are.
pub const MAP_SOURCE_RANGES: &str = "LB4_SRCRANGE_V1";
/// The same for IPv6 frontends and clients: `(prefix length, SourceRange6V1) -> u8`.
pub const MAP_SOURCE_RANGES6: &str = "LB6_SRCRANGE_V1";

/// The data part of an LPM key: the frontend, then the client address (wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeV1<A: MapAddr> {
    /// Always matched whole (the first 32 prefix bits), so its byte order does not matter.
    pub service_id: u32,
    pub addr: A,
}

pub type SourceRange4V1 = SourceRangeV1<Addr4>;
pub type SourceRange6V1 = SourceRangeV1<Addr6>;

impl<A: MapAddr> SourceRangeV1<A> {
    /// Bits of the key that name the frontend, ahead of the address bits.
    pub const SERVICE_BITS: u32 = 32;

    #[inline(always)]
    pub const fn new(service_id: u32, addr: A) -> Self {
        Self { service_id, addr }
    }
}

#[cfg(feature = "user")]
super::impl_pod!(generic SourceRangeV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn source_range() {
        assert_layout!(SourceRange4V1, size 8, align 4, { service_id @ 0, addr @ 4 });
        assert_layout!(SourceRange6V1, size 20, align 4, { service_id @ 0, addr @ 4 });
    }
}
