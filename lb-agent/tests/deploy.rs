//! deploy/: a kustomize base with overlays and an uninstall step. Every rendering (with the
//! real `kubectl kustomize`) is valid against the real Kubernetes schemas of the oldest and
//! newest supported versions, grants least privilege, runs on every Linux node, and names the
//! image this build makes.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use serde_yaml_ng::Value;

const OVERLAYS: [&str; 4] = ["overlays/kubernetes", "overlays/bare-metal", "overlays/standalone", "overlays/cni"];
const KUBERNETES_VERSIONS: [&str; 2] = ["1.34.0", "1.37.0"];
const IMAGE: &str = "ghcr.io/lb-project/lb-agent";

fn deploy_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(sub)
}

/// `kubectl kustomize deploy/<sub>`.
fn render(sub: &str) -> String {
    let out = Command::new("kubectl").arg("kustomize").arg(deploy_dir(sub)).output().expect("kubectl (with its built-in kustomize)");
    assert!(out.status.success(), "kubectl kustomize {sub}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A rendering in a file of its own for the validator, removed on drop.
struct RenderedFile(PathBuf);

impl RenderedFile {
    fn new(sub: &str, text: &str) -> Self {
        let file = std::env::temp_dir().join(format!("lb-deploy-{}-{}.yaml", sub.replace('/', "-"), std::process::id()));
        std::fs::write(&file, text).unwrap();
        Self(file)
    }
}

impl Drop for RenderedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| Value::deserialize(d).unwrap()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str().is_some_and(|n| n.starts_with(name)))
}

fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    find(docs, kind, name).unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn validate(path: &Path, version: &str) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", version])
        .arg(path)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; scripts/setup.sh does)");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence().map(|s| s.iter().filter_map(|c| c.as_str()).collect()).unwrap_or_default()
}

#[test]
fn every_overlay_and_the_uninstall_pass_kubernetes_validate_strict() {
    for sub in OVERLAYS.iter().chain(&["uninstall"]) {
        let text = render(sub);
        let file = RenderedFile::new(sub, &text);
        let docs = documents(&text);
        for version in KUBERNETES_VERSIONS {
            let (ok, report) = validate(&file.0, version);
            assert!(ok, "{sub} against {version}:\n{report}");
            for doc in &docs {
                let resource = format!("{}/{}", doc["kind"].as_str().unwrap().to_lowercase(), doc["metadata"]["name"].as_str().unwrap());
                assert!(report.contains(&format!("passed for resource {resource}")), "{sub}: {resource} not validated against {version}:\n{report}");
            }
        }
        // The validator does reject what is wrong: a misspelt field under --strict.
        std::fs::write(&file.0, text.replace("hostNetwork: true", "hostNetwrok: true").replace("nodeSelector:", "nodeSelectr:")).unwrap();
        assert!(!validate(&file.0, "1.37.0").0, "{sub}: a misspelt field passed validation");
    }
}

