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

/// A packet dropped (or refused) for `reason` at `hook`: its tuple when it was parsed that far.
#[inline(never)]
pub fn drop_event<A: MapAddr>(t: Option<&CtKeyV1<A>>, reason: u32, hook: u8, ifindex: u32) {
    let Some(cfg) = LB_EVCFG_V1.get(0) else { return };
    if cfg.kinds & (1 << EVENT_DROP) == 0 {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_credit(cfg, now) {
        count(EVENT_DROP, EVENT_THROTTLED);
        return;
    }
    let Some(mut entry) = LB_EVENTS_V1.reserve::<EventV1>(0) else {
        count(EVENT_DROP, EVENT_LOST);
        return;
    };
    let family = if core::mem::size_of::<A>() == 4 { 4 } else { 6 };
    let mut event = EventV1 { ts_ns: now, kind: EVENT_DROP, hook, family, reason, ifindex, ..EventV1::default() };
    if let Some(t) = t {
        event.flags = F_EVENT_TUPLE;
        event.proto = t.proto;
        (event.src_port, event.dst_port) = (t.src_port, t.dst_port);
        (event.src, event.dst) = (EventV1::words_of(&t.src_addr), EventV1::words_of(&t.dst_addr));
    }
    entry.write(event);
    entry.submit(0);
    count(EVENT_DROP, EVENT_EMITTED);
}
