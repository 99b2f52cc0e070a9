//! Route lookups for rewritten packets, shared by both hooks and both families.
use aya_ebpf::bindings::{bpf_fib_lookup, bpf_redir_neigh};

use crate::family::Family;

pub const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
pub const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// FIB lookup parameters for a packet as it now is (after the rewrite): its datagram starts at
/// `l3_off`, goes from `src` to `dst`, and arrived on `ifindex`.
#[inline(always)]
pub fn fib_params<A: Family>(data: usize, data_end: usize, l3_off: usize, proto: u8, src: A, dst: A, ifindex: u32) -> Option<bpf_fib_lookup> {
    let tot_len = A::datagram_len(data, data_end, l3_off)?;
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = A::AF;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = tot_len as u16;
    p.ifindex = ifindex;
    A::set_fib_addrs(&mut p, src, dst);
    Some(p)
}

/// The next hop the FIB named, for `bpf_redirect_neigh` to resolve.
#[inline(always)]
pub fn next_hop<A: Family>(p: &bpf_fib_lookup) -> bpf_redir_neigh {
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = A::AF as u32;
    A::set_next_hop(&mut nh, p);
    nh
}
