//! What the program tests share: verdict numbers, MACs, a loaded testbed, reason counts.
#![allow(dead_code)]
use lb_agent::dataplane::load::MapSizes;
use testbed::progtest::Testbed;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xc1];
pub const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];

pub fn testbed() -> Testbed {
    Testbed::new(&MapSizes::default()).expect("load programs")
}

pub fn reason_count(tb: &Testbed, reason: u32) -> u64 {
    tb.dataplane.maps.reason_counts().unwrap()[reason as usize]
}
