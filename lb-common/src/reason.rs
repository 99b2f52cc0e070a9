//! Verdict reasons: every packet the programs see is counted under exactly one of these in
//! `LB_REASON_V1`. `PASS_*` leave the packet untouched, `FWD_*` rewrote it, `DROP_*` and
//! `REJECT_*` end it.

pub const PASS_NOT_IP: u32 = 0;
pub const PASS_NOT_SERVICE: u32 = 1;
/// No longer counted since IPv6 is balanced; the number stays so that no other reason moves.
pub const PASS_IPV6: u32 = 2;
pub const PASS_NOT_TCP_UDP: u32 = 3;
pub const PASS_FRAGMENT: u32 = 4;
pub const DROP_TRUNCATED_ETH: u32 = 5;
pub const DROP_TRUNCATED_VLAN: u32 = 6;
pub const DROP_TRUNCATED_IP4: u32 = 7;
pub const DROP_MALFORMED_IP4: u32 = 8;
pub const DROP_TRUNCATED_IP6: u32 = 9;
pub const DROP_TRUNCATED_L4: u32 = 10;
pub const DROP_SERVICE_FRAGMENT: u32 = 11;
pub const FWD_LOCAL_BACKEND: u32 = 12;
pub const FWD_REMOTE_BACKEND: u32 = 13;
pub const FWD_REVERSE_NAT: u32 = 14;
pub const REJECT_NO_BACKEND: u32 = 15;
pub const DROP_CT_FULL: u32 = 16;
pub const DROP_NAT_PORTS_EXHAUSTED: u32 = 17;
pub const DROP_FIB_LOOKUP: u32 = 18;
pub const DROP_BACKEND_MISSING: u32 = 19;
/// externalTrafficPolicy: Local and this node has no endpoint of the Service.
pub const DROP_NO_LOCAL_BACKEND: u32 = 20;
/// The client is outside the Service's loadBalancerSourceRanges.
pub const DROP_SOURCE_RANGE: u32 = 21;
/// An ICMP error about a translated flow, rewritten back to the frontend and the client.
pub const FWD_ICMP_ERROR: u32 = 22;
/// A pod reached its own Service and landed on itself: source rewritten to `HAIRPIN_ADDR`.
pub const FWD_HAIRPIN: u32 = 23;

/// A node process's socket was sent to a backend at connect (or, for unconnected UDP, at
/// sendmsg): counted once per socket or datagram, not per packet.
pub const FWD_SOCKET: u32 = 24;
/// A node process tried to bind a NodePort, LoadBalancer or ExternalIP frontend's port.
pub const REJECT_SOCKET_BIND: u32 = 25;

/// An IPv6 packet with more extension headers than are walked (eight), or longer ones than are
/// read (`MAX_HEADER_OFF`), left to the stack.
pub const PASS_IPV6_LONG_CHAIN: u32 = 26;
/// A new IPv6 flow must be source-NATed (a remote backend of an outside client) and the node
/// has no IPv6 address to do it with.
pub const DROP_NO_SNAT_ADDR: u32 = 27;

/// An ARP request or IPv6 neighbour solicitation for a load-balancer address this node
/// announces, answered from XDP.
pub const FWD_L2_ANSWER: u32 = 28;
/// A pod's NetworkPolicy does not allow the packet (its ingress or its egress).
pub const DROP_POLICY: u32 = 29;

/// Number of reasons (at most `REASON_SLOTS`).
pub const COUNT: u32 = 30;

/// The reasons whose packet is dropped or answered with a refusal (a flow event of kind
/// drop), one bit each.
pub const DROPS: u64 = (1 << DROP_TRUNCATED_ETH)
    | (1 << DROP_TRUNCATED_VLAN)
    | (1 << DROP_TRUNCATED_IP4)
    | (1 << DROP_MALFORMED_IP4)
    | (1 << DROP_TRUNCATED_IP6)
    | (1 << DROP_TRUNCATED_L4)
    | (1 << DROP_SERVICE_FRAGMENT)
    | (1 << REJECT_NO_BACKEND)
    | (1 << DROP_CT_FULL)
    | (1 << DROP_NAT_PORTS_EXHAUSTED)
    | (1 << DROP_FIB_LOOKUP)
    | (1 << DROP_BACKEND_MISSING)
    | (1 << DROP_NO_LOCAL_BACKEND)
    | (1 << DROP_SOURCE_RANGE)
    | (1 << REJECT_SOCKET_BIND)
    | (1 << DROP_NO_SNAT_ADDR)
    | (1 << DROP_POLICY);

/// Whether packets of `reason` are dropped or refused.
#[inline(always)]
pub const fn is_drop(reason: u32) -> bool {
    reason < 64 && DROPS >> reason & 1 == 1
}

/// Stable names for metrics and `lbctl stats`, indexed by reason.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ip",
    "pass_not_service",
    "pass_ipv6",
    "pass_not_tcp_udp",
    "pass_fragment",
    "drop_truncated_eth",
    "drop_truncated_vlan",
    "drop_truncated_ip4",
    "drop_malformed_ip4",
    "drop_truncated_ip6",
    "drop_truncated_l4",
    "drop_service_fragment",
    "fwd_local_backend",
    "fwd_remote_backend",
    "fwd_reverse_nat",
    "reject_no_backend",
    "drop_ct_full",
    "drop_nat_ports_exhausted",
    "drop_fib_lookup",
    "drop_backend_missing",
    "drop_no_local_backend",
    "drop_source_range",
    "fwd_icmp_error",
    "fwd_hairpin",
    "fwd_socket",
    "reject_socket_bind",
    "pass_ipv6_long_chain",
    "drop_no_snat_addr",
    "fwd_l2_answer",
    "drop_policy",
];
