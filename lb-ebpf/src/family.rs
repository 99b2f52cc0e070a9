//! The two address families as the programs see them: the maps that hold each family's
//! entries and where its header keeps the addresses. Decisions and rewrites are written once,
//! generic over [`Family`]; only what differs is here.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_redir_neigh},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::*;

use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    maps::*,
    parse::{parse_ipv4, parse_ipv6, ptr_at, IcmpError, Packet, Parsed},
};

pub trait Family: MapAddr + 'static {
    /// Parses the IP layer whose header is at `l3_off` into `out`.
    fn parse(data: usize, data_end: usize, l3_off: usize, out: &mut Scratch<Self>) -> Parsed;

    /// Offsets of the source and destination addresses in the IP header.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// Offset of the IP header's own checksum (IPv4), which covers the addresses; IPv6 has none.
    const HEADER_CSUM_OFF: Option<usize>;

    fn services() -> &'static HashMap<ServiceKeyV1<Self>, ServiceV1>;
    fn backends() -> &'static Array<BackendV1<Self>>;
    fn conntrack() -> &'static HashMap<CtKeyV1<Self>, CtEntryV1<Self>>;
    fn reverse_nat() -> &'static HashMap<CtKeyV1<Self>, RevNatV1<Self>>;
    /// Next hops of replies routed here, by route key.
    fn next_hops() -> &'static LruHashMap<NextHopKeyV1<Self>, NextHopV1>;
    /// Next hops towards backends, by backend id, per CPU.
    fn backend_next_hops() -> &'static PerCpuArray<BackendNextHopV1<Self>>;
    /// This node's addresses, where NodePorts answer.
    fn node_ips() -> &'static HashMap<Self, u32>;
    fn source_ranges() -> &'static LpmTrie<SourceRangeV1<Self>, u8>;
    /// NetworkPolicy: address -> identity, this node's isolated pods, flows a policy allowed.
    fn ipcache() -> &'static LpmTrie<IpCacheKeyV1<Self>, IdentityV1>;
    fn ipcache_hosts() -> &'static HashMap<IpCacheKeyV1<Self>, IdentityV1>;
    fn policy_endpoints() -> &'static HashMap<PolicyEndpointKeyV1<Self>, PolicyEndpointV1>;
    fn policy_flows() -> &'static LruHashMap<CtKeyV1<Self>, u8>;
    /// This family's per-CPU scratch space.
    fn scratch() -> &'static PerCpuArray<Scratch<Self>>;
    fn affinity_key(client: Self, service_id: u32) -> AffinityKeyV1;
    /// Source of flows SNATed to remote backends; zero when the node has none of this family.
    fn snat_addr(cfg: &ConfigV1) -> Self;
    /// Source of hairpin flows (a pod that reached itself through a Service).
    fn hairpin_addr() -> Self;
    /// The length of the IP datagram whose header is at `l3_off`, as the header says.
    fn datagram_len(data: usize, data_end: usize, l3_off: usize) -> Option<u32>;

    /// Bytes an ICMP error puts in front of the datagram it quotes: an IP and an ICMP header.
    const ICMP_ERROR_GROWTH: usize;
    /// ICMP type and code of "port unreachable".
    const PORT_UNREACHABLE: [u8; 2];
    /// One's-complement sum of the IP headers an ICMP error quotes (`l3_off..l4_off`); `None`
    /// when they are longer than an error quotes.
    fn quoted_header_sum(data: usize, data_end: usize, l3_off: usize, l4_off: usize) -> Option<u32>;
    /// Writes the IP header of an ICMP error of `icmp_len` bytes at `ip_off`, back to the
    /// sender of the datagram it quotes (whose header is at `quoted_off`); returns what its
    /// pseudo-header adds to the ICMP checksum (ICMPv6 has one, ICMP none).
    fn write_error_header(data: usize, data_end: usize, ip_off: usize, quoted_off: usize, icmp_len: usize) -> Option<u32>;

    /// The protocol number of this family's ICMP.
    const ICMP_PROTO: u8;
    /// The address family (`AF_INET`, `AF_INET6`) for FIB lookups.
    const AF: u8;
    fn set_fib_addrs(p: &mut bpf_fib_lookup, src: Self, dst: Self);
    /// Copies the FIB's answer (its destination, or gateway) as the next hop to resolve.
    fn set_next_hop(nh: &mut bpf_redir_neigh, p: &bpf_fib_lookup);
}

/// The IPv6 header and extension headers an ICMPv6 error quotes in full, at most (with 8
/// bytes of UDP, the quote then stays under 160 bytes).
const MAX_QUOTED_HEADERS: usize = Ipv6Hdr::LEN + 64;

