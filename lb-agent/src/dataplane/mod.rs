//! Programs the maps from a desired set of frontends, without ever exposing a half-built
//! state: new backends are written first, a service's new Maglev table is built in a fresh
//! slice beside the old one, the service entry is flipped in one write, and only then is what
//! became unused freed. Deletion runs in reverse.
//!
//! - [`backends`]: backend ids and who uses them;
//! - [`batch`]: many map entries in one system call;
//! - [`load`]: the embedded kernel object, loaded with every map pinned;
//! - [`maps`]: typed handles on those maps;
//! - [`slices`]: free ranges of the shared Maglev slot array;
//! - [`tables`]: the Maglev tables in it, one per Service port and backend set, shared by
//!   that port's frontends;
//! - [`id_index`]: ids indexed by a key another structure holds (backends, tables);
//! - [`conntrack`]: expiring flows the kernel tracks;
//! - [`sockets`]: ending node sockets left on a removed backend.
mod backends;
pub mod batch;
pub mod bitmap;
pub mod clock;
pub mod conntrack;
pub mod endpoints;
mod id_index;
pub mod load;
pub mod maps;
pub mod memory;
pub mod next_hops;
pub mod policy;
mod slices;
mod slots;
pub mod sockets;
mod tables;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use anyhow::{bail, Context, Result};
use lb_common::*;
use maglev::Maglev;

use self::{
    backends::BackendIds,
    maps::{Family, Maps},
    tables::{TableKey, Tables},
};

/// Ends the name of a frontend's `SCOPE_LOCAL` view (externalTrafficPolicy: Local).
pub const LOCAL_VIEW_SUFFIX: &str = " [local]";

/// A frontend of either family: address (unspecified for a NodePort, which answers on every
/// node address of its family), port (raw, wire order), protocol and scope (`SCOPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

impl Default for FrontendKey {
    fn default() -> Self {
        Self { addr: Ipv4Addr::UNSPECIFIED.into(), port: 0, proto: 0, scope: SCOPE_CLUSTER }
    }
}

impl FrontendKey {
    /// The map key in family `A`'s frontend map, when the frontend is of that family.
    pub fn entry<A: Family>(&self) -> Option<ServiceKeyV1<A>> {
        A::from_ip(self.addr).map(|addr| ServiceKeyV1 { addr, port: self.port, proto: self.proto, scope: self.scope })
    }

    pub fn of<A: Family>(key: &ServiceKeyV1<A>) -> Self {
        Self { addr: key.addr.to_ip(), port: key.port, proto: key.proto, scope: key.scope }
    }

    /// A NodePort: it answers on every node address of its family.
    pub fn is_node_port(&self) -> bool {
        self.addr.is_unspecified()
    }

    /// This frontend with `entry`, as `LB_SVC_BYID_V1` holds it.
    pub fn by_id(&self, entry: &ServiceV1) -> ServiceByIdV1 {
        let (addr, family) = match self.addr {
            IpAddr::V4(a) => ([ip4_raw(a.octets()), 0, 0, 0], 4),
            IpAddr::V6(a) => (ip6_raw(a.octets()), 6),
        };
        ServiceByIdV1 { addr, port: self.port, proto: self.proto, family, entry: *entry }
    }
}

/// `10.96.0.10:80`, `[fd00::10]:80`; a NodePort `*:30080` or `[*]:30080`.
impl std::fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let port = port_host(self.port);
        match self.addr {
            IpAddr::V4(_) if self.is_node_port() => write!(f, "*:{port}"),
            IpAddr::V6(_) if self.is_node_port() => write!(f, "[*]:{port}"),
            addr => write!(f, "{}", std::net::SocketAddr::new(addr, port)),
        }
    }
}

impl From<Service4KeyV1> for FrontendKey {
    fn from(key: Service4KeyV1) -> Self {
        Self::of(&key)
    }
}

impl From<Service6KeyV1> for FrontendKey {
    fn from(key: Service6KeyV1) -> Self {
        Self::of(&key)
    }
}

/// A backend entry of either family, as `LB4_BE_V1` or `LB6_BE_V1` holds it (one id space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendEntry {
    V4(Backend4V1),
    V6(Backend6V1),
}

impl Default for BackendEntry {
    fn default() -> Self {
        Self::V4(Backend4V1::default())
    }
}

impl BackendEntry {
    pub fn addr(&self) -> IpAddr {
        match self {
            Self::V4(b) => b.addr.to_ip(),
            Self::V6(b) => b.addr.to_ip(),
        }
    }

