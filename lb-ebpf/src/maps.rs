//! The maps of schema v1 (see `lb_common::maps` for what each holds). All are pinned by name,
//! so a restarted agent adopts them and established flows keep their state.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::*;

use crate::family::Scratch;

#[map]
pub static LB4_SVC_V1: HashMap<Service4KeyV1, ServiceV1> = HashMap::pinned(MAX_SERVICES, 0);
#[map]
pub static LB4_BE_V1: Array<Backend4V1> = Array::pinned(MAX_BACKENDS, 0);
#[map]
pub static LB_MAGLEV_V2: Array<MaglevSlotPair> = Array::pinned(MAGLEV_SLOTS / MAGLEV_SLOTS_PER_ENTRY as u32, MAGLEV_MAP_FLAGS);
#[map]
pub static LB4_CT_V1: HashMap<Ct4KeyV1, Ct4EntryV1> = HashMap::pinned(MAX_FLOWS, 0);
#[map]
pub static LB4_RNAT_V1: HashMap<Ct4KeyV1, RevNat4V1> = HashMap::pinned(MAX_FLOWS, 0);
#[map]
pub static LB_SVC_STAT_V1: Array<TrafficCountersV1> = Array::pinned(MAX_SERVICES, 0);
#[map]
pub static LB_BE_STAT_V1: Array<TrafficCountersV1> = Array::pinned(MAX_BACKENDS, 0);
#[map]
pub static LB_REASON_V1: PerCpuArray<u64> = PerCpuArray::pinned(REASON_SLOTS, 0);
#[map]
pub static LB_CONFIG_V1: Array<ConfigV1> = Array::pinned(1, 0);
#[map]
pub static LB4_NODEIP_V1: HashMap<u32, u32> = HashMap::pinned(MAX_NODE_IPS, 0);
#[map]
pub static LB_SVC_NAME_V1: Array<NameV1> = Array::pinned(MAX_SERVICES, 0);
#[map]
pub static LB_SVC_OPTS_V1: Array<ServiceOptsV1> = Array::pinned(MAX_SERVICES, 0);
#[map]
pub static LB_SVC_BYID_V1: Array<ServiceByIdV1> = Array::pinned(MAX_SERVICES, 0);
#[map]
pub static LB_AFFINITY_V1: LruHashMap<AffinityKeyV1, AffinityV1> = LruHashMap::pinned(MAX_AFFINITY, 0);
#[map]
pub static LB_AFF_MATCH_V1: HashMap<AffinityMatchKeyV1, u8> = HashMap::pinned(MAX_BACKENDS, 0);
#[map]
pub static LB_SOCK_CFG_V1: Array<SockConfigV1> = Array::pinned(1, 0);
#[map]
pub static LB_SOCK_SKIP_V1: HashMap<u64, u8> = HashMap::pinned(MAX_SOCK_SKIP, 0);
#[map]
pub static LB4_SKRNAT_V1: LruHashMap<SockRevNat4KeyV1, SockRevNat4V1> = LruHashMap::pinned(MAX_SOCKETS, 0);
#[map]
pub static LB6_SVC_V1: HashMap<Service6KeyV1, ServiceV1> = HashMap::pinned(MAX_SERVICES, 0);
#[map]
pub static LB6_BE_V1: Array<Backend6V1> = Array::pinned(MAX_BACKENDS, 0);
#[map]
pub static LB6_CT_V1: HashMap<Ct6KeyV1, Ct6EntryV1> = HashMap::pinned(MAX_FLOWS, 0);
#[map]
pub static LB6_RNAT_V1: HashMap<Ct6KeyV1, RevNat6V1> = HashMap::pinned(MAX_FLOWS, 0);
#[map]
pub static LB6_NODEIP_V1: HashMap<[u32; 4], u32> = HashMap::pinned(MAX_NODE_IPS, 0);
#[map]
pub static LB_NODEPORT_V1: Array<u64> = Array::pinned(NODEPORT_FILTER_WORDS, FILTER_MAP_FLAGS);
#[map]
pub static LB_FEADDR_V2: Array<u64> = Array::pinned(FRONTEND_FILTER_WORDS, FILTER_MAP_FLAGS);
#[map]
pub static LB6_CONFIG_V1: Array<Config6V1> = Array::pinned(1, 0);
#[map]
pub static LB6_SRCRANGE_V1: LpmTrie<SourceRange6V1, u8> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);
#[map]
pub static LB6_SKRNAT_V1: LruHashMap<SockRevNat6KeyV1, SockRevNat6V1> = LruHashMap::pinned(MAX_SOCKETS, 0);
#[map]
pub static LB4_SRCRANGE_V1: LpmTrie<SourceRange4V1, u8> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);
#[map]
pub static LB4_L2ANN_V1: HashMap<L2Announce4KeyV1, L2AnnounceV1> = HashMap::pinned(MAX_L2_ANNOUNCE, 0);
#[map]
pub static LB6_L2ANN_V1: HashMap<L2Announce6KeyV1, L2AnnounceV1> = HashMap::pinned(MAX_L2_ANNOUNCE, 0);
/// Written by lb-cni, one entry per pod: allocated as pods come (BPF_F_NO_PREALLOC).
#[map]
pub static LB4_EP_V1: HashMap<Endpoint4KeyV1, EndpointV1> = HashMap::pinned(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
#[map]
pub static LB6_EP_V1: HashMap<Endpoint6KeyV1, EndpointV1> = HashMap::pinned(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
/// NetworkPolicy: address -> identity, this node's isolated pods, allow rules, allowed flows.
#[map]
pub static LB4_IPCACHE_V1: LpmTrie<IpCache4KeyV1, IdentityV1> = LpmTrie::pinned(MAX_IPCACHE, 0);
#[map]
pub static LB6_IPCACHE_V1: LpmTrie<IpCache6KeyV1, IdentityV1> = LpmTrie::pinned(MAX_IPCACHE, 0);
#[map]
pub static LB4_IPHOST_V1: HashMap<IpCache4KeyV1, IdentityV1> = HashMap::pinned(MAX_IPCACHE, BPF_F_NO_PREALLOC);
#[map]
pub static LB6_IPHOST_V1: HashMap<IpCache6KeyV1, IdentityV1> = HashMap::pinned(MAX_IPCACHE, BPF_F_NO_PREALLOC);
#[map]
pub static LB4_POLEP_V1: HashMap<PolicyEndpoint4KeyV1, PolicyEndpointV1> = HashMap::pinned(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
#[map]
pub static LB6_POLEP_V1: HashMap<PolicyEndpoint6KeyV1, PolicyEndpointV1> = HashMap::pinned(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
#[map]
pub static LB_POLEXACT_V1: HashMap<PolicyKeyV1, PolicyVerdictV1> = HashMap::pinned(MAX_POLICY_RULES, BPF_F_NO_PREALLOC);
#[map]
pub static LB_POLICY_V1: LpmTrie<PolicyKeyV1, PolicyVerdictV1> = LpmTrie::pinned(MAX_POLICY_RULES, 0);
#[map]
pub static LB4_POLCT_V1: LruHashMap<Ct4KeyV1, u8> = LruHashMap::pinned(MAX_POLICY_FLOWS, 0);
#[map]
pub static LB6_POLCT_V1: LruHashMap<Ct6KeyV1, u8> = LruHashMap::pinned(MAX_POLICY_FLOWS, 0);
#[map]
pub static LB_POLSTAT_V1: Array<PolicyCounterV1> = Array::pinned(MAX_POLICIES, 0);
#[map]
pub static LB_POLDENY_V1: Array<PolicyCounterV1> = Array::pinned(2 * MAX_ENDPOINTS, 0);

/// Flow events (see `lb_common::maps::events`).
#[map]
pub static LB_EVENTS_V1: RingBuf = RingBuf::pinned(EVENT_RING_BYTES, 0);
#[map]
pub static LB_EVCFG_V1: Array<EventConfigV1> = Array::pinned(1, 0);
#[map]
pub static LB_EVBKT_V1: PerCpuArray<EventBucketV1> = PerCpuArray::pinned(1, 0);
#[map]
pub static LB_EVSTAT_V1: PerCpuArray<u64> = PerCpuArray::pinned(EVENT_OUTCOMES * EVENT_KIND_SLOTS, 0);
#[map]
pub static LB_REPLYDST_V1: Array<u8> = Array::pinned(REPLY_FILTER_SLOTS, 0);
#[map]
pub static LB_LOCALBE_V1: Array<u8> = Array::pinned(REPLY_FILTER_SLOTS, 0);
#[map]
pub static LB4_NEXTHOP_V1: LruHashMap<NextHop4KeyV1, NextHopV1> = LruHashMap::pinned(MAX_NEXT_HOPS, 0);
#[map]
pub static LB6_NEXTHOP_V1: LruHashMap<NextHop6KeyV1, NextHopV1> = LruHashMap::pinned(MAX_NEXT_HOPS, 0);
#[map]
pub static LB_NHGEN_V1: Array<u32> = Array::pinned(1, 0);
/// Next hops towards backends, a slot per backend id on each CPU (not pinned: a cache that
/// a new load fills again).
#[map]
pub static LB4_BENH_V1: PerCpuArray<BackendNextHop4V1> = PerCpuArray::with_max_entries(BACKEND_NEXT_HOP_SLOTS, 0);
#[map]
pub static LB6_BENH_V1: PerCpuArray<BackendNextHop6V1> = PerCpuArray::with_max_entries(BACKEND_NEXT_HOP_SLOTS, 0);

/// How to read the state clock from jiffies (see `lb_common::StateClockV1`; not pinned: each
/// load is calibrated afresh).
#[map]
pub static LB_CLOCK_V1: Array<StateClockV1> = Array::with_max_entries(1, 0);

/// Per-CPU scratch space of each family's path (not pinned: nothing in it outlives a packet).
#[map]
pub static LB4_SCRATCH: PerCpuArray<Scratch<Addr4>> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static LB6_SCRATCH: PerCpuArray<Scratch<Addr6>> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count_reason(reason: u32) {
    if let Some(c) = LB_REASON_V1.get_ptr_mut(reason) {
        unsafe { *c += 1 }
    }
}

/// Shared counters, added atomically: per-CPU copies of arrays this large would make the
/// agent's memory grow with the node's CPU count (megabytes per CPU), and no memory limit
/// would then fit every node.
#[inline(always)]
pub fn count_traffic(map: &Array<TrafficCountersV1>, id: u32, bytes: u32) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering::Relaxed};
    if let Some(c) = map.get_ptr_mut(id) {
        unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).packets, 1);
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).bytes, bytes as u64);
        }
    }
}

/// One more in a shared counter (see [`count_traffic`]).
#[inline(always)]
pub fn count_one(map: &Array<PolicyCounterV1>, slot: u32) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering::Relaxed};
    if let Some(c) = map.get_ptr_mut(slot) {
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).count, 1) };
    }
}

/// The config, or defaults when the agent has not written one yet.
#[inline(always)]
pub fn config() -> ConfigV1 {
    match LB_CONFIG_V1.get(0) {
        Some(c) if c.nat_port_min != 0 => *c,
        _ => ConfigV1 { nat_port_min: NAT_PORT_MIN, nat_port_max: NAT_PORT_MAX, ..ConfigV1::default() },
    }
}
