//! Kubernetes semantics of the translation, and the errors bad manifests give.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use lb_agent::{
    dataplane::Frontend,
    source::manifests::{parse_manifest, ManifestDir},
    translate::{claim, translate, Claim, Claims, ClusterState, ObjectError, ServiceName, Translation},
};
use lb_common::*;

/// What the agent programs from a translation on a first sync: rejected Services have no
/// last good version, and claims are settled with no previous owners.
struct Settled {
    frontends: BTreeMap<String, Vec<Frontend>>,
    errors: Vec<ObjectError>,
    warnings: Vec<ObjectError>,
}

fn settle(t: Translation) -> Settled {
    let mut errors = Vec::new();
    let mut candidates = Vec::new();
    for s in t.services {
        match s.result {
            Ok(claims) => candidates.push((s.name, s.origin, claims)),
            Err(e) => errors.push(e),
        }
    }
    let claimed = claim(candidates, &HashMap::new());
    errors.extend(claimed.errors);
    let frontends = claimed.frontends.into_iter().filter(|(_, c)| !c.is_empty()).map(|(n, c)| (n.to_string(), c.into_iter().map(|c| (*c.frontend).clone()).collect())).collect();
    Settled { frontends, errors, warnings: t.warnings }
}

fn settled(state: &ClusterState, node: &str) -> Settled {
    settle(translate(state, node))
}

/// The octets of an IPv4 address (the test fails on an IPv6 one).
fn octets4(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

fn example_state() -> ClusterState {
    let mut dir = ManifestDir::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/manifests"));
    let (changed, errors) = dir.refresh().unwrap();
    assert!(changed);
    assert!(errors.is_empty(), "{errors:?}");
    dir.state()
}

fn frontend_names(state: &ClusterState, node: &str) -> Vec<(String, IpAddr, u16, u8, usize, usize)> {
    let t = settled(state, node);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let mut out: Vec<_> = t
        .frontends
        .values()
        .flatten()
        .map(|f| (f.name.to_string(), f.key.addr, port_host(f.key.port), f.kind, f.backends.len(), f.backends.iter().filter(|b| b.local).count()))
        .collect();
    out.sort();
    out
}

#[test]
fn example_manifests_give_every_kind_of_frontend() {
    let f = frontend_names(&example_state(), "node-a");
    let has = |name: &str, addr: [u8; 4], port: u16, kind: u8| f.iter().any(|x| x.0 == name && x.1 == IpAddr::from(addr) && x.2 == port && x.3 == kind && x.4 == 3 && x.5 == 3);
    let has6 = |name: &str, addr: &str, port: u16, kind: u8| f.iter().any(|x| x.0 == name && x.1 == addr.parse::<IpAddr>().unwrap() && x.2 == port && x.3 == kind && x.4 == 3 && x.5 == 3);
    assert!(has("demo/web:http/TCP", [10, 96, 0, 10], 80, KIND_CLUSTER_IP), "{f:#?}");
    let t = translate(&example_state(), "node-a");
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert_eq!(t.health_checks.len(), 1);
    assert_eq!((t.health_checks[0].port, t.health_checks[0].local_endpoints), (32000, 3));
    assert!(has("demo/web:echo/UDP", [10, 96, 0, 10], 7, KIND_CLUSTER_IP));
    assert!(has("demo/web-nodeport:http/TCP", [0, 0, 0, 0], 30080, KIND_NODE_PORT));
    assert!(has("demo/web-nodeport:echo/UDP", [0, 0, 0, 0], 30007, KIND_NODE_PORT));
    assert!(has("demo/web-lb:http/TCP", [10, 99, 100, 10], 80, KIND_LOAD_BALANCER));
    assert!(has("demo/web-lb:http/TCP", [10, 99, 200, 10], 80, KIND_EXTERNAL_IP));
    assert!(has("demo/web-lb:http/TCP", [0, 0, 0, 0], 30081, KIND_NODE_PORT));
    assert!(has("demo/web-sticky:http/TCP", [10, 96, 0, 13], 80, KIND_CLUSTER_IP));
    assert!(has("demo/web-local:http/TCP [local]", [10, 99, 100, 11], 80, KIND_LOAD_BALANCER));
    assert!(has("demo/web-dual:http/TCP", [10, 96, 0, 16], 80, KIND_CLUSTER_IP));
    assert!(has6("demo/web-dual:http/TCP", "fd00:96::16", 80, KIND_CLUSTER_IP));
    assert!(has6("demo/web-dual:http/TCP", "::", 30680, KIND_NODE_PORT));
    assert!(has6("demo/web-dual:http/TCP", "fd00:99:100::16", 80, KIND_LOAD_BALANCER));
    // 2 (web) + 4 (nodeport: 2 cluster IP + 2 node ports) + 8 (lb: cluster, external, LB, node
    // port per port) + 1 (sticky) + 5 (local: cluster IP, and LB and node port in both scopes)
    // + 5 (dual: a cluster IP and a node port per family, the IPv6 LB IP)
    assert_eq!(f.len(), 25);
    // On another node the same endpoints are remote.
    assert!(frontend_names(&example_state(), "node-b").iter().all(|x| x.5 == 0));
}

#[test]
fn target_ports_come_from_the_slice_port_of_the_same_name() {
    let t = settled(&example_state(), "node-a");
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
        slice("api-2", "  - {addresses: [10.244.2.1, 10.244.2.9], nodeName: b}\n  - {addresses: [10.244.2.2], conditions: {ready: true}, nodeName: b}\n"),
    );
    let state = parse_manifest("mem.yaml", &text).unwrap();
    let t = settled(&state, "a");
    let fe = &t.frontends["prod/api"][0];
    let addrs: Vec<(IpAddr, bool)> = fe.backends.iter().map(|b| (b.addr, b.local)).collect();
    assert_eq!(
        addrs,
        vec![([10, 244, 1, 1].into(), true), ([10, 244, 2, 1].into(), false), ([10, 244, 2, 2].into(), false)],
        "both slices merged, the unready endpoint left out, a missing condition counts as ready, only an endpoint's first address used (as kube-proxy)"
    );
}

