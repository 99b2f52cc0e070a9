//! Uninstall: `lb-agent --cleanup` after a running agent leaves nothing of the datapath on
//! the node: no program attached to a device or cgroup, no link, no pin, and Services stop
//! being answered (no frozen table keeps forwarding).
use std::{path::Path, process::Command};

use anyhow::{Context, Result};
use serde_json::Value;
use testbed::{
    demo::{sock, Demo},
    servers::tcp_request,
};

use crate::support::*;

/// (pin name, link id, program id) of every link pinned under `<pin_dir>/links`.
fn pinned_links(pin_dir: &Path) -> Result<Vec<(String, u64, u64)>> {
    let mut links = Vec::new();
    for entry in std::fs::read_dir(pin_dir.join("links"))? {
        let path = entry?.path();
        let info = bpftool_json(&["link", "show", "pinned", path.to_str().unwrap()])?;
        let (id, prog) = (info["id"].as_u64().context("link id")?, info["prog_id"].as_u64().context("prog id")?);
        links.push((path.file_name().unwrap().to_string_lossy().into_owned(), id, prog));
    }
    links.sort();
    Ok(links)
}

#[test]
fn cleanup_after_a_running_agent_leaves_no_program_link_or_pin() -> Result<()> {
    let mut demo = Demo::build("cl")?;
    let (mut agent, pins) = demo.start_agent(agent_bin(), &example_manifests(), &[])?;
    let node_port = sock([10, 99, 0, 1], 30080);
    tcp_request(&demo.cluster.client, node_port, None, TIMEOUT).context("NodePort before the cleanup")?;
    let links = pinned_links(&pins)?;
    let names: Vec<&str> = links.iter().map(|(n, _, _)| n.as_str()).collect();
    for expected in ["xdp-eth0", "sock-connect4", "sock-connect6", "sock-sendmsg4", "sock-post-bind6"] {
        assert!(names.contains(&expected), "no {expected} link among {names:?}");
    }
    assert!(names.iter().filter(|n| n.starts_with("tc-")).count() >= 5, "a TC link per pod device: {names:?}");
    let node = &demo.cluster.nodes[0].ns;
    assert!(node.exec("ip -d link show dev eth0")?.contains("prog/xdp"), "XDP on eth0 before the cleanup");

    // The uninstall order: the DaemonSet goes (SIGTERM), then the cleanup step runs.
    agent.stop();
    let out = Command::new(agent_bin()).args(["--cleanup", "--pin-dir"]).arg(&pins).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("{} links detached", links.len())), "{text}");

    for (name, link, prog) in &links {
        assert!(bpftool_json(&["link", "show", "id", &link.to_string()]).is_err(), "link {name} (id {link}) still exists");
        // A program is freed once its last reference goes, which the kernel finishes after an
        // RCU grace period.
        crate::support::eventually(std::time::Duration::from_secs(3), || match bpftool_json(&["prog", "show", "id", &prog.to_string()]) {
            Err(_) => Ok(()),
            Ok(_) => anyhow::bail!("program of {name} (id {prog}) still loaded"),
        })?;
    }
    assert!(!node.exec("ip -d link show dev eth0")?.contains("prog/xdp"), "XDP still on eth0");
    let net = node.exec("bpftool -j net show")?;
    let net: Value = serde_json::from_str(&net)?;
    assert!(net[0]["xdp"].as_array().is_none_or(|a| a.is_empty()) && net[0]["tc"].as_array().is_none_or(|a| a.is_empty()), "programs left in the node namespace: {net}");
    let left: Vec<_> = std::fs::read_dir(&pins).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(!pins.exists(), "pin directory {} left, holding {left:?}; cleanup said: {text}", pins.display());
    // Nothing translates the NodePort any more.
    assert!(tcp_request(&demo.cluster.client, node_port, None, TIMEOUT).is_err(), "the NodePort still answers");

    // Twice is harmless: nothing left to do.
    let again = Command::new(agent_bin()).args(["--cleanup", "--pin-dir"]).arg(&pins).output()?;
    assert!(again.status.success() && String::from_utf8_lossy(&again.stdout).contains("0 links detached"), "{again:?}");
    Ok(())
}
