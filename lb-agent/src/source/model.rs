//! What this proxy reads of Kubernetes objects, and nothing more. At 100k Services the objects
//! are most of the agent's memory, and the full API types (every field an `Option`, every
//! label in a B-tree) are several times the size of what translation reads.
//!
//! Field names and nesting follow the Kubernetes API, so manifests deserialize straight into
//! these types and an error names the same field (`spec.ports[0].port`); objects from the API
//! server are converted from the k8s-openapi types as they arrive. Labels and annotations keep
//! only the keys some part of the agent reads ([`KEPT_KEYS`]).
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{Deserialize, Deserializer};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy (KEP-2447).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The older way to give loadBalancerSourceRanges, still honoured by kube-proxy.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Topology-aware routing, which this proxy does not do (read to say so).
pub const TOPOLOGY_ANNOTATIONS: [&str; 2] = ["service.kubernetes.io/topology-mode", "service.kubernetes.io/topology-aware-hints"];
/// A host-network pod with this annotation set to "disabled" is left alone by the socket hooks:
/// its processes see the real destinations they connect to.
pub const SOCKET_LB_ANNOTATION: &str = "lb-agent.io/socket-lb";

/// Addresses a LoadBalancer Service asks for, comma-separated (one per family at most).
pub const LB_IPS_ANNOTATION: &str = "lb-agent.io/load-balancer-ips";
/// LoadBalancer Services with the same value here may share an address if their ports differ.
pub const SHARING_KEY_ANNOTATION: &str = "lb-agent.io/sharing-key";

/// When the change that an EndpointSlice carries was triggered (RFC 3339): where network
/// programming latency is measured from.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Every label and annotation key the agent reads; the others are dropped on arrival.
const KEPT_KEYS: [&str; 9] = [
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    SOURCE_RANGES_ANNOTATION,
    TOPOLOGY_ANNOTATIONS[0],
    TOPOLOGY_ANNOTATIONS[1],
    SOCKET_LB_ANNOTATION,
    TRIGGER_TIME_ANNOTATION,
    LB_IPS_ANNOTATION,
    SHARING_KEY_ANNOTATION,
];

/// A string of an object. Most (names, addresses, protocols) are at most 24 bytes and are held
/// inline, with no allocation of their own: at 100k Services that is millions fewer.
pub type Text = compact_str::CompactString;

/// Labels or annotations, only the kept keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeptKeys(Box<[(&'static str, Text)]>);

impl KeptKeys {
    fn from_map<V: Into<Text>>(map: impl IntoIterator<Item = (String, V)>) -> Self {
        Self(map.into_iter().filter_map(|(k, v)| KEPT_KEYS.iter().find(|kept| **kept == k).map(|kept| (*kept, v.into()))).collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }
}

impl<'de> Deserialize<'de> for KeptKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::from_map(Option::<BTreeMap<String, Text>>::deserialize(d)?.unwrap_or_default()))
    }
}

/// `namespace/name` of an object (`default` when it has no namespace): the name every index
/// files it under. One allocation, shared by the object and those indexes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName(Arc<str>);

impl ObjectName {
    pub fn new(namespace: Option<&str>, name: Option<&str>) -> Self {
        Self(format!("{}/{}", namespace.unwrap_or("default"), name.unwrap_or("")).into())
    }

    /// `namespace/name`.
    pub fn full(&self) -> &Arc<str> {
        &self.0
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map_or("", |(ns, _)| ns)
    }

    /// The name (empty when the object has none).
    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or("", |(_, name)| name)
    }
}

