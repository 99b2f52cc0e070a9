//! Program tests: the real object, loaded into the kernel, run with BPF_PROG_TEST_RUN on
//! packets built with etherparse. Each asserts the verdict, the output bytes and the counters.
mod common;

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use common::*;
use etherparse::{
    EtherType, Ethernet2Header, Icmpv6Type, IpAuthHeader, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, Ipv6RoutingExtensions, PacketBuilder, SlicedPacket, TransportSlice, VlanId,
};
use lb_agent::dataplane::{load::MapSizes, BackendSpec, Frontend, FrontendKey};
use testbed::{
    netns::{in_private_netns, sh},
    progtest::{ifindex, Testbed},
};
use lb_common::*;


const CLIENT: [u8; 4] = [192, 0, 2, 10];
const VIP: [u8; 4] = [10, 96, 0, 10];
const NODE_IP: [u8; 4] = [10, 99, 0, 1];
const BACKENDS: [[u8; 4]; 3] = [[10, 244, 1, 11], [10, 244, 1, 12], [10, 244, 1, 13]];
const NODE_PORT: u16 = 30080;

fn tcp_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(src, dst, 64).tcp(sport, dport, 1000, 64240).syn();
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

fn tcp_ack(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(src, dst, 64).tcp(sport, dport, 1001, 64240).ack(5000);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(src, dst, 64).udp(sport, dport);
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn frontend(addr: [u8; 4], port: u16, proto: u8, kind: u8, backends: &[[u8; 4]], local: bool) -> Frontend {
    Frontend {
        key: Service4KeyV1 { addr: ip4_raw(addr), port: port_raw(port), proto, scope: SCOPE_CLUSTER }.into(),
        kind,
        name: format!("test/svc-{port}:{port}").into(),
        backends: backends.iter().map(|b| BackendSpec { addr: IpAddr::from(*b), port: 8080, local, weight: 1 }).collect(),
        ..Frontend::default()
    }
}


/// The decoded IPv4 + L4 view of an output packet, with its checksums checked.
struct Out {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    tcp_flags: (bool, bool, bool),
    tcp_seq_ack: (u32, u32),
}

fn decode(frame: &[u8]) -> Out {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let eth = p.link.as_ref().unwrap().to_header().unwrap();
    let eth = match eth {
        etherparse::LinkHeader::Ethernet2(e) => e,
        other => panic!("not ethernet: {other:?}"),
    };
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
    let ip_header = ip.header().to_header();
    assert_eq!(ip_header.header_checksum, ip_header.calc_header_checksum(), "IPv4 header checksum");
    let payload = ip.payload().payload;
    let (sport, dport, flags, seq_ack) = match p.transport.as_ref().unwrap() {
        TransportSlice::Tcp(t) => {
            let h = t.to_header();
            assert_eq!(h.checksum, h.calc_checksum_ipv4(&ip_header, t.payload()).unwrap(), "TCP checksum");
            (h.source_port, h.destination_port, (h.syn, h.ack, h.rst), (h.sequence_number, h.acknowledgment_number))
        }
        TransportSlice::Udp(u) => {
            let h = u.to_header();
            assert_eq!(h.checksum, h.calc_checksum_ipv4(&ip_header, u.payload()).unwrap(), "UDP checksum");
            (h.source_port, h.destination_port, (false, false, false), (0, 0))
        }
        other => panic!("unexpected transport {other:?}"),
    };
    let _ = payload;
    Out { src: ip_header.source, dst: ip_header.destination, sport, dport, eth_src: eth.source, eth_dst: eth.destination, tcp_flags: flags, tcp_seq_ack: seq_ack }
}

/// An ICMP port unreachable from the frontend to the client, quoting `original`.
fn assert_icmp_port_unreachable(frame: &[u8], original: &[u8]) {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
    assert_eq!((h.source, h.destination, h.protocol), (VIP, CLIENT, IpNumber::ICMP));
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("not ICMP") };
    assert_eq!(icmp.icmp_type(), etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port));
    let mut expected = icmp.header();
    expected.update_checksum(icmp.payload());
    assert_eq!(icmp.checksum(), expected.checksum, "ICMP checksum");
    assert_eq!(icmp.payload(), &original[14..14 + 28], "quotes the IP header and 8 bytes of UDP");
    assert_eq!(&frame[..6], &original[6..12], "back to the sender's MAC");
    assert_eq!(frame.len(), 14 + 20 + 8 + 28);
}

/// The backend Maglev must pick for this flow, computed in user space from the same hash.
fn predicted_backend(tb: &Testbed, svc: &Frontend, src: [u8; 4], sport: u16) -> [u8; 4] {
    let entry = tb.dataplane.service(&svc.key).unwrap();
    let hash = flow_hash4(ip4_raw(src), svc.key.entry::<Addr4>().unwrap().addr, port_raw(sport), svc.key.port, svc.key.proto, 0);
    let id = tb.dataplane.maps.read_slot(entry.maglev_offset + hash % entry.maglev_size).unwrap();
    ip4_octets(tb.dataplane.maps.v4.backends.get(&id, 0).unwrap().addr)
}


// ---------------------------------------------------------------------------------------------
// Packets that are not for a service, and malformed ones.

#[test]
fn non_service_packets_pass_unchanged() -> Result<()> {
    in_private_netns(|| {
        let tb = testbed();
        let v6 = |udp: bool| {
            let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 64);
            let mut out = Vec::new();
            if udp { b.udp(1234, 53).write(&mut out, b"q").unwrap() } else { b.tcp(1234, 443, 1, 100).syn().write(&mut out, &[]).unwrap() }
            out
        };
        let icmp = {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(CLIENT, VIP, 64).icmpv4_echo_request(7, 1).write(&mut out, b"ping").unwrap();
            out
        };
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            ("ipv4 tcp", tcp_syn(CLIENT, [10, 1, 1, 1], 40000, 80), reason::PASS_NOT_SERVICE),
            ("icmp to a service address (no ports: v1 leaves ICMP to the stack)", icmp, reason::PASS_NOT_TCP_UDP),
            ("ipv4 udp", udp(CLIENT, [10, 1, 1, 1], 40000, 53, b"hello"), reason::PASS_NOT_SERVICE),
            ("ipv6 tcp", v6(false), reason::PASS_NOT_SERVICE),
            ("ipv6 udp", v6(true), reason::PASS_NOT_SERVICE),
        ];
        for (what, pkt, why) in cases {
            let before = reason_count(&tb, why);
            let (verdict, out) = tb.run_xdp(&pkt)?;
            assert_eq!(verdict, XDP_PASS, "{what}");
            assert_eq!(out, pkt, "{what}: bytes unchanged");
            assert_eq!(reason_count(&tb, why), before + 1, "{what}: counted");
            let (verdict, out) = tb.run_tc(&pkt)?;
            assert_eq!((verdict, out), (TC_ACT_OK, pkt), "{what} at TC");
        }
        Ok(())
    })
}

#[test]
fn truncated_and_malformed_headers_drop_with_a_reason() -> Result<()> {
    in_private_netns(|| {
        let tb = testbed();
        let syn = tcp_syn(CLIENT, VIP, 40000, 80);
        let udp_pkt = udp(CLIENT, VIP, 40000, 53, b"x");
        let vlan = {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).single_vlan(VlanId::try_new(7).unwrap()).ipv4(CLIENT, VIP, 64).tcp(1, 2, 3, 4).write(&mut out, &[]).unwrap();
            out
        };
        let mut bad_version = syn.clone();
        bad_version[14] = 0x65; // version 6 in an IPv4 ethertype
        let mut short_ihl = syn.clone();
        short_ihl[14] = 0x44; // IHL 4 (16 bytes) is below the minimum
        let mut long_ihl = syn[..14 + 20].to_vec();
        long_ihl[14] = 0x46; // options announced, none present
        let v6 = {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6([0; 16], [0; 16], 64).udp(1, 2).write(&mut out, &[]).unwrap();
            out
        };
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            ("vlan tag cut", vlan[..16].to_vec(), reason::DROP_TRUNCATED_VLAN),
            ("ipv4 header cut", syn[..14 + 12].to_vec(), reason::DROP_TRUNCATED_IP4),
            ("ipv4 options cut", long_ihl, reason::DROP_TRUNCATED_IP4),
            ("ipv4 version 6", bad_version, reason::DROP_MALFORMED_IP4),
            ("ipv4 ihl 4", short_ihl, reason::DROP_MALFORMED_IP4),
            ("ipv6 header cut", v6[..14 + 30].to_vec(), reason::DROP_TRUNCATED_IP6),
            ("tcp header cut", syn[..14 + 20 + 10].to_vec(), reason::DROP_TRUNCATED_L4),
            ("udp header cut", udp_pkt[..14 + 20 + 4].to_vec(), reason::DROP_TRUNCATED_L4),
        ];
        // The kernel refuses to build an skb for these two, so only XDP can be shown them.
        let xdp_only = ["ipv4 header cut", "ipv6 header cut"];
        for (what, pkt, why) in cases {
            for hook in ["xdp", "tc"] {
                if hook == "tc" && xdp_only.contains(&what) {
                    assert!(tb.run_tc(&pkt).is_err(), "{what}: the kernel now accepts it at TC; test it there");
                    continue;
                }
                let before = reason_count(&tb, why);
                let run = if hook == "xdp" { tb.run_xdp(&pkt) } else { tb.run_tc(&pkt) };
                let (verdict, _) = run.map_err(|e| e.context(format!("{what} at {hook}")))?;
                assert_eq!(verdict, if hook == "xdp" { XDP_DROP } else { TC_ACT_SHOT }, "{what} at {hook}");
                assert_eq!(reason_count(&tb, why), before + 1, "{what} at {hook}: counted as {}", reason::NAMES[why as usize]);
            }
        }
        // A frame shorter than an Ethernet header never reaches XDP or TC: the kernel refuses
        // even to test-run one. The program's DROP_TRUNCATED_ETH branch is the guard regardless.
        assert!(tb.run_xdp(&syn[..13]).is_err());
        Ok(())
    })
}

