//! NetworkPolicy (networking.k8s.io/v1) turned into what the datapath enforces: numeric
//! identities for label sets, an address-to-identity table (longest prefix wins: pods as
//! /32 or /128, the prefixes `ipBlock`s name), each local pod's isolation per direction, and
//! allow rules keyed by endpoint, direction, peer identity, protocol and port range.
//!
//! [`Compiled::verdict`] evaluates a packet the way the kernel programs will, from the same
//! tables: the reference the datapath tests compare against.
//!
//! Semantics (Kubernetes API docs, upstream `netpol` tests):
//! - a pod selected by no policy of a direction is open in that direction; selected by any,
//!   only what some selecting policy allows passes (policies are a union);
//! - `policyTypes` defaults to Ingress, plus Egress when the policy has egress rules;
//! - a rule without peers allows every peer, without ports every port; a policy with no rules
//!   of a direction it isolates allows nothing;
//! - in one peer `namespaceSelector` and `podSelector` are ANDed; separate peers are ORed; a
//!   peer with only `podSelector` selects in the policy's namespace, with only
//!   `namespaceSelector` every pod of the selected namespaces; an empty selector selects all;
//! - a port's protocol defaults to TCP; `endPort` makes a range; a named port is resolved on
//!   the pod that receives the traffic (the selected pod for ingress, each peer for egress);
//! - traffic between a pod and its own node is always allowed.
pub mod selector;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
pub use selector::Labels;

/// The reserved identities, as the datapath knows them: any peer (in a rule), the node
/// itself, and an address nothing else names.
pub use lb_common::{IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD};
/// Identities of pods' label sets start here.
pub const FIRST_POD_IDENTITY: u32 = 256;
/// Identities of `ipBlock` prefixes start here (Cilium's local-identity range).
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;

/// The label Kubernetes puts on every namespace, with its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp = 6,
    Udp = 17,
    Sctp = 132,
}

impl Protocol {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node: String,
    pub host_network: bool,
    /// Named container ports, for named ports in policies.
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub spec: NetworkPolicySpec,
}

/// An address prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

impl Prefix {
    /// Parses `addr/len`, keeping only the network bits; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = text.split_once('/').ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?} is not a CIDR: bad address"))?;
        let (_, width) = bits(addr);
        let len: u8 = len.parse().ok().filter(|l| *l <= width).ok_or_else(|| format!("{text:?} is not a CIDR: prefix length must be 0-{width}"))?;
        Ok(Self { addr, len }.masked())
    }

    pub fn host(addr: IpAddr) -> Self {
        Self { addr, len: bits(addr).1 }
    }

    fn mask(&self) -> u128 {
        let (_, width) = bits(self.addr);
        let host_bits = (width - self.len) as u32;
        if host_bits >= 128 { 0 } else { !((1u128 << host_bits) - 1) }
    }

    fn masked(self) -> Self {
        let (n, _) = bits(self.addr);
        let n = n & self.mask();
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(n.into()),
        };
        Self { addr, ..self }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && bits(ip).0 & self.mask() == bits(self.addr).0
    }

    /// Whether every address of `other` is in this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Numeric identities, kept from one compilation to the next so that a change renumbers
/// nothing it does not touch.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    by_labels: BTreeMap<Labels, u32>,
    by_prefix: BTreeMap<Prefix, u32>,
    free_pod: Vec<u32>,
    free_prefix: Vec<u32>,
}

impl Identities {
    fn of_labels(&mut self, labels: &Labels) -> u32 {
        if let Some(id) = self.by_labels.get(labels) {
            return *id;
        }
        let id = self.free_pod.pop().unwrap_or(FIRST_POD_IDENTITY + self.by_labels.len() as u32);
        self.by_labels.insert(labels.clone(), id);
        id
    }

    fn of_prefix(&mut self, prefix: Prefix) -> u32 {
        if let Some(id) = self.by_prefix.get(&prefix) {
            return *id;
        }
        let id = self.free_prefix.pop().unwrap_or(FIRST_CIDR_IDENTITY + self.by_prefix.len() as u32);
        self.by_prefix.insert(prefix, id);
        id
    }