impl Default for ObjectName {
    fn default() -> Self {
        Self::new(None, None)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Meta {
    /// `metadata.namespace` and `metadata.name`, as one string.
    pub id: ObjectName,
    /// `metadata.creationTimestamp` in Unix seconds (the API writes whole seconds).
    pub created: Option<i64>,
    pub labels: KeptKeys,
    pub annotations: KeptKeys,
}

/// Metadata as written; labels as `L` (the kept keys, or all of them).
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaDoc<L: Default = KeptKeys> {
    name: Option<Text>,
    namespace: Option<Text>,
    creation_timestamp: Option<Time>,
    #[serde(default)]
    labels: L,
    #[serde(default)]
    annotations: KeptKeys,
}

impl<L: Default> MetaDoc<L> {
    fn into_meta(self, labels: KeptKeys) -> Meta {
        Meta { id: ObjectName::new(self.namespace.as_deref(), self.name.as_deref()), created: self.creation_timestamp.map(|t| t.0.as_second()), labels, annotations: self.annotations }
    }
}

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut m = MetaDoc::<KeptKeys>::deserialize(d)?;
        let labels = std::mem::take(&mut m.labels);
        Ok(m.into_meta(labels))
    }
}

impl From<ObjectMeta> for Meta {
    fn from(m: ObjectMeta) -> Self {
        Self {
            id: ObjectName::new(m.namespace.as_deref(), m.name.as_deref()),
            created: m.creation_timestamp.map(|t| t.0.as_second()),
            labels: KeptKeys::from_map(m.labels.unwrap_or_default()),
            annotations: KeptKeys::from_map(m.annotations.unwrap_or_default()),
        }
    }
}

/// An object of this model: its metadata.
pub trait Object {
    fn meta(&self) -> &Meta;
}

macro_rules! object {
    ($($ty:ident),*) => {$(
        impl Object for $ty {
            fn meta(&self) -> &Meta {
                &self.metadata
            }
        }
    )*};
}
object!(Service, EndpointSlice, Node, Pod, IpPool, Namespace, NetworkPolicy);

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "ServiceDoc")]
pub struct Service {
    pub metadata: Meta,
    pub spec: Option<ServiceSpec>,
    /// What only a LoadBalancer Service has: one allocation for those, 8 bytes for the rest.
    pub load_balancer: Option<Box<LoadBalancer>>,
}

/// A LoadBalancer Service's address request and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancer {
    /// `spec.loadBalancerIP` (deprecated by Kubernetes, still honoured, as by MetalLB and Cilium).
    pub requested_ip: Option<Text>,
    /// `spec.loadBalancerClass`: another class belongs to another implementation.
    pub class: Option<Text>,
    /// Every label of the Service: address pools select Services by them.
    pub labels: Box<[(Text, Text)]>,
    /// `status.loadBalancer.ingress`.
    pub ingress: Box<[LoadBalancerIngress]>,
}

/// A Service as written.
#[derive(Deserialize)]
struct ServiceDoc {
    #[serde(default)]
    metadata: MetaDoc<Option<BTreeMap<String, Text>>>,
    spec: Option<ServiceSpecDoc>,
    #[serde(default, deserialize_with = "null_as_default")]
    status: ServiceStatus,
}

/// The spec as written: the stored spec and the LoadBalancer-only request fields.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpecDoc {
    #[serde(rename = "type")]
    type_: Option<Text>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<Text>,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Option<Box<[Text]>>,
    #[serde(rename = "externalIPs")]
    external_ips: Option<Box<[Text]>>,
    ports: Option<Box<[ServicePort]>>,
    session_affinity: Option<Text>,
    session_affinity_config: Option<SessionAffinityConfig>,
    external_traffic_policy: Option<Text>,
    internal_traffic_policy: Option<Text>,
    load_balancer_source_ranges: Option<Box<[Text]>>,
    health_check_node_port: Option<i32>,
    traffic_distribution: Option<Text>,
    #[serde(rename = "loadBalancerIP")]
    load_balancer_ip: Option<Text>,
    load_balancer_class: Option<Text>,
}

