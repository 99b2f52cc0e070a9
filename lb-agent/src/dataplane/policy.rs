//! The NetworkPolicy maps: address -> identity (`LB4_IPHOST_V1` for single addresses,
//! `LB4_IPCACHE_V1` for prefixes, and their IPv6 twins), this
//! node's selected pods (`LB4_POLEP_V1`, `LB6_POLEP_V1`) and allow rules (`LB_POLICY_V1`, a
//! port range written as the prefixes of an LPM key). The `policy` crate computes what they
//! hold; this writes it.
use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, MapData};
use lb_common::*;

use super::{
    batch,
    maps::{open_pinned, Family},
};

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
    hosts4: HashMap<MapData, IpCache4KeyV1, IdentityV1>,
    hosts6: HashMap<MapData, IpCache6KeyV1, IdentityV1>,
    exact: HashMap<MapData, PolicyKeyV1, PolicyVerdictV1>,
    endpoints4: HashMap<MapData, PolicyEndpoint4KeyV1, PolicyEndpointV1>,
    endpoints6: HashMap<MapData, PolicyEndpoint6KeyV1, PolicyEndpointV1>,
    rules: LpmTrie<MapData, PolicyKeyV1, PolicyVerdictV1>,
    flows4: HashMap<MapData, Ct4KeyV1, u8>,
    flows6: HashMap<MapData, Ct6KeyV1, u8>,
    allowed: Array<MapData, PolicyCounterV1>,
    denied: Array<MapData, PolicyCounterV1>,
}

/// A flow the datapath remembers as allowed: (source, destination, protocol, destination port).
pub type PolicyFlow = (IpAddr, IpAddr, u8, u16);

