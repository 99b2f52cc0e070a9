//! NetworkPolicy in the kernel. `lb_tc` checks a pod's egress after Service translation,
//! `lb_tc_to_pod` (TC egress of the pod's device) its ingress on the way in. A pod that no
//! policy isolates in a direction is open in it; an isolated one passes what an allow rule
//! names (the peer's identity or any peer, the protocol, the destination port as a prefix),
//! the replies of flows a check allowed, and its own node.
use aya_ebpf::maps::lpm_trie::Key;
use lb_common::*;

use crate::{
    events::policy_event,
    family::Family,
    maps::{count_one, LB_POLDENY_V1, LB_POLEXACT_V1, LB_POLICY_V1, LB_POLSTAT_V1},
};

/// Checks `t`, as it travels between the pod and its peer, against the policy of the pod at
/// its source (`POLICY_EGRESS`) or destination (`POLICY_INGRESS`). 0: it passes; otherwise
/// the reason it is dropped. A new flow that passes is remembered, with `frontend`, the tuple
/// it had before DNAT (its replies come back reverse-NATed, from the frontend), and is a
/// policy event when a rule allowed it. Two calls made in turn, not nested: the rule lookup
/// and its event need stack that the first call's frame would take.
#[inline(always)]
pub fn check<A: Family>(t: &CtKeyV1<A>, direction: u8, frontend: Option<&CtKeyV1<A>>, ifindex: u32) -> u32 {
    match isolated_endpoint(t, direction, frontend) {
        PASSES => 0,
        endpoint => judge_by_rules(t, direction, endpoint as u32, frontend, ifindex),
    }
}

/// `isolated_endpoint` found the flow passes without a rule.
const PASSES: u64 = u64::MAX;

/// The endpoint number of the pod whose policy must judge `t` by its rules; `PASSES` when
/// no policy isolates that pod in `direction`, or the flow was passed before.
#[inline(never)]
fn isolated_endpoint<A: Family>(t: &CtKeyV1<A>, direction: u8, frontend: Option<&CtKeyV1<A>>) -> u64 {
    let (local, isolated) = match direction {
        POLICY_EGRESS => (t.src_addr, POLICY_EGRESS_ISOLATED),
        _ => (t.dst_addr, POLICY_INGRESS_ISOLATED),
    };
    let Some(ep) = (unsafe { A::policy_endpoints().get(&PolicyEndpointKeyV1 { addr: local }) }) else { return PASSES };
    // A flow this check passed before, or the reply to one this pod's other check passed.
    // (Both ends of a flow may be pods of this node: each end's verdict is its own bit.)
    let (this, other) = (flow_bit(direction), flow_bit(direction ^ 1));
    let flows = A::policy_flows();
    if unsafe { flows.get(t) }.is_some_and(|bits| bits & this != 0) || unsafe { flows.get(&t.reversed()) }.is_some_and(|bits| bits & other != 0) {
        return PASSES;
    }
    // Open in this direction: remembered all the same, so that its replies pass the other
    // direction's isolation.
    if ep.flags & isolated == 0 {
        remember(t, this, frontend);
        return PASSES;
    }
    ep.endpoint as u64
}

/// A new flow of isolated pod `endpoint`: passes (0) when an allow rule names the peer's
/// identity or any peer, the protocol and the destination port, or the peer is the node.
#[inline(never)]
fn judge_by_rules<A: Family>(t: &CtKeyV1<A>, direction: u8, endpoint: u32, frontend: Option<&CtKeyV1<A>>, ifindex: u32) -> u32 {
    let peer = if direction == POLICY_EGRESS { t.dst_addr } else { t.src_addr };
    let identity = identity_of(peer);
    if identity == IDENTITY_HOST {
        return 0;
    }
    // Ports are kept as the packet has them (network order): a range is a prefix of them.
    let mut key = PolicyKeyV1 { endpoint, identity, direction, protocol: t.proto, port: t.dst_port.to_ne_bytes() };
    let (mut rule, mut matched) = (rule_for(&key), POLICY_MATCH_PEER);
    if rule.is_none() {
        key.identity = IDENTITY_ANY;
        (rule, matched) = (rule_for(&key), POLICY_MATCH_ANY_PEER);
    }
    match rule {
        Some(rule) => {
            count_one(&LB_POLSTAT_V1, rule.policy);
            remember(t, flow_bit(direction), frontend);
            policy_event(t, direction, rule.policy, matched, ifindex);
            0
        }
        None => {
            count_one(&LB_POLDENY_V1, denied_slot(endpoint, direction));
            reason::DROP_POLICY
        }
    }
}

/// The identity of `addr`: its own entry (a pod, a node), else the longest `ipBlock` prefix
/// holding it, else the world.
#[inline(always)]
fn identity_of<A: Family>(addr: A) -> u32 {
    let key = IpCacheKeyV1 { addr };
    if let Some(id) = unsafe { A::ipcache_hosts().get(&key) } {
        return id.id;
    }
    A::ipcache().get(&Key::new(32 * addr.words().len() as u32, key)).map_or(IDENTITY_WORLD, |i| i.id)
}

/// The rule `key` matches: one that fixes every bit, else a range or wildcard in the trie.
#[inline(always)]
fn rule_for(key: &PolicyKeyV1) -> Option<PolicyVerdictV1> {
    match unsafe { LB_POLEXACT_V1.get(key) } {
        Some(rule) => Some(*rule),
        None => LB_POLICY_V1.get(&Key::new(POLICY_PREFIX_FULL, *key)).copied(),
    }
}

/// Records that this check (`bit`) passed a flow, and its tuple before DNAT: its later
/// packets and its replies pass without a rule lookup.
#[inline(always)]
fn remember<A: Family>(t: &CtKeyV1<A>, bit: u8, frontend: Option<&CtKeyV1<A>>) {
    // Full: the oldest flow is forgotten (LRU); its next packet is checked again.
    let flows = A::policy_flows();
    for key in [Some(t), frontend].into_iter().flatten() {
        match flows.get_ptr_mut(key) {
            Some(bits) => unsafe { *bits |= bit },
            None => {
                let _ = flows.insert(key, &bit, 0);
            }
        }
    }
}
