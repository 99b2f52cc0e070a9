//! Backends, and the one flat slot array that holds every service's Maglev table.

/// Array `backend id -> Backend4V1`.
pub const MAP_BACKENDS: &str = "LB4_BE_V1";
/// Array `slot -> backend id`: every service's Maglev table is one slice of this array.
pub const MAP_MAGLEV: &str = "LB_MAGLEV_V1";

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

#[cfg(feature = "user")]
super::impl_pod!(Backend4V1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn backend() {
        assert_layout!(Backend4V1, size 8, align 4, { addr @ 0, port @ 4, flags @ 6, _pad @ 7 });
    }
}
