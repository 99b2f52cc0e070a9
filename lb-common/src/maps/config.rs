//! What the agent tells the datapath about this node: settings and its own addresses.

/// Array with one `ConfigV1`: settings the agent gives the datapath.
pub const MAP_CONFIG: &str = "LB_CONFIG_V1";
/// Hash `raw IPv4 -> ifindex`: this node's own addresses, where NodePorts answer.
pub const MAP_NODE_IPS: &str = "LB4_NODEIP_V1";
/// Hash `raw IPv6 -> ifindex`: the same for the node's IPv6 addresses.
pub const MAP_NODE_IPS6: &str = "LB6_NODEIP_V1";
/// Array with one `StateClockV1` (not pinned): how the datapath reads its state clock from
/// jiffies, written by the agent when it loads the programs.
pub const MAP_STATE_CLOCK: &str = "LB_CLOCK_V1";
/// Array with one `Config6V1`: the IPv6 settings.
pub const MAP_CONFIG6: &str = "LB6_CONFIG_V1";
/// Array `u32 -> u64`, a bitmap of the 65,536 ports, indexed by a port as it is on the wire
/// (the raw `u16`, see [`nodeport_bit`]): set while some NodePort frontend (address 0) of
/// either family uses that port. A packet that matches no exact frontend is looked up as a
/// NodePort only on a set port, so traffic to the node's own services (SSH, the kubelet)
/// costs no node-address lookup. Only the agent writes it.
pub const MAP_NODEPORT_FILTER: &str = "LB_NODEPORT_V1";
pub const NODEPORT_FILTER_WORDS: u32 = (1 << 16) / 64;

/// The word of `LB_NODEPORT_V1` and the bit in it for a raw port.
#[inline(always)]
pub fn nodeport_bit(port: u16) -> (u32, u64) {
    (port as u32 / 64, 1 << (port % 64))
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

/// The settings IPv6 flows need beside `ConfigV1` (its seed and port range serve both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config6V1 {
    /// Source address for SNAT of IPv6 flows to remote backends (raw); zero when the node has
    /// no IPv6 address: such flows are dropped.
    pub snat_addr: [u32; 4],
}

/// The state clock (the time of conntrack, reverse-NAT, affinity and next-hop entries:
/// CLOCK_MONOTONIC in ns at the grain of a tick) as `jiffies * tick_ns + offset_ns`, wrapping.
/// Reading jiffies is a load the verifier inlines; `bpf_ktime_get_coarse_ns`, what the
/// datapath reads while `tick_ns` is 0, is a helper call. The kernel advances jiffies by whole
/// ticks of CLOCK_MONOTONIC, so one calibration holds until the next boot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateClockV1 {
    /// ns per jiffy (the kernel's `TICK_NSEC`); 0 before the agent calibrates.
    pub tick_ns: u64,
    /// CLOCK_MONOTONIC minus `jiffies * tick_ns`, wrapping (jiffies start near 2^32 ticks
    /// before boot).
    pub offset_ns: u64,
}

impl StateClockV1 {
    /// The state clock at `jiffies`.
    #[inline(always)]
    pub fn at(&self, jiffies: u64) -> u64 {
        jiffies.wrapping_mul(self.tick_ns).wrapping_add(self.offset_ns)
    }
}

#[cfg(feature = "user")]
super::impl_pod!(ConfigV1, Config6V1, StateClockV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn config() {
        assert_layout!(ConfigV1, size 16, align 4, {
            hash_seed @ 0, snat_addr @ 4, nat_port_min @ 8, nat_port_max @ 10, _pad @ 12,
        });
        assert_layout!(Config6V1, size 16, align 4, { snat_addr @ 0 });
        assert_layout!(StateClockV1, size 16, align 8, { tick_ns @ 0, offset_ns @ 8 });
    }
}
