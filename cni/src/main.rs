//! lb-cni: the CNI plugin of the load balancer (CNI 1.1.0; configurations of 0.3.0 to
//! 1.1.0). A container runtime runs it with `CNI_*` variables and the network's plugin
//! configuration on stdin; it answers on stdout with a result or the spec's error JSON.
use std::{collections::BTreeSet, io::Read, net::IpAddr, path::PathBuf, time::Duration};

use lb_common::EndpointV1;
use serde_json::{json, Value};

use lb_cni::{
    datapath::Datapath,
    delegate, ipam, pod, spec,
    spec::{code, Attachment, Cidr, Command, Error, Interface, IpConfig, NetConf, Outcome, Params, Result, Route},
};

const OWN_IPAM: &str = "lb-cni";

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors are answered in the configuration's version, when this plugin speaks it.
    let version = asked_version(&stdin).filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str())).unwrap_or(spec::LATEST.into());
    let outcome = match read {
        Err(e) => Err(Error::new(code::IO_FAILURE, format!("reading the configuration from stdin: {e}"))),
        Ok(_) => run(&stdin),
    };
    match outcome {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("lb-cni: {e}");
            std::process::exit(1);
        }
    }
}

fn run(stdin: &[u8]) -> Result<Option<Value>> {
    let command = Command::parse(&std::env::var("CNI_COMMAND").unwrap_or_default())?;
    if command == Command::Version {
        return Ok(Some(version(stdin)));
    }
    let params = Params::from_env(command, |k| std::env::var(k).ok())?;
    let conf = NetConf::parse(stdin)?;
    conf.allows(command)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| Error::new(code::INTERNAL, format!("starting a runtime: {e}")))?;
    // One thread: the netlink socket of the pod's namespace is made by entering it, and
    // only this thread ever enters.
    runtime.block_on(async {
        match command {
            Command::Add => add(&conf, &params, stdin).await.map(Some),
            Command::Del => del(&conf, &params, stdin).await.map(|()| None),
            Command::Check => check(&conf, &params, stdin).await.map(|()| None),
            Command::Status => status(&conf, &params, stdin).map(|()| None),
            Command::Gc => gc(&conf, &params, stdin).await.map(|()| None),
            Command::Version => unreachable!("answered above"),
        }
    })
}

/// VERSION: every version this plugin speaks, answered in the version asked.
fn version(stdin: &[u8]) -> Value {
    let asked = asked_version(stdin).unwrap_or(spec::LATEST.into());
    json!({"cniVersion": asked, "supportedVersions": spec::SUPPORTED_VERSIONS})
}

/// The `cniVersion` on stdin, if there is one.
fn asked_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(stdin).ok()?.get("cniVersion")?.as_str().filter(|v| !v.is_empty()).map(str::to_string)
}

/// Where lb-cni's own IPAM keeps its allocations.
fn data_dir(conf: &NetConf) -> PathBuf {
    conf.ipam.as_ref().and_then(|i| i.data_dir.clone()).unwrap_or_else(|| PathBuf::from(ipam::DEFAULT_DATA_DIR))
}

/// The range lb-cni's own IPAM gives from: `ipam.subnet`, else the node's pod range, asked
/// of the agent.
fn own_range(conf: &NetConf) -> Result<ipam::Range> {
    if let Some(subnet) = conf.ipam.as_ref().and_then(|i| i.subnet.as_deref()) {
        return ipam::Range::parse(subnet);
    }
    let status = lb_agent::status::fetch(&conf.agent, Duration::from_secs(2))
        .map_err(|e| Error::new(code::TRY_AGAIN_LATER, format!("no ipam.subnet, and the agent at {} cannot say this node's pod range: {e:#}", conf.agent)))?;
    let cidr = status.pod_cidrs.iter().find(|c| Cidr::parse(c).is_some_and(|c| c.addr.is_ipv4()));
    let cidr = cidr.ok_or_else(|| Error::new(code::TRY_AGAIN_LATER, format!("no ipam.subnet, and node {} has no IPv4 spec.podCIDRs yet", status.node)))?;
    ipam::Range::parse(cidr)
}

