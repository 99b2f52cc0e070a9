//! Kubernetes mode against a list/watch server speaking the real protocol and JSON.
use std::time::Duration;

use anyhow::{anyhow, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use testbed::{
    apiserver::{kubeconfig_for, FakeApiServer},
    demo::{sock, Demo},
    process::AgentProcess,
    servers::tcp_request,
};
use serde_json::Value;

use crate::support::*;

/// The example manifests' Services, EndpointSlices and Nodes, loaded into the API server.
fn load_examples(api: &FakeApiServer) -> Result<()> {
    for entry in std::fs::read_dir(example_manifests())? {
        let text = std::fs::read_to_string(entry?.path())?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let object = serde_yaml_ng::Value::deserialize(doc)?;
            if matches!(object.get("kind").and_then(|k| k.as_str()), Some("Service" | "EndpointSlice" | "Node")) {
                api.apply(&object)?;
            }
        }
    }
    Ok(())
}

fn slice(name: &str, service: &str, pods: &[u8]) -> EndpointSlice {
    let eps: String = pods.iter().map(|p| format!("  - {{addresses: [10.244.1.{}], conditions: {{ready: true}}, nodeName: node-a}}\n", 11 + p)).collect();
    let yaml = format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 8080}}]\nendpoints:\n{eps}");
    serde_yaml_ng::from_str(&yaml).unwrap()
}

fn service(name: &str, ip: &str) -> k8s_openapi::api::core::v1::Service {
    let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n");
    serde_yaml_ng::from_str(&yaml).unwrap()
}

fn maglev_backends(pins: &std::path::Path, service: &str) -> Result<Vec<String>> {
    let rows = lbctl_json(pins, &["maglev", "get", service])?;
    Ok(rows.iter().map(|r| r["backend"].as_str().unwrap().to_string()).collect())
}

fn frontend_names(pins: &std::path::Path) -> Result<Vec<String>> {
    Ok(lbctl_json(pins, &["service", "list"])?.iter().map(|s: &Value| s["name"].as_str().unwrap().to_string()).collect())
}

/// Every "programmed" line's removal count after the log reached `from` bytes.
fn removals_since(agent: &AgentProcess, from: usize) -> Vec<String> {
    agent.log_text()[from..].lines().filter(|l| l.contains("programmed") && !l.contains("removed 0,")).map(str::to_string).collect()
}

