//! Map schema v1, shared by the kernel programs (`lb-ebpf`) and user space (`lb-agent`,
//! `lbctl`, tests and benchmarks).
//!
//! Layout rules: every key and value is `#[repr(C)]`, padding is spelled out as `_pad`
//! fields (the kernel compares keys byte for byte, so no byte may be left undefined), and
//! every type has size and offset asserts at the bottom of this file. A layout change adds a
//! `V2` type and map beside the `V1` ones; it never edits a `V1` type in place.
//!
//! Addresses and ports are stored exactly as they appear on the wire (network byte order),
//! read with `from_ne_bytes`, so the datapath never swaps bytes. Use [`ip4_raw`] and
//! [`port_raw`] to build them in user space.
#![no_std]

pub mod consts;
pub mod csum;
pub mod hash;
pub mod maps;
pub mod reason;

pub use consts::*;
pub use hash::{flow_hash, flow_hash4};
pub use maps::*;

/// The raw (wire order) form of an IPv4 address, as stored in every map.
#[inline(always)]
pub const fn ip4_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of a raw (wire order) IPv4 address.
#[inline(always)]
pub const fn ip4_octets(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// A raw (wire order) IPv4 address as an address, for display.
#[inline(always)]
pub const fn ip4_addr(raw: u32) -> core::net::Ipv4Addr {
    let o = raw.to_ne_bytes();
    core::net::Ipv4Addr::new(o[0], o[1], o[2], o[3])
}

/// The raw (wire order) form of an IPv6 address, as stored in every map.
#[inline(always)]
pub const fn ip6_raw(o: [u8; 16]) -> [u32; 4] {
    // Spelled out: the kernel programs call this, and a call that is not inlined may not
    // return 16 bytes there.
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// A raw (wire order) IPv6 address as an address, for display.
#[inline(always)]
pub fn ip6_addr(raw: [u32; 4]) -> core::net::Ipv6Addr {
    core::net::Ipv6Addr::from(core::array::from_fn::<u8, 16, _>(|i| raw[i / 4].to_ne_bytes()[i % 4]))
}

/// The raw (wire order) form of a port, as stored in every map.
#[inline(always)]
pub const fn port_raw(port: u16) -> u16 {
    port.to_be()
}

/// The host-order value of a raw (wire order) port.
#[inline(always)]
pub const fn port_host(raw: u16) -> u16 {
    u16::from_be(raw)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipv6_addresses_round_trip_in_wire_order() {
        let addr: core::net::Ipv6Addr = "fd00:99::1:2".parse().unwrap();
        let raw = super::ip6_raw(addr.octets());
        assert_eq!(raw[0].to_ne_bytes(), [0xfd, 0, 0, 0x99]);
        assert_eq!(super::ip6_addr(raw), addr);
    }
}
