//! Capacities, protocol numbers, flag bits and timeouts of schema v1.

/// Default capacity of `LB4_SVC_V1` and of the per-service arrays (service ids are `< MAX_SERVICES`).
pub const MAX_SERVICES: u32 = 131_072;
/// Default capacity of `LB4_BE_V1` and `LB_BE_STAT_V1` (backend ids are `< MAX_BACKENDS`; id 0 is never used).
pub const MAX_BACKENDS: u32 = 262_144;
/// Default number of slots in `LB_MAGLEV_V2`, shared by every service's slice: room for 30,000
/// services of 509 slots (the agent's `--maglev-slots` changes it). 64 MiB of kernel memory.
pub const MAGLEV_SLOTS: u32 = 1 << 24;
/// Creation flags of `LB_MAGLEV_V2`: `BPF_F_MMAPABLE`, so that user space writes and reads
/// tables through a memory mapping instead of a system call per slot. Its 8-byte elements hold
/// two slots each, so slot `i` is at byte `i * MAGLEV_SLOT_STRIDE` of the mapping.
pub const MAGLEV_MAP_FLAGS: u32 = 1 << 10;
/// Creation flags of the bitmaps the agent sets bit by bit (`LB_NODEPORT_V1`, `LB_FEADDR_V2`):
/// `BPF_F_MMAPABLE` too, so that setting a bit is a store, not a lookup and an update.
pub const FILTER_MAP_FLAGS: u32 = MAGLEV_MAP_FLAGS;
pub const MAGLEV_SLOT_STRIDE: usize = 4;
/// Default capacity of the conntrack and reverse-NAT maps.
pub const MAX_FLOWS: u32 = 262_144;
/// Capacity of `LB_AFFINITY_V1` (an LRU: the least recently used client affinity goes first).
pub const MAX_AFFINITY: u32 = 262_144;
/// Capacity of `LB4_SRCRANGE_V1`: CIDRs of every Service's `loadBalancerSourceRanges`, summed.
pub const MAX_SOURCE_RANGES: u32 = 65_536;
/// Capacity of `LB_SOCK_SKIP_V1`.
pub const MAX_SOCK_SKIP: u32 = 4_096;
/// Capacity of `LB4_SKRNAT_V1` (an LRU: sockets long closed go first).
pub const MAX_SOCKETS: u32 = 262_144;
/// Slots of `LB_REASON_V1`: more than there are reasons, so new reasons never resize the pinned map.
pub const REASON_SLOTS: u32 = 64;
/// Capacity of `LB4_NODEIP_V1`.
pub const MAX_NODE_IPS: u32 = 256;
/// Capacity of `LB4_L2ANN_V1` and `LB6_L2ANN_V1`: announced addresses times external devices.
pub const MAX_L2_ANNOUNCE: u32 = 16_384;
/// `BPF_F_NO_PREALLOC`: a hash map's entries are allocated as they are added.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// Capacity of `LB4_EP_V1` and `LB6_EP_V1`: pods on one node (allocated as they come).
pub const MAX_ENDPOINTS: u32 = 16_384;
/// Default capacity of the ipcache maps, each family (`--max-ipcache`): addresses of the
/// cluster's pods and nodes (`LB4_IPHOST_V1`), and `ipBlock` prefixes (`LB4_IPCACHE_V1`).
pub const MAX_IPCACHE: u32 = 65_536;
/// Default capacity of the rule maps (`--max-policy-rules`): allow-rule keys of this node's
/// pods, one-port ones (`LB_POLEXACT_V1`) and the rest (`LB_POLICY_V1`; a range is several).
pub const MAX_POLICY_RULES: u32 = 65_536;
/// Capacity of the policy flow tables (`LB4_POLCT_V1`, `LB6_POLCT_V1`): flows of pods a policy
/// selects, whose replies pass (LRU: preallocated, 11 MiB for both).
pub const MAX_POLICY_FLOWS: u32 = 65_536;
/// NetworkPolicies one node can count (ids of `LB_POLSTAT_V1`).
pub const MAX_POLICIES: u32 = 16_384;
/// Bytes of the flow-event ring buffer (`LB_EVENTS_V1`): about 10,000 events of 96 bytes.
pub const EVENT_RING_BYTES: u32 = 1 << 20;
/// Longest `namespace/name:port` kept in `LB_SVC_NAME_V1`.
pub const NAME_LEN: usize = 120;

/// A backend id that never names a backend: slot arrays are zeroed, so an unwritten slot reads as this.
pub const BACKEND_NONE: u32 = 0;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

// Service4KeyV1::scope
/// The frontend with every ready endpoint of the cluster.
pub const SCOPE_CLUSTER: u8 = 0;
/// The same frontend with only this node's endpoints: what clients from outside get when the
/// Service has `externalTrafficPolicy: Local` (the `SCOPE_CLUSTER` entry has `F_SVC_EXT_LOCAL`).
pub const SCOPE_LOCAL: u8 = 1;

// ServiceV1::flags
/// Traffic from outside (the XDP hook) uses the frontend's `SCOPE_LOCAL` entry: no SNAT, the
/// client address is kept, and a node without local endpoints drops new flows.
pub const F_SVC_EXT_LOCAL: u8 = 1 << 0;
/// sessionAffinity: ClientIP. New flows from a client go to its backend in `LB_AFFINITY_V1`
/// while that entry is younger than `ServiceOptsV1::affinity_timeout_s`.
pub const F_SVC_AFFINITY: u8 = 1 << 1;
/// loadBalancerSourceRanges: only clients in this service's CIDRs of `LB4_SRCRANGE_V1` get through.
pub const F_SVC_SOURCE_RANGES: u8 = 1 << 2;

