//! The CNI protocol (containernetworking/cni SPEC.md, 1.1.0): the versions this plugin speaks,
//! the runtime's parameters, the network configuration it reads, results in each version's
//! format, and the error JSON with the spec's codes.
use std::{
    net::IpAddr,
    path::PathBuf,
};

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Every version whose configuration and result format this plugin handles.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// The spec's well-known error codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Anything else (libcni's `ErrInternal`).
    pub const INTERNAL: u32 = 999;
}

/// An error result: printed as the spec's JSON on stdout, its message on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut out = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            out["details"] = json!(self.details);
        }
        out
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::new(code::INTERNAL, format!("{e:#}"))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

/// `a >= b` for dotted versions.
pub fn at_least(a: &str, b: &str) -> bool {
    let parts = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    parts(a) >= parts(b)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            other => return Err(Error::new(code::INVALID_ENVIRONMENT, format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"))),
        })
    }

    /// The first version that has the command.
    fn since(self) -> &'static str {
        match self {
            Self::Check => "0.4.0",
            Self::Status | Self::Gc => "1.1.0",
            _ => "0.1.0",
        }
    }
}

/// One attachment of a container to the network: the spec's `(CNI_CONTAINERID, CNI_IFNAME)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    /// FNV-1a over both parts: names the host device and marks the endpoint entries, so DEL
    /// and GC find them without the container's namespace.
    pub fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.container_id.bytes().chain([0]).chain(self.ifname.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// The host side of the pod's veth: `lxc` and 12 hex digits (15 bytes, the kernel's limit).
    pub fn host_device(&self) -> String {
        host_device_of(self.hash())
    }

    /// What the host device's alias says, so GC can tell this plugin's devices and whose they are.
    pub fn alias(&self) -> String {
        format!("lb-cni {} {}", self.container_id, self.ifname)
    }

    pub fn from_alias(alias: &str) -> Option<Self> {
        let mut parts = alias.strip_prefix("lb-cni ")?.split(' ');
        let (container_id, ifname) = (parts.next()?, parts.next()?);
        Some(Self { container_id: container_id.into(), ifname: ifname.into() })
    }
}

/// The host device of the attachment whose hash is `hash`.
pub fn host_device_of(hash: u64) -> String {
    format!("lxc{:012x}", hash & 0xffff_ffff_ffff)
}

