//! lb-cni run as a container runtime runs it: `CNI_*` variables, the plugin configuration on
//! stdin, inside a node's network namespace, for pods that are real network namespaces. The
//! node runs lb-agent (standalone) with one ClusterIP Service whose backend is a pod on a
//! second node.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use aya::programs::{tc::TcAttachType, SchedClassifier};
use lb_agent::dataplane::endpoints::Endpoints;
use lb_cni::spec::Attachment;
use serde_json::{json, Value};
use testbed::{
    cni::{self, Reply},
    netns::{unique_prefix, Netns},
    process::AgentProcess,
    servers::{http_get, tcp_request, udp_request, EchoServer},
    topology::{Cluster, CLIENT_IP},
};

const TIMEOUT: Duration = Duration::from_secs(3);
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const CLUSTER_IP: [u8; 4] = [10, 96, 0, 30];

fn plugin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-cni"))
}

/// Built beside lb-cni by the workspace's test run.
fn agent_bin() -> PathBuf {
    plugin().with_file_name("lb-agent")
}

fn invoke(binary: &Path, node: &Netns, env: &[(&str, String)], stdin: &[u8]) -> Result<Reply> {
    cni::invoke(binary, &node.name, env, stdin)
}

fn cni_env(command: &str, container_id: &str, netns: Option<&str>, ifname: &str) -> Vec<(&'static str, String)> {
    cni::attachment_env(command, container_id, netns, ifname, ("shop", container_id))
}

/// A pod as the runtime sees it: a network namespace and a container ID.
struct PodNs {
    ns: Netns,
    id: String,
}

impl PodNs {
    fn path(&self) -> String {
        format!("/run/netns/{}", self.ns.name)
    }
}

/// What a test leaves behind on the node, to be compared with nothing.
#[derive(Debug, Default, PartialEq)]
struct Leftovers {
    reserved: Vec<String>,
    host_devices: Vec<String>,
    pod_routes: Vec<String>,
    endpoints: Vec<String>,
    link_pins: Vec<String>,
}

struct Bed {
    prefix: String,
    cluster: Cluster,
    agent: Option<AgentProcess>,
    pins: PathBuf,
    data_dir: PathBuf,
    manifests: PathBuf,
    _remote: EchoServer,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

impl Bed {
    /// Node A (index 0) for the plugin's pods, with an agent; node B with one pod, the
    /// backend of ClusterIP 10.96.0.30 (TCP 80 -> 8080, UDP 7 -> 7007).
    fn new(tag: &str) -> Result<Self> {
        let mut cluster = Cluster::new(tag, &[0, 1])?;
        let remote = EchoServer::start(&cluster.nodes[1].pods[0].ns, "remote-0", 8080, 7007)?;
        let prefix = unique_prefix(tag);
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        std::fs::create_dir_all(&manifests)?;
        std::fs::write(
            manifests.join("cluster.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: remote, namespace: shop}\nspec:\n  clusterIP: 10.96.0.30\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: echo, port: 7, protocol: UDP, targetPort: 7007}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: remote-1, namespace: shop, labels: {kubernetes.io/service-name: remote}}\naddressType: IPv4\n\
             ports: [{name: http, port: 8080}, {name: echo, port: 7007, protocol: UDP}]\nendpoints:\n- {addresses: [10.244.2.11], conditions: {ready: true}, nodeName: node-b}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24]}\n",
        )?;
        let pins = cluster.pin_dir()?;
        let agent = cluster.start_agent(&agent_bin(), 0, &["--manifests".to_string(), manifests.display().to_string()], &pins, &[])?;
        let data_dir = std::env::temp_dir().join(format!("{prefix}-ipam"));
        Ok(Self { prefix, cluster, agent: Some(agent), pins, data_dir, manifests, _remote: remote })
    }

    fn node(&self) -> &Netns {
        &self.cluster.nodes[0].ns
    }

    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version, "name": "lbnet", "type": "lb-cni", "mtu": 1400,
            "pinDir": self.pins, "agent": "127.0.0.1:9970",
            "ipam": {"type": "lb-cni", "subnet": "10.244.1.0/24", "dataDir": self.data_dir},
        })
    }

    fn pod(&self, name: &str) -> Result<PodNs> {
        Ok(PodNs { ns: Netns::new(&format!("{}-{name}", self.prefix))?, id: format!("{name}-{}", self.prefix) })
    }

    fn run(&self, command: &str, pod: &PodNs, conf: &Value) -> Result<Reply> {
        let path = pod.path();
        invoke(plugin(), self.node(), &cni_env(command, &pod.id, Some(&path), "eth0"), conf.to_string().as_bytes())
    }

    fn add(&self, pod: &PodNs, version: &str) -> Result<Value> {
        self.run("ADD", pod, &self.conf(version))?.success().with_context(|| format!("ADD of {} ({version})", pod.id))
    }

    fn with_prev(&self, version: &str, prev: &Value) -> Value {
        let mut conf = self.conf(version);
        conf["prevResult"] = prev.clone();
        conf
    }

    fn leftovers(&self) -> Result<Leftovers> {
        let dir = self.data_dir.join("lbnet");
        let mut reserved: Vec<String> = std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
        reserved.retain(|n| n.parse::<IpAddr>().is_ok());
        let host_devices = self.node().exec("ip -o link show")?.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap_or(n).to_string()).filter(|n| n.starts_with("lxc")).collect();
        let pod_routes = self.node().exec("ip route show")?.lines().filter(|l| l.starts_with("10.244.1.")).map(str::to_string).collect();
        let endpoints = Endpoints::open_pinned(&self.pins)?.list().into_iter().map(|(ip, e)| format!("{ip} {}", e.pod())).collect();
        let link_pins = std::fs::read_dir(self.pins.join("links"))?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains("-lxc")).collect::<BTreeSet<_>>().into_iter().collect();
        Ok(Leftovers { reserved, host_devices, pod_routes, endpoints, link_pins })
    }
}

