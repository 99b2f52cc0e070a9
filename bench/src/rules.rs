//! kube-proxy-style rule sets for the same Services, to measure against: iptables (a linear
//! KUBE-SERVICES chain, per-service chains choosing an endpoint with `statistic --mode
//! random`, per-endpoint DNAT chains) and nftables (a verdict map from address, protocol and
//! port to per-service chains that pick an endpoint with `numgen random`).
use std::{fmt::Write as _, net::Ipv4Addr};

/// One Service: a virtual IP on port 80 and its endpoints on port 8080.
pub struct Service {
    pub vip: Ipv4Addr,
    pub endpoints: Vec<Ipv4Addr>,
}

/// A stable 16-hex-digit tag per service and endpoint, as kube-proxy's hashed chain names.
fn tag(i: usize, e: usize) -> String {
    format!("{:016X}", ((i as u64) << 8 | e as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The `iptables-restore --noflush` input of a full sync: declaring a chain flushes it.
pub fn iptables_restore(services: &[Service]) -> String {
    let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for (i, s) in services.iter().enumerate() {
        writeln!(out, ":KUBE-SVC-{} - [0:0]", &tag(i, 255)[..16]).unwrap();
        for e in 0..s.endpoints.len() {
            writeln!(out, ":KUBE-SEP-{} - [0:0]", &tag(i, e)[..16]).unwrap();
        }
    }
    for (i, s) in services.iter().enumerate() {
        let svc = format!("KUBE-SVC-{}", &tag(i, 255)[..16]);
        writeln!(out, "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j {svc}", s.vip).unwrap();
        let n = s.endpoints.len();
        for (e, ep) in s.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", &tag(i, e)[..16]);
            if e + 1 < n {
                writeln!(out, "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}", 1.0 / (n - e) as f64).unwrap();
            } else {
                writeln!(out, "-A {svc} -j {sep}").unwrap();
            }
            writeln!(out, "-A {sep} -p tcp -m tcp -j DNAT --to-destination {ep}:8080").unwrap();
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// Chains and map element of one Service in the nftables ruleset.
fn nft_service(out: &mut String, i: usize, s: &Service, verb: &str) {
    let svc = format!("service-{}", &tag(i, 255)[..16]);
    writeln!(out, "{verb} chain ip kube-proxy {svc}").unwrap();
    let mut choices = Vec::new();
    for (e, ep) in s.endpoints.iter().enumerate() {
        let chain = format!("endpoint-{}", &tag(i, e)[..16]);
        writeln!(out, "{verb} chain ip kube-proxy {chain}").unwrap();
        writeln!(out, "add rule ip kube-proxy {chain} meta l4proto tcp dnat to {ep}:8080").unwrap();
        choices.push(format!("{e} : goto {chain}"));
    }
    writeln!(out, "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}", s.endpoints.len(), choices.join(", ")).unwrap();
    writeln!(out, "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto {svc} }}", s.vip).unwrap();
}

/// The whole nftables ruleset (`nft -f`).
pub fn nft_ruleset(services: &[Service]) -> String {
    let mut out = String::from(
        "add table ip kube-proxy\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; policy accept ; }\n\
         add rule ip kube-proxy nat-prerouting ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    for (i, s) in services.iter().enumerate() {
        nft_service(&mut out, i, s, "add");
    }
    out
}

/// An incremental update adding Service number `i` (what kube-proxy's nftables mode sends
/// for one new Service).
pub fn nft_add_one(i: usize, s: &Service) -> String {
    let mut out = String::new();
    nft_service(&mut out, i, s, "add");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<Service> {
        (0..2).map(|i| Service { vip: Ipv4Addr::new(10, 100, 0, i + 1), endpoints: (11..14).map(|h| Ipv4Addr::new(10, 244, 1, h)).collect() }).collect()
    }

    #[test]
    fn iptables_rules_chain_services_to_endpoints() {
        let r = iptables_restore(&two());
        assert_eq!(r.matches("-A KUBE-SERVICES -d ").count(), 2);
        assert_eq!(r.matches("-j DNAT --to-destination").count(), 6);
        assert!(r.contains("--probability 0.33333333333") && r.contains("--probability 0.50000000000"));
        assert!(r.starts_with("*nat\n") && r.ends_with("COMMIT\n"));
        // Chain names fit iptables' 28-character limit.
        assert!(r.lines().filter(|l| l.starts_with(':')).all(|l| l.split_whitespace().next().unwrap().len() <= 29));
    }

    #[test]
    fn nft_ruleset_maps_every_service() {
        let r = nft_ruleset(&two());
        assert_eq!(r.matches("add element ip kube-proxy service-ips").count(), 2);
        assert_eq!(r.matches("dnat to 10.244.1.").count(), 6);
        assert!(nft_add_one(5, &two()[0]).contains("add element ip kube-proxy service-ips { 10.100.0.1 . tcp . 80"));
    }
}
