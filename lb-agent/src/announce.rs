//! L2 announcements of LoadBalancer addresses: which node answers ARP and NDP for each, and
//! the gratuitous ARP and unsolicited neighbour advertisements that move switches and
//! neighbours to it at once.
//!
//! No per-Service lock: every agent computes each address's owner the same way, by
//! rendezvous hashing over the nodes it sees alive (the heartbeat Leases in Kubernetes mode,
//! the Ready Node manifests in standalone mode), restricted for `externalTrafficPolicy: Local`
//! to nodes with a ready endpoint of the Service. A node that stops renewing its heartbeat
//! (partitioned, agent gone) leaves every agent's view at once, its owned addresses move to
//! their next-ranked node, and its own XDP stops answering when its entries expire (see
//! `L2AnnounceV1::expires_ns`).
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::csum::{fold, sum_words};

/// When gratuitous ARP / unsolicited NA go out after a node takes an address over: at once,
/// then twice more in case the first is lost.
pub const TAKEOVER_BURST: [Duration; 3] = [Duration::ZERO, Duration::from_millis(250), Duration::from_secs(1)];
/// Owned addresses are announced again this often, so that no switch's MAC table or
/// neighbour cache ages them out first (those age in minutes).
pub const REANNOUNCE_EVERY: Duration = Duration::from_secs(10);

/// The rank of `node` for `key`: the owner is the live candidate of highest rank. A stable
/// hash (FNV-1a, then the SplitMix64 finaliser): every agent, of every version, agrees.
pub fn rank(node: &str, key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.as_bytes().iter().chain(&[0xff]).chain(key) {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The owner of `key` among `candidates`: the highest rank (ties: the smaller name).
pub fn owner_of_key<'a>(key: &[u8], candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates.into_iter().max_by(|a, b| rank(a, key).cmp(&rank(b, key)).then_with(|| b.cmp(a)))
}

/// The owner of address `addr` among `candidates`.
pub fn owner<'a>(addr: IpAddr, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let octets = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    owner_of_key(&octets, candidates)
}

/// Which nodes may announce, as this agent sees them now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub live: BTreeSet<String>,
    /// CLOCK_MONOTONIC ns until which this node may answer: no later than the others stop
    /// counting it alive. Zero: it may not.
    pub answer_until_ns: u64,
}

/// An announced address, as `lbctl` and the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AddressState {
    pub address: IpAddr,
    pub service: String,
    pub pool: String,
    /// The node that answers for it; empty when no node may.
    pub owner: String,
    /// Unix seconds since the owner has had it.
    pub since_unix: u64,
}

/// An external device: where addresses are answered for and announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub ifindex: u32,
    pub name: String,
    pub mac: [u8; 6],
}

impl Device {
    /// The device named `name`, with its MAC (from sysfs).
    pub fn read(name: &str, ifindex: u32) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))?;
        let mut mac = [0u8; 6];
        let parts: Vec<u8> = text.trim().split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>()?;
        anyhow::ensure!(parts.len() == 6, "{name} has no Ethernet address ({})", text.trim());
        mac.copy_from_slice(&parts);
        Ok(Self { ifindex, name: name.to_string(), mac })
    }
}

/// An ARP request from `mac`/`sender`: who has `target`?
pub fn arp_request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    [&[0xff; 6][..], &mac, &[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1], &mac, &sender.octets(), &[0; 6], &target.octets()].concat()
}

/// Gratuitous ARP (a request for the address, from it) or an unsolicited neighbour
/// advertisement (to all nodes, override set), from `mac`.
pub fn announcement(mac: [u8; 6], addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => arp_request(mac, a, a),
        IpAddr::V6(a) => {
            let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
            // Type 136, override; the target; its link-layer address option.
            let mut icmp = [0u8; 32];
            icmp[0] = 136;
            icmp[4] = 0x20;
            icmp[8..24].copy_from_slice(&a.octets());
            icmp[24..26].copy_from_slice(&[2, 1]);
            icmp[26..].copy_from_slice(&mac);
            // The pseudo-header: addresses, upper-layer length (32), next header (58).
            let sum = sum_words(&a.octets()) + sum_words(&all_nodes) + sum_words(&[0, 0, 0, 32, 0, 0, 0, 58]) + sum_words(&icmp);
            icmp[2..4].copy_from_slice(&(!fold(sum)).to_ne_bytes());
            [&[0x33, 0x33, 0, 0, 0, 1][..], &mac, &[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, 58, 255], &a.octets(), &all_nodes, &icmp].concat()
        }
    }
}

