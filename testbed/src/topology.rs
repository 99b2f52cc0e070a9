//! Network-namespace topologies with real servers, for the demo and the end-to-end tests.
//! Every namespace, link, mount and process made here is removed when its guard drops.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use lb_agent::dataplane::load::{self, MapSizes};

use crate::{
    bpffs::{BpfMount, CgroupMount},
    netns::{sh, unique_prefix, Netns},
    process::AgentProcess,
};

/// A pod: its namespace, its addresses, and the host-side device on its node.
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub host_dev: String,
}

/// A node namespace with an external device `eth0` on the LAN, and pods behind `lxc<N>` devices.
pub struct Node {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub pods: Vec<Pod>,
}

/// Several nodes and an outside client on one dual-stack LAN (a bridge in its own namespace).
/// Addresses: LAN 10.99.0.0/24 and fd00:99::/64 (client .100 and ::100, nodes .1, .2, ... and
/// ::1, ::2, ...), pods of node N in 10.244.N.0/24 and fd00:244:N::/64 (the same last byte).
pub struct Cluster {
    pub prefix: String,
    // Dropped in field order: pods and nodes first, then the client, then the LAN.
    pub nodes: Vec<Node>,
    pub client: Netns,
    pub lan: Netns,
    /// `lb_xdp_pass` on the LAN side of every node's `eth0`: a veth delivers native XDP_TX
    /// frames only to a peer that runs XDP (real NICs have no such rule).
    peer_xdp: Option<aya::Ebpf>,
    pub bpffs: Vec<BpfMount>,
    /// Where agents attach their socket hooks (`--cgroup-root`).
    pub cgroup: CgroupMount,
}

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x100);

/// Node `n`'s LAN address of each family.
fn node_ips(n: usize) -> (Ipv4Addr, Ipv6Addr) {
    (Ipv4Addr::new(10, 99, 0, n as u8), Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, n as u16))
}

/// The addresses of pod `p` of node `n`.
pub fn pod_ips(n: usize, p: usize) -> (Ipv4Addr, Ipv6Addr) {
    (Ipv4Addr::new(10, 244, n as u8, 11 + p as u8), Ipv6Addr::new(0xfd00, 0x244, n as u16, 0, 0, 0, 0, 0x11 + p as u16))
}
/// veths hand each other packets whose checksum is left to "hardware" (CHECKSUM_PARTIAL). XDP
/// sees no skb flags, and a frame it sends back out (XDP_TX) would carry that half-done
/// checksum; a wire delivers complete ones. Filling them in at the sender makes veths behave
/// like the wire.
fn no_tx_csum_offload(dev: &str) -> String {
    format!("ethtool -K {dev} tx off >/dev/null")
}

/// The addresses pods use as their gateway (Calico-style: link-local, answered by the host).
const POD_GATEWAY: &str = "169.254.1.1";
const POD_GATEWAY6: &str = "fe80::1";

