//! The load balancer's user space: loading the kernel programs, programming the maps from
//! Kubernetes objects, and reading them back for `lbctl`.
pub mod agent;
pub mod bpf;
pub mod conntrack;
pub mod dataplane;
pub mod demo;
pub mod manifests;
pub mod kube_source;
pub mod maps;
pub mod metrics;
pub mod node;
pub mod slices;
pub mod testbed;
pub mod topology;
pub mod translate;
