//! deploy/daemonset.yaml: valid against the real Kubernetes schemas, least privilege, runs on
//! every node.
use std::{path::Path, process::Command};

use serde::Deserialize;
use serde_yaml_ng::Value;

fn manifest_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml")
}

fn documents() -> Vec<Value> {
    let text = std::fs::read_to_string(manifest_path()).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind}"))
}

fn validate(path: &Path) -> std::process::Output {
    Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.34.0"])
        .arg(path)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; scripts/setup.sh does)")
}

#[test]
fn daemonset_passes_kubernetes_validate_strict() {
    let out = validate(&manifest_path());
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for resource in ["serviceaccount/lb-agent", "clusterrole/lb-agent", "clusterrolebinding/lb-agent", "configmap/lb-agent-config", "daemonset/lb-agent"] {
        assert!(text.contains(&format!("passed for resource {resource}")), "{resource} not validated:\n{text}");
    }
    // The validator does reject what is wrong: a misspelt field under --strict.
    let broken = std::env::temp_dir().join(format!("lb-daemonset-broken-{}.yaml", std::process::id()));
    std::fs::write(&broken, std::fs::read_to_string(manifest_path()).unwrap().replace("hostNetwork: true", "hostNetwrok: true")).unwrap();
    let out = validate(&broken);
    std::fs::remove_file(&broken).unwrap();
    assert!(!out.status.success(), "a misspelt field passed validation");
}

#[test]
fn rbac_grants_only_reads_and_status_patches() {
    let docs = documents();
    let rules = kind(&docs, "ClusterRole")["rules"].as_sequence().unwrap();
    let mut grants: Vec<(String, String, String)> = Vec::new();
    for rule in rules {
        for group in rule["apiGroups"].as_sequence().unwrap() {
            for resource in rule["resources"].as_sequence().unwrap() {
                for verb in rule["verbs"].as_sequence().unwrap() {
                    grants.push((group.as_str().unwrap().into(), resource.as_str().unwrap().into(), verb.as_str().unwrap().into()));
                }
            }
        }
    }
    grants.sort();
    let mut want: Vec<(String, String, String)> = Vec::new();
    for (group, resource) in [("", "services"), ("", "nodes"), ("", "pods"), ("discovery.k8s.io", "endpointslices")] {
        for verb in ["get", "list", "watch"] {
            want.push((group.into(), resource.into(), verb.into()));
        }
    }
    want.push(("".into(), "services/status".into(), "patch".into()));
    want.sort();
    assert_eq!(grants, want);
}

#[test]
fn daemonset_runs_on_every_node_with_probes_and_without_privilege() {
    let docs = documents();
    let pod = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["priorityClassName"].as_str(), Some("system-node-critical"));
    assert!(pod["tolerations"].as_sequence().unwrap().iter().any(|t| t["operator"].as_str() == Some("Exists") && t.get("key").is_none()));
    let agent = &pod["containers"][0];
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    let caps: Vec<&str> = sc["capabilities"]["add"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_RESOURCE"]);
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert!(agent["resources"]["requests"]["cpu"].is_string() && agent["resources"]["requests"]["memory"].is_string());
    let mounts: Vec<&str> = agent["volumeMounts"].as_sequence().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    assert!(mounts.contains(&"/sys/fs/bpf"));
    // The socket hooks attach to the host's cgroup v2 root, mounted where --cgroup-root says.
    assert!(mounts.contains(&"/run/lb/cgroupv2"));
    let args: Vec<&str> = agent["command"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(args.contains(&"--cgroup-root=/run/lb/cgroupv2"), "{args:?}");
    let env: Vec<&str> = agent["env"].as_sequence().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(env.contains(&"K8S_API_SERVER"), "the API server address comes from the ConfigMap: {env:?}");
    // The init step mounts bpffs when the host has none.
    let init = &pod["initContainers"][0];
    assert!(init["command"].as_sequence().unwrap().iter().any(|c| c.as_str().unwrap_or("").contains("mount -t bpf bpf /sys/fs/bpf")));
}
