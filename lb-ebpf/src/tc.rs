//! TC ingress on the host side of every pod's device: parse, decide, apply. Pods reach
//! ClusterIPs (and every other frontend) here; local backends' replies come back here too.
use aya_ebpf::{
    bindings::{__sk_buff, bpf_fib_lookup, bpf_redir_neigh, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
    EbpfContext,
};
use lb_common::{reason, Addr4, Addr6, CtKeyV1, HOOK_TC, HOOK_TC_TO_POD, IPPROTO_TCP, IPPROTO_UDP, POLICY_EGRESS, POLICY_INGRESS};

use crate::{
    csum,
    events::drop_event,
    family::{parse_into, Family},
    fib::{fib_params, next_hop, route, NextHopCache, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    lb::{decide, decide_icmp_error, Action, Balanced, Forward, Hook},
    maps::count_reason,
    parse::{parse_l2, ptr_at, IcmpError, Network, Packet, Parsed},
    policy,
    rewrite::{apply_icmp_error_nat, apply_nat, l4_csum_off, make_tcp_reset, write_icmp_port_unreachable, Fault, IcmpQuote, Nat, PacketWriter},
};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Headers we may read: Ethernet, two VLAN tags, IPv4 with options or IPv6 with 64 bytes of
/// extension headers, TCP without options. (Headers past it in a non-linear skb read as cut
/// short.)
const TC_PULL_LEN: u32 = 14 + 8 + 40 + 64 + 20;

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    let (verdict, why) = tc_path(&ctx);
    count_reason(why);
    verdict
}

#[inline(always)]
fn tc_path(ctx: &TcContext) -> (i32, u32) {
    // Direct access sees only the linear part of the skb; make sure the headers are in it.
    let len = ctx.len();
    if ((data_end(ctx) - data(ctx)) as u32) < TC_PULL_LEN.min(len) {
        let _ = ctx.pull_data(TC_PULL_LEN.min(len));
    }
    match parse_l2(data(ctx), data_end(ctx)) {
        Network::Ipv4(l3_off) => tc_family::<Addr4>(ctx, l3_off, len),
        Network::Ipv6(l3_off) => tc_family::<Addr6>(ctx, l3_off, len),
        Network::Arp(_) => (TC_ACT_OK, reason::PASS_NOT_IP),
        Network::Pass(why) => (TC_ACT_OK, why),
        Network::Drop(why) => (TC_ACT_SHOT, why),
    }
}

/// One family's path: parse, decide, apply, with the same split into calls as `xdp_family`.
#[inline(never)]
fn tc_family<A: Family>(ctx: &TcContext, l3_off: usize, len: u32) -> (i32, u32) {
    let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    let Some(scratch) = A::scratch().get_ptr_mut(0) else {
        return (TC_ACT_OK, reason::PASS_NOT_SERVICE);
    };
    let scratch = unsafe { &mut *scratch };
    match parse_into(data(ctx), data_end(ctx), l3_off, scratch) {
        Parsed::Packet => {
            scratch.pkt.ifindex = ifindex;
            let (verdict, why) = match tc_balance(ctx, &scratch.pkt, ifindex, len) {
                Balanced::Done(verdict, why) => (verdict as i16 as i32, why),
                Balanced::Reject => tc_reject(ctx, &scratch.pkt, ifindex),
            };
            if reason::is_drop(why) {
                drop_event(Some(&scratch.pkt.tuple), why, HOOK_TC, ifindex);
            }
            (verdict, why)
        }
        Parsed::IcmpError => tc_icmp_error(ctx, &scratch.err, ifindex),
        // Answered on external devices only: a pod's is the stack's.
        Parsed::NeighbourSolicitation => (TC_ACT_OK, reason::PASS_NOT_TCP_UDP),
        Parsed::Pass(why) => (TC_ACT_OK, why),
        Parsed::Drop(why) => {
            drop_event::<A>(None, why, HOOK_TC, ifindex);
            (TC_ACT_SHOT, why)
        }
    }
}

/// Decide, then apply: the path of every TCP and UDP packet, but for the reject.
#[inline(never)]
fn tc_balance<A: Family>(ctx: &TcContext, pkt: &Packet<A>, ifindex: u32, len: u32) -> Balanced {
    let w = TcWriter(ctx);
    // The pod's egress policy judges the packet as it travels between pods: after DNAT for a
    // new or tracked flow (the backend is the peer), before reverse NAT for a reply.
    let (verdict, why) = match decide(pkt, Hook::Pod, len) {
        Action::Pass(why) => match egress_check(pkt, None) {
            0 => (TC_ACT_OK, why),
            denied => (TC_ACT_SHOT, denied),
        },
        Action::Drop(why) => (TC_ACT_SHOT, why),
        Action::Reject => return Balanced::Reject,
        Action::Rewrite { reason: why, to, forward } => {
            let translated = if why == reason::FWD_REVERSE_NAT { None } else { Some(&to) };
            match egress_check(pkt, translated) {
                0 if apply_nat(&w, pkt, &to).is_err() => (TC_ACT_SHOT, reason::DROP_TRUNCATED_L4),
                0 => match forward {
                    Forward::Stack => (TC_ACT_OK, why),
                    Forward::Fib(cache) => (tc_fib_forward(ctx, pkt.l3_off, pkt.tuple.proto, &to, ifindex, cache), why),
                },
                denied => (TC_ACT_SHOT, denied),
            }
        }
    };
    Balanced::Done(verdict as u16, why)
}

/// The pod's egress check (0: it passes), from a stack frame of its own. A translated flow is
/// checked on its tuple after translation, built in the per-CPU scratch space (an IPv6 tuple
/// does not fit the stack beside the decision).
#[inline(never)]
fn egress_check<A: Family>(pkt: &Packet<A>, translated: Option<&Nat<A>>) -> u32 {
    let t = &pkt.tuple;
    let Some(to) = translated else { return policy::check(t, POLICY_EGRESS, None, pkt.ifindex) };
    let Some(scratch) = A::scratch().get_ptr_mut(0) else { return 0 };
    let travelling = unsafe { &mut (*scratch).travelling };
    *travelling = CtKeyV1 { src_addr: to.src_addr, dst_addr: to.dst_addr, src_port: to.src_port, dst_port: to.dst_port, proto: t.proto, _pad: [0; 3] };
    policy::check(travelling, POLICY_EGRESS, Some(t), pkt.ifindex)
}

/// TC egress on the host side of every pod's device: what reaches the pod, checked against
/// its ingress policy. Nothing is rewritten here.
#[classifier]
pub fn lb_tc_to_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    if ((data_end(&ctx) - data(&ctx)) as u32) < TC_PULL_LEN.min(len) {
        let _ = ctx.pull_data(TC_PULL_LEN.min(len));
    }
    let (verdict, why) = match parse_l2(data(&ctx), data_end(&ctx)) {
        Network::Ipv4(l3_off) => to_pod_family::<Addr4>(&ctx, l3_off),
        Network::Ipv6(l3_off) => to_pod_family::<Addr6>(&ctx, l3_off),
        _ => (TC_ACT_OK, 0),
    };
    // Only drops are counted: the packet's other reasons were counted where it was balanced.
    if why != 0 {
        count_reason(why);
    }
    verdict
}

