//! Program tests of NetworkPolicy in the kernel, with the real object run by
//! BPF_PROG_TEST_RUN: a pod's egress in `lb_tc` (after Service translation), its ingress in
//! `lb_tc_to_pod`; rules by peer identity (longest prefix of the ipcache), any peer, protocol
//! and port range (both edges); replies of allowed flows; the node; drops counted by reason.
mod common;

use std::net::IpAddr;

use anyhow::Result;
use common::*;
use etherparse::PacketBuilder;
use lb_agent::dataplane::{
    policy::{AllowRule, PolicyMaps},
    BackendSpec, Frontend,
};
use lb_common::*;
use testbed::{netns::in_private_netns, progtest::Testbed};

const POD_A: [u8; 4] = [10, 244, 1, 11];
const POD_B: [u8; 4] = [10, 244, 1, 12];
const NODE: [u8; 4] = [10, 99, 0, 1];
const ID_A: u32 = 301;
const ID_B: u32 = 300;
const ID_CIDR: u32 = 1 << 24;
const ID_EXCEPT: u32 = (1 << 24) + 1;

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(src, dst, 64).tcp(sport, dport, 1000, 64240).syn().write(&mut out, &[]).unwrap();
    out
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(src, dst, 64).udp(sport, dport).write(&mut out, b"hi").unwrap();
    out
}

fn ip(a: [u8; 4]) -> IpAddr {
    IpAddr::from(a)
}

fn rule(endpoint: u32, direction: u8, identity: u32, protocol: u8, ports: Option<(u16, u16)>) -> AllowRule {
    AllowRule { endpoint, direction, identity, protocol, ports }
}

/// The ipcache of these tests: both pods, a /24 outside with a /25 cut out of it, the node.
fn identities(maps: &mut PolicyMaps) -> Result<()> {
    maps.set_identity(ip(POD_A), 32, ID_A)?;
    maps.set_identity(ip(POD_B), 32, ID_B)?;
    maps.set_identity(ip([203, 0, 113, 0]), 24, ID_CIDR)?;
    maps.set_identity(ip([203, 0, 113, 128]), 25, ID_EXCEPT)?;
    maps.set_identity(ip(NODE), 32, IDENTITY_HOST)
}

fn verdict_of(tb: &Testbed, packet: &[u8], to_pod: bool) -> u32 {
    if to_pod { tb.run_tc_to_pod(packet) } else { tb.run_tc(packet) }.expect("test run").0
}

#[test]
fn egress_rules_match_identity_protocol_and_port_range_and_nothing_else() -> Result<()> {
    let tb = common::testbed();
    let mut maps = PolicyMaps::open_pinned(&tb.mount.dir)?;
    identities(&mut maps)?;
    maps.set_endpoint(ip(POD_A), PolicyEndpointV1 { endpoint: 1, flags: POLICY_EGRESS_ISOLATED })?;
    maps.allow(&rule(1, POLICY_EGRESS, ID_B, IPPROTO_TCP, Some((80, 80))), 7)?;
    maps.allow(&rule(1, POLICY_EGRESS, ID_B, IPPROTO_UDP, Some((8000, 8003))), 7)?;
    maps.allow(&rule(1, POLICY_EGRESS, ID_CIDR, IPPROTO_TCP, Some((443, 443))), 8)?;
    maps.allow(&rule(1, POLICY_EGRESS, IDENTITY_ANY, IPPROTO_UDP, Some((53, 53))), 9)?;
    let cases: [(&str, Vec<u8>, bool); 12] = [
        ("to B on TCP 80", tcp(POD_A, 40000, POD_B, 80), true),
        ("to B on TCP 81", tcp(POD_A, 40001, POD_B, 81), false),
        ("to B on UDP 80 (the rule is TCP)", udp(POD_A, 40002, POD_B, 80), false),
        ("to B on UDP 7999 (below the range)", udp(POD_A, 40003, POD_B, 7999), false),
        ("to B on UDP 8000 (first of the range)", udp(POD_A, 40004, POD_B, 8000), true),
        ("to B on UDP 8003 (last of the range)", udp(POD_A, 40005, POD_B, 8003), true),
        ("to B on UDP 8004 (above the range)", udp(POD_A, 40006, POD_B, 8004), false),
        ("to 203.0.113.7:443 (in the /24)", tcp(POD_A, 40007, [203, 0, 113, 7], 443), true),
        ("to 203.0.113.200:443 (in the /25 cut out)", tcp(POD_A, 40008, [203, 0, 113, 200], 443), false),
        ("to 198.51.100.1:443 (the world)", tcp(POD_A, 40009, [198, 51, 100, 1], 443), false),
        ("to any peer on UDP 53", udp(POD_A, 40010, [198, 51, 100, 1], 53), true),
        ("to the node", tcp(POD_A, 40011, NODE, 10250), true),
    ];
    let mut denied = 0;
    for (what, packet, allowed) in &cases {
        let verdict = verdict_of(&tb, packet, false);
        assert_eq!(verdict, if *allowed { TC_ACT_OK } else { TC_ACT_SHOT }, "{what}");
        denied += !allowed as u64;
        assert_eq!(reason_count(&tb, reason::DROP_POLICY), denied, "{what}: counted as drop_policy");
    }
    // A pod no policy selects is open; a selected pod open in this direction too.
    assert_eq!(verdict_of(&tb, &tcp(POD_B, 40012, [198, 51, 100, 1], 22), false), TC_ACT_OK);
    maps.set_endpoint(ip(POD_A), PolicyEndpointV1 { endpoint: 1, flags: POLICY_INGRESS_ISOLATED })?;
    assert_eq!(verdict_of(&tb, &tcp(POD_A, 40013, [198, 51, 100, 1], 22), false), TC_ACT_OK);
    Ok(())
}

