//! XDP on external devices: parse, decide, apply. Clients outside the cluster reach NodePorts,
//! LoadBalancer IPs and ExternalIPs here; remote backends' replies come back here too.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{reason, IPPROTO_TCP, IPPROTO_UDP};
use network_types::eth::EthHdr;

use crate::{
    csum,
    fib::{fib_params, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    lb::{decide, decide_icmp_error, Action, Forward, Hook},
    maps::count_reason,
    parse::{parse, ptr_at, IcmpError4, Ipv4Packet, Parsed},
    rewrite::{apply_icmp_error_nat, apply_nat, l4_csum_off, make_tcp_reset, write_icmp_port_unreachable, Fault, IcmpQuote, PacketWriter, ICMP_ERROR_GROWTH},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (verdict, why) = xdp_path(&ctx);
    count_reason(why);
    verdict
}

#[inline(always)]
fn xdp_path(ctx: &XdpContext) -> (u32, u32) {
    let w = XdpWriter(ctx);
    let pkt = match parse(ctx.data(), ctx.data_end()) {
        Parsed::Ipv4(pkt) => pkt,
        Parsed::IcmpError4(err) => return xdp_icmp_error(ctx, &w, &err),
        Parsed::Pass(why) => return (xdp_action::XDP_PASS, why),
        Parsed::Drop(why) => return (xdp_action::XDP_DROP, why),
    };
    let bytes = (ctx.data_end() - ctx.data()) as u32;
    match decide(&pkt, Hook::External, bytes) {
        Action::Pass(why) => (xdp_action::XDP_PASS, why),
        Action::Drop(why) => (xdp_action::XDP_DROP, why),
        Action::Reject => {
            let answered = if pkt.tuple.proto == IPPROTO_TCP { make_tcp_reset(&w, &pkt) } else { xdp_icmp_port_unreachable(ctx, &pkt) };
            match answered {
                Ok(()) => (xdp_action::XDP_TX, reason::REJECT_NO_BACKEND),
                Err(Fault) => (xdp_action::XDP_DROP, reason::REJECT_NO_BACKEND),
            }
        }
        Action::Rewrite { reason: why, to, forward } => {
            if apply_nat(&w, &pkt, &to).is_err() {
                return (xdp_action::XDP_DROP, reason::DROP_TRUNCATED_L4);
            }
            match forward {
                Forward::Stack => (xdp_action::XDP_PASS, why),
                Forward::Fib => xdp_fib_forward(ctx, pkt.l3_off, why),
            }
        }
    }
}

/// An ICMP error about a translated flow goes to its client as the flow's replies do.
#[inline(always)]
fn xdp_icmp_error(ctx: &XdpContext, w: &XdpWriter, err: &IcmpError4) -> (u32, u32) {
    let Some((to, forward)) = decide_icmp_error(err, Hook::External) else {
        return (xdp_action::XDP_PASS, reason::PASS_NOT_TCP_UDP);
    };
    if apply_icmp_error_nat(w, err, &to).is_err() {
        return (xdp_action::XDP_DROP, reason::DROP_TRUNCATED_L4);
    }
    match forward {
        Forward::Stack => (xdp_action::XDP_PASS, reason::FWD_ICMP_ERROR),
        Forward::Fib => xdp_fib_forward(ctx, err.l3_off, reason::FWD_ICMP_ERROR),
    }
}

/// Turns the datagram into an ICMP port unreachable to its sender: cut it to what the error
/// quotes, grow the front by an IPv4 and an ICMP header, write them.
#[inline(always)]
fn xdp_icmp_port_unreachable(ctx: &XdpContext, pkt: &Ipv4Packet) -> Result<(), Fault> {
    let quote = IcmpQuote::save(ctx.data(), ctx.data_end(), pkt)?;
    let trim = quote.kept_len() as i32 - (ctx.data_end() - ctx.data()) as i32;
    if trim != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, trim) } != 0 {
        return Err(Fault);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ICMP_ERROR_GROWTH as i32)) } != 0 {
        return Err(Fault);
    }
    write_icmp_port_unreachable(ctx.data(), ctx.data_end(), &quote)
}

