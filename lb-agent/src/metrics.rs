//! Prometheus metrics and the health endpoints. The agent's own metrics go through `metrics`
//! and its Prometheus exporter; the datapath's are rendered from the maps at each scrape.
use std::{
    fmt::Write,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use hyper::StatusCode;
use lb_common::*;
use log::{info, warn};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use aya::maps::IterableMap;

use crate::{
    dataplane::{
        batch, load,
        maps::Maps,
        ApplyStats, FrontendKey,
    },
    health::Reply,
};

/// Installs the recorder, describes the agent's own metrics (HELP and TYPE lines for
/// promtool) and exports every one of them from the start, at zero.
pub fn install() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("lb_sync_duration_seconds".into()), &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])?
        .set_buckets_for_metric(Matcher::Full("lb_network_programming_duration_seconds".into()), &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0])?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_histogram!("lb_sync_duration_seconds", Unit::Seconds, "Time to translate the sources and program the maps.");
    describe_histogram!(
        "lb_network_programming_duration_seconds",
        Unit::Seconds,
        "From an endpoint change (the EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time) to its Service's maps written on this node, as kube-proxy's network_programming_duration_seconds."
    );
    describe_counter!("lb_sync_errors_total", Unit::Count, "Syncs that failed, map-write errors included.");
    describe_counter!("lb_frontend_changes_total", Unit::Count, "Frontends added, updated or removed in the maps, or failed to be written (map full).");
    describe_gauge!("lb_programs_attached", Unit::Count, "Devices (XDP, TC) or cgroups (socket hooks) a BPF program of the agent is attached to.");
    describe_gauge!("lb_build_info", "The agent's version, as a label; always 1.");
    describe_counter!("lb_l2_ownership_changes_total", Unit::Count, "Pool addresses whose answering node (ARP/NDP) changed, as this agent saw it.");
    counter!("lb_l2_ownership_changes_total").absolute(0);
    gauge!("lb_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    counter!("lb_sync_errors_total").absolute(0);
    for change in CHANGES {
        counter!("lb_frontend_changes_total", "change" => change).absolute(0);
    }
    for program in [load::XDP_PROGRAM, load::TC_PROGRAM] {
        gauge!("lb_programs_attached", "program" => program).set(0.0);
    }
    // Registered, so exported with a zero count before the first sample.
    let _ = histogram!("lb_sync_duration_seconds");
    let _ = histogram!("lb_network_programming_duration_seconds");
    Ok(handle)
}

const CHANGES: [&str; 4] = ["added", "updated", "removed", "failed"];

pub fn sync_done(took: Duration, stats: &ApplyStats) {
    histogram!("lb_sync_duration_seconds").record(took.as_secs_f64());
    for (change, n) in CHANGES.into_iter().zip([stats.added, stats.updated, stats.removed, stats.failed.len()]) {
        counter!("lb_frontend_changes_total", "change" => change).increment(n as u64);
    }
}

/// An endpoint change that took `took` from the trigger to the map write.
pub fn endpoints_programmed(took: Duration) {
    histogram!("lb_network_programming_duration_seconds").record(took.as_secs_f64());
}

pub fn sync_failed() {
    counter!("lb_sync_errors_total").increment(1);
}

/// Pool addresses whose owner (the node that answers ARP/NDP for them) changed.
pub fn l2_ownership_changes(n: u64) {
    counter!("lb_l2_ownership_changes_total").increment(n);
}

/// Counted per program, not per device: a label per pod device would grow with pod churn.
pub fn program_attached(program: &'static str) {
    gauge!("lb_programs_attached", "program" => program).increment(1.0);
}

pub fn program_detached(program: &'static str) {
    gauge!("lb_programs_attached", "program" => program).decrement(1.0);
}

/// How full one family's conntrack is, as the last GC pass counted it (walking 262k flows on
/// every scrape would cost more than it tells).
#[derive(Debug, Default)]
pub struct FamilyFill {
    pub flows: AtomicU64,
    pub replies: AtomicU64,
}

