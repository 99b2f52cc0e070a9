//! Service semantics a cluster relies on, on real traffic: session affinity, traffic policies,
//! terminating endpoints, hairpin, source ranges, ICMP errors (path MTU discovery), frontend
//! conflicts, and kube-proxy's health endpoints.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use testbed::{
    demo::{sock, Demo, BACKEND_TCP_PORT, BACKEND_UDP_PORT},
    servers::{http_get, tcp_request, tcp_request_from, EchoServer, LongConnection},
    topology::{Cluster, CLIENT_IP},
};

use crate::support::*;

const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// A Service in namespace demo and its EndpointSlice (`endpoints`: YAML list items), as one
/// manifest file.
fn service_yaml(name: &str, spec: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n{spec}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {BACKEND_TCP_PORT}}}, {{name: echo, port: {BACKEND_UDP_PORT}, protocol: UDP}}]\nendpoints:\n{endpoints}"
    )
}

/// Endpoint items for the demo's pods on node-a (index 0-4, 3 being the client pod), each with
/// extra fields (`, conditions: {...}`).
fn demo_pods(pods: &[(u8, &str)]) -> String {
    pods.iter().map(|(i, extra)| format!("  - {{addresses: [10.244.1.{}], nodeName: node-a{extra}}}\n", 11 + i)).collect()
}

const ALL_PODS: [(u8, &str); 3] = [(0, ""), (1, ""), (2, "")];

fn backends(ns: &testbed::netns::Netns, to: SocketAddr, n: usize) -> Result<Vec<String>> {
    (0..n).map(|i| Ok(tcp_request(ns, to, None, TIMEOUT).map_err(|e| e.context(format!("request {i} to {to}")))?.backend)).collect()
}

