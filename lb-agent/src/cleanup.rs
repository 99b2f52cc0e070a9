//! `lb-agent --cleanup`: takes the datapath off the node. Every attachment is a bpf link
//! pinned under `<pin-dir>/links`; each is detached in the kernel (`BPF_LINK_DETACH`, which
//! holds even while another process keeps the link open), then every pin goes, and the bpffs
//! the agent mounted at the pin directory, if it mounted one. What is left afterwards: nothing
//! of this project's in the kernel, so traffic flows as if the agent had never run.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use aya_obj::generated::{bpf_attr, bpf_cmd};

use crate::dataplane::{batch::sys_bpf, load::is_bpffs};

/// What a cleanup removed, for the operator to read.
#[derive(Debug, Default)]
pub struct Removed {
    /// Pin names of the links detached (`xdp-eth0`, `tc-lxc1234`, `connect4`, ...).
    pub links: Vec<String>,
    /// Other pins removed: the maps.
    pub pins: usize,
    /// Whether the pin directory was a bpffs of its own, now unmounted.
    pub unmounted: bool,
}

/// Detaches and removes everything the agent left in `pin_dir`. Safe to run twice: a missing
/// pin directory is nothing to do.
pub fn cleanup(pin_dir: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    if !is_bpffs(pin_dir)? {
        anyhow::bail!("{} is not on a bpffs: not a pin directory of lb-agent (check --pin-dir)", pin_dir.display());
    }
    let links = pin_dir.join("links");
    if links.is_dir() {
        for entry in std::fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))? {
            let path = entry?.path();
            detach_link(&path).with_context(|| format!("detaching the link pinned at {}", path.display()))?;
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.links.push(path.file_name().unwrap_or_default().to_string_lossy().into_owned());
        }
        std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    removed.pins = remove_own_pins(pin_dir)?;
    let programs = crate::dataplane::load::programs_dir(pin_dir);
    if programs.is_dir() {
        removed.pins += remove_own_pins(&programs)?;
        std::fs::remove_dir(&programs).with_context(|| format!("removing {}", programs.display()))?;
    }
    // A bpffs of our own at the pin directory (`ensure_bpffs` mounted it), now empty: unmount it too.
    // (The root of every bpffs lists the kernel's own `maps.debug` and `progs.debug`.)
    let empty = std::fs::read_dir(pin_dir)?.flatten().all(|e| matches!(e.file_name().to_str(), Some("maps.debug" | "progs.debug")));
    let own_mount = empty && pin_dir.parent().is_some_and(|parent| !is_bpffs(parent).unwrap_or(true));
    if own_mount {
        let target = CString::new(pin_dir.as_os_str().as_encoded_bytes())?;
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("unmounting the bpffs at {}", pin_dir.display()));
        }
        removed.unmounted = true;
    }
    // The directory itself goes when it is empty; a pin of another tool's keeps it.
    if let Err(e) = std::fs::remove_dir(pin_dir) {
        if !own_mount {
            log::warn!("{} kept ({e}): it holds pins that are not lb-agent's", pin_dir.display());
        }
    }
    Ok(removed)
}

/// `BPF_OBJ_GET` on the pin, then `BPF_LINK_DETACH`: the program leaves its hook now, not
/// when the last holder of the link closes it.
pub(crate) fn detach_link(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: bpf_attr is plain data; all-zero is its "unset".
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    let fd = unsafe { libc::syscall(libc::SYS_bpf, bpf_cmd::BPF_OBJ_GET as libc::c_long, &mut attr as *mut bpf_attr, std::mem::size_of::<bpf_attr>() as libc::c_long) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_detach.link_fd = fd.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr)
}

/// Removes the pins of `dir` that are the agent's: its maps, current and set aside (their
/// names all start with `LB`), and its programs (`lb_`). Anything else is left, so a pin directory shared by mistake
/// loses nothing of another tool's.
fn remove_own_pins(dir: &Path) -> Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && path.file_name().is_some_and(|n| n.as_encoded_bytes().to_ascii_uppercase().starts_with(b"LB")) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            count += 1;
        }
    }
    Ok(count)
}
