//! The load-balancing decision, shared by both hooks: reverse NAT of replies, frontend lookup,
//! conntrack, Maglev backend selection and SNAT port allocation. It only reads and writes
//! maps; the hooks apply the returned [`Action`] to the packet.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use lb_common::*;

use crate::{maps::*, parse::Ipv4Packet, rewrite::Nat4};

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
    /// Route it here with a FIB lookup: its source is a node address (SNAT, or the reply of a
    /// NodePort flow), which the stack would drop as martian.
    Fib,
}

pub enum Action {
    Pass(u32),
    Drop(u32),
    Rewrite { reason: u32, to: Nat4, forward: Forward },
    /// No ready backend: answer the client (TCP RST, or ICMP port unreachable for UDP) so
    /// it fails at once.
    Reject,
}

const EEXIST: i32 = -17;

#[inline(always)]
pub fn decide(pkt: &Ipv4Packet, hook: Hook, bytes: u32) -> Action {
    let t = pkt.tuple;
    let now = unsafe { bpf_ktime_get_ns() };

    // 1. A reply of a flow we translated.
    if let Some(rnat) = LB4_RNAT_V1.get_ptr_mut(&t) {
        let rnat = unsafe { &mut *rnat };
        rnat.last_seen_ns = now;
        rnat.tcp_flags_seen |= pkt.tcp_flags;
        let to = Nat4 { src_addr: rnat.src_addr, dst_addr: rnat.dst_addr, src_port: rnat.src_port, dst_port: rnat.dst_port };
        let forward = if rnat.flags & F_CT_SNAT != 0 || hook == Hook::Pod { Forward::Fib } else { Forward::Stack };
        return Action::Rewrite { reason: reason::FWD_REVERSE_NAT, to, forward };
    }

    // 2. A frontend: exact address, or a NodePort on any of this node's addresses.
    let mut key = Service4KeyV1 { addr: t.dst_addr, port: t.dst_port, proto: t.proto, scope: SCOPE_CLUSTER };
    let svc = match unsafe { LB4_SVC_V1.get(&key) } {
        Some(svc) => *svc,
        None => {
            if unsafe { LB4_NODEIP_V1.get(&t.dst_addr) }.is_none() {
                return Action::Pass(reason::PASS_NOT_SERVICE);
            }
            key.addr = 0;
            match unsafe { LB4_SVC_V1.get(&key) } {
                Some(svc) => *svc,
                None => return Action::Pass(reason::PASS_NOT_SERVICE),
            }
        }
    };
    if pkt.first_fragment {
        // The later fragments could not follow the rewrite.
        return Action::Drop(reason::DROP_SERVICE_FRAGMENT);
    }
    count_traffic(&LB_SVC_STAT_V1, svc.service_id, bytes);

    // 3. An established flow keeps its backend while that backend exists.
    if let Some(ct) = LB4_CT_V1.get_ptr_mut(&t) {
        let ct = unsafe { &mut *ct };
        if ct.service_id == svc.service_id {
            if let Some(be) = LB4_BE_V1.get(ct.backend_id) {
                if be.addr != 0 {
                    ct.last_seen_ns = now;
                    ct.tcp_flags_seen |= pkt.tcp_flags;
                    count_traffic(&LB_BE_STAT_V1, ct.backend_id, bytes);
                    return forward_to(&t, be, ct.flags & F_CT_SNAT != 0, ct.nat_addr, ct.nat_port);
                }
            }
        }
    }

    // 4. A new flow: Maglev picks the backend from the flow hash.
    if svc.maglev_size == 0 {
        return Action::Reject;
    }
    let cfg = config();
    let hash = flow_hash4(t.src_addr, t.dst_addr, t.src_port, t.dst_port, t.proto, cfg.hash_seed);
    let slot = svc.maglev_offset.wrapping_add(hash % svc.maglev_size);
    let backend_id = match LB_MAGLEV_V1.get(slot) {
        Some(id) if *id != BACKEND_NONE => *id,
        _ => return Action::Drop(reason::DROP_BACKEND_MISSING),
    };
    let be = match LB4_BE_V1.get(backend_id) {
        Some(be) if be.addr != 0 => *be,
        _ => return Action::Drop(reason::DROP_BACKEND_MISSING),
    };

    let snat = hook == Hook::External && be.flags & F_BACKEND_LOCAL == 0;
    let mut ct = Ct4EntryV1 { last_seen_ns: now, backend_id, service_id: svc.service_id, tcp_flags_seen: pkt.tcp_flags, ..Default::default() };
    // The reply as it will arrive, and how to turn it back into frontend -> client.
    let mut reply = t.reply_from(&be);
    let rnat = RevNat4V1 {
        last_seen_ns: now,
        src_addr: t.dst_addr,
        dst_addr: t.src_addr,
        src_port: t.dst_port,
        dst_port: t.src_port,
        service_id: svc.service_id,
        flags: if snat { F_CT_SNAT } else { 0 },
        ..Default::default()
    };
    if snat {
        // The reverse-NAT map is the port allocator: a node port is ours once its entry is in.
        reply.dst_addr = cfg.snat_addr;
        let range = (cfg.nat_port_max - cfg.nat_port_min) as u32 + 1;
        let mut allocated = false;
        for i in 0..NAT_PORT_TRIES {
            let port = cfg.nat_port_min + (hash.wrapping_add(i) % range) as u16;
            reply.dst_port = port_raw(port);
            match LB4_RNAT_V1.insert(&reply, &rnat, BPF_NOEXIST as u64) {
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
        ct.nat_addr = cfg.snat_addr;
        ct.nat_port = reply.dst_port;
    } else if LB4_RNAT_V1.insert(&reply, &rnat, 0).is_err() {
        return Action::Drop(reason::DROP_CT_FULL);
    }
    if LB4_CT_V1.insert(&t, &ct, 0).is_err() {
        // A full table fails only this new flow; established ones keep their entries.
        let _ = LB4_RNAT_V1.remove(&reply);
        return Action::Drop(reason::DROP_CT_FULL);
    }
    count_traffic(&LB_BE_STAT_V1, backend_id, bytes);
    forward_to(&t, &be, snat, ct.nat_addr, ct.nat_port)
}

#[inline(always)]
fn forward_to(t: &Ct4KeyV1, be: &Backend4V1, snat: bool, nat_addr: u32, nat_port: u16) -> Action {
    let local = be.flags & F_BACKEND_LOCAL != 0;
    let reason = if local { reason::FWD_LOCAL_BACKEND } else { reason::FWD_REMOTE_BACKEND };
    if snat {
        let to = Nat4 { src_addr: nat_addr, src_port: nat_port, dst_addr: be.addr, dst_port: be.port };
        return Action::Rewrite { reason, to, forward: Forward::Fib };
    }
    let to = Nat4 { src_addr: t.src_addr, src_port: t.src_port, dst_addr: be.addr, dst_port: be.port };
    Action::Rewrite { reason, to, forward: Forward::Stack }
}
