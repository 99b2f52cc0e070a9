//! Packet rewrites shared by XDP and TC. The two hooks differ only in how a field is stored
//! and its checksums kept right ([`PacketWriter`]); what to write is decided here once.
use lb_common::{IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::parse::{ptr_at, Ipv4Packet};

/// The tuple a packet leaves with.
#[derive(Clone, Copy)]
pub struct Nat4 {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Offsets inside the IPv4, TCP and UDP headers.
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
const L4_SRC_PORT: usize = 0;
const L4_DST_PORT: usize = 2;
const TCP_SEQ: usize = 4;
const TCP_ACK_SEQ: usize = 8;
const TCP_FLAGS_WORD: usize = 12;
const TCP_WINDOW: usize = 14;
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;

pub struct Fault;

pub trait PacketWriter {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Replace an IPv4 address: covered by the IP header checksum and the L4 pseudo-header.
    fn replace_addr(&self, pkt: &Ipv4Packet, off: usize, old: u32, new: u32) -> Result<(), Fault>;
    /// Replace 2 bytes of the L4 header, covered by the L4 checksum only.
    fn replace_l4_u16(&self, pkt: &Ipv4Packet, off: usize, old: u16, new: u16) -> Result<(), Fault>;
    /// Replace 4 bytes of the L4 header, covered by the L4 checksum only.
    fn replace_l4_u32(&self, pkt: &Ipv4Packet, off: usize, old: u32, new: u32) -> Result<(), Fault>;
}

/// Rewrites the packet's 5-tuple from `pkt.tuple` to `to`. Unchanged fields are not touched.
#[inline(always)]
pub fn apply_nat<W: PacketWriter>(w: &W, pkt: &Ipv4Packet, to: &Nat4) -> Result<(), Fault> {
    let t = &pkt.tuple;
    if t.src_addr != to.src_addr {
        w.replace_addr(pkt, pkt.l3_off + IP_SRC, t.src_addr, to.src_addr)?;
    }
    if t.dst_addr != to.dst_addr {
        w.replace_addr(pkt, pkt.l3_off + IP_DST, t.dst_addr, to.dst_addr)?;
    }
    if t.src_port != to.src_port {
        w.replace_l4_u16(pkt, pkt.l4_off + L4_SRC_PORT, t.src_port, to.src_port)?;
    }
    if t.dst_port != to.dst_port {
        w.replace_l4_u16(pkt, pkt.l4_off + L4_DST_PORT, t.dst_port, to.dst_port)?;
    }
    Ok(())
}

/// Turns a TCP segment into the RST its sender would get from a closed port (RFC 9293 3.10.7.1),
/// addressed back to the sender, MACs swapped. The caller sends it out the way it came.
#[inline(always)]
pub fn make_tcp_reset<W: PacketWriter>(w: &W, pkt: &Ipv4Packet) -> Result<(), Fault> {
    let (data, end) = (w.data(), w.data_end());
    let eth = ptr_at::<EthHdr>(data, end, 0).ok_or(Fault)?;
    let ip = ptr_at::<Ipv4Hdr>(data, end, pkt.l3_off).ok_or(Fault)?;
    let tcp = ptr_at::<TcpHdr>(data, end, pkt.l4_off).ok_or(Fault)?;
    let (seq, ack_seq, flags_word, window, payload_len) = unsafe {
        let eth = &mut *eth;
        core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
        let words = tcp as *const u8;
        let doff = ((*words.add(12) >> 4) as u32) * 4;
        let ihl = ((*ip).vihl & 0x0f) as u32 * 4;
        let tot_len = u16::from_be_bytes((*ip).tot_len) as u32;
        (
            u32::from_ne_bytes((*tcp).seq),
            u32::from_ne_bytes((*tcp).ack_seq),
            u16::from_ne_bytes([*words.add(12), *words.add(13)]),
            u16::from_ne_bytes((*tcp).window),
            tot_len.saturating_sub(ihl + doff),
        )
    };
    let t = &pkt.tuple;
    // Swapping addresses and ports leaves every checksum as it was.
    w.replace_addr(pkt, pkt.l3_off + IP_SRC, t.src_addr, t.dst_addr)?;
    w.replace_addr(pkt, pkt.l3_off + IP_DST, t.dst_addr, t.src_addr)?;
    w.replace_l4_u16(pkt, pkt.l4_off + L4_SRC_PORT, t.src_port, t.dst_port)?;
    w.replace_l4_u16(pkt, pkt.l4_off + L4_DST_PORT, t.dst_port, t.src_port)?;

    let flags = pkt.tcp_flags;
    let (new_seq, new_ack, new_flags) = if flags & TCP_ACK != 0 {
        (ack_seq, ack_seq, TCP_RST)
    } else {
        let consumed = payload_len + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (0, u32::from_be(seq).wrapping_add(consumed).to_be(), TCP_RST | TCP_ACK)
    };
    let new_flags_word = u16::from_ne_bytes([flags_word.to_ne_bytes()[0], new_flags]);
    w.replace_l4_u32(pkt, pkt.l4_off + TCP_SEQ, seq, new_seq)?;
    w.replace_l4_u32(pkt, pkt.l4_off + TCP_ACK_SEQ, ack_seq, new_ack)?;
    w.replace_l4_u16(pkt, pkt.l4_off + TCP_FLAGS_WORD, flags_word, new_flags_word)?;
    w.replace_l4_u16(pkt, pkt.l4_off + TCP_WINDOW, window, 0)?;
    Ok(())
}

/// Offset of the L4 checksum for this packet's protocol.
#[inline(always)]
pub fn l4_csum_off(pkt: &Ipv4Packet) -> usize {
    pkt.l4_off + if pkt.tuple.proto == IPPROTO_TCP { TCP_CSUM } else { UDP_CSUM }
}

