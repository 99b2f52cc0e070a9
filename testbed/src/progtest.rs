//! A loaded copy of the kernel programs on a private bpffs, for program tests
//! (BPF_PROG_TEST_RUN) and per-packet benchmarks. Everything it creates is removed on drop.
use anyhow::{Context, Result};
use aya::{
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
    Ebpf,
};
use lb_agent::dataplane::{
    load::{self, MapSizes},
    maps::Maps,
    Dataplane,
};

use crate::bpffs::BpfMount;

pub struct Testbed {
    pub ebpf: Ebpf,
    pub dataplane: Dataplane,
    // Dropped last: unmounting drops the pins, the maps go when their fds close.
    pub mount: BpfMount,
}

impl Testbed {
    pub fn new(sizes: &MapSizes) -> Result<Self> {
        Self::with_object(sizes, load::OBJECT)
    }

    /// The same with another build's object of the same schema (a benchmark's baseline).
    pub fn with_object(sizes: &MapSizes, object: &[u8]) -> Result<Self> {
        let mount = BpfMount::new("test")?;
        let mut ebpf = load::load_from(&mount.dir, sizes, object)?;
        let xdp: &mut Xdp = ebpf.program_mut(load::XDP_PROGRAM).context("no XDP program")?.try_into()?;
        xdp.load().context("verifier rejected lb_xdp")?;
        let pass: &mut Xdp = ebpf.program_mut(load::XDP_PASS_PROGRAM).context("no XDP pass program")?.try_into()?;
        pass.load()?;
        let tc: &mut SchedClassifier = ebpf.program_mut(load::TC_PROGRAM).context("no TC program")?.try_into()?;
        tc.load().context("verifier rejected lb_tc")?;
        let to_pod: &mut SchedClassifier = ebpf.program_mut(load::TC_TO_POD_PROGRAM).context("no TC to-pod program")?.try_into()?;
        to_pod.load().context("verifier rejected lb_tc_to_pod")?;
        let maps = Maps::take(&mut ebpf)?;
        let dataplane = Dataplane::new(maps, 0, maglev::TABLE_SIZES[0])?;
        Ok(Self { ebpf, dataplane, mount })
    }

    /// Runs `lb_xdp` once on `packet`: the verdict and the packet as the program left it.
    pub fn run_xdp(&self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.xdp(load::XDP_PROGRAM, packet, None, 1).map(|(verdict, out, _)| (verdict, out))
    }

    /// The same, for `packet` arriving on device `ingress` (an ifindex of this namespace).
    pub fn run_xdp_on(&self, packet: &[u8], ingress: u32) -> Result<(u32, Vec<u8>)> {
        self.xdp(load::XDP_PROGRAM, packet, Some(ingress), 1).map(|(verdict, out, _)| (verdict, out))
    }

    /// `time_xdp` for `packet` arriving on device `ingress`.
    pub fn time_xdp_on(&self, packet: &[u8], ingress: u32, repeat: u32) -> Result<(u32, f64)> {
        self.xdp(load::XDP_PROGRAM, packet, Some(ingress), repeat).map(|(verdict, _, ns)| (verdict, ns))
    }

    /// Runs `lb_tc` once on `packet`.
    pub fn run_tc(&self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self.ebpf.program(load::TC_PROGRAM).context("no TC program")?.try_into()?;
        run(&|o| prog.test_run(o), packet, 1).map(|(verdict, out, _)| (verdict, out))
    }

    /// Runs `lb_tc_to_pod` once on `packet`.
    pub fn run_tc_to_pod(&self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self.ebpf.program(load::TC_TO_POD_PROGRAM).context("no TC to-pod program")?.try_into()?;
        run(&|o| prog.test_run(o), packet, 1).map(|(verdict, out, _)| (verdict, out))
    }

    /// Runs `lb_xdp` with `repeat` iterations; returns the kernel's mean time per run in ns.
    pub fn time_xdp(&self, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
        self.xdp(load::XDP_PROGRAM, packet, None, repeat).map(|(verdict, _, ns)| (verdict, ns))
    }

    /// The same for `lb_xdp_pass`, the floor.
    pub fn time_xdp_pass(&self, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
        self.xdp(load::XDP_PASS_PROGRAM, packet, None, repeat).map(|(verdict, _, ns)| (verdict, ns))
    }

    /// The same for a TC program (`lb_tc`, `lb_tc_to_pod`).
    pub fn time_tc(&self, program: &str, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
        let prog: &SchedClassifier = self.ebpf.program(program).with_context(|| format!("no program {program}"))?.try_into()?;
        run(&|o| prog.test_run(o), packet, repeat).map(|(verdict, _, ns)| (verdict, ns))
    }

    /// XDP program `program` on `packet`, arriving on device `ingress` (else loopback),
    /// `repeat` times: the verdict, the packet as it left and the kernel's mean ns a run.
    fn xdp(&self, program: &str, packet: &[u8], ingress: Option<u32>, repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
        let prog: &Xdp = self.ebpf.program(program).with_context(|| format!("no program {program}"))?.try_into()?;
        let ctx = ingress.map(|ingress| xdp_md(packet, ingress));
        run(&|o| prog.test_run(TestRunOptions { ctx_in: ctx.as_deref(), ..o }), packet, repeat)
    }
}

/// The `struct xdp_md` that BPF_PROG_TEST_RUN takes for `packet` arriving on `ingress`: data
/// at 0, data_end at its length, no metadata, receive queue 0.
pub fn xdp_md(packet: &[u8], ingress: u32) -> Vec<u8> {
    [0, packet.len() as u32, 0, ingress, 0, 0].iter().flat_map(|word| word.to_ne_bytes()).collect()
}

/// The ifindex of link `name` in this thread's network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let name = std::ffi::CString::new(name)?;
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()).with_context(|| format!("no link {name:?}")),
        index => Ok(index),
    }
}

type RunFn<'a> = &'a dyn Fn(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>;

fn run(test_run: RunFn<'_>, packet: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
    let mut out = vec![0u8; packet.len() + 256];
    let result = test_run(TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), repeat, ..Default::default() })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out, result.duration.as_nanos() as f64))
}
