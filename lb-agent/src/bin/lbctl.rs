//! lbctl: reads the pinned maps directly, so it works while the agent is down.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use aya::maps::IterableMap;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use lb_agent::dataplane::{
    conntrack::monotonic_ns,
    maps::{Family, Maps},
    BackendEntry, FrontendKey,
};
use lb_common::*;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Inspect the load balancer's maps and its agent on this node")]
struct Cli {
    /// Where the agent pinned its maps (the agent's --pin-dir).
    #[arg(long, global = true, default_value = "/sys/fs/bpf/lb")]
    pin_dir: PathBuf,
    /// The agent's metrics address (its --metrics-addr), asked by `status`.
    #[arg(long, global = true, default_value = "127.0.0.1:9970")]
    agent: String,
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Leave out the header line of tables.
    #[arg(long, global = true)]
    no_headers: bool,
    /// Only rows of Services in this namespace.
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Only rows of this Service (`name`, or `namespace/name`).
    #[arg(long, global = true)]
    service: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns, the most useful ones.
    Table,
    /// Aligned columns, all of them.
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// The agent (up, version, mode, attachments, last sync, rejected Services) and how full
    /// each map is.
    Status,
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
        cmd: CtCmd,
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
    /// LoadBalancer addresses from the pools: Service, pool, the node that answers ARP/NDP
    /// for each and since when (asked of the agent, as `status` is).
    Address {
        #[command(subcommand)]
        cmd: ListOnly,
    },
    /// Pods lb-cni wired on this node: address, pod, host device, MAC.
    Endpoint {
        #[command(subcommand)]
        cmd: ListOnly,
    },
    /// NetworkPolicy on this node: `list` the policies (rules written, new flows allowed),
    /// `identities`, `endpoints` (each pod's isolation, policies and denied packets). Names
    /// are asked of the agent, counters read from the maps.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Flow events of this node's datapath (drops and refusals, with their reason, 5-tuple,
    /// Service and pods), from the agent's unix socket: the last ones held, then new ones with
    /// `--follow`. `-o json` prints one JSON object a line; other formats one line each.
    Observe(ObserveArgs),
    /// The path a new packet from SRC (ip:port) to DST (ip:port/PROTO; IPv6 in brackets) would
    /// take now, read from the live maps with the datapath's own steps: the frontend, source
    /// ranges, a tracked flow, affinity, the flow hash and Maglev slot, the backend, SNAT, the
    /// verdict.
    Explain {
        src: String,
        dst: String,
        /// Where the packet comes from: a client outside the node (XDP) or a pod (TC).
        #[arg(long, value_enum, default_value_t = Origin::Outside)]
        from: Origin,
    },
    /// A shell completion script: `lbctl completion bash > /etc/bash_completion.d/lbctl`.
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ListOnly {
    List,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Origin {
    Outside,
    Pod,
}

#[derive(clap::Args)]
struct ObserveArgs {
    /// The agent's flow-event socket (its --events-socket).
    #[arg(long, default_value = "/run/lb-agent/events.sock")]
    socket: PathBuf,
    /// How many of the held events (the last that pass the filters) to print first
    /// [default: 20, or 0 with --follow, or all with --since].
    #[arg(long)]
    last: Option<usize>,
    /// Keep printing new events as they come.
    #[arg(short, long)]
    follow: bool,
    /// Only events since this long ago (`30s`, `5m`, `2h`) or this time (RFC 3339); every
    /// held event that recent is printed (unless `--last` is given).
    #[arg(long)]
    since: Option<String>,
    /// Only `dropped`, `rejected`, `translated`, `allowed` or `closed` events.
    #[arg(long)]
    verdict: Option<String>,
    /// Only events of this reason (`drop_source_range`, ...; see `lbctl stats`).
    #[arg(long)]
    reason: Option<String>,
    /// Only events with this pod (`namespace/name`, or `name`) at either end.
    #[arg(long)]
    pod: Option<String>,
    /// Only events with this address at either end.
    #[arg(long)]
    ip: Option<IpAddr>,
    /// Only events with this port at either end.
    #[arg(long)]
    port: Option<u16>,
    /// Only `TCP` or `UDP` events.
    #[arg(long)]
    protocol: Option<String>,
}

#[derive(Subcommand)]
enum PolicyCmd {
    List,
    Identities,
    Endpoints,
}

#[derive(Subcommand)]
enum CtCmd {
    List,
    /// Forget tracked flows (all, or those of --namespace/--service): their next packets are
    /// balanced as new flows, as `conntrack -F` does for kube-proxy.
    Flush,
}

#[derive(Subcommand)]
enum MaglevCmd {
    /// SERVICE is a name (namespace/name:port/PROTO, or namespace/name for all its ports), a
    /// frontend (10.96.0.10:80/TCP, *:30080/TCP for a NodePort) or a service id.
    Get {
        #[arg(value_name = "SERVICE")]
        query: String,
    },
}

/// Columns that only `-o wide` shows (JSON and YAML always have every column).
const WIDE_ONLY: [&str; 4] = ["id", "table", "bytes", "table_size"];

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("lbctl: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    if let Command::Completion { shell } = &cli.command {
        clap_complete::generate(*shell, &mut Cli::command(), "lbctl", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Observe(args) = &cli.command {
        return observe(cli, args);
    }
    let maps = open_maps(&cli.pin_dir)?;
    if let Command::Explain { src, dst, from } = &cli.command {
        return explain(&maps, cli, src, dst, *from);
    }
    let filter = Filter { namespace: cli.namespace.as_deref(), service: cli.service.as_deref() };
    let rows = match &cli.command {
        Command::Status => return status(&maps, cli),
        Command::Service { .. } => services(&maps)?,
        Command::Backend { .. } => backends(&maps)?,
        Command::Maglev { cmd: MaglevCmd::Get { query } } => maglev(&maps, query)?,
        Command::Ct { cmd: CtCmd::List } => conntrack(&maps)?,
        Command::Ct { cmd: CtCmd::Flush } => {
            let flushed = flush_conntrack(&maps, &filter)?;
            println!("flushed {flushed} tracked flows");
            return Ok(());
        }
        Command::Nat { .. } => nat(&maps)?,
        Command::Affinity { .. } => affinity(&maps)?,
        Command::Stats => stats(&maps)?,
        Command::Address { .. } => addresses(&maps, &cli.agent)?,
        Command::Endpoint { .. } => endpoints(&cli.pin_dir)?,
        Command::Policy { cmd } => network_policy(&cli.pin_dir, &cli.agent, cmd)?,
        Command::Completion { .. } | Command::Observe(_) | Command::Explain { .. } => unreachable!("handled above"),
    };
    let rows: Vec<Row> = rows.into_iter().filter(|r| filter.keeps(r)).collect();
    print(&rows, cli.output, cli.no_headers);
    Ok(())
}

/// The pinned maps, or an error that says what to check.
fn open_maps(pin_dir: &std::path::Path) -> Result<Maps> {
    if !pin_dir.exists() {
        bail!(
            "no pinned maps at {}: is lb-agent running on this node? It pins its maps there unless started with another --pin-dir (then pass the same --pin-dir here)",
            pin_dir.display()
        );
    }
    Maps::open_pinned(pin_dir).map_err(|e| {
        // SAFETY: geteuid has no preconditions.
        let hint = if unsafe { libc::geteuid() } != 0 {
            "reading BPF maps needs root (CAP_BPF and CAP_SYS_ADMIN): run lbctl as root, or through `kubectl exec` in the agent's pod"
        } else {
            "the agent that pinned them may be of another version than this lbctl (see `lb-agent --version`)"
        };
        e.context(format!("opening the maps in {} ({hint})", pin_dir.display()))
    })
}

/// `--namespace` and `--service`: which rows of Services to keep.
struct Filter<'a> {
    namespace: Option<&'a str>,
    service: Option<&'a str>,
}

impl Filter<'_> {
    /// A row is kept when one of the Services it names (`namespace/name:port/PROTO`) matches;
    /// rows that name no Service (stats) are kept.
    fn keeps(&self, row: &Row) -> bool {
        if self.namespace.is_none() && self.service.is_none() {
            return true;
        }
        let mut named = row.iter().filter(|(k, _)| matches!(*k, "name" | "service" | "services")).peekable();
        if named.peek().is_none() {
            return true;
        }
        let mut names = named.flat_map(|(_, v)| match v {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        });
        names.any(|full| self.matches(full))
    }

    fn matches(&self, full: &str) -> bool {
        let (namespace, rest) = full.split_once('/').unwrap_or(("", full));
        let name = rest.split(':').next().unwrap_or(rest);
        self.namespace.is_none_or(|n| n == namespace)
            && self.service.is_none_or(|s| match s.split_once('/') {
                Some((n, s)) => n == namespace && s == name,
                None => s == name,
            })
    }
}

/// Rows as ordered (column, value) pairs; JSON and YAML keep them as objects.
type Row = Vec<(&'static str, Value)>;

fn print(rows: &[Row], format: Format, no_headers: bool) {
    let objects = || -> Vec<Value> { rows.iter().map(|r| Value::Object(r.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())).collect() };
    match format {
        Format::Json => return println!("{}", serde_json::to_string_pretty(&objects()).unwrap()),
        Format::Yaml => return print!("{}", serde_yaml_ng::to_string(&objects()).unwrap()),
        Format::Table | Format::Wide => {}
    }
    let Some(first) = rows.first() else {
        if !no_headers {
            println!("(none)");
        }
        return;
    };
    let shown: Vec<usize> = (0..first.len()).filter(|i| format == Format::Wide || !WIDE_ONLY.contains(&first[*i].0)).collect();
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    };
    let headers: Vec<String> = shown.iter().map(|i| first[*i].0.to_uppercase()).collect();
    let table: Vec<Vec<String>> = rows.iter().map(|r| shown.iter().map(|i| cell(&r[*i].1)).collect()).collect();
    let widths: Vec<usize> = (0..headers.len()).map(|i| table.iter().map(|r| r[i].len()).chain([if no_headers { 0 } else { headers[i].len() }]).max().unwrap()).collect();
    let line = |cells: &[String]| cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string();
    if !no_headers {
        println!("{}", line(&headers));
    }
    for r in &table {
        println!("{}", line(r));
    }
}

/// `lbctl status`: the agent's own report (GET /status) and the fill of every map. Exits
/// non-zero when the agent does not answer, after printing what the maps say.
fn status(maps: &Maps, cli: &Cli) -> Result<()> {
    let agent = agent_status(&cli.agent);
    let fill = map_fill(maps)?;
    let report = json!({
        "agent": match &agent {
            Ok(status) => serde_json::to_value(status)?,
            Err(e) => json!({"reachable": false, "error": format!("{e:#}")}),
        },
        "maps": fill.iter().map(|(map, entries, capacity)| json!({"map": map, "entries": entries, "capacity": capacity})).collect::<Vec<_>>(),
    });
    match cli.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(&report)?),
        Format::Table | Format::Wide => {
            match &agent {
                Ok(a) => {
                    let now = lb_agent::status::unix_now();
                    println!("Agent:      up, version {}, node {}, {} ({})", a.version, a.node, a.mode, a.source);
                    println!("Started:    {} s ago", now.saturating_sub(a.started_unix));
                    let synced = if a.last_sync_unix == 0 { "not yet".to_string() } else { format!("{} s ago", now.saturating_sub(a.last_sync_unix)) };
                    println!("Last sync:  {synced}{}", if a.synced { "" } else { " (first full sync not done)" });
                    let mut by_program: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                    for at in &a.attached {
                        by_program.entry(&at.program).or_default().push(&at.target);
                    }
                    println!("Programs:");
                    for (program, targets) in by_program {
                        println!("  {program:<22} {}", targets.join(", "));
                    }
                    for pool in &a.pools {
                        println!("Pool:       {} {} of {} addresses in use", pool.name, pool.used, pool.size);
                    }
                    println!("Rejected:   {}", if a.rejected.is_empty() { "none" } else { "" });
                    for (service, why) in &a.rejected {
                        println!("  {service}: {why}");
                    }
                }
                Err(e) => println!("Agent:      not reachable at {} ({e:#}): is lb-agent running? (--agent names its --metrics-addr)", cli.agent),
            }
            println!("Maps:       {}", cli.pin_dir.display());
            let rows: Vec<Row> = fill
                .iter()
                .map(|(map, entries, capacity)| vec![("map", json!(map)), ("entries", json!(entries)), ("capacity", json!(capacity)), ("fill", json!(format!("{:.1}%", 100.0 * *entries as f64 / (*capacity).max(1) as f64)))])
                .collect();
            print(&rows, cli.output, cli.no_headers);
        }
    }
    if agent.is_err() {
        std::process::exit(1);
    }
    Ok(())
}

