//! The standalone demo: a node with three backend pods and a client pod, an outside client,
//! the example manifests, real requests through the load balancer (every kind of frontend,
//! session affinity, hairpin, externalTrafficPolicy: Local, the health checks, IPv6 and
//! dual-stack, the node's own processes, a bare-metal address pool, a pod wired by lb-cni,
//! NetworkPolicy), and lbctl's view of it.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    cni,
    netns::Netns,
    process::AgentProcess,
    servers::{http_get, tcp_request, udp_request, Answer, EchoServer},
    topology::Cluster,
};

pub const BACKEND_TCP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 7007;

/// The example topology: node 1 ("node-a", 10.99.0.1) with pods 10.244.1.11-13 running echo
/// servers named web-0..2, a client pod 10.244.1.14, and a spare pod 10.244.1.15 running
/// web-3, which no manifest names yet.
pub struct Demo {
    pub servers: Vec<EchoServer>,
    pub cluster: Cluster,
}

impl Demo {
    pub fn build(tag: &str) -> Result<Self> {
        let cluster = Cluster::new(tag, &[5])?;
        let mut servers = Vec::new();
        for (i, pod) in cluster.nodes[0].pods.iter().enumerate().filter(|(i, _)| *i != 3) {
            let name = format!("web-{}", if i == 4 { 3 } else { i });
            servers.push(EchoServer::start(&pod.ns, &name, BACKEND_TCP_PORT, BACKEND_UDP_PORT)?);
        }
        Ok(Self { servers, cluster })
    }

    pub fn client_pod(&self) -> &Netns {
        &self.cluster.nodes[0].pods[3].ns
    }

    /// Starts lb-agent on node 1 with `manifests`, its maps pinned on a fresh bpffs.
    pub fn start_agent(&mut self, agent_bin: &Path, manifests: &Path, extra: &[&str]) -> Result<(AgentProcess, PathBuf)> {
        let pin_dir = self.cluster.pin_dir()?;
        let agent = self.start_agent_on(agent_bin, manifests, &pin_dir, extra)?;
        Ok((agent, pin_dir))
    }

    /// Starts lb-agent on node 1 with maps pinned in `pin_dir` (where an earlier agent may have
    /// left them), and waits until it has programmed the maps.
    pub fn start_agent_on(&self, agent_bin: &Path, manifests: &Path, pin_dir: &Path, extra: &[&str]) -> Result<AgentProcess> {
        let source = ["--manifests".to_string(), manifests.display().to_string()];
        self.start_agent_with(agent_bin, &source, pin_dir, extra)
    }

    /// Starts lb-agent on node 1 with the given source flags.
    pub fn start_agent_with(&self, agent_bin: &Path, source: &[String], pin_dir: &Path, extra: &[&str]) -> Result<AgentProcess> {
        self.cluster.start_agent(agent_bin, 0, source, pin_dir, extra)
    }
}

