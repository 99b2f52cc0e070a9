//! Program tests over IPv6: the real object, run with BPF_PROG_TEST_RUN on etherparse-built
//! IPv6 packets. DNAT and reverse NAT bytes with every checksum checked, extension headers in
//! front of the transport header, fragments, TCP RST and ICMPv6 rejects, SNAT through the FIB,
//! and ICMPv6 errors about translated flows.
mod common;

use std::net::{IpAddr, Ipv6Addr};

use anyhow::Result;
use common::*;
use etherparse::{
    icmpv6::DestUnreachableCode, IpHeaders, IpNumber, Icmpv6Type, Ipv6Extensions, Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, IpFragOffset, PacketBuilder, SlicedPacket, TransportSlice,
};
use lb_agent::dataplane::{BackendSpec, Frontend, FrontendKey};
use lb_common::*;
use testbed::{
    netns::{in_private_netns, sh},
    progtest::Testbed,
};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const BACKENDS: [Ipv6Addr; 3] = [Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11), Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x12), Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x13)];
const NODE_PORT: u16 = 30080;

fn frontend(addr: Ipv6Addr, port: u16, proto: u8, kind: u8, backends: &[Ipv6Addr], local: bool) -> Frontend {
    Frontend {
        key: FrontendKey { addr: addr.into(), port: port_raw(port), proto, scope: SCOPE_CLUSTER },
        kind,
        name: format!("test/v6-{port}:{port}").into(),
        backends: backends.iter().map(|b| BackendSpec { addr: IpAddr::V6(*b), port: 8080, local, weight: 1 }).collect(),
        ..Frontend::default()
    }
}

/// A TCP or UDP packet `src:sport -> dst:dport` behind the extension headers `exts`.
fn packet(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, tcp: Option<&str>, exts: Ipv6Extensions, payload: &[u8]) -> Vec<u8> {
    let header = Ipv6Header { source: src.octets(), destination: dst.octets(), hop_limit: 64, ..Default::default() };
    let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ip(IpHeaders::Ipv6(header, exts));
    let mut out = Vec::new();
    match tcp {
        Some(flags) => {
            let mut t = b.tcp(sport, dport, 1000, 64240);
            if flags.contains('S') {
                t = t.syn();
            }
            if flags.contains('A') {
                t = t.ack(5000);
            }
            t.write(&mut out, payload).unwrap();
        }
        None => b.udp(sport, dport).write(&mut out, payload).unwrap(),
    }
    out
}

fn tcp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: &str) -> Vec<u8> {
    packet(src, dst, sport, dport, Some(flags), Ipv6Extensions::default(), &[])
}

fn udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    packet(src, dst, sport, dport, None, Ipv6Extensions::default(), b"query")
}

/// The decoded IPv6 + L4 view of an output packet, its TCP/UDP checksum checked.
#[derive(Debug, PartialEq)]
struct Out {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    macs: ([u8; 6], [u8; 6]),
    /// (SYN, ACK, RST), and (seq, ack).
    tcp: Option<((bool, bool, bool), (u32, u32))>,
}

fn decode(frame: &[u8]) -> Out {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else { panic!("not Ethernet") };
    let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
    let h = ip.header().to_header();
    let (src, dst) = (Ipv6Addr::from(h.source), Ipv6Addr::from(h.destination));
    let (sport, dport, tcp) = match p.transport.as_ref().expect("a transport header") {
        TransportSlice::Tcp(t) => {
            let th = t.to_header();
            assert_eq!(th.checksum, th.calc_checksum_ipv6(&h, t.payload()).unwrap(), "TCP checksum");
            (th.source_port, th.destination_port, Some(((th.syn, th.ack, th.rst), (th.sequence_number, th.acknowledgment_number))))
        }
        TransportSlice::Udp(u) => {
            let uh = u.to_header();
            assert_eq!(uh.checksum, uh.calc_checksum_ipv6(&h, u.payload()).unwrap(), "UDP checksum");
            (uh.source_port, uh.destination_port, None)
        }
        other => panic!("unexpected transport {other:?}"),
    };
    Out { src, dst, sport, dport, macs: (eth.source(), eth.destination()), tcp }
}

