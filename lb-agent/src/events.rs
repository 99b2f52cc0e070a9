//! Flow events: drops and refusals; when asked for, new connections with their backend,
//! policy verdicts of new flows, and connections closed (removed by conntrack GC). The
//! kernel's are read from its ring buffer; closes are the agent's own. Each is enriched with
//! the Service, pod, node and policy names, the last N kept in memory (older ones give way),
//! and served on a local unix socket to `lbctl observe`.
//!
//! The socket speaks JSON lines: the client sends one request (`{"last": 20, "follow":
//! true}`), the agent answers with the last events it holds, then (when following) each new
//! one as it comes. A follower that falls behind is told how many it missed.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use lb_common::*;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast,
};

use crate::dataplane::maps::{Family, Maps};

/// What `lbctl observe` prints, one per event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// RFC 3339, from the kernel's monotonic timestamp.
    pub time: String,
    /// `DROPPED`, `REJECTED` (answered with a RST or an ICMP error), `TRANSLATED` (a new
    /// connection sent to a backend), `ALLOWED` (a new flow a policy rule let in or out of an
    /// isolated pod) or `CLOSED` (a tracked connection removed).
    pub verdict: String,
    /// The reason as `lbctl stats` names it (`drop_source_range`, ...); for `ALLOWED`, how
    /// the rule matched (`policy_peer`, `policy_any_peer`); for `CLOSED`, why the connection
    /// ended (`close_fin`, `close_rst`, `close_idle`, `close_backend_removed`).
    pub reason: String,
    /// `xdp` (external device), `tc` (from a pod), `tc-to-pod` (into a pod), `gc` (the
    /// agent's conntrack GC).
    pub hook: String,
    pub device: String,
    pub node: String,
    /// `TCP`, `UDP`, or empty when the packet was cut short before its ports.
    pub protocol: String,
    pub src: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst: Option<IpAddr>,
    pub dst_port: Option<u16>,
    /// `namespace/name:port/PROTO` of the frontend the packet was for, if any.
    pub service: Option<String>,
    /// `namespace/name` of the pods (or `node/<name>`) at either end, when known.
    pub src_name: Option<String>,
    pub dst_name: Option<String>,
    /// A new connection's backend, and the source it was given when SNATed.
    pub backend: Option<std::net::SocketAddr>,
    pub snat: Option<std::net::SocketAddr>,
    /// `ALLOWED`: `namespace/name` of the policy whose rule matched, and `ingress` (into
    /// the pod at `dst`) or `egress` (out of the pod at `src`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
}

/// A request on the socket.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Request {
    /// How many held events to send first.
    #[serde(default)]
    pub last: usize,
    /// Then keep sending new ones.
    #[serde(default)]
    pub follow: bool,
}

/// A line the agent sends: an event, the end of the held events it was asked for, or a note
/// that a follower missed some.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Event(Box<FlowEvent>),
    /// The held events sent, how many; new ones follow (when following).
    Held { held: usize },
    Missed { missed: u64 },
}

/// The names events carry, refreshed by the agent when objects change.
#[derive(Debug, Default)]
pub struct Names {
    /// Pods (`namespace/name`) and nodes (`node/<name>`) by address.
    pub addresses: HashMap<IpAddr, String>,
    /// NetworkPolicies (`namespace/name`) by the number the maps know them by.
    pub policies: HashMap<u32, String>,
}

pub type SharedNames = Arc<RwLock<Names>>;

/// The last events, and a channel to the followers.
pub struct EventLog {
    held: Mutex<VecDeque<FlowEvent>>,
    capacity: usize,
    tx: broadcast::Sender<FlowEvent>,
    /// Close events (the agent's own): the bucket that limits them, and how many were
    /// emitted and throttled.
    close_bucket: Mutex<(EventConfigV1, EventBucketV1)>,
    closes_emitted: AtomicU64,
    closes_throttled: AtomicU64,
    /// The names the agent knows now: an event read before its pods were named gets them
    /// when it is served.
    names: SharedNames,
}

impl EventLog {
    /// Holds the last `capacity` events; close events are limited to `rate` a second with
    /// bursts of `burst`, as each CPU's kernel events are.
    pub fn new(capacity: usize, rate: u32, burst: u32, names: SharedNames) -> Arc<Self> {
        // Followers get new events through a short queue: one that falls behind is told how
        // many it missed rather than holding memory for it.
        let (tx, _) = broadcast::channel(capacity.clamp(16, 1024));
        Arc::new(Self {
            held: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            tx,
            close_bucket: Mutex::new((EventConfigV1::new(1 << EVENT_CLOSE, rate, burst), EventBucketV1::default())),
            closes_emitted: AtomicU64::new(0),
            closes_throttled: AtomicU64::new(0),
            names,
        })
    }

