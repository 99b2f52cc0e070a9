//! The load balancer's kernel programs, one object with two attach points:
//! - `lb_xdp`: XDP on external devices (north-south: NodePort, LoadBalancer, ExternalIP);
//! - `lb_tc`: TC ingress on the host side of every pod's device (pod to ClusterIP, replies);
//! - `lb_xdp_pass`: passes everything (benchmark floor, veth peers).
//!
//! Each reads top to bottom: parse, decide (`lb::decide`, shared), apply, count the reason.
#![no_std]
#![no_main]

mod csum;
mod lb;
mod maps;
mod parse;
mod rewrite;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_redir_neigh, xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{reason, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    lb::{decide, Action, Forward, Hook},
    maps::count_reason,
    parse::{parse, ptr_at, Ipv4Packet, Parsed},
    rewrite::{apply_nat, l4_csum_off, make_tcp_reset, write_icmp_port_unreachable, Fault, IcmpQuote, PacketWriter, ICMP_ERROR_GROWTH},
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

// ---------------------------------------------------------------------------------------------
// XDP

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (verdict, why) = xdp_path(&ctx);
    count_reason(why);
    verdict
}

#[inline(always)]
fn xdp_path(ctx: &XdpContext) -> (u32, u32) {
    let pkt = match parse(ctx.data(), ctx.data_end()) {
        Parsed::Ipv4(pkt) => pkt,
        Parsed::Pass(why) => return (xdp_action::XDP_PASS, why),
        Parsed::Drop(why) => return (xdp_action::XDP_DROP, why),
    };
    let w = XdpWriter(ctx);
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
                Forward::Fib => xdp_fib_forward(ctx, &pkt, why),
            }
        }
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
fn xdp_fib_forward(ctx: &XdpContext, pkt: &Ipv4Packet, why: u32) -> (u32, u32) {
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(mut params) = fib_params(ctx.data(), ctx.data_end(), pkt, ingress) else {
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
}

/// Passes everything. The floor for per-packet benchmarks, and the program a veth peer needs
/// so that native XDP_TX/REDIRECT frames are delivered to it (veth drops them otherwise).
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

// ---------------------------------------------------------------------------------------------
// TC

/// Headers we may read: Ethernet, two VLAN tags, IPv4 with options, TCP without options.
const TC_PULL_LEN: u32 = 14 + 8 + 60 + 20;

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
    if ((ctx.data_end() - ctx.data()) as u32) < TC_PULL_LEN.min(len) {
        let _ = ctx.pull_data(TC_PULL_LEN.min(len));
    }
    let pkt = match parse(ctx.data(), ctx.data_end()) {
        Parsed::Ipv4(pkt) => pkt,
        Parsed::Pass(why) => return (TC_ACT_OK, why),
        Parsed::Drop(why) => return (TC_ACT_SHOT, why),
    };
    let w = TcWriter(ctx);
    let ifindex = unsafe { (*(ctx.as_ptr() as *const aya_ebpf::bindings::__sk_buff)).ifindex };
    match decide(&pkt, Hook::Pod, len) {
        Action::Pass(why) => (TC_ACT_OK, why),
        Action::Drop(why) => (TC_ACT_SHOT, why),
        Action::Reject => {
            let answered = if pkt.tuple.proto == IPPROTO_TCP { make_tcp_reset(&w, &pkt) } else { tc_icmp_port_unreachable(ctx, &pkt) };
            match answered {
                // Back out of the device it came in on, to the pod.
                Ok(()) => (unsafe { bpf_redirect(ifindex, 0) } as i32, reason::REJECT_NO_BACKEND),
                Err(Fault) => (TC_ACT_SHOT, reason::REJECT_NO_BACKEND),
            }
        }
        Action::Rewrite { reason: why, to, forward } => {
            if apply_nat(&w, &pkt, &to).is_err() {
                return (TC_ACT_SHOT, reason::DROP_TRUNCATED_L4);
            }
            match forward {
                Forward::Stack => (TC_ACT_OK, why),
                Forward::Fib => (tc_fib_forward(ctx, &pkt, ifindex), why),
            }
        }
    }
}

/// The TC twin of `xdp_icmp_port_unreachable`.
#[inline(always)]
fn tc_icmp_port_unreachable(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<(), Fault> {
    let quote = IcmpQuote::save(ctx.data(), ctx.data_end(), pkt)?;
    ctx.change_tail(quote.kept_len() as u32, 0).map_err(|_| Fault)?;
    ctx.change_head(ICMP_ERROR_GROWTH as u32, 0).map_err(|_| Fault)?;
    write_icmp_port_unreachable(ctx.data(), ctx.data_end(), &quote)
}

/// Routes a rewritten packet here; falls back to the stack when the FIB has no answer.
#[inline(always)]
fn tc_fib_forward(ctx: &TcContext, pkt: &Ipv4Packet, ingress: u32) -> i32 {
    let Some(mut params) = fib_params(ctx.data(), ctx.data_end(), pkt, ingress) else {
        return TC_ACT_OK;
    };
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut params, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
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
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = AF_INET as u32;
        nh.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
        return unsafe { bpf_redirect_neigh(params.ifindex, &mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) } as i32;
    }
    TC_ACT_OK
}

struct TcWriter<'a>(&'a TcContext);

impl TcWriter<'_> {
    #[inline(always)]
    fn l4_flags(pkt: &Ipv4Packet) -> u64 {
        if pkt.tuple.proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 } else { 0 }
    }
}

impl PacketWriter for TcWriter<'_> {
    fn data(&self) -> usize {
        self.0.data()
    }
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    // The csum helpers know the skb's checksum state (CHECKSUM_PARTIAL from pods included).
    #[inline(always)]
    fn replace_addr(&self, pkt: &Ipv4Packet, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        self.0.store(off, &new, 0).map_err(|_| Fault)?;
        self.0.l3_csum_replace(pkt.l3_off + 10, old as u64, new as u64, 4).map_err(|_| Fault)?;
        let flags = BPF_F_PSEUDO_HDR | Self::l4_flags(pkt) | 4;
        self.0.l4_csum_replace(l4_csum_off(pkt), old as u64, new as u64, flags).map_err(|_| Fault)
    }
    #[inline(always)]
    fn replace_l4_u16(&self, pkt: &Ipv4Packet, off: usize, old: u16, new: u16) -> Result<(), Fault> {
        self.0.store(off, &new, 0).map_err(|_| Fault)?;
        self.0.l4_csum_replace(l4_csum_off(pkt), old as u64, new as u64, Self::l4_flags(pkt) | 2).map_err(|_| Fault)
    }
    #[inline(always)]
    fn replace_l4_u32(&self, pkt: &Ipv4Packet, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        self.0.store(off, &new, 0).map_err(|_| Fault)?;
        self.0.l4_csum_replace(l4_csum_off(pkt), old as u64, new as u64, Self::l4_flags(pkt) | 4).map_err(|_| Fault)
    }
}

// ---------------------------------------------------------------------------------------------

/// FIB lookup parameters for the packet as it now is (after the rewrite).
#[inline(always)]
fn fib_params(data: usize, data_end: usize, pkt: &Ipv4Packet, ifindex: u32) -> Option<bpf_fib_lookup> {
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, pkt.l3_off)?;
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    unsafe {
        p.family = AF_INET;
        p.l4_protocol = (*ip).proto;
        p.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
        p.ifindex = ifindex;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
    }
    Some(p)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
