//! The next hop of translated packets routed here, cached so that they skip the FIB lookup:
//! what the FIB answered for a (source, destination, arriving device), until the agent sees a
//! neighbour, route, address or link change (the generation) or a second passes. Packets to a
//! backend find it in their CPU's slot of the backend's id; replies in a shared LRU.
use super::{Addr4, Addr6, MapAddr};

/// LRU hash `NextHop4KeyV1 -> NextHopV1`, and its IPv6 twin.
pub const MAP_NEXT_HOPS: &str = "LB4_NEXTHOP_V1";
pub const MAP_NEXT_HOPS6: &str = "LB6_NEXTHOP_V1";
/// Per-CPU array `backend_next_hop_slot(id) -> BackendNextHop4V1`, and its IPv6 twin (not
/// pinned).
pub const MAP_BACKEND_NEXT_HOPS: &str = "LB4_BENH_V1";
pub const MAP_BACKEND_NEXT_HOPS6: &str = "LB6_BENH_V1";
/// Array `0 -> u32`: the generation the agent bumps on every neighbour, route, address or
/// link change; entries of an older one are looked up again.
pub const MAP_NEXT_HOP_GENERATION: &str = "LB_NHGEN_V1";
/// Next hops cached per family (source, destination and device triples in use), unless
/// `--max-next-hops` says otherwise.
pub const MAX_NEXT_HOPS: u32 = 16_384;
/// Slots of `LB4_BENH_V1` and `LB6_BENH_V1` on each CPU. A backend's slot is its id modulo
/// this: ids are handed out densely from 1, so the first 2,047 backends never share one (two
/// that do take turns, each miss asking the FIB).
pub const BACKEND_NEXT_HOP_SLOTS: u32 = 2048;
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
    /// The state clock (`StateClockV1`) past which the entry is stale.
    pub expires_ns: u64,
    pub ifindex: u32,
    pub generation: u32,
    pub mtu: u16,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub _pad: [u8; 2],
}

/// A next hop towards a backend, in this CPU's slot of the backend's id: the answer, and the
/// route key it answers (checked whole before use: another backend sharing the slot, another
/// source or device asks again). Per CPU, so a slot is only ever written by the CPU that
/// reads it, and a reader never sees half of another packet's answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendNextHopV1<A: MapAddr> {
    pub hop: NextHopV1,
    pub key: NextHopKeyV1<A>,
    pub _pad: u32,
}

pub type BackendNextHop4V1 = BackendNextHopV1<Addr4>;
pub type BackendNextHop6V1 = BackendNextHopV1<Addr6>;

/// The per-CPU slot of backend `backend_id`'s next hop.
#[inline(always)]
pub fn backend_next_hop_slot(backend_id: u32) -> u32 {
    backend_id % BACKEND_NEXT_HOP_SLOTS
}

#[cfg(feature = "user")]
super::impl_pod!(generic NextHopKeyV1);
#[cfg(feature = "user")]
super::impl_pod!(generic BackendNextHopV1);
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
        assert_layout!(BackendNextHop4V1, size 48, align 8, { hop @ 0, key @ 32, _pad @ 44 });
        assert_layout!(BackendNextHop6V1, size 72, align 8, { hop @ 0, key @ 32, _pad @ 68 });
    }

    #[test]
    fn backend_slots_are_in_range_and_distinct_for_dense_ids() {
        assert_eq!(backend_next_hop_slot(0), 0);
        assert_eq!(backend_next_hop_slot(BACKEND_NEXT_HOP_SLOTS - 1), BACKEND_NEXT_HOP_SLOTS - 1);
        assert_eq!(backend_next_hop_slot(BACKEND_NEXT_HOP_SLOTS + 5), 5);
        // Dense ids below the slot count each have their own.
        assert!((1..BACKEND_NEXT_HOP_SLOTS).all(|id| backend_next_hop_slot(id) == id));
    }
}
