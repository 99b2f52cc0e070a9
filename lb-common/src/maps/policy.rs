//! NetworkPolicy (the `policy` crate compiles it): which identity an address has, which local
//! pods are isolated in which direction, and what their policies allow. `lb_tc` checks a pod's
//! egress after Service translation, `lb_tc_to_pod` (TC egress of the pod's device) its ingress.
use super::{Addr4, Addr6, MapAddr};

/// LPM trie `IpCacheKeyV1<Addr4> -> IdentityV1`: an address's identity is the longest prefix's.
pub const MAP_IPCACHE: &str = "LB4_IPCACHE_V1";
/// LPM trie `IpCacheKeyV1<Addr6> -> IdentityV1`.
pub const MAP_IPCACHE6: &str = "LB6_IPCACHE_V1";
/// Single addresses (pods, nodes) of the ipcache: a hash lookup that stays as cheap with
/// 100k pods as with one; the tries hold the `ipBlock` prefixes only.
pub const MAP_IPCACHE_HOSTS: &str = "LB4_IPHOST_V1";
pub const MAP_IPCACHE_HOSTS6: &str = "LB6_IPHOST_V1";
/// Rule keys that fix every bit (one peer, one protocol, one port), looked up by hash before
/// the trie (`LB_POLICY_V1`), which holds ranges and wildcards.
pub const MAP_POLICY_EXACT: &str = "LB_POLEXACT_V1";
/// Hash `PolicyEndpoint4KeyV1 -> PolicyEndpointV1`: this node's pods that policies select.
pub const MAP_POLICY_ENDPOINTS: &str = "LB4_POLEP_V1";
/// Hash `PolicyEndpoint6KeyV1 -> PolicyEndpointV1`.
pub const MAP_POLICY_ENDPOINTS6: &str = "LB6_POLEP_V1";
/// LPM trie `PolicyKeyV1 -> PolicyVerdictV1`: allow rules, the port range as a prefix.
pub const MAP_POLICY: &str = "LB_POLICY_V1";
/// LRU hash `Ct4KeyV1 -> u8`: connections a policy allowed (as first seen), whose replies pass.
pub const MAP_POLICY_FLOWS: &str = "LB4_POLCT_V1";
/// LRU hash `Ct6KeyV1 -> u8`.
pub const MAP_POLICY_FLOWS6: &str = "LB6_POLCT_V1";
pub const MAP_POLICY_STATS: &str = "LB_POLSTAT_V1";
pub const MAP_POLICY_DENIED: &str = "LB_POLDENY_V1";

/// An LPM key's data: the address (the trie's prefix length comes first in the kernel key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpCacheKeyV1<A: MapAddr> {
    pub addr: A,
}

pub type IpCache4KeyV1 = IpCacheKeyV1<Addr4>;
pub type IpCache6KeyV1 = IpCacheKeyV1<Addr6>;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityV1 {
    pub id: u32,
}

/// A local pod, by address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyEndpointKeyV1<A: MapAddr> {
    pub addr: A,
}

pub type PolicyEndpoint4KeyV1 = PolicyEndpointKeyV1<Addr4>;
pub type PolicyEndpoint6KeyV1 = PolicyEndpointKeyV1<Addr6>;

/// `PolicyEndpointV1::flags`: some policy isolates the pod's ingress.
pub const POLICY_INGRESS_ISOLATED: u32 = 1 << 0;
/// `PolicyEndpointV1::flags`: some policy isolates the pod's egress.
pub const POLICY_EGRESS_ISOLATED: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEndpointV1 {
    /// The number the policy rules of this pod are keyed by (one space for both families).
    pub endpoint: u32,
    pub flags: u32,
}

/// `PolicyKeyV1::direction`.
pub const POLICY_INGRESS: u8 = 0;
pub const POLICY_EGRESS: u8 = 1;
/// `PolicyKeyV1::identity` of a rule that allows any peer.
pub const IDENTITY_ANY: u32 = 0;
/// The node's own addresses: always allowed to and from its pods.
pub const IDENTITY_HOST: u32 = 1;
/// An address the ipcache does not name.
pub const IDENTITY_WORLD: u32 = 2;
/// Bits of a policy key always matched: endpoint, identity, direction. Then 8 for the
/// protocol (0 bits of it: any protocol) and up to 16 for the port range.
pub const POLICY_PREFIX_FIXED: u32 = 72;
/// Every bit of a policy key: endpoint, identity and direction, then protocol and port.
pub const POLICY_PREFIX_FULL: u32 = POLICY_PREFIX_FIXED + 24;

/// An allow rule's key. Field order is prefix order: an LPM trie matches leading bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKeyV1 {
    pub endpoint: u32,
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Network byte order, so that a port range is a prefix.
    pub port: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyVerdictV1 {
    /// The allowing policy's number, for its counters.
    pub policy: u32,
}

/// One counter, added to atomically: in `LB_POLSTAT_V1` the new flows each policy allowed (by
/// policy id), in `LB_POLDENY_V1` the packets each isolated endpoint's policy denied (at
/// `2 * endpoint + direction`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounterV1 {
    pub count: u64,
}

/// The bit a policy flow entry (`LB4_POLCT_V1`) carries once the check of `direction` passed
/// it: the source pod's egress, or the destination pod's ingress.
pub const fn flow_bit(direction: u8) -> u8 {
    1 << direction
}

/// The slot of `endpoint`'s denials in `direction` in `LB_POLDENY_V1`.
pub const fn denied_slot(endpoint: u32, direction: u8) -> u32 {
    2 * endpoint + direction as u32
}

#[cfg(feature = "user")]
super::impl_pod!(generic IpCacheKeyV1, PolicyEndpointKeyV1);
#[cfg(feature = "user")]
super::impl_pod!(IdentityV1, PolicyEndpointV1, PolicyKeyV1, PolicyVerdictV1, PolicyCounterV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn policy() {
        assert_layout!(IpCache4KeyV1, size 4, align 4, { addr @ 0 });
        assert_layout!(IpCache6KeyV1, size 16, align 4, { addr @ 0 });
        assert_layout!(IdentityV1, size 4, align 4, { id @ 0 });
        assert_layout!(PolicyEndpoint4KeyV1, size 4, align 4, { addr @ 0 });
        assert_layout!(PolicyEndpoint6KeyV1, size 16, align 4, { addr @ 0 });
        assert_layout!(PolicyEndpointV1, size 8, align 4, { endpoint @ 0, flags @ 4 });
        // 12 bytes, no padding: every bit is part of the prefix.
        assert_layout!(PolicyKeyV1, size 12, align 4, { endpoint @ 0, identity @ 4, direction @ 8, protocol @ 9, port @ 10 });
        assert_eq!(POLICY_PREFIX_FIXED as usize, 8 * core::mem::offset_of!(PolicyKeyV1, protocol));
        assert_eq!(POLICY_PREFIX_FULL as usize, 8 * core::mem::size_of::<PolicyKeyV1>());
        assert_layout!(PolicyVerdictV1, size 4, align 4, { policy @ 0 });
        assert_layout!(PolicyCounterV1, size 8, align 8, { count @ 0 });
        assert_eq!(denied_slot(3, POLICY_EGRESS), 7);
        assert_eq!((flow_bit(POLICY_INGRESS), flow_bit(POLICY_EGRESS)), (1, 2));
    }
}
