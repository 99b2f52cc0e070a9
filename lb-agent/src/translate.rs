//! Kubernetes Services, EndpointSlices and Nodes to frontends, with Kubernetes semantics.
//! Both sources (manifests on disk, the API server) feed this same translation.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use crate::source::model::{
    Endpoint, EndpointSlice, Node, Pod, Service, ServicePort, ServiceSpec, Text, SERVICE_PROXY_NAME_LABEL, SOCKET_LB_ANNOTATION, SOURCE_RANGES_ANNOTATION, TOPOLOGY_ANNOTATIONS,
};
use lb_common::*;

use crate::dataplane::{BackendSpec, Backends, Frontend, FrontendKey};

/// A problem with one object, naming where it came from, the object and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// The manifest file, or `api` for objects from the API server.
    pub origin: String,
    /// `Service default/web`.
    pub object: String,
    /// `spec.ports[0].port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}: {}", self.origin, self.object, self.field, self.message)
    }
}

impl std::error::Error for ObjectError {}

/// An object and where it was read from.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub origin: Origin,
    pub object: T,
}

/// Everything the translation reads.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: Vec<Sourced<Service>>,
    pub slices: Vec<Sourced<EndpointSlice>>,
    pub nodes: Vec<Sourced<Node>>,
    /// Pods: this node's for the socket hooks' opt-outs, every pod for NetworkPolicy.
    pub pods: Vec<Sourced<Pod>>,
    /// Address pools for LoadBalancer Services.
    pub pools: Vec<Sourced<crate::source::model::IpPool>>,
    pub namespaces: Vec<Sourced<crate::source::model::Namespace>>,
    pub policies: Vec<Sourced<crate::source::model::NetworkPolicy>>,
}


/// UIDs of this node's host-network pods that opted out of socket-level balancing.
pub fn socket_lb_opt_outs<'a>(pods: impl Iterator<Item = &'a Pod>, node_name: &str) -> Vec<String> {
    let opted_out = |pod: &Pod| {
        let spec = pod.spec.as_ref();
        spec.and_then(|s| s.node_name.as_deref()) == Some(node_name)
            && spec.and_then(|s| s.host_network) == Some(true)
            && pod.metadata.annotations.get(SOCKET_LB_ANNOTATION) == Some("disabled")
    };
    pods.filter(|p| opted_out(p)).filter_map(|p| p.uid.as_deref().map(String::from)).collect()
}

/// sessionAffinityConfig.clientIP.timeoutSeconds when unset, and its largest value.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// `namespace/name` of a Service, shared by every index that names it.
pub type ServiceName = Arc<str>;

/// Where objects were read from: a manifest file, or `api`. Shared by all of its objects.
pub type Origin = Arc<str>;

/// A frontend and the field of its Service that asked for it (named in conflict errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Shared by the Service's claims, the frontends granted and the programmed dataplane.
    pub frontend: Arc<Frontend>,
    pub field: Text,
}

/// A Service's claims, shared by what it asks for and what it was granted (most often all of
/// them: then one list serves both).
pub type SharedClaims = Arc<[Claim]>;

/// One proxied Service: its frontends, or why it was rejected.
#[derive(Debug)]
pub struct ServiceFrontends {
    pub name: ServiceName,
    pub origin: Origin,
    pub result: Result<Vec<Claim>, ObjectError>,
}

/// kube-proxy's health check for an `externalTrafficPolicy: Local` LoadBalancer: cloud load
/// balancers send traffic only to nodes whose `healthCheckNodePort` answers 200.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// What the objects ask of this node.
#[derive(Debug, Default)]
pub struct Translation {
    /// Every proxied Service in claim order: the oldest first (creation time, then name), so
    /// that when two claim one frontend the one that had it first keeps it.
    pub services: Vec<ServiceFrontends>,
    /// Fields this proxy does not implement; the rest of each Service works.
    pub warnings: Vec<ObjectError>,
    pub health_checks: Vec<HealthCheck>,
}

/// Whether this proxy programs the Service at all (headless, ExternalName and Services of
/// another proxy are left alone, as kube-proxy does).
pub fn is_proxied(svc: &Service) -> bool {
    if svc.metadata.labels.get(SERVICE_PROXY_NAME_LABEL).is_some() {
        return false;
    }
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    spec.cluster_ip.as_deref() != Some("None")
}