/// The backend Maglev must pick for this flow, from the same hash in user space.
fn predicted_backend(tb: &Testbed, svc: &Frontend, src: Ipv6Addr, sport: u16) -> Ipv6Addr {
    let entry = tb.dataplane.service(&svc.key).unwrap();
    let key = svc.key.entry::<Addr6>().unwrap();
    let flow = Ct6KeyV1 { src_addr: ip6_raw(src.octets()), dst_addr: key.addr, src_port: port_raw(sport), dst_port: key.port, proto: key.proto, _pad: [0; 3] };
    let id = tb.dataplane.maps.read_slot(entry.maglev_offset + flow_hash(&flow, 0) % entry.maglev_size).unwrap();
    ip6_addr(tb.dataplane.maps.v6.backends.get(&id, 0).unwrap().addr)
}

#[test]
fn ipv6_new_flows_are_dnated_to_the_maglev_backend_and_replies_translated_back() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        let web = frontend(VIP, 80, IPPROTO_TCP, KIND_LOAD_BALANCER, &BACKENDS, true);
        let dns = frontend(VIP, 53, IPPROTO_UDP, KIND_CLUSTER_IP, &BACKENDS, true);
        tb.dataplane.apply(&[web.clone(), dns])?;
        let options = |len: usize| Ipv6RawExtHeader::new_raw(IpNumber(0), &vec![0; len]).unwrap();
        let with_options = Ipv6Extensions { hop_by_hop_options: Some(options(6)), destination_options: Some(options(14)), ..Default::default() };
        let mut seen = std::collections::HashSet::new();
        for sport in 40000..40048u16 {
            // Every third flow carries hop-by-hop and destination options before TCP.
            let exts = if sport % 3 == 0 { with_options.clone() } else { Ipv6Extensions::default() };
            let pkt = packet(CLIENT, VIP, sport, 80, Some("S"), exts, &[]);
            let (verdict, out) = tb.run_xdp(&pkt)?;
            assert_eq!(verdict, XDP_PASS, "local backend: DNAT, then the stack delivers");
            let o = decode(&out);
            let backend = predicted_backend(&tb, &web, CLIENT, sport);
            assert_eq!((o.src, o.sport, o.dst, o.dport), (CLIENT, sport, backend, 8080), "the Maglev pick; client address kept");
            assert_eq!(out.len(), pkt.len());
            assert_eq!(&out[..14 + 8], &pkt[..14 + 8], "MACs and the IPv6 header up to the addresses untouched");
            seen.insert(backend);
            // Conntrack and reverse NAT hold the flow.
            let key = Ct6KeyV1 { src_addr: ip6_raw(CLIENT.octets()), dst_addr: ip6_raw(VIP.octets()), src_port: port_raw(sport), dst_port: port_raw(80), proto: IPPROTO_TCP, _pad: [0; 3] };
            let ct = tb.dataplane.maps.v6.conntrack.get(&key, 0)?;
            assert_eq!(ip6_addr(tb.dataplane.maps.v6.backends.get(&ct.backend_id, 0)?.addr), backend);
            // The backend's SYN-ACK, leaving its pod (TC), comes back from the frontend.
            let (_, out) = tb.run_tc(&tcp(backend, CLIENT, 8080, sport, "SA"))?;
            let o = decode(&out);
            assert_eq!((o.src, o.sport, o.dst, o.dport), (VIP, 80, CLIENT, sport));
        }
        assert_eq!(seen.len(), 3, "48 flows reach all 3 backends");
        assert_eq!((reason_count(&tb, reason::FWD_LOCAL_BACKEND), reason_count(&tb, reason::FWD_REVERSE_NAT)), (48, 48));

        // UDP from a pod at TC, and the answer.
        let (_, out) = tb.run_tc(&udp(CLIENT, VIP, 45000, 53))?;
        let o = decode(&out);
        assert!(BACKENDS.contains(&o.dst) && o.dport == 8080 && o.src == CLIENT, "{o:?}");
        let (_, answer) = tb.run_tc(&udp(o.dst, CLIENT, 8080, 45000))?;
        let a = decode(&answer);
        assert_eq!((a.src, a.sport, a.dst, a.dport), (VIP, 53, CLIENT, 45000));

        // The first fragment of a service flow drops (the rest could not follow the rewrite).
        let first = Ipv6Extensions { fragment: Some(Ipv6FragmentHeader::new(IpNumber(0), IpFragOffset::ZERO, true, 7)), ..Default::default() };
        let (verdict, _) = tb.run_xdp(&packet(CLIENT, VIP, 46000, 53, None, first, b"part one"))?;
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(reason_count(&tb, reason::DROP_SERVICE_FRAGMENT), 1);
        Ok(())
    })
}

