//! Changes while traffic flows: backends added and removed, endpoints unready, bad manifests.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use testbed::{
    demo::{sock, Demo},
    servers::{tcp_request, udp_request, LongConnection},
};

use crate::support::*;

const WEB: [u8; 4] = [10, 96, 0, 10];

/// The example manifests with `web`'s EndpointSlice moved to its own file, so tests can
/// rewrite it: `endpoints` are (pod index 0-4, ready).
fn manifests_with_web_slice(tag: &str) -> Result<ManifestCopy> {
    let m = ManifestCopy::new(tag)?;
    let endpoints = m.read("endpoints.yaml");
    let rest: Vec<&str> = endpoints.split("\n---\n").filter(|doc| !doc.contains("name: web-abc12")).collect();
    m.write("endpoints.yaml", &rest.join("\n---\n"))?;
    write_web_slice(&m, &[(0, true), (1, true), (2, true)])?;
    Ok(m)
}

fn pod_ip(index: u8) -> String {
    format!("10.244.1.{}", 11 + index)
}

fn write_web_slice(m: &ManifestCopy, endpoints: &[(u8, bool)]) -> Result<()> {
    let eps: String = endpoints.iter().map(|(i, ready)| format!("  - {{addresses: [{}], conditions: {{ready: {ready}}}, nodeName: node-a}}\n", pod_ip(*i))).collect();
    m.write(
        "web-slice.yaml",
        &format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-abc12, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports:\n  - {{name: http, protocol: TCP, port: 8080}}\n  - {{name: echo, protocol: UDP, port: 7007}}\nendpoints:\n{eps}"),
    )
}

/// Which pod index (0-2, or 4 for web-3) a backend name is.
fn pod_of(backend: &str) -> u8 {
    match backend {
        "web-3" => 4,
        b => b.trim_start_matches("web-").parse().unwrap(),
    }
}

fn backends_of_new_flows(demo: &Demo, n: usize) -> Result<BTreeSet<String>> {
    (0..n).map(|_| Ok(tcp_request(demo.client_pod(), sock(WEB, 80), None, TIMEOUT)?.backend)).collect()
}

#[test]
fn established_connection_survives_backend_changes() -> Result<()> {
    let mut demo = Demo::build("e4")?;
    let manifests = manifests_with_web_slice("e4")?;
    let (mut agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let mut conn = LongConnection::open(demo.client_pod(), sock(WEB, 80), TIMEOUT)?;
    let original = conn.exchange("first")?.backend;
    let own = pod_of(&original);
    let other = (0..3u8).find(|i| *i != own).unwrap();

    // Add web-3 (pod 4) and remove a different backend.
    let endpoints: Vec<(u8, bool)> = (0..3u8).filter(|i| *i != other).map(|i| (i, true)).chain([(4, true)]).collect();
    write_web_slice(&manifests, &endpoints)?;
    let removed = format!("web-{other}");
    eventually(Duration::from_secs(5), || {
        let seen = backends_of_new_flows(&demo, 12)?;
        if seen.contains("web-3") && !seen.contains(&removed) { Ok(()) } else { Err(anyhow!("new flows still see {seen:?}")) }
    })?;
    for i in 0..20 {
        assert_eq!(conn.exchange(&format!("msg {i}"))?.backend, original, "the established connection stays on its backend");
    }

    // Remove the connection's own backend: nothing crashes, new flows avoid it.
    let endpoints: Vec<(u8, bool)> = endpoints.into_iter().filter(|(i, _)| *i != own).collect();
    write_web_slice(&manifests, &endpoints)?;
    eventually(Duration::from_secs(5), || {
        let seen = backends_of_new_flows(&demo, 12)?;
        if !seen.contains(&original) { Ok(()) } else { Err(anyhow!("new flows still reach {original}")) }
    })?;
    // The old connection either goes on (its backend still serves other Services, as
    // kube-proxy's conntrack would keep it) or is reset; it never hangs.
    match conn.exchange("after removal") {
        Ok(a) => assert_eq!(a.backend, original),
        Err(e) => {
            let kind = e.downcast_ref::<std::io::Error>().map(|e| e.kind());
            assert!(matches!(kind, Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof)) || e.to_string().contains("closed"), "{e:#}");
        }
    }
    assert!(agent.child.try_wait()?.is_none(), "the agent is still running:\n{}", agent.log_text());
    Ok(())
}

