//! The control plane at scale: N Services (3 endpoints each, ClusterIP, and a NodePort on as
//! many as the NodePort range holds) given to a real agent, in standalone mode (manifest files,
//! 100 Services to a file) and in Kubernetes mode (the list/watch stand-in). Measured from the
//! outside, as an operator would: the agent's readiness, the pinned maps, /proc.
//!
//! - cold start: agent started -> `/readyz` 200 (every frontend in the maps, checked after);
//! - edit to map: one EndpointSlice's endpoint replaced -> that Service's entry in
//!   `LB4_SVC_V1` points at a table naming the new backend (checked for each edit);
//! - churn: edits at a fixed rate to random Services, each timed the same way;
//! - agent RSS and the memory of its BPF maps (`memlock` of each map it holds, once);
//! - CPU while nothing changes (utime + stime from /proc over the idle window).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_agent::dataplane::maps::Maps;
use lb_common::*;
use serde_json::{json, Value};
use testbed::{apiserver::FakeApiServer, bpffs::BpfMount, netns::Netns, process::AgentProcess};


pub const MODES: [&str; 2] = ["standalone", "kubernetes"];
/// NodePorts go from here up, one per Service while they last (a widened
/// `--service-node-port-range`; the default range holds 2,768).
const NODE_PORT_BASE: u32 = 20_000;
const NODE_PORTS: usize = 30_000;
const SERVICES_PER_FILE: usize = 100;

pub struct Config {
    pub sizes: Vec<usize>,
    pub edits: usize,
    /// Edits per second tried for churn, each for `churn_for`.
    pub churn_rates: Vec<u32>,
    pub churn_for: Duration,
    pub idle_for: Duration,
    pub agent_bin: PathBuf,
    pub work_dir: PathBuf,
}

pub struct Row {
    pub mode: &'static str,
    pub services: usize,
    pub frontends: usize,
    pub cold_start_s: f64,
    /// Edit-to-map latencies, ms.
    pub edit_ms: Vec<f64>,
    /// (rate asked, edits done per second, p99 ms, edits not seen within 10 s).
    pub churn: Vec<(u32, f64, f64, usize)>,
    pub rss_mib: f64,
    pub bpf_mib: f64,
    pub idle_cpu_pct: f64,
}

impl Row {
    pub fn edit_p(&self, q: f64) -> f64 {
        percentile(&self.edit_ms, q)
    }

    /// The highest churn rate whose p99 stayed under 100 ms with every edit seen.
    pub fn sustained(&self) -> Option<(u32, f64)> {
        self.churn.iter().filter(|(_, _, p99, lost)| *p99 < 100.0 && *lost == 0).map(|(r, done, _, _)| (*r, *done)).last()
    }
}

pub fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() as f64 - 1.0) * q).round() as usize]
}

fn cluster_ip(i: usize) -> String {
    let a = 0x0a60_0001u32 + i as u32; // 10.96.0.1 onwards
    std::net::Ipv4Addr::from(a).to_string()
}

fn pod_ip(i: usize) -> String {
    std::net::Ipv4Addr::from(0x0a80_0000u32 + i as u32).to_string() // 10.128.0.0/9
}

fn service(i: usize) -> Value {
    let node_port = i < NODE_PORTS;
    let mut port = json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"});
    if node_port {
        port["nodePort"] = json!(NODE_PORT_BASE + i as u32);
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"type": if node_port { "NodePort" } else { "ClusterIP" }, "clusterIP": cluster_ip(i), "clusterIPs": [cluster_ip(i)], "ports": [port]}
    })
}

fn slice(i: usize, addresses: &[String]) -> Value {
    let endpoints: Vec<Value> = addresses.iter().enumerate().map(|(k, a)| json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": format!("node-{}", k % 3)})).collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-x1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints
    })
}

/// Where the objects live: files in a directory, or the API server stand-in.
enum Store {
    Files { dir: PathBuf, docs: BTreeMap<usize, Vec<Value>> },
    Api(FakeApiServer),
}

impl Store {
    /// Writes every object, before the agent starts.
    fn fill(&mut self, n: usize, endpoints: &[Vec<String>]) -> Result<()> {
        match self {
            Store::Files { dir, docs } => {
                std::fs::create_dir_all(&*dir)?;
                for i in 0..n {
                    docs.entry(i / SERVICES_PER_FILE).or_default().extend([service(i), slice(i, &endpoints[i])]);
                }
                for file in docs.keys().copied().collect::<Vec<_>>() {
                    write_file(dir, file, &docs[&file])?;
                }
            }
            Store::Api(api) => {
                for i in 0..n {
                    api.apply(&service(i))?;
                    api.apply(&slice(i, &endpoints[i]))?;
                }
            }
        }
        Ok(())
    }

