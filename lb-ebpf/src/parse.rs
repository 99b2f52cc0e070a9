//! Header parsing shared by XDP and TC. Every read is bounds-checked against `data_end`.
use core::mem::size_of;

use lb_common::{ip6_raw, reason, Addr4, Addr6, CtKeyV1, MapAddr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use crate::family::Scratch;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_ARP: u16 = 0x0806u16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();
/// Flags and offset bits of the IPv4 fragment field, in host order.
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

/// A TCP or UDP packet of either family, located.
pub struct Packet<A: MapAddr> {
    /// Offset of the IP header from the start of the frame.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header (IPv4 options and IPv6 extension headers skipped).
    pub l4_off: usize,
    pub tuple: CtKeyV1<A>,
    /// Byte 13 of the TCP header (0 for UDP).
    pub tcp_flags: u8,
    /// The first fragment of a fragmented datagram (ports present, rest elsewhere).
    pub first_fragment: bool,
    /// The device it arrived on (set by the hook, for flow events).
    pub ifindex: u32,
}

/// An ICMP or ICMPv6 error (destination unreachable, packet too big, time exceeded, parameter
/// problem) and the TCP or UDP datagram it quotes, located. The quote is how the error's
/// sender saw that datagram.
pub struct IcmpError<A: MapAddr> {
    /// Offset of the outer IP header.
    pub l3_off: usize,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    pub src_addr: A,
    pub dst_addr: A,
    /// Offsets of the quoted IP header and of its ports.
    pub inner_l3_off: usize,
    pub inner_l4_off: usize,
    /// The quoted datagram's tuple, in the direction it was travelling.
    pub inner: CtKeyV1<A>,
}

/// The network layer a frame carries, found under its Ethernet header and VLAN tags.
pub enum Network {
    /// An IPv4 or IPv6 header at this offset.
    Ipv4(usize),
    Ipv6(usize),
    /// An ARP packet at this offset.
    Arp(usize),
    /// Leave the frame untouched (`reason::PASS_*`).
    Pass(u32),
    /// Drop it (`reason::DROP_*`).
    Drop(u32),
}

/// Where parsing the IP layer stopped: a packet to balance or an ICMP error to translate back
/// (written to the scratch space, `Scratch::pkt` or `Scratch::err`), or a verdict reason with
/// no rewrite.
pub enum Parsed {
    Packet,
    IcmpError,
    /// An IPv6 neighbour solicitation as neighbour discovery sends them (no extension
    /// headers, hop limit 255): XDP answers it when it asks for an announced address.
    NeighbourSolicitation,
    /// Leave the packet untouched (`reason::PASS_*`).
    Pass(u32),
    /// Drop it (`reason::DROP_*`).
    Drop(u32),
}

/// How deep into a frame headers are read, at most: an offset past it is refused by
/// `ptr_at` (and a longer IPv6 header chain is left to the stack). The bound is what lets the
/// verifier accept an offset that crossed a BPF-to-BPF call, where it no longer knows its value.
pub const MAX_HEADER_OFF: usize = 511;

/// A pointer to a `T` at `off`, or `None` when the frame is too short.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    if off > MAX_HEADER_OFF || data + off + size_of::<T>() > data_end {
        return None;
    }
    Some((data + off) as *mut T)
}

#[inline(always)]
pub fn parse_l2(data: usize, data_end: usize) -> Network {
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return Network::Drop(reason::DROP_TRUNCATED_ETH);
    };
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_off = EthHdr::LEN;
    // Up to two tags (802.1ad outer, 802.1Q inner); unrolled for the verifier.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some(vlan) = ptr_at::<VlanHdr>(data, data_end, l3_off) else {
            return Network::Drop(reason::DROP_TRUNCATED_VLAN);
        };
        ether_type = unsafe { (*vlan).ether_type };
        l3_off += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP => Network::Ipv4(l3_off),
        ETH_P_IPV6 => Network::Ipv6(l3_off),
        ETH_P_ARP => Network::Arp(l3_off),
        _ => Network::Pass(reason::PASS_NOT_IP),
    }
}