fn address_of(result: &Value) -> Result<IpAddr> {
    let cidr = result["ips"][0]["address"].as_str().context("no address in the result")?;
    Ok(cidr.split('/').next().unwrap_or_default().parse()?)
}

#[test]
fn every_version_adds_checks_and_deletes_a_pod_that_reaches_gateway_pods_cluster_ip_and_another_node() -> Result<()> {
    let bed = Bed::new("cv")?;
    // A neighbour pod on the same node, with a server.
    let neighbour = bed.pod("nb")?;
    let neighbour_ip = address_of(&bed.add(&neighbour, "1.1.0")?)?;
    let _neighbour_server = EchoServer::start(&neighbour.ns, "neighbour", 8080, 7007)?;
    for version in VERSIONS {
        let v = invoke(plugin(), bed.node(), &[("CNI_COMMAND", "VERSION".into())], json!({"cniVersion": version}).to_string().as_bytes())?.success()?;
        assert_eq!(v["cniVersion"], version);
        assert_eq!(v["supportedVersions"], json!(VERSIONS));

        let pod = bed.pod(&format!("v{}", version.replace('.', "")))?;
        let result = bed.add(&pod, version)?;
        // The result in this version's format.
        assert_eq!(result["cniVersion"], version);
        let interfaces = result["interfaces"].as_array().context("interfaces")?;
        assert_eq!(interfaces.len(), 2, "{result}");
        assert!(interfaces[0]["name"].as_str().unwrap().starts_with("lxc") && interfaces[0].get("sandbox").is_none(), "{result}");
        assert_eq!((interfaces[1]["name"].as_str(), interfaces[1]["sandbox"].as_str()), (Some("eth0"), Some(pod.path().as_str())));
        assert_eq!(interfaces[1]["mac"].as_str().map(str::len), Some(17));
        let ip = &result["ips"][0];
        assert_eq!((ip["interface"].as_u64(), ip["gateway"].as_str()), (Some(1), Some("169.254.1.1")), "{result}");
        assert!(ip["address"].as_str().unwrap().ends_with("/32"));
        match version {
            "0.3.0" | "0.3.1" | "0.4.0" => assert_eq!(ip["version"], "4", "{version} results carry the IP version"),
            _ => assert!(ip.get("version").is_none(), "{version} results carry no IP version"),
        }
        assert_eq!(interfaces[1].get("mtu").is_some(), version == "1.1.0", "mtu is a 1.1.0 field: {result}");
        assert_eq!(result["routes"].as_array().map(|r| r.iter().any(|r| r.get("scope").is_some())), Some(version == "1.1.0"));
        assert!(result["routes"].as_array().unwrap().iter().any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == "169.254.1.1"));
        let pod_ip = address_of(&result)?;
        assert_eq!(pod.ns.exec("cat /sys/class/net/eth0/mtu")?.trim(), "1400", "the configured MTU");

        // CHECK: from 0.4.0; before it the spec has no CHECK and the plugin says so.
        let check = bed.run("CHECK", &pod, &bed.with_prev(version, &result))?;
        if version.starts_with("0.3") {
            assert_eq!((check.ok, check.code()), (false, 1), "{version}: {:?}", check.json);
        } else {
            assert!(check.ok, "{version}: CHECK after ADD: {}", check.json);
        }

        // The pod reaches the node at its gateway (the agent's health port there).
        let (status, _) = http_get(&pod.ns, SocketAddr::from(([169, 254, 1, 1], 9970)), "/healthz", TIMEOUT).with_context(|| format!("{version}: pod to its gateway"))?;
        assert_eq!(status, 200);
        let a = tcp_request(&pod.ns, SocketAddr::new(neighbour_ip, 8080), None, TIMEOUT).with_context(|| format!("{version}: pod to pod"))?;
        assert_eq!((a.backend.as_str(), a.seen_source), ("neighbour", pod_ip));
        let a = tcp_request(&pod.ns, SocketAddr::from((CLUSTER_IP, 80)), None, TIMEOUT).with_context(|| format!("{version}: pod to ClusterIP"))?;
        assert_eq!((a.backend.as_str(), a.seen_source), ("remote-0", pod_ip), "{version}: the ClusterIP's backend on node B sees the pod");
        let a = udp_request(&pod.ns, SocketAddr::from((CLUSTER_IP, 7)), 0, TIMEOUT).with_context(|| format!("{version}: pod to ClusterIP over UDP"))?;
        assert_eq!(a.backend, "remote-0");
        let remote_pod = SocketAddr::new(bed.cluster.nodes[1].pods[0].ip.into(), 8080);
        let a = tcp_request(&pod.ns, remote_pod, None, TIMEOUT).with_context(|| format!("{version}: pod to a pod on node B"))?;
        assert_eq!((a.backend.as_str(), a.seen_source), ("remote-0", pod_ip));

        // One TC program each way on the host side, however the agent's own discovery raced the ADD.
        let device = interfaces[0]["name"].as_str().unwrap();
        assert_eq!(tcx_programs(&bed, device)?, ["lb_tc", "lb_tc_to_pod"], "{version}: programs on {device}");
        // The endpoint map and lbctl name the pod.
        let endpoints = Endpoints::open_pinned(&bed.pins)?;
        let entry = endpoints.get(pod_ip).context("no endpoint entry")?;
        assert_eq!(entry.pod(), format!("shop/{}", pod.id));
        assert_eq!(entry.ifindex.to_string(), bed.node().exec(&format!("cat /sys/class/net/{}/ifindex", interfaces[0]["name"].as_str().unwrap()))?.trim());

        bed.run("DEL", &pod, &bed.with_prev(version, &result))?.success().with_context(|| format!("{version}: DEL"))?;
        assert!(Endpoints::open_pinned(&bed.pins)?.get(pod_ip).is_none(), "{version}: DEL removes the endpoint");
    }
    let lbctl = Command::new("ip").args(["netns", "exec", &bed.node().name]).arg(plugin().with_file_name("lbctl")).args(["--pin-dir", &bed.pins.display().to_string(), "endpoint", "list", "-o", "json"]).output()?;
    let listed: Value = serde_json::from_slice(&lbctl.stdout).with_context(|| String::from_utf8_lossy(&lbctl.stderr).into_owned())?;
    assert_eq!(listed, json!([{"address": neighbour_ip.to_string(), "pod": format!("shop/{}", neighbour.id), "device": neighbour_device(&bed, &neighbour)?, "ifindex": listed[0]["ifindex"], "mac": neighbour.ns.mac("eth0")?}]));
    bed.run("DEL", &neighbour, &bed.conf("1.1.0"))?.success()?;
    assert_eq!(bed.leftovers()?, Leftovers::default());
    Ok(())
}

