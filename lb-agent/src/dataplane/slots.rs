//! The Maglev slot array seen through a memory mapping (`LB_MAGLEV_V2` is `BPF_F_MMAPABLE`):
//! writing a 251-slot table is 251 stores, not a map update per slot, and a restarted agent
//! reads every pinned table back without a system call per slot. Only the pages a table
//! covers are mapped, and only while it is written or read, so the array never counts in the
//! agent's resident memory.
use std::{
    io,
    sync::atomic::{fence, AtomicU32, Ordering},
};

use aya::maps::MapData;
use lb_common::MAGLEV_SLOT_STRIDE;

/// Slots `first..first + count` of the array, mapped read-write until dropped.
pub struct SlotWindow {
    mapping: *mut libc::c_void,
    mapping_len: usize,
    /// Byte offset of slot `first` in the mapping.
    start: usize,
    first: u32,
    count: usize,
}

// SAFETY: the mapping is owned by the window, and its slots are only touched atomically.
unsafe impl Send for SlotWindow {}
unsafe impl Sync for SlotWindow {}

impl SlotWindow {
    /// Maps the pages that hold slots `first..first + count` of `array` (`capacity` slots).
    pub fn map(array: &MapData, capacity: u32, first: u32, count: usize) -> io::Result<Self> {
        if first as usize + count > capacity as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("slots {first}+{count} are past the end of the array ({capacity} slots)")));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let begin = first as usize * MAGLEV_SLOT_STRIDE;
        let end = begin + count.max(1) * MAGLEV_SLOT_STRIDE;
        let page_begin = begin / page * page;
        let mapping_len = (end - page_begin).div_ceil(page) * page;
        let mapping = super::bitmap::map_shared(array, page_begin, mapping_len).map_err(|e| io::Error::new(e.kind(), format!("mapping slots {first}+{count}: {e}")))?;
        Ok(Self { mapping, mapping_len, start: begin - page_begin, first, count })
    }

    /// Whether slots `offset..offset + count` are inside the window.
    pub fn covers(&self, offset: u32, count: usize) -> bool {
        offset >= self.first && (offset - self.first) as usize + count <= self.count
    }

    fn slot(&self, i: usize) -> &AtomicU32 {
        assert!(i < self.count, "slot {i} of a {}-slot window", self.count);
        // SAFETY: in the mapping (checked above), 8-byte aligned, and only ever accessed
        // atomically: the datapath reads these slots concurrently.
        unsafe { &*(self.mapping.cast::<u8>().add(self.start + i * MAGLEV_SLOT_STRIDE).cast::<AtomicU32>()) }
    }

    /// Stores `ids` from slot `offset` of the array on (inside this window). Each store is one
    /// aligned word, so a packet reading a slot meanwhile sees either its old backend or its new one.
    pub fn write_at(&self, offset: u32, ids: &[u32]) {
        let skip = offset.checked_sub(self.first).expect("slots before the window") as usize;
        for (i, id) in ids.iter().enumerate() {
            self.slot(skip + i).store(*id, Ordering::Relaxed);
        }
        // Every slot is in memory before the service entry that points here is written.
        fence(Ordering::Release);
    }

    pub fn read(&self) -> Vec<u32> {
        (0..self.count).map(|i| self.slot(i).load(Ordering::Relaxed)).collect()
    }
}

impl Drop for SlotWindow {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.mapping, self.mapping_len) };
    }
}