/// The one's-complement sum of an address's raw words.
#[inline(always)]
fn sum_addr<A: MapAddr>(addr: &A) -> u32 {
    let words = addr.words();
    let mut sum = 0;
    for i in 0..words.len() {
        sum += (words[i] & 0xffff) + (words[i] >> 16);
    }
    sum
}

/// The working space of one packet, per CPU: what does not fit on the 512-byte BPF stack
/// beside the rest of an IPv6 path (the verifier counts every frame of a chain of calls).
/// Both hooks run in softirq context, so one CPU never interleaves two packets' use of it.
#[repr(C)]
pub struct Scratch<A: MapAddr> {
    /// The packet as parsed (or the ICMP error).
    pub pkt: Packet<A>,
    pub err: IcmpError<A>,
    pub new_flow: NewFlow<A>,
    /// A translated packet's tuple as it travels on, for the pod's egress policy.
    pub travelling: CtKeyV1<A>,
    /// A routed packet's next-hop cache key and entry.
    pub route_key: NextHopKeyV1<A>,
    pub route: NextHopV1,
}

/// A new flow's entries, before they go into the conntrack and reverse-NAT maps.
#[repr(C)]
pub struct NewFlow<A: MapAddr> {
    /// The reply as it will arrive.
    pub reply: CtKeyV1<A>,
    pub ct: CtEntryV1<A>,
    pub rnat: RevNatV1<A>,
}

/// Parses the IP layer into `out`, from a stack frame of its own (a BPF-to-BPF call): walking
/// IPv6 extension headers takes stack that the rest of the path needs.
#[inline(never)]
pub fn parse_into<A: Family>(data: usize, data_end: usize, l3_off: usize, out: &mut Scratch<A>) -> Parsed {
    A::parse(data, data_end, l3_off, out)
}

/// Whether `client` is inside one of the frontend's loadBalancerSourceRanges.
#[inline(always)]
pub fn source_allowed<A: Family>(service_id: u32, client: A) -> bool {
    let bits = SourceRangeV1::<A>::SERVICE_BITS + 32 * client.words().len() as u32;
    A::source_ranges().get(&Key::new(bits, SourceRangeV1::new(service_id, client))).is_some()
}

impl Family for Addr4 {
    #[inline(always)]
    fn parse(data: usize, data_end: usize, l3_off: usize, out: &mut Scratch<Self>) -> Parsed {
        parse_ipv4(data, data_end, l3_off, out)
    }
    const SRC_OFF: usize = 12;
    const DST_OFF: usize = 16;
    const HEADER_CSUM_OFF: Option<usize> = Some(10);