/// IPv4's, then IPv6's.
pub type ConntrackFill = [FamilyFill; 2];

/// Exports what the datapath counted and what is programmed, read from the pinned maps when
/// Prometheus scrapes, not on a timer: an idle agent makes no system calls for metrics, and a
/// sync costs the metrics nothing. Rendered anew on every scrape, so the series of a deleted
/// Service or backend are gone from the next scrape on.
pub struct Scraper {
    pub maps: Maps,
    /// Per-backend series (`--metrics-per-backend`): off by default, as their label values
    /// change with every pod that comes and goes.
    pub per_backend: bool,
    pub conntrack: Arc<ConntrackFill>,
    /// Flow events emitted, throttled and lost (per CPU).
    pub event_stats: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    /// The agent's own (close) events are counted there.
    pub event_log: Arc<crate::events::EventLog>,
}

impl Scraper {
    /// The datapath's series in the Prometheus text format, whole maps read at a time
    /// (batched calls).
    pub fn render(&self) -> Result<String> {
        let maps = &self.maps;
        let mut out = Exposition::default();
        out.family("lb_datapath_packets_total", "counter", "Packets seen by the XDP and TC programs, by verdict reason (drops included).");
        for (reason, packets) in reason::NAMES.iter().zip(maps.reason_counts()?) {
            out.sample("lb_datapath_packets_total", &[("reason", reason)], packets);
        }
        out.family("lb_flow_events_total", "counter", "Flow events by kind and outcome: emitted (into the ring buffer; closes into the agent's log), throttled by the rate limit (per CPU; for closes, the agent's), lost (the ring buffer was full).");
        for (kind, outcome, n) in crate::events::kernel_counts(&self.event_stats)? {
            out.sample("lb_flow_events_total", &[("kind", kind), ("outcome", outcome)], n);
        }
        let (closes_emitted, closes_throttled) = self.event_log.close_counts();
        out.sample("lb_flow_events_total", &[("kind", "close"), ("outcome", "emitted")], closes_emitted);
        out.sample("lb_flow_events_total", &[("kind", "close"), ("outcome", "throttled")], closes_throttled);
        let (frontends4, frontends6) = (maps.frontends::<Addr4>()?, maps.frontends::<Addr6>()?);
        let names: Vec<(u32, NameV1)> = batch::lookup_all(maps.service_names.map()).with_context(|| format!("reading {MAP_SERVICE_NAMES}"))?;
        let service_counters = maps.all_service_counters()?;
        let mut tables = std::collections::HashSet::new();
        let mut services = Vec::new();
        for (key, entry) in frontends4.iter().chain(&frontends6) {
            let id = entry.service_id as usize;
            let name = names.get(id).map(|(_, n)| n.as_str()).unwrap_or_default();
            services.push((ServiceLabels::parse(name, key), service_counters.get(id).copied().unwrap_or_default()));
            if entry.maglev_size > 0 {
                tables.insert((entry.maglev_offset, entry.maglev_size));
            }
        }
        for (metric, help, value) in [
            ("lb_service_packets_total", "Packets of new and tracked flows to a frontend, from the datapath.", (|c: &TrafficCountersV1| c.packets) as fn(&TrafficCountersV1) -> u64),
            ("lb_service_bytes_total", "Bytes of packets to a frontend, from the datapath.", |c| c.bytes),
        ] {
            out.family(metric, "counter", help);
            for (labels, counters) in &services {
                out.sample(metric, &labels.pairs(), value(counters));
            }
        }
        let (backends4, backends6) = (maps.live_backends::<Addr4>()?, maps.live_backends::<Addr6>()?);
        if self.per_backend {
            let counters = maps.all_backend_counters()?;
            let backends: Vec<(String, TrafficCountersV1)> = backends4.iter().chain(&backends6).map(|(id, b)| (b.to_string(), counters.get(*id as usize).copied().unwrap_or_default())).collect();
            for (metric, help, value) in [
                ("lb_backend_packets_total", "Packets forwarded to a backend, from the datapath.", (|c: &TrafficCountersV1| c.packets) as fn(&TrafficCountersV1) -> u64),
                ("lb_backend_bytes_total", "Bytes forwarded to a backend, from the datapath.", |c| c.bytes),
            ] {
                out.family(metric, "counter", help);
                for (backend, counters) in &backends {
                    out.sample(metric, &[("backend", backend)], value(counters));
                }
            }
        }
        let used_slots: u64 = tables.iter().map(|(_, size)| *size as u64).sum();
        let (service_room, backend_room) = (maps.service_names.len() as u64, maps.v4.backends.len() as u64 - 1);
        let [v4, v6] = &*self.conntrack;
        let fill = [
            (MAP_SERVICES, frontends4.len() as u64, service_room),
            (MAP_SERVICES6, frontends6.len() as u64, service_room),
            (MAP_BACKENDS, backends4.len() as u64, backend_room),
            (MAP_BACKENDS6, backends6.len() as u64, backend_room),
            (MAP_MAGLEV, used_slots, maps.maglev_slots() as u64),
            (MAP_CONNTRACK, v4.flows.load(Ordering::Relaxed), maps.flow_capacity as u64),
            (MAP_REVERSE_NAT, v4.replies.load(Ordering::Relaxed), maps.flow_capacity as u64),
            (MAP_CONNTRACK6, v6.flows.load(Ordering::Relaxed), maps.flow_capacity as u64),
            (MAP_REVERSE_NAT6, v6.replies.load(Ordering::Relaxed), maps.flow_capacity as u64),
        ];
        out.family("lb_map_entries", "gauge", "Entries in a BPF map (Maglev: slots in use; conntrack: as of the last GC pass).");
        for (map, entries, _) in fill {
            out.sample("lb_map_entries", &[("map", map)], entries);
        }
        out.family("lb_map_capacity", "gauge", "Capacity of a BPF map.");
        for (map, _, capacity) in fill {
            out.sample("lb_map_capacity", &[("map", map)], capacity);
        }
        out.family("lb_maglev_tables", "gauge", "Maglev tables in the slot array (one per Service port and backend set, shared by the port's frontends).");
        out.sample("lb_maglev_tables", &[], tables.len() as u64);
        Ok(out.0)
    }
}

