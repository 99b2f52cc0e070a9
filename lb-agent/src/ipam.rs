//! LB-IPAM: addresses for LoadBalancer Services from `LoadBalancerIPPool`s.
//!
//! The assignment is a function of the pools, the Services and the addresses Services already
//! hold (their `status.loadBalancer.ingress`, or what this agent gave them before), so every
//! agent computes the same one and a restart changes nothing:
//! 1. each Service keeps the addresses it holds that a pool selecting it still contains;
//! 2. addresses asked for (`spec.loadBalancerIP`, the `lb-agent.io/load-balancer-ips`
//!    annotation) are given if a pool selecting the Service contains them and nobody holds them
//!    (before any automatic choice, so that none takes an address somebody asked for);
//! 3. the others get, per family they serve, an address shared with a Service of the same
//!    sharing key and other ports, else the first free one of the first pool (by name) that
//!    selects them.
//!
//! Services are taken oldest first (creation time, then name): of two asking for one address,
//! the older gets it. One address serves two Services only when both carry the same
//! `lb-agent.io/sharing-key` and no port of one is a port of the other.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::{
    source::model::{IpPool, LB_IPS_ANNOTATION, SHARING_KEY_ANNOTATION},
    translate::{parse_cidr, Family, ServiceName},
};

/// The `spec.loadBalancerClass` this implementation serves (besides none).
pub const LOAD_BALANCER_CLASS: &str = "lb-agent.io/lb";

/// An address as a number, and its family: ranges and "the next address" are arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Num {
    v6: bool,
    n: u128,
}

impl Num {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(ip) => Self { v6: false, n: u32::from(ip) as u128 },
            IpAddr::V6(ip) => Self { v6: true, n: u128::from(ip) },
        }
    }

    fn ip(self) -> IpAddr {
        if self.v6 { IpAddr::V6(self.n.into()) } else { IpAddr::V4((self.n as u32).into()) }
    }

    fn family(self) -> Family {
        Family::of(&self.ip())
    }
}

/// A pool, parsed and checked.
#[derive(Clone, Debug)]
pub struct Pool {
    pub name: Arc<str>,
    /// Inclusive ranges of one family each.
    ranges: Vec<(Num, Num)>,
    selector: Option<LabelSelector>,
}

impl Pool {
    /// The pool an object describes, or what is wrong with it (the pool is then not used).
    pub fn parse(object: &IpPool) -> Result<Self, String> {
        let name: Arc<str> = object.metadata.id.name().into();
        if let Some(problem) = &object.problem {
            return Err(problem.clone());
        }
        if object.spec.blocks.is_empty() {
            return Err("spec.blocks: a pool needs at least one block".into());
        }
        let mut ranges = Vec::new();
        for (i, block) in object.spec.blocks.iter().enumerate() {
            let field = format!("spec.blocks[{i}]");
            let range = match (&block.cidr, &block.start, &block.stop) {
                (Some(cidr), None, None) => {
                    let (net, len) = parse_cidr(cidr).map_err(|e| format!("{field}.cidr: {e}"))?;
                    let bits = if net.is_ipv4() { 32 } else { 128 };
                    let host_bits = bits - len as u32;
                    let first = Num::of(net).n & !(if host_bits == 128 { u128::MAX } else { (1u128 << host_bits) - 1 });
                    let last = first | if host_bits == 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
                    // A /31 or /32 (/127, /128) has no network or broadcast address to keep out.
                    let trim = !object.spec.allow_first_last_ips && host_bits > 1;
                    let (first, last) = if trim { (first + 1, last - 1) } else { (first, last) };
                    (Num { v6: net.is_ipv6(), n: first }, Num { v6: net.is_ipv6(), n: last })
                }
                (None, Some(start), Some(stop)) => {
                    let parse = |s: &str, f: &str| s.parse::<IpAddr>().map(Num::of).map_err(|_| format!("{field}.{f}: {s:?} is not an IP address"));
                    let (start, stop) = (parse(start, "start")?, parse(stop, "stop")?);
                    if start.v6 != stop.v6 {
                        return Err(format!("{field}: start and stop are of different families"));
                    }
                    if start.n > stop.n {
                        return Err(format!("{field}: start {} is after stop {}", start.ip(), stop.ip()));
                    }
                    (start, stop)
                }
                _ => return Err(format!("{field}: give either cidr, or start and stop")),
            };
            ranges.push(range);
        }
        Ok(Self { name, ranges, selector: object.spec.service_selector.clone() })
    }

