//! lb-agent: the node daemon. Standalone mode reads Kubernetes manifests from a directory.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Result;
use aya::programs::XdpMode;
use clap::{Parser, ValueEnum};
use lb_agent::{
    agent::{enable_ip_forwarding, Agent, AgentConfig},
    dataplane::{load::MapSizes, maps::Maps},
    source::SourceConfig,
};

/// Most of the agent's work at scale is many small objects made and dropped (parsing, objects,
/// translation); glibc's allocator spent a third of a 100k cold start merging free chunks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(version, about = "XDP/TC load balancer and kube-proxy replacement: node agent")]
struct Args {
    /// Standalone mode: a directory of Kubernetes manifests (Service, EndpointSlice, Node; YAML
    /// or JSON, multi-document), re-read when files change.
    #[arg(long, conflicts_with = "kubernetes", required_unless_present_any = ["kubernetes", "cleanup", "estimate_memory"])]
    manifests: Option<PathBuf>,
    /// Kubernetes mode: watch Services, EndpointSlices and Nodes on the API server (in-cluster,
    /// or from --kubeconfig / KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// The API server as host:port, used instead of the address in-cluster config or the
    /// kubeconfig gives: after kube-proxy is gone, the `kubernetes` ClusterIP works only once
    /// this agent has programmed it, so the agent must not depend on it.
    #[arg(long, requires = "kubernetes", env = "K8S_API_SERVER")]
    k8s_api_server: Option<String>,
    /// Log lines as text or as JSON objects (one a line, for log collectors). RUST_LOG sets
    /// the level (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9970")]
    metrics_addr: std::net::SocketAddr,
    /// Export packet and byte counters per backend (`lb_backend_*_total{backend="ip:port"}`):
    /// a series per endpoint address, so their number follows pod churn.
    #[arg(long)]
    metrics_per_backend: bool,
    /// Where to serve kube-proxy's health check (/healthz, /livez), which cloud load balancers
    /// and probes set up for kube-proxy use. It fails while syncs keep failing.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: std::net::SocketAddr,
    /// Socket-level balancing: translate ClusterIPs, NodePorts and LoadBalancer IPs for the
    /// node's own processes (host-network pods, node agents) with cgroup socket hooks.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// The cgroup v2 whose processes the socket hooks see (sockets of other network
    /// namespaces in it are left to the packet hooks).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// The agent's own /healthz (liveness) fails once syncs have kept failing this many seconds
    /// (an unreadable manifest directory, a lost netlink socket), so that it gets restarted.
    #[arg(long, default_value_t = 300)]
    healthz_failing_syncs_s: u64,
    /// NodePorts answer only on node addresses inside these CIDRs (kube-proxy's
    /// --nodeport-addresses) [default: every node address].
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    nodeport_addresses: Vec<(Ipv4Addr, u8)>,
    /// Take the datapath off this node and exit: detach every program (XDP, TC, socket hooks)
    /// and remove every pin under --pin-dir. The uninstall step; see README "Uninstall".
    #[arg(long, conflicts_with_all = ["manifests", "kubernetes"])]
    cleanup: bool,
    /// Print the kernel memory the BPF maps take with the capacities given (--max-flows,
    /// --max-services, ...), map by map, and exit: for sizing the pod's memory limit.
    #[arg(long, conflicts_with_all = ["manifests", "kubernetes", "cleanup"])]
    estimate_memory: bool,
    /// This node's name, as in EndpointSlice `nodeName` (decides local or remote backends).
    #[arg(long, env = "NODE_NAME", required_unless_present_any = ["cleanup", "estimate_memory"])]
    node_name: Option<String>,
    /// Source address for SNAT to remote backends [default: the Node object's InternalIP, else
    /// the first address found through rtnetlink].
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// Devices that receive traffic from outside the cluster; they get the XDP program.
    #[arg(long, value_delimiter = ',')]
    external_devices: Vec<String>,
    /// How XDP runs on the external devices. auto: native on physical devices (generic if the
    /// driver refuses), generic on virtual ones such as veth, whose peer delivers native
    /// XDP_TX frames late unless it runs XDP itself; chosen per device and logged.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    xdp_mode: Mode,
    /// Name patterns of pods' host-side devices (a trailing * matches any suffix); they get the TC program.
    #[arg(long, value_delimiter = ',', default_value = "lxc*,cali*,veth*")]
    pod_devices: Vec<String>,
    /// Also treat every device with a /32 route as a pod device.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pod_devices_from_routes: bool,
    /// Where the maps are pinned; a bpffs is mounted there if none is.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    pin_dir: PathBuf,
    /// Smallest Maglev table per Service port (a prime from 251 to 131071); ports with many
    /// backends get the first size with 50 slots per backend.
    #[arg(long, default_value_t = 251)]
    maglev_table_size: u32,
    /// Seed of the flow hash. Give every node the same one, so a flow maps to the same backend anywhere.
    #[arg(long, default_value_t = 0)]
    hash_seed: u32,
    /// How often to re-read manifests, devices and addresses, in milliseconds.
    #[arg(long, default_value_t = 500)]
    sync_interval_ms: u64,
    /// How often to collect expired conntrack entries, in seconds.
    #[arg(long, default_value_t = 10)]
    gc_interval_s: u64,
    /// Capacity of the conntrack and reverse-NAT maps [default: 262144 each].
    #[arg(long)]
    max_flows: Option<u32>,
    /// Capacity of the Maglev slot array shared by all services [default: 16777216].
    #[arg(long)]
    maglev_slots: Option<u32>,
    /// Capacity for frontends (each address, port and protocol of a Service; an
    /// `externalTrafficPolicy: Local` one takes two) [default: 131072].
    #[arg(long)]
    max_services: Option<u32>,
    /// Capacity for backends (distinct endpoint address and port) [default: 262144].
    #[arg(long)]
    max_backends: Option<u32>,
    /// Capacity for connected sockets of the node's processes that the socket hooks
    /// translated, per family; the least recently used are forgotten [default: 262144].
    #[arg(long)]
    max_sockets: Option<u32>,
    /// Capacity for clients with session affinity; the least recently used are forgotten
    /// [default: 262144].
    #[arg(long)]
    max_affinity: Option<u32>,
    /// Capacity for flows of pods a NetworkPolicy selects, per family (their replies pass);
    /// the least recently used are forgotten [default: 65536].
    #[arg(long)]
    max_policy_flows: Option<u32>,
    /// Capacity for addresses with a NetworkPolicy identity (every pod and node of the
    /// cluster) and for `ipBlock` prefixes, each family [default: 65536].
    #[arg(long)]
    max_ipcache: Option<u32>,
    /// Capacity for NetworkPolicy rule keys of this node's pods (a port range takes several)
    /// [default: 65536].
    #[arg(long)]
    max_policy_rules: Option<u32>,
    /// Capacity of the next-hop cache of replies routed here (LRU: one entry per source,
    /// destination and arriving device; past it, replies ask the FIB), each family
    /// [default: 16384]. Next hops towards backends are cached per CPU by backend id.
    #[arg(long)]
    max_next_hops: Option<u32>,
    /// Answer ARP and NDP on the external devices for the LoadBalancerIPPool addresses this
    /// node owns, and announce them (gratuitous ARP, unsolicited NA).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    l2_announce: bool,
    /// Enforce NetworkPolicy on this node's pods (watches every Pod, Namespace and
    /// NetworkPolicy). Off: another component enforces it, and every pod is open here.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    network_policy: bool,
    /// Flow events, a comma-separated list: `drops` (drops and refusals, with their reason),
    /// `flows` (new connections, with their backend and SNAT), `policy` (new flows a
    /// NetworkPolicy rule allowed, with the policy), `closes` (connections conntrack GC
    /// removed, with why), `all`, or `none`. Read them with `lbctl observe`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "drops")]
    events: Vec<Events>,
    /// Flow events each CPU may emit a second (a token bucket; the rest are counted as
    /// throttled).
    #[arg(long, default_value_t = 1000)]
    event_rate: u32,
    /// Flow events each CPU may emit at once, above the rate.
    #[arg(long, default_value_t = 200)]
    event_burst: u32,
    /// Flow events kept in memory for `lbctl observe --last`.
    #[arg(long, default_value_t = 4096)]
    event_buffer: usize,
    /// KiB of the flow-event ring buffer (a power of two, at least 4) [default: 1024].
    #[arg(long, value_parser = parse_ring_kib)]
    event_ring_kib: Option<u32>,
    /// The unix socket `lbctl observe` reads flow events from.
    #[arg(long, default_value = "/run/lb-agent/events.sock")]
    events_socket: PathBuf,
    /// How often this node's heartbeat Lease is renewed (Kubernetes mode), in milliseconds.
    #[arg(long, default_value_t = 500)]
    heartbeat_interval_ms: u64,
    /// A node whose heartbeat was not renewed for this long is dead: its addresses move, and
    /// it stops answering for them itself. In milliseconds.
    #[arg(long, default_value_t = 1500)]
    heartbeat_timeout_ms: u64,
    /// The namespace of the heartbeat Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Events {
    /// Drops and refusals.
    Drops,
    /// New connections.
    Flows,
    /// New flows a NetworkPolicy rule allowed.
    Policy,
    /// Connections removed by conntrack GC.
    Closes,
    /// Every kind.
    All,
    None,
}

