//! TC ingress on the host side of every pod's device: parse, decide, apply. Pods reach
//! ClusterIPs (and every other frontend) here; local backends' replies come back here too.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_redir_neigh, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
    EbpfContext,
};
use lb_common::{reason, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    fib::{fib_params, AF_INET, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    lb::{decide, decide_icmp_error, Action, Forward, Hook},
    maps::count_reason,
    parse::{parse, IcmpError4, Ipv4Packet, Parsed},
    rewrite::{apply_icmp_error_nat, apply_nat, l4_csum_off, make_tcp_reset, write_icmp_port_unreachable, Fault, IcmpQuote, PacketWriter, ICMP_ERROR_GROWTH},
};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

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
    let w = TcWriter(ctx);
    let ifindex = unsafe { (*(ctx.as_ptr() as *const aya_ebpf::bindings::__sk_buff)).ifindex };
    let pkt = match parse(ctx.data(), ctx.data_end()) {
        Parsed::Ipv4(pkt) => pkt,
        Parsed::IcmpError4(err) => return tc_icmp_error(ctx, &w, &err, ifindex),
        Parsed::Pass(why) => return (TC_ACT_OK, why),
        Parsed::Drop(why) => return (TC_ACT_SHOT, why),
    };
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
                Forward::Fib => (tc_fib_forward(ctx, pkt.l3_off, ifindex), why),
            }
        }
    }
}

/// The TC twin of `xdp_icmp_error`: a backend's (or a router's) error goes to the client.
#[inline(always)]
fn tc_icmp_error(ctx: &TcContext, w: &TcWriter, err: &IcmpError4, ifindex: u32) -> (i32, u32) {
    let Some((to, forward)) = decide_icmp_error(err, Hook::Pod) else {
        return (TC_ACT_OK, reason::PASS_NOT_TCP_UDP);
    };
    if apply_icmp_error_nat(w, err, &to).is_err() {
        return (TC_ACT_SHOT, reason::DROP_TRUNCATED_L4);
    }
    match forward {
        Forward::Stack => (TC_ACT_OK, reason::FWD_ICMP_ERROR),
        Forward::Fib => (tc_fib_forward(ctx, err.l3_off, ifindex), reason::FWD_ICMP_ERROR),
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
fn tc_fib_forward(ctx: &TcContext, l3_off: usize, ingress: u32) -> i32 {
    let Some(mut params) = fib_params(ctx.data(), ctx.data_end(), l3_off, ingress) else {
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
    #[inline(always)]
    fn replace_ip_only(&self, l3_off: usize, off: usize, old: u32, new: u32) -> Result<(), Fault> {
        self.0.store(off, &new, 0).map_err(|_| Fault)?;
        self.0.l3_csum_replace(l3_off + 10, old as u64, new as u64, 4).map_err(|_| Fault)
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