impl From<ServiceDoc> for Service {
    fn from(doc: ServiceDoc) -> Self {
        let labels = doc.metadata.labels.clone().unwrap_or_default();
        let metadata = doc.metadata.into_meta(KeptKeys::from_map(labels.clone()));
        let (spec, requested_ip, class) = match doc.spec {
            None => (None, None, None),
            Some(p) => {
                let spec = ServiceSpec {
                    type_: p.type_,
                    cluster_ip: p.cluster_ip,
                    cluster_ips: p.cluster_ips,
                    external_ips: p.external_ips,
                    ports: p.ports,
                    session_affinity: p.session_affinity,
                    session_affinity_config: p.session_affinity_config,
                    external_traffic_policy: p.external_traffic_policy,
                    internal_traffic_policy: p.internal_traffic_policy,
                    load_balancer_source_ranges: p.load_balancer_source_ranges,
                    health_check_node_port: p.health_check_node_port,
                    traffic_distribution: p.traffic_distribution,
                };
                (Some(spec), p.load_balancer_ip, p.load_balancer_class)
            }
        };
        let load_balancer = LoadBalancer::of(spec.as_ref(), requested_ip, class, labels.into_iter().map(|(k, v)| (k.into(), v)).collect(), doc.status.load_balancer.ingress);
        Self { metadata, spec, load_balancer }
    }
}

impl LoadBalancer {
    /// What a Service of `spec` keeps: everything for a LoadBalancer, nothing for the others.
    fn of(spec: Option<&ServiceSpec>, requested_ip: Option<Text>, class: Option<Text>, labels: Box<[(Text, Text)]>, ingress: Box<[LoadBalancerIngress]>) -> Option<Box<Self>> {
        let is_lb = spec.is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"));
        is_lb.then(|| Box::new(Self { requested_ip, class, labels, ingress }))
    }
}

