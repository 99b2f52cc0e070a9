//! lbctl: reads the pinned maps directly, so it works while the agent is down.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::dataplane::{
    conntrack::monotonic_ns,
    maps::{Family, Maps},
    BackendEntry, FrontendKey,
};
use lb_common::*;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(version, about = "Inspect the load balancer's maps")]
struct Cli {
    /// Where the agent pinned its maps.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/lb")]
    pin_dir: PathBuf,
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Frontends and what they balance to.
    Service {
        #[command(subcommand)]
        cmd: ListOnly,
    },
    /// Backends, with the services that use them.
    Backend {
        #[command(subcommand)]
        cmd: ListOnly,
    },
    /// A service's Maglev table: slots per backend.
    Maglev {
        #[command(subcommand)]
        cmd: MaglevCmd,
    },
    /// Tracked flows.
    Ct {
        #[command(subcommand)]
        cmd: ListOnly,
    },
    /// Source-NAT bindings (flows to backends on other nodes, hairpin flows).
    Nat {
        #[command(subcommand)]
        cmd: ListOnly,
    },
    /// Session affinity: each client's backend per frontend, and how long ago it was used.
    Affinity {
        #[command(subcommand)]
        cmd: ListOnly,
    },
    /// Verdicts by reason, and totals.
    Stats,
}

#[derive(Subcommand)]
enum ListOnly {
    List,
}

#[derive(Subcommand)]
enum MaglevCmd {
    /// SERVICE is a name (namespace/name:port/PROTO, or namespace/name for all its ports), a
    /// frontend (10.96.0.10:80/TCP, *:30080/TCP for a NodePort) or a service id.
    Get { service: String },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let maps = Maps::open_pinned(&cli.pin_dir)?;
    let rows = match cli.command {
        Command::Service { .. } => services(&maps)?,
        Command::Backend { .. } => backends(&maps)?,
        Command::Maglev { cmd: MaglevCmd::Get { service } } => maglev(&maps, &service)?,
        Command::Ct { .. } => conntrack(&maps)?,
        Command::Nat { .. } => nat(&maps)?,
        Command::Affinity { .. } => affinity(&maps)?,
        Command::Stats => stats(&maps)?,
    };
    print(&rows, cli.output);
    Ok(())
}

/// Rows as ordered (column, value) pairs; JSON keeps them as objects.
type Row = Vec<(&'static str, Value)>;

fn print(rows: &[Row], format: Format) {
    if format == Format::Json {
        let objects: Vec<Value> = rows.iter().map(|r| Value::Object(r.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())).collect();
        println!("{}", serde_json::to_string_pretty(&objects).unwrap());
        return;
    }
    let Some(first) = rows.first() else {
        println!("(none)");
        return;
    };
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    };
    let headers: Vec<String> = first.iter().map(|(k, _)| k.to_uppercase()).collect();
    let table: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|(_, v)| cell(v)).collect()).collect();
    let widths: Vec<usize> = (0..headers.len()).map(|i| table.iter().map(|r| r[i].len()).chain([headers[i].len()]).max().unwrap()).collect();
    let line = |cells: &[String]| cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string();
    println!("{}", line(&headers));
    for r in &table {
        println!("{}", line(r));
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

fn frontend(key: &FrontendKey) -> String {
    format!("{key}/{}", proto_name(key.proto))
}

/// `addr:port` of a map address of either family and a raw port.
fn sock<A: Family>(addr: A, port: u16) -> String {
    SocketAddr::new(addr.to_ip(), port_host(port)).to_string()
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_CLUSTER_IP => "ClusterIP",
        KIND_NODE_PORT => "NodePort",
        KIND_LOAD_BALANCER => "LoadBalancer",
        KIND_EXTERNAL_IP => "ExternalIP",
        _ => "?",
    }
}

fn all_services(maps: &Maps) -> Result<Vec<(FrontendKey, ServiceV1, String)>> {
    let mut out = Vec::new();
    for (key, svc) in maps.all_frontends()? {
        let name = maps.service_names.get(&svc.service_id, 0)?.as_str().to_string();
        out.push((key, svc, name));
    }
    out.sort_by(|a, b| (&a.2, a.0).cmp(&(&b.2, b.0)));
    Ok(out)
}

fn slot_counts(maps: &Maps, svc: &ServiceV1) -> Result<BTreeMap<u32, u32>> {
    let mut counts = BTreeMap::new();
    for id in maps.read_slots(svc.maglev_offset, svc.maglev_size)? {
        *counts.entry(id).or_default() += 1;
    }
    Ok(counts)
}