#[test]
fn kubernetes_mode_follows_the_api_through_relists_and_outages() -> Result<()> {
    let mut demo = Demo::build("k1")?;
    let mut api = FakeApiServer::start(&demo.cluster.nodes[0].ns, 6443)?;
    load_examples(&api)?;
    let dir = ManifestCopy::new("k1")?; // a scratch directory for the kubeconfig
    let kubeconfig = api.kubeconfig(&dir.dir)?;
    let pins = demo.cluster.pin_dir()?;
    let source = ["--kubernetes".to_string(), "--kubeconfig".to_string(), kubeconfig.display().to_string()];
    let agent = demo.start_agent_with(agent_bin(), &source, &pins, &[])?;
    assert_eq!(frontend_names(&pins)?.len(), EXAMPLE_FRONTENDS);
    tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT)?;

    // Add a Service whose endpoints span two EndpointSlices: they are merged.
    api.apply(&service("api", "10.96.0.30"))?;
    api.apply(&slice("api-a", "api", &[0]))?;
    api.apply(&slice("api-b", "api", &[1, 2]))?;
    eventually(Duration::from_secs(5), || {
        let b = maglev_backends(&pins, "demo/api")?;
        if b.len() == 3 { Ok(()) } else { Err(anyhow!("backends {b:?}")) }
    })?;
    let answer = tcp_request(demo.client_pod(), sock([10, 96, 0, 30], 80), None, TIMEOUT)?;
    assert!(answer.backend.starts_with("web-"));

    // Change one slice: its endpoint goes, the other slice's stay.
    api.apply(&slice("api-b", "api", &[2]))?;
    eventually(Duration::from_secs(5), || {
        let b = maglev_backends(&pins, "demo/api")?;
        if b == ["10.244.1.11:8080", "10.244.1.13:8080"] { Ok(()) } else { Err(anyhow!("backends {b:?}")) }
    })?;

    // Another proxy's label, or type ExternalName, unprograms the Service; undoing it programs it again.
    let mut labelled = service("api", "10.96.0.30");
    labelled.metadata.labels = Some([("service.kubernetes.io/service-proxy-name".to_string(), "other-proxy".to_string())].into());
    api.apply(&labelled)?;
    eventually(Duration::from_secs(5), || if frontend_names(&pins)?.iter().any(|n| n.starts_with("demo/api")) { Err(anyhow!("still programmed")) } else { Ok(()) })?;
    api.apply(&service("api", "10.96.0.30"))?;
    eventually(Duration::from_secs(5), || if frontend_names(&pins)?.iter().any(|n| n.starts_with("demo/api")) { Ok(()) } else { Err(anyhow!("not programmed")) })?;
    let mut external_name = service("api", "10.96.0.30");
    let spec = external_name.spec.as_mut().unwrap();
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some("api.example.org".into());
    api.apply(&external_name)?;
    eventually(Duration::from_secs(5), || if frontend_names(&pins)?.iter().any(|n| n.starts_with("demo/api")) { Err(anyhow!("still programmed")) } else { Ok(()) })?;
    api.apply(&service("api", "10.96.0.30"))?;
    eventually(Duration::from_secs(5), || if frontend_names(&pins)?.len() == EXAMPLE_FRONTENDS + 1 { Ok(()) } else { Err(anyhow!("not programmed")) })?;

    // 410 Gone: history compacted, watches dropped; the agent relists and deletes nothing.
    let log_mark = agent.log_text().len();
    let (lists_before, _, _) = api.counts();
    api.compact_and_drop_watches();
    eventually(Duration::from_secs(10), || {
        let (lists, _, gone) = api.counts();
        if gone >= 3 && lists >= lists_before + 3 { Ok(()) } else { Err(anyhow!("lists {lists} (before {lists_before}), 410s {gone}")) }
    })?;
    for _ in 0..5 {
        tcp_request(demo.client_pod(), sock([10, 96, 0, 30], 80), None, TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(frontend_names(&pins)?.len(), EXAMPLE_FRONTENDS + 1);
    assert!(removals_since(&agent, log_mark).is_empty(), "the relist removed frontends: {:?}", removals_since(&agent, log_mark));

    // The API server goes away: traffic keeps flowing on what is programmed.
    api.stop();
    for _ in 0..10 {
        tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT)?;
        tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30080), None, TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(frontend_names(&pins)?.len(), EXAMPLE_FRONTENDS + 1);

    // It comes back; a deletion made there reaches the maps.
    api.restart()?;
    api.delete("Service", "demo", "api")?;
    eventually(Duration::from_secs(15), || {
        let names = frontend_names(&pins)?;
        if names.len() == EXAMPLE_FRONTENDS && !names.iter().any(|n| n.starts_with("demo/api")) { Ok(()) } else { Err(anyhow!("{names:?}")) }
    })?;
    assert!(agent.log_text().contains("retrying with backoff"), "the outage was seen:\n{}", agent.log_text());
    Ok(())
}

#[test]
fn k8s_api_server_flag_finds_the_api_server_without_any_cluster_ip() -> Result<()> {
    let mut demo = Demo::build("k2")?;
    let api = FakeApiServer::start(&demo.cluster.nodes[0].ns, 6443)?;
    load_examples(&api)?;
    // What in-cluster config gives a pod: the `kubernetes` ClusterIP, which nothing routes here
    // (no kube-proxy, no iptables or nftables rules in this namespace).
    assert!(demo.cluster.nodes[0].ns.exec("iptables-save -t nat 2>/dev/null | grep -c -- '-A' || true")?.trim() == "0");
    let dir = ManifestCopy::empty("k2")?;
    let kubeconfig = kubeconfig_for(&dir.dir, "http://10.96.0.1:443")?;
    let pins = demo.cluster.pin_dir()?;
    let source = ["--kubernetes".to_string(), "--kubeconfig".to_string(), kubeconfig.display().to_string(), "--k8s-api-server".to_string(), format!("127.0.0.1:{}", api.port)];
    let _agent = demo.start_agent_with(agent_bin(), &source, &pins, &[])?;
    assert_eq!(frontend_names(&pins)?.len(), EXAMPLE_FRONTENDS);
    tcp_request(demo.client_pod(), sock([10, 96, 0, 10], 80), None, TIMEOUT)?;
    tcp_request(&demo.cluster.client, sock([10, 99, 0, 1], 30080), None, TIMEOUT)?;
    Ok(())
}
