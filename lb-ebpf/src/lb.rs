//! The load-balancing decision, shared by both hooks: reverse NAT of replies (and of ICMP
//! errors about them), frontend lookup with traffic policy and source ranges, conntrack,
//! session affinity, Maglev backend selection, and SNAT port allocation (remote backends,
//! hairpin). It only reads and writes maps; the hooks apply the returned [`Action`]. Written
//! once for both address families ([`Family`]).
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use lb_common::*;

use crate::{
    events::new_flow_event,
    family::{source_allowed, Family, NewFlow},
    fib::NextHopCache,
    maps::*,
    parse::{IcmpError, Packet},
    rewrite::Nat,
};

/// Where the program runs, which decides whether remote backends are source-NATed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// XDP on an external device: clients outside the cluster. Replies from remote backends
    /// must come back through this node, so their flows are SNATed.
    External,
    /// TC on the host side of a pod's device: the client is a routable pod, never SNATed.
    Pod,
}

/// How a rewritten packet travels on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Hand it to the kernel stack, which routes it.
    Stack,
    /// Route it here: its source is a node address (SNAT, or the reply of a NodePort flow),
    /// which the stack would drop as martian. The next hop where it is cached while fresh
    /// (new flows to a backend share it), else the FIB.
    Fib(NextHopCache),
}

pub enum Action<A: Family> {
    Pass(u32),
    Drop(u32),
    Rewrite { reason: u32, to: Nat<A>, forward: Forward },
    /// No ready backend: answer the client (TCP RST, or ICMP port unreachable for UDP) so
    /// it fails at once.
    Reject,
}

/// How a hook's balancing step ended: a verdict (every XDP and TC verdict fits 16 bits) and
/// its reason, or a reject still to answer (from a stack frame of its own). Eight bytes: a
/// BPF function returns one register.
pub enum Balanced {
    Done(u16, u32),
    Reject,
}

const EEXIST: i32 = -17;