/// One Service translated on its own.
#[derive(Debug)]
pub struct ServiceTranslation {
    pub name: ServiceName,
    pub origin: Origin,
    /// Its creation time (Unix seconds): with its name, its place in the claim order (the
    /// older Service first).
    pub created: Option<i64>,
    pub result: Result<Vec<Claim>, ObjectError>,
    /// Fields this proxy does not implement; the rest of the Service works.
    pub warnings: Vec<ObjectError>,
    pub health_check: Option<HealthCheck>,
}

/// Translates one Service (`name` is its `namespace/name`) with its EndpointSlices; `None`
/// when this proxy leaves it alone. `assigned`: the LoadBalancer addresses address pools gave
/// it, in place of its `status.loadBalancer.ingress` (`None`: no pool serves it).
pub fn translate_service(svc: &Service, name: &ServiceName, origin: &Origin, slices: &[&EndpointSlice], node_name: &str, assigned: Option<&[IpAddr]>) -> Option<ServiceTranslation> {
    if !is_proxied(svc) {
        return None;
    }
    let error = |(field, message): FieldError| ObjectError { origin: origin.to_string(), object: format!("Service {name}"), field, message };
    let mut warnings = Vec::new();
    let mut health_checks = Vec::new();
    let mut warn = |field: String, message: String| warnings.push(error((field, message)));
    let result = service_frontends(svc, name, slices, assigned, node_name, &mut warn, &mut health_checks).map_err(error);
    Some(ServiceTranslation { name: name.clone(), origin: origin.clone(), created: svc.metadata.created, result, warnings, health_check: health_checks.pop() })
}

/// Translates every Service of a snapshot (tests and tools; the agent translates only the
/// Services that changed, through [`translate_service`]).
pub fn translate(state: &ClusterState, node_name: &str) -> Translation {
    let mut out = Translation::default();
    // EndpointSlices by the Service they belong to: several slices of one Service are merged.
    let mut slices: HashMap<ServiceName, Vec<&EndpointSlice>> = HashMap::new();
    for s in &state.slices {
        if let Some(owner) = crate::source::objects::owner_of(&s.object) {
            slices.entry(owner).or_default().push(&s.object);
        }
    }
    let mut translated: Vec<ServiceTranslation> = state
        .services
        .iter()
        .filter_map(|s| {
            let name = crate::source::objects::name_of(&s.object);
            translate_service(&s.object, &name, &s.origin, slices.get(&name).map(Vec::as_slice).unwrap_or(&[]), node_name, None)
        })
        .collect();
    translated.sort_by(|a, b| claim_order(a.created, &a.name).cmp(&claim_order(b.created, &b.name)));
    for t in translated {
        out.warnings.extend(t.warnings);
        out.health_checks.extend(t.health_check);
        out.services.push(ServiceFrontends { name: t.name, origin: t.origin, result: t.result });
    }
    out
}

/// Frontends each Service gets once claims on one address, port and protocol are settled.
#[derive(Debug, Default)]
pub struct Claimed {
    pub frontends: BTreeMap<ServiceName, Vec<Claim>>,
    /// Frontends a Service asked for that another Service already has.
    pub errors: Vec<ObjectError>,
}

/// Settles frontends that several Services ask for, all at once (see [`Claims`]): `services`
/// in claim order, `owners` who held what before.
pub fn claim(services: Vec<(ServiceName, Origin, Vec<Claim>)>, owners: &HashMap<FrontendKey, ServiceName>) -> Claimed {
    let mut claims = Claims::holding(owners.clone());
    for (i, (name, origin, list)) in services.iter().enumerate() {
        claims.want(name.clone(), Some(i as i64), origin.clone(), list.as_slice().into());
    }
    let affected = services.iter().map(|(n, _, _)| n.clone()).collect();
    let settled = claims.settle(affected, true);
    Claimed { frontends: settled.changes.into_iter().map(|(name, _, granted)| (name, granted.to_vec())).collect(), errors: settled.errors }
}