#[test]
fn lists_as_kubectl_writes_them_are_read_item_by_item() {
    // `kubectl get svc,endpointslices,deploy -n prod -o yaml`: one `kind: List` whose items
    // carry their kinds, a Deployment among them.
    let indent = |doc: &str| doc.trim_start_matches("---\n").lines().enumerate().map(|(i, l)| if i == 0 { format!("  - {l}\n") } else { format!("    {l}\n") }).collect::<String>();
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, namespace: prod}\nspec: {replicas: 2}\n";
    let list = format!("apiVersion: v1\nkind: List\nmetadata: {{resourceVersion: \"\"}}\nitems:\n{}{}{}", indent(SVC), indent(&slice("api-1", "  - {addresses: [10.244.1.1], nodeName: a}\n")), indent(deployment));
    let t = settled(&parse_manifest("list.yaml", &list).unwrap(), "a");
    let backends: Vec<IpAddr> = t.frontends["prod/api"][0].backends.iter().map(|b| b.addr).collect();
    assert_eq!(backends, vec![IpAddr::from([10, 244, 1, 1])], "the Service and its slice, from the list's items");

    // A typed list, as the API serves it: items without a kind.
    let typed = format!("apiVersion: v1\nkind: ServiceList\nitems:\n{}", indent(&SVC.replace("kind: Service\n", "")));
    assert_eq!(parse_manifest("typed.yaml", &typed).unwrap().services.len(), 1);

    // A list without items, and an item without a kind in an untyped list, are errors that
    // name the document and item.
    let e = parse_manifest("empty.yaml", "apiVersion: v1\nkind: List\n").unwrap_err();
    assert_eq!((e.object.as_str(), e.field.as_str()), ("List (document 1)", "items"));
    let e = parse_manifest("kindless.yaml", "apiVersion: v1\nkind: List\nitems:\n  - metadata: {name: x}\n").unwrap_err();
    assert_eq!((e.object.as_str(), e.field.as_str()), (" (document 1, item 1)", "kind"));
    // A bad item fails the file, naming the object and field.
    let bad = list.replace("port: 443", "port: eighty");
    let e = parse_manifest("list.yaml", &bad).unwrap_err();
    assert_eq!((e.object.as_str(), e.field.as_str()), ("Service prod/api", "spec.ports[0].port"));
}

