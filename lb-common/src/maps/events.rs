//! Flow events: fixed-size records (96 bytes) the kernel programs put in a ring buffer (`LB_EVENTS_V1`),
//! rate-limited per CPU by a token bucket (`LB_EVBKT_V1`) whose rate and burst the agent sets
//! (`LB_EVCFG_V1`), with every emitted, throttled and lost event counted (`LB_EVSTAT_V1`).
use super::MapAddr;

pub const MAP_EVENTS: &str = "LB_EVENTS_V1";
pub const MAP_EVENT_CONFIG: &str = "LB_EVCFG_V1";
pub const MAP_EVENT_BUCKET: &str = "LB_EVBKT_V1";
pub const MAP_EVENT_STATS: &str = "LB_EVSTAT_V1";

/// A packet dropped or refused: `reason` says why.
pub const EVENT_DROP: u8 = 0;
/// A new connection translated to a backend (`service_id`, `backend_id`, SNAT in `nat`).
pub const EVENT_NEW_FLOW: u8 = 1;
/// A new flow an isolated pod's policy allowed (`direction`, `policy_id`; `reason` says how
/// the rule matched, `POLICY_MATCH_*`). Denials are `EVENT_DROP`s (`drop_policy`).
pub const EVENT_POLICY: u8 = 2;
/// A tracked connection removed by the agent's conntrack GC. Made by the agent, never by
/// the kernel programs; a bit of `EventConfigV1::kinds` all the same.
pub const EVENT_CLOSE: u8 = 3;
/// Kinds the kernel programs emit (and count in `LB_EVSTAT_V1`).
pub const EVENT_KERNEL_KINDS: u8 = 3;
/// Kinds `LB_EVSTAT_V1` has room for: more kinds keep its pinned layout.
pub const EVENT_KIND_SLOTS: u32 = 8;

/// How a policy rule matched a flow (`reason` of an `EVENT_POLICY`).
pub const POLICY_MATCH_PEER: u32 = 1;
/// A rule for any peer (a port without `from`/`to`, or an empty peer).
pub const POLICY_MATCH_ANY_PEER: u32 = 2;

/// Where an event happened.
pub const HOOK_XDP: u8 = 0;
pub const HOOK_TC: u8 = 1;
pub const HOOK_TC_TO_POD: u8 = 2;

/// The event has a 5-tuple (a packet cut short before its ports has none).
pub const F_EVENT_TUPLE: u8 = 1 << 0;
/// A new flow's source was rewritten (`nat`, `nat_port`).
pub const F_EVENT_SNAT: u8 = 1 << 1;

/// One event. Addresses in network order, IPv4 in the first word; ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventV1 {
    /// CLOCK_MONOTONIC ns at the grain of a tick (the state clock, `StateClockV1`: 4 ms at
    /// HZ=250).
    pub ts_ns: u64,
    pub kind: u8,
    pub hook: u8,
    /// 4 or 6 (0: not IP).
    pub family: u8,
    pub flags: u8,
    pub reason: u32,
    pub ifindex: u32,
    pub proto: u8,
    /// Policy events: `POLICY_INGRESS` or `POLICY_EGRESS`.
    pub direction: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad2: u16,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// New flows: the Service and backend ids, and the SNAT source.
    pub service_id: u32,
    pub backend_id: u32,
    pub nat_port: u16,
    pub _pad3: u16,
    pub nat: [u32; 4],
    /// Policy events: the number of the policy whose rule allowed the flow.
    pub policy_id: u32,
    pub _pad4: u32,
}

impl EventV1 {
    /// Copies an address of either family into a 4-word field.
    #[inline(always)]
    pub fn words_of<A: MapAddr>(addr: &A) -> [u32; 4] {
        let mut out = [0u32; 4];
        for (o, w) in out.iter_mut().zip(addr.words()) {
            *o = *w;
        }
        out
    }
}

/// What is emitted, and how fast: `kinds` is a bit per kind; each CPU earns one event's
/// credit every `ns_per_event` ns, and holds at most `burst_ns` of credit (the burst times
/// `ns_per_event`, worked out by the agent: the programs have no 128-bit multiply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventConfigV1 {
    pub kinds: u32,
    pub _pad: u32,
    pub ns_per_event: u64,
    pub burst_ns: u64,
}

impl EventConfigV1 {
    /// Emits `kinds`, at most `rate` events a second with bursts of `burst`.
    pub fn new(kinds: u32, rate: u32, burst: u32) -> Self {
        let ns_per_event = 1_000_000_000 / rate.max(1) as u64;
        Self { kinds, _pad: 0, ns_per_event, burst_ns: ns_per_event * burst.max(1) as u64 }
    }
}

/// One CPU's token bucket, in ns of credit (an event costs `ns_per_event`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucketV1 {
    pub credit_ns: u64,
    pub last_ns: u64,
}

impl EventBucketV1 {
    /// Takes one event's credit at `now` (ns); false when there is none. The kernel's
    /// per-CPU buckets and the agent's bucket for close events are this one. A new bucket
    /// (`last_ns` 0) starts full.
    #[inline(always)]
    pub fn take(&mut self, cfg: &EventConfigV1, now: u64) -> bool {
        let credit = self.credit_ns.saturating_add(now.saturating_sub(self.last_ns)).min(cfg.burst_ns);
        self.last_ns = now;
        if credit < cfg.ns_per_event {
            self.credit_ns = credit;
            return false;
        }
        self.credit_ns = credit - cfg.ns_per_event;
        true
    }
}

/// Counters of `LB_EVSTAT_V1` (per CPU), at `EVENT_OUTCOMES * kind + outcome`, for the
/// kernel's kinds.
pub const EVENT_EMITTED: u32 = 0;
pub const EVENT_THROTTLED: u32 = 1;
/// The ring buffer was full: the agent reads too slowly.
pub const EVENT_LOST: u32 = 2;
pub const EVENT_OUTCOMES: u32 = 3;

#[cfg(feature = "user")]
super::impl_pod!(EventV1, EventConfigV1, EventBucketV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn events() {
        assert_layout!(EventV1, size 96, align 8, { ts_ns @ 0, kind @ 8, hook @ 9, family @ 10, flags @ 11, reason @ 12, ifindex @ 16, proto @ 20, direction @ 21, src_port @ 22, dst_port @ 24, src @ 28, dst @ 44, service_id @ 60, backend_id @ 64, nat_port @ 68, nat @ 72, policy_id @ 88 });
        assert_layout!(EventConfigV1, size 24, align 8, { kinds @ 0, ns_per_event @ 8, burst_ns @ 16 });
        assert_layout!(EventBucketV1, size 16, align 8, { credit_ns @ 0, last_ns @ 8 });
    }

    #[test]
    fn drops_are_the_drop_and_reject_reasons() {
        for (i, name) in crate::reason::NAMES.iter().enumerate() {
            assert_eq!(crate::reason::is_drop(i as u32), name.starts_with("drop_") || name.starts_with("reject_"), "{name}");
        }
    }
}