fn backend_name(maps: &Maps, id: u32) -> String {
    match maps.backend_by_id(id) {
        Some(b) => SocketAddr::new(b.addr(), b.port()).to_string(),
        None => format!("#{id} (gone)"),
    }
}

/// What shapes a frontend beyond its backends: its traffic policy, affinity, source ranges.
fn policy(maps: &Maps, key: &FrontendKey, svc: &ServiceV1, ranges: &HashMap<u32, Vec<(IpAddr, u8)>>) -> String {
    let mut parts = Vec::new();
    if key.scope == SCOPE_LOCAL {
        parts.push("local endpoints only (outside clients)".to_string());
    }
    if svc.flags & F_SVC_EXT_LOCAL != 0 {
        parts.push("externalTrafficPolicy=Local".to_string());
    }
    if svc.flags & F_SVC_AFFINITY != 0 {
        let timeout = maps.service_opts.get(&svc.service_id, 0).map(|o| o.affinity_timeout_s).unwrap_or(0);
        parts.push(format!("affinity=ClientIP/{timeout}s"));
    }
    if svc.flags & F_SVC_SOURCE_RANGES != 0 {
        parts.push(format!("sourceRanges={}", ranges.get(&svc.service_id).map_or(0, Vec::len)));
    }
    parts.join(";")
}

fn services(maps: &Maps) -> Result<Vec<Row>> {
    let mut ranges = HashMap::new();
    maps.source_ranges_into::<Addr4>(&mut ranges)?;
    maps.source_ranges_into::<Addr6>(&mut ranges)?;
    all_services(maps)?
        .into_iter()
        .map(|(key, svc, name)| {
            let c = maps.service_counters(svc.service_id)?;
            let backends: Vec<Value> = slot_counts(maps, &svc)?.keys().map(|id| json!(backend_name(maps, *id))).collect();
            Ok(vec![
                ("id", json!(svc.service_id)),
                ("name", json!(name)),
                ("kind", json!(kind_name(svc.kind))),
                ("frontend", json!(frontend(&key))),
                ("backends", Value::Array(backends)),
                ("table", json!(format!("{}+{}", svc.maglev_offset, svc.maglev_size))),
                ("policy", json!(policy(maps, &key, &svc, &ranges))),
                ("packets", json!(c.packets)),
                ("bytes", json!(c.bytes)),
            ])
        })
        .collect()
}

fn affinity(maps: &Maps) -> Result<Vec<Row>> {
    let names: BTreeMap<u32, (String, String)> = all_services(maps)?.into_iter().map(|(key, svc, name)| (svc.service_id, (name, frontend(&key)))).collect();
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for entry in maps.affinity.iter() {
        let (key, value) = entry?;
        let Some((name, frontend)) = names.get(&key.service_id) else { continue };
        let c = key.client;
        let client = match key.client_kind {
            AFFINITY_CLIENT_IP4 => Ipv4Addr::new(c[0], c[1], c[2], c[3]).to_string(),
            AFFINITY_CLIENT_IP6 => Ipv6Addr::from(c).to_string(),
            _ => format!("netns {}", u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        };
        rows.push(vec![
            ("service", json!(name)),
            ("frontend", json!(frontend)),
            ("client", json!(client)),
            ("backend", json!(backend_name(maps, value.backend_id))),
            ("idle_s", json!((now.saturating_sub(value.last_seen_ns) / 1_000_000_000) as u64)),
        ]);
    }
    rows.sort_by(|a, b| a[0].1.to_string().cmp(&b[0].1.to_string()).then(a[2].1.to_string().cmp(&b[2].1.to_string())));
    Ok(rows)
}

fn backends(maps: &Maps) -> Result<Vec<Row>> {
    let mut users: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (_, svc, name) in all_services(maps)? {
        for id in slot_counts(maps, &svc)?.keys() {
            let list = users.entry(*id).or_default();
            if !list.contains(&name) {
                list.push(name.clone());
            }
        }
    }
    users
        .into_iter()
        .map(|(id, services)| {
            let local = match maps.backend_by_id(id) {
                Some(BackendEntry::V4(b)) => b.flags & F_BACKEND_LOCAL != 0,
                Some(BackendEntry::V6(b)) => b.flags & F_BACKEND_LOCAL != 0,
                None => false,
            };
            let c = maps.backend_counters(id)?;
            Ok(vec![
                ("id", json!(id)),
                ("address", json!(backend_name(maps, id))),
                ("local", json!(local)),
                ("services", json!(services)),
                ("packets", json!(c.packets)),
                ("bytes", json!(c.bytes)),
            ])
        })
        .collect()
}

fn maglev(maps: &Maps, query: &str) -> Result<Vec<Row>> {
    let matches: Vec<_> = all_services(maps)?
        .into_iter()
        .filter(|(key, svc, name)| {
            name == query || name.starts_with(&format!("{query}:")) || frontend(key) == query || svc.service_id.to_string() == query
        })
        .collect();
    if matches.is_empty() {
        bail!("no service matches {query:?} (try `lbctl service list`)");
    }
    let mut rows = Vec::new();
    for (key, svc, name) in matches {
        for (id, slots) in slot_counts(maps, &svc)? {
            rows.push(vec![
                ("service", json!(name)),
                ("frontend", json!(frontend(&key))),
                ("backend", json!(backend_name(maps, id))),
                ("slots", json!(slots)),
                ("share", json!(format!("{:.2}%", 100.0 * slots as f64 / svc.maglev_size as f64))),
                ("table_size", json!(svc.maglev_size)),
            ]);
        }
    }
    Ok(rows)
}

fn tcp_state(proto: u8, fwd: u8, rev: u8) -> &'static str {
    if proto != IPPROTO_TCP {
        return "-";
    }
    let both = fwd | rev;
    if both & TCP_RST != 0 {
        "reset"
    } else if both & TCP_FIN != 0 {
        "closing"
    } else if rev & TCP_ACK != 0 {
        "established"
    } else {
        "syn-sent"
    }
}

