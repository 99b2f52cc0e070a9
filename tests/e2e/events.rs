//! Flow events end to end: real drops of several reasons, each one event with its reason,
//! 5-tuple and Service in `lbctl observe`; and a flood of drops, with the agent's memory
//! bounded and every event it did not get counted.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use testbed::{
    netns::Netns,
    process::AgentProcess,
    servers::{tcp_request, EchoServer, LongConnection},
    topology::{Cluster, CLIENT_IP},
};

use crate::support::{agent_bin, eventually, reason_count, ManifestCopy};

/// web (ExternalIP 10.99.200.30, one backend), empty (ExternalIP 10.99.200.31, no endpoint),
/// ranged (LoadBalancer 10.99.100.32, clients of 192.0.2.0/24 only).
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: ev}
spec:
  clusterIP: 10.96.7.30
  externalIPs: [10.99.200.30]
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: ev, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints: [{addresses: [10.244.1.11], conditions: {ready: true}, nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: ev}
spec:
  clusterIP: 10.96.7.31
  externalIPs: [10.99.200.31]
  ports: [{name: http, protocol: TCP, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: ranged, namespace: ev}
spec:
  type: LoadBalancer
  clusterIP: 10.96.7.32
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports: [{name: echo, protocol: UDP, port: 7, targetPort: 7007, nodePort: 30732}]
status: {loadBalancer: {ingress: [{ip: 10.99.100.32}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ranged-1, namespace: ev, labels: {kubernetes.io/service-name: ranged}}
addressType: IPv4
ports: [{name: echo, protocol: UDP, port: 7007}]
endpoints: [{addresses: [10.244.1.11], conditions: {ready: true}, nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: spread, namespace: ev}
spec:
  clusterIP: 10.96.7.33
  externalIPs: [10.99.200.33]
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: spread-1, namespace: ev, labels: {kubernetes.io/service-name: spread}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: [10.244.1.11], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.12], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.1.13], conditions: {ready: true}, nodeName: node-a}
"#;

struct Bed {
    cluster: Cluster,
    pins: PathBuf,
    socket: PathBuf,
    agent: AgentProcess,
    _servers: Vec<EchoServer>,
    _dir: ManifestCopy,
}

impl Bed {
    fn build(tag: &str, extra: &[&str]) -> Result<Self> {
        let mut cluster = Cluster::new(tag, &[3])?;
        let servers = cluster.nodes[0].pods.iter().enumerate().map(|(i, pod)| EchoServer::start(&pod.ns, &format!("web-{i}"), 8080, 7007)).collect::<Result<_>>()?;
        let dir = ManifestCopy::empty(tag)?;
        dir.write("services.yaml", MANIFESTS)?;
        let pins = cluster.pin_dir()?;
        let socket = std::env::temp_dir().join(format!("{}-events.sock", cluster.prefix));
        let source = ["--manifests".to_string(), dir.dir.display().to_string()];
        let socket_arg = socket.display().to_string();
        let args: Vec<&str> = [&["--events-socket", socket_arg.as_str()][..], extra].concat();
        let agent = cluster.start_agent(agent_bin(), 0, &source, &pins, &args)?;
        Ok(Self { cluster, pins, socket, agent, _servers: servers, _dir: dir })
    }

    fn client(&self) -> &Netns {
        &self.cluster.client
    }

    /// `lbctl observe -o json ARGS`, one value per event.
    fn observe(&self, args: &[&str]) -> Result<Vec<Value>> {
        let out = Command::new(env!("CARGO_BIN_EXE_lbctl")).args(["-o", "json", "observe", "--socket"]).arg(&self.socket).args(args).output()?;
        anyhow::ensure!(out.status.success(), "lbctl observe: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout)?.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
    }

    /// The value of one series of the agent's /metrics (`name{labels}` as printed).
    fn metric(&self, series: &str) -> Result<u64> {
        let (_, body) = testbed::servers::http_get(&self.cluster.nodes[0].ns, SocketAddr::from(([127, 0, 0, 1], 9970)), "/metrics", Duration::from_secs(2))?;
        let line = body.lines().find(|l| l.starts_with(series)).with_context(|| format!("no {series} in /metrics"))?;
        Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
    }

    /// The agent's resident memory, from /proc.
    fn agent_rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.agent.pid()))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("a number")?.parse()?)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.agent.stop();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A malformed IPv4 packet (a header length of 16 bytes, below the 20 of any header) from the
/// client to the node, sent on the client's `eth0` as a raw frame.
fn send_malformed_ipv4(client: &Netns, node_mac: &str) -> Result<()> {
    let client_mac = client.mac("eth0")?;
    let mac = |text: &str| -> Result<[u8; 6]> {
        let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
        Ok(bytes.try_into().map_err(|_| anyhow::anyhow!("a MAC"))?)
    };
    let (src, dst) = (mac(&client_mac)?, mac(node_mac)?);
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(src, dst).ipv4(CLIENT_IP.octets(), [10, 99, 200, 30], 64).tcp(40999, 80, 1, 64240).syn().write(&mut frame, &[])?;
    frame[14] = 0x44; // version 4, IHL 4
    frame.resize(60, 0); // a minimum-size Ethernet frame
    let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
    client.exec(&format!("python3 -c \"import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0', 0)); s.send(bytes.fromhex('{hex}'))\""))?;
    Ok(())
}

fn ip(text: &str) -> Option<IpAddr> {
    text.parse().ok()
}

#[test]
fn every_drop_is_one_event_with_its_reason_tuple_and_service() -> Result<()> {
    // Room for four flows: the fifth is refused as conntrack full.
    let bed = Bed::build("ev", &["--max-flows", "4"])?;
    let reasons = ["reject_no_backend", "drop_source_range", "drop_ct_full", "drop_malformed_ip4"];
    let before: Vec<u64> = reasons.iter().map(|r| reason_count(&bed.pins, r)).collect::<Result<_>>()?;
    let quick = Duration::from_millis(300);

    // No endpoint: refused with a RST.
    assert!(tcp_request(bed.client(), SocketAddr::from(([10, 99, 200, 31], 80)), Some(41001), quick).is_err());
    // Outside the source ranges: dropped (two datagrams, two events).
    for port in [41002, 41003] {
        let s = bed.client().run(move || UdpSocket::bind(("0.0.0.0", port)))??;
        bed.client().run(move || s.send_to(b"x", "10.99.100.32:7"))??;
    }
    // Conntrack full: four connections held, the fifth refused.
    let held: Vec<LongConnection> = (0..4).map(|_| LongConnection::open(bed.client(), SocketAddr::from(([10, 99, 200, 30], 80)), Duration::from_secs(2))).collect::<Result<_>>()?;
    assert!(tcp_request(bed.client(), SocketAddr::from(([10, 99, 200, 30], 80)), Some(41005), quick).is_err(), "conntrack is full");
    // A malformed IPv4 header. The LAN is a plain switch: the bridge's netfilter hook would
    // drop the packet before it reaches the node (real switches do not look at IP headers).
    bed.cluster.lan.exec("sysctl -qw net.bridge.bridge-nf-call-iptables=0")?;
    send_malformed_ipv4(bed.client(), &bed.cluster.nodes[0].ns.mac("eth0")?)?;

    let after: Vec<u64> = reasons.iter().map(|r| reason_count(&bed.pins, r)).collect::<Result<_>>()?;
    let events = eventually(Duration::from_secs(5), || {
        let events = bed.observe(&["--last", "100"])?;
        let counts: Vec<u64> = reasons.iter().map(|r| events.iter().filter(|e| e["reason"] == *r).count() as u64).collect();
        let drops: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        if counts == drops && drops.iter().all(|d| *d > 0) { Ok(events) } else { bail!("events per reason {counts:?}, drops counted {drops:?}: {events:#?}") }
    })?;
    drop(held);
    let of = |reason: &str| events.iter().filter(|e| e["reason"] == reason).cloned().collect::<Vec<_>>();
    let reject = &of("reject_no_backend")[0];
    assert_eq!((reject["verdict"].as_str(), reject["hook"].as_str(), reject["protocol"].as_str()), (Some("REJECTED"), Some("xdp"), Some("TCP")), "{reject}");
    assert_eq!((reject["src"].as_str().and_then(ip), reject["src_port"].as_u64(), reject["dst"].as_str(), reject["dst_port"].as_u64()), (Some(IpAddr::V4(CLIENT_IP)), Some(41001), Some("10.99.200.31"), Some(80)), "{reject}");
    assert_eq!(reject["service"].as_str(), Some("ev/empty:http/TCP"), "{reject}");
    let ranged = of("drop_source_range");
    assert_eq!(ranged.iter().map(|e| e["src_port"].as_u64().unwrap()).collect::<Vec<_>>(), [41002, 41003]);
    assert!(ranged.iter().all(|e| e["verdict"] == "DROPPED" && e["protocol"] == "UDP" && e["dst"] == "10.99.100.32" && e["service"] == "ev/ranged:echo/UDP"), "{ranged:?}");
    let full = &of("drop_ct_full")[0];
    assert_eq!((full["src_port"].as_u64(), full["dst"].as_str(), full["service"].as_str()), (Some(41005), Some("10.99.200.30"), Some("ev/web:http/TCP")), "{full}");
    let bad = &of("drop_malformed_ip4")[0];
    assert_eq!((bad["src"].is_null(), bad["hook"].as_str(), bad["device"].as_str()), (true, Some("xdp"), Some("eth0")), "a packet that does not parse has no tuple: {bad}");
    // Filters: by reason, by port, by verdict; compact output names the Service.
    assert_eq!(bed.observe(&["--last", "100", "--reason", "drop_source_range"])?.len(), 2);
    assert_eq!(bed.observe(&["--last", "100", "--port", "41005"])?.len(), 1);
    assert_eq!(bed.observe(&["--last", "100", "--verdict", "rejected"])?.len(), 1);
    assert_eq!(bed.observe(&["--last", "100", "--service", "ranged"])?.len(), 2);
    let compact = Command::new(env!("CARGO_BIN_EXE_lbctl")).args(["observe", "--socket"]).arg(&bed.socket).args(["--last", "100", "--reason", "reject_no_backend"]).output()?;
    let text = String::from_utf8(compact.stdout)?;
    assert!(text.contains("REJECTED reject_no_backend xdp eth0 TCP 10.99.0.100:41001 -> 10.99.200.31:80 service ev/empty:http/TCP"), "{text}");
    Ok(())
}

/// A flood of drops: 200,000 datagrams outside the source ranges as fast as one client sends
/// them, three times. Events past the per-CPU rate are throttled and counted; every drop is an
/// event emitted, throttled or lost; the agent keeps at most its buffer, and once that is full
/// (after the second flood) another flood leaves its memory where it was.
#[test]
fn a_flood_of_drops_is_rate_limited_counted_and_held_in_bounded_memory() -> Result<()> {
    let bed = Bed::build("evf", &["--event-rate", "1000", "--event-burst", "100", "--event-buffer", "2048"])?;
    const PACKETS: u64 = 200_000;
    let flood = || -> Result<u64> {
        let before = reason_count(&bed.pins, "drop_source_range")?;
        let started = std::time::Instant::now();
        bed.client().run(|| -> Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect("10.99.100.32:7")?;
            for _ in 0..PACKETS {
                // A full socket buffer is no failure here: the point is many drops quickly.
                let _ = s.send(b"flood");
            }
            Ok(())
        })??;
        let dropped = reason_count(&bed.pins, "drop_source_range")? - before;
        eprintln!("flood: {dropped} drops in {:.2} s ({:.0}/s)", started.elapsed().as_secs_f64(), dropped as f64 / started.elapsed().as_secs_f64());
        assert!(dropped >= PACKETS * 9 / 10, "{dropped} of {PACKETS} dropped");
        Ok(dropped)
    };
    // The kernel's counters, read from the pinned map (scraping /metrics between floods would
    // put its own allocations into the memory measured).
    let stats: aya::maps::PerCpuArray<aya::maps::MapData, u64> = lb_agent::dataplane::maps::open_pinned(&bed.pins, lb_common::MAP_EVENT_STATS)?;
    let count = |outcome: &str| -> Result<u64> { Ok(lb_agent::events::kernel_counts(&stats)?.into_iter().find(|(_, o, _)| *o == outcome).map_or(0, |(_, _, n)| n)) };
    let mut total = 0;
    let mut rss = Vec::new();
    for round in 0..3 {
        total += flood()?;
        let (emitted, throttled, lost) = eventually(Duration::from_secs(5), || {
            let counts = (count("emitted")?, count("throttled")?, count("lost")?);
            if counts.0 + counts.1 + counts.2 >= total { Ok(counts) } else { bail!("{counts:?} of {total}") }
        })?;
        eprintln!("flood {round}: events emitted {emitted}, throttled {throttled}, lost {lost}");
        assert_eq!(emitted + throttled + lost, total, "every drop is an event emitted, throttled or lost");
        assert!(throttled > 0 && emitted < total / 10, "the rate limit held: {emitted} emitted of {total}");
        rss.push(bed.agent_rss_kib()?);
    }
    eprintln!("flood: agent RSS after each flood {rss:?} KiB");
    assert!(rss[2] < rss[1] + 8 * 1024, "memory bounded: {rss:?} KiB");
    let held = bed.observe(&["--last", "100000"])?;
    assert_eq!(held.len(), 2048, "the agent holds its buffer, no more");
    // The metrics say the same as the map.
    assert_eq!(bed.metric("lb_flow_events_total{kind=\"drop\",outcome=\"throttled\"}")?, count("throttled")?);
    Ok(())
}

