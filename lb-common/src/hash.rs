//! The flow hash. The kernel picks a Maglev slot with `flow_hash(..) % slice_size`; user space
//! calls the same function to predict which backend a flow lands on.
use crate::{CtKeyV1, MapAddr};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// MurmurHash3 (x86_32) over the 5-tuple, seeded. Addresses and ports are raw (wire order)
/// values as stored in the maps; the result depends only on their bytes.
#[inline(always)]
pub const fn flow_hash4(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, proto: u8, seed: u32) -> u32 {
    let ports = ((src_port as u32) << 16) | dst_port as u32;
    let mut h = seed;
    h = mix(h, src_addr);
    h = mix(h, dst_addr);
    h = mix(h, ports);
    h = mix(h, proto as u32);
    finish(h, 16)
}

/// [`flow_hash4`] of either family: the address words in order, then ports and protocol. An
/// IPv4 flow hashes exactly as with `flow_hash4`.
#[inline(always)]
pub fn flow_hash<A: MapAddr>(t: &CtKeyV1<A>, seed: u32) -> u32 {
    let (src, dst) = (t.src_addr.words(), t.dst_addr.words());
    let mut h = seed;
    // Index loops of a length known once monomorphised: unrolled, as the verifier wants.
    for i in 0..src.len() {
        h = mix(h, src[i]);
    }
    for i in 0..dst.len() {
        h = mix(h, dst[i]);
    }
    h = mix(h, ((t.src_port as u32) << 16) | t.dst_port as u32);
    h = mix(h, t.proto as u32);
    finish(h, 4 * (src.len() + dst.len()) as u32 + 8)
}

/// The length in bytes, then the murmur3 finaliser.
#[inline(always)]
const fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_field_and_the_seed() {
        let base = flow_hash4(1, 2, 3, 4, 6, 7);
        assert_ne!(base, flow_hash4(9, 2, 3, 4, 6, 7));
        assert_ne!(base, flow_hash4(1, 9, 3, 4, 6, 7));
        assert_ne!(base, flow_hash4(1, 2, 9, 4, 6, 7));
        assert_ne!(base, flow_hash4(1, 2, 3, 9, 6, 7));
        assert_ne!(base, flow_hash4(1, 2, 3, 4, 17, 7));
        assert_ne!(base, flow_hash4(1, 2, 3, 4, 6, 8));
        // Swapping the ports is a different flow.
        assert_ne!(base, flow_hash4(1, 2, 4, 3, 6, 7));
    }

    #[test]
    fn hash_matches_reference_murmur3() {
        // Reference MurmurHash3_x86_32 of the 16 little-endian words (src, dst, sport<<16|dport,
        // proto). Kernel and user space must agree forever: a change re-shuffles every flow.
        assert_eq!(flow_hash4(0, 0, 0, 0, 0, 0), 2_167_721_464);
        assert_eq!(flow_hash4(1, 2, 3, 4, 6, 7), 4_117_872_014);
    }

    #[test]
    fn one_hash_for_both_families() {
        let v4 = crate::Ct4KeyV1 { src_addr: 1, dst_addr: 2, src_port: 3, dst_port: 4, proto: 6, _pad: [0; 3] };
        assert_eq!(flow_hash(&v4, 7), flow_hash4(1, 2, 3, 4, 6, 7), "IPv4 flows keep their backends");
        let v6 = crate::Ct6KeyV1 { src_addr: [1, 0, 0, 0], dst_addr: [2, 0, 0, 0], src_port: 3, dst_port: 4, proto: 6, _pad: [0; 3] };
        let moved = crate::Ct6KeyV1 { src_addr: [1, 0, 0, 9], ..v6 };
        assert_ne!(flow_hash(&v6, 7), flow_hash(&v4, 7));
        assert_ne!(flow_hash(&v6, 7), flow_hash(&moved, 7), "every word of an IPv6 address counts");
    }
}