#[test]
fn headless_externalname_and_other_proxies_are_skipped() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\n\
                apiVersion: v1\nkind: Service\nmetadata: {name: e}\nspec: {type: ExternalName, externalName: example.org}\n---\n\
                apiVersion: v1\nkind: Service\nmetadata: {name: o, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n";
    let t = settled(&parse_manifest("mem.yaml", text).unwrap(), "a");
    assert!(t.frontends.is_empty() && t.errors.is_empty(), "{:?}", t.frontends);
}

#[test]
fn bad_services_name_file_object_and_field() {
    let cases = [
        ("spec:\n  clusterIP: 10.96.1.1\n  ports: [{port: 70000}]", "spec.ports[0].port", "out of range"),
        ("spec:\n  clusterIP: 10.96.1.1\n  ports: [{port: 80, protocol: TCPX}]", "spec.ports[0].protocol", "unknown protocol"),
        ("spec:\n  clusterIP: 10.96.1.1\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n  ports: [{port: 80}]", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "out of range"),
        ("spec:\n  clusterIP: 10.96.1.1\n  sessionAffinity: Cookie\n  ports: [{port: 80}]", "spec.sessionAffinity", "unknown value"),
        ("spec:\n  type: NodePort\n  clusterIP: 10.96.1.1\n  externalTrafficPolicy: Nearest\n  ports: [{port: 80}]", "spec.externalTrafficPolicy", "unknown value"),
        ("spec:\n  type: LoadBalancer\n  clusterIP: 10.96.1.1\n  loadBalancerSourceRanges: [10.0.0.0/33]\n  ports: [{port: 80}]", "spec.loadBalancerSourceRanges[0]", "prefix length"),
        ("spec:\n  clusterIP: 10.96.1.300\n  ports: [{port: 80}]", "spec.clusterIP", "not an IP address"),
        ("spec:\n  clusterIP: 10.96.1.1\n  ports: []", "spec.ports", "at least one port"),
        ("spec:\n  type: NodePort\n  clusterIP: 10.96.1.1\n  ports: [{port: 80, nodePort: 0}]", "spec.ports[0].nodePort", "out of range"),
        ("spec:\n  clusterIP: 10.96.1.1\n  externalIPs: [bogus]\n  ports: [{port: 80}]", "spec.externalIPs[0]", "not an IP address"),
    ];
    for (spec, field, msg) in cases {
        let text = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: prod}}\n{spec}\n");
        let t = settled(&parse_manifest("/etc/lb/bad.yaml", &text).unwrap(), "a");
        assert_eq!(t.errors.len(), 1, "{spec}");
        let e = &t.errors[0];
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

fn service(name: &str, created: Option<&str>, spec: &str) -> String {
    let created = created.map(|t| format!(", creationTimestamp: \"{t}\"")).unwrap_or_default();
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: prod{created}}}\nspec:\n{spec}\n")
}