#[test]
fn session_affinity_holds_a_client_until_it_times_out_or_is_turned_off() -> Result<()> {
    let mut demo = Demo::build("s1")?;
    let manifests = ManifestCopy::new("s1")?;
    let short = "  clusterIP: 10.96.0.30\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n  ports: [{name: http, port: 80, targetPort: http}]";
    manifests.write("aff.yaml", &service_yaml("aff", short, &demo_pods(&ALL_PODS)))?;
    // The default timeout (3 hours), to show affinity survives an agent restart.
    manifests.write("sticky.yaml", &service_yaml("sticky", "  clusterIP: 10.96.0.31\n  sessionAffinity: ClientIP\n  ports: [{name: http, port: 80, targetPort: http}]", &demo_pods(&ALL_PODS)))?;
    let (mut agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let (aff, sticky) = (sock([10, 96, 0, 30], 80), sock([10, 96, 0, 31], 80));

    let seen: BTreeSet<String> = backends(demo.client_pod(), aff, 30)?.into_iter().collect();
    assert_eq!(seen.len(), 1, "30 connections from one client land on one backend: {seen:?}");

    let before: BTreeSet<String> = backends(demo.client_pod(), sticky, 10)?.into_iter().collect();
    assert_eq!(before.len(), 1);
    agent.kill9()?;
    let _agent = demo.start_agent_on(agent_bin(), &manifests.dir, &pins, &[])?;
    let after: BTreeSet<String> = backends(demo.client_pod(), sticky, 10)?.into_iter().collect();
    assert_eq!(after, before, "affinity survives an agent restart");

    // Connections further apart than the timeout are balanced again.
    let mut spaced = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        spaced.insert(tcp_request(demo.client_pod(), aff, None, TIMEOUT)?.backend);
    }
    assert!(spaced.len() >= 2, "after the timeout, new connections spread: {spaced:?}");

    // Affinity turned off: connections spread at once.
    manifests.write("aff.yaml", &service_yaml("aff", &short.replace("sessionAffinity: ClientIP", "sessionAffinity: None"), &demo_pods(&ALL_PODS)))?;
    eventually(Duration::from_secs(5), || {
        let seen: BTreeSet<String> = backends(demo.client_pod(), aff, 12)?.into_iter().collect();
        if seen.len() >= 2 { Ok(()) } else { Err(anyhow!("still one backend: {seen:?}")) }
    })?;
    Ok(())
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_answers_only_where_endpoints_are() -> Result<()> {
    let mut cluster = Cluster::new("s2", &[2, 1])?;
    let _servers = [
        EchoServer::start(&cluster.nodes[0].pods[0].ns, "a-0", BACKEND_TCP_PORT, BACKEND_UDP_PORT)?,
        EchoServer::start(&cluster.nodes[0].pods[1].ns, "a-1", BACKEND_TCP_PORT, BACKEND_UDP_PORT)?,
        EchoServer::start(&cluster.nodes[1].pods[0].ns, "b-0", BACKEND_TCP_PORT, BACKEND_UDP_PORT)?,
    ];
    let manifests = ManifestCopy::empty("s2")?;
    let spec = "  type: LoadBalancer\n  clusterIP: 10.96.0.40\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n  ports: [{name: http, port: 80, targetPort: http, nodePort: 30100}]";
    let write = |endpoints: &str| manifests.write("local.yaml", &service_yaml("local", spec, endpoints));
    write("  - {addresses: [10.244.1.11], nodeName: node-a}\n  - {addresses: [10.244.1.12], nodeName: node-a}\n")?;
    let source = ["--manifests".to_string(), manifests.dir.display().to_string()];
    let pins = [cluster.pin_dir()?, cluster.pin_dir()?];
    let _agents = [cluster.start_agent(agent_bin(), 0, &source, &pins[0], &[])?, cluster.start_agent(agent_bin(), 1, &source, &pins[1], &[])?];
    let client = &cluster.client;

    for i in 0..10 {
        let a = tcp_request(client, sock([10, 99, 0, 1], 30100), None, TIMEOUT).map_err(|e| e.context(format!("request {i} to node A")))?;
        assert!(a.backend.starts_with("a-"), "{a:?}");
        assert_eq!(a.seen_source, CLIENT_IP, "no SNAT: the backend sees the outside client's own address");
    }
    let err = tcp_request(client, sock([10, 99, 0, 2], 30100), None, Duration::from_millis(700)).expect_err("node B has no endpoint of the Service");
    assert_eq!(io_kind(&err), Some(ErrorKind::TimedOut), "dropped, not answered: {err:#}");
    assert!(reason_count(&pins[1], "drop_no_local_backend")? >= 1);

    let health = |node: [u8; 4]| -> Result<(u16, Value)> {
        let (status, body) = http_get(client, sock(node, 32100), "/", TIMEOUT)?;
        Ok((status, serde_json::from_str(&body)?))
    };
    let (status, body) = health([10, 99, 0, 1])?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, serde_json::json!({"service": {"namespace": "demo", "name": "local"}, "localEndpoints": 2, "serviceProxyHealthy": true}));
    let (status, body) = health([10, 99, 0, 2])?;
    assert_eq!((status, &body["localEndpoints"]), (503, &serde_json::json!(0)), "{body}");

    // The last endpoint on node A goes (one appears on node B): the checks flip.
    write("  - {addresses: [10.244.2.11], nodeName: node-b}\n")?;
    eventually(Duration::from_secs(5), || match (health([10, 99, 0, 1])?.0, health([10, 99, 0, 2])?.0) {
        (503, 200) => Ok(()),
        other => Err(anyhow!("health A/B {other:?}")),
    })?;
    let a = tcp_request(client, sock([10, 99, 0, 2], 30100), None, TIMEOUT)?;
    assert_eq!((a.backend.as_str(), a.seen_source), ("b-0", CLIENT_IP.into()));
    drop(cluster.bpffs.drain(..));
    Ok(())
}

