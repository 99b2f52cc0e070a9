//! The objects both sources hold, indexed the way translation reads them (a Service's
//! EndpointSlices by the Service's name), and which Services changed since the agent last
//! looked: a changed object makes only its own Service be translated again.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use super::model::{EndpointSlice, IpPool, Namespace, NetworkPolicy, Node, Object, ObjectName, Pod, Service};
use super::model::SERVICE_NAME_LABEL;
use crate::translate::{ClusterState, Origin, ServiceName, Sourced};

/// `namespace/name` and origin (a file, or `api`): one copy of one object. Both are shared
/// (`Arc`) by every index that names the object.
type Key = (Arc<str>, Origin);

/// Which Services must be translated again.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Dirty {
    #[default]
    Nothing,
    Services(BTreeSet<ServiceName>),
}

#[derive(Debug, Default)]
pub struct Objects {
    services: BTreeMap<Key, Arc<Service>>,
    slices: BTreeMap<Key, Arc<EndpointSlice>>,
    /// Slices by the Service they belong to (a Service has one or a few: a Vec is smallest).
    slices_of: HashMap<ServiceName, Vec<Key>>,
    nodes: BTreeMap<Key, Arc<Node>>,
    pods: BTreeMap<Key, Arc<Pod>>,
    pools: BTreeMap<Key, Arc<IpPool>>,
    namespaces: BTreeMap<Key, Arc<Namespace>>,
    policies: BTreeMap<Key, Arc<NetworkPolicy>>,
    /// The names each origin holds, by kind (`KIND_*`): a re-read file is compared with its
    /// own objects, not with every object.
    by_origin: HashMap<Origin, [BTreeSet<Arc<str>>; KINDS]>,
    /// LoadBalancer Services, for address assignment (a few among many).
    load_balancers: BTreeSet<ServiceName>,
    /// A pool, or a LoadBalancer Service, changed: addresses must be assigned again.
    lb_changed: bool,
    /// When a Pod, Namespace or NetworkPolicy first changed since policy was last compiled.
    policy_changed: Option<std::time::Instant>,
    /// A Pod or Node changed: the names flow events give addresses must be made again.
    names_changed: bool,
    dirty: Dirty,
}

const KIND_SERVICE: usize = 0;
const KIND_SLICE: usize = 1;
const KIND_NODE: usize = 2;
const KIND_POD: usize = 3;
const KIND_POOL: usize = 4;
const KIND_NAMESPACE: usize = 5;
const KIND_POLICY: usize = 6;
const KINDS: usize = 7;

/// `namespace/name` of an object (`default` when it has no namespace), shared with it.
pub fn name_of(object: &impl Object) -> Arc<str> {
    object.meta().id.full().clone()
}

/// The Service an EndpointSlice belongs to, by its label.
pub fn owner_of(slice: &EndpointSlice) -> Option<ServiceName> {
    let service = slice.metadata.labels.get(SERVICE_NAME_LABEL)?;
    Some(ObjectName::new(Some(slice.metadata.id.namespace()), Some(service)).full().clone())
}

/// Sets or removes one object; whether it changed.
fn put<T: PartialEq>(
    map: &mut BTreeMap<Key, Arc<T>>,
    by_origin: &mut HashMap<Origin, [BTreeSet<Arc<str>>; KINDS]>,
    kind: usize,
    key: Key,
    object: Option<T>,
) -> Option<Option<Arc<T>>> {
    if !by_origin.contains_key(&key.1) {
        by_origin.insert(key.1.clone(), Default::default());
    }
    let names = &mut by_origin.get_mut(&key.1).expect("just made")[kind];
    if object.is_some() {
        names.insert(key.0.clone());
    } else {
        names.remove(&key.0);
    }
    let unchanged = match (&object, map.get(&key)) {
        (Some(new), Some(old)) => **old == *new,
        (None, None) => true,
        _ => false,
    };
    if unchanged {
        return None;
    }
    Some(match object {
        Some(new) => map.insert(key, Arc::new(new)),
        None => map.remove(&key),
    })
}

