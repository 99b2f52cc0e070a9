//! Standalone source: Kubernetes manifests (YAML, multi-document, or JSON) in a directory.
use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Deserialize;
use tokio::{io::unix::AsyncFd, sync::Notify};

use super::{
    model::POOL_KIND,
    objects::{Kinds, Objects},
};
use crate::translate::{ClusterState, ObjectError, Origin, Sourced};

/// When a file was last read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// Reads a manifest directory and re-reads files that change. A file that fails to parse keeps
/// the objects of its last good version, so a bad edit changes nothing in the datapath.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Stamp>,
    objects: Mutex<Objects>,
    /// Set by the inotify watch when something in the directory changed; while it works, the
    /// directory is scanned on its word, and in full only every `FULL_SCAN_EVERY`.
    changed: Option<Arc<AtomicBool>>,
    last_scan: Option<Instant>,
}

/// How often a watched directory is scanned anyway (an event the watch cannot see: a file
/// changed through a symlink into another directory).
const FULL_SCAN_EVERY: Duration = Duration::from_secs(10);

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: BTreeMap::new(), objects: Mutex::default(), changed: None, last_scan: None }
    }

    /// Scans only when `changed` is set (by [`watch`]), or every `FULL_SCAN_EVERY`.
    pub fn scan_when(&mut self, changed: Arc<AtomicBool>) {
        self.changed = Some(changed);
    }

    /// Re-reads what changed. Returns whether anything changed and the errors of files that
    /// cannot be read or parsed (each naming the file, and the object and field when there is
    /// one). One bad file is one bad file: it keeps its last good objects and every other file
    /// is read. Only an unreadable directory is an error. A re-read file changes only the
    /// objects that differ, and so marks only their Services for translation.
    pub fn refresh(&mut self) -> std::io::Result<(bool, Vec<ObjectError>)> {
        let woken = self.changed.as_ref().is_none_or(|c| c.swap(false, Ordering::AcqRel));
        if !woken && self.last_scan.is_some_and(|t| t.elapsed() < FULL_SCAN_EVERY) {
            return Ok((false, Vec::new()));
        }
        // Until this scan succeeds (a directory that vanished is looked for on every sync).
        self.last_scan = None;
        let mut errors = Vec::new();
        let mut changed = false;
        let mut seen = std::collections::HashSet::new();
        let objects = self.objects.get_mut().expect("not poisoned");
        let mut to_read = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let Ok(entry) = entry else { continue };
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "yml" | "json") || !path.is_file() {
                continue;
            }
            seen.insert(path.clone());
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) => {
                    errors.push(file_error(&path.display().to_string(), format!("cannot be read: {e}")));
                    continue;
                }
            };
            let stamp = Stamp { modified: meta.modified().ok(), len: meta.len() };
            if self.files.get(&path) == Some(&stamp) {
                continue;
            }
            // Remember the stamp even when the file is bad, so the same error is not re-read
            // every tick; its last good objects stay.
            self.files.insert(path.clone(), stamp);
            to_read.push(path);
        }
        // In name order, so that of two files defining one object the same one wins every time.
        to_read.sort();
        let started = Instant::now();
        let parsed = read_all(&to_read);
        let parsed_in = started.elapsed();
        for (path, parsed) in to_read.iter().zip(parsed) {
            match parsed {
                Ok(state) => {
                    // Kept objects are copied on this thread: the parsing threads' memory is
                    // mostly YAML garbage, and a few long-lived objects on each of its pages
                    // would keep them all resident (20 MiB at 100k Services).
                    objects.replace_origin(&origin_of(path), state.clone(), Kinds::ALL);
                    changed = true;
                }
                Err(e) => errors.push(e),
            }
        }
        if !to_read.is_empty() {
            log::debug!("{} manifest files parsed in {parsed_in:?}, indexed in {:?}", to_read.len(), started.elapsed() - parsed_in);
        }
        let gone: Vec<PathBuf> = self.files.keys().filter(|p| !seen.contains(*p)).cloned().collect();
        for path in gone {
            self.files.remove(&path);
            objects.replace_origin(&origin_of(&path), ClusterState::default(), Kinds::ALL);
            changed = true;
        }
        self.last_scan = Some(Instant::now());
        Ok((changed, errors))
    }

    /// The objects of every file.
    pub fn objects(&self) -> MutexGuard<'_, Objects> {
        self.objects.lock().expect("not poisoned")
    }

    /// The union of every file's objects.
    pub fn state(&self) -> ClusterState {
        self.objects().state()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Wakes `notify` whenever a file in `dir` is written, created, moved in or out, or removed
/// (inotify; a ConfigMap volume swaps its `..data` link by rename), so that an edit is applied
/// at once instead of at the next poll. Polling stays as the fallback. Needs a tokio runtime.
pub fn watch(dir: &Path, notify: Arc<Notify>, changed: Arc<AtomicBool>) -> io::Result<()> {
    // SAFETY: plain system calls; the fd is owned from here on.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let mask = libc::IN_CLOSE_WRITE | libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_ATTRIB | libc::IN_MOVE_SELF | libc::IN_DELETE_SELF;
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is owned by the AsyncFd from here until it is dropped with the task.
    let events = unsafe { AsyncFd::register(fd) }?;
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(mut ready) = events.readable().await {
            // Drain every queued event: one wake-up per batch is enough.
            while unsafe { libc::read(events.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
            ready.clear_ready();
            changed.store(true, Ordering::Release);
            notify.notify_one();
        }
    });
    Ok(())
}

/// Reads and parses `paths`, on as many threads as there are CPUs when there are many (a
/// first scan of a large directory), in order.
fn read_all(paths: &[PathBuf]) -> Vec<Result<ClusterState, ObjectError>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(paths.len() / 8).max(1);
    if threads == 1 {
        return paths.iter().map(|p| read_file(p)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = paths.chunks(chunk).map(|part| scope.spawn(move || part.iter().map(|p| read_file(p)).collect::<Vec<_>>())).collect();
        workers.into_iter().flat_map(|w| w.join().expect("parsing never panics")).collect()
    })
}