impl PolicyMaps {
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            ipcache4: open_pinned(pin_dir, MAP_IPCACHE)?,
            ipcache6: open_pinned(pin_dir, MAP_IPCACHE6)?,
            hosts4: open_pinned(pin_dir, MAP_IPCACHE_HOSTS)?,
            hosts6: open_pinned(pin_dir, MAP_IPCACHE_HOSTS6)?,
            exact: open_pinned(pin_dir, MAP_POLICY_EXACT)?,
            endpoints4: open_pinned(pin_dir, MAP_POLICY_ENDPOINTS)?,
            endpoints6: open_pinned(pin_dir, MAP_POLICY_ENDPOINTS6)?,
            rules: open_pinned(pin_dir, MAP_POLICY)?,
            flows4: open_pinned(pin_dir, MAP_POLICY_FLOWS)?,
            flows6: open_pinned(pin_dir, MAP_POLICY_FLOWS6)?,
            allowed: open_pinned(pin_dir, MAP_POLICY_STATS)?,
            denied: open_pinned(pin_dir, MAP_POLICY_DENIED)?,
        })
    }

    /// What an earlier agent wrote: identities by prefix, endpoints, and rule keys with the
    /// policy of each (so that a restart rewrites only what changed).
    pub fn read_back(&self) -> (Vec<(IpAddr, u8, u32)>, Vec<(IpAddr, PolicyEndpointV1)>, Vec<(Key<PolicyKeyV1>, u32)>) {
        let mut ids: Vec<(IpAddr, u8, u32)> = self.ipcache4.iter().flatten().map(|(k, v)| (k.data().addr.to_ip(), k.prefix_len() as u8, v.id)).collect();
        ids.extend(self.ipcache6.iter().flatten().map(|(k, v)| (k.data().addr.to_ip(), k.prefix_len() as u8, v.id)));
        ids.extend(self.hosts4.iter().flatten().map(|(k, v)| (k.addr.to_ip(), 32, v.id)));
        ids.extend(self.hosts6.iter().flatten().map(|(k, v)| (k.addr.to_ip(), 128, v.id)));
        let mut endpoints: Vec<(IpAddr, PolicyEndpointV1)> = self.endpoints4.iter().flatten().map(|(k, v)| (k.addr.to_ip(), v)).collect();
        endpoints.extend(self.endpoints6.iter().flatten().map(|(k, v)| (k.addr.to_ip(), v)));
        let mut rules: Vec<(Key<PolicyKeyV1>, u32)> = self.rules.iter().flatten().map(|(k, v)| (k, v.policy)).collect();
        rules.extend(self.exact.iter().flatten().map(|(k, v)| (Key::new(POLICY_PREFIX_FULL, k), v.policy)));
        (ids, endpoints, rules)
    }

    pub fn remove_identity(&mut self, addr: IpAddr, len: u8) {
        // Gone already is what was wanted.
        let _ = match addr {
            IpAddr::V4(_) if len == 32 => self.hosts4.remove(&IpCacheKeyV1 { addr: Addr4::from_ip(addr).expect("IPv4") }),
            IpAddr::V6(_) if len == 128 => self.hosts6.remove(&IpCacheKeyV1 { addr: Addr6::from_ip(addr).expect("IPv6") }),
            IpAddr::V4(_) => self.ipcache4.remove(&Key::new(len as u32, IpCacheKeyV1 { addr: Addr4::from_ip(addr).expect("IPv4") })),
            IpAddr::V6(_) => self.ipcache6.remove(&Key::new(len as u32, IpCacheKeyV1 { addr: Addr6::from_ip(addr).expect("IPv6") })),
        };
    }

    pub fn remove_endpoint(&mut self, addr: IpAddr) {
        let _ = match addr {
            IpAddr::V4(_) => self.endpoints4.remove(&PolicyEndpointKeyV1 { addr: Addr4::from_ip(addr).expect("IPv4") }),
            IpAddr::V6(_) => self.endpoints6.remove(&PolicyEndpointKeyV1 { addr: Addr6::from_ip(addr).expect("IPv6") }),
        };
    }

    pub fn remove_key(&mut self, key: &Key<PolicyKeyV1>) {
        let _ = if key.prefix_len() == POLICY_PREFIX_FULL { self.exact.remove(&key.data()) } else { self.rules.remove(key) };
    }

    /// The flows the datapath remembers as allowed, both families.
    pub fn flows(&self) -> Result<Vec<PolicyFlow>> {
        let mut flows: Vec<PolicyFlow> = remembered(&self.flows4, MAP_POLICY_FLOWS)?.iter().map(flow_of).collect();
        flows.extend(remembered(&self.flows6, MAP_POLICY_FLOWS6)?.iter().map(flow_of));
        Ok(flows)
    }

    /// Forgets remembered flows whose (source, destination, protocol, destination port) is in
    /// `flows`: their next packet is judged again. Returns how many were forgotten.
    pub fn forget_flows(&mut self, flows: &std::collections::HashSet<PolicyFlow>) -> Result<usize> {
        fn of<A: Family>(map: &HashMap<MapData, CtKeyV1<A>, u8>, name: &str, flows: &std::collections::HashSet<PolicyFlow>) -> Result<usize> {
            let gone: Vec<CtKeyV1<A>> = remembered(map, name)?.into_iter().filter(|k| flows.contains(&flow_of(k))).collect();
            batch::delete(map.map(), &gone).with_context(|| format!("pruning {name}"))?;
            Ok(gone.len())
        }
        Ok(of(&self.flows4, MAP_POLICY_FLOWS, flows)? + of(&self.flows6, MAP_POLICY_FLOWS6, flows)?)
    }

    /// New flows policy `id` allowed.
    pub fn allowed(&self, id: u32) -> u64 {
        self.allowed.get(&id, 0).map_or(0, |c| c.count)
    }

    /// Packets endpoint `id`'s policy denied in `direction`.
    pub fn denied(&self, endpoint: u32, direction: u8) -> u64 {
        self.denied.get(&denied_slot(endpoint, direction), 0).map_or(0, |c| c.count)
    }

    /// Starts the counters of a newly given policy or endpoint id at zero.
    pub fn zero_counters(&mut self, policy: Option<u32>, endpoint: Option<u32>) -> Result<()> {
        if let Some(id) = policy {
            self.allowed.set(id, &PolicyCounterV1::default(), 0).with_context(|| format!("zeroing {MAP_POLICY_STATS}[{id}]"))?;
        }
        if let Some(id) = endpoint {
            for direction in [POLICY_INGRESS, POLICY_EGRESS] {
                self.denied.set(denied_slot(id, direction), &PolicyCounterV1::default(), 0).with_context(|| format!("zeroing {MAP_POLICY_DENIED}"))?;
            }
        }
        Ok(())
    }

    /// `addr/len` has identity `id` (its own entry for a single address; else the longest
    /// prefix holding an address wins).
    pub fn set_identity(&mut self, addr: IpAddr, len: u8, id: u32) -> Result<()> {
        let value = IdentityV1 { id };
        match addr {
            IpAddr::V4(_) if len == 32 => self.hosts4.insert(&IpCacheKeyV1 { addr: Addr4::from_ip(addr).expect("IPv4") }, &value, 0),
            IpAddr::V6(_) if len == 128 => self.hosts6.insert(&IpCacheKeyV1 { addr: Addr6::from_ip(addr).expect("IPv6") }, &value, 0),
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
            self.insert_key(&key, policy).with_context(|| format!("writing the rule {rule:?}"))?;
        }
        Ok(())
    }

    /// Writes one key of a rule, naming `policy`: a key that fixes every bit goes to the
    /// hash the datapath looks in first.
    pub fn insert_key(&mut self, key: &Key<PolicyKeyV1>, policy: u32) -> Result<()> {
        let (d, value) = (key.data(), PolicyVerdictV1 { policy });
        if key.prefix_len() == POLICY_PREFIX_FULL { self.exact.insert(&d, &value, 0) } else { self.rules.insert(key, &value, 0) }.with_context(|| format!("writing the rule key {d:?}/{}", key.prefix_len()))
    }

    pub fn forget(&mut self, rule: &AllowRule) -> Result<()> {
        for key in rule.keys() {
            self.remove_key(&key);
        }
        Ok(())
    }
}

/// The keys of a policy flow table, read in batches.
fn remembered<A: Family>(map: &HashMap<MapData, CtKeyV1<A>, u8>, name: &str) -> Result<Vec<CtKeyV1<A>>> {
    let entries: Vec<(CtKeyV1<A>, u8)> = batch::lookup_all(map.map()).with_context(|| format!("reading {name}"))?;
    Ok(entries.into_iter().map(|(k, _)| k).collect())
}

fn flow_of<A: Family>(k: &CtKeyV1<A>) -> PolicyFlow {
    (k.src_addr.to_ip(), k.dst_addr.to_ip(), k.proto, u16::from_be(k.dst_port))
}