/// The runtime's parameters (environment variables), checked for the command.
#[derive(Clone, Debug, Default)]
pub struct Params {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`: `K=V;K2=V2`.
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
}

impl Params {
    pub fn from_env(command: Command, var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let required: &[&str] = match command {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Gc => &["CNI_PATH"],
            Command::Status | Command::Version => &[],
        };
        let missing: Vec<&str> = required.iter().copied().filter(|name| var(name).is_none_or(|v| v.is_empty())).collect();
        if !missing.is_empty() {
            return Err(Error::new(code::INVALID_ENVIRONMENT, format!("required environment variables missing: {}", missing.join(", "))));
        }
        let params = Self {
            container_id: var("CNI_CONTAINERID").unwrap_or_default(),
            netns: var("CNI_NETNS").filter(|v| !v.is_empty()).map(PathBuf::from),
            ifname: var("CNI_IFNAME").unwrap_or_default(),
            args: var("CNI_ARGS").unwrap_or_default().split(';').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            path: var("CNI_PATH").unwrap_or_default().split(':').filter(|p| !p.is_empty()).map(PathBuf::from).collect(),
        };
        if required.contains(&"CNI_CONTAINERID") && !valid_container_id(&params.container_id) {
            return Err(Error::new(code::INVALID_ENVIRONMENT, format!("CNI_CONTAINERID {:?}: must start with a letter or digit, then letters, digits, `_`, `.` or `-`", params.container_id)));
        }
        if required.contains(&"CNI_IFNAME") && !valid_ifname(&params.ifname) {
            return Err(Error::new(code::INVALID_ENVIRONMENT, format!("CNI_IFNAME {:?}: not a valid interface name (1 to 15 bytes, no `/`, `:` or spaces)", params.ifname)));
        }
        Ok(params)
    }

    pub fn attachment(&self) -> Attachment {
        Attachment { container_id: self.container_id.clone(), ifname: self.ifname.clone() }
    }

    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `namespace/name` of the pod, from Kubernetes runtimes' `K8S_POD_NAMESPACE` and
    /// `K8S_POD_NAME`; empty without them.
    pub fn pod(&self) -> String {
        match (self.arg("K8S_POD_NAMESPACE"), self.arg("K8S_POD_NAME")) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => String::new(),
        }
    }
}

fn valid_container_id(id: &str) -> bool {
    id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len()) && name != "." && name != ".." && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// The plugin's configuration, as the runtime derives it from the network's config list.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin: String,
    /// The MTU of both ends of the pod's veth (the kernel's default, 1500, without it).
    pub mtu: Option<u32>,
    pub ipam: Option<IpamConf>,
    pub dns: Option<Value>,
    pub prev_result: Option<Value>,
    /// Where lb-agent pins its maps and programs (its `--pin-dir`).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// The agent's status address (its `--metrics-addr`), asked by STATUS and for the
    /// node's pod range.
    #[serde(default = "default_agent")]
    pub agent: String,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb")
}

fn default_agent() -> String {
    "127.0.0.1:9970".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub plugin: String,
    /// The range addresses come from; without it, the node's pod range from the agent.
    pub subnet: Option<String>,
    /// Where allocations are kept.
    pub data_dir: Option<PathBuf>,
}

impl NetConf {
    /// Parses stdin: undecodable JSON is code 6, an unsupported version 1, a config this
    /// plugin cannot use 7.
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| Error::new(code::DECODING_FAILURE, format!("network configuration on stdin is not JSON: {e}")))?;
        let version = value.get("cniVersion").and_then(Value::as_str).unwrap_or_default();
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(Error::new(code::INCOMPATIBLE_VERSION, format!("cniVersion {version:?} is not supported")).with_details(format!("supported versions: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        let conf: NetConf = decode(value)?;
        let name_ok = conf.name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) && conf.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !name_ok {
            return Err(Error::new(code::INVALID_CONFIG, format!("network name {:?}: must start with a letter or digit, then letters, digits, `_`, `.` or `-`", conf.name)));
        }
        if conf.plugin.is_empty() {
            return Err(Error::new(code::INVALID_CONFIG, "no type in the network configuration"));
        }
        if let Some(mtu) = conf.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(Error::new(code::INVALID_CONFIG, format!("mtu {mtu}: must be between 68 and 65535")));
            }
        }
        Ok(conf)
    }

    /// Refuses a command the configuration's version does not have (CHECK before 0.4.0,
    /// STATUS and GC before 1.1.0), as libcni's plugins do.
    pub fn allows(&self, command: Command) -> Result<()> {
        if at_least(&self.cni_version, command.since()) {
            return Ok(());
        }
        Err(Error::new(code::INCOMPATIBLE_VERSION, format!("config version {} does not allow {command:?} (from {})", self.cni_version, command.since())))
    }

    pub fn ipam(&self) -> Result<&IpamConf> {
        self.ipam.as_ref().filter(|i| !i.plugin.is_empty()).ok_or_else(|| Error::new(code::INVALID_CONFIG, "no ipam.type in the network configuration"))
    }
}

fn decode(value: Value) -> Result<NetConf> {
    serde_json::from_value(value).map_err(|e| Error::new(code::INVALID_CONFIG, format!("invalid network configuration: {e}")))
}

/// An address or prefix in CIDR notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, len) = text.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        (len <= if addr.is_ipv4() { 32 } else { 128 }).then_some(Self { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// The container's namespace path; none for a host interface.
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Cidr,
    pub gateway: Option<IpAddr>,
    /// Index into the result's interfaces.
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Cidr,
    pub gw: Option<IpAddr>,
    /// 253 for a link-scope route (1.1.0 results only).
    pub scope: Option<u8>,
}

/// A success result, independent of version: read from any version's format, written in
/// the configuration's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Option<Value>,
}

fn bad_result(what: &str) -> Error {
    Error::new(code::DECODING_FAILURE, format!("result: {what}"))
}

impl Outcome {
    /// Reads a result of any supported version (0.3.x and 0.4.0 carry `version` in each IP,
    /// which the address itself says again).
    pub fn parse(value: &Value) -> Result<Self> {
        let list = |key: &str| value.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
        let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
        let ip = |v: &Value, key: &str| -> Result<Option<IpAddr>> { text(v, key).map(|t| t.parse().map_err(|_| bad_result(&format!("{key} {t:?} is not an address")))).transpose() };
        let cidr = |v: &Value, key: &str| -> Result<Cidr> {
            let t = text(v, key).ok_or_else(|| bad_result(&format!("no {key}")))?;
            Cidr::parse(&t).ok_or_else(|| bad_result(&format!("{key} {t:?} is not in CIDR notation")))
        };
        let interfaces = list("interfaces")
            .iter()
            .map(|i| Interface { name: text(i, "name").unwrap_or_default(), mac: text(i, "mac").unwrap_or_default(), mtu: i.get("mtu").and_then(Value::as_u64).map(|m| m as u32), sandbox: text(i, "sandbox").filter(|s| !s.is_empty()) })
            .collect();
        let ips = list("ips")
            .iter()
            .map(|i| Ok(IpConfig { address: cidr(i, "address")?, gateway: ip(i, "gateway")?, interface: i.get("interface").and_then(Value::as_u64).map(|n| n as usize) }))
            .collect::<Result<_>>()?;
        let routes = list("routes").iter().map(|r| Ok(Route { dst: cidr(r, "dst")?, gw: ip(r, "gw")?, scope: r.get("scope").and_then(Value::as_u64).map(|s| s as u8) })).collect::<Result<_>>()?;
        Ok(Self { interfaces, ips, routes, dns: value.get("dns").filter(|d| d.as_object().is_some_and(|o| !o.is_empty())).cloned() })
    }

    /// Appends `other`'s interfaces, addresses and routes, its interface indices moved past ours.
    pub fn extend(&mut self, other: Outcome) {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|ip| IpConfig { interface: ip.interface.map(|i| i + offset), ..ip }));
        self.routes.extend(other.routes);
        if self.dns.is_none() {
            self.dns = other.dns;
        }
    }

    /// The result in `version`'s format: `version` in each IP before 1.0.0; interface `mtu`
    /// and route `scope` from 1.1.0.
    pub fn render(&self, version: &str) -> Value {
        let with_ip_version = !at_least(version, "1.0.0");
        let v11 = at_least(version, "1.1.0");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = Map::new();
                o.insert("name".into(), json!(i.name));
                if !i.mac.is_empty() {
                    o.insert("mac".into(), json!(i.mac));
                }
                if let (true, Some(mtu)) = (v11, i.mtu) {
                    o.insert("mtu".into(), json!(mtu));
                }
                if let Some(sandbox) = &i.sandbox {
                    o.insert("sandbox".into(), json!(sandbox));
                }
                Value::Object(o)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = Map::new();
                if with_ip_version {
                    o.insert("version".into(), json!(if ip.address.addr.is_ipv4() { "4" } else { "6" }));
                }
                o.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    o.insert("gateway".into(), json!(gw.to_string()));
                }
                if let Some(i) = ip.interface {
                    o.insert("interface".into(), json!(i));
                }
                Value::Object(o)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("dst".into(), json!(r.dst.to_string()));
                if let Some(gw) = r.gw {
                    o.insert("gw".into(), json!(gw.to_string()));
                }
                if let (true, Some(scope)) = (v11, r.scope) {
                    o.insert("scope".into(), json!(scope));
                }
                Value::Object(o)
            })
            .collect();
        let mut out = json!({"cniVersion": version});
        if !interfaces.is_empty() {
            out["interfaces"] = Value::Array(interfaces);
        }
        if !ips.is_empty() {
            out["ips"] = Value::Array(ips);
        }
        if !routes.is_empty() {
            out["routes"] = Value::Array(routes);
        }
        out["dns"] = self.dns.clone().unwrap_or_else(|| json!({}));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn missing_variables_are_named() {
        let e = Params::from_env(Command::Add, env(&[("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        assert!(e.msg.contains("CNI_CONTAINERID") && e.msg.contains("CNI_NETNS") && !e.msg.contains("CNI_IFNAME"), "{}", e.msg);
        // DEL needs no namespace: it must succeed after the namespace is gone.
        assert!(Params::from_env(Command::Del, env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")])).is_ok());
        let e = Params::from_env(Command::Add, env(&[("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "a/b")])).unwrap_err();
        assert!(e.msg.contains("CNI_IFNAME"));
    }

    #[test]
    fn pod_name_from_kubernetes_args() {
        let p = Params::from_env(Command::Del, env(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0"), ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0")])).unwrap();
        assert_eq!(p.pod(), "shop/web-0");
    }

    #[test]
    fn versions_and_commands() {
        let conf = |v: &str| NetConf::parse(format!(r#"{{"cniVersion":"{v}","name":"n","type":"lb-cni"}}"#).as_bytes());
        assert_eq!(conf("0.2.0").unwrap_err().code, code::INCOMPATIBLE_VERSION);
        assert_eq!(conf("0.3.1").unwrap().allows(Command::Check).unwrap_err().code, code::INCOMPATIBLE_VERSION);
        assert!(conf("0.4.0").unwrap().allows(Command::Check).is_ok());
        assert_eq!(conf("1.0.0").unwrap().allows(Command::Gc).unwrap_err().code, code::INCOMPATIBLE_VERSION);
        assert!(conf("1.1.0").unwrap().allows(Command::Status).is_ok());
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODING_FAILURE);
        assert_eq!(NetConf::parse(br#"{"cniVersion":"1.1.0","type":"lb-cni"}"#).unwrap_err().code, code::INVALID_CONFIG);
        assert_eq!(NetConf::parse(br#"{"cniVersion":"1.1.0","name":"-x","type":"lb-cni"}"#).unwrap_err().code, code::INVALID_CONFIG);
    }

    #[test]
    fn results_take_each_versions_format() {
        let outcome = Outcome {
            interfaces: vec![Interface { name: "eth0".into(), mac: "aa:bb:cc:dd:ee:ff".into(), mtu: Some(1400), sandbox: Some("/run/netns/p".into()) }],
            ips: vec![IpConfig { address: Cidr::parse("10.244.1.2/32").unwrap(), gateway: Some("169.254.1.1".parse().unwrap()), interface: Some(0) }],
            routes: vec![Route { dst: Cidr::parse("169.254.1.1/32").unwrap(), gw: None, scope: Some(253) }],
            dns: None,
        };
        let old = outcome.render("0.4.0");
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][0].get("mtu").is_none() && old["routes"][0].get("scope").is_none());
        let v1 = outcome.render("1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        let v11 = outcome.render("1.1.0");
        assert_eq!((v11["interfaces"][0]["mtu"].as_u64(), v11["routes"][0]["scope"].as_u64()), (Some(1400), Some(253)));
        // What is rendered reads back the same, from any version.
        assert_eq!(Outcome::parse(&v11).unwrap(), outcome);
        assert_eq!(Outcome::parse(&old).unwrap().ips, outcome.ips);
    }

    #[test]
    fn attachments_name_their_device_and_alias() {
        let a = Attachment { container_id: "c1".into(), ifname: "eth0".into() };
        assert_eq!(a.host_device().len(), 15);
        assert_ne!(a.host_device(), Attachment { container_id: "c1".into(), ifname: "eth1".into() }.host_device());
        assert_eq!(Attachment::from_alias(&a.alias()), Some(a));
    }
}