const V6_CLIENT: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const V6_NODE: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// An IPv6 UDP or TCP packet behind `exts` (their next-header fields chained by etherparse).
fn v6_with(exts: Ipv6Extensions, tcp: bool) -> Vec<u8> {
    let header = Ipv6Header { source: V6_CLIENT, destination: V6_NODE, hop_limit: 64, ..Default::default() };
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ip(IpHeaders::Ipv6(header, exts));
    let mut out = Vec::new();
    if tcp { b.tcp(40000, 443, 1, 100).syn().write(&mut out, &[]).unwrap() } else { b.udp(40000, 53).write(&mut out, b"query").unwrap() }
    out
}

/// An IPv6 packet whose header names `next` and whose payload is `payload`, as given.
fn v6_raw(next: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Ethernet2Header { source: CLIENT_MAC, destination: NODE_MAC, ether_type: EtherType::IPV6 }.write(&mut out).unwrap();
    let header = Ipv6Header { source: V6_CLIENT, destination: V6_NODE, hop_limit: 64, next_header: IpNumber(next), payload_length: payload.len() as u16, ..Default::default() };
    header.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    out
}

/// IPv6 is walked header by header, as far as the transport header: every extension header
/// kind, a first fragment, and the verdicts of what cannot be walked or is cut short. IPv6
/// Services are not balanced yet, so a whole TCP or UDP packet passes as `pass_ipv6`.
#[test]
fn ipv6_extension_headers_are_walked_to_the_transport_header() -> Result<()> {
    in_private_netns(|| {
        let tb = testbed();
        let opts = |next: u8, payload_len: usize| Ipv6RawExtHeader::new_raw(IpNumber(next), &vec![0; payload_len]).unwrap();
        let hop_by_hop = Ipv6Extensions { hop_by_hop_options: Some(opts(0, 6)), ..Default::default() };
        let destination = Ipv6Extensions { destination_options: Some(opts(0, 14)), ..Default::default() };
        let routing = Ipv6Extensions { routing: Some(Ipv6RoutingExtensions { routing: opts(0, 22), final_destination_options: None }), ..Default::default() };
        let first_fragment = Ipv6Extensions { fragment: Some(Ipv6FragmentHeader::new(IpNumber(0), IpFragOffset::ZERO, true, 7)), ..Default::default() };
        let auth = Ipv6Extensions { auth: Some(IpAuthHeader::new(IpNumber(0), 1, 1, &[0; 12]).unwrap()), ..Default::default() };
        let every_kind = Ipv6Extensions {
            hop_by_hop_options: Some(opts(0, 6)),
            destination_options: Some(opts(0, 6)),
            routing: Some(Ipv6RoutingExtensions { routing: opts(0, 6), final_destination_options: Some(opts(0, 6)) }),
            fragment: Some(Ipv6FragmentHeader::new(IpNumber(0), IpFragOffset::ZERO, true, 7)),
            auth: Some(IpAuthHeader::new(IpNumber(0), 1, 1, &[0; 4]).unwrap()),
        };
        let later_fragment = {
            let exts = Ipv6Extensions { fragment: Some(Ipv6FragmentHeader::new(IpNumber(0), IpFragOffset::try_new(100).unwrap(), false, 7)), ..Default::default() };
            v6_with(exts, false)
        };
        let neighbour_solicitation = {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6(V6_CLIENT, V6_NODE, 255).icmpv6(Icmpv6Type::NeighborSolicitation).write(&mut out, &[0; 20]).unwrap();
            out
        };
        // Nine destination-options headers of 8 bytes each, then UDP: one more than is walked.
        let long_chain = {
            let mut payload = Vec::new();
            for i in 0..9 {
                payload.extend_from_slice(&[if i < 8 { 60 } else { 17 }, 0, 1, 4, 0, 0, 0, 0]);
            }
            payload.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
            v6_raw(60, &payload)
        };
        let esp = v6_raw(50, &[0; 24]);
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            ("udp behind hop-by-hop options", v6_with(hop_by_hop.clone(), false), reason::PASS_NOT_SERVICE),
            ("tcp behind destination options", v6_with(destination, true), reason::PASS_NOT_SERVICE),
            ("udp behind a routing header", v6_with(routing, false), reason::PASS_NOT_SERVICE),
            ("tcp in a first fragment", v6_with(first_fragment, true), reason::PASS_NOT_SERVICE),
            ("udp behind an authentication header", v6_with(auth, false), reason::PASS_NOT_SERVICE),
            ("tcp behind every kind at once", v6_with(every_kind.clone(), true), reason::PASS_NOT_SERVICE),
            ("a later fragment", later_fragment, reason::PASS_FRAGMENT),
            ("neighbour solicitation", neighbour_solicitation, reason::PASS_NOT_TCP_UDP),
            ("encrypted (ESP)", esp, reason::PASS_NOT_TCP_UDP),
            ("nine extension headers", long_chain, reason::PASS_IPV6_LONG_CHAIN),
        ];
        for (what, pkt, why) in cases {
            let before = reason_count(&tb, why);
            let (verdict, out) = tb.run_xdp(&pkt)?;
            assert_eq!((verdict, &out), (XDP_PASS, &pkt), "{what}: passes unchanged");
            assert_eq!(reason_count(&tb, why), before + 1, "{what}: counted as {}", reason::NAMES[why as usize]);
            let (verdict, out) = tb.run_tc(&pkt)?;
            assert_eq!((verdict, out), (TC_ACT_OK, pkt), "{what} at TC");
            assert_eq!(reason_count(&tb, why), before + 2, "{what} at TC: counted");
        }

        // Cut short at each layer: in an extension header's first 8 bytes, in the rest of its
        // announced length, and in the transport header behind the chain.
        let hbh = v6_with(hop_by_hop, false);
        let all = v6_with(every_kind, true);
        let mut longer_than_sent = hbh[..14 + 40 + 8].to_vec();
        longer_than_sent[14 + 40 + 1] = 3; // announces 32 bytes of options; 8 are there
        let cut: Vec<(&str, Vec<u8>, u32)> = vec![
            ("hop-by-hop header cut", hbh[..14 + 40 + 4].to_vec(), reason::DROP_TRUNCATED_IP6),
            ("hop-by-hop options cut", longer_than_sent, reason::DROP_TRUNCATED_IP6),
            ("chain cut in its last extension header", all[..all.len() - 20 - 6].to_vec(), reason::DROP_TRUNCATED_IP6),
            ("tcp header cut behind the chain", all[..all.len() - 10].to_vec(), reason::DROP_TRUNCATED_L4),
            ("udp header cut behind hop-by-hop", hbh[..14 + 40 + 8 + 4].to_vec(), reason::DROP_TRUNCATED_L4),
        ];
        for (what, pkt, why) in cut {
            for hook in ["xdp", "tc"] {
                let before = reason_count(&tb, why);
                let run = if hook == "xdp" { tb.run_xdp(&pkt) } else { tb.run_tc(&pkt) };
                let (verdict, _) = run.map_err(|e| e.context(format!("{what} at {hook}")))?;
                assert_eq!(verdict, if hook == "xdp" { XDP_DROP } else { TC_ACT_SHOT }, "{what} at {hook}");
                assert_eq!(reason_count(&tb, why), before + 1, "{what} at {hook}: counted as {}", reason::NAMES[why as usize]);
            }
        }
        Ok(())
    })
}

#[test]
fn fragments_have_defined_verdicts() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        tb.dataplane.apply(&[frontend(VIP, 53, IPPROTO_UDP, KIND_CLUSTER_IP, &BACKENDS, true)])?;
        let pkt = udp(CLIENT, VIP, 40000, 53, b"first fragment");
        let with_frag = |flags_offset: u16| {
            let mut p = pkt.clone();
            p[14 + 6..14 + 8].copy_from_slice(&flags_offset.to_be_bytes());
            let mut h = Ipv4Header::from_slice(&p[14..]).unwrap().0;
            h.header_checksum = h.calc_header_checksum();
            p[14 + 10..14 + 12].copy_from_slice(&h.header_checksum.to_be_bytes());
            p
        };
        // First fragment of a service flow: the rest could not follow the rewrite.
        let (v, _) = tb.run_xdp(&with_frag(0x2000))?;
        assert_eq!(v, XDP_DROP);
        assert_eq!(reason_count(&tb, reason::DROP_SERVICE_FRAGMENT), 1);
        // A later fragment carries no ports: passed to the stack untouched.
        let later = with_frag(0x0003);
        let (v, out) = tb.run_xdp(&later)?;
        assert_eq!((v, out), (XDP_PASS, later));
        assert_eq!(reason_count(&tb, reason::PASS_FRAGMENT), 1);
        // First fragment of something that is not a service: untouched.
        let mut other = with_frag(0x2000);
        other[14 + 16] = 11;
        let mut h = Ipv4Header::from_slice(&other[14..]).unwrap().0;
        h.header_checksum = h.calc_header_checksum();
        other[14 + 10..14 + 12].copy_from_slice(&h.header_checksum.to_be_bytes());
        let (v, out) = tb.run_xdp(&other)?;
        assert_eq!((v, out), (XDP_PASS, other));
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Service path.

