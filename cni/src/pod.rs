//! The pod's wiring, over rtnetlink: a veth whose host side is `lxc<hash>` and whose pod side
//! is `CNI_IFNAME` in the pod's namespace; the pod's address as a /32 with the link-local
//! gateway (169.254.1.1: the host side's address, and a permanent neighbour in the pod), the
//! default route through it; on the host a /32 route and a permanent neighbour for the pod.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::stream::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
    neighbour::NeighbourState,
    route::{RouteAddress, RouteAttribute, RouteScope},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::spec::Attachment;

/// The pod's gateway: link-local, so it is the same on every node and never a pod's address.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What netlink says of one link.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub up: bool,
    pub mtu: u32,
    pub alias: Option<String>,
}

impl Link {
    fn of(msg: &LinkMessage) -> Self {
        let mut link = Link { index: msg.header.index, name: String::new(), mac: [0; 6], up: msg.header.flags.contains(LinkFlags::Up), mtu: 0, alias: None };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => link.mac.copy_from_slice(a),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                _ => {}
            }
        }
        link
    }

    pub fn mac_text(&self) -> String {
        lb_agent::node::mac_text(&self.mac)
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| c.get() == -errno))
}

/// A netlink socket of this namespace.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink socket of the namespace `netns`: opened while this thread is in it (a socket
/// keeps the namespace it was made in), then the thread goes back.
pub fn connect_in(netns: &File) -> Result<Handle> {
    let own = File::open("/proc/thread-self/ns/net").context("opening this thread's network namespace")?;
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("entering the pod's network namespace: {}", std::io::Error::last_os_error());
    }
    let handle = connect();
    // Staying in the pod's namespace would wire the host side inside it: never go on.
    assert!(unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } == 0, "returning to the host's network namespace: {}", std::io::Error::last_os_error());
    handle
}

/// Opens a namespace path; `Ok(None)` when it does not exist.
pub fn open_netns(path: &Path) -> std::io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub async fn link(handle: &Handle, name: &str) -> Result<Option<Link>> {
    match handle.link().get().match_name(name).execute().try_next().await {
        Ok(msg) => Ok(msg.as_ref().map(Link::of)),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("looking up link {name}"))),
    }
}

pub async fn links(handle: &Handle) -> Result<Vec<Link>> {
    let mut out = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.context("listing links")? {
        out.push(Link::of(&msg));
    }
    Ok(out)
}

/// Both ends of a wired pod.
pub struct Wired {
    pub host: Link,
    pub pod: Link,
}

/// Creates the veth (the pod side made straight in the pod's namespace) and configures
/// both ends. On an error the caller removes the host side, which takes the pair with it.
pub async fn wire(host: &Handle, pod: &Handle, netns: &File, attachment: &Attachment, ip: Ipv4Addr, mtu: Option<u32>) -> Result<Wired> {
    let host_name = attachment.host_device();
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(attachment.ifname.clone()).setns_by_fd(netns.as_raw_fd());
    let mut veth = LinkVeth::new(&host_name, &attachment.ifname);
    if let Some(mtu) = mtu {
        peer = peer.mtu(mtu);
        veth = veth.mtu(mtu);
    }
    let veth = veth.set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build()))).build();
    host.link().add(veth).execute().await.with_context(|| format!("creating veth {host_name} (pod side {})", attachment.ifname))?;
    let host_link = link(host, &host_name).await?.with_context(|| format!("{host_name} vanished after it was made"))?;
    // The alias says whose device this is: GC finds stale devices by it.
    host.link().set(LinkUnspec::new_with_index(host_link.index).alias(attachment.alias()).up().build()).execute().await.with_context(|| format!("setting {host_name} up"))?;
    // The gateway is the host side's own address (as ptp does), so the pod reaches the node at it.
    host.address().add(host_link.index, IpAddr::V4(GATEWAY), 32).execute().await.with_context(|| format!("adding {GATEWAY}/32 to {host_name}"))?;
    let pod_link = link(pod, &attachment.ifname).await?.with_context(|| format!("{} is not in the pod's namespace", attachment.ifname))?;
    let i = pod_link.index;
    pod.link().set(LinkUnspec::new_with_index(i).up().build()).execute().await.context("setting the pod's interface up")?;
    pod.address().add(i, IpAddr::V4(ip), 32).execute().await.with_context(|| format!("adding {ip}/32 in the pod"))?;
    let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(GATEWAY, 32).output_interface(i).scope(RouteScope::Link).build();
    pod.route().add(to_gateway).execute().await.context("adding the pod's route to its gateway")?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new().output_interface(i).gateway(GATEWAY).build();
    pod.route().add(default).execute().await.context("adding the pod's default route")?;
    // Nothing answers ARP for the gateway: the pod knows its MAC from the start.
    pod.neighbours().add(i, IpAddr::V4(GATEWAY)).link_layer_address(&host_link.mac).state(NeighbourState::Permanent).execute().await.context("adding the gateway's neighbour entry in the pod")?;
    let to_pod = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(ip, 32).output_interface(host_link.index).scope(RouteScope::Link).build();
    host.route().add(to_pod).execute().await.with_context(|| format!("adding the host route to {ip}"))?;
    host.neighbours().add(host_link.index, IpAddr::V4(ip)).link_layer_address(&pod_link.mac).state(NeighbourState::Permanent).execute().await.with_context(|| format!("adding the host's neighbour entry for {ip}"))?;
    let host_link = link(host, &host_name).await?.with_context(|| format!("{host_name} vanished"))?;
    Ok(Wired { host: host_link, pod: pod_link })
}

