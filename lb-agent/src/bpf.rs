//! The embedded kernel object, and loading it with every map pinned under one directory.
use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{Ebpf, EbpfLoader};

/// The object lb-ebpf compiles to (see build.rs).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_BPF_OBJECT"));

pub const XDP_PROGRAM: &str = "lb_xdp";
pub const TC_PROGRAM: &str = "lb_tc";
pub const XDP_PASS_PROGRAM: &str = "lb_xdp_pass";

/// Capacities that differ from the schema's defaults (tests shrink conntrack to fill it).
#[derive(Clone, Debug, Default)]
pub struct MapSizes {
    pub flows: Option<u32>,
    pub maglev_slots: Option<u32>,
}

/// Loads the object. Maps already pinned in `pin_dir` (an earlier agent's) are adopted as they
/// are, so their entries, conntrack included, survive a restart; missing ones are created and pinned.
pub fn load(pin_dir: &Path, sizes: &MapSizes) -> Result<Ebpf> {
    ensure_bpffs(pin_dir)?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    if let Some(flows) = sizes.flows {
        loader.map_max_entries(lb_common::MAP_CONNTRACK, flows);
        loader.map_max_entries(lb_common::MAP_REVERSE_NAT, flows);
    }
    if let Some(slots) = sizes.maglev_slots {
        loader.map_max_entries(lb_common::MAP_MAGLEV, slots);
    }
    loader.load(OBJECT).with_context(|| format!("loading the BPF object with maps pinned in {}", pin_dir.display()))
}

/// Makes sure `dir` exists on a bpffs, mounting one at `dir` when it is not.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
    if is_bpffs(dir)? {
        return Ok(());
    }
    let target = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("mounting bpffs at {}: {}", dir.display(), io::Error::last_os_error());
    }
    Ok(())
}

fn is_bpffs(dir: &Path) -> Result<bool> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let path = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        bail!("statfs {}: {}", dir.display(), io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Where a map of `pin_dir` is pinned.
pub fn pin_path(pin_dir: &Path, map: &str) -> PathBuf {
    pin_dir.join(map)
}
