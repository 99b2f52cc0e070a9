//! Header parsing shared by XDP and TC. Every read is bounds-checked against `data_end`.
use core::mem::size_of;

use lb_common::{reason, Ct4KeyV1, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();
/// Flags and offset bits of the IPv4 fragment field, in host order.
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// An IPv4 TCP or UDP packet, located.
pub struct Ipv4Packet {
    /// Offset of the IPv4 header from the start of the frame.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header (IHL honoured, so options are skipped).
    pub l4_off: usize,
    pub tuple: Ct4KeyV1,
    /// Byte 13 of the TCP header (0 for UDP).
    pub tcp_flags: u8,
    /// The first fragment of a fragmented datagram (ports present, rest elsewhere).
    pub first_fragment: bool,
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) and the TCP or
/// UDP datagram it quotes, located. The quote is how the error's sender saw that datagram.
pub struct IcmpError4 {
    /// Offset of the outer IPv4 header.
    pub l3_off: usize,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    pub src_addr: u32,
    pub dst_addr: u32,
    /// Offsets of the quoted IPv4 header and of its ports.
    pub inner_l3_off: usize,
    pub inner_l4_off: usize,
    /// The quoted datagram's tuple, in the direction it was travelling.
    pub inner: Ct4KeyV1,
}

/// Where parsing stopped: either a packet to balance, or a verdict reason with no rewrite.
pub enum Parsed {
    Ipv4(Ipv4Packet),
    IcmpError4(IcmpError4),
    /// Leave the packet untouched (`reason::PASS_*`).
    Pass(u32),
    /// Drop it (`reason::DROP_*`).
    Drop(u32),
}

/// A pointer to a `T` at `off`, or `None` when the frame is too short.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    if data + off + size_of::<T>() > data_end {
        return None;
    }
    Some((data + off) as *mut T)
}

#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return Parsed::Drop(reason::DROP_TRUNCATED_ETH);
    };
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_off = EthHdr::LEN;
    // Up to two tags (802.1ad outer, 802.1Q inner); unrolled for the verifier.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some(vlan) = ptr_at::<VlanHdr>(data, data_end, l3_off) else {
            return Parsed::Drop(reason::DROP_TRUNCATED_VLAN);
        };
        ether_type = unsafe { (*vlan).ether_type };
        l3_off += VlanHdr::LEN;
    }
    if ether_type == ETH_P_IPV6 {
        return parse_ipv6(data, data_end, l3_off);
    }
    if ether_type != ETH_P_IP {
        return Parsed::Pass(reason::PASS_NOT_IP);
    }

    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, l3_off) else {
        return Parsed::Drop(reason::DROP_TRUNCATED_IP4);
    };
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || (u16::from_be_bytes(ip.tot_len) as usize) < ihl {
        return Parsed::Drop(reason::DROP_MALFORMED_IP4);
    }
    let l4_off = l3_off + ihl;
    if data + l4_off > data_end {
        return Parsed::Drop(reason::DROP_TRUNCATED_IP4);
    }
    let proto = ip.proto;
    let frag = u16::from_be_bytes(ip.frags);
    if proto == IPPROTO_ICMP && frag & (IP_MF | IP_OFFSET_MASK) == 0 {
        return parse_icmp_error(data, data_end, l3_off, l4_off, ip);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::Pass(reason::PASS_NOT_TCP_UDP);
    }
    if frag & IP_OFFSET_MASK != 0 {
        // A later fragment carries no ports: it cannot be matched to a flow here.
        return Parsed::Pass(reason::PASS_FRAGMENT);
    }

    let mut tuple = Ct4KeyV1 {
        src_addr: u32::from_ne_bytes(ip.src_addr),
        dst_addr: u32::from_ne_bytes(ip.dst_addr),
        proto,
        ..Ct4KeyV1::default()
    };
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(data, data_end, l4_off) else {
            return Parsed::Drop(reason::DROP_TRUNCATED_L4);
        };
        let tcp = unsafe { &*tcp };
        tuple.src_port = u16::from_ne_bytes(tcp.source);
        tuple.dst_port = u16::from_ne_bytes(tcp.dest);
        // Byte 13 of the header: CWR ECE URG ACK PSH RST SYN FIN.
        tcp_flags = unsafe { *((tcp as *const TcpHdr as *const u8).add(13)) };
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(data, data_end, l4_off) else {
            return Parsed::Drop(reason::DROP_TRUNCATED_L4);
        };
        let udp = unsafe { &*udp };
        tuple.src_port = u16::from_ne_bytes(udp.src);
        tuple.dst_port = u16::from_ne_bytes(udp.dst);
    }
    Parsed::Ipv4(Ipv4Packet { l3_off, l4_off, tuple, tcp_flags, first_fragment: frag & IP_MF != 0 })
}