#[test]
fn ct_miss_selects_the_maglev_backend_and_rewrites_with_valid_checksums() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let svc = frontend(VIP, 80, IPPROTO_TCP, KIND_LOAD_BALANCER, &BACKENDS, true);
        tb.dataplane.apply(std::slice::from_ref(&svc))?;
        let mut seen = std::collections::HashSet::new();
        for sport in 40000..40064u16 {
            let pkt = tcp_syn(CLIENT, VIP, sport, 80);
            let (verdict, out) = tb.run_xdp(&pkt)?;
            assert_eq!(verdict, XDP_PASS, "local backend: DNAT, then the stack delivers");
            let o = decode(&out);
            assert_eq!(o.dst, predicted_backend(&tb, &svc, CLIENT, sport), "Maglev pick");
            assert_eq!((o.src, o.sport, o.dport), (CLIENT, sport, 8080), "client address kept, port translated");
            assert_eq!(out.len(), pkt.len());
            seen.insert(o.dst);
            // Conntrack and reverse NAT hold the flow.
            let key = Ct4KeyV1 { src_addr: ip4_raw(CLIENT), dst_addr: ip4_raw(VIP), src_port: port_raw(sport), dst_port: port_raw(80), proto: IPPROTO_TCP, _pad: [0; 3] };
            let ct = tb.dataplane.maps.v4.conntrack.get(&key, 0)?;
            assert_eq!(ip4_octets(tb.dataplane.maps.v4.backends.get(&ct.backend_id, 0)?.addr), o.dst);
            let reply = Ct4KeyV1 { src_addr: ip4_raw(o.dst), dst_addr: ip4_raw(CLIENT), src_port: port_raw(8080), dst_port: port_raw(sport), proto: IPPROTO_TCP, _pad: [0; 3] };
            let rnat = tb.dataplane.maps.v4.reverse_nat.get(&reply, 0)?;
            assert_eq!((rnat.src_addr, rnat.src_port), (ip4_raw(VIP), port_raw(80)));
        }
        assert_eq!(seen.len(), 3, "64 flows reach all 3 backends");
        assert_eq!(reason_count(&tb, reason::FWD_LOCAL_BACKEND), 64);
        let id = tb.dataplane.service(&svc.key).unwrap().service_id;
        assert_eq!(tb.dataplane.maps.service_counters(id)?.packets, 64);
        Ok(())
    })
}

/// A UDP datagram without a checksum (0 means none in IPv4) keeps none through DNAT, from
/// outside (XDP) and from a pod (TC), and through the reverse NAT of its reply; its IPv4
/// header checksum is kept right. One with a checksum that comes out 0 is sent as 0xffff.
#[test]
fn udp_without_a_checksum_keeps_none_through_every_rewrite() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        tb.dataplane.apply(&[frontend(VIP, 53, IPPROTO_UDP, KIND_CLUSTER_IP, &BACKENDS, true)])?;
        let without_checksum = |mut frame: Vec<u8>| {
            frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
            frame
        };
        let checked = |frame: &[u8]| -> ([u8; 4], [u8; 4], u16, u16, [u8; 2]) {
            let ip = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..]).expect("IPv4").to_header();
            assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header checksum");
            let l4 = &frame[14 + 20..];
            (ip.source, ip.destination, u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]), [l4[6], l4[7]])
        };
        for (sport, from_pod) in [(41000u16, false), (41001, true)] {
            let query = without_checksum(udp(CLIENT, VIP, sport, 53, b"query"));
            let (_, out) = if from_pod { tb.run_tc(&query)? } else { tb.run_xdp(&query)? };
            let (src, backend, out_sport, dport, csum) = checked(&out);
            assert_eq!((src, out_sport, dport, csum), (CLIENT, sport, 8080, [0, 0]), "DNAT, still no checksum (from a pod: {from_pod})");
            assert!(BACKENDS.contains(&backend));
            let answer = without_checksum(udp(backend, CLIENT, 8080, sport, b"answer"));
            let (_, out) = tb.run_tc(&answer)?;
            assert_eq!(checked(&out), (VIP, CLIENT, 53, sport, [0, 0]), "reverse NAT, still no checksum");
        }
        // A checksummed datagram whose rewritten checksum comes out 0 is sent as 0xffff: its
        // payload word is chosen to cancel the rest of the translated datagram's sum.
        let backend = decode(&tb.run_xdp(&udp(CLIENT, VIP, 42000, 53, &[0, 0]))?.1).dst;
        let translated = etherparse::PacketBuilder::ipv4(CLIENT, backend, 64).udp(42000, 8080);
        let mut bytes = Vec::new();
        translated.write(&mut bytes, &[0, 0])?;
        let sum_without_payload = u16::from_be_bytes([bytes[20 + 6], bytes[20 + 7]]);
        let (_, out) = tb.run_xdp(&udp(CLIENT, VIP, 42000, 53, &sum_without_payload.to_be_bytes()))?;
        assert_eq!(u16::from_be_bytes([out[14 + 20 + 6], out[14 + 20 + 7]]), 0xffff, "a computed 0 goes out as 0xffff");
        decode(&out);
        Ok(())
    })
}

/// The state clock is read from jiffies as the loader calibrated them, in step with
/// CLOCK_MONOTONIC; the datapath follows what `LB_CLOCK_V1` says, and without it reads
/// `bpf_ktime_get_coarse_ns`, the same time.
#[test]
fn the_state_clock_runs_on_calibrated_jiffies_in_step_with_clock_monotonic() -> Result<()> {
    use aya::maps::{Array, MapData};
    use lb_agent::dataplane::conntrack::monotonic_ns;
    in_private_netns(|| {
        let mut tb = testbed();
        tb.dataplane.apply(&[frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &BACKENDS, true)])?;
        let mut clock: Array<MapData, StateClockV1> = Array::try_from(tb.ebpf.take_map(MAP_STATE_CLOCK).context("no clock map")?)?;
        let calibrated = clock.get(&0, 0)?;
        assert!([10_000_000, 4_000_000, 3_333_333, 1_000_000].contains(&calibrated.tick_ns), "{calibrated:?}");
        // A new flow's timestamp against the clock around it, at a tick's grain (from
        // jiffies as from the coarse clock: up to two ticks behind).
        let mut port = 47000;
        let mut stamp_of_a_new_flow = |tb: &Testbed| -> Result<(u64, u64, u64)> {
            port += 1;
            let before = monotonic_ns();
            tb.run_xdp(&tcp_syn(CLIENT, VIP, port, 80))?;
            let after = monotonic_ns();
            let ct = tb.dataplane.maps.v4.conntrack.get(&flow_key(CLIENT, VIP, port, 80, IPPROTO_TCP), 0)?;
            Ok((before, ct.last_seen_ns, after))
        };
        let grain = 2 * calibrated.tick_ns;
        let (before, stamp, after) = stamp_of_a_new_flow(&tb)?;
        assert!(before.saturating_sub(grain) <= stamp && stamp <= after, "calibrated: {before} <= {stamp} <= {after}");
        // The datapath reads the map: an offset an hour on puts the stamp an hour on.
        let hour = 3_600_000_000_000;
        clock.set(0, &StateClockV1 { offset_ns: calibrated.offset_ns.wrapping_add(hour), ..calibrated }, 0)?;
        let (before, stamp, after) = stamp_of_a_new_flow(&tb)?;
        assert!(before + hour - grain <= stamp && stamp <= after + hour, "an hour on: {before} + 1 h <= {stamp} <= {after} + 1 h");
        // Not calibrated: the helper's coarse clock, the same time.
        clock.set(0, &StateClockV1::default(), 0)?;
        let (before, stamp, after) = stamp_of_a_new_flow(&tb)?;
        assert!(before.saturating_sub(grain) <= stamp && stamp <= after, "uncalibrated: {before} <= {stamp} <= {after}");
        Ok(())
    })
}

#[test]
fn ct_hit_keeps_the_flow_on_its_backend_when_the_table_changes() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let svc = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &BACKENDS, true);
        tb.dataplane.apply(std::slice::from_ref(&svc))?;
        let flows: Vec<(u16, [u8; 4])> = (41000..41032u16).map(|sport| (sport, decode(&tb.run_xdp(&tcp_syn(CLIENT, VIP, sport, 80)).unwrap().1).dst)).collect();
        // Add two backends and remove none of the chosen ones: a new table, old flows stay.
        let mut grown = BACKENDS.to_vec();
        grown.extend([[10, 244, 2, 21], [10, 244, 2, 22]]);
        let svc2 = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &grown, true);
        tb.dataplane.apply(std::slice::from_ref(&svc2))?;
        let mut would_move = 0;
        for (sport, backend) in &flows {
            if predicted_backend(&tb, &svc2, CLIENT, *sport) != *backend {
                would_move += 1;
            }
            let (_, out) = tb.run_xdp(&tcp_ack(CLIENT, VIP, *sport, 80, b"GET /"))?;
            assert_eq!(decode(&out).dst, *backend, "flow {sport} stays on its backend");
        }
        assert!(would_move > 0, "the new table moves some of these flows, so the ct hit is what kept them");
        Ok(())
    })
}

#[test]
fn reverse_nat_restores_the_frontend_on_replies() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let svc = frontend(VIP, 53, IPPROTO_UDP, KIND_CLUSTER_IP, &BACKENDS, true);
        tb.dataplane.apply(std::slice::from_ref(&svc))?;
        let (_, out) = tb.run_tc(&udp(CLIENT, VIP, 45000, 53, b"query"))?;
        let backend = decode(&out).dst;
        // The backend's answer, as it leaves the backend.
        let reply = udp(backend, CLIENT, 8080, 45000, b"answer");
        let before = reason_count(&tb, reason::FWD_REVERSE_NAT);
        let (verdict, out) = tb.run_tc(&reply)?;
        assert_eq!(verdict, TC_ACT_OK, "no route in this namespace: the stack takes it");
        let o = decode(&out);
        assert_eq!((o.src, o.sport, o.dst, o.dport), (VIP, 53, CLIENT, 45000));
        assert_eq!(reason_count(&tb, reason::FWD_REVERSE_NAT), before + 1);
        Ok(())
    })
}

