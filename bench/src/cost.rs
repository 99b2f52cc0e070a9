//! Per-packet cost of every XDP path by the single-run method (as the Katran comparison was
//! measured), with this build's object beside a baseline object (another build's, e.g. the
//! previous commit's) and beside Katran's balancer, in one run.
//!
//! Each sample is a batch of `batch` runs of `repeat = 1` per path: the median minus the
//! median of the XDP_PASS floor run the same way, in the same batch. The two objects' batches
//! alternate, so drift on the machine moves both alike; their ratio is taken per pair of
//! batches. The setup follows the Katran one: a frontend of 100 local backends and one of 100
//! remote backends (SNAT and the FIB towards node B), each for TCP and UDP, the rest of the
//! frontend map filled.
//! Katran gets the same frontends as VIPs of 100 reals each and the same packets; it has no
//! "remote" path of its own (every VIP packet is encapsulated to its real) and no replies.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{ensure, Context, Result};
use lb_agent::dataplane::{
    load::{MapSizes, TC_PROGRAM},
    BackendSpec, Frontend, FrontendKey,
};
use lb_common::*;
use testbed::{
    netns::sh,
    progtest::{ifindex, Testbed},
};

use crate::{
    katran::{Katran, Vip},
    packet::{ack, syn},
    stats::Summary,
};

pub struct Config {
    pub sizes: Vec<usize>,
    /// Runs of one iteration per sample.
    pub batch: usize,
    pub samples: usize,
    /// Loads of each object per size, taken in turn sample by sample: where a load's program
    /// and maps happen to land moves its figures by about one 10 ns step of the kernel's
    /// clock (seen with one object on both sides), so no single load speaks for an object.
    pub loads: usize,
    /// Iterations of one `repeat` run, for the paths that leave the packet as it was.
    pub repeat: u32,
}

pub struct Row {
    pub services: usize,
    pub path: &'static str,
    pub current: Summary,
    pub baseline: Option<Summary>,
    /// current / baseline of each pair of samples measured together.
    pub ratio: Option<Summary>,
    pub katran: Option<Summary>,
    /// current / Katran of each pair of samples measured together.
    pub katran_ratio: Option<Summary>,
    /// Wall-clock ns of a run, system call included (what the kernel's clock leaves out:
    /// work a run defers, such as an allocator's refill, is here), this build's and the
    /// baseline's, and their difference per pair of samples.
    pub wall: Summary,
    pub baseline_wall: Option<Summary>,
    pub wall_difference: Option<Summary>,
    /// For a path that leaves the packet as it was (so that every iteration of a `repeat` run
    /// takes it again): the kernel's mean ns of a `repeat` run minus the floor's, this build's
    /// and the baseline's, a value per load and round. Free of the 10 ns grain of single runs.
    pub repeat: Option<Summary>,
    pub baseline_repeat: Option<Summary>,
    /// The same for Katran, where it passes the packet too (minus this build's floor).
    pub katran_repeat: Option<Summary>,
}

/// XDP verdicts (linux/bpf.h).
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const NODE_IP: [u8; 4] = [10, 99, 0, 1];
const LOCAL_VIP: [u8; 4] = [10, 96, 0, 1];
const REMOTE_VIP: [u8; 4] = [10, 99, 100, 1];
const CLIENT: [u8; 4] = [192, 0, 2, 10];
/// A pod of this node, a client of the local frontend.
const POD: [u8; 4] = [10, 244, 1, 200];

/// The paths: a name, the verdict each run must give (and Katran's, when it has the path), the
/// packet of run `i` (a new flow needs a packet of its own each run; the others repeat one),
/// and for an established flow the packet that opens it.
struct Path {
    name: &'static str,
    /// Through `lb_tc`, from a pod (else `lb_xdp`, from outside).
    tc: bool,
    /// The device an XDP path's packets arrive on: the one towards the remote backends (a node
    /// with one device, where they go back out with XDP_TX), else loopback (they are
    /// redirected to that device).
    ingress: Option<u32>,
    verdict: u32,
    katran_verdict: Option<u32>,
    packet: Box<dyn Fn(usize) -> Vec<u8>>,
    opening: Option<Vec<u8>>,
}


fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, dst, 64).udp(sport, dport).write(&mut out, &[0; 16]).expect("fits a Vec");
    out
}

/// A distinct client for new flow `i` (and `salt` to keep the paths' flows apart).
fn new_client(i: usize, salt: u8) -> ([u8; 4], u16) {
    ([172, 16 + salt, (i >> 8) as u8, i as u8], 1024 + (i % 60_000) as u16)
}

fn local_backends() -> impl Iterator<Item = [u8; 4]> {
    (0..100u8).map(|i| [10, 244, 1, i + 1])
}

fn remote_backends() -> impl Iterator<Item = [u8; 4]> {
    (0..100u8).map(|i| [10, 244, 2, i + 1])
}

/// Katran's VIPs: the measured frontends.
fn katran_vips() -> Vec<Vip> {
    vec![
        Vip { addr: LOCAL_VIP, port: 80, proto: IPPROTO_TCP, reals: local_backends().collect() },
        Vip { addr: LOCAL_VIP, port: 80, proto: IPPROTO_UDP, reals: local_backends().collect() },
        Vip { addr: REMOTE_VIP, port: 80, proto: IPPROTO_TCP, reals: remote_backends().collect() },
        Vip { addr: REMOTE_VIP, port: 80, proto: IPPROTO_UDP, reals: remote_backends().collect() },
    ]
}

fn frontend(vip: [u8; 4], proto: u8, kind: u8, backends: impl Iterator<Item = [u8; 4]>, local: bool) -> Frontend {
    Frontend {
        key: FrontendKey { addr: IpAddr::from(vip), port: port_raw(80), proto, scope: SCOPE_CLUSTER },
        kind,
        name: format!("bench/{}:{proto}", Ipv4Addr::from(vip)).into(),
        backends: backends.map(|a| BackendSpec { addr: a.into(), port: 8080, local, weight: 1 }).collect(),
        ..Frontend::default()
    }
}

/// A testbed of `object` with `n` frontends: the measured ones, and copies filling the map.
fn testbed(object: &[u8], n: usize, flows: u32) -> Result<Testbed> {
    let mut tb = Testbed::with_object(&MapSizes { flows: Some(flows), ..Default::default() }, object)?;
    tb.dataplane.set_config(ConfigV1 { hash_seed: 0, snat_addr: ip4_raw(NODE_IP), nat_port_min: NAT_PORT_MIN, nat_port_max: NAT_PORT_MAX, _pad: 0 })?;
    tb.dataplane.set_node_ips(&[(IpAddr::from(NODE_IP), 0)])?;
    let measured = [
        frontend(LOCAL_VIP, IPPROTO_TCP, KIND_CLUSTER_IP, local_backends(), true),
        frontend(LOCAL_VIP, IPPROTO_UDP, KIND_CLUSTER_IP, local_backends(), true),
        frontend(REMOTE_VIP, IPPROTO_TCP, KIND_LOAD_BALANCER, remote_backends(), false),
        frontend(REMOTE_VIP, IPPROTO_UDP, KIND_LOAD_BALANCER, remote_backends(), false),
    ];
    tb.dataplane.apply(&measured)?;
    let shared = tb.dataplane.service(&measured[0].key).context("programmed")?;
    for i in 0..n.saturating_sub(measured.len()) {
        let key = Service4KeyV1 { addr: ip4_raw([10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8]), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER };
        crate::packet::fill(tb.dataplane.maps.v4.services.insert(&key, &shared, 0), &mut tb, key.into())?;
    }
    crate::packet::clear_of_frontends(&tb, &[[10, 1, 1, 1].into()])?;
    Ok(tb)
}

