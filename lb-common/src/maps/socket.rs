//! Socket-level balancing of the node's own processes (cgroup hooks): which network namespace
//! is the node's, and how to show each translated socket its frontend.
use super::{Addr4, Addr6, MapAddr};

/// Array with one `SockConfigV1`: written by the agent; the socket hooks translate only
/// sockets of the namespace it names.
pub const MAP_SOCK_CONFIG: &str = "LB_SOCK_CFG_V1";
/// Hash `cgroup id -> u8`: cgroups whose processes the socket hooks leave alone (pods that
/// asked to see real destinations, and their containers).
pub const MAP_SOCK_SKIP: &str = "LB_SOCK_SKIP_V1";
/// LRU hash `SockRevNat4KeyV1 -> SockRevNat4V1`: for a socket sent to a backend, the frontend
/// its application asked for (getpeername, and the source of unconnected UDP replies).
pub const MAP_SOCK_REVNAT: &str = "LB4_SKRNAT_V1";
/// The same for IPv6 sockets: `SockRevNat6KeyV1 -> SockRevNat6V1`.
pub const MAP_SOCK_REVNAT6: &str = "LB6_SKRNAT_V1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfigV1 {
    /// The node's network-namespace cookie; 0 until the agent writes it (nothing is translated).
    pub netns_cookie: u64,
}

/// A socket (by cookie, so that two sockets never mix) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKeyV1<A: MapAddr> {
    pub cookie: u64,
    pub backend_addr: A,
    pub backend_port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _tail: A::TailPad,
}

pub type SockRevNat4KeyV1 = SockRevNatKeyV1<Addr4>;
pub type SockRevNat6KeyV1 = SockRevNatKeyV1<Addr6>;

/// The frontend the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatV1<A: MapAddr> {
    pub frontend_addr: A,
    pub frontend_port: u16,
    pub _pad: u16,
}

pub type SockRevNat4V1 = SockRevNatV1<Addr4>;
pub type SockRevNat6V1 = SockRevNatV1<Addr6>;

#[cfg(feature = "user")]
super::impl_pod!(SockConfigV1);
#[cfg(feature = "user")]
super::impl_pod!(generic SockRevNatKeyV1, SockRevNatV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn sock_config() {
        assert_layout!(SockConfigV1, size 8, align 8, { netns_cookie @ 0 });
    }

    #[test]
    fn sock_revnat_key() {
        assert_layout!(SockRevNat4KeyV1, size 16, align 8, { cookie @ 0, backend_addr @ 8, backend_port @ 12, proto @ 14, _pad @ 15, _tail @ 16 });
        assert_layout!(SockRevNat6KeyV1, size 32, align 8, { cookie @ 0, backend_addr @ 8, backend_port @ 24, proto @ 26, _pad @ 27, _tail @ 28 });
    }

    #[test]
    fn sock_revnat() {
        assert_layout!(SockRevNat4V1, size 8, align 4, { frontend_addr @ 0, frontend_port @ 4, _pad @ 6 });
        assert_layout!(SockRevNat6V1, size 20, align 4, { frontend_addr @ 0, frontend_port @ 16, _pad @ 18 });
    }
}