/// `lbctl explain` against real traffic: for 200 client ports, the backend it predicts for a
/// new connection is the backend that answers it.
#[test]
fn explain_predicts_the_backend_that_answers() -> Result<()> {
    let bed = Bed::build("evx", &[])?;
    let mut seen = std::collections::BTreeSet::new();
    for port in 42_000..42_200u16 {
        let out = Command::new(env!("CARGO_BIN_EXE_lbctl")).arg("--pin-dir").arg(&bed.pins).args(["-o", "json", "explain", &format!("10.99.0.100:{port}"), "10.99.200.33:80/TCP"]).output()?;
        anyhow::ensure!(out.status.success(), "lbctl explain: {}", String::from_utf8_lossy(&out.stderr));
        let e: Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!((e["verdict"].as_str(), e["service"].as_str()), (Some("fwd_local_backend"), Some("ev/spread:http/TCP")), "{e}");
        let predicted: SocketAddr = e["backend"].as_str().context("a backend")?.parse()?;
        let answer = tcp_request(bed.client(), SocketAddr::from(([10, 99, 200, 33], 80)), Some(port), Duration::from_secs(2))?;
        let index: usize = answer.backend.trim_start_matches("web-").parse()?;
        assert_eq!(predicted, SocketAddr::from(([10, 244, 1, 11 + index as u8], 8080)), "client port {port}: explain said {predicted}, {} answered ({e})", answer.backend);
        seen.insert(index);
    }
    assert_eq!(seen.len(), 3, "the 200 flows spread over the three backends");
    // The tracked flow of the last one keeps its backend; a source outside the ranges is dropped.
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl")).arg("--pin-dir").arg(&bed.pins).args(["explain", "10.99.0.100:41002", "10.99.100.32:7/UDP"]).output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("source ranges: 10.99.0.100 is outside every one") && text.contains("verdict: drop_source_range"), "{text}");
    Ok(())
}