/// The measured paths, over one testbed's state: the established ones reuse the flow their
/// first run made; the reply path answers a remote flow made here.
fn paths(tb: &Testbed) -> Result<Vec<Path>> {
    let (_, sent) = tb.run_xdp(&syn(CLIENT, 999, REMOTE_VIP, 80))?;
    let nat_port = u16::from_be_bytes([sent[14 + 20], sent[14 + 21]]);
    let backend = [sent[14 + 16], sent[14 + 17], sent[14 + 18], sent[14 + 19]];
    let mut reply = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x0b], [2, 0, 0, 0, 0, 1]).ipv4(backend, NODE_IP, 64).tcp(8080, nat_port, 1, 64240).syn().ack(2).write(&mut reply, &[])?;
    let path = |name, verdict, katran_verdict, packet: Box<dyn Fn(usize) -> Vec<u8>>, opening| Path { name, tc: false, ingress: None, verdict, katran_verdict, packet, opening };
    let on_one_device = |name, packet: Box<dyn Fn(usize) -> Vec<u8>>, opening| -> Result<Path> {
        Ok(Path { name, tc: false, ingress: Some(ifindex("lbt0")?), verdict: XDP_TX, katran_verdict: Some(XDP_TX), packet, opening })
    };
    let from_pod = |name, verdict, packet: Box<dyn Fn(usize) -> Vec<u8>>| Path { name, tc: true, ingress: None, verdict, katran_verdict: None, packet, opening: None };
    let (pass, encapsulated) = (Some(XDP_PASS), Some(XDP_TX));
    // The local flow the pod opened, and its backend's reply.
    let (_, sent) = tb.run_tc(&syn(POD, 1003, LOCAL_VIP, 80))?;
    let local_backend = [sent[14 + 16], sent[14 + 17], sent[14 + 18], sent[14 + 19]];
    let local_reply = ack(local_backend, 8080, POD, 1003);
    Ok(vec![
        path("not a service (pass)", XDP_PASS, pass, Box::new(|_| syn(CLIENT, 1000, [10, 1, 1, 1], 80)), None),
        path("not a service, to a node address", XDP_PASS, pass, Box::new(|_| syn(CLIENT, 1000, NODE_IP, 22)), None),
        // The address's filter bit is set: the frontend lookup runs, and misses.
        path("to a frontend's address, no Service on the port", XDP_PASS, pass, Box::new(|_| syn(CLIENT, 1000, LOCAL_VIP, 81)), None),
        path("new flow, local backend (TCP)", XDP_PASS, encapsulated, Box::new(|i| { let (c, p) = new_client(i, 0); syn(c, p, LOCAL_VIP, 80) }), None),
        path("established flow, local backend (TCP)", XDP_PASS, encapsulated, Box::new(|_| ack(CLIENT, 1001, LOCAL_VIP, 80)), Some(syn(CLIENT, 1001, LOCAL_VIP, 80))),
        path("new flow, local backend (UDP)", XDP_PASS, encapsulated, Box::new(|i| { let (c, p) = new_client(i, 1); udp(c, p, LOCAL_VIP, 80) }), None),
        path("established flow, local backend (UDP)", XDP_PASS, encapsulated, Box::new(|_| udp(CLIENT, 1001, LOCAL_VIP, 80)), Some(udp(CLIENT, 1001, LOCAL_VIP, 80))),
        path("new flow, remote backend (SNAT + FIB)", XDP_REDIRECT, encapsulated, Box::new(|i| { let (c, p) = new_client(i, 2); syn(c, p, REMOTE_VIP, 80) }), None),
        path("established flow, remote backend", XDP_REDIRECT, encapsulated, Box::new(|_| ack(CLIENT, 1002, REMOTE_VIP, 80)), Some(syn(CLIENT, 1002, REMOTE_VIP, 80))),
        path("new flow, remote backend (UDP, SNAT + FIB)", XDP_REDIRECT, encapsulated, Box::new(|i| { let (c, p) = new_client(i, 4); udp(c, p, REMOTE_VIP, 80) }), None),
        path("established flow, remote backend (UDP)", XDP_REDIRECT, encapsulated, Box::new(|_| udp(CLIENT, 1005, REMOTE_VIP, 80)), Some(udp(CLIENT, 1005, REMOTE_VIP, 80))),
        on_one_device("new flow, remote backend, one device (SNAT + FIB, XDP_TX)", Box::new(|i| { let (c, p) = new_client(i, 3); syn(c, p, REMOTE_VIP, 80) }), None)?,
        on_one_device("established flow, remote backend, one device (XDP_TX)", Box::new(|_| ack(CLIENT, 1004, REMOTE_VIP, 80)), Some(syn(CLIENT, 1004, REMOTE_VIP, 80)))?,
        path("reply of a remote flow (reverse NAT + FIB)", XDP_REDIRECT, None, Box::new(move |_| reply.clone()), None),
        from_pod("from a pod, not a service (TC)", TC_ACT_OK, Box::new(|_| ack(POD, 1000, [10, 1, 1, 1], 80))),
        from_pod("from a pod, established flow, local backend (TC)", TC_ACT_OK, Box::new(|_| ack(POD, 1003, LOCAL_VIP, 80))),
        // Routed here (its source is the frontend), through the FIB: redirected.
        from_pod("reply of a local backend to a pod (TC, reverse NAT + FIB)", TC_ACT_REDIRECT, Box::new(move |_| local_reply.clone())),
    ])
}

