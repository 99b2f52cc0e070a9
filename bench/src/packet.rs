//! Per-packet cost through BPF_PROG_TEST_RUN, swept over the number of configured services.
//!
//! Methods (the kernel runs `repeat` iterations on the *same* buffer, so a rewriting program
//! would mostly measure its own output):
//! - `repeat`: paths that leave the packet unchanged (not a service, drop, the XDP_PASS floor)
//!   and the ct-hit DNAT path made to restore itself: two services whose only backends are each
//!   other's frontend, so every iteration is a conntrack hit and a DNAT. Kernel-reported mean ns
//!   per iteration.
//! - `single`: a ct miss needs a new flow per run, so each run is `repeat = 1` on a distinct
//!   packet; the kernel-reported time of one run, minus the median single run of the XDP_PASS
//!   floor measured the same way.
use std::net::{IpAddr, Ipv6Addr};

use anyhow::Result;
use lb_agent::dataplane::{load::MapSizes, BackendSpec, Frontend, FrontendKey};
use testbed::progtest::Testbed;
use lb_common::*;

use crate::stats::Summary;

pub struct Config {
    pub sizes: Vec<usize>,
    pub repeat: u32,
    pub single_runs: usize,
    pub runs: usize,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub services: usize,
    pub path: &'static str,
    pub method: &'static str,
    pub ns: Summary,
    /// ns of each run, in run order: the IPv4 and IPv6 twins' runs alternate, so the i-th of
    /// each were measured side by side.
    pub samples: Vec<f64>,
}

impl Row {
    fn new(services: usize, path: &'static str, method: &'static str, samples: Vec<f64>) -> Self {
        Self { services, path, method, ns: Summary::of(&samples), samples }
    }
}

const CLIENT: [u8; 4] = [192, 0, 2, 10];
const VIP_A: [u8; 4] = [10, 96, 0, 1];
const VIP_B: [u8; 4] = [10, 96, 0, 2];
const VIP_MISS: [u8; 4] = [10, 96, 0, 3];
const VIP_RANGED: [u8; 4] = [10, 96, 0, 4];
const VIP_LOCAL: [u8; 4] = [10, 96, 0, 5];
const VIP_AFFINITY: [u8; 4] = [10, 96, 0, 6];
const MISS_BACKENDS: [([u8; 4], u16); 3] = [([10, 244, 1, 11], 8080), ([10, 244, 1, 12], 8080), ([10, 244, 1, 13], 8080)];

/// IPv6 twins of the measured frontends, clients and backends.
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const VIP6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1);
const VIP6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 2);
const VIP6_MISS: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 3);
const NOT_A_SERVICE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x1, 0, 0, 0, 0, 0, 2);