/// GET http://ADDR/status.
fn agent_status(addr: &str) -> Result<lb_agent::status::AgentStatus> {
    lb_agent::status::fetch(addr, std::time::Duration::from_secs(2))
}

/// (map, entries, capacity) of the maps that fill up.
fn map_fill(maps: &Maps) -> Result<Vec<(&'static str, u64, u64)>> {
    let count = |map: &aya::maps::MapData, key: usize, value: usize| -> Result<u64> { Ok(lb_agent::dataplane::batch::count(map, key, value)? as u64) };
    let capacity = |map: &aya::maps::MapData| -> Result<u64> { Ok(map.info()?.max_entries() as u64) };
    let (services, backends) = (maps.service_names.len() as u64, maps.v4.backends.len() as u64 - 1);
    let used_slots: u64 = {
        let tables: std::collections::HashSet<(u32, u32)> = maps.all_frontends()?.iter().map(|(_, s)| (s.maglev_offset, s.maglev_size)).collect();
        tables.iter().map(|(_, size)| *size as u64).sum()
    };
    let (backends4, backends6) = (maps.live_backends::<Addr4>()?.len() as u64, maps.live_backends::<Addr6>()?.len() as u64);
    use std::mem::size_of;
    Ok(vec![
        (MAP_SERVICES, maps.frontends::<Addr4>()?.len() as u64, services),
        (MAP_SERVICES6, maps.frontends::<Addr6>()?.len() as u64, services),
        (MAP_BACKENDS, backends4, backends),
        (MAP_BACKENDS6, backends6, backends),
        (MAP_MAGLEV, used_slots, maps.maglev_slots() as u64),
        (MAP_CONNTRACK, count(maps.v4.conntrack.map(), size_of::<Ct4KeyV1>(), size_of::<Ct4EntryV1>())?, capacity(maps.v4.conntrack.map())?),
        (MAP_REVERSE_NAT, count(maps.v4.reverse_nat.map(), size_of::<Ct4KeyV1>(), size_of::<RevNat4V1>())?, capacity(maps.v4.reverse_nat.map())?),
        (MAP_CONNTRACK6, count(maps.v6.conntrack.map(), size_of::<Ct6KeyV1>(), size_of::<Ct6EntryV1>())?, capacity(maps.v6.conntrack.map())?),
        (MAP_REVERSE_NAT6, count(maps.v6.reverse_nat.map(), size_of::<Ct6KeyV1>(), size_of::<RevNat6V1>())?, capacity(maps.v6.reverse_nat.map())?),
        (MAP_AFFINITY, count(maps.affinity.map(), size_of::<AffinityKeyV1>(), size_of::<AffinityV1>())?, capacity(maps.affinity.map())?),
    ])
}

