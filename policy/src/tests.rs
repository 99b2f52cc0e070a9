//! The upstream `netpol` matrix on the compiled tables: namespaces x, y, z with pods a, b, c
//! (a and c on node-a, b on node-b), ports 80 and 81 over TCP and UDP. Each case states the
//! expected truth table of every pair; a mismatch prints both tables.
use std::net::{IpAddr, Ipv4Addr};

use serde_json::json;

use super::*;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn pod_ip(ns: usize, pod: usize) -> IpAddr {
    // Node-a's pods in 10.244.1.0/24, node-b's in 10.244.2.0/24.
    let node = if pod == 1 { 2 } else { 1 };
    IpAddr::V4(Ipv4Addr::new(10, 244, node, (10 * (ns + 1) + pod) as u8))
}

fn cluster() -> (Vec<Namespace>, Vec<Pod>) {
    let namespaces = NAMESPACES.iter().map(|n| Namespace { name: n.to_string(), labels: [("ns".to_string(), n.to_string())].into() }).collect();
    let mut pods = Vec::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        for (j, name) in PODS.iter().enumerate() {
            let ports = [(80, Protocol::Tcp), (81, Protocol::Tcp), (80, Protocol::Udp), (81, Protocol::Udp)]
                .iter()
                .map(|(port, p)| ContainerPort { name: format!("serve-{port}-{}", if *p == Protocol::Tcp { "tcp" } else { "udp" }), port: *port, protocol: *p })
                .collect();
            pods.push(Pod {
                namespace: ns.to_string(),
                name: name.to_string(),
                labels: [("pod".to_string(), name.to_string())].into(),
                ips: vec![pod_ip(i, j)],
                node: if j == 1 { "node-b" } else { "node-a" }.into(),
                host_network: false,
                ports,
            });
        }
    }
    (namespaces, pods)
}

fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> Policy {
    Policy { namespace: namespace.into(), name: name.into(), spec: serde_json::from_value(spec).expect("a NetworkPolicySpec") }
}

const NODE_A_IP: [u8; 4] = [10, 99, 0, 1];

/// Both nodes' tables, as each node's agent would compile them.
fn compile_both(policies: &[Policy], ids: &mut Identities) -> [Compiled; 2] {
    let (namespaces, pods) = cluster();
    let node_ips = [[IpAddr::from(NODE_A_IP)], [IpAddr::from([10, 99, 0, 2])]];
    ["node-a", "node-b"].map(|node| {
        let i = (node == "node-b") as usize;
        compile(&Input { node, node_ips: &node_ips[i], namespaces: &namespaces, pods: &pods, policies }, ids)
    })
}

/// Whether `src` reaches `dst`: the egress check on the source's node, the ingress check on
/// the destination's (a pod reaching itself never leaves it).
fn reaches(nodes: &[Compiled; 2], src: (usize, usize), dst: (usize, usize), protocol: Protocol, port: u16) -> bool {
    if src == dst {
        return true;
    }
    let (s, d) = (pod_ip(src.0, src.1), pod_ip(dst.0, dst.1));
    let node_of = |pod: usize| &nodes[(pod == 1) as usize];
    let egress = node_of(src.1).allows(s, Direction::Egress, node_of(src.1).identity_of(d), protocol, port);
    let ingress = node_of(dst.1).allows(d, Direction::Ingress, node_of(dst.1).identity_of(s), protocol, port);
    matches!(egress, Verdict::Allowed(_)) && matches!(ingress, Verdict::Allowed(_))
}

fn all_pods() -> Vec<(usize, usize)> {
    (0..3).flat_map(|n| (0..3).map(move |p| (n, p))).collect()
}

fn name(p: (usize, usize)) -> String {
    format!("{}/{}", NAMESPACES[p.0], PODS[p.1])
}

fn table(f: impl Fn((usize, usize), (usize, usize)) -> bool) -> String {
    let mut out = format!("{:>5}", "");
    for d in all_pods() {
        out += &format!(" {:>4}", name(d));
    }
    for s in all_pods() {
        out += &format!("\n{:>5}", name(s));
        for d in all_pods() {
            out += &format!(" {:>4}", if f(s, d) { "." } else { "X" });
        }
    }
    out
}

