//! A stand-in for kube-apiserver, the one part that cannot be had here. It speaks the real
//! list/watch protocol over HTTP with real Kubernetes JSON (objects serialized from
//! k8s-openapi types): lists carry a resourceVersion, watches stream ADDED/MODIFIED/DELETED
//! events from a resourceVersion and BOOKMARKs, and a watch from a compacted version gets
//! `410 Gone` (an ERROR event with a Status, as the real server sends it).
use std::{
    collections::BTreeMap,
    ops::Bound,
    convert::Infallible,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use http_body_util::{channel::Channel, Either, Full};
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use crate::netns::{spawn_in, Netns};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// The kinds the agent watches: (kind, list path, apiVersion). Field and label selectors (the
/// agent asks for its own node's pods, and its own Leases) are not applied: every object is
/// served, as a permissive server would. Leases are served in `kube-system`.
const KINDS: [(&str, &str, &str); 8] = [
    ("Service", "/api/v1/services", "v1"),
    ("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1"),
    ("Node", "/api/v1/nodes", "v1"),
    ("Pod", "/api/v1/pods", "v1"),
    ("Lease", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases", "coordination.k8s.io/v1"),
    ("LoadBalancerIPPool", "/apis/lb-agent.io/v1alpha1/loadbalancerippools", "lb-agent.io/v1alpha1"),
    ("Namespace", "/api/v1/namespaces", "v1"),
    ("NetworkPolicy", "/apis/networking.k8s.io/v1/networkpolicies", "networking.k8s.io/v1"),
];

/// The kind of a namespaced resource the agent writes, by its plural.
fn kind_of_plural(plural: &str) -> Option<&'static str> {
    match plural {
        "leases" => Some("Lease"),
        "services" => Some("Service"),
        "events" => Some("Event"),
        _ => None,
    }
}

#[derive(Clone)]
struct Event {
    rv: u64,
    kind: String,
    kind_type: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (kind, namespace/name) -> the object's JSON, serialized once (as the real server's watch
    /// cache keeps objects ready to send), so that a list of 100k objects costs the copies only.
    objects: BTreeMap<(String, String), Bytes>,
    history: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_rv: u64,
    lists: usize,
    watches: usize,
    gone_sent: usize,
    /// Writes by kind (create, replace, patch, delete), and the Events posted.
    writes: BTreeMap<String, usize>,
    events: Vec<Value>,
    /// Kinds answered with 404, as a server without their CRD answers.
    hidden: Vec<String>,
}

pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Option<Event>>,
    pub ip: std::net::Ipv4Addr,
    pub port: u16,
    ns_name: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<Result<()>>>>,
}

fn key(obj: &Value) -> (String, String) {
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    (kind, format!("{ns}/{name}"))
}

