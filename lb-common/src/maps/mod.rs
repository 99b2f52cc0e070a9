//! Map names and the keys and values they hold. Each map's one-line doc says what it is for.

/// Hash `Service4KeyV1 -> Service4V1`: one entry per frontend (address, port, protocol).
pub const MAP_SERVICES: &str = "LB4_SVC_V1";
/// Array `backend id -> Backend4V1`.
pub const MAP_BACKENDS: &str = "LB4_BE_V1";
/// Array `slot -> backend id`: every service's Maglev table is one slice of this array.
pub const MAP_MAGLEV: &str = "LB_MAGLEV_V1";
/// Hash `Ct4KeyV1 (client -> frontend) -> Ct4EntryV1`: keeps a flow on its backend.
pub const MAP_CONNTRACK: &str = "LB4_CT_V1";
/// Hash `Ct4KeyV1 (reply as seen on the wire) -> RevNat4V1`: how to rewrite replies; its
/// SNAT entries also reserve the node ports handed out.
pub const MAP_REVERSE_NAT: &str = "LB4_RNAT_V1";
/// Per-CPU array `service id -> TrafficCountersV1`.
pub const MAP_SERVICE_STATS: &str = "LB_SVC_STAT_V1";
/// Per-CPU array `backend id -> TrafficCountersV1`.
pub const MAP_BACKEND_STATS: &str = "LB_BE_STAT_V1";
/// Per-CPU array `reason -> packets`: every verdict, counted by why (see [`crate::reason`]).
pub const MAP_REASONS: &str = "LB_REASON_V1";
/// Array with one `ConfigV1`: settings the agent gives the datapath.
pub const MAP_CONFIG: &str = "LB_CONFIG_V1";
/// Hash `raw IPv4 -> ifindex`: this node's own addresses, where NodePorts answer.
pub const MAP_NODE_IPS: &str = "LB4_NODEIP_V1";
/// Array `service id -> NameV1`: written by the agent so `lbctl` can print names with the agent down.
pub const MAP_SERVICE_NAMES: &str = "LB_SVC_NAME_V1";

/// Every pinned map of schema v1.
pub const ALL_MAPS: [&str; 11] = [
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
];

/// A frontend: where clients send. A NodePort frontend has `addr == 0` and matches every
/// address in `LB4_NODEIP_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service4KeyV1 {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    /// `SCOPE_CLUSTER` today; room for traffic-policy Local without a layout change.
    pub scope: u8,
}

/// What a frontend balances to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service4V1 {
    /// Index into the per-service arrays (`LB_SVC_STAT_V1`, `LB_SVC_NAME_V1`).
    pub service_id: u32,
    /// First slot of this service's Maglev table in `LB_MAGLEV_V1`.
    pub maglev_offset: u32,
    /// Length of the table (a Maglev prime), or 0 when no endpoint is ready: new flows are rejected.
    pub maglev_size: u32,
    pub backend_count: u16,
    /// `KIND_*`.
    pub kind: u8,
    pub _pad: u8,
}

/// One endpoint address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend4V1 {
    pub addr: u32,
    pub port: u16,
    /// `F_BACKEND_*`.
    pub flags: u8,
    pub _pad: u8,
}

/// A flow's 5-tuple, as seen on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct4KeyV1 {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl Ct4KeyV1 {
    /// The reply of this flow (client -> frontend) once sent to `backend`, as it arrives:
    /// backend -> client. A source-NATed flow's reply goes to the SNAT binding instead; the
    /// caller sets `dst_addr` and `dst_port`. Kernel and agent build reply keys only here.
    #[inline(always)]
    pub const fn reply_from(&self, backend: &Backend4V1) -> Ct4KeyV1 {
        Ct4KeyV1 { src_addr: backend.addr, dst_addr: self.src_addr, src_port: backend.port, dst_port: self.src_port, proto: self.proto, _pad: [0; 3] }
    }
}

/// A tracked flow, keyed by its original direction (client -> frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4EntryV1 {
    /// `bpf_ktime_get_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub service_id: u32,
    /// Source address and port after SNAT (when `F_CT_SNAT`).
    pub nat_addr: u32,
    pub nat_port: u16,
    /// TCP flags seen in this direction, ORed.
    pub tcp_flags_seen: u8,
    /// `F_CT_*`.
    pub flags: u8,
}

/// How to rewrite a reply, keyed by the reply's tuple as it arrives (backend -> client or node).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat4V1 {
    /// `bpf_ktime_get_ns` of the last reply.
    pub last_seen_ns: u64,
    /// The reply leaves with this source (the frontend) ...
    pub src_addr: u32,
    /// ... and this destination (the client).
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub service_id: u32,
    /// TCP flags seen in the reply direction, ORed.
    pub tcp_flags_seen: u8,
    /// `F_CT_*`.
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// Packet and byte counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCountersV1 {
    pub packets: u64,
    pub bytes: u64,
}