    /// Close events, made by the agent's conntrack GC: as many as the bucket allows, the
    /// rest counted as throttled.
    pub fn push_closes(&self, closed: &[ClosedFlow], node: &str, names: &Names) {
        let now = crate::dataplane::conntrack::monotonic_ns();
        let time = jiff::Timestamp::now().to_string();
        let mut limit = self.close_bucket.lock().expect("not poisoned");
        let (cfg, bucket) = &mut *limit;
        for flow in closed {
            if !bucket.take(cfg, now) {
                self.closes_throttled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.closes_emitted.fetch_add(1, Ordering::Relaxed);
            self.push(close_event(flow, time.clone(), node, names));
        }
    }

    /// Close events emitted and throttled.
    pub fn close_counts(&self) -> (u64, u64) {
        (self.closes_emitted.load(Ordering::Relaxed), self.closes_throttled.load(Ordering::Relaxed))
    }

    fn push(&self, event: FlowEvent) {
        let mut held = self.held.lock().expect("not poisoned");
        if held.len() == self.capacity {
            held.pop_front();
        }
        held.push_back(event.clone());
        drop(held);
        let _ = self.tx.send(event);
    }

    pub fn last(&self, n: usize) -> Vec<FlowEvent> {
        let held = self.held.lock().expect("not poisoned");
        let names = self.names.read().expect("not poisoned");
        let name = |addr: Option<IpAddr>| addr.and_then(|a| names.addresses.get(&a).cloned());
        held.iter()
            .skip(held.len().saturating_sub(n))
            .cloned()
            .map(|mut event| {
                event.src_name = event.src_name.or_else(|| name(event.src));
                event.dst_name = event.dst_name.or_else(|| name(event.dst));
                event
            })
            .collect()
    }
}

/// Writes what the kernel programs emit: `kinds` (`EVENT_DROP` bits), at most `rate` events a
/// second per CPU with bursts of `burst`.
pub fn configure(pin_dir: &Path, kinds: u32, rate: u32, burst: u32) -> Result<()> {
    let mut cfg: aya::maps::Array<MapData, EventConfigV1> = crate::dataplane::maps::open_pinned(pin_dir, MAP_EVENT_CONFIG)?;
    cfg.set(0, &EventConfigV1::new(kinds, rate, burst), 0).context("writing the event configuration")?;
    Ok(())
}

/// Events emitted, throttled and lost, by kind, summed over CPUs (for the metrics).
pub fn kernel_counts(map: &aya::maps::PerCpuArray<MapData, u64>) -> Result<Vec<(&'static str, &'static str, u64)>> {
    let mut out = Vec::new();
    for (kind, kind_name) in [(EVENT_DROP, "drop"), (EVENT_NEW_FLOW, "new_flow"), (EVENT_POLICY, "policy")] {
        for (outcome, outcome_name) in [(EVENT_EMITTED, "emitted"), (EVENT_THROTTLED, "throttled"), (EVENT_LOST, "lost")] {
            let per_cpu = map.get(&(EVENT_OUTCOMES * kind as u32 + outcome), 0).with_context(|| format!("reading {MAP_EVENT_STATS}"))?;
            out.push((kind_name, outcome_name, per_cpu.iter().sum()));
        }
    }
    Ok(out)
}

/// Reads the ring buffer until the agent stops, filling `log`.
pub fn start_reader(ring: RingBuf<MapData>, pin_dir: PathBuf, node: String, names: SharedNames, log: Arc<EventLog>) -> Result<()> {
    let maps = Maps::open_pinned(&pin_dir)?;
    // SAFETY: the ring buffer owns its descriptor, which stays open as long as it lives, and
    // the AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
    // Wall clock = monotonic + this offset (the kernel stamps events with CLOCK_MONOTONIC).
    let offset_ns = jiff::Timestamp::now().as_nanosecond() - crate::dataplane::conntrack::monotonic_ns() as i128;
    tokio::spawn(async move {
        let mut devices: HashMap<u32, String> = HashMap::new();
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(guard) => guard,
                Err(e) => {
                    warn!("event ring buffer: {e}; no more flow events");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < size_of::<EventV1>() {
                    continue;
                }
                // SAFETY: the kernel wrote one EventV1 (plain data) in this record.
                let raw: EventV1 = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const EventV1) };
                let device = devices.entry(raw.ifindex).or_insert_with(|| device_name(raw.ifindex)).clone();
                log.push(enrich(&raw, offset_ns, device, &node, &maps, &names.read().expect("not poisoned")));
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

fn device_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has room for IF_NAMESIZE bytes, as if_indextoname needs.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

fn address(family: u8, words: [u32; 4]) -> IpAddr {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..16]).expect("16 bytes")))
    }
}