impl Objects {
    fn mark(&mut self, service: ServiceName) {
        if let Dirty::Nothing = self.dirty {
            self.dirty = Dirty::Services(BTreeSet::new());
        }
        if let Dirty::Services(names) = &mut self.dirty {
            names.insert(service);
        }
    }

    /// What changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    pub fn set_service(&mut self, origin: &Origin, name: ServiceName, object: Option<Service>) {
        // Its slices came first: they name it with the Service's own copy of the name from now on.
        if let Some((key, _)) = self.slices_of.get_key_value(&name).filter(|(key, _)| !Arc::ptr_eq(key, &name)) {
            let key = key.clone();
            let slices = self.slices_of.remove(&key).expect("just found");
            self.slices_of.insert(name.clone(), slices);
        }
        let is_lb = object.as_ref().is_some_and(|s| s.load_balancer.is_some());
        if let Some(old) = put(&mut self.services, &mut self.by_origin, KIND_SERVICE, (name.clone(), origin.clone()), object) {
            if is_lb || old.is_some_and(|s| s.load_balancer.is_some()) {
                self.lb_changed = true;
            }
            self.mark(name.clone());
        }
        // Indexed while any copy of it is a LoadBalancer.
        if is_lb {
            self.load_balancers.insert(name);
        } else if self.service(&name).is_none_or(|copy| copy.object.load_balancer.is_none()) {
            self.load_balancers.remove(&name);
        }
    }

    /// The copy of Service name `name` already held (by its slices or the Service), else `name`:
    /// 100k Services are not named twice.
    fn held_name(&self, name: ServiceName) -> ServiceName {
        if let Some((held, _)) = self.slices_of.get_key_value(&name) {
            return held.clone();
        }
        self.service(&name).map_or(name, |copy| copy.name.clone())
    }

    pub fn set_slice(&mut self, origin: &Origin, name: Arc<str>, object: Option<EndpointSlice>) {
        let key = (name, origin.clone());
        let new_owner = object.as_ref().and_then(owner_of).map(|owner| self.held_name(owner));
        let Some(old) = put(&mut self.slices, &mut self.by_origin, KIND_SLICE, key.clone(), object) else { return };
        let old_owner = old.as_deref().and_then(owner_of);
        for (owner, present) in [(old_owner, false), (new_owner, true)] {
            let Some(owner) = owner else { continue };
            let keys = self.slices_of.entry(owner.clone()).or_default();
            keys.retain(|k| *k != key);
            if present {
                keys.push(key.clone());
                keys.shrink_to_fit(); // a push leaves room for 4; most Services have 1 slice
            }
            if keys.is_empty() {
                self.slices_of.remove(&owner);
            }
            self.mark(owner);
        }
    }

    /// Nodes and pods shape no frontend (the agent reads them on every pass).
    pub fn set_node(&mut self, origin: &Origin, name: Arc<str>, object: Option<Node>) {
        if put(&mut self.nodes, &mut self.by_origin, KIND_NODE, (name, origin.clone()), object).is_some() {
            self.names_changed = true;
        }
    }

    pub fn set_pod(&mut self, origin: &Origin, name: Arc<str>, object: Option<Pod>) {
        if put(&mut self.pods, &mut self.by_origin, KIND_POD, (name, origin.clone()), object).is_some() {
            self.policy_changed.get_or_insert_with(std::time::Instant::now);
            self.names_changed = true;
        }
    }

    pub fn set_namespace(&mut self, origin: &Origin, name: Arc<str>, object: Option<Namespace>) {
        if put(&mut self.namespaces, &mut self.by_origin, KIND_NAMESPACE, (name, origin.clone()), object).is_some() {
            self.policy_changed.get_or_insert_with(std::time::Instant::now);
        }
    }

    pub fn set_policy(&mut self, origin: &Origin, name: Arc<str>, object: Option<NetworkPolicy>) {
        if put(&mut self.policies, &mut self.by_origin, KIND_POLICY, (name, origin.clone()), object).is_some() {
            self.policy_changed.get_or_insert_with(std::time::Instant::now);
        }
    }

    /// Whether a Pod or Node changed since the last call.
    pub fn take_names_changed(&mut self) -> bool {
        std::mem::take(&mut self.names_changed)
    }

    /// When policy inputs first changed since the last call, if they did.
    pub fn take_policy_changed(&mut self) -> Option<std::time::Instant> {
        self.policy_changed.take()
    }

    /// The Namespaces (of a name in two origins, the first).
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        first_of_each(&self.namespaces)
    }

    /// The NetworkPolicies (of a name in two origins, the first).
    pub fn policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        first_of_each(&self.policies)
    }

    pub fn set_pool(&mut self, origin: &Origin, name: Arc<str>, object: Option<IpPool>) {
        if put(&mut self.pools, &mut self.by_origin, KIND_POOL, (name, origin.clone()), object).is_some() {
            self.lb_changed = true;
        }
    }

    /// Whether addresses must be assigned again since the last call.
    pub fn take_lb_changed(&mut self) -> bool {
        std::mem::take(&mut self.lb_changed)
    }

    /// The LoadBalancer Services.
    pub fn load_balancers(&self) -> impl Iterator<Item = ServiceCopy<'_>> {
        self.load_balancers.iter().filter_map(|name| self.service(name))
    }

    /// The address pools (of a name in two origins, the first).
    pub fn pools(&self) -> Vec<(&Origin, &IpPool)> {
        let mut seen = BTreeSet::new();
        self.pools.iter().filter(|((name, _), _)| seen.insert(name.clone())).map(|((_, origin), pool)| (origin, &**pool)).collect()
    }

    /// Makes `origin`'s objects exactly `state`'s: a re-read file, a relisted kind (`kinds`
    /// says which kinds `state` speaks for). Only objects that differ mark their Service.
    pub fn replace_origin(&mut self, origin: &Origin, state: ClusterState, kinds: Kinds) {
        fn keyed<T: Object>(list: Vec<Sourced<T>>) -> BTreeMap<Arc<str>, T> {
            list.into_iter().map(|s| (name_of(&s.object), s.object)).collect()
        }
        macro_rules! replace {
            ($kind:expr, $list:expr, $set:ident) => {{
                let mut new = keyed($list);
                let held: Vec<Arc<str>> = self.by_origin.get(origin).map(|k| k[$kind].iter().cloned().collect()).unwrap_or_default();
                for name in held {
                    if !new.contains_key(&name) {
                        self.$set(origin, name, None);
                    }
                }
                for (name, object) in std::mem::take(&mut new) {
                    self.$set(origin, name, Some(object));
                }
            }};
        }
        if kinds.services {
            replace!(KIND_SERVICE, state.services, set_service);
        }
        if kinds.slices {
            replace!(KIND_SLICE, state.slices, set_slice);
        }
        if kinds.nodes {
            replace!(KIND_NODE, state.nodes, set_node);
        }
        if kinds.pods {
            replace!(KIND_POD, state.pods, set_pod);
        }
        if kinds.pools {
            replace!(KIND_POOL, state.pools, set_pool);
        }
        if kinds.namespaces {
            replace!(KIND_NAMESPACE, state.namespaces, set_namespace);
        }
        if kinds.policies {
            replace!(KIND_POLICY, state.policies, set_policy);
        }
    }

    /// Packs the indexes built one insert at a time into full nodes (after the first full load:
    /// ordered inserts leave B-tree nodes half empty, which at 100k Services is megabytes).
    pub fn compact(&mut self) {
        fn packed<C: Default + IntoIterator + FromIterator<C::Item>>(tree: &mut C) {
            *tree = std::mem::take(tree).into_iter().collect();
        }
        packed(&mut self.services);
        packed(&mut self.slices);
        packed(&mut self.nodes);
        packed(&mut self.pods);
        packed(&mut self.pools);
        packed(&mut self.namespaces);
        packed(&mut self.policies);
        self.by_origin.values_mut().flatten().for_each(packed);
    }

    /// The Service named `name`: its first copy (by origin) and the origins of the others.
    pub fn service(&self, name: &ServiceName) -> Option<ServiceCopy<'_>> {
        let mut copies = self.services.range((name.clone(), Origin::from(""))..).take_while(|((n, _), _)| n == name);
        let ((name, origin), object) = copies.next()?;
        Some(ServiceCopy { name, origin, object, ignored_in: copies.map(|((_, o), _)| &**o).collect() })
    }

    /// The EndpointSlices of Service `name`.
    pub fn slices_of(&self, name: &str) -> Vec<&EndpointSlice> {
        self.slices_of.get(name).into_iter().flatten().filter_map(|key| self.slices.get(key)).map(|s| &**s).collect()
    }

    /// Every Service name.
    pub fn service_names(&self) -> BTreeSet<ServiceName> {
        self.services.keys().map(|(n, _)| n.clone()).collect()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().map(|n| &**n)
    }

    /// The Pods (of a name in two origins, the first).
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        first_of_each(&self.pods)
    }

    /// Everything, as one snapshot (tests and tools; the agent reads through the index).
    pub fn state(&self) -> ClusterState {
        fn all<T: Clone>(map: &BTreeMap<Key, Arc<T>>) -> Vec<Sourced<T>> {
            map.iter().map(|((_, origin), o)| Sourced { origin: origin.clone(), object: (**o).clone() }).collect()
        }
        ClusterState {
            services: all(&self.services),
            slices: all(&self.slices),
            nodes: all(&self.nodes),
            pods: all(&self.pods),
            pools: all(&self.pools),
            namespaces: all(&self.namespaces),
            policies: all(&self.policies),
        }
    }
}

