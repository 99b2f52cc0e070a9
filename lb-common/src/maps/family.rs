//! The two address families. Every map key and value that holds an address is generic over
//! it, so IPv4 and IPv6 share one definition (and the code that reads them, one implementation);
//! `*4*` and `*6*` names are the two instances.

/// An address as the maps hold it, in network byte order: IPv4 in one `u32`, IPv6 in four.
pub trait MapAddr: Copy + Default + Eq + Ord + core::hash::Hash + core::fmt::Debug {
    /// Explicit padding after an address and 4 more bytes, to the next 8-byte boundary (none
    /// for IPv4): it ends conntrack entries and socket keys, so that no byte of a map key or
    /// value is left undefined.
    type TailPad: Copy + Default + Eq + core::fmt::Debug;
    /// The address as 32-bit words in wire order: what the flow hash and checksum updates walk.
    fn words(&self) -> &[u32];
    /// The zero address: a NodePort frontend's, an unset backend's.
    #[inline(always)]
    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

pub type Addr4 = u32;
pub type Addr6 = [u32; 4];

impl MapAddr for Addr4 {
    type TailPad = [u8; 0];
    #[inline(always)]
    fn words(&self) -> &[u32] {
        core::slice::from_ref(self)
    }
}

impl MapAddr for Addr6 {
    type TailPad = [u8; 4];
    #[inline(always)]
    fn words(&self) -> &[u32] {
        self
    }
}