#[test]
fn a_contested_frontend_stays_with_the_oldest_service_and_only_the_newcomer_loses_it() {
    // "b" was created first; "a" sorts first by name and repeats b's external IP and port.
    let text = service("b", Some("2026-01-01T00:00:00Z"), "  clusterIP: 10.96.5.2\n  externalIPs: [10.99.200.9]\n  ports: [{port: 80}]")
        + &service("a", Some("2026-06-01T00:00:00Z"), "  clusterIP: 10.96.5.1\n  externalIPs: [10.99.200.9]\n  ports: [{port: 80}]");
    let t = settled(&parse_manifest("dup.yaml", &text).unwrap(), "n");
    let keys = |svc: &str| t.frontends[svc].iter().map(|f| octets4(f.key.addr)).collect::<Vec<_>>();
    assert_eq!(keys("prod/b"), vec![[10, 96, 5, 2], [10, 99, 200, 9]]);
    assert_eq!(keys("prod/a"), vec![[10, 96, 5, 1]], "the newcomer keeps its own ClusterIP");
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    let e = &t.errors[0];
    assert_eq!((e.object.as_str(), e.field.as_str()), ("Service prod/a", "spec.externalIPs[0]"));
    assert!(e.message.contains("10.99.200.9:80") && e.message.contains("80/TCP") && e.message.contains("already used by Service prod/b"), "{e}");

    // Without creation times, the Service that holds the frontend now keeps it, whatever the names.
    let text = service("b", None, "  clusterIP: 10.96.5.5\n  ports: [{port: 80}]") + &service("a", None, "  clusterIP: 10.96.5.5\n  ports: [{port: 80}]");
    let mut candidates = Vec::new();
    for s in translate(&parse_manifest("dup.yaml", &text).unwrap(), "n").services {
        candidates.push((s.name, s.origin, s.result.unwrap()));
    }
    let key = Service4KeyV1 { addr: ip4_raw([10, 96, 5, 5]), port: port_raw(80), proto: IPPROTO_TCP, scope: SCOPE_CLUSTER }.into();
    let claimed = claim(candidates.clone(), &HashMap::from([(key, "prod/b".into())]));
    assert_eq!((claimed.frontends["prod/b"].len(), claimed.frontends["prod/a"].len()), (1, 0));
    assert_eq!(claimed.errors[0].object, "Service prod/a");
    let claimed = claim(candidates, &HashMap::new());
    assert_eq!((claimed.frontends["prod/a"].len(), claimed.frontends["prod/b"].len()), (1, 0), "a new frontend goes to the first by name");
}

const TWO_NODE_SLICE: &str = "  - {addresses: [10.244.1.1], nodeName: a}\n  - {addresses: [10.244.2.1], nodeName: b}\n";

#[test]
fn external_traffic_policy_local_adds_a_local_scope_for_outside_clients() {
    let text = service("api", None, "  type: LoadBalancer\n  clusterIP: 10.96.1.1\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n  ports: [{name: https, port: 443, nodePort: 30443}]")
        + "status: {loadBalancer: {ingress: [{ip: 10.99.100.1}]}}\n"
        + &slice("api-1", TWO_NODE_SLICE);
    let state = parse_manifest("etp.yaml", &text).unwrap();
    let t = translate(&state, "a");
    assert_eq!(t.health_checks.len(), 1);
    assert_eq!((t.health_checks[0].port, t.health_checks[0].local_endpoints), (32001, 1));
    let t = settle(t);
    let fs = &t.frontends["prod/api"];
    let cluster_ip = fs.iter().find(|f| f.kind == KIND_CLUSTER_IP).unwrap();
    assert!(!cluster_ip.ext_local && cluster_ip.backends.len() == 2, "pods reach every endpoint");
    for kind in [KIND_LOAD_BALANCER, KIND_NODE_PORT] {
        let cluster = fs.iter().find(|f| f.kind == kind && f.key.scope == SCOPE_CLUSTER).unwrap();
        let local = fs.iter().find(|f| f.kind == kind && f.key.scope == SCOPE_LOCAL).unwrap();
        assert!(cluster.ext_local && cluster.backends.len() == 2);
        assert_eq!(local.backends.iter().map(|b| (b.addr, b.local)).collect::<Vec<_>>(), vec![([10, 244, 1, 1].into(), true)]);
        assert_eq!(local.draining.len(), 1, "the remote endpoint keeps flows it already has");
    }
    // On node c there is no local endpoint: the local scope is empty and the check says 0.
    assert_eq!(translate(&state, "c").health_checks[0].local_endpoints, 0);
    assert!(settled(&state, "c").frontends["prod/api"].iter().filter(|f| f.key.scope == SCOPE_LOCAL).all(|f| f.backends.is_empty()));
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let text = service("api", None, "  clusterIP: 10.96.1.1\n  internalTrafficPolicy: Local\n  ports: [{name: https, port: 443}]") + &slice("api-1", TWO_NODE_SLICE);
    let t = settled(&parse_manifest("itp.yaml", &text).unwrap(), "b");
    let f = &t.frontends["prod/api"][0];
    assert_eq!(f.backends.iter().map(|b| b.addr).collect::<Vec<_>>(), vec![IpAddr::from([10, 244, 2, 1])]);
    let t = settled(&parse_manifest("itp.yaml", &text).unwrap(), "c");
    assert!(t.frontends["prod/api"][0].backends.is_empty(), "no endpoint here: refused");
}

