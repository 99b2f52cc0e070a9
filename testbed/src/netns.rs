//! Network namespaces, deleted on drop, and running code or commands inside them.
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

use anyhow::{anyhow, bail, Context, Result};

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        sh(&format!("ip netns add {name}"))?;
        let ns = Self { name: name.to_string() };
        ns.exec("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', "'\\''")))
    }

    /// Runs `f` on a new thread that lives in this namespace; sockets it opens belong here.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<Result<T>> {
        spawn_in(&self.name, f)
    }

    /// Runs `f` in this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn(f).join().map_err(|_| anyhow!("thread in {} panicked", self.name))?
    }

    pub fn mac(&self, dev: &str) -> Result<String> {
        Ok(self.exec(&format!("cat /sys/class/net/{dev}/address"))?.trim().to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// Runs `f` on a new thread inside the named network namespace.
pub fn spawn_in<T: Send + 'static>(ns_name: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<Result<T>> {
    let path = PathBuf::from("/run/netns").join(ns_name);
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(f())
    })
}


/// A unique, short prefix for namespace names of one topology.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("lb{tag}{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed))
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