// AffinityKeyV1::client_kind
/// `client` holds an IPv4 address in its first 4 bytes (wire order), the rest zero.
pub const AFFINITY_CLIENT_IP4: u8 = 4;
/// `client` holds an IPv6 address (wire order).
pub const AFFINITY_CLIENT_IP6: u8 = 6;
/// `client` holds a network-namespace cookie in its first 8 bytes (native order): the socket
/// hooks give affinity per namespace, as all of a node's processes share one address.
pub const AFFINITY_CLIENT_NETNS: u8 = 1;

/// Source address of hairpin flows: a pod that reaches its own Service and lands on itself
/// gets its packets from here (it cannot receive packets from its own address), and answers
/// back through its gateway, where the reply is translated. Cilium uses the same address.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];
/// The IPv6 hairpin source: in the discard-only prefix 100::/64 (RFC 6666), which no cluster
/// uses for pods or Services, so no pod can mistake it for a peer.
pub const HAIRPIN_ADDR6: [u8; 16] = [0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 169, 254, 42, 1];

// ServiceV1::kind, for display and per-kind policy.
pub const KIND_CLUSTER_IP: u8 = 1;
pub const KIND_NODE_PORT: u8 = 2;
pub const KIND_LOAD_BALANCER: u8 = 3;
pub const KIND_EXTERNAL_IP: u8 = 4;

// Backend4V1::flags
/// The backend runs on this node: deliver it directly, never SNAT.
pub const F_BACKEND_LOCAL: u8 = 1 << 0;

// Ct4EntryV1::flags and RevNat4V1::flags
/// The flow was source-NATed to a node address and port (remote backend of an external frontend).
pub const F_CT_SNAT: u8 = 1 << 0;

// TCP flag bits as they sit in byte 13 of the TCP header; conntrack ORs them per direction.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Conntrack lifetimes, in nanoseconds of CLOCK_MONOTONIC (what `bpf_ktime_get_ns` returns).
/// The values follow Cilium's defaults.
pub const CT_TIMEOUT_TCP_SYN_NS: u64 = 60 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_ESTABLISHED_NS: u64 = 21_600 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_UDP_NS: u64 = 60 * 1_000_000_000;

/// Source ports handed out for SNAT, inclusive. Kept clear of the NodePort range (30000-32767)
/// and of Linux's default ephemeral range (32768-60999).
pub const NAT_PORT_MIN: u16 = 61_000;
pub const NAT_PORT_MAX: u16 = 65_535;
/// How many candidate ports one new SNAT flow tries before it is dropped as exhausted.
pub const NAT_PORT_TRIES: u32 = 16;

/// How long a tracked flow lives without packets, from the TCP flags seen in each direction.
/// Shared by the kernel (none today) and the agent's conntrack GC, so both agree on expiry.
/// A TCP flow is established only once the client has acknowledged the backend's SYN-ACK: a
/// half-open flow (a SYN flood's) lives as briefly as a lone SYN.
pub const fn ct_lifetime_ns(proto: u8, forward_flags: u8, reply_flags: u8) -> u64 {
    if proto != IPPROTO_TCP {
        return CT_TIMEOUT_UDP_NS;
    }
    let seen = forward_flags | reply_flags;
    let handshake_done = reply_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK && forward_flags & TCP_ACK != 0;
    if seen & (TCP_FIN | TCP_RST) != 0 {
        CT_TIMEOUT_TCP_CLOSING_NS
    } else if handshake_done {
        CT_TIMEOUT_TCP_ESTABLISHED_NS
    } else {
        CT_TIMEOUT_TCP_SYN_NS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_is_established_only_after_the_clients_ack() {
        let life = |fwd, rev| ct_lifetime_ns(IPPROTO_TCP, fwd, rev);
        assert_eq!(life(TCP_SYN, 0), CT_TIMEOUT_TCP_SYN_NS, "a lone SYN");
        assert_eq!(life(TCP_SYN, TCP_SYN | TCP_ACK), CT_TIMEOUT_TCP_SYN_NS, "half-open: the backend answered, the client never did");
        assert_eq!(life(TCP_SYN | TCP_ACK, TCP_SYN | TCP_ACK), CT_TIMEOUT_TCP_ESTABLISHED_NS);
        assert_eq!(life(TCP_SYN | TCP_ACK, TCP_ACK), CT_TIMEOUT_TCP_SYN_NS, "an ACK without the backend's SYN-ACK");
        assert_eq!(life(TCP_SYN | TCP_ACK | TCP_FIN, TCP_SYN | TCP_ACK), CT_TIMEOUT_TCP_CLOSING_NS);
        assert_eq!(life(TCP_SYN, TCP_RST), CT_TIMEOUT_TCP_CLOSING_NS);
        assert_eq!(ct_lifetime_ns(IPPROTO_UDP, 0, 0), CT_TIMEOUT_UDP_NS);
    }

    #[test]
    fn maglev_slots_sit_where_the_kernel_maps_them() {
        // An array map stores each value rounded up to 8 bytes (kernel/bpf/arraymap.c): a pair
        // of slots fills one exactly, so the mapping is a plain array of 4-byte slots.
        // BPF_F_MMAPABLE is bit 10 of the creation flags (uapi/linux/bpf.h).
        let pair = core::mem::size_of::<crate::MaglevSlotPair>();
        assert_eq!(pair, pair.next_multiple_of(8));
        assert_eq!(MAGLEV_SLOT_STRIDE * crate::MAGLEV_SLOTS_PER_ENTRY, pair);
        assert_eq!(MAGLEV_MAP_FLAGS, 1024);
    }
}
