//! Backend ids: the id each backend entry has in `LB_BACKENDS_V1`, and how many frontends use
//! it. Ids are handed out densely from 1, so entries and use counts sit in an array indexed by
//! id, and the index by entry holds only ids, hashed by the entry each names: at 300k backends
//! that is 4 bytes a slot, not a second copy of every entry.
use super::{id_index::IdIndex, BackendEntry};

#[derive(Debug, Default)]
pub struct BackendIds {
    /// By id: the entry, and how many frontends use it (0: a free id).
    users: Vec<(BackendEntry, u32)>,
    by_entry: IdIndex,
}

impl BackendIds {
    /// The id `entry` has, if a frontend uses it.
    pub fn get(&self, entry: &BackendEntry) -> Option<u32> {
        self.by_entry.find(entry, |id| &self.users[id as usize].0)
    }

    /// One more user of `id`, which names `entry` (a fresh id, or the one `get` gave).
    pub fn acquire(&mut self, id: u32, entry: BackendEntry) {
        let at = id as usize;
        if self.users.len() <= at {
            self.users.resize(at + 1, (BackendEntry::default(), 0));
        }
        let (_, count) = self.users[at];
        self.users[at] = (entry, count + 1);
        if count == 0 {
            self.by_entry.insert(id, &entry, |id| &self.users[id as usize].0);
        }
    }

    /// One user fewer; true when that was the last (the id is free again).
    pub fn release(&mut self, id: u32) -> bool {
        let Some((entry, count)) = self.users.get_mut(id as usize).filter(|u| u.1 > 0) else { return false };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        self.by_entry.remove(id, entry);
        true
    }

    /// The entry a used id names.
    pub fn entry(&self, id: u32) -> Option<BackendEntry> {
        self.users.get(id as usize).filter(|u| u.1 > 0).map(|(entry, _)| *entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::Backend4V1;

    fn backend(last: u8) -> BackendEntry {
        BackendEntry::V4(Backend4V1 { addr: u32::from_be_bytes([10, 0, 0, last]).to_be(), port: 80u16.to_be(), flags: 0, _pad: 0 })
    }

    #[test]
    fn an_id_is_found_by_its_entry_until_its_last_user_lets_go() {
        let mut ids = BackendIds::default();
        ids.acquire(1, backend(1));
        ids.acquire(2, backend(2));
        ids.acquire(1, backend(1));
        assert_eq!((ids.get(&backend(1)), ids.get(&backend(2)), ids.get(&backend(3))), (Some(1), Some(2), None));
        assert!(!ids.release(1), "still used once");
        assert_eq!(ids.entry(1), Some(backend(1)));
        assert!(ids.release(1));
        assert_eq!((ids.get(&backend(1)), ids.entry(1)), (None, None));
        assert!(!ids.release(1), "a free id is left alone");
        // The freed id may name another backend; the others are untouched.
        ids.acquire(1, backend(9));
        assert_eq!((ids.get(&backend(9)), ids.get(&backend(2))), (Some(1), Some(2)));
    }
}