/// Runs the delegated IPAM plugin for `command`.
fn delegate_ipam(conf: &NetConf, params: &Params, command: &str, stdin: &[u8]) -> Result<Option<Value>> {
    let plugin = delegate::find(&conf.ipam()?.plugin, &params.path)?;
    delegate::run(&plugin, command, stdin)
}

/// An address for the pod: from lb-cni's own allocator or the delegated plugin.
fn allocate(conf: &NetConf, params: &Params, stdin: &[u8]) -> Result<(IpAddr, Outcome)> {
    let ipam = conf.ipam()?;
    if ipam.plugin == OWN_IPAM {
        let range = own_range(conf)?;
        if !range.subnet.addr.is_ipv4() {
            return Err(Error::new(code::UNSUPPORTED_FIELD, format!("ipam.subnet {}: lb-cni wires IPv4 pods only so far", range.subnet)));
        }
        let ip = ipam::Store::lock(&data_dir(conf), &conf.name)?.reserve(&range, &params.attachment())?;
        return Ok((ip, Outcome::default()));
    }
    let result = delegate_ipam(conf, params, "ADD", stdin)?.ok_or_else(|| Error::new(code::DECODING_FAILURE, format!("IPAM plugin {} returned no result", ipam.plugin)))?;
    let outcome = Outcome::parse(&result)?;
    let ip = outcome.ips.iter().map(|c| c.address.addr).find(IpAddr::is_ipv4);
    let ip = ip.ok_or_else(|| Error::new(code::UNSUPPORTED_FIELD, format!("IPAM plugin {} gave no IPv4 address: lb-cni wires IPv4 pods only so far", ipam.plugin)))?;
    Ok((ip, outcome))
}

/// Frees the attachment's address, wherever it came from.
fn release(conf: &NetConf, params: &Params, stdin: &[u8]) -> Result<()> {
    let Ok(ipam) = conf.ipam() else { return Ok(()) };
    if ipam.plugin == OWN_IPAM {
        ipam::Store::lock(&data_dir(conf), &conf.name)?.release(&params.attachment())?;
        return Ok(());
    }
    delegate_ipam(conf, params, "DEL", stdin).map(|_| ())
}

/// ADD: address, veth, routes, endpoint entry, TC; the result in the config's version. On any
/// error, what was done is undone (as a DEL would), so a failed ADD leaves nothing behind.
async fn add(conf: &NetConf, params: &Params, stdin: &[u8]) -> Result<Value> {
    let netns_path = params.netns.clone().expect("required for ADD");
    let netns = pod::open_netns(&netns_path).map_err(|e| Error::new(code::IO_FAILURE, format!("opening CNI_NETNS {}: {e}", netns_path.display())))?;
    let netns = netns.ok_or_else(|| Error::new(code::UNKNOWN_CONTAINER, format!("CNI_NETNS {} does not exist", netns_path.display())))?;
    conf.ipam()?;
    let mut datapath = Datapath::open(&conf.pin_dir)?;
    let host = pod::connect()?;
    let pod_side = pod::connect_in(&netns)?;
    let attachment = params.attachment();
    // Refused before anything is made: the spec says ADD fails if the interface exists.
    if pod::link(&pod_side, &attachment.ifname).await?.is_some() {
        return Err(Error::new(code::INTERNAL, format!("interface {} already exists in {}", attachment.ifname, netns_path.display())));
    }
    if pod::link(&host, &attachment.host_device()).await?.is_some() {
        return Err(Error::new(code::INTERNAL, format!("host interface {} already exists: attachment {}/{} was added before without a DEL", attachment.host_device(), attachment.container_id, attachment.ifname)));
    }
    let (ip, from_ipam) = allocate(conf, params, stdin)?;
    let wired = async {
        let IpAddr::V4(ip4) = ip else { unreachable!("allocate gives IPv4") };
        let wired = pod::wire(&host, &pod_side, &netns, &attachment, ip4, conf.mtu).await?;
        let mut entry = EndpointV1 { ifindex: wired.host.index, mac: wired.pod.mac, attachment: attachment.hash(), ..EndpointV1::default() };
        entry.set_pod(&params.pod());
        datapath.record(ip, &entry)?;
        datapath.attach(&wired.host.name, wired.host.index)?;
        anyhow::Ok(wired)
    }
    .await;
    let wired = match wired {
        Ok(w) => w,
        Err(e) => {
            if let Err(undo) = remove(conf, params, stdin, &host).await {
                eprintln!("lb-cni: undoing the failed ADD: {undo}");
            }
            return Err(e.into());
        }
    };
    let mut outcome = match &conf.prev_result {
        Some(prev) => Outcome::parse(prev)?,
        None => Outcome::default(),
    };
    let first = outcome.interfaces.len();
    let gateway = Some(IpAddr::V4(pod::GATEWAY));
    let mine = Outcome {
        interfaces: vec![
            Interface { name: wired.host.name.clone(), mac: wired.host.mac_text(), mtu: Some(wired.host.mtu), sandbox: None },
            Interface { name: wired.pod.name.clone(), mac: wired.pod.mac_text(), mtu: Some(wired.pod.mtu), sandbox: Some(netns_path.display().to_string()) },
        ],
        ips: vec![IpConfig { address: Cidr { addr: ip, len: 32 }, gateway, interface: Some(1) }],
        routes: vec![
            Route { dst: Cidr { addr: IpAddr::V4(pod::GATEWAY), len: 32 }, gw: None, scope: Some(253) },
            Route { dst: Cidr { addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), len: 0 }, gw: gateway, scope: None },
        ],
        dns: conf.dns.clone().or(from_ipam.dns),
    };
    outcome.extend(mine);
    debug_assert_eq!(outcome.ips.last().and_then(|c| c.interface), Some(first + 1));
    Ok(outcome.render(&conf.cni_version))
}