#[inline(always)]
pub fn decide<A: Family>(pkt: &Packet<A>, hook: Hook, bytes: u32) -> Action<A> {
    let t = &pkt.tuple;

    // 1. A reply of a flow we translated. From outside, only a packet to where replies of
    //    remote-backend flows are sent can be one; from a pod, only one from a local backend.
    if may_be_reply(t, hook) {
        if let Some(rnat) = A::reverse_nat().get_ptr_mut(t) {
            let rnat = unsafe { &mut *rnat };
            let now = touch(&mut rnat.last_seen_ns, &mut rnat.tcp_flags_seen, pkt.tcp_flags);
            let forward = if reply_routed(rnat, hook) { Forward::Fib(NextHopCache::RouteKey { now }) } else { Forward::Stack };
            return Action::Rewrite { reason: reason::FWD_REVERSE_NAT, to: reply_nat(rnat), forward };
        }
    }

    // 2. A tracked flow: its frontend is found by the id its conntrack entry holds, while that
    //    id is still this frontend's, without hashing the frontend's key. Only a packet to
    //    where a frontend may be (its destination or NodePort marked) is looked up at all;
    //    step 3 reuses the filter's answer.
    let marked = frontend_marked(&t.dst_addr, t.dst_port, t.proto);
    if !marked && !node_port(t.dst_port) {
        return Action::Pass(reason::PASS_NOT_SERVICE);
    }
    // A SYN opens a flow: looked up (a retransmission's) only after its frontend.
    let opening = pkt.tcp_flags & TCP_SYN != 0;
    let tracked = if opening { None } else { A::conntrack().get_ptr_mut(t) };
    if let Some(ct) = tracked {
        let ct = unsafe { &mut *ct };
        if let Some(by_id) = LB_SVC_BYID_V1.get(ct.service_id).filter(|f| f.matches(&t.dst_addr, t.dst_port, t.proto)) {
            let svc = by_id.entry;
            if let Some(refused) = admit(pkt, &svc) {
                return refused;
            }
            if let Some(action) = forward_tracked(pkt, &svc, ct, bytes) {
                count_traffic(&LB_SVC_STAT_V1, svc.service_id, bytes);
                return action;
            }
        }
    }

    // 3. A frontend: exact address, or a NodePort on any of this node's addresses. Clients
    //    from outside see an externalTrafficPolicy: Local frontend through its local scope.
    let Some((mut key, mut svc)) = lookup_frontend_where(t.dst_addr, t.dst_port, t.proto, marked || t.dst_addr.is_zero()) else {
        return Action::Pass(reason::PASS_NOT_SERVICE);
    };
    if hook == Hook::External && svc.flags & F_SVC_EXT_LOCAL != 0 {
        key.scope = SCOPE_LOCAL;
        svc = match unsafe { A::services().get(&key) } {
            Some(svc) => *svc,
            None => return Action::Drop(reason::DROP_NO_LOCAL_BACKEND),
        };
    }
    if let Some(refused) = admit(pkt, &svc) {
        return refused;
    }
    count_traffic(&LB_SVC_STAT_V1, svc.service_id, bytes);

    // 4. An established flow keeps its backend while that backend exists (here: one whose
    //    frontend's id step 2 did not find current, as under an agent that wrote no ids).
    let tracked = if opening { A::conntrack().get_ptr_mut(t) } else { tracked };
    if let Some(ct) = tracked {
        if let Some(action) = forward_tracked(pkt, &svc, unsafe { &mut *ct }, bytes) {
            return action;
        }
    }

    // 5. A new flow: the client's affinity, else Maglev picks the backend from the flow hash.
    if svc.maglev_size == 0 {
        if key.scope == SCOPE_LOCAL {
            return Action::Drop(reason::DROP_NO_LOCAL_BACKEND);
        }
        return Action::Reject;
    }
    let cfg = config();
    let hash = flow_hash(t, cfg.hash_seed);
    let affinity = A::affinity_key(t.src_addr, svc.service_id);
    let now = state_clock();
    let (backend_id, be) = match pick_backend::<A>(&svc, &affinity, hash, now) {
        Ok(picked) => picked,
        Err(why) => return Action::Drop(why),
    };

    // Source NAT: to the node address for a remote backend of an outside client (its reply
    // must come back here), to the hairpin address for a pod that landed on itself.
    let snat_addr = if hook == Hook::External && be.flags & F_BACKEND_LOCAL == 0 {
        let node = A::snat_addr(&cfg);
        if node.is_zero() {
            return Action::Drop(reason::DROP_NO_SNAT_ADDR);
        }
        Some(node)
    } else if hook == Hook::Pod && be.addr == t.src_addr {
        Some(A::hairpin_addr())
    } else {
        None
    };
    // The entries are built in the per-CPU scratch space: an IPv6 flow's do not fit on the stack.
    let Some(scratch) = A::scratch().get_ptr_mut(0) else {
        return Action::Drop(reason::DROP_CT_FULL);
    };
    let NewFlow { reply, ct, rnat } = unsafe { &mut (*scratch).new_flow };
    *ct = CtEntryV1::<A> { last_seen_ns: now, backend_id, service_id: svc.service_id, tcp_flags_seen: pkt.tcp_flags, ..Default::default() };
    // The reply as it will arrive, and how to turn it back into frontend -> client.
    *reply = t.reply_from(&be);
    *rnat = RevNatV1::<A> {
        last_seen_ns: now,
        src_addr: t.dst_addr,
        dst_addr: t.src_addr,
        src_port: t.dst_port,
        dst_port: t.src_port,
        service_id: svc.service_id,
        flags: if snat_addr.is_some() { F_CT_SNAT } else { 0 },
        ..Default::default()
    };
    if be.flags & F_BACKEND_LOCAL == 0 && snat_addr.is_none() {
        // Its replies come from the network to the client (a pod of this node): the filter
        // must let them through before the first one can arrive.
        mark_reply_destination(&t.src_addr);
    }
    if let Some(snat_addr) = snat_addr {
        // The reverse-NAT map is the port allocator: a port is ours once its entry is in.
        reply.dst_addr = snat_addr;
        let range = (cfg.nat_port_max - cfg.nat_port_min) as u32 + 1;
        let mut allocated = false;
        for i in 0..NAT_PORT_TRIES {
            let port = cfg.nat_port_min + (hash.wrapping_add(i) % range) as u16;
            reply.dst_port = port_raw(port);
            match A::reverse_nat().insert(reply, rnat, BPF_NOEXIST as u64) {
                Ok(()) => {
                    allocated = true;
                    break;
                }
                Err(EEXIST) => continue,
                Err(_) => return Action::Drop(reason::DROP_CT_FULL),
            }
        }
        if !allocated {
            return Action::Drop(reason::DROP_NAT_PORTS_EXHAUSTED);
        }
        ct.flags = F_CT_SNAT;
        ct.nat_addr = snat_addr;
        ct.nat_port = reply.dst_port;
    } else if A::reverse_nat().insert(reply, rnat, 0).is_err() {
        return Action::Drop(reason::DROP_CT_FULL);
    }
    if A::conntrack().insert(t, ct, 0).is_err() {
        // A full table fails only this new flow; established ones keep their entries.
        let _ = A::reverse_nat().remove(reply);
        return Action::Drop(reason::DROP_CT_FULL);
    }
    remember_affinity(&svc, &affinity, backend_id, now);
    count_traffic(&LB_BE_STAT_V1, backend_id, bytes);
    let action = forward_to(t, backend_id, &be, snat_addr.is_some(), ct.nat_addr, ct.nat_port, now);
    if let Action::Rewrite { reason: why, .. } = &action {
        new_flow_event(t, ct, if hook == Hook::External { HOOK_XDP } else { HOOK_TC }, *why, pkt.ifindex);
    }
    action
}