/// Deletes the tracked flows the filter keeps, and the reverse-NAT entries of their replies.
fn flush_conntrack(maps: &Maps, filter: &Filter) -> Result<usize> {
    Ok(family_flush::<Addr4>(maps, filter)? + family_flush::<Addr6>(maps, filter)?)
}

fn family_flush<A: Family>(maps: &Maps, filter: &Filter) -> Result<usize> {
    let family = A::of(maps);
    let entries: Vec<(CtKeyV1<A>, CtEntryV1<A>)> = lb_agent::dataplane::batch::lookup_all(family.conntrack.map())?;
    let mut flows = Vec::new();
    let mut replies = Vec::new();
    for (key, ct) in entries {
        let name = maps.service_names.get(&ct.service_id, 0).map(|n| n.as_str().to_string()).unwrap_or_default();
        if (filter.namespace.is_some() || filter.service.is_some()) && !filter.matches(&name) {
            continue;
        }
        let backend = family.backends.get(&ct.backend_id, 0).unwrap_or_default();
        replies.push(lb_agent::dataplane::conntrack::reply_key(&key, &ct, &backend));
        flows.push(key);
    }
    lb_agent::dataplane::batch::delete(family.conntrack.map(), &flows)?;
    lb_agent::dataplane::batch::delete(family.reverse_nat.map(), &replies)?;
    Ok(flows.len())
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
        let name = maps.service_names.get(&r.service_id, 0).map(|n| n.as_str().to_string()).unwrap_or_default();
        rows.push(vec![
            ("proto", json!(proto_name(key.proto))),
            ("node_binding", json!(sock(key.dst_addr, key.dst_port))),
            ("backend", json!(sock(key.src_addr, key.src_port))),
            ("client", json!(sock(r.dst_addr, r.dst_port))),
            ("frontend", json!(sock(r.src_addr, r.src_port))),
            ("service", json!(name)),
        ]);
    }
    Ok(rows)
}

