//! Socket-level balancing: new TCP connections per second from a process in the node's own
//! network namespace (k6 there) to a ClusterIP, translated at connect by the cgroup hook,
//! against the same requests sent straight to the backend's address. Both measured in one
//! run, interleaved, so the ratio is what the hook costs a connection.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use testbed::{process::AgentProcess, servers::HttpServer, topology::Cluster};

use crate::{stats::Summary, traffic};

pub struct Row {
    pub target: &'static str,
    pub conns_per_s: Summary,
}

pub fn run(cfg: &traffic::Config) -> Result<(Vec<Row>, Summary)> {
    std::fs::create_dir_all(&cfg.work_dir)?;
    let mut cluster = Cluster::new("bk", &[1])?;
    let _server = HttpServer::start(&cluster.nodes[0].pods[0].ns, "pod-0", 8080)?;
    let node = cluster.nodes[0].ns.name.clone();
    cluster.nodes[0].ns.exec("sysctl -qw net.ipv4.tcp_tw_reuse=1 && sysctl -qw net.ipv4.ip_local_port_range='1024 65535'")?;
    let manifests = cfg.work_dir.join("manifests-socket");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(
        manifests.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: svc, namespace: bench}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: svc-1, namespace: bench, labels: {kubernetes.io/service-name: svc}}\naddressType: IPv4\n\
         ports: [{name: http, port: 8080}]\nendpoints:\n  - {addresses: [10.244.1.11], conditions: {ready: true}, nodeName: node-a}\n",
    )?;
    let pins = cluster.pin_dir()?;
    let source = ["--manifests".to_string(), manifests.display().to_string()];
    let _agent: AgentProcess = cluster.start_agent(&cfg.agent_bin, 0, &source, &pins, &[])?;
    let targets: [(&'static str, SocketAddr); 2] = [("ClusterIP (socket hook)", SocketAddr::from(([10, 96, 0, 10], 80))), ("backend address (no translation)", SocketAddr::from(([10, 244, 1, 11], 8080)))];
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    for run in 0..cfg.runs {
        for (i, (what, target)) in targets.iter().enumerate() {
            let churn = traffic::k6(cfg, &node, "churn.js", target, &[("VUS", cfg.vus.to_string())])?;
            let rate = churn["metrics"]["http_reqs"]["rate"].as_f64().context("no http_reqs rate")?;
            eprintln!("  node process -> {what} run {}: {rate:.0} conns/s", run + 1);
            rates[i].push(rate);
        }
        ratios.push(rates[0][run] / rates[1][run]);
    }
    drop(_agent);
    cluster.bpffs.clear();
    let rows = targets.iter().zip(rates).map(|((what, _), r)| Row { target: what, conns_per_s: Summary::of(&r) }).collect();
    Ok((rows, Summary::of(&ratios)))
}