    /// The port, host order.
    pub fn port(&self) -> u16 {
        port_host(match self {
            Self::V4(b) => b.port,
            Self::V6(b) => b.port,
        })
    }

    /// The zeroed entry of the same family: what a freed id holds.
    pub fn cleared(entry: Self) -> Self {
        match entry {
            Self::V4(_) => Self::V4(Backend4V1::default()),
            Self::V6(_) => Self::V6(Backend6V1::default()),
        }
    }

    /// The entry as family `A`'s backend array holds it, when it is of that family.
    pub fn of_family<A: Family>(&self) -> Option<BackendV1<A>> {
        let (addr, port, flags) = match self {
            Self::V4(b) => (b.addr.to_ip(), b.port, b.flags),
            Self::V6(b) => (b.addr.to_ip(), b.port, b.flags),
        };
        A::from_ip(addr).map(|addr| BackendV1 { addr, port, flags, _pad: 0 })
    }
}

/// One frontend as the control plane wants it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    /// `KIND_*`.
    pub kind: u8,
    /// `namespace/name:port/PROTO`, for lbctl and metrics (shared by the frontends of a port).
    pub name: Arc<str>,
    /// Endpoints new flows may go to (ready ones, else serving terminating ones); empty means
    /// new flows are rejected (dropped, in the `SCOPE_LOCAL` view). Shared by the frontends of
    /// a port that see the same endpoints.
    pub backends: Backends,
    /// Endpoints that take no new flows but keep the ones they have (terminating, not ready).
    pub draining: Backends,
    /// externalTrafficPolicy: Local; outside clients use this frontend's `SCOPE_LOCAL` entry.
    pub ext_local: bool,
    /// sessionAffinity: ClientIP, with its timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// loadBalancerSourceRanges, as (network, prefix length), of both families: `None` lets
    /// every client in, `Some` only clients inside one of its ranges of the frontend's family
    /// (none, when it has none of that family).
    pub source_ranges: Option<Vec<(IpAddr, u8)>>,
}

impl Frontend {
    /// `F_SVC_*` for the map entry.
    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.ext_local {
            flags |= F_SVC_EXT_LOCAL;
        }
        if self.affinity_timeout_s.is_some() {
            flags |= F_SVC_AFFINITY;
        }
        if self.source_ranges.is_some() {
            flags |= F_SVC_SOURCE_RANGES;
        }
        flags
    }
}

/// A list of endpoints, shared (`Arc`) by the frontends and tables that use it.
pub type Backends = Arc<[BackendSpec]>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub local: bool,
    pub weight: u32,
}

impl BackendSpec {
    fn entry(&self) -> BackendEntry {
        let (port, flags) = (port_raw(self.port), if self.local { F_BACKEND_LOCAL } else { 0 });
        match self.addr {
            IpAddr::V4(addr) => BackendEntry::V4(BackendV1 { addr: ip4_raw(addr.octets()), port, flags, _pad: 0 }),
            IpAddr::V6(addr) => BackendEntry::V6(BackendV1 { addr: ip6_raw(addr.octets()), port, flags, _pad: 0 }),
        }
    }
}

/// A frontend as it is in the maps.
#[derive(Clone, Debug)]
struct Programmed {
    /// Shared with the claims that asked for it: one copy per frontend in the agent.
    frontend: Arc<Frontend>,
    entry: ServiceV1,
    /// Every backend id this frontend holds (selectable and draining).
    backend_ids: Box<[u32]>,
    /// Boxed apart, and only when there is any: most frontends have none.
    policy: Option<Box<ProgrammedPolicy>>,
}

/// A frontend's entries in the policy maps.
#[derive(Clone, Debug)]
struct ProgrammedPolicy {
    /// Backends it lets affinity use (`LB_AFF_MATCH_V1`).
    affinity_ids: Box<[u32]>,
    /// Its entries in its family's source-range map.
    source_ranges: Box<[(IpAddr, u8)]>,
}

impl Programmed {
    fn new(frontend: Arc<Frontend>, entry: ServiceV1, backend_ids: Vec<u32>, affinity_ids: Vec<u32>, source_ranges: Vec<(IpAddr, u8)>) -> Self {
        let policy = (!affinity_ids.is_empty() || !source_ranges.is_empty()).then(|| Box::new(ProgrammedPolicy { affinity_ids: affinity_ids.into(), source_ranges: source_ranges.into() }));
        Self { frontend, entry, backend_ids: backend_ids.into(), policy }
    }