    /// Frees the identities of label sets and prefixes no longer in use.
    fn keep_only(&mut self, labels: &BTreeSet<Labels>, prefixes: &BTreeSet<Prefix>) {
        let stale: Vec<Labels> = self.by_labels.keys().filter(|l| !labels.contains(*l)).cloned().collect();
        for l in stale {
            self.free_pod.extend(self.by_labels.remove(&l));
        }
        let stale: Vec<Prefix> = self.by_prefix.keys().filter(|p| !prefixes.contains(*p)).copied().collect();
        for p in stale {
            self.free_prefix.extend(self.by_prefix.remove(&p));
        }
    }

    /// Each identity in use and what it stands for.
    pub fn list(&self) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> = self.by_labels.iter().map(|(l, id)| (*id, l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))).collect();
        out.extend(self.by_prefix.iter().map(|(p, id)| (*id, format!("cidr:{p}"))));
        out.sort();
        out
    }
}

/// Where a local pod stands: whether some policy isolates it in each direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// `namespace/name`.
    pub pod: String,
    pub identity: u32,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
}

/// One allow rule: traffic of `endpoint` in `direction` with a peer of identity `peer` (or
/// [`IDENTITY_ANY`]), of `protocol` (any when `None`) to a port in `ports` (any when `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub endpoint: IpAddr,
    pub direction: Direction,
    pub peer: u32,
    pub protocol: Option<Protocol>,
    pub ports: Option<(u16, u16)>,
    /// Index into [`Compiled::policies`]: the policy that allows it.
    pub policy: u32,
}

/// What one packet gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; by the policy named (none when the pod is not isolated, or the peer is the node).
    Allowed(Option<u32>),
    /// Denied by the isolation of this pod in this direction.
    Denied { endpoint: IpAddr, direction: Direction },
}

/// What the datapath needs, for this node's pods.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// Address prefix -> identity; the longest prefix containing an address gives its identity.
    pub ipcache: BTreeMap<Prefix, u32>,
    /// This node's pods, by address.
    pub endpoints: BTreeMap<IpAddr, EndpointPolicy>,
    pub rules: BTreeSet<Rule>,
    /// `namespace/name` of every policy, by index.
    pub policies: Vec<String>,
    /// Policies (or parts) that could not be used, and why.
    pub problems: Vec<String>,
}

/// The cluster as policy sees it.
pub struct Input<'a> {
    /// This node's name: rules are made for its pods only.
    pub node: &'a str,
    /// This node's own addresses (always allowed to and from its pods).
    pub node_ips: &'a [IpAddr],
    pub namespaces: &'a [Namespace],
    pub pods: &'a [Pod],
    pub policies: &'a [Policy],
}

/// A pod with its namespace's labels and the identity of each of its addresses.
struct Member<'a> {
    pod: &'a Pod,
    ns_labels: &'a Labels,
    /// (address, identity): one label set may give two addresses two identities (see `compile`).
    ids: Vec<(IpAddr, u32)>,
}

impl Member<'_> {
    fn identities(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids.iter().map(|(_, id)| *id)
    }
}

/// A port clause resolved: protocol, and a port range (none: every port).
type PortClause = (Protocol, Option<(u16, u16)>);

/// A rule's ports: numeric clauses, and named ports (protocol and name) to resolve on the pod
/// that receives the traffic. Clauses that cannot allow anything are reported.
fn port_clauses<'p>(ports: &'p [NetworkPolicyPort], problems: &mut Vec<String>, policy: &str) -> (Vec<PortClause>, Vec<(Protocol, &'p str)>) {
    let (mut numeric, mut named) = (Vec::new(), Vec::new());
    for p in ports {
        let protocol = match p.protocol.as_deref().map(Protocol::parse) {
            None => Protocol::Tcp,
            Some(Some(proto)) => proto,
            Some(None) => {
                problems.push(format!("NetworkPolicy {policy}: protocol {:?} is not TCP, UDP or SCTP; that port allows nothing", p.protocol.as_deref().unwrap_or_default()));
                continue;
            }
        };
        match &p.port {
            None => numeric.push((protocol, None)),
            Some(IntOrString::Int(port)) => {
                let (Ok(lo), Ok(hi)) = (u16::try_from(*port), u16::try_from(p.end_port.unwrap_or(*port))) else {
                    problems.push(format!("NetworkPolicy {policy}: port {port} (endPort {:?}) is out of range", p.end_port));
                    continue;
                };
                if hi < lo {
                    problems.push(format!("NetworkPolicy {policy}: endPort {hi} is below port {lo}"));
                    continue;
                }
                numeric.push((protocol, Some((lo, hi))));
            }
            Some(IntOrString::String(name)) => named.push((protocol, name.as_str())),
        }
    }
    (numeric, named)
}

/// Named ports looked up in `pod`'s container ports (a name it lacks allows nothing on it).
fn resolve_named(named: &[(Protocol, &str)], pod: &Pod) -> Vec<PortClause> {
    named.iter().filter_map(|(protocol, name)| pod.ports.iter().find(|c| c.name == *name && c.protocol == *protocol)).map(|c| (c.protocol, Some((c.port, c.port)))).collect()
}

/// The peers of a rule: identities of the pods and prefixes it names, or any peer.
enum Peers<'a> {
    Any,
    Some { identities: BTreeSet<u32>, pods: Vec<&'a Member<'a>> },
}

