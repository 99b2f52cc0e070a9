//! The NetworkPolicy maps: address -> identity (`LB4_IPHOST_V1` for single addresses,
//! `LB4_IPCACHE_V1` for prefixes, and their IPv6 twins), this
//! node's selected pods (`LB4_POLEP_V1`, `LB6_POLEP_V1`) and allow rules (`LB_POLICY_V1`, a
//! port range written as the prefixes of an LPM key). The `policy` crate computes what they
//! hold; this writes it.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

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

/// How a pod's policy check judges a new packet (`PolicyMaps::judge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// No policy isolates the pod in this direction.
    Open,
    /// A flow this check passed before, or the reply to one the pod's other check passed.
    Remembered,
    /// The peer is the node itself.
    Node,
    /// A rule of policy number `policy` allows it: one for the peer's identity, or for any peer.
    Allowed { policy: u32, any_peer: bool },
    /// No rule allows it: dropped (`drop_policy`). `identity` is the peer's.
    Denied { identity: u32 },
}

impl PolicyMaps {
    /// Judges `src` -> `dst` as the kernel's `policy::check` does, from the live maps: the
    /// policy of the pod at `src` (`POLICY_EGRESS`) or at `dst` (`POLICY_INGRESS`).
    pub fn judge(&self, src: SocketAddr, dst: SocketAddr, proto: u8, direction: u8) -> Judgement {
        let (local, peer, isolated) = match direction {
            POLICY_EGRESS => (src.ip(), dst.ip(), POLICY_EGRESS_ISOLATED),
            _ => (dst.ip(), src.ip(), POLICY_INGRESS_ISOLATED),
        };
        let Some(ep) = self.endpoint(local) else { return Judgement::Open };
        if self.flow_bits(src, dst, proto) & flow_bit(direction) != 0 || self.flow_bits(dst, src, proto) & flow_bit(direction ^ 1) != 0 {
            return Judgement::Remembered;
        }
        if ep.flags & isolated == 0 {
            return Judgement::Open;
        }
        let identity = self.identity(peer);
        if identity == IDENTITY_HOST {
            return Judgement::Node;
        }
        let mut key = PolicyKeyV1 { endpoint: ep.endpoint, identity, direction, protocol: proto, port: port_raw(dst.port()).to_ne_bytes() };
        if let Some(policy) = self.rule(&key) {
            return Judgement::Allowed { policy, any_peer: false };
        }
        key.identity = IDENTITY_ANY;
        match self.rule(&key) {
            Some(policy) => Judgement::Allowed { policy, any_peer: true },
            None => Judgement::Denied { identity },
        }
    }

    fn endpoint(&self, addr: IpAddr) -> Option<PolicyEndpointV1> {
        match addr {
            IpAddr::V4(_) => self.endpoints4.get(&PolicyEndpointKeyV1 { addr: Addr4::from_ip(addr)? }, 0).ok(),
            IpAddr::V6(_) => self.endpoints6.get(&PolicyEndpointKeyV1 { addr: Addr6::from_ip(addr)? }, 0).ok(),
        }
    }

    /// The address's own identity, else the longest prefix's, else the world.
    fn identity(&self, addr: IpAddr) -> u32 {
        let id = match addr {
            IpAddr::V4(_) => {
                let key = IpCacheKeyV1 { addr: Addr4::from_ip(addr).expect("IPv4") };
                self.hosts4.get(&key, 0).or_else(|_| self.ipcache4.get(&Key::new(32, key), 0))
            }
            IpAddr::V6(_) => {
                let key = IpCacheKeyV1 { addr: Addr6::from_ip(addr).expect("IPv6") };
                self.hosts6.get(&key, 0).or_else(|_| self.ipcache6.get(&Key::new(128, key), 0))
            }
        };
        id.map_or(IDENTITY_WORLD, |i| i.id)
    }

    /// The policy of the rule `key` matches: a full-bit one first, as the kernel looks.
    fn rule(&self, key: &PolicyKeyV1) -> Option<u32> {
        self.exact.get(key, 0).or_else(|_| self.rules.get(&Key::new(POLICY_PREFIX_FULL, *key), 0)).ok().map(|v| v.policy)
    }

    /// The checks that passed flow `src` -> `dst` (`flow_bit`s), 0 when it is not remembered.
    fn flow_bits(&self, src: SocketAddr, dst: SocketAddr, proto: u8) -> u8 {
        fn key<A: Family>(src: SocketAddr, dst: SocketAddr, proto: u8) -> Option<CtKeyV1<A>> {
            Some(CtKeyV1 { src_addr: A::from_ip(src.ip())?, dst_addr: A::from_ip(dst.ip())?, src_port: port_raw(src.port()), dst_port: port_raw(dst.port()), proto, _pad: [0; 3] })
        }
        let bits = match src.ip() {
            IpAddr::V4(_) => key::<Addr4>(src, dst, proto).and_then(|k| self.flows4.get(&k, 0).ok()),
            IpAddr::V6(_) => key::<Addr6>(src, dst, proto).and_then(|k| self.flows6.get(&k, 0).ok()),
        };
        bits.unwrap_or(0)
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
