//! Real servers in pods and the clients that talk to them: echo servers that report which
//! backend answered and the source address it saw, and an HTTP server for load generators.
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;

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
            // "::" takes both families (IPv4 clients show as IPv4-mapped addresses).
            let listener = bound(TcpListener::bind(("::", tcp_port)).and_then(|l| l.set_nonblocking(true).map(|_| l)), &ready_tx)?;
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
            let socket = bound(UdpSocket::bind(("::", udp_port)).and_then(|s| s.set_read_timeout(Some(Duration::from_millis(50))).map(|_| s)), &ready_udp)?;
            let mut buf = [0u8; 2048];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    let reply = format!("{udp_name} {} {}", peer.ip().to_canonical(), String::from_utf8_lossy(&buf[..n]).trim());
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
                if writer.write_all(format!("{name} {} {}\n", peer.ip().to_canonical(), line.trim()).as_bytes()).is_err() {
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
    pub seen_source: IpAddr,
}

fn parse_answer(reply: &str) -> Result<Answer> {
    let mut parts = reply.split_whitespace();
    let backend = parts.next().ok_or_else(|| anyhow!("empty reply"))?.to_string();
    let seen_source = parts.next().ok_or_else(|| anyhow!("reply {reply:?} has no source"))?.parse()?;
    Ok(Answer { backend, seen_source })
}

/// One TCP request (connect, one line, one answer) from `ns`, with an optional fixed source port.
pub fn tcp_request(ns: &Netns, to: SocketAddr, source_port: Option<u16>, timeout: Duration) -> Result<Answer> {
    match source_port {
        None => tcp_request_from(ns, None, to, timeout),
        Some(port) => tcp_request_from(ns, Some(SocketAddr::new(unspecified_like(&to), port)), to, timeout),
    }
}

/// One TCP request from `ns`, with the socket bound to `source` when given (a chosen address or port).
pub fn tcp_request_from(ns: &Netns, source: Option<SocketAddr>, to: SocketAddr, timeout: Duration) -> Result<Answer> {
    ns.run(move || -> Result<Answer> {
        let stream = match source {
            None => TcpStream::connect_timeout(&to, timeout)?,
            Some(source) => {
                let socket = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                socket.bind(&source.into())?;
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
        let socket = UdpSocket::bind(SocketAddr::new(unspecified_like(&to), source_port))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(to)?;
        socket.send(b"hello")?;
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf)?;
        parse_answer(&String::from_utf8_lossy(&buf[..n]))
    })?
}

/// The unspecified address of `to`'s family: a client socket for it binds there.
pub fn unspecified_like(to: &SocketAddr) -> IpAddr {
    if to.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() }
}

/// `GET path` over HTTP/1.0 from `ns`: the status code and the body.
pub fn http_get(ns: &Netns, to: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n");
    ns.run(move || -> Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response)?;
        let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("no status line in {response:?}"))?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
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

    /// An exchange that may take longer than the connection's timeout (a large message).
    pub fn exchange_with_timeout(&mut self, msg: &str, timeout: Duration) -> Result<Answer> {
        let before = self.reader.get_ref().read_timeout()?;
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let answer = self.exchange(msg);
        self.reader.get_ref().set_read_timeout(before)?;
        answer
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

