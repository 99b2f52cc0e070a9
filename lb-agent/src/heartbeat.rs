//! Kubernetes mode's node heartbeat: one Lease per node (coordination.k8s.io/v1), renewed
//! every `interval`, and a watch of every node's. A node is alive while this agent has seen its
//! Lease renewed within `timeout`; this node is alive while its own last renewal is that
//! recent. So the API load is one write per node per interval, however many Services there
//! are, and a node that cannot reach the API server drops out of every view, its own included.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    api::{DeleteParams, PostParams},
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use log::{info, warn};
use tokio::sync::Notify;

use crate::{announce::Membership, dataplane::conntrack::monotonic_ns};

/// Heartbeat Leases carry this label, and are named `lb-agent-<node>`.
pub const LEASE_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "lb-agent");

pub fn lease_name(node: &str) -> String {
    format!("lb-agent-{node}")
}

#[derive(Clone, Debug)]
pub struct HeartbeatConfig {
    pub namespace: String,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Default)]
struct Seen {
    /// When this agent's own Lease was last renewed.
    renewed: Option<Instant>,
    /// Each other node's Lease: its renew time as written, and when this agent saw it change.
    nodes: BTreeMap<String, (Option<String>, Instant)>,
}

pub struct Heartbeat {
    node: String,
    cfg: HeartbeatConfig,
    seen: Arc<Mutex<Seen>>,
    api: Api<Lease>,
    /// Woken on every renewal of this node's Lease (or failure to), and when another node
    /// comes alive or its Lease goes.
    pub notify: Arc<Notify>,
}

impl Heartbeat {
    /// Starts renewing this node's Lease and watching every node's.
    pub fn start(client: Client, node: &str, cfg: HeartbeatConfig) -> Self {
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
        let hb = Self { node: node.to_string(), cfg, seen: Arc::default(), api, notify: Arc::new(Notify::new()) };
        tokio::spawn(renew(hb.api.clone(), hb.node.clone(), hb.cfg.clone(), hb.seen.clone(), hb.notify.clone()));
        tokio::spawn(watch(hb.api.clone(), hb.node.clone(), hb.cfg.timeout, hb.seen.clone(), hb.notify.clone()));
        info!("heartbeat: Lease {}/{} renewed every {:?}; a node is alive while its Lease was renewed within {:?}", hb.cfg.namespace, lease_name(node), hb.cfg.interval, hb.cfg.timeout);
        hb
    }

    /// The nodes alive now, and until when this node may answer.
    pub fn membership(&self) -> Membership {
        let seen = self.seen.lock().expect("not poisoned");
        let now = Instant::now();
        let fresh = |at: Instant| now.duration_since(at) < self.cfg.timeout;
        let mut live: std::collections::BTreeSet<String> = seen.nodes.iter().filter(|(_, (_, at))| fresh(*at)).map(|(n, _)| n.clone()).collect();
        live.remove(&self.node);
        let answer_until_ns = match seen.renewed.filter(|at| fresh(*at)) {
            Some(at) => {
                live.insert(self.node.clone());
                // The others count this node alive until they miss a renewal for `timeout`
                // after they saw the last one, which is after it was made.
                monotonic_ns() - now.duration_since(at).as_nanos() as u64 + self.cfg.timeout.as_nanos() as u64
            }
            None => 0,
        };
        Membership { live, answer_until_ns }
    }

    /// When the membership next changes by itself: the first live node (this one included)
    /// whose last renewal, as seen, passes the timeout.
    pub fn next_expiry(&self) -> Option<Instant> {
        let seen = self.seen.lock().expect("not poisoned");
        let now = Instant::now();
        seen.nodes.values().map(|(_, at)| *at).chain(seen.renewed).map(|at| at + self.cfg.timeout).filter(|expiry| *expiry > now).min()
    }

    /// Deletes this node's Lease (a clean stop): the other nodes take its addresses over at
    /// once instead of after `timeout`.
    pub async fn release(&self) {
        match tokio::time::timeout(self.cfg.interval * 2, self.api.delete(&lease_name(&self.node), &DeleteParams::default())).await {
            Ok(Ok(_)) => info!("heartbeat Lease {} deleted", lease_name(&self.node)),
            Ok(Err(e)) => warn!("deleting heartbeat Lease {}: {e}", lease_name(&self.node)),
            Err(_) => warn!("deleting heartbeat Lease {}: timed out", lease_name(&self.node)),
        }
    }
}