#[test]
fn ingress_is_checked_on_the_way_in_and_replies_of_allowed_flows_pass() -> Result<()> {
    let tb = common::testbed();
    let mut maps = PolicyMaps::open_pinned(&tb.mount.dir)?;
    identities(&mut maps)?;
    maps.set_endpoint(ip(POD_A), PolicyEndpointV1 { endpoint: 1, flags: POLICY_INGRESS_ISOLATED })?;
    maps.set_endpoint(ip(POD_B), PolicyEndpointV1 { endpoint: 2, flags: POLICY_INGRESS_ISOLATED | POLICY_EGRESS_ISOLATED })?;
    maps.allow(&rule(2, POLICY_INGRESS, ID_A, IPPROTO_TCP, Some((8080, 8080))), 3)?;
    // Both pods on this node: A's packet leaves A through lb_tc (A's egress is open, and is
    // remembered as passed), then enters B through lb_tc_to_pod, which judges it for itself.
    assert_eq!(verdict_of(&tb, &tcp(POD_A, 40000, POD_B, 8081), false), TC_ACT_OK, "out of A to 8081");
    assert_eq!(verdict_of(&tb, &tcp(POD_A, 40000, POD_B, 8081), true), TC_ACT_SHOT, "A to B on a port no rule names, though A's egress passed it");
    assert_eq!(verdict_of(&tb, &tcp(POD_A, 40000, POD_B, 8080), false), TC_ACT_OK, "out of A to 8080");
    assert_eq!(verdict_of(&tb, &tcp(POD_A, 40000, POD_B, 8080), true), TC_ACT_OK, "A to B on 8080");
    // B's reply passes B's egress isolation (lb_tc) and A's ingress isolation (lb_tc_to_pod).
    let reply = tcp(POD_B, 8080, POD_A, 40000);
    assert_eq!(verdict_of(&tb, &reply, false), TC_ACT_OK, "B's reply out of B");
    assert_eq!(verdict_of(&tb, &reply, true), TC_ACT_OK, "B's reply into A");
    // B opening a connection of its own to A is not a reply.
    assert_eq!(verdict_of(&tb, &tcp(POD_B, 8080, POD_A, 40001), false), TC_ACT_SHOT, "B to A, new");
    assert_eq!(verdict_of(&tb, &tcp(POD_B, 8080, POD_A, 40001), true), TC_ACT_SHOT, "into A, new");
    // The node reaches B whatever B's policy.
    assert_eq!(verdict_of(&tb, &tcp(NODE, 50000, POD_B, 9999), true), TC_ACT_OK, "the node to B");
    assert_eq!(reason_count(&tb, reason::DROP_POLICY), 3);
    // Removing the rule: new flows on 8080 are refused, the remembered one still passes.
    maps.forget(&rule(2, POLICY_INGRESS, ID_A, IPPROTO_TCP, Some((8080, 8080))))?;
    assert_eq!(verdict_of(&tb, &tcp(POD_A, 40002, POD_B, 8080), true), TC_ACT_SHOT);
    assert_eq!(verdict_of(&tb, &tcp(POD_A, 40000, POD_B, 8080), true), TC_ACT_OK);
    Ok(())
}

