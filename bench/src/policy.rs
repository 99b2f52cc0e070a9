//! Per-packet cost of NetworkPolicy: a pod-to-pod packet through `lb_tc_to_pod` (the
//! destination pod's ingress check) and `lb_tc` (the source pod's egress check), under 1, 100
//! and 1,000 policies compiled by the `policy` crate and written by the agent's own writer.
//!
//! Every policy selects the server pod and allows one client identity on TCP 80; the measured
//! client is allowed by the first. Methods as in the per-packet suite: `repeat` for paths that
//! leave the packet unchanged, `single` (one run per distinct new flow, the kernel-reported
//! time of each, median) for new flows. The raw times are reported: the question is whether
//! they stay flat as policies are added.
use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    time::Instant,
};

use anyhow::{ensure, Result};
use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use lb_agent::{
    dataplane::load::{self, MapSizes},
    netpol::{NetworkPolicies, PolicyInput},
};
use lb_common::*;
use serde_json::json;
use testbed::progtest::Testbed;

use crate::{packet::syn, stats::Summary};

pub struct Config {
    pub policies: Vec<usize>,
    pub repeat: u32,
    pub single_runs: usize,
    pub runs: usize,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub policies: usize,
    pub path: &'static str,
    pub method: &'static str,
    pub ns: Summary,
}

/// TC verdicts as BPF_PROG_TEST_RUN returns them.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const NODE: &str = "bench-node";
const CLIENT: [u8; 4] = [10, 244, 1, 11];
const SERVER: [u8; 4] = [10, 244, 1, 12];
/// A pod of this node that no policy selects.
const OPEN_POD: [u8; 4] = [10, 244, 1, 13];
/// The pod of the second policy's client (on another node): denied on port 81.
const OTHER_CLIENT: [u8; 4] = [10, 245, 0, 1];

fn pod(name: &str, labels: &[(&str, String)], ip: [u8; 4], node: &str) -> ::policy::Pod {
    ::policy::Pod {
        namespace: "bench".into(),
        name: name.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        ips: vec![IpAddr::from(ip)],
        node: node.into(),
        ..Default::default()
    }
}

/// `n` policies, each letting one client identity reach the server on TCP 80, and one
/// egress policy letting the client reach the server.
fn input(n: usize) -> Result<PolicyInput> {
    let mut pods = vec![pod("client", &[("client", "0".into())], CLIENT, NODE), pod("server", &[("app", "server".into())], SERVER, NODE), pod("open", &[("app", "open".into())], OPEN_POD, NODE)];
    for i in 1..n {
        pods.push(pod(&format!("peer-{i}"), &[("client", i.to_string())], [10, 245, (i >> 8) as u8, i as u8], "other-node"));
    }
    let mut policies = Vec::new();
    for i in 0..n {
        let spec: NetworkPolicySpec = serde_json::from_value(json!({
            "podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"client": i.to_string()}}}], "ports": [{"port": 80}]}],
        }))?;
        policies.push(::policy::Policy { namespace: "bench".into(), name: format!("allow-{i}"), spec });
    }
    let egress: NetworkPolicySpec = serde_json::from_value(json!({
        "podSelector": {"matchLabels": {"client": "0"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}], "ports": [{"port": 80}]}],
    }))?;
    policies.push(::policy::Policy { namespace: "bench".into(), name: "client-egress".into(), spec: egress });
    Ok(PolicyInput { namespaces: vec![::policy::Namespace { name: "bench".into(), ..Default::default() }], pods, policies, versions: BTreeMap::new() })
}

/// One size's testbed: the maps hold `n` policies.
struct Bed {
    n: usize,
    tb: Testbed,
    /// The next source port of a new flow.
    port: u16,
}