impl FakeApiServer {
    /// Starts serving on 127.0.0.1:`port` inside `ns`.
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        Self::start_on(ns, std::net::Ipv4Addr::LOCALHOST, port)
    }

    /// Starts serving on `ip`:`port` inside `ns` (an address other namespaces reach).
    pub fn start_on(ns: &Netns, ip: std::net::Ipv4Addr, port: u16) -> Result<Self> {
        let (events, _) = broadcast::channel(4096);
        let mut server = Self { state: Arc::new(Mutex::new(State { rv: 100, oldest_rv: 0, ..Default::default() })), events, ip, port, ns_name: ns.name.clone(), stop: None, thread: None };
        server.listen()?;
        Ok(server)
    }

    fn listen(&mut self) -> Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (state, events, ip, port) = (self.state.clone(), self.events.clone(), self.ip, self.port);
        let thread = spawn_in(&self.ns_name, move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind((ip, port)).await?;
                let _ = ready_tx.send(());
                let accept = async {
                    loop {
                        let (stream, _) = listener.accept().await?;
                        let (state, events) = (state.clone(), events.clone());
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| handle(req, state.clone(), events.clone()));
                            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                        });
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), anyhow::Error>(())
                };
                tokio::select! {
                    r = accept => r,
                    _ = stop_rx => Ok(()),
                }
            })
            // Dropping the runtime here closes the listener and every open watch.
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).context("fake API server did not start")?;
        self.stop = Some(stop_tx);
        self.thread = Some(thread);
        Ok(())
    }

    /// Stops answering: the listener and every open watch are closed.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Serves again, with the same objects and history.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.listen()
    }

    /// Creates or replaces an object (anything serializable to Kubernetes JSON).
    pub fn apply(&self, object: &impl serde::Serialize) -> Result<()> {
        store(&mut self.state.lock().unwrap(), &self.events, serde_json::to_value(object)?);
        Ok(())
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        remove(&mut self.state.lock().unwrap(), &self.events, kind, &format!("{namespace}/{name}")).context("no such object")?;
        Ok(())
    }

    /// An object as stored now.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.objects.get(&(kind.to_string(), format!("{namespace}/{name}"))).and_then(|b| serde_json::from_slice(b).ok())
    }

    /// Writes (create, replace, patch, delete) of `kind` so far.
    pub fn writes(&self, kind: &str) -> usize {
        self.state.lock().unwrap().writes.get(kind).copied().unwrap_or(0)
    }

    /// The Events clients posted.
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// Answers lists and watches of `kind` with 404 Not Found, as a server whose cluster lacks
    /// the kind's CRD.
    pub fn hide(&self, kind: &str) {
        self.state.lock().unwrap().hidden.push(kind.to_string());
    }

    /// Compacts the history, as etcd does, and ends every open watch: clients re-watch from
    /// their last resourceVersion, get 410 Gone, and must relist.
    pub fn compact_and_drop_watches(&self) {
        let mut st = self.state.lock().unwrap();
        st.oldest_rv = st.rv + 1;
        st.history.clear();
        let _ = self.events.send(None);
    }

    /// (lists, watches, 410s sent) so far.
    pub fn counts(&self) -> (usize, usize, usize) {
        let st = self.state.lock().unwrap();
        (st.lists, st.watches, st.gone_sent)
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self, dir: &std::path::Path) -> Result<PathBuf> {
        kubeconfig_for(dir, &format!("http://127.0.0.1:{}", self.port))
    }
}

/// A kubeconfig whose cluster is `server` (plain HTTP, no credentials).
pub fn kubeconfig_for(dir: &std::path::Path, server: &str) -> Result<PathBuf> {
    let path = dir.join("kubeconfig.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{server}\"}}\nusers:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: agent}}\ncurrent-context: fake\n"
        ),
    )?;
    Ok(path)
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stores `obj` under a new resourceVersion and tells the watches.
fn store(st: &mut State, events: &broadcast::Sender<Option<Event>>, mut obj: Value) -> Value {
    st.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    let k = key(&obj);
    let kind_type = if st.objects.insert(k.clone(), Bytes::from(obj.to_string())).is_some() { "MODIFIED" } else { "ADDED" };
    let ev = Event { rv: st.rv, kind: k.0, kind_type, object: obj.clone() };
    st.history.push(ev.clone());
    let _ = events.send(Some(ev));
    obj
}

fn remove(st: &mut State, events: &broadcast::Sender<Option<Event>>, kind: &str, ns_name: &str) -> Option<Value> {
    let stored = st.objects.remove(&(kind.to_string(), ns_name.to_string()))?;
    let mut obj: Value = serde_json::from_slice(&stored).ok()?;
    st.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
    let ev = Event { rv: st.rv, kind: kind.to_string(), kind_type: "DELETED", object: obj.clone() };
    st.history.push(ev.clone());
    let _ = events.send(Some(ev));
    Some(obj)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn status(code: u16, reason: &str, message: String) -> Response<Body> {
    json_response(code, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code}))
}

