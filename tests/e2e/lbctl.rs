//! lbctl shows what the manifests imply, from the pinned maps, with or without the agent.
use std::collections::BTreeSet;

use anyhow::Result;
use testbed::{
    demo::{sock, Demo},
    servers::tcp_request,
};
use serde_json::Value;

use crate::support::*;

#[test]
fn lbctl_lists_the_entries_the_manifests_imply() -> Result<()> {
    let mut demo = Demo::build("e8")?;
    let (agent, pins) = demo.start_agent(agent_bin(), &example_manifests(), &[])?;
    for _ in 0..6 {
        tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT)?;
    }

    let services = lbctl_json(&pins, &["service", "list"])?;
    let frontends: BTreeSet<(String, String, String)> = services.iter().map(|s| (s["name"].as_str().unwrap().into(), s["kind"].as_str().unwrap().into(), s["frontend"].as_str().unwrap().into())).collect();
    let want = [
        ("demo/web:http/TCP", "ClusterIP", "10.96.0.10:80/TCP"),
        ("demo/web:echo/UDP", "ClusterIP", "10.96.0.10:7/UDP"),
        ("demo/web-nodeport:http/TCP", "NodePort", "*:30080/TCP"),
        ("demo/web-nodeport:echo/UDP", "NodePort", "*:30007/UDP"),
        ("demo/web-lb:http/TCP", "LoadBalancer", "10.99.100.10:80/TCP"),
        ("demo/web-lb:http/TCP", "ExternalIP", "10.99.200.10:80/TCP"),
        ("demo/web-lb:http/TCP", "NodePort", "*:30081/TCP"),
        ("demo/web-dual:http/TCP", "ClusterIP", "10.96.0.16:80/TCP"),
        ("demo/web-dual:http/TCP", "ClusterIP", "[fd00:96::16]:80/TCP"),
        ("demo/web-dual:http/TCP", "NodePort", "*:30680/TCP"),
        ("demo/web-dual:http/TCP", "NodePort", "[*]:30680/TCP"),
        ("demo/web-dual:http/TCP", "LoadBalancer", "[fd00:99:100::16]:80/TCP"),
    ];
    for (name, kind, frontend) in want {
        assert!(frontends.contains(&(name.into(), kind.into(), frontend.into())), "missing {name} {kind} {frontend} in {frontends:#?}");
    }
    assert_eq!(services.len(), EXAMPLE_FRONTENDS);
    for s in &services {
        let backends: Vec<&str> = s["backends"].as_array().unwrap().iter().map(|b| b.as_str().unwrap()).collect();
        let frontend = s["frontend"].as_str().unwrap();
        let port = if frontend.ends_with("UDP") { 7007 } else { 8080 };
        // Each family's frontends balance to that family's addresses of the three pods.
        let expected: Vec<String> = if frontend.starts_with('[') { (11..14).map(|i| format!("[fd00:244:1::{i}]:{port}")).collect() } else { (11..14).map(|i| format!("10.244.1.{i}:{port}")).collect() };
        assert_eq!(backends, expected, "{s}");
    }
    let web = services.iter().find(|s| s["frontend"] == "10.96.0.10:80/TCP").unwrap();
    assert!(web["packets"].as_u64().unwrap() >= 6 * 3, "per-service counters count the traffic: {web}");

    let backends = lbctl_json(&pins, &["backend", "list"])?;
    assert_eq!(backends.len(), 9, "3 pods x 2 ports over IPv4, 3 pods x 1 port over IPv6");
    assert!(backends.iter().all(|b| b["local"] == Value::Bool(true)));

    let table = lbctl_json(&pins, &["maglev", "get", "demo/web:http/TCP"])?;
    assert_eq!(table.len(), 3);
    assert_eq!(table.iter().map(|r| r["slots"].as_u64().unwrap()).sum::<u64>(), 251);
    assert!(table.iter().all(|r| (83..=84).contains(&r["slots"].as_u64().unwrap())));
    // One table per Service port: its ClusterIP, NodePort, LoadBalancer IP and ExternalIP share it.
    let web_lb: Vec<&Value> = services.iter().filter(|s| s["name"] == "demo/web-lb:http/TCP").collect();
    assert_eq!(web_lb.len(), 4, "{web_lb:#?}");
    assert!(web_lb.iter().all(|s| s["table"] == web_lb[0]["table"] && s["table"] != "0+0"), "{web_lb:#?}");

    let ct = lbctl_json(&pins, &["ct", "list"])?;
    assert!(ct.iter().filter(|c| c["frontend"] == "10.96.0.10:80" && c["client"].as_str().unwrap().starts_with("10.244.1.14:")).count() >= 6, "{ct:#?}");

    // Table output, and the same view with the agent gone.
    drop(agent);
    let text = lbctl(&pins, &["service", "list"])?;
    assert!(text.lines().next().unwrap().starts_with("ID  NAME"), "{text}");
    assert!(text.contains("demo/web:http/TCP") && text.contains("10.96.0.10:80/TCP"), "{text}");
    let stats = lbctl_json(&pins, &["stats"])?;
    let fwd = stats.iter().find(|s| s["reason"] == "fwd_local_backend").unwrap()["packets"].as_u64().unwrap();
    assert!(fwd >= 18, "{stats:?}");
    Ok(())
}
