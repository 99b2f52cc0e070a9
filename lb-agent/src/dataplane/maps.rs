//! Typed handles on the maps of schema v1, from a freshly loaded object or from their pins.
use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::*;

use aya::maps::lpm_trie::Key as LpmKey;

use super::{batch, bitmap::Bitmap, slots::SlotWindow, BackendEntry, FrontendKey};

/// The maps that hold one address family's entries.
pub struct FamilyMaps<A: MapAddr + aya::Pod> {
    pub services: HashMap<MapData, ServiceKeyV1<A>, ServiceV1>,
    pub backends: Array<MapData, BackendV1<A>>,
    pub conntrack: HashMap<MapData, CtKeyV1<A>, CtEntryV1<A>>,
    pub reverse_nat: HashMap<MapData, CtKeyV1<A>, RevNatV1<A>>,
    /// This node's addresses, where NodePorts answer.
    pub node_ips: HashMap<MapData, A, u32>,
    pub source_ranges: LpmTrie<MapData, SourceRangeV1<A>, u8>,
    /// For a node socket sent to a backend, the frontend its application asked for.
    pub sock_revnat: HashMap<MapData, SockRevNatKeyV1<A>, SockRevNatV1<A>>,
    /// The load-balancer addresses XDP answers ARP (or NDP) for, per external device.
    pub l2_announce: HashMap<MapData, L2AnnounceKeyV1<A>, L2AnnounceV1>,
}

