//! `lbctl explain`: the path a new packet would take, read from the live maps with the
//! datapath's own steps and hash (`lb::decide` in the kernel): the frontend (an exact address,
//! else a NodePort on a node address; an outside client of an `externalTrafficPolicy: Local`
//! frontend sees its local scope), source ranges, a tracked flow, affinity, the flow hash and
//! Maglev slot, the backend, SNAT, then NetworkPolicy (the source pod's egress, the
//! destination pod's ingress when it is on this node), and the verdict.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::Result;
use aya::maps::lpm_trie::Key;
use lb_common::*;
use serde::Serialize;

use crate::dataplane::{
    conntrack::monotonic_ns,
    maps::{Family, Maps},
    policy::{Judgement, PolicyMaps},
};

/// The NetworkPolicy maps, and the policies' names by number (from the agent, when it
/// answers).
pub struct PolicyContext<'a> {
    pub maps: &'a PolicyMaps,
    pub names: &'a HashMap<u32, String>,
}

/// Where the packet comes from: outside the node (XDP) or from one of its pods (TC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    Outside,
    Pod,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Explanation {
    /// Each step, as a line: what was looked at and what it said.
    pub steps: Vec<String>,
    pub service: Option<String>,
    pub flow_hash: Option<u32>,
    pub slot: Option<u32>,
    pub backend: Option<SocketAddr>,
    /// The source the backend sees, when it is not the client.
    pub snat: Option<IpAddr>,
    /// The verdict reason, as `lbctl stats` names it.
    pub verdict: String,
}

/// Explains a packet `src` -> `dst` of protocol `proto` (6 or 17), with the policy checks
/// it meets on this node when `policy` is given.
pub fn explain(maps: &Maps, policy: Option<&PolicyContext>, src: SocketAddr, dst: SocketAddr, proto: u8, from: From) -> Result<Explanation> {
    let mut out = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => explain_family::<Addr4>(maps, src, dst, proto, from)?,
        (IpAddr::V6(_), IpAddr::V6(_)) => explain_family::<Addr6>(maps, src, dst, proto, from)?,
        _ => anyhow::bail!("{src} and {dst} are of two families"),
    };
    if let Some(policy) = policy {
        explain_policy(&mut out, policy, src, dst, proto, from);
    }
    Ok(out)
}

/// The policy checks of a packet that goes on (to the stack or a backend), as the kernel
/// makes them: the source pod's egress on the packet as it travels (after DNAT and SNAT),
/// then, when the destination is a pod of this node, its ingress. A reply passes as its flow
/// did: not judged here.
fn explain_policy(out: &mut Explanation, policy: &PolicyContext, src: SocketAddr, dst: SocketAddr, proto: u8, from: From) {
    let goes_on = [reason::PASS_NOT_SERVICE, reason::FWD_LOCAL_BACKEND, reason::FWD_REMOTE_BACKEND, reason::FWD_HAIRPIN];
    if !goes_on.iter().any(|r| out.verdict == reason::NAMES[*r as usize]) {
        return;
    }
    let travelling_src = out.snat.map_or(src, |ip| SocketAddr::new(ip, src.port()));
    let travelling_dst = out.backend.unwrap_or(dst);
    let name = |id: u32| policy.names.get(&id).cloned().unwrap_or_else(|| format!("policy {id}"));
    let mut checks = Vec::new();
    if from == From::Pod {
        checks.push((POLICY_EGRESS, "egress of the source", travelling_src));
    }
    if out.verdict == reason::NAMES[reason::FWD_REMOTE_BACKEND as usize] {
        out.steps.push(format!("policy: {} is judged by its own node's ingress policy", travelling_dst.ip()));
    } else {
        checks.push((POLICY_INGRESS, "ingress of the destination", travelling_dst));
    }
    for (direction, what, pod) in checks {
        let said = match policy.maps.judge(travelling_src, travelling_dst, proto, direction) {
            Judgement::Open => format!("no policy isolates {}", pod.ip()),
            Judgement::Remembered => "a flow it passed before".to_string(),
            Judgement::Node => "the node itself passes".to_string(),
            Judgement::Allowed { policy, any_peer } => format!("allowed by {} (a rule for {})", name(policy), if any_peer { "any peer" } else { "the peer's identity" }),
            Judgement::Denied { identity } => {
                out.steps.push(format!("policy, {what} {}: denied: no rule allows identity {identity} to port {}/{}", pod.ip(), travelling_dst.port(), proto_name(proto)));
                out.verdict = reason::NAMES[reason::DROP_POLICY as usize].to_string();
                return;
            }
        };
        out.steps.push(format!("policy, {what} {}: {said}", pod.ip()));
    }
}

