//! lbctl shows what the manifests imply, from the pinned maps, with or without the agent.
use std::collections::BTreeSet;

use anyhow::{Context, Result};
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
    assert!(text.lines().next().unwrap().starts_with("NAME  "), "{text}");
    assert!(text.contains("demo/web:http/TCP") && text.contains("10.96.0.10:80/TCP"), "{text}");
    let stats = lbctl_json(&pins, &["stats"])?;
    let fwd = stats.iter().find(|s| s["reason"] == "fwd_local_backend").unwrap()["packets"].as_u64().unwrap();
    assert!(fwd >= 18, "{stats:?}");
    Ok(())
}

/// lbctl run in `ns` (where the agent's metrics address is), with the exit status and output.
fn lbctl_in(ns: &testbed::netns::Netns, pins: &std::path::Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = std::process::Command::new("ip").args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_lbctl"), "--pin-dir"]).arg(pins).args(args).output()?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

#[test]
fn lbctl_status_filters_formats_and_flush() -> Result<()> {
    let mut demo = Demo::build("eb")?;
    let manifests = ManifestCopy::new("eb")?;
    let (mut agent, pins) = demo.start_agent(agent_bin(), &manifests.dir, &[])?;
    let node = &demo.cluster.nodes[0].ns;

    // status: the agent's own report, and every map's fill.
    let (ok, out, err) = lbctl_in(node, &pins, &["status", "-o", "json"])?;
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&out)?;
    let a = &status["agent"];
    assert_eq!((a["version"].as_str(), a["mode"].as_str(), a["node"].as_str()), (Some(env!("CARGO_PKG_VERSION")), Some("standalone"), Some("node-a")), "{status}");
    assert!(a["synced"].as_bool().unwrap() && a["last_sync_unix"].as_u64().unwrap() > 0);
    let attached: Vec<(String, String)> = a["attached"].as_array().unwrap().iter().map(|x| (x["program"].as_str().unwrap().into(), x["target"].as_str().unwrap().into())).collect();
    assert!(attached.contains(&("lb_xdp".into(), "eth0 (native XDP)".into())) && attached.contains(&("lb_tc".into(), "lxc0".into())), "{attached:?}");
    assert!(attached.iter().any(|(p, t)| p == "lb_sock_connect4" && t.starts_with("cgroup ")), "{attached:?}");
    assert_eq!(a["rejected"], serde_json::json!({}));
    let svc4 = status["maps"].as_array().unwrap().iter().find(|m| m["map"] == "LB4_SVC_V1").context("no LB4_SVC_V1")?;
    // The 20 IPv4 frontends, and the local-scope twins of the eTP Local Service's NodePort and LoadBalancer IP.
    assert_eq!(svc4["entries"].as_u64(), Some(22), "{svc4}");
    let entries = |map: &str| status["maps"].as_array().unwrap().iter().find(|m| m["map"] == map).and_then(|m| m["entries"].as_u64());
    assert_eq!((entries("LB4_BE_V1"), entries("LB6_BE_V1")), (Some(6), Some(3)), "3 pods x 2 ports over IPv4, x 1 over IPv6");
    // A Service that claims another's ClusterIP is reported rejected, with the reason.
    manifests.write("thief.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: thief, namespace: other}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n")?;
    let rejected = eventually(TIMEOUT, || {
        let (_, out, _) = lbctl_in(node, &pins, &["status", "-o", "json"])?;
        let status: Value = serde_json::from_str(&out)?;
        status["agent"]["rejected"]["other/thief"].as_str().map(str::to_string).context("not rejected yet")
    })?;
    assert!(rejected.contains("10.96.0.10"), "{rejected}");
    let (ok, text, _) = lbctl_in(node, &pins, &["status"])?;
    assert!(ok && text.starts_with("Agent:      up, version") && text.contains("other/thief:") && text.contains("LB4_SVC_V1"), "{text}");
    // No agent at the address: a hint, the maps still shown, and a failing exit status.
    let (ok, text, _) = lbctl_in(node, &pins, &["status", "--agent", "127.0.0.1:1"])?;
    assert!(!ok && text.contains("not reachable at 127.0.0.1:1") && text.contains("is lb-agent running?") && text.contains("LB4_SVC_V1"), "{text}");

    // Filters.
    let names = |args: &[&str]| -> Result<BTreeSet<String>> { Ok(lbctl_json(&pins, args)?.iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()) };
    assert_eq!(names(&["service", "list", "--service", "web"])?, BTreeSet::from(["demo/web:http/TCP".to_string(), "demo/web:echo/UDP".to_string()]));
    assert_eq!(names(&["service", "list", "-n", "demo", "--service", "demo/web-dual"])?, BTreeSet::from(["demo/web-dual:http/TCP".to_string()]));
    assert!(names(&["service", "list", "-n", "kube-system"])?.is_empty());
    // Rows that name no Service are not filtered away.
    assert_eq!(lbctl_json(&pins, &["stats", "-n", "kube-system"])?.len(), lbctl_json(&pins, &["stats"])?.len());
    let backends = lbctl_json(&pins, &["backend", "list", "--service", "web-dual"])?;
    assert_eq!(backends.len(), 6, "the dual-stack Service's 3 pods in both families: {backends:?}");

    // Formats: the table shows fewer columns than wide; YAML has what JSON has.
    let table = lbctl(&pins, &["service", "list"])?;
    let wide = lbctl(&pins, &["service", "list", "-o", "wide"])?;
    assert!(!table.lines().next().unwrap().contains("TABLE") && wide.lines().next().unwrap().starts_with("ID  NAME") && wide.lines().next().unwrap().contains("TABLE"), "{table}\n{wide}");
    let bare = lbctl(&pins, &["service", "list", "--no-headers"])?;
    assert_eq!(bare.lines().count(), EXAMPLE_FRONTENDS, "{bare}");
    assert!(bare.lines().all(|l| l.starts_with("demo/")), "{bare}");
    let yaml: Vec<Value> = serde_yaml_ng::from_str(&lbctl(&pins, &["service", "list", "-o", "yaml"])?)?;
    assert_eq!(yaml, lbctl_json(&pins, &["service", "list"])?);

    // ct flush: the flows of one Service, then all.
    for _ in 0..3 {
        tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT)?;
        tcp_request(demo.client_pod(), sock([10, 96, 0, 16], 80), None, TIMEOUT)?;
    }
    let flows_of = |service: &str| -> Result<usize> { Ok(lbctl_json(&pins, &["ct", "list"])?.iter().filter(|c| c["service"].as_str().is_some_and(|s| s.starts_with(service))).count()) };
    assert!(flows_of("demo/web:")? >= 3 && flows_of("demo/web-dual:")? >= 3);
    assert!(lbctl(&pins, &["ct", "flush", "--service", "web-dual"])?.starts_with("flushed "));
    assert_eq!(flows_of("demo/web-dual:")?, 0);
    assert!(flows_of("demo/web:")? >= 3, "other Services' flows stay");
    lbctl(&pins, &["ct", "flush"])?;
    assert!(lbctl_json(&pins, &["ct", "list"])?.is_empty());
    assert!(lbctl_json(&pins, &["nat", "list"])?.is_empty());
    // New flows are balanced again at once.
    tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT)?;

    // Version, completion, and the hint when there are no maps.
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_lbctl")).args(args).output().unwrap();
    assert_eq!(String::from_utf8(run(&["--version"]).stdout)?.trim(), format!("lbctl {}", env!("CARGO_PKG_VERSION")));
    assert!(String::from_utf8(run(&["completion", "bash"]).stdout)?.contains("complete -F _lbctl"));
    let missing = run(&["--pin-dir", "/nonexistent/lb", "service", "list"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8(missing.stderr)?.contains("is lb-agent running on this node?"));
    assert!(agent.child.try_wait()?.is_none());
    Ok(())
}
