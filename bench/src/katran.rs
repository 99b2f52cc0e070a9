//! Katran's XDP balancer (facebookincubator/katran, `katran/lib/bpf/balancer.bpf.c`, built by
//! `bench/katran/build.sh`), loaded beside `lb_xdp` so that the cost suite measures both by one
//! harness in one run. Set up as Katran's own tests do: one VIP per measured frontend, 100 reals
//! each, a ring of 65,537 slots per VIP, the default gateway's MAC; every VIP packet leaves
//! IPIP-encapsulated (XDP_TX).
use std::net::Ipv4Addr;

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader, Pod,
};
use testbed::progtest::xdp_md;

/// From `balancer_consts.h`.
const RING_SIZE: u32 = 65_537;
const PROGRAM: &str = "balancer_ingress";

/// `struct vip_definition`: an address (IPv4 in the first word), port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct VipDefinition {
    addr: [u32; 4],
    port: u16,
    proto: u8,
    _pad: u8,
}

/// `struct vip_meta`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct VipMeta {
    flags: u32,
    vip_num: u32,
}

/// `struct real_definition`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RealDefinition {
    addr: [u32; 4],
    flags: u8,
    _pad: [u8; 3],
}

/// `struct flow_key`: addresses, ports and protocol (40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FlowKey([u32; 10]);

/// `struct ctl_value`: here the default gateway's MAC.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CtlValue {
    mac: [u8; 8],
}

// SAFETY: plain C structs of integers, padding spelled out.
unsafe impl Pod for VipDefinition {}
unsafe impl Pod for VipMeta {}
unsafe impl Pod for RealDefinition {}
unsafe impl Pod for CtlValue {}
unsafe impl Pod for FlowKey {}

/// A VIP to program: address, port, protocol and its reals.
pub struct Vip {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub reals: Vec<[u8; 4]>,
}

pub struct Katran {
    ebpf: Ebpf,
}

impl Katran {
    /// Loads `object` with its flow cache sized for `flows` and programs `vips`.
    pub fn load(object: &[u8], vips: &[Vip], flows: u32) -> Result<Self> {
        // Katran's loader gives each CPU an LRU of its own in `lru_mapping`; with none there, the
        // program uses `fallback_cache`, sized here like lb_xdp's conntrack.
        let mut ebpf = EbpfLoader::new().map_max_entries("fallback_cache", flows).load(object).context("loading the Katran object")?;
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM).context("no balancer_ingress in the Katran object")?.try_into()?;
        prog.load().context("verifier rejected Katran's balancer_ingress")?;
        let mut katran = Self { ebpf };
        katran.program(vips)?;
        Ok(katran)
    }

    fn program(&mut self, vips: &[Vip]) -> Result<()> {
        let mut real_num = 1u32;
        for (vip_num, vip) in vips.iter().enumerate() {
            let key = VipDefinition { addr: [u32::from_ne_bytes(vip.addr), 0, 0, 0], port: vip.port.to_be(), proto: vip.proto, _pad: 0 };
            let mut vip_map: HashMap<&mut MapData, VipDefinition, VipMeta> = HashMap::try_from(self.ebpf.map_mut("vip_map").context("vip_map")?)?;
            vip_map.insert(&key, &VipMeta { flags: 0, vip_num: vip_num as u32 }, 0)?;
            let first = real_num;
            let mut reals: Array<&mut MapData, RealDefinition> = Array::try_from(self.ebpf.map_mut("reals").context("reals")?)?;
            for real in &vip.reals {
                reals.set(real_num, &RealDefinition { addr: [u32::from_ne_bytes(*real), 0, 0, 0], ..Default::default() }, 0)?;
                real_num += 1;
            }
            // The ring as Katran's Maglev fills it matters little here: any real per slot.
            let mut ring: Array<&mut MapData, u32> = Array::try_from(self.ebpf.map_mut("ch_rings").context("ch_rings")?)?;
            let count = vip.reals.len() as u32;
            for slot in 0..RING_SIZE {
                ring.set(vip_num as u32 * RING_SIZE + slot, &(first + slot % count), 0)?;
            }
        }
        let mut ctl: Array<&mut MapData, CtlValue> = Array::try_from(self.ebpf.map_mut("ctl_array").context("ctl_array")?)?;
        ctl.set(0, &CtlValue { mac: [2, 0, 0, 0, 0, 0xfe, 0, 0] }, 0)?;
        Ok(())
    }

    /// One run on `packet` (arriving on device `ingress`, else loopback): the verdict, the
    /// kernel's time in ns and the packet as it left.
    pub fn run(&self, packet: &[u8], ingress: Option<u32>) -> Result<(u32, f64, Vec<u8>)> {
        self.test_run(packet, ingress, 1)
    }

    /// `repeat` runs on `packet` (one that Katran leaves as it was, so that every iteration
    /// takes the same path): the verdict and the kernel's mean ns.
    pub fn time(&self, packet: &[u8], ingress: Option<u32>, repeat: u32) -> Result<(u32, f64)> {
        self.test_run(packet, ingress, repeat).map(|(verdict, ns, _)| (verdict, ns))
    }

    fn test_run(&self, packet: &[u8], ingress: Option<u32>, repeat: u32) -> Result<(u32, f64, Vec<u8>)> {
        let prog: &Xdp = self.ebpf.program(PROGRAM).context("no balancer_ingress")?.try_into()?;
        let mut out = vec![0u8; packet.len() + 256];
        let ctx = ingress.map(|ingress| xdp_md(packet, ingress));
        let options = TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), ctx_in: ctx.as_deref(), repeat, ..Default::default() };
        let result = prog.test_run(options).context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, result.duration.as_nanos() as f64, out))
    }

    /// Flows in Katran's flow cache: a new flow that skipped it (as Katran does past its
    /// new-connection rate limit) would cost less than one that did not.
    pub fn flows(&self) -> Result<usize> {
        let cache: HashMap<&MapData, FlowKey, [u8; 16]> = HashMap::try_from(self.ebpf.map("fallback_cache").context("fallback_cache")?)?;
        Ok(cache.keys().count())
    }

    /// Checks that a VIP packet left IPIP-encapsulated towards one of `reals`.
    pub fn check_encapsulated(out: &[u8], reals: &[[u8; 4]]) -> Result<()> {
        let outer = etherparse::Ipv4HeaderSlice::from_slice(out.get(14..).context("no IP header")?)?;
        ensure!(outer.protocol() == etherparse::IpNumber::IPV4, "Katran sent protocol {:?}, not IPIP", outer.protocol());
        let to = outer.destination();
        ensure!(reals.contains(&to), "Katran sent to {}, not a real", Ipv4Addr::from(to));
        Ok(())
    }
}
