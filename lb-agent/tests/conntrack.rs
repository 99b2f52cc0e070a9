//! Conntrack garbage collection with TCP-state-aware lifetimes, on entries the real programs
//! created from real packets.

use anyhow::Result;
use etherparse::PacketBuilder;
use lb_agent::dataplane::{
    conntrack::monotonic_ns,
    load::MapSizes,
    BackendSpec, Frontend,
};
use testbed::{netns::in_private_netns, progtest::Testbed};
use lb_common::*;

const CLIENT: [u8; 4] = [192, 0, 2, 10];
const VIP: [u8; 4] = [10, 96, 0, 10];
const BACKEND: [u8; 4] = [10, 244, 1, 11];
const S: u64 = 1_000_000_000;

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: &str) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, dst, 64).tcp(sport, dport, 1, 1000);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            _ => b,
        };
    }
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, dst, 64).udp(sport, dport).write(&mut out, b"x").unwrap();
    out
}

fn flows(tb: &Testbed) -> Vec<u16> {
    let mut ports: Vec<u16> = tb.dataplane.maps.v4.conntrack.keys().filter_map(|k| k.ok()).map(|k| port_host(k.src_port)).collect();
    ports.sort();
    ports
}

#[test]
fn gc_expires_flows_by_state_and_takes_their_reverse_nat_along() -> Result<()> {
    in_private_netns(|| {
        let mut tb = Testbed::new(&MapSizes::default())?;
        let backend = |proto| Frontend {
            key: Service4KeyV1 { addr: ip4_raw(VIP), port: port_raw(80), proto, scope: SCOPE_CLUSTER }.into(),
            kind: KIND_CLUSTER_IP,
            name: "test/web".into(),
            backends: [BackendSpec { addr: BACKEND.into(), port: 8080, local: true, weight: 1 }].into(),
            ..Frontend::default()
        };
        tb.dataplane.apply(&[backend(IPPROTO_TCP), backend(IPPROTO_UDP)])?;
        // 1001: SYN only. 1002: established (SYN, SYN-ACK back, ACK). 1003: closing (FIN). 1004: UDP.
        // 1005: half-open (SYN, SYN-ACK back, and the client never answers: a SYN flood's).
        tb.run_tc(&tcp(CLIENT, VIP, 1001, 80, "S"))?;
        tb.run_tc(&tcp(CLIENT, VIP, 1005, 80, "S"))?;
        tb.run_tc(&tcp(BACKEND, CLIENT, 8080, 1005, "SA"))?;
        tb.run_tc(&tcp(CLIENT, VIP, 1002, 80, "S"))?;
        tb.run_tc(&tcp(BACKEND, CLIENT, 8080, 1002, "SA"))?;
        tb.run_tc(&tcp(CLIENT, VIP, 1002, 80, "A"))?;
        tb.run_tc(&tcp(CLIENT, VIP, 1003, 80, "S"))?;
        tb.run_tc(&tcp(BACKEND, CLIENT, 8080, 1003, "SA"))?;
        tb.run_tc(&tcp(CLIENT, VIP, 1003, 80, "FA"))?;
        tb.run_tc(&udp(CLIENT, VIP, 1004, 80))?;
        let now = monotonic_ns();
        assert_eq!(tb.dataplane.maps.v4.reverse_nat.keys().count(), 5);

        let stats = tb.dataplane.collect_conntrack(now + S)?;
        assert_eq!((stats.flows_kept, stats.flows_removed), (5, 0), "nothing is a second past its lifetime");
        tb.dataplane.collect_conntrack(now + 11 * S)?;
        assert_eq!(flows(&tb), [1001, 1002, 1004, 1005], "closing: 10 s");
        tb.dataplane.collect_conntrack(now + 61 * S)?;
        assert_eq!(flows(&tb), [1002], "SYN only, half-open and UDP: 60 s");
        tb.dataplane.collect_conntrack(now + 21_599 * S)?;
        assert_eq!(flows(&tb), [1002], "established: 6 h");
        let stats = tb.dataplane.collect_conntrack(now + 21_601 * S)?;
        assert_eq!(stats.flows_removed, 1);
        assert!(flows(&tb).is_empty());
        assert_eq!(tb.dataplane.maps.v4.reverse_nat.keys().count(), 0, "reverse NAT goes with its flow");
        Ok(())
    })
}
