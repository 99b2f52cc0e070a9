//! lb-cni, the CNI plugin: the protocol ([`spec`]), its own address allocator ([`ipam`]),
//! delegation to other IPAM plugins ([`delegate`]), the pod's wiring ([`pod`]) and the load
//! balancer's side of a pod ([`datapath`]). The binary (`main.rs`) runs the commands.
pub mod datapath;
pub mod delegate;
pub mod ipam;
pub mod pod;
pub mod spec;
