//! Frontends: where clients send, and what each balances to.
use super::{Addr4, Addr6, MapAddr};

/// Hash `Service4KeyV1 -> ServiceV1`: one entry per IPv4 frontend (address, port, protocol).
pub const MAP_SERVICES: &str = "LB4_SVC_V1";
/// Hash `Service6KeyV1 -> ServiceV1`: the IPv6 frontends (their service ids share one space
/// with the IPv4 ones, and so the per-service arrays).
pub const MAP_SERVICES6: &str = "LB6_SVC_V1";
/// Array `service id -> NameV1`: written by the agent so `lbctl` can print names with the agent down.
pub const MAP_SERVICE_NAMES: &str = "LB_SVC_NAME_V1";
/// Array `service id -> ServiceOptsV1`: settings read only when a `F_SVC_*` flag asks for them.
pub const MAP_SERVICE_OPTS: &str = "LB_SVC_OPTS_V1";
/// Array `service id -> ServiceByIdV1`: each frontend's key and entry by its id, written with
/// the frontend (before its entry in the frontend map) and cleared after it. A tracked flow's
/// packet finds its frontend here from its conntrack entry instead of hashing the frontend key;
/// one whose key no longer matches (the frontend is gone, or its id went to another) takes the
/// frontend lookup. An agent loading pinned maps writes it from the frontend maps.
pub const MAP_SERVICE_BY_ID: &str = "LB_SVC_BYID_V1";

/// A frontend as `LB_SVC_BYID_V1` holds it, for either family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceByIdV1 {
    /// The frontend's address as raw words (IPv4 in the first; all zero for a NodePort).
    pub addr: [u32; 4],
    /// Raw (network order), as in the frontend key.
    pub port: u16,
    pub proto: u8,
    /// 4 or 6; 0: no frontend has this id.
    pub family: u8,
    pub entry: ServiceV1,
}

impl ServiceByIdV1 {
    /// Whether this is the frontend a packet to `addr`:`port` (raw) over `proto` of family `A`
    /// was tracked for: its own address, or any (a NodePort: the flow went to a node address).
    #[inline(always)]
    pub fn matches<A: MapAddr>(&self, addr: &A, port: u16, proto: u8) -> bool {
        let words = addr.words();
        let family = if words.len() == 1 { 4 } else { 6 };
        if self.family != family || self.port != port || self.proto != proto {
            return false;
        }
        let node_port = self.addr == [0; 4];
        let mut same = true;
        for i in 0..words.len() {
            same &= self.addr[i] == words[i];
        }
        node_port || same
    }
}

/// Array `u32 -> u64`, a bitmap of `FRONTEND_FILTER_WORDS * 64` bits: set at
/// `frontend_filter_bit(addr, port, proto)` while a frontend of either family other than a
/// NodePort has that address, port and protocol. A packet whose bit is clear is no such
/// frontend's and skips the frontend lookup: most of a node's traffic (to pods, to the node,
/// to the world), and what reaches a frontend's address on a port no Service uses (a scan, a
/// flood on random ports). Only the agent writes it.
pub const MAP_FRONTEND_FILTER: &str = "LB_FEADDR_V2";
/// Version 1 of the filter, set by address alone. An agent loading an object of version 2
/// removes its pin; an object of version 1 (another build's, such as a benchmark's baseline)
/// is served through it.
pub const MAP_FRONTEND_FILTER_V1: &str = "LB_FEADDR_V1";
/// 2^20 bits (128 KiB): 100,000 frontends leave nine in ten clear.
pub const FRONTEND_FILTER_WORDS: u32 = (1 << 20) / 64;

const FILTER_MULTIPLIER: u32 = 0x9E37_79B1;

/// One word into a filter hash: mixed in after the last was multiplied and its high bits
/// folded down (a product alone carries no high bit down: IPv6 addresses that differ in a
/// word's high half, a Service range and a pod range, would then share bits by design).
#[inline(always)]
fn mix_filter_word(hash: u32, word: u32) -> u32 {
    let hash = (hash ^ word).wrapping_mul(FILTER_MULTIPLIER);
    hash ^ (hash >> 15)
}

/// The word and bit of a filter hash: a multiplicative hash to 20 bits.
#[inline(always)]
fn filter_word_bit(hash: u32) -> (u32, u64) {
    let bit = hash.wrapping_mul(FILTER_MULTIPLIER) >> 12;
    (bit / 64, 1 << (bit % 64))
}

#[inline(always)]
fn address_filter_hash<A: MapAddr>(addr: &A) -> u32 {
    let words = addr.words();
    let mut hash = 0u32;
    for i in 0..words.len() {
        hash = mix_filter_word(hash, words[i]);
    }
    hash
}

