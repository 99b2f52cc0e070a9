//! Socket-level balancing for the node's own processes (cgroup v2 hooks): host-network pods,
//! node agents, and clients of the `kubernetes` ClusterIP. Nothing in the node's namespace
//! passes through the pod devices' TC hook, so these translate at the socket instead: the
//! destination once at connect (TCP, connected UDP) or per datagram at sendmsg (unconnected
//! UDP); replies and getpeername show the frontend again. Sockets of other network namespaces
//! (pods, other nodes sharing the machine) are left to the packet hooks, so nothing is
//! translated twice.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    maps::LruHashMap,
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use lb_common::*;

use crate::{
    family::Family,
    lb::{lookup_frontend, pick_backend, remember_affinity, state_clock},
    maps::{count_reason, LB4_SKRNAT_V1, LB6_SKRNAT_V1, LB_SOCK_CFG_V1, LB_SOCK_SKIP_V1},
};

/// The maps and bound addresses of each family, as the socket hooks use them.
trait SockFamily: Family {
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKeyV1<Self>, SockRevNatV1<Self>>;
    /// The address a socket is bound to.
    fn bound_addr(sk: &bpf_sock) -> Self;
}

impl SockFamily for Addr4 {
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNat4KeyV1, SockRevNat4V1> {
        &LB4_SKRNAT_V1
    }
    #[inline(always)]
    fn bound_addr(sk: &bpf_sock) -> u32 {
        sk.src_ip4
    }
}

impl SockFamily for Addr6 {
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNat6KeyV1, SockRevNat6V1> {
        &LB6_SKRNAT_V1
    }
    #[inline(always)]
    fn bound_addr(sk: &bpf_sock) -> [u32; 4] {
        [sk.src_ip6[0], sk.src_ip6[1], sk.src_ip6[2], sk.src_ip6[3]]
    }
}

/// How a hook reads and writes the address the application gave (connect, sendmsg) or is
/// shown (recvmsg, getpeername): in its own family, or the IPv4 address inside an
/// IPv4-mapped one (`::ffff:a.b.c.d`), which IPv6 sockets use to talk to IPv4 (Java's, by
/// default). The context's address words are read and written one at a time: the verifier
/// allows 4-byte accesses to them only.
trait UserAddr<A> {
    fn get(sa: &bpf_sock_addr) -> A;
    fn set(sa: &mut bpf_sock_addr, addr: A);
}

struct Ip4;
struct Ip6;
struct Ip4InIp6;

/// The third word of an IPv4-mapped IPv6 address, wire order.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
fn is_v4_mapped(ctx: &SockAddrContext) -> bool {
    let sa = unsafe { &*ctx.sock_addr };
    sa.user_ip6[0] == 0 && sa.user_ip6[1] == 0 && sa.user_ip6[2] == V4_MAPPED
}

impl UserAddr<Addr4> for Ip4 {
    #[inline(always)]
    fn get(sa: &bpf_sock_addr) -> u32 {
        sa.user_ip4
    }
    #[inline(always)]
    fn set(sa: &mut bpf_sock_addr, addr: u32) {
        sa.user_ip4 = addr;
    }
}

impl UserAddr<Addr6> for Ip6 {
    #[inline(always)]
    fn get(sa: &bpf_sock_addr) -> [u32; 4] {
        [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]]
    }
    #[inline(always)]
    fn set(sa: &mut bpf_sock_addr, addr: [u32; 4]) {
        sa.user_ip6[0] = addr[0];
        sa.user_ip6[1] = addr[1];
        sa.user_ip6[2] = addr[2];
        sa.user_ip6[3] = addr[3];
    }
}

impl UserAddr<Addr4> for Ip4InIp6 {
    #[inline(always)]
    fn get(sa: &bpf_sock_addr) -> u32 {
        sa.user_ip6[3]
    }
    #[inline(always)]
    fn set(sa: &mut bpf_sock_addr, addr: u32) {
        sa.user_ip6[3] = addr;
    }
}

/// The hook's verdicts: go on, or fail the call (with the errno set by `bpf_set_retval`).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EADDRINUSE: i32 = 98;

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    to_backend::<Addr4, Ip4>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend::<Addr4, Ip4>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend::<Addr4, Ip4>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend::<Addr4, Ip4>(&ctx)
}

#[cgroup_sock(post_bind4)]
pub fn lb_sock_post_bind4(ctx: SockContext) -> i32 {
    refuse_frontend_bind::<Addr4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_frontend6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    to_frontend6(&ctx)
}

/// An IPv6 socket's destination: IPv6, or IPv4 through an IPv4-mapped address.
#[inline(always)]
fn to_backend6(ctx: &SockAddrContext) -> i32 {
    if is_v4_mapped(ctx) { to_backend::<Addr4, Ip4InIp6>(ctx) } else { to_backend::<Addr6, Ip6>(ctx) }
}