/// The names of the TCX programs on node A's `device`, ingress then egress (this bpftool
/// predates TCX).
fn tcx_programs(bed: &Bed, device: &str) -> Result<Vec<String>> {
    let ifindex: u32 = bed.node().exec(&format!("cat /sys/class/net/{device}/ifindex"))?.trim().parse()?;
    let mut names = Vec::new();
    for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
        let (_, programs) = bed.node().run(move || SchedClassifier::query_tcx(ifindex, direction))??;
        names.extend(programs.iter().map(|p| p.name_as_str().unwrap_or_default().to_string()));
    }
    Ok(names)
}

fn neighbour_device(bed: &Bed, pod: &PodNs) -> Result<String> {
    let device = Attachment { container_id: pod.id.clone(), ifname: "eth0".into() }.host_device();
    ensure!(bed.node().exec(&format!("cat /sys/class/net/{device}/ifindex")).is_ok(), "no device {device}");
    Ok(device)
}

#[test]
fn bad_requests_get_the_spec_error_and_leave_nothing_behind() -> Result<()> {
    let bed = Bed::new("ce")?;
    let pod = bed.pod("p")?;
    // ADD of an interface that exists.
    pod.ns.exec("ip link add eth0 type veth peer name eth0peer")?;
    let reply = bed.run("ADD", &pod, &bed.conf("1.1.0"))?;
    assert!(!reply.ok && reply.json["msg"].as_str().unwrap().contains("eth0 already exists"), "{}", reply.json);
    assert_eq!(reply.json["cniVersion"], "1.1.0");
    assert_eq!(bed.leftovers()?, Leftovers::default(), "a refused ADD reserves nothing");
    pod.ns.exec("ip link del eth0")?;

    let cases: [(&str, Vec<(&str, String)>, Vec<u8>, u64); 6] = [
        ("malformed config", cni_env("ADD", &pod.id, Some(&pod.path()), "eth0"), b"{\"cniVersion\": \"1.1.0\", \"name\": ".to_vec(), 6),
        ("not UTF-8", cni_env("ADD", &pod.id, Some(&pod.path()), "eth0"), b"\xff\xfe{}".to_vec(), 6),
        ("unknown version", cni_env("ADD", &pod.id, Some(&pod.path()), "eth0"), bed.conf("9.9.9").to_string().into_bytes(), 1),
        ("missing CNI_NETNS", cni_env("ADD", &pod.id, None, "eth0"), bed.conf("1.1.0").to_string().into_bytes(), 4),
        ("netns that does not exist", cni_env("ADD", &pod.id, Some("/run/netns/lb-no-such-netns"), "eth0"), bed.conf("1.1.0").to_string().into_bytes(), 3),
        ("no ipam", cni_env("ADD", &pod.id, Some(&pod.path()), "eth0"), json!({"cniVersion": "1.1.0", "name": "lbnet", "type": "lb-cni", "pinDir": bed.pins}).to_string().into_bytes(), 7),
    ];
    for (what, env, stdin, code) in cases {
        let reply = invoke(plugin(), bed.node(), &env, &stdin)?;
        assert!(!reply.ok, "{what}: must fail");
        assert_eq!(reply.code(), code, "{what}: {}", reply.json);
        assert_eq!(bed.leftovers()?, Leftovers::default(), "{what} leaves nothing behind");
    }

    // CHECK fails once the pod's address is gone.
    let result = bed.add(&pod, "1.1.0")?;
    let ip = address_of(&result)?;
    assert!(bed.run("CHECK", &pod, &bed.with_prev("1.1.0", &result))?.ok);
    pod.ns.exec(&format!("ip addr del {ip}/32 dev eth0"))?;
    let check = bed.run("CHECK", &pod, &bed.with_prev("1.1.0", &result))?;
    assert!(!check.ok && check.json["msg"].as_str().unwrap().contains(&ip.to_string()), "{}", check.json);
    bed.run("DEL", &pod, &bed.conf("1.1.0"))?.success()?;
    assert_eq!(bed.leftovers()?, Leftovers::default());
    Ok(())
}

