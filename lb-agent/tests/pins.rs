//! Pinned maps across agent generations: adopted as they are, or set aside loudly when their
//! layout is not this build's.
use anyhow::Result;
use lb_agent::dataplane::{
    load::{self, MapSizes},
    maps::Maps,
};
use testbed::{bpffs::BpfMount, netns::sh};
use aya::maps::IterableMap;
use lb_common::*;

#[test]
fn a_reload_adopts_pinned_conntrack_with_its_entries() -> Result<()> {
    let mount = BpfMount::new("pins")?;
    let key = Ct4KeyV1 { src_addr: ip4_raw([192, 0, 2, 1]), dst_addr: ip4_raw([10, 96, 0, 1]), src_port: port_raw(40000), dst_port: port_raw(80), proto: IPPROTO_TCP, _pad: [0; 3] };
    let entry = Ct4EntryV1 { backend_id: 7, service_id: 3, ..Default::default() };
    {
        let mut ebpf = load::load(&mount.dir, &MapSizes::default())?;
        let mut maps = Maps::take(&mut ebpf)?;
        maps.v4.conntrack.insert(&key, &entry, 0)?;
    } // the agent is gone; the pins stay
    let mut ebpf = load::load(&mount.dir, &MapSizes::default())?;
    let maps = Maps::take(&mut ebpf)?;
    assert_eq!(maps.v4.conntrack.get(&key, 0)?, entry);
    assert!(load::set_aside_incompatible_pins(&mount.dir)?.is_empty());
    Ok(())
}

#[test]
fn a_pinned_map_with_another_layout_is_moved_aside_not_reused() -> Result<()> {
    let mount = BpfMount::new("pins")?;
    // What a build with a different Ct4KeyV1 would have left.
    sh(&format!("bpftool map create {}/{MAP_CONNTRACK} type hash key 8 value 8 entries 16 name {MAP_CONNTRACK}", mount.dir.display()))?;
    let mut ebpf = load::load(&mount.dir, &MapSizes::default())?;
    let maps = Maps::take(&mut ebpf)?;
    assert_eq!(maps.flow_capacity, MAX_FLOWS, "a fresh conntrack map of this build's layout");
    let aside: Vec<String> = std::fs::read_dir(&mount.dir)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("LB4_CT_V1_incompatible_")).collect();
    assert_eq!(aside.len(), 1, "the old map is kept, under a new name: {aside:?}");
    Ok(())
}

#[test]
fn a_pinned_map_of_another_type_is_moved_aside() -> Result<()> {
    let mount = BpfMount::new("pins")?;
    // The service counters as agents before 0.1.0's atomic counters pinned them: per-CPU.
    sh(&format!("bpftool map create {}/{MAP_SERVICE_STATS} type percpu_array key 4 value 16 entries {MAX_SERVICES} name {MAP_SERVICE_STATS}", mount.dir.display()))?;
    let mut ebpf = load::load(&mount.dir, &MapSizes::default())?;
    let maps = Maps::take(&mut ebpf)?;
    assert_eq!(maps.service_counters(5)?, TrafficCountersV1::default(), "a fresh array of this build's type");
    let aside = std::fs::read_dir(&mount.dir)?.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("LB_SVC_STAT_V1_incompatible_")).count();
    assert_eq!(aside, 1);
    Ok(())
}