    fn affinity_ids(&self) -> &[u32] {
        self.policy.as_ref().map_or(&[], |p| &p.affinity_ids)
    }

    fn source_ranges(&self) -> &[(IpAddr, u8)] {
        self.policy.as_ref().map_or(&[], |p| &p.source_ranges)
    }
}

/// What one `apply` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Frontends that could not be written (a full map, say), with why. They keep their
    /// previous state; every other frontend is applied.
    pub failed: Vec<(String, String)>,
}

pub struct Dataplane {
    pub maps: Maps,
    maglev_seed: u64,
    min_table_size: u32,
    tables: Tables,
    /// Boxed: a table of 130k frontends has 256k buckets, half of them empty.
    services: HashMap<FrontendKey, Box<Programmed>>,
    backend_ids: BackendIds,
    free_backend_ids: Vec<u32>,
    next_backend_id: u32,
    free_service_ids: Vec<u32>,
    next_service_id: u32,
    /// Whether counters of ids never handed out (from the next ids on) are known to be zero:
    /// then a fresh id needs no zeroing write, only a reused one.
    fresh_ids_zeroed: bool,
}

/// Maglev slots a backend gets at least (tables are primes from `maglev::TABLE_SIZES`).
const SLOTS_PER_BACKEND: usize = 50;

/// An id from the free list (reused: true), else the next never handed out below `capacity`.
fn take_id(free: &mut Vec<u32>, next: &mut u32, capacity: u32) -> Option<(u32, bool)> {
    if let Some(id) = free.pop() {
        return Some((id, true));
    }
    (*next < capacity).then(|| {
        *next += 1;
        (*next - 1, false)
    })
}

/// Makes a small hash map hold exactly `wanted`: the entries are written, then the others removed.
fn hold_exactly<K, V>(map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>, wanted: HashMap<K, V>) -> Result<()>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    for (key, value) in &wanted {
        map.insert(key, value, 0)?;
    }
    let stale: Vec<K> = map.keys().filter_map(|k| k.ok()).filter(|k| !wanted.contains_key(k)).collect();
    for key in stale {
        map.remove(&key)?;
    }
    Ok(())
}


impl Dataplane {
    /// `min_table_size` is the smallest Maglev table a service gets (a prime from
    /// `maglev::TABLE_SIZES`); services with many backends get the first size above 100 N.
    pub fn new(maps: Maps, maglev_seed: u64, min_table_size: u32) -> Result<Self> {
        Maglev::new(min_table_size, maglev_seed)?;
        let slots = maps.maglev_slots();
        Ok(Self {
            maps,
            maglev_seed,
            min_table_size,
            tables: Tables::new(slots),
            services: HashMap::new(),
            backend_ids: BackendIds::default(),
            free_backend_ids: Vec::new(),
            next_backend_id: 1,
            free_service_ids: Vec::new(),
            next_service_id: 0,
            fresh_ids_zeroed: false,
        })
    }

