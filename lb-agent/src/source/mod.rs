//! Where the desired state comes from: a directory of manifests (standalone mode) or the API
//! server (Kubernetes mode). The agent sees one [`Source`]: a snapshot of Services,
//! EndpointSlices and Nodes, whether it changed, and a wake-up for changes.
pub mod kube;
pub mod manifests;
pub mod model;
pub mod objects;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, MutexGuard},
};

use anyhow::{Context, Result};
use log::{info, warn};
use tokio::sync::Notify;

use crate::translate::ObjectError;
use self::{kube::KubeSource, manifests::ManifestDir, objects::Objects};

/// Where Services, EndpointSlices and Nodes come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests, re-read when files change.
    Manifests(PathBuf),
    /// The API server: in-cluster, or from a kubeconfig (`KUBECONFIG` or the given path).
    /// `api_server` (`host:port`) replaces the address either gives, so that the agent never
    /// depends on the `kubernetes` ClusterIP, which only it can translate.
    Kubernetes { kubeconfig: Option<PathBuf>, api_server: Option<String> },
}

pub enum Source {
    /// A directory, and what wakes the agent when a file in it changes.
    Manifests(ManifestDir, Arc<Notify>),
    Kubernetes(KubeSource),
}

impl Source {
    /// Opens the source; Kubernetes mode starts its watches on the current tokio runtime.
    pub async fn open(cfg: &SourceConfig, node_name: &str, network_policy: bool) -> Result<Self> {
        Ok(match cfg {
            SourceConfig::Manifests(dir) => {
                let notify = Arc::new(Notify::new());
                let mut manifests = ManifestDir::new(dir);
                let changed = Arc::new(std::sync::atomic::AtomicBool::new(true));
                match manifests::watch(dir, notify.clone(), changed.clone()) {
                    Ok(()) => manifests.scan_when(changed),
                    Err(e) => warn!("watching {} for changes: {e}; re-reading it every sync interval instead", dir.display()),
                }
                Source::Manifests(manifests, notify)
            }
            SourceConfig::Kubernetes { kubeconfig, api_server } => Source::Kubernetes(KubeSource::start(kube_client(kubeconfig.as_deref(), api_server.as_deref()).await?, node_name, network_policy)),
        })
    }

    /// The objects, indexed; `None` before the first full sync, so nothing is pruned early.
    pub fn objects(&self) -> Option<MutexGuard<'_, Objects>> {
        match self {
            Source::Manifests(dir, _) => Some(dir.objects()),
            Source::Kubernetes(kube) => kube.synced().then(|| kube.objects()),
        }
    }

    /// Looks for changes: manifests are re-read here (the API server's come by watch).
    /// Returns the inputs that were rejected (each keeps its last good version).
    pub fn poll(&mut self) -> Result<Vec<ObjectError>> {
        match self {
            Source::Manifests(dir, _) => Ok(dir.refresh().with_context(|| format!("reading {}", dir.dir().display()))?.1),
            Source::Kubernetes(_) => Ok(Vec::new()),
        }
    }

    /// Whether the first full view is in (a directory always has one).
    pub fn synced(&self) -> bool {
        match self {
            Source::Manifests(..) => true,
            Source::Kubernetes(kube) => kube.synced(),
        }
    }

    /// Whether what NetworkPolicy reads is in full (a directory always has it).
    pub fn policy_synced(&self) -> bool {
        match self {
            Source::Manifests(..) => true,
            Source::Kubernetes(kube) => kube.policy_synced(),
        }
    }

    /// Notified when the source has news (a watch event, a file changed).
    pub fn notify(&self) -> Arc<Notify> {
        match self {
            Source::Kubernetes(kube) => kube.notify.clone(),
            Source::Manifests(_, notify) => notify.clone(),
        }
    }
}

async fn kube_client(kubeconfig: Option<&Path>, api_server: Option<&str>) -> Result<::kube::Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = ::kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            ::kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => ::kube::Config::infer().await.context("no in-cluster config and no kubeconfig")?,
    };
    if let Some(host_port) = api_server {
        let scheme = config.cluster_url.scheme_str().unwrap_or("https").to_string();
        config.cluster_url = format!("{scheme}://{host_port}").parse().with_context(|| format!("--k8s-api-server {host_port:?} is not host:port"))?;
    }
    info!("Kubernetes API server {}", config.cluster_url);
    Ok(::kube::Client::try_from(config)?)
}