#[test]
fn a_service_flow_is_judged_by_its_backend_and_its_reply_from_the_frontend_passes() -> Result<()> {
    in_private_netns(|| {
        let mut tb = common::testbed();
        let clusterip = [10, 96, 0, 50];
        let svc = Frontend {
            key: Service4KeyV1 { addr: ip4_raw(clusterip), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER }.into(),
            kind: KIND_CLUSTER_IP,
            name: "test/web:80".into(),
            backends: vec![BackendSpec { addr: ip(POD_B), port: 8080, local: true, weight: 1 }].into(),
            ..Frontend::default()
        };
        tb.dataplane.apply(&[svc])?;
        let mut maps = PolicyMaps::open_pinned(&tb.mount.dir)?;
        identities(&mut maps)?;
        maps.set_endpoint(ip(POD_A), PolicyEndpointV1 { endpoint: 1, flags: POLICY_EGRESS_ISOLATED | POLICY_INGRESS_ISOLATED })?;
        // Egress to B on 80 (the frontend's port) is not egress to B on 8080.
        maps.allow(&rule(1, POLICY_EGRESS, ID_B, IPPROTO_TCP, Some((80, 80))), 1)?;
        assert_eq!(verdict_of(&tb, &tcp(POD_A, 40000, clusterip, 80), false), TC_ACT_SHOT, "judged on the backend's port");
        maps.allow(&rule(1, POLICY_EGRESS, ID_B, IPPROTO_TCP, Some((8080, 8080))), 2)?;
        let (verdict, out) = tb.run_tc(&tcp(POD_A, 40001, clusterip, 80))?;
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(&out[30..34], &POD_B, "DNATed to the backend");
        // The reply, reverse-NATed on its way back, comes into A from the frontend.
        assert_eq!(verdict_of(&tb, &tcp(clusterip, 80, POD_A, 40001), true), TC_ACT_OK, "the reply into A");
        assert_eq!(verdict_of(&tb, &tcp(clusterip, 80, POD_A, 40002), true), TC_ACT_SHOT, "not a reply");
        Ok(())
    })
}

#[test]
fn ipv6_rules_match_by_prefix_too() -> Result<()> {
    let tb = common::testbed();
    let mut maps = PolicyMaps::open_pinned(&tb.mount.dir)?;
    let (a, b): (IpAddr, IpAddr) = ("fd00:244:1::11".parse()?, "fd00:244:1::12".parse()?);
    maps.set_identity(b, 128, ID_B)?;
    maps.set_identity("fd00:244::".parse()?, 32, ID_CIDR)?;
    maps.set_endpoint(a, PolicyEndpointV1 { endpoint: 1, flags: POLICY_EGRESS_ISOLATED })?;
    maps.allow(&rule(1, POLICY_EGRESS, ID_B, IPPROTO_TCP, Some((80, 81))), 1)?;
    let packet = |dst: IpAddr, dport: u16| {
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (a, dst) else { unreachable!() };
        let mut out = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv6(src.octets(), dst.octets(), 64).tcp(40000, dport, 1, 64240).syn().write(&mut out, &[]).unwrap();
        out
    };
    assert_eq!(verdict_of(&tb, &packet(b, 81), false), TC_ACT_OK);
    assert_eq!(verdict_of(&tb, &packet(b, 82), false), TC_ACT_SHOT);
    // Another address of the /32: the CIDR's identity, which no rule names.
    assert_eq!(verdict_of(&tb, &packet("fd00:244:1::13".parse()?, 80), false), TC_ACT_SHOT);
    Ok(())
}