/// What DEL, GC and a failed ADD undo for one attachment: the veth, the TC link's pin, the
/// endpoint entries, the address. Each step runs even when an earlier one fails.
async fn remove(conf: &NetConf, params: &Params, stdin: &[u8], host: &rtnetlink::Handle) -> Result<()> {
    let attachment = params.attachment();
    let mut errors = Vec::new();
    if let Err(e) = pod::unwire(host, &attachment).await {
        errors.push(format!("{e:#}"));
    }
    let hash = attachment.hash();
    errors.extend(Datapath::forget(&conf.pin_dir, |a| a != hash, Some(attachment.host_device())));
    if let Err(e) = release(conf, params, stdin) {
        errors.push(e.to_string());
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(Error::new(code::INTERNAL, errors.join("; "))),
    }
}

/// DEL: idempotent, and it succeeds without the pod's namespace (its veth went with it).
async fn del(conf: &NetConf, params: &Params, stdin: &[u8]) -> Result<()> {
    let host = pod::connect()?;
    remove(conf, params, stdin, &host).await
}

/// CHECK: the interfaces, address and routes of `prevResult` are in place, the endpoint is
/// recorded, TC is attached, the address is still reserved.
async fn check(conf: &NetConf, params: &Params, stdin: &[u8]) -> Result<()> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| Error::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let prev = Outcome::parse(prev)?;
    let netns_path = params.netns.clone().expect("required for CHECK");
    let netns = pod::open_netns(&netns_path).map_err(|e| Error::new(code::IO_FAILURE, format!("opening CNI_NETNS {}: {e}", netns_path.display())))?;
    let netns = netns.ok_or_else(|| Error::new(code::UNKNOWN_CONTAINER, format!("CNI_NETNS {} does not exist", netns_path.display())))?;
    let attachment = params.attachment();
    let sandbox = netns_path.display().to_string();
    let ours = prev.ips.iter().find(|c| c.interface.and_then(|i| prev.interfaces.get(i)).is_some_and(|i| i.name == attachment.ifname && i.sandbox.as_deref() == Some(sandbox.as_str())));
    let ours = ours.ok_or_else(|| Error::new(code::INVALID_CONFIG, format!("prevResult has no address on {} in {sandbox}", attachment.ifname)))?;
    let IpAddr::V4(ip) = ours.address.addr else { return Err(Error::new(code::UNSUPPORTED_FIELD, format!("prevResult address {}: IPv4 only so far", ours.address))) };
    let host = pod::connect()?;
    let pod_side = pod::connect_in(&netns)?;
    pod::check(&host, &pod_side, &attachment, ip).await?;
    let datapath = Datapath::open(&conf.pin_dir)?;
    let entry = datapath.endpoints.get(IpAddr::V4(ip)).ok_or_else(|| Error::new(code::INTERNAL, format!("{ip} is not in the endpoint map")))?;
    if entry.attachment != attachment.hash() {
        return Err(Error::new(code::INTERNAL, format!("{ip} in the endpoint map belongs to another attachment")));
    }
    if !datapath.attached(&attachment.host_device()) {
        return Err(Error::new(code::INTERNAL, format!("no TC link pinned for {}", attachment.host_device())));
    }
    let ipam = conf.ipam()?;
    if ipam.plugin == OWN_IPAM {
        let held = ipam::Store::lock(&data_dir(conf), &conf.name)?.held_by(&attachment)?;
        if !held.contains(&IpAddr::V4(ip)) {
            return Err(Error::new(code::INTERNAL, format!("{ip} is not reserved for {}/{}", attachment.container_id, attachment.ifname)));
        }
    } else {
        delegate_ipam(conf, params, "CHECK", stdin)?;
    }
    Ok(())
}

