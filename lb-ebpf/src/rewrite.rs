//! Packet rewrites shared by XDP and TC. The two hooks differ only in how a field is stored
//! and its checksums kept right ([`PacketWriter`]); what to write is decided here once.
use lb_common::{MapAddr, IPPROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use network_types::{eth::EthHdr, tcp::TcpHdr};

use crate::{
    csum::{self, fold},
    family::Family,
    parse::{ptr_at, IcmpError, Packet},
};

/// The tuple a packet leaves with.
#[derive(Clone, Copy)]
pub struct Nat<A: MapAddr> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Offsets inside the TCP and UDP headers.
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
    /// Writes `bytes` at `off` straight into the packet's headers.
    #[inline(always)]
    fn write<const N: usize>(&self, off: usize, bytes: [u8; N]) -> Result<(), Fault> {
        // An opaque offset: LLVM would otherwise drop a bound check that an earlier, larger
        // one implies, and the verifier, which tracks each pointer apart, would refuse the access.
        let field = ptr_at::<[u8; N]>(self.data(), self.data_end(), core::hint::black_box(off)).ok_or(Fault)?;
        unsafe { *field = bytes };
        Ok(())
    }
    /// Writes the words of an address in the IP header that change (one for IPv4, four for
    /// IPv6); returns their summed checksum difference, for [`PacketWriter::update_csums`].
    #[inline(always)]
    fn write_addr<A: Family>(&self, off: usize, old: &A, new: &A) -> Result<u32, Fault> {
        let (old, new) = (old.words(), new.words());
        let mut diff = 0;
        for i in 0..old.len() {
            if old[i] != new[i] {
                self.write(off + 4 * i, new[i].to_ne_bytes())?;
                diff += csum::diff4(old[i], new[i]);
            }
        }
        Ok(diff)
    }
    /// Writes 2 bytes of the L4 header when they change; returns their checksum difference.
    #[inline(always)]
    fn write_l4_u16(&self, off: usize, old: u16, new: u16) -> Result<u32, Fault> {
        if old == new {
            return Ok(0);
        }
        self.write(off, new.to_ne_bytes())?;
        Ok(csum::diff2(old, new))
    }
    /// Writes 4 bytes of the L4 header when they change; returns their checksum difference.
    #[inline(always)]
    fn write_l4_u32(&self, off: usize, old: u32, new: u32) -> Result<u32, Fault> {
        if old == new {
            return Ok(0);
        }
        self.write(off, new.to_ne_bytes())?;
        Ok(csum::diff4(old, new))
    }
    /// Brings the checksums up to the fields written, each in one update: `addrs` is what the
    /// addresses changed (the IPv4 header checksum and the L4 pseudo-header cover them),
    /// `ports` what the L4 header's own fields did.
    fn update_csums<A: Family>(&self, pkt: &Packet<A>, addrs: u32, ports: u32) -> Result<(), Fault>;
    /// Replace 4 bytes of an address in an ICMP error's own IP header: covered by the IPv4
    /// header checksum, or by the ICMPv6 checksum's pseudo-header (ICMPv4 has none).
    fn replace_icmp_outer_word<A: Family>(&self, err: &IcmpError<A>, off: usize, old: u32, new: u32) -> Result<(), Fault>;
    /// Replace 2 bytes inside an ICMP message, keeping its checksum (at `icmp_off + 2`) right.
    fn replace_icmp_u16(&self, icmp_off: usize, off: usize, old: u16, new: u16) -> Result<(), Fault>;
    /// Replace 4 bytes inside an ICMP message, keeping its checksum right.
    fn replace_icmp_u32(&self, icmp_off: usize, off: usize, old: u32, new: u32) -> Result<(), Fault>;
}

/// Where an address of an ICMP error sits, which decides the checksums its change touches.
#[derive(Clone, Copy)]
enum AddrIn<'a, A: MapAddr> {
    /// The error's own IP header (see `replace_icmp_outer_word`).
    IcmpOuter(&'a IcmpError<A>),
    /// The datagram an ICMP error quotes (ICMP header at this offset): the ICMP checksum.
    IcmpQuote(usize),
}

/// Replaces an address of an ICMP error at `off` word by word (one for IPv4, four for IPv6);
/// words that do not change are not touched. An index loop of a length fixed per family: unrolled.
#[inline(always)]
fn replace_icmp_addr<W: PacketWriter, A: Family>(w: &W, at: AddrIn<A>, off: usize, old: &A, new: &A) -> Result<(), Fault> {
    let (old, new) = (old.words(), new.words());
    for i in 0..old.len() {
        if old[i] == new[i] {
            continue;
        }
        let word_off = off + 4 * i;
        match at {
            AddrIn::IcmpOuter(err) => w.replace_icmp_outer_word(err, word_off, old[i], new[i])?,
            AddrIn::IcmpQuote(icmp_off) => w.replace_icmp_u32(icmp_off, word_off, old[i], new[i])?,
        }
    }
    Ok(())
}

