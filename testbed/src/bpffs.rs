//! Private bpffs mounts, so tests and the demo never touch the node's own pins.
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
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("lb-bpffs-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir)?;
        let mount = Self { dir };
        load::ensure_bpffs(&mount.dir)?;
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