#[test]
fn del_is_idempotent_and_frees_the_address_after_the_namespace_is_gone() -> Result<()> {
    let bed = Bed::new("cd")?;
    let pod = bed.pod("p")?;
    let result = bed.add(&pod, "1.0.0")?;
    let ip = address_of(&result)?;
    bed.run("DEL", &pod, &bed.with_prev("1.0.0", &result))?.success()?;
    bed.run("DEL", &pod, &bed.with_prev("1.0.0", &result))?.success().context("a second DEL")?;
    assert_eq!(bed.leftovers()?, Leftovers::default());

    let gone = bed.pod("gone")?;
    let result = bed.add(&gone, "1.1.0")?;
    let gone_ip = address_of(&result)?;
    assert_ne!(gone_ip, ip, "a freed address is not handed out again at once");
    assert_eq!(bed.leftovers()?.reserved, vec![gone_ip.to_string()]);
    let path = gone.path();
    let id = gone.id.clone();
    drop(gone.ns);
    let env = cni_env("DEL", &id, Some(&path), "eth0");
    invoke(plugin(), bed.node(), &env, bed.with_prev("1.1.0", &result).to_string().as_bytes())?.success().context("DEL after the namespace is deleted")?;
    invoke(plugin(), bed.node(), &cni_env("DEL", &id, None, "eth0"), bed.conf("1.1.0").to_string().as_bytes())?.success().context("DEL without CNI_NETNS")?;
    assert_eq!(bed.leftovers()?, Leftovers::default());
    Ok(())
}