/// With `--events flows,closes`, each new connection is an event with its Service, the backend it was
/// sent to (the one that answered) and no SNAT for a local backend; once conntrack GC removes
/// it (10 s after its FINs), a close event says so, with the same backend.
#[test]
fn new_connections_are_events_with_the_backend_that_answered_and_so_are_their_closes() -> Result<()> {
    let bed = Bed::build("evn", &["--events", "flows,closes", "--gc-interval-s", "1"])?;
    let mut answered = Vec::new();
    for port in 43_000..43_010u16 {
        let answer = tcp_request(bed.client(), SocketAddr::from(([10, 99, 200, 33], 80)), Some(port), Duration::from_secs(2))?;
        let index: u8 = answer.backend.trim_start_matches("web-").parse()?;
        answered.push((port, SocketAddr::from(([10, 244, 1, 11 + index], 8080))));
    }
    let events = eventually(Duration::from_secs(5), || {
        let events = bed.observe(&["--last", "100", "--verdict", "translated"])?;
        if events.len() >= 10 { Ok(events) } else { bail!("{} new-connection events", events.len()) }
    })?;
    for &(port, backend) in &answered {
        let of_port: Vec<&Value> = events.iter().filter(|e| e["src_port"] == port).collect();
        assert_eq!(of_port.len(), 1, "one event for the connection from port {port}: {events:?}");
        let e = of_port[0];
        assert_eq!((e["reason"].as_str(), e["hook"].as_str(), e["service"].as_str(), e["dst"].as_str()), (Some("fwd_local_backend"), Some("xdp"), Some("ev/spread:http/TCP"), Some("10.99.200.33")), "{e}");
        assert_eq!((e["backend"].as_str(), e["snat"].is_null()), (Some(backend.to_string().as_str()), true), "{e}");
    }
    // Closed: removed by GC once their closing lifetime has passed.
    let closes = eventually(Duration::from_secs(20), || {
        let events = bed.observe(&["--last", "100", "--verdict", "closed"])?;
        if events.len() >= 10 { Ok(events) } else { bail!("{} close events", events.len()) }
    })?;
    for (port, backend) in answered {
        let of_port: Vec<&Value> = closes.iter().filter(|e| e["src_port"] == port).collect();
        assert_eq!(of_port.len(), 1, "one close for the connection from port {port}: {closes:?}");
        let e = of_port[0];
        assert_eq!((e["reason"].as_str(), e["hook"].as_str(), e["service"].as_str(), e["dst"].as_str(), e["dst_port"].as_u64()), (Some("close_fin"), Some("gc"), Some("ev/spread:http/TCP"), Some("10.99.200.33"), Some(80)), "{e}");
        assert_eq!(e["backend"].as_str(), Some(backend.to_string().as_str()), "{e}");
    }
    // Refusals were not asked for: a connection to the Service without endpoints is refused
    // (counted) and is no event.
    let refused_before = reason_count(&bed.pins, "reject_no_backend")?;
    assert!(tcp_request(bed.client(), SocketAddr::from(([10, 99, 200, 31], 80)), Some(43_100), Duration::from_secs(2)).is_err());
    assert_eq!(reason_count(&bed.pins, "reject_no_backend")?, refused_before + 1);
    assert!(bed.observe(&["--last", "100", "--verdict", "rejected"])?.is_empty(), "refusals were not asked for");
    assert_eq!(bed.metric("lb_flow_events_total{kind=\"close\",outcome=\"emitted\"}")?, 10);
    // A filter applies before --last: the last two new connections, though closes came since.
    let last_two: Vec<Option<u64>> = bed.observe(&["--verdict", "translated", "--last", "2"])?.iter().map(|e| e["src_port"].as_u64()).collect();
    assert_eq!(last_two, [Some(43_008), Some(43_009)]);
    Ok(())
}