/// A packet socket that only sends (protocol 0: it receives nothing).
#[derive(Clone)]
pub struct Sender(Arc<OwnedFd>);

impl Sender {
    pub fn new() -> io::Result<Self> {
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Sends one Ethernet frame out of `ifindex`.
    pub fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = unsafe { libc::sendto(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0, (&raw const to).cast(), size_of::<libc::sockaddr_ll>() as u32) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Announces `addr` on every device, now and later in the takeover burst (a task of its own).
    pub fn takeover_burst(&self, devices: &[Device], addr: IpAddr) {
        let (sender, devices) = (self.clone(), devices.to_vec());
        tokio::spawn(async move {
            let mut waited = Duration::ZERO;
            for at in TAKEOVER_BURST {
                tokio::time::sleep(at - waited).await;
                waited = at;
                for d in &devices {
                    if let Err(e) = sender.send(d.ifindex, &announcement(d.mac, addr)) {
                        log::warn!("announcing {addr} on {}: {e}", d.name);
                    }
                }
            }
        });
    }
}

/// What this node announces, and since when.
#[derive(Default)]
pub struct Announcements {
    /// (address, Service) -> pool, owner, since. (Services with a sharing key share addresses.)
    pub states: BTreeMap<(IpAddr, String), AddressState>,
    pub last_reannounce: Option<Instant>,
    /// The addresses last written to the answer maps, and their expiry.
    pub written: Option<(Vec<IpAddr>, u64)>,
    /// Ownership changes seen (any node's), for the metrics.
    pub changes: u64,
}

impl Announcements {
    /// Records the owners just computed; returns the addresses this node newly owns.
    pub fn update(&mut self, node: &str, now: Vec<AddressState>) -> Vec<IpAddr> {
        let mut taken_over = Vec::new();
        let mut states = BTreeMap::new();
        for mut state in now {
            let key = (state.address, state.service.clone());
            match self.states.get(&key) {
                Some(before) if before.owner == state.owner => state.since_unix = before.since_unix,
                before => {
                    if before.is_some() || !state.owner.is_empty() {
                        self.changes += 1;
                    }
                    if state.owner == node && !taken_over.contains(&state.address) {
                        taken_over.push(state.address);
                    }
                }
            }
            states.insert(key, state);
        }
        self.states = states;
        taken_over
    }

    /// The addresses this node owns.
    pub fn owned_by(&self, node: &str) -> BTreeSet<IpAddr> {
        self.states.values().filter(|s| s.owner == node).map(|s| s.address).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_and_move_only_when_their_node_leaves() {
        let nodes = ["node-a", "node-b", "node-c"];
        let addrs: Vec<IpAddr> = (1..=300u32).map(|i| IpAddr::V4(Ipv4Addr::from(0x0a63_0000 + i))).collect();
        let owners: Vec<&str> = addrs.iter().map(|a| owner(*a, nodes).unwrap()).collect();
        for n in nodes {
            let count = owners.iter().filter(|o| **o == n).count();
            assert!((70..=130).contains(&count), "{n} owns {count} of 300");
        }
        // node-b leaves: only its addresses move.
        for (a, before) in addrs.iter().zip(&owners) {
            let after = owner(*a, ["node-a", "node-c"]).unwrap();
            if *before != "node-b" {
                assert_eq!(after, *before);
            }
        }
        assert_eq!(owner(addrs[0], []), None);
    }

    #[test]
    fn announcement_frames() {
        let mac = [2, 0, 0, 0, 0, 9];
        let garp = announcement(mac, "10.99.0.200".parse().unwrap());
        let arp = etherparse::SlicedPacket::from_ethernet(&garp).unwrap();
        let Some(etherparse::NetSlice::Arp(arp)) = arp.net else { panic!("not ARP") };
        assert_eq!((arp.operation(), arp.sender_hw_addr(), arp.sender_protocol_addr(), arp.target_protocol_addr()), (etherparse::ArpOperation::REQUEST, &mac[..], &[10, 99, 0, 200][..], &[10, 99, 0, 200][..]));
        let na = announcement(mac, "fd00:99::200".parse().unwrap());
        let ip = etherparse::Ipv6Slice::from_slice(&na[14..]).unwrap();
        assert_eq!(ip.header().destination_addr(), "ff02::1".parse::<Ipv6Addr>().unwrap());
        let icmp = etherparse::Icmpv6Slice::from_slice(ip.payload().payload).unwrap();
        assert_eq!(icmp.type_u8(), 136);
        let expected = icmp.icmp_type().calc_checksum(ip.header().source(), ip.header().destination(), icmp.payload()).unwrap();
        assert_eq!(icmp.checksum(), expected);
    }
}