    fn contains(&self, ip: Num) -> bool {
        self.ranges.iter().any(|(a, b)| a.v6 == ip.v6 && a.n <= ip.n && ip.n <= b.n)
    }

    /// Whether the pool serves a Service with these labels (namespace and name included).
    fn selects(&self, labels: &dyn Fn(&str) -> Option<String>) -> bool {
        let Some(selector) = &self.selector else { return true };
        let labels_match = selector.match_labels.iter().flatten().all(|(k, v)| labels(k).as_deref() == Some(v.as_str()));
        labels_match
            && selector.match_expressions.iter().flatten().all(|e| {
                let value = labels(&e.key);
                let values = e.values.as_deref().unwrap_or_default();
                match e.operator.as_str() {
                    "In" => value.is_some_and(|v| values.contains(&v)),
                    "NotIn" => value.is_none_or(|v| !values.contains(&v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }

    /// How many addresses it has.
    pub fn size(&self) -> u128 {
        self.ranges.iter().map(|(a, b)| b.n - a.n + 1).sum()
    }
}

/// A LoadBalancer Service, as IPAM sees it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub name: ServiceName,
    pub created: Option<i64>,
    /// The families it is served in (those of its cluster IPs).
    pub families: Vec<Family>,
    /// (protocol, port) of each of its ports.
    pub ports: Vec<(u8, u16)>,
    pub labels: Vec<(String, String)>,
    /// Addresses it asks for; an unparseable one is an error of its own.
    pub requested: Vec<Result<IpAddr, String>>,
    pub sharing_key: Option<String>,
    /// Addresses it holds (its status, or an earlier assignment).
    pub held: Vec<IpAddr>,
    /// It is this agent's to serve even if no pool selects it: it asks this agent for an
    /// address (the annotation), or this agent gave it one before.
    pub claimed: bool,
}

impl Request {
    /// The request a Service makes; `None` when it is not ours to serve (not a
    /// LoadBalancer, or of another `loadBalancerClass`). `held_before`: addresses it had from
    /// this agent (or from an earlier one, read back from the pinned maps); `served_before`:
    /// this agent served it (a pool that selected it may be gone).
    pub fn of(svc: &crate::source::model::Service, name: &ServiceName, families: Vec<Family>, held_before: &[IpAddr], served_before: bool) -> Option<Self> {
        let lb = svc.load_balancer.as_deref()?;
        if lb.class.as_deref().is_some_and(|c| c != LOAD_BALANCER_CLASS) {
            return None;
        }
        let spec = svc.spec.as_ref()?;
        let ports = spec.ports.iter().flatten().map(|p| (if p.protocol.as_deref() == Some("UDP") { lb_common::IPPROTO_UDP } else { lb_common::IPPROTO_TCP }, p.port as u16)).collect();
        let annotation = svc.metadata.annotations.get(LB_IPS_ANNOTATION).unwrap_or_default();
        let asked = lb.requested_ip.iter().map(|s| (s.as_str(), "spec.loadBalancerIP")).chain(annotation.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| (s, LB_IPS_ANNOTATION)));
        let requested = asked.map(|(s, field)| s.parse::<IpAddr>().map_err(|_| format!("{field}: {s:?} is not an IP address"))).collect();
        let mut held: Vec<IpAddr> = lb.ingress.iter().filter_map(|i| i.ip.as_deref()?.parse().ok()).collect();
        for ip in held_before {
            if !held.contains(ip) {
                held.push(*ip);
            }
        }
        let mut labels: Vec<(String, String)> = lb.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        labels.push(("io.kubernetes.service.namespace".into(), name.split_once('/').map_or("", |(ns, _)| ns).into()));
        labels.push(("io.kubernetes.service.name".into(), name.split_once('/').map_or("", |(_, n)| n).into()));
        let claimed = !annotation.is_empty() || served_before;
        Some(Self { name: name.clone(), created: svc.metadata.created, families, ports, labels, requested, sharing_key: svc.metadata.annotations.get(SHARING_KEY_ANNOTATION).map(String::from), held, claimed })
    }

    fn label(&self, key: &str) -> Option<String> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }
}

/// What a Service was given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Each address and the pool it is from.
    pub addrs: Vec<(IpAddr, Arc<str>)>,
    /// Why it has fewer addresses than it asks for (or none).
    pub error: Option<String>,
}

/// Who holds an address: the Services, their sharing key and ports.
#[derive(Default)]
struct Holders(Vec<(ServiceName, Option<String>, Vec<(u8, u16)>)>);

impl Holders {
    /// Whether `req` may hold the address too; else, who is in the way.
    fn admits(&self, req: &Request) -> Result<(), String> {
        for (holder, key, ports) in &self.0 {
            let same_key = key.is_some() && *key == req.sharing_key;
            if !same_key {
                return Err(format!("already used by Service {holder} (Services share an address only with the same {SHARING_KEY_ANNOTATION} and different ports)"));
            }
            if let Some((_, port)) = ports.iter().find(|p| req.ports.contains(p)) {
                return Err(format!("already used by Service {holder} on port {port}: with the same {SHARING_KEY_ANNOTATION}, ports must differ"));
            }
        }
        Ok(())
    }
}

/// The assignment of every request this agent serves: those a pool selects, and those it has
/// claimed (see [`Request::claimed`]). A Service that is neither is left alone (its status
/// may come from another implementation). `pools` are the valid pools.
pub fn assign(pools: &[Pool], requests: &[Request]) -> BTreeMap<ServiceName, Assignment> {
    let mut pools: Vec<&Pool> = pools.iter().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let served = |req: &&Request| req.claimed || pools.iter().any(|p| p.selects(&|k| req.label(k)));
    let mut order: Vec<&Request> = requests.iter().filter(served).collect();
    order.sort_by(|a, b| (a.created.unwrap_or(i64::MAX), &a.name).cmp(&(b.created.unwrap_or(i64::MAX), &b.name)));
    let mut taken: BTreeMap<Num, Holders> = BTreeMap::new();
    let mut out: BTreeMap<ServiceName, Assignment> = order.iter().map(|r| (r.name.clone(), Assignment::default())).collect();
    let selecting = |req: &Request| -> Vec<&Pool> { pools.iter().copied().filter(|p| p.selects(&|k| req.label(k))).collect() };
    let pool_of = |req: &Request, ip: Num| selecting(req).into_iter().find(|p| p.contains(ip)).map(|p| p.name.clone());
    let give = |taken: &mut BTreeMap<Num, Holders>, out: &mut BTreeMap<ServiceName, Assignment>, req: &Request, ip: Num, pool: Arc<str>| {
        taken.entry(ip).or_default().0.push((req.name.clone(), req.sharing_key.clone(), req.ports.clone()));
        out.get_mut(&req.name).expect("every request has an entry").addrs.push((ip.ip(), pool));
    };
    let mut errors: BTreeMap<ServiceName, Vec<String>> = BTreeMap::new();

    // 1. What Services hold stays theirs while a pool selecting them contains it.
    for req in &order {
        let asked: BTreeSet<IpAddr> = req.requested.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
        for &ip in &req.held {
            let num = Num::of(ip);
            let wanted = if asked.is_empty() { req.families.contains(&num.family()) } else { asked.contains(&ip) };
            let Some(pool) = pool_of(req, num).filter(|_| wanted) else { continue };
            if taken.get(&num).is_none_or(|h| h.admits(req).is_ok()) && !out[&req.name].addrs.iter().any(|(a, _)| Num::of(*a).v6 == num.v6) {
                give(&mut taken, &mut out, req, num, pool);
            }
        }
    }
    // 2. Addresses asked for.
    for req in order.iter().filter(|r| !r.requested.is_empty()) {
        for asked in &req.requested {
            let ip = match asked {
                Ok(ip) => *ip,
                Err(e) => {
                    errors.entry(req.name.clone()).or_default().push(e.clone());
                    continue;
                }
            };
            let num = Num::of(ip);
            if out[&req.name].addrs.iter().any(|(a, _)| *a == ip) {
                continue;
            }
            if !req.families.contains(&num.family()) {
                errors.entry(req.name.clone()).or_default().push(format!("{ip} is {} but the Service has no {} cluster IP", num.family(), num.family()));
                continue;
            }
            let Some(pool) = pool_of(req, num) else {
                errors.entry(req.name.clone()).or_default().push(format!("{ip} is outside every pool that serves this Service"));
                continue;
            };
            match taken.get(&num).map(|h| h.admits(req)) {
                Some(Err(why)) => errors.entry(req.name.clone()).or_default().push(format!("{ip} is {why}")),
                _ => give(&mut taken, &mut out, req, num, pool),
            }
        }
    }
    // 3. The rest: one address per family served.
    for req in order.iter().filter(|r| r.requested.is_empty()) {
        let pools = selecting(req);
        for &family in &req.families {
            let v6 = family == Family::V6;
            if out[&req.name].addrs.iter().any(|(a, _)| a.is_ipv6() == v6) {
                continue;
            }
            if pools.is_empty() {
                errors.entry(req.name.clone()).or_default().push("no LoadBalancerIPPool serves this Service".into());
                break;
            }
            // An address its sharing key already uses, with other ports.
            let shared = req.sharing_key.as_ref().and_then(|_| {
                taken.iter().find(|(ip, holders)| ip.v6 == v6 && holders.admits(req).is_ok() && pools.iter().any(|p| p.contains(**ip))).map(|(ip, _)| *ip)
            });
            let free = shared.or_else(|| pools.iter().find_map(|p| first_free(p, v6, &taken)));
            match free {
                Some(ip) => {
                    let pool = pool_of(req, ip).expect("found in a selecting pool");
                    give(&mut taken, &mut out, req, ip, pool);
                }
                None => {
                    let names: Vec<&str> = pools.iter().filter(|p| p.ranges.iter().any(|(a, _)| a.v6 == v6)).map(|p| &*p.name).collect();
                    let why = if names.is_empty() { format!("no pool that serves this Service has {family} addresses") } else { format!("no free {family} address in pool {}", names.join(", ")) };
                    errors.entry(req.name.clone()).or_default().push(why);
                }
            }
        }
        // What it held and lost (its pool deleted or changed) is said, even when replaced.
        for ip in &req.held {
            if !out[&req.name].addrs.iter().any(|(a, _)| a == ip) && pool_of(req, Num::of(*ip)).is_none() {
                errors.entry(req.name.clone()).or_default().push(format!("{ip} is no longer in a pool that serves this Service"));
            }
        }
    }
    for (name, why) in errors {
        out.get_mut(&name).expect("every request has an entry").error = Some(why.join("; "));
    }
    out
}

/// The first address of `pool` of the family that nobody holds.
fn first_free(pool: &Pool, v6: bool, taken: &BTreeMap<Num, Holders>) -> Option<Num> {
    for &(start, end) in pool.ranges.iter().filter(|(a, _)| a.v6 == v6) {
        let mut candidate = start;
        // Held addresses in this range, in order: step past each one that is the candidate.
        for (held, _) in taken.range(start..=end) {
            if *held != candidate {
                break;
            }
            if candidate.n == end.n {
                break;
            }
            candidate.n += 1;
        }
        if !taken.contains_key(&candidate) && candidate.n <= end.n {
            return Some(candidate);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::model::IpPool;

    fn pool(name: &str, blocks: serde_json::Value, extra: serde_json::Value) -> Pool {
        let mut spec = serde_json::json!({"blocks": blocks});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let object: IpPool = serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "spec": spec})).unwrap();
        Pool::parse(&object).unwrap()
    }