impl Events {
    /// `EventConfigV1::kinds` bits.
    fn kinds(self) -> u32 {
        use lb_common::{EVENT_CLOSE, EVENT_DROP, EVENT_NEW_FLOW, EVENT_POLICY};
        match self {
            Events::Drops => 1 << EVENT_DROP,
            Events::Flows => 1 << EVENT_NEW_FLOW,
            Events::Policy => 1 << EVENT_POLICY,
            Events::Closes => 1 << EVENT_CLOSE,
            Events::All => [EVENT_DROP, EVENT_NEW_FLOW, EVENT_POLICY, EVENT_CLOSE].iter().map(|k| 1 << k).sum(),
            Events::None => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// `[time LEVEL target] message`
    Text,
    /// One JSON object a line: ts, level, target, msg.
    Json,
}

fn init_logging(format: LogFormat) {
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        logger.format(|buf, record| {
            use std::io::Write;
            let line = serde_json::json!({"ts": buf.timestamp_millis().to_string(), "level": record.level().as_str(), "target": record.target(), "msg": record.args().to_string()});
            writeln!(buf, "{line}")
        });
    }
    logger.init();
}

/// The configuration in force, in one line at start.
fn summary(args: &Args) -> String {
    let source = match &args.manifests {
        Some(dir) => format!("standalone, manifests in {}", dir.display()),
        None => format!("kubernetes, API server {}", args.k8s_api_server.as_deref().filter(|s| !s.is_empty()).unwrap_or("from in-cluster config or kubeconfig")),
    };
    let list = |items: &[String]| if items.is_empty() { "none".to_string() } else { items.join(",") };
    format!(
        "lb-agent {}: {source}; node {}; external devices {} (XDP mode {:?}); pod devices {}{}; pins in {}; metrics on {}, kube-proxy health on {}; socket LB {}; NodePorts on {}; hash seed {}, smallest Maglev table {}; sync every {} ms, conntrack GC every {} s; L2 announcements {}, NetworkPolicy {}, heartbeat every {} ms, dead after {} ms",
        env!("CARGO_PKG_VERSION"),
        args.node_name.as_deref().unwrap_or("-"),
        list(&args.external_devices),
        args.xdp_mode,
        list(&args.pod_devices),
        if args.pod_devices_from_routes { " and devices with /32 routes" } else { "" },
        args.pin_dir.display(),
        args.metrics_addr,
        args.healthz_bind_address,
        if args.socket_lb { format!("on cgroup {}", args.cgroup_root.display()) } else { "off".into() },
        if args.nodeport_addresses.is_empty() { "every node address".to_string() } else { args.nodeport_addresses.iter().map(|(a, l)| format!("{a}/{l}")).collect::<Vec<_>>().join(",") },
        args.hash_seed,
        args.maglev_table_size,
        args.sync_interval_ms,
        args.gc_interval_s,
        if args.l2_announce { "on" } else { "off" },
        if args.network_policy { "enforced" } else { "off" },
        args.heartbeat_interval_ms,
        args.heartbeat_timeout_ms,
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let sizes = MapSizes {
        flows: args.max_flows,
        maglev_slots: args.maglev_slots,
        services: args.max_services,
        backends: args.max_backends,
        sockets: args.max_sockets,
        affinity: args.max_affinity,
        policy_flows: args.max_policy_flows,
        ipcache: args.max_ipcache,
        policy_rules: args.max_policy_rules,
        next_hops: args.max_next_hops,
        event_ring: args.event_ring_kib.map(|kib| kib * 1024),
    };
    if args.estimate_memory {
        let maps = lb_agent::dataplane::memory::estimate(&sizes)?;
        for (name, bytes) in &maps {
            println!("{name:<20} {bytes:>12} bytes  {:>10}", lb_agent::dataplane::memory::mib(*bytes));
        }
        let total: u64 = maps.iter().map(|(_, b)| b).sum();
        println!("{:<20} {total:>12} bytes  {:>10}", "total", lb_agent::dataplane::memory::mib(total));
        return Ok(());
    }
    if args.cleanup {
        let removed = lb_agent::cleanup::cleanup(&args.pin_dir)?;
        println!(
            "cleanup of {}: {} links detached ({}), {} map pins removed{}",
            args.pin_dir.display(),
            removed.links.len(),
            removed.links.join(", "),
            removed.pins,
            if removed.unmounted { ", its bpffs unmounted" } else { "" }
        );
        return Ok(());
    }
    anyhow::ensure!(
        args.heartbeat_timeout_ms > args.heartbeat_interval_ms,
        "--heartbeat-timeout-ms ({}) must be longer than --heartbeat-interval-ms ({}): a node would be dead between two renewals",
        args.heartbeat_timeout_ms,
        args.heartbeat_interval_ms
    );
    log::info!("{}", summary(&args));
    let metrics_addr = args.metrics_addr;
    let metrics_per_backend = args.metrics_per_backend;
    let cfg = AgentConfig {
        source: match args.manifests {
            Some(dir) => SourceConfig::Manifests(dir),
            // An empty value (an unset ConfigMap key) means "not given".
            None => SourceConfig::Kubernetes { kubeconfig: args.kubeconfig, api_server: args.k8s_api_server.filter(|s| !s.is_empty()) },
        },
        node_name: args.node_name.unwrap_or_default(),
        node_ip: args.node_ip,
        external_devices: args.external_devices,
        xdp_mode: match args.xdp_mode {
            Mode::Auto => None,
            Mode::Native => Some(XdpMode::Driver),
            Mode::Generic => Some(XdpMode::Skb),
        },
        pod_device_patterns: args.pod_devices,
        pod_devices_from_routes: args.pod_devices_from_routes,
        pin_dir: args.pin_dir.clone(),
        maglev_min_table: args.maglev_table_size,
        hash_seed: args.hash_seed,
        sync_interval: Duration::from_millis(args.sync_interval_ms),
        gc_interval: Duration::from_secs(args.gc_interval_s),
        sizes,
        nodeport_cidrs: args.nodeport_addresses,
        socket_lb_cgroup: args.socket_lb.then_some(args.cgroup_root),
        l2_announce: args.l2_announce,
        network_policy: args.network_policy,
        events: lb_agent::agent::EventsConfig {
            kinds: args.events.iter().fold(0, |kinds, e| kinds | e.kinds()),
            rate: args.event_rate,
            burst: args.event_burst,
            buffer: args.event_buffer,
            socket: args.events_socket.clone(),
        },
        heartbeat: lb_agent::heartbeat::HeartbeatConfig {
            namespace: args.lease_namespace,
            interval: Duration::from_millis(args.heartbeat_interval_ms),
            timeout: Duration::from_millis(args.heartbeat_timeout_ms),
        },
    };
    let healthz_addr = args.healthz_bind_address;
    let pin_dir = args.pin_dir;
    let healthz_failing_syncs_s = args.healthz_failing_syncs_s;
    let events_socket = args.events_socket;
    enable_ip_forwarding()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let metrics = lb_agent::metrics::install()?;
        let agent = Agent::start(cfg).await?;
        let health = lb_agent::metrics::Health {
            ready: agent.ready.clone(),
            heartbeat_ns: agent.heartbeat_ns.clone(),
            stale_after: Duration::from_secs(30),
            last_ok_ns: agent.proxy_health.last_ok_ns.clone(),
            failing_syncs_after: Duration::from_secs(healthz_failing_syncs_s),
        };
        let scraper = lb_agent::metrics::Scraper {
            maps: Maps::open_pinned(&pin_dir)?,
            per_backend: metrics_per_backend,
            conntrack: agent.conntrack_fill.clone(),
            event_stats: lb_agent::dataplane::maps::open_pinned(&pin_dir, lb_common::MAP_EVENT_STATS)?,
            event_log: agent.flow_events.clone(),
        };
        // Flow events are a view: the agent carries on without the socket.
        let flow_events = tokio::spawn({
            let (path, log) = (events_socket.clone(), agent.flow_events.clone());
            async move {
                if let Err(e) = lb_agent::events::serve(path.clone(), log).await {
                    log::error!("flow events socket {}: {e:#}; lbctl observe will not work", path.display());
                }
                std::future::pending::<Result<()>>().await
            }
        });
        let server = tokio::spawn(lb_agent::metrics::serve(metrics_addr, metrics, health, scraper, agent.status.clone(), agent.policy_view()));
        let proxy_health = tokio::spawn(lb_agent::health::serve_proxy_health(healthz_addr, agent.proxy_health.clone()));
        let result = tokio::select! {
            r = agent.run(shutdown_signal()) => r,
            r = server => r?,
            r = proxy_health => r?,
            r = flow_events => r?,
        };
        let _ = std::fs::remove_file(&events_socket);
        result
    })
}

fn parse_ring_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if kib < 4 || !kib.is_power_of_two() || kib > 1 << 20 {
        return Err(format!("{kib} KiB: a power of two from 4 to 1048576"));
    }
    Ok(kib)
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    lb_agent::translate::parse_cidr4(s)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
