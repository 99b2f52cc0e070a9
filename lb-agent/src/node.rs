//! What the agent learns about this node from rtnetlink: its links, its IPv4 addresses, and
//! which links lead to pods.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Context, Result};
use futures_util::stream::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::LinkAttribute,
    route::{RouteAddress, RouteAttribute, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;

pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Link name by ifindex.
pub async fn links(handle: &Handle) -> Result<BTreeMap<u32, String>> {
    let mut out = BTreeMap::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.context("listing links")? {
        if let Some(name) = msg.attributes.iter().find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None }) {
            out.insert(msg.header.index, name);
        }
    }
    Ok(out)
}

/// Every address of this node, of both families, with its link, but loopback ones.
pub async fn node_addresses(handle: &Handle) -> Result<Vec<(IpAddr, u32)>> {
    let mut out = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.try_next().await.context("listing addresses")? {
        for attr in &msg.attributes {
            // IFA_LOCAL for IPv4; IPv6 addresses come as IFA_ADDRESS only.
            let ip = match attr {
                AddressAttribute::Local(ip @ IpAddr::V4(_)) => *ip,
                AddressAttribute::Address(ip @ IpAddr::V6(_)) => *ip,
                _ => continue,
            };
            if !ip.is_loopback() {
                out.push((ip, msg.header.index));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whether `ip` is link-local: no client reaches a Service through such an address (lb-cni
/// puts the pods' gateway, 169.254.1.1, on every pod's host device).
pub fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// Links that carry a /32 route in the main table: the host side of pod devices, as CNIs
/// (Calico, Cilium, ptp) set them up.
pub async fn host_route_links(handle: &Handle) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut stream = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(msg) = stream.try_next().await.context("listing routes")? {
        let h = &msg.header;
        if h.destination_prefix_length != 32 || h.table != RT_TABLE_MAIN || h.kind != RouteType::Unicast {
            continue;
        }
        let has_dst = msg.attributes.iter().any(|a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(_))));
        let has_gateway = msg.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_)));
        if let Some(oif) = msg.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None }) {
            if has_dst && !has_gateway {
                out.push(oif);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A MAC address as `ip link` prints it.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Whether an error, or any error under it, is the OS error `errno`.
pub fn is_os_error(e: &(dyn std::error::Error + 'static), errno: i32) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(errno)))
}

/// Shell-style match of a link name against a pattern with one optional trailing `*`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn patterns() {
        assert!(super::name_matches("lxc*", "lxc12ab"));
        assert!(super::name_matches("eth0", "eth0"));
        assert!(!super::name_matches("eth0", "eth01"));
        assert!(!super::name_matches("cali*", "lxc1"));
    }
}

/// The cookie of this process's network namespace, as `bpf_get_netns_cookie` sees it.
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    let err = std::io::Error::last_os_error();
    unsafe { libc::close(fd) };
    anyhow::ensure!(rc == 0, "getsockopt(SO_NETNS_COOKIE): {err} (Linux 5.14 or newer is needed for socket-level balancing)");
    Ok(cookie)
}


/// Cgroup ids (inode numbers, what `bpf_get_current_cgroup_id` returns) of the pod cgroups of
/// `uids` under `root` and of everything below them. kubelet names a pod's cgroup after its
/// UID: `pod<uid>` (cgroupfs driver) or `...-pod<uid with _>.slice` (systemd driver).
pub fn pod_cgroup_ids(root: &std::path::Path, uids: &[String]) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let names: Vec<String> = uids.iter().flat_map(|u| [format!("pod{u}"), format!("pod{}", u.replace('-', "_"))]).collect();
    let mut ids = std::collections::BTreeSet::new();
    // (directory, inside a matching pod cgroup), depth-first; kubelet nests pods a few levels down.
    let mut stack = vec![(root.to_path_buf(), false, 0)];
    while let Some((dir, inside, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let matches = inside || names.iter().any(|n| name == *n || name.ends_with(&format!("-{n}.slice")));
            if matches {
                ids.insert(meta.ino());
            }
            if matches || depth < 6 {
                stack.push((entry.path(), matches, depth + 1));
            }
        }
    }
    ids
}