/// Probes every pair on `port`/`protocol` and compares with `expected(src, dst)`.
fn probe(case: &str, policies: &[Policy], protocol: Protocol, port: u16, expected: impl Fn((usize, usize), (usize, usize)) -> bool) {
    let nodes = compile_both(policies, &mut Identities::default());
    for n in &nodes {
        assert!(n.problems.is_empty(), "{case}: {:?}", n.problems);
    }
    let got = |s, d| reaches(&nodes, s, d, protocol, port);
    let mismatch = all_pods().into_iter().flat_map(|s| all_pods().into_iter().map(move |d| (s, d))).any(|(s, d)| got(s, d) != (s == d || expected(s, d)));
    assert!(!mismatch, "{case} ({protocol:?} {port}): expected\n{}\ngot\n{}", table(|s, d| s == d || expected(s, d)), table(got));
}

const X: usize = 0;
const Y: usize = 1;
const Z: usize = 2;
const A: usize = 0;
const B: usize = 1;

#[test]
fn no_policy_allows_everything() {
    probe("no policy", &[], Protocol::Tcp, 80, |_, _| true);
}

#[test]
fn default_deny_ingress_and_egress() {
    let deny_ingress = policy("x", "deny-ingress", json!({"podSelector": {}, "policyTypes": ["Ingress"]}));
    probe("default deny ingress", &[deny_ingress.clone()], Protocol::Tcp, 80, |_, d| d.0 != X);
    probe("default deny ingress, UDP", &[deny_ingress], Protocol::Udp, 81, |_, d| d.0 != X);
    let deny_egress = policy("x", "deny-egress", json!({"podSelector": {}, "policyTypes": ["Egress"]}));
    probe("default deny egress", &[deny_egress], Protocol::Tcp, 80, |s, _| s.0 != X);
    // An empty ingress list isolates and allows nothing.
    probe("ingress: []", &[policy("x", "empty", json!({"podSelector": {}, "ingress": []}))], Protocol::Tcp, 80, |_, d| d.0 != X);
}

#[test]
fn allow_all_and_same_namespace() {
    let deny = policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}));
    let allow_all = policy("x", "allow-all", json!({"podSelector": {}, "ingress": [{}], "egress": [{}]}));
    probe("deny plus allow all (a union)", &[deny.clone(), allow_all], Protocol::Tcp, 80, |_, _| true);
    let same_ns = policy("x", "same-ns", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}));
    probe("allow from the same namespace", &[same_ns], Protocol::Tcp, 80, |s, d| d.0 != X || s.0 == X);
}

#[test]
fn namespace_selector_and_and_or_of_selectors() {
    let from_y = policy("x", "from-y", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}));
    probe("namespaceSelector ns=y to x/a", &[from_y], Protocol::Tcp, 80, |s, d| d != (X, A) || s.0 == Y);
    // One peer with both selectors: pods b of namespace y only.
    let and = policy("x", "and", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}));
    probe("podSelector AND namespaceSelector", &[and], Protocol::Tcp, 80, |s, d| d != (X, A) || s == (Y, B));
    // Two peers: all of namespace y, or pods b of namespace x.
    let or = policy("x", "or", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}));
    probe("podSelector OR namespaceSelector", &[or], Protocol::Tcp, 80, |s, d| d != (X, A) || s.0 == Y || s == (X, B));
    // An empty namespaceSelector is every namespace; with podSelector, pods b anywhere.
    let any_ns = policy("x", "any-ns", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}));
    probe("empty namespaceSelector", &[any_ns], Protocol::Tcp, 80, |s, d| d != (X, A) || s.1 == B);
    let by_name = policy("x", "by-name", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}]}]}));
    probe("namespace by its name label", &[by_name], Protocol::Tcp, 80, |s, d| d.0 != X || s.0 == Z);
}

#[test]
fn match_expressions() {
    let not_x = policy("x", "not-x", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]}));
    probe("namespaceSelector NotIn x", &[not_x], Protocol::Tcp, 80, |s, d| d.0 != X || s.0 != X);
    let in_ac = policy("y", "in", json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "c"]}]}, "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"}]}}]}]}));
    probe("podSelector In and Exists", &[in_ac], Protocol::Tcp, 80, |s, d| !(d.0 == Y && d.1 != B) || s.0 == Y);
}