/// An address family as user space handles it: its maps, and conversions to and from `IpAddr`.
pub trait Family: MapAddr + aya::Pod {
    const NAME: &'static str;
    /// Map names: services, backends, conntrack, reverse NAT, node addresses, source ranges,
    /// socket reverse NAT, L2 announcements.
    const MAPS: [&'static str; 8];
    fn of(maps: &Maps) -> &FamilyMaps<Self>;
    fn of_mut(maps: &mut Maps) -> &mut FamilyMaps<Self>;
    fn from_ip(ip: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;
    /// The session-affinity key of client `self` on frontend `service_id`.
    fn affinity_key(self, service_id: u32) -> AffinityKeyV1;
    /// The source of hairpin flows.
    fn hairpin_ip() -> IpAddr;
    /// The SNAT source of remote flows the agent configured, if any.
    fn snat_ip(maps: &Maps) -> Option<IpAddr>;
}

impl Family for Addr4 {
    const NAME: &'static str = "IPv4";
    const MAPS: [&'static str; 8] = [MAP_SERVICES, MAP_BACKENDS, MAP_CONNTRACK, MAP_REVERSE_NAT, MAP_NODE_IPS, MAP_SOURCE_RANGES, MAP_SOCK_REVNAT, MAP_L2_ANNOUNCE];
    fn of(maps: &Maps) -> &FamilyMaps<Self> {
        &maps.v4
    }
    fn of_mut(maps: &mut Maps) -> &mut FamilyMaps<Self> {
        &mut maps.v4
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(ip) => Some(ip4_raw(ip.octets())),
            IpAddr::V6(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V4(ip4_addr(self))
    }
    fn affinity_key(self, service_id: u32) -> AffinityKeyV1 {
        AffinityKeyV1::ip4(self, service_id)
    }
    fn hairpin_ip() -> IpAddr {
        IpAddr::from(HAIRPIN_ADDR)
    }
    fn snat_ip(maps: &Maps) -> Option<IpAddr> {
        maps.config.get(&0, 0).ok().map(|c| c.snat_addr).filter(|a| *a != 0).map(|a| a.to_ip())
    }
}

impl Family for Addr6 {
    const NAME: &'static str = "IPv6";
    const MAPS: [&'static str; 8] = [MAP_SERVICES6, MAP_BACKENDS6, MAP_CONNTRACK6, MAP_REVERSE_NAT6, MAP_NODE_IPS6, MAP_SOURCE_RANGES6, MAP_SOCK_REVNAT6, MAP_L2_ANNOUNCE6];
    fn of(maps: &Maps) -> &FamilyMaps<Self> {
        &maps.v6
    }
    fn of_mut(maps: &mut Maps) -> &mut FamilyMaps<Self> {
        &mut maps.v6
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(ip) => Some(ip6_raw(ip.octets())),
            IpAddr::V4(_) => None,
        }
    }
    fn to_ip(self) -> IpAddr {
        IpAddr::V6(ip6_addr(self))
    }
    fn affinity_key(self, service_id: u32) -> AffinityKeyV1 {
        AffinityKeyV1::ip6(self, service_id)
    }
    fn hairpin_ip() -> IpAddr {
        IpAddr::from(HAIRPIN_ADDR6)
    }
    fn snat_ip(maps: &Maps) -> Option<IpAddr> {
        maps.config6.get(&0, 0).ok().map(|c| c.snat_addr).filter(|a| !a.is_zero()).map(|a| a.to_ip())
    }
}

/// How many held things stand for each filter mark: a mark is set while one does.
#[derive(Default)]
struct Holders<K>(std::collections::HashMap<K, u32>);

impl<K: std::hash::Hash + Eq + Copy> Holders<K> {
    /// One more (`held`) or one fewer holder of `key`; the mark's new state when it changes.
    fn change(&mut self, key: K, held: bool) -> Option<bool> {
        let count = self.0.entry(key).or_default();
        let before = *count;
        *count = if held { before + 1 } else { before.saturating_sub(1) };
        let after = *count;
        if after == 0 {
            self.0.remove(&key);
        }
        ((before == 0) != (after == 0)).then_some(after > 0)
    }
}

/// A map an older object (a benchmark's baseline) lacks: `None` when it is missing.
fn optional<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Result<Map>, name: &str) -> Result<Option<T>> {
    match map {
        Ok(map) => Ok(Some(map.try_into().with_context(|| format!("map {name} has an unexpected type or layout"))?)),
        Err(_) => Ok(None),
    }
}

/// The versions of the frontend filter, newest first: an object has one of them (one older
/// still, none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrontendFilter {
    /// `LB_FEADDR_V2`: by address, port and protocol.
    V2,
    /// `LB_FEADDR_V1`: by address alone (another build's object, such as a benchmark's baseline).
    V1,
}

impl FrontendFilter {
    pub(crate) const NEWEST_FIRST: [Self; 2] = [Self::V2, Self::V1];

    pub(crate) fn map_name(self) -> &'static str {
        match self {
            Self::V2 => MAP_FRONTEND_FILTER,
            Self::V1 => MAP_FRONTEND_FILTER_V1,
        }
    }

    /// The bit of frontend `key` (not a NodePort).
    pub(crate) fn bit<A: MapAddr>(self, key: &ServiceKeyV1<A>) -> (u32, u64) {
        match self {
            Self::V2 => frontend_filter_bit(&key.addr, key.port, key.proto),
            Self::V1 => frontend_filter_bit_v1(&key.addr),
        }
    }
}

/// A bitmap of `words` words an older object lacks, mapped: `None` when it is missing.
fn bitmap(map: Result<Map>, name: &str, words: u32) -> Result<Option<Bitmap>> {
    let Some(Map::Array(data)) = map.ok() else { return Ok(None) };
    Ok(Some(Bitmap::map(data, words).with_context(|| format!("mapping {name}"))?))
}

/// Opens the map pinned as `name` in `pin_dir` as the typed map `T` (its kind read from the
/// kernel): for the maps `Maps` does not hold.
pub fn open_pinned<T: TryFrom<Map, Error = aya::maps::MapError>>(pin_dir: &Path, name: &str) -> Result<T> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("map {}", path.display()))?;
    T::try_from(map).with_context(|| format!("map {} has an unexpected type or layout", path.display()))
}

