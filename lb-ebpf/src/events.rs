//! Flow events: a record in the ring buffer for what the agent asked to see (drops only, by
//! default), as long as this CPU's token bucket has credit. Every event is counted as
//! emitted, throttled (no credit) or lost (the ring buffer full).
use aya_ebpf::maps::ring_buf::RingBufEntry;
use lb_common::*;

use crate::{
    lb::state_clock,
    maps::{LB_EVBKT_V1, LB_EVCFG_V1, LB_EVENTS_V1, LB_EVSTAT_V1},
};

#[inline(always)]
fn count(kind: u8, outcome: u32) {
    if let Some(c) = LB_EVSTAT_V1.get_ptr_mut(EVENT_OUTCOMES * kind as u32 + outcome) {
        unsafe { *c += 1 }
    }
}

/// Takes one event's credit from this CPU's bucket; false when there is none.
#[inline(always)]
fn take_credit(cfg: &EventConfigV1, now: u64) -> bool {
    let Some(bucket) = LB_EVBKT_V1.get_ptr_mut(0) else { return false };
    unsafe { (*bucket).take(cfg, now) }
}

/// An event of `kind` reserved in the ring buffer, zeroed and with its common fields
/// written, if that kind is on and this CPU has credit: counted as throttled or lost
/// otherwise. Written in place: an `EventV1` on the stack would not fit beside the policy
/// check's frames.
#[inline(always)]
fn reserve<A: MapAddr>(kind: u8, hook: u8, reason: u32, t: Option<&CtKeyV1<A>>, ifindex: u32) -> Option<RingBufEntry<EventV1>> {
    let cfg = LB_EVCFG_V1.get(0)?;
    if cfg.kinds & (1 << kind) == 0 {
        return None;
    }
    // The tick-grained clock (as Cilium's monitor, events are ordered by the ring, not by
    // their time): the precise one would cost a new flow's event half again.
    let now = state_clock();
    if !take_credit(cfg, now) {
        count(kind, EVENT_THROTTLED);
        return None;
    }
    let Some(mut entry) = LB_EVENTS_V1.reserve::<EventV1>(0) else {
        count(kind, EVENT_LOST);
        return None;
    };
    let e = entry.as_mut_ptr();
    unsafe {
        core::ptr::write_bytes(e, 0, 1);
        (*e).ts_ns = now;
        (*e).kind = kind;
        (*e).hook = hook;
        (*e).family = if core::mem::size_of::<A>() == 4 { 4 } else { 6 };
        (*e).reason = reason;
        (*e).ifindex = ifindex;
        if let Some(t) = t {
            (*e).flags = F_EVENT_TUPLE;
            (*e).proto = t.proto;
            ((*e).src_port, (*e).dst_port) = (t.src_port, t.dst_port);
            ((*e).src, (*e).dst) = (EventV1::words_of(&t.src_addr), EventV1::words_of(&t.dst_addr));
        }
    }
    Some(entry)
}

#[inline(always)]
fn submit(entry: RingBufEntry<EventV1>, kind: u8) {
    entry.submit(0);
    count(kind, EVENT_EMITTED);
}

/// A packet dropped (or refused) for `reason` at `hook`: its tuple when it was parsed that far.
#[inline(never)]
pub fn drop_event<A: MapAddr>(t: Option<&CtKeyV1<A>>, reason: u32, hook: u8, ifindex: u32) {
    if let Some(entry) = reserve(EVENT_DROP, hook, reason, t, ifindex) {
        submit(entry, EVENT_DROP);
    }
}

/// Whether the agent asked for events of `kind`.
#[inline(always)]
fn wanted(kind: u8) -> bool {
    LB_EVCFG_V1.get(0).is_some_and(|cfg| cfg.kinds & (1 << kind) != 0)
}

/// A new flow `t`, translated as its conntrack entry `ct` says (service, backend, SNAT). The
/// check is inlined: with new-flow events off (the default), a new flow makes no call.
#[inline(always)]
pub fn new_flow_event<A: MapAddr>(t: &CtKeyV1<A>, ct: &CtEntryV1<A>, hook: u8, reason: u32, ifindex: u32) {
    if wanted(EVENT_NEW_FLOW) {
        emit_new_flow_event(t, ct, hook, reason, ifindex);
    }
}

#[inline(never)]
fn emit_new_flow_event<A: MapAddr>(t: &CtKeyV1<A>, ct: &CtEntryV1<A>, hook: u8, reason: u32, ifindex: u32) {
    if let Some(mut entry) = reserve(EVENT_NEW_FLOW, hook, reason, Some(t), ifindex) {
        let e = entry.as_mut_ptr();
        unsafe {
            ((*e).service_id, (*e).backend_id) = (ct.service_id, ct.backend_id);
            if ct.flags & F_CT_SNAT != 0 {
                (*e).flags |= F_EVENT_SNAT;
                ((*e).nat, (*e).nat_port) = (EventV1::words_of(&ct.nat_addr), ct.nat_port);
            }
        }
        submit(entry, EVENT_NEW_FLOW);
    }
}

/// A new flow `t` that policy `policy` allowed into (`POLICY_INGRESS`) or out of an
/// isolated pod; `matched` is how its rule matched (`POLICY_MATCH_*`). Inlined: a frame of
/// its own under the policy check would pass the 512 bytes of stack a program has.
#[inline(always)]
pub fn policy_event<A: MapAddr>(t: &CtKeyV1<A>, direction: u8, policy: u32, matched: u32, ifindex: u32) {
    let hook = if direction == POLICY_INGRESS { HOOK_TC_TO_POD } else { HOOK_TC };
    if let Some(mut entry) = reserve(EVENT_POLICY, hook, matched, Some(t), ifindex) {
        let e = entry.as_mut_ptr();
        unsafe { ((*e).direction, (*e).policy_id) = (direction, policy) };
        submit(entry, EVENT_POLICY);
    }
}