#[test]
fn concurrent_adds_get_distinct_addresses_and_200_cycles_leave_nothing() -> Result<()> {
    let bed = Bed::new("cc")?;
    let pods: Vec<PodNs> = (0..30).map(|i| bed.pod(&format!("c{i}"))).collect::<Result<_>>()?;
    let node = bed.node().name.clone();
    let conf = bed.conf("1.1.0").to_string();
    let handles: Vec<_> = pods
        .iter()
        .map(|p| {
            let (node, conf, path, id) = (node.clone(), conf.clone(), p.path(), p.id.clone());
            std::thread::spawn(move || -> Result<Value> { cni::invoke(plugin(), &node, &cni_env("ADD", &id, Some(&path), "eth0"), conf.as_bytes())?.success() })
        })
        .collect();
    // Every thread joined before any error is returned: none outlives the test bed.
    let joined: Vec<Result<Value>> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
    let results: Vec<Value> = joined.into_iter().collect::<Result<_>>()?;
    let addresses: BTreeSet<IpAddr> = results.iter().map(address_of).collect::<Result<_>>()?;
    assert_eq!(addresses.len(), 30, "30 concurrent ADDs, 30 distinct addresses");
    assert_eq!(bed.leftovers()?.reserved.len(), 30);
    assert_eq!(Endpoints::open_pinned(&bed.pins)?.list().len(), 30);
    for p in &pods {
        bed.run("DEL", p, &bed.conf("1.1.0"))?.success()?;
    }
    assert_eq!(bed.leftovers()?, Leftovers::default());

    let pod = bed.pod("cycle")?;
    let started = std::time::Instant::now();
    for i in 0..200 {
        let version = VERSIONS[i % VERSIONS.len()];
        bed.add(&pod, version).with_context(|| format!("cycle {i}"))?;
        bed.run("DEL", &pod, &bed.conf(version))?.success().with_context(|| format!("cycle {i}"))?;
    }
    eprintln!("200 ADD/DEL cycles (each a process per command, as a runtime runs them) took {:.2} s", started.elapsed().as_secs_f64());
    assert_eq!(bed.leftovers()?, Leftovers::default(), "200 ADD/DEL cycles leave nothing");
    assert!(pod.ns.exec("ip -o link show")?.lines().all(|l| !l.contains("eth0")));
    Ok(())
}

