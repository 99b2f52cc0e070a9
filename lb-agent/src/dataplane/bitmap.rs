//! A bitmap array map (`BPF_F_MMAPABLE`, `u64` words) seen through a memory mapping of the
//! whole array: the filters the datapath reads (`LB_NODEPORT_V1`, `LB_FEADDR_V2`) are set and
//! cleared bit by bit with atomic stores, not a map lookup and update per bit (a cold start
//! writes one per frontend).
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;

pub struct Bitmap {
    words: *mut AtomicU64,
    len: usize,
    mapping_len: usize,
    /// Held open: programs loaded after the maps were taken name this descriptor.
    _map: MapData,
}

// SAFETY: the mapping is owned by the bitmap, and its words are only touched atomically.
unsafe impl Send for Bitmap {}
unsafe impl Sync for Bitmap {}

impl Bitmap {
    /// Maps all `len` words of `array`, keeping it.
    pub fn map(array: MapData, len: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mapping_len = (len as usize * 8).div_ceil(page) * page;
        let mapping = map_shared(&array, 0, mapping_len).map_err(|e| io::Error::new(e.kind(), format!("mapping a bitmap of {len} words: {e}")))?;
        Ok(Self { words: mapping.cast(), len: len as usize, mapping_len, _map: array })
    }

    fn word(&self, word: u32) -> &AtomicU64 {
        assert!((word as usize) < self.len, "word {word} of a {}-word bitmap", self.len);
        // SAFETY: in the mapping (checked above), 8-byte aligned (page-aligned base), and only
        // ever accessed atomically: the datapath reads these words concurrently.
        unsafe { &*self.words.add(word as usize) }
    }

    /// Sets or clears the bits `bits` of word `word`.
    pub fn set(&self, word: u32, bits: u64, on: bool) {
        if on {
            self.word(word).fetch_or(bits, Ordering::SeqCst);
        } else {
            self.word(word).fetch_and(!bits, Ordering::SeqCst);
        }
    }

    pub fn get(&self, word: u32) -> u64 {
        self.word(word).load(Ordering::SeqCst)
    }
}

/// A shared read-write mapping of `len` bytes of an array map's pages from byte `offset` (a
/// page boundary).
pub(super) fn map_shared(array: &MapData, offset: usize, len: usize) -> io::Result<*mut libc::c_void> {
    let fd = array.fd().as_fd().as_raw_fd();
    // SAFETY: a fresh shared mapping of the map's own pages; the kernel checks the range.
    let mapping = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, offset as libc::off_t) };
    if mapping == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("is the pinned array BPF_F_MMAPABLE? {e}")));
    }
    Ok(mapping)
}

impl Drop for Bitmap {
    fn drop(&mut self) {
        // SAFETY: the mapping this bitmap made, unmapped once.
        unsafe { libc::munmap(self.words.cast(), self.mapping_len) };
    }
}