impl Bed {
    fn new(n: usize, flows: u32) -> Result<Self> {
        let tb = Testbed::new(&MapSizes { policy_flows: Some(flows), ..Default::default() })?;
        let mut policies = NetworkPolicies::open(&tb.mount.dir)?;
        policies.sync(&input(n)?, NODE, &[IpAddr::from([10, 99, 0, 1])], Instant::now(), &HashSet::new())?;
        // The verdicts the timings are of.
        ensure!(tb.time_tc(load::TC_TO_POD_PROGRAM, &syn(CLIENT, 999, SERVER, 80), 1)?.0 == TC_ACT_OK, "the client is allowed");
        ensure!(tb.time_tc(load::TC_TO_POD_PROGRAM, &syn(OTHER_CLIENT, 999, SERVER, 81), 1)?.0 == TC_ACT_SHOT, "port 81 is denied");
        Ok(Self { n, tb, port: 1024 })
    }

    /// The median of `runs` single runs of `program`, each a new allowed flow to the server.
    fn new_flows(&mut self, program: &str, runs: usize) -> Result<f64> {
        let mut ns = Vec::with_capacity(runs);
        for _ in 0..runs {
            self.port = self.port.wrapping_add(1).max(1024);
            let (verdict, t) = self.tb.time_tc(program, &syn(CLIENT, self.port, SERVER, 80), 1)?;
            ensure!(verdict == TC_ACT_OK, "a new allowed flow got verdict {verdict}");
            ns.push(t);
        }
        ns.sort_by(f64::total_cmp);
        Ok(ns[ns.len() / 2])
    }
}

const REPEAT_PATHS: [(&str, [u8; 4], [u8; 4], u16, u32); 3] = [
    ("lb_tc_to_pod: to a pod no policy selects", CLIENT, OPEN_POD, 80, TC_ACT_OK),
    ("lb_tc_to_pod: allowed flow, established", CLIENT, SERVER, 80, TC_ACT_OK),
    ("lb_tc_to_pod: denied (no rule)", OTHER_CLIENT, SERVER, 81, TC_ACT_SHOT),
];
const NEW_FLOW_PATHS: [(&str, &str); 2] = [("lb_tc_to_pod: allowed, new flow", load::TC_TO_POD_PROGRAM), ("lb_tc: egress allowed, new flow (not a service)", load::TC_PROGRAM)];

/// Every size's maps are built first; then each run measures every path at every size in
/// turn, so drift on the machine shifts all sizes alike.
pub fn run(cfg: &Config) -> Result<Vec<Row>> {
    let flows = (2 * cfg.single_runs * cfg.runs + 1024).next_power_of_two() as u32;
    let mut beds: Vec<Bed> = cfg.policies.iter().map(|n| Bed::new(*n, flows)).collect::<Result<_>>()?;
    let paths = REPEAT_PATHS.len() + NEW_FLOW_PATHS.len();
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); paths]; beds.len()];
    for _ in 0..cfg.runs {
        for (bed, samples) in beds.iter_mut().zip(&mut samples) {
            for (i, (path, src, dst, port, verdict)) in REPEAT_PATHS.iter().enumerate() {
                let (got, ns) = bed.tb.time_tc(load::TC_TO_POD_PROGRAM, &syn(*src, 999, *dst, *port), cfg.repeat)?;
                ensure!(got == *verdict, "{path}: verdict {got}");
                samples[i].push(ns);
            }
            for (i, (_, program)) in NEW_FLOW_PATHS.iter().enumerate() {
                samples[REPEAT_PATHS.len() + i].push(bed.new_flows(program, cfg.single_runs)?);
            }
        }
    }
    let mut rows = Vec::new();
    for (bed, samples) in beds.iter().zip(&samples) {
        let reasons = bed.tb.dataplane.maps.reason_counts()?;
        ensure!(reasons[reason::DROP_POLICY as usize] >= cfg.repeat as u64, "the denied path did not drop by policy");
        let names = REPEAT_PATHS.iter().map(|p| (p.0, "repeat")).chain(NEW_FLOW_PATHS.iter().map(|p| (p.0, "single")));
        for ((path, method), samples) in names.zip(samples) {
            rows.push(Row { policies: bed.n, path, method, ns: Summary::of(samples) });
        }
    }
    Ok(rows)
}