#[inline(never)]
fn to_pod_family<A: Family>(ctx: &TcContext, l3_off: usize) -> (i32, u32) {
    let Some(scratch) = A::scratch().get_ptr_mut(0) else {
        return (TC_ACT_OK, 0);
    };
    let scratch = unsafe { &mut *scratch };
    let ifindex = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex };
    match parse_into(data(ctx), data_end(ctx), l3_off, scratch) {
        Parsed::Packet => match policy::check(&scratch.pkt.tuple, POLICY_INGRESS, None, ifindex) {
            0 => (TC_ACT_OK, 0),
            why => {
                drop_event(Some(&scratch.pkt.tuple), why, HOOK_TC_TO_POD, ifindex);
                (TC_ACT_SHOT, why)
            }
        },
        // ICMP errors, neighbour discovery, fragments past the first: the stack's to judge.
        _ => (TC_ACT_OK, 0),
    }
}

/// No ready backend: a TCP RST or an ICMP port unreachable back to the pod. A function of its
/// own: it needs a stack frame of its own.
#[inline(always)]
fn tc_reject<A: Family>(ctx: &TcContext, pkt: &Packet<A>, ifindex: u32) -> (i32, u32) {
    let answered = if pkt.tuple.proto == IPPROTO_TCP { tc_tcp_reset(ctx, pkt) } else { tc_icmp_port_unreachable(ctx, pkt) };
    match answered {
        // Back out of the device it came in on, to the pod.
        Ok(()) => (unsafe { bpf_redirect(ifindex, 0) } as i32, reason::REJECT_NO_BACKEND),
        Err(Fault) => (TC_ACT_SHOT, reason::REJECT_NO_BACKEND),
    }
}