#[test]
fn ipv4_options_and_vlan_tags_are_honoured() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let svc = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &BACKENDS, true);
        tb.dataplane.apply(std::slice::from_ref(&svc))?;
        // IPv4 with 8 bytes of options (two NOPs and a 4-byte router alert... as raw bytes).
        let mut ip = Ipv4Header::new(20, 64, IpNumber::TCP, CLIENT, VIP).unwrap();
        ip.options = Ipv4Options::from([1, 1, 0x94, 4, 0, 0, 1, 1]);
        let mut with_options = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ip(etherparse::IpHeaders::Ipv4(ip, Default::default())).tcp(42000, 80, 1, 100).syn().write(&mut with_options, &[]).unwrap();
        assert_eq!(with_options[14] & 0x0f, 7, "IHL 7");
        let (verdict, out) = tb.run_xdp(&with_options)?;
        assert_eq!(verdict, XDP_PASS);
        let o = decode(&out);
        assert_eq!((o.dst, o.dport, o.sport), (predicted_backend(&tb, &svc, CLIENT, 42000), 8080, 42000));
        assert_eq!(&out[14 + 20..14 + 28], &[1, 1, 0x94, 4, 0, 0, 1, 1], "options untouched");

        // A VLAN-tagged frame: parsed past the tag, rewritten in place, tag kept.
        let mut tagged = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).single_vlan(VlanId::try_new(100).unwrap()).ipv4(CLIENT, VIP, 64).tcp(42001, 80, 1, 100).syn().write(&mut tagged, &[]).unwrap();
        let (verdict, out) = tb.run_xdp(&tagged)?;
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(&out[12..16], &tagged[12..16], "802.1Q tag kept");
        let o = decode(&out);
        assert_eq!((o.dst, o.dport), (predicted_backend(&tb, &svc, CLIENT, 42001), 8080));
        // Not for a service: untouched even with a tag.
        let mut other = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).single_vlan(VlanId::try_new(100).unwrap()).ipv4(CLIENT, [10, 1, 1, 1], 64).udp(1, 2).write(&mut other, b"x").unwrap();
        assert_eq!(tb.run_xdp(&other)?, (XDP_PASS, other));
        Ok(())
    })
}

#[test]
fn service_without_backends_rejects_with_a_reset_or_icmp() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        tb.dataplane.apply(&[frontend(VIP, 80, IPPROTO_TCP, KIND_LOAD_BALANCER, &[], true), frontend(VIP, 53, IPPROTO_UDP, KIND_LOAD_BALANCER, &[], true)])?;
        let (verdict, out) = tb.run_xdp(&tcp_syn(CLIENT, VIP, 43000, 80))?;
        assert_eq!(verdict, XDP_TX, "bounced back out the way it came");
        let o = decode(&out);
        assert_eq!((o.src, o.sport, o.dst, o.dport), (VIP, 80, CLIENT, 43000));
        assert_eq!((o.eth_src, o.eth_dst), (NODE_MAC, CLIENT_MAC));
        assert_eq!(o.tcp_flags, (false, true, true), "RST|ACK");
        assert_eq!(o.tcp_seq_ack, (0, 1001), "acknowledges the SYN");
        // The same from a pod, at TC: redirected back to the pod.
        let (verdict, out) = tb.run_tc(&tcp_syn(CLIENT, VIP, 43001, 80))?;
        assert_eq!(verdict, 7, "TC_ACT_REDIRECT");
        assert_eq!(decode(&out).tcp_flags, (false, true, true));
        // UDP gets an ICMP port unreachable that quotes the datagram's IP header and 8 bytes.
        let query = udp(CLIENT, VIP, 43000, 53, b"a payload the error does not quote");
        for hook in ["xdp", "tc"] {
            let (verdict, out) = if hook == "xdp" { tb.run_xdp(&query)? } else { tb.run_tc(&query)? };
            assert_eq!(verdict, if hook == "xdp" { XDP_TX } else { 7 }, "{hook}");
            assert_icmp_port_unreachable(&out, &query);
        }
        assert_eq!(reason_count(&tb, reason::REJECT_NO_BACKEND), 4);
        Ok(())
    })
}

#[test]
fn full_conntrack_fails_new_flows_and_keeps_old_ones() -> Result<()> {
    in_private_netns(|| {
        let mut tb = Testbed::new(&MapSizes { flows: Some(4), ..Default::default() })?;
        tb.dataplane.apply(&[frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &BACKENDS, true)])?;
        let mut established = Vec::new();
        for sport in 0..4u16 {
            let (v, out) = tb.run_xdp(&tcp_syn(CLIENT, VIP, 44000 + sport, 80))?;
            assert_eq!(v, XDP_PASS);
            established.push(decode(&out).dst);
        }
        let (v, _) = tb.run_xdp(&tcp_syn(CLIENT, VIP, 44100, 80))?;
        assert_eq!(v, XDP_DROP, "a fifth flow does not fit");
        assert_eq!(reason_count(&tb, reason::DROP_CT_FULL), 1);
        assert_eq!(tb.dataplane.maps.v4.conntrack.keys().count(), 4);
        for (sport, backend) in established.iter().enumerate() {
            let (v, out) = tb.run_xdp(&tcp_ack(CLIENT, VIP, 44000 + sport as u16, 80, b"data"))?;
            assert_eq!((v, decode(&out).dst), (XDP_PASS, *backend), "established flow {sport} still served");
        }
        Ok(())
    })
}

/// A node in a private namespace: a link towards "node B" (pods 10.244.0.0/16) and a default
/// route towards clients, with static neighbours; SNAT to NODE_IP. Forwarding is per
/// namespace and off in a new one; a node that routes has it on.
fn routed_node() -> Result<Testbed> {
    sh("sysctl -qw net.ipv4.conf.all.forwarding=1 && ip link add lbt0 type veth peer name lbt1 && ip link set lbt0 address 02:00:00:00:00:01 && ip link set lbt0 up && ip link set lbt1 up \
        && ip addr add 10.99.0.1/24 dev lbt0 && ip route add 10.244.0.0/16 via 10.99.0.2 && ip route add default via 10.99.0.254 \
        && ip neigh add 10.99.0.2 lladdr 02:00:00:00:00:0b dev lbt0 nud permanent \
        && ip neigh add 10.99.0.254 lladdr 02:00:00:00:00:fe dev lbt0 nud permanent")?;
    let mut tb = testbed();
    tb.dataplane.set_config(ConfigV1 { hash_seed: 0, snat_addr: ip4_raw(NODE_IP), nat_port_min: NAT_PORT_MIN, nat_port_max: NAT_PORT_MAX, _pad: 0 })?;
    tb.dataplane.set_node_ips(&[(IpAddr::from(NODE_IP), 0)])?;
    Ok(tb)
}

#[test]
fn remote_backend_is_snated_and_its_replies_translated_back() -> Result<()> {
    in_private_netns(|| {
        let mut tb = routed_node()?;
        // A NodePort frontend (address 0) whose one backend lives on another node.
        tb.dataplane.apply(&[frontend([0; 4], NODE_PORT, IPPROTO_TCP, KIND_NODE_PORT, &[[10, 244, 2, 7]], false)])?;

        let (verdict, out) = tb.run_xdp(&tcp_syn(CLIENT, NODE_IP, 46000, NODE_PORT))?;
        assert_eq!(verdict, XDP_REDIRECT, "out of lbt0, chosen by the FIB");
        let o = decode(&out);
        assert_eq!((o.src, o.dst, o.dport), (NODE_IP, [10, 244, 2, 7], 8080));
        assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&o.sport), "SNAT port {} from the range", o.sport);
        assert_eq!((o.eth_src, o.eth_dst), ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 0x0b]), "MACs from the FIB");
        assert_eq!(reason_count(&tb, reason::FWD_REMOTE_BACKEND), 1);
        let nat_port = o.sport;

        // Node B's answer comes back to the node address and the allocated port.
        let reply = tcp_ack([10, 244, 2, 7], NODE_IP, 8080, nat_port, b"");
        let (verdict, out) = tb.run_xdp(&reply)?;
        assert_eq!(verdict, XDP_REDIRECT);
        let o = decode(&out);
        assert_eq!((o.src, o.sport, o.dst, o.dport), (NODE_IP, NODE_PORT, CLIENT, 46000));
        assert_eq!(o.eth_dst, [2, 0, 0, 0, 0, 0xfe], "towards the default gateway");

        // A second flow gets its own port; the NAT entries are in the map.
        let (_, out) = tb.run_xdp(&tcp_syn(CLIENT, NODE_IP, 46001, NODE_PORT))?;
        assert_ne!(decode(&out).sport, nat_port);
        let snat_entries = tb.dataplane.maps.v4.reverse_nat.iter().filter_map(|e| e.ok()).filter(|(_, v)| v.flags & F_CT_SNAT != 0).count();
        assert_eq!(snat_entries, 2);

        // On a node with one device, a flow arrives where its backend's route leaves: sent back
        // out the same way (XDP_TX), rewritten as it would be redirected, new and established.
        let lbt0 = ifindex("lbt0")?;
        for packet in [tcp_syn(CLIENT, NODE_IP, 46002, NODE_PORT), tcp_ack(CLIENT, NODE_IP, 46002, NODE_PORT, b"x")] {
            let (verdict, out) = tb.run_xdp_on(&packet, lbt0)?;
            assert_eq!(verdict, XDP_TX, "back out lbt0");
            let o = decode(&out);
            assert_eq!((o.src, o.dst, o.dport), (NODE_IP, [10, 244, 2, 7], 8080));
            assert_eq!((o.eth_src, o.eth_dst), ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 0x0b]));
        }
        Ok(())
    })
}

