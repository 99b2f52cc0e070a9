//! The agent's main loop: load and attach the programs, then keep the maps equal to what the
//! manifests say, the pod devices covered, the node addresses current and conntrack collected.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{atomic::AtomicBool, Arc},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        CgroupSock, CgroupSockAddr, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf,
};
use lb_common::*;
use log::{debug, error, info, warn};

use crate::{
    announce, ipam,
    dataplane::{
        conntrack,
        load::{self, MapSizes},
        maps::Maps,
        Dataplane, Frontend, FrontendKey,
    },
    node,
    health::{ProxyHealth, ServiceHealthServers},
    source::{objects::Dirty, Source, SourceConfig},
    translate::{self, Claim, ServiceName, SharedClaims},
};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: SourceConfig,
    pub node_name: String,
    pub node_ip: Option<Ipv4Addr>,
    pub external_devices: Vec<String>,
    /// `None`: auto, chosen per device (see [`xdp_mode_for`]).
    pub xdp_mode: Option<XdpMode>,
    pub pod_device_patterns: Vec<String>,
    pub pod_devices_from_routes: bool,
    pub pin_dir: PathBuf,
    pub maglev_min_table: u32,
    pub hash_seed: u32,
    pub sync_interval: Duration,
    pub gc_interval: Duration,
    pub sizes: MapSizes,
    /// NodePorts answer only on node addresses inside these CIDRs (kube-proxy's
    /// `--nodeport-addresses`); empty: on every address.
    pub nodeport_cidrs: Vec<(Ipv4Addr, u8)>,
    /// Socket-level balancing for the node's own processes: the cgroup v2 whose sockets the
    /// hooks see (the root: every process), or `None` to leave them untranslated.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// Answer ARP and NDP for the pool addresses this node owns, and announce them.
    pub l2_announce: bool,
    /// Enforce NetworkPolicy on this node's pods.
    pub network_policy: bool,
    /// Flow events: what the programs emit and how fast, how many the agent keeps, where it
    /// serves them.
    pub events: EventsConfig,
    /// The heartbeat (Kubernetes mode); its timeout also bounds how long this node answers for
    /// an address after it last confirmed it may (both modes).
    pub heartbeat: crate::heartbeat::HeartbeatConfig,
}


#[derive(Clone, Debug)]
pub struct EventsConfig {
    /// `EVENT_DROP` bits; 0: none.
    pub kinds: u32,
    /// Events a second per CPU, and the burst.
    pub rate: u32,
    pub burst: u32,
    /// Events kept in memory.
    pub buffer: usize,
    pub socket: PathBuf,
}

