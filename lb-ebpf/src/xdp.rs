//! XDP on external devices: parse, decide, apply. Clients outside the cluster reach NodePorts,
//! LoadBalancer IPs and ExternalIPs here; remote backends' replies come back here too; and
//! ARP and neighbour solicitations for announced load-balancer addresses are answered here.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{reason, Addr4, Addr6, HOOK_XDP, IPPROTO_TCP, IPPROTO_UDP};
use network_types::eth::EthHdr;

use crate::{
    csum,
    events::drop_event,
    family::{parse_into, Family},
    fib::{fib_params, route, NextHopCache, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    l2::{advertisement_len, answer_arp, solicited, write_advertisement},
    lb::{decide, decide_icmp_error, Action, Balanced, Forward, Hook},
    maps::count_reason,
    parse::{parse_l2, ptr_at, IcmpError, Network, Packet, Parsed},
    rewrite::{apply_icmp_error_nat, apply_nat, l4_csum_off, make_tcp_reset, write_icmp_port_unreachable, Fault, IcmpQuote, Nat, PacketWriter},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (verdict, why) = xdp_path(&ctx);
    count_reason(why);
    verdict
}

#[inline(always)]
fn xdp_path(ctx: &XdpContext) -> (u32, u32) {
    match parse_l2(data(ctx), data_end(ctx)) {
        Network::Ipv4(l3_off) => xdp_family::<Addr4>(ctx, l3_off),
        Network::Ipv6(l3_off) => xdp_family::<Addr6>(ctx, l3_off),
        // The stack answers ARP for the node's own addresses; XDP for the announced ones.
        Network::Arp(l3_off) => answer_arp(data(ctx), data_end(ctx), l3_off, ctx.ingress_ifindex() as u32).unwrap_or((xdp_action::XDP_PASS, reason::PASS_NOT_IP)),
        Network::Pass(why) => (xdp_action::XDP_PASS, why),
        Network::Drop(why) => (xdp_action::XDP_DROP, why),
    }
}

/// A neighbour solicitation for an announced address becomes the advertisement, sent back
/// out; one for any other address is the stack's.
#[inline(never)]
fn xdp_advertise(ctx: &XdpContext, l3_off: usize) -> (u32, u32) {
    let Some((mac, to)) = solicited(data(ctx), data_end(ctx), l3_off, ctx.ingress_ifindex() as u32) else {
        return (xdp_action::XDP_PASS, reason::PASS_NOT_TCP_UDP);
    };
    let resize = advertisement_len(l3_off) as i32 - (data_end(ctx) - data(ctx)) as i32;
    if resize != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, resize) } != 0 {
        return (xdp_action::XDP_DROP, reason::DROP_TRUNCATED_IP6);
    }
    write_advertisement(data(ctx), data_end(ctx), l3_off, mac, to).unwrap_or((xdp_action::XDP_DROP, reason::DROP_TRUNCATED_IP6))
}

/// One family's path: parse, decide, apply. Each step that needs much stack is a function of
/// its own (a BPF-to-BPF call), so that no chain of calls needs more than the 512 bytes a
/// program has: the rewrite and the reject are siblings under this frame, not nested.
#[inline(never)]
fn xdp_family<A: Family>(ctx: &XdpContext, l3_off: usize) -> (u32, u32) {
    let Some(scratch) = A::scratch().get_ptr_mut(0) else {
        return (xdp_action::XDP_PASS, reason::PASS_NOT_SERVICE);
    };
    let scratch = unsafe { &mut *scratch };
    let ifindex = ctx.ingress_ifindex() as u32;
    match parse_into(data(ctx), data_end(ctx), l3_off, scratch) {
        Parsed::Packet => {
            scratch.pkt.ifindex = ifindex;
            let (verdict, why) = match xdp_balance(ctx, &scratch.pkt) {
                Balanced::Done(verdict, why) => (verdict as u32, why),
                Balanced::Reject => xdp_reject(ctx, &scratch.pkt),
            };
            if reason::is_drop(why) {
                drop_event(Some(&scratch.pkt.tuple), why, HOOK_XDP, ifindex);
            }
            (verdict, why)
        }
        Parsed::IcmpError => xdp_icmp_error(ctx, &scratch.err),
        Parsed::NeighbourSolicitation => xdp_advertise(ctx, l3_off),
        Parsed::Pass(why) => (xdp_action::XDP_PASS, why),
        Parsed::Drop(why) => {
            drop_event::<A>(None, why, HOOK_XDP, ifindex);
            (xdp_action::XDP_DROP, why)
        }
    }
}

