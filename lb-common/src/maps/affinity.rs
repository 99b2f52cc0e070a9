//! sessionAffinity: ClientIP. Which backend each client of a frontend was last sent to, and
//! which backends each frontend may still send affinity to.

/// LRU hash `AffinityKeyV1 -> AffinityV1`: a client's backend per frontend, with when it was last used.
pub const MAP_AFFINITY: &str = "LB_AFFINITY_V1";
/// Hash `AffinityMatchKeyV1 -> u8`: the backends a frontend with affinity may use. An affinity
/// entry whose backend is not here was made for a backend since removed: it ends at once.
pub const MAP_AFFINITY_MATCH: &str = "LB_AFF_MATCH_V1";

/// A client of one frontend. One type for both address families (and, later, for socket
/// hooks that key affinity by network-namespace cookie): `client_kind` says what `client` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKeyV1 {
    pub client: [u8; 16],
    pub service_id: u32,
    /// `AFFINITY_CLIENT_*`.
    pub client_kind: u8,
    pub _pad: [u8; 3],
}

impl AffinityKeyV1 {
    /// The key of an IPv4 client (raw, wire order) of the frontend `service_id`.
    #[inline(always)]
    pub const fn ip4(client: u32, service_id: u32) -> Self {
        let b = client.to_ne_bytes();
        Self { client: [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], service_id, client_kind: crate::AFFINITY_CLIENT_IP4, _pad: [0; 3] }
    }
}

impl AffinityKeyV1 {
    /// The key of an IPv6 client (raw, wire order) of the frontend `service_id`.
    #[inline(always)]
    pub fn ip6(client: [u32; 4], service_id: u32) -> Self {
        let mut key = Self { client: [0; 16], service_id, client_kind: crate::AFFINITY_CLIENT_IP6, _pad: [0; 3] };
        for (i, w) in client.iter().enumerate() {
            key.client[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        key
    }

    /// The key of a network namespace (the socket hooks' client) on the frontend `service_id`.
    #[inline(always)]
    pub const fn netns(cookie: u64, service_id: u32) -> Self {
        let b = cookie.to_ne_bytes();
        Self { client: [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], 0, 0, 0, 0, 0, 0, 0, 0], service_id, client_kind: crate::AFFINITY_CLIENT_NETNS, _pad: [0; 3] }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityV1 {
    /// `bpf_ktime_get_ns` of the last new flow (or packet) that used this affinity.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// A backend a frontend with affinity may use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKeyV1 {
    pub backend_id: u32,
    pub service_id: u32,
}

#[cfg(feature = "user")]
super::impl_pod!(AffinityKeyV1, AffinityV1, AffinityMatchKeyV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn affinity_key() {
        assert_layout!(AffinityKeyV1, size 24, align 4, { client @ 0, service_id @ 16, client_kind @ 20, _pad @ 21 });
        let k = AffinityKeyV1::ip4(crate::ip4_raw([10, 0, 0, 7]), 3);
        assert_eq!(&k.client[..5], &[10, 0, 0, 7, 0]);
        let addr: core::net::Ipv6Addr = "fd00::7".parse().unwrap();
        let k = AffinityKeyV1::ip6(crate::ip6_raw(addr.octets()), 3);
        assert_eq!(k.client, addr.octets());
        assert_ne!(k.client_kind, AffinityKeyV1::ip4(0, 3).client_kind);
    }

    #[test]
    fn affinity() {
        assert_layout!(AffinityV1, size 16, align 8, { last_seen_ns @ 0, backend_id @ 8, _pad @ 12 });
    }

    #[test]
    fn affinity_match_key() {
        assert_layout!(AffinityMatchKeyV1, size 8, align 4, { backend_id @ 0, service_id @ 4 });
    }
}
