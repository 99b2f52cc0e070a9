//! Map names and the keys and values they hold, split by domain. Each map's one-line doc says
//! what it is for; each type's layout test sits beside it.
//!
//! - [`family`]: the address families every address-holding type is generic over;
//! - [`service`]: frontends, their display names and options;
//! - [`affinity`]: sessionAffinity state;
//! - [`source_range`]: loadBalancerSourceRanges;
//! - [`backend`]: backends and the shared Maglev slot array;
//! - [`conntrack`]: tracked flows and reverse NAT;
//! - [`nexthop`]: next hops of packets routed here (towards backends per CPU, replies by route key);
//! - [`counters`]: traffic and verdict counters;
//! - [`config`]: settings and node addresses the agent gives the datapath;
//! - [`socket`]: socket-level balancing of the node's own processes;
//! - [`l2`]: the load-balancer addresses this node answers ARP and NDP for;
//! - [`endpoint`]: the pods the CNI plugin wired on this node;
//! - [`policy`]: NetworkPolicy identities, isolation and allow rules.
pub mod affinity;
pub mod backend;
pub mod config;
pub mod conntrack;
pub mod counters;
pub mod endpoint;
pub mod events;
pub mod family;
pub mod l2;
pub mod nexthop;
pub mod policy;
pub mod service;
pub mod socket;
pub mod source_range;

pub use affinity::*;
pub use backend::*;
pub use config::*;
pub use conntrack::*;
pub use counters::*;
pub use endpoint::*;
pub use events::*;
pub use family::*;
pub use l2::*;
pub use nexthop::*;
pub use policy::*;
pub use service::*;
pub use socket::*;
pub use source_range::*;

/// Every pinned map of schema v1.
pub const ALL_MAPS: [&str; 54] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_CONNTRACK,
    MAP_REVERSE_NAT,
    MAP_SERVICE_STATS,
    MAP_BACKEND_STATS,
    MAP_REASONS,
    MAP_CONFIG,
    MAP_NODE_IPS,
    MAP_SERVICE_NAMES,
    MAP_SERVICE_OPTS,
    MAP_AFFINITY,
    MAP_AFFINITY_MATCH,
    MAP_SOURCE_RANGES,
    MAP_SOCK_CONFIG,
    MAP_SOCK_REVNAT,
    MAP_SOCK_SKIP,
    MAP_SERVICES6,
    MAP_BACKENDS6,
    MAP_CONNTRACK6,
    MAP_REVERSE_NAT6,
    MAP_NODE_IPS6,
    MAP_CONFIG6,
    MAP_SOURCE_RANGES6,
    MAP_SOCK_REVNAT6,
    MAP_L2_ANNOUNCE,
    MAP_L2_ANNOUNCE6,
    MAP_ENDPOINTS,
    MAP_ENDPOINTS6,
    MAP_IPCACHE,
    MAP_IPCACHE6,
    MAP_POLICY_ENDPOINTS,
    MAP_POLICY_ENDPOINTS6,
    MAP_POLICY,
    MAP_POLICY_FLOWS,
    MAP_POLICY_FLOWS6,
    MAP_POLICY_STATS,
    MAP_POLICY_DENIED,
    MAP_IPCACHE_HOSTS,
    MAP_IPCACHE_HOSTS6,
    MAP_POLICY_EXACT,
    MAP_EVENTS,
    MAP_EVENT_CONFIG,
    MAP_EVENT_BUCKET,
    MAP_EVENT_STATS,
    MAP_REPLY_FILTER,
    MAP_NEXT_HOPS,
    MAP_NEXT_HOPS6,
    MAP_NEXT_HOP_GENERATION,
    MAP_NODEPORT_FILTER,
    MAP_LOCAL_BACKENDS,
    MAP_FRONTEND_FILTER,
    MAP_SERVICE_BY_ID,
];

/// The longest start of `text` that fits `max` bytes and ends on a character boundary: how
/// names are cut to fit a fixed-size field.
pub fn cut_to(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Marks map types as plain old data for aya (user space only).
#[cfg(feature = "user")]
macro_rules! impl_pod {
    (generic $($ty:ident),* $(,)?) => {
        // SAFETY: as below, for either address family (both are plain words).
        $( unsafe impl<A: super::MapAddr + aya::Pod> aya::Pod for $ty<A> {} )*
    };
    ($($ty:ty),* $(,)?) => {
        // SAFETY: every map type is repr(C) with explicit padding and no invalid bit patterns.
        $( unsafe impl aya::Pod for $ty {} )*
    };
}
#[cfg(feature = "user")]
pub(crate) use impl_pod;

/// Size, alignment and field offsets of a shared type: a failing assert means a kernel/user mismatch.
#[cfg(test)]
macro_rules! assert_layout {
    ($ty:ty, size $size:expr, align $align:expr, { $($field:ident @ $off:expr),* $(,)? }) => {{
        use core::mem::{align_of, offset_of, size_of};
        assert_eq!(size_of::<$ty>(), $size, concat!("size of ", stringify!($ty)));
        assert_eq!(align_of::<$ty>(), $align, concat!("align of ", stringify!($ty)));
        $( assert_eq!(offset_of!($ty, $field), $off, concat!(stringify!($ty), ".", stringify!($field))); )*
    }};
}
#[cfg(test)]
pub(crate) use assert_layout;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL; a longer name is cut and pins would not match.
        for name in ALL_MAPS {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn reason_names_cover_every_reason() {
        assert_eq!(crate::reason::NAMES.len(), crate::reason::COUNT as usize);
        assert!(crate::reason::COUNT <= crate::REASON_SLOTS);
        for (i, a) in crate::reason::NAMES.iter().enumerate() {
            for b in &crate::reason::NAMES[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