/// Runs the demo end to end and prints what happened.
pub fn run(bin_dir: &Path, manifests: &Path) -> Result<()> {
    println!("== building the topology: outside client, node-a (10.99.0.1, fd00:99::1), dual-stack pods web-0..2 and a client pod");
    let mut demo = Demo::build("demo")?;
    // The agent reads a copy, to which the bare-metal step adds a pool.
    let workdir = ManifestsCopy::of(manifests)?;
    println!("== starting lb-agent on node-a with the manifests in {}", manifests.display());
    let events_socket = std::env::temp_dir().join(format!("lb-demo-events-{}.sock", std::process::id()));
    // Every kind of flow event, and conntrack GC every 2 s so that closes show within the demo.
    let (agent, pin_dir) = demo.start_agent(&bin_dir.join("lb-agent"), &workdir.0, &["--events-socket", &events_socket.display().to_string(), "--events", "all", "--gc-interval-s", "2"])?;
    let timeout = Duration::from_secs(2);
    let show = |what: &str, r: Result<Answer>| match r {
        Ok(a) => println!("   {what:<44} answered by {} (it saw source {})", a.backend, a.seen_source),
        Err(e) => println!("   {what:<44} FAILED: {e:#}"),
    };
    let client_pod_ip = demo.cluster.nodes[0].pods[3].ip;
    println!("== pod {client_pod_ip} -> ClusterIP demo/web 10.96.0.10 (TC on the pod's device)");
    for i in 0..6 {
        show(&format!("TCP 10.96.0.10:80 request {i}"), tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, timeout));
    }
    for i in 0..3 {
        show(&format!("UDP 10.96.0.10:7 request {i}"), udp_request(demo.client_pod(), sock([10, 96, 0, 10], 7), 0, timeout));
    }
    println!("== outside client 10.99.0.100 -> NodePort, LoadBalancer IP and ExternalIP (XDP on node-a eth0)");
    for (what, addr, port) in [("NodePort 10.99.0.1:30080", [10, 99, 0, 1], 30080), ("LoadBalancer 10.99.100.10:80", [10, 99, 100, 10], 80), ("ExternalIP 10.99.200.10:80", [10, 99, 200, 10], 80)] {
        for _ in 0..2 {
            show(&format!("TCP {what}"), tcp_request(&demo.cluster.client, sock(addr, port), None, timeout));
        }
    }
    show("UDP NodePort 10.99.0.1:30007", udp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30007), 0, timeout));
    show("UDP LoadBalancer 10.99.100.10:7", udp_request(&demo.cluster.client, sock([10, 99, 100, 10], 7), 0, timeout));

    println!("== session affinity (ClientIP): pod {client_pod_ip} -> demo/web-sticky 10.96.0.13, a new connection each time");
    for i in 0..4 {
        show(&format!("TCP 10.96.0.13:80 connection {i}"), tcp_request(demo.client_pod(), sock([10, 96, 0, 13], 80), None, timeout));
    }
    let web0 = &demo.cluster.nodes[0].pods[0];
    println!("== hairpin: pod web-0 ({}) -> its own Service 10.96.0.10; landing on itself, it sees the hairpin address", web0.ip);
    for i in 0..6 {
        show(&format!("TCP 10.96.0.10:80 request {i}"), tcp_request(&web0.ns, sock([10, 96, 0, 10], 80), None, timeout));
    }
    println!("== externalTrafficPolicy: Local and source ranges 10.99.0.0/24: outside client -> LoadBalancer 10.99.100.11");
    for _ in 0..2 {
        show("TCP LoadBalancer 10.99.100.11:80", tcp_request(&demo.cluster.client, sock([10, 99, 100, 11], 80), None, timeout));
    }
    for (what, port, path) in [("healthCheckNodePort 10.99.0.1:32000", 32000, "/"), ("kube-proxy health 10.99.0.1:10256", 10256, "/healthz")] {
        match http_get(&demo.cluster.client, sock([10, 99, 0, 1], port), path, timeout) {
            Ok((status, body)) => println!("   GET {what:<40} {status} {body}"),
            Err(e) => println!("   GET {what:<40} FAILED: {e:#}"),
        }
    }

    let pod6 = demo.cluster.nodes[0].pods[3].ip6;
    println!("== IPv6: dual-stack demo/web-dual, pod {pod6} -> ClusterIP [fd00:96::16] (and 10.96.0.16), outside client -> NodePort [fd00:99::1]:30680 and LoadBalancer [fd00:99:100::16]");
    let v6 = |addr: &str, port: u16| SocketAddr::new(addr.parse().expect("an IPv6 address"), port);
    for i in 0..3 {
        show(&format!("TCP [fd00:96::16]:80 request {i}"), tcp_request(demo.client_pod(), v6("fd00:96::16", 80), None, timeout));
    }
    show("TCP 10.96.0.16:80 (same Service, IPv4)", tcp_request(demo.client_pod(), sock([10, 96, 0, 16], 80), None, timeout));
    show("TCP NodePort [fd00:99::1]:30680", tcp_request(&demo.cluster.client, v6("fd00:99::1", 30680), None, timeout));
    show("TCP LoadBalancer [fd00:99:100::16]:80", tcp_request(&demo.cluster.client, v6("fd00:99:100::16", 80), None, timeout));

    let node = &demo.cluster.nodes[0].ns;
    println!("== a process in node-a's own network namespace (not a pod) -> ClusterIP and NodePort (cgroup socket hooks)");
    for i in 0..3 {
        show(&format!("TCP 10.96.0.10:80 connection {i}"), tcp_request(node, sock([10, 96, 0, 10], 80), None, timeout));
    }
    show("UDP 10.96.0.10:7", udp_request(node, sock([10, 96, 0, 10], 7), 0, timeout));
    show("TCP its own NodePort 10.99.0.1:30080", tcp_request(node, sock([10, 99, 0, 1], 30080), None, timeout));

    let lbctl = bin_dir.join("lbctl");
    let bare_metal = manifests.join("../bare-metal/pool.yaml");
    println!("== bare metal: a LoadBalancerIPPool 10.99.0.200-209 and demo/web-lan, a LoadBalancer with no address ({})", bare_metal.display());
    std::fs::copy(&bare_metal, workdir.0.join("bare-metal.yaml")).with_context(|| format!("copying {}", bare_metal.display()))?;
    let vip = sock([10, 99, 0, 200], 80);
    let answered = (0..40).find_map(|_| tcp_request(&demo.cluster.client, vip, None, Duration::from_millis(250)).ok().or_else(|| {
        std::thread::sleep(Duration::from_millis(100));
        None
    }));
    match answered {
        Some(a) => println!("   TCP 10.99.0.200:80 (the pool's first address)             answered by {} (it saw source {})", a.backend, a.seen_source),
        None => println!("   TCP 10.99.0.200:80 FAILED: no answer within 4 s"),
    }
    let neighbour = demo.cluster.client.exec("ip neigh show 10.99.0.200 dev eth0")?;
    println!("   the client resolved it by ARP, answered from XDP on node-a ({}): {}", node.mac("eth0")?, neighbour.trim());
    pod_networking(bin_dir, &demo, &pin_dir)?;
    network_policy(bin_dir, &demo, &pin_dir, &workdir.0, &manifests.join("../network-policy/policy.yaml"), &events_socket)?;
    for (what, args) in [
        ("the policy drops above, with their reason, tuple and pods", ["--verdict", "dropped", "--last", "3"]),
        ("new connections, with the backend each was sent to", ["--verdict", "translated", "--last", "3"]),
    ] {
        println!("== flow events: lbctl observe {} ({what})", args.join(" "));
        let out = Command::new(&lbctl).args(["observe", "--socket"]).arg(&events_socket).args(args).output().context("running lbctl observe")?;
        print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    println!("== lbctl explain 10.99.0.100:40000 10.99.0.1:30080/TCP (where a new connection of the outside client to the NodePort would go, and why)");
    let out = Command::new(&lbctl).arg("--pin-dir").arg(&pin_dir).args(["explain", "10.99.0.100:40000", "10.99.0.1:30080/TCP"]).output().context("running lbctl explain")?;
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30080), Some(40000), timeout) {
        Ok(a) => println!("   {:<44} answered by {} (it saw source {})", "TCP 10.99.0.1:30080 from port 40000", a.backend, a.seen_source),
        Err(e) => println!("   TCP 10.99.0.1:30080 from port 40000 FAILED: {e:#}"),
    }
    println!("== flow events: lbctl observe --verdict closed --port 40000 (that connection, once conntrack GC removes it: 10 s after its FINs)");
    let closed = (0..30).find_map(|_| {
        let out = Command::new(&lbctl).args(["observe", "--socket"]).arg(&events_socket).args(["--verdict", "closed", "--port", "40000"]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
            return None;
        }
        Some(text)
    });
    print!("{}", closed.unwrap_or_else(|| "   no close event within 15 s (FAILED)\n".into()));
    println!("== lbctl address list (in node-a's namespace: it asks the agent)");
    let out = Command::new("ip").args(["netns", "exec", &node.name]).arg(&lbctl).arg("--pin-dir").arg(&pin_dir).args(["address", "list"]).output().context("running lbctl")?;
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // `status` asks the agent on its metrics address, so it runs in node-a's namespace.
    println!("== lbctl status (in node-a's namespace, where the agent's metrics address is)");
    let out = Command::new("ip").args(["netns", "exec", &node.name]).arg(&lbctl).arg("--pin-dir").arg(&pin_dir).arg("status").output().context("running lbctl")?;
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for args in [vec!["service", "list"], vec!["service", "list", "-n", "demo", "--service", "web", "-o", "wide"], vec!["maglev", "get", "demo/web:http/TCP"], vec!["affinity", "list"], vec!["stats"]] {
        println!("== lbctl {}", args.join(" "));
        let out = Command::new(&lbctl).arg("--pin-dir").arg(&pin_dir).args(&args).output().context("running lbctl")?;
        print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    println!("== uninstall: agent stopped, then lb-agent --cleanup takes the datapath off node-a");
    drop(agent);
    let out = Command::new(bin_dir.join("lb-agent")).arg("--cleanup").arg("--pin-dir").arg(&pin_dir).output().context("running lb-agent --cleanup")?;
    print!("   {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let xdp_left = node.exec("ip -d link show dev eth0")?.contains("prog/xdp");
    println!("   XDP on node-a eth0: {}; pin directory: {}", if xdp_left { "still attached (FAILED)" } else { "none" }, if pin_dir.exists() { "still there (FAILED)" } else { "gone" });
    match tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30080), None, Duration::from_millis(500)) {
        Ok(a) => println!("   NodePort 10.99.0.1:30080 still answered by {} (FAILED)", a.backend),
        Err(_) => println!("   NodePort 10.99.0.1:30080 no longer answers: nothing forwards to a frozen table"),
    }
    println!("== cleaning up: namespaces removed");
    Ok(())
}

