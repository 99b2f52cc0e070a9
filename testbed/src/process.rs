//! The agent as a process: started inside a node's namespace, stopped on drop.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// A running lb-agent, stopped (SIGTERM, then SIGKILL) on drop.
pub struct AgentProcess {
    pub child: Child,
    pub log: PathBuf,
    /// Files the agent makes that a killed agent leaves behind (its flow-event socket).
    pub leaves: Vec<PathBuf>,
}

impl AgentProcess {
    /// Starts `binary` inside `ns` with `args`; its log goes to `log`.
    pub fn start(binary: &Path, ns: &Netns, args: &[String], log: &Path) -> Result<Self> {
        let out = File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child, log: log.to_path_buf(), leaves: Vec::new() })
    }

    /// Waits until the log contains `needle`, or fails with the log.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("lb-agent exited ({status}) before logging {needle:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("lb-agent did not log {needle:?} within {timeout:?}:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The process id of the agent (`ip netns exec` execs it, so the child is the agent).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash or `kill -9` would.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl AgentProcess {
    /// SIGTERM, as a DaemonSet's deletion would, and waits for the exit (SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
        // Read while the agent ran (failures carry it in their message); not left behind.
        let _ = std::fs::remove_file(&self.log);
        for path in &self.leaves {
            let _ = std::fs::remove_file(path);
        }
    }
}