/// --max-ipcache and --max-policy-rules resize the NetworkPolicy maps with their entries: the
/// hash of single addresses and the trie of prefixes, the hash of one-port rules and the trie
/// of ranges.
#[test]
fn policy_capacities_resize_the_pinned_maps_with_their_entries() -> Result<()> {
    use lb_agent::dataplane::policy::{AllowRule, PolicyMaps};
    let mount = BpfMount::new("pins")?;
    let pod: std::net::IpAddr = [10, 244, 1, 5].into();
    let block: std::net::IpAddr = [203, 0, 113, 0].into();
    let one_port = AllowRule { endpoint: 1, direction: POLICY_INGRESS, identity: 300, protocol: IPPROTO_TCP, ports: Some((80, 80)) };
    let range = AllowRule { endpoint: 1, direction: POLICY_INGRESS, identity: 300, protocol: IPPROTO_UDP, ports: Some((1000, 1003)) };
    let read = |capacity: u32| -> Result<(Vec<(std::net::IpAddr, u8, u32)>, usize)> {
        let _ebpf = load::load(&mount.dir, &MapSizes { ipcache: Some(capacity), policy_rules: Some(capacity), ..Default::default() })?;
        for name in [MAP_IPCACHE_HOSTS, MAP_IPCACHE, MAP_POLICY_EXACT, MAP_POLICY] {
            assert_eq!(aya::maps::MapData::from_pin(mount.dir.join(name))?.info()?.max_entries(), capacity, "{name}");
        }
        let (mut ids, _, rules) = PolicyMaps::open_pinned(&mount.dir)?.read_back();
        ids.sort();
        Ok((ids, rules.len()))
    };
    {
        let _ebpf = load::load(&mount.dir, &MapSizes { ipcache: Some(64), policy_rules: Some(64), ..Default::default() })?;
        let mut maps = PolicyMaps::open_pinned(&mount.dir)?;
        maps.set_identity(pod, 32, 300)?;
        maps.set_identity(block, 24, 1 << 24)?;
        maps.allow(&one_port, 4)?;
        maps.allow(&range, 5)?;
    }
    let want = (vec![(pod, 32, 300), (block, 24, 1 << 24)], 1 + range.keys().len());
    assert_eq!(read(64)?, want);
    assert_eq!(read(256)?, want, "grown");
    assert_eq!(read(128)?, want, "shrunk, everything fits");
    Ok(())
}