/// IPv6 extension headers walked to reach the transport header, at most (real traffic carries
/// one or two; Cilium walks four).
const IPV6_MAX_EXT_HEADERS: usize = 8;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;
/// The offset bits of a fragment header's offset-and-flags field, in host order.
const IP6_OFFSET_MASK: u16 = 0xfff8;
/// Every extension header starts with these 8 bytes: the next header and a length.
const IPV6_EXT_MIN_LEN: usize = 8;

/// Extension headers that can be walked: each names the next header and its own length (ESP
/// cannot be: what follows it is encrypted).
#[inline(always)]
fn is_walkable_extension(next: u8) -> bool {
    matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_AUTH | NEXTHDR_DEST | NEXTHDR_MOBILITY | NEXTHDR_HIP | NEXTHDR_SHIM6)
}

/// An IPv6 packet, its extension headers walked to the transport header. IPv6 Services are not
/// balanced yet: a TCP or UDP packet whose headers are whole passes (`PASS_IPV6`). A header cut
/// short drops, as in IPv4; a later fragment, a longer chain than is walked and every other
/// protocol (ICMPv6, neighbour discovery among it) pass to the stack untouched.
#[inline(always)]
fn parse_ipv6(data: usize, data_end: usize, l3_off: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(data, data_end, l3_off) else {
        return Parsed::Drop(reason::DROP_TRUNCATED_IP6);
    };
    let mut next = unsafe { (*ip).next_hdr };
    let mut off = l3_off + Ipv6Hdr::LEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        if !is_walkable_extension(next) {
            break;
        }
        let Some(ext) = ptr_at::<[u8; IPV6_EXT_MIN_LEN]>(data, data_end, off) else {
            return Parsed::Drop(reason::DROP_TRUNCATED_IP6);
        };
        let ext = unsafe { *ext };
        off += match next {
            NEXTHDR_FRAGMENT => {
                if u16::from_be_bytes([ext[2], ext[3]]) & IP6_OFFSET_MASK != 0 {
                    // A later fragment carries no ports: it cannot be matched to a flow here.
                    return Parsed::Pass(reason::PASS_FRAGMENT);
                }
                IPV6_EXT_MIN_LEN
            }
            // The authentication header counts 4-byte words, less two; the others 8-byte
            // units, less one.
            NEXTHDR_AUTH => (ext[1] as usize + 2) * 4,
            _ => (ext[1] as usize + 1) * 8,
        };
        if data + off > data_end {
            return Parsed::Drop(reason::DROP_TRUNCATED_IP6);
        }
        next = ext[0];
    }
    if is_walkable_extension(next) {
        return Parsed::Pass(reason::PASS_IPV6_LONG_CHAIN);
    }
    let l4_len = match next {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        _ => return Parsed::Pass(reason::PASS_NOT_TCP_UDP),
    };
    if data + off + l4_len > data_end {
        return Parsed::Drop(reason::DROP_TRUNCATED_L4);
    }
    Parsed::Pass(reason::PASS_IPV6)
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
const ICMP_HEADER_LEN: usize = 8;

/// An ICMP error that quotes a TCP or UDP datagram with its ports; any other ICMP (echo,
/// errors quoting other protocols or cut before the ports) is left to the stack.
#[inline(always)]
fn parse_icmp_error(data: usize, data_end: usize, l3_off: usize, icmp_off: usize, ip: &Ipv4Hdr) -> Parsed {
    let not_ours = Parsed::Pass(reason::PASS_NOT_TCP_UDP);
    // The whole header, not its first byte: a 1-byte bound check compiles to a form the
    // verifier does not accept.
    let Some(icmp) = ptr_at::<[u8; ICMP_HEADER_LEN]>(data, data_end, icmp_off) else { return not_ours };
    if !matches!(unsafe { (*icmp)[0] }, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB) {
        return not_ours;
    }
    let inner_l3_off = icmp_off + ICMP_HEADER_LEN;
    let Some(inner) = ptr_at::<Ipv4Hdr>(data, data_end, inner_l3_off) else { return not_ours };
    let inner = unsafe { &*inner };
    let ihl = (inner.vihl & 0x0f) as usize * 4;
    let quoted_frag = u16::from_be_bytes(inner.frags) & IP_OFFSET_MASK;
    if inner.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || quoted_frag != 0 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return not_ours;
    }
    let inner_l4_off = inner_l3_off + ihl;
    // TCP and UDP both start with the two ports.
    let Some(ports) = ptr_at::<[u16; 2]>(data, data_end, inner_l4_off) else { return not_ours };
    let ports = unsafe { *ports };
    Parsed::IcmpError4(IcmpError4 {
        l3_off,
        icmp_off,
        src_addr: u32::from_ne_bytes(ip.src_addr),
        dst_addr: u32::from_ne_bytes(ip.dst_addr),
        inner_l3_off,
        inner_l4_off,
        inner: Ct4KeyV1 {
            src_addr: u32::from_ne_bytes(inner.src_addr),
            dst_addr: u32::from_ne_bytes(inner.dst_addr),
            src_port: ports[0],
            dst_port: ports[1],
            proto: inner.proto,
            _pad: [0; 3],
        },
    })
}