/// Where a Service stands when two claim one frontend: the older first (creation time in Unix
/// seconds; none sorts first), then by `namespace/name`.
fn claim_order(created: Option<i64>, name: &ServiceName) -> (Option<i64>, &ServiceName) {
    (created, name)
}

/// What one Service asks for: its claims, where it came from, and its creation time.
#[derive(Clone, Debug)]
struct Wanted {
    created: Option<i64>,
    origin: Origin,
    claims: SharedClaims,
}

/// One Service's claims: what it asks for, and what it was granted.
#[derive(Debug, Default)]
struct ServiceClaims {
    /// `None` once it asks for nothing: what it was granted goes at the next settling.
    wanted: Option<Wanted>,
    granted: SharedClaims,
}

/// What one settling changed: (Service, frontends it had, frontends it has now) for every
/// Service looked at, and the claims refused.
#[derive(Debug, Default)]
pub struct Settled {
    pub changes: Vec<(ServiceName, SharedClaims, SharedClaims)>,
    pub errors: Vec<ObjectError>,
}

/// Who holds each frontend, kept from one sync to the next so that only the Services that
/// changed are settled again. The Service that holds a frontend keeps it; a free one goes to
/// the first in claim order; a refused Service waits, and is settled again when the frontend
/// is let go.
#[derive(Debug, Default)]
pub struct Claims {
    holders: HashMap<FrontendKey, ServiceName>,
    waiting: HashMap<FrontendKey, BTreeSet<ServiceName>>,
    services: HashMap<ServiceName, ServiceClaims>,
}

impl Claims {
    /// Starts from who held what (read back from the pinned maps after a restart).
    pub fn holding(holders: HashMap<FrontendKey, ServiceName>) -> Self {
        Self { holders, ..Self::default() }
    }

    /// What Service `name` asks for, from the next settling on (`created`: its creation time
    /// in Unix seconds; with its name, its place in the claim order, the older first).
    pub fn want(&mut self, name: ServiceName, created: Option<i64>, origin: Origin, claims: SharedClaims) {
        self.services.entry(name).or_default().wanted = Some(Wanted { created, origin, claims });
    }

    /// Service `name` asks for nothing any more (it is gone, or not proxied).
    pub fn unwant(&mut self, name: &str) {
        if let Some(service) = self.services.get_mut(name) {
            service.wanted = None;
        }
    }

    /// The Services that ask for frontends.
    pub fn wanting(&self) -> impl Iterator<Item = &ServiceName> {
        self.services.iter().filter(|(_, s)| s.wanted.is_some()).map(|(name, _)| name)
    }

    /// The frontends a Service holds now.
    pub fn granted(&self, name: &str) -> &[Claim] {
        self.services.get(name).map(|s| &*s.granted).unwrap_or(&[])
    }

    /// Every frontend granted.
    pub fn all_granted(&self) -> impl Iterator<Item = &Claim> {
        self.services.values().flat_map(|s| s.granted.iter())
    }

    fn wanted(&self, name: &str) -> Option<Wanted> {
        self.services.get(name).and_then(|s| s.wanted.clone())
    }