#[test]
fn other_capacities_resize_the_pinned_maps_and_keep_the_newest_flows() -> Result<()> {
    let mount = BpfMount::new("pins")?;
    let key = |port: u16| Ct4KeyV1 { src_addr: ip4_raw([192, 0, 2, 1]), dst_addr: ip4_raw([10, 96, 0, 1]), src_port: port_raw(port), dst_port: port_raw(80), proto: IPPROTO_TCP, _pad: [0; 3] };
    let entry = |seen: u64| Ct4EntryV1 { backend_id: 7, service_id: 3, last_seen_ns: seen, ..Default::default() };
    // A service whose table is slots 1000-1002: those slots are carried over.
    let svc = ServiceV1 { service_id: 0, maglev_offset: 1000, maglev_size: 3, backend_count: 1, kind: KIND_CLUSTER_IP, flags: 0 };
    let svc_key = Service4KeyV1 { addr: ip4_raw([10, 96, 0, 1]), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER };
    {
        let mut ebpf = load::load(&mount.dir, &MapSizes { flows: Some(64), maglev_slots: Some(1024), services: Some(16), backends: Some(16), ..Default::default() })?;
        let mut maps = Maps::take(&mut ebpf)?;
        for port in 0..10u16 {
            maps.v4.conntrack.insert(&key(40000 + port), &entry(1000 + port as u64), 0)?;
        }
        maps.write_slots(1000, &[42])?;
        maps.v4.services.insert(&svc_key, &svc, 0)?;
        maps.service_names.set(0, &NameV1::new("bench/svc:http/TCP"), 0)?;
        maps.v4.backends.set(7, &Backend4V1 { addr: ip4_raw([10, 244, 1, 7]), port: port_raw(8080), flags: 0, _pad: 0 }, 0)?;
    }
    // Larger: every flow and slot carried over.
    {
        let mut ebpf = load::load(&mount.dir, &MapSizes { flows: Some(4096), maglev_slots: Some(2048), services: Some(64), backends: Some(64), ..Default::default() })?;
        let maps = Maps::take(&mut ebpf)?;
        // --max-services and --max-backends: the frontend, its name and its backend carried over.
        assert_eq!((maps.service_names.len(), maps.v4.backends.len(), maps.backend_stats.len()), (64, 64, 64));
        assert_eq!(maps.v4.services.get(&svc_key, 0)?, svc);
        assert_eq!(maps.service_names.get(&0, 0)?.as_str(), "bench/svc:http/TCP");
        assert_eq!(maps.v4.backends.get(&7, 0)?.addr, ip4_raw([10, 244, 1, 7]));
        assert_eq!(maps.flow_capacity, 4096);
        assert_eq!(maps.v4.conntrack.keys().count(), 10);
        assert_eq!(maps.v4.conntrack.get(&key(40003), 0)?, entry(1003));
        assert_eq!((maps.maglev_slots(), maps.read_slot(1000)?), (2048, 42));
    }
    // Smaller: the most recently used flows stay.
    let mut ebpf = load::load(&mount.dir, &MapSizes { flows: Some(4), maglev_slots: Some(2048), ..Default::default() })?;
    let maps = Maps::take(&mut ebpf)?;
    assert_eq!(maps.flow_capacity, 4);
    let mut kept: Vec<u16> = maps.v4.conntrack.keys().filter_map(|k| k.ok()).map(|k| port_host(k.src_port)).collect();
    kept.sort();
    assert_eq!(kept, [40006, 40007, 40008, 40009]);
    let leftovers: Vec<String> = std::fs::read_dir(&mount.dir)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains("resize")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

#[test]
fn a_v1_slot_array_is_carried_over_into_the_packed_one() -> Result<()> {
    let mount = BpfMount::new("pins")?;
    let sizes = MapSizes { maglev_slots: Some(4096), ..Default::default() };
    let svc = ServiceV1 { service_id: 0, maglev_offset: 1020, maglev_size: 7, backend_count: 2, kind: KIND_CLUSTER_IP, flags: 0 };
    let svc_key = Service4KeyV1 { addr: ip4_raw([10, 96, 0, 1]), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER };
    let table = [3u32, 4, 3, 4, 3, 4, 3];
    {
        let mut ebpf = load::load(&mount.dir, &sizes)?;
        let mut maps = Maps::take(&mut ebpf)?;
        maps.v4.services.insert(&svc_key, &svc, 0)?;
    }
    // What a schema-v1 agent pinned: one slot an element (and, before it was mappable,
    // without BPF_F_MMAPABLE), holding the service's table.
    let path = mount.dir.join(MAP_MAGLEV_V1);
    sh(&format!("bpftool map create {} type array key 4 value 4 entries 4096 name {MAP_MAGLEV_V1}", path.display()))?;
    for (i, id) in table.iter().enumerate() {
        sh(&format!("bpftool map update pinned {} key {} value {}", path.display(), hex_le(1020 + i as u32), hex_le(*id)))?;
    }
    let mut ebpf = load::load(&mount.dir, &sizes)?;
    let mut maps = Maps::take(&mut ebpf)?;
    let info = maps.maglev.map().info()?;
    assert_eq!((info.map_flags() & MAGLEV_MAP_FLAGS, info.max_entries(), info.value_size()), (MAGLEV_MAP_FLAGS, 2048, 8), "4096 slots, two an element, mappable");
    assert_eq!(maps.read_slots(1020, 7)?, table, "the table its service points at was carried over");
    assert!(!path.exists(), "the v1 array's pin is gone");
    // Through the mapping and through the kernel's own lookup, the same slots (two an element).
    maps.write_slots(2000, &[9, 8, 7])?;
    assert_eq!([maps.maglev.get(&1000, 0)?, maps.maglev.get(&1001, 0)?], [[9, 8], [7, 0]]);
    maps.maglev.set(1001, &[7, 6], 0)?;
    assert_eq!(maps.read_slots(2000, 4)?, [9, 8, 7, 6]);
    assert!(maps.read_slots(4094, 3).is_err(), "past the end is an error, not a stray mapping");
    Ok(())
}

/// Version 1 of the frontend filter (by address alone), as an earlier agent pinned it, goes
/// at load; version 2 is marked at once for the frontends the pinned map holds, by address,
/// port and protocol.
#[test]
fn a_v1_frontend_filter_is_retired_and_v2_marks_the_pinned_frontends() -> Result<()> {
    let mount = BpfMount::new("pins")?;
    let sizes = MapSizes { maglev_slots: Some(4096), ..Default::default() };
    let svc = ServiceV1 { service_id: 0, maglev_offset: 0, maglev_size: 0, backend_count: 0, kind: KIND_CLUSTER_IP, flags: 0 };
    let key = Service4KeyV1 { addr: ip4_raw([10, 96, 0, 1]), port: port_raw(443), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER };
    {
        let mut ebpf = load::load(&mount.dir, &sizes)?;
        let mut maps = Maps::take(&mut ebpf)?;
        maps.v4.services.insert(&key, &svc, 0)?;
        let (word, bit) = frontend_filter_bit(&key.addr, key.port, key.proto);
        maps.frontend_filter.as_ref().expect("the filter").set(word, bit, false);
    }
    let path = mount.dir.join(MAP_FRONTEND_FILTER_V1);
    sh(&format!("bpftool map create {} type array key 4 value 8 entries {FRONTEND_FILTER_WORDS} name {MAP_FRONTEND_FILTER_V1}", path.display()))?;
    let mut ebpf = load::load(&mount.dir, &sizes)?;
    let maps = Maps::take(&mut ebpf)?;
    assert!(!path.exists(), "the v1 filter's pin is gone");
    let filter = maps.frontend_filter.as_ref().expect("the filter");
    let (word, bit) = frontend_filter_bit(&key.addr, key.port, key.proto);
    assert_ne!(filter.get(word) & bit, 0, "the pinned frontend is marked by address, port and protocol");
    let (word, bit) = frontend_filter_bit(&key.addr, port_raw(80), IPPROTO_TCP);
    assert_eq!(filter.get(word) & bit, 0, "its address on another port is not");
    Ok(())
}

/// A u32 as bpftool's little-endian hex bytes.
fn hex_le(v: u32) -> String {
    v.to_le_bytes().iter().map(|b| format!("0x{b:02x}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn counters_survive_a_restart_and_ids_handed_out_afterwards_start_at_zero() -> Result<()> {
    use lb_agent::dataplane::{BackendSpec, Dataplane, Frontend};
    let mount = BpfMount::new("pins")?;
    let sizes = MapSizes { services: Some(16), backends: Some(16), maglev_slots: Some(4096), ..Default::default() };
    let frontend = |octet: u8| Frontend {
        key: Service4KeyV1 { addr: ip4_raw([10, 96, 0, octet]), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER }.into(),
        kind: KIND_CLUSTER_IP,
        name: format!("ns/svc-{octet}:http/TCP").into(),
        backends: [BackendSpec { addr: [10, 244, 0, octet].into(), port: 8080, local: true, weight: 1 }].into(),
        ..Default::default()
    };
    let counted = |packets: u64| -> Result<TrafficCountersV1> { Ok(TrafficCountersV1 { packets, bytes: 0 }) };
    {
        let mut ebpf = load::load(&mount.dir, &sizes)?;
        let mut dataplane = Dataplane::new(Maps::take(&mut ebpf)?, 0, 251)?;
        dataplane.adopt(true)?;
        dataplane.apply(&[frontend(1)])?; // service id 0, backend id 1
        // Traffic on it, and stale counts left past it by some earlier generation.
        dataplane.maps.service_stats.set(0, &counted(7)?, 0)?;
        dataplane.maps.service_stats.set(1, &counted(99)?, 0)?;
        dataplane.maps.backend_stats.set(2, &counted(99)?, 0)?;
    }
    let mut ebpf = load::load(&mount.dir, &sizes)?;
    let mut dataplane = Dataplane::new(Maps::take(&mut ebpf)?, 0, 251)?;
    assert_eq!(dataplane.adopt(true)?, 1);
    dataplane.apply(&[frontend(1), frontend(2)])?;
    assert_eq!(dataplane.maps.service_counters(0)?.packets, 7, "the adopted frontend keeps its counts");
    let new_id = dataplane.service(&frontend(2).key).unwrap().service_id;
    let new_backend = dataplane.backend_id(&frontend(2).backends[0]).unwrap();
    assert_eq!((new_id, new_backend), (1, 2), "the next ids, the ones with stale counts");
    assert_eq!((dataplane.maps.service_counters(1)?.packets, dataplane.maps.backend_counters(2)?.packets), (0, 0));
    Ok(())
}
