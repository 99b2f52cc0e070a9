//! The load balancer's user space: loading the kernel programs, programming the maps from
//! Kubernetes objects, and reading them back for `lbctl`. Test and demo code lives in the
//! dev-only `testbed` crate, never here.
//!
//! - [`source`]: where the desired state comes from (manifests or the API server);
//! - [`translate`]: Kubernetes objects to frontends;
//! - [`ipam`]: addresses for LoadBalancer Services from address pools;
//! - [`announce`]: which node answers ARP/NDP for each of them;
//! - [`heartbeat`]: Kubernetes mode's node heartbeat Leases, which say who is alive;
//! - [`publish`]: Service status and Events that Kubernetes mode writes;
//! - [`dataplane`]: the kernel object and every map write;
//! - [`node`]: this node's devices and addresses (rtnetlink);
//! - [`metrics`]: Prometheus metrics and the agent's own health endpoints;
//! - [`health`]: kube-proxy's health endpoints (proxy healthz, healthCheckNodePorts);
//! - [`agent`]: the loop that ties them together;
//! - [`status`]: what the agent reports to `lbctl status`;
//! - [`cleanup`]: `lb-agent --cleanup`, which takes all of it off the node.
pub mod agent;
pub mod announce;
pub mod cleanup;
pub mod dataplane;
pub mod events;
pub mod explain;
pub mod health;
pub mod heartbeat;
pub mod ipam;
pub mod metrics;
pub mod netpol;
pub mod node;
pub mod publish;
pub mod source;
pub mod status;
pub mod translate;
