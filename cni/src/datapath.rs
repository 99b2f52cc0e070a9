//! The load balancer's side of a pod: its TC program on the host side of the veth (attached
//! from the agent's pin, its link pinned where the agent adopts it), and its entry in the
//! endpoint map.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::{links::FdLink, tc::TcAttachType, SchedClassifier};
use lb_agent::dataplane::{endpoints::Endpoints, load};
use lb_common::{EndpointV1, MAP_ENDPOINTS};

use crate::spec::{code, host_device_of, Error};

pub struct Datapath {
    pin_dir: PathBuf,
    pub endpoints: Endpoints,
}

impl Datapath {
    /// The agent's pins; missing ones mean it has not run on this node yet (try later).
    pub fn open(pin_dir: &Path) -> Result<Self, Error> {
        let program = load::programs_dir(pin_dir).join(load::TC_PROGRAM);
        for pin in [&program, &pin_dir.join(MAP_ENDPOINTS)] {
            if !pin.exists() {
                return Err(Error::new(code::TRY_AGAIN_LATER, format!("lb-agent has not started on this node: {} is missing", pin.display())).with_details("the agent pins its TC program and maps when it starts (pinDir in the config is its --pin-dir)"));
            }
        }
        let endpoints = Endpoints::open_pinned(pin_dir).map_err(Error::from)?;
        Ok(Self { pin_dir: pin_dir.to_path_buf(), endpoints })
    }

    /// For DEL and GC: deletes the endpoint entries of the attachments `keep` refuses (by
    /// hash) and the TC link pins of their devices and of `device`. Without the agent's pins
    /// (a node it was removed from) there is nothing to clean. Returns what failed.
    pub fn forget(pin_dir: &Path, keep: impl Fn(u64) -> bool, device: Option<String>) -> Vec<String> {
        if !pin_dir.join(MAP_ENDPOINTS).exists() {
            return Vec::new();
        }
        let mut datapath = match Self::open(pin_dir) {
            Ok(datapath) => datapath,
            Err(e) => return vec![e.to_string()],
        };
        let mut devices: Vec<String> = device.into_iter().collect();
        devices.extend(datapath.endpoints.retain(keep).into_iter().map(|(_, e)| host_device_of(e.attachment)));
        devices.sort();
        devices.dedup();
        devices.iter().filter_map(|d| datapath.detach(d).err()).map(|e| format!("{e:#}")).collect()
    }

    /// Where the TC link of a host device is pinned: the name the agent gives its own.
    fn link_pin(&self, device: &str) -> PathBuf {
        self.pin_dir.join("links").join(format!("tc-{device}"))
    }

    /// Attaches the agent's TC program to `device`'s ingress and pins the link: the agent
    /// adopts it (and replaces the program in it when it is upgraded).
    pub fn attach(&self, device: &str, ifindex: u32) -> Result<()> {
        let program = load::programs_dir(&self.pin_dir).join(load::TC_PROGRAM);
        let mut tc = SchedClassifier::from_pin(&program).with_context(|| format!("opening the program pinned at {}", program.display()))?;
        let id = match tc.attach(ifindex, TcAttachType::Ingress) {
            Ok(id) => id,
            // The agent, which attaches to new `lxc*` devices too, was first: its link is
            // pinned where this one would be, a moment after it attached.
            Err(e) if lb_agent::node::is_os_error(&e, libc::EEXIST) => return self.await_agent_pin(device),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("attaching TC to {device}"))),
        };
        let link: FdLink = tc.take_link(id)?.try_into().context("a TCX link")?;
        // Pinned under a temporary name, then renamed over any pin the agent made meanwhile
        // (it attaches to new `lxc*` devices too): its link, unpinned, is released, and the
        // device is never without the program.
        let pin = self.link_pin(device);
        let fresh = self.link_pin(&format!("{device}-new"));
        std::fs::create_dir_all(pin.parent().expect("in links/"))?;
        let _ = std::fs::remove_file(&fresh);
        link.pin(&fresh).with_context(|| format!("pinning {}", fresh.display()))?;
        std::fs::rename(&fresh, &pin).with_context(|| format!("renaming {} to {}", fresh.display(), pin.display()))?;
        Ok(())
    }

    fn await_agent_pin(&self, device: &str) -> Result<()> {
        let pin = self.link_pin(device);
        for _ in 0..100 {
            if pin.exists() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        anyhow::bail!("TC on {device} is attached, but no link is pinned at {}", pin.display())
    }

    /// Whether `device` has the pinned TC link.
    pub fn attached(&self, device: &str) -> bool {
        self.link_pin(device).exists()
    }

    /// Removes the link's pin (the link itself went with the device).
    pub fn detach(&self, device: &str) -> Result<()> {
        let pin = self.link_pin(device);
        match std::fs::remove_file(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", pin.display())),
            _ => Ok(()),
        }
    }

    pub fn record(&mut self, ip: IpAddr, entry: &EndpointV1) -> Result<()> {
        self.endpoints.insert(ip, entry)
    }
}