#[test]
fn rbac_grants_only_the_lists_and_watches_the_agent_makes() {
    let text = render("overlays/kubernetes");
    let docs = documents(&text);
    let mut grants: Vec<(String, String, String)> = Vec::new();
    for rule in kind(&docs, "ClusterRole", "lb-agent")["rules"].as_sequence().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    grants.push((group.into(), resource.into(), verb.into()));
                }
            }
        }
    }
    grants.sort();
    let mut want: Vec<(String, String, String)> = Vec::new();
    for (group, resource) in [("", "services"), ("", "nodes"), ("", "pods"), ("", "namespaces"), ("networking.k8s.io", "networkpolicies"), ("discovery.k8s.io", "endpointslices"), ("lb-agent.io", "loadbalancerippools")] {
        for verb in ["list", "watch"] {
            want.push((group.into(), resource.into(), verb.into()));
        }
    }
    // LB-IPAM's writes: a Service's status, and Events about it.
    want.extend([("", "services/status", "patch"), ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch")].map(|(g, r, v)| (g.into(), r.into(), v.into())));
    want.sort();
    assert_eq!(grants, want);
    let binding = kind(&docs, "ClusterRoleBinding", "lb-agent");
    assert_eq!(binding["subjects"][0]["namespace"].as_str(), Some("kube-system"));
    // Leases only in the agent's namespace: a Role, not the ClusterRole.
    let role = kind(&docs, "Role", "lb-agent-heartbeat");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("kube-system"));
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!((rules.len(), strings(&rules[0]["resources"]), strings(&rules[0]["verbs"])), (1, vec!["leases"], vec!["get", "create", "update", "delete", "list", "watch"]));
    assert_eq!(kind(&docs, "RoleBinding", "lb-agent-heartbeat")["subjects"][0]["name"].as_str(), Some("lb-agent"));
    // The pool kind's schema, as the agent reads it.
    let crd = kind(&docs, "CustomResourceDefinition", "loadbalancerippools.lb-agent.io");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for field in ["blocks", "serviceSelector", "allowFirstLastIPs"] {
        assert!(!spec[field].is_null(), "the CRD has spec.{field}");
    }
}