/// From outside, a packet is looked up as a reply only when it goes to the SNAT address on a
/// NAT port, or to a pod the reply filter marks (one that reached a remote backend without
/// SNAT); a flow tracked before the filter existed gets its mark when an agent loads the maps
/// again.
#[test]
fn replies_from_outside_pass_the_reply_filter_and_a_reload_marks_older_flows() -> Result<()> {
    in_private_netns(|| {
        let mut tb = routed_node()?;
        let remote = [10, 244, 2, 7];
        tb.dataplane.apply(&[frontend([0; 4], NODE_PORT, IPPROTO_TCP, KIND_NODE_PORT, &[remote], false), frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[remote], false)])?;
        let filter_marks = |tb: &Testbed| -> Result<Vec<u32>> {
            let filter: aya::maps::Array<_, u8> = aya::maps::Array::try_from(tb.ebpf.map(MAP_REPLY_FILTER).expect("the filter"))?;
            Ok((0..REPLY_FILTER_SLOTS).filter(|i| filter.get(i, 0).is_ok_and(|m| m != 0)).collect())
        };
        // SNAT: its reply is let through by address and port, nothing is marked.
        let (_, out) = tb.run_xdp(&tcp_syn(CLIENT, NODE_IP, 46000, NODE_PORT))?;
        let nat_port = decode(&out).sport;
        assert_eq!(filter_marks(&tb)?, Vec::<u32>::new());
        let (verdict, out) = tb.run_xdp(&tcp_ack(remote, NODE_IP, 8080, nat_port, b""))?;
        assert_eq!((verdict, decode(&out).dst), (XDP_REDIRECT, CLIENT), "the SNAT reply translated back");

        // A pod (TC) reaching the remote backend without SNAT: its address is marked.
        let pod = [10, 244, 1, 20];
        let (_, out) = tb.run_tc(&tcp_syn(pod, VIP, 47000, 80))?;
        assert_eq!((decode(&out).src, decode(&out).dst), (pod, remote), "DNAT only");
        let slot = reply_filter_slot(&ip4_raw(pod));
        assert_eq!(filter_marks(&tb)?, vec![slot]);
        let reply = tcp_ack(remote, pod, 8080, 47000, b"");
        let (verdict, out) = tb.run_xdp(&reply)?;
        assert_eq!((verdict, decode(&out).src, decode(&out).sport), (XDP_PASS, VIP, 80), "the backend's reply arrives from outside, from the frontend");

        // As a flow of an older version would be: tracked, its reply address unmarked.
        let mut filter: aya::maps::Array<_, u8> = aya::maps::Array::try_from(tb.ebpf.map_mut(MAP_REPLY_FILTER).expect("the filter"))?;
        filter.set(slot, &0, 0)?;
        let (verdict, out) = tb.run_xdp(&reply)?;
        assert_eq!((verdict, out), (XDP_PASS, reply.clone()), "not looked up: passed untouched");
        // An agent loading the pinned maps marks what the reverse-NAT entries expect.
        let _reloaded = lb_agent::dataplane::load::load(&tb.mount.dir, &MapSizes::default())?;
        assert_eq!(filter_marks(&tb)?, vec![slot], "the pod again, not the SNAT address");
        let (_, out) = tb.run_xdp(&reply)?;
        assert_eq!(decode(&out).src, VIP, "translated back");
        Ok(())
    })
}

/// From a pod, a packet is looked up as a reply only when it comes from a local backend: the
/// agent marks a local backend's address while a frontend holds it, and an agent loading
/// pinned maps marks the source of every tracked reply.
#[test]
fn replies_from_pods_are_looked_up_only_from_local_backends() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let (client, backend) = ([10, 244, 1, 20], [10, 244, 1, 5]);
        let marks = |tb: &Testbed| -> Result<Vec<u32>> {
            let filter = tb.dataplane.maps.local_backends.as_ref().expect("the filter");
            Ok((0..REPLY_FILTER_SLOTS).filter(|i| filter.get(i, 0).is_ok_and(|m| m != 0)).collect())
        };
        let slot = reply_filter_slot(&ip4_raw(backend));
        let svc = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[backend], true);
        let remote = frontend([10, 96, 0, 11], 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[[10, 244, 2, 7]], false);
        tb.dataplane.apply(&[svc.clone(), remote.clone()])?;
        assert_eq!(marks(&tb)?, vec![slot], "the local backend only");
        let (_, out) = tb.run_tc(&tcp_syn(client, VIP, 47000, 80))?;
        assert_eq!(decode(&out).dst, backend);
        let reply = tcp_ack(backend, client, 8080, 47000, b"");
        let (_, out) = tb.run_tc(&reply)?;
        assert_eq!((decode(&out).src, decode(&out).sport), (VIP, 80), "the reply from the frontend");

        // Unmarked, as under an agent without the filter: not looked up, passed untouched.
        tb.dataplane.maps.local_backends.as_mut().expect("the filter").set(slot, &0, 0)?;
        assert_eq!(tb.run_tc(&reply)?, (TC_ACT_OK, reply.clone()));
        let _reloaded = lb_agent::dataplane::load::load(&tb.mount.dir, &MapSizes::default())?;
        assert_eq!(marks(&tb)?, vec![slot], "marked from the reverse-NAT entry");
        let (_, out) = tb.run_tc(&reply)?;
        assert_eq!(decode(&out).src, VIP, "translated again");

        // The last frontend of the backend goes, and its mark with it.
        tb.dataplane.apply(&[remote.clone()])?;
        assert_eq!(marks(&tb)?, Vec::<u32>::new());
        Ok(())
    })
}

/// A tracked flow's packet finds its frontend by the id its conntrack entry holds, while that
/// id is the frontend's: with no id entries (an older agent's maps) the flow is still forwarded,
/// by the frontend lookup, and a reload writes them; once the frontend is removed its flows
/// stop; and when its id goes to another frontend, they do not follow it.
#[test]
fn tracked_flows_find_their_frontend_by_id_while_it_is_theirs() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let (backend, other_backend) = ([10, 244, 1, 5], [10, 244, 1, 6]);
        let svc = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[backend], true);
        tb.dataplane.apply(&[svc.clone()])?;
        let entry = tb.dataplane.service(&svc.key).expect("programmed");
        let by_id = |tb: &Testbed, id: u32| -> Result<ServiceByIdV1> { Ok(tb.dataplane.maps.service_by_id.as_ref().expect("the map").get(&id, 0)?) };
        assert_eq!(by_id(&tb, entry.service_id)?, ServiceByIdV1 { addr: [ip4_raw(VIP), 0, 0, 0], port: port_raw(80), proto: IPPROTO_TCP, family: 4, entry });
        let (_, out) = tb.run_xdp(&tcp_syn(CLIENT, VIP, 46000, 80))?;
        assert_eq!(decode(&out).dst, backend);
        let segment = tcp_ack(CLIENT, VIP, 46000, 80, b"x");
        assert_eq!(decode(&tb.run_xdp(&segment)?.1).dst, backend, "tracked");

        tb.dataplane.maps.service_by_id.as_mut().expect("the map").set(entry.service_id, &ServiceByIdV1::default(), 0)?;
        assert_eq!(decode(&tb.run_xdp(&segment)?.1).dst, backend, "tracked, through the frontend lookup");
        let _reloaded = lb_agent::dataplane::load::load(&tb.mount.dir, &MapSizes::default())?;
        assert_eq!(by_id(&tb, entry.service_id)?.entry, entry, "written from the frontend map");

        tb.dataplane.apply(&[])?;
        assert_eq!(by_id(&tb, entry.service_id)?, ServiceByIdV1::default(), "cleared with the frontend");
        assert_eq!(tb.run_xdp(&segment)?, (XDP_PASS, segment.clone()), "no frontend: untouched");

        let other = frontend([10, 96, 0, 11], 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[other_backend], true);
        tb.dataplane.apply(&[other.clone()])?;
        assert_eq!(tb.dataplane.service(&other.key).expect("programmed").service_id, entry.service_id, "the id handed out again");
        assert_eq!(tb.run_xdp(&segment)?, (XDP_PASS, segment.clone()), "the old flow does not follow its id");
        Ok(())
    })
}