/// Turns the segment into a RST back to its sender.
#[inline(never)]
fn tc_tcp_reset<A: Family>(ctx: &TcContext, pkt: &Packet<A>) -> Result<(), Fault> {
    make_tcp_reset(&TcWriter(ctx), pkt)
}

/// The TC twin of `xdp_icmp_error`: a backend's (or a router's) error goes to the client.
#[inline(never)]
fn tc_icmp_error<A: Family>(ctx: &TcContext, err: &IcmpError<A>, ifindex: u32) -> (i32, u32) {
    let Some((to, forward)) = decide_icmp_error(err, Hook::Pod) else {
        return (TC_ACT_OK, reason::PASS_NOT_TCP_UDP);
    };
    if apply_icmp_error_nat(&TcWriter(ctx), err, &to).is_err() {
        return (TC_ACT_SHOT, reason::DROP_TRUNCATED_L4);
    }
    match forward {
        Forward::Stack => (TC_ACT_OK, reason::FWD_ICMP_ERROR),
        Forward::Fib(cache) => (tc_fib_forward(ctx, err.l3_off, A::ICMP_PROTO, &to, ifindex, cache), reason::FWD_ICMP_ERROR),
    }
}

/// The TC twin of `xdp_icmp_port_unreachable`.
#[inline(never)]
fn tc_icmp_port_unreachable<A: Family>(ctx: &TcContext, pkt: &Packet<A>) -> Result<(), Fault> {
    let quote = IcmpQuote::measure(data(ctx), data_end(ctx), pkt)?;
    ctx.change_tail(quote.kept_len() as u32, 0).map_err(|_| Fault)?;
    ctx.change_head(A::ICMP_ERROR_GROWTH as u32, 0).map_err(|_| Fault)?;
    write_icmp_port_unreachable::<A>(data(ctx), data_end(ctx), &quote)
}

/// Routes a rewritten packet here; falls back to the stack when the FIB has no answer.
#[inline(always)]
fn tc_fib_forward<A: Family>(ctx: &TcContext, l3_off: usize, proto: u8, to: &Nat<A>, ingress: u32, cache: NextHopCache) -> i32 {
    let Some(mut params) = fib_params(data(ctx), data_end(ctx), l3_off, proto, to.src_addr, to.dst_addr, ingress) else {
        return TC_ACT_OK;
    };
    let rc = route(&mut params, to, cache, |p| unsafe { fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) });
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let macs = unsafe { params.__bindgen_anon_6.__bindgen_anon_2 };
        let mut eth = [0u8; 12];
        eth[..6].copy_from_slice(&macs.dmac);
        eth[6..].copy_from_slice(&macs.smac);
        if ctx.store(0, &eth, 0).is_err() {
            return TC_ACT_OK;
        }
        return unsafe { bpf_redirect(params.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // The kernel resolves the neighbour for us.
        let mut nh = next_hop::<A>(&params);
        return unsafe { bpf_redirect_neigh(params.ifindex, &mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) } as i32;
    }
    TC_ACT_OK
}