#[test]
fn the_agent_runs_on_every_linux_node_with_probes_and_without_privilege() {
    for sub in OVERLAYS {
        let text = render(sub);
        let docs = documents(&text);
        let ds = kind(&docs, "DaemonSet", "lb-agent");
        assert_eq!(ds["metadata"]["namespace"].as_str(), Some("kube-system"), "{sub}");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
        assert_eq!(pod["priorityClassName"].as_str(), Some("system-node-critical"));
        assert_eq!(pod["nodeSelector"]["kubernetes.io/os"].as_str(), Some("linux"));
        assert!(pod["tolerations"].as_sequence().unwrap().iter().any(|t| t["operator"].as_str() == Some("Exists") && t.get("key").is_none()));
        let agent = &pod["containers"][0];
        let sc = &agent["securityContext"];
        assert_eq!(sc["privileged"].as_bool(), Some(false));
        assert_eq!(strings(&sc["capabilities"]["add"]), ["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "SYS_RESOURCE", "NET_RAW"]);
        assert_eq!(agent["startupProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
        assert_eq!(agent["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
        assert_eq!(agent["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
        assert!(agent["resources"]["requests"]["cpu"].is_string() && agent["resources"]["limits"]["memory"].is_string());
        let mounts = agent["volumeMounts"].as_sequence().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect::<Vec<_>>();
        assert!(mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/run/lb/cgroupv2"), "{sub}: {mounts:?}");
        assert!(strings(&agent["command"]).contains(&"--cgroup-root=/run/lb/cgroupv2"));
        // Every setting comes from the generated ConfigMap, by its hashed name.
        let config = kind(&docs, "ConfigMap", "lb-agent-config")["metadata"]["name"].as_str().unwrap();
        for env in agent["env"].as_sequence().unwrap().iter().filter(|e| e["valueFrom"].get("configMapKeyRef").is_some()) {
            assert_eq!(env["valueFrom"]["configMapKeyRef"]["name"].as_str(), Some(config), "{sub}: {env:?}");
        }
        // The init step mounts bpffs when the host has none.
        let init = pod["initContainers"].as_sequence().unwrap().iter().find(|c| c["name"].as_str() == Some("prepare-node")).unwrap();
        assert!(strings(&init["command"]).iter().any(|c| c.contains("mount -t bpf bpf /sys/fs/bpf")));
    }
}

#[test]
fn the_modes_differ_only_where_they_must() {
    let text = render("overlays/kubernetes");
    let docs = documents(&text);
    let agent = &kind(&docs, "DaemonSet", "lb-agent")["spec"]["template"]["spec"]["containers"][0];
    assert!(strings(&agent["command"]).contains(&"--kubernetes"));
    let env = agent["env"].as_sequence().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect::<Vec<_>>();
    assert!(env.contains(&"K8S_API_SERVER"), "the API server address comes from the ConfigMap: {env:?}");

    let text = render("overlays/bare-metal");
    let docs = documents(&text);
    let data = &kind(&docs, "ConfigMap", "lb-agent-config")["data"];
    assert_eq!(data["external-devices"].as_str(), Some("eno1,eno2"));
    assert_eq!(data["k8s-api-server"].as_str(), Some("10.0.0.10:6443"));
    assert_eq!(data["socket-lb"].as_str(), Some("true"), "the base's other settings stay");

    let text = render("overlays/standalone");
    let docs = documents(&text);
    assert!(find(&docs, "ClusterRole", "lb-agent").is_none() && find(&docs, "ClusterRoleBinding", "lb-agent").is_none(), "standalone needs no RBAC");
    assert!(find(&docs, "Role", "lb-agent").is_none() && find(&docs, "RoleBinding", "lb-agent").is_none(), "nor Leases");
    assert!(find(&docs, "CustomResourceDefinition", "loadbalancerippools").is_none(), "pools are manifests there");
    let pod = &kind(&docs, "DaemonSet", "lb-agent")["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let command = strings(&pod["containers"][0]["command"]);
    assert!(command.contains(&"--manifests=/etc/lb/manifests") && !command.contains(&"--kubernetes"), "{command:?}");
    let env = pod["containers"][0]["env"].as_sequence().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect::<Vec<_>>();
    assert!(!env.contains(&"K8S_API_SERVER"), "{env:?}");
    assert!(pod["volumes"].as_sequence().unwrap().iter().any(|v| v["hostPath"]["path"].as_str() == Some("/etc/lb/manifests")));
}

#[test]
fn the_cni_overlay_installs_lb_cni_and_a_config_list_it_accepts() {
    let text = render("overlays/cni");
    let docs = documents(&text);
    let pod = &kind(&docs, "DaemonSet", "lb-agent")["spec"]["template"]["spec"];
    let install = pod["initContainers"].as_sequence().unwrap().iter().find(|c| c["name"].as_str() == Some("install-cni")).expect("an install-cni init container");
    let mounts: Vec<&str> = install["volumeMounts"].as_sequence().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    assert_eq!(mounts, ["/host/opt/cni/bin", "/host/etc/cni/net.d", "/etc/lb-cni"]);
    let script = strings(&install["command"]).join(" ");
    assert!(script.contains("/host/opt/cni/bin/lb-cni") && script.contains("/host/etc/cni/net.d/05-lb-cni.conflist"), "{script}");
    let host_paths: Vec<&str> = pod["volumes"].as_sequence().unwrap().iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
    assert!(host_paths.contains(&"/opt/cni/bin") && host_paths.contains(&"/etc/cni/net.d"), "{host_paths:?}");
    assert!(strings(&pod["containers"][0]["command"]).contains(&"--kubernetes"), "the kubernetes overlay underneath");
    // The config list names the agent's pin directory and status address, and lb-cni reads
    // its plugin entry: STATUS gets as far as asking the agent (none here: code 50).
    let conflist: serde_json::Value = serde_json::from_str(kind(&docs, "ConfigMap", "lb-cni-config")["data"]["05-lb-cni.conflist"].as_str().unwrap()).unwrap();
    let agent_pins = strings(&pod["containers"][0]["command"]).into_iter().find_map(|a| a.strip_prefix("--pin-dir=")).unwrap().to_string();
    let mut plugin = conflist["plugins"][0].clone();
    assert_eq!((plugin["type"].as_str(), plugin["pinDir"].as_str()), (Some("lb-cni"), Some(agent_pins.as_str())));
    assert_eq!(plugin["agent"].as_str().map(|a| a.ends_with(":9970")), Some(true), "the agent's metrics-addr port");
    plugin["cniVersion"] = "1.1.0".into();
    plugin["name"] = conflist["name"].clone();
    plugin["agent"] = "127.0.0.1:1".into();
    let lb_cni = Path::new(env!("CARGO_BIN_EXE_lb-agent")).with_file_name("lb-cni");
    let mut child = Command::new(&lb_cni).env("CNI_COMMAND", "STATUS").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().expect("lb-cni, built beside lb-agent");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), plugin.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["code"].as_u64(), Some(50), "{reply}");
}

/// Mebibytes of a Kubernetes quantity such as `704Mi` or `1Gi`.
fn mebibytes(quantity: &str) -> u64 {
    match quantity.split_at(quantity.len() - 2) {
        (n, "Mi") => n.parse().unwrap(),
        (n, "Gi") => n.parse::<u64>().unwrap() * 1024,
        _ => panic!("unexpected quantity {quantity}"),
    }
}

#[test]
fn the_memory_limit_holds_the_maps_the_agent_creates_and_its_heap() {
    // The maps at the capacities the DaemonSet's flags give (none: the defaults), as the
    // agent estimates them (tests/e2e/capacity.rs checks that estimate against the kernel).
    let text = render("overlays/kubernetes");
    let docs = documents(&text);
    let agent = &kind(&docs, "DaemonSet", "lb-agent")["spec"]["template"]["spec"]["containers"][0];
    let size_flags: Vec<&str> = strings(&agent["command"]).into_iter().filter(|a| a.starts_with("--max-") || a.starts_with("--maglev-slots")).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent")).arg("--estimate-memory").args(&size_flags).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8(out.stdout).unwrap();
    let total_line = report.lines().find(|l| l.starts_with("total")).unwrap();
    let maps_mib = total_line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap().div_ceil(1 << 20);
    // What the agent's heap needs on top: 249 MiB resident with 100k Services (bench/results).
    const HEAP_MIB: u64 = 256;
    let limit = mebibytes(agent["resources"]["limits"]["memory"].as_str().unwrap());
    assert!(limit >= maps_mib + HEAP_MIB, "limit {limit} MiB < maps {maps_mib} MiB + heap {HEAP_MIB} MiB");
    assert!(limit < maps_mib + HEAP_MIB + 64, "limit {limit} MiB is more than the maps and heap need, rounded to 64 MiB");
    let request = mebibytes(agent["resources"]["requests"]["memory"].as_str().unwrap());
    assert!(request >= maps_mib, "the request {request} MiB covers at least the maps ({maps_mib} MiB) the agent takes at start");
}

#[test]
fn every_container_runs_the_image_of_this_version() {
    let expected = format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION"));
    for sub in OVERLAYS.iter().chain(&["uninstall"]) {
        let text = render(sub);
        let docs = documents(&text);
        let ds = docs.iter().find(|d| d["kind"].as_str() == Some("DaemonSet")).unwrap();
        let pod = &ds["spec"]["template"]["spec"];
        for c in pod["initContainers"].as_sequence().unwrap().iter().chain(pod["containers"].as_sequence().unwrap()) {
            assert_eq!(c["image"].as_str(), Some(expected.as_str()), "{sub}: container {:?}", c["name"]);
        }
    }
}

#[test]
fn uninstall_cleans_the_pin_directory_the_agent_uses() {
    let text = render("overlays/kubernetes");
    let agent_pins = strings(&kind(&documents(&text), "DaemonSet", "lb-agent")["spec"]["template"]["spec"]["containers"][0]["command"])
        .into_iter()
        .find(|a| a.starts_with("--pin-dir="))
        .unwrap()
        .to_string();
    let text = render("uninstall");
    let docs = documents(&text);
    let pod = &kind(&docs, "DaemonSet", "lb-cleanup")["spec"]["template"]["spec"];
    assert_eq!(strings(&pod["initContainers"][0]["command"]), ["lb-agent", "--cleanup", agent_pins.as_str()]);
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"].as_str(), Some("linux"));
    assert!(pod["tolerations"].as_sequence().unwrap().iter().any(|t| t["operator"].as_str() == Some("Exists")));
}
