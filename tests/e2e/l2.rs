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
    let (agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
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
    let metrics = |demo: &Demo| -> Result<String> { Ok(testbed::servers::http_get(&demo.cluster.client, SocketAddr::from(([10, 99, 0, 1], 9970)), "/metrics", TIMEOUT)?.1) };
    let text = metrics(&demo)?;
    for line in ["lb_ip_pool_addresses{pool=\"tiny\"} 3", "lb_ip_pool_addresses_used{pool=\"tiny\"} 3"] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in the metrics");
    }
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
    let text = metrics(&demo)?;
    assert!(text.lines().any(|l| l == "lb_ip_pool_addresses_used{pool=\"spare\"} 3") && !text.contains("pool=\"tiny\""), "the deleted pool's series are gone");
    assert!(tcp_request(&demo.cluster.client, SocketAddr::from(([10, 99, 0, 200], 80)), None, Duration::from_millis(500)).is_err(), "the old address is gone");

    // http and alt leave, freeing .221: late keeps .222 (what a Service holds stays), through
    // a restart too (read back from the pinned maps), though the first free address is lower.
    let address_of = |status: &Value, svc: &str| status["addresses"].as_array().and_then(|a| a.iter().find(|a| a["service"] == svc)).map(|a| a["address"].clone());
    objects.retain(|o| !matches!(o["metadata"]["name"].as_str(), Some("http" | "alt" | "http-1" | "alt-1")));
    manifests.write("pools.yaml", &yaml_docs(&objects))?;
    let held = json!({"demo/auto": "10.99.0.220", "demo/late": "10.99.0.222"});
    let addresses = |status: &Value| json!({"demo/auto": address_of(status, "demo/auto"), "demo/late": address_of(status, "demo/late")});
    eventually(Duration::from_secs(5), || {
        let status = agent_status(node, &pins)?;
        if address_of(&status, "demo/http").is_none() && addresses(&status) == held { Ok(()) } else { Err(anyhow!("{}", status["addresses"])) }
    })?;
    drop(agent);
    let _agent = demo.start_agent_on(agent_bin(), &manifests.dir, &pins, &[])?;
    let status = eventually(Duration::from_secs(5), || {
        let status = agent_status(node, &pins)?;
        if status["addresses"].as_array().is_some_and(|a| !a.is_empty()) { Ok(status) } else { Err(anyhow!("no addresses yet")) }
    })?;
    assert_eq!(addresses(&status), held, "after a restart");
    tcp_request(&demo.cluster.client, SocketAddr::from(([10, 99, 0, 222], 80)), None, TIMEOUT).context("late's address after the restart")?;
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
    // The status follows the Service; its EndpointSlice reaches the owner's datapath on its
    // own, and a request before it may be refused (seen once in CI as "connection refused").
    let (answer, owner) = eventually(Duration::from_secs(10), || bed.request())?;
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
    let metrics = testbed::servers::http_get(&bed.cluster.client, SocketAddr::from((bed.cluster.nodes[owner].ip, 9970)), "/metrics", TIMEOUT)?.1;
    assert!(metrics.lines().any(|l| l == "lb_l2_ownership_changes_total 1"), "the owner counted the address's one change of owner");
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

/// Asks who has `target` by ARP from the client, `asks` times `every` apart, and counts the
/// replies by the MAC they give.
fn arp_replies(client: &Netns, target: Ipv4Addr, asks: usize, every: Duration) -> Result<BTreeMap<String, usize>> {
    let mac: Vec<u8> = client.mac("eth0")?.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
    client.run(move || -> Result<BTreeMap<String, usize>> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        const ETH_P_ARP: u16 = 0x0806;
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_ARP.to_be()) as i32) };
        anyhow::ensure!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        at.sll_family = libc::AF_PACKET as u16;
        at.sll_protocol = ETH_P_ARP.to_be();
        at.sll_ifindex = ifindex as i32;
        at.sll_halen = 6;
        at.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let len = size_of::<libc::sockaddr_ll>() as u32;
        anyhow::ensure!(unsafe { libc::bind(fd.as_raw_fd(), (&raw const at).cast(), len) } == 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 10_000 };
        unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size_of::<libc::timeval>() as u32) };
        let request = lb_agent::announce::arp_request(mac.as_slice().try_into()?, CLIENT_IP, target);
        let mut replies = BTreeMap::new();
        let mut buf = [0u8; 1500];
        for _ in 0..asks {
            let sent_at = Instant::now();
            let n = unsafe { libc::sendto(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0, (&raw const at).cast(), len) };
            anyhow::ensure!(n >= 0, "sendto: {}", std::io::Error::last_os_error());
            while sent_at.elapsed() < every {
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                // An ARP reply (operation 2) from `target`.
                if n >= 42 && buf[12..14] == [0x08, 0x06] && buf[20..22] == [0, 2] && buf[28..32] == target.octets() {
                    let sender: Vec<String> = buf[22..28].iter().map(|b| format!("{b:02x}")).collect();
                    *replies.entry(sender.join(":")).or_default() += 1;
                }
            }
        }
        Ok(replies)
    })?
}