#[test]
fn service_without_ready_endpoints_refuses_at_once() -> Result<()> {
    let mut demo = Demo::build("e5")?;
    let manifests = manifests_with_web_slice("e5")?;
    write_web_slice(&manifests, &[(0, false), (1, false), (2, false)])?;
    // And the LoadBalancer Service too, for the XDP path.
    let endpoints = manifests.read("endpoints.yaml").replace("name: web-lb-gh56", "name: web-lb-gh56x");
    let unready: String = endpoints
        .split("\n---\n")
        .map(|doc| if doc.contains("web-lb-gh56x") { doc.replace("ready: true", "ready: false") } else { doc.to_string() })
        .collect::<Vec<_>>()
        .join("\n---\n");
    manifests.write("endpoints.yaml", &unready)?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;

    for (who, ns, addr, port) in [("pod -> ClusterIP (TC)", demo.client_pod(), WEB, 80), ("outside -> LoadBalancer (XDP)", &demo.cluster.client, [10, 99, 100, 10], 80)] {
        let started = std::time::Instant::now();
        let err = tcp_request(ns, sock(addr, port), None, Duration::from_secs(5)).expect_err("no backend is ready");
        let kind = err.downcast_ref::<std::io::Error>().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::ConnectionRefused), "{who}: {err:#}");
        assert!(started.elapsed() < Duration::from_millis(500), "{who}: refused at once, not after a timeout ({:?})", started.elapsed());
    }
    // UDP: an ICMP port unreachable, which a connected socket reports as refused.
    for (who, ns, addr) in [("pod -> ClusterIP UDP (TC)", demo.client_pod(), WEB), ("outside -> LoadBalancer UDP (XDP)", &demo.cluster.client, [10, 99, 100, 10])] {
        let started = std::time::Instant::now();
        let err = udp_request(ns, sock(addr, 7), 0, Duration::from_secs(5)).expect_err("no backend is ready");
        let kind = err.downcast_ref::<std::io::Error>().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::ConnectionRefused), "{who}: {err:#}");
        assert!(started.elapsed() < Duration::from_millis(500), "{who}: refused at once ({:?})", started.elapsed());
    }
    // The NodePort Service, whose endpoints are ready, still serves.
    tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30080), None, TIMEOUT)?;
    Ok(())
}