fn verdict(out: &mut Explanation, reason: u32) -> Result<Explanation> {
    out.verdict = reason::NAMES[reason as usize].to_string();
    Ok(std::mem::take(out))
}

fn explain_family<A: Family>(maps: &Maps, src: SocketAddr, dst: SocketAddr, proto: u8, from: From) -> Result<Explanation> {
    let family = A::of(maps);
    let addr = |ip: IpAddr| A::from_ip(ip).expect("the family checked");
    let t = CtKeyV1 { src_addr: addr(src.ip()), dst_addr: addr(dst.ip()), src_port: port_raw(src.port()), dst_port: port_raw(dst.port()), proto, _pad: [0; 3] };
    let mut out = Explanation::default();
    // 1. A reply of a translated flow.
    if let Ok(rnat) = family.reverse_nat.get(&t, 0) {
        out.steps.push(format!("reverse NAT: a reply of a translated flow; leaves from {}:{}", rnat.src_addr.to_ip(), port_host(rnat.src_port)));
        return verdict(&mut out, reason::FWD_REVERSE_NAT);
    }
    // 2. The frontend.
    let Some((mut key, mut svc)) = maps.lookup_frontend(t.dst_addr, t.dst_port, proto) else {
        out.steps.push(match family.node_ips.get(&t.dst_addr, 0) {
            Ok(_) => format!("frontend: none ({dst} is a node address, but no NodePort {} is)", dst.port()),
            Err(_) => format!("frontend: none for {dst}/{}: passed to the stack", proto_name(proto)),
        });
        return verdict(&mut out, reason::PASS_NOT_SERVICE);
    };
    let name = maps.service_names.get(&svc.service_id, 0).map(|n| n.as_str().to_string()).unwrap_or_default();
    out.steps.push(format!("frontend: {}{dst}/{} -> {name} (service id {})", if key.addr.is_zero() { "NodePort on a node address, " } else { "" }, proto_name(proto), svc.service_id));
    out.service = Some(name);
    if from == From::Outside && svc.flags & F_SVC_EXT_LOCAL != 0 {
        key.scope = SCOPE_LOCAL;
        out.steps.push("externalTrafficPolicy: Local: an outside client gets this node's endpoints only".into());
        svc = match family.services.get(&key, 0) {
            Ok(svc) => svc,
            Err(_) => return verdict(&mut out, reason::DROP_NO_LOCAL_BACKEND),
        };
    }
    if svc.flags & F_SVC_SOURCE_RANGES != 0 {
        let bits = SourceRangeV1::<A>::SERVICE_BITS + 32 * t.src_addr.words().len() as u32;
        let allowed = family.source_ranges.get(&Key::new(bits, SourceRangeV1::new(svc.service_id, t.src_addr)), 0).is_ok();
        out.steps.push(format!("source ranges: {} is {}", src.ip(), if allowed { "inside one" } else { "outside every one" }));
        if !allowed {
            return verdict(&mut out, reason::DROP_SOURCE_RANGE);
        }
    }
    // 3. A tracked flow keeps its backend.
    if let Ok(ct) = family.conntrack.get(&t, 0) {
        if ct.service_id == svc.service_id {
            if let Ok(be) = family.backends.get(&ct.backend_id, 0) {
                if !be.addr.is_zero() {
                    out.steps.push(format!("conntrack: a tracked flow, kept on backend {}", ct.backend_id));
                    return backend(&mut out, maps, from, t.src_addr, be, ct.flags & F_CT_SNAT != 0);
                }
            }
        }
    }
    out.steps.push("conntrack: no tracked flow: a new one".into());
    // 4. A new flow.
    if svc.maglev_size == 0 {
        out.steps.push("endpoints: none ready".into());
        return verdict(&mut out, if key.scope == SCOPE_LOCAL { reason::DROP_NO_LOCAL_BACKEND } else { reason::REJECT_NO_BACKEND });
    }
    let cfg = maps.config.get(&0, 0).unwrap_or_default();
    let hash = flow_hash(&t, cfg.hash_seed);
    out.flow_hash = Some(hash);
    let mut backend_id = None;
    if svc.flags & F_SVC_AFFINITY != 0 {
        let timeout_ns = maps.service_opts.get(&svc.service_id, 0).map_or(0, |o| o.affinity_timeout_s as u64 * 1_000_000_000);
        if let Ok(a) = maps.affinity.get(&A::affinity_key(t.src_addr, svc.service_id), 0) {
            let fresh = monotonic_ns().saturating_sub(a.last_seen_ns) <= timeout_ns;
            let member = maps.affinity_match.get(&AffinityMatchKeyV1 { backend_id: a.backend_id, service_id: svc.service_id }, 0).is_ok();
            if fresh && member {
                out.steps.push(format!("session affinity: this client keeps backend {}", a.backend_id));
                backend_id = Some(a.backend_id);
            }
        }
    }
    let backend_id = match backend_id {
        Some(id) => id,
        None => {
            let slot = svc.maglev_offset.wrapping_add(hash % svc.maglev_size);
            let id = maps.read_slot(slot)?;
            out.slot = Some(hash % svc.maglev_size);
            out.steps.push(format!("Maglev: flow hash {hash:#010x} (seed {}), slot {} of {} -> backend {id}", cfg.hash_seed, hash % svc.maglev_size, svc.maglev_size));
            id
        }
    };
    match family.backends.get(&backend_id, 0) {
        Ok(be) if !be.addr.is_zero() => {
            let snat = (from == From::Outside && be.flags & F_BACKEND_LOCAL == 0) || (from == From::Pod && be.addr == t.src_addr);
            backend(&mut out, maps, from, t.src_addr, be, snat)
        }
        _ => verdict(&mut out, reason::DROP_BACKEND_MISSING),
    }
}