#[test]
fn internal_traffic_policy_local_keeps_pod_traffic_on_the_node() -> Result<()> {
    let mut cluster = Cluster::new("s3", &[3, 2])?;
    let names = [(0, 0, "a-0"), (0, 1, "a-1"), (1, 0, "b-0"), (1, 1, "b-1")];
    let _servers: Vec<EchoServer> = names.iter().map(|(n, p, name)| EchoServer::start(&cluster.nodes[*n].pods[*p].ns, name, BACKEND_TCP_PORT, BACKEND_UDP_PORT)).collect::<Result<_>>()?;
    let manifests = ManifestCopy::empty("s3")?;
    let endpoints = "  - {addresses: [10.244.1.11], nodeName: node-a}\n  - {addresses: [10.244.1.12], nodeName: node-a}\n  - {addresses: [10.244.2.11], nodeName: node-b}\n  - {addresses: [10.244.2.12], nodeName: node-b}\n";
    for (name, ip, policy) in [("local", "10.96.0.41", "Local"), ("cluster", "10.96.0.42", "Cluster")] {
        manifests.write(&format!("{name}.yaml"), &service_yaml(name, &format!("  clusterIP: {ip}\n  internalTrafficPolicy: {policy}\n  ports: [{{name: http, port: 80}}]"), endpoints))?;
    }
    let pins = cluster.pin_dir()?;
    let _agent = cluster.start_agent(agent_bin(), 0, &["--manifests".to_string(), manifests.dir.display().to_string()], &pins, &[])?;
    let pod = &cluster.nodes[0].pods[2].ns;
    let local: BTreeSet<String> = backends(pod, sock([10, 96, 0, 41], 80), 30)?.into_iter().collect();
    assert_eq!(local, BTreeSet::from(["a-0".to_string(), "a-1".to_string()]), "30 connections, all on this node's endpoints");
    // The same endpoints under Cluster policy: other nodes' endpoints are reachable too.
    let all: BTreeSet<String> = backends(pod, sock([10, 96, 0, 42], 80), 30)?.into_iter().collect();
    assert!(all.iter().any(|b| b.starts_with("b-")), "{all:?}");
    drop(cluster.bpffs.drain(..));
    Ok(())
}

#[test]
fn terminating_endpoints_take_new_connections_only_while_serving() -> Result<()> {
    let mut demo = Demo::build("s4")?;
    let manifests = ManifestCopy::new("s4")?;
    let spec = "  clusterIP: 10.96.0.43\n  ports: [{name: http, port: 80, targetPort: http}]";
    manifests.write("term.yaml", &service_yaml("term", spec, &demo_pods(&ALL_PODS)))?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let to = sock([10, 96, 0, 43], 80);
    let mut held = LongConnection::open(demo.client_pod(), to, TIMEOUT)?;
    let backend = held.exchange("before")?.backend;

    // Every endpoint terminating but still serving: new connections go to them.
    let serving = ", conditions: {ready: false, serving: true, terminating: true}";
    manifests.write("term.yaml", &service_yaml("term", spec, &demo_pods(&[(0, serving), (1, serving), (2, serving)])))?;
    std::thread::sleep(Duration::from_millis(600));
    let seen = backends(demo.client_pod(), to, 10)?;
    assert_eq!(seen.len(), 10);
    assert_eq!(held.exchange("while terminating")?.backend, backend);

    // None serving: refused at once; the held flow keeps its backend while it is listed.
    let gone = ", conditions: {ready: false, serving: false, terminating: true}";
    manifests.write("term.yaml", &service_yaml("term", spec, &demo_pods(&[(0, gone), (1, gone), (2, gone)])))?;
    eventually(Duration::from_secs(5), || {
        let started = Instant::now();
        match tcp_request(demo.client_pod(), to, None, Duration::from_secs(2)) {
            Err(e) if io_kind(&e) == Some(ErrorKind::ConnectionRefused) && started.elapsed() < Duration::from_millis(500) => Ok(()),
            other => Err(anyhow!("not refused at once yet: {other:?}")),
        }
    })?;
    for i in 0..5 {
        assert_eq!(held.exchange(&format!("still here {i}"))?.backend, backend, "the established flow keeps its backend");
    }
    Ok(())
}

#[test]
fn a_pod_reaches_its_own_service_and_itself() -> Result<()> {
    let mut demo = Demo::build("s5")?;
    let manifests = ManifestCopy::new("s5")?;
    manifests.write("self.yaml", &service_yaml("self", "  clusterIP: 10.96.0.44\n  ports: [{name: http, port: 80, targetPort: http}]", &demo_pods(&[(0, "")])))?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let web0 = &demo.cluster.nodes[0].pods[0];
    // Its own Service of three: some connections land on itself, all get through.
    let mut landed_on_self = 0;
    for i in 0..20 {
        let a = tcp_request(&web0.ns, sock([10, 96, 0, 10], 80), None, TIMEOUT).map_err(|e| e.context(format!("request {i}")))?;
        if a.backend == "web-0" {
            assert_eq!(a.seen_source, HAIRPIN, "hairpinned through the node side");
            landed_on_self += 1;
        } else {
            assert_eq!(a.seen_source, web0.ip);
        }
    }
    // A Service whose only endpoint is the pod itself.
    for i in 0..20 {
        let a = tcp_request(&web0.ns, sock([10, 96, 0, 44], 80), None, TIMEOUT).map_err(|e| e.context(format!("self request {i}")))?;
        assert_eq!((a.backend.as_str(), a.seen_source), ("web-0", HAIRPIN.into()));
    }
    assert!(reason_count(&pins, "fwd_hairpin")? >= 20 + landed_on_self);
    Ok(())
}