/// The word of `LB_FEADDR_V2` and the bit in it for a frontend's address, port (raw) and
/// protocol: the address's words, then port and protocol as one more. Shared by the kernel,
/// which reads it, and the agent.
#[inline(always)]
pub fn frontend_filter_bit<A: MapAddr>(addr: &A, port: u16, proto: u8) -> (u32, u64) {
    filter_word_bit(mix_filter_word(address_filter_hash(addr), (port as u32) << 8 | proto as u32))
}

/// The word of `LB_FEADDR_V1` and the bit in it: by the address alone (objects of version 1).
#[inline(always)]
pub fn frontend_filter_bit_v1<A: MapAddr>(addr: &A) -> (u32, u64) {
    filter_word_bit(address_filter_hash(addr))
}

/// A frontend: where clients send. A NodePort frontend has the zero address and matches every
/// address of the node (`LB4_NODEIP_V1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKeyV1<A: MapAddr> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    /// `SCOPE_CLUSTER`, or `SCOPE_LOCAL` for the node-local view of an
    /// `externalTrafficPolicy: Local` frontend.
    pub scope: u8,
}

pub type Service4KeyV1 = ServiceKeyV1<Addr4>;
pub type Service6KeyV1 = ServiceKeyV1<Addr6>;

/// What a frontend of either family balances to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceV1 {
    /// Index into the per-service arrays (`LB_SVC_STAT_V1`, `LB_SVC_NAME_V1`).
    pub service_id: u32,
    /// First slot of this service's Maglev table in `LB_MAGLEV_V2`.
    pub maglev_offset: u32,
    /// Length of the table (a Maglev prime), or 0 when no endpoint is ready: new flows are rejected.
    pub maglev_size: u32,
    pub backend_count: u16,
    /// `KIND_*`.
    pub kind: u8,
    /// `F_SVC_*`. (This byte was padding, always zero, before the flags existed: entries
    /// pinned by an older agent read as "no flags".)
    pub flags: u8,
}

/// Per-service settings that do not fit the frontend entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceOptsV1 {
    /// sessionAffinityConfig.clientIP.timeoutSeconds (with `F_SVC_AFFINITY`).
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}

/// A service's display name, `namespace/name:port/proto`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameV1 {
    pub len: u16,
    pub _pad: [u8; 6],
    pub bytes: [u8; crate::NAME_LEN],
}

impl Default for NameV1 {
    fn default() -> Self {
        Self { len: 0, _pad: [0; 6], bytes: [0; crate::NAME_LEN] }
    }
}

impl NameV1 {
    /// Truncates to `NAME_LEN` bytes at a character boundary.
    pub fn new(name: &str) -> Self {
        let name = super::cut_to(name, crate::NAME_LEN);
        let mut out = Self { len: name.len() as u16, ..Self::default() };
        out.bytes[..name.len()].copy_from_slice(name.as_bytes());
        out
    }

    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(crate::NAME_LEN);
        core::str::from_utf8(&self.bytes[..len]).unwrap_or("<invalid utf-8>")
    }
}

