//! Counters: traffic per service and backend, and every verdict by reason.

/// Per-CPU array `service id -> TrafficCountersV1`.
pub const MAP_SERVICE_STATS: &str = "LB_SVC_STAT_V1";
/// Per-CPU array `backend id -> TrafficCountersV1`.
pub const MAP_BACKEND_STATS: &str = "LB_BE_STAT_V1";
/// Per-CPU array `reason -> packets` (`REASON_SLOTS` slots): every verdict, counted by why (see [`crate::reason`]).
pub const MAP_REASONS: &str = "LB_REASON_V1";

/// Packet and byte counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCountersV1 {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
super::impl_pod!(TrafficCountersV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn counters() {
        assert_layout!(TrafficCountersV1, size 16, align 8, { packets @ 0, bytes @ 8 });
    }
}