/// Pool addresses as the agent sees them, and whether this node's XDP answers for each now.
fn addresses(maps: &Maps, agent: &str) -> Result<Vec<Row>> {
    let status = agent_status(agent).with_context(|| format!("asking the agent at {agent} (--agent names its --metrics-addr)"))?;
    let now = lb_agent::dataplane::conntrack::monotonic_ns();
    let answered: Vec<std::net::IpAddr> = maps.announced::<Addr4>().into_iter().chain(maps.announced::<Addr6>()).filter(|(_, _, e)| e.expires_ns > now).map(|(_, ip, _)| ip).collect();
    let unix_now = lb_agent::status::unix_now();
    Ok(status
        .addresses
        .iter()
        .map(|a| {
            vec![
                ("address", json!(a.address.to_string())),
                ("service", json!(a.service)),
                ("pool", json!(a.pool)),
                ("owner", json!(if a.owner.is_empty() { "none" } else { &a.owner })),
                ("since_s", json!(unix_now.saturating_sub(a.since_unix))),
                ("answered_here", json!(answered.contains(&a.address))),
            ]
        })
        .collect())
}

fn endpoints(pin_dir: &std::path::Path) -> Result<Vec<Row>> {
    let endpoints = lb_agent::dataplane::endpoints::Endpoints::open_pinned(pin_dir)?;
    let links: HashMap<u32, String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| dir.flatten().filter_map(|e| Some((std::fs::read_to_string(e.path().join("ifindex")).ok()?.trim().parse().ok()?, e.file_name().to_string_lossy().into_owned()))).collect())
        .unwrap_or_default();
    Ok(endpoints
        .list()
        .into_iter()
        .map(|(ip, e)| {
            vec![
                ("address", json!(ip.to_string())),
                ("pod", json!(if e.pod().is_empty() { "-" } else { e.pod() })),
                ("device", json!(links.get(&e.ifindex).cloned().unwrap_or_else(|| format!("ifindex {} (gone)", e.ifindex)))),
                ("ifindex", json!(e.ifindex)),
                ("mac", json!(lb_agent::node::mac_text(&e.mac))),
            ]
        })
        .collect())
}