    /// Replaces Service `i`'s endpoints.
    fn edit(&mut self, i: usize, addresses: &[String]) -> Result<()> {
        match self {
            Store::Files { dir, docs } => {
                let file = docs.get_mut(&(i / SERVICES_PER_FILE)).context("no such file")?;
                file[(i % SERVICES_PER_FILE) * 2 + 1] = slice(i, addresses);
                write_file(dir, i / SERVICES_PER_FILE, file)
            }
            Store::Api(api) => api.apply(&slice(i, addresses)),
        }
    }
}

/// Writes a manifest file whole, by rename, so the agent never reads half of one.
fn write_file(dir: &Path, file: usize, docs: &[Value]) -> Result<()> {
    let text: String = docs.iter().map(|d| format!("---\n{d}\n")).collect();
    let tmp = dir.join(format!(".services-{file:04}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(format!("services-{file:04}.yaml")))?;
    Ok(())
}

/// One agent, one mode, one size: every measurement.
pub fn run_case(cfg: &Config, mode: &'static str, n: usize) -> Result<Row> {
    let tag = format!("cp{}", &mode[..1]);
    let ns = Netns::new(&testbed::netns::unique_prefix(&tag))?;
    ns.exec("ip link add lbnode0 type veth peer name lbnode1 && ip addr add 192.168.77.1/24 dev lbnode0 && ip link set lbnode0 up && ip link set lbnode1 up")?;
    let pins = BpfMount::new(&tag)?;
    let work = cfg.work_dir.join(format!("{mode}-{n}"));
    std::fs::create_dir_all(&work)?;
    let mut endpoints: Vec<Vec<String>> = (0..n).map(|i| (0..3).map(|k| pod_ip(i * 3 + k)).collect()).collect();
    let mut source: Vec<String> = Vec::new();
    let mut store = if mode == "standalone" {
        let dir = work.join("manifests");
        source.extend(["--manifests".into(), dir.display().to_string()]);
        Store::Files { dir, docs: BTreeMap::new() }
    } else {
        let api = FakeApiServer::start(&ns, 6443)?;
        source.extend(["--kubernetes".into(), "--kubeconfig".into(), api.kubeconfig(&work)?.display().to_string()]);
        Store::Api(api)
    };
    store.fill(n, &endpoints)?;
    let frontends = n + n.min(NODE_PORTS);
    // Room for every frontend, backend and table, as an operator sizes a node for its cluster.
    let sizing = sizing_flags(frontends, 3 * n);
    let mut args = source;
    args.extend(["--node-name", "node-0", "--pin-dir", &pins.dir.display().to_string(), "--socket-lb=false", "--metrics-addr", "127.0.0.1:9970", "--healthz-bind-address", "127.0.0.1:10256"].map(String::from));
    args.extend(sizing);
    args.extend(["--events-socket".to_string(), work.join("agent.sock").display().to_string()]);
    let log = work.join("agent.log");
    let started = Instant::now();
    let agent = AgentProcess::start(&cfg.agent_bin, &ns, &args, &log)?;
    let ns_name = ns.name.clone();
    let ready = testbed::netns::spawn_in(&ns_name, move || wait_ready(Duration::from_secs(600))).join().map_err(|_| anyhow::anyhow!("readiness poller panicked"))??;
    if !ready {
        bail!("agent not ready within 600 s:\n{}", tail(&agent.log_text()));
    }
    let cold_start_s = started.elapsed().as_secs_f64();
    let pid = agent.child.id();
    let maps = Maps::open_pinned(&pins.dir)?;
    let programmed = maps.v4.services.keys().filter_map(|k| k.ok()).count();
    if programmed != frontends {
        bail!("{programmed} of {frontends} frontends programmed after readiness:\n{}", tail(&agent.log_text()));
    }
    eprintln!("  {mode} {n}: cold start {cold_start_s:.2} s");

    let mut fresh = 0usize;
    let mut next_addresses = |i: usize, endpoints: &mut Vec<Vec<String>>| {
        fresh += 1;
        endpoints[i][0] = std::net::Ipv4Addr::from(0x0a00_0000u32 + fresh as u32).to_string(); // 10.0.0.0/9: never a first-generation pod
        endpoints[i].clone()
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut pick = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };

    // One edit at a time.
    let mut edit_ms = Vec::new();
    for _ in 0..cfg.edits {
        let i = pick();
        let before = frontend_entry(&maps, i)?;
        let addresses = next_addresses(i, &mut endpoints);
        let t0 = Instant::now();
        store.edit(i, &addresses)?;
        let took = wait_table(&maps, i, before, &addresses[0], t0, Duration::from_secs(10))?.with_context(|| format!("edit of svc-{i} not in the maps within 10 s:\n{}", tail(&agent.log_text())))?;
        edit_ms.push(took);
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("  {mode} {n}: edit to map p50 {:.1} ms, p99 {:.1} ms", percentile(&edit_ms, 0.5), percentile(&edit_ms, 0.99));

    // Churn: edits at a fixed rate; a watcher thread times each one.
    let mut churn = Vec::new();
    for &rate in &cfg.churn_rates {
        let pending: Arc<Mutex<Vec<(usize, ServiceV1, String, Instant)>>> = Arc::default();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (pending, done, pins) = (pending.clone(), done.clone(), pins.dir.clone());
            std::thread::spawn(move || -> Result<(Vec<f64>, usize)> {
                let maps = Maps::open_pinned(&pins)?;
                let mut seen = Vec::new();
                let mut given_up = 0;
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::Acquire);
                    let mut list = pending.lock().unwrap().clone();
                    let mut settled = Vec::new();
                    for (k, (i, before, addr, t0)) in list.iter().enumerate() {
                        if table_names(&maps, *i, *before, addr)? {
                            seen.push(t0.elapsed().as_secs_f64() * 1e3);
                            settled.push(k);
                        } else if t0.elapsed() > Duration::from_secs(10) {
                            given_up += 1;
                            settled.push(k);
                        }
                    }
                    {
                        let mut p = pending.lock().unwrap();
                        // Entries are only appended meanwhile: settled indices still name the same ones.
                        for k in settled.iter().rev() {
                            p.remove(*k);
                        }
                        list.clear();
                        if finished && p.is_empty() {
                            return Ok((seen, given_up));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let total = (rate as f64 * cfg.churn_for.as_secs_f64()).round() as usize;
        let start = Instant::now();
        let mut busy = std::collections::HashSet::new();
        for e in 0..total {
            let due = start + Duration::from_secs_f64(e as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // A Service with an edit in flight is left alone, so each edit is timed on its own;
            // with half of them in flight the agent is far behind: wait for it.
            // A watcher that failed ends the offer (its error is reported below), never a wait.
            if watcher.is_finished() {
                break;
            }
            while busy.len() >= n / 2 && !watcher.is_finished() {
                std::thread::sleep(Duration::from_millis(1));
                let still: std::collections::HashSet<usize> = pending.lock().unwrap().iter().map(|p| p.0).collect();
                busy.retain(|b| still.contains(b));
            }
            let mut i = pick();
            while !busy.insert(i) {
                i = pick();
            }
            let before = frontend_entry(&maps, i)?;
            let addresses = next_addresses(i, &mut endpoints);
            let t0 = Instant::now();
            store.edit(i, &addresses)?;
            pending.lock().unwrap().push((i, before, addresses[0].clone(), t0));
            let still: std::collections::HashSet<usize> = pending.lock().unwrap().iter().map(|p| p.0).collect();
            busy.retain(|b| still.contains(b));
        }
        let offered_for = start.elapsed().as_secs_f64();
        done.store(true, std::sync::atomic::Ordering::Release);
        let (seen, lost) = watcher.join().map_err(|_| anyhow::anyhow!("churn watcher panicked"))?.with_context(|| format!("churn at {rate}/s; the agent's log ends:\n{}", tail(&agent.log_text())))?;
        let p99 = if seen.is_empty() { f64::INFINITY } else { percentile(&seen, 0.99) };
        eprintln!("  {mode} {n}: churn {rate}/s -> {:.0}/s done, p99 {p99:.1} ms, {lost} not seen", total as f64 / offered_for);
        churn.push((rate, total as f64 / offered_for, p99, lost));
        if p99 > 1_000.0 || lost > 0 {
            break; // Higher rates only fall further behind.
        }
    }

    // Idle: nothing changes; what does the agent cost?
    std::thread::sleep(Duration::from_secs(2));
    let cpu_before = cpu_ticks(pid)?;
    let t = Instant::now();
    std::thread::sleep(cfg.idle_for);
    let idle_cpu_pct = (cpu_ticks(pid)? - cpu_before) as f64 / ticks_per_s() / t.elapsed().as_secs_f64() * 100.0;
    let rss_mib = status_kib(pid, "VmRSS")? / 1024.0;
    let bpf_mib = bpf_map_bytes(pid)? as f64 / (1024.0 * 1024.0);
    eprintln!("  {mode} {n}: RSS {rss_mib:.0} MiB, BPF maps {bpf_mib:.0} MiB, idle CPU {idle_cpu_pct:.2}%");
    drop(maps);
    drop(agent);
    drop(store);
    Ok(Row { mode, services: n, frontends, cold_start_s, edit_ms, churn, rss_mib, bpf_mib, idle_cpu_pct })
}

/// Capacities for `frontends` frontends and `backends` backends with room to spare for
/// changes in flight, and for their Maglev tables (one per Service port, each of the smallest
/// size the agent picks for 3 backends).
fn sizing_flags(frontends: usize, backends: usize) -> Vec<String> {
    let round = |x: usize| (x.max(1024) * 5 / 4).next_power_of_two();
    let slots = round(frontends * 251);
    vec![format!("--max-services={}", round(frontends)), format!("--max-backends={}", round(backends)), format!("--maglev-slots={slots}")]
}

/// Polls the agent's `/readyz` (in this namespace) until it answers 200.
fn wait_ready(timeout: Duration) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", 9970)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut status = [0u8; 12];
            if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").is_ok() && s.read_exact(&mut status).is_ok() && &status == b"HTTP/1.1 200" {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn cluster_key(i: usize) -> Service4KeyV1 {
    let ip: std::net::Ipv4Addr = cluster_ip(i).parse().expect("an address");
    Service4KeyV1 { addr: ip4_raw(ip.octets()), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER }
}

fn frontend_entry(maps: &Maps, i: usize) -> Result<ServiceV1> {
    // A lookup racing the agent's rewrite of the same key has answered "no such key" (once, at
    // 1000 edits/s, with the agent's log showing the frontend never removed): look again before
    // calling it missing.
    let mut last = None;
    for _ in 0..3 {
        match maps.v4.services.get(&cluster_key(i), 0) {
            Ok(entry) => return Ok(entry),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("three lookups failed")).with_context(|| format!("svc-{i} is not in {MAP_SERVICES}"))
}

/// Whether Service `i`'s entry changed from `before` to a table that names `addr`.
fn table_names(maps: &Maps, i: usize, before: ServiceV1, addr: &str) -> Result<bool> {
    let now = frontend_entry(maps, i)?;
    if (now.maglev_offset, now.maglev_size) == (before.maglev_offset, before.maglev_size) {
        return Ok(false);
    }
    let want: std::net::Ipv4Addr = addr.parse()?;
    let want = ip4_raw(want.octets());
    // Every slot: a backend's share may sit anywhere in the table.
    let ids: std::collections::BTreeSet<u32> = maps.read_slots(now.maglev_offset, now.maglev_size)?.into_iter().collect();
    let found = ids.into_iter().map(|id| Ok((id, ip4_addr(maps.v4.backends.get(&id, 0)?.addr)))).collect::<Result<std::collections::BTreeSet<_>>>()?;
    if frontend_entry(maps, i)? != now {
        return Ok(false); // Flipped again while being read (its old slots may be reused): look again.
    }
    if !found.iter().any(|(_, a)| ip4_raw(a.octets()) == want) {
        bail!("svc-{i}: the new table {now:?} (was {before:?}) does not name {addr}: it names {found:?}");
    }
    Ok(true)
}

/// Waits until Service `i`'s table names `addr`; the ms since `t0`, or `None` on timeout.
fn wait_table(maps: &Maps, i: usize, before: ServiceV1, addr: &str, t0: Instant, timeout: Duration) -> Result<Option<f64>> {
    while t0.elapsed() < timeout {
        if table_names(maps, i, before, addr)? {
            return Ok(Some(t0.elapsed().as_secs_f64() * 1e3));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(None)
}

fn ticks_per_s() -> f64 {
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn status_kib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
}

/// The memory the kernel charges for the BPF maps `pid` holds (each map once).
fn bpf_map_bytes(pid: u32) -> Result<u64> {
    let mut seen = std::collections::BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(fd?.path()) else { continue };
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    Ok(seen.values().sum())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