/// An IPv4 packet: a TCP or UDP packet, or an ICMP error quoting one.
#[inline(always)]
pub fn parse_ipv4(data: usize, data_end: usize, l3_off: usize, out: &mut Scratch<Addr4>) -> Parsed {
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
        return parse_icmp_error(data, data_end, l3_off, l4_off, ip, &mut out.err);
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Parsed::Pass(reason::PASS_NOT_TCP_UDP);
    }
    if frag & IP_OFFSET_MASK != 0 {
        // A later fragment carries no ports: it cannot be matched to a flow here.
        return Parsed::Pass(reason::PASS_FRAGMENT);
    }

    let pkt = &mut out.pkt;
    pkt.tuple.src_addr = u32::from_ne_bytes(ip.src_addr);
    pkt.tuple.dst_addr = u32::from_ne_bytes(ip.dst_addr);
    transport(data, data_end, l3_off, l4_off, proto, frag & IP_MF != 0, pkt)
}

/// Completes `pkt` (its addresses are in) from the TCP or UDP header at `l4_off`; a header cut
/// short drops.
#[inline(always)]
fn transport<A: MapAddr>(data: usize, data_end: usize, l3_off: usize, l4_off: usize, proto: u8, first_fragment: bool, pkt: &mut Packet<A>) -> Parsed {
    let mut tcp_flags = 0;
    let tuple = &mut pkt.tuple;
    tuple.proto = proto;
    tuple._pad = [0; 3];
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
    pkt.l3_off = l3_off;
    pkt.l4_off = l4_off;
    pkt.tcp_flags = tcp_flags;
    pkt.first_fragment = first_fragment;
    Parsed::Packet
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
/// The offset bits and the "more fragments" bit of a fragment header's offset-and-flags
/// field, in host order.
const IP6_OFFSET_MASK: u16 = 0xfff8;
const IP6_MF: u16 = 0x0001;
/// Every extension header starts with these 8 bytes: the next header and a length.
const IPV6_EXT_MIN_LEN: usize = 8;

/// Extension headers that can be walked: each names the next header and its own length (ESP
/// cannot be: what follows it is encrypted).
#[inline(always)]
fn is_walkable_extension(next: u8) -> bool {
    matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_AUTH | NEXTHDR_DEST | NEXTHDR_MOBILITY | NEXTHDR_HIP | NEXTHDR_SHIM6)
}

