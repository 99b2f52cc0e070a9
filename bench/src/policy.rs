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

pub fn run(cfg: &Config) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &n in &cfg.policies {
        let flows = (2 * cfg.single_runs * cfg.runs + 1024).next_power_of_two() as u32;
        let tb = Testbed::new(&MapSizes { policy_flows: Some(flows), ..Default::default() })?;
        let mut policies = NetworkPolicies::open(&tb.mount.dir)?;
        policies.sync(&input(n)?, NODE, &[IpAddr::from([10, 99, 0, 1])], Instant::now(), &HashSet::new())?;
        let to_pod = |packet: &[u8], repeat: u32| tb.time_tc(load::TC_TO_POD_PROGRAM, packet, repeat);
        let out_of_pod = |packet: &[u8], repeat: u32| tb.time_tc(load::TC_PROGRAM, packet, repeat);
        // The verdicts the timings are of.
        ensure!(to_pod(&syn(CLIENT, 999, SERVER, 80), 1)?.0 == TC_ACT_OK, "the client is allowed");
        ensure!(to_pod(&syn(OTHER_CLIENT, 999, SERVER, 81), 1)?.0 == TC_ACT_SHOT, "port 81 is denied");
        let repeat_paths: [(&'static str, Vec<u8>, u32); 3] = [
            ("lb_tc_to_pod: to a pod no policy selects", syn(CLIENT, 1000, OPEN_POD, 80), TC_ACT_OK),
            ("lb_tc_to_pod: allowed flow, established", syn(CLIENT, 999, SERVER, 80), TC_ACT_OK),
            ("lb_tc_to_pod: denied (no rule)", syn(OTHER_CLIENT, 999, SERVER, 81), TC_ACT_SHOT),
        ];
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); repeat_paths.len()];
        for _ in 0..cfg.runs {
            for ((path, packet, verdict), samples) in repeat_paths.iter().zip(&mut samples) {
                let (got, ns) = to_pod(packet, cfg.repeat)?;
                ensure!(got == *verdict, "{path}: verdict {got}");
                samples.push(ns);
            }
        }
        for ((path, _, _), samples) in repeat_paths.iter().zip(&samples) {
            rows.push(Row { policies: n, path, method: "repeat", ns: Summary::of(samples) });
        }
        // New flows: a distinct source port each, one run each, the median of each batch.
        let mut port = 1024u16;
        let mut single = |time: &dyn Fn(&[u8], u32) -> Result<(u32, f64)>, dst: [u8; 4]| -> Result<Vec<f64>> {
            let mut medians = Vec::new();
            for _ in 0..cfg.runs {
                let mut runs = Vec::with_capacity(cfg.single_runs);
                for _ in 0..cfg.single_runs {
                    port = port.wrapping_add(1).max(1024);
                    let (verdict, ns) = time(&syn(CLIENT, port, dst, 80), 1)?;
                    ensure!(verdict == TC_ACT_OK, "a new allowed flow got verdict {verdict}");
                    runs.push(ns);
                }
                runs.sort_by(f64::total_cmp);
                medians.push(runs[runs.len() / 2]);
            }
            Ok(medians)
        };
        let ingress = single(&to_pod, SERVER)?;
        let egress = single(&out_of_pod, SERVER)?;
        rows.push(Row { policies: n, path: "lb_tc_to_pod: allowed, new flow", method: "single", ns: Summary::of(&ingress) });
        rows.push(Row { policies: n, path: "lb_tc: egress allowed, new flow (not a service)", method: "single", ns: Summary::of(&egress) });
        let reasons = tb.dataplane.maps.reason_counts()?;
        ensure!(reasons[reason::DROP_POLICY as usize] >= cfg.repeat as u64, "the denied path did not drop by policy");
    }
    Ok(rows)
}