#[test]
fn portmap_chained_after_lb_cni_gets_a_correct_prev_result() -> Result<()> {
    let portmap = Path::new("/usr/lib/cni/portmap");
    ensure!(portmap.exists(), "Debian's containernetworking-plugins is not installed (scripts/setup.sh installs it)");
    let bed = Bed::new("cp")?;
    let pod = bed.pod("web")?;
    // portmap 1.1.1 speaks up to 1.0.0: the network's version.
    let result = bed.add(&pod, "1.0.0")?;
    let pod_ip = address_of(&result)?;
    let _server = EchoServer::start(&pod.ns, "web", 8080, 7007)?;
    let chained = json!({
        "cniVersion": "1.0.0", "name": "lbnet", "type": "portmap", "capabilities": {"portMappings": true}, "backend": "iptables",
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]},
        "prevResult": result,
    });
    let env = cni_env("ADD", &pod.id, Some(&pod.path()), "eth0");
    let out = invoke(portmap, bed.node(), &env, chained.to_string().as_bytes())?.success().context("portmap ADD")?;
    assert_eq!(address_of(&out)?, pod_ip, "portmap passes the result on");
    // Its rule sends the node's port 18080 to the address it read from prevResult.
    let a = tcp_request(&bed.cluster.client, SocketAddr::from(([10, 99, 0, 1], 18080)), None, TIMEOUT).context("outside client to the mapped host port")?;
    assert_eq!((a.backend.as_str(), a.seen_source), ("web", IpAddr::V4(CLIENT_IP)));
    let del = cni_env("DEL", &pod.id, Some(&pod.path()), "eth0");
    invoke(portmap, bed.node(), &del, json!({"cniVersion": "1.0.0", "name": "lbnet", "type": "portmap", "backend": "iptables", "runtimeConfig": chained["runtimeConfig"], "prevResult": out}).to_string().as_bytes())?.success()?;
    bed.run("DEL", &pod, &bed.with_prev("1.0.0", &result))?.success()?;
    assert_eq!(bed.leftovers()?, Leftovers::default());
    Ok(())
}

