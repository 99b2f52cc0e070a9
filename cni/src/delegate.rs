//! Delegation (SPEC.md section 4): another IPAM plugin, found in `CNI_PATH`, run with this
//! plugin's environment and the whole configuration on stdin; its stderr is ours.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
};

use serde_json::Value;

use crate::spec::{code, Error, Result};

pub fn find(plugin: &str, path: &[PathBuf]) -> Result<PathBuf> {
    if plugin.contains('/') {
        return Err(Error::new(code::INVALID_CONFIG, format!("ipam.type {plugin:?} must be a plugin name, not a path")));
    }
    path.iter()
        .map(|dir| dir.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::new(code::INVALID_CONFIG, format!("IPAM plugin {plugin:?} not found in CNI_PATH ({})", path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":"))))
}

/// Runs `plugin` for `command` with `stdin`; its result (none for DEL, GC, STATUS).
pub fn run(plugin: &Path, command: &str, stdin: &[u8]) -> Result<Option<Value>> {
    let name = plugin.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut child = Process::new(plugin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::new(code::IO_FAILURE, format!("running IPAM plugin {}: {e}", plugin.display())))?;
    child.stdin.take().expect("piped").write_all(stdin).map_err(|e| Error::new(code::IO_FAILURE, format!("writing to IPAM plugin {name}: {e}")))?;
    let out = child.wait_with_output().map_err(|e| Error::new(code::IO_FAILURE, format!("waiting for IPAM plugin {name}: {e}")))?;
    let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    if !out.status.success() {
        // Its error, passed on with its own code, and who said it.
        let (code, msg, details) = match &parsed {
            Some(e) => (
                e.get("code").and_then(Value::as_u64).unwrap_or(code::INTERNAL as u64) as u32,
                e.get("msg").and_then(Value::as_str).unwrap_or_default().to_string(),
                e.get("details").and_then(Value::as_str).unwrap_or_default().to_string(),
            ),
            None => (code::INTERNAL, String::from_utf8_lossy(&out.stdout).trim().to_string(), String::new()),
        };
        return Err(Error::new(code, format!("IPAM plugin {name} {command}: {msg}")).with_details(details));
    }
    Ok(parsed)
}