/// Rewrites the packet's 5-tuple from `pkt.tuple` to `to`. Unchanged fields are not touched.
#[inline(always)]
pub fn apply_nat<W: PacketWriter, A: Family>(w: &W, pkt: &Packet<A>, to: &Nat<A>) -> Result<(), Fault> {
    let t = &pkt.tuple;
    // Every field first; then each checksum once, with the summed difference.
    let addrs = w.write_addr(pkt.l3_off + A::SRC_OFF, &t.src_addr, &to.src_addr)? + w.write_addr(pkt.l3_off + A::DST_OFF, &t.dst_addr, &to.dst_addr)?;
    let ports = w.write_l4_u16(pkt.l4_off + L4_SRC_PORT, t.src_port, to.src_port)? + w.write_l4_u16(pkt.l4_off + L4_DST_PORT, t.dst_port, to.dst_port)?;
    w.update_csums(pkt, addrs, ports)
}

/// Rewrites an ICMP error about a translated flow the way the flow's replies are rewritten
/// (`to`: frontend -> client): the error comes from the frontend, goes to the client, and
/// quotes the datagram as the client sent it (client -> frontend), so the client's stack
/// finds its socket and, for "fragmentation needed", lowers its path MTU to the frontend.
/// The quoted TCP/UDP checksum is left as it is: receivers match errors by addresses and
/// ports only, and the quote is often cut before that checksum anyway.
#[inline(always)]
pub fn apply_icmp_error_nat<W: PacketWriter, A: Family>(w: &W, err: &IcmpError<A>, to: &Nat<A>) -> Result<(), Fault> {
    let inner = &err.inner;
    // The outer header: from the frontend to the client.
    replace_icmp_addr(w, AddrIn::IcmpOuter(err), err.l3_off + A::SRC_OFF, &err.src_addr, &to.src_addr)?;
    replace_icmp_addr(w, AddrIn::IcmpOuter(err), err.l3_off + A::DST_OFF, &err.dst_addr, &to.dst_addr)?;
    // The quote: client -> frontend, its own IPv4 checksum (IPv6 has none) kept right.
    if let Some(csum_off) = A::HEADER_CSUM_OFF {
        let quoted_csum_off = err.inner_l3_off + csum_off;
        let old_csum = unsafe { *ptr_at::<u16>(w.data(), w.data_end(), core::hint::black_box(quoted_csum_off)).ok_or(Fault)? };
        // Only IPv4 gets here: one word per address.
        let (src, dst, new_src, new_dst) = (inner.src_addr.words(), inner.dst_addr.words(), to.dst_addr.words(), to.src_addr.words());
        let new_csum = csum::replace4(csum::replace4(old_csum, src[0], new_src[0]), dst[0], new_dst[0]);
        w.replace_icmp_u16(err.icmp_off, quoted_csum_off, old_csum, new_csum)?;
    }
    replace_icmp_addr(w, AddrIn::IcmpQuote(err.icmp_off), err.inner_l3_off + A::SRC_OFF, &inner.src_addr, &to.dst_addr)?;
    replace_icmp_addr(w, AddrIn::IcmpQuote(err.icmp_off), err.inner_l3_off + A::DST_OFF, &inner.dst_addr, &to.src_addr)?;
    w.replace_icmp_u16(err.icmp_off, err.inner_l4_off + L4_SRC_PORT, inner.src_port, to.dst_port)?;
    w.replace_icmp_u16(err.icmp_off, err.inner_l4_off + L4_DST_PORT, inner.dst_port, to.src_port)?;
    Ok(())
}

/// Turns a TCP segment into the RST its sender would get from a closed port (RFC 9293 3.10.7.1),
/// addressed back to the sender, MACs swapped. The caller sends it out the way it came.
#[inline(always)]
pub fn make_tcp_reset<W: PacketWriter, A: Family>(w: &W, pkt: &Packet<A>) -> Result<(), Fault> {
    let (data, end) = (w.data(), w.data_end());
    let eth = ptr_at::<EthHdr>(data, end, 0).ok_or(Fault)?;
    let tcp = ptr_at::<TcpHdr>(data, end, pkt.l4_off).ok_or(Fault)?;
    // Bytes from the TCP header to the end of the datagram, as its IP header says.
    let l4_len = A::datagram_len(data, end, pkt.l3_off).ok_or(Fault)?.saturating_sub((pkt.l4_off - pkt.l3_off) as u32);
    let (seq, ack_seq, flags_word, window, payload_len) = unsafe {
        let eth = &mut *eth;
        core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
        let words = tcp as *const u8;
        let doff = ((*words.add(12) >> 4) as u32) * 4;
        (
            u32::from_ne_bytes((*tcp).seq),
            u32::from_ne_bytes((*tcp).ack_seq),
            u16::from_ne_bytes([*words.add(12), *words.add(13)]),
            u16::from_ne_bytes((*tcp).window),
            l4_len.saturating_sub(doff),
        )
    };
    let t = &pkt.tuple;
    // Swapping addresses and ports leaves every checksum as it was: their differences cancel.
    w.write_addr(pkt.l3_off + A::SRC_OFF, &t.src_addr, &t.dst_addr)?;
    w.write_addr(pkt.l3_off + A::DST_OFF, &t.dst_addr, &t.src_addr)?;
    w.write_l4_u16(pkt.l4_off + L4_SRC_PORT, t.src_port, t.dst_port)?;
    w.write_l4_u16(pkt.l4_off + L4_DST_PORT, t.dst_port, t.src_port)?;

    let flags = pkt.tcp_flags;
    let (new_seq, new_ack, new_flags) = if flags & TCP_ACK != 0 {
        (ack_seq, ack_seq, TCP_RST)
    } else {
        let consumed = payload_len + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (0, u32::from_be(seq).wrapping_add(consumed).to_be(), TCP_RST | TCP_ACK)
    };
    let new_flags_word = u16::from_ne_bytes([flags_word.to_ne_bytes()[0], new_flags]);
    let fields = w.write_l4_u32(pkt.l4_off + TCP_SEQ, seq, new_seq)?
        + w.write_l4_u32(pkt.l4_off + TCP_ACK_SEQ, ack_seq, new_ack)?
        + w.write_l4_u16(pkt.l4_off + TCP_FLAGS_WORD, flags_word, new_flags_word)?
        + w.write_l4_u16(pkt.l4_off + TCP_WINDOW, window, 0)?;
    w.update_csums(pkt, 0, fields)?;
    Ok(())
}

