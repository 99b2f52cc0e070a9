//! Standalone source: Kubernetes manifests (YAML, multi-document, or JSON) in a directory.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

use crate::translate::{ClusterState, ObjectError, Sourced};

/// The objects of one file.
#[derive(Clone, Debug, Default)]
struct FileObjects {
    modified: Option<SystemTime>,
    len: u64,
    state: ClusterState,
}

/// Reads a manifest directory and re-reads files that change. A file that fails to parse keeps
/// the objects of its last good version, so a bad edit changes nothing in the datapath.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileObjects>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: BTreeMap::new() }
    }

    /// Re-reads what changed. Returns whether anything changed and the errors of files that
    /// cannot be read or parsed (each naming the file, and the object and field when there is
    /// one). One bad file is one bad file: it keeps its last good objects and every other file
    /// is read. Only an unreadable directory is an error.
    pub fn refresh(&mut self) -> std::io::Result<(bool, Vec<ObjectError>)> {
        let mut errors = Vec::new();
        let mut changed = false;
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "yml" | "json") || !path.is_file() {
                continue;
            }
            seen.push(path.clone());
            let origin = path.display().to_string();
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) => {
                    errors.push(file_error(&origin, format!("cannot be read: {e}")));
                    continue;
                }
            };
            let (modified, len) = (meta.modified().ok(), meta.len());
            if let Some(f) = self.files.get(&path) {
                if f.modified == modified && f.len == len {
                    continue;
                }
            }
            let parsed = match std::fs::read(&path) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => parse_manifest(&origin, &text),
                    Err(e) => Err(file_error(&origin, format!("is not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))),
                },
                Err(e) => Err(file_error(&origin, format!("cannot be read: {e}"))),
            };
            match parsed {
                Ok(state) => {
                    self.files.insert(path, FileObjects { modified, len, state });
                    changed = true;
                }
                Err(e) => {
                    // Remember the stamp so the same error is not re-read every tick, but keep
                    // the last good objects.
                    let previous = self.files.remove(&path).map(|f| f.state).unwrap_or_default();
                    self.files.insert(path, FileObjects { modified, len, state: previous });
                    errors.push(e);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        changed |= before != self.files.len();
        Ok((changed, errors))
    }

    /// The union of every file's objects.
    pub fn state(&self) -> ClusterState {
        let mut all = ClusterState::default();
        for f in self.files.values() {
            all.services.extend(f.state.services.iter().cloned());
            all.slices.extend(f.state.slices.iter().cloned());
            all.nodes.extend(f.state.nodes.iter().cloned());
            all.pods.extend(f.state.pods.iter().cloned());
        }
        all
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// An error about a whole file.
fn file_error(origin: &str, message: String) -> ObjectError {
    ObjectError { origin: origin.to_string(), object: "file".into(), field: "-".into(), message }
}

/// Parses one file: every document must be a well-formed Service, EndpointSlice, Node or Pod
/// (other kinds are ignored, as a proxy ignores them). One bad document fails the file.
pub fn parse_manifest(origin: &str, text: &str) -> Result<ClusterState, ObjectError> {
    let mut state = ClusterState::default();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc_err = |object: String, field: &str, message: String| ObjectError { origin: origin.to_string(), object, field: field.to_string(), message };
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(|e| doc_err(format!("document {}", i + 1), "-", format!("invalid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("").to_string();
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<unnamed>");
        let ns = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or("default");
        let object = if kind == "Node" { format!("Node {name}") } else { format!("{kind} {ns}/{name}") };
        let origin = origin.to_string();
        // serde_path_to_error names the field that failed (spec.ports[0].port: invalid type ...).
        macro_rules! typed {
            ($ty:ty) => {{
                let parsed: $ty = serde_path_to_error::deserialize(value.clone()).map_err(|e| doc_err(object.clone(), &e.path().to_string(), e.inner().to_string()))?;
                Sourced { origin: origin.clone(), object: parsed }
            }};
        }
        match kind.as_str() {
            "Service" => state.services.push(typed!(Service)),
            "EndpointSlice" => state.slices.push(typed!(EndpointSlice)),
            "Node" => state.nodes.push(typed!(Node)),
            "Pod" => state.pods.push(typed!(Pod)),
            "" => return Err(doc_err(format!("document {}", i + 1), "kind", "is missing".into())),
            _ => {}
        }
    }
    Ok(state)
}