/// An Ethernet/IP/TCP SYN of either family.
pub(crate) fn syn(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Vec<u8> {
    segment(src, sport, dst, dport, true)
}

/// A TCP segment of an established connection (ACK), of either family.
pub(crate) fn ack(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Vec<u8> {
    segment(src, sport, dst, dport, false)
}

fn segment(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16, opening: bool) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = match (src.into(), dst.into()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("a packet has one family"),
    };
    let tcp = ip.tcp(sport, dport, 1, 64240);
    let tcp = if opening { tcp.syn() } else { tcp.ack(1) };
    let mut out = Vec::new();
    tcp.write(&mut out, &[]).expect("a segment fits a Vec");
    out
}

fn frontend(vip: impl Into<IpAddr>, backends: &[(impl Into<IpAddr> + Copy, u16)]) -> Frontend {
    let vip = vip.into();
    Frontend {
        key: FrontendKey { addr: vip, port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER },
        kind: KIND_CLUSTER_IP,
        name: format!("bench/{vip}").into(),
        backends: backends.iter().map(|(a, p)| BackendSpec { addr: (*a).into(), port: *p, local: true, weight: 1 }).collect(),
        ..Frontend::default()
    }
}

/// A testbed with `n` configured services: the measured ones through the agent's dataplane,
/// the rest written as frontends sharing one Maglev slice (what matters for lookups is how
/// many keys the service map holds).
fn testbed(n: usize, flows: u32) -> Result<Testbed> {
    let mut tb = Testbed::new(&MapSizes { flows: Some(flows), ..Default::default() })?;
    let local_scope = frontend(VIP_LOCAL, &[] as &[([u8; 4], u16)]);
    let measured = [
        frontend(VIP_A, &[(VIP_B, 80)]),
        frontend(VIP_B, &[(VIP_A, 80)]),
        frontend(VIP_MISS, &MISS_BACKENDS),
        frontend(VIP6_A, &[(VIP6_B, 80)]),
        frontend(VIP6_B, &[(VIP6_A, 80)]),
        frontend(VIP6_MISS, &MISS_BACKENDS.map(|(a, p)| (Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, a[3] as u16), p))),
        // Clients outside 203.0.113.0/24 are dropped.
        Frontend { source_ranges: Some(vec![([203, 0, 113, 0].into(), 24)]), ..frontend(VIP_RANGED, &MISS_BACKENDS) },
        // externalTrafficPolicy: Local on a node without local endpoints.
        Frontend { ext_local: true, ..frontend(VIP_LOCAL, &MISS_BACKENDS) },
        Frontend { key: FrontendKey { scope: SCOPE_LOCAL, ..local_scope.key }, ..local_scope },
        Frontend { affinity_timeout_s: Some(10_800), ..frontend(VIP_AFFINITY, &MISS_BACKENDS) },
    ];
    tb.dataplane.apply(&measured)?;
    // Each family's frontend map holds `n` entries.
    let shared = tb.dataplane.service(&measured[2].key).expect("programmed");
    for i in 0..n.saturating_sub(7) {
        let key = Service4KeyV1 { addr: ip4_raw([10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8]), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER };
        fill(tb.dataplane.maps.v4.services.insert(&key, &shared, 0), &mut tb, key.into())?;
    }
    for i in 0..n.saturating_sub(3) {
        let addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, (i >> 16) as u16, i as u16);
        let key = Service6KeyV1 { addr: ip6_raw(addr.octets()), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER };
        fill(tb.dataplane.maps.v6.services.insert(&key, &shared, 0), &mut tb, key.into())?;
    }
    clear_of_frontends(&tb, &[[10, 1, 1, 1].into(), NOT_A_SERVICE6.into()])?;
    Ok(tb)
}

/// A filler frontend written into the frontend map (beside the agent's writer, so that the
/// measured frontend keeps the id entry they share), and marked in the filter as the agent
/// marks a frontend.
pub(crate) fn fill(written: Result<(), aya::maps::MapError>, tb: &mut Testbed, key: FrontendKey) -> Result<()> {
    written?;
    tb.dataplane.maps.count_frontend(&key, true)
}

/// The not-a-service rows send to TCP port 80 of addresses whose frontend-filter bit there is
/// clear, as nine in ten are with 100,000 frontends (one on a set bit pays the frontend
/// lookup, as before the filter).
pub(crate) fn clear_of_frontends(tb: &Testbed, addrs: &[IpAddr]) -> Result<()> {
    let Some(filter) = tb.dataplane.maps.frontend_filter.as_ref() else { return Ok(()) };
    for addr in addrs {
        let (word, bit) = match addr {
            IpAddr::V4(a) => frontend_filter_bit(&ip4_raw(a.octets()), port_raw(80), IPPROTO_TCP),
            IpAddr::V6(a) => frontend_filter_bit(&ip6_raw(a.octets()), port_raw(80), IPPROTO_TCP),
        };
        anyhow::ensure!(filter.get(word) & bit == 0, "{addr}:80 shares a frontend's filter bit: pick another not-a-service address");
    }
    Ok(())
}

/// `single_runs` runs of `repeat = 1` on `packet(i)`, per sample the median minus the median
/// of the XDP_PASS floor run the same way; `runs` samples.
fn single_runs(tb: &Testbed, cfg: &Config, mut packet: impl FnMut(usize) -> Vec<u8>) -> Result<Vec<f64>> {
    let floor_packet = syn(CLIENT, 1000, [10, 1, 1, 1], 80);
    let mut samples = Vec::new();
    for _ in 0..cfg.runs {
        let mut floor: Vec<f64> = (0..cfg.single_runs).map(|_| tb.time_xdp_pass(&floor_packet, 1).map(|(_, ns)| ns)).collect::<Result<_>>()?;
        let mut path: Vec<f64> = (0..cfg.single_runs).map(|i| tb.time_xdp(&packet(i), 1).map(|(_, ns)| ns)).collect::<Result<_>>()?;
        floor.sort_by(f64::total_cmp);
        path.sort_by(f64::total_cmp);
        samples.push(path[path.len() / 2] - floor[floor.len() / 2]);
    }
    Ok(samples)
}

