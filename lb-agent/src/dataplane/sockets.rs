//! Ends node sockets stuck on a removed backend. A connected UDP socket keeps sending to the
//! address its connect() was translated to; when that backend goes (a replaced DNS pod, say),
//! the agent aborts the socket through sock_diag (SOCK_DESTROY, as `ss -K` does), so the
//! application gets an error at once and reconnects to a live backend.
use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HEADER_LEN: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCK_ID_LEN: usize = 48;
const ALL_STATES: u32 = u32::MAX;

/// A UDP socket as sock_diag names it, and where it is connected to.
struct UdpSocket {
    family: u8,
    id: [u8; SOCK_ID_LEN],
}

impl UdpSocket {
    /// Destination address and port (host order).
    fn peer(&self) -> (IpAddr, u16) {
        let port = u16::from_be_bytes([self.id[2], self.id[3]]);
        let dst: [u8; 16] = self.id[20..36].try_into().expect("16 bytes");
        // An IPv6 socket connected to an IPv4-mapped address talks IPv4: the socket hooks
        // translated it with the IPv4 maps.
        let addr = if self.family == libc::AF_INET6 as u8 { IpAddr::from(dst).to_canonical() } else { IpAddr::from([dst[0], dst[1], dst[2], dst[3]]) };
        (addr, port)
    }

    fn cookie(&self) -> u64 {
        let lo = u32::from_ne_bytes(self.id[40..44].try_into().expect("4 bytes"));
        let hi = u32::from_ne_bytes(self.id[44..48].try_into().expect("4 bytes"));
        ((hi as u64) << 32) | lo as u64
    }
}

/// Aborts this namespace's UDP sockets (of both families) connected to one of `backends`
/// (address and port) for which `translated(cookie, backend)` holds. Returns how many were ended.
pub fn destroy_udp_sockets_to(backends: &[(IpAddr, u16)], translated: impl Fn(u64, (IpAddr, u16)) -> bool) -> Result<usize> {
    if backends.is_empty() {
        return Ok(0);
    }
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut ended = 0;
    for udp in dump_udp(&socket, libc::AF_INET as u8)?.into_iter().chain(dump_udp(&socket, libc::AF_INET6 as u8)?) {
        let peer = udp.peer();
        if backends.contains(&peer) && translated(udp.cookie(), peer) {
            request(&socket, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, udp.family, &udp.id)?;
            expect_ack(&socket).context("SOCK_DESTROY")?;
            ended += 1;
        }
    }
    Ok(ended)
}

/// Sends one request with an `inet_diag_req_v2` for UDP of `family` and the given socket id.
fn request(socket: &Socket, msg_type: u16, flags: u16, family: u8, id: &[u8; SOCK_ID_LEN]) -> Result<()> {
    let mut msg = Vec::with_capacity(NLMSG_HEADER_LEN + 8 + SOCK_ID_LEN);
    let len = (NLMSG_HEADER_LEN + 8 + SOCK_ID_LEN) as u32;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&msg_type.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&[0; 8]); // sequence number and port id
    msg.extend_from_slice(&[family, libc::IPPROTO_UDP as u8, 0, 0]);
    msg.extend_from_slice(&ALL_STATES.to_ne_bytes());
    msg.extend_from_slice(id);
    socket.send(&msg, 0)?;
    Ok(())
}

/// Every UDP socket of `family` in this network namespace.
fn dump_udp(socket: &Socket, family: u8) -> Result<Vec<UdpSocket>> {
    request(socket, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, &[0; SOCK_ID_LEN])?;
    let mut out = Vec::new();
    loop {
        let (buf, _) = socket.recv_from_full()?;
        for (msg_type, payload) in messages(&buf) {
            match msg_type {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => bail!("sock_diag dump: {}", error_of(payload)),
                // `struct inet_diag_msg`: family, state, timer, retransmits, then the id.
                SOCK_DIAG_BY_FAMILY if payload.len() >= 4 + SOCK_ID_LEN => {
                    out.push(UdpSocket { family, id: payload[4..4 + SOCK_ID_LEN].try_into().expect("length checked") });
                }
                _ => {}
            }
        }
    }
}

fn expect_ack(socket: &Socket) -> Result<()> {
    let (buf, _) = socket.recv_from_full()?;
    for (msg_type, payload) in messages(&buf) {
        if msg_type == NLMSG_ERROR {
            let err = error_of(payload);
            return if err.raw_os_error() == Some(0) { Ok(()) } else { Err(err.into()) };
        }
    }
    bail!("no acknowledgement")
}

/// (type, payload) of each netlink message in `buf`.
fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HEADER_LEN {
        let len = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HEADER_LEN || len > buf.len() {
            break;
        }
        out.push((u16::from_ne_bytes([buf[4], buf[5]]), &buf[NLMSG_HEADER_LEN..len]));
        buf = &buf[(len + 3) & !3..];
    }
    out
}

/// The errno of an `NLMSG_ERROR` payload (0 is an acknowledgement).
fn error_of(payload: &[u8]) -> std::io::Error {
    let errno = payload.get(..4).map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes"))).unwrap_or(-libc::EINVAL);
    std::io::Error::from_raw_os_error(-errno)
}