pub struct Maps {
    pub v4: FamilyMaps<Addr4>,
    pub v6: FamilyMaps<Addr6>,
    /// The Maglev slots, two to an element: see [`Maps::maglev_slots`], [`Maps::read_slots`].
    pub maglev: Array<MapData, MaglevSlotPair>,
    pub service_stats: Array<MapData, TrafficCountersV1>,
    pub backend_stats: Array<MapData, TrafficCountersV1>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, ConfigV1>,
    pub config6: Array<MapData, Config6V1>,
    pub service_names: Array<MapData, NameV1>,
    pub service_opts: Array<MapData, ServiceOptsV1>,
    pub affinity: HashMap<MapData, AffinityKeyV1, AffinityV1>,
    pub affinity_match: HashMap<MapData, AffinityMatchKeyV1, u8>,
    pub sock_config: Array<MapData, SockConfigV1>,
    pub sock_skip: HashMap<MapData, u64, u8>,
    /// Ports some NodePort frontend uses (see [`MAP_NODEPORT_FILTER`]); an object older than
    /// the filter (a benchmark's baseline) has none.
    pub nodeport_filter: Option<Bitmap>,
    /// Local backends' addresses (see [`MAP_LOCAL_BACKENDS`]; none in an older object), and
    /// how many held local backends each slot stands for.
    pub local_backends: Option<Array<MapData, u8>>,
    local_backend_slots: Holders<u32>,
    /// Frontends' addresses, ports and protocols (see [`MAP_FRONTEND_FILTER`]; an object of
    /// version 1 has [`MAP_FRONTEND_FILTER_V1`], by address alone; an older one none), and how
    /// many frontends each set bit stands for.
    pub frontend_filter: Option<Bitmap>,
    frontend_filter_version: FrontendFilter,
    frontend_filter_counts: Holders<(u32, u64)>,
    /// Frontends by service id (see [`MAP_SERVICE_BY_ID`]; none in an older object).
    pub service_by_id: Option<Array<MapData, ServiceByIdV1>>,
    /// Capacity of the conntrack (and reverse-NAT) map, which the loader may have resized.
    pub flow_capacity: u32,
    /// The region of the slot array the last table was written through.
    slot_region: Option<SlotWindow>,
}