/// lb-cni wires a new pod as a container runtime would run it (ADD), the pod reaches a
/// ClusterIP through the TC program ADD attached, lbctl lists the endpoint, DEL undoes it all.
fn pod_networking(bin_dir: &Path, demo: &Demo, pin_dir: &Path) -> Result<()> {
    let node = &demo.cluster.nodes[0].ns;
    let pod = Netns::new(&format!("{}-cni", demo.cluster.prefix))?;
    let data_dir = std::env::temp_dir().join(format!("lb-demo-cni-{}", std::process::id()));
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "demo", "type": "lb-cni", "pinDir": pin_dir, "agent": "127.0.0.1:9970",
        "ipam": {"type": "lb-cni", "subnet": "10.244.1.128/25", "dataDir": data_dir},
    });
    let netns = format!("/run/netns/{}", pod.name);
    let plugin = bin_dir.join("lb-cni");
    let env = |command: &str| cni::attachment_env(command, "demo-cni-0", Some(&netns), "eth0", ("demo", "cni-0"));
    println!("== pod networking: lb-cni ADD for a new pod (CNI 1.1.0, own IPAM from 10.244.1.128/25), as a container runtime runs it");
    let result = cni::invoke(&plugin, &node.name, &env("ADD"), conf.to_string().as_bytes())?.success()?;
    let pod_ip = result["ips"][0]["address"].as_str().unwrap_or_default().to_string();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    println!("   result: {pod_ip} on {} (host side {}), gateway {}", text(&result["interfaces"][1]["name"]), text(&result["interfaces"][0]["name"]), text(&result["ips"][0]["gateway"]));
    match tcp_request(&pod, sock([10, 96, 0, 10], 80), None, Duration::from_secs(2)) {
        Ok(a) => println!("   {:<44} answered by {} (it saw source {})", "new pod -> ClusterIP 10.96.0.10:80 (TCP)", a.backend, a.seen_source),
        Err(e) => println!("   new pod -> ClusterIP 10.96.0.10:80 FAILED: {e:#}"),
    }
    println!("== lbctl endpoint list");
    let out = Command::new("ip").args(["netns", "exec", &node.name]).arg(bin_dir.join("lbctl")).arg("--pin-dir").arg(pin_dir).args(["endpoint", "list"]).output().context("running lbctl")?;
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let deleted = cni::invoke(&plugin, &node.name, &env("DEL"), conf.to_string().as_bytes())?;
    let left = std::fs::read_dir(data_dir.join("demo")).map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("10.")).count()).unwrap_or(0);
    println!("   lb-cni DEL: {}; addresses still reserved: {left}", if deleted.ok { "ok" } else { "FAILED" });
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}

