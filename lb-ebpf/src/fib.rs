//! Route lookups for rewritten packets, shared by both hooks.
use aya_ebpf::bindings::bpf_fib_lookup;
use network_types::ip::Ipv4Hdr;

use crate::parse::ptr_at;

pub const AF_INET: u8 = 2;
pub const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
pub const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// FIB lookup parameters for the packet as it now is (after the rewrite); its IPv4 header is at `l3_off`.
#[inline(always)]
pub fn fib_params(data: usize, data_end: usize, l3_off: usize, ifindex: u32) -> Option<bpf_fib_lookup> {
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, l3_off)?;
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