/// Writes to one object (`/namespaces/{ns}/{plural}[/{name}[/status]]`): create, get,
/// replace (refused on a stale resourceVersion, as the real server does), merge patch (of the
/// object or its status), delete.
async fn write(req: Request<hyper::body::Incoming>, state: Arc<Mutex<State>>, events: broadcast::Sender<Option<Event>>) -> Response<Body> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.split('/').collect();
    let Some(at) = parts.iter().position(|p| *p == "namespaces") else { return status(404, "NotFound", path) };
    let (ns, plural, name, sub) = (parts.get(at + 1).copied().unwrap_or(""), parts.get(at + 2).copied().unwrap_or(""), parts.get(at + 3).copied(), parts.get(at + 4).copied());
    let Some(kind) = kind_of_plural(plural) else { return status(404, "NotFound", path) };
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(400, "BadRequest", e.to_string()),
    };
    let sent: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
    let mut st = state.lock().unwrap();
    let stored = |st: &State, name: &str| st.objects.get(&(kind.to_string(), format!("{ns}/{name}"))).and_then(|b| serde_json::from_slice::<Value>(b).ok());
    let counted = |st: &mut State| *st.writes.entry(kind.to_string()).or_default() += 1;
    match (method, name, sub) {
        (hyper::Method::GET, Some(name), None) => match stored(&st, name) {
            Some(obj) => json_response(200, obj),
            None => status(404, "NotFound", format!("{plural} \"{name}\" not found")),
        },
        (hyper::Method::POST, None, None) => {
            let mut obj = sent;
            obj["kind"] = json!(kind);
            obj["metadata"]["namespace"] = json!(ns);
            if obj["metadata"]["name"].is_null() {
                let generated = format!("{}{}", obj["metadata"]["generateName"].as_str().unwrap_or("object-"), st.rv + 1);
                obj["metadata"]["name"] = json!(generated);
            }
            let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
            if stored(&st, &name).is_some() {
                return status(409, "AlreadyExists", format!("{plural} \"{name}\" already exists"));
            }
            counted(&mut st);
            if kind == "Event" {
                st.events.push(obj.clone());
            }
            json_response(201, store(&mut st, &events, obj))
        }
        (hyper::Method::PUT, Some(name), None) => {
            let Some(old) = stored(&st, name) else { return status(404, "NotFound", format!("{plural} \"{name}\" not found")) };
            let given = sent["metadata"]["resourceVersion"].as_str().unwrap_or_default();
            if !given.is_empty() && old["metadata"]["resourceVersion"].as_str() != Some(given) {
                return status(409, "Conflict", format!("the object has been modified; please apply your changes to the latest version"));
            }
            let mut obj = sent;
            obj["kind"] = json!(kind);
            obj["metadata"]["namespace"] = json!(ns);
            counted(&mut st);
            json_response(200, store(&mut st, &events, obj))
        }
        (hyper::Method::PATCH, Some(name), sub) => {
            let Some(mut obj) = stored(&st, name) else { return status(404, "NotFound", format!("{plural} \"{name}\" not found")) };
            // A patch of the status subresource changes only the status.
            let patch = if sub == Some("status") { json!({"status": sent["status"].clone()}) } else { sent };
            merge_patch(&mut obj, &patch);
            counted(&mut st);
            if kind == "Event" {
                st.events.push(obj.clone());
            }
            json_response(200, store(&mut st, &events, obj))
        }
        (hyper::Method::DELETE, Some(name), None) => {
            counted(&mut st);
            match remove(&mut st, &events, kind, &format!("{ns}/{name}")) {
                Some(obj) => json_response(200, obj),
                None => status(404, "NotFound", format!("{plural} \"{name}\" not found")),
            }
        }
        _ => status(405, "MethodNotAllowed", path),
    }
}

type Body = Either<Full<Bytes>, Channel<Bytes>>;

fn json_response(status: u16, body: Value) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

