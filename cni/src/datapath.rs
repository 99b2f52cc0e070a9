//! The load balancer's side of a pod: its TC program on the host side of the veth (attached
//! from the agent's pin, its link pinned where the agent adopts it), and its entry in the
//! endpoint map.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::{links::FdLink, SchedClassifier};
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

    /// The agent's programs for pod devices that it has pinned: `lb_tc` always, `lb_tc_to_pod`
    /// while it enforces NetworkPolicy.
    fn programs(&self) -> impl Iterator<Item = (load::PodDeviceProgram, PathBuf)> + '_ {
        load::POD_DEVICE_PROGRAMS.into_iter().map(|p| (p, load::programs_dir(&self.pin_dir).join(p.name))).filter(|(_, pin)| pin.exists())
    }

    /// Attaches the agent's programs to `device` and pins their links: the agent adopts them
    /// (and replaces the programs in them when it is upgraded).
    pub fn attach(&self, device: &str, ifindex: u32) -> Result<()> {
        for (program, pin) in self.programs() {
            self.attach_one(program, &pin, device, ifindex)?;
        }
        Ok(())
    }

    fn attach_one(&self, program: load::PodDeviceProgram, program_pin: &Path, device: &str, ifindex: u32) -> Result<()> {
        let mut tc = SchedClassifier::from_pin(program_pin).with_context(|| format!("opening the program pinned at {}", program_pin.display()))?;
        let link_pin = program.link_pin(&self.pin_dir, device);
        let id = match tc.attach(ifindex, program.direction) {
            Ok(id) => id,
            // The agent, which attaches to new `lxc*` devices too, was first: its link is
            // pinned where this one would be, a moment after it attached.
            Err(e) if lb_agent::node::is_os_error(&e, libc::EEXIST) => return await_pin(&link_pin, device),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("attaching {} to {device}", program.name))),
        };
        let link: FdLink = tc.take_link(id)?.try_into().context("a TCX link")?;
        // Pinned under a temporary name, then renamed over any pin the agent made meanwhile
        // (it attaches to new `lxc*` devices too): its link, unpinned, is released, and the
        // device is never without the program.
        let fresh = program.link_pin(&self.pin_dir, &format!("{device}-new"));
        std::fs::create_dir_all(link_pin.parent().expect("in links/"))?;
        let _ = std::fs::remove_file(&fresh);
        link.pin(&fresh).with_context(|| format!("pinning {}", fresh.display()))?;
        std::fs::rename(&fresh, &link_pin).with_context(|| format!("renaming {} to {}", fresh.display(), link_pin.display()))?;
        Ok(())
    }

    /// Whether `device` has the pinned link of each program the agent pinned.
    pub fn attached(&self, device: &str) -> bool {
        self.programs().all(|(p, _)| p.link_pin(&self.pin_dir, device).exists())
    }

    /// Removes the links' pins (the links themselves went with the device).
    pub fn detach(&self, device: &str) -> Result<()> {
        for program in load::POD_DEVICE_PROGRAMS {
            let pin = program.link_pin(&self.pin_dir, device);
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing {}", pin.display())),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn record(&mut self, ip: IpAddr, entry: &EndpointV1) -> Result<()> {
        self.endpoints.insert(ip, entry)
    }
}

fn await_pin(pin: &Path, device: &str) -> Result<()> {
    for _ in 0..100 {
        if pin.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::bail!("TC on {device} is attached, but no link is pinned at {}", pin.display())
}
