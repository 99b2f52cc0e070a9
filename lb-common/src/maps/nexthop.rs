//! The next hop of established remote flows, cached so that their packets skip the FIB
//! lookup: what the FIB answered for a (source, destination, arriving device), until the
//! agent sees a neighbour, route, address or link change (the generation) or a second passes.
use super::{Addr4, Addr6, MapAddr};

/// LRU hash `NextHop4KeyV1 -> NextHopV1`, and its IPv6 twin.
pub const MAP_NEXT_HOPS: &str = "LB4_NEXTHOP_V1";
pub const MAP_NEXT_HOPS6: &str = "LB6_NEXTHOP_V1";
/// Array `0 -> u32`: the generation the agent bumps on every neighbour, route, address or
/// link change; entries of an older one are looked up again.
pub const MAP_NEXT_HOP_GENERATION: &str = "LB_NHGEN_V1";
/// Next hops cached per family (source, destination and device triples in use), unless
/// `--max-next-hops` says otherwise.
pub const MAX_NEXT_HOPS: u32 = 16_384;
/// A cached next hop is used for at most this long: changes the agent misses (it is down)
/// last no longer.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// A packet's route key: its source and destination after translation, and the device it
/// arrived on (the FIB lookup's inputs but the length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NextHopKeyV1<A: MapAddr> {
    pub src: A,
    pub dst: A,
    pub ifindex: u32,
}

pub type NextHop4KeyV1 = NextHopKeyV1<Addr4>;
pub type NextHop6KeyV1 = NextHopKeyV1<Addr6>;

/// What the FIB answered: the device to send on and the MACs to write, the route's MTU (a
/// longer packet is looked up again, for the FIB to refuse it), and until when it holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopV1 {
    /// The state clock (`bpf_ktime_get_coarse_ns`) past which the entry is stale.
    pub expires_ns: u64,
    pub ifindex: u32,
    pub generation: u32,
    pub mtu: u16,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
super::impl_pod!(generic NextHopKeyV1);
#[cfg(feature = "user")]
super::impl_pod!(NextHopV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn next_hops() {
        assert_layout!(NextHop4KeyV1, size 12, align 4, { src @ 0, dst @ 4, ifindex @ 8 });
        assert_layout!(NextHop6KeyV1, size 36, align 4, { src @ 0, dst @ 16, ifindex @ 32 });
        assert_layout!(NextHopV1, size 32, align 8, { expires_ns @ 0, ifindex @ 8, generation @ 12, mtu @ 16, dmac @ 18, smac @ 24, _pad @ 30 });
    }
}