#[test]
fn only_one_node_answers_arp_for_an_address() -> Result<()> {
    let bed = Bed::new("l2s", &[0, 0, 1])?;
    bed.service("web", "10.96.2.1", json!({}), &node_c_endpoints(1))?;
    bed.wait_for_status("web", "10.99.0.200")?;
    let (_, owner) = eventually(Duration::from_secs(5), || bed.request())?;
    // 30 s of requests, one every 100 ms, with both nodes healthy.
    let replies = arp_replies(&bed.cluster.client, VIP, 300, Duration::from_millis(100))?;
    eprintln!("ARP replies for {VIP} over 30 s, by MAC: {replies:?}");
    let owner_mac = bed.cluster.nodes[owner].ns.mac("eth0")?;
    assert_eq!(replies.keys().collect::<Vec<_>>(), [&owner_mac], "one node, the owner, answers");
    assert!(replies[&owner_mac] >= 295, "{replies:?}: every request is answered");
    Ok(())
}

#[test]
fn external_traffic_policy_local_moves_the_owner_with_the_last_local_endpoint() -> Result<()> {
    let bed = Bed::new("l2e", &[1, 1])?;
    let endpoints = |nodes: &[usize]| -> Vec<(IpAddr, &'static str)> { nodes.iter().map(|n| (IpAddr::V4(pod_ips(n + 1, 0).0), if *n == 0 { "node-a" } else { "node-b" })).collect() };
    bed.service("local", "10.96.2.3", json!({"externalTrafficPolicy": "Local"}), &endpoints(&[0, 1]))?;
    bed.wait_for_status("local", "10.99.0.200")?;
    let (answer, owner) = eventually(Duration::from_secs(5), || bed.request())?;
    assert_eq!((answer.backend.as_str(), answer.seen_source), (format!("web-{}0", owner + 1).as_str(), IpAddr::V4(CLIENT_IP)), "the owner's own endpoint, seeing the client");
    // The owner's endpoint goes: the other node, which has one, takes the address.
    let other = 1 - owner;
    let (_, slice) = lb_service("local", "10.96.2.3", &[80], json!({}), json!({}), &endpoints(&[other]));
    bed.api.apply(&slice)?;
    let moved_to = eventually(Duration::from_secs(5), || {
        let node = bed.node_with_client_neighbour(VIP)?;
        if node == other { Ok(node) } else { Err(anyhow!("the client still resolves {VIP} to node {node}")) }
    })?;
    let answer = tcp_request(&bed.cluster.client, SocketAddr::from((VIP, 80)), None, TIMEOUT)?;
    assert_eq!((answer.backend.as_str(), answer.seen_source, moved_to), (format!("web-{}0", other + 1).as_str(), IpAddr::V4(CLIENT_IP), other));
    Ok(())
}

#[test]
fn lease_writes_grow_with_nodes_not_with_services() -> Result<()> {
    let bed = Bed::new("l2q", &[0, 0, 1])?;
    bed.service("web", "10.96.2.1", json!({}), &node_c_endpoints(1))?;
    bed.wait_for_status("web", "10.99.0.200")?;
    let rate = |bed: &Bed| -> f64 {
        let (start, at) = (bed.api.writes("Lease"), Instant::now());
        std::thread::sleep(Duration::from_secs(5));
        (bed.api.writes("Lease") - start) as f64 / at.elapsed().as_secs_f64()
    };
    let one = rate(&bed);
    bed.api.apply(&pool("bulk", "10.98.0.1", "10.98.3.254", json!({"matchLabels": {"bulk": "yes"}})))?;
    for i in 0..999 {
        let (svc, _) = lb_service(&format!("bulk-{i}"), &format!("10.96.{}.{}", 8 + i / 250, 1 + i % 250), &[80], json!({"labels": {"bulk": "yes"}}), json!({}), &[]);
        bed.api.apply(&svc)?;
    }
    eventually(Duration::from_secs(30), || {
        let pending = (0..999).filter(|i| bed.api.get("Service", "demo", &format!("bulk-{i}")).is_none_or(|s| s["status"]["loadBalancer"]["ingress"][0]["ip"].is_null())).count();
        if pending == 0 { Ok(()) } else { Err(anyhow!("{pending} Services have no address in their status yet")) }
    })?;
    let thousand = rate(&bed);
    let status_writes = bed.api.writes("Service");
    eprintln!("Lease writes per second, 2 nodes: {one:.2} with 1 LoadBalancer Service, {thousand:.2} with 1,000 ({status_writes} status writes in all)");
    assert!((3.0..=5.0).contains(&one), "two nodes renew twice a second each: {one:.2}/s");
    assert!((thousand - one).abs() <= 1.0, "{one:.2}/s with 1 Service, {thousand:.2}/s with 1,000");
    Ok(())
}

#[test]
fn standalone_ipv6_pool_address_is_answered_by_neighbour_discovery() -> Result<()> {
    use testbed::topology::CLIENT_IP6;
    let mut demo = Demo::build("l2v6")?;
    let manifests = ManifestCopy::empty("l2v6")?;
    let endpoints: Vec<Value> = (0..3).map(|p| json!({"addresses": [pod_ips(1, p).1.to_string()], "conditions": {"ready": true}, "nodeName": "node-a"})).collect();
    let objects = [
        // A /126: its first and last addresses are not given out.
        json!({"apiVersion": "lb-agent.io/v1alpha1", "kind": "LoadBalancerIPPool", "metadata": {"name": "v6"}, "spec": {"blocks": [{"cidr": "fd00:99::200/126"}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web6", "namespace": "demo"},
               "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv6"], "clusterIP": "fd00:96::30", "clusterIPs": ["fd00:96::30"], "ports": [{"name": "http", "protocol": "TCP", "port": 80}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web6-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web6"}},
               "addressType": "IPv6", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}], "endpoints": endpoints}),
    ];
    manifests.write("v6.yaml", &yaml_docs(&objects))?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let vip: std::net::Ipv6Addr = "fd00:99::201".parse()?;
    let answer = eventually(Duration::from_secs(5), || tcp_request(&demo.cluster.client, SocketAddr::from((vip, 80)), None, Duration::from_millis(500)))?;
    assert!(answer.backend.starts_with("web-"), "{answer:?}");
    assert_eq!(answer.seen_source, IpAddr::V6(CLIENT_IP6));
    let neighbour: Vec<Value> = serde_json::from_str(&demo.cluster.client.exec(&format!("ip -6 -j neigh show {vip} dev eth0"))?)?;
    assert_eq!(neighbour[0]["lladdr"].as_str(), Some(demo.cluster.nodes[0].ns.mac("eth0")?.as_str()), "resolved by neighbour discovery, answered from node-a's XDP");
    Ok(())
}

#[test]
fn kubernetes_mode_without_the_pool_crd_serves_everything_else() -> Result<()> {
    let mut demo = Demo::build("l2n")?;
    let api = FakeApiServer::start(&demo.cluster.nodes[0].ns, 6443)?;
    api.hide("LoadBalancerIPPool");
    let pods: Vec<(IpAddr, &str)> = (0..3).map(|p| (IpAddr::V4(pod_ips(1, p).0), "node-a")).collect();
    let (mut svc, slice) = lb_service("web", "10.96.3.1", &[80], json!({}), json!({}), &pods);
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "10.99.100.30"}]}});
    api.apply(&svc)?;
    api.apply(&slice)?;
    let dir = ManifestCopy::empty("l2n")?;
    let source = ["--kubernetes".to_string(), "--kubeconfig".to_string(), api.kubeconfig(&dir.dir)?.display().to_string()];
    let pins = demo.cluster.pin_dir()?;
    // Programmed at all means the first sync waited for no pool list that cannot come.
    let agent = demo.start_agent_with(agent_bin(), &source, &pins, &[])?;
    assert!(agent.log_text().contains("LoadBalancerIPPool: not served by this API server"), "{}", agent.log_text());
    let answer = tcp_request(&demo.cluster.client, SocketAddr::from(([10, 99, 100, 30], 80)), None, TIMEOUT)?;
    assert_eq!(answer.seen_source, IpAddr::V4(CLIENT_IP), "the status address of another implementation is served");
    Ok(())
}