    /// Takes over what an earlier agent left in pinned maps, without changing a byte: its
    /// slices, ids and backends become ours, so the next `apply` replaces them the safe way
    /// (new slice, flip, free) and removes what is stale. Returns the frontends adopted.
    /// `counters_pinned`: the counter maps were an earlier agent's (not created by this load).
    pub fn adopt(&mut self, counters_pinned: bool) -> Result<usize> {
        let mut entries = self.maps.frontends::<Addr4>()?;
        entries.extend(self.maps.frontends::<Addr6>()?);
        let mut affinity_ids: HashMap<u32, Vec<u32>> = HashMap::new();
        for key in self.maps.affinity_match.keys() {
            let key = key.context("reading LB_AFF_MATCH_V1")?;
            affinity_ids.entry(key.service_id).or_default().push(key.backend_id);
        }
        let mut ranges: HashMap<u32, Vec<(IpAddr, u8)>> = HashMap::new();
        self.maps.source_ranges_into::<Addr4>(&mut ranges)?;
        self.maps.source_ranges_into::<Addr6>(&mut ranges)?;
        let mut max_service_id = None;
        for (key, entry) in &entries {
            let mut entry = *entry;
            if entry.maglev_offset as u64 + entry.maglev_size as u64 > self.maps.maglev_slots() as u64 {
                // The slot array shrank under it: the next apply writes its table afresh.
                log::warn!("pinned frontend {key} has slots {}+{} past the end of {MAP_MAGLEV}; it is rewritten", entry.maglev_offset, entry.maglev_size);
                entry.maglev_size = 0;
            }
            let entry = &entry;
            if entry.maglev_size > 0 && !self.tables.adopt(entry.maglev_offset, entry.maglev_size) {
                bail!("pinned service {key:?} claims slots {}+{} that overlap another service", entry.maglev_offset, entry.maglev_size);
            }
            let mut ids: Vec<u32> = Vec::new();
            for id in self.maps.read_slots(entry.maglev_offset, entry.maglev_size)? {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            // Draining backends are in no slot; they are found again by the next apply.
            for id in &ids {
                let backend = self.maps.backend(&key.addr, *id)?;
                if self.backend_ids.get(&backend).is_none() {
                    self.maps.count_local_backend(&backend, true)?;
                }
                self.backend_ids.acquire(*id, backend);
                self.next_backend_id = self.next_backend_id.max(id + 1);
            }
            let name = self.maps.service_names.get(&entry.service_id, 0).map(|n| n.as_str().to_string()).unwrap_or_default();
            max_service_id = max_service_id.max(Some(entry.service_id));
            let frontend = Arc::new(Frontend { key: *key, kind: entry.kind, name: name.into(), ..Frontend::default() });
            let programmed = Programmed::new(frontend, *entry, ids, affinity_ids.remove(&entry.service_id).unwrap_or_default(), ranges.remove(&entry.service_id).unwrap_or_default());
            self.services.insert(*key, Box::new(programmed));
            if !key.is_node_port() {
                self.maps.count_frontend(key, true)?;
            }
        }
        self.next_service_id = max_service_id.map_or(0, |m| m + 1);
        let used: std::collections::HashSet<u32> = entries.iter().map(|(_, e)| e.service_id).collect();
        self.free_service_ids = (0..self.next_service_id).filter(|id| !used.contains(id)).collect();
        self.free_backend_ids = (1..self.next_backend_id).filter(|id| self.backend_ids.entry(*id).is_none()).collect();
        // An earlier agent may have used ids past the ones adopted: their counters go now, at
        // once (maps created by this load are zero already).
        if counters_pinned {
            self.maps.zero_counters_from(self.next_service_id, self.next_backend_id)?;
        }
        self.fresh_ids_zeroed = true;
        Ok(entries.len())
    }

    /// Ends this namespace's connected UDP sockets that the socket hooks sent from a frontend
    /// to a backend it no longer has (`removed`: frontend, backend address, port). Returns how many.
    pub fn end_udp_sockets_to(&self, removed: &[(FrontendKey, IpAddr, u16)]) -> Result<usize> {
        let backends: Vec<(IpAddr, u16)> = removed.iter().map(|(_, addr, port)| (*addr, *port)).collect();
        sockets::destroy_udp_sockets_to(&backends, |cookie, (addr, port)| match addr {
            IpAddr::V4(_) => self.sent_to_removed::<Addr4>(removed, cookie, addr, port),
            IpAddr::V6(_) => self.sent_to_removed::<Addr6>(removed, cookie, addr, port),
        })
    }

    /// Whether the socket `cookie`, connected to `addr`:`port`, was sent there from one of the
    /// frontends in `removed` that lost that backend.
    fn sent_to_removed<A: Family>(&self, removed: &[(FrontendKey, IpAddr, u16)], cookie: u64, addr: IpAddr, port: u16) -> bool {
        let Some(backend_addr) = A::from_ip(addr) else { return false };
        let key = SockRevNatKeyV1::<A> { cookie, backend_addr, backend_port: port_raw(port), proto: IPPROTO_UDP, ..Default::default() };
        let Ok(asked) = A::of(&self.maps).sock_revnat.get(&key, 0) else { return false };
        // A NodePort frontend (the unspecified address) was asked for at one of the node's addresses.
        removed.iter().any(|(f, a, p)| (*a, *p) == (addr, port) && f.port == asked.frontend_port && (f.is_node_port() || f.addr == asked.frontend_addr.to_ip()))
    }

    /// Makes the socket hooks skip exactly the cgroups in `ids`.
    pub fn set_sock_skip(&mut self, ids: &std::collections::BTreeSet<u64>) -> Result<()> {
        hold_exactly(&mut self.maps.sock_skip, ids.iter().map(|id| (*id, 1)).collect()).with_context(|| format!("writing {MAP_SOCK_SKIP}"))
    }

    /// Tells the socket hooks which network namespace is the node's.
    pub fn set_sock_config(&mut self, config: SockConfigV1) -> Result<()> {
        self.maps.sock_config.set(0, &config, 0).with_context(|| format!("writing {MAP_SOCK_CONFIG}"))
    }

    pub fn set_config(&mut self, config: ConfigV1) -> Result<()> {
        self.maps.config.set(0, &config, 0).context("writing LB_CONFIG_V1")
    }

    /// The source address of IPv6 flows SNATed to remote backends (none: they are dropped).
    pub fn set_snat6(&mut self, addr: Option<Ipv6Addr>) -> Result<()> {
        let config = Config6V1 { snat_addr: addr.map_or([0; 4], |a| ip6_raw(a.octets())) };
        self.maps.config6.set(0, &config, 0).with_context(|| format!("writing {MAP_CONFIG6}"))
    }

    /// Replaces the set of node addresses (of both families) where NodePorts answer.
    pub fn set_node_ips(&mut self, ips: &[(IpAddr, u32)]) -> Result<()> {
        self.set_family_node_ips::<Addr4>(ips)?;
        self.set_family_node_ips::<Addr6>(ips)
    }

    fn set_family_node_ips<A: Family>(&mut self, ips: &[(IpAddr, u32)]) -> Result<()> {
        let wanted = ips.iter().filter_map(|(ip, ifindex)| Some((A::from_ip(*ip)?, *ifindex))).collect();
        hold_exactly(&mut A::of_mut(&mut self.maps).node_ips, wanted).with_context(|| format!("writing {}", A::MAPS[4]))
    }

    /// The table size for a service with `n` backends: at least 50 slots each, so that no
    /// backend's share of new flows is off by more than 2% (Maglev fills slots round-robin).
    pub fn table_size_for(&self, n: usize) -> u32 {
        maglev::TABLE_SIZES
            .iter()
            .copied()
            .filter(|&m| m >= self.min_table_size)
            .find(|&m| m as usize >= SLOTS_PER_BACKEND * n)
            .unwrap_or(*maglev::TABLE_SIZES.last().unwrap())
    }

    /// Makes the maps hold `desired`. Each frontend is either at its old or at its new state,
    /// never between; one that cannot be written (a full map) is reported in `failed` and keeps
    /// its old state, and the others are applied. Stale frontends go first, freeing room.
    pub fn apply(&mut self, desired: &[Frontend]) -> Result<ApplyStats> {
        let shared: Vec<Arc<Frontend>> = desired.iter().cloned().map(Arc::new).collect();
        self.apply_shared(&shared)
    }

    /// [`Dataplane::apply`] of frontends the caller shares.
    pub fn apply_shared(&mut self, desired: &[Arc<Frontend>]) -> Result<ApplyStats> {
        let mut duplicates = Vec::new();
        let mut wanted: BTreeMap<FrontendKey, &Arc<Frontend>> = BTreeMap::new();
        for f in desired {
            if let Some(first) = wanted.get(&f.key) {
                // The control plane resolves claims before this; never let one stop the rest.
                duplicates.push((f.name.to_string(), format!("its frontend is already declared by {}", first.name)));
                continue;
            }
            wanted.insert(f.key, f);
        }
        let stale: Vec<FrontendKey> = self.services.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        let upserts: Vec<Arc<Frontend>> = wanted.into_values().cloned().collect();
        let mut stats = self.apply_changes(&stale, &upserts)?;
        stats.failed.extend(duplicates);
        Ok(stats)
    }

    /// Removes the frontends `removed`, then writes `upserts` (those equal to what is
    /// programmed are left alone): what an incremental sync changed, at a cost that does not
    /// grow with the frontends left untouched.
    pub fn apply_changes(&mut self, removed: &[FrontendKey], upserts: &[Arc<Frontend>]) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        // Cluster-scope entries go before the local-scope entries they point outside clients to.
        let cluster_first = removed.iter().filter(|k| k.scope != SCOPE_LOCAL).chain(removed.iter().filter(|k| k.scope == SCOPE_LOCAL));
        for key in cluster_first {
            if self.services.contains_key(key) {
                self.remove(key)?;
                stats.removed += 1;
            }
        }
        let changed: Vec<&Arc<Frontend>> = upserts.iter().filter(|f| self.services.get(&f.key).is_none_or(|p| p.frontend != **f)).collect();
        stats.unchanged = upserts.len() - changed.len();
        // A full slot array: a table may be rewritten in place only when every frontend using
        // it moves to the same new backends in this apply.
        let mut movers: HashMap<(u32, TableKey), usize> = HashMap::new();
        for frontend in &changed {
            if let Some(table) = self.services.get(&frontend.key).map(|p| p.entry).filter(|e| e.maglev_size > 0) {
                *movers.entry((table.maglev_offset, TableKey::of(frontend))).or_default() += 1;
            }
        }
        // And come after them when written, so a flag never points at a missing entry.
        let local_first = changed.iter().filter(|f| f.key.scope == SCOPE_LOCAL).chain(changed.iter().filter(|f| f.key.scope != SCOPE_LOCAL));
        for frontend in local_first {
            let current = self.services.get(&frontend.key).map(|p| p.entry).filter(|e| e.maglev_size > 0);
            let existed = self.services.contains_key(&frontend.key);
            let rewritable = current.filter(|e| movers.get(&(e.maglev_offset, TableKey::of(frontend))) == Some(&self.tables.users(e.maglev_offset)));
            match self.upsert(frontend, rewritable.map(|e| (e.maglev_offset, e.maglev_size))) {
                Ok(()) if existed => stats.updated += 1,
                Ok(()) => stats.added += 1,
                Err(e) => stats.failed.push((frontend.name.to_string(), format!("{e:#}"))),
            }
        }
        self.maps.end_slot_writes();
        Ok(stats)
    }

