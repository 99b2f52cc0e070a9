//! Kubernetes semantics of the translation, and the errors bad manifests give.
use std::net::Ipv4Addr;

use lb_agent::{
    source::manifests::{parse_manifest, ManifestDir},
    translate::{translate, ClusterState},
};
use lb_common::*;

fn example_state() -> ClusterState {
    let mut dir = ManifestDir::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/manifests"));
    let (changed, errors) = dir.refresh().unwrap();
    assert!(changed);
    assert!(errors.is_empty(), "{errors:?}");
    dir.state()
}

fn frontend_names(state: &ClusterState, node: &str) -> Vec<(String, [u8; 4], u16, u8, usize, usize)> {
    let t = translate(state, node);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let mut out: Vec<_> = t
        .frontends
        .values()
        .flatten()
        .map(|f| (f.name.clone(), ip4_octets(f.key.addr), port_host(f.key.port), f.kind, f.backends.len(), f.backends.iter().filter(|b| b.local).count()))
        .collect();
    out.sort();
    out
}

#[test]
fn example_manifests_give_every_kind_of_frontend() {
    let f = frontend_names(&example_state(), "node-a");
    let has = |name: &str, addr: [u8; 4], port: u16, kind: u8| f.iter().any(|x| x.0 == name && x.1 == addr && x.2 == port && x.3 == kind && x.4 == 3 && x.5 == 3);
    assert!(has("demo/web:http/TCP", [10, 96, 0, 10], 80, KIND_CLUSTER_IP), "{f:#?}");
    assert!(has("demo/web:echo/UDP", [10, 96, 0, 10], 7, KIND_CLUSTER_IP));
    assert!(has("demo/web-nodeport:http/TCP", [0, 0, 0, 0], 30080, KIND_NODE_PORT));
    assert!(has("demo/web-nodeport:echo/UDP", [0, 0, 0, 0], 30007, KIND_NODE_PORT));
    assert!(has("demo/web-lb:http/TCP", [10, 99, 100, 10], 80, KIND_LOAD_BALANCER));
    assert!(has("demo/web-lb:http/TCP", [10, 99, 200, 10], 80, KIND_EXTERNAL_IP));
    assert!(has("demo/web-lb:http/TCP", [0, 0, 0, 0], 30081, KIND_NODE_PORT));
    // 2 (web) + 4 (nodeport: 2 cluster IP + 2 node ports) + 8 (lb: cluster, external, LB, node port per port)
    assert_eq!(f.len(), 14);
    // On another node the same endpoints are remote.
    assert!(frontend_names(&example_state(), "node-b").iter().all(|x| x.5 == 0));
}

#[test]
fn target_ports_come_from_the_slice_port_of_the_same_name() {
    let t = translate(&example_state(), "node-a");
    let web = &t.frontends["demo/web"];
    let http = web.iter().find(|f| f.key.proto == IPPROTO_TCP).unwrap();
    let echo = web.iter().find(|f| f.key.proto == IPPROTO_UDP).unwrap();
    assert!(http.backends.iter().all(|b| b.port == 8080));
    assert!(echo.backends.iter().all(|b| b.port == 7007));
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: prod}\nspec:\n  clusterIP: 10.96.1.1\n  ports: [{name: https, port: 443, targetPort: 8443}]\n";

fn slice(name: &str, endpoints: &str) -> String {
    format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: prod, labels: {{kubernetes.io/service-name: api}}}}\naddressType: IPv4\nports: [{{name: https, port: 8443}}]\nendpoints:\n{endpoints}")
}

#[test]
fn slices_merge_and_only_ready_endpoints_count() {
    let text = format!(
        "{SVC}{}{}",
        slice("api-1", "  - {addresses: [10.244.1.1], conditions: {ready: true}, nodeName: a}\n  - {addresses: [10.244.1.2], conditions: {ready: false}, nodeName: a}\n"),
        slice("api-2", "  - {addresses: [10.244.2.1], nodeName: b}\n  - {addresses: [10.244.2.2], conditions: {ready: true}, nodeName: b}\n"),
    );
    let state = parse_manifest("mem.yaml", &text).unwrap();
    let t = translate(&state, "a");
    let fe = &t.frontends["prod/api"][0];
    let addrs: Vec<(Ipv4Addr, bool)> = fe.backends.iter().map(|b| (b.addr, b.local)).collect();
    assert_eq!(
        addrs,
        vec![([10, 244, 1, 1].into(), true), ([10, 244, 2, 1].into(), false), ([10, 244, 2, 2].into(), false)],
        "both slices merged, the unready endpoint left out, a missing condition counts as ready"
    );
}