    /// Settles the Services in `affected` again, and those waiting for a frontend one of them
    /// lets go. With `everything`, holders that no Service asks for any more are let go as
    /// well (a restart).
    pub fn settle(&mut self, mut affected: BTreeSet<ServiceName>, everything: bool) -> Settled {
        if everything {
            affected.extend(self.holders.values().cloned());
        }
        let keys_of = |w: &Option<Wanted>| -> HashSet<FrontendKey> { w.iter().flat_map(|w| w.claims.iter().map(|c| frontend_of(&c.frontend.key))).collect() };
        // What each affected Service holds: all holders on a restart, else what it was granted.
        let mut held: HashMap<ServiceName, Vec<FrontendKey>> = HashMap::new();
        if everything {
            for (key, holder) in &self.holders {
                held.entry(holder.clone()).or_default().push(*key);
            }
        } else {
            for name in &affected {
                held.insert(name.clone(), self.granted(name).iter().map(|c| frontend_of(&c.frontend.key)).collect());
            }
        }
        // Let go of what affected Services no longer ask for; whoever waited for it is settled too.
        let mut woken = BTreeSet::new();
        for name in &affected {
            let keep = keys_of(&self.wanted(name));
            for key in held.remove(name).into_iter().flatten().filter(|k| !keep.contains(k)) {
                if self.holders.get(&key) == Some(name) {
                    self.holders.remove(&key);
                    woken.extend(self.waiting.remove(&key).into_iter().flatten());
                }
            }
        }
        affected.extend(woken);
        for waiters in self.waiting.values_mut() {
            waiters.retain(|w| !affected.contains(w));
        }
        self.waiting.retain(|_, w| !w.is_empty());
        // Free frontends go to the first in claim order; held ones stay where they are.
        let mut order: Vec<(ServiceName, Wanted)> = affected.iter().filter_map(|n| self.wanted(n).map(|w| (n.clone(), w))).collect();
        order.sort_by(|(a, aw), (b, bw)| claim_order(aw.created, a).cmp(&claim_order(bw.created, b)));
        for (name, w) in &order {
            for c in w.claims.iter() {
                self.holders.entry(frontend_of(&c.frontend.key)).or_insert_with(|| name.clone());
            }
        }
        let mut out = Settled::default();
        for (name, w) in &order {
            let mut kept = Vec::new();
            for c in w.claims.iter() {
                let key = frontend_of(&c.frontend.key);
                let owner = &self.holders[&key];
                if owner == name {
                    kept.push(c.clone());
                } else if c.frontend.key.scope == SCOPE_CLUSTER {
                    let frontend = c.frontend.name.split_once(':').map_or("", |(_, p)| p);
                    let message = format!("{} {frontend} is already used by Service {owner}; this frontend is not programmed", addr_port(&c.frontend.key));
                    out.errors.push(ObjectError { origin: w.origin.to_string(), object: format!("Service {name}"), field: c.field.to_string(), message });
                    self.waiting.entry(key).or_default().insert(name.clone());
                }
            }
            let kept: SharedClaims = if kept.len() == w.claims.len() { w.claims.clone() } else { kept.into() };
            let service = self.services.get_mut(name).expect("it asks for frontends");
            let before = std::mem::replace(&mut service.granted, kept.clone());
            out.changes.push((name.clone(), before, kept));
        }
        for name in &affected {
            if self.services.get(name).is_some_and(|s| s.wanted.is_none()) {
                let gone = self.services.remove(name).expect("just found");
                out.changes.push((name.clone(), gone.granted, SharedClaims::default()));
            }
        }
        out
    }
}

/// Both scopes of a frontend are one claim: the key claims are settled by.
pub fn frontend_of(key: &FrontendKey) -> FrontendKey {
    FrontendKey { scope: SCOPE_CLUSTER, ..*key }
}

/// `10.0.0.1:80`, `[fd00::1]:80`, or `<every node address>:30080` for a NodePort.
fn addr_port(key: &FrontendKey) -> String {
    let port = port_host(key.port);
    match key.addr {
        _ if key.is_node_port() => format!("<every node {} address>:{port}", if key.addr.is_ipv4() { "IPv4" } else { "IPv6" }),
        addr => std::net::SocketAddr::new(addr, port).to_string(),
    }
}

type FieldError = (String, String);

/// Service-wide settings that shape each of its frontends.
struct Policy {
    affinity_timeout_s: Option<u32>,
    ext_local: bool,
    int_local: bool,
    /// `None`: no ranges given, every client is let in.
    source_ranges: Option<Vec<(IpAddr, u8)>>,
}

