//! The embedded kernel object, and loading it with every map pinned under one directory.
use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{maps::IterableMap, Ebpf, EbpfLoader};
use lb_common::*;

use super::maps::FrontendFilter;

/// The object lb-ebpf compiles to (see build.rs).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_BPF_OBJECT"));

pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_PROGRAM: &str = "lb_tc";
/// TC egress of pod devices: the pods' NetworkPolicy ingress.
pub const TC_TO_POD_PROGRAM: &str = "lb_tc_to_pod";

/// A program on the host side of every pod device: its name (and pin in `programs/`), its
/// TCX direction, and its link's pin in `links/`, `<prefix>-<device>`.
#[derive(Clone, Copy, Debug)]
pub struct PodDeviceProgram {
    pub name: &'static str,
    pub direction: aya::programs::tc::TcAttachType,
    pub link_prefix: &'static str,
}

impl PodDeviceProgram {
    pub fn link_pin(&self, pin_dir: &Path, device: &str) -> PathBuf {
        pin_dir.join("links").join(format!("{}-{device}", self.link_prefix))
    }
}

/// `lb_tc` on the way in from the pod (balancing, egress policy), `lb_tc_to_pod` on the way
/// out to it (ingress policy; attached while NetworkPolicy is enforced).
pub const POD_DEVICE_PROGRAMS: [PodDeviceProgram; 2] = [
    PodDeviceProgram { name: TC_PROGRAM, direction: aya::programs::tc::TcAttachType::Ingress, link_prefix: "tc" },
    PodDeviceProgram { name: TC_TO_POD_PROGRAM, direction: aya::programs::tc::TcAttachType::Egress, link_prefix: "to-pod" },
];
pub const XDP_PASS_PROGRAM: &str = "lb_xdp_pass";
/// The cgroup socket-address hooks, each with the pin name of its link.
pub const SOCK_ADDR_PROGRAMS: [(&str, &str); 8] = [
    ("lb_sock_connect4", "sock-connect4"),
    ("lb_sock_sendmsg4", "sock-sendmsg4"),
    ("lb_sock_recvmsg4", "sock-recvmsg4"),
    ("lb_sock_getpeername4", "sock-getpeername4"),
    ("lb_sock_connect6", "sock-connect6"),
    ("lb_sock_sendmsg6", "sock-sendmsg6"),
    ("lb_sock_recvmsg6", "sock-recvmsg6"),
    ("lb_sock_getpeername6", "sock-getpeername6"),
];
/// The cgroup socket hooks that refuse binds to frontends, and their links' pin names.
pub const SOCK_BIND_PROGRAMS: [(&str, &str); 2] = [("lb_sock_post_bind4", "sock-post-bind4"), ("lb_sock_post_bind6", "sock-post-bind6")];

/// Capacities that differ from the schema's defaults (tests shrink conntrack to fill it).
#[derive(Clone, Debug, Default)]
pub struct MapSizes {
    pub flows: Option<u32>,
    pub maglev_slots: Option<u32>,
    /// Frontends (and the maps indexed by service id).
    pub services: Option<u32>,
    /// Backends (and the maps indexed by backend id).
    pub backends: Option<u32>,
    /// Connected sockets of the node's processes the socket hooks translated (LRU).
    pub sockets: Option<u32>,
    /// Clients with session affinity (LRU).
    pub affinity: Option<u32>,
    /// Flows of pods a NetworkPolicy selects, per family (LRU).
    pub policy_flows: Option<u32>,
    /// Addresses with a NetworkPolicy identity (pods and nodes of the cluster), and `ipBlock`
    /// prefixes, per family.
    pub ipcache: Option<u32>,
    /// NetworkPolicy rule keys of this node's pods (one-port rules, and ranges and wildcards).
    pub policy_rules: Option<u32>,
    /// Bytes of the flow-event ring buffer (a power of two, at least a page).
    pub event_ring: Option<u32>,
    /// Next hops cached for replies routed here, per family (LRU).
    pub next_hops: Option<u32>,
}

/// Loads the object. Maps already pinned in `pin_dir` (an earlier agent's) are adopted as they
/// are, so their entries, conntrack included, survive a restart; missing ones are created and pinned.
pub fn load(pin_dir: &Path, sizes: &MapSizes) -> Result<Ebpf> {
    load_from(pin_dir, sizes, OBJECT)
}

