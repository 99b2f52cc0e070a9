//! Backends, and the one flat slot array that holds every service's Maglev table.
use super::{Addr4, Addr6, MapAddr};

/// Array `backend id -> Backend4V1`.
pub const MAP_BACKENDS: &str = "LB4_BE_V1";
/// Array `backend id -> Backend6V1`. Backend ids share one space with the IPv4 ones (one
/// Maglev slot array and one counter array serve both); an id is set in one of the two.
pub const MAP_BACKENDS6: &str = "LB6_BE_V1";
/// Array `slot / 2 -> [backend id; 2]`: every service's Maglev table is one slice of its
/// slots, two to an element (the kernel stores every array element in 8 bytes; one 4-byte slot
/// an element would waste half). Mapped, the slots are one plain `u32` array.
pub const MAP_MAGLEV: &str = "LB_MAGLEV_V2";
/// Schema v1's slot array, one slot an element: an agent finding it pinned carries its tables
/// over into `LB_MAGLEV_V2` and removes it.
pub const MAP_MAGLEV_V1: &str = "LB_MAGLEV_V1";

/// Two consecutive Maglev slots, one element of `LB_MAGLEV_V2`.
pub type MaglevSlotPair = [u32; MAGLEV_SLOTS_PER_ENTRY];
pub const MAGLEV_SLOTS_PER_ENTRY: usize = 2;

/// One endpoint address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendV1<A: MapAddr> {
    pub addr: A,
    pub port: u16,
    /// `F_BACKEND_*`.
    pub flags: u8,
    pub _pad: u8,
}

pub type Backend4V1 = BackendV1<Addr4>;
pub type Backend6V1 = BackendV1<Addr6>;

#[cfg(feature = "user")]
super::impl_pod!(generic BackendV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn backend() {
        assert_layout!(Backend4V1, size 8, align 4, { addr @ 0, port @ 4, flags @ 6, _pad @ 7 });
        assert_layout!(Backend6V1, size 20, align 4, { addr @ 0, port @ 16, flags @ 18, _pad @ 19 });
    }
}
