//! The endpoint maps (`LB4_EP_V1`, `LB6_EP_V1`): lb-cni writes one entry per pod it wires,
//! `lbctl endpoint list` reads them. Opened from their pins, so no agent needs to run.
use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use lb_common::*;

use super::maps::{open_pinned, Family};

pub struct Endpoints {
    v4: HashMap<MapData, Endpoint4KeyV1, EndpointV1>,
    v6: HashMap<MapData, Endpoint6KeyV1, EndpointV1>,
}

fn entries<A: Family>(map: &HashMap<MapData, EndpointKeyV1<A>, EndpointV1>) -> Vec<(IpAddr, EndpointV1)> {
    map.iter().filter_map(Result::ok).map(|(k, v)| (k.addr.to_ip(), v)).collect()
}

/// Deletes the entries whose attachment `keep` refuses; returns them.
fn retain_in<A: Family>(map: &mut HashMap<MapData, EndpointKeyV1<A>, EndpointV1>, keep: impl Fn(u64) -> bool) -> Vec<(IpAddr, EndpointV1)> {
    let stale: Vec<(EndpointKeyV1<A>, EndpointV1)> = map.iter().filter_map(Result::ok).filter(|(_, v)| !keep(v.attachment)).collect();
    for (key, _) in &stale {
        // Gone already (a DEL racing a GC) is what was wanted.
        let _ = map.remove(key);
    }
    stale.into_iter().map(|(k, v)| (k.addr.to_ip(), v)).collect()
}

impl Endpoints {
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Ok(Self { v4: open_pinned(pin_dir, MAP_ENDPOINTS)?, v6: open_pinned(pin_dir, MAP_ENDPOINTS6)? })
    }

    pub fn insert(&mut self, ip: IpAddr, entry: &EndpointV1) -> Result<()> {
        match ip {
            IpAddr::V4(_) => self.v4.insert(&EndpointKeyV1 { addr: Addr4::from_ip(ip).expect("IPv4") }, entry, 0),
            IpAddr::V6(_) => self.v6.insert(&EndpointKeyV1 { addr: Addr6::from_ip(ip).expect("IPv6") }, entry, 0),
        }
        .with_context(|| format!("writing the endpoint {ip}"))
    }

    pub fn get(&self, ip: IpAddr) -> Option<EndpointV1> {
        match ip {
            IpAddr::V4(_) => self.v4.get(&EndpointKeyV1 { addr: Addr4::from_ip(ip)? }, 0).ok(),
            IpAddr::V6(_) => self.v6.get(&EndpointKeyV1 { addr: Addr6::from_ip(ip)? }, 0).ok(),
        }
    }

    /// Every endpoint of both families.
    pub fn list(&self) -> Vec<(IpAddr, EndpointV1)> {
        let mut all = entries(&self.v4);
        all.extend(entries(&self.v6));
        all.sort_by_key(|(ip, _)| *ip);
        all
    }

    /// Deletes the endpoints whose attachment `keep` refuses; returns them.
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) -> Vec<(IpAddr, EndpointV1)> {
        let mut gone = retain_in(&mut self.v4, &keep);
        gone.extend(retain_in(&mut self.v6, &keep));
        gone
    }
}
