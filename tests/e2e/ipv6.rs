//! IPv6 and dual-stack Services over real traffic: the IPv4 service-path cases repeated over
//! IPv6 (which backend answered, the source address it saw), and one Service answering on both
//! of its cluster IPs.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Result;
use testbed::{
    demo::{sock, Demo, BACKEND_TCP_PORT, BACKEND_UDP_PORT},
    servers::{tcp_request, udp_request, Answer, EchoServer},
    topology::{Cluster, CLIENT_IP6},
};

use crate::support::*;

const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x60);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0x100, 0, 0, 0, 0, 0x60);
const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0x200, 0, 0, 0, 0, 0x60);

fn sock6(addr: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

/// A dual-stack LoadBalancer Service `dual` (TCP 80 and UDP 7, NodePorts 30600 and 30601) and
/// its EndpointSlices of both families; `endpoints6` are the IPv6 ones, with their nodes.
fn dual_stack_manifest(endpoints4: &[(IpAddr, &str)], endpoints6: &[(IpAddr, &str)]) -> String {
    let slice = |family: &str, endpoints: &[(IpAddr, &str)]| {
        let list: String = endpoints.iter().map(|(ip, node)| format!("- {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {node}}}\n")).collect();
        let list = if list.is_empty() { "[]\n".to_string() } else { format!("\n{list}") };
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dual-{family}, namespace: demo, labels: {{kubernetes.io/service-name: dual}}}}\n\
             addressType: {family}\nports: [{{name: http, port: {BACKEND_TCP_PORT}}}, {{name: echo, port: {BACKEND_UDP_PORT}, protocol: UDP}}]\nendpoints: {list}"
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dual, namespace: demo}}\nspec:\n  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n\
         \x20 clusterIP: 10.96.0.60\n  clusterIPs: [10.96.0.60, \"{CLUSTER_IP6}\"]\n  externalIPs: [\"{EXTERNAL_IP6}\"]\n\
         \x20 ports:\n  - {{name: http, port: 80, targetPort: {BACKEND_TCP_PORT}, nodePort: 30600}}\n  - {{name: echo, port: 7, protocol: UDP, targetPort: {BACKEND_UDP_PORT}, nodePort: 30601}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: \"{LB_IP6}\"}}]}}}}\n{}{}",
        slice("IPv4", endpoints4),
        slice("IPv6", endpoints6),
    )
}

/// The demo node's three backend pods (web-0..2), by address of one family.
fn web_pods(demo: &Demo, v6: bool) -> Vec<(IpAddr, &'static str)> {
    demo.cluster.nodes[0].pods[..3].iter().map(|p| (if v6 { IpAddr::from(p.ip6) } else { IpAddr::from(p.ip) }, "node-a")).collect()
}