fn network_policy(pin_dir: &std::path::Path, agent: &str, cmd: &PolicyCmd) -> Result<Vec<Row>> {
    let body = lb_agent::status::get(agent, "/policy", std::time::Duration::from_secs(2)).with_context(|| format!("asking the agent at {agent} (--agent) for its NetworkPolicy view; it answers 404 when started with --network-policy=false"))?;
    let view: lb_agent::netpol::PolicyView = serde_json::from_str(&body).context("not the policy view of an lb-agent")?;
    // Counters as they are now, from the maps.
    let maps = lb_agent::dataplane::policy::PolicyMaps::open_pinned(pin_dir)?;
    let names = |list: &[String]| if list.is_empty() { "-".to_string() } else { list.join(",") };
    Ok(match cmd {
        PolicyCmd::List => view
            .policies
            .iter()
            .map(|p| {
                vec![
                    ("policy", json!(p.name)),
                    ("version", json!(p.version.as_deref().unwrap_or("-"))),
                    ("id", json!(p.id)),
                    ("rules", json!(p.rules)),
                    ("allowed", json!(p.id.map_or(0, |id| maps.allowed(id)))),
                ]
            })
            .collect(),
        PolicyCmd::Identities => view.identities.iter().map(|i| vec![("identity", json!(i.id)), ("labels", json!(i.labels))]).collect(),
        PolicyCmd::Endpoints => view
            .endpoints
            .iter()
            .map(|e| {
                let isolated = match (e.ingress_isolated, e.egress_isolated) {
                    (true, true) => "ingress,egress",
                    (true, false) => "ingress",
                    (false, true) => "egress",
                    (false, false) => "-",
                };
                vec![
                    ("address", json!(e.address.to_string())),
                    ("pod", json!(e.pod)),
                    ("identity", json!(e.identity)),
                    ("isolated", json!(isolated)),
                    ("policies", json!(names(&e.policies))),
                    ("denied_ingress", json!(e.endpoint.map_or(0, |id| maps.denied(id, POLICY_INGRESS)))),
                    ("denied_egress", json!(e.endpoint.map_or(0, |id| maps.denied(id, POLICY_EGRESS)))),
                ]
            })
            .collect(),
    })
}