/// The event with names: the frontend's Service (by the maps, as the datapath finds it), the
/// pods or nodes at either end.
fn enrich(raw: &EventV1, offset_ns: i128, device: String, node: &str, maps: &Maps, names: &Names) -> FlowEvent {
    let time = jiff::Timestamp::from_nanosecond(offset_ns + raw.ts_ns as i128).map(|t| t.to_string()).unwrap_or_default();
    let mut event = FlowEvent {
        time,
        verdict: match raw.kind {
            EVENT_NEW_FLOW => "TRANSLATED",
            EVENT_POLICY => "ALLOWED",
            _ if reason::NAMES.get(raw.reason as usize).is_some_and(|n| n.starts_with("reject_")) => "REJECTED",
            _ => "DROPPED",
        }
        .into(),
        reason: match (raw.kind, raw.reason) {
            (EVENT_POLICY, POLICY_MATCH_ANY_PEER) => "policy_any_peer",
            (EVENT_POLICY, _) => "policy_peer",
            (_, why) => reason::NAMES.get(why as usize).copied().unwrap_or("unknown"),
        }
        .into(),
        hook: match raw.hook {
            HOOK_XDP => "xdp",
            HOOK_TC => "tc",
            _ => "tc-to-pod",
        }
        .into(),
        device,
        node: node.into(),
        ..FlowEvent::default()
    };
    if raw.flags & F_EVENT_TUPLE == 0 {
        return event;
    }
    let (src, dst) = (address(raw.family, raw.src), address(raw.family, raw.dst));
    let (sport, dport) = (u16::from_be(raw.src_port), u16::from_be(raw.dst_port));
    event.protocol = match raw.proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        other => other.to_string(),
    };
    (event.src, event.src_port, event.dst, event.dst_port) = (Some(src), Some(sport), Some(dst), Some(dport));
    match raw.kind {
        EVENT_NEW_FLOW => {
            event.service = maps.service_names.get(&raw.service_id, 0).ok().map(|n| n.as_str().to_string());
            event.backend = backend_of(maps, raw.family, raw.backend_id);
            if raw.flags & F_EVENT_SNAT != 0 {
                event.snat = Some(std::net::SocketAddr::new(address(raw.family, raw.nat), u16::from_be(raw.nat_port)));
            }
        }
        // Judged after translation: the destination is a pod, not a frontend.
        EVENT_POLICY => {
            event.policy = Some(names.policies.get(&raw.policy_id).cloned().unwrap_or_else(|| format!("policy {}", raw.policy_id)));
            event.direction = Some(if raw.direction == POLICY_INGRESS { "ingress" } else { "egress" }.into());
        }
        _ => event.service = service_of(maps, dst, dport, raw.proto),
    }
    event.src_name = names.addresses.get(&src).cloned();
    event.dst_name = names.addresses.get(&dst).cloned();
    event
}

/// A connection the conntrack GC removed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedFlow {
    /// The client's tuple as it reached the frontend.
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub proto: u8,
    /// `namespace/name:port/PROTO`, when the Service is still there.
    pub service: Option<String>,
    pub backend: Option<std::net::SocketAddr>,
    pub snat: Option<std::net::SocketAddr>,
    /// `close_fin`, `close_rst`, `close_idle` or `close_backend_removed`.
    pub reason: &'static str,
}

/// Why a tracked connection ended: its backend went, a FIN or RST was seen (either way), or
/// it stayed idle past its lifetime.
pub fn close_reason(backend_removed: bool, flags_seen: u8) -> &'static str {
    if backend_removed {
        "close_backend_removed"
    } else if flags_seen & TCP_RST != 0 {
        "close_rst"
    } else if flags_seen & TCP_FIN != 0 {
        "close_fin"
    } else {
        "close_idle"
    }
}

fn close_event(flow: &ClosedFlow, time: String, node: &str, names: &Names) -> FlowEvent {
    FlowEvent {
        time,
        verdict: "CLOSED".into(),
        reason: flow.reason.into(),
        hook: "gc".into(),
        node: node.into(),
        protocol: if flow.proto == IPPROTO_TCP { "TCP" } else { "UDP" }.into(),
        src: Some(flow.src.ip()),
        src_port: Some(flow.src.port()),
        dst: Some(flow.dst.ip()),
        dst_port: Some(flow.dst.port()),
        service: flow.service.clone(),
        src_name: names.addresses.get(&flow.src.ip()).cloned(),
        dst_name: names.addresses.get(&flow.dst.ip()).cloned(),
        backend: flow.backend,
        snat: flow.snat,
        ..FlowEvent::default()
    }
}