    fn req(name: &str, created: i64) -> Request {
        Request { name: format!("ns/{name}").into(), created: Some(created), families: vec![Family::V4], ports: vec![(6, 80)], ..Default::default() }
    }

    fn ips(a: &Assignment) -> Vec<String> {
        a.addrs.iter().map(|(ip, pool)| format!("{ip}@{pool}")).collect()
    }

    #[test]
    fn cidr_blocks_skip_their_first_and_last_address_unless_allowed() {
        let p = pool("p", serde_json::json!([{"cidr": "10.0.0.0/30"}]), serde_json::json!({}));
        assert_eq!((p.size(), first_free(&p, false, &BTreeMap::new()).unwrap().ip().to_string()), (2, "10.0.0.1".into()));
        let p = pool("p", serde_json::json!([{"cidr": "10.0.0.0/30"}]), serde_json::json!({"allowFirstLastIPs": true}));
        assert_eq!(p.size(), 4);
        assert_eq!(pool("p", serde_json::json!([{"cidr": "10.0.0.7/32"}, {"cidr": "fd00::/127"}]), serde_json::json!({})).size(), 3);
        let bad = |blocks| Pool::parse(&serde_json::from_value(serde_json::json!({"metadata": {"name": "b"}, "spec": {"blocks": blocks}})).unwrap()).unwrap_err();
        assert_eq!(bad(serde_json::json!([{"start": "10.0.0.9", "stop": "10.0.0.1"}])), "spec.blocks[0]: start 10.0.0.9 is after stop 10.0.0.1");
        assert_eq!(bad(serde_json::json!([{"cidr": "10.0.0.0/33"}])).split(':').next(), Some("spec.blocks[0].cidr"));
        assert_eq!(bad(serde_json::json!([])), "spec.blocks: a pool needs at least one block");
    }