#[test]
fn headless_externalname_and_other_proxies_are_skipped() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\n\
                apiVersion: v1\nkind: Service\nmetadata: {name: e}\nspec: {type: ExternalName, externalName: example.org}\n---\n\
                apiVersion: v1\nkind: Service\nmetadata: {name: o, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n";
    let t = translate(&parse_manifest("mem.yaml", text).unwrap(), "a");
    assert!(t.frontends.is_empty() && t.errors.is_empty(), "{t:?}");
}

#[test]
fn bad_services_name_file_object_and_field() {
    let cases = [
        ("spec:\n  clusterIP: 10.96.1.1\n  ports: [{port: 70000}]", "spec.ports[0].port", "out of range"),
        ("spec:\n  clusterIP: 10.96.1.1\n  ports: [{port: 80, protocol: TCPX}]", "spec.ports[0].protocol", "unknown protocol"),
        ("spec:\n  clusterIP: 10.96.1.300\n  ports: [{port: 80}]", "spec.clusterIP", "not an IP address"),
        ("spec:\n  clusterIP: 10.96.1.1\n  ports: []", "spec.ports", "at least one port"),
        ("spec:\n  type: NodePort\n  clusterIP: 10.96.1.1\n  ports: [{port: 80, nodePort: 0}]", "spec.ports[0].nodePort", "out of range"),
        ("spec:\n  clusterIP: 10.96.1.1\n  externalIPs: [bogus]\n  ports: [{port: 80}]", "spec.externalIPs[0]", "not an IP address"),
    ];
    for (spec, field, msg) in cases {
        let text = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: prod}}\n{spec}\n");
        let t = translate(&parse_manifest("/etc/lb/bad.yaml", &text).unwrap(), "a");
        assert_eq!(t.errors.len(), 1, "{spec}");
        let e = &t.errors[0].1;
        assert_eq!((e.origin.as_str(), e.object.as_str(), e.field.as_str()), ("/etc/lb/bad.yaml", "Service prod/bad", field));
        assert!(e.message.contains(msg), "{e}");
        assert!(e.to_string().starts_with("/etc/lb/bad.yaml: Service prod/bad: "), "{e}");
    }
}

#[test]
fn malformed_documents_name_file_object_and_field() {
    let e = parse_manifest("x.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\nspec:\n  ports:\n    - port: eighty\n").unwrap_err();
    assert_eq!((e.origin.as_str(), e.object.as_str(), e.field.as_str()), ("x.yaml", "Service demo/web", "spec.ports[0].port"));
    let e = parse_manifest("y.yaml", "kind: Service\nmetadata: {name: a}\nspec: [\n").unwrap_err();
    assert_eq!(e.origin, "y.yaml");
    assert!(e.message.contains("invalid YAML"), "{e}");
    let e = parse_manifest("z.yaml", "apiVersion: v1\nmetadata: {name: a}\n").unwrap_err();
    assert_eq!(e.field, "kind");
}

#[test]
fn two_services_on_one_frontend_reject_the_second_only() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: prod}\nspec: {clusterIP: 10.96.5.5, ports: [{port: 80}]}\n---\n\
                apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: prod}\nspec: {clusterIP: 10.96.5.5, ports: [{port: 80}, {name: x, port: 81}]}\n";
    let t = translate(&parse_manifest("dup.yaml", text).unwrap(), "a");
    assert!(t.frontends.contains_key("prod/a") && !t.frontends.contains_key("prod/b"));
    assert_eq!(t.errors.len(), 1);
    let e = &t.errors[0].1;
    assert_eq!((e.object.as_str(), e.field.as_str()), ("Service prod/b", "spec"));
    assert!(e.message.contains("already used by Service prod/a"), "{e}");
}