impl Compiled {
    /// The identity of an address: the longest prefix that contains it, else the world.
    pub fn identity_of(&self, ip: IpAddr) -> u32 {
        self.ipcache.iter().filter(|(p, _)| p.contains(ip)).max_by_key(|(p, _)| p.len).map_or(IDENTITY_WORLD, |(_, id)| *id)
    }

    /// Whether local pod `endpoint` may have traffic in `direction` with a peer of identity
    /// `peer` on `protocol` and `port` (the destination port), and by which policy.
    pub fn allows(&self, endpoint: IpAddr, direction: Direction, peer: u32, protocol: Protocol, port: u16) -> Verdict {
        let Some(ep) = self.endpoints.get(&endpoint) else { return Verdict::Allowed(None) };
        let isolated = match direction {
            Direction::Ingress => ep.ingress_isolated,
            Direction::Egress => ep.egress_isolated,
        };
        if !isolated || peer == IDENTITY_HOST {
            return Verdict::Allowed(None);
        }
        let lo = Rule { endpoint, direction, peer: 0, protocol: None, ports: None, policy: 0 };
        let hit = self
            .rules
            .range(lo..)
            .take_while(|r| r.endpoint == endpoint && r.direction == direction)
            .find(|r| (r.peer == IDENTITY_ANY || r.peer == peer) && r.protocol.is_none_or(|p| p == protocol) && r.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port)));
        match hit {
            Some(r) => Verdict::Allowed(Some(r.policy)),
            None => Verdict::Denied { endpoint, direction },
        }
    }

    /// A new connection from `src` to `dst:port`: the source pod's egress, then the
    /// destination pod's ingress (each only when that pod is on this node).
    pub fn verdict(&self, src: IpAddr, dst: IpAddr, protocol: Protocol, port: u16) -> Verdict {
        let egress = self.allows(src, Direction::Egress, self.identity_of(dst), protocol, port);
        if let Verdict::Denied { .. } = egress {
            return egress;
        }
        match self.allows(dst, Direction::Ingress, self.identity_of(src), protocol, port) {
            Verdict::Allowed(None) => egress,
            other => other,
        }
    }
}