impl Cluster {
    /// `pods_per_node[i]` pods on node i. Load-balancer and external IPs (10.99.100.0/24,
    /// 10.99.200.0/24, fd00:99:100::/64, fd00:99:200::/64) are routed by the client to the first node.
    pub fn new(tag: &str, pods_per_node: &[usize]) -> Result<Self> {
        let prefix = unique_prefix(tag);
        let lan = Netns::new(&format!("{prefix}-lan"))?;
        lan.exec("ip link add br0 type bridge && ip link set br0 up")?;
        let client = Netns::new(&format!("{prefix}-cl"))?;
        let cgroup = CgroupMount::new(&prefix)?;
        let mut cluster = Self { prefix: prefix.clone(), nodes: Vec::new(), client, lan, peer_xdp: None, bpffs: Vec::new(), cgroup };
        cluster.plug(&cluster.client.name.clone(), "eth0", CLIENT_IP, CLIENT_IP6, 0)?;
        cluster.client.exec("ip route add 10.99.100.0/24 via 10.99.0.1 && ip route add 10.99.200.0/24 via 10.99.0.1")?;
        cluster.client.exec("ip -6 route add fd00:99:100::/64 via fd00:99::1 && ip -6 route add fd00:99:200::/64 via fd00:99::1")?;

        for (i, &pods) in pods_per_node.iter().enumerate() {
            let n = i + 1;
            let ns = Netns::new(&format!("{prefix}-n{n}"))?;
            let (ip, ip6) = node_ips(n);
            cluster.plug(&ns.name, "eth0", ip, ip6, n)?;
            ns.exec("sysctl -qw net.ipv4.conf.all.forwarding=1 && sysctl -qw net.ipv6.conf.all.forwarding=1")?;
            let mut node = Node { ns, ip, ip6, pods: Vec::new() };
            for p in 0..pods {
                node.pods.push(add_pod(&node.ns, &format!("{prefix}-n{n}p{p}"), pod_ips(n, p), &format!("lxc{p}"))?);
            }
            cluster.nodes.push(node);
        }
        cluster.attach_peer_xdp(pods_per_node.len())?;
        // Every node routes the other nodes' pod ranges through them.
        for a in &cluster.nodes {
            for b in &cluster.nodes {
                if a.ip != b.ip {
                    let n = b.ip.octets()[3];
                    a.ns.exec(&format!("ip route add 10.244.{n}.0/24 via {} && ip -6 route add fd00:244:{n}::/64 via {}", b.ip, b.ip6))?;
                }
            }
        }
        Ok(cluster)
    }

    /// Takes `lb_xdp_pass` off the LAN side of the nodes' `eth0`: the veth then delivers native
    /// XDP_TX frames late, as on a kind node whose peer runs no XDP.
    pub fn without_peer_xdp(&mut self) {
        self.peer_xdp = None;
    }

    fn attach_peer_xdp(&mut self, nodes: usize) -> Result<()> {
        let mount = BpfMount::new(&format!("{}peer", self.prefix))?;
        let pin_dir = mount.dir.clone();
        self.bpffs.push(mount);
        let ports: Vec<u32> = (1..=nodes)
            .map(|n| Ok(self.lan.exec(&format!("cat /sys/class/net/p{n}/ifindex"))?.trim().parse()?))
            .collect::<Result<_>>()?;
        let ebpf = self.lan.run(move || -> Result<aya::Ebpf> {
            // Only the program is used: keep its maps as small as they go.
            let tiny = MapSizes { flows: Some(1), maglev_slots: Some(1), services: Some(1), backends: Some(1), sockets: Some(1), affinity: Some(1), policy_flows: Some(1), ipcache: Some(1), policy_rules: Some(1), event_ring: Some(4096), next_hops: Some(1) };
            let mut ebpf = load::load(&pin_dir, &tiny)?;
            let prog: &mut aya::programs::Xdp = ebpf.program_mut(load::XDP_PASS_PROGRAM).context("no lb_xdp_pass")?.try_into()?;
            prog.load()?;
            for ifindex in ports {
                prog.attach(ifindex, aya::programs::XdpMode::Driver)?;
            }
            Ok(ebpf)
        })??;
        self.peer_xdp = Some(ebpf);
        Ok(())
    }

    /// Connects `ns` to the LAN bridge with a veth named `dev`. IPv6 addresses skip duplicate
    /// address detection: they are usable at once.
    fn plug(&self, ns: &str, dev: &str, ip: Ipv4Addr, ip6: Ipv6Addr, index: usize) -> Result<()> {
        let port = format!("p{index}");
        self.lan.exec(&format!("ip link add {port} type veth peer name {dev} netns {ns} && ip link set {port} master br0 && ip link set {port} up && {}", no_tx_csum_offload(&port)))?;
        sh(&format!("ip netns exec {ns} sh -c 'ip addr add {ip}/24 dev {dev} && ip -6 addr add {ip6}/64 dev {dev} nodad && ip link set {dev} up && {}'", no_tx_csum_offload(dev)))?;
        Ok(())
    }

