//! Network-namespace topologies with real servers, for the demo and the end-to-end tests.
//! Every namespace, link, mount and process made here is removed when its guard drops.
use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::testbed::{sh, BpfMount};

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        sh(&format!("ip netns add {name}"))?;
        let ns = Self { name: name.to_string() };
        ns.exec("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', "'\\''")))
    }

    /// Runs `f` on a new thread that lives in this namespace; sockets it opens belong here.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<Result<T>> {
        spawn_in(&self.name, f)
    }

    /// Runs `f` in this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn(f).join().map_err(|_| anyhow!("thread in {} panicked", self.name))?
    }

    pub fn mac(&self, dev: &str) -> Result<String> {
        Ok(self.exec(&format!("cat /sys/class/net/{dev}/address"))?.trim().to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// Runs `f` on a new thread inside the named network namespace.
pub fn spawn_in<T: Send + 'static>(ns_name: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<Result<T>> {
    let path = PathBuf::from("/run/netns").join(ns_name);
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {}: {}", path.display(), std::io::Error::last_os_error());
        }
        Ok(f())
    })
}

/// A server in a pod: every TCP line and every UDP datagram is answered with
/// `<name> <source ip the server saw> <what was sent>`.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<Result<()>>>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, name: &str, tcp_port: u16, udp_port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp_name, udp_name) = (name.to_string(), name.to_string());
        let (tcp_stop, udp_stop) = (stop.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let ready_udp = ready_tx.clone();
        let tcp = ns.spawn(move || -> Result<()> {
            let listener = bound(TcpListener::bind(("0.0.0.0", tcp_port)).and_then(|l| l.set_nonblocking(true).map(|_| l)), &ready_tx)?;
            while !tcp_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let (name, stop) = (tcp_name.clone(), tcp_stop.clone());
                        std::thread::spawn(move || serve_tcp(conn, peer, &name, &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            Ok(())
        });
        let udp = ns.spawn(move || -> Result<()> {
            let socket = bound(UdpSocket::bind(("0.0.0.0", udp_port)).and_then(|s| s.set_read_timeout(Some(Duration::from_millis(50))).map(|_| s)), &ready_udp)?;
            let mut buf = [0u8; 2048];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let reply = format!("{udp_name} {} {}", peer.ip(), String::from_utf8_lossy(&buf[..n]).trim());
                    let _ = socket.send_to(reply.as_bytes(), peer);
                }
            }
            Ok(())
        });
        for _ in 0..2 {
            ready_rx.recv_timeout(Duration::from_secs(5)).context("echo server did not start")?.map_err(|e| anyhow!("echo server: {e}"))?;
        }
        Ok(Self { stop, threads: vec![tcp, udp] })
    }
}

