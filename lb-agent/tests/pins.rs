//! Pinned maps across agent generations: adopted as they are, or set aside loudly when their
//! layout is not this build's.
use anyhow::Result;
use lb_agent::dataplane::{
    load::{self, MapSizes},
    maps::Maps,
};
use testbed::{bpffs::BpfMount, netns::sh};
use lb_common::*;

#[test]
fn a_reload_adopts_pinned_conntrack_with_its_entries() -> Result<()> {
    let mount = BpfMount::new("pins")?;
    let key = Ct4KeyV1 { src_addr: ip4_raw([192, 0, 2, 1]), dst_addr: ip4_raw([10, 96, 0, 1]), src_port: port_raw(40000), dst_port: port_raw(80), proto: IPPROTO_TCP, _pad: [0; 3] };
    let entry = Ct4EntryV1 { backend_id: 7, service_id: 3, ..Default::default() };
    {
        let mut ebpf = load::load(&mount.dir, &MapSizes::default())?;
        let mut maps = Maps::take(&mut ebpf)?;
        maps.conntrack.insert(&key, &entry, 0)?;
    } // the agent is gone; the pins stay
    let mut ebpf = load::load(&mount.dir, &MapSizes::default())?;
    let maps = Maps::take(&mut ebpf)?;
    assert_eq!(maps.conntrack.get(&key, 0)?, entry);
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
