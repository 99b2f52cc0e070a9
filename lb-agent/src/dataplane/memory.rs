//! What the BPF maps will take in kernel memory, before they are created: the sizes
//! `--max-flows`, `--max-services`, `--max-backends` and `--maglev-slots` ask for, through
//! the kernel's own accounting (what `bpftool map show` reports as `memlock`, and what the
//! pod's memory cgroup is charged). Maps are preallocated, so this is their cost from the
//! first packet on; only the source-range tries and the endpoint maps (one entry per pod)
//! grow with their contents.
use anyhow::{Context, Result};

use super::load::{flag_sized, MapSizes, OBJECT};

/// One map's name and its bytes.
pub type MapMemory = (String, u64);

// The kernel's fixed costs (Linux 6.x, x86_64): a hash map's element header, its bucket, the
// map's own structure; an array's structure.
const HTAB_ELEM_HEADER: u64 = 48;
const HTAB_BUCKET: u64 = 16;
const HTAB_STRUCT: u64 = 848;
const HTAB_LOCKS_PER_CPU: u64 = 32;
const ARRAY_STRUCT: u64 = 312;
const PAGE: u64 = 4096;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Every map of the object with the capacity `sizes` gives it, largest first.
pub fn estimate(sizes: &MapSizes) -> Result<Vec<MapMemory>> {
    let object = aya_obj::Object::parse(OBJECT).context("parsing the BPF object")?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?.get() as u64;
    let sized = flag_sized(sizes);
    let mut maps: Vec<MapMemory> = object
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.')) // .rodata and friends: none here, but never counted
        .map(|(name, map)| {
            let entries = sized.iter().find(|(n, _)| n == name).map_or(map.max_entries(), |(_, c)| *c) as u64;
            let bytes = map_bytes(map.map_type(), map.key_size() as u64, map.value_size() as u64, entries, map.map_flags(), cpus);
            (name.clone(), bytes)
        })
        .collect();
    maps.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(maps)
}

fn map_bytes(map_type: u32, key: u64, value: u64, entries: u64, flags: u32, cpus: u64) -> u64 {
    use aya_obj::generated::bpf_map_type::*;
    let value8 = value.next_multiple_of(8);
    let hash = |elements: u64, per_cpu_values: bool| {
        let elem = HTAB_ELEM_HEADER + key.next_multiple_of(8) + if per_cpu_values { 8 } else { value8 };
        HTAB_STRUCT + HTAB_LOCKS_PER_CPU * cpus + entries.next_power_of_two() * HTAB_BUCKET + elements * elem
    };
    match map_type {
        // Allocated as entries are added (the endpoint maps): its buckets only, and no spare
        // element pointers per CPU.
        t if t == BPF_MAP_TYPE_HASH as u32 && flags & lb_common::BPF_F_NO_PREALLOC != 0 => hash(0, false) - 8 * cpus,
        // A preallocated hash map keeps one spare element per CPU for updates in place.
        t if t == BPF_MAP_TYPE_HASH as u32 => hash(entries + cpus, false),
        t if t == BPF_MAP_TYPE_LRU_HASH as u32 => hash(entries, false) - HTAB_BUCKET,
        t if t == BPF_MAP_TYPE_ARRAY as u32 && flags & BPF_F_MMAPABLE != 0 => PAGE + (entries * value8).next_multiple_of(PAGE),
        t if t == BPF_MAP_TYPE_ARRAY as u32 => ARRAY_STRUCT + entries * value8,
        t if t == BPF_MAP_TYPE_PERCPU_ARRAY as u32 => ARRAY_STRUCT + entries * 8 + entries * value8 * cpus,
        // Its data pages, a pointer to each (mapped twice), and the header pages.
        t if t == BPF_MAP_TYPE_RINGBUF as u32 => entries + 16 * (entries / PAGE) + 12_616,
        // Tries allocate per prefix as they fill: nothing up front.
        _ => 0,
    }
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The start-up line: the total, then the largest maps.
pub fn summary(maps: &[MapMemory]) -> String {
    let total: u64 = maps.iter().map(|(_, b)| b).sum();
    let largest: Vec<String> = maps.iter().take(6).map(|(name, bytes)| format!("{name} {}", mib(*bytes))).collect();
    format!("BPF maps take {total} bytes ({}) of kernel memory, charged to this agent's memory cgroup: {}, ...", mib(total), largest.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::generated::bpf_map_type::*;

    /// Figures `bpftool map show` reported for maps made with `bpftool map create` on
    /// Linux 6.18 with 2 possible CPUs.
    #[test]
    fn matches_the_kernels_accounting_of_each_map_type() {
        let cases = [
            (BPF_MAP_TYPE_HASH, 16, 48, 1024, 0, 132_208),
            (BPF_MAP_TYPE_HASH, 16, 48, 2048, 0, 263_280),
            (BPF_MAP_TYPE_HASH, 40, 64, 1024, 0, 173_248),
            (BPF_MAP_TYPE_LRU_HASH, 16, 16, 1024, 0, 99_200),
            (BPF_MAP_TYPE_LRU_HASH, 16, 16, 2048, 0, 197_504),
            (BPF_MAP_TYPE_ARRAY, 4, 16, 1024, 0, 16_696),
            (BPF_MAP_TYPE_ARRAY, 4, 4, 4096, BPF_F_MMAPABLE, 36_864),
            (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 64, 0, 1_848),
            (BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 20, 0, 1_065_288),
            (BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 16, 0, 78_408),
        ];
        for (t, key, value, entries, flags, bytes) in cases {
            assert_eq!(map_bytes(t as u32, key, value, entries, flags, 2), bytes, "type {t:?} key {key} value {value} entries {entries}");
        }
    }
}