    #[test]
    fn oldest_first_from_the_first_pool_and_stable_when_one_leaves() {
        let pools = [pool("b", serde_json::json!([{"start": "10.0.1.1", "stop": "10.0.1.1"}]), serde_json::json!({})), pool("a", serde_json::json!([{"start": "10.0.0.1", "stop": "10.0.0.2"}]), serde_json::json!({}))];
        let out = assign(&pools, &[req("new", 20), req("old", 10), req("newest", 30), req("overflow", 40)]);
        assert_eq!(ips(&out[&ServiceName::from("ns/old")]), ["10.0.0.1@a"]);
        assert_eq!(ips(&out[&ServiceName::from("ns/new")]), ["10.0.0.2@a"]);
        assert_eq!(ips(&out[&ServiceName::from("ns/newest")]), ["10.0.1.1@b"], "pool a full: the next pool by name");
        let overflow = &out[&ServiceName::from("ns/overflow")];
        assert_eq!((overflow.addrs.len(), overflow.error.as_deref()), (0, Some("no free IPv4 address in pool a, b")));
        // "old" leaves: the others keep what they hold, the freed address goes to the waiting one.
        let held = |name: &str, ip: &str| Request { held: vec![ip.parse().unwrap()], ..req(name, if name == "new" { 20 } else { 30 }) };
        let out = assign(&pools, &[held("new", "10.0.0.2"), held("newest", "10.0.1.1"), req("overflow", 40)]);
        assert_eq!(ips(&out[&ServiceName::from("ns/new")]), ["10.0.0.2@a"]);
        assert_eq!(ips(&out[&ServiceName::from("ns/newest")]), ["10.0.1.1@b"]);
        assert_eq!(ips(&out[&ServiceName::from("ns/overflow")]), ["10.0.0.1@a"]);
    }