fn policy(svc: &Service, spec: &ServiceSpec, warn: &mut impl FnMut(String, String)) -> Result<Policy, FieldError> {
    let affinity_timeout_s = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
            let timeout = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t as u32),
                Some(t) => return Err((field.into(), format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"))),
            }
        }
        other => return Err(("spec.sessionAffinity".into(), format!("unknown value {other:?} (None or ClientIP)"))),
    };
    let traffic_policy = |field: &str, value: Option<&str>| match value.unwrap_or("Cluster") {
        "Cluster" => Ok(false),
        "Local" => Ok(true),
        other => Err((field.to_string(), format!("unknown value {other:?} (Cluster or Local)"))),
    };
    let ext_local = traffic_policy("spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref())?;
    let int_local = traffic_policy("spec.internalTrafficPolicy", spec.internal_traffic_policy.as_deref())?;
    let annotation = svc.metadata.annotations.get(SOURCE_RANGES_ANNOTATION);
    let (field, ranges): (&str, Vec<&str>) = match (&spec.load_balancer_source_ranges, annotation) {
        (Some(r), _) if !r.is_empty() => ("spec.loadBalancerSourceRanges", r.iter().map(|r| r.as_str()).collect()),
        (_, Some(a)) => (SOURCE_RANGES_ANNOTATION, a.split(',').map(str::trim).filter(|r| !r.is_empty()).collect()),
        _ => ("", Vec::new()),
    };
    let mut parsed = Vec::new();
    for (i, cidr) in ranges.iter().enumerate() {
        parsed.push(parse_cidr(cidr).map_err(|m| (format!("{field}[{i}]"), m))?);
    }
    // Ranges of one family only restrict the other too: to none of its clients (the Service
    // was meant to be closed, not opened to one family).
    for family in [Family::V4, Family::V6] {
        if !parsed.is_empty() && families_served(spec).contains(&family) && !parsed.iter().any(|(net, _)| Family::of(net) == family) {
            warn(field.to_string(), format!("no {family} range: every {family} client of the LoadBalancer IPs is refused"));
        }
    }
    let source_ranges = (!ranges.is_empty()).then_some(parsed);
    Ok(Policy { affinity_timeout_s, ext_local, int_local, source_ranges })
}

