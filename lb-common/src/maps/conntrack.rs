//! Tracked flows and how to rewrite their replies.
use super::{Addr4, Addr6, BackendV1, MapAddr};

/// Hash `Ct4KeyV1 (client -> frontend) -> Ct4EntryV1`: keeps a flow on its backend.
pub const MAP_CONNTRACK: &str = "LB4_CT_V1";
/// Hash `Ct4KeyV1 (reply as seen on the wire) -> RevNat4V1`: how to rewrite replies; its
/// SNAT entries also reserve the node ports handed out.
pub const MAP_REVERSE_NAT: &str = "LB4_RNAT_V1";
/// The IPv6 twins: `Ct6KeyV1 -> Ct6EntryV1` and `Ct6KeyV1 -> RevNat6V1`.
pub const MAP_CONNTRACK6: &str = "LB6_CT_V1";
pub const MAP_REVERSE_NAT6: &str = "LB6_RNAT_V1";
/// Array `u32 -> u8`, `REPLY_FILTER_SLOTS` of them: 1 at `reply_filter_slot(addr)` for every
/// address that replies of remote-backend flows are sent to without SNAT (pods of this node
/// that reached a remote backend), both families. From outside, a packet to neither such an
/// address nor the SNAT address on a NAT port cannot be a reply, and skips the reverse-NAT
/// lookup. Slots are never cleared: a stale one only costs that lookup; a missing one would
/// lose replies.
pub const MAP_REPLY_FILTER: &str = "LB_REPLYDST_V1";
/// A few hundred marked pods leave most of 16,384 slots clear (128 KiB: array values take 8 bytes).
pub const REPLY_FILTER_SLOTS: u32 = 1 << 14;
/// Array `u32 -> u8` of the same slots: 1 at `reply_filter_slot(addr)` for every local backend
/// (both families), which only the agent writes. From a pod, only a packet from a local
/// backend can be a reply of a translated flow; any other skips the reverse-NAT lookup.
pub const MAP_LOCAL_BACKENDS: &str = "LB_LOCALBE_V1";

/// The reply-filter slot of an address (its words folded, then a multiplicative hash).
/// Shared by the kernel, which sets and reads it, and the agent, which fills it from
/// reverse-NAT entries written before the filter existed.
#[inline(always)]
pub fn reply_filter_slot<A: MapAddr>(addr: &A) -> u32 {
    let folded = addr.words().iter().fold(0u32, |acc, w| acc ^ w);
    folded.wrapping_mul(0x9E37_79B1) >> 18
}

/// A flow's 5-tuple, as seen on the wire in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKeyV1<A: MapAddr> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

pub type Ct4KeyV1 = CtKeyV1<Addr4>;
pub type Ct6KeyV1 = CtKeyV1<Addr6>;

impl<A: MapAddr> CtKeyV1<A> {
    /// The reply of this flow (client -> frontend) once sent to `backend`, as it arrives:
    /// backend -> client. A source-NATed flow's reply goes to the SNAT binding instead; the
    /// caller sets `dst_addr` and `dst_port`. Kernel and agent build reply keys only here.
    #[inline(always)]
    pub const fn reply_from(&self, backend: &BackendV1<A>) -> Self {
        Self { src_addr: backend.addr, dst_addr: self.src_addr, src_port: backend.port, dst_port: self.src_port, proto: self.proto, _pad: [0; 3] }
    }

    /// The same flow seen from the other end.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self { src_addr: self.dst_addr, dst_addr: self.src_addr, src_port: self.dst_port, dst_port: self.src_port, proto: self.proto, _pad: [0; 3] }
    }
}

/// A tracked flow, keyed by its original direction (client -> frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntryV1<A: MapAddr> {
    /// `bpf_ktime_get_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub service_id: u32,
    /// Source address and port after SNAT (when `F_CT_SNAT`).
    pub nat_addr: A,
    pub nat_port: u16,
    /// TCP flags seen in this direction, ORed.
    pub tcp_flags_seen: u8,
    /// `F_CT_*`.
    pub flags: u8,
    pub _pad: A::TailPad,
}

pub type Ct4EntryV1 = CtEntryV1<Addr4>;
pub type Ct6EntryV1 = CtEntryV1<Addr6>;

/// How to rewrite a reply, keyed by the reply's tuple as it arrives (backend -> client or node).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatV1<A: MapAddr> {
    /// `bpf_ktime_get_ns` of the last reply.
    pub last_seen_ns: u64,
    /// The reply leaves with this source (the frontend) ...
    pub src_addr: A,
    /// ... and this destination (the client).
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub service_id: u32,
    /// TCP flags seen in the reply direction, ORed.
    pub tcp_flags_seen: u8,
    /// `F_CT_*`.
    pub flags: u8,
    pub _pad: [u8; 6],
}

pub type RevNat4V1 = RevNatV1<Addr4>;
pub type RevNat6V1 = RevNatV1<Addr6>;

#[cfg(feature = "user")]
super::impl_pod!(generic CtKeyV1, CtEntryV1, RevNatV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn ct_key() {
        assert_layout!(Ct4KeyV1, size 16, align 4, {
            src_addr @ 0, dst_addr @ 4, src_port @ 8, dst_port @ 10, proto @ 12, _pad @ 13,
        });
        assert_layout!(Ct6KeyV1, size 40, align 4, {
            src_addr @ 0, dst_addr @ 16, src_port @ 32, dst_port @ 34, proto @ 36, _pad @ 37,
        });
    }

    #[test]
    fn ct_entry() {
        assert_layout!(Ct4EntryV1, size 24, align 8, {
            last_seen_ns @ 0, backend_id @ 8, service_id @ 12, nat_addr @ 16, nat_port @ 20,
            tcp_flags_seen @ 22, flags @ 23, _pad @ 24,
        });
        assert_layout!(Ct6EntryV1, size 40, align 8, {
            last_seen_ns @ 0, backend_id @ 8, service_id @ 12, nat_addr @ 16, nat_port @ 32,
            tcp_flags_seen @ 34, flags @ 35, _pad @ 36,
        });
    }

    #[test]
    fn reply_filter_slots_are_in_range_and_fixed() {
        // Kernel and agent compute slots on their own: a change here must be a new map version.
        let v4 = crate::ip4_raw([10, 99, 0, 1]);
        let v6 = crate::ip6_raw([0xfd, 0, 0, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let (s4, s6) = (reply_filter_slot(&v4), reply_filter_slot(&v6));
        assert!(s4 < REPLY_FILTER_SLOTS && s6 < REPLY_FILTER_SLOTS);
        let folded4 = u32::from_ne_bytes([10, 99, 0, 1]);
        assert_eq!(s4, folded4.wrapping_mul(0x9E37_79B1) >> 18);
        assert_ne!(s4, reply_filter_slot(&crate::ip4_raw([10, 99, 0, 2])), "neighbouring addresses spread");
    }

    #[test]
    fn reverse_nat() {
        assert_layout!(RevNat4V1, size 32, align 8, {
            last_seen_ns @ 0, src_addr @ 8, dst_addr @ 12, src_port @ 16, dst_port @ 18,
            service_id @ 20, tcp_flags_seen @ 24, flags @ 25, _pad @ 26,
        });
        assert_layout!(RevNat6V1, size 56, align 8, {
            last_seen_ns @ 0, src_addr @ 8, dst_addr @ 24, src_port @ 40, dst_port @ 42,
            service_id @ 44, tcp_flags_seen @ 48, flags @ 49, _pad @ 50,
        });
    }
}