/// One sample of a path: the median of `batch` single runs (`run_once(i)`: the verdict and ns
/// of run `i`, from run `first` on) minus the median of the floor's ([`floor`]), run in
/// between. Beside it, the mean wall-clock ns of the path's runs (each packet built
/// beforehand): a mean, as work deferred and done in bulk every so many runs (an
/// allocator's refill) is in no median.
fn sample(tb: &Testbed, path: &Path, verdict: u32, first: usize, batch: usize, run_once: impl Fn(&[u8]) -> Result<(u32, f64)>) -> Result<(f64, f64)> {
    let name = path.name;
    let mut floors = Vec::with_capacity(batch);
    let mut ns = Vec::with_capacity(batch);
    let mut wall = Vec::with_capacity(batch);
    for i in first..first + batch {
        floors.push(floor(tb, path, 1)?.1);
        let packet = (path.packet)(i);
        let started = std::time::Instant::now();
        let (got, took) = run_once(&packet)?;
        wall.push(started.elapsed().as_nanos() as f64);
        ensure!(got == verdict, "{name}: verdict {got}, not {verdict}");
        ns.push(took);
    }
    Ok((Summary::of(&ns).median - Summary::of(&floors).median, wall.iter().sum::<f64>() / batch as f64))
}

/// `repeat` runs of a path that leaves its packet as it was, each minus the floor's: three
/// rounds on every load. `None` for a path that rewrites its packet (checked on the first load).
fn repeat_runs(loaded: &[(Testbed, Vec<Path>)], i: usize, repeat: u32) -> Result<Option<Summary>> {
    let (tb, paths) = &loaded[0];
    let packet = (paths[i].packet)(0);
    let (verdict, out) = if paths[i].tc { tb.run_tc(&packet)? } else { tb.run_xdp(&packet)? };
    if out != packet || (verdict != XDP_PASS && verdict != TC_ACT_OK) || packet != (paths[i].packet)(1) {
        return Ok(None);
    }
    three_rounds(loaded, i, repeat, |load| {
        let (tb, paths) = &loaded[load];
        Ok(run_path(tb, &paths[i], &packet, repeat)?.1)
    })
    .map(Some)
}

/// Katran's `repeat` runs of a path that both leave as it was, each minus the floor's (this
/// build's testbed of the same load): three rounds on every load.
fn katran_repeat_runs(katran: &[Katran], current: &[(Testbed, Vec<Path>)], i: usize, repeat: u32) -> Result<Option<Summary>> {
    let path = &current[0].1[i];
    if path.katran_verdict != Some(XDP_PASS) {
        return Ok(None);
    }
    let packet = (path.packet)(0);
    three_rounds(current, i, repeat, |load| {
        let (verdict, took) = katran[load].time(&packet, path.ingress, repeat)?;
        ensure!(verdict == XDP_PASS, "Katran, {}: verdict {verdict}, not XDP_PASS", path.name);
        Ok(took)
    })
    .map(Some)
}

/// Three rounds over the loads: `run(load)` (a `repeat` run of path `i` on load `load`), minus
/// that load's floor run the same way.
fn three_rounds(loaded: &[(Testbed, Vec<Path>)], i: usize, repeat: u32, run: impl Fn(usize) -> Result<f64>) -> Result<Summary> {
    let mut ns = Vec::new();
    for _ in 0..3 {
        for (load, (tb, paths)) in loaded.iter().enumerate() {
            ns.push(run(load)? - floor(tb, &paths[i], repeat)?.1);
        }
    }
    Ok(Summary::of(&ns))
}