impl Maps {
    /// Takes the maps out of a loaded object (load its programs first).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Self::build(|name| ebpf.take_map(name).with_context(|| format!("map {name} missing from the object")))
    }

    /// Opens the maps an agent pinned in `pin_dir`; works while no agent runs.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::build(|name| {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
            Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
        })
    }

    fn build(mut open: impl FnMut(&str) -> Result<Map>) -> Result<Self> {
        macro_rules! typed {
            ($name:expr) => {
                open($name)?.try_into().with_context(|| format!("map {} has an unexpected type or layout", $name))?
            };
        }
        let (mut frontend_filter, mut frontend_filter_version) = (None, FrontendFilter::V2);
        for version in FrontendFilter::NEWEST_FIRST {
            if let Some(filter) = bitmap(open(version.map_name()), version.map_name(), FRONTEND_FILTER_WORDS)? {
                (frontend_filter, frontend_filter_version) = (Some(filter), version);
                break;
            }
        }
        let conntrack = open(MAP_CONNTRACK)?;
        let flow_capacity = match &conntrack {
            Map::HashMap(data) => data.info()?.max_entries(),
            _ => 0,
        };
        macro_rules! family {
            ($names:expr, $conntrack:expr) => {{
                let [services, backends, conntrack, reverse_nat, node_ips, source_ranges, sock_revnat, l2_announce] = $names;
                FamilyMaps {
                    services: typed!(services),
                    backends: typed!(backends),
                    conntrack: $conntrack.try_into().with_context(|| format!("map {conntrack} has an unexpected type or layout"))?,
                    reverse_nat: typed!(reverse_nat),
                    node_ips: typed!(node_ips),
                    source_ranges: typed!(source_ranges),
                    sock_revnat: typed!(sock_revnat),
                    l2_announce: typed!(l2_announce),
                }
            }};
        }
        Ok(Self {
            slot_region: None,
            flow_capacity,
            v4: family!(Addr4::MAPS, conntrack),
            v6: family!(Addr6::MAPS, open(MAP_CONNTRACK6)?),
            maglev: typed!(MAP_MAGLEV),
            service_stats: typed!(MAP_SERVICE_STATS),
            backend_stats: typed!(MAP_BACKEND_STATS),
            reasons: typed!(MAP_REASONS),
            config: typed!(MAP_CONFIG),
            config6: typed!(MAP_CONFIG6),
            service_names: typed!(MAP_SERVICE_NAMES),
            service_opts: typed!(MAP_SERVICE_OPTS),
            affinity: typed!(MAP_AFFINITY),
            affinity_match: typed!(MAP_AFFINITY_MATCH),
            sock_config: typed!(MAP_SOCK_CONFIG),
            sock_skip: typed!(MAP_SOCK_SKIP),
            nodeport_filter: bitmap(open(MAP_NODEPORT_FILTER), MAP_NODEPORT_FILTER, NODEPORT_FILTER_WORDS)?,
            local_backends: optional(open(MAP_LOCAL_BACKENDS), MAP_LOCAL_BACKENDS)?,
            local_backend_slots: Default::default(),
            frontend_filter,
            frontend_filter_version,
            frontend_filter_counts: Default::default(),
            service_by_id: optional(open(MAP_SERVICE_BY_ID), MAP_SERVICE_BY_ID)?,
        })
    }

    /// Makes family `A`'s announced addresses exactly `wanted` (device ifindex, address, the
    /// device's MAC), each answered until `expires_ns` (CLOCK_MONOTONIC).
    pub fn set_announced<A: Family>(&mut self, wanted: &[(u32, A, [u8; 6])], expires_ns: u64) -> Result<()> {
        let map = &mut A::of_mut(self).l2_announce;
        let stale: Vec<L2AnnounceKeyV1<A>> = map.keys().filter_map(Result::ok).filter(|k| !wanted.iter().any(|(i, a, _)| k.ifindex == *i && k.addr == *a)).collect();
        for key in stale {
            map.remove(&key).with_context(|| format!("removing from {}", A::MAPS[7]))?;
        }
        for &(ifindex, addr, mac) in wanted {
            map.insert(&L2AnnounceKeyV1 { ifindex, addr }, &L2AnnounceV1 { expires_ns, mac, _pad: [0; 2] }, 0).with_context(|| format!("writing {}", A::MAPS[7]))?;
        }
        Ok(())
    }

    /// Family `A`'s announced addresses: (ifindex, address, entry).
    pub fn announced<A: Family>(&self) -> Vec<(u32, IpAddr, L2AnnounceV1)> {
        A::of(self).l2_announce.iter().filter_map(Result::ok).map(|(k, v)| (k.ifindex, k.addr.to_ip(), v)).collect()
    }

    /// Every frontend entry of family `A`, in a few batched calls.
    pub fn frontends<A: Family>(&self) -> Result<Vec<(FrontendKey, ServiceV1)>> {
        let entries: Vec<(ServiceKeyV1<A>, ServiceV1)> = batch::lookup_all(A::of(self).services.map()).with_context(|| format!("reading {}", A::MAPS[0]))?;
        Ok(entries.into_iter().map(|(key, svc)| (FrontendKey::of(&key), svc)).collect())
    }

    /// Family `A`'s backends in use (id 0 is never one; a zeroed entry is a free id), as
    /// `addr:port`, in a few batched calls.
    pub fn live_backends<A: Family>(&self) -> Result<Vec<(u32, std::net::SocketAddr)>> {
        let entries: Vec<(u32, BackendV1<A>)> = batch::lookup_all(A::of(self).backends.map()).with_context(|| format!("reading {}", A::MAPS[1]))?;
        Ok(entries.into_iter().filter(|(id, b)| *id != 0 && !b.addr.is_zero()).map(|(id, b)| (id, std::net::SocketAddr::new(b.addr.to_ip(), port_host(b.port)))).collect())
    }

    /// Every frontend entry of both families.
    pub fn all_frontends(&self) -> Result<Vec<(FrontendKey, ServiceV1)>> {
        let mut all = self.frontends::<Addr4>()?;
        all.extend(self.frontends::<Addr6>()?);
        Ok(all)
    }

    /// Adds family `A`'s source ranges to `ranges`, by service id.
    pub fn source_ranges_into<A: Family>(&self, ranges: &mut std::collections::HashMap<u32, Vec<(IpAddr, u8)>>) -> Result<()> {
        for key in A::of(self).source_ranges.keys() {
            let key = key.with_context(|| format!("reading {}", A::MAPS[5]))?;
            let (data, prefix_len) = (key.data(), key.prefix_len());
            ranges.entry(data.service_id).or_default().push((data.addr.to_ip(), (prefix_len - SourceRangeV1::<A>::SERVICE_BITS) as u8));
        }
        Ok(())
    }

    /// The backend `id` names for a frontend at `frontend_addr` (its family's array).
    pub fn backend(&self, frontend_addr: &IpAddr, id: u32) -> Result<BackendEntry> {
        Ok(match frontend_addr {
            IpAddr::V4(_) => BackendEntry::V4(self.v4.backends.get(&id, 0)?),
            IpAddr::V6(_) => BackendEntry::V6(self.v6.backends.get(&id, 0)?),
        })
    }

    /// The backend `id` names, in whichever family's array holds it (ids are one space).
    pub fn backend_by_id(&self, id: u32) -> Option<BackendEntry> {
        match (self.v4.backends.get(&id, 0), self.v6.backends.get(&id, 0)) {
            (Ok(b), _) if !b.addr.is_zero() => Some(BackendEntry::V4(b)),
            (_, Ok(b)) if !b.addr.is_zero() => Some(BackendEntry::V6(b)),
            _ => None,
        }
    }

    pub fn set_backend(&mut self, id: u32, entry: &BackendEntry) -> Result<()> {
        match entry {
            BackendEntry::V4(b) => self.v4.backends.set(id, b, 0)?,
            BackendEntry::V6(b) => self.v6.backends.set(id, b, 0)?,
        }
        Ok(())
    }

    /// Writes a frontend; `new`: not in the map yet. Its address (or NodePort port) is marked
    /// first: the entry is looked up from the moment it is written.
    pub fn insert_frontend(&mut self, key: &FrontendKey, entry: &ServiceV1, new: bool) -> Result<()> {
        if key.is_node_port() {
            self.mark_node_port(key.port, true)?;
        } else if new {
            self.count_frontend(key, true)?;
        }
        if let Some(by_id) = &mut self.service_by_id {
            by_id.set(entry.service_id, &key.by_id(entry), 0).with_context(|| format!("writing {MAP_SERVICE_BY_ID}"))?;
        }
        match (key.entry::<Addr4>(), key.entry::<Addr6>()) {
            (Some(k), _) => self.v4.services.insert(&k, entry, 0).with_context(|| format!("writing {MAP_SERVICES}")),
            (_, Some(k)) => self.v6.services.insert(&k, entry, 0).with_context(|| format!("writing {MAP_SERVICES6}")),
            _ => unreachable!("an address is of one family"),
        }
    }

    /// Removes a frontend, and its id's entry in `LB_SVC_BYID_V1` after it.
    pub fn remove_frontend(&mut self, key: &FrontendKey, service_id: u32) -> Result<()> {
        match (key.entry::<Addr4>(), key.entry::<Addr6>()) {
            (Some(k), _) => self.v4.services.remove(&k)?,
            (_, Some(k)) => self.v6.services.remove(&k)?,
            _ => unreachable!("an address is of one family"),
        }
        if let Some(by_id) = &mut self.service_by_id {
            by_id.set(service_id, &ServiceByIdV1::default(), 0).with_context(|| format!("clearing {MAP_SERVICE_BY_ID}"))?;
        }
        if key.is_node_port() {
            if !self.node_port_in_use(key.port) {
                self.mark_node_port(key.port, false)?;
            }
        } else {
            self.count_frontend(key, false)?;
        }
        Ok(())
    }

    /// Counts a frontend (not a NodePort) in (`held`) or out of the frontend filter: a bit is
    /// set while a frontend it stands for is in the maps.
    pub fn count_frontend(&mut self, key: &FrontendKey, held: bool) -> Result<()> {
        let at = match (key.entry::<Addr4>(), key.entry::<Addr6>()) {
            (Some(k), _) => self.frontend_filter_version.bit(&k),
            (_, Some(k)) => self.frontend_filter_version.bit(&k),
            _ => unreachable!("an address is of one family"),
        };
        let Some(filter) = self.frontend_filter.as_ref() else { return Ok(()) };
        if let Some(marked) = self.frontend_filter_counts.change(at, held) {
            filter.set(at.0, at.1, marked);
        }
        Ok(())
    }

    /// Whether a NodePort frontend of either family, protocol or scope is on `port` (raw): what
    /// the frontend maps hold, not what this agent wrote, so that one an earlier agent left is
    /// counted too.
    pub fn node_port_in_use(&self, port: u16) -> bool {
        let keys = [IPPROTO_TCP, IPPROTO_UDP].into_iter().flat_map(|proto| [SCOPE_CLUSTER, SCOPE_LOCAL].map(|scope| (proto, scope)));
        keys.into_iter().any(|(proto, scope)| {
            self.v4.services.get(&ServiceKeyV1 { addr: 0, port, proto, scope }, 0).is_ok() || self.v6.services.get(&ServiceKeyV1 { addr: [0; 4], port, proto, scope }, 0).is_ok()
        })
    }

    /// Counts a backend the dataplane starts (`held`) or stops holding in the local-backend
    /// filter, when it is local: a slot is marked while a held local backend is at it. Marked
    /// before the backend's first flow, cleared after its last frontend let it go.
    pub fn count_local_backend(&mut self, entry: &BackendEntry, held: bool) -> Result<()> {
        let (flags, slot) = match entry {
            BackendEntry::V4(b) => (b.flags, reply_filter_slot(&b.addr)),
            BackendEntry::V6(b) => (b.flags, reply_filter_slot(&b.addr)),
        };
        let Some(filter) = self.local_backends.as_mut().filter(|_| flags & F_BACKEND_LOCAL != 0) else { return Ok(()) };
        if let Some(marked) = self.local_backend_slots.change(slot, held) {
            filter.set(slot, &(marked as u8), 0).with_context(|| format!("writing {MAP_LOCAL_BACKENDS}"))?;
        }
        Ok(())
    }

    /// Marks (or clears) `port` (raw) in the NodePort filter (the agent is its one writer).
    pub fn mark_node_port(&mut self, port: u16, used: bool) -> Result<()> {
        if let Some(filter) = &self.nodeport_filter {
            let (word, bit) = nodeport_bit(port);
            filter.set(word, bit, used);
        }
        Ok(())
    }

    /// Lets clients in `addr`/`len` through the source ranges of frontend `service_id`.
    pub fn insert_source_range(&mut self, service_id: u32, addr: IpAddr, len: u8) -> Result<()> {
        match addr {
            IpAddr::V4(a) => self.v4.source_ranges.insert(&source_range_key(service_id, ip4_raw(a.octets()), len), &1, 0).with_context(|| format!("writing {MAP_SOURCE_RANGES}")),
            IpAddr::V6(a) => self.v6.source_ranges.insert(&source_range_key(service_id, ip6_raw(a.octets()), len), &1, 0).with_context(|| format!("writing {MAP_SOURCE_RANGES6}")),
        }
    }

    pub fn remove_source_range(&mut self, service_id: u32, addr: IpAddr, len: u8) -> Result<()> {
        match addr {
            IpAddr::V4(a) => self.v4.source_ranges.remove(&source_range_key(service_id, ip4_raw(a.octets()), len))?,
            IpAddr::V6(a) => self.v6.source_ranges.remove(&source_range_key(service_id, ip6_raw(a.octets()), len))?,
        }
        Ok(())
    }

    /// Per-reason packet counts, summed over CPUs.
    pub fn reason_counts(&self) -> Result<Vec<u64>> {
        (0..reason::COUNT).map(|r| Ok(self.reasons.get(&r, 0)?.iter().sum())).collect()
    }

    pub fn service_counters(&self, service_id: u32) -> Result<TrafficCountersV1> {
        Ok(self.service_stats.get(&service_id, 0)?)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<TrafficCountersV1> {
        Ok(self.backend_stats.get(&backend_id, 0)?)
    }

    /// Every service id's counters, indexed by id (a few batched calls).
    pub fn all_service_counters(&self) -> Result<Vec<TrafficCountersV1>> {
        all_counters(&self.service_stats, MAP_SERVICE_STATS)
    }

    /// Every backend id's counters, indexed by id.
    pub fn all_backend_counters(&self) -> Result<Vec<TrafficCountersV1>> {
        all_counters(&self.backend_stats, MAP_BACKEND_STATS)
    }

    /// Zeroes the counters of every service id from `services` on and every backend id from
    /// `backends` on, in two calls: ids past those are then handed out without a write each.
    pub fn zero_counters_from(&self, services: u32, backends: u32) -> Result<()> {
        for (map, name, from) in [(&self.service_stats, MAP_SERVICE_STATS, services), (&self.backend_stats, MAP_BACKEND_STATS, backends)] {
            let ids: Vec<u32> = (from..map.len()).collect();
            batch::update(map.map(), &ids, &vec![TrafficCountersV1::default(); ids.len()]).with_context(|| format!("zeroing {name}"))?;
        }
        Ok(())
    }

    /// Writes a Maglev table's slots from `offset` on, through a mapping of the region of the
    /// array around them. The region stays mapped for the next table (a sync writing thousands
    /// of tables maps a few regions, not one per table) until [`Maps::end_slot_writes`].
    pub fn write_slots(&mut self, offset: u32, ids: &[u32]) -> Result<()> {
        if !self.slot_region.as_ref().is_some_and(|r| r.covers(offset, ids.len())) {
            self.slot_region = None;
            let capacity = self.maglev_slots();
            let first = offset / SLOT_REGION * SLOT_REGION;
            let count = (offset + ids.len() as u32 - first).max(SLOT_REGION).min(capacity - first);
            let region = SlotWindow::map(self.maglev.map(), capacity, first, count as usize).with_context(|| format!("writing {} slots of {MAP_MAGLEV} at {offset}", ids.len()))?;
            self.slot_region = Some(region);
        }
        self.slot_region.as_ref().expect("just mapped").write_at(offset, ids);
        Ok(())
    }

    /// Unmaps the region `write_slots` kept, so that the array never stays in resident memory.
    pub fn end_slot_writes(&mut self) {
        self.slot_region = None;
    }

    /// The backend ids in slots `offset..offset + size`.
    pub fn read_slots(&self, offset: u32, size: u32) -> Result<Vec<u32>> {
        let window = SlotWindow::map(self.maglev.map(), self.maglev_slots(), offset, size as usize).with_context(|| format!("reading {size} slots of {MAP_MAGLEV} at {offset}"))?;
        Ok(window.read())
    }

    /// The frontend a packet to `addr:port/proto` (port raw, as keyed) finds, as the datapath
    /// looks it up: the exact address, else a NodePort when `addr` is a node address.
    pub fn lookup_frontend<A: Family>(&self, addr: A, port: u16, proto: u8) -> Option<(ServiceKeyV1<A>, ServiceV1)> {
        let family = A::of(self);
        let mut key = ServiceKeyV1 { addr, port, proto, scope: SCOPE_CLUSTER };
        if let Ok(svc) = family.services.get(&key, 0) {
            return Some((key, svc));
        }
        family.node_ips.get(&addr, 0).ok()?;
        key.addr = A::default();
        family.services.get(&key, 0).ok().map(|svc| (key, svc))
    }

    /// The backend id in one slot.
    pub fn read_slot(&self, slot: u32) -> Result<u32> {
        Ok(self.read_slots(slot, 1)?[0])
    }

    /// How many slots the array holds (two an element).
    pub fn maglev_slots(&self) -> u32 {
        self.maglev.len() * MAGLEV_SLOTS_PER_ENTRY as u32
    }
}

/// The LPM key of one CIDR (`addr`/`len`) of a frontend's source ranges, in the map of its family.
fn source_range_key<A: Family>(service_id: u32, addr: A, len: u8) -> LpmKey<SourceRangeV1<A>> {
    LpmKey::new(SourceRangeV1::<A>::SERVICE_BITS + len as u32, SourceRangeV1::new(service_id, addr))
}

/// Slots mapped at a time for writing tables: 4 MiB of the array.
const SLOT_REGION: u32 = 1 << 19;

/// A counter array's entries in id order.
fn all_counters(map: &Array<MapData, TrafficCountersV1>, name: &str) -> Result<Vec<TrafficCountersV1>> {
    let entries: Vec<(u32, TrafficCountersV1)> = batch::lookup_all(map.map()).with_context(|| format!("reading {name}"))?;
    Ok(entries.into_iter().map(|(_, c)| c).collect())
}