impl Service {
    /// `status.loadBalancer.ingress` (empty but for a LoadBalancer Service).
    pub fn ingress(&self) -> &[LoadBalancerIngress] {
        self.load_balancer.as_ref().map_or(&[], |lb| &lb.ingress)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceSpec {
    pub type_: Option<Text>,
    pub cluster_ip: Option<Text>,
    pub cluster_ips: Option<Box<[Text]>>,
    pub external_ips: Option<Box<[Text]>>,
    pub ports: Option<Box<[ServicePort]>>,
    pub session_affinity: Option<Text>,
    pub session_affinity_config: Option<SessionAffinityConfig>,
    pub external_traffic_policy: Option<Text>,
    pub internal_traffic_policy: Option<Text>,
    pub load_balancer_source_ranges: Option<Box<[Text]>>,
    pub health_check_node_port: Option<i32>,
    pub traffic_distribution: Option<Text>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<Text>,
    pub protocol: Option<Text>,
    pub port: i32,
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    pub timeout_seconds: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceStatus {
    #[serde(default, deserialize_with = "null_as_default")]
    load_balancer: LoadBalancerStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
struct LoadBalancerStatus {
    #[serde(default, deserialize_with = "null_as_default")]
    ingress: Box<[LoadBalancerIngress]>,
}

/// A field whose `null` means the same as its absence.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    pub ip: Option<Text>,
    pub ip_mode: Option<Text>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: Meta,
    pub address_type: Text,
    #[serde(default)]
    pub endpoints: Box<[Endpoint]>,
    pub ports: Option<Box<[EndpointPort]>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `addresses[0]`. The API gives the others no meaning, the EndpointSlice controller writes
    /// exactly one, and kube-proxy reads only the first: so does this proxy.
    #[serde(rename = "addresses", deserialize_with = "first")]
    pub address: Option<Text>,
    pub conditions: Option<EndpointConditions>,
    pub node_name: Option<Text>,
}

/// The first element of a list.
fn first<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Text>, D::Error> {
    Ok(Vec::<Text>::deserialize(d)?.into_iter().next())
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointPort {
    pub name: Option<Text>,
    pub protocol: Option<Text>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Node {
    #[serde(default)]
    pub metadata: Meta,
    pub spec: Option<NodeSpec>,
    pub status: Option<NodeStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NodeSpec {
    /// The node's pod ranges (one per family); lb-cni allocates from them when its config
    /// names no subnet.
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Option<Box<[Text]>>,
    /// The older single-range field, set alone by some clusters.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<Text>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NodeStatus {
    pub addresses: Option<Box<[NodeAddress]>>,
    pub conditions: Option<Box<[NodeCondition]>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NodeCondition {
    #[serde(rename = "type")]
    pub type_: Text,
    pub status: Text,
}

impl Node {
    /// Its `Ready` condition is `True`. (Standalone mode's notion of a live node: a manifest
    /// without conditions describes a node that is there.)
    /// `spec.podCIDRs`, else `spec.podCIDR`.
    pub fn pod_cidrs(&self) -> Vec<String> {
        let Some(spec) = &self.spec else { return Vec::new() };
        match (&spec.pod_cidrs, &spec.pod_cidr) {
            (Some(all), _) if !all.is_empty() => all.iter().map(|c| c.to_string()).collect(),
            (_, Some(one)) => vec![one.to_string()],
            _ => Vec::new(),
        }
    }

    pub fn ready(&self) -> bool {
        let conditions = self.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
        conditions.iter().find(|c| c.type_ == "Ready").is_none_or(|c| c.status == "True")
    }
}

/// The API group and version of this project's own kinds.
pub const API_GROUP: &str = "lb-agent.io";
pub const API_VERSION: &str = "v1alpha1";
/// The kind of an address pool for LoadBalancer Services.
pub const POOL_KIND: &str = "LoadBalancerIPPool";

/// `LoadBalancerIPPool` (cluster-scoped): addresses to give LoadBalancer Services.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct IpPool {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub spec: IpPoolSpec,
    /// Why the object could not be read (Kubernetes mode: the API server checks a custom
    /// resource only against its CRD's schema).
    #[serde(skip)]
    pub problem: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpPoolSpec {
    /// Address blocks: a CIDR, or a first and last address.
    #[serde(default)]
    pub blocks: Vec<IpBlock>,
    /// The Services it serves (all, when absent). Besides their labels, a Service matches
    /// `io.kubernetes.service.namespace` and `io.kubernetes.service.name`.
    pub service_selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    /// Whether a CIDR's first and last addresses (network and broadcast in IPv4) are given
    /// out; they are not by default. /31, /32, /127 and /128 blocks give out every address.
    #[serde(default, rename = "allowFirstLastIPs")]
    pub allow_first_last_ips: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct IpBlock {
    pub cidr: Option<Text>,
    pub start: Option<Text>,
    pub stop: Option<Text>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub type_: Text,
    pub address: Text,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "PodDoc")]
pub struct Pod {
    pub metadata: Meta,
    /// `metadata.uid`, which names the pod's cgroup. Only pods keep theirs: a UID is 36 bytes,
    /// too long to be held inline, and no other kind needs it.
    pub uid: Option<Text>,
    pub spec: Option<PodSpec>,
    /// Every label: NetworkPolicy selects pods by any of them.
    pub labels: Box<[(Text, Text)]>,
    /// `status.podIPs` (or `status.podIP` alone).
    pub ips: Box<[Text]>,
}

/// A Pod as written, with its UID in its metadata.
#[derive(Deserialize)]
struct PodDoc {
    #[serde(default)]
    metadata: PodMeta,
    spec: Option<PodSpecDoc>,
    #[serde(default, deserialize_with = "null_as_default")]
    status: PodStatusDoc,
}

#[derive(Default, Deserialize)]
struct PodMeta {
    #[serde(flatten)]
    meta: MetaDoc<Option<BTreeMap<String, Text>>>,
    uid: Option<Text>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecDoc {
    node_name: Option<Text>,
    host_network: Option<bool>,
    #[serde(default, deserialize_with = "null_as_default")]
    containers: Vec<ContainerDoc>,
}

#[derive(Deserialize)]
struct ContainerDoc {
    #[serde(default, deserialize_with = "null_as_default")]
    ports: Vec<NamedPort>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusDoc {
    #[serde(rename = "podIP")]
    pod_ip: Option<Text>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIpDoc>>,
}

#[derive(Deserialize)]
struct PodIpDoc {
    ip: Text,
}

/// The pod's addresses: `podIPs`, else `podIP`.
fn pod_ips(ips: Option<Vec<Text>>, ip: Option<Text>) -> Box<[Text]> {
    ips.filter(|ips| !ips.is_empty()).unwrap_or_else(|| ip.into_iter().collect()).into()
}

impl From<PodDoc> for Pod {
    fn from(doc: PodDoc) -> Self {
        let labels = doc.metadata.meta.labels.clone().unwrap_or_default();
        let metadata = doc.metadata.meta.into_meta(KeptKeys::from_map(labels.clone()));
        let spec = doc.spec.map(|s| PodSpec {
            node_name: s.node_name,
            host_network: s.host_network,
            named_ports: s.containers.into_iter().flat_map(|c| c.ports).filter(|p| p.name.is_some()).collect(),
        });
        let ips = pod_ips(doc.status.pod_ips.map(|ips| ips.into_iter().map(|i| i.ip).collect()), doc.status.pod_ip);
        Self { metadata, uid: doc.metadata.uid, spec, labels: labels.into_iter().map(|(k, v)| (k.into(), v)).collect(), ips }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<Text>,
    pub host_network: Option<bool>,
    /// The containers' ports that have a name (NetworkPolicy names them).
    #[serde(skip)]
    pub named_ports: Box<[NamedPort]>,
}

/// A container port: `name`, `containerPort`, `protocol`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamedPort {
    pub name: Option<Text>,
    pub container_port: i32,
    pub protocol: Option<Text>,
}

/// A Namespace: its name and every label (NetworkPolicy selects namespaces by them).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "NamespaceDoc")]
pub struct Namespace {
    pub metadata: Meta,
    pub labels: Box<[(Text, Text)]>,
}

#[derive(Deserialize)]
struct NamespaceDoc {
    #[serde(default)]
    metadata: MetaDoc<Option<BTreeMap<String, Text>>>,
}

impl From<NamespaceDoc> for Namespace {
    fn from(doc: NamespaceDoc) -> Self {
        let labels = doc.metadata.labels.clone().unwrap_or_default();
        // Cluster-scoped: no namespace of its own.
        let metadata = MetaDoc { namespace: None, ..doc.metadata }.into_meta(KeptKeys::default());
        Self { metadata, labels: labels.into_iter().map(|(k, v)| (k.into(), v)).collect() }
    }
}

/// A NetworkPolicy (networking.k8s.io/v1): its spec is read whole, as the API types have it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "NetworkPolicyDoc")]
pub struct NetworkPolicy {
    pub metadata: Meta,
    /// `metadata.resourceVersion`: which version of it is in force (`lbctl policy` shows it).
    pub version: Option<Text>,
    pub spec: api::networking::v1::NetworkPolicySpec,
}

#[derive(Deserialize)]
struct NetworkPolicyDoc {
    #[serde(default)]
    metadata: VersionedMeta,
    #[serde(default)]
    spec: api::networking::v1::NetworkPolicySpec,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VersionedMeta {
    #[serde(flatten)]
    meta: Meta,
    resource_version: Option<Text>,
}

impl From<NetworkPolicyDoc> for NetworkPolicy {
    fn from(doc: NetworkPolicyDoc) -> Self {
        Self { metadata: doc.metadata.meta, version: doc.metadata.resource_version, spec: doc.spec }
    }
}

// From the API server's objects, moving what is kept.

fn text(s: Option<String>) -> Option<Text> {
    s.map(Text::from)
}

fn list<A, B: From<A>>(v: impl IntoIterator<Item = A>) -> Box<[B]> {
    v.into_iter().map(B::from).collect()
}

fn texts(v: Option<Vec<String>>) -> Option<Box<[Text]>> {
    v.map(list)
}

impl From<api::core::v1::Service> for Service {
    fn from(s: api::core::v1::Service) -> Self {
        let (lb_ip, lb_class) = s.spec.as_ref().map_or((None, None), |p| (p.load_balancer_ip.clone(), p.load_balancer_class.clone()));
        let spec = s.spec.map(|p| ServiceSpec {
            type_: text(p.type_),
            cluster_ip: text(p.cluster_ip),
            cluster_ips: texts(p.cluster_ips),
            external_ips: texts(p.external_ips),
            ports: p.ports.map(|ports| ports.into_iter().map(|p| ServicePort { name: text(p.name), protocol: text(p.protocol), port: p.port, node_port: p.node_port }).collect()),
            session_affinity: text(p.session_affinity),
            session_affinity_config: p.session_affinity_config.map(|c| SessionAffinityConfig { client_ip: c.client_ip.map(|c| ClientIpConfig { timeout_seconds: c.timeout_seconds }) }),
            external_traffic_policy: text(p.external_traffic_policy),
            internal_traffic_policy: text(p.internal_traffic_policy),
            load_balancer_source_ranges: texts(p.load_balancer_source_ranges),
            health_check_node_port: p.health_check_node_port,
            traffic_distribution: text(p.traffic_distribution),
        });
        let ingress = s.status.and_then(|st| st.load_balancer).and_then(|l| l.ingress).unwrap_or_default();
        let ingress = ingress.into_iter().map(|i| LoadBalancerIngress { ip: text(i.ip), ip_mode: text(i.ip_mode) }).collect();
        let (requested_ip, class) = (text(lb_ip), text(lb_class));
        let labels = s.metadata.labels.clone().unwrap_or_default().into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        let load_balancer = LoadBalancer::of(spec.as_ref(), requested_ip, class, labels, ingress);
        Self { metadata: s.metadata.into(), spec, load_balancer }
    }
}

impl From<api::discovery::v1::EndpointSlice> for EndpointSlice {
    fn from(s: api::discovery::v1::EndpointSlice) -> Self {
        let endpoints = s
            .endpoints
            .into_iter()
            .map(|e| Endpoint {
                address: e.addresses.into_iter().next().map(Text::from),
                conditions: e.conditions.map(|c| EndpointConditions { ready: c.ready, serving: c.serving, terminating: c.terminating }),
                node_name: text(e.node_name),
            })
            .collect();
        let ports = s.ports.map(|ports| ports.into_iter().map(|p| EndpointPort { name: text(p.name), protocol: text(p.protocol), port: p.port }).collect());
        Self { metadata: s.metadata.into(), address_type: s.address_type.into(), endpoints, ports }
    }
}

impl From<api::core::v1::Node> for Node {
    fn from(n: api::core::v1::Node) -> Self {
        let status = n.status.map(|s| NodeStatus {
            addresses: s.addresses.map(|list| list.into_iter().map(|a| NodeAddress { type_: a.type_.into(), address: a.address.into() }).collect()),
            conditions: s.conditions.map(|list| list.into_iter().map(|c| NodeCondition { type_: c.type_.into(), status: c.status.into() }).collect()),
        });
        let spec = n.spec.map(|s| NodeSpec { pod_cidrs: s.pod_cidrs.map(|list| list.into_iter().map(Text::from).collect()), pod_cidr: text(s.pod_cidr) });
        Self { metadata: n.metadata.into(), spec, status }
    }
}

impl From<api::core::v1::Pod> for Pod {
    fn from(mut p: api::core::v1::Pod) -> Self {
        let uid = text(p.metadata.uid.take());
        let labels = p.metadata.labels.take().unwrap_or_default();
        let named_port = |c: api::core::v1::ContainerPort| NamedPort { name: text(c.name), container_port: c.container_port, protocol: text(c.protocol) };
        let spec = p.spec.map(|s| PodSpec {
            node_name: text(s.node_name),
            host_network: s.host_network,
            named_ports: s.containers.into_iter().flat_map(|c| c.ports.unwrap_or_default()).filter(|p| p.name.is_some()).map(named_port).collect(),
        });
        let status = p.status.unwrap_or_default();
        let ips = pod_ips(status.pod_ips.map(|ips| ips.into_iter().map(|i| Text::from(i.ip)).collect()), text(status.pod_ip));
        let mut metadata: Meta = p.metadata.into();
        metadata.labels = KeptKeys::from_map(labels.clone());
        Self { metadata, uid, spec, labels: labels.into_iter().map(|(k, v)| (k.into(), v.into())).collect(), ips }
    }
}

impl From<api::core::v1::Namespace> for Namespace {
    fn from(mut n: api::core::v1::Namespace) -> Self {
        let labels = n.metadata.labels.take().unwrap_or_default();
        n.metadata.namespace = None;
        Self { metadata: n.metadata.into(), labels: labels.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }
}

impl From<api::networking::v1::NetworkPolicy> for NetworkPolicy {
    fn from(mut p: api::networking::v1::NetworkPolicy) -> Self {
        let version = text(p.metadata.resource_version.take());
        Self { metadata: p.metadata.into(), version, spec: p.spec.unwrap_or_default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    /// The same JSON read straight into the model (manifests) and through the API type
    /// (Kubernetes mode) gives the same object.
    fn both_ways<Api: DeserializeOwned, Model: DeserializeOwned + From<Api> + PartialEq + std::fmt::Debug>(object: serde_json::Value) -> Model {
        let direct: Model = serde_json::from_value(object.clone()).unwrap();
        let converted = Model::from(serde_json::from_value::<Api>(object).unwrap());
        assert_eq!(direct, converted);
        direct
    }

    fn meta(labels: serde_json::Value, annotations: serde_json::Value) -> serde_json::Value {
        json!({
            "name": "web", "namespace": "shop", "uid": "u-1", "creationTimestamp": "2026-01-02T03:04:05Z", "resourceVersion": "7",
            "labels": labels, "annotations": annotations,
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        })
    }

    #[test]
    fn services_read_the_same_from_manifests_and_from_the_api() {
        let svc: Service = both_ways::<api::core::v1::Service, _>(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(json!({"app": "web", SERVICE_PROXY_NAME_LABEL: "other"}), json!({SOURCE_RANGES_ANNOTATION: "10.0.0.0/8", "kubectl.kubernetes.io/last-applied-configuration": "{...}"})),
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "externalIPs": ["192.0.2.1"],
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 30080}],
                "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster", "loadBalancerSourceRanges": ["10.0.0.0/8"],
                "healthCheckNodePort": 32000, "trafficDistribution": "PreferClose", "selector": {"app": "web"},
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1", "ipMode": "VIP"}]}},
        }));
        assert_eq!((&**svc.metadata.id.full(), svc.metadata.id.namespace(), svc.metadata.id.name()), ("shop/web", "shop", "web"));
        assert_eq!(svc.metadata.created, Some(1_767_323_045), "2026-01-02T03:04:05Z");
        // Only the keys something reads are kept.
        assert_eq!(svc.metadata.labels, KeptKeys([(SERVICE_PROXY_NAME_LABEL, "other".into())].into()));
        assert_eq!(svc.metadata.annotations.get(SOURCE_RANGES_ANNOTATION), Some("10.0.0.0/8"));
        assert_eq!(svc.metadata.annotations.get("kubectl.kubernetes.io/last-applied-configuration"), None);
        let spec = svc.spec.unwrap();
        assert_eq!((spec.ports.unwrap()[0].node_port, spec.session_affinity_config.unwrap().client_ip.unwrap().timeout_seconds), (Some(30080), Some(60)));
    }

    /// At 100k Services the models are most of the agent's memory; each is held in an `Arc`
    /// (16 bytes more), and an allocation is rounded up to a size class (.., 160, 192, ..,
    /// 320, 384): a field added here may cost a whole class per object.
    #[test]
    fn models_stay_in_their_size_class() {
        assert!(size_of::<Service>() + 16 <= 320, "Service is {} bytes", size_of::<Service>());
        assert!(size_of::<EndpointSlice>() + 16 <= 160, "EndpointSlice is {} bytes", size_of::<EndpointSlice>());
    }

    #[test]
    fn slices_nodes_and_pods_read_the_same_from_manifests_and_from_the_api() {
        let slice: EndpointSlice = both_ways::<api::discovery::v1::EndpointSlice, _>(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": meta(json!({SERVICE_NAME_LABEL: "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}), json!({})),
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5", "10.244.1.6"], "conditions": {"ready": false, "serving": true, "terminating": true}, "nodeName": "node-a", "zone": "z1", "targetRef": {"kind": "Pod", "name": "web-1"}}],
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"}],
        }));
        assert_eq!(slice.metadata.labels.get(SERVICE_NAME_LABEL), Some("web"));
        assert_eq!(slice.endpoints[0].conditions, Some(EndpointConditions { ready: Some(false), serving: Some(true), terminating: Some(true) }));
        assert_eq!(slice.endpoints[0].address.as_deref(), Some("10.244.1.5"), "only the first address is kept");
        let node: Node = both_ways::<api::core::v1::Node, _>(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": meta(json!({}), json!({})),
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}, {"type": "Hostname", "address": "node-a"}]},
        }));
        assert_eq!(node.pod_cidrs(), ["10.244.1.0/24", "fd00:244:1::/64"]);
        assert_eq!(node.status.unwrap().addresses.unwrap()[0].address, "192.168.1.10");
        let pod: Pod = both_ways::<api::core::v1::Pod, _>(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta(json!({}), json!({SOCKET_LB_ANNOTATION: "disabled"})),
            "spec": {"nodeName": "node-a", "hostNetwork": true, "containers": [{"name": "c", "image": "busybox"}]},
        }));
        assert_eq!((pod.metadata.annotations.get(SOCKET_LB_ANNOTATION), pod.uid.as_deref(), pod.spec.unwrap().host_network), (Some("disabled"), Some("u-1"), Some(true)));
        // What NetworkPolicy reads: every label, the addresses, the named ports.
        let pod: Pod = both_ways::<api::core::v1::Pod, _>(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta(json!({"app": "web", "tier": "front"}), json!({})),
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "c", "image": "busybox", "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"containerPort": 9000}]},
                {"name": "d", "image": "busybox", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
            ]},
            "status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}]},
        }));
        assert_eq!(&*pod.labels, [("app".into(), "web".into()), ("tier".into(), "front".into())]);
        assert_eq!(&*pod.ips, ["10.244.1.5", "fd00::5"]);
        let ports: Vec<_> = pod.spec.unwrap().named_ports.iter().map(|p| (p.name.clone().unwrap(), p.container_port, p.protocol.clone())).collect();
        assert_eq!(ports, [("http".into(), 8080, Some("TCP".into())), ("dns".into(), 53, Some("UDP".into()))]);
        let pod: Pod = both_ways::<api::core::v1::Pod, _>(json!({"metadata": {"name": "p"}, "status": {"podIP": "10.244.1.6"}}));
        assert_eq!(&*pod.ips, ["10.244.1.6"], "podIP alone");
        let ns: Namespace = both_ways::<api::core::v1::Namespace, _>(json!({"metadata": {"name": "x", "labels": {"team": "a"}}}));
        assert_eq!((ns.metadata.id.name(), &*ns.labels), ("x", &[("team".into(), "a".into())][..]));
        let np: NetworkPolicy = both_ways::<api::networking::v1::NetworkPolicy, _>(json!({
            "metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": "http", "endPort": null}]}]},
        }));
        assert_eq!((&**np.metadata.id.full(), np.spec.policy_types.as_deref()), ("x/deny", Some(&["Ingress".to_string()][..])));
        let np: NetworkPolicy = both_ways::<api::networking::v1::NetworkPolicy, _>(json!({"metadata": meta(json!({}), json!({})), "spec": {"podSelector": {}}}));
        assert_eq!(np.version.as_deref(), Some("7"));
    }
}
