//! L2 announcements: the load-balancer addresses this node answers ARP and neighbour
//! solicitations for, on which external device, and until when.
use super::{Addr4, Addr6, MapAddr};

/// Hash `L2Announce4KeyV1 -> L2AnnounceV1`: the IPv4 addresses XDP answers ARP requests for.
pub const MAP_L2_ANNOUNCE: &str = "LB4_L2ANN_V1";
/// Hash `L2Announce6KeyV1 -> L2AnnounceV1`: the IPv6 addresses XDP answers neighbour
/// solicitations for.
pub const MAP_L2_ANNOUNCE6: &str = "LB6_L2ANN_V1";

/// An address on one external device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L2AnnounceKeyV1<A: MapAddr> {
    pub ifindex: u32,
    pub addr: A,
}

pub type L2Announce4KeyV1 = L2AnnounceKeyV1<Addr4>;
pub type L2Announce6KeyV1 = L2AnnounceKeyV1<Addr6>;

/// How to answer for an address, and until when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2AnnounceV1 {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) past which the entry is not answered: the agent
    /// moves it forward each time its node's heartbeat is renewed, so a node that stops
    /// renewing (partitioned, agent gone) falls silent on its own, no later than the other
    /// nodes see its heartbeat go stale.
    pub expires_ns: u64,
    /// The device's MAC address, the answer.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
super::impl_pod!(generic L2AnnounceKeyV1);
#[cfg(feature = "user")]
super::impl_pod!(L2AnnounceV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn l2_announce() {
        assert_layout!(L2Announce4KeyV1, size 8, align 4, { ifindex @ 0, addr @ 4 });
        assert_layout!(L2Announce6KeyV1, size 20, align 4, { ifindex @ 0, addr @ 4 });
        assert_layout!(L2AnnounceV1, size 16, align 8, { expires_ns @ 0, mac @ 8, _pad @ 14 });
    }
}