/// Each address pool's size and use, as the last assignment found them: rendered per scrape,
/// so a deleted pool's series go with it.
fn pool_series(pools: &[crate::status::PoolUse]) -> String {
    let mut out = Exposition::default();
    out.family("lb_ip_pool_addresses", "gauge", "Addresses of each LoadBalancerIPPool.");
    for p in pools {
        out.sample("lb_ip_pool_addresses", &[("pool", &p.name)], p.size);
    }
    out.family("lb_ip_pool_addresses_used", "gauge", "Addresses of each LoadBalancerIPPool given to Services.");
    for p in pools {
        out.sample("lb_ip_pool_addresses_used", &[("pool", &p.name)], p.used);
    }
    out.0
}

/// A frontend's labels: the Service port it belongs to, in kube-proxy's terms, and the
/// frontend itself (`10.96.0.10:80`, `[fd00::10]:80`, NodePort `*:30080`).
struct ServiceLabels {
    namespace: String,
    service: String,
    port_name: String,
    protocol: String,
    frontend: String,
}

impl ServiceLabels {
    /// From the name the agent wrote for the service id: `namespace/name:port/PROTO`.
    fn parse(name: &str, key: &FrontendKey) -> Self {
        let (namespace, rest) = name.split_once('/').unwrap_or(("", name));
        let (service, port) = rest.split_once(':').unwrap_or((rest, ""));
        let (port_name, protocol) = port.rsplit_once('/').unwrap_or((port, ""));
        Self { namespace: namespace.into(), service: service.into(), port_name: port_name.into(), protocol: protocol.into(), frontend: key.to_string() }
    }

