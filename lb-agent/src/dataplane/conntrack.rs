//! Conntrack garbage collection: removes flows idle for longer than their state allows
//! (`lb_common::ct_lifetime_ns`, shared with the kernel side), with their reverse-NAT entries.
use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use aya::maps::IterableMap;
use lb_common::*;

use crate::events::{close_reason, ClosedFlow};

use super::{
    batch,
    maps::{Family, Maps},
};

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

impl std::ops::Add for GcStats {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            flows_kept: self.flows_kept + o.flows_kept,
            flows_removed: self.flows_removed + o.flows_removed,
            orphans_removed: self.orphans_removed + o.orphans_removed,
            replies_kept: self.replies_kept + o.replies_kept,
        }
    }
}

/// The reply key a conntrack entry's flow created in the reverse-NAT map.
pub fn reply_key<A: MapAddr>(key: &CtKeyV1<A>, entry: &CtEntryV1<A>, backend: &BackendV1<A>) -> CtKeyV1<A> {
    let mut reply = key.reply_from(backend);
    if entry.flags & F_CT_SNAT != 0 {
        reply.dst_addr = entry.nat_addr;
        reply.dst_port = entry.nat_port;
    }
    reply
}

/// One pass over family `A`'s conntrack and reverse NAT, read and pruned in batches (a handful
/// of system calls however many flows there are). `backend` gives a backend id's entry (none
/// or zeroed: gone). Each removed connection is added to `closed` when it is given.
pub fn gc<A: Family>(maps: &mut Maps, now_ns: u64, backend: impl Fn(u32) -> Option<BackendV1<A>>, mut closed: Option<&mut Vec<ClosedFlow>>) -> Result<GcStats> {
    let mut stats = GcStats::default();
    let [_, _, ct_name, rnat_name, ..] = A::MAPS;
    let family = A::of(maps);
    let flows: Vec<(CtKeyV1<A>, CtEntryV1<A>)> = batch::lookup_all(family.conntrack.map()).with_context(|| format!("reading {ct_name}"))?;
    let replies: HashMap<CtKeyV1<A>, RevNatV1<A>> = batch::lookup_all(family.reverse_nat.map()).with_context(|| format!("reading {rnat_name}"))?.into_iter().collect();
    // Reverse-NAT entries that belong to a flow, kept or removed with it.
    let mut owned_replies = HashSet::new();
    let (mut dead_flows, mut dead_replies) = (Vec::new(), Vec::new());
    for (key, entry) in flows {
        let backend = backend(entry.backend_id).unwrap_or_default();
        let reply = reply_key(&key, &entry, &backend);
        let rnat = replies.get(&reply);
        let reply_flags = rnat.map(|r| r.tcp_flags_seen).unwrap_or(0);
        let last = entry.last_seen_ns.max(rnat.map(|r| r.last_seen_ns).unwrap_or(0));
        let lifetime = ct_lifetime_ns(key.proto, entry.tcp_flags_seen, reply_flags);
        owned_replies.insert(reply);
        if !backend.addr.is_zero() && now_ns.saturating_sub(last) <= lifetime {
            stats.flows_kept += 1;
            continue;
        }
        dead_flows.push(key);
        if rnat.is_some() {
            dead_replies.push(reply);
        }
        stats.flows_removed += 1;
        if let Some(closed) = closed.as_deref_mut() {
            closed.push(closed_flow(maps, &key, &entry, &backend, reply_flags));
        }
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
    batch::delete(family.conntrack.map(), &dead_flows).with_context(|| format!("pruning {ct_name}"))?;
    batch::delete(family.reverse_nat.map(), &dead_replies).with_context(|| format!("pruning {rnat_name}"))?;
    Ok(stats)
}

/// A removed connection as a close event tells it: the client's tuple, its Service, backend
/// and SNAT source, and why it ended.
fn closed_flow<A: Family>(maps: &Maps, key: &CtKeyV1<A>, entry: &CtEntryV1<A>, backend: &BackendV1<A>, reply_flags: u8) -> ClosedFlow {
    use std::net::SocketAddr;
    let removed = backend.addr.is_zero();
    ClosedFlow {
        src: SocketAddr::new(key.src_addr.to_ip(), port_host(key.src_port)),
        dst: SocketAddr::new(key.dst_addr.to_ip(), port_host(key.dst_port)),
        proto: key.proto,
        service: maps.service_names.get(&entry.service_id, 0).ok().map(|n| n.as_str().to_string()),
        backend: (!removed).then(|| SocketAddr::new(backend.addr.to_ip(), port_host(backend.port))),
        snat: (entry.flags & F_CT_SNAT != 0).then(|| SocketAddr::new(entry.nat_addr.to_ip(), port_host(entry.nat_port))),
        reason: close_reason(removed, entry.tcp_flags_seen | reply_flags),
    }
}
