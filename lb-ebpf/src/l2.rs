//! L2 answers on external devices: ARP requests and IPv6 neighbour solicitations for the
//! load-balancer addresses this node announces (`LB4_L2ANN_V1`, `LB6_L2ANN_V1`), turned into
//! their answer in place and sent back out the device they came in on. Anything else, and an
//! entry past its expiry, is left to the stack.
use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, maps::HashMap};
use lb_common::{reason, L2AnnounceKeyV1, L2AnnounceV1, MapAddr, IPPROTO_ICMPV6};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    csum::{fold, sum_words},
    maps::{LB4_L2ANN_V1, LB6_L2ANN_V1},
    parse::ptr_at,
};

/// An Ethernet/IPv4 ARP packet.
#[repr(C)]
struct Arp {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    oper: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

const ARP_REQUEST: [u8; 2] = [0, 1];
const ARP_REPLY: [u8; 2] = [0, 2];

/// A neighbour solicitation or advertisement (RFC 4861 4.3, 4.4) with one link-layer address
/// option, as the answer is written.
#[repr(C)]
struct Neighbour {
    kind: u8,
    code: u8,
    csum: [u8; 2],
    flags: [u8; 4],
    target: [u8; 16],
    opt_kind: u8,
    opt_len: u8,
    opt_mac: [u8; 6],
}

const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// The option that carries the answer's MAC.
const OPT_TARGET_LINK_ADDR: u8 = 2;
/// Advertisement flags: solicited (a unicast answer), override (replace a cached MAC).
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// ff02::1, where an answer to a solicitation from the unspecified address goes.
const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01];

/// The entry for `addr` on `ifindex`, while it is valid.
#[inline(always)]
fn announced<A: MapAddr>(map: &HashMap<L2AnnounceKeyV1<A>, L2AnnounceV1>, ifindex: u32, addr: A) -> Option<[u8; 6]> {
    let entry = unsafe { map.get(&L2AnnounceKeyV1 { ifindex, addr }) }?;
    (unsafe { bpf_ktime_get_ns() } < entry.expires_ns).then_some(entry.mac)
}

/// An ARP request for an announced address becomes the reply (XDP_TX); `None`: not ours.
#[inline(always)]
pub fn answer_arp(data: usize, data_end: usize, l3_off: usize, ifindex: u32) -> Option<(u32, u32)> {
    let arp = unsafe { &mut *ptr_at::<Arp>(data, data_end, l3_off)? };
    if arp.htype != [0, 1] || arp.ptype != [8, 0] || arp.hlen != 6 || arp.plen != 4 || arp.oper != ARP_REQUEST {
        return None;
    }
    // A host announcing the address itself (gratuitous ARP) asks nothing.
    if arp.spa == arp.tpa {
        return None;
    }
    let mac = announced(&LB4_L2ANN_V1, ifindex, u32::from_ne_bytes(arp.tpa))?;
    let eth = unsafe { &mut *ptr_at::<EthHdr>(data, data_end, 0)? };
    eth.dst_addr = arp.sha;
    eth.src_addr = mac;
    let asked = arp.tpa;
    arp.oper = ARP_REPLY;
    arp.tha = arp.sha;
    arp.tpa = arp.spa;
    arp.sha = mac;
    arp.spa = asked;
    Some((xdp_action::XDP_TX, reason::FWD_L2_ANSWER))
}

/// What a neighbour solicitation (`Parsed::NeighbourSolicitation`) asks of this node: the
/// answer's MAC and destination. `None`: not for an address of ours.
#[inline(always)]
pub fn solicited(data: usize, data_end: usize, l3_off: usize, ifindex: u32) -> Option<([u8; 6], [u8; 16])> {
    let ip = unsafe { &*ptr_at::<Ipv6Hdr>(data, data_end, l3_off)? };
    let target = unsafe { *ptr_at::<[u32; 4]>(data, data_end, l3_off + Ipv6Hdr::LEN + 8)? };
    let mac = announced(&LB6_L2ANN_V1, ifindex, target)?;
    // Duplicate address detection asks from the unspecified address: the answer goes to all nodes.
    let to = if ip.src_addr == [0; 16] { ALL_NODES } else { ip.src_addr };
    Some((mac, to))
}

/// The length of a frame that holds the advertisement: the solicitation's headers up to IPv6,
/// then the advertisement with its one option.
#[inline(always)]
pub fn advertisement_len(l3_off: usize) -> usize {
    l3_off + Ipv6Hdr::LEN + core::mem::size_of::<Neighbour>()
}

/// Writes the advertisement over a solicitation already cut or grown to
/// [`advertisement_len`]: from the target, to `to`, with the target's MAC.
#[inline(always)]
pub fn write_advertisement(data: usize, data_end: usize, l3_off: usize, mac: [u8; 6], to: [u8; 16]) -> Option<(u32, u32)> {
    let eth = unsafe { &mut *ptr_at::<EthHdr>(data, data_end, 0)? };
    let ip = unsafe { &mut *ptr_at::<Ipv6Hdr>(data, data_end, l3_off)? };
    let na = unsafe { &mut *ptr_at::<Neighbour>(data, data_end, l3_off + Ipv6Hdr::LEN)? };
    eth.dst_addr = eth.src_addr;
    eth.src_addr = mac;
    let target = na.target;
    ip.payload_len = (core::mem::size_of::<Neighbour>() as u16).to_be_bytes();
    ip.hop_limit = 255;
    ip.src_addr = target;
    ip.dst_addr = to;
    na.kind = NEIGHBOUR_ADVERTISEMENT;
    na.code = 0;
    na.csum = [0; 2];
    na.flags = [if to == ALL_NODES { 0 } else { NA_SOLICITED } | NA_OVERRIDE, 0, 0, 0];
    na.opt_kind = OPT_TARGET_LINK_ADDR;
    na.opt_len = 1;
    na.opt_mac = mac;
    // The pseudo-header (addresses, upper-layer length, next header), then the message.
    let pseudo = sum_words(&target) + sum_words(&to) + sum_words(&[0, 0, 0, core::mem::size_of::<Neighbour>() as u8]) + sum_words(&[0, 0, 0, IPPROTO_ICMPV6]);
    let message = sum_words(unsafe { &*(na as *const Neighbour as *const [u8; core::mem::size_of::<Neighbour>()]) });
    na.csum = (!fold(pseudo + message)).to_ne_bytes();
    Some((xdp_action::XDP_TX, reason::FWD_L2_ANSWER))
}