    fn pairs(&self) -> [(&str, &str); 5] {
        [("namespace", &self.namespace), ("service", &self.service), ("port_name", &self.port_name), ("protocol", &self.protocol), ("frontend", &self.frontend)]
    }
}

/// Metric families in the Prometheus text format (version 0.0.4).
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        for (i, (label, v)) in labels.iter().enumerate() {
            let escaped = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let _ = write!(self.0, "{}{label}=\"{escaped}\"", if i == 0 { "{" } else { "," });
        }
        let _ = writeln!(self.0, "{} {value}", if labels.is_empty() { "" } else { "}" });
    }
}

/// Liveness: the sync loop ran within `stale_after` (its heartbeat is a CLOCK_MONOTONIC stamp).
#[derive(Clone)]
pub struct Health {
    pub ready: Arc<AtomicBool>,
    pub heartbeat_ns: Arc<AtomicU64>,
    pub stale_after: Duration,
    /// CLOCK_MONOTONIC ns of the last sync that succeeded.
    pub last_ok_ns: Arc<AtomicU64>,
    /// `/healthz` fails once syncs have kept failing this long after the first full sync.
    pub failing_syncs_after: Duration,
}

/// Serves `/metrics`, `/healthz` (liveness), `/readyz` (ready after the first full sync) and
/// `/status` (for `lbctl status`) and `/policy` (for `lbctl policy`; 404 when NetworkPolicy is
/// not enforced).
pub async fn serve(addr: SocketAddr, handle: PrometheusHandle, health: Health, scraper: Scraper, status: crate::status::SharedStatus, policy: Option<crate::netpol::SharedPolicyView>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    info!("metrics and health on http://{addr}/metrics, /healthz, /readyz");
    let scraper = Arc::new(scraper);
    crate::health::serve_routes(listener, move |path| {
        if path == "/metrics" {
            let mut body = handle.render();
            match scraper.render() {
                Ok(datapath) => body.push_str(&datapath),
                Err(e) => warn!("reading the datapath counters: {e:#}"),
            }
            body.push_str(&pool_series(&status.lock().expect("not poisoned").pools));
            return (StatusCode::OK, "text/plain; version=0.0.4", body);
        }
        if path == "/status" {
            let body = serde_json::to_string(&*status.lock().expect("not poisoned")).unwrap_or_default();
            return (StatusCode::OK, "application/json", body);
        }
        if let (true, Some(policy)) = (path == "/policy", &policy) {
            let body = serde_json::to_string(&*policy.lock().expect("not poisoned")).unwrap_or_default();
            return (StatusCode::OK, "application/json", body);
        }
        route(path, &health)
    })
    .await
}

fn route(path: &str, health: &Health) -> Reply {
    const TEXT: &str = "text/plain";
    match path {
        "/healthz" => {
            let now = crate::dataplane::conntrack::monotonic_ns();
            let silent = Duration::from_nanos(now.saturating_sub(health.heartbeat_ns.load(Ordering::Acquire)));
            let failing = Duration::from_nanos(now.saturating_sub(health.last_ok_ns.load(Ordering::Acquire)));
            if silent > health.stale_after {
                (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("sync loop silent for {:.1}s\n", silent.as_secs_f64()))
            } else if health.ready.load(Ordering::Acquire) && failing > health.failing_syncs_after {
                (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("no sync has succeeded for {:.1}s\n", failing.as_secs_f64()))
            } else {
                (StatusCode::OK, TEXT, "ok\n".into())
            }
        }
        "/readyz" if health.ready.load(Ordering::Acquire) => (StatusCode::OK, TEXT, "ready\n".into()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, TEXT, "waiting for the first full sync\n".into()),
        _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}
