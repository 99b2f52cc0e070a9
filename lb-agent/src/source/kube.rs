//! Kubernetes source: watches of Services, EndpointSlices, Nodes, Pods (every pod when
//! NetworkPolicy is enforced, else this node's), Namespaces, NetworkPolicies and the
//! LoadBalancerIPPools feeding one index ([`Objects`]). An event changes one object and marks only its Service; a
//! (re)list is applied whole when it completes, so a relist after `410 Gone` or a reconnect
//! never shows a partial view; while the API server is unreachable the index keeps its last
//! state and the datapath keeps what it has.
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex, MutexGuard,
};

use futures_util::StreamExt;
use k8s_openapi::api::{core::v1, discovery};
use ::kube::{
    core::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource,
};
use log::{info, warn};
use tokio::sync::Notify;

use super::{
    model::{IpPool, API_GROUP, API_VERSION, POOL_KIND},
    objects::{name_of, Kinds, Objects},
};
use crate::translate::{ClusterState, Origin, Sourced};

/// Objects from the API server carry this origin.
const ORIGIN: &str = "api";

pub struct KubeSource {
    objects: Arc<Mutex<Objects>>,
    /// Services, EndpointSlices, Nodes, pools: the kinds the Services wait for. Pods only
    /// narrow the socket hooks there.
    synced: [Arc<AtomicBool>; 4],
    /// Pods, Namespaces, NetworkPolicies: what policy waits for (a partial view would deny
    /// what a full one allows).
    policy_synced: [Arc<AtomicBool>; 3],
    /// Wakes the agent's loop on a change.
    pub notify: Arc<Notify>,
    /// For the agent's own writes: heartbeat Leases, Service status, Events.
    pub client: Client,
}

/// How one kind enters the index: one object, or a whole list (of what the agent keeps of
/// objects of the API type `K`: `M`).
struct Feed<K, M> {
    kind: String,
    /// A kind the cluster may not have (a custom resource whose CRD is not installed): "not
    /// found" counts as an empty first list (the watch keeps trying, so it is read once it is).
    optional: bool,
    convert: fn(K) -> M,
    set: fn(&mut Objects, &Origin, Arc<str>, Option<M>),
    kinds: Kinds,
    list: fn(Vec<Sourced<M>>) -> ClusterState,
}

/// A pool as the API server sends it (a custom resource), read into the model; one that does
/// not read is kept with its problem, which is reported, and is not used.
fn pool_of(object: DynamicObject) -> IpPool {
    let name = object.metadata.name.clone();
    match serde_json::to_value(&object).and_then(serde_json::from_value::<IpPool>) {
        Ok(pool) => pool,
        Err(e) => IpPool { metadata: super::model::Meta { id: super::model::ObjectName::new(None, name.as_deref()), ..Default::default() }, problem: Some(e.to_string()), ..Default::default() },
    }
}