/// A packet is looked up as an exact frontend's only where the frontend filter marks its
/// address, port and protocol: the agent keeps a bit set while a frontend it stands for is in
/// the maps, and an agent loading pinned maps marks the frontends an earlier one left. A
/// packet to a frontend's address on a port no Service uses (a scan) is not looked up.
#[test]
fn frontends_are_looked_up_only_where_the_filter_marks_them() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let set_bits = |tb: &Testbed| -> Result<Vec<(u32, u64)>> {
            let filter = tb.dataplane.maps.frontend_filter.as_ref().expect("the filter");
            let mut bits = Vec::new();
            for word in 0..FRONTEND_FILTER_WORDS {
                let w = filter.get(word);
                bits.extend((0..64).filter(|b| w & (1u64 << b) != 0).map(|b| (word, 1u64 << b)));
            }
            Ok(bits)
        };
        let sorted = |mut bits: Vec<(u32, u64)>| {
            bits.sort();
            bits
        };
        let backend = [10, 244, 1, 5];
        let tcp = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[backend], true);
        let udp_svc = frontend(VIP, 53, IPPROTO_UDP, KIND_CLUSTER_IP, &[backend], true);
        let node_port = frontend([0; 4], NODE_PORT, IPPROTO_TCP, KIND_NODE_PORT, &[backend], true);
        tb.dataplane.apply(&[tcp.clone(), udp_svc.clone(), node_port.clone()])?;
        let tcp_bit = frontend_filter_bit(&ip4_raw(VIP), port_raw(80), IPPROTO_TCP);
        let udp_bit = frontend_filter_bit(&ip4_raw(VIP), port_raw(53), IPPROTO_UDP);
        assert_eq!(set_bits(&tb)?, sorted(vec![tcp_bit, udp_bit]), "the two frontends, not the NodePort");
        let to_vip = tcp_syn(CLIENT, VIP, 46000, 80);
        let (_, out) = tb.run_xdp(&to_vip)?;
        assert_eq!(decode(&out).dst, backend);

        // The frontend's address on another port: a frontend there that the filter does not
        // mark (written into the map alone) is not looked up; marked, it is.
        let scan = tcp_syn(CLIENT, VIP, 46002, 81);
        let other_port = frontend(VIP, 81, IPPROTO_TCP, KIND_CLUSTER_IP, &[backend], true);
        let entry = tb.dataplane.service(&tcp.key).expect("programmed");
        let other_key = Service4KeyV1 { addr: ip4_raw(VIP), port: port_raw(81), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER };
        tb.dataplane.maps.v4.services.insert(&other_key, &entry, 0)?;
        assert_eq!(tb.run_xdp(&scan)?, (XDP_PASS, scan.clone()), "another port of a marked address: passed untouched");
        tb.dataplane.maps.v4.services.remove(&other_key)?;
        tb.dataplane.apply(&[tcp.clone(), udp_svc.clone(), node_port.clone(), other_port.clone()])?;
        let (_, out) = tb.run_xdp(&scan)?;
        assert_eq!(decode(&out).dst, backend, "a frontend on that port: marked and answered");
        tb.dataplane.apply(&[tcp.clone(), udp_svc.clone(), node_port.clone()])?;

        // The TCP frontend goes; the UDP one keeps its own bit.
        tb.dataplane.apply(&[udp_svc.clone(), node_port.clone()])?;
        assert_eq!(set_bits(&tb)?, vec![udp_bit]);
        tb.dataplane.apply(&[node_port.clone()])?;
        assert_eq!(set_bits(&tb)?, Vec::<(u32, u64)>::new(), "no frontend, no mark");

        // A frontend as an agent without the filter would have left it: in the frontend map,
        // unmarked. It is not looked up until an agent loads the pinned maps again.
        tb.dataplane.apply(&[tcp.clone(), node_port.clone()])?;
        tb.dataplane.maps.frontend_filter.as_ref().expect("the filter").set(tcp_bit.0, tcp_bit.1, false);
        let to_pinned = tcp_syn(CLIENT, VIP, 46001, 80);
        assert_eq!(tb.run_xdp(&to_pinned)?, (XDP_PASS, to_pinned.clone()), "unmarked: passed untouched");
        let _reloaded = lb_agent::dataplane::load::load(&tb.mount.dir, &MapSizes::default())?;
        assert_eq!(set_bits(&tb)?, vec![tcp_bit], "marked from the pinned frontend map");
        let (_, out) = tb.run_xdp(&to_pinned)?;
        assert_eq!(decode(&out).dst, backend, "answered");
        Ok(())
    })
}

/// A packet that matches no exact frontend is looked up as a NodePort only on a port some
/// NodePort uses: the agent keeps the filter equal to the frontend maps (a port stays marked
/// while any family, protocol or scope uses it), and an agent loading pinned maps marks the
/// NodePorts an earlier one left.
#[test]
fn nodeports_answer_on_the_ports_the_filter_marks_and_a_reload_marks_pinned_ones() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        tb.dataplane.set_node_ips(&[(IpAddr::from(NODE_IP), 0)])?;
        let marked = |tb: &Testbed| -> Result<Vec<u16>> {
            let filter = tb.dataplane.maps.nodeport_filter.as_ref().expect("the filter");
            let mut ports = Vec::new();
            for word in 0..NODEPORT_FILTER_WORDS {
                let bits = filter.get(word);
                ports.extend((0..64u32).filter(|b| bits & (1 << b) != 0).map(|b| port_host((word * 64 + b) as u16)));
            }
            Ok(ports)
        };
        let backend = [10, 244, 1, 5];
        let tcp = frontend([0; 4], NODE_PORT, IPPROTO_TCP, KIND_NODE_PORT, &[backend], true);
        let udp_np = frontend([0; 4], NODE_PORT, IPPROTO_UDP, KIND_NODE_PORT, &[backend], true);
        let cluster_ip = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[backend], true);
        tb.dataplane.apply(&[tcp.clone(), udp_np.clone(), cluster_ip.clone()])?;
        assert_eq!(marked(&tb)?, vec![NODE_PORT], "the NodePorts' port only");
        let to_node_port = tcp_syn(CLIENT, NODE_IP, 46000, NODE_PORT);
        let (verdict, out) = tb.run_xdp(&to_node_port)?;
        assert_eq!((verdict, decode(&out).dst, decode(&out).dport), (XDP_PASS, backend, 8080), "DNAT to the backend");
        let to_ssh = tcp_syn(CLIENT, NODE_IP, 46000, 22);
        assert_eq!(tb.run_xdp(&to_ssh)?, (XDP_PASS, to_ssh.clone()), "the node's own port: untouched");

        // The TCP NodePort goes; the UDP one keeps the port marked.
        tb.dataplane.apply(&[udp_np.clone(), cluster_ip.clone()])?;
        assert_eq!(marked(&tb)?, vec![NODE_PORT]);
        let to_gone = tcp_syn(CLIENT, NODE_IP, 46001, NODE_PORT);
        assert_eq!(tb.run_xdp(&to_gone)?, (XDP_PASS, to_gone.clone()), "no TCP NodePort any more");
        tb.dataplane.apply(&[cluster_ip.clone()])?;
        assert_eq!(marked(&tb)?, Vec::<u16>::new(), "no NodePort, no mark");

        // A NodePort as an agent without the filter would have left it: in the frontend map,
        // its port unmarked. It is not looked up until an agent loads the pinned maps again.
        tb.dataplane.apply(&[tcp.clone(), cluster_ip.clone()])?;
        tb.dataplane.maps.mark_node_port(port_raw(NODE_PORT), false)?;
        let to_pinned = tcp_syn(CLIENT, NODE_IP, 46002, NODE_PORT);
        assert_eq!(tb.run_xdp(&to_pinned)?, (XDP_PASS, to_pinned.clone()), "unmarked: passed untouched");
        let _reloaded = lb_agent::dataplane::load::load(&tb.mount.dir, &MapSizes::default())?;
        assert_eq!(marked(&tb)?, vec![NODE_PORT], "marked from the pinned frontend map");
        let (_, out) = tb.run_xdp(&to_pinned)?;
        assert_eq!(decode(&out).dst, backend, "answered");
        Ok(())
    })
}

/// Packets of remote flows, new and established, take the next hop cached when a first packet
/// to their backend was routed through the FIB (in the CPU's slot of the backend's id; replies
/// by their route key), until a routing change bumps the generation (the agent's watcher sees
/// the neighbour change) or a second passes.
#[test]
fn remote_flows_new_and_established_use_the_cached_next_hop_until_a_routing_change() -> Result<()> {
    in_private_netns(|| {
        // Next hops towards backends are cached per CPU: every packet here runs on this one.
        pin_to_this_cpu()?;
        let mut tb = routed_node()?;
        tb.dataplane.apply(&[frontend([0; 4], NODE_PORT, IPPROTO_TCP, KIND_NODE_PORT, &[[10, 244, 2, 7]], false)])?;
        let neighbour_mac = |tb: &Testbed, sport: u16| -> Result<[u8; 6]> { Ok(decode(&tb.run_xdp(&tcp_syn(CLIENT, NODE_IP, sport, NODE_PORT))?.1).eth_dst) };
        // Every CPU's cached next hops towards backends.
        let backend_hops = |tb: &Testbed| -> Result<Vec<(u32, BackendNextHop4V1)>> {
            let slots: aya::maps::PerCpuArray<_, BackendNextHop4V1> = aya::maps::PerCpuArray::try_from(tb.ebpf.map(MAP_BACKEND_NEXT_HOPS).expect("the backends' cache"))?;
            let mut used = Vec::new();
            for slot in 0..BACKEND_NEXT_HOP_SLOTS {
                used.extend(slots.get(&slot, 0)?.iter().filter(|h| h.key.dst != 0).map(|h| (slot, *h)));
            }
            Ok(used)
        };
        let first = decode(&tb.run_xdp(&tcp_syn(CLIENT, NODE_IP, 46000, NODE_PORT))?.1);
        assert_eq!(first.eth_dst, [2, 0, 0, 0, 0, 0x0b], "the FIB's answer");
        let id = tb.dataplane.maps.v4.backends.iter().position(|be| be.is_ok_and(|be| be.addr == ip4_raw([10, 244, 2, 7]))).expect("programmed") as u32;
        let cached = backend_hops(&tb)?;
        assert_eq!(cached.len(), 1, "on the one CPU that ran it: {cached:?}");
        let (slot, hop) = cached[0];
        assert_eq!((slot, hop.key, hop.hop.dmac), (backend_next_hop_slot(id), NextHop4KeyV1 { src: ip4_raw(NODE_IP), dst: ip4_raw([10, 244, 2, 7]), ifindex: hop.key.ifindex }, [2, 0, 0, 0, 0, 0x0b]));
        // The reply, routed back to the client, is cached by its route key in the shared LRU.
        let next_hops: aya::maps::HashMap<_, NextHop4KeyV1, NextHopV1> = aya::maps::HashMap::try_from(tb.ebpf.map(MAP_NEXT_HOPS).expect("the replies' cache"))?;
        assert_eq!(next_hops.iter().count(), 0, "no reply yet");
        let (verdict, out) = tb.run_xdp(&tcp_ack([10, 244, 2, 7], NODE_IP, 8080, first.sport, b""))?;
        assert_eq!((verdict, decode(&out).eth_dst), (XDP_REDIRECT, [2, 0, 0, 0, 0, 0xfe]));
        let replies: Vec<(NextHop4KeyV1, NextHopV1)> = next_hops.iter().collect::<Result<_, _>>()?;
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!((replies[0].0.src, replies[0].0.dst, replies[0].1.dmac), (ip4_raw(NODE_IP), ip4_raw(CLIENT), [2, 0, 0, 0, 0, 0xfe]));

        // Node B's MAC changes; nothing watches yet, so flows keep the cached next hop, the
        // established one and a new one alike.
        sh("ip neigh replace 10.99.0.2 lladdr 02:00:00:00:00:0c dev lbt0 nud permanent")?;
        assert_eq!(neighbour_mac(&tb, 46000)?, [2, 0, 0, 0, 0, 0x0b], "established: cached");
        assert_eq!(neighbour_mac(&tb, 46001)?, [2, 0, 0, 0, 0, 0x0b], "new flow: cached");
        assert_eq!(backend_hops(&tb)?.len(), 1, "one next hop for the one backend");

        // The agent's watcher bumps the generation on the next change.
        lb_agent::dataplane::next_hops::watch(&tb.mount.dir)?;
        let generation = lb_agent::dataplane::next_hops::Generation::open(&tb.mount.dir)?;
        let before = generation.get()?;
        sh("ip neigh replace 10.99.0.2 lladdr 02:00:00:00:00:0d dev lbt0 nud permanent")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while generation.get()? == before && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(generation.get()? != before, "the neighbour change bumped the generation");
        assert_eq!(neighbour_mac(&tb, 46000)?, [2, 0, 0, 0, 0, 0x0d], "established: looked up again");
        assert_eq!(neighbour_mac(&tb, 46002)?, [2, 0, 0, 0, 0, 0x0d], "new flow: the new answer");

        // Without a watcher, a cached next hop ages out within a second.
        let mut raw: aya::maps::Array<_, u32> = aya::maps::Array::try_from(tb.ebpf.map_mut(MAP_NEXT_HOP_GENERATION).expect("the generation"))?;
        let now = raw.get(&0, 0)?;
        sh("ip neigh replace 10.99.0.2 lladdr 02:00:00:00:00:0e dev lbt0 nud permanent")?;
        std::thread::sleep(std::time::Duration::from_millis(100));
        raw.set(0, &now, 0)?; // as if the change went unseen
        assert_eq!(neighbour_mac(&tb, 46000)?, [2, 0, 0, 0, 0, 0x0d], "still cached");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(neighbour_mac(&tb, 46000)?, [2, 0, 0, 0, 0, 0x0e], "aged out: the FIB again");
        Ok(())
    })
}

