//! Dev-only test bed: network-namespace topologies with real servers, the agent as a process,
//! private bpffs mounts, the prog-test-run harness and the standalone demo. A dependency of the
//! tests, the benchmarks and `lb-demo`; never of the daemon.
//!
//! - [`apiserver`]: a stand-in for kube-apiserver's list/watch protocol;
//! - [`netns`]: namespaces and running code in them;
//! - [`topology`]: a LAN, nodes and pods made of namespaces and veths;
//! - [`servers`]: echo and HTTP servers in pods, and their clients;
//! - [`process`]: lb-agent as a child process;
//! - [`bpffs`]: private bpffs mounts;
//! - [`cni`]: a CNI plugin run as a container runtime runs it;
//! - [`progtest`]: the kernel programs loaded for BPF_PROG_TEST_RUN;
//! - [`demo`]: the example topology and the standalone demo.
pub mod apiserver;
pub mod bpffs;
pub mod cni;
pub mod demo;
pub mod netns;
pub mod process;
pub mod progtest;
pub mod servers;
pub mod topology;