/// The floor of a path, run `repeat` times: the XDP_PASS program, or for a TC path `lb_tc` on
/// an ARP frame (which it leaves at once).
fn floor(tb: &Testbed, path: &Path, repeat: u32) -> Result<(u32, f64)> {
    if path.tc {
        tb.time_tc(TC_PROGRAM, &arp(), repeat)
    } else {
        tb.time_xdp_pass(&syn(CLIENT, 1000, [10, 1, 1, 1], 80), repeat)
    }
}

/// An ARP request: the floor of the TC paths.
fn arp() -> Vec<u8> {
    let mut frame = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x08, 0x06];
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 244, 1, 200, 0, 0, 0, 0, 0, 0, 10, 244, 1, 1]);
    frame
}

/// A testbed's run of a path's packet, `repeat` times: through `lb_tc` or `lb_xdp`.
fn run_path(tb: &Testbed, path: &Path, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
    match (path.tc, path.ingress) {
        (true, _) => tb.time_tc(TC_PROGRAM, packet, repeat),
        (false, Some(ingress)) => tb.time_xdp_on(packet, ingress, repeat),
        (false, None) => tb.time_xdp(packet, repeat),
    }
}

/// Opens an established path's flow, arriving where its packets will.
fn open(tb: &Testbed, path: &Path, opening: &[u8]) -> Result<()> {
    match path.ingress {
        Some(ingress) => tb.run_xdp_on(opening, ingress)?,
        None => tb.run_xdp(opening)?,
    };
    Ok(())
}

/// Katran's answer to a path's packet checked once: passed untouched, or encapsulated to one of
/// the VIP's reals.
fn check_katran(katran: &Katran, path: &Path) -> Result<()> {
    let Some(verdict) = path.katran_verdict else { return Ok(()) };
    let packet = (path.packet)(usize::MAX / 2);
    let (got, _, out) = katran.run(&packet, path.ingress)?;
    ensure!(got == verdict, "Katran, {}: verdict {got}, not {verdict}", path.name);
    if verdict == XDP_TX {
        let reals: Vec<[u8; 4]> = local_backends().chain(remote_backends()).collect();
        Katran::check_encapsulated(&out, &reals).with_context(|| format!("Katran, {}", path.name))?;
    } else {
        ensure!(out == packet, "Katran, {}: a passed packet was changed", path.name);
    }
    Ok(())
}

/// The node's link towards node B (the remote backends) with a static neighbour, in this
/// (private) namespace, for the FIB lookups of the remote paths.
fn routed_node() -> Result<()> {
    sh("ip link add lbt0 type veth peer name lbt1 && ip link set lbt0 address 02:00:00:00:00:01 && ip link set lbt0 up && ip link set lbt1 up \
        && ip addr add 10.99.0.1/24 dev lbt0 && ip route add 10.244.2.0/24 via 10.99.0.2 && ip route add default via 10.99.0.254 \
        && ip neigh add 10.99.0.2 lladdr 02:00:00:00:00:0b dev lbt0 nud permanent \
        && ip neigh add 10.99.0.254 lladdr 02:00:00:00:00:fe dev lbt0 nud permanent && sysctl -qw net.ipv4.conf.all.forwarding=1")?;
    Ok(())
}

