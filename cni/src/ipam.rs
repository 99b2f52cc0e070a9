//! lb-cni's own address allocator (`"ipam": {"type": "lb-cni", ...}`): one file per address
//! in `<dataDir>/<network>/`, naming the attachment that holds it, as host-local keeps them.
//! Every change happens under an exclusive lock on the directory's `lock` file, because a
//! runtime runs ADDs of different pods in parallel.
use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io::Write,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use crate::spec::{code, Attachment, Cidr, Error, Result};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/lb-cni";
/// Where the round-robin cursor is kept: the next ADD starts after the last address given,
/// so an address just freed is not handed out again at once (its flows may still be tracked).
const LAST_RESERVED: &str = "last_reserved_ip";
const LOCK: &str = "lock";

/// The addresses of a subnet a pod may get: all but the network and broadcast addresses
/// (for prefixes shorter than /31).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub subnet: Cidr,
    first: u128,
    last: u128,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(ip) => u32::from(ip) as u128,
        IpAddr::V6(ip) => u128::from(ip),
    }
}

impl Range {
    pub fn parse(text: &str) -> Result<Self> {
        let (net, len) = lb_agent::translate::parse_cidr(text).map_err(|e| Error::new(code::INVALID_CONFIG, format!("ipam.subnet: {e}")))?;
        let host_bits = if net.is_ipv4() { 32 } else { 128 } - len as u32;
        let host_mask = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
        let network = to_u128(net);
        let (first, last) = if host_bits >= 2 { (network + 1, (network | host_mask) - 1) } else { (network, network | host_mask) };
        Ok(Self { subnet: Cidr { addr: net, len }, first, last })
    }

    fn ip(v4: bool, n: u128) -> IpAddr {
        if v4 {
            IpAddr::V4((n as u32).into())
        } else {
            IpAddr::V6(n.into())
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.subnet.addr.is_ipv4() && (self.first..=self.last).contains(&to_u128(ip))
    }

    pub fn size(&self) -> u128 {
        self.last - self.first + 1
    }
}

/// The allocations of one network, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::new(code::IO_FAILURE, format!("{what}: {e}"))
}

