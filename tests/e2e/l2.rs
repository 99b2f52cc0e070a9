//! Bare-metal LoadBalancer: addresses from LoadBalancerIPPools, ARP answered by one node,
//! failover when that node's link or agent goes away.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
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

/// Agents on nodes A and B in Kubernetes mode, against an API server on the LAN, with the
/// pool `lan`; node C (if any) runs no agent and hosts backends, so that a node that fails takes
/// no backend with it. Fields drop in order: agents before the API server, the topology last.
struct Bed {
    agents: Vec<Option<AgentProcess>>,
    api: FakeApiServer,
    pins: Vec<PathBuf>,
    source: Vec<String>,
    _servers: Vec<EchoServer>,
    _dir: ManifestCopy,
    cluster: Cluster,
}

impl Bed {
    /// `pods[i]` pods on node i, each running an echo server named web-<node><pod>.
    fn new(tag: &str, pods: &[usize]) -> Result<Self> {
        let mut cluster = Cluster::new(tag, pods)?;
        cluster.lan.exec(&format!("ip addr add {API_IP}/24 dev br0"))?;
        // A switch floods frames for a MAC it does not know to every port, and a real NIC
        // drops those not addressed to it; a veth does not, so the switch here does not flood
        // them (broadcasts, ARP among them, still go everywhere).
        for port in 0..=pods.len() {
            cluster.lan.exec(&format!("bridge link set dev p{port} flood off"))?;
        }
        let api = FakeApiServer::start_on(&cluster.lan, API_IP, 6443)?;
        let dir = ManifestCopy::empty(tag)?;
        let kubeconfig = kubeconfig_for(&dir.dir, &format!("http://{API_IP}:6443"))?;
        let mut servers = Vec::new();
        for (n, node) in cluster.nodes.iter().enumerate() {
            for (p, pod) in node.pods.iter().enumerate() {
                servers.push(EchoServer::start(&pod.ns, &format!("web-{}{p}", n + 1), 8080, 7007)?);
            }
        }
        api.apply(&pool("lan", LAN_POOL.0, LAN_POOL.1, json!(null)))?;
        let pins = vec![cluster.pin_dir()?, cluster.pin_dir()?];
        let source = vec!["--kubernetes".into(), "--kubeconfig".into(), kubeconfig.display().to_string()];
        let mut bed = Self { agents: vec![None, None], api, pins, source, _servers: servers, _dir: dir, cluster };
        bed.start_agent(0)?;
        bed.start_agent(1)?;
        Ok(bed)
    }

    fn start_agent(&mut self, i: usize) -> Result<()> {
        self.agents[i] = Some(self.cluster.start_agent(agent_bin(), i, &self.source, &self.pins[i], &[])?);
        Ok(())
    }

    /// Applies Service `name` (LoadBalancer, port 80) and its EndpointSlice.
    fn service(&self, name: &str, cluster_ip: &str, spec: Value, endpoints: &[(IpAddr, &str)]) -> Result<()> {
        let (svc, slice) = lb_service(name, cluster_ip, &[80], json!({}), spec, endpoints);
        self.api.apply(&svc)?;
        self.api.apply(&slice)
    }

    /// The addresses in Service `name`'s status, once it has `want`.
    fn wait_for_status(&self, name: &str, want: &str) -> Result<()> {
        eventually(Duration::from_secs(10), || {
            let svc = self.api.get("Service", "demo", name).context("no such Service")?;
            let ingress = &svc["status"]["loadBalancer"]["ingress"];
            if ingress[0]["ip"] == want { Ok(()) } else { Err(anyhow!("status of {name}: {ingress}")) }
        })
    }

    /// The index of the node whose MAC the client has for `ip`.
    fn node_with_client_neighbour(&self, ip: Ipv4Addr) -> Result<usize> {
        let mac = client_neighbour(&self.cluster.client, ip)?;
        (0..2).find(|i| self.cluster.nodes[*i].ns.mac("eth0").is_ok_and(|m| m == mac)).with_context(|| format!("the client's neighbour for {ip} is {mac:?}, no node's"))
    }

