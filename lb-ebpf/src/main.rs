//! The load balancer's kernel programs: one object, one file per attach point.
//! - [`xdp`]: `lb_xdp` on external devices (north-south: NodePort, LoadBalancer, ExternalIP),
//!   ARP and NDP answers for announced addresses ([`l2`]), and `lb_xdp_pass` (benchmark
//!   floor, veth peers);
//! - [`tc`]: `lb_tc` on the host side of every pod's device (pod to ClusterIP, replies, the
//!   pod's egress policy) and `lb_tc_to_pod` on its way out to the pod (the pod's ingress
//!   policy, [`policy`]);
//! - [`sock`]: cgroup socket hooks (`lb_sock_*`) for the node's own processes.
//!
//! Each hook reads top to bottom: parse ([`parse`]), decide ([`lb::decide`], shared), apply
//! ([`rewrite`], [`fib`]), count the reason ([`maps`]). IPv4 and IPv6 share all of it: what
//! differs between them is in [`family`].
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no `Atomic*::fetch_add`, but the kernel has the instruction.
#![allow(internal_features)]
#![feature(core_intrinsics, adt_const_params)]

mod csum;
mod events;
mod family;
mod fib;
mod l2;
mod lb;
mod maps;
mod parse;
mod policy;
mod rewrite;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