    #[test]
    fn requested_addresses_outside_pools_or_taken_are_errors() {
        let pools = [pool("a", serde_json::json!([{"cidr": "10.0.0.0/29"}]), serde_json::json!({}))];
        let asking = |name: &str, created, ip: &str| Request { requested: vec![ip.parse().map_err(|_| "bad".to_string())], ..req(name, created) };
        let out = assign(&pools, &[asking("first", 1, "10.0.0.5"), asking("second", 2, "10.0.0.5"), asking("outside", 3, "192.0.2.1"), req("auto", 4)]);
        assert_eq!(ips(&out[&ServiceName::from("ns/first")]), ["10.0.0.5@a"]);
        let second = &out[&ServiceName::from("ns/second")];
        assert!(second.addrs.is_empty());
        assert!(second.error.as_deref().unwrap().starts_with("10.0.0.5 is already used by Service ns/first"), "{second:?}");
        assert_eq!(out[&ServiceName::from("ns/outside")].error.as_deref(), Some("192.0.2.1 is outside every pool that serves this Service"));
        assert_eq!(ips(&out[&ServiceName::from("ns/auto")]), ["10.0.0.1@a"]);
    }

    #[test]
    fn a_sharing_key_shares_an_address_between_different_ports_only() {
        let pools = [pool("a", serde_json::json!([{"start": "10.0.0.1", "stop": "10.0.0.3"}]), serde_json::json!({}))];
        let keyed = |name: &str, created, port: u16| Request { sharing_key: Some("k".into()), ports: vec![(6, port)], ..req(name, created) };
        let out = assign(&pools, &[keyed("http", 1, 80), keyed("dns", 2, 53), keyed("http2", 3, 80)]);
        assert_eq!(ips(&out[&ServiceName::from("ns/http")]), ["10.0.0.1@a"]);
        assert_eq!(ips(&out[&ServiceName::from("ns/dns")]), ["10.0.0.1@a"], "same key, other port: shared");
        assert_eq!(ips(&out[&ServiceName::from("ns/http2")]), ["10.0.0.2@a"], "same key, same port: an address of its own");
        // Asking for an address in use, with the key but a clashing port, is an error.
        let holding = |name: &str, created, port| Request { held: vec!["10.0.0.1".parse().unwrap()], ..keyed(name, created, port) };
        let clash = Request { requested: vec![Ok("10.0.0.1".parse().unwrap())], ..keyed("clash", 4, 53) };
        let out = assign(&pools, &[holding("http", 1, 80), holding("dns", 2, 53), clash]);
        assert!(out[&ServiceName::from("ns/clash")].error.as_deref().unwrap().contains("on port 53"));
    }

