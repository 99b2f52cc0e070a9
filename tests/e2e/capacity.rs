//! Memory sizing: the memory the agent prints at start for the map capacities it was given is
//! what the kernel then charges for its maps (`bpftool map show`), for small and large sizes.
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use serde_json::Value;
use testbed::demo::Demo;

use crate::support::*;

/// Kernel memory of every map of the agent that pinned into `pin_dir`, by map id: its pinned
/// maps, and the unpinned ones its attached programs use.
fn kernel_map_bytes(pin_dir: &Path) -> Result<BTreeMap<u64, (String, u64)>> {
    let mut maps = BTreeMap::new();
    let mut add = |info: &Value| -> Result<()> {
        let id = info["id"].as_u64().context("map id")?;
        maps.insert(id, (info["name"].as_str().unwrap_or_default().to_string(), info["bytes_memlock"].as_u64().context("bytes_memlock")?));
        Ok(())
    };
    for entry in std::fs::read_dir(pin_dir)? {
        let path = entry?.path();
        if path.is_file() && path.file_name().unwrap().to_string_lossy().starts_with("LB") {
            add(&bpftool_json(&["map", "show", "pinned", path.to_str().unwrap()])?)?;
        }
    }
    for entry in std::fs::read_dir(pin_dir.join("links"))? {
        let link = bpftool_json(&["link", "show", "pinned", entry?.path().to_str().unwrap()])?;
        let prog = bpftool_json(&["prog", "show", "id", &link["prog_id"].as_u64().context("prog id")?.to_string()])?;
        for id in prog["map_ids"].as_array().into_iter().flatten() {
            add(&bpftool_json(&["map", "show", "id", &id.as_u64().unwrap().to_string()])?)?;
        }
    }
    Ok(maps)
}

/// The total the agent printed: "BPF maps take N bytes".
fn printed_bytes(log: &str) -> Result<u64> {
    let rest = log.split("BPF maps take ").nth(1).context("no memory line in the log")?;
    Ok(rest.split_whitespace().next().unwrap().parse()?)
}

#[test]
fn printed_map_memory_is_what_the_kernel_charges() -> Result<()> {
    let mut demo = Demo::build("mm")?;
    let small: &[&str] = &["--max-flows", "4096", "--max-services", "1024", "--max-backends", "2048", "--maglev-slots", "65536", "--max-sockets", "1024", "--max-affinity", "1024", "--max-policy-flows", "1024", "--max-ipcache", "1024", "--max-policy-rules", "1024", "--event-ring-kib", "64", "--max-next-hops", "1024"];
    let large: &[&str] = &["--max-flows", "1048576", "--max-services", "131072", "--max-backends", "262144", "--maglev-slots", "33554432", "--max-sockets", "262144", "--max-affinity", "262144", "--max-policy-flows", "262144", "--max-ipcache", "262144", "--max-policy-rules", "262144", "--event-ring-kib", "4096", "--max-next-hops", "65536"];
    let mut totals = Vec::new();
    let pins = demo.cluster.pin_dir()?;
    for sizes in [small, large] {
        // The second agent takes over the first one's pins, resizing its maps.
        let agent = demo.start_agent_on(agent_bin(), &example_manifests(), &pins, sizes)?;
        let printed = printed_bytes(&agent.log_text())?;
        let maps = kernel_map_bytes(&pins)?;
        let charged: u64 = maps.values().map(|(_, b)| b).sum();
        // Within 1%: the source-range tries (a few hundred bytes here) grow with their
        // contents and are not in the estimate.
        let off = printed.abs_diff(charged) as f64 / charged as f64;
        assert!(off < 0.01, "{sizes:?}: printed {printed} bytes, the kernel charges {charged} for {} maps: {maps:?}", maps.len());
        totals.push(charged);
        drop(agent);
    }
    // Maps of fixed size (the reply filter, the L2 and endpoint tables) set a floor.
    assert!(totals[1] > 50 * totals[0], "the flags size the maps: {totals:?}");
    Ok(())
}