/// The same with another build's object of schema v1 (a benchmark's baseline).
pub fn load_from(pin_dir: &Path, sizes: &MapSizes, object: &[u8]) -> Result<Ebpf> {
    log::info!("{}", super::memory::summary(&super::memory::estimate(sizes)?));
    ensure_bpffs(pin_dir)?;
    set_aside_incompatible_pins(pin_dir)?;
    let resized = set_aside_resized_pins(pin_dir, sizes)?;
    let mut ebpf = load_object(pin_dir, sizes, object)?;
    for (name, aside) in resized {
        let copied = copy_entries(&mut ebpf, name, &aside).with_context(|| format!("copying {name} from {} into its resized map", aside.display()))?;
        std::fs::remove_file(&aside).with_context(|| format!("removing {}", aside.display()))?;
        log::info!("{name}: {copied} entries carried over into the resized map");
    }
    migrate_slot_array_v1(&mut ebpf, pin_dir)?;
    retire_frontend_filter_v1(&ebpf, pin_dir)?;
    match super::clock::calibrate(&mut ebpf) {
        Ok(clock) => log::info!("state clock: jiffies of {} ns, read without a helper call", clock.tick_ns),
        Err(e) => log::warn!("{e:#}: the datapath reads its state clock through bpf_ktime_get_coarse_ns"),
    }
    fill_reply_filter(&mut ebpf)?;
    fill_frontend_filters(&mut ebpf)?;
    Ok(ebpf)
}

/// Marks in the NodePort filter the port of every NodePort frontend the pinned maps hold, and
/// in the frontend-address filter the address of every other, and writes each one's id entry,
/// so that those an earlier agent wrote (an upgrade over pinned maps) answer, and their tracked
/// flows skip the frontend lookup, before this agent's first apply (whose adoption then counts
/// them). Idempotent; marks are only added here (a removal clears its own).
fn fill_frontend_filters(ebpf: &mut Ebpf) -> Result<()> {
    use aya::maps::{Array, HashMap, MapData};
    type Bits = std::collections::BTreeSet<(u32, u64)>;
    fn bits<A: super::maps::Family>(ebpf: &Ebpf, name: &str, filter: FrontendFilter, ports: &mut Bits, frontends: &mut Bits, by_id: &mut Vec<ServiceByIdV1>) -> Result<()> {
        let map: HashMap<&MapData, ServiceKeyV1<A>, ServiceV1> = ebpf.map(name).with_context(|| format!("no map {name}"))?.try_into()?;
        for (k, entry) in map.iter().filter_map(|e| e.ok()) {
            if k.addr.is_zero() {
                ports.insert(nodeport_bit(k.port));
            } else {
                frontends.insert(filter.bit(&k));
            }
            by_id.push(super::FrontendKey::of(&k).by_id(&entry));
        }
        Ok(())
    }
    // The object's version of the frontend filter (an older object has none to fill).
    let filter = frontend_filter_of(ebpf).unwrap_or(FrontendFilter::V2);
    let (mut ports, mut frontends, mut by_id) = (Bits::new(), Bits::new(), Vec::new());
    bits::<Addr4>(ebpf, MAP_SERVICES, filter, &mut ports, &mut frontends, &mut by_id)?;
    bits::<Addr6>(ebpf, MAP_SERVICES6, filter, &mut ports, &mut frontends, &mut by_id)?;
    if let Some(map) = ebpf.map_mut(MAP_SERVICE_BY_ID) {
        let mut map: Array<&mut MapData, ServiceByIdV1> = map.try_into()?;
        for frontend in by_id {
            map.set(frontend.entry.service_id, &frontend, 0).with_context(|| format!("writing {MAP_SERVICE_BY_ID}"))?;
        }
    }
    for (name, marked) in [(MAP_NODEPORT_FILTER, ports), (filter.map_name(), frontends)] {
        // An object older than the filter (a benchmark's baseline) has none to fill.
        let Some(filter) = ebpf.map_mut(name) else { continue };
        let mut filter: Array<&mut MapData, u64> = filter.try_into()?;
        // One update per word, however many frontends mark it.
        let mut words = std::collections::BTreeMap::<u32, u64>::new();
        for (word, bit) in marked {
            *words.entry(word).or_default() |= bit;
        }
        for (word, bits) in words {
            let marked = filter.get(&word, 0)? | bits;
            filter.set(word, &marked, 0).with_context(|| format!("marking word {word} of {name}"))?;
        }
    }
    Ok(())
}

