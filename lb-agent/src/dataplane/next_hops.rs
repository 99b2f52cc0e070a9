//! Keeps the datapath's next-hop cache honest: every neighbour, route, address or link change
//! the kernel announces bumps the generation (`LB_NHGEN_V1`), and cached next hops of an
//! older one are looked up in the FIB again. While the agent is down the cache still ages out
//! (`NEXT_HOP_TTL_NS`).
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use lb_common::*;
use log::warn;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::maps::open_pinned;

/// rtnetlink multicast groups (linux/rtnetlink.h): links, neighbours, IPv4 and IPv6
/// addresses and routes.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

/// The pinned generation.
pub struct Generation(Array<MapData, u32>);

impl Generation {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self(open_pinned(pin_dir, MAP_NEXT_HOP_GENERATION)?))
    }

    pub fn get(&self) -> Result<u32> {
        self.0.get(&0, 0).with_context(|| format!("reading {MAP_NEXT_HOP_GENERATION}"))
    }

    /// Every cached next hop is stale from now on.
    pub fn bump(&mut self) -> Result<()> {
        let next = self.get()?.wrapping_add(1);
        self.0.set(0, &next, 0).with_context(|| format!("writing {MAP_NEXT_HOP_GENERATION}"))
    }
}

/// Subscribes to the kernel's routing changes (in this network namespace) and, on a thread
/// of its own, bumps the generation after each batch of them. Subscribed before it returns,
/// so no change made after this call is missed.
pub fn watch(pin_dir: &Path) -> Result<()> {
    let mut generation = Generation::open(pin_dir)?;
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
    socket.bind(&SocketAddr::new(0, groups)).context("subscribing to neighbour, route, address and link changes")?;
    // What was cached before the subscription may already be stale.
    generation.bump()?;
    std::thread::Builder::new().name("next-hop-changes".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match socket.recv(&mut &mut buf[..], 0) {
                // Messages were lost (ENOBUFS): some change among them, so stale all the same.
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) => {
                    warn!("routing changes: {e}; cached next hops now only age out (1 s)");
                    return;
                }
            }
            if let Err(e) = generation.bump() {
                warn!("{e:#}");
            }
        }
    })?;
    Ok(())
}