/// The ICMP port unreachable a backend sends to the client about `sent` (a DNATed frame).
fn icmp_port_unreachable(sent: &[u8]) -> Vec<u8> {
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&sent[14..]).expect("IPv4");
    let unreachable = etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port);
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(ip.destination(), ip.source(), 64)
        .icmpv4(unreachable)
        .write(&mut out, &sent[14..14 + 28])
        .expect("an ICMP error fits a Vec");
    out
}

pub fn run(cfg: &Config) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &n in &cfg.sizes {
        let tb = testbed(n, (2 * cfg.single_runs * cfg.runs + 1024).next_power_of_two() as u32)?;
        let mut truncated = syn(CLIENT, 1000, [10, 1, 1, 1], 80);
        truncated.truncate(14 + 20 + 10);
        let repeat_paths: [(&str, Vec<u8>, bool); 8] = [
            ("XDP_PASS floor", syn(CLIENT, 1000, [10, 1, 1, 1], 80), true),
            ("not a service (pass)", syn(CLIENT, 1000, [10, 1, 1, 1], 80), false),
            ("drop (truncated TCP)", truncated, false),
            ("ct hit + DNAT", ack(CLIENT, 1001, VIP_A, 80), false),
            ("source range miss (drop)", syn(CLIENT, 1002, VIP_RANGED, 80), false),
            ("eTP Local, no local endpoint (drop)", syn(CLIENT, 1003, VIP_LOCAL, 80), false),
            ("IPv6 not a service (pass)", syn(CLIENT6, 1000, NOT_A_SERVICE6, 80), false),
            ("IPv6 ct hit + DNAT", ack(CLIENT6, 1001, VIP6_A, 80), false),
        ];
        // Runs interleaved across the paths: drift during the run shifts every path alike, so
        // the ratios between paths (IPv6 to IPv4 among them) hold.
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); repeat_paths.len()];
        for _ in 0..cfg.runs {
            for ((_, packet, floor), samples) in repeat_paths.iter().zip(&mut samples) {
                samples.push(if *floor { tb.time_xdp_pass(packet, cfg.repeat) } else { tb.time_xdp(packet, cfg.repeat) }?.1);
            }
        }
        for ((path, _, _), samples) in repeat_paths.iter().zip(&samples) {
            rows.push(Row::new(n, path, "repeat", samples.clone()));
        }
        // Single runs: a new flow (or a fresh copy of a rewritten packet) each time, against
        // the floor measured the same way.
        let mut next_port = 0u32;
        let mut new_flow = |vip: IpAddr, same_client: bool| {
            next_port += 1;
            let (hi, lo) = ((next_port >> 16) as u8, (next_port >> 8) as u8);
            let src: IpAddr = match vip {
                _ if same_client => CLIENT.into(),
                IpAddr::V4(_) => [172, 16, hi, lo].into(),
                IpAddr::V6(_) => Ipv6Addr::new(0x2001, 0xdb8, 0x16, 0, 0, 0, hi as u16, lo as u16).into(),
            };
            syn(src, (next_port % 60_000) as u16 + 1024, vip, 80)
        };
        // IPv4 and IPv6 new flows, one run of each in turn.
        let one_run = Config { runs: 1, sizes: Vec::new(), ..*cfg };
        let (mut miss4, mut miss6) = (Vec::new(), Vec::new());
        for _ in 0..cfg.runs {
            miss4.extend(single_runs(&tb, &one_run, |_| new_flow(VIP_MISS.into(), false))?);
            miss6.extend(single_runs(&tb, &one_run, |_| new_flow(VIP6_MISS.into(), false))?);
        }
        rows.push(Row::new(n, "ct miss + Maglev + DNAT", "single, minus floor", miss4));
        rows.push(Row::new(n, "IPv6 ct miss + Maglev + DNAT", "single, minus floor", miss6));
        // The client's first flow sets its affinity; every later one is a ct miss that it decides.
        tb.time_xdp(&syn(CLIENT, 999, VIP_AFFINITY, 80), 1)?;
        let mut affinity = |tb: &Testbed| single_runs(tb, cfg, |_| new_flow(VIP_AFFINITY.into(), true));
        rows.push(Row::new(n, "ct miss + affinity hit + DNAT", "single, minus floor", affinity(&tb)?));
        // A backend's "port unreachable" about a tracked flow, rewritten back to the frontend.
        let (_, sent) = tb.run_xdp(&syn(CLIENT, 998, VIP_MISS, 80))?;
        let error = icmp_port_unreachable(&sent);
        rows.push(Row::new(n, "ICMP error reverse NAT", "single, minus floor", single_runs(&tb, cfg, |_| error.clone())?));
        let reasons = tb.dataplane.maps.reason_counts()?;
        anyhow::ensure!(reasons[reason::DROP_CT_FULL as usize] == 0, "conntrack filled up during the ct-miss runs");
        anyhow::ensure!(reasons[reason::FWD_LOCAL_BACKEND as usize] > 2 * cfg.repeat as u64, "the ct-hit paths did not forward");
        let v6_flows = tb.dataplane.maps.v6.conntrack.keys().count();
        anyhow::ensure!(v6_flows >= cfg.single_runs * cfg.runs, "the IPv6 ct-miss runs made {v6_flows} IPv6 flows");
        anyhow::ensure!(reasons[reason::DROP_SOURCE_RANGE as usize] >= cfg.repeat as u64, "the source-range path did not drop");
        anyhow::ensure!(reasons[reason::DROP_NO_LOCAL_BACKEND as usize] >= cfg.repeat as u64, "the eTP Local path did not drop");
        anyhow::ensure!(reasons[reason::FWD_ICMP_ERROR as usize] >= (cfg.single_runs * cfg.runs) as u64, "the ICMP error path did not translate");
        let affinity = tb.dataplane.maps.affinity.iter().count();
        anyhow::ensure!(affinity == 1, "the affinity runs used {affinity} affinity entries, not one");
    }
    Ok(rows)
}