/// Deletes the host side (the pod side goes with it). Returns whether there was one.
pub async fn unwire(host: &Handle, attachment: &Attachment) -> Result<bool> {
    let name = attachment.host_device();
    let Some(link) = link(host, &name).await? else { return Ok(false) };
    match host.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
        Err(e) => Err(anyhow!(e).context(format!("deleting {name}"))),
    }
}

async fn ipv4_routes(handle: &Handle) -> Result<Vec<(Ipv4Addr, u8, Option<u32>, Option<Ipv4Addr>)>> {
    let mut out = Vec::new();
    let mut stream = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(msg) = stream.try_next().await.context("listing routes")? {
        let attr = |f: fn(&RouteAttribute) -> Option<Ipv4Addr>| msg.attributes.iter().find_map(f);
        let dst = attr(|a| if let RouteAttribute::Destination(RouteAddress::Inet(ip)) = a { Some(*ip) } else { None }).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let gw = attr(|a| if let RouteAttribute::Gateway(RouteAddress::Inet(ip)) = a { Some(*ip) } else { None });
        let oif = msg.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
        out.push((dst, msg.header.destination_prefix_length, oif, gw));
    }
    Ok(out)
}

/// CHECK: both ends exist and are up, the pod has its address and routes, the host its route.
pub async fn check(host: &Handle, pod: &Handle, attachment: &Attachment, ip: Ipv4Addr) -> Result<()> {
    let host_name = attachment.host_device();
    let host_link = link(host, &host_name).await?.with_context(|| format!("host interface {host_name} is missing"))?;
    let pod_link = link(pod, &attachment.ifname).await?.with_context(|| format!("interface {} is missing in the pod", attachment.ifname))?;
    if !host_link.up || !pod_link.up {
        bail!("{} is down", if host_link.up { &attachment.ifname } else { &host_name });
    }
    let mut addrs = pod.address().get().set_link_index_filter(pod_link.index).execute();
    let mut has_ip = false;
    while let Some(msg) = addrs.try_next().await.context("listing the pod's addresses")? {
        has_ip |= msg.header.prefix_len == 32 && msg.attributes.iter().any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(a)) if *a == ip));
    }
    if !has_ip {
        bail!("the pod's interface {} does not have {ip}/32", attachment.ifname);
    }
    let routes = ipv4_routes(pod).await?;
    if !routes.iter().any(|r| *r == (Ipv4Addr::UNSPECIFIED, 0, Some(pod_link.index), Some(GATEWAY))) {
        bail!("the pod has no default route via {GATEWAY}");
    }
    let routes = ipv4_routes(host).await?;
    if !routes.iter().any(|r| *r == (ip, 32, Some(host_link.index), None)) {
        bail!("the host has no route to {ip} through {host_name}");
    }
    Ok(())
}