/// `lbctl observe`: asks the agent's socket, filters, prints.
fn observe(cli: &Cli, args: &ObserveArgs) -> Result<()> {
    use std::io::{BufRead, Write};
    use lb_agent::events::{FlowEvent, Line, Request};
    let since = match &args.since {
        None => None,
        Some(text) => Some(match text.parse::<jiff::Timestamp>() {
            Ok(t) => t,
            Err(_) => {
                let not_a_time = || format!("--since {text:?} is neither a duration (30s, 5m, 2h, 1d) nor an RFC 3339 time");
                let span: jiff::Span = text.parse().with_context(not_a_time)?;
                let span = span.to_duration(jiff::SpanRelativeTo::days_are_24_hours()).with_context(not_a_time)?;
                jiff::Timestamp::now() - span
            }
        }),
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&args.socket).with_context(|| format!("connecting to {} (the agent's --events-socket): is lb-agent running on this node?", args.socket.display()))?;
    let last = args.last.unwrap_or(if args.follow { 0 } else if since.is_some() { usize::MAX } else { 20 });
    // Filters look at everything held; the last N that pass are printed.
    let filtered = since.is_some() || args.verdict.is_some() || args.reason.is_some() || args.pod.is_some() || args.ip.is_some() || args.port.is_some() || args.protocol.is_some() || cli.namespace.is_some() || cli.service.is_some();
    let request = Request { last: if filtered { usize::MAX } else { last }, follow: args.follow };
    writeln!(stream, "{}", serde_json::to_string(&request)?)?;
    let name_matches = |name: &Option<String>, want: &str| name.as_deref().is_some_and(|n| n == want || n.rsplit('/').next() == Some(want));
    let keep = |e: &FlowEvent| {
        args.verdict.as_deref().is_none_or(|v| e.verdict.eq_ignore_ascii_case(v))
            && args.reason.as_deref().is_none_or(|r| e.reason == r)
            && args.pod.as_deref().is_none_or(|p| name_matches(&e.src_name, p) || name_matches(&e.dst_name, p))
            && args.ip.is_none_or(|ip| e.src == Some(ip) || e.dst == Some(ip))
            && args.port.is_none_or(|port| e.src_port == Some(port) || e.dst_port == Some(port))
            && args.protocol.as_deref().is_none_or(|p| e.protocol.eq_ignore_ascii_case(p))
            && cli.namespace.as_deref().is_none_or(|ns| e.service.as_deref().is_some_and(|s| s.starts_with(&format!("{ns}/"))))
            && cli.service.as_deref().is_none_or(|svc| e.service.as_deref().is_some_and(|s| s.split(':').next().is_some_and(|name| name == svc || name.rsplit('/').next() == Some(svc))))
            && since.is_none_or(|t| e.time.parse::<jiff::Timestamp>().is_ok_and(|at| at >= t))
    };
    let json = matches!(cli.output, Format::Json | Format::Yaml);
    let mut out = std::io::stdout().lock();
    let print = |out: &mut std::io::StdoutLock, e: &FlowEvent| -> Result<()> {
        writeln!(out, "{}", if json { serde_json::to_string(e)? } else { compact(e) })?;
        Ok(())
    };
    // The held events that pass, until the agent says they are all sent.
    let mut held = std::collections::VecDeque::new();
    let mut following = false;
    for line in std::io::BufReader::new(stream).lines() {
        match serde_json::from_str::<Line>(&line?)? {
            Line::Event(e) if !keep(&e) => {}
            Line::Event(e) if following => print(&mut out, &e)?,
            Line::Event(e) => {
                held.push_back(e);
                if held.len() > last {
                    held.pop_front();
                }
            }
            Line::Held { .. } => {
                for e in held.drain(..) {
                    print(&mut out, &e)?;
                }
                following = true;
            }
            Line::Missed { missed } => writeln!(out, "... {missed} events missed (this reader fell behind)")?,
        }
        out.flush()?;
    }
    Ok(())
}

