//! Flow events: a record in the ring buffer for what the agent asked to see (drops only, by
//! default), as long as this CPU's token bucket has credit. Every event is counted as
//! emitted, throttled (no credit) or lost (the ring buffer full).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::*;

use crate::maps::{LB_EVBKT_V1, LB_EVCFG_V1, LB_EVENTS_V1, LB_EVSTAT_V1};

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
    let bucket = unsafe { &mut *bucket };
    let credit = bucket.credit_ns.saturating_add(now.saturating_sub(bucket.last_ns)).min(cfg.burst_ns);
    bucket.last_ns = now;
    if credit < cfg.ns_per_event {
        bucket.credit_ns = credit;
        return false;
    }
    bucket.credit_ns = credit - cfg.ns_per_event;
    true
}

/// The start of an event of `kind` if that kind is on and this CPU has credit: counted as
/// throttled or lost otherwise.
#[inline(always)]
fn event<A: MapAddr>(kind: u8, hook: u8, reason: u32, t: Option<&CtKeyV1<A>>) -> Option<EventV1> {
    let cfg = LB_EVCFG_V1.get(0)?;
    if cfg.kinds & (1 << kind) == 0 {
        return None;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_credit(cfg, now) {
        count(kind, EVENT_THROTTLED);
        return None;
    }
    let family = if core::mem::size_of::<A>() == 4 { 4 } else { 6 };
    let mut event = EventV1 { ts_ns: now, kind, hook, family, reason, ..EventV1::default() };
    if let Some(t) = t {
        event.flags = F_EVENT_TUPLE;
        event.proto = t.proto;
        (event.src_port, event.dst_port) = (t.src_port, t.dst_port);
        (event.src, event.dst) = (EventV1::words_of(&t.src_addr), EventV1::words_of(&t.dst_addr));
    }
    Some(event)
}

#[inline(always)]
fn submit(event: EventV1) {
    match LB_EVENTS_V1.reserve::<EventV1>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(0);
            count(event.kind, EVENT_EMITTED);
        }
        None => count(event.kind, EVENT_LOST),
    }
}

/// A packet dropped (or refused) for `reason` at `hook`: its tuple when it was parsed that far.
#[inline(never)]
pub fn drop_event<A: MapAddr>(t: Option<&CtKeyV1<A>>, reason: u32, hook: u8, ifindex: u32) {
    if let Some(mut event) = event(EVENT_DROP, hook, reason, t) {
        event.ifindex = ifindex;
        submit(event);
    }
}

/// A new flow `t`, translated as its conntrack entry `ct` says (service, backend, SNAT).
#[inline(never)]
pub fn new_flow_event<A: MapAddr>(t: &CtKeyV1<A>, ct: &CtEntryV1<A>, hook: u8, reason: u32) {
    if let Some(mut event) = event(EVENT_NEW_FLOW, hook, reason, Some(t)) {
        (event.service_id, event.backend_id) = (ct.service_id, ct.backend_id);
        if ct.flags & F_CT_SNAT != 0 {
            event.flags |= F_EVENT_SNAT;
            (event.nat, event.nat_port) = (EventV1::words_of(&ct.nat_addr), ct.nat_port);
        }
        submit(event);
    }
}