/// Renews this node's Lease every interval: replaced with the version last read (created when
/// missing); each call bounded by the interval, so that a hung API server counts as a missed
/// renewal, not as a stall.
async fn renew(api: Api<Lease>, node: String, cfg: HeartbeatConfig, seen: Arc<Mutex<Seen>>, notify: Arc<Notify>) {
    let name = lease_name(&node);
    let mut current: Option<Lease> = None;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut failing = false;
    // For people reading the Lease: agents go by `timeout` itself, not this rounding.
    let duration_s = cfg.timeout.as_secs_f64().ceil() as i32;
    loop {
        tick.tick().await;
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let attempt = async {
            let lease = match current.take() {
                Some(lease) => lease,
                None => match api.get_opt(&name).await? {
                    Some(lease) => lease,
                    None => {
                        let lease = Lease {
                            metadata: ObjectMeta { name: Some(name.clone()), labels: Some([(LEASE_LABEL.0.to_string(), LEASE_LABEL.1.to_string())].into()), ..Default::default() },
                            spec: Some(LeaseSpec { holder_identity: Some(node.clone()), acquire_time: Some(now.clone()), renew_time: Some(now.clone()), lease_duration_seconds: Some(duration_s), ..Default::default() }),
                        };
                        return api.create(&PostParams::default(), &lease).await;
                    }
                },
            };
            let spec = LeaseSpec { holder_identity: Some(node.clone()), renew_time: Some(now.clone()), lease_duration_seconds: Some(duration_s), ..lease.spec.clone().unwrap_or_default() };
            api.replace(&name, &PostParams::default(), &Lease { spec: Some(spec), ..lease }).await
        };
        match tokio::time::timeout(cfg.interval, attempt).await {
            Ok(Ok(lease)) => {
                current = Some(lease);
                seen.lock().expect("not poisoned").renewed = Some(Instant::now());
                if failing {
                    info!("heartbeat Lease {name} renewed again");
                    failing = false;
                }
                notify.notify_one();
            }
            outcome => {
                if !failing {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", cfg.interval),
                    };
                    warn!("renewing heartbeat Lease {name}: {why}; this node stops answering for its addresses {:?} after the last renewal", cfg.timeout);
                    failing = true;
                }
                notify.notify_one();
            }
        }
    }
}

/// Follows every node's Lease: a changed renew time is a heartbeat, seen now. A Lease first
/// seen (at start, or after a relist) counts from its renew time by this node's clock.
async fn watch(api: Api<Lease>, node: String, timeout: Duration, seen: Arc<Mutex<Seen>>, notify: Arc<Notify>) {
    let config = watcher::Config::default().labels(&format!("{}={}", LEASE_LABEL.0, LEASE_LABEL.1));
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(event) = stream.next().await {
        let lease = match event {
            Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => lease,
            Ok(watcher::Event::Delete(lease)) => {
                if let Some(holder) = lease.spec.and_then(|s| s.holder_identity) {
                    seen.lock().expect("not poisoned").nodes.remove(&holder);
                    notify.notify_one();
                }
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                warn!("Lease watch: {e}; retrying with backoff");
                continue;
            }
        };
        let Some(spec) = lease.spec else { continue };
        let Some(holder) = spec.holder_identity.filter(|h| *h != node) else { continue };
        let renewed = spec.renew_time.map(|t| t.0);
        let renewed_text = renewed.map(|t| t.to_string());
        let mut seen = seen.lock().expect("not poisoned");
        let now = Instant::now();
        let fresh = |at: Instant| now.duration_since(at) < timeout;
        let (at, was_alive) = match seen.nodes.get(&holder) {
            Some((before, at)) if *before == renewed_text => (*at, fresh(*at)),
            Some((_, at)) => (now, fresh(*at)),
            None => {
                // First sight: as old as its renew time says (a dead node's Lease is not fresh).
                let age = renewed.map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t).unsigned_abs()).unwrap_or(timeout);
                (now.checked_sub(age.min(timeout)).unwrap_or(now), false)
            }
        };
        seen.nodes.insert(holder, (renewed_text, at));
        drop(seen);
        // Only a node coming alive changes who owns what; a live node's renewal does not (and
        // going stale is a time, see `next_expiry`).
        if fresh(at) && !was_alive {
            notify.notify_one();
        }
    }
}
