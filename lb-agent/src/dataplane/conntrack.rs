//! Conntrack garbage collection: removes flows idle for longer than their state allows
//! (`lb_common::ct_lifetime_ns`, shared with the kernel side), with their reverse-NAT entries.
use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use aya::maps::IterableMap;
use lb_common::*;

use super::{batch, maps::Maps};

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub flows_kept: usize,
    pub flows_removed: usize,
    pub orphans_removed: usize,
    /// Reverse-NAT entries left after the pass.
    pub replies_kept: usize,
}

/// The reply key a conntrack entry's flow created in the reverse-NAT map.
pub fn reply_key(key: &Ct4KeyV1, entry: &Ct4EntryV1, backend: &Backend4V1) -> Ct4KeyV1 {
    let mut reply = key.reply_from(backend);
    if entry.flags & F_CT_SNAT != 0 {
        reply.dst_addr = entry.nat_addr;
        reply.dst_port = entry.nat_port;
    }
    reply
}

/// One pass over conntrack and reverse NAT, read and pruned in batches (a handful of system
/// calls however many flows there are). `backend` gives a backend id's entry (zeroed: gone).
pub fn gc(maps: &mut Maps, now_ns: u64, backend: impl Fn(u32) -> Backend4V1) -> Result<GcStats> {
    let mut stats = GcStats::default();
    let flows: Vec<(Ct4KeyV1, Ct4EntryV1)> = batch::lookup_all(maps.conntrack.map()).with_context(|| format!("reading {MAP_CONNTRACK}"))?;
    let replies: HashMap<Ct4KeyV1, RevNat4V1> = batch::lookup_all(maps.reverse_nat.map()).with_context(|| format!("reading {MAP_REVERSE_NAT}"))?.into_iter().collect();
    // Reverse-NAT entries that belong to a flow, kept or removed with it.
    let mut owned_replies = HashSet::new();
    let (mut dead_flows, mut dead_replies) = (Vec::new(), Vec::new());
    for (key, entry) in flows {
        let backend = backend(entry.backend_id);
        let reply = reply_key(&key, &entry, &backend);
        let rnat = replies.get(&reply);
        let reply_flags = rnat.map(|r| r.tcp_flags_seen).unwrap_or(0);
        let last = entry.last_seen_ns.max(rnat.map(|r| r.last_seen_ns).unwrap_or(0));
        let lifetime = ct_lifetime_ns(key.proto, entry.tcp_flags_seen, reply_flags);
        owned_replies.insert(reply);
        if backend.addr != 0 && now_ns.saturating_sub(last) <= lifetime {
            stats.flows_kept += 1;
            continue;
        }
        dead_flows.push(key);
        if rnat.is_some() {
            dead_replies.push(reply);
        }
        stats.flows_removed += 1;
    }
    // Reverse-NAT entries whose flow is gone (the agent was down, a flow was re-selected).
    stats.replies_kept = replies.len() - dead_replies.len();
    for (key, r) in replies.iter().filter(|(k, _)| !owned_replies.contains(*k)) {
        if now_ns.saturating_sub(r.last_seen_ns) > ct_lifetime_ns(key.proto, 0, r.tcp_flags_seen) {
            dead_replies.push(*key);
            stats.orphans_removed += 1;
            stats.replies_kept -= 1;
        }
    }
    batch::delete(maps.conntrack.map(), &dead_flows).with_context(|| format!("pruning {MAP_CONNTRACK}"))?;
    batch::delete(maps.reverse_nat.map(), &dead_replies).with_context(|| format!("pruning {MAP_REVERSE_NAT}"))?;
    Ok(stats)
}