    /// Writes one frontend. `rewritable`: its current table, when it may be rewritten in place.
    fn upsert(&mut self, frontend: &Arc<Frontend>, rewritable: Option<(u32, u32)>) -> Result<()> {
        let old = self.services.get(&frontend.key).cloned();
        let service_id = match &old {
            Some(p) => p.entry.service_id,
            None => self.alloc_service_id()?,
        };

        // 1. Backends first, so every id the new table names already resolves; draining ones
        //    too, so the flows they still carry keep their backend.
        let mut selectable = Vec::with_capacity(frontend.backends.len());
        let mut backend_ids = Vec::with_capacity(frontend.backends.len() + frontend.draining.len());
        for b in frontend.backends.iter().chain(frontend.draining.iter()) {
            let id = match self.acquire_backend(b.entry()) {
                Ok(id) => id,
                Err(e) => {
                    self.release_backends(&backend_ids)?;
                    return Err(e.context(format!("service {}", frontend.name)));
                }
            };
            if selectable.len() < frontend.backends.len() {
                selectable.push(id);
            }
            backend_ids.push(id);
        }

        // 2. The new table: the one its Service port already has for these backends, else
        //    one in a slice of its own; the options and ranges the new flags name.
        let (maglev_offset, maglev_size) = if frontend.backends.is_empty() {
            (0, 0)
        } else {
            let key = TableKey::of(frontend);
            match self.tables.share(&key).map(Ok).unwrap_or_else(|| self.write_table(frontend, key, &selectable, rewritable)) {
                Ok(slice) => slice,
                Err(e) => {
                    self.release_backends(&backend_ids)?;
                    return Err(e.context(format!("service {}", frontend.name)));
                }
            }
        };
        let affinity_ids = if frontend.affinity_timeout_s.is_some() { selectable.clone() } else { Vec::new() };
        // Only the ranges of the frontend's own family: its clients are of that family.
        let source_ranges: Vec<(IpAddr, u8)> = frontend.source_ranges.iter().flatten().filter(|(net, _)| net.is_ipv4() == frontend.key.addr.is_ipv4()).copied().collect();
        if let Err(e) = self.write_policy(service_id, frontend, &affinity_ids, &source_ranges) {
            if maglev_size > 0 {
                self.tables.release(maglev_offset);
            }
            self.release_backends(&backend_ids)?;
            return Err(e.context(format!("service {}", frontend.name)));
        }

        // 3. The flip: one write moves every new flow to the new table.
        if old.is_none() {
            self.maps.service_names.set(service_id, &NameV1::new(&frontend.name), 0)?;
        }
        let entry = ServiceV1 {
            service_id,
            maglev_offset,
            maglev_size,
            backend_count: frontend.backends.len().min(u16::MAX as usize) as u16,
            kind: frontend.kind,
            flags: frontend.flags(),
        };
        self.maps.insert_frontend(&frontend.key, &entry, old.is_none()).with_context(|| format!("writing service {}", frontend.name))?;

        // 4. Free what the old state used: its table, its backends, the affinity it allowed to
        //    backends it no longer has (affinity to them ends now), its old ranges.
        if let Some(old) = old {
            if old.entry.maglev_size > 0 {
                self.tables.release(old.entry.maglev_offset);
            }
            self.release_backends(&old.backend_ids)?;
            self.remove_policy(service_id, old.affinity_ids(), old.source_ranges(), &affinity_ids, &source_ranges);
        }
        let programmed = Programmed::new(frontend.clone(), entry, backend_ids, affinity_ids, source_ranges);
        self.services.insert(frontend.key, Box::new(programmed));
        Ok(())
    }

