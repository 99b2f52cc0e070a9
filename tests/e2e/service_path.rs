use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use testbed::{
    demo::{sock, Demo},
    servers::{tcp_request, udp_request, Answer, EchoServer},
    topology::{Cluster, CLIENT_IP},
};

use crate::support::*;

#[test]
fn pod_reaches_cluster_ip_over_tcp_and_udp_on_every_backend() -> Result<()> {
    let mut demo = Demo::build("e1")?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &example_manifests(), &[])?;
    let pod_ip = demo.cluster.nodes[0].pods[3].ip;
    let mut tcp_by_backend: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..30 {
        let a = tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT).map_err(|e| e.context(format!("TCP request {i}")))?;
        assert_eq!(a.seen_source, pod_ip, "the backend sees the pod's own address");
        *tcp_by_backend.entry(a.backend).or_default() += 1;
    }
    assert_eq!(tcp_by_backend.len(), 3, "30 TCP flows reach all 3 backends: {tcp_by_backend:?}");
    let mut udp_backends = BTreeSet::new();
    for port in 0..30u16 {
        let a = udp_request(demo.client_pod(), sock([10, 96, 0, 10], 7), 42000 + port, TIMEOUT).map_err(|e| e.context(format!("UDP request from port {}", 42000 + port)))?;
        assert_eq!(a.seen_source, pod_ip);
        udp_backends.insert(a.backend);
    }
    assert_eq!(udp_backends.len(), 3, "30 UDP flows reach all 3 backends");
    // The same 5-tuple lands on the same backend, every time.
    for port in [42001u16, 42017] {
        let first = udp_request(demo.client_pod(), sock([10, 96, 0, 10], 7), port, TIMEOUT).map_err(|e| e.context(format!("UDP repeat from {port}")))?.backend;
        for i in 0..5 {
            let again = udp_request(demo.client_pod(), sock([10, 96, 0, 10], 7), port, TIMEOUT).map_err(|e| e.context(format!("UDP repeat {i} from {port}")))?;
            assert_eq!(again.backend, first);
        }
    }
    Ok(())
}

#[test]
fn outside_client_reaches_node_port_load_balancer_and_external_ips() -> Result<()> {
    let mut demo = Demo::build("e2")?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &example_manifests(), &[])?;
    let client = &demo.cluster.client;
    let frontends = [("NodePort", [10, 99, 0, 1], 30080, 30007), ("LoadBalancer", [10, 99, 100, 10], 80, 7), ("ExternalIP", [10, 99, 200, 10], 80, 7)];
    for (what, addr, tcp_port, udp_port) in frontends {
        let mut backends = BTreeSet::new();
        for i in 0..12u16 {
            let a = tcp_request(client, sock(addr, tcp_port), None, TIMEOUT).map_err(|e| e.context(format!("{what} TCP")))?;
            assert_eq!(a.seen_source, CLIENT_IP, "{what}: local backends see the client's own address");
            backends.insert(a.backend);
            let a = udp_request(client, sock(addr, udp_port), 43000 + i, TIMEOUT).map_err(|e| e.context(format!("{what} UDP")))?;
            assert_eq!(a.seen_source, CLIENT_IP, "{what} UDP");
            backends.insert(a.backend);
        }
        assert!(backends.len() >= 2, "{what}: traffic spread over backends: {backends:?}");
        assert!(!backends.contains("web-3"), "{what}: web-3 is in no manifest");
    }
    Ok(())
}

#[test]
fn node_port_with_a_backend_on_another_node_is_snated_both_ways() -> Result<()> {
    let mut cluster = Cluster::new("e3", &[0, 1])?;
    let backend = &cluster.nodes[1].pods[0];
    let _server = EchoServer::start(&backend.ns, "remote-0", 8080, 7007)?;
    let manifests = ManifestCopy::new("e3")?;
    std::fs::remove_file(manifests.dir.join("endpoints.yaml"))?;
    std::fs::remove_file(manifests.dir.join("services.yaml"))?;
    manifests.write(
        "remote.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: remote, namespace: demo}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30090}\n  - {name: echo, port: 7, protocol: UDP, targetPort: 7007, nodePort: 30091}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: remote-1, namespace: demo, labels: {kubernetes.io/service-name: remote}}\naddressType: IPv4\n\
         ports: [{name: http, port: 8080}, {name: echo, port: 7007, protocol: UDP}]\nendpoints:\n- {addresses: [10.244.2.11], conditions: {ready: true}, nodeName: node-b}\n",
    )?;
    let pin_dir = cluster.pin_dir()?;
    let agent = cluster.start_agent(agent_bin(), 0, &["--manifests".to_string(), manifests.dir.display().to_string()], &pin_dir, &[])?;

    let node_a = cluster.nodes[0].ip;
    for i in 0..5 {
        let a = tcp_request(&cluster.client, sock([10, 99, 0, 1], 30090), None, TIMEOUT).map_err(|e| e.context(format!("TCP {i}\n{}\n{}\n{}", agent.log_text(), lbctl(&pin_dir, &["stats"]).unwrap_or_default(), lbctl(&pin_dir, &["ct", "list"]).unwrap_or_default())))?;
        assert_eq!(a, Answer { backend: "remote-0".into(), seen_source: node_a.into() }, "the remote backend sees node A's address (SNAT)");
        let a = udp_request(&cluster.client, sock([10, 99, 0, 1], 30091), 44000 + i, TIMEOUT)?;
        assert_eq!(a, Answer { backend: "remote-0".into(), seen_source: node_a.into() });
    }
    // The bindings are visible, and replies were translated back (the requests above got answers).
    let nat = lbctl_json(&pin_dir, &["nat", "list"])?;
    assert!(nat.iter().any(|n| n["backend"] == "10.244.2.11:8080" && n["frontend"] == "0.0.0.0:30090" || n["frontend"] == "10.99.0.1:30090"), "{nat:#?}");
    // Each binding names its Service, so the filters apply to it.
    let filtered = lbctl_json(&pin_dir, &["nat", "list", "--service", "demo/remote"])?;
    assert!(!filtered.is_empty() && filtered.iter().all(|n| n["service"].as_str().unwrap().starts_with("demo/remote:")), "{filtered:#?}");
    assert!(lbctl_json(&pin_dir, &["nat", "list", "-n", "other"])?.is_empty());
    let stats = lbctl_json(&pin_dir, &["stats"])?;
    let count = |name: &str| stats.iter().find(|s| s["reason"] == name).unwrap()["packets"].as_u64().unwrap();
    assert!(count("fwd_remote_backend") >= 10 && count("fwd_reverse_nat") >= 10, "{stats:?}");
    drop(cluster.bpffs.drain(..));
    Ok(())
}