/// Whether the frontend filter marks `addr`, `port` (raw) and `proto` (some frontend may
/// have them). Most of a node's traffic is unmarked, and so is a scan of a frontend's other
/// ports: on no NodePort's port, such a packet costs no lookup.
#[inline(always)]
fn frontend_marked<A: MapAddr>(addr: &A, port: u16, proto: u8) -> bool {
    let (word, bit) = frontend_filter_bit(addr, port, proto);
    LB_FEADDR_V2.get(word).is_some_and(|used| *used & bit != 0)
}

/// Whether the NodePort filter marks `port` (raw; some NodePort uses it).
#[inline(always)]
fn node_port(port: u16) -> bool {
    let (word, bit) = nodeport_bit(port);
    LB_NODEPORT_V1.get(word).is_some_and(|used| *used & bit != 0)
}

/// What refuses a packet to frontend `svc` before its flow is looked at: a first fragment
/// (the later ones could not follow the rewrite), a client outside the source ranges.
#[inline(always)]
fn admit<A: Family>(pkt: &Packet<A>, svc: &ServiceV1) -> Option<Action<A>> {
    if pkt.first_fragment {
        return Some(Action::Drop(reason::DROP_SERVICE_FRAGMENT));
    }
    if svc.flags & F_SVC_SOURCE_RANGES != 0 && !source_allowed(svc.service_id, pkt.tuple.src_addr) {
        return Some(Action::Drop(reason::DROP_SOURCE_RANGE));
    }
    None
}

/// A packet of tracked flow `ct`, of frontend `svc`: to its backend while the entry is this
/// frontend's and the backend exists; `None` sends it on as a new flow.
#[inline(always)]
fn forward_tracked<A: Family>(pkt: &Packet<A>, svc: &ServiceV1, ct: &mut CtEntryV1<A>, bytes: u32) -> Option<Action<A>> {
    if ct.service_id != svc.service_id {
        return None;
    }
    let be = A::backends().get(ct.backend_id).filter(|be| !be.addr.is_zero())?;
    let now = touch(&mut ct.last_seen_ns, &mut ct.tcp_flags_seen, pkt.tcp_flags);
    if svc.flags & F_SVC_AFFINITY != 0 {
        touch_affinity(&A::affinity_key(pkt.tuple.src_addr, svc.service_id), now);
    }
    count_traffic(&LB_BE_STAT_V1, ct.backend_id, bytes);
    Some(forward_to(&pkt.tuple, ct.backend_id, be, ct.flags & F_CT_SNAT != 0, ct.nat_addr, ct.nat_port, now))
}

/// An ICMP error about a flow we translated, travelling back towards its client: the
/// rewrite that makes it about the frontend and addressed to the client, as the flow's
/// replies are. `None` when it is about no flow of ours.
#[inline(always)]
pub fn decide_icmp_error<A: Family>(err: &IcmpError<A>, hook: Hook) -> Option<(Nat<A>, Forward)> {
    // The quoted datagram went client (or SNAT binding) -> backend; its reply is what the
    // reverse-NAT map is keyed by.
    let rnat = unsafe { A::reverse_nat().get(&err.inner.reversed()) }?;
    // Routed by the FIB each time: errors are rare, and their route keys are not the flow's.
    let forward = if reply_routed(rnat, hook) { Forward::Fib(NextHopCache::None) } else { Forward::Stack };
    Some((reply_nat(rnat), forward))
}

