//! Packet rewrites shared by XDP and TC. The two hooks differ only in how a field is stored
//! and its checksums kept right ([`PacketWriter`]); what to write is decided here once.
use lb_common::{Ct4KeyV1, IPPROTO_ICMP, IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};

use crate::{
    csum::{self, fold},
    parse::{ptr_at, IcmpError4, Ipv4Packet},
};

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
    /// Replace an address of an IPv4 header whose payload has no pseudo-header (ICMP).
    fn replace_ip_only(&self, l3_off: usize, off: usize, old: u32, new: u32) -> Result<(), Fault>;
    /// Replace 2 bytes inside an ICMP message, keeping its checksum (at `icmp_off + 2`) right.
    fn replace_icmp_u16(&self, icmp_off: usize, off: usize, old: u16, new: u16) -> Result<(), Fault>;
    /// Replace 4 bytes inside an ICMP message, keeping its checksum right.
    fn replace_icmp_u32(&self, icmp_off: usize, off: usize, old: u32, new: u32) -> Result<(), Fault>;
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

/// Rewrites an ICMP error about a translated flow the way the flow's replies are rewritten
/// (`to`: frontend -> client): the error comes from the frontend, goes to the client, and
/// quotes the datagram as the client sent it (client -> frontend), so the client's stack
/// finds its socket and, for "fragmentation needed", lowers its path MTU to the frontend.
/// The quoted TCP/UDP checksum is left as it is: receivers match errors by addresses and
/// ports only, and the quote is often cut before that checksum anyway.
#[inline(always)]
pub fn apply_icmp_error_nat<W: PacketWriter>(w: &W, err: &IcmpError4, to: &Nat4) -> Result<(), Fault> {
    let inner = &err.inner;
    // The outer header: from the frontend to the client.
    if err.src_addr != to.src_addr {
        w.replace_ip_only(err.l3_off, err.l3_off + IP_SRC, err.src_addr, to.src_addr)?;
    }
    if err.dst_addr != to.dst_addr {
        w.replace_ip_only(err.l3_off, err.l3_off + IP_DST, err.dst_addr, to.dst_addr)?;
    }
    // The quote: client -> frontend, its own IPv4 checksum kept right.
    let quoted_csum_off = err.inner_l3_off + 10;
    let old_csum = unsafe { *ptr_at::<u16>(w.data(), w.data_end(), core::hint::black_box(quoted_csum_off)).ok_or(Fault)? };
    let new_csum = csum::replace4(csum::replace4(old_csum, inner.src_addr, to.dst_addr), inner.dst_addr, to.src_addr);
    w.replace_icmp_u32(err.icmp_off, err.inner_l3_off + IP_SRC, inner.src_addr, to.dst_addr)?;
    w.replace_icmp_u32(err.icmp_off, err.inner_l3_off + IP_DST, inner.dst_addr, to.src_addr)?;
    w.replace_icmp_u16(err.icmp_off, quoted_csum_off, old_csum, new_csum)?;
    w.replace_icmp_u16(err.icmp_off, err.inner_l4_off + L4_SRC_PORT, inner.src_port, to.dst_port)?;
    w.replace_icmp_u16(err.icmp_off, err.inner_l4_off + L4_DST_PORT, inner.dst_port, to.src_port)?;
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


/// Bytes an ICMP error puts in front of the datagram it quotes: an IPv4 and an ICMP header.
pub const ICMP_ERROR_GROWTH: usize = 28;
/// Ethernet and up to two VLAN tags.
const MAX_L2: usize = 22;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

/// What an ICMP error needs from the original frame, saved before the frame is resized.
pub struct IcmpQuote {
    /// The L2 header (only `l2_len` bytes of it count).
    l2: [u8; MAX_L2],
    l2_len: usize,
    /// The original IPv4 header and the first 8 bytes of its payload (RFC 792).
    quoted_len: usize,
    /// One's-complement sum of the quoted bytes, so the ICMP checksum needs no loop over
    /// the packet: a valid IPv4 header sums to 0xffff, plus the 4 words of the UDP header.
    quoted_sum: u32,
    tuple: Ct4KeyV1,
}

impl IcmpQuote {
    #[inline(always)]
    pub fn save(data: usize, data_end: usize, pkt: &Ipv4Packet) -> Result<Self, Fault> {
        // Every IPv4 UDP frame that got here is longer than MAX_L2 bytes.
        let l2 = unsafe { *ptr_at::<[u8; MAX_L2]>(data, data_end, 0).ok_or(Fault)? };
        let udp = unsafe { *ptr_at::<[u16; 4]>(data, data_end, pkt.l4_off).ok_or(Fault)? };
        let quoted_sum = 0xffff + udp.iter().map(|w| *w as u32).sum::<u32>();
        Ok(Self { l2, l2_len: pkt.l3_off & 0x1f, quoted_len: (pkt.l4_off - pkt.l3_off + 8) & 0x7f, quoted_sum, tuple: pkt.tuple })
    }

    /// Bytes of the original frame the error keeps: its L2 header and the quote.
    pub fn kept_len(&self) -> usize {
        self.l2_len + self.quoted_len
    }
}

/// Writes an ICMP port unreachable into a frame that was cut to `q.kept_len()` bytes and then
/// grown by `ICMP_ERROR_GROWTH` bytes at the front: L2 header with MACs swapped, a new IPv4
/// header from the frontend to the client, the ICMP header, then the quote, already in place.
#[inline(always)]
pub fn write_icmp_port_unreachable(data: usize, data_end: usize, q: &IcmpQuote) -> Result<(), Fault> {
    // MACs swapped, tags and ethertype kept; what lies past the L2 header is overwritten next.
    let mut l2 = q.l2;
    l2[..6].copy_from_slice(&q.l2[6..12]);
    l2[6..12].copy_from_slice(&q.l2[..6]);
    unsafe { *ptr_at::<[u8; MAX_L2]>(data, data_end, 0).ok_or(Fault)? = l2 };

    let ip_off = q.l2_len & 0x1f;
    let icmp_len = 8 + q.quoted_len;
    let tot_len = ((20 + icmp_len) as u16).to_be_bytes();
    let (src, dst) = (q.tuple.dst_addr.to_ne_bytes(), q.tuple.src_addr.to_ne_bytes());
    let mut ip = [0x45, 0, tot_len[0], tot_len[1], 0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0, src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3]];
    let mut sum = 0u32;
    for w in 0..10 {
        sum += u16::from_ne_bytes([ip[2 * w], ip[2 * w + 1]]) as u32;
    }
    let csum = (!fold(sum)).to_ne_bytes();
    ip[10] = csum[0];
    ip[11] = csum[1];
    unsafe { *ptr_at::<[u8; 20]>(data, data_end, ip_off).ok_or(Fault)? = ip };

    let mut icmp = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    let csum = (!fold(u16::from_ne_bytes([icmp[0], icmp[1]]) as u32 + q.quoted_sum)).to_ne_bytes();
    icmp[2] = csum[0];
    icmp[3] = csum[1];
    unsafe { *ptr_at::<[u8; 8]>(data, data_end, ip_off + 20).ok_or(Fault)? = icmp };
    Ok(())
}