fn conntrack(maps: &Maps) -> Result<Vec<Row>> {
    let mut rows = family_conntrack::<Addr4>(maps)?;
    rows.extend(family_conntrack::<Addr6>(maps)?);
    Ok(rows)
}

fn family_conntrack<A: Family>(maps: &Maps) -> Result<Vec<Row>> {
    let now = monotonic_ns();
    let mut rows = Vec::new();
    let family = A::of(maps);
    for entry in family.conntrack.iter() {
        let (key, ct) = entry?;
        let backend = family.backends.get(&ct.backend_id, 0).unwrap_or_default();
        let reply = lb_agent::dataplane::conntrack::reply_key(&key, &ct, &backend);
        let rev = family.reverse_nat.get(&reply, 0).map(|r| r.tcp_flags_seen).unwrap_or(0);
        let name = maps.service_names.get(&ct.service_id, 0).map(|n| n.as_str().to_string()).unwrap_or_default();
        rows.push(vec![
            ("proto", json!(proto_name(key.proto))),
            ("client", json!(sock(key.src_addr, key.src_port))),
            ("frontend", json!(sock(key.dst_addr, key.dst_port))),
            ("backend", json!(backend_name(maps, ct.backend_id))),
            ("service", json!(name)),
            ("state", json!(tcp_state(key.proto, ct.tcp_flags_seen, rev))),
            ("snat", json!(if ct.flags & F_CT_SNAT != 0 { sock(ct.nat_addr, ct.nat_port) } else { "-".into() })),
            ("idle_s", json!(now.saturating_sub(ct.last_seen_ns) / 1_000_000_000)),
        ]);
    }
    Ok(rows)
}

fn nat(maps: &Maps) -> Result<Vec<Row>> {
    let mut rows = family_nat::<Addr4>(maps)?;
    rows.extend(family_nat::<Addr6>(maps)?);
    Ok(rows)
}

fn family_nat<A: Family>(maps: &Maps) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for entry in A::of(maps).reverse_nat.iter() {
        let (key, r) = entry?;
        if r.flags & F_CT_SNAT == 0 {
            continue;
        }
        rows.push(vec![
            ("proto", json!(proto_name(key.proto))),
            ("node_binding", json!(sock(key.dst_addr, key.dst_port))),
            ("backend", json!(sock(key.src_addr, key.src_port))),
            ("client", json!(sock(r.dst_addr, r.dst_port))),
            ("frontend", json!(sock(r.src_addr, r.src_port))),
        ]);
    }
    Ok(rows)
}

fn stats(maps: &Maps) -> Result<Vec<Row>> {
    let counts = maps.reason_counts()?;
    Ok(reason::NAMES.iter().zip(counts).map(|(name, packets)| vec![("reason", json!(name)), ("packets", json!(packets))]).collect())
}