#[test]
fn terminating_endpoints_serve_only_when_nothing_is_ready() {
    let cases = [
        // (endpoints, selectable, draining)
        ("  - {addresses: [10.244.1.1], conditions: {ready: true}}\n  - {addresses: [10.244.1.2], conditions: {ready: false, serving: true, terminating: true}}\n", vec![[10, 244, 1, 1]], 1),
        ("  - {addresses: [10.244.1.2], conditions: {ready: false, serving: true, terminating: true}}\n  - {addresses: [10.244.1.3], conditions: {ready: false, serving: false, terminating: true}}\n", vec![[10, 244, 1, 2]], 1),
        ("  - {addresses: [10.244.1.3], conditions: {ready: false, serving: false, terminating: true}}\n", vec![], 1),
    ];
    for (endpoints, selectable, draining) in cases {
        let text = format!("{SVC}{}", slice("api-1", endpoints));
        let t = settled(&parse_manifest("t.yaml", &text).unwrap(), "a");
        let f = &t.frontends["prod/api"][0];
        let got: Vec<[u8; 4]> = f.backends.iter().map(|b| octets4(b.addr)).collect();
        assert_eq!((got, f.draining.len()), (selectable, draining), "{endpoints}");
    }
}

#[test]
fn affinity_and_source_ranges_are_read_with_kubernetes_defaults() {
    let text = service(
        "api",
        None,
        "  type: LoadBalancer\n  clusterIP: 10.96.1.1\n  sessionAffinity: ClientIP\n  loadBalancerSourceRanges: [192.0.2.77/24, 2001:db8::/32, 10.0.0.1/32]\n  ports: [{name: https, port: 443, nodePort: 30443}]",
    ) + "status: {loadBalancer: {ingress: [{ip: 10.99.100.1}]}}\n"
        + &service("short", None, "  clusterIP: 10.96.1.2\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}\n  ports: [{port: 80}]")
        + &service("annotated", None, "  type: LoadBalancer\n  clusterIP: 10.96.1.3\n  ports: [{port: 80}]").replace("namespace: prod}", "namespace: prod, annotations: {service.beta.kubernetes.io/load-balancer-source-ranges: \"198.51.100.0/24\"}}")
        + "status: {loadBalancer: {ingress: [{ip: 10.99.100.3}]}}\n";
    let t = settled(&parse_manifest("a.yaml", &text).unwrap(), "a");
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let api = &t.frontends["prod/api"];
    assert!(api.iter().all(|f| f.affinity_timeout_s == Some(10_800)), "default timeout");
    let lb = api.iter().find(|f| f.kind == KIND_LOAD_BALANCER).unwrap();
    let v6: IpAddr = "2001:db8::".parse().unwrap();
    assert_eq!(lb.source_ranges, Some(vec![([192, 0, 2, 0].into(), 24), (v6, 32), ([10, 0, 0, 1].into(), 32)]), "host bits cleared, both families kept");
    assert!(api.iter().filter(|f| f.kind != KIND_LOAD_BALANCER).all(|f| f.source_ranges.is_none()), "ranges guard the LoadBalancer IPs only");
    assert_eq!(t.frontends["prod/short"][0].affinity_timeout_s, Some(5));
    let annotated = t.frontends["prod/annotated"].iter().find(|f| f.kind == KIND_LOAD_BALANCER).unwrap();
    assert_eq!(annotated.source_ranges, Some(vec![([198, 51, 100, 0].into(), 24)]));
}