#[cfg(feature = "user")]
super::impl_pod!(ServiceV1, ServiceOptsV1, NameV1, ServiceByIdV1);
#[cfg(feature = "user")]
super::impl_pod!(generic ServiceKeyV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn service_key() {
        assert_layout!(Service4KeyV1, size 8, align 4, { addr @ 0, port @ 4, proto @ 6, scope @ 7 });
        assert_layout!(Service6KeyV1, size 20, align 4, { addr @ 0, port @ 16, proto @ 18, scope @ 19 });
    }

    #[test]
    fn service() {
        assert_layout!(ServiceV1, size 16, align 4, {
            service_id @ 0, maglev_offset @ 4, maglev_size @ 8, backend_count @ 12, kind @ 14, flags @ 15,
        });
    }

    #[test]
    fn service_by_id() {
        assert_layout!(ServiceByIdV1, size 36, align 4, { addr @ 0, port @ 16, proto @ 18, family @ 19, entry @ 20 });
    }

    #[test]
    fn service_by_id_matches_its_frontend_or_any_node_address_for_a_node_port() {
        let vip = crate::ip4_raw([10, 96, 0, 1]);
        let by_id = ServiceByIdV1 { addr: [vip, 0, 0, 0], port: 80u16.to_be(), proto: 6, family: 4, entry: ServiceV1::default() };
        assert!(by_id.matches(&vip, 80u16.to_be(), 6));
        assert!(!by_id.matches(&crate::ip4_raw([10, 96, 0, 2]), 80u16.to_be(), 6), "another address");
        assert!(!by_id.matches(&vip, 81u16.to_be(), 6) && !by_id.matches(&vip, 80u16.to_be(), 17), "another port or protocol");
        assert!(!by_id.matches(&[vip, 0, 0, 0], 80u16.to_be(), 6), "another family");
        let node_port = ServiceByIdV1 { addr: [0; 4], port: 30080u16.to_be(), proto: 6, family: 6, entry: ServiceV1::default() };
        assert!(node_port.matches(&crate::ip6_raw([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), 30080u16.to_be(), 6));
        assert!(!ServiceByIdV1::default().matches(&vip, 0, 0), "no frontend has the id");
    }

    #[test]
    fn frontend_filter_bits_spread_structured_ipv6_addresses() {
        let http = 80u16.to_be();
        // A Service range and a pod range of one prefix: an XOR of the words would map the
        // 512th Service address onto the pod's bit.
        let pod = crate::ip6_raw([0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let service = |i: u16| crate::ip6_raw([0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (i >> 8) as u8, i as u8]);
        let pod_bit = frontend_filter_bit(&pod, http, 6);
        let collisions = (0..4096).filter(|i| frontend_filter_bit(&service(*i), http, 6) == pod_bit).count();
        assert_eq!(collisions, 0);
        // 65,536 Services of one range set about as many bits as random ones would
        // (1 - e^-1/16 of 2^20: 60,600), so a pod address hits one about one time in 17.
        let mut set = [0u64; FRONTEND_FILTER_WORDS as usize];
        for i in 0..=u16::MAX {
            let (word, bit) = frontend_filter_bit(&service(i), http, 6);
            set[word as usize] |= bit;
        }
        let bits: u32 = set.iter().map(|w| w.count_ones()).sum();
        assert!(bits > 60_000, "{bits} bits");
        let on_a_set_bit = |(word, bit): (u32, u64)| set[word as usize] & bit != 0;
        let pods = (0..4096u16).filter(|i| on_a_set_bit(frontend_filter_bit(&crate::ip6_raw([0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (i >> 8) as u8, *i as u8]), http, 6))).count();
        assert!(pods < 4096 / 10, "{pods} of 4,096 pod addresses on a Service's bit");
        // The other ports and the other protocol of the Services' own addresses spread as well:
        // a scan of a frontend's ports pays the lookup about as seldom.
        let other_ports = (0..4096u16).filter(|i| on_a_set_bit(frontend_filter_bit(&service(*i), (1024 + *i).to_be(), 6))).count();
        let udp = (0..4096u16).filter(|i| on_a_set_bit(frontend_filter_bit(&service(*i), http, 17))).count();
        assert!(other_ports < 4096 / 10 && udp < 4096 / 10, "{other_ports} other ports, {udp} UDP of 4,096 on a set bit");
    }

    #[test]
    fn frontend_filter_bits_are_fixed() {
        // Kernel and agent compute them apart: a change here must be a new map version.
        let mix = |hash: u32, word: u32| {
            let hash = (hash ^ word).wrapping_mul(0x9E37_79B1);
            hash ^ (hash >> 15)
        };
        let at = |hash: u32| {
            let bit = hash.wrapping_mul(0x9E37_79B1) >> 12;
            (bit / 64, 1u64 << (bit % 64))
        };
        let v4 = crate::ip4_raw([10, 96, 0, 1]);
        let port = 80u16.to_be();
        assert_eq!(frontend_filter_bit(&v4, port, 6), at(mix(mix(0, v4), (port as u32) << 8 | 6)));
        assert_eq!(frontend_filter_bit_v1(&v4), at(mix(0, v4)), "version 1: the address alone");
        assert_ne!(frontend_filter_bit(&v4, port, 6), frontend_filter_bit(&v4, 443u16.to_be(), 6), "another port");
        assert_ne!(frontend_filter_bit(&v4, port, 6), frontend_filter_bit(&v4, port, 17), "another protocol");
        assert!(FRONTEND_FILTER_WORDS * 64 == 1 << 20);
    }

    #[test]
    fn service_opts() {
        assert_layout!(ServiceOptsV1, size 8, align 4, { affinity_timeout_s @ 0, _pad @ 4 });
    }

    #[test]
    fn name() {
        assert_layout!(NameV1, size 128, align 2, { len @ 0, _pad @ 2, bytes @ 8 });
    }

    #[test]
    fn name_round_trips_and_truncates_on_char_boundary() {
        assert_eq!(NameV1::new("default/web:80/TCP").as_str(), "default/web:80/TCP");
        let long = "é".repeat(100); // 200 bytes
        let n = NameV1::new(&long);
        assert_eq!(n.len, 120);
        assert_eq!(n.as_str().chars().count(), 60);
    }
}
