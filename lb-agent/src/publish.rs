//! What Kubernetes mode writes besides the heartbeat: a Service's pool addresses in its status
//! (the status subresource), and Events about Services that got none.
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::{
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
    Api, Client,
};
use log::{info, warn};

use crate::translate::ServiceName;

fn split(name: &str) -> (&str, &str) {
    name.split_once('/').unwrap_or(("default", name))
}

/// Writes `status.loadBalancer.ingress` of Service `name`.
pub async fn service_status(client: Client, name: ServiceName, addrs: Vec<IpAddr>) {
    let (namespace, service) = split(&name);
    let api: Api<Service> = Api::namespaced(client, namespace);
    let ingress: Vec<serde_json::Value> = addrs.iter().map(|ip| serde_json::json!({"ip": ip.to_string(), "ipMode": "VIP"})).collect();
    let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}});
    match api.patch_status(service, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => info!("Service {name}: status.loadBalancer.ingress set to {addrs:?}"),
        Err(e) => warn!("writing the status of Service {name}: {e}"),
    }
}

/// A Warning Event on Service `name`: why it has no (or too few) addresses.
pub async fn warning_event(client: Client, node: String, name: ServiceName, why: String) {
    let (namespace, service) = split(&name);
    let recorder = Recorder::new(client, Reporter { controller: "lb-agent".into(), instance: Some(node) });
    let reference = ObjectReference { api_version: Some("v1".into()), kind: Some("Service".into()), namespace: Some(namespace.into()), name: Some(service.into()), ..Default::default() };
    let event = Event { type_: EventType::Warning, reason: "AddressNotAssigned".into(), note: Some(why), action: "AssignAddress".into(), secondary: None };
    if let Err(e) = recorder.publish(&event, &reference).await {
        warn!("publishing an Event on Service {name}: {e}");
    }
}