fn service_frontends(
    svc: &Service,
    name: &str,
    slices: &[&EndpointSlice],
    assigned: Option<&[IpAddr]>,
    node_name: &str,
    warn: &mut impl FnMut(String, String),
    health_checks: &mut Vec<HealthCheck>,
) -> Result<Vec<Claim>, FieldError> {
    if svc.metadata.id.name().is_empty() {
        return Err(("metadata.name".into(), "is missing".into()));
    }
    let spec = svc.spec.as_ref().ok_or(("spec".to_string(), "is missing".to_string()))?;
    let ports = spec.ports.as_deref().unwrap_or(&[]);
    if ports.is_empty() {
        return Err(("spec.ports".into(), "a Service needs at least one port".into()));
    }
    let kind_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(kind_type, "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(("spec.type".into(), format!("unknown type {kind_type:?}")));
    }
    let policy = policy(svc, spec, warn)?;
    report_unsupported(svc, spec, warn);

    // Addresses: cluster IPs, external IPs, load-balancer ingress IPs, each with its field.
    // The Service is served in the families of its cluster IPs (as kube-proxy: an external or
    // load-balancer IP of another family is not programmed); anything that does not parse is
    // an error.
    let families = families_served(spec);
    let mut addresses: Vec<(IpAddr, u8, String)> = Vec::new();
    let mut add_address = |ip: &str, kind: u8, field: String, warn: &mut dyn FnMut(String, String)| -> Result<(), FieldError> {
        let addr = parse_ip(ip, &field)?;
        if families.contains(&Family::of(&addr)) {
            addresses.push((addr, kind, field));
        } else {
            warn(field, format!("{addr} is {} but the Service has no {} cluster IP: it is not programmed", Family::of(&addr), Family::of(&addr)));
        }
        Ok(())
    };
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    let all: &[Text] = if listed.is_empty() { spec.cluster_ip.as_slice() } else { listed };
    for (i, ip) in all.iter().enumerate() {
        let field = if spec.cluster_ips.is_some() { format!("spec.clusterIPs[{i}]") } else { "spec.clusterIP".into() };
        add_address(ip, KIND_CLUSTER_IP, field, warn)?;
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        add_address(ip, KIND_EXTERNAL_IP, format!("spec.externalIPs[{i}]"), warn)?;
    }
    if let (Some(assigned), "LoadBalancer") = (assigned, kind_type) {
        for (i, ip) in assigned.iter().enumerate() {
            add_address(&ip.to_string(), KIND_LOAD_BALANCER, format!("address {i} from a {}", crate::source::model::POOL_KIND), warn)?;
        }
    } else if kind_type == "LoadBalancer" {
        for (i, ing) in svc.ingress().iter().enumerate() {
            let Some(ip) = &ing.ip else { continue };
            let field = format!("status.loadBalancer.ingress[{i}].ip");
            if ing.ip_mode.as_deref() == Some("Proxy") {
                // As kube-proxy: the load balancer proxies, so this node must not answer for it.
                warn(format!("status.loadBalancer.ingress[{i}].ipMode"), format!("Proxy is not supported: {ip} is not programmed, traffic to it goes through the load balancer"));
                continue;
            }
            add_address(ip, KIND_LOAD_BALANCER, field, warn)?;
        }
    }

    let mut claims = Vec::new();
    let mut local_ready = std::collections::BTreeSet::new();
    for (i, port) in ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => IPPROTO_TCP,
            "UDP" => IPPROTO_UDP,
            "SCTP" => {
                warn(field("protocol"), "SCTP is not supported by this datapath: this port is not programmed".into());
                continue;
            }
            other => return Err((field("protocol"), format!("unknown protocol {other:?} (TCP, UDP or SCTP)"))),
        };
        let svc_port = valid_port(port.port, &field("port"))?;
        let endpoints = endpoints_for(port, slices, node_name)?;
        local_ready.extend(endpoints.ready.iter().filter(|b| b.local).map(|b| b.addr));
        // Each family's frontends balance to that family's endpoints.
        let (v4, v6) = (endpoints.of_family(Family::V4), endpoints.of_family(Family::V6));
        let port_label = port.name.as_deref().filter(|n| !n.is_empty()).map_or_else(|| svc_port.to_string(), String::from);
        let proto_name = if proto == IPPROTO_TCP { "TCP" } else { "UDP" };
        let display: Arc<str> = format!("{name}:{port_label}/{proto_name}").into();
        // Each view of the endpoints once per family, shared by the frontends that see it.
        let views = |endpoints: &Endpoints| {
            let every_node = endpoints.split(false);
            let this_node = if policy.int_local || policy.ext_local { endpoints.split(true) } else { every_node.clone() }; // only read under a Local policy
            (every_node, this_node)
        };
        let (views4, views6) = (views(&v4), views(&v6));
        let mut add = |addr: IpAddr, port: u16, kind: u8, field: String| {
            let (every_node, this_node) = if addr.is_ipv4() { &views4 } else { &views6 };
            let key = FrontendKey { addr, port: port_raw(port), proto, scope: SCOPE_CLUSTER };
            let external = kind != KIND_CLUSTER_IP;
            // internalTrafficPolicy: Local keeps pods' ClusterIP traffic on this node.
            let (backends, draining) = if !external && policy.int_local { this_node.clone() } else { every_node.clone() };
            let field = Text::from(field);
            let frontend = Frontend {
                key,
                kind,
                name: display.clone(),
                backends,
                draining,
                ext_local: external && policy.ext_local,
                affinity_timeout_s: policy.affinity_timeout_s,
                source_ranges: if kind == KIND_LOAD_BALANCER { policy.source_ranges.clone() } else { None },
            };
            if frontend.ext_local {
                // What outside clients get: this node's endpoints only.
                let (backends, draining) = this_node.clone();
                let name = format!("{display}{}", crate::dataplane::LOCAL_VIEW_SUFFIX).into();
                let local = Frontend { key: FrontendKey { scope: SCOPE_LOCAL, ..key }, name, backends, draining, ext_local: false, ..frontend.clone() };
                claims.push(Claim { frontend: Arc::new(local), field: field.clone() });
            }
            claims.push(Claim { frontend: Arc::new(frontend), field });
        };
        for (ip, kind, f) in &addresses {
            add(*ip, svc_port, *kind, f.clone());
        }
        if kind_type != "ClusterIP" {
            if let Some(node_port) = port.node_port {
                // The unspecified address: the datapath matches it on every address of this
                // node of its family.
                let node_port = valid_port(node_port, &field("nodePort"))?;
                for family in &families {
                    add(family.unspecified(), node_port, KIND_NODE_PORT, field("nodePort"));
                }
            }
        }
    }
    if kind_type == "LoadBalancer" && policy.ext_local {
        if let Some(port) = spec.health_check_node_port {
            let port = valid_port(port, "spec.healthCheckNodePort")?;
            let (namespace, name) = (svc.metadata.id.namespace().to_string(), svc.metadata.id.name().to_string());
            health_checks.push(HealthCheck { port, namespace, name, local_endpoints: local_ready.len() });
        }
    }
    Ok(claims)
}

