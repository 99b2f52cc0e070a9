use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Frontends the example manifests program: 20 IPv4 ones of the single-stack Services, and the
/// dual-stack Service's two ClusterIPs, two NodePorts and IPv6 LoadBalancer IP.
pub const EXAMPLE_FRONTENDS: usize = 25;

pub fn agent_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lb-agent"))
}

pub fn example_manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests").canonicalize().unwrap()
}

/// A private copy of the example manifests that a test may edit.
pub struct ManifestCopy {
    pub dir: PathBuf,
}

impl ManifestCopy {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lb-manifests-{tag}-{}", testbed::netns::unique_prefix("m")));
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(example_manifests())? {
            let path = entry?.path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap()))?;
        }
        Ok(Self { dir })
    }

    /// An empty manifest directory.
    pub fn empty(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lb-manifests-{tag}-{}", testbed::netns::unique_prefix("m")));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        // Write then rename, so the agent never reads half a file.
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        Ok(())
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap()
    }
}

impl Drop for ManifestCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `lbctl -o json ARGS` as parsed JSON.
pub fn lbctl_json(pin_dir: &Path, args: &[&str]) -> Result<Vec<Value>> {
    let out = lbctl(pin_dir, &[&["-o", "json"], args].concat())?;
    Ok(serde_json::from_str::<Value>(&out)?.as_array().context("lbctl printed no array")?.clone())
}

pub fn lbctl(pin_dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl")).arg("--pin-dir").arg(pin_dir).args(args).output()?;
    if !out.status.success() {
        bail!("lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `bpftool -j ARGS` as parsed JSON.
pub fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool").arg("-j").args(args).output()?;
    anyhow::ensure!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The packet count `lbctl stats` reports for one verdict reason.
pub fn reason_count(pin_dir: &Path, reason: &str) -> Result<u64> {
    let stats = lbctl_json(pin_dir, &["stats"])?;
    stats.iter().find(|s| s["reason"] == reason).and_then(|s| s["packets"].as_u64()).with_context(|| format!("no reason {reason} in {stats:?}"))
}

/// The kind of an I/O error inside `e`, if it is one.
pub fn io_kind(e: &anyhow::Error) -> Option<std::io::ErrorKind> {
    e.downcast_ref::<std::io::Error>().map(|e| e.kind())
}

/// Polls `check` until it returns Ok, for at most `timeout`.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One datagram from an unconnected UDP socket in `ns` to `to`, and the first reply: where it
/// came from and what it said.
pub fn unconnected_udp_exchange(ns: &testbed::netns::Netns, to: std::net::SocketAddr) -> Result<(std::net::SocketAddr, String)> {
    ns.run(move || -> Result<(std::net::SocketAddr, String)> {
        let s = std::net::UdpSocket::bind(std::net::SocketAddr::new(testbed::servers::unspecified_like(&to), 0))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send_to(b"hello", to)?;
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok((from, String::from_utf8_lossy(&buf[..n]).to_string()))
    })?
}

/// A node process's connected UDP socket to `to` answers; once `remove(index of its backend
/// web-N)` takes that backend out of the Service, the socket is ended within a second
/// (ECONNABORTED), and a new socket reaches a live backend.
pub fn a_connected_udp_socket_is_ended_when_its_backend_leaves(demo: &testbed::demo::Demo, to: std::net::SocketAddr, remove: impl Fn(u8) -> Result<()>) -> Result<()> {
    use std::{io::ErrorKind, net::UdpSocket, time::Instant};
    let node = demo.cluster.nodes[0].ns.name.clone();
    let socket = testbed::netns::spawn_in(&node, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind(std::net::SocketAddr::new(testbed::servers::unspecified_like(&to), 0))?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))???;
    let ask = |s: &UdpSocket| -> std::io::Result<String> {
        s.send(b"hello")?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).split_whitespace().next().unwrap_or("").to_string())
    };
    let backend = ask(&socket)?;
    remove(backend.trim_start_matches("web-").parse()?)?;
    let changed = Instant::now();
    let ended = loop {
        match ask(&socket) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => break e,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
        if changed.elapsed() > Duration::from_secs(3) {
            bail!("the socket on removed backend {backend} still works after 3 s");
        }
    };
    assert!(changed.elapsed() < Duration::from_secs(1), "ended {:?} after the change ({ended})", changed.elapsed());
    // The abort reports ECONNABORTED once and leaves the socket unconnected.
    assert!(matches!(ended.raw_os_error(), Some(libc::ECONNABORTED | libc::EDESTADDRREQ)), "{ended}");
    let fresh = testbed::servers::udp_request(&demo.cluster.nodes[0].ns, to, 0, TIMEOUT)?;
    assert_ne!(fresh.backend, backend, "a new socket reaches a live backend");
    Ok(())
}