    fn remove(&mut self, key: &FrontendKey) -> Result<()> {
        let Some(old) = self.services.remove(key) else { return Ok(()) };
        self.maps.remove_frontend(key, old.entry.service_id).with_context(|| format!("removing service {}", old.frontend.name))?;
        if old.entry.maglev_size > 0 {
            self.tables.release(old.entry.maglev_offset);
        }
        self.release_backends(&old.backend_ids)?;
        self.remove_policy(old.entry.service_id, old.affinity_ids(), old.source_ranges(), &[], &[]);
        self.free_service_ids.push(old.entry.service_id);
        Ok(())
    }

    /// Writes what the frontend's flags will point at: its affinity timeout and the backends
    /// affinity may use, and its source ranges. Entries already there are rewritten as they are.
    fn write_policy(&mut self, service_id: u32, frontend: &Frontend, affinity_ids: &[u32], source_ranges: &[(IpAddr, u8)]) -> Result<()> {
        if let Some(timeout) = frontend.affinity_timeout_s {
            self.maps.service_opts.set(service_id, &ServiceOptsV1 { affinity_timeout_s: timeout, _pad: 0 }, 0).with_context(|| format!("writing {MAP_SERVICE_OPTS}"))?;
        }
        for &backend_id in affinity_ids {
            self.maps.affinity_match.insert(&AffinityMatchKeyV1 { backend_id, service_id }, &1, 0).with_context(|| format!("writing {MAP_AFFINITY_MATCH}"))?;
        }
        for &(addr, len) in source_ranges {
            self.maps.insert_source_range(service_id, addr, len)?;
        }
        Ok(())
    }

