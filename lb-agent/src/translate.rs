//! Kubernetes Services, EndpointSlices and Nodes to frontends, with Kubernetes semantics.
//! Both sources (manifests on disk, the API server) feed this same translation.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Node, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use lb_common::*;

use crate::dataplane::{BackendSpec, Frontend};

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
    pub origin: String,
    pub object: T,
}

/// Everything the translation reads.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: Vec<Sourced<Service>>,
    pub slices: Vec<Sourced<EndpointSlice>>,
    pub nodes: Vec<Sourced<Node>>,
}

/// Services carrying this label belong to another proxy (KEP-2447).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name` of a Service.
pub type ServiceName = String;

/// The frontends of each Service this node should program, and the Services that were
/// rejected (their previous frontends should be kept).
#[derive(Debug, Default)]
pub struct Translation {
    pub frontends: BTreeMap<ServiceName, Vec<Frontend>>,
    pub errors: Vec<(ServiceName, ObjectError)>,
}

/// Whether this proxy programs the Service at all (headless, ExternalName and Services of
/// another proxy are left alone, as kube-proxy does).
pub fn is_proxied(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return false;
    }
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    spec.cluster_ip.as_deref() != Some("None")
}

pub fn translate(state: &ClusterState, node_name: &str) -> Translation {
    let mut out = Translation::default();
    // EndpointSlices by the Service they belong to: several slices of one Service are merged.
    let mut slices: HashMap<ServiceName, Vec<&EndpointSlice>> = HashMap::new();
    for s in &state.slices {
        let ns = s.object.metadata.namespace.as_deref().unwrap_or("default");
        if let Some(svc) = s.object.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            slices.entry(format!("{ns}/{svc}")).or_default().push(&s.object);
        }
    }
    let mut claimed: HashMap<Service4KeyV1, ServiceName> = HashMap::new();
    let mut services: Vec<&Sourced<Service>> = state.services.iter().collect();
    services.sort_by_key(|s| (s.object.metadata.namespace.clone(), s.object.metadata.name.clone()));
    for s in services {
        if !is_proxied(&s.object) {
            continue;
        }
        let ns = s.object.metadata.namespace.as_deref().unwrap_or("default");
        let name = format!("{ns}/{}", s.object.metadata.name.as_deref().unwrap_or(""));
        let svc_slices = slices.get(&name).map(Vec::as_slice).unwrap_or(&[]);
        match service_frontends(&s.object, &name, svc_slices, node_name) {
            Ok(frontends) => {
                // Two Services may not claim one address and port: the first (by name) keeps
                // it, the other is rejected and keeps its last good version.
                let taken = frontends.iter().find_map(|f| claimed.get(&f.key).map(|owner: &String| (f, owner.clone())));
                if let Some((f, owner)) = taken {
                    let object = format!("Service {name}");
                    let message = format!("{} is already used by Service {owner}", f.name.split_once(':').map_or("", |(_, p)| p));
                    out.errors.push((name, ObjectError { origin: s.origin.clone(), object, field: "spec".into(), message }));
                    continue;
                }
                for f in &frontends {
                    claimed.insert(f.key, name.clone());
                }
                out.frontends.insert(name, frontends);
            }
            Err((field, message)) => {
                let object = format!("Service {name}");
                out.errors.push((name, ObjectError { origin: s.origin.clone(), object, field, message }));
            }
        }
    }
    out
}

type FieldError = (String, String);