    #[inline(always)]
    fn services() -> &'static HashMap<Service4KeyV1, ServiceV1> {
        &LB4_SVC_V1
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend4V1> {
        &LB4_BE_V1
    }
    #[inline(always)]
    fn conntrack() -> &'static HashMap<Ct4KeyV1, Ct4EntryV1> {
        &LB4_CT_V1
    }
    #[inline(always)]
    fn reverse_nat() -> &'static HashMap<Ct4KeyV1, RevNat4V1> {
        &LB4_RNAT_V1
    }
    #[inline(always)]
    fn next_hops() -> &'static LruHashMap<NextHop4KeyV1, NextHopV1> {
        &LB4_NEXTHOP_V1
    }
    #[inline(always)]
    fn backend_next_hops() -> &'static PerCpuArray<BackendNextHop4V1> {
        &LB4_BENH_V1
    }
    #[inline(always)]
    fn node_ips() -> &'static HashMap<u32, u32> {
        &LB4_NODEIP_V1
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange4V1, u8> {
        &LB4_SRCRANGE_V1
    }
    #[inline(always)]
    fn ipcache() -> &'static LpmTrie<IpCache4KeyV1, IdentityV1> {
        &LB4_IPCACHE_V1
    }
    #[inline(always)]
    fn ipcache_hosts() -> &'static HashMap<IpCache4KeyV1, IdentityV1> {
        &LB4_IPHOST_V1
    }
    #[inline(always)]
    fn policy_endpoints() -> &'static HashMap<PolicyEndpoint4KeyV1, PolicyEndpointV1> {
        &LB4_POLEP_V1
    }
    #[inline(always)]
    fn policy_flows() -> &'static LruHashMap<Ct4KeyV1, u8> {
        &LB4_POLCT_V1
    }
    #[inline(always)]
    fn scratch() -> &'static PerCpuArray<Scratch<Self>> {
        &LB4_SCRATCH
    }
    #[inline(always)]
    fn affinity_key(client: u32, service_id: u32) -> AffinityKeyV1 {
        AffinityKeyV1::ip4(client, service_id)
    }
    #[inline(always)]
    fn snat_addr(cfg: &ConfigV1) -> u32 {
        cfg.snat_addr
    }
    #[inline(always)]
    fn hairpin_addr() -> u32 {
        ip4_raw(HAIRPIN_ADDR)
    }
    #[inline(always)]
    fn datagram_len(data: usize, data_end: usize, l3_off: usize) -> Option<u32> {
        let ip = ptr_at::<Ipv4Hdr>(data, data_end, l3_off)?;
        Some(u16::from_be_bytes(unsafe { (*ip).tot_len }) as u32)
    }

    const ICMP_PROTO: u8 = IPPROTO_ICMP;
    const AF: u8 = 2;
    #[inline(always)]
    fn set_fib_addrs(p: &mut bpf_fib_lookup, src: u32, dst: u32) {
        p.__bindgen_anon_3.ipv4_src = src;
        p.__bindgen_anon_4.ipv4_dst = dst;
    }
    #[inline(always)]
    fn set_next_hop(nh: &mut bpf_redir_neigh, p: &bpf_fib_lookup) {
        nh.__bindgen_anon_1.ipv4_nh = unsafe { p.__bindgen_anon_4.ipv4_dst };
    }

    const ICMP_ERROR_GROWTH: usize = Ipv4Hdr::LEN + 8;
    const PORT_UNREACHABLE: [u8; 2] = [3, 3];
    #[inline(always)]
    fn quoted_header_sum(_data: usize, _data_end: usize, _l3_off: usize, _l4_off: usize) -> Option<u32> {
        // A valid IPv4 header, its checksum included, sums to 0xffff.
        Some(0xffff)
    }
    #[inline(always)]
    fn write_error_header(data: usize, data_end: usize, ip_off: usize, quoted_off: usize, icmp_len: usize) -> Option<u32> {
        let [dst, src] = unsafe { *ptr_at::<[[u8; 4]; 2]>(data, data_end, quoted_off + Self::SRC_OFF)? };
        let tot_len = ((Ipv4Hdr::LEN + icmp_len) as u16).to_be_bytes();
        let mut ip = [0x45, 0, tot_len[0], tot_len[1], 0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0, src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3]];
        let csum = (!crate::csum::fold(crate::csum::sum_words(&ip))).to_ne_bytes();
        ip[10] = csum[0];
        ip[11] = csum[1];
        unsafe { *ptr_at::<[u8; Ipv4Hdr::LEN]>(data, data_end, ip_off)? = ip };
        Some(0)
    }
}

impl Family for Addr6 {
    #[inline(always)]
    fn parse(data: usize, data_end: usize, l3_off: usize, out: &mut Scratch<Self>) -> Parsed {
        parse_ipv6(data, data_end, l3_off, out)
    }
    const SRC_OFF: usize = 8;
    const DST_OFF: usize = 24;
    const HEADER_CSUM_OFF: Option<usize> = None;