/// Each name's first copy (by origin): the one in force when two files hold one object.
fn first_of_each<T>(map: &BTreeMap<Key, Arc<T>>) -> impl Iterator<Item = &T> {
    let mut last: Option<&Arc<str>> = None;
    map.iter().filter(move |((name, _), _)| last.replace(name) != Some(name)).map(|(_, o)| &**o)
}

/// The copy of a Service in force (the first by origin), and where the others are.
pub struct ServiceCopy<'a> {
    pub name: &'a ServiceName,
    pub origin: &'a Origin,
    pub object: &'a Service,
    pub ignored_in: Vec<&'a str>,
}

/// Which kinds a replacement speaks for.
#[derive(Clone, Copy, Debug)]
pub struct Kinds {
    pub services: bool,
    pub slices: bool,
    pub nodes: bool,
    pub pods: bool,
    pub pools: bool,
    pub namespaces: bool,
    pub policies: bool,
}

impl Kinds {
    pub const ALL: Kinds = Kinds { services: true, slices: true, nodes: true, pods: true, pools: true, namespaces: true, policies: true };
    pub const NONE: Kinds = Kinds { services: false, slices: false, nodes: false, pods: false, pools: false, namespaces: false, policies: false };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, port: i32) -> Service {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {"ports": [{"port": port}]}})).unwrap()
    }

    fn slice(name: &str, service: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": "ns", "labels": {SERVICE_NAME_LABEL: service}}, "addressType": "IPv4", "endpoints": [{"addresses": [ip]}]})).unwrap()
    }

    fn names(d: Dirty) -> Vec<String> {
        match d {
            Dirty::Services(n) => n.into_iter().map(|n| n.to_string()).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_the_service_an_object_belongs_to_is_dirty() {
        let mut o = Objects::default();
        let file = |services: Vec<Service>, slices: Vec<EndpointSlice>| ClusterState {
            services: services.into_iter().map(|object| Sourced { origin: "f.yaml".into(), object }).collect(),
            slices: slices.into_iter().map(|object| Sourced { origin: "f.yaml".into(), object }).collect(),
            ..Default::default()
        };
        o.replace_origin(&"f.yaml".into(), file(vec![svc("a", 80), svc("b", 80)], vec![slice("a-1", "a", "10.0.0.1"), slice("b-1", "b", "10.0.0.2")]), Kinds::ALL);
        assert_eq!(names(o.take_dirty()), ["ns/a", "ns/b"]);
        assert_eq!(o.take_dirty(), Dirty::Nothing);
        // The file again with b's slice edited: b only.
        o.replace_origin(&"f.yaml".into(), file(vec![svc("a", 80), svc("b", 80)], vec![slice("a-1", "a", "10.0.0.1"), slice("b-1", "b", "10.0.0.9")]), Kinds::ALL);
        assert_eq!(names(o.take_dirty()), ["ns/b"]);
        assert_eq!(o.slices_of("ns/b")[0].endpoints[0].address.as_deref(), Some("10.0.0.9"));
        // A slice moving from a to b marks both; a Service removed marks itself.
        o.replace_origin(&"f.yaml".into(), file(vec![svc("b", 80)], vec![slice("a-1", "b", "10.0.0.1"), slice("b-1", "b", "10.0.0.9")]), Kinds::ALL);
        assert_eq!(names(o.take_dirty()), ["ns/a", "ns/b"]);
        assert!(o.service(&"ns/a".into()).is_none());
        assert_eq!(o.slices_of("ns/b").len(), 2);
        assert!(o.slices_of("ns/a").is_empty());
    }

    /// 100k Services are not named twice: a Service and the index of its slices share one
    /// copy of its name, whichever arrives first.
    #[test]
    fn a_service_and_its_slices_share_one_copy_of_its_name() {
        for service_first in [true, false] {
            let mut o = Objects::default();
            let origin: Origin = "api".into();
            let (service, slice_of) = (svc("a", 80), slice("a-1", "a", "10.0.0.1"));
            let set_service = |o: &mut Objects| o.set_service(&origin, name_of(&service), Some(service.clone()));
            let set_slice = |o: &mut Objects| o.set_slice(&origin, name_of(&slice_of), Some(slice_of.clone()));
            if service_first {
                set_service(&mut o);
                set_slice(&mut o);
            } else {
                set_slice(&mut o);
                set_service(&mut o);
            }
            let (indexed, _) = o.slices_of.get_key_value("ns/a").unwrap();
            assert!(Arc::ptr_eq(indexed, o.service(&"ns/a".into()).unwrap().name), "service first: {service_first}");
            // Packing the indexes changes nothing that is read.
            let view = |o: &Objects| {
                let state = o.state();
                (state.services.into_iter().map(|s| (s.origin, s.object)).collect::<Vec<_>>(), state.slices.into_iter().map(|s| (s.origin, s.object)).collect::<Vec<_>>())
            };
            let before = view(&o);
            o.compact();
            assert_eq!(view(&o), before);
            assert_eq!(o.slices_of("ns/a").len(), 1);
        }
    }

    #[test]
    fn a_service_in_two_origins_is_read_from_the_first() {
        let mut o = Objects::default();
        o.set_service(&"b.yaml".into(), "ns/a".into(), Some(svc("a", 81)));
        o.set_service(&"a.yaml".into(), "ns/a".into(), Some(svc("a", 80)));
        let copy = o.service(&"ns/a".into()).unwrap();
        assert_eq!((&**copy.origin, copy.object.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, copy.ignored_in), ("a.yaml", 80, vec!["b.yaml"]));
    }
}