/// Fields this proxy reads as unset, said once each so that nobody relies on them unknowingly.
fn report_unsupported(svc: &Service, spec: &ServiceSpec, warn: &mut impl FnMut(String, String)) {
    if let Some(distribution) = &spec.traffic_distribution {
        warn("spec.trafficDistribution".into(), format!("{distribution:?} is not supported: endpoints are chosen from every zone"));
    }
    for key in TOPOLOGY_ANNOTATIONS.iter().filter(|k| svc.metadata.annotations.get(k).is_some()) {
        warn(format!("metadata.annotations[{key}]"), "topology-aware routing is not supported: endpoints are chosen from every zone".into());
    }
}

/// A Service port's endpoints by condition (KEP-1669), each knowing whether it is on this node.
#[derive(Default)]
struct Endpoints {
    ready: Vec<BackendSpec>,
    /// Terminating but still serving: used when no endpoint is ready.
    serving_terminating: Vec<BackendSpec>,
    /// Neither: they take no new flows, and keep the ones they have while they are listed.
    other: Vec<BackendSpec>,
}

impl Endpoints {
    /// The endpoints of one address family.
    fn of_family(&self, family: Family) -> Self {
        let pick = |list: &[BackendSpec]| list.iter().filter(|b| Family::of(&b.addr) == family).copied().collect();
        Self { ready: pick(&self.ready), serving_terminating: pick(&self.serving_terminating), other: pick(&self.other) }
    }

    /// (new flows may go to, established flows only), from this node's endpoints or all.
    fn split(&self, local_only: bool) -> (Backends, Backends) {
        let pick = |list: &[BackendSpec]| list.iter().filter(|b| !local_only || b.local).copied().collect::<Vec<_>>();
        let ready = pick(&self.ready);
        let selectable = if ready.is_empty() { pick(&self.serving_terminating) } else { ready };
        let draining: Vec<BackendSpec> = self.ready.iter().chain(&self.serving_terminating).chain(&self.other).filter(|b| !selectable.contains(b)).copied().collect();
        (shared(selectable), shared(draining))
    }
}

/// A list of backends to share; an empty one is the one static empty list (no allocation).
fn shared(list: Vec<BackendSpec>) -> Backends {
    if list.is_empty() { Backends::default() } else { list.into() }
}

/// The endpoints of the slices for one Service port. The slice port with the Service port's
/// name carries the resolved target port (named targetPorts are resolved by the slice's owner).
fn endpoints_for(port: &ServicePort, slices: &[&EndpointSlice], node_name: &str) -> Result<Endpoints, FieldError> {
    let want_name = port.name.as_deref().unwrap_or("");
    let mut out = Endpoints::default();
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            // FQDN slices name no address to balance to.
            continue;
        }
        let slice_name = slice.metadata.id.name();
        let matching = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == want_name && p.protocol.as_deref().unwrap_or("TCP") == port.protocol.as_deref().unwrap_or("TCP")
        });
        let Some(target) = matching else { continue };
        let Some(target_port) = target.port else { continue };
        let target_port = valid_port(target_port, &format!("EndpointSlice {slice_name}: ports[name={want_name}].port"))?;
        for (j, ep) in slice.endpoints.iter().enumerate() {
            let list = match readiness(ep) {
                Readiness::Ready => &mut out.ready,
                Readiness::ServingTerminating => &mut out.serving_terminating,
                Readiness::Other => &mut out.other,
            };
            let local = ep.node_name.as_deref() == Some(node_name);
            let Some(addr) = &ep.address else { continue };
            // The field is named only in an error: 300k endpoints need no string each.
            let addr = match addr.parse::<IpAddr>() {
                Ok(addr) if Family::of(&addr).name() == &*slice.address_type => addr,
                _ => {
                    let field = format!("EndpointSlice {slice_name}: endpoints[{j}].addresses[0]");
                    return Err((field, format!("{addr:?} is not an {} address (addressType)", slice.address_type)));
                }
            };
            let spec = BackendSpec { addr, port: target_port, local, weight: 1 };
            if !list.contains(&spec) {
                list.push(spec);
            }
        }
    }
    for list in [&mut out.ready, &mut out.serving_terminating, &mut out.other] {
        list.sort();
    }
    Ok(out)
}