/// Compiles the policies for `input.node`'s pods, keeping identities in `ids` stable.
pub fn compile(input: &Input, ids: &mut Identities) -> Compiled {
    let mut out = Compiled::default();
    let no_labels = Labels::new();
    let ns_labels = |name: &str| -> Labels {
        let mut labels = input.namespaces.iter().find(|n| n.name == name).map_or_else(|| no_labels.clone(), |n| n.labels.clone());
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        labels
    };
    let ns_label_sets: BTreeMap<&str, Labels> = input.pods.iter().map(|p| (p.namespace.as_str(), ns_labels(&p.namespace))).collect();
    // A pod's identity: its labels with its namespace's, the namespace's under a prefix.
    let label_set = |pod: &Pod| -> Labels {
        let mut set: Labels = pod.labels.clone();
        set.extend(ns_label_sets[pod.namespace.as_str()].iter().map(|(k, v)| (format!("ns:{k}"), v.clone())));
        set
    };
    // Every prefix an ipBlock names (its CIDR and its exceptions) gets an identity.
    let mut prefixes: BTreeSet<Prefix> = BTreeSet::new();
    for policy in input.policies {
        let spec = &policy.spec;
        let peers = spec.ingress.iter().flatten().flat_map(|r| r.from.iter().flatten()).chain(spec.egress.iter().flatten().flat_map(|r| r.to.iter().flatten()));
        for block in peers.filter_map(|p| p.ip_block.as_ref()) {
            for text in std::iter::once(&block.cidr).chain(block.except.iter().flatten()) {
                match Prefix::parse(text) {
                    Ok(p) => {
                        prefixes.insert(p);
                    }
                    Err(e) => out.problems.push(format!("NetworkPolicy {}/{}: ipBlock: {e}", policy.namespace, policy.name)),
                }
            }
        }
    }
    // An address's identity is its pod's label set plus the named prefixes that hold the
    // address: an ipBlock then matches exactly the pod addresses inside it (a pod's IPv6
    // address is in no IPv4 block; of two pods with one label set, only the one inside).
    let mut label_sets: BTreeSet<Labels> = BTreeSet::new();
    let mut address_identity = |pod: &Pod, ip: IpAddr| -> u32 {
        let mut set = label_set(pod);
        set.extend(prefixes.iter().filter(|p| p.contains(ip)).map(|p| (format!("cidr:{p}"), String::new())));
        let id = ids.of_labels(&set);
        label_sets.insert(set);
        id
    };
    let members: Vec<Member> = input
        .pods
        .iter()
        .filter(|p| !p.host_network && !p.ips.is_empty())
        .map(|pod| Member { pod, ns_labels: &ns_label_sets[pod.namespace.as_str()], ids: pod.ips.iter().map(|ip| (*ip, address_identity(pod, *ip))).collect() })
        .collect();
    for p in &prefixes {
        out.ipcache.insert(*p, ids.of_prefix(*p));
    }
    for m in &members {
        for (ip, id) in &m.ids {
            out.ipcache.insert(Prefix::host(*ip), *id);
            if m.pod.node == input.node {
                out.endpoints.insert(*ip, EndpointPolicy { pod: format!("{}/{}", m.pod.namespace, m.pod.name), identity: *id, ..Default::default() });
            }
        }
    }
    for ip in input.node_ips {
        out.ipcache.insert(Prefix::host(*ip), IDENTITY_HOST);
    }
    ids.keep_only(&label_sets, &prefixes);

    let everyone = LabelSelector::default();
    for policy in input.policies {
        let name = format!("{}/{}", policy.namespace, policy.name);
        let index = out.policies.len() as u32;
        out.policies.push(name.clone());
        let spec = &policy.spec;
        let pod_selector = spec.pod_selector.as_ref().unwrap_or(&everyone);
        if let Err(e) = selector::validate(pod_selector) {
            out.problems.push(format!("NetworkPolicy {name}: podSelector: {e}; it selects no pod"));
            continue;
        }
        let types: Vec<Direction> = match &spec.policy_types {
            Some(types) => types.iter().filter_map(|t| match t.as_str() {
                "Ingress" => Some(Direction::Ingress),
                "Egress" => Some(Direction::Egress),
                _ => None,
            }).collect(),
            None => {
                let mut t = vec![Direction::Ingress];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push(Direction::Egress);
                }
                t
            }
        };
        let selected: Vec<&Member> = members.iter().filter(|m| m.pod.node == input.node && m.pod.namespace == policy.namespace && selector::matches(pod_selector, &m.pod.labels)).collect();
        for direction in types {
            for m in &selected {
                for ip in &m.pod.ips {
                    let ep = out.endpoints.get_mut(ip).expect("local pods are endpoints");
                    match direction {
                        Direction::Ingress => ep.ingress_isolated = true,
                        Direction::Egress => ep.egress_isolated = true,
                    }
                }
            }
            let rules: Vec<(&[NetworkPolicyPeer], &[NetworkPolicyPort])> = match direction {
                Direction::Ingress => spec.ingress.iter().flatten().map(|r| (r.from.as_deref().unwrap_or_default(), r.ports.as_deref().unwrap_or_default())).collect(),
                Direction::Egress => spec.egress.iter().flatten().map(|r| (r.to.as_deref().unwrap_or_default(), r.ports.as_deref().unwrap_or_default())).collect(),
            };
            for (peers, ports) in rules {
                let Some(peers) = peer_set(peers, &policy.namespace, &members, &prefixes, ids, &name, &mut out.problems) else { continue };
                let (numeric, named) = port_clauses(ports, &mut out.problems, &name);
                let all_ports = ports.is_empty();
                for m in &selected {
                    let mut add = |peer: u32, clauses: &[PortClause], all_ports: bool| {
                        for ip in &m.pod.ips {
                            if all_ports {
                                out.rules.insert(Rule { endpoint: *ip, direction, peer, protocol: None, ports: None, policy: index });
                            }
                            for (protocol, ports) in clauses {
                                out.rules.insert(Rule { endpoint: *ip, direction, peer, protocol: Some(*protocol), ports: *ports, policy: index });
                            }
                        }
                    };
                    let (identities, peer_pods): (Vec<u32>, Vec<&Member>) = match &peers {
                        Peers::Any => (vec![IDENTITY_ANY], members.iter().collect()),
                        Peers::Some { identities, pods } => (identities.iter().copied().collect(), pods.clone()),
                    };
                    match direction {
                        // Ingress: named ports are the selected pod's own.
                        Direction::Ingress => {
                            let mut clauses = numeric.clone();
                            clauses.extend(resolve_named(&named, m.pod));
                            for id in &identities {
                                add(*id, &clauses, all_ports);
                            }
                        }
                        // Egress: a named port is each peer pod's.
                        Direction::Egress => {
                            for id in &identities {
                                add(*id, &numeric, all_ports);
                            }
                            for peer in peer_pods {
                                let clauses = resolve_named(&named, peer.pod);
                                if !clauses.is_empty() {
                                    for id in peer.identities() {
                                        add(id, &clauses, false);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The identities a rule's peers name; `None` when a peer is invalid (the rule allows nothing).
fn peer_set<'a>(peers: &[NetworkPolicyPeer], namespace: &str, members: &'a [Member<'a>], prefixes: &BTreeSet<Prefix>, ids: &mut Identities, policy: &str, problems: &mut Vec<String>) -> Option<Peers<'a>> {
    if peers.is_empty() {
        return Some(Peers::Any);
    }
    let mut identities = BTreeSet::new();
    let mut pods = Vec::new();
    for peer in peers {
        if let Some(block) = &peer.ip_block {
            let Ok(cidr) = Prefix::parse(&block.cidr) else { continue };
            let except: Vec<Prefix> = block.except.iter().flatten().filter_map(|e| Prefix::parse(e).ok()).collect();
            let inside = |p: &Prefix| cidr.covers(p) && !except.iter().any(|e| e.covers(p));
            // Every named prefix inside the CIDR and outside each exception: with the
            // longest prefix winning, an address in an exception has that exception's identity.
            for p in prefixes.iter().filter(|p| inside(p)) {
                identities.insert(ids.of_prefix(*p));
            }
            // Pods' addresses are /32 (or /128) entries of their own identity: a pod address
            // inside the block is a peer too, as the upstream tests expect (that address only).
            for m in members {
                let inside_ids: Vec<u32> = m.ids.iter().filter(|(ip, _)| inside(&Prefix::host(*ip))).map(|(_, id)| *id).collect();
                if !inside_ids.is_empty() {
                    identities.extend(inside_ids);
                    pods.push(m);
                }
            }
            continue;
        }
        let (pod_sel, ns_sel) = (peer.pod_selector.as_ref(), peer.namespace_selector.as_ref());
        for sel in [pod_sel, ns_sel].into_iter().flatten() {
            if let Err(e) = selector::validate(sel) {
                problems.push(format!("NetworkPolicy {policy}: peer selector: {e}; the rule allows nothing"));
                return None;
            }
        }
        let selected = members.iter().filter(|m| match (pod_sel, ns_sel) {
            (Some(p), None) => m.pod.namespace == namespace && selector::matches(p, &m.pod.labels),
            (None, Some(n)) => selector::matches(n, m.ns_labels),
            (Some(p), Some(n)) => selector::matches(n, m.ns_labels) && selector::matches(p, &m.pod.labels),
            (None, None) => false,
        });
        for m in selected {
            identities.extend(m.identities());
            pods.push(m);
        }
    }
    Some(Peers::Some { identities, pods })
}

/// A port range as the prefixes an LPM key holds: (first port, bits fixed of 16).
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays within `hi`.
        let mut size = if lo == 0 { 1 << 16 } else { 1 << lo.trailing_zeros().min(16) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests;