/// Offset of the L4 checksum for this packet's protocol.
#[inline(always)]
pub fn l4_csum_off<A: MapAddr>(pkt: &Packet<A>) -> usize {
    pkt.l4_off + if pkt.tuple.proto == IPPROTO_TCP { TCP_CSUM } else { UDP_CSUM }
}


/// Ethernet and up to two VLAN tags.
const MAX_L2: usize = 22;

/// What an ICMP error needs to know of the original frame, measured before it is resized.
pub struct IcmpQuote {
    l2_len: usize,
    /// The original IP header and the first 8 bytes of its payload (RFC 792, RFC 4443).
    quoted_len: usize,
    /// One's-complement sum of the quoted bytes, so the ICMP checksum needs no loop over the
    /// packet: the IP header's sum, plus the 4 words of the UDP header.
    quoted_sum: u32,
}

impl IcmpQuote {
    #[inline(always)]
    pub fn measure<A: Family>(data: usize, data_end: usize, pkt: &Packet<A>) -> Result<Self, Fault> {
        let udp = unsafe { *ptr_at::<[u16; 4]>(data, data_end, pkt.l4_off).ok_or(Fault)? };
        let header_sum = A::quoted_header_sum(data, data_end, pkt.l3_off, pkt.l4_off).ok_or(Fault)?;
        let quoted_sum = header_sum + udp.iter().map(|w| *w as u32).sum::<u32>();
        Ok(Self { l2_len: pkt.l3_off & 0x1f, quoted_len: (pkt.l4_off - pkt.l3_off + 8) & 0xff, quoted_sum })
    }

    /// Bytes of the original frame the error keeps: its L2 header and the quote.
    pub fn kept_len(&self) -> usize {
        self.l2_len + self.quoted_len
    }
}

/// Writes an ICMP port unreachable into a frame that was cut to `q.kept_len()` bytes and then
/// grown by `A::ICMP_ERROR_GROWTH` bytes at the front, so the original frame starts that far
/// in: its L2 header moves to the front with MACs swapped, a new IP header goes from the
/// frontend to the client, then the ICMP header; the quote is already in place.
#[inline(always)]
pub fn write_icmp_port_unreachable<A: Family>(data: usize, data_end: usize, q: &IcmpQuote) -> Result<(), Fault> {
    let growth = A::ICMP_ERROR_GROWTH;
    // MACs swapped, tags and ethertype kept (bytes past the L2 header are overwritten next).
    let macs = unsafe { *ptr_at::<[[u8; 6]; 2]>(data, data_end, growth).ok_or(Fault)? };
    let tags = unsafe { *ptr_at::<[u8; MAX_L2 - 12]>(data, data_end, growth + 12).ok_or(Fault)? };
    unsafe {
        *ptr_at::<[[u8; 6]; 2]>(data, data_end, 0).ok_or(Fault)? = [macs[1], macs[0]];
        *ptr_at::<[u8; MAX_L2 - 12]>(data, data_end, 12).ok_or(Fault)? = tags;
    }

    let ip_off = q.l2_len & 0x1f;
    let icmp_len = ICMP_HEADER_LEN + q.quoted_len;
    let pseudo_sum = A::write_error_header(data, data_end, ip_off, growth + ip_off, icmp_len).ok_or(Fault)?;
    let [kind, code] = A::PORT_UNREACHABLE;
    let csum = (!fold(u16::from_ne_bytes([kind, code]) as u32 + q.quoted_sum + pseudo_sum)).to_ne_bytes();
    let icmp = [kind, code, csum[0], csum[1], 0, 0, 0, 0];
    let icmp_off = ip_off + growth - ICMP_HEADER_LEN;
    unsafe { *ptr_at::<[u8; ICMP_HEADER_LEN]>(data, data_end, core::hint::black_box(icmp_off)).ok_or(Fault)? = icmp };
    Ok(())
}

pub const ICMP_HEADER_LEN: usize = 8;
