//! What the agent tells `lbctl status` (GET /status on the metrics address): who it is, where
//! its Services come from, what it attached where, when it last synced, and which Services it
//! rejects. Everything else `lbctl status` shows it reads from the maps itself.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub version: String,
    pub node: String,
    /// `standalone` or `kubernetes`.
    pub mode: String,
    /// The manifest directory, or the API server (`in-cluster` when from the environment).
    pub source: String,
    pub pin_dir: String,
    pub started_unix: u64,
    /// Whether the first full sync is done (the readiness probe says the same).
    pub synced: bool,
    /// Wall-clock seconds of the last sync that succeeded; 0 before the first.
    pub last_sync_unix: u64,
    /// Each program and what it is attached to (a device, or the cgroup of the socket hooks).
    pub attached: Vec<Attachment>,
    /// Services not (fully) programmed, with the reason: `namespace/name` -> why.
    pub rejected: BTreeMap<String, String>,
    /// Address pools: size and use.
    #[serde(default)]
    pub pools: Vec<PoolUse>,
    /// Pool addresses: Service, pool, the node that answers for each, since when.
    #[serde(default)]
    pub addresses: Vec<crate::announce::AddressState>,
    /// This node's pod ranges (its Node's `spec.podCIDRs`), which lb-cni allocates from.
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolUse {
    pub name: String,
    pub size: u64,
    pub used: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub program: String,
    pub target: String,
}

/// Shared between the agent loop, which writes it, and the HTTP server, which reads it.
pub type SharedStatus = Arc<Mutex<AgentStatus>>;

impl AgentStatus {
    pub fn attach(&mut self, program: &str, target: &str) {
        let a = Attachment { program: program.into(), target: target.into() };
        if let Err(at) = self.attached.binary_search(&a) {
            self.attached.insert(at, a);
        }
    }

    pub fn detach(&mut self, program: &str, target: &str) {
        self.attached.retain(|a| !(a.program == program && a.target == target));
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Asks the agent serving on `addr` (its `--metrics-addr`) for its status: GET /status.
pub fn fetch(addr: &str, timeout: std::time::Duration) -> anyhow::Result<AgentStatus> {
    use anyhow::Context;
    serde_json::from_str(&get(addr, "/status", timeout)?).context("not the status of an lb-agent")
}

/// The body of GET `path` from the agent serving on `addr`; an error unless it answers 200.
pub fn get(addr: &str, path: &str, timeout: std::time::Duration) -> anyhow::Result<String> {
    use anyhow::{bail, Context};
    use std::io::{Read, Write};
    let socket = std::net::ToSocketAddrs::to_socket_addrs(addr)?.next().with_context(|| format!("{addr} names no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}
