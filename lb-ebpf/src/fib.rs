//! Route lookups for rewritten packets, shared by both hooks and both families.
use aya_ebpf::bindings::{bpf_fib_lookup, bpf_redir_neigh};
use lb_common::*;

use crate::{family::Family, lb::state_clock, maps::LB_NHGEN_V1, rewrite::Nat};

pub const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
pub const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// FIB lookup parameters for a packet as it now is (after the rewrite): its datagram starts at
/// `l3_off`, goes from `src` to `dst`, and arrived on `ifindex`.
#[inline(always)]
pub fn fib_params<A: Family>(data: usize, data_end: usize, l3_off: usize, proto: u8, src: A, dst: A, ifindex: u32) -> Option<bpf_fib_lookup> {
    let tot_len = A::datagram_len(data, data_end, l3_off)?;
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = A::AF;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = tot_len as u16;
    p.ifindex = ifindex;
    A::set_fib_addrs(&mut p, src, dst);
    Some(p)
}

/// The next hop the FIB named, for `bpf_redirect_neigh` to resolve.
#[inline(always)]
pub fn next_hop<A: Family>(p: &bpf_fib_lookup) -> bpf_redir_neigh {
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = A::AF as u32;
    A::set_next_hop(&mut nh, p);
    nh
}

/// Where the next hop of a packet routed here is cached. `now` is the state clock as the
/// decision read it: a cached answer's age is judged by it, without reading the clock again.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NextHopCache {
    /// Nowhere: the FIB answers each one (ICMP errors, which are rare).
    None,
    /// In this CPU's slot of the backend's id: packets to a backend, of new flows and
    /// established ones alike (an array read, no hash).
    Backend { id: u32, now: u64 },
    /// By route key in the shared LRU: replies, whose destinations are clients.
    RouteKey { now: u64 },
}

/// Routes a translated packet `to` whose `params` are set: the next hop `cache` holds for its
/// source, destination and arriving device, while it is of the current generation, unexpired,
/// and the packet fits its MTU; otherwise the FIB (`lookup`), whose answer is cached. Ports do
/// not enter the lookup, so a new flow to a backend another flow reached takes its next hop
/// without asking again. Returns the FIB's code; on success `params` holds the device to send
/// on and the MACs.
#[inline(always)]
pub fn route<A: Family>(params: &mut bpf_fib_lookup, to: &Nat<A>, cache: NextHopCache, lookup: impl FnOnce(&mut bpf_fib_lookup) -> i64) -> i64 {
    let arrived_on = params.ifindex;
    let cached = match cache {
        NextHopCache::None => false,
        NextHopCache::Backend { id, now } => backend_next_hop(params, to, id, now),
        NextHopCache::RouteKey { now } => route_key_next_hop(params, to, now),
    };
    if cached {
        return BPF_FIB_LKUP_RET_SUCCESS;
    }
    // Read before the lookup: a change during it leaves the answer stale, as it may be.
    let generation = generation();
    let rc = lookup(params);
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        match cache {
            NextHopCache::None => {}
            NextHopCache::Backend { id, now } => remember_backend_next_hop(params, to, arrived_on, generation, id, now),
            NextHopCache::RouteKey { .. } => remember_route_key_next_hop(params, to, arrived_on, generation),
        }
    }
    rc
}

/// Fills `params` from this CPU's next hop towards backend `id`, when it answers this packet's
/// route key and is fresh. Inlined, as is its `remember_`: as BPF functions, LLVM passes them
/// the address words as arguments past the fifth, on a stack the verifier refuses.
#[inline(always)]
fn backend_next_hop<A: Family>(params: &mut bpf_fib_lookup, to: &Nat<A>, id: u32, now: u64) -> bool {
    let Some(slot) = A::backend_next_hops().get(backend_next_hop_slot(id)) else { return false };
    let key = &slot.key;
    key.src == to.src_addr && key.dst == to.dst_addr && key.ifindex == params.ifindex && use_if_fresh(params, &slot.hop, now)
}

