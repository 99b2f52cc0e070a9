//! Kubernetes source: watches of Services, EndpointSlices, Nodes and this node's Pods feeding
//! one index ([`Objects`]). An event changes one object and marks only its Service; a
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
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource,
};
use log::{info, warn};
use tokio::sync::Notify;

use super::objects::{name_of, Kinds, Objects};
use crate::translate::{ClusterState, Origin, Sourced};

/// Objects from the API server carry this origin.
const ORIGIN: &str = "api";

pub struct KubeSource {
    objects: Arc<Mutex<Objects>>,
    /// Services, EndpointSlices, Nodes: the kinds waited for. This node's pods are not (they
    /// only narrow the socket hooks).
    synced: [Arc<AtomicBool>; 3],
    /// Wakes the agent's loop on a change.
    pub notify: Arc<Notify>,
}

/// How one kind enters the index: one object, or a whole list (of what the agent keeps of
/// objects of the API type `K`: `M`).
struct Feed<M> {
    set: fn(&mut Objects, &Origin, Arc<str>, Option<M>),
    kinds: Kinds,
    list: fn(Vec<Sourced<M>>) -> ClusterState,
}

impl KubeSource {
    /// Starts the watches on the current tokio runtime.
    pub fn start(client: Client, node_name: &str) -> Self {
        let objects = Arc::new(Mutex::new(Objects::default()));
        let notify = Arc::new(Notify::new());
        let synced = [Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))];
        // Lists at resourceVersion 0, as kube-proxy's informers do: the API server answers from
        // its watch cache, in one response, instead of paging through etcd for every node.
        let all = watcher::Config::default().any_semantic();
        let services = Feed { set: Objects::set_service, kinds: Kinds { services: true, ..Kinds::NONE }, list: |services| ClusterState { services, ..Default::default() } };
        watch(Api::<v1::Service>::all(client.clone()), all.clone(), services, &objects, &synced[0], &notify);
        let slices = Feed { set: Objects::set_slice, kinds: Kinds { slices: true, ..Kinds::NONE }, list: |slices| ClusterState { slices, ..Default::default() } };
        watch(Api::<discovery::v1::EndpointSlice>::all(client.clone()), all.clone(), slices, &objects, &synced[1], &notify);
        let nodes = Feed { set: Objects::set_node, kinds: Kinds { nodes: true, ..Kinds::NONE }, list: |nodes| ClusterState { nodes, ..Default::default() } };
        watch(Api::<v1::Node>::all(client.clone()), all, nodes, &objects, &synced[2], &notify);
        let on_this_node = watcher::Config::default().any_semantic().fields(&format!("spec.nodeName={node_name}"));
        let pods = Feed { set: Objects::set_pod, kinds: Kinds { pods: true, ..Kinds::NONE }, list: |pods| ClusterState { pods, ..Default::default() } };
        watch(Api::<v1::Pod>::all(client), on_this_node, pods, &objects, &Arc::new(AtomicBool::new(false)), &notify);
        Self { objects, synced, notify }
    }

    /// True once every watch has completed its first full list.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    pub fn objects(&self) -> MutexGuard<'_, Objects> {
        self.objects.lock().expect("not poisoned")
    }
}

fn watch<K, M>(api: Api<K>, config: watcher::Config, feed: Feed<M>, objects: &Arc<Mutex<Objects>>, synced: &Arc<AtomicBool>, notify: &Arc<Notify>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    M: From<K> + super::model::Object + Send + 'static,
{
    let kind = K::kind(&()).to_string();
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
                Ok(watcher::Event::InitApply(object)) => listing.push(Sourced { origin: origin.clone(), object: object.into() }),
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
                    let object = M::from(object);
                    (feed.set)(&mut objects.lock().expect("not poisoned"), &origin, name_of(&object), Some(object));
                    notify.notify_one();
                }
                Ok(watcher::Event::Delete(object)) => {
                    let object = M::from(object);
                    (feed.set)(&mut objects.lock().expect("not poisoned"), &origin, name_of(&object), None);
                    notify.notify_one();
                }
                Err(e) => warn!("{kind} watch: {e}; retrying with backoff, the datapath keeps its state"),
            }
        }
    });
}