/// Keeps the calling thread (and the programs its test runs run) on the CPU it is on.
fn pin_to_this_cpu() -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls only read and write it.
    unsafe {
        let cpu = libc::sched_getcpu();
        anyhow::ensure!(cpu >= 0, "sched_getcpu: {}", std::io::Error::last_os_error());
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        anyhow::ensure!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn a_full_maglev_array_fails_only_the_service_that_does_not_fit() -> Result<()> {
    in_private_netns(|| {
        // Room for one table of 251 slots, not two.
        let mut tb = Testbed::new(&MapSizes { maglev_slots: Some(400), ..Default::default() })?;
        let first = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &BACKENDS, true);
        // Another Service with the same backends: tables are never shared across Services.
        let second = Frontend { name: "test/other:80".into(), ..frontend([10, 96, 0, 11], 80, IPPROTO_TCP, KIND_CLUSTER_IP, &BACKENDS, true) };
        let stats = tb.dataplane.apply(&[first.clone(), second.clone()])?;
        assert_eq!((stats.added, stats.failed.len()), (1, 1));
        assert_eq!(stats.failed[0].0, "test/other:80", "the error names the frontend");
        assert!(stats.failed[0].1.contains("LB_MAGLEV_V2 is full"), "{:?}", stats.failed);
        assert!(tb.dataplane.service(&second.key).is_none(), "nothing half-written for the one that failed");
        let (verdict, out) = tb.run_xdp(&tcp_syn(CLIENT, VIP, 45000, 80))?;
        assert_eq!((verdict, decode(&out).dport), (XDP_PASS, 8080), "the service that fit serves");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Service semantics: affinity, traffic policy, source ranges, hairpin, ICMP errors.

fn flow_key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> Ct4KeyV1 {
    Ct4KeyV1 { src_addr: ip4_raw(src), dst_addr: ip4_raw(dst), src_port: port_raw(sport), dst_port: port_raw(dport), proto, _pad: [0; 3] }
}

#[test]
fn affinity_keeps_a_client_on_its_backend_until_it_expires_or_the_backend_goes() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let svc = Frontend { affinity_timeout_s: Some(30), ..frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &BACKENDS, true) };
        tb.dataplane.apply(std::slice::from_ref(&svc))?;
        let first = decode(&tb.run_tc(&tcp_syn(CLIENT, VIP, 47000, 80))?.1).dst;
        // Ports whose Maglev pick is another backend: only affinity keeps them on `first`.
        let others: Vec<u16> = (47001..47200).filter(|p| predicted_backend(&tb, &svc, CLIENT, *p) != first).take(20).collect();
        assert_eq!(others.len(), 20);
        for &sport in &others {
            assert_eq!(decode(&tb.run_tc(&tcp_syn(CLIENT, VIP, sport, 80))?.1).dst, first, "new flow from port {sport} follows the client's affinity");
        }
        let id = tb.dataplane.service(&svc.key).unwrap().service_id;
        let key = AffinityKeyV1::ip4(ip4_raw(CLIENT), id);
        let entry = tb.dataplane.maps.affinity.get(&key, 0)?;
        assert_eq!(ip4_octets(tb.dataplane.maps.v4.backends.get(&entry.backend_id, 0)?.addr), first);
        // Another client has its own affinity.
        let other_client = [192, 0, 2, 99];
        tb.run_tc(&tcp_syn(other_client, VIP, 47000, 80))?;
        assert!(tb.dataplane.maps.affinity.get(&AffinityKeyV1::ip4(ip4_raw(other_client), id), 0).is_ok());

        // Expiry: the entry aged past the timeout no longer decides.
        tb.dataplane.maps.affinity.insert(&key, &AffinityV1 { last_seen_ns: entry.last_seen_ns - 31_000_000_000, ..entry }, 0)?;
        let sport = others[0];
        let expected = predicted_backend(&tb, &svc, CLIENT, sport + 1000);
        let got = decode(&tb.run_tc(&tcp_syn(CLIENT, VIP, sport + 1000, 80))?.1).dst;
        assert_eq!(got, expected, "expired affinity: Maglev decides again");

        // Removal: a backend taken out of the service ends affinity to it at once.
        let pinned_to = decode(&tb.run_tc(&tcp_syn(CLIENT, VIP, 48000, 80))?.1).dst;
        let remaining: Vec<[u8; 4]> = BACKENDS.iter().copied().filter(|b| *b != pinned_to).collect();
        let shrunk = Frontend { affinity_timeout_s: Some(30), ..frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &remaining, true) };
        tb.dataplane.apply(std::slice::from_ref(&shrunk))?;
        let matches: Vec<AffinityMatchKeyV1> = tb.dataplane.maps.affinity_match.keys().collect::<Result<_, _>>()?;
        assert_eq!(matches.len(), 2, "one match per remaining backend: {matches:?}");
        for sport in 48001..48021u16 {
            assert_ne!(decode(&tb.run_tc(&tcp_syn(CLIENT, VIP, sport, 80))?.1).dst, pinned_to, "no new flow goes to the removed backend");
        }
        // Affinity off: the flag is cleared and the matches go.
        tb.dataplane.apply(&[frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &remaining, true)])?;
        assert_eq!(tb.dataplane.service(&svc.key).unwrap().flags & F_SVC_AFFINITY, 0);
        assert_eq!(tb.dataplane.maps.affinity_match.keys().count(), 0);
        Ok(())
    })
}

#[test]
fn external_traffic_policy_local_uses_only_local_endpoints_for_outside_clients() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let local = BackendSpec { addr: IpAddr::from(BACKENDS[0]), port: 8080, local: true, weight: 1 };
        let remote = BackendSpec { addr: IpAddr::from([10, 244, 2, 11]), port: 8080, local: false, weight: 1 };
        let policy = |key: Service4KeyV1, backends: Vec<BackendSpec>| Frontend { key: key.into(), kind: KIND_LOAD_BALANCER, name: "test/etp:80".into(), backends: backends.into(), ext_local: key.scope == SCOPE_CLUSTER, ..Frontend::default() };
        let cluster = Service4KeyV1 { addr: ip4_raw(VIP), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER };
        let local_key = Service4KeyV1 { scope: SCOPE_LOCAL, ..cluster };
        tb.dataplane.apply(&[policy(cluster, vec![local, remote]), policy(local_key, vec![local])])?;
        for sport in 49000..49020u16 {
            let (verdict, out) = tb.run_xdp(&tcp_syn(CLIENT, VIP, sport, 80))?;
            let o = decode(&out);
            assert_eq!((verdict, o.dst, o.src), (XDP_PASS, BACKENDS[0], CLIENT), "outside client: local endpoint, its address kept");
        }
        // Pods see the whole Service.
        let mut pod_backends = std::collections::HashSet::new();
        for sport in 49100..49140u16 {
            pod_backends.insert(decode(&tb.run_tc(&tcp_syn(CLIENT, VIP, sport, 80))?.1).dst);
        }
        assert_eq!(pod_backends.len(), 2, "pods reach both endpoints");

        // No local endpoint: outside clients' new flows are dropped, counted.
        tb.dataplane.apply(&[policy(cluster, vec![remote]), policy(local_key, vec![])])?;
        let (verdict, _) = tb.run_xdp(&tcp_syn(CLIENT, VIP, 49500, 80))?;
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(reason_count(&tb, reason::DROP_NO_LOCAL_BACKEND), 1);
        Ok(())
    })
}