/// Marks in the reply filter the destination of every reply the reverse-NAT maps expect but
/// for SNAT replies to the SNAT address (the kernel lets those through by their port), so
/// that flows tracked before the filter existed (an upgrade over pinned maps) keep their
/// replies; and marks every reply's source (a backend) in the local-backend filter, which the
/// agent's dataplane then keeps. Idempotent; marks are only added here.
fn fill_reply_filter(ebpf: &mut Ebpf) -> Result<()> {
    use aya::maps::{Array, HashMap, MapData};
    type Slots = std::collections::BTreeSet<u32>;
    fn slots<A: lb_common::MapAddr + aya::Pod>(ebpf: &Ebpf, name: &str, snat: A, destinations: &mut Slots, sources: &mut Slots) -> Result<()> {
        let map: HashMap<&MapData, CtKeyV1<A>, RevNatV1<A>> = ebpf.map(name).with_context(|| format!("no map {name}"))?.try_into()?;
        let to_snat_address = |k: &CtKeyV1<A>, v: &RevNatV1<A>| v.flags & F_CT_SNAT != 0 && k.dst_addr == snat;
        for (k, v) in map.iter().filter_map(|e| e.ok()) {
            if !to_snat_address(&k, &v) {
                destinations.insert(reply_filter_slot(&k.dst_addr));
            }
            sources.insert(reply_filter_slot(&k.src_addr));
        }
        Ok(())
    }
    let config: Array<&MapData, ConfigV1> = ebpf.map(MAP_CONFIG).with_context(|| format!("no map {MAP_CONFIG}"))?.try_into()?;
    let config6: Array<&MapData, Config6V1> = ebpf.map(MAP_CONFIG6).with_context(|| format!("no map {MAP_CONFIG6}"))?.try_into()?;
    let (snat4, snat6) = (config.get(&0, 0).map_or(0, |c| c.snat_addr), config6.get(&0, 0).map_or([0; 4], |c| c.snat_addr));
    let (mut destinations, mut sources) = (Slots::new(), Slots::new());
    slots::<Addr4>(ebpf, MAP_REVERSE_NAT, snat4, &mut destinations, &mut sources)?;
    slots::<Addr6>(ebpf, MAP_REVERSE_NAT6, snat6, &mut destinations, &mut sources)?;
    for (name, marked) in [(MAP_REPLY_FILTER, destinations), (MAP_LOCAL_BACKENDS, sources)] {
        // An object older than the filter (a benchmark's baseline) has none to fill.
        let Some(filter) = ebpf.map_mut(name) else { continue };
        let mut filter: Array<&mut MapData, u8> = filter.try_into()?;
        for slot in marked {
            filter.set(slot, &1, 0).with_context(|| format!("marking slot {slot} of {name}"))?;
        }
    }
    Ok(())
}

fn load_object(pin_dir: &Path, sizes: &MapSizes, object: &[u8]) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    for (name, capacity) in flag_sized(sizes) {
        loader.map_max_entries(name, capacity);
    }
    loader.load(object).with_context(|| format!("loading the BPF object with maps pinned in {}", pin_dir.display()))
}