/// A NetworkPolicy from a manifest: only role=client pods reach the web pods, on "http". The
/// client pod still gets through the ClusterIP; the outside client and UDP are refused at the
/// pods; lbctl shows the policy, the identities and the pods' denials; removing the file opens
/// them again.
fn network_policy(bin_dir: &Path, demo: &Demo, pin_dir: &Path, workdir: &Path, policy: &Path, events_socket: &Path) -> Result<()> {
    let node = &demo.cluster.nodes[0].ns;
    println!("== NetworkPolicy: demo/web-from-clients lets only role=client pods reach app=web pods, on their \"http\" port ({})", policy.display());
    std::fs::copy(policy, workdir.join("network-policy.yaml")).with_context(|| format!("copying {}", policy.display()))?;
    let nodeport = sock([10, 99, 0, 1], 30080);
    let quick = Duration::from_millis(300);
    // Programmed when the outside client stops getting through.
    let refused = (0..40).any(|_| {
        let through = tcp_request(&demo.cluster.client, nodeport, None, quick).is_ok();
        if through {
            std::thread::sleep(Duration::from_millis(100));
        }
        !through
    });
    let outcome = |r: Result<Answer>| match r {
        Ok(a) => format!("answered by {} (it saw source {})", a.backend, a.seen_source),
        Err(_) => "refused (no answer)".to_string(),
    };
    println!("   {:<56} {}", "client pod (role=client) -> ClusterIP 10.96.0.10:80 TCP", outcome(tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, Duration::from_secs(2))));
    println!("   {:<56} {}", "client pod -> ClusterIP 10.96.0.10:7 UDP (not \"http\")", outcome(udp_request(demo.client_pod(), sock([10, 96, 0, 10], 7), 0, quick)));
    println!("   {:<56} {}", "outside client -> NodePort 10.99.0.1:30080", if refused { "refused (no answer)".to_string() } else { "still answered (FAILED)".to_string() });
    let lbctl = |args: &[&str]| -> Result<()> {
        println!("== lbctl {}", args.join(" "));
        let out = Command::new("ip").args(["netns", "exec", &node.name]).arg(bin_dir.join("lbctl")).arg("--pin-dir").arg(pin_dir).args(args).output().context("running lbctl")?;
        print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    lbctl(&["policy", "list"])?;
    lbctl(&["policy", "identities"])?;
    lbctl(&["policy", "endpoints"])?;
    lbctl(&["explain", "--from", "pod", "10.244.1.14:40000", "10.96.0.10:80/TCP"])?;
    lbctl(&["explain", "--from", "pod", "10.244.1.14:40000", "10.96.0.10:7/UDP"])?;
    println!("== lbctl observe --verdict allowed --last 2 (new flows the policy let in)");
    let out = Command::new(bin_dir.join("lbctl")).args(["observe", "--socket"]).arg(events_socket).args(["--verdict", "allowed", "--last", "2"]).output().context("running lbctl observe")?;
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(workdir.join("network-policy.yaml"))?;
    let open = (0..40).find_map(|_| tcp_request(&demo.cluster.client, nodeport, None, quick).ok().or_else(|| {
        std::thread::sleep(Duration::from_millis(100));
        None
    }));
    println!("   {:<56} {}", "policy file removed: outside client -> NodePort again", open.map_or("still refused (FAILED)".to_string(), |a| format!("answered by {}", a.backend)));
    Ok(())
}

/// A private copy of a manifest directory, removed on drop.
struct ManifestsCopy(PathBuf);

impl ManifestsCopy {
    fn of(dir: &Path) -> Result<Self> {
        let copy = std::env::temp_dir().join(format!("lb-demo-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&copy)?;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            std::fs::copy(&path, copy.join(path.file_name().context("a file name")?))?;
        }
        Ok(Self(copy))
    }
}

impl Drop for ManifestsCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn sock(addr: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(addr), port))
}