pub struct Agent {
    cfg: AgentConfig,
    ebpf: Ebpf,
    dataplane: Dataplane,
    netlink: rtnetlink::Handle,
    source: Source,
    /// What each Service asks for (its last good translation: a Service whose manifest turns
    /// bad keeps it) and holds: a frontend two Services claim stays with its holder. Before
    /// the first sync, holders are read back from the pinned names, so they hold across restarts.
    claims: translate::Claims,
    health_checks: BTreeMap<ServiceName, translate::HealthCheck>,
    reported: Reported,
    health_servers: ServiceHealthServers,
    /// Cgroup ids the socket hooks skip (opted-out pods).
    sock_skip: BTreeSet<u64>,
    /// kube-proxy's notion of health: synced, and syncs succeeding.
    pub proxy_health: ProxyHealth,
    /// Programs attached to pod devices: (ifindex, program) -> device.
    tc_links: HashMap<(u32, &'static str), String>,
    node_ips: Vec<(IpAddr, u32)>,
    /// Every address of the node, link-local ones too: the node itself to NetworkPolicy.
    host_ips: Vec<IpAddr>,
    /// NetworkPolicy enforcement (none when --network-policy=false), and the node addresses
    /// it was last compiled with.
    policy: Option<crate::netpol::NetworkPolicies>,
    policy_host_ips: Option<Vec<IpAddr>>,
    last_gc: Option<Instant>,
    synced_once: bool,
    /// Turns true after the first full sync was programmed (the readiness probe).
    pub ready: Arc<AtomicBool>,
    /// CLOCK_MONOTONIC ns of the last loop iteration (the liveness probe).
    pub heartbeat_ns: Arc<std::sync::atomic::AtomicU64>,
    /// Conntrack fill as the last GC pass counted it, for the metrics.
    pub conntrack_fill: Arc<crate::metrics::ConntrackFill>,
    /// The newest endpoint-change trigger time programmed per Service: each change is
    /// measured once. Changes from before the agent started are not measured (as kube-proxy).
    programmed_triggers: HashMap<ServiceName, jiff::Timestamp>,
    started_at: jiff::Timestamp,
    /// What `lbctl status` is told.
    pub status: crate::status::SharedStatus,
    /// Pool addresses given to LoadBalancer Services (by this agent's computation, which every
    /// agent shares), and why some have none.
    assignments: BTreeMap<ServiceName, ipam::Assignment>,
    /// LoadBalancer addresses an earlier agent programmed, by Service: held across restarts.
    assigned_at_start: HashMap<ServiceName, Vec<IpAddr>>,
    announcements: announce::Announcements,
    devices: Vec<announce::Device>,
    sender: Option<announce::Sender>,
    heartbeat: Option<crate::heartbeat::Heartbeat>,
    /// Assignments written to Service status and Events published, so that each is sent once.
    status_sent: HashMap<ServiceName, (Vec<IpAddr>, Instant)>,
    events_sent: BTreeSet<(ServiceName, String)>,
    /// Flow events the datapath emitted, and the names they are given.
    pub flow_events: Arc<crate::events::EventLog>,
    event_names: crate::events::SharedNames,
}

impl Agent {
    pub async fn start(cfg: AgentConfig) -> Result<Self> {
        let counters_pinned = [MAP_SERVICE_STATS, MAP_BACKEND_STATS].iter().any(|map| load::pin_path(&cfg.pin_dir, map).exists());
        let mut ebpf = load::load(&cfg.pin_dir, &cfg.sizes)?;
        let xdp: &mut Xdp = ebpf.program_mut(load::XDP_PROGRAM).context("no XDP program")?.try_into()?;
        xdp.load().context("loading lb_xdp")?;
        let tc: &mut SchedClassifier = ebpf.program_mut(load::TC_PROGRAM).context("no TC program")?.try_into()?;
        tc.load().context("loading lb_tc")?;
        load::pin_program(&cfg.pin_dir, load::TC_PROGRAM, tc)?;
        let to_pod: &mut SchedClassifier = ebpf.program_mut(load::TC_TO_POD_PROGRAM).context("no TC to-pod program")?.try_into()?;
        let to_pod_pin = load::programs_dir(&cfg.pin_dir).join(load::TC_TO_POD_PROGRAM);
        let policy = if cfg.network_policy {
            to_pod.load().context("loading lb_tc_to_pod")?;
            load::pin_program(&cfg.pin_dir, load::TC_TO_POD_PROGRAM, to_pod)?;
            Some(crate::netpol::NetworkPolicies::open(&cfg.pin_dir)?)
        } else {
            // Another component enforces policy: nothing an earlier agent wrote stays.
            let _ = std::fs::remove_file(&to_pod_pin);
            crate::netpol::NetworkPolicies::open(&cfg.pin_dir)?.clear();
            None
        };
        // Flow events: the programs are told what to emit; a task reads them.
        crate::events::configure(&cfg.pin_dir, cfg.events.kinds, cfg.events.rate, cfg.events.burst)?;
        let ring: aya::maps::RingBuf<aya::maps::MapData> = ebpf.take_map(MAP_EVENTS).context("no event ring buffer")?.try_into()?;
        let event_names = crate::events::SharedNames::default();
        let flow_events = crate::events::EventLog::new(cfg.events.buffer, cfg.events.rate, cfg.events.burst, event_names.clone());
        crate::events::start_reader(ring, cfg.pin_dir.clone(), cfg.node_name.clone(), event_names.clone(), flow_events.clone())?;
        // Cached next hops follow the node's neighbours and routes.
        if let Err(e) = crate::dataplane::next_hops::watch(&cfg.pin_dir) {
            log::warn!("{e:#}: cached next hops only age out (1 s)");
        }
        let maps = Maps::take(&mut ebpf)?;
        let mut dataplane = Dataplane::new(maps, cfg.hash_seed as u64, cfg.maglev_min_table)?;
        let adopted = dataplane.adopt(counters_pinned)?;
        if adopted > 0 {
            info!("adopted {adopted} frontends from the maps pinned in {}; conntrack kept", cfg.pin_dir.display());
        }
        let slots = dataplane.maps.maglev_slots();
        info!(
            "Maglev slot array {MAP_MAGLEV}: {slots} slots ({} MiB), {} in use by {} tables; room for about {} more Service ports of {} backends",
            slots as u64 * MAGLEV_SLOT_STRIDE as u64 >> 20,
            dataplane.used_slots(),
            dataplane.table_count(),
            (slots as u64 - dataplane.used_slots()) / dataplane.table_size_for(3) as u64,
            3
        );
        let netlink = node::connect()?;
        let source = Source::open(&cfg.source, &cfg.node_name, cfg.network_policy).await?;
        // Frontends an earlier agent programmed stay with their Services when claims collide.
        let service_of = |name: &str| ServiceName::from(name.split_once(':').map_or(name, |(s, _)| s));
        let owners = dataplane.frontends().map(|(key, name, _)| (translate::frontend_of(key), service_of(name))).collect();
        // So do the LoadBalancer addresses it gave out.
        let mut assigned_at_start: HashMap<ServiceName, Vec<IpAddr>> = HashMap::new();
        for (key, name, _) in dataplane.frontends().filter(|(k, _, e)| e.kind == KIND_LOAD_BALANCER && k.scope == SCOPE_CLUSTER) {
            let addrs = assigned_at_start.entry(service_of(name)).or_default();
            if !addrs.contains(&key.addr) {
                addrs.push(key.addr);
            }
        }
        // Who is alive decides who announces an address and who writes a Service's status.
        let heartbeat = match &source {
            Source::Kubernetes(kube) => Some(crate::heartbeat::Heartbeat::start(kube.client.clone(), &cfg.node_name, cfg.heartbeat.clone())),
            Source::Manifests(..) => None,
        };
        let sender = if cfg.l2_announce {
            match announce::Sender::new() {
                Ok(sender) => Some(sender),
                Err(e) => {
                    warn!("no packet socket for gratuitous ARP and unsolicited NA ({e}): addresses are answered for, not announced");
                    None
                }
            }
        } else {
            None
        };
        let ready = Arc::new(AtomicBool::new(false));
        let proxy_health = ProxyHealth { ready: ready.clone(), ..ProxyHealth::new((cfg.sync_interval * 4).max(Duration::from_secs(2))) };
        let mut agent = Self {
            health_servers: ServiceHealthServers::new(proxy_health.clone()),
            sock_skip: BTreeSet::new(),
            proxy_health,
            cfg,
            ebpf,
            dataplane,
            netlink,
            source,
            claims: translate::Claims::holding(owners),
            health_checks: BTreeMap::new(),
            reported: Reported::default(),
            tc_links: HashMap::new(),
            node_ips: Vec::new(),
            host_ips: Vec::new(),
            policy,
            policy_host_ips: None,
            last_gc: None,
            synced_once: false,
            ready,
            heartbeat_ns: Arc::new(std::sync::atomic::AtomicU64::new(conntrack::monotonic_ns())),
            conntrack_fill: Arc::default(),
            programmed_triggers: HashMap::new(),
            started_at: jiff::Timestamp::now(),
            status: Arc::default(),
            assignments: BTreeMap::new(),
            assigned_at_start,
            announcements: announce::Announcements::default(),
            devices: Vec::new(),
            sender,
            heartbeat,
            status_sent: HashMap::new(),
            events_sent: BTreeSet::new(),
            flow_events,
            event_names,
        };
        {
            let mut status = agent.status.lock().expect("not poisoned");
            status.version = env!("CARGO_PKG_VERSION").into();
            status.node = agent.cfg.node_name.clone();
            (status.mode, status.source) = match &agent.cfg.source {
                SourceConfig::Manifests(dir) => ("standalone".into(), dir.display().to_string()),
                SourceConfig::Kubernetes { api_server, .. } => ("kubernetes".into(), api_server.clone().unwrap_or_else(|| "in-cluster or kubeconfig".into())),
            };
            status.pin_dir = agent.cfg.pin_dir.display().to_string();
            status.started_unix = crate::status::unix_now();
        }
        agent.attach_external().await?;
        agent.attach_socket_hooks()?;
        Ok(agent)
    }

