//! The node itself as a client: processes in the node's network namespace (not in a pod)
//! reach Services through the cgroup socket hooks, with no iptables or nftables rules.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::Result;
use testbed::{
    demo::{sock, Demo},
    servers::{tcp_request, udp_request},
};

use crate::support::*;

#[test]
fn node_processes_reach_cluster_ips_node_ports_and_load_balancers() -> Result<()> {
    let mut demo = Demo::build("h1")?;
    let manifests = ManifestCopy::new("h1")?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let node = &demo.cluster.nodes[0].ns;
    assert_eq!(node.exec("iptables-save -t nat 2>/dev/null | grep -c -- '^-A' || true")?.trim(), "0", "no NAT rules: only the socket hooks translate");
    for (what, to) in [("ClusterIP", sock([10, 96, 0, 10], 80)), ("NodePort on its own node", sock([10, 99, 0, 1], 30080)), ("LoadBalancer IP", sock([10, 99, 100, 10], 80))] {
        let backends: BTreeSet<String> = (0..60).map(|i| Ok(tcp_request(node, to, None, TIMEOUT).map_err(|e| e.context(format!("{what} request {i}")))?.backend)).collect::<Result<_>>()?;
        assert_eq!(backends.len(), 3, "{what}: 60 connections reach every backend: {backends:?}");
        let peer = node.run(move || -> Result<SocketAddr> { Ok(TcpStream::connect_timeout(&to, TIMEOUT)?.peer_addr()?) })??;
        assert_eq!(peer, to, "{what}: getpeername shows the frontend");
    }
    // Connected UDP.
    let udp_to = sock([10, 96, 0, 10], 7);
    let backends: BTreeSet<String> = (0..60).map(|_| Ok(udp_request(node, udp_to, 0, TIMEOUT)?.backend)).collect::<Result<_>>()?;
    assert_eq!(backends.len(), 3, "{backends:?}");
    let peer = node.run(move || -> Result<SocketAddr> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(udp_to)?;
        Ok(s.peer_addr()?)
    })??;
    assert_eq!(peer, udp_to);
    assert!(reason_count(&pins, "fwd_socket")? >= 4 * 60);
    Ok(())
}

#[test]
fn unconnected_udp_replies_come_from_the_frontend() -> Result<()> {
    let mut demo = Demo::build("h2")?;
    let manifests = ManifestCopy::new("h2")?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let to = sock([10, 96, 0, 10], 7);
    let (from, reply) = unconnected_udp_exchange(&demo.cluster.nodes[0].ns, to)?;
    assert_eq!(from, to, "the reply's source is the frontend, not the backend");
    assert!(reply.starts_with("web-"), "{reply}");
    Ok(())
}

#[test]
fn a_connected_udp_socket_on_a_removed_backend_is_ended() -> Result<()> {
    let mut demo = Demo::build("h3")?;
    let manifests = ManifestCopy::new("h3")?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    // The backend leaves the Service (the pod itself keeps running and would still answer).
    let remove = |index: u8| -> Result<()> {
        let endpoints = manifests.read("endpoints.yaml");
        manifests.write("endpoints.yaml", &endpoints.replacen(&format!("  - {{addresses: [10.244.1.{}], conditions: {{ready: true}}, nodeName: node-a}}\n", 11 + index), "", 1))
    };
    a_connected_udp_socket_is_ended_when_its_backend_leaves(&demo, sock([10, 96, 0, 10], 7), remove)
}

#[test]
fn node_processes_cannot_bind_a_frontend() -> Result<()> {
    let mut demo = Demo::build("h4")?;
    let manifests = ManifestCopy::new("h4")?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let results = demo.cluster.nodes[0].ns.run(|| {
        [
            TcpListener::bind("0.0.0.0:30080").map(|_| ()),
            TcpListener::bind("10.99.0.1:30080").map(|_| ()),
            UdpSocket::bind("0.0.0.0:30007").map(|_| ()),
            TcpListener::bind("0.0.0.0:30099").map(|_| ()),
        ]
        .map(|r| r.map_err(|e| e.kind()))
    })?;
    assert_eq!(results[..3], [Err(ErrorKind::AddrInUse), Err(ErrorKind::AddrInUse), Err(ErrorKind::AddrInUse)], "NodePorts are taken");
    assert_eq!(results[3], Ok(()), "other ports are free");
    assert!(reason_count(&pins, "reject_socket_bind")? >= 3);
    Ok(())
}

#[test]
fn pod_traffic_is_translated_once() -> Result<()> {
    let mut demo = Demo::build("h5")?;
    let manifests = ManifestCopy::new("h5")?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let (sockets, packets) = (reason_count(&pins, "fwd_socket")?, reason_count(&pins, "fwd_local_backend")?);
    let pod_ip = demo.cluster.nodes[0].pods[3].ip;
    for _ in 0..10 {
        assert_eq!(tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT)?.seen_source, pod_ip);
    }
    assert_eq!(reason_count(&pins, "fwd_socket")?, sockets, "the socket hooks leave pods' sockets to TC");
    assert!(reason_count(&pins, "fwd_local_backend")? >= packets + 10, "TC translated each connection");
    Ok(())
}

/// Cgroup directories made for a test, removed (deepest first) on drop.
struct CgroupDirs(Vec<std::path::PathBuf>);

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_host_network_pod_that_opts_out_sees_real_destinations() -> Result<()> {
    let mut demo = Demo::build("h6")?;
    let manifests = ManifestCopy::new("h6")?;
    let uid = "0b7e6c1a-6f4d-4c53-9d8e-3c2a1f0e9d86";
    manifests.write(
        "pod.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: node-agent, namespace: kube-system, uid: {uid}, annotations: {{lb-agent.io/socket-lb: disabled}}}}\n\
             spec: {{nodeName: node-a, hostNetwork: true, containers: [{{name: agent, image: example.org/agent}}]}}\n"
        ),
    )?;
    // The pod's cgroup as kubelet's systemd driver names it, with a container inside.
    let slice = demo.cluster.cgroup.dir.join(format!("lbtest-{}.slice", demo.cluster.prefix));
    let pod = slice.join(format!("kubepods-pod{}.slice", uid.replace('-', "_")));
    let container = pod.join("cri-containerd-0123abcd.scope");
    let _dirs = CgroupDirs(vec![slice.clone(), pod.clone(), container.clone()]);
    for dir in [&slice, &pod, &container] {
        std::fs::create_dir(dir)?;
    }
    let (mut agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    agent.wait_for_log("socket hooks skip 2 cgroups of 1 opted-out pods", Duration::from_secs(5))?;

    let client = "import socket\ns = socket.socket()\ns.settimeout(1)\ntry:\n    s.connect((\"10.96.0.10\", 80))\n    s.sendall(b\"hello\\n\")\n    print(\"answered\", s.recv(100).decode().split()[0])\nexcept OSError as e:\n    print(\"failed\", e.errno)\n";
    std::fs::write(manifests.dir.join("client.py"), client)?;
    let node = &demo.cluster.nodes[0].ns;
    let script = manifests.dir.join("client.py").display().to_string();
    let outside = node.exec(&format!("python3 {script}"))?;
    assert!(outside.starts_with("answered web-"), "any other node process is balanced: {outside}");
    let inside = node.exec(&format!("echo $$ > {}/cgroup.procs && exec python3 {script}", container.display()))?;
    assert_eq!(inside.trim(), format!("failed {}", libc::ENETUNREACH), "the opted-out pod's process connects to the ClusterIP itself, which no route leads to");
    Ok(())
}
