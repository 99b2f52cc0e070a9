//! Typed handles on the maps of schema v1, from a freshly loaded object or from their pins.
use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use lb_common::*;

use super::{batch, slots::SlotWindow};

pub struct Maps {
    pub services: HashMap<MapData, Service4KeyV1, ServiceV1>,
    pub backends: Array<MapData, Backend4V1>,
    pub maglev: Array<MapData, u32>,
    pub conntrack: HashMap<MapData, Ct4KeyV1, Ct4EntryV1>,
    pub reverse_nat: HashMap<MapData, Ct4KeyV1, RevNat4V1>,
    pub service_stats: PerCpuArray<MapData, TrafficCountersV1>,
    pub backend_stats: PerCpuArray<MapData, TrafficCountersV1>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, ConfigV1>,
    pub node_ips: HashMap<MapData, u32, u32>,
    pub service_names: Array<MapData, NameV1>,
    pub service_opts: Array<MapData, ServiceOptsV1>,
    pub affinity: HashMap<MapData, AffinityKeyV1, AffinityV1>,
    pub affinity_match: HashMap<MapData, AffinityMatchKeyV1, u8>,
    pub source_ranges: LpmTrie<MapData, SourceRange4V1, u8>,
    pub sock_config: Array<MapData, SockConfigV1>,
    pub sock_revnat: HashMap<MapData, SockRevNat4KeyV1, SockRevNat4V1>,
    pub sock_skip: HashMap<MapData, u64, u8>,
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
        let conntrack = open(MAP_CONNTRACK)?;
        let flow_capacity = match &conntrack {
            Map::HashMap(data) => data.info()?.max_entries(),
            _ => 0,
        };
        Ok(Self {
            slot_region: None,
            flow_capacity,
            services: typed!(MAP_SERVICES),
            backends: typed!(MAP_BACKENDS),
            maglev: typed!(MAP_MAGLEV),
            conntrack: conntrack.try_into().with_context(|| format!("map {MAP_CONNTRACK} has an unexpected type or layout"))?,
            reverse_nat: typed!(MAP_REVERSE_NAT),
            service_stats: typed!(MAP_SERVICE_STATS),
            backend_stats: typed!(MAP_BACKEND_STATS),
            reasons: typed!(MAP_REASONS),
            config: typed!(MAP_CONFIG),
            node_ips: typed!(MAP_NODE_IPS),
            service_names: typed!(MAP_SERVICE_NAMES),
            service_opts: typed!(MAP_SERVICE_OPTS),
            affinity: typed!(MAP_AFFINITY),
            affinity_match: typed!(MAP_AFFINITY_MATCH),
            source_ranges: typed!(MAP_SOURCE_RANGES),
            sock_config: typed!(MAP_SOCK_CONFIG),
            sock_revnat: typed!(MAP_SOCK_REVNAT),
            sock_skip: typed!(MAP_SOCK_SKIP),
        })
    }

    /// Per-reason packet counts, summed over CPUs.
    pub fn reason_counts(&self) -> Result<Vec<u64>> {
        (0..reason::COUNT).map(|r| Ok(self.reasons.get(&r, 0)?.iter().sum())).collect()
    }

    pub fn service_counters(&self, service_id: u32) -> Result<TrafficCountersV1> {
        sum_counters(&self.service_stats.get(&service_id, 0)?)
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<TrafficCountersV1> {
        sum_counters(&self.backend_stats.get(&backend_id, 0)?)
    }

    /// Every service id's counters, summed over CPUs, indexed by id (a few batched calls).
    pub fn all_service_counters(&self) -> Result<Vec<TrafficCountersV1>> {
        batch::per_cpu(self.service_stats.map(), add_counters).with_context(|| format!("reading {MAP_SERVICE_STATS}"))
    }

    /// Every backend id's counters, summed over CPUs, indexed by id.
    pub fn all_backend_counters(&self) -> Result<Vec<TrafficCountersV1>> {
        batch::per_cpu(self.backend_stats.map(), add_counters).with_context(|| format!("reading {MAP_BACKEND_STATS}"))
    }

    /// Zeroes the counters of every service id from `services` on and every backend id from
    /// `backends` on, in two calls: ids past those are then handed out without a write each.
    pub fn zero_counters_from(&self, services: u32, backends: u32) -> Result<()> {
        let ids = |from: u32, to: u32| (from..to).collect::<Vec<u32>>();
        batch::update_per_cpu(self.service_stats.map(), &ids(services, self.service_stats.len()), TrafficCountersV1::default()).with_context(|| format!("zeroing {MAP_SERVICE_STATS}"))?;
        batch::update_per_cpu(self.backend_stats.map(), &ids(backends, self.backend_stats.len()), TrafficCountersV1::default()).with_context(|| format!("zeroing {MAP_BACKEND_STATS}"))?;
        Ok(())
    }

    /// Writes a Maglev table's slots from `offset` on, through a mapping of the region of the
    /// array around them. The region stays mapped for the next table (a sync writing thousands
    /// of tables maps a few regions, not one per table) until [`Maps::end_slot_writes`].
    pub fn write_slots(&mut self, offset: u32, ids: &[u32]) -> Result<()> {
        if !self.slot_region.as_ref().is_some_and(|r| r.covers(offset, ids.len())) {
            self.slot_region = None;
            let capacity = self.maglev.len();
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

    /// The backend ids in slots `offset..offset + size`. An array pinned by an agent from
    /// before the array was mappable (lbctl next to an older agent) is read slot by slot.
    pub fn read_slots(&self, offset: u32, size: u32) -> Result<Vec<u32>> {
        let context = || format!("reading {size} slots of {MAP_MAGLEV} at {offset}");
        match SlotWindow::map(self.maglev.map(), self.maglev.len(), offset, size as usize) {
            Ok(window) => Ok(window.read()),
            Err(_) if !super::slots::mappable(&self.maglev.map().info()?) => (offset..offset + size).map(|slot| self.maglev.get(&slot, 0).with_context(context)).collect(),
            Err(e) => Err(e).with_context(context),
        }
    }
}

/// Slots mapped at a time for writing tables: 4 MiB of the array.
const SLOT_REGION: u32 = 1 << 19;

fn add_counters(total: &mut TrafficCountersV1, more: &TrafficCountersV1) {
    total.packets += more.packets;
    total.bytes += more.bytes;
}

fn sum_counters(per_cpu: &PerCpuValues<TrafficCountersV1>) -> Result<TrafficCountersV1> {
    let mut total = TrafficCountersV1::default();
    per_cpu.iter().for_each(|c| add_counters(&mut total, c));
    Ok(total)
}

/// Zeroed per-CPU counters, to reset an id before it is reused.
pub fn zero_counters() -> Result<PerCpuValues<TrafficCountersV1>> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?.get() as usize;
    Ok(PerCpuValues::try_from(vec![TrafficCountersV1::default(); cpus])?)
}