fn service_frontends(svc: &Service, name: &str, slices: &[&EndpointSlice], node_name: &str) -> Result<Vec<Frontend>, FieldError> {
    if svc.metadata.name.as_deref().unwrap_or("").is_empty() {
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

    // Addresses: cluster IPs, external IPs, load-balancer ingress IPs. IPv6 ones are skipped
    // (this datapath is IPv4); anything else that does not parse is an error.
    let mut cluster_ips = Vec::new();
    let listed = spec.cluster_ips.clone().unwrap_or_default();
    let all: Vec<String> = if listed.is_empty() { spec.cluster_ip.iter().cloned().collect() } else { listed };
    for (i, ip) in all.iter().enumerate() {
        let field = if spec.cluster_ips.is_some() { format!("spec.clusterIPs[{i}]") } else { "spec.clusterIP".into() };
        if let Some(ip) = parse_ipv4(ip, &field)? {
            cluster_ips.push(ip);
        }
    }
    let mut external_ips = Vec::new();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if let Some(ip) = parse_ipv4(ip, &format!("spec.externalIPs[{i}]"))? {
            external_ips.push(ip);
        }
    }
    let mut lb_ips = Vec::new();
    if kind_type == "LoadBalancer" {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            if let Some(ip) = &ing.ip {
                if let Some(ip) = parse_ipv4(ip, &format!("status.loadBalancer.ingress[{i}].ip"))? {
                    lb_ips.push(ip);
                }
            }
        }
    }

    let mut frontends = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => IPPROTO_TCP,
            "UDP" => IPPROTO_UDP,
            "SCTP" => return Err((field("protocol"), "SCTP is not supported by this datapath".into())),
            other => return Err((field("protocol"), format!("unknown protocol {other:?} (TCP, UDP or SCTP)"))),
        };
        let svc_port = valid_port(port.port, &field("port"))?;
        let backends = backends_for(port, slices, node_name)?;
        let port_label = port.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| svc_port.to_string());
        let proto_name = if proto == IPPROTO_TCP { "TCP" } else { "UDP" };
        let mut add = |addr: Ipv4Addr, port: u16, kind: u8| {
            frontends.push(Frontend {
                key: Service4KeyV1 { addr: ip4_raw(addr.octets()), port: port_raw(port), proto, scope: SCOPE_CLUSTER },
                kind,
                name: format!("{name}:{port_label}/{proto_name}"),
                backends: backends.clone(),
            });
        };
        for ip in &cluster_ips {
            add(*ip, svc_port, KIND_CLUSTER_IP);
        }
        for ip in &external_ips {
            add(*ip, svc_port, KIND_EXTERNAL_IP);
        }
        for ip in &lb_ips {
            add(*ip, svc_port, KIND_LOAD_BALANCER);
        }
        if kind_type != "ClusterIP" {
            if let Some(node_port) = port.node_port {
                // Address 0: the datapath matches it on every address of this node.
                add(Ipv4Addr::UNSPECIFIED, valid_port(node_port, &field("nodePort"))?, KIND_NODE_PORT);
            }
        }
    }
    Ok(frontends)
}

/// Ready endpoints of the slices for one Service port. The slice port with the Service port's
/// name carries the resolved target port (named targetPorts are resolved by the slice's owner).
fn backends_for(port: &ServicePort, slices: &[&EndpointSlice], node_name: &str) -> Result<Vec<BackendSpec>, FieldError> {
    let want_name = port.name.as_deref().unwrap_or("");
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let slice_name = slice.metadata.name.as_deref().unwrap_or("?");
        let matching = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == want_name && p.protocol.as_deref().unwrap_or("TCP") == port.protocol.as_deref().unwrap_or("TCP")
        });
        let Some(target) = matching else { continue };
        let Some(target_port) = target.port else { continue };
        let target_port = valid_port(target_port, &format!("EndpointSlice {slice_name}: ports[name={want_name}].port"))?;
        for (j, ep) in slice.endpoints.iter().enumerate() {
            // Kubernetes: a missing `ready` means ready.
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let local = ep.node_name.as_deref() == Some(node_name);
            for (k, addr) in ep.addresses.iter().enumerate() {
                let f = format!("EndpointSlice {slice_name}: endpoints[{j}].addresses[{k}]");
                let Some(addr) = parse_ipv4(addr, &f)? else { continue };
                let spec = BackendSpec { addr, port: target_port, local, weight: 1 };
                if !out.contains(&spec) {
                    out.push(spec);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn valid_port(port: i32, field: &str) -> Result<u16, FieldError> {
    if (1..=65535).contains(&port) {
        Ok(port as u16)
    } else {
        Err((field.to_string(), format!("port {port} is out of range 1-65535")))
    }
}

/// An IPv4 address, `None` for a valid IPv6 one (skipped), an error for anything else.
fn parse_ipv4(s: &str, field: &str) -> Result<Option<Ipv4Addr>, FieldError> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(Some(ip));
    }
    if s.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok(None);
    }
    Err((field.to_string(), format!("{s:?} is not an IP address")))
}

/// The InternalIP (else ExternalIP) of the Node named `node_name`.
pub fn node_ip(state: &ClusterState, node_name: &str) -> Option<Ipv4Addr> {
    let node = state.nodes.iter().find(|n| n.object.metadata.name.as_deref() == Some(node_name))?;
    let addrs = node.object.status.as_ref()?.addresses.as_ref()?;
    ["InternalIP", "ExternalIP"]
        .iter()
        .find_map(|t| addrs.iter().filter(|a| a.type_ == *t).find_map(|a| a.address.parse::<Ipv4Addr>().ok()))
}