    /// Removes the affinity matches and source ranges in `old_*` that are not in `keep_*`.
    fn remove_policy(&mut self, service_id: u32, old_affinity: &[u32], old_ranges: &[(IpAddr, u8)], keep_affinity: &[u32], keep_ranges: &[(IpAddr, u8)]) {
        for &backend_id in old_affinity.iter().filter(|id| !keep_affinity.contains(id)) {
            let _ = self.maps.affinity_match.remove(&AffinityMatchKeyV1 { backend_id, service_id });
        }
        for &(addr, len) in old_ranges.iter().filter(|r| !keep_ranges.contains(r)) {
            let _ = self.maps.remove_source_range(service_id, addr, len);
        }
    }

    /// Writes the frontend's new table in a fresh slice. When the slot array has no room and
    /// its current table may be rewritten (`rewritable`: every user moves to these backends),
    /// the table is rewritten there in place, at that size, slot by slot: every slot always
    /// names a live backend (the new ones are written, the old ones are released only after),
    /// so an endpoint change of a programmed Service never waits for free space.
    fn write_table(&mut self, frontend: &Frontend, key: TableKey, backend_ids: &[u32], rewritable: Option<(u32, u32)>) -> Result<(u32, u32)> {
        let wanted = self.table_size_for(frontend.backends.len());
        let (offset, size, fresh) = match (self.tables.alloc(key.clone(), wanted), rewritable) {
            (Some(offset), _) => (offset, wanted, true),
            (None, Some((offset, size))) => (offset, size, false),
            (None, None) => bail!("{MAP_MAGLEV} is full: no {wanted} free slots ({} free in all)", self.tables.free_slots()),
        };
        let keys: Vec<String> = frontend.backends.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect();
        let input: Vec<maglev::Backend<'_, u32>> = keys
            .iter()
            .zip(frontend.backends.iter().zip(backend_ids))
            .map(|(k, (b, id))| maglev::Backend { id: *id, key: k.as_bytes(), weight: b.weight })
            .collect();
        let written = Maglev::new(size, self.maglev_seed).map_err(anyhow::Error::from).and_then(|m| Ok(m.build(&input)?)).and_then(|table| self.maps.write_slots(offset, &table));
        match written {
            Err(e) if fresh => {
                self.tables.release(offset);
                Err(e)
            }
            Err(e) => Err(e),
            Ok(()) if fresh => Ok((offset, size)),
            Ok(()) => {
                self.tables.rekey(offset, key);
                log::warn!("{MAP_MAGLEV} is full: the table of {} was rewritten in place ({size} slots)", frontend.name);
                Ok((offset, size))
            }
        }
    }