/// `ctx.data()`, read afresh each time: LLVM would otherwise keep the first read's packet
/// pointer across the decision's map calls and spill it as 32 bits, which the verifier refuses.
#[inline(always)]
fn data(ctx: &TcContext) -> usize {
    unsafe { core::ptr::read_volatile(&(*(ctx.as_ptr() as *const __sk_buff)).data) as usize }
}

#[inline(always)]
fn data_end(ctx: &TcContext) -> usize {
    unsafe { core::ptr::read_volatile(&(*(ctx.as_ptr() as *const __sk_buff)).data_end) as usize }
}

struct TcWriter<'a>(&'a TcContext);

impl TcWriter<'_> {
    #[inline(always)]
    fn l4_flags<A: Family>(pkt: &Packet<A>) -> u64 {
        if pkt.tuple.proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 } else { 0 }
    }
}

impl PacketWriter for TcWriter<'_> {
    fn data(&self) -> usize {
        data(self.0)
    }
    fn data_end(&self) -> usize {
        data_end(self.0)
    }
    // Fields are written straight into the headers (pulled into the linear part; the
    // verifier makes the skb writable for a program that writes it), where
    // `bpf_skb_store_bytes` would be a helper call per field. The csum helpers know the skb's
    // checksum state (CHECKSUM_PARTIAL from pods included), so a checksum takes its summed
    // difference in one call (size 0: "by difference"): the addresses' with the pseudo-header
    // flag (a partial checksum holds only the pseudo-header's sum), the ports' without.
    #[inline(always)]
    fn update_csums<A: Family>(&self, pkt: &Packet<A>, addrs: u32, ports: u32) -> Result<(), Fault> {
        if addrs != 0 {
            if let Some(csum_off) = A::HEADER_CSUM_OFF {
                self.0.l3_csum_replace(pkt.l3_off + csum_off, 0, addrs as u64, 0).map_err(|_| Fault)?;
            }
            self.0.l4_csum_replace(l4_csum_off(pkt), 0, addrs as u64, BPF_F_PSEUDO_HDR | Self::l4_flags(pkt)).map_err(|_| Fault)?;
        }
        if ports != 0 {
            self.0.l4_csum_replace(l4_csum_off(pkt), 0, ports as u64, Self::l4_flags(pkt)).map_err(|_| Fault)?;
        }
        Ok(())
    }
    #[inline(always)]
    fn replace_icmp_outer_word<A: Family>(&self, err: &IcmpError<A>, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        self.0.store(off, &new, 0).map_err(|_| Fault)?;
        match A::HEADER_CSUM_OFF {
            Some(csum_off) => self.0.l3_csum_replace(err.l3_off + csum_off, old as u64, new as u64, 4),
            // ICMPv6: the addresses are in its checksum's pseudo-header.
            None => self.0.l4_csum_replace(err.icmp_off + 2, old as u64, new as u64, BPF_F_PSEUDO_HDR | 4),
        }
        .map_err(|_| Fault)
    }
    // ICMP has no pseudo-header: its checksum covers only the message itself.
    #[inline(always)]
    fn replace_icmp_u16(&self, icmp_off: usize, off: usize, old: u16, new: u16) -> Result<(), Fault> {
        self.0.store(off, &new, 0).map_err(|_| Fault)?;
        self.0.l4_csum_replace(icmp_off + 2, old as u64, new as u64, 2).map_err(|_| Fault)
    }
    #[inline(always)]
    fn replace_icmp_u32(&self, icmp_off: usize, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        self.0.store(off, &new, 0).map_err(|_| Fault)?;
        self.0.l4_csum_replace(icmp_off + 2, old as u64, new as u64, 4).map_err(|_| Fault)
    }
}