#[test]
fn load_balancer_source_ranges_admit_only_the_listed_clients() -> Result<()> {
    let mut demo = Demo::build("s6")?;
    demo.cluster.client.exec("ip addr add 10.99.0.101/24 dev eth0")?;
    let manifests = ManifestCopy::new("s6")?;
    let spec = "  type: LoadBalancer\n  clusterIP: 10.96.0.45\n  loadBalancerSourceRanges: [10.99.0.100/32]\n  ports: [{name: http, port: 80, targetPort: http}]";
    manifests.write("ranged.yaml", &(service_yaml("ranged", spec, &demo_pods(&ALL_PODS)) + "\n---\n").replace("spec:\n  type: LoadBalancer", "status: {loadBalancer: {ingress: [{ip: 10.99.100.20}]}}\nspec:\n  type: LoadBalancer"))?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let lb = sock([10, 99, 100, 20], 80);
    let inside = tcp_request_from(&demo.cluster.client, Some(SocketAddr::from((CLIENT_IP, 0))), lb, TIMEOUT)?;
    assert_eq!(inside.seen_source, CLIENT_IP);
    let err = tcp_request_from(&demo.cluster.client, Some(SocketAddr::from(([10, 99, 0, 101], 0))), lb, Duration::from_millis(700)).expect_err("outside the ranges");
    assert_eq!(io_kind(&err), Some(ErrorKind::TimedOut), "{err:#}");
    assert!(reason_count(&pins, "drop_source_range")? >= 1);
    // The other LoadBalancer, without ranges, admits both.
    tcp_request_from(&demo.cluster.client, Some(SocketAddr::from(([10, 99, 0, 101], 0))), sock([10, 99, 100, 10], 80), TIMEOUT)?;
    Ok(())
}

#[test]
fn fragmentation_needed_reaches_the_client_about_the_frontend_and_a_large_upload_completes() -> Result<()> {
    let mut cluster = Cluster::new("s7", &[0, 1])?;
    let _server = EchoServer::start(&cluster.nodes[1].pods[0].ns, "remote-0", BACKEND_TCP_PORT, BACKEND_UDP_PORT)?;
    // Node B reaches the pod over a 1400-byte path (locked, so forwarded packets obey it).
    cluster.nodes[1].ns.exec("ip route replace 10.244.2.11/32 dev lxc0 mtu lock 1400")?;
    let manifests = ManifestCopy::empty("s7")?;
    let spec = "  type: NodePort\n  clusterIP: 10.96.0.46\n  ports: [{name: http, port: 80, nodePort: 30110}]";
    manifests.write("remote.yaml", &service_yaml("remote", spec, "  - {addresses: [10.244.2.11], nodeName: node-b}\n"))?;
    let pins = cluster.pin_dir()?;
    let _agent = cluster.start_agent(agent_bin(), 0, &["--manifests".to_string(), manifests.dir.display().to_string()], &pins, &[])?;
    let mut conn = LongConnection::open(&cluster.client, sock([10, 99, 0, 1], 30110), TIMEOUT)?;
    conn.exchange("small first")?;
    let upload = "x".repeat(64 * 1024);
    let answer = conn.exchange_with_timeout(&upload, Duration::from_secs(10))?;
    assert_eq!(answer.backend, "remote-0", "the 64 KiB line went through");
    let route = cluster.client.exec("ip route get 10.99.0.1")?;
    assert!(route.contains("mtu 1400"), "the client learnt the path MTU to the frontend: {route}");
    assert!(reason_count(&pins, "fwd_icmp_error")? >= 1);
    drop(cluster.bpffs.drain(..));
    Ok(())
}