#[test]
fn an_ipv6_frontend_without_backends_answers_with_a_reset_or_icmpv6_port_unreachable() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        tb.dataplane.apply(&[frontend(VIP, 80, IPPROTO_TCP, KIND_LOAD_BALANCER, &[], true), frontend(VIP, 53, IPPROTO_UDP, KIND_LOAD_BALANCER, &[], true)])?;
        for (hook, expected) in [("xdp", XDP_TX), ("tc", TC_ACT_REDIRECT)] {
            let syn = tcp(CLIENT, VIP, 43000, 80, "S");
            let (verdict, out) = if hook == "xdp" { tb.run_xdp(&syn)? } else { tb.run_tc(&syn)? };
            assert_eq!(verdict, expected, "{hook}: back the way it came");
            let o = decode(&out);
            assert_eq!((o.src, o.sport, o.dst, o.dport, o.macs), (VIP, 80, CLIENT, 43000, (NODE_MAC, CLIENT_MAC)), "{hook}");
            assert_eq!(o.tcp, Some(((false, true, true), (0, 1001))), "{hook}: RST|ACK acknowledging the SYN");

            // Without and with a destination options header: the quote is the IPv6 header, its
            // extension headers and 8 bytes of UDP.
            let options = Ipv6Extensions { destination_options: Some(Ipv6RawExtHeader::new_raw(IpNumber(0), &[0; 14])?), ..Default::default() };
            for (exts, headers) in [(Ipv6Extensions::default(), 40), (options, 56)] {
            let query = packet(CLIENT, VIP, 43000, 53, None, exts, b"a payload the error does not quote");
            let (verdict, out) = if hook == "xdp" { tb.run_xdp(&query)? } else { tb.run_tc(&query)? };
            assert_eq!(verdict, expected, "{hook}");
            let p = SlicedPacket::from_ethernet(&out).expect("parses");
            let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
            let h = ip.header().to_header();
            assert_eq!((Ipv6Addr::from(h.source), Ipv6Addr::from(h.destination), h.next_header), (VIP, CLIENT, IpNumber::IPV6_ICMP), "{hook}");
            let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else { panic!("not ICMPv6") };
            assert_eq!(icmp.icmp_type(), Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port), "{hook}");
            assert!(icmp.is_checksum_valid(h.source, h.destination), "{hook}: ICMPv6 checksum (with its pseudo-header)");
            assert_eq!(icmp.payload(), &query[14..14 + headers + 8], "{hook}: quotes the IP headers and 8 bytes of UDP");
            assert_eq!((&out[..6], &out[6..12]), (&CLIENT_MAC[..], &NODE_MAC[..]), "{hook}: back to the sender's MAC");
            assert_eq!(out.len(), 14 + 40 + 8 + headers + 8);
            }
        }
        assert_eq!(reason_count(&tb, reason::REJECT_NO_BACKEND), 6);
        Ok(())
    })
}

/// A namespace with a routed IPv6 uplink: node B's pods behind fd00:99::2, a default gateway.
fn routed_node() -> Result<Testbed> {
    sh("sysctl -qw net.ipv6.conf.all.forwarding=1 && ip link add lbt0 type veth peer name lbt1 && ip link set lbt0 address 02:00:00:00:00:01 && ip link set lbt0 up && ip link set lbt1 up \
        && ip -6 addr add fd00:99::1/64 dev lbt0 nodad && ip -6 route add fd00:244::/32 via fd00:99::2 && ip -6 route add default via fd00:99::fe \
        && ip -6 neigh add fd00:99::2 lladdr 02:00:00:00:00:0b dev lbt0 nud permanent \
        && ip -6 neigh add fd00:99::fe lladdr 02:00:00:00:00:fe dev lbt0 nud permanent")?;
    let mut tb = testbed();
    tb.dataplane.set_snat6(Some(NODE))?;
    tb.dataplane.set_node_ips(&[(IpAddr::V6(NODE), 0)])?;
    Ok(tb)
}

const REMOTE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 7);