/// Decide, then apply: the path of every TCP and UDP packet, but for the reject.
#[inline(never)]
fn xdp_balance<A: Family>(ctx: &XdpContext, pkt: &Packet<A>) -> Balanced {
    let w = XdpWriter(ctx);
    // Materialised now: computed late, it would keep the packet pointers alive across map calls.
    let bytes = core::hint::black_box((data_end(ctx) - data(ctx)) as u32);
    let (verdict, why) = match decide(pkt, Hook::External, bytes) {
        Action::Pass(why) => (xdp_action::XDP_PASS, why),
        Action::Drop(why) => (xdp_action::XDP_DROP, why),
        Action::Reject => return Balanced::Reject,
        Action::Rewrite { reason: why, to, forward } => {
            if apply_nat(&w, pkt, &to).is_err() {
                (xdp_action::XDP_DROP, reason::DROP_TRUNCATED_L4)
            } else {
                match forward {
                    Forward::Stack => (xdp_action::XDP_PASS, why),
                    Forward::Fib(cache) => xdp_fib_forward(ctx, pkt.l3_off, pkt.tuple.proto, &to, why, cache),
                }
            }
        }
    };
    Balanced::Done(verdict as u16, why)
}

/// No ready backend: a TCP RST or an ICMP port unreachable back out to the client. A function
/// of its own: it needs a stack frame of its own.
#[inline(always)]
fn xdp_reject<A: Family>(ctx: &XdpContext, pkt: &Packet<A>) -> (u32, u32) {
    let answered = if pkt.tuple.proto == IPPROTO_TCP { xdp_tcp_reset(ctx, pkt) } else { xdp_icmp_port_unreachable(ctx, pkt) };
    match answered {
        Ok(()) => (xdp_action::XDP_TX, reason::REJECT_NO_BACKEND),
        Err(Fault) => (xdp_action::XDP_DROP, reason::REJECT_NO_BACKEND),
    }
}

/// Turns the segment into a RST back to its sender.
#[inline(never)]
fn xdp_tcp_reset<A: Family>(ctx: &XdpContext, pkt: &Packet<A>) -> Result<(), Fault> {
    make_tcp_reset(&XdpWriter(ctx), pkt)
}

/// An ICMP error about a translated flow goes to its client as the flow's replies do.
#[inline(never)]
fn xdp_icmp_error<A: Family>(ctx: &XdpContext, err: &IcmpError<A>) -> (u32, u32) {
    let Some((to, forward)) = decide_icmp_error(err, Hook::External) else {
        return (xdp_action::XDP_PASS, reason::PASS_NOT_TCP_UDP);
    };
    if apply_icmp_error_nat(&XdpWriter(ctx), err, &to).is_err() {
        return (xdp_action::XDP_DROP, reason::DROP_TRUNCATED_L4);
    }
    match forward {
        Forward::Stack => (xdp_action::XDP_PASS, reason::FWD_ICMP_ERROR),
        Forward::Fib(cache) => xdp_fib_forward(ctx, err.l3_off, A::ICMP_PROTO, &to, reason::FWD_ICMP_ERROR, cache),
    }
}

/// Turns the datagram into an ICMP port unreachable to its sender: cut it to what the error
/// quotes, grow the front by an IP and an ICMP header, write them.
#[inline(never)]
fn xdp_icmp_port_unreachable<A: Family>(ctx: &XdpContext, pkt: &Packet<A>) -> Result<(), Fault> {
    let quote = IcmpQuote::measure(data(ctx), data_end(ctx), pkt)?;
    let trim = quote.kept_len() as i32 - (data_end(ctx) - data(ctx)) as i32;
    if trim != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, trim) } != 0 {
        return Err(Fault);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(A::ICMP_ERROR_GROWTH as i32)) } != 0 {
        return Err(Fault);
    }
    write_icmp_port_unreachable::<A>(data(ctx), data_end(ctx), &quote)
}

/// Sends a rewritten packet straight out the device the FIB names (or its answer `cache`
/// holds, while fresh), with its MACs.
#[inline(always)]
fn xdp_fib_forward<A: Family>(ctx: &XdpContext, l3_off: usize, proto: u8, to: &Nat<A>, why: u32, cache: NextHopCache) -> (u32, u32) {
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(mut params) = fib_params(data(ctx), data_end(ctx), l3_off, proto, to.src_addr, to.dst_addr, ingress) else {
        return (xdp_action::XDP_DROP, reason::DROP_TRUNCATED_L4);
    };
    let rc = route(&mut params, to, cache, |p| unsafe { fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) });
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // XDP cannot resolve a neighbour; the stack can (and queues the packet meanwhile). The
        // agent sets accept_local on external devices so a node source address is not martian.
        return (xdp_action::XDP_PASS, why);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return (xdp_action::XDP_DROP, reason::DROP_FIB_LOOKUP);
    }
    let Some(eth) = ptr_at::<EthHdr>(data(ctx), data_end(ctx), 0) else {
        return (xdp_action::XDP_DROP, reason::DROP_TRUNCATED_ETH);
    };
    unsafe {
        let macs = &params.__bindgen_anon_6.__bindgen_anon_2;
        (*eth).dst_addr = macs.dmac;
        (*eth).src_addr = macs.smac;
    }
    if params.ifindex == ingress {
        return (xdp_action::XDP_TX, why);
    }
    (unsafe { bpf_redirect(params.ifindex, 0) } as u32, why)
}