/// Key and value sizes of every map of schema v1, as the kernel reports them, and the
/// capacity where the schema fixes it (the rest are sized by flags).
fn expected_layouts() -> [(&'static str, usize, usize, Option<u32>); 54] {
    use lb_common::*;
    use std::mem::size_of;
    [
        (MAP_SERVICES, size_of::<Service4KeyV1>(), size_of::<ServiceV1>(), None),
        (MAP_BACKENDS, 4, size_of::<Backend4V1>(), None),
        (MAP_MAGLEV, 4, size_of::<MaglevSlotPair>(), None),
        (MAP_CONNTRACK, size_of::<Ct4KeyV1>(), size_of::<Ct4EntryV1>(), None),
        (MAP_REVERSE_NAT, size_of::<Ct4KeyV1>(), size_of::<RevNat4V1>(), None),
        (MAP_SERVICE_STATS, 4, size_of::<TrafficCountersV1>(), None),
        (MAP_BACKEND_STATS, 4, size_of::<TrafficCountersV1>(), None),
        (MAP_REASONS, 4, 8, Some(REASON_SLOTS)),
        (MAP_CONFIG, 4, size_of::<ConfigV1>(), None),
        (MAP_NODE_IPS, 4, 4, None),
        (MAP_SERVICE_NAMES, 4, size_of::<NameV1>(), None),
        (MAP_SERVICE_OPTS, 4, size_of::<ServiceOptsV1>(), None),
        (MAP_AFFINITY, size_of::<AffinityKeyV1>(), size_of::<AffinityV1>(), None),
        (MAP_AFFINITY_MATCH, size_of::<AffinityMatchKeyV1>(), 1, None),
        (MAP_SOURCE_RANGES, 4 + size_of::<SourceRange4V1>(), 1, None),
        (MAP_SOCK_CONFIG, 4, size_of::<SockConfigV1>(), None),
        (MAP_SOCK_REVNAT, size_of::<SockRevNat4KeyV1>(), size_of::<SockRevNat4V1>(), None),
        (MAP_SOCK_SKIP, 8, 1, None),
        (MAP_SERVICES6, size_of::<Service6KeyV1>(), size_of::<ServiceV1>(), None),
        (MAP_BACKENDS6, 4, size_of::<Backend6V1>(), None),
        (MAP_CONNTRACK6, size_of::<Ct6KeyV1>(), size_of::<Ct6EntryV1>(), None),
        (MAP_REVERSE_NAT6, size_of::<Ct6KeyV1>(), size_of::<RevNat6V1>(), None),
        (MAP_NODE_IPS6, 16, 4, None),
        (MAP_CONFIG6, 4, size_of::<Config6V1>(), None),
        (MAP_SOURCE_RANGES6, 4 + size_of::<SourceRange6V1>(), 1, None),
        (MAP_SOCK_REVNAT6, size_of::<SockRevNat6KeyV1>(), size_of::<SockRevNat6V1>(), None),
        (MAP_L2_ANNOUNCE, size_of::<L2Announce4KeyV1>(), size_of::<L2AnnounceV1>(), Some(MAX_L2_ANNOUNCE)),
        (MAP_L2_ANNOUNCE6, size_of::<L2Announce6KeyV1>(), size_of::<L2AnnounceV1>(), Some(MAX_L2_ANNOUNCE)),
        (MAP_ENDPOINTS, size_of::<Endpoint4KeyV1>(), size_of::<EndpointV1>(), Some(MAX_ENDPOINTS)),
        (MAP_ENDPOINTS6, size_of::<Endpoint6KeyV1>(), size_of::<EndpointV1>(), Some(MAX_ENDPOINTS)),
        // LPM keys: the 4-byte prefix length, then the data.
        (MAP_IPCACHE, 4 + size_of::<IpCache4KeyV1>(), size_of::<IdentityV1>(), None),
        (MAP_IPCACHE6, 4 + size_of::<IpCache6KeyV1>(), size_of::<IdentityV1>(), None),
        (MAP_POLICY_ENDPOINTS, size_of::<PolicyEndpoint4KeyV1>(), size_of::<PolicyEndpointV1>(), Some(MAX_ENDPOINTS)),
        (MAP_POLICY_ENDPOINTS6, size_of::<PolicyEndpoint6KeyV1>(), size_of::<PolicyEndpointV1>(), Some(MAX_ENDPOINTS)),
        (MAP_POLICY, 4 + size_of::<PolicyKeyV1>(), size_of::<PolicyVerdictV1>(), None),
        (MAP_POLICY_FLOWS, size_of::<Ct4KeyV1>(), 1, None),
        (MAP_POLICY_FLOWS6, size_of::<Ct6KeyV1>(), 1, None),
        (MAP_POLICY_STATS, 4, size_of::<PolicyCounterV1>(), Some(MAX_POLICIES)),
        (MAP_POLICY_DENIED, 4, size_of::<PolicyCounterV1>(), Some(2 * MAX_ENDPOINTS)),
        (MAP_IPCACHE_HOSTS, size_of::<IpCache4KeyV1>(), size_of::<IdentityV1>(), None),
        (MAP_IPCACHE_HOSTS6, size_of::<IpCache6KeyV1>(), size_of::<IdentityV1>(), None),
        (MAP_POLICY_EXACT, size_of::<PolicyKeyV1>(), size_of::<PolicyVerdictV1>(), None),
        (MAP_EVENTS, 0, 0, None),
        (MAP_EVENT_CONFIG, 4, size_of::<EventConfigV1>(), Some(1)),
        (MAP_EVENT_BUCKET, 4, size_of::<EventBucketV1>(), Some(1)),
        (MAP_EVENT_STATS, 4, 8, Some(EVENT_OUTCOMES * EVENT_KIND_SLOTS)),
        (MAP_REPLY_FILTER, 4, 1, Some(REPLY_FILTER_SLOTS)),
        (MAP_NEXT_HOPS, size_of::<NextHop4KeyV1>(), size_of::<NextHopV1>(), None),
        (MAP_NEXT_HOPS6, size_of::<NextHop6KeyV1>(), size_of::<NextHopV1>(), None),
        (MAP_NEXT_HOP_GENERATION, 4, 4, Some(1)),
        (MAP_NODEPORT_FILTER, 4, 8, Some(NODEPORT_FILTER_WORDS)),
        (MAP_LOCAL_BACKENDS, 4, 1, Some(REPLY_FILTER_SLOTS)),
        (MAP_FRONTEND_FILTER, 4, 8, Some(FRONTEND_FILTER_WORDS)),
        (MAP_SERVICE_BY_ID, 4, size_of::<ServiceByIdV1>(), None),
    ]
}

/// The capacities the flags ask for, of the maps whose size is a flag.
pub(crate) fn flag_sized(sizes: &MapSizes) -> [(&'static str, u32); 29] {
    use lb_common::*;
    let flows = sizes.flows.unwrap_or(MAX_FLOWS);
    let services = sizes.services.unwrap_or(MAX_SERVICES);
    let backends = sizes.backends.unwrap_or(MAX_BACKENDS);
    // Services before the Maglev array: its copy keeps the slots the (copied) services use.
    [
        (MAP_SERVICES, services),
        (MAP_SERVICES6, services),
        (MAP_CONNTRACK, flows),
        (MAP_REVERSE_NAT, flows),
        (MAP_CONNTRACK6, flows),
        (MAP_REVERSE_NAT6, flows),
        (MAP_MAGLEV, sizes.maglev_slots.unwrap_or(MAGLEV_SLOTS).div_ceil(MAGLEV_SLOTS_PER_ENTRY as u32)),
        (MAP_SERVICE_STATS, services),
        (MAP_SERVICE_NAMES, services),
        (MAP_SERVICE_OPTS, services),
        (MAP_SERVICE_BY_ID, services),
        (MAP_BACKENDS, backends),
        (MAP_BACKENDS6, backends),
        (MAP_BACKEND_STATS, backends),
        (MAP_AFFINITY_MATCH, backends),
        (MAP_SOCK_REVNAT, sizes.sockets.unwrap_or(MAX_SOCKETS)),
        (MAP_SOCK_REVNAT6, sizes.sockets.unwrap_or(MAX_SOCKETS)),
        (MAP_AFFINITY, sizes.affinity.unwrap_or(MAX_AFFINITY)),
        (MAP_POLICY_FLOWS, sizes.policy_flows.unwrap_or(MAX_POLICY_FLOWS)),
        (MAP_POLICY_FLOWS6, sizes.policy_flows.unwrap_or(MAX_POLICY_FLOWS)),
        (MAP_IPCACHE_HOSTS, sizes.ipcache.unwrap_or(MAX_IPCACHE)),
        (MAP_IPCACHE_HOSTS6, sizes.ipcache.unwrap_or(MAX_IPCACHE)),
        (MAP_IPCACHE, sizes.ipcache.unwrap_or(MAX_IPCACHE)),
        (MAP_IPCACHE6, sizes.ipcache.unwrap_or(MAX_IPCACHE)),
        (MAP_POLICY_EXACT, sizes.policy_rules.unwrap_or(MAX_POLICY_RULES)),
        (MAP_POLICY, sizes.policy_rules.unwrap_or(MAX_POLICY_RULES)),
        (MAP_NEXT_HOPS, sizes.next_hops.unwrap_or(MAX_NEXT_HOPS)),
        (MAP_NEXT_HOPS6, sizes.next_hops.unwrap_or(MAX_NEXT_HOPS)),
        (MAP_EVENTS, sizes.event_ring.unwrap_or(EVENT_RING_BYTES)),
    ]
}

/// A pinned map of another capacity than the flags ask for (`--max-flows`, `--maglev-slots`,
/// `--max-services`, `--max-backends`, `--max-sockets` or `--max-affinity` changed) is renamed aside so that loading creates it at the new size; `load` then copies
/// its entries over and removes it. Restarting with other sizes never fails.
fn set_aside_resized_pins(pin_dir: &Path, sizes: &MapSizes) -> Result<Vec<(&'static str, PathBuf)>> {
    let mut resized = Vec::new();
    for (name, capacity) in flag_sized(sizes) {
        let path = pin_path(pin_dir, name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapData::from_pin(&path).and_then(|m| m.info()).with_context(|| format!("inspecting pinned map {}", path.display()))?;
        if info.max_entries() == capacity {
            continue;
        }
        let aside = pin_dir.join(format!("{name}_resize"));
        std::fs::rename(&path, &aside).with_context(|| format!("moving {} aside", path.display()))?;
        log::warn!("pinned map {name} has {} entries of room, the flags ask for {capacity}: resizing it", info.max_entries());
        resized.push((name, aside));
    }
    Ok(resized)
}

/// Copies the entries of the map pinned at `from` into the freshly loaded map `name`. Flows go
/// most recent first, so a smaller map keeps the most recently used; Maglev slots keep their
/// index (a table past the new end is rewritten by the next sync); arrays by id keep the ids
/// that fit (the agent rewrites what names a lost one); LRU maps keep what fits.
fn copy_entries(ebpf: &mut Ebpf, name: &'static str, from: &Path) -> Result<usize> {
    use aya::maps::{Array, HashMap, Map, MapData};
    let old = Map::from_map_data(MapData::from_pin(from)?)?;
    // The slices programmed services of both families use: the only Maglev slots worth copying.
    let mut slices = Vec::new();
    if name == MAP_MAGLEV {
        slices.extend(service_slices::<Addr4>(ebpf, MAP_SERVICES)?);
        slices.extend(service_slices::<Addr6>(ebpf, MAP_SERVICES6)?);
    }
    let new = ebpf.map_mut(name).with_context(|| format!("no map {name}"))?;
    Ok(match name {
        MAP_CONNTRACK => copy_flows::<CtEntryV1<Addr4>, Addr4>(old, new, |v| v.last_seen_ns)?,
        MAP_REVERSE_NAT => copy_flows::<RevNatV1<Addr4>, Addr4>(old, new, |v| v.last_seen_ns)?,
        MAP_CONNTRACK6 => copy_flows::<CtEntryV1<Addr6>, Addr6>(old, new, |v| v.last_seen_ns)?,
        MAP_REVERSE_NAT6 => copy_flows::<RevNatV1<Addr6>, Addr6>(old, new, |v| v.last_seen_ns)?,
        MAP_SERVICES => copy_services::<Addr4>(old, new, name)?,
        MAP_SERVICES6 => copy_services::<Addr6>(old, new, name)?,
        MAP_AFFINITY_MATCH => {
            let old: HashMap<_, AffinityMatchKeyV1, u8> = old.try_into()?;
            let mut new: HashMap<&mut MapData, AffinityMatchKeyV1, u8> = new.try_into()?;
            let keys: Vec<_> = old.keys().filter_map(|k| k.ok()).collect();
            keys.iter().take_while(|k| new.insert(*k, &1, 0).is_ok()).count()
        }
        MAP_BACKENDS => copy_by_index::<Backend4V1>(old, new)?,
        MAP_BACKENDS6 => copy_by_index::<Backend6V1>(old, new)?,
        MAP_SERVICE_NAMES => copy_by_index::<NameV1>(old, new)?,
        MAP_SERVICE_OPTS => copy_by_index::<ServiceOptsV1>(old, new)?,
        MAP_SERVICE_BY_ID => copy_by_index::<ServiceByIdV1>(old, new)?,
        MAP_SERVICE_STATS | MAP_BACKEND_STATS => copy_by_index::<TrafficCountersV1>(old, new)?,
        MAP_AFFINITY => copy_hash::<AffinityKeyV1, AffinityV1>(old, new)?,
        MAP_SOCK_REVNAT => copy_hash::<SockRevNat4KeyV1, SockRevNat4V1>(old, new)?,
        MAP_SOCK_REVNAT6 => copy_hash::<SockRevNat6KeyV1, SockRevNat6V1>(old, new)?,
        MAP_POLICY_FLOWS => copy_hash::<Ct4KeyV1, u8>(old, new)?,
        MAP_POLICY_FLOWS6 => copy_hash::<Ct6KeyV1, u8>(old, new)?,
        MAP_IPCACHE_HOSTS => copy_hash::<IpCache4KeyV1, IdentityV1>(old, new)?,
        MAP_IPCACHE_HOSTS6 => copy_hash::<IpCache6KeyV1, IdentityV1>(old, new)?,
        MAP_POLICY_EXACT => copy_hash::<PolicyKeyV1, PolicyVerdictV1>(old, new)?,
        MAP_IPCACHE => copy_lpm::<IpCache4KeyV1, IdentityV1>(old, new)?,
        MAP_IPCACHE6 => copy_lpm::<IpCache6KeyV1, IdentityV1>(old, new)?,
        MAP_POLICY => copy_lpm::<PolicyKeyV1, PolicyVerdictV1>(old, new)?,
        // Events not yet read are lost with the old ring (counted nowhere: the agent was down).
        MAP_EVENTS => 0,
        // A cache: it fills again from the FIB.
        MAP_NEXT_HOPS | MAP_NEXT_HOPS6 => 0,
        _ => {
            let old: Array<_, MaglevSlotPair> = old.try_into()?;
            let slots = old.len() * MAGLEV_SLOTS_PER_ENTRY as u32;
            copy_slots(|slot| Ok(old.get(&(slot / 2), 0)?[(slot % 2) as usize]), slots, new, &slices)?
        }
    })
}

/// Copies the slots of `slices` (those below `old_slots`) from `read` into the loaded slot
/// array `new`, at the same indexes.
fn copy_slots(read: impl Fn(u32) -> Result<u32>, old_slots: u32, new: &mut aya::maps::Map, slices: &[(u32, u32)]) -> Result<usize> {
    let new: aya::maps::Array<&mut aya::maps::MapData, MaglevSlotPair> = new.try_into()?;
    let new_slots = new.len() * MAGLEV_SLOTS_PER_ENTRY as u32;
    let mut copied = 0;
    for (offset, size) in slices {
        let ids = (*offset..offset.saturating_add(*size)).take_while(|s| *s < old_slots.min(new_slots)).map(&read).collect::<Result<Vec<u32>>>()?;
        super::slots::SlotWindow::map(new.map(), new_slots, *offset, ids.len())?.write_at(*offset, &ids);
        copied += ids.len();
    }
    Ok(copied)
}

/// Schema v1's slot array held one slot an element (half of its memory padding). An earlier
/// agent's tables are carried over into `LB_MAGLEV_V2` at the same slots, before any program
/// uses it, and its pin goes (the old programs hold the old array until they are replaced).
fn migrate_slot_array_v1(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<()> {
    use aya::maps::{Array, Map, MapData};
    let path = pin_path(pin_dir, MAP_MAGLEV_V1);
    if !path.exists() {
        return Ok(());
    }
    let old: Array<_, u32> = Map::from_map_data(MapData::from_pin(&path)?)?.try_into().with_context(|| format!("{} is not a slot array", path.display()))?;
    let mut slices = service_slices::<Addr4>(ebpf, MAP_SERVICES)?;
    slices.extend(service_slices::<Addr6>(ebpf, MAP_SERVICES6)?);
    let new = ebpf.map_mut(MAP_MAGLEV).with_context(|| format!("no map {MAP_MAGLEV}"))?;
    // Slot by slot: a v1 array may predate BPF_F_MMAPABLE.
    let copied = copy_slots(|slot| Ok(old.get(&slot, 0)?), old.len(), new, &slices)?;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    log::info!("{MAP_MAGLEV_V1}: {copied} slots of {} tables carried over into {MAP_MAGLEV} (two slots an element, half the memory)", slices.len());
    Ok(())
}

/// Version 1 of the frontend filter (by address alone) gives way to version 2, which
/// `fill_frontend_filters` fills from the frontend maps: in an object that has version 2, the
/// old filter's pin goes (the old programs hold their map until they are replaced).
fn retire_frontend_filter_v1(ebpf: &Ebpf, pin_dir: &Path) -> Result<()> {
    let path = pin_path(pin_dir, MAP_FRONTEND_FILTER_V1);
    if frontend_filter_of(ebpf) == Some(FrontendFilter::V2) && path.exists() {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        log::info!("{MAP_FRONTEND_FILTER_V1} retired: {MAP_FRONTEND_FILTER} marks each frontend's address, port and protocol");
    }
    Ok(())
}

/// The version of the frontend filter a loaded object has, if any.
fn frontend_filter_of(ebpf: &Ebpf) -> Option<FrontendFilter> {
    FrontendFilter::NEWEST_FIRST.into_iter().find(|version| ebpf.map(version.map_name()).is_some())
}

/// The Maglev slices the frontends in the loaded map `name` use.
fn service_slices<A: MapAddr + aya::Pod>(ebpf: &Ebpf, name: &str) -> Result<Vec<(u32, u32)>> {
    let Some(map) = ebpf.map(name) else { return Ok(Vec::new()) };
    let services: aya::maps::HashMap<_, ServiceKeyV1<A>, ServiceV1> = map.try_into()?;
    Ok(services.iter().filter_map(|e| e.ok()).map(|(_, svc)| (svc.maglev_offset, svc.maglev_size)).collect())
}

/// Copies a conntrack or reverse-NAT map, most recently used first until the new one is full.
fn copy_flows<V: aya::Pod, A: MapAddr + aya::Pod>(old: aya::maps::Map, new: &mut aya::maps::Map, last_seen: impl Fn(&V) -> u64) -> Result<usize> {
    let old: aya::maps::HashMap<_, CtKeyV1<A>, V> = old.try_into()?;
    let mut new: aya::maps::HashMap<&mut aya::maps::MapData, CtKeyV1<A>, V> = new.try_into()?;
    let mut entries: Vec<(CtKeyV1<A>, V)> = old.iter().filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|(_, v)| std::cmp::Reverse(last_seen(v)));
    Ok(entries.iter().take_while(|(k, v)| new.insert(k, v, 0).is_ok()).count())
}

/// Copies an LRU map's entries: a smaller map keeps as many as it holds (the kernel evicts).
/// Copies a hash map (LRU or not) into its resized twin, as many entries as fit.
fn copy_hash<K: aya::Pod, V: aya::Pod>(old: aya::maps::Map, new: &mut aya::maps::Map) -> Result<usize> {
    let old: aya::maps::HashMap<_, K, V> = old.try_into()?;
    let mut new: aya::maps::HashMap<&mut aya::maps::MapData, K, V> = new.try_into()?;
    let entries: Vec<(K, V)> = old.iter().filter_map(|e| e.ok()).collect();
    Ok(entries.iter().filter(|(k, v)| new.insert(k, v, 0).is_ok()).count())
}

/// Copies an LPM trie into its resized twin, as many entries as fit.
fn copy_lpm<K: aya::Pod, V: aya::Pod>(old: aya::maps::Map, new: &mut aya::maps::Map) -> Result<usize> {
    let old: aya::maps::LpmTrie<_, K, V> = old.try_into()?;
    let mut new: aya::maps::LpmTrie<&mut aya::maps::MapData, K, V> = new.try_into()?;
    let entries: Vec<(aya::maps::lpm_trie::Key<K>, V)> = old.iter().filter_map(|e| e.ok()).collect();
    Ok(entries.iter().filter(|(k, v)| new.insert(k, v, 0).is_ok()).count())
}

/// Copies the frontends whose service id fits the new capacity.
fn copy_services<A: MapAddr + aya::Pod>(old: aya::maps::Map, new: &mut aya::maps::Map, name: &str) -> Result<usize> {
    let old: aya::maps::HashMap<_, ServiceKeyV1<A>, ServiceV1> = old.try_into()?;
    let capacity = match &*new {
        aya::maps::Map::HashMap(data) => data.info()?.max_entries(),
        _ => bail!("{name} is not a hash map"),
    };
    let mut new: aya::maps::HashMap<&mut aya::maps::MapData, ServiceKeyV1<A>, ServiceV1> = new.try_into()?;
    let fits: Vec<_> = old.iter().filter_map(|e| e.ok()).filter(|(_, svc)| svc.service_id < capacity).collect();
    Ok(fits.iter().take_while(|(k, v)| new.insert(k, v, 0).is_ok()).count())
}

/// Copies every index both arrays have.
fn copy_by_index<V: aya::Pod>(old: aya::maps::Map, new: &mut aya::maps::Map) -> Result<usize> {
    let old: aya::maps::Array<_, V> = old.try_into()?;
    let mut new: aya::maps::Array<&mut aya::maps::MapData, V> = new.try_into()?;
    let end = old.len().min(new.len());
    for i in 0..end {
        new.set(i, &old.get(&i, 0)?, 0)?;
    }
    Ok(end as usize)
}

/// A pinned map whose key or value size differs from this build's schema was left by a build
/// with another layout under the same name (a bug: layouts change by adding a V2 map). Reusing
/// it would corrupt every lookup, so it is moved aside, loudly, and a fresh map is created.
/// Conntrack is never wiped silently: the old map stays pinned under its new name.
pub fn set_aside_incompatible_pins(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut moved = Vec::new();
    // Map types as this build's object declares them (a counter array that stopped being
    // per-CPU keeps its name and layout but not its type).
    let object = aya_obj::Object::parse(OBJECT).context("parsing the BPF object")?;
    for (name, key_size, value_size, capacity) in expected_layouts() {
        let path = pin_path(pin_dir, name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapData::from_pin(&path).and_then(|m| m.info()).with_context(|| format!("inspecting pinned map {}", path.display()))?;
        let same_capacity = capacity.is_none_or(|c| c == info.max_entries());
        let same_type = object.maps.get(name).is_none_or(|m| m.map_type() == info.map_type().map(|t| t as u32).unwrap_or(u32::MAX));
        if info.key_size() as usize == key_size && info.value_size() as usize == value_size && same_capacity && same_type {
            continue;
        }
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        // bpffs reserves dots in names.
        let aside = pin_dir.join(format!("{name}_incompatible_{stamp}"));
        std::fs::rename(&path, &aside).with_context(|| format!("moving {} aside", path.display()))?;
        log::error!(
            "pinned map {name} (type {:?}) has key/value sizes {}/{} and {} entries but this build expects {}{key_size}/{value_size}{}: moved it to {} and created a new one{}",
            info.map_type(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            if same_type { "" } else { "another map type, " },
            capacity.map(|c| format!(" and {c} entries")).unwrap_or_default(),
            aside.display(),
            if name == lb_common::MAP_CONNTRACK || name == lb_common::MAP_REVERSE_NAT { "; established flows will be balanced again as new ones" } else { "" }
        );
        moved.push(aside);
    }
    Ok(moved)
}

/// Makes sure `dir` exists on a bpffs, mounting one at `dir` when it is not.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
    if is_bpffs(dir)? {
        return Ok(());
    }
    let target = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("mounting bpffs at {}: {}", dir.display(), io::Error::last_os_error());
    }
    Ok(())
}

pub fn is_bpffs(dir: &Path) -> Result<bool> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    Ok(fs_magic(dir)? == BPF_FS_MAGIC)
}

/// Whether `dir` is on a cgroup v2 file system (where the socket hooks attach).
pub fn is_cgroup2(dir: &Path) -> Result<bool> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    Ok(fs_magic(dir)? == CGROUP2_SUPER_MAGIC)
}

/// The type of the file system `dir` is on (statfs `f_type`).
fn fs_magic(dir: &Path) -> Result<i64> {
    let path = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        bail!("statfs {}: {}", dir.display(), io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Where the agent pins the programs another process attaches: lb-cni attaches `lb_tc` to
/// each pod it wires, before its ADD returns.
pub fn programs_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("programs")
}

/// Pins a loaded program at `programs/<name>`, replacing an earlier agent's pin in one step
/// (pinned under a temporary name, then renamed over it), so lb-cni never finds none.
pub fn pin_program(pin_dir: &Path, name: &str, prog: &mut aya::programs::SchedClassifier) -> Result<PathBuf> {
    let dir = programs_dir(pin_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    // bpffs refuses names with dots.
    let fresh = dir.join(format!("{name}_new"));
    let _ = std::fs::remove_file(&fresh);
    prog.pin(&fresh).with_context(|| format!("pinning {name} at {}", fresh.display()))?;
    std::fs::rename(&fresh, &path).with_context(|| format!("renaming {} to {}", fresh.display(), path.display()))?;
    Ok(path)
}

/// Where a map of `pin_dir` is pinned.
pub fn pin_path(pin_dir: &Path, map: &str) -> PathBuf {
    pin_dir.join(map)
}