    /// A request to `VIP`:80 from the outside client; the node that answered ARP for it.
    fn request(&self) -> Result<(testbed::servers::Answer, usize)> {
        let answer = tcp_request(&self.cluster.client, SocketAddr::from((VIP, 80)), None, TIMEOUT)?;
        Ok((answer, self.node_with_client_neighbour(VIP)?))
    }
}

/// The backends of node C (index 2), for Services of nodes that hold none.
fn node_c_endpoints(count: usize) -> Vec<(IpAddr, &'static str)> {
    (0..count).map(|p| (IpAddr::V4(pod_ips(3, p).0), "node-c")).collect()
}

#[test]
fn kubernetes_pool_address_is_written_to_status_and_answered_by_one_node() -> Result<()> {
    let bed = Bed::new("l2k", &[0, 0, 2])?;
    bed.service("web", "10.96.2.1", json!({}), &node_c_endpoints(2))?;
    bed.wait_for_status("web", "10.99.0.200")?;
    let (answer, owner) = bed.request()?;
    assert!(answer.backend.starts_with("web-3"), "{answer:?}");
    assert_eq!(answer.seen_source, IpAddr::V4(bed.cluster.nodes[owner].ip), "a remote backend sees the owner's node address (SNAT)");
    // Exactly the owner answers for it, and both agents agree on who that is.
    for (i, pins) in bed.pins.iter().enumerate() {
        let rows = bed.cluster.nodes[i].ns.exec(&format!("{} --pin-dir {} address list -o json", env!("CARGO_BIN_EXE_lbctl"), pins.display()))?;
        let rows: Vec<Value> = serde_json::from_str(&rows)?;
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!((rows[0]["address"].as_str(), rows[0]["service"].as_str(), rows[0]["pool"].as_str()), (Some("10.99.0.200"), Some("demo/web"), Some("lan")));
        assert_eq!(rows[0]["owner"].as_str(), Some(Cluster::node_name(owner).as_str()), "node {i}");
        assert_eq!(rows[0]["answered_here"], json!(i == owner), "node {i}");
    }
    // A Service asking for an address outside every pool: not served, and a Warning Event says why.
    let (asking, slice) = lb_service("asking", "10.96.2.2", &[80], json!({"annotations": {"lb-agent.io/load-balancer-ips": "192.0.2.7"}}), json!({}), &node_c_endpoints(1));
    bed.api.apply(&asking)?;
    bed.api.apply(&slice)?;
    let event = eventually(Duration::from_secs(10), || {
        let events = bed.api.events();
        events.into_iter().find(|e| e["regarding"]["name"] == "asking").context("no Event about demo/asking yet")
    })?;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("AddressNotAssigned")));
    assert!(event["note"].as_str().unwrap_or_default().contains("192.0.2.7 is outside every pool"), "{event}");
    assert!(bed.api.get("Service", "demo", "asking").unwrap()["status"]["loadBalancer"]["ingress"].as_array().is_none_or(|i| i.is_empty()));
    Ok(())
}

/// Requests to `VIP`:80 every 50 ms while `fail` takes the owner down. Returns the gap (from
/// the failure to the first request answered after the first one that was not; zero when none
/// failed) and when the client's neighbour entry for `VIP` moved to `survivor_mac`.
fn measure_failover(bed: &Bed, fail: Failure, survivor_mac: &str) -> Result<(Duration, Duration)> {
    use std::sync::{atomic::{AtomicBool, Ordering}, Mutex};
    let (stop, log) = (AtomicBool::new(false), Mutex::new(Vec::<(Instant, bool)>::new()));
    std::thread::scope(|scope| -> Result<(Duration, Duration)> {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let at = Instant::now();
                let ok = tcp_request(&bed.cluster.client, SocketAddr::from((VIP, 80)), None, Duration::from_millis(200)).is_ok();
                log.lock().unwrap().push((at, ok));
                std::thread::sleep(Duration::from_millis(50).saturating_sub(at.elapsed()));
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let failed_at = Instant::now();
        let outcome = fail();
        let mut moved = None;
        let result = eventually(Duration::from_secs(6), || {
            if moved.is_none() && client_neighbour(&bed.cluster.client, VIP)? == survivor_mac {
                moved = Some(failed_at.elapsed());
            }
            let log = log.lock().unwrap();
            let after: Vec<&(Instant, bool)> = log.iter().filter(|(at, _)| *at >= failed_at).collect();
            let gap = match after.iter().position(|(_, ok)| !ok) {
                Some(miss) => after[miss..].iter().find(|(_, ok)| *ok).map(|(at, _)| at.duration_since(failed_at)),
                None => Some(Duration::ZERO),
            };
            match (gap, moved) {
                (Some(gap), Some(moved)) if after.len() >= 10 => Ok((gap, moved)),
                _ => Err(anyhow!("since the failure: answered after {gap:?}, neighbour moved after {moved:?}")),
            }
        });
        stop.store(true, Ordering::Relaxed);
        outcome?;
        result
    })
}

