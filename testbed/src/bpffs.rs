//! Private mounts: bpffs, so tests and the demo never touch the node's own pins, and the
//! cgroup v2 hierarchy where `ip netns exec` (which remounts /sys) still sees it.
use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Result;
use lb_agent::dataplane::load;

/// A bpffs mounted at a fresh directory; unmounted and removed on drop.
pub struct BpfMount {
    pub dir: PathBuf,
}

impl BpfMount {
    pub fn new(tag: &str) -> Result<Self> {
        let mount = Self { dir: fresh_dir("bpffs", tag)? };
        load::ensure_bpffs(&mount.dir)?;
        Ok(mount)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        unmount_and_remove(&self.dir);
    }
}

/// The machine's cgroup v2 hierarchy, mounted again at a fresh directory (the same cgroups,
/// another path); unmounted and removed on drop. Socket hooks attached to its root see every
/// process; each agent translates only its own node namespace's sockets.
pub struct CgroupMount {
    pub dir: PathBuf,
}

impl CgroupMount {
    pub fn new(tag: &str) -> Result<Self> {
        let mount = Self { dir: fresh_dir("cgroup", tag)? };
        let target = std::ffi::CString::new(mount.dir.as_os_str().as_encoded_bytes())?;
        if unsafe { libc::mount(c"cgroup2".as_ptr(), target.as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null()) } != 0 {
            anyhow::bail!("mounting cgroup2 at {}: {}", mount.dir.display(), std::io::Error::last_os_error());
        }
        Ok(mount)
    }
}

impl Drop for CgroupMount {
    fn drop(&mut self) {
        unmount_and_remove(&self.dir);
    }
}

fn fresh_dir(what: &str, tag: &str) -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("lb-{what}-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn unmount_and_remove(dir: &std::path::Path) {
    if let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir(dir);
}
