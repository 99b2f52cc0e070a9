//! End-to-end tests: real TCP and UDP traffic between network namespaces through lb-agent.
//! Each test builds its own topology (unique names) and removes it, agent included, on drop.
mod support;

mod capacity;
mod changes;
mod cleanup;
mod devices;
mod events;
mod host;
mod ipv6;
mod l2;
mod kubernetes;
mod lbctl;
mod logs;
mod metrics;
mod netpol;
mod restart;
mod semantics;
mod service_path;
