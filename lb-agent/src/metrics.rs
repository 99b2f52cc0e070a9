//! Prometheus metrics (`metrics` with the Prometheus exporter) and the health endpoints.
//! Datapath counters are read from the per-CPU maps and exported as absolute counters.
use std::{
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
        batch,
        maps::{Family, Maps},
        ApplyStats, FrontendKey,
    },
    health::Reply,
};

/// Installs the recorder and describes every metric (HELP and TYPE lines for promtool).
pub fn install() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("lb_sync_duration_seconds".into()), &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe_counter!("lb_service_packets_total", Unit::Count, "Packets of new and tracked flows to a frontend, from the datapath.");
    describe_counter!("lb_service_bytes_total", Unit::Bytes, "Bytes of packets to a frontend, from the datapath.");
    describe_counter!("lb_backend_packets_total", Unit::Count, "Packets forwarded to a backend, from the datapath.");
    describe_counter!("lb_backend_bytes_total", Unit::Bytes, "Bytes forwarded to a backend, from the datapath.");
    describe_counter!("lb_datapath_packets_total", Unit::Count, "Packets seen by the XDP and TC programs, by verdict reason (drops included).");
    describe_gauge!("lb_map_entries", Unit::Count, "Entries in a BPF map (Maglev: slots in use).");
    describe_gauge!("lb_map_capacity", Unit::Count, "Capacity of a BPF map.");
    describe_gauge!("lb_maglev_tables", Unit::Count, "Maglev tables in the slot array (one per Service port and backend set, shared by the port's frontends).");
    describe_histogram!("lb_sync_duration_seconds", Unit::Seconds, "Time to translate the sources and program the maps.");
    describe_counter!("lb_sync_errors_total", Unit::Count, "Syncs that failed, map-write errors included.");
    describe_counter!("lb_frontend_changes_total", Unit::Count, "Frontends added, updated or removed in the maps, or failed to be written (map full).");
    describe_gauge!("lb_programs_attached", Unit::Count, "BPF programs attached, per device and program.");
    Ok(handle)
}

pub fn sync_done(took: Duration, stats: &ApplyStats) {
    histogram!("lb_sync_duration_seconds").record(took.as_secs_f64());
    for (change, n) in [("added", stats.added), ("updated", stats.updated), ("removed", stats.removed), ("failed", stats.failed.len())] {
        counter!("lb_frontend_changes_total", "change" => change).increment(n as u64);
    }
}

pub fn sync_failed() {
    counter!("lb_sync_errors_total").increment(1);
}

pub fn program_attached(device: &str, program: &'static str) {
    gauge!("lb_programs_attached", "device" => device.to_string(), "program" => program).set(1.0);
}

pub fn program_detached(device: &str, program: &'static str) {
    gauge!("lb_programs_attached", "device" => device.to_string(), "program" => program).set(0.0);
}

/// Reads the datapath's counters and what is programmed when Prometheus scrapes, not on a
/// timer: an idle agent makes no system calls for metrics, and a sync costs the metrics
/// nothing. Everything comes from the pinned maps, whole maps at a time (batched calls).
pub struct Scraper {
    pub maps: Maps,
}

