//! Kubernetes source: reflector stores over watches of Services, EndpointSlices and Nodes.
//! A store is swapped atomically when a (re)list completes, so a relist after `410 Gone` or a
//! reconnect never shows a partial view; while the API server is unreachable the stores keep
//! their last state and the datapath keeps what it has.
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use ::kube::{
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Client, Resource,
};
use log::{info, warn};
use tokio::sync::Notify;

use crate::translate::{ClusterState, Sourced};

pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// This node's pods, for the socket-LB opt-out; not waited for (it only narrows the hooks).
    pods: Store<Pod>,
    synced: [Arc<AtomicBool>; 3],
    /// Set by every watch event; cleared by `take_changed`.
    changed: Arc<AtomicBool>,
    /// Wakes the agent's loop on a change.
    pub notify: Arc<Notify>,
}

impl KubeSource {
    /// Starts the three watches on the current tokio runtime.
    pub fn start(client: Client, node_name: &str) -> Self {
        let changed = Arc::new(AtomicBool::new(true));
        let notify = Arc::new(Notify::new());
        let synced = [Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))];
        let services = watch(Api::<Service>::all(client.clone()), &synced[0], &changed, &notify);
        let slices = watch(Api::<EndpointSlice>::all(client.clone()), &synced[1], &changed, &notify);
        let nodes = watch(Api::<Node>::all(client.clone()), &synced[2], &changed, &notify);
        let on_this_node = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let pods = watch_with(Api::<Pod>::all(client), on_this_node, &Arc::new(AtomicBool::new(false)), &changed, &notify);
        Self { services, slices, nodes, pods, synced, changed, notify }
    }

    /// True once every watch has completed its first full list.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    /// Whether anything changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::AcqRel)
    }

    /// The stores' contents; `None` before the first full sync, so nothing is pruned early.
    pub fn state(&self) -> Option<ClusterState> {
        if !self.synced() {
            return None;
        }
        Some(ClusterState { services: sourced(&self.services), slices: sourced(&self.slices), nodes: sourced(&self.nodes), pods: sourced(&self.pods) })
    }
}

fn sourced<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<Sourced<K>> {
    store.state().iter().map(|o| Sourced { origin: "api".to_string(), object: (**o).clone() }).collect()
}

fn watch<K>(api: Api<K>, synced: &Arc<AtomicBool>, changed: &Arc<AtomicBool>, notify: &Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    watch_with(api, watcher::Config::default(), synced, changed, notify)
}

fn watch_with<K>(api: Api<K>, config: watcher::Config, synced: &Arc<AtomicBool>, changed: &Arc<AtomicBool>, notify: &Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).to_string();
    let (synced, changed, notify) = (synced.clone(), changed.clone(), notify.clone());
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    if !synced.swap(true, Ordering::AcqRel) {
                        info!("{kind}: first full list done");
                    }
                    changed.store(true, Ordering::Release);
                    notify.notify_one();
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    changed.store(true, Ordering::Release);
                    notify.notify_one();
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => warn!("{kind} watch: {e}; retrying with backoff, the datapath keeps its state"),
            }
        }
    });
    reader
}