/// The backend step, its SNAT and the verdict.
fn backend<A: Family>(out: &mut Explanation, maps: &Maps, from: From, client: A, be: BackendV1<A>, snat: bool) -> Result<Explanation> {
    let local = be.flags & F_BACKEND_LOCAL != 0;
    let to = SocketAddr::new(be.addr.to_ip(), port_host(be.port));
    out.backend = Some(to);
    out.steps.push(format!("backend: {to} ({})", if local { "on this node" } else { "on another node" }));
    if snat && from == From::Pod && be.addr == client {
        out.snat = Some(A::hairpin_ip());
        out.steps.push(format!("hairpin: the pod reaches itself, from {}", A::hairpin_ip()));
        return verdict(out, reason::FWD_HAIRPIN);
    }
    if snat {
        out.snat = A::snat_ip(maps);
        out.steps.push(match out.snat {
            Some(ip) => format!("SNAT: to the node address {ip} (its reply must come back here)"),
            None => "SNAT: needed, and this node has no address of the family".into(),
        });
        if out.snat.is_none() {
            return verdict(out, reason::DROP_NO_SNAT_ADDR);
        }
        return verdict(out, reason::FWD_REMOTE_BACKEND);
    }
    out.steps.push("SNAT: none: the backend sees the client".into());
    verdict(out, if local { reason::FWD_LOCAL_BACKEND } else { reason::FWD_REMOTE_BACKEND })
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}