/// Tells the starting thread whether the socket is ready, and passes it on.
fn bound<T>(socket: std::io::Result<T>, ready: &std::sync::mpsc::Sender<Result<(), String>>) -> Result<T> {
    let _ = ready.send(socket.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    Ok(socket?)
}

fn serve_tcp(conn: TcpStream, peer: SocketAddr, name: &str, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                // One write, one segment.
                if writer.write_all(format!("{name} {} {}\n", peer.ip(), line.trim()).as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The reply of an echo server: which backend answered and the source address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub backend: String,
    pub seen_source: Ipv4Addr,
}

fn parse_answer(reply: &str) -> Result<Answer> {
    let mut parts = reply.split_whitespace();
    let backend = parts.next().ok_or_else(|| anyhow!("empty reply"))?.to_string();
    let seen_source = parts.next().ok_or_else(|| anyhow!("reply {reply:?} has no source"))?.parse()?;
    Ok(Answer { backend, seen_source })
}

/// One TCP request (connect, one line, one answer) from `ns`, with an optional fixed source port.
pub fn tcp_request(ns: &Netns, to: SocketAddr, source_port: Option<u16>, timeout: Duration) -> Result<Answer> {
    ns.run(move || -> Result<Answer> {
        let stream = match source_port {
            None => TcpStream::connect_timeout(&to, timeout)?,
            Some(port) => {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
                socket.connect_timeout(&to.into(), timeout)?;
                socket.into()
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        let mut writer = stream.try_clone()?;
        writer.write_all(b"hello\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        parse_answer(&line)
    })?
}

/// One UDP request from `ns`; `source_port` 0 lets the kernel choose. The socket is
/// connected, so an ICMP port unreachable comes back as `ConnectionRefused`.
pub fn udp_request(ns: &Netns, to: SocketAddr, source_port: u16, timeout: Duration) -> Result<Answer> {
    ns.run(move || -> Result<Answer> {
        let socket = UdpSocket::bind(("0.0.0.0", source_port))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(to)?;
        socket.send(b"hello")?;
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf)?;
        parse_answer(&String::from_utf8_lossy(&buf[..n]))
    })?
}

/// A long-lived TCP connection: each `exchange` sends a line and waits for its answer.
pub struct LongConnection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LongConnection {
    pub fn open(ns: &Netns, to: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = ns.run(move || TcpStream::connect_timeout(&to, timeout))??;
        stream.set_read_timeout(Some(timeout))?;
        Ok(Self { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    pub fn exchange(&mut self, msg: &str) -> Result<Answer> {
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        parse_answer(&line)
    }
}

/// A running lb-agent, stopped (SIGTERM, then SIGKILL) on drop.
pub struct AgentProcess {
    pub child: Child,
    pub log: PathBuf,
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
        Ok(Self { child, log: log.to_path_buf() })
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

impl Drop for AgentProcess {
    fn drop(&mut self) {
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

/// A unique, short prefix for namespace names of one topology.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("lb{tag}{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A pod: its namespace, its address, and the host-side device on its node.
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub host_dev: String,
}

/// A node namespace with an external device `eth0` on the LAN, and pods behind `lxc<N>` devices.
pub struct Node {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub pods: Vec<Pod>,
}

/// Several nodes and an outside client on one LAN (a bridge in its own namespace).
/// Addresses: LAN 10.99.0.0/24 (client .100, nodes .1, .2, ...), pods of node N in 10.244.N.0/24.
pub struct Cluster {
    pub prefix: String,
    // Dropped in field order: pods and nodes first, then the client, then the LAN.
    pub nodes: Vec<Node>,
    pub client: Netns,
    pub lan: Netns,
    /// `lb_xdp_pass` on the LAN side of every node's `eth0`: a veth delivers native XDP_TX
    /// frames only to a peer that runs XDP (real NICs have no such rule).
    peer_xdp: Option<aya::Ebpf>,
    pub bpffs: Vec<BpfMount>,
}

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
/// veths hand each other packets whose checksum is left to "hardware" (CHECKSUM_PARTIAL). XDP
/// sees no skb flags, and a frame it sends back out (XDP_TX) would carry that half-done
/// checksum; a wire delivers complete ones. Filling them in at the sender makes veths behave
/// like the wire.
fn no_tx_csum_offload(dev: &str) -> String {
    format!("ethtool -K {dev} tx off >/dev/null")
}

/// The address pods use as their gateway (Calico-style: link-local, answered by the host).
const POD_GATEWAY: &str = "169.254.1.1";

impl Cluster {
    /// `pods_per_node[i]` pods on node i. Load-balancer and external IPs (10.99.100.0/24,
    /// 10.99.200.0/24) are routed by the client to the first node.
    pub fn new(tag: &str, pods_per_node: &[usize]) -> Result<Self> {
        let prefix = unique_prefix(tag);
        let lan = Netns::new(&format!("{prefix}-lan"))?;
        lan.exec("ip link add br0 type bridge && ip link set br0 up")?;
        let client = Netns::new(&format!("{prefix}-cl"))?;
        let mut cluster = Self { prefix: prefix.clone(), nodes: Vec::new(), client, lan, peer_xdp: None, bpffs: Vec::new() };
        cluster.plug(&cluster.client.name.clone(), "eth0", CLIENT_IP, 0)?;
        cluster.client.exec("ip route add 10.99.100.0/24 via 10.99.0.1 && ip route add 10.99.200.0/24 via 10.99.0.1")?;

        for (i, &pods) in pods_per_node.iter().enumerate() {
            let n = i + 1;
            let ns = Netns::new(&format!("{prefix}-n{n}"))?;
            let ip = Ipv4Addr::new(10, 99, 0, n as u8);
            cluster.plug(&ns.name, "eth0", ip, n)?;
            ns.exec("sysctl -qw net.ipv4.conf.all.forwarding=1")?;
            let mut node = Node { ns, ip, pods: Vec::new() };
            for p in 0..pods {
                node.pods.push(add_pod(&node.ns, &format!("{prefix}-n{n}p{p}"), Ipv4Addr::new(10, 244, n as u8, 11 + p as u8), &format!("lxc{p}"))?);
            }
            cluster.nodes.push(node);
        }
        cluster.attach_peer_xdp(pods_per_node.len())?;
        // Every node routes the other nodes' pod ranges through them.
        for a in &cluster.nodes {
            for b in &cluster.nodes {
                if a.ip != b.ip {
                    let n = b.ip.octets()[3];
                    a.ns.exec(&format!("ip route add 10.244.{n}.0/24 via {}", b.ip))?;
                }
            }
        }
        Ok(cluster)
    }

    fn attach_peer_xdp(&mut self, nodes: usize) -> Result<()> {
        let mount = BpfMount::new(&format!("{}peer", self.prefix))?;
        let pin_dir = mount.dir.clone();
        self.bpffs.push(mount);
        let ports: Vec<u32> = (1..=nodes)
            .map(|n| Ok(self.lan.exec(&format!("cat /sys/class/net/p{n}/ifindex"))?.trim().parse()?))
            .collect::<Result<_>>()?;
        let ebpf = self.lan.run(move || -> Result<aya::Ebpf> {
            // Only the program is used: keep its maps as small as they go.
            let tiny = crate::bpf::MapSizes { flows: Some(1), maglev_slots: Some(1) };
            let mut ebpf = crate::bpf::load(&pin_dir, &tiny)?;
            let prog: &mut aya::programs::Xdp = ebpf.program_mut(crate::bpf::XDP_PASS_PROGRAM).context("no lb_xdp_pass")?.try_into()?;
            prog.load()?;
            for ifindex in ports {
                prog.attach(ifindex, aya::programs::XdpMode::Driver)?;
            }
            Ok(ebpf)
        })??;
        self.peer_xdp = Some(ebpf);
        Ok(())
    }

    /// Connects `ns` to the LAN bridge with a veth named `dev`.
    fn plug(&self, ns: &str, dev: &str, ip: Ipv4Addr, index: usize) -> Result<()> {
        let port = format!("p{index}");
        self.lan.exec(&format!("ip link add {port} type veth peer name {dev} netns {ns} && ip link set {port} master br0 && ip link set {port} up && {}", no_tx_csum_offload(&port)))?;
        sh(&format!("ip netns exec {ns} sh -c 'ip addr add {ip}/24 dev {dev} && ip link set {dev} up && {}'", no_tx_csum_offload(dev)))?;
        Ok(())
    }

    /// A bpffs for an agent on node `i`, mounted where `ip netns exec` still sees it.
    pub fn pin_dir(&mut self) -> Result<PathBuf> {
        let mount = BpfMount::new(&self.prefix)?;
        let dir = mount.dir.clone();
        self.bpffs.push(mount);
        Ok(dir)
    }
}

/// A pod namespace behind a veth: `/32` route on the node, default route via a link-local
/// gateway in the pod, static neighbours both ways.
pub fn add_pod(node: &Netns, name: &str, ip: Ipv4Addr, host_dev: &str) -> Result<Pod> {
    let ns = Netns::new(name)?;
    node.exec(&format!("ip link add {host_dev} type veth peer name eth0 netns {name} && ip link set {host_dev} up && {}", no_tx_csum_offload(host_dev)))?;
    ns.exec(&no_tx_csum_offload("eth0"))?;
    ns.exec(&format!("ip addr add {ip}/32 dev eth0 && ip link set eth0 up && ip route add {POD_GATEWAY} dev eth0 scope link && ip route add default via {POD_GATEWAY} dev eth0"))?;
    let host_mac = node.mac(host_dev)?;
    let pod_mac = ns.mac("eth0")?;
    ns.exec(&format!("ip neigh add {POD_GATEWAY} lladdr {host_mac} dev eth0 nud permanent"))?;
    node.exec(&format!("ip route add {ip}/32 dev {host_dev} && ip neigh add {ip} lladdr {pod_mac} dev {host_dev} nud permanent"))?;
    Ok(Pod { ns, ip, host_dev: host_dev.to_string() })
}

/// An HTTP/1.1 server in a pod, for load generators: `GET /?bytes=N` answers `N` bytes
/// (default 64) starting with the server's name. Stopped on drop.
pub struct HttpServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<Result<()>>>>,
}

impl HttpServer {
    pub fn start(ns: &Netns, name: &str, port: u16) -> Result<Self> {
        use hyper::{body::Bytes, server::conn::http1, service::service_fn, Response};
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let name = name.to_string();
        let thread = ns.spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let listener = bound(tokio::net::TcpListener::bind(("0.0.0.0", port)).await, &ready_tx)?;
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else { continue };
                        let name = name.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                let bytes = req.uri().query().and_then(|q| q.strip_prefix("bytes=")).and_then(|n| n.parse::<usize>().ok()).unwrap_or(64).min(1 << 20);
                                let mut body = format!("{name}\n").into_bytes();
                                body.resize(bytes.max(body.len()), b'.');
                                async move { Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from(body)))) }
                            });
                            let _ = http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => Ok(()),
                    _ = stop_rx => Ok(()),
                }
            })
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).context("HTTP server did not start")?.map_err(|e| anyhow!("HTTP server: {e}"))?;
        Ok(Self { stop: Some(stop_tx), thread: Some(thread) })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