/// `lbctl explain`: each step on a line, or the whole explanation as JSON.
fn explain(maps: &Maps, cli: &Cli, src: &str, dst: &str, from: Origin) -> Result<()> {
    let src: SocketAddr = src.parse().with_context(|| format!("{src:?} is not ip:port ([ip]:port for IPv6)"))?;
    let (dst_text, proto) = dst.rsplit_once('/').with_context(|| format!("{dst:?} is not ip:port/PROTO"))?;
    let dst: SocketAddr = dst_text.parse().with_context(|| format!("{dst_text:?} is not ip:port ([ip]:port for IPv6)"))?;
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => IPPROTO_TCP,
        "UDP" => IPPROTO_UDP,
        other => bail!("protocol {other:?}: TCP or UDP"),
    };
    let from = if from == Origin::Pod { lb_agent::explain::From::Pod } else { lb_agent::explain::From::Outside };
    // Policies are named by the agent; without it, by number.
    let policy_maps = lb_agent::dataplane::policy::PolicyMaps::open_pinned(&cli.pin_dir).ok();
    let names: std::collections::HashMap<u32, String> = lb_agent::status::get(&cli.agent, "/policy", std::time::Duration::from_millis(500))
        .ok()
        .and_then(|body| serde_json::from_str::<lb_agent::netpol::PolicyView>(&body).ok())
        .map(|view| view.policies.into_iter().filter_map(|p| Some((p.id?, p.name))).collect())
        .unwrap_or_default();
    let policy = policy_maps.as_ref().map(|maps| lb_agent::explain::PolicyContext { maps, names: &names });
    let e = lb_agent::explain::explain(maps, policy.as_ref(), src, dst, proto, from)?;
    if matches!(cli.output, Format::Json | Format::Yaml) {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        for step in &e.steps {
            println!("{step}");
        }
        println!("verdict: {}", e.verdict);
    }
    Ok(())
}

/// One event on one line: time, verdict, reason, where, the tuple, the names.
fn compact(e: &lb_agent::events::FlowEvent) -> String {
    let end = |ip: Option<IpAddr>, port: Option<u16>, name: &Option<String>| match (ip, port) {
        (Some(IpAddr::V6(ip)), Some(port)) => format!("[{ip}]:{port}"),
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        _ => "?".into(),
    } + &name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default();
    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let mut line = format!("{} {} {} {} {} {}", e.time, e.verdict, e.reason, e.hook, or_dash(&e.device), or_dash(&e.protocol));
    if e.src.is_some() {
        line += &format!(" {} -> {}", end(e.src, e.src_port, &e.src_name), end(e.dst, e.dst_port, &e.dst_name));
    }
    if let Some(service) = &e.service {
        line += &format!(" service {service}");
    }
    if let Some(backend) = e.backend {
        line += &format!(" backend {backend}");
    }
    if let Some(snat) = e.snat {
        line += &format!(" snat {snat}");
    }
    if let (Some(policy), Some(direction)) = (&e.policy, &e.direction) {
        line += &format!(" {direction} policy {policy}");
    }
    line
}

fn stats(maps: &Maps) -> Result<Vec<Row>> {
    let counts = maps.reason_counts()?;
    Ok(reason::NAMES.iter().zip(counts).map(|(name, packets)| vec![("reason", json!(name)), ("packets", json!(packets))]).collect())
}