/// Sends a rewritten packet straight out the device the FIB names, with its MACs.
#[inline(always)]
fn xdp_fib_forward(ctx: &XdpContext, l3_off: usize, why: u32) -> (u32, u32) {
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(mut params) = fib_params(ctx.data(), ctx.data_end(), l3_off, ingress) else {
        return (xdp_action::XDP_DROP, reason::DROP_TRUNCATED_IP4);
    };
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // XDP cannot resolve a neighbour; the stack can (and queues the packet meanwhile). The
        // agent sets accept_local on external devices so a node source address is not martian.
        return (xdp_action::XDP_PASS, why);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return (xdp_action::XDP_DROP, reason::DROP_FIB_LOOKUP);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
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

struct XdpWriter<'a>(&'a XdpContext);

impl XdpWriter<'_> {
    /// Writes `bytes` at `off` and updates the checksum at `csum_off` with `update`.
    #[inline(always)]
    fn store_with_csum<const N: usize>(&self, csum_off: usize, off: usize, bytes: [u8; N], update: impl Fn(u16) -> u16) -> Result<(), Fault> {
        // Opaque offsets: LLVM would otherwise drop a bound check that an earlier, larger one
        // implies, and the verifier, which tracks each pointer apart, would refuse the access.
        let (csum_off, off) = (core::hint::black_box(csum_off), core::hint::black_box(off));
        let field = ptr_at::<[u8; N]>(self.data(), self.data_end(), off).ok_or(Fault)?;
        let csum = ptr_at::<u16>(self.data(), self.data_end(), csum_off).ok_or(Fault)?;
        unsafe {
            *field = bytes;
            *csum = update(*csum);
        }
        Ok(())
    }

    /// Applies `update` to the L4 checksum; a zero UDP checksum means "none" and stays zero.
    #[inline(always)]
    fn update_l4_csum(&self, pkt: &Ipv4Packet, update: impl Fn(u16) -> u16) -> Result<(), Fault> {
        let csum = ptr_at::<u16>(self.data(), self.data_end(), l4_csum_off(pkt)).ok_or(Fault)?;
        unsafe {
            let udp = pkt.tuple.proto == IPPROTO_UDP;
            if udp && *csum == 0 {
                return Ok(());
            }
            let new = update(*csum);
            *csum = if udp && new == 0 { 0xffff } else { new };
        }
        Ok(())
    }
}

impl PacketWriter for XdpWriter<'_> {
    fn data(&self) -> usize {
        self.0.data()
    }
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn replace_addr(&self, pkt: &Ipv4Packet, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        let field = ptr_at::<[u8; 4]>(self.data(), self.data_end(), off).ok_or(Fault)?;
        let ip_csum = ptr_at::<u16>(self.data(), self.data_end(), pkt.l3_off + 10).ok_or(Fault)?;
        unsafe {
            *field = new.to_ne_bytes();
            *ip_csum = csum::replace4(*ip_csum, old, new);
        }
        self.update_l4_csum(pkt, |c| csum::replace4(c, old, new))
    }
    #[inline(always)]
    fn replace_l4_u16(&self, pkt: &Ipv4Packet, off: usize, old: u16, new: u16) -> Result<(), Fault> {
        let field = ptr_at::<[u8; 2]>(self.data(), self.data_end(), off).ok_or(Fault)?;
        unsafe { *field = new.to_ne_bytes() };
        self.update_l4_csum(pkt, |c| csum::replace2(c, old, new))
    }
    #[inline(always)]
    fn replace_l4_u32(&self, pkt: &Ipv4Packet, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        let field = ptr_at::<[u8; 4]>(self.data(), self.data_end(), off).ok_or(Fault)?;
        unsafe { *field = new.to_ne_bytes() };
        self.update_l4_csum(pkt, |c| csum::replace4(c, old, new))
    }
    #[inline(always)]
    fn replace_ip_only(&self, l3_off: usize, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        self.store_with_csum(l3_off + 10, off, new.to_ne_bytes(), |c| csum::replace4(c, old, new))
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

/// Passes everything. The floor for per-packet benchmarks, and the program a veth peer needs
/// so that native XDP_TX/REDIRECT frames are delivered to it (veth drops them otherwise).
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