/// Settings the datapath reads on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigV1 {
    /// Seed of `flow_hash4`.
    pub hash_seed: u32,
    /// Source address for SNAT to remote backends (this node's primary address, raw).
    pub snat_addr: u32,
    /// SNAT port range, inclusive, host order.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub _pad: u32,
}

/// A service's display name, `namespace/name:port/proto`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameV1 {
    pub len: u16,
    pub _pad: [u8; 6],
    pub bytes: [u8; crate::NAME_LEN],
}

impl Default for NameV1 {
    fn default() -> Self {
        Self { len: 0, _pad: [0; 6], bytes: [0; crate::NAME_LEN] }
    }
}

impl NameV1 {
    /// Truncates to `NAME_LEN` bytes at a character boundary.
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(crate::NAME_LEN);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut out = Self { len: end as u16, ..Self::default() };
        out.bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        out
    }

    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(crate::NAME_LEN);
        core::str::from_utf8(&self.bytes[..len]).unwrap_or("<invalid utf-8>")
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C) with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for Service4KeyV1 {}
    unsafe impl aya::Pod for Service4V1 {}
    unsafe impl aya::Pod for Backend4V1 {}
    unsafe impl aya::Pod for Ct4KeyV1 {}
    unsafe impl aya::Pod for Ct4EntryV1 {}
    unsafe impl aya::Pod for RevNat4V1 {}
    unsafe impl aya::Pod for TrafficCountersV1 {}
    unsafe impl aya::Pod for ConfigV1 {}
    unsafe impl aya::Pod for NameV1 {}
}

/// Layout guards: a failing assert here means a kernel/user mismatch.
#[cfg(test)]
mod layout {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    macro_rules! assert_layout {
        ($ty:ty, size $size:expr, align $align:expr, { $($field:ident @ $off:expr),* $(,)? }) => {{
            assert_eq!(size_of::<$ty>(), $size, concat!("size of ", stringify!($ty)));
            assert_eq!(align_of::<$ty>(), $align, concat!("align of ", stringify!($ty)));
            $( assert_eq!(offset_of!($ty, $field), $off, concat!(stringify!($ty), ".", stringify!($field))); )*
        }};
    }

    #[test]
    fn service_key() {
        assert_layout!(Service4KeyV1, size 8, align 4, { addr @ 0, port @ 4, proto @ 6, scope @ 7 });
    }

    #[test]
    fn service() {
        assert_layout!(Service4V1, size 16, align 4, {
            service_id @ 0, maglev_offset @ 4, maglev_size @ 8, backend_count @ 12, kind @ 14, _pad @ 15,
        });
    }

    #[test]
    fn backend() {
        assert_layout!(Backend4V1, size 8, align 4, { addr @ 0, port @ 4, flags @ 6, _pad @ 7 });
    }

    #[test]
    fn ct_key() {
        assert_layout!(Ct4KeyV1, size 16, align 4, {
            src_addr @ 0, dst_addr @ 4, src_port @ 8, dst_port @ 10, proto @ 12, _pad @ 13,
        });
    }

    #[test]
    fn ct_entry() {
        assert_layout!(Ct4EntryV1, size 24, align 8, {
            last_seen_ns @ 0, backend_id @ 8, service_id @ 12, nat_addr @ 16, nat_port @ 20,
            tcp_flags_seen @ 22, flags @ 23,
        });
    }

    #[test]
    fn reverse_nat() {
        assert_layout!(RevNat4V1, size 32, align 8, {
            last_seen_ns @ 0, src_addr @ 8, dst_addr @ 12, src_port @ 16, dst_port @ 18,
            service_id @ 20, tcp_flags_seen @ 24, flags @ 25, _pad @ 26,
        });
    }

    #[test]
    fn counters() {
        assert_layout!(TrafficCountersV1, size 16, align 8, { packets @ 0, bytes @ 8 });
    }

    #[test]
    fn config() {
        assert_layout!(ConfigV1, size 16, align 4, {
            hash_seed @ 0, snat_addr @ 4, nat_port_min @ 8, nat_port_max @ 10, _pad @ 12,
        });
    }

    #[test]
    fn name() {
        assert_layout!(NameV1, size 128, align 2, { len @ 0, _pad @ 2, bytes @ 8 });
    }

    #[test]
    fn name_round_trips_and_truncates_on_char_boundary() {
        assert_eq!(NameV1::new("default/web:80/TCP").as_str(), "default/web:80/TCP");
        let long = "é".repeat(100); // 200 bytes
        let n = NameV1::new(&long);
        assert_eq!(n.len, 120);
        assert_eq!(n.as_str().chars().count(), 60);
    }

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
        for (i, a) in crate::reason::NAMES.iter().enumerate() {
            for b in &crate::reason::NAMES[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