/// Fills `params` from the shared cache's next hop for this packet's route key, when fresh.
/// The key is built in the per-CPU scratch space (an IPv6 one does not fit the stack beside
/// the packet path).
#[inline(never)]
fn route_key_next_hop<A: Family>(params: &mut bpf_fib_lookup, to: &Nat<A>, now: u64) -> bool {
    let Some(scratch) = A::scratch().get_ptr_mut(0) else { return false };
    let key = unsafe { &mut (*scratch).route_key };
    (key.src, key.dst, key.ifindex) = (to.src_addr, to.dst_addr, params.ifindex);
    match unsafe { A::next_hops().get(key) } {
        Some(hop) => use_if_fresh(params, hop, now),
        None => false,
    }
}

/// Fills `params` from `hop` when it is of the current generation, unexpired at `now`, and the
/// packet fits its MTU; false otherwise.
#[inline(always)]
fn use_if_fresh(params: &mut bpf_fib_lookup, hop: &NextHopV1, now: u64) -> bool {
    let tot_len = unsafe { params.__bindgen_anon_1.tot_len };
    if hop.generation != generation() || tot_len > hop.mtu || now >= hop.expires_ns {
        return false;
    }
    params.ifindex = hop.ifindex;
    let macs = unsafe { &mut params.__bindgen_anon_6.__bindgen_anon_2 };
    (macs.dmac, macs.smac) = (hop.dmac, hop.smac);
    true
}

/// What the FIB answered in `params`, as of `generation`, to keep for a second from `now`.
#[inline(always)]
fn answer(params: &bpf_fib_lookup, generation: u32, now: u64) -> NextHopV1 {
    let macs = unsafe { params.__bindgen_anon_6.__bindgen_anon_2 };
    NextHopV1 {
        expires_ns: now + NEXT_HOP_TTL_NS,
        ifindex: params.ifindex,
        generation,
        mtu: unsafe { params.__bindgen_anon_1.mtu_result },
        dmac: macs.dmac,
        smac: macs.smac,
        _pad: [0; 2],
    }
}

/// Keeps what the FIB answered for `to` arriving on `arrived_on` in this CPU's slot of
/// backend `id` (plain stores: no other CPU writes it).
#[inline(always)]
fn remember_backend_next_hop<A: Family>(params: &bpf_fib_lookup, to: &Nat<A>, arrived_on: u32, generation: u32, id: u32, now: u64) {
    let Some(slot) = A::backend_next_hops().get_ptr_mut(backend_next_hop_slot(id)) else { return };
    unsafe {
        (*slot).hop = answer(params, generation, now);
        (*slot).key = NextHopKeyV1 { src: to.src_addr, dst: to.dst_addr, ifindex: arrived_on };
    }
}

/// Caches what the FIB answered for `to` arriving on `arrived_on`, as of `generation`, in the
/// shared LRU. It reads the clock itself: `now` would be a BPF call's sixth argument (LLVM
/// passes `to` as its two addresses), and after a FIB lookup one more read costs little.
#[inline(never)]
fn remember_route_key_next_hop<A: Family>(params: &bpf_fib_lookup, to: &Nat<A>, arrived_on: u32, generation: u32) {
    let Some(scratch) = A::scratch().get_ptr_mut(0) else { return };
    let (key, hop) = unsafe { (&mut (*scratch).route_key, &mut (*scratch).route) };
    (key.src, key.dst, key.ifindex) = (to.src_addr, to.dst_addr, arrived_on);
    *hop = answer(params, generation, state_clock());
    match A::next_hops().get_ptr_mut(key) {
        // The same answer (an expired entry looked up again): only its time is extended, a
        // single store, where an insert would take the LRU's locks.
        Some(old) if unsafe { (*old).ifindex == hop.ifindex && (*old).generation == hop.generation && (*old).mtu == hop.mtu && (*old).dmac == hop.dmac && (*old).smac == hop.smac } => unsafe {
            (*old).expires_ns = hop.expires_ns;
        },
        // A new or changed answer replaces the entry whole. Full: the least recently used
        // goes; its flow is looked up again.
        _ => {
            let _ = A::next_hops().insert(key, hop, 0);
        }
    }
}

/// The generation the agent bumps on neighbour, route, address and link changes.
#[inline(always)]
fn generation() -> u32 {
    LB_NHGEN_V1.get(0).copied().unwrap_or(0)
}