#[test]
fn bad_manifests_are_reported_and_change_nothing() -> Result<()> {
    let mut demo = Demo::build("e6")?;
    let manifests = ManifestCopy::new("e6")?;
    let (mut agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let serving = |demo: &Demo| -> Result<()> {
        tcp_request(demo.client_pod(), sock(WEB, 80), None, TIMEOUT)?;
        udp_request(demo.client_pod(), sock(WEB, 7), 0, TIMEOUT)?;
        tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30080), None, TIMEOUT)?;
        tcp_request(&demo.cluster.client, sock([10, 99, 100, 10], 80), None, TIMEOUT)?;
        Ok(())
    };
    serving(&demo)?;

    // A new file with a port out of range.
    manifests.write("broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: demo}\nspec:\n  clusterIP: 10.96.0.99\n  ports: [{name: http, port: 70000}]\n")?;
    agent.wait_for_log("broken.yaml: Service demo/broken: spec.ports[0].port: port 70000 is out of range 1-65535", Duration::from_secs(5))?;
    serving(&demo)?;

    // An existing Service turned bad keeps its last good version.
    let services = manifests.read("services.yaml");
    manifests.write("services.yaml", &services.replacen("protocol: UDP", "protocol: UDPX", 1))?;
    agent.wait_for_log("services.yaml: Service demo/web: spec.ports[1].protocol: unknown protocol \"UDPX\"", Duration::from_secs(5))?;
    serving(&demo)?;

    // Mended, and made dual-stack: the IPv4 addresses keep serving, and the IPv6 cluster IPs
    // are programmed beside them.
    let services = manifests.read("services.yaml").replace("protocol: UDPX", "protocol: UDP");
    let dual = services.replace("clusterIPs: [10.96.0.10]", "clusterIPs: [10.96.0.10, fd00::10]").replace("clusterIP: 10.96.0.11\n", "clusterIP: 10.96.0.11\n  clusterIPs: [10.96.0.11, fd00::11]\n");
    assert_ne!(dual, services);
    manifests.write("services.yaml", &dual)?;
    eventually(Duration::from_secs(5), || {
        let listed = lbctl_json(&pins, &["service", "list"])?;
        let frontends: Vec<&str> = listed.iter().filter_map(|s| s["frontend"].as_str()).collect();
        anyhow::ensure!(frontends.contains(&"[fd00::10]:80/TCP") && frontends.contains(&"[fd00::11]:80/TCP"), "{frontends:?}");
        Ok(())
    })?;
    serving(&demo)?;

    // What `kubectl get -o yaml` writes: a List, here with a Service and a ConfigMap. The
    // Service is programmed; the ConfigMap's kind is reported once, not on every sync.
    manifests.write("dump.yaml", "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Service\n    metadata: {name: listed, namespace: demo}\n    spec:\n      clusterIP: 10.96.0.98\n      ports: [{name: http, port: 80}]\n  - apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: settings, namespace: demo}\n    data: {a: b}\n")?;
    eventually(Duration::from_secs(5), || {
        let listed = lbctl_json(&pins, &["service", "list"])?;
        anyhow::ensure!(listed.iter().any(|s| s["frontend"] == "10.96.0.98:80/TCP"), "{listed:?}");
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(500)); // several syncs
    let warning = "dump.yaml: objects of kind ConfigMap are not read";
    assert_eq!(agent.log_text().matches(warning).count(), 1, "{}", agent.log_text());
    serving(&demo)?;

    // A file that is not even YAML keeps its last good objects.
    manifests.write("endpoints.yaml", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nendpoints: [\n")?;
    agent.wait_for_log("endpoints.yaml: document 1: -: invalid YAML", Duration::from_secs(5))?;
    serving(&demo)?;
    assert!(agent.child.try_wait()?.is_none());
    Ok(())
}

#[test]
fn one_unreadable_or_truncated_file_stops_nothing_else() -> Result<()> {
    let mut demo = Demo::build("e7")?;
    let manifests = ManifestCopy::new("e7")?;
    let (mut agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    // Not UTF-8 (a binary dropped in the directory), and a file cut short mid-write.
    std::fs::write(manifests.dir.join("binary.yaml"), [0x6b, 0x69, 0x6e, 0x64, 0x3a, 0x20, 0xff, 0xfe, 0x00, 0x01])?;
    manifests.write("truncated.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: cut, namespace: demo}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{port: 8")?;
    agent.wait_for_log("binary.yaml: file: -: is not UTF-8 text (invalid byte at offset 6)", Duration::from_secs(5))?;
    agent.wait_for_log("truncated.yaml: document 1: -: invalid YAML", Duration::from_secs(5))?;
    // Every other Service still gets its updates.
    manifests.write("services.yaml", &manifests.read("services.yaml").replace("nodePort: 30080", "nodePort: 30086"))?;
    eventually(Duration::from_secs(5), || tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30086), None, TIMEOUT))?;
    tcp_request(demo.client_pod(), sock(WEB, 80), None, TIMEOUT)?;
    assert!(!agent.log_text().contains("sync failed"), "{}", agent.log_text());
    Ok(())
}

/// Sends `count` TCP SYNs from spoofed sources (10.98.0.0/16, which nothing routes back to)
/// to `to`, as raw IPv4 packets, from the client namespace.
const SYN_FLOOD: &str = r#"
import socket, struct, sys
dst, dport, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def csum(b):
    total = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    total = (total >> 16) + (total & 0xffff)
    return ~(total + (total >> 16)) & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
daddr = socket.inet_aton(dst)
for i in range(count):
    saddr = socket.inet_aton("10.98.%d.%d" % (i // 250, i % 250 + 1))
    tcp = struct.pack("!HHLLBBHHH", 1024 + i, dport, i, 0, 5 << 4, 0x02, 64240, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", csum(saddr + daddr + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xffff, 0, 64, 6, 0, saddr, daddr)
    s.sendto(ip + tcp, (dst, 0))
"#;

#[test]
fn a_syn_flood_fills_conntrack_only_until_its_half_open_flows_expire() -> Result<()> {
    let mut demo = Demo::build("sf")?;
    let manifests = ManifestCopy::new("sf")?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &["--max-flows", "1024", "--gc-interval-s", "1"])?;
    let node_port = sock([10, 99, 0, 1], 30080);
    let mut held = LongConnection::open(&demo.cluster.client, node_port, TIMEOUT)?;
    let backend = held.exchange("before")?.backend;

    let script = manifests.dir.join("flood.py");
    std::fs::write(&script, SYN_FLOOD)?;
    demo.cluster.client.exec(&format!("python3 {} 10.99.0.1 30080 5000", script.display()))?;
    let flooded = Instant::now();
    let full = reason_count(&pins, "drop_ct_full")?;
    assert!(full > 3000, "5,000 half-open flows against 1,024 entries: {full} dropped as full");
    assert!(tcp_request(&demo.cluster.client, node_port, None, Duration::from_millis(500)).is_err(), "conntrack is full of half-open flows");

    // Established flows keep working throughout; new ones work again once the half-open
    // flows expire (60 s, as a lone SYN), not after the 6 h of an established flow.
    let recovered = loop {
        assert_eq!(held.exchange("during")?.backend, backend, "the established flow is untouched");
        if tcp_request(&demo.cluster.client, node_port, None, Duration::from_millis(500)).is_ok() {
            break flooded.elapsed();
        }
        if flooded.elapsed() > Duration::from_secs(90) {
            return Err(anyhow!("new connections still fail 90 s after the flood"));
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(recovered < Duration::from_secs(65), "new connections work again after {recovered:?}");
    Ok(())
}
