//! A CNI plugin run as a container runtime runs it: inside a node's namespace, with exactly
//! the `CNI_*` variables given and the configuration on stdin.
use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

/// What the plugin answered: success, and its stdout as JSON (null when empty).
#[derive(Debug)]
pub struct Reply {
    pub ok: bool,
    pub json: Value,
}

impl Reply {
    /// The error code of a failure (0 on success).
    pub fn code(&self) -> u64 {
        self.json["code"].as_u64().unwrap_or(0)
    }

    pub fn success(self) -> Result<Value> {
        ensure!(self.ok, "the plugin failed: {}", self.json);
        Ok(self.json)
    }
}

const VARIABLES: [&str; 6] = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"];

/// Runs `plugin` in the namespace named `node`. A failure must carry the spec's error JSON.
pub fn invoke(plugin: &Path, node: &str, env: &[(&str, String)], stdin: &[u8]) -> Result<Reply> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node]).arg(plugin).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for name in VARIABLES {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let mut child = cmd.spawn().with_context(|| format!("running {}", plugin.display()))?;
    child.stdin.take().expect("piped").write_all(stdin)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json = if text.trim().is_empty() { Value::Null } else { serde_json::from_str(&text).with_context(|| format!("stdout is not JSON: {text:?} (stderr {:?})", String::from_utf8_lossy(&out.stderr)))? };
    if !out.status.success() {
        ensure!(json.get("code").is_some() && json.get("msg").is_some() && json.get("cniVersion").is_some(), "an error without the spec's error JSON: {text:?}");
    }
    Ok(Reply { ok: out.status.success(), json })
}

/// The variables of an attachment operation; `netns` is left out when `None`.
pub fn attachment_env(command: &str, container_id: &str, netns: Option<&str>, ifname: &str, pod: (&str, &str)) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", container_id.to_string()),
        ("CNI_IFNAME", ifname.to_string()),
        ("CNI_PATH", "/usr/lib/cni".to_string()),
        ("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", pod.0, pod.1)),
    ];
    if let Some(ns) = netns {
        env.push(("CNI_NETNS", ns.to_string()));
    }
    env
}