/// Runs in a private network namespace (its own routes and links, gone with it).
pub fn run(cfg: &Config, baseline: Option<Vec<u8>>, katran: Option<Vec<u8>>) -> Result<Vec<Row>> {
    let (sizes, batch, samples, loads, repeat) = (cfg.sizes.clone(), cfg.batch, cfg.samples, cfg.loads, cfg.repeat);
    testbed::netns::in_private_netns(move || {
        routed_node()?;
        let mut rows = Vec::new();
        // Room for every new flow of both objects' runs.
        let flows = (4 * batch * samples + 1024).next_power_of_two() as u32;
        for n in sizes {
            let load = |object: &[u8]| -> Result<Vec<(Testbed, Vec<Path>)>> {
                (0..loads).map(|_| testbed(object, n, flows).and_then(|tb| paths(&tb).map(|paths| (tb, paths)))).collect()
            };
            let current = load(lb_agent::dataplane::load::OBJECT)?;
            let previous = baseline.as_deref().map(load).transpose()?;
            let katran = katran.as_deref().map(|object| (0..loads).map(|_| Katran::load(object, &katran_vips(), flows)).collect::<Result<Vec<_>>>()).transpose()?;
            for (i, path) in current[0].1.iter().enumerate() {
                if let Some(opening) = &path.opening {
                    for (tb, _) in current.iter().chain(previous.iter().flatten()) {
                        open(tb, path, opening)?;
                    }
                    for katran in katran.iter().flatten() {
                        katran.run(opening, path.ingress)?;
                    }
                }
                let katran = katran.as_ref().filter(|_| path.katran_verdict.is_some());
                for katran in katran.iter().copied().flatten() {
                    check_katran(katran, path)?;
                }
                let (mut now, mut before, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
                let (mut now_wall, mut before_wall) = (Vec::new(), Vec::new());
                for s in 0..samples {
                    // Each sample's new flows are its own; the programs' runs alternate, each
                    // object's loads in turn.
                    let first = s * batch;
                    let (tb, paths) = &current[s % loads];
                    let path = &paths[i];
                    let (ns, wall) = sample(tb, path, path.verdict, first, batch, |packet| run_path(tb, path, packet, 1))?;
                    now.push(ns);
                    now_wall.push(wall);
                    if let Some((tb, paths)) = previous.as_ref().map(|loaded| &loaded[s % loads]) {
                        let path = &paths[i];
                        let (ns, wall) = sample(tb, path, path.verdict, first, batch, |packet| run_path(tb, path, packet, 1))?;
                        before.push(ns);
                        before_wall.push(wall);
                    }
                    if let (Some(katran), Some(verdict)) = (katran.map(|loaded| &loaded[s % loads]), path.katran_verdict) {
                        let tb = &current[s % loads].0;
                        let flows = katran.flows()?;
                        theirs.push(sample(tb, path, verdict, first, batch, |packet| katran.run(packet, path.ingress).map(|(v, ns, _)| (v, ns)))?.0);
                        let added = katran.flows()? - flows;
                        let expected = if path.opening.is_none() && verdict == XDP_TX && (path.packet)(0) != (path.packet)(1) { batch } else { 0 };
                        ensure!(added == expected, "Katran, {}: {added} flows cached, not {expected}", path.name);
                    }
                }
                let repeated = repeat_runs(&current, i, repeat)?;
                let baseline_repeated = match (&previous, repeated.is_some()) {
                    (Some(loaded), true) => repeat_runs(loaded, i, repeat)?,
                    _ => None,
                };
                let katran_repeated = match (&katran, repeated.is_some()) {
                    (Some(katran), true) => katran_repeat_runs(katran, &current, i, repeat)?,
                    _ => None,
                };
                let ratio_to = |other: &[f64]| (!other.is_empty()).then(|| Summary::of(&now.iter().zip(other).map(|(a, b)| a / b).collect::<Vec<_>>()));
                rows.push(Row {
                    services: n,
                    path: path.name,
                    current: Summary::of(&now),
                    baseline: (!before.is_empty()).then(|| Summary::of(&before)),
                    ratio: ratio_to(&before),
                    katran: (!theirs.is_empty()).then(|| Summary::of(&theirs)),
                    katran_ratio: ratio_to(&theirs),
                    wall: Summary::of(&now_wall),
                    baseline_wall: (!before_wall.is_empty()).then(|| Summary::of(&before_wall)),
                    wall_difference: (!before_wall.is_empty()).then(|| Summary::of(&now_wall.iter().zip(&before_wall).map(|(a, b)| a - b).collect::<Vec<_>>())),
                    repeat: repeated,
                    baseline_repeat: baseline_repeated,
                    katran_repeat: katran_repeated,
                });
            }
        }
        Ok(rows)
    })
}
