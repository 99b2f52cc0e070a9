//! Conntrack garbage collection: removes flows idle for longer than their state allows
//! (`lb_common::ct_lifetime_ns`, shared with the kernel side), with their reverse-NAT entries.
use anyhow::Result;
use lb_common::*;

use super::maps::Maps;

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

pub fn gc(maps: &mut Maps, now_ns: u64) -> Result<GcStats> {
    let mut stats = GcStats::default();
    let mut live_replies = std::collections::HashSet::new();
    let flows: Vec<(Ct4KeyV1, Ct4EntryV1)> = maps.conntrack.iter().filter_map(|e| e.ok()).collect();
    for (key, entry) in flows {
        let backend = maps.backends.get(&entry.backend_id, 0).unwrap_or_default();
        let reply = reply_key(&key, &entry, &backend);
        let rnat = maps.reverse_nat.get(&reply, 0).ok();
        let reply_flags = rnat.map(|r| r.tcp_flags_seen).unwrap_or(0);
        let last = entry.last_seen_ns.max(rnat.map(|r| r.last_seen_ns).unwrap_or(0));
        let lifetime = ct_lifetime_ns(key.proto, entry.tcp_flags_seen, reply_flags);
        if backend.addr != 0 && now_ns.saturating_sub(last) <= lifetime {
            stats.flows_kept += 1;
            live_replies.insert(reply);
            continue;
        }
        let _ = maps.conntrack.remove(&key);
        if rnat.is_some() {
            let _ = maps.reverse_nat.remove(&reply);
        }
        stats.flows_removed += 1;
    }
    // Reverse-NAT entries whose flow is gone (the agent was down, a flow was re-selected).
    let replies: Vec<(Ct4KeyV1, RevNat4V1)> = maps.reverse_nat.iter().filter_map(|e| e.ok()).collect();
    stats.replies_kept = replies.len();
    for (key, r) in replies.into_iter().filter(|(k, _)| !live_replies.contains(k)) {
        if now_ns.saturating_sub(r.last_seen_ns) > ct_lifetime_ns(key.proto, 0, r.tcp_flags_seen) {
            let _ = maps.reverse_nat.remove(&key);
            stats.orphans_removed += 1;
            stats.replies_kept -= 1;
        }
    }
    Ok(stats)
}
