//! Metrics: promtool accepts the exposition, and a real Prometheus scrapes the agent and
//! reports the traffic the test sent.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use testbed::{
    demo::{sock, Demo},
    netns::Netns,
    servers::tcp_request,
};
use serde_json::Value;

use crate::support::*;

/// GET http://127.0.0.1:PORT/PATH from inside `ns`; the status and the body.
fn http_get(ns: &Netns, port: u16, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    ns.run(move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
        let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
        Ok((status, body.to_string()))
    })?
}

/// `promtool check metrics` passes the exposition without a word.
fn promtool_accepts(metrics: &str) -> Result<()> {
    let mut promtool = Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes())?;
    let out = promtool.wait_with_output()?;
    anyhow::ensure!(out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(), "promtool: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

struct Prometheus {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_what_the_datapath_counted() -> Result<()> {
    let mut demo = Demo::build("m1")?;
    let (_agent, pins) = demo.start_agent(agent_bin(), &example_manifests(), &["--metrics-per-backend"])?;
    let node = &demo.cluster.nodes[0].ns;
    assert_eq!(http_get(node, 9970, "/readyz")?.0, 200);
    assert_eq!(http_get(node, 9970, "/healthz")?.0, 200);
    for _ in 0..20 {
        tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT)?;
    }

    // promtool's linter accepts the exposition as served.
    let metrics = eventually(Duration::from_secs(5), || {
        let (_, metrics) = http_get(node, 9970, "/metrics")?;
        for name in [
            "lb_service_packets_total",
            "lb_backend_packets_total",
            "lb_datapath_packets_total",
            "lb_map_entries",
            "lb_map_capacity",
            "lb_maglev_tables",
            "lb_sync_duration_seconds_bucket",
            "lb_programs_attached{program=\"lb_xdp\"} 1",
            "lb_build_info{version=",
            // Exported from the start, at zero.
            "lb_sync_errors_total 0",
            "lb_frontend_changes_total{change=\"failed\"} 0",
            "lb_network_programming_duration_seconds_count 0",
            "lb_datapath_packets_total{reason=\"drop_ct_full\"} 0",
        ] {
            if !metrics.contains(name) {
                bail!("{name} missing from:\n{metrics}");
            }
        }
        Ok(metrics)
    })?;
    promtool_accepts(&metrics)?;

    // A real Prometheus in the node's namespace scrapes the agent every second.
    let dir = std::env::temp_dir().join(format!("{}-prometheus", demo.cluster.prefix));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("prometheus.yml"), "global: {scrape_interval: 1s}\nscrape_configs:\n- job_name: lb-agent\n  static_configs: [{targets: ['127.0.0.1:9970']}]\n")?;
    let child = Command::new("ip")
        .args(["netns", "exec", &node.name, "prometheus"])
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .args(["--web.listen-address=127.0.0.1:9090", "--log.level=warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting prometheus")?;
    let _prometheus = Prometheus { child, dir };

    // The counter in the maps, once the agent has exported it...
    let expected = eventually(Duration::from_secs(5), || {
        let services = lbctl_json(&pins, &["service", "list"])?;
        let web = services.iter().find(|s| s["frontend"] == "10.96.0.10:80/TCP").context("no web")?;
        let packets = web["packets"].as_u64().unwrap();
        let (_, m) = http_get(node, 9970, "/metrics")?;
        let line = format!("lb_service_packets_total{{namespace=\"demo\",service=\"web\",port_name=\"http\",protocol=\"TCP\",frontend=\"10.96.0.10:80\"}} {packets}");
        if m.contains(&line) { Ok(packets) } else { Err(anyhow!("exported value not yet {packets}")) }
    })?;
    assert!(expected >= 20 * 5, "20 connections of at least 5 packets each: {expected}");
    // ... is what Prometheus reports.
    let query = "/api/v1/query?query=lb_service_packets_total%7Bnamespace%3D%22demo%22%2Cservice%3D%22web%22%2Cport_name%3D%22http%22%2Cfrontend%3D%2210.96.0.10%3A80%22%7D";
    let got = eventually(Duration::from_secs(20), || {
        let (status, body) = http_get(node, 9090, query)?;
        if status != 200 {
            bail!("prometheus answered {status}");
        }
        let v: Value = serde_json::from_str(&body)?;
        let value = v["data"]["result"][0]["value"][1].as_str().context("no sample yet")?.parse::<u64>()?;
        if value == expected { Ok(value) } else { Err(anyhow!("prometheus has {value}, want {expected}")) }
    })?;
    assert_eq!(got, expected);
    Ok(())
}

#[test]
fn series_of_a_deleted_service_go_and_endpoint_changes_are_timed() -> Result<()> {
    let mut demo = Demo::build("m2")?;
    let manifests = ManifestCopy::new("m2")?;
    let (_agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let node = &demo.cluster.nodes[0].ns;
    tcp_request(demo.client_pod(), sock([10, 96, 0, 11], 80), None, TIMEOUT)?;
    let metrics = eventually(Duration::from_secs(5), || {
        let (_, m) = http_get(node, 9970, "/metrics")?;
        anyhow::ensure!(m.contains("service=\"web-nodeport\""), "no web-nodeport series yet");
        Ok(m)
    })?;
    promtool_accepts(&metrics)?;
    // Per-backend series only with --metrics-per-backend.
    assert!(!metrics.contains("lb_backend_packets_total"), "{metrics}");

    // An endpoint change of web, triggered now: measured once from its trigger time.
    let endpoints = manifests.read("endpoints.yaml");
    let web_slice = "name: web-abc12\n";
    assert!(endpoints.contains(web_slice), "the example's web slice");
    let stamped = endpoints.replacen(web_slice, &format!("{web_slice}  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{}\"}}\n", jiff::Timestamp::now()), 1);
    manifests.write("endpoints.yaml", &stamped.replacen("conditions: {ready: true}", "conditions: {ready: false}", 1))?;
    let timed = eventually(Duration::from_secs(5), || {
        let (_, m) = http_get(node, 9970, "/metrics")?;
        let count = sample(&m, "lb_network_programming_duration_seconds_count")?;
        anyhow::ensure!(count == 1.0, "count {count}");
        Ok(sample(&m, "lb_network_programming_duration_seconds_sum")?)
    })?;
    // The file write, the directory watch, the sync and the map write.
    assert!((0.0..2.0).contains(&timed), "took {timed} s");

    // The Service goes: its series go with it, the others stay.
    let services = manifests.read("services.yaml");
    let without: Vec<&str> = services.split("\n---\n").filter(|doc| !doc.contains("name: web-nodeport\n")).collect();
    assert_eq!(without.len() + 1, services.split("\n---\n").count(), "one Service document removed");
    manifests.write("services.yaml", &without.join("\n---\n"))?;
    let metrics = eventually(Duration::from_secs(5), || {
        let (_, m) = http_get(node, 9970, "/metrics")?;
        anyhow::ensure!(!m.contains("service=\"web-nodeport\""), "web-nodeport series still exported");
        Ok(m)
    })?;
    assert!(metrics.contains("service=\"web\""), "the other Services' series stay");
    promtool_accepts(&metrics)?;
    Ok(())
}

/// The value of an unlabelled sample.
fn sample(metrics: &str, name: &str) -> Result<f64> {
    let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).with_context(|| format!("no {name}"))?;
    Ok(line.rsplit(' ').next().unwrap().parse()?)
}
