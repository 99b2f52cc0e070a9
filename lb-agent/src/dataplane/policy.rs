//! The NetworkPolicy maps: address -> identity (`LB4_IPCACHE_V1`, `LB6_IPCACHE_V1`), this
//! node's selected pods (`LB4_POLEP_V1`, `LB6_POLEP_V1`) and allow rules (`LB_POLICY_V1`, a
//! port range written as the prefixes of an LPM key). The `policy` crate computes what they
//! hold; this writes it.
use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapData};
use lb_common::*;

use super::maps::{open_pinned, Family};

/// One allow rule as the datapath keys it. `protocol` 0 is any protocol; `ports` `None`
/// every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowRule {
    pub endpoint: u32,
    pub direction: u8,
    pub identity: u32,
    pub protocol: u8,
    pub ports: Option<(u16, u16)>,
}

impl AllowRule {
    /// The LPM keys that together match exactly this rule's traffic.
    pub fn keys(&self) -> Vec<Key<PolicyKeyV1>> {
        let base = PolicyKeyV1 { endpoint: self.endpoint, identity: self.identity, direction: self.direction, protocol: self.protocol, port: [0; 2] };
        match (self.protocol, self.ports) {
            (0, _) => vec![Key::new(POLICY_PREFIX_FIXED, base)],
            (_, None) => vec![Key::new(POLICY_PREFIX_FIXED + 8, base)],
            (_, Some((lo, hi))) => ::policy::port_prefixes(lo, hi).into_iter().map(|(port, bits)| Key::new(POLICY_PREFIX_FIXED + 8 + bits as u32, PolicyKeyV1 { port: port.to_be_bytes(), ..base })).collect(),
        }
    }
}

pub struct PolicyMaps {
    ipcache4: LpmTrie<MapData, IpCache4KeyV1, IdentityV1>,
    ipcache6: LpmTrie<MapData, IpCache6KeyV1, IdentityV1>,
    endpoints4: HashMap<MapData, PolicyEndpoint4KeyV1, PolicyEndpointV1>,
    endpoints6: HashMap<MapData, PolicyEndpoint6KeyV1, PolicyEndpointV1>,
    rules: LpmTrie<MapData, PolicyKeyV1, PolicyVerdictV1>,
}

impl PolicyMaps {
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            ipcache4: open_pinned(pin_dir, MAP_IPCACHE)?,
            ipcache6: open_pinned(pin_dir, MAP_IPCACHE6)?,
            endpoints4: open_pinned(pin_dir, MAP_POLICY_ENDPOINTS)?,
            endpoints6: open_pinned(pin_dir, MAP_POLICY_ENDPOINTS6)?,
            rules: open_pinned(pin_dir, MAP_POLICY)?,
        })
    }

    /// `addr/len` has identity `id` (the longest prefix holding an address wins).
    pub fn set_identity(&mut self, addr: IpAddr, len: u8, id: u32) -> Result<()> {
        let value = IdentityV1 { id };
        match addr {
            IpAddr::V4(_) => self.ipcache4.insert(&Key::new(len as u32, IpCacheKeyV1 { addr: Addr4::from_ip(addr).expect("IPv4") }), &value, 0),
            IpAddr::V6(_) => self.ipcache6.insert(&Key::new(len as u32, IpCacheKeyV1 { addr: Addr6::from_ip(addr).expect("IPv6") }), &value, 0),
        }
        .with_context(|| format!("writing the identity of {addr}/{len}"))
    }

    pub fn set_endpoint(&mut self, addr: IpAddr, entry: PolicyEndpointV1) -> Result<()> {
        match addr {
            IpAddr::V4(_) => self.endpoints4.insert(&PolicyEndpointKeyV1 { addr: Addr4::from_ip(addr).expect("IPv4") }, &entry, 0),
            IpAddr::V6(_) => self.endpoints6.insert(&PolicyEndpointKeyV1 { addr: Addr6::from_ip(addr).expect("IPv6") }, &entry, 0),
        }
        .with_context(|| format!("writing the policy endpoint {addr}"))
    }

    pub fn allow(&mut self, rule: &AllowRule, policy: u32) -> Result<()> {
        for key in rule.keys() {
            self.rules.insert(&key, &PolicyVerdictV1 { policy }, 0).with_context(|| format!("writing the rule {rule:?}"))?;
        }
        Ok(())
    }

    pub fn forget(&mut self, rule: &AllowRule) -> Result<()> {
        for key in rule.keys() {
            // Gone already is what was wanted.
            let _ = self.rules.remove(&key);
        }
        Ok(())
    }
}