impl Scraper {
    /// Copies the counters of the programmed ids and the fill levels into the registry.
    pub fn export(&self) -> Result<()> {
        let maps = &self.maps;
        for (reason, packets) in reason::NAMES.iter().zip(maps.reason_counts()?) {
            counter!("lb_datapath_packets_total", "reason" => *reason).absolute(packets);
        }
        let (frontends4, frontends6) = (family_frontends::<Addr4>(maps)?, family_frontends::<Addr6>(maps)?);
        let names: Vec<(u32, NameV1)> = batch::lookup_all(maps.service_names.map()).with_context(|| format!("reading {MAP_SERVICE_NAMES}"))?;
        let (backends4, backends6) = (live_backends::<Addr4>(maps)?, live_backends::<Addr6>(maps)?);
        let service_counters = maps.all_service_counters()?;
        let backend_counters = maps.all_backend_counters()?;
        let mut tables = std::collections::HashSet::new();
        for (key, entry) in frontends4.iter().chain(&frontends6) {
            let id = entry.service_id as usize;
            let c = service_counters.get(id).copied().unwrap_or_default();
            let service = names.get(id).map(|(_, n)| n.as_str()).unwrap_or_default();
            let labels = [("service", service.to_string()), ("frontend", key.to_string())];
            counter!("lb_service_packets_total", &labels).absolute(c.packets);
            counter!("lb_service_bytes_total", &labels).absolute(c.bytes);
            if entry.maglev_size > 0 {
                tables.insert((entry.maglev_offset, entry.maglev_size));
            }
        }
        for (id, backend) in backends4.iter().chain(&backends6) {
            let c = backend_counters.get(*id as usize).copied().unwrap_or_default();
            let label = [("backend", backend.to_string())];
            counter!("lb_backend_packets_total", &label).absolute(c.packets);
            counter!("lb_backend_bytes_total", &label).absolute(c.bytes);
        }
        let used_slots: u64 = tables.iter().map(|(_, size)| *size as u64).sum();
        let (services, backends) = (maps.service_names.len() as u64, maps.v4.backends.len() as u64 - 1);
        for (map, entries, capacity) in [
            (MAP_SERVICES, frontends4.len() as u64, services),
            (MAP_SERVICES6, frontends6.len() as u64, services),
            (MAP_BACKENDS, backends4.len() as u64, backends),
            (MAP_BACKENDS6, backends6.len() as u64, backends),
            (MAP_MAGLEV, used_slots, maps.maglev.len() as u64),
        ] {
            gauge!("lb_map_entries", "map" => map).set(entries as f64);
            gauge!("lb_map_capacity", "map" => map).set(capacity as f64);
        }
        gauge!("lb_maglev_tables").set(tables.len() as f64);
        Ok(())
    }
}

/// Family `A`'s frontend entries, in a few batched calls.
fn family_frontends<A: Family>(maps: &Maps) -> Result<Vec<(FrontendKey, ServiceV1)>> {
    let entries: Vec<(ServiceKeyV1<A>, ServiceV1)> = batch::lookup_all(A::of(maps).services.map()).with_context(|| format!("reading {}", A::MAPS[0]))?;
    Ok(entries.into_iter().map(|(key, entry)| (FrontendKey::of(&key), entry)).collect())
}

/// Family `A`'s backends in use (id 0 is never one; a zeroed entry is a free id), as `addr:port`.
fn live_backends<A: Family>(maps: &Maps) -> Result<Vec<(u32, std::net::SocketAddr)>> {
    let entries: Vec<(u32, BackendV1<A>)> = batch::lookup_all(A::of(maps).backends.map()).with_context(|| format!("reading {}", A::MAPS[1]))?;
    Ok(entries.into_iter().filter(|(id, b)| *id != 0 && !b.addr.is_zero()).map(|(id, b)| (id, std::net::SocketAddr::new(b.addr.to_ip(), port_host(b.port)))).collect())
}

/// Conntrack fill levels, from the GC pass that walked the maps anyway.
pub fn export_conntrack(flows: usize, replies: usize, capacity: u32) {
    for (map, entries) in [(MAP_CONNTRACK, flows), (MAP_REVERSE_NAT, replies)] {
        gauge!("lb_map_entries", "map" => map).set(entries as f64);
        gauge!("lb_map_capacity", "map" => map).set(capacity as f64);
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

/// Serves `/metrics`, `/healthz` (liveness) and `/readyz` (ready after the first full sync).
pub async fn serve(addr: SocketAddr, handle: PrometheusHandle, health: Health, scraper: Scraper) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    info!("metrics and health on http://{addr}/metrics, /healthz, /readyz");
    let scraper = Arc::new(scraper);
    crate::health::serve_routes(listener, move |path| {
        if path == "/metrics" {
            if let Err(e) = scraper.export() {
                warn!("reading the datapath counters: {e:#}");
            }
        }
        route(path, &handle, &health)
    })
    .await
}

fn route(path: &str, handle: &PrometheusHandle, health: &Health) -> Reply {
    const TEXT: &str = "text/plain";
    match path {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", handle.render()),
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