/// STATUS: ready while the agent runs and has synced, and (own IPAM) addresses are left.
fn status(conf: &NetConf, params: &Params, stdin: &[u8]) -> Result<()> {
    let agent = lb_agent::status::fetch(&conf.agent, Duration::from_secs(2)).map_err(|e| Error::new(code::NOT_AVAILABLE, format!("lb-agent is not running (asked {}): {e:#}", conf.agent)))?;
    if !agent.synced {
        return Err(Error::new(code::NOT_AVAILABLE, format!("lb-agent on {} has not finished its first sync", agent.node)));
    }
    let ipam = conf.ipam()?;
    if ipam.plugin == OWN_IPAM {
        let range = own_range(conf).map_err(|e| Error::new(code::NOT_AVAILABLE, e.msg))?;
        let used = ipam::Store::lock(&data_dir(conf), &conf.name)?.all()?.into_iter().filter(|(ip, _)| range.contains(*ip)).count() as u128;
        if used >= range.size() {
            return Err(Error::new(code::NOT_AVAILABLE, format!("every address of {} is in use", range.subnet)));
        }
        return Ok(());
    }
    // A delegate older than STATUS (it refuses the version) has nothing to say.
    match delegate_ipam(conf, params, "STATUS", stdin) {
        Err(e) if e.code == code::INCOMPATIBLE_VERSION => Ok(()),
        other => other.map(|_| ()),
    }
}

/// GC: frees every address, endpoint entry, TC link pin and host device of an attachment
/// not in `cni.dev/valid-attachments`, and passes GC on to a delegated IPAM.
async fn gc(conf: &NetConf, params: &Params, stdin: &[u8]) -> Result<()> {
    let valid: BTreeSet<Attachment> = conf.valid_attachments.clone().unwrap_or_default().into_iter().collect();
    let valid_hashes: BTreeSet<u64> = valid.iter().map(Attachment::hash).collect();
    let mut errors: Vec<String> = Vec::new();
    let host = pod::connect()?;
    for link in pod::links(&host).await? {
        let Some(owner) = link.alias.as_deref().and_then(Attachment::from_alias) else { continue };
        if !valid.contains(&owner) {
            if let Err(e) = pod::unwire(&host, &owner).await {
                errors.push(format!("{e:#}"));
            }
        }
    }
    errors.extend(Datapath::forget(&conf.pin_dir, |a| valid_hashes.contains(&a), None));
    match conf.ipam() {
        Ok(ipam) if ipam.plugin == OWN_IPAM => match ipam::Store::lock(&data_dir(conf), &conf.name).and_then(|s| s.release_all_but(&valid)) {
            Ok(freed) if !freed.is_empty() => eprintln!("lb-cni: GC freed {}", freed.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")),
            Ok(_) => {}
            Err(e) => errors.push(e.to_string()),
        },
        Ok(_) => match delegate_ipam(conf, params, "GC", stdin) {
            Err(e) if e.code != code::INCOMPATIBLE_VERSION => errors.push(e.to_string()),
            _ => {}
        },
        Err(_) => {}
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(Error::new(code::INTERNAL, format!("GC: {}", errors.join("; ")))),
    }
}