/// `ctx.data()`, read afresh each time: LLVM would otherwise keep the first read's packet
/// pointer across the decision's map calls and spill it as 32 bits, which the verifier refuses.
#[inline(always)]
fn data(ctx: &XdpContext) -> usize {
    unsafe { core::ptr::read_volatile(&(*ctx.ctx).data) as usize }
}

#[inline(always)]
fn data_end(ctx: &XdpContext) -> usize {
    unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize }
}

struct XdpWriter<'a>(&'a XdpContext);

impl XdpWriter<'_> {
    /// The checksum at `csum_off` (an opaque offset, as in `PacketWriter::write`).
    #[inline(always)]
    fn csum_at(&self, csum_off: usize) -> Result<&mut u16, Fault> {
        let csum = ptr_at::<u16>(self.data(), self.data_end(), core::hint::black_box(csum_off)).ok_or(Fault)?;
        Ok(unsafe { &mut *csum })
    }

    /// Writes `bytes` at `off` and updates the checksum at `csum_off` with `update`.
    #[inline(always)]
    fn store_with_csum<const N: usize>(&self, csum_off: usize, off: usize, bytes: [u8; N], update: impl Fn(u16) -> u16) -> Result<(), Fault> {
        self.write(off, bytes)?;
        let csum = self.csum_at(csum_off)?;
        *csum = update(*csum);
        Ok(())
    }
}

impl PacketWriter for XdpWriter<'_> {
    fn data(&self) -> usize {
        data(self.0)
    }
    fn data_end(&self) -> usize {
        data_end(self.0)
    }
    /// The IPv4 header checksum takes what the addresses changed; the L4 checksum that and
    /// what its own fields did, in one update.
    #[inline(always)]
    fn update_csums<A: Family>(&self, pkt: &Packet<A>, addrs: u32, ports: u32) -> Result<(), Fault> {
        if let (Some(csum_off), true) = (A::HEADER_CSUM_OFF, addrs != 0) {
            let ip_csum = self.csum_at(pkt.l3_off + csum_off)?;
            *ip_csum = csum::apply(*ip_csum, addrs);
        }
        let l4 = addrs + ports;
        if l4 == 0 {
            return Ok(());
        }
        // A zero UDP checksum means "none" and stays zero; a computed zero is sent as 0xffff.
        let l4_csum = self.csum_at(l4_csum_off(pkt))?;
        let udp = pkt.tuple.proto == IPPROTO_UDP;
        if udp && *l4_csum == 0 {
            return Ok(());
        }
        let new = csum::apply(*l4_csum, l4);
        *l4_csum = if udp && new == 0 { 0xffff } else { new };
        Ok(())
    }
    #[inline(always)]
    fn replace_icmp_outer_word<A: Family>(&self, err: &IcmpError<A>, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        let csum_off = match A::HEADER_CSUM_OFF {
            Some(csum_off) => err.l3_off + csum_off,
            None => err.icmp_off + 2,
        };
        self.store_with_csum(csum_off, off, new.to_ne_bytes(), |c| csum::replace4(c, old, new))
    }
    #[inline(always)]
    fn replace_icmp_u16(&self, icmp_off: usize, off: usize, old: u16, new: u16) -> Result<(), Fault> {
        self.store_with_csum(icmp_off + 2, off, new.to_ne_bytes(), |c| csum::replace2(c, old, new))
    }
    #[inline(always)]
    fn replace_icmp_u32(&self, icmp_off: usize, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        self.store_with_csum(icmp_off + 2, off, new.to_ne_bytes(), |c| csum::replace4(c, old, new))
    }
}

/// Writes jiffies and `bpf_ktime_get_coarse_ns`, read together, over the first 16 bytes of
/// the packet, which it passes: the agent runs it (BPF_PROG_TEST_RUN, never attached) to
/// calibrate the state clock.
#[xdp]
pub fn lb_clock_probe(ctx: XdpContext) -> u32 {
    if let Some(out) = ptr_at::<[u64; 2]>(data(&ctx), data_end(&ctx), 0) {
        unsafe { core::ptr::write_unaligned(out, [bpf_jiffies64(), bpf_ktime_get_coarse_ns()]) };
    }
    xdp_action::XDP_PASS
}

/// Passes everything. The floor for per-packet benchmarks, and the program a veth peer needs
/// so that native XDP_TX/REDIRECT frames are delivered to it (veth drops them otherwise).
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