async fn handle(req: Request<hyper::body::Incoming>, state: Arc<Mutex<State>>, events: broadcast::Sender<Option<Event>>) -> Result<Response<Body>, Infallible> {
    let Some((kind, _, api_version)) = KINDS.iter().find(|(_, path, _)| *path == req.uri().path()).filter(|_| req.method() == hyper::Method::GET) else {
        return Ok(write(req, state, events).await);
    };
    let (kind, api_version) = (*kind, *api_version);
    if state.lock().unwrap().hidden.iter().any(|k| k == kind) {
        return Ok(status(404, "NotFound", format!("the server could not find the requested resource ({kind})")));
    }
    let query: BTreeMap<String, String> = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
    if query.get("watch").map(String::as_str) != Some("true") {
        let mut st = state.lock().unwrap();
        st.lists += 1;
        // The body is put together after the lock is let go: lists of two kinds are served at once.
        // Pages, as the real server gives them to a client that sets `limit`: the `continue`
        // token carries the list's resourceVersion and the last key served (as etcd's does).
        let (rv, after) = match query.get("continue").and_then(|c| c.split_once('-')) {
            Some((rv, last)) => (rv.parse().unwrap_or(st.rv), Bound::Excluded((kind.to_string(), last.to_string()))),
            None => (st.rv, Bound::Included((kind.to_string(), String::new()))),
        };
        // resourceVersion=0 is served from the watch cache, whole: the real server ignores
        // `limit` there (kubernetes#70735).
        let from_cache = query.get("resourceVersion").map(String::as_str) == Some("0");
        let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0 && !from_cache).unwrap_or(usize::MAX);
        let page: Vec<(&(String, String), &Bytes)> = st.objects.range((after, Bound::Unbounded)).take_while(|((k, _), _)| k == kind).take(limit.saturating_add(1)).collect();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        let more = page.len() > limit;
        let page = &page[..page.len().min(limit)];
        if more {
            metadata["continue"] = json!(format!("{rv}-{}", page.last().expect("a full page").0 .1));
        }
        let items: Vec<Bytes> = page.iter().map(|(_, o)| (*o).clone()).collect();
        drop(st);
        let head = json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": metadata}).to_string();
        let mut body = Vec::with_capacity(head.len() + 16 + items.iter().map(|i| i.len() + 1).sum::<usize>());
        body.extend_from_slice(&head.as_bytes()[..head.len() - 1]); // without its closing brace
        body.extend_from_slice(b",\"items\":[");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(b"]}");
        let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
        return Ok(response);
    }

    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut rx = events.subscribe();
    let (backlog, gone, current) = {
        let mut st = state.lock().unwrap();
        st.watches += 1;
        let gone = from < st.oldest_rv;
        if gone {
            st.gone_sent += 1;
        }
        let backlog: Vec<Event> = st.history.iter().filter(|e| e.rv > from && e.kind == *kind).cloned().collect();
        (backlog, gone, st.rv)
    };
    let (mut tx, body) = Channel::<Bytes>::new(64);
    let kind = kind.to_string();
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        if gone {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {from} ({current})"), "reason": "Expired", "code": 410});
            let _ = tx.send_data(line(json!({"type": "ERROR", "object": status}))).await;
            return;
        }
        let mut last = from;
        for e in backlog {
            last = e.rv;
            if tx.send_data(line(json!({"type": e.kind_type, "object": e.object}))).await.is_err() {
                return;
            }
        }
        let mut bookmark = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(Some(e)) if e.kind == kind && e.rv > last => {
                        last = e.rv;
                        if tx.send_data(line(json!({"type": e.kind_type, "object": e.object}))).await.is_err() { return; }
                    }
                    Ok(Some(_)) => {}
                    // Compaction: end this watch.
                    Ok(None) | Err(_) => return,
                },
                _ = bookmark.tick() => {
                    let rv = last.max(from);
                    let mark = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send_data(line(mark)).await.is_err() { return; }
                }
            }
        }
    });
    let mut r = Response::new(Either::Right(body));
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(r)
}