impl Store {
    /// Opens (creating) `<data_dir>/<network>` and takes its lock, waiting for other ADDs.
    pub fn lock(data_dir: &Path, network: &str) -> Result<Self> {
        let dir = data_dir.join(network);
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let path = dir.join(LOCK);
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_error(format!("opening {}", path.display())))?;
        // flock: released by the kernel when the process ends, however it ends.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_error(format!("locking {}", path.display()))(std::io::Error::last_os_error()));
        }
        Ok(Self { dir, _lock: lock })
    }

    /// Every allocation: the address and the attachment holding it.
    pub fn all(&self) -> Result<Vec<(IpAddr, Attachment)>> {
        let entries = std::fs::read_dir(&self.dir).map_err(io_error(format!("reading {}", self.dir.display())))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) else { continue };
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines();
            let (container_id, ifname) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
            out.push((ip, Attachment { container_id: container_id.into(), ifname: ifname.into() }));
        }
        out.sort();
        Ok(out)
    }

    pub fn held_by(&self, attachment: &Attachment) -> Result<Vec<IpAddr>> {
        Ok(self.all()?.into_iter().filter(|(_, a)| a == attachment).map(|(ip, _)| ip).collect())
    }

    /// Gives `attachment` an address of `range`: the one it holds already (an ADD retried
    /// after a failure), else the next free one after the last given.
    pub fn reserve(&self, range: &Range, attachment: &Attachment) -> Result<IpAddr> {
        let all = self.all()?;
        if let Some((ip, _)) = all.iter().find(|(ip, a)| a == attachment && range.contains(*ip)) {
            return Ok(*ip);
        }
        let taken: BTreeSet<u128> = all.iter().map(|(ip, _)| to_u128(*ip)).collect();
        let v4 = range.subnet.addr.is_ipv4();
        let last = std::fs::read_to_string(self.dir.join(LAST_RESERVED)).ok().and_then(|t| t.trim().parse::<IpAddr>().ok()).filter(|ip| range.contains(*ip)).map(to_u128);
        let start = last.map_or(range.first, |l| if l >= range.last { range.first } else { l + 1 });
        // Walk the range once, from the cursor round to just before it.
        let size = range.size();
        let free = (0..size.min(1 << 24)).map(|i| range.first + (start - range.first + i) % size).find(|n| !taken.contains(n));
        let Some(n) = free else {
            return Err(Error::new(code::TRY_AGAIN_LATER, format!("no free address in {} ({} in use)", range.subnet, all.len())));
        };
        let ip = Range::ip(v4, n);
        let path = self.dir.join(ip.to_string());
        let mut file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io_error(format!("reserving {}", path.display())))?;
        writeln!(file, "{}\n{}", attachment.container_id, attachment.ifname).map_err(io_error(format!("writing {}", path.display())))?;
        std::fs::write(self.dir.join(LAST_RESERVED), ip.to_string()).map_err(io_error("writing the cursor".into()))?;
        Ok(ip)
    }

    /// Frees what `attachment` holds; returns the addresses freed (none is not an error: DEL
    /// may come twice).
    pub fn release(&self, attachment: &Attachment) -> Result<Vec<IpAddr>> {
        self.release_where(|a| a == attachment)
    }

    /// Frees every address whose attachment is not in `valid`.
    pub fn release_all_but(&self, valid: &BTreeSet<Attachment>) -> Result<Vec<IpAddr>> {
        self.release_where(|a| !valid.contains(a))
    }

    fn release_where(&self, stale: impl Fn(&Attachment) -> bool) -> Result<Vec<IpAddr>> {
        let mut freed = Vec::new();
        for (ip, a) in self.all()? {
            if stale(&a) {
                let path = self.dir.join(ip.to_string());
                match std::fs::remove_file(&path) {
                    Ok(()) => freed.push(ip),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(format!("freeing {}", path.display()))(e)),
                }
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(id: &str) -> Attachment {
        Attachment { container_id: id.into(), ifname: "eth0".into() }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-cni-ipam-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn ranges_skip_network_and_broadcast() {
        let r = Range::parse("10.244.1.0/30").unwrap();
        assert_eq!(r.size(), 2);
        assert!(!r.contains("10.244.1.0".parse().unwrap()) && r.contains("10.244.1.1".parse().unwrap()) && !r.contains("10.244.1.3".parse().unwrap()));
        assert_eq!(Range::parse("10.244.1.7/24").unwrap().subnet.to_string(), "10.244.1.0/24");
        assert_eq!(Range::parse("10.0.0.0/33").unwrap_err().code, code::INVALID_CONFIG);
        assert_eq!(Range::parse("fd00::/120").unwrap().size(), 254);
    }

    #[test]
    fn reserve_round_robin_release_and_exhaustion() {
        let dir = temp_dir("rr");
        let range = Range::parse("10.0.0.0/29").unwrap();
        let store = Store::lock(&dir, "net").unwrap();
        let a = store.reserve(&range, &attachment("a")).unwrap();
        assert_eq!(a.to_string(), "10.0.0.1");
        assert_eq!(store.reserve(&range, &attachment("a")).unwrap(), a, "the same attachment keeps its address");
        let b = store.reserve(&range, &attachment("b")).unwrap();
        assert_eq!(b.to_string(), "10.0.0.2");
        assert_eq!(store.release(&attachment("a")).unwrap(), vec![a]);
        assert!(store.release(&attachment("a")).unwrap().is_empty(), "a second release frees nothing and is no error");
        // The cursor moves on: a freed address is not given again at once.
        assert_eq!(store.reserve(&range, &attachment("c")).unwrap().to_string(), "10.0.0.3");
        for id in ["d", "e", "f", "g"] {
            store.reserve(&range, &attachment(id)).unwrap();
        }
        // .1 (freed) was the last one left.
        assert_eq!(store.held_by(&attachment("g")).unwrap()[0].to_string(), "10.0.0.1");
        assert_eq!(store.reserve(&range, &attachment("h")).unwrap_err().code, code::TRY_AGAIN_LATER);
        let valid: BTreeSet<Attachment> = [attachment("b"), attachment("c")].into();
        assert_eq!(store.release_all_but(&valid).unwrap().len(), 4);
        assert_eq!(store.all().unwrap().into_iter().map(|(_, a)| a).collect::<BTreeSet<_>>(), valid);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