#[test]
fn an_ipv6_remote_backend_is_snated_through_the_fib_and_its_replies_translated_back() -> Result<()> {
    in_private_netns(|| {
        let mut tb = routed_node()?;
        // A NodePort frontend (the unspecified address) whose one backend lives on node B.
        tb.dataplane.apply(&[frontend(Ipv6Addr::UNSPECIFIED, NODE_PORT, IPPROTO_TCP, KIND_NODE_PORT, &[REMOTE], false)])?;
        let (verdict, out) = tb.run_xdp(&tcp(CLIENT, NODE, 46000, NODE_PORT, "S"))?;
        assert_eq!(verdict, XDP_REDIRECT, "out of lbt0, chosen by the FIB");
        let o = decode(&out);
        assert_eq!((o.src, o.dst, o.dport), (NODE, REMOTE, 8080), "source-NATed to the node's IPv6 address");
        assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&o.sport), "SNAT port {} from the range", o.sport);
        assert_eq!(o.macs, ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 0x0b]), "MACs from the FIB");
        assert_eq!(reason_count(&tb, reason::FWD_REMOTE_BACKEND), 1);

        let (verdict, out) = tb.run_xdp(&tcp(REMOTE, NODE, 8080, o.sport, "SA"))?;
        assert_eq!(verdict, XDP_REDIRECT);
        let r = decode(&out);
        assert_eq!((r.src, r.sport, r.dst, r.dport), (NODE, NODE_PORT, CLIENT, 46000));
        assert_eq!(r.macs.1, [2, 0, 0, 0, 0, 0xfe], "towards the default gateway");
        let snat = tb.dataplane.maps.v6.reverse_nat.iter().filter_map(|e| e.ok()).filter(|(_, v)| v.flags & F_CT_SNAT != 0).count();
        assert_eq!(snat, 1);

        // Without an IPv6 SNAT address such a flow cannot be sent: it drops, with its reason.
        tb.dataplane.set_snat6(None)?;
        let (verdict, _) = tb.run_xdp(&tcp(CLIENT, NODE, 46001, NODE_PORT, "S"))?;
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(reason_count(&tb, reason::DROP_NO_SNAT_ADDR), 1);
        Ok(())
    })
}

#[test]
fn an_icmpv6_packet_too_big_about_a_translated_flow_reaches_the_client_about_the_frontend() -> Result<()> {
    in_private_netns(|| {
        let mut tb = routed_node()?;
        tb.dataplane.apply(&[frontend(Ipv6Addr::UNSPECIFIED, NODE_PORT, IPPROTO_TCP, KIND_NODE_PORT, &[REMOTE], false)])?;
        let (_, sent) = tb.run_xdp(&packet(CLIENT, NODE, 46500, NODE_PORT, Some("A"), Ipv6Extensions::default(), &[0u8; 100]))?;
        let nat_port = decode(&sent).sport;
        // A router towards node B cannot forward the SNATed segment: "packet too big", quoting
        // node -> backend, sent to the node.
        let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
        let router = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);
        let mut error = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6(router.octets(), NODE.octets(), 64).icmpv6(too_big.clone()).write(&mut error, &sent[14..14 + 48])?;
        let (verdict, out) = tb.run_xdp(&error)?;
        assert_eq!(verdict, XDP_REDIRECT, "routed to the client");
        let p = SlicedPacket::from_ethernet(&out).expect("parses");
        let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
        let h = ip.header().to_header();
        assert_eq!((Ipv6Addr::from(h.source), Ipv6Addr::from(h.destination)), (NODE, CLIENT), "from the frontend to the client");
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else { panic!("not ICMPv6") };
        assert_eq!(icmp.icmp_type(), too_big, "type and MTU kept");
        assert!(icmp.is_checksum_valid(h.source, h.destination), "ICMPv6 checksum");
        let (quoted, rest) = Ipv6Header::from_slice(icmp.payload())?;
        let ports = (u16::from_be_bytes([rest[0], rest[1]]), u16::from_be_bytes([rest[2], rest[3]]));
        assert_eq!((Ipv6Addr::from(quoted.source), ports.0, Ipv6Addr::from(quoted.destination), ports.1), (CLIENT, 46500, NODE, NODE_PORT), "the quote is the client's own segment");
        assert_ne!(nat_port, 46500);
        assert_eq!(reason_count(&tb, reason::FWD_ICMP_ERROR), 1);

        // Neighbour discovery is the stack's.
        let mut solicitation = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6(CLIENT.octets(), NODE.octets(), 255).icmpv6(Icmpv6Type::NeighborSolicitation).write(&mut solicitation, &[0; 20])?;
        assert_eq!(tb.run_xdp(&solicitation)?, (XDP_PASS, solicitation.clone()));
        Ok(())
    })
}