#[test]
fn ports_named_ports_end_port_and_protocols() {
    let on_81 = policy("x", "on-81", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}));
    probe("port 81 allowed, on 80", &[on_81.clone()], Protocol::Tcp, 80, |_, d| d.0 != X);
    probe("port 81 allowed, on 81", &[on_81.clone()], Protocol::Tcp, 81, |_, _| true);
    probe("TCP port 81 allowed, UDP 81", &[on_81], Protocol::Udp, 81, |_, d| d.0 != X);
    let named = policy("x", "named", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}));
    probe("named port serve-81-udp, UDP 81", &[named.clone()], Protocol::Udp, 81, |_, _| true);
    probe("named port serve-81-udp, UDP 80", &[named], Protocol::Udp, 80, |_, d| d.0 != X);
    let range = policy("x", "range", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 82}]}]}));
    probe("endPort 81-82, on 80", &[range.clone()], Protocol::Tcp, 80, |_, d| d.0 != X);
    probe("endPort 81-82, on 81", &[range], Protocol::Tcp, 81, |_, _| true);
    let sctp = policy("x", "sctp", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}));
    probe("SCTP 80 allowed, TCP 80", &[sctp.clone()], Protocol::Tcp, 80, |_, d| d.0 != X);
    probe("SCTP 80 allowed, SCTP 80", &[sctp], Protocol::Sctp, 80, |_, _| true);
    // Egress named ports are the peer's ports.
    let egress_named = policy("x", "egress-named", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}));
    probe("egress to named port serve-80-tcp, TCP 80", &[egress_named.clone()], Protocol::Tcp, 80, |_, _| true);
    probe("egress to named port serve-80-tcp, TCP 81", &[egress_named], Protocol::Tcp, 81, |s, _| s.0 != X);
}

#[test]
fn egress_to_a_pod_and_ip_blocks() {
    let to_b = policy("x", "to-b", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}));
    probe("x/a egress only to x/b", &[to_b], Protocol::Tcp, 80, |s, d| s != (X, A) || d == (X, B));
    // Egress to node-b's pod range, except y/b: the pods b of x and z only.
    let yb = pod_ip(Y, B);
    let block = policy("x", "block", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.244.2.0/24", "except": [format!("{yb}/32")]}}]}]}));
    probe("ipBlock with except", &[block], Protocol::Tcp, 80, |s, d| s != (X, A) || (d.1 == B && d.0 != Y));
    // Outside addresses: the CIDR identity allows 203.0.113.7, the exception denies 203.0.113.128/25.
    let outside = policy("x", "outside", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}]}]}));
    let nodes = compile_both(&[outside], &mut Identities::default());
    let xa = pod_ip(X, A);
    let to = |addr: [u8; 4]| nodes[0].allows(xa, Direction::Egress, nodes[0].identity_of(IpAddr::from(addr)), Protocol::Tcp, 443);
    assert!(matches!(to([203, 0, 113, 7]), Verdict::Allowed(Some(0))));
    assert_eq!(to([203, 0, 113, 200]), Verdict::Denied { endpoint: xa, direction: Direction::Egress });
    assert_eq!(to([198, 51, 100, 1]), Verdict::Denied { endpoint: xa, direction: Direction::Egress });
}

#[test]
fn policy_types_default_to_egress_when_egress_rules_exist() {
    // No policyTypes and an egress rule: Ingress and Egress both isolate, so ingress is denied.
    let egress_only = policy("x", "egress-only", json!({"podSelector": {}, "egress": [{}]}));
    probe("no policyTypes, egress rule", &[egress_only], Protocol::Tcp, 80, |_, d| d.0 != X);
}

#[test]
fn the_node_always_reaches_its_pods_and_verdicts_name_the_policy() {
    let deny = policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}));
    let allow_81 = policy("x", "allow-81", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}));
    let nodes = compile_both(&[deny, allow_81], &mut Identities::default());
    let xa = pod_ip(X, A);
    let node = IpAddr::from(NODE_A_IP);
    assert_eq!(nodes[0].identity_of(node), IDENTITY_HOST);
    assert_eq!(nodes[0].verdict(node, xa, Protocol::Tcp, 80), Verdict::Allowed(None), "the node to its pod");
    assert_eq!(nodes[0].verdict(xa, node, Protocol::Tcp, 10250), Verdict::Allowed(None), "the pod to its node");
    assert_eq!(nodes[0].verdict(IpAddr::from([203, 0, 113, 9]), xa, Protocol::Tcp, 81), Verdict::Allowed(Some(1)), "allowed by allow-81");
    assert_eq!(nodes[0].verdict(IpAddr::from([203, 0, 113, 9]), xa, Protocol::Tcp, 80), Verdict::Denied { endpoint: xa, direction: Direction::Ingress });
    assert_eq!(nodes[0].policies, ["x/deny", "x/allow-81"]);
}