#[test]
fn pod_and_outside_clients_reach_every_ipv6_frontend_kind() -> Result<()> {
    let mut demo = Demo::build("v1")?;
    let manifests = ManifestCopy::empty("v1")?;
    manifests.write("dual.yaml", &dual_stack_manifest(&web_pods(&demo, false), &web_pods(&demo, true)))?;
    let (agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let context = |what: String| {
        let (agent, pins) = (&agent, &pins);
        move |e: anyhow::Error| e.context(format!("{what}\n{}\n{}", agent.log_text(), lbctl(pins, &["stats"]).unwrap_or_default()))
    };

    // A pod to the IPv6 ClusterIP (TC on its device): the backend sees the pod's own address.
    let pod = &demo.cluster.nodes[0].pods[3];
    let mut backends = BTreeSet::new();
    for i in 0..12u16 {
        let a = tcp_request(demo.client_pod(), sock6(CLUSTER_IP6, 80), None, TIMEOUT).map_err(context(format!("pod -> [{CLUSTER_IP6}]:80 TCP {i}")))?;
        assert_eq!(a.seen_source, IpAddr::from(pod.ip6), "the backend sees the pod's IPv6 address");
        backends.insert(a.backend);
        let a = udp_request(demo.client_pod(), sock6(CLUSTER_IP6, 7), 45000 + i, TIMEOUT).map_err(context(format!("pod -> [{CLUSTER_IP6}]:7 UDP {i}")))?;
        assert_eq!(a.seen_source, IpAddr::from(pod.ip6));
        backends.insert(a.backend);
    }
    assert_eq!(backends.len(), 3, "flows spread over the three IPv6 backends: {backends:?}");

    // Outside clients to the NodePort on the node's IPv6 address, the LoadBalancer IP and the
    // ExternalIP (XDP on eth0): local backends see the client's own address.
    let node6 = demo.cluster.nodes[0].ip6;
    for (what, addr, tcp_port, udp_port) in [("NodePort", node6, 30600, 30601), ("LoadBalancer", LB_IP6, 80, 7), ("ExternalIP", EXTERNAL_IP6, 80, 7)] {
        let mut backends = BTreeSet::new();
        for i in 0..12u16 {
            let a = tcp_request(&demo.cluster.client, sock6(addr, tcp_port), None, TIMEOUT).map_err(context(format!("{what} [{addr}]:{tcp_port} TCP {i}")))?;
            assert_eq!(a.seen_source, IpAddr::from(CLIENT_IP6), "{what}: the backend sees the client's address");
            backends.insert(a.backend);
            let a = udp_request(&demo.cluster.client, sock6(addr, udp_port), 46000 + i, TIMEOUT).map_err(context(format!("{what} UDP {i}")))?;
            assert_eq!(a.seen_source, IpAddr::from(CLIENT_IP6), "{what} UDP");
            backends.insert(a.backend);
        }
        assert!(backends.len() >= 2, "{what}: traffic spread over backends: {backends:?}");
        assert!(!backends.contains("web-3"), "{what}: web-3 is in no EndpointSlice");
    }
    let stats = lbctl_json(&pins, &["stats"])?;
    let count = |name: &str| stats.iter().find(|s| s["reason"] == name).and_then(|s| s["packets"].as_u64()).unwrap_or(0);
    assert!(count("fwd_local_backend") >= 72 && count("fwd_reverse_nat") >= 72, "{stats:?}");
    Ok(())
}

#[test]
fn one_pod_reaches_a_dual_stack_service_on_both_cluster_ips_and_lbctl_shows_both() -> Result<()> {
    let mut demo = Demo::build("v2")?;
    let manifests = ManifestCopy::empty("v2")?;
    manifests.write("dual.yaml", &dual_stack_manifest(&web_pods(&demo, false), &web_pods(&demo, true)))?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let pod = &demo.cluster.nodes[0].pods[3];
    let a = tcp_request(demo.client_pod(), sock([10, 96, 0, 60], 80), None, TIMEOUT)?;
    assert_eq!(a.seen_source, IpAddr::from(pod.ip), "over IPv4 the backend sees the pod's IPv4 address");
    let a = tcp_request(demo.client_pod(), sock6(CLUSTER_IP6, 80), None, TIMEOUT)?;
    assert_eq!(a.seen_source, IpAddr::from(pod.ip6), "over IPv6 the backend sees the pod's IPv6 address");

    let services = lbctl_json(&pins, &["service", "list"])?;
    let frontends: BTreeSet<String> = services.iter().filter(|s| s["name"] == "demo/dual:http/TCP").map(|s| s["frontend"].as_str().unwrap().to_string()).collect();
    let expected: BTreeSet<String> = ["10.96.0.60:80/TCP", "[fd00:96::60]:80/TCP", "*:30600/TCP", "[*]:30600/TCP", "[fd00:99:100::60]:80/TCP", "[fd00:99:200::60]:80/TCP"].map(String::from).into();
    assert_eq!(frontends, expected);
    let backends = |frontend: &str| -> BTreeSet<String> {
        let s = services.iter().find(|s| s["frontend"] == frontend).unwrap();
        s["backends"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_string()).collect()
    };
    let web = web_pods(&demo, true);
    assert_eq!(backends("[fd00:96::60]:80/TCP"), web.iter().map(|(ip, _)| SocketAddr::new(*ip, BACKEND_TCP_PORT).to_string()).collect(), "IPv6 frontends balance to the IPv6 slice");
    assert_eq!(backends("10.96.0.60:80/TCP").len(), 3);
    assert!(backends("10.96.0.60:80/TCP").iter().all(|b| b.starts_with("10.244.1.")), "IPv4 frontends to the IPv4 slice");
    Ok(())
}

#[test]
fn ipv6_node_port_with_a_backend_on_another_node_is_snated_both_ways() -> Result<()> {
    let mut cluster = Cluster::new("v3", &[0, 1])?;
    let backend = &cluster.nodes[1].pods[0];
    let _server = EchoServer::start(&backend.ns, "remote-0", BACKEND_TCP_PORT, BACKEND_UDP_PORT)?;
    let (backend_ip, backend_ip6) = (backend.ip, backend.ip6);
    let manifests = ManifestCopy::empty("v3")?;
    manifests.write("dual.yaml", &dual_stack_manifest(&[(backend_ip.into(), "node-b")], &[(backend_ip6.into(), "node-b")]))?;
    let pin_dir = cluster.pin_dir()?;
    let agent = cluster.start_agent(agent_bin(), 0, &["--manifests".to_string(), manifests.dir.display().to_string()], &pin_dir, &[])?;
    let node_a = cluster.nodes[0].ip6;
    for i in 0..5u16 {
        let context = |e: anyhow::Error| e.context(format!("request {i}\n{}\n{}", agent.log_text(), lbctl(&pin_dir, &["stats"]).unwrap_or_default()));
        let a = tcp_request(&cluster.client, sock6(node_a, 30600), None, TIMEOUT).map_err(context)?;
        assert_eq!(a, Answer { backend: "remote-0".into(), seen_source: node_a.into() }, "the remote backend sees node A's IPv6 address (SNAT)");
        let a = udp_request(&cluster.client, sock6(LB_IP6, 7), 47000 + i, TIMEOUT).map_err(context)?;
        assert_eq!(a, Answer { backend: "remote-0".into(), seen_source: node_a.into() });
    }
    let nat = lbctl_json(&pin_dir, &["nat", "list"])?;
    let backend6 = SocketAddr::new(backend_ip6.into(), BACKEND_TCP_PORT).to_string();
    assert!(nat.iter().any(|n| n["backend"] == backend6.as_str() && n["node_binding"].as_str().unwrap().starts_with(&format!("[{node_a}]:"))), "{nat:#?}");
    let stats = lbctl_json(&pin_dir, &["stats"])?;
    let count = |name: &str| stats.iter().find(|s| s["reason"] == name).unwrap()["packets"].as_u64().unwrap();
    assert!(count("fwd_remote_backend") >= 10 && count("fwd_reverse_nat") >= 10, "{stats:?}");
    drop(cluster.bpffs.drain(..));
    Ok(())
}

#[test]
fn an_ipv6_frontend_without_endpoints_refuses_at_once() -> Result<()> {
    let mut demo = Demo::build("v4")?;
    let manifests = ManifestCopy::empty("v4")?;
    manifests.write("dual.yaml", &dual_stack_manifest(&web_pods(&demo, false), &[]))?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    for (who, ns, to) in [("pod -> ClusterIP (TC)", demo.client_pod(), CLUSTER_IP6), ("outside -> LoadBalancer (XDP)", &demo.cluster.client, LB_IP6)] {
        let started = Instant::now();
        let err = tcp_request(ns, sock6(to, 80), None, Duration::from_secs(5)).expect_err("no IPv6 endpoint");
        assert_eq!(io_kind(&err), Some(ErrorKind::ConnectionRefused), "{who} TCP: a RST: {err:#}");
        assert!(started.elapsed() < Duration::from_millis(500), "{who}: refused at once ({:?})", started.elapsed());
        // UDP: an ICMPv6 port unreachable, which a connected socket reports as refused.
        let started = Instant::now();
        let err = udp_request(ns, sock6(to, 7), 0, Duration::from_secs(5)).expect_err("no IPv6 endpoint");
        assert_eq!(io_kind(&err), Some(ErrorKind::ConnectionRefused), "{who} UDP: {err:#}");
        assert!(started.elapsed() < Duration::from_millis(500), "{who} UDP: refused at once ({:?})", started.elapsed());
    }
    assert_eq!(reason_count(&pins, "reject_no_backend")?, 4);
    // The IPv4 side of the same Service has endpoints and serves.
    tcp_request(demo.client_pod(), sock([10, 96, 0, 60], 80), None, TIMEOUT)?;
    Ok(())
}

#[test]
fn node_processes_reach_ipv6_frontends_through_the_socket_hooks() -> Result<()> {
    let mut demo = Demo::build("v5")?;
    let manifests = ManifestCopy::empty("v5")?;
    manifests.write("dual.yaml", &dual_stack_manifest(&web_pods(&demo, false), &web_pods(&demo, true)))?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let node = &demo.cluster.nodes[0].ns;
    let node6 = demo.cluster.nodes[0].ip6;
    for (what, to) in [("ClusterIP", sock6(CLUSTER_IP6, 80)), ("NodePort on its own node", sock6(node6, 30600)), ("LoadBalancer IP", sock6(LB_IP6, 80))] {
        let backends: BTreeSet<String> = (0..40).map(|i| Ok(tcp_request(node, to, None, TIMEOUT).map_err(|e| e.context(format!("{what} request {i}")))?.backend)).collect::<Result<_>>()?;
        assert_eq!(backends.len(), 3, "{what}: 40 connections reach every backend: {backends:?}");
        let peer = node.run(move || -> Result<SocketAddr> { Ok(std::net::TcpStream::connect_timeout(&to, TIMEOUT)?.peer_addr()?) })??;
        assert_eq!(peer, to, "{what}: getpeername shows the frontend");
    }
    // Unconnected UDP: sendmsg6 picks the backend, recvmsg6 shows the reply from the frontend.
    let to = sock6(CLUSTER_IP6, 7);
    let (from, reply) = unconnected_udp_exchange(node, to)?;
    assert_eq!(from, to, "the reply's source is the frontend, not the backend");
    assert!(reply.starts_with("web-"), "{reply}");
    // An IPv6 socket reaching the IPv4 ClusterIP through its IPv4-mapped address (as Java's
    // sockets do) is translated too, and sees the frontend as it asked for it.
    let mapped = SocketAddr::new(IpAddr::V6("::ffff:10.96.0.60".parse().unwrap()), 80);
    let backends: BTreeSet<String> = (0..20).map(|i| Ok(tcp_request(node, mapped, None, TIMEOUT).map_err(|e| e.context(format!("mapped request {i}")))?.backend)).collect::<Result<_>>()?;
    assert_eq!(backends.len(), 3, "{backends:?}");
    let peer = node.run(move || -> Result<SocketAddr> { Ok(std::net::TcpStream::connect_timeout(&mapped, TIMEOUT)?.peer_addr()?) })??;
    assert_eq!(peer, mapped, "getpeername shows the IPv4-mapped frontend");
    // A node process cannot bind the IPv6 LoadBalancer frontend's port.
    let bind = node.run(move || std::net::TcpListener::bind(sock6(LB_IP6, 80)).map(|_| ()))?;
    assert!(bind.is_err(), "binding [{LB_IP6}]:80 is refused");
    assert!(reason_count(&pins, "fwd_socket")? >= 3 * 40 + 1 + 20);
    Ok(())
}

#[test]
fn a_node_ipv6_udp_socket_on_a_removed_backend_is_ended() -> Result<()> {
    let mut demo = Demo::build("v6")?;
    let manifests = ManifestCopy::empty("v6")?;
    let web6 = web_pods(&demo, true);
    manifests.write("dual.yaml", &dual_stack_manifest(&web_pods(&demo, false), &web6))?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let remove = |index: u8| -> Result<()> {
        let left: Vec<(IpAddr, &str)> = web6.iter().enumerate().filter(|(i, _)| *i != index as usize).map(|(_, e)| *e).collect();
        manifests.write("dual.yaml", &dual_stack_manifest(&web_pods(&demo, false), &left))
    };
    a_connected_udp_socket_is_ended_when_its_backend_leaves(&demo, sock6(CLUSTER_IP6, 7), remove)
}