/// An IPv6 packet, its extension headers walked to the transport header: a TCP or UDP packet,
/// or an ICMPv6 error quoting one. A header cut short drops, as in IPv4; a later fragment, a
/// longer chain than is walked and every other protocol (neighbour discovery and router
/// advertisements among it) pass to the stack untouched.
#[inline(always)]
pub fn parse_ipv6(data: usize, data_end: usize, l3_off: usize, out: &mut Scratch<Addr6>) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(data, data_end, l3_off) else {
        return Parsed::Drop(reason::DROP_TRUNCATED_IP6);
    };
    let ip = unsafe { &*ip };
    let mut next = ip.next_hdr;
    let mut off = l3_off + Ipv6Hdr::LEN;
    let mut first_fragment = false;
    // Most packets carry TCP or UDP right after the fixed header: no chain to walk.
    let chained = next != IPPROTO_TCP && next != IPPROTO_UDP;
    for _ in 0..if chained { IPV6_MAX_EXT_HEADERS } else { 0 } {
        if !is_walkable_extension(next) {
            break;
        }
        let Some(ext) = ptr_at::<[u8; IPV6_EXT_MIN_LEN]>(data, data_end, off) else {
            return Parsed::Drop(reason::DROP_TRUNCATED_IP6);
        };
        let ext = unsafe { *ext };
        off += match next {
            NEXTHDR_FRAGMENT => {
                let offset_and_flags = u16::from_be_bytes([ext[2], ext[3]]);
                if offset_and_flags & IP6_OFFSET_MASK != 0 {
                    // A later fragment carries no ports: it cannot be matched to a flow here.
                    return Parsed::Pass(reason::PASS_FRAGMENT);
                }
                first_fragment = offset_and_flags & IP6_MF != 0;
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
        if off > MAX_HEADER_OFF - TcpHdr::LEN {
            return Parsed::Pass(reason::PASS_IPV6_LONG_CHAIN);
        }
        next = ext[0];
    }
    if is_walkable_extension(next) {
        return Parsed::Pass(reason::PASS_IPV6_LONG_CHAIN);
    }
    if next == IPPROTO_ICMPV6 && !first_fragment {
        return parse_icmp6(data, data_end, l3_off, off, ip, &mut out.err);
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Parsed::Pass(reason::PASS_NOT_TCP_UDP);
    }
    let pkt = &mut out.pkt;
    let [src_addr, dst_addr] = addrs6(ip);
    pkt.tuple.src_addr = src_addr;
    pkt.tuple.dst_addr = dst_addr;
    transport(data, data_end, l3_off, off, next, first_fragment, pkt)
}

/// The source and destination of an IPv6 header as map words: read as 4-byte words (the JIT
/// takes unaligned packet loads), not rebuilt from 32 single bytes.
#[inline(always)]
fn addrs6(ip: &Ipv6Hdr) -> [[u32; 4]; 2] {
    unsafe { *(ip.src_addr.as_ptr() as *const [[u32; 4]; 2]) }
}

const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_PARAMETER_PROB: u8 = 4;
const ICMP6_NEIGHBOUR_SOLICITATION: u8 = 135;

/// A neighbour solicitation, or an ICMPv6 error that quotes a TCP or UDP datagram (no
/// extension headers in the quote) with its ports; any other ICMPv6 (echo, the rest of
/// neighbour discovery, router advertisements) is the stack's.
#[inline(always)]
fn parse_icmp6(data: usize, data_end: usize, l3_off: usize, icmp_off: usize, ip: &Ipv6Hdr, err: &mut IcmpError<Addr6>) -> Parsed {
    let not_ours = Parsed::Pass(reason::PASS_NOT_TCP_UDP);
    let Some(icmp) = ptr_at::<[u8; ICMP_HEADER_LEN]>(data, data_end, icmp_off) else { return not_ours };
    let kind = unsafe { (*icmp)[0] };
    if kind == ICMP6_NEIGHBOUR_SOLICITATION && icmp_off == l3_off + Ipv6Hdr::LEN && ip.hop_limit == 255 {
        return Parsed::NeighbourSolicitation;
    }
    if !matches!(kind, ICMP6_DEST_UNREACH | ICMP6_PACKET_TOO_BIG | ICMP6_TIME_EXCEEDED | ICMP6_PARAMETER_PROB) {
        return not_ours;
    }
    let inner_l3_off = icmp_off + ICMP_HEADER_LEN;
    let Some(inner) = ptr_at::<Ipv6Hdr>(data, data_end, inner_l3_off) else { return not_ours };
    let inner = unsafe { &*inner };
    if inner.next_hdr != IPPROTO_TCP && inner.next_hdr != IPPROTO_UDP {
        return not_ours;
    }
    let inner_l4_off = inner_l3_off + Ipv6Hdr::LEN;
    let Some(ports) = ptr_at::<[u16; 2]>(data, data_end, inner_l4_off) else { return not_ours };
    let ports = unsafe { *ports };
    *err = IcmpError {
        l3_off,
        icmp_off,
        src_addr: ip6_raw(ip.src_addr),
        dst_addr: ip6_raw(ip.dst_addr),
        inner_l3_off,
        inner_l4_off,
        inner: CtKeyV1 { src_addr: ip6_raw(inner.src_addr), dst_addr: ip6_raw(inner.dst_addr), src_port: ports[0], dst_port: ports[1], proto: inner.next_hdr, _pad: [0; 3] },
    };
    Parsed::IcmpError
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
const ICMP_HEADER_LEN: usize = 8;

/// An ICMP error that quotes a TCP or UDP datagram with its ports; any other ICMP (echo,
/// errors quoting other protocols or cut before the ports) is left to the stack.
#[inline(always)]
fn parse_icmp_error(data: usize, data_end: usize, l3_off: usize, icmp_off: usize, ip: &Ipv4Hdr, err: &mut IcmpError<Addr4>) -> Parsed {
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
    *err = IcmpError {
        l3_off,
        icmp_off,
        src_addr: u32::from_ne_bytes(ip.src_addr),
        dst_addr: u32::from_ne_bytes(ip.dst_addr),
        inner_l3_off,
        inner_l4_off,
        inner: CtKeyV1 {
            src_addr: u32::from_ne_bytes(inner.src_addr),
            dst_addr: u32::from_ne_bytes(inner.dst_addr),
            src_port: ports[0],
            dst_port: ports[1],
            proto: inner.proto,
            _pad: [0; 3],
        },
    };
    Parsed::IcmpError
}