/// A dual-stack Service is served in both families: each address in its own family, a NodePort
/// in each, each family's frontends balancing to that family's EndpointSlices. Ranges of one
/// family only admit no client of the other (closed, not open); an address of a family the
/// Service has no cluster IP of is not programmed, as kube-proxy does, and said so.
#[test]
fn dual_stack_services_are_served_in_both_families_each_with_its_own_endpoints() {
    let text = service(
        "dual",
        None,
        "  type: LoadBalancer\n  clusterIPs: [10.96.2.1, fd00::1]\n  externalIPs: [2001:db8::7]\n  loadBalancerSourceRanges: [2001:db8::/32]\n  ports: [{name: http, port: 80, nodePort: 30080}]",
    ) + "status: {loadBalancer: {ingress: [{ip: 10.99.100.9}, {ip: 2001:db8::9}]}}\n"
        + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dual-4, namespace: prod, labels: {kubernetes.io/service-name: dual}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n  - {addresses: [10.244.1.1], nodeName: a}\n"
        + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dual-6, namespace: prod, labels: {kubernetes.io/service-name: dual}}\naddressType: IPv6\nports: [{name: http, port: 8080}]\nendpoints:\n  - {addresses: [\"fd00:244::1\"], nodeName: a}\n  - {addresses: [\"fd00:244::2\"], nodeName: b}\n"
        + &service("single", None, "  clusterIP: 10.96.2.2\n  externalIPs: [10.99.200.2, 2001:db8::8]\n  ports: [{port: 80}]");
    let t = settled(&parse_manifest("a.yaml", &text).unwrap(), "a");
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let warned: Vec<(&str, &str)> = t.warnings.iter().map(|w| (w.field.as_str(), w.message.as_str())).collect();
    assert_eq!(warned.len(), 2, "{warned:#?}");
    assert!(warned[0].0 == "spec.loadBalancerSourceRanges" && warned[0].1.contains("every IPv4 client"), "{warned:#?}");
    assert!(warned[1].0 == "spec.externalIPs[1]" && warned[1].1.contains("no IPv6 cluster IP"), "{warned:#?}");
    let mut frontends: Vec<(String, u8, Vec<String>)> = t.frontends["prod/dual"]
        .iter()
        .map(|f| (f.key.to_string(), f.kind, f.backends.iter().map(|b| std::net::SocketAddr::new(b.addr, b.port).to_string()).collect()))
        .collect();
    frontends.sort();
    let (v4, v6) = (vec!["10.244.1.1:8080".to_string()], vec!["[fd00:244::1]:8080".to_string(), "[fd00:244::2]:8080".to_string()]);
    assert_eq!(
        frontends,
        vec![
            ("*:30080".into(), KIND_NODE_PORT, v4.clone()),
            ("10.96.2.1:80".into(), KIND_CLUSTER_IP, v4.clone()),
            ("10.99.100.9:80".into(), KIND_LOAD_BALANCER, v4),
            ("[*]:30080".into(), KIND_NODE_PORT, v6.clone()),
            ("[2001:db8::7]:80".into(), KIND_EXTERNAL_IP, v6.clone()),
            ("[2001:db8::9]:80".into(), KIND_LOAD_BALANCER, v6.clone()),
            ("[fd00::1]:80".into(), KIND_CLUSTER_IP, v6),
        ]
    );
    let single: Vec<String> = t.frontends["prod/single"].iter().map(|f| f.key.to_string()).collect();
    assert_eq!(single, ["10.96.2.2:80", "10.99.200.2:80"], "no IPv6 frontend without an IPv6 cluster IP");
}

#[test]
fn unsupported_fields_are_named_once_and_the_rest_of_the_service_works() {
    let text = service(
        "api",
        None,
        "  type: LoadBalancer\n  clusterIP: 10.96.1.1\n  trafficDistribution: PreferClose\n  ports: [{name: https, port: 443}, {name: sctp, port: 9, protocol: SCTP}]",
    ) + "status: {loadBalancer: {ingress: [{ip: 10.99.100.1, ipMode: Proxy}, {ip: 10.99.100.2, ipMode: VIP}]}}\n";
    let t = settled(&parse_manifest("u.yaml", &text).unwrap(), "a");
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let fields: Vec<&str> = t.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(fields, vec!["spec.trafficDistribution", "status.loadBalancer.ingress[0].ipMode", "spec.ports[1].protocol"]);
    assert!(t.warnings.iter().all(|w| w.object == "Service prod/api"));
    let addrs: Vec<[u8; 4]> = t.frontends["prod/api"].iter().map(|f| octets4(f.key.addr)).collect();
    assert_eq!(addrs, vec![[10, 96, 1, 1], [10, 99, 100, 2]], "the TCP port on the ClusterIP and the VIP-mode ingress");
}

#[test]
fn a_frontend_let_go_goes_to_the_service_waiting_for_it_and_only_changed_services_are_settled() {
    let older = service("old", Some("2026-01-01T00:00:00Z"), "  clusterIP: 10.96.6.1\n  externalIPs: [10.99.200.7]\n  ports: [{port: 80}]");
    let newer = service("new", Some("2026-06-01T00:00:00Z"), "  clusterIP: 10.96.6.2\n  externalIPs: [10.99.200.7]\n  ports: [{port: 80}]");
    let other = service("other", None, "  clusterIP: 10.96.6.3\n  ports: [{port: 80}]");
    // Every Service of `text` asks for its frontends, in the order translation gives.
    let want = |claims: &mut Claims, text: &str| -> BTreeSet<ServiceName> {
        let mut names = BTreeSet::new();
        for (i, s) in translate(&parse_manifest("f.yaml", text).unwrap(), "n").services.into_iter().enumerate() {
            names.insert(s.name.clone());
            claims.want(s.name, Some(i as i64), s.origin, s.result.unwrap().into());
        }
        names
    };
    let ips = |claims: &[Claim]| claims.iter().map(|c| octets4(c.frontend.key.addr)).collect::<Vec<_>>();
    let mut claims = Claims::default();
    let all = want(&mut claims, &(older.clone() + &newer + &other));
    let first = claims.settle(all, true);
    assert_eq!(first.errors.len(), 1, "the newer Service waits for the external IP");
    assert_eq!(ips(claims.granted("prod/new")), [[10, 96, 6, 2]]);

    // The older Service drops the external IP: settling it alone wakes the newer one, and
    // leaves the third untouched.
    want(&mut claims, &(service("old", Some("2026-01-01T00:00:00Z"), "  clusterIP: 10.96.6.1\n  ports: [{port: 80}]") + &newer + &other));
    let next = claims.settle(BTreeSet::from(["prod/old".into()]), false);
    let looked_at: Vec<&str> = next.changes.iter().map(|(n, _, _)| &**n).collect();
    assert_eq!(looked_at, ["prod/old", "prod/new"]);
    assert!(next.errors.is_empty(), "{:?}", next.errors);
    assert_eq!(ips(claims.granted("prod/new")), [[10, 96, 6, 2], [10, 99, 200, 7]]);
    assert_eq!(ips(claims.granted("prod/old")), [[10, 96, 6, 1]]);

    // A Service that is gone lets go of everything.
    claims.unwant("prod/new");
    let gone = claims.settle(BTreeSet::from(["prod/new".into()]), false);
    assert_eq!((gone.changes.len(), gone.changes[0].2.len()), (1, 0));
    assert!(claims.granted("prod/new").is_empty());
}