impl KubeSource {
    /// Starts the watches on the current tokio runtime. With `network_policy`, every Pod,
    /// Namespace and NetworkPolicy is watched; without, only this node's Pods.
    pub fn start(client: Client, node_name: &str, network_policy: bool) -> Self {
        let objects = Arc::new(Mutex::new(Objects::default()));
        let notify = Arc::new(Notify::new());
        let synced = [(); 4].map(|_| Arc::new(AtomicBool::new(false)));
        let policy_synced = [(); 3].map(|_| Arc::new(AtomicBool::new(false)));
        // Lists at resourceVersion 0, as kube-proxy's informers do: the API server answers from
        // its watch cache, in one response, instead of paging through etcd for every node.
        let all = watcher::Config::default().any_semantic();
        macro_rules! feed {
            ($api:ty, $model:ty, $set:ident, $kinds:ident, $field:ident) => {
                Feed::<$api, $model> {
                    kind: <$api as Resource>::kind(&()).to_string(),
                    optional: false,
                    convert: <$model>::from,
                    set: Objects::$set,
                    kinds: Kinds { $kinds: true, ..Kinds::NONE },
                    list: |$field| ClusterState { $field, ..Default::default() },
                }
            };
        }
        watch(Api::<v1::Service>::all(client.clone()), all.clone(), feed!(v1::Service, super::model::Service, set_service, services, services), &objects, &synced[0], &notify);
        watch(Api::<discovery::v1::EndpointSlice>::all(client.clone()), all.clone(), feed!(discovery::v1::EndpointSlice, super::model::EndpointSlice, set_slice, slices, slices), &objects, &synced[1], &notify);
        watch(Api::<v1::Node>::all(client.clone()), all.clone(), feed!(v1::Node, super::model::Node, set_node, nodes, nodes), &objects, &synced[2], &notify);
        let pods = if network_policy { all.clone() } else { watcher::Config::default().any_semantic().fields(&format!("spec.nodeName={node_name}")) };
        watch(Api::<v1::Pod>::all(client.clone()), pods, feed!(v1::Pod, super::model::Pod, set_pod, pods, pods), &objects, &policy_synced[0], &notify);
        if network_policy {
            watch(Api::<v1::Namespace>::all(client.clone()), all.clone(), feed!(v1::Namespace, super::model::Namespace, set_namespace, namespaces, namespaces), &objects, &policy_synced[1], &notify);
            let policies = feed!(k8s_openapi::api::networking::v1::NetworkPolicy, super::model::NetworkPolicy, set_policy, policies, policies);
            watch(Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::all(client.clone()), all.clone(), policies, &objects, &policy_synced[2], &notify);
        }
        // Address pools: a custom resource (a cluster without its CRD has none).
        let pools = ApiResource::from_gvk(&GroupVersionKind::gvk(API_GROUP, API_VERSION, POOL_KIND));
        let pool_feed = Feed { kind: POOL_KIND.to_string(), optional: true, convert: pool_of, set: Objects::set_pool, kinds: Kinds { pools: true, ..Kinds::NONE }, list: |pools| ClusterState { pools, ..Default::default() } };
        watch(Api::<DynamicObject>::all_with(client.clone(), &pools), all, pool_feed, &objects, &synced[3], &notify);
        Self { objects, synced, policy_synced, notify, client }
    }

    /// True once Pods, Namespaces and NetworkPolicies have each been listed in full.
    pub fn policy_synced(&self) -> bool {
        self.policy_synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    /// True once every watch has completed its first full list.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    pub fn objects(&self) -> MutexGuard<'_, Objects> {
        self.objects.lock().expect("not poisoned")
    }
}

fn watch<K, M>(api: Api<K>, config: watcher::Config, feed: Feed<K, M>, objects: &Arc<Mutex<Objects>>, synced: &Arc<AtomicBool>, notify: &Arc<Notify>)
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    M: super::model::Object + Send + 'static,
{
    let kind = feed.kind.clone();
    let (objects, synced, notify) = (objects.clone(), synced.clone(), notify.clone());
    let stream = watcher(api, config).default_backoff();
    let started = std::time::Instant::now();
    let origin: Origin = ORIGIN.into();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // A (re)list is gathered here and applied whole when it completes.
        let mut listing: Vec<Sourced<M>> = Vec::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => listing.clear(),
                Ok(watcher::Event::InitApply(object)) => listing.push(Sourced { origin: origin.clone(), object: (feed.convert)(object) }),
                Ok(watcher::Event::InitDone) => {
                    let list = std::mem::take(&mut listing);
                    let count = list.len();
                    objects.lock().expect("not poisoned").replace_origin(&origin, (feed.list)(list), feed.kinds);
                    if !synced.swap(true, Ordering::AcqRel) {
                        info!("{kind}: first full list done, {count} objects in {:.1?}", started.elapsed());
                    }
                    notify.notify_one();
                }
                Ok(watcher::Event::Apply(object)) => {
                    let object = (feed.convert)(object);
                    (feed.set)(&mut objects.lock().expect("not poisoned"), &origin, name_of(&object), Some(object));
                    notify.notify_one();
                }
                Ok(watcher::Event::Delete(object)) => {
                    let object = (feed.convert)(object);
                    (feed.set)(&mut objects.lock().expect("not poisoned"), &origin, name_of(&object), None);
                    notify.notify_one();
                }
                Err(watcher::Error::InitialListFailed(::kube::Error::Api(status))) if feed.optional && status.code == 404 => {
                    if !synced.swap(true, Ordering::AcqRel) {
                        info!("{kind}: not served by this API server (its CRD is not installed): none; looking again with backoff");
                        notify.notify_one();
                    }
                }
                Err(e) => warn!("{kind} watch: {e}; retrying with backoff, the datapath keeps its state"),
            }
        }
    });
}
