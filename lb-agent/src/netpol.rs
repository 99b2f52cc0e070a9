//! NetworkPolicy on this node: the Namespaces, Pods and NetworkPolicies read from either
//! source are compiled by the `policy` crate, and only what differs from the maps is written.
//! Writes go make-before-break: rules of a new identity exist before an address points at it,
//! and a pod loses its isolation before the rules that open it go.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Result;
use aya::maps::lpm_trie::Key;
use lb_common::*;
use log::{info, warn};
use ::policy::{Compiled, Direction, Identities, Prefix, Protocol, Verdict};
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::policy::{AllowRule, PolicyFlow, PolicyMaps},
    source::{model, objects::Objects},
};

/// Numbers given to names (policies) or addresses (endpoints), kept while the name lives, so
/// that a change rewrites nothing it does not touch; freed numbers are given again.
#[derive(Debug)]
struct Ids<K: Ord> {
    by_key: BTreeMap<K, u32>,
    free: Vec<u32>,
    next: u32,
    limit: u32,
}

impl<K: Ord + Clone> Ids<K> {
    fn new(first: u32, limit: u32) -> Self {
        Self { by_key: BTreeMap::new(), free: Vec::new(), next: first, limit }
    }

    /// The number of `key`; none when all are taken.
    fn of(&mut self, key: &K) -> Option<u32> {
        if let Some(id) = self.by_key.get(key) {
            return Some(*id);
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.next < self.limit => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.by_key.insert(key.clone(), id);
        Some(id)
    }

    /// Takes `id` for `key` (read back from the maps).
    fn adopt(&mut self, key: K, id: u32) {
        self.next = self.next.max(id + 1);
        self.by_key.insert(key, id);
    }

    fn keep_only(&mut self, keep: &BTreeSet<K>) {
        let gone: Vec<K> = self.by_key.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        for k in gone {
            self.free.extend(self.by_key.remove(&k));
        }
    }
}

/// The map contents, as last written.
#[derive(Default)]
struct Written {
    ipcache: BTreeMap<Prefix, u32>,
    endpoints: BTreeMap<IpAddr, PolicyEndpointV1>,
    /// LPM keys of allow rules, with the policy id each names.
    rules: BTreeMap<KeyBytes, (Key<PolicyKeyV1>, u32)>,
}

/// An LPM key as ordered bytes (aya's `Key` is neither `Ord` nor `Hash`).
type KeyBytes = (u32, [u8; 12]);

fn key_bytes(key: &Key<PolicyKeyV1>) -> KeyBytes {
    let d = key.data();
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&d.endpoint.to_be_bytes());
    b[4..8].copy_from_slice(&d.identity.to_be_bytes());
    b[8] = d.direction;
    b[9] = d.protocol;
    b[10..].copy_from_slice(&d.port);
    (key.prefix_len(), b)
}

