//! Logs an operator can read and a collector can parse: JSON lines on request, the
//! configuration in force at start, and the Services a change touched named.
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use testbed::demo::Demo;

use crate::support::*;

#[test]
fn json_logs_carry_the_configuration_and_name_changed_services() -> Result<()> {
    let mut demo = Demo::build("lg")?;
    let manifests = ManifestCopy::new("lg")?;
    let (mut agent, _pins) = demo.start_agent(agent_bin(), &manifests.dir, &["--log-format", "json"])?;
    // One change: web loses an endpoint.
    let endpoints = manifests.read("endpoints.yaml");
    manifests.write("endpoints.yaml", &endpoints.replacen("conditions: {ready: true}", "conditions: {ready: false}", 1))?;
    agent.wait_for_log("changed: demo/web", Duration::from_secs(5))?;

    let log = agent.log_text();
    let lines: Vec<Value> = log.lines().map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("not JSON ({e}): {l}"))).collect::<Result<_>>()?;
    assert!(lines.iter().all(|l| l["ts"].is_string() && l["level"].is_string() && l["target"].is_string() && l["msg"].is_string()), "{log}");
    let first = lines[0]["msg"].as_str().unwrap();
    assert!(first.starts_with(&format!("lb-agent {}: standalone, manifests in {}", env!("CARGO_PKG_VERSION"), manifests.dir.display())), "{first}");
    assert!(first.contains("node node-a") && first.contains("external devices eth0") && first.contains("socket LB on cgroup"), "{first}");
    assert!(lines.iter().any(|l| l["msg"].as_str().unwrap().starts_with("BPF maps take ")), "{log}");
    let change = lines.iter().map(|l| l["msg"].as_str().unwrap()).find(|m| m.contains("changed: demo/web")).unwrap();
    assert!(change.starts_with("programmed ") && !change.contains("updated 0"), "{change}");
    // Nothing prints a Rust struct.
    assert!(!log.contains("Stats {") && !log.contains("KeyV1 {"), "{log}");
    Ok(())
}
