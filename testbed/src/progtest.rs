//! A loaded copy of the kernel programs on a private bpffs, for program tests
//! (BPF_PROG_TEST_RUN) and per-packet benchmarks. Everything it creates is removed on drop.
use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
    Ebpf,
};

use crate::{
    bpf::{self, MapSizes},
    dataplane::Dataplane,
    maps::Maps,
};

/// A bpffs mounted at a fresh directory; unmounted and removed on drop.
pub struct BpfMount {
    pub dir: PathBuf,
}

impl BpfMount {
    pub fn new(tag: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("lb-bpffs-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir)?;
        let mount = Self { dir };
        bpf::ensure_bpffs(&mount.dir)?;
        Ok(mount)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        if let Ok(path) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) {
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

pub struct Testbed {
    pub ebpf: Ebpf,
    pub dataplane: Dataplane,
    // Dropped last: unmounting drops the pins, the maps go when their fds close.
    pub mount: BpfMount,
}

impl Testbed {
    pub fn new(sizes: &MapSizes) -> Result<Self> {
        let mount = BpfMount::new("test")?;
        let mut ebpf = bpf::load(&mount.dir, sizes)?;
        let xdp: &mut Xdp = ebpf.program_mut(bpf::XDP_PROGRAM).context("no XDP program")?.try_into()?;
        xdp.load().context("verifier rejected lb_xdp")?;
        let pass: &mut Xdp = ebpf.program_mut(bpf::XDP_PASS_PROGRAM).context("no XDP pass program")?.try_into()?;
        pass.load()?;
        let tc: &mut SchedClassifier = ebpf.program_mut(bpf::TC_PROGRAM).context("no TC program")?.try_into()?;
        tc.load().context("verifier rejected lb_tc")?;
        let maps = Maps::take(&mut ebpf)?;
        let dataplane = Dataplane::new(maps, 0, maglev::TABLE_SIZES[0])?;
        Ok(Self { ebpf, dataplane, mount })
    }

    /// Runs `lb_xdp` once on `packet`: the verdict and the packet as the program left it.
    pub fn run_xdp(&self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &Xdp = self.ebpf.program(bpf::XDP_PROGRAM).context("no XDP program")?.try_into()?;
        run(&|o| prog.test_run(o), packet, 1).map(|(verdict, out, _)| (verdict, out))
    }

    /// Runs `lb_tc` once on `packet`.
    pub fn run_tc(&self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &SchedClassifier = self.ebpf.program(bpf::TC_PROGRAM).context("no TC program")?.try_into()?;
        run(&|o| prog.test_run(o), packet, 1).map(|(verdict, out, _)| (verdict, out))
    }

    /// Runs `lb_xdp` with `repeat` iterations; returns the kernel's mean time per run in ns.
    pub fn time_xdp(&self, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
        self.time(bpf::XDP_PROGRAM, packet, repeat)
    }

    /// The same for `lb_xdp_pass`, the floor.
    pub fn time_xdp_pass(&self, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
        self.time(bpf::XDP_PASS_PROGRAM, packet, repeat)
    }

    fn time(&self, program: &str, packet: &[u8], repeat: u32) -> Result<(u32, f64)> {
        let prog: &Xdp = self.ebpf.program(program).with_context(|| format!("no program {program}"))?.try_into()?;
        run(&|o| prog.test_run(o), packet, repeat).map(|(verdict, _, ns)| (verdict, ns))
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

/// Runs `f` on a new thread inside a new, empty network namespace (with `lo` up), so FIB
/// lookups and any links it makes touch nothing else. The namespace dies with the thread.
pub fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    std::thread::spawn(move || {
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        sh("ip link set lo up")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("test thread panicked"))?
}

/// Runs a shell command (test and demo set-up); fails with its stderr.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