/// What `lbctl policy` shows (GET /policy): identities, this node's pods and policies, counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyView {
    pub identities: Vec<IdentityView>,
    pub endpoints: Vec<EndpointView>,
    pub policies: Vec<PolicyEntry>,
    /// Policies (or parts) that cannot be enforced, and why.
    pub problems: Vec<String>,
    /// How long the last change took from the object's arrival to the map writes, in µs.
    pub last_programmed_us: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdentityView {
    pub id: u32,
    /// `key=value,...` (namespace labels as `ns:key`), or `cidr:<prefix>`.
    pub labels: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointView {
    pub address: IpAddr,
    pub pod: String,
    pub identity: u32,
    /// The number rules and counters know it by; none when no policy isolates it.
    pub endpoint: Option<u32>,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// The policies whose rules name it.
    pub policies: Vec<String>,
    pub denied_ingress: u64,
    pub denied_egress: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// `namespace/name`.
    pub name: String,
    /// `metadata.resourceVersion` of the version in force.
    pub version: Option<String>,
    pub id: Option<u32>,
    /// Allow rules written for this node's pods.
    pub rules: usize,
    /// New flows it allowed.
    pub allowed: u64,
}

pub type SharedPolicyView = Arc<Mutex<PolicyView>>;

/// The cluster as the `policy` crate reads it, and the version of each policy.
#[derive(Clone, Debug, Default)]
pub struct PolicyInput {
    pub namespaces: Vec<::policy::Namespace>,
    pub pods: Vec<::policy::Pod>,
    pub policies: Vec<::policy::Policy>,
    /// `namespace/name` -> `metadata.resourceVersion`.
    pub versions: BTreeMap<String, String>,
}

/// The policy input, from the objects.
pub fn input_of(objects: &Objects) -> PolicyInput {
    let labels = |l: &[(model::Text, model::Text)]| l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let namespaces = objects.namespaces().map(|n| ::policy::Namespace { name: n.metadata.id.name().into(), labels: labels(&n.labels) }).collect();
    let pods = objects
        .pods()
        .map(|p| {
            let spec = p.spec.as_ref();
            let ports = spec.map(|s| &*s.named_ports).unwrap_or_default();
            ::policy::Pod {
                namespace: p.metadata.id.namespace().into(),
                name: p.metadata.id.name().into(),
                labels: labels(&p.labels),
                ips: p.ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
                node: spec.and_then(|s| s.node_name.as_deref()).unwrap_or_default().into(),
                host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
                ports: ports
                    .iter()
                    .filter_map(|c| {
                        let protocol = Protocol::parse(c.protocol.as_deref().unwrap_or("TCP"))?;
                        Some(::policy::ContainerPort { name: c.name.as_deref()?.into(), port: u16::try_from(c.container_port).ok()?, protocol })
                    })
                    .collect(),
            }
        })
        .collect();
    let policies = objects.policies().map(|p| ::policy::Policy { namespace: p.metadata.id.namespace().into(), name: p.metadata.id.name().into(), spec: p.spec.clone() }).collect();
    let versions = objects.policies().filter_map(|p| Some((p.metadata.id.full().to_string(), p.version.as_deref()?.to_string()))).collect();
    PolicyInput { namespaces, pods, policies, versions }
}

pub struct NetworkPolicies {
    maps: PolicyMaps,
    identities: Identities,
    endpoint_ids: Ids<IpAddr>,
    policy_ids: Ids<String>,
    written: Written,
    compiled: Compiled,
    /// Problems already logged (each once).
    reported: BTreeSet<String>,
    pub view: SharedPolicyView,
}

impl NetworkPolicies {
    /// Opens the pinned maps and reads back what an earlier agent wrote.
    pub fn open(pin_dir: &std::path::Path) -> Result<Self> {
        let maps = PolicyMaps::open_pinned(pin_dir)?;
        let (ids, endpoints, rules) = maps.read_back();
        let mut written = Written::default();
        let mut endpoint_ids = Ids::new(0, MAX_ENDPOINTS);
        for (addr, len, id) in ids {
            written.ipcache.insert(Prefix { addr, len }, id);
        }
        for (addr, entry) in endpoints {
            endpoint_ids.adopt(addr, entry.endpoint);
            written.endpoints.insert(addr, entry);
        }
        for (key, policy) in rules {
            written.rules.insert(key_bytes(&key), (key, policy));
        }
        if !written.endpoints.is_empty() {
            info!("NetworkPolicy: {} isolated pods, {} rule keys and {} identities read back from the pinned maps", written.endpoints.len(), written.rules.len(), written.ipcache.len());
        }
        Ok(Self {
            maps,
            identities: Identities::default(),
            endpoint_ids,
            // Policy ids start at 1: 0 is no policy.
            policy_ids: Ids::new(1, MAX_POLICIES),
            written,
            compiled: Compiled::default(),
            reported: BTreeSet::new(),
            view: SharedPolicyView::default(),
        })
    }

    /// Compiles `input` for `node` and writes what changed. `changed_at` is when the first
    /// change arrived (the latency logged); `frontends` are Service addresses (flows to them
    /// are judged after translation, not here).
    pub fn sync(&mut self, input: &PolicyInput, node: &str, node_ips: &[IpAddr], changed_at: Instant, frontends: &HashSet<IpAddr>) -> Result<()> {
        let compiled = ::policy::compile(&::policy::Input { node, node_ips, namespaces: &input.namespaces, pods: &input.pods, policies: &input.policies }, &mut self.identities);
        for problem in &compiled.problems {
            if self.reported.insert(problem.clone()) {
                warn!("{problem}");
            }
        }
        let (wanted, errors) = self.wanted(&compiled);
        let stats = self.write(wanted);
        let elapsed = changed_at.elapsed();
        info!(
            "NetworkPolicy: {} policies, {} isolated pods of {} on this node, {} identities; {} entries written and {} removed, {:.1?} after the change",
            compiled.policies.len(),
            self.written.endpoints.len(),
            compiled.endpoints.len(),
            self.identities.list().len(),
            stats.0,
            stats.1,
            elapsed
        );
        for e in errors.iter().chain(&stats.2) {
            warn!("NetworkPolicy: {e}");
        }
        // Flows remembered as allowed that the new rules deny are judged again.
        if stats.0 + stats.1 > 0 {
            let denied: HashSet<PolicyFlow> = self
                .maps
                .flows()?
                .into_iter()
                .filter(|(src, dst, proto, port)| {
                    let Some(proto) = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].into_iter().find(|p| *p as u8 == *proto) else { return false };
                    !frontends.contains(dst) && matches!(compiled.verdict(*src, *dst, proto, *port), Verdict::Denied { .. })
                })
                .collect();
            if !denied.is_empty() {
                let n = self.maps.forget_flows(&denied)?;
                info!("NetworkPolicy: {n} remembered flows the new rules deny are judged again");
            }
        }
        self.compiled = compiled;
        let view = self.render(&input.versions, elapsed.as_micros() as u64, errors);
        *self.view.lock().expect("not poisoned") = view;
        Ok(())
    }

    /// The map contents `compiled` asks for, and what could not be given an id.
    fn wanted(&mut self, compiled: &Compiled) -> (Written, Vec<String>) {
        let mut errors = Vec::new();
        let mut out = Written { ipcache: compiled.ipcache.clone(), ..Default::default() };
        let isolated: BTreeSet<IpAddr> = compiled.endpoints.iter().filter(|(_, e)| e.ingress_isolated || e.egress_isolated).map(|(ip, _)| *ip).collect();
        self.endpoint_ids.keep_only(&isolated);
        for ip in &isolated {
            let e = &compiled.endpoints[ip];
            let Some(endpoint) = self.endpoint_ids.of(ip) else {
                errors.push(format!("{} ({ip}): more than {MAX_ENDPOINTS} isolated pods on this node; it is left open", e.pod));
                continue;
            };
            let flags = if e.ingress_isolated { POLICY_INGRESS_ISOLATED } else { 0 } | if e.egress_isolated { POLICY_EGRESS_ISOLATED } else { 0 };
            out.endpoints.insert(*ip, PolicyEndpointV1 { endpoint, flags });
        }
        self.policy_ids.keep_only(&compiled.policies.iter().cloned().collect());
        for rule in &compiled.rules {
            let (Some(ep), Some(policy)) = (out.endpoints.get(&rule.endpoint), self.policy_ids.of(&compiled.policies[rule.policy as usize])) else { continue };
            let allow = AllowRule {
                endpoint: ep.endpoint,
                direction: if rule.direction == Direction::Ingress { POLICY_INGRESS } else { POLICY_EGRESS },
                identity: rule.peer,
                protocol: rule.protocol.map_or(0, |p| p as u8),
                ports: rule.ports,
            };
            for key in allow.keys() {
                out.rules.entry(key_bytes(&key)).or_insert((key, policy));
            }
        }
        (out, errors)
    }

    /// Writes the difference between `wanted` and what is written: (entries written, removed,
    /// errors). An entry that fails stays unwritten and is tried again on the next change.
    fn write(&mut self, wanted: Written) -> (usize, usize, Vec<String>) {
        let (mut put, mut gone, mut errors) = (0, 0, Vec::new());
        let old = std::mem::take(&mut self.written);
        let mut now = Written::default();
        // New policy ids start their counters at zero.
        let old_ids: BTreeSet<u32> = old.rules.values().map(|(_, p)| *p).collect();
        let new_ids: BTreeSet<u32> = wanted.rules.values().map(|(_, p)| *p).filter(|p| !old_ids.contains(p)).collect();
        for id in new_ids {
            if let Err(e) = self.maps.zero_counters(Some(id), None) {
                errors.push(format!("{e:#}"));
            }
        }
        // 1. Rules (make before break).
        for (bytes, (key, policy)) in &wanted.rules {
            if old.rules.get(bytes).is_some_and(|(_, p)| p == policy) {
                now.rules.insert(*bytes, (Key::new(key.prefix_len(), key.data()), *policy));
                continue;
            }
            match self.maps.insert_key(key, *policy) {
                Ok(()) => {
                    put += 1;
                    now.rules.insert(*bytes, (Key::new(key.prefix_len(), key.data()), *policy));
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        // 2. Identities of addresses and prefixes.
        for (prefix, id) in &wanted.ipcache {
            if old.ipcache.get(prefix) == Some(id) {
                now.ipcache.insert(*prefix, *id);
                continue;
            }
            match self.maps.set_identity(prefix.addr, prefix.len, *id) {
                Ok(()) => {
                    put += 1;
                    now.ipcache.insert(*prefix, *id);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        // 3. Isolation of pods.
        for (ip, entry) in &wanted.endpoints {
            if old.endpoints.get(ip) == Some(entry) {
                now.endpoints.insert(*ip, *entry);
                continue;
            }
            if old.endpoints.get(ip).is_none_or(|o| o.endpoint != entry.endpoint) {
                if let Err(e) = self.maps.zero_counters(None, Some(entry.endpoint)) {
                    errors.push(format!("{e:#}"));
                }
            }
            match self.maps.set_endpoint(*ip, *entry) {
                Ok(()) => {
                    put += 1;
                    now.endpoints.insert(*ip, *entry);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        // 4. Then what is no longer wanted: pods opened first, their rules after.
        for ip in old.endpoints.keys().filter(|ip| !wanted.endpoints.contains_key(ip)) {
            self.maps.remove_endpoint(*ip);
            gone += 1;
        }
        for (key, _) in old.rules.iter().filter(|(b, _)| !wanted.rules.contains_key(*b)).map(|(_, v)| v) {
            self.maps.remove_key(key);
            gone += 1;
        }
        for prefix in old.ipcache.keys().filter(|p| !wanted.ipcache.contains_key(*p)) {
            self.maps.remove_identity(prefix.addr, prefix.len);
            gone += 1;
        }
        self.written = now;
        (put, gone, errors)
    }

    /// The view `lbctl policy` reads.
    fn render(&self, versions: &BTreeMap<String, String>, last_programmed_us: u64, errors: Vec<String>) -> PolicyView {
        let c = &self.compiled;
        let identities = self.identities.list().into_iter().map(|(id, labels)| IdentityView { id, labels }).collect();
        let mut names_of: BTreeMap<IpAddr, BTreeSet<&str>> = BTreeMap::new();
        let mut rules_of: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &c.rules {
            let name = c.policies[r.policy as usize].as_str();
            names_of.entry(r.endpoint).or_default().insert(name);
            *rules_of.entry(name).or_default() += 1;
        }
        let endpoints = c
            .endpoints
            .iter()
            .map(|(ip, e)| {
                let endpoint = self.written.endpoints.get(ip).map(|w| w.endpoint);
                EndpointView {
                    address: *ip,
                    pod: e.pod.clone(),
                    identity: e.identity,
                    endpoint,
                    ingress_isolated: e.ingress_isolated,
                    egress_isolated: e.egress_isolated,
                    policies: names_of.get(ip).into_iter().flatten().map(|n| n.to_string()).collect(),
                    denied_ingress: endpoint.map_or(0, |id| self.maps.denied(id, POLICY_INGRESS)),
                    denied_egress: endpoint.map_or(0, |id| self.maps.denied(id, POLICY_EGRESS)),
                }
            })
            .collect();
        let policies = c
            .policies
            .iter()
            .map(|name| {
                let id = self.policy_ids.by_key.get(name).copied();
                PolicyEntry {
                    name: name.clone(),
                    version: versions.get(name.as_str()).cloned(),
                    id,
                    rules: rules_of.get(name.as_str()).copied().unwrap_or(0),
                    allowed: id.map_or(0, |id| self.maps.allowed(id)),
                }
            })
            .collect();
        let mut problems = c.problems.clone();
        problems.extend(errors);
        PolicyView { identities, endpoints, policies, problems, last_programmed_us: Some(last_programmed_us) }
    }

    /// Removes every entry (policy is enforced by another component now).
    pub fn clear(&mut self) {
        let (_, gone, _) = self.write(Written::default());
        if gone > 0 {
            info!("NetworkPolicy is not enforced: {gone} entries an earlier agent wrote removed");
        }
    }
}
