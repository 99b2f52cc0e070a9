//! `--xdp-mode auto` on a node whose external device is a veth with no XDP on its peer (kind,
//! containers): native XDP_TX frames would wait in the peer's queue; auto picks generic XDP and
//! NodePort traffic to a remote backend flows without stalls.
use std::time::{Duration, Instant};

use anyhow::Result;
use testbed::{
    demo::sock,
    servers::{tcp_request, Answer, EchoServer},
    topology::Cluster,
};

use crate::support::*;

const REMOTE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: remote, namespace: demo}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.20\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30090}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: remote-1, namespace: demo, labels: {kubernetes.io/service-name: remote}}\naddressType: IPv4\n\
ports: [{name: http, port: 8080}]\nendpoints:\n- {addresses: [10.244.2.11], conditions: {ready: true}, nodeName: node-b}\n";

#[test]
fn auto_xdp_mode_serves_a_veth_whose_peer_runs_no_xdp_without_stalls() -> Result<()> {
    let mut cluster = Cluster::new("xa", &[0, 1])?;
    cluster.without_peer_xdp();
    let _server = EchoServer::start(&cluster.nodes[1].pods[0].ns, "remote-0", 8080, 7007)?;
    let manifests = ManifestCopy::empty("xa")?;
    manifests.write("remote.yaml", REMOTE)?;
    let source = ["--manifests".to_string(), manifests.dir.display().to_string()];
    let pins = cluster.pin_dir()?;
    let node_a = cluster.nodes[0].ip;
    let request = |cluster: &Cluster| -> Result<Duration> {
        let started = Instant::now();
        let a = tcp_request(&cluster.client, sock([10, 99, 0, 1], 30090), None, Duration::from_secs(5))?;
        assert_eq!(a, Answer { backend: "remote-0".into(), seen_source: node_a.into() }, "SNAT to the remote backend");
        Ok(started.elapsed())
    };

    // The trap, first: native XDP on this veth. The SNATed SYN leaves with XDP_TX and waits.
    let native = cluster.start_agent(agent_bin(), 0, &source, &pins, &["--xdp-mode", "native"])?;
    let slow = request(&cluster).map_or(Duration::from_secs(5), |took| took);
    assert!(slow >= Duration::from_millis(500), "native XDP on a veth without a peer program answered in {slow:?}: the trap this test guards against is gone");
    drop(native);

    // auto: generic XDP on the veth, chosen and logged; the native link is replaced.
    let mut auto = cluster.start_agent(agent_bin(), 0, &source, &pins, &["--xdp-mode", "auto"])?;
    auto.wait_for_log("XDP attached on eth0", Duration::from_secs(2))?;
    let log = auto.log_text();
    assert!(log.contains("generic mode, a virtual device"), "{log}");
    assert!(cluster.nodes[0].ns.exec("ip -d link show dev eth0")?.contains("xdpgeneric"), "generic XDP on eth0");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        slowest = slowest.max(request(&cluster)?);
    }
    assert!(slowest < Duration::from_millis(300), "slowest of 20 NodePort requests to a remote backend: {slowest:?}");
    drop(auto);
    drop(cluster.bpffs.drain(..));
    Ok(())
}