#[test]
fn a_service_repeating_another_ones_frontend_is_refused_and_nothing_else_waits() -> Result<()> {
    let mut demo = Demo::build("s8")?;
    let manifests = ManifestCopy::new("s8")?;
    let (mut agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    // Sorts before web-lb and repeats its ExternalIP and port; its only endpoint is web-3.
    let dup = service_yaml("aaa-dup", "  clusterIP: 10.96.0.47\n  externalIPs: [10.99.200.10]\n  ports: [{name: http, port: 80, targetPort: http}]", &demo_pods(&[(4, "")]));
    manifests.write("dup.yaml", &dup)?;
    agent.wait_for_log("Service demo/aaa-dup: spec.externalIPs[0]: 10.99.200.10:80 http/TCP is already used by Service demo/web-lb", Duration::from_secs(5))?;
    let external = sock([10, 99, 200, 10], 80);
    assert!(!backends(&demo.cluster.client, external, 12)?.contains(&"web-3".to_string()), "the ExternalIP stays with web-lb");
    assert_eq!(tcp_request(demo.client_pod(), sock([10, 96, 0, 47], 80), None, TIMEOUT)?.backend, "web-3", "the newcomer's own ClusterIP works");

    // A change to a third Service afterwards reaches the maps.
    manifests.write("services.yaml", &manifests.read("services.yaml").replace("nodePort: 30080", "nodePort: 30085"))?;
    eventually(Duration::from_secs(5), || tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30085), None, TIMEOUT))?;
    let frontends = lbctl_json(&pins, &["service", "list"])?;
    assert!(frontends.iter().any(|f| f["frontend"].as_str().is_some_and(|s| s.contains(":30085"))), "{frontends:#?}");

    // After a restart the frontend still stays with the Service that had it.
    agent.kill9()?;
    let _agent = demo.start_agent_on(agent_bin(), &manifests.dir, &pins, &[])?;
    assert!(!backends(&demo.cluster.client, external, 12)?.contains(&"web-3".to_string()));
    Ok(())
}

#[test]
fn kube_proxy_health_check_fails_while_syncs_fail() -> Result<()> {
    let mut demo = Demo::build("s9")?;
    let manifests = ManifestCopy::new("s9")?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &["--healthz-failing-syncs-s", "2"])?;
    let healthz = || -> Result<(u16, Value)> {
        let (status, body) = http_get(&demo.cluster.client, sock([10, 99, 0, 1], 10256), "/healthz", TIMEOUT)?;
        Ok((status, serde_json::from_str(&body)?))
    };
    let (status, body) = healthz()?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["nodeEligible"], true);
    assert!(body["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");

    let liveness = || -> Result<u16> { Ok(http_get(&demo.cluster.client, sock([10, 99, 0, 1], 9970), "/healthz", TIMEOUT)?.0) };
    assert_eq!(liveness()?, 200);

    // The manifest directory vanishes: every sync fails.
    let aside = manifests.dir.with_extension("aside");
    std::fs::rename(&manifests.dir, &aside)?;
    let failing = eventually(Duration::from_secs(10), || match (healthz()?, liveness()?) {
        ((503, body), 503) => Ok(body),
        other => bail!("still {other:?}"),
    });
    std::fs::rename(&aside, &manifests.dir)?;
    failing?;
    eventually(Duration::from_secs(10), || match healthz()?.0 {
        200 => Ok(()),
        other => bail!("still {other}"),
    })?;
    Ok(())
}

#[test]
fn node_ports_answer_only_on_the_allowed_node_addresses() -> Result<()> {
    let mut demo = Demo::build("sa")?;
    demo.cluster.nodes[0].ns.exec("ip addr add 10.99.0.201/24 dev eth0")?;
    let manifests = ManifestCopy::new("sa")?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &["--nodeport-addresses", "10.99.0.1/32"])?;
    tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30080), None, TIMEOUT)?;
    let err = tcp_request(&demo.cluster.client, sock([10, 99, 0, 201], 30080), None, TIMEOUT).expect_err("not a NodePort address");
    assert_eq!(io_kind(&err), Some(ErrorKind::ConnectionRefused), "the node's own stack answers: nothing listens there");
    Ok(())
}