#[inline(always)]
fn to_frontend6(ctx: &SockAddrContext) -> i32 {
    if is_v4_mapped(ctx) { to_frontend::<Addr4, Ip4InIp6>(ctx) } else { to_frontend::<Addr6, Ip6>(ctx) }
}

#[cgroup_sock(post_bind6)]
pub fn lb_sock_post_bind6(ctx: SockContext) -> i32 {
    refuse_frontend_bind::<Addr6>(&ctx)
}

/// The netns cookie when the socket belongs to the node's own network namespace and its
/// process has not opted out (a pod annotated to see real destinations).
#[inline(always)]
fn in_node_netns<C: EbpfContext>(ctx: &C) -> Option<u64> {
    let node = LB_SOCK_CFG_V1.get(0)?.netns_cookie;
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if node == 0 || cookie != node {
        return None;
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { LB_SOCK_SKIP_V1.get(&cgroup) }.is_some() {
        return None;
    }
    Some(cookie)
}

/// connect and sendmsg: a frontend destination becomes a backend, chosen as the packet path
/// chooses (affinity per network namespace, else Maglev), and the socket remembers the frontend.
#[inline(always)]
fn to_backend<A: SockFamily, V: UserAddr<A>>(ctx: &SockAddrContext) -> i32 {
    let Some(netns) = in_node_netns(ctx) else { return ALLOW };
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    // user_port holds the port in network order in its low 16 bits.
    let (frontend_addr, frontend_port) = (V::get(sa), sa.user_port as u16);
    let Some((_, svc)) = lookup_frontend(frontend_addr, frontend_port, proto) else { return ALLOW };
    if svc.maglev_size == 0 {
        // No ready endpoint: the call fails at once, as a connection refused would.
        count_reason(reason::REJECT_NO_BACKEND);
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return DENY;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let now = state_clock();
    // The socket cookie spreads the sockets of one namespace over the backends.
    let hash = flow_hash4(cookie as u32, (cookie >> 32) as u32, frontend_port, frontend_port, proto, 0);
    let affinity = AffinityKeyV1::netns(netns, svc.service_id);
    let (backend_id, be) = match pick_backend::<A>(&svc, &affinity, hash, now) {
        Ok(picked) => picked,
        Err(why) => {
            count_reason(why);
            return ALLOW;
        }
    };
    let key = SockRevNatKeyV1 { cookie, backend_addr: be.addr, backend_port: be.port, proto, ..Default::default() };
    let frontend = SockRevNatV1 { frontend_addr, frontend_port, _pad: 0 };
    if A::sock_revnat().insert(&key, &frontend, 0).is_err() {
        count_reason(reason::DROP_CT_FULL);
        return ALLOW;
    }
    remember_affinity(&svc, &affinity, backend_id, now);
    V::set(sa, be.addr);
    sa.user_port = be.port as u32;
    count_reason(reason::FWD_SOCKET);
    ALLOW
}

/// recvmsg and getpeername: a backend this socket was sent to shows as its frontend.
#[inline(always)]
fn to_frontend<A: SockFamily, V: UserAddr<A>>(ctx: &SockAddrContext) -> i32 {
    if in_node_netns(ctx).is_none() {
        return ALLOW;
    }
    let sa = unsafe { &mut *ctx.sock_addr };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKeyV1 { cookie, backend_addr: V::get(sa), backend_port: sa.user_port as u16, proto: sa.protocol as u8, ..Default::default() };
    if let Some(frontend) = unsafe { A::sock_revnat().get(&key) } {
        V::set(sa, frontend.frontend_addr);
        sa.user_port = frontend.frontend_port as u32;
    }
    ALLOW
}

/// bind: a NodePort, LoadBalancer or ExternalIP frontend's address and port belong to the
/// load balancer; a node process that binds them would never see its traffic.
#[inline(always)]
fn refuse_frontend_bind<A: SockFamily>(ctx: &SockContext) -> i32 {
    if in_node_netns(ctx).is_none() {
        return ALLOW;
    }
    let sk = unsafe { &*ctx.sock };
    let proto = sk.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    // src_port is in host order here.
    let port = port_raw(sk.src_port as u16);
    let bound = A::bound_addr(sk);
    let frontend = if bound.is_zero() {
        // A wildcard bind takes the port on every node address: the NodePort's.
        lookup_frontend(bound, port, proto).filter(|(key, _)| key.addr.is_zero())
    } else {
        lookup_frontend(bound, port, proto)
    };
    match frontend {
        Some((_, svc)) if svc.kind != KIND_CLUSTER_IP => {
            count_reason(reason::REJECT_SOCKET_BIND);
            unsafe { bpf_set_retval(-EADDRINUSE) };
            DENY
        }
        _ => ALLOW,
    }
}