/// A file's objects name it as their origin.
fn origin_of(path: &Path) -> Origin {
    path.display().to_string().into()
}

fn read_file(path: &Path) -> Result<ClusterState, ObjectError> {
    let origin = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => parse_manifest(&origin, &text),
            Err(e) => Err(file_error(&origin, format!("is not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))),
        },
        Err(e) => Err(file_error(&origin, format!("cannot be read: {e}"))),
    }
}

/// An error about a whole file.
fn file_error(origin: &str, message: String) -> ObjectError {
    ObjectError { origin: origin.to_string(), object: "file".into(), field: "-".into(), message }
}

/// Parses one file: every document must be a well-formed object of a kind the agent reads,
/// or a list of them (`kind: List`, what `kubectl get ... -o yaml` writes, or a typed list such
/// as `ServiceList`). Other kinds are ignored, as a proxy ignores them, with one warning per
/// kind and file. One bad document fails the file.
pub fn parse_manifest(origin: &str, text: &str) -> Result<ClusterState, ObjectError> {
    let origin: Origin = origin.into();
    let mut state = ClusterState::default();
    let mut ignored: Vec<String> = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc_err = |object: String, field: &str, message: String| ObjectError { origin: origin.to_string(), object, field: field.to_string(), message };
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(|e| doc_err(format!("document {}", i + 1), "-", format!("invalid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let Some(item_kind) = kind.strip_suffix("List") else {
            read_object(&origin, &value, kind, format!("document {}", i + 1), &mut state, &mut ignored)?;
            continue;
        };
        let Some(items) = value.get("items").and_then(|items| items.as_sequence()) else {
            return Err(doc_err(format!("{kind} (document {})", i + 1), "items", "is missing or not a list".into()));
        };
        for (j, item) in items.iter().enumerate() {
            // Items of a typed list (ServiceList) may leave out their kind.
            let kind = item.get("kind").and_then(|k| k.as_str()).unwrap_or(item_kind);
            read_object(&origin, item, kind, format!("{kind} (document {}, item {})", i + 1, j + 1), &mut state, &mut ignored)?;
        }
    }
    for kind in ignored {
        log::warn!("{origin}: objects of kind {kind} are not read (only Service, EndpointSlice, Node, Pod, Namespace, NetworkPolicy and {POOL_KIND} are); ignored");
    }
    Ok(state)
}

/// One object of a manifest into `state`; a kind the agent does not read is noted in `ignored`.
fn read_object(origin: &Origin, value: &serde_yaml_ng::Value, kind: &str, position: String, state: &mut ClusterState, ignored: &mut Vec<String>) -> Result<(), ObjectError> {
    let err = |object: String, field: &str, message: String| ObjectError { origin: origin.to_string(), object, field: field.to_string(), message };
    // Named in an error only: worked out then.
    let object = || {
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<unnamed>");
        let ns = meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).unwrap_or("default");
        if ["Node", "Namespace", POOL_KIND].contains(&kind) { format!("{kind} {name}") } else { format!("{kind} {ns}/{name}") }
    };
    // serde_path_to_error names the field that failed (spec.ports[0].port: invalid type ...).
    macro_rules! typed {
        () => {{
            let parsed = serde_path_to_error::deserialize(value).map_err(|e| err(object(), &e.path().to_string(), e.inner().to_string()))?;
            Sourced { origin: origin.clone(), object: parsed }
        }};
    }
    match kind {
        "Service" => state.services.push(typed!()),
        "EndpointSlice" => state.slices.push(typed!()),
        "Node" => state.nodes.push(typed!()),
        "Pod" => state.pods.push(typed!()),
        POOL_KIND => state.pools.push(typed!()),
        "Namespace" => state.namespaces.push(typed!()),
        "NetworkPolicy" => state.policies.push(typed!()),
        "" => return Err(err(position, "kind", "is missing".into())),
        other if !ignored.iter().any(|k| k == other) => ignored.push(other.to_string()),
        _ => {}
    }
    Ok(())
}
