//! Bare-metal LoadBalancer: addresses from LoadBalancerIPPools, ARP answered by one node,
//! failover when that node's link or agent goes away.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use testbed::{
    apiserver::{kubeconfig_for, FakeApiServer},
    demo::Demo,
    netns::Netns,
    process::AgentProcess,
    servers::{tcp_request, EchoServer},
    topology::{pod_ips, Cluster, CLIENT_IP},
};

use crate::support::*;

/// The pool the tests give out, on the LAN itself: clients resolve its addresses by ARP.
const LAN_POOL: (&str, &str) = ("10.99.0.200", "10.99.0.209");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 200);
/// Where the API server stand-in listens: on the LAN, so a node whose link is down loses it.
const API_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 250);

fn pool(name: &str, first: &str, last: &str, selector: Value) -> Value {
    json!({"apiVersion": "lb-agent.io/v1alpha1", "kind": "LoadBalancerIPPool", "metadata": {"name": name}, "spec": {"blocks": [{"start": first, "stop": last}], "serviceSelector": selector}})
}

/// A LoadBalancer Service `name` with ports `ports` and no address, with extra metadata and
/// spec fields, and its EndpointSlice of `endpoints` (address, node) on port 8080.
fn lb_service(name: &str, cluster_ip: &str, ports: &[u16], metadata: Value, spec: Value, endpoints: &[(IpAddr, &str)]) -> (Value, Value) {
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "demo", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"type": "LoadBalancer", "clusterIP": cluster_ip, "ports": ports.iter().map(|p| json!({"name": format!("p{p}"), "protocol": "TCP", "port": p})).collect::<Vec<_>>()},
    });
    merge(&mut svc["metadata"], metadata);
    merge(&mut svc["spec"], spec);
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "demo", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": ports.iter().map(|p| json!({"name": format!("p{p}"), "protocol": "TCP", "port": 8080})).collect::<Vec<_>>(),
        "endpoints": endpoints.iter().map(|(ip, node)| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": node})).collect::<Vec<_>>(),
    });
    (svc, slice)
}

fn merge(target: &mut Value, extra: Value) {
    if let (Value::Object(t), Value::Object(e)) = (target, extra) {
        t.extend(e);
    }
}

fn yaml_docs(objects: &[Value]) -> String {
    objects.iter().map(|o| serde_yaml_ng::to_string(o).unwrap()).collect::<Vec<_>>().join("---\n")
}

/// `lbctl status -o json`, asked of the agent in `node` (its maps pinned in `pins`).
fn agent_status(node: &Netns, pins: &std::path::Path) -> Result<Value> {
    let out = node.exec(&format!("{} --pin-dir {} status -o json", env!("CARGO_BIN_EXE_lbctl"), pins.display()))?;
    Ok(serde_json::from_str::<Value>(&out)?["agent"].clone())
}

/// The MAC the client has for `ip` (empty when it has none).
fn client_neighbour(client: &Netns, ip: Ipv4Addr) -> Result<String> {
    let out = client.exec(&format!("ip -j neigh show {ip} dev eth0"))?;
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
    Ok(rows.first().and_then(|r| r["lladdr"].as_str()).unwrap_or_default().to_string())
}