#[test]
fn source_ranges_let_clients_in_the_cidrs_through_and_drop_the_rest() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let svc = Frontend { source_ranges: Some(vec![([192, 0, 2, 0].into(), 24), ([203, 0, 113, 7].into(), 32)]), ..frontend(VIP, 80, IPPROTO_TCP, KIND_LOAD_BALANCER, &BACKENDS, true) };
        tb.dataplane.apply(std::slice::from_ref(&svc))?;
        for (client, allowed) in [([192, 0, 2, 10], true), ([192, 0, 2, 255], true), ([203, 0, 113, 7], true), ([203, 0, 113, 8], false), ([198, 51, 100, 1], false)] {
            let (verdict, out) = tb.run_xdp(&tcp_syn(client, VIP, 50000, 80))?;
            if allowed {
                assert_eq!((verdict, decode(&out).dport), (XDP_PASS, 8080), "{client:?} is in range");
            } else {
                assert_eq!(verdict, XDP_DROP, "{client:?} is outside every range");
            }
        }
        assert_eq!(reason_count(&tb, reason::DROP_SOURCE_RANGE), 2);
        // The ranges are in the trie, and go when the Service no longer has them.
        assert_eq!(tb.dataplane.maps.v4.source_ranges.keys().count(), 2);
        tb.dataplane.apply(&[frontend(VIP, 80, IPPROTO_TCP, KIND_LOAD_BALANCER, &BACKENDS, true)])?;
        assert_eq!(tb.dataplane.maps.v4.source_ranges.keys().count(), 0);
        assert_eq!(tb.run_xdp(&tcp_syn([198, 51, 100, 1], VIP, 50001, 80))?.0, XDP_PASS);
        // Restricted to no range at all (its Service listed IPv6 ranges only): nobody gets in.
        tb.dataplane.apply(&[Frontend { source_ranges: Some(Vec::new()), ..frontend(VIP, 80, IPPROTO_TCP, KIND_LOAD_BALANCER, &BACKENDS, true) }])?;
        let dropped = reason_count(&tb, reason::DROP_SOURCE_RANGE);
        for client in [[192, 0, 2, 10], [198, 51, 100, 1]] {
            assert_eq!(tb.run_xdp(&tcp_syn(client, VIP, 50002, 80))?.0, XDP_DROP, "{client:?}");
        }
        assert_eq!(reason_count(&tb, reason::DROP_SOURCE_RANGE), dropped + 2);
        Ok(())
    })
}

#[test]
fn a_pod_that_lands_on_itself_is_hairpinned_through_the_hairpin_address() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let pod = BACKENDS[0];
        tb.dataplane.apply(&[frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[pod], true)])?;
        let (_, out) = tb.run_tc(&tcp_syn(pod, VIP, 51000, 80))?;
        let o = decode(&out);
        assert_eq!((o.src, o.dst, o.dport), (HAIRPIN_ADDR, pod, 8080), "its own address would be dropped as martian");
        assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&o.sport));
        assert_eq!(reason_count(&tb, reason::FWD_HAIRPIN), 1);
        // The pod's answer to the hairpin address comes back as from the frontend.
        let (_, out) = tb.run_tc(&tcp_ack(pod, HAIRPIN_ADDR, 8080, o.sport, b""))?;
        let r = decode(&out);
        assert_eq!((r.src, r.sport, r.dst, r.dport), (VIP, 80, pod, 51000));
        // Another pod is not source-NATed.
        let (_, out) = tb.run_tc(&tcp_syn(BACKENDS[1], VIP, 51001, 80))?;
        assert_eq!(decode(&out).src, BACKENDS[1]);
        Ok(())
    })
}

/// An ICMP error from `from` to `to`, quoting the first 28 bytes after the Ethernet header of `quoted`.
fn icmp_error(from: [u8; 4], to: [u8; 4], icmp_type: etherparse::Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(from, to, 64).icmpv4(icmp_type).write(&mut out, &quoted[14..14 + 28]).unwrap();
    out
}

/// Outer (src, dst), ICMP type, and the quoted datagram's (src, sport, dst, dport), every checksum checked.
fn decode_icmp_error(frame: &[u8]) -> (([u8; 4], [u8; 4]), etherparse::Icmpv4Type, ([u8; 4], u16, [u8; 4], u16)) {
    let p = SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "outer IPv4 checksum");
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!("not ICMP") };
    let mut expected = icmp.header();
    expected.update_checksum(icmp.payload());
    assert_eq!(icmp.checksum(), expected.checksum, "ICMP checksum");
    let (inner, rest) = Ipv4Header::from_slice(icmp.payload()).unwrap();
    assert_eq!(inner.header_checksum, inner.calc_header_checksum(), "quoted IPv4 checksum");
    let ports = (u16::from_be_bytes([rest[0], rest[1]]), u16::from_be_bytes([rest[2], rest[3]]));
    ((h.source, h.destination), icmp.icmp_type(), (inner.source, ports.0, inner.destination, ports.1))
}

#[test]
fn icmp_errors_about_translated_flows_reach_the_client_about_the_frontend() -> Result<()> {
    in_private_netns(|| {
        let mut tb = routed_node()?;
        let remote = [10, 244, 2, 7];
        tb.dataplane.apply(&[frontend([0; 4], NODE_PORT, IPPROTO_TCP, KIND_NODE_PORT, &[remote], false), frontend(VIP, 53, IPPROTO_UDP, KIND_CLUSTER_IP, &BACKENDS, true)])?;

        // 1. A router between this node and node B cannot forward a big segment of an SNATed
        //    NodePort flow: its "fragmentation needed" quotes node -> backend, and goes to the node.
        let (_, sent) = tb.run_xdp(&tcp_ack(CLIENT, NODE_IP, 46500, NODE_PORT, &[0u8; 100]))?;
        let frag_needed = etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
        let error = icmp_error([10, 99, 0, 2], NODE_IP, frag_needed.clone(), &sent);
        let (verdict, out) = tb.run_xdp(&error)?;
        assert_eq!(verdict, XDP_REDIRECT, "routed to the client");
        let (outer, icmp_type, inner) = decode_icmp_error(&out);
        assert_eq!(outer, (NODE_IP, CLIENT), "from the frontend to the client");
        assert_eq!(icmp_type, frag_needed, "type, code and MTU kept");
        assert_eq!(inner, (CLIENT, 46500, NODE_IP, NODE_PORT), "the quote is the client's own segment to the frontend");
        assert_eq!(&out[..6], &[2, 0, 0, 0, 0, 0xfe], "towards the default gateway");
        assert_eq!(reason_count(&tb, reason::FWD_ICMP_ERROR), 1);

        // 2. A backend pod answers a pod's UDP datagram with "port unreachable".
        let (_, sent) = tb.run_tc(&udp(CLIENT, VIP, 46600, 53, b"query"))?;
        let backend = decode(&sent).dst;
        let unreachable = etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port);
        let (verdict, out) = tb.run_tc(&icmp_error(backend, CLIENT, unreachable.clone(), &sent))?;
        assert_eq!(verdict, 7, "TC_ACT_REDIRECT: routed to the client");
        let (outer, icmp_type, inner) = decode_icmp_error(&out);
        assert_eq!((outer, icmp_type, inner), ((VIP, CLIENT), unreachable, (CLIENT, 46600, VIP, 53)));
        assert_eq!(reason_count(&tb, reason::FWD_ICMP_ERROR), 2);

        // 3. An error about no flow of ours is left alone.
        let stranger = icmp_error([10, 99, 0, 2], NODE_IP, frag_needed, &tcp_ack(NODE_IP, [10, 1, 1, 1], 40000, 443, &[0u8; 100]));
        assert_eq!(tb.run_xdp(&stranger)?, (XDP_PASS, stranger.clone()));
        assert!(tb.dataplane.maps.v4.conntrack.get(&flow_key(CLIENT, NODE_IP, 46500, NODE_PORT, IPPROTO_TCP), 0).is_ok(), "the flow itself is untouched");
        Ok(())
    })
}

#[test]
fn a_full_maglev_array_still_takes_an_endpoint_change_in_place() -> Result<()> {
    in_private_netns(|| {
        // Room for one 251-slot table only: the service's new table cannot go to a fresh slice.
        let mut tb = Testbed::new(&MapSizes { maglev_slots: Some(400), ..Default::default() })?;
        let svc = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &BACKENDS, true);
        // Its NodePort: the same Service port, so the same table.
        let node_port = |f: &Frontend| Frontend { key: FrontendKey { addr: Ipv4Addr::UNSPECIFIED.into(), port: port_raw(30080), ..f.key }, kind: KIND_NODE_PORT, ..f.clone() };
        tb.dataplane.apply(&[svc.clone(), node_port(&svc)])?;
        let before = tb.dataplane.service(&svc.key).unwrap();
        let np_before = tb.dataplane.service(&node_port(&svc).key).unwrap();
        assert_eq!((np_before.maglev_offset, np_before.maglev_size), (before.maglev_offset, before.maglev_size), "one table for the Service port");
        let removed = BACKENDS[1];
        let removed_id = tb.dataplane.backend_id(&svc.backends[1]).unwrap();
        let shrunk = frontend(VIP, 80, IPPROTO_TCP, KIND_CLUSTER_IP, &[BACKENDS[0], BACKENDS[2]], true);
        let stats = tb.dataplane.apply(&[shrunk.clone(), node_port(&shrunk)])?;
        assert_eq!((stats.updated, stats.failed.len()), (2, 0), "{:?}", stats.failed);
        let after = tb.dataplane.service(&svc.key).unwrap();
        let np_after = tb.dataplane.service(&node_port(&svc).key).unwrap();
        assert_eq!((after.maglev_offset, after.maglev_size), (before.maglev_offset, before.maglev_size), "rewritten in place");
        assert_eq!((np_after.maglev_offset, np_after.maglev_size), (after.maglev_offset, after.maglev_size), "still shared");
        assert_eq!(tb.dataplane.table_count(), 1);
        for slot in after.maglev_offset..after.maglev_offset + after.maglev_size {
            assert_ne!(tb.dataplane.maps.read_slot(slot)?, removed_id, "slot {slot} still names the removed backend");
        }
        for sport in 52000..52040u16 {
            assert_ne!(decode(&tb.run_xdp(&tcp_syn(CLIENT, VIP, sport, 80))?.1).dst, removed, "no new flow goes to the removed backend");
        }
        Ok(())
    })
}