/// The clock of conntrack, reverse-NAT, affinity and next-hop timestamps: CLOCK_MONOTONIC at
/// the grain of a scheduler tick (lifetimes are seconds), read once per packet where a
/// timestamp is written or compared. From jiffies, a load and no call, once the agent has
/// calibrated them (`LB_CLOCK_V1`); until then from `bpf_ktime_get_coarse_ns`.
#[inline(always)]
pub fn state_clock() -> u64 {
    match LB_CLOCK_V1.get(0) {
        Some(clock) if clock.tick_ns != 0 => clock.at(unsafe { bpf_jiffies64() }),
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// A packet of a tracked flow: its time and TCP flags recorded, each written only when it
/// changes (an entry every CPU reads stays clean in their caches). Returns the time.
#[inline(always)]
fn touch(last_seen_ns: &mut u64, flags_seen: &mut u8, flags: u8) -> u64 {
    let now = state_clock();
    if *last_seen_ns != now {
        *last_seen_ns = now;
    }
    if *flags_seen | flags != *flags_seen {
        *flags_seen |= flags;
    }
    now
}

/// Whether packet `t` may be a reply of a translated flow. From a pod: when it comes from a
/// local backend. From outside: when it goes to the SNAT address on a NAT port, or to an
/// address the reply filter marks (pods that reached a remote backend without SNAT).
#[inline(always)]
fn may_be_reply<A: Family>(t: &CtKeyV1<A>, hook: Hook) -> bool {
    if hook == Hook::Pod {
        return LB_LOCALBE_V1.get(reply_filter_slot(&t.src_addr)).is_some_and(|marked| *marked != 0);
    }
    let cfg = config();
    let port = u16::from_be(t.dst_port);
    if (cfg.nat_port_min..=cfg.nat_port_max).contains(&port) && t.dst_addr == A::snat_addr(&cfg) {
        return true;
    }
    LB_REPLYDST_V1.get(reply_filter_slot(&t.dst_addr)).is_some_and(|marked| *marked != 0)
}

/// Replies of a new remote-backend flow will come from outside to `addr`.
#[inline(always)]
fn mark_reply_destination<A: MapAddr>(addr: &A) {
    let slot = reply_filter_slot(addr);
    if let Some(marked) = LB_REPLYDST_V1.get_ptr_mut(slot) {
        // A plain store of one byte: no read-modify-write to race with other CPUs.
        if unsafe { *marked } == 0 {
            unsafe { *marked = 1 };
        }
    }
}

/// How a reply leaves: from the frontend, to the client.
#[inline(always)]
fn reply_nat<A: Family>(rnat: &RevNatV1<A>) -> Nat<A> {
    Nat { src_addr: rnat.src_addr, dst_addr: rnat.dst_addr, src_port: rnat.src_port, dst_port: rnat.dst_port }
}

/// Whether a reply must be routed here: with a node or frontend source, the stack would call
/// it martian.
#[inline(always)]
fn reply_routed<A: Family>(rnat: &RevNatV1<A>, hook: Hook) -> bool {
    rnat.flags & F_CT_SNAT != 0 || hook == Hook::Pod
}

/// The frontend for a destination: the exact address, else a NodePort when the address is
/// one of this node's. Shared by the packet hooks and the socket hooks.
#[inline(always)]
pub fn lookup_frontend<A: Family>(addr: A, port: u16, proto: u8) -> Option<(ServiceKeyV1<A>, ServiceV1)> {
    // An exact frontend: only where the filter marks one. The zero address is looked up as
    // it is: a socket bound or connected to it reaches a NodePort's entry.
    lookup_frontend_where(addr, port, proto, addr.is_zero() || frontend_marked(&addr, port, proto))
}

/// [`lookup_frontend`] for a caller that has read the filter already: `exact`, whether to
/// look the destination up as an exact frontend.
#[inline(always)]
fn lookup_frontend_where<A: Family>(addr: A, port: u16, proto: u8, exact: bool) -> Option<(ServiceKeyV1<A>, ServiceV1)> {
    let mut key = ServiceKeyV1 { addr, port, proto, scope: SCOPE_CLUSTER };
    if exact {
        if let Some(svc) = unsafe { A::services().get(&key) } {
            return Some((key, *svc));
        }
    }
    // A NodePort: only on a port some NodePort uses, and only on this node's addresses.
    if !node_port(port) {
        return None;
    }
    unsafe { A::node_ips().get(&addr) }?;
    key.addr = A::default();
    unsafe { A::services().get(&key) }.map(|svc| (key, *svc))
}

/// A new connection's backend: the client's affinity while it lasts, else the Maglev slot that
/// `hash` picks. Shared by the packet hooks (client = address) and the socket hooks (client =
/// network namespace). `Err` is the drop reason.
#[inline(always)]
pub fn pick_backend<A: Family>(svc: &ServiceV1, affinity: &AffinityKeyV1, hash: u32, now: u64) -> Result<(u32, BackendV1<A>), u32> {
    let backend_id = match affinity_backend(svc, affinity, now) {
        Some(id) => id,
        None => {
            let slot = svc.maglev_offset.wrapping_add(hash % svc.maglev_size);
            let pair = LB_MAGLEV_V2.get(slot / MAGLEV_SLOTS_PER_ENTRY as u32);
            match pair.map(|pair| pair[(slot % MAGLEV_SLOTS_PER_ENTRY as u32) as usize]) {
                Some(id) if id != BACKEND_NONE => id,
                _ => return Err(reason::DROP_BACKEND_MISSING),
            }
        }
    };
    match A::backends().get(backend_id) {
        Some(be) if !be.addr.is_zero() => Ok((backend_id, *be)),
        _ => Err(reason::DROP_BACKEND_MISSING),
    }
}

/// The backend this client had on this frontend, while its affinity lasts and the backend is
/// still one of the frontend's.
#[inline(always)]
fn affinity_backend(svc: &ServiceV1, key: &AffinityKeyV1, now: u64) -> Option<u32> {
    if svc.flags & F_SVC_AFFINITY == 0 {
        return None;
    }
    let affinity = unsafe { LB_AFFINITY_V1.get(key) }?;
    let timeout_s = LB_SVC_OPTS_V1.get(svc.service_id)?.affinity_timeout_s as u64;
    if now.saturating_sub(affinity.last_seen_ns) > timeout_s * 1_000_000_000 {
        return None;
    }
    let member = AffinityMatchKeyV1 { backend_id: affinity.backend_id, service_id: svc.service_id };
    unsafe { LB_AFF_MATCH_V1.get(&member) }?;
    Some(affinity.backend_id)
}

/// Records the client's backend for a frontend with affinity.
#[inline(always)]
pub fn remember_affinity(svc: &ServiceV1, key: &AffinityKeyV1, backend_id: u32, now: u64) {
    if svc.flags & F_SVC_AFFINITY != 0 {
        let _ = LB_AFFINITY_V1.insert(key, &AffinityV1 { last_seen_ns: now, backend_id, _pad: 0 }, 0);
    }
}

/// Traffic on an established flow keeps its client's affinity alive.
#[inline(always)]
fn touch_affinity(key: &AffinityKeyV1, now: u64) {
    if let Some(affinity) = LB_AFFINITY_V1.get_ptr_mut(key) {
        if unsafe { (*affinity).last_seen_ns } != now {
            unsafe { (*affinity).last_seen_ns = now };
        }
    }
}

/// A packet of flow `t` to backend `be` (id `backend_id`), SNATed (and routed here) or not;
/// `now` is the state clock this packet's decision read.
#[inline(always)]
fn forward_to<A: Family>(t: &CtKeyV1<A>, backend_id: u32, be: &BackendV1<A>, snat: bool, nat_addr: A, nat_port: u16, now: u64) -> Action<A> {
    let reason = if snat && nat_addr == A::hairpin_addr() {
        reason::FWD_HAIRPIN
    } else if be.flags & F_BACKEND_LOCAL != 0 {
        reason::FWD_LOCAL_BACKEND
    } else {
        reason::FWD_REMOTE_BACKEND
    };
    if snat {
        let to = Nat { src_addr: nat_addr, src_port: nat_port, dst_addr: be.addr, dst_port: be.port };
        return Action::Rewrite { reason, to, forward: Forward::Fib(NextHopCache::Backend { id: backend_id, now }) };
    }
    let to = Nat { src_addr: t.src_addr, src_port: t.src_port, dst_addr: be.addr, dst_port: be.port };
    Action::Rewrite { reason, to, forward: Forward::Stack }
}