/// One path with flow events off, drops only, and all (new connections too), runs rotating.
pub struct EventOverhead {
    pub path: &'static str,
    pub off: Summary,
    pub drops: Summary,
    pub all: Summary,
    /// drops / off and all / off, of each set of runs measured together.
    pub drops_ratio: Summary,
    pub all_ratio: Summary,
}

/// The per-packet cost of flow events: the ct-hit path (no event), the ct-miss path (an event
/// in "all" mode) and a drop path (an event, rate-limited: almost every iteration of a
/// `repeat` run is throttled, as in a flood), with events off, drops only (the default) and
/// all, in rotating runs at 1 service.
pub fn event_overhead(cfg: &Config) -> Result<Vec<EventOverhead>> {
    let tb = testbed(1, (3 * cfg.single_runs * cfg.runs + 1024).next_power_of_two() as u32)?;
    let modes = [0, 1 << EVENT_DROP, (1 << EVENT_DROP) | (1 << EVENT_NEW_FLOW)];
    let mut next_port = 0u32;
    let mut samples: [[Vec<f64>; 3]; 3] = Default::default();
    for _ in 0..cfg.runs {
        for (m, kinds) in modes.iter().enumerate() {
            lb_agent::events::configure(&tb.mount.dir, *kinds, 1000, 200)?;
            samples[0][m].push(tb.time_xdp(&ack(CLIENT, 1001, VIP_A, 80), cfg.repeat)?.1);
            samples[1][m].push(tb.time_xdp(&syn(CLIENT, 1002, VIP_RANGED, 80), cfg.repeat)?.1);
            let one_run = Config { runs: 1, sizes: Vec::new(), ..*cfg };
            samples[2][m].extend(single_runs(&tb, &one_run, |_| {
                next_port += 1;
                syn([172, 17, (next_port >> 16) as u8, (next_port >> 8) as u8], (next_port % 60_000) as u16 + 1024, VIP_MISS, 80)
            })?);
        }
    }
    let reasons = tb.dataplane.maps.reason_counts()?;
    anyhow::ensure!(reasons[reason::DROP_SOURCE_RANGE as usize] >= cfg.repeat as u64, "the drop path did not drop");
    let ratio = |a: &[f64], b: &[f64]| Summary::of(&a.iter().zip(b).map(|(a, b)| a / b).collect::<Vec<_>>());
    let paths = ["ct hit + DNAT", "source range miss (drop)", "ct miss + Maglev + DNAT (single, minus floor)"];
    Ok(paths
        .iter()
        .zip(&samples)
        .map(|(path, [off, drops, all])| EventOverhead {
            path,
            off: Summary::of(off),
            drops: Summary::of(drops),
            all: Summary::of(all),
            drops_ratio: ratio(drops, off),
            all_ratio: ratio(all, off),
        })
        .collect())
}