/// The Service whose frontend `addr:port/proto` is: the exact address, else a NodePort on a
/// node address (as the datapath looks it up).
fn service_of(maps: &Maps, addr: IpAddr, port: u16, proto: u8) -> Option<String> {
    let id = match addr {
        IpAddr::V4(_) => maps.lookup_frontend(Addr4::from_ip(addr)?, port_raw(port), proto)?.1.service_id,
        IpAddr::V6(_) => maps.lookup_frontend(Addr6::from_ip(addr)?, port_raw(port), proto)?.1.service_id,
    };
    maps.service_names.get(&id, 0).ok().map(|n| n.as_str().to_string())
}

/// Backend `id` of the family, as `ip:port`.
fn backend_of(maps: &Maps, family: u8, id: u32) -> Option<std::net::SocketAddr> {
    fn of<A: Family>(maps: &Maps, id: u32) -> Option<std::net::SocketAddr> {
        let be = A::of(maps).backends.get(&id, 0).ok()?;
        Some(std::net::SocketAddr::new(be.addr.to_ip(), port_host(be.port)))
    }
    if family == 4 { of::<Addr4>(maps, id) } else { of::<Addr6>(maps, id) }
}

/// Serves the log on a unix socket at `path` (made 0600: events name the node's traffic).
pub async fn serve(path: PathBuf, log: Arc<EventLog>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600))?;
    info!("flow events on unix socket {}", path.display());
    loop {
        let (stream, _) = listener.accept().await?;
        let log = log.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, log).await {
                log::debug!("events client: {e:#}");
            }
        });
    }
}

async fn answer(stream: UnixStream, log: Arc<EventLog>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let request: Request = serde_json::from_str(line.trim()).context("the request is not JSON")?;
    // Subscribed before the held events are read: none falls between the two.
    let mut rx = log.tx.subscribe();
    let held = log.last(request.last);
    let count = held.len();
    for event in held {
        write_line(&mut write, &Line::Event(Box::new(event))).await?;
    }
    write_line(&mut write, &Line::Held { held: count }).await?;
    if !request.follow {
        return Ok(());
    }
    loop {
        match rx.recv().await {
            Ok(event) => write_line(&mut write, &Line::Event(Box::new(event))).await?,
            Err(broadcast::error::RecvError::Lagged(missed)) => write_line(&mut write, &Line::Missed { missed }).await?,
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

async fn write_line(write: &mut tokio::net::unix::OwnedWriteHalf, line: &Line) -> Result<()> {
    let mut text = serde_json::to_string(line)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_is_named_by_what_ended_it() {
        assert_eq!(close_reason(true, TCP_FIN), "close_backend_removed", "a removed backend ends the flow whatever was seen");
        assert_eq!(close_reason(false, TCP_SYN | TCP_ACK | TCP_RST), "close_rst");
        assert_eq!(close_reason(false, TCP_SYN | TCP_ACK | TCP_FIN), "close_fin");
        assert_eq!(close_reason(false, TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST), "close_rst", "a reset after a FIN still reset it");
        assert_eq!(close_reason(false, 0), "close_idle", "UDP, or TCP gone quiet");
    }

    use std::time::Duration;

    #[test]
    fn close_events_past_the_burst_are_throttled_and_counted() {
        let names = SharedNames::default();
        let log = EventLog::new(64, 10, 3, names.clone());
        let flow = ClosedFlow {
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.96.0.1:80".parse().unwrap(),
            proto: IPPROTO_TCP,
            service: Some("ns/web:http/TCP".into()),
            backend: Some("10.244.0.5:8080".parse().unwrap()),
            snat: None,
            reason: "close_fin",
        };
        log.push_closes(&vec![flow.clone(); 5], "node-a", &Names::default());
        assert_eq!(log.close_counts(), (3, 2), "a burst of 3, then none until credit is earned");
        let held = log.last(10);
        assert_eq!(held.len(), 3);
        assert_eq!((held[0].verdict.as_str(), held[0].reason.as_str(), held[0].hook.as_str()), ("CLOSED", "close_fin", "gc"));
        assert_eq!((held[0].service.as_deref(), held[0].backend, held[0].src_port), (Some("ns/web:http/TCP"), flow.backend, Some(40000)));
        assert_eq!(held[0].src_name, None, "pushed before the client was named");
        // Named later (the agent's next sync): served with the name.
        names.write().unwrap().addresses.insert(flow.src.ip(), "x/client".into());
        assert_eq!(log.last(10)[0].src_name.as_deref(), Some("x/client"));
        // 10 a second: one event's credit after 100 ms.
        std::thread::sleep(Duration::from_millis(120));
        log.push_closes(&vec![flow; 2], "node-a", &Names::default());
        assert_eq!(log.close_counts(), (4, 3));
    }
}