    async fn attach_external(&mut self) -> Result<()> {
        let links = node::links(&self.netlink).await?;
        let xdp: &mut Xdp = self.ebpf.program_mut(load::XDP_PROGRAM).context("no XDP program")?.try_into()?;
        for dev in &self.cfg.external_devices {
            let Some((&ifindex, _)) = links.iter().find(|(_, n)| *n == dev) else {
                bail!("external device {dev} does not exist");
            };
            // XDP hands packets whose next hop it cannot resolve to the stack after SNAT; their
            // source is then a node address, which the stack drops as martian without this.
            ensure_sysctl(&format!("net/ipv4/conf/{dev}/accept_local"), "1")?;
            let (mut mode, why) = match self.cfg.xdp_mode {
                Some(mode) => (mode, "as --xdp-mode says"),
                None => xdp_mode_for(dev),
            };
            let links = links_dir(&self.cfg.pin_dir)?;
            // A device holds one XDP mode at a time: a link of the other mode (an earlier agent's,
            // with other flags) goes first. Detached now: dropping its last reference would
            // detach it later, from a kernel worker, and the new attach could find it still there.
            let other = links.join(xdp_pin_name(dev, if mode == XdpMode::Skb { XdpMode::Driver } else { XdpMode::Skb }));
            if other.exists() {
                crate::cleanup::detach_link(&other).with_context(|| format!("detaching {}", other.display()))?;
                std::fs::remove_file(&other)?;
                info!("XDP on {dev}: the earlier agent's link of the other mode detached");
            }
            let attach = |xdp: &mut Xdp, mode: XdpMode| {
                attach_pinned(
                    &links.join(xdp_pin_name(dev, mode)),
                    |xdp: &mut Xdp, old| Ok(xdp.attach_to_link(old.try_into()?).map(|_| ())?),
                    |xdp: &mut Xdp| {
                        let id = xdp.attach(ifindex, mode).with_context(|| format!("attaching XDP to {dev} in {} mode", mode_name(mode)))?;
                        Ok(xdp.take_link(id)?.try_into()?)
                    },
                    xdp,
                )
            };
            let adopted = match attach(xdp, mode) {
                // Auto on a device whose driver turns native XDP down: generic XDP.
                Err(e) if self.cfg.xdp_mode.is_none() && mode == XdpMode::Driver => {
                    warn!("native XDP on {dev} failed ({e:#}); generic XDP instead");
                    mode = XdpMode::Skb;
                    attach(xdp, mode)?
                }
                result => result?,
            };
            info!("XDP {} on {dev} (ifindex {ifindex}): {} mode, {why}", if adopted { "replaced in place" } else { "attached" }, mode_name(mode));
            match announce::Device::read(dev, ifindex) {
                Ok(device) => self.devices.push(device),
                Err(e) => warn!("{dev}: {e:#}; pool addresses are not announced on it"),
            }
            crate::metrics::program_attached(load::XDP_PROGRAM);
            self.status.lock().expect("not poisoned").attach(load::XDP_PROGRAM, &format!("{dev} ({} XDP)", mode_name(mode)));
        }
        Ok(())
    }

    /// Attaches the socket hooks to the configured cgroup, translating only sockets of this
    /// network namespace; with socket balancing off, removes hooks an earlier agent left.
    fn attach_socket_hooks(&mut self) -> Result<()> {
        let links = links_dir(&self.cfg.pin_dir)?;
        let Some(cgroup_path) = self.cfg.socket_lb_cgroup.clone() else {
            for (_, pin) in load::SOCK_ADDR_PROGRAMS.iter().chain(&load::SOCK_BIND_PROGRAMS) {
                if std::fs::remove_file(links.join(pin)).is_ok() {
                    info!("socket hook {pin} detached (socket-level balancing is off)");
                }
            }
            return Ok(());
        };
        let hint = "--cgroup-root names a cgroup v2 directory; --socket-lb=false turns socket-level balancing off";
        if !load::is_cgroup2(&cgroup_path).with_context(|| format!("inspecting cgroup {} ({hint})", cgroup_path.display()))? {
            bail!("{} is not a cgroup v2 directory ({hint})", cgroup_path.display());
        }
        let cgroup = std::fs::File::open(&cgroup_path).with_context(|| format!("opening cgroup {} ({hint})", cgroup_path.display()))?;
        // Attached through bpf links, which always coexist with other programs on the cgroup
        // (link attach takes no ALLOW_MULTI flag: "Single" passes none).
        self.dataplane.set_sock_config(SockConfigV1 { netns_cookie: node::netns_cookie()? })?;
        for (name, pin) in load::SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = self.ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            attach_pinned(
                &links.join(pin),
                |prog: &mut CgroupSockAddr, old| Ok(prog.attach_to_link(old.try_into()?).map(|_| ())?),
                |prog: &mut CgroupSockAddr| {
                    let id = prog.attach(&cgroup, CgroupAttachMode::Single)?;
                    Ok(prog.take_link(id)?.try_into()?)
                },
                prog,
            )?;
        }
        // A bind hook cannot replace its program on a link: attach the new one, then drop the
        // old link (both refuse the same binds meanwhile).
        for (name, pin) in load::SOCK_BIND_PROGRAMS {
            let prog: &mut CgroupSock = self.ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
            let id = prog.attach(&cgroup, CgroupAttachMode::Single)?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            let _ = std::fs::remove_file(links.join(pin));
            link.pin(links.join(pin)).with_context(|| format!("pinning {pin}"))?;
        }
        info!("socket hooks on cgroup {} for this network namespace's processes", cgroup_path.display());
        let mut status = self.status.lock().expect("not poisoned");
        for (name, _) in load::SOCK_ADDR_PROGRAMS.iter().chain(&load::SOCK_BIND_PROGRAMS) {
            status.attach(name, &format!("cgroup {}", cgroup_path.display()));
        }
        Ok(())
    }