    #[test]
    fn a_deleted_pool_moves_its_services_or_says_why_not() {
        let b = pool("b", serde_json::json!([{"cidr": "10.0.1.0/30"}]), serde_json::json!({}));
        let held = Request { held: vec!["10.0.0.1".parse().unwrap()], claimed: true, ..req("web", 1) };
        // Pool a (10.0.0.0/24) is gone; b takes the Service, and the loss is said.
        let out = assign(std::slice::from_ref(&b), std::slice::from_ref(&held));
        let web = &out[&ServiceName::from("ns/web")];
        assert_eq!(ips(web), ["10.0.1.1@b"]);
        assert_eq!(web.error.as_deref(), Some("10.0.0.1 is no longer in a pool that serves this Service"));
        // No pool left at all.
        let out = assign(&[], &[held]);
        assert_eq!(out[&ServiceName::from("ns/web")].error.as_deref(), Some("no LoadBalancerIPPool serves this Service; 10.0.0.1 is no longer in a pool that serves this Service"));
    }

    #[test]
    fn services_of_another_load_balancer_class_are_left_alone() {
        let svc = |class: Option<&str>, kind: &str| -> crate::source::model::Service {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": {"type": kind, "clusterIP": "10.96.0.1", "loadBalancerClass": class, "ports": [{"port": 80}]}})).unwrap()
        };
        let request = |s: &crate::source::model::Service| Request::of(s, &"ns/web".into(), vec![Family::V4], &[], false);
        assert!(request(&svc(None, "LoadBalancer")).is_some());
        assert!(request(&svc(Some(LOAD_BALANCER_CLASS), "LoadBalancer")).is_some());
        assert!(request(&svc(Some("example.com/other"), "LoadBalancer")).is_none());
        assert!(request(&svc(None, "ClusterIP")).is_none());
    }

    #[test]
    fn selectors_and_families() {
        let pools = [
            pool("team-a", serde_json::json!([{"cidr": "10.0.0.0/29"}, {"cidr": "fd00::/120"}]), serde_json::json!({"serviceSelector": {"matchLabels": {"team": "a"}}})),
            pool("ns-b", serde_json::json!([{"cidr": "10.0.1.0/29"}]), serde_json::json!({"serviceSelector": {"matchExpressions": [{"key": "io.kubernetes.service.namespace", "operator": "In", "values": ["b"]}]}})),
        ];
        let team_a = Request { labels: vec![("team".into(), "a".into())], families: vec![Family::V4, Family::V6], ..req("dual", 1) };
        let in_b = Request { name: "b/web".into(), labels: vec![("io.kubernetes.service.namespace".into(), "b".into())], ..req("x", 2) };
        let nobody = req("none", 3);
        let annotated = Request { requested: vec![Ok("10.0.0.2".parse().unwrap())], claimed: true, ..req("annotated", 4) };
        let out = assign(&pools, &[team_a, in_b, nobody, annotated]);
        assert_eq!(ips(&out[&ServiceName::from("ns/dual")]), ["10.0.0.1@team-a", "fd00::1@team-a"]);
        assert_eq!(ips(&out[&ServiceName::from("b/web")]), ["10.0.1.1@ns-b"]);
        assert!(!out.contains_key(&ServiceName::from("ns/none")), "no pool selects it and it asked nothing of this agent: left alone");
        assert_eq!(out[&ServiceName::from("ns/annotated")].error.as_deref(), Some("10.0.0.2 is outside every pool that serves this Service"));
    }
}
