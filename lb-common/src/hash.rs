//! The flow hash. The kernel picks a Maglev slot with `flow_hash4(..) % slice_size`; user space
//! calls the same function to predict which backend a flow lands on.

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
    // Length in bytes, then the murmur3 finaliser.
    h ^= 16;
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
}