    /// One pass: sources, then devices and addresses, then maps, then GC.
    pub async fn sync(&mut self) -> Result<()> {
        self.sync_pod_cidrs();
        self.sync_event_names();
        self.sync_node().await?;
        self.sync_pod_devices().await?;
        self.sync_services()?;
        self.sync_policy()?;
        self.sync_socket_opt_outs()?;
        // Not before the first sync: until then draining backends are not known again.
        if self.synced_once && self.last_gc.is_none_or(|t| t.elapsed() >= self.cfg.gc_interval) {
            self.last_gc = Some(Instant::now());
            let mut closed = Vec::new();
            let want_closed = self.cfg.events.kinds & (1 << EVENT_CLOSE) != 0;
            let by_family = self.dataplane.collect_conntrack_by_family(conntrack::monotonic_ns(), want_closed.then_some(&mut closed))?;
            self.flow_events.push_closes(&closed, &self.cfg.node_name, &self.event_names.read().expect("not poisoned"));
            for (fill, family) in self.conntrack_fill.iter().zip(by_family) {
                fill.flows.store(family.flows_kept as u64, std::sync::atomic::Ordering::Relaxed);
                fill.replies.store(family.replies_kept as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let [v4, v6] = by_family;
            let stats = v4 + v6;
            if stats.flows_removed + stats.orphans_removed > 0 {
                info!(
                    "conntrack gc: {} expired flows and {} orphaned replies removed; {} flows and {} replies kept",
                    stats.flows_removed, stats.orphans_removed, stats.flows_kept, stats.replies_kept
                );
            }
        }
        Ok(())
    }

    async fn sync_node(&mut self) -> Result<()> {
        let all = node::node_addresses(&self.netlink).await?;
        // Every address is the node's own to NetworkPolicy (the source its processes use
        // towards a pod may be a pod gateway's link-local one).
        self.host_ips = all.iter().map(|(ip, _)| *ip).collect();
        let ips: Vec<(IpAddr, u32)> = all.into_iter().filter(|(ip, _)| !node::is_link_local(ip)).collect();
        if ips == self.node_ips {
            return Ok(());
        }
        let from_node = self.source.objects().map(|o| translate::node_ips(o.nodes(), &self.cfg.node_name)).unwrap_or_default();
        // The SNAT source of each family: --node-ip, else the Node's own address when this
        // node has it, else the first address of the family.
        let snat_of = |v4: bool| -> Option<IpAddr> {
            let configured = self.cfg.node_ip.map(IpAddr::V4).filter(|_| v4);
            let of_family = |ip: &IpAddr| ip.is_ipv4() == v4;
            configured
                .or_else(|| from_node.iter().copied().filter(of_family).find(|ip| ips.iter().any(|(a, _)| a == ip)))
                .or_else(|| ips.iter().map(|(ip, _)| *ip).find(of_family))
        };
        let (snat, snat6) = (snat_of(true), snat_of(false));
        // NodePorts answer on the addresses --nodeport-addresses allows (all by default).
        let allowed = |ip: &IpAddr| match ip {
            _ if self.cfg.nodeport_cidrs.is_empty() => true,
            IpAddr::V4(ip) => self.cfg.nodeport_cidrs.iter().any(|(net, len)| in_cidr(*ip, *net, *len)),
            IpAddr::V6(_) => false,
        };
        let nodeport_ips: Vec<(IpAddr, u32)> = ips.iter().copied().filter(|(ip, _)| allowed(ip)).collect();
        self.dataplane.set_node_ips(&nodeport_ips)?;
        let snat_raw = match snat {
            Some(IpAddr::V4(ip)) => ip4_raw(ip.octets()),
            _ => 0,
        };
        self.dataplane.set_config(ConfigV1 { hash_seed: self.cfg.hash_seed, snat_addr: snat_raw, nat_port_min: NAT_PORT_MIN, nat_port_max: NAT_PORT_MAX, _pad: 0 })?;
        let snat6 = snat6.and_then(|ip| match ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        });
        self.dataplane.set_snat6(snat6)?;
        let shown = |ip: Option<String>| ip.unwrap_or_else(|| "none".into());
        info!(
            "node addresses {:?}; SNAT address {} (IPv6: {})",
            ips.iter().map(|(ip, _)| ip).collect::<Vec<_>>(),
            shown(snat.map(|ip| ip.to_string())),
            shown(snat6.map(|ip: Ipv6Addr| ip.to_string()))
        );
        self.node_ips = ips;
        Ok(())
    }

    /// Compiles NetworkPolicy again when a Pod, Namespace or NetworkPolicy changed (or the
    /// node's addresses), once all three have been listed, and writes what differs.
    fn sync_policy(&mut self) -> Result<()> {
        let Some(policy) = self.policy.as_mut() else { return Ok(()) };
        if !self.source.policy_synced() {
            return Ok(());
        }
        let Some(mut objects) = self.source.objects() else { return Ok(()) };
        let changed = objects.take_policy_changed();
        if changed.is_none() && self.policy_host_ips.as_ref() == Some(&self.host_ips) {
            return Ok(());
        }
        let frontends = self.dataplane.frontends().map(|(key, _, _)| key.addr).collect();
        policy.sync(&crate::netpol::input_of(&objects), &self.cfg.node_name, &self.host_ips, changed.unwrap_or_else(Instant::now), &frontends)?;
        self.policy_host_ips = Some(self.host_ips.clone());
        let numbered = policy.view.lock().expect("not poisoned").policies.iter().filter_map(|p| Some((p.id?, p.name.clone()))).collect();
        self.event_names.write().expect("not poisoned").policies = numbered;
        Ok(())
    }

    /// What `lbctl policy` is told (none when policy is not enforced).
    pub fn policy_view(&self) -> Option<crate::netpol::SharedPolicyView> {
        self.policy.as_ref().map(|p| p.view.clone())
    }

    /// The names flow events give addresses: pods as `namespace/name`, nodes as `node/<name>`.
    fn sync_event_names(&mut self) {
        let Some(mut objects) = self.source.objects() else { return };
        if !objects.take_names_changed() {
            return;
        }
        let mut names = HashMap::new();
        for node in objects.nodes() {
            let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
            for a in addresses.iter().filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP") {
                if let Ok(ip) = a.address.parse::<IpAddr>() {
                    names.insert(ip, format!("node/{}", node.metadata.id.name()));
                }
            }
        }
        for pod in objects.pods().filter(|p| p.spec.as_ref().and_then(|s| s.host_network) != Some(true)) {
            for ip in pod.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                names.insert(ip, pod.metadata.id.full().to_string());
            }
        }
        self.event_names.write().expect("not poisoned").addresses = names;
    }

    /// This node's pod ranges, as its Node says, for lb-cni (GET /status).
    fn sync_pod_cidrs(&mut self) {
        let node_name = &self.cfg.node_name;
        let Some(cidrs) = self.source.objects().map(|o| o.nodes().find(|n| n.metadata.id.name() == node_name).map(|n| n.pod_cidrs()).unwrap_or_default()) else { return };
        let mut status = self.status.lock().expect("not poisoned");
        if status.pod_cidrs != cidrs {
            info!("pod ranges of this node: {}", if cidrs.is_empty() { "none".to_string() } else { cidrs.join(", ") });
            status.pod_cidrs = cidrs;
        }
    }

    /// Points the socket hooks past the cgroups of host-network pods that opted out, and of
    /// their containers (found anew each pass: containers come and go).
    fn sync_socket_opt_outs(&mut self) -> Result<()> {
        let Some(root) = self.cfg.socket_lb_cgroup.clone() else { return Ok(()) };
        let uids = self.source.objects().map(|o| translate::socket_lb_opt_outs(o.pods(), &self.cfg.node_name)).unwrap_or_default();
        let ids = if uids.is_empty() { BTreeSet::new() } else { node::pod_cgroup_ids(&root, &uids) };
        if ids != self.sock_skip {
            self.dataplane.set_sock_skip(&ids)?;
            info!("socket hooks skip {} cgroups of {} opted-out pods", ids.len(), uids.len());
            self.sock_skip = ids;
        }
        Ok(())
    }

    /// Attaches TC to every pod device: the host side of each, found by name pattern or by
    /// the /32 routes that lead to pods. Devices that appear later are picked up here too.
    async fn sync_pod_devices(&mut self) -> Result<()> {
        let links = node::links(&self.netlink).await?;
        let routed = if self.cfg.pod_devices_from_routes { node::host_route_links(&self.netlink).await? } else { Vec::new() };
        let status = &self.status;
        self.tc_links.retain(|(ifindex, program), name| {
            let present = links.contains_key(ifindex);
            if !present {
                crate::metrics::program_detached(program);
                status.lock().expect("not poisoned").detach(program, name);
            }
            present
        });
        let programs: &[load::PodDeviceProgram] = if self.cfg.network_policy { &load::POD_DEVICE_PROGRAMS } else { &load::POD_DEVICE_PROGRAMS[..1] };
        for (ifindex, name) in &links {
            let by_name = self.cfg.pod_device_patterns.iter().any(|p| node::name_matches(p, name));
            if self.cfg.external_devices.contains(name) || name == "lo" || (!by_name && !routed.contains(ifindex)) {
                continue;
            }
            for program in programs {
                if self.tc_links.contains_key(&(*ifindex, program.name)) {
                    continue;
                }
                let tc: &mut SchedClassifier = self.ebpf.program_mut(program.name).with_context(|| format!("no program {}", program.name))?.try_into()?;
                let ifindex = *ifindex;
                let attached = attach_pinned(
                    &program.link_pin(&self.cfg.pin_dir, name),
                    |tc: &mut SchedClassifier, old| Ok(tc.attach_to_link(old.try_into()?).map(|_| ())?),
                    |tc: &mut SchedClassifier| {
                        let id = tc.attach(ifindex, program.direction)?;
                        Ok(tc.take_link(id)?.try_into()?)
                    },
                    tc,
                );
                match attached {
                    Ok(adopted) => {
                        info!("{} {} on pod device {name} (ifindex {ifindex})", program.name, if adopted { "replaced in place" } else { "attached" });
                        self.tc_links.insert((ifindex, program.name), name.clone());
                        crate::metrics::program_attached(program.name);
                        self.status.lock().expect("not poisoned").attach(program.name, name);
                    }
                    // lb-cni attached it a moment ago and is pinning its link: adopted next pass.
                    Err(e) if node::is_os_error(e.as_ref(), libc::EEXIST) => {
                        debug!("{} on {name} was attached by lb-cni; its pinned link is adopted next pass", program.name)
                    }
                    Err(e) => warn!("attaching {} to {name}: {e:#}", program.name),
                }
            }
        }
        Ok(())
    }

    /// Translates the Services that changed (all of them on the first pass and after a
    /// relist), settles their claims, and writes only the frontends that changed.
    fn sync_services(&mut self) -> Result<()> {
        let started = Instant::now();
        for e in self.source.poll()? {
            self.report(format!("manifest rejected, its last good version stays in force: {e}"));
        }
        let polled = started.elapsed();
        let node_name = self.cfg.node_name.clone();
        // Before the first full sync there is nothing to read, and nothing is pruned.
        let Some(mut objects) = self.source.objects() else { return Ok(()) };
        if !self.synced_once {
            objects.compact();
        }
        let dirty = objects.take_dirty();
        let lb_changed = objects.take_lb_changed();
        // The first pass settles everything (and removes what an earlier agent left); a relist
        // marks only the Services whose objects differ.
        let everything = !self.synced_once;
        let affected: BTreeSet<ServiceName> = match dirty {
            Dirty::Services(names) if !everything => names,
            _ if everything => objects.service_names().into_iter().chain(self.claims.wanting().cloned()).collect(),
            // Only a pool changed: the Services whose addresses change are found below.
            Dirty::Nothing if lb_changed => BTreeSet::new(),
            _ => return Ok(()),
        };
        // Pool addresses, assigned again when a pool or a LoadBalancer Service changed; the
        // Services whose addresses changed are translated again.
        let mut affected = affected;
        let mut pool_problems = Vec::new();
        if lb_changed || everything {
            let (assigned, problems, pool_use) = assign_addresses(&objects, &self.assignments, &self.assigned_at_start);
            for (name, a) in &assigned {
                if self.assignments.get(name) != Some(a) {
                    affected.insert(name.clone());
                }
            }
            affected.extend(self.assignments.keys().filter(|name| !assigned.contains_key(*name)).cloned());
            self.assignments = assigned;
            pool_problems = problems;
            self.status.lock().expect("not poisoned").pools = pool_use;
        }
        let affected_count = affected.len();
        {
            // Each affected Service's standing is decided anew below.
            let mut status = self.status.lock().expect("not poisoned");
            for name in &affected {
                status.rejected.remove(&**name);
            }
        }
        let mut triggers: Vec<(ServiceName, Option<jiff::Timestamp>)> = Vec::new();
        let translated: Vec<(ServiceName, Option<translate::ServiceTranslation>, Vec<String>)> = affected
            .iter()
            .map(|name| match objects.service(name) {
                None => (name.clone(), None, Vec::new()),
                Some(copy) => {
                    let slices = objects.slices_of(name);
                    triggers.push((copy.name.clone(), latest_trigger(&slices)));
                    let assigned: Option<Vec<IpAddr>> = self.assignments.get(name).map(|a| a.addrs.iter().map(|(ip, _)| *ip).collect());
                    let translation = translate::translate_service(copy.object, copy.name, copy.origin, &slices, &node_name, assigned.as_deref());
                    (copy.name.clone(), translation, copy.ignored_in.into_iter().map(String::from).collect())
                }
            })
            .collect();
        drop(objects);
        let translated_in = started.elapsed();
        for problem in pool_problems {
            self.report(problem);
        }
        self.report_assignments();
        for (name, translation, copies) in translated {
            for origin in copies {
                self.report(format!("Service {name} is also defined in {origin}; that copy is ignored"));
            }
            let Some(t) = translation else {
                self.claims.unwant(&name);
                self.health_checks.remove(&name);
                self.programmed_triggers.remove(&name);
                continue;
            };
            for w in t.warnings {
                self.report_warning(format!("not supported, the rest of the Service works: {w}"));
            }
            match t.result {
                Ok(claims) => {
                    self.claims.want(name.clone(), t.created, t.origin, claims.into());
                }
                Err(e) => {
                    self.status.lock().expect("not poisoned").rejected.insert(name.to_string(), e.to_string());
                    self.report(format!("service rejected, its last good version stays in force: {e}"));
                }
            }
            match t.health_check {
                Some(check) => self.health_checks.insert(name, check),
                None => self.health_checks.remove(&name),
            };
        }
        let settled = self.claims.settle(affected, everything);
        for e in &settled.errors {
            let service = e.object.strip_prefix("Service ").unwrap_or(&e.object).to_string();
            self.status.lock().expect("not poisoned").rejected.insert(service, format!("{}: {}", e.field, e.message));
            self.report(format!("frontend rejected: {e}"));
        }
        let settled_in = started.elapsed();
        let stats = if everything {
            // Also removes what an earlier agent programmed for Services that are gone.
            let all: Vec<Arc<Frontend>> = self.claims.all_granted().map(|c| c.frontend.clone()).collect();
            self.dataplane.apply_shared(&all)?
        } else {
            let upserts: Vec<Arc<Frontend>> = settled.changes.iter().flat_map(|(_, _, now)| now.iter().map(|c| c.frontend.clone())).collect();
            let kept: HashSet<FrontendKey> = upserts.iter().map(|f| f.key).collect();
            let removed: Vec<FrontendKey> = settled.changes.iter().flat_map(|(_, before, _)| before.iter().map(|c| c.frontend.key)).filter(|k| !kept.contains(k)).collect();
            self.dataplane.apply_changes(&removed, &upserts)?
        };
        log::debug!(
            "sync of {} services: sources read by {polled:?}, translated by {translated_in:?}, claims settled by {settled_in:?}, maps written by {:?}",
            affected_count,
            started.elapsed()
        );
        for (frontend, why) in &stats.failed {
            self.report(format!("frontend {frontend} not programmed, its previous state stays: {why}"));
        }
        self.measure_programming(triggers);
        if stats.added + stats.updated + stats.removed > 0 || !self.synced_once {
            info!(
                "programmed {} frontends of {} services: added {}, updated {}, removed {}, unchanged {}, failed {}{}",
                self.dataplane.frontend_count(),
                self.claims.wanting().count(),
                stats.added,
                stats.updated,
                stats.removed,
                stats.unchanged,
                stats.failed.len(),
                if everything { String::new() } else { named(settled.changes.iter().map(|(name, _, _)| &**name)) }
            );
        }
        // Connected UDP sockets of node processes must not stay on a backend that is gone.
        if self.cfg.socket_lb_cgroup.is_some() {
            match self.dataplane.end_udp_sockets_to(&gone_udp_backends(&settled.changes)) {
                Ok(0) => {}
                Ok(n) => info!("ended {n} connected UDP sockets of removed backends"),
                Err(e) => warn!("ending UDP sockets of removed backends: {e:#}"),
            }
        }
        let checks: Vec<translate::HealthCheck> = self.health_checks.values().cloned().collect();
        for e in self.health_servers.sync(&checks) {
            self.report(format!("health check not served: {e}"));
        }
        self.synced_once = true;
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        self.status.lock().expect("not poisoned").synced = true;
        crate::metrics::sync_done(started.elapsed(), &stats);
        Ok(())
    }

    /// Says, once each, why a Service has no (or too few) pool addresses: in the log and to
    /// `lbctl status` (Kubernetes mode's Events: [`publish_assignments`]).
    fn report_assignments(&mut self) {
        let mut problems = Vec::new();
        {
            let mut status = self.status.lock().expect("not poisoned");
            for (name, a) in &self.assignments {
                if let Some(why) = &a.error {
                    status.rejected.insert(name.to_string(), format!("load-balancer address: {why}"));
                    problems.push(format!("Service {name}: load-balancer address: {why}"));
                }
            }
        }
        for p in problems {
            self.report(p);
        }
    }

    /// Who answers for each pool address: the owners computed afresh (membership, eTP Local
    /// endpoints), this node's answers in the maps with their expiry moved on, gratuitous ARP
    /// and unsolicited NA for the addresses it just took over and, now and then, for all it owns.
    fn sync_l2(&mut self) -> Result<()> {
        let node = self.cfg.node_name.clone();
        let Some(objects) = self.source.objects() else { return Ok(()) };
        let membership = match &self.heartbeat {
            Some(heartbeat) => heartbeat.membership(),
            // Refreshed every sync: the answers outlive a few of them.
            None => standalone_membership(objects.nodes(), &node, self.cfg.heartbeat.timeout.max(self.cfg.sync_interval * 3)),
        };
        let mut states = Vec::new();
        for (name, a) in &self.assignments {
            let copy = objects.service(name);
            let local_only = copy.as_ref().and_then(|c| c.object.spec.as_ref()).is_some_and(|s| s.external_traffic_policy.as_deref() == Some("Local"));
            let with_endpoints: BTreeSet<String> = if local_only { translate::nodes_with_ready_endpoints(&objects.slices_of(name)) } else { BTreeSet::new() };
            let candidates: Vec<&str> = membership.live.iter().filter(|n| !local_only || with_endpoints.contains(*n)).map(String::as_str).collect();
            for (address, pool) in &a.addrs {
                let owner = announce::owner(*address, candidates.iter().copied()).unwrap_or_default().to_string();
                states.push(announce::AddressState { address: *address, service: name.to_string(), pool: pool.to_string(), owner, since_unix: crate::status::unix_now() });
            }
        }
        if let Source::Kubernetes(kube) = &self.source {
            publish_assignments(&kube.client, &node, &self.assignments, &objects, &membership.live, &mut self.status_sent, &mut self.events_sent);
        }
        drop(objects);
        let changes_before = self.announcements.changes;
        let taken_over = self.announcements.update(&node, states);
        crate::metrics::l2_ownership_changes(self.announcements.changes - changes_before);
        self.status.lock().expect("not poisoned").addresses = self.announcements.states.values().cloned().collect();
        if !self.cfg.l2_announce {
            return Ok(());
        }
        let owned: Vec<IpAddr> = self.announcements.owned_by(&node).into_iter().collect();
        // Written when what is owned changes, or when the expiry moves by a meaningful step
        // (on, or back to zero when this node may no longer answer): not every pass.
        let written = self.announcements.written.as_ref();
        let stale = written.is_none_or(|(addrs, until)| *addrs != owned || membership.answer_until_ns.abs_diff(*until) >= ANSWER_REFRESH_NS);
        if stale {
            self.dataplane.maps.set_announced::<Addr4>(&announced_on(&self.devices, &owned), membership.answer_until_ns)?;
            self.dataplane.maps.set_announced::<Addr6>(&announced_on(&self.devices, &owned), membership.answer_until_ns)?;
            self.announcements.written = Some((owned.clone(), membership.answer_until_ns));
        }
        if let Some(sender) = &self.sender {
            for address in &taken_over {
                info!("L2: this node now answers for {address}");
                sender.takeover_burst(&self.devices, *address);
            }
            if self.announcements.last_reannounce.is_none_or(|t| t.elapsed() >= announce::REANNOUNCE_EVERY) {
                self.announcements.last_reannounce = Some(Instant::now());
                for address in owned.iter().filter(|a| !taken_over.contains(a)) {
                    for d in &self.devices {
                        if let Err(e) = sender.send(d.ifindex, &announce::announcement(d.mac, *address)) {
                            warn!("announcing {address} on {}: {e}", d.name);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Network programming latency: for each Service just programmed whose slices carry a
    /// trigger time newer than the last one measured, the time from that trigger to now.
    fn measure_programming(&mut self, triggers: Vec<(ServiceName, Option<jiff::Timestamp>)>) {
        let now = jiff::Timestamp::now();
        for (name, trigger) in triggers {
            let Some(trigger) = trigger.filter(|t| *t >= self.started_at) else { continue };
            if self.programmed_triggers.get(&name).is_some_and(|seen| *seen >= trigger) {
                continue;
            }
            let took = now.duration_since(trigger);
            crate::metrics::endpoints_programmed(std::time::Duration::try_from(took).unwrap_or_default());
            self.programmed_triggers.insert(name, trigger);
        }
    }

    /// Logs a problem once, not on every sync.
    fn report(&mut self, message: String) {
        if self.reported.first_time(&message) {
            error!("{message}");
        }
    }

    /// Logs a warning once.
    fn report_warning(&mut self, message: String) {
        if self.reported.first_time(&message) {
            warn!("{message}");
        }
    }

    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.cfg.sync_interval);
        let notify = self.source.notify();
        let heartbeat = self.heartbeat.as_ref().map(|h| h.notify.clone()).unwrap_or_default();
        loop {
            // When a node's heartbeat goes stale, ownership moves: woken then, not a tick later.
            let expiry = self.heartbeat.as_ref().and_then(|h| h.next_expiry());
            let stale = async move {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let membership_moved = async {
                tokio::select! {
                    _ = heartbeat.notified() => {}
                    _ = stale => {}
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    // The programs stay attached through their pinned links: traffic keeps
                    // flowing until the next agent takes over. The L2 answers do not: the other
                    // nodes take this node's addresses over at once.
                    if let Some(heartbeat) = &self.heartbeat {
                        heartbeat.release().await;
                    }
                    if let Err(e) = self.dataplane.maps.set_announced::<Addr4>(&[], 0).and_then(|_| self.dataplane.maps.set_announced::<Addr6>(&[], 0)) {
                        warn!("withdrawing L2 answers: {e:#}");
                    }
                    info!("shutting down; the datapath stays in place");
                    return Ok(());
                }
                _ = tick.tick() => {}
                _ = notify.notified() => {}
                // A renewal, a node coming alive or going stale only moves L2 ownership.
                _ = membership_moved => {
                    if let Err(e) = self.sync_l2() {
                        error!("L2 announcements: {e:#}");
                    }
                    continue;
                }
            }
            self.heartbeat_ns.store(conntrack::monotonic_ns(), std::sync::atomic::Ordering::Release);
            let synced = self.sync().await;
            if let Err(e) = self.sync_l2() {
                error!("L2 announcements: {e:#}");
            }
            match synced {
                Ok(()) => {
                    self.proxy_health.sync_succeeded();
                    self.status.lock().expect("not poisoned").last_sync_unix = crate::status::unix_now();
                }
                Err(e) => {
                    crate::metrics::sync_failed();
                    error!("sync failed: {e:#}");
                }
            }
        }
    }
}

/// Problems already logged, so that each is logged once and not on every sync.
#[derive(Default)]
struct Reported {
    seen: BTreeSet<String>,
    full: bool,
}

/// Distinct problems remembered at most: past this, a new one is logged every time it comes
/// up again (when its object changes) instead of being remembered, so that a flood of bad
/// objects cannot grow the agent without bound.
const REPORTED_MAX: usize = 10_000;

impl Reported {
    /// Whether `message` is to be logged now.
    fn first_time(&mut self, message: &str) -> bool {
        if self.seen.contains(message) {
            return false;
        }
        if self.seen.len() < REPORTED_MAX {
            self.seen.insert(message.to_string());
        } else if !self.full {
            self.full = true;
            warn!("more than {REPORTED_MAX} distinct problems: the ones after are logged each time they come up, not once");
        }
        true
    }
}

/// Kubernetes mode: writes each assignment the Service's status does not show yet, and an Event
/// for each new reason a Service has no address. Each Service's by one agent, its rendezvous
/// owner among the live nodes; a write that did not show is sent again after `STATUS_RETRY`.
fn publish_assignments(
    client: &::kube::Client,
    node: &str,
    assignments: &BTreeMap<ServiceName, ipam::Assignment>,
    objects: &crate::source::objects::Objects,
    live: &BTreeSet<String>,
    status_sent: &mut HashMap<ServiceName, (Vec<IpAddr>, Instant)>,
    events_sent: &mut BTreeSet<(ServiceName, String)>,
) {
    const STATUS_RETRY: Duration = Duration::from_secs(3);
    for (name, a) in assignments {
        if announce::owner_of_key(name.as_bytes(), live.iter().map(String::as_str)) != Some(node) {
            continue;
        }
        let addrs: Vec<IpAddr> = a.addrs.iter().map(|(ip, _)| *ip).collect();
        let shown: Vec<IpAddr> = objects.service(name).map(|c| c.object.ingress().iter().filter_map(|i| i.ip.as_deref()?.parse().ok()).collect()).unwrap_or_default();
        let recently_sent = status_sent.get(name).is_some_and(|(sent, at)| *sent == addrs && at.elapsed() < STATUS_RETRY);
        if shown != addrs && !recently_sent {
            status_sent.insert(name.clone(), (addrs.clone(), Instant::now()));
            tokio::spawn(crate::publish::service_status(client.clone(), name.clone(), addrs));
        }
        if let Some(why) = &a.error {
            if events_sent.insert((name.clone(), why.clone())) {
                tokio::spawn(crate::publish::warning_event(client.clone(), node.to_string(), name.clone(), why.clone()));
            }
        }
    }
}

/// The pools (the broken ones reported), the LoadBalancer Services' requests, and their
/// assignment; with each pool's size and use.
fn assign_addresses(
    objects: &crate::source::objects::Objects,
    before: &BTreeMap<ServiceName, ipam::Assignment>,
    at_start: &HashMap<ServiceName, Vec<IpAddr>>,
) -> (BTreeMap<ServiceName, ipam::Assignment>, Vec<String>, Vec<crate::status::PoolUse>) {
    let mut problems = Vec::new();
    let pools: Vec<ipam::Pool> = objects
        .pools()
        .into_iter()
        .filter_map(|(origin, pool)| match ipam::Pool::parse(pool) {
            Ok(pool) => Some(pool),
            Err(e) => {
                problems.push(format!("{} {} ({origin}) is not used: {e}", crate::source::model::POOL_KIND, pool.metadata.id.name()));
                None
            }
        })
        .collect();
    let requests: Vec<ipam::Request> = objects
        .load_balancers()
        .filter_map(|copy| {
            let spec = copy.object.spec.as_ref()?;
            let earlier = before.get(copy.name);
            let held: Vec<IpAddr> = earlier.map(|a| a.addrs.iter().map(|(ip, _)| *ip).collect()).or_else(|| at_start.get(copy.name).cloned()).unwrap_or_default();
            ipam::Request::of(copy.object, copy.name, translate::families_served(spec), &held, earlier.is_some())
        })
        .collect();
    let assigned = ipam::assign(&pools, &requests);
    let pool_use = pools
        .iter()
        .map(|p| {
            let used: BTreeSet<IpAddr> = assigned.values().flat_map(|a| a.addrs.iter()).filter(|(_, pool)| *pool == p.name).map(|(ip, _)| *ip).collect();
            crate::status::PoolUse { name: p.name.to_string(), size: p.size().min(u64::MAX as u128) as u64, used: used.len() as u64 }
        })
        .collect();
    (assigned, problems, pool_use)
}

/// Standalone mode's membership: the Ready Node manifests (this node alone when there are
/// none), this node answering while the agent keeps syncing.
fn standalone_membership<'a>(nodes: impl Iterator<Item = &'a crate::source::model::Node>, node: &str, timeout: Duration) -> announce::Membership {
    let mut nodes = nodes.peekable();
    let live: BTreeSet<String> = if nodes.peek().is_none() { [node.to_string()].into() } else { nodes.filter(|n| n.ready()).map(|n| n.metadata.id.name().to_string()).collect() };
    let answer_until_ns = if live.contains(node) { conntrack::monotonic_ns() + timeout.as_nanos() as u64 } else { 0 };
    announce::Membership { live, answer_until_ns }
}

/// The L2 answers' expiry is moved on once it would move by this much (100 ms).
const ANSWER_REFRESH_NS: u64 = 100_000_000;

/// Family `A`'s entries of the L2 answer map: each owned address on each device.
fn announced_on<A: crate::dataplane::maps::Family>(devices: &[announce::Device], owned: &[IpAddr]) -> Vec<(u32, A, [u8; 6])> {
    devices.iter().flat_map(|d| owned.iter().filter_map(move |a| Some((d.ifindex, A::from_ip(*a)?, d.mac)))).collect()
}

/// (UDP frontend, backend) pairs new flows could take before and no longer can.
fn gone_udp_backends(changes: &[(ServiceName, SharedClaims, SharedClaims)]) -> Vec<(FrontendKey, IpAddr, u16)> {
    let udp = |claims: &mut dyn Iterator<Item = &Claim>| -> BTreeSet<(FrontendKey, IpAddr, u16)> {
        let frontends = claims.filter(|c| c.frontend.key.proto == IPPROTO_UDP && c.frontend.key.scope == SCOPE_CLUSTER);
        frontends.flat_map(|c| c.frontend.backends.iter().map(|b| (c.frontend.key, b.addr, b.port))).collect()
    };
    let before = udp(&mut changes.iter().flat_map(|(_, before, _)| before.iter()));
    let after = udp(&mut changes.iter().flat_map(|(_, _, after)| after.iter()));
    before.difference(&after).copied().collect()
}

/// Whether `ip` is inside `net`/`len`.
pub fn in_cidr(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = translate::prefix_mask(len);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// "; changed: a, b, c and 12 more" for a log line.
fn named<'a>(names: impl Iterator<Item = &'a str>) -> String {
    const SHOWN: usize = 8;
    let names: Vec<&str> = names.collect();
    if names.is_empty() {
        return String::new();
    }
    let more = names.len().saturating_sub(SHOWN);
    format!("; changed: {}{}", names[..names.len().min(SHOWN)].join(", "), if more > 0 { format!(" and {more} more") } else { String::new() })
}

/// The newest endpoint-change trigger time among a Service's slices (an unparseable one is
/// ignored: it only feeds a metric).
fn latest_trigger(slices: &[&crate::source::model::EndpointSlice]) -> Option<jiff::Timestamp> {
    slices.iter().filter_map(|s| s.metadata.annotations.get(crate::source::model::TRIGGER_TIME_ANNOTATION)?.parse().ok()).max()
}

/// `--xdp-mode auto`: native XDP on a physical device; generic XDP on a virtual one (veth, the
/// external device of kind and most containers and VMs), because a veth delivers native
/// XDP_TX and redirected frames late (a second and more) unless its peer runs XDP itself,
/// which the agent cannot know. Generic XDP runs the same program on the stack's buffers and
/// transmits like the stack does.
fn xdp_mode_for(dev: &str) -> (XdpMode, &'static str) {
    if Path::new("/sys/class/net").join(dev).join("device").exists() {
        (XdpMode::Driver, "a physical device (--xdp-mode auto)")
    } else {
        (XdpMode::Skb, "a virtual device, whose peer may not deliver native XDP_TX at once (--xdp-mode auto)")
    }
}

fn mode_name(mode: XdpMode) -> &'static str {
    if mode == XdpMode::Skb { "generic" } else { "native" }
}

/// The pin of a device's XDP link: `xdp-eth0` (native), `xdp-generic-eth0`.
fn xdp_pin_name(dev: &str, mode: XdpMode) -> String {
    if mode == XdpMode::Skb { format!("xdp-generic-{dev}") } else { format!("xdp-{dev}") }
}

/// Where attachments are pinned: they outlive the agent, so a crash or an upgrade never
/// detaches the datapath.
fn links_dir(pin_dir: &Path) -> Result<PathBuf> {
    let dir = pin_dir.join("links");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Attaches a program through a pinned link: if an earlier agent left one at `pin`, the new
/// program replaces the old one on it atomically (no packet sees neither); otherwise a new
/// link is made and pinned. A pin whose device is gone is replaced. Returns whether it adopted.
fn attach_pinned<P>(pin: &Path, replace: impl FnOnce(&mut P, FdLink) -> Result<()>, attach: impl FnOnce(&mut P) -> Result<FdLink>, prog: &mut P) -> Result<bool> {
    match PinnedLink::from_pin(pin) {
        Ok(old) => match replace(prog, FdLink::from(old)) {
            Ok(()) => return Ok(true),
            Err(e) => {
                warn!("pinned link {} could not be reused ({e:#}); attaching anew", pin.display());
                std::fs::remove_file(pin)?;
            }
        },
        Err(e) if pin.exists() => {
            warn!("pinned link {} is unreadable ({e}); attaching anew", pin.display());
            std::fs::remove_file(pin)?;
        }
        Err(_) => {}
    }
    attach(prog)?.pin(pin).with_context(|| format!("pinning {}", pin.display()))?;
    Ok(false)
}

/// Turns on IPv4 forwarding in this network namespace: NodePort and ClusterIP traffic is
/// routed through the node.
pub fn enable_ip_forwarding() -> Result<()> {
    ensure_sysctl("net/ipv4/conf/all/forwarding", "1")
}

/// Sets a sysctl unless it already has the value (a DaemonSet's init step sets them, and the
/// agent itself may not write /proc/sys).
fn ensure_sysctl(name: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{name}");
    if std::fs::read_to_string(&path).map(|v| v.trim() == value).unwrap_or(false) {
        return Ok(());
    }
    std::fs::write(&path, value).with_context(|| format!("setting {} = {value}", name.replace('/', ".")))?;
    info!("set {} = {value}", name.replace('/', "."));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_logged_once_and_remembered_only_up_to_a_bound() {
        let mut reported = Reported::default();
        assert!(reported.first_time("a"));
        assert!(!reported.first_time("a"), "said once");
        for i in 1..REPORTED_MAX {
            assert!(reported.first_time(&format!("problem {i}")));
        }
        assert_eq!(reported.seen.len(), REPORTED_MAX);
        // Past the bound: logged every time, never remembered.
        assert!(reported.first_time("one more"));
        assert!(reported.first_time("one more"));
        assert_eq!((reported.seen.len(), reported.full), (REPORTED_MAX, true));
        assert!(!reported.first_time("a"), "what was remembered stays said");
    }
}