    #[inline(always)]
    fn services() -> &'static HashMap<Service6KeyV1, ServiceV1> {
        &LB6_SVC_V1
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend6V1> {
        &LB6_BE_V1
    }
    #[inline(always)]
    fn conntrack() -> &'static HashMap<Ct6KeyV1, Ct6EntryV1> {
        &LB6_CT_V1
    }
    #[inline(always)]
    fn reverse_nat() -> &'static HashMap<Ct6KeyV1, RevNat6V1> {
        &LB6_RNAT_V1
    }
    #[inline(always)]
    fn next_hops() -> &'static LruHashMap<NextHop6KeyV1, NextHopV1> {
        &LB6_NEXTHOP_V1
    }
    #[inline(always)]
    fn backend_next_hops() -> &'static PerCpuArray<BackendNextHop6V1> {
        &LB6_BENH_V1
    }
    #[inline(always)]
    fn node_ips() -> &'static HashMap<[u32; 4], u32> {
        &LB6_NODEIP_V1
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange6V1, u8> {
        &LB6_SRCRANGE_V1
    }
    #[inline(always)]
    fn ipcache() -> &'static LpmTrie<IpCache6KeyV1, IdentityV1> {
        &LB6_IPCACHE_V1
    }
    #[inline(always)]
    fn ipcache_hosts() -> &'static HashMap<IpCache6KeyV1, IdentityV1> {
        &LB6_IPHOST_V1
    }
    #[inline(always)]
    fn policy_endpoints() -> &'static HashMap<PolicyEndpoint6KeyV1, PolicyEndpointV1> {
        &LB6_POLEP_V1
    }
    #[inline(always)]
    fn policy_flows() -> &'static LruHashMap<Ct6KeyV1, u8> {
        &LB6_POLCT_V1
    }
    #[inline(always)]
    fn scratch() -> &'static PerCpuArray<Scratch<Self>> {
        &LB6_SCRATCH
    }
    #[inline(always)]
    fn affinity_key(client: [u32; 4], service_id: u32) -> AffinityKeyV1 {
        AffinityKeyV1::ip6(client, service_id)
    }
    #[inline(always)]
    fn snat_addr(_cfg: &ConfigV1) -> [u32; 4] {
        LB6_CONFIG_V1.get(0).map_or([0; 4], |c| c.snat_addr)
    }
    #[inline(always)]
    fn hairpin_addr() -> [u32; 4] {
        ip6_raw(HAIRPIN_ADDR6)
    }
    #[inline(always)]
    fn datagram_len(data: usize, data_end: usize, l3_off: usize) -> Option<u32> {
        let ip = ptr_at::<Ipv6Hdr>(data, data_end, l3_off)?;
        Some(Ipv6Hdr::LEN as u32 + u16::from_be_bytes(unsafe { (*ip).payload_len }) as u32)
    }

    const ICMP_PROTO: u8 = IPPROTO_ICMPV6;
    const AF: u8 = 10;
    #[inline(always)]
    fn set_fib_addrs(p: &mut bpf_fib_lookup, src: [u32; 4], dst: [u32; 4]) {
        p.__bindgen_anon_3.ipv6_src = src;
        p.__bindgen_anon_4.ipv6_dst = dst;
    }
    #[inline(always)]
    fn set_next_hop(nh: &mut bpf_redir_neigh, p: &bpf_fib_lookup) {
        nh.__bindgen_anon_1.ipv6_nh = unsafe { p.__bindgen_anon_4.ipv6_dst };
    }

    const ICMP_ERROR_GROWTH: usize = Ipv6Hdr::LEN + 8;
    const PORT_UNREACHABLE: [u8; 2] = [1, 4];
    #[inline(always)]
    fn quoted_header_sum(data: usize, data_end: usize, l3_off: usize, l4_off: usize) -> Option<u32> {
        // The IPv6 header and its extension headers (a multiple of 8 bytes), up to a bound,
        // summed where they lie: a copy on the stack would cost as many bytes of it and more.
        let len = l4_off.checked_sub(l3_off)?;
        if len > MAX_QUOTED_HEADERS {
            return None;
        }
        let mut sum = 0u32;
        for i in 0..MAX_QUOTED_HEADERS / 2 {
            if 2 * i >= len {
                break;
            }
            // Opaque offsets: LLVM would drop bound checks that the loop bound seems to imply.
            sum += unsafe { *ptr_at::<u16>(data, data_end, core::hint::black_box(l3_off + 2 * i))? } as u32;
        }
        Some(sum)
    }
    #[inline(always)]
    fn write_error_header(data: usize, data_end: usize, ip_off: usize, quoted_off: usize, icmp_len: usize) -> Option<u32> {
        // Both headers as 10 words each, through one pointer apiece, the offset opaque: LLVM
        // drops a bound check that an earlier one implies, and the verifier refuses the access.
        let quoted = ptr_at::<[u32; 10]>(data, data_end, quoted_off)?;
        let ip = ptr_at::<[u32; 10]>(data, data_end, core::hint::black_box(ip_off))?;
        let len = (icmp_len as u16).to_be_bytes();
        let (mut src, mut dst) = ([0u32; 4], [0u32; 4]);
        unsafe {
            for i in 0..4 {
                // Back to the sender: the quote's destination is the error's source.
                src[i] = (*quoted)[6 + i];
                dst[i] = (*quoted)[2 + i];
            }
            (*ip)[0] = u32::from_ne_bytes([0x60, 0, 0, 0]);
            (*ip)[1] = u32::from_ne_bytes([len[0], len[1], IPPROTO_ICMPV6, 64]);
            for i in 0..4 {
                (*ip)[2 + i] = src[i];
                (*ip)[6 + i] = dst[i];
            }
        }
        // Source, destination, upper-layer length and next header (RFC 8200 8.1).
        Some(sum_addr(&src) + sum_addr(&dst) + u16::from_ne_bytes(len) as u32 + u16::from_ne_bytes([0, IPPROTO_ICMPV6]) as u32)
    }
}