/// `address/n` of either family as (network, n), host bits cleared.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    ::policy::Prefix::parse(s).map(|p| (p.addr, p.len))
}

/// `a.b.c.d/n` as (network, n) with host bits cleared (IPv4 only: `--nodeport-addresses`).
pub fn parse_cidr4(s: &str) -> Result<(Ipv4Addr, u8), String> {
    match parse_cidr(s)? {
        (IpAddr::V4(net), len) => Ok((net, len)),
        _ => Err(format!("{s:?} is not an IPv4 CIDR")),
    }
}

/// The netmask of a prefix length (0-32), host order.
pub fn prefix_mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len.min(32)) }
}

/// An address family, as Kubernetes names it (`ipFamilies`, `addressType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        if addr.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }

    /// The address a NodePort frontend of this family has.
    fn unspecified(self) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Self::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The families a Service is served in: those of its cluster IPs, as kube-proxy (the API server
/// allocates them from `ipFamilies` and `ipFamilyPolicy`); IPv4 for a Service without any (a
/// NodePort-only manifest).
pub fn families_served(spec: &ServiceSpec) -> Vec<Family> {
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    let ips: &[Text] = if listed.is_empty() { spec.cluster_ip.as_slice() } else { listed };
    let mut families: Vec<Family> = ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()).map(|ip| Family::of(&ip)).collect();
    if families.is_empty() {
        families.push(Family::V4);
    }
    families.dedup();
    families
}

fn valid_port(port: i32, field: &str) -> Result<u16, FieldError> {
    if (1..=65535).contains(&port) {
        Ok(port as u16)
    } else {
        Err((field.to_string(), format!("port {port} is out of range 1-65535")))
    }
}

/// An address of either family; anything else is an error naming the field.
fn parse_ip(s: &str, field: &str) -> Result<IpAddr, FieldError> {
    s.parse().map_err(|_| (field.to_string(), format!("{s:?} is not an IP address")))
}

/// Where an endpoint's conditions place it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Ready,
    /// Terminating but still serving: used when no endpoint is ready.
    ServingTerminating,
    /// Neither: no new flows.
    Other,
}

/// Kubernetes: a missing `ready` means ready, a missing `serving` means as ready.
fn readiness(ep: &Endpoint) -> Readiness {
    let conditions = ep.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready) != Some(false);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating) == Some(true);
    if ready && !terminating {
        Readiness::Ready
    } else if serving && terminating {
        Readiness::ServingTerminating
    } else {
        Readiness::Other
    }
}

/// The nodes that have a ready endpoint of a Service (else a serving, terminating one, as the
/// datapath falls back to): where an `externalTrafficPolicy: Local` address may be announced.
pub fn nodes_with_ready_endpoints(slices: &[&EndpointSlice]) -> std::collections::BTreeSet<String> {
    let nodes = |want: Readiness| slices.iter().flat_map(|s| s.endpoints.iter()).filter(|e| readiness(e) == want).filter_map(|e| e.node_name.as_deref().map(String::from)).collect::<std::collections::BTreeSet<_>>();
    let ready = nodes(Readiness::Ready);
    if ready.is_empty() { nodes(Readiness::ServingTerminating) } else { ready }
}

/// The InternalIPs (else ExternalIPs) of the Node named `node_name`, of both families.
pub fn node_ips<'a>(mut nodes: impl Iterator<Item = &'a Node>, node_name: &str) -> Vec<IpAddr> {
    let Some(addrs) = nodes.find(|n| n.metadata.id.name() == node_name).and_then(|n| n.status.as_ref()?.addresses.as_ref()) else { return Vec::new() };
    let of_type = |t: &str| addrs.iter().filter(|a| a.type_ == t).filter_map(|a| a.address.parse::<IpAddr>().ok()).collect::<Vec<_>>();
    let internal = of_type("InternalIP");
    if internal.is_empty() { of_type("ExternalIP") } else { internal }
}