#[test]
fn identities_stay_across_changes_and_are_freed() {
    let mut ids = Identities::default();
    let before = compile_both(&[], &mut ids);
    let xa = pod_ip(X, A);
    let id = before[0].identity_of(xa);
    assert!(id >= FIRST_POD_IDENTITY);
    let block = policy("x", "block", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]}));
    let after = compile_both(&[block], &mut ids);
    assert_eq!(after[0].identity_of(xa), id, "a policy change renumbers no pod");
    assert!(after[0].identity_of(IpAddr::from([203, 0, 113, 1])) >= FIRST_CIDR_IDENTITY);
    compile_both(&[], &mut ids);
    assert!(ids.list().iter().all(|(_, what)| !what.starts_with("cidr:")), "the prefix's identity is freed with its last policy");
    // Each of the 9 pods has its own label set (pod and namespace labels).
    assert_eq!(ids.list().len(), 9);
}

#[test]
fn invalid_selectors_fail_closed_and_are_reported() {
    let bad = policy("x", "bad", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Near"}]}}]}]}));
    let nodes = compile_both(&[bad], &mut Identities::default());
    assert!(nodes[0].problems.iter().any(|p| p.contains("x/bad") && p.contains("Near")), "{:?}", nodes[0].problems);
    let xa = pod_ip(X, A);
    assert!(matches!(nodes[0].verdict(pod_ip(Y, A), xa, Protocol::Tcp, 80), Verdict::Denied { .. }), "the pods it selects stay isolated");
}

#[test]
fn port_ranges_split_into_aligned_prefixes() {
    assert_eq!(port_prefixes(80, 80), [(80, 16)]);
    assert_eq!(port_prefixes(80, 81), [(80, 15)]);
    assert_eq!(port_prefixes(81, 82), [(81, 16), (82, 16)]);
    assert_eq!(port_prefixes(0, 65535), [(0, 0)]);
    assert_eq!(port_prefixes(1024, 2047), [(1024, 6)]);
    // Every port of a range is in exactly one prefix, and none outside it.
    for (lo, hi) in [(1, 1000), (32000, 32768), (65000, 65535), (7, 9)] {
        let prefixes = port_prefixes(lo, hi);
        for port in 0..=65535u16 {
            let hits = prefixes.iter().filter(|(start, len)| {
                let size = 1u32 << (16 - *len as u32);
                (*start as u32..*start as u32 + size).contains(&(port as u32))
            });
            assert_eq!(hits.count(), (lo..=hi).contains(&port) as usize, "{lo}-{hi}: port {port}");
        }
    }
}

/// An ipBlock matches pod addresses, not label sets: a dual-stack pod's IPv6 address is in no
/// IPv4 block, and of two pods with one label set only the one inside the block is a peer.
#[test]
fn ip_blocks_match_addresses_not_label_sets() {
    let (namespaces, mut pods) = cluster();
    let xb6: IpAddr = "fd00:244:2::21".parse().unwrap();
    pods.iter_mut().find(|p| p.namespace == "x" && p.name == "b").unwrap().ips.push(xb6);
    // A twin of y/b (same labels, same namespace) on node-a, outside 10.244.2.0/24.
    let twin: IpAddr = [10, 244, 1, 99].into();
    let yb = pods.iter().find(|p| p.namespace == "y" && p.name == "b").unwrap().clone();
    pods.push(Pod { name: "b-twin".into(), ips: vec![twin], node: "node-a".into(), ..yb });
    let block = policy("x", "from-node-b", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.2.0/24"}}]}]}));
    let mut ids = Identities::default();
    let node_a = compile(&Input { node: "node-a", node_ips: &[IpAddr::from(NODE_A_IP)], namespaces: &namespaces, pods: &pods, policies: &[block.clone()] }, &mut ids);
    let xa = pod_ip(X, A);
    let allowed = |src: IpAddr| matches!(node_a.verdict(src, xa, Protocol::Tcp, 80), Verdict::Allowed(_));
    assert!(allowed(pod_ip(X, B)), "x/b's IPv4 address is inside");
    assert!(!allowed(xb6), "x/b's IPv6 address is in no IPv4 block");
    assert!(allowed(pod_ip(Y, B)), "y/b is inside");
    assert!(!allowed(twin), "y/b's twin has its labels but not its place");
    assert_ne!(node_a.identity_of(pod_ip(Y, B)), node_a.identity_of(twin));
    // Without the policy, the twins share one identity again.
    let open = compile(&Input { node: "node-a", node_ips: &[IpAddr::from(NODE_A_IP)], namespaces: &namespaces, pods: &pods, policies: &[] }, &mut ids);
    assert_eq!(open.identity_of(pod_ip(Y, B)), open.identity_of(twin));
}