    /// The name node `i` has in manifests: node-a, node-b, ...
    pub fn node_name(i: usize) -> String {
        format!("node-{}", (b'a' + i as u8) as char)
    }

    /// Starts lb-agent on node `i` (as `node_name(i)`, XDP on its eth0) with the given source
    /// flags and maps pinned in `pin_dir`, and waits until it has programmed the maps.
    pub fn start_agent(&self, agent_bin: &Path, i: usize, source: &[String], pin_dir: &Path, extra: &[&str]) -> Result<AgentProcess> {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("{}-agent-{n}.log", self.prefix));
        let mut args: Vec<String> = source.to_vec();
        let pin_dir = pin_dir.display().to_string();
        let node_name = Self::node_name(i);
        let cgroup = self.cgroup.dir.display().to_string();
        args.extend(["--node-name", &node_name, "--external-devices", "eth0", "--pin-dir", &pin_dir, "--sync-interval-ms", "100", "--cgroup-root", &cgroup].iter().map(|s| s.to_string()));
        // The LAN ports run XDP (see `peer_xdp`), so native XDP delivers at once; a test that
        // wants another mode says so.
        // Each agent its own flow-event socket (the default is one per node).
        let socket = match extra.iter().position(|a| *a == "--events-socket") {
            Some(i) => PathBuf::from(extra.get(i + 1).copied().unwrap_or_default()),
            None => {
                let socket = std::env::temp_dir().join(format!("{}-agent-{n}.sock", self.prefix));
                args.extend(["--events-socket".to_string(), socket.display().to_string()]);
                socket
            }
        };
        if !extra.contains(&"--xdp-mode") {
            args.extend(["--xdp-mode".to_string(), "native".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut agent = AgentProcess::start(agent_bin, &self.nodes[i].ns, &args, &log)?;
        agent.leaves.push(socket);
        agent.wait_for_log("programmed", Duration::from_secs(20))?;
        Ok(agent)
    }

    /// A bpffs for an agent on node `i`, mounted where `ip netns exec` still sees it.
    pub fn pin_dir(&mut self) -> Result<PathBuf> {
        let mount = BpfMount::new(&self.prefix)?;
        let dir = mount.dir.clone();
        self.bpffs.push(mount);
        Ok(dir)
    }
}

/// A dual-stack pod namespace behind a veth: `/32` and `/128` routes on the node, default
/// routes via link-local gateways in the pod, static neighbours both ways.
pub fn add_pod(node: &Netns, name: &str, (ip, ip6): (Ipv4Addr, Ipv6Addr), host_dev: &str) -> Result<Pod> {
    let ns = Netns::new(name)?;
    node.exec(&format!("ip link add {host_dev} type veth peer name eth0 netns {name} && ip link set {host_dev} up && {}", no_tx_csum_offload(host_dev)))?;
    ns.exec(&no_tx_csum_offload("eth0"))?;
    ns.exec(&format!("ip addr add {ip}/32 dev eth0 && ip -6 addr add {ip6}/128 dev eth0 nodad && ip link set eth0 up"))?;
    ns.exec(&format!("ip route add {POD_GATEWAY} dev eth0 scope link && ip route add default via {POD_GATEWAY} dev eth0 && ip -6 route add default via {POD_GATEWAY6} dev eth0"))?;
    let host_mac = node.mac(host_dev)?;
    let pod_mac = ns.mac("eth0")?;
    ns.exec(&format!("ip neigh add {POD_GATEWAY} lladdr {host_mac} dev eth0 nud permanent && ip -6 neigh add {POD_GATEWAY6} lladdr {host_mac} dev eth0 nud permanent"))?;
    node.exec(&format!("ip route add {ip}/32 dev {host_dev} && ip neigh add {ip} lladdr {pod_mac} dev {host_dev} nud permanent"))?;
    node.exec(&format!("ip -6 route add {ip6}/128 dev {host_dev} && ip -6 neigh add {ip6} lladdr {pod_mac} dev {host_dev} nud permanent"))?;
    Ok(Pod { ns, ip, ip6, host_dev: host_dev.to_string() })
}