#[test]
fn standalone_pools_assign_share_refuse_and_move() -> Result<()> {
    let mut demo = Demo::build("l2p")?;
    let manifests = ManifestCopy::empty("l2p")?;
    let pods: Vec<(IpAddr, &str)> = (0..3).map(|p| (IpAddr::V4(pod_ips(1, p).0), "node-a")).collect();
    let services = [
        lb_service("auto", "10.96.1.1", &[80], json!({}), json!({}), &pods),
        lb_service("asked", "10.96.1.2", &[80], json!({}), json!({"loadBalancerIP": "10.99.0.201"}), &pods),
        lb_service("taken", "10.96.1.3", &[80], json!({"creationTimestamp": "2026-01-02T00:00:00Z"}), json!({"loadBalancerIP": "10.99.0.201"}), &pods),
        lb_service("outside", "10.96.1.4", &[80], json!({"annotations": {"lb-agent.io/load-balancer-ips": "192.0.2.9"}}), json!({}), &pods),
        lb_service("http", "10.96.1.5", &[80], json!({"annotations": {"lb-agent.io/sharing-key": "k"}}), json!({}), &pods),
        lb_service("alt", "10.96.1.6", &[8081], json!({"annotations": {"lb-agent.io/sharing-key": "k"}, "creationTimestamp": "2026-01-02T00:00:00Z"}), json!({}), &pods),
        lb_service("late", "10.96.1.7", &[80], json!({"creationTimestamp": "2026-01-03T00:00:00Z"}), json!({}), &pods),
    ];
    let mut objects = vec![pool("tiny", "10.99.0.200", "10.99.0.202", json!(null))];
    for (svc, slice) in &services {
        objects.push(svc.clone());
        objects.push(slice.clone());
    }
    manifests.write("pools.yaml", &yaml_docs(&objects))?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let node = &demo.cluster.nodes[0].ns;
    let expected = [("demo/auto", "10.99.0.200"), ("demo/asked", "10.99.0.201"), ("demo/http", "10.99.0.202"), ("demo/alt", "10.99.0.202")];
    let status = eventually(Duration::from_secs(5), || {
        let status = agent_status(node, &pins)?;
        let given: BTreeMap<String, String> = status["addresses"].as_array().context("addresses")?.iter().map(|a| (a["service"].as_str().unwrap().to_string(), a["address"].as_str().unwrap().to_string())).collect();
        let want: BTreeMap<String, String> = expected.iter().map(|(s, a)| (s.to_string(), a.to_string())).collect();
        if given == want { Ok(status) } else { Err(anyhow!("addresses {given:?}")) }
    })?;
    let rejected = &status["rejected"];
    let why = |svc: &str| rejected[format!("demo/{svc}")].as_str().unwrap_or_default().to_string();
    assert!(why("taken").contains("10.99.0.201 is already used by Service demo/asked"), "{}", why("taken"));
    assert!(why("outside").contains("192.0.2.9 is outside every pool that serves this Service"), "{}", why("outside"));
    assert!(why("late").contains("no free IPv4 address in pool tiny"), "{}", why("late"));
    assert_eq!(status["pools"], json!([{"name": "tiny", "size": 3, "used": 3}]));
    // Every given address answers, after the client resolved it by ARP; the shared one on both ports.
    for (ip, port) in [([10, 99, 0, 200], 80), ([10, 99, 0, 201], 80), ([10, 99, 0, 202], 80), ([10, 99, 0, 202], 8081)] {
        let a = tcp_request(&demo.cluster.client, SocketAddr::from((ip, port)), None, TIMEOUT).with_context(|| format!("{ip:?}:{port}"))?;
        assert_eq!(a.seen_source, IpAddr::V4(CLIENT_IP));
        assert_eq!(client_neighbour(&demo.cluster.client, ip.into())?, node.mac("eth0")?, "answered by ARP from node-a");
    }
    // The pool is replaced while in use: Services move to the new one, and say so.
    objects[0] = pool("spare", "10.99.0.220", "10.99.0.225", json!(null));
    manifests.write("pools.yaml", &yaml_docs(&objects))?;
    let status = eventually(Duration::from_secs(5), || {
        let status = agent_status(node, &pins)?;
        let auto = status["addresses"].as_array().context("addresses")?.iter().find(|a| a["service"] == "demo/auto").map(|a| a["address"].clone());
        if auto == Some(json!("10.99.0.220")) { Ok(status) } else { Err(anyhow!("auto has {auto:?}")) }
    })?;
    let moved = status["rejected"]["demo/auto"].as_str().unwrap_or_default();
    assert!(moved.contains("10.99.0.200 is no longer in a pool that serves this Service"), "{moved}");
    assert!(status["rejected"]["demo/asked"].as_str().unwrap_or_default().contains("10.99.0.201 is outside every pool"), "{}", status["rejected"]);
    tcp_request(&demo.cluster.client, SocketAddr::from(([10, 99, 0, 220], 80)), None, TIMEOUT).context("the moved address")?;
    assert!(tcp_request(&demo.cluster.client, SocketAddr::from(([10, 99, 0, 200], 80)), None, Duration::from_millis(500)).is_err(), "the old address is gone");
    Ok(())
}