#[test]
fn gc_frees_exactly_the_attachments_not_listed_and_status_follows_the_agent() -> Result<()> {
    let mut bed = Bed::new("cg")?;
    let pods: Vec<PodNs> = ["a", "b", "c"].iter().map(|n| bed.pod(n)).collect::<Result<_>>()?;
    let results: Vec<Value> = pods.iter().map(|p| bed.add(p, "1.1.0")).collect::<Result<_>>()?;
    let mut gc = bed.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": pods[0].id, "ifname": "eth0"}]);
    invoke(plugin(), bed.node(), &[("CNI_COMMAND", "GC".into()), ("CNI_PATH", "/usr/lib/cni".into())], gc.to_string().as_bytes())?.success()?;
    let left = bed.leftovers()?;
    assert_eq!(left.reserved, vec![address_of(&results[0])?.to_string()]);
    assert_eq!(left.endpoints, vec![format!("{} shop/{}", address_of(&results[0])?, pods[0].id)]);
    assert_eq!(left.host_devices.len(), 1);
    assert_eq!(left.link_pins, vec![format!("tc-{}", left.host_devices[0]), format!("to-pod-{}", left.host_devices[0])]);
    assert!(bed.run("CHECK", &pods[0], &bed.with_prev("1.1.0", &results[0]))?.ok, "the valid attachment is untouched");
    for gone in &pods[1..] {
        assert!(gone.ns.exec("ip -o link show")?.lines().all(|l| !l.contains("eth0")), "GC removed {}'s veth", gone.id);
    }

    // STATUS: ready with the agent, code 50 without it.
    let status = |bed: &Bed| invoke(plugin(), bed.node(), &[("CNI_COMMAND", "STATUS".into()), ("CNI_PATH", "/usr/lib/cni".into())], bed.conf("1.1.0").to_string().as_bytes());
    assert!(status(&bed)?.ok, "{:?}", status(&bed)?.json);
    // Without ipam.subnet the range is the Node's spec.podCIDR, from the agent.
    let mut from_node = bed.conf("1.1.0");
    from_node["ipam"].as_object_mut().unwrap().remove("subnet");
    let pod = bed.pod("d")?;
    let result = bed.run("ADD", &pod, &from_node)?.success()?;
    assert!(address_of(&result)?.to_string().starts_with("10.244.1."), "{result}");
    bed.run("DEL", &pod, &from_node)?.success()?;
    bed.agent.take();
    // The datapath outlives the agent: the kept pod still reaches the ClusterIP.
    let a = tcp_request(&pods[0].ns, SocketAddr::from((CLUSTER_IP, 80)), None, TIMEOUT).context("ClusterIP with the agent stopped")?;
    assert_eq!((a.backend.as_str(), a.seen_source), ("remote-0", address_of(&results[0])?));
    let down = status(&bed)?;
    assert_eq!((down.ok, down.code()), (false, 50), "{}", down.json);
    let add = bed.run("ADD", &pod, &from_node)?;
    assert_eq!((add.ok, add.code()), (false, 11), "no range without the agent: try again later: {}", add.json);
    // A new agent adopts the pod's pinned link (its program replaced in place, no second one).
    bed.agent = Some(bed.cluster.start_agent(&agent_bin(), 0, &["--manifests".to_string(), bed.manifests.display().to_string()], &bed.pins, &[])?);
    assert!(status(&bed)?.ok);
    assert!(bed.run("CHECK", &pods[0], &bed.with_prev("1.1.0", &results[0]))?.ok);
    let device = &bed.leftovers()?.host_devices[0];
    assert_eq!(tcx_programs(&bed, device)?, ["lb_tc", "lb_tc_to_pod"], "one program each way on {device} after the agent's restart");
    let a = tcp_request(&pods[0].ns, SocketAddr::from((CLUSTER_IP, 80)), None, TIMEOUT).context("ClusterIP after the agent's restart")?;
    assert_eq!(a.backend, "remote-0");
    bed.run("DEL", &pods[0], &bed.conf("1.1.0"))?.success()?;
    assert_eq!(bed.leftovers()?, Leftovers::default());
    Ok(())
}

#[test]
fn another_ipam_plugin_is_delegated_to() -> Result<()> {
    let bed = Bed::new("ch")?;
    let host_local_dir = bed.data_dir.join("host-local");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "lbnet", "type": "lb-cni", "pinDir": bed.pins,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.100", "rangeEnd": "10.244.1.110"}]], "dataDir": host_local_dir},
    });
    let pod = bed.pod("p")?;
    let result = bed.run("ADD", &pod, &conf)?.success()?;
    let ip = address_of(&result)?;
    assert!(ip.to_string().starts_with("10.244.1.1") && ip.to_string().len() == 12, "from host-local's range: {result}");
    assert!(host_local_dir.join("lbnet").join(ip.to_string()).exists(), "host-local holds the reservation");
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    bed.run("CHECK", &pod, &with_prev)?.success().context("CHECK, host-local's too")?;
    let a = tcp_request(&pod.ns, SocketAddr::from((CLUSTER_IP, 80)), None, TIMEOUT)?;
    assert_eq!((a.backend.as_str(), a.seen_source), ("remote-0", ip));
    bed.run("DEL", &pod, &with_prev)?.success()?;
    assert!(!host_local_dir.join("lbnet").join(ip.to_string()).exists(), "DEL is passed to host-local");
    assert_eq!(bed.leftovers()?, Leftovers::default());
    Ok(())
}