    fn acquire_backend(&mut self, entry: BackendEntry) -> Result<u32> {
        if let Some(id) = self.backend_ids.get(&entry) {
            self.backend_ids.acquire(id, entry);
            return Ok(id);
        }
        // Both families' arrays have this capacity (ids are one space).
        let capacity = self.maps.v4.backends.len();
        let Some((id, reused)) = take_id(&mut self.free_backend_ids, &mut self.next_backend_id, capacity) else {
            bail!("{MAP_BACKENDS} is full ({} backends)", capacity - 1);
        };
        if reused || !self.fresh_ids_zeroed {
            self.maps.backend_stats.set(id, &TrafficCountersV1::default(), 0)?;
        }
        self.maps.count_local_backend(&entry, true)?;
        self.maps.set_backend(id, &entry).context("writing a backend")?;
        self.backend_ids.acquire(id, entry);
        Ok(id)
    }

    fn release_backends(&mut self, ids: &[u32]) -> Result<()> {
        for id in ids {
            let entry = self.backend_ids.entry(*id);
            if self.backend_ids.release(*id) {
                // A zeroed entry reads as "gone": flows pinned to it re-select (see lb.rs).
                let entry = entry.unwrap_or_default();
                self.maps.set_backend(*id, &BackendEntry::cleared(entry))?;
                self.maps.count_local_backend(&entry, false)?;
                self.free_backend_ids.push(*id);
            }
        }
        Ok(())
    }

    /// A service id whose counters read zero.
    fn alloc_service_id(&mut self) -> Result<u32> {
        let capacity = self.maps.service_names.len();
        let Some((id, reused)) = take_id(&mut self.free_service_ids, &mut self.next_service_id, capacity) else {
            bail!("{MAP_SERVICES} is full ({capacity} frontends)");
        };
        if reused || !self.fresh_ids_zeroed {
            self.maps.service_stats.set(id, &TrafficCountersV1::default(), 0)?;
        }
        Ok(id)
    }

    /// Programmed frontends: key, display name, entry.
    pub fn frontends(&self) -> impl Iterator<Item = (&FrontendKey, &str, &ServiceV1)> {
        self.services.iter().map(|(k, p)| (k, &*p.frontend.name, &p.entry))
    }

    /// Collects expired flows; backends are known from what is programmed, not read back.
    pub fn collect_conntrack(&mut self, now_ns: u64) -> Result<conntrack::GcStats> {
        let [v4, v6] = self.collect_conntrack_by_family(now_ns, None)?;
        Ok(v4 + v6)
    }

    /// The same, with each family's figures (IPv4's, then IPv6's), and the removed
    /// connections added to `closed` when it is given.
    pub fn collect_conntrack_by_family(&mut self, now_ns: u64, mut closed: Option<&mut Vec<crate::events::ClosedFlow>>) -> Result<[conntrack::GcStats; 2]> {
        let ids = &self.backend_ids;
        let v4 = conntrack::gc::<Addr4>(&mut self.maps, now_ns, |id| ids.entry(id).and_then(|e| e.of_family()), closed.as_deref_mut())?;
        let v6 = conntrack::gc::<Addr6>(&mut self.maps, now_ns, |id| ids.entry(id).and_then(|e| e.of_family()), closed)?;
        Ok([v4, v6])
    }

    /// How many frontends are programmed.
    pub fn frontend_count(&self) -> usize {
        self.services.len()
    }

    /// Maglev slots held by programmed services.
    pub fn used_slots(&self) -> u64 {
        self.maps.maglev_slots() as u64 - self.tables.free_slots()
    }

    /// Maglev tables in the slot array (frontends of one Service port share one).
    pub fn table_count(&self) -> usize {
        self.tables.count()
    }

    /// The backend id programmed for `spec`, if any.
    pub fn backend_id(&self, spec: &BackendSpec) -> Option<u32> {
        self.backend_ids.get(&spec.entry())
    }

    /// The service entry programmed for `key`.
    pub fn service(&self, key: &FrontendKey) -> Option<ServiceV1> {
        self.services.get(key).map(|p| p.entry)
    }
}
