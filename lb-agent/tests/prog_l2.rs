//! Program tests of the L2 answers in XDP, with the real object run by BPF_PROG_TEST_RUN: ARP
//! requests and IPv6 neighbour solicitations for announced addresses become their answers in
//! place (XDP_TX), every byte checked; anything else, an expired entry and another device's
//! entry pass untouched.
mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use common::*;
use etherparse::{Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_agent::dataplane::conntrack::monotonic_ns;
use lb_common::*;
use testbed::netns::in_private_netns;

/// BPF_PROG_TEST_RUN runs XDP as if the packet came in on the loopback device.
const IFINDEX: u32 = 1;
const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xaa];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x200);
const MINUTE_NS: u64 = 60_000_000_000;

/// An ARP request from the client: who has `target`, tell `sender`.
fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    lb_agent::announce::arp_request(CLIENT_MAC, sender, target)
}

/// A neighbour solicitation for `target` from `src` (with the source link-layer option unless
/// `src` is unspecified, as in duplicate address detection).
fn solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut body = target.octets().to_vec();
    if !src.is_unspecified() {
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&CLIENT_MAC);
    }
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, [0x33, 0x33, 0xff, 0, 2, 0])
        .ipv6(src.octets(), [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 2, 0], 255)
        .icmpv6(Icmpv6Type::Unknown { type_u8: 135, code_u8: 0, bytes5to8: [0; 4] })
        .write(&mut out, &body)
        .unwrap();
    out
}

#[test]
fn arp_requests_for_announced_addresses_are_answered_in_place() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        tb.dataplane.maps.set_announced::<Addr4>(&[(IFINDEX, ip4_raw(VIP.octets()), OUR_MAC)], monotonic_ns() + MINUTE_NS)?;
        let (verdict, out) = tb.run_xdp(&arp_request(CLIENT, VIP))?;
        assert_eq!(verdict, XDP_TX);
        let reply = [&CLIENT_MAC[..], &OUR_MAC, &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2], &OUR_MAC, &VIP.octets(), &CLIENT_MAC, &CLIENT.octets()].concat();
        assert_eq!(out, reply, "an ARP reply: VIP is at OUR_MAC, to the client");
        assert_eq!(reason_count(&tb, reason::FWD_L2_ANSWER), 1);
        // Another address, and a gratuitous ARP for ours (another host announcing it): the stack's.
        for (what, request) in [("another address", arp_request(CLIENT, Ipv4Addr::new(10, 99, 0, 201))), ("gratuitous", arp_request(VIP, VIP))] {
            let (verdict, out) = tb.run_xdp(&request)?;
            assert_eq!((verdict, out), (XDP_PASS, request), "{what}");
        }
        // The entry of another device, and an expired entry: not answered.
        tb.dataplane.maps.set_announced::<Addr4>(&[(IFINDEX + 7, ip4_raw(VIP.octets()), OUR_MAC)], monotonic_ns() + MINUTE_NS)?;
        assert_eq!(tb.run_xdp(&arp_request(CLIENT, VIP))?.0, XDP_PASS, "another device's");
        tb.dataplane.maps.set_announced::<Addr4>(&[(IFINDEX, ip4_raw(VIP.octets()), OUR_MAC)], monotonic_ns() - 1)?;
        assert_eq!(tb.run_xdp(&arp_request(CLIENT, VIP))?.0, XDP_PASS, "expired");
        assert_eq!(reason_count(&tb, reason::FWD_L2_ANSWER), 1);
        Ok(())
    })
}

#[test]
fn neighbour_solicitations_for_announced_addresses_are_advertised() -> Result<()> {
    in_private_netns(|| {
        let mut tb = testbed();
        tb.dataplane.maps.set_announced::<Addr6>(&[(IFINDEX, ip6_raw(VIP6.octets()), OUR_MAC)], monotonic_ns() + MINUTE_NS)?;
        // From the client (solicited, to it), and for duplicate address detection (from ::, to all nodes).
        for (src, dst, flags) in [(CLIENT6, CLIENT6, 0x60u8), (Ipv6Addr::UNSPECIFIED, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0x20)] {
            let (verdict, out) = tb.run_xdp(&solicitation(src, VIP6))?;
            assert_eq!(verdict, XDP_TX, "from {src}");
            assert_eq!((&out[..6], &out[6..12]), (&CLIENT_MAC[..], &OUR_MAC[..]), "from {src}: back to its sender, from our MAC");
            let p = SlicedPacket::from_ethernet(&out)?;
            let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
            let h = ip.header();
            assert_eq!((h.source_addr(), h.destination_addr(), h.hop_limit(), h.payload_length()), (VIP6, dst, 255, 32), "from {src}");
            let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else { panic!("not ICMPv6") };
            assert_eq!((icmp.type_u8(), icmp.code_u8(), icmp.bytes5to8()[0]), (136, 0, flags), "from {src}: an advertisement, override set");
            let expected = icmp.icmp_type().calc_checksum(h.source(), h.destination(), icmp.payload())?;
            assert_eq!(icmp.checksum(), expected, "from {src}: ICMPv6 checksum");
            assert_eq!(icmp.payload(), [&VIP6.octets()[..], &[2, 1], &OUR_MAC].concat(), "from {src}: the target and its MAC");
        }
        // A solicitation for another address is the stack's.
        let other = solicitation(CLIENT6, Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x201));
        assert_eq!(tb.run_xdp(&other)?, (XDP_PASS, other));
        assert_eq!(reason_count(&tb, reason::FWD_L2_ANSWER), 2);
        Ok(())
    })
}