/// Takes a node down, when called.
type Failure = Box<dyn FnOnce() -> Result<()>>;

/// Five failovers of the owner of `VIP` (`fail` gives what takes it down, `recover` brings it
/// back), each asserted under 2 s with the client's neighbour moved to the other node.
fn failovers(bed: &mut Bed, what: &str, fail: impl Fn(&mut Bed, usize) -> Result<Failure>, recover: impl Fn(&mut Bed, usize) -> Result<()>) -> Result<()> {
    bed.service("web", "10.96.2.1", json!({}), &node_c_endpoints(2))?;
    bed.wait_for_status("web", "10.99.0.200")?;
    let mut gaps = Vec::new();
    for run in 1..=5 {
        let (_, owner) = eventually(Duration::from_secs(10), || bed.request())?;
        let failure = fail(bed, owner)?;
        let survivor = 1 - owner;
        let (gap, moved) = measure_failover(bed, failure, &bed.cluster.nodes[survivor].ns.mac("eth0")?)?;
        let (answer, answered_by) = bed.request()?;
        assert_eq!(answered_by, survivor, "run {run}: the client's neighbour moved to the other node");
        assert_eq!(answer.seen_source, IpAddr::V4(bed.cluster.nodes[survivor].ip));
        eprintln!("{what}, run {run}: {} -> {}: requests unanswered for {gap:?}, the client's neighbour moved after {moved:?}", Cluster::node_name(owner), Cluster::node_name(survivor));
        assert!(gap < Duration::from_secs(2) && moved < Duration::from_secs(2), "{what}, run {run}: gap {gap:?}, moved after {moved:?}");
        gaps.push((gap, moved));
        recover(bed, owner)?;
        // Both nodes alive again: the address settles on its owner before the next run.
        std::thread::sleep(Duration::from_secs(3));
    }
    eprintln!("{what}: (gap, neighbour moved) per run: {gaps:?}");
    Ok(())
}

#[test]
fn failover_when_the_owner_link_goes_down_under_2s() -> Result<()> {
    let mut bed = Bed::new("l2f", &[0, 0, 2])?;
    failovers(
        &mut bed,
        "owner's LAN link down",
        |bed, owner| {
            let ns = bed.cluster.nodes[owner].ns.name.clone();
            Ok(Box::new(move || Ok(testbed::netns::sh(&format!("ip netns exec {ns} ip link set eth0 down")).map(|_| ())?)))
        },
        |bed, owner| {
            let node = &bed.cluster.nodes[owner];
            node.ns.exec("ip link set eth0 up")?;
            // Routes through the link went with it.
            for other in bed.cluster.nodes.iter().filter(|o| o.ip != node.ip) {
                node.ns.exec(&format!("ip route replace 10.244.{}.0/24 via {}", other.ip.octets()[3], other.ip))?;
            }
            Ok(())
        },
    )
}

#[test]
fn failover_when_the_owner_agent_is_killed_under_2s() -> Result<()> {
    let mut bed = Bed::new("l2a", &[0, 0, 2])?;
    failovers(
        &mut bed,
        "owner's agent killed",
        |bed, owner| {
            let mut agent = bed.agents[owner].take().context("agent")?;
            Ok(Box::new(move || agent.kill9()))
        },
        |bed, owner| bed.start_agent(owner),
    )
}
